//! Asking the API server whether it still takes a service-account token (`--token-review`): a
//! `TokenReview` (`POST /apis/authentication.k8s.io/v1/tokenreviews`) on the host the issuer's keys
//! come from, with the CA's own token and the cluster CA bundle of the JWKS fetch. The signature
//! and claims are checked by the CA first ([`super::jwt`]); the review adds what only the API server
//! knows: that the pod the token is bound to still exists (a deleted pod's token stops verifying
//! there at once, not at its `exp`), and that the token was not otherwise invalidated. The same
//! check SPIRE's `k8s_psat` attestor and Istio's CA make.
//!
//! An answer is remembered for a few seconds per token ([`REMEMBERED`]), a token is asked about once
//! at a time (concurrent calls with it wait for that answer), an identity has at most
//! [`MAX_IN_FLIGHT_PER_IDENTITY`] reviews in flight, and few run at once ([`MAX_IN_FLIGHT`]): a
//! holder of a valid token that retries, or sends many calls at once, cannot turn the CA into a
//! flood of requests at the API server, nor take every review slot from other workloads. When the
//! API server cannot answer, nothing is decided: the caller is answered `Unavailable` and tries
//! again.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use meshid_identity::SpiffeId;
use serde::Deserialize;

use super::jwks_remote::{self, RemoteJwks, Target};
use super::{AuthError, Reason};

/// The path of the `TokenReview` API.
pub const PATH: &str = "/apis/authentication.k8s.io/v1/tokenreviews";
/// How long one review may take, connection included.
const TIMEOUT: Duration = Duration::from_secs(5);
/// How long an answer (taken or refused) is remembered for a token.
pub const REMEMBERED: Duration = Duration::from_secs(5);
/// The most answers remembered; past it the expired ones are dropped, then all.
const REMEMBERED_MAX: usize = 4_096;
/// The most reviews in flight at once; past it a caller is answered `Unavailable`.
pub const MAX_IN_FLIGHT: usize = 16;
/// The most reviews in flight at once for one identity (of different tokens: one token is asked
/// about once at a time); past it a caller is answered `Unavailable`. A pod holds one or two
/// valid tokens at a time (kubelet rotates them); a namespace's many pods of one service account
/// share this: past it a pod is answered `Unavailable` and tries again (its sidecar backs off), and
/// a token reviewed once is remembered for [`REMEMBERED`].
pub const MAX_IN_FLIGHT_PER_IDENTITY: usize = 2;
/// The most of the API server's `status.error` repeated to the caller.
const MAX_ERROR_CHARS: usize = 200;

/// An answer about a token (by its SHA-256), and when it came.
type Remembered = (Result<(), AuthError>, Instant);

/// Reviews tokens at the API server.
pub struct TokenReviewer {
    /// Where and how: the JWKS fetch's URL (its host), token and CA bundle.
    remote: RemoteJwks,
    /// The audience the CA takes tokens for: the review asks for it.
    audience: String,
    remembered: Mutex<HashMap<[u8; 32], Remembered>>,
    in_flight: tokio::sync::Semaphore,
    /// The tokens under review now, each with the channel its answer comes on, and the reviews in
    /// flight per identity.
    asking: Mutex<Asking>,
}

/// Reviews under way.
#[derive(Default)]
struct Asking {
    tokens: HashMap<[u8; 32], Answered>,
    identities: HashMap<String, usize>,
}

/// Where the answer to a review under way comes: `None` until it does (the sender dropped
/// unanswered, if the asking call was cancelled).
type Answered = tokio::sync::watch::Receiver<Option<Result<(), AuthError>>>;

/// A review this call asks: on drop, no longer under way (answered or not).
struct Asked<'a> {
    reviewer: &'a TokenReviewer,
    digest: [u8; 32],
    identity: String,
    answer: tokio::sync::watch::Sender<Option<Result<(), AuthError>>>,
}

impl Drop for Asked<'_> {
    fn drop(&mut self) {
        let mut asking = self.reviewer.lock_asking();
        asking.tokens.remove(&self.digest);
        if let Some(n) = asking.identities.get_mut(&self.identity) {
            *n -= 1;
            if *n == 0 {
                asking.identities.remove(&self.identity);
            }
        }
    }
}

