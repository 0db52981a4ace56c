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

/// Serves admin requests until shutdown. `annotations` is the downward-API annotations file, whose
/// `meshid.io/app-probes` lets `/app-health/<container>/<kind>` forward kubelet probes to the app.
pub async fn serve(
    listener: TcpListener,
    registry: Arc<Registry>,
    shared: Shared,
    needs_policy: bool,
    annotations: Option<std::path::PathBuf>,
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
        let annotations = annotations.clone();
        tokio::spawn(async move {
            let svc = service_fn(move |req: Request<Incoming>| {
                let probe = req
                    .uri()
                    .path()
                    .strip_prefix("/app-health/")
                    .map(str::to_owned);
                let resp = match probe {
                    Some(_) => None,
                    None => Some(route(&req, &registry, &shared, needs_policy)),
                };
                let annotations = annotations.clone();
                async move {
                    Ok::<_, Infallible>(match (resp, probe) {
                        (Some(r), _) => r,
                        (None, Some(key)) => app_health(annotations.as_deref(), &key).await,
                        (None, None) => text(StatusCode::NOT_FOUND, "not found\n".into()),
                    })
                }
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

/// Forwards a kubelet probe, moved here by the injector, to the app's original probe endpoint.
async fn app_health(annotations: Option<&std::path::Path>, key: &str) -> Response<Full<Bytes>> {
    let probe = annotations
        .and_then(|p| std::fs::read_to_string(p).ok())
        .and_then(|t| crate::annotations::parse_downward_api(&t).ok())
        .and_then(|a| crate::annotations::app_probe(&a, key));
    let Some(probe) = probe else {
        return text(StatusCode::NOT_FOUND, format!("no app probe {key:?}\n"));
    };
    if !probe.scheme.eq_ignore_ascii_case("http") {
        return text(
            StatusCode::BAD_GATEWAY,
            "only HTTP app probes are forwarded\n".into(),
        );
    }
    let request = async {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let mut s = tokio::net::TcpStream::connect(("127.0.0.1", probe.port)).await?;
        let mut head = format!(
            "GET {} HTTP/1.1\r\nHost: 127.0.0.1:{}\r\n",
            probe.path, probe.port
        );
        for (k, v) in &probe.headers {
            if !k.contains(['\r', '\n']) && !v.contains(['\r', '\n']) {
                head.push_str(&format!("{k}: {v}\r\n"));
            }
        }
        head.push_str("Connection: close\r\n\r\n");
        s.write_all(head.as_bytes()).await?;
        let mut buf = vec![0u8; 1024];
        let n = s.read(&mut buf).await?;
        let line = String::from_utf8_lossy(&buf[..n]).into_owned();
        Ok::<_, std::io::Error>(
            line.split_whitespace()
                .nth(1)
                .and_then(|c| c.parse::<u16>().ok())
                .unwrap_or(502),
        )
    };
    match tokio::time::timeout(std::time::Duration::from_secs(5), request).await {
        Ok(Ok(code)) => text(
            StatusCode::from_u16(code).unwrap_or(StatusCode::BAD_GATEWAY),
            format!("app answered {code}\n"),
        ),
        Ok(Err(e)) => text(
            StatusCode::SERVICE_UNAVAILABLE,
            format!("app unreachable: {e}\n"),
        ),
        Err(_) => text(
            StatusCode::SERVICE_UNAVAILABLE,
            "app probe timed out\n".into(),
        ),
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
