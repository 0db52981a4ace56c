//! HTTP plumbing both directions share: the server builder and graceful connection loop, hop-by-hop
//! header rules, upgrades, the sidecar's own short answers (`x-meshid-reason`), and error causes.
//! The methods a request asks the app to take it as (override headers, `_method` fields) are read
//! by [`crate::form`].
//! Inbound requests are served by [`crate::inbound::http`], outbound ones by
//! [`crate::outbound::http`].

use std::time::Duration;

use bytes::Bytes;
use http::header::{self, HeaderMap, HeaderName, HeaderValue};
use http::{Request, Response, StatusCode, Version};
use http_body_util::combinators::BoxBody;
use http_body_util::{BodyExt, Empty, Full};
use hyper::body::{Frame, Incoming};
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper_util::rt::{TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use prometheus_client::metrics::gauge::Gauge;
use tokio::io::{AsyncRead, AsyncWrite};

use crate::conn::Shared;
use crate::form::METHOD_OVERRIDES;
pub use crate::idle::{Call, ReqBody, RespBody, respond};
use crate::idle::{Opening, Tracked};

/// What a body's error is passed on as (hyper's, h2's on the outbound's upstream side).
pub type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// The body of every response we return.
pub type Body = BoxBody<Bytes, BoxError>;

/// Set on requests between sidecars when the originating app spoke h2 (the peer then speaks h2c to
/// its app). Stripped before any app sees it.
pub const APP_H2_HINT: &str = "x-meshid-app-h2";
/// [`APP_H2_HINT`] as a header name, made once: a name given as `&str` is parsed and checked at
/// every lookup, on every request.
pub static APP_H2_HINT_NAME: HeaderName = HeaderName::from_static(APP_H2_HINT);
/// The identity header: `By=<own id>;Hash=<peer cert sha256>;URI=<peer id>`.
pub const XFCC: &str = "x-forwarded-client-cert";
/// [`XFCC`] as a header name.
pub static XFCC_NAME: HeaderName = HeaderName::from_static(XFCC);

/// Request headers that tell the app who is calling and how, or what a trusted front proxy saw
/// before it rewrote the request (the host, port and prefix it was reached at, the URL before a
/// rewrite: frameworks such as Spring and IIS act on them as the request's own). Only the inbound
/// sidecar sets the first ones, and no peer is a front proxy of the app: every peer-sent header
/// whose name matches one of these, ignoring ASCII case and treating `_` and `.` as `-`, is removed
/// first (CGI, WSGI and PHP servers fold `X_Forwarded_Client_Cert` and `X-Forwarded-Client-Cert`
/// into one variable, and PHP behind nginx folds `X.Forwarded.Client.Cert` into it too, so any of
/// these spellings would reach the app as ours). The policy decides on the request line; a peer
/// must not have the app serve another path than the one it was allowed. The client-IP headers
/// that frameworks take as the caller's address (chi's `RealIP` prefers `True-Client-IP`, Rails
/// reads `Client-Ip`) go too, and `Proxy`, which CGI and FastCGI apps turn into `HTTP_PROXY` for
/// their own outgoing calls ("httpoxy"). So do the headers in which a TLS-terminating front proxy
/// passes the client's certificate or what it verified of it, which apps with certificate
/// forwarding turned on take as the caller's: Tomcat's `SSLValve` (`ssl_client_cert`), ASP.NET
/// Core's certificate forwarding (`X-Client-Cert`), Azure's `X-ARR-ClientCert`, Traefik's
/// `X-Forwarded-Tls-Client-Cert(-Info)`, AWS ALB's `X-Amzn-Mtls-Clientcert(-Leaf)`, and the
/// `X-SSL-Client-*` names common in nginx setups. And the CGI variables a WSGI server takes from
/// a trusted front proxy's headers (gunicorn's `forwarder_headers`, trusted from 127.0.0.1, where
/// the sidecar connects from): `SCRIPT_NAME` is cut off the front of the path the app routes (a
/// peer allowed `/public/*` sending `SCRIPT_NAME: /public` with `/public/admin` reached the app's
/// `/admin`), `PATH_INFO` replaces it, `REMOTE_USER` names the authenticated user; and
/// `X-Script-Name`, from which Flask's common "ReverseProxied" recipe sets `SCRIPT_NAME`.
pub const PEER_HEADERS: [&str; 35] = [
    XFCC,
    "x-forwarded-for",
    "forwarded",
    "x-real-ip",
    "x-forwarded-proto",
    "x-forwarded-host",
    "x-forwarded-port",
    "x-forwarded-prefix",
    "x-original-url",
    "x-rewrite-url",
    "true-client-ip",
    "client-ip",
    "x-client-ip",
    "x-cluster-client-ip",
    "cf-connecting-ip",
    "fastly-client-ip",
    "proxy",
    "x-client-cert",
    "ssl-client-cert",
    "ssl-client-verify",
    "x-ssl-cert",
    "x-ssl-client-cert",
    "x-ssl-client-verify",
    "x-ssl-client-dn",
    "x-ssl-client-s-dn",
    "x-arr-clientcert",
    "x-forwarded-tls-client-cert",
    "x-forwarded-tls-client-cert-info",
    "x-amzn-mtls-clientcert",
    "x-amzn-mtls-clientcert-leaf",
    "x-amzn-mtls-clientcert-serial-number",
    "script-name",
    "x-script-name",
    "path-info",
    "remote-user",
];

/// What a peer's request trailers may not carry to the app: its trailers reach the app as its
/// headers do (hyper's HTTP/1.1 client writes those that the request's `Trailer` header names; h2
/// passes them all), and frameworks read them or merge them into the headers.
pub(crate) fn strip_peer_trailers(trailers: &mut HeaderMap) {
    strip_hop_by_hop(trailers, false);
    trailers.remove(&APP_H2_HINT_NAME);
    strip_peer_headers(trailers);
    // Overrides are decided from the headers only: in trailers they are never let through.
    remove_spellings(trailers, &METHOD_OVERRIDES);
}

/// Whether `name` (a lowercase header name) spells one of `targets` with `_`, `.`, ` ` or `[` for
/// `-`: CGI, WSGI and PHP servers turn `-` into `_`, and PHP turns `.`, ` ` and a first `[` of a
/// variable name into `_` as well (nginx passes `X.Forwarded.Client.Cert` to PHP-FPM as
/// `HTTP_X.FORWARDED.CLIENT.CERT`, which PHP stores as `HTTP_X_FORWARDED_CLIENT_CERT`). A header
/// name cannot hold ` ` or `[`; `.` it can.
pub(crate) fn names_one_of(name: &str, targets: &[&str]) -> bool {
    targets.iter().any(|t| {
        t.len() == name.len()
            && t.bytes()
                .zip(name.bytes())
                .all(|(t, n)| t == n || (t == b'-' && matches!(n, b'_' | b'.' | b' ' | b'[')))
    })
}

/// Removes every peer-sent spelling of [`PEER_HEADERS`].
pub(crate) fn strip_peer_headers(headers: &mut HeaderMap) {
    remove_spellings(headers, &PEER_HEADERS);
}

/// Removes every spelling of `targets` (see [`names_one_of`]).
fn remove_spellings(headers: &mut HeaderMap, targets: &[&str]) {
    // Checked first without allocating: most messages carry none.
    if !headers.keys().any(|n| names_one_of(n.as_str(), targets)) {
        return;
    }
    let doomed: Vec<HeaderName> = headers
        .keys()
        .filter(|n| names_one_of(n.as_str(), targets))
        .cloned()
        .collect();
    for name in doomed {
        headers.remove(name);
    }
}

/// Hop-by-hop and framing names with a `-`, whose `_` spellings ([`names_one_of`]) are dropped
/// wherever the hop-by-hop headers are: hyper and h2 frame a message by `Content-Length` and
/// `Transfer-Encoding` alone and pass `Transfer_Encoding` on as any other header, but servers of
/// the Mongrel family (Thin, Unicorn, Puma before 6.4.3) fold `-` into `_` and would read it as
/// the framing of a body we framed otherwise: a request smuggled behind the one the policy saw.
/// `Content_Type` too: they take it as `CONTENT_TYPE`, the type a `_method` form is read by, where
/// the sidecar reads the body by `Content-Type` alone. (Only `_`: those servers fold nothing else,
/// and PHP, which folds `.` too, takes `CONTENT_TYPE` from the real header alone.)
const FOLDED_FRAMING: [&str; 6] = [
    "content-length",
    "transfer-encoding",
    "content-type",
    "keep-alive",
    "proxy-connection",
    "proxy-authorization",
];

/// Whether `name` spells one of [`FOLDED_FRAMING`] with a `_`.
fn is_folded_framing(name: &HeaderName) -> bool {
    let name = name.as_str();
    name.contains('_') && names_one_of(name, &FOLDED_FRAMING)
}

/// Names, not strings: removing by `&str` parses the name at every call, eight times a request.
static HOP_BY_HOP: [HeaderName; 8] = [
    header::CONNECTION,
    HeaderName::from_static("keep-alive"),
    HeaderName::from_static("proxy-connection"),
    header::PROXY_AUTHENTICATE,
    header::PROXY_AUTHORIZATION,
    header::TE,
    header::TRANSFER_ENCODING,
    header::UPGRADE,
];

/// A short plain-text answer generated by the sidecar.
pub fn reply(status: StatusCode, reason: String) -> Response<Body> {
    let mut resp = Response::new(
        Full::new(Bytes::from(format!("meshid: {reason}\n")))
            .map_err(|never| match never {})
            .boxed(),
    );
    *resp.status_mut() = status;
    resp.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    if let Ok(v) = HeaderValue::from_str(&reason) {
        resp.headers_mut().insert("x-meshid-reason", v);
    }
    resp
}

/// Whether `name` is one of [`HOP_BY_HOP`]: one comparison by length and bytes, where
/// `HOP_BY_HOP.contains` compares with each of the eight in turn.
fn is_hop_by_hop(name: &HeaderName) -> bool {
    matches!(
        name.as_str(),
        "connection"
            | "keep-alive"
            | "proxy-connection"
            | "proxy-authenticate"
            | "proxy-authorization"
            | "te"
            | "transfer-encoding"
            | "upgrade"
    )
}

pub(crate) fn strip_hop_by_hop(headers: &mut HeaderMap, keep_upgrade: bool) {
    // Most requests and responses carry none of them: one pass over the names they do carry
    // says so, where removing each name would hash it and probe the map eight times.
    if !headers
        .keys()
        .any(|n| is_hop_by_hop(n) || is_folded_framing(n))
    {
        return;
    }
    if headers.keys().any(is_folded_framing) {
        let folded: Vec<HeaderName> = headers
            .keys()
            .filter(|n| is_folded_framing(n))
            .cloned()
            .collect();
        for name in folded {
            headers.remove(name);
        }
    }
    // Headers named by `Connection` are hop-by-hop too.
    let named: Vec<HeaderName> = headers
        .get_all(header::CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .filter_map(|n| HeaderName::from_bytes(n.trim().as_bytes()).ok())
        .collect();
    for name in named {
        if !(keep_upgrade && name == header::UPGRADE) {
            headers.remove(name);
        }
    }
    let te_trailers = headers
        .get(header::TE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| {
            v.split(',')
                .any(|t| t.trim().eq_ignore_ascii_case("trailers"))
        });
    for h in &HOP_BY_HOP {
        if keep_upgrade && (*h == header::UPGRADE || *h == header::CONNECTION) {
            continue;
        }
        headers.remove(h);
    }
    if te_trailers {
        headers.insert(header::TE, HeaderValue::from_static("trailers"));
    }
    // An upgrade keeps `Connection`, but only to say so: any other name it lists (another
    // header, ours among them) would have a proxy in front of the app drop that header.
    if keep_upgrade && headers.contains_key(header::CONNECTION) {
        headers.insert(header::CONNECTION, HeaderValue::from_static("upgrade"));
    }
}

/// [`strip_sidecar_headers`] for a response body's frame: an app's trailers are read as its
/// headers are (a gRPC client sees `grpc-status` and its neighbours there), and no sidecar puts its
/// words in trailers.
pub(crate) fn strip_sidecar_trailers<D>(frame: Frame<D>) -> Frame<D> {
    match frame.into_trailers() {
        Ok(mut trailers) => {
            strip_sidecar_headers(&mut trailers);
            Frame::trailers(trailers)
        }
        Err(frame) => frame,
    }
}

/// Drops every `x-meshid-*` header from an app's response (its trailers:
/// [`strip_sidecar_trailers`]). Those are the sidecars' own words (why a request was refused, the
/// decision's ID): a caller that reads one must be able to trust that a sidecar wrote it, not an
/// app imitating a denial.
pub(crate) fn strip_sidecar_headers(headers: &mut http::HeaderMap) {
    const PREFIX: &str = "x-meshid-";
    let ours = |name: &HeaderName| name.as_str().starts_with(PREFIX);
    // Nearly every response has none: look before collecting.
    if headers.keys().any(ours) {
        let names: Vec<HeaderName> = headers.keys().filter(|n| ours(n)).cloned().collect();
        for name in names {
            headers.remove(name);
        }
    }
}

/// Joins a request's `cookie` fields into one, separated by `; `, as an h2 request must be before
/// it goes on as HTTP/1.1 (RFC 9113, 8.2.3): h2 clients send each cookie in a field of its own,
/// and an HTTP/1.1 server expects one `Cookie` line (RFC 6265, 5.4: many read only the first).
/// Allocates only for a request with several.
pub(crate) fn join_cookies(headers: &mut HeaderMap) {
    let mut cookies = headers.get_all(header::COOKIE).iter();
    if cookies.next().is_none() || cookies.next().is_none() {
        return;
    }
    let mut joined = Vec::new();
    for value in headers.get_all(header::COOKIE) {
        if !joined.is_empty() {
            joined.extend_from_slice(b"; ");
        }
        joined.extend_from_slice(value.as_bytes());
    }
    // Each part is a valid value, and `; ` joins them into one.
    if let Ok(value) = HeaderValue::from_bytes(&joined) {
        headers.insert(header::COOKIE, value);
    }
}

/// Whether a request carries more than one `Host` line. A server answers such a request 400
/// (RFC 9112, section 3.2): the hops after us and the app may each read a different one.
pub(crate) fn has_several_hosts(headers: &http::HeaderMap) -> bool {
    let mut hosts = headers.get_all(header::HOST).iter();
    hosts.next().is_some() && hosts.next().is_some()
}

pub(crate) fn is_upgrade<B>(req: &Request<B>) -> bool {
    req.version() == Version::HTTP_11
        && req.headers().contains_key(header::UPGRADE)
        && req
            .headers()
            .get_all(header::CONNECTION)
            .iter()
            .filter_map(|v| v.to_str().ok())
            .any(|v| {
                v.split(',')
                    .any(|t| t.trim().eq_ignore_ascii_case("upgrade"))
            })
}

/// Whether an upgrade request asks for WebSocket, the one upgrade the inbound side passes on (any
/// other `Upgrade` is dropped as a hop-by-hop header and the request served as a plain one).
pub(crate) fn upgrades_to_websocket(headers: &HeaderMap) -> bool {
    let mut tokens = headers
        .get_all(header::UPGRADE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .map(str::trim)
        .filter(|t| !t.is_empty());
    // Exactly one protocol, and it is WebSocket (a list would let the app pick another).
    matches!((tokens.next(), tokens.next()), (Some(t), None) if t.eq_ignore_ascii_case("websocket"))
}

/// What an upgraded connection keeps from the connection it came on, so that a tunnel is bounded
/// like any other connection.
pub(crate) struct Tunnel {
    /// The client side of the upgrade.
    pub client: hyper::upgrade::OnUpgrade,
    /// Held until the tunnel ends: the connection's permit and its count in `connections_open`.
    pub slot: std::sync::Arc<crate::conn::ConnSlot>,
    /// The peer certificate's expiry, when connections end at it.
    pub deadline: Option<tokio::time::Instant>,
    /// Resolves when a new policy no longer allows the request that opened the tunnel.
    pub revoked: std::pin::Pin<Box<dyn std::future::Future<Output = ()> + Send>>,
}

/// The protocol label of a request as it reached the sidecar: `grpc` (h2 with a gRPC content type),
/// `h2` or `http1`.
pub(crate) fn protocol_of<B>(req: &Request<B>) -> crate::metrics::HttpProtocol {
    use crate::metrics::HttpProtocol;
    if is_grpc(req.headers()) {
        HttpProtocol::Grpc
    } else if req.version() == Version::HTTP_2 {
        HttpProtocol::H2
    } else {
        HttpProtocol::Http1
    }
}

/// Whether a request is gRPC: its content type is `application/grpc`, alone or with a `+` suffix
/// or `;` parameters (media types compare without case). gRPC-Web (`application/grpc-web...`) is
/// not: it is HTTP/1.1 traffic, and goes to the app as such.
pub(crate) fn is_grpc(headers: &HeaderMap) -> bool {
    const GRPC: &[u8] = b"application/grpc";
    headers.get(header::CONTENT_TYPE).is_some_and(|v| {
        let v = v.as_bytes();
        v.len() >= GRPC.len()
            && v[..GRPC.len()].eq_ignore_ascii_case(GRPC)
            && matches!(v.get(GRPC.len()), None | Some(b'+' | b';' | b' ' | b'\t'))
    })
}

/// How long the app (inbound) or the upstream (outbound) has to send a request's response head.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum HeadWait {
    /// `--request-timeout`: any request but gRPC.
    Timeout(Duration),
    /// A gRPC call's own deadline (`grpc-timeout`): past it the call is answered
    /// `DEADLINE_EXCEEDED`, as its client would conclude itself.
    Deadline(Duration),
    /// A gRPC call without a deadline: as long as it takes. A gRPC server sends its response
    /// headers when the call's handler returns, so a long call, or a client stream still
    /// sending, would be cut at `--request-timeout` and reach its client as `UNAVAILABLE` (which
    /// retry policies retry) after the app had maybe acted on it.
    Unbounded,
}

impl HeadWait {
    /// The wait for a request of `version` with `headers`, under `--request-timeout`. gRPC is h2
    /// only: an HTTP/1.1 request with a gRPC content type is timed as any other (it reaches an
    /// app over HTTP/1.1, which no gRPC server speaks).
    pub(crate) fn of(version: Version, headers: &HeaderMap, request_timeout: Duration) -> Self {
        if version != Version::HTTP_2 || !is_grpc(headers) {
            return Self::Timeout(request_timeout);
        }
        match headers
            .get(GRPC_TIMEOUT)
            .and_then(|v| grpc_timeout(v.as_bytes()))
        {
            Some(deadline) => Self::Deadline(deadline),
            None => Self::Unbounded,
        }
    }

    /// `head` within the wait; `Err` with the answer to give when it passed.
    pub(crate) async fn run<F: std::future::Future>(
        self,
        head: F,
        timed_out: impl FnOnce(Duration) -> Response<Body>,
    ) -> Result<F::Output, Response<Body>> {
        match self {
            Self::Timeout(wait) => tokio::time::timeout(wait, head)
                .await
                .map_err(|_| timed_out(wait)),
            Self::Deadline(wait) => tokio::time::timeout(wait, head).await.map_err(|_| {
                grpc_reply(
                    GRPC_DEADLINE_EXCEEDED,
                    &format!("no answer within the call's deadline ({wait:?})"),
                )
            }),
            Self::Unbounded => Ok(head.await),
        }
    }
}

const GRPC_TIMEOUT: &str = "grpc-timeout";
/// gRPC's status code `PERMISSION_DENIED`.
pub(crate) const GRPC_PERMISSION_DENIED: u8 = 7;
/// gRPC's status code `DEADLINE_EXCEEDED`.
pub(crate) const GRPC_DEADLINE_EXCEEDED: u8 = 4;

/// A `grpc-timeout` value: 1 to 8 digits and a unit (`H`, `M`, `S`, `m`, `u`, `n`).
fn grpc_timeout(value: &[u8]) -> Option<Duration> {
    let (&unit, digits) = value.split_last()?;
    if digits.is_empty() || digits.len() > 8 || !digits.iter().all(u8::is_ascii_digit) {
        return None;
    }
    let n: u64 = std::str::from_utf8(digits).ok()?.parse().ok()?;
    Some(match unit {
        b'H' => Duration::from_secs(n * 3600),
        b'M' => Duration::from_secs(n * 60),
        b'S' => Duration::from_secs(n),
        b'm' => Duration::from_millis(n),
        b'u' => Duration::from_micros(n),
        b'n' => Duration::from_nanos(n),
        _ => return None,
    })
}

/// A gRPC answer generated by the sidecar: "trailers-only" (HTTP 200, no body, the status in
/// the headers), so that a gRPC client reads the status as given, not one mapped from HTTP's.
pub(crate) fn grpc_reply(code: u8, message: &str) -> Response<Body> {
    let mut resp = Response::new(Empty::new().map_err(|never| match never {}).boxed());
    let headers = resp.headers_mut();
    headers.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/grpc"),
    );
    headers.insert("grpc-status", HeaderValue::from(u16::from(code)));
    // grpc-message is percent-encoded (gRPC's HTTP/2 protocol): every byte outside printable
    // ASCII, and `%`.
    let mut encoded = String::with_capacity(message.len());
    for b in format!("meshid: {message}").bytes() {
        if (0x20..0x7f).contains(&b) && b != b'%' {
            encoded.push(char::from(b));
        } else {
            encoded.push_str(&format!("%{b:02X}"));
        }
    }
    if let Ok(v) = HeaderValue::from_str(&encoded) {
        headers.insert("grpc-message", v);
    }
    resp
}

/// How long a connection may wait for a request head (idle keep-alive included).
pub(crate) fn head_timeout(shared: &Shared) -> Duration {
    shared.limits.idle_timeout.min(Duration::from_secs(60))
}

pub(crate) fn http1_builder(shared: &Shared) -> http1::Builder {
    let mut builder = http1::Builder::new();
    builder
        .timer(TokioTimer::new())
        .header_read_timeout(head_timeout(shared))
        .max_buf_size(shared.limits.max_header_bytes);
    builder
}

/// The h2 server's flow-control windows: what a client may send ahead of what the app has read.
/// The connection window bounds it in all (memory the sidecar holds for an app that does not read
/// its request bodies); a stream may use the whole of it, so that one upload streams at full speed
/// (1 MiB in flight: over 1 GB/s at a 1 ms round trip). hyper's defaults, set here so that the
/// bound is ours.
const H2_CONNECTION_WINDOW: u32 = 1024 * 1024;
const H2_STREAM_WINDOW: u32 = 1024 * 1024;
/// Streams a client may have open at once on one connection. A meshid outbound sends all its
/// app's requests to an upstream over at most `--max-upstream-h2-connections` connections, and
/// opens another only when every stream we allow is in use: one outbound listener gets this many
/// requests in flight per connection it may open (hyper's default, kept: fewer would have a busy
/// outbound answer its app 503 sooner).
const H2_MAX_STREAMS: u32 = 200;
/// Bytes of an answer h2 buffers per stream ahead of the socket before the body is polled again
/// (hyper's default is 400 KiB). The socket's own buffer lies below it and keeps a large answer
/// streaming; what this bounds is what a client that advertises large windows and then stops
/// reading makes the sidecar hold: 16 KiB (one frame) per stream, 3.1 MiB per connection
/// ([`H2_MAX_STREAMS`] streams), a peer's `--max-h2-connections-per-peer` (64) of them 200 MiB.
/// (At 64 KiB that was 12.5 MiB per connection, 800 MiB per peer: past an injected sidecar's
/// memory limit with eight connections of small answers it never read.)
const H2_SEND_BUFFER: usize = 16 * 1024;

/// The h2 server of both directions: peers' connections at the inbound (a peer holds at most
/// `--max-h2-connections-per-peer` of them), and the local app's at the outbound, whose bounds
/// cost nothing on loopback.
fn h2_builder(
    shared: &Shared,
    streams: std::sync::Arc<crate::streams::Streams>,
) -> auto::Builder<crate::streams::StreamExecutor> {
    let limits = shared.limits;
    let mut builder = auto::Builder::new(crate::streams::StreamExecutor(streams)).http2_only();
    builder
        .http2()
        .timer(TokioTimer::new())
        .initial_connection_window_size(H2_CONNECTION_WINDOW)
        .initial_stream_window_size(H2_STREAM_WINDOW)
        .max_concurrent_streams(H2_MAX_STREAMS)
        .max_send_buf_size(H2_SEND_BUFFER)
        .max_header_list_size(u32::try_from(limits.max_header_bytes).unwrap_or(u32::MAX));
    // No keep-alive PINGs: hyper's ping timer is reset on every frame it reads (2.3% of the
    // inbound's instructions per request), and each PING costs both ends a wake-up and an encrypted
    // round trip. The inbound hands the vanished-peer check to the kernel instead
    // (`meshid_runtime::net::keepalive` on every accepted connection); the outbound's own h2 client
    // pings its upstream, and the outbound's app side is on loopback.
    builder
}

/// A peer's connection, as the inbound hands it to [`serve_connection`].
pub(crate) struct FromPeer {
    /// The connection's place, its peer's share among it: an h2 connection is counted among its
    /// peer's h2 ones ([`crate::conn::ConnSlot::speak_h2`]).
    pub slot: std::sync::Arc<crate::conn::ConnSlot>,
    /// The listener's port (the refusal's metric).
    pub port: u16,
}

/// What a peer's h2 connection past its `--max-h2-connections-per-peer` is sent before it is
/// closed: the server preface (an empty SETTINGS frame), then a GOAWAY that refuses every stream
/// (last stream ID 0) with `ENHANCE_YOUR_CALM` and the flag as its debug data (RFC 9113, 6.5 and
/// 6.8).
const H2_REFUSAL: &[u8] = b"\
    \0\0\0\x04\0\0\0\0\0\
    \0\0\x25\x07\0\0\0\0\0\
    \0\0\0\0\
    \0\0\0\x0b\
    --max-h2-connections-per-peer";

/// How long a refused h2 connection is given to take [`H2_REFUSAL`] and close.
const H2_REFUSAL_LINGER: Duration = Duration::from_secs(1);

/// Counts a peer's connection that opened with the h2 preface among its peer's h2 ones; `false`
/// (counted and logged) when the peer holds `--max-h2-connections-per-peer` already.
fn admit_h2(peer: &FromPeer, shared: &Shared) -> bool {
    let Err(over) = peer.slot.speak_h2() else {
        return true;
    };
    shared
        .metrics
        .refused("inbound", peer.port, "max_h2_connections_per_peer");
    if over.first {
        tracing::warn!(
            peer = peer.slot.peer_id().unwrap_or_default(),
            "peer holds its --max-h2-connections-per-peer; closing its new h2 connections until it \
             closes some"
        );
    }
    false
}

/// Sends a refused h2 connection [`H2_REFUSAL`] and closes it, reading what the client sent
/// meanwhile (closing with it unread would reset the connection, and the client might lose the
/// GOAWAY), for at most [`H2_REFUSAL_LINGER`].
async fn refuse_h2<IO: AsyncRead + AsyncWrite + Unpin>(mut io: IO) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let _ = tokio::time::timeout(H2_REFUSAL_LINGER, async {
        io.write_all(H2_REFUSAL).await?;
        io.shutdown().await?;
        let mut unread = [0u8; 1024];
        while io.read(&mut unread).await? > 0 {}
        Ok::<_, std::io::Error>(())
    })
    .await;
}

