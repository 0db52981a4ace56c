//! Peer certificate verification for mTLS between sidecars, kept in one small module.
//!
//! Workload certificates carry no DNS name, so hostname checks are replaced by identity checks: the
//! chain is verified with webpki against the trust bundle (for client or server auth), then the one URI
//! SAN must be a valid SPIFFE ID in our trust domain (inbound), or exactly the expected ID (outbound).
//!
//! A root may be shared with other issuing CAs (an imported enterprise root). Trust under such a root
//! is pinned to the issuing intermediates the mesh publishes for it ([`Anchors::with_pins`]): a
//! certificate that chains to it is accepted only when one of those intermediates issued it, so a
//! sibling CA under the same root mints nothing a sidecar or the CA accepts.

use std::fmt;
use std::sync::Arc;

use crate::peer::VerifiedPeers;
use crate::revocation::{RevocationSet, RevokedBy};
use crate::{IdentityError, SpiffeId, TrustDomain, spiffe_id_from_der};
use rustls::client::danger::{ServerCertVerified, ServerCertVerifier};
use rustls::crypto::{CryptoProvider, WebPkiSupportedAlgorithms};
use rustls::pki_types::{CertificateDer, ServerName, TrustAnchor, UnixTime};
use rustls::server::danger::{ClientCertVerified, ClientCertVerifier};
use rustls::{CertificateError, DistinguishedName, OtherError};
use x509_parser::prelude::{FromDer, X509Certificate};

/// The handshake-signature methods of a rustls certificate verifier of ours: rustls's own checks,
/// with the verifier's `algs` field (its provider's signature algorithms). Used inside an
/// `impl ServerCertVerifier` or `impl ClientCertVerifier` block.
#[macro_export]
macro_rules! signatures_by_algs {
    () => {
        fn verify_tls12_signature(
            &self,
            message: &[u8],
            cert: &rustls::pki_types::CertificateDer<'_>,
            dss: &rustls::DigitallySignedStruct,
        ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
            rustls::crypto::verify_tls12_signature(message, cert, dss, &self.algs)
        }

        fn verify_tls13_signature(
            &self,
            message: &[u8],
            cert: &rustls::pki_types::CertificateDer<'_>,
            dss: &rustls::DigitallySignedStruct,
        ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
            rustls::crypto::verify_tls13_signature(message, cert, dss, &self.algs)
        }

        fn supported_verify_schemes(&self) -> Vec<rustls::SignatureScheme> {
            self.algs.supported_schemes()
        }
    };
}

/// Why a peer's identity was refused after its chain verified.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum PeerIdentityError {
    #[error("peer certificate has no valid identity: {0}")]
    Identity(#[from] IdentityError),
    #[error("peer {peer} is outside the trust domain {expected}")]
    WrongTrustDomain {
        peer: SpiffeId,
        expected: TrustDomain,
    },
    #[error("server identity is {got}, expected {expected}")]
    UnexpectedServer { got: SpiffeId, expected: SpiffeId },
    #[error(
        "issued by a CA that is not one of the mesh's issuing intermediates (its root is shared \
         with other CAs, so trust under it is pinned to the mesh's own)"
    )]
    UnpinnedIssuer,
}

thread_local! {
    /// The SPIFFE ID a client certificate refused on this thread claimed (if it had a readable
    /// one): the verifier runs inside the poll that fails the handshake, so the accept loop reads
    /// it on the same thread right after ([`take_refused_claim`]).
    static REFUSED_CLAIM: std::cell::RefCell<Option<String>> = const { std::cell::RefCell::new(None) };
}

/// The SPIFFE ID claimed by the client certificate last refused on this thread, cleared as it is
/// read. Unverified: what the refused certificate says, for the record of its handshake failure.
pub fn take_refused_claim() -> Option<String> {
    REFUSED_CLAIM.with(|c| c.borrow_mut().take())
}

/// The trust bundle in the form webpki verifies against.
#[derive(Clone)]
pub struct Anchors {
    chains: Chains,
    /// Certificates and identities refused whatever their chain (`meshid-ca revoke`).
    revoked: Arc<RevocationSet>,
    pub trust_domain: TrustDomain,
}

/// Roots, the pins on them and the intermediates verified under them: what a chain is checked
/// against, whatever its leaf names (a SPIFFE ID for [`Anchors`], a DNS name or an IP address for
/// [`NamedServerVerifier`]).
#[derive(Clone)]
pub struct Chains {
    anchors: Arc<Vec<TrustAnchor<'static>>>,
    pins: Arc<Pins>,
    /// Issuing intermediates whose own path to an anchor verified (see [`IssuerCache`]).
    issuers: Arc<IssuerCache>,
}

/// Issuing intermediates already verified under these anchors, so that the next chain through the
/// same intermediate verifies only its leaf: one ECDSA verification per handshake instead of two
/// (every sidecar of the mesh presents one of a few intermediates). An entry holds exactly what a
/// full path check established about the intermediate and would establish again: its signature
/// under an anchor, its CA constraints and key usage, the pin of its root, and compatibility with
/// the extended key usage asked for (entries are per usage). What changes with time is checked on
/// every use: its validity period. Intermediates under a root with name constraints are never
/// cached (those constraints would not be applied to the leaf), and a new bundle is a new
/// `Anchors` with an empty cache.
#[derive(Default)]
struct IssuerCache(std::sync::RwLock<Vec<CachedIssuer>>);

/// At most this many intermediates are remembered (a mesh has one or two per authority).
const MAX_CACHED_ISSUERS: usize = 8;

struct CachedIssuer {
    der: Vec<u8>,
    usage: webpki::KeyUsage,
    /// The intermediate as an anchor for its leaves: its subject, key and own name constraints.
    anchor: TrustAnchor<'static>,
    not_before: u64,
    not_after: u64,
}

impl IssuerCache {
    fn get(
        &self,
        der: &[u8],
        usage: webpki::KeyUsage,
        now: UnixTime,
    ) -> Option<TrustAnchor<'static>> {
        let now = now.as_secs();
        let held = self.0.read().unwrap_or_else(|p| p.into_inner());
        held.iter()
            .find(|c| c.usage == usage && c.der == der)
            // As webpki checks an intermediate's validity: inclusive at both ends.
            .filter(|c| c.not_before <= now && now <= c.not_after)
            .map(|c| c.anchor.clone())
    }

    fn insert(&self, der: &CertificateDer<'_>, usage: webpki::KeyUsage) {
        let Ok((_, cert)) = X509Certificate::from_der(der) else {
            return;
        };
        let (Ok(not_before), Ok(not_after)) = (
            u64::try_from(cert.validity().not_before.timestamp()),
            u64::try_from(cert.validity().not_after.timestamp()),
        ) else {
            return;
        };
        let Ok(anchor) = webpki::anchor_from_trusted_cert(der) else {
            return;
        };
        let entry = CachedIssuer {
            der: der.to_vec(),
            usage,
            anchor: anchor.to_owned(),
            not_before,
            not_after,
        };
        let mut held = self.0.write().unwrap_or_else(|p| p.into_inner());
        if held.iter().any(|c| c.usage == usage && c.der == entry.der) {
            return;
        }
        if held.len() >= MAX_CACHED_ISSUERS {
            held.remove(0);
        }
        held.push(entry);
    }
}

