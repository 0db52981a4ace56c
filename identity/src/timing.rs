//! Time policy as pure functions: when to renew, and how long to wait after a failure.

use std::time::Duration;

/// When to renew a certificate received at `received_at` that expires at `not_after` (both seconds
/// since the epoch): once half of the validity remaining at receipt has passed, moved by `jitter`
/// (in `[-1, 1]`) times 10% of that remaining validity. A backdated not-before plays no part, so it
/// cannot trigger an early renewal.
pub fn refresh_in(received_at: i64, not_after: i64, jitter: f64) -> Duration {
    let remaining = (not_after - received_at).max(0) as f64;
    let jitter = jitter.clamp(-1.0, 1.0);
    let secs = remaining / 2.0 + remaining * 0.1 * jitter;
    Duration::from_secs_f64(secs.max(0.0))
}

/// Exponential backoff with jitter, capped so several attempts fit before expiry.
#[derive(Debug, Clone)]
pub struct Backoff {
    min: Duration,
    cap: Duration,
    attempt: u32,
}

impl Backoff {
    /// Starts at `min`, doubles per failure, never waits longer than `cap`.
    pub fn new(min: Duration, cap: Duration) -> Self {
        Self {
            min,
            cap: cap.max(min),
            attempt: 0,
        }
    }

    /// For a certificate lifetime: at most a tenth of it between attempts (and at least 100 ms).
    pub fn for_lifetime(lifetime: Duration) -> Self {
        let cap = (lifetime / 10).max(Duration::from_millis(100));
        Self::new(Duration::from_millis(100).min(cap), cap)
    }

    /// The wait before the next attempt. `rand` in `[0, 1)` spreads it over `[d/2, d)`; a server's
    /// retry hint is honoured when longer (but still capped, so we never sleep past our chance).
    pub fn next_delay(&mut self, rand: f64, hint: Option<Duration>) -> Duration {
        let exp = self
            .min
            .saturating_mul(1u32.checked_shl(self.attempt.min(20)).unwrap_or(u32::MAX));
        self.attempt = self.attempt.saturating_add(1);
        let base = exp.min(self.cap);
        let jittered = base.mul_f64(0.5 + 0.5 * rand.clamp(0.0, 1.0));
        match hint {
            Some(h) => jittered.max(h.min(self.cap)),
            None => jittered,
        }
    }

    pub fn reset(&mut self) {
        self.attempt = 0;
    }
}

/// The longest wait between certificate requests while no valid certificate is held (at start, or
/// after expiry during a CA outage): the sidecar serves nothing then, so a CA that comes back must be
/// asked again within seconds, whatever the lifetime the backoff was sized for.
pub const RETRY_WITHOUT_CERTIFICATE: Duration = Duration::from_secs(5);

/// A certificate with this little left is no longer presented for renewal (the CA would see it
/// expire on the way): the last retry while one is held comes before.
pub const LAST_RENEWAL_MARGIN_SECS: i64 = 2;

/// The wait before the next certificate request after a failed one, from the backoff's `wait`.
/// While a certificate is still valid at `now` (`not_after`, seconds since the epoch), the waits
/// shrink as its expiry nears: at most half the time left, but no shorter than the pace without a
/// certificate, and the last one ends [`LAST_RENEWAL_MARGIN_SECS`] before expiry, so a CA that
/// comes back in the last minutes is still asked while the certificate can renew (a join-token
/// workload has nothing else to present). Once there is none, at most
/// [`RETRY_WITHOUT_CERTIFICATE`]. Both paces are spread over their upper half by `rand` in
/// `[0, 1)`.
pub fn retry_wait(wait: Duration, not_after: Option<i64>, now: i64, rand: f64) -> Duration {
    let pace = RETRY_WITHOUT_CERTIFICATE.mul_f64(0.5 + 0.5 * rand.clamp(0.0, 1.0));
    match not_after {
        Some(not_after) if not_after - now > LAST_RENEWAL_MARGIN_SECS => {
            let left = Duration::from_secs((not_after - now) as u64);
            let renewable =
                Duration::from_secs((not_after - now - LAST_RENEWAL_MARGIN_SECS) as u64);
            wait.min((left / 2).max(pace)).min(renewable)
        }
        _ => wait.min(pace),
    }
}

