//! The webhook's HTTPS server: `POST /inject` (namespace not opted in) and `POST /inject-namespace`
//! (namespace labelled `meshid.io/inject=enabled`) answer AdmissionReviews (pod CREATE: inject;
//! pod UPDATE: validate the meshid annotations); `GET /healthz` answers probes. Its serving
//! certificate (from `meshid-ca webhook-cert`, see [`super::serving`]) chains to our CA's roots, so
//! the webhook configuration's `caBundle` is the mesh trust bundle.
//!
//! The API server waits on this server for every pod it sends (with `failurePolicy: Fail`, a pod is
//! not created while the injector cannot answer), so no client may hold it up ([`Limits`]):
//! connections past the per-source cap are closed at accept, and at the overall cap a newcomer
//! displaces the oldest connection that has not had a well-formed AdmissionReview answered yet
//! (health checks, 404s and refused bodies do not count), or is closed when every one has
//! ([`meshid_runtime::admission`]; counted in `meshid_injector_connections_refused_total`); the TLS handshake and each HTTP/1 request head
//! must arrive within the header-read timeout (an idle keep-alive connection is closed after it
//! too); a request's body must arrive within the request timeout; a body over the size cap is
//! answered 413 without reading more of it (at once when its `Content-Length` says so); the body is
//! parsed into the typed AdmissionReview envelope (see [`super::admission`]) whose nesting serde_json
//! bounds; HTTP/2 connections (the API server's choice when ALPN offers it) get a stream and a
//! header-list cap, 64 KiB flow-control windows and keep-alive pings; and every connection is told
//! to go away (HTTP/2 GOAWAY, or closed after its current HTTP/1 request) at its maximum age.
//!
//! Memory: the reviews in flight share a byte budget ([`super::budget`]): a body is charged before
//! it is read (within its source's share of the body budget), its review what its JSON can cost
//! once parsed and answered ([`super::cost`]), and
//! the answer keeps its share until it is sent ([`super::reply`]). A request that waits longer
//! than `--review-wait` for room is answered 503, one that could never fit 413; so many large
//! bodies at once make the injector answer some of them later or not at all, never run out of
//! memory. On shutdown ([`serve`]'s `shutdown`) it stops accepting and answers what is in flight.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use arc_swap::ArcSwap;
use bytes::Bytes;
use http::{HeaderValue, Method, Request, Response, StatusCode, header};
use http_body_util::BodyExt;
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use meshid_runtime::admission::{Admission, Displaceable};
use meshid_runtime::log_limit::LogLimit;
use rustls::ServerConfig;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{mpsc, watch};
use tokio::time::Instant;
use tokio_rustls::TlsAcceptor;

use super::budget::{NoRoom, ReviewBudget};
use super::cost;
use super::metrics::InjectorMetrics;
use super::proof::{Proof, ProvenSources};
use super::reply::Reply;
use super::{InjectConfig, Scope, admission};

/// Default largest request body: 1 MiB. A pod's AdmissionReview is a few KiB to a few tens of KiB
/// (an UPDATE carries the pod twice); the API server's own limits (annotations 256 KiB, an object
/// ~1.5 MiB in etcd) make a larger one possible only for absurd pods, for which `--max-request-bytes`
/// can be raised.
pub const DEFAULT_MAX_REQUEST_BYTES: usize = 1024 * 1024;
/// The most an operator may raise `--max-request-bytes` to (the API server's request limit).
pub const MAX_REQUEST_BYTES_LIMIT: usize = 3 * 1024 * 1024;
/// HTTP/1 read buffer (and so the largest request head).
const MAX_HEAD_BYTES: usize = 64 * 1024;
const MAX_HEADERS: usize = 64;
/// A review charged more than this gives its freed pages back to the kernel once answered.
const TRIM_AFTER: u64 = 4 * 1024 * 1024;
/// HTTP/2: concurrent streams per connection, and the largest header list.
const H2_MAX_CONCURRENT_STREAMS: u32 = 64;
const H2_MAX_HEADER_LIST_BYTES: u32 = 64 * 1024;
/// HTTP/2 flow-control windows: a client may send this much of a stream's body, and of all its
/// streams' bodies together, before the injector reads it. Bodies wait unread for room in the
/// review budget, so each connection buffers at most this much (hyper's default is 1 MiB).
const H2_STREAM_WINDOW: u32 = 64 * 1024;
const H2_CONNECTION_WINDOW: u32 = 64 * 1024;
const H2_KEEP_ALIVE_INTERVAL: Duration = Duration::from_secs(30);
const H2_KEEP_ALIVE_TIMEOUT: Duration = Duration::from_secs(10);