/// Roots under which only the mesh's own issuing intermediates are trusted.
#[derive(Debug, Default)]
struct Pins {
    /// The pinned roots' public keys, as webpki holds a trust anchor's (the SPKI's content).
    roots: Vec<Vec<u8>>,
    /// The pinned intermediates' public keys (SPKI DER).
    issuers: Vec<Vec<u8>>,
}

impl fmt::Debug for Anchors {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Anchors")
            .field("roots", &self.chains.anchors.len())
            .field("pinned_roots", &self.chains.pins.roots.len())
            .field("revoked", &self.revoked.len())
            .field("trust_domain", &self.trust_domain)
            .finish()
    }
}

impl Chains {
    /// Roots whose trust is pinned as [`Anchors::with_pins`] says.
    pub fn new(
        roots: &[CertificateDer<'static>],
        pinned: &[CertificateDer<'static>],
    ) -> Result<Self, webpki::Error> {
        // webpki takes any certificate as an anchor, basicConstraints unread: a workload's own
        // certificate pasted into a bundle would make its key a root of the trust domain.
        let anchors = roots
            .iter()
            .map(|r| {
                let (_, cert) = X509Certificate::from_der(r).map_err(|_| webpki::Error::BadDer)?;
                if !cert.is_ca() {
                    return Err(webpki::Error::EndEntityUsedAsCa);
                }
                webpki::anchor_from_trusted_cert(r).map(|a| a.to_owned())
            })
            .collect::<Result<Vec<_>, _>>()?;
        let mut pins = Pins::default();
        let mut pin_issuers = Vec::with_capacity(pinned.len());
        for der in pinned {
            let (_, cert) = X509Certificate::from_der(der).map_err(|_| webpki::Error::BadDer)?;
            if !cert.is_ca() {
                return Err(webpki::Error::EndEntityUsedAsCa);
            }
            pin_issuers.push(cert.issuer().as_raw().to_vec());
            pins.issuers.push(cert.public_key().raw.to_vec());
        }
        for (root, anchor) in roots.iter().zip(anchors.iter()) {
            let (_, cert) = X509Certificate::from_der(root).map_err(|_| webpki::Error::BadDer)?;
            if pin_issuers.iter().any(|i| i == cert.subject().as_raw()) {
                pins.roots
                    .push(anchor.subject_public_key_info.as_ref().to_vec());
            }
        }
        Ok(Self {
            anchors: Arc::new(anchors),
            pins: Arc::new(pins),
            issuers: Arc::default(),
        })
    }

    /// Verifies that `end_entity` chains to an anchor for `usage` (through a pinned intermediate
    /// under a pinned root). A chain with more than [`MAX_INTERMEDIATES`] intermediates is
    /// refused unread.
    pub fn verify_chain(
        &self,
        algs: &WebPkiSupportedAlgorithms,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        now: UnixTime,
        usage: webpki::KeyUsage,
    ) -> Result<(), rustls::Error> {
        if intermediates.len() > MAX_INTERMEDIATES {
            return Err(pki_error(webpki::Error::MaximumPathDepthExceeded));
        }
        let cert = webpki::EndEntityCert::try_from(end_entity).map_err(pki_error)?;
        // The one intermediate meshid chains carry, already verified: only the leaf is left.
        if let [issuer] = intermediates
            && let Some(anchor) = self.issuers.get(issuer, usage, now)
        {
            cert.verify_for_usage(
                algs.all,
                std::slice::from_ref(&anchor),
                &[],
                now,
                usage,
                None,
                None,
            )
            .map_err(pki_error)?;
            return Ok(());
        }
        let path = cert
            .verify_for_usage(
                algs.all,
                &self.anchors,
                intermediates,
                now,
                usage,
                None,
                None,
            )
            .map_err(pki_error)?;
        let anchor_key = path.anchor().subject_public_key_info.as_ref();
        if self.pins.roots.iter().any(|r| r.as_slice() == anchor_key) {
            let issuer = path.issuer_spki();
            if !self
                .pins
                .issuers
                .iter()
                .any(|p| p.as_slice() == issuer.as_ref())
            {
                return Err(identity_error(PeerIdentityError::UnpinnedIssuer));
            }
        }
        if let [issuer] = intermediates
            && path.anchor().name_constraints.is_none()
            && path
                .intermediate_certificates()
                .next()
                .is_some_and(|used| used.der().as_ref() == issuer.as_ref())
        {
            self.issuers.insert(issuer, usage);
        }
        Ok(())
    }

    #[cfg(test)]
    fn cached_issuers(&self) -> usize {
        self.issuers.0.read().map(|h| h.len()).unwrap_or(0)
    }
}

impl Anchors {
    /// Parses bundle roots into trust anchors for `trust_domain`.
    pub fn new(
        roots: &[CertificateDer<'static>],
        trust_domain: TrustDomain,
    ) -> Result<Self, webpki::Error> {
        Self::with_pins(roots, &[], trust_domain)
    }

    /// Trust anchors whose roots are pinned to issuing intermediates: a root that issued one of
    /// `pinned` (its subject is the intermediate's issuer) accepts only certificates that one of
    /// `pinned` issued. Roots that issued none of them accept any path, as with [`Anchors::new`].
    pub fn with_pins(
        roots: &[CertificateDer<'static>],
        pinned: &[CertificateDer<'static>],
        trust_domain: TrustDomain,
    ) -> Result<Self, webpki::Error> {
        Ok(Self {
            chains: Chains::new(roots, pinned)?,
            revoked: Arc::default(),
            trust_domain,
        })
    }

    /// These anchors refusing, whatever their chain, the certificates and identities `revoked`
    /// names (the failure label is `revoked`).
    pub fn with_revocations(mut self, revoked: Arc<RevocationSet>) -> Self {
        self.revoked = revoked;
        self
    }

    /// The revocations these anchors apply.
    pub fn revocations(&self) -> &RevocationSet {
        &self.revoked
    }

    /// What revokes `peer`, if anything does: its identity or its own serial, or else its
    /// lineage's.
    pub fn revokes(&self, peer: &crate::peer::VerifiedPeer) -> Option<RevokedBy> {
        if let Some(entry) = self.revoked.check(&peer.id, &peer.serial) {
            return Some(RevokedBy {
                entry,
                through_lineage: false,
            });
        }
        self.revoked
            .check(&peer.id, &peer.lineage)
            .map(|entry| RevokedBy {
                entry,
                through_lineage: true,
            })
    }

    /// Refuses a revoked certificate or identity, or a certificate renewed from a revoked one (a
    /// revoked serial of its `lineage`).
    fn check_revoked(
        &self,
        id: &SpiffeId,
        serial: &str,
        lineage: &str,
    ) -> Result<(), rustls::Error> {
        match self
            .revoked
            .check(id, serial)
            .or_else(|| self.revoked.check(id, lineage))
        {
            None => Ok(()),
            Some(_) => Err(rustls::Error::InvalidCertificate(CertificateError::Revoked)),
        }
    }

    /// How many verified intermediates are remembered.
    #[cfg(test)]
    fn cached_issuers(&self) -> usize {
        self.chains.cached_issuers()
    }

    /// How many roots are pinned to intermediates.
    pub fn pinned_roots(&self) -> usize {
        self.chains.pins.roots.len()
    }

    /// Verifies a workload chain (leaf first) for `usage` at `now`: it chains to an anchor, and
    /// under a pinned root one of the mesh's intermediates issued the leaf. The identity is not
    /// read here (see the verifiers).
    pub fn verify_workload_chain(
        &self,
        algs: &WebPkiSupportedAlgorithms,
        chain: &[CertificateDer<'_>],
        now: UnixTime,
        usage: webpki::KeyUsage,
    ) -> Result<(), rustls::Error> {
        let (leaf, intermediates) = chain
            .split_first()
            .ok_or(rustls::Error::NoCertificatesPresented)?;
        self.verify_chain(algs, leaf, intermediates, now, usage)
    }

    pub fn len(&self) -> usize {
        self.chains.anchors.len()
    }

    pub fn is_empty(&self) -> bool {
        self.chains.anchors.is_empty()
    }

    /// Verifies that `end_entity` chains to an anchor for `usage` (through a pinned intermediate
    /// under a pinned root).
    pub fn verify_chain(
        &self,
        algs: &WebPkiSupportedAlgorithms,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        now: UnixTime,
        usage: webpki::KeyUsage,
    ) -> Result<(), rustls::Error> {
        self.chains
            .verify_chain(algs, end_entity, intermediates, now, usage)
    }

    /// Refuses an identity outside our trust domain.
    fn check_domain(&self, id: &SpiffeId) -> Result<(), rustls::Error> {
        if id.trust_domain_name() != self.trust_domain.as_str() {
            return Err(identity_error(PeerIdentityError::WrongTrustDomain {
                peer: id.clone(),
                expected: self.trust_domain.clone(),
            }));
        }
        Ok(())
    }

    /// Verifies `end_entity` chains to an anchor for `usage`, then reads its SPIFFE ID.
    fn verify(
        &self,
        algs: &WebPkiSupportedAlgorithms,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        now: UnixTime,
        usage: webpki::KeyUsage,
    ) -> Result<SpiffeId, rustls::Error> {
        self.verify_chain(algs, end_entity, intermediates, now, usage)?;
        let id = spiffe_id_from_der(end_entity).map_err(|e| identity_error(e.into()))?;
        self.check_domain(&id)?;
        Ok(id)
    }
}

fn identity_error(e: PeerIdentityError) -> rustls::Error {
    rustls::Error::InvalidCertificate(CertificateError::Other(OtherError(Arc::new(e))))
}

/// webpki's errors in rustls's terms (as rustls's own verifier maps them).
/// The most certificates a peer's chain may carry past its leaf: meshid chains carry one (the
/// CA's intermediate), a client that sends the root as well two. Every other one is work: webpki
/// tries each path through what it is given, up to 100 signature checks, and a client with no
/// key at all can send a handful of certificates named as the mesh's root (its name is public)
/// that fan out into that many P-256 verifications per handshake, before its CertificateVerify.
/// With two the worst is a few.
pub const MAX_INTERMEDIATES: usize = 2;

fn pki_error(error: webpki::Error) -> rustls::Error {
    use webpki::Error::*;
    let e = match error {
        BadDer | BadDerTime | TrailingData(_) => CertificateError::BadEncoding,
        CertNotValidYet { .. } => CertificateError::NotValidYet,
        CertExpired { .. } => CertificateError::Expired,
        UnknownIssuer => CertificateError::UnknownIssuer,
        CertNotValidForName(_) => CertificateError::NotValidForName,
        CertRevoked => CertificateError::Revoked,
        RequiredEkuNotFoundContext(_) | EmptyEkuExtension => CertificateError::InvalidPurpose,
        InvalidSignatureForPublicKey | UnsupportedSignatureAlgorithmForPublicKeyContext(_) => {
            CertificateError::BadSignature
        }
        CaUsedAsEndEntity => CertificateError::Other(OtherError(Arc::new(
            PeerIdentityError::Identity(IdentityError::IsCa),
        ))),
        other => CertificateError::Other(OtherError(Arc::new(PkiError(other)))),
    };
    rustls::Error::InvalidCertificate(e)
}

#[derive(Debug)]
struct PkiError(webpki::Error);

impl fmt::Display for PkiError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:?}", self.0)
    }
}

impl std::error::Error for PkiError {}

/// A handshake failure as a person reads it (logs, `x-meshid-reason`): rustls prints errors it
/// carries for a verifier with `Debug`; this prints ours with their own messages, then the label.
pub fn describe(error: &rustls::Error) -> String {
    let text = match error {
        rustls::Error::InvalidCertificate(CertificateError::Other(OtherError(inner))) => {
            format!("invalid peer certificate: {inner}")
        }
        other => other.to_string(),
    };
    format!("{text} ({})", failure_label(error))
}

/// A short, fixed label for a handshake failure (metrics) — derived from the rustls error.
pub fn failure_label(error: &rustls::Error) -> &'static str {
    match error {
        rustls::Error::NoCertificatesPresented => "no_client_cert",
        rustls::Error::InvalidCertificate(e) => match e {
            CertificateError::Expired | CertificateError::ExpiredContext { .. } => "expired",
            CertificateError::NotValidYet | CertificateError::NotValidYetContext { .. } => {
                "not_yet_valid"
            }
            CertificateError::UnknownIssuer => "unknown_ca",
            CertificateError::BadSignature => "bad_signature",
            CertificateError::BadEncoding => "bad_encoding",
            CertificateError::Revoked => "revoked",
            CertificateError::InvalidPurpose | CertificateError::InvalidPurposeContext { .. } => {
                "wrong_purpose"
            }
            CertificateError::Other(OtherError(inner)) => {
                match inner.downcast_ref::<PeerIdentityError>() {
                    Some(PeerIdentityError::WrongTrustDomain { .. }) => "wrong_trust_domain",
                    Some(PeerIdentityError::UnexpectedServer { .. }) => "unexpected_identity",
                    Some(PeerIdentityError::UnpinnedIssuer) => "unpinned_issuer",
                    Some(PeerIdentityError::Identity(IdentityError::IsCa)) => "ca_as_leaf",
                    Some(PeerIdentityError::Identity(_)) => "bad_identity",
                    None => match inner.downcast_ref::<PkiError>() {
                        Some(PkiError(
                            webpki::Error::EndEntityUsedAsCa
                            | webpki::Error::PathLenConstraintViolated
                            | webpki::Error::MaximumPathDepthExceeded
                            | webpki::Error::MaximumPathBuildCallsExceeded
                            | webpki::Error::MaximumSignatureChecksExceeded,
                        )) => "bad_chain",
                        _ => "bad_certificate",
                    },
                }
            }
            _ => "bad_certificate",
        },
        rustls::Error::InvalidMessage(_) | rustls::Error::InappropriateMessage { .. } => "protocol",
        rustls::Error::InappropriateHandshakeMessage { .. } => "protocol",
        rustls::Error::PeerIncompatible(_) => "incompatible",
        rustls::Error::AlertReceived(_) => "alert_received",
        _ => "other",
    }
}

/// Inbound: a client certificate is required, must chain to the bundle for client auth, and must carry
/// one SPIFFE ID of our trust domain. Which peers may talk is decided later by the policy, which
/// finds the identity established here in [`VerifiedPeers`].
#[derive(Debug)]
pub struct SpiffeClientVerifier {
    anchors: Anchors,
    algs: WebPkiSupportedAlgorithms,
    peers: Arc<VerifiedPeers>,
}

impl SpiffeClientVerifier {
    pub fn new(anchors: Anchors, provider: &CryptoProvider, peers: Arc<VerifiedPeers>) -> Self {
        Self {
            anchors,
            algs: provider.signature_verification_algorithms,
            peers,
        }
    }

    /// The chain, then the identity: the whole verdict on a client certificate.
    fn check_client(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        now: UnixTime,
    ) -> Result<ClientCertVerified, rustls::Error> {
        self.anchors.verify_chain(
            &self.algs,
            end_entity,
            intermediates,
            now,
            webpki::KeyUsage::client_auth(),
        )?;
        let peer = self
            .peers
            .establish(end_entity)
            .map_err(|e| identity_error(e.into()))?;
        self.anchors.check_domain(&peer.id)?;
        self.anchors
            .check_revoked(&peer.id, &peer.serial, &peer.lineage)?;
        Ok(ClientCertVerified::assertion())
    }
}

impl ClientCertVerifier for SpiffeClientVerifier {
    fn root_hint_subjects(&self) -> &[DistinguishedName] {
        &[]
    }

    fn verify_client_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        now: UnixTime,
    ) -> Result<ClientCertVerified, rustls::Error> {
        let verdict = self.check_client(end_entity, intermediates, now);
        if verdict.is_err() {
            // What the refused certificate claims, for the handshake failure's record.
            let claimed = spiffe_id_from_der(end_entity).ok().map(|id| id.to_string());
            REFUSED_CLAIM.with(|c| c.replace(claimed));
        }
        verdict
    }

    crate::signatures_by_algs!();
}

/// Outbound: the server's chain must verify for server auth and its SPIFFE ID must be exactly the
/// expected one. The TLS server name is not checked: workload certificates carry no DNS names.
#[derive(Debug)]
pub struct SpiffeServerVerifier {
    anchors: Anchors,
    expected: SpiffeId,
    algs: WebPkiSupportedAlgorithms,
}

impl SpiffeServerVerifier {
    pub fn new(anchors: Anchors, expected: SpiffeId, provider: &CryptoProvider) -> Self {
        Self {
            anchors,
            expected,
            algs: provider.signature_verification_algorithms,
        }
    }
}

impl ServerCertVerifier for SpiffeServerVerifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        let got = self.anchors.verify(
            &self.algs,
            end_entity,
            intermediates,
            now,
            webpki::KeyUsage::server_auth(),
        )?;
        if got != self.expected {
            return Err(identity_error(PeerIdentityError::UnexpectedServer {
                got,
                expected: self.expected.clone(),
            }));
        }
        // Read whole every time, as the inbound reads a client's: a leaf whose lineage or
        // attested-at extension cannot be read is refused here, not accepted while nothing is
        // revoked (its connection could then never be matched against a later revocation).
        let (serial, lineage) = crate::identity::cert_identity_from_der(end_entity)
            .map(|c| {
                let normalize =
                    |s: &str| crate::revocation::normalize_serial(s).unwrap_or_default();
                (normalize(&c.serial_hex), normalize(c.lineage_serial()))
            })
            .map_err(|e| identity_error(e.into()))?;
        if !self.anchors.revoked.is_empty() {
            self.anchors.check_revoked(&got, &serial, &lineage)?;
        }
        Ok(ServerCertVerified::assertion())
    }

    crate::signatures_by_algs!();
}

