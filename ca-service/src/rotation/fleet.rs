//! What the CA knows about the fleet, measured rather than assumed: which sidecars are connected, which
//! bundle version each acknowledged, which authority each one's certificate chains to, and the live
//! certificates each authority has issued.
//!
//! A sidecar instance is the key of the certificate on the connection that opened its bundle
//! stream: nothing a caller sends names an instance, so a workload can register, acknowledge and
//! report only for the key it holds (one instance per certificate), only while its stream is open
//! on this CA process, and only while that certificate still holds when it calls (the service
//! checks it as a renewal's: unexpired, chaining to the bundle of the moment, not revoked). The
//! map is bounded overall and per identity. A disconnected instance is remembered as gone while
//! its certificate lives, unless an instance of its lineage is connected (a renewed sidecar is a
//! new instance of the same lineage), so that a sidecar pushed out before it acknowledged still
//! holds `activate` (see [`MAX_DEPARTED`]).

use std::collections::{BTreeMap, HashMap};
use std::sync::Mutex;

use meshid_identity::verify::Anchors;
use rustls_pki_types::{CertificateDer, UnixTime};
use serde::Serialize;

pub use super::report::{CaProcess, SidecarReport};

/// How many instances one CA process tracks, how many connected ones one identity may hold (the
/// replicas of one service account share an identity), and how many bundle streams one instance
/// may hold open at once (a sidecar holds one; a second while it reconnects).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FleetLimits {
    pub max_instances: usize,
    pub max_per_identity: usize,
    pub max_streams_per_instance: u32,
}

impl Default for FleetLimits {
    fn default() -> Self {
        Self {
            max_instances: 100_000,
            max_per_identity: 4_096,
            max_streams_per_instance: 4,
        }
    }
}

/// Who opened a bundle stream: the certificate on its connection.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Caller {
    /// SHA-256 (hex) of the certificate's public key.
    pub key: String,
    pub identity: String,
    /// Declared when the stream opens and fixed for the instance's life.
    pub file_mode: bool,
    /// Expiry (Unix seconds) of the certificate on the stream's connection.
    pub not_after: i64,
    /// Its serial (lowercase hex, as revocations name it).
    pub serial: String,
    /// The first serial of its lineage of renewals (lowercase hex; empty: not known). A renewed
    /// sidecar is a new instance (a new key) of the same lineage.
    pub lineage: String,
    /// The authority the connection's chain verifies under (read off the chain the handshake
    /// verified, as an acknowledgement's is; `None`: none this CA holds).
    pub authority: Option<String>,
}

/// What one acknowledgement says (about the caller's own certificate).
#[derive(Debug, Clone)]
pub struct Ack {
    /// The identity of the acknowledged certificate.
    pub identity: String,
    pub version: u64,
    /// The authority the serving chain verifies under (`None`: none this CA holds).
    pub authority: Option<String>,
    pub not_after: i64,
    /// The serial of the acknowledged certificate (lowercase hex).
    pub serial: String,
    pub file_mode: bool,
    /// The highest bundle version the sidecar says it has applied (0: not said).
    pub held_version: u64,
}

/// How far above the version a CA publishes an acknowledgement's `held_version` may be: a sidecar
/// holds such a version after a CA process numbered hand edits of bundle.pem itself and restarted
/// (a few); a claim beyond is a lie that would push the numbering of every later bundle up.
pub const MAX_HELD_AHEAD: u64 = 1_000;

/// Why a stream or an acknowledgement was not taken.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum FleetError {
    #[error("this CA tracks {0} sidecar instances already; retry later")]
    Full(usize),
    #[error("{identity} has {max} connected instances already")]
    TooManyForIdentity { identity: String, max: usize },
    #[error("this certificate has {max} bundle streams open on this CA already")]
    TooManyStreams { max: u32 },
    #[error(
        "no bundle stream is open on this CA with this certificate: open WatchTrustBundle first"
    )]
    NotRegistered,
    #[error("the instance was registered as {registered} mode, not {claimed} mode")]
    ModeChanged {
        registered: &'static str,
        claimed: &'static str,
    },
    #[error(
        "this key was registered by {registered}, not {claimed}: one instance, one identity \
         (a sidecar generates a new key for every certificate of a new identity)"
    )]
    IdentityChanged { registered: String, claimed: String },
    #[error("bundle version {claimed} was never published (the current one is {published})")]
    FutureVersion { claimed: u64, published: u64 },
    #[error(
        "held version {claimed} is more than {MAX_HELD_AHEAD} above the version this CA publishes \
         ({published})"
    )]
    HeldTooFarAhead { claimed: u64, published: u64 },
    #[error(
        "this instance (this key) reported a certificate that lives longer (serial {recorded}, \
         expiring at {recorded_not_after}); acknowledge with the latest certificate of the key"
    )]
    OlderCertificate {
        recorded: String,
        recorded_not_after: i64,
    },
}

fn mode(file_mode: bool) -> &'static str {
    if file_mode { "file" } else { "ca" }
}

#[derive(Debug)]
struct Sidecar {
    identity: String,
    file_mode: bool,
    streams: u32,
    acked_version: u64,
    /// The highest bundle version it said it has applied ([`Ack::held_version`]).
    held_version: u64,
    serving_authority: Option<String>,
    serving_not_after: i64,
    /// The serial of the certificate with that expiry.
    serial: String,
    /// The first serial of its certificate's lineage (empty: not known).
    lineage: String,
}

/// A report of the instance under `key` (its label: the key's first 16 hex digits), not
/// connected, acknowledging nothing, revoked or turned away by nothing: each view sets the rest.
fn report(
    key: &str,
    identity: &str,
    file_mode: bool,
    serial: &str,
    not_after: i64,
) -> SidecarReport {
    SidecarReport {
        instance: key.get(..16).unwrap_or(key).to_owned(),
        key: key.to_owned(),
        identity: identity.to_owned(),
        connected: false,
        acked_version: 0,
        held_version: 0,
        serving_authority: None,
        serving_not_after: not_after,
        file_mode,
        serial: serial.to_owned(),
        revoked: false,
        turned_away: String::new(),
        last_seen: 0,
        lineage: String::new(),
    }
}

impl Sidecar {
    fn view(&self, key: &str) -> SidecarReport {
        SidecarReport {
            connected: self.streams > 0,
            acked_version: self.acked_version,
            held_version: if self.streams > 0 {
                self.held_version
            } else {
                0
            },
            serving_authority: self.serving_authority.clone(),
            lineage: self.lineage.clone(),
            ..report(
                key,
                &self.identity,
                self.file_mode,
                &self.serial,
                self.serving_not_after,
            )
        }
    }
}

impl Departed {
    fn view(&self, key: &str) -> SidecarReport {
        SidecarReport {
            acked_version: self.acked_version,
            serving_authority: self.serving_authority.clone(),
            last_seen: self.left_at,
            lineage: self.lineage.clone(),
            ..report(
                key,
                &self.identity,
                self.file_mode,
                &self.serial,
                self.not_after,
            )
        }
    }
}

impl TurnedAway {
    fn view(&self, key: &str) -> SidecarReport {
        SidecarReport {
            turned_away: self.reason.clone(),
            lineage: self.lineage.clone(),
            ..report(
                key,
                &self.identity,
                self.file_mode,
                &self.serial,
                self.not_after,
            )
        }
    }
}

/// Marks the instances whose identity, or the certificate they serve with, `list` revokes.
pub fn mark_revoked(sidecars: &mut [SidecarReport], list: &crate::revocations::Revocations) {
    if list.entries().is_empty() {
        return;
    }
    for s in sidecars {
        s.revoked = list.lists_instance(&s.identity, &s.serial)
            || list.lists_instance(&s.identity, &s.lineage);
    }
}

/// The fleet's counts, for the metrics.
#[derive(Debug, Default)]
pub struct Summary {
    /// Connected instances, not revoked, per bundle version they acknowledged.
    pub by_version: BTreeMap<u64, usize>,
    /// Connected instances whose identity or certificate serial is revoked.
    pub revoked: usize,
    /// Sidecars turned away for lack of room whose certificates still live, as listed (at most
    /// [`MAX_TURNED_AWAY`]; refusals beyond are in the rotation report).
    pub turned_away: u64,
    /// Live certificates per authority.
    pub issued: HashMap<String, IssuedView>,
}

/// Live certificates one authority issued (as far as this CA process knows).
#[derive(Debug, Clone, Default, Serialize)]
pub struct IssuedView {
    pub live: usize,
    pub latest_not_after: i64,
    /// Certificates asked to live longer than the default, per identity: (live, latest not-after).
    /// Not in `live` above: revoking the identity releases them (see [`crate::issued`]).
    pub long: HashMap<String, (usize, i64)>,
}

