//! Dialling an upstream: TCP, then mTLS with the current credentials, refusing a server whose
//! SPIFFE ID is not the expected one; and when such a connection must end.

use std::io;
use std::sync::Arc;

use meshid_identity::verify::{describe, failure_label};
use meshid_runtime::time::{expiry_instant, unix_now};
use rustls::pki_types::ServerName;
use tokio::net::TcpStream;

use crate::conn::Shared;
use crate::creds::Snapshot;
use crate::http::root_cause;
use crate::settings::Outbound;
use crate::tls::ClientTlsStream as TlsStream;

/// Lines about an upstream refusing or failing: each connection or request of the local app can
/// cause one, so a burst, then a steady rate (the next line written counts those left out; the
/// metrics count every failure).
pub(crate) static UPSTREAM_FAILED: meshid_runtime::log_limit::LogLimit =
    meshid_runtime::log_limit::LogLimit::new(20.0, 5.0);

/// What an HTTP upstream connection will carry (its ALPN); TCP upstreams offer none either way.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Alpn {
    H2,
    Http11,
}

/// Dials the upstream and completes mTLS with the current credentials, verifying its identity;
/// returns the connection and the credential snapshot it presents (the one the upstream was
/// verified against: its [`Snapshot::trust_key`] is what [`upstream_revoked`] starts from).
pub async fn dial_with(
    spec: &Outbound,
    index: usize,
    shared: &Shared,
    alpn: Alpn,
) -> io::Result<(TlsStream<TcpStream>, Arc<Snapshot>)> {
    let port = spec.local.port();
    let snapshot = shared
        .creds
        .current()
        .ok_or_else(|| io::Error::other("no certificate loaded yet"))?;
    if !snapshot.valid_at(unix_now()) {
        return Err(io::Error::other(
            "our certificate is not valid now (failing closed)",
        ));
    }
    let configs = match alpn {
        Alpn::H2 => &snapshot.clients,
        Alpn::Http11 => &snapshot.clients_h1,
    };
    let config = configs
        .get(index)
        .cloned()
        .ok_or_else(|| io::Error::other("no client configuration for this upstream"))?;
    let host = spec
        .remote
        .rsplit_once(':')
        .map(|(h, _)| h.trim_start_matches('[').trim_end_matches(']'))
        .unwrap_or(&spec.remote);
    // The name only feeds SNI; the verifier checks the SPIFFE ID, not this name.
    let name = ServerName::try_from(host.to_owned())
        .map_err(|_| io::Error::other(format!("bad upstream host {host:?}")))?;
    let tcp = tokio::time::timeout(
        shared.limits.connect_timeout,
        TcpStream::connect(spec.remote.as_str()),
    )
    .await
    .map_err(|_| io::Error::new(io::ErrorKind::TimedOut, "connect timed out"))??;
    let _ = tcp.set_nodelay(true);
    let handshake = crate::tls::connect(config, name, tcp);
    match tokio::time::timeout(shared.limits.handshake_timeout, handshake).await {
        Ok(Ok(tls)) => Ok((tls, snapshot)),
        Ok(Err(error)) => {
            let tls_error = error
                .get_ref()
                .and_then(|e| e.downcast_ref::<rustls::Error>());
            let reason = tls_error.map(failure_label).unwrap_or("protocol");
            shared.metrics.handshake_failed("outbound", port, reason);
            if let Some(left_out) = UPSTREAM_FAILED.take() {
                tracing::warn!(upstream = %spec.remote, expected = %spec.expected, reason = %root_cause(&error), left_out, "upstream refused");
            }
            match tls_error {
                Some(tls_error) => Err(io::Error::new(error.kind(), describe(tls_error))),
                None => Err(error),
            }
        }
        Err(_) => {
            shared.metrics.handshake_failed("outbound", port, "timeout");
            Err(io::Error::new(
                io::ErrorKind::TimedOut,
                "tls handshake timed out",
            ))
        }
    }
}

