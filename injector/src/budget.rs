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
//!
//! One source address holds at most its share of the body budget at once ([`SOURCE_SHARE`]: an
//! eighth, and never less than the largest body taken): bodies are charged on their declared
//! length before they arrive, so without it one client declaring large bodies and sending them a
//! byte at a time held the whole budget for the request timeout, and the API server's reviews were
//! answered 503. Its requests past its share wait for its own bodies to arrive, as any wait,
//! bounded; a body that has arrived whole no longer counts against its source's share
//! ([`Room::arrived`]), though its bytes stay taken until its review has room.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use tokio::sync::Notify;

/// Default of `--review-memory`: what reviews in flight may use (bodies, parsed trees, answers).
pub const DEFAULT_REVIEW_MEMORY: usize = 48 * 1024 * 1024;

/// One source holds at most this fraction (1/N) of the body budget at once (see the module docs).
pub const SOURCE_SHARE: usize = 8;

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
    /// This source's own bodies held its share of the body budget (`share` bytes) for the whole
    /// wait.
    SourceBusy { share: u64 },
}

impl ReviewBudget {
    /// Budgets from `--review-memory`: a quarter for bodies, the rest for reviews. One source's
    /// share of the body budget is [`SOURCE_SHARE`]'s fraction of it, but at least `largest_body`
    /// (`--max-request-bytes`: any body taken must fit in one share) and at most all of it.
    pub fn new(total: usize, largest_body: usize) -> Self {
        let bodies = total / 4;
        let share = (bodies / SOURCE_SHARE).max(largest_body).min(bodies);
        Self {
            bodies: Pool::new(bodies, share),
            reviews: Pool::new(total - bodies, total - bodies),
        }
    }

    /// Room for a body of `bytes` from `source` (an address, as the injector's connection caps
    /// count it), waiting at most `wait`.
    pub async fn body(&self, source: IpAddr, bytes: u64, wait: Duration) -> Result<Room, NoRoom> {
        self.bodies
            .take(bytes, Some(source.to_canonical()), wait)
            .await
    }

    /// Room for a review costing `cost` (see [`super::cost::review_cost`]), waiting at most
    /// `wait`.
    pub async fn review(&self, cost: u64, wait: Duration) -> Result<Room, NoRoom> {
        self.reviews.take(cost, None, wait).await
    }

    /// Bytes of the (body, review) budgets free now.
    pub fn free(&self) -> (usize, usize) {
        (self.bodies.free(), self.reviews.free())
    }
}

/// One budget: bytes free, what each source holds, and the requests waiting for some.
#[derive(Debug)]
struct Pool {
    total: usize,
    /// The most one source may hold at once.
    share: usize,
    state: Mutex<PoolState>,
    released: Notify,
}

#[derive(Debug)]
struct PoolState {
    free: usize,
    /// Bytes held by each source that holds any (requests charged with a source).
    held: HashMap<IpAddr, usize>,
}

