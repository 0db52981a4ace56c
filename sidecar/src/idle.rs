//! HTTP/1.1 keep-alive connections that hold no buffers while idle.
//!
//! hyper keeps a connection's read buffer (8 KiB, often grown to 16 KiB) and its header write buffer
//! (8 KiB) for as long as the connection lives, idle or not: about three quarters of what an idle
//! mTLS connection cost the terminating sidecar. So a connection that has been quiet for a moment is
//! taken out of hyper ([`hyper::server::conn::http1::UpgradeableConnection::into_parts`]) and waits
//! for its next byte with nothing but the TLS session and the socket; that byte is handed to a new
//! hyper connection, which reads the rest of the request as usual.
//!
//! A connection is only taken apart when hyper cannot be holding anything for it: no request whose
//! body is still arriving, no response hyper has not finished sending (both counted by [`Tracked`]
//! bodies), nothing written and not yet flushed, and no byte read or written between two checks.
//! The first check comes after the connection's hold: [`FIRST_HOLD`] at first, doubled (up to
//! [`MAX_HOLD`]) each time the connection comes back within [`MAX_HOLD`] of going quiet. Each
//! check that finds bytes moved puts the next one twice as far, up to [`MAX_HOLD`]. A connection
//! that sent one request and waits gives its buffers back within about 45 ms; one with steady
//! traffic is soon checked only every 300 ms and not taken apart between its requests.
//!
//! Why so soon: with a fixed 300 ms check, a burst of new connections held hundreds of hyper's
//! buffers at once, and the holes they left between the connections' long-lived state stayed
//! resident. Memory per idle mTLS connection at the terminator went from 15.9-16.8 KiB to 11.9 KiB
//! (`bench-run --scenarios memory --runs 1`, dist, twice each way).
//!
//! Bytes hyper had read but not yet used (a pipelined or partial request) go back in front of the
//! stream. The idle limit stays hyper's header-read timeout, counted from when the
//! connection went quiet, whether it waits in hyper or here; a partial request head never restarts it.

use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering::Relaxed};

use crate::inbound::form_budget::{NoRoom, Room};
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::{Buf, Bytes, BytesMut};
use http::{Request, Response};
use hyper::body::Incoming;
use hyper::body::{Body as HttpBody, Frame, SizeHint};
use hyper::service::service_fn;
use hyper_util::rt::TokioIo;
use meshid_runtime::wake::WhenWoken;
use prometheus_client::metrics::gauge::Gauge;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, ReadBuf};
use tokio::time::Instant;

use crate::conn::Shared;
use crate::http::{Body, Closing};

/// A new connection's hold: when a serving connection first checks whether it has gone quiet (see
/// the module docs).
pub const FIRST_HOLD: Duration = Duration::from_millis(15);
/// The longest hold, reached by a connection that keeps coming back soon after going quiet.
pub const MAX_HOLD: Duration = Duration::from_millis(300);

/// The hold after a connection that went quiet at `quiet_since` came back at `now`: doubled when
/// it came back within [`MAX_HOLD`] (taking it apart gained little), else unchanged.
fn next_hold(hold: Duration, quiet_since: Instant, now: Instant) -> Duration {
    if now.saturating_duration_since(quiet_since) < MAX_HOLD {
        (hold * 2).min(MAX_HOLD)
    } else {
        hold
    }
}

/// The request body every handler receives.
pub type ReqBody = Tracked<Incoming>;
/// The response body every handler returns ([`respond`]).
pub type RespBody = Tracked<Body>;

/// What serves a connection's requests: called with each request and the [`Call`] that counts it
/// (`None` on h2).
pub trait Handler<F>:
    Fn(Request<ReqBody>, Option<Call>) -> F + Clone + Send + Sync + 'static
{
}

impl<T, F> Handler<F> for T where
    T: Fn(Request<ReqBody>, Option<Call>) -> F + Clone + Send + Sync + 'static
{
}

/// The future a [`Handler`] returns: the response, never an error (errors are answered).
pub trait Answer:
    std::future::Future<Output = Result<Response<RespBody>, std::convert::Infallible>> + Send + 'static
{
}

impl<T> Answer for T where
    T: std::future::Future<Output = Result<Response<RespBody>, std::convert::Infallible>>
        + Send
        + 'static
{
}

