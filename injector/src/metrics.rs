//! The injector's Prometheus metrics (`meshid_injector_*`), served on its plain-HTTP admin port
//! (`--admin-listen`). The serving certificate's expiry is the one that matters most: the API server
//! calls the webhook with it, and when it lapses every pod creation in an opted-in namespace fails
//! (or, with `failurePolicy: Ignore`, pods start without a sidecar).

use meshid_runtime::exposition::Listed;
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;
use serde_json::Value;
use time::OffsetDateTime;

/// Labels of an admission review: `injected`, `unchanged`, `denied` or `bad_request`.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ReviewLabels {
    pub result: &'static str,
}

/// Labels of a reload: what (`serving_certificate`, `trust_bundle`) and the outcome (`applied`,
/// `rejected`).
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ReloadLabels {
    pub what: &'static str,
    pub result: &'static str,
}

/// Labels of a refused connection or request: why (`max_connections`, `max_connections_per_source`,
/// `displaced`; `too_large`, `timeout`, `too_deep`, `invalid`, `uid_too_long`, `busy`: no room in the review memory
/// within `--review-wait`, `too_costly`: a body whose review could never fit in it).
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ReasonLabels {
    pub reason: &'static str,
}

/// Every metric the injector exports.
#[derive(Clone, Debug, Default)]
pub struct InjectorMetrics {
    pub reviews: Family<ReviewLabels, Counter>,
    pub reloads: Family<ReloadLabels, Counter>,
    pub serving_cert_expiry: Gauge,
    pub trust_bundle_roots: Gauge,
    pub connections_refused: Family<ReasonLabels, Counter>,
    pub connections_open: Gauge,
    pub requests_refused: Family<ReasonLabels, Counter>,
}

impl InjectorMetrics {
    /// Creates the metrics and registers them under `meshid_injector_`.
    pub fn register(registry: &mut Registry) -> Self {
        let m = Self::default();
        let r = registry.sub_registry_with_prefix("meshid_injector");
        r.register(
            "reviews",
            "Admission reviews answered, by result",
            Listed(m.reviews.clone()),
        );
        r.register(
            "reloads",
            "Changed serving-certificate or trust-bundle files, applied or rejected",
            Listed(m.reloads.clone()),
        );
        r.register(
            "serving_certificate_expiry_timestamp_seconds",
            "Not-after of the certificate the webhook serves (Unix seconds)",
            m.serving_cert_expiry.clone(),
        );
        r.register(
            "trust_bundle_roots",
            "Roots in the trust bundle given to injected sidecars",
            m.trust_bundle_roots.clone(),
        );
        r.register(
            "connections_refused",
            "Webhook connections closed at accept, by the limit they hit",
            Listed(m.connections_refused.clone()),
        );
        r.register(
            "connections_open",
            "Webhook connections open (handshaking or established)",
            m.connections_open.clone(),
        );
        r.register(
            "requests_refused",
            "Webhook requests answered with an HTTP error before review, by reason",
            Listed(m.requests_refused.clone()),
        );
        m
    }

    /// Counts a connection closed at accept because of `reason`.
    pub fn connection_refused(&self, reason: &'static str) {
        self.connections_refused
            .get_or_create(&ReasonLabels { reason })
            .inc();
    }

    /// Counts a request refused before review (also counted as a `bad_request` review).
    pub fn request_refused(&self, reason: &'static str) {
        self.requests_refused
            .get_or_create(&ReasonLabels { reason })
            .inc();
        self.bad_request();
    }

    /// Counts one answered review by what it did.
    pub fn review(&self, output: &Value) {
        let response = &output["response"];
        let result = if response["allowed"] != Value::Bool(true) {
            "denied"
        } else if response.get("patch").is_some() {
            "injected"
        } else {
            "unchanged"
        };
        self.reviews.get_or_create(&ReviewLabels { result }).inc();
    }

    /// Counts a request that was not an AdmissionReview at all.
    pub fn bad_request(&self) {
        self.reviews
            .get_or_create(&ReviewLabels {
                result: "bad_request",
            })
            .inc();
    }

    /// Records the serving certificate's not-after (`None`: unreadable, recorded as 0, which an
    /// expiry alert treats as expired).
    pub fn serving_cert(&self, not_after: Option<OffsetDateTime>) {
        self.serving_cert_expiry
            .set(not_after.map_or(0, OffsetDateTime::unix_timestamp));
    }

    /// Records how many roots the trust bundle given to sidecars has.
    pub fn bundle_roots(&self, roots: usize) {
        self.trust_bundle_roots
            .set(i64::try_from(roots).unwrap_or(i64::MAX));
    }

    /// Counts a reload of `what` (`applied` when `ok`, else `rejected`).
    pub fn reload(&self, what: &'static str, ok: bool) {
        let result = if ok { "applied" } else { "rejected" };
        self.reloads
            .get_or_create(&ReloadLabels { what, result })
            .inc();
    }
}
