//! Kubernetes projected service-account tokens, verified offline against the cluster's JWKS: read
//! from a file (re-read when it changes) or fetched from the cluster (see [`super::jwks_remote`]).

use meshid_runtime::time::unix_now;
use std::collections::{BTreeSet, HashMap};
use std::path::{Path, PathBuf};
use std::sync::RwLock;
use std::time::{Duration, Instant, SystemTime};

use jsonwebtoken::jwk::{AlgorithmParameters, EllipticCurve, JwkSet, KeyAlgorithm, PublicKeyUse};
use jsonwebtoken::{Algorithm, DecodingKey, Validation, errors::ErrorKind};
use meshid_identity::{SpiffeId, TrustDomain};
use serde::Deserialize;

use super::jwks_remote::RemoteJwks;
use super::{AuthError, Reason};
use crate::metrics::Metrics;

/// The largest token accepted, in bytes. Real projected tokens are about 1 KiB.
pub const MAX_TOKEN_LEN: usize = 16 * 1024;
/// How far the token's times may be off from ours.
pub const MAX_SKEW: Duration = Duration::from_secs(60);
/// How often the JWKS file is checked for changes.
const RECHECK_EVERY: Duration = Duration::from_secs(1);
/// The longest wait before the next fetch while fetching the JWKS fails.
const RETRY_AFTER_ERROR: Duration = Duration::from_secs(30);

/// Where the cluster's service-account issuer keys (a JWKS, as served at `/openid/v1/jwks`) come
/// from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum JwksSource {
    /// A file, re-read when it changes (`--jwks`).
    File(PathBuf),
    /// Fetched from the cluster, periodically and when a token names an unknown key (`--jwks-url`,
    /// `--jwks-discovery`).
    Remote(RemoteJwks),
}

/// Settings for service-account token verification.
#[derive(Debug, Clone)]
pub struct JwtConfig {
    /// The cluster's service-account issuer keys.
    pub jwks: JwksSource,
    /// Expected `iss`.
    pub issuer: String,
    /// Expected `aud`.
    pub audience: String,
    /// When set, only these namespaces may get identities.
    pub allowed_namespaces: Option<BTreeSet<String>>,
    /// The longest lifetime (`exp - iat`, or `warnafter - iat` when Kubernetes extended the token)
    /// a token may have: a long-lived token would re-attest its identity until it expires, past
    /// any `--max-attestation-age` (`--max-token-lifetime`).
    pub max_token_lifetime: Duration,
    /// Accept tokens not bound to a pod (no `kubernetes.io.pod` claim), as `kubectl create token`
    /// mints them: such a token outlives any pod, and anyone holding it gets the identity until it
    /// expires (`--dangerous-accept-unbound-tokens`).
    pub dangerous_accept_unbound_tokens: bool,
    /// Also ask the API server whether it still takes each token (a `TokenReview` at the host the
    /// keys come from: [`super::token_review`]); needs a remote source (`--token-review`).
    pub token_review: bool,
}

impl JwtConfig {
    /// The default `--max-token-lifetime`: 48 hours. Our injector asks for 10-minute tokens by
    /// default (`--token-expiration-seconds`, at least 600); Kubernetes' own one-year extension of
    /// 3607 s tokens carries `warnafter` = iat + 3607, which is what the cap is checked against.
    pub const DEFAULT_MAX_TOKEN_LIFETIME: Duration = Duration::from_secs(48 * 3600);
}

/// What the CA verifies service-account tokens against: its expected issuer and audience, where
/// its keys come from, and the key IDs it holds now. Served as JSON at the admin `/jwks-status`.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct JwksSummary {
    pub issuer: String,
    pub audience: String,
    /// `file PATH` or `url URL`.
    pub source: String,
    pub kids: Vec<String>,
}

/// Problems with the JWKS file itself (not with a token).
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum JwksError {
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{path}: not a JWKS document: {reason}")]
    Invalid { path: PathBuf, reason: String },
    #[error("--jwks-url: {0}")]
    Url(String),
    #[error("--token-review: {0}")]
    TokenReview(String),
}

struct Keys {
    by_kid: HashMap<String, (Algorithm, DecodingKey)>,
    stamp: Option<(SystemTime, u64)>,
    checked: Instant,
    /// SHA-256 of the last JWKS fetched (remote source): an unchanged document changes nothing.
    digest: Option<[u8; 32]>,
    /// Counts the key sets installed: a token verified with a key of an earlier set is not
    /// remembered as verified (the set may have been replaced, and the cache emptied, while its
    /// signature was checked).
    generation: u64,
}

/// The state of fetching (remote source): one fetch at a time.
#[derive(Default)]
struct FetchState {
    /// When the last refresh forced by an unknown `kid` started.
    last_forced: Option<Instant>,
    /// Whether the last fetch failed (the next periodic one comes sooner).
    failing: bool,
}

/// Verifies service-account tokens. A JWKS file is re-read when it changes; a fetched JWKS is
/// refreshed periodically and when a token names an unknown key (rate-limited). A broken new
/// document keeps the last good keys (and is logged and counted).
pub struct JwtAuthenticator {
    config: JwtConfig,
    trust_domain: TrustDomain,
    keys: RwLock<Keys>,
    fetch: tokio::sync::Mutex<FetchState>,
    metrics: Option<Metrics>,
    /// Recently verified tokens (by SHA-256), as kube-apiserver caches token reviews: a pod that
    /// retries with the same token costs one hash, not a signature check. Entries live at most
    /// `CACHE_TTL` and never past the token's `exp`; a JWKS change empties the cache.
    verified: std::sync::Mutex<HashMap<[u8; 32], (SpiffeId, Instant, i64)>>,
    /// Key IDs a forced refresh looked for and did not find, and when: a token naming one again
    /// forces no refresh for [`ABSENT_KID_TTL`] (a new key set forgets them all).
    absent_kids: std::sync::Mutex<HashMap<String, Instant>>,
}

