//! HTTP/1.1 exchanges for requests without a body, on connections of a pool's own: the head is
//! written and the response read and framed ([`meshid_runtime::h1`]) in the task that serves the
//! request. Two pools use it: the inbound's to the app on localhost (plain TCP, [`TcpDial`]), and
//! the outbound's to the upstream sidecar (mTLS, `crate::outbound::h1`).
//!
//! hyper's client runs each connection as a task of its own, reached through a channel, with the
//! response sent back through a oneshot: two more task wake-ups per request, and about 14k
//! instructions per request in all. A bodiless request (most of them: `GET`, `HEAD`, `DELETE`)
//! needs none of that. Requests with a body, and upgrades, go elsewhere (hyper's client at the
//! inbound, h2 between sidecars).
//!
//! A connection is kept for the next request only when its response said so (HTTP/1.1 without
//! `Connection: close`), was framed by length or chunks, and was read to its end with nothing
//! after it, and while its dialer still finds it fresh ([`Dial::fresh`]). An idle connection the
//! other end has closed (or sent anything on) is noticed when it is taken, and a request on a
//! pooled connection that closes before a byte of answer is sent again on a new one when its
//! method is idempotent (RFC 9110 §9.2.2); otherwise it fails, as with hyper. The dialer bounds
//! the response head ([`Dial::max_head`]) and may end a body that brings nothing for too long
//! ([`Dial::body_silence`]); either failure closes the connection.

use std::collections::HashMap;
use std::fmt;
use std::future::{Future, poll_fn};
use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError, Weak};
use std::task::{Context, Poll, Waker};
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use http::{Method, Request, Response, header};
use http_body_util::BodyExt;
use hyper::body::{Body as HttpBody, Frame, SizeHint};
use meshid_runtime::h1::{self, BodyDecoder, Decoded, ResponseHead};
use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt, ReadBuf};
use tokio::net::TcpStream;
use tokio::time::Instant;

use crate::http::{Body, BoxError};
use crate::outbound::silence::Silence;

/// Read buffer growth: a read asks for at least this much room.
const READ_SIZE: usize = 8 * 1024;
/// At most this many idle connections are kept per pool; more are closed.
pub const MAX_IDLE: usize = 512;
/// The error of [`Bare::request`] when the pool's cap on connections carrying an exchange
/// ([`Bare::capped`]) is reached: nothing was sent, the request can go another way.
pub(crate) const BUSY: &str = "every connection the pool may use is carrying an exchange";
/// The error of [`Bare::request_for`] when the peer's share of the cap ([`BusyCap::share`]) is
/// reached: nothing was sent.
pub(crate) const PEER_BUSY: &str =
    "the peer's share of the pool's connections is carrying its exchanges";

/// A connection a pool can carry exchanges on.
pub(crate) trait Wire: AsyncRead + AsyncWrite + Unpin + Send + Sync + 'static {
    /// Polled while an exchange is under way (waiting for the response, reading its body): a
    /// reason ends the exchange with that error, and the connection with it.
    fn poll_abort(&mut self, _cx: &mut Context<'_>) -> Poll<String> {
        Poll::Pending
    }

    /// Whether bytes, or the end of the stream, wait in the kernel's receive buffer of the
    /// connection's socket: an idle connection with any is not used again.
    fn unread_in_kernel(&self) -> bool;
}

impl Wire for TcpStream {
    fn unread_in_kernel(&self) -> bool {
        unread_in_kernel(self)
    }
}

/// [`Wire::unread_in_kernel`] of a TCP socket: a non-blocking peek, a real look at the socket.
/// (A read through tokio is not: it answers "would wait" without asking the kernel until its
/// reactor has seen the socket readable, so bytes that arrived since its last wake-up, a late
/// second write of the last response, passed as nothing unread, and were read as the next
/// request's answer: on the inbound's pool, another peer's.)
pub(crate) fn unread_in_kernel(tcp: &TcpStream) -> bool {
    let mut byte = [std::mem::MaybeUninit::<u8>::uninit(); 1];
    match socket2::SockRef::from(tcp).peek(&mut byte) {
        Err(e) => e.kind() != io::ErrorKind::WouldBlock,
        // Data, or the end of the stream.
        Ok(_) => true,
    }
}

/// How a pool gets new connections, and which of its connections may take another exchange.
pub(crate) trait Dial: fmt::Display + Send + Sync + 'static {
    type Wire: Wire;
    /// Who answers, in errors: "the app", "the upstream".
    const WHO: &'static str;
    /// A new connection, or why not.
    fn dial(&self) -> impl Future<Output = Result<Self::Wire, String>> + Send;
    /// Whether `wire` may take another exchange (apart from being open, with nothing unread, and
    /// not idle for too long, which the pool checks itself).
    fn fresh(&self, _wire: &Self::Wire) -> bool {
        true
    }

    /// The longest response head taken; a longer one fails the exchange, its connection closed.
    fn max_head(&self) -> usize {
        h1::MAX_HEAD
    }

    /// How long a response body may bring nothing before it fails, its connection closed
    /// ([`Silence`]); `None`: as long as it likes.
    fn body_silence(&self) -> Option<Duration> {
        None
    }
}

/// Plain TCP to one address (the inbound's app), `TCP_NODELAY` set.
pub(crate) struct TcpDial {
    pub(crate) target: SocketAddr,
    pub(crate) connect_timeout: Duration,
    /// The longest response head taken ([`Dial::max_head`]): `--max-header-bytes`.
    pub(crate) max_head: usize,
}

impl fmt::Display for TcpDial {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.target.fmt(f)
    }
}

