//! Inbound listeners: terminate mTLS (TLS 1.3, client certificate required, verified against the
//! bundle), extract the peer's SPIFFE ID, apply the allow-list, then hand the traffic to the app on
//! localhost — as a TCP stream, or request by request over HTTP.

use std::net::SocketAddr;
use std::sync::Arc;

use meshid_proto::{SpiffeId, cert_identity_from_der};
use tokio::net::{TcpListener, TcpStream};
use tokio_rustls::TlsAcceptor;
use tracing::Instrument;

use crate::config::Inbound;
use crate::conn::{ConnLimit, Shared, copy_bidirectional_idle};
use crate::http::{self, InboundHttp};
use crate::metrics::ConnLabels;
use crate::policy::{Protocol, no_policy_decision};
use crate::verify::failure_label;

/// Who is on the other end of an accepted inbound connection.
#[derive(Debug, Clone)]
pub struct Peer {
    pub id: SpiffeId,
    /// SHA-256 (hex) of the peer's leaf certificate.
    pub cert_sha256: String,
    pub addr: SocketAddr,
    /// The peer certificate's not-after (seconds since the epoch).
    pub not_after: i64,
}

impl Peer {
    /// When this connection must end: the peer certificate's expiry, unless the cap is off.
    pub fn deadline(&self, cap: bool) -> Option<tokio::time::Instant> {
        cap.then(|| expiry_instant(self.not_after))
    }
}

/// The monotonic instant at which Unix time `not_after` is reached (now, if it has passed).
pub(crate) fn expiry_instant(not_after: i64) -> tokio::time::Instant {
    let left = (not_after - unix_now()).max(0) as u64;
    tokio::time::Instant::now() + std::time::Duration::from_secs(left)
}

/// Runs one inbound listener until shutdown; returns its connection limit for draining.
pub async fn serve(listener: TcpListener, spec: Inbound, shared: Shared, limit: ConnLimit) {
    let port = spec.listen.port();
    let http = Arc::new(InboundHttp::new(&spec, &shared));
    let mut shutdown = shared.shutdown.clone();
    loop {
        let (tcp, addr) = tokio::select! {
            r = listener.accept() => match r {
                Ok(pair) => pair,
                Err(error) => {
                    tracing::warn!(%error, port, "accept failed");
                    tokio::time::sleep(std::time::Duration::from_millis(20)).await;
                    continue;
                }
            },
            () = crate::conn::stopped(&mut shutdown) => return,
        };
        let Some(permit) = limit.try_acquire() else {
            shared.metrics.refused("inbound", port, "max_connections");
            tracing::warn!(peer_addr = %addr, port, "connection limit reached; refusing");
            continue;
        };
        let _ = tcp.set_nodelay(true);
        let shared = shared.clone();
        let spec = spec.clone();
        let http = http.clone();
        let span = tracing::info_span!("inbound", port, peer_addr = %addr);
        tokio::spawn(
            async move {
                let labels = ConnLabels {
                    direction: "inbound",
                    port,
                };
                shared.metrics.connections.get_or_create(&labels).inc();
                shared.metrics.connections_open.get_or_create(&labels).inc();
                handle(tcp, addr, &spec, &shared, http).await;
                shared.metrics.connections_open.get_or_create(&labels).dec();
                drop(permit);
            }
            .instrument(span),
        );
    }
}

async fn handle(
    tcp: TcpStream,
    addr: SocketAddr,
    spec: &Inbound,
    shared: &Shared,
    http: Arc<InboundHttp>,
) {
    let port = spec.listen.port();
    let Some(snapshot) = shared.creds.current() else {
        shared.metrics.refused("inbound", port, "no_certificate");
        tracing::warn!("no certificate loaded yet; refusing");
        return;
    };
    if !snapshot.valid_at(unix_now()) {
        shared
            .metrics
            .refused("inbound", port, "certificate_expired");
        tracing::error!("own certificate is not valid now; refusing (fail closed)");
        return;
    }
    let acceptor = TlsAcceptor::from(snapshot.server(spec.protocol).clone());
    // Boxed: the handshake state (a whole rustls connection mid-handshake) is freed when it ends
    // instead of staying in this task's future for the life of the connection.
    let handshake = Box::pin(tokio::time::timeout(
        shared.limits.handshake_timeout,
        acceptor.accept(tcp),
    ));
    let tls = match handshake.await {
        // Boxed: the stream moves through several futures below, which would each keep a dead copy.
        Ok(Ok(tls)) => Box::new(tls),
        Ok(Err(error)) => {
            let reason = error
                .get_ref()
                .and_then(|e| e.downcast_ref::<rustls::Error>())
                .map(failure_label)
                .unwrap_or("protocol");
            shared.metrics.handshake_failed("inbound", port, reason);
            tracing::info!(%error, reason, "tls handshake refused");
            return;
        }
        Err(_) => {
            shared.metrics.handshake_failed("inbound", port, "timeout");
            tracing::info!("tls handshake timed out");
            return;
        }
    };
    // The verifier accepted the chain and the identity; read the identity back for the policy.
    let leaf = tls.get_ref().1.peer_certificates().and_then(|c| c.first());
    let Some(peer) = leaf.and_then(|leaf| {
        let info = cert_identity_from_der(leaf).ok()?;
        Some(Peer {
            id: info.id,
            cert_sha256: crate::creds::sha256_hex(leaf),
            addr,
            not_after: info.not_after,
        })
    }) else {
        shared
            .metrics
            .handshake_failed("inbound", port, "bad_identity");
        return;
    };
    tracing::debug!(peer = %peer.id, "peer authenticated");
    match spec.protocol {
        Protocol::Tcp => tcp_proxy(tls, peer, spec, shared).await,
        Protocol::Http => http::serve_inbound(tls, peer, http, shared).await,
    }
}

async fn tcp_proxy(
    tls: Box<tokio_rustls::server::TlsStream<TcpStream>>,
    peer: Peer,
    spec: &Inbound,
    shared: &Shared,
) {
    let port = spec.listen.port();
    let decision = match shared.policy.load().as_ref() {
        Some(p) => p.decide_connection(port, &peer.id),
        None => no_policy_decision(),
    };
    crate::http::record_decision(shared, port, &peer.id, &decision, None);
    if !decision.allowed {
        return;
    }
    let app = match tokio::time::timeout(
        shared.limits.connect_timeout,
        TcpStream::connect(spec.target),
    )
    .await
    {
        Ok(Ok(app)) => app,
        Ok(Err(error)) => {
            tracing::warn!(%error, target = %spec.target, "app unreachable");
            return;
        }
        Err(_) => {
            tracing::warn!(target = %spec.target, "app connect timed out");
            return;
        }
    };
    let _ = app.set_nodelay(true);
    let copy = copy_bidirectional_idle(tls, app, shared.limits.idle_timeout);
    let deadline = peer.deadline(shared.limits.cap_connection_age);
    let ended = async {
        match deadline {
            Some(d) => tokio::time::sleep_until(d).await,
            None => std::future::pending().await,
        }
    };
    tokio::select! {
        r = copy => match r {
            Ok((up, down)) => tracing::debug!(peer = %peer.id, up, down, "tcp connection closed"),
            Err(error) => tracing::debug!(%error, peer = %peer.id, "tcp connection ended"),
        },
        () = ended => tracing::info!(peer = %peer.id, "closing: the peer's certificate expired"),
    }
}

pub(crate) fn unix_now() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs() as i64)
        .unwrap_or(0)
}
