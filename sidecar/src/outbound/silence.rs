//! What `--idle-timeout` means for a response coming from an upstream, once its head has come (the
//! request timeout covers the wait for the head): a body that brings nothing, over h2 while none
//! of the request's body goes to the upstream either, for the idle timeout is ended with an error
//! (the app's HTTP/1.1 response cut short and its connection closed, an h2 app's stream reset) and
//! dropped, which resets the upstream stream or closes the pooled connection. An upstream holding
//! a valid certificate could otherwise answer a head and send nothing more: the exchange, its
//! stream (one of the [`super::upstream::MAX_STREAMS`] of its connection), the request body's copy
//! and their buffers were held until its certificate expired, or the app gave up. Envoy's
//! `stream_idle_timeout` (5 minutes by default) ends such a stream likewise. A stream whose quiet
//! spells are longer (a watch without heartbeats) needs a longer `--idle-timeout`.
//!
//! The cost is nothing for a body whose next frame is ready whenever it is asked for one (most
//! responses: their data comes with the head); from the first time it is not, one timer, looked at
//! once per idle timeout. So a body is ended between one and two idle timeouts after the last
//! thing that moved.

use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

use tokio::time::{Instant, Sleep};

use crate::http::BoxError;

/// One response body's watch (see the module docs).
pub(crate) struct Silence {
    limit: Duration,
    /// Set the first time the body has nothing ready.
    timer: Option<Pin<Box<Sleep>>>,
    /// Something moved since the timer was last set.
    moved: bool,
}

impl Silence {
    pub(crate) fn new(limit: Duration) -> Self {
        Self {
            limit,
            timer: None,
            moved: false,
        }
    }

    /// Something came from the upstream.
    pub(crate) fn moved(&mut self) {
        self.moved = true;
    }

    /// Called when the body has nothing ready: `Ready` with the error that ends it once nothing
    /// has moved for a whole idle timeout (`moved_elsewhere`: whether something this watch does not
    /// see moved meanwhile, asked only then).
    pub(crate) fn poll_ended(
        &mut self,
        cx: &mut Context<'_>,
        moved_elsewhere: impl FnOnce() -> bool,
    ) -> Poll<BoxError> {
        if self.timer.is_none() {
            self.moved = false;
            self.timer = Some(Box::pin(tokio::time::sleep(self.limit)));
        }
        let Some(timer) = self.timer.as_mut() else {
            return Poll::Pending;
        };
        if timer.as_mut().poll(cx).is_pending() {
            return Poll::Pending;
        }
        if std::mem::take(&mut self.moved) || moved_elsewhere() {
            timer.as_mut().reset(Instant::now() + self.limit);
            // Registers the waker for the new deadline; not due yet.
            return timer.as_mut().poll(cx).map(|()| self.ended());
        }
        Poll::Ready(self.ended())
    }

    fn ended(&self) -> BoxError {
        if let Some(left_out) = super::dial::UPSTREAM_FAILED.take() {
            tracing::warn!(idle_timeout = ?self.limit, left_out, "the upstream sent nothing more of a response for the idle timeout; ending it");
        }
        format!(
            "the upstream sent nothing more of the response for {:?} (--idle-timeout)",
            self.limit
        )
        .into()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn poll(silence: &mut Silence, elsewhere: bool) -> Option<String> {
        let mut cx = Context::from_waker(std::task::Waker::noop());
        match silence.poll_ended(&mut cx, || elsewhere) {
            Poll::Ready(e) => Some(e.to_string()),
            Poll::Pending => None,
        }
    }

    #[tokio::test(start_paused = true)]
    async fn a_body_is_ended_after_an_idle_timeout_with_nothing_moving_and_not_before() {
        let idle = Duration::from_secs(10);
        let step = |d| tokio::time::advance(Duration::from_secs(d));
        // Nothing ready from the start: ended at the idle timeout.
        let mut silence = Silence::new(idle);
        assert_eq!(poll(&mut silence, false), None);
        step(9).await;
        assert_eq!(poll(&mut silence, false), None);
        step(1).await;
        let error = poll(&mut silence, false).expect("ended");
        assert!(error.contains("--idle-timeout"), "{error}");

        // Frames now and then: never ended; after the last one, ended between one and two idle
        // timeouts later.
        let mut silence = Silence::new(idle);
        for _ in 0..10 {
            assert_eq!(poll(&mut silence, false), None);
            step(6).await;
            silence.moved();
        }
        let mut waited = 0;
        while poll(&mut silence, false).is_none() {
            step(1).await;
            waited += 1;
            assert!(waited <= 20, "not ended {waited} s after the last frame");
        }
        assert!(waited >= 10, "ended {waited} s after the last frame");

        // Something moving the other way (a request body the upstream takes) counts too.
        let mut silence = Silence::new(idle);
        assert_eq!(poll(&mut silence, false), None);
        step(10).await;
        assert_eq!(poll(&mut silence, true), None);
        step(10).await;
        assert!(poll(&mut silence, false).is_some());
    }
}
