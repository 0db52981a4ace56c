//! The injector's serving certificate, issued offline by `meshid-ca webhook-cert` from the active
//! intermediate ([`issue_webhook_cert`], [`write_pair`]), so the injector itself never holds a CA key.
//! The injector loads the pair from the two files written here.

use std::io::Write;
use std::net::IpAddr;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::time::Duration;

use time::OffsetDateTime;
use x509_parser::prelude::{FromDer, X509Certificate};

use crate::authority::Authority;
use crate::tls::{TlsSetupError, issue_serving_cert};
use meshid_identity::pem::{pem_block, pem_cert};

/// File names written, as `kubectl create secret tls` expects them.
pub const CERT_FILE: &str = "tls.crt";
pub const KEY_FILE: &str = "tls.key";

/// Why a serving pair cannot be issued or written.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum WebhookCertError {
    #[error("{0:?} is not a DNS name")]
    BadDnsName(String),
    #[error("at least one DNS name is needed")]
    NoDnsName,
    #[error("{0} exists (use --force to replace it)")]
    Exists(PathBuf),
    #[error("{path}: {error}")]
    Io {
        path: PathBuf,
        error: std::io::Error,
    },
    #[error(transparent)]
    Issue(#[from] TlsSetupError),
    #[error("certificate: {0}")]
    Cert(String),
}

/// A freshly issued serving pair, as PEM.
pub struct WebhookCert {
    /// Leaf then intermediate.
    pub chain_pem: String,
    /// PKCS#8 private key.
    pub key_pem: String,
    pub not_after: OffsetDateTime,
}

impl std::fmt::Debug for WebhookCert {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("WebhookCert")
            .field("not_after", &self.not_after)
            .field("key_pem", &"<redacted>")
            .finish_non_exhaustive()
    }
}

/// Issues a serverAuth certificate for `dns` names from the active intermediate, with a fresh P-256
/// key; its lifetime is `lifetime`, capped by the intermediate's not-after.
pub fn issue_webhook_cert(
    authority: &Authority,
    dns: &[String],
    lifetime: Duration,
) -> Result<WebhookCert, WebhookCertError> {
    let first = dns.first().ok_or(WebhookCertError::NoDnsName)?;
    for name in dns {
        let syntactic = rustls_pki_types::DnsName::try_from(name.as_str()).is_ok();
        if !syntactic || name.parse::<IpAddr>().is_ok() || name.ends_with('.') {
            return Err(WebhookCertError::BadDnsName(name.clone()));
        }
    }
    let (chain, key) = issue_serving_cert(authority, dns, first, lifetime)?;
    let not_after = chain
        .first()
        .map(|leaf| validity(leaf).map(|(_, not_after)| not_after))
        .transpose()
        .map_err(WebhookCertError::Cert)?
        .unwrap_or(authority.intermediate_not_after);
    let chain_pem = chain.iter().map(|c| pem_cert(c)).collect();
    let key_pem = pem_block("PRIVATE KEY", key.secret_der());
    Ok(WebhookCert {
        chain_pem,
        key_pem,
        not_after,
    })
}