/// What a call about a token does: ask, wait for the review under way, or neither.
enum Turn<'a> {
    Ask(Asked<'a>),
    Wait(Answered),
    Busy(String),
}

impl TokenReviewer {
    /// Reviews at the host of `remote.url`, for tokens of `audience`.
    pub fn new(remote: RemoteJwks, audience: impl Into<String>) -> Result<Self, String> {
        let target = Target::parse(&remote.url)?;
        let remote = RemoteJwks {
            url: format!("https://{}{PATH}", target.authority),
            ..remote
        };
        Ok(Self {
            remote,
            audience: audience.into(),
            remembered: Mutex::default(),
            in_flight: tokio::sync::Semaphore::new(MAX_IN_FLIGHT),
            asking: Mutex::default(),
        })
    }

    fn lock_asking(&self) -> std::sync::MutexGuard<'_, Asking> {
        self.asking.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Whether this call asks about the token (`digest`, of `id`), waits for the review of it
    /// under way, or is turned away: its identity has [`MAX_IN_FLIGHT_PER_IDENTITY`] reviews in
    /// flight already.
    fn turn(&self, digest: [u8; 32], id: &SpiffeId) -> Turn<'_> {
        let mut asking = self.lock_asking();
        if let Some(answer) = asking.tokens.get(&digest) {
            return Turn::Wait(answer.clone());
        }
        let identity = id.to_string();
        let n = asking.identities.entry(identity.clone()).or_default();
        if *n >= MAX_IN_FLIGHT_PER_IDENTITY {
            return Turn::Busy(format!(
                "the CA is asking the API server about {MAX_IN_FLIGHT_PER_IDENTITY} tokens of \
                 {identity} already; try again"
            ));
        }
        *n += 1;
        let (answer, answered) = tokio::sync::watch::channel(None);
        asking.tokens.insert(digest, answered);
        Turn::Ask(Asked {
            reviewer: self,
            digest,
            identity,
            answer,
        })
    }

    /// The review's URL.
    pub fn url(&self) -> &str {
        &self.remote.url
    }

    /// `Ok` when the API server takes `token` (already verified by the CA as `id`'s) as the
    /// service account `id` names. A refusal is `Unauthenticated`; no answer is `Unavailable`.
    pub async fn review(&self, token: &str, id: &SpiffeId) -> Result<(), AuthError> {
        let digest = digest(token);
        if let Some(answer) = self.recall(&digest) {
            return answer;
        }
        let asked = match self.turn(digest, id) {
            Turn::Ask(asked) => asked,
            Turn::Wait(mut answered) => {
                // The same token's review, asked by another call: its answer is this one's. (A
                // token is one identity's: the CA verified it as `id`'s before asking.)
                let answer = answered.wait_for(Option::is_some).await;
                return match answer.as_deref() {
                    Ok(Some(answer)) => answer.clone(),
                    _ => Err(AuthError::unavailable(
                        Reason::TokenReviewUnavailable,
                        "the review of this token under way ended without an answer; try again",
                    )),
                };
            }
            Turn::Busy(why) => {
                return Err(AuthError::unavailable(Reason::TokenReviewUnavailable, why));
            }
        };
        let answer = self.ask(token, id, digest).await;
        asked.answer.send_replace(Some(answer.clone()));
        answer
    }

    /// [`Self::review`]'s question to the API server, for this call alone.
    async fn ask(&self, token: &str, id: &SpiffeId, digest: [u8; 32]) -> Result<(), AuthError> {
        let Ok(_permit) = self.in_flight.try_acquire() else {
            return Err(AuthError::unavailable(
                Reason::TokenReviewUnavailable,
                format!(
                    "the CA is asking the API server about {MAX_IN_FLIGHT} tokens already; try again"
                ),
            ));
        };
        let body = serde_json::json!({
            "apiVersion": "authentication.k8s.io/v1",
            "kind": "TokenReview",
            "spec": { "token": token, "audiences": [self.audience] },
        });
        let remote = RemoteJwks {
            request_timeout: TIMEOUT.min(self.remote.request_timeout),
            ..self.remote.clone()
        };
        let asked = Instant::now();
        let answer = match jwks_remote::post_json(&remote, body.to_string().into()).await {
            Ok(text) => judge(&text, id),
            Err(e) => Err(AuthError::unavailable(
                Reason::TokenReviewUnavailable,
                format!("cannot ask the API server whether it takes the token (TokenReview): {e}"),
            )),
        };
        // Not knowing is not remembered: the next call asks again.
        if answer.as_ref().is_ok() || answer.as_ref().is_err_and(|e| !e.unavailable) {
            self.remember(digest, answer.clone(), asked);
        }
        answer
    }

    fn recall(&self, digest: &[u8; 32]) -> Option<Result<(), AuthError>> {
        let remembered = self.remembered.lock().unwrap_or_else(|p| p.into_inner());
        remembered
            .get(digest)
            .filter(|(_, at)| at.elapsed() < REMEMBERED)
            .map(|(answer, _)| answer.clone())
    }

    /// Remembers the answer to a review asked at `asked`, for [`REMEMBERED`] from then (not
    /// from when it came: a slow answer is as old as the question), unless an answer to a later
    /// question is remembered already: a slow "accepted" asked before the pod was deleted must not
    /// replace the refusal asked after.
    fn remember(&self, digest: [u8; 32], answer: Result<(), AuthError>, asked: Instant) {
        let mut remembered = self.remembered.lock().unwrap_or_else(|p| p.into_inner());
        if remembered.get(&digest).is_some_and(|(_, at)| *at > asked) {
            return;
        }
        if remembered.len() >= REMEMBERED_MAX {
            remembered.retain(|_, (_, at)| at.elapsed() < REMEMBERED);
            if remembered.len() >= REMEMBERED_MAX {
                remembered.clear();
            }
        }
        remembered.insert(digest, (answer, asked));
    }
}

