//! The revocation list of a CA directory, `revocations.json`: written by `meshid-ca revoke` and
//! `meshid-ca unrevoke`, followed by every CA process on the directory as the rotation state is,
//! and streamed with the trust bundle to every sidecar.
//!
//! An entry names one certificate (its serial) or one identity (every certificate of it). Each
//! carries when it was revoked and when it stops mattering to sidecars: the revocation time plus
//! the longest certificate lifetime (`--max-ttl` of the command, which must be at least the
//! CA's), after which no certificate it names can still be live; sidecars ignore it from then on.
//! The CA refuses to renew a revoked serial and to issue anything (token, join token, renewal,
//! JWT-SVID) for a revoked identity, whatever its expiry, until `meshid-ca unrevoke`; a
//! certificate either names opens no bundle stream and has no acknowledgement taken. Expired
//! serial entries are dropped from the file by the next command that writes it.
//!
//! The bundle carries the list as the file holds it, so every CA on the directory serves the same
//! bundle under the same version: each command that writes the list also moves the directory's
//! bundle version on (`authorities.json`).
//!
//! `unrevoke` records what it lifted, and when, for a day (`lifted`): a running CA takes a list
//! that no longer holds an entry it enforces only with such a record
//! ([`Revocations::dropped_from`]), so an older copy of the directory applied over a newer one
//! lifts nothing.

use std::path::Path;

use meshid_identity::SpiffeId;
use meshid_identity::revocation::{MAX_REVOCATIONS, Revoked, normalize_serial};
use serde::{Deserialize, Serialize};

use crate::ca_dir::{AuthorityError, invalid, io_err, write_atomic};

/// The file in the CA directory.
pub const REVOCATIONS_FILE: &str = "revocations.json";
/// How long past the longest lifetime an entry stays in force: clocks, and a certificate issued
/// by a CA that learns of the revocation later than another (each CA reads the directory when it
/// changes; a Kubernetes Secret volume reaches each pod within the kubelet's sync period, about a
/// minute, and up to its cache's time to live on top).
pub const EXPIRY_SLACK_SECS: i64 = 600;
/// How long a serial entry stays in the file past its expiry: a CA that learned of it late (a
/// list applied to the cluster after it was written) serves it from when it learned
/// ([`Revocations::served_by_ca`]), and only while the file holds it.
pub const PRUNE_AFTER_SECS: i64 = 86_400;
/// The longest `--reason`, in bytes.
pub const MAX_REASON: usize = 256;
const FORMAT_VERSION: u32 = 1;
/// The largest `revocations.json` read: [`MAX_REVOCATIONS`] entries of the longest identity
/// (2,048 bytes) and reason fit in about 24 MiB of JSON. A larger file is refused unread (the list
/// in force stays), not read whole into memory every second while refused.
pub const MAX_FILE_BYTES: u64 = 32 << 20;

/// The bytes of `path`, a regular file (a FIFO or a device in its place is refused at once, not
/// waited on), `None` when it holds more than `max`.
fn read_at_most(path: &Path, max: u64) -> std::io::Result<Option<Vec<u8>>> {
    match crate::ca_dir::read_file(path, max) {
        Ok(bytes) => Ok(Some(bytes)),
        // The one `InvalidData` of a read of raw bytes: past the bound.
        Err(e) if e.kind() == std::io::ErrorKind::InvalidData => Ok(None),
        Err(e) => Err(e),
    }
}

/// One entry as the file holds it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct FileEntry {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    id: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    serial: Option<String>,
    revoked_at: i64,
    expires_at: i64,
    #[serde(default, skip_serializing_if = "String::is_empty")]
    reason: String,
}

/// What the file's `id` and `serial` fields say of `what` (exactly one of them set).
fn file_names(what: &Revoked) -> (Option<String>, Option<String>) {
    match what {
        Revoked::Id(id) => (Some(id.to_string()), None),
        Revoked::Serial(s) => (None, Some(s.clone())),
    }
}

/// One lifted revocation as the file holds it (`meshid-ca unrevoke`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct FileLifted {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    id: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    serial: Option<String>,
    lifted_at: i64,
}

#[derive(Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct FileContents {
    version: u32,
    entries: Vec<FileEntry>,
    /// Revocations `unrevoke` lifted in the last day ([`PRUNE_AFTER_SECS`]): what tells a lifted
    /// entry from one an older copy of the directory never had. Absent when none (a file an older
    /// CA reads).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    lifted: Vec<FileLifted>,
}

/// One revocation, checked.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Entry {
    pub what: Revoked,
    /// Unix seconds.
    pub revoked_at: i64,
    /// Unix seconds: no certificate it names is live after this.
    pub expires_at: i64,
    pub reason: String,
}

impl Entry {
    /// Still in the bundle at `now`.
    pub fn in_force(&self, now: i64) -> bool {
        now < self.expires_at
    }

