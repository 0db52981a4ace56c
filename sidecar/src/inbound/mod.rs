//! Inbound listeners: terminate mTLS (TLS 1.3, client certificate required, verified against the
//! bundle), take the peer identity the verifier established, and hand the connection to the one
//! authorization point ([`authz`]) on its way to the app on localhost: as a TCP stream ([`tcp`]),
//! or request by request over HTTP ([`http`]).

pub mod app;
pub mod authz;
pub mod form_budget;
pub mod http;
pub mod proxy_header;
pub mod revocable;
pub mod tcp;

use meshid_runtime::log_limit::LogLimit;
use std::net::SocketAddr;
use std::sync::Arc;

use meshid_identity::peer::VerifiedPeer;
use meshid_identity::policy::Protocol;
use meshid_identity::verify::failure_label;
use meshid_runtime::admission::{Displaceable, is_displaced};
use meshid_runtime::time::unix_now;
use tokio::net::{TcpListener, TcpStream};
use tracing::Instrument;

use self::http::InboundHttp;
use crate::conn::{ConnLimit, ConnSlot, Metered, PeerCounts, Shared};
use crate::metrics::{ConnLabels, ConnMetrics};
use crate::settings::Inbound;
use authz::{Authorizer, Peer};

/// Runs one inbound listener until shutdown.
pub async fn serve(listener: TcpListener, spec: Inbound, shared: Shared, limit: ConnLimit) {
    let port = spec.listen.port();
    let authz = Authorizer::new(port, shared.clone());
    let http = Arc::new(InboundHttp::new(&spec, &shared, authz.clone()));
    let peers = PeerCounts::new(
        shared
            .limits
            .max_connections_per_peer
            .min(shared.limits.max_connections),
        shared.limits.max_h2_connections_per_peer,
    );
    shared.metrics.listener("inbound", port, None);
    // What every connection of the listener shares: one Arc clone per connection.
    let this = Arc::new(Listener {
        spec,
        shared: shared.clone(),
        authz,
        http,
        peers,
    });
    let mut shutdown = shared.shutdown.clone();
    while let Some((tcp, addr)) =
        meshid_runtime::net::accept(&listener, &mut shutdown, "inbound").await
    {
        let admitted = match limit.admit(addr.ip()) {
            Ok(admitted) => admitted,
            Err(refused) => {
                shared.metrics.refused("inbound", port, refused.reason());
                // Once the slots are full anyone can cause this line: a burst, then one a second.
                static FULL: LogLimit = LogLimit::new(10.0, 1.0);
                if let Some(left_out) = FULL.take() {
                    tracing::warn!(peer_addr = %addr, port, left_out, "connection limit reached and every connection authenticated; refusing");
                }
                continue;
            }
        };
        let displaced = admitted.displaced_another;
        if displaced {
            // Counted, not logged one by one: a flood would flood the log.
            shared.metrics.refused("inbound", port, "displaced");
        }
        let _ = tcp.set_nodelay(true);
        let this = this.clone();
        let span = tracing::info_span!("inbound", port, peer_addr = %addr);
        tokio::spawn(
            async move {
                let labels = ConnLabels {
                    direction: "inbound",
                    port,
                };
                let metrics = &this.shared.metrics;
                metrics.connections.get_or_create(&labels).inc();
                let open = metrics.connections_open.get_or_create(&labels).clone();
                let slot = ConnSlot::new(admitted.ticket, open);
                let tcp = Displaceable::new(tcp, admitted.displacement);
                handle(tcp, addr, &this, slot).await;
                this.shared.heap.freed();
            }
            .instrument(span),
        );
        if displaced {
            // At the cap under a flood: let the connections just admitted (a real client's among them)
            // move their handshakes on before the next arrival displaces the oldest of them.
            tokio::task::yield_now().await;
        }
    }
}

/// Acknowledges at once what the handshake read last (the client's Finished). A client that leaves
/// Nagle's algorithm on (Python's `ssl`, many Java clients) holds its first request until that
/// Finished is acknowledged, and with nothing to send back (no session tickets: resumption is off)
/// the kernel would delay the ACK by 40 ms on every new connection. TCP_QUICKACK sends a scheduled
/// ACK right away. Best effort: without it only that delay comes back.
fn ack_now(tcp: &TcpStream) {
    let _ = socket2::SockRef::from(tcp).set_tcp_quickack(true);
}