impl Dial for TcpDial {
    type Wire = TcpStream;
    const WHO: &'static str = "the app";

    fn dial(&self) -> impl Future<Output = Result<TcpStream, String>> + Send {
        connect(self.target, self.connect_timeout)
    }

    /// `--max-header-bytes`, as on the inbound's other paths to the app (hyper's HTTP/1.1 and
    /// h2 clients, `crate::inbound::app`): a longer head is a 502 to the peer, its connection
    /// closed.
    fn max_head(&self) -> usize {
        self.max_head
    }
}

/// One connection, idle between exchanges with nothing left in its buffer. Always boxed
/// ([`Held`]): a TLS wire's state is over a kilobyte, and a request moves its connection several
/// times (out of the pool, into the request's future, into the response body, back).
struct Conn<W> {
    io: W,
    buf: BytesMut,
}

/// Bodiless requests' connections to one peer.
pub(crate) struct Bare<D: Dial> {
    dialer: D,
    /// How long an idle connection is kept for the next request.
    idle_timeout: Duration,
    /// Idle connections and when each went idle, the most recently used last.
    idle: Mutex<Vec<(Held<D::Wire>, Instant)>>,
    /// Connections carrying an exchange (from the request until its response body has been read
    /// to its end or dropped), and the most there may be.
    cap: BusyCap,
}

/// A cap on connections carrying an exchange at once, which pools can share (the inbound's two
/// pools to one app): clones count together. Once half of them are carrying exchanges, a peer
/// identity that carries a quarter of them ([`BusyCap::share`]) or more gets no more: a peer that
/// takes none of its responses holds one connection per request, and without a share of its own
/// it could hold every one and have every other peer answered 503. Below half, a peer may use
/// what no one else does (one busy caller's long polls), so it holds at most half of them.
#[derive(Clone)]
pub(crate) struct BusyCap {
    busy: Arc<AtomicUsize>,
    max: usize,
    /// The most one peer identity carries.
    share: usize,
    /// What each peer identity carries, while one of its connections holds its counter.
    by_peer: Arc<Mutex<HashMap<Arc<str>, Weak<AtomicUsize>>>>,
}

/// One peer identity's count of connections carrying its exchanges ([`BusyCap::peer`]), held by
/// each of its connections: looked up once per connection, not per request.
#[derive(Clone)]
pub(crate) struct PeerBusy(Arc<AtomicUsize>);

impl BusyCap {
    /// At most `max` at once, a quarter of them (at least one) for one peer; `usize::MAX`: no
    /// cap, nothing counted.
    pub(crate) fn new(max: usize) -> Self {
        Self {
            busy: Arc::new(AtomicUsize::new(0)),
            max,
            share: (max / 4).max(1),
            by_peer: Arc::default(),
        }
    }

    /// The most one peer identity carries.
    pub(crate) fn share(&self) -> usize {
        self.share
    }

    /// The counter of peer `id`'s connections carrying an exchange, shared by every connection of
    /// that identity that asks while another holds it (`None` when uncapped).
    pub(crate) fn peer(&self, id: &str) -> Option<PeerBusy> {
        if self.max == usize::MAX {
            return None;
        }
        let mut by_peer = self.by_peer.lock().unwrap_or_else(PoisonError::into_inner);
        if let Some(count) = by_peer.get(id).and_then(Weak::upgrade) {
            return Some(PeerBusy(count));
        }
        // Counters no connection holds any more go when the table has doubled since the last
        // sweep: a table as large as the peers connected now, twice over at most.
        if by_peer.len() >= 64 && by_peer.len().is_power_of_two() {
            by_peer.retain(|_, count| count.strong_count() > 0);
        }
        let count = Arc::new(AtomicUsize::new(0));
        by_peer.insert(id.into(), Arc::downgrade(&count));
        Some(PeerBusy(count))
    }

    /// Counts one more connection carrying an exchange (of `peer`'s, when given), until the guard
    /// is dropped (`None` when uncapped); [`BUSY`] when the cap is reached, [`PEER_BUSY`] when the
    /// peer carries its share and half the cap is in use.
    pub(crate) fn reserve(&self, peer: Option<&PeerBusy>) -> Result<Option<Busy>, String> {
        if self.max == usize::MAX {
            return Ok(None);
        }
        if let Some(PeerBusy(count)) = peer
            && count.fetch_add(1, Ordering::AcqRel) >= self.share
            && self.busy.load(Ordering::Acquire) >= self.max / 2
        {
            count.fetch_sub(1, Ordering::AcqRel);
            return Err(PEER_BUSY.to_owned());
        }
        if self.busy.fetch_add(1, Ordering::AcqRel) >= self.max {
            self.busy.fetch_sub(1, Ordering::AcqRel);
            if let Some(PeerBusy(count)) = peer {
                count.fetch_sub(1, Ordering::AcqRel);
            }
            return Err(BUSY.to_owned());
        }
        Ok(Some(Busy {
            all: self.busy.clone(),
            peer: peer.map(|p| p.0.clone()),
        }))
    }

    /// Connections counted now.
    #[cfg(test)]
    pub(crate) fn count(&self) -> usize {
        self.busy.load(Ordering::Acquire)
    }
}

/// One connection counted as carrying an exchange (and its peer's, if counted), until dropped.
pub(crate) struct Busy {
    all: Arc<AtomicUsize>,
    peer: Option<Arc<AtomicUsize>>,
}

impl Drop for Busy {
    fn drop(&mut self) {
        self.all.fetch_sub(1, Ordering::AcqRel);
        if let Some(peer) = &self.peer {
            peer.fetch_sub(1, Ordering::AcqRel);
        }
    }
}

