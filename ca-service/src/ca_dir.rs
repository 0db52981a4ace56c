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
    #[error("{path}: {reason}")]
    Invalid { path: PathBuf, reason: String },
    #[error("generating CA material: {0}")]
    Generate(#[from] rcgen::Error),
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

/// Reads a PEM bundle of CA certificates (at least one).
pub fn read_bundle(path: &Path) -> Result<Vec<CertificateDer<'static>>, AuthorityError> {
    let pem = fs::read(path).map_err(io_err(path))?;
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

/// Writes a file by renaming a fully written temporary file over it. On failure (a full or
/// read-only directory) the file is as it was and no temporary file is left behind.
pub fn write_atomic(path: &Path, bytes: &[u8]) -> Result<(), AuthorityError> {
    let tmp = path.with_extension(format!("tmp{}", std::process::id()));
    let io = |source| AuthorityError::Io {
        path: path.to_owned(),
        source,
    };
    let written = fs::File::create(&tmp).and_then(|mut f| {
        f.write_all(bytes)?;
        f.sync_all()?;
        fs::rename(&tmp, path)
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
    }
}