/// How long a key ID a forced refresh did not find forces no other.
const ABSENT_KID_TTL: Duration = Duration::from_secs(60);
/// The most key IDs remembered as absent.
const ABSENT_KIDS_MAX: usize = 1_024;

/// How long a verified token is remembered.
const CACHE_TTL: Duration = Duration::from_secs(10);
/// The most tokens remembered.
const CACHE_MAX: usize = 10_000;

#[derive(Deserialize)]
struct Claims {
    sub: String,
    exp: i64,
    #[serde(default)]
    iat: Option<i64>,
    #[serde(default, rename = "kubernetes.io")]
    kubernetes: Option<KubernetesClaims>,
}

#[derive(Deserialize)]
struct KubernetesClaims {
    namespace: Option<String>,
    serviceaccount: Option<NamedRef>,
    /// The pod a projected token is bound to: it stops verifying at the API server when the pod
    /// is gone. Tokens from `kubectl create token` (without `--bound-object-kind Pod`) have none.
    #[serde(default)]
    pod: Option<NamedRef>,
    /// Set by Kubernetes when it extended a 3607 s token to a year
    /// (`--service-account-extend-token-expiration`): the time the token should have expired.
    #[serde(default)]
    warnafter: Option<i64>,
}

#[derive(Deserialize)]
struct NamedRef {
    name: Option<String>,
    #[serde(default)]
    uid: Option<String>,
}

impl JwtAuthenticator {
    /// Loads a JWKS file; fails if the file is missing, unreadable, or holds no usable key. A remote
    /// source starts with no key: [`JwtAuthenticator::refresh_remote`] fetches them.
    pub fn new(config: JwtConfig, trust_domain: TrustDomain) -> Result<Self, JwksError> {
        let (by_kid, stamp) = match &config.jwks {
            JwksSource::File(path) => load_jwks(path)?,
            JwksSource::Remote(remote) => {
                super::jwks_remote::Target::parse(&remote.url).map_err(JwksError::Url)?;
                (HashMap::new(), None)
            }
        };
        Ok(Self {
            config,
            trust_domain,
            keys: RwLock::new(Keys {
                by_kid,
                stamp,
                checked: Instant::now(),
                digest: None,
                generation: 0,
            }),
            fetch: Default::default(),
            metrics: None,
            verified: Default::default(),
            absent_kids: Default::default(),
        })
    }

    /// Reports JWKS refreshes and the key count into `metrics`.
    pub fn with_metrics(mut self, metrics: Metrics) -> Self {
        let keys = self.key_count();
        metrics.jwks_keys.set(keys as i64);
        if keys > 0 {
            metrics.jwks_last_success.set(unix_now());
        }
        self.metrics = Some(metrics);
        self
    }

    /// How many usable keys the current set holds.
    pub fn key_count(&self) -> usize {
        self.keys
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .by_kid
            .len()
    }

    /// What this authenticator verifies tokens against, for the admin `/jwks-status` route that
    /// `meshid-ca check` compares with the cluster: public facts only (no key material).
    pub fn summary(&self) -> JwksSummary {
        self.refresh_if_changed();
        let mut kids: Vec<String> = self
            .keys
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .by_kid
            .keys()
            .cloned()
            .collect();
        kids.sort();
        JwksSummary {
            issuer: self.config.issuer.clone(),
            audience: self.config.audience.clone(),
            source: match &self.config.jwks {
                JwksSource::File(path) => format!("file {}", path.display()),
                JwksSource::Remote(remote) => format!("url {}", remote.url),
            },
            kids,
        }
    }

    fn has_kid(&self, kid: &str) -> bool {
        self.keys
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .by_kid
            .contains_key(kid)
    }

    fn record(&self, ok: bool, keys: Option<usize>) {
        if let Some(m) = &self.metrics {
            m.jwks_refreshes
                .get_or_create(&crate::metrics::ResultLabels {
                    result: if ok { "ok" } else { "error" },
                })
                .inc();
            if ok {
                m.jwks_last_success.set(unix_now());
            }
            if let Some(n) = keys {
                m.jwks_keys.set(i64::try_from(n).unwrap_or(i64::MAX));
            }
        }
    }

    /// Replaces the key set (when it changed) and forgets tokens verified with the old one.
    fn install(&self, by_kid: KeyMap, digest: Option<[u8; 32]>) -> bool {
        let mut keys = self.keys.write().unwrap_or_else(|p| p.into_inner());
        if digest.is_some() && digest == keys.digest {
            return false;
        }
        keys.by_kid = by_kid;
        keys.digest = digest;
        keys.generation += 1;
        drop(keys);
        self.verified
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clear();
        self.absent_kids
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clear();
        true
    }

    /// Fetches the remote JWKS once (a no-op for a file source) and installs it when usable;
    /// otherwise keeps the current keys, logs and counts the error. Returns whether it succeeded.
    pub async fn refresh_remote(&self) -> bool {
        let mut state = self.fetch.lock().await;
        self.fetch_locked(&mut state, "periodic").await
    }

    async fn fetch_locked(&self, state: &mut FetchState, trigger: &str) -> bool {
        let JwksSource::Remote(remote) = &self.config.jwks else {
            return true;
        };
        let result = match super::jwks_remote::fetch(remote).await {
            Ok(body) => parse_jwks(&body).map(|keys| (keys, sha256(&body))),
            Err(e) => Err(e.to_string()),
        };
        match result {
            Ok((by_kid, digest)) => {
                let n = by_kid.len();
                if self.install(by_kid, Some(digest)) {
                    tracing::info!(url = %remote.url, keys = n, trigger, "fetched a new JWKS");
                }
                state.failing = false;
                self.record(true, Some(n));
                true
            }
            Err(error) => {
                state.failing = true;
                tracing::error!(
                    url = %remote.url,
                    %error,
                    trigger,
                    keys = self.key_count(),
                    "JWKS refresh failed; keeping the previous keys"
                );
                self.record(false, None);
                false
            }
        }
    }

