//! The peer identity a verifier established during a handshake, handed on to whoever authorizes
//! the connection, so that nobody parses the peer's certificate a second time.
//!
//! rustls keeps no verifier output on the connection, so the inbound verifier records what it
//! established in a small map keyed by the leaf's DER bytes; after the handshake the listener looks
//! the connection's leaf up in it. The value is a pure function of the certificate (its chain is
//! verified at every handshake regardless), so the map is also a cache: a peer reconnecting with
//! the same certificate is not parsed again. It is bounded; past the bound an arbitrary entry goes.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, OnceLock, PoisonError};

use rustls::pki_types::CertificateDer;

use crate::identity::{CertIdentity, IdentityError, cert_identity_from_der};
use crate::pem::sha256_hex;
use crate::spiffe::SpiffeId;

/// Who a verified peer certificate says the peer is.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VerifiedPeer {
    pub id: SpiffeId,
    /// The certificate's not-after (seconds since the epoch).
    pub not_after: i64,
    /// SHA-256 (hex) of the leaf certificate.
    pub cert_sha256: String,
    /// The certificate's serial number as revocations name it
    /// ([`crate::revocation::normalize_serial`]).
    pub serial: String,
    /// The serial of the first certificate of its lineage of renewals, named as `serial` is (its
    /// own serial when it starts one; see [`CertIdentity::lineage_serial`]).
    pub lineage: String,
    /// The chain presented with this leaf (leaf first), kept once for every connection it
    /// authenticated ([`Self::chain_or_init`]): they verify it again when the trust changes.
    chain: OnceLock<Arc<[CertificateDer<'static>]>>,
}

impl VerifiedPeer {
    /// Reads the identity of a leaf whose chain has been verified.
    pub fn from_leaf(leaf: &[u8]) -> Result<Self, IdentityError> {
        let info = cert_identity_from_der(leaf)?;
        let lineage =
            crate::revocation::normalize_serial(info.lineage_serial()).unwrap_or_default();
        let CertIdentity {
            id,
            not_after,
            serial_hex,
            ..
        } = info;
        Ok(Self {
            id,
            not_after,
            cert_sha256: sha256_hex(leaf),
            serial: crate::revocation::normalize_serial(&serial_hex).unwrap_or_default(),
            lineage,
            chain: OnceLock::new(),
        })
    }

