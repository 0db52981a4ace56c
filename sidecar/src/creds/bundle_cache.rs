//! The trust bundle last received from the CA, kept in a file (`--bundle-cache`) that outlives the
//! sidecar's process, so that a sidecar restarted after a CA rotation can still reach the CA.
//!
//! A sidecar trusts the CA's serving certificate through the roots it was configured with
//! (`--ca-bundle`, or the PEM the injector wrote into the pod when it was created) and the roots of
//! the bundle it has received since. After `rotate activate` the CA serves a certificate of the new
//! root, which a pod created before `rotate prepare` was never configured with: restarted (its
//! container killed, a liveness probe failed), its sidecar knew only the old root and could not
//! get a certificate until the pod was recreated. With the cache on a volume that outlives the
//! container (the injector mounts an `emptyDir`), the restarted sidecar trusts the roots it last
//! received as well.
//!
//! The file holds only roots the sidecar received over its authenticated bundle stream (or an
//! Issue response), followed by the issuing intermediates trust under a shared root is pinned to
//! (see `creds::ca_client`), written whole (a temporary file renamed over it). It is read once, at start;
//! what cannot be read or parsed is ignored with a warning: the configured roots still apply.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use rustls::pki_types::CertificateDer;
use rustls::pki_types::pem::PemObject;
use tokio::sync::watch;

use super::CredentialStore;

/// The largest cache file read: a bundle of a few roots is a few KiB.
const MAX_BYTES: u64 = 1 << 20;

/// What a cache file holds: the roots, and the intermediates trust under a shared root is pinned
/// to (written after a marker line, so that they are never taken for roots).
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Cached {
    pub roots: Vec<CertificateDer<'static>>,
    pub pinned: Vec<CertificateDer<'static>>,
}

/// The line between the roots and the pinned intermediates in a cache file.
const PINNED_MARKER: &str =
    "# meshid: the certificates below are pinned intermediates, not roots\n";

/// The cache file at `path` (nothing if it is absent, too large or not PEM certificates).
pub fn load(path: &Path) -> Cached {
    // A regular file only (a FIFO put there would block the start for ever), to the bound.
    let pem = match meshid_runtime::file::read_regular(path, MAX_BYTES) {
        Ok(pem) => pem,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Cached::default(),
        Err(error) => {
            tracing::warn!(%error, path = %path.display(), "trust bundle cache not read; using the configured CA roots alone");
            return Cached::default();
        }
    };
    let marker = PINNED_MARKER.as_bytes();
    let (roots, pinned) = match memchr::memmem::find(&pem, marker) {
        Some(at) => (&pem[..at], Some(&pem[at + marker.len()..])),
        None => (&pem[..], None),
    };
    let read = parse(roots).and_then(|roots| match pinned {
        None => Ok(Cached {
            roots,
            pinned: Vec::new(),
        }),
        Some(pinned) => parse(pinned).map(|pinned| Cached { roots, pinned }),
    });
    match read {
        Ok(cached) => cached,
        Err(problem) => {
            tracing::warn!(path = %path.display(), "trust bundle cache {problem}; using the configured CA roots alone");
            Cached::default()
        }
    }
}

/// The roots in a cache file's bytes, or what is wrong with them. A file that is there holds at
/// least one root ([`save`] never writes none): an empty one was cut short (a crash before its
/// data reached the disk), which is said rather than read as "no roots".
fn parse(pem: &[u8]) -> Result<Vec<CertificateDer<'static>>, String> {
    match CertificateDer::pem_slice_iter(pem).collect::<Result<Vec<_>, _>>() {
        Ok(roots) if roots.is_empty() => Err("holds no certificate (cut short?)".into()),
        Ok(roots) => Ok(roots),
        Err(error) => Err(format!("is not PEM certificates: {error}")),
    }
}

