//! Pure certificate checks for `meshid-ca check`: does a served chain verify for a name under given
//! roots (and if not, why, in words an operator can act on), and how close is a certificate to its
//! expiry.

use std::time::Duration;

use rustls::CertificateError;
use rustls::client::danger::ServerCertVerifier;
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, ServerName, UnixTime};
use x509_parser::prelude::{FromDer, GeneralName, X509Certificate};

use super::Status;

/// Why a served chain does not verify.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum ChainProblem {
    #[error("does not chain to the given roots (issued by another CA?)")]
    UnknownIssuer,
    #[error("is not valid for {name} (it names {covers})")]
    WrongName { name: String, covers: String },
    #[error("has expired")]
    Expired,
    #[error("is not valid yet")]
    NotYetValid,
    #[error("no certificate was presented")]
    Empty,
    #[error("{0}")]
    Other(String),
}

/// Every certificate in a PEM text; fails when there is none or one does not parse.
pub fn parse_pem(pem: &[u8]) -> Result<Vec<CertificateDer<'static>>, String> {
    let certs = CertificateDer::pem_slice_iter(pem)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| format!("not PEM certificates: {e}"))?;
    if certs.is_empty() {
        return Err("holds no PEM certificate".into());
    }
    for c in &certs {
        X509Certificate::from_der(c).map_err(|e| format!("a certificate does not parse: {e}"))?;
    }
    Ok(certs)
}

/// A certificate's not-after, Unix seconds.
pub fn not_after(der: &[u8]) -> Result<i64, String> {
    X509Certificate::from_der(der)
        .map(|(_, c)| c.validity().not_after.timestamp())
        .map_err(|e| format!("certificate does not parse: {e}"))
}

/// The DNS names and IPs a certificate covers, for messages.
pub fn names(der: &[u8]) -> String {
    let Ok((_, cert)) = X509Certificate::from_der(der) else {
        return "nothing readable".into();
    };
    let mut out = Vec::new();
    if let Ok(Some(san)) = cert.subject_alternative_name() {
        for name in &san.value.general_names {
            match name {
                GeneralName::DNSName(d) => out.push((*d).to_owned()),
                GeneralName::IPAddress(ip) => out.push(format!("IP {ip:02x?}")),
                GeneralName::URI(u) => out.push((*u).to_owned()),
                _ => {}
            }
        }
    }
    if out.is_empty() {
        "no DNS name".into()
    } else {
        out.join(", ")
    }
}

