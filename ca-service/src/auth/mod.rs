//! Who may get which identity: authentication (proving who the caller is) kept apart from the
//! authorization checks that follow it.

pub mod join;
pub mod jwks_remote;
pub mod jwt;
pub mod token_review;

use std::time::Duration;

use meshid_identity::verify::Anchors;
use meshid_identity::{SpiffeId, TrustDomain};
use rustls_pki_types::{CertificateDer, UnixTime};
use time::OffsetDateTime;

pub use join::{JoinStoreError, JoinTokenStore, PendingJoin, RedeemError};
pub use jwks_remote::RemoteJwks;
pub use jwt::{JwksError, JwksSource, JwksSummary, JwtAuthenticator, JwtConfig};

/// How a caller proved its identity.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Method {
    ServiceAccountToken,
    JoinToken,
    Renewal,
    None,
}

impl Method {
    /// Metric label and audit field.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::ServiceAccountToken => "service_account_token",
            Self::JoinToken => "join_token",
            Self::Renewal => "renewal",
            Self::None => "none",
        }
    }
}

/// Why a credential was refused: a short, fixed label for metrics and audit events.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum Reason {
    NoCredential,
    MalformedToken,
    /// The token's JOSE header has a `crit` member (RFC 7515 §4.1.11): no extension is understood.
    CritHeader,
    TokenAlgorithm,
    UnknownKey,
    BadSignature,
    TokenExpired,
    TokenNotYetValid,
    /// The token lives longer (`exp - iat`) than `--max-token-lifetime`.
    TokenLifetime,
    /// The token has no `kubernetes.io.pod` binding (and unbound tokens are not accepted).
    TokenNotPodBound,
    /// The API server no longer takes the token (`--token-review`): its pod was deleted, or the
    /// token invalidated; or it takes it for another service account.
    TokenReviewRefused,
    /// The API server could not be asked about the token (`--token-review`): nothing decided.
    TokenReviewUnavailable,
    WrongAudience,
    WrongIssuer,
    MalformedSubject,
    NamespaceNotAllowed,
    ServiceAccountTokensDisabled,
    UnknownJoinToken,
    JoinTokenUsed,
    JoinTokenExpired,
    WrongTrustDomain,
    CertificateExpired,
    CertificateIdentity,
    /// A presented certificate (a renewal's, a bundle stream's, an acknowledgement's) that no
    /// longer chains to a root the CA trusts now.
    UntrustedChain,
    /// A renewal past the most time allowed since the identity was last attested.
    AttestationExpired,
    /// The identity, or the certificate presented (for a renewal, a bundle stream or an
    /// acknowledgement), is revoked (`meshid-ca revoke`).
    Revoked,
    /// The join token store could not be read (EMFILE, EIO, EACCES, a directory where the record
    /// goes): nothing was decided about the token, which stays unused.
    JoinTokenUnreadable,
    /// A presented certificate marked as an app SVID (issued to the app behind a sidecar on the
    /// Workload API): never the caller's credential at the CA.
    AppSvid,
}

impl Reason {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::NoCredential => "no_credential",
            Self::MalformedToken => "malformed_token",
            Self::CritHeader => "crit_header",
            Self::TokenAlgorithm => "token_algorithm",
            Self::UnknownKey => "unknown_key",
            Self::BadSignature => "bad_signature",
            Self::TokenExpired => "token_expired",
            Self::TokenNotYetValid => "token_not_yet_valid",
            Self::TokenLifetime => "token_lifetime",
            Self::TokenNotPodBound => "token_not_pod_bound",
            Self::TokenReviewRefused => "token_review_refused",
            Self::TokenReviewUnavailable => "token_review_unavailable",
            Self::WrongAudience => "wrong_audience",
            Self::WrongIssuer => "wrong_issuer",
            Self::MalformedSubject => "malformed_subject",
            Self::NamespaceNotAllowed => "namespace_not_allowed",
            Self::ServiceAccountTokensDisabled => "service_account_tokens_disabled",
            Self::UnknownJoinToken => "unknown_join_token",
            Self::JoinTokenUsed => "join_token_used",
            Self::JoinTokenExpired => "join_token_expired",
            Self::WrongTrustDomain => "wrong_trust_domain",
            Self::CertificateExpired => "certificate_expired",
            Self::CertificateIdentity => "certificate_identity",
            Self::UntrustedChain => "untrusted_chain",
            Self::AttestationExpired => "attestation_expired",
            Self::Revoked => "revoked",
            Self::JoinTokenUnreadable => "join_token_unreadable",
            Self::AppSvid => "app_svid",
        }
    }
}

