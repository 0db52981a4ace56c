//! The CA directory's files as the authority and the rotation state both read them: the error that
//! names the file involved, the trust bundle, an authority's file names, and atomic writes.

use std::fs;
use std::io::Write;
use std::path::{Path, PathBuf};

use rustls_pki_types::CertificateDer;
use rustls_pki_types::pem::PemObject;
use x509_parser::prelude::{FromDer, X509Certificate};

/// Errors reading or writing the CA directory. Each names the file involved.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum AuthorityError {
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{0}: a CA already exists here; refusing to overwrite it")]
    AlreadyExists(PathBuf),
    #[error(
        "{dir}: an incomplete CA: {found} is here but not ca.json, which `meshid-ca init` \
         writes last (an init cut short?): remove the directory and run `meshid-ca init` again \
         (if this directory did serve, put its ca.json back from a copy instead)"
    )]
    Incomplete { dir: PathBuf, found: String },
    #[error("{path}: {reason}")]
    Invalid { path: PathBuf, reason: String },
    #[error("generating CA material: {0}")]
    Generate(#[from] rcgen::Error),
    #[error(
        "{0}: another meshid-ca command is changing the CA directory (it holds this lock); try \
         again once it is done"
    )]
    Locked(PathBuf),
}

/// The lock file every admin command that writes the CA directory holds (an exclusive file lock)
/// from reading what it changes to writing it: `rotate prepare`, `activate`, `retire` and
/// `intermediate`, `revoke` and `unrevoke`. Without it two of them (a rotation and a revocation,
/// both rewriting `authorities.json`) could each write over the other's change. Hidden, so
/// `meshid-ca secret` leaves it out.
pub const LOCK_FILE: &str = ".meshid-ca.lock";
/// How long a command waits for another to finish before it refuses.
const LOCK_WAIT: std::time::Duration = std::time::Duration::from_secs(30);

/// The CA directory's lock, held until dropped.
#[derive(Debug)]
pub struct DirLock {
    _file: fs::File,
}

impl DirLock {
    /// Takes the lock of `dir`, waiting up to 30 s for a command that holds it.
    pub fn acquire(dir: &Path) -> Result<Self, AuthorityError> {
        Self::acquire_within(dir, LOCK_WAIT)
    }

    /// Takes the lock of `dir`, waiting up to `wait` for a command that holds it.
    pub fn acquire_within(dir: &Path, wait: std::time::Duration) -> Result<Self, AuthorityError> {
        let path = dir.join(LOCK_FILE);
        let file = fs::OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(&path)
            .map_err(io_err(&path))?;
        let deadline = std::time::Instant::now() + wait;
        let mut told = false;
        loop {
            match file.try_lock() {
                Ok(()) => return Ok(Self { _file: file }),
                Err(fs::TryLockError::WouldBlock) => {}
                Err(fs::TryLockError::Error(e)) => return Err(io_err(&path)(e)),
            }
            if std::time::Instant::now() >= deadline {
                return Err(AuthorityError::Locked(path));
            }
            if !told {
                tracing::warn!(
                    lock = %path.display(),
                    "another meshid-ca command is changing the CA directory: waiting for it"
                );
                told = true;
            }
            std::thread::sleep(std::time::Duration::from_millis(50));
        }
    }
}

/// The directory to read the CA's files from: for a Kubernetes Secret volume (kubelet keeps the
/// files in a timestamped directory and swaps the `..data` symlink to a new one on every update),
/// that directory itself, so one load reads one version of the Secret whole, never a mix of the
/// files before and after an update; otherwise `dir`.
pub fn snapshot(dir: &Path) -> PathBuf {
    match fs::canonicalize(dir.join("..data")) {
        Ok(resolved) if resolved.is_dir() => resolved,
        _ => dir.to_owned(),
    }
}

pub(crate) fn io_err(path: &Path) -> impl FnOnce(std::io::Error) -> AuthorityError + '_ {
    move |source| AuthorityError::Io {
        path: path.to_owned(),
        source,
    }
}

pub(crate) fn invalid(path: &Path, reason: impl Into<String>) -> AuthorityError {
    AuthorityError::Invalid {
        path: path.to_owned(),
        reason: reason.into(),
    }
}

