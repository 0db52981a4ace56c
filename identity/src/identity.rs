//! Reading the SPIFFE identity out of a DER X.509 certificate.
//!
//! A meshid workload certificate carries exactly one URI SAN, and that URI is a valid SPIFFE ID. Call
//! this only after the chain has been verified: it checks the identity, not the signature.
//!
//! It may also carry meshid's attested-at extension ([`ATTESTED_AT_OID`]): when its identity was last
//! proven with a service-account token or a join token (renewals copy it, so it bounds a lineage of
//! renewals), its lineage extension ([`LINEAGE_OID`]: the serial of the first certificate of its
//! lineage of renewals, so that revoking that serial reaches every renewal of it) and the app-SVID
//! mark ([`APP_SVID_OID`]: issued to the app behind a sidecar, never a credential at the CA).

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
    #[error(
        "certificate's key usage allows signing certificates or CRLs (keyCertSign or cRLSign): \
         not a workload certificate"
    )]
    SigningKeyUsage,
    #[error("certificate's attested-at extension is malformed: {0}")]
    MalformedAttestedAt(&'static str),
    #[error("certificate's lineage extension is malformed: {0}")]
    MalformedLineage(&'static str),
}

/// meshid's attested-at extension: when the identity of a workload certificate was last attested (a
/// service-account token or a join token), so the CA can bound how long a lineage of renewals lasts.
/// Non-critical; its value is a DER INTEGER of Unix seconds.
///
/// The OID is `2.25.6861656577709497194`: an arc of the UUID arc 2.25 (ITU-T X.667, needs no
/// registration) drawn at random below 2^63, so that it fits the 64-bit arcs certificate libraries
/// (rcgen) write; a random 63-bit value is as unlikely to collide as the arc needs. Held here as the
/// content
/// octets of its DER OBJECT IDENTIFIER (no tag, no length), which is what is written and compared.
pub const ATTESTED_AT_OID: &[u8] = &[0x69, 0xdf, 0x9c, 0xe0, 0x89, 0xd8, 0xa8, 0xe3, 0xb6, 0x6a];

/// [`ATTESTED_AT_OID`] as arcs, for writers.
pub const ATTESTED_AT_ARCS: &[u64] = &[2, 25, 6_861_656_577_709_497_194];

/// meshid's lineage extension: the serial of the first certificate of a lineage of renewals (the
/// one a service-account token or a join token got), copied on every renewal, so that revoking that
/// serial refuses every certificate renewed from it. Non-critical; its value is a DER OCTET STRING
/// of the serial's bytes (1 to 20). OID `2.25.7095070761511950556`, drawn as [`ATTESTED_AT_OID`]'s.
pub const LINEAGE_OID: &[u8] = &[0x69, 0xe2, 0xbb, 0xb0, 0xa8, 0xc2, 0xe1, 0xb8, 0xb1, 0x5c];

/// [`LINEAGE_OID`] as arcs, for writers.
pub const LINEAGE_ARCS: &[u64] = &[2, 25, 7_095_070_761_511_950_556];

/// meshid's app-SVID mark: the certificate was issued for the app behind a sidecar (the SPIFFE
/// Workload API), with the sidecar's identity. Peers take it for mTLS like any other; the CA never
/// takes it as the caller's credential (renewal, JWT-SVIDs, bundle streams, acknowledgements), so
/// app code holding it cannot renew it nor stand for its sidecar. Non-critical; its value is a DER
/// NULL, and its presence alone marks the certificate. OID `2.25.5676117467689322671`.
pub const APP_SVID_OID: &[u8] = &[0x69, 0xce, 0xe2, 0xe7, 0xd8, 0xb7, 0xa8, 0x8c, 0x91, 0x2f];

/// [`APP_SVID_OID`] as arcs, for writers.
pub const APP_SVID_ARCS: &[u64] = &[2, 25, 5_676_117_467_689_322_671];

/// The value of the app-SVID extension: a DER NULL.
pub const APP_SVID_VALUE: &[u8] = &[0x05, 0x00];

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
    /// When the identity was last attested (Unix seconds), from meshid's attested-at extension;
    /// `None` when the certificate has none (see [`attested_at_from_der`]).
    pub attested_at: Option<i64>,
    /// The serial (lowercase hex, no leading zeros, as revocations name serials) of the first
    /// certificate of its lineage of renewals, from meshid's lineage extension; `None` when it has
    /// none (the certificate starts its own lineage).
    pub lineage: Option<String>,
    /// Whether it carries meshid's app-SVID mark ([`APP_SVID_OID`]).
    pub app_svid: bool,
}

impl CertIdentity {
    /// The serial that names its lineage: the lineage extension's, else its own.
    pub fn lineage_serial(&self) -> &str {
        self.lineage.as_deref().unwrap_or(&self.serial_hex)
    }
}