/// How a connection that something outside ends is closed: what `revoked` in
/// [`serve_connection`] resolves to.
pub enum Closing {
    /// Its requests in flight finish, within the grace period: a policy change, a peer certificate
    /// no longer under the trust bundle (a retired root: a rotation's pooled connections carry
    /// requests that must not fail), shutdown, expiry. With a watch that resolves if the peer is
    /// revoked while the connection drains: it is then cut at once, as if revoked before.
    Drain(Option<CutWatch>),
    /// At once, with its requests in flight: the peer's certificate, lineage or identity was
    /// revoked (its key may be in other hands: a stream or upload in flight must not go on for
    /// the grace period), as outbound, TCP and upgraded connections are.
    Cut,
}

/// Resolves when a draining connection's peer is revoked ([`Closing::Drain`]).
pub type CutWatch = std::pin::Pin<Box<dyn std::future::Future<Output = ()> + Send>>;

/// A draining connection (`drained`: its graceful end within the grace period), cut at once if
/// `cut` resolves first (its peer revoked meanwhile). `true` if it ended within the grace period.
pub(crate) async fn drain_unless_cut<F: std::future::Future>(
    drained: F,
    grace: std::time::Duration,
    cut: Option<CutWatch>,
) -> bool {
    let mut drained = std::pin::pin!(tokio::time::timeout(grace, drained));
    let mut cut = cut;
    std::future::poll_fn(move |cx| {
        // Cut: `drained` is dropped, its streams reset and the app's requests let go.
        if let Some(cut) = cut.as_mut()
            && cut.as_mut().poll(cx).is_ready()
        {
            return std::task::Poll::Ready(true);
        }
        drained.as_mut().poll(cx).map(|ended| ended.is_ok())
    })
    .await
}