/// Splits a trust bundle given as one list of certificates (a PEM file of roots, and of the
/// issuing intermediates trust under a shared root is pinned to) into its roots and its pins. A
/// pin is a CA certificate that is not self-issued and whose issuer is another certificate of the
/// list; every other certificate is a root (an intermediate given alone stays an anchor, as
/// before pins existed).
pub fn split_pins(
    certs: Vec<CertificateDer<'static>>,
) -> (Vec<CertificateDer<'static>>, Vec<CertificateDer<'static>>) {
    // Each certificate's subject, issuer and whether it is a CA (None: not X.509).
    type Names = (Vec<u8>, Vec<u8>, bool);
    let names: Vec<Option<Names>> = certs
        .iter()
        .map(|der| {
            X509Certificate::from_der(der).ok().map(|(_, c)| {
                (
                    c.subject().as_raw().to_vec(),
                    c.issuer().as_raw().to_vec(),
                    c.is_ca(),
                )
            })
        })
        .collect();
    let is_pin = |i: usize| {
        let Some((subject, issuer, true)) = &names[i] else {
            return false;
        };
        subject != issuer
            && names
                .iter()
                .enumerate()
                .any(|(j, n)| j != i && n.as_ref().is_some_and(|(s, _, _)| s == issuer))
    };
    let pins: Vec<bool> = (0..certs.len()).map(is_pin).collect();
    let mut roots = Vec::new();
    let mut pinned = Vec::new();
    for (cert, pin) in certs.into_iter().zip(pins) {
        if pin {
            pinned.push(cert);
        } else {
            roots.push(cert);
        }
    }
    (roots, pinned)
}

