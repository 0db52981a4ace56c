//! The CA's Prometheus metrics, registered into a registry the caller passes in.

use meshid_runtime::exposition::{AliveTasks, Listed};
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;

/// Labels of an issuance decision: how the caller authenticated and the outcome (`issued` or a reason).
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct IssueLabels {
    pub method: &'static str,
    pub result: &'static str,
}

/// Labels of per-authority metrics.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct AuthorityLabels {
    pub authority: String,
    pub state: &'static str,
}

/// Labels of connection events: a fixed reason word (`max_connections`, `idle_timeout`, ...).
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ReasonLabels {
    pub reason: &'static str,
}

/// Labels of an outcome: `ok` or `error`.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ResultLabels {
    pub result: &'static str,
}

/// Labels of the per-bundle-version sidecar count.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct VersionLabels {
    pub acked_version: u64,
}

/// Every metric the CA exports.
#[derive(Clone, Debug)]
pub struct Metrics {
    pub issue_requests: Family<IssueLabels, Counter>,
    pub issue_duration: Histogram,
    pub watch_streams: Gauge,
    pub bundle_version: Gauge,
    pub bundle_roots: Gauge,
    pub intermediate_expiry: Gauge,
    pub serving_cert_expiry: Gauge,
    pub connections_open: Gauge,
    pub handshake_failures: Family<ReasonLabels, Counter>,
    pub connections_refused: Family<ReasonLabels, Counter>,
    pub calls_refused: Family<ReasonLabels, Counter>,
    pub connections_closed: Family<ReasonLabels, Counter>,
    pub authority_root_expiry: Family<AuthorityLabels, Gauge>,
    pub authority_intermediate_expiry: Family<AuthorityLabels, Gauge>,
    pub authority_live_certificates: Family<AuthorityLabels, Gauge>,
    pub sidecars_by_version: Family<VersionLabels, Gauge>,
    pub revoked_sidecars: Gauge,
    pub turned_away_sidecars: Gauge,
    pub jwks_refreshes: Family<ResultLabels, Counter>,
    pub jwks_last_success: Gauge,
    pub jwks_keys: Gauge,
    pub jwt_svids: Family<ResultLabels, Counter>,
    pub revocations: Family<KindLabels, Gauge>,
    pub audit_refusals_suppressed: Counter,
    pub directory_rejected: Gauge,
    /// 1 while this process cannot record what it issues in the CA directory.
    pub issuance_unrecorded: Gauge,
    pub directory_reloads: Family<ResultLabels, Counter>,
    pub admin_unauthorized: Counter,
}

/// Labels of the revocation list: `kind` is `identity` or `serial`.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct KindLabels {
    pub kind: &'static str,
}

