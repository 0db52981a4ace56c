//! The webhook's HTTPS server: `POST /inject` (namespace not opted in) and `POST /inject-namespace`
//! (namespace labelled `meshid.io/inject=enabled`) answer AdmissionReviews (pod CREATE: inject;
//! pod UPDATE: validate the meshid annotations); `GET /healthz` answers probes. Its serving
//! certificate (from `meshid-ca webhook-cert`, see [`super::serving`]) chains to our CA's roots, so
//! the webhook configuration's `caBundle` is the mesh trust bundle.
//!
//! The API server waits on this server for every pod it sends (with `failurePolicy: Fail`, a pod is
//! not created while the injector cannot answer), so no client may hold it up ([`Limits`]):
//! connections past the per-source cap are closed at accept, and at the overall cap a newcomer
//! displaces the oldest connection that has sent no request yet, or is closed when every one has
//! ([`meshid_runtime::admission`]; counted in `meshid_injector_connections_refused_total`); the TLS handshake and each HTTP/1 request head
//! must arrive within the header-read timeout (an idle keep-alive connection is closed after it
//! too); a request's body must arrive within the request timeout; a body over the size cap is
//! answered 413 without reading more of it (at once when its `Content-Length` says so); the body is
//! parsed into the typed AdmissionReview envelope (see [`super::admission`]) whose nesting serde_json
//! bounds; HTTP/2 connections (the API server's choice when ALPN offers it) get a stream and a
//! header-list cap and keep-alive pings; and every connection is told to go away (HTTP/2 GOAWAY, or
//! closed after its current HTTP/1 request) at its maximum age.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use arc_swap::ArcSwap;
use bytes::Bytes;
use http::{HeaderValue, Method, Request, Response, StatusCode, header};
use http_body_util::{BodyExt, Full, LengthLimitError, Limited};
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use meshid_runtime::admission::{Admission, Displaceable, Ticket};
use rustls::ServerConfig;
use tokio::net::{TcpListener, TcpStream};
use tokio_rustls::TlsAcceptor;

use super::metrics::InjectorMetrics;
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
/// HTTP/2: concurrent streams per connection, and the largest header list.
const H2_MAX_CONCURRENT_STREAMS: u32 = 64;
const H2_MAX_HEADER_LIST_BYTES: u32 = 64 * 1024;
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
        }
    }
}

/// Serves the webhook on `listener` until the process ends. Each review uses the configuration
/// current when it arrives (the trust bundle in it is reloaded while running).
pub async fn serve(
    listener: TcpListener,
    tls: Arc<ServerConfig>,
    config: Arc<ArcSwap<InjectConfig>>,
    metrics: Arc<InjectorMetrics>,
    limits: Limits,
) {
    let acceptor = TlsAcceptor::from(tls);
    let admission = Admission::new(
        limits.max_connections,
        Some(limits.max_connections_per_source),
    );
    loop {
        let (tcp, peer) = meshid_runtime::net::accept_retrying(&listener, "webhook").await;
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
        let acceptor = acceptor.clone();
        let config = config.clone();
        let metrics = metrics.clone();
        tokio::spawn(async move {
            metrics.connections_open.inc();
            let _ = tcp.set_nodelay(true);
            let tcp = Displaceable::new(tcp, admitted.displacement);
            let ticket = Arc::new(admitted.ticket);
            connection(tcp, peer, acceptor, config, metrics.clone(), limits, ticket).await;
            metrics.connections_open.dec();
        });
        if displaced {
            // At the cap under a flood: let the connections just admitted (a real client's among them)
            // move their handshakes on before the next arrival displaces the oldest of them.
            tokio::task::yield_now().await;
        }
    }
}

/// Drives a connection to its end: handshake, then HTTP/2 or HTTP/1.1 as ALPN chose.
async fn connection(
    tcp: Displaceable<TcpStream>,
    peer: SocketAddr,
    acceptor: TlsAcceptor,
    config: Arc<ArcSwap<InjectConfig>>,
    metrics: Arc<InjectorMetrics>,
    limits: Limits,
    ticket: Arc<Ticket>,
) {
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
    let service = service_fn(move |req| {
        // A request arrived: the connection is no longer displaced at the connection limit.
        ticket.proven();
        handle(req, config.clone(), metrics.clone(), peer, limits)
    });
    let io = TokioIo::new(tls);
    let result = if h2 {
        let mut builder = hyper::server::conn::http2::Builder::new(TokioExecutor::new());
        builder
            .timer(TokioTimer::new())
            .max_concurrent_streams(H2_MAX_CONCURRENT_STREAMS)
            .max_header_list_size(H2_MAX_HEADER_LIST_BYTES)
            .keep_alive_interval(H2_KEEP_ALIVE_INTERVAL)
            .keep_alive_timeout(H2_KEEP_ALIVE_TIMEOUT);
        let conn = builder.serve_connection(io, service);
        tokio::pin!(conn);
        tokio::select! {
            result = conn.as_mut() => result,
            () = tokio::time::sleep(limits.max_connection_age) => {
                conn.as_mut().graceful_shutdown();
                tokio::time::timeout(limits.request_timeout, conn.as_mut())
                    .await
                    .unwrap_or(Ok(()))
            }
        }
    } else {
        let mut builder = hyper::server::conn::http1::Builder::new();
        builder
            .timer(TokioTimer::new())
            .header_read_timeout(limits.header_read_timeout)
            .max_buf_size(MAX_HEAD_BYTES)
            .max_headers(MAX_HEADERS);
        let conn = builder.serve_connection(io, service);
        tokio::pin!(conn);
        tokio::select! {
            result = conn.as_mut() => result,
            () = tokio::time::sleep(limits.max_connection_age) => {
                conn.as_mut().graceful_shutdown();
                tokio::time::timeout(limits.request_timeout, conn.as_mut())
                    .await
                    .unwrap_or(Ok(()))
            }
        }
    };
    if let Err(error) = result {
        tracing::debug!(%error, %peer, "connection ended with an error");
    }
}

