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

/// The earliest not-after (seconds since the epoch) of the certificates of `presented` (a
/// verified chain, leaf first): when the chain stops verifying by the clock. An issuer outside
/// meshid may issue a leaf that outlives its intermediate; a connection must not. `None` when
/// none can be read.
pub fn chain_not_after(presented: &[CertificateDer<'_>]) -> Option<i64> {
    presented
        .iter()
        .filter_map(|der| {
            x509_parser::parse_x509_certificate(der)
                .ok()
                .map(|(_, cert)| cert.validity().not_after.timestamp())
        })
        .min()
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