impl Metrics {
    /// Creates the metrics and registers them under `meshid_ca_`.
    pub fn register(registry: &mut Registry) -> Self {
        let m = Self {
            issue_requests: Family::default(),
            issue_duration: Histogram::new(exponential_buckets(0.000_05, 2.0, 16)),
            watch_streams: Gauge::default(),
            bundle_version: Gauge::default(),
            bundle_roots: Gauge::default(),
            intermediate_expiry: Gauge::default(),
            serving_cert_expiry: Gauge::default(),
            connections_open: Gauge::default(),
            handshake_failures: Family::default(),
            connections_refused: Family::default(),
            calls_refused: Family::default(),
            connections_closed: Family::default(),
            authority_root_expiry: Family::default(),
            authority_intermediate_expiry: Family::default(),
            authority_live_certificates: Family::default(),
            sidecars_by_version: Family::default(),
            revoked_sidecars: Gauge::default(),
            turned_away_sidecars: Gauge::default(),
            jwks_refreshes: Family::default(),
            jwks_last_success: Gauge::default(),
            jwks_keys: Gauge::default(),
            jwt_svids: Family::default(),
            revocations: Family::default(),
            audit_refusals_suppressed: Counter::default(),
            directory_rejected: Gauge::default(),
            issuance_unrecorded: Gauge::default(),
            directory_reloads: Family::default(),
            admin_unauthorized: Counter::default(),
        };
        for result in ["ok", "rejected"] {
            let _ = m.directory_reloads.get_or_create(&ResultLabels { result });
        }
        let r = registry.sub_registry_with_prefix("meshid_ca");
        r.register(
            "issue_requests",
            "Issue calls by authentication method and result",
            Listed(m.issue_requests.clone()),
        );
        r.register(
            "issue_duration_seconds",
            "Time to decide and sign an Issue call",
            m.issue_duration.clone(),
        );
        r.register(
            "watch_streams",
            "Open WatchTrustBundle streams",
            m.watch_streams.clone(),
        );
        r.register(
            "bundle_version",
            "Version of the trust bundle being served",
            m.bundle_version.clone(),
        );
        r.register(
            "bundle_roots",
            "Roots in the trust bundle",
            m.bundle_roots.clone(),
        );
        r.register(
            "intermediate_expiry_timestamp_seconds",
            "Not-after of the signing intermediate, seconds since the epoch",
            m.intermediate_expiry.clone(),
        );
        r.register(
            "serving_certificate_expiry_timestamp_seconds",
            "Not-after of the CA's own TLS serving certificate, seconds since the epoch",
            m.serving_cert_expiry.clone(),
        );
        r.register(
            "connections_open",
            "Open gRPC connections",
            m.connections_open.clone(),
        );
        r.register(
            "tls_handshake_failures",
            "TLS handshakes that failed or timed out, by reason (the sidecar's reasons)",
            Listed(m.handshake_failures.clone()),
        );
        r.register(
            "connections_refused",
            "Connections refused at a connection limit, by limit (max_connections, max_connections_per_source)",
            Listed(m.connections_refused.clone()),
        );
        r.register(
            "calls_refused",
            "gRPC calls answered RESOURCE_EXHAUSTED before any service looked at them, by limit (max_arriving_requests, max_arriving_requests_per_source)",
            Listed(m.calls_refused.clone()),
        );
        r.register(
            "connections_closed",
            "Connections the CA ended itself, by reason (idle_timeout, max_connection_age)",
            Listed(m.connections_closed.clone()),
        );
        r.register(
            "authority_root_expiry_timestamp_seconds",
            "Not-after of each authority's root, by authority and rotation state",
            Listed(m.authority_root_expiry.clone()),
        );
        r.register(
            "authority_intermediate_expiry_timestamp_seconds",
            "Not-after of each authority's signing intermediate",
            Listed(m.authority_intermediate_expiry.clone()),
        );
        r.register(
            "authority_live_certificates",
            "Live certificates issued under each authority (by this CA process)",
            Listed(m.authority_live_certificates.clone()),
        );
        r.register(
            "sidecars",
            "Connected sidecars by the bundle version they acknowledged (revoked ones are counted apart)",
            Listed(m.sidecars_by_version.clone()),
        );
        r.register(
            "revoked_sidecars",
            "Connected sidecars whose identity or certificate serial is revoked: no rotation gate waits for them",
            m.revoked_sidecars.clone(),
        );
        r.register(
            "turned_away_sidecars",
            "Sidecars whose bundle stream found no room on this CA process, while their certificates live, as listed (at most 1,024; rotate status counts the refusals beyond): rotate activate waits for them",
            m.turned_away_sidecars.clone(),
        );
        r.register(
            "admin_unauthorized_requests",
            "Requests for the admin port's rotation report refused for a missing or wrong admin token",
            m.admin_unauthorized.clone(),
        );
        r.register(
            "jwks_refreshes",
            "Loads of the service-account issuer's JWKS (fetches, or file reloads), by result (ok, error)",
            Listed(m.jwks_refreshes.clone()),
        );
        r.register(
            "jwks_last_success_timestamp_seconds",
            "When the JWKS was last loaded successfully, seconds since the epoch (0: never)",
            m.jwks_last_success.clone(),
        );
        r.register(
            "jwt_svids",
            "IssueJwtSvid calls by result (issued or the reason refused)",
            Listed(m.jwt_svids.clone()),
        );
        r.register(
            "jwks_keys",
            "Usable keys in the JWKS the CA verifies service-account tokens with",
            m.jwks_keys.clone(),
        );
        r.register(
            "revocations",
            "Entries of the revocation list (revocations.json) by kind: identity or serial",
            Listed(m.revocations.clone()),
        );
        r.register(
            "audit_refusals_suppressed",
            "Refused calls whose audit line was left out (a source past its lines per minute); \
             each is still counted by its call's own metric",
            m.audit_refusals_suppressed.clone(),
        );
        r.register(
            "directory_rejected",
            "1 while the CA directory's newest files are refused (broken, or a state that goes \
             backwards) and the CA serves the material it loaded before; retried every second",
            m.directory_rejected.clone(),
        );
        r.register(
            "issuance_unrecorded",
            "1 while this CA process cannot record what it issues in the CA directory (a full or read-only disk): rotate retire then waits its start + --max-ttl, and a restart before a write succeeds loses the record",
            m.issuance_unrecorded.clone(),
        );
        r.register(
            "directory_reloads",
            "Reloads of the CA directory after a change (and retries while refused), by result \
             (ok, rejected)",
            Listed(m.directory_reloads.clone()),
        );
        r.register(
            "runtime_alive_tasks",
            "Tasks alive in the process's tokio runtime",
            AliveTasks,
        );
        m
    }

