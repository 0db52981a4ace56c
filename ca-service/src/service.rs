//! The `meshid.ca.v1.CertificateAuthority` gRPC service: authenticate, authorize, rate-limit, sign,
//! audit. Errors become gRPC statuses here and nowhere else.

use std::pin::Pin;
use std::sync::Arc;
use std::time::Instant;

use arc_swap::ArcSwap;
use meshid_proto::SpiffeId;
use meshid_proto::ca::v1::certificate_authority_server::CertificateAuthority;
use meshid_proto::ca::v1::{
    AckTrustBundleRequest, AckTrustBundleResponse, GetTrustBundleRequest, IssueRequest,
    IssueResponse, TrustBundle, WatchTrustBundleRequest, issue_request::Credential,
};
use rustls_pki_types::CertificateDer;
use time::OffsetDateTime;
use tokio::sync::watch;
use tokio_stream::Stream;
use tonic::{Request, Response, Status};

use crate::auth::{self, AuthError, JoinTokenStore, JwtAuthenticator, Method, PendingJoin, Reason};
use crate::authority::Authority;
use crate::csr::CsrPublicKey;
use crate::metrics::{IssueLabels, Metrics};
use crate::ratelimit::RateLimiter;
use crate::signer::{LifetimePolicy, sign_leaf};
use crate::tls::PeerInfo;

/// The trust bundle as served, with its version.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Bundle {
    pub version: u64,
    pub roots: Vec<CertificateDer<'static>>,
    /// Tell sidecars to renew at once (after a forced root retirement).
    pub renew_now: bool,
}