/// A handler's response, counted for its connection until hyper has sent it (`call` is what the
/// connection handed the handler with the request; `None` on h2).
pub fn respond(call: Option<Call>, resp: Response<Body>) -> Response<RespBody> {
    match call {
        Some(call) => resp.map(|b| Tracked::response(b, call)),
        None => resp.map(Tracked::untracked),
    }
}

/// What a connection's requests and its socket tell the loop that drives it. Written from inside
/// hyper (bodies, the wrapped socket), read by the loop between polls; relaxed atomics, as all of it
/// runs on one task.
#[derive(Debug, Default)]
pub struct Activity {
    /// Requests whose body has not ended, plus responses hyper still holds.
    open: AtomicUsize,
    /// Requests handed to the service so far.
    requests: AtomicUsize,
    /// Bumped by every read or write that moved bytes.
    moved: AtomicUsize,
    /// Something was written and not yet flushed (or a write is blocked).
    unflushed: AtomicBool,
}

impl Activity {
    fn bump(&self) {
        self.moved
            .store(self.moved.load(Relaxed).wrapping_add(1), Relaxed);
    }
}

/// A body that tells [`Activity`] when it is done: a request body when it has ended, a response
/// body when hyper drops it (sent in full, or the connection failed). A request body dropped before
/// its end leaves the connection marked busy for good: hyper closes such a connection after the
/// response anyway, and what is left of the body on the wire must never be read as a new request.
pub struct Tracked<B> {
    inner: B,
    activity: Option<Arc<Activity>>,
    response: bool,
    /// Trailers lose what a peer may not say to the app ([`Tracked::strip_peer_trailers`]).
    peer_trailers: bool,
    /// A body read ahead ([`Tracked::read_whole`]), given out again before anything else.
    replay: Option<Box<Replay>>,
}

/// What [`Tracked::read_whole`] read: the data, then the trailers, then the end.
struct Replay {
    data: Option<Bytes>,
    trailers: Option<http::HeaderMap>,
    /// The memory the data holds, charged to the process's form budget until the body is dropped
    /// (the data given out may still be in hyper's buffers until then).
    _charged: Room,
}

/// Why [`Tracked::read_whole`] did not read a whole body.
#[derive(Debug)]
pub enum ReadWhole {
    /// More than the limit.
    TooLarge,
    /// The memory it needs is not in the budget (its charge is given back at once).
    NoRoom(NoRoom),
    /// The peer's body failed (reset, or bad framing).
    Failed(hyper::Error),
}

impl Tracked<Incoming> {
    /// Reads the whole body (at most `limit` bytes of data) and keeps it to be given out again:
    /// returns its data. Read through [`HttpBody::poll_frame`], so that its end is counted; its
    /// trailers are stripped when given out, as any are.
    ///
    /// What the data holds is charged to `room` before it is allocated: the declared length at
    /// once, else a buffer that doubles, so a body that sends less than it declared, or whose
    /// buffer has room to spare, is charged the memory it holds rather than the bytes received.
    pub async fn read_whole(&mut self, limit: usize, mut room: Room) -> Result<Bytes, ReadWhole> {
        use http_body_util::BodyExt;
        let declared = self.size_hint().exact().map(usize::try_from);
        let mut data = match declared {
            Some(Ok(n)) if n <= limit => {
                room.grow_to(n).map_err(ReadWhole::NoRoom)?;
                Vec::with_capacity(n)
            }
            Some(_) => return Err(ReadWhole::TooLarge),
            None => Vec::new(),
        };
        let mut trailers = None;
        while let Some(frame) = self.frame().await {
            let frame = frame.map_err(ReadWhole::Failed)?;
            match frame.into_data() {
                Ok(chunk) => {
                    let needed = data.len() + chunk.len();
                    if needed > limit {
                        return Err(ReadWhole::TooLarge);
                    }
                    if needed > data.capacity() {
                        let grown = needed.max(data.capacity() * 2).min(limit);
                        room.grow_to(grown).map_err(ReadWhole::NoRoom)?;
                        data.reserve_exact(grown - data.len());
                    }
                    data.extend_from_slice(&chunk);
                }
                Err(frame) => trailers = frame.into_trailers().ok(),
            }
        }
        let data = Bytes::from(data);
        self.replay = Some(Box::new(Replay {
            data: (!data.is_empty()).then(|| data.clone()),
            trailers,
            _charged: room,
        }));
        Ok(data)
    }
}