/// The fleet tracker.
#[derive(Debug, Default)]
pub struct Fleet {
    inner: Mutex<Inner>,
    /// This CA process: since when it tracks issuance, and its longest lifetime.
    pub process: CaProcess,
    limits: FleetLimits,
    /// Where issuance is recorded for every process to read (none in unit tests).
    log: Option<crate::issued::IssuanceLog>,
    /// One long-certificate reservation at a time: finding room (in memory and in the CA
    /// directory's marks) and taking it are one step.
    long_gate: Mutex<()>,
}

/// The most sidecars turned away that one process lists by name; beyond, their refusals are
/// counted per identity with the latest expiry of their certificates
/// ([`super::report::UnlistedTurnedAway`]), so that revoking the identity releases `activate`
/// from them, for up to [`MAX_UNLISTED_IDENTITIES`] identities; beyond those, together
/// ([`CaProcess::turned_away_unlisted`]): `activate` then waits until their certificates have
/// expired, revoked or not.
pub const MAX_TURNED_AWAY: usize = 1_024;
/// The most identities whose turned-away sidecars beyond the list one process counts apart.
pub const MAX_UNLISTED_IDENTITIES: usize = 1_024;

/// The most instances gone from one process (their streams closed, their certificates live,
/// no connected instance of their lineage here) that it lists, at most
/// [`MAX_DEPARTED_PER_NAMESPACE`] of one namespace; beyond, they are counted with the turned-away
/// ones beyond their list (per identity, then together), and `activate` waits until their
/// certificates have expired or (per identity) their identity is revoked.
pub const MAX_DEPARTED: usize = 4_096;

/// The most lineages of one identity whose longer-than-default certificates are counted apart
/// per authority ([`Fleet::reserve_long_of`]); the others of that identity are counted under it.
pub const MAX_LONG_LINEAGES: usize = 4;

/// The most of the [`MAX_DEPARTED`] listed that the identities of one namespace
/// (`spiffe://td/ns/<ns>/...`; another identity is a namespace of its own) may take: beyond, their
/// departures are counted per identity with their turned-away sidecars beyond their list, which
/// revoking the identity releases. Without this one workload (one service-account token: a few
/// thousand fresh keys, each opening a bundle stream and hanging up) filled the list, every other
/// sidecar's departure (a routine renewal closes the old stream before opening the new one) went
/// into the count that holds `activate` whoever it is, and its own entries held the list until
/// they expired, revoked or not. Per namespace, not per identity: sixteen service accounts of one
/// namespace filled it as well.
pub const MAX_DEPARTED_PER_NAMESPACE: usize = MAX_DEPARTED / 8;

/// The namespace part of an identity `spiffe://td/ns/<ns>/...` (`spiffe://td/ns/<ns>`), or the
/// whole identity when it names no namespace.
fn namespace_of(identity: &str) -> &str {
    let scheme = "spiffe://";
    let Some(rest) = identity.strip_prefix(scheme) else {
        return identity;
    };
    let Some(slash) = rest.find('/') else {
        return identity;
    };
    let Some(after) = rest[slash..].strip_prefix("/ns/") else {
        return identity;
    };
    let end = after.find('/').unwrap_or(after.len());
    &identity[..scheme.len() + slash + "/ns/".len() + end]
}

/// An instance whose last bundle stream closed while its certificate lives: a sidecar pushed out
/// (or gone) before it acknowledged the version an `activate` waits for must not drop out of the
/// gate. Forgotten when its certificate expires, when it (its key) or an instance of its lineage
/// (the sidecar renewed) registers again.
#[derive(Debug)]
struct Departed {
    identity: String,
    file_mode: bool,
    not_after: i64,
    serial: String,
    lineage: String,
    acked_version: u64,
    serving_authority: Option<String>,
    left_at: i64,
}

/// A sidecar whose bundle stream could not be registered, as long as its certificate lives.
/// Forgotten when its certificate expires, when it (its key) or an instance of its lineage
/// registers.
#[derive(Debug)]
struct TurnedAway {
    identity: String,
    file_mode: bool,
    not_after: i64,
    serial: String,
    lineage: String,
    reason: String,
}

#[derive(Debug, Default)]
struct Inner {
    /// By key fingerprint.
    sidecars: HashMap<String, Sidecar>,
    /// Sidecars turned away, by key fingerprint (at most [`MAX_TURNED_AWAY`]).
    turned_away: HashMap<String, TurnedAway>,
    /// Refusals beyond the list per identity (a sidecar that tries again is refused again: they
    /// count refusals, not sidecars), and until when their certificates live (at most
    /// [`MAX_UNLISTED_IDENTITIES`] identities).
    unlisted_by_identity: HashMap<String, (u64, i64)>,
    /// Refusals beyond the list and beyond those identities, and until when their certificates
    /// live.
    unlisted: (u64, i64),
    /// Connected instances per identity.
    connected: HashMap<String, usize>,
    /// Instances gone while their certificates live, by key fingerprint (at most
    /// [`MAX_DEPARTED`]).
    departed: HashMap<String, Departed>,
    /// Connected instances per lineage (those whose lineage is known).
    lineages: HashMap<String, usize>,
    /// authority name -> live certificates it issued, counted per not-after second.
    issued: HashMap<String, Expiries>,
    /// authority name -> identity -> its live certificates asked to live longer than the default
    /// (up to `crate::issued::MAX_LONG_IDENTITIES` identities; the rest in `issued`).
    long: HashMap<String, HashMap<String, Expiries>>,
}

impl Inner {
    fn forget_expired_turned_away(&mut self, now: i64) {
        self.turned_away.retain(|_, t| t.not_after > now);
        self.departed.retain(|_, d| d.not_after > now);
        self.unlisted_by_identity
            .retain(|_, (_, until)| *until > now);
    }
}

/// Certificates counted by their not-after second: recording one and dropping the expired ones cost
/// O(log n), however many certificates are live (a busy CA issues thousands per second).
#[derive(Debug, Default)]
struct Expiries {
    by_second: BTreeMap<i64, u64>,
    live: u64,
}

impl Expiries {
    fn prune(&mut self, now: i64) {
        while let Some(entry) = self.by_second.first_entry() {
            if *entry.key() > now {
                break;
            }
            self.live -= entry.remove();
        }
    }

    fn add(&mut self, not_after: i64) {
        *self.by_second.entry(not_after).or_default() += 1;
        self.live += 1;
    }

    fn latest(&self) -> i64 {
        self.by_second.last_key_value().map_or(0, |(t, _)| *t)
    }
}