/// The largest file of the CA directory read (but `revocations.json`, which has its own bound): a
/// PEM file, `ca.json` or `authorities.json` is a few KiB; a bundle of many roots stays far below.
pub const MAX_CA_FILE: u64 = 1 << 20;

/// The bytes of `path`, a regular file of at most `max` bytes: a FIFO, a device or a directory in
/// its place is refused at once (never waited on, never read for ever), as is a larger file. The
/// error keeps its kind (a missing file is `NotFound`) and names no path: the caller's
/// [`io_err`] does.
pub(crate) fn read_file(path: &Path, max: u64) -> std::io::Result<Vec<u8>> {
    meshid_runtime::file::read_regular(path, max).map_err(|e| {
        let named = e.to_string();
        match named.strip_prefix(&format!("{}: ", path.display())) {
            Some(why) => std::io::Error::new(e.kind(), why.to_owned()),
            None => e,
        }
    })
}

/// Reads a PEM bundle of CA certificates (at least one).
pub fn read_bundle(path: &Path) -> Result<Vec<CertificateDer<'static>>, AuthorityError> {
    let pem = read_file(path, MAX_CA_FILE).map_err(io_err(path))?;
    let roots = CertificateDer::pem_slice_iter(&pem)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| invalid(path, format!("not a PEM bundle: {e}")))?;
    if roots.is_empty() {
        return Err(invalid(path, "the bundle holds no certificate"));
    }
    for root in &roots {
        check_is_ca(root).map_err(|r| invalid(path, r))?;
    }
    Ok(roots)
}

pub(crate) fn check_is_ca(der: &[u8]) -> Result<(), String> {
    let (_, cert) =
        X509Certificate::from_der(der).map_err(|e| format!("not an X.509 certificate: {e}"))?;
    if !cert.is_ca() {
        return Err("not a CA certificate (basicConstraints CA:TRUE is missing)".into());
    }
    Ok(())
}

/// An authority's files: `<dir>/<prefix><name>`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AuthorityFiles {
    pub dir: PathBuf,
    pub prefix: String,
}

impl AuthorityFiles {
    /// The files of an authority with no prefix in `dir` (what `meshid-ca init` writes).
    pub fn plain(dir: &Path) -> Self {
        Self {
            dir: dir.to_owned(),
            prefix: String::new(),
        }
    }

    pub fn path(&self, name: &str) -> PathBuf {
        self.dir.join(format!("{}{name}", self.prefix))
    }
}

/// Renames `from` to `to` and then syncs the directory holding `to`, so the rename survives a
/// power loss (syncing the file alone does not make its new name durable): every rename in the
/// CA directory goes through here. An error from the sync comes after the rename: the caller
/// decides whether to undo it.
pub fn rename_synced(from: &Path, to: &Path) -> std::io::Result<()> {
    fs::rename(from, to)?;
    sync_dir_of(to)
}

/// Syncs (fsync) the directory that holds `path`: its entries, as a rename or a new file left
/// them.
pub fn sync_dir_of(path: &Path) -> std::io::Result<()> {
    let dir = match path.parent() {
        Some(d) if !d.as_os_str().is_empty() => d,
        _ => Path::new("."),
    };
    let synced = fs::File::open(dir).and_then(|d| d.sync_all());
    #[cfg(test)]
    if synced.is_ok() {
        synced_dirs::record(dir);
    }
    synced
}

/// The directories [`sync_dir_of`] synced on this thread (tests only).
#[cfg(test)]
pub(crate) mod synced_dirs {
    use std::cell::RefCell;
    use std::path::{Path, PathBuf};

    thread_local!(static SYNCED: RefCell<Vec<PathBuf>> = const { RefCell::new(Vec::new()) });

    pub(super) fn record(dir: &Path) {
        SYNCED.with(|s| s.borrow_mut().push(dir.to_owned()));
    }

    /// Takes the list (so the next call sees only later syncs).
    pub(crate) fn take() -> Vec<PathBuf> {
        SYNCED.with(|s| std::mem::take(&mut *s.borrow_mut()))
    }
}

/// What the tests of readers put in place of a file (tests only).
#[cfg(test)]
pub(crate) mod hostile_files {
    use std::path::Path;
    use std::time::Duration;

    /// A FIFO with no writer at `path`: a blocking `open` of it waits for ever.
    pub(crate) fn fifo(path: &Path) {
        let made = std::process::Command::new("mkfifo")
            .arg(path)
            .status()
            .unwrap();
        assert!(made.success(), "mkfifo {}", path.display());
    }

