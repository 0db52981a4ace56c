//! Dialling an upstream: TCP, then mTLS with the current credentials, refusing a server whose
//! SPIFFE ID is not the expected one; and when such a connection must end.
//!
//! A listener's dials in progress are capped ([`DialPermits`]): a TCP listener dials once per app
//! connection, so without a cap an app opening connections in a loop towards a black-holed
//! upstream (or one whose name resolves slowly) piled up half-open dials with their handshake
//! state, and filled tokio's blocking pool (shared with the CA client and file reads) with name
//! lookups. An HTTP listener's pools share its cap: their own limits (busy HTTP/1.1 connections,
//! one h2 dial at a time) free a slot when a dial times out, while its lookup may run on.

use std::io;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use meshid_identity::verify::{describe, failure_label};
use meshid_runtime::time::{expiry_instant, unix_now};
use rustls::pki_types::ServerName;
use tokio::net::TcpStream;
use tokio::sync::{OwnedSemaphorePermit, Semaphore};

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

/// Dials one outbound listener (TCP or HTTP) may have in progress at once (TCP connect, name lookup
/// included, and TLS handshake). A dial in a healthy mesh takes a round trip and a handshake, so
/// this still allows thousands of new connections a second.
pub const MAX_DIALS_IN_PROGRESS: usize = 64;

/// One outbound listener's dials in progress: a dial holds a permit from before its TCP connect
/// until its handshake ends, and a name lookup holds it until the lookup returns (a lookup left
/// running on the blocking pool after its dial timed out still counts).
#[derive(Clone, Debug)]
pub struct DialPermits {
    permits: Arc<Semaphore>,
    max: usize,
}

impl DialPermits {
    pub fn new(max: usize) -> Self {
        Self {
            permits: Arc::new(Semaphore::new(max)),
            max,
        }
    }

    /// A permit, waiting at most `wait` for one (`None` then).
    async fn acquire(&self, wait: Duration) -> Option<OwnedSemaphorePermit> {
        // The semaphore is never closed, so an error cannot happen; treated as no permit anyway.
        tokio::time::timeout(wait, self.permits.clone().acquire_owned())
            .await
            .ok()?
            .ok()
    }
}

