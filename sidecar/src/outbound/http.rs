//! Outbound HTTP: the app speaks HTTP/1.1 or h2c to a local listener; requests travel over mTLS
//! to the peer sidecar, whose identity must be the expected one (else 502 with the reason): a
//! bodiless idempotent HTTP/1.1 request that finds its listener quiet (no other request waiting
//! for an answer, requests beginning on average [`super::h1::QUIET_GAP`] apart or more) goes on a
//! pooled HTTP/1.1 connection ([`super::h1`]); all others share one multiplexed h2 connection
//! ([`super::upstream`]). Protocol upgrades need a tcp upstream.

use std::convert::Infallible;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

use http::header::{self, HeaderValue};
use http::{Request, Response, StatusCode, Version};
use http_body_util::BodyExt;
use tokio::io::{AsyncRead, AsyncWrite};

use super::h1::{H1Dial, Pace};
use super::upstream::H2Upstream;
use crate::bare::Bare;
use crate::conn::{ConnSlot, Shared};
use crate::http::{
    APP_H2_HINT_NAME, Body, Call, HeadWait, ReqBody, finish_response, is_upgrade, protocol_of,
    reply, respond, serve_connection, strip_hop_by_hop,
};
use crate::metrics::ConnMetrics;

/// One outbound HTTP listener's clients to the peer sidecar: h2, and pooled HTTP/1.1.
pub struct OutboundHttp {
    pub port: u16,
    pub remote: String,
    pub upstream: H2Upstream,
    pub(crate) h1: Arc<Bare<H1Dial>>,
    /// Requests of this listener waiting for their response head.
    pub(crate) in_flight: AtomicUsize,
    pub(crate) pace: Pace,
    /// The last `Host` checked and its authority: an app names its upstream the same way in
    /// nearly every request, so most requests compare bytes instead of parsing and copying them.
    pub(crate) last_host: std::sync::Mutex<Option<(HeaderValue, http::uri::Authority)>>,
}

/// Counts a request among its listener's [`OutboundHttp::in_flight`] until dropped.
struct InFlight<'a>(&'a AtomicUsize);

impl Drop for InFlight<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::AcqRel);
    }
}

/// Serves the app's plaintext HTTP connection on an outbound listener; every request, relayed or
/// answered by the sidecar itself, is counted and timed in `metrics` (in one place: here).
pub async fn serve_outbound<IO>(
    io: IO,
    out: Arc<OutboundHttp>,
    shared: &Shared,
    slot: Arc<ConnSlot>,
    metrics: ConnMetrics,
) where
    IO: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let idle = metrics.idle.clone();
    let ctx = Arc::new((shared.clone(), metrics, slot));
    let svc = move |req: Request<ReqBody>, call: Option<Call>| {
        let out = out.clone();
        let ctx = ctx.clone();
        // A whole request head arrived: the app's connection is no longer displaced at the limit.
        ctx.2.proven();
        async move {
            // The request head has been read; the response head is sent once we return it.
            let start = std::time::Instant::now();
            let protocol = protocol_of(&req);
            let resp = outbound_request(req, &out, &ctx.0).await;
            ctx.1
                .request(protocol, resp.status().as_u16(), start.elapsed());
            Ok::<_, Infallible>(respond(call, resp))
        }
    };
    serve_connection(io, shared, None, std::future::pending(), svc, (idle, None)).await;
}

/// The authority the upstream sees: the request's `Host` (or its URI's authority, or the upstream's
/// address), which must be a plain `host[:port]`. Anything else (a `/`, `?`, `#` or `@` in it, say)
/// would change the path or the credentials the upstream reads, so it is refused, as is a second
/// `Host` (checked or not, it would reach the upstream too).
fn upstream_authority(
    req: &Request<ReqBody>,
    out: &OutboundHttp,
) -> Result<http::uri::Authority, String> {
    // One walk of the `Host` lines gives the value and says whether there is a second one.
    let mut hosts = req.headers().get_all(header::HOST).iter();
    let host = hosts.next();
    if hosts.next().is_some() {
        return Err("more than one Host header: expected one host[:port]".into());
    }
    let Some(host) = host else {
        let raw = match req.uri().authority() {
            Some(a) => a.as_str().as_bytes(),
            None => out.remote.as_bytes(),
        };
        return parse_authority(raw);
    };
    let mut last = out.last_host.lock().unwrap_or_else(|p| p.into_inner());
    if let Some((seen, authority)) = &*last
        && seen == host
    {
        return Ok(authority.clone());
    }
    let authority = parse_authority(host.as_bytes())?;
    *last = Some((host.clone(), authority.clone()));
    Ok(authority)
}

fn parse_authority(raw: &[u8]) -> Result<http::uri::Authority, String> {
    // The message is built only for a refusal, not for every request.
    let invalid = || {
        let shown = String::from_utf8_lossy(raw);
        format!("invalid Host {shown:?}: expected host[:port]")
    };
    if raw.is_empty() || raw.contains(&b'@') {
        return Err(invalid());
    }
    http::uri::Authority::try_from(raw).map_err(|_| invalid())
}