    /// A symlink at `path` to `/dev/zero`, which a read to the end never finishes.
    pub(crate) fn endless(path: &Path) {
        std::os::unix::fs::symlink("/dev/zero", path).unwrap();
    }

    /// `f`'s result, which must come within 10 s (on another thread, left blocked if it hangs).
    pub(crate) fn within<T: Send + 'static>(
        what: &str,
        f: impl FnOnce() -> T + Send + 'static,
    ) -> T {
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            let _ = tx.send(f());
        });
        rx.recv_timeout(Duration::from_secs(10))
            .unwrap_or_else(|_| panic!("{what}: no answer within 10 s (blocked on the file?)"))
    }
}

/// Writes a file by renaming a fully written temporary file over it, then syncs the directory
/// ([`rename_synced`]). On failure (a full or read-only directory) the file is as it was and no
/// temporary file is left behind, unless the directory's sync failed after the rename: then the
/// new content is in place but may not survive a power loss, and the error says so.
/// How long a temporary file of a write may exist before it is taken for one a killed process
/// left behind (writes are a few KiB, done in milliseconds).
pub const LEFTOVER_AFTER: std::time::Duration = std::time::Duration::from_secs(60);

/// Whether `path` is a temporary file of an atomic write (`NAME.tmpPID`, `.NAME.tmp`) older than
/// [`LEFTOVER_AFTER`] at `now`: one a process killed mid-write left, which nothing else removes.
pub fn is_leftover_temp(path: &Path, now: std::time::SystemTime) -> bool {
    let Some(name) = path.file_name().and_then(|n| n.to_str()) else {
        return false;
    };
    let temp = name.ends_with(".tmp")
        || name
            .rsplit_once(".tmp")
            .is_some_and(|(_, pid)| !pid.is_empty() && pid.bytes().all(|b| b.is_ascii_digit()));
    temp && fs::symlink_metadata(path)
        .and_then(|m| m.modified())
        .is_ok_and(|t| now.duration_since(t).unwrap_or_default() > LEFTOVER_AFTER)
}