    /// As the trust bundle carries it.
    pub fn to_proto(&self) -> meshid_proto::ca::v1::Revocation {
        let (spiffe_id, serial) = match &self.what {
            Revoked::Id(id) => (id.to_string(), String::new()),
            Revoked::Serial(s) => (String::new(), s.clone()),
        };
        meshid_proto::ca::v1::Revocation {
            spiffe_id,
            serial,
            revoked_at_unix: self.revoked_at,
            expires_at_unix: self.expires_at,
            reason: self.reason.clone(),
        }
    }
}

/// A revocation `meshid-ca unrevoke` lifted, and when.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Lifted {
    pub what: Revoked,
    /// Unix seconds.
    pub lifted_at: i64,
}

/// The checked list of a CA directory.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Revocations {
    entries: Vec<Entry>,
    /// What `unrevoke` lifted lately ([`PRUNE_AFTER_SECS`]), for [`Revocations::dropped_from`].
    lifted: Vec<Lifted>,
}

/// Why [`Revocations::update`] changed nothing.
#[derive(Debug, thiserror::Error)]
pub enum UpdateError {
    #[error(transparent)]
    File(AuthorityError),
    #[error("{0}")]
    Refused(String),
}

/// Why a `--reason` was refused.
pub fn check_reason(reason: &str) -> Result<(), String> {
    if reason.len() > MAX_REASON {
        return Err(format!(
            "--reason is {} bytes; at most {MAX_REASON}",
            reason.len()
        ));
    }
    if reason.chars().any(char::is_control) {
        return Err("--reason may not contain control characters".into());
    }
    Ok(())
}

impl Revocations {
    /// The list in `dir`; none when the file is missing and the directory never had one. A file
    /// that is not a valid list is an error (the caller keeps what it had): an entry naming
    /// neither or both of an identity and a serial, an unreadable identity or serial, a bad
    /// reason, or more than [`MAX_REVOCATIONS`]. So is a missing file when `authorities.json`
    /// records that the list was written (`revocations_written_at`): read as empty, it would lift
    /// every revocation.
    pub fn load(dir: &Path) -> Result<Self, AuthorityError> {
        let path = dir.join(REVOCATIONS_FILE);
        let bytes = match read_at_most(&path, MAX_FILE_BYTES) {
            Ok(Some(b)) => b,
            Ok(None) => {
                return Err(invalid(
                    &path,
                    format!(
                        "larger than {} MiB: not a list this CA reads (at most \
                         {MAX_REVOCATIONS} entries)",
                        MAX_FILE_BYTES >> 20
                    ),
                ));
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                let state = crate::authorities::RotationState::load(dir)?;
                return match state.revocations_written_at {
                    None => Ok(Self::default()),
                    Some(version) => Err(invalid(
                        &path,
                        format!(
                            "missing, but {} records that the revocation list was written (at \
                             bundle version {version}): read as empty it would lift every \
                             revocation. Put revocations.json back (from the copy of the CA \
                             directory); to start an empty list on purpose, write \
                             {{\"version\": 1, \"entries\": []}} to it",
                            crate::authorities::STATE_FILE
                        ),
                    )),
                };
            }
            Err(e) => return Err(io_err(&path)(e)),
        };
        Self::parse(&path, &bytes)
    }

    /// Reads a list from the bytes of `path` (named in errors), as [`Self::load`] does.
    pub fn parse(path: &Path, bytes: &[u8]) -> Result<Self, AuthorityError> {
        let path = path.to_owned();
        let file: FileContents =
            serde_json::from_slice(bytes).map_err(|e| invalid(&path, e.to_string()))?;
        if file.version != FORMAT_VERSION {
            return Err(invalid(
                &path,
                format!(
                    "format version {} (this CA reads {FORMAT_VERSION})",
                    file.version
                ),
            ));
        }
        if file.entries.len() > MAX_REVOCATIONS {
            return Err(invalid(
                &path,
                format!("{} entries; at most {MAX_REVOCATIONS}", file.entries.len()),
            ));
        }
        if file.lifted.len() > MAX_REVOCATIONS {
            return Err(invalid(
                &path,
                format!(
                    "{} lifted entries; at most {MAX_REVOCATIONS}",
                    file.lifted.len()
                ),
            ));
        }
        let revoked = |id: Option<String>, serial: Option<String>| -> Result<Revoked, String> {
            match (id, serial) {
                (Some(id), None) => Ok(Revoked::Id(
                    SpiffeId::parse(&id).map_err(|err| err.to_string())?,
                )),
                (None, Some(serial)) => Ok(Revoked::Serial(
                    normalize_serial(&serial).map_err(|err| err.to_string())?,
                )),
                _ => Err("names neither or both of `id` and `serial`".into()),
            }
        };
        let mut lifted = Vec::with_capacity(file.lifted.len());
        for (i, l) in file.lifted.into_iter().enumerate() {
            let what = revoked(l.id, l.serial)
                .map_err(|why| invalid(&path, format!("lifted entry {}: {why}", i + 1)))?;
            lifted.push(Lifted {
                what,
                lifted_at: l.lifted_at,
            });
        }
        let mut entries = Vec::with_capacity(file.entries.len());
        for (i, e) in file.entries.into_iter().enumerate() {
            let bad = |why: String| invalid(&path, format!("entry {}: {why}", i + 1));
            let what = revoked(e.id, e.serial).map_err(bad)?;
            check_reason(&e.reason).map_err(bad)?;
            if e.expires_at < e.revoked_at {
                return Err(bad("expires before it was revoked".into()));
            }
            entries.push(Entry {
                what,
                revoked_at: e.revoked_at,
                expires_at: e.expires_at,
                reason: e.reason,
            });
        }
        Ok(Self { entries, lifted })
    }

