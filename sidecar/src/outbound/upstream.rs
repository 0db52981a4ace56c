//! One multiplexed h2 mTLS connection per HTTP upstream, replaced when it closes, when our own
//! certificate is renewed, or shortly before either end's certificate expires (the old one finishes
//! its in-flight requests, then closes), so no connection outlives the identities that opened it.
//!
//! Retiring a connection must never fail a request. The upstream sidecar ends a connection at our
//! certificate's expiry with a GOAWAY; a request sent as that GOAWAY crosses it would be refused.
//! So we stop sending on a connection well before: as soon as a renewed certificate is in force
//! (new connections present it), and [`RETIRE_MARGIN`] before the earlier of the two expiries
//! whatever happens. A request that the connection cannot take (it closed, or the upstream sent
//! GOAWAY, before the request was handed to it) is sent once more on a new connection.
//!
//! Requests go into the `h2` crate directly from the task serving the app's request: the response
//! is awaited there, and a request body is streamed by a task of its own only when there is one.
//! hyper's h2 client added a dispatch channel, a task per request and a oneshot for the response:
//! about 15% of the outbound's instructions per request (`scripts/request-instructions.sh
//! outbound`). What hyper gave us and `h2` does not is done here: keep-alive pings that give up a
//! dead connection, flow-control capacity handed back as the app takes the response, a body copied
//! frame by frame within the upstream's window.

use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::task::{Context, Poll, ready};
use std::time::Duration;

use arc_swap::ArcSwapOption;
use bytes::Bytes;
use h2::client::SendRequest;
use h2::{Ping, PingPong, RecvStream, SendStream};
use http::{Request, Response};
use hyper::body::{Body as HttpBody, Frame, SizeHint};
use meshid_runtime::time::expiry_instant;
use tokio::time::Instant;

use super::dial::{Alpn, DialPermits, dial_with, upstream_http_ended, upstream_not_after};
use super::silence::Silence;
use crate::conn::Shared;
use crate::creds::Snapshot;
use crate::http::{BoxError, ReqBody, root_cause};
use crate::settings::Outbound;

/// How long before the earlier certificate expiry a connection takes no new requests. The upstream
/// rounds the time left down to whole seconds, so it may close up to a second early.
const RETIRE_MARGIN: Duration = Duration::from_secs(2);

/// Flow-control windows we grant the upstream (per stream, per connection). All of the outbound's
/// app clients share the connection, and a response's window comes back only as its app takes the
/// data: a client that stops reading keeps its stream's window in full until the stall watchdog
/// drops its response (`crate::idle`, the idle timeout). So one stream gets an eighth of the
/// connection: seven clients that stop reading leave a whole stream window to the others, and at
/// most 8 MiB per upstream waits in the sidecar for apps that do not read. 1 MiB in flight per
/// stream still streams a large response at over 1 GB/s at a 1 ms round trip (a cluster's), with
/// window updates as the app takes each frame.
const STREAM_WINDOW: u32 = 1024 * 1024;
const CONNECTION_WINDOW: u32 = 8 * 1024 * 1024;
/// Bytes of request body h2 buffers per stream ahead of the socket before the body waits for
/// capacity (h2's default is 400 KiB). The upstream decides how much of it is used: an upstream
/// that advertises large windows and then stops reading the socket holds this much per stream,
/// [`MAX_STREAMS`] streams a connection. The socket's own buffer lies below it, so 64 KiB (four
/// frames) still streams a large upload at full speed, as on the inbound's h2 server: 2 GiB over
/// plaintext loopback with h2 alone, 670-1,830 MiB/s against 1,370-1,960 with 1 MiB (a loaded
/// two-core host). That is to a peer with `TCP_NODELAY` set, as a meshid inbound does; one that
/// leaves Nagle on delays its window updates, which a short buffer no longer covers (50-110 MiB/s
/// against 480-720).
const SEND_BUFFER: usize = 64 * 1024;