/// The authority a chain belongs to: the first whose root (and pin, when its root is shared)
/// verifies it.
pub fn authority_of(
    chain: &[CertificateDer<'_>],
    authorities: &[(String, Anchors)],
    now: i64,
) -> Option<String> {
    let algs = rustls::crypto::aws_lc_rs::default_provider().signature_verification_algorithms;
    let time = UnixTime::since_unix_epoch(std::time::Duration::from_secs(now.max(0) as u64));
    authorities.iter().find_map(|(name, anchors)| {
        anchors
            .verify_workload_chain(&algs, chain, time, webpki::KeyUsage::client_auth())
            .ok()
            .map(|()| name.clone())
    })
}

/// The latest not-after the CA directory's issuance marks give, over every authority and every
/// identity marked apart (0: none); `None` when that is not known (a mark or the state cannot be
/// read).
fn issued_before(ca_dir: &std::path::Path) -> Option<i64> {
    if !crate::issued::unreadable_marks(ca_dir).is_empty() {
        return None;
    }
    let state = crate::authorities::RotationState::load(ca_dir).ok()?;
    Some(
        state
            .authorities
            .iter()
            .flat_map(|a| {
                let long = crate::issued::long_issued_until(ca_dir, &a.name).into_values();
                long.chain([crate::issued::issued_until(ca_dir, &a.name)])
            })
            .max()
            .unwrap_or(0),
    )
}

/// Whether this process can write issuance marks in `ca_dir`, tried as its log writes them (the
/// folder made, a file created in it). Where this process cannot write, earlier ones could not
/// either (a read-only mount): that no mark is there then says nothing about what may be live. The
/// probe is named as `write_atomic`'s temporary files are, which readers
/// skip and any process removes if a kill left one behind.
fn can_mark(ca_dir: &std::path::Path) -> bool {
    let dir = ca_dir.join(crate::issued::ISSUED_DIR);
    let probe = dir.join(format!("start-probe.tmp{}", std::process::id()));
    let written = std::fs::create_dir_all(&dir).and_then(|()| std::fs::write(&probe, b""));
    let _ = std::fs::remove_file(&probe);
    written.is_ok()
}

impl Fleet {
    pub fn new(process: CaProcess) -> Self {
        Self::with_limits(process, FleetLimits::default())
    }

    pub fn with_limits(process: CaProcess, limits: FleetLimits) -> Self {
        Self {
            inner: Mutex::default(),
            process,
            limits,
            log: None,
            long_gate: Mutex::default(),
        }
    }

    /// Records every issuance in `ca_dir` before the certificate is handed out. Called as the
    /// process starts: the marks every process wrote so far say until when certificates issued
    /// before this start may be live, and so until when sidecars an earlier process served may
    /// still be reconnecting ([`CaProcess::reconnect_until`]).
    pub fn recording_to(mut self, ca_dir: &std::path::Path) -> Self {
        let log = crate::issued::IssuanceLog::new(ca_dir);
        let recorded = (log.writable() && can_mark(ca_dir))
            .then(|| issued_before(ca_dir))
            .flatten();
        self.process.reconnect_until = super::gates::reconnect_until(
            self.process.started_unix,
            self.process.max_ttl_seconds,
            recorded,
        );
        self.log = Some(log);
        self
    }

    /// Whether this process's writes of what it issues to the CA directory fail now (never on a
    /// Secret volume, where none is tried, nor without a directory).
    pub fn issuance_unrecorded(&self) -> bool {
        self.log
            .as_ref()
            .is_some_and(crate::issued::IssuanceLog::failing)
    }

    /// This process as its report describes it now.
    pub fn process_now(&self) -> CaProcess {
        let inner = self.lock();
        let (unlisted, until) = inner.unlisted;
        // Of the sidecars connected now: one that left may never come back.
        let sidecars_hold_version = inner
            .sidecars
            .values()
            .filter(|s| s.streams > 0)
            .map(|s| s.held_version)
            .max()
            .unwrap_or(0);
        drop(inner);
        CaProcess {
            records_issuance: self.log.as_ref().is_some_and(|l| l.writable()),
            sidecars_hold_version,
            turned_away_unlisted: unlisted,
            turned_away_unlisted_until: until,
            ..self.process
        }
    }

    /// Records a sidecar whose bundle stream could not be registered for lack of room (`reason`).
    /// Until its certificate expires, it is revoked, or a stream of its is registered, it holds
    /// `activate`: the CA cannot see what it trusts, and a gate that passed without it would hand
    /// out certificates under a root it may not trust yet. (A workload that fills the room to hide
    /// honest sidecars from the gate makes them visible this way, and holds the rotation only
    /// until it is revoked, as a sidecar that never acknowledges does: beyond the
    /// [`MAX_TURNED_AWAY`] listed, refusals are counted per identity. Only past
    /// [`MAX_UNLISTED_IDENTITIES`] identities are they counted together, and then hold the
    /// rotation until their certificates expire, revoked or not: the safe side, since whose they
    /// are is no longer known.)
    pub fn turned_away(&self, caller: &Caller, reason: &str, now: i64) {
        let mut inner = self.lock();
        Self::turn_away(&mut inner, caller, reason, now);
    }

    fn turn_away(inner: &mut Inner, caller: &Caller, reason: &str, now: i64) {
        // A registered instance is measured already (a second stream of its refused, say).
        if caller.not_after <= now || inner.sidecars.contains_key(&caller.key) {
            return;
        }
        let no_room = |inner: &Inner| {
            inner.turned_away.len() >= MAX_TURNED_AWAY
                && !inner.turned_away.contains_key(&caller.key)
        };
        if no_room(inner) {
            inner.forget_expired_turned_away(now);
        }
        if no_room(inner) {
            Self::count_unlisted(inner, &caller.identity, caller.not_after, now);
            return;
        }
        inner.turned_away.insert(
            caller.key.clone(),
            TurnedAway {
                identity: caller.identity.clone(),
                file_mode: caller.file_mode,
                not_after: caller.not_after,
                serial: caller.serial.clone(),
                lineage: caller.lineage.clone(),
                reason: reason.to_owned(),
            },
        );
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// A bundle stream opened by `caller`: registers its instance, or counts one more stream of it.
    /// An instance of its lineage (when known) that is gone ([`Self::stream_closed`]) or was
    /// turned away is forgotten once this one registers (a renewed sidecar reconnecting).
    pub fn stream_opened(&self, caller: &Caller, now: i64) -> Result<(), FleetError> {
        let lineage = caller.lineage.as_str();
        let mut inner = self.lock();
        let inner = &mut *inner;
        if let Some(s) = inner.sidecars.get_mut(&caller.key) {
            if s.file_mode != caller.file_mode {
                return Err(FleetError::ModeChanged {
                    registered: mode(s.file_mode),
                    claimed: mode(caller.file_mode),
                });
            }
            // The same key certified for another identity (a workload that can attest as two):
            // taken, its streams and acknowledgements would move the first identity's instance
            // (serial, lineage, authority) while the fleet lists it, and `revoke --id` matches it,
            // under the first.
            if s.identity != caller.identity {
                return Err(FleetError::IdentityChanged {
                    registered: s.identity.clone(),
                    claimed: caller.identity.clone(),
                });
            }
            if s.streams >= self.limits.max_streams_per_instance {
                return Err(FleetError::TooManyStreams {
                    max: self.limits.max_streams_per_instance,
                });
            }
            if s.streams == 0 {
                let n = inner.connected.entry(s.identity.clone()).or_default();
                if *n >= self.limits.max_per_identity {
                    return Err(FleetError::TooManyForIdentity {
                        identity: s.identity.clone(),
                        max: self.limits.max_per_identity,
                    });
                }
                *n += 1;
            }
            s.streams += 1;
            // The same key on a later certificate (a renewal that kept its key): the instance
            // is as alive as its latest one, and serves that one: its authority and lineage too.
            // Before, the authority an earlier acknowledgement named stayed: a workload that
            // renewed its key under the new authority, opened a stream with it and never
            // acknowledged held `retire` for as long as it kept renewing.
            if caller.not_after > s.serving_not_after {
                s.serving_not_after = caller.not_after;
                s.serial.clone_from(&caller.serial);
                s.serving_authority.clone_from(&caller.authority);
                if s.lineage != caller.lineage {
                    if !s.lineage.is_empty()
                        && let Some(n) = inner.lineages.get_mut(&s.lineage)
                    {
                        *n = n.saturating_sub(1);
                        if *n == 0 {
                            inner.lineages.remove(&s.lineage);
                        }
                    }
                    if !caller.lineage.is_empty() {
                        *inner.lineages.entry(caller.lineage.clone()).or_default() += 1;
                    }
                    s.lineage.clone_from(&caller.lineage);
                }
            }
            return Ok(());
        }
        let connected = inner.connected.get(&caller.identity).copied().unwrap_or(0);
        let refused = if connected >= self.limits.max_per_identity {
            Some(FleetError::TooManyForIdentity {
                identity: caller.identity.clone(),
                max: self.limits.max_per_identity,
            })
        } else if inner.sidecars.len() >= self.limits.max_instances {
            Some(FleetError::Full(inner.sidecars.len()))
        } else {
            None
        };
        if let Some(e) = refused {
            Self::turn_away(inner, caller, &e.to_string(), now);
            return Err(e);
        }
        inner.turned_away.remove(&caller.key);
        inner.departed.remove(&caller.key);
        if !lineage.is_empty() {
            if !inner.departed.is_empty() {
                inner.departed.retain(|_, d| d.lineage != lineage);
            }
            if !inner.turned_away.is_empty() {
                inner.turned_away.retain(|_, t| t.lineage != lineage);
            }
            *inner.lineages.entry(lineage.to_owned()).or_default() += 1;
        }
        *inner.connected.entry(caller.identity.clone()).or_default() += 1;
        inner.sidecars.insert(
            caller.key.clone(),
            Sidecar {
                identity: caller.identity.clone(),
                file_mode: caller.file_mode,
                streams: 1,
                acked_version: 0,
                held_version: 0,
                serving_authority: None,
                // Known from the connection's certificate before any acknowledgement: an
                // instance stops counting for the gates once it has expired, acknowledged or not.
                serving_not_after: caller.not_after,
                serial: caller.serial.clone(),
                lineage: lineage.to_owned(),
            },
        );
        Ok(())
    }

    /// A bundle stream of the instance with key `key` ended. An instance with no stream left is
    /// no longer connected; while its certificate lives it is remembered as gone (it holds
    /// `activate` until it is seen again, its certificate expires, or it is revoked: see
    /// [`Departed`]), unless an instance of its lineage is connected here (a renewed sidecar,
    /// whose new key registered first).
    pub fn stream_closed(&self, key: &str) {
        let now = time::OffsetDateTime::now_utc().unix_timestamp();
        let mut inner = self.lock();
        let inner = &mut *inner;
        let Some(s) = inner.sidecars.get_mut(key) else {
            return;
        };
        s.streams = s.streams.saturating_sub(1);
        if s.streams > 0 {
            return;
        }
        let identity = s.identity.clone();
        let Some(s) = inner.sidecars.remove(key) else {
            return;
        };
        let successor = if s.lineage.is_empty() {
            false
        } else {
            let n = inner.lineages.entry(s.lineage.clone()).or_default();
            *n = n.saturating_sub(1);
            let left = *n;
            if left == 0 {
                inner.lineages.remove(&s.lineage);
            }
            left > 0
        };
        if !successor && s.serving_not_after > now {
            Self::remember_departed(inner, key, s, now);
        }
        if let Some(n) = inner.connected.get_mut(&identity) {
            *n = n.saturating_sub(1);
            if *n == 0 {
                inner.connected.remove(&identity);
            }
        }
    }

    /// A sidecar beyond a list (turned away, or gone: [`MAX_DEPARTED`]) counted per identity, up
    /// to [`MAX_UNLISTED_IDENTITIES`] identities, then together, with when the last of their
    /// certificates expires.
    fn count_unlisted(inner: &mut Inner, identity: &str, not_after: i64, now: i64) {
        let by_identity = &mut inner.unlisted_by_identity;
        let (count, until) =
            if by_identity.contains_key(identity) || by_identity.len() < MAX_UNLISTED_IDENTITIES {
                by_identity.entry(identity.to_owned()).or_default()
            } else {
                &mut inner.unlisted
            };
        if *until <= now {
            *count = 0;
        }
        *count += 1;
        *until = (*until).max(not_after);
    }

    fn remember_departed(inner: &mut Inner, key: &str, s: Sidecar, now: i64) {
        let namespace = namespace_of(&s.identity);
        let full = |inner: &Inner| {
            inner.departed.len() >= MAX_DEPARTED
                || (inner.departed.len() >= MAX_DEPARTED_PER_NAMESPACE
                    && inner
                        .departed
                        .values()
                        .filter(|d| namespace_of(&d.identity) == namespace)
                        .count()
                        >= MAX_DEPARTED_PER_NAMESPACE)
        };
        if full(inner) {
            inner.forget_expired_turned_away(now);
        }
        if full(inner) {
            Self::count_unlisted(inner, &s.identity, s.serving_not_after, now);
            return;
        }
        inner.departed.insert(
            key.to_owned(),
            Departed {
                identity: s.identity,
                file_mode: s.file_mode,
                not_after: s.serving_not_after,
                serial: s.serial,
                lineage: s.lineage,
                acked_version: s.acked_version,
                serving_authority: s.serving_authority,
                left_at: now,
            },
        );
    }

    /// Records an acknowledgement by the instance with key `key`, which must have a stream open
    /// here. `published` is the bundle version this CA serves: nothing above it was ever sent.
    pub fn ack(&self, key: &str, ack: Ack, published: u64) -> Result<(), FleetError> {
        let mut inner = self.lock();
        let s = inner
            .sidecars
            .get_mut(key)
            .filter(|s| s.streams > 0)
            .ok_or(FleetError::NotRegistered)?;
        if s.file_mode != ack.file_mode {
            return Err(FleetError::ModeChanged {
                registered: mode(s.file_mode),
                claimed: mode(ack.file_mode),
            });
        }
        if s.identity != ack.identity {
            return Err(FleetError::IdentityChanged {
                registered: s.identity.clone(),
                claimed: ack.identity,
            });
        }
        if ack.version > published {
            return Err(FleetError::FutureVersion {
                claimed: ack.version,
                published,
            });
        }
        if ack.held_version > published.saturating_add(MAX_HELD_AHEAD) {
            return Err(FleetError::HeldTooFarAhead {
                claimed: ack.held_version,
                published,
            });
        }
        // Two certificates of one key: the instance is what its latest one says. An older one
        // (still valid, presented on another connection) would move the serial and expiry back:
        // the instance would count again after a revocation of the newer serial, or stop counting
        // when the older expires.
        if ack.not_after < s.serving_not_after {
            return Err(FleetError::OlderCertificate {
                recorded: s.serial.clone(),
                recorded_not_after: s.serving_not_after,
            });
        }
        // A file-mode sidecar's version means nothing: its anchors come from files.
        if !s.file_mode {
            s.acked_version = s.acked_version.max(ack.version);
            s.held_version = s.held_version.max(ack.held_version);
        }
        s.serving_authority = ack.authority;
        s.serving_not_after = ack.not_after;
        s.serial = ack.serial;
        Ok(())
    }

    /// Called before a certificate of `identity` asked to live longer than the CA's default
    /// lifetime is signed under `authority`, to live until `not_after`: counts it under its
    /// identity, here and in the CA directory (`crate::issued`), so that revoking the identity
    /// releases the retire gate from it. `false` when there is no room:
    /// [`crate::issued::MAX_LONG_IDENTITIES`] other identities hold live long certificates under
    /// `authority` on this process. The caller then gives the default lifetime instead, and the
    /// certificate is counted as any other ([`Self::issued`]): no certificate that revocation
    /// could not release outlives the default lifetime.
    /// As [`Self::reserve_long`], for a certificate of `identity` carrying on `lineage` (a
    /// renewal's; `None`: a first certificate): counted under the lineage
    /// ([`crate::issued::long_key`]), so that revoking the lineage releases it, for at most
    /// [`MAX_LONG_LINEAGES`] lineages of one identity; the others of that identity are counted
    /// under the identity alone, so that one identity renewing many lineages cannot take the room
    /// of the others.
    pub fn reserve_long_of(
        &self,
        authority: &str,
        identity: &str,
        lineage: Option<&str>,
        not_after: i64,
        now: i64,
    ) -> bool {
        // Counted and reserved under one hold of the gate: calls of one identity on several
        // lineages at once each counted the same lineages, then each added its own (one identity
        // held as many lineages as calls came together, past MAX_LONG_LINEAGES).
        let _one_at_a_time = self.long_gate.lock().unwrap_or_else(|p| p.into_inner());
        let key = match lineage {
            Some(lineage) => {
                let key = crate::issued::long_key(identity, Some(lineage));
                let inner = self.lock();
                let marked = inner.long.get(authority);
                let known = marked.is_some_and(|m| m.contains_key(&key));
                let lineages = marked.map_or(0, |m| {
                    m.iter()
                        .filter(|(k, e)| {
                            e.live > 0
                                && matches!(crate::issued::split_long_key(k), (i, Some(_)) if i == identity)
                        })
                        .count()
                });
                if known || lineages < MAX_LONG_LINEAGES {
                    key
                } else {
                    identity.to_owned()
                }
            }
            None => identity.to_owned(),
        };
        self.reserve_long_gated(authority, &key, not_after, now)
    }

    pub fn reserve_long(&self, authority: &str, identity: &str, not_after: i64, now: i64) -> bool {
        let _one_at_a_time = self.long_gate.lock().unwrap_or_else(|p| p.into_inner());
        self.reserve_long_gated(authority, identity, not_after, now)
    }

    /// [`Self::reserve_long`], the gate held by the caller.
    fn reserve_long_gated(
        &self,
        authority: &str,
        identity: &str,
        not_after: i64,
        now: i64,
    ) -> bool {
        {
            let mut inner = self.lock();
            let by_identity = inner.long.entry(authority.to_owned()).or_default();
            by_identity.retain(|_, e| {
                e.prune(now);
                e.live > 0
            });
            let room = by_identity.contains_key(identity)
                || by_identity.len() < crate::issued::MAX_LONG_IDENTITIES;
            let recorded = self
                .log
                .as_ref()
                .is_none_or(|log| log.long_room(authority, identity, now));
            if !(room && recorded) {
                return false;
            }
            if not_after > now {
                by_identity
                    .entry(identity.to_owned())
                    .or_default()
                    .add(not_after);
            }
        }
        if let Some(log) = &self.log {
            log.record_long(authority, identity, not_after, now);
        }
        true
    }

    /// Records a certificate issued under `authority`; `long_for` names its identity when it was
    /// asked to live longer than the CA's default lifetime and has room to be counted apart
    /// ([`Self::reserve_long`], which the service calls before signing), else it is counted with
    /// the others.
    pub fn issued(&self, authority: &str, long_for: Option<&str>, not_after: i64, now: i64) {
        if let Some(identity) = long_for
            && self.reserve_long(authority, identity, not_after, now)
        {
            return;
        }
        if let Some(log) = &self.log {
            log.record(authority, not_after, now);
        }
        let mut inner = self.lock();
        if !inner.issued.contains_key(authority) {
            inner
                .issued
                .insert(authority.to_owned(), Expiries::default());
        }
        let Some(expiries) = inner.issued.get_mut(authority) else {
            return;
        };
        expiries.prune(now);
        if not_after > now {
            expiries.add(not_after);
        }
    }

    /// The sidecars turned away beyond the list, per identity, whose certificates still live at
    /// `now`; `revocations` marks those of revoked identities.
    pub fn unlisted_turned_away(
        &self,
        now: i64,
        revocations: &crate::revocations::Revocations,
    ) -> Vec<super::report::UnlistedTurnedAway> {
        let mut inner = self.lock();
        inner.forget_expired_turned_away(now);
        let mut v: Vec<_> = inner
            .unlisted_by_identity
            .iter()
            .map(
                |(identity, (refusals, until))| super::report::UnlistedTurnedAway {
                    identity: identity.clone(),
                    refusals: *refusals,
                    until: *until,
                    revoked: revocations.lists_instance(identity, ""),
                },
            )
            .collect();
        drop(inner);
        v.sort_by(|a, b| a.identity.cmp(&b.identity));
        v
    }

    /// The connected sidecars and the live certificates per authority.
    /// The lock is held only to copy; sorting happens outside it.
    pub fn report(&self, now: i64) -> (Vec<SidecarReport>, HashMap<String, IssuedView>) {
        let (mut sidecars, issued) = {
            let mut inner = self.lock();
            inner.forget_expired_turned_away(now);
            let sidecars: Vec<SidecarReport> = inner
                .sidecars
                .iter()
                .map(|(k, s)| s.view(k))
                .chain(inner.turned_away.iter().map(|(k, t)| t.view(k)))
                .chain(inner.departed.iter().map(|(k, d)| d.view(k)))
                .collect();
            (sidecars, Self::issued_views(&mut inner, now))
        };
        sidecars.sort_by(|a, b| {
            a.identity
                .cmp(&b.identity)
                .then(a.instance.cmp(&b.instance))
        });
        (sidecars, issued)
    }

    /// What the metrics need every second, without copying the fleet: connected CA-mode sidecars
    /// per acknowledged version (revoked ones apart, as the gates count them), and the live
    /// certificates per authority.
    pub fn summary(&self, now: i64, revocations: &crate::revocations::Revocations) -> Summary {
        let mut inner = self.lock();
        let mut by_version = BTreeMap::new();
        let mut revoked = 0;
        let check = !revocations.entries().is_empty();
        for s in inner.sidecars.values().filter(|s| s.streams > 0) {
            if check
                && (revocations.lists_instance(&s.identity, &s.serial)
                    || revocations.lists_instance(&s.identity, &s.lineage))
            {
                revoked += 1;
            } else {
                *by_version.entry(s.acked_version).or_default() += 1;
            }
        }
        let issued = Self::issued_views(&mut inner, now);
        inner.forget_expired_turned_away(now);
        let turned_away = u64::try_from(inner.turned_away.len()).unwrap_or(u64::MAX);
        Summary {
            by_version,
            revoked,
            turned_away,
            issued,
        }
    }

    fn issued_views(inner: &mut Inner, now: i64) -> HashMap<String, IssuedView> {
        let mut views: HashMap<String, IssuedView> = inner
            .issued
            .iter_mut()
            .map(|(name, expiries)| {
                expiries.prune(now);
                (
                    name.clone(),
                    IssuedView {
                        live: usize::try_from(expiries.live).unwrap_or(usize::MAX),
                        latest_not_after: expiries.latest(),
                        long: HashMap::new(),
                    },
                )
            })
            .collect();
        for (name, by_identity) in &mut inner.long {
            let view = views.entry(name.clone()).or_default();
            for (identity, expiries) in by_identity.iter_mut() {
                expiries.prune(now);
                if expiries.live > 0 {
                    view.long.insert(
                        identity.clone(),
                        (
                            usize::try_from(expiries.live).unwrap_or(usize::MAX),
                            expiries.latest(),
                        ),
                    );
                }
            }
        }
        views
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn caller(key: &str, identity: &str, file_mode: bool) -> Caller {
        Caller {
            key: key.into(),
            identity: identity.into(),
            file_mode,
            not_after: 0,
            serial: String::new(),
            lineage: String::new(),
            authority: None,
        }
    }

    /// An acknowledgement of `version` by a certificate of `spiffe://td/a`.
    fn ack(version: u64) -> Ack {
        Ack {
            identity: "spiffe://td/a".into(),
            version,
            authority: Some("1".into()),
            not_after: 500,
            serial: "0a".into(),
            file_mode: false,
            held_version: 0,
        }
    }

    #[test]
    fn tracks_streams_acks_and_live_certificates() {
        let f = Fleet::default();
        let a = caller("aaaaaaaaaaaaaaaaaaaa", "spiffe://td/a", false);
        f.stream_opened(&a, 0).unwrap();
        f.ack(&a.key, ack(3), 3).unwrap();
        f.issued("1", None, 500, 100);
        f.issued("1", None, 150, 100);
        f.issued("1", None, 150, 100);
        f.issued("1", None, 90, 100);
        let (_, i) = f.report(120);
        assert_eq!(i["1"].live, 3, "expired at issue time is not live");
        let (s, i) = f.report(200);
        assert_eq!(s.len(), 1);
        assert!(s[0].connected);
        assert_eq!(s[0].acked_version, 3);
        assert_eq!(
            s[0].instance, "aaaaaaaaaaaaaaaa",
            "a label, not the whole key"
        );
        assert_eq!(i["1"].live, 1);
        assert_eq!(i["1"].latest_not_after, 500);
        let none = crate::revocations::Revocations::default();
        assert_eq!(f.summary(200, &none).by_version.get(&3), Some(&1));
        f.stream_closed(&a.key);
        assert!(
            f.summary(200, &none).by_version.is_empty(),
            "disconnected are not counted"
        );
        let (s, _) = f.report(200);
        assert!(s.is_empty(), "an instance without a stream is forgotten");
    }

    #[test]
    fn the_process_reports_the_highest_version_its_connected_sidecars_hold() {
        let f = Fleet::default();
        let a = caller("aaaaaaaaaaaaaaaaaaaa", "spiffe://td/a", false);
        let b = caller("bbbbbbbbbbbbbbbbbbbb", "spiffe://td/b", false);
        f.stream_opened(&a, 0).unwrap();
        f.stream_opened(&b, 0).unwrap();
        assert_eq!(f.process_now().sidecars_hold_version, 0);
        // A sidecar that took v4 from this process before a restart, acknowledging v1.
        let held = |identity: &str, version, held_version| Ack {
            identity: identity.into(),
            held_version,
            ..ack(version)
        };
        f.ack(&a.key, held("spiffe://td/a", 1, 4), 1).unwrap();
        f.ack(&b.key, held("spiffe://td/b", 1, 1), 1).unwrap();
        assert_eq!(f.process_now().sidecars_hold_version, 4);
        // Each instance's claim is in the report, so the one that numbers the next bundle can be
        // found.
        let (sidecars, _) = f.report(0);
        let held_by = |label: &str| {
            sidecars
                .iter()
                .find(|s| s.identity == label)
                .map(|s| s.held_version)
        };
        assert_eq!(held_by("spiffe://td/a"), Some(4));
        assert_eq!(held_by("spiffe://td/b"), Some(1));
        // A claim far above anything published is a lie that would push every later version up.
        let err = f
            .ack(&b.key, held("spiffe://td/b", 1, 1 + MAX_HELD_AHEAD + 1), 1)
            .unwrap_err();
        assert!(matches!(err, FleetError::HeldTooFarAhead { .. }), "{err}");
        assert_eq!(f.process_now().sidecars_hold_version, 4);
        // Only connected sidecars count.
        f.stream_closed(&a.key);
        assert_eq!(f.process_now().sidecars_hold_version, 1);
    }

    struct Case {
        name: &'static str,
        key: &'static str,
        ack: Ack,
        published: u64,
        expected: Result<(), FleetError>,
    }

    #[test]
    fn an_acknowledgement_speaks_only_for_an_open_stream_of_its_own_key() {
        let f = Fleet::default();
        let honest = Caller {
            not_after: 500,
            serial: "0b".into(),
            ..caller("honest", "spiffe://td/a", false)
        };
        f.stream_opened(&honest, 0).unwrap();
        f.stream_opened(&caller("files", "spiffe://td/b", true), 0)
            .unwrap();
        // A stream of the same key under another identity is refused: the instance stays A's.
        assert_eq!(
            f.stream_opened(&caller("honest", "spiffe://td/b", false), 0),
            Err(FleetError::IdentityChanged {
                registered: "spiffe://td/a".into(),
                claimed: "spiffe://td/b".into(),
            })
        );
        let cases = [
            Case {
                name: "a key with no stream (an invented or another process's instance)",
                key: "stranger",
                ack: ack(1),
                published: 5,
                expected: Err(FleetError::NotRegistered),
            },
            Case {
                name: "a version never published",
                key: "honest",
                ack: ack(6),
                published: 5,
                expected: Err(FleetError::FutureVersion {
                    claimed: 6,
                    published: 5,
                }),
            },
            Case {
                name: "a CA-mode instance claiming file mode",
                key: "honest",
                ack: Ack {
                    file_mode: true,
                    ..ack(5)
                },
                published: 5,
                expected: Err(FleetError::ModeChanged {
                    registered: "ca",
                    claimed: "file",
                }),
            },
            Case {
                name: "an older certificate of the same key than the stream's",
                key: "honest",
                ack: Ack {
                    not_after: 499,
                    serial: "09".into(),
                    ..ack(5)
                },
                published: 5,
                expected: Err(FleetError::OlderCertificate {
                    recorded: "0b".into(),
                    recorded_not_after: 500,
                }),
            },
            Case {
                name: "a certificate of another identity on the same key",
                key: "honest",
                ack: Ack {
                    identity: "spiffe://td/b".into(),
                    ..ack(5)
                },
                published: 5,
                expected: Err(FleetError::IdentityChanged {
                    registered: "spiffe://td/a".into(),
                    claimed: "spiffe://td/b".into(),
                }),
            },
            Case {
                name: "the honest acknowledgement",
                key: "honest",
                ack: ack(5),
                published: 5,
                expected: Ok(()),
            },
            Case {
                name: "a file-mode report",
                key: "files",
                ack: Ack {
                    file_mode: true,
                    identity: "spiffe://td/b".into(),
                    ..ack(4)
                },
                published: 5,
                expected: Ok(()),
            },
        ];
        for case in cases {
            assert_eq!(
                f.ack(case.key, case.ack, case.published),
                case.expected,
                "{}",
                case.name
            );
        }
        let (s, _) = f.report(3);
        let by = |id: &str| s.iter().find(|v| v.identity == id).unwrap().clone();
        assert_eq!(by("spiffe://td/a").acked_version, 5);
        assert_eq!(
            by("spiffe://td/b").acked_version,
            0,
            "file mode never counts as having a version"
        );
        assert!(by("spiffe://td/b").file_mode);
        // A stream with the other mode is refused for an existing key.
        assert!(matches!(
            f.stream_opened(&caller("honest", "spiffe://td/a", true), 0),
            Err(FleetError::ModeChanged { .. })
        ));
    }

    #[test]
    fn a_stream_records_its_certificates_expiry_before_any_acknowledgement() {
        let f = Fleet::new(CaProcess::default());
        f.stream_opened(
            &Caller {
                not_after: 1_000,
                ..caller("quiet", "spiffe://td/a", false)
            },
            0,
        )
        .unwrap();
        let (sidecars, _) = f.report(0);
        assert_eq!(sidecars.len(), 1);
        assert_eq!(sidecars[0].acked_version, 0);
        assert_eq!(sidecars[0].serving_not_after, 1_000);
    }

    /// A process started while certificates an earlier one issued may be live (the directory's
    /// marks say so) holds `activate` for the reconnect window, or until they expire; one started
    /// before anything was issued holds nothing; one that cannot tell holds the whole window.
    #[test]
    fn a_start_measures_how_long_the_sidecars_of_an_earlier_process_may_take_to_come_back() {
        let dir = tempfile::tempdir().unwrap();
        let td = meshid_identity::TrustDomain::new("td").unwrap();
        crate::authority::init(dir.path(), &td, None).unwrap();
        let now = 10_000;
        let started = || {
            Fleet::new(CaProcess {
                started_unix: now,
                max_ttl_seconds: 86_400,
                ..Default::default()
            })
            .recording_to(dir.path())
            .process_now()
            .reconnect_until
        };
        assert_eq!(started(), 0, "a new CA: nothing issued before it");
        let issued = dir.path().join(crate::issued::ISSUED_DIR);
        std::fs::create_dir_all(&issued).unwrap();
        std::fs::write(
            issued.join("earlier.json"),
            format!(r#"{{"1":{}}}"#, now + 30),
        )
        .unwrap();
        assert_eq!(started(), now + 30, "until the earlier certificates expire");
        std::fs::write(
            issued.join("earlier.long.json"),
            format!(r#"{{"1":{{"spiffe://td/batch":{}}}}}"#, now + 9_000),
        )
        .unwrap();
        assert_eq!(started(), now + gates_window(), "the whole window");
        std::fs::write(issued.join("earlier.long.json"), "garbage").unwrap();
        assert_eq!(started(), now + gates_window(), "a mark it cannot read");
        std::fs::remove_file(issued.join("earlier.long.json")).unwrap();
        std::fs::write(issued.join("earlier.json"), format!(r#"{{"1":{now}}}"#)).unwrap();
        assert_eq!(started(), 0, "expired by the start");
        // A directory where no mark can be written (a read-only mount; here `issued/` leads
        // nowhere, which holds even for root) has no marks, and that says nothing.
        std::fs::remove_dir_all(&issued).unwrap();
        std::os::unix::fs::symlink(dir.path().join("nowhere"), &issued).unwrap();
        assert!(crate::issued::unreadable_marks(dir.path()).is_empty());
        assert_eq!(
            started(),
            now + gates_window(),
            "a directory that cannot be written"
        );
    }

    fn gates_window() -> i64 {
        super::super::gates::RECONNECT_WINDOW_SECONDS
    }

    #[test]
    fn revoked_identities_and_serials_are_marked() {
        let f = Fleet::new(CaProcess::default());
        for (key, sa, serial) in [("k1", "a", "01"), ("k2", "b", "02"), ("k3", "b", "03")] {
            f.stream_opened(
                &Caller {
                    not_after: 100,
                    serial: serial.into(),
                    ..caller(key, &format!("spiffe://td/ns/x/sa/{sa}"), false)
                },
                0,
            )
            .unwrap();
        }
        // The same key on a later certificate: the instance is known by that one.
        f.stream_opened(
            &Caller {
                not_after: 200,
                serial: "04".into(),
                ..caller("k3", "spiffe://td/ns/x/sa/b", false)
            },
            0,
        )
        .unwrap();
        let mut list = crate::revocations::Revocations::default();
        let id = meshid_identity::SpiffeId::parse("spiffe://td/ns/x/sa/a").unwrap();
        use meshid_identity::revocation::Revoked;
        list.revoke(Revoked::Id(id), 0, 100, String::new()).unwrap();
        list.revoke(Revoked::Serial("02".into()), 0, 100, String::new())
            .unwrap();
        list.revoke(Revoked::Serial("03".into()), 0, 100, String::new())
            .unwrap();
        let (mut s, _) = f.report(0);
        mark_revoked(&mut s, &list);
        let marked: Vec<(&str, bool)> = s.iter().map(|s| (s.serial.as_str(), s.revoked)).collect();
        assert_eq!(marked, [("01", true), ("02", true), ("04", false)]);
        // The metrics count them apart: only k3 (serving on 04) is in the per-version gauge.
        let summary = f.summary(0, &list);
        assert_eq!(summary.revoked, 2);
        assert_eq!(summary.by_version.values().sum::<usize>(), 1);
    }

    /// A workload that renews under the new authority keeping its key, opens a stream with the new
    /// certificate and never acknowledges it serves that certificate, under that authority and in
    /// its lineage: before, the authority its last acknowledgement named stayed, and `retire` saw
    /// it serve the old authority for as long as it kept renewing.
    #[test]
    fn a_later_certificate_on_the_same_key_is_served_under_its_own_authority_and_lineage() {
        let f = Fleet::default();
        let id = "spiffe://td/ns/x/sa/a";
        let first = Caller {
            not_after: 500,
            serial: "0a".into(),
            lineage: "0a".into(),
            authority: Some("1".into()),
            ..caller("k", id, false)
        };
        f.stream_opened(&first, 0).unwrap();
        f.ack(
            "k",
            Ack {
                identity: id.into(),
                ..ack(1)
            },
            1,
        )
        .unwrap();
        let (s, _) = f.report(0);
        assert_eq!(s[0].serving_authority.as_deref(), Some("1"));
        // Renewed under authority 2 on the same key, after re-attesting (a new lineage).
        let renewed = Caller {
            not_after: 900,
            serial: "0b".into(),
            lineage: "0b".into(),
            authority: Some("2".into()),
            ..caller("k", id, false)
        };
        f.stream_opened(&renewed, 0).unwrap();
        let (s, _) = f.report(0);
        assert_eq!(s.len(), 1);
        assert_eq!(s[0].serving_authority.as_deref(), Some("2"));
        assert_eq!((s[0].serial.as_str(), s[0].serving_not_after), ("0b", 900));
        let lineages = &f.lock().lineages;
        assert_eq!(lineages.get("0b"), Some(&1));
        assert_eq!(lineages.get("0a"), None, "{lineages:?}");
    }

    #[test]
    fn instances_renewed_from_a_revoked_serial_are_marked_and_gone_ones_remembered() {
        use meshid_identity::revocation::Revoked;
        let f = Fleet::new(CaProcess::default());
        let far = i64::MAX;
        // k1 serves on 05, renewed from 01 (its lineage); k2 on a lineage of its own.
        for (key, serial, lineage) in [("k1", "05", "01"), ("k2", "06", "06")] {
            let c = Caller {
                not_after: far,
                serial: serial.into(),
                lineage: lineage.into(),
                ..caller(key, "spiffe://td/ns/x/sa/a", false)
            };
            f.stream_opened(&c, 0).unwrap();
        }
        let mut list = crate::revocations::Revocations::default();
        list.revoke(Revoked::Serial("01".into()), 0, 100, String::new())
            .unwrap();
        let (mut s, _) = f.report(0);
        mark_revoked(&mut s, &list);
        let marked: Vec<(&str, bool)> = s.iter().map(|s| (s.serial.as_str(), s.revoked)).collect();
        assert_eq!(marked, [("05", true), ("06", false)]);
        assert_eq!(f.summary(0, &list).revoked, 1);

        // k2's stream closes: remembered as gone; its lineage renewed and reconnected (k3):
        // forgotten.
        f.stream_closed("k2");
        let (s, _) = f.report(0);
        let gone: Vec<_> = s.iter().filter(|s| !s.connected).collect();
        assert_eq!(gone.len(), 1, "{s:?}");
        assert!(gone[0].last_seen > 0 && gone[0].lineage == "06", "{s:?}");
        let renewed = Caller {
            not_after: far,
            serial: "07".into(),
            lineage: "06".into(),
            ..caller("k3", "spiffe://td/ns/x/sa/a", false)
        };
        f.stream_opened(&renewed, 0).unwrap();
        let (s, _) = f.report(0);
        assert!(s.iter().all(|s| s.connected), "{s:?}");
        // A renewed sidecar whose new stream opened first: its old instance is not remembered.
        let next = Caller {
            not_after: far,
            serial: "08".into(),
            lineage: "06".into(),
            ..caller("k4", "spiffe://td/ns/x/sa/a", false)
        };
        f.stream_opened(&next, 0).unwrap();
        f.stream_closed("k3");
        let (s, _) = f.report(0);
        assert!(s.iter().all(|s| s.connected), "{s:?}");
    }

    #[test]
    fn bounded_overall_and_per_identity() {
        let f = Fleet::with_limits(
            CaProcess::default(),
            FleetLimits {
                max_instances: 3,
                max_per_identity: 2,
                max_streams_per_instance: 2,
            },
        );
        f.stream_opened(&caller("k1", "spiffe://td/a", false), 0)
            .unwrap();
        f.stream_opened(&caller("k2", "spiffe://td/a", false), 0)
            .unwrap();
        assert!(matches!(
            f.stream_opened(&caller("k3", "spiffe://td/a", false), 0),
            Err(FleetError::TooManyForIdentity { .. })
        ));
        // A second stream of a registered key is not a new instance; a third is one too many.
        f.stream_opened(&caller("k1", "spiffe://td/a", false), 0)
            .unwrap();
        assert_eq!(
            f.stream_opened(&caller("k1", "spiffe://td/a", false), 0),
            Err(FleetError::TooManyStreams { max: 2 })
        );
        f.stream_closed("k1");
        f.stream_opened(&caller("k1", "spiffe://td/a", false), 0)
            .unwrap();
        f.stream_opened(&caller("k4", "spiffe://td/b", false), 0)
            .unwrap();
        assert!(matches!(
            f.stream_opened(&caller("k5", "spiffe://td/c", false), 0),
            Err(FleetError::Full(3))
        ));
        // Disconnected instances make room.
        f.stream_closed("k4");
        f.stream_opened(&caller("k5", "spiffe://td/c", false), 0)
            .unwrap();
        f.stream_closed("k2");
        f.stream_opened(&caller("k3", "spiffe://td/a", false), 0)
            .unwrap();
    }

    /// One identity opening and closing more streams (fresh keys) than the list of departed
    /// instances holds takes at most its namespace's share of it: another namespace's sidecar's
    /// departure (a renewal) is still listed by name, nothing is counted in the process-wide count
    /// that holds `activate` revoked or not, and the liar's departures beyond its share are counted
    /// per identity, which revoking it releases. Before, it filled the list and every later
    /// departure, anyone's, went into the process-wide count.
    #[test]
    fn one_identity_cannot_fill_the_list_of_departed_instances() {
        let f = Fleet::with_limits(
            CaProcess::default(),
            FleetLimits {
                max_instances: 2 * MAX_DEPARTED,
                max_per_identity: 2 * MAX_DEPARTED,
                max_streams_per_instance: 1,
            },
        );
        let now = time::OffsetDateTime::now_utc().unix_timestamp();
        let live = |key: &str, identity: &str| Caller {
            not_after: now + 3_600,
            serial: format!("{key}0"),
            ..caller(key, identity, false)
        };
        const EVIL: &str = "spiffe://td/ns/x/sa/evil";
        for i in 0..MAX_DEPARTED + 10 {
            let key = format!("e{i}");
            f.stream_opened(&live(&key, EVIL), now).unwrap();
            f.stream_closed(&key);
        }
        f.stream_opened(&live("honest", "spiffe://td/ns/y/sa/web"), now)
            .unwrap();
        f.stream_closed("honest");
        // Another service account of the liar's namespace has no more room than it.
        f.stream_opened(&live("sibling", "spiffe://td/ns/x/sa/evil2"), now)
            .unwrap();
        f.stream_closed("sibling");
        let (listed, _) = f.report(now);
        assert!(listed.iter().any(|s| s.instance == "honest"));
        assert!(!listed.iter().any(|s| s.instance == "sibling"));
        let evil_listed = listed.iter().filter(|s| s.identity == EVIL).count();
        assert_eq!(evil_listed, MAX_DEPARTED_PER_NAMESPACE);
        assert_eq!(f.process_now().turned_away_unlisted, 0);
        let mut list = crate::revocations::Revocations::default();
        let unlisted = f.unlisted_turned_away(now, &list);
        let identities: Vec<&str> = unlisted.iter().map(|u| u.identity.as_str()).collect();
        assert_eq!(
            identities,
            [EVIL, "spiffe://td/ns/x/sa/evil2"],
            "{unlisted:?}"
        );
        assert_eq!(
            unlisted[0].refusals,
            u64::try_from(MAX_DEPARTED + 10 - MAX_DEPARTED_PER_NAMESPACE).unwrap()
        );
        assert!(!unlisted[0].revoked);
        let id = meshid_identity::SpiffeId::parse(EVIL).unwrap();
        use meshid_identity::revocation::Revoked;
        list.revoke(Revoked::Id(id), now, 3_600, String::new())
            .unwrap();
        assert!(f.unlisted_turned_away(now, &list)[0].revoked);
    }

    /// A workload renewing from one certificate to fresh keys, each turned away for lack of room:
    /// every entry is listed with its lineage, so revoking the lineage's first serial (what the
    /// gate's refusal names to release one pod) marks them all, and an instance of the lineage
    /// that registers stands for them. (Before, they were listed without it: only their own
    /// serials or the whole identity released `activate` from them.)
    #[test]
    fn sidecars_turned_away_go_with_their_lineage() {
        use meshid_identity::revocation::Revoked;
        let f = Fleet::with_limits(
            CaProcess::default(),
            FleetLimits {
                max_instances: 100,
                max_per_identity: 1,
                max_streams_per_instance: 1,
            },
        );
        let of = |key: &str, serial: &str, lineage: &str| Caller {
            not_after: 1_000,
            serial: serial.into(),
            lineage: lineage.into(),
            ..caller(key, "spiffe://td/a", false)
        };
        f.stream_opened(&of("k1", "01", "01"), 100).unwrap();
        for (key, serial) in [("l1", "0a"), ("l2", "0b"), ("l3", "0c")] {
            assert!(f.stream_opened(&of(key, serial, "09"), 100).is_err());
        }
        let mut list = crate::revocations::Revocations::default();
        list.revoke(Revoked::Serial("09".into()), 0, 100, String::new())
            .unwrap();
        let (mut s, _) = f.report(100);
        mark_revoked(&mut s, &list);
        let turned: Vec<_> = s.iter().filter(|s| !s.turned_away.is_empty()).collect();
        assert_eq!(turned.len(), 3, "{s:?}");
        assert!(
            turned.iter().all(|s| s.lineage == "09" && s.revoked),
            "{turned:?}"
        );
        assert!(s.iter().any(|s| s.connected && !s.revoked), "{s:?}");
        // Room made; an instance of the lineage registers: none of them is listed any more.
        f.stream_closed("k1");
        f.stream_opened(&of("l4", "0d", "09"), 100).unwrap();
        let (s, _) = f.report(100);
        assert!(s.iter().all(|s| s.turned_away.is_empty()), "{s:?}");
    }

    #[test]
    fn a_sidecar_turned_away_for_lack_of_room_is_listed_until_it_registers_or_expires() {
        let f = Fleet::with_limits(
            CaProcess::default(),
            FleetLimits {
                max_instances: 2,
                max_per_identity: 1,
                max_streams_per_instance: 1,
            },
        );
        let live = |key: &str, identity: &str| Caller {
            not_after: 1_000,
            serial: format!("{key}0"),
            ..caller(key, identity, false)
        };
        let turned_away = |now: i64| -> Vec<(String, String)> {
            let mut v: Vec<_> = f
                .report(now)
                .0
                .into_iter()
                .filter(|s| !s.turned_away.is_empty())
                .map(|s| {
                    assert!(!s.connected && s.acked_version == 0, "{s:?}");
                    (s.instance, s.turned_away)
                })
                .collect();
            v.sort();
            v
        };
        f.stream_opened(&live("k1", "spiffe://td/a"), 100).unwrap();
        // The identity's room is taken (by a liar, say): an honest replica is turned away, and
        // listed with why.
        assert!(f.stream_opened(&live("k2", "spiffe://td/a"), 100).is_err());
        f.stream_opened(&live("k3", "spiffe://td/b"), 100).unwrap();
        // The process is full.
        assert!(f.stream_opened(&live("k4", "spiffe://td/c"), 100).is_err());
        let listed = turned_away(100);
        assert_eq!(listed.len(), 2, "{listed:?}");
        assert_eq!(listed[0].0, "k2");
        assert!(
            listed[0]
                .1
                .contains("spiffe://td/a has 1 connected instances"),
            "{listed:?}"
        );
        assert_eq!(listed[1].0, "k4");
        assert!(
            listed[1].1.contains("tracks 2 sidecar instances"),
            "{listed:?}"
        );
        // A registered instance whose second stream finds no room is measured already; an
        // expired certificate is no sidecar to wait for.
        f.turned_away(&live("k1", "spiffe://td/a"), "no room", 100);
        f.turned_away(
            &Caller {
                not_after: 100,
                ..live("k5", "spiffe://td/d")
            },
            "no room",
            100,
        );
        assert_eq!(turned_away(100).len(), 2);
        // Once it registers, it is an instance like any other.
        f.stream_closed("k1");
        f.stream_opened(&live("k2", "spiffe://td/a"), 100).unwrap();
        assert_eq!(turned_away(100).len(), 1);
        // Its certificate expired: forgotten.
        assert!(turned_away(1_000).is_empty());
        assert_eq!(f.process_now().turned_away_unlisted, 0);

        // Beyond the list: counted, with the latest expiry of their certificates.
        for i in 0..MAX_TURNED_AWAY + 5 {
            let c = Caller {
                not_after: 2_000 + i64::try_from(i).unwrap(),
                ..live(&format!("x{i}"), "spiffe://td/x")
            };
            f.turned_away(&c, "no room", 1_500);
        }
        assert_eq!(turned_away(1_500).len(), MAX_TURNED_AWAY);
        let none = crate::revocations::Revocations::default();
        assert_eq!(
            f.summary(1_500, &none).turned_away,
            u64::try_from(MAX_TURNED_AWAY).unwrap()
        );
        // Counted per identity, so that revoking it releases them.
        assert_eq!(f.process_now().turned_away_unlisted, 0);
        let unlisted = f.unlisted_turned_away(1_500, &none);
        assert_eq!(unlisted.len(), 1, "{unlisted:?}");
        assert_eq!(unlisted[0].identity, "spiffe://td/x");
        assert_eq!(unlisted[0].refusals, 5);
        assert_eq!(
            unlisted[0].until,
            2_000 + i64::try_from(MAX_TURNED_AWAY + 4).unwrap()
        );
        assert!(!unlisted[0].revoked);
        // Beyond the identities counted apart: counted together, whoever they are.
        for i in 0..MAX_UNLISTED_IDENTITIES + 2 {
            let c = Caller {
                not_after: 3_000,
                ..live(&format!("y{i}"), &format!("spiffe://td/y{i}"))
            };
            f.turned_away(&c, "no room", 1_500);
        }
        assert_eq!(
            f.unlisted_turned_away(1_500, &none).len(),
            MAX_UNLISTED_IDENTITIES
        );
        let p = f.process_now();
        assert_eq!(
            (p.turned_away_unlisted, p.turned_away_unlisted_until),
            (3, 3_000)
        );
    }

    #[test]
    fn long_certificates_are_counted_per_identity() {
        let f = Fleet::default();
        f.issued("1", None, 500, 100);
        f.issued("1", Some("spiffe://td/liar"), 9_000, 100);
        f.issued("1", Some("spiffe://td/liar"), 8_000, 100);
        f.issued("1", Some("spiffe://td/batch"), 4_000, 100);
        let (_, issued) = f.report(100);
        let view = &issued["1"];
        assert_eq!((view.live, view.latest_not_after), (1, 500));
        assert_eq!(view.long["spiffe://td/liar"], (2, 9_000));
        assert_eq!(view.long["spiffe://td/batch"], (1, 4_000));
        // Expired ones drop out.
        let (_, issued) = f.report(5_000);
        assert_eq!(issued["1"].live, 0);
        assert_eq!(issued["1"].long.len(), 1);
        // Past the identities counted apart, the rest are counted together.
        for i in 0..crate::issued::MAX_LONG_IDENTITIES {
            f.issued("2", Some(&format!("spiffe://td/w{i}")), 9_000, 100);
        }
        // No room to count another identity apart: the service gives it the default lifetime.
        assert!(!f.reserve_long("2", "spiffe://td/one-too-many", 7_000, 100));
        assert!(
            f.reserve_long("2", "spiffe://td/w0", 9_500, 100),
            "one counted already"
        );
        f.issued("2", Some("spiffe://td/one-too-many"), 7_000, 100);
        let (_, issued) = f.report(100);
        assert_eq!(issued["2"].long.len(), crate::issued::MAX_LONG_IDENTITIES);
        assert_eq!((issued["2"].live, issued["2"].latest_not_after), (1, 7_000));
    }

    #[test]
    fn namespaces_of_identities() {
        assert_eq!(
            namespace_of("spiffe://td/ns/shop/sa/web"),
            "spiffe://td/ns/shop"
        );
        assert_eq!(namespace_of("spiffe://td/ns/shop"), "spiffe://td/ns/shop");
        assert_eq!(
            namespace_of("spiffe://td/vm/build-1"),
            "spiffe://td/vm/build-1"
        );
        assert_eq!(namespace_of("spiffe://td"), "spiffe://td");
        assert_ne!(
            namespace_of("spiffe://td/ns/shop/sa/web"),
            namespace_of("spiffe://td/ns/shopping/sa/web")
        );
    }

    /// Renewals of one identity on many lineages at once (a workload holding several of its
    /// certificates sends them together) are counted as if they came one by one: at most
    /// `MAX_LONG_LINEAGES` lineages apart, the rest under the identity.
    #[test]
    fn long_certificates_of_lineages_renewed_at_once_are_counted_as_one_by_one() {
        const CALLS: usize = 16;
        for round in 0..300 {
            let f = Fleet::default();
            let id = format!("spiffe://td/ns/shop/sa/liar-{round}");
            let start = std::sync::Barrier::new(CALLS);
            std::thread::scope(|s| {
                for lineage in 0..CALLS {
                    let (f, id, start) = (&f, &id, &start);
                    s.spawn(move || {
                        start.wait();
                        assert!(f.reserve_long_of(
                            "1",
                            id,
                            Some(&format!("{lineage:02x}")),
                            9_000,
                            100
                        ));
                    });
                }
            });
            let (_, issued) = f.report(100);
            let long = &issued["1"].long;
            assert_eq!(long.len(), MAX_LONG_LINEAGES + 1, "round {round}: {long:?}");
            assert_eq!(long[id.as_str()].0, CALLS - MAX_LONG_LINEAGES, "{long:?}");
        }
    }

    /// A renewal's long certificate is counted under its identity and lineage, for at most
    /// `MAX_LONG_LINEAGES` lineages of one identity: the next ones of that identity go under the
    /// identity alone, and the room of the others is not theirs to take.
    #[test]
    fn long_certificates_of_renewals_are_counted_per_lineage_a_few_per_identity() {
        let f = Fleet::default();
        let id = "spiffe://td/ns/shop/sa/liar";
        for lineage in 0..10 {
            assert!(f.reserve_long_of("1", id, Some(&format!("{lineage:02x}")), 9_000, 100));
        }
        assert!(f.reserve_long_of("1", id, None, 9_000, 100));
        // Again on one of the lineages counted apart: under it still.
        assert!(f.reserve_long_of("1", id, Some("00"), 9_500, 100));
        let (_, issued) = f.report(100);
        let long = &issued["1"].long;
        assert_eq!(long.len(), MAX_LONG_LINEAGES + 1, "{long:?}");
        assert_eq!(long[&crate::issued::long_key(id, Some("00"))], (2, 9_500));
        assert_eq!(long[id], (10 - MAX_LONG_LINEAGES + 1, 9_000));
        // Others still have room.
        assert!(f.reserve_long_of("1", "spiffe://td/ns/shop/sa/web", Some("aa"), 9_000, 100));
    }

    #[test]
    fn a_large_fleet_reports_cheaply() {
        let f = Fleet::default();
        for i in 0..50_000 {
            let c = caller(
                &format!("{i:064x}"),
                &format!("spiffe://td/s{}", i % 997),
                false,
            );
            f.stream_opened(&c, 0).unwrap();
            let a = Ack {
                identity: c.identity.clone(),
                ..ack(1)
            };
            f.ack(&c.key, a, 1).unwrap();
        }
        let summary = f.summary(2, &crate::revocations::Revocations::default());
        assert_eq!(summary.by_version.get(&1), Some(&50_000));
        let (s, _) = f.report(2);
        assert_eq!(s.len(), 50_000);
        assert!(s.windows(2).all(|w| w[0].identity <= w[1].identity));
    }
}