impl<B> Tracked<B> {
    /// A body nothing waits for (h2 connections, which are never taken apart).
    pub fn untracked(inner: B) -> Self {
        Self {
            inner,
            activity: None,
            response: false,
            peer_trailers: false,
            replay: None,
        }
    }

    /// A peer's request on its way to the app: its trailers lose every peer-sent spelling of the
    /// headers only the inbound sets, and the hop-by-hop ones ([`crate::http::strip_peer_trailers`]),
    /// as its headers do.
    pub fn strip_peer_trailers(&mut self) {
        self.peer_trailers = true;
    }

    fn request(inner: B, activity: &Arc<Activity>) -> Self
    where
        B: HttpBody,
    {
        if inner.is_end_stream() {
            return Self::untracked(inner);
        }
        activity.open.fetch_add(1, Relaxed);
        Self {
            inner,
            activity: Some(activity.clone()),
            response: false,
            peer_trailers: false,
            replay: None,
        }
    }

    /// The body of the response to `call`, which goes on counting until hyper drops it.
    fn response(inner: B, mut call: Call) -> Self {
        Self {
            inner,
            activity: call.0.take(),
            response: true,
            peer_trailers: false,
            replay: None,
        }
    }

    fn done(&mut self) {
        if let Some(a) = self.activity.take() {
            a.open.fetch_sub(1, Relaxed);
        }
    }
}

/// A request handed to the service: counted from the call until its response body is dropped (or
/// the call itself, when hyper drops it unanswered).
pub struct Call(Option<Arc<Activity>>);

impl Call {
    fn new(activity: &Arc<Activity>) -> Self {
        activity.requests.fetch_add(1, Relaxed);
        activity.open.fetch_add(1, Relaxed);
        Self(Some(activity.clone()))
    }
}

impl Drop for Call {
    fn drop(&mut self) {
        if let Some(a) = self.0.take() {
            a.open.fetch_sub(1, Relaxed);
        }
    }
}

impl<B> Drop for Tracked<B> {
    fn drop(&mut self) {
        if self.response {
            self.done();
        }
    }
}

impl<B: HttpBody + Unpin> HttpBody for Tracked<B>
where
    B::Data: From<Bytes>,
{
    type Data = B::Data;
    type Error = B::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Self::Data>, Self::Error>>> {
        let this = &mut *self;
        if let Some(replay) = this.replay.as_deref_mut() {
            // The body was read whole: what is left of it, then the end.
            if let Some(data) = replay.data.take() {
                return Poll::Ready(Some(Ok(Frame::data(data.into()))));
            }
            return Poll::Ready(replay.trailers.take().map(|mut t| {
                if this.peer_trailers {
                    crate::http::strip_peer_trailers(&mut t);
                }
                Ok(Frame::trailers(t))
            }));
        }
        let mut r = Pin::new(&mut this.inner).poll_frame(cx);
        if this.peer_trailers
            && let Poll::Ready(Some(Ok(frame))) = &mut r
            && let Some(trailers) = frame.trailers_mut()
        {
            crate::http::strip_peer_trailers(trailers);
        }
        if !this.response && this.activity.is_some() {
            let ended = match &r {
                Poll::Ready(None) => true,
                Poll::Ready(Some(Ok(_))) => this.inner.is_end_stream(),
                _ => false,
            };
            if ended {
                this.done();
            }
        }
        r
    }

    fn is_end_stream(&self) -> bool {
        match &self.replay {
            Some(replay) => replay.data.is_none() && replay.trailers.is_none(),
            None => self.inner.is_end_stream(),
        }
    }

    fn size_hint(&self) -> SizeHint {
        match &self.replay {
            Some(replay) => {
                SizeHint::with_exact(replay.data.as_ref().map_or(0, |d| d.len() as u64))
            }
            None => self.inner.size_hint(),
        }
    }
}

/// The socket as hyper sees it: bytes to replay first, and [`Activity`] kept current.
struct Watched<T> {
    inner: T,
    prefix: Bytes,
    activity: Arc<Activity>,
}

impl<T: AsyncRead + Unpin> AsyncRead for Watched<T> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        let this = self.get_mut();
        if !this.prefix.is_empty() {
            let n = this.prefix.len().min(buf.remaining());
            buf.put_slice(&this.prefix[..n]);
            this.prefix.advance(n);
            if this.prefix.is_empty() {
                // Let go of the allocation the replayed bytes came from.
                this.prefix = Bytes::new();
            }
            this.activity.bump();
            return Poll::Ready(Ok(()));
        }
        let before = buf.filled().len();
        let r = Pin::new(&mut this.inner).poll_read(cx, buf);
        if matches!(r, Poll::Ready(Ok(()))) && buf.filled().len() > before {
            this.activity.bump();
        }
        r
    }
}

