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
        m
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
