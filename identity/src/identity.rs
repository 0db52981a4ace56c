//! Reading the SPIFFE identity out of a DER X.509 certificate.
//!
//! A meshid workload certificate carries exactly one URI SAN, and that URI is a valid SPIFFE ID. Call
//! this only after the chain has been verified: it checks the identity, not the signature.

use x509_parser::extensions::GeneralName;
use x509_parser::prelude::{FromDer, X509Certificate};

use crate::spiffe::{SpiffeId, SpiffeIdError};

/// Why a certificate carries no usable SPIFFE identity.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum IdentityError {
    #[error("certificate is not valid DER X.509: {0}")]
    Malformed(String),
    #[error("certificate has trailing bytes after its DER encoding")]
    TrailingData,
    #[error("certificate has no subjectAltName extension")]
    NoSan,
    #[error("certificate has more than one subjectAltName extension")]
    DuplicateSan,
    #[error("certificate has no URI SAN")]
    NoUriSan,
    #[error("certificate has {0} URI SANs, exactly one is allowed")]
    MultipleUriSans(usize),
    #[error("certificate's URI SAN is not a valid SPIFFE ID: {0}")]
    InvalidId(#[from] SpiffeIdError),
    #[error("certificate is a CA certificate, not a workload certificate")]
    IsCa,
}

/// What a workload certificate says about itself: enough for `/identity` pages and renewal timing.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CertIdentity {
    pub id: SpiffeId,
    /// Serial number, lowercase hex.
    pub serial_hex: String,
    /// Seconds since the Unix epoch.
    pub not_before: i64,
    /// Seconds since the Unix epoch.
    pub not_after: i64,
    /// The issuer's distinguished name, RFC 4514 style.
    pub issuer: String,
}

/// Extracts the one SPIFFE ID of a DER workload certificate.
pub fn spiffe_id_from_der(der: &[u8]) -> Result<SpiffeId, IdentityError> {
    let cert = parse(der)?;
    spiffe_id_of(&cert)
}

/// Extracts the SPIFFE ID plus serial, validity and issuer of a DER workload certificate.
pub fn cert_identity_from_der(der: &[u8]) -> Result<CertIdentity, IdentityError> {
    let cert = parse(der)?;
    let id = spiffe_id_of(&cert)?;
    Ok(CertIdentity {
        id,
        serial_hex: hex(cert.raw_serial()),
        not_before: cert.validity().not_before.timestamp(),
        not_after: cert.validity().not_after.timestamp(),
        issuer: cert.issuer().to_string(),
    })
}

fn parse(der: &[u8]) -> Result<X509Certificate<'_>, IdentityError> {
    let (rest, cert) =
        X509Certificate::from_der(der).map_err(|e| IdentityError::Malformed(e.to_string()))?;
    if !rest.is_empty() {
        return Err(IdentityError::TrailingData);
    }
    Ok(cert)
}

fn spiffe_id_of(cert: &X509Certificate<'_>) -> Result<SpiffeId, IdentityError> {
    if cert.is_ca() {
        return Err(IdentityError::IsCa);
    }
    let san = match cert.subject_alternative_name() {
        Ok(Some(san)) => san,
        Ok(None) => return Err(IdentityError::NoSan),
        Err(_) => return Err(IdentityError::DuplicateSan),
    };
    let mut uris = san.value.general_names.iter().filter_map(|n| match n {
        GeneralName::URI(uri) => Some(*uri),
        _ => None,
    });
    let first = uris.next().ok_or(IdentityError::NoUriSan)?;
    let extra = uris.count();
    if extra > 0 {
        return Err(IdentityError::MultipleUriSans(extra + 1));
    }
    Ok(SpiffeId::parse(first)?)
}

/// Lowercase hex of bytes.
pub fn hex(bytes: &[u8]) -> String {
    use std::fmt::Write;
    let mut s = String::with_capacity(bytes.len() * 2);
    for b in bytes {
        let _ = write!(s, "{b:02x}");
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;
    use rcgen::{BasicConstraints, CertificateParams, IsCa, KeyPair, SanType};

    fn cert_with(sans: Vec<SanType>, ca: bool) -> Vec<u8> {
        let mut params = CertificateParams::default();
        params.subject_alt_names = sans;
        if ca {
            params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        }
        let key = KeyPair::generate().unwrap();
        params.self_signed(&key).unwrap().der().to_vec()
    }

    fn uri(s: &str) -> SanType {
        SanType::URI(s.try_into().unwrap())
    }

    #[test]
    fn extracts_the_one_uri_san() {
        let der = cert_with(
            vec![
                uri("spiffe://cluster.local/ns/a/sa/b"),
                SanType::DnsName("x.example".try_into().unwrap()),
            ],
            false,
        );
        let id = spiffe_id_from_der(&der).unwrap();
        assert_eq!(id.as_str(), "spiffe://cluster.local/ns/a/sa/b");
        let info = cert_identity_from_der(&der).unwrap();
        assert_eq!(info.id, id);
        assert!(info.not_after > info.not_before);
        assert!(!info.serial_hex.is_empty());
    }

    #[test]
    fn rejects_certificates_without_a_single_valid_identity() {
        let two = cert_with(vec![uri("spiffe://td/a"), uri("spiffe://td/b")], false);
        let dns_only = cert_with(vec![SanType::DnsName("a.b".try_into().unwrap())], false);
        let none = cert_with(vec![], false);
        let bad_id = cert_with(vec![uri("spiffe://td/../x")], false);
        let http = cert_with(vec![uri("https://td/a")], false);
        let ca = cert_with(vec![uri("spiffe://td/a")], true);
        let mut trailing = cert_with(vec![uri("spiffe://td/a")], false);
        trailing.push(0);

        let cases: Vec<(&str, &[u8], IdentityError)> = vec![
            ("two uri sans", &two, IdentityError::MultipleUriSans(2)),
            ("dns only", &dns_only, IdentityError::NoUriSan),
            ("no san", &none, IdentityError::NoSan),
            (
                "dot segment",
                &bad_id,
                IdentityError::InvalidId(SpiffeIdError::DotSegment),
            ),
            (
                "other scheme",
                &http,
                IdentityError::InvalidId(SpiffeIdError::WrongScheme),
            ),
            ("ca certificate", &ca, IdentityError::IsCa),
            ("trailing bytes", &trailing, IdentityError::TrailingData),
        ];
        for (name, der, want) in cases {
            assert_eq!(spiffe_id_from_der(der).err(), Some(want), "{name}");
        }
    }

    #[test]
    fn garbage_is_an_error_not_a_panic() {
        for input in [&b""[..], b"\x30", b"\x30\x82\xff\xff", &[0u8; 64], b"hello"] {
            assert!(matches!(
                spiffe_id_from_der(input),
                Err(IdentityError::Malformed(_))
            ));
        }
    }
}
