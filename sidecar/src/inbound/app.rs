//! The inbound's HTTP/1.1 connections to the app on localhost: small pools of idle connections,
//! taken last-in first-out, one request at a time on each. Bodiless requests go on connections
//! this sidecar reads and writes itself ([`crate::bare`]); requests with a body, and upgrades, on
//! hyper client connections.
//!
//! A connection goes back to its pool when its response body has been read to the end (or had
//! none) and its request body has been sent to its end, from the task that read the response; one
//! whose response ended before its request body (an app that answers early) is not reused: the next
//! request, from any peer, would wait on it for as long as the rest of that body takes. From the
//! task that read it: no pool key to hash, no task spawned per request to wait
//! for the connection to become ready (what hyper-util's pooled client does), no URI to rebuild.
//! A request that a pooled connection hands back unsent (the app closed it as we took it) is sent
//! again on another one; a request that a new connection fails is answered with the error. Idle
//! connections are closed after [`IDLE_TIMEOUT`], and at most [`MAX_IDLE`] are kept in each pool.
//! At most `--max-app-connections` connections of both pools carry a request at once (a response a
//! peer does not take holds its connection), and once half of them do, one peer identity's
//! requests at most a quarter of them; past either a request is refused without dialing.
//!
//! A response head longer than `--max-header-bytes` fails its request (a 502 to the peer) and
//! closes its connection, on both pools: the bare one counts the raw head's bytes; hyper's client
//! is bounded by its read buffer, which can overshoot by up to one read, so its parsed head is
//! measured again ([`head_len`]).

use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, Weak};
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use http::{Request, Response};
use http_body_util::BodyExt;
use hyper::body::{Body as HttpBody, Frame, Incoming, SizeHint};
use hyper::client::conn::http1;
use hyper_util::rt::TokioIo;
use meshid_runtime::h1::Error as HeadError;
use tokio::time::Instant;

pub use crate::bare::MAX_IDLE;
use crate::bare::{Bare, Busy, BusyCap, PeerBusy, TcpDial};
use crate::http::{Body, BoxError, ReqBody, root_cause};

/// How long an idle app connection is kept for the next request.
pub const IDLE_TIMEOUT: Duration = Duration::from_secs(60);

/// hyper's sender on one app connection, for requests with a body of type `B`.
type Sender<B> = http1::SendRequest<Sent<B>>;

struct Idle<B> {
    send: Sender<B>,
    since: Instant,
}

/// HTTP/1.1 connections to one app address, sending request bodies of type `B`.
pub struct AppH1<B = ReqBody> {
    target: SocketAddr,
    connect_timeout: Duration,
    /// Idle connections, the most recently used last.
    idle: Mutex<Vec<Idle<B>>>,
    /// Connections for bodiless requests.
    bare: Arc<Bare<TcpDial>>,
    /// Connections of both pools carrying a request at once (`--max-app-connections`).
    cap: BusyCap,
    /// The longest response head taken (`--max-header-bytes`).
    max_head: usize,
}

/// The smallest read buffer hyper's HTTP/1.1 client takes (it panics below it); `--max-header-bytes`
/// is at least this, a [`AppH1::new`] from a test may not be.
const HYPER_MIN_BUF: usize = 8192;