    /// For a remote source: the key ID `token` names when it is one the current set does not
    /// have and the token could be the cluster's (see [`Self::refresh_for_token`]); `None`
    /// otherwise. Cheap: no signature is checked.
    pub fn unknown_kid(&self, token: &str) -> Option<String> {
        let JwksSource::Remote(_) = &self.config.jwks else {
            return None;
        };
        if token.len() > MAX_TOKEN_LEN || check_header(token).is_err() {
            return None;
        }
        let header = jsonwebtoken::decode_header(token).ok()?;
        if !matches!(header.alg, Algorithm::RS256 | Algorithm::ES256) {
            return None;
        }
        let kid = header.kid?;
        if self.has_kid(&kid) || self.looked_for(&kid) || !self.plausible(token) {
            return None;
        }
        Some(kid)
    }

    /// Whether a forced refresh looked for `kid` less than [`ABSENT_KID_TTL`] ago and did not find
    /// it.
    fn looked_for(&self, kid: &str) -> bool {
        self.absent_kids
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get(kid)
            .is_some_and(|at| at.elapsed() < ABSENT_KID_TTL)
    }

    /// Whether the token's claims, unverified, are those of a token of the cluster: our issuer
    /// and audience, not expired, a service-account subject, and a signature part. Anyone can
    /// write such claims, but a token without them cannot be the cluster's, and must not cost a
    /// fetch.
    fn plausible(&self, token: &str) -> bool {
        use base64::Engine;
        #[derive(Deserialize)]
        struct Unverified {
            iss: String,
            aud: serde_json::Value,
            exp: i64,
            sub: String,
        }
        let mut parts = token.split('.');
        let (Some(_), Some(payload), Some(signature), None) =
            (parts.next(), parts.next(), parts.next(), parts.next())
        else {
            return false;
        };
        let Ok(json) = base64::engine::general_purpose::URL_SAFE_NO_PAD.decode(payload) else {
            return false;
        };
        let Ok(claims) = serde_json::from_slice::<Unverified>(&json) else {
            return false;
        };
        let audience = self.config.audience.as_str();
        let aud = match &claims.aud {
            serde_json::Value::String(a) => a == audience,
            serde_json::Value::Array(a) => a.iter().any(|a| a.as_str() == Some(audience)),
            _ => false,
        };
        !signature.is_empty()
            && claims.iss == self.config.issuer
            && aud
            && claims.exp > unix_now() - MAX_SKEW.as_secs() as i64
            && parse_sub(&claims.sub).is_some()
    }

    /// For a remote source: when `token` names a `kid` the current set does not have
    /// ([`Self::unknown_kid`]), refreshes the set at once, unless a forced refresh ran less than
    /// `min_forced_interval` ago (a flood of tokens with made-up kids costs at most one fetch per
    /// interval). Only a token whose claims could be the cluster's forces one, and a kid a forced
    /// refresh did not find forces none again for a minute. Callers then verify the token as
    /// usual, against the new set. Never fails: a bad token is refused by the verification.
    pub async fn refresh_for_token(&self, token: &str) {
        let JwksSource::Remote(remote) = &self.config.jwks else {
            return;
        };
        let Some(kid) = self.unknown_kid(token) else {
            return;
        };
        let mut state = self.fetch.lock().await;
        // A fetch that ran while this one waited may have brought the key, or looked for it.
        if self.has_kid(&kid) || self.looked_for(&kid) {
            return;
        }
        if state
            .last_forced
            .is_some_and(|at| at.elapsed() < remote.min_forced_interval)
        {
            tracing::debug!("token names an unknown kid; a forced JWKS refresh ran recently");
            return;
        }
        state.last_forced = Some(Instant::now());
        let fetched = self.fetch_locked(&mut state, "unknown_kid").await;
        if fetched && !self.has_kid(&kid) {
            let mut absent = self.absent_kids.lock().unwrap_or_else(|p| p.into_inner());
            if absent.len() >= ABSENT_KIDS_MAX {
                absent.retain(|_, at| at.elapsed() < ABSENT_KID_TTL);
                if absent.len() >= ABSENT_KIDS_MAX {
                    absent.clear();
                }
            }
            absent.insert(kid, Instant::now());
        }
    }

    /// Refreshes a remote JWKS every `refresh_every` (sooner, at most every 30 s, while fetches
    /// fail) until `shutdown`. Returns at once for a file source.
    pub async fn follow_remote(&self, mut shutdown: tokio::sync::watch::Receiver<bool>) {
        let JwksSource::Remote(remote) = &self.config.jwks else {
            return;
        };
        loop {
            let failing = self.fetch.lock().await.failing;
            let wait = if failing {
                remote.refresh_every.min(RETRY_AFTER_ERROR)
            } else {
                remote.refresh_every
            };
            tokio::select! {
                () = tokio::time::sleep(wait) => {}
                _ = shutdown.wait_for(|s| *s) => return,
            }
            self.refresh_remote().await;
        }
    }

    /// Verifies a token and returns the SPIFFE ID of its service account.
    pub fn authenticate(&self, token: &str) -> Result<SpiffeId, AuthError> {
        if token.len() > MAX_TOKEN_LEN {
            return Err(AuthError::unauthenticated(
                Reason::MalformedToken,
                "token is too large",
            ));
        }
        // Our own strict reading of the header comes first: `crit` is refused whatever else the
        // token holds (and before the cache, which only ever holds tokens that passed it).
        check_header(token)?;
        self.refresh_if_changed();
        let digest: [u8; 32] = {
            let d = aws_lc_rs::digest::digest(&aws_lc_rs::digest::SHA256, token.as_bytes());
            let mut out = [0u8; 32];
            out.copy_from_slice(d.as_ref());
            out
        };
        let cached = {
            let cache = self.verified.lock().unwrap_or_else(|p| p.into_inner());
            cache.get(&digest).and_then(|(id, at, exp)| {
                (at.elapsed() < CACHE_TTL && unix_now() < exp + MAX_SKEW.as_secs() as i64)
                    .then(|| id.clone())
            })
        };
        if let Some(id) = cached {
            // Authorization is never cached: the namespace allow-list may have changed.
            if let Some((ns, _)) = id.service_account() {
                self.check_namespace(ns)?;
            }
            return Ok(id);
        }
        let (id, end, generation) = self.verify_token(token)?;
        self.remember(digest, &id, end, generation);
        Ok(id)
    }

