//! Inbound HTTP: a hyper server (HTTP/1.1 or h2, told apart by the h2 preface whatever ALPN said)
//! asks the authorization point about every request (port, peer, method, path); allowed requests go
//! to the app on localhost through a pooled client. Who called is said by us alone: every peer-sent
//! spelling of the identity and forwarding headers is removed ([`crate::http::PEER_HEADERS`]), then `x-forwarded-client-cert` names the
//! verified peer and `x-forwarded-for`/`forwarded` its address as this sidecar saw it (the address
//! of the peer's sidecar, as Envoy's `use_remote_address` does; nothing a peer claims about hops
//! before it passes), with `x-forwarded-proto: https` (the peer came over mTLS). Denied: 403
//! with a short reason; app down: 502; app too slow: 504. A W3C `traceparent` passes through
//! untouched and, when well formed, is named in the request's decision log line. HTTP/1.1 `Upgrade` (WebSocket) passes
//! through. A response still being sent ends when a policy change denies the request it answers
//! ([`super::revocable`]). gRPC requests (and requests whose originating app spoke h2) reach the app as h2c;
//! everything else as HTTP/1.1, which every HTTP app speaks.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;

use bytes::Bytes;
use http::header::{self, HeaderValue};
use http::{Request, Response, StatusCode, Version};
use http_body_util::BodyExt;
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;
use tokio::io::{AsyncRead, AsyncWrite};

use super::app::AppH1;
use super::authz::{Authorizer, Peer};
use super::form_budget::NoRoom;
use crate::conn::{ConnSlot, Shared};
use crate::http::{
    APP_H2_HINT_NAME, Body, BoxError, Call, FromPeer, HeadWait, ReqBody, Tunnel, XFCC_NAME,
    finish_response, is_grpc, is_upgrade, protocol_of, reply, respond, root_cause,
    serve_connection, strip_hop_by_hop, strip_peer_headers, upgrades_to_websocket,
};
use crate::idle::ReadWhole;
use crate::metrics::ConnMetrics;
use crate::settings::Inbound;

/// App-side HTTP clients of one inbound listener.
pub struct InboundHttp {
    target: SocketAddr,
    /// `target` as a URI authority, parsed once (every request is re-addressed to it).
    authority: http::uri::Authority,
    h1: Arc<AppH1>,
    /// How h2 connections to the app are made; each peer connection makes its own ([`Conn`]).
    connector: HttpConnector,
    authz: Authorizer,
}

impl InboundHttp {
    pub fn authz(&self) -> &Authorizer {
        &self.authz
    }

    pub fn new(spec: &Inbound, shared: &Shared, authz: Authorizer) -> Self {
        let mut connector = HttpConnector::new();
        connector.set_nodelay(true);
        connector.set_connect_timeout(Some(shared.limits.connect_timeout));
        let h1 = AppH1::new(
            spec.target,
            shared.limits.connect_timeout,
            shared.limits.max_app_connections,
            shared.limits.max_header_bytes,
        );
        Self {
            target: spec.target,
            authority: authority_of(spec.target),
            h1,
            connector,
            authz,
        }
    }

    /// An h2 client to the app for one peer connection. Not shared between peers: h2 gives back a
    /// connection's flow-control window only as its answers are taken, and a peer that takes none
    /// (a stream window of zero on its own connection) would fill a shared connection's window
    /// and stall every other peer's h2 answers behind its own.
    ///
    /// Its windows are small (256 KiB a stream, 1 MiB the connection; hyper's defaults are 2 and
    /// 5 MiB): what the app sends ahead of a peer that takes nothing waits in this sidecar's memory,
    /// once per peer connection, and on loopback a small window costs no speed.
    fn app_h2(&self) -> Client<HttpConnector, ReqBody> {
        Client::builder(TokioExecutor::new())
            .http2_only(true)
            .http2_initial_stream_window_size(APP_H2_STREAM_WINDOW)
            .http2_initial_connection_window_size(APP_H2_CONNECTION_WINDOW)
            // `--max-header-bytes`, as on the HTTP/1.1 paths (hyper's default is 16 KiB whatever
            // the flag says): a larger response header list fails its request, a 502.
            .http2_max_header_list_size(u32::try_from(self.h1.max_head()).unwrap_or(u32::MAX))
            .pool_idle_timeout(super::app::IDLE_TIMEOUT)
            .build(self.connector.clone())
    }
}

