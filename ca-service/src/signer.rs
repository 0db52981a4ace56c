//! Writing workload certificates: everything in them comes from the authenticated identity and the CA's
//! own settings; only the public key comes from the caller.

use std::time::Duration as StdDuration;

use meshid_identity::identity::{attested_at_extension_value, lineage_extension_value};
use meshid_identity::{APP_SVID_ARCS, APP_SVID_VALUE, ATTESTED_AT_ARCS, LINEAGE_ARCS, SpiffeId};
use rcgen::{
    CertificateParams, CustomExtension, DistinguishedName, ExtendedKeyUsagePurpose, IsCa,
    KeyUsagePurpose, SanType,
};
use rustls_pki_types::CertificateDer;
use time::{Duration, OffsetDateTime};

use crate::authority::Authority;
use crate::csr::CsrPublicKey;
use crate::serial::random_serial;

/// How far a leaf's not-before is backdated, whatever its lifetime: a workload whose clock is up to
/// this much behind the CA's (or whose clock was just stepped back by that much) still takes its
/// fresh certificate, and its peers' fresh ones, as valid. Kubernetes' CSR signer backdates by the
/// same 5 minutes. Renewal timing ignores it (`meshid_identity::timing::refresh_in`).
pub const BACKDATE: StdDuration = StdDuration::from_secs(300);

/// Lifetimes the CA hands out.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LifetimePolicy {
    /// Used when the caller asks for none.
    pub default: StdDuration,
    /// The most a caller may ask for.
    pub max: StdDuration,
}

impl LifetimePolicy {
    /// The lifetime for a request: the default for 0, else the request capped by the maximum.
    pub fn lifetime_for(&self, requested_secs: u32) -> StdDuration {
        if requested_secs == 0 {
            self.default.min(self.max)
        } else {
            StdDuration::from_secs(u64::from(requested_secs)).min(self.max)
        }
    }
}

impl Default for LifetimePolicy {
    fn default() -> Self {
        Self {
            default: StdDuration::from_secs(3600),
            max: StdDuration::from_secs(24 * 3600),
        }
    }
}

/// A freshly signed leaf.
#[derive(Debug, Clone)]
pub struct Issued {
    /// Leaf, then the intermediate.
    pub chain: Vec<CertificateDer<'static>>,
    pub not_before: OffsetDateTime,
    pub not_after: OffsetDateTime,
    /// The leaf's serial, lowercase hex.
    pub serial_hex: String,
}

/// Where a leaf stands in its lineage: what a renewal carries on from the certificate it renews.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Lineage {
    /// When the identity was last attested (Unix seconds); `None`: now.
    pub attested_at: Option<i64>,
    /// The serial bytes of the first certificate of the lineage; `None`: this leaf starts one (it
    /// carries its own serial).
    pub first_serial: Option<Vec<u8>>,
    /// Mark the leaf as an app SVID ([`meshid_identity::APP_SVID_OID`]).
    pub app_svid: bool,
}

/// Why a leaf could not be signed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum SignError {
    #[error("the signing intermediate has expired")]
    IntermediateExpired,
    #[error("signing failed: {0}")]
    Rcgen(#[from] rcgen::Error),
    #[error("signing failed: the attested-at extension was not written as intended")]
    AttestedAt,
    #[error("signing failed: the lineage extension was not written as intended")]
    Lineage,
}

/// Signs a workload certificate for `id` over `key` whose identity was attested just now (a token or
/// a join token): [`sign_leaf_attested`] with `attested_at` = `now`.
pub fn sign_leaf(
    authority: &Authority,
    id: &SpiffeId,
    key: &CsrPublicKey,
    lifetime: StdDuration,
    now: OffsetDateTime,
) -> Result<Issued, SignError> {
    sign_leaf_attested(authority, id, key, lifetime, now, now.unix_timestamp())
}

