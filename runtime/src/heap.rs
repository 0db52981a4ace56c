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
//! [`Trimmer`] does that once reports of freed memory ([`Trimmer::freed`]: one atomic operation,
//! cheap enough for every connection that goes idle) have stopped for [`SETTLE`], or [`MAX_DELAY`]
//! after the first of them under steady churn; never while nothing was freed, so an idle process is
//! not woken. Other allocators (musl) return memory themselves; there the trim does nothing.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::time::Duration;

use tokio::sync::Notify;

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
    // The one foreign call in meshid (the workspace denies `unsafe` everywhere else).
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
#[derive(Clone, Debug, Default)]
pub struct Trimmer {
    inner: Arc<Inner>,
}

#[derive(Debug, Default)]
struct Inner {
    freed: Notify,
    trims: AtomicU64,
    released: AtomicU64,
}

impl Trimmer {
    pub fn new() -> Self {
        Self::default()
    }

    /// Says that a noticeable amount of memory was just freed (a connection let go of its buffers).
    pub fn freed(&self) {
        self.inner.freed.notify_one();
    }

    /// Trims run so far, and how many of them gave pages back.
    pub fn counts(&self) -> (u64, u64) {
        (
            self.inner.trims.load(Relaxed),
            self.inner.released.load(Relaxed),
        )
    }

    /// Runs for ever: once reports of freed memory stop for [`SETTLE`] (or [`MAX_DELAY`] after the
    /// first one), trims with `release`.
    pub async fn run(self, mut release: impl FnMut() -> bool) {
        loop {
            self.inner.freed.notified().await;
            let deadline = tokio::time::Instant::now() + MAX_DELAY;
            loop {
                let quiet = tokio::time::sleep(
                    SETTLE.min(deadline.saturating_duration_since(tokio::time::Instant::now())),
                );
                tokio::select! {
                    () = quiet => break,
                    () = self.inner.freed.notified() => {}
                }
            }
            let gave_back = release();
            self.inner.trims.fetch_add(1, Relaxed);
            if gave_back {
                self.inner.released.fetch_add(1, Relaxed);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn trims_once_per_burst_after_it_settles_and_never_when_nothing_was_freed() {
        let trimmer = Trimmer::new();
        let task = tokio::spawn(trimmer.clone().run(|| true));
        tokio::time::sleep(Duration::from_secs(30)).await;
        assert_eq!(trimmer.counts(), (0, 0), "trimmed with nothing freed");

        // A burst: many reports, one trim, SETTLE after the first.
        for _ in 0..100 {
            trimmer.freed();
        }
        tokio::time::sleep(SETTLE - Duration::from_millis(10)).await;
        assert_eq!(trimmer.counts().0, 0, "trimmed before the burst settled");
        tokio::time::sleep(Duration::from_millis(20)).await;
        assert_eq!(trimmer.counts(), (1, 1));
        tokio::time::sleep(Duration::from_secs(10)).await;
        assert_eq!(trimmer.counts().0, 1, "one burst, one trim");

        // Steady churn: a report every 50 ms for 5 s gives one trim per MAX_DELAY, then one more
        // SETTLE after the last report.
        for _ in 0..100 {
            trimmer.freed();
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        let during = trimmer.counts().0 - 1;
        assert!((4..=5).contains(&during), "{during} trims in 5 s of churn");
        tokio::time::sleep(SETTLE + Duration::from_millis(10)).await;
        assert_eq!(
            trimmer.counts().0 - 1,
            during + 1,
            "no trim once the churn stopped"
        );
        tokio::time::sleep(Duration::from_secs(10)).await;
        assert_eq!(
            trimmer.counts().0 - 1,
            during + 1,
            "trimmed again with nothing freed"
        );
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