/// Extracts the one SPIFFE ID of a DER workload certificate.
pub fn spiffe_id_from_der(der: &[u8]) -> Result<SpiffeId, IdentityError> {
    let cert = parse(der)?;
    spiffe_id_of(&cert)
}

/// Extracts the SPIFFE ID plus serial, validity, issuer and attested-at time of a DER workload
/// certificate. A malformed attested-at extension is an error (see [`attested_at_from_der`]).
pub fn cert_identity_from_der(der: &[u8]) -> Result<CertIdentity, IdentityError> {
    let cert = parse(der)?;
    let id = spiffe_id_of(&cert)?;
    Ok(CertIdentity {
        id,
        serial_hex: hex(cert.raw_serial()),
        not_before: cert.validity().not_before.timestamp(),
        not_after: cert.validity().not_after.timestamp(),
        issuer: cert.issuer().to_string(),
        attested_at: attested_at_of(&cert)?,
        lineage: lineage_of(&cert)?,
        app_svid: cert
            .extensions()
            .iter()
            .any(|e| e.oid.as_bytes() == APP_SVID_OID),
    })
}

/// The value of the lineage extension for a serial's bytes: a DER OCTET STRING (at most 20 bytes,
/// as RFC 5280 bounds serials; longer input is cut, which no serial of ours needs).
pub fn lineage_extension_value(serial: &[u8]) -> Vec<u8> {
    let serial = &serial[..serial.len().min(20)];
    let mut out = Vec::with_capacity(2 + serial.len());
    out.push(0x04);
    out.push(serial.len() as u8);
    out.extend_from_slice(serial);
    out
}

/// The lineage serial of a certificate, normalized (lowercase hex, no leading zeros). Malformed (not
/// exactly one DER OCTET STRING of 1 to 20 bytes, or the extension twice) is an error, never read
/// as absent: absent starts a new lineage, which would escape a revoked one.
fn lineage_of(cert: &X509Certificate<'_>) -> Result<Option<String>, IdentityError> {
    let bad = IdentityError::MalformedLineage;
    let mut found = cert
        .extensions()
        .iter()
        .filter(|e| e.oid.as_bytes() == LINEAGE_OID);
    let Some(ext) = found.next() else {
        return Ok(None);
    };
    if found.next().is_some() {
        return Err(bad("the extension appears twice"));
    }
    let [0x04, len, content @ ..] = ext.value else {
        return Err(bad("not a DER OCTET STRING"));
    };
    if usize::from(*len) != content.len() || content.is_empty() || content.len() > 20 {
        return Err(bad("bad OCTET STRING length or bytes after it"));
    }
    let digits = hex(content);
    let trimmed = digits.trim_start_matches('0');
    Ok(Some(
        if trimmed.is_empty() { "0" } else { trimmed }.to_owned(),
    ))
}

/// When the identity of a DER certificate was last attested (Unix seconds): `Ok(None)` when it has
/// no attested-at extension (certificates of other issuers, or of meshid CAs before the extension).
///
/// A malformed extension is an error, never read as absent: the CA counts a certificate without the
/// extension as attested at its not-before, so reading a damaged one as absent would restart the
/// lineage it is meant to bound. Malformed means: the value is not exactly one minimally encoded DER
/// INTEGER that fits in 64 bits, or the extension appears more than once.
pub fn attested_at_from_der(der: &[u8]) -> Result<Option<i64>, IdentityError> {
    attested_at_of(&parse(der)?)
}

/// The value of the attested-at extension for `unix_seconds`: a DER INTEGER, minimally encoded.
pub fn attested_at_extension_value(unix_seconds: i64) -> Vec<u8> {
    let bytes = unix_seconds.to_be_bytes();
    // Drop leading bytes that only repeat the sign of the next one (DER's minimal two's complement).
    let mut start = 0;
    while start < bytes.len() - 1 {
        let (b, next) = (bytes[start], bytes[start + 1]);
        if (b == 0x00 && next & 0x80 == 0) || (b == 0xff && next & 0x80 != 0) {
            start += 1;
        } else {
            break;
        }
    }
    let content = &bytes[start..];
    let mut out = Vec::with_capacity(2 + content.len());
    out.push(0x02);
    out.push(content.len() as u8);
    out.extend_from_slice(content);
    out
}

fn attested_at_of(cert: &X509Certificate<'_>) -> Result<Option<i64>, IdentityError> {
    let mut found = cert
        .extensions()
        .iter()
        .filter(|e| e.oid.as_bytes() == ATTESTED_AT_OID);
    let Some(ext) = found.next() else {
        return Ok(None);
    };
    if found.next().is_some() {
        return Err(IdentityError::MalformedAttestedAt(
            "the extension appears twice",
        ));
    }
    decode_integer(ext.value).map(Some)
}

