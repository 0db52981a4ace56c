//! What `--idle-timeout` means on an h2 connection, where hyper has no idle limit of its own: a
//! connection with no request in flight and none arriving for the idle timeout is closed (GOAWAY,
//! as at shutdown), and one whose peer has stopped taking a response (its flow-control window
//! left at zero, so hyper waits for room that never comes) is closed at once after it, unless the
//! peer is taking other responses meanwhile: then only the responses it left untaken are ended
//! (their streams reset), and the connection goes on.
//!
//! The second is what a peer with a valid certificate could otherwise do on purpose: open many
//! streams with a window of zero, each holding the app connection its response comes from for as
//! long as the connection lives (until its certificate expires). Envoy's `stream_idle_timeout`
//! covers the same case.
//!
//! A response is *held* while hyper has not asked its body for a frame: from its head until the
//! first ask, and from each frame given until the next ask (or until hyper drops the body, the
//! last frame sent). hyper takes one frame and keeps it until the peer's window has room for it,
//! then asks for the next, so a response held over a whole idle period, with nothing else moving
//! on the connection, is one the peer is not reading: even a small one, whose app side is done,
//! holds its stream. A response that waits on the app (hyper asked, nothing came yet) is not
//! held: a slow app is the request timeout's business, and a long stream with quiet spells is
//! legitimate.
//!
//! hyper does not ask a response's body for anything while the frame it took waits for the peer's
//! window, so a held stream cannot be ended from its body: it is ended by aborting the task hyper
//! spawned for it (through [`StreamExecutor`]), which drops the stream (h2 resets it) and the
//! response's body (its app connection, or the outbound's upstream stream, let go).
//!
//! The cost on the request path is a few relaxed atomic operations per request and per frame on
//! one counter block per connection, which one task owns, and per request an allocation and two
//! uncontended locks to list the stream's task in its connection.

use std::pin::Pin;
use std::sync::atomic::{AtomicUsize, Ordering::Relaxed};
use std::sync::{Arc, Mutex, OnceLock, Weak};
use std::task::{Context, Poll};
use std::time::Duration;

use hyper::body::{Body as HttpBody, Frame, SizeHint};

/// One h2 connection's streams, as its watchdog ([`Streams::watch`]) sees them.
#[derive(Debug, Default)]
pub struct Streams {
    /// Requests in the service or responses not yet sent in full (or dropped).
    open: AtomicUsize,
    /// Responses whose body hyper has not asked for a frame since it began or gave one.
    held: AtomicUsize,
    /// Bumped by every request and every poll of a response body.
    moved: AtomicUsize,
    /// The watch's periods so far.
    period: AtomicUsize,
    /// [`Self::held`] by the period each became held in (its number modulo [`AGES`]): the watch
    /// finds a response held through two whole periods, whatever else moved meanwhile.
    aged: [AtomicUsize; AGES],
    /// Bumped when hyper asks a response's body for more after it gave a frame: the frame went out
    /// within the peer's window, so the peer is taking that response.
    taken: AtomicUsize,
    /// The tasks of the streams whose responses are on their way ([`Stream`]).
    tasks: Mutex<Tasks>,
    /// Watch for a rapid-reset flood ([`Self::flooded`]): a peer's connection at the inbound,
    /// not an app's at the outbound.
    guard_resets: bool,
    /// Requests the app answered or that were dropped unanswered (the sidecar's own answers, a
    /// denial, are not counted: a peer could mix cheap denied requests among those it resets).
    forwarded: AtomicUsize,
    /// Requests dropped unanswered within [`PREMATURE`] of arriving: the peer reset them.
    premature: AtomicUsize,
    /// Woken once the peer has reset more than [`RESET_FLOOD`] requests prematurely, and more
    /// than half of those counted in `forwarded`.
    flood: tokio::sync::Notify,
}

/// A request reset by its peer before its answer and within this long of arriving is premature:
/// what a rapid-reset flood is made of. A long poll, a stream, or a call whose deadline is longer
/// than this, cancelled by its client, is not counted (Envoy draws the same line at 1 s).
pub const PREMATURE: Duration = Duration::from_secs(1);

