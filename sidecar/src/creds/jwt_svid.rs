//! JWT-SVIDs for the app behind this sidecar (the Workload API's `FetchJWTSVID`): signed by the CA
//! for the sidecar's identity and the audiences the app asks for, cached per audience set until
//! half their life has passed, never handed out expired; and the trust domain's JWT keys (from the
//! bundle stream) to check tokens with (`ValidateJWTSVID`).

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use meshid_identity::SpiffeId;
use meshid_identity::jwt_svid::{JwtKey, check_audiences};
use meshid_identity::revocation::RevocationSet;
use meshid_runtime::time::unix_now;
use tokio::sync::watch;

use super::CredentialStore;
use super::ca::{IssueError, Lifecycle, issue_jwt_svid};
use crate::metrics::{Metrics, ResultLabels};
use crate::settings::CaMode;

/// At most this many audience sets cached; the one closest to expiry makes room.
pub const MAX_CACHED: usize = 64;
/// How long a call waits for the trust domain's JWT keys when the sidecar has none yet (just
/// started, or the CA not reached).
const KEYS_WAIT: Duration = Duration::from_secs(5);

/// A token handed out for a set of audiences.
#[derive(Clone)]
pub struct JwtSvid {
    pub id: SpiffeId,
    pub token: String,
    /// As the CA's clock had them.
    pub iat: i64,
    pub exp: i64,
    /// The key it is signed with (its header's `kid`).
    pub kid: String,
    /// The lineage of the certificate it was issued on (its `meshid_lineage` claim; `None` from a
    /// CA older than the claim).
    pub lineage: Option<String>,
    /// The serial of the certificate it was issued on (its `meshid_serial` claim; `None` from a
    /// CA older than the claim).
    pub serial: Option<String>,
    /// When it arrived, by this host's clock: its age is counted from here, so a skew between this
    /// host and the CA neither hands out a token past the end of its life nor has every call
    /// fetch a new one (the CA's `iat` compared with this clock would be off by the skew).
    pub received: i64,
}

impl std::fmt::Debug for JwtSvid {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("JwtSvid")
            .field("id", &self.id.as_str())
            .field("exp", &self.exp)
            .finish_non_exhaustive()
    }
}

impl JwtSvid {
    /// Still good to hand out again at `now` (this host's clock): less than half its life gone
    /// since it arrived, so the app holds it for a while yet. A clock stepped back since then
    /// (`now` before `received`) makes its age unknown: not fresh.
    fn fresh_at(&self, now: i64) -> bool {
        let age = now - self.received;
        age >= 0 && age < self.life() / 2
    }

    /// To be handed out again at `now`: fresh, for the sidecar's identity `own`, and signed with a
    /// key still among the trust domain's JWT `keys`. A key retired since (`meshid-ca rotate
    /// retire`) is gone from every verifier's bundle: a token under it verifies nowhere, however
    /// fresh (before, such tokens were handed out for up to half their life).
    /// Nor is one whose identity or lineage is `revoked` since: the CA issues none for them, and a
    /// verifier that checks tokens with the JWT keys alone would still take it.
    fn reusable_at(
        &self,
        now: i64,
        own: Option<&SpiffeId>,
        keys: Option<&[JwtKey]>,
        revoked: &RevocationSet,
    ) -> bool {
        self.fresh_at(now)
            && own == Some(&self.id)
            && keys.is_some_and(|keys| keys.iter().any(|k| k.kid == self.kid))
            && meshid_identity::jwt_svid::revoked_by(
                revoked,
                &self.id,
                self.lineage.as_deref(),
                self.serial.as_deref(),
            )
            .is_none()
    }

    /// Its whole life has passed since it arrived, by this host's clock (or that clock stepped
    /// back past its arrival).
    pub fn expired_at(&self, now: i64) -> bool {
        let age = now - self.received;
        age < 0 || age >= self.life()
    }

    /// When it ends by this host's clock.
    fn ends(&self) -> i64 {
        self.received.saturating_add(self.life())
    }

    fn life(&self) -> i64 {
        self.exp.saturating_sub(self.iat).max(0)
    }
}

/// Why no token could be handed out.
#[derive(Debug, thiserror::Error)]
pub enum JwtSvidError {
    #[error("audience: {0}")]
    Audience(String),
    #[error("the sidecar has no JWT keys of its trust domain yet (the CA has not been reached)")]
    NoKeys,
    #[error(transparent)]
    Ca(#[from] IssueError),
}

/// The app's JWT-SVIDs and the keys to check them with.
#[derive(Debug)]
pub struct JwtSvids {
    mode: CaMode,
    store: Arc<CredentialStore>,
    life: Arc<Lifecycle>,
    metrics: Metrics,
    cache: Mutex<HashMap<Vec<String>, JwtSvid>>,
    /// Held while a token is asked of the CA: callers that missed the cache together wait for
    /// the first one's token instead of each asking (the CA allows one lineage a burst of 8, then
    /// 2 a second: an app starting 16 workers that each asked for one audience got 8 refusals).
    asking: tokio::sync::Mutex<()>,
}

impl JwtSvids {
    pub fn new(
        mode: CaMode,
        store: Arc<CredentialStore>,
        life: Arc<Lifecycle>,
        metrics: Metrics,
    ) -> Self {
        Self {
            mode,
            store,
            life,
            metrics,
            cache: Mutex::new(HashMap::new()),
            asking: tokio::sync::Mutex::new(()),
        }
    }

