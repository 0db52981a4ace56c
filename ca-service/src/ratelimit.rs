//! Per-identity token buckets: an issuance storm for one identity cannot starve the others. The
//! same buckets, keyed by a certificate's key, bound what one certificate may ask of the CA's
//! bundle calls (acknowledgements, bundle streams).

use std::borrow::Borrow;
use std::collections::HashMap;
use std::hash::Hash;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use meshid_identity::SpiffeId;

/// Past this many tracked identities, full (idle) buckets are dropped: when the map has doubled
/// since the last pruning (so a flood of new keys costs amortised O(1) per check, not a scan of
/// every bucket per check), or [`PRUNE_EVERY`] after it.
const PRUNE_ABOVE: usize = 10_000;
/// The longest time between two prunings while the map is above [`PRUNE_ABOVE`].
const PRUNE_EVERY: Duration = Duration::from_secs(60);
/// The longest wait a refusal names: a rate so low that a token is further off (or a wait that
/// would not fit a `Duration`) is answered with this, and the caller is refused again when it
/// comes back too early.
pub const MAX_WAIT: Duration = Duration::from_secs(3600);

/// Rate and burst of each identity's bucket.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct RateLimit {
    /// Issuances per second, sustained.
    pub per_second: f64,
    /// Issuances allowed at once.
    pub burst: u32,
}

impl Default for RateLimit {
    fn default() -> Self {
        // Generous: all replicas of a Deployment share one identity and may restart together.
        Self {
            per_second: 50.0,
            burst: 200,
        }
    }
}

impl RateLimit {
    /// What one lineage of renewals (its certificates, whatever their keys: see
    /// `meshid_identity::LINEAGE_OID`) may take of an identity's limit, for its renewals and,
    /// apart, its JWT-SVID requests: a twenty-fifth of the rate and of the burst (at least 1):
    /// 2 a second with bursts of 8 at the default 50/s, bursts of 200. A sidecar renews twice a
    /// lifetime (its certificate and its app's: once a second with 4-second certificates) and asks
    /// for a JWT-SVID per audience set every few minutes; a certificate renewed in a loop cannot
    /// take its identity's budget from the other replicas. Derived, not capped, so that a CA told
    /// to limit nothing (benchmarks) limits nothing here either.
    pub fn per_lineage(self) -> Self {
        Self {
            per_second: self.per_second / 25.0,
            burst: (self.burst / 25).max(1),
        }
    }

    /// The default limit of one namespace's identities together (`ns/<ns>/sa/<sa>` IDs), taken
    /// alongside each identity's: four times an identity's rate and burst. Without it a namespace
    /// user who creates N service accounts gets N times the rate, and the CA's signing CPU with
    /// it, from every other namespace. Derived, not capped, as [`RateLimit::per_lineage`].
    pub fn per_namespace(self) -> Self {
        Self {
            per_second: self.per_second * 4.0,
            burst: self.burst.saturating_mul(4),
        }
    }

    /// What renewals together may take of an identity's limit: three quarters (rounded up), so
    /// that service-account token and join-token issuances (new pods) always find at least a
    /// quarter of it, however many of the identity's certificates renew. Those issuances in turn
    /// leave in the identity's bucket what renewals may still take of their share (see
    /// [`RateLimiter::check_leaving`] and [`RateLimiter::available`]): a pod asking again and
    /// again with its token cannot starve the renewals of its identity's other replicas.
    pub fn renewal_share(self) -> Self {
        Self {
            per_second: self.per_second * 0.75,
            burst: self.burst.saturating_mul(3).div_ceil(4).max(1),
        }
    }
}

#[derive(Debug, Clone, Copy)]
struct Bucket {
    tokens: f64,
    updated: Instant,
}

/// Token buckets keyed by identity (or by what else `K` names: a certificate's key).
#[derive(Debug)]
pub struct RateLimiter<K = SpiffeId> {
    limit: RateLimit,
    buckets: Mutex<Buckets<K>>,
}

#[derive(Debug)]
struct Buckets<K> {
    map: HashMap<K, Bucket>,
    /// Buckets left by the last pruning, and when it ran.
    pruned_to: usize,
    pruned_at: Option<Instant>,
    /// Buckets looked at by prunings so far (what a pruning costs).
    scanned: u64,
}

impl<K: Hash + Eq + Clone> RateLimiter<K> {
    pub fn new(limit: RateLimit) -> Self {
        Self {
            limit,
            buckets: Mutex::new(Buckets {
                map: HashMap::new(),
                pruned_to: 0,
                pruned_at: None,
                scanned: 0,
            }),
        }
    }

    /// Buckets looked at by prunings so far.
    #[cfg(test)]
    fn scanned(&self) -> u64 {
        self.buckets
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .scanned
    }