/// A refused credential: `Unauthenticated` (not proven) or `PermissionDenied` (proven, not allowed);
/// or, `unavailable`, a credential the CA could not check (its own store failed): `Unavailable`, so
/// the caller keeps it and tries again.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{message}")]
pub struct AuthError {
    pub denied: bool,
    pub unavailable: bool,
    pub reason: Reason,
    /// Safe to show the caller: never contains the credential.
    pub message: String,
    /// The identity the refused call was proven to be, when it was (a certificate verified at its
    /// handshake, a token refused for its identity's revocation): what the audit line names.
    /// Never one a refused credential merely claims.
    pub identity: Option<SpiffeId>,
}

impl AuthError {
    pub fn unauthenticated(reason: Reason, message: impl Into<String>) -> Self {
        Self {
            denied: false,
            unavailable: false,
            reason,
            message: message.into(),
            identity: None,
        }
    }

    pub fn permission_denied(reason: Reason, message: impl Into<String>) -> Self {
        Self {
            denied: true,
            unavailable: false,
            reason,
            message: message.into(),
            identity: None,
        }
    }

    /// The gRPC code the refusal is answered with.
    pub fn code(&self) -> tonic::Code {
        if self.unavailable {
            tonic::Code::Unavailable
        } else if self.denied {
            tonic::Code::PermissionDenied
        } else {
            tonic::Code::Unauthenticated
        }
    }

    /// The refusal of a call proven to be `id`'s.
    pub fn of(mut self, id: &SpiffeId) -> Self {
        self.identity = Some(id.clone());
        self
    }

    /// The CA could not check the credential (not the caller's fault): nothing was decided.
    pub fn unavailable(reason: Reason, message: impl Into<String>) -> Self {
        Self {
            denied: false,
            unavailable: true,
            reason,
            message: message.into(),
            identity: None,
        }
    }
}

/// What a renewal is checked against at the time of the call (not when its connection was set up:
/// a connection may outlive the root its certificate chains to).
#[derive(Debug, Clone, Copy)]
pub struct RenewalPolicy<'a> {
    pub trust_domain: &'a TrustDomain,
    /// The trust anchors now: the trust bundle as the CA currently serves it, with its pins.
    pub anchors: &'a Anchors,
    /// The most time since the identity was last attested (a service-account token or join token)
    /// after which a certificate no longer renews itself.
    pub max_attestation_age: Duration,
}

/// A renewal that may proceed: the identity, and when it was last attested (Unix seconds), which
/// the new certificate carries on.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Renewal {
    pub id: SpiffeId,
    pub attested_at: i64,
}

/// The certificate on the caller's connection (`leaf`, parsed when the connection was set up, and
/// the chain it presented), checked at `now` with the trust of the time of the call: it is a valid
/// workload identity, it has not expired, it is of `trust_domain`, it is not an app SVID
/// ([`meshid_identity::APP_SVID_OID`]), and its chain still verifies
/// for client auth to `anchors`. The TLS handshake checked the same when the connection was set
/// up, but a connection may outlive its certificate and the root it chains to (`rotate retire`),
/// so every call that takes the certificate as its credential (a renewal, a bundle stream, an
/// acknowledgement) checks it again.
pub fn authenticate_certificate<'l>(
    leaf: &'l Result<meshid_identity::CertIdentity, String>,
    chain: &[CertificateDer<'_>],
    trust_domain: &TrustDomain,
    anchors: &Anchors,
    now: OffsetDateTime,
) -> Result<&'l meshid_identity::CertIdentity, AuthError> {
    let info = check_certificate(leaf, trust_domain, now)?;
    verify_chain_now(chain, anchors, now).map_err(|e| {
        AuthError::unauthenticated(
            Reason::UntrustedChain,
            format!(
                "client certificate no longer chains to what this CA trusts ({}); \
                 authenticate with your service-account token or a join token",
                meshid_identity::verify::describe(&e)
            ),
        )
    })?;
    Ok(info)
}

/// [`authenticate_certificate`] but for the chain, for a caller that verified it at `now` under
/// trust at least as narrow (an authority of the bundle: `Authority::bundled_authorities`).
pub fn check_certificate<'l>(
    leaf: &'l Result<meshid_identity::CertIdentity, String>,
    trust_domain: &TrustDomain,
    now: OffsetDateTime,
) -> Result<&'l meshid_identity::CertIdentity, AuthError> {
    let info = leaf.as_ref().map_err(|e| {
        AuthError::unauthenticated(
            Reason::CertificateIdentity,
            format!("client certificate: {e}"),
        )
    })?;
    if info.not_after <= now.unix_timestamp() {
        return Err(AuthError::unauthenticated(
            Reason::CertificateExpired,
            "client certificate has expired: get a new one with your service-account token or \
             a join token",
        ));
    }
    if info.id.trust_domain_name() != trust_domain.as_str() {
        return Err(AuthError::permission_denied(
            Reason::WrongTrustDomain,
            "client certificate identity is outside this trust domain",
        ));
    }
    if info.app_svid {
        return Err(AuthError::permission_denied(
            Reason::AppSvid,
            "client certificate is an app SVID (issued to an app through its sidecar's Workload \
             API): it serves mTLS to peers but is no credential at the CA; the sidecar renews it",
        ));
    }
    Ok(info)
}

