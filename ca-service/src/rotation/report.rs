//! The rotation report: what every rotation step decides on, served as JSON at the CA's admin
//! `/rotation` and printed by `meshid-ca rotate status`. Data only; [`super::gates`] decides on it,
//! [`super::view`] builds it.

use serde::{Deserialize, Serialize};

/// One authority as `status` shows it.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct AuthorityView {
    pub name: String,
    pub state: String,
    pub root_sha256: String,
    pub root_not_after: i64,
    pub intermediate_not_after: i64,
    pub in_bundle_since: u64,
    pub live_certificates: usize,
    pub latest_certificate_expiry: i64,
    /// The latest not-after any CA process recorded for this authority in the CA directory (0:
    /// none recorded).
    #[serde(default)]
    pub issued_until: i64,
}

/// Everything a rotation step decides on; served as JSON at the CA's admin `/rotation`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct RotationReport {
    pub bundle_version: u64,
    pub authorities: Vec<AuthorityView>,
    pub sidecars: Vec<SidecarReport>,
    pub next_step: String,
    /// What the CA cannot measure (file-mode sidecars): reported, never silently counted as converged.
    #[serde(default)]
    pub unknown: Vec<String>,
    /// The CA processes whose views this report merges (since when each tracks issuance).
    #[serde(default)]
    pub processes: Vec<CaProcess>,
}

/// A sidecar in the report.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct SidecarReport {
    pub instance: String,
    pub identity: String,
    pub connected: bool,
    pub acked_version: u64,
    pub serving_authority: Option<String>,
    pub serving_not_after: i64,
    /// Certificate and trust anchors from files: the CA cannot tell which roots it trusts.
    #[serde(default)]
    pub file_mode: bool,
    /// The serial of the certificate it serves with (lowercase hex; empty from older CAs).
    #[serde(default)]
    pub serial: String,
    /// Its identity or that certificate is revoked: no peer accepts it, so it counts for no gate.
    #[serde(default)]
    pub revoked: bool,
    /// Why the CA could not register its bundle stream (no room left: the instance limits, or the
    /// streams a process holds); empty for a registered instance. The CA cannot see what such a
    /// sidecar trusts, so `activate` waits for it as for one that has not acknowledged, until its
    /// certificate expires, it is revoked, or a stream of its is registered.
    #[serde(default)]
    pub turned_away: String,
}

/// One CA process as its report describes it: its live-certificate counts cover only what it issued
/// since it started, so certificates an earlier process issued may be live until `started_unix` plus
/// `max_ttl_seconds`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct CaProcess {
    pub started_unix: i64,
    pub max_ttl_seconds: u64,
    /// Whether it records what it issues in the CA directory (`crate::issued`): then its start
    /// says nothing about what may be live, the records do.
    #[serde(default)]
    pub records_issuance: bool,
    /// Refusals of sidecars turned away (see [`SidecarReport::turned_away`]) beyond those this
    /// process lists by name (one that tries again counts again), and the latest expiry of their
    /// certificates: `activate` waits until then.
    #[serde(default)]
    pub turned_away_unlisted: u64,
    #[serde(default)]
    pub turned_away_unlisted_until: i64,
}