/// The h2 receive windows of a peer connection's client to the app ([`InboundHttp::app_h2`]).
const APP_H2_STREAM_WINDOW: u32 = 256 * 1024;
const APP_H2_CONNECTION_WINDOW: u32 = 1024 * 1024;

/// The largest form body read to find its `_method` fields; a larger one is refused (413).
pub const MAX_FORM_BODY: usize = 1 << 20;

/// Reads a POST's form body whole and decides every method its `_method` fields name, as those of
/// the query are decided (each one allowed is added to `overrides`); the body then goes to the app
/// as read. What the body holds meanwhile is charged to the process's form budget
/// ([`super::form_budget`]) until the request's body is dropped; a body that finds no room there is
/// refused at once, as one over [`MAX_FORM_BODY`] is.
///
/// In audit mode (`audit`) the overrides are decided the same (their would-denies recorded), but
/// what enforce mode refuses because it cannot check it passes on as it came, if none of it was
/// lost: a form that cannot be checked, one whose declared length is over the limit or finds no
/// room (charged before any of it is read), a multipart head frameworks read differently (read
/// whole, and passed on as read, if the policy still audits once it has come). One without a
/// declared length that grows past the limit or past the memory left, and any that fails or does
/// not come within the request timeout, is refused in audit mode too: what was read of it is gone.
async fn decide_form(
    req: &mut Request<ReqBody>,
    form: Result<crate::form::Form, String>,
    peer: &Peer,
    http: &InboundHttp,
    shared: &Shared,
    overrides: &mut Vec<String>,
    audit: bool,
) -> Result<(), Response<Body>> {
    let declared = hyper::body::Body::size_hint(req.body()).exact().is_some();
    // A boundary RFC 2046 does not allow (over 70 bytes, or bytes it has no place for) is refused
    // before any of the body is read or searched for it.
    let form = match form {
        Ok(form) => form,
        Err(_) if audit => return Ok(()),
        Err(reason) => {
            return Err(reply(
                StatusCode::BAD_REQUEST,
                format!("{reason}: its _method fields cannot be checked"),
            ));
        }
    };
    let read = tokio::time::timeout(
        shared.limits.request_timeout,
        req.body_mut().read_whole(
            MAX_FORM_BODY,
            shared.form_bodies.room(peer.verified.id.as_str()),
        ),
    );
    let refused = |reason| shared.metrics.form_body_refused(http.authz.port(), reason);
    let body = match read.await {
        Ok(Ok(body)) => body,
        // With a declared length, these come before any of the body is read.
        Ok(Err(ReadWhole::NoRoom(_) | ReadWhole::TooLarge)) if audit && declared => return Ok(()),
        Ok(Err(ReadWhole::NoRoom(NoRoom::Busy))) => {
            refused("no_room");
            return Err(reply(
                StatusCode::SERVICE_UNAVAILABLE,
                format!(
                    "the sidecar's memory for form bodies being checked for _method fields \
                     ({} bytes, --form-body-memory) is held by other requests: try again",
                    shared.form_bodies.total()
                ),
            ));
        }
        Ok(Err(ReadWhole::NoRoom(NoRoom::PeerBusy))) => {
            refused("peer_share");
            return Err(reply(
                StatusCode::SERVICE_UNAVAILABLE,
                format!(
                    "{}'s share of the sidecar's memory for form bodies being checked for \
                     _method fields ({} bytes, a quarter of --form-body-memory) is held by its \
                     other requests: try again",
                    peer.verified.id,
                    shared.form_bodies.share()
                ),
            ));
        }
        Ok(Err(ReadWhole::NoRoom(NoRoom::TooLarge))) => {
            refused("too_large");
            return Err(reply(
                StatusCode::PAYLOAD_TOO_LARGE,
                format!(
                    "a form body larger than the sidecar's memory for form bodies ({} bytes, \
                     --form-body-memory): its _method fields cannot be checked",
                    shared.form_bodies.total()
                ),
            ));
        }
        Ok(Err(ReadWhole::TooLarge)) => {
            refused("too_large");
            return Err(reply(
                StatusCode::PAYLOAD_TOO_LARGE,
                format!(
                    "a form body over {MAX_FORM_BODY} bytes to a path where {} may not use every \
                     method: its _method fields cannot be checked",
                    peer.id()
                ),
            ));
        }
        Ok(Err(ReadWhole::Failed(error))) => {
            return Err(reply(
                StatusCode::BAD_REQUEST,
                format!("the request body failed: {error}"),
            ));
        }
        Err(_) => {
            return Err(reply(
                StatusCode::REQUEST_TIMEOUT,
                "the form body did not arrive within the request timeout".into(),
            ));
        }
    };
    // A multipart body whose parts frameworks would read differently: 400, as a Content-Type
    // they would read differently is.
    let methods = match form.method_overrides(&body) {
        Ok(methods) => methods,
        // Asked again: the body took its time, and a policy enforced meanwhile refuses what it
        // cannot check (`decide_again` decides only the overrides found).
        Err(_) if audit && http.authz.audits() => return Ok(()),
        Err(reason) => {
            return Err(reply(
                StatusCode::BAD_REQUEST,
                format!("{reason}: its _method fields cannot be checked"),
            ));
        }
    };
    decide_overrides(req, peer, http, methods, overrides).map_err(|refused| *refused)
}