    /// Reads the list in `dir`, lets `change` edit it, and writes it back with the bundle
    /// version moved on, all under the directory's lock ([`crate::ca_dir::DirLock`], which the
    /// rotation commands hold too), so two operators revoking at once both count and no rotation
    /// writes `authorities.json` in between; `change`'s error leaves the file as it was. A list
    /// that cannot be read is never written over.
    pub fn update<T>(
        dir: &Path,
        change: impl FnOnce(&mut Self) -> Result<T, String>,
    ) -> Result<T, UpdateError> {
        let _lock = crate::ca_dir::DirLock::acquire(dir).map_err(UpdateError::File)?;
        let mut list = Self::load(dir).map_err(UpdateError::File)?;
        let out = change(&mut list).map_err(UpdateError::Refused)?;
        list.save(dir).map_err(UpdateError::File)?;
        // The list first, then the version: a CA that reads in between serves the new list under
        // one version past its own, which is the directory's new version too.
        crate::authorities::RotationState::bump_version_for_revocations(dir)
            .map_err(UpdateError::File)?;
        Ok(out)
    }

    /// Writes the list to `dir` (atomically).
    pub fn save(&self, dir: &Path) -> Result<(), AuthorityError> {
        let file = FileContents {
            version: FORMAT_VERSION,
            entries: self
                .entries
                .iter()
                .map(|e| {
                    let (id, serial) = file_names(&e.what);
                    FileEntry {
                        id,
                        serial,
                        revoked_at: e.revoked_at,
                        expires_at: e.expires_at,
                        reason: e.reason.clone(),
                    }
                })
                .collect(),
            lifted: self
                .lifted
                .iter()
                .map(|l| {
                    let (id, serial) = file_names(&l.what);
                    FileLifted {
                        id,
                        serial,
                        lifted_at: l.lifted_at,
                    }
                })
                .collect(),
        };
        let path = dir.join(REVOCATIONS_FILE);
        let json = serde_json::to_vec_pretty(&file).map_err(|e| invalid(&path, e.to_string()))?;
        write_atomic(&path, &json)
    }

    pub fn entries(&self) -> &[Entry] {
        &self.entries
    }

    /// Adds (or renews, with a new time and reason) the revocation of `what`. Returns whether it
    /// was new. Refused past [`MAX_REVOCATIONS`].
    pub fn revoke(
        &mut self,
        what: Revoked,
        now: i64,
        max_lifetime_secs: i64,
        reason: String,
    ) -> Result<bool, String> {
        let entry = Entry {
            expires_at: now.saturating_add(max_lifetime_secs.max(0)),
            revoked_at: now,
            reason,
            what,
        };
        if let Some(existing) = self.entries.iter_mut().find(|e| e.what == entry.what) {
            *existing = entry;
            return Ok(false);
        }
        if self.entries.len() >= MAX_REVOCATIONS {
            return Err(format!(
                "the list already holds {MAX_REVOCATIONS} entries; unrevoke some first"
            ));
        }
        self.entries.push(entry);
        Ok(true)
    }

    /// The list as a CA whose certificates live up to `max_ttl_secs` serves it: each entry in force
    /// at least until `max_ttl_secs` + [`EXPIRY_SLACK_SECS`] after the CA could last have issued
    /// a certificate it names, when none can still be live. That is `revoked_at`, or, for an entry
    /// this CA learns of while it runs (`learned`: what it served before, and now), the time it
    /// learned of it: until then it issued to the revoked identity or lineage (a list applied to
    /// the cluster an hour after `revoke` wrote it). An entry written with a shorter
    /// `revoke --max-ttl`, or learned late, would otherwise leave the bundle (sidecars stop
    /// applying it) while a certificate it revokes is still valid. An entry served before keeps
    /// the expiry it was served with. Also returns the entries it served longer than the file says.
    pub fn served_by_ca(
        &self,
        max_ttl_secs: i64,
        learned: Option<(&Self, i64)>,
    ) -> (Self, Vec<Entry>) {
        let mut raised = Vec::new();
        // Looked up by key, not searched: 10,000 entries against 10,000 is 10^8 comparisons, and
        // this runs every second while the CA directory is refused.
        let mut before: std::collections::HashMap<(&Revoked, i64), &Entry> =
            std::collections::HashMap::new();
        if let Some((served, _)) = learned {
            for b in &served.entries {
                before.entry((&b.what, b.revoked_at)).or_insert(b);
            }
        }
        let entries = self
            .entries
            .iter()
            .map(|e| {
                let served_before = before.get(&(&e.what, e.revoked_at)).copied();
                let since = match (served_before, learned) {
                    (None, Some((_, now))) => e.revoked_at.max(now),
                    _ => e.revoked_at,
                };
                let floor = since
                    .saturating_add(max_ttl_secs.max(0))
                    .saturating_add(EXPIRY_SLACK_SECS)
                    .max(served_before.map_or(i64::MIN, |b| b.expires_at));
                if e.expires_at >= floor {
                    return e.clone();
                }
                let served = Entry {
                    expires_at: floor,
                    ..e.clone()
                };
                raised.push(served.clone());
                served
            })
            .collect();
        (
            Self {
                entries,
                lifted: self.lifted.clone(),
            },
            raised,
        )
    }

