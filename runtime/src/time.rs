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

/// How often [`sleep_wall`] looks at the wall clock again.
pub const WALL_CLOCK_CHECK: Duration = Duration::from_secs(5);

/// Sleeps for `wait` by the monotonic clock, or until the wall clock has moved `wait` on from now,
/// whichever comes first (the wall clock is looked at every [`WALL_CLOCK_CHECK`]). Certificate
/// validity is wall-clock time, and so is every validity check: a wall clock stepped forward (an NTP
/// correction, a resumed VM) brings a renewal forward with it, instead of leaving it to a timer that
/// would fire after the certificate has expired by the clock that checks it; a clock stepped back
/// never delays it.
pub async fn sleep_wall(wait: Duration) {
    sleep_wall_by(wait, SystemTime::now).await;
}

/// [`sleep_wall`] with the wall clock `wall`.
async fn sleep_wall_by(wait: Duration, wall: impl Fn() -> SystemTime) {
    let deadline = tokio::time::Instant::now() + wait;
    let wall_deadline = wall().checked_add(wait);
    loop {
        let now = tokio::time::Instant::now();
        if now >= deadline || wall_deadline.is_some_and(|w| wall() >= w) {
            return;
        }
        tokio::time::sleep((deadline - now).min(WALL_CLOCK_CHECK)).await;
    }
}

/// How far the wall clock may move against the monotonic clock between two looks of
/// [`watch_clock`] before it counts as moved (NTP slews by far less).
pub const CLOCK_STEP: Duration = Duration::from_secs(2);

/// How far the wall clock moved against the monotonic clock between two readings of both, in
/// seconds: positive when the wall clock went ahead (stepped forward, or the machine slept: the
/// monotonic clock does not count a suspend), negative when it went back.
pub fn clock_moved_by(
    then: (SystemTime, std::time::Instant),
    now: (SystemTime, std::time::Instant),
) -> f64 {
    let wall = match now.0.duration_since(then.0) {
        Ok(ahead) => ahead.as_secs_f64(),
        Err(back) => -back.duration().as_secs_f64(),
    };
    wall - now.1.saturating_duration_since(then.1).as_secs_f64()
}

/// Looks at both clocks every [`WALL_CLOCK_CHECK`] and calls `on_move` with how far the wall clock
/// moved (seconds, [`clock_moved_by`]) whenever that is [`CLOCK_STEP`] or more either way. Runs
/// until dropped.
pub async fn watch_clock(mut on_move: impl FnMut(f64) + Send) {
    let read = || (SystemTime::now(), std::time::Instant::now());
    let mut then = read();
    loop {
        tokio::time::sleep(WALL_CLOCK_CHECK).await;
        let now = read();
        let moved = clock_moved_by(then, now);
        if moved.abs() >= CLOCK_STEP.as_secs_f64() {
            on_move(moved);
        }
        then = now;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_wall_clock_moving_apart_from_the_monotonic_one_is_measured_both_ways() {
        let wall = SystemTime::UNIX_EPOCH + Duration::from_secs(1_000_000);
        let mono = std::time::Instant::now();
        let later = |wall_s: u64, mono_s: u64| {
            (
                wall + Duration::from_secs(wall_s),
                mono + Duration::from_secs(mono_s),
            )
        };
        // In step, a suspend of an hour (the monotonic clock stood still), a step back.
        assert_eq!(clock_moved_by((wall, mono), later(5, 5)), 0.0);
        assert_eq!(clock_moved_by((wall, mono), later(3605, 5)), 3600.0);
        assert_eq!(
            clock_moved_by((wall + Duration::from_secs(60), mono), later(5, 5)),
            -60.0
        );
    }

    #[tokio::test]
    async fn expiry_in_the_past_is_now() {
        let before = tokio::time::Instant::now();
        assert!(expiry_instant(0) <= tokio::time::Instant::now());
        assert!(expiry_instant(unix_now() + 100) >= before + Duration::from_secs(99));
        assert!(unix_now() > 1_700_000_000);
    }

    /// A wall clock that the test steps, starting at the epoch plus a day.
    struct Wall(std::sync::atomic::AtomicU64);

    impl Wall {
        fn new() -> std::sync::Arc<Self> {
            std::sync::Arc::new(Self(std::sync::atomic::AtomicU64::new(86_400)))
        }
        fn now(&self) -> SystemTime {
            UNIX_EPOCH + Duration::from_secs(self.0.load(std::sync::atomic::Ordering::Relaxed))
        }
        fn step(&self, secs: i64) {
            let now = self.0.load(std::sync::atomic::Ordering::Relaxed);
            self.0.store(
                now.saturating_add_signed(secs),
                std::sync::atomic::Ordering::Relaxed,
            );
        }
    }

    #[tokio::test(start_paused = true)]
    async fn a_wall_clock_stepped_forward_ends_the_wait_within_a_check() {
        let wall = Wall::new();
        let t0 = tokio::time::Instant::now();
        let w = wall.clone();
        let sleeper =
            tokio::spawn(
                async move { sleep_wall_by(Duration::from_secs(1800), move || w.now()).await },
            );
        tokio::time::sleep(Duration::from_secs(60)).await;
        assert!(!sleeper.is_finished());
        // 60 s later by the monotonic clock, the wall clock steps 30 minutes forward.
        wall.step(1800);
        sleeper.await.unwrap();
        let waited = t0.elapsed();
        assert!(
            waited <= Duration::from_secs(60) + WALL_CLOCK_CHECK,
            "{waited:?}"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn a_wall_clock_stepped_back_or_standing_still_never_delays_the_wait() {
        for step in [0, -300, -86_000] {
            let wall = Wall::new();
            let t0 = tokio::time::Instant::now();
            let w = wall.clone();
            let sleeper = tokio::spawn(async move {
                sleep_wall_by(Duration::from_secs(1800), move || w.now()).await;
            });
            tokio::time::sleep(Duration::from_secs(60)).await;
            wall.step(step);
            sleeper.await.unwrap();
            assert_eq!(t0.elapsed(), Duration::from_secs(1800), "step {step}");
        }
    }
}