/// A connection as it is held and moved.
type Held<W> = Box<Conn<W>>;

/// Whether `req` can be sent on a bare connection: no body, no length but 0 (an h2 stream its peer
/// reset before its end reads as ended, whatever its `content-length` said, and the head alone
/// would leave the app waiting for a body), no transfer coding, no upgrade, not `CONNECT`.
pub(crate) fn suits<B: HttpBody>(req: &Request<B>) -> bool {
    req.body().is_end_stream()
        && req.method() != Method::CONNECT
        && !req.headers().contains_key(header::UPGRADE)
        && !req.headers().contains_key(header::TRANSFER_ENCODING)
        && req
            .headers()
            .get_all(header::CONTENT_LENGTH)
            .iter()
            .all(|len| len == "0")
}

impl<D: Dial> Bare<D> {
    #[cfg(test)]
    pub(crate) fn new(dialer: D, idle_timeout: Duration) -> Arc<Self> {
        Self::capped(dialer, idle_timeout, usize::MAX)
    }

    /// A pool with at most `max_busy` connections carrying an exchange at once (a response the
    /// client does not read holds its connection): past it, [`Bare::request`] answers [`BUSY`]
    /// without dialing. `usize::MAX`: no cap, nothing counted.
    pub(crate) fn capped(dialer: D, idle_timeout: Duration, max_busy: usize) -> Arc<Self> {
        Self::sharing(dialer, idle_timeout, BusyCap::new(max_busy))
    }

    /// A pool whose connections count against `cap` with those of whoever else holds it.
    pub(crate) fn sharing(dialer: D, idle_timeout: Duration, cap: BusyCap) -> Arc<Self> {
        Arc::new(Self {
            dialer,
            idle_timeout,
            idle: Mutex::new(Vec::new()),
            cap,
        })
    }

    /// Connections carrying an exchange now (counted only when capped).
    #[cfg(test)]
    fn busy_count(&self) -> usize {
        self.cap.count()
    }

    /// Its dialer.
    pub(crate) fn dialer(&self) -> &D {
        &self.dialer
    }

    /// Sends the bodiless request `head` (origin-form target, `Host` set) on an idle connection
    /// or a new one. The response body puts the connection back once read to its end. [`BUSY`]
    /// when the pool is capped and that many connections are carrying exchanges.
    pub(crate) async fn request(
        self: &Arc<Self>,
        head: &http::request::Parts,
    ) -> Result<Response<Body>, String> {
        self.request_for(head, None).await
    }

    /// [`Bare::request`] counted against `peer`'s share of the cap too ([`PEER_BUSY`] past it).
    pub(crate) async fn request_for(
        self: &Arc<Self>,
        head: &http::request::Parts,
        peer: Option<&PeerBusy>,
    ) -> Result<Response<Body>, String> {
        let busy = self.cap.reserve(peer)?;
        let target = head.uri.path_and_query().map_or("/", |pq| pq.as_str());
        let mut wire = Vec::new();
        h1::write_request_head(&mut wire, &head.method, target, &head.headers);
        loop {
            let (mut conn, pooled) = match self.checkout() {
                Some(conn) => (conn, true),
                None => (self.connect().await?, false),
            };
            let sent = match conn.io.write_all(&wire).await {
                Ok(()) => conn.io.flush().await,
                Err(e) => Err(e),
            };
            if let Err(e) = sent {
                if pooled {
                    // Closed while idle: nothing was taken in.
                    continue;
                }
                return Err(e.to_string());
            }
            match read_head::<D>(&mut conn, &head.method, self.dialer.max_head()).await? {
                Some(head) => return Ok(self.respond(conn, head, busy)),
                None if pooled && head.method.is_idempotent() => {
                    tracing::debug!(peer = %self.dialer, "connection closed unanswered; the request again on another one");
                }
                None => {
                    return Err(format!(
                        "{} closed the connection without answering",
                        D::WHO
                    ));
                }
            }
        }
    }

    fn respond(
        self: &Arc<Self>,
        conn: Held<D::Wire>,
        head: ResponseHead,
        busy: Option<Busy>,
    ) -> Response<Body> {
        let mut body = BareBody {
            conn: Some(conn),
            decoder: BodyDecoder::new(head.framing),
            keep_alive: head.keep_alive,
            pool: Arc::downgrade(self),
            busy,
            silence: self.dialer.body_silence().map(Silence::new),
        };
        if body.decoder.is_end() {
            body.finish();
        }
        head.response.map(|()| body.boxed())
    }

    async fn connect(&self) -> Result<Held<D::Wire>, String> {
        Ok(Box::new(Conn {
            io: self.dialer.dial().await?,
            buf: BytesMut::new(),
        }))
    }

    /// Idle connections held now.
    pub(crate) fn idle_count(&self) -> usize {
        self.lock().len()
    }

    fn lock(&self) -> MutexGuard<'_, Vec<(Held<D::Wire>, Instant)>> {
        lock(&self.idle)
    }

    /// Whether an idle connection may take the next request.
    fn usable(&self, conn: &mut Conn<D::Wire>, since: Instant, now: Instant) -> bool {
        now.duration_since(since) < self.idle_timeout
            && self.dialer.fresh(&conn.io)
            && open(&mut conn.io)
            && !conn.io.unread_in_kernel()
    }

    /// Drops connections that were closed, idled too long, or are no longer fresh.
    pub(crate) fn prune(&self, now: Instant) {
        self.lock()
            .retain_mut(|(c, since)| self.usable(c, *since, now));
    }

    fn checkout(&self) -> Option<Held<D::Wire>> {
        let now = Instant::now();
        let mut idle = self.lock();
        while let Some((mut c, since)) = idle.pop() {
            if self.usable(&mut c, since, now) {
                return Some(c);
            }
        }
        None
    }

    fn check_in(&self, conn: Held<D::Wire>) {
        if !self.dialer.fresh(&conn.io) {
            return;
        }
        let mut idle = self.lock();
        if idle.len() < MAX_IDLE {
            idle.push((conn, Instant::now()));
        }
    }
}