/// A DER INTEGER (tag, short length, minimal content) of at most 8 bytes, and nothing after it.
fn decode_integer(value: &[u8]) -> Result<i64, IdentityError> {
    let bad = IdentityError::MalformedAttestedAt;
    let [tag, len, content @ ..] = value else {
        return Err(bad("not a DER INTEGER"));
    };
    if *tag != 0x02 {
        return Err(bad("not a DER INTEGER"));
    }
    if usize::from(*len) != content.len() || *len == 0 {
        return Err(bad("bad INTEGER length or bytes after it"));
    }
    if content.len() > 8 {
        return Err(bad("the time does not fit in 64 bits"));
    }
    if let [first, second, ..] = content
        && ((*first == 0x00 && second & 0x80 == 0) || (*first == 0xff && second & 0x80 != 0))
    {
        return Err(bad("the INTEGER is not minimally encoded"));
    }
    let fill = if content[0] & 0x80 != 0 { 0xff } else { 0x00 };
    let mut bytes = [fill; 8];
    bytes[8 - content.len()..].copy_from_slice(content);
    Ok(i64::from_be_bytes(bytes))
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
    // X509-SVID 5.2: a leaf's key usage must not allow keyCertSign or cRLSign (webpki does not
    // read key usage). A duplicated extension is refused too.
    match cert.key_usage() {
        Ok(None) => {}
        Ok(Some(ku)) if !ku.value.key_cert_sign() && !ku.value.crl_sign() => {}
        Ok(Some(_)) | Err(_) => return Err(IdentityError::SigningKeyUsage),
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

    // ---- the attested-at extension -------------------------------------------------------------

    /// Base-128 arcs of an OID's content octets (the first byte holds the first two arcs).
    fn base128(mut n: u128) -> Vec<u8> {
        let mut digits = vec![(n & 0x7f) as u8];
        n >>= 7;
        while n > 0 {
            digits.push(0x80 | (n & 0x7f) as u8);
            n >>= 7;
        }
        digits.reverse();
        digits
    }

    #[test]
    fn the_oid_is_the_documented_one() {
        let arc: u128 = 6_861_656_577_709_497_194;
        assert_eq!(u128::from(ATTESTED_AT_ARCS[2]), arc);
        let mut der = vec![40 * 2 + 25];
        der.extend(base128(arc));
        assert_eq!(ATTESTED_AT_OID, der.as_slice());
    }

    /// A workload certificate carrying these raw attested-at extension values (each a DER value).
    /// The first is written under the real OID; further ones (duplicates) under neighbouring arcs of
    /// the same encoded length, then given the real OID (the signature is then wrong: parsing does
    /// not care).
    fn cert_with_attested(values: &[Vec<u8>]) -> Vec<u8> {
        let arc = |i: usize| ATTESTED_AT_ARCS[2] + i as u64;
        let mut params = CertificateParams::default();
        params.subject_alt_names = vec![uri("spiffe://td/a")];
        for (i, v) in values.iter().enumerate() {
            params
                .custom_extensions
                .push(rcgen::CustomExtension::from_oid_content(
                    &[2, 25, arc(i)],
                    v.clone(),
                ));
        }
        let key = KeyPair::generate().unwrap();
        let mut der = params.self_signed(&key).unwrap().der().to_vec();
        let tlv = |content: &[u8]| [&[0x06, content.len() as u8][..], content].concat();
        let to = tlv(ATTESTED_AT_OID);
        for i in 1..values.len() {
            let mut content = vec![40 * 2 + 25];
            content.extend(base128(u128::from(arc(i))));
            let from = tlv(&content);
            assert_eq!(from.len(), to.len(), "a neighbour of the same length");
            let at = der
                .windows(from.len())
                .position(|w| w == from.as_slice())
                .expect("neighbour OID written");
            der[at..at + to.len()].copy_from_slice(&to);
        }
        der
    }

    #[test]
    fn attested_at_round_trips_through_a_certificate() {
        for t in [
            0,
            1,
            127,
            128,
            255,
            256,
            1_700_000_000,
            4_102_444_800,
            -1,
            -128,
            -129,
            i64::MAX,
            i64::MIN,
        ] {
            let value = attested_at_extension_value(t);
            // Minimal: one byte for -128..=127, at most 8 content bytes.
            assert!((3..=10).contains(&value.len()), "{t}: {value:02x?}");
            let der = cert_with_attested(&[value]);
            assert_eq!(attested_at_from_der(&der), Ok(Some(t)), "{t}");
            let info = cert_identity_from_der(&der).unwrap();
            assert_eq!(info.attested_at, Some(t), "{t}");
        }
        assert_eq!(
            attested_at_extension_value(1_700_000_000),
            [2, 4, 0x65, 0x53, 0xf1, 0x00]
        );
    }

    #[test]
    fn a_certificate_without_the_extension_has_no_attested_time() {
        let der = cert_with(vec![uri("spiffe://td/a")], false);
        assert_eq!(attested_at_from_der(&der), Ok(None));
        assert_eq!(cert_identity_from_der(&der).unwrap().attested_at, None);
    }

    #[test]
    fn a_malformed_extension_is_an_error_not_absent() {
        let cases: Vec<(&str, Vec<Vec<u8>>)> = vec![
            ("empty value", vec![vec![]]),
            ("an OCTET STRING", vec![vec![0x04, 0x01, 0x05]]),
            ("a UTCTime", vec![b"\x17\x0d250101000000Z".to_vec()]),
            ("an empty INTEGER", vec![vec![0x02, 0x00]]),
            ("length past the end", vec![vec![0x02, 0x04, 0x65, 0x53]]),
            (
                "a byte after the INTEGER",
                vec![vec![0x02, 0x01, 0x05, 0x00]],
            ),
            ("long-form length", vec![vec![0x02, 0x81, 0x01, 0x05]]),
            (
                "not minimal (leading 0x00)",
                vec![vec![0x02, 0x02, 0x00, 0x05]],
            ),
            (
                "not minimal (leading 0xff)",
                vec![vec![0x02, 0x02, 0xff, 0x80]],
            ),
            (
                "nine bytes",
                vec![[vec![0x02, 0x09, 0x01], vec![0; 8]].concat()],
            ),
            (
                "twice",
                vec![
                    attested_at_extension_value(1),
                    attested_at_extension_value(2),
                ],
            ),
        ];
        for (name, values) in cases {
            let der = cert_with_attested(&values);
            assert!(
                matches!(
                    attested_at_from_der(&der),
                    Err(IdentityError::MalformedAttestedAt(_))
                ),
                "{name}: {:?}",
                attested_at_from_der(&der)
            );
            assert!(
                matches!(
                    cert_identity_from_der(&der),
                    Err(IdentityError::MalformedAttestedAt(_))
                ),
                "{name}"
            );
            // The identity alone is still readable (peers are matched on it, not on the time).
            assert_eq!(
                spiffe_id_from_der(&der).unwrap().as_str(),
                "spiffe://td/a",
                "{name}"
            );
        }
    }

    /// A workload certificate carrying one extension `arcs` of value `value`.
    fn cert_with_extension(arcs: &[u64], value: Vec<u8>) -> Vec<u8> {
        let mut params = CertificateParams::default();
        params.subject_alt_names = vec![uri("spiffe://td/a")];
        params
            .custom_extensions
            .push(rcgen::CustomExtension::from_oid_content(arcs, value));
        let key = KeyPair::generate().unwrap();
        params.self_signed(&key).unwrap().der().to_vec()
    }

    #[test]
    fn the_lineage_and_the_app_svid_mark_are_read_strictly() {
        let plain = cert_with(vec![uri("spiffe://td/a")], false);
        let info = cert_identity_from_der(&plain).unwrap();
        assert_eq!((info.lineage.as_deref(), info.app_svid), (None, false));
        assert_eq!(info.lineage_serial(), info.serial_hex, "its own lineage");

        let serial = [0x00, 0x4a, 0x0b, 0xff];
        let der = cert_with_extension(LINEAGE_ARCS, lineage_extension_value(&serial));
        let info = cert_identity_from_der(&der).unwrap();
        assert_eq!(
            info.lineage.as_deref(),
            Some("4a0bff"),
            "named as revocations name serials"
        );
        assert_eq!(info.lineage_serial(), "4a0bff");

        for (name, value) in [
            ("empty", vec![]),
            ("an INTEGER", vec![0x02, 0x01, 0x05]),
            ("an empty OCTET STRING", vec![0x04, 0x00]),
            ("length past the end", vec![0x04, 0x03, 0x01]),
            ("a byte after it", vec![0x04, 0x01, 0x01, 0x00]),
            ("21 bytes", [vec![0x04, 21], vec![1; 21]].concat()),
        ] {
            let der = cert_with_extension(LINEAGE_ARCS, value);
            assert!(
                matches!(
                    cert_identity_from_der(&der),
                    Err(IdentityError::MalformedLineage(_))
                ),
                "{name}"
            );
        }

        // The mark counts by its presence, whatever its value.
        for value in [APP_SVID_VALUE.to_vec(), vec![], vec![0x01, 0x01, 0x00]] {
            let der = cert_with_extension(APP_SVID_ARCS, value);
            assert!(cert_identity_from_der(&der).unwrap().app_svid);
        }
    }
}