/// Verifies `chain` (leaf first, as a server sent it) for TLS server auth to `name` under `roots`
/// at `now`, as a client such as the API server would.
pub fn verify_server(
    chain: &[CertificateDer<'static>],
    roots: &[CertificateDer<'static>],
    name: &str,
    now: i64,
) -> Result<(), ChainProblem> {
    let Some((leaf, intermediates)) = chain.split_first() else {
        return Err(ChainProblem::Empty);
    };
    // As a sidecar verifies it: under an imported root, through a pinned intermediate of the bundle.
    let (roots, pinned) = meshid_identity::verify::split_pins(roots.to_vec());
    let chains = meshid_identity::verify::Chains::new(&roots, &pinned)
        .map_err(|e| ChainProblem::Other(format!("unusable trust bundle: {e:?}")))?;
    let server_name = ServerName::try_from(name.to_owned())
        .map_err(|_| ChainProblem::Other(format!("{name:?} is not a DNS name or IP")))?;
    let verifier =
        meshid_identity::verify::NamedServerVerifier::new(chains, &crate::tls::provider());
    let time = UnixTime::since_unix_epoch(Duration::from_secs(u64::try_from(now).unwrap_or(0)));
    match verifier.verify_server_cert(leaf, intermediates, &server_name, &[], time) {
        Ok(_) => Ok(()),
        Err(rustls::Error::InvalidCertificate(e)) => Err(match e {
            CertificateError::UnknownIssuer | CertificateError::BadSignature => {
                ChainProblem::UnknownIssuer
            }
            CertificateError::NotValidForName | CertificateError::NotValidForNameContext { .. } => {
                ChainProblem::WrongName {
                    name: name.to_owned(),
                    covers: names(leaf),
                }
            }
            CertificateError::Expired | CertificateError::ExpiredContext { .. } => {
                ChainProblem::Expired
            }
            CertificateError::NotValidYet | CertificateError::NotValidYetContext { .. } => {
                ChainProblem::NotYetValid
            }
            other => ChainProblem::Other(format!("{other:?}")),
        }),
        Err(other) => Err(ChainProblem::Other(other.to_string())),
    }
}

/// `what` expiring at `not_after`: failed when past, a warning within `warn_within`, else ok; with
/// a sentence saying when.
pub fn expiry(what: &str, not_after: i64, now: i64, warn_within: Duration) -> (Status, String) {
    let left = not_after - now;
    if left <= 0 {
        return (
            Status::Fail,
            format!("{what} expired {} ago", human(left.unsigned_abs())),
        );
    }
    let left = left.unsigned_abs();
    let text = format!("{what} expires in {}", human(left));
    if left < warn_within.as_secs() {
        (Status::Warn, text)
    } else {
        (Status::Ok, text)
    }
}

/// `3d 4h`, `5h 10m`, `42s`.
pub fn human(secs: u64) -> String {
    let (d, h, m) = (secs / 86400, secs % 86400 / 3600, secs % 3600 / 60);
    match (d, h, m) {
        (0, 0, 0) => format!("{secs}s"),
        (0, 0, m) => format!("{m}m"),
        (0, h, m) => format!("{h}h {m}m"),
        (d, h, _) => format!("{d}d {h}h"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rcgen::{BasicConstraints, CertificateParams, IsCa, Issuer, KeyPair};

    fn ca(name: &str) -> (CertificateDer<'static>, Issuer<'static, KeyPair>) {
        let key = KeyPair::generate().unwrap();
        let mut p = CertificateParams::new(Vec::<String>::new()).unwrap();
        p.distinguished_name.push(rcgen::DnType::CommonName, name);
        p.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        let cert = p.self_signed(&key).unwrap();
        (cert.der().clone(), Issuer::new(p, key))
    }

    fn leaf(
        issuer: &Issuer<'static, KeyPair>,
        dns: &str,
        days: (i64, i64),
    ) -> CertificateDer<'static> {
        let key = KeyPair::generate().unwrap();
        let mut p = CertificateParams::new(vec![dns.to_owned()]).unwrap();
        let now = time::OffsetDateTime::now_utc();
        p.not_before = now + time::Duration::days(days.0);
        p.not_after = now + time::Duration::days(days.1);
        p.signed_by(&key, issuer).unwrap().der().clone()
    }

    #[test]
    fn each_chain_problem_is_named() {
        let (root, issuer) = ca("mesh");
        let (other_root, other) = ca("other");
        let now = time::OffsetDateTime::now_utc().unix_timestamp();
        let name = "meshid-injector.meshid.svc";
        struct Case {
            name: &'static str,
            chain: Vec<CertificateDer<'static>>,
            roots: Vec<CertificateDer<'static>>,
            expected: Result<(), ChainProblem>,
        }
        let cases = [
            Case {
                name: "good",
                chain: vec![leaf(&issuer, name, (-1, 30))],
                roots: vec![root.clone()],
                expected: Ok(()),
            },
            Case {
                name: "another CA",
                chain: vec![leaf(&other, name, (-1, 30))],
                roots: vec![root.clone()],
                expected: Err(ChainProblem::UnknownIssuer),
            },
            Case {
                name: "wrong name",
                chain: vec![leaf(&issuer, "other.meshid.svc", (-1, 30))],
                roots: vec![root.clone(), other_root],
                expected: Err(ChainProblem::WrongName {
                    name: name.into(),
                    covers: "other.meshid.svc".into(),
                }),
            },
            Case {
                name: "expired",
                chain: vec![leaf(&issuer, name, (-30, -1))],
                roots: vec![root.clone()],
                expected: Err(ChainProblem::Expired),
            },
            Case {
                name: "empty",
                chain: vec![],
                roots: vec![root],
                expected: Err(ChainProblem::Empty),
            },
        ];
        for c in cases {
            assert_eq!(
                verify_server(&c.chain, &c.roots, name, now),
                c.expected,
                "{}",
                c.name
            );
        }
    }

    #[test]
    fn expiry_thresholds() {
        let week = Duration::from_secs(7 * 86400);
        assert_eq!(expiry("x", 100, 200, week).0, Status::Fail);
        assert_eq!(expiry("x", 200 + 86400, 200, week).0, Status::Warn);
        let (s, text) = expiry("root", 200 + 8 * 86400, 200, week);
        assert_eq!((s, text.as_str()), (Status::Ok, "root expires in 8d 0h"));
        assert!(parse_pem(b"garbage").is_err());
        assert!(not_after(b"\x30\x03\x02\x01\x00").is_err());
    }
}
