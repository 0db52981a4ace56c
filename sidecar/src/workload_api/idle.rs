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

/// Counts every call as open on its connection until its response body has ended or is dropped.
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

impl<S, ReqBody, ResBody> tower::Service<http::Request<ReqBody>> for TrackCalls<S>
where
    S: tower::Service<http::Request<ReqBody>, Response = http::Response<ResBody>>,
    S::Future: Send + 'static,
{
    type Response = http::Response<TrackedBody<ResBody>>;
    type Error = S::Error;
    type Future = BoxFuture<Result<Self::Response, S::Error>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), S::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, req: http::Request<ReqBody>) -> Self::Future {
        let guard = req.extensions().get::<Activity>().map(Activity::call);
        let response = self.inner.call(req);
        Box::pin(async move {
            let response = response.await?;
            Ok(response.map(|inner| TrackedBody::new(inner, guard)))
        })
    }
}

/// A response body that keeps its call open until it ends or is dropped.
pub(super) type TrackedBody<B> = meshid_runtime::body::HoldUntilEnd<B, CallGuard>;

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