/// Serves one HTTP connection with `svc`, draining it gracefully on shutdown, at `deadline`, or
/// when `revoked` resolves (it logs why itself; [`Closing::Cut`] closes it at once). HTTP/1.x connections let go of hyper's buffers
/// while idle ([`crate::idle`]); `idle` counts them. A peer's connection (`from_peer`: the
/// inbound's) that opens with the h2 preface (whatever ALPN said) is counted among its peer's h2
/// connections, or refused past `--max-h2-connections-per-peer`, and is watched for an h2
/// rapid-reset flood ([`crate::streams::RESET_FLOOD`]).
pub(crate) async fn serve_connection<IO, S, F, R>(
    mut io: IO,
    shared: &Shared,
    deadline: Option<tokio::time::Instant>,
    revoked: R,
    svc: S,
    (idle, from_peer): (Gauge, Option<FromPeer>),
) where
    R: std::future::Future<Output = Closing> + Send + Unpin,
    IO: AsyncRead + AsyncWrite + Unpin + Send + 'static,
    S: crate::idle::Handler<F>,
    F: crate::idle::Answer,
{
    match crate::idle::opening(&mut io, head_timeout(shared)).await {
        Opening::H1(prefix) => {
            crate::idle::serve_h1(io, prefix, shared, deadline, revoked, svc, idle).await;
        }
        // Boxed: its state (the idle watch among it) would otherwise size every connection's
        // task, HTTP/1.1 ones included (+0.4 KiB per idle connection, `bench-run --scenarios
        // memory`).
        Opening::H2(prefix) => {
            if let Some(peer) = &from_peer
                && !admit_h2(peer, shared)
            {
                Box::pin(refuse_h2(io)).await;
                return;
            }
            let from_peer = from_peer.is_some();
            Box::pin(serve_h2(
                io, prefix, shared, deadline, revoked, svc, from_peer,
            ))
            .await;
        }
        Opening::Gone => {}
    }
}