    /// `self` with every entry of `newer` that narrows trust: one for a certificate or identity
    /// `self` does not list, or one revoked again since (its later time, expiry and reason). What
    /// `newer` no longer lists stays: a lifted revocation waits for the whole directory to load.
    /// `Ok(None)` when it adds nothing; `Err` with the count when the union would pass
    /// [`MAX_REVOCATIONS`] (sidecars refuse a bundle with more, whole).
    pub fn narrowed_by(&self, newer: &Self) -> Result<Option<Self>, usize> {
        let mut entries = self.entries.clone();
        let mut changed = false;
        // Where each revoked thing is listed (its first entry), looked up rather than searched.
        let mut at: std::collections::HashMap<Revoked, usize> =
            std::collections::HashMap::with_capacity(entries.len());
        for (i, e) in entries.iter().enumerate() {
            at.entry(e.what.clone()).or_insert(i);
        }
        for e in &newer.entries {
            match at.get(&e.what) {
                Some(&i) if entries[i].revoked_at < e.revoked_at => {
                    entries[i] = e.clone();
                    changed = true;
                }
                Some(_) => {}
                None => {
                    at.insert(e.what.clone(), entries.len());
                    entries.push(e.clone());
                    changed = true;
                }
            }
        }
        if entries.len() > MAX_REVOCATIONS {
            return Err(entries.len());
        }
        Ok(changed.then_some(Self {
            entries,
            lifted: self.lifted.clone(),
        }))
    }

    /// Removes the revocation of `what`, recording that it was lifted at `now` (so a CA that
    /// enforces it tells this from an older copy of the list: [`Self::dropped_from`]); returns it
    /// if there was one.
    pub fn unrevoke(&mut self, what: &Revoked, now: i64) -> Option<Entry> {
        let i = self.entries.iter().position(|e| &e.what == what)?;
        self.lifted.retain(|l| &l.what != what);
        if self.lifted.len() >= MAX_REVOCATIONS {
            // The oldest record goes: the list is bounded as its entries are.
            if let Some(oldest) = (0..self.lifted.len()).min_by_key(|&j| self.lifted[j].lifted_at) {
                self.lifted.remove(oldest);
            }
        }
        self.lifted.push(Lifted {
            what: what.clone(),
            lifted_at: now,
        });
        Some(self.entries.remove(i))
    }

    /// What `unrevoke` lifted lately.
    pub fn lifted(&self) -> &[Lifted] {
        &self.lifted
    }

    /// Drops serial entries whose certificate has expired, a day ([`PRUNE_AFTER_SECS`]) past the
    /// file's expiry (an identity stays revoked until `unrevoke`), and records of lifted entries
    /// older than a day; returns how many entries went.
    pub fn prune(&mut self, now: i64) -> usize {
        let before = self.entries.len();
        self.entries.retain(|e| {
            matches!(e.what, Revoked::Id(_)) || now < e.expires_at.saturating_add(PRUNE_AFTER_SECS)
        });
        self.lifted
            .retain(|l| now < l.lifted_at.saturating_add(PRUNE_AFTER_SECS));
        before - self.entries.len()
    }

