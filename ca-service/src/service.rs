//! The `meshid.ca.v1.CertificateAuthority` gRPC service: authenticate, authorize, rate-limit, sign,
//! audit. Errors become gRPC statuses here and nowhere else.

use std::pin::Pin;
use std::sync::Arc;
use std::time::Instant;

use arc_swap::ArcSwap;
use meshid_identity::SpiffeId;
use meshid_identity::jwt_svid::JwtKey;
use meshid_proto::ca::v1::certificate_authority_server::CertificateAuthority;
use meshid_proto::ca::v1::{
    AckTrustBundleRequest, AckTrustBundleResponse, GetTrustBundleRequest, IssueJwtSvidRequest,
    IssueJwtSvidResponse, IssueRequest, IssueResponse, TrustBundle, WatchTrustBundleRequest,
    issue_request::Credential,
};
use rustls_pki_types::CertificateDer;
use time::OffsetDateTime;
use tokio::sync::watch;
use tokio_stream::Stream;
use tonic::{Request, Response, Status};

use crate::auth::{
    self, AuthError, JoinTokenStore, JwtAuthenticator, Method, PendingJoin, Reason, RedeemError,
};
use crate::authority::Authority;
use crate::csr::CsrPublicKey;
use crate::metrics::{IssueLabels, Metrics};
use crate::ratelimit::RateLimiter;
use crate::signer::{LifetimePolicy, Lineage, serial_bytes, sign_leaf_in};
use crate::tls::PeerInfo;

/// The trust bundle as served, with its version.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Bundle {
    pub version: u64,
    pub roots: Vec<CertificateDer<'static>>,
    /// The issuing intermediates trust under a shared root is pinned to (see `Authority::pinned`).
    pub pinned: Vec<CertificateDer<'static>>,
    /// Tell sidecars to renew at once (after a forced root retirement).
    pub renew_now: bool,
    /// The JWT-SVID keys of the authorities in the bundle (see `Authority::jwt_keys`).
    pub jwt_keys: Vec<JwtKey>,
    /// The revocation list (see [`crate::revocations`]).
    pub revoked: Vec<crate::revocations::Entry>,
    /// For each of `roots`, the last version this process served without it (0: it has served
    /// it since it started).
    pub served_without_root: Vec<u64>,
}

impl Bundle {
    /// The bundle `authority` serves, as `version`.
    pub fn of(authority: &Authority, version: u64) -> Self {
        Self {
            version,
            roots: authority.roots.clone(),
            pinned: authority.pinned.clone(),
            renew_now: authority.renew_now,
            jwt_keys: authority.jwt_keys.clone(),
            revoked: authority.revocations.entries().to_vec(),
            served_without_root: vec![0; authority.roots.len()],
        }
    }

    /// The bundle to serve after the CA directory was read again (`authority`), or `None` when
    /// it carries the same trust under a version at least the directory's. Its version is the
    /// directory's, or one past this one when the bundle changed without the directory's version
    /// moving on (`bundle.pem` edited by hand, or the revocation list read before the version that
    /// goes with it): every change is a new version, which a later `rotate prepare` must number
    /// above (see [`crate::rotation::CaProcess::bundle_version`]).
    pub fn next(&self, authority: &Authority) -> Option<Self> {
        let next = Self::of(authority, 0);
        if self.same_trust(&next) && self.version >= authority.bundle_version {
            return None;
        }
        let version = if authority.bundle_version > self.version {
            authority.bundle_version
        } else {
            self.version.saturating_add(1)
        };
        // A root new in this version was last missing from this process's current one.
        let served_without_root = next
            .roots
            .iter()
            .map(|root| self.served_without(root))
            .collect();
        Some(Self {
            version,
            served_without_root,
            ..next
        })
    }

    /// The highest version this process served without `root` (0: none: it has served it since
    /// it started).
    pub fn served_without(&self, root: &CertificateDer<'_>) -> u64 {
        self.roots
            .iter()
            .position(|r| r == root)
            .and_then(|i| self.served_without_root.get(i).copied())
            .unwrap_or(self.version)
    }

    /// Whether `other` carries the same trust (everything but the version and `renew_now`).
    pub fn same_trust(&self, other: &Self) -> bool {
        self.roots == other.roots
            && self.pinned == other.pinned
            && self.jwt_keys == other.jwt_keys
            && self.revoked == other.revoked
    }
}

/// Everything an Issue call needs.
pub struct CaState {
    pub authority: ArcSwap<Authority>,
    pub bundle: watch::Sender<Arc<Bundle>>,
    pub jwt: Option<JwtAuthenticator>,
    /// Reviews service-account tokens at the API server before they attest (`--token-review`).
    pub token_review: Option<crate::auth::token_review::TokenReviewer>,
    pub join: JoinTokenStore,
    pub lifetimes: LifetimePolicy,
    /// How long after its last attestation (token or join token) an identity still renews on its
    /// certificate alone (`--max-attestation-age`).
    pub max_attestation_age: std::time::Duration,
    /// Certificates per identity (`--rate-limit`, `--rate-burst`), whatever the credential.
    pub limiter: RateLimiter,
    /// Lifetime of a JWT-SVID (`--jwt-svid-ttl`).
    pub jwt_svid_ttl: std::time::Duration,
    /// The rate limit of JWT-SVIDs, per identity, apart from certificates': tokens asked for
    /// by an app never starve its sidecar's renewals.
    pub jwt_limiter: RateLimiter,
    /// Certificates and, apart, JWT-SVIDs per namespace (of `ns/<ns>/sa/<sa>` identities),
    /// taken after the identity's own limit (`--namespace-rate-limit`, `--namespace-rate-burst`):
    /// many service accounts of one namespace cannot take the CA from the others.
    pub namespaces: RateLimiter<String>,
    pub jwt_namespaces: RateLimiter<String>,
    /// Renewals per identity, before `limiter`: a share of it (`RateLimit::renewal_share`), so
    /// that renewals cannot take the whole of it from token and join-token issuances; these, in
    /// turn, leave in `limiter` what renewals may still take of this share.
    pub renewals: RateLimiter,
    /// Renewals and JWT-SVID requests per lineage of the presented certificate (the first serial
    /// of its lineage, the same across renewals whatever the keys; app SVIDs apart), a small share
    /// of `limiter` (`RateLimit::per_lineage`), taken before the certificate is verified at the
    /// time of the call.
    pub renewal_calls: RateLimiter<String>,
    pub jwt_svid_calls: RateLimiter<String>,
    /// Acknowledgements and bundle streams opened, per certificate key ([`BUNDLE_CALLS`]): each
    /// costs a chain verification, and one certificate must not make the CA spend its time on
    /// them.
    pub bundle_calls: RateLimiter<String>,
    pub metrics: Metrics,
    /// Flips to true when the server shuts down, ending bundle streams.
    pub shutdown: watch::Receiver<bool>,
    /// Connected sidecars, their acknowledgements, and live certificates per authority.
    pub fleet: crate::rotation::Fleet,
    /// Room for bundle streams, sidecars' and anonymous ones apart.
    pub streams: StreamPermits,
    /// The budget of audit lines for refused calls, per source address.
    pub refusals: crate::audit::RefusalLog,
}

/// The gRPC service.
#[derive(Clone)]
pub struct CaService {
    state: Arc<CaState>,
}

impl CaService {
    pub fn new(state: Arc<CaState>) -> Self {
        Self { state }
    }
}

/// A decided, refused call: the status for the caller plus labels for audit and metrics.
#[derive(Debug)]
struct Refusal {
    status: Status,
    result: &'static str,
}

impl Refusal {
    /// Writes the audit line of this refusal (`WHAT refused`), within `log`'s budget for the
    /// caller's address (see [`crate::audit`]), and gives the caller's status.
    fn audited(
        self,
        log: &crate::audit::RefusalLog,
        method: &str,
        identity: &str,
        remote: Option<std::net::SocketAddr>,
        what: &str,
    ) -> Status {
        let source = crate::audit::Source::of(remote);
        // `identity` is empty unless the call's identity was proven (see `AuthError::identity`).
        if !log.admit(source, !identity.is_empty(), Instant::now()) {
            return self.status;
        }
        let remote = remote.map(|r| r.to_string()).unwrap_or_default();
        tracing::warn!(
            target: "meshid_ca::audit",
            method,
            identity,
            peer = %remote,
            result = "refused",
            reason = self.result,
            code = ?self.status.code(),
            detail = self.status.message(),
            "{what} refused"
        );
        self.status
    }
}

impl From<AuthError> for Refusal {
    fn from(e: AuthError) -> Self {
        let status = Status::new(e.code(), e.message);
        Self {
            status,
            result: e.reason.as_str(),
        }
    }
}

enum Authenticated {
    Ready {
        id: SpiffeId,
        /// When the identity was last attested (Unix seconds); `None`: by this call.
        attested_at: Option<i64>,
    },
    Join(PendingJoin),
}

impl CaState {
    /// Who the caller is, by its credential; then refused if that identity is revoked, or, for a
    /// renewal, the certificate it presents.
    fn authenticate(
        &self,
        credential: Option<&Credential>,
        peer: Option<&PeerInfo>,
    ) -> (Method, Result<Authenticated, AuthError>) {
        let (method, result) = self.authenticate_credential(credential, peer);
        let result = result.and_then(|authenticated| {
            let id = match &authenticated {
                Authenticated::Ready { id, .. } => id,
                Authenticated::Join(p) => &p.id,
            };
            let presented = match method {
                Method::Renewal => peer
                    .and_then(|p| p.leaf_identity.as_deref())
                    .and_then(|l| l.as_ref().ok()),
                _ => None,
            };
            self.refuse_revoked(id, presented).map_err(|e| e.of(id))?;
            Ok(authenticated)
        });
        (method, result)
    }

    /// Refuses `id` if it is revoked, or `presented` (the certificate the call relies on, if it
    /// relies on one) if its serial is, or the serial of the first certificate of its lineage
    /// (its lineage extension: every renewal carries it on). A revoked serial names a certificate
    /// and, when it is a lineage's first, every one renewed from it (a later certificate's serial
    /// is not carried on: its renewals are refused only through their lineage): the identity may
    /// still attest again for a new lineage; a revoked identity gets nothing until it is unrevoked.
    fn refuse_revoked(
        &self,
        id: &SpiffeId,
        presented: Option<&meshid_identity::CertIdentity>,
    ) -> Result<(), AuthError> {
        refuse_revoked_by(&self.authority.load().revocations, id, presented)
    }