/// The server's limits (flags of `meshid-injector`, see [`super::startup::InjectorArgs`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    /// Connections open at once (handshaking or established); past it a connection with no
    /// request yet is displaced, or the newcomer is closed at accept when every one has sent one.
    pub max_connections: usize,
    /// Connections open at once from one source IP; the one past it is closed at accept.
    pub max_connections_per_source: usize,
    /// The TLS handshake, and each HTTP/1 request head (or the wait for the next one on a
    /// keep-alive connection), must complete within this.
    pub header_read_timeout: Duration,
    /// A request's body must have arrived within this (answered 408 otherwise).
    pub request_timeout: Duration,
    /// Largest request body (answered 413 above it).
    pub max_request_bytes: usize,
    /// A connection this old is told to go away; its requests in flight get `request_timeout` more.
    pub max_connection_age: Duration,
    /// Memory reviews in flight may use, bodies and answers included ([`ReviewBudget`]).
    pub review_memory: usize,
    /// The longest a request waits for room in the review budget (then: 503).
    pub review_wait: Duration,
    /// At shutdown, how long reviews in flight get to finish.
    pub shutdown_grace: Duration,
    /// At shutdown, how long new reviews are still taken (not ready meanwhile) before the drain.
    pub shutdown_delay: Duration,
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            max_connections: 512,
            max_connections_per_source: 64,
            header_read_timeout: Duration::from_secs(10),
            request_timeout: Duration::from_secs(10),
            max_request_bytes: DEFAULT_MAX_REQUEST_BYTES,
            max_connection_age: Duration::from_secs(5 * 60),
            review_memory: super::budget::DEFAULT_REVIEW_MEMORY,
            review_wait: Duration::from_secs(3),
            shutdown_grace: Duration::from_secs(5),
            shutdown_delay: Duration::from_secs(5),
        }
    }
}

/// Serves the webhook on `listener` until `shutdown` completes; then stops accepting, tells every
/// connection to go away once its requests in flight are answered (HTTP/2 GOAWAY; HTTP/1: closed
/// after its current request) and returns when they are all closed, or after
/// [`Limits::shutdown_grace`]. Each review uses the configuration current when it arrives (the
/// trust bundle in it is reloaded while running).
pub async fn serve(
    listener: TcpListener,
    tls: Arc<ServerConfig>,
    config: Arc<ArcSwap<InjectConfig>>,
    metrics: Arc<InjectorMetrics>,
    limits: Limits,
    shutdown: impl Future<Output = ()>,
) {
    let acceptor = TlsAcceptor::from(tls);
    let admission = Admission::new(
        limits.max_connections,
        Some(limits.max_connections_per_source),
    );
    let budget = ReviewBudget::new(limits.review_memory, limits.max_request_bytes);
    let proven = ProvenSources::default();
    // Every connection task holds a sender: when they are all gone, `open.recv()` returns None.
    let (open_tx, mut open) = mpsc::channel::<()>(1);
    let (stop_tx, stop) = watch::channel(false);
    tokio::pin!(shutdown);
    loop {
        let (tcp, peer) = tokio::select! {
            accepted = meshid_runtime::net::accept_retrying(&listener, "webhook") => accepted,
            () = &mut shutdown => break,
        };
        let admitted = match admission.admit(peer.ip()) {
            Ok(admitted) => admitted,
            Err(why) => {
                // Counted, and logged at debug only: a flood would otherwise flood the log.
                metrics.connection_refused(why.reason());
                tracing::debug!(%peer, reason = why.reason(), "connection limit reached; refusing");
                continue;
            }
        };
        let displaced = admitted.displaced_another;
        if displaced {
            metrics.connection_refused("displaced");
        }
        let shared = Shared {
            config: config.clone(),
            metrics: metrics.clone(),
            budget: budget.clone(),
            limits,
        };
        let acceptor = acceptor.clone();
        let (open_tx, stop, proven) = (open_tx.clone(), stop.clone(), proven.clone());
        tokio::spawn(async move {
            let _open =
                meshid_runtime::exposition::GaugeHeld::new(&shared.metrics.connections_open);
            let _ = tcp.set_nodelay(true);
            let tcp = Displaceable::new(tcp, admitted.displacement);
            let proof = Arc::new(Proof::new(admitted.ticket, peer.ip(), proven));
            connection(tcp, peer, acceptor, shared, proof, stop).await;
            drop(open_tx);
        });
        if displaced {
            // At the cap under a flood: let the connections just admitted (a real client's among them)
            // move their handshakes on before the next arrival displaces the oldest of them.
            tokio::task::yield_now().await;
        }
    }
    drop(listener);
    drop(open_tx);
    let _ = stop_tx.send(true);
    let drained = tokio::time::timeout(limits.shutdown_grace, open.recv())
        .await
        .is_ok();
    if drained {
        tracing::info!("webhook connections drained");
    } else {
        tracing::warn!(
            grace = ?limits.shutdown_grace,
            "webhook connections still open after the shutdown grace; closing them"
        );
    }
}