/// The trust anchors to hand a verifier that knows nothing of pins (an app, through the SPIFFE
/// Workload API): every root, except that a root trust under which is pinned is replaced by the
/// intermediates it is pinned to. An app given the shared root itself would accept a certificate
/// with our SPIFFE IDs from any sibling CA under it; given the intermediates, it accepts what the
/// sidecars accept. (An OpenSSL-based verifier needs partial-chain verification to take an
/// intermediate as an anchor; Go's and Java's take it as it is.)
pub fn anchors_without_pins(
    roots: &[CertificateDer<'static>],
    pinned: &[CertificateDer<'static>],
) -> Vec<CertificateDer<'static>> {
    let issuers: Vec<Option<Vec<u8>>> = pinned
        .iter()
        .map(|p| {
            X509Certificate::from_der(p)
                .ok()
                .map(|(_, c)| c.issuer().as_raw().to_vec())
        })
        .collect();
    let mut out = Vec::with_capacity(roots.len() + pinned.len());
    for root in roots {
        let subject = X509Certificate::from_der(root)
            .ok()
            .map(|(_, c)| c.subject().as_raw().to_vec());
        let mine: Vec<&CertificateDer<'static>> = pinned
            .iter()
            .zip(&issuers)
            .filter(|(_, issuer)| issuer.is_some() && *issuer == &subject)
            .map(|(p, _)| p)
            .collect();
        if mine.is_empty() {
            out.push(root.clone());
        } else {
            for p in mine {
                if !out.contains(p) {
                    out.push(p.clone());
                }
            }
        }
    }
    out
}

/// A server named by a DNS name or an IP address, as the meshid CA's TLS port is: its chain must
/// verify for server auth under the roots (through one of the pinned intermediates under a pinned
/// root, as for peers) and its certificate must be valid for the name dialled. Without the pins, a
/// sibling CA under a shared enterprise root could serve a certificate for the CA's name, and a
/// sidecar would hand it its service-account token.
#[derive(Debug)]
pub struct NamedServerVerifier {
    chains: Chains,
    algs: WebPkiSupportedAlgorithms,
}

impl fmt::Debug for Chains {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Chains")
            .field("roots", &self.anchors.len())
            .field("pinned_roots", &self.pins.roots.len())
            .finish()
    }
}