    /// Remembers a token (by `digest`) as verified for `id` until `end`, unless the key set was
    /// replaced since its key was read (`generation`): the replacement emptied the cache, and a
    /// key it removed must verify nothing more.
    fn remember(&self, digest: [u8; 32], id: &SpiffeId, end: i64, generation: u64) {
        let mut cache = self.verified.lock().unwrap_or_else(|p| p.into_inner());
        if self
            .keys
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .generation
            != generation
        {
            return;
        }
        if cache.len() >= CACHE_MAX {
            cache.retain(|_, (_, at, _)| at.elapsed() < CACHE_TTL);
            if cache.len() >= CACHE_MAX {
                cache.clear();
            }
        }
        cache.insert(digest, (id.clone(), Instant::now(), end));
    }

    /// Verifies a token the cache does not hold: its SPIFFE ID, until when it may be remembered,
    /// and the key set generation its key was read from.
    fn verify_token(&self, token: &str) -> Result<(SpiffeId, i64, u64), AuthError> {
        // Fixed messages here and below: jsonwebtoken's own quote the caller's text (an unknown
        // `alg` of 12 KiB, a claim of the wrong type) into the status and the audit line.
        let header = jsonwebtoken::decode_header(token).map_err(|e| {
            let what = match e.kind() {
                ErrorKind::Base64(_) => "token header: not base64url",
                ErrorKind::InvalidAlgorithmName => {
                    "token header: unknown alg (RS256 or ES256 are accepted)"
                }
                _ => "token header: not a JOSE header",
            };
            AuthError::unauthenticated(Reason::MalformedToken, what)
        })?;
        if !matches!(header.alg, Algorithm::RS256 | Algorithm::ES256) {
            return Err(AuthError::unauthenticated(
                Reason::TokenAlgorithm,
                format!(
                    "token algorithm {:?} is not accepted (RS256 or ES256)",
                    header.alg
                ),
            ));
        }
        let kid = header.kid.ok_or_else(|| {
            AuthError::unauthenticated(Reason::UnknownKey, "token header has no kid")
        })?;
        let (alg, key, generation) = {
            let keys = self.keys.read().unwrap_or_else(|p| p.into_inner());
            let (alg, key) = keys.by_kid.get(&kid).cloned().ok_or_else(|| {
                AuthError::unauthenticated(Reason::UnknownKey, "token kid is not in the JWKS")
            })?;
            (alg, key, keys.generation)
        };
        if alg != header.alg {
            return Err(AuthError::unauthenticated(
                Reason::TokenAlgorithm,
                "token algorithm does not match its key",
            ));
        }

        let mut validation = Validation::new(alg);
        validation.leeway = MAX_SKEW.as_secs();
        validation.validate_exp = true;
        validation.validate_nbf = true;
        validation.set_audience(&[&self.config.audience]);
        validation.set_issuer(&[&self.config.issuer]);
        validation.set_required_spec_claims(&["exp", "iss", "aud", "sub"]);
        let data = jsonwebtoken::decode::<Claims>(token, &key, &validation).map_err(|e| {
            let (reason, what) = match e.kind() {
                ErrorKind::ExpiredSignature => (Reason::TokenExpired, "token rejected: expired"),
                ErrorKind::ImmatureSignature => (
                    Reason::TokenNotYetValid,
                    "token rejected: not valid yet (nbf)",
                ),
                ErrorKind::InvalidAudience => (Reason::WrongAudience, "token rejected: wrong aud"),
                ErrorKind::InvalidIssuer => (Reason::WrongIssuer, "token rejected: wrong iss"),
                ErrorKind::InvalidSignature => (
                    Reason::BadSignature,
                    "token rejected: the signature does not verify",
                ),
                ErrorKind::InvalidAlgorithm => (
                    Reason::TokenAlgorithm,
                    "token rejected: algorithm does not match its key",
                ),
                ErrorKind::MissingRequiredClaim(_) => (
                    Reason::MalformedToken,
                    "token rejected: a required claim (exp, iss, aud, sub) is missing",
                ),
                _ => (Reason::MalformedToken, "token rejected: malformed claims"),
            };
            AuthError::unauthenticated(reason, what)
        })?;
        let claims = data.claims;

        let now = unix_now();
        let skew = MAX_SKEW.as_secs() as i64;
        // Without `iat` the token's lifetime cannot be known, and every token Kubernetes issues
        // has one.
        let Some(iat) = claims.iat else {
            return Err(AuthError::unauthenticated(
                Reason::MalformedToken,
                "token rejected: no iat (issued-at) claim",
            ));
        };
        if iat > now + skew {
            return Err(AuthError::unauthenticated(
                Reason::TokenNotYetValid,
                "token was issued in the future",
            ));
        }
        // A token Kubernetes extended to a year (a 3607 s request) was meant to end at
        // `warnafter`: the cap and the expiry are both checked against that.
        let warnafter = claims.kubernetes.as_ref().and_then(|k| k.warnafter);
        let end = warnafter.map_or(claims.exp, |w| w.min(claims.exp));
        let lifetime = end.saturating_sub(iat);
        let max = self.config.max_token_lifetime.as_secs();
        if lifetime > 0 && lifetime as u64 > max {
            return Err(AuthError::unauthenticated(
                Reason::TokenLifetime,
                // Only our own limit in the message: nothing the caller wrote is quoted back.
                format!(
                    "token rejected: it lives longer from iat to exp than the {max}s allowed \
                     (--max-token-lifetime); use a projected token with a shorter \
                     expirationSeconds"
                ),
            ));
        }
        if warnafter.is_some_and(|w| now > w.saturating_add(skew)) {
            return Err(AuthError::unauthenticated(
                Reason::TokenExpired,
                "token rejected: past its warnafter (an extended token the kubelet should have \
                 refreshed)",
            ));
        }
        let pod_bound = claims
            .kubernetes
            .as_ref()
            .and_then(|k| k.pod.as_ref())
            .is_some_and(|p| {
                p.name.as_deref().is_some_and(|n| !n.is_empty())
                    && p.uid.as_deref().is_some_and(|u| !u.is_empty())
            });
        if !pod_bound && !self.config.dangerous_accept_unbound_tokens {
            return Err(AuthError::unauthenticated(
                Reason::TokenNotPodBound,
                "token rejected: not bound to a pod (no kubernetes.io.pod name and uid); use a \
                 projected service-account token, not one from `kubectl create token`",
            ));
        }

        let (ns, sa) = parse_sub(&claims.sub).ok_or_else(|| {
            AuthError::unauthenticated(
                Reason::MalformedSubject,
                "token sub is not system:serviceaccount:<namespace>:<name>",
            )
        })?;
        if let Some(k) = &claims.kubernetes {
            let ns_claim = k.namespace.as_deref();
            let sa_claim = k.serviceaccount.as_ref().and_then(|s| s.name.as_deref());
            if ns_claim.is_some_and(|n| n != ns) || sa_claim.is_some_and(|n| n != sa) {
                return Err(AuthError::unauthenticated(
                    Reason::MalformedSubject,
                    "token sub disagrees with its kubernetes.io claims",
                ));
            }
        }
        let id = SpiffeId::for_service_account(&self.trust_domain, ns, sa).map_err(|_| {
            AuthError::unauthenticated(
                Reason::MalformedSubject,
                "token sub does not make a SPIFFE ID of this trust domain",
            )
        })?;
        self.check_namespace(ns)?;
        Ok((id, end, generation))
    }