async fn handle(
    req: Request<Incoming>,
    config: Arc<ArcSwap<InjectConfig>>,
    metrics: Arc<InjectorMetrics>,
    peer: SocketAddr,
    limits: Limits,
) -> Result<Response<Full<Bytes>>, Infallible> {
    let scope = match (req.method(), req.uri().path()) {
        (&Method::GET, "/healthz") => return Ok(text(StatusCode::OK, "ok\n".into())),
        (&Method::POST, "/inject") => Scope::Pod,
        (&Method::POST, "/inject-namespace") => Scope::Namespace,
        _ => return Ok(text(StatusCode::NOT_FOUND, "not found\n".into())),
    };
    // HTTP/1: a refused body is never read to its end, so the connection cannot carry another
    // request (HTTP/2 resets just the stream).
    let http1 = req.version() < http::Version::HTTP_2;
    let close = |mut r: Response<Full<Bytes>>| {
        if http1 {
            r.headers_mut()
                .insert(header::CONNECTION, HeaderValue::from_static("close"));
        }
        r
    };
    let too_large = || {
        close(text(
            StatusCode::PAYLOAD_TOO_LARGE,
            format!(
                "request body over the {}-byte limit (an AdmissionReview for a pod is far smaller)\n",
                limits.max_request_bytes
            ),
        ))
    };
    let declared = req
        .headers()
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    if declared.is_some_and(|n| n > limits.max_request_bytes as u64) {
        metrics.request_refused("too_large");
        tracing::debug!(%peer, ?declared, "request body over the limit (Content-Length)");
        return Ok(too_large());
    }
    let read = Limited::new(req.into_body(), limits.max_request_bytes).collect();
    let body = match tokio::time::timeout(limits.request_timeout, read).await {
        Ok(Ok(body)) => body.to_bytes(),
        Ok(Err(error)) if error.is::<LengthLimitError>() => {
            metrics.request_refused("too_large");
            tracing::debug!(%peer, "request body over the limit");
            return Ok(too_large());
        }
        Ok(Err(error)) => {
            metrics.request_refused("invalid");
            tracing::debug!(%peer, %error, "request body not read");
            return Ok(close(text(
                StatusCode::BAD_REQUEST,
                format!("request body not read: {error}\n"),
            )));
        }
        Err(_) => {
            metrics.request_refused("timeout");
            tracing::debug!(%peer, "request body not received in time");
            return Ok(close(text(
                StatusCode::REQUEST_TIMEOUT,
                format!(
                    "request body not received within {:?}\n",
                    limits.request_timeout
                ),
            )));
        }
    };
    let input = match admission::parse(&body) {
        Ok(input) => input,
        Err(error) => {
            metrics.request_refused(error.label());
            tracing::debug!(%peer, %error, "not an AdmissionReview");
            return Ok(text(StatusCode::BAD_REQUEST, format!("{error}\n")));
        }
    };
    let output = super::answer(&config.load(), scope, &input);
    metrics.review(&output);
    let response = &output["response"];
    let request = input.request.as_ref();
    tracing::info!(
        %peer,
        uid = %response["uid"],
        operation = request.and_then(|r| r.operation.as_deref()).unwrap_or_default(),
        namespace = request.and_then(|r| r.namespace.as_deref()).unwrap_or_default(),
        allowed = %response["allowed"],
        patched = response.get("patch").is_some(),
        message = %response.pointer("/status/message").unwrap_or(&serde_json::Value::Null),
        "admission review"
    );
    let mut out = Response::new(Full::new(Bytes::from(output.to_string())));
    out.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    Ok(out)
}

fn text(status: StatusCode, body: String) -> Response<Full<Bytes>> {
    let mut r = Response::new(Full::new(Bytes::from(body)));
    *r.status_mut() = status;
    r.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    r
}