impl NamedServerVerifier {
    pub fn new(chains: Chains, provider: &CryptoProvider) -> Self {
        Self {
            chains,
            algs: provider.signature_verification_algorithms,
        }
    }
}

impl ServerCertVerifier for NamedServerVerifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        self.chains.verify_chain(
            &self.algs,
            end_entity,
            intermediates,
            now,
            webpki::KeyUsage::server_auth(),
        )?;
        webpki::EndEntityCert::try_from(end_entity)
            .and_then(|cert| cert.verify_is_valid_for_subject_name(server_name))
            .map_err(pki_error)?;
        Ok(ServerCertVerified::assertion())
    }

    crate::signatures_by_algs!();
}

#[cfg(test)]
mod tests {
    use rcgen::ExtendedKeyUsagePurpose;
    use time::Duration;

    use super::*;
    use crate::revocation::Revoked;
    use crate::testing::{LeafShape, TestLeaf, TestPki};

    const ME: &str = "spiffe://cluster.local/ns/shop/sa/payments";
    const PEER: &str = "spiffe://cluster.local/ns/shop/sa/frontend";

    fn provider() -> CryptoProvider {
        rustls::crypto::aws_lc_rs::default_provider()
    }

    fn anchors(pki: &TestPki) -> Anchors {
        Anchors::new(
            std::slice::from_ref(&pki.root),
            TrustDomain::new("cluster.local").unwrap(),
        )
        .unwrap()
    }

