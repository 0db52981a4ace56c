//! The inbound's HTTP/1.1 exchanges with the app for requests without a body, on connections of
//! its own: the head is written and the response read and framed ([`meshid_runtime::h1`]) in the
//! task that serves the request.
//!
//! hyper's client runs each connection as a task of its own, reached through a channel, with the
//! response sent back through a oneshot: two more task wake-ups per request, and about 14k
//! instructions per request in all. A bodiless request (most of them: `GET`, `HEAD`, `DELETE`)
//! needs none of that. Requests with a body, and upgrades, stay on hyper ([`super::app`]).
//!
//! A connection is kept for the next request only when its response said so (HTTP/1.1 without
//! `Connection: close`), was framed by length or chunks, and was read to its end with nothing
//! after it. An idle connection the app has closed is noticed when it is taken, and a request on
//! a pooled connection that closes before a byte of answer is sent again on a new one when its
//! method is idempotent (RFC 9110 §9.2.2); otherwise it fails, as with hyper.

use std::future::poll_fn;
use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::{Arc, Mutex, MutexGuard, Weak};
use std::task::{Context, Poll, ready};
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use http::{Method, Request, Response, header};
use http_body_util::BodyExt;
use hyper::body::{Body as HttpBody, Frame, SizeHint};
use meshid_runtime::h1::{self, BodyDecoder, Decoded, ResponseHead};
use tokio::io::AsyncWriteExt;
use tokio::net::TcpStream;
use tokio::time::Instant;

use super::app::{IDLE_TIMEOUT, MAX_IDLE};
use crate::http::{Body, BoxError};

/// Read buffer growth: a read asks for at least this much room.
const READ_SIZE: usize = 8 * 1024;

/// One connection to the app, idle between exchanges with nothing left in its buffer.
struct Conn {
    tcp: TcpStream,
    buf: BytesMut,
}

/// Bodiless requests' connections to one app address.
pub(super) struct Bare {
    target: SocketAddr,
    connect_timeout: Duration,
    /// Idle connections and when each went idle, the most recently used last.
    idle: Mutex<Vec<(Conn, Instant)>>,
}

impl Bare {
    pub(super) fn new(target: SocketAddr, connect_timeout: Duration) -> Arc<Self> {
        Arc::new(Self {
            target,
            connect_timeout,
            idle: Mutex::new(Vec::new()),
        })
    }

    /// Whether `req` can be sent here: no body, no transfer coding, no upgrade, not `CONNECT`.
    pub(super) fn suits<B: HttpBody>(req: &Request<B>) -> bool {
        req.body().is_end_stream()
            && req.method() != Method::CONNECT
            && !req.headers().contains_key(header::UPGRADE)
            && !req.headers().contains_key(header::TRANSFER_ENCODING)
    }

    /// Sends the bodiless request `head` (origin-form target, `Host` set) on an idle connection
    /// or a new one. The response body puts the connection back once read to its end.
    pub(super) async fn request(
        self: &Arc<Self>,
        head: &http::request::Parts,
    ) -> Result<Response<Body>, String> {
        let target = head.uri.path_and_query().map_or("/", |pq| pq.as_str());
        let mut wire = Vec::new();
        h1::write_request_head(&mut wire, &head.method, target, &head.headers);
        loop {
            let (mut conn, pooled) = match self.checkout() {
                Some(conn) => (conn, true),
                None => (self.connect().await?, false),
            };
            if let Err(e) = conn.tcp.write_all(&wire).await {
                if pooled {
                    // The app closed it while idle: nothing was taken in.
                    continue;
                }
                return Err(e.to_string());
            }
            match read_head(&mut conn, &head.method).await? {
                Some(head) => return Ok(self.respond(conn, head)),
                None if pooled && head.method.is_idempotent() => {
                    tracing::debug!(target = %self.target, "app connection closed unanswered; the request again on another one");
                }
                None => return Err("the app closed the connection without answering".into()),
            }
        }
    }

    fn respond(self: &Arc<Self>, conn: Conn, head: ResponseHead) -> Response<Body> {
        let mut body = BareBody {
            conn: Some(conn),
            decoder: BodyDecoder::new(head.framing),
            keep_alive: head.keep_alive,
            pool: Arc::downgrade(self),
        };
        if body.decoder.is_end() {
            body.finish();
        }
        head.response.map(|()| body.boxed())
    }

    async fn connect(&self) -> Result<Conn, String> {
        Ok(Conn {
            tcp: connect(self.target, self.connect_timeout).await?,
            buf: BytesMut::new(),
        })
    }

    /// Idle connections held now.
    pub(super) fn idle_count(&self) -> usize {
        self.lock().len()
    }

    fn lock(&self) -> MutexGuard<'_, Vec<(Conn, Instant)>> {
        lock(&self.idle)
    }

    /// Drops connections that the app closed or that idled past [`IDLE_TIMEOUT`].
    pub(super) fn prune(&self, now: Instant) {
        self.lock()
            .retain(|(c, since)| now.duration_since(*since) < IDLE_TIMEOUT && open(&c.tcp));
    }

    fn checkout(&self) -> Option<Conn> {
        let now = Instant::now();
        let mut idle = self.lock();
        while let Some((c, since)) = idle.pop() {
            if now.duration_since(since) < IDLE_TIMEOUT && open(&c.tcp) {
                return Some(c);
            }
        }
        None
    }

    fn check_in(&self, conn: Conn) {
        let mut idle = self.lock();
        if idle.len() < MAX_IDLE {
            idle.push((conn, Instant::now()));
        }
    }
}