/// [`serve_connection`] for a connection that opened with the h2 preface (`prefix`, read already).
async fn serve_h2<IO, S, F, R>(
    io: IO,
    prefix: Bytes,
    shared: &Shared,
    deadline: Option<tokio::time::Instant>,
    revoked: R,
    svc: S,
    from_peer: bool,
) where
    R: std::future::Future<Output = Closing> + Send + Unpin,
    IO: AsyncRead + AsyncWrite + Unpin + Send + 'static,
    S: crate::idle::Handler<F>,
    F: crate::idle::Answer,
{
    let io = crate::idle::replay(io, prefix);
    let streams = std::sync::Arc::new(if from_peer {
        crate::streams::Streams::guarding_resets()
    } else {
        crate::streams::Streams::default()
    });
    let counted = streams.clone();
    let handler = std::sync::Arc::new(svc);
    let svc = move |req: Request<Incoming>| {
        let open = counted.request();
        let counted = counted.clone();
        let handler = handler.clone();
        async move {
            // The handler's future is made here, not outside and captured: a captured future
            // would take its size twice in this one (once captured, once awaited), and hyper
            // moves this one whole as it spawns the stream's task.
            let resp = handler(req.map(Tracked::untracked), None).await?;
            // The sidecar's own answers (a denial) carry its reason: not counted against resets.
            if !resp.headers().contains_key("x-meshid-reason") {
                counted.forwarded();
            }
            Ok::<_, std::convert::Infallible>(
                resp.map(|body| crate::streams::Sending::new(body, open)),
            )
        }
    };
    // Owned and boxed: the connection state is allocated once at its own size rather than inline in
    // every enclosing future, which matters for memory per connection.
    let mut conn = Box::pin(
        h2_builder(shared, streams.clone())
            .serve_connection_with_upgrades(TokioIo::new(io), service_fn(svc))
            .into_owned(),
    );
    let mut shutdown = shared.shutdown.clone();
    let expired = async {
        match deadline {
            Some(d) => tokio::time::sleep_until(d).await,
            None => std::future::pending().await,
        }
    };
    // What ends the connection from outside, or its idle limit: polled only when one of them was
    // woken, not at every wake of this task (several per request).
    let idle_timeout = shared.limits.idle_timeout;
    let ended = std::pin::pin!(async {
        tokio::select! {
            () = meshid_runtime::net::stopped(&mut shutdown) => (Closing::Drain(None), None),
            () = expired => {
                tracing::info!("closing gracefully: the peer's certificate expired");
                (Closing::Drain(None), None)
            }
            closing = revoked => (closing, None),
            ending = streams.watch(idle_timeout, &shared.metrics.stalled_responses) => {
                (Closing::Drain(None), Some(ending))
            }
            () = streams.flooded() => {
                (Closing::Drain(None), Some(crate::streams::Ending::ResetFlood))
            }
        }
    });
    let (closing, ending) = tokio::select! {
        r = conn.as_mut() => {
            if let Err(error) = r {
                tracing::debug!(%error, "http connection ended");
            }
            return;
        }
        ended = meshid_runtime::wake::WhenWoken::new(ended) => ended,
    };
    let cut = match closing {
        // Dropped: its streams are reset, the app's requests for them let go (why was logged).
        Closing::Cut => return,
        Closing::Drain(cut) => cut,
    };
    if ending == Some(crate::streams::Ending::Stalled) {
        // Graceful would wait for the very responses the peer does not take.
        shared
            .metrics
            .stalled_responses
            .inc_by(streams.held() as u64);
        // A line per connection an authenticated peer chooses to stall: limited, as denials are.
        static STALLED: meshid_runtime::log_limit::LogLimit =
            meshid_runtime::log_limit::LogLimit::new(10.0, 1.0);
        if let Some(left_out) = STALLED.take() {
            tracing::info!(
                idle_timeout_s = idle_timeout.as_secs(),
                left_out,
                "closing: the h2 peer has not taken a response for the idle timeout (its \
                 flow-control window stays closed)"
            );
        }
        return;
    }
    if ending == Some(crate::streams::Ending::ResetFlood) {
        // Graceful would let it go on sending and resetting until the grace period ends.
        shared.metrics.reset_flood_closes.inc();
        // A peer can flood on connection after connection: a line each, limited.
        static FLOODS: meshid_runtime::log_limit::LogLimit =
            meshid_runtime::log_limit::LogLimit::new(10.0, 1.0);
        if let Some(left_out) = FLOODS.take() {
            tracing::warn!(
                reset = streams.premature(),
                left_out,
                "closing: the h2 peer reset more than {} of its requests within a second and \
                 before their answers, more than half of those the app answered or that were \
                 reset (a rapid-reset flood: each reset frees its stream while the app works on)",
                crate::streams::RESET_FLOOD
            );
        }
        return;
    }
    if ending == Some(crate::streams::Ending::Idle) {
        tracing::debug!("closing gracefully: no h2 request for the idle timeout");
    }
    // Finish in-flight requests; h2 peers get GOAWAY. Within the grace period: a response the peer
    // does not take (even one whose body h2 holds whole, the app's side done) would keep it open.
    conn.as_mut().graceful_shutdown();
    if !drain_unless_cut(conn, shared.limits.grace, cut).await {
        static LATE: meshid_runtime::log_limit::LogLimit =
            meshid_runtime::log_limit::LogLimit::new(10.0, 1.0);
        if let Some(left_out) = LATE.take() {
            tracing::info!(
                grace_s = shared.limits.grace.as_secs(),
                left_out,
                "closing: the h2 peer did not take its responses within the grace period"
            );
        }
    }
}

