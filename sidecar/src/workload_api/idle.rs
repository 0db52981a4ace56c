//! Closes Workload API connections that have had no call open for the sidecar's `--idle-timeout`.
//!
//! The socket takes [`super::MAX_CONNECTIONS`] connections, and one that has made a call is no
//! longer displaced by a newcomer: without this, connections left open after one call (an SDK
//! client dropped without closing, a container that called once) would keep the app out for as
//! long as they live. An SDK's watching stream (`FetchX509SVID`, `FetchX509Bundles`,
//! `FetchJWTBundles`) is a call open for as long as it lasts, so its connection is never idle;
//! a client whose connection was closed opens a new one for its next call.

use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::task::{Context, Poll};
use std::time::Duration;

use tokio::time::Instant;

/// Calls open on one connection and when the last one ended; the connection's `ConnectInfo`, so
/// that [`TrackCallsLayer`] finds it on every request.
#[derive(Debug, Clone)]
pub(super) struct Activity(Arc<Counts>);

#[derive(Debug)]
struct Counts {
    open: AtomicUsize,
    /// Milliseconds from `opened` to the end of the last call.
    last_end_ms: AtomicU64,
    opened: Instant,
}

impl Activity {
    pub(super) fn new() -> Self {
        Self(Arc::new(Counts {
            open: AtomicUsize::new(0),
            last_end_ms: AtomicU64::new(0),
            opened: Instant::now(),
        }))
    }

    fn call(&self) -> CallGuard {
        self.0.open.fetch_add(1, Ordering::AcqRel);
        CallGuard(self.0.clone())
    }

    /// Since when no call has been open (`None`: one is open now).
    fn idle_since(&self) -> Option<Instant> {
        if self.0.open.load(Ordering::Acquire) > 0 {
            return None;
        }
        let ms = self.0.last_end_ms.load(Ordering::Acquire);
        Some(self.0.opened + Duration::from_millis(ms))
    }

    /// Returns once the connection has had no call open for `timeout`.
    pub(super) async fn idle_for(&self, timeout: Duration) {
        loop {
            let now = Instant::now();
            let next = match self.idle_since() {
                None => now + timeout,
                Some(since) if now >= since + timeout => return,
                Some(since) => since + timeout,
            };
            tokio::time::sleep_until(next).await;
        }
    }
}

/// One open call; dropping it ends the call.
#[derive(Debug)]
pub(super) struct CallGuard(Arc<Counts>);

impl Drop for CallGuard {
    fn drop(&mut self) {
        let ms = u64::try_from(self.0.opened.elapsed().as_millis()).unwrap_or(u64::MAX);
        // The end first, then the count: whoever sees no call open sees this end.
        self.0.last_end_ms.fetch_max(ms, Ordering::AcqRel);
        self.0.open.fetch_sub(1, Ordering::AcqRel);
    }
}

/// Counts every call as open on its connection from when its request has arrived whole (the
/// request body ended) until its response body has ended or is dropped. A call whose request never
/// ends (HEADERS sent, the message never finished) is no call for the idle timeout: a local process
/// that stalled one such call on each of the [`super::MAX_CONNECTIONS`] connections would
/// otherwise have held every slot for ever (each connection proven by its call's headers, so never
/// displaced), and the app's next connection been closed at accept.
#[derive(Debug, Clone, Default)]
pub(super) struct TrackCallsLayer;

impl<S> tower::Layer<S> for TrackCallsLayer {
    type Service = TrackCalls<S>;
    fn layer(&self, inner: S) -> TrackCalls<S> {
        TrackCalls { inner }
    }
}

/// See [`TrackCallsLayer`].
#[derive(Debug, Clone)]
pub(super) struct TrackCalls<S> {
    inner: S,
}

type BoxFuture<T> = Pin<Box<dyn Future<Output = T> + Send>>;

/// Where a call's [`CallGuard`] is kept once its request has ended: shared by the request body
/// that takes it and the response body that keeps it.
type CallSlot = Arc<std::sync::Mutex<Option<CallGuard>>>;

impl<S, ResBody> tower::Service<http::Request<tonic::body::Body>> for TrackCalls<S>
where
    S: tower::Service<http::Request<tonic::body::Body>, Response = http::Response<ResBody>>,
    S::Future: Send + 'static,
{
    type Response = http::Response<TrackedBody<ResBody>>;
    type Error = S::Error;
    type Future = BoxFuture<Result<Self::Response, S::Error>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), S::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, req: http::Request<tonic::body::Body>) -> Self::Future {
        let slot = CallSlot::default();
        let req = match req.extensions().get::<Activity>().cloned() {
            Some(activity) if hyper::body::Body::is_end_stream(req.body()) => {
                *lock(&slot) = Some(activity.call());
                req
            }
            Some(activity) => {
                let slot = slot.clone();
                req.map(|inner| {
                    tonic::body::Body::new(UntilEnd {
                        inner,
                        activity: Some(activity),
                        slot,
                    })
                })
            }
            None => req,
        };
        let response = self.inner.call(req);
        Box::pin(async move {
            let response = response.await?;
            Ok(response.map(|inner| TrackedBody::new(inner, Some(slot))))
        })
    }
}

fn lock(slot: &CallSlot) -> std::sync::MutexGuard<'_, Option<CallGuard>> {
    slot.lock().unwrap_or_else(|p| p.into_inner())
}

/// A call's request body: its end opens the call ([`Activity::call`], kept in the slot).
struct UntilEnd {
    inner: tonic::body::Body,
    /// Taken when the body ends.
    activity: Option<Activity>,
    slot: CallSlot,
}

impl UntilEnd {
    fn ended(&mut self) {
        if let Some(activity) = self.activity.take() {
            *lock(&self.slot) = Some(activity.call());
        }
    }
}

impl hyper::body::Body for UntilEnd {
    type Data = bytes::Bytes;
    type Error = tonic::Status;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<hyper::body::Frame<bytes::Bytes>, tonic::Status>>> {
        let polled = Pin::new(&mut self.inner).poll_frame(cx);
        match &polled {
            Poll::Ready(None) => self.ended(),
            Poll::Ready(Some(Ok(_))) if self.inner.is_end_stream() => self.ended(),
            _ => {}
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> hyper::body::SizeHint {
        self.inner.size_hint()
    }
}

/// A response body that keeps its call open (once its request has ended) until it ends or is
/// dropped.
pub(super) type TrackedBody<B> = meshid_runtime::body::HoldUntilEnd<B, CallSlot>;

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn a_connection_is_idle_only_with_no_call_open() {
        let activity = Activity::new();
        let call = activity.call();
        let idle = activity.idle_for(Duration::from_secs(10));
        tokio::pin!(idle);
        // Paused time jumps ahead: a call open for a minute keeps the connection.
        assert!(
            tokio::time::timeout(Duration::from_secs(60), &mut idle)
                .await
                .is_err()
        );
        drop(call);
        let ended = Instant::now();
        idle.await;
        assert!(Instant::now() >= ended + Duration::from_secs(10));
    }
}