/// The most streams we have open at once on one connection to an upstream, whatever more it
/// allows (its `SETTINGS_MAX_CONCURRENT_STREAMS`, which a lying upstream can set to 2^31-1): as
/// many as a meshid inbound allows (hyper's default). Past it, requests go on another connection,
/// up to `--max-upstream-h2-connections`, then are answered 503 ([`SATURATED`]): a client whose
/// requests stall (or an upstream that answers none) holds at most this many streams, and what
/// each buffers, per connection.
pub const MAX_STREAMS: usize = 200;

/// The error of [`H2Upstream::request`] when every connection it may open to the upstream has
/// all its streams in use (answered 503: nothing was sent).
pub const SATURATED: &str = "every stream we may open is in use on each of our connections to the upstream (at most 200 each, fewer if it allows fewer; --max-upstream-h2-connections)";

struct H2Conn {
    send: SendRequest<Bytes>,
    /// Set when the connection's task has ended (closed by either side, dead, or revoked).
    closed: Arc<AtomicBool>,
    /// Stop sending new requests here at this instant (shortly before the earlier of the two
    /// certificates' expiries), when connection ages are capped.
    retire_at: Option<Instant>,
    /// The credentials this connection presents: once they are no longer in force (a renewal, a
    /// bundle change), new requests go to a new connection.
    presented: Arc<Snapshot>,
    /// Requests sent (or being sent) here whose exchange has not ended: its streams in use.
    streams: AtomicUsize,
    /// Requests sent here and dropped before their response head came (their client gave up,
    /// or the connection failed): each one a stream reset the upstream may count against us.
    abandoned: AtomicUsize,
    /// Set past [`ABANDONED_RETIRE`] of those: no new request goes here (it drains).
    retired: AtomicBool,
    /// Streams in use on every connection to this upstream ([`H2Upstream::streams`]), draining
    /// ones included.
    upstream_streams: Arc<AtomicUsize>,
}

/// How many requests abandoned before their response head retire a connection. A meshid inbound
/// closes a connection at once, with every request on it, when over 200 of its requests were reset
/// within a second of arriving and they are over half of those its app answered
/// (`crate::streams::RESET_FLOOD`): all of a listener's clients share a connection, and one that
/// sends requests and hangs up on each would otherwise have the others' requests cut with it.
/// Retired earlier, the connection drains gracefully and a new one takes the new requests.
pub const ABANDONED_RETIRE: usize = crate::streams::RESET_FLOOD / 2;

/// Below this many streams in use a connection is not asked for the upstream's limit (which
/// takes the `h2` connection's lock): RFC 9113 §6.5.2 recommends a limit of no fewer than 100, and
/// meshid's inbound allows 200 (hyper's default). An upstream that allows fewer is treated as
/// before: requests past its limit wait inside h2 for a stream.
const FEWEST_STREAMS_CHECKED: usize = 100;

impl H2Conn {
    /// Whether every stream we may open here is in use: [`MAX_STREAMS`], or every one the upstream
    /// allows at once (its `SETTINGS_MAX_CONCURRENT_STREAMS`) if fewer, when a request sent now
    /// would wait inside h2 for one to end.
    fn saturated(&self) -> bool {
        let streams = self.streams.load(Ordering::Acquire);
        streams >= FEWEST_STREAMS_CHECKED
            && (streams >= MAX_STREAMS || streams >= self.send.current_max_send_streams())
    }
}

/// A request's stream counted among its connection's [`H2Conn::streams`] until dropped (with the
/// response body, or when the request fails); dropped while it waits for the response head, it
/// counts among the connection's [`H2Conn::abandoned`].
struct InStream {
    conn: Arc<H2Conn>,
    awaiting_head: bool,
}

impl InStream {
    fn on(conn: &Arc<H2Conn>) -> Self {
        conn.streams.fetch_add(1, Ordering::AcqRel);
        conn.upstream_streams.fetch_add(1, Ordering::AcqRel);
        Self {
            conn: conn.clone(),
            awaiting_head: false,
        }
    }
}

