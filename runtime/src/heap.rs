//! Giving freed heap pages back to the kernel after a burst of connections goes quiet.
//!
//! glibc's allocator returns memory to the kernel only from the top of its heap. A connection that
//! goes idle frees its parser and write buffers (kilobytes each) while smaller allocations that live
//! on (TLS state, the connection's task) sit above them, so after a burst of connections settles
//! those freed pages stay resident: measured at about 8 KiB per idle mTLS connection at the
//! terminating sidecar, a third of what each one cost. `malloc_trim(0)` hands every whole free page
//! back (`madvise(MADV_DONTNEED)`), wherever it lies in the heap; the next allocation that reuses one
//! takes a page fault, nothing more.
//!
//! [`Trimmer`] does that once reports of freed memory ([`Trimmer::freed`]: a clock read and an
//! atomic store, cheap enough for every connection that goes idle) have stopped for [`SETTLE`], or [`MAX_DELAY`]
//! after the first of them under steady churn; never while nothing was freed, so an idle process is
//! not woken. Other allocators (musl) return memory themselves; there the trim does nothing.

use std::sync::Arc;
use std::sync::atomic::{
    AtomicBool, AtomicU64, Ordering::AcqRel, Ordering::Relaxed, Ordering::Release,
};
use std::time::Duration;

use tokio::sync::Notify;
use tokio::time::Instant;

/// How long reports of freed memory must have stopped before the trim: one trim covers a whole burst
/// of connections going quiet.
pub const SETTLE: Duration = Duration::from_millis(100);

/// The longest a report waits for its trim while reports keep coming (steady churn): at most one
/// trim per this interval.
pub const MAX_DELAY: Duration = Duration::from_secs(1);

/// Hands freed heap pages back to the kernel (glibc `malloc_trim(0)`); `true` if any went back.
/// Elsewhere it does nothing and returns `false`.
pub fn release_free_pages() -> bool {
    glibc::trim()
}

#[cfg(all(target_os = "linux", target_env = "gnu"))]
#[allow(unsafe_code)]
mod glibc {
    // One of the two places with `unsafe` in meshid (the other is `crate::math`; the workspace
    // denies it everywhere else).
    unsafe extern "C" {
        // SAFETY: `malloc_trim` takes no pointer and touches only glibc's own free lists, under
        // the arenas' locks, like every other allocator call; any `pad` is valid.
        safe fn malloc_trim(pad: usize) -> std::ffi::c_int;
    }

    pub(super) fn trim() -> bool {
        malloc_trim(0) == 1
    }
}

#[cfg(not(all(target_os = "linux", target_env = "gnu")))]
mod glibc {
    pub(super) fn trim() -> bool {
        false
    }
}

/// Coalesces reports of freed memory into occasional trims (see the module docs). Cloning shares it.
#[derive(Clone, Debug)]
pub struct Trimmer {
    inner: Arc<Inner>,
}

#[derive(Debug)]
struct Inner {
    /// Wakes the trimmer for the first report of a burst, and only for that one.
    first: Notify,
    /// A burst is under way: later reports only move `last`.
    pending: AtomicBool,
    /// When the latest report came, in milliseconds since `epoch`.
    last: AtomicU64,
    epoch: Instant,
}

impl Default for Trimmer {
    fn default() -> Self {
        Self::new()
    }
}

impl Trimmer {
    pub fn new() -> Self {
        Self {
            inner: Arc::new(Inner {
                first: Notify::new(),
                pending: AtomicBool::new(false),
                last: AtomicU64::new(0),
                epoch: Instant::now(),
            }),
        }
    }

    /// Says that a noticeable amount of memory was just freed (a connection let go of its buffers).
    /// A store of the time; the trimmer task is woken only by the first report of a burst.
    pub fn freed(&self) {
        let inner = &*self.inner;
        inner.last.store(inner.millis(), Relaxed);
        if !inner.pending.load(Relaxed) && !inner.pending.swap(true, AcqRel) {
            inner.first.notify_one();
        }
    }

