//! Futures polled only when they asked to be.
//!
//! `tokio::select!` polls every branch each time its task wakes. A connection's task wakes several
//! times per request (its socket, its streams, the app's answer), while its other branches (the
//! process shutting down, the certificate's expiry, the peer's revocation) almost never have
//! anything new: polling them anyway was about 1.2k instructions per request at the inbound
//! sidecar (`scripts/request-instructions.sh`). [`WhenWoken`] polls its future once, then only
//! after that future's own waker fired; in between, polling it costs a flag check.

use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::task::{Context, Poll, Wake, Waker};

/// A future polled only after its own waker fired (and on its first poll). See the module docs.
pub struct WhenWoken<F> {
    inner: F,
    gate: Arc<Gate>,
    /// The waker `inner` is polled with: it opens the gate, then wakes the task.
    waker: Waker,
}

struct Gate {
    woken: AtomicBool,
    /// The waker of the task that last polled the [`WhenWoken`].
    task: Mutex<Option<Waker>>,
}

impl Wake for Gate {
    fn wake(self: Arc<Self>) {
        self.wake_by_ref();
    }

    fn wake_by_ref(self: &Arc<Self>) {
        self.woken.store(true, Ordering::Release);
        let task = self.task.lock().unwrap_or_else(PoisonError::into_inner);
        if let Some(w) = task.as_ref() {
            w.wake_by_ref();
        }
    }
}

impl<F> WhenWoken<F> {
    pub fn new(inner: F) -> Self {
        let gate = Arc::new(Gate {
            woken: AtomicBool::new(true),
            task: Mutex::new(None),
        });
        let waker = Waker::from(gate.clone());
        Self { inner, gate, waker }
    }
}

impl<F: Future + Unpin> Future for WhenWoken<F> {
    type Output = F::Output;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<F::Output> {
        let this = self.get_mut();
        // The task's waker is stored before the flag is read: a wake in between sees it.
        {
            let mut task = this
                .gate
                .task
                .lock()
                .unwrap_or_else(PoisonError::into_inner);
            if !task.as_ref().is_some_and(|w| w.will_wake(cx.waker())) {
                *task = Some(cx.waker().clone());
            }
        }
        if !this.gate.woken.swap(false, Ordering::AcqRel) {
            return Poll::Pending;
        }
        Pin::new(&mut this.inner).poll(&mut Context::from_waker(&this.waker))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::AtomicUsize;

    /// Pending until `ready`, counting its polls; keeps the last waker it was given. Clones share
    /// all three.
    #[derive(Clone, Default)]
    struct Probe {
        polls: Arc<AtomicUsize>,
        ready: Arc<AtomicBool>,
        waker: Arc<Mutex<Option<Waker>>>,
    }

    impl Probe {
        fn polls(&self) -> usize {
            self.polls.load(Ordering::SeqCst)
        }

        /// Fires the waker it was last polled with.
        fn wake(&self) {
            let waker = self.waker.lock().unwrap().clone();
            waker.expect("polled once").wake();
        }
    }

    impl Future for Probe {
        type Output = ();

        fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<()> {
            self.polls.fetch_add(1, Ordering::SeqCst);
            *self.waker.lock().unwrap() = Some(cx.waker().clone());
            if self.ready.load(Ordering::SeqCst) {
                Poll::Ready(())
            } else {
                Poll::Pending
            }
        }
    }

    struct CountingWaker(AtomicUsize);

    impl Wake for CountingWaker {
        fn wake(self: Arc<Self>) {
            self.0.fetch_add(1, Ordering::SeqCst);
        }
    }

    #[test]
    fn the_inner_future_is_polled_first_and_then_only_after_its_own_wake() {
        let probe = Probe::default();
        let mut gated = WhenWoken::new(probe.clone());
        let task = Arc::new(CountingWaker(AtomicUsize::new(0)));
        let task_waker = Waker::from(task.clone());
        let mut cx = Context::from_waker(&task_waker);

        assert!(Pin::new(&mut gated).poll(&mut cx).is_pending());
        assert_eq!(probe.polls(), 1, "polled on the first poll");
        // The task woke for other reasons: the inner future is not asked again.
        for _ in 0..10 {
            assert!(Pin::new(&mut gated).poll(&mut cx).is_pending());
        }
        assert_eq!(probe.polls(), 1);
        assert_eq!(task.0.load(Ordering::SeqCst), 0);

        // Its own waker fires: the task is woken and the next poll reaches it.
        probe.ready.store(true, Ordering::SeqCst);
        probe.wake();
        assert_eq!(task.0.load(Ordering::SeqCst), 1, "the task was woken");
        assert!(Pin::new(&mut gated).poll(&mut cx).is_ready());
        assert_eq!(probe.polls(), 2);
    }

    #[test]
    fn a_wake_reaches_the_task_that_polled_last() {
        let probe = Probe::default();
        let mut gated = WhenWoken::new(probe.clone());
        let first = Arc::new(CountingWaker(AtomicUsize::new(0)));
        let second = Arc::new(CountingWaker(AtomicUsize::new(0)));
        let w1 = Waker::from(first.clone());
        let w2 = Waker::from(second.clone());
        assert!(
            Pin::new(&mut gated)
                .poll(&mut Context::from_waker(&w1))
                .is_pending()
        );
        // Moved to another task (polled with another waker) before anything happened.
        assert!(
            Pin::new(&mut gated)
                .poll(&mut Context::from_waker(&w2))
                .is_pending()
        );
        probe.wake();
        assert_eq!(first.0.load(Ordering::SeqCst), 0);
        assert_eq!(second.0.load(Ordering::SeqCst), 1);
    }

    #[tokio::test]
    async fn a_gated_branch_still_ends_a_select_once_its_event_comes() {
        let (tx, rx) = tokio::sync::oneshot::channel::<u8>();
        let mut gated = WhenWoken::new(rx);
        let noisy = async {
            // Another branch waking the task over and over.
            for _ in 0..50 {
                tokio::task::yield_now().await;
            }
            let _ = tx.send(7);
            std::future::pending::<()>().await;
        };
        tokio::select! {
            got = &mut gated => assert_eq!(got.unwrap(), 7),
            () = noisy => unreachable!(),
        }
    }
}
