//! The injector's serving certificate. `meshid-ca webhook-cert` issues it offline from the active
//! intermediate ([`issue_webhook_cert`], [`write_pair`]), so the injector itself never holds a CA
//! key; the injector loads the pair from files ([`load_pair`]: the key must match the leaf and the
//! leaf must be valid now), serves it through [`ServingCert`], and swaps in a replaced pair while
//! running (see [`super::reload`]), keeping the old one when the new one is broken.

use std::io::Write;
use std::net::IpAddr;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use arc_swap::ArcSwap;
use rustls::ServerConfig;
use rustls::server::{ClientHello, ResolvesServerCert};
use rustls::sign::CertifiedKey;
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};
use time::OffsetDateTime;
use x509_parser::prelude::{FromDer, X509Certificate};

use crate::authority::{Authority, pem_cert};
use crate::tls::{TlsSetupError, issue_serving_cert, provider};

/// File names `webhook-cert` writes, as `kubectl create secret tls` expects them.
pub const CERT_FILE: &str = "tls.crt";
pub const KEY_FILE: &str = "tls.key";

/// Why a serving pair cannot be issued, written or used.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ServingError {
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
    #[error("key: {0}")]
    Key(String),
    #[error("the key does not belong to the certificate")]
    KeyMismatch,
    #[error("the certificate expired at {0}")]
    Expired(OffsetDateTime),
    #[error("the certificate is not valid before {0}")]
    NotYetValid(OffsetDateTime),
    #[error(
        "the certificate is not valid for {0} (the name the API server calls the injector by); \
         issue one with `meshid-ca webhook-cert --dns {0}`"
    )]
    WrongName(String),
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
) -> Result<WebhookCert, ServingError> {
    let first = dns.first().ok_or(ServingError::NoDnsName)?;
    for name in dns {
        let syntactic = rustls_pki_types::DnsName::try_from(name.as_str()).is_ok();
        if !syntactic || name.parse::<IpAddr>().is_ok() || name.ends_with('.') {
            return Err(ServingError::BadDnsName(name.clone()));
        }
    }
    let (chain, key) = issue_serving_cert(authority, dns, first, lifetime)?;
    let not_after = chain
        .first()
        .map(|leaf| validity(leaf).map(|(_, not_after)| not_after))
        .transpose()
        .map_err(ServingError::Cert)?
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
) -> Result<(PathBuf, PathBuf), ServingError> {
    let io = |path: &Path| {
        let path = path.to_owned();
        move |error| ServingError::Io { path, error }
    };
    let (crt, key) = (dir.join(CERT_FILE), dir.join(KEY_FILE));
    if !force {
        for p in [&crt, &key] {
            if p.symlink_metadata().is_ok() {
                return Err(ServingError::Exists(p.clone()));
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

/// Parses and checks a serving pair: at least one certificate, a private key that belongs to the
/// leaf, and a leaf valid at `now`.
pub fn load_pair(
    cert_pem: &[u8],
    key_pem: &[u8],
    now: OffsetDateTime,
) -> Result<Arc<CertifiedKey>, ServingError> {
    let chain = CertificateDer::pem_slice_iter(cert_pem)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| ServingError::Cert(format!("not PEM: {e}")))?;
    let leaf = chain
        .first()
        .ok_or_else(|| ServingError::Cert("no certificate in the file".into()))?;
    let (not_before, not_after) = validity(leaf).map_err(ServingError::Cert)?;
    let key = PrivateKeyDer::from_pem_slice(key_pem)
        .map_err(|e| ServingError::Key(format!("no PEM private key: {e}")))?;
    let signing = provider()
        .key_provider
        .load_private_key(key)
        .map_err(|e| ServingError::Key(e.to_string()))?;
    let certified = CertifiedKey::new(chain, signing);
    certified
        .keys_match()
        .map_err(|_| ServingError::KeyMismatch)?;
    if not_after < now {
        return Err(ServingError::Expired(not_after));
    }
    if not_before > now {
        return Err(ServingError::NotYetValid(not_before));
    }
    Ok(Arc::new(certified))
}

/// Checks that the leaf is valid for the DNS name `name` (as a TLS client checks it).
pub fn require_name(certified: &CertifiedKey, name: &str) -> Result<(), ServingError> {
    let wrong = || ServingError::WrongName(name.to_owned());
    let leaf = certified.cert.first().ok_or_else(wrong)?;
    let server_name = rustls_pki_types::ServerName::try_from(name).map_err(|_| wrong())?;
    webpki::EndEntityCert::try_from(leaf)
        .map_err(|e| ServingError::Cert(e.to_string()))?
        .verify_is_valid_for_subject_name(&server_name)
        .map_err(|_| wrong())
}

/// The leaf's not-after (for logs).
pub fn not_after(certified: &CertifiedKey) -> Option<OffsetDateTime> {
    certified
        .cert
        .first()
        .and_then(|leaf| validity(leaf).ok())
        .map(|(_, not_after)| not_after)
}

fn validity(der: &[u8]) -> Result<(OffsetDateTime, OffsetDateTime), String> {
    let (_, cert) =
        X509Certificate::from_der(der).map_err(|e| format!("not an X.509 certificate: {e}"))?;
    let v = cert.validity();
    Ok((v.not_before.to_datetime(), v.not_after.to_datetime()))
}

fn pem_block(label: &str, der: &[u8]) -> String {
    use base64::Engine;
    let b64 = base64::engine::general_purpose::STANDARD.encode(der);
    let mut out = format!("-----BEGIN {label}-----\n");
    for line in b64.as_bytes().chunks(64) {
        out.push_str(&String::from_utf8_lossy(line));
        out.push('\n');
    }
    out.push_str(&format!("-----END {label}-----\n"));
    out
}

/// The current serving pair, swapped in place when the files change; every handshake uses the
/// pair current at its start.
#[derive(Debug)]
pub struct ServingCert(ArcSwap<CertifiedKey>);

impl ServingCert {
    pub fn new(initial: Arc<CertifiedKey>) -> Arc<Self> {
        Arc::new(Self(ArcSwap::new(initial)))
    }

    pub fn set(&self, pair: Arc<CertifiedKey>) {
        self.0.store(pair);
    }

    pub fn current(&self) -> Arc<CertifiedKey> {
        self.0.load_full()
    }
}

impl ResolvesServerCert for ServingCert {
    fn resolve(&self, _hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        Some(self.0.load_full())
    }
}

/// TLS 1.3/1.2 server config serving `cert`, h2 and http/1.1 by ALPN.
pub fn server_config(cert: Arc<ServingCert>) -> Result<Arc<ServerConfig>, rustls::Error> {
    let mut config = ServerConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&rustls::version::TLS13, &rustls::version::TLS12])?
        .with_no_client_auth()
        .with_cert_resolver(cert);
    config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    Ok(Arc::new(config))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pair(not_before: OffsetDateTime, not_after: OffsetDateTime) -> (String, String) {
        let key = rcgen::KeyPair::generate().unwrap();
        let mut params = rcgen::CertificateParams::new(vec!["x.svc".to_owned()]).unwrap();
        params.not_before = not_before;
        params.not_after = not_after;
        let cert = params.self_signed(&key).unwrap();
        (cert.pem(), key.serialize_pem())
    }

    #[test]
    fn pairs_are_checked() {
        let now = OffsetDateTime::now_utc();
        let day = time::Duration::days(1);
        let (cert, key) = pair(now - day, now + day);
        let good = load_pair(cert.as_bytes(), key.as_bytes(), now).unwrap();
        assert!(require_name(&good, "x.svc").is_ok());
        assert!(matches!(
            require_name(&good, "y.svc"),
            Err(ServingError::WrongName(_))
        ));
        let (_, other_key) = pair(now - day, now + day);
        assert!(matches!(
            load_pair(cert.as_bytes(), other_key.as_bytes(), now),
            Err(ServingError::KeyMismatch)
        ));
        let (old, old_key) = pair(now - day - day, now - day);
        assert!(matches!(
            load_pair(old.as_bytes(), old_key.as_bytes(), now),
            Err(ServingError::Expired(_))
        ));
        let (early, early_key) = pair(now + day, now + day + day);
        assert!(matches!(
            load_pair(early.as_bytes(), early_key.as_bytes(), now),
            Err(ServingError::NotYetValid(_))
        ));
        for (c, k) in [("", key.as_str()), (cert.as_str(), ""), ("junk", "junk")] {
            assert!(load_pair(c.as_bytes(), k.as_bytes(), now).is_err(), "{c:?}");
        }
    }
}