impl Drop for InStream {
    fn drop(&mut self) {
        let conn = &self.conn;
        conn.streams.fetch_sub(1, Ordering::AcqRel);
        conn.upstream_streams.fetch_sub(1, Ordering::AcqRel);
        if self.awaiting_head {
            let abandoned = conn.abandoned.fetch_add(1, Ordering::AcqRel) + 1;
            if abandoned == ABANDONED_RETIRE + 1 {
                conn.retired.store(true, Ordering::Release);
                tracing::debug!(
                    abandoned,
                    "requests abandoned before their answer on an upstream connection; new \
                     requests go to a new one"
                );
            }
        }
    }
}

/// An HTTP upstream reached over h2 + mTLS. Requests go straight into the `h2` connection from the
/// task that serves the app's request (no dispatch task or channel in between); the connection's
/// own task reads and writes the socket.
pub struct H2Upstream {
    spec: Arc<Outbound>,
    index: usize,
    shared: Shared,
    /// The connection in use; read without locking on the request path.
    current: ArcSwapOption<H2Conn>,
    /// Held only while dialing, so concurrent requests share one new connection.
    dialing: tokio::sync::Mutex<()>,
    /// Further connections, opened when every earlier one had all the streams the upstream
    /// allows in use (at most `max_upstream_h2_connections` in all, with `current`): a client
    /// whose requests stall (a body it never finishes sending) cannot make everyone else's wait
    /// behind its streams. Looked at only when `current` is saturated.
    spares: tokio::sync::Mutex<Vec<Arc<H2Conn>>>,
    /// The listener's dials in progress ([`DialPermits`]), shared with its HTTP/1.1 pool.
    dials: DialPermits,
    /// Streams in use on every connection to the upstream, those no longer `current` or spare
    /// included (a connection the upstream sent GOAWAY, or retired, drains its streams): at most
    /// [`MAX_STREAMS`] per connection we may open, then [`SATURATED`]. Without it an upstream
    /// that answered heads, trickled bodies and sent GOAWAY had a new connection opened each time,
    /// the old one's streams held outside every cap, without bound.
    streams: Arc<AtomicUsize>,
}

impl H2Upstream {
    pub fn new(spec: Outbound, index: usize, shared: Shared, dials: DialPermits) -> Self {
        Self {
            spec: Arc::new(spec),
            index,
            shared,
            current: ArcSwapOption::empty(),
            dialing: tokio::sync::Mutex::new(()),
            spares: tokio::sync::Mutex::new(Vec::new()),
            dials,
            streams: Arc::default(),
        }
    }

    /// Whether the streams in use on every connection to the upstream, draining ones included,
    /// are as many as all the connections we may open hold.
    fn all_streams_in_use(&self) -> bool {
        self.streams.load(Ordering::Acquire)
            >= MAX_STREAMS.saturating_mul(self.shared.limits.max_upstream_h2_connections)
    }

    fn usable(&self) -> Option<Arc<H2Conn>> {
        let c = self.current.load_full()?;
        self.fresh(&c).then_some(c)
    }

    /// Whether `c` may take a new request: open, presenting the credentials in force, not about
    /// to be retired.
    fn fresh(&self, c: &H2Conn) -> bool {
        c.retire_at.is_none_or(|t| Instant::now() < t)
            && self.shared.creds.is_current(&c.presented)
            && !c.closed.load(Ordering::Acquire)
            && !c.retired.load(Ordering::Acquire)
    }

    /// A connection with a stream to spare when `current` has none: a spare one that has, or a
    /// new one while fewer than `max_upstream_h2_connections` are open; else [`SATURATED`].
    async fn spare(&self, failed: Option<&Arc<H2Conn>>) -> Result<Arc<H2Conn>, String> {
        let mut spares = self.spares.lock().await;
        spares.retain(|c| self.fresh(c) && failed.is_none_or(|f| !Arc::ptr_eq(c, f)));
        if let Some(c) = spares.iter().find(|c| !c.saturated()) {
            return Ok(c.clone());
        }
        if spares.len() + 1 >= self.shared.limits.max_upstream_h2_connections {
            return Err(SATURATED.to_owned());
        }
        // Boxed here and in `sender`: a dial's future (the TLS and h2 handshakes) is several KiB,
        // and inline it would size every request's future, which is moved and copied whole.
        let c = Box::pin(self.dial()).await.map_err(|e| root_cause(&e))?;
        tracing::debug!(upstream = %self.spec.remote, open = spares.len() + 2, "every stream of the upstream connections in use; another connection opened");
        spares.push(c.clone());
        Ok(c)
    }