    /// Fails with `PermissionDenied` when a namespace allow-list is set and `ns` is not on it.
    pub fn check_namespace(&self, ns: &str) -> Result<(), AuthError> {
        match &self.config.allowed_namespaces {
            Some(allowed) if !allowed.contains(ns) => Err(AuthError::permission_denied(
                Reason::NamespaceNotAllowed,
                format!("namespace {ns:?} is not allowed to get identities"),
            )),
            _ => Ok(()),
        }
    }

    fn refresh_if_changed(&self) {
        let JwksSource::File(path) = &self.config.jwks else {
            return;
        };
        {
            let keys = self.keys.read().unwrap_or_else(|p| p.into_inner());
            if keys.checked.elapsed() < RECHECK_EVERY {
                return;
            }
        }
        // This caller checks the file (one a second does); the others go on with the keys held,
        // as tokens are verified while the file is read: the lock is not held across the read.
        let known = {
            let mut keys = self.keys.write().unwrap_or_else(|p| p.into_inner());
            if keys.checked.elapsed() < RECHECK_EVERY {
                return;
            }
            keys.checked = Instant::now();
            keys.stamp
        };
        let stamp = file_stamp(path);
        if stamp.is_some() && stamp == known {
            return;
        }
        match load_jwks(path) {
            Ok((by_kid, stamp)) => {
                tracing::info!(path = %path.display(), keys = by_kid.len(), "reloaded JWKS");
                let n = by_kid.len();
                let mut keys = self.keys.write().unwrap_or_else(|p| p.into_inner());
                keys.by_kid = by_kid;
                keys.stamp = stamp;
                keys.generation += 1;
                drop(keys);
                // Tokens verified with the old keys must be verified again.
                self.verified
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .clear();
                self.record(true, Some(n));
            }
            Err(error) => {
                // Remember the stamp so a broken file is reported once, not on every request.
                self.keys.write().unwrap_or_else(|p| p.into_inner()).stamp = stamp;
                tracing::error!(%error, "JWKS reload failed; keeping the previous keys");
                self.record(false, None);
            }
        }
    }
}

fn file_stamp(path: &Path) -> Option<(SystemTime, u64)> {
    let meta = std::fs::metadata(path).ok()?;
    Some((meta.modified().ok()?, meta.len()))
}

type KeyMap = HashMap<String, (Algorithm, DecodingKey)>;

fn load_jwks(path: &Path) -> Result<(KeyMap, Option<(SystemTime, u64)>), JwksError> {
    let stamp = file_stamp(path);
    // A regular file of at most what a fetched JWKS may be: a FIFO or a device in its place is
    // refused at once (this runs on a request's task), not waited on or read for ever.
    let max = super::jwks_remote::MAX_BODY as u64;
    let bytes = crate::ca_dir::read_file(path, max).map_err(|source| JwksError::Io {
        path: path.to_owned(),
        source,
    })?;
    let by_kid = parse_jwks(&bytes).map_err(|reason| JwksError::Invalid {
        path: path.to_owned(),
        reason,
    })?;
    Ok((by_kid, stamp))
}

fn sha256(bytes: &[u8]) -> [u8; 32] {
    let d = aws_lc_rs::digest::digest(&aws_lc_rs::digest::SHA256, bytes);
    let mut out = [0u8; 32];
    out.copy_from_slice(d.as_ref());
    out
}

/// The usable keys of a JWKS document (RS256 or ES256 signing keys with a `kid`); fails on a
/// document that is not a JWKS, a listed key that does not parse, or no usable key.
fn parse_jwks(bytes: &[u8]) -> Result<KeyMap, String> {
    let set: JwkSet = serde_json::from_slice(bytes).map_err(|e| e.to_string())?;
    let mut by_kid = HashMap::new();
    for jwk in &set.keys {
        let Some(kid) = jwk.common.key_id.clone() else {
            continue;
        };
        if matches!(jwk.common.public_key_use, Some(ref u) if *u != PublicKeyUse::Signature) {
            continue;
        }
        let alg = match &jwk.algorithm {
            AlgorithmParameters::RSA(_) => Algorithm::RS256,
            AlgorithmParameters::EllipticCurve(ec) if ec.curve == EllipticCurve::P256 => {
                Algorithm::ES256
            }
            _ => continue,
        };
        let declared = jwk.common.key_algorithm;
        let agrees = match declared {
            None => true,
            Some(KeyAlgorithm::RS256) => alg == Algorithm::RS256,
            Some(KeyAlgorithm::ES256) => alg == Algorithm::ES256,
            Some(_) => false,
        };
        if !agrees {
            continue;
        }
        let key = DecodingKey::from_jwk(jwk).map_err(|e| format!("key {kid}: {e}"))?;
        by_kid.insert(kid, (alg, key));
    }
    if by_kid.is_empty() {
        return Err("no usable key (RS256 or ES256 with a kid)".to_owned());
    }
    Ok(by_kid)
}