/// Decides each method override in `methods` (each a recorded decision) that is not the
/// request's own method and not decided yet, adding it to `overrides`: a peer allowed `POST` on a
/// path cannot have the app take it as `DELETE`. Past [`crate::form::MAX_OVERRIDES`] distinct
/// ones, 400: a peer's thousand `_method` fields are not a thousand decisions (in audit mode, the
/// rest go undecided, as a malformed form does).
fn decide_overrides(
    req: &Request<ReqBody>,
    peer: &Peer,
    http: &InboundHttp,
    methods: Vec<String>,
    overrides: &mut Vec<String>,
) -> Result<(), Box<Response<Body>>> {
    for method in methods {
        if method == req.method().as_str() || overrides.contains(&method) {
            continue;
        }
        if overrides.len() >= crate::form::MAX_OVERRIDES {
            if http.authz.audits() {
                return Ok(());
            }
            return Err(Box::new(reply(
                StatusCode::BAD_REQUEST,
                format!(
                    "more than {} methods named by _method fields and method-override headers",
                    crate::form::MAX_OVERRIDES
                ),
            )));
        }
        http.authz.request(
            peer,
            &method,
            req.uri().path(),
            crate::trace::traceparent(req.headers()),
        )?;
        overrides.push(method);
    }
    Ok(())
}

/// Decides a request again once its form body has been read ([`decide_form`]), before the app
/// sees any of it: the request was held meanwhile (up to `--request-timeout`), and a trust bundle
/// or policy applied since it was decided under policy `version` must not be passed over, as it is
/// not for a response in flight ([`super::revocable`]) or a tunnel. The peer's trust is looked at
/// again ([`Authorizer::still_trusted`], cheap when the trust did not change); its method and
/// every override (`overrides`) are decided again when the policy moved, each a recorded decision.
/// `Ok(None)` when the policy did not move.
fn decide_again(
    req: &Request<ReqBody>,
    peer: &Peer,
    http: &InboundHttp,
    version: u64,
    overrides: &[String],
) -> Result<Option<DecidedAgain>, Box<Response<Body>>> {
    http.authz.still_trusted(peer, req)?;
    // Read before the decisions, as `version` was.
    let now = http.authz.policy_version();
    if now == version {
        return Ok(None);
    }
    let (path, traceparent) = (req.uri().path(), crate::trace::traceparent(req.headers()));
    for method in overrides {
        http.authz.request(peer, method, path, traceparent)?;
    }
    let audit_decision = http
        .authz
        .request(peer, req.method().as_str(), path, traceparent)?;
    Ok(Some(DecidedAgain {
        version: now,
        audit_decision,
    }))
}