impl<B> AppH1<B>
where
    B: HttpBody + Send + Unpin + 'static,
    B::Data: Send,
    B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    /// A pool for `target` with at most `max_busy` connections (of both kinds) carrying a request
    /// at once ([`crate::bare::BUSY`] past it; `usize::MAX`: no cap), taking response heads of at
    /// most `max_head` bytes; a task closes connections idle for longer than [`IDLE_TIMEOUT`] while
    /// the pool lives. Must be called within the runtime.
    pub fn new(
        target: SocketAddr,
        connect_timeout: Duration,
        max_busy: usize,
        max_head: usize,
    ) -> Arc<Self> {
        let cap = BusyCap::new(max_busy);
        let pool = Arc::new(Self {
            target,
            connect_timeout,
            idle: Mutex::new(Vec::new()),
            bare: Bare::sharing(
                TcpDial {
                    target,
                    connect_timeout,
                    max_head,
                },
                IDLE_TIMEOUT,
                cap.clone(),
            ),
            cap,
            max_head,
        });
        let weak = Arc::downgrade(&pool);
        tokio::spawn(async move {
            loop {
                tokio::time::sleep(IDLE_TIMEOUT / 2).await;
                match weak.upgrade() {
                    Some(pool) => pool.prune(Instant::now()),
                    None => return,
                }
            }
        });
        pool
    }

    async fn connect(&self) -> Result<Sender<B>, String> {
        let tcp = crate::bare::connect(self.target, self.connect_timeout).await?;
        // hyper reads a response head into a buffer of at most this much (408 KiB unless told):
        // a head it cannot complete within it fails as too large.
        let (send, conn) = http1::Builder::new()
            .max_buf_size(self.max_head.max(HYPER_MIN_BUF))
            .handshake(TokioIo::new(tcp))
            .await
            .map_err(|e| root_cause(&e))?;
        let target = self.target;
        tokio::spawn(async move {
            if let Err(error) = conn.with_upgrades().await {
                tracing::debug!(%error, app_addr = %target, "app connection ended");
            }
        });
        Ok(send)
    }

    /// Sends `req` (origin-form target, `Host` set) on an idle connection or a new one: a
    /// bodiless one on the bare pool, others on hyper's. The response's body puts the connection
    /// back into its pool once read to the end; a `101 Switching Protocols` response keeps it (it
    /// becomes the upgraded stream).
    pub async fn request(self: &Arc<Self>, req: Request<B>) -> Result<Response<Body>, String> {
        self.request_for(req, None).await
    }

    /// [`Self::request`] counted against `peer`'s share of `--max-app-connections` too
    /// ([`crate::bare::PEER_BUSY`] past it).
    pub(crate) async fn request_for(
        self: &Arc<Self>,
        req: Request<B>,
        peer: Option<&PeerBusy>,
    ) -> Result<Response<Body>, String> {
        if crate::bare::suits(&req) {
            let (head, _empty) = req.into_parts();
            return self.bare.request_for(&head, peer).await;
        }
        // Boxed: hyper's client futures (a connection's handshake, the exchange) are several KiB,
        // and inline they would size every request's future, bodiless ones too.
        Box::pin(self.request_with_body(req, peer)).await
    }

    /// The counter of peer `id`'s app connections carrying a request, for [`Self::request_for`]
    /// (one per peer connection).
    pub(crate) fn peer(&self, id: &str) -> Option<PeerBusy> {
        self.cap.peer(id)
    }

    /// The most app connections one peer identity's requests hold at once.
    pub fn peer_share(&self) -> usize {
        self.cap.share()
    }

    /// [`Self::request`] on hyper's pool: requests with a body, and upgrades.
    async fn request_with_body(
        self: &Arc<Self>,
        req: Request<B>,
        peer: Option<&PeerBusy>,
    ) -> Result<Response<Body>, String> {
        let busy = self.cap.reserve(peer)?;
        let sent = Arc::new(AtomicBool::new(false));
        let mut req = req.map(|inner| Sent::new(inner, sent.clone()));
        loop {
            let (mut send, pooled) = match self.checkout() {
                Some(send) => (send, true),
                None => (self.connect().await?, false),
            };
            if let Err(e) = send.ready().await {
                if pooled {
                    // Closed while idle: the request was not sent; take another.
                    continue;
                }
                return Err(root_cause(&e));
            }
            match send.try_send_request(req).await {
                Ok(resp) if head_len(&resp) > self.max_head => {
                    // Past hyper's buffer by the last read: the response and its sender are
                    // dropped, and the connection with them.
                    return Err(self.head_too_long());
                }
                Ok(resp) => {
                    let back = (resp.status() != http::StatusCode::SWITCHING_PROTOCOLS)
                        .then(|| (send, Arc::downgrade(self)));
                    return Ok(resp.map(|inner| {
                        AppBody {
                            inner,
                            done: false,
                            back,
                            sent,
                            _busy: busy,
                        }
                        .boxed()
                    }));
                }
                Err(mut e) => match e.take_message() {
                    Some(unsent) if pooled => {
                        tracing::debug!(error = %e.error(), app_addr = %self.target, "app connection closed with the request unsent; on another one");
                        req = unsent;
                    }
                    _ if e.error().is_parse_too_large() => return Err(self.head_too_long()),
                    _ => return Err(root_cause(&e.into_error())),
                },
            }
        }
    }
}

impl<B> AppH1<B> {
    /// The longest response head taken (`--max-header-bytes`).
    pub fn max_head(&self) -> usize {
        self.max_head
    }