/// Reads the JOSE header ourselves, strictly, before anything else looks at the token: base64url
/// without padding, one JSON object with unique member names (RFC 7515 §4 allows refusing
/// duplicates), and no `crit` member with any value. `crit` lists extensions the recipient must
/// understand or refuse the token (RFC 7515 §4.1.11); we understand none. jsonwebtoken's `Header`
/// reads `crit` only as a list of strings and never acts on it, so it alone would let
/// `"crit": null` through and call `"crit": "x"` merely malformed.
fn check_header(token: &str) -> Result<(), AuthError> {
    use base64::Engine;
    let malformed = |what: &str| {
        AuthError::unauthenticated(Reason::MalformedToken, format!("token header: {what}"))
    };
    let (encoded, _) = token
        .split_once('.')
        .ok_or_else(|| malformed("not a JWS (no '.')"))?;
    let json = base64::engine::general_purpose::URL_SAFE_NO_PAD
        .decode(encoded)
        .map_err(|_| malformed("not base64url"))?;
    // Fixed messages: serde_json's own may quote the caller's text.
    let header: HeaderMembers = serde_json::from_slice(&json).map_err(|e| {
        malformed(if e.is_data() {
            "not a JSON object with unique member names"
        } else {
            "not JSON"
        })
    })?;
    if header.crit {
        return Err(AuthError::unauthenticated(
            Reason::CritHeader,
            "token header has a crit member (RFC 7515 §4.1.11): this CA understands no JWS \
             extension, so the token is refused",
        ));
    }
    Ok(())
}

/// What [`check_header`] needs from the header: its member names, each at most once.
struct HeaderMembers {
    crit: bool,
}

impl<'de> Deserialize<'de> for HeaderMembers {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct Members;
        impl<'de> serde::de::Visitor<'de> for Members {
            type Value = HeaderMembers;
            fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str("a JSON object")
            }
            fn visit_map<A: serde::de::MapAccess<'de>>(
                self,
                mut map: A,
            ) -> Result<HeaderMembers, A::Error> {
                // Names as JSON decodes them: "cr\u0069t" is "crit".
                let mut names = BTreeSet::new();
                while let Some(name) = map.next_key::<String>()? {
                    map.next_value::<serde::de::IgnoredAny>()?;
                    if !names.insert(name) {
                        // The name is the caller's text: not echoed.
                        return Err(serde::de::Error::custom("duplicate member name"));
                    }
                }
                Ok(HeaderMembers {
                    crit: names.contains("crit"),
                })
            }
        }
        d.deserialize_map(Members)
    }
}

/// `system:serviceaccount:<ns>:<sa>` with Kubernetes name rules for both parts.
fn parse_sub(sub: &str) -> Option<(&str, &str)> {
    let rest = sub.strip_prefix("system:serviceaccount:")?;
    let (ns, sa) = rest.split_once(':')?;
    (is_dns_label(ns) && is_dns_subdomain(sa)).then_some((ns, sa))
}

fn is_dns_label(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 63
        && s.bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
        && !s.starts_with('-')
        && !s.ends_with('-')
}

