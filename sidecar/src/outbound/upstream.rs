//! One multiplexed h2 mTLS connection per HTTP upstream, replaced when it closes, when our own
//! certificate is renewed, or shortly before either end's certificate expires (the old one finishes
//! its in-flight requests, then closes), so no connection outlives the identities that opened it.
//!
//! Retiring a connection must never fail a request. The upstream sidecar ends a connection at our
//! certificate's expiry with a GOAWAY; a request sent as that GOAWAY crosses it would be refused.
//! So we stop sending on a connection well before: as soon as a renewed certificate is in force
//! (new connections present it), and [`RETIRE_MARGIN`] before the earlier of the two expiries
//! whatever happens. A request that the connection hands back unsent (it closed before taking it)
//! is sent once more on a new connection.

use std::io;
use std::sync::Arc;
use std::time::Duration;

use arc_swap::ArcSwapOption;
use http::{Request, Response};
use hyper::body::Incoming;
use hyper::client::conn::http2;
use hyper_util::rt::{TokioIo, TokioTimer};
use meshid_runtime::time::expiry_instant;
use tokio::time::Instant;

use super::dial::{dial_with, upstream_not_after, upstream_revoked};
use crate::conn::Shared;
use crate::creds::Snapshot;
use crate::http::{ReqBody, root_cause};
use crate::settings::Outbound;

/// How long before the earlier certificate expiry a connection takes no new requests. The upstream
/// rounds the time left down to whole seconds, so it may close up to a second early.
const RETIRE_MARGIN: Duration = Duration::from_secs(2);

struct H2Conn {
    send: http2::SendRequest<ReqBody>,
    /// Stop sending new requests here at this instant (shortly before the earlier of the two
    /// certificates' expiries), when connection ages are capped.
    retire_at: Option<Instant>,
    /// The credentials this connection presents: once they are no longer in force (a renewal, a
    /// bundle change), new requests go to a new connection.
    presented: Arc<Snapshot>,
}

/// An HTTP upstream reached over h2 + mTLS.
pub struct H2Upstream {
    spec: Arc<Outbound>,
    index: usize,
    shared: Shared,
    /// The connection in use; read without locking on the request path.
    current: ArcSwapOption<H2Conn>,
    /// Held only while dialing, so concurrent requests share one new connection.
    dialing: tokio::sync::Mutex<()>,
}

impl H2Upstream {
    pub fn new(spec: Outbound, index: usize, shared: Shared) -> Self {
        Self {
            spec: Arc::new(spec),
            index,
            shared,
            current: ArcSwapOption::empty(),
            dialing: tokio::sync::Mutex::new(()),
        }
    }

    fn usable(&self) -> Option<Arc<H2Conn>> {
        let c = self.current.load_full()?;
        let fresh = c.retire_at.is_none_or(|t| Instant::now() < t)
            && self.shared.creds.is_current(&c.presented);
        (fresh && !c.send.is_closed()).then_some(c)
    }

    /// The connection to send on: the current one while usable, else a new one. `failed` is a
    /// connection that just handed a request back: never that one again.
    async fn sender(&self, failed: Option<&Arc<H2Conn>>) -> io::Result<Arc<H2Conn>> {
        let usable = || {
            self.usable()
                .filter(|c| failed.is_none_or(|f| !Arc::ptr_eq(c, f)))
        };
        if let Some(c) = usable() {
            return Ok(c);
        }
        let _guard = self.dialing.lock().await;
        if let Some(c) = usable() {
            return Ok(c);
        }
        // Dropping our handle to the old connection lets it close once its streams are done.
        self.current.store(None);
        let (tls, presented) = dial_with(&self.spec, self.index, &self.shared).await?;
        // A revoked upstream's connection closes at once, in-flight requests with it: its
        // certificate is no longer trusted at all.
        let revoked = upstream_revoked(&tls, self.spec.local.port(), &self.shared);
        let retire_at = self.shared.limits.cap_connection_age.then(|| {
            let not_after = upstream_not_after(&tls).min(presented.identity.not_after);
            expiry_instant(not_after)
                .checked_sub(RETIRE_MARGIN)
                .unwrap_or_else(Instant::now)
        });
        let (send, conn) = http2::Builder::new(crate::http::BoxingExecutor)
            .timer(TokioTimer::new())
            .keep_alive_interval(Some(std::time::Duration::from_secs(30)))
            .keep_alive_timeout(std::time::Duration::from_secs(10))
            .handshake(TokioIo::new(meshid_runtime::io::Coalesce::new(tls)))
            .await
            .map_err(io::Error::other)?;
        let upstream = self.spec.remote.clone();
        tokio::spawn(async move {
            // The revocation watch is polled when it was woken, not at every wake of the
            // connection's task (several per request).
            let revoked = std::pin::pin!(revoked);
            tokio::select! {
                r = conn => if let Err(error) = r {
                    tracing::debug!(%error, %upstream, "upstream connection ended");
                },
                () = meshid_runtime::wake::WhenWoken::new(revoked) => {}
            }
        });
        let c = Arc::new(H2Conn {
            send,
            retire_at,
            presented,
        });
        self.current.store(Some(c.clone()));
        Ok(c)
    }

    /// Sends one request, dialing (or re-dialing) the upstream when needed. A request the
    /// connection hands back unsent goes out once more on a new connection.
    pub async fn request(&self, req: Request<ReqBody>) -> Result<Response<Incoming>, String> {
        let mut req = req;
        let mut failed = None;
        loop {
            let conn = self
                .sender(failed.as_ref())
                .await
                .map_err(|e| root_cause(&e))?;
            let mut send = conn.send.clone();
            let last_try = failed.is_some();
            if let Err(e) = send.ready().await {
                if last_try {
                    return Err(root_cause(&e));
                }
                tracing::debug!(error = %e, upstream = %self.spec.remote, "upstream connection closed before the request; on a new one");
                failed = Some(conn);
                continue;
            }
            match send.try_send_request(req).await {
                Ok(resp) => return Ok(resp),
                Err(mut e) => match e.take_message() {
                    Some(unsent) if !last_try => {
                        tracing::debug!(error = %e.error(), upstream = %self.spec.remote, "upstream connection closed with the request unsent; on a new one");
                        req = unsent;
                        failed = Some(conn);
                    }
                    _ => return Err(root_cause(&e.into_error())),
                },
            }
        }
    }
}