/// How many requests an h2 peer may reset prematurely ([`PREMATURE`]) before it is watched for a
/// rapid-reset flood; past it, the connection is closed once those are more than half of its
/// requests (the sidecar's own answers left out). A stream the peer resets frees its place under
/// the concurrent stream limit at once, while the app works on: a peer resetting every request it
/// sends would have the app take requests as fast as it can send them, whatever the stream and
/// app connection limits. Envoy closes such a connection likewise (more than half of at least 500
/// streams reset before 1 s).
pub const RESET_FLOOD: usize = 200;

/// [`Streams::tasks`]: weak, and pruned of the streams that ended whenever the list has doubled.
#[derive(Debug, Default)]
struct Tasks {
    list: Vec<Weak<Stream>>,
    prune_at: usize,
    /// The stream of the request just handed to the service, whose task hyper spawns next: hyper's
    /// h2 server calls the service and then spawns the stream's task, in one go on the
    /// connection's task ([`StreamExecutor`] takes it).
    next: Option<Arc<Stream>>,
}

/// One stream's task, as its response's body and the watch see it.
#[derive(Debug, Default)]
pub struct Stream {
    /// The task hyper spawned for it, once spawned.
    task: OnceLock<tokio::task::AbortHandle>,
    /// While its response is held: the slot of [`Streams::aged`] it is counted in, plus one.
    held: AtomicUsize,
}

/// What hyper's h2 server of one connection spawns a task for (each stream, for the service call
/// and its response), with the [`Stream`] of the request it was just handed ([`Streams::request`])
/// given the task's abort handle, which the watch ends it by. (A task-local to find the stream from
/// its body cost 1.6k instructions per request, 4% of the inbound's, at every poll of the task.)
/// Spawned boxed: hyper hands over one enum whose size is that of its largest variant, and tokio
/// moves a task's future when it spawns it and when the task ends; boxed, each move copies a
/// pointer instead of the future, for one allocation per task. (The outbound drives `h2` itself:
/// no task per request.)
#[derive(Debug, Clone, Default)]
pub struct StreamExecutor(pub Arc<Streams>);

impl<F> hyper::rt::Executor<F> for StreamExecutor
where
    F: std::future::Future + Send + 'static,
    F::Output: Send + 'static,
{
    fn execute(&self, fut: F) {
        // Boxed first: anything called before would have the future copied aside (it is the size
        // of hyper's largest stream state, ~700 instructions of `memcpy` per request).
        let fut = Box::pin(fut);
        let stream = self.0.tasks().next.take();
        let task = tokio::spawn(fut);
        // Any other task spawned with nothing handed to the service just before has no stream:
        // the watch cannot end it alone, and ends the connection instead.
        if let Some(stream) = stream {
            let _ = stream.task.set(task.abort_handle());
        }
    }
}

/// Periods told apart by [`Streams::aged`]: the one now, the two before it, and the slot the next
/// one reuses.
const AGES: usize = 4;

/// Why [`Streams::watch`] ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Ending {
    /// No request in flight and nothing moved for a whole idle period: close gracefully.
    Idle,
    /// A response held for a whole idle period with nothing else moving, or for two whatever
    /// moved: the peer is not reading it.
    Stalled,
    /// The peer resets most of its requests before their answers ([`Streams::flooded`]).
    ResetFlood,
}

impl Streams {
    fn bump(&self) {
        self.moved
            .store(self.moved.load(Relaxed).wrapping_add(1), Relaxed);
    }