pub(crate) fn finish_response(
    mut resp: Response<Body>,
    tunnel: Option<Tunnel>,
    shared: &Shared,
) -> Response<Body> {
    let switching = resp.status() == StatusCode::SWITCHING_PROTOCOLS;
    if switching && let Some(tunnel) = tunnel {
        let app_side = hyper::upgrade::on(&mut resp);
        let idle = shared.limits.idle_timeout;
        let mut shutdown = shared.shutdown.clone();
        tokio::spawn(async move {
            let Tunnel {
                client,
                slot,
                deadline,
                revoked,
            } = tunnel;
            let copy = async {
                match tokio::try_join!(client, app_side) {
                    Ok((client, app)) => {
                        let _ = crate::conn::copy_bidirectional_idle(
                            TokioIo::new(client),
                            TokioIo::new(app),
                            idle,
                        )
                        .await;
                    }
                    Err(error) => tracing::debug!(%error, "upgrade failed"),
                }
            };
            let expired = async {
                match deadline {
                    Some(d) => tokio::time::sleep_until(d).await,
                    None => std::future::pending().await,
                }
            };
            tokio::select! {
                () = copy => {}
                () = expired => tracing::info!("closing an upgraded connection: the peer's certificate expired"),
                () = revoked => {}
                () = meshid_runtime::net::stopped(&mut shutdown) => {
                    tracing::debug!("closing an upgraded connection: shutting down");
                }
            }
            drop(slot);
        });
    }
    strip_hop_by_hop(resp.headers_mut(), switching);
    resp
}