impl<T> Watched<T> {
    /// Counts a write that moved bytes; a blocked one (the reader not taking them) moves nothing,
    /// however often hyper tries it again.
    fn wrote(&self, r: &Poll<std::io::Result<usize>>) {
        if matches!(r, Poll::Ready(Ok(n)) if *n > 0) {
            self.activity.bump();
        }
    }
}

impl<T: AsyncWrite + Unpin> AsyncWrite for Watched<T> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        data: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        let this = self.get_mut();
        this.activity.unflushed.store(true, Relaxed);
        let r = Pin::new(&mut this.inner).poll_write(cx, data);
        this.wrote(&r);
        r
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> Poll<std::io::Result<usize>> {
        let this = self.get_mut();
        this.activity.unflushed.store(true, Relaxed);
        let r = Pin::new(&mut this.inner).poll_write_vectored(cx, bufs);
        this.wrote(&r);
        r
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        let this = self.get_mut();
        let r = Pin::new(&mut this.inner).poll_flush(cx);
        if matches!(r, Poll::Ready(Ok(()))) {
            this.activity.unflushed.store(false, Relaxed);
        }
        r
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_shutdown(cx)
    }
}

/// hyper's h2 connection preface; anything else on a new connection is HTTP/1.x.
const H2_PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";

/// How a connection's first bytes read.
pub enum Opening {
    /// The h2 preface (all of it read).
    H2(Bytes),
    /// Anything else: HTTP/1.x (these bytes read).
    H1(Bytes),
    /// Closed, failed or silent for `limit` before saying which.
    Gone,
}

/// Reads a new connection's first bytes, up to what tells h2 from HTTP/1.x, within `limit`.
pub async fn opening<T: AsyncRead + Unpin>(io: &mut T, limit: Duration) -> Opening {
    let mut buf = [0u8; H2_PREFACE.len()];
    let mut filled = 0;
    let read = async {
        while filled < buf.len() {
            match io.read(&mut buf[filled..]).await {
                Ok(0) | Err(_) => return false,
                Ok(n) => filled += n,
            }
            if buf[..filled] != H2_PREFACE[..filled] {
                return true;
            }
        }
        true
    };
    match tokio::time::timeout(limit, read).await {
        Ok(true) if filled == H2_PREFACE.len() && buf == H2_PREFACE => {
            Opening::H2(Bytes::copy_from_slice(&buf))
        }
        Ok(true) => Opening::H1(Bytes::copy_from_slice(&buf[..filled])),
        _ => Opening::Gone,
    }
}

/// The h2 side: the socket with the preface put back, requests' bodies untracked.
pub fn replay<T>(inner: T, prefix: Bytes) -> impl AsyncRead + AsyncWrite + Unpin + Send + 'static
where
    T: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    Watched {
        inner,
        prefix,
        activity: Arc::default(),
    }
}

/// Why the loop stopped serving a hyper connection.
enum Stop {
    /// Shutdown, the peer certificate's expiry, a policy change: drain gracefully (cut at once if
    /// the watch resolves: the peer revoked meanwhile).
    Drain(Option<crate::http::CutWatch>),
    /// The peer was revoked ([`Closing::Cut`]): close at once, a response in flight with it.
    Cut,
    /// A partial request head outlived the idle limit.
    Close,
    /// A response's write has been blocked, nothing moving, for the idle timeout: close.
    Stalled,
    /// Quiet: take it apart.
    Release,
}

/// What a connection with no byte moved since the last tick and no request head awaited comes to:
/// a write the reader has not let through (its socket full) for `stall_limit` is a response not
/// being taken ([`Stop::Stalled`]), whether or not a body is still open: with keep-alive off,
/// hyper takes a response's last bytes into its buffer, drops the body and waits for ever to flush
/// before it closes, never reading again (before, only a write with a body open counted, and such
/// a connection outlived the idle timeout; on the outbound's app side it lived until shutdown).
/// Nothing unflushed and nothing open: quiet ([`Stop::Release`]).
fn quiet_verdict(
    unflushed: bool,
    open: usize,
    quiet_for: Duration,
    stall_limit: Duration,
) -> Option<Stop> {
    if unflushed {
        (quiet_for >= stall_limit).then_some(Stop::Stalled)
    } else {
        (open == 0).then_some(Stop::Release)
    }
}