    /// The connection to send on: the current one while usable, else a new one. `failed` is a
    /// connection that just refused a request: never that one again.
    async fn sender(&self, failed: Option<&Arc<H2Conn>>) -> io::Result<Arc<H2Conn>> {
        let usable = || {
            self.usable()
                .filter(|c| failed.is_none_or(|f| !Arc::ptr_eq(c, f)))
        };
        if let Some(c) = usable() {
            return Ok(c);
        }
        let _guard = self.dialing.lock().await;
        if let Some(c) = usable() {
            return Ok(c);
        }
        // Dropping our handle to the old connection lets it close once its streams are done.
        self.current.store(None);
        let c = Box::pin(self.dial()).await?;
        self.current.store(Some(c.clone()));
        // Spare connections presenting the credentials just retired are let go too.
        if let Ok(mut spares) = self.spares.try_lock() {
            spares.retain(|c| self.fresh(c));
        }
        Ok(c)
    }

    /// A new connection to the upstream, its task running.
    async fn dial(&self) -> io::Result<Arc<H2Conn>> {
        let (tls, presented) =
            dial_with(&self.spec, self.index, &self.shared, Alpn::H2, &self.dials).await?;
        // A revoked upstream's connection closes at once, in-flight requests with it: its
        // certificate is no longer trusted at all. So does one whose certificate expired a grace
        // period ago (it takes no new request from shortly before the expiry: `retire_at`).
        let ended = upstream_http_ended(&tls, &presented, self.spec.local.port(), &self.shared);
        let retire_at = retire_at(&tls, &presented, &self.shared);
        let (send, mut conn) = client_builder(self.shared.limits.max_header_bytes)
            .handshake::<_, Bytes>(meshid_runtime::io::Coalesce::new(tls))
            .await
            .map_err(io::Error::other)?;
        let pings = conn.ping_pong();
        let ping_every = self.shared.limits.upstream_ping;
        let closed = Arc::new(AtomicBool::new(false));
        let upstream = self.spec.remote.clone();
        let closing = closed.clone();
        tokio::spawn(Box::pin(async move {
            // The revocation watch and the keep-alive are polled when they were woken, not at
            // every wake of the connection's task (several per request).
            let outside = std::pin::pin!(async {
                tokio::select! {
                    why = ended => tracing::info!(%upstream, "closing the upstream connection: {why}"),
                    ended = keep_alive(pings, ping_every) => match ended {
                        PingsEnded::Unanswered => tracing::info!(%upstream, "upstream connection did not answer a ping within {:?}; closing it", ping_every / 3),
                        PingsEnded::Gone => tracing::debug!(%upstream, "upstream connection gone; pings stopped"),
                    },
                }
            });
            tokio::select! {
                r = &mut conn => if let Err(error) = r {
                    tracing::debug!(%error, %upstream, "upstream connection ended");
                },
                () = meshid_runtime::wake::WhenWoken::new(outside) => {}
            }
            closing.store(true, Ordering::Release);
        }));
        Ok(Arc::new(H2Conn {
            send,
            closed,
            retire_at,
            presented,
            streams: AtomicUsize::new(0),
            abandoned: AtomicUsize::new(0),
            retired: AtomicBool::new(false),
            upstream_streams: self.streams.clone(),
        }))
    }