/// The innermost error message of a chain (the useful part of a client error).
pub fn root_cause(error: &(dyn std::error::Error + 'static)) -> String {
    let mut current: &(dyn std::error::Error + 'static) = error;
    // Prefer our identity verdict when the handshake failed on it.
    loop {
        if let Some(rustls::Error::InvalidCertificate(rustls::CertificateError::Other(other))) =
            current.downcast_ref::<rustls::Error>()
        {
            return other.0.to_string();
        }
        match current.source() {
            Some(next) => current = next,
            None => return current.to_string(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn grpc_timeouts_are_read_as_the_protocol_spells_them() {
        for (value, want) in [
            ("1H", Some(Duration::from_secs(3600))),
            ("2M", Some(Duration::from_secs(120))),
            ("30S", Some(Duration::from_secs(30))),
            ("250m", Some(Duration::from_millis(250))),
            ("99999999u", Some(Duration::from_micros(99_999_999))),
            ("5n", Some(Duration::from_nanos(5))),
            ("0S", Some(Duration::ZERO)),
            ("123456789S", None),
            ("S", None),
            ("", None),
            ("10s", None),
            ("-1S", None),
            ("1.5S", None),
            (" 1S", None),
        ] {
            assert_eq!(grpc_timeout(value.as_bytes()), want, "{value:?}");
        }
        let mut grpc = HeaderMap::new();
        grpc.insert(
            header::CONTENT_TYPE,
            HeaderValue::from_static("application/grpc+proto"),
        );
        let wait = |h: &HeaderMap| HeadWait::of(Version::HTTP_2, h, Duration::from_secs(30));
        assert_eq!(wait(&grpc), HeadWait::Unbounded);
        grpc.insert(GRPC_TIMEOUT, HeaderValue::from_static("100m"));
        assert_eq!(wait(&grpc), HeadWait::Deadline(Duration::from_millis(100)));
        grpc.insert(GRPC_TIMEOUT, HeaderValue::from_static("soon"));
        assert_eq!(
            wait(&grpc),
            HeadWait::Unbounded,
            "an unreadable deadline is none"
        );
        assert_eq!(
            HeadWait::of(Version::HTTP_11, &grpc, Duration::from_secs(30)),
            HeadWait::Timeout(Duration::from_secs(30)),
            "gRPC is h2"
        );
        grpc.insert(header::CONTENT_TYPE, HeaderValue::from_static("text/plain"));
        assert_eq!(wait(&grpc), HeadWait::Timeout(Duration::from_secs(30)));
        let resp = grpc_reply(GRPC_DEADLINE_EXCEEDED, "100% late\n");
        assert_eq!(resp.headers()["grpc-status"], "4");
        assert_eq!(resp.headers()["grpc-message"], "meshid: 100%25 late%0A");
    }

    /// A refused h2 connection reads as a well-formed refusal to an h2 client: its request fails
    /// with the GOAWAY's `ENHANCE_YOUR_CALM`, not with a protocol error or a reset.
    #[tokio::test]
    async fn a_refused_h2_client_is_told_to_go_away() {
        let (client, mut server) = tokio::io::duplex(64 * 1024);
        let refused = tokio::spawn(async move {
            assert!(matches!(
                crate::idle::opening(&mut server, Duration::from_secs(5)).await,
                Opening::H2(_)
            ));
            refuse_h2(server).await;
        });
        let (mut send, conn) = h2::client::handshake(client).await.unwrap();
        let conn = tokio::spawn(conn);
        let req = Request::get("https://app/").body(()).unwrap();
        let error = match send.send_request(req, true) {
            Ok((answer, _)) => answer.await.unwrap_err(),
            Err(error) => error,
        };
        assert!(error.is_go_away(), "{error}");
        assert_eq!(error.reason(), Some(h2::Reason::ENHANCE_YOUR_CALM));
        // The client closes once told; the refusal ends with it, not at its linger.
        drop((send, conn.await.unwrap()));
        tokio::time::timeout(H2_REFUSAL_LINGER / 2, refused)
            .await
            .expect("the refusal ends when the client closes")
            .unwrap();
    }

    #[test]
    fn hop_by_hop_headers_are_removed() {
        let mut h = HeaderMap::new();
        h.insert("connection", HeaderValue::from_static("close, x-secret"));
        h.insert("x-secret", HeaderValue::from_static("1"));
        h.insert("keep-alive", HeaderValue::from_static("timeout=5"));
        h.insert("te", HeaderValue::from_static("trailers, deflate"));
        h.insert("x-app", HeaderValue::from_static("kept"));
        strip_hop_by_hop(&mut h, false);
        assert!(h.get("connection").is_none());
        assert!(h.get("x-secret").is_none());
        assert!(h.get("keep-alive").is_none());
        assert_eq!(h.get("te").unwrap(), "trailers");
        assert_eq!(h.get("x-app").unwrap(), "kept");
    }

    #[test]
    fn the_quick_check_knows_exactly_the_hop_by_hop_names() {
        for name in &HOP_BY_HOP {
            assert!(is_hop_by_hop(name), "{name}");
        }
        for name in [
            "connections",
            "t",
            "upgrade-insecure-requests",
            "proxy",
            "transfer-encodings",
            "host",
        ] {
            assert!(!is_hop_by_hop(&HeaderName::from_static(name)), "{name}");
        }
    }

    #[test]
    fn each_hop_by_hop_header_is_removed_on_its_own() {
        // Parsed from the wire as the codecs parse them, in any case: the check that skips a map
        // without hop-by-hop headers must still see every one of them.
        for name in [
            "connection",
            "Keep-Alive",
            "proxy-connection",
            "PROXY-AUTHENTICATE",
            "proxy-authorization",
            "te",
            "Transfer-Encoding",
            "upgrade",
        ] {
            let mut h = HeaderMap::new();
            h.insert("x-app", HeaderValue::from_static("kept"));
            h.append(
                HeaderName::from_bytes(name.as_bytes()).unwrap(),
                HeaderValue::from_static("x"),
            );
            strip_hop_by_hop(&mut h, false);
            let left: Vec<&str> = h.keys().map(HeaderName::as_str).collect();
            assert_eq!(left, ["x-app"], "{name}");
        }
        let mut none = HeaderMap::new();
        none.insert("x-app", HeaderValue::from_static("kept"));
        strip_hop_by_hop(&mut none, false);
        assert_eq!(none.len(), 1);
    }

    #[test]
    fn every_spelling_of_the_peer_headers_is_removed() {
        let mut h = HeaderMap::new();
        for name in [
            "x-forwarded-client-cert",
            "X_Forwarded_Client_Cert",
            "x-forwarded_client-cert",
            "x-forwarded-for",
            "x_forwarded_for",
            "forwarded",
            "x-real-ip",
            "X_REAL_IP",
            "x-forwarded-proto",
            "x-forwarded-host",
            "X_Forwarded_Port",
            "x-forwarded-prefix",
            "x-original-url",
            "X-Rewrite-URL",
            "True-Client-IP",
            "client_ip",
            "x-client-ip",
            "X-Cluster-Client-Ip",
            "cf-connecting-ip",
            "fastly_client_ip",
            "Proxy",
            "X-Client-Cert",
            "ssl_client_cert",
            "SSL_CLIENT_VERIFY",
            "X-SSL-Cert",
            "X-SSL-Client-Cert",
            "x_ssl_client_verify",
            "X-SSL-Client-DN",
            "X-SSL-Client-S-DN",
            "X-ARR-ClientCert",
            "X-Forwarded-Tls-Client-Cert",
            "X-Forwarded-Tls-Client-Cert-Info",
            "X-Amzn-Mtls-Clientcert",
            "X-Amzn-Mtls-Clientcert-Leaf",
            "X-Amzn-Mtls-Clientcert-Serial-Number",
            "SCRIPT_NAME",
            "X-Script-Name",
            "path-info",
            "Remote_User",
            // PHP folds `.` into `_` too: one `$_SERVER` key with the sidecar's own header.
            "x.forwarded.client.cert",
            "X.Forwarded_Client-Cert",
            "X.Real.IP",
            "true.client.ip",
        ] {
            h.append(
                HeaderName::from_bytes(name.as_bytes()).unwrap(),
                HeaderValue::from_static("forged"),
            );
        }
        for kept in [
            "x-forwarded-client-certs",
            "x-forwarded",
            "forwarded-x",
            "x.forwarded",
            "xforwarded-for",
        ] {
            h.insert(kept, HeaderValue::from_static("app"));
        }
        strip_peer_headers(&mut h);
        let mut left: Vec<&str> = h.keys().map(HeaderName::as_str).collect();
        left.sort_unstable();
        assert_eq!(
            left,
            [
                "forwarded-x",
                "x-forwarded",
                "x-forwarded-client-certs",
                "x.forwarded",
                "xforwarded-for"
            ]
        );
        // Space and `[`, which PHP folds into `_` as well, cannot be in a header name; matched
        // all the same, should a name ever hold them.
        assert!(names_one_of("x forwarded[client-cert", &PEER_HEADERS));
        assert!(!names_one_of("x-forwarded-client-cer", &PEER_HEADERS));
    }

    /// `_` spellings of the framing names are dropped (a Mongrel-family server would frame the
    /// body by them); the names themselves are left to the codecs, other `_` names to the app.
    #[test]
    fn underscore_spellings_of_framing_headers_are_removed() {
        for name in [
            "Transfer_Encoding",
            "CONTENT_LENGTH",
            "transfer_Encoding",
            "content_length",
            "Keep_Alive",
            "proxy_connection",
            "Proxy_Authorization",
            // Taken as CONTENT_TYPE: the type a `_method` form is read by.
            "Content_Type",
            "content_type",
        ] {
            let mut h = HeaderMap::new();
            h.insert("content-length", HeaderValue::from_static("58"));
            h.insert("x_app_key", HeaderValue::from_static("kept"));
            h.append(
                HeaderName::from_bytes(name.as_bytes()).unwrap(),
                HeaderValue::from_static("chunked"),
            );
            strip_hop_by_hop(&mut h, false);
            let mut left: Vec<&str> = h.keys().map(HeaderName::as_str).collect();
            left.sort_unstable();
            assert_eq!(left, ["content-length", "x_app_key"], "{name}");
        }
        let mut trailers = HeaderMap::new();
        trailers.insert("transfer_encoding", HeaderValue::from_static("chunked"));
        trailers.insert("x_http_method_override", HeaderValue::from_static("DELETE"));
        trailers.insert("x-http-method", HeaderValue::from_static("DELETE"));
        trailers.insert("grpc-status", HeaderValue::from_static("0"));
        strip_peer_trailers(&mut trailers);
        let left: Vec<&str> = trailers.keys().map(HeaderName::as_str).collect();
        assert_eq!(left, ["grpc-status"]);
    }

    #[test]
    fn cookie_fields_are_joined_into_one() {
        let mut h = HeaderMap::new();
        h.insert(header::COOKIE, HeaderValue::from_static("a=1"));
        join_cookies(&mut h);
        assert_eq!(
            h.get_all(header::COOKIE).iter().collect::<Vec<_>>(),
            ["a=1"]
        );
        h.append(header::COOKIE, HeaderValue::from_static("b=2"));
        h.append(header::COOKIE, HeaderValue::from_static("c=3"));
        join_cookies(&mut h);
        assert_eq!(
            h.get_all(header::COOKIE).iter().collect::<Vec<_>>(),
            ["a=1; b=2; c=3"]
        );
        let mut none = HeaderMap::new();
        join_cookies(&mut none);
        assert!(none.is_empty());
    }

    #[test]
    fn upgrade_headers_survive_when_upgrading() {
        let mut h = HeaderMap::new();
        h.insert("connection", HeaderValue::from_static("Upgrade"));
        h.insert("upgrade", HeaderValue::from_static("websocket"));
        strip_hop_by_hop(&mut h, true);
        assert_eq!(h.get("upgrade").unwrap(), "websocket");
        assert_eq!(h.get("connection").unwrap(), "upgrade");
    }

    #[test]
    fn an_upgrade_keeps_connection_only_to_say_upgrade() {
        // Another name in the list would have a proxy in front of the app drop that header: ours.
        let mut h = HeaderMap::new();
        h.insert(
            "connection",
            HeaderValue::from_static("Upgrade, x-forwarded-client-cert, keep-alive"),
        );
        h.insert("upgrade", HeaderValue::from_static("websocket"));
        h.insert(
            "x-forwarded-client-cert",
            HeaderValue::from_static("forged"),
        );
        strip_hop_by_hop(&mut h, true);
        assert_eq!(
            h.get_all("connection").iter().collect::<Vec<_>>(),
            ["upgrade"]
        );
        assert!(!h.contains_key("x-forwarded-client-cert"));
    }

    #[test]
    fn peer_trailers_lose_what_only_the_sidecar_says() {
        let mut t = HeaderMap::new();
        t.insert(
            "x-forwarded-client-cert",
            HeaderValue::from_static("URI=spiffe://td/ns/x/sa/admin"),
        );
        t.insert("X_Forwarded_For", HeaderValue::from_static("10.0.0.1"));
        t.insert("x-meshid-app-h2", HeaderValue::from_static("1"));
        t.insert("transfer-encoding", HeaderValue::from_static("chunked"));
        t.insert("grpc-status", HeaderValue::from_static("0"));
        strip_peer_trailers(&mut t);
        assert_eq!(
            t.keys().map(HeaderName::as_str).collect::<Vec<_>>(),
            ["grpc-status"]
        );
    }
}