fn is_dns_subdomain(s: &str) -> bool {
    !s.is_empty() && s.len() <= 253 && s.split('.').all(is_dns_label)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sub_parsing() {
        assert_eq!(
            parse_sub("system:serviceaccount:shop:frontend"),
            Some(("shop", "frontend"))
        );
        assert_eq!(
            parse_sub("system:serviceaccount:shop:front.end-1"),
            Some(("shop", "front.end-1"))
        );
        for bad in [
            "system:serviceaccount:shop",
            "system:serviceaccount::x",
            "system:serviceaccount:shop:",
            "system:serviceaccount:shop:a:b",
            "system:serviceaccount:Shop:a",
            "system:serviceaccount:shop:..",
            "system:serviceaccount:-x:a",
            "system:node:x",
            "frontend",
            "",
        ] {
            assert_eq!(parse_sub(bad), None, "{bad}");
        }
    }

    /// A JWKS with one ES256 key (kid `k1`), and tokens it signs with any header text.
    struct Issuer {
        key: aws_lc_rs::signature::EcdsaKeyPair,
        dir: tempfile::TempDir,
    }

    impl Issuer {
        fn new() -> Self {
            use aws_lc_rs::signature::{ECDSA_P256_SHA256_FIXED_SIGNING, EcdsaKeyPair};
            Self {
                key: EcdsaKeyPair::generate(&ECDSA_P256_SHA256_FIXED_SIGNING).unwrap(),
                dir: tempfile::tempdir().unwrap(),
            }
        }

        fn authenticator(&self) -> JwtAuthenticator {
            use aws_lc_rs::signature::KeyPair;
            use base64::Engine;
            let b64 = |b: &[u8]| base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(b);
            let point = self.key.public_key().as_ref();
            let jwks = serde_json::json!({ "keys": [{
                "use": "sig", "kty": "EC", "kid": "k1", "alg": "ES256", "crv": "P-256",
                "x": b64(&point[1..33]), "y": b64(&point[33..65]),
            }]});
            let path = self.dir.path().join("jwks.json");
            std::fs::write(&path, jwks.to_string()).unwrap();
            self.authenticator_with(false)
        }

        fn authenticator_with(&self, dangerous_accept_unbound_tokens: bool) -> JwtAuthenticator {
            let path = self.dir.path().join("jwks.json");
            JwtAuthenticator::new(
                JwtConfig {
                    jwks: JwksSource::File(path),
                    issuer: "https://issuer.test".into(),
                    audience: "meshid-ca".into(),
                    allowed_namespaces: None,
                    max_token_lifetime: JwtConfig::DEFAULT_MAX_TOKEN_LIFETIME,
                    dangerous_accept_unbound_tokens,
                    token_review: false,
                },
                TrustDomain::new("cluster.local").unwrap(),
            )
            .unwrap()
        }

        /// Valid claims for shop/frontend, shaped as a pod's projected token.
        fn claims() -> serde_json::Value {
            let now = unix_now();
            serde_json::json!({
                "aud": ["meshid-ca"], "iss": "https://issuer.test",
                "exp": now + 600, "iat": now, "nbf": now,
                "sub": "system:serviceaccount:shop:frontend",
                "kubernetes.io": {
                    "namespace": "shop",
                    "pod": { "name": "frontend-1", "uid": "9a8b7c6d-5e4f-4a3b-8c2d-1e0f9a8b7c6d" },
                    "serviceaccount": { "name": "frontend", "uid": "1f2e3d4c-5b6a-4978-8695-a4b3c2d1e0f9" },
                },
            })
        }

        /// A token with valid claims for shop/frontend, `header` exactly as given, signed.
        fn sign(&self, header: &str) -> String {
            self.sign_claims(header, &Self::claims())
        }

        /// A token with `claims` and `header` exactly as given, signed.
        fn sign_claims(&self, header: &str, claims: &serde_json::Value) -> String {
            use base64::Engine;
            let b64 = |b: &[u8]| base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(b);
            let message = format!(
                "{}.{}",
                b64(header.as_bytes()),
                b64(claims.to_string().as_bytes())
            );
            let sig = self
                .key
                .sign(&aws_lc_rs::rand::SystemRandom::new(), message.as_bytes())
                .unwrap();
            format!("{message}.{}", b64(sig.as_ref()))
        }
    }

    /// A token whose signature was checked with a key of a set replaced meanwhile (a JWKS refresh
    /// between reading the key and remembering the token) is not remembered: the replacement
    /// emptied the cache, and the token is verified again, under the new set, at its next use.
    #[test]
    fn a_token_verified_with_a_key_replaced_meanwhile_is_not_remembered() {
        let issuer = Issuer::new();
        let auth = issuer.authenticator();
        let token = issuer.sign(r#"{"alg":"ES256","kid":"k1"}"#);
        let (id, end, generation) = auth.verify_token(&token).unwrap();
        // The set is replaced by one without `k1` before the token is remembered.
        assert!(auth.install(KeyMap::new(), Some([7; 32])));
        auth.remember([1; 32], &id, end, generation);
        assert!(auth.verified.lock().unwrap().is_empty());
        // Remembered when nothing changed in between.
        let (id, end, generation) = (id, end, auth.keys.read().unwrap().generation);
        auth.remember([1; 32], &id, end, generation);
        assert_eq!(auth.verified.lock().unwrap().len(), 1);
    }

    /// A FIFO or an endless device in place of the JWKS file is refused at once, at start and on
    /// a change (the keys held stay): never a request blocked on it, or one reading it for ever.
    #[test]
    fn a_jwks_file_replaced_by_a_fifo_or_a_device_is_refused_at_once() {
        use crate::ca_dir::hostile_files::{endless, fifo, within};
        let issuer = Issuer::new();
        let auth = std::sync::Arc::new(issuer.authenticator());
        let token = issuer.sign(r#"{"alg":"ES256","kid":"k1","typ":"JWT"}"#);
        let path = issuer.dir.path().join("jwks.json");
        for (kind, hostile) in [("fifo", fifo as fn(&Path)), ("/dev/zero", endless)] {
            std::fs::remove_file(&path).unwrap();
            hostile(&path);
            // Due for a check of the file.
            auth.keys.write().unwrap().checked =
                Instant::now().checked_sub(RECHECK_EVERY * 2).unwrap();
            let (a, t) = (auth.clone(), token.clone());
            let id = within(kind, move || a.authenticate(&t));
            assert_eq!(
                id.unwrap().as_str(),
                "spiffe://cluster.local/ns/shop/sa/frontend",
                "{kind}: the keys held stay"
            );
            let (p, config) = (path.clone(), auth.config.clone());
            let err = within(kind, move || {
                load_jwks(&p).map(|_| ()).unwrap_err().to_string()
            });
            assert!(
                err.contains("jwks.json") && err.contains("not a regular file"),
                "{kind}: {err}"
            );
            let err = within(kind, move || {
                JwtAuthenticator::new(config, TrustDomain::new("cluster.local").unwrap())
                    .map(|_| ())
                    .unwrap_err()
                    .to_string()
            });
            assert!(err.contains("not a regular file"), "{kind}: {err}");
        }
    }

    #[test]
    fn a_crit_header_member_is_refused_whatever_its_value() {
        let issuer = Issuer::new();
        let auth = issuer.authenticator();
        let valid = issuer.sign(r#"{"alg":"ES256","kid":"k1","typ":"JWT"}"#);
        assert_eq!(
            auth.authenticate(&valid).unwrap().as_str(),
            "spiffe://cluster.local/ns/shop/sa/frontend"
        );
        for header in [
            r#"{"alg":"ES256","kid":"k1","crit":["exp"],"exp":1}"#,
            r#"{"alg":"ES256","kid":"k1","crit":[]}"#,
            r#"{"alg":"ES256","kid":"k1","crit":"exp"}"#,
            r#"{"alg":"ES256","kid":"k1","crit":null}"#,
            r#"{"alg":"ES256","kid":"k1","crit":{"b64":false}}"#,
            r#"{"alg":"ES256","kid":"k1","crit":0}"#,
            // The name escaped: JSON makes it "crit".
            r#"{"alg":"ES256","kid":"k1","cr\u0069t":["exp"]}"#,
            // Checked before the key and the algorithm.
            r#"{"crit":["b64"],"b64":false,"alg":"HS256","kid":"nope"}"#,
        ] {
            let token = issuer.sign(header);
            let err = auth.authenticate(&token).unwrap_err();
            assert_eq!(err.reason, Reason::CritHeader, "{header}: {err:?}");
            assert_eq!(err.reason.as_str(), "crit_header");
            assert!(!err.denied, "{header}: unauthenticated, not denied");
            assert!(err.message.contains("crit"), "{header}: {}", err.message);
        }
        // jsonwebtoken's own header parsing lets these through: only our check stops them.
        for header in [
            r#"{"alg":"ES256","kid":"k1","crit":null}"#,
            r#"{"alg":"ES256","kid":"k1","crit":["exp"]}"#,
        ] {
            assert!(jsonwebtoken::decode_header(issuer.sign(header)).is_ok());
        }
    }

    #[test]
    fn the_header_is_read_strictly() {
        let issuer = Issuer::new();
        let auth = issuer.authenticator();
        for (name, token) in [
            (
                "duplicate member",
                issuer.sign(r#"{"alg":"ES256","kid":"k1","kid":"k1"}"#),
            ),
            ("not an object", issuer.sign(r#"["ES256","k1"]"#)),
            (
                "trailing text",
                issuer.sign(r#"{"alg":"ES256","kid":"k1"} x"#),
            ),
            ("no dot", "eyJhbGciOiJFUzI1NiJ9".to_owned()),
            ("padded base64", {
                let t = issuer.sign(r#"{"alg":"ES256","kid":"k1"}"#);
                let (h, rest) = t.split_once('.').unwrap();
                format!("{h}=.{rest}")
            }),
        ] {
            let err = auth.authenticate(&token).unwrap_err();
            assert_eq!(err.reason, Reason::MalformedToken, "{name}: {err:?}");
        }
    }

    /// What a token may claim about its own life and binding: each case changes the valid claims
    /// one way and names the reason it must be refused with (or `None`: issued).
    #[test]
    fn token_lifetime_and_pod_binding() {
        let issuer = Issuer::new();
        let auth = issuer.authenticator();
        let header = r#"{"alg":"ES256","kid":"k1"}"#;
        let now = unix_now();
        let year = 365 * 24 * 3600;
        type Edit = fn(&mut serde_json::Value, i64);
        let cases: &[(&str, Edit, Option<Reason>)] = &[
            ("as projected", |_, _| {}, None),
            (
                "10 years from iat to exp",
                |c, now| c["exp"] = serde_json::json!(now + 10 * 365 * 24 * 3600),
                Some(Reason::TokenLifetime),
            ),
            (
                "48h and a minute from iat to exp",
                |c, now| c["exp"] = serde_json::json!(now + 48 * 3600 + 60),
                Some(Reason::TokenLifetime),
            ),
            (
                "48h from iat to exp",
                |c, now| c["exp"] = serde_json::json!(now + 48 * 3600),
                None,
            ),
            (
                "issued long ago with a far exp",
                |c, now| c["iat"] = serde_json::json!(now - 3 * 24 * 3600),
                Some(Reason::TokenLifetime),
            ),
            (
                "exp before iat",
                |c, now| c["iat"] = serde_json::json!(now + 700),
                Some(Reason::TokenNotYetValid),
            ),
            (
                "no iat",
                |c, _| {
                    c.as_object_mut().unwrap().remove("iat");
                },
                Some(Reason::MalformedToken),
            ),
            (
                "no pod claim",
                |c, _| {
                    c["kubernetes.io"].as_object_mut().unwrap().remove("pod");
                },
                Some(Reason::TokenNotPodBound),
            ),
            (
                "pod claim without a uid",
                |c, _| c["kubernetes.io"]["pod"] = serde_json::json!({ "name": "frontend-1" }),
                Some(Reason::TokenNotPodBound),
            ),
            (
                "no kubernetes.io claim",
                |c, _| {
                    c.as_object_mut().unwrap().remove("kubernetes.io");
                },
                Some(Reason::TokenNotPodBound),
            ),
            (
                "extended by Kubernetes to a year (3607 s asked), within warnafter",
                |c, now| {
                    c["exp"] = serde_json::json!(now + 365 * 24 * 3600);
                    c["kubernetes.io"]["warnafter"] = serde_json::json!(now + 3607);
                },
                None,
            ),
            (
                "extended by Kubernetes to a year, past warnafter",
                |c, now| {
                    c["iat"] = serde_json::json!(now - 4000);
                    c["nbf"] = serde_json::json!(now - 4000);
                    c["exp"] = serde_json::json!(now - 4000 + 365 * 24 * 3600);
                    c["kubernetes.io"]["warnafter"] = serde_json::json!(now - 4000 + 3607);
                },
                Some(Reason::TokenExpired),
            ),
        ];
        for (name, edit, expected) in cases {
            let mut claims = Issuer::claims();
            edit(&mut claims, now);
            let token = issuer.sign_claims(header, &claims);
            match (auth.authenticate(&token), expected) {
                (Ok(_), None) => {}
                (Err(e), Some(reason)) => {
                    assert_eq!(e.reason, *reason, "{name}: {e:?}");
                    assert!(!e.denied, "{name}: unauthenticated, not denied");
                }
                (got, _) => panic!("{name}: expected {expected:?}, got {got:?}"),
            }
        }

        // The opt-out accepts a token from `kubectl create token` (no pod), still capped.
        let unbound = issuer.authenticator_with(true);
        let mut claims = Issuer::claims();
        claims["kubernetes.io"]
            .as_object_mut()
            .unwrap()
            .remove("pod");
        assert!(
            unbound
                .authenticate(&issuer.sign_claims(header, &claims))
                .is_ok()
        );
        claims["exp"] = serde_json::json!(now + year);
        let err = unbound
            .authenticate(&issuer.sign_claims(header, &claims))
            .unwrap_err();
        assert_eq!(err.reason, Reason::TokenLifetime);
        assert!(
            err.message.contains("--max-token-lifetime"),
            "{}",
            err.message
        );
    }
}
