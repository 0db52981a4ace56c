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
/// an error unless `force`; nothing is written then.
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
    for (path, contents) in [(&key, &cert.key_pem), (&crt, &cert.chain_pem)] {
        // Written beside the target and renamed over it: never a half-written file, always 0600.
        let tmp = dir.join(format!(
            ".{}.tmp-{}",
            path.file_name().and_then(|n| n.to_str()).unwrap_or("file"),
            std::process::id()
        ));
        let _ = std::fs::remove_file(&tmp);
        let mut file = std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(&tmp)
            .map_err(io(&tmp))?;
        file.write_all(contents.as_bytes())
            .and_then(|()| file.sync_all())
            .map_err(io(&tmp))?;
        std::fs::rename(&tmp, path).map_err(io(path))?;
    }
    Ok((crt, key))
}

fn validity(der: &[u8]) -> Result<(OffsetDateTime, OffsetDateTime), String> {
    let (_, cert) =
        X509Certificate::from_der(der).map_err(|e| format!("not an X.509 certificate: {e}"))?;
    let v = cert.validity();
    Ok((v.not_before.to_datetime(), v.not_after.to_datetime()))
}
