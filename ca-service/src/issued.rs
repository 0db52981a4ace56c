//! How long certificates issued under each authority can live, recorded in the CA directory by
//! every CA process before it hands a certificate out, so that `rotate retire` knows after any
//! restart or rollout (and across replicas) when the last one expires, instead of assuming the
//! longest lifetime from each process's start.
//!
//! Each process writes its own file, `issued/<process>.json`: authority name -> a not-after at
//! least as late as any certificate it issued under that authority. The mark is written ahead (the
//! not-after plus a tenth of the lifetime, at most [`MAX_AHEAD`]), so a busy CA writes about ten
//! times per lifetime per authority (every six minutes for one-hour certificates), and the retire
//! gate waits at most that much longer than the last certificate lives. A
//! directory that cannot be written (a read-only Secret mount) disables the record; the process
//! then says so in its report, and the retire gate falls back to start + `--max-ttl`. A write that
//! fails (a full disk) does the same only until a later one succeeds: every issuance tries again
//! with the marks kept in memory meanwhile (those of the certificates issued unrecorded included),
//! so once the disk has room the file covers them. A process that stops before then leaves them
//! unrecorded: free the space while it runs.
//!
//! Certificates asked to live longer than the CA's default lifetime are marked per identity
//! instead, in `issued/<process>.long.json` (authority -> identity -> mark), for up to
//! [`MAX_LONG_IDENTITIES`] identities per authority, marked before the certificate is signed
//! (beyond, the CA gives the default lifetime instead: `Fleet::reserve_long`, so the mark above
//! holds only certificates of the default lifetime). Revoking such an identity then releases the
//! retire gate from its long certificates: no peer accepts them any more. Without this, a workload
//! that asked for `--max-ttl` before `activate` would hold `retire` that long, revoked or not. A
//! renewal's is marked under its identity and the lineage it carries on ([`long_key`]), so that
//! revoking that lineage (`revoke --serial`, what releases one instance at the gates) releases it
//! too, without revoking every instance of the identity.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, Ordering};

use crate::ca_dir::write_atomic;

/// The folder of the marks in the CA directory.
pub const ISSUED_DIR: &str = "issued";
/// The most a mark is written past a certificate's not-after.
pub const MAX_AHEAD: i64 = 300;
/// Identities per authority whose longer-than-default certificates are marked apart.
pub const MAX_LONG_IDENTITIES: usize = 256;
/// The file name ending of the per-identity marks.
const LONG_SUFFIX: &str = ".long.json";

/// What a longer-than-default certificate is marked under: its identity, and for a renewal the
/// serial of the first certificate of its lineage (normalized as revocations name it), after a
/// space (which no SPIFFE ID holds).
pub fn long_key(identity: &str, lineage: Option<&str>) -> String {
    match lineage {
        Some(lineage) => format!("{identity} {lineage}"),
        None => identity.to_owned(),
    }
}

/// The identity and lineage of a [`long_key`] (a key written before lineages were: the identity
/// alone).
pub fn split_long_key(key: &str) -> (&str, Option<&str>) {
    match key.split_once(' ') {
        Some((identity, lineage)) => (identity, Some(lineage)),
        None => (key, None),
    }
}

/// How far past `not_after` the mark for a certificate issued at `now` is written.
fn ahead(not_after: i64, now: i64) -> i64 {
    (not_after.saturating_sub(now) / 10).clamp(1, MAX_AHEAD)
}

/// This process's record.
#[derive(Debug)]
pub struct IssuanceLog {
    file: PathBuf,
    marks: Mutex<HashMap<String, i64>>,
    /// `issued/<process>.long.json`: authority -> identity -> mark.
    long_file: PathBuf,
    long: Mutex<LongMarks>,
    /// Whether a mark of each file is not yet on the disk (its last write failed: a later one that
    /// succeeds clears it).
    marks_behind: AtomicBool,
    long_behind: AtomicBool,
    /// A Kubernetes Secret volume: never written.
    secret_volume: bool,
}

type LongMarks = HashMap<String, HashMap<String, i64>>;

