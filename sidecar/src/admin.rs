//! The admin server: `/healthz` (process up), `/readyz` (valid certificate, and a policy when there
//! are inbound listeners), `/metrics` (Prometheus text) and `/identity` (nothing secret).

use std::convert::Infallible;
use std::sync::Arc;

use bytes::Bytes;
use http::{Method, Request, Response, StatusCode, header};
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper_util::rt::{TokioIo, TokioTimer};
use prometheus_client::registry::Registry;
use tokio::net::TcpListener;

use crate::conn::Shared;
use crate::inbound::unix_now;

/// Serves admin requests until shutdown.
pub async fn serve(
    listener: TcpListener,
    registry: Arc<Registry>,
    shared: Shared,
    needs_policy: bool,
) {
    let mut shutdown = shared.shutdown.clone();
    loop {
        let (tcp, _) = tokio::select! {
            r = listener.accept() => match r {
                Ok(pair) => pair,
                Err(_) => continue,
            },
            () = crate::conn::stopped(&mut shutdown) => return,
        };
        let registry = registry.clone();
        let shared = shared.clone();
        tokio::spawn(async move {
            let svc = service_fn(move |req| {
                let resp = route(&req, &registry, &shared, needs_policy);
                async move { Ok::<_, Infallible>(resp) }
            });
            let _ = http1::Builder::new()
                .timer(TokioTimer::new())
                .header_read_timeout(std::time::Duration::from_secs(5))
                .max_buf_size(16 * 1024)
                .serve_connection(TokioIo::new(tcp), svc)
                .await;
        });
    }
}

/// Why the sidecar is not ready, if it is not.
pub fn not_ready_reason(shared: &Shared, needs_policy: bool) -> Option<&'static str> {
    match shared.creds.current() {
        None => return Some("no certificate loaded"),
        Some(s) if !s.valid_at(unix_now()) => return Some("certificate is not valid now"),
        Some(_) => {}
    }
    if needs_policy && shared.policy.load().is_none() {
        return Some("no valid policy loaded");
    }
    if *shared.shutdown.borrow() {
        return Some("shutting down");
    }
    None
}

fn route(
    req: &Request<Incoming>,
    registry: &Registry,
    shared: &Shared,
    needs_policy: bool,
) -> Response<Full<Bytes>> {
    if req.method() != Method::GET && req.method() != Method::HEAD {
        return text(
            StatusCode::METHOD_NOT_ALLOWED,
            "method not allowed\n".into(),
        );
    }
    match req.uri().path() {
        "/healthz" => text(StatusCode::OK, "ok\n".into()),
        "/readyz" => match not_ready_reason(shared, needs_policy) {
            None => text(StatusCode::OK, "ready\n".into()),
            Some(why) => text(
                StatusCode::SERVICE_UNAVAILABLE,
                format!("not ready: {why}\n"),
            ),
        },
        "/metrics" => {
            let mut body = String::new();
            match prometheus_client::encoding::text::encode(&mut body, registry) {
                Ok(()) => with_type(
                    StatusCode::OK,
                    body,
                    "application/openmetrics-text; version=1.0.0; charset=utf-8",
                ),
                Err(_) => text(
                    StatusCode::INTERNAL_SERVER_ERROR,
                    "encoding failed\n".into(),
                ),
            }
        }
        "/identity" => match shared.creds.current() {
            Some(s) => {
                let json = serde_json::json!({
                    "spiffe_id": s.identity.id.as_str(),
                    "serial": s.identity.serial_hex,
                    "not_before": s.identity.not_before,
                    "not_after": s.identity.not_after,
                    "issuer": s.identity.issuer,
                    "public_key_sha256": s.public_key_sha256,
                    "trust_anchors_sha256": s.anchor_fingerprints,
                });
                with_type(StatusCode::OK, format!("{json}\n"), "application/json")
            }
            None => text(
                StatusCode::SERVICE_UNAVAILABLE,
                "no certificate loaded\n".into(),
            ),
        },
        _ => text(StatusCode::NOT_FOUND, "not found\n".into()),
    }
}

fn text(status: StatusCode, body: String) -> Response<Full<Bytes>> {
    with_type(status, body, "text/plain; charset=utf-8")
}

fn with_type(
    status: StatusCode,
    body: String,
    content_type: &'static str,
) -> Response<Full<Bytes>> {
    let mut resp = Response::new(Full::new(Bytes::from(body)));
    *resp.status_mut() = status;
    resp.headers_mut().insert(
        header::CONTENT_TYPE,
        header::HeaderValue::from_static(content_type),
    );
    resp
}