/// A new connection to the app (`TCP_NODELAY` set), or why not.
pub(crate) async fn connect(target: SocketAddr, timeout: Duration) -> Result<TcpStream, String> {
    let tcp = match tokio::time::timeout(timeout, TcpStream::connect(target)).await {
        Ok(Ok(tcp)) => tcp,
        Ok(Err(e)) => return Err(e.to_string()),
        Err(_) => return Err(format!("connecting timed out after {timeout:?}")),
    };
    let _ = tcp.set_nodelay(true);
    Ok(tcp)
}

/// A pool's idle list. A panic while holding the lock leaves a plain Vec behind: still usable.
pub(crate) fn lock<T>(idle: &Mutex<Vec<T>>) -> MutexGuard<'_, Vec<T>> {
    idle.lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
}

/// Whether an idle connection is still open: nothing to read, no end, no error. (A byte from an
/// idle peer is a protocol error, a TLS alert the start of a close: the connection is not used
/// again either.) A read that would wait; the waker is a no-op, the next exchange sets its own.
fn open<W: AsyncRead + Unpin>(io: &mut W) -> bool {
    let mut byte = [0u8; 1];
    let mut buf = ReadBuf::new(&mut byte);
    Pin::new(io)
        .poll_read(&mut Context::from_waker(Waker::noop()), &mut buf)
        .is_pending()
}

/// Reads into `buf`, making room first: `Ok(0)` at the end of the stream. Ends with the wire's
/// abort reason, if it has one.
fn poll_fill<W: Wire>(
    io: &mut W,
    buf: &mut BytesMut,
    cx: &mut Context<'_>,
) -> Poll<io::Result<usize>> {
    if let Poll::Ready(why) = io.poll_abort(cx) {
        return Poll::Ready(Err(io::Error::other(why)));
    }
    if buf.capacity() - buf.len() < READ_SIZE / 8 {
        buf.reserve(READ_SIZE);
    }
    tokio_util::io::poll_read_buf(Pin::new(io), cx, buf)
}

/// The response head, of at most `max_head` bytes; `None` when the connection ended before a
/// byte of it.
async fn read_head<D: Dial>(
    conn: &mut Conn<D::Wire>,
    method: &Method,
    max_head: usize,
) -> Result<Option<ResponseHead>, String> {
    let mut read_any = false;
    loop {
        if !conn.buf.is_empty()
            && let Some(head) = h1::parse_response_head_within(&mut conn.buf, method, max_head)
                .map_err(|e| e.to_string())?
        {
            return Ok(Some(head));
        }
        match poll_fn(|cx| poll_fill(&mut conn.io, &mut conn.buf, cx)).await {
            Ok(0) if read_any => {
                return Err(format!(
                    "{} closed the connection in the middle of a response head",
                    D::WHO
                ));
            }
            Ok(0) => return Ok(None),
            Ok(_) => read_any = true,
            Err(e)
                if !read_any
                    && matches!(
                        e.kind(),
                        io::ErrorKind::ConnectionReset | io::ErrorKind::ConnectionAborted
                    ) =>
            {
                return Ok(None);
            }
            Err(e) => return Err(e.to_string()),
        }
    }
}

/// A response body read from a pooled connection, which goes back to the pool once the body has
/// been read to its end (or had none).
struct BareBody<D: Dial> {
    /// `None` once the body has ended or failed.
    conn: Option<Held<D::Wire>>,
    decoder: BodyDecoder,
    keep_alive: bool,
    pool: Weak<Bare<D>>,
    /// Counts the connection as carrying an exchange (capped pools) until the body ends.
    busy: Option<Busy>,
    /// Ends a body that brings nothing for too long ([`Dial::body_silence`]).
    silence: Option<Silence>,
}

impl<D: Dial> BareBody<D> {
    /// The body is complete: its connection goes back if it may carry another exchange.
    fn finish(&mut self) {
        if let Some(conn) = self.conn.take()
            && self.keep_alive
            && conn.buf.is_empty()
            && let Some(pool) = self.pool.upgrade()
        {
            pool.check_in(conn);
        }
        self.busy = None;
    }

    fn fail(&mut self, error: impl Into<BoxError>) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        self.conn = None;
        self.busy = None;
        Poll::Ready(Some(Err(error.into())))
    }
}