/// Everything an Issue call needs.
pub struct CaState {
    pub authority: ArcSwap<Authority>,
    pub bundle: watch::Sender<Arc<Bundle>>,
    pub jwt: Option<JwtAuthenticator>,
    pub join: JoinTokenStore,
    pub lifetimes: LifetimePolicy,
    pub limiter: RateLimiter,
    pub metrics: Metrics,
    /// Flips to true when the server shuts down, ending bundle streams.
    pub shutdown: watch::Receiver<bool>,
    /// Connected sidecars, their acknowledgements, and live certificates per authority.
    pub fleet: crate::rotation::Fleet,
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
struct Refusal {
    status: Status,
    result: &'static str,
}

impl From<AuthError> for Refusal {
    fn from(e: AuthError) -> Self {
        let status = if e.denied {
            Status::permission_denied(e.message)
        } else {
            Status::unauthenticated(e.message)
        };
        Self {
            status,
            result: e.reason.as_str(),
        }
    }
}

enum Authenticated {
    Ready(SpiffeId),
    Join(PendingJoin),
}

impl CaState {
    fn authenticate(
        &self,
        credential: Option<&Credential>,
        peer: Option<&PeerInfo>,
    ) -> (Method, Result<Authenticated, AuthError>) {
        match credential {
            Some(Credential::ServiceAccountToken(token)) => {
                let result = match &self.jwt {
                    Some(jwt) => jwt.authenticate(token).map(Authenticated::Ready),
                    None => Err(AuthError::unauthenticated(
                        Reason::ServiceAccountTokensDisabled,
                        "this CA does not accept service-account tokens (no --jwks)",
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
                    let td = self.authority.load().trust_domain.clone();
                    let result = auth::authenticate_renewal(leaf, &td, OffsetDateTime::now_utc())
                        .and_then(|id| {
                            if let (Some(jwt), Some((ns, _))) = (&self.jwt, id.service_account()) {
                                jwt.check_namespace(ns)?;
                            }
                            Ok(Authenticated::Ready(id))
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

    fn issue(
        &self,
        req: &IssueRequest,
        peer: Option<&PeerInfo>,
    ) -> (Method, Option<SpiffeId>, Result<IssueResponse, Refusal>) {
        // The CSR first: a bad CSR must not consume a join token.
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
        let (method, authenticated) = self.authenticate(req.credential.as_ref(), peer);
        let authenticated = match authenticated {
            Ok(a) => a,
            Err(e) => return (method, None, Err(e.into())),
        };
        let id = match &authenticated {
            Authenticated::Ready(id) => id.clone(),
            Authenticated::Join(p) => p.id.clone(),
        };
        if let Err(wait) = self.limiter.check(&id, Instant::now()) {
            let mut status = Status::resource_exhausted(format!(
                "too many certificate requests for {id}; retry in {} ms",
                wait.as_millis()
            ));
            if let Ok(v) = wait.as_millis().max(1).to_string().parse() {
                status.metadata_mut().insert("retry-after-ms", v);
            }
            let refusal = Refusal {
                status,
                result: "rate_limited",
            };
            return (method, Some(id), Err(refusal));
        }
        if let Authenticated::Join(pending) = authenticated
            && let Err(e) = self.join.redeem(pending)
        {
            return (method, Some(id), Err(e.into()));
        }

        let authority = self.authority.load();
        let lifetime = self.lifetimes.lifetime_for(req.ttl_seconds);
        let issued = match sign_leaf(&authority, &id, &key, lifetime, OffsetDateTime::now_utc()) {
            Ok(issued) => issued,
            Err(error) => {
                tracing::error!(%error, identity = %id, "signing failed");
                let refusal = Refusal {
                    status: Status::internal("the CA could not sign the certificate"),
                    result: "signing_failed",
                };
                return (method, Some(id), Err(refusal));
            }
        };
        self.fleet.issued(
            &authority.name,
            issued.not_after.unix_timestamp(),
            OffsetDateTime::now_utc().unix_timestamp(),
        );
        let bundle = self.bundle.borrow().clone();
        let response = IssueResponse {
            cert_chain: issued.chain.iter().map(|c| c.to_vec()).collect(),
            trust_anchors: bundle.roots.iter().map(|c| c.to_vec()).collect(),
            spiffe_id: id.to_string(),
            not_before_unix: issued.not_before.unix_timestamp(),
            not_after_unix: issued.not_after.unix_timestamp(),
            bundle_version: bundle.version,
        };
        (method, Some(id), Ok(response))
    }

    fn trust_bundle(&self, bundle: &Bundle) -> TrustBundle {
        TrustBundle {
            trust_domain: self.authority.load().trust_domain.to_string(),
            roots: bundle.roots.iter().map(|c| c.to_vec()).collect(),
            version: bundle.version,
            renew_now: bundle.renew_now,
        }
    }

    /// Records a sidecar's acknowledgement; the caller must prove it holds the certificate it
    /// reports (the chain's leaf is the TLS client certificate of the call).
    fn ack(&self, req: &AckTrustBundleRequest, peer: Option<&PeerInfo>) -> Result<(), Status> {
        if req.instance_id.is_empty() || req.instance_id.len() > 128 {
            return Err(Status::invalid_argument(
                "instance_id must be 1 to 128 bytes",
            ));
        }
        if req.serving_chain.is_empty() || req.serving_chain.len() > 4 {
            return Err(Status::invalid_argument(
                "serving_chain must hold 1 to 4 certificates",
            ));
        }
        let presented = peer
            .and_then(|p| p.certificates.as_ref())
            .and_then(|c| c.first())
            .ok_or_else(|| {
                Status::unauthenticated("acknowledge over mTLS with your certificate")
            })?;
        if presented.as_ref() != req.serving_chain[0].as_slice() {
            return Err(Status::permission_denied(
                "the reported certificate is not the one presented on this connection",
            ));
        }
        let info = meshid_proto::cert_identity_from_der(&req.serving_chain[0])
            .map_err(|e| Status::invalid_argument(e.to_string()))?;
        let chain: Vec<CertificateDer<'static>> = req
            .serving_chain
            .iter()
            .map(|c| CertificateDer::from(c.clone()))
            .collect();
        let now = OffsetDateTime::now_utc().unix_timestamp();
        let authority = crate::rotation::fleet::authority_of(
            &chain,
            &self.authority.load().authority_roots,
            now,
        );
        let ack = crate::rotation::fleet::Ack {
            // A file-mode sidecar's bundle version means nothing: its anchors come from files.
            version: if req.file_mode { 0 } else { req.bundle_version },
            identity: info.id.to_string(),
            authority,
            not_after: info.not_after,
            file_mode: req.file_mode,
        };
        self.fleet.ack(&req.instance_id, ack, now);
        Ok(())
    }
}

/// Bundle streams one CA process serves at most (each is a task and a buffer).
pub const MAX_WATCH_STREAMS: i64 = 50_000;

type BundleStream = Pin<Box<dyn Stream<Item = Result<TrustBundle, Status>> + Send>>;

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
        let (method, id, result) = self.state.issue(&req, peer.as_ref());
        let identity = id.as_ref().map(|i| i.as_str()).unwrap_or("");
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
                tracing::info!(
                    target: "meshid_ca::audit",
                    method = method.as_str(),
                    identity,
                    peer = %remote,
                    result = "issued",
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
                tracing::warn!(
                    target: "meshid_ca::audit",
                    method = method.as_str(),
                    identity,
                    peer = %remote,
                    result = "refused",
                    reason = refusal.result,
                    code = ?refusal.status.code(),
                    detail = refusal.status.message(),
                    "certificate refused"
                );
                Err(refusal.status)
            }
        }
    }

    async fn get_trust_bundle(
        &self,
        _request: Request<GetTrustBundleRequest>,
    ) -> Result<Response<TrustBundle>, Status> {
        let bundle = self.state.bundle.borrow().clone();
        Ok(Response::new(self.state.trust_bundle(&bundle)))
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
        // Only authenticated sidecars count as connected (an anonymous stream cannot hold a
        // rotation step hostage).
        let authenticated = request
            .extensions()
            .get::<PeerInfo>()
            .is_some_and(|p| p.certificates.is_some());
        let instance = request.into_inner().instance_id;
        let instance =
            (authenticated && !instance.is_empty() && instance.len() <= 128).then_some(instance);
        let state = self.state.clone();
        if state.metrics.watch_streams.get() >= MAX_WATCH_STREAMS {
            return Err(Status::resource_exhausted(
                "too many trust bundle streams on this CA; retry later",
            ));
        }
        let mut bundles = state.bundle.subscribe();
        let mut shutdown = state.shutdown.clone();
        let (tx, rx) = tokio::sync::mpsc::channel(4);
        tokio::spawn(async move {
            state.metrics.watch_streams.inc();
            let now = || OffsetDateTime::now_utc().unix_timestamp();
            if let Some(i) = &instance {
                state.fleet.stream_opened(i, now());
            }
            loop {
                let current = bundles.borrow_and_update().clone();
                if tx.send(Ok(state.trust_bundle(&current))).await.is_err() {
                    break;
                }
                tokio::select! {
                    changed = bundles.changed() => if changed.is_err() { break },
                    _ = shutdown.wait_for(|stop| *stop) => break,
                    () = tx.closed() => break,
                }
            }
            if let Some(i) = &instance {
                state.fleet.stream_closed(i, now());
            }
            state.metrics.watch_streams.dec();
        });
        Ok(Response::new(Box::pin(
            tokio_stream::wrappers::ReceiverStream::new(rx),
        )))
    }
}