    /// Sends one request, dialing (or re-dialing) the upstream when needed. A request the
    /// connection cannot take (it closed, or is going away) goes out once more on a new connection,
    /// and so does a bodiless one the upstream refused unprocessed as it went away: a stream above
    /// its GOAWAY's last stream ID (RFC 9113, 6.8). That happens to a request queued as the GOAWAY
    /// crossed it: h2 writes the ping's answer that completes a graceful GOAWAY before the
    /// request's HEADERS. A request with a body is not sent twice (its body is on its way).
    pub async fn request(&self, req: Request<ReqBody>) -> Result<Response<UpstreamBody>, String> {
        let (head, body) = req.into_parts();
        let end_of_stream = body.is_end_stream();
        let mut head = Some(head);
        let mut failed = None;
        let (response, sending, mut stream) = loop {
            let mut conn = self
                .sender(failed.as_ref())
                .await
                .map_err(|e| root_cause(&e))?;
            if conn.saturated() {
                conn = self.spare(failed.as_ref()).await?;
            }
            if self.all_streams_in_use() {
                return Err(SATURATED.to_owned());
            }
            let last_try = failed.is_some();
            let mut stream = InStream::on(&conn);
            let mut send = match conn.send.clone().ready().await {
                Ok(send) => send,
                Err(e) if last_try => return Err(root_cause(&e)),
                Err(e) => {
                    tracing::debug!(error = %e, upstream = %self.spec.remote, "upstream connection closed before the request; on a new one");
                    failed = Some(conn);
                    continue;
                }
            };
            let Some(this) = head.take() else {
                return Err("the request could not be sent".to_owned());
            };
            // Kept for a second try: only a bodiless request can be sent again.
            if end_of_stream && !last_try {
                head = Some(copy_head(&this));
            }
            let (response, sending) = match send
                .send_request(Request::from_parts(this, ()), end_of_stream)
            {
                Ok(sent) => sent,
                Err(e) if head.is_some() && refused_unprocessed(&e) => {
                    tracing::debug!(error = %e, upstream = %self.spec.remote, "upstream going away before the request; on a new connection");
                    failed = Some(conn);
                    continue;
                }
                Err(e) => return Err(root_cause(&e)),
            };
            stream.awaiting_head = true;
            if !end_of_stream {
                break (response, sending, stream);
            }
            let response = response.await;
            stream.awaiting_head = false;
            match response {
                Ok(resp) => {
                    return Ok(resp.map(|recv| UpstreamBody {
                        recv,
                        data_done: false,
                        silence: Silence::new(self.shared.limits.idle_timeout),
                        sending: None,
                        _stream: stream,
                    }));
                }
                Err(e) if head.is_some() && refused_unprocessed(&e) => {
                    tracing::debug!(error = %e, upstream = %self.spec.remote, "upstream went away without processing the request; on a new connection");
                    failed = Some(conn);
                }
                Err(e) => return Err(root_cause(&e)),
            }
        };
        // The copy of the request body lives no longer than the exchange: it ends with the
        // response (or when the app stops waiting for one, say at the request timeout). An
        // upstream that answers and never opens its flow-control window would otherwise keep the
        // copy, the app's body and the stream waiting for ever, one more per request.
        let sent = Arc::new(AtomicBool::new(false));
        let sending = Some(SendingBody {
            task: tokio::spawn(Box::pin(send_body(body, sending, sent.clone()))).abort_handle(),
            sent,
        });
        let resp = response.await;
        stream.awaiting_head = false;
        let resp = resp.map_err(|e| root_cause(&e))?;
        Ok(resp.map(|recv| UpstreamBody {
            recv,
            data_done: false,
            silence: Silence::new(self.shared.limits.idle_timeout),
            sending,
            _stream: stream,
        }))
    }
}

/// The h2 client of every upstream connection: our windows, buffers and header limit.
fn client_builder(max_header_bytes: usize) -> h2::client::Builder {
    let mut builder = h2::client::Builder::new();
    builder
        .initial_window_size(STREAM_WINDOW)
        .initial_connection_window_size(CONNECTION_WINDOW)
        .max_header_list_size(u32::try_from(max_header_bytes).unwrap_or(u32::MAX))
        .max_send_buffer_size(SEND_BUFFER)
        .enable_push(false);
    builder
}

