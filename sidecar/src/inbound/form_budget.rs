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

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

/// Default of `--form-body-memory`: 16 MiB, an eighth of the injected sidecar's memory limit.
pub const DEFAULT_FORM_BODY_MEMORY: usize = 16 * 1024 * 1024;

/// The bytes form bodies being read whole may hold together, shared by every connection.
#[derive(Debug, Clone)]
pub struct FormBudget {
    total: usize,
    free: Arc<AtomicUsize>,
}

/// Why a body could not grow.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum NoRoom {
    /// It alone would need more than the whole budget.
    TooLarge,
    /// Other bodies hold the budget.
    Busy,
}

impl FormBudget {
    pub fn new(total: usize) -> Self {
        Self {
            total,
            free: Arc::new(AtomicUsize::new(total)),
        }
    }

    /// The whole budget, in bytes.
    pub fn total(&self) -> usize {
        self.total
    }

    /// Bytes free now.
    pub fn free(&self) -> usize {
        self.free.load(Ordering::Relaxed)
    }

    /// An empty charge, grown as the body is read ([`Room::grow_to`]).
    pub fn room(&self) -> Room {
        Room {
            budget: self.clone(),
            bytes: 0,
        }
    }
}

/// Bytes taken from a [`FormBudget`], given back when dropped.
#[derive(Debug)]
pub struct Room {
    budget: FormBudget,
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
        self.budget
            .free
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |free| {
                free.checked_sub(more)
            })
            .map_err(|_| NoRoom::Busy)?;
        self.bytes = bytes;
        Ok(())
    }
}

impl Drop for Room {
    fn drop(&mut self) {
        if self.bytes > 0 {
            self.budget.free.fetch_add(self.bytes, Ordering::AcqRel);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bodies_share_the_budget_and_give_it_back_when_dropped() {
        let budget = FormBudget::new(100);
        let mut a = budget.room();
        a.grow_to(60).unwrap();
        a.grow_to(50).unwrap(); // never shrinks
        assert_eq!((a.bytes(), budget.free()), (60, 40));
        let mut b = budget.room();
        assert_eq!(b.grow_to(41), Err(NoRoom::Busy));
        assert_eq!((b.bytes(), budget.free()), (0, 40));
        assert_eq!(b.grow_to(101), Err(NoRoom::TooLarge));
        b.grow_to(40).unwrap();
        assert_eq!(budget.free(), 0);
        drop(a);
        assert_eq!(budget.free(), 60);
        drop(b);
        assert_eq!(budget.free(), 100);
    }
}