/// What [`decide_again`] decided a held request under.
struct DecidedAgain {
    /// The policy version read before it was decided again.
    version: u64,
    /// The decision ID of an audit-mode would-deny of its method, for the response.
    audit_decision: Option<String>,
}

/// `addr` as a URI authority (`IP:PORT`, IPv6 in brackets): always valid, so no error path.
fn authority_of(addr: SocketAddr) -> http::uri::Authority {
    http::uri::Authority::from_maybe_shared(Bytes::from(addr.to_string()))
        .unwrap_or_else(|_| http::uri::Authority::from_static("127.0.0.1"))
}

/// Serves an authenticated inbound HTTP connection; every request, allowed or answered by the
/// sidecar itself, is counted and timed in `metrics` (in one place: here).
///
/// Not an `async fn`: what is set up here is moved into the connection's future once, rather than
/// also kept in an async fn's copy of its arguments for the connection's whole life.
pub fn serve_inbound<IO>(
    io: IO,
    peer: Peer,
    http: Arc<InboundHttp>,
    shared: &Shared,
    slot: Arc<ConnSlot>,
    metrics: ConnMetrics,
) -> impl std::future::Future<Output = ()> + Send + '_
where
    IO: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let deadline = peer.deadline(shared.limits.cap_connection_age);
    // Boxed: passed down through the serving futures, it would take its size in each of them.
    let revoked = Box::pin(http.authz.http_connection_revoked(&peer));
    let idle = metrics.idle.clone();
    let from_peer = FromPeer {
        slot: slot.clone(),
        port: http.authz.port(),
    };
    // Shared per connection, so a request clones one Arc, not every store and metric handle.
    let ctx = Arc::new(Conn {
        said: PeerHeaders::new(&peer, shared),
        app_share: http.h1.peer(peer.id().as_str()),
        peer,
        slot,
        metrics,
        app_h2: std::sync::OnceLock::new(),
    });
    let svc = move |req: Request<ReqBody>, call: Option<Call>| {
        let http = http.clone();
        let conn = ctx.clone();
        async move {
            // The request head has been read; the response head is sent once we return it.
            let start = std::time::Instant::now();
            let protocol = protocol_of(&req);
            let resp = inbound_request(req, &conn, &http).await;
            conn.metrics
                .request(protocol, resp.status().as_u16(), start.elapsed());
            Ok::<_, Infallible>(respond(call, resp))
        }
    };
    // One TLS record per flush instead of one per h2 frame or h1 head/body write.
    let io = meshid_runtime::io::Coalesce::new(io);
    serve_connection(io, shared, deadline, revoked, svc, (idle, Some(from_peer)))
}

/// What every request of one connection shares.
struct Conn {
    peer: Peer,
    /// The connection's place (permit, open count): an upgraded request's tunnel keeps it.
    slot: Arc<ConnSlot>,
    /// What every request of the connection tells the app about its caller, made once.
    said: PeerHeaders,
    metrics: ConnMetrics,
    /// This connection's h2 client to the app ([`InboundHttp::app_h2`]), made at its first h2
    /// call (boxed: most connections never make one, and every connection holds this).
    app_h2: std::sync::OnceLock<Box<Client<HttpConnector, ReqBody>>>,
    /// The peer identity's count of app connections carrying its requests (a quarter of
    /// `--max-app-connections` at most), shared with its other connections.
    app_share: Option<crate::bare::PeerBusy>,
}

/// The values of the headers that say who called: fixed for a connection (one peer certificate,
/// one address, and this sidecar's identity, which never changes).
struct PeerHeaders {
    xfcc: Option<HeaderValue>,
    forwarded_for: Option<HeaderValue>,
    forwarded: Option<HeaderValue>,
}