    /// Takes one token for `id`, or says how long until one is available (at most [`MAX_WAIT`]).
    pub fn check<Q>(&self, id: &Q, now: Instant) -> Result<(), Duration>
    where
        K: Borrow<Q>,
        Q: Hash + Eq + ToOwned<Owned = K> + ?Sized,
    {
        self.check_leaving(id, now, 0.0)
    }

    /// Takes one token for `id` only if at least `leave` tokens are left after it (at most the
    /// burst less one, so that a full bucket always gives one), or says how long until then (at
    /// most [`MAX_WAIT`]).
    pub fn check_leaving<Q>(&self, id: &Q, now: Instant, leave: f64) -> Result<(), Duration>
    where
        K: Borrow<Q>,
        Q: Hash + Eq + ToOwned<Owned = K> + ?Sized,
    {
        let burst = f64::from(self.limit.burst.max(1));
        let rate = self.rate();
        let needed = 1.0 + leave.max(0.0).min(burst - 1.0);
        let mut guard = self.buckets.lock().unwrap_or_else(|p| p.into_inner());
        let buckets = &mut *guard;
        let len = buckets.map.len();
        let due = len > PRUNE_ABOVE
            && (len >= buckets.pruned_to.saturating_mul(2)
                || buckets
                    .pruned_at
                    .is_none_or(|at| now.saturating_duration_since(at) >= PRUNE_EVERY));
        if due {
            buckets.scanned += len as u64;
            buckets.map.retain(|_, b| {
                b.tokens + now.saturating_duration_since(b.updated).as_secs_f64() * rate < burst
            });
            buckets.pruned_to = buckets.map.len();
            buckets.pruned_at = Some(now);
        }
        let bucket = buckets.map.entry(id.to_owned()).or_insert(Bucket {
            tokens: burst,
            updated: now,
        });
        let elapsed = now.saturating_duration_since(bucket.updated).as_secs_f64();
        bucket.tokens = (bucket.tokens + elapsed * rate).min(burst);
        bucket.updated = now;
        if bucket.tokens >= needed {
            bucket.tokens -= 1.0;
            Ok(())
        } else {
            let wait = Duration::try_from_secs_f64((needed - bucket.tokens) / rate);
            Err(wait.map_or(MAX_WAIT, |w| w.min(MAX_WAIT)))
        }
    }

    /// The tokens `id`'s bucket holds at `now` (a full burst if it has none), taking none.
    pub fn available<Q>(&self, id: &Q, now: Instant) -> f64
    where
        K: Borrow<Q>,
        Q: Hash + Eq + ?Sized,
    {
        let burst = f64::from(self.limit.burst.max(1));
        let guard = self.buckets.lock().unwrap_or_else(|p| p.into_inner());
        guard.map.get(id).map_or(burst, |b| {
            let elapsed = now.saturating_duration_since(b.updated).as_secs_f64();
            (b.tokens + elapsed * self.rate()).min(burst)
        })
    }

    /// How long until [`Self::check_leaving`] for `id` can pass when what it must leave is what
    /// `leaving`'s bucket for `id` holds, which refills meanwhile too (at its rate, up to its
    /// burst): the wait is until this bucket is a token ahead of it (at most [`MAX_WAIT`]). With
    /// a plain [`Self::check`]'s wait the caller came back while the other bucket had grown, and
    /// was refused again.
    pub fn wait_leaving<Q>(&self, id: &Q, now: Instant, leaving: &Self) -> Duration
    where
        K: Borrow<Q>,
        Q: Hash + Eq + ?Sized,
    {
        let burst = f64::from(self.limit.burst.max(1));
        let (rate, leave_rate) = (self.rate(), leaving.rate());
        let top = (burst - 1.0).max(0.0);
        let leave = leaving.available(id, now).min(top);
        let need = 1.0 + leave - self.available(id, now);
        if need <= 0.0 {
            return Duration::ZERO;
        }
        // What it leaves grows until it reaches the other burst (or this one's less one).
        let full_leave = f64::from(leaving.limit.burst.max(1)).min(top);
        let growing = ((full_leave - leave).max(0.0)) / leave_rate;
        let net = rate - leave_rate;
        let secs = if net > 0.0 && need <= net * growing {
            need / net
        } else {
            growing + (need - net * growing).max(0.0) / rate
        };
        Duration::try_from_secs_f64(secs).map_or(MAX_WAIT, |w| w.min(MAX_WAIT))
    }