    /// The chain this leaf came with, copied from `presented` (leaf first) the first time: every
    /// connection of the same certificate shares the one copy, not one each (about 1 KiB of DER,
    /// against some 11 KiB per idle connection in all). The leaf's issuer is fixed by its
    /// signature, so a later connection's chain verifies as the first one does.
    pub fn chain_or_init(
        &self,
        presented: &[CertificateDer<'_>],
    ) -> Arc<[CertificateDer<'static>]> {
        self.chain
            .get_or_init(|| presented.iter().map(|c| c.clone().into_owned()).collect())
            .clone()
    }
}

/// The earliest not-after (seconds since the epoch) of the certificates of `presented` (a chain
/// verified just now, leaf first) that its verification can have used: when the chain stops
/// verifying by the clock. An issuer outside meshid may issue a leaf that outlives its
/// intermediate; a connection must not. Beside the leaf's, an intermediate's counts unless it is
/// self-signed (a root sent along: a trust anchor's own dates are never checked) or was not valid
/// at `now` (a verified path uses none such: an old cross-sign or intermediate left in a chain
/// file must not end every connection at once). `None` when the leaf cannot be read.
pub fn chain_not_after(presented: &[CertificateDer<'_>], now: i64) -> Option<i64> {
    let (leaf, rest) = presented.split_first()?;
    let (_, leaf) = x509_parser::parse_x509_certificate(leaf).ok()?;
    let leaf_end = leaf.validity().not_after.timestamp();
    Some(
        rest.iter()
            .filter_map(|der| {
                let (_, cert) = x509_parser::parse_x509_certificate(der).ok()?;
                let validity = cert.validity();
                let (start, end) = (
                    validity.not_before.timestamp(),
                    validity.not_after.timestamp(),
                );
                let self_signed = cert.subject().as_raw() == cert.issuer().as_raw();
                (!self_signed && start <= now && now <= end).then_some(end)
            })
            .fold(leaf_end, i64::min),
    )
}

/// Identities established by one verifier, by leaf certificate.
#[derive(Debug)]
pub struct VerifiedPeers {
    by_leaf: Mutex<HashMap<Box<[u8]>, Arc<VerifiedPeer>>>,
    capacity: usize,
}

impl Default for VerifiedPeers {
    fn default() -> Self {
        Self::with_capacity(1024)
    }
}

impl VerifiedPeers {
    /// A map of at most `capacity` certificates (at least one).
    pub fn with_capacity(capacity: usize) -> Self {
        Self {
            by_leaf: Mutex::new(HashMap::new()),
            capacity: capacity.max(1),
        }
    }

    /// The identity of `leaf`, from the map or read now (and remembered).
    pub fn establish(&self, leaf: &[u8]) -> Result<Arc<VerifiedPeer>, IdentityError> {
        if let Some(known) = self.get(leaf) {
            return Ok(known);
        }
        let peer = Arc::new(VerifiedPeer::from_leaf(leaf)?);
        let mut map = self.by_leaf.lock().unwrap_or_else(PoisonError::into_inner);
        if map.len() >= self.capacity
            && let Some(any) = map.keys().next().cloned()
        {
            map.remove(&any);
        }
        map.insert(leaf.into(), peer.clone());
        Ok(peer)
    }

    /// What was established for `leaf`, if it is still remembered.
    pub fn get(&self, leaf: &[u8]) -> Option<Arc<VerifiedPeer>> {
        self.by_leaf
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .get(leaf)
            .cloned()
    }

    pub fn len(&self) -> usize {
        self.by_leaf
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

#[cfg(test)]
mod tests {
    use rcgen::{BasicConstraints, CertificateParams, DnType, IsCa, Issuer, KeyPair};
    use time::{Duration, OffsetDateTime};

    use super::*;

    fn ca(name: &str, from: OffsetDateTime, until: OffsetDateTime) -> CertificateParams {
        let mut params = CertificateParams::default();
        params.distinguished_name.push(DnType::CommonName, name);
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params.not_before = from;
        params.not_after = until;
        params
    }

    /// The earliest end among the certificates a verification can have used: the leaf's, an
    /// intermediate's valid now; not an expired one sent along, nor a root's.
    #[test]
    fn a_chain_ends_with_its_first_certificate_to_expire_that_verified_it() {
        let now = OffsetDateTime::now_utc();
        let at = |d: Duration| (now + d).unix_timestamp();
        let root_key = KeyPair::generate().unwrap();
        let root_params = ca("root", now - Duration::days(1), now - Duration::minutes(1));
        let root = root_params.self_signed(&root_key).unwrap();
        let root_issuer = Issuer::new(root_params, root_key);
        let issue = |name: &str, until: Duration| {
            let key = KeyPair::generate().unwrap();
            let params = ca(name, now - Duration::hours(1), now + until);
            let cert = params.signed_by(&key, &root_issuer).unwrap();
            (cert.der().clone(), Issuer::new(params, key))
        };
        let (short, short_issuer) = issue("short", Duration::minutes(5));
        let (expired, _) = issue("expired", Duration::minutes(-5));
        let mut leaf_params = CertificateParams::default();
        leaf_params.not_before = now - Duration::minutes(1);
        leaf_params.not_after = now + Duration::hours(1);
        let leaf = leaf_params
            .signed_by(&KeyPair::generate().unwrap(), &short_issuer)
            .unwrap()
            .der()
            .clone();
        let end = |chain: &[CertificateDer<'_>]| chain_not_after(chain, now.unix_timestamp());
        assert_eq!(
            end(std::slice::from_ref(&leaf)),
            Some(at(Duration::hours(1)))
        );
        assert_eq!(
            end(&[leaf.clone(), short.clone()]),
            Some(at(Duration::minutes(5)))
        );
        // An expired certificate sent along, and a root (expired here: its dates are never
        // checked), change nothing.
        assert_eq!(
            end(&[leaf.clone(), short.clone(), expired, root.der().clone()]),
            Some(at(Duration::minutes(5)))
        );
        assert_eq!(end(&[]), None);
    }
}
