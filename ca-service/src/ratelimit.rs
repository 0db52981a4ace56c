//! Per-identity token buckets: an issuance storm for one identity cannot starve the others. The
//! same buckets, keyed by a certificate's key, bound what one certificate may ask of the CA's
//! bundle calls (acknowledgements, bundle streams).

use std::borrow::Borrow;
use std::collections::HashMap;
use std::hash::Hash;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use meshid_identity::SpiffeId;

/// Past this many tracked identities, full (idle) buckets are dropped.
const PRUNE_ABOVE: usize = 10_000;

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

#[derive(Debug, Clone, Copy)]
struct Bucket {
    tokens: f64,
    updated: Instant,
}

/// Token buckets keyed by identity (or by what else `K` names: a certificate's key).
#[derive(Debug)]
pub struct RateLimiter<K = SpiffeId> {
    limit: RateLimit,
    buckets: Mutex<HashMap<K, Bucket>>,
}

impl<K: Hash + Eq + Clone> RateLimiter<K> {
    pub fn new(limit: RateLimit) -> Self {
        Self {
            limit,
            buckets: Mutex::new(HashMap::new()),
        }
    }

    /// Takes one token for `id`, or says how long until one is available.
    pub fn check<Q>(&self, id: &Q, now: Instant) -> Result<(), Duration>
    where
        K: Borrow<Q>,
        Q: Hash + Eq + ToOwned<Owned = K> + ?Sized,
    {
        let burst = f64::from(self.limit.burst.max(1));
        let rate = self.limit.per_second.max(f64::MIN_POSITIVE);
        let mut buckets = self.buckets.lock().unwrap_or_else(|p| p.into_inner());
        if buckets.len() > PRUNE_ABOVE {
            buckets.retain(|_, b| {
                b.tokens + now.saturating_duration_since(b.updated).as_secs_f64() * rate < burst
            });
        }
        let bucket = buckets.entry(id.to_owned()).or_insert(Bucket {
            tokens: burst,
            updated: now,
        });
        let elapsed = now.saturating_duration_since(bucket.updated).as_secs_f64();
        bucket.tokens = (bucket.tokens + elapsed * rate).min(burst);
        bucket.updated = now;
        if bucket.tokens >= 1.0 {
            bucket.tokens -= 1.0;
            Ok(())
        } else {
            Err(Duration::from_secs_f64((1.0 - bucket.tokens) / rate))
        }
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
}