/// Whether `e` says the upstream did not process the request: it went away (a GOAWAY it sent,
/// without an error) before the request, or above the GOAWAY's last stream ID; or it refused the
/// stream (REFUSED_STREAM).
fn refused_unprocessed(e: &h2::Error) -> bool {
    (e.is_go_away() && e.is_remote() && e.reason() == Some(h2::Reason::NO_ERROR))
        || e.reason() == Some(h2::Reason::REFUSED_STREAM)
}

/// A copy of a request's head, to send it once more.
fn copy_head(head: &http::request::Parts) -> http::request::Parts {
    let mut req = Request::new(());
    *req.method_mut() = head.method.clone();
    *req.uri_mut() = head.uri.clone();
    *req.version_mut() = head.version;
    *req.headers_mut() = head.headers.clone();
    *req.extensions_mut() = head.extensions.clone();
    req.into_parts().0
}

/// When a connection to an upstream takes no new requests: [`RETIRE_MARGIN`] before the earlier
/// of the two certificates' expiries, when connection ages are capped.
pub(super) fn retire_at(
    tls: &crate::tls::ClientTlsStream<tokio::net::TcpStream>,
    presented: &Snapshot,
    shared: &Shared,
) -> Option<Instant> {
    shared.limits.cap_connection_age.then(|| {
        let not_after = upstream_not_after(tls).min(presented.identity.not_after);
        expiry_instant(not_after)
            .checked_sub(RETIRE_MARGIN)
            .unwrap_or_else(Instant::now)
    })
}

/// Why [`keep_alive`] stopped.
#[derive(Debug, PartialEq, Eq)]
enum PingsEnded {
    /// A ping went unanswered: the peer is gone without a FIN or RST, or stuck.
    Unanswered,
    /// A ping could not be sent: the connection has ended (it says why itself).
    Gone,
}

/// Pings the connection every `every`; returns when a ping goes unanswered for a third of that, or
/// cannot be sent.
async fn keep_alive(pings: Option<PingPong>, every: Duration) -> PingsEnded {
    let Some(mut pings) = pings else {
        return std::future::pending().await;
    };
    loop {
        tokio::time::sleep(every).await;
        match tokio::time::timeout(every / 3, pings.ping(Ping::opaque())).await {
            Ok(Ok(_pong)) => {}
            Ok(Err(_)) => return PingsEnded::Gone,
            Err(_) => return PingsEnded::Unanswered,
        }
    }
}

/// Streams a request body into its h2 stream, frame by frame as the upstream's flow-control window
/// allows, then its trailers; sets `sent` whenever it hands the stream some. A body that fails
/// resets the stream; a stream the upstream reset (it answered early, or gave up) ends the copy,
/// also while the app is between frames.
async fn send_body<B>(mut body: B, mut out: SendStream<Bytes>, sent: Arc<AtomicBool>)
where
    B: HttpBody<Data = Bytes> + Unpin,
    B::Error: std::fmt::Display,
{
    loop {
        let next = std::future::poll_fn(|cx| {
            if out.poll_reset(cx).is_ready() {
                return Poll::Ready(None);
            }
            Pin::new(&mut body).poll_frame(cx).map(Some)
        });
        let frame = match next.await {
            None => return,
            Some(None) => {
                let _ = out.send_data(Bytes::new(), true);
                return;
            }
            Some(Some(Err(error))) => {
                tracing::debug!(%error, "request body from the app failed; resetting the stream");
                out.send_reset(h2::Reason::CANCEL);
                return;
            }
            Some(Some(Ok(frame))) => frame,
        };
        let mut data = match frame.into_data() {
            Ok(data) => data,
            Err(frame) => {
                if let Ok(trailers) = frame.into_trailers() {
                    let _ = out.send_trailers(trailers);
                }
                return;
            }
        };
        while !data.is_empty() {
            out.reserve_capacity(data.len());
            // A stream the upstream reset while it grants no window ends the copy too.
            let granted = match std::future::poll_fn(|cx| {
                if out.poll_reset(cx).is_ready() {
                    return Poll::Ready(None);
                }
                out.poll_capacity(cx)
            })
            .await
            {
                Some(Ok(n)) if n > 0 => n,
                Some(Ok(_)) => continue,
                None | Some(Err(_)) => return,
            };
            let chunk = data.split_to(granted.min(data.len()));
            // The last bytes of a body that says it has ended carry the end of the stream.
            let end = data.is_empty() && body.is_end_stream();
            if out.send_data(chunk, end).is_err() || end {
                return;
            }
            sent.store(true, Ordering::Relaxed);
        }
    }
}