    /// A request handed to the service: open until the returned guard is dropped (with its
    /// response's body, or when the stream is reset before there is one).
    /// Its [`Stream`] is listed, and given the task hyper spawns next ([`StreamExecutor`]).
    pub fn request(self: &Arc<Self>) -> Open {
        self.open.fetch_add(1, Relaxed);
        self.bump();
        let stream = Arc::new(Stream::default());
        let mut tasks = self.tasks();
        if tasks.list.len() >= tasks.prune_at {
            tasks.list.retain(|w| w.strong_count() > 0);
            tasks.prune_at = (tasks.list.len() * 2).max(32);
        }
        tasks.list.push(Arc::downgrade(&stream));
        tasks.next = Some(stream.clone());
        drop(tasks);
        // The clock is read only where resets are watched.
        let arrived = self.guard_resets.then(std::time::Instant::now);
        Open(self.clone(), stream, false, arrived)
    }

    /// The streams of a peer's connection at the inbound, watched for a rapid-reset flood.
    pub fn guarding_resets() -> Self {
        Self {
            guard_resets: true,
            ..Self::default()
        }
    }

    /// A request the app answered (not the sidecar itself): counted against the premature resets.
    pub fn forwarded(&self) {
        // Each stream's own task counts it, on any worker thread: an atomic add, not a load and
        // a store (which lose counts between threads).
        self.forwarded.fetch_add(1, Relaxed);
    }

    /// Resolves once the peer has reset more than [`RESET_FLOOD`] of its requests prematurely,
    /// and more than half of those the app answered or that were reset: the connection is to be
    /// closed. Never for a connection not [`Self::guarding_resets`].
    pub async fn flooded(&self) {
        self.flood.notified().await;
    }

    /// A request's service call dropped before it answered, `age` after it arrived (`None`: not
    /// timed, resets not being watched).
    fn abandon(&self, age: Option<Duration>) {
        self.forwarded();
        if !self.guard_resets || age.is_none_or(|age| age >= PREMATURE) {
            return;
        }
        let premature = self.premature.fetch_add(1, Relaxed) + 1;
        if premature == RESET_FLOOD + 1 || premature > RESET_FLOOD && premature.is_multiple_of(64) {
            // Checked when it first passes the floor, then every 64 more.
            if premature.saturating_mul(2) > self.forwarded.load(Relaxed) {
                self.flood.notify_one();
            }
        }
    }

    /// Requests reset by the peer prematurely, so far (counted only when guarding resets).
    pub fn premature(&self) -> usize {
        self.premature.load(Relaxed)
    }

    fn tasks(&self) -> std::sync::MutexGuard<'_, Tasks> {
        self.tasks.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Responses held now.
    pub fn held(&self) -> usize {
        self.held.load(Relaxed)
    }

    /// What the connection's state says after a period with `moved_before` at its start.
    fn judge(&self, moved_before: usize) -> Option<Ending> {
        if self.moved.load(Relaxed) != moved_before {
            return None;
        }
        if self.held.load(Relaxed) > 0 {
            return Some(Ending::Stalled);
        }
        (self.open.load(Relaxed) == 0).then_some(Ending::Idle)
    }

    /// Whether a response has been held since two periods before the one that just ended (so
    /// through the whole of the last two), however much moved on the connection meanwhile: a peer
    /// that keeps asking (a request now and then) while it leaves its responses untaken is still
    /// not reading them, and each holds the app connection its response comes from.
    fn held_two_periods(&self) -> bool {
        let now = self.period.load(Relaxed);
        self.aged[now.wrapping_sub(2) % AGES].load(Relaxed) > 0
    }

    /// Resolves when the connection has been idle, or has held a response its peer does not take,
    /// for between one and two `idle` periods with nothing else moving (or three, whatever moved;
    /// checked once a period). A response held through two whole periods while the peer took
    /// another response in the last one is ended alone (its stream's task aborted, counted in
    /// `stalled`), and the watch goes on.
    pub async fn watch(
        &self,
        idle: Duration,
        stalled: &prometheus_client::metrics::counter::Counter,
    ) -> Ending {
        let mut before = self.moved.load(Relaxed);
        let mut taken_before = self.taken.load(Relaxed);
        loop {
            tokio::time::sleep(idle).await;
            if let Some(ending) = self.judge(before) {
                return ending;
            }
            if self.held_two_periods() {
                if self.taken.load(Relaxed) == taken_before {
                    return Ending::Stalled;
                }
                match self.end_held_since(self.period.load(Relaxed).wrapping_sub(2) % AGES) {
                    Some(ended) => {
                        stalled.inc_by(ended);
                    }
                    None => return Ending::Stalled,
                }
            }
            self.period
                .store(self.period.load(Relaxed).wrapping_add(1), Relaxed);
            before = self.moved.load(Relaxed);
            taken_before = self.taken.load(Relaxed);
        }
    }