/// Signs a workload certificate for `id` over `key`, valid for `lifetime` from `now` (capped by the
/// intermediate's expiry), not-before backdated by [`BACKDATE`]. It carries
/// `attested_at` (Unix seconds: when the identity was last attested) in meshid's attested-at
/// extension ([`ATTESTED_AT_OID`], non-critical, a DER INTEGER).
pub fn sign_leaf_attested(
    authority: &Authority,
    id: &SpiffeId,
    key: &CsrPublicKey,
    lifetime: StdDuration,
    now: OffsetDateTime,
    attested_at: i64,
) -> Result<Issued, SignError> {
    let lineage = Lineage {
        attested_at: Some(attested_at),
        ..Lineage::default()
    };
    sign_leaf_in(authority, id, key, lifetime, now, &lineage)
}

/// [`sign_leaf_attested`] in `lineage`: the leaf also carries the serial of the first certificate
/// of its lineage (its own when it starts one) in meshid's lineage extension
/// ([`meshid_identity::LINEAGE_OID`]), and the app-SVID mark when asked.
pub fn sign_leaf_in(
    authority: &Authority,
    id: &SpiffeId,
    key: &CsrPublicKey,
    lifetime: StdDuration,
    now: OffsetDateTime,
    lineage: &Lineage,
) -> Result<Issued, SignError> {
    let attested_at = lineage.attested_at.unwrap_or(now.unix_timestamp());
    // A lifetime past the calendar (year 9999) ends with the intermediate too.
    let not_after = now
        .checked_add(to_time(lifetime))
        .map_or(authority.intermediate_not_after, |t| {
            t.min(authority.intermediate_not_after)
        });
    if not_after <= now {
        return Err(SignError::IntermediateExpired);
    }
    let not_before = now - to_time(BACKDATE);

    let mut params = CertificateParams::default();
    // No subject: the identity is the URI SAN alone (rcgen then marks the SAN critical, as RFC 5280
    // requires for an empty subject).
    params.distinguished_name = DistinguishedName::new();
    params.subject_alt_names = vec![SanType::URI(id.as_str().try_into()?)];
    params.is_ca = IsCa::ExplicitNoCa;
    params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
    params.extended_key_usages = vec![
        ExtendedKeyUsagePurpose::ServerAuth,
        ExtendedKeyUsagePurpose::ClientAuth,
    ];
    params.use_authority_key_identifier_extension = true;
    let serial = random_serial();
    let first = lineage
        .first_serial
        .clone()
        .unwrap_or_else(|| serial.to_bytes());
    params.serial_number = Some(serial);
    params.not_before = not_before;
    params.not_after = not_after;
    params.custom_extensions = vec![
        CustomExtension::from_oid_content(
            ATTESTED_AT_ARCS,
            attested_at_extension_value(attested_at),
        ),
        CustomExtension::from_oid_content(LINEAGE_ARCS, lineage_extension_value(&first)),
    ];
    if lineage.app_svid {
        params
            .custom_extensions
            .push(CustomExtension::from_oid_content(
                APP_SVID_ARCS,
                APP_SVID_VALUE.to_vec(),
            ));
    }

    let cert = params.signed_by(key, &*authority.issuer)?;
    let leaf = cert.der().clone();
    if meshid_identity::attested_at_from_der(&leaf) != Ok(Some(attested_at)) {
        return Err(SignError::AttestedAt);
    }
    let written = meshid_identity::cert_identity_from_der(&leaf).map_err(|_| SignError::Lineage)?;
    let first_hex =
        meshid_identity::revocation::normalize_serial(&meshid_identity::identity::hex(&first))
            .map_err(|_| SignError::Lineage)?;
    if written.lineage.as_deref() != Some(first_hex.as_str())
        || written.app_svid != lineage.app_svid
    {
        return Err(SignError::Lineage);
    }
    Ok(Issued {
        chain: vec![leaf, authority.intermediate_der.clone()],
        not_before: truncate_secs(not_before),
        not_after: truncate_secs(not_after),
        serial_hex: written.serial_hex,
    })
}

