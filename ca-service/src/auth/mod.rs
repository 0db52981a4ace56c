//! Who may get which identity: authentication (proving who the caller is) kept apart from the
//! authorization checks that follow it.

pub mod join;
pub mod jwt;

use meshid_identity::{SpiffeId, TrustDomain};
use time::OffsetDateTime;

pub use join::{JoinStoreError, JoinTokenStore, PendingJoin};
pub use jwt::{JwksError, JwtAuthenticator, JwtConfig};

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
    TokenAlgorithm,
    UnknownKey,
    BadSignature,
    TokenExpired,
    TokenNotYetValid,
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
}

impl Reason {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::NoCredential => "no_credential",
            Self::MalformedToken => "malformed_token",
            Self::TokenAlgorithm => "token_algorithm",
            Self::UnknownKey => "unknown_key",
            Self::BadSignature => "bad_signature",
            Self::TokenExpired => "token_expired",
            Self::TokenNotYetValid => "token_not_yet_valid",
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
        }
    }
}

/// A refused credential: `Unauthenticated` (not proven) or `PermissionDenied` (proven, not allowed).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{message}")]
pub struct AuthError {
    pub denied: bool,
    pub reason: Reason,
    /// Safe to show the caller: never contains the credential.
    pub message: String,
}

impl AuthError {
    pub fn unauthenticated(reason: Reason, message: impl Into<String>) -> Self {
        Self {
            denied: false,
            reason,
            message: message.into(),
        }
    }

    pub fn permission_denied(reason: Reason, message: impl Into<String>) -> Self {
        Self {
            denied: true,
            reason,
            message: message.into(),
        }
    }
}

/// Renewal: the caller's current certificate, whose chain the TLS layer already verified against the
/// bundle. Checks it is a workload identity of this trust domain and still valid now.
pub fn authenticate_renewal(
    leaf: &Result<meshid_identity::CertIdentity, String>,
    trust_domain: &TrustDomain,
    now: OffsetDateTime,
) -> Result<SpiffeId, AuthError> {
    let info = leaf.as_ref().map_err(|e| {
        AuthError::unauthenticated(
            Reason::CertificateIdentity,
            format!("client certificate: {e}"),
        )
    })?;
    if info.not_after <= now.unix_timestamp() {
        return Err(AuthError::unauthenticated(
            Reason::CertificateExpired,
            "client certificate has expired",
        ));
    }
    if info.id.trust_domain_name() != trust_domain.as_str() {
        return Err(AuthError::permission_denied(
            Reason::WrongTrustDomain,
            "client certificate identity is outside this trust domain",
        ));
    }
    Ok(info.id.clone())
}