/// How a stretch of serving by hyper ended.
enum Served<IO> {
    /// The connection is finished (closed, drained or failed).
    Done,
    /// Quiet: hyper let go of the socket. `unread` is what hyper had read and not used.
    Released {
        io: Watched<IO>,
        unread: Bytes,
        quiet_since: Instant,
    },
}

/// Serves an HTTP/1.x connection whose first bytes are `prefix`, releasing hyper's buffers whenever
/// it goes quiet; `idle` counts the connections waiting that way.
///
/// An idle connection's task keeps only this function's state: hyper's connection, its timers and
/// everything else of a stretch of serving live in [`serve_until_quiet`]'s boxed future, freed
/// when the connection goes quiet.
#[allow(clippy::too_many_arguments)]
pub async fn serve_h1<IO, S, F, R>(
    io: IO,
    prefix: Bytes,
    shared: &Shared,
    deadline: Option<Instant>,
    revoked: R,
    svc: S,
    idle: Gauge,
) where
    R: std::future::Future<Output = Closing> + Send + Unpin,
    IO: AsyncRead + AsyncWrite + Unpin + Send + 'static,
    S: Handler<F>,
    F: Answer,
{
    let head_timeout = crate::http::head_timeout(shared);
    let mut shutdown = shared.shutdown.clone();
    let mut expired = Box::pin(async move {
        match deadline {
            Some(d) => tokio::time::sleep_until(d).await,
            None => std::future::pending().await,
        }
    });
    let mut revoked = revoked;
    let activity = Arc::new(Activity::default());
    let mut io = Watched {
        inner: io,
        prefix,
        activity: activity.clone(),
    };
    // Since when the connection has waited for a request head that has not come (a new connection,
    // one woken from idle, or one given back a partial head): hyper's own header timer restarts with
    // each hyper connection, so this one bounds the wait across them. `None` once a request started.
    let mut waiting_since = Some(Instant::now());
    let mut hold = FIRST_HOLD;
    loop {
        let stretch = Box::pin(serve_until_quiet(
            io,
            shared,
            &svc,
            &activity,
            hold,
            &mut waiting_since,
            &mut shutdown,
            &mut expired,
            &mut revoked,
        ));
        let (released, unread, quiet_since) = match stretch.await {
            Served::Done => return,
            Served::Released {
                io,
                unread,
                quiet_since,
            } => (io, unread, quiet_since),
        };
        io = released;
        if !unread.is_empty() || !io.prefix.is_empty() {
            // hyper had read part of a request (or not yet read what was put back): serve it at
            // once, bytes in their order, and keep counting the wait from when it began.
            let mut joined = BytesMut::with_capacity(unread.len() + io.prefix.len());
            joined.extend_from_slice(&unread);
            joined.extend_from_slice(&io.prefix);
            io.prefix = joined.freeze();
            waiting_since.get_or_insert(quiet_since);
            continue;
        }
        drop(unread);
        // hyper's buffers are gone: let their pages go back to the kernel.
        shared.heap.freed();
        let limit = head_timeout.saturating_sub(quiet_since.elapsed());
        let held = meshid_runtime::exposition::GaugeHeld::new(&idle);
        let mut byte = [0u8; 1];
        let woke = tokio::select! {
            r = tokio::time::timeout(limit, io.inner.read(&mut byte)) => match r {
                Ok(Ok(1)) => true,
                // The peer closed, the socket failed, or the idle limit passed.
                _ => false,
            },
            () = meshid_runtime::net::stopped(&mut shutdown) => false,
            () = &mut expired => false,
            // A revoked peer's idle connection is closed now, not when it next sends a request.
            _ = &mut revoked => false,
        };
        drop(held);
        if !woke {
            Box::pin(close(io.inner)).await;
            return;
        }
        io.prefix = Bytes::copy_from_slice(&byte);
        waiting_since = Some(quiet_since);
        hold = next_hold(hold, quiet_since, Instant::now());
    }
}