    /// Aborts the tasks of the streams whose responses are held in `slot` of [`Self::aged`]: how
    /// many, or `None` if one of them cannot be (no task known for it).
    fn end_held_since(&self, slot: usize) -> Option<u64> {
        let tasks = self.tasks();
        let mut ended = 0;
        for stream in tasks.list.iter().filter_map(Weak::upgrade) {
            if stream.held.load(Relaxed) == slot + 1 {
                stream.task.get()?.abort();
                ended += 1;
            }
        }
        // Held in that slot and not listed (its body made outside a stream's task).
        (ended as usize == self.aged[slot].load(Relaxed)).then_some(ended)
    }

    /// Empties the list of tasks once no request is in flight: an idle connection keeps none of
    /// its past streams (a listed one's allocation lives as long as its entry).
    fn forget_tasks(&self) {
        let mut tasks = self.tasks();
        // A request that came meanwhile lists its task after this, under the lock.
        if self.open.load(Relaxed) == 0 {
            tasks.list.clear();
            tasks.list.shrink_to(4);
            tasks.prune_at = 0;
        }
    }

    /// One more response held, in the slot of the period now; returns the slot.
    fn hold(&self) -> usize {
        self.held.fetch_add(1, Relaxed);
        let slot = self.period.load(Relaxed) % AGES;
        self.aged[slot].fetch_add(1, Relaxed);
        slot
    }
}

/// A request in flight on an h2 connection ([`Streams::request`]), its stream, whether it was
/// answered (its response's body holds it: [`Sending::new`]), and when it arrived.
#[derive(Debug)]
pub struct Open(Arc<Streams>, Arc<Stream>, bool, Option<std::time::Instant>);

impl Drop for Open {
    fn drop(&mut self) {
        if !self.2 {
            // Dropped with the service call: hyper drops it when the peer resets the stream (or
            // when the connection ends, which then does not matter).
            self.0.abandon(self.3.map(|at| at.elapsed()));
        }
        if self.0.open.fetch_sub(1, Relaxed) == 1 {
            self.0.forget_tasks();
        }
    }
}

/// A response body on its way to an h2 peer, counted in its connection's [`Streams`].
#[derive(Debug)]
pub struct Sending<B> {
    inner: B,
    open: Open,
    /// While held: the slot of [`Streams::aged`] it is counted in.
    held: Option<usize>,
    /// It has given hyper a frame: the next ask says the peer's window took it.
    gave: bool,
}

impl<B: HttpBody> Sending<B> {
    /// A response's body, held until hyper first asks it for a frame (an empty one never is).
    pub fn new(inner: B, mut open: Open) -> Self {
        open.2 = true;
        let mut sending = Self {
            inner,
            open,
            held: None,
            gave: false,
        };
        if !sending.inner.is_end_stream() {
            sending.hold();
        }
        sending
    }
}

impl<B> Sending<B> {
    fn hold(&mut self) {
        let slot = self.open.0.hold();
        self.held = Some(slot);
        self.open.1.held.store(slot + 1, Relaxed);
    }

    fn release(&mut self) {
        if let Some(slot) = self.held.take() {
            self.open.0.held.fetch_sub(1, Relaxed);
            self.open.0.aged[slot].fetch_sub(1, Relaxed);
            self.open.1.held.store(0, Relaxed);
        }
    }
}

impl<B> Drop for Sending<B> {
    fn drop(&mut self) {
        self.release();
    }
}