    /// The entries of `self` (the list a CA enforces) that `next` (a newer load of the directory)
    /// no longer lists although nothing lifted them: `next` records no `unrevoke` of it since it
    /// was revoked, and it is an identity (revoked until lifted) or a serial still in force at
    /// `now` (one past its expiry names no live certificate, and `prune` drops it). A list applied
    /// from an older copy of the CA directory (two operators, each with a copy, revoking one thing
    /// each and applying it to the cluster as a Secret) would otherwise lift what the other
    /// revoked, with nothing but an audit line to say so.
    pub fn dropped_from<'a>(&'a self, next: &Self, now: i64) -> Vec<&'a Entry> {
        let listed: std::collections::HashSet<&Revoked> =
            next.entries.iter().map(|e| &e.what).collect();
        let lifted: std::collections::HashMap<&Revoked, i64> =
            next.lifted.iter().map(|l| (&l.what, l.lifted_at)).collect();
        self.entries
            .iter()
            .filter(|e| !listed.contains(&e.what))
            .filter(|e| lifted.get(&e.what).is_none_or(|&at| at < e.revoked_at))
            .filter(|e| matches!(e.what, Revoked::Id(_)) || e.in_force(now))
            .collect()
    }

    /// Why the CA must not issue for `id` (presenting, for a renewal, the certificate with
    /// `serial`): its identity is revoked (whatever the entry's expiry), or that certificate is.
    pub fn refuses(&self, id: &SpiffeId, serial: Option<&str>) -> Option<&Entry> {
        self.entries.iter().find(|e| match &e.what {
            Revoked::Id(revoked) => revoked == id,
            Revoked::Serial(s) => serial == Some(s.as_str()),
        })
    }

    /// Whether an instance serving as `identity` (a SPIFFE ID as the fleet records it) with the
    /// certificate `serial` (empty: not known) is listed: what the rotation gates skip.
    pub fn lists_instance(&self, identity: &str, serial: &str) -> bool {
        self.entries.iter().any(|e| match &e.what {
            Revoked::Id(revoked) => revoked.as_str() == identity,
            Revoked::Serial(s) => !serial.is_empty() && serial == s,
        })
    }

    /// Whether the certificate `serial` (normalized), and so every certificate renewed from it when
    /// it is a lineage's first, is revoked by an entry in force at `now`.
    pub fn revokes_serial(&self, serial: &str, now: i64) -> bool {
        self.entries
            .iter()
            .any(|e| matches!(&e.what, Revoked::Serial(s) if s == serial) && e.in_force(now))
    }

    /// Whether `identity` is revoked by an entry in force at `now`.
    pub fn revokes_identity(&self, identity: &str, now: i64) -> bool {
        self.entries.iter().any(|e| {
            matches!(&e.what, Revoked::Id(revoked) if revoked.as_str() == identity)
                && e.in_force(now)
        })
    }

    /// How many identities and serials are listed.
    pub fn counts(&self) -> (usize, usize) {
        let ids = self
            .entries
            .iter()
            .filter(|e| matches!(e.what, Revoked::Id(_)))
            .count();
        (ids, self.entries.len() - ids)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn id(s: &str) -> SpiffeId {
        SpiffeId::parse(s).unwrap()
    }

    #[test]
    fn a_newer_list_narrows_but_never_lifts() {
        let serial = |s: &str| Revoked::Serial(s.into());
        let mut have = Revocations::default();
        have.revoke(serial("a1"), 100, 60, "old".into()).unwrap();
        have.revoke(serial("b2"), 100, 60, String::new()).unwrap();
        // The newer list lifted b2, revoked a1 again later, and added an identity.
        let mut newer = Revocations::default();
        newer.revoke(serial("a1"), 200, 60, "again".into()).unwrap();
        newer
            .revoke(Revoked::Id(id("spiffe://td/x")), 150, 60, String::new())
            .unwrap();
        let merged = have.narrowed_by(&newer).unwrap().expect("it adds");
        let listed: Vec<_> = merged.entries().iter().map(|e| e.what.clone()).collect();
        assert_eq!(
            listed,
            [serial("a1"), serial("b2"), Revoked::Id(id("spiffe://td/x"))]
        );
        assert_eq!(merged.entries()[0].reason, "again");
        assert_eq!(merged.entries()[0].revoked_at, 200);
        // Nothing new (an older time of a1 included): nothing to apply.
        assert_eq!(merged.narrowed_by(&have).unwrap(), None);
        assert_eq!(merged.narrowed_by(&merged).unwrap(), None);
        // A union past the bundle's bound is not applied.
        let mut full = Revocations::default();
        for i in 0..MAX_REVOCATIONS {
            full.revoke(serial(&format!("{:x}", i + 0x1000)), 1, 1, String::new())
                .unwrap();
        }
        assert_eq!(full.narrowed_by(&have), Err(MAX_REVOCATIONS + 2));
    }

    #[test]
    fn a_ca_serves_each_entry_as_long_as_its_own_certificates_can_live() {
        let mut list = Revocations::default();
        // `revoke --max-ttl 1m` against a CA whose certificates live an hour.
        list.revoke(
            Revoked::Id(id("spiffe://td/short")),
            100,
            120,
            String::new(),
        )
        .unwrap();
        list.revoke(Revoked::Serial("0a".into()), 100, 90_000, String::new())
            .unwrap();
        let (served, raised) = list.served_by_ca(3_600, None);
        assert_eq!(raised.len(), 1, "{raised:?}");
        assert_eq!(raised[0].expires_at, 100 + 3_600 + EXPIRY_SLACK_SECS);
        let short = &served.entries()[0];
        assert_eq!(short.expires_at, 100 + 3_600 + EXPIRY_SLACK_SECS);
        assert!(served.revokes_identity("spiffe://td/short", 3_000));
        assert!(
            !list.revokes_identity("spiffe://td/short", 3_000),
            "the file's own"
        );
        assert_eq!(
            served.entries()[1],
            list.entries()[1],
            "long enough already"
        );
        assert!(served.served_by_ca(3_600, None).1.is_empty());
    }

    /// A CA that learns of an entry while it runs issued to it until then: the entry is served
    /// from then on for as long as a certificate of that CA can live; one it served before keeps
    /// its expiry. Loaded at start, an entry is served from its own time.
    #[test]
    fn an_entry_learned_late_is_served_from_when_it_was_learned() {
        let mut list = Revocations::default();
        list.revoke(
            Revoked::Id(id("spiffe://td/late")),
            100,
            3_600,
            String::new(),
        )
        .unwrap();
        let at_start = list.served_by_ca(3_600, None).0;
        assert_eq!(
            at_start.entries()[0].expires_at,
            100 + 3_600 + EXPIRY_SLACK_SECS
        );
        // Learned at 5,000 (the list reached this CA an hour and more after it was written).
        let before = Revocations::default();
        let (late, raised) = list.served_by_ca(3_600, Some((&before, 5_000)));
        let want = 5_000 + 3_600 + EXPIRY_SLACK_SECS;
        assert_eq!(late.entries()[0].expires_at, want);
        assert_eq!(raised.len(), 1);
        // Served already: the next reload keeps the expiry it was served with.
        let again = list.served_by_ca(3_600, Some((&late, 9_000))).0;
        assert_eq!(again.entries()[0].expires_at, want);
        // Revoked again (a new time): learned anew.
        let mut renewed = list.clone();
        renewed
            .revoke(
                Revoked::Id(id("spiffe://td/late")),
                8_000,
                3_600,
                String::new(),
            )
            .unwrap();
        let (anew, _) = renewed.served_by_ca(3_600, Some((&late, 9_000)));
        assert_eq!(
            anew.entries()[0].expires_at,
            9_000 + 3_600 + EXPIRY_SLACK_SECS
        );
    }

    #[test]
    fn an_identity_is_revoked_while_its_entry_is_in_force() {
        let mut list = Revocations::default();
        list.revoke(
            Revoked::Id(id("spiffe://td/liar")),
            100,
            3_600,
            String::new(),
        )
        .unwrap();
        list.revoke(Revoked::Serial("0a".into()), 100, 90_000, String::new())
            .unwrap();
        assert!(list.revokes_identity("spiffe://td/liar", 3_699));
        assert!(!list.revokes_identity("spiffe://td/liar", 3_700));
        assert!(!list.revokes_identity("spiffe://td/other", 100));
    }

    /// A directory that never had a list has no file, and that is an empty list; once `revoke`
    /// (or `unrevoke`) wrote one, a missing file is an error naming it, for the CA, the listing
    /// and the commands that would write over it.
    #[test]
    fn a_missing_list_is_empty_only_if_none_was_written() {
        let dir = tempfile::tempdir().unwrap();
        let td = meshid_identity::TrustDomain::new("td").unwrap();
        crate::authority::init(dir.path(), &td, None).unwrap();
        assert_eq!(
            Revocations::load(dir.path()).unwrap(),
            Revocations::default()
        );
        assert!(crate::authority::Authority::load(dir.path()).is_ok());
        Revocations::update(dir.path(), |list| {
            list.revoke(Revoked::Id(id("spiffe://td/a")), 1, 60, String::new())
        })
        .unwrap();
        let state = crate::authorities::RotationState::load(dir.path()).unwrap();
        assert_eq!(state.revocations_written_at, Some(state.bundle_version));
        std::fs::remove_file(dir.path().join(REVOCATIONS_FILE)).unwrap();
        let err = Revocations::load(dir.path()).unwrap_err().to_string();
        assert!(err.contains("revocations.json: missing"), "{err}");
        let err = crate::authority::Authority::load(dir.path())
            .expect_err("refused")
            .to_string();
        assert!(err.contains("revocations.json: missing"), "{err}");
        let refused = Revocations::update(dir.path(), |list| {
            list.revoke(Revoked::Id(id("spiffe://td/b")), 1, 60, String::new())
        });
        assert!(refused.is_err());
        assert!(
            !dir.path().join(REVOCATIONS_FILE).exists(),
            "nothing written over"
        );
    }

    /// A file past [`MAX_FILE_BYTES`] is refused with its size, not read whole (the CA reads a
    /// refused directory every second); the largest list it may hold fits well within.
    #[test]
    fn an_oversized_list_is_refused_unread() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join(REVOCATIONS_FILE);
        std::fs::File::create(&path)
            .unwrap()
            .set_len(MAX_FILE_BYTES + 1)
            .unwrap();
        let err = Revocations::load(dir.path()).unwrap_err().to_string();
        assert!(
            err.contains("revocations.json: larger than 32 MiB"),
            "{err}"
        );

        // The largest list: MAX_REVOCATIONS entries as large as an entry can be (measured on 100
        // of them; the file's own frame is a few bytes).
        let longest = format!(
            "spiffe://td/{}",
            "a".repeat(meshid_identity::spiffe::MAX_ID_LEN - 12)
        );
        let mut list = Revocations::default();
        for i in 0..100 {
            let name = format!("{}{i:05}", &longest[..longest.len() - 5]);
            list.revoke(
                Revoked::Id(id(&name)),
                i64::MAX / 2,
                i64::MAX / 2,
                "r".repeat(MAX_REASON),
            )
            .unwrap();
        }
        list.save(dir.path()).unwrap();
        let per_entry = std::fs::metadata(&path).unwrap().len() / 100;
        assert!(
            per_entry * MAX_REVOCATIONS as u64 + 1024 < MAX_FILE_BYTES,
            "{per_entry}"
        );
        assert_eq!(Revocations::load(dir.path()).unwrap(), list);
    }

    #[test]
    fn the_list_round_trips_and_answers_for_identities_and_serials() {
        let dir = tempfile::tempdir().unwrap();
        assert_eq!(
            Revocations::load(dir.path()).unwrap(),
            Revocations::default()
        );
        let mut list = Revocations::default();
        let a = id("spiffe://td/ns/a/sa/x");
        assert!(
            list.revoke(Revoked::Id(a.clone()), 1000, 3600, "stolen".into())
                .unwrap()
        );
        assert!(
            list.revoke(Revoked::Serial("ab".into()), 1000, 60, String::new())
                .unwrap()
        );
        // Again: renewed in place, not added.
        assert!(
            !list
                .revoke(Revoked::Serial("ab".into()), 1010, 60, String::new())
                .unwrap()
        );
        list.save(dir.path()).unwrap();
        let read = Revocations::load(dir.path()).unwrap();
        assert_eq!(read, list);
        assert_eq!(read.counts(), (1, 1));

        let b = id("spiffe://td/ns/a/sa/y");
        assert!(read.refuses(&a, None).is_some());
        assert!(read.refuses(&a, Some("cd")).is_some());
        assert!(read.refuses(&b, Some("ab")).is_some());
        assert!(read.refuses(&b, Some("cd")).is_none());
        assert!(read.refuses(&b, None).is_none());

        // The serial leaves the file a day after its certificate cannot be live (a CA that
        // learned of it late serves it that much longer); the identity stays refused until
        // unrevoked.
        assert!(read.entries()[1].in_force(1069));
        assert!(!read.entries()[1].in_force(1070));
        let mut pruned = read.clone();
        assert_eq!(pruned.prune(1070 + PRUNE_AFTER_SECS - 1), 0);
        assert_eq!(pruned.prune(1070 + PRUNE_AFTER_SECS), 1);
        assert!(pruned.refuses(&a, None).is_some());
        assert!(pruned.unrevoke(&Revoked::Id(a.clone()), 2000).is_some());
        assert!(pruned.unrevoke(&Revoked::Id(a.clone()), 2000).is_none());
        assert!(pruned.refuses(&a, None).is_none());
    }

    #[test]
    fn an_entry_gone_from_a_newer_list_was_dropped_unless_unrevoke_lifted_it() {
        let dir = tempfile::tempdir().unwrap();
        let (x, y) = (id("spiffe://td/ns/a/sa/x"), id("spiffe://td/ns/a/sa/y"));
        let mut enforced = Revocations::default();
        enforced
            .revoke(Revoked::Id(x.clone()), 100, 60, String::new())
            .unwrap();
        enforced
            .revoke(Revoked::Serial("ab".into()), 100, 60, String::new())
            .unwrap();
        // A copy from before either was revoked, with a revocation of its own.
        let mut stale = Revocations::default();
        stale
            .revoke(Revoked::Id(y.clone()), 120, 60, String::new())
            .unwrap();
        let dropped: Vec<_> = enforced
            .dropped_from(&stale, 130)
            .into_iter()
            .cloned()
            .collect();
        assert_eq!(dropped, enforced.entries().to_vec());
        // Past its expiry a serial names no live certificate: its going lifts nothing.
        let dropped = enforced.dropped_from(&stale, 160);
        assert_eq!(dropped.len(), 1);
        assert_eq!(dropped[0].what, Revoked::Id(x.clone()));
        // Lifted by unrevoke (and read back from the file): not dropped.
        let mut newer = enforced.clone();
        assert!(newer.unrevoke(&Revoked::Id(x.clone()), 140).is_some());
        newer.save(dir.path()).unwrap();
        let newer = Revocations::load(dir.path()).unwrap();
        assert_eq!(newer.lifted().len(), 1);
        let dropped = enforced.dropped_from(&newer, 150);
        assert!(dropped.is_empty(), "{dropped:?}");
        // A lift from before the revocation in force does not lift it (revoked again since).
        let mut again = enforced.clone();
        again
            .revoke(Revoked::Id(x.clone()), 145, 60, String::new())
            .unwrap();
        let dropped = again.dropped_from(&newer, 150);
        assert_eq!(dropped.len(), 1, "{dropped:?}");
        // The record of a lift goes a day after it, with the serials prune drops.
        let mut pruned = newer.clone();
        pruned.prune(140 + PRUNE_AFTER_SECS - 1);
        assert_eq!(pruned.lifted().len(), 1);
        pruned.prune(140 + PRUNE_AFTER_SECS);
        assert!(pruned.lifted().is_empty());
        // A file without the field reads as before (what older CLIs write).
        std::fs::write(
            dir.path().join(REVOCATIONS_FILE),
            r#"{"version":1,"entries":[]}"#,
        )
        .unwrap();
        assert!(Revocations::load(dir.path()).unwrap().lifted().is_empty());
    }

    #[test]
    fn a_broken_file_is_refused_with_the_reason() {
        let dir = tempfile::tempdir().unwrap();
        for (text, says) in [
            ("{", "EOF"),
            (r#"{"version":2,"entries":[]}"#, "format version 2"),
            (
                r#"{"version":1,"entries":[{"revoked_at":1,"expires_at":2}]}"#,
                "entry 1: names neither",
            ),
            (
                r#"{"version":1,"entries":[{"id":"spiffe://td/a","serial":"01","revoked_at":1,"expires_at":2}]}"#,
                "names neither or both",
            ),
            (
                r#"{"version":1,"entries":[{"id":"http://td/a","revoked_at":1,"expires_at":2}]}"#,
                "entry 1",
            ),
            (
                r#"{"version":1,"entries":[{"serial":"zz","revoked_at":1,"expires_at":2}]}"#,
                "serial number",
            ),
            (
                r#"{"version":1,"entries":[{"serial":"01","revoked_at":5,"expires_at":2}]}"#,
                "expires before",
            ),
            (
                r#"{"version":1,"entries":[{"serial":"01","revoked_at":1,"expires_at":2,"reason":"a\u001b[2J"}]}"#,
                "control characters",
            ),
            (
                r#"{"version":1,"entries":[],"extra":true}"#,
                "unknown field",
            ),
        ] {
            std::fs::write(dir.path().join(REVOCATIONS_FILE), text).unwrap();
            let err = Revocations::load(dir.path()).unwrap_err().to_string();
            assert!(err.contains(says), "{text}: {err}");
            assert!(err.contains(REVOCATIONS_FILE), "{err}");
        }
    }

    #[test]
    fn concurrent_updates_all_count_and_a_refused_one_writes_nothing() {
        let dir = tempfile::tempdir().unwrap();
        std::thread::scope(|s| {
            for i in 0..8 {
                let dir = dir.path();
                s.spawn(move || {
                    Revocations::update(dir, |list| {
                        list.revoke(Revoked::Serial(format!("{i:x}")), 0, 60, String::new())
                    })
                    .unwrap();
                });
            }
        });
        assert_eq!(Revocations::load(dir.path()).unwrap().entries().len(), 8);
        // Each write moved the bundle version on (from 1 with no authorities.json).
        assert_eq!(
            crate::authorities::RotationState::load(dir.path())
                .unwrap()
                .bundle_version,
            9
        );
        let before = std::fs::read(dir.path().join(REVOCATIONS_FILE)).unwrap();
        let refused = Revocations::update(dir.path(), |list| {
            list.unrevoke(&Revoked::Serial("ff".into()), 0);
            Err::<(), _>("not revoked".to_owned())
        });
        assert!(matches!(refused, Err(UpdateError::Refused(_))));
        assert_eq!(
            std::fs::read(dir.path().join(REVOCATIONS_FILE)).unwrap(),
            before
        );
        // A broken list is not written over.
        std::fs::write(dir.path().join(REVOCATIONS_FILE), "{").unwrap();
        assert!(matches!(
            Revocations::update(dir.path(), |_| Ok(())),
            Err(UpdateError::File(_))
        ));
        assert_eq!(
            std::fs::read(dir.path().join(REVOCATIONS_FILE)).unwrap(),
            b"{"
        );
    }

    #[test]
    fn the_list_is_bounded() {
        let mut list = Revocations::default();
        for i in 0..MAX_REVOCATIONS {
            list.revoke(Revoked::Serial(format!("{i:x}")), 0, 1, String::new())
                .unwrap();
        }
        assert!(
            list.revoke(Revoked::Serial("fffff".into()), 0, 1, String::new())
                .unwrap_err()
                .contains("unrevoke some first")
        );
        assert!(check_reason(&"x".repeat(MAX_REASON + 1)).is_err());
        assert!(check_reason("key leaked in incident 42").is_ok());
    }
}