/// A new connection to the app (`TCP_NODELAY` set), or why not.
pub(super) async fn connect(target: SocketAddr, timeout: Duration) -> Result<TcpStream, String> {
    let tcp = match tokio::time::timeout(timeout, TcpStream::connect(target)).await {
        Ok(Ok(tcp)) => tcp,
        Ok(Err(e)) => return Err(e.to_string()),
        Err(_) => return Err(format!("connecting timed out after {timeout:?}")),
    };
    let _ = tcp.set_nodelay(true);
    Ok(tcp)
}

/// A pool's idle list. A panic while holding the lock leaves a plain Vec behind: still usable.
pub(super) fn lock<T>(idle: &Mutex<Vec<T>>) -> MutexGuard<'_, Vec<T>> {
    idle.lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
}

/// Whether an idle connection is still open: nothing to read, no end, no error. (A byte from an
/// idle app is a protocol error: the connection is not used again either.)
fn open(tcp: &TcpStream) -> bool {
    matches!(tcp.try_read(&mut [0u8; 1]), Err(e) if e.kind() == io::ErrorKind::WouldBlock)
}

/// Reads into `buf`, making room first: `Ok(0)` at the end of the stream.
fn poll_fill(tcp: &TcpStream, buf: &mut BytesMut, cx: &mut Context<'_>) -> Poll<io::Result<usize>> {
    if buf.capacity() - buf.len() < READ_SIZE / 8 {
        buf.reserve(READ_SIZE);
    }
    loop {
        match tcp.try_read_buf(buf) {
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => ready!(tcp.poll_read_ready(cx))?,
            done => return Poll::Ready(done),
        }
    }
}

/// The response head; `None` when the connection ended before a byte of it.
async fn read_head(conn: &mut Conn, method: &Method) -> Result<Option<ResponseHead>, String> {
    let mut read_any = false;
    loop {
        if !conn.buf.is_empty()
            && let Some(head) =
                h1::parse_response_head(&mut conn.buf, method).map_err(|e| e.to_string())?
        {
            return Ok(Some(head));
        }
        match poll_fn(|cx| poll_fill(&conn.tcp, &mut conn.buf, cx)).await {
            Ok(0) if read_any => {
                return Err(
                    "the app closed the connection in the middle of a response head".into(),
                );
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

/// A response body read from the app's connection, which goes back to the pool once the body
/// has been read to its end (or had none).
struct BareBody {
    /// `None` once the body has ended or failed.
    conn: Option<Conn>,
    decoder: BodyDecoder,
    keep_alive: bool,
    pool: Weak<Bare>,
}

impl BareBody {
    /// The body is complete: its connection goes back if it may carry another exchange.
    fn finish(&mut self) {
        if let Some(conn) = self.conn.take()
            && self.keep_alive
            && conn.buf.is_empty()
            && let Some(pool) = self.pool.upgrade()
        {
            pool.check_in(conn);
        }
    }

    fn fail(&mut self, error: impl Into<BoxError>) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        self.conn = None;
        Poll::Ready(Some(Err(error.into())))
    }
}

impl HttpBody for BareBody {
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
                Ok(Decoded::Trailers(trailers)) => {
                    return Poll::Ready(Some(Ok(Frame::trailers(trailers))));
                }
                Ok(Decoded::End) => {
                    this.finish();
                    return Poll::Ready(None);
                }
                Ok(Decoded::NeedMore) => match ready!(poll_fill(&conn.tcp, &mut conn.buf, cx)) {
                    Ok(0) => match this.decoder.eof() {
                        Ok(_) => {
                            this.finish();
                            return Poll::Ready(None);
                        }
                        Err(e) => return this.fail(e),
                    },
                    Ok(_) => {}
                    Err(e) => return this.fail(e),
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

impl Drop for BareBody {
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

    fn pool(addr: SocketAddr) -> Arc<Bare> {
        Bare::new(addr, Duration::from_secs(5))
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

    #[tokio::test]
    async fn only_bodiless_plain_requests_suit() {
        let get = |body: &'static str| {
            Request::get("/").body(http_body_util::Full::new(Bytes::from(body)))
        };
        assert!(Bare::suits(&get("").unwrap()));
        assert!(!Bare::suits(&get("x").unwrap()));
        let mut upgrade = get("").unwrap();
        upgrade
            .headers_mut()
            .insert(header::UPGRADE, "websocket".parse().unwrap());
        assert!(!Bare::suits(&upgrade));
        let mut connect = get("").unwrap();
        *connect.method_mut() = Method::CONNECT;
        assert!(!Bare::suits(&connect));
        let mut chunked = get("").unwrap();
        chunked
            .headers_mut()
            .insert(header::TRANSFER_ENCODING, "chunked".parse().unwrap());
        assert!(!Bare::suits(&chunked));
    }
}