    /// The certificate on `peer`'s connection, checked at the time of the call as a renewal checks
    /// it (see [`auth::authenticate_certificate`]) and against the revocation list, for calls that
    /// take it as the caller's credential: bundle streams and acknowledgements. Not the attestation
    /// age nor the namespace allow-list: those bound issuance, and a workload whose certificate
    /// still holds keeps taking the bundle until it expires. `None`: no certificate presented.
    ///
    /// `chain_verified`: the caller verified the chain at the time of the call under an authority
    /// of the bundle (`Authority::bundled_authorities`), which `anchors` would accept too; it is not
    /// verified twice.
    fn authenticate_presented<'p>(
        &self,
        peer: Option<&'p PeerInfo>,
        chain_verified: bool,
    ) -> Option<Result<&'p meshid_identity::CertIdentity, AuthError>> {
        let peer = peer?;
        let leaf = peer.leaf_identity.as_deref()?;
        let chain = peer.certificates.as_deref().map_or(&[][..], Vec::as_slice);
        let authority = self.authority.load();
        let now = OffsetDateTime::now_utc();
        let checked = if chain_verified {
            auth::check_certificate(leaf, &authority.trust_domain, now)
        } else {
            auth::authenticate_certificate(
                leaf,
                chain,
                &authority.trust_domain,
                &authority.anchors,
                now,
            )
        };
        let checked = checked.and_then(|info| {
            self.refuse_revoked(&info.id, Some(info))?;
            Ok(info)
        });
        Some(checked)
    }

    fn authenticate_credential(
        &self,
        credential: Option<&Credential>,
        peer: Option<&PeerInfo>,
    ) -> (Method, Result<Authenticated, AuthError>) {
        match credential {
            Some(Credential::ServiceAccountToken(token)) => {
                let result = match &self.jwt {
                    Some(jwt) => jwt.authenticate(token).map(|id| Authenticated::Ready {
                        id,
                        attested_at: None,
                    }),
                    None => Err(AuthError::unauthenticated(
                        Reason::ServiceAccountTokensDisabled,
                        "this CA does not accept service-account tokens (no --jwks, --jwks-url or --jwks-discovery)",
                    )),
                };
                (Method::ServiceAccountToken, result)
            }
            Some(Credential::JoinToken(token)) => (
                Method::JoinToken,
                self.join.lookup(token).map(Authenticated::Join),
            ),
            None => match peer.and_then(|p| p.leaf_identity.as_deref()) {
                Some(leaf) => {
                    // Checked at the time of the call: the authority (and its bundle) now, not
                    // when the connection was set up.
                    let authority = self.authority.load();
                    let chain = peer
                        .and_then(|p| p.certificates.as_deref())
                        .map_or(&[][..], Vec::as_slice);
                    let policy = auth::RenewalPolicy {
                        trust_domain: &authority.trust_domain,
                        anchors: &authority.anchors,
                        max_attestation_age: self.max_attestation_age,
                    };
                    let result =
                        auth::authenticate_renewal(leaf, chain, &policy, OffsetDateTime::now_utc())
                            .and_then(|renewal| {
                                if let (Some(jwt), Some((ns, _))) =
                                    (&self.jwt, renewal.id.service_account())
                                {
                                    // Proven (its chain verified now): the audit names it.
                                    jwt.check_namespace(ns).map_err(|e| e.of(&renewal.id))?;
                                }
                                Ok(Authenticated::Ready {
                                    id: renewal.id,
                                    attested_at: Some(renewal.attested_at),
                                })
                            });
                    (Method::Renewal, result)
                }
                None => (
                    Method::None,
                    Err(AuthError::unauthenticated(
                        Reason::NoCredential,
                        "no credential: send a service-account token or join token, or present your current certificate",
                    )),
                ),
            },
        }
    }

    #[cfg(test)]
    fn issue(
        &self,
        req: &IssueRequest,
        peer: Option<&PeerInfo>,
    ) -> (Method, Option<SpiffeId>, Result<IssueResponse, Refusal>) {
        self.issue_reviewed(req, peer, None)
    }

    /// An issuance; `review` is what the API server said of the request's service-account token
    /// (`--token-review`: [`CertificateAuthority::issue`] asks before this).
    fn issue_reviewed(
        &self,
        req: &IssueRequest,
        peer: Option<&PeerInfo>,
        review: Option<Result<(), AuthError>>,
    ) -> (Method, Option<SpiffeId>, Result<IssueResponse, Refusal>) {
        // A call that presents nothing (no token, no certificate) is refused before its CSR's
        // signature is checked: anyone who reaches the port could otherwise have the CA verify
        // an RSA-8192 signature per call, with no rate that applies to them.
        if req.credential.is_none() && peer.is_none_or(|p| p.leaf_identity.is_none()) {
            let (method, authenticated) = self.authenticate(None, peer);
            if let Err(e) = authenticated {
                return (method, None, Err(e.into()));
            }
        }
        // So is a service-account token the CA does not take (its check changes nothing, unlike
        // a join token's): a junk token cost the CA that verification too.
        if let Some(Credential::ServiceAccountToken(_)) = req.credential {
            let (method, authenticated) = self.authenticate(req.credential.as_ref(), peer);
            if let Err(e) = authenticated {
                return (method, e.identity.clone(), Err(e.into()));
            }
        }
        // Then the CSR: a bad CSR must not consume a join token.
        let key = match CsrPublicKey::from_csr_der(&req.csr) {
            Ok(key) => key,
            Err(e) => {
                let method = match req.credential {
                    Some(Credential::ServiceAccountToken(_)) => Method::ServiceAccountToken,
                    Some(Credential::JoinToken(_)) => Method::JoinToken,
                    None => Method::Renewal,
                };
                let refusal = Refusal {
                    status: Status::invalid_argument(e.to_string()),
                    result: "invalid_csr",
                };
                return (method, None, Err(refusal));
            }
        };
        // A renewal is held to its certificate's rate before the chain is verified at the time
        // of the call (what that rate bounds), then to its identity's as any issuance.
        if req.credential.is_none()
            && let Some(Err((id, wait))) = presented_call(&self.renewal_calls, peer)
        {
            return (
                Method::Renewal,
                Some(id.clone()),
                Err(rate_limited(&id, wait)),
            );
        }
        let (method, authenticated) = self.authenticate(req.credential.as_ref(), peer);
        let authenticated = match authenticated {
            Ok(a) => a,
            Err(e) => return (method, e.identity.clone(), Err(e.into())),
        };
        // A token the CA took, with the API server's word on it when it is asked.
        if method == Method::ServiceAccountToken && self.token_review.is_some() {
            let reviewed = review.unwrap_or_else(|| {
                Err(AuthError::unavailable(
                    Reason::TokenReviewUnavailable,
                    "the token was not reviewed at the API server; try again",
                ))
            });
            if let Err(e) = reviewed {
                return (method, None, Err(e.into()));
            }
        }
        let (id, attested_at) = match &authenticated {
            Authenticated::Ready { id, attested_at } => (id.clone(), *attested_at),
            Authenticated::Join(p) => (p.id.clone(), None),
        };
        // A renewal carries its lineage on (and the presented certificate was checked above: it
        // is no app SVID, so an app SVID never starts or continues a lineage of its own).
        let presented = match method {
            Method::Renewal => peer
                .and_then(|p| p.leaf_identity.as_deref())
                .and_then(|l| l.as_ref().ok()),
            _ => None,
        };
        if req.app_svid && presented.is_none() {
            let refusal = Refusal {
                status: Status::invalid_argument(
                    "an app SVID is asked for by a sidecar presenting its own certificate, with \
                     no token",
                ),
                result: "app_svid_without_certificate",
            };
            return (method, Some(id), Err(refusal));
        }
        let mut lifetime = self.lifetimes.lifetime_for(req.ttl_seconds);
        // An app SVID ends no later than the sidecar's certificate it was asked with.
        if req.app_svid
            && let Some(cert) = presented
        {
            let now = OffsetDateTime::now_utc().unix_timestamp();
            let left = u64::try_from(cert.not_after.saturating_sub(now)).unwrap_or(0);
            lifetime = lifetime.min(std::time::Duration::from_secs(left));
        }
        // No certificate of a lineage outlives its attestation age: a renewal's ends when its
        // lineage's does (refused, as an age already past is, when too little of it is left);
        // the first one, attested by this call, lives at most the age.
        match attested_at {
            Some(at) => {
                let now = OffsetDateTime::now_utc().unix_timestamp();
                match auth::renewal_lifetime(&id, at, self.max_attestation_age, lifetime, now) {
                    Ok(cut) => lifetime = cut,
                    Err(e) => return (method, Some(id), Err(e.into())),
                }
            }
            None => lifetime = lifetime.min(self.max_attestation_age),
        }
        // Renewals take from their share of the identity's limit first: what they leave of it
        // is kept for tokens and join tokens. These start lineages, and leave in the identity's
        // bucket what renewals may still take of their share: a pod that asks with its token in
        // a loop cannot starve its replicas' renewals.
        let now = Instant::now();
        let limited = match method {
            Method::Renewal => self
                .renewals
                .check(&id, now)
                .and_then(|()| self.limiter.check(&id, now)),
            _ => self
                .limiter
                .check_leaving(&id, now, self.renewals.available(&id, now))
                .map_err(|_| self.limiter.wait_leaving(&id, now, &self.renewals)),
        };
        if let Err(wait) = limited {
            let refusal = rate_limited(&id, wait);
            return (method, Some(id), Err(refusal));
        }
        if let Err((ns, wait)) = namespace_rate(&self.namespaces, &id) {
            let refusal = Refusal {
                status: too_many(&format!("certificate requests in namespace {ns}"), wait),
                result: "rate_limited",
            };
            return (method, Some(id), Err(refusal));
        }

        // The authority this certificate is signed by, and the revocations it is checked against
        // once more and listed with: a reload since `authenticate` checked them must not let a
        // certificate out for what it revoked.
        let authority = self.authority.load();
        if let Err(e) = refuse_revoked_by(&authority.revocations, &id, presented) {
            return (method, Some(id), Err(e.into()));
        }
        let now = OffsetDateTime::now_utc();
        // Longer than the default: counted per identity (a renewal's per identity and lineage)
        // before it is signed, so that revoking the identity (or the lineage) releases `retire`
        // from it; without room to count it apart, it gets the default lifetime (see
        // `Fleet::reserve_long`).
        let default = self.lifetimes.default.min(self.lifetimes.max);
        let mut long = lifetime > default;
        if long {
            let lineage = presented.and_then(|c| {
                meshid_identity::revocation::normalize_serial(c.lineage_serial()).ok()
            });
            let not_after = now
                .checked_add(crate::signer::to_time(lifetime))
                .map_or(authority.intermediate_not_after, |t| {
                    t.min(authority.intermediate_not_after)
                });
            let counted = self.fleet.reserve_long_of(
                &authority.name,
                id.as_str(),
                lineage.as_deref(),
                not_after.unix_timestamp(),
                now.unix_timestamp(),
            );
            if !counted {
                tracing::info!(
                    identity = %id,
                    asked_seconds = lifetime.as_secs(),
                    "certificate issued with the default lifetime: too many identities hold \
                     certificates longer than it to count another one apart"
                );
                lifetime = default;
                long = false;
            }
        }
        // A token or join token attests the identity now and starts a lineage; a renewal carries
        // both on.
        let first_serial = match presented.map(|c| serial_bytes(c.lineage_serial())) {
            None => None,
            Some(Some(serial)) => Some(serial),
            // Never read as a new lineage: that would escape a revoked one.
            Some(None) => {
                let refusal = Refusal {
                    status: Status::permission_denied(
                        "client certificate: its lineage serial cannot be read",
                    ),
                    result: Reason::CertificateIdentity.as_str(),
                };
                return (method, Some(id), Err(refusal));
            }
        };
        let lineage = Lineage {
            attested_at,
            first_serial,
            app_svid: req.app_svid,
        };
        let issued = match sign_leaf_in(&authority, &id, &key, lifetime, now, &lineage) {
            Ok(issued) => issued,
            Err(error) => {
                tracing::error!(%error, identity = %id, "signing failed");
                let refusal = Refusal {
                    status: Status::internal(
                        "the CA could not sign the certificate; a join token sent with the call \
                         was not used up",
                    ),
                    result: "signing_failed",
                };
                return (method, Some(id), Err(refusal));
            }
        };
        // The join token is used up once its certificate exists: a signing that fails leaves it
        // unused. A token that cannot be redeemed (used by another call meanwhile) discards the
        // certificate.
        if let Authenticated::Join(pending) = authenticated
            && let Err(e) = self.join.redeem(pending)
        {
            let refusal = match e {
                RedeemError::Used(e) => e.into(),
                // The token is fine and still unused: a transient answer, so the workload keeps
                // it and asks again.
                error => {
                    tracing::error!(%error, identity = %id, "join token not redeemed: its use cannot be recorded; the token stays unused");
                    Refusal {
                        status: Status::unavailable(
                            "the CA cannot record the join token's use (its directory cannot be \
                             written); the token was not consumed: try again later",
                        ),
                        result: "join_token_unrecorded",
                    }
                }
            };
            return (method, Some(id), Err(refusal));
        }
        if !long {
            self.fleet.issued(
                &authority.name,
                None,
                issued.not_after.unix_timestamp(),
                OffsetDateTime::now_utc().unix_timestamp(),
            );
        }
        let bundle = self.bundle.borrow().clone();
        let response = IssueResponse {
            cert_chain: issued.chain.iter().map(|c| c.to_vec()).collect(),
            trust_anchors: bundle.roots.iter().map(|c| c.to_vec()).collect(),
            spiffe_id: id.to_string(),
            not_before_unix: issued.not_before.unix_timestamp(),
            not_after_unix: issued.not_after.unix_timestamp(),
            bundle_version: bundle.version,
            pinned_intermediates: bundle.pinned.iter().map(|c| c.to_vec()).collect(),
            // The sidecar enforces them from its first certificate; an app has no use for them.
            revoked: if req.app_svid {
                Vec::new()
            } else {
                authority
                    .revocations
                    .entries()
                    .iter()
                    .map(|e| e.to_proto())
                    .collect()
            },
        };
        (method, Some(id), Ok(response))
    }

    /// The bundle as sent. Revocation reasons (free text an operator wrote, "key leaked") go only
    /// to callers with a certificate of the trust domain, not to anonymous ones.
    fn trust_bundle(&self, bundle: &Bundle, reasons: bool) -> TrustBundle {
        TrustBundle {
            trust_domain: self.authority.load().trust_domain.to_string(),
            roots: bundle.roots.iter().map(|c| c.to_vec()).collect(),
            version: bundle.version,
            renew_now: bundle.renew_now,
            pinned_intermediates: bundle.pinned.iter().map(|c| c.to_vec()).collect(),
            jwt_keys: bundle
                .jwt_keys
                .iter()
                .map(|k| meshid_proto::ca::v1::JwtKey {
                    key_id: k.kid.clone(),
                    public_key: k.spki.clone(),
                })
                .collect(),
            revoked: bundle
                .revoked
                .iter()
                .map(|e| {
                    let mut r = e.to_proto();
                    if !reasons {
                        r.reason.clear();
                    }
                    r
                })
                .collect(),
        }
    }

    /// A JWT-SVID for the identity of the certificate on the connection: authenticated as a
    /// renewal is (the certificate verifies now, its attestation is recent enough, its namespace
    /// allowed), for the audiences asked for, naming the certificate's lineage, signed by the
    /// active authority's JWT key, expiring after `--jwt-svid-ttl` or with the certificate,
    /// whichever is first.
    fn issue_jwt_svid(
        &self,
        req: &IssueJwtSvidRequest,
        peer: Option<&PeerInfo>,
    ) -> (Option<SpiffeId>, Result<IssueJwtSvidResponse, Refusal>) {
        let refuse = |status: Status, result: &'static str| Refusal { status, result };
        if peer.and_then(|p| p.leaf_identity.as_ref()).is_none() {
            let status = Status::unauthenticated(
                "a JWT-SVID is issued only to the holder of a meshid certificate: present yours",
            );
            return (None, Err(refuse(status, "no_credential")));
        }
        // Held to its certificate's rate before the certificate is verified at the time of the
        // call (what that rate bounds), then to its identity's.
        if let Some(Err((id, wait))) = presented_call(&self.jwt_svid_calls, peer) {
            let status = too_many(&format!("JWT-SVID requests for {id}"), wait);
            return (Some(id), Err(refuse(status, "rate_limited")));
        }
        let id = match self.authenticate(None, peer) {
            (_, Ok(Authenticated::Ready { id, .. })) => id,
            (_, Ok(Authenticated::Join(_))) => {
                let status = Status::unauthenticated("present your certificate");
                return (None, Err(refuse(status, "no_credential")));
            }
            (_, Err(e)) => return (e.identity.clone(), Err(e.into())),
        };
        if let Err(e) = meshid_identity::jwt_svid::check_audiences(&req.audience) {
            let status = Status::invalid_argument(format!("audience: {e}"));
            return (Some(id), Err(refuse(status, "invalid_audience")));
        }
        if let Err(wait) = self.jwt_limiter.check(&id, Instant::now()) {
            let status = too_many(&format!("JWT-SVID requests for {id}"), wait);
            return (Some(id), Err(refuse(status, "rate_limited")));
        }
        if let Err((ns, wait)) = namespace_rate(&self.jwt_namespaces, &id) {
            let status = too_many(&format!("JWT-SVID requests in namespace {ns}"), wait);
            return (Some(id), Err(refuse(status, "rate_limited")));
        }
        let authority = self.authority.load();
        let Some(signer) = authority.jwt_signer.as_ref() else {
            let status = Status::failed_precondition(format!(
                "the active authority {} has no JWT key (it was made before meshid signed \
                 JWT-SVIDs): `meshid-ca rotate prepare` a new authority and activate it",
                authority.name
            ));
            return (Some(id), Err(refuse(status, "no_jwt_key")));
        };
        let now = OffsetDateTime::now_utc().unix_timestamp();
        let Some(presented) = peer
            .and_then(|p| p.leaf_identity.as_deref())
            .and_then(|l| l.as_ref().ok())
        else {
            // Authenticated above on this very certificate.
            let status = Status::unauthenticated("present your certificate");
            return (Some(id), Err(refuse(status, "no_credential")));
        };
        // The token names the certificate and its lineage, so that revoking either serial refuses
        // the token as it refuses the certificate (the sidecars' ValidateJWTSVID checks them).
        let lineage = normalized_serial(presented.lineage_serial());
        let serial = normalized_serial(&presented.serial_hex);
        let ttl = i64::try_from(self.jwt_svid_ttl.as_secs()).unwrap_or(i64::MAX);
        let exp = now.saturating_add(ttl).min(presented.not_after);
        match meshid_identity::jwt_svid::sign(
            signer,
            &id,
            &req.audience,
            &lineage,
            &serial,
            now,
            exp,
        ) {
            Ok(token) => (
                Some(id.clone()),
                Ok(IssueJwtSvidResponse {
                    token,
                    spiffe_id: id.to_string(),
                    issued_at_unix: now,
                    expires_at_unix: exp,
                }),
            ),
            Err(error) => {
                tracing::error!(%error, identity = %id, "signing a JWT-SVID failed");
                let status = Status::internal("the CA could not sign the JWT-SVID");
                (Some(id), Err(refuse(status, "signing_failed")))
            }
        }
    }

    /// This process as its rotation report describes it (see [`crate::rotation::view::process`]).
    pub fn process_report(
        &self,
        files: &std::path::Path,
        rotation: &crate::authorities::RotationState,
    ) -> crate::rotation::CaProcess {
        let bundle = self.bundle.borrow().clone();
        crate::rotation::view::process(self.fleet.process_now(), &bundle, files, rotation)
    }

    /// Takes one of `key`'s bundle calls ([`BUNDLE_CALLS`]), before the call's chain verification.
    fn limit_bundle_calls(&self, key: &str, what: &str) -> Result<(), Status> {
        self.bundle_calls
            .check(key, Instant::now())
            .map_err(|wait| too_many(&format!("{what} from this certificate"), wait))
    }

    /// Records a sidecar's acknowledgement. It speaks only for the certificate on its own
    /// connection, which must still hold at the time of the call (not expired, chaining to a root
    /// the CA trusts now, not revoked: see [`Self::authenticate_presented`]): the reported chain's
    /// leaf must be that certificate, and the instance is that certificate's key, which must have a
    /// bundle stream open on this CA.
    fn ack(&self, req: &AckTrustBundleRequest, peer: Option<&PeerInfo>) -> Result<(), Status> {
        if req.instance_id.len() > 128 {
            return Err(Status::invalid_argument(
                "instance_id must be at most 128 bytes",
            ));
        }
        if req.serving_chain.is_empty() || req.serving_chain.len() > 4 {
            return Err(Status::invalid_argument(
                "serving_chain must hold 1 to 4 certificates",
            ));
        }
        let handshake_chain = peer.and_then(|p| p.certificates.as_ref());
        let no_certificate =
            || Status::unauthenticated("acknowledge over mTLS with your certificate");
        let presented = handshake_chain
            .and_then(|c| c.first())
            .ok_or_else(no_certificate)?;
        let key = instance_key(presented)
            .ok_or_else(|| Status::invalid_argument("the certificate has no readable key"))?;
        self.limit_bundle_calls(&key, "acknowledgements")?;
        // The authority is read off the chain the handshake verified, not the reported one: the
        // caller could leave its intermediate out of the report and hide from the retire gate.
        let chain = handshake_chain.map_or(&[][..], |c| c.as_slice());
        let now = OffsetDateTime::now_utc().unix_timestamp();
        let trust = self.authority.load();
        let authority = crate::rotation::fleet::authority_of(chain, &trust.authority_anchors, now);
        // Checked now, not only at the handshake: a kept-alive connection may outlive its
        // certificate, the root it chains to (`rotate retire`) or a revocation. Nothing is
        // recorded for a certificate that no longer holds. A chain an authority of the bundle
        // verified just now is not verified again.
        let chain_verified = authority
            .as_ref()
            .is_some_and(|a| trust.bundled_authorities.contains(a));
        drop(trust);
        let info = match self.authenticate_presented(peer, chain_verified) {
            Some(Ok(info)) => info,
            Some(Err(e)) => {
                return Err(refused_certificate(
                    &self.refusals,
                    e,
                    peer,
                    "ack_trust_bundle",
                    "acknowledgement",
                ));
            }
            None => return Err(no_certificate()),
        };
        if presented.as_ref() != req.serving_chain[0].as_slice() {
            return Err(Status::permission_denied(
                "the reported certificate is not the one presented on this connection",
            ));
        }
        let ack = crate::rotation::fleet::Ack {
            identity: info.id.to_string(),
            version: req.bundle_version,
            authority,
            not_after: info.not_after,
            serial: normalized_serial(&info.serial_hex),
            file_mode: req.file_mode,
            held_version: req.held_version,
        };
        let published = self.bundle.borrow().version;
        self.fleet.ack(&key, ack, published).map_err(fleet_status)
    }
}

/// What one certificate (one key) may ask of the bundle calls: acknowledgements and bundle streams
/// opened together. A sidecar acknowledges each bundle version and each new certificate once, and
/// opens a stream when it (re)connects: a few a minute, bursts of a rotation's steps included.
pub const BUNDLE_CALLS: crate::ratelimit::RateLimit = crate::ratelimit::RateLimit {
    per_second: 2.0,
    burst: 32,
};

/// Takes one of the calls of the certificate on `peer`'s connection from `limiter` (keyed by its
/// lineage: the first serial of its lineage of renewals, so a certificate renewed in a loop with a
/// new key each time is one bucket; an app SVID's calls are counted apart from its sidecar's, so
/// that the app cannot use up its sidecar's renewals), before the certificate is verified at the
/// time of the call: one lineage's calls cost at most that many verifications, and a certificate
/// that no longer holds (revoked, its root retired, on a connection kept alive) uses up no one
/// else's rate. `None`: no certificate (or one whose identity cannot be read: refused before any
/// verification); an error names the certificate's identity and the wait.
fn presented_call(
    limiter: &RateLimiter<String>,
    peer: Option<&PeerInfo>,
) -> Option<Result<(), (SpiffeId, std::time::Duration)>> {
    let peer = peer?;
    let leaf = peer.leaf_identity.as_deref()?.as_ref().ok()?;
    let lineage = normalized_serial(leaf.lineage_serial());
    let key = if leaf.app_svid {
        format!("{lineage}/app")
    } else {
        lineage
    };
    Some(
        limiter
            .check(&key, Instant::now())
            .map_err(|wait| (leaf.id.clone(), wait)),
    )
}

/// Takes one token of `id`'s namespace from `limiter`, or names the namespace and the wait. IDs
/// of other shapes (join tokens may name any path) have no namespace and no such limit.
fn namespace_rate(
    limiter: &RateLimiter<String>,
    id: &SpiffeId,
) -> Result<(), (String, std::time::Duration)> {
    match id.service_account() {
        Some((ns, _)) => limiter
            .check(ns, Instant::now())
            .map_err(|wait| (ns.to_owned(), wait)),
        None => Ok(()),
    }
}

/// An Issue call over `id`'s rate limit.
fn rate_limited(id: &SpiffeId, wait: std::time::Duration) -> Refusal {
    Refusal {
        status: too_many(&format!("certificate requests for {id}"), wait),
        result: "rate_limited",
    }
}

/// `RESOURCE_EXHAUSTED`: too many `what`, with the wait in the message and in `retry-after-ms`
/// (the sidecar's renewals wait that long; its acknowledgements and bundle streams try again on
/// their own doubling backoff, from 1 s and 200 ms).
fn too_many(what: &str, wait: std::time::Duration) -> Status {
    let mut status =
        Status::resource_exhausted(format!("too many {what}; retry in {} ms", wait.as_millis()));
    if let Ok(v) = wait.as_millis().max(1).to_string().parse() {
        status.metadata_mut().insert("retry-after-ms", v);
    }
    status
}

/// The instance a certificate stands for: SHA-256 (hex) of its public key.
pub fn instance_key(leaf: &[u8]) -> Option<String> {
    use x509_parser::prelude::FromDer;
    let (_, cert) = x509_parser::certificate::X509Certificate::from_der(leaf).ok()?;
    Some(crate::serial::sha256_hex(cert.public_key().raw))
}

/// A bundle stream or an acknowledgement refused for the certificate on its connection: audited as
/// Issue's refusals are (`WHAT refused`, with the reason label), answered with the refusal's status.
fn refused_certificate(
    log: &crate::audit::RefusalLog,
    e: AuthError,
    peer: Option<&PeerInfo>,
    method: &str,
    what: &str,
) -> Status {
    let identity = peer
        .and_then(|p| p.leaf_identity.as_deref())
        .and_then(|l| l.as_ref().ok())
        .map_or("", |l| l.id.as_str());
    Refusal::from(e).audited(log, method, identity, peer.map(|p| p.remote_addr), what)
}

/// A certificate's serial as revocations name it (empty if it cannot be read).
fn normalized_serial(serial_hex: &str) -> String {
    meshid_identity::revocation::normalize_serial(serial_hex).unwrap_or_default()
}

/// A refused registration or acknowledgement as the caller sees it.
fn fleet_status(e: crate::rotation::fleet::FleetError) -> Status {
    use crate::rotation::fleet::FleetError;
    match e {
        FleetError::Full(_)
        | FleetError::TooManyForIdentity { .. }
        | FleetError::TooManyStreams { .. } => Status::resource_exhausted(e.to_string()),
        FleetError::NotRegistered => Status::failed_precondition(e.to_string()),
        FleetError::ModeChanged { .. }
        | FleetError::IdentityChanged { .. }
        | FleetError::FutureVersion { .. }
        | FleetError::HeldTooFarAhead { .. }
        | FleetError::OlderCertificate { .. } => Status::invalid_argument(e.to_string()),
    }
}
/// What [`CaService::refuse_revoked`] answers, against `revocations`.
fn refuse_revoked_by(
    revocations: &crate::revocations::Revocations,
    id: &SpiffeId,
    presented: Option<&meshid_identity::CertIdentity>,
) -> Result<(), AuthError> {
    if revocations.entries().is_empty() {
        return Ok(());
    }
    let serial =
        presented.and_then(|c| meshid_identity::revocation::normalize_serial(&c.serial_hex).ok());
    let lineage = presented
        .and_then(|c| meshid_identity::revocation::normalize_serial(c.lineage_serial()).ok());
    let Some(entry) = revocations
        .refuses(id, serial.as_deref())
        .or_else(|| revocations.refuses(id, lineage.as_deref()))
    else {
        return Ok(());
    };
    let reason = if entry.reason.is_empty() {
        String::new()
    } else {
        format!(" ({})", entry.reason)
    };
    let way_out = match entry.what {
        meshid_identity::revocation::Revoked::Id(_) => "`meshid-ca unrevoke` lifts it",
        meshid_identity::revocation::Revoked::Serial(_) => {
            "get a new certificate with your service-account token or a join token \
             (`meshid-ca unrevoke` lifts it)"
        }
    };
    Err(AuthError::permission_denied(
        Reason::Revoked,
        format!("{} is revoked{reason}: {way_out}", entry.what),
    ))
}

/// Bundle streams one CA process serves, kept apart so anonymous watchers (no client certificate:
/// tools, dashboards) can never take the room of sidecars, and one connection cannot hold many
/// anonymous streams. Each stream holds a permit until it ends.
#[derive(Debug)]
pub struct StreamPermits {
    authenticated: Arc<tokio::sync::Semaphore>,
    anonymous: Arc<tokio::sync::Semaphore>,
    anonymous_per_connection: u32,
    by_connection: ByConnection,
}

/// Anonymous streams per connection (by its remote address).
type ByConnection = Arc<std::sync::Mutex<std::collections::HashMap<std::net::SocketAddr, u32>>>;

impl Default for StreamPermits {
    fn default() -> Self {
        Self::new(
            MAX_WATCH_STREAMS,
            MAX_ANONYMOUS_STREAMS,
            MAX_ANONYMOUS_PER_CONNECTION,
        )
    }
}

/// A stream's hold on its capacity, released when the stream ends.
#[derive(Debug)]
pub struct StreamPermit {
    _permit: tokio::sync::OwnedSemaphorePermit,
    connection: Option<(std::net::SocketAddr, ByConnection)>,
}

impl Drop for StreamPermit {
    fn drop(&mut self) {
        if let Some((addr, map)) = &self.connection {
            let mut map = map.lock().unwrap_or_else(|p| p.into_inner());
            if let Some(n) = map.get_mut(addr) {
                *n = n.saturating_sub(1);
                if *n == 0 {
                    map.remove(addr);
                }
            }
        }
    }
}

impl StreamPermits {
    pub fn new(authenticated: usize, anonymous: usize, anonymous_per_connection: u32) -> Self {
        Self {
            authenticated: Arc::new(tokio::sync::Semaphore::new(authenticated)),
            anonymous: Arc::new(tokio::sync::Semaphore::new(anonymous)),
            anonymous_per_connection,
            by_connection: Arc::default(),
        }
    }

    /// Room for one more stream of this kind, or why not.
    fn acquire(
        &self,
        peer: Option<&PeerInfo>,
        authenticated: bool,
    ) -> Result<StreamPermit, Status> {
        if authenticated {
            let permit = self
                .authenticated
                .clone()
                .try_acquire_owned()
                .map_err(|_| {
                    Status::resource_exhausted(
                        "too many trust bundle streams on this CA; retry later",
                    )
                })?;
            return Ok(StreamPermit {
                _permit: permit,
                connection: None,
            });
        }
        let permit = self.anonymous.clone().try_acquire_owned().map_err(|_| {
            Status::resource_exhausted(
                "too many anonymous trust bundle streams on this CA; present a certificate or retry later",
            )
        })?;
        let connection = match peer {
            Some(p) => {
                let mut map = self.by_connection.lock().unwrap_or_else(|p| p.into_inner());
                let n = map.entry(p.remote_addr).or_default();
                if *n >= self.anonymous_per_connection {
                    return Err(Status::resource_exhausted(format!(
                        "at most {} anonymous trust bundle streams per connection",
                        self.anonymous_per_connection
                    )));
                }
                *n += 1;
                Some((p.remote_addr, self.by_connection.clone()))
            }
            None => None,
        };
        Ok(StreamPermit {
            _permit: permit,
            connection,
        })
    }
}

/// Bundle streams of sidecars (with a client certificate) one CA process serves at most (each is a
/// task and a buffer).
pub const MAX_WATCH_STREAMS: usize = 50_000;
/// Anonymous bundle streams (no client certificate) one CA process serves at most.
pub const MAX_ANONYMOUS_STREAMS: usize = 256;
/// Anonymous bundle streams one connection may hold.
pub const MAX_ANONYMOUS_PER_CONNECTION: u32 = 4;

type BundleStream = Pin<Box<dyn Stream<Item = Result<TrustBundle, Status>> + Send>>;

