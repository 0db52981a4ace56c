//! Wall-clock helpers: certificates speak Unix seconds, timers speak [`tokio::time::Instant`].

use std::time::{Duration, SystemTime, UNIX_EPOCH};

/// Seconds since the Unix epoch (0 if the clock is before it).
pub fn unix_now() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| i64::try_from(d.as_secs()).unwrap_or(i64::MAX))
        .unwrap_or(0)
}

/// The monotonic instant at which Unix time `not_after` is reached (now, if it has passed).
pub fn expiry_instant(not_after: i64) -> tokio::time::Instant {
    let left = u64::try_from(not_after.saturating_sub(unix_now())).unwrap_or(0);
    tokio::time::Instant::now() + Duration::from_secs(left)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn expiry_in_the_past_is_now() {
        let before = tokio::time::Instant::now();
        assert!(expiry_instant(0) <= tokio::time::Instant::now());
        assert!(expiry_instant(unix_now() + 100) >= before + Duration::from_secs(99));
        assert!(unix_now() > 1_700_000_000);
    }
}