    /// The error of a response head over [`Self::max_head`], as the bare pool words it.
    fn head_too_long(&self) -> String {
        HeadError::HeadTooLong(self.max_head).to_string()
    }

    /// Idle connections held now, in both pools.
    pub fn idle_count(&self) -> usize {
        self.lock().len() + self.bare.idle_count()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Vec<Idle<B>>> {
        crate::bare::lock(&self.idle)
    }

    /// Drops connections that the app closed or that idled past [`IDLE_TIMEOUT`].
    fn prune(&self, now: Instant) {
        self.lock()
            .retain(|c| !c.send.is_closed() && now.duration_since(c.since) < IDLE_TIMEOUT);
        self.bare.prune(now);
    }

    fn checkout(&self) -> Option<Sender<B>> {
        let now = Instant::now();
        let mut idle = self.lock();
        while let Some(c) = idle.pop() {
            if !c.send.is_closed() && now.duration_since(c.since) < IDLE_TIMEOUT {
                return Some(c.send);
            }
        }
        None
    }

    fn check_in(&self, send: Sender<B>) {
        if send.is_closed() {
            return;
        }
        let mut idle = self.lock();
        if idle.len() < MAX_IDLE {
            idle.push(Idle {
                send,
                since: Instant::now(),
            });
        }
    }
}

/// The length of `resp`'s head as the app wrote it at the least: status line, fields with one
/// space after the colon, the empty line (the reason phrase and any other spaces not counted).
fn head_len<T>(resp: &Response<T>) -> usize {
    let fields: usize = resp
        .headers()
        .iter()
        .map(|(name, value)| name.as_str().len() + value.len() + 4)
        .sum();
    "HTTP/1.1 200 \r\n".len() + fields + 2
}

/// A request body on its way to the app, which says (in `ended`) when it has been sent to its end.
struct Sent<B> {
    inner: B,
    ended: Arc<AtomicBool>,
}

impl<B: HttpBody> Sent<B> {
    fn new(inner: B, ended: Arc<AtomicBool>) -> Self {
        if inner.is_end_stream() {
            ended.store(true, Ordering::Release);
        }
        Self { inner, ended }
    }
}

impl<B: HttpBody + Unpin> HttpBody for Sent<B> {
    type Data = B::Data;
    type Error = B::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<B::Data>, B::Error>>> {
        let this = &mut *self;
        let r = Pin::new(&mut this.inner).poll_frame(cx);
        let ended = match &r {
            Poll::Ready(None) => true,
            Poll::Ready(Some(Ok(_))) => this.inner.is_end_stream(),
            _ => false,
        };
        if ended {
            this.ended.store(true, Ordering::Release);
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

/// A response body from the app that returns its connection to the pool when read to the end,
/// once its request body has been sent to its end too.
struct AppBody<B> {
    inner: Incoming,
    done: bool,
    back: Option<(Sender<B>, Weak<AppH1<B>>)>,
    /// Set when the request's body has been sent to its end.
    sent: Arc<AtomicBool>,
    /// Counts the connection against the cap until the body is dropped (a `101` hands the
    /// connection to the upgraded stream, which the peer's connection slot counts instead).
    _busy: Option<Busy>,
}

impl<B> AppBody<B> {
    fn release(&mut self) {
        if let Some((send, pool)) = self.back.take()
            // A request body still being sent: hyper takes no next request on this connection
            // until it ends, which is for the peer sending it to decide. Not reused.
            && self.sent.load(Ordering::Acquire)
            && let Some(pool) = pool.upgrade()
        {
            pool.check_in(send);
        }
    }
}

impl<B> HttpBody for AppBody<B> {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let polled = Pin::new(&mut self.inner).poll_frame(cx);
        match &polled {
            Poll::Ready(None) => {
                self.done = true;
                self.release();
            }
            Poll::Ready(Some(Err(_))) => {
                // The connection is broken: never reused.
                self.back = None;
            }
            _ => {}
        }
        polled.map(|frame| {
            frame.map(|r| {
                r.map(crate::http::strip_sidecar_trailers)
                    .map_err(BoxError::from)
            })
        })
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

impl<B> Drop for AppBody<B> {
    fn drop(&mut self) {
        // Read to the end (or empty from the start): the connection can take the next request.
        // Dropped part-way: hyper closes the connection, and so do we by dropping the sender.
        if self.done || self.inner.is_end_stream() {
            self.release();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use http_body_util::Full;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio::net::TcpListener;

    type Pool = Arc<AppH1<Full<Bytes>>>;

    /// The response head limit of tests about something else: the bare pool's own.
    const MAX_HEAD: usize = meshid_runtime::h1::MAX_HEAD;

    /// Which pool a request goes to.
    #[derive(Debug, Clone, Copy)]
    enum Kind {
        /// A bodiless `GET`: the bare pool.
        Bare,
        /// A `POST` with a body: hyper's.
        Hyper,
    }

    const BOTH: [Kind; 2] = [Kind::Bare, Kind::Hyper];

    fn req(kind: Kind) -> Request<Full<Bytes>> {
        let (method, body) = match kind {
            Kind::Bare => (http::Method::GET, Bytes::new()),
            Kind::Hyper => (http::Method::POST, Bytes::from_static(b"x")),
        };
        Request::builder()
            .method(method)
            .uri("/")
            .header("host", "app")
            .body(Full::new(body))
            .unwrap()
    }

    /// Reads from `s` into `buf` until `buf` holds the end of a head (`false`: closed first).
    async fn read_to_head_end(s: &mut tokio::net::TcpStream, buf: &mut Vec<u8>) -> bool {
        let mut chunk = [0u8; 1024];
        while !buf.windows(4).any(|w| w == b"\r\n\r\n") {
            match s.read(&mut chunk).await {
                Ok(0) | Err(_) => return false,
                Ok(n) => buf.extend_from_slice(&chunk[..n]),
            }
        }
        true
    }

    /// An app that answers every request on a connection with `body`, and counts connections.
    async fn app(
        body: &'static str,
        close_after: Option<usize>,
    ) -> (SocketAddr, Arc<Mutex<usize>>) {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let accepted = Arc::new(Mutex::new(0));
        let count = accepted.clone();
        tokio::spawn(async move {
            while let Ok((mut s, _)) = listener.accept().await {
                *count.lock().unwrap() += 1;
                tokio::spawn(async move {
                    let mut served = 0;
                    let mut buf = Vec::new();
                    loop {
                        if !read_to_head_end(&mut s, &mut buf).await {
                            return;
                        }
                        let end = buf.windows(4).position(|w| w == b"\r\n\r\n").unwrap() + 4;
                        buf.drain(..end);
                        let reply = format!(
                            "HTTP/1.1 200 OK\r\ncontent-length: {}\r\n\r\n{body}",
                            body.len()
                        );
                        if s.write_all(reply.as_bytes()).await.is_err() {
                            return;
                        }
                        served += 1;
                        if close_after == Some(served) {
                            return;
                        }
                    }
                });
            }
        });
        (addr, accepted)
    }

    async fn text(resp: Response<Body>) -> String {
        let bytes = resp.into_body().collect().await.unwrap().to_bytes();
        String::from_utf8(bytes.to_vec()).unwrap()
    }

    #[tokio::test]
    async fn a_connection_is_reused_once_its_response_is_read() {
        for kind in BOTH {
            let (addr, accepted) = app("hi", None).await;
            let pool: Pool = AppH1::new(addr, Duration::from_secs(5), usize::MAX, MAX_HEAD);
            for _ in 0..5 {
                let resp = pool.request(req(kind)).await.unwrap();
                assert_eq!(text(resp).await, "hi");
            }
            assert_eq!(*accepted.lock().unwrap(), 1, "{kind:?}");
            assert_eq!(pool.idle_count(), 1);
        }
    }

    #[tokio::test]
    async fn a_response_still_being_read_holds_its_connection() {
        for kind in BOTH {
            let (addr, accepted) = app("hi", None).await;
            let pool: Pool = AppH1::new(addr, Duration::from_secs(5), usize::MAX, MAX_HEAD);
            let first = pool.request(req(kind)).await.unwrap();
            let second = pool.request(req(kind)).await.unwrap();
            assert_eq!(*accepted.lock().unwrap(), 2);
            assert_eq!(pool.idle_count(), 0);
            assert_eq!(text(first).await, "hi");
            assert_eq!(text(second).await, "hi");
            assert_eq!(pool.idle_count(), 2);
        }
    }

    /// Both pools count against one cap: responses held on one kind of connection leave no room
    /// for a request of the other kind, and one let go makes room again.
    #[tokio::test]
    async fn held_responses_of_both_pools_count_against_one_cap() {
        for (held, next) in [(Kind::Bare, Kind::Hyper), (Kind::Hyper, Kind::Bare)] {
            let (addr, accepted) = app("hi", None).await;
            let pool: Pool = AppH1::new(addr, Duration::from_secs(5), 2, MAX_HEAD);
            let first = pool.request(req(held)).await.unwrap();
            let second = pool.request(req(next)).await.unwrap();
            let refused = pool.request(req(held)).await.unwrap_err();
            assert_eq!(refused, crate::bare::BUSY, "{held:?}");
            assert_eq!(
                pool.request(req(next)).await.unwrap_err(),
                crate::bare::BUSY
            );
            assert_eq!(
                *accepted.lock().unwrap(),
                2,
                "no connection dialed past the cap"
            );
            drop(first);
            assert_eq!(text(pool.request(req(next)).await.unwrap()).await, "hi");
            assert_eq!(text(second).await, "hi");
        }
    }

    #[tokio::test]
    async fn a_body_dropped_unread_does_not_return_its_connection() {
        for kind in BOTH {
            let (addr, _) = app("a longer body", None).await;
            let pool: Pool = AppH1::new(addr, Duration::from_secs(5), usize::MAX, MAX_HEAD);
            drop(pool.request(req(kind)).await.unwrap());
            assert_eq!(pool.idle_count(), 0);
        }
    }

    #[tokio::test]
    async fn a_connection_the_app_closed_is_replaced_without_failing_the_request() {
        for kind in BOTH {
            // The app closes every connection after one response, without saying so.
            let (addr, accepted) = app("hi", Some(1)).await;
            let pool: Pool = AppH1::new(addr, Duration::from_secs(5), usize::MAX, MAX_HEAD);
            for _ in 0..4 {
                let resp = pool.request(req(kind)).await.unwrap();
                assert_eq!(text(resp).await, "hi");
                // Let the close reach the pooled connection for some rounds, not for others.
                tokio::task::yield_now().await;
            }
            assert_eq!(*accepted.lock().unwrap(), 4);
        }
    }

    #[tokio::test]
    async fn an_app_that_is_down_is_an_error() {
        for kind in BOTH {
            let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
            let addr = listener.local_addr().unwrap();
            drop(listener);
            let pool: Pool = AppH1::new(addr, Duration::from_secs(5), usize::MAX, MAX_HEAD);
            let error = pool.request(req(kind)).await.unwrap_err();
            assert!(error.contains("refused"), "{error}");
        }
    }

    /// A response whose head is `len` bytes long (an `x-pad` field fills it out), with the body `ok`.
    fn padded(len: usize) -> Vec<u8> {
        let mut out = b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\nx-pad: ".to_vec();
        out.resize(len - 4, b'a');
        out.extend_from_slice(b"\r\n\r\nok");
        out
    }

    /// An app that answers the requests it reads, on whichever connection, with `replies` in
    /// order, each written in pieces cut at the offsets given, 300 ms apart (the pool reads each
    /// piece alone); after a reply that ends no head it holds the connection open. Counts
    /// connections.
    async fn piecewise_app(replies: Vec<(Vec<u8>, Vec<usize>)>) -> (SocketAddr, Arc<Mutex<usize>>) {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let accepted = Arc::new(Mutex::new(0));
        let count = accepted.clone();
        let replies = Arc::new(Mutex::new(std::collections::VecDeque::from(replies)));
        tokio::spawn(async move {
            while let Ok((mut s, _)) = listener.accept().await {
                *count.lock().unwrap() += 1;
                let replies = replies.clone();
                tokio::spawn(async move {
                    let mut buf = Vec::new();
                    loop {
                        if !read_to_head_end(&mut s, &mut buf).await {
                            return;
                        }
                        // A request body (one byte here) is dropped with the next head's search.
                        buf.clear();
                        let Some((reply, cuts)) = replies.lock().unwrap().pop_front() else {
                            return;
                        };
                        let mut from = 0;
                        for to in cuts.into_iter().chain([reply.len()]) {
                            if from > 0 {
                                tokio::time::sleep(Duration::from_millis(300)).await;
                            }
                            if s.write_all(&reply[from..to]).await.is_err() {
                                return;
                            }
                            from = to;
                        }
                        if !reply.windows(4).any(|w| w == b"\r\n\r\n") {
                            let _ = s.read(&mut [0u8; 1]).await;
                            return;
                        }
                    }
                });
            }
        });
        (addr, accepted)
    }

    /// A head over the limit fails its request, on both pools, and its connection is not used
    /// again; one at the limit passes.
    #[tokio::test]
    async fn a_response_head_over_the_limit_fails_and_its_connection_is_not_reused() {
        for kind in BOTH {
            let (addr, accepted) = piecewise_app(vec![
                (padded(20_000), vec![]),
                (padded(16_384), vec![]),
                (padded(16_384), vec![]),
            ])
            .await;
            let pool: Pool = AppH1::new(addr, Duration::from_secs(5), usize::MAX, 16_384);
            let error = pool.request(req(kind)).await.unwrap_err();
            assert_eq!(error, "response head longer than 16384 bytes", "{kind:?}");
            assert_eq!(pool.idle_count(), 0, "{kind:?}");
            for _ in 0..2 {
                let resp = pool.request(req(kind)).await.unwrap();
                assert_eq!(text(resp).await, "ok", "{kind:?}");
            }
            assert_eq!(*accepted.lock().unwrap(), 2, "{kind:?}");
            assert_eq!(pool.idle_count(), 1, "{kind:?}");
        }
    }

    /// A head that goes on past the limit fails there, without waiting for its end (hyper's client
    /// would read on to 408 KiB).
    #[tokio::test]
    async fn a_response_head_that_runs_past_the_limit_fails_without_waiting_for_its_end() {
        for kind in BOTH {
            let mut unended = padded(20_000);
            unended.truncate(19_000);
            let (addr, _) = piecewise_app(vec![(unended, vec![])]).await;
            let pool: Pool = AppH1::new(addr, Duration::from_secs(5), usize::MAX, 16_384);
            let error = tokio::time::timeout(Duration::from_secs(10), pool.request(req(kind)))
                .await
                .expect("the head past the limit ended the wait")
                .unwrap_err();
            assert_eq!(error, "response head longer than 16384 bytes", "{kind:?}");
        }
    }

    /// A head read in pieces can overshoot hyper's read buffer by a read (its buffer grows by
    /// doubling: 5000, then 11000 bytes, then the rest, fit into 32 KiB): still refused.
    #[tokio::test]
    async fn a_response_head_over_the_limit_read_in_pieces_fails() {
        for kind in BOTH {
            let (addr, _) = piecewise_app(vec![(padded(25_000), vec![5_000, 16_000])]).await;
            let pool: Pool = AppH1::new(addr, Duration::from_secs(5), usize::MAX, 20_000);
            let error = pool.request(req(kind)).await.unwrap_err();
            assert_eq!(error, "response head longer than 20000 bytes", "{kind:?}");
        }
    }

    /// A request body from a channel: more of it may come after the response head.
    struct ChannelBody(tokio::sync::mpsc::Receiver<Bytes>);

    impl HttpBody for ChannelBody {
        type Data = Bytes;
        type Error = std::convert::Infallible;

        fn poll_frame(
            mut self: Pin<&mut Self>,
            cx: &mut Context<'_>,
        ) -> Poll<Option<Result<Frame<Bytes>, Self::Error>>> {
            self.0.poll_recv(cx).map(|b| b.map(|b| Ok(Frame::data(b))))
        }
    }

    #[tokio::test]
    async fn a_request_body_reaches_the_app_while_the_response_body_is_not_read() {
        // The app answers as soon as the request head is in, and ends its answer only once it has
        // the whole request body: the body must flow while nobody reads the response.
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let (got_body, body_read) = tokio::sync::oneshot::channel::<Vec<u8>>();
        tokio::spawn(async move {
            let (mut s, _) = listener.accept().await.unwrap();
            let mut buf = Vec::new();
            let mut chunk = [0u8; 1024];
            while !buf.windows(4).any(|w| w == b"\r\n\r\n") {
                let n = s.read(&mut chunk).await.unwrap();
                assert!(n > 0, "closed before the request head");
                buf.extend_from_slice(&chunk[..n]);
            }
            s.write_all(b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n5\r\nfirst\r\n")
                .await
                .unwrap();
            while !buf.ends_with(b"0\r\n\r\n") {
                let n = s.read(&mut chunk).await.unwrap();
                if n == 0 {
                    return;
                }
                buf.extend_from_slice(&chunk[..n]);
            }
            let _ = got_body.send(buf);
            s.write_all(b"4\r\nlast\r\n0\r\n\r\n").await.unwrap();
            // Keep the connection open for the next request's check.
            let _ = s.read(&mut chunk).await;
        });
        let pool: Arc<AppH1<ChannelBody>> =
            AppH1::new(addr, Duration::from_secs(5), usize::MAX, MAX_HEAD);
        let (tx, rx) = tokio::sync::mpsc::channel(4);
        let req = Request::post("/")
            .header("host", "app")
            .body(ChannelBody(rx))
            .unwrap();
        let resp = pool.request(req).await.unwrap();
        tx.send(Bytes::from_static(b"abc")).await.unwrap();
        drop(tx);
        let seen = tokio::time::timeout(Duration::from_secs(10), body_read)
            .await
            .expect("the request body reached the app with the response unread")
            .unwrap();
        assert!(
            seen.windows(3).any(|w| w == b"abc"),
            "{}",
            String::from_utf8_lossy(&seen)
        );
        assert_eq!(text(resp).await, "firstlast");
    }

    /// A request whose body is still coming when the app has answered in full: its connection
    /// cannot take another request before that body ends, so it must not go back to the pool, where
    /// the next request (from any peer) would wait on it.
    #[tokio::test]
    async fn a_connection_whose_request_body_is_still_being_sent_is_not_reused() {
        // The app answers every request as soon as its head is in, and reads on.
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(async move {
            while let Ok((mut s, _)) = listener.accept().await {
                tokio::spawn(async move {
                    let mut buf = Vec::new();
                    loop {
                        if !read_to_head_end(&mut s, &mut buf).await {
                            return;
                        }
                        // The body that follows is read and dropped with the next head's search.
                        buf.clear();
                        if s.write_all(b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok")
                            .await
                            .is_err()
                        {
                            return;
                        }
                    }
                });
            }
        });
        let pool: Arc<AppH1<ChannelBody>> =
            AppH1::new(addr, Duration::from_secs(5), usize::MAX, MAX_HEAD);
        let post = |rx| {
            Request::post("/")
                .header("host", "app")
                .header("content-length", "10")
                .body(ChannelBody(rx))
                .unwrap()
        };
        // The first request's body: 3 of its 10 bytes, the rest never comes.
        let (held_tx, rx) = tokio::sync::mpsc::channel(4);
        held_tx.send(Bytes::from_static(b"abc")).await.unwrap();
        let first = pool.request(post(rx)).await.unwrap();
        assert_eq!(text(first).await, "ok");
        assert_eq!(
            pool.idle_count(),
            0,
            "a connection still sending a request body went back to the pool"
        );
        // The next request is answered, on another connection.
        let (tx, rx) = tokio::sync::mpsc::channel(4);
        tx.send(Bytes::from_static(b"0123456789")).await.unwrap();
        drop(tx);
        let second = tokio::time::timeout(Duration::from_secs(10), async {
            text(pool.request(post(rx)).await.unwrap()).await
        })
        .await
        .expect("the next request waited on the connection still sending the first one's body");
        assert_eq!(second, "ok");
        drop(held_tx);
    }

    #[tokio::test]
    async fn a_connection_the_app_closed_while_idle_is_let_go_at_the_next_prune() {
        for kind in BOTH {
            let (addr, _) = app("hi", Some(1)).await;
            let pool: Pool = AppH1::new(addr, Duration::from_secs(5), usize::MAX, MAX_HEAD);
            assert_eq!(text(pool.request(req(kind)).await.unwrap()).await, "hi");
            // The app closes its side after one response; pruning sees it with no request coming.
            for _ in 0..500 {
                pool.prune(Instant::now());
                if pool.idle_count() == 0 {
                    break;
                }
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
            assert_eq!(pool.idle_count(), 0);
        }
    }

    #[tokio::test(start_paused = true)]
    async fn idle_connections_are_closed_after_the_idle_timeout() {
        for kind in BOTH {
            let (addr, _) = app("hi", None).await;
            let pool: Pool = AppH1::new(addr, Duration::from_secs(5), usize::MAX, MAX_HEAD);
            text(pool.request(req(kind)).await.unwrap()).await;
            assert_eq!(pool.idle_count(), 1);
            tokio::time::sleep(IDLE_TIMEOUT + IDLE_TIMEOUT / 2).await;
            assert_eq!(pool.idle_count(), 0);
        }
    }
}