impl IssuanceLog {
    /// A record for this process (a random name) in `ca_dir`.
    pub fn new(ca_dir: &Path) -> Self {
        let mut b = [0u8; 8];
        let _ = aws_lc_rs::rand::fill(&mut b);
        let name = meshid_identity::identity::hex(&b);
        // A Kubernetes Secret volume is kubelet's, mounted read-only and replaced whole: never
        // written, whatever the permissions say (the record is then off, as for a failed write).
        let secret_volume = crate::auth::join::is_secret_volume(ca_dir);
        if secret_volume {
            tracing::warn!(
                dir = %ca_dir.display(),
                "the CA directory is a Secret volume: issuance is not recorded, so `rotate retire` \
                 waits until this process's start (or the end of signing) plus --max-ttl"
            );
        }
        Self {
            file: ca_dir.join(ISSUED_DIR).join(format!("{name}.json")),
            marks: Mutex::new(HashMap::new()),
            long_file: ca_dir.join(ISSUED_DIR).join(format!("{name}{LONG_SUFFIX}")),
            long: Mutex::new(HashMap::new()),
            marks_behind: AtomicBool::new(false),
            long_behind: AtomicBool::new(false),
            secret_volume,
        }
    }

    /// Whether the last write of marks failed (a full or read-only disk) and none has succeeded
    /// since. Not on a Secret volume, where none is tried: it is read-only by design.
    pub fn failing(&self) -> bool {
        self.marks_behind.load(Ordering::Relaxed) || self.long_behind.load(Ordering::Relaxed)
    }

    /// Whether every mark so far reached the disk.
    pub fn writable(&self) -> bool {
        !self.secret_volume
            && !self.marks_behind.load(Ordering::Relaxed)
            && !self.long_behind.load(Ordering::Relaxed)
    }

    /// Called before a certificate with `not_after` under `authority` is handed out: makes sure the
    /// directory says it may live that long. A failed write is logged and clears
    /// [`Self::writable`] until a later write succeeds (issuance goes on; the retire gate then
    /// waits the long way for this process while it runs); until then, every call writes again.
    pub fn record(&self, authority: &str, not_after: i64, now: i64) {
        if self.secret_volume {
            return;
        }
        let mut marks = self.marks.lock().unwrap_or_else(|p| p.into_inner());
        let covered = marks.get(authority).is_some_and(|m| *m >= not_after);
        if covered && !self.marks_behind.load(Ordering::Relaxed) {
            return;
        }
        if !covered {
            marks.insert(
                authority.to_owned(),
                not_after.saturating_add(ahead(not_after, now)),
            );
        }
        marks.retain(|_, m| *m > now);
        if self.write(&self.file, &*marks, &self.marks_behind) {
            drop(marks);
            forget_expired(self.file.parent(), &[&self.file, &self.long_file], now);
        }
    }

    /// Whether [`Self::record_long`] would mark `identity` apart under `authority` at `now` (it
    /// has a mark, or there is room for one); always when nothing is recorded.
    pub fn long_room(&self, authority: &str, identity: &str, now: i64) -> bool {
        if self.secret_volume {
            return true;
        }
        let long = self.long.lock().unwrap_or_else(|p| p.into_inner());
        long.get(authority).is_none_or(|marks| {
            marks.get(identity).is_some_and(|m| *m > now)
                || marks.values().filter(|m| **m > now).count() < MAX_LONG_IDENTITIES
        })
    }

    /// As [`Self::record`], for a certificate of `identity` asked to live longer than the default
    /// lifetime: marked under its identity, so that revoking the identity releases it (see the
    /// module docs). Past [`MAX_LONG_IDENTITIES`] identities for `authority`, it goes to the
    /// authority's mark instead (the service asks [`Self::long_room`] first, through
    /// `Fleet::reserve_long`, and gives such a certificate the default lifetime).
    pub fn record_long(&self, authority: &str, identity: &str, not_after: i64, now: i64) {
        if self.secret_volume {
            return;
        }
        let mut long = self.long.lock().unwrap_or_else(|p| p.into_inner());
        for marks in long.values_mut() {
            marks.retain(|_, m| *m > now);
        }
        long.retain(|_, marks| !marks.is_empty());
        let marks = long.entry(authority.to_owned()).or_default();
        match marks.get(identity) {
            Some(m) if *m >= not_after && !self.long_behind.load(Ordering::Relaxed) => return,
            Some(m) if *m >= not_after => {}
            None if marks.len() >= MAX_LONG_IDENTITIES => {
                drop(long);
                self.record(authority, not_after, now);
                return;
            }
            _ => {}
        }
        let mark = not_after.saturating_add(ahead(not_after, now));
        let held = marks.entry(identity.to_owned()).or_insert(mark);
        *held = (*held).max(mark);
        if self.write(&self.long_file, &*long, &self.long_behind) {
            drop(long);
            forget_expired(self.file.parent(), &[&self.file, &self.long_file], now);
        }
    }