/// One inbound listener's parts, shared by its connections.
struct Listener {
    spec: Inbound,
    shared: Shared,
    authz: Authorizer,
    http: Arc<InboundHttp>,
    /// Connections per authenticated peer (`--max-connections-per-peer`), and h2 ones among them
    /// (`--max-h2-connections-per-peer`, counted once a connection opens with the h2 preface:
    /// `crate::http::serve_connection`).
    peers: PeerCounts,
}

/// Lines about the local app failing a peer's request or connection: each peer's request can cause
/// one, so a burst, then a steady rate (the next line written counts those left out; the metrics
/// count every request).
pub(crate) static APP_FAILED: LogLimit = LogLimit::new(20.0, 5.0);

async fn handle(tcp: Displaceable<TcpStream>, addr: SocketAddr, l: &Listener, slot: Arc<ConnSlot>) {
    let (spec, shared, authz, peers) = (&l.spec, &l.shared, &l.authz, &l.peers);
    let port = spec.listen.port();
    // Anyone who reaches the port causes these lines, one per connection: a burst, then one a
    // second (the metric counts every refusal).
    static REFUSING: LogLimit = LogLimit::new(10.0, 1.0);
    let Some(snapshot) = shared.creds.current() else {
        shared.metrics.refused("inbound", port, "no_certificate");
        if let Some(left_out) = REFUSING.take() {
            tracing::warn!(left_out, "no certificate loaded yet; refusing");
        }
        return;
    };
    if !snapshot.valid_at(unix_now()) {
        shared
            .metrics
            .refused("inbound", port, "certificate_expired");
        if let Some(left_out) = REFUSING.take() {
            tracing::error!(
                left_out,
                "own certificate is not valid now; refusing (fail closed)"
            );
        }
        return;
    }
    // Boxed: the handshake's future is freed when it ends instead of staying in this task's
    // future for the life of the connection.
    let handshake = Box::pin(tokio::time::timeout(
        shared.limits.handshake_timeout,
        crate::tls::accept(snapshot.server(spec.protocol).clone(), tcp),
    ));
    let mut local = spec.listen;
    let tls = match handshake.await {
        // Boxed: the stream moves through several futures below, which would each keep a dead copy.
        Ok(Ok(tls)) => {
            let tcp = tls.get_ref().0.get_ref();
            ack_now(tcp);
            // A peer that vanishes without a FIN or RST (its node gone) is noticed by the kernel:
            // the h2 server sends no PINGs. Set once the peer is authenticated, so that
            // connections refused in their handshake (a flood among them) skip its five
            // syscalls; the handshake has its own timeout.
            let _ = meshid_runtime::net::keepalive(tcp);
            // The PROXY header's destination: the address the peer reached (one syscall).
            if spec.proxy_protocol
                && let Ok(addr) = tcp.local_addr()
            {
                local = addr;
            }
            Box::new(tls)
        }
        Ok(Err(error)) if is_displaced(&error) => {
            let _ = meshid_identity::verify::take_refused_claim();
            tracing::debug!(
                "displaced during its tls handshake by a newer connection at the limit"
            );
            return;
        }
        Ok(Err(error)) => {
            let reason = error
                .get_ref()
                .and_then(|e| e.downcast_ref::<rustls::Error>())
                .map(failure_label)
                .unwrap_or("protocol");
            shared.metrics.handshake_failed("inbound", port, reason);
            // What the refused certificate claimed, if the verifier read one (same thread, same
            // poll: see `take_refused_claim`).
            let claimed = meshid_identity::verify::take_refused_claim();
            let decision = crate::decisions::new_id();
            let logged = shared.decisions.push_handshake_failure(
                crate::decisions::Recorded {
                    id: decision.clone(),
                    at: unix_now(),
                    decision: "handshake_failure".to_owned(),
                    peer: claimed.clone().unwrap_or_default(),
                    peer_addr: addr.to_string(),
                    port,
                    method: String::new(),
                    path: String::new(),
                    policy_version: *shared.policy_changed.borrow(),
                    rule: reason.to_owned(),
                    explanation: format!(
                        "handshake refused ({reason}): {}",
                        crate::decisions::cut(&error.to_string(), crate::decisions::MAX_FIELD)
                    ),
                },
                std::time::Instant::now(),
            );
            if let Some(left_out) = logged {
                tracing::info!(%error, reason, peer_addr = %addr, claimed = claimed.as_deref().unwrap_or(""), decision = %decision, left_out, "tls handshake refused");
            }
            return;
        }
        Err(_) => {
            let _ = meshid_identity::verify::take_refused_claim();
            shared.metrics.handshake_failed("inbound", port, "timeout");
            // Anyone who reaches the port can time a handshake out (no certificate needed): its
            // line shares the refused handshakes' budget, as a refusal's does.
            let decision = crate::decisions::new_id();
            let logged = shared.decisions.push_handshake_failure(
                crate::decisions::Recorded {
                    id: decision.clone(),
                    at: unix_now(),
                    decision: "handshake_failure".to_owned(),
                    peer: String::new(),
                    peer_addr: addr.to_string(),
                    port,
                    method: String::new(),
                    path: String::new(),
                    policy_version: *shared.policy_changed.borrow(),
                    rule: "timeout".to_owned(),
                    explanation: format!(
                        "handshake not finished within --handshake-timeout ({:?})",
                        shared.limits.handshake_timeout
                    ),
                },
                std::time::Instant::now(),
            );
            if let Some(left_out) = logged {
                tracing::info!(peer_addr = %addr, decision = %decision, left_out, "tls handshake timed out");
            }
            return;
        }
    };
    // The verifier of this snapshot established the peer's identity during the handshake.
    let leaf = tls.get_ref().1.peer_certificates().and_then(|c| c.first());
    let verified = leaf.and_then(|leaf| {
        snapshot.peers.get(leaf).or_else(|| {
            // Evicted between the handshake and now by a flood of other certificates: read it
            // again rather than refuse a peer whose chain just verified.
            VerifiedPeer::from_leaf(leaf).ok().map(Arc::new)
        })
    });
    let trust_key = snapshot.trust_key;
    drop(snapshot);
    let Some(verified) = verified else {
        shared
            .metrics
            .handshake_failed("inbound", port, "bad_identity");
        return;
    };
    let presented = tls.get_ref().1.peer_certificates().unwrap_or_default();
    let chain = verified.chain_or_init(presented);
    let share = match peers.try_acquire(verified.id.as_str(), addr.ip()) {
        Ok(share) => share,
        Err(over) => {
            shared
                .metrics
                .refused("inbound", port, "max_connections_per_peer");
            if over.first {
                tracing::warn!(peer = %verified.id, peer_addr = %addr.ip(), "peer holds its --max-connections-per-peer; closing its new connections until it closes some");
            }
            return;
        }
    };
    slot.hold_peer(share);
    // An authenticated peer the policy has a rule for on this port: never displaced from now on.
    // One without (on an HTTP port it is answered 403 request by request; a TCP port closes it
    // below) stays displaceable: any workload of the trust domain could otherwise hold the
    // listener's every place, a request every few minutes on each, and turn its callers away.
    if authz.has_a_rule_for(&verified.id) {
        slot.proven();
    }
    let peer = Peer::new(verified, addr, (chain, presented), trust_key);
    tracing::debug!(peer = %peer.id(), "peer authenticated");
    let metrics = ConnMetrics::new(
        &shared.metrics,
        "inbound",
        port,
        shared.metrics.peer_label(peer.id()),
    );
    let tls = Metered::new(tls, &metrics);
    match spec.protocol {
        Protocol::Tcp => {
            // The stream holds the byte counters; nothing else of them is needed for its life.
            drop(metrics);
            // Boxed, as the HTTP side's future is not: each kind of connection's task is only as
            // large as its own serving state (an idle HTTP connection keeps its task's allocation).
            Box::pin(tcp::proxy(tls, peer, local, authz, spec, shared)).await
        }
        Protocol::Http => {
            self::http::serve_inbound(tls, peer, l.http.clone(), shared, slot, metrics).await
        }
    }
}