fn digest(token: &str) -> [u8; 32] {
    let d = aws_lc_rs::digest::digest(&aws_lc_rs::digest::SHA256, token.as_bytes());
    let mut out = [0u8; 32];
    out.copy_from_slice(d.as_ref());
    out
}

#[derive(Deserialize)]
struct Review {
    kind: Option<String>,
    status: Option<ReviewStatus>,
}

#[derive(Deserialize)]
struct ReviewStatus {
    #[serde(default)]
    authenticated: bool,
    #[serde(default)]
    error: Option<String>,
    #[serde(default)]
    user: Option<ReviewUser>,
}

#[derive(Deserialize)]
struct ReviewUser {
    #[serde(default)]
    username: Option<String>,
}

/// What the API server's answer `text` says of a token the CA verified as `id`'s.
fn judge(text: &[u8], id: &SpiffeId) -> Result<(), AuthError> {
    let unreadable = |what: &str| {
        AuthError::unavailable(
            Reason::TokenReviewUnavailable,
            format!("the API server's TokenReview answer {what}"),
        )
    };
    let review: Review =
        serde_json::from_slice(text).map_err(|_| unreadable("is not a TokenReview"))?;
    if review.kind.as_deref() != Some("TokenReview") {
        return Err(unreadable("is not a TokenReview"));
    }
    let status = review.status.ok_or_else(|| unreadable("has no status"))?;
    if !status.authenticated {
        let why: String = status
            .error
            .as_deref()
            .unwrap_or("no reason given")
            .chars()
            .filter(|c| !c.is_control())
            .take(MAX_ERROR_CHARS)
            .collect();
        return Err(AuthError::unauthenticated(
            Reason::TokenReviewRefused,
            format!(
                "token rejected: the API server no longer takes it (its pod deleted, or the token \
                 invalidated): {why}"
            ),
        ));
    }
    // The API server speaks of the token's service account: it must be the one the CA read.
    let (ns, sa) = id
        .service_account()
        .ok_or_else(|| unreadable("is about an identity that names no service account"))?;
    let expected = format!("system:serviceaccount:{ns}:{sa}");
    let username = status.user.and_then(|u| u.username).unwrap_or_default();
    if username != expected {
        return Err(AuthError::unauthenticated(
            Reason::TokenReviewRefused,
            format!(
                "token rejected: the API server takes it as {:?}, not {expected:?}",
                username.chars().take(MAX_ERROR_CHARS).collect::<String>()
            ),
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use meshid_identity::TrustDomain;

    fn id() -> SpiffeId {
        SpiffeId::for_service_account(&TrustDomain::new("cluster.local").unwrap(), "shop", "web")
            .unwrap()
    }

    /// An answer is remembered from when it was asked, and a slow answer to an earlier
    /// question (the token taken, asked before the pod was deleted) does not replace the answer
    /// to a later one (refused, asked after).
    #[test]
    fn a_slow_answer_to_an_earlier_question_does_not_replace_a_later_one() {
        let r = TokenReviewer::new(
            RemoteJwks::new("https://kubernetes.default.svc/openid/v1/jwks"),
            "meshid-ca",
        )
        .unwrap();
        let refused = AuthError::unauthenticated(Reason::TokenReviewRefused, "pod not found");
        let early = Instant::now();
        let later = early + Duration::from_millis(10);
        r.remember([1; 32], Err(refused.clone()), later);
        r.remember([1; 32], Ok(()), early);
        assert_eq!(r.recall(&[1; 32]), Some(Err(refused.clone())));
        // A later answer does replace it.
        r.remember([1; 32], Ok(()), later + Duration::from_millis(10));
        assert_eq!(r.recall(&[1; 32]), Some(Ok(())));
        // Remembered from when it was asked: one asked REMEMBERED ago is not recalled.
        let Some(long_ago) = Instant::now().checked_sub(REMEMBERED) else {
            return;
        };
        r.remember([2; 32], Ok(()), long_ago);
        assert_eq!(r.recall(&[2; 32]), None);
    }

    #[test]
    fn answers_are_judged() {
        let taken = br#"{"kind":"TokenReview","apiVersion":"authentication.k8s.io/v1","status":{"authenticated":true,"user":{"username":"system:serviceaccount:shop:web","extra":{"authentication.kubernetes.io/pod-uid":["9a8b"]}},"audiences":["meshid-ca"]}}"#;
        assert_eq!(judge(taken, &id()), Ok(()));

        let gone = br#"{"kind":"TokenReview","status":{"authenticated":false,"error":"[invalid bearer token, pod \"web-1\" not found]\n"}}"#;
        let e = judge(gone, &id()).unwrap_err();
        assert_eq!(e.reason, Reason::TokenReviewRefused);
        assert_eq!(e.code(), tonic::Code::Unauthenticated);
        assert!(e.message.contains("not found"), "{}", e.message);
        assert!(!e.message.contains('\n'));

        let other = br#"{"kind":"TokenReview","status":{"authenticated":true,"user":{"username":"system:serviceaccount:shop:admin"}}}"#;
        let e = judge(other, &id()).unwrap_err();
        assert_eq!(e.reason, Reason::TokenReviewRefused);

        // Not an answer: nothing decided, the caller tries again.
        for text in [
            &b"<html>"[..],
            br#"{"kind":"Status","status":"Failure","code":403}"#,
            br#"{"kind":"TokenReview"}"#,
            br#"{"kind":"TokenReview","status":"yes"}"#,
        ] {
            let e = judge(text, &id()).unwrap_err();
            assert!(e.unavailable, "{}", String::from_utf8_lossy(text));
            assert_eq!(e.code(), tonic::Code::Unavailable);
        }
        // No username at all is not the service account's.
        let anonymous = br#"{"kind":"TokenReview","status":{"authenticated":true}}"#;
        assert_eq!(
            judge(anonymous, &id()).unwrap_err().reason,
            Reason::TokenReviewRefused
        );
    }

    #[test]
    fn the_review_goes_to_the_host_of_the_keys() {
        let r = TokenReviewer::new(
            RemoteJwks::new("https://kubernetes.default.svc/openid/v1/jwks"),
            "meshid-ca",
        )
        .unwrap();
        assert_eq!(
            r.url(),
            "https://kubernetes.default.svc/apis/authentication.k8s.io/v1/tokenreviews"
        );
        let r = TokenReviewer::new(
            RemoteJwks::new("https://10.0.0.1:6443/.well-known/openid-configuration"),
            "meshid-ca",
        )
        .unwrap();
        assert_eq!(
            r.url(),
            "https://10.0.0.1:6443/apis/authentication.k8s.io/v1/tokenreviews"
        );
    }
}