    fn cache(&self) -> std::sync::MutexGuard<'_, HashMap<Vec<String>, JwtSvid>> {
        self.cache.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The trust domain's JWT keys as last received; waits a little for the first ones.
    pub async fn keys(&self) -> Option<Arc<Vec<JwtKey>>> {
        let mut rx = self.life.jwt_keys.subscribe();
        let got = tokio::time::timeout(KEYS_WAIT, rx.wait_for(Option::is_some)).await;
        match got {
            Ok(Ok(keys)) => keys.clone(),
            _ => None,
        }
    }

    /// Changes of the JWT keys, for the bundle stream.
    pub fn subscribe(&self) -> watch::Receiver<Option<Arc<Vec<JwtKey>>>> {
        self.life.jwt_keys.subscribe()
    }

    /// The cached token for the audiences `key`, if it may be handed out again.
    fn cached(&self, key: &[String]) -> Option<JwtSvid> {
        let own = self.store.current().map(|s| s.identity.id.clone());
        let held = self.life.jwt_keys.borrow().clone();
        let revoked = self.store.revocations();
        self.cache()
            .get(key)
            .filter(|hit| {
                hit.reusable_at(
                    unix_now(),
                    own.as_ref(),
                    held.as_deref().map(Vec::as_slice),
                    &revoked,
                )
            })
            .cloned()
    }

    /// A JWT-SVID for `audience`: from the cache while fresh, else from the CA.
    pub async fn fetch(&self, audience: &[String]) -> Result<JwtSvid, JwtSvidError> {
        check_audiences(audience).map_err(|e| JwtSvidError::Audience(e.to_string()))?;
        let mut key: Vec<String> = audience.to_vec();
        key.sort();
        key.dedup();
        if let Some(hit) = self.cached(&key) {
            return Ok(hit);
        }
        // One caller asks the CA at a time; the others then find its token in the cache.
        let _asking = self.asking.lock().await;
        if let Some(hit) = self.cached(&key) {
            return Ok(hit);
        }
        let keys = self.keys().await.ok_or(JwtSvidError::NoKeys)?;
        let result = issue_jwt_svid(
            &self.mode,
            &self.store,
            &self.life.stream_conn,
            &keys,
            key.clone(),
        )
        .await;
        let labels = ResultLabels {
            result: if result.is_ok() { "issued" } else { "failed" },
        };
        self.metrics.jwt_svids.get_or_create(&labels).inc();
        let (resp, verified) = result?;
        let svid = JwtSvid {
            id: SpiffeId::parse(&resp.spiffe_id)
                .map_err(|e| IssueError::Response(format!("the CA's SPIFFE ID: {e}")))?,
            token: resp.token,
            iat: resp.issued_at_unix,
            exp: resp.expires_at_unix,
            kid: verified.kid,
            lineage: verified.lineage,
            serial: verified.serial,
            received: unix_now(),
        };
        let mut cache = self.cache();
        let now = unix_now();
        cache.retain(|_, s| !s.expired_at(now));
        if cache.len() >= MAX_CACHED
            && let Some(oldest) = cache
                .iter()
                .min_by_key(|(_, s)| s.ends())
                .map(|(k, _)| k.clone())
        {
            cache.remove(&oldest);
        }
        cache.insert(key, svid.clone());
        Ok(svid)
    }
}

#[cfg(test)]
mod tests {
    use meshid_identity::revocation::Revoked;

    use super::*;

    fn svid(iat: i64, exp: i64, received: i64) -> JwtSvid {
        JwtSvid {
            id: SpiffeId::parse("spiffe://example.org/a").unwrap(),
            token: String::new(),
            iat,
            exp,
            kid: "k1".into(),
            lineage: Some("4a0b".into()),
            serial: Some("4a0d".into()),
            received,
        }
    }