/// When a connection to an upstream must end (its certificate's expiry), if ages are capped.
pub fn upstream_deadline(tls: &TlsStream<TcpStream>, cap: bool) -> Option<tokio::time::Instant> {
    cap.then(|| expiry_instant(upstream_not_after(tls)))
}

/// Resolves once the trust bundle revokes the upstream this connection reached, or its chain no
/// longer verifies against the bundle (logged and counted); never when its certificate cannot be
/// read (the connection is over anyway). `presented` is the snapshot the handshake verified the
/// upstream against ([`dial_with`]): a bundle change during the handshake is then looked at too.
///
/// `expiry`: the seconds past the upstream's not-after its connection may live, when its age is
/// capped; once the wall clock is past that it resolves too (looked at again when the wall clock
/// moves apart from the monotonic one: [`crate::creds::CredentialStore::clock_moved`]).
pub fn upstream_revoked(
    tls: &TlsStream<TcpStream>,
    presented: &Snapshot,
    port: u16,
    shared: &Shared,
    expiry: Option<i64>,
) -> impl std::future::Future<Output = crate::creds::Distrusted> + Send + 'static {
    let chain: Vec<_> = tls
        .get_ref()
        .1
        .peer_certificates()
        .map(|c| c.iter().map(|c| c.clone().into_owned()).collect())
        .unwrap_or_default();
    let peer = chain
        .first()
        .and_then(|leaf| meshid_identity::peer::VerifiedPeer::from_leaf(leaf).ok());
    let creds = shared.creds.clone();
    // The trust the handshake verified the upstream against, which a change during a handshake
    // the upstream drew out may have replaced already (then its chain is verified again at once).
    let trust_key = presented.trust_key;
    let closed = shared
        .metrics
        .revoked_peer_closes
        .get_or_create(&crate::metrics::ConnLabels {
            direction: "outbound",
            port,
        })
        .clone();
    async move {
        let Some(peer) = peer else {
            return std::future::pending().await;
        };
        let why = creds
            .until_distrusted(
                &peer,
                &chain,
                webpki::KeyUsage::server_auth(),
                trust_key,
                expiry,
            )
            .await;
        if why.by_bundle() {
            closed.inc();
        }
        tracing::warn!(upstream = %peer.id, port, why = %why, "closing: the upstream is no longer trusted");
        why
    }
}

/// Resolves once an HTTP connection to the upstream must end with what it still carries: the
/// bundle no longer trusts the upstream ([`upstream_revoked`]), or its certificate expired and
/// the grace period after it passed (no new exchange goes out on it from shortly before the
/// expiry: an exchange still going on then, say a streamed response, gets the grace period the
/// inbound gives an expired peer's; an upstream that keeps one going cannot keep its connection).
/// The reason, logged by the caller.
pub fn upstream_http_ended(
    tls: &TlsStream<TcpStream>,
    presented: &Snapshot,
    port: u16,
    shared: &Shared,
) -> impl std::future::Future<Output = &'static str> + Send + Sync + 'static {
    let grace = i64::try_from(shared.limits.grace.as_secs()).unwrap_or(i64::MAX);
    let cap = shared.limits.cap_connection_age;
    let revoked = upstream_revoked(tls, presented, port, shared, cap.then_some(grace));
    let expired = upstream_deadline(tls, cap).map(|d| d + shared.limits.grace);
    async move {
        let expired = async {
            match expired {
                Some(at) => tokio::time::sleep_until(at).await,
                None => std::future::pending().await,
            }
        };
        const EXPIRED: &str =
            "the upstream's certificate expired (and the grace period after it passed)";
        tokio::select! {
            why = revoked => if why.by_bundle() {
                "the upstream's certificate was revoked"
            } else {
                EXPIRED
            },
            () = expired => EXPIRED,
        }
    }
}

/// The upstream certificate's not-after (0 when it cannot be read: the connection is over).
pub fn upstream_not_after(tls: &TlsStream<TcpStream>) -> i64 {
    tls.get_ref()
        .1
        .peer_certificates()
        .and_then(|c| c.first())
        .and_then(|leaf| meshid_identity::cert_identity_from_der(leaf).ok())
        .map_or(0, |i| i.not_after)
}
