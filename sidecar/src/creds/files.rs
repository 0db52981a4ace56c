//! Credentials from PEM files (`--cert`, `--key`, `--bundle`), loaded once or kept live.
//!
//! [`watch_credential_files`] keeps the [`CredentialStore`] in step with the files, as cert-manager's
//! CSI driver or a Kubernetes Secret volume updates them. The parent directory of each file is
//! watched (inotify, non-recursive), which sees in-place writes, atomic renames, and the kubelet's
//! `..data` symlink swap. Once events have been quiet for a moment, the three files are re-read
//! (following symlinks, and resolving a Kubernetes volume's `..data` once so that the three come
//! from one version of it: [`meshid_runtime::volume`]); only contents that differ from the last
//! contents seen are parsed and handed
//! to [`CredentialStore::set_certificate`], which publishes them only if the key matches the leaf
//! and the chain verifies to the bundle. A half-written or inconsistent set is rejected and logged,
//! and the last good one keeps serving; a later consistent set is applied. A periodic re-read covers
//! whatever inotify misses.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};

use super::store::{CredentialStore, Credentials};
use crate::metrics::{Metrics, ResultLabels};
use crate::settings::FileCreds;
use crate::watch::{DirWatcher, Timing};

/// Why the credential files could not be read. Names the file.
#[derive(Debug, thiserror::Error)]
#[error("{path}: {reason}")]
pub struct FileError {
    pub path: String,
    pub reason: String,
}

fn err(path: &Path, reason: impl Into<String>) -> FileError {
    FileError {
        path: path.display().to_string(),
        reason: reason.into(),
    }
}

fn read(path: &Path) -> Result<Vec<u8>, FileError> {
    std::fs::read(path).map_err(|e| err(path, e.to_string()))
}

/// Reads every PEM certificate in a file (at least one).
pub fn certs(path: &Path) -> Result<Vec<CertificateDer<'static>>, FileError> {
    certs_from_pem(path, &read(path)?)
}

fn certs_from_pem(path: &Path, pem: &[u8]) -> Result<Vec<CertificateDer<'static>>, FileError> {
    let certs = CertificateDer::pem_slice_iter(pem)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| err(path, format!("not PEM certificates: {e}")))?;
    if certs.is_empty() {
        return Err(err(path, "no certificate in the file"));
    }
    Ok(certs)
}

/// Reads the three files into one credential set (validated later by the store).
pub fn load(files: &FileCreds) -> Result<Credentials, FileError> {
    parse(files, &read_together(files))
}

/// The three files' bytes as of one version of a Kubernetes volume they are in
/// ([`meshid_runtime::volume`]: `..data` resolved once), or why one could not be read.
fn read_together(files: &FileCreds) -> Contents {
    let paths = [&files.cert, &files.key, &files.bundle].map(|p| p.as_path());
    let resolved = meshid_runtime::volume::one_version(&paths);
    let mut resolved = resolved.iter();
    paths.map(|given| {
        let path = resolved.next().map_or(given, PathBuf::as_path);
        std::fs::read(path).map_err(|e| e.to_string())
    })
}

/// Parses the three files' bytes into one credential set (validated later by the store).
fn parse(files: &FileCreds, contents: &Contents) -> Result<Credentials, FileError> {
    let [cert, key, bundle] = contents;
    let bytes = |path: &Path, read: &Result<Vec<u8>, String>| match read {
        Ok(bytes) => Ok(bytes.clone()),
        Err(reason) => Err(err(path, reason.clone())),
    };
    let chain = certs_from_pem(&files.cert, &bytes(&files.cert, cert)?)?;
    let key = key_from_pem(&files.key, &bytes(&files.key, key)?)?;
    let roots = certs_from_pem(&files.bundle, &bytes(&files.bundle, bundle)?)?;
    Ok(Credentials {
        chain,
        key,
        roots,
        pinned: Vec::new(),
    })
}

fn key_from_pem(path: &Path, pem: &[u8]) -> Result<PrivateKeyDer<'static>, FileError> {
    // The parser's error is not repeated: it could quote the file.
    PrivateKeyDer::from_pem_slice(pem).map_err(|_| err(path, "no PEM private key in the file"))
}