impl<D: Dial> HttpBody for BareBody<D> {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let this = &mut *self;
        loop {
            let Some(conn) = this.conn.as_mut() else {
                return Poll::Ready(None);
            };
            match this.decoder.decode(&mut conn.buf) {
                Ok(Decoded::Data(data)) => {
                    if this.decoder.is_end() {
                        this.finish();
                    }
                    return Poll::Ready(Some(Ok(Frame::data(data))));
                }
                Ok(Decoded::Trailers(mut trailers)) => {
                    crate::http::strip_sidecar_headers(&mut trailers);
                    return Poll::Ready(Some(Ok(Frame::trailers(trailers))));
                }
                Ok(Decoded::End) => {
                    this.finish();
                    return Poll::Ready(None);
                }
                Ok(Decoded::NeedMore) => match poll_fill(&mut conn.io, &mut conn.buf, cx) {
                    Poll::Ready(Ok(0)) => match this.decoder.eof() {
                        Ok(_) => {
                            this.finish();
                            return Poll::Ready(None);
                        }
                        Err(e) => return this.fail(e),
                    },
                    Poll::Ready(Ok(_)) => {
                        if let Some(silence) = &mut this.silence {
                            silence.moved();
                        }
                    }
                    Poll::Ready(Err(e)) => return this.fail(e),
                    Poll::Pending => {
                        if let Some(silence) = &mut this.silence
                            && let Poll::Ready(error) = silence.poll_ended(cx, || false)
                        {
                            return this.fail(error);
                        }
                        return Poll::Pending;
                    }
                },
                Err(e) => return this.fail(e),
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        self.decoder.is_end()
    }

    fn size_hint(&self) -> SizeHint {
        self.decoder
            .remaining()
            .map_or_else(SizeHint::default, SizeHint::with_exact)
    }
}

impl<D: Dial> Drop for BareBody<D> {
    fn drop(&mut self) {
        // Dropped part-way: the connection closes with it.
        if self.decoder.is_end() {
            self.finish();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use http::{HeaderMap, StatusCode};
    use tokio::io::AsyncReadExt;
    use tokio::net::TcpListener;

    /// What a scripted app does with one request on a connection.
    enum Step {
        /// Writes these bytes.
        Reply(&'static [u8]),
        /// Writes these bytes and closes.
        ReplyAndClose(&'static [u8]),
        /// Reads the request and closes without a word.
        Close,
    }

    /// What a scripted app saw: request heads in order, and connections accepted.
    #[derive(Default)]
    struct Seen {
        heads: Vec<String>,
        connections: usize,
    }

    /// An app that plays `script[i]` on its i-th connection, request by request, then holds the
    /// connection open until the client closes it.
    async fn app(script: Vec<Vec<Step>>) -> (SocketAddr, Arc<Mutex<Seen>>) {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let seen = Arc::new(Mutex::new(Seen::default()));
        let record = seen.clone();
        tokio::spawn(async move {
            for steps in script {
                let (mut s, _) = listener.accept().await.unwrap();
                record.lock().unwrap().connections += 1;
                let record = record.clone();
                tokio::spawn(async move {
                    let mut buf = Vec::new();
                    for step in steps {
                        let mut chunk = [0u8; 1024];
                        while !buf.windows(4).any(|w| w == b"\r\n\r\n") {
                            match s.read(&mut chunk).await {
                                Ok(0) | Err(_) => return,
                                Ok(n) => buf.extend_from_slice(&chunk[..n]),
                            }
                        }
                        let end = buf.windows(4).position(|w| w == b"\r\n\r\n").unwrap() + 4;
                        let head: Vec<u8> = buf.drain(..end).collect();
                        record
                            .lock()
                            .unwrap()
                            .heads
                            .push(String::from_utf8(head).unwrap());
                        match step {
                            Step::Reply(bytes) => s.write_all(bytes).await.unwrap(),
                            Step::ReplyAndClose(bytes) => {
                                s.write_all(bytes).await.unwrap();
                                return;
                            }
                            Step::Close => return,
                        }
                    }
                    let _ = s.read(&mut [0u8; 64]).await;
                });
            }
        });
        (addr, seen)
    }

    fn head(method: Method, target: &str) -> http::request::Parts {
        let (mut parts, ()) = Request::builder()
            .method(method)
            .uri(target)
            .header("host", "app")
            .body(())
            .unwrap()
            .into_parts();
        parts.headers.append("x-two", "a".parse().unwrap());
        parts.headers.append("x-two", "b".parse().unwrap());
        parts
    }

    /// The whole body and its trailers.
    async fn read(resp: Response<Body>) -> Result<(String, Option<HeaderMap>), BoxError> {
        let collected = resp.into_body().collect().await?;
        let trailers = collected.trailers().cloned();
        let bytes = collected.to_bytes();
        Ok((String::from_utf8(bytes.to_vec()).unwrap(), trailers))
    }

    /// Plain TCP to the test app at `addr`, with the default head bound.
    fn dial(addr: SocketAddr) -> TcpDial {
        TcpDial {
            target: addr,
            connect_timeout: Duration::from_secs(5),
            max_head: h1::MAX_HEAD,
        }
    }

    fn pool(addr: SocketAddr) -> Arc<Bare<TcpDial>> {
        Bare::new(dial(addr), Duration::from_secs(60))
    }

    #[tokio::test]
    async fn the_request_goes_out_as_written_and_bodies_of_every_framing_come_back() {
        let (addr, seen) = app(vec![vec![
            Step::Reply(b"HTTP/1.1 200 OK\r\ncontent-length: 5\r\n\r\nhello"),
            Step::Reply(b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\ntrailer: grpc-status\r\n\r\n3;x=y\r\nabc\r\n2\r\nde\r\n0\r\ngrpc-status: 0\r\n\r\n"),
            Step::Reply(b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 200 OK\r\ncontent-length: 10\r\n\r\n"),
            Step::Reply(b"HTTP/1.1 204 No Content\r\n\r\n"),
            Step::ReplyAndClose(b"HTTP/1.1 200 OK\r\n\r\nuntil the close"),
        ]])
        .await;
        let bare = pool(addr);
        let resp = bare.request(&head(Method::GET, "/a?b=c")).await.unwrap();
        assert_eq!(resp.body().size_hint().exact(), Some(5));
        assert_eq!(read(resp).await.unwrap().0, "hello");
        assert_eq!(bare.idle_count(), 1);
        let (body, trailers) = read(bare.request(&head(Method::GET, "/")).await.unwrap())
            .await
            .unwrap();
        assert_eq!(body, "abcde");
        assert_eq!(trailers.unwrap().get("grpc-status").unwrap(), "0");
        // HEAD: a length but no body; the connection is free at once.
        let resp = bare.request(&head(Method::HEAD, "/")).await.unwrap();
        assert!(resp.body().is_end_stream());
        assert_eq!(bare.idle_count(), 1);
        assert_eq!(read(resp).await.unwrap().0, "");
        let resp = bare.request(&head(Method::DELETE, "/")).await.unwrap();
        assert_eq!(resp.status(), StatusCode::NO_CONTENT);
        assert_eq!(read(resp).await.unwrap().0, "");
        let resp = bare.request(&head(Method::GET, "/last")).await.unwrap();
        assert_eq!(read(resp).await.unwrap().0, "until the close");
        // All on one connection, which ended with the last body.
        assert_eq!(bare.idle_count(), 0);
        let seen = seen.lock().unwrap();
        assert_eq!(seen.connections, 1);
        assert_eq!(
            seen.heads[0],
            "GET /a?b=c HTTP/1.1\r\nhost: app\r\nx-two: a\r\nx-two: b\r\n\r\n"
        );
        assert!(seen.heads[2].starts_with("HEAD / HTTP/1.1\r\n"));
    }

    #[tokio::test]
    async fn a_connection_is_not_reused_when_the_response_says_close_or_leaves_bytes_behind() {
        let (addr, seen) = app(vec![
            vec![Step::Reply(
                b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\nconnection: close\r\n\r\nok",
            )],
            vec![Step::Reply(
                b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nokEXTRA",
            )],
            vec![Step::Reply(
                b"HTTP/1.0 200 OK\r\ncontent-length: 2\r\n\r\nok",
            )],
            vec![Step::Reply(
                b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok",
            )],
        ])
        .await;
        let bare = pool(addr);
        for _ in 0..3 {
            let resp = bare.request(&head(Method::GET, "/")).await.unwrap();
            assert_eq!(read(resp).await.unwrap().0, "ok");
            assert_eq!(bare.idle_count(), 0);
        }
        let resp = bare.request(&head(Method::GET, "/")).await.unwrap();
        assert_eq!(read(resp).await.unwrap().0, "ok");
        assert_eq!(bare.idle_count(), 1);
        assert_eq!(seen.lock().unwrap().connections, 4);
    }

    /// Bytes an app writes after a response ended (a body after a HEAD response's head, in a
    /// write of its own) make its connection unusable, however soon the next request comes: were
    /// they read as the next request's answer, they would answer another peer's request.
    #[tokio::test]
    async fn a_connection_with_bytes_written_after_its_response_is_not_reused() {
        use std::io::{Read, Write};
        // The app on a thread of its own (blocking sockets), so that it writes while the test's
        // runtime is held up below.
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap();
        let app = std::thread::spawn(move || {
            let read_head = |s: &mut std::net::TcpStream| {
                let mut head = Vec::new();
                let mut b = [0u8; 1];
                while !head.ends_with(b"\r\n\r\n") && s.read(&mut b).unwrap_or(0) == 1 {
                    head.push(b[0]);
                }
            };
            let (mut first, _) = listener.accept().unwrap();
            read_head(&mut first);
            first
                .write_all(b"HTTP/1.1 200 OK\r\ncontent-length: 5\r\n\r\n")
                .unwrap();
            std::thread::sleep(Duration::from_millis(20));
            first
                .write_all(b"HTTP/1.1 200 OK\r\ncontent-length: 5\r\n\r\nLATE!")
                .unwrap();
            let (mut second, _) = listener.accept().unwrap();
            read_head(&mut second);
            second
                .write_all(b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok")
                .unwrap();
            // Held until the pool lets go.
            let _ = second.read(&mut [0u8; 1]);
            drop(first);
        });
        let bare = pool(addr);
        let resp = bare.request(&head(Method::HEAD, "/")).await.unwrap();
        assert_eq!(read(resp).await.unwrap().0, "");
        assert_eq!(bare.idle_count(), 1);
        // The late bytes arrive while this thread does not return to the runtime (as under load):
        // the runtime has not seen the socket readable when the next request checks it out.
        std::thread::sleep(Duration::from_millis(200));
        let resp = bare.request(&head(Method::GET, "/")).await.unwrap();
        assert_eq!(read(resp).await.unwrap().0, "ok");
        drop(bare);
        app.join().unwrap();
    }

    #[tokio::test]
    async fn bad_responses_are_errors_and_their_connections_are_dropped() {
        for (reply, want) in [
            (
                &b"HTTP/1.1 200 OK\r\ncontent-length: 1\r\ncontent-length: 2\r\n\r\n"[..],
                "content-length",
            ),
            (
                b"HTTP/1.1 101 Switching Protocols\r\nupgrade: x\r\n\r\n",
                "upgrade",
            ),
            (b"NOT HTTP\r\n\r\n", "malformed"),
            (
                b"HTTP/1.1 200 OK\r\ncontent-le",
                "middle of a response head",
            ),
        ] {
            let (addr, _) = app(vec![vec![Step::ReplyAndClose(reply)]]).await;
            let bare = pool(addr);
            let error = bare.request(&head(Method::GET, "/")).await.unwrap_err();
            assert!(error.contains(want), "{error}");
            assert_eq!(bare.idle_count(), 0);
        }
        for (reply, want) in [
            (
                &b"HTTP/1.1 200 OK\r\ncontent-length: 10\r\n\r\nshort"[..],
                "closed before the end",
            ),
            (
                b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\nzz\r\n",
                "chunk",
            ),
        ] {
            let (addr, _) = app(vec![vec![Step::ReplyAndClose(reply)]]).await;
            let bare = pool(addr);
            let resp = bare.request(&head(Method::GET, "/")).await.unwrap();
            let error = read(resp).await.unwrap_err().to_string();
            assert!(error.contains(want), "{error}");
            assert_eq!(bare.idle_count(), 0);
        }
    }

    #[tokio::test]
    async fn a_pooled_connection_closed_unanswered_retries_idempotent_requests_only() {
        const OK: &[u8] = b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok";
        // The first connection answers once, then takes the next request and closes without an
        // answer (the app's idle close racing our request); the second answers.
        let script = || vec![vec![Step::Reply(OK), Step::Close], vec![Step::Reply(OK)]];
        let (addr, seen) = app(script()).await;
        let bare = pool(addr);
        read(bare.request(&head(Method::GET, "/")).await.unwrap())
            .await
            .unwrap();
        let resp = bare.request(&head(Method::GET, "/again")).await.unwrap();
        assert_eq!(read(resp).await.unwrap().0, "ok");
        assert_eq!(seen.lock().unwrap().connections, 2);

        let (addr, seen) = app(script()).await;
        let bare = pool(addr);
        read(bare.request(&head(Method::POST, "/")).await.unwrap())
            .await
            .unwrap();
        let error = bare
            .request(&head(Method::POST, "/again"))
            .await
            .unwrap_err();
        assert!(error.contains("without answering"), "{error}");
        assert_eq!(seen.lock().unwrap().connections, 1);
    }

    /// A dialer whose connections may be aborted (each gets the next of `aborts`), and whose
    /// connections are fresh while `fresh` says so.
    struct Switches {
        target: SocketAddr,
        aborts: Mutex<Vec<tokio::sync::oneshot::Receiver<()>>>,
        fresh: std::sync::atomic::AtomicBool,
    }

    struct Abortable {
        tcp: TcpStream,
        abort: tokio::sync::oneshot::Receiver<()>,
    }

    impl fmt::Display for Switches {
        fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
            self.target.fmt(f)
        }
    }

    impl Dial for Switches {
        type Wire = Abortable;
        const WHO: &'static str = "the peer";

        async fn dial(&self) -> Result<Abortable, String> {
            let abort = lock(&self.aborts).pop().expect("a switch per connection");
            let tcp = connect(self.target, Duration::from_secs(5)).await?;
            Ok(Abortable { tcp, abort })
        }

        fn fresh(&self, _wire: &Abortable) -> bool {
            self.fresh.load(std::sync::atomic::Ordering::Relaxed)
        }
    }

    impl Wire for Abortable {
        fn unread_in_kernel(&self) -> bool {
            self.tcp.unread_in_kernel()
        }

        fn poll_abort(&mut self, cx: &mut Context<'_>) -> Poll<String> {
            Pin::new(&mut self.abort)
                .poll(cx)
                .map(|_| "aborted from outside".to_owned())
        }
    }

    impl AsyncRead for Abortable {
        fn poll_read(
            mut self: Pin<&mut Self>,
            cx: &mut Context<'_>,
            buf: &mut ReadBuf<'_>,
        ) -> Poll<io::Result<()>> {
            Pin::new(&mut self.tcp).poll_read(cx, buf)
        }
    }

    impl AsyncWrite for Abortable {
        fn poll_write(
            mut self: Pin<&mut Self>,
            cx: &mut Context<'_>,
            buf: &[u8],
        ) -> Poll<io::Result<usize>> {
            Pin::new(&mut self.tcp).poll_write(cx, buf)
        }

        fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
            Pin::new(&mut self.tcp).poll_flush(cx)
        }

        fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
            Pin::new(&mut self.tcp).poll_shutdown(cx)
        }
    }

    #[tokio::test]
    async fn an_abort_ends_the_exchange_under_way_and_a_stale_connection_is_not_reused() {
        const OK: &[u8] = b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok";
        // The first connection answers twice; the second starts a chunked body and stalls.
        let (addr, seen) = app(vec![
            vec![Step::Reply(OK), Step::Reply(OK)],
            vec![Step::Reply(
                b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n5\r\nfirst\r\n",
            )],
        ])
        .await;
        let (fire, abort) = tokio::sync::oneshot::channel();
        let (_unused, first_abort) = tokio::sync::oneshot::channel();
        let bare = Bare::new(
            Switches {
                target: addr,
                aborts: Mutex::new(vec![abort, first_abort]),
                fresh: true.into(),
            },
            Duration::from_secs(60),
        );
        read(bare.request(&head(Method::GET, "/")).await.unwrap())
            .await
            .unwrap();
        assert_eq!(bare.idle_count(), 1);
        // No longer fresh (a renewal, say): neither kept nor taken again.
        bare.dialer
            .fresh
            .store(false, std::sync::atomic::Ordering::Relaxed);
        assert!(bare.checkout().is_none());
        bare.dialer
            .fresh
            .store(true, std::sync::atomic::Ordering::Relaxed);
        let mut body = bare
            .request(&head(Method::GET, "/stream"))
            .await
            .unwrap()
            .into_body();
        assert_eq!(seen.lock().unwrap().connections, 2);
        let first = body.frame().await.unwrap().unwrap().into_data().unwrap();
        assert_eq!(&first[..], b"first");
        fire.send(()).unwrap();
        let error = tokio::time::timeout(Duration::from_secs(5), body.frame())
            .await
            .expect("the abort ends the wait for the next chunk")
            .unwrap()
            .unwrap_err();
        assert!(
            error.to_string().contains("aborted from outside"),
            "{error}"
        );
        assert_eq!(bare.idle_count(), 0);
    }

    #[tokio::test]
    async fn only_bodiless_plain_requests_suit() {
        let get = |body: &'static str| {
            Request::get("/").body(http_body_util::Full::new(Bytes::from(body)))
        };
        assert!(suits(&get("").unwrap()));
        assert!(!suits(&get("x").unwrap()));
        let mut upgrade = get("").unwrap();
        upgrade
            .headers_mut()
            .insert(header::UPGRADE, "websocket".parse().unwrap());
        assert!(!suits(&upgrade));
        let mut connect = get("").unwrap();
        *connect.method_mut() = Method::CONNECT;
        assert!(!suits(&connect));
        let mut chunked = get("").unwrap();
        chunked
            .headers_mut()
            .insert(header::TRANSFER_ENCODING, "chunked".parse().unwrap());
        assert!(!suits(&chunked));
        // A length with no body to go with it (a stream reset before its end).
        let mut promised = get("").unwrap();
        promised
            .headers_mut()
            .insert(header::CONTENT_LENGTH, "5".parse().unwrap());
        assert!(!suits(&promised));
        let mut zero = get("").unwrap();
        zero.headers_mut()
            .insert(header::CONTENT_LENGTH, "0".parse().unwrap());
        assert!(suits(&zero));
    }

    #[tokio::test]
    async fn a_capped_pool_dials_no_connection_past_its_busy_ones_until_one_is_let_go() {
        const UNFINISHED: &[u8] = b"HTTP/1.1 200 OK\r\ncontent-length: 10\r\n\r\nhello";
        const OK: &[u8] = b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok";
        let (addr, seen) = app(vec![
            vec![Step::Reply(UNFINISHED)],
            vec![Step::Reply(UNFINISHED)],
            vec![Step::Reply(OK)],
        ])
        .await;
        let dial = dial(addr);
        let bare = Bare::capped(dial, Duration::from_secs(60), 2);
        // Two responses whose client reads none of their bodies hold both connections.
        let first = bare.request(&head(Method::GET, "/")).await.unwrap();
        let second = bare.request(&head(Method::GET, "/")).await.unwrap();
        assert_eq!(bare.busy_count(), 2);
        let third = bare.request(&head(Method::GET, "/")).await;
        assert_eq!(third.err().as_deref(), Some(BUSY));
        assert_eq!(
            seen.lock().unwrap().connections,
            2,
            "no third connection dialed"
        );
        // One given up (its connection closed with it): room for one more.
        drop(first);
        assert_eq!(bare.busy_count(), 1);
        let third = bare.request(&head(Method::GET, "/")).await.unwrap();
        assert_eq!(read(third).await.unwrap().0, "ok");
        // Read to its end, a response lets its connection go back, no longer counted.
        assert_eq!(bare.busy_count(), 1);
        assert_eq!(bare.idle_count(), 1);
        drop(second);
        assert_eq!(bare.busy_count(), 0);
    }

    #[tokio::test]
    async fn one_peer_carries_at_most_its_share_of_a_capped_pool_once_half_is_in_use() {
        const UNFINISHED: &[u8] = b"HTTP/1.1 200 OK\r\ncontent-length: 10\r\n\r\nhello";
        const OK: &[u8] = b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok";
        let (addr, seen) = app(vec![
            vec![Step::Reply(UNFINISHED)],
            vec![Step::Reply(UNFINISHED)],
            vec![Step::Reply(OK)],
            vec![Step::Reply(OK)],
        ])
        .await;
        let dial = dial(addr);
        let cap = BusyCap::new(4);
        assert_eq!(cap.share(), 1);
        let bare = Bare::sharing(dial, Duration::from_secs(60), cap.clone());
        let greedy = cap.peer("spiffe://d/ns/a/sa/greedy").unwrap();
        // Asked again while held, the same counter: another connection of that identity.
        let again = cap.peer("spiffe://d/ns/a/sa/greedy").unwrap();
        let other = cap.peer("spiffe://d/ns/a/sa/other").unwrap();
        let get = head(Method::GET, "/");
        let first = bare.request_for(&get, Some(&greedy)).await.unwrap();
        // Past its share while less than half is in use: what no one else uses.
        let second = bare.request_for(&get, Some(&again)).await.unwrap();
        // Half in use: past its share, refused, with nothing dialed.
        let third = bare.request_for(&get, Some(&greedy)).await;
        assert_eq!(third.err().as_deref(), Some(PEER_BUSY));
        assert_eq!(seen.lock().unwrap().connections, 2, "no connection dialed");
        assert_eq!(bare.busy_count(), 2, "the refused request is not counted");
        // Another peer is not held back by it.
        let theirs = bare.request_for(&get, Some(&other)).await.unwrap();
        assert_eq!(read(theirs).await.unwrap().0, "ok");
        // One of the greedy peer's responses given up: room for one more of its own.
        drop(first);
        let fourth = bare.request_for(&get, Some(&greedy)).await.unwrap();
        assert_eq!(read(fourth).await.unwrap().0, "ok");
        drop(second);
        assert_eq!(bare.busy_count(), 0);
        // Once no connection holds a counter, the identity starts again from a new one.
        drop((greedy, again));
        assert_eq!(
            cap.peer("spiffe://d/ns/a/sa/greedy")
                .unwrap()
                .0
                .load(Ordering::Acquire),
            0
        );
    }
}