    /// Writes `marks` to `file`, recording in `behind` whether it failed; a failure is logged.
    fn write(&self, file: &Path, marks: &impl serde::Serialize, behind: &AtomicBool) -> bool {
        let ok = Self::write_one(file, marks);
        if behind.swap(!ok, Ordering::Relaxed) && ok {
            tracing::info!(
                file = %file.display(),
                "issuance is recorded in the CA directory again"
            );
        }
        ok
    }

    fn write_one(file: &Path, marks: &impl serde::Serialize) -> bool {
        let result = serde_json::to_vec(marks)
            .map_err(|e| e.to_string())
            .and_then(|json| {
                if let Some(parent) = file.parent() {
                    std::fs::create_dir_all(parent).map_err(|e| e.to_string())?;
                }
                write_atomic(file, &json).map_err(|e| e.to_string())
            });
        if let Err(error) = result {
            static FAILED: meshid_runtime::log_limit::LogLimit =
                meshid_runtime::log_limit::LogLimit::new(5.0, 0.1);
            if let Some(left_out) = FAILED.take() {
                tracing::warn!(
                    %error,
                    file = %file.display(),
                    left_out,
                    "cannot record issuance in the CA directory (tried again at each issuance): \
                     while it fails, this process reports so and `rotate retire` waits its start \
                     + --max-ttl; if it stops before a write succeeds, what it issued meanwhile is \
                     recorded nowhere, so free the space while it runs"
                );
            }
            return false;
        }
        true
    }
}

/// Removes other processes' marks that can no longer hold anything up.
fn forget_expired(dir: Option<&Path>, own: &[&Path], now: i64) {
    let Some(Ok(entries)) = dir.map(std::fs::read_dir) else {
        return;
    };
    let wall = std::time::SystemTime::now();
    for entry in entries.flatten() {
        let path = entry.path();
        if own.contains(&path.as_path()) {
            continue;
        }
        // A write a killed process left half done: nothing else would ever remove it.
        if crate::ca_dir::is_leftover_temp(&path, wall) {
            let _ = std::fs::remove_file(&path);
            continue;
        }
        // The file as read, to remove only that one: its process may write a fresh one (a new
        // inode, renamed into place) between this read and the removal, and removing that would
        // forget what it just issued until its next write.
        let seen = identity_of(&path);
        let passed = if is_long(&path) {
            read_long(&path).is_some_and(|l| l.values().flat_map(|m| m.values()).all(|t| *t <= now))
        } else {
            read_marks(&path).is_some_and(|m| m.values().all(|t| *t <= now))
        };
        if passed && seen.is_some() && identity_of(&path) == seen {
            let _ = std::fs::remove_file(&path);
        }
    }
}

/// Which file `path` names now: its inode and modification time.
fn identity_of(path: &Path) -> Option<(u64, std::time::SystemTime)> {
    use std::os::unix::fs::MetadataExt;
    let m = std::fs::symlink_metadata(path).ok()?;
    Some((m.ino(), m.modified().ok()?))
}

fn is_long(path: &Path) -> bool {
    path.file_name()
        .and_then(|n| n.to_str())
        .is_some_and(|n| n.ends_with(LONG_SUFFIX))
}

/// A mark file's bytes, if it is one (a regular file of a sane size).
fn read_small(path: &Path, max: u64) -> Option<Vec<u8>> {
    // Checked on the opened file: a swap between a `stat` and the read cannot slip a FIFO in.
    meshid_runtime::file::read_regular(path, max).ok()
}

/// The largest mark file read: one is a few hundred bytes; anything large is not ours.
const MAX_MARKS_BYTES: u64 = 64 * 1024;

/// The largest per-identity mark file read: at most MAX_LONG_IDENTITIES identities (up to 2 KiB
/// each) per authority.
const MAX_LONG_BYTES: u64 = 4 * 1024 * 1024;

/// The size past which a mark file is not read (and so is unreadable to the retire gate).
fn max_bytes(path: &Path) -> u64 {
    if is_long(path) {
        MAX_LONG_BYTES
    } else {
        MAX_MARKS_BYTES
    }
}

fn read_marks(path: &Path) -> Option<HashMap<String, i64>> {
    serde_json::from_slice(&read_small(path, max_bytes(path))?).ok()
}

fn read_long(path: &Path) -> Option<LongMarks> {
    serde_json::from_slice(&read_small(path, max_bytes(path))?).ok()
}