    /// A cached token is handed out again only while its key is among the trust domain's JWT keys:
    /// after a forced `rotate retire` removed it, the next call fetches a token under a key
    /// verifiers still hold (before, the cache handed out the old one for half its life).
    #[test]
    fn a_token_is_handed_out_again_only_while_its_key_is_in_the_bundle() {
        let key = |kid: &str| {
            let pkcs8 = aws_lc_rs::signature::EcdsaKeyPair::generate_pkcs8(
                &aws_lc_rs::signature::ECDSA_P256_SHA256_FIXED_SIGNING,
                &aws_lc_rs::rand::SystemRandom::new(),
            )
            .unwrap();
            let signer = meshid_identity::jwt_svid::JwtSigner::from_pkcs8(pkcs8.as_ref()).unwrap();
            JwtKey::new(kid, &signer.spki).unwrap()
        };
        let svid = svid(1000, 1300, 1000);
        let own = svid.id.clone();
        let none = RevocationSet::default();
        let reusable = |keys: Option<&[JwtKey]>| svid.reusable_at(1100, Some(&own), keys, &none);
        // A new authority's key, and the token's own ("k1", as `svid` makes it).
        let both = [key("k2"), key("k1")];
        assert!(reusable(Some(&both[1..])));
        assert!(reusable(Some(&both)), "a rotation");
        assert!(!reusable(Some(&both[..1])), "its key retired");
        assert!(!reusable(Some(&[])));
        assert!(!reusable(None), "no keys held");
        // Freshness and identity as before.
        assert!(!svid.reusable_at(1150, Some(&own), Some(&both[1..]), &none));
        let other = SpiffeId::parse("spiffe://example.org/b").unwrap();
        assert!(!svid.reusable_at(1100, Some(&other), Some(&both[1..]), &none));
        assert!(!svid.reusable_at(1100, None, Some(&both[1..]), &none));
    }

    /// A cached token whose identity, certificate or lineage was revoked since is handed out no more: the next
    /// call goes to the CA, which refuses it (before, the cache handed it out for half its life,
    /// and verifiers with the JWT keys alone took it).
    #[test]
    fn a_token_of_a_revoked_identity_or_lineage_is_handed_out_no_more() {
        let key = JwtKey::new("k1", &{
            let pkcs8 = aws_lc_rs::signature::EcdsaKeyPair::generate_pkcs8(
                &aws_lc_rs::signature::ECDSA_P256_SHA256_FIXED_SIGNING,
                &aws_lc_rs::rand::SystemRandom::new(),
            )
            .unwrap();
            meshid_identity::jwt_svid::JwtSigner::from_pkcs8(pkcs8.as_ref())
                .unwrap()
                .spki
        })
        .unwrap();
        let keys = [key];
        let svid = svid(1000, 1300, 1000);
        let own = svid.id.clone();
        let reusable = |revoked: Vec<Revoked>| {
            svid.reusable_at(
                1100,
                Some(&own),
                Some(&keys[..]),
                &RevocationSet::new(revoked).unwrap(),
            )
        };
        assert!(reusable(Vec::new()));
        assert!(
            reusable(vec![Revoked::Serial("4a0c".into())]),
            "another lineage"
        );
        assert!(
            !reusable(vec![Revoked::Serial("4a0b".into())]),
            "its lineage"
        );
        assert!(
            !reusable(vec![Revoked::Serial("4a0d".into())]),
            "its certificate (a renewal, not its lineage's first)"
        );
        assert!(!reusable(vec![Revoked::Id(own.clone())]), "its identity");
        // A token from a CA older than the claim: by identity only.
        let unnamed = JwtSvid {
            lineage: None,
            serial: None,
            ..svid.clone()
        };
        let serial = RevocationSet::new([Revoked::Serial("4a0b".into())]).unwrap();
        assert!(unnamed.reusable_at(1100, Some(&own), Some(&keys[..]), &serial));
    }

    #[test]
    fn a_token_is_handed_out_again_only_in_the_first_half_of_its_life() {
        let svid = svid(1000, 1300, 1000);
        assert!(svid.fresh_at(1000));
        assert!(svid.fresh_at(1149));
        assert!(!svid.fresh_at(1150));
        assert!(!svid.fresh_at(1300));
        assert!(!svid.fresh_at(2000));
        assert!(!svid.expired_at(1299));
        assert!(svid.expired_at(1300));
    }

    /// A host whose clock is 200 s ahead of the CA's (or 200 s behind) counts a token's life from
    /// its arrival: it is handed out again for half its life and ends after all of it. Before,
    /// 200 s ahead never reused a token (every call went to the CA, into its rate limit) and 300 s
    /// ahead refused every token as expired at once.
    #[test]
    fn a_token_lives_its_life_whatever_the_skew_to_the_ca() {
        for skew in [-200, 200, 400] {
            let svid = svid(1000, 1300, 1000 + skew);
            let now = 1000 + skew;
            assert!(svid.fresh_at(now + 100), "skew {skew}");
            assert!(!svid.fresh_at(now + 150), "skew {skew}");
            assert!(!svid.expired_at(now + 299), "skew {skew}");
            assert!(svid.expired_at(now + 300), "skew {skew}");
        }
        // This host's clock stepped back past the token's arrival: its age is unknown.
        let svid = svid(1000, 1300, 1000);
        assert!(!svid.fresh_at(990));
        assert!(svid.expired_at(990));
    }
}