/// What every request of every connection shares.
#[derive(Clone)]
struct Shared {
    config: Arc<ArcSwap<InjectConfig>>,
    metrics: Arc<InjectorMetrics>,
    budget: ReviewBudget,
    limits: Limits,
}

/// Drives a connection to its end: handshake, then HTTP/2 or HTTP/1.1 as ALPN chose. At its
/// maximum age, or when `stop` turns true (shutdown), it is told to go away: its requests in
/// flight are answered (within `request_timeout` after its age; within the shutdown grace, which
/// [`serve`] enforces, at shutdown).
async fn connection(
    tcp: Displaceable<TcpStream>,
    peer: SocketAddr,
    acceptor: TlsAcceptor,
    shared: Shared,
    proof: Arc<Proof>,
    mut stop: watch::Receiver<bool>,
) {
    let limits = shared.limits;
    let tls = match tokio::time::timeout(limits.header_read_timeout, acceptor.accept(tcp)).await {
        Ok(Ok(tls)) => tls,
        Ok(Err(error)) => {
            tracing::debug!(%error, %peer, "tls handshake failed");
            return;
        }
        Err(_) => {
            tracing::debug!(%peer, "tls handshake timed out");
            return;
        }
    };
    let h2 = tls.get_ref().1.alpn_protocol() == Some(b"h2");
    let service = service_fn(move |req| handle(req, shared.clone(), peer, proof.clone()));
    let io = TokioIo::new(tls);
    // Resolves once the connection should go away, and then stays pending.
    let go_away = async {
        tokio::select! {
            () = tokio::time::sleep(limits.max_connection_age) => Some(limits.request_timeout),
            // At shutdown: `serve` bounds the wait.
            _ = stop.wait_for(|stop| *stop) => None,
        }
    };
    macro_rules! drive {
        ($conn:expr) => {{
            let conn = $conn;
            tokio::pin!(conn);
            tokio::select! {
                result = conn.as_mut() => result,
                finish_within = go_away => {
                    conn.as_mut().graceful_shutdown();
                    match finish_within {
                        Some(within) => tokio::time::timeout(within, conn.as_mut())
                            .await
                            .unwrap_or(Ok(())),
                        None => conn.as_mut().await,
                    }
                }
            }
        }};
    }
    let result = if h2 {
        let mut builder = hyper::server::conn::http2::Builder::new(TokioExecutor::new());
        builder
            .timer(TokioTimer::new())
            .max_concurrent_streams(H2_MAX_CONCURRENT_STREAMS)
            .max_header_list_size(H2_MAX_HEADER_LIST_BYTES)
            .initial_stream_window_size(H2_STREAM_WINDOW)
            .initial_connection_window_size(H2_CONNECTION_WINDOW)
            .keep_alive_interval(H2_KEEP_ALIVE_INTERVAL)
            .keep_alive_timeout(H2_KEEP_ALIVE_TIMEOUT);
        drive!(builder.serve_connection(io, service))
    } else {
        let mut builder = hyper::server::conn::http1::Builder::new();
        builder
            .timer(TokioTimer::new())
            .header_read_timeout(limits.header_read_timeout)
            .max_buf_size(MAX_HEAD_BYTES)
            .max_headers(MAX_HEADERS);
        drive!(builder.serve_connection(io, service))
    };
    if let Err(error) = result {
        tracing::debug!(%error, %peer, "connection ended with an error");
    }
}