/// Keeps the credential store in step with the files until dropped; dropping it stops the watch
/// thread and waits for it.
pub struct CredWatcher {
    files: FileCreds,
    watcher: DirWatcher,
}

/// Watches the three files; publishes a new set only when cert, key and bundle are consistent.
///
/// Call it once the first set from `files` is in `store`. Every later set is counted in
/// `credential_updates{result="applied"|"rejected"}`. Errors only if the watch thread cannot start;
/// a directory that cannot be watched is left to the periodic re-read (with a warning).
pub fn watch_credential_files(
    files: FileCreds,
    store: Arc<CredentialStore>,
    metrics: Metrics,
) -> Result<CredWatcher, FileError> {
    watch_with_timing(files, store, metrics, CRED_TIMING)
}

/// A writer replaces three files one after another: wait a little longer for them to go quiet.
const CRED_TIMING: Timing = Timing {
    quiet: Duration::from_millis(150),
    max_delay: Duration::from_secs(1),
    poll: Duration::from_secs(2),
};

fn watch_with_timing(
    files: FileCreds,
    store: Arc<CredentialStore>,
    metrics: Metrics,
    timing: Timing,
) -> Result<CredWatcher, FileError> {
    let mut tracker = Tracker {
        files: files.clone(),
        store,
        metrics,
        last: None,
    };
    // Watch first, then read: a change in between is seen either by the read or as an event.
    let paths = [
        files.cert.as_path(),
        files.key.as_path(),
        files.bundle.as_path(),
    ];
    let watcher = DirWatcher::spawn(
        "cred-watch",
        "credential files",
        &paths,
        timing,
        true,
        move |_| tracker.check(),
    )
    .map_err(|e| err(&files.cert, format!("cannot start the watch thread: {e}")))?;
    Ok(CredWatcher { files, watcher })
}

/// The bytes of the three files as read at one moment, or why one could not be read.
type Contents = [Result<Vec<u8>, String>; 3];

/// What is remembered of the files between two looks: each one's SHA-256, or why it could not be
/// read. Not their bytes: the key's would stay in memory a second time for the sidecar's life.
type Seen = [Result<[u8; 32], String>; 3];

fn seen(contents: &Contents) -> Seen {
    contents.each_ref().map(|c| {
        c.as_ref().map_err(Clone::clone).map(|bytes| {
            let mut d = [0u8; 32];
            d.copy_from_slice(
                aws_lc_rs::digest::digest(&aws_lc_rs::digest::SHA256, bytes).as_ref(),
            );
            d
        })
    })
}

/// Remembers what the files held at the last look, so that only a change is parsed, applied or
/// logged.
struct Tracker {
    files: FileCreds,
    store: Arc<CredentialStore>,
    metrics: Metrics,
    last: Option<Seen>,
}

impl Tracker {
    fn read(&self) -> Contents {
        read_together(&self.files)
    }

    /// Parses exactly the bytes that were compared (a second read could see another write).
    fn parse(&self, contents: &Contents) -> Result<Credentials, FileError> {
        parse(&self.files, contents)
    }

    /// Whether the store already holds exactly `creds` (the set loaded before watching began).
    fn held(&self, creds: &Credentials) -> bool {
        let same_key = |key: &PrivateKeyDer<'_>| key.secret_der() == creds.key.secret_der();
        self.store
            .chain_and_key()
            .is_some_and(|(chain, key)| chain == creds.chain && same_key(&key))
            && self.store.roots() == creds.roots
    }

    /// Re-reads the files and applies them if they changed.
    fn check(&mut self) {
        let contents = self.read();
        let now = seen(&contents);
        if self.last.as_ref() == Some(&now) {
            return;
        }
        let first = self.last.is_none();
        let parsed = self.parse(&contents);
        drop(contents);
        self.last = Some(now);
        let creds = match parsed {
            Ok(creds) if first && self.held(&creds) => return,
            Ok(creds) => creds,
            Err(error) => return self.rejected(&error),
        };
        match self.store.set_certificate(creds) {
            Ok(snapshot) => {
                self.count("applied");
                self.metrics.credentials_rejected.set(0);
                self.metrics.record_snapshot(&snapshot);
                let identity = &snapshot.identity;
                tracing::info!(
                    id = %identity.id,
                    serial = %identity.serial_hex,
                    not_after = identity.not_after,
                    "certificate files applied"
                );
            }
            Err(error) => self.rejected(&error),
        }
    }