/// One bundle stream: the current bundle, then the latest one after every change, until the CA
/// shuts down. It has no task or channel of its own: the connection that carries it polls it, and
/// when that connection or the client lets go of it, dropping it closes the instance. (A task and
/// a channel per stream cost a few KiB each, times every sidecar of the fleet.)
struct BundleWatch {
    bundles: tokio_stream::wrappers::WatchStream<Arc<Bundle>>,
    stopped: tokio_stream::wrappers::WatchStream<bool>,
    open: OpenStream,
}

/// What an open stream holds, released when it is dropped.
struct OpenStream {
    state: Arc<CaState>,
    caller: Option<crate::rotation::fleet::Caller>,
    /// Whether the stream's connection presented a certificate of the trust domain.
    authenticated: bool,
    /// That certificate's identity, serial and lineage (normalized): once a bundle revokes one of
    /// them, the stream's bundles carry no reasons.
    holder: Option<(SpiffeId, String, String)>,
    _permit: StreamPermit,
}

impl OpenStream {
    /// Whether the operator's reasons go with `bundle` on this stream: to a member of the trust
    /// domain whose certificate `bundle` does not revoke (the holder of a revoked key, still
    /// connected, gets the list it must apply, not what the operator wrote about it).
    fn reasons_for(&self, bundle: &Bundle) -> bool {
        use meshid_identity::revocation::Revoked;
        let Some((id, serial, lineage)) = &self.holder else {
            return false;
        };
        self.authenticated
            && !bundle.revoked.iter().any(|e| match &e.what {
                Revoked::Id(revoked) => revoked == id,
                Revoked::Serial(s) => s == serial || s == lineage,
            })
    }
}

impl Drop for OpenStream {
    fn drop(&mut self) {
        if let Some(c) = &self.caller {
            self.state.fleet.stream_closed(&c.key);
        }
        self.state.metrics.watch_streams.dec();
    }
}

impl Stream for BundleWatch {
    type Item = Result<TrustBundle, Status>;

    fn poll_next(
        mut self: Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Self::Item>> {
        use std::task::Poll;
        let this = &mut *self;
        // The shutdown flag first: its stream yields the current value, then every change.
        while let Poll::Ready(stop) = Pin::new(&mut this.stopped).poll_next(cx) {
            if stop != Some(false) {
                return Poll::Ready(None);
            }
        }
        match Pin::new(&mut this.bundles).poll_next(cx) {
            Poll::Ready(Some(bundle)) => {
                let reasons = this.open.reasons_for(&bundle);
                Poll::Ready(Some(Ok(this.open.state.trust_bundle(&bundle, reasons))))
            }
            Poll::Ready(None) => Poll::Ready(None),
            Poll::Pending => Poll::Pending,
        }
    }
}

#[tonic::async_trait]
impl CertificateAuthority for CaService {
    async fn issue(
        &self,
        request: Request<IssueRequest>,
    ) -> Result<Response<IssueResponse>, Status> {
        let started = Instant::now();
        let peer = request.extensions().get::<PeerInfo>().cloned();
        let remote = peer
            .as_ref()
            .map(|p| p.remote_addr.to_string())
            .unwrap_or_default();
        let req = request.into_inner();
        // A token naming a key the CA does not know yet (a key rollover) refreshes a fetched JWKS
        // first (rate-limited); the token is then verified against the new set. Only a call
        // that could be issued for forces it: claims that could be the cluster's, and a CSR that
        // holds (checked again below; this costs a second check only for an unknown kid).
        if let (Some(jwt), Some(Credential::ServiceAccountToken(token))) =
            (&self.state.jwt, &req.credential)
            && jwt.unknown_kid(token).is_some()
            && CsrPublicKey::from_csr_der(&req.csr).is_ok()
        {
            jwt.refresh_for_token(token).await;
        }
        // With --token-review, a token the CA takes is then asked about at the API server (only
        // then: a forged token costs the API server nothing).
        let review = match (&self.state.token_review, &self.state.jwt, &req.credential) {
            // The token first: a junk one must not cost a CSR signature check.
            (Some(reviewer), Some(jwt), Some(Credential::ServiceAccountToken(token))) => {
                match jwt.authenticate(token) {
                    Ok(id) if CsrPublicKey::from_csr_der(&req.csr).is_ok() => {
                        Some(reviewer.review(token, &id).await)
                    }
                    _ => None,
                }
            }
            _ => None,
        };
        let (method, id, result) = self.state.issue_reviewed(&req, peer.as_ref(), review);
        let identity = id.as_ref().map(|i| i.as_str()).unwrap_or("");
        // The audit line links a renewal to the certificate it renewed and to its lineage.
        let renewed = match method {
            Method::Renewal => peer
                .as_ref()
                .and_then(|p| p.leaf_identity.as_deref())
                .and_then(|l| l.as_ref().ok())
                .map(|l| normalized_serial(&l.serial_hex)),
            _ => None,
        };
        let m = &self.state.metrics;
        m.issue_duration.observe(started.elapsed().as_secs_f64());
        match result {
            Ok(resp) => {
                m.issue_requests
                    .get_or_create(&IssueLabels {
                        method: method.as_str(),
                        result: "issued",
                    })
                    .inc();
                let leaf = resp
                    .cert_chain
                    .first()
                    .and_then(|der| meshid_identity::cert_identity_from_der(der).ok());
                let serial = leaf
                    .as_ref()
                    .map(|l| normalized_serial(&l.serial_hex))
                    .unwrap_or_default();
                let lineage = leaf
                    .as_ref()
                    .map(|l| normalized_serial(l.lineage_serial()))
                    .unwrap_or_default();
                tracing::info!(
                    target: "meshid_ca::audit",
                    method = method.as_str(),
                    identity,
                    peer = %remote,
                    result = "issued",
                    serial,
                    renewed = renewed.as_deref().unwrap_or(""),
                    lineage,
                    app_svid = req.app_svid,
                    not_after = resp.not_after_unix,
                    "certificate issued"
                );
                Ok(Response::new(resp))
            }
            Err(refusal) => {
                m.issue_requests
                    .get_or_create(&IssueLabels {
                        method: method.as_str(),
                        result: refusal.result,
                    })
                    .inc();
                Err(refusal.audited(
                    &self.state.refusals,
                    method.as_str(),
                    identity,
                    peer.as_ref().map(|p| p.remote_addr),
                    "certificate",
                ))
            }
        }
    }

    async fn issue_jwt_svid(
        &self,
        request: Request<IssueJwtSvidRequest>,
    ) -> Result<Response<IssueJwtSvidResponse>, Status> {
        let peer = request.extensions().get::<PeerInfo>().cloned();
        let remote = peer
            .as_ref()
            .map(|p| p.remote_addr.to_string())
            .unwrap_or_default();
        let (id, result) = self.state.issue_jwt_svid(request.get_ref(), peer.as_ref());
        let identity = id.as_ref().map(|i| i.as_str()).unwrap_or("");
        let audiences = request.get_ref().audience.len();
        let m = &self.state.metrics;
        match result {
            Ok(resp) => {
                m.jwt_svids
                    .get_or_create(&crate::metrics::ResultLabels { result: "issued" })
                    .inc();
                tracing::info!(
                    target: "meshid_ca::audit",
                    method = "jwt_svid",
                    identity,
                    peer = %remote,
                    result = "issued",
                    audiences,
                    exp = resp.expires_at_unix,
                    "JWT-SVID issued"
                );
                Ok(Response::new(resp))
            }
            Err(refusal) => {
                m.jwt_svids
                    .get_or_create(&crate::metrics::ResultLabels {
                        result: refusal.result,
                    })
                    .inc();
                Err(refusal.audited(
                    &self.state.refusals,
                    "jwt_svid",
                    identity,
                    peer.as_ref().map(|p| p.remote_addr),
                    "JWT-SVID",
                ))
            }
        }
    }

    async fn get_trust_bundle(
        &self,
        request: Request<GetTrustBundleRequest>,
    ) -> Result<Response<TrustBundle>, Status> {
        let bundle = self.state.bundle.borrow().clone();
        // Revocation reasons go to workloads of the trust domain whose certificate still holds,
        // checked now as for a bundle stream (only when there is a reason to show), within the
        // certificate's bundle calls ([`BUNDLE_CALLS`]), before the check: past them, the bundle
        // comes without the reasons.
        let peer = request.extensions().get::<PeerInfo>();
        let within_calls = || {
            peer.and_then(|p| p.certificates.as_ref()?.first())
                .and_then(|leaf| instance_key(leaf))
                .is_some_and(|key| {
                    self.state
                        .limit_bundle_calls(&key, "trust bundle calls")
                        .is_ok()
                })
        };
        let reasons = bundle.revoked.iter().any(|e| !e.reason.is_empty())
            && within_calls()
            && matches!(self.state.authenticate_presented(peer, false), Some(Ok(_)));
        Ok(Response::new(self.state.trust_bundle(&bundle, reasons)))
    }

    type WatchTrustBundleStream = BundleStream;

    async fn ack_trust_bundle(
        &self,
        request: Request<AckTrustBundleRequest>,
    ) -> Result<Response<AckTrustBundleResponse>, Status> {
        let peer = request.extensions().get::<PeerInfo>().cloned();
        self.state.ack(request.get_ref(), peer.as_ref())?;
        Ok(Response::new(AckTrustBundleResponse {}))
    }

    async fn watch_trust_bundle(
        &self,
        request: Request<WatchTrustBundleRequest>,
    ) -> Result<Response<Self::WatchTrustBundleStream>, Status> {
        // Only a stream opened with a certificate registers an instance, and that instance is the
        // certificate's key: nothing the caller sends names it.
        let peer = request.extensions().get::<PeerInfo>().cloned();
        let req = request.into_inner();
        let key = peer
            .as_ref()
            .and_then(|p| p.certificates.as_ref()?.first())
            .and_then(|leaf| instance_key(leaf));
        if let Some(key) = &key {
            self.state.limit_bundle_calls(key, "bundle streams")?;
        }
        // The authority the handshake's chain verifies under (what the instance serves, as an
        // acknowledgement reads it); a chain an authority of the bundle verified just now is not
        // verified again below.
        let chain = peer
            .as_ref()
            .and_then(|p| p.certificates.as_deref())
            .map_or(&[][..], Vec::as_slice);
        let (authority, chain_verified) = if chain.is_empty() {
            (None, false)
        } else {
            let trust = self.state.authority.load();
            let now = OffsetDateTime::now_utc().unix_timestamp();
            let authority =
                crate::rotation::fleet::authority_of(chain, &trust.authority_anchors, now);
            let verified = authority
                .as_ref()
                .is_some_and(|a| trust.bundled_authorities.contains(a));
            (authority, verified)
        };
        // The certificate is checked now, not only at the handshake: a kept-alive connection may
        // outlive it, the root it chains to (`rotate retire`) or a revocation, and such a
        // certificate must not take an instance's room nor count for the rotation gates. Without
        // a certificate the stream is anonymous.
        let presented = match self
            .state
            .authenticate_presented(peer.as_ref(), chain_verified)
        {
            Some(Ok(id)) => Some(id),
            Some(Err(e)) => {
                return Err(refused_certificate(
                    &self.state.refusals,
                    e,
                    peer.as_ref(),
                    "watch_trust_bundle",
                    "trust bundle stream",
                ));
            }
            None => None,
        };
        let caller = presented.and_then(|id| {
            Some(crate::rotation::fleet::Caller {
                key: key?,
                identity: id.id.to_string(),
                file_mode: req.file_mode,
                not_after: id.not_after,
                serial: normalized_serial(&id.serial_hex),
                lineage: normalized_serial(id.lineage_serial()),
                authority,
            })
        });
        let authenticated = presented.is_some();
        let holder = presented.map(|id| {
            (
                id.id.clone(),
                normalized_serial(&id.serial_hex),
                normalized_serial(id.lineage_serial()),
            )
        });
        let state = self.state.clone();
        let now = OffsetDateTime::now_utc().unix_timestamp();
        let permit = match state.streams.acquire(peer.as_ref(), caller.is_some()) {
            Ok(permit) => permit,
            Err(status) => {
                // A sidecar the CA has no room for is one the rotation gates cannot see: they wait
                // for it (see `Fleet::turned_away`).
                if let Some(c) = &caller {
                    state.fleet.turned_away(c, status.message(), now);
                }
                return Err(status);
            }
        };
        if let Some(c) = &caller {
            state.fleet.stream_opened(c, now).map_err(fleet_status)?;
        }
        let bundles = tokio_stream::wrappers::WatchStream::new(state.bundle.subscribe());
        let stopped = tokio_stream::wrappers::WatchStream::new(state.shutdown.clone());
        state.metrics.watch_streams.inc();
        Ok(Response::new(Box::pin(BundleWatch {
            bundles,
            stopped,
            open: OpenStream {
                state,
                caller,
                authenticated,
                holder,
                _permit: permit,
            },
        })))
    }
}

#[cfg(test)]
mod tests {
    //! The issuance, bundle stream and acknowledgement decisions, called directly on a `CaState`
    //! built as `server::start` builds it (no network, no TLS: the `PeerInfo` a TLS handshake would
    //! attach is made by hand from a chain).

    use std::collections::BTreeSet;
    use std::time::Duration;

    use aws_lc_rs::rand::SystemRandom;
    use aws_lc_rs::signature::{ECDSA_P256_SHA256_FIXED_SIGNING, EcdsaKeyPair, KeyPair as _};
    use base64::Engine;
    use base64::engine::general_purpose::URL_SAFE_NO_PAD;
    use meshid_identity::TrustDomain;
    use meshid_identity::revocation::Revoked;
    use meshid_identity::testing::{LeafShape, TestPki};
    use prometheus_client::registry::Registry;
    use rcgen::{
        BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, KeyPair,
        KeyUsagePurpose, PKCS_ECDSA_P256_SHA256, PKCS_ECDSA_P384_SHA384, PKCS_ED25519, SanType,
        SignatureAlgorithm,
    };
    use rustls_pki_types::UnixTime;
    use serde_json::{Value, json};
    use tonic::Code;
    use x509_parser::extensions::GeneralName;
    use x509_parser::prelude::{FromDer, X509Certificate};

    use super::*;
    use crate::audit::RefusalLimits;
    use crate::auth::JwtConfig;
    use crate::ratelimit::RateLimit;
    use crate::signer::sign_leaf;

    const TD: &str = "cluster.local";
    const FRONTEND: &str = "spiffe://cluster.local/ns/shop/sa/frontend";
    const BACKEND: &str = "spiffe://cluster.local/ns/shop/sa/backend";
    const VM: &str = "spiffe://cluster.local/vm/db";
    const SA_ISSUER: &str = "https://kubernetes.default.svc.cluster.local";
    const SA_AUDIENCE: &str = "meshid-ca";
    /// The lifetimes every test CA hands out.
    const LIFETIMES: LifetimePolicy = LifetimePolicy {
        default: Duration::from_secs(600),
        max: Duration::from_secs(3600),
    };

    // ---- fixture -----------------------------------------------------------------------------

    #[derive(Default)]
    struct Opts {
        rate: Option<RateLimit>,
        /// The namespace limit (default: `rate`'s `per_namespace`).
        namespace_rate: Option<RateLimit>,
        /// Accept service-account tokens (a JWKS of `TestCa::sa`'s key).
        service_accounts: bool,
        allowed_namespaces: Option<&'static [&'static str]>,
        /// `--max-attestation-age` (default: `MAX_ATTESTATION_AGE`).
        max_attestation_age: Option<Duration>,
    }

    /// The attestation age every test CA allows unless told otherwise.
    const MAX_ATTESTATION_AGE: Duration = Duration::from_secs(24 * 3600);

    /// A CA directory made by `authority::init` and a `CaState` over it, as `server::start` builds.
    struct TestCa {
        dir: tempfile::TempDir,
        state: CaState,
        sa: ServiceAccountIssuer,
        _shutdown: watch::Sender<bool>,
    }

    impl TestCa {
        fn new() -> Self {
            Self::with(Opts::default())
        }

        fn with(opts: Opts) -> Self {
            let dir = tempfile::tempdir().unwrap();
            let td = TrustDomain::new(TD).unwrap();
            crate::authority::init(dir.path(), &td, None).unwrap();
            let authority = Authority::load(dir.path()).unwrap();
            let sa = ServiceAccountIssuer::new("sa-key-1");
            let jwt = opts.service_accounts.then(|| {
                let jwks_path = dir.path().join("jwks.json");
                std::fs::write(&jwks_path, sa.jwks().to_string()).unwrap();
                let config = JwtConfig {
                    jwks: crate::auth::JwksSource::File(jwks_path),
                    issuer: SA_ISSUER.into(),
                    audience: SA_AUDIENCE.into(),
                    allowed_namespaces: opts
                        .allowed_namespaces
                        .map(|ns| ns.iter().map(|n| (*n).to_owned()).collect::<BTreeSet<_>>()),
                    max_token_lifetime: JwtConfig::DEFAULT_MAX_TOKEN_LIFETIME,
                    dangerous_accept_unbound_tokens: false,
                    token_review: false,
                };
                JwtAuthenticator::new(config, td.clone()).unwrap()
            });
            let metrics = Metrics::register(&mut Registry::default());
            let metrics_suppressed = metrics.audit_refusals_suppressed.clone();
            let (shutdown_tx, shutdown_rx) = watch::channel(false);
            let (bundle_tx, _) =
                watch::channel(Arc::new(Bundle::of(&authority, authority.bundle_version)));
            let state = CaState {
                authority: ArcSwap::from_pointee(authority),
                bundle: bundle_tx,
                jwt,
                token_review: None,
                join: JoinTokenStore::new(dir.path(), td),
                lifetimes: LIFETIMES,
                max_attestation_age: opts.max_attestation_age.unwrap_or(MAX_ATTESTATION_AGE),
                limiter: RateLimiter::new(opts.rate.unwrap_or_default()),
                jwt_svid_ttl: Duration::from_secs(300),
                jwt_limiter: RateLimiter::new(opts.rate.unwrap_or_default()),
                namespaces: RateLimiter::new(
                    opts.namespace_rate
                        .unwrap_or(opts.rate.unwrap_or_default().per_namespace()),
                ),
                jwt_namespaces: RateLimiter::new(
                    opts.namespace_rate
                        .unwrap_or(opts.rate.unwrap_or_default().per_namespace()),
                ),
                renewals: RateLimiter::new(opts.rate.unwrap_or_default().renewal_share()),
                renewal_calls: RateLimiter::new(opts.rate.unwrap_or_default().per_lineage()),
                jwt_svid_calls: RateLimiter::new(opts.rate.unwrap_or_default().per_lineage()),
                bundle_calls: RateLimiter::new(BUNDLE_CALLS),
                metrics,
                shutdown: shutdown_rx,
                fleet: crate::rotation::Fleet::new(crate::rotation::fleet::CaProcess {
                    started_unix: OffsetDateTime::now_utc().unix_timestamp(),
                    max_ttl_seconds: LIFETIMES.max.as_secs(),
                    ..Default::default()
                }),
                streams: Default::default(),
                refusals: crate::audit::RefusalLog::new(
                    crate::audit::RefusalLimits::default(),
                    metrics_suppressed,
                ),
            };
            Self {
                dir,
                state,
                sa,
                _shutdown: shutdown_tx,
            }
        }

        /// A join token for `id`, as `meshid-ca token create --id <id> --ttl <ttl>` makes it.
        fn join_token(&self, id: &str, ttl: Duration) -> String {
            let td = crate::authority::read_trust_domain(self.dir.path()).unwrap();
            JoinTokenStore::new(self.dir.path(), td)
                .create(&SpiffeId::parse(id).unwrap(), ttl)
                .unwrap()
        }

        /// A one-hour workload certificate this CA signed for `id` at `at` (leaf, intermediate).
        fn cert_at(&self, id: &str, at: OffsetDateTime) -> Vec<CertificateDer<'static>> {
            let key = CsrPublicKey::from_csr_der(&csr()).unwrap();
            let id = SpiffeId::parse(id).unwrap();
            sign_leaf(
                &self.state.authority.load(),
                &id,
                &key,
                Duration::from_secs(3600),
                at,
            )
            .unwrap()
            .chain
        }

