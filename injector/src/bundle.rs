//! The trust bundle the injector hands each sidecar (environment variable
//! [`BUNDLE_ENV`]): the sidecar's bootstrap anchor for the CA's serving certificate. Later changes
//! reach a running sidecar over the CA's WatchTrustBundle stream.

use rustls_pki_types::CertificateDer;
use rustls_pki_types::pem::PemObject;
use x509_parser::prelude::{FromDer, X509Certificate};

use meshid_identity::pem::pem_cert;

/// The sidecar's environment variable holding the bundle as PEM (`--ca-bundle-pem`).
pub const BUNDLE_ENV: &str = "MESHID_SIDECAR_CA_BUNDLE_PEM";
/// Largest bundle accepted: it is copied into every injected pod's spec.
pub const MAX_BUNDLE_BYTES: usize = 64 * 1024;

/// One or more X.509 certificates, re-encoded as canonical PEM (comments and anything else in the
/// source file are dropped).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TrustBundle {
    pem: String,
    count: usize,
}

impl TrustBundle {
    /// Parses PEM text: only CERTIFICATE blocks, at least one, each an X.509 certificate.
    pub fn from_pem(pem: &[u8]) -> Result<Self, String> {
        if pem.len() > MAX_BUNDLE_BYTES {
            return Err(format!(
                "{} bytes is more than the {MAX_BUNDLE_BYTES} a trust bundle may have",
                pem.len()
            ));
        }
        let text = String::from_utf8_lossy(pem);
        let blocks = text.matches("-----BEGIN ").count();
        let cert_blocks = text.matches("-----BEGIN CERTIFICATE-----").count();
        if blocks != cert_blocks {
            return Err("holds a PEM block that is not a CERTIFICATE (a key?)".into());
        }
        let certs = CertificateDer::pem_slice_iter(pem)
            .collect::<Result<Vec<_>, _>>()
            .map_err(|e| format!("not PEM certificates: {e}"))?;
        Self::from_der(&certs)
    }

    /// From DER certificates (at least one).
    pub fn from_der(certs: &[CertificateDer<'_>]) -> Result<Self, String> {
        if certs.is_empty() {
            return Err("no certificate".into());
        }
        let mut pem = String::new();
        for (i, c) in certs.iter().enumerate() {
            X509Certificate::from_der(c)
                .map_err(|e| format!("certificate {}: not X.509: {e}", i + 1))?;
            pem.push_str(&pem_cert(c));
        }
        Ok(Self {
            pem,
            count: certs.len(),
        })
    }

    /// The bundle as PEM text.
    pub fn pem(&self) -> &str {
        &self.pem
    }

    /// How many certificates it holds.
    pub fn len(&self) -> usize {
        self.count
    }

    /// Always false: a bundle holds at least one certificate.
    pub fn is_empty(&self) -> bool {
        self.count == 0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_certificates() {
        let key = rcgen::KeyPair::generate().unwrap();
        let cert = rcgen::CertificateParams::new(Vec::<String>::new())
            .unwrap()
            .self_signed(&key)
            .unwrap();
        let pem = format!("# root 1\n{}\n", cert.pem());
        let bundle = TrustBundle::from_pem(pem.as_bytes()).unwrap();
        assert_eq!(bundle.len(), 1);
        assert!(!bundle.pem().contains('#'));
        assert_eq!(TrustBundle::from_pem(bundle.pem().as_bytes()), Ok(bundle));
        let with_key = format!("{}{}", cert.pem(), key.serialize_pem());
        assert!(TrustBundle::from_pem(with_key.as_bytes()).is_err());
        for bad in [
            "",
            "garbage",
            "-----BEGIN CERTIFICATE-----\nAAAA\n-----END CERTIFICATE-----\n",
        ] {
            assert!(TrustBundle::from_pem(bad.as_bytes()).is_err(), "{bad:?}");
        }
    }
}
