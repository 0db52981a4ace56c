//! The sidecar's Prometheus metrics, registered into a registry passed in by the caller. Labels are
//! low-cardinality: direction, listener port, fixed reason and rule labels.

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;

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
pub struct RequestLabels {
    pub direction: &'static str,
    pub port: u16,
    pub code: u16,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ResultLabels {
    pub result: &'static str,
}

/// Every metric the sidecar exports.
#[derive(Clone, Debug, Default)]
pub struct Metrics {
    pub connections_open: Family<ConnLabels, Gauge>,
    pub connections: Family<ConnLabels, Counter>,
    pub connections_refused: Family<ReasonLabels, Counter>,
    pub handshake_failures: Family<ReasonLabels, Counter>,
    pub authz: Family<AuthzLabels, Counter>,
    pub requests: Family<RequestLabels, Counter>,
    pub policy_reloads: Family<ResultLabels, Counter>,
    pub credential_updates: Family<ResultLabels, Counter>,
    pub cert_expiry: Gauge,
    pub policy_loaded: Gauge,
    pub policy_rejected: Gauge,
    pub connections_revoked: Family<ConnLabels, Counter>,
    pub renewals: Family<ResultLabels, Counter>,
    pub last_renewal: Gauge,
    pub bundle_updates: Family<ResultLabels, Counter>,
    pub trust_anchors: Gauge,
    pub anchor_oldest_expiry: Gauge,
    pub anchor_newest_expiry: Gauge,
}

impl Metrics {
    /// Creates the metrics and registers them under `meshid_sidecar_`.
    pub fn register(registry: &mut Registry) -> Self {
        let m = Self::default();
        let r = registry.sub_registry_with_prefix("meshid_sidecar");
        r.register(
            "connections_open",
            "Open connections",
            m.connections_open.clone(),
        );
        r.register("connections", "Accepted connections", m.connections.clone());
        r.register(
            "connections_refused",
            "Connections refused before TLS (limit reached, not ready)",
            m.connections_refused.clone(),
        );
        r.register(
            "tls_handshake_failures",
            "Failed TLS handshakes by reason",
            m.handshake_failures.clone(),
        );
        r.register(
            "authz_decisions",
            "Allow-list decisions by decision and rule",
            m.authz.clone(),
        );
        r.register(
            "requests",
            "HTTP requests by status code",
            m.requests.clone(),
        );
        r.register(
            "policy_reloads",
            "Policy file reloads by result",
            m.policy_reloads.clone(),
        );
        r.register(
            "credential_updates",
            "Certificate/key/bundle updates by result",
            m.credential_updates.clone(),
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
            "connections_revoked",
            "Open connections (TCP, upgraded tunnels) closed because a new policy no longer allows their peer",
            m.connections_revoked.clone(),
        );
        r.register(
            "renewals",
            "Certificate requests to the CA by result",
            m.renewals.clone(),
        );
        r.register(
            "last_renewal_timestamp_seconds",
            "When the last certificate was issued, seconds since the epoch",
            m.last_renewal.clone(),
        );
        r.register(
            "bundle_updates",
            "Trust bundle updates from the CA by result",
            m.bundle_updates.clone(),
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
        m
    }

    /// Publishes what a newly accepted credential set says.
    pub fn record_snapshot(&self, s: &crate::creds::Snapshot) {
        self.cert_expiry.set(s.identity.not_after);
        self.trust_anchors.set(s.anchors.len() as i64);
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

    pub fn handshake_failed(&self, direction: &'static str, port: u16, reason: &'static str) {
        self.handshake_failures
            .get_or_create(&ReasonLabels {
                direction,
                port,
                reason,
            })
            .inc();
    }

    pub fn request(&self, direction: &'static str, port: u16, code: u16) {
        self.requests
            .get_or_create(&RequestLabels {
                direction,
                port,
                code,
            })
            .inc();
    }
}
