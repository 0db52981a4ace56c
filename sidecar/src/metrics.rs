//! The sidecar's Prometheus metrics, registered into a registry passed in by the caller. Labels are
//! low-cardinality: direction, listener port, fixed reason and rule labels; peer identities only with
//! `--metrics-peer-identity`. Every family is listed from the start ([`Listed`]), with its series
//! once they exist; the per-listener ones exist at once ([`Metrics::listener`]).

mod traffic;

pub use traffic::{ConnMetrics, HttpProtocol, PeerLabel, status_class};

use meshid_runtime::exposition::{AliveTasks, Listed};
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;
use std::sync::atomic::AtomicU64;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ConnLabels {
    pub direction: &'static str,
    pub port: u16,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ReasonLabels {
    pub direction: &'static str,
    pub port: u16,
    pub reason: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct AuthzLabels {
    pub port: u16,
    /// `allow`, `deny`, or `audit_deny` (denied by the rules, let through in audit mode).
    pub decision: &'static str,
    pub rule: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ResultLabels {
    pub result: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct WorkloadApiLabels {
    /// The Workload API method, as the specification names it (`FetchX509SVID`, ...).
    pub method: &'static str,
    /// `ok`, or the gRPC status the call was refused with (`invalid_argument`, ...).
    pub code: &'static str,
}

/// Every metric the sidecar exports.
#[derive(Clone, Debug, Default)]
pub struct Metrics {
    pub connections_open: Family<ConnLabels, Gauge>,
    pub idle_http_connections: Family<ConnLabels, Gauge>,
    pub connections: Family<ConnLabels, Counter>,
    pub connections_refused: Family<ReasonLabels, Counter>,
    pub handshake_failures: Family<ReasonLabels, Counter>,
    pub authz: Family<AuthzLabels, Counter>,
    pub requests: Family<traffic::RequestLabels, Counter>,
    pub request_durations: traffic::Durations,
    pub received_bytes: Family<traffic::BytesLabels, Counter>,
    pub sent_bytes: Family<traffic::BytesLabels, Counter>,
    pub policy_reloads: Family<ResultLabels, Counter>,
    pub credential_updates: Family<ResultLabels, Counter>,
    pub cert_expiry: Gauge,
    pub policy_loaded: Gauge,
    pub policy_rejected: Gauge,
    pub credentials_rejected: Gauge,
    pub connections_revoked: Family<ConnLabels, Counter>,
    pub revoked_peer_closes: Family<ConnLabels, Counter>,
    pub requests_revoked: Family<ConnLabels, Counter>,
    pub stalled_responses: Counter,
    /// h2 connections closed because their peer reset most of its requests before their answers.
    pub reset_flood_closes: Counter,
    /// Inbound form bodies not read whole, by reason (`no_room`, `too_large`).
    pub form_bodies_refused: Family<ReasonLabels, Counter>,
    pub revocations: Gauge,
    pub renewals: Family<ResultLabels, Counter>,
    pub last_renewal: Gauge,
    pub bundle_updates: Family<ResultLabels, Counter>,
    pub trust_anchors: Gauge,
    pub anchor_oldest_expiry: Gauge,
    pub anchor_newest_expiry: Gauge,
    pub workload_api_calls: Family<WorkloadApiLabels, Counter>,
    pub app_svids: Family<ResultLabels, Counter>,
    pub app_svid_expiry: Gauge,
    pub jwt_svids: Family<ResultLabels, Counter>,
    pub observed_calls: Gauge,
    pub observed_dropped: Counter,
    pub heap_trims: Family<ResultLabels, Counter>,
    pub heap_trim_seconds: Counter<f64, AtomicU64>,
    /// `--metrics-peer-identity`: request, duration and byte series carry the verified peer's ID.
    pub peer_identity: bool,
    /// The peers that have series of their own ([`MAX_PEER_LABELS`] at most; see
    /// [`Metrics::peer_label`]).
    pub peer_labels:
        std::sync::Arc<std::sync::Mutex<std::collections::HashSet<std::sync::Arc<str>>>>,
}

/// The most peers that get series of their own with `--metrics-peer-identity`; later ones share
/// `peer="other"`. Series are never removed (a counter that vanished would read as a reset), so
/// over months of new callers (preview namespaces, join tokens) the label set grew without end.
pub const MAX_PEER_LABELS: usize = 1_000;

/// The `peer` label of the peers past [`MAX_PEER_LABELS`].
pub const OTHER_PEERS: &str = "other";

impl Metrics {
    /// Creates the metrics and registers them under `meshid_sidecar_`.
    pub fn register(registry: &mut Registry) -> Self {
        let m = Self::default();
        let r = registry.sub_registry_with_prefix("meshid_sidecar");
        r.register(
            "connections_open",
            "Open connections",
            Listed(m.connections_open.clone()),
        );
        r.register(
            "idle_http_connections",
            "Open HTTP/1.x connections idle with their parser and write buffers released",
            Listed(m.idle_http_connections.clone()),
        );
        r.register(
            "connections",
            "Accepted connections",
            Listed(m.connections.clone()),
        );
        r.register(
            "connections_refused",
            "Connections refused before TLS (limit reached, not ready)",
            Listed(m.connections_refused.clone()),
        );
        r.register(
            "tls_handshake_failures",
            "Failed TLS handshakes by reason",
            Listed(m.handshake_failures.clone()),
        );
        r.register(
            "authz_decisions",
            "Allow-list decisions by decision and rule",
            Listed(m.authz.clone()),
        );
        r.register(
            "requests",
            "HTTP requests by protocol and status (the sidecar's own answers included)",
            Listed(m.requests.clone()),
        );
        r.register(
            "request_duration_seconds",
            "Time from a request's head arriving to its response's head going back",
            Listed(m.request_durations.0.clone()),
        );
        r.register(
            "received_bytes",
            "Application bytes received from the side that opened the connection",
            Listed(m.received_bytes.clone()),
        );
        r.register(
            "sent_bytes",
            "Application bytes sent back to the side that opened the connection",
            Listed(m.sent_bytes.clone()),
        );
        r.register(
            "policy_reloads",
            "Policy file reloads by result",
            Listed(m.policy_reloads.clone()),
        );
        r.register(
            "credential_updates",
            "Certificate/key/bundle updates by result",
            Listed(m.credential_updates.clone()),
        );
        r.register(
            "certificate_expiry_timestamp_seconds",
            "Not-after of the current certificate, seconds since the epoch",
            m.cert_expiry.clone(),
        );
        r.register(
            "policy_loaded",
            "1 when a valid policy is loaded",
            m.policy_loaded.clone(),
        );
        r.register(
            "policy_rejected",
            "1 while the newest policy file was rejected and the last good policy is still in force",
            m.policy_rejected.clone(),
        );
        r.register(
            "credentials_rejected",
            "1 while the newest certificate files (file mode) were rejected and the last good certificate is still in force",
            m.credentials_rejected.clone(),
        );
        r.register(
            "connections_revoked",
            "Open connections (TCP, upgraded tunnels, HTTP) closed because a new policy no longer allows their peer",
            Listed(m.connections_revoked.clone()),
        );
        r.register(
            "requests_revoked",
            "Inbound HTTP requests in flight ended because a new policy no longer allows their method or path (h2: the stream is reset; HTTP/1.1: the connection is closed)",
            Listed(m.requests_revoked.clone()),
        );
        r.register(
            "stalled_responses",
            "HTTP responses dropped because the client they went to took none of them for the idle timeout (its HTTP/1.1 connection closed; h2: its stream reset, or the connection that held it closed)",
            m.stalled_responses.clone(),
        );
        r.register(
            "h2_reset_flood_connections_closed",
            "Inbound h2 connections closed because their peer reset more than 200 of its requests within a second and before their answers, more than half of those the app answered or that were reset (a rapid-reset flood)",
            m.reset_flood_closes.clone(),
        );
        r.register(
            "form_bodies_refused",
            "Inbound POST form bodies not read whole to check their _method fields, by reason (no_room: 503, --form-body-memory held by other bodies; too_large: 413, over 1 MiB or over the whole --form-body-memory)",
            Listed(m.form_bodies_refused.clone()),
        );
        r.register(
            "revoked_peer_connections_closed",
            "Open connections closed because the trust bundle revoked their peer's certificate or identity (meshid-ca revoke), or no longer verifies its chain (its root or intermediate left the bundle)",
            Listed(m.revoked_peer_closes.clone()),
        );
        r.register(
            "revocations",
            "Revoked certificates and identities in the trust bundle this sidecar enforces",
            m.revocations.clone(),
        );
        r.register(
            "renewals",
            "Certificate requests to the CA by result",
            Listed(m.renewals.clone()),
        );
        r.register(
            "workload_api_calls",
            "SPIFFE Workload API calls by method and outcome",
            Listed(m.workload_api_calls.clone()),
        );
        r.register(
            "app_svid_requests",
            "Requests to the CA for the app's own X.509-SVID (Workload API) by result",
            Listed(m.app_svids.clone()),
        );
        r.register(
            "observed_calls",
            "Distinct inbound calls (port, peer, method, path) kept for suggest-policy",
            m.observed_calls.clone(),
        );
        r.register(
            "observed_dropped",
            "Inbound calls not kept for suggest-policy because the summary was full",
            m.observed_dropped.clone(),
        );
        r.register(
            "jwt_svid_requests",
            "Requests to the CA for JWT-SVIDs for the app (Workload API; cache misses) by result",
            Listed(m.jwt_svids.clone()),
        );
        r.register(
            "app_svid_expiry_timestamp_seconds",
            "Not-after of the app's current X.509-SVID (Workload API), seconds since the epoch",
            m.app_svid_expiry.clone(),
        );
        r.register(
            "last_renewal_timestamp_seconds",
            "When the last certificate was issued, seconds since the epoch",
            m.last_renewal.clone(),
        );
        r.register(
            "bundle_updates",
            "Trust bundle updates from the CA by result",
            Listed(m.bundle_updates.clone()),
        );
        r.register(
            "trust_anchors",
            "Roots in the trust bundle held",
            m.trust_anchors.clone(),
        );
        r.register(
            "trust_anchor_oldest_expiry_timestamp_seconds",
            "Earliest not-after among the trust anchors",
            m.anchor_oldest_expiry.clone(),
        );
        r.register(
            "trust_anchor_newest_expiry_timestamp_seconds",
            "Latest not-after among the trust anchors",
            m.anchor_newest_expiry.clone(),
        );
        r.register(
            "heap_trims",
            "Trims of the heap after connections freed memory (glibc malloc_trim), by whether pages went back to the kernel",
            Listed(m.heap_trims.clone()),
        );
        r.register(
            "heap_trim_seconds",
            "Time spent trimming the heap (the runtime's thread is busy meanwhile)",
            m.heap_trim_seconds.clone(),
        );
        r.register(
            "runtime_alive_tasks",
            "Tasks alive in the process's tokio runtime",
            AliveTasks,
        );
        m
    }

    /// Counts one heap trim (`meshid_runtime::heap`): whether it gave pages back, how long it took.
    pub fn heap_trimmed(&self, released: bool, took: std::time::Duration) {
        let result = if released {
            "released"
        } else {
            "nothing_released"
        };
        self.heap_trims
            .get_or_create(&ResultLabels { result })
            .inc();
        self.heap_trim_seconds.inc_by(took.as_secs_f64());
    }

    /// A certificate set read from files is in force: its not-before stands for when it was
    /// issued (`last_renewal_timestamp_seconds`, which CA mode sets when a renewal arrives). Left
    /// at 0, the chart's `MeshidSidecarCertificateNotRenewed` read a certificate's lifetime as
    /// its whole not-after and fired for every file-mode sidecar.
    pub fn record_file_certificate(&self, s: &crate::creds::Snapshot) {
        self.last_renewal.set(s.identity.not_before);
        self.record_snapshot(s);
    }

    /// Publishes what a newly accepted credential set says.
    pub fn record_snapshot(&self, s: &crate::creds::Snapshot) {
        self.cert_expiry.set(s.identity.not_after);
        self.trust_anchors.set(s.anchors.len() as i64);
        self.revocations.set(s.anchors.revocations().len() as i64);
        if let Some(min) = s.anchor_not_after.iter().min() {
            self.anchor_oldest_expiry.set(*min);
        }
        if let Some(max) = s.anchor_not_after.iter().max() {
            self.anchor_newest_expiry.set(*max);
        }
    }

    pub fn refused(&self, direction: &'static str, port: u16, reason: &'static str) {
        self.connections_refused
            .get_or_create(&ReasonLabels {
                direction,
                port,
                reason,
            })
            .inc();
    }

    /// An inbound form body refused before it was read whole (see `inbound::form_budget`).
    pub fn form_body_refused(&self, port: u16, reason: &'static str) {
        self.form_bodies_refused
            .get_or_create(&ReasonLabels {
                direction: "inbound",
                port,
                reason,
            })
            .inc();
    }

    pub fn handshake_failed(&self, direction: &'static str, port: u16, reason: &'static str) {
        self.handshake_failures
            .get_or_create(&ReasonLabels {
                direction,
                port,
                reason,
            })
            .inc();
    }

    /// Creates a listener's series that exist before its first connection (zero-valued), so a fresh
    /// scrape shows every configured port. Byte series are per peer with `--metrics-peer-identity`:
    /// made here only when the peer is known in advance (`peer`, an upstream's expected identity).
    pub fn listener(&self, direction: &'static str, port: u16, peer: Option<&PeerLabel>) {
        let labels = ConnLabels { direction, port };
        // Each lookup creates the series; the guard it returns is dropped at once.
        drop(self.connections.get_or_create(&labels));
        drop(self.connections_open.get_or_create(&labels));
        drop(self.idle_http_connections.get_or_create(&labels));
        if direction == "inbound" {
            drop(self.connections_revoked.get_or_create(&labels));
            drop(self.requests_revoked.get_or_create(&labels));
        }
        drop(self.revoked_peer_closes.get_or_create(&labels));
        let peer = match (self.peer_identity, peer) {
            (false, _) => PeerLabel(None),
            (true, Some(peer)) => peer.clone(),
            (true, None) => return,
        };
        let bytes = traffic::BytesLabels {
            direction,
            port,
            peer,
        };
        drop(self.received_bytes.get_or_create(&bytes));
        drop(self.sent_bytes.get_or_create(&bytes));
    }

    /// The `peer` label for `id`: with `--metrics-peer-identity` the ID, or `other` once
    /// [`MAX_PEER_LABELS`] other peers have theirs; else none.
    pub fn peer_label(&self, id: &meshid_identity::SpiffeId) -> PeerLabel {
        if !self.peer_identity {
            return PeerLabel(None);
        }
        let mut labelled = self
            .peer_labels
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        if let Some(known) = labelled.get(id.as_str()) {
            return PeerLabel(Some(known.clone()));
        }
        if labelled.len() >= MAX_PEER_LABELS {
            return PeerLabel(Some(std::sync::Arc::from(OTHER_PEERS)));
        }
        let label: std::sync::Arc<str> = std::sync::Arc::from(id.as_str());
        labelled.insert(label.clone());
        PeerLabel(Some(label))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn past_the_cap_new_peers_share_one_label() {
        let mut metrics = Metrics {
            peer_identity: true,
            ..Metrics::default()
        };
        let id = |n: usize| {
            meshid_identity::SpiffeId::parse(&format!("spiffe://cluster.local/ns/n{n}/sa/s"))
                .unwrap()
        };
        let label = |m: &Metrics, n: usize| m.peer_label(&id(n)).0.unwrap().to_string();
        for n in 0..MAX_PEER_LABELS {
            assert_eq!(label(&metrics, n), id(n).as_str());
        }
        assert_eq!(label(&metrics, MAX_PEER_LABELS), OTHER_PEERS);
        assert_eq!(label(&metrics, MAX_PEER_LABELS + 1), OTHER_PEERS);
        // Those labelled before keep their own, in every clone of the metrics.
        assert_eq!(label(&metrics.clone(), 7), id(7).as_str());
        metrics.peer_identity = false;
        assert_eq!(metrics.peer_label(&id(7)).0, None);
    }
}