/// Dials the upstream and completes mTLS with the current credentials, verifying its identity;
/// returns the connection and the credential snapshot it presents (the one the upstream was
/// verified against: its [`Snapshot::trust_key`] is what [`upstream_revoked`] starts from).
///
/// Holds one of the listener's `permits` throughout: a dial that gets none within the connect
/// timeout fails ("too many dials in progress"), counted as a handshake failure
/// (`too_many_dials`).
pub async fn dial_with(
    spec: &Outbound,
    index: usize,
    shared: &Shared,
    alpn: Alpn,
    permits: &DialPermits,
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
    // Dropped when the dial ends, whichever way (a lookup still running holds a clone).
    let Some(permit) = permits.acquire(shared.limits.connect_timeout).await else {
        shared
            .metrics
            .handshake_failed("outbound", port, "too_many_dials");
        return Err(io::Error::new(
            io::ErrorKind::TimedOut,
            format!(
                "too many dials in progress to {} ({} at once)",
                spec.remote, permits.max
            ),
        ));
    };
    let permit = Arc::new(permit);
    let tcp = tokio::time::timeout(
        shared.limits.connect_timeout,
        connect(&spec.remote, Some(permit.clone()), system_lookup),
    )
    .await
    .map_err(|_| io::Error::new(io::ErrorKind::TimedOut, "connect timed out"))??;
    let _ = tcp.set_nodelay(true);
    let handshake = crate::tls::connect(config, name, tcp);
    match tokio::time::timeout(shared.limits.handshake_timeout, handshake).await {
        Ok(Ok(tls)) => {
            // The trust changed during the dial (which the upstream can draw out): the upstream
            // is looked at against the trust in force now, before any byte goes to it.
            if !shared.creds.is_current(&snapshot)
                && let Some(why) = distrusted_now(&tls, &snapshot, shared)
            {
                let reason = match why {
                    crate::creds::Distrusted::Revoked(_) => "revoked",
                    _ => "unknown_ca",
                };
                shared.metrics.handshake_failed("outbound", port, reason);
                if let Some(left_out) = UPSTREAM_FAILED.take() {
                    tracing::warn!(upstream = %spec.remote, expected = %spec.expected, reason = %why, left_out, "upstream distrusted by a bundle change during the handshake");
                }
                return Err(io::Error::other(format!(
                    "the upstream is no longer trusted: {why}"
                )));
            }
            Ok((tls, snapshot))
        }
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

/// Connects to `remote` (`host:port`): at once when the host is an IP address; a name is looked up
/// by `lookup` on the blocking pool first, which holds `permit` until the lookup returns (the
/// caller's timeout cannot stop a blocking lookup, only stop waiting for it).
async fn connect(
    remote: &str,
    permit: Option<Arc<OwnedSemaphorePermit>>,
    lookup: impl FnOnce(&str) -> io::Result<Vec<SocketAddr>> + Send + 'static,
) -> io::Result<TcpStream> {
    if let Ok(addr) = remote.parse::<SocketAddr>() {
        return TcpStream::connect(addr).await;
    }
    let name = remote.to_owned();
    let addrs = tokio::task::spawn_blocking(move || {
        let _permit = permit;
        lookup(&name)
    })
    .await
    .map_err(|_| io::Error::other(format!("looking up {remote} failed")))??;
    let mut last = None;
    for addr in addrs {
        match TcpStream::connect(addr).await {
            Ok(tcp) => return Ok(tcp),
            Err(error) => last = Some(error),
        }
    }
    Err(last.unwrap_or_else(|| {
        io::Error::new(
            io::ErrorKind::NotFound,
            format!("{remote} resolves to no address"),
        )
    }))
}

/// The system resolver (`getaddrinfo`), which blocks.
fn system_lookup(remote: &str) -> io::Result<Vec<SocketAddr>> {
    std::net::ToSocketAddrs::to_socket_addrs(remote).map(Iterator::collect)
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
/// Whether the trust in force now distrusts the upstream of `tls`, verified against `presented`'s.
fn distrusted_now(
    tls: &TlsStream<TcpStream>,
    presented: &Snapshot,
    shared: &Shared,
) -> Option<crate::creds::Distrusted> {
    let chain: Vec<_> = tls
        .get_ref()
        .1
        .peer_certificates()
        .map(|c| c.iter().map(|c| c.clone().into_owned()).collect())
        .unwrap_or_default();
    let peer = meshid_identity::peer::VerifiedPeer::from_leaf(chain.first()?).ok()?;
    let mut trust_key = presented.trust_key;
    shared.creds.distrusts(
        &peer,
        &chain,
        webpki::KeyUsage::server_auth(),
        &mut trust_key,
        None,
    )
}

/// `expiry`: the seconds past the upstream chain's earliest not-after its connection may live, when its age is
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
    let expiry = expiry.map(|grace| crate::creds::Expiry {
        not_after: meshid_identity::peer::chain_not_after(&chain, unix_now()).unwrap_or(0),
        grace,
    });
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

/// The earliest not-after of the upstream's chain: its certificate's, or an intermediate's that
/// ends first (0 when none can be read: the connection is over).
pub fn upstream_not_after(tls: &TlsStream<TcpStream>) -> i64 {
    tls.get_ref()
        .1
        .peer_certificates()
        .and_then(|chain| meshid_identity::peer::chain_not_after(chain, unix_now()))
        .unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A lookup that must not happen.
    fn no_lookup(remote: &str) -> io::Result<Vec<SocketAddr>> {
        panic!("{remote} was looked up")
    }

    #[tokio::test]
    async fn an_ip_address_is_connected_to_without_a_lookup() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        connect(&addr.to_string(), None, no_lookup).await.unwrap();
        let v6 = tokio::net::TcpListener::bind("[::1]:0").await;
        if let Ok(v6) = v6 {
            let addr = v6.local_addr().unwrap();
            connect(&addr.to_string(), None, no_lookup).await.unwrap();
        }
    }

    #[tokio::test]
    async fn a_name_is_looked_up_then_connected_to() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let remote = format!("upstream.test:{}", addr.port());
        let expected = remote.clone();
        let lookup = move |name: &str| {
            assert_eq!(name, expected);
            Ok(vec![addr])
        };
        connect(&remote, None, lookup).await.unwrap();
        let error = connect(&remote, None, |_: &str| Ok(Vec::new()))
            .await
            .unwrap_err();
        assert!(error.to_string().contains("no address"), "{error}");
    }

    /// The dial's timeout stops waiting for a lookup, not the lookup (a blocking `getaddrinfo`):
    /// the listener's permit stays taken until the lookup returns, so lookups stuck on a slow
    /// resolver cannot pile up on the blocking pool past the cap.
    #[tokio::test]
    async fn a_lookup_outliving_its_dial_holds_the_permit_until_it_returns() {
        let permits = DialPermits::new(1);
        let permit = Arc::new(permits.acquire(Duration::from_secs(5)).await.unwrap());
        let (answer, asked) = std::sync::mpsc::channel::<()>();
        let lookup = move |_: &str| {
            let _ = asked.recv();
            Ok(Vec::new())
        };
        let dial = connect("slow.test:443", Some(permit.clone()), lookup);
        assert!(
            tokio::time::timeout(Duration::from_millis(50), dial)
                .await
                .is_err()
        );
        drop(permit);
        assert!(
            permits.acquire(Duration::from_millis(50)).await.is_none(),
            "the permit came back while the lookup was still running"
        );
        answer.send(()).unwrap();
        assert!(permits.acquire(Duration::from_secs(30)).await.is_some());
    }
}