    fn rejected(&self, error: &dyn std::error::Error) {
        self.count("rejected");
        self.metrics.credentials_rejected.set(1);
        tracing::error!(
            %error,
            cert = %self.files.cert.display(),
            "certificate files rejected, keeping the last good certificate"
        );
    }

    fn count(&self, result: &'static str) {
        self.metrics
            .credential_updates
            .get_or_create(&ResultLabels { result })
            .inc();
    }
}

impl std::fmt::Debug for CredWatcher {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CredWatcher")
            .field("files", &self.files)
            .field("inotify", &self.watcher.inotify())
            .finish_non_exhaustive()
    }
}

#[cfg(test)]
mod tests {
    use std::fs;
    use std::thread;
    use std::time::Instant;

    use super::*;

    fn files(dir: &Path) -> FileCreds {
        FileCreds {
            cert: dir.join("tls.crt"),
            key: dir.join("tls.key"),
            bundle: dir.join("ca.crt"),
        }
    }

    fn updates(metrics: &Metrics, result: &'static str) -> u64 {
        metrics
            .credential_updates
            .get_or_create(&ResultLabels { result })
            .get()
    }

    fn wait_for(what: &str, done: impl Fn() -> bool) {
        let deadline = Instant::now() + Duration::from_secs(10);
        while !done() {
            assert!(Instant::now() < deadline, "timed out waiting for {what}");
            thread::sleep(Duration::from_millis(20));
        }
    }

    const FAST: Timing = Timing {
        quiet: Duration::from_millis(50),
        max_delay: Duration::from_millis(500),
        poll: Duration::from_secs(3600),
    };

    #[test]
    fn file_mode_garbage_is_rejected_once_and_reported_by_path() {
        let dir = tempfile::tempdir().unwrap();
        let files = files(dir.path());
        for path in [&files.cert, &files.key, &files.bundle] {
            fs::write(path, "garbage").unwrap();
        }
        let store = Arc::new(CredentialStore::new(Vec::new()));
        let metrics = Metrics::default();
        let watcher =
            watch_with_timing(files.clone(), store.clone(), metrics.clone(), FAST).unwrap();
        assert!(watcher.watcher.inotify(), "inotify is not available");
        assert_eq!(updates(&metrics, "rejected"), 1);
        assert_eq!(metrics.credentials_rejected.get(), 1);
        fs::write(&files.key, "more garbage").unwrap();
        wait_for("a second rejection", || updates(&metrics, "rejected") == 2);
        assert!(store.current().is_none());
        assert_eq!(updates(&metrics, "applied"), 0);

        let tracker = Tracker {
            files: files.clone(),
            store,
            metrics,
            last: None,
        };
        let error = tracker.parse(&tracker.read()).err().unwrap().to_string();
        assert!(
            error.contains("tls.crt: no certificate in the file"),
            "{error}"
        );
        fs::remove_file(&files.cert).unwrap();
        let error = tracker.parse(&tracker.read()).err().unwrap().to_string();
        assert!(error.contains("tls.crt: No such file"), "{error}");
    }

    #[test]
    fn file_mode_dropping_the_watcher_stops_it() {
        let dir = tempfile::tempdir().unwrap();
        let files = files(dir.path());
        let metrics = Metrics::default();
        let store = Arc::new(CredentialStore::new(Vec::new()));
        let poll_often = Timing {
            poll: Duration::from_millis(10),
            ..FAST
        };
        let watcher = watch_with_timing(files.clone(), store, metrics.clone(), poll_often).unwrap();
        drop(watcher); // joins the thread
        let before = updates(&metrics, "rejected");
        fs::write(&files.cert, "garbage").unwrap();
        thread::sleep(Duration::from_millis(200));
        assert_eq!(updates(&metrics, "rejected"), before);
    }
}