/// Serves requests with a new hyper connection until the connection ends or goes quiet, then hands
/// the socket back ([`Served::Released`]).
#[allow(clippy::too_many_arguments)]
async fn serve_until_quiet<IO, S, F, E, R>(
    io: Watched<IO>,
    shared: &Shared,
    svc: &S,
    activity: &Arc<Activity>,
    hold: Duration,
    waiting_since: &mut Option<Instant>,
    shutdown: &mut tokio::sync::watch::Receiver<bool>,
    expired: &mut E,
    revoked: &mut R,
) -> Served<IO>
where
    E: std::future::Future<Output = ()> + Unpin,
    R: std::future::Future<Output = Closing> + Unpin,
    IO: AsyncRead + AsyncWrite + Unpin + Send + 'static,
    S: Handler<F>,
    F: Answer,
{
    let head_timeout = crate::http::head_timeout(shared);
    let stall_limit = shared.limits.idle_timeout;
    let svc = svc.clone();
    let a = activity.clone();
    // The handler's future is handed to hyper as it is (no wrapping future to move it through):
    // the call it carries counts the response.
    let service = service_fn(move |req: Request<Incoming>| {
        let call = Call::new(&a);
        svc(req.map(|b| Tracked::request(b, &a)), Some(call))
    });
    let mut conn = crate::http::http1_builder(shared)
        .serve_connection(TokioIo::new(io), service)
        .with_upgrades();
    let requests_at_start = activity.requests.load(Relaxed);
    let mut moved = activity.moved.load(Relaxed);
    let mut quiet_since = Instant::now();
    // The first check comes after the connection's hold; each check that finds bytes moved puts
    // the next one twice as far (up to MAX_HOLD), so a busy connection is checked no more often
    // than it was with a fixed 300 ms tick.
    let mut every = hold;
    let tick = tokio::time::sleep(every);
    tokio::pin!(tick);
    // What ends the connection from outside: polled only when one of them was woken, not at every
    // wake of this task (several per request).
    let ended = std::pin::pin!(async {
        tokio::select! {
            () = meshid_runtime::net::stopped(shutdown) => Stop::Drain(None),
            () = &mut *expired => {
                tracing::info!("closing gracefully: the peer's certificate expired");
                Stop::Drain(None)
            }
            closing = &mut *revoked => match closing {
                Closing::Drain(cut) => Stop::Drain(cut),
                Closing::Cut => Stop::Cut,
            },
        }
    });
    let mut ended = WhenWoken::new(ended);
    let stop = loop {
        tokio::select! {
            // The end signals first: were `conn` polled first after a revocation, a request that
            // arrived with it would go on to the app.
            biased;
            stop = &mut ended => break stop,
            r = &mut conn => {
                if let Err(error) = r {
                    tracing::debug!(%error, "http connection ended");
                }
                return Served::Done;
            }
            () = &mut tick => {
                let now = Instant::now();
                if activity.requests.load(Relaxed) != requests_at_start {
                    *waiting_since = None;
                }
                let m = activity.moved.load(Relaxed);
                if m != moved {
                    moved = m;
                    quiet_since = now;
                    every = (every * 2).min(MAX_HOLD);
                } else if let Some(since) = *waiting_since {
                    if now.duration_since(since) >= head_timeout {
                        break Stop::Close;
                    }
                } else if let Some(stop) = quiet_verdict(
                    activity.unflushed.load(Relaxed),
                    activity.open.load(Relaxed),
                    now.duration_since(quiet_since),
                    stall_limit,
                ) {
                    break stop;
                }
                tick.as_mut().reset(now + every);
            }
        }
    };
    match stop {
        Stop::Drain(cut) => {
            // Finish in-flight requests; HTTP/1.1 closes after the current response. Within the
            // grace period, as h2 does: a streaming response, or one the peer does not read, would
            // keep a revoked or expired peer's connection open for good.
            Pin::new(&mut conn).graceful_shutdown();
            if !crate::http::drain_unless_cut(conn, shared.limits.grace, cut).await {
                static LATE: meshid_runtime::log_limit::LogLimit =
                    meshid_runtime::log_limit::LogLimit::new(10.0, 1.0);
                if let Some(left_out) = LATE.take() {
                    tracing::info!(
                        grace_s = shared.limits.grace.as_secs(),
                        left_out,
                        "closing: the response in flight did not finish within the grace period"
                    );
                }
            }
            Served::Done
        }
        Stop::Stalled => {
            // Dropping the connection drops the response's body: an outbound's upstream stream is
            // reset and its flow-control window handed back to the connection the other clients
            // share; an inbound's app connection is let go.
            // A line per connection a client chooses to stall: limited, as denials are.
            static STALLED: meshid_runtime::log_limit::LogLimit =
                meshid_runtime::log_limit::LogLimit::new(10.0, 1.0);
            if let Some(left_out) = STALLED.take() {
                tracing::info!(
                    idle_timeout_s = stall_limit.as_secs(),
                    left_out,
                    "closing: the client has taken none of the response for the idle timeout"
                );
            }
            shared.metrics.stalled_responses.inc();
            Served::Done
        }
        // Dropped: a response in flight ends with it, its app connection let go (the revocation
        // was logged where it was seen).
        Stop::Cut => Served::Done,
        Stop::Close => {
            tracing::debug!("closing: no complete request head within the idle limit");
            if let Some(parts) = conn.into_parts() {
                close(parts.io.into_inner().inner).await;
            }
            Served::Done
        }
        // Upgraded connections end in `conn` above, so the parts are always there.
        Stop::Release => match conn.into_parts() {
            Some(parts) => Served::Released {
                io: parts.io.into_inner(),
                unread: parts.read_buf,
                quiet_since,
            },
            None => Served::Done,
        },
    }
}

