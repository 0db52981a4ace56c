//! The memory every form body read whole at once may use ([`FormBudget`], `--form-body-memory`).
//! A `POST` form body is read whole to find its `_method` fields (at most
//! [`super::http::MAX_FORM_BODY`] each), and h2 flow control does not bound what that holds: each
//! read gives the window back, so a peer with one connection of 200 streams, each sending just
//! under 1 MiB and never ending, had the sidecar hold 200 MiB, past the injected sidecar's 128 MiB
//! memory limit. Every body is charged what it holds as it grows (its declared length at once, if
//! it has one), from one budget for the whole process; a body that finds no room is answered at
//! once (503, or 413 when it alone is larger than the whole budget), not queued, so a peer holding
//! the budget gains nothing by waiting. The charge is given back when the body is dropped: the
//! request answered, its stream reset or its connection closed, or its read timed out.
//!
//! One peer identity holds at most a quarter of the budget ([`FormBudget::share`], never less than
//! one largest form): one peer that opens form bodies and never ends them cannot take the budget
//! from every other.

use std::collections::HashMap;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, PoisonError};

/// Default of `--form-body-memory`: 16 MiB, an eighth of the injected sidecar's memory limit.
pub const DEFAULT_FORM_BODY_MEMORY: usize = 16 * 1024 * 1024;

/// The bytes form bodies being read whole may hold together, shared by every connection.
#[derive(Debug, Clone)]
pub struct FormBudget {
    total: usize,
    free: Arc<AtomicUsize>,
    /// The most one peer identity holds.
    share: usize,
    /// What each peer identity holds now (entries at zero removed).
    by_peer: Arc<Mutex<HashMap<Arc<str>, usize>>>,
}

/// Why a body could not grow.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum NoRoom {
    /// It alone would need more than the whole budget.
    TooLarge,
    /// Other bodies hold the budget.
    Busy,
    /// The peer's other bodies hold its share of the budget.
    PeerBusy,
}

impl FormBudget {
    pub fn new(total: usize) -> Self {
        Self::with_largest(total, super::http::MAX_FORM_BODY)
    }

    /// A budget of `total` where one body holds at most `largest`: each peer may hold a quarter of
    /// it, and never less than one such body.
    fn with_largest(total: usize, largest: usize) -> Self {
        Self {
            total,
            free: Arc::new(AtomicUsize::new(total)),
            share: (total / 4).max(largest.min(total)),
            by_peer: Arc::default(),
        }
    }

    /// The most one peer identity holds.
    pub fn share(&self) -> usize {
        self.share
    }

    /// The whole budget, in bytes.
    pub fn total(&self) -> usize {
        self.total
    }

    /// Bytes free now.
    pub fn free(&self) -> usize {
        self.free.load(Ordering::Relaxed)
    }

    /// An empty charge of `peer`'s (its identity), grown as the body is read ([`Room::grow_to`]).
    pub fn room(&self, peer: &str) -> Room {
        Room {
            budget: self.clone(),
            peer: peer.into(),
            bytes: 0,
        }
    }
}

/// Bytes taken from a [`FormBudget`], given back when dropped.
#[derive(Debug)]
pub struct Room {
    budget: FormBudget,
    peer: Arc<str>,
    bytes: usize,
}

impl Room {
    /// The bytes held.
    pub fn bytes(&self) -> usize {
        self.bytes
    }

    /// Holds `bytes` in all (nothing changes when it holds as many already), or says why not.
    pub fn grow_to(&mut self, bytes: usize) -> Result<(), NoRoom> {
        let Some(more) = bytes.checked_sub(self.bytes).filter(|&m| m > 0) else {
            return Ok(());
        };
        if bytes > self.budget.total {
            return Err(NoRoom::TooLarge);
        }
        let mut by_peer = self
            .budget
            .by_peer
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        let held = by_peer.get(&self.peer).copied().unwrap_or(0);
        if held + more > self.budget.share {
            return Err(NoRoom::PeerBusy);
        }
        self.budget
            .free
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |free| {
                free.checked_sub(more)
            })
            .map_err(|_| NoRoom::Busy)?;
        by_peer.insert(self.peer.clone(), held + more);
        self.bytes = bytes;
        Ok(())
    }
}

impl Drop for Room {
    fn drop(&mut self) {
        if self.bytes == 0 {
            return;
        }
        let mut by_peer = self
            .budget
            .by_peer
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        if let Some(held) = by_peer.get_mut(&self.peer) {
            *held = held.saturating_sub(self.bytes);
            if *held == 0 {
                by_peer.remove(&self.peer);
            }
        }
        drop(by_peer);
        self.budget.free.fetch_add(self.bytes, Ordering::AcqRel);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bodies_share_the_budget_and_give_it_back_when_dropped() {
        let budget = FormBudget::with_largest(100, 100);
        assert_eq!(budget.share(), 100);
        let mut a = budget.room("a");
        a.grow_to(60).unwrap();
        a.grow_to(50).unwrap(); // never shrinks
        assert_eq!((a.bytes(), budget.free()), (60, 40));
        let mut b = budget.room("b");
        assert_eq!(b.grow_to(41), Err(NoRoom::Busy));
        assert_eq!((b.bytes(), budget.free()), (0, 40));
        assert_eq!(b.grow_to(101), Err(NoRoom::TooLarge));
        b.grow_to(40).unwrap();
        assert_eq!(budget.free(), 0);
        drop(a);
        assert_eq!(budget.free(), 60);
        drop(b);
        assert_eq!(budget.free(), 100);
        assert!(budget.by_peer.lock().unwrap().is_empty());
    }

    /// One peer holds at most its share, a quarter (or one largest body): the rest stays for the
    /// others, and what it gives back is its own again.
    #[test]
    fn one_peer_holds_at_most_its_share() {
        let budget = FormBudget::with_largest(100, 10);
        assert_eq!(budget.share(), 25);
        let mut held: Vec<Room> = (0..2)
            .map(|_| {
                let mut r = budget.room("greedy");
                r.grow_to(10).unwrap();
                r
            })
            .collect();
        let mut third = budget.room("greedy");
        assert_eq!(third.grow_to(10), Err(NoRoom::PeerBusy));
        third.grow_to(5).unwrap();
        assert_eq!(third.grow_to(6), Err(NoRoom::PeerBusy));
        // Another peer still has the rest.
        let mut other = budget.room("other");
        other.grow_to(25).unwrap();
        assert_eq!(budget.free(), 50);
        held.pop();
        third.grow_to(15).unwrap();
        drop((held, third, other));
        assert_eq!(budget.free(), 100);
        assert!(budget.by_peer.lock().unwrap().is_empty());
        // A budget smaller than four largest bodies still takes one from each peer.
        assert_eq!(FormBudget::with_largest(30, 10).share(), 10);
        assert_eq!(FormBudget::with_largest(8, 10).share(), 8);
    }
}
