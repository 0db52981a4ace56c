//! Credentials from PEM files (`--cert`, `--key`, `--bundle`).

use std::path::Path;

use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};

use crate::config::FileCreds;
use crate::creds::Credentials;

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

/// Reads every PEM certificate in a file (at least one).
pub fn certs(path: &Path) -> Result<Vec<CertificateDer<'static>>, FileError> {
    let pem = std::fs::read(path).map_err(|e| err(path, e.to_string()))?;
    let certs = CertificateDer::pem_slice_iter(&pem)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| err(path, format!("not PEM certificates: {e}")))?;
    if certs.is_empty() {
        return Err(err(path, "no certificate in the file"));
    }
    Ok(certs)
}

/// Reads the three files into one credential set (validated later by the store).
pub fn load(files: &FileCreds) -> Result<Credentials, FileError> {
    let chain = certs(&files.cert)?;
    let roots = certs(&files.bundle)?;
    let key_pem = std::fs::read(&files.key).map_err(|e| err(&files.key, e.to_string()))?;
    let key = PrivateKeyDer::from_pem_slice(&key_pem)
        .map_err(|_| err(&files.key, "no PEM private key in the file"))?;
    Ok(Credentials { chain, key, roots })
}