/// Answers one request. Only a well-formed AdmissionReview posted to a webhook path and answered
/// proves the connection ([`Proof::prove`]: never displaced at the connection limit from then on,
/// up to [`super::proof::MAX_PROVEN_PER_SOURCE`] connections per address): a health check, a 404
/// or a refused body does not, so a client that holds connections open with cheap requests is
/// displaced like a silent one.
async fn handle(
    req: Request<Incoming>,
    shared: Shared,
    peer: SocketAddr,
    proof: Arc<Proof>,
) -> Result<Response<Reply>, Infallible> {
    let Shared {
        config,
        metrics,
        budget,
        limits,
    } = shared;
    let scope = match (req.method(), req.uri().path()) {
        (&Method::GET, "/healthz") => return Ok(text(StatusCode::OK, "ok\n".into())),
        (&Method::POST, "/inject") => Scope::Pod,
        (&Method::POST, "/inject-namespace") => Scope::Namespace,
        _ => return Ok(text(StatusCode::NOT_FOUND, "not found\n".into())),
    };
    // HTTP/1: a refused body is never read to its end, so the connection cannot carry another
    // request (HTTP/2 resets just the stream).
    let http1 = req.version() < http::Version::HTTP_2;
    let close = |mut r: Response<Reply>| {
        if http1 {
            r.headers_mut()
                .insert(header::CONNECTION, HeaderValue::from_static("close"));
        }
        r
    };
    let refuse = |reason: &'static str, status: StatusCode, message: String| {
        metrics.request_refused(reason);
        tracing::debug!(%peer, reason, "{}", message.trim_end());
        close(text(status, message))
    };
    let too_large = || {
        refuse(
            "too_large",
            StatusCode::PAYLOAD_TOO_LARGE,
            format!(
                "request body over the {}-byte limit (an AdmissionReview for a pod is far smaller)\n",
                limits.max_request_bytes
            ),
        )
    };
    let busy = || {
        refuse(
            "busy",
            StatusCode::SERVICE_UNAVAILABLE,
            format!(
                "the injector is busy: other reviews held its review memory ({} bytes, \
                 --review-memory) for {:?}; try again\n",
                limits.review_memory, limits.review_wait
            ),
        )
    };
    let source_busy = |share: u64| {
        refuse(
            "source_busy",
            StatusCode::SERVICE_UNAVAILABLE,
            format!(
                "the injector is busy: bodies still arriving from {} held its share of the body \
                 memory ({share} bytes) for {:?}; try again\n",
                peer.ip().to_canonical(),
                limits.review_wait
            ),
        )
    };
    let declared = req
        .headers()
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    if declared.is_some_and(|n| n > limits.max_request_bytes as u64) {
        return Ok(too_large());
    }
    // Room for the body before a byte of it is read: its declared length, or the cap; within the
    // source's share of the body budget.
    let waited_until = Instant::now() + limits.review_wait;
    let reserved = declared.unwrap_or(limits.max_request_bytes as u64);
    let mut body_room = match budget.body(peer.ip(), reserved, limits.review_wait).await {
        Ok(room) => room,
        Err(NoRoom::SourceBusy { share }) => return Ok(source_busy(share)),
        // Not past the size cap, so never more than a share: only busy.
        Err(NoRoom::Busy | NoRoom::TooCostly { .. }) => return Ok(busy()),
    };
    let body = match tokio::time::timeout(
        limits.request_timeout,
        read_body(req.into_body(), reserved as usize),
    )
    .await
    {
        Ok(Ok(body)) => body,
        Ok(Err(BodyError::TooLarge)) => return Ok(too_large()),
        Ok(Err(BodyError::Read(error))) => {
            return Ok(refuse(
                "invalid",
                StatusCode::BAD_REQUEST,
                format!("request body not read: {error}\n"),
            ));
        }
        Err(_) => {
            return Ok(refuse(
                "timeout",
                StatusCode::REQUEST_TIMEOUT,
                format!(
                    "request body not received within {:?}\n",
                    limits.request_timeout
                ),
            ));
        }
    };
    // A body shorter than reserved (no Content-Length) gives the rest back at once; one that has
    // arrived no longer counts against its source's share.
    body_room.shrink_to(body.len());
    body_room.arrived();
    let config = config.load_full();
    let cost = cost::review_cost(&body, config.trust_bundle.pem().len());
    let left = waited_until.saturating_duration_since(Instant::now());
    let review_room = match budget.review(cost, left).await {
        Ok(room) => room,
        Err(NoRoom::Busy | NoRoom::SourceBusy { .. }) => return Ok(busy()),
        Err(NoRoom::TooCostly { cost, budget }) => {
            return Ok(refuse(
                "too_costly",
                StatusCode::PAYLOAD_TOO_LARGE,
                format!(
                    "reviewing this body would take up to {cost} bytes of memory, more than the \
                     injector's review budget ({budget} bytes of --review-memory): no pod is \
                     that large\n"
                ),
            ));
        }
    };
    let parsed = admission::parse(&body);
    drop(body);
    drop(body_room);
    let input = match parsed {
        Ok(input) => input,
        Err(error) => {
            metrics.request_refused(error.label());
            tracing::debug!(%peer, %error, "not an AdmissionReview");
            return Ok(text(StatusCode::BAD_REQUEST, format!("{error}\n")));
        }
    };
    let output = super::answer(&config, scope, &input);
    if input.problem().is_none() {
        // A well-formed review, answered: the connection may be a real client's (the API
        // server's), or a pod's that wrote the review itself: proven within its address's share.
        proof.prove();
    }
    metrics.review(&output);
    let response = &output["response"];
    let request = input.request.as_ref();
    // Any pod that reaches the webhook's port can send reviews: a burst of lines, then a steady
    // rate (the next line written counts those left out; the metrics count every review), each
    // string cut short. The API server's own audit log has every admission.
    static REVIEWED: LogLimit = LogLimit::new(200.0, 50.0);
    if let Some(left_out) = REVIEWED.take() {
        let clip = |s: &str| meshid_runtime::log_limit::clip(s, 256).to_owned();
        let field = |s: Option<&String>| clip(s.map_or("", String::as_str));
        let message = response
            .pointer("/status/message")
            .and_then(serde_json::Value::as_str)
            .map(clip);
        tracing::info!(
            %peer,
            uid = %response["uid"],
            operation = field(request.and_then(|r| r.operation.as_ref())),
            namespace = field(request.and_then(|r| r.namespace.as_ref())),
            allowed = %response["allowed"],
            patched = response.get("patch").is_some(),
            message,
            left_out,
            "admission review"
        );
    }
    let answer = Bytes::from(output.to_string());
    drop(output);
    drop(input);
    if cost > TRIM_AFTER {
        // glibc keeps the pages of a large tree in the arena of the thread that freed it, where
        // the next large review (on another thread) cannot reuse them: hand them back.
        meshid_runtime::heap::release_free_pages();
    }
    // Until it is sent, the answer keeps the room its text takes (twice: the text and the pieces
    // in the connection's buffers), for `request_timeout` at most.
    let mut review_room = review_room;
    review_room.shrink_to(2 * answer.len());
    let mut out = Response::new(Reply::holding(answer, review_room, limits.request_timeout));
    out.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    Ok(out)
}

/// Why a body was not read.
enum BodyError {
    TooLarge,
    Read(hyper::Error),
}

/// Reads a body of at most `max` bytes into one buffer, allocated once: its length when given
/// (`Content-Length`), else `max` (what the budget was charged; pages never written are never
/// resident).
async fn read_body(mut body: Incoming, max: usize) -> Result<Vec<u8>, BodyError> {
    let hint = hyper::body::Body::size_hint(&body).exact();
    let capacity = hint.map_or(max, |n| usize::try_from(n).unwrap_or(max).min(max));
    let mut buf = Vec::with_capacity(capacity);
    while let Some(frame) = body.frame().await {
        let frame = frame.map_err(BodyError::Read)?;
        if let Ok(data) = frame.into_data() {
            if buf.len() + data.len() > max {
                return Err(BodyError::TooLarge);
            }
            buf.extend_from_slice(&data);
        }
    }
    Ok(buf)
}

fn text(status: StatusCode, body: String) -> Response<Reply> {
    let mut r = Response::new(Reply::plain(body));
    *r.status_mut() = status;
    r.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    r
}
