//! One multiplexed h2 mTLS connection per HTTP upstream, replaced when it closes or when the
//! upstream's certificate expires (the old one finishes its in-flight requests, then closes), so no
//! connection outlives the identity that opened it.

use std::io;
use std::sync::Arc;

use arc_swap::ArcSwapOption;
use http::{Request, Response};
use hyper::body::Incoming;
use hyper::client::conn::http2;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use tokio::time::Instant;

use super::dial::{dial, upstream_deadline};
use crate::conn::Shared;
use crate::http::root_cause;
use crate::settings::Outbound;

struct H2Conn {
    send: http2::SendRequest<Incoming>,
    /// Stop sending new requests here at this instant (the server certificate's expiry).
    retire_at: Option<Instant>,
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

    fn usable(&self) -> Option<http2::SendRequest<Incoming>> {
        let c = self.current.load_full()?;
        let fresh = c.retire_at.is_none_or(|t| Instant::now() < t);
        (fresh && !c.send.is_closed()).then(|| c.send.clone())
    }

    async fn sender(&self) -> io::Result<http2::SendRequest<Incoming>> {
        if let Some(s) = self.usable() {
            return Ok(s);
        }
        let _guard = self.dialing.lock().await;
        if let Some(s) = self.usable() {
            return Ok(s);
        }
        // Dropping our handle to the old connection lets it close once its streams are done.
        self.current.store(None);
        let tls = dial(&self.spec, self.index, &self.shared).await?;
        let retire_at = upstream_deadline(&tls, self.shared.limits.cap_connection_age);
        let (send, conn) = http2::Builder::new(TokioExecutor::new())
            .timer(TokioTimer::new())
            .keep_alive_interval(Some(std::time::Duration::from_secs(30)))
            .keep_alive_timeout(std::time::Duration::from_secs(10))
            .handshake(TokioIo::new(meshid_runtime::io::Coalesce::new(tls)))
            .await
            .map_err(io::Error::other)?;
        let upstream = self.spec.remote.clone();
        tokio::spawn(async move {
            if let Err(error) = conn.await {
                tracing::debug!(%error, %upstream, "upstream connection ended");
            }
        });
        self.current.store(Some(Arc::new(H2Conn {
            send: send.clone(),
            retire_at,
        })));
        Ok(send)
    }

    /// Sends one request, dialing (or re-dialing) the upstream when needed.
    pub async fn request(&self, req: Request<Incoming>) -> Result<Response<Incoming>, String> {
        let mut send = self.sender().await.map_err(|e| root_cause(&e))?;
        send.ready().await.map_err(|e| root_cause(&e))?;
        send.send_request(req).await.map_err(|e| root_cause(&e))
    }
}