async fn outbound_request(
    mut req: Request<ReqBody>,
    out: &OutboundHttp,
    shared: &Shared,
) -> Response<Body> {
    if is_upgrade(&req) || req.method() == http::Method::CONNECT {
        return reply(
            StatusCode::NOT_IMPLEMENTED,
            "protocol upgrades and CONNECT are not supported on outbound HTTP listeners; use a \
             tcp upstream"
                .into(),
        );
    }
    let app_h2 = req.version() == Version::HTTP_2;
    let head_wait = HeadWait::of(req.version(), req.headers(), shared.limits.request_timeout);
    // Alone, a request goes fastest on an HTTP/1.1 connection of its own (no h2 codec, no hand-over
    // to the connection's task). Among others, h2 carries them together: one TLS record and one
    // write for several, which is what keeps up under load (`super::h1`).
    let others = out.in_flight.fetch_add(1, Ordering::AcqRel);
    let _in_flight = InFlight(&out.in_flight);
    let h1 = out.pace.quiet(others) && super::h1::suits(&req);
    let authority = match upstream_authority(&req, out) {
        Ok(a) => a,
        Err(reason) => {
            return reply(StatusCode::BAD_REQUEST, reason);
        }
    };
    let pq = req
        .uri()
        .path_and_query()
        .cloned()
        .unwrap_or_else(|| http::uri::PathAndQuery::from_static("/"));
    match http::Uri::builder()
        .scheme(http::uri::Scheme::HTTP)
        .authority(authority)
        .path_and_query(pq)
        .build()
    {
        Ok(uri) => *req.uri_mut() = uri,
        Err(_) => {
            return reply(StatusCode::BAD_REQUEST, "bad request target".into());
        }
    }
    let headers = req.headers_mut();
    strip_hop_by_hop(headers, false);
    headers.remove(&APP_H2_HINT_NAME);
    let pool = &out.h1;
    let upstream = &out.upstream;
    let sending = async move {
        if h1 && !pool.dialer().declined() {
            // HTTP/1.1 carries the authority as `Host` (the one checked above, or the URI's).
            if !req.headers().contains_key(header::HOST)
                && let Some(host) = req
                    .uri()
                    .authority()
                    .and_then(|a| HeaderValue::from_str(a.as_str()).ok())
            {
                req.headers_mut().insert(header::HOST, host);
            }
            let (head, empty) = req.into_parts();
            // Boxed: its future (a TLS handshake when it dials) would otherwise swell every
            // request's, h2 ones too, and they are moved and copied as a whole.
            match Box::pin(pool.request(&head)).await {
                // Declined, or as many pooled connections busy as we may have: over h2, which
                // multiplexes.
                Err(reason) if reason == super::h1::DECLINED || reason == crate::bare::BUSY => {
                    req = Request::from_parts(head, empty);
                }
                sent => return sent,
            }
        }
        let headers = req.headers_mut();
        headers.remove(header::HOST);
        if app_h2 {
            headers.insert(&APP_H2_HINT_NAME, HeaderValue::from_static("1"));
        }
        *req.version_mut() = Version::HTTP_2;
        let resp = upstream.request(req).await?;
        Ok(resp.map(|b| b.boxed()))
    };
    // The head only: a body that then brings nothing is ended by its own watch (`super::silence`).
    let timed_out = |wait| {
        reply(
            StatusCode::GATEWAY_TIMEOUT,
            format!("upstream {} did not answer within {wait:?}", out.remote),
        )
    };
    let resp = match head_wait.run(sending, timed_out).await {
        Err(timed_out) => return timed_out,
        Ok(Err(reason)) if reason == super::upstream::SATURATED => {
            return reply(
                StatusCode::SERVICE_UNAVAILABLE,
                format!("upstream {}: {reason}", out.remote),
            );
        }
        Ok(Err(reason)) => {
            if let Some(left_out) = super::dial::UPSTREAM_FAILED.take() {
                // The reason can quote an upstream's GOAWAY debug data.
                let reason = meshid_runtime::log_limit::clip(&reason, 512);
                tracing::warn!(upstream = %out.remote, %reason, left_out, "upstream request failed");
            }
            return reply(
                StatusCode::BAD_GATEWAY,
                format!("upstream {} refused: {reason}", out.remote),
            );
        }
        Ok(Ok(resp)) => resp,
    };
    finish_response(resp, None, shared)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_a_plain_authority_reaches_the_upstream() {
        for good in [
            "backend",
            "backend:8080",
            "10.0.0.7:80",
            "[::1]:8080",
            "a.b-c.example",
        ] {
            assert_eq!(parse_authority(good.as_bytes()).unwrap().as_str(), good);
        }
        for bad in [
            "a/b?c",
            "a/b",
            "a?b",
            "a#b",
            "user@backend",
            "user:pw@backend:80",
            "",
            "a b",
            "a\\b",
        ] {
            let err = parse_authority(bad.as_bytes()).unwrap_err();
            assert!(err.starts_with("invalid Host"), "{bad:?}: {err}");
        }
    }
}