pub fn write_atomic(path: &Path, bytes: &[u8]) -> Result<(), AuthorityError> {
    let tmp = path.with_extension(format!("tmp{}", std::process::id()));
    let io = |source| AuthorityError::Io {
        path: path.to_owned(),
        source,
    };
    let written = fs::File::create(&tmp).and_then(|mut f| {
        f.write_all(bytes)?;
        f.sync_all()?;
        rename_synced(&tmp, path)
    });
    if written.is_err() {
        let _ = fs::remove_file(&tmp);
    }
    written.map_err(io)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_old_temporary_files_are_leftovers() {
        let dir = tempfile::tempdir().unwrap();
        let now = std::time::SystemTime::now();
        let old = now - LEFTOVER_AFTER - std::time::Duration::from_secs(1);
        for (name, aged, leftover) in [
            ("x.tmp42", true, true),
            (".f00.tmp", true, true),
            ("x.tmp42", false, false),
            ("x.json", true, false),
            ("x.tmpl", true, false),
            ("tmp", true, false),
        ] {
            let path = dir.path().join(name);
            fs::write(&path, "partial").unwrap();
            if aged {
                fs::File::options()
                    .write(true)
                    .open(&path)
                    .unwrap()
                    .set_modified(old)
                    .unwrap();
            }
            assert_eq!(is_leftover_temp(&path, now), leftover, "{name} aged={aged}");
            fs::remove_file(&path).unwrap();
        }
    }

    #[test]
    fn a_second_writer_waits_for_the_lock_and_is_refused_past_its_wait() {
        use std::time::{Duration, Instant};
        let dir = tempfile::tempdir().unwrap();
        let held = DirLock::acquire(dir.path()).unwrap();
        let err = DirLock::acquire_within(dir.path(), Duration::from_millis(200)).unwrap_err();
        assert!(matches!(err, AuthorityError::Locked(_)), "{err}");
        assert!(err.to_string().contains(LOCK_FILE), "{err}");
        // A command that writes the directory waits until the holder is done, then runs.
        let td = meshid_identity::TrustDomain::new("td").unwrap();
        crate::authority::init(dir.path(), &td, None).unwrap();
        let started = Instant::now();
        let release = std::thread::spawn(move || {
            std::thread::sleep(Duration::from_millis(400));
            drop(held);
        });
        crate::revocations::Revocations::update(dir.path(), |list| {
            let id = meshid_identity::SpiffeId::parse("spiffe://td/ns/a/sa/b").unwrap();
            list.revoke(
                meshid_identity::revocation::Revoked::Id(id),
                1,
                60,
                String::new(),
            )
        })
        .unwrap();
        assert!(started.elapsed() >= Duration::from_millis(400));
        release.join().unwrap();
        let held = DirLock::acquire(dir.path()).unwrap();
        let started = Instant::now();
        let release = std::thread::spawn(move || {
            std::thread::sleep(Duration::from_millis(400));
            drop(held);
        });
        crate::rotation::prepare(dir.path(), None).unwrap();
        assert!(started.elapsed() >= Duration::from_millis(400));
        release.join().unwrap();
    }

    #[test]
    fn a_failed_write_leaves_the_file_as_it_was_and_nothing_else() {
        let dir = tempfile::tempdir().unwrap();
        // A non-empty directory in the file's place fails the rename, as a full or read-only
        // directory fails a write (also for root).
        let target = dir.path().join("bundle.pem");
        fs::create_dir(&target).unwrap();
        fs::write(target.join("in-the-way"), "x").unwrap();
        assert!(write_atomic(&target, b"new").is_err());
        let names: Vec<_> = fs::read_dir(dir.path())
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        assert_eq!(names, vec![std::ffi::OsString::from("bundle.pem")]);
        assert_eq!(
            synced_dirs::take(),
            Vec::<PathBuf>::new(),
            "no rename, no sync"
        );
    }

    /// Every rename in the CA directory syncs the directory after it. What this shows: the
    /// writers call the sync of the right directory, after the rename, and its errors come back.
    /// What it cannot show: that the data reach the disk (no power is cut here; strace shows the
    /// fsync of the directory after the rename).
    #[test]
    fn renames_sync_the_directory_and_its_errors_come_back() {
        let dir = tempfile::tempdir().unwrap();
        synced_dirs::take();
        let path = dir.path().join("some.file");
        write_atomic(&path, b"one").unwrap();
        assert_eq!(fs::read(&path).unwrap(), b"one");
        assert_eq!(synced_dirs::take(), vec![dir.path().to_owned()]);

        // The revocation commands (through write_atomic) and the authority writer.
        crate::authority::init(
            dir.path(),
            &meshid_identity::TrustDomain::new("td").unwrap(),
            None,
        )
        .unwrap();
        synced_dirs::take();
        crate::revocations::Revocations::update(dir.path(), |list| {
            let id = meshid_identity::SpiffeId::parse("spiffe://td/ns/a/sa/b").unwrap();
            list.revoke(
                meshid_identity::revocation::Revoked::Id(id),
                1,
                60,
                String::new(),
            )
        })
        .unwrap();
        // The list, then authorities.json.
        assert_eq!(synced_dirs::take().len(), 2);
        crate::rotation::prepare(dir.path(), None).unwrap();
        let synced = synced_dirs::take();
        assert!(!synced.is_empty() && synced.iter().all(|d| d == dir.path()));

        // `webhook-cert --force`: one sync of its directory, after both renames.
        let out = dir.path().join("webhook");
        let pair = crate::webhook_cert::WebhookCert {
            chain_pem: "cert".into(),
            key_pem: "key".into(),
            not_after: time::OffsetDateTime::UNIX_EPOCH,
        };
        crate::webhook_cert::write_pair(&out, &pair, false).unwrap();
        assert_eq!(synced_dirs::take(), vec![out.clone()]);
        crate::webhook_cert::write_pair(&out, &pair, true).unwrap();
        assert_eq!(synced_dirs::take(), vec![out.clone()]);

        // A rename that fails syncs nothing and says why; a directory that cannot be synced is an
        // error, not a success.
        let missing = dir.path().join("nowhere");
        assert!(rename_synced(&missing, &dir.path().join("x")).is_err());
        assert_eq!(synced_dirs::take(), Vec::<PathBuf>::new());
        let err = sync_dir_of(&missing.join("file")).unwrap_err();
        assert_eq!(err.kind(), std::io::ErrorKind::NotFound);
    }
}