    /// The refill rate: a rate of zero, below or NaN (never accepted by `serve`'s flags) refills
    /// nothing, in effect, and never divides by zero.
    fn rate(&self) -> f64 {
        self.limit.per_second.max(f64::MIN_POSITIVE)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn burst_then_refill_per_identity() {
        let rl = RateLimiter::new(RateLimit {
            per_second: 2.0,
            burst: 3,
        });
        let a = SpiffeId::parse("spiffe://td/a").unwrap();
        let b = SpiffeId::parse("spiffe://td/b").unwrap();
        let t0 = Instant::now();
        for _ in 0..3 {
            rl.check(&a, t0).unwrap();
        }
        let wait = rl.check(&a, t0).unwrap_err();
        assert!(wait > Duration::from_millis(400) && wait <= Duration::from_millis(500));
        // Another identity is unaffected.
        rl.check(&b, t0).unwrap();
        // Half a second later one token is back.
        rl.check(&a, t0 + Duration::from_millis(500)).unwrap();
        assert!(rl.check(&a, t0 + Duration::from_millis(500)).is_err());
    }

    #[test]
    fn a_rate_of_zero_or_less_refuses_without_panicking() {
        for per_second in [0.0, -1.0, f64::NAN, 1e-300, f64::MIN_POSITIVE] {
            let rl: RateLimiter<u32> = RateLimiter::new(RateLimit {
                per_second,
                burst: 1,
            });
            let t0 = Instant::now();
            rl.check(&1, t0).unwrap();
            // A token further off than a `Duration` holds: the longest wait, no panic.
            assert_eq!(rl.check(&1, t0), Err(MAX_WAIT), "{per_second}");
            assert_eq!(rl.check_leaving(&2, t0, 5.0), Ok(()), "{per_second}");
            assert!(rl.available(&2, t0 + MAX_WAIT) < 1.0, "{per_second}");
        }
    }

    /// The wait a refused `check_leaving` names is long enough, though what it leaves refills
    /// meanwhile: coming back then, the caller is served; a little earlier, it is not.
    #[test]
    fn the_wait_to_leave_a_refilling_bucket_is_long_enough() {
        let identity: RateLimiter<u32> = RateLimiter::new(RateLimit {
            per_second: 1.0,
            burst: 4,
        });
        let renewals: RateLimiter<u32> = RateLimiter::new(
            RateLimit {
                per_second: 1.0,
                burst: 4,
            }
            .renewal_share(),
        );
        let t0 = Instant::now();
        // Renewals took two of both buckets; a token issuance took one of what they left.
        for _ in 0..2 {
            renewals.check(&1, t0).unwrap();
            identity.check(&1, t0).unwrap();
        }
        assert_eq!(
            identity.check_leaving(&1, t0, renewals.available(&1, t0)),
            Ok(())
        );
        let refused = identity.check_leaving(&1, t0, renewals.available(&1, t0));
        assert!(refused.is_err());
        let wait = identity.wait_leaving(&1, t0, &renewals);
        assert!(wait > refused.unwrap_err(), "{wait:?}");
        let at = |d: Duration| identity.check_leaving(&1, t0 + d, renewals.available(&1, t0 + d));
        assert!(at(wait.mul_f64(0.9)).is_err(), "{wait:?}");
        assert_eq!(at(wait + Duration::from_millis(1)), Ok(()), "{wait:?}");
        // Nothing to wait for when it would pass now.
        assert_eq!(identity.wait_leaving(&2, t0, &renewals), Duration::ZERO);
    }

    #[test]
    fn check_leaving_takes_only_above_what_it_leaves() {
        let rl: RateLimiter<u32> = RateLimiter::new(RateLimit {
            per_second: 1.0,
            burst: 4,
        });
        let t0 = Instant::now();
        assert_eq!(rl.available(&1, t0), 4.0, "no bucket yet: a full burst");
        rl.check_leaving(&1, t0, 3.0).unwrap();
        // Three left: another would leave two.
        assert_eq!(rl.check_leaving(&1, t0, 3.0), Err(Duration::from_secs(1)));
        assert_eq!(rl.available(&1, t0), 3.0);
        // What is left is still taken by plain checks.
        rl.check(&1, t0).unwrap();
        assert_eq!(rl.check_leaving(&1, t0, 3.0), Err(Duration::from_secs(2)));
        // Asked to leave the whole burst (or more), a full bucket still gives one.
        rl.check_leaving(&2, t0, 4.0).unwrap();
        assert!(rl.check_leaving(&2, t0, 4.0).is_err());
        assert_eq!(rl.available(&1, t0 + Duration::from_millis(1500)), 3.5);
    }

    #[test]
    fn a_flood_of_new_keys_costs_linear_work() {
        // 30,000 keys in one instant, each taking a token: no bucket is full again, so no
        // pruning drops any; each may not scan the whole map again.
        let rl: RateLimiter<u32> = RateLimiter::new(RateLimit::default());
        let t0 = Instant::now();
        for key in 0..30_000 {
            rl.check(&key, t0).unwrap();
        }
        let scanned = rl.scanned();
        assert!(scanned <= 2 * 30_000, "{scanned} buckets scanned");
        // Idle buckets are still dropped: later, the map is pruned again and the full ones go.
        rl.check(&30_000, t0 + PRUNE_EVERY).unwrap();
        let left = rl.buckets.lock().unwrap().map.len();
        assert_eq!(left, 1, "only the key of that check is left");
    }
}