impl PeerHeaders {
    fn new(peer: &Peer, shared: &Shared) -> Self {
        let own = shared.creds.current();
        let own = own.as_ref().map_or("", |s| s.identity.id.as_str());
        let xfcc = HeaderValue::from_str(&format!(
            "By={own};Hash={};URI={}",
            peer.verified.cert_sha256, peer.verified.id
        ))
        .ok();
        let ip = peer.addr.ip().to_canonical();
        let forwarded = match ip {
            std::net::IpAddr::V4(v4) => format!("for={v4};proto=https"),
            std::net::IpAddr::V6(v6) => format!("for=\"[{v6}]\";proto=https"),
        };
        Self {
            xfcc,
            forwarded_for: HeaderValue::from_str(&ip.to_string()).ok(),
            forwarded: HeaderValue::from_str(&forwarded).ok(),
        }
    }

    fn set(&self, headers: &mut http::HeaderMap) {
        static FORWARDED_FOR: header::HeaderName =
            header::HeaderName::from_static("x-forwarded-for");
        static FORWARDED_PROTO: header::HeaderName =
            header::HeaderName::from_static("x-forwarded-proto");
        // Room for the four at once: a map parsed from a request is sized to the headers it
        // carried, and growing it header by header rehashed it twice a request. It holds at most
        // hyper's 100 headers, far below the map's limit; were the room refused, the inserts
        // below would still grow it as needed.
        let _ = headers.try_reserve(4);
        if let Some(v) = &self.xfcc {
            headers.insert(&XFCC_NAME, v.clone());
        }
        if let Some(v) = &self.forwarded_for {
            headers.insert(&FORWARDED_FOR, v.clone());
        }
        if let Some(v) = &self.forwarded {
            headers.insert(header::FORWARDED, v.clone());
        }
        headers.insert(&FORWARDED_PROTO, HeaderValue::from_static("https"));
    }
}