/// Ends an idle connection the way hyper does: TLS close_notify and FIN, bounded in time.
async fn close<T: AsyncWrite + Unpin>(mut io: T) {
    let _ = tokio::time::timeout(Duration::from_secs(1), io.shutdown()).await;
}

#[cfg(test)]
mod tests {
    use super::*;
    use http_body_util::{BodyExt, Full};

    #[tokio::test]
    async fn a_peers_trailers_lose_what_only_the_sidecar_says() {
        let mut trailers = http::HeaderMap::new();
        trailers.insert(
            "x-forwarded-client-cert",
            "URI=spiffe://td/ns/x/sa/admin".parse().unwrap(),
        );
        trailers.insert("grpc-status", "0".parse().unwrap());
        let body = || {
            let frames: Vec<Result<Frame<Bytes>, std::convert::Infallible>> = vec![
                Ok(Frame::data(Bytes::from_static(b"hello"))),
                Ok(Frame::trailers(trailers.clone())),
            ];
            http_body_util::StreamBody::new(tokio_stream::iter(frames))
        };
        let mut stripped = Tracked::untracked(body());
        stripped.strip_peer_trailers();
        let got = stripped.collect().await.unwrap();
        let t = got.trailers().unwrap().clone();
        assert_eq!(got.to_bytes(), "hello");
        assert!(!t.contains_key("x-forwarded-client-cert"));
        assert_eq!(t.get("grpc-status").unwrap(), "0");
        // Left alone unless asked (a response's trailers, or the outbound's requests).
        let kept = Tracked::untracked(body()).collect().await.unwrap();
        assert!(
            kept.trailers()
                .unwrap()
                .contains_key("x-forwarded-client-cert")
        );
    }

    #[tokio::test]
    async fn opening_tells_h2_from_http1_and_keeps_the_bytes() {
        let (mut a, mut b) = tokio::io::duplex(64);
        a.write_all(H2_PREFACE).await.unwrap();
        match opening(&mut b, Duration::from_secs(5)).await {
            Opening::H2(p) => assert_eq!(&p[..], H2_PREFACE),
            _ => panic!("the h2 preface was not recognised"),
        }
        let (mut a, mut b) = tokio::io::duplex(64);
        a.write_all(b"PRI * HTTP/1.1\r\n").await.unwrap();
        match opening(&mut b, Duration::from_secs(5)).await {
            Opening::H1(p) => assert_eq!(&p[..], b"PRI * HTTP/1.1\r\n"),
            _ => panic!("a near miss of the preface is HTTP/1"),
        }
        let (mut a, mut b) = tokio::io::duplex(64);
        a.write_all(b"G").await.unwrap();
        match opening(&mut b, Duration::from_secs(5)).await {
            Opening::H1(p) => assert_eq!(&p[..], b"G"),
            _ => panic!("one byte that is not P is HTTP/1"),
        }
        let (a, mut b) = tokio::io::duplex(64);
        drop(a);
        assert!(matches!(
            opening(&mut b, Duration::from_secs(5)).await,
            Opening::Gone
        ));
        let (_a, mut b) = tokio::io::duplex(64);
        assert!(matches!(
            opening(&mut b, Duration::from_millis(50)).await,
            Opening::Gone
        ));
    }