    /// Publishes the revocation list's size (the trust bundle carries it whole).
    pub fn record_revocations(&self, list: &crate::revocations::Revocations) {
        let (ids, serials) = list.counts();
        for (kind, n) in [("identity", ids), ("serial", serials)] {
            self.revocations
                .get_or_create(&KindLabels { kind })
                .set(n as i64);
        }
    }

    /// Publishes a rotation report as gauges (replacing the previous set of labels).
    /// Per-authority gauges from `report`, and connected sidecars per acknowledged version.
    pub fn record_rotation(
        &self,
        report: &crate::rotation::RotationReport,
        fleet: &crate::rotation::fleet::Summary,
    ) {
        self.authority_root_expiry.clear();
        self.authority_intermediate_expiry.clear();
        self.authority_live_certificates.clear();
        for a in &report.authorities {
            let state = match a.state.as_str() {
                "prepared" => "prepared",
                "active" => "active",
                "retiring" => "retiring",
                _ => "gone",
            };
            let labels = AuthorityLabels {
                authority: a.name.clone(),
                state,
            };
            self.authority_root_expiry
                .get_or_create(&labels)
                .set(a.root_not_after);
            self.authority_intermediate_expiry
                .get_or_create(&labels)
                .set(a.intermediate_not_after);
            self.authority_live_certificates
                .get_or_create(&labels)
                .set(a.live_certificates as i64);
        }
        self.record_fleet(fleet);
    }

    /// The fleet gauges (sidecars by acknowledged version, revoked, turned away): from the
    /// connected fleet alone, so they move whatever the CA directory's state.
    pub fn record_fleet(&self, fleet: &crate::rotation::fleet::Summary) {
        self.sidecars_by_version.clear();
        self.revoked_sidecars
            .set(i64::try_from(fleet.revoked).unwrap_or(i64::MAX));
        self.turned_away_sidecars
            .set(i64::try_from(fleet.turned_away).unwrap_or(i64::MAX));
        for (version, n) in &fleet.by_version {
            self.sidecars_by_version
                .get_or_create(&VersionLabels {
                    acked_version: *version,
                })
                .set(i64::try_from(*n).unwrap_or(i64::MAX));
        }
    }
}