async fn inbound_request(
    mut req: Request<ReqBody>,
    conn: &Conn,
    http: &Arc<InboundHttp>,
) -> Response<Body> {
    let (peer, shared) = (&conn.peer, http.authz.shared());
    if let Err(denied) = http.authz.still_trusted(peer, &req) {
        return *denied;
    }
    if crate::http::has_several_hosts(req.headers()) {
        return reply(
            StatusCode::BAD_REQUEST,
            "more than one Host header: the app could read another one than the next hop".into(),
        );
    }
    if req.method() == http::Method::CONNECT {
        // A tunnel to wherever the app would open one, decided on an empty path: not passed on.
        return reply(
            StatusCode::NOT_IMPLEMENTED,
            "CONNECT is not passed on by HTTP listeners; a tunnel takes a tcp listener".into(),
        );
    }
    // Read before the request is decided: a policy change after this is decided again while the
    // response is in flight (see `Revocable`).
    let mut version = *shared.policy_changed.borrow();
    let mut overrides = Vec::new();
    // A method override is decided as the method it names (each recorded as a decision of its
    // own), in a header or in the query (`?_method=DELETE`).
    for methods in [
        crate::form::method_overrides(req.headers()),
        crate::form::query_method_overrides(req.uri().query()),
    ] {
        if let Err(refused) = decide_overrides(&req, peer, http, methods, &mut overrides) {
            return *refused;
        }
    }
    let mut audit_decision = match http.authz.request(
        peer,
        req.method().as_str(),
        req.uri().path(),
        crate::trace::traceparent(req.headers()),
    ) {
        Ok(id) => id,
        Err(denied) => return *denied,
    };
    // And one a POST's form body names (`_method`, as Rails, Laravel, Symfony and Spring read it),
    // unless the peer may use any method there: the body is read whole first, then passed on.
    // The form is judged by the headers the app will get: a `Connection` header naming
    // `Content-Type` would have it removed on the way, and the app parse the body as untyped.
    if req.method() == http::Method::POST
        && !http.authz.allows_any_method(peer, req.uri().path())
        && let Some(form) = crate::form::Form::of(&{
            let mut forwarded = req.headers().clone();
            strip_hop_by_hop(&mut forwarded, false);
            forwarded
        })
    {
        let audit = http.authz.audits();
        // Boxed: only form posts read a body here, and inline its future would size every
        // request's.
        if let Err(refused) = Box::pin(decide_form(
            &mut req,
            form,
            peer,
            http,
            shared,
            &mut overrides,
            audit,
        ))
        .await
        {
            return refused;
        }
        // Held while its body came: what was applied meanwhile decides it again.
        match decide_again(&req, peer, http, version, &overrides) {
            Ok(None) => {}
            Ok(Some(again)) => (version, audit_decision) = (again.version, again.audit_decision),
            Err(refused) => return *refused,
        }
    }
    let decided = super::authz::Decided {
        version,
        method: req.method().clone(),
        overrides,
        uri: req.uri().clone(),
    };

    // WebSocket is the one upgrade passed on, and only its handshake as RFC 6455 has it: a `GET`
    // without a body, whose method nothing overrides. Any other `Upgrade` is dropped below with the
    // other hop-by-hop headers, and the request is served as a plain one. (An upgrade with a body
    // would have the app answer 101 while the body, a tunnel in all but name, went on flowing to
    // it past the tunnel's watch; one whose method an override changes would be decided again as
    // its own method only.)
    let upgrade = is_upgrade(&req)
        && upgrades_to_websocket(req.headers())
        && req.method() == http::Method::GET
        && hyper::body::Body::is_end_stream(req.body())
        && decided.overrides.is_empty();
    let opened_by = upgrade.then(|| {
        (
            req.method().as_str().to_owned(),
            req.uri().path().to_owned(),
        )
    });
    // Only an h2 request goes to the app over h2 (gRPC, or the sidecars' hint): an HTTP/1.1 peer
    // connection asking for it would get an h2 connection to the app of its own, outside the
    // caps on h2 peer connections that bound those (each holding up to a 256 KiB window).
    let to_h2 = req.version() == Version::HTTP_2
        && (is_grpc(req.headers()) || req.headers().contains_key(&APP_H2_HINT_NAME));
    let head_wait = HeadWait::of(req.version(), req.headers(), shared.limits.request_timeout);
    let bodiless = hyper::body::Body::is_end_stream(req.body());
    // Only we say who the peer is: not in its trailers either.
    req.body_mut().strip_peer_trailers();
    let headers = req.headers_mut();
    strip_hop_by_hop(headers, upgrade);
    headers.remove(&APP_H2_HINT_NAME);
    // Only we say who the peer is.
    strip_peer_headers(headers);
    conn.said.set(headers);
    if !headers.contains_key(header::HOST)
        && let Some(v) = req
            .uri()
            .authority()
            .and_then(|a| HeaderValue::from_str(a.as_str()).ok())
    {
        req.headers_mut().insert(header::HOST, v);
    }
    let pq = req
        .uri()
        .path_and_query()
        .cloned()
        .unwrap_or_else(|| http::uri::PathAndQuery::from_static("/"));
    if !to_h2 && !req.headers().contains_key(header::HOST) {
        // No host from the peer at all: name the app, as an HTTP/1.1 request must.
        let app = HeaderValue::from_str(http.authority.as_str()).ok();
        if let Some(v) = app {
            req.headers_mut().insert(header::HOST, v);
        }
    }
    // HTTP/1.1 to the app takes the origin form (`/path?query`); h2 takes the app's address as
    // `:authority`.
    let uri = if to_h2 {
        http::Uri::builder()
            .scheme(http::uri::Scheme::HTTP)
            .authority(http.authority.clone())
            .path_and_query(pq)
            .build()
    } else {
        http::Uri::builder().path_and_query(pq).build()
    };
    match uri {
        Ok(uri) => *req.uri_mut() = uri,
        Err(_) => {
            return reply(StatusCode::BAD_REQUEST, "bad request target".into());
        }
    }
    let tunnel = opened_by.map(|(method, path)| {
        let authz = http.authz.clone();
        let peer = peer.clone();
        Tunnel {
            client: hyper::upgrade::on(&mut req),
            slot: conn.slot.clone(),
            deadline: peer.deadline(shared.limits.cap_connection_age),
            revoked: Box::pin(async move {
                authz.revoked(&peer, Some((&method, &path)), version).await;
            }),
        }
    });
    if !to_h2 && req.version() == Version::HTTP_2 {
        crate::http::join_cookies(req.headers_mut());
    }
    *req.version_mut() = if to_h2 {
        Version::HTTP_2
    } else {
        Version::HTTP_11
    };
    // For h2 the original host travels as a `host` header beside `:authority` (the app's address).
    let sent = async {
        if to_h2 {
            let h2 = conn.app_h2.get_or_init(|| Box::new(http.app_h2()));
            match h2.request(req).await {
                Ok(resp) => Ok(resp.map(|b| {
                    b.map_frame(crate::http::strip_sidecar_trailers)
                        .map_err(BoxError::from)
                        .boxed()
                })),
                Err(error) => Err(root_cause(&error)),
            }
        } else {
            http.h1.request_for(req, conn.app_share.as_ref()).await
        }
    };
    let timed_out = |wait| {
        reply(
            StatusCode::GATEWAY_TIMEOUT,
            format!("the app did not answer within {wait:?}"),
        )
    };
    let answered = head_wait.run(sent, timed_out);
    let grpc = !matches!(head_wait, HeadWait::Timeout(_));
    let answered = if bodiless && !grpc {
        answered.await
    } else {
        // While its body streams to the app (an upload), or a gRPC call waits for its head as
        // long as its deadline says (a client stream still sending, say), a policy change that no
        // longer allows the request ends it, as it ends a response in flight (`Revocable`): the
        // body stops there.
        let revoked = http
            .authz()
            .request_revoked(peer.verified.clone(), decided.clone());
        tokio::select! {
            answered = answered => answered,
            () = revoked => Err(if grpc {
                crate::http::grpc_reply(
                    crate::http::GRPC_PERMISSION_DENIED,
                    "the policy no longer allows this call",
                )
            } else {
                reply(
                    StatusCode::FORBIDDEN,
                    "the policy no longer allows this request; its body was not passed on whole"
                        .into(),
                )
            }),
        }
    };
    let resp = match answered {
        Err(timed_out) => return timed_out,
        Ok(Err(error)) if error == crate::bare::PEER_BUSY => {
            return reply(
                StatusCode::SERVICE_UNAVAILABLE,
                format!(
                    "this caller's requests are holding {} connections to the app, its share \
                     (a quarter of --max-app-connections, once half of them are in use); try \
                     again later",
                    http.h1.peer_share()
                ),
            );
        }
        Ok(Err(error)) if error == crate::bare::BUSY => {
            return reply(
                StatusCode::SERVICE_UNAVAILABLE,
                format!(
                    "{} connections to the app are carrying requests \
                     (--max-app-connections); try again later",
                    shared.limits.max_app_connections
                ),
            );
        }
        Ok(Err(error)) => {
            if let Some(left_out) = super::APP_FAILED.take() {
                tracing::warn!(%error, app_addr = %http.target, left_out, "app request failed");
            }
            return reply(
                StatusCode::BAD_GATEWAY,
                format!("the request to the app failed: {error}"),
            );
        }
        Ok(Ok(mut resp)) => {
            crate::http::strip_sidecar_headers(resp.headers_mut());
            resp
        }
    };
    // A response still to come (not an upgrade: its tunnel is ended by its own watch) ends when a
    // policy change no longer allows the request.
    let resp = if resp.status() != StatusCode::SWITCHING_PROTOCOLS
        && !hyper::body::Body::is_end_stream(resp.body())
    {
        resp.map(|body| {
            super::revocable::Revocable::new(body, http.clone(), peer.verified.clone(), decided)
                .boxed()
        })
    } else {
        resp
    };
    let mut resp = finish_response(resp, tunnel, shared);
    // An audit-mode would-deny: the caller sees the ID of the decision that would have refused it.
    if let Some(v) = audit_decision.and_then(|id| HeaderValue::from_str(&id).ok()) {
        resp.headers_mut().insert(super::authz::DECISION_HEADER, v);
    }
    resp
}
