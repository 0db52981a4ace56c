//! The injector's serving certificate: loaded from the files `meshid-ca webhook-cert` writes
//! ([`load_pair`]: the key must match the leaf and the leaf must be valid now), served through
//! [`ServingCert`], and swapped for a replaced pair while running (see [`super::reload`]), keeping
//! the old one when the new one is broken. The injector never holds a CA key.

use std::sync::Arc;

use arc_swap::ArcSwap;
use rustls::ServerConfig;
use rustls::server::{ClientHello, ResolvesServerCert};
use rustls::sign::CertifiedKey;
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};
use time::OffsetDateTime;
use x509_parser::prelude::{FromDer, X509Certificate};

/// File names `meshid-ca webhook-cert` writes, as `kubectl create secret tls` expects them.
pub const CERT_FILE: &str = "tls.crt";
pub const KEY_FILE: &str = "tls.key";

/// Why a serving pair cannot be used.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ServingError {
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

fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::aws_lc_rs::default_provider())
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