/// The mark files of the CA directory, per-identity ones apart.
fn mark_files(ca_dir: &Path) -> impl Iterator<Item = PathBuf> {
    std::fs::read_dir(ca_dir.join(ISSUED_DIR))
        .into_iter()
        .flatten()
        .flatten()
        .map(|e| e.path())
}

/// The marks the retire gate cannot read, each naming the file and why: a mark file (`*.json` in
/// `issued/`) that is not a readable mark (EACCES, EIO, garbage, a directory in its place, larger
/// than the mark readers read), or an
/// `issued/` that cannot be listed. [`issued_until`] skips them, so a certificate they would
/// account for may still be live: `rotate retire` refuses while there is one.
pub fn unreadable_marks(ca_dir: &Path) -> Vec<String> {
    let dir = ca_dir.join(ISSUED_DIR);
    let entries = match std::fs::read_dir(&dir) {
        Ok(entries) => entries,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Vec::new(),
        Err(e) => return vec![format!("{}: cannot be listed: {e}", dir.display())],
    };
    let mut unreadable = Vec::new();
    for entry in entries {
        let path = match entry {
            Ok(entry) => entry.path(),
            Err(e) => {
                unreadable.push(format!("{}: cannot be listed: {e}", dir.display()));
                continue;
            }
        };
        // Temporary files of a write in flight (`write_atomic`) are not marks.
        if path.extension().is_none_or(|e| e != "json") {
            continue;
        }
        // A mark gone between the listing and the look was removed by a process's cleanup of
        // expired marks: nothing unreadable (`retire` refused once for it).
        // (A dangling link in its place is no removal: it is reported.)
        let gone = |e: &std::io::Error| {
            e.kind() == std::io::ErrorKind::NotFound && std::fs::symlink_metadata(&path).is_err()
        };
        let why = match std::fs::metadata(&path) {
            Err(e) if gone(&e) => None,
            Err(e) => Some(e.to_string()),
            Ok(m) if !m.is_file() => Some("not a regular file".to_owned()),
            // The readers skip it, so whatever it holds is not counted.
            Ok(m) if m.len() > max_bytes(&path) => Some(format!(
                "{} bytes, larger than a mark file may be ({} bytes)",
                m.len(),
                max_bytes(&path)
            )),
            Ok(_) => match meshid_runtime::file::read_regular(&path, max_bytes(&path)) {
                Err(e) if gone(&e) => None,
                Err(e) => Some(e.to_string()),
                Ok(bytes) if is_long(&path) => serde_json::from_slice::<LongMarks>(&bytes)
                    .err()
                    .map(|e| format!("not a mark file: {e}")),
                Ok(bytes) => serde_json::from_slice::<HashMap<String, i64>>(&bytes)
                    .err()
                    .map(|e| format!("not a mark file: {e}")),
            },
        };
        if let Some(why) = why {
            unreadable.push(format!("{}: {why}", path.display()));
        }
    }
    unreadable.sort();
    unreadable
}

/// The latest not-after any CA process recorded for `authority` (0: none recorded), but for the
/// certificates marked per identity ([`long_issued_until`]).
pub fn issued_until(ca_dir: &Path, authority: &str) -> i64 {
    mark_files(ca_dir)
        .filter(|p| !is_long(p))
        .filter_map(|p| read_marks(&p))
        .filter_map(|m| m.get(authority).copied())
        .max()
        .unwrap_or(0)
}