/// Renewal: the caller's current certificate, checked as [`authenticate_certificate`] does, and
/// its identity attested at most `policy.max_attestation_age` ago (a certificate without the
/// attested-at extension counts as attested at its not-before).
pub fn authenticate_renewal(
    leaf: &Result<meshid_identity::CertIdentity, String>,
    chain: &[CertificateDer<'_>],
    policy: &RenewalPolicy<'_>,
    now: OffsetDateTime,
) -> Result<Renewal, AuthError> {
    let info = authenticate_certificate(leaf, chain, policy.trust_domain, policy.anchors, now)?;
    let attested_at = info.attested_at.unwrap_or(info.not_before);
    let age = now.unix_timestamp().saturating_sub(attested_at);
    let max = i64::try_from(policy.max_attestation_age.as_secs()).unwrap_or(i64::MAX);
    if age > max {
        return Err(AuthError::unauthenticated(
            Reason::AttestationExpired,
            format!(
                "{} was last attested {age} s ago (Unix time {attested_at}), longer than this \
                 CA's --max-attestation-age ({max} s) allows renewing on a certificate alone: \
                 present your service-account token, or a new join token",
                info.id
            ),
        )
        .of(&info.id));
    }
    Ok(Renewal {
        id: info.id.clone(),
        attested_at,
    })
}

/// The lifetime of a certificate renewed at `now` for `id`, last attested at `attested_at`:
/// `requested`, cut so that it ends when the attestation age does. No certificate of a lineage of
/// renewals outlives `attested_at + max_attestation_age`, whatever lifetime it asks for. Refused
/// (`attestation_expired`) when less than half of `requested` is left: the workload attests again
/// (a sidecar renews at half its lifetime, so renewing on would only give it ever shorter
/// certificates, the last ones a few seconds long).
pub fn renewal_lifetime(
    id: &SpiffeId,
    attested_at: i64,
    max_attestation_age: Duration,
    requested: Duration,
    now: i64,
) -> Result<Duration, AuthError> {
    let max = i64::try_from(max_attestation_age.as_secs()).unwrap_or(i64::MAX);
    let left = attested_at.saturating_add(max).saturating_sub(now).max(0);
    let left = Duration::from_secs(u64::try_from(left).unwrap_or(0));
    if left < requested / 2 {
        return Err(AuthError::unauthenticated(
            Reason::AttestationExpired,
            format!(
                "{id} was last attested at Unix time {attested_at}: a renewal now would live {} s \
                 before this CA's --max-attestation-age ({max} s) ends it, under half the {} s \
                 asked for: present your service-account token, or a new join token",
                left.as_secs(),
                requested.as_secs()
            ),
        ));
    }
    Ok(requested.min(left))
}

/// Verifies `chain` (leaf first) for client auth to `anchors` at `now`, as the TLS handshake did
/// when the connection was set up, with the trust of the time of the call (and its pins).
fn verify_chain_now(
    chain: &[CertificateDer<'_>],
    anchors: &Anchors,
    now: OffsetDateTime,
) -> Result<(), rustls::Error> {
    let secs = u64::try_from(now.unix_timestamp()).unwrap_or(0);
    anchors.verify_workload_chain(
        &rustls::crypto::aws_lc_rs::default_provider().signature_verification_algorithms,
        chain,
        UnixTime::since_unix_epoch(Duration::from_secs(secs)),
        webpki::KeyUsage::client_auth(),
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use meshid_identity::testing::TestPki;

    const ID: &str = "spiffe://cluster.local/ns/shop/sa/frontend";

    #[test]
    fn renewal_under_a_shared_root_needs_the_mesh_intermediate() {
        let mesh = TestPki::new("enterprise");
        let sibling = mesh.sibling("another team's CA");
        let td = TrustDomain::new("cluster.local").unwrap();
        let pinned = Anchors::with_pins(
            std::slice::from_ref(&mesh.root),
            std::slice::from_ref(&mesh.intermediate),
            td.clone(),
        )
        .unwrap();
        let policy = RenewalPolicy {
            trust_domain: &td,
            anchors: &pinned,
            max_attestation_age: Duration::from_secs(24 * 3600),
        };
        let now = OffsetDateTime::now_utc();
        let renew = |chain: &[CertificateDer<'static>]| {
            let leaf =
                meshid_identity::cert_identity_from_der(&chain[0]).map_err(|e| e.to_string());
            authenticate_renewal(&leaf, chain, &policy, now)
        };
        assert_eq!(renew(&mesh.leaf(ID).chain).unwrap().id.as_str(), ID);
        let refused = renew(&sibling.leaf(ID).chain).unwrap_err();
        assert_eq!(refused.reason, Reason::UntrustedChain);
        assert!(!refused.denied, "unauthenticated, not denied");
        assert!(
            refused.message.contains("issuing intermediates"),
            "{}",
            refused.message
        );
    }
}