/// The bytes of a serial written in hex (any case, leading zeros or not, as
/// [`meshid_identity::CertIdentity`] and revocations write them); `None` for what is not hex or
/// longer than 20 bytes.
pub fn serial_bytes(hex: &str) -> Option<Vec<u8>> {
    let digits = hex.trim_start_matches('0');
    if digits.is_empty() {
        return Some(vec![0]);
    }
    let padded = if digits.len() % 2 == 1 {
        format!("0{digits}")
    } else {
        digits.to_owned()
    };
    let bytes = padded
        .as_bytes()
        .chunks(2)
        .map(|pair| u8::from_str_radix(std::str::from_utf8(pair).ok()?, 16).ok())
        .collect::<Option<Vec<u8>>>()?;
    (bytes.len() <= 20).then_some(bytes)
}

/// X.509 times have whole seconds.
fn truncate_secs(t: OffsetDateTime) -> OffsetDateTime {
    t.replace_nanosecond(0).unwrap_or(t)
}

/// Lifetimes as `time` durations.
pub fn to_time(d: StdDuration) -> Duration {
    Duration::try_from(d).unwrap_or(Duration::MAX)
}

#[cfg(test)]
mod tests {
    use super::*;
    use meshid_identity::TrustDomain;
    use rcgen::KeyPair;

    fn authority() -> (tempfile::TempDir, Authority) {
        let dir = tempfile::tempdir().unwrap();
        let td = TrustDomain::new("cluster.local").unwrap();
        crate::authority::init(dir.path(), &td, None).unwrap();
        let a = Authority::load(dir.path()).unwrap();
        (dir, a)
    }

    fn csr_key() -> (KeyPair, CsrPublicKey) {
        let key = KeyPair::generate().unwrap();
        let csr = CertificateParams::default()
            .serialize_request(&key)
            .unwrap();
        let pk = CsrPublicKey::from_csr_der(csr.der()).unwrap();
        (key, pk)
    }

    #[test]
    fn leaf_carries_only_what_the_ca_decides() {
        let (_dir, auth) = authority();
        let (key, pk) = csr_key();
        let id = SpiffeId::parse("spiffe://cluster.local/ns/shop/sa/frontend").unwrap();
        let now = OffsetDateTime::now_utc();
        let issued = sign_leaf(&auth, &id, &pk, StdDuration::from_secs(3600), now).unwrap();
        assert_eq!(issued.chain.len(), 2);
        let leaf = &issued.chain[0];
        assert_eq!(meshid_identity::spiffe_id_from_der(leaf).unwrap(), id);

        use x509_parser::prelude::*;
        let (_, cert) = X509Certificate::from_der(leaf).unwrap();
        assert!(!cert.is_ca());
        assert_eq!(
            cert.public_key().subject_public_key.data.as_ref(),
            key.public_key_raw()
        );
        let ku = cert.key_usage().unwrap().unwrap().value;
        assert!(ku.digital_signature() && !ku.key_cert_sign());
        let eku = cert.extended_key_usage().unwrap().unwrap().value;
        assert!(eku.server_auth && eku.client_auth);
        assert!(cert.subject_alternative_name().unwrap().unwrap().critical);
        assert_eq!(cert.raw_serial().len(), 16);
        let lifetime = cert.validity().not_after.timestamp() - now.unix_timestamp();
        assert!((3599..=3600).contains(&lifetime), "{lifetime}");
        let backdate = now.unix_timestamp() - cert.validity().not_before.timestamp();
        assert!((299..=301).contains(&backdate), "{backdate}");
    }

    /// A lifetime past the calendar's end (year 9999) is cut to the intermediate's, as a long one
    /// is: never a panic in the call's task.
    #[test]
    fn a_lifetime_past_the_calendar_ends_with_the_intermediate() {
        let (_dir, auth) = authority();
        let (_, pk) = csr_key();
        let id = SpiffeId::parse("spiffe://cluster.local/ns/a/sa/b").unwrap();
        let now = OffsetDateTime::now_utc();
        for lifetime in [StdDuration::from_secs(1_000_000_000_000), StdDuration::MAX] {
            let issued = sign_leaf(&auth, &id, &pk, lifetime, now).unwrap();
            use x509_parser::prelude::*;
            let (_, cert) = X509Certificate::from_der(&issued.chain[0]).unwrap();
            assert_eq!(
                cert.validity().not_after.timestamp(),
                auth.intermediate_not_after.unix_timestamp()
            );
        }
    }