impl Pool {
    fn new(total: usize, share: usize) -> Arc<Self> {
        Arc::new(Self {
            total,
            share,
            state: Mutex::new(PoolState {
                free: total,
                held: HashMap::new(),
            }),
            released: Notify::new(),
        })
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, PoolState> {
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    fn free(&self) -> usize {
        self.lock().free
    }

    async fn take(
        self: &Arc<Self>,
        bytes: u64,
        source: Option<IpAddr>,
        wait: Duration,
    ) -> Result<Room, NoRoom> {
        let limit = if source.is_some() {
            self.share
        } else {
            self.total
        };
        let too_costly = NoRoom::TooCostly {
            cost: bytes,
            budget: limit as u64,
        };
        let bytes = usize::try_from(bytes).map_err(|_| too_costly)?;
        if bytes > limit {
            return Err(too_costly);
        }
        let deadline = tokio::time::Instant::now() + wait;
        loop {
            // Registered before looking, so a release between the look and the wait wakes it.
            let released = self.released.notified();
            tokio::pin!(released);
            released.as_mut().enable();
            // What is missing, if the wait runs out.
            let missing = {
                let mut state = self.lock();
                let own = source.map_or(0, |s| state.held.get(&s).copied().unwrap_or(0));
                if own + bytes > self.share {
                    NoRoom::SourceBusy {
                        share: self.share as u64,
                    }
                } else if state.free >= bytes {
                    state.free -= bytes;
                    if let Some(s) = source
                        && bytes > 0
                    {
                        *state.held.entry(s).or_default() += bytes;
                    }
                    return Ok(Room {
                        pool: self.clone(),
                        bytes,
                        source,
                    });
                } else {
                    NoRoom::Busy
                }
            };
            if tokio::time::timeout_at(deadline, released).await.is_err() {
                return Err(missing);
            }
        }
    }

    fn give_back(&self, bytes: usize, source: Option<IpAddr>) {
        if bytes == 0 {
            return;
        }
        {
            let mut state = self.lock();
            state.free += bytes;
            if let Some(s) = source {
                state.unhold(s, bytes);
            }
        }
        self.released.notify_waiters();
    }

    /// `bytes` no longer count against `source`'s share (they stay taken from the pool).
    fn release_source(&self, bytes: usize, source: IpAddr) {
        self.lock().unhold(source, bytes);
        self.released.notify_waiters();
    }
}

impl PoolState {
    fn unhold(&mut self, source: IpAddr, bytes: usize) {
        if let Some(held) = self.held.get_mut(&source) {
            *held = held.saturating_sub(bytes);
            if *held == 0 {
                self.held.remove(&source);
            }
        }
    }
}

/// Bytes taken from a budget, given back when dropped.
#[derive(Debug)]
pub struct Room {
    pool: Arc<Pool>,
    bytes: usize,
    /// The source charged, for the per-source share.
    source: Option<IpAddr>,
}

impl Room {
    /// The bytes held.
    pub fn bytes(&self) -> usize {
        self.bytes
    }

    /// The body has arrived whole: its bytes stay taken until it is dropped, but no longer count
    /// against its source's share. The share is against bodies that arrive slowly; a source whose
    /// bodies have arrived (the API server, waiting for room to review them) is not held back by
    /// them.
    pub fn arrived(&mut self) {
        if let Some(source) = self.source.take() {
            self.pool.release_source(self.bytes, source);
        }
    }

    /// Gives back all but `keep` bytes (nothing when it holds no more).
    pub fn shrink_to(&mut self, keep: usize) {
        if keep < self.bytes {
            self.pool.give_back(self.bytes - keep, self.source);
            self.bytes = keep;
        }
    }
}

impl Drop for Room {
    fn drop(&mut self) {
        self.pool.give_back(self.bytes, self.source);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn small_requests_pass_a_large_one_waiting_and_every_wait_is_bounded() {
        let budget = ReviewBudget::new(400, 100);
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
            budget.body(source(1), 101, wait).await,
            Err(NoRoom::TooCostly { .. })
        ));
        let mut large = large;
        large.shrink_to(100);
        assert_eq!(budget.free(), (100, 200));
        drop(large);
        assert_eq!(budget.free(), (100, 300));
    }

    fn source(last: u8) -> IpAddr {
        IpAddr::from([127, 0, 0, last])
    }

    #[tokio::test(start_paused = true)]
    async fn one_source_holds_at_most_its_share_of_the_body_budget() {
        // 64 000 bytes: bodies 16 000, a source's share an eighth of that (2 000, above the
        // largest body of 1 000).
        let budget = ReviewBudget::new(64_000, 1_000);
        let wait = Duration::from_secs(3);
        let slow = source(9);
        // One source declaring large bodies it never finishes sending: two fit its share...
        let first = budget.body(slow, 1_000, wait).await.unwrap();
        let second = budget.body(slow, 1_000, wait).await.unwrap();
        // ...the third waits for them, and is refused by name when they do not finish in time.
        let start = tokio::time::Instant::now();
        assert_eq!(
            budget.body(slow, 1_000, wait).await.unwrap_err(),
            NoRoom::SourceBusy { share: 2_000 }
        );
        assert_eq!(start.elapsed(), wait);
        // The same address written as IPv4-mapped IPv6 is the same source.
        let mapped = IpAddr::V6(std::net::Ipv4Addr::new(127, 0, 0, 9).to_ipv6_mapped());
        assert_eq!(
            budget.body(mapped, 1, wait).await.unwrap_err(),
            NoRoom::SourceBusy { share: 2_000 }
        );
        // Every other source still gets room at once.
        let start = tokio::time::Instant::now();
        let other = budget.body(source(1), 1_000, wait).await.unwrap();
        assert_eq!(start.elapsed(), Duration::ZERO);
        assert_eq!(budget.free().0, 13_000);
        // A body finishing gives its room back to its source's share too.
        let waiting = tokio::spawn({
            let budget = budget.clone();
            async move { budget.body(slow, 1_000, wait).await }
        });
        tokio::task::yield_now().await;
        let mut first = first;
        first.shrink_to(0);
        assert_eq!(waiting.await.unwrap().unwrap().bytes(), 1_000);
        drop((first, second, other));
        assert_eq!(budget.free().0, 16_000);
        assert!(budget.bodies.lock().held.is_empty());
        // Bodies that have arrived whole (waiting for review room, as the API server's may) keep
        // their bytes taken but no longer hold their source back.
        let mut arrived: Vec<Room> = Vec::new();
        for _ in 0..4 {
            let mut room = budget.body(slow, 1_000, wait).await.unwrap();
            room.arrived();
            arrived.push(room);
        }
        assert_eq!(budget.free().0, 12_000);
        assert!(budget.bodies.lock().held.is_empty());
        drop(arrived);
        assert_eq!(budget.free().0, 16_000);
        // The share is never below the largest body, nor above the body budget.
        assert_eq!(ReviewBudget::new(64_000, 3_000).bodies.share, 3_000);
        assert_eq!(ReviewBudget::new(4_000, 3_000).bodies.share, 1_000);
    }
}