/// Per identity, the latest not-after any CA process recorded for `authority`'s certificates
/// longer than the default lifetime.
pub fn long_issued_until(ca_dir: &Path, authority: &str) -> HashMap<String, i64> {
    let mut until: HashMap<String, i64> = HashMap::new();
    for marks in mark_files(ca_dir)
        .filter(|p| is_long(p))
        .filter_map(|p| read_long(&p))
        .filter_map(|mut l| l.remove(authority))
    {
        for (identity, mark) in marks {
            let e = until.entry(identity).or_default();
            *e = (*e).max(mark);
        }
    }
    until
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_temporary_file_a_killed_writer_left_is_removed() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::create_dir_all(dir.path().join(ISSUED_DIR)).unwrap();
        let log = IssuanceLog::new(dir.path());
        let temp = dir.path().join(ISSUED_DIR).join("x.tmp42");
        std::fs::write(&temp, "partial").unwrap();
        log.record("a", 1_000, 100);
        assert!(temp.exists(), "a write in flight is left alone");
        std::fs::File::options()
            .write(true)
            .open(&temp)
            .unwrap()
            .set_modified(
                std::time::SystemTime::now()
                    - crate::ca_dir::LEFTOVER_AFTER
                    - std::time::Duration::from_secs(1),
            )
            .unwrap();
        log.record("a", 2_000, 100);
        assert!(
            !temp.exists(),
            "one a killed process left is removed at the next record"
        );
    }

    #[test]
    fn marks_are_written_ahead_and_read_across_processes() {
        let dir = tempfile::tempdir().unwrap();
        let a = IssuanceLog::new(dir.path());
        let b = IssuanceLog::new(dir.path());
        assert_eq!(issued_until(dir.path(), "1"), 0);
        // A 900 s lifetime: written 90 s ahead.
        a.record("1", 1_000, 100);
        assert_eq!(issued_until(dir.path(), "1"), 1_090);
        // Within the mark: no new write needed, the mark stays.
        a.record("1", 1_050, 150);
        assert_eq!(issued_until(dir.path(), "1"), 1_090);
        // Long lifetimes are written at most MAX_AHEAD ahead.
        b.record("1", 5_000, 200);
        b.record("2", 3_000, 200);
        assert_eq!(issued_until(dir.path(), "1"), 5_000 + MAX_AHEAD);
        assert_eq!(issued_until(dir.path(), "2"), 3_000 + 280);
        assert!(a.writable() && b.writable());
        // Once every mark of a process has passed, another process's write removes its file.
        a.record("2", 9_000, 6_000);
        assert_eq!(
            issued_until(dir.path(), "1"),
            0,
            "b's marks expired at 6000"
        );
        assert_eq!(issued_until(dir.path(), "2"), 9_000 + MAX_AHEAD);
    }

    #[test]
    fn long_certificates_are_marked_per_identity() {
        let dir = tempfile::tempdir().unwrap();
        let a = IssuanceLog::new(dir.path());
        let b = IssuanceLog::new(dir.path());
        a.record("1", 1_000, 100);
        a.record_long("1", "spiffe://td/liar", 9_000, 100);
        b.record_long("1", "spiffe://td/liar", 5_000, 100);
        b.record_long("1", "spiffe://td/batch", 4_000, 100);
        // Apart from the authority's mark, the latest per identity across processes.
        assert_eq!(issued_until(dir.path(), "1"), 1_090);
        let long = long_issued_until(dir.path(), "1");
        assert_eq!(long.len(), 2, "{long:?}");
        assert_eq!(long["spiffe://td/liar"], 9_000 + MAX_AHEAD);
        assert_eq!(long["spiffe://td/batch"], 4_000 + MAX_AHEAD);
        assert!(long_issued_until(dir.path(), "2").is_empty());
        // Past the identities one process marks apart, the authority's mark takes them.
        for i in 1..MAX_LONG_IDENTITIES {
            a.record_long("1", &format!("spiffe://td/w{i}"), 2_000, 100);
        }
        assert_eq!(
            long_issued_until(dir.path(), "1").len(),
            MAX_LONG_IDENTITIES + 1
        );
        assert!(!a.long_room("1", "spiffe://td/one-too-many", 100));
        assert!(a.long_room("1", "spiffe://td/liar", 100), "marked already");
        assert!(
            b.long_room("1", "spiffe://td/one-too-many", 100),
            "another process"
        );
        a.record_long("1", "spiffe://td/one-too-many", 7_000, 100);
        assert!(!long_issued_until(dir.path(), "1").contains_key("spiffe://td/one-too-many"));
        assert_eq!(issued_until(dir.path(), "1"), 7_000 + MAX_AHEAD);
        // A process whose per-identity marks have all passed is forgotten by another's write.
        a.record("1", 9_500, 8_000);
        let long = long_issued_until(dir.path(), "1");
        assert!(!long.contains_key("spiffe://td/batch"), "b's file is gone");
        assert_eq!(
            long["spiffe://td/liar"],
            9_000 + MAX_AHEAD,
            "a's own mark stays"
        );
        assert!(a.writable() && b.writable());
    }

    #[tokio::test]
    async fn a_mark_file_that_cannot_be_read_blocks_retire() {
        use crate::rotation::{RotateError, activate, prepare, retire};
        let dir = tempfile::tempdir().unwrap();
        let td = meshid_identity::TrustDomain::new("td").unwrap();
        crate::authority::init(dir.path(), &td, None).unwrap();
        prepare(dir.path(), None).unwrap();
        activate(dir.path(), &[], true).await.unwrap();
        let a = IssuanceLog::new(dir.path());
        let b = IssuanceLog::new(dir.path());
        a.record("1", 1_000, 100);
        b.record("1", 2_000, 100);
        assert!(unreadable_marks(dir.path()).is_empty());
        // A temporary file of a write in flight is not a mark.
        let temp = dir.path().join(ISSUED_DIR).join("x.tmp42");
        std::fs::write(&temp, "partial").unwrap();
        assert!(unreadable_marks(dir.path()).is_empty());
        let refused = |why: &str| {
            let blockers = unreadable_marks(dir.path());
            assert_eq!(blockers.len(), 1, "{blockers:?}");
            assert!(
                blockers[0].contains(&b.file.display().to_string()),
                "{blockers:?}"
            );
            assert!(blockers[0].contains(why), "{blockers:?}");
        };
        std::fs::write(&b.file, "garbage").unwrap();
        refused("not a mark file");
        // What it held is not counted.
        assert_eq!(issued_until(dir.path(), "1"), 1_090);
        let err = retire(dir.path(), &[], false).await.unwrap_err();
        assert!(
            matches!(&err, RotateError::Refused(r) if r.contains(&b.file.display().to_string())),
            "{err}"
        );
        // Well-formed, but past the size the readers read: what it holds is not counted either.
        let mut padded = br#"{"1": 5000}"#.to_vec();
        padded.resize(padded.len() + MAX_MARKS_BYTES as usize, b' ');
        std::fs::write(&b.file, padded).unwrap();
        assert_eq!(issued_until(dir.path(), "1"), 1_090);
        refused("larger than a mark file may be");
        // A dangling link in its place is reported (a mark removed meanwhile is not: another
        // process's cleanup of expired marks).
        std::fs::remove_file(&b.file).unwrap();
        std::os::unix::fs::symlink(dir.path().join("nowhere"), &b.file).unwrap();
        refused("No such file");
        std::fs::remove_file(&b.file).unwrap();
        std::fs::create_dir(&b.file).unwrap();
        refused("not a regular file");
        assert!(matches!(
            retire(dir.path(), &[], false).await,
            Err(RotateError::Refused(_))
        ));
        // Forced, as any blocker (audited).
        assert_eq!(retire(dir.path(), &[], true).await.unwrap(), "1");
    }

    #[test]
    fn a_read_only_directory_disables_the_record() {
        let dir = tempfile::tempdir().unwrap();
        let blocked = dir.path().join("ca");
        // A file where the directory should be: nothing can be created below it.
        std::fs::write(&blocked, "not a directory").unwrap();
        let log = IssuanceLog::new(&blocked);
        log.record("1", 1_000, 100);
        assert!(!log.writable());
        assert_eq!(issued_until(&blocked, "1"), 0);
    }

    /// A write that fails (a full disk) clears `writable` only until one succeeds: each issuance
    /// tries again, and the marks of what was issued meanwhile reach the file. (Before, one failure
    /// stopped the record for the process's life: after a restart, `retire` no longer waited for
    /// what it had issued unrecorded.)
    #[test]
    fn a_failed_write_is_tried_again_and_the_record_catches_up() {
        let dir = tempfile::tempdir().unwrap();
        let issued = dir.path().join(ISSUED_DIR);
        // A file where the folder of the marks should be: no mark can be written.
        std::fs::write(&issued, "in the way").unwrap();
        let log = IssuanceLog::new(dir.path());
        log.record("1", 5_000, 100);
        log.record_long("1", "spiffe://td/ns/a/sa/long", 9_000, 100);
        assert!(!log.writable());
        // Still failing: an issuance the memory already covers writes again all the same.
        log.record("1", 4_000, 200);
        assert!(!log.writable());
        std::fs::remove_file(&issued).unwrap();
        // Room again: the next issuance writes what was issued meanwhile (a mark at least as
        // late as 5,000 for a certificate that lives to 3,000 now).
        log.record("1", 3_000, 300);
        assert!(issued_until(dir.path(), "1") >= 5_000);
        // The long file is behind until an issuance of its kind writes it.
        assert!(!log.writable());
        log.record_long("1", "spiffe://td/ns/a/sa/long", 1_000, 300);
        assert!(log.writable());
        let long = long_issued_until(dir.path(), "1");
        assert!(
            long.get("spiffe://td/ns/a/sa/long")
                .is_some_and(|m| *m >= 9_000),
            "{long:?}"
        );
    }
}
