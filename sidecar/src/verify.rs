//! Peer certificate verification for mTLS between sidecars, kept in one small module.
//!
//! Workload certificates carry no DNS name, so hostname checks are replaced by identity checks: the
//! chain is verified with webpki against the trust bundle (for client or server auth), then the one URI
//! SAN must be a valid SPIFFE ID in our trust domain (inbound), or exactly the expected ID (outbound).

use std::fmt;
use std::sync::Arc;

use meshid_proto::{IdentityError, SpiffeId, TrustDomain, spiffe_id_from_der};
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::{CryptoProvider, WebPkiSupportedAlgorithms};
use rustls::pki_types::{CertificateDer, ServerName, TrustAnchor, UnixTime};
use rustls::server::danger::{ClientCertVerified, ClientCertVerifier};
use rustls::{
    CertificateError, DigitallySignedStruct, DistinguishedName, OtherError, SignatureScheme,
};

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
}

/// The trust bundle in the form webpki verifies against.
#[derive(Clone)]
pub struct Anchors {
    anchors: Arc<Vec<TrustAnchor<'static>>>,
    pub trust_domain: TrustDomain,
}

impl fmt::Debug for Anchors {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Anchors")
            .field("roots", &self.anchors.len())
            .field("trust_domain", &self.trust_domain)
            .finish()
    }
}

impl Anchors {
    /// Parses bundle roots into trust anchors for `trust_domain`.
    pub fn new(
        roots: &[CertificateDer<'static>],
        trust_domain: TrustDomain,
    ) -> Result<Self, webpki::Error> {
        let anchors = roots
            .iter()
            .map(|r| webpki::anchor_from_trusted_cert(r).map(|a| a.to_owned()))
            .collect::<Result<Vec<_>, _>>()?;
        Ok(Self {
            anchors: Arc::new(anchors),
            trust_domain,
        })
    }

    pub fn len(&self) -> usize {
        self.anchors.len()
    }

    pub fn is_empty(&self) -> bool {
        self.anchors.is_empty()
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
        let cert = webpki::EndEntityCert::try_from(end_entity).map_err(pki_error)?;
        cert.verify_for_usage(
            algs.all,
            &self.anchors,
            intermediates,
            now,
            usage,
            None,
            None,
        )
        .map_err(pki_error)?;
        let id = spiffe_id_from_der(end_entity).map_err(|e| identity_error(e.into()))?;
        if id.trust_domain_name() != self.trust_domain.as_str() {
            return Err(identity_error(PeerIdentityError::WrongTrustDomain {
                peer: id,
                expected: self.trust_domain.clone(),
            }));
        }
        Ok(id)
    }
}

fn identity_error(e: PeerIdentityError) -> rustls::Error {
    rustls::Error::InvalidCertificate(CertificateError::Other(OtherError(Arc::new(e))))
}

/// webpki's errors in rustls's terms (as rustls's own verifier maps them).
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
            CertificateError::InvalidPurpose | CertificateError::InvalidPurposeContext { .. } => {
                "wrong_purpose"
            }
            CertificateError::Other(OtherError(inner)) => {
                match inner.downcast_ref::<PeerIdentityError>() {
                    Some(PeerIdentityError::WrongTrustDomain { .. }) => "wrong_trust_domain",
                    Some(PeerIdentityError::UnexpectedServer { .. }) => "unexpected_identity",
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
/// one SPIFFE ID of our trust domain. Which peers may talk is decided later by the policy.
#[derive(Debug)]
pub struct SpiffeClientVerifier {
    anchors: Anchors,
    algs: WebPkiSupportedAlgorithms,
}

impl SpiffeClientVerifier {
    pub fn new(anchors: Anchors, provider: &CryptoProvider) -> Self {
        Self {
            anchors,
            algs: provider.signature_verification_algorithms,
        }
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
        self.anchors.verify(
            &self.algs,
            end_entity,
            intermediates,
            now,
            webpki::KeyUsage::client_auth(),
        )?;
        Ok(ClientCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(message, cert, dss, &self.algs)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(message, cert, dss, &self.algs)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.algs.supported_schemes()
    }
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
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(message, cert, dss, &self.algs)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(message, cert, dss, &self.algs)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.algs.supported_schemes()
    }
}