/// A uniform random number in `[0, 1)` from the system RNG.
pub fn random_unit() -> f64 {
    let mut b = [0u8; 8];
    if aws_lc_rs::rand::fill(&mut b).is_err() {
        return 0.5;
    }
    (u64::from_le_bytes(b) >> 11) as f64 / (1u64 << 53) as f64
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renews_at_half_the_remaining_validity() {
        assert_eq!(refresh_in(1000, 4600, 0.0), Duration::from_secs(1800));
        assert_eq!(refresh_in(1000, 4600, 1.0), Duration::from_secs(2160));
        assert_eq!(refresh_in(1000, 4600, -1.0), Duration::from_secs(1440));
        assert_eq!(refresh_in(5000, 4600, 0.0), Duration::ZERO);
    }

    #[test]
    fn backdated_not_before_does_not_renew_early() {
        // A 1-hour certificate backdated by 5 minutes, received now: renewal in ~30 minutes, not 27.5.
        let now = 10_000;
        assert_eq!(refresh_in(now, now + 3600, 0.0), Duration::from_secs(1800));
    }

    #[test]
    fn backoff_grows_is_capped_and_honours_hints() {
        let mut b = Backoff::new(Duration::from_millis(100), Duration::from_secs(2));
        let delays: Vec<Duration> = (0..8).map(|_| b.next_delay(0.999, None)).collect();
        assert!(delays[0] < Duration::from_millis(100));
        assert!(delays.windows(2).all(|w| w[1] >= w[0]));
        assert!(delays.iter().all(|d| *d <= Duration::from_secs(2)));
        assert!(delays[7] > Duration::from_millis(1900));
        let mut b = Backoff::new(Duration::from_millis(100), Duration::from_secs(2));
        assert_eq!(
            b.next_delay(0.0, Some(Duration::from_secs(1))),
            Duration::from_secs(1)
        );
        // A hint past the cap is capped.
        assert_eq!(
            b.next_delay(0.0, Some(Duration::from_secs(60))),
            Duration::from_secs(2)
        );
        b.reset();
        assert!(b.next_delay(0.0, None) <= Duration::from_millis(100));
    }

    #[test]
    fn lifetime_cap_lets_several_attempts_fit() {
        let mut b = Backoff::for_lifetime(Duration::from_secs(10));
        for _ in 0..30 {
            assert!(b.next_delay(0.99, None) <= Duration::from_secs(1));
        }
    }

    #[test]
    fn retries_without_a_valid_certificate_come_within_seconds() {
        let long = Duration::from_secs(300);
        // Holding a certificate valid for another minute: the next attempt at half the time left.
        assert_eq!(
            retry_wait(long, Some(1060), 1000, 0.5),
            Duration::from_secs(30)
        );
        assert_eq!(
            retry_wait(Duration::from_secs(2), Some(1060), 1000, 0.5),
            Duration::from_secs(2)
        );
        // Near expiry: attempts no slower than without a certificate, the last one while the
        // certificate can still renew (a 6-minute backoff once slept until expiry itself).
        for rand in [0.0, 0.5, 0.999] {
            let mut now = 1000;
            let not_after = 1060;
            let mut attempts = Vec::new();
            while not_after - now > LAST_RENEWAL_MARGIN_SECS {
                let w = retry_wait(Duration::from_secs(360), Some(not_after), now, rand);
                assert!(w >= Duration::from_secs(1), "{w:?} at {now}");
                now += w.as_secs() as i64;
                attempts.push(now);
            }
            let last = *attempts.last().unwrap();
            assert!(
                (not_after - 7..=not_after - LAST_RENEWAL_MARGIN_SECS).contains(&last),
                "{attempts:?}"
            );
            assert!(attempts.len() >= 4, "{attempts:?}");
        }
        // None held, expired, or too close to expiry to renew: at most the short cap, spread over
        // its upper half.
        for not_after in [None, Some(1000), Some(900), Some(1002)] {
            for rand in [0.0, 0.5, 0.999] {
                let w = retry_wait(long, not_after, 1000, rand);
                assert!(w <= RETRY_WITHOUT_CERTIFICATE && w >= RETRY_WITHOUT_CERTIFICATE / 2);
            }
        }
        assert_eq!(
            retry_wait(Duration::from_millis(100), None, 1000, 0.5),
            Duration::from_millis(100)
        );
    }

    #[test]
    fn random_unit_is_in_range() {
        for _ in 0..100 {
            let r = random_unit();
            assert!((0.0..1.0).contains(&r));
        }
    }
}