    #[test]
    fn leaf_carries_the_attested_time_under_a_valid_signature() {
        let (_dir, auth) = authority();
        let (_, pk) = csr_key();
        let id = SpiffeId::parse("spiffe://cluster.local/ns/a/sa/b").unwrap();
        let now = OffsetDateTime::now_utc();
        for (name, attested) in [
            ("fresh (sign_leaf)", None),
            (
                "copied from an earlier leaf",
                Some(now.unix_timestamp() - 7200),
            ),
            ("the epoch", Some(0)),
        ] {
            let issued = match attested {
                None => sign_leaf(&auth, &id, &pk, StdDuration::from_secs(600), now),
                Some(t) => sign_leaf_attested(&auth, &id, &pk, StdDuration::from_secs(600), now, t),
            }
            .unwrap();
            let want = attested.unwrap_or(now.unix_timestamp());

            use x509_parser::prelude::*;
            let (_, leaf) = X509Certificate::from_der(&issued.chain[0]).unwrap();
            let ext: Vec<_> = leaf
                .extensions()
                .iter()
                .filter(|e| e.oid.as_bytes() == meshid_identity::ATTESTED_AT_OID)
                .collect();
            assert_eq!(ext.len(), 1, "{name}");
            assert!(!ext[0].critical, "{name}");
            assert_eq!(ext[0].value, attested_at_extension_value(want), "{name}");
            let info = meshid_identity::cert_identity_from_der(&issued.chain[0]).unwrap();
            assert_eq!(info.attested_at, Some(want), "{name}");
            // The intermediate's signature holds.
            let (_, inter) = X509Certificate::from_der(&issued.chain[1]).unwrap();
            leaf.verify_signature(Some(inter.public_key()))
                .unwrap_or_else(|e| panic!("{name}: {e:?}"));
        }
    }

    #[test]
    fn short_lifetimes_are_backdated_as_far_as_long_ones() {
        // A clock 5 minutes behind takes a 20 s certificate as valid as soon as it is issued.
        let (_dir, auth) = authority();
        let (_, pk) = csr_key();
        let id = SpiffeId::parse("spiffe://cluster.local/ns/a/sa/b").unwrap();
        let now = OffsetDateTime::now_utc();
        let issued = sign_leaf(&auth, &id, &pk, StdDuration::from_secs(20), now).unwrap();
        let backdate = (now - issued.not_before).whole_seconds();
        assert!((299..=301).contains(&backdate), "{backdate}");
        let lifetime = (issued.not_after - now).whole_seconds();
        assert!((19..=20).contains(&lifetime), "{lifetime}");
    }

    #[test]
    fn lifetime_is_capped_by_the_intermediate() {
        let (_dir, auth) = authority();
        let (_, pk) = csr_key();
        let id = SpiffeId::parse("spiffe://cluster.local/ns/a/sa/b").unwrap();
        let late = auth.intermediate_not_after - Duration::seconds(30);
        let issued = sign_leaf(&auth, &id, &pk, StdDuration::from_secs(3600), late).unwrap();
        assert_eq!(issued.not_after, truncate_secs(auth.intermediate_not_after));
        let after = auth.intermediate_not_after + Duration::seconds(1);
        assert!(matches!(
            sign_leaf(&auth, &id, &pk, StdDuration::from_secs(3600), after),
            Err(SignError::IntermediateExpired)
        ));
    }

    #[test]
    fn lifetime_policy() {
        let p = LifetimePolicy {
            default: StdDuration::from_secs(3600),
            max: StdDuration::from_secs(7200),
        };
        assert_eq!(p.lifetime_for(0), StdDuration::from_secs(3600));
        assert_eq!(p.lifetime_for(60), StdDuration::from_secs(60));
        assert_eq!(p.lifetime_for(100_000), StdDuration::from_secs(7200));
    }
}