    #[tokio::test]
    async fn a_request_body_counts_until_its_end_and_a_response_until_dropped() {
        let activity = Arc::new(Activity::default());
        let req = Tracked::request(Full::new(Bytes::from_static(b"abc")), &activity);
        assert_eq!(activity.open.load(Relaxed), 1);
        let body = req.collect().await.unwrap().to_bytes();
        assert_eq!(&body[..], b"abc");
        assert_eq!(activity.open.load(Relaxed), 0, "ended body still counted");

        let empty = Tracked::request(Full::new(Bytes::new()), &activity);
        assert_eq!(
            activity.open.load(Relaxed),
            0,
            "an empty body is never open"
        );
        drop(empty);

        let unread = Tracked::request(Full::new(Bytes::from_static(b"abc")), &activity);
        drop(unread);
        assert_eq!(
            activity.open.load(Relaxed),
            1,
            "a body dropped before its end must keep the connection busy"
        );

        let activity = Arc::new(Activity::default());
        let call = Call::new(&activity);
        assert_eq!(
            activity.open.load(Relaxed),
            1,
            "a call is open before it answers"
        );
        let resp = Tracked::response(Full::new(Bytes::from_static(b"x")), call);
        assert_eq!(activity.open.load(Relaxed), 1);
        drop(resp);
        assert_eq!(activity.open.load(Relaxed), 0);
        drop(Call::new(&activity));
        assert_eq!(activity.open.load(Relaxed), 0, "a call dropped unanswered");
    }

    #[test]
    fn a_write_stuck_for_the_idle_timeout_is_stalled_with_or_without_a_body_open() {
        let limit = Duration::from_secs(300);
        let stalled =
            |open, quiet| matches!(quiet_verdict(true, open, quiet, limit), Some(Stop::Stalled));
        // A body still streaming, or none (the response's last bytes in hyper's buffer, its body
        // dropped, keep-alive off): both stalled at the limit, neither before.
        assert!(stalled(1, limit));
        assert!(stalled(0, limit));
        assert!(!stalled(0, limit - Duration::from_millis(1)));
        assert!(quiet_verdict(true, 0, Duration::ZERO, limit).is_none());
        // Flushed: quiet once nothing is open, busy while a body is.
        assert!(matches!(
            quiet_verdict(false, 0, Duration::ZERO, limit),
            Some(Stop::Release)
        ));
        assert!(quiet_verdict(false, 1, limit * 2, limit).is_none());
    }

    #[test]
    fn a_connection_that_keeps_coming_back_soon_is_held_longer() {
        let t0 = Instant::now();
        let mut hold = FIRST_HOLD;
        // Back 40 ms after going quiet, again and again: the hold doubles up to its cap.
        let mut seen = Vec::new();
        for _ in 0..6 {
            hold = next_hold(hold, t0, t0 + Duration::from_millis(40));
            seen.push(hold.as_millis());
        }
        assert_eq!(seen, [30, 60, 120, 240, 300, 300]);
        // Back only after a longer pause: taking it apart was worth it, the hold stays.
        assert_eq!(
            next_hold(FIRST_HOLD, t0, t0 + MAX_HOLD),
            FIRST_HOLD,
            "a pause of MAX_HOLD or more"
        );
        assert_eq!(
            next_hold(FIRST_HOLD, t0, t0 + Duration::from_secs(30)),
            FIRST_HOLD
        );
    }

    #[tokio::test]
    async fn watched_replays_its_prefix_first_and_tracks_flushes() {
        let (mut a, b) = tokio::io::duplex(64);
        let activity = Arc::new(Activity::default());
        let mut w = Watched {
            inner: b,
            prefix: Bytes::from_static(b"GE"),
            activity: activity.clone(),
        };
        a.write_all(b"T /").await.unwrap();
        let mut got = Vec::new();
        let mut buf = [0u8; 8];
        while got.len() < 5 {
            let n = w.read(&mut buf).await.unwrap();
            got.extend_from_slice(&buf[..n]);
        }
        assert_eq!(got, b"GET /");
        assert!(activity.moved.load(Relaxed) >= 2);
        w.write_all(b"HTTP/1.1 200 OK\r\n").await.unwrap();
        assert!(activity.unflushed.load(Relaxed));
        w.flush().await.unwrap();
        assert!(!activity.unflushed.load(Relaxed));
    }
}