/// The task copying a request body into its h2 stream ([`send_body`]), stopped when dropped (its
/// `SendStream` with it, which resets the stream if it has not ended).
struct SendingBody {
    task: tokio::task::AbortHandle,
    /// Set by the copy when it hands the stream some of the body; taken by the response's
    /// [`Silence`] watch.
    sent: Arc<AtomicBool>,
}

impl Drop for SendingBody {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// A response body from the upstream sidecar: its DATA frames, then its trailers. Each frame's
/// bytes are handed back to the stream's flow-control window as they are passed on to the app.
/// Ended when nothing moves either way for the idle timeout ([`Silence`]). Dropped (passed on
/// whole, given up by the app, or ended), it stops the copy of the request body.
pub struct UpstreamBody {
    recv: RecvStream,
    data_done: bool,
    silence: Silence,
    sending: Option<SendingBody>,
    /// Its stream counted in use on its connection.
    _stream: InStream,
}

impl HttpBody for UpstreamBody {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let this = &mut *self;
        let polled = this.poll_upstream(cx);
        if polled.is_ready() {
            this.silence.moved();
            return polled;
        }
        let sending = &this.sending;
        this.silence
            .poll_ended(cx, || {
                sending
                    .as_ref()
                    .is_some_and(|s| s.sent.swap(false, Ordering::Relaxed))
            })
            .map(|error| Some(Err(error)))
    }

    fn is_end_stream(&self) -> bool {
        self.recv.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        if self.recv.is_end_stream() {
            SizeHint::with_exact(0)
        } else {
            SizeHint::default()
        }
    }
}