/// Writes `tls.crt` and `tls.key` (mode 0600) into `dir` (created if missing). Existing files are
/// an error unless `force`; nothing is written then. Replaced as a pair as far as the filesystem
/// allows: a failure leaves the old pair (or none) and no temporary file.
pub fn write_pair(
    dir: &Path,
    cert: &WebhookCert,
    force: bool,
) -> Result<(PathBuf, PathBuf), WebhookCertError> {
    let io = |path: &Path| {
        let path = path.to_owned();
        move |error| WebhookCertError::Io { path, error }
    };
    let (crt, key) = (dir.join(CERT_FILE), dir.join(KEY_FILE));
    if !force {
        for p in [&crt, &key] {
            if p.symlink_metadata().is_ok() {
                return Err(WebhookCertError::Exists(p.clone()));
            }
        }
    }
    std::fs::create_dir_all(dir).map_err(io(dir))?;
    let tmp_of = |path: &Path| {
        dir.join(format!(
            ".{}.tmp-{}",
            path.file_name().and_then(|n| n.to_str()).unwrap_or("file"),
            std::process::id()
        ))
    };
    let (crt_tmp, key_tmp) = (tmp_of(&crt), tmp_of(&key));
    let remove_temps = || {
        let _ = std::fs::remove_file(&crt_tmp);
        let _ = std::fs::remove_file(&key_tmp);
    };
    // Both written in full first (never a half-written file, always 0600), then renamed over the
    // old ones: the certificate, then the key, the certificate put back if the key's rename fails.
    for (tmp, contents) in [(&crt_tmp, &cert.chain_pem), (&key_tmp, &cert.key_pem)] {
        if let Err(e) = write_new(tmp, contents.as_bytes()) {
            remove_temps();
            return Err(io(tmp)(e));
        }
    }
    // What the certificate's rename replaces, to put back.
    let old_crt = std::fs::symlink_metadata(&crt)
        .ok()
        .filter(std::fs::Metadata::is_file)
        .map(|_| std::fs::read(&crt));
    let old_crt = match old_crt.transpose() {
        Ok(old) => old,
        Err(e) => {
            remove_temps();
            return Err(io(&crt)(e));
        }
    };
    if let Err(e) = std::fs::rename(&crt_tmp, &crt) {
        remove_temps();
        return Err(io(&crt)(e));
    }
    if let Err(e) = std::fs::rename(&key_tmp, &key) {
        let restored = match &old_crt {
            Some(old) => write_new(&crt_tmp, old).and_then(|()| std::fs::rename(&crt_tmp, &crt)),
            None => std::fs::remove_file(&crt),
        }
        .and_then(|()| crate::ca_dir::sync_dir_of(&crt));
        remove_temps();
        if let Err(error) = restored {
            tracing::error!(%error, path = %crt.display(), "putting the old certificate back failed");
        }
        return Err(io(&key)(e));
    }
    // One sync of the directory for both renames (as `authority::install` does): until it, they
    // may not survive a power loss. A failure leaves the new pair in place, and says so.
    crate::ca_dir::sync_dir_of(&key).map_err(io(dir))?;
    Ok((crt, key))
}

/// Writes `bytes` to a new file `path` (mode 0600) and syncs it.
fn write_new(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    let _ = std::fs::remove_file(path);
    let mut file = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(path)?;
    file.write_all(bytes)?;
    file.sync_all()
}

fn validity(der: &[u8]) -> Result<(OffsetDateTime, OffsetDateTime), String> {
    let (_, cert) =
        X509Certificate::from_der(der).map_err(|e| format!("not an X.509 certificate: {e}"))?;
    let v = cert.validity();
    Ok((v.not_before.to_datetime(), v.not_after.to_datetime()))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn names(dir: &Path) -> Vec<String> {
        let mut names: Vec<String> = std::fs::read_dir(dir)
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        names.sort();
        names
    }

    fn pair(n: u8) -> WebhookCert {
        WebhookCert {
            chain_pem: format!("cert {n}"),
            key_pem: format!("key {n}"),
            not_after: OffsetDateTime::UNIX_EPOCH,
        }
    }

    #[test]
    fn a_forced_replacement_that_fails_leaves_the_old_pair_and_no_temporary_file() {
        let dir = tempfile::tempdir().unwrap();
        let (crt, key) = write_pair(dir.path(), &pair(1), false).unwrap();
        assert!(matches!(
            write_pair(dir.path(), &pair(2), false),
            Err(WebhookCertError::Exists(_))
        ));
        // The certificate's place taken by a non-empty directory (a rename fails, also for
        // root): the key stays the old one.
        std::fs::remove_file(&crt).unwrap();
        std::fs::create_dir(&crt).unwrap();
        std::fs::write(crt.join("x"), "x").unwrap();
        assert!(write_pair(dir.path(), &pair(2), true).is_err());
        assert_eq!(std::fs::read_to_string(&key).unwrap(), "key 1");
        assert_eq!(names(dir.path()), vec!["tls.crt", "tls.key"]);
        std::fs::remove_dir_all(&crt).unwrap();
        std::fs::write(&crt, "cert 1").unwrap();
        // The key's rename fails after the certificate's: the old certificate is put back.
        std::fs::remove_file(&key).unwrap();
        std::fs::create_dir(&key).unwrap();
        std::fs::write(key.join("x"), "x").unwrap();
        assert!(write_pair(dir.path(), &pair(3), true).is_err());
        assert_eq!(std::fs::read_to_string(&crt).unwrap(), "cert 1");
        assert_eq!(names(dir.path()), vec!["tls.crt", "tls.key"]);
        std::fs::remove_dir_all(&key).unwrap();
        write_pair(dir.path(), &pair(4), true).unwrap();
        assert_eq!(std::fs::read_to_string(&crt).unwrap(), "cert 4");
        assert_eq!(std::fs::read_to_string(&key).unwrap(), "key 4");
    }
}
