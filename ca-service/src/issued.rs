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
//! then says so in its report, and the retire gate falls back to start + `--max-ttl`.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, Ordering};

use crate::ca_dir::write_atomic;

/// The folder of the marks in the CA directory.
pub const ISSUED_DIR: &str = "issued";
/// The most a mark is written past a certificate's not-after.
pub const MAX_AHEAD: i64 = 300;

/// How far past `not_after` the mark for a certificate issued at `now` is written.
fn ahead(not_after: i64, now: i64) -> i64 {
    (not_after.saturating_sub(now) / 10).clamp(1, MAX_AHEAD)
}

/// This process's record.
#[derive(Debug)]
pub struct IssuanceLog {
    file: PathBuf,
    marks: Mutex<HashMap<String, i64>>,
    writable: AtomicBool,
}

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
            writable: AtomicBool::new(!secret_volume),
        }
    }

    /// Whether every mark so far reached the disk.
    pub fn writable(&self) -> bool {
        self.writable.load(Ordering::Relaxed)
    }

    /// Called before a certificate with `not_after` under `authority` is handed out: makes sure the
    /// directory says it may live that long. A failed write is logged once and disables the record
    /// (issuance goes on; the retire gate then waits the long way).
    pub fn record(&self, authority: &str, not_after: i64, now: i64) {
        if !self.writable() {
            return;
        }
        let mut marks = self.marks.lock().unwrap_or_else(|p| p.into_inner());
        if marks.get(authority).is_some_and(|m| *m >= not_after) {
            return;
        }
        marks.insert(
            authority.to_owned(),
            not_after.saturating_add(ahead(not_after, now)),
        );
        marks.retain(|_, m| *m > now);
        let result = serde_json::to_vec(&*marks)
            .map_err(|e| e.to_string())
            .and_then(|json| {
                if let Some(parent) = self.file.parent() {
                    std::fs::create_dir_all(parent).map_err(|e| e.to_string())?;
                }
                write_atomic(&self.file, &json).map_err(|e| e.to_string())
            });
        if let Err(error) = result {
            self.writable.store(false, Ordering::Relaxed);
            tracing::warn!(
                %error,
                file = %self.file.display(),
                "cannot record issuance in the CA directory; `rotate retire` will wait start + --max-ttl after restarts"
            );
            return;
        }
        drop(marks);
        forget_expired(self.file.parent(), &self.file, now);
    }
}

/// Removes other processes' marks that can no longer hold anything up.
fn forget_expired(dir: Option<&Path>, own: &Path, now: i64) {
    let Some(Ok(entries)) = dir.map(std::fs::read_dir) else {
        return;
    };
    for entry in entries.flatten() {
        let path = entry.path();
        if path != own && read_marks(&path).is_some_and(|m| m.values().all(|t| *t <= now)) {
            let _ = std::fs::remove_file(&path);
        }
    }
}

fn read_marks(path: &Path) -> Option<HashMap<String, i64>> {
    // A mark file is a few hundred bytes; anything large is not ours.
    let meta = std::fs::metadata(path).ok()?;
    if !meta.is_file() || meta.len() > 64 * 1024 {
        return None;
    }
    serde_json::from_slice(&std::fs::read(path).ok()?).ok()
}

/// The latest not-after any CA process recorded for `authority` (0: none recorded).
pub fn issued_until(ca_dir: &Path, authority: &str) -> i64 {
    let Ok(entries) = std::fs::read_dir(ca_dir.join(ISSUED_DIR)) else {
        return 0;
    };
    entries
        .flatten()
        .filter_map(|e| read_marks(&e.path()))
        .filter_map(|m| m.get(authority).copied())
        .max()
        .unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;

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
}