        /// A still-valid certificate this CA issued for `id`.
        fn cert(&self, id: &str) -> Vec<CertificateDer<'static>> {
            self.cert_at(id, OffsetDateTime::now_utc())
        }

        /// A one-hour certificate this CA signs now for `id`, whose identity was attested
        /// `ago_secs` seconds ago (the end of a lineage of renewals).
        fn cert_attested(&self, id: &str, ago_secs: i64) -> Vec<CertificateDer<'static>> {
            let key = CsrPublicKey::from_csr_der(&csr()).unwrap();
            let now = OffsetDateTime::now_utc();
            crate::signer::sign_leaf_attested(
                &self.state.authority.load(),
                &SpiffeId::parse(id).unwrap(),
                &key,
                Duration::from_secs(3600),
                now,
                now.unix_timestamp() - ago_secs,
            )
            .unwrap()
            .chain
        }

        /// A three-hour certificate this CA signed for `id`, valid from `ago_secs` seconds ago,
        /// without the attested-at extension (as issued before the extension existed).
        fn cert_unattested(&self, id: &str, ago_secs: i64) -> Vec<CertificateDer<'static>> {
            let authority = self.state.authority.load();
            let mut params = CertificateParams::default();
            params.distinguished_name = rcgen::DistinguishedName::new();
            params.subject_alt_names = vec![SanType::URI(id.try_into().unwrap())];
            params.is_ca = IsCa::ExplicitNoCa;
            params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
            params.extended_key_usages = vec![
                ExtendedKeyUsagePurpose::ServerAuth,
                ExtendedKeyUsagePurpose::ClientAuth,
            ];
            params.use_authority_key_identifier_extension = true;
            params.not_before = OffsetDateTime::now_utc() - time::Duration::seconds(ago_secs);
            params.not_after = params.not_before + time::Duration::hours(3);
            let key = KeyPair::generate().unwrap();
            let leaf = params.signed_by(&key, &authority.issuer).unwrap();
            vec![leaf.der().clone(), authority.intermediate_der.clone()]
        }

        fn root(&self) -> CertificateDer<'static> {
            self.state.authority.load().roots[0].clone()
        }
    }

    /// A Kubernetes service-account token issuer with one ES256 key (tokens assembled by hand).
    struct ServiceAccountIssuer {
        key: EcdsaKeyPair,
        kid: String,
    }

    impl ServiceAccountIssuer {
        fn new(kid: &str) -> Self {
            Self {
                key: EcdsaKeyPair::generate(&ECDSA_P256_SHA256_FIXED_SIGNING).unwrap(),
                kid: kid.into(),
            }
        }

        fn jwks(&self) -> Value {
            let point = self.key.public_key().as_ref();
            json!({ "keys": [{
                "use": "sig", "kty": "EC", "kid": self.kid, "alg": "ES256", "crv": "P-256",
                "x": URL_SAFE_NO_PAD.encode(&point[1..33]),
                "y": URL_SAFE_NO_PAD.encode(&point[33..65]),
            }]})
        }

        /// The claims of a valid projected token for `ns/sa`.
        fn claims(ns: &str, sa: &str) -> Value {
            let now = OffsetDateTime::now_utc().unix_timestamp();
            json!({
                "aud": [SA_AUDIENCE], "iss": SA_ISSUER, "exp": now + 600, "iat": now, "nbf": now,
                "sub": format!("system:serviceaccount:{ns}:{sa}"),
                "kubernetes.io": {
                    "namespace": ns,
                    "pod": { "name": format!("{sa}-1"), "uid": "9a8b7c6d-5e4f-4a3b-8c2d-1e0f9a8b7c6d" },
                    "serviceaccount": { "name": sa },
                },
            })
        }

        fn sign(&self, claims: &Value) -> String {
            let header = json!({ "alg": "ES256", "kid": self.kid });
            let message = format!(
                "{}.{}",
                URL_SAFE_NO_PAD.encode(header.to_string()),
                URL_SAFE_NO_PAD.encode(claims.to_string())
            );
            let sig = self
                .key
                .sign(&SystemRandom::new(), message.as_bytes())
                .unwrap();
            format!("{message}.{}", URL_SAFE_NO_PAD.encode(sig.as_ref()))
        }

        fn token(&self, ns: &str, sa: &str) -> String {
            self.sign(&Self::claims(ns, sa))
        }
    }

    /// A well-formed P-256 CSR asking for nothing.
    fn csr() -> Vec<u8> {
        csr_with(&CertificateParams::default(), &PKCS_ECDSA_P256_SHA256)
    }

    fn csr_with(params: &CertificateParams, alg: &'static SignatureAlgorithm) -> Vec<u8> {
        let key = KeyPair::generate_for(alg).unwrap();
        params.serialize_request(&key).unwrap().der().to_vec()
    }

    /// A CSR that asks for everything the CA must not grant: another identity, DNS names, a
    /// subject, CA:TRUE with keyCertSign, codeSigning.
    fn greedy_csr_params() -> CertificateParams {
        let mut params =
            CertificateParams::new(vec!["evil.example".to_owned(), "localhost".to_owned()])
                .unwrap();
        params.subject_alt_names.push(SanType::URI(
            "spiffe://cluster.local/ns/kube-system/sa/admin"
                .try_into()
                .unwrap(),
        ));
        params
            .distinguished_name
            .push(DnType::CommonName, "cluster-admin");
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::CodeSigning];
        params
    }

    fn request(csr: Vec<u8>, credential: Option<Credential>) -> IssueRequest {
        IssueRequest {
            csr,
            credential,
            ttl_seconds: 0,
            app_svid: false,
        }
    }

    fn join(token: impl Into<String>) -> Option<Credential> {
        Some(Credential::JoinToken(token.into()))
    }

    fn service_account(token: impl Into<String>) -> Option<Credential> {
        Some(Credential::ServiceAccountToken(token.into()))
    }

    /// What the TLS listener attaches to calls on a connection that presented `chain`.
    fn peer(chain: &[CertificateDer<'static>]) -> PeerInfo {
        let leaf_identity = chain.first().map(|leaf| {
            Arc::new(meshid_identity::cert_identity_from_der(leaf).map_err(|e| e.to_string()))
        });
        PeerInfo {
            remote_addr: "192.0.2.7:40000".parse().unwrap(),
            certificates: Some(Arc::new(chain.to_vec())),
            leaf_identity,
            activity: Default::default(),
        }
    }

    /// A TLS connection without a client certificate.
    fn anonymous_peer() -> PeerInfo {
        PeerInfo {
            remote_addr: "192.0.2.7:40000".parse().unwrap(),
            certificates: None,
            leaf_identity: None,
            activity: Default::default(),
        }
    }

    /// Verifies an issued chain (leaf first) to `root` for both TLS usages.
    fn verify_chain(chain: &[Vec<u8>], root: &CertificateDer<'_>) -> Result<(), webpki::Error> {
        let leaf = CertificateDer::from(chain[0].as_slice());
        let ee = webpki::EndEntityCert::try_from(&leaf)?;
        let anchor = webpki::anchor_from_trusted_cert(root)?;
        let intermediates: Vec<CertificateDer<'_>> = chain[1..]
            .iter()
            .map(|c| CertificateDer::from(c.as_slice()))
            .collect();
        let algs = rustls::crypto::aws_lc_rs::default_provider()
            .signature_verification_algorithms
            .all;
        for usage in [
            webpki::KeyUsage::server_auth(),
            webpki::KeyUsage::client_auth(),
        ] {
            ee.verify_for_usage(
                algs,
                std::slice::from_ref(&anchor),
                &intermediates,
                UnixTime::now(),
                usage,
                None,
                None,
            )?;
        }
        Ok(())
    }

    // ---- checking issue() --------------------------------------------------------------------

    #[derive(Debug, Clone, Copy)]
    enum Expected {
        /// A certificate for this SPIFFE ID.
        Issued(&'static str),
        /// A refusal with this gRPC code and `result` label.
        Refused(Code, &'static str),
        /// A refusal after the identity was authenticated: labelled with it.
        RefusedFor(Code, &'static str, &'static str),
    }

    type Decision = (Method, Option<SpiffeId>, Result<IssueResponse, Refusal>);

    /// Checks one decision of `issue(req, ..)`; returns the response when one was issued. Every
    /// issued certificate carries exactly the expected identity over the CSR's key.
    fn check(
        name: &str,
        req: &IssueRequest,
        (method, id, result): Decision,
        want_method: Method,
        expected: Expected,
    ) -> Option<IssueResponse> {
        assert_eq!(method, want_method, "{name}: method label");
        match (expected, result) {
            (Expected::Issued(want), Ok(resp)) => {
                assert_eq!(id.as_ref().map(SpiffeId::as_str), Some(want), "{name}");
                assert_eq!(resp.spiffe_id, want, "{name}");
                let info = meshid_identity::cert_identity_from_der(&resp.cert_chain[0])
                    .unwrap_or_else(|e| panic!("{name}: issued leaf: {e}"));
                assert_eq!(info.id.as_str(), want, "{name}: leaf identity");
                let (_, leaf) = X509Certificate::from_der(&resp.cert_chain[0]).unwrap();
                let csr_key = CsrPublicKey::from_csr_der(&req.csr).unwrap();
                assert_eq!(
                    leaf.public_key().subject_public_key.data.as_ref(),
                    csr_key.raw(),
                    "{name}: the leaf certifies the CSR's key"
                );
                Some(resp)
            }
            (Expected::Refused(code, label), Err(refusal)) => {
                assert_eq!(refusal.status.code(), code, "{name}: {:?}", refusal.status);
                assert_eq!(refusal.result, label, "{name}: {:?}", refusal.status);
                if label != "rate_limited" {
                    // Refused before anyone was authenticated: no identity to label.
                    assert_eq!(id, None, "{name}: identity label");
                }
                None
            }
            (Expected::RefusedFor(code, label, who), Err(refusal)) => {
                assert_eq!(refusal.status.code(), code, "{name}: {:?}", refusal.status);
                assert_eq!(refusal.result, label, "{name}: {:?}", refusal.status);
                assert_eq!(
                    id.as_ref().map(SpiffeId::as_str),
                    Some(who),
                    "{name}: identity label"
                );
                None
            }
            (Expected::Issued(want), Err(refusal)) => {
                panic!("{name}: expected {want} issued, got {:?}", refusal.status)
            }
            (Expected::Refused(code, label) | Expected::RefusedFor(code, label, _), Ok(resp)) => {
                panic!(
                    "{name}: expected {code:?}/{label}, got {} issued",
                    resp.spiffe_id
                )
            }
        }
    }

    type Call = (IssueRequest, Option<PeerInfo>);

    // ---- issue(): who gets what ----------------------------------------------------------------

    #[test]
    fn issue_decisions_by_credential() {
        struct Case {
            name: &'static str,
            call: fn(&TestCa) -> Call,
            method: Method,
            expected: Expected,
        }
        use Expected::{Issued, Refused};
        let cases = [
            Case {
                name: "no credential and no client certificate",
                call: |_| (request(csr(), None), None),
                method: Method::None,
                expected: Refused(Code::Unauthenticated, "no_credential"),
            },
            Case {
                name: "no credential on a TLS connection without a client certificate",
                call: |_| (request(csr(), None), Some(anonymous_peer())),
                method: Method::None,
                expected: Refused(Code::Unauthenticated, "no_credential"),
            },
            Case {
                name: "no credential, and a CSR whose signature is broken: refused for the \
                       credential, the signature never checked",
                call: |_| {
                    let mut broken = csr();
                    let last = broken.len() - 1;
                    broken[last] ^= 1;
                    (request(broken, None), Some(anonymous_peer()))
                },
                method: Method::None,
                expected: Refused(Code::Unauthenticated, "no_credential"),
            },
            Case {
                name: "service-account token but the CA has no JWKS",
                call: |ca| {
                    let token = ca.sa.token("shop", "frontend");
                    (request(csr(), service_account(token)), None)
                },
                method: Method::ServiceAccountToken,
                expected: Refused(Code::Unauthenticated, "service_account_tokens_disabled"),
            },
            Case {
                name: "a refused service-account token does not fall back to the client certificate",
                call: |ca| {
                    let token = ca.sa.token("shop", "frontend");
                    let peer = peer(&ca.cert(FRONTEND));
                    (request(csr(), service_account(token)), Some(peer))
                },
                method: Method::ServiceAccountToken,
                expected: Refused(Code::Unauthenticated, "service_account_tokens_disabled"),
            },
            Case {
                name: "malformed join token",
                call: |_| (request(csr(), join("not-a-join-token")), None),
                method: Method::JoinToken,
                expected: Refused(Code::Unauthenticated, "unknown_join_token"),
            },
            Case {
                name: "forged join token (well-formed, never created)",
                call: |_| {
                    let forged = format!("meshid-join-{}", "A".repeat(43));
                    (request(csr(), join(forged)), None)
                },
                method: Method::JoinToken,
                expected: Refused(Code::Unauthenticated, "unknown_join_token"),
            },
            Case {
                name: "join token of another CA",
                call: |_| {
                    let other = TestCa::new();
                    let token = other.join_token(VM, Duration::from_secs(600));
                    (request(csr(), join(token)), None)
                },
                method: Method::JoinToken,
                expected: Refused(Code::Unauthenticated, "unknown_join_token"),
            },
            Case {
                name: "expired join token",
                call: |ca| {
                    let token = ca.join_token(VM, Duration::ZERO);
                    (request(csr(), join(token)), None)
                },
                method: Method::JoinToken,
                expected: Refused(Code::Unauthenticated, "join_token_expired"),
            },
            Case {
                name: "join token used a second time",
                call: |ca| {
                    let token = ca.join_token(VM, Duration::from_secs(600));
                    let first = request(csr(), join(token.clone()));
                    let decision = ca.state.issue(&first, None);
                    check("first use", &first, decision, Method::JoinToken, Issued(VM));
                    (request(csr(), join(token)), None)
                },
                method: Method::JoinToken,
                expected: Refused(Code::Unauthenticated, "join_token_used"),
            },
            Case {
                name: "a refused join token does not fall back to the client certificate",
                call: |ca| {
                    let forged = format!("meshid-join-{}", "A".repeat(43));
                    (request(csr(), join(forged)), Some(peer(&ca.cert(FRONTEND))))
                },
                method: Method::JoinToken,
                expected: Refused(Code::Unauthenticated, "unknown_join_token"),
            },
            Case {
                name: "valid join token",
                call: |ca| {
                    let token = ca.join_token(VM, Duration::from_secs(600));
                    (request(csr(), join(token)), None)
                },
                method: Method::JoinToken,
                expected: Issued(VM),
            },
            Case {
                name: "a join token wins over the client certificate",
                call: |ca| {
                    let token = ca.join_token(VM, Duration::from_secs(600));
                    (request(csr(), join(token)), Some(peer(&ca.cert(FRONTEND))))
                },
                method: Method::JoinToken,
                expected: Issued(VM),
            },
            Case {
                name: "renewal with a valid certificate of this CA",
                call: |ca| (request(csr(), None), Some(peer(&ca.cert(FRONTEND)))),
                method: Method::Renewal,
                expected: Issued(FRONTEND),
            },
            Case {
                name: "renewal of a join-token identity",
                call: |ca| (request(csr(), None), Some(peer(&ca.cert(VM)))),
                method: Method::Renewal,
                expected: Issued(VM),
            },
            Case {
                name: "renewal with an expired certificate of this CA",
                call: |ca| {
                    let two_hours_ago = OffsetDateTime::now_utc() - time::Duration::hours(2);
                    let expired = ca.cert_at(FRONTEND, two_hours_ago);
                    (request(csr(), None), Some(peer(&expired)))
                },
                method: Method::Renewal,
                expected: Refused(Code::Unauthenticated, "certificate_expired"),
            },
            Case {
                name: "renewal with a certificate of another PKI in this trust domain",
                call: |_| {
                    let foreign = TestPki::new("other").leaf(FRONTEND);
                    (request(csr(), None), Some(peer(&foreign.chain)))
                },
                method: Method::Renewal,
                expected: Refused(Code::Unauthenticated, "untrusted_chain"),
            },
            Case {
                name: "renewal presenting the leaf without its intermediate",
                call: |ca| (request(csr(), None), Some(peer(&ca.cert(FRONTEND)[..1]))),
                method: Method::Renewal,
                expected: Refused(Code::Unauthenticated, "untrusted_chain"),
            },
            Case {
                name: "renewal with a certificate of another trust domain",
                call: |_| {
                    let foreign =
                        TestPki::new("other").leaf("spiffe://other.example/ns/shop/sa/frontend");
                    (request(csr(), None), Some(peer(&foreign.chain)))
                },
                method: Method::Renewal,
                expected: Refused(Code::PermissionDenied, "wrong_trust_domain"),
            },
            Case {
                name: "renewal with a CA certificate",
                call: |_| {
                    let shape = LeafShape {
                        is_ca: true,
                        ..LeafShape::default()
                    };
                    let leaf = TestPki::new("other").leaf_shaped(FRONTEND, &shape);
                    (request(csr(), None), Some(peer(&leaf.chain)))
                },
                method: Method::Renewal,
                expected: Refused(Code::Unauthenticated, "certificate_identity"),
            },
            Case {
                name: "renewal with a certificate of two URI SANs",
                call: |_| {
                    let shape = LeafShape {
                        uris: Some(vec![FRONTEND.into(), BACKEND.into()]),
                        ..LeafShape::default()
                    };
                    let leaf = TestPki::new("other").leaf_shaped(FRONTEND, &shape);
                    (request(csr(), None), Some(peer(&leaf.chain)))
                },
                method: Method::Renewal,
                expected: Refused(Code::Unauthenticated, "certificate_identity"),
            },
            Case {
                name: "malformed CSR with a valid client certificate",
                call: |ca| {
                    let req = request(b"not a csr".to_vec(), None);
                    (req, Some(peer(&ca.cert(FRONTEND))))
                },
                method: Method::Renewal,
                expected: Refused(Code::InvalidArgument, "invalid_csr"),
            },
            Case {
                // Nothing presented is refused before the CSR is read.
                name: "empty CSR, no credential at all",
                call: |_| (request(Vec::new(), None), None),
                method: Method::None,
                expected: Refused(Code::Unauthenticated, "no_credential"),
            },
            Case {
                // The token is refused before the CSR is read (see
                // `service_account_decisions_with_a_namespace_allow_list` for a CA that takes it).
                name: "empty CSR with a service-account token, on a CA that takes none",
                call: |ca| {
                    let token = ca.sa.token("shop", "frontend");
                    (request(Vec::new(), service_account(token)), None)
                },
                method: Method::ServiceAccountToken,
                expected: Refused(Code::Unauthenticated, "service_account_tokens_disabled"),
            },
        ];
        for case in cases {
            let ca = TestCa::new();
            let (req, peer) = (case.call)(&ca);
            let decision = ca.state.issue(&req, peer.as_ref());
            check(case.name, &req, decision, case.method, case.expected);
        }
    }

    #[test]
    fn invalid_csr_does_not_consume_the_join_token() {
        struct Case {
            name: &'static str,
            csr: fn() -> Vec<u8>,
        }
        let cases = [
            Case {
                name: "empty",
                csr: Vec::new,
            },
            Case {
                name: "not DER",
                csr: || b"-----BEGIN CERTIFICATE REQUEST-----".to_vec(),
            },
            Case {
                name: "truncated",
                csr: || {
                    let good = csr();
                    good[..good.len() / 2].to_vec()
                },
            },
            Case {
                name: "signature does not verify",
                csr: || {
                    let mut bad = csr();
                    let last = bad.len() - 1;
                    bad[last] ^= 0x01;
                    bad
                },
            },
            Case {
                name: "trailing bytes",
                csr: || {
                    let mut bad = csr();
                    bad.push(0);
                    bad
                },
            },
            Case {
                name: "oversized",
                csr: || vec![0x30; crate::csr::MAX_CSR_LEN + 1],
            },
        ];
        for case in cases {
            let ca = TestCa::new();
            let token = ca.join_token(VM, Duration::from_secs(600));
            let bad = request((case.csr)(), join(token.clone()));
            let decision = ca.state.issue(&bad, None);
            let expected = Expected::Refused(Code::InvalidArgument, "invalid_csr");
            check(case.name, &bad, decision, Method::JoinToken, expected);
            assert!(
                ca.state.join.lookup(&token).is_ok(),
                "{}: token still redeemable",
                case.name
            );
            // The same token then works with a good CSR.
            let good = request(csr(), join(token));
            let decision = ca.state.issue(&good, None);
            check(
                case.name,
                &good,
                decision,
                Method::JoinToken,
                Expected::Issued(VM),
            );
        }
    }

    #[test]
    fn a_revoked_identity_is_refused_before_its_join_token_is_used_up() {
        let ca = TestCa::new();
        let token = ca.join_token(VM, Duration::from_secs(600));
        let mut list = crate::revocations::Revocations::default();
        list.revoke(
            meshid_identity::revocation::Revoked::Id(SpiffeId::parse(VM).unwrap()),
            OffsetDateTime::now_utc().unix_timestamp(),
            3600,
            "test".into(),
        )
        .unwrap();
        list.save(ca.dir.path()).unwrap();
        ca.state
            .authority
            .store(Arc::new(Authority::load(ca.dir.path()).unwrap()));
        let req = request(csr(), join(token.clone()));
        let decision = ca.state.issue(&req, None);
        check(
            "revoked",
            &req,
            decision,
            Method::JoinToken,
            // The token is proven; its identity is what is revoked, and the audit names it.
            Expected::RefusedFor(Code::PermissionDenied, "revoked", VM),
        );
        assert!(
            ca.state.join.lookup(&token).is_ok(),
            "the token is still unused"
        );
        // Lifted: the same token works.
        list.unrevoke(
            &meshid_identity::revocation::Revoked::Id(SpiffeId::parse(VM).unwrap()),
            0,
        );
        list.save(ca.dir.path()).unwrap();
        ca.state
            .authority
            .store(Arc::new(Authority::load(ca.dir.path()).unwrap()));
        let req = request(csr(), join(token));
        let decision = ca.state.issue(&req, None);
        check(
            "lifted",
            &req,
            decision,
            Method::JoinToken,
            Expected::Issued(VM),
        );
    }

    // ---- issue(): what is in the certificate ---------------------------------------------------

    #[test]
    fn join_token_certificate_carries_only_what_the_ca_decides() {
        struct Case {
            name: &'static str,
            params: fn() -> CertificateParams,
            key: &'static SignatureAlgorithm,
            ttl_seconds: u32,
            expected_lifetime: i64,
        }
        let cases = [
            Case {
                name: "plain CSR, no lifetime asked: the default",
                params: CertificateParams::default,
                key: &PKCS_ECDSA_P256_SHA256,
                ttl_seconds: 0,
                expected_lifetime: 600,
            },
            Case {
                name: "CSR asking for another identity, DNS names, a subject and CA:TRUE",
                params: greedy_csr_params,
                key: &PKCS_ECDSA_P256_SHA256,
                ttl_seconds: 60,
                expected_lifetime: 60,
            },
            Case {
                name: "P-384 key, lifetime above the maximum: the maximum",
                params: greedy_csr_params,
                key: &PKCS_ECDSA_P384_SHA384,
                ttl_seconds: 100_000,
                expected_lifetime: 3600,
            },
            Case {
                name: "Ed25519 key, the maximum lifetime",
                params: CertificateParams::default,
                key: &PKCS_ED25519,
                ttl_seconds: 3600,
                expected_lifetime: 3600,
            },
        ];
        let foreign = TestPki::new("foreign");
        for case in cases {
            let name = case.name;
            let ca = TestCa::new();
            let authority = ca.state.authority.load_full();
            // Mid-rotation: the served bundle holds a second root and a newer version than the
            // directory's; the response carries what is served.
            let served = Bundle {
                version: 7,
                roots: vec![ca.root(), foreign.root.clone()],
                pinned: Vec::new(),
                renew_now: false,
                jwt_keys: Vec::new(),
                revoked: Vec::new(),
                served_without_root: vec![0, 6],
            };
            ca.state.bundle.send_replace(Arc::new(served.clone()));
            let token = ca.join_token(VM, Duration::from_secs(600));
            let mut req = request(csr_with(&(case.params)(), case.key), join(token.clone()));
            req.ttl_seconds = case.ttl_seconds;

            let before = OffsetDateTime::now_utc().unix_timestamp();
            let decision = ca.state.issue(&req, None);
            let after = OffsetDateTime::now_utc().unix_timestamp();
            let resp = check(
                name,
                &req,
                decision,
                Method::JoinToken,
                Expected::Issued(VM),
            )
            .unwrap();

            // The chain: leaf + this CA's intermediate, verifying to this CA's root only.
            assert_eq!(resp.cert_chain.len(), 2, "{name}");
            assert_eq!(
                resp.cert_chain[1],
                authority.intermediate_der.to_vec(),
                "{name}"
            );
            verify_chain(&resp.cert_chain, &ca.root())
                .unwrap_or_else(|e| panic!("{name}: chain does not verify: {e:?}"));
            assert!(
                verify_chain(&resp.cert_chain, &foreign.root).is_err(),
                "{name}"
            );

            // The leaf: one URI SAN (the token's identity), nothing from the CSR but its key.
            let (_, leaf) = X509Certificate::from_der(&resp.cert_chain[0]).unwrap();
            let san = leaf.subject_alternative_name().unwrap().unwrap();
            assert_eq!(
                san.value.general_names,
                vec![GeneralName::URI(VM)],
                "{name}: SANs"
            );
            assert!(!leaf.is_ca(), "{name}: CA:TRUE granted");
            let bc = leaf.basic_constraints().unwrap().map(|bc| bc.value.ca);
            assert_ne!(bc, Some(true), "{name}");
            let ku = leaf.key_usage().unwrap().unwrap().value;
            assert!(
                ku.digital_signature() && !ku.key_cert_sign() && !ku.crl_sign(),
                "{name}: key usage {ku:?}"
            );
            let eku = leaf.extended_key_usage().unwrap().unwrap().value;
            assert!(
                eku.server_auth && eku.client_auth && !eku.code_signing,
                "{name}: {eku:?}"
            );
            assert_eq!(
                leaf.subject().iter_attributes().count(),
                0,
                "{name}: subject {}",
                leaf.subject()
            );
            assert_eq!(
                leaf.issuer().as_raw(),
                X509Certificate::from_der(&authority.intermediate_der)
                    .unwrap()
                    .1
                    .subject()
                    .as_raw(),
                "{name}: issuer"
            );

            // The lifetime the policy gives, stated alike in the response and the certificate.
            let not_after = leaf.validity().not_after.timestamp();
            let not_before = leaf.validity().not_before.timestamp();
            assert_eq!(resp.not_after_unix, not_after, "{name}");
            assert_eq!(resp.not_before_unix, not_before, "{name}");
            assert!(
                (before + case.expected_lifetime..=after + case.expected_lifetime)
                    .contains(&not_after),
                "{name}: not_after {not_after}, issued within [{before}, {after}]"
            );
            assert!(
                not_before <= before - 299 && not_before >= before - 301,
                "{name}: not_before {not_before}"
            );

            // The bundle as served.
            let anchors: Vec<Vec<u8>> = served.roots.iter().map(|r| r.to_vec()).collect();
            assert_eq!(resp.trust_anchors, anchors, "{name}");
            assert_eq!(resp.bundle_version, 7, "{name}");

            // The token is spent; the issuance is counted for the signing authority.
            assert_eq!(
                ca.state.join.lookup(&token).unwrap_err().reason,
                Reason::JoinTokenUsed,
                "{name}"
            );
            // A lifetime above the default is counted under its identity (revoking it releases
            // `retire`), the others together.
            let (_, issued) = ca.state.fleet.report(after);
            let view = &issued[&authority.name];
            let long = u64::from(case.ttl_seconds) > LIFETIMES.default.as_secs();
            let (live, latest) = if long {
                view.long[VM]
            } else {
                (view.live, view.latest_not_after)
            };
            assert_eq!(live, 1, "{name}");
            assert_eq!(latest, not_after, "{name}");
            assert_eq!(view.long.is_empty(), !long, "{name}: {view:?}");
        }
    }

    #[test]
    fn renewal_issues_the_same_identity_over_the_new_key() {
        let ca = TestCa::new();
        let token = ca.join_token(VM, Duration::from_secs(600));
        let first = request(csr(), join(token));
        let decision = ca.state.issue(&first, None);
        let issued = check(
            "join",
            &first,
            decision,
            Method::JoinToken,
            Expected::Issued(VM),
        )
        .unwrap();
        // Renew over the connection that presents what was just issued, with a fresh key.
        let chain: Vec<CertificateDer<'static>> = issued
            .cert_chain
            .iter()
            .map(|c| CertificateDer::from(c.clone()))
            .collect();
        let renew = request(csr(), None);
        let decision = ca.state.issue(&renew, Some(&peer(&chain)));
        let renewed = check(
            "renew",
            &renew,
            decision,
            Method::Renewal,
            Expected::Issued(VM),
        )
        .unwrap();
        assert_ne!(renewed.cert_chain[0], issued.cert_chain[0]);
        verify_chain(&renewed.cert_chain, &ca.root()).unwrap();
    }

    // ---- issue_jwt_svid() -----------------------------------------------------------------------

    /// A certificate for `id` issued on a join token, and its chain as a TLS peer presents it.
    fn joined(ca: &TestCa, id: &'static str) -> (IssueResponse, Vec<CertificateDer<'static>>) {
        let first = request(csr(), join(ca.join_token(id, Duration::from_secs(600))));
        let issued = check(
            "join",
            &first,
            ca.state.issue(&first, None),
            Method::JoinToken,
            Expected::Issued(id),
        )
        .unwrap();
        let chain = issued
            .cert_chain
            .iter()
            .map(|c| CertificateDer::from(c.clone()))
            .collect();
        (issued, chain)
    }

    #[test]
    fn a_jwt_svid_speaks_for_the_presented_certificate_only_and_verifies_under_the_bundle() {
        let ca = TestCa::new();
        let (issued, chain) = joined(&ca, VM);
        let req = |aud: &[&str]| IssueJwtSvidRequest {
            audience: aud.iter().map(|a| (*a).to_owned()).collect(),
        };
        let (id, resp) = ca.state.issue_jwt_svid(&req(&["db"]), Some(&peer(&chain)));
        let resp = resp.map_err(|r| r.status).unwrap();
        assert_eq!(id.unwrap().as_str(), VM);
        assert_eq!(resp.spiffe_id, VM);
        // The lifetime is the CA's, and never past the certificate's.
        assert!(resp.expires_at_unix - resp.issued_at_unix <= 300);
        assert!(resp.expires_at_unix <= issued.not_after_unix);
        let keys = &ca.state.bundle.borrow().jwt_keys.clone();
        assert_eq!(keys.len(), 1);
        let td = TrustDomain::new(TD).unwrap();
        let v = meshid_identity::jwt_svid::verify(
            &resp.token,
            "db",
            keys,
            &td,
            OffsetDateTime::now_utc().unix_timestamp(),
        )
        .unwrap();
        assert_eq!(v.id.as_str(), VM);
        // It names the certificate's lineage; a renewed certificate's tokens name the same (the
        // first certificate's serial), so that revoking that serial refuses them all.
        let first_serial = normalized_serial(
            &meshid_identity::cert_identity_from_der(&chain[0])
                .unwrap()
                .serial_hex,
        );
        assert_eq!(v.lineage.as_deref(), Some(first_serial.as_str()));
        let renew = request(csr(), None);
        let renewed = ca.state.issue(&renew, Some(&peer(&chain))).2;
        let renewed = renewed.map_err(|r| r.status).unwrap();
        let renewed: Vec<CertificateDer<'static>> = renewed
            .cert_chain
            .iter()
            .map(|c| CertificateDer::from(c.clone()))
            .collect();
        let renewed_serial = meshid_identity::cert_identity_from_der(&renewed[0])
            .unwrap()
            .serial_hex;
        assert_ne!(normalized_serial(&renewed_serial), first_serial);
        let (_, again) = ca
            .state
            .issue_jwt_svid(&req(&["db"]), Some(&peer(&renewed)));
        let again = again.map_err(|r| r.status).unwrap();
        let now = OffsetDateTime::now_utc().unix_timestamp();
        let v = meshid_identity::jwt_svid::verify(&again.token, "db", keys, &td, now).unwrap();
        assert_eq!(v.lineage.as_deref(), Some(first_serial.as_str()));
        // The bundle message carries the key.
        let bundle = ca.state.bundle.borrow().clone();
        let msg = ca.state.trust_bundle(&bundle, true);
        assert_eq!(msg.jwt_keys.len(), 1);
        assert_eq!(msg.jwt_keys[0].key_id, keys[0].kid);

        // No certificate, no token; bad audiences are refused after authentication.
        let (_, r) = ca.state.issue_jwt_svid(&req(&["db"]), None);
        assert_eq!(r.err().unwrap().status.code(), Code::Unauthenticated);
        let long = "x".repeat(257);
        for bad in [&[][..], &[""][..], &[long.as_str()][..], &["a"; 9][..]] {
            let (_, r) = ca.state.issue_jwt_svid(&req(bad), Some(&peer(&chain)));
            let refusal = r.err().unwrap();
            assert_eq!(refusal.status.code(), Code::InvalidArgument, "{bad:?}");
            assert_eq!(refusal.result, "invalid_audience");
        }
        // A certificate of another trust domain's CA is no credential.
        let foreign = TestPki::new(TD);
        let leaf = foreign.leaf(VM);
        let (_, r) = ca
            .state
            .issue_jwt_svid(&req(&["db"]), Some(&peer(&leaf.chain)));
        assert_eq!(r.err().unwrap().status.code(), Code::Unauthenticated);
    }

    /// JWT-SVIDs are held to the namespace's bucket (`--namespace-rate-limit`) as certificates
    /// are, in a bucket of their own: identities of one namespace, each well within its own limit,
    /// together get no more than the namespace's burst, and another namespace is not affected.
    #[test]
    fn jwt_svids_of_one_namespace_share_its_limit() {
        let slow = |burst| RateLimit {
            per_second: 1.0 / 60.0,
            burst,
        };
        // Each identity: a burst of 25 (each certificate's lineage: 1); the namespace: 3.
        let ca = TestCa::with(Opts {
            rate: Some(slow(25)),
            namespace_rate: Some(slow(3)),
            ..Opts::default()
        });
        let req = IssueJwtSvidRequest {
            audience: vec!["db".into()],
        };
        let ask = |id: &str| ca.state.issue_jwt_svid(&req, Some(&peer(&ca.cert(id)))).1;
        let mut results = Vec::new();
        for sa in ["a", "b", "c", "d", "e"] {
            match ask(&format!("spiffe://{TD}/ns/shop/sa/{sa}")) {
                Ok(_) => results.push("issued"),
                Err(refusal) => {
                    assert_eq!(refusal.status.code(), Code::ResourceExhausted, "shop/{sa}");
                    let message = refusal.status.message();
                    assert!(
                        message.contains("JWT-SVID requests in namespace shop"),
                        "shop/{sa}: {message}"
                    );
                    assert!(refusal.status.metadata().get("retry-after-ms").is_some());
                    results.push(refusal.result);
                }
            }
        }
        assert_eq!(
            results,
            ["issued", "issued", "issued", "rate_limited", "rate_limited"],
            "the namespace's burst of 3, whatever its identities"
        );
        // Certificates do not draw on the JWT-SVIDs' namespace bucket, nor the reverse.
        assert!(ca.state.namespaces.check("shop", Instant::now()).is_ok());
        assert!(
            ask(&format!("spiffe://{TD}/ns/ops/sa/metrics")).is_ok(),
            "ops refused"
        );
    }

    #[test]
    fn an_authority_without_a_jwt_key_refuses_jwt_svids_and_says_why() {
        let ca = TestCa::new();
        let mut authority = Authority::load(ca.dir.path()).unwrap();
        authority.jwt_signer = None;
        ca.state.authority.store(Arc::new(authority));
        let (_, chain) = joined(&ca, VM);
        let req = IssueJwtSvidRequest {
            audience: vec!["db".into()],
        };
        let (_, r) = ca.state.issue_jwt_svid(&req, Some(&peer(&chain)));
        let refusal = r.err().unwrap();
        assert_eq!(refusal.status.code(), Code::FailedPrecondition);
        assert!(refusal.status.message().contains("rotate prepare"));
    }

    // ---- issue(): renewals decided at the time of the call -------------------------------------

    #[test]
    fn renewal_lineage_is_bounded_by_the_attestation_age() {
        /// The attested-at time the new certificate must carry.
        #[derive(Debug, Clone, Copy)]
        enum Attested {
            /// That of the presented certificate (its extension, else its not-before).
            Kept,
            /// The time of this call: a token or join token attested the identity again.
            Now,
        }
        /// When the new certificate ends.
        #[derive(Debug, Clone, Copy)]
        enum Ends {
            /// This many seconds after the call: the lifetime asked for, whole.
            After(i64),
            /// When the attestation age (1 h here) does: its attested-at time + 3,600 s.
            AtTheAge,
        }
        struct Case {
            name: &'static str,
            call: fn(&TestCa) -> Call,
            method: Method,
            expected: Expected,
            attested: Attested,
            ends: Ends,
        }
        use Expected::{Issued, RefusedFor};
        let cases = [
            Case {
                name: "attested 30 min ago: renews, the new certificate keeps that time",
                call: |ca| {
                    (
                        request(csr(), None),
                        Some(peer(&ca.cert_attested(FRONTEND, 1800))),
                    )
                },
                method: Method::Renewal,
                expected: Issued(FRONTEND),
                attested: Attested::Kept,
                ends: Ends::After(600),
            },
            Case {
                name: "attested 50 min ago: renews for the whole 10 min, to the age",
                call: |ca| {
                    (
                        request(csr(), None),
                        Some(peer(&ca.cert_attested(FRONTEND, 3000))),
                    )
                },
                method: Method::Renewal,
                expected: Issued(FRONTEND),
                attested: Attested::Kept,
                ends: Ends::AtTheAge,
            },
            Case {
                name: "attested 53 min ago: renews, cut to the 7 min left before the age",
                call: |ca| {
                    (
                        request(csr(), None),
                        Some(peer(&ca.cert_attested(FRONTEND, 3180))),
                    )
                },
                method: Method::Renewal,
                expected: Issued(FRONTEND),
                attested: Attested::Kept,
                ends: Ends::AtTheAge,
            },
            Case {
                name: "attested 30 min ago, asking for the 1 h maximum: cut to the 30 min left",
                call: |ca| {
                    let req = IssueRequest {
                        ttl_seconds: 3600,
                        app_svid: false,
                        ..request(csr(), None)
                    };
                    (req, Some(peer(&ca.cert_attested(FRONTEND, 1800))))
                },
                method: Method::Renewal,
                expected: Issued(FRONTEND),
                attested: Attested::Kept,
                ends: Ends::AtTheAge,
            },
            Case {
                name: "attested 56 min ago: refused, 4 min left is under half the 10 min lifetime",
                call: |ca| {
                    (
                        request(csr(), None),
                        Some(peer(&ca.cert_attested(FRONTEND, 3360))),
                    )
                },
                method: Method::Renewal,
                // The certificate holds: the refusal names whose renewal it was.
                expected: RefusedFor(Code::Unauthenticated, "attestation_expired", FRONTEND),
                attested: Attested::Kept,
                ends: Ends::AtTheAge,
            },
            Case {
                name: "attested 61 min ago: refused, though the certificate is valid",
                call: |ca| {
                    (
                        request(csr(), None),
                        Some(peer(&ca.cert_attested(FRONTEND, 3660))),
                    )
                },
                method: Method::Renewal,
                expected: RefusedFor(Code::Unauthenticated, "attestation_expired", FRONTEND),
                attested: Attested::Kept,
                ends: Ends::After(600),
            },
            Case {
                name: "a join-token identity attested a day ago: refused",
                call: |ca| {
                    (
                        request(csr(), None),
                        Some(peer(&ca.cert_attested(VM, 86_400))),
                    )
                },
                method: Method::Renewal,
                expected: RefusedFor(Code::Unauthenticated, "attestation_expired", VM),
                attested: Attested::Kept,
                ends: Ends::After(600),
            },
            Case {
                name: "no extension, valid since 30 min ago: attested at its not-before",
                call: |ca| {
                    (
                        request(csr(), None),
                        Some(peer(&ca.cert_unattested(FRONTEND, 1800))),
                    )
                },
                method: Method::Renewal,
                expected: Issued(FRONTEND),
                attested: Attested::Kept,
                ends: Ends::After(600),
            },
            Case {
                name: "no extension, valid since 2 h ago: refused",
                call: |ca| {
                    (
                        request(csr(), None),
                        Some(peer(&ca.cert_unattested(FRONTEND, 7200))),
                    )
                },
                method: Method::Renewal,
                expected: RefusedFor(Code::Unauthenticated, "attestation_expired", FRONTEND),
                attested: Attested::Kept,
                ends: Ends::After(600),
            },
            Case {
                name: "a service-account token resets the lineage (over a connection past the age)",
                call: |ca| {
                    let token = ca.sa.token("shop", "frontend");
                    let old = peer(&ca.cert_attested(FRONTEND, 86_400));
                    (request(csr(), service_account(token)), Some(old))
                },
                method: Method::ServiceAccountToken,
                expected: Issued(FRONTEND),
                attested: Attested::Now,
                ends: Ends::After(600),
            },
            Case {
                name: "a join token resets the lineage",
                call: |ca| {
                    let token = ca.join_token(VM, Duration::from_secs(600));
                    let old = peer(&ca.cert_attested(VM, 86_400));
                    (request(csr(), join(token)), Some(old))
                },
                method: Method::JoinToken,
                expected: Issued(VM),
                attested: Attested::Now,
                ends: Ends::After(600),
            },
            Case {
                name: "renewing what a token issued keeps the token's time",
                call: |ca| {
                    let token = ca.sa.token("shop", "frontend");
                    let first = request(csr(), service_account(token));
                    let (_, _, issued) = ca.state.issue(&first, None);
                    let chain: Vec<CertificateDer<'static>> = issued
                        .unwrap_or_else(|r| panic!("token issuance: {:?}", r.status))
                        .cert_chain
                        .into_iter()
                        .map(CertificateDer::from)
                        .collect();
                    (request(csr(), None), Some(peer(&chain)))
                },
                method: Method::Renewal,
                expected: Issued(FRONTEND),
                attested: Attested::Kept,
                ends: Ends::After(600),
            },
        ];
        for case in cases {
            let name = case.name;
            let ca = TestCa::with(Opts {
                service_accounts: true,
                max_attestation_age: Some(Duration::from_secs(3600)),
                ..Opts::default()
            });
            let (req, peer) = (case.call)(&ca);
            let before = OffsetDateTime::now_utc().unix_timestamp();
            let decision = ca.state.issue(&req, peer.as_ref());
            let after = OffsetDateTime::now_utc().unix_timestamp();
            if let Err(refusal) = &decision.2
                && refusal.result == "attestation_expired"
            {
                let message = refusal.status.message();
                assert!(
                    message.contains("service-account token") && message.contains("join token"),
                    "{name}: the refusal names the way out: {message}"
                );
            }
            let Some(resp) = check(name, &req, decision, case.method, case.expected) else {
                continue;
            };
            let issued = meshid_identity::cert_identity_from_der(&resp.cert_chain[0]).unwrap();
            let got = issued
                .attested_at
                .unwrap_or_else(|| panic!("{name}: no attested time"));
            let at_the_age = got + 3600;
            match case.ends {
                Ends::AtTheAge => assert_eq!(issued.not_after, at_the_age, "{name}"),
                Ends::After(secs) => {
                    assert!(
                        (before + secs..=after + secs).contains(&issued.not_after),
                        "{name}: ends at {}, not {secs} s after the call",
                        issued.not_after
                    );
                    assert!(issued.not_after <= at_the_age, "{name}: past the age");
                }
            }
            match case.attested {
                Attested::Kept => {
                    let presented = peer.as_ref().and_then(|p| p.leaf_identity.as_deref());
                    let presented = presented.unwrap().as_ref().unwrap();
                    let want = presented.attested_at.unwrap_or(presented.not_before);
                    assert_eq!(got, want, "{name}");
                }
                Attested::Now => {
                    assert!(
                        (before..=after).contains(&got),
                        "{name}: {got} not in [{before}, {after}]"
                    );
                }
            }
        }
    }

    #[test]
    fn a_lineages_first_certificate_is_bounded_by_the_attestation_age() {
        // `--max-attestation-age 30m` under a 1 h `--max-ttl`: a token or join token attests the
        // identity now, and its certificate ends no later than the age does, as a renewal's.
        const AGE: i64 = 1800;
        struct Case {
            name: &'static str,
            credential: fn(&TestCa) -> Option<Credential>,
            ttl_seconds: u32,
            method: Method,
            id: &'static str,
            /// Seconds from the call to the certificate's end.
            lives: i64,
        }
        let cases = [
            Case {
                name: "service-account token asking for the 1 h maximum: cut to the age",
                credential: |ca| service_account(ca.sa.token("shop", "frontend")),
                ttl_seconds: 3600,
                method: Method::ServiceAccountToken,
                id: FRONTEND,
                lives: AGE,
            },
            Case {
                name: "join token asking for the 1 h maximum: cut to the age",
                credential: |ca| join(ca.join_token(VM, Duration::from_secs(600))),
                ttl_seconds: 3600,
                method: Method::JoinToken,
                id: VM,
                lives: AGE,
            },
            Case {
                name: "service-account token asking for less than the age: what it asked for",
                credential: |ca| service_account(ca.sa.token("shop", "frontend")),
                ttl_seconds: 900,
                method: Method::ServiceAccountToken,
                id: FRONTEND,
                lives: 900,
            },
            Case {
                name: "join token with the default 10 min lifetime: unchanged",
                credential: |ca| join(ca.join_token(VM, Duration::from_secs(600))),
                ttl_seconds: 0,
                method: Method::JoinToken,
                id: VM,
                lives: 600,
            },
        ];
        for case in cases {
            let name = case.name;
            let ca = TestCa::with(Opts {
                service_accounts: true,
                max_attestation_age: Some(Duration::from_secs(AGE.unsigned_abs())),
                ..Opts::default()
            });
            let req = IssueRequest {
                ttl_seconds: case.ttl_seconds,
                app_svid: false,
                ..request(csr(), (case.credential)(&ca))
            };
            let before = OffsetDateTime::now_utc().unix_timestamp();
            let decision = ca.state.issue(&req, None);
            let after = OffsetDateTime::now_utc().unix_timestamp();
            let resp = check(name, &req, decision, case.method, Expected::Issued(case.id))
                .unwrap_or_else(|| panic!("{name}: not issued"));
            let issued = meshid_identity::cert_identity_from_der(&resp.cert_chain[0]).unwrap();
            let attested = issued.attested_at.unwrap_or_else(|| panic!("{name}"));
            assert!(
                (before..=after).contains(&attested),
                "{name}: attested at {attested}"
            );
            assert!(
                (before + case.lives..=after + case.lives).contains(&issued.not_after),
                "{name}: ends {} s after the call, not {} s",
                issued.not_after - before,
                case.lives
            );
            assert!(issued.not_after <= attested + AGE, "{name}: past the age");
            assert_eq!(resp.not_after_unix, issued.not_after, "{name}");
        }
    }

    #[tokio::test]
    async fn renewal_is_checked_against_the_roots_trusted_at_the_call() {
        use crate::rotation;
        let ca = TestCa::new();
        let dir = ca.dir.path().to_owned();
        // What `server::follow_bundle` does when the CA directory changes.
        let reload = || {
            let authority = Authority::load(&dir).unwrap();
            ca.state.authority.store(Arc::new(authority));
        };
        // One connection set up under the first root and kept alive throughout: what the TLS
        // handshake attached to it (the chain, the identity) never changes.
        let kept_alive = peer(&ca.cert(FRONTEND));
        let renew = |peer: &PeerInfo| {
            let req = request(csr(), None);
            let decision = ca.state.issue(&req, Some(peer));
            (req, decision)
        };

        let (req, decision) = renew(&kept_alive);
        check(
            "under its root",
            &req,
            decision,
            Method::Renewal,
            Expected::Issued(FRONTEND),
        );

        // Mid-rotation the old root is still in the bundle: the old certificate renews, and the new
        // certificate comes from the new authority.
        rotation::prepare(&dir, None).unwrap();
        let new_authority = rotation::activate(&dir, &[], true).await.unwrap();
        reload();
        let (req, decision) = renew(&kept_alive);
        let resp = check(
            "mid-rotation",
            &req,
            decision,
            Method::Renewal,
            Expected::Issued(FRONTEND),
        )
        .unwrap();
        let new_chain: Vec<CertificateDer<'static>> = resp
            .cert_chain
            .into_iter()
            .map(CertificateDer::from)
            .collect();
        let authorities = ca.state.authority.load().authority_anchors.clone();
        let now = OffsetDateTime::now_utc().unix_timestamp();
        assert_eq!(
            crate::rotation::fleet::authority_of(&new_chain, &authorities, now),
            Some(new_authority)
        );

        // The old root leaves the bundle (`retire --force`): the same connection is refused.
        rotation::retire(&dir, &[], true).await.unwrap();
        reload();
        assert_eq!(ca.state.authority.load().roots.len(), 1);
        let (req, decision) = renew(&kept_alive);
        if let Err(refusal) = &decision.2 {
            let message = refusal.status.message();
            assert!(message.contains("service-account token"), "{message}");
        }
        check(
            "its root left the bundle",
            &req,
            decision,
            Method::Renewal,
            Expected::Refused(Code::Unauthenticated, "untrusted_chain"),
        );

        // The certificate of the new authority renews.
        let (req, decision) = renew(&peer(&new_chain));
        check(
            "a certificate under the new root",
            &req,
            decision,
            Method::Renewal,
            Expected::Issued(FRONTEND),
        );
    }

    // ---- issue(): service-account tokens ------------------------------------------------------

    #[test]
    fn service_account_decisions_with_a_namespace_allow_list() {
        struct Case {
            name: &'static str,
            call: fn(&TestCa) -> Call,
            method: Method,
            expected: Expected,
        }
        use Expected::{Issued, Refused};
        let sa = Method::ServiceAccountToken;
        let cases = [
            Case {
                name: "valid token of an allowed namespace",
                call: |ca| {
                    (
                        request(csr(), service_account(ca.sa.token("shop", "frontend"))),
                        None,
                    )
                },
                method: sa,
                expected: Issued(FRONTEND),
            },
            Case {
                name: "valid token of a namespace not on the allow-list",
                call: |ca| {
                    let token = ca.sa.token("kube-system", "default");
                    (request(csr(), service_account(token)), None)
                },
                method: sa,
                expected: Refused(Code::PermissionDenied, "namespace_not_allowed"),
            },
            Case {
                name: "token signed by another key under the same kid",
                call: |_| {
                    let impostor = ServiceAccountIssuer::new("sa-key-1");
                    let token = impostor.token("shop", "frontend");
                    (request(csr(), service_account(token)), None)
                },
                method: sa,
                expected: Refused(Code::Unauthenticated, "bad_signature"),
            },
            Case {
                name: "token signed by a key not in the JWKS",
                call: |_| {
                    let stranger = ServiceAccountIssuer::new("sa-key-2");
                    let token = stranger.token("shop", "frontend");
                    (request(csr(), service_account(token)), None)
                },
                method: sa,
                expected: Refused(Code::Unauthenticated, "unknown_key"),
            },
            Case {
                name: "token for another audience",
                call: |ca| {
                    let mut claims = ServiceAccountIssuer::claims("shop", "frontend");
                    claims["aud"] = json!(["https://kubernetes.default.svc"]);
                    (request(csr(), service_account(ca.sa.sign(&claims))), None)
                },
                method: sa,
                expected: Refused(Code::Unauthenticated, "wrong_audience"),
            },
            Case {
                name: "token from another issuer",
                call: |ca| {
                    let mut claims = ServiceAccountIssuer::claims("shop", "frontend");
                    claims["iss"] = json!("https://evil.example");
                    (request(csr(), service_account(ca.sa.sign(&claims))), None)
                },
                method: sa,
                expected: Refused(Code::Unauthenticated, "wrong_issuer"),
            },
            Case {
                name: "expired token",
                call: |ca| {
                    let mut claims = ServiceAccountIssuer::claims("shop", "frontend");
                    let now = OffsetDateTime::now_utc().unix_timestamp();
                    claims["iat"] = json!(now - 7200);
                    claims["nbf"] = json!(now - 7200);
                    claims["exp"] = json!(now - 3600);
                    (request(csr(), service_account(ca.sa.sign(&claims))), None)
                },
                method: sa,
                expected: Refused(Code::Unauthenticated, "token_expired"),
            },
            Case {
                name: "token whose sub disagrees with its kubernetes.io claims",
                call: |ca| {
                    let mut claims = ServiceAccountIssuer::claims("shop", "frontend");
                    claims["kubernetes.io"]["namespace"] = json!("kube-system");
                    (request(csr(), service_account(ca.sa.sign(&claims))), None)
                },
                method: sa,
                expected: Refused(Code::Unauthenticated, "malformed_subject"),
            },
            Case {
                name: "not a JWT",
                call: |_| (request(csr(), service_account("hello")), None),
                method: sa,
                expected: Refused(Code::Unauthenticated, "malformed_token"),
            },
            Case {
                // A junk token is refused before the CSR's signature is checked (RSA up to 8,192
                // bits): it must cost the CA no more than a call that presents nothing.
                name: "not a JWT, with a CSR whose signature is broken",
                call: |_| {
                    let mut broken = csr();
                    let last = broken.len() - 1;
                    broken[last] ^= 1;
                    (request(broken, service_account("hello")), None)
                },
                method: sa,
                expected: Refused(Code::Unauthenticated, "malformed_token"),
            },
            Case {
                name: "valid token, empty CSR",
                call: |ca| {
                    let token = ca.sa.token("shop", "frontend");
                    (request(Vec::new(), service_account(token)), None)
                },
                method: sa,
                expected: Refused(Code::InvalidArgument, "invalid_csr"),
            },
            Case {
                name: "renewal of an allowed namespace",
                call: |ca| (request(csr(), None), Some(peer(&ca.cert(FRONTEND)))),
                method: Method::Renewal,
                expected: Issued(FRONTEND),
            },
            Case {
                name: "renewal of a namespace not on the allow-list",
                call: |ca| {
                    let cert = ca.cert("spiffe://cluster.local/ns/kube-system/sa/default");
                    (request(csr(), None), Some(peer(&cert)))
                },
                method: Method::Renewal,
                expected: Expected::RefusedFor(
                    Code::PermissionDenied,
                    "namespace_not_allowed",
                    "spiffe://cluster.local/ns/kube-system/sa/default",
                ),
            },
            Case {
                name: "renewal of an identity outside ns/<ns>/sa/<sa>: not subject to the list",
                call: |ca| (request(csr(), None), Some(peer(&ca.cert(VM)))),
                method: Method::Renewal,
                expected: Issued(VM),
            },
            Case {
                // As implemented: the allow-list is not applied to join tokens (an operator minted
                // the token), although the renewal of the same identity is refused (case above).
                name: "join token for a namespace not on the allow-list",
                call: |ca| {
                    let id = "spiffe://cluster.local/ns/kube-system/sa/default";
                    let token = ca.join_token(id, Duration::from_secs(600));
                    (request(csr(), join(token)), None)
                },
                method: Method::JoinToken,
                expected: Issued("spiffe://cluster.local/ns/kube-system/sa/default"),
            },
        ];
        for case in cases {
            let ca = TestCa::with(Opts {
                service_accounts: true,
                allowed_namespaces: Some(&["shop"]),
                ..Opts::default()
            });
            let (req, peer) = (case.call)(&ca);
            let decision = ca.state.issue(&req, peer.as_ref());
            check(case.name, &req, decision, case.method, case.expected);
        }
    }

    // ---- issue(): rate limit -------------------------------------------------------------------

    #[test]
    fn rate_limit_is_per_identity_and_spares_join_tokens() {
        #[derive(Clone, Copy)]
        enum Via {
            Renewal,
            JoinToken,
        }
        struct Case {
            name: &'static str,
            id: &'static str,
            via: Via,
            expected: Expected,
        }
        use Expected::{Issued, Refused};
        // Steps against one CA, in order: a burst of 2, then one token a minute.
        let cases = [
            Case {
                name: "frontend, first",
                id: FRONTEND,
                via: Via::Renewal,
                expected: Issued(FRONTEND),
            },
            Case {
                name: "frontend, second (the burst)",
                id: FRONTEND,
                via: Via::Renewal,
                expected: Issued(FRONTEND),
            },
            Case {
                name: "frontend, third: over the limit",
                id: FRONTEND,
                via: Via::Renewal,
                expected: Refused(Code::ResourceExhausted, "rate_limited"),
            },
            Case {
                name: "backend is not affected",
                id: BACKEND,
                via: Via::Renewal,
                expected: Issued(BACKEND),
            },
            Case {
                name: "frontend by join token: limited too, the token is kept",
                id: FRONTEND,
                via: Via::JoinToken,
                expected: Refused(Code::ResourceExhausted, "rate_limited"),
            },
        ];
        let ca = TestCa::with(Opts {
            rate: Some(RateLimit {
                per_second: 1.0 / 60.0,
                burst: 2,
            }),
            ..Opts::default()
        });
        for case in cases {
            let name = case.name;
            let (req, peer, token) = match case.via {
                Via::Renewal => (request(csr(), None), Some(peer(&ca.cert(case.id))), None),
                Via::JoinToken => {
                    let token = ca.join_token(case.id, Duration::from_secs(600));
                    (request(csr(), join(token.clone())), None, Some(token))
                }
            };
            let method = match case.via {
                Via::Renewal => Method::Renewal,
                Via::JoinToken => Method::JoinToken,
            };
            let (m, id, result) = ca.state.issue(&req, peer.as_ref());
            if let (Expected::Refused(..), Err(refusal)) = (case.expected, &result) {
                // Rate-limited after authentication: the identity is known and labelled.
                assert_eq!(id.as_ref().map(SpiffeId::as_str), Some(case.id), "{name}");
                assert!(refusal.status.message().contains(case.id), "{name}");
                let retry: u64 = refusal
                    .status
                    .metadata()
                    .get("retry-after-ms")
                    .unwrap_or_else(|| panic!("{name}: no retry-after-ms"))
                    .to_str()
                    .unwrap()
                    .parse()
                    .unwrap();
                // One token a minute, the bucket empty: renewals wait on their share of it (three
                // quarters of a token a minute: 80 s); a join token until the identity's bucket
                // is a token ahead of what renewals may take, which refills too (120 s).
                let full = match case.via {
                    Via::Renewal => 80_000,
                    Via::JoinToken => 120_000,
                };
                assert!((full - 5_000..=full).contains(&retry), "{name}: {retry}");
                if let Some(token) = &token {
                    assert!(ca.state.join.lookup(token).is_ok(), "{name}: token spent");
                }
            }
            check(name, &req, (m, id, result), method, case.expected);
        }
    }

    #[test]
    fn token_issuances_in_a_loop_leave_renewals_their_share() {
        // A burst of 4, then one a minute: renewals' share is 3 of it.
        let ca = TestCa::with(Opts {
            rate: Some(RateLimit {
                per_second: 1.0 / 60.0,
                burst: 4,
            }),
            service_accounts: true,
            ..Opts::default()
        });
        let result = |r: Result<IssueResponse, Refusal>| match r {
            Ok(_) => "issued",
            Err(refusal) => {
                if refusal.result == "rate_limited" {
                    let retry = refusal.status.metadata().get("retry-after-ms");
                    assert!(retry.is_some(), "no retry-after-ms");
                }
                refusal.result
            }
        };
        // One pod asks again and again with its token, each call a new lineage; a join token of
        // the identity comes in between.
        let mut fresh: Vec<&str> = (0..5)
            .map(|_| {
                let req = request(csr(), service_account(ca.sa.token("shop", "frontend")));
                result(ca.state.issue(&req, None).2)
            })
            .collect();
        let token = ca.join_token(FRONTEND, Duration::from_secs(600));
        let req = request(csr(), join(token.clone()));
        fresh.push(result(ca.state.issue(&req, None).2));
        assert!(ca.state.join.lookup(&token).is_ok(), "join token spent");
        // The identity's other replicas still renew, each on its own certificate, up to their
        // share; past it they are refused as before.
        for replica in 0..3 {
            let req = request(csr(), None);
            let decision = ca.state.issue(&req, Some(&peer(&ca.cert(FRONTEND))));
            let name = format!("replica {replica}'s renewal");
            check(
                &name,
                &req,
                decision,
                Method::Renewal,
                Expected::Issued(FRONTEND),
            );
        }
        let req = request(csr(), None);
        let decision = ca.state.issue(&req, Some(&peer(&ca.cert(FRONTEND))));
        assert_eq!(
            result(decision.2),
            "rate_limited",
            "past the renewals' share"
        );
        assert_eq!(
            fresh,
            [
                "issued",
                "rate_limited",
                "rate_limited",
                "rate_limited",
                "rate_limited",
                "rate_limited"
            ],
            "token issuances get what renewals leave: one of the burst"
        );
    }

    #[test]
    fn the_identities_of_one_namespace_share_its_limit() {
        // Each identity: a burst of 8, then one a minute, of which token issuances get the 2
        // its renewals leave; its namespace: a burst of 8.
        let slow = |burst| RateLimit {
            per_second: 1.0 / 60.0,
            burst,
        };
        let ca = TestCa::with(Opts {
            rate: Some(slow(8)),
            namespace_rate: Some(slow(8)),
            service_accounts: true,
            ..Opts::default()
        });
        let issue = |ns: &str, sa: &str| {
            let req = request(csr(), service_account(ca.sa.token(ns, sa)));
            ca.state.issue(&req, None).2
        };
        let namespace_refusal = |name: &str, result: Result<_, Refusal>| {
            let Err(refusal) = result else {
                panic!("{name}: issued past the namespace's limit")
            };
            assert_eq!(refusal.result, "rate_limited", "{name}");
            assert_eq!(refusal.status.code(), Code::ResourceExhausted, "{name}");
            let message = refusal.status.message();
            assert!(message.contains("namespace shop"), "{name}: {message}");
            assert!(
                refusal.status.metadata().get("retry-after-ms").is_some(),
                "{name}: no retry-after-ms"
            );
        };
        // Six service accounts of one namespace, each at its full burst: 12 asked, 8 issued.
        let mut issued = 0;
        for sa in ["a", "b", "c", "d", "e", "f"] {
            for n in 0..2 {
                let result = issue("shop", sa);
                if result.is_ok() {
                    issued += 1;
                } else {
                    namespace_refusal(&format!("shop/{sa} #{n}"), result);
                }
            }
        }
        assert_eq!(
            issued, 8,
            "the namespace's burst of 8, whatever its identities"
        );
        // A new service account of that namespace gets nothing either...
        namespace_refusal("shop/g", issue("shop", "g"));
        // ...while another namespace is not affected.
        assert!(issue("ops", "metrics").is_ok(), "ops/metrics refused");
    }

    // ---- ack() ---------------------------------------------------------------------------------

    #[test]
    fn ack_decisions() {
        /// What the fleet then records for the instance.
        #[derive(Debug)]
        struct Recorded {
            identity: &'static str,
            acked_version: u64,
            authority: Option<&'static str>,
            file_mode: bool,
        }
        struct Case {
            name: &'static str,
            call: fn(&TestCa) -> (AckTrustBundleRequest, Option<PeerInfo>),
            /// Whether the presented certificate's bundle stream is open first (in the mode the
            /// acknowledgement claims).
            stream: bool,
            expected: Result<Recorded, Code>,
        }
        fn ack(instance: &str, chain: &[CertificateDer<'_>]) -> AckTrustBundleRequest {
            AckTrustBundleRequest {
                instance_id: instance.into(),
                bundle_version: 3,
                serving_chain: chain.iter().map(|c| c.to_vec()).collect(),
                file_mode: false,
                held_version: 0,
            }
        }
        /// Reports the chain it presented.
        fn honest(ca: &TestCa, instance: &str) -> (AckTrustBundleRequest, Option<PeerInfo>) {
            let chain = ca.cert(FRONTEND);
            (ack(instance, &chain), Some(peer(&chain)))
        }
        let cases = [
            Case {
                name: "the presented chain",
                call: |ca| honest(ca, "pod-1"),
                stream: true,
                expected: Ok(Recorded {
                    identity: FRONTEND,
                    acked_version: 3,
                    authority: Some("1"),
                    file_mode: false,
                }),
            },
            Case {
                name: "file mode: the bundle version means nothing",
                call: |ca| {
                    let (mut req, peer) = honest(ca, "vm-1");
                    req.file_mode = true;
                    (req, peer)
                },
                stream: true,
                expected: Ok(Recorded {
                    identity: FRONTEND,
                    acked_version: 0,
                    authority: Some("1"),
                    file_mode: true,
                }),
            },
            Case {
                name: "a 128-byte instance id",
                call: |ca| honest(ca, &"i".repeat(128)),
                stream: true,
                expected: Ok(Recorded {
                    identity: FRONTEND,
                    acked_version: 3,
                    authority: Some("1"),
                    file_mode: false,
                }),
            },
            Case {
                name: "the leaf alone: the authority is the handshake chain's",
                call: |ca| {
                    let chain = ca.cert(FRONTEND);
                    (ack("pod-1", &chain[..1]), Some(peer(&chain)))
                },
                stream: true,
                expected: Ok(Recorded {
                    identity: FRONTEND,
                    acked_version: 3,
                    authority: Some("1"),
                    file_mode: false,
                }),
            },
            Case {
                // The handshake lets no such chain in; on the call, it is refused as a renewal is.
                name: "a chain of a PKI this CA does not hold",
                call: |_| {
                    let leaf = TestPki::new("other").leaf(FRONTEND);
                    (ack("pod-1", &leaf.chain), Some(peer(&leaf.chain)))
                },
                stream: true,
                expected: Err(Code::Unauthenticated),
            },
            Case {
                name: "empty instance id (informational only)",
                call: |ca| honest(ca, ""),
                stream: true,
                expected: Ok(Recorded {
                    identity: FRONTEND,
                    acked_version: 3,
                    authority: Some("1"),
                    file_mode: false,
                }),
            },
            Case {
                name: "no bundle stream of this certificate (an invented instance)",
                call: |ca| honest(ca, "pod-1"),
                stream: false,
                expected: Err(Code::FailedPrecondition),
            },
            Case {
                name: "a version this CA never published",
                call: |ca| {
                    let (mut req, peer) = honest(ca, "pod-1");
                    req.bundle_version = 4;
                    (req, peer)
                },
                stream: true,
                expected: Err(Code::InvalidArgument),
            },
            Case {
                name: "129-byte instance id",
                call: |ca| honest(ca, &"i".repeat(129)),
                stream: true,
                expected: Err(Code::InvalidArgument),
            },
            Case {
                name: "129-byte instance id and no client certificate: the request is checked first",
                call: |ca| (ack(&"i".repeat(129), &ca.cert(FRONTEND)), None),
                stream: true,
                expected: Err(Code::InvalidArgument),
            },
            Case {
                name: "empty serving chain",
                call: |ca| (ack("pod-1", &[]), Some(peer(&ca.cert(FRONTEND)))),
                stream: true,
                expected: Err(Code::InvalidArgument),
            },
            Case {
                name: "five certificates",
                call: |ca| {
                    let mut chain = ca.cert(FRONTEND);
                    let inter = chain[1].clone();
                    chain.extend([inter.clone(), inter.clone(), inter]);
                    (ack("pod-1", &chain), Some(peer(&chain[..2])))
                },
                stream: true,
                expected: Err(Code::InvalidArgument),
            },
            Case {
                name: "no client certificate",
                call: |ca| (ack("pod-1", &ca.cert(FRONTEND)), None),
                stream: true,
                expected: Err(Code::Unauthenticated),
            },
            Case {
                name: "TLS connection without a client certificate",
                call: |ca| (ack("pod-1", &ca.cert(FRONTEND)), Some(anonymous_peer())),
                stream: true,
                expected: Err(Code::Unauthenticated),
            },
            Case {
                name: "reported leaf is not the TLS client certificate",
                call: |ca| {
                    let presented = ca.cert(BACKEND);
                    (ack("pod-1", &ca.cert(FRONTEND)), Some(peer(&presented)))
                },
                stream: true,
                expected: Err(Code::PermissionDenied),
            },
            Case {
                name: "reported chain starts with the intermediate",
                call: |ca| {
                    let chain = ca.cert(FRONTEND);
                    let reversed: Vec<_> = chain.iter().rev().cloned().collect();
                    (ack("pod-1", &reversed), Some(peer(&chain)))
                },
                stream: true,
                expected: Err(Code::PermissionDenied),
            },
            Case {
                // Not a workload identity: no credential, as for a renewal.
                name: "presented certificate carries no SPIFFE identity",
                call: |_| {
                    let shape = LeafShape {
                        is_ca: true,
                        ..LeafShape::default()
                    };
                    let leaf = TestPki::new("other").leaf_shaped(FRONTEND, &shape);
                    (ack("pod-1", &leaf.chain), Some(peer(&leaf.chain)))
                },
                stream: true,
                expected: Err(Code::Unauthenticated),
            },
        ];
        for case in cases {
            let name = case.name;
            let ca = TestCa::new();
            // Version 3 is the one published.
            let mut published = (**ca.state.bundle.borrow()).clone();
            published.version = 3;
            ca.state.bundle.send_replace(Arc::new(published));
            let (req, peer) = (case.call)(&ca);
            let leaf = peer
                .as_ref()
                .and_then(|p| p.certificates.as_ref())
                .and_then(|c| c.first());
            let registered = case.stream
                && leaf.is_some_and(|leaf| {
                    let Ok(info) = meshid_identity::cert_identity_from_der(leaf) else {
                        return false;
                    };
                    let caller = crate::rotation::fleet::Caller {
                        key: instance_key(leaf).unwrap(),
                        identity: info.id.to_string(),
                        file_mode: req.file_mode,
                        not_after: info.not_after,
                        serial: normalized_serial(&info.serial_hex),
                        lineage: normalized_serial(info.lineage_serial()),
                        authority: None,
                    };
                    ca.state
                        .fleet
                        .stream_opened(&caller, OffsetDateTime::now_utc().unix_timestamp())
                        .is_ok()
                });
            let result = ca.state.ack(&req, peer.as_ref());
            let now = OffsetDateTime::now_utc().unix_timestamp();
            let (sidecars, _) = ca.state.fleet.report(now);
            match (case.expected, result) {
                (Ok(want), Ok(())) => {
                    assert_eq!(sidecars.len(), 1, "{name}");
                    let s = &sidecars[0];
                    assert_eq!(s.instance.len(), 16, "{name}: a key label, not the sent id");
                    let got = (
                        s.identity.as_str(),
                        s.acked_version,
                        s.serving_authority.as_deref(),
                        s.file_mode,
                    );
                    let want = (
                        want.identity,
                        want.acked_version,
                        want.authority,
                        want.file_mode,
                    );
                    assert_eq!(got, want, "{name}");
                    let leaf = meshid_identity::cert_identity_from_der(&req.serving_chain[0]);
                    assert_eq!(s.serving_not_after, leaf.unwrap().not_after, "{name}");
                    assert!(s.connected, "{name}");
                }
                (Err(code), Err(status)) => {
                    assert_eq!(status.code(), code, "{name}: {status:?}");
                    assert!(
                        sidecars
                            .iter()
                            .all(|s| s.acked_version == 0 && s.serving_authority.is_none()),
                        "{name}: refused ack recorded"
                    );
                    assert!(registered || sidecars.is_empty(), "{name}");
                }
                (want, got) => panic!("{name}: expected {want:?}, got {got:?}"),
            }
        }
    }

    // ---- bundle streams and acknowledgements on a certificate that no longer holds ------------

    /// Opens a bundle stream as a call on `peer`'s connection does.
    async fn watch(service: &CaService, peer: Option<PeerInfo>) -> Result<BundleStream, Status> {
        let mut request = Request::new(WatchTrustBundleRequest {
            instance_id: "pod-1".into(),
            file_mode: false,
        });
        if let Some(peer) = peer {
            request.extensions_mut().insert(peer);
        }
        CertificateAuthority::watch_trust_bundle(service, request)
            .await
            .map(Response::into_inner)
    }

    /// The instance a bundle stream opened on `chain` registers.
    fn caller_of(chain: &[CertificateDer<'_>]) -> crate::rotation::fleet::Caller {
        let info = meshid_identity::cert_identity_from_der(&chain[0]).unwrap();
        crate::rotation::fleet::Caller {
            key: instance_key(&chain[0]).unwrap(),
            identity: info.id.to_string(),
            file_mode: false,
            not_after: info.not_after,
            serial: normalized_serial(&info.serial_hex),
            lineage: normalized_serial(info.lineage_serial()),
            authority: None,
        }
    }

    /// Revokes `what` in `dir`'s list and reloads the authority, as `server::follow_bundle` does
    /// when the CA directory changes.
    fn store_revocations(dir: &std::path::Path, state: &CaState, what: Revoked) {
        let mut list = crate::revocations::Revocations::default();
        let now = OffsetDateTime::now_utc().unix_timestamp();
        list.revoke(what, now, 3600, "key leaked".into()).unwrap();
        list.save(dir).unwrap();
        state
            .authority
            .store(Arc::new(Authority::load(dir).unwrap()));
    }

    /// The service of `ca` once its bundle carries a revocation with a reason (BACKEND's identity),
    /// with what must live as long as it does.
    fn serving_a_revocation_reason(
        ca: TestCa,
    ) -> (CaService, tempfile::TempDir, watch::Sender<bool>) {
        let TestCa {
            dir,
            state,
            _shutdown: running,
            ..
        } = ca;
        store_revocations(
            dir.path(),
            &state,
            Revoked::Id(SpiffeId::parse(BACKEND).unwrap()),
        );
        let version = state.bundle.borrow().version + 1;
        let _ = state
            .bundle
            .send_replace(Arc::new(Bundle::of(&state.authority.load(), version)));
        (CaService::new(Arc::new(state)), dir, running)
    }

    /// A stream opened before its own identity was revoked keeps receiving the bundle (it carries
    /// the revocation the sidecar itself must apply), but not the operator's reasons: the holder
    /// of a revoked key is no longer a member to tell. Other members still get them.
    #[tokio::test]
    async fn a_revoked_holders_open_stream_gets_no_reasons() {
        use tokio_stream::StreamExt;
        let ca = TestCa::new();
        let backend = ca.cert(BACKEND);
        let frontend = ca.cert(FRONTEND);
        let TestCa {
            dir,
            state,
            _shutdown: _running,
            ..
        } = ca;
        let service = CaService::new(Arc::new(state));
        let mut revoked = watch(&service, Some(peer(&backend))).await.unwrap();
        let mut member = watch(&service, Some(peer(&frontend))).await.unwrap();
        for s in [&mut revoked, &mut member] {
            s.next().await.unwrap().unwrap();
        }
        let state = &service.state;
        store_revocations(
            dir.path(),
            state,
            Revoked::Id(SpiffeId::parse(BACKEND).unwrap()),
        );
        let version = state.bundle.borrow().version + 1;
        let _ = state
            .bundle
            .send_replace(Arc::new(Bundle::of(&state.authority.load(), version)));
        let to_revoked = revoked.next().await.unwrap().unwrap();
        assert_eq!(to_revoked.revoked.len(), 1, "the list it must apply");
        assert_eq!(to_revoked.revoked[0].reason, "");
        let to_member = member.next().await.unwrap().unwrap();
        assert_eq!(to_member.revoked[0].reason, "key leaked");
    }

    #[tokio::test]
    async fn revocation_reasons_go_only_to_a_certificate_that_still_holds() {
        let ca = TestCa::new();
        let member = ca.cert(FRONTEND);
        let expired = ca.cert_at(
            FRONTEND,
            OffsetDateTime::now_utc() - time::Duration::hours(2),
        );
        let (service, _dir, _running) = serving_a_revocation_reason(ca);
        for (peer, reason) in [
            (Some(peer(&member)), "key leaked"),
            (Some(peer(&expired)), ""),
            (Some(anonymous_peer()), ""),
            (None, ""),
        ] {
            let mut request = Request::new(GetTrustBundleRequest {});
            if let Some(p) = peer {
                request.extensions_mut().insert(p);
            }
            let bundle = CertificateAuthority::get_trust_bundle(&service, request)
                .await
                .unwrap()
                .into_inner();
            assert_eq!(bundle.revoked.len(), 1, "the list itself is for anyone");
            assert_eq!(bundle.revoked[0].reason, reason);
        }
    }

    #[tokio::test]
    async fn a_bundle_stream_registers_a_certificate_that_holds_and_serves_anonymous_callers() {
        let ca = TestCa::new();
        let chain = ca.cert(FRONTEND);
        let service = CaService::new(Arc::new(ca.state));
        let state = &service.state;
        let now = || OffsetDateTime::now_utc().unix_timestamp();

        let anonymous = watch(&service, Some(anonymous_peer())).await;
        assert!(anonymous.is_ok(), "an anonymous stream is served");
        assert!(
            state.fleet.report(now()).0.is_empty(),
            "and counts for nothing"
        );
        let no_tls = watch(&service, None).await;
        assert!(no_tls.is_ok(), "a call without TLS details is anonymous");

        let stream = watch(&service, Some(peer(&chain))).await;
        assert!(stream.is_ok(), "a valid certificate opens a stream");
        let (sidecars, _) = state.fleet.report(now());
        assert_eq!(sidecars.len(), 1, "{sidecars:?}");
        assert_eq!(sidecars[0].identity, FRONTEND);
        assert!(sidecars[0].connected);
        assert_eq!(state.metrics.watch_streams.get(), 3);
        // Acknowledged on the same connection: recorded.
        let version = state.bundle.borrow().version;
        let req = AckTrustBundleRequest {
            instance_id: "pod-1".into(),
            bundle_version: version,
            serving_chain: chain.iter().map(|c| c.to_vec()).collect(),
            file_mode: false,
            held_version: 0,
        };
        state.ack(&req, Some(&peer(&chain))).unwrap();
        assert_eq!(state.fleet.report(now()).0[0].acked_version, version);
        drop(stream);
        // Closed: no longer connected, remembered as gone while its certificate lives.
        let (sidecars, _) = state.fleet.report(now());
        assert_eq!(sidecars.len(), 1, "{sidecars:?}");
        assert!(
            !sidecars[0].connected && sidecars[0].last_seen > 0,
            "{sidecars:?}"
        );
        assert_eq!(sidecars[0].acked_version, version);
    }

    #[tokio::test]
    async fn a_sidecar_the_ca_has_no_stream_room_for_is_listed_as_turned_away() {
        let mut ca = TestCa::new();
        // Room for one sidecar stream: the first takes it (a liar holding the room, say).
        ca.state.streams = StreamPermits::new(1, 4, 2);
        let first = ca.cert(FRONTEND);
        let hidden = ca.cert(BACKEND);
        let service = CaService::new(Arc::new(ca.state));
        let state = &service.state;
        let now = || OffsetDateTime::now_utc().unix_timestamp();
        let stream = watch(&service, Some(peer(&first))).await.unwrap();
        let refused = watch(&service, Some(peer(&hidden))).await.err().unwrap();
        assert_eq!(refused.code(), Code::ResourceExhausted, "{refused:?}");
        let (sidecars, _) = state.fleet.report(now());
        let listed: Vec<_> = sidecars
            .iter()
            .filter(|s| !s.turned_away.is_empty())
            .collect();
        assert_eq!(listed.len(), 1, "{sidecars:?}");
        assert_eq!(listed[0].identity, BACKEND);
        assert!(!listed[0].connected);
        // Room again: it registers, and is an instance like any other (the first one, gone, is
        // remembered as such).
        drop(stream);
        let _stream = watch(&service, Some(peer(&hidden))).await.unwrap();
        let (sidecars, _) = state.fleet.report(now());
        let connected: Vec<_> = sidecars.iter().filter(|s| s.connected).collect();
        assert_eq!(connected.len(), 1, "{sidecars:?}");
        assert_eq!(connected[0].identity, BACKEND);
        assert!(
            sidecars.iter().all(|s| s.turned_away.is_empty()),
            "{sidecars:?}"
        );
    }

    #[test]
    fn an_acknowledgement_under_an_authority_the_bundle_no_longer_holds_is_verified_in_full() {
        // The acknowledgement's chain is verified once, by the authority it belongs to, when that
        // authority's root is in the bundle the CA serves; otherwise against the bundle itself.
        let ca = TestCa::new();
        let chain = ca.cert(FRONTEND);
        let TestCa {
            dir,
            state,
            _shutdown: _running,
            ..
        } = ca;
        let before = state.authority.load().bundled_authorities.clone();
        assert_eq!(before.len(), 1, "{before:?}");
        // A bundle holding another root only, the authority's files remaining (a retiring
        // authority's root taken out of bundle.pem by hand; `Authority::load` refuses it for
        // the authority that signs, so it is built here).
        let other = TestPki::new("other");
        let mut edited = Authority::load(dir.path()).unwrap();
        edited.roots = vec![other.root.clone()];
        edited.anchors = meshid_identity::verify::Anchors::with_pins(
            &edited.roots,
            &[],
            edited.trust_domain.clone(),
        )
        .unwrap();
        edited.bundled_authorities.clear();
        state.authority.store(Arc::new(edited));
        let trust = state.authority.load();
        assert!(trust.bundled_authorities.is_empty());
        assert_eq!(trust.authority_anchors.len(), 1, "still known by its files");
        let req = AckTrustBundleRequest {
            instance_id: "pod-1".into(),
            bundle_version: 1,
            serving_chain: chain.iter().map(|c| c.to_vec()).collect(),
            file_mode: false,
            held_version: 0,
        };
        let refused = state.ack(&req, Some(&peer(&chain))).unwrap_err();
        assert_eq!(refused.code(), Code::Unauthenticated, "{refused:?}");
        assert!(
            refused.message().contains("no longer chains"),
            "{refused:?}"
        );
    }

    #[tokio::test]
    async fn one_certificate_cannot_flood_the_bundle_calls() {
        let ca = TestCa::new();
        let liar = ca.cert(FRONTEND);
        let honest = ca.cert(FRONTEND);
        let service = CaService::new(Arc::new(ca.state));
        let state = &service.state;
        let stream = watch(&service, Some(peer(&liar))).await.unwrap();
        let _honest_stream = watch(&service, Some(peer(&honest))).await.unwrap();
        let version = state.bundle.borrow().version;
        let ack_of = |chain: &[CertificateDer<'static>]| AckTrustBundleRequest {
            instance_id: "pod-1".into(),
            bundle_version: version,
            serving_chain: chain.iter().map(|c| c.to_vec()).collect(),
            file_mode: false,
            held_version: 0,
        };
        // The stream opened took one call; the rest of the burst goes through, then it is refused
        // with a wait the sidecar's backoff honours.
        let mut taken = 1;
        let refused = loop {
            match state.ack(&ack_of(&liar), Some(&peer(&liar))) {
                Ok(()) => taken += 1,
                Err(status) => break status,
            }
            assert!(taken <= BUNDLE_CALLS.burst, "never refused");
        };
        assert_eq!(taken, BUNDLE_CALLS.burst);
        assert_eq!(refused.code(), Code::ResourceExhausted, "{refused:?}");
        assert!(
            refused
                .message()
                .contains("acknowledgements from this certificate"),
            "{refused:?}"
        );
        let wait: u64 = refused
            .metadata()
            .get("retry-after-ms")
            .unwrap()
            .to_str()
            .unwrap()
            .parse()
            .unwrap();
        assert!((1..=1000).contains(&wait), "{wait}");
        // New streams from it too; another certificate of the same identity is not held back.
        let more = watch(&service, Some(peer(&liar))).await;
        assert_eq!(more.err().map(|s| s.code()), Some(Code::ResourceExhausted));
        state.ack(&ack_of(&honest), Some(&peer(&honest))).unwrap();
        let _another = watch(&service, Some(peer(&honest))).await.unwrap();
        drop(stream);
    }

    #[tokio::test]
    async fn a_certificate_that_no_longer_holds_can_neither_watch_nor_acknowledge() {
        /// What happened to the certificate of a connection kept alive since its handshake.
        #[derive(Debug, Clone, Copy)]
        enum Lapse {
            Expired,
            SerialRevoked,
            IdentityRevoked,
            RootRetired,
        }
        struct Case {
            name: &'static str,
            lapse: Lapse,
            code: Code,
            /// What the refusal must say (what happened and what to do).
            says: &'static [&'static str],
        }
        let cases = [
            Case {
                name: "expired",
                lapse: Lapse::Expired,
                code: Code::Unauthenticated,
                says: &["has expired", "service-account token"],
            },
            Case {
                name: "its serial revoked",
                lapse: Lapse::SerialRevoked,
                code: Code::PermissionDenied,
                says: &[
                    "certificate serial",
                    "is revoked (key leaked)",
                    "service-account token",
                ],
            },
            Case {
                name: "its identity revoked",
                lapse: Lapse::IdentityRevoked,
                code: Code::PermissionDenied,
                says: &[
                    "identity spiffe://cluster.local/ns/shop/sa/frontend is revoked",
                    "meshid-ca unrevoke",
                ],
            },
            Case {
                name: "its root retired (no longer an anchor)",
                lapse: Lapse::RootRetired,
                code: Code::Unauthenticated,
                says: &["no longer chains", "service-account token"],
            },
        ];
        for case in cases {
            let name = case.name;
            let ca = TestCa::new();
            let chain = match case.lapse {
                Lapse::Expired => ca.cert_at(
                    FRONTEND,
                    OffsetDateTime::now_utc() - time::Duration::hours(2),
                ),
                _ => ca.cert(FRONTEND),
            };
            let TestCa {
                dir,
                state,
                _shutdown: _running,
                ..
            } = ca;
            let dir = dir.path();
            let service = CaService::new(Arc::new(state));
            let state = &service.state;
            match case.lapse {
                Lapse::Expired => {}
                Lapse::SerialRevoked => {
                    let info = meshid_identity::cert_identity_from_der(&chain[0]).unwrap();
                    let serial =
                        meshid_identity::revocation::normalize_serial(&info.serial_hex).unwrap();
                    store_revocations(dir, state, Revoked::Serial(serial));
                }
                Lapse::IdentityRevoked => {
                    let id = SpiffeId::parse(FRONTEND).unwrap();
                    store_revocations(dir, state, Revoked::Id(id));
                }
                Lapse::RootRetired => {
                    crate::rotation::prepare(dir, None).unwrap();
                    crate::rotation::activate(dir, &[], true).await.unwrap();
                    crate::rotation::retire(dir, &[], true).await.unwrap();
                    state
                        .authority
                        .store(Arc::new(Authority::load(dir).unwrap()));
                    assert_eq!(state.authority.load().roots.len(), 1, "{name}");
                }
            }
            let says = |status: &Status| {
                assert_eq!(status.code(), case.code, "{name}: {status:?}");
                for words in case.says {
                    assert!(status.message().contains(words), "{name}: {status:?}");
                }
            };
            let now = || OffsetDateTime::now_utc().unix_timestamp();

            // A new stream on the kept-alive connection: refused, registering no instance.
            let Err(refused) = watch(&service, Some(peer(&chain))).await else {
                panic!("{name}: a bundle stream was opened");
            };
            says(&refused);
            let (sidecars, _) = state.fleet.report(now());
            assert!(sidecars.is_empty(), "{name}: registered {sidecars:?}");
            assert_eq!(state.metrics.watch_streams.get(), 0, "{name}");

            // The stream it opened while its certificate held, then an acknowledgement: refused,
            // recording nothing.
            let caller = caller_of(&chain);
            state
                .fleet
                .stream_opened(&caller, OffsetDateTime::now_utc().unix_timestamp())
                .unwrap();
            let req = AckTrustBundleRequest {
                instance_id: "pod-1".into(),
                bundle_version: state.bundle.borrow().version,
                serving_chain: chain.iter().map(|c| c.to_vec()).collect(),
                file_mode: false,
                held_version: 0,
            };
            let refused = state.ack(&req, Some(&peer(&chain))).unwrap_err();
            says(&refused);
            let (sidecars, _) = state.fleet.report(now());
            assert_eq!(sidecars.len(), 1, "{name}: {sidecars:?}");
            let s = &sidecars[0];
            assert_eq!(
                (s.acked_version, s.serving_authority.as_deref()),
                (0, None),
                "{name}: the acknowledgement was recorded"
            );
            // That stream ends: nothing connected is left (the refused one held no stream of the
            // instance); an instance whose certificate still lives is remembered as gone.
            state.fleet.stream_closed(&caller.key);
            assert!(
                state.fleet.report(now()).0.iter().all(|s| !s.connected),
                "{name}"
            );

            // Anonymous callers on a new connection are still served.
            assert!(
                watch(&service, Some(anonymous_peer())).await.is_ok(),
                "{name}"
            );
        }
    }

    // ---- the gRPC service around the decisions ----------------------------------------------

    #[tokio::test]
    async fn service_counts_every_decision_by_method_and_result() {
        struct Case {
            name: &'static str,
            call: fn(&TestCa) -> Call,
            expected: Result<(), Code>,
            labels: (&'static str, &'static str),
        }
        let cases = [
            Case {
                name: "refused: nothing presented",
                call: |_| (request(csr(), None), None),
                expected: Err(Code::Unauthenticated),
                labels: ("none", "no_credential"),
            },
            Case {
                name: "issued by join token",
                call: |ca| {
                    let token = ca.join_token(VM, Duration::from_secs(600));
                    (request(csr(), join(token)), None)
                },
                expected: Ok(()),
                labels: ("join_token", "issued"),
            },
            Case {
                name: "the same identity again, over the burst of 1",
                call: |ca| (request(csr(), None), Some(peer(&ca.cert(VM)))),
                expected: Err(Code::ResourceExhausted),
                labels: ("renewal", "rate_limited"),
            },
            Case {
                name: "refused: bad CSR",
                call: |_| (request(vec![1, 2, 3], join("x")), None),
                expected: Err(Code::InvalidArgument),
                labels: ("join_token", "invalid_csr"),
            },
        ];
        let ca = TestCa::with(Opts {
            rate: Some(RateLimit {
                per_second: 0.001,
                burst: 1,
            }),
            ..Opts::default()
        });
        let metrics = ca.state.metrics.clone();
        let calls: Vec<Call> = cases.iter().map(|c| (c.call)(&ca)).collect();
        let service = CaService::new(Arc::new(ca.state));
        for (case, (req, peer)) in cases.iter().zip(calls) {
            let name = case.name;
            let mut request = Request::new(req);
            if let Some(peer) = peer {
                request.extensions_mut().insert(peer);
            }
            let result = CertificateAuthority::issue(&service, request).await;
            match (case.expected, result) {
                (Ok(()), Ok(resp)) => assert_eq!(resp.get_ref().spiffe_id, VM, "{name}"),
                (Err(code), Err(status)) => {
                    assert_eq!(status.code(), code, "{name}: {status:?}");
                    if code == Code::ResourceExhausted {
                        assert!(status.metadata().get("retry-after-ms").is_some(), "{name}");
                    }
                }
                (want, got) => panic!("{name}: expected {want:?}, got {got:?}"),
            }
            let (method, result) = case.labels;
            let count = metrics
                .issue_requests
                .get_or_create(&IssueLabels { method, result })
                .get();
            assert_eq!(count, 1, "{name}: {method}/{result}");
        }
    }

    /// Every event logged on this thread while the guard lives, as a line of text (its target,
    /// then its fields).
    #[derive(Clone, Default)]
    struct Logged(Arc<std::sync::Mutex<Vec<String>>>);

    impl tracing::Subscriber for Logged {
        fn enabled(&self, _: &tracing::Metadata<'_>) -> bool {
            true
        }
        fn new_span(&self, _: &tracing::span::Attributes<'_>) -> tracing::span::Id {
            tracing::span::Id::from_u64(1)
        }
        fn record(&self, _: &tracing::span::Id, _: &tracing::span::Record<'_>) {}
        fn record_follows_from(&self, _: &tracing::span::Id, _: &tracing::span::Id) {}
        fn event(&self, event: &tracing::Event<'_>) {
            struct Line(String);
            impl tracing::field::Visit for Line {
                fn record_debug(
                    &mut self,
                    field: &tracing::field::Field,
                    value: &dyn std::fmt::Debug,
                ) {
                    use std::fmt::Write;
                    let _ = write!(self.0, " {}={value:?}", field.name());
                }
            }
            let mut line = Line(event.metadata().target().to_owned());
            event.record(&mut line);
            self.0.lock().unwrap().push(line.0);
        }
        fn enter(&self, _: &tracing::span::Id) {}
        fn exit(&self, _: &tracing::span::Id) {}
    }

    impl Logged {
        fn start() -> (Self, tracing::subscriber::DefaultGuard) {
            let logged = Self::default();
            let guard = tracing::subscriber::set_default(logged.clone());
            (logged, guard)
        }

        fn text(&self) -> String {
            self.0.lock().unwrap().join("\n")
        }

        fn lines_with(&self, text: &str) -> usize {
            self.0
                .lock()
                .unwrap()
                .iter()
                .filter(|l| l.contains(text))
                .count()
        }
    }

    /// A token whose header is valid JSON naming an algorithm of 12,000 X.
    fn token_with_a_huge_alg() -> String {
        let header = format!(r#"{{"alg":"{}","kid":"k"}}"#, "X".repeat(12_000));
        let token = format!(
            "{}.{}.{}",
            URL_SAFE_NO_PAD.encode(header),
            URL_SAFE_NO_PAD.encode(r#"{"sub":"x"}"#),
            URL_SAFE_NO_PAD.encode([0u8; 64])
        );
        assert!(token.len() <= crate::auth::jwt::MAX_TOKEN_LEN);
        token
    }

    #[tokio::test]
    async fn refusals_quote_no_caller_text_and_one_source_writes_a_bounded_number_of_lines() {
        let ca = TestCa::with(Opts {
            service_accounts: true,
            ..Opts::default()
        });
        let metrics = ca.state.metrics.clone();
        let service = CaService::new(Arc::new(ca.state));
        let token = token_with_a_huge_alg();
        let (logged, _guard) = Logged::start();
        for _ in 0..500 {
            let mut request = Request::new(request(csr(), service_account(token.clone())));
            request.extensions_mut().insert(anonymous_peer());
            let status = CertificateAuthority::issue(&service, request)
                .await
                .unwrap_err();
            assert_eq!(status.code(), Code::Unauthenticated);
            let message = status.message();
            assert!(message.len() < 256, "{} bytes", message.len());
            assert!(!message.contains("XXXX"), "{message}");
        }
        assert!(
            !logged.text().contains("XXXX"),
            "the audit detail quotes no caller text"
        );
        let refusals = RefusalLimits::default();
        assert_eq!(
            logged.lines_with("certificate refused"),
            usize::try_from(refusals.per_source).unwrap()
        );
        // Every refusal is still counted, the ones left out apart as well.
        let counted = metrics
            .issue_requests
            .get_or_create(&IssueLabels {
                method: "service_account_token",
                result: "malformed_token",
            })
            .get();
        assert_eq!(counted, 500);
        assert_eq!(
            metrics.audit_refusals_suppressed.get(),
            500 - u64::from(refusals.per_source)
        );
        // At the end of the window, one line says how many were left out.
        service
            .state
            .refusals
            .flush(Instant::now() + refusals.window);
        assert_eq!(
            logged.lines_with("480 more refusals from 192.0.2.7 suppressed"),
            1
        );
    }

    #[test]
    fn a_join_token_is_not_used_up_by_a_signing_that_fails() {
        let ca = TestCa::new();
        let token = ca.join_token(VM, Duration::from_secs(600));
        let good = ca.state.authority.load_full();
        let mut expired = Authority::load(ca.dir.path()).unwrap();
        expired.intermediate_not_after = OffsetDateTime::now_utc() - time::Duration::hours(1);
        ca.state.authority.store(Arc::new(expired));
        let req = request(csr(), join(token.clone()));
        let decision = ca.state.issue(&req, None);
        let refused = Expected::RefusedFor(Code::Internal, "signing_failed", VM);
        check(
            "expired intermediate",
            &req,
            decision,
            Method::JoinToken,
            refused,
        );
        // A new intermediate in place: the same token works.
        ca.state.authority.store(good);
        let req = request(csr(), join(token));
        let decision = ca.state.issue(&req, None);
        check(
            "then",
            &req,
            decision,
            Method::JoinToken,
            Expected::Issued(VM),
        );
    }

    #[test]
    fn long_certificates_past_the_identities_counted_apart_get_the_default_lifetime() {
        let ca = TestCa::new();
        let ids: Vec<String> = (0..=crate::issued::MAX_LONG_IDENTITIES)
            .map(|i| format!("spiffe://cluster.local/ns/batch/sa/w{i}"))
            .collect();
        let mut lifetimes = Vec::new();
        for id in &ids {
            let req = IssueRequest {
                ttl_seconds: 3600,
                app_svid: false,
                ..request(csr(), None)
            };
            let (_, _, result) = ca.state.issue(&req, Some(&peer(&ca.cert(id))));
            let resp = result.unwrap_or_else(|r| panic!("{id}: {:?}", r.status));
            lifetimes.push(resp.not_after_unix - resp.not_before_unix - 300);
        }
        let (last, counted_apart) = lifetimes.split_last().unwrap();
        assert!(
            counted_apart.iter().all(|l| *l == 3600),
            "{counted_apart:?}"
        );
        assert_eq!(*last, 600, "the 257th: the default lifetime");

        // Retiring the authority: once every one of those identities is revoked, nothing holds
        // `retire` past the default lifetime, the 257th's certificate included.
        let mut rotation = crate::authorities::RotationState::load(ca.dir.path()).unwrap();
        rotation.authorities[0].state = crate::authorities::AuthorityState::Retiring;
        rotation
            .authorities
            .push(crate::authorities::AuthorityRecord {
                name: "2".into(),
                prefix: "a2-".into(),
                state: crate::authorities::AuthorityState::Active,
                in_bundle_since: 2,
                signed_until: None,
                signing_since: None,
            });
        let mut revoked = crate::revocations::Revocations::default();
        let now = OffsetDateTime::now_utc().unix_timestamp();
        for id in &ids {
            let id = SpiffeId::parse(id).unwrap();
            revoked
                .revoke(Revoked::Id(id), now, 3600, String::new())
                .unwrap();
        }
        let blockers_at = |t: i64, list: &crate::revocations::Revocations| {
            let (_, issued) = ca.state.fleet.report(t);
            let process = crate::rotation::CaProcess {
                records_issuance: true,
                ..Default::default()
            };
            let report = crate::rotation::report(
                ca.dir.path(),
                &rotation,
                Vec::new(),
                Vec::new(),
                &issued,
                process,
                list,
            );
            crate::rotation::retire_blockers(&rotation, &report, t)
        };
        let after_default = now + 601;
        let none = crate::revocations::Revocations::default();
        assert!(
            !blockers_at(after_default, &none).is_empty(),
            "not revoked: held"
        );
        let b = blockers_at(after_default, &revoked);
        assert!(b.is_empty(), "{b:?}");
    }

    #[test]
    fn renewals_and_jwt_svids_are_held_to_the_rate_before_their_chain_is_verified() {
        let ca = TestCa::with(Opts {
            rate: Some(RateLimit {
                per_second: 0.001,
                burst: 1,
            }),
            ..Opts::default()
        });
        // A chain that fails verification at the call (another PKI of the trust domain, as a
        // connection set up before `rotate retire` took its root would present).
        let foreign = TestPki::new("other").leaf(FRONTEND).chain;
        let req = request(csr(), None);
        let results: Vec<&str> = (0..3)
            .map(|_| match ca.state.issue(&req, Some(&peer(&foreign))).2 {
                Ok(_) => "issued",
                Err(r) => r.result,
            })
            .collect();
        assert_eq!(results, ["untrusted_chain", "rate_limited", "rate_limited"]);
        let jwt = IssueJwtSvidRequest {
            audience: vec!["db".into()],
        };
        let results: Vec<&str> = (0..3)
            .map(
                |_| match ca.state.issue_jwt_svid(&jwt, Some(&peer(&foreign))).1 {
                    Ok(_) => "issued",
                    Err(r) => r.result,
                },
            )
            .collect();
        assert_eq!(results, ["untrusted_chain", "rate_limited", "rate_limited"]);
    }

    #[tokio::test]
    async fn trust_bundle_calls_verify_a_certificate_only_within_its_bundle_calls() {
        let ca = TestCa::new();
        let member = ca.cert(FRONTEND);
        let (service, _dir, _running) = serving_a_revocation_reason(ca);
        let mut with_reasons = 0;
        for _ in 0..40 {
            let mut request = Request::new(GetTrustBundleRequest {});
            request.extensions_mut().insert(peer(&member));
            let bundle = CertificateAuthority::get_trust_bundle(&service, request)
                .await
                .unwrap()
                .into_inner();
            assert_eq!(bundle.revoked.len(), 1);
            with_reasons += usize::from(!bundle.revoked[0].reason.is_empty());
        }
        // The burst of bundle calls verifies the certificate; the rest get the bundle without
        // the reasons, unverified.
        assert_eq!(with_reasons, usize::try_from(BUNDLE_CALLS.burst).unwrap());
    }

    // ---- app SVIDs and lineages ----------------------------------------------------------------

    /// Renews on `chain` (asking for an app SVID when `app_svid`): the new chain, or the refusal.
    fn renew_on(
        ca: &TestCa,
        chain: &[CertificateDer<'static>],
        app_svid: bool,
    ) -> Result<Vec<CertificateDer<'static>>, Refusal> {
        let req = IssueRequest {
            app_svid,
            ..request(csr(), None)
        };
        let (_, _, issued) = ca.state.issue(&req, Some(&peer(chain)));
        issued.map(|r| r.cert_chain.into_iter().map(CertificateDer::from).collect())
    }

    fn identity_of(chain: &[CertificateDer<'_>]) -> meshid_identity::CertIdentity {
        meshid_identity::cert_identity_from_der(&chain[0]).unwrap()
    }

    /// Asserts `refused` is a `PermissionDenied` for presenting an app SVID.
    fn refused_as_app_svid(what: &str, status: &Status) {
        assert_eq!(status.code(), Code::PermissionDenied, "{what}: {status:?}");
        assert!(status.message().contains("app SVID"), "{what}: {status:?}");
    }

    #[tokio::test]
    async fn an_app_svid_serves_peers_but_is_no_credential_at_the_ca() {
        let ca = TestCa::new();
        // The sidecar's certificate has 100 s left: the app's ends with it.
        let sidecar = ca.cert_at(
            FRONTEND,
            OffsetDateTime::now_utc() - time::Duration::seconds(3500),
        );
        let app = renew_on(&ca, &sidecar, true).unwrap();
        let (own, info) = (identity_of(&sidecar), identity_of(&app));
        assert!(info.app_svid && !own.app_svid);
        assert_eq!(info.id, own.id);
        assert!(info.not_after <= own.not_after, "{info:?} outlives {own:?}");
        // Peers take it for mTLS.
        let der: Vec<Vec<u8>> = app.iter().map(|c| c.to_vec()).collect();
        verify_chain(&der, &ca.root()).unwrap();

        // Neither a renewal (of itself, or for another app SVID) nor a JWT-SVID.
        for app_svid in [false, true] {
            let refused = renew_on(&ca, &app, app_svid).unwrap_err();
            assert_eq!(refused.result, "app_svid");
            refused_as_app_svid("renewal", &refused.status);
        }
        let jwt = IssueJwtSvidRequest {
            audience: vec!["db".into()],
        };
        let refused = ca
            .state
            .issue_jwt_svid(&jwt, Some(&peer(&app)))
            .1
            .unwrap_err();
        assert_eq!(refused.result, "app_svid");
        refused_as_app_svid("JWT-SVID", &refused.status);
        // An app SVID is asked for with the sidecar's certificate, never with a token.
        let token = ca.join_token(VM, Duration::from_secs(60));
        let req = IssueRequest {
            app_svid: true,
            ..request(csr(), join(token))
        };
        let refused = ca.state.issue(&req, None).2.unwrap_err();
        assert_eq!(refused.status.code(), Code::InvalidArgument);

        // No bundle stream (registering no instance) nor acknowledgement.
        let service = CaService::new(Arc::new(ca.state));
        let state = &service.state;
        let Err(refused) = watch(&service, Some(peer(&app))).await else {
            panic!("an app SVID opened a bundle stream");
        };
        refused_as_app_svid("bundle stream", &refused);
        let now = OffsetDateTime::now_utc().unix_timestamp();
        assert!(state.fleet.report(now).0.is_empty());
        state.fleet.stream_opened(&caller_of(&app), now).unwrap();
        let ack = AckTrustBundleRequest {
            instance_id: "pod-1".into(),
            bundle_version: state.bundle.borrow().version,
            serving_chain: app.iter().map(|c| c.to_vec()).collect(),
            file_mode: false,
            held_version: 0,
        };
        refused_as_app_svid("ack", &state.ack(&ack, Some(&peer(&app))).unwrap_err());
        // The sidecar's own certificate still renews.
        let mut request = Request::new(WatchTrustBundleRequest::default());
        request.extensions_mut().insert(peer(&sidecar));
        assert!(
            CertificateAuthority::watch_trust_bundle(&service, request)
                .await
                .is_ok()
        );
    }

    #[test]
    fn a_revoked_serial_refuses_every_certificate_renewed_from_it() {
        let ca = TestCa::new();
        let first = ca.cert(FRONTEND);
        let second = renew_on(&ca, &first, false).unwrap();
        let third = renew_on(&ca, &second, false).unwrap();
        let app = renew_on(&ca, &third, true).unwrap();
        let serial = normalized_serial(&identity_of(&first).serial_hex);
        for (name, chain) in [
            ("first", &first),
            ("second", &second),
            ("third", &third),
            ("app", &app),
        ] {
            assert_eq!(
                normalized_serial(identity_of(chain).lineage_serial()),
                serial,
                "{name}"
            );
        }
        let other = ca.cert(FRONTEND);
        store_revocations(ca.dir.path(), &ca.state, Revoked::Serial(serial.clone()));

        for (name, chain) in [("second", &second), ("third", &third)] {
            let refused = renew_on(&ca, chain, false).unwrap_err();
            assert_eq!(refused.result, "revoked", "{name}");
            assert!(
                refused.status.message().contains(&serial),
                "{name}: {:?}",
                refused.status
            );
            let jwt = IssueJwtSvidRequest {
                audience: vec!["db".into()],
            };
            let refused = ca
                .state
                .issue_jwt_svid(&jwt, Some(&peer(chain)))
                .1
                .unwrap_err();
            assert_eq!(refused.result, "revoked", "{name}");
        }
        // Another lineage of the identity renews on.
        renew_on(&ca, &other, false).unwrap();

        // Sidecars refuse the lineage as peers too.
        let revoked = meshid_identity::revocation::RevocationSet::new([Revoked::Serial(serial)]);
        let anchors =
            meshid_identity::verify::Anchors::new(&[ca.root()], TrustDomain::new(TD).unwrap())
                .unwrap()
                .with_revocations(Arc::new(revoked.unwrap()));
        for (name, chain, refused) in [
            ("third", &third, true),
            ("app", &app, true),
            ("other", &other, false),
        ] {
            let peer = meshid_identity::peer::VerifiedPeer::from_leaf(&chain[0]).unwrap();
            assert_eq!(anchors.revokes(&peer).is_some(), refused, "{name}");
        }
    }

    #[test]
    fn a_certificate_renewed_in_a_loop_leaves_its_identity_to_other_replicas_and_new_pods() {
        let ca = TestCa::with(Opts {
            rate: Some(RateLimit {
                per_second: 0.001,
                burst: 200,
            }),
            ..Opts::default()
        });
        // A renews itself in a loop, each time on the certificate (and new key) it just got.
        let mut a = ca.cert(FRONTEND);
        let mut renewed = 0;
        let refused = loop {
            match renew_on(&ca, &a, false) {
                Ok(next) => {
                    a = next;
                    renewed += 1;
                }
                Err(refusal) => break refusal,
            }
            assert!(renewed <= 200, "never refused");
        };
        assert_eq!(refused.result, "rate_limited");
        assert_eq!(renewed, 8, "its lineage's burst, not its identity's");
        // Another replica's certificate still renews, and a new pod's token is still issued.
        renew_on(&ca, &ca.cert(FRONTEND), false).unwrap();
        let token = ca.join_token(FRONTEND, Duration::from_secs(600));
        ca.state
            .issue(&request(csr(), join(token)), None)
            .2
            .unwrap();

        // Many lineages renewing at once take at most three quarters of the identity's burst
        // (150 of 200, A's 8 and the replica's 1 among them): tokens still find room.
        let mut renewals = 9;
        for _ in 0..200 {
            if renew_on(&ca, &ca.cert(FRONTEND), false).is_ok() {
                renewals += 1;
            }
        }
        assert_eq!(renewals, 150);
        let token = ca.join_token(FRONTEND, Duration::from_secs(600));
        ca.state
            .issue(&request(csr(), join(token)), None)
            .2
            .unwrap();
    }
}