/// Writes `roots`, then `pinned` after the marker line, to `path` whole and durably: a temporary
/// file beside it, flushed to the disk, renamed over it, and the rename flushed too (a crash
/// leaves the old file or the new one).
pub fn save(
    path: &Path,
    roots: &[CertificateDer<'_>],
    pinned: &[CertificateDer<'_>],
) -> std::io::Result<()> {
    use std::io::Write;
    let mut tmp = path.as_os_str().to_owned();
    tmp.push(".tmp");
    let tmp = PathBuf::from(tmp);
    let mut pem: String = roots
        .iter()
        .map(|r| meshid_identity::pem::pem_cert(r))
        .collect();
    if !pinned.is_empty() {
        pem.push_str(PINNED_MARKER);
        pem.extend(pinned.iter().map(|p| meshid_identity::pem::pem_cert(p)));
    }
    let mut file = std::fs::File::create(&tmp)?;
    file.write_all(pem.as_bytes())?;
    file.sync_all()?;
    std::fs::rename(&tmp, path)?;
    let dir = match path.parent() {
        Some(d) if !d.as_os_str().is_empty() => d,
        _ => Path::new("."),
    };
    std::fs::File::open(dir)?.sync_all()
}

/// Keeps the cache at `path` equal to the roots in `store`, rewriting it whenever they change,
/// until `shutdown`.
pub async fn keep(path: PathBuf, store: Arc<CredentialStore>, mut shutdown: watch::Receiver<bool>) {
    let mut changes = store.subscribe();
    let mut written = Cached::default();
    loop {
        // The intermediates trust under a shared root is pinned to go with the roots: a restarted
        // sidecar reaches the CA through them only.
        let now = Cached {
            roots: store.roots(),
            pinned: store.pinned(),
        };
        if !now.roots.is_empty() && now != written {
            let (p, r, q) = (path.clone(), now.roots.clone(), now.pinned.clone());
            match tokio::task::spawn_blocking(move || save(&p, &r, &q)).await {
                Ok(Ok(())) => {
                    tracing::debug!(path = %path.display(), roots = now.roots.len(), pinned = now.pinned.len(), "trust bundle cache written");
                    written = now;
                }
                Ok(Err(error)) => {
                    tracing::warn!(%error, path = %path.display(), "trust bundle cache not written; a restarted sidecar trusts the configured CA roots alone");
                }
                Err(_) => return,
            }
        }
        tokio::select! {
            r = changes.changed() => if r.is_err() { return },
            _ = shutdown.changed() => return,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn root(name: &str) -> CertificateDer<'static> {
        let mut params = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
        params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
        params
            .distinguished_name
            .push(rcgen::DnType::CommonName, name);
        let key = rcgen::KeyPair::generate().unwrap();
        params.self_signed(&key).unwrap().der().clone()
    }

    #[test]
    fn a_cache_cut_short_is_said_so() {
        assert!(parse(b"").unwrap_err().contains("no certificate"));
        assert!(parse(b"\n\n").unwrap_err().contains("no certificate"));
        let pem = meshid_identity::pem::pem_cert(&root("r"));
        assert!(parse(&pem.as_bytes()[..40]).is_err());
        assert_eq!(parse(pem.as_bytes()).unwrap().len(), 1);
    }

    #[test]
    fn roots_saved_are_the_roots_loaded() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("bundle.pem");
        assert_eq!(load(&path), Cached::default(), "no file: no roots");
        let roots = vec![root("old"), root("new")];
        save(&path, &roots, &[]).unwrap();
        assert_eq!(load(&path).roots, roots);
        // Rewritten whole.
        save(&path, &roots[1..], &[]).unwrap();
        assert_eq!(load(&path).roots, roots[1..]);
        // Pins are kept apart from the roots, whoever issued what.
        let pins = vec![root("pinned")];
        save(&path, &roots, &pins).unwrap();
        assert_eq!(
            load(&path),
            Cached {
                roots: roots.clone(),
                pinned: pins
            }
        );
        assert!(!dir.path().join("bundle.pem.tmp").exists());
    }

    #[test]
    fn a_cache_that_cannot_be_used_is_ignored() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("bundle.pem");
        std::fs::write(
            &path,
            "-----BEGIN CERTIFICATE-----\nnot base64!\n-----END CERTIFICATE-----\n",
        )
        .unwrap();
        assert_eq!(load(&path), Cached::default());
        std::fs::write(&path, vec![b'a'; (MAX_BYTES + 1) as usize]).unwrap();
        assert_eq!(load(&path), Cached::default());
        assert_eq!(load(dir.path()), Cached::default(), "a directory");
        // Refused at once, not read (a FIFO's open waits for a writer; /dev/zero never ends).
        let fifo = dir.path().join("fifo.pem");
        let made = std::process::Command::new("mkfifo").arg(&fifo).status();
        assert!(made.is_ok_and(|s| s.success()), "mkfifo");
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            let _ = tx.send((load(&fifo), load(Path::new("/dev/zero"))));
        });
        let (fifo, zero) = rx
            .recv_timeout(std::time::Duration::from_secs(5))
            .expect("a FIFO or a device was read");
        assert_eq!(fifo, Cached::default());
        assert_eq!(zero, Cached::default());
    }
}