impl<B: HttpBody + Unpin> HttpBody for Sending<B> {
    type Data = B::Data;
    type Error = B::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Self::Data>, Self::Error>>> {
        let this = &mut *self;
        if this.held.is_some() && this.gave {
            this.open.0.taken.fetch_add(1, Relaxed);
        }
        this.release();
        this.open.0.bump();
        let r = Pin::new(&mut this.inner).poll_frame(cx);
        if let Poll::Ready(Some(Ok(_))) = &r {
            this.gave = true;
            this.hold();
        }
        r
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use bytes::Bytes;
    use http_body_util::BodyExt;

    type Frames = tokio_stream::Iter<std::vec::IntoIter<Result<Frame<Bytes>, std::io::Error>>>;

    fn body(chunks: &[&'static str]) -> http_body_util::StreamBody<Frames> {
        let frames: Vec<Result<Frame<Bytes>, std::io::Error>> = chunks
            .iter()
            .map(|c| Ok(Frame::data(Bytes::from_static(c.as_bytes()))))
            .collect();
        http_body_util::StreamBody::new(tokio_stream::iter(frames))
    }

    /// Requests whose service calls are dropped before they answer, within [`PREMATURE`] of
    /// arriving (hyper drops them when the peer resets the stream), are counted; once more than
    /// [`RESET_FLOOD`] of them are more than half of the requests the app answered or that were
    /// reset, the connection is told to close. Requests the app answered count against them; the
    /// sidecar's own answers (denials) do not; resets after [`PREMATURE`] are not counted; and an
    /// app's connection at the outbound is never watched.
    #[tokio::test]
    async fn a_peer_resetting_most_requests_before_their_answers_floods() {
        let flooded = |streams: &Arc<Streams>| {
            let streams = streams.clone();
            async move {
                tokio::time::timeout(Duration::from_millis(50), streams.flooded())
                    .await
                    .is_ok()
            }
        };
        let answered_by_app = |streams: &Arc<Streams>| {
            streams.forwarded();
            drop(Sending::new(body(&["a"]), streams.request()));
        };
        // As many answered by the app as reset: never more than half.
        let streams = Arc::new(Streams::guarding_resets());
        for _ in 0..RESET_FLOOD + 64 {
            answered_by_app(&streams);
        }
        for _ in 0..RESET_FLOOD + 64 {
            drop(streams.request());
        }
        assert_eq!(streams.premature(), RESET_FLOOD + 64);
        assert!(!flooded(&streams).await, "half or less");

        // Every request reset: told once past the floor, not before; the sidecar's own answers
        // (a denied request for each reset one) do not dilute them.
        let streams = Arc::new(Streams::guarding_resets());
        for _ in 0..RESET_FLOOD {
            drop(Sending::new(body(&["denied"]), streams.request()));
            drop(streams.request());
        }
        assert!(!flooded(&streams).await, "at the floor");
        drop(streams.request());
        assert!(
            flooded(&streams).await,
            "past the floor, every request reset"
        );

        // Reset after PREMATURE (a long poll, a stream cancelled by its client): not counted.
        let streams = Arc::new(Streams::guarding_resets());
        for _ in 0..=RESET_FLOOD {
            let mut open = streams.request();
            open.3 = open.3.map(|at| at - PREMATURE);
            drop(open);
        }
        assert_eq!(streams.premature(), 0);
        assert!(!flooded(&streams).await);

        // An app's connection at the outbound: never watched.
        let streams = Arc::new(Streams::default());
        for _ in 0..=RESET_FLOOD {
            drop(streams.request());
        }
        assert!(!flooded(&streams).await);
    }

    #[tokio::test]
    async fn a_response_its_peer_stops_taking_is_stalled_and_an_empty_connection_idle() {
        let streams = Arc::new(Streams::default());
        let quiet = streams.moved.load(Relaxed);
        assert_eq!(streams.judge(quiet), Some(Ending::Idle), "nothing open");

        // A request in the service (no response yet): neither idle nor stalled.
        let open = streams.request();
        let before = streams.moved.load(Relaxed);
        assert_eq!(streams.judge(before), None, "waiting on the app");

        // Its response's head went out, and hyper has not asked for its body (no room).
        let mut sending = Sending::new(body(&["a", "b"]), open);
        let before = streams.moved.load(Relaxed);
        assert_eq!(streams.judge(before), Some(Ending::Stalled));

        // It gave hyper one frame of two, and hyper asked for nothing more.
        let first = sending.frame().await.unwrap().unwrap();
        assert_eq!(first.into_data().unwrap(), "a");
        let before = streams.moved.load(Relaxed);
        assert_eq!(streams.judge(before), Some(Ending::Stalled));

        // Anything moving on the connection in the period defers the judgement.
        streams.request();
        assert_eq!(streams.judge(before), None);

        // Its last frame given: held until hyper sent it and dropped the body.
        let last = sending.frame().await.unwrap().unwrap();
        assert_eq!(last.into_data().unwrap(), "b");
        let before = streams.moved.load(Relaxed);
        assert_eq!(streams.judge(before), Some(Ending::Stalled));
        drop(sending);
        let before = streams.moved.load(Relaxed);
        assert_eq!(streams.judge(before), Some(Ending::Idle));
        assert_eq!(streams.held.load(Relaxed), 0);
        assert_eq!(streams.open.load(Relaxed), 0);
    }

    #[tokio::test]
    async fn a_response_waiting_on_the_app_is_not_held() {
        let streams = Arc::new(Streams::default());
        let (tx, rx) = tokio::sync::mpsc::channel::<Result<Frame<Bytes>, std::io::Error>>(1);
        let waiting =
            http_body_util::StreamBody::new(tokio_stream::wrappers::ReceiverStream::new(rx));
        let mut sending = Sending::new(waiting, streams.request());
        // hyper asks; the app has sent nothing yet.
        assert!(poll_once(&mut sending));
        let before = streams.moved.load(Relaxed);
        assert_eq!(
            streams.judge(before),
            None,
            "a slow app is not a stalled peer"
        );
        drop(tx);
    }

    /// Whether one poll of `body` (as hyper's ask for a frame) found nothing ready.
    fn poll_once<B: HttpBody + Unpin>(body: &mut B) -> bool {
        let waker = std::task::Waker::noop();
        let mut cx = Context::from_waker(waker);
        Pin::new(body).poll_frame(&mut cx).is_pending()
    }

    #[tokio::test]
    async fn a_response_dropped_while_held_releases_it() {
        let streams = Arc::new(Streams::default());
        let mut sending = Sending::new(body(&["a", "b"]), streams.request());
        sending.frame().await.unwrap().unwrap();
        assert_eq!(streams.held.load(Relaxed), 1);
        drop(sending);
        assert_eq!(streams.held.load(Relaxed), 0);
        assert_eq!(streams.open.load(Relaxed), 0);
    }

    /// A peer that keeps asking (a request every half period) while it takes none of a response
    /// defers the judgement of one period, not for good: the response held through two whole
    /// periods ends the connection.
    #[tokio::test(start_paused = true)]
    async fn a_response_held_two_periods_is_stalled_whatever_moved() {
        let streams = Arc::new(Streams::default());
        let _sending = Sending::new(body(&["a"]), streams.request());
        let trickle = {
            let streams = streams.clone();
            tokio::spawn(async move {
                loop {
                    tokio::time::sleep(Duration::from_secs(5)).await;
                    drop(streams.request());
                }
            })
        };
        let start = tokio::time::Instant::now();
        let ending = tokio::time::timeout(
            Duration::from_secs(60),
            streams.watch(Duration::from_secs(10), &Default::default()),
        )
        .await;
        assert_eq!(ending, Ok(Ending::Stalled));
        assert!(
            start.elapsed() <= Duration::from_secs(30),
            "{:?}",
            start.elapsed()
        );
        trickle.abort();
        // A response taken within the periods is not.
        let streams = Arc::new(Streams::default());
        let mut sending = Sending::new(body(&["a", "b", "c", "d"]), streams.request());
        let taking = {
            let streams = streams.clone();
            tokio::spawn(async move {
                while sending.frame().await.is_some() {
                    tokio::time::sleep(Duration::from_secs(8)).await;
                    drop(streams.request());
                }
            })
        };
        let watch = tokio::time::timeout(
            Duration::from_secs(30),
            streams.watch(Duration::from_secs(10), &Default::default()),
        )
        .await;
        assert_ne!(watch, Ok(Ending::Stalled));
        taking.abort();
    }

    /// A response held through two periods while the peer takes another one is ended alone: its
    /// stream's task is aborted (h2 resets the stream), counted, and the connection goes on. Before,
    /// the whole connection was dropped, the response being taken with it.
    #[tokio::test(start_paused = true)]
    async fn a_response_held_while_the_peer_takes_others_is_ended_alone() {
        use hyper::rt::Executor;
        let streams = Arc::new(Streams::default());
        // Spawned as hyper spawns a stream's task: one frame given, never asked for more.
        let (alive, aborted) = tokio::sync::oneshot::channel::<()>();
        // As hyper does: the request handed to the service, then its stream's task spawned.
        let open = streams.request();
        StreamExecutor(streams.clone()).execute(async move {
            let _alive = alive;
            let mut sending = Sending::new(body(&["a", "b"]), open);
            sending.frame().await.unwrap().unwrap();
            std::future::pending::<()>().await;
            drop(sending);
        });
        // Another response, taken a frame every 3 s.
        let (taker_alive, taker_gone) = tokio::sync::oneshot::channel::<()>();
        let open = streams.request();
        StreamExecutor(streams.clone()).execute(async move {
            let _alive = taker_alive;
            let mut sending = Sending::new(body(&["t"; 100]), open);
            while sending.frame().await.is_some() {
                tokio::time::sleep(Duration::from_secs(3)).await;
            }
        });
        let stalled = prometheus_client::metrics::counter::Counter::default();
        let watch = streams.watch(Duration::from_secs(10), &stalled);
        tokio::pin!(watch);
        let ended = tokio::select! {
            ending = &mut watch => panic!("the connection ended ({ending:?}) with a response being taken"),
            ended = tokio::time::timeout(Duration::from_secs(40), aborted) => ended,
        };
        assert!(
            matches!(ended, Ok(Err(_))),
            "the held response's task was not ended"
        );
        assert_eq!(stalled.get(), 1);
        // The connection, and the response being taken, go on.
        let more = tokio::time::timeout(Duration::from_secs(20), &mut watch).await;
        assert!(more.is_err(), "the watch ended: {more:?}");
        let mut taker_gone = taker_gone;
        assert!(
            matches!(
                taker_gone.try_recv(),
                Err(tokio::sync::oneshot::error::TryRecvError::Empty)
            ),
            "the taken response was ended"
        );
    }

    /// A connection with no request in flight keeps no entry for its past streams.
    #[tokio::test]
    async fn the_list_of_stream_tasks_is_emptied_when_no_request_is_in_flight() {
        use hyper::rt::Executor;
        let streams = Arc::new(Streams::default());
        let (done, finished) = tokio::sync::oneshot::channel();
        let counted = streams.clone();
        let first = streams.request();
        StreamExecutor(streams.clone()).execute(async move {
            let second = Sending::new(body(&["a"]), counted.request());
            let listed = counted.tasks.lock().unwrap().list.len();
            drop(second);
            let still = counted.tasks.lock().unwrap().list.len();
            drop(first);
            let after = counted.tasks.lock().unwrap().list.len();
            let _ = done.send((listed, still, after));
        });
        assert_eq!(finished.await.unwrap(), (2, 2, 0));
    }

    #[tokio::test(start_paused = true)]
    async fn the_watch_ends_an_idle_connection_within_two_periods() {
        let streams = Arc::new(Streams::default());
        let start = tokio::time::Instant::now();
        let ending = streams
            .watch(Duration::from_secs(10), &Default::default())
            .await;
        assert_eq!(ending, Ending::Idle);
        assert!(start.elapsed() <= Duration::from_secs(20));
    }
}
