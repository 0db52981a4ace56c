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
//! and the last good one keeps serving; a later consistent set is applied. A set refused only for
//! the moment (a certificate not valid yet: the rotator's clock runs ahead of this node's) is
//! tried again at every periodic re-read, logged once, and applied as soon as it is valid. A
//! periodic re-read covers whatever inotify misses. Each file is read only if it is a regular
//! file of at most [`MAX_FILE_BYTES`] ([`meshid_runtime::file::read_regular`]): a FIFO or a device
//! in its place is refused at once, never waited on or read without end.

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};

use super::store::{CredentialStore, Credentials};
use crate::metrics::{Metrics, ResultLabels};
use crate::settings::FileCreds;
use crate::watch::{DirWatcher, Timing};

/// The most bytes read of one credential file (a certificate chain, a key, a trust bundle): far
/// above any real one, so that a file that never ends is refused rather than read.
pub const MAX_FILE_BYTES: u64 = 1 << 20;

/// Why the credential files could not be read. Names the file.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct FileError(String);

fn err(path: &Path, reason: impl std::fmt::Display) -> FileError {
    FileError(format!("{}: {reason}", path.display()))
}

fn read(path: &Path) -> Result<Vec<u8>, FileError> {
    // The error names the path.
    meshid_runtime::file::read_regular(path, MAX_FILE_BYTES).map_err(|e| FileError(e.to_string()))
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
/// ([`meshid_runtime::volume`]: `..data` resolved once), or why one could not be read (naming it).
fn read_together(files: &FileCreds) -> Contents {
    let paths = [&files.cert, &files.key, &files.bundle].map(|p| p.as_path());
    let mut read = meshid_runtime::volume::read_one_version(&paths, MAX_FILE_BYTES).into_iter();
    paths.map(|path| {
        read.next()
            .unwrap_or_else(|| Err(format!("{}: not read", path.display())))
    })
}

/// Parses the three files' bytes into one credential set (validated later by the store).
fn parse(files: &FileCreds, contents: &Contents) -> Result<Credentials, FileError> {
    let [cert, key, bundle] = contents;
    // A read error names its file.
    let bytes = |read: &Result<Vec<u8>, String>| read.clone().map_err(FileError);
    let chain = certs_from_pem(&files.cert, &bytes(cert)?)?;
    let key = key_from_pem(&files.key, &bytes(key)?)?;
    let roots = certs_from_pem(&files.bundle, &bytes(bundle)?)?;
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
        again: false,
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
/// logged (and a set refused only for the moment is tried again).
struct Tracker {
    files: FileCreds,
    store: Arc<CredentialStore>,
    metrics: Metrics,
    last: Option<Seen>,
    /// The files of the last look were refused only for the moment
    /// ([`super::CredError::may_pass_later`]): they are tried again at every look until they pass
    /// or change.
    again: bool,
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

    /// Re-reads the files and applies them if they changed, or if they were refused only for the
    /// moment. A set is counted and logged once, however often it is tried.
    fn check(&mut self) {
        let contents = self.read();
        let now = seen(&contents);
        let changed = self.last.as_ref() != Some(&now);
        if !changed && !self.again {
            return;
        }
        let first = self.last.is_none();
        let parsed = self.parse(&contents);
        drop(contents);
        self.last = Some(now);
        self.again = false;
        let creds = match parsed {
            Ok(creds) if first && self.held(&creds) => return,
            Ok(creds) => creds,
            Err(error) => return self.rejected(&error, changed),
        };
        match self.store.set_certificate(creds) {
            Err(error) if error.may_pass_later() => {
                self.again = true;
                if changed {
                    self.count("rejected");
                    self.metrics.credentials_rejected.set(1);
                    tracing::warn!(
                        %error,
                        cert = %self.files.cert.display(),
                        "certificate files not valid yet, keeping the last good certificate and \
                         trying them again at every poll"
                    );
                }
            }
            Err(error) => self.rejected(&error, changed),
            Ok(snapshot) => {
                self.count("applied");
                self.metrics.credentials_rejected.set(0);
                self.metrics.record_file_certificate(&snapshot);
                let identity = &snapshot.identity;
                tracing::info!(
                    id = %identity.id,
                    serial = %identity.serial_hex,
                    not_after = identity.not_after,
                    "certificate files applied"
                );
            }
        }
    }

    /// Logs a refusal; counts it if the files changed (not when a set tried again is refused).
    fn rejected(&self, error: &dyn std::error::Error, changed: bool) {
        if changed {
            self.count("rejected");
        }
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

    use meshid_identity::cert_identity_from_der;
    use meshid_identity::pem::{pem_block, pem_cert};
    use meshid_identity::testing::{LeafShape, TestLeaf, TestPki};

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

    const ME: &str = "spiffe://cluster.local/ns/shop/sa/payments";

    /// Writes `leaf` and its key into `files`, with `pki`'s root as the bundle.
    fn write_set(files: &FileCreds, pki: &TestPki, leaf: &TestLeaf) {
        let chain: String = leaf.chain.iter().map(|c| pem_cert(c)).collect();
        fs::write(&files.cert, chain).unwrap();
        fs::write(&files.key, pem_block("PRIVATE KEY", leaf.key.secret_der())).unwrap();
        fs::write(&files.bundle, pem_cert(&pki.root)).unwrap();
    }

    /// A store serving the set in `files` (as `run` loads it), and a tracker of the files.
    fn loaded(files: &FileCreds) -> (Arc<CredentialStore>, Metrics, Tracker) {
        let store = Arc::new(CredentialStore::new(Vec::new()));
        store.set_certificate(load(files).unwrap()).unwrap();
        let metrics = Metrics::default();
        let tracker = Tracker {
            files: files.clone(),
            store: store.clone(),
            metrics: metrics.clone(),
            last: None,
            again: false,
        };
        (store, metrics, tracker)
    }

    fn serial(store: &CredentialStore) -> String {
        store.current().unwrap().identity.serial_hex.clone()
    }

    /// A rotator whose clock runs ahead of ours writes a set valid in a few seconds: refused for
    /// now, counted and logged once however often it is tried, applied once valid.
    #[test]
    fn file_mode_a_set_not_valid_yet_is_tried_again_and_applied_once_valid() {
        use meshid_runtime::time::unix_now;

        let dir = tempfile::tempdir().unwrap();
        let files = files(dir.path());
        let pki = TestPki::new("ours");
        let first = pki.leaf(ME);
        write_set(&files, &pki, &first);
        let (store, metrics, mut tracker) = loaded(&files);
        tracker.check();
        let old = serial(&store);

        // 5 s ahead (4 s at least once cut to whole seconds): room for a loaded machine.
        let soon = LeafShape {
            valid: Some((time::Duration::seconds(5), time::Duration::hours(1))),
            ..LeafShape::default()
        };
        let next = pki.leaf_shaped(ME, &soon);
        let identity = cert_identity_from_der(&next.chain[0]).unwrap();
        let (new, valid_from) = (identity.serial_hex, identity.not_before);
        write_set(&files, &pki, &next);
        tracker.check();
        // Still before not-before after the check, so the check was too: it must have refused.
        // Past it (a machine stalled for seconds), the set may rightly have been applied at once,
        // and there is no refusal to see.
        let refused = unix_now() < valid_from;
        if refused {
            assert_eq!(updates(&metrics, "rejected"), 1);
            assert_eq!(metrics.credentials_rejected.get(), 1);
            assert_eq!(serial(&store), old, "the last good set serves");
        } else {
            eprintln!("not-before passed before the first check: its refusal is not checked");
        }

        // Applied within 10 s of not-before, however late the test got there.
        while serial(&store) != new {
            assert!(unix_now() < valid_from + 10, "never applied");
            assert_eq!(updates(&metrics, "rejected"), 1, "counted once");
            thread::sleep(Duration::from_millis(100));
            tracker.check();
        }
        assert_eq!(updates(&metrics, "rejected"), u64::from(refused));
        assert_eq!(updates(&metrics, "applied"), 1);
        assert_eq!(metrics.credentials_rejected.get(), 0);
        // Applied: not tried again.
        tracker.check();
        assert_eq!(updates(&metrics, "applied"), 1);
    }

    /// A FIFO in place of the key (no writer: a blocking open would wait for ever, and dropping
    /// the watcher would wait for its thread) and a link to /dev/zero in place of the bundle: each
    /// is refused by name at once, and the last good set keeps serving.
    #[test]
    fn file_mode_a_fifo_or_a_device_in_place_of_a_file_is_refused_and_the_set_kept() {
        let dir = tempfile::tempdir().unwrap();
        let files = files(dir.path());
        let pki = TestPki::new("ours");
        write_set(&files, &pki, &pki.leaf(ME));
        let (store, metrics, _) = loaded(&files);
        let old = serial(&store);
        let watcher =
            watch_with_timing(files.clone(), store.clone(), metrics.clone(), FAST).unwrap();
        assert!(watcher.watcher.inotify(), "inotify is not available");
        let key = fs::read(&files.key).unwrap();
        let within = |done: &dyn Fn() -> bool| {
            let deadline = Instant::now() + Duration::from_secs(5);
            while !done() && Instant::now() < deadline {
                thread::sleep(Duration::from_millis(20));
            }
            done()
        };

        fs::remove_file(&files.key).unwrap();
        let made = std::process::Command::new("mkfifo")
            .arg(&files.key)
            .status();
        assert!(made.is_ok_and(|s| s.success()), "mkfifo");
        if !within(&|| updates(&metrics, "rejected") == 1) {
            // The watch thread is stuck in the FIFO: dropping the watcher would join it.
            std::mem::forget(watcher);
            panic!("the FIFO was never refused");
        }
        assert_eq!(metrics.credentials_rejected.get(), 1);
        assert_eq!(serial(&store), old);
        let error = parse(&files, &read_together(&files)).err().unwrap();
        assert!(
            error.to_string().ends_with("tls.key: not a regular file"),
            "{error}"
        );

        // The key back: the watch went on.
        fs::remove_file(&files.key).unwrap();
        fs::write(&files.key, &key).unwrap();
        wait_for("the set applied again", || {
            updates(&metrics, "applied") == 1
        });

        std::os::unix::fs::symlink("/dev/zero", files.bundle.with_extension("zero")).unwrap();
        fs::rename(files.bundle.with_extension("zero"), &files.bundle).unwrap();
        if !within(&|| updates(&metrics, "rejected") == 2) {
            std::mem::forget(watcher);
            panic!("/dev/zero was never refused");
        }
        assert_eq!(serial(&store), old);
        let error = parse(&files, &read_together(&files)).err().unwrap();
        assert!(
            error.to_string().ends_with("ca.crt: not a regular file"),
            "{error}"
        );
        drop(watcher);
    }

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
            again: false,
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
