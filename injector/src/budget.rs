//! The memory the webhook may spend on reviews at once, as two byte budgets ([`ReviewBudget`]):
//! one for request bodies being received, one for reviews being parsed, answered and sent. A body
//! is charged before it is read (its `Content-Length`, or the size cap when it has none); a review
//! is charged what its body can cost once parsed and answered ([`super::cost::review_cost`],
//! counted before anything is parsed). A request waits for its charge at most a bounded time and
//! is then refused (503); one that could never fit is refused at once (413). So the injector's
//! memory stays under the budgets (plus its connections' buffers), whatever its clients send,
//! instead of growing until the kernel kills it.
//!
//! The body budget is a quarter of the whole and the review budget the rest: a review holding its
//! charge never waits on anything but its own work and the sending of its answer (itself bounded
//! in time), so bodies waiting for review room cannot starve each other. A waiting request takes
//! room as soon as there is enough for it, whoever waited longer: a pod's review of a few KiB is
//! never queued behind a megabyte body waiting for most of the budget.

use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use tokio::sync::Notify;

/// Default of `--review-memory`: what reviews in flight may use (bodies, parsed trees, answers).
pub const DEFAULT_REVIEW_MEMORY: usize = 48 * 1024 * 1024;

/// The two budgets, shared by every connection.
#[derive(Debug, Clone)]
pub struct ReviewBudget {
    bodies: Arc<Pool>,
    reviews: Arc<Pool>,
}

/// Why a request got no room.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum NoRoom {
    /// Its charge is more than the whole budget: it can never be served.
    TooCostly { cost: u64, budget: u64 },
    /// Other reviews held the budget for the whole wait.
    Busy,
}

impl ReviewBudget {
    /// Budgets from `--review-memory`: a quarter for bodies, the rest for reviews.
    pub fn new(total: usize) -> Self {
        let bodies = total / 4;
        Self {
            bodies: Pool::new(bodies),
            reviews: Pool::new(total - bodies),
        }
    }

    /// Room for a body of `bytes`, waiting at most `wait`.
    pub async fn body(&self, bytes: u64, wait: Duration) -> Result<Room, NoRoom> {
        self.bodies.take(bytes, wait).await
    }

    /// Room for a review costing `cost` (see [`super::cost::review_cost`]), waiting at most
    /// `wait`.
    pub async fn review(&self, cost: u64, wait: Duration) -> Result<Room, NoRoom> {
        self.reviews.take(cost, wait).await
    }

    /// Bytes of the (body, review) budgets free now.
    pub fn free(&self) -> (usize, usize) {
        (self.bodies.free(), self.reviews.free())
    }
}

/// One budget: bytes free, and the requests waiting for some.
#[derive(Debug)]
struct Pool {
    total: usize,
    free: Mutex<usize>,
    released: Notify,
}

impl Pool {
    fn new(total: usize) -> Arc<Self> {
        Arc::new(Self {
            total,
            free: Mutex::new(total),
            released: Notify::new(),
        })
    }

    fn free(&self) -> usize {
        *self.free.lock().unwrap_or_else(PoisonError::into_inner)
    }

    async fn take(self: &Arc<Self>, bytes: u64, wait: Duration) -> Result<Room, NoRoom> {
        let too_costly = NoRoom::TooCostly {
            cost: bytes,
            budget: self.total as u64,
        };
        let bytes = usize::try_from(bytes).map_err(|_| too_costly)?;
        if bytes > self.total {
            return Err(too_costly);
        }
        let deadline = tokio::time::Instant::now() + wait;
        loop {
            // Registered before looking, so a release between the look and the wait wakes it.
            let released = self.released.notified();
            tokio::pin!(released);
            released.as_mut().enable();
            {
                let mut free = self.free.lock().unwrap_or_else(PoisonError::into_inner);
                if *free >= bytes {
                    *free -= bytes;
                    return Ok(Room {
                        pool: self.clone(),
                        bytes,
                    });
                }
            }
            if tokio::time::timeout_at(deadline, released).await.is_err() {
                return Err(NoRoom::Busy);
            }
        }
    }

    fn give_back(&self, bytes: usize) {
        if bytes == 0 {
            return;
        }
        *self.free.lock().unwrap_or_else(PoisonError::into_inner) += bytes;
        self.released.notify_waiters();
    }
}

/// Bytes taken from a budget, given back when dropped.
#[derive(Debug)]
pub struct Room {
    pool: Arc<Pool>,
    bytes: usize,
}

impl Room {
    /// The bytes held.
    pub fn bytes(&self) -> usize {
        self.bytes
    }

    /// Gives back all but `keep` bytes (nothing when it holds no more).
    pub fn shrink_to(&mut self, keep: usize) {
        if keep < self.bytes {
            self.pool.give_back(self.bytes - keep);
            self.bytes = keep;
        }
    }
}

impl Drop for Room {
    fn drop(&mut self) {
        self.pool.give_back(self.bytes);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn small_requests_pass_a_large_one_waiting_and_every_wait_is_bounded() {
        let budget = ReviewBudget::new(400);
        let wait = Duration::from_secs(3);
        let held = budget.review(250, wait).await.unwrap();
        // 300 bytes do not fit beside 250 of 300: this one waits...
        let large = tokio::spawn({
            let budget = budget.clone();
            async move { budget.review(300, wait).await }
        });
        tokio::task::yield_now().await;
        // ...while a small one takes what is free at once.
        let small = budget.review(40, wait).await.unwrap();
        assert_eq!(budget.free(), (100, 10));
        // Released in time: the large one gets its room.
        drop(held);
        drop(small);
        let large = large.await.unwrap().unwrap();
        assert_eq!(large.bytes(), 300);
        // Nothing frees: refused after the wait, not before.
        let start = tokio::time::Instant::now();
        assert_eq!(budget.review(10, wait).await.unwrap_err(), NoRoom::Busy);
        assert_eq!(start.elapsed(), wait);
        // More than the whole budget: refused at once.
        assert!(matches!(
            budget.review(301, wait).await,
            Err(NoRoom::TooCostly {
                cost: 301,
                budget: 300
            })
        ));
        assert!(matches!(
            budget.body(101, wait).await,
            Err(NoRoom::TooCostly { .. })
        ));
        let mut large = large;
        large.shrink_to(100);
        assert_eq!(budget.free(), (100, 200));
        drop(large);
        assert_eq!(budget.free(), (100, 300));
    }
}
