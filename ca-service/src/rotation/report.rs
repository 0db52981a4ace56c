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
    /// Who holds live certificates longer than the default lifetime under this authority (what
    /// revocation releases the retire gate from): `identity` (a first certificate), or `identity
    /// lineage` (a renewal, the serial of its lineage's first certificate); at most
    /// [`super::view::MAX_LONG_HELD_BY`].
    #[serde(default)]
    pub long_held_by: Vec<String>,
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
    /// Refusals of sidecars turned away beyond those a process lists by name, per identity.
    #[serde(default)]
    pub turned_away_unlisted: Vec<UnlistedTurnedAway>,
}

/// Sidecars of one identity a CA process turned away for lack of room, or whose streams it lost (see
/// [`SidecarReport::turned_away`]) beyond the ones it lists by name: their refusals (one that
/// tries again counts again) and the latest expiry of their certificates. `activate` waits for
/// them until then, or until the identity is revoked.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct UnlistedTurnedAway {
    pub identity: String,
    pub refusals: u64,
    pub until: i64,
    /// The identity is revoked: no peer accepts these sidecars, so they count for no gate.
    #[serde(default)]
    pub revoked: bool,
}

/// A sidecar in the report.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct SidecarReport {
    /// The instance's label: the first 16 hex digits of `key` (what is shown).
    pub instance: String,
    /// The instance: SHA-256 (hex) of its certificate's public key in full, what the reports of
    /// several CA processes are merged by (empty from older CAs: merged by `instance` then).
    #[serde(default)]
    pub key: String,
    pub identity: String,
    pub connected: bool,
    pub acked_version: u64,
    /// The bundle version it said it holds with its last acknowledgement while connected (0: it
    /// said none, or it is gone). A CA process numbers the next bundle above the highest of its
    /// connected sidecars' (`CaProcess::sidecars_hold_version`): shown so that an operator can
    /// see which instance raised the number.
    #[serde(default)]
    pub held_version: u64,
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
    /// When its last bundle stream on this CA process closed (Unix seconds) for an instance that
    /// is gone (`connected` false, not turned away); 0 for the others. Until its certificate
    /// expires, `activate` waits for it as for a connected one that has not acknowledged, unless
    /// a connected instance of its `lineage` stands for it (a renewed sidecar), or it is revoked.
    #[serde(default)]
    pub last_seen: i64,
    /// The first serial of its certificate's lineage of renewals (lowercase hex; empty when not
    /// known).
    #[serde(default)]
    pub lineage: String,
}

#[cfg(test)]
impl SidecarReport {
    /// A connected sidecar labelled `instance` of `identity` that acknowledged `acked_version`,
    /// everything else empty: for tests to bend with struct update syntax.
    pub(crate) fn connected(instance: &str, identity: &str, acked_version: u64) -> Self {
        Self {
            instance: instance.into(),
            key: String::new(),
            identity: identity.into(),
            connected: true,
            acked_version,
            held_version: 0,
            serving_authority: None,
            serving_not_after: 0,
            file_mode: false,
            serial: String::new(),
            revoked: false,
            turned_away: String::new(),
            last_seen: 0,
            lineage: String::new(),
        }
    }
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
    /// process lists by name and beyond the identities it counts them for apart
    /// ([`RotationReport::turned_away_unlisted`]; one that tries again counts again), and the
    /// latest expiry of their certificates: `activate` waits until then, revoked or not (whose
    /// they are is not known).
    #[serde(default)]
    pub turned_away_unlisted: u64,
    #[serde(default)]
    pub turned_away_unlisted_until: i64,
    /// The bundle version this process serves now (0: a CA before this field). A process numbers
    /// a change of `bundle.pem` made by hand itself (one past its own version), so it may serve
    /// versions above the directory's: `rotate prepare` and `retire` number the next bundle above
    /// every version the named processes report.
    #[serde(default)]
    pub bundle_version: u64,
    /// The highest bundle version this process served without the prepared authority's root (0:
    /// none, nothing is prepared, or a CA before this field). At or above the version the
    /// directory says that root joined at, an acknowledgement of that version on this process
    /// does not show trust in the root, and `activate` waits (see
    /// [`super::gates::activate_blockers`]).
    #[serde(default)]
    pub served_without_prepared_root: u64,
    /// Until when (Unix seconds, this process's clock) the sidecars an earlier CA process served
    /// may still be reconnecting: a process that replaced one (a crash, an OOM kill, an eviction, a
    /// rollout) starts knowing none of its sidecars, its gone or turned-away instances, or their
    /// acknowledgements. Set at start from what may be live then
    /// ([`super::gates::reconnect_until`]); 0 when nothing issued before the start can be live (or a
    /// CA before this field). `activate` waits until then.
    #[serde(default)]
    pub reconnect_until: i64,
    /// This process's clock when it computed the report (Unix seconds; 0: a CA before this
    /// field). The gates compare the CAs' times (certificate expiries, starts, issuance) with the
    /// earliest of these rather than with the clock of the machine that runs `rotate`.
    #[serde(default)]
    pub reported_unix: i64,
    /// The highest bundle version a sidecar connected here says it has applied (0: none said, or
    /// a CA before this field): versions another process numbered (a hand edit of bundle.pem, or
    /// this process before a restart). Such a sidecar keeps its roots for every lower version, so
    /// `rotate prepare` and `retire` number the next bundle above it too.
    #[serde(default)]
    pub sidecars_hold_version: u64,
}