impl UpstreamBody {
    /// The next frame from the upstream.
    fn poll_upstream(
        &mut self,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        if !self.data_done {
            match ready!(self.recv.poll_data(cx)) {
                Some(Ok(data)) => {
                    let _ = self.recv.flow_control().release_capacity(data.len());
                    return Poll::Ready(Some(Ok(Frame::data(data))));
                }
                Some(Err(e)) => return Poll::Ready(Some(Err(e.into()))),
                None => self.data_done = true,
            }
        }
        Poll::Ready(match ready!(self.recv.poll_trailers(cx)) {
            Ok(Some(trailers)) => Some(Ok(Frame::trailers(trailers))),
            Ok(None) => None,
            Err(e) => Some(Err(e.into())),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// An h2 client over an in-memory pipe, its connection driven by a task, and the pipe's other
    /// end (no h2 server behind it unless the test runs one).
    async fn pinging_client() -> (PingPong, tokio::io::DuplexStream) {
        let (ours, theirs) = tokio::io::duplex(64 * 1024);
        let (send, mut conn) = h2::client::handshake(ours).await.unwrap();
        let pings = conn.ping_pong().unwrap();
        tokio::spawn(async move {
            let _open = send;
            let _ = conn.await;
        });
        (pings, theirs)
    }

    #[tokio::test(start_paused = true)]
    async fn a_peer_that_answers_is_pinged_until_it_stops_answering() {
        let (pings, theirs) = pinging_client().await;
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let server = tokio::spawn(async move {
            let mut conn = h2::server::handshake(theirs).await.unwrap();
            // Answers pings while it is polled, until told to stop.
            tokio::select! {
                () = async { while conn.accept().await.is_some() {} } => {}
                _ = stopped => {}
            }
            // Stuck: the pipe stays open, but nothing reads it any more.
            std::future::pending::<()>().await;
            drop(conn);
        });
        let every = Duration::from_secs(30);
        let ping = tokio::spawn(keep_alive(Some(pings), every));
        tokio::time::sleep(every * 5).await;
        assert!(!ping.is_finished(), "answered pings keep it going");
        stop.send(()).unwrap();
        assert_eq!(ping.await.unwrap(), PingsEnded::Unanswered);
        server.abort();
    }

    /// A request body without end, counting the bytes taken from it.
    struct Endless(Arc<AtomicUsize>);

    impl HttpBody for Endless {
        type Data = Bytes;
        type Error = std::convert::Infallible;

        fn poll_frame(
            self: Pin<&mut Self>,
            _cx: &mut Context<'_>,
        ) -> Poll<Option<Result<Frame<Bytes>, Self::Error>>> {
            static CHUNK: [u8; 16 * 1024] = [b'x'; 16 * 1024];
            self.0.fetch_add(CHUNK.len(), Ordering::SeqCst);
            Poll::Ready(Some(Ok(Frame::data(Bytes::from_static(&CHUNK)))))
        }
    }

    /// An upstream that advertises the largest windows h2 allows and then stops reading the socket
    /// has at most [`SEND_BUFFER`] of a request body buffered for it per stream (beside what the
    /// socket holds, a frame being written and the chunk in hand): the rest waits in the app's
    /// body. With 1 MiB (and h2's default, 400 KiB) it held that much of ours per stream.
    #[tokio::test]
    async fn an_upstream_that_stops_reading_holds_at_most_the_send_buffer_per_stream() {
        const PIPE: usize = 16 * 1024;
        const LARGEST_WINDOW: u32 = (1 << 31) - 1;
        let (ours, theirs) = tokio::io::duplex(PIPE);
        let (stopped, read) = tokio::sync::oneshot::channel::<usize>();
        let server = tokio::spawn(async move {
            let mut conn = h2::server::Builder::new()
                .initial_window_size(LARGEST_WINDOW)
                .initial_connection_window_size(LARGEST_WINDOW)
                .handshake::<_, Bytes>(theirs)
                .await
                .unwrap();
            let (req, _respond) = conn.accept().await.unwrap().unwrap();
            let mut body = req.into_body();
            let mut got = 0;
            // Read well past h2's default windows, the connection driven meanwhile; then nothing.
            while got < 256 * 1024 {
                tokio::select! {
                    data = body.data() => got += data.unwrap().unwrap().len(),
                    _ = conn.accept() => panic!("the connection ended"),
                }
            }
            stopped.send(got).unwrap();
            std::future::pending::<()>().await;
            drop((conn, body));
        });
        let (send, conn) = client_builder(16 * 1024)
            .handshake::<_, Bytes>(ours)
            .await
            .unwrap();
        tokio::spawn(async move {
            let _ = conn.await;
        });
        let mut send = send.ready().await.unwrap();
        let req = Request::post("http://upstream/").body(()).unwrap();
        let (_response, out) = send.send_request(req, false).unwrap();
        let taken = Arc::new(AtomicUsize::new(0));
        let copy = tokio::spawn(send_body(Endless(taken.clone()), out, Default::default()));
        let read = tokio::time::timeout(Duration::from_secs(10), read)
            .await
            .expect("the upstream read a quarter MiB")
            .unwrap();
        // Until the copy has stopped taking the body.
        let mut last = 0;
        loop {
            tokio::time::sleep(Duration::from_millis(100)).await;
            let now = taken.load(Ordering::SeqCst);
            if now == last {
                break;
            }
            last = now;
        }
        // 64 KiB buffered, and no more than a few frames besides.
        let ahead = last - read;
        assert!(
            (64 * 1024..=64 * 1024 + 8 * PIPE).contains(&ahead),
            "{ahead} bytes taken beyond what the upstream read"
        );
        copy.abort();
        server.abort();
    }

    #[tokio::test(start_paused = true)]
    async fn a_connection_that_ended_stops_the_pings_as_gone() {
        let (pings, theirs) = pinging_client().await;
        // The peer closes the pipe: the client connection ends, and a ping cannot be sent.
        drop(theirs);
        let ended = keep_alive(Some(pings), Duration::from_secs(30)).await;
        assert_eq!(ended, PingsEnded::Gone);
    }
}