    /// Runs for ever: once reports of freed memory stop for [`SETTLE`] (or [`MAX_DELAY`] after the
    /// first one), calls `trim` (`release_free_pages`, measured by the caller).
    pub async fn run(self, mut trim: impl FnMut()) {
        let inner = &*self.inner;
        loop {
            inner.first.notified().await;
            let deadline = Instant::now() + MAX_DELAY;
            loop {
                let last = inner.epoch + Duration::from_millis(inner.last.load(Relaxed));
                let due = (last + SETTLE).min(deadline);
                if Instant::now() >= due {
                    break;
                }
                tokio::time::sleep_until(due).await;
            }
            // Reports from here on start the next burst; the trim below covers the ones before.
            inner.pending.store(false, Release);
            trim();
        }
    }
}

impl Inner {
    fn millis(&self) -> u64 {
        u64::try_from(self.epoch.elapsed().as_millis()).unwrap_or(u64::MAX)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn counting() -> (Arc<AtomicU64>, impl FnMut()) {
        let trims = Arc::new(AtomicU64::new(0));
        let counter = trims.clone();
        (trims, move || {
            counter.fetch_add(1, Relaxed);
        })
    }

    #[tokio::test(start_paused = true)]
    async fn trims_once_per_burst_after_it_settles_and_never_when_nothing_was_freed() {
        let trimmer = Trimmer::new();
        let (trims, trim) = counting();
        let count = || trims.load(Relaxed);
        let task = tokio::spawn(trimmer.clone().run(trim));
        tokio::time::sleep(Duration::from_secs(30)).await;
        assert_eq!(count(), 0, "trimmed with nothing freed");

        // A burst: many reports, one trim, SETTLE after the last.
        for _ in 0..100 {
            trimmer.freed();
        }
        tokio::time::sleep(Duration::from_millis(30)).await;
        trimmer.freed();
        tokio::time::sleep(SETTLE - Duration::from_millis(10)).await;
        assert_eq!(count(), 0, "trimmed before the burst settled");
        tokio::time::sleep(Duration::from_millis(20)).await;
        assert_eq!(count(), 1);
        tokio::time::sleep(Duration::from_secs(10)).await;
        assert_eq!(count(), 1, "one burst, one trim");

        // Steady churn: a report every 50 ms for 5 s gives one trim per MAX_DELAY, then one more
        // SETTLE after the last report.
        for _ in 0..100 {
            trimmer.freed();
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        let during = count() - 1;
        assert!((4..=5).contains(&during), "{during} trims in 5 s of churn");
        tokio::time::sleep(SETTLE + Duration::from_millis(10)).await;
        assert_eq!(count() - 1, during + 1, "no trim once the churn stopped");
        tokio::time::sleep(Duration::from_secs(10)).await;
        assert_eq!(count() - 1, during + 1, "trimmed again with nothing freed");
        task.abort();
    }

    #[tokio::test(start_paused = true)]
    async fn a_report_during_the_trim_starts_the_next_burst() {
        let trimmer = Trimmer::new();
        let trims = Arc::new(AtomicU64::new(0));
        let (counter, reporter) = (trims.clone(), trimmer.clone());
        // The trim itself frees memory (as a trim racing a connection's end would see).
        let task = tokio::spawn(trimmer.clone().run(move || {
            if counter.fetch_add(1, Relaxed) == 0 {
                reporter.freed();
            }
        }));
        trimmer.freed();
        tokio::time::sleep(SETTLE + Duration::from_millis(10)).await;
        assert_eq!(trims.load(Relaxed), 1);
        tokio::time::sleep(SETTLE).await;
        assert_eq!(
            trims.load(Relaxed),
            2,
            "the report during the trim was lost"
        );
        tokio::time::sleep(Duration::from_secs(10)).await;
        assert_eq!(trims.load(Relaxed), 2);
        task.abort();
    }

    #[test]
    fn releasing_free_pages_never_fails() {
        // Whatever it gives back, the heap stays usable.
        let v: Vec<Vec<u8>> = (0..64).map(|_| vec![1u8; 64 * 1024]).collect();
        drop(v);
        let _ = release_free_pages();
        let again = vec![2u8; 1 << 20];
        assert_eq!(again.iter().map(|&b| u64::from(b)).sum::<u64>(), 2 << 20);
    }
}