    fn client_verdict(
        verifier: &SpiffeClientVerifier,
        leaf: &TestLeaf,
    ) -> Result<(), &'static str> {
        verifier
            .verify_client_cert(&leaf.chain[0], &leaf.chain[1..], UnixTime::now())
            .map(|_| ())
            .map_err(|e| failure_label(&e))
    }

    struct Case {
        name: &'static str,
        leaf: TestLeaf,
        /// `Ok` or the failure label the metrics would carry.
        inbound: Result<(), &'static str>,
        /// Dialling `PEER` with this certificate on the server side.
        outbound: Result<(), &'static str>,
    }

    #[test]
    fn certificates_each_verifier_accepts_and_refuses() {
        let ours = TestPki::new("ours");
        let foreign = TestPki::new("foreign");
        let shaped = |id: &str, shape: LeafShape| ours.leaf_shaped(id, &shape);
        let cases = [
            Case {
                name: "a workload certificate of our trust domain",
                leaf: ours.leaf(PEER),
                inbound: Ok(()),
                outbound: Ok(()),
            },
            Case {
                name: "another workload of ours",
                leaf: ours.leaf(ME),
                inbound: Ok(()),
                outbound: Err("unexpected_identity"),
            },
            Case {
                name: "another trust domain under our root",
                leaf: ours.leaf("spiffe://evil.example/ns/shop/sa/frontend"),
                inbound: Err("wrong_trust_domain"),
                outbound: Err("wrong_trust_domain"),
            },
            Case {
                name: "a foreign CA",
                leaf: foreign.leaf(PEER),
                inbound: Err("unknown_ca"),
                outbound: Err("unknown_ca"),
            },
            Case {
                name: "expired",
                leaf: shaped(
                    PEER,
                    LeafShape {
                        valid: Some((Duration::hours(-2), Duration::hours(-1))),
                        ..LeafShape::default()
                    },
                ),
                inbound: Err("expired"),
                outbound: Err("expired"),
            },
            Case {
                name: "not yet valid",
                leaf: shaped(
                    PEER,
                    LeafShape {
                        valid: Some((Duration::hours(1), Duration::hours(2))),
                        ..LeafShape::default()
                    },
                ),
                inbound: Err("not_yet_valid"),
                outbound: Err("not_yet_valid"),
            },
            Case {
                name: "serverAuth only, used as a client",
                leaf: shaped(
                    PEER,
                    LeafShape {
                        eku: Some(vec![ExtendedKeyUsagePurpose::ServerAuth]),
                        ..LeafShape::default()
                    },
                ),
                inbound: Err("wrong_purpose"),
                outbound: Ok(()),
            },
            Case {
                name: "clientAuth only, used as a server",
                leaf: shaped(
                    PEER,
                    LeafShape {
                        eku: Some(vec![ExtendedKeyUsagePurpose::ClientAuth]),
                        ..LeafShape::default()
                    },
                ),
                inbound: Ok(()),
                outbound: Err("wrong_purpose"),
            },
            Case {
                name: "two URI SANs",
                leaf: shaped(
                    PEER,
                    LeafShape {
                        uris: Some(vec![PEER.into(), ME.into()]),
                        ..LeafShape::default()
                    },
                ),
                inbound: Err("bad_identity"),
                outbound: Err("bad_identity"),
            },
            Case {
                name: "a URI that is not a SPIFFE ID",
                leaf: shaped(
                    PEER,
                    LeafShape {
                        uris: Some(vec!["https://cluster.local/ns/shop/sa/frontend".into()]),
                        ..LeafShape::default()
                    },
                ),
                inbound: Err("bad_identity"),
                outbound: Err("bad_identity"),
            },
            Case {
                name: "a CA certificate as the leaf",
                leaf: shaped(
                    PEER,
                    LeafShape {
                        is_ca: true,
                        ..LeafShape::default()
                    },
                ),
                inbound: Err("ca_as_leaf"),
                outbound: Err("ca_as_leaf"),
            },
            Case {
                name: "a lineage extension that cannot be read (nothing revoked)",
                leaf: shaped(
                    PEER,
                    LeafShape {
                        extensions: vec![(
                            crate::identity::LINEAGE_ARCS.to_vec(),
                            vec![0x05, 0x00],
                        )],
                        ..LeafShape::default()
                    },
                ),
                inbound: Err("bad_identity"),
                outbound: Err("bad_identity"),
            },
            Case {
                name: "a leaf (CA=false) whose key may sign certificates",
                leaf: shaped(
                    PEER,
                    LeafShape {
                        key_usages: Some(vec![
                            rcgen::KeyUsagePurpose::DigitalSignature,
                            rcgen::KeyUsagePurpose::KeyCertSign,
                        ]),
                        ..LeafShape::default()
                    },
                ),
                inbound: Err("bad_identity"),
                outbound: Err("bad_identity"),
            },
            Case {
                name: "a leaf (CA=false) whose key may sign CRLs",
                leaf: shaped(
                    PEER,
                    LeafShape {
                        key_usages: Some(vec![
                            rcgen::KeyUsagePurpose::DigitalSignature,
                            rcgen::KeyUsagePurpose::CrlSign,
                        ]),
                        ..LeafShape::default()
                    },
                ),
                inbound: Err("bad_identity"),
                outbound: Err("bad_identity"),
            },
        ];
        // A client that sends the root with its chain is taken; one that sends more certificates
        // than that is refused before any is verified.
        let with_root = {
            let mut leaf = ours.leaf(PEER);
            leaf.chain.push(ours.root.clone());
            leaf
        };
        let padded = {
            let mut leaf = ours.leaf(PEER);
            leaf.chain.push(ours.intermediate.clone());
            leaf.chain.push(ours.root.clone());
            leaf
        };
        let cases = cases.into_iter().chain([
            Case {
                name: "the chain and its root",
                leaf: with_root,
                inbound: Ok(()),
                outbound: Ok(()),
            },
            Case {
                name: "more certificates than a chain and its root",
                leaf: padded,
                inbound: Err("bad_chain"),
                outbound: Err("bad_chain"),
            },
        ]);
        let provider = provider();
        // The same bundle for every case, its intermediate cache warmed by a good chain for both
        // usages: each verdict must be the same with a cold cache and a warm one.
        let warm = anchors(&ours);
        let good = ours.leaf(PEER);
        let algs = &provider.signature_verification_algorithms;
        for usage in [
            webpki::KeyUsage::client_auth(),
            webpki::KeyUsage::server_auth(),
        ] {
            warm.verify_workload_chain(algs, &good.chain, UnixTime::now(), usage)
                .unwrap();
        }
        assert_eq!(warm.cached_issuers(), 2);
        for case in cases {
            for (cache, bundle) in [("cold", anchors(&ours)), ("warm", warm.clone())] {
                let peers = Arc::new(VerifiedPeers::default());
                let client = SpiffeClientVerifier::new(bundle.clone(), &provider, peers.clone());
                let got = client_verdict(&client, &case.leaf);
                assert_eq!(got, case.inbound, "inbound, {cache}: {}", case.name);
                if got.is_ok() {
                    // The identity travels on to the authorization point without another parse.
                    let peer = peers.get(&case.leaf.chain[0]).expect(case.name);
                    assert_eq!(
                        peer.cert_sha256,
                        crate::pem::sha256_hex(&case.leaf.chain[0])
                    );
                    assert!(peer.not_after > 0, "{}", case.name);
                }
                let server =
                    SpiffeServerVerifier::new(bundle, SpiffeId::parse(PEER).unwrap(), &provider);
                let got = server
                    .verify_server_cert(
                        &case.leaf.chain[0],
                        &case.leaf.chain[1..],
                        &ServerName::try_from("meshid.invalid").unwrap(),
                        &[],
                        UnixTime::now(),
                    )
                    .map(|_| ())
                    .map_err(|e| failure_label(&e));
                assert_eq!(got, case.outbound, "outbound, {cache}: {}", case.name);
            }
        }
        assert_eq!(
            warm.cached_issuers(),
            2,
            "only our intermediate is remembered"
        );
    }

    /// A remembered intermediate is still checked for what changes: its validity at each use,
    /// and the extended key usage of each purpose it is used for.
    #[test]
    fn a_remembered_intermediate_is_checked_for_time_and_usage_on_every_use() {
        use rcgen::{
            BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer,
            KeyPair, KeyUsagePurpose, SanType,
        };
        let now = time::OffsetDateTime::now_utc();
        let ca = |name: &str, eku: Vec<ExtendedKeyUsagePurpose>| {
            let mut p = CertificateParams::default();
            p.distinguished_name.push(DnType::CommonName, name);
            p.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
            p.key_usages = vec![
                KeyUsagePurpose::KeyCertSign,
                KeyUsagePurpose::DigitalSignature,
            ];
            p.extended_key_usages = eku;
            p.not_before = now - time::Duration::hours(1);
            p
        };
        let root_key = KeyPair::generate().unwrap();
        let mut root_params = ca("root", Vec::new());
        root_params.not_after = now + time::Duration::days(10);
        let root = root_params.self_signed(&root_key).unwrap();
        let root_issuer = Issuer::new(root_params, root_key);
        // An intermediate that expires in 60 s and may issue server certificates only.
        let inter_key = KeyPair::generate().unwrap();
        let mut inter_params = ca("intermediate", vec![ExtendedKeyUsagePurpose::ServerAuth]);
        inter_params.not_after = now + time::Duration::seconds(60);
        let inter = inter_params.signed_by(&inter_key, &root_issuer).unwrap();
        let inter_issuer = Issuer::new(inter_params, inter_key);
        // A leaf that outlives it, for both purposes.
        let mut leaf_params = CertificateParams::default();
        leaf_params.subject_alt_names = vec![SanType::URI(PEER.try_into().unwrap())];
        leaf_params.extended_key_usages = vec![
            ExtendedKeyUsagePurpose::ServerAuth,
            ExtendedKeyUsagePurpose::ClientAuth,
        ];
        leaf_params.not_before = now - time::Duration::hours(1);
        leaf_params.not_after = now + time::Duration::days(1);
        let leaf = leaf_params
            .signed_by(&KeyPair::generate().unwrap(), &inter_issuer)
            .unwrap();
        let chain = [leaf.der().clone(), inter.der().clone()];
        let anchors = Anchors::new(
            &[root.der().clone()],
            TrustDomain::new("cluster.local").unwrap(),
        )
        .unwrap();
        let algs = &provider().signature_verification_algorithms;
        let at = |secs: i64| {
            UnixTime::since_unix_epoch(std::time::Duration::from_secs(
                u64::try_from((now + time::Duration::seconds(secs)).unix_timestamp()).unwrap(),
            ))
        };
        let server = webpki::KeyUsage::server_auth();
        let client = webpki::KeyUsage::client_auth();
        anchors
            .verify_workload_chain(algs, &chain, at(0), server)
            .unwrap();
        assert_eq!(anchors.cached_issuers(), 1);
        // Remembered for server use, yet the intermediate may not issue client certificates.
        assert!(
            anchors
                .verify_workload_chain(algs, &chain, at(0), client)
                .is_err()
        );
        assert_eq!(anchors.cached_issuers(), 1);
        anchors
            .verify_workload_chain(algs, &chain, at(30), server)
            .unwrap();
        // Past the intermediate's not-after the chain is refused, remembered or not.
        let err = anchors
            .verify_workload_chain(algs, &chain, at(120), server)
            .unwrap_err();
        assert_eq!(failure_label(&err), "expired", "{err:?}");
    }

    #[test]
    fn a_shared_root_trusts_only_the_pinned_intermediates() {
        let ours = TestPki::new("enterprise");
        let sibling = ours.sibling("another team's CA");
        let own_root = TestPki::new("mesh-owned");
        let td = TrustDomain::new("cluster.local").unwrap();
        let roots = vec![ours.root.clone(), own_root.root.clone()];
        let pinned =
            Anchors::with_pins(&roots, std::slice::from_ref(&ours.intermediate), td.clone())
                .unwrap();
        assert_eq!(pinned.pinned_roots(), 1);
        let unpinned = Anchors::new(&roots, td).unwrap();
        let provider = provider();
        // (leaf, with pins, without pins)
        type Verdict = Result<(), &'static str>;
        let cases: [(&str, TestLeaf, Verdict, Verdict); 3] = [
            ("the mesh's intermediate", ours.leaf(PEER), Ok(()), Ok(())),
            (
                "a sibling CA under the shared root, with our SPIFFE ID",
                sibling.leaf(PEER),
                Err("unpinned_issuer"),
                Ok(()),
            ),
            (
                "a root that is not pinned",
                own_root.leaf(PEER),
                Ok(()),
                Ok(()),
            ),
        ];
        for (name, leaf, with_pins, without) in cases {
            for (anchors, expected) in [(&pinned, with_pins), (&unpinned, without)] {
                let client = SpiffeClientVerifier::new(
                    anchors.clone(),
                    &provider,
                    Arc::new(VerifiedPeers::default()),
                );
                assert_eq!(client_verdict(&client, &leaf), expected, "inbound: {name}");
                let server = SpiffeServerVerifier::new(
                    anchors.clone(),
                    SpiffeId::parse(PEER).unwrap(),
                    &provider,
                );
                let got = server
                    .verify_server_cert(
                        &leaf.chain[0],
                        &leaf.chain[1..],
                        &ServerName::try_from("meshid.invalid").unwrap(),
                        &[],
                        UnixTime::now(),
                    )
                    .map(|_| ())
                    .map_err(|e| failure_label(&e));
                assert_eq!(got, expected, "outbound: {name}");
                let chain = anchors
                    .verify_workload_chain(
                        &provider.signature_verification_algorithms,
                        &leaf.chain,
                        UnixTime::now(),
                        webpki::KeyUsage::client_auth(),
                    )
                    .map_err(|e| failure_label(&e));
                assert_eq!(chain, expected, "chain: {name}");
            }
        }
        // The sibling's leaf presented with our intermediate beside its own still needs its issuer.
        let mixed = sibling.leaf(PEER);
        let chain = vec![
            mixed.chain[0].clone(),
            ours.intermediate.clone(),
            sibling.intermediate.clone(),
        ];
        let got = pinned.verify_workload_chain(
            &provider.signature_verification_algorithms,
            &chain,
            UnixTime::now(),
            webpki::KeyUsage::client_auth(),
        );
        assert_eq!(got.map_err(|e| failure_label(&e)), Err("unpinned_issuer"));
        let error = pinned
            .verify_workload_chain(
                &provider.signature_verification_algorithms,
                &sibling.leaf(PEER).chain,
                UnixTime::now(),
                webpki::KeyUsage::client_auth(),
            )
            .unwrap_err();
        assert!(
            describe(&error).contains("issuing intermediates"),
            "{}",
            describe(&error)
        );
        // A leaf certificate is not an intermediate to pin.
        let leaf_as_pin = ours.leaf(ME).chain[0].clone();
        assert!(
            Anchors::with_pins(
                &roots,
                &[leaf_as_pin],
                TrustDomain::new("cluster.local").unwrap()
            )
            .is_err()
        );
    }

    #[test]
    fn a_named_server_under_a_shared_root_must_come_from_a_pinned_intermediate() {
        let ours = TestPki::new("enterprise");
        let sibling = ours.sibling("another team's CA");
        let own_root = TestPki::new("mesh-owned");
        let named = |pki: &TestPki, name: &str| {
            pki.leaf_shaped(
                "",
                &LeafShape {
                    uris: Some(Vec::new()),
                    dns: vec![name.to_owned()],
                    ..LeafShape::default()
                },
            )
        };
        // One PEM list of roots and pins, in any order: the intermediate whose issuer is listed is
        // the pin; an intermediate alone stays an anchor.
        let (roots, pins) = split_pins(vec![
            ours.intermediate.clone(),
            ours.root.clone(),
            own_root.root.clone(),
        ]);
        assert_eq!(roots, vec![ours.root.clone(), own_root.root.clone()]);
        assert_eq!(pins, vec![ours.intermediate.clone()]);
        let (alone, none) = split_pins(vec![ours.intermediate.clone()]);
        assert_eq!((alone.len(), none.len()), (1, 0));
        // An app (which knows no pins) is handed the pinned intermediate in place of its root.
        assert_eq!(
            anchors_without_pins(&roots, &pins),
            vec![ours.intermediate.clone(), own_root.root.clone()]
        );
        assert_eq!(anchors_without_pins(&roots, &[]), roots);

        const CA: &str = "meshid-ca.meshid.svc";
        let provider = provider();
        // A certificate that is no CA is no anchor (webpki would take it as one).
        let leaf = named(&ours, CA).chain[0].clone();
        assert_eq!(
            Chains::new(&[ours.root.clone(), leaf], &[]).unwrap_err(),
            webpki::Error::EndEntityUsedAsCa
        );
        let pinned = NamedServerVerifier::new(Chains::new(&roots, &pins).unwrap(), &provider);
        let unpinned = NamedServerVerifier::new(Chains::new(&roots, &[]).unwrap(), &provider);
        let verdict = |v: &NamedServerVerifier, leaf: &TestLeaf, name: &str| {
            v.verify_server_cert(
                &leaf.chain[0],
                &leaf.chain[1..],
                &ServerName::try_from(name.to_owned()).unwrap(),
                &[],
                UnixTime::now(),
            )
            .map(|_| ())
            .map_err(|e| failure_label(&e))
        };
        // (leaf, name dialled, with pins, without pins)
        type Verdict = Result<(), &'static str>;
        let cases: [(&str, TestLeaf, &str, Verdict, Verdict); 7] = [
            (
                "the mesh's intermediate",
                named(&ours, CA),
                CA,
                Ok(()),
                Ok(()),
            ),
            (
                "a sibling CA under the shared root, for the CA's name",
                named(&sibling, CA),
                CA,
                Err("unpinned_issuer"),
                Ok(()),
            ),
            (
                "the mesh's intermediate, another name",
                named(&ours, "elsewhere.example"),
                CA,
                Err("bad_certificate"),
                Err("bad_certificate"),
            ),
            (
                "a root that is not pinned",
                named(&own_root, CA),
                CA,
                Ok(()),
                Ok(()),
            ),
            // A workload's certificate from the mesh's own intermediate (its only name a SPIFFE
            // URI, as the CA issues them) is no CA's, whatever it is dialled as: a workload that
            // receives a sidecar's connection to the CA cannot answer for it.
            (
                "a workload's certificate, for the CA's name",
                ours.leaf("spiffe://enterprise/ns/shop/sa/orders"),
                CA,
                Err("bad_certificate"),
                Err("bad_certificate"),
            ),
            (
                "a workload's certificate whose trust domain is the CA's name",
                ours.leaf(&format!("spiffe://{CA}/ns/shop/sa/orders")),
                CA,
                Err("bad_certificate"),
                Err("bad_certificate"),
            ),
            (
                "a workload's certificate, for an IP address",
                ours.leaf("spiffe://enterprise/ns/shop/sa/orders"),
                "127.0.0.1",
                Err("bad_certificate"),
                Err("bad_certificate"),
            ),
        ];
        for (what, leaf, name, with_pins, without) in cases {
            assert_eq!(verdict(&pinned, &leaf, name), with_pins, "pinned: {what}");
            assert_eq!(verdict(&unpinned, &leaf, name), without, "unpinned: {what}");
        }
        let wrong_name = pinned
            .verify_server_cert(
                &named(&ours, "elsewhere.example").chain[0],
                std::slice::from_ref(&ours.intermediate),
                &ServerName::try_from(CA).unwrap(),
                &[],
                UnixTime::now(),
            )
            .unwrap_err();
        assert_eq!(
            wrong_name,
            rustls::Error::InvalidCertificate(CertificateError::NotValidForName)
        );
    }

    #[test]
    fn the_established_identity_is_the_certificates() {
        let pki = TestPki::new("ours");
        let peers = Arc::new(VerifiedPeers::with_capacity(2));
        let client = SpiffeClientVerifier::new(anchors(&pki), &provider(), peers.clone());
        let a = pki.leaf(PEER);
        let b = pki.leaf(ME);
        client_verdict(&client, &a).unwrap();
        client_verdict(&client, &b).unwrap();
        assert_eq!(peers.get(&a.chain[0]).unwrap().id.as_str(), PEER);
        assert_eq!(peers.get(&b.chain[0]).unwrap().id.as_str(), ME);
        // Bounded: a third certificate evicts one of the first two, never grows the map.
        client_verdict(&client, &pki.leaf(PEER)).unwrap();
        assert_eq!(peers.len(), 2);
        // A certificate never verified is unknown.
        assert!(peers.get(&pki.leaf(PEER).chain[0]).is_none());
    }

    #[test]
    fn revoked_certificates_and_identities_are_refused_both_ways() {
        let pki = TestPki::new("ours");
        let provider = provider();
        let peer = pki.leaf(PEER);
        // The same identity on another certificate, and another identity.
        let sibling = pki.leaf(PEER);
        let me = pki.leaf(ME);
        let verdicts = |revoked: RevocationSet| {
            let anchors = anchors(&pki).with_revocations(Arc::new(revoked));
            let client = SpiffeClientVerifier::new(anchors.clone(), &provider, Arc::default());
            let server =
                SpiffeServerVerifier::new(anchors, SpiffeId::parse(PEER).unwrap(), &provider);
            let dial = |l: &TestLeaf| {
                server
                    .verify_server_cert(
                        &l.chain[0],
                        &l.chain[1..],
                        &ServerName::try_from("meshid.invalid").unwrap(),
                        &[],
                        UnixTime::now(),
                    )
                    .map(|_| ())
                    .map_err(|e| failure_label(&e))
            };
            [
                client_verdict(&client, &peer),
                client_verdict(&client, &sibling),
                client_verdict(&client, &me),
                dial(&peer),
                dial(&sibling),
            ]
        };
        let ok = Ok(());
        assert_eq!(verdicts(RevocationSet::default()), [ok; 5]);
        // As `openssl x509 -serial` prints it.
        let printed = crate::identity::cert_identity_from_der(&peer.chain[0])
            .unwrap()
            .serial_hex
            .to_uppercase();
        let serial = crate::revocation::normalize_serial(&format!("serial={printed}")).unwrap();
        let by_serial = RevocationSet::new([Revoked::Serial(serial)]).unwrap();
        let revoked = Err("revoked");
        assert_eq!(verdicts(by_serial), [revoked, ok, ok, revoked, ok]);
        let by_id = RevocationSet::new([Revoked::Id(SpiffeId::parse(PEER).unwrap())]).unwrap();
        assert_eq!(
            verdicts(by_id.clone()),
            [revoked, revoked, ok, revoked, revoked]
        );
        // The refused client's claim is left for the handshake failure's record.
        let anchors = anchors(&pki).with_revocations(Arc::new(by_id));
        let client = SpiffeClientVerifier::new(anchors, &provider, Arc::default());
        let _ = take_refused_claim();
        assert_eq!(client_verdict(&client, &sibling), revoked);
        assert_eq!(take_refused_claim().as_deref(), Some(PEER));
    }

    #[test]
    fn a_refused_client_leaves_its_claimed_identity_for_the_record() {
        let ours = TestPki::new("ours");
        let foreign = TestPki::new("foreign");
        let provider = provider();
        let client = SpiffeClientVerifier::new(anchors(&ours), &provider, Arc::default());
        let _ = take_refused_claim();
        assert_eq!(
            client_verdict(&client, &foreign.leaf(PEER)),
            Err("unknown_ca")
        );
        assert_eq!(take_refused_claim().as_deref(), Some(PEER));
        assert_eq!(take_refused_claim(), None, "read once");
        client_verdict(&client, &ours.leaf(PEER)).unwrap();
        assert_eq!(
            take_refused_claim(),
            None,
            "an accepted client leaves nothing"
        );
    }

    #[test]
    fn failures_read_as_words() {
        let pki = TestPki::new("ours");
        let server =
            SpiffeServerVerifier::new(anchors(&pki), SpiffeId::parse(PEER).unwrap(), &provider());
        let leaf = pki.leaf(ME);
        let error = server
            .verify_server_cert(
                &leaf.chain[0],
                &leaf.chain[1..],
                &ServerName::try_from("meshid.invalid").unwrap(),
                &[],
                UnixTime::now(),
            )
            .unwrap_err();
        let text = describe(&error);
        assert!(text.contains(ME) && text.contains(PEER), "{text}");
        assert!(text.ends_with("(unexpected_identity)"), "{text}");
    }
}
