//! The webhook's HTTPS server: `POST /inject` (namespace not opted in) and `POST /inject-namespace`
//! (namespace labelled `meshid.io/inject=enabled`) answer AdmissionReviews (pod CREATE: inject;
//! pod UPDATE: validate the meshid annotations); `GET /healthz` answers probes. Its serving certificate (from `meshid-ca webhook-cert`, see [`super::serving`]) chains
//! to our CA's roots, so the webhook configuration's `caBundle` is the mesh trust bundle.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use arc_swap::ArcSwap;
use bytes::Bytes;
use http::{Method, Request, Response, StatusCode};
use http_body_util::{BodyExt, Full, Limited};
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo};
use rustls::ServerConfig;
use tokio::net::TcpListener;
use tokio_rustls::TlsAcceptor;

use super::metrics::InjectorMetrics;
use super::{InjectConfig, Scope, review};

/// Largest AdmissionReview accepted (the API server's own request limit is 3 MiB).
pub const MAX_BODY_BYTES: usize = 4 * 1024 * 1024;
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

/// Serves the webhook on `listener` until the process ends. Each review uses the configuration
/// current when it arrives (the trust bundle in it is reloaded while running).
pub async fn serve(
    listener: TcpListener,
    tls: Arc<ServerConfig>,
    config: Arc<ArcSwap<InjectConfig>>,
    metrics: Arc<InjectorMetrics>,
) {
    let acceptor = TlsAcceptor::from(tls);
    loop {
        let (tcp, peer) = meshid_runtime::net::accept_retrying(&listener, "webhook").await;
        let acceptor = acceptor.clone();
        let config = config.clone();
        let metrics = metrics.clone();
        tokio::spawn(async move {
            let tls = match tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor.accept(tcp)).await {
                Ok(Ok(tls)) => tls,
                Ok(Err(error)) => {
                    tracing::debug!(%error, %peer, "tls handshake failed");
                    return;
                }
                Err(_) => return,
            };
            let service = service_fn(move |req| handle(req, config.clone(), metrics.clone(), peer));
            let builder = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new());
            if let Err(error) = builder.serve_connection(TokioIo::new(tls), service).await {
                tracing::debug!(%error, %peer, "connection ended with an error");
            }
        });
    }
}

async fn handle(
    req: Request<Incoming>,
    config: Arc<ArcSwap<InjectConfig>>,
    metrics: Arc<InjectorMetrics>,
    peer: SocketAddr,
) -> Result<Response<Full<Bytes>>, Infallible> {
    let scope = match (req.method(), req.uri().path()) {
        (&Method::GET, "/healthz") => return Ok(text(StatusCode::OK, "ok\n")),
        (&Method::POST, "/inject") => Scope::Pod,
        (&Method::POST, "/inject-namespace") => Scope::Namespace,
        _ => return Ok(text(StatusCode::NOT_FOUND, "not found\n")),
    };
    let body = match Limited::new(req.into_body(), MAX_BODY_BYTES)
        .collect()
        .await
    {
        Ok(body) => body.to_bytes(),
        Err(_) => {
            metrics.bad_request();
            return Ok(text(StatusCode::PAYLOAD_TOO_LARGE, "request too large\n"));
        }
    };
    let Ok(input) = serde_json::from_slice::<serde_json::Value>(&body) else {
        metrics.bad_request();
        return Ok(text(StatusCode::BAD_REQUEST, "not JSON\n"));
    };
    let output = review(&config.load(), scope, &input);
    metrics.review(&output);
    let response = &output["response"];
    tracing::info!(
        %peer,
        uid = %response["uid"],
        operation = %input.pointer("/request/operation").unwrap_or(&serde_json::Value::Null),
        namespace = %input.pointer("/request/namespace").unwrap_or(&serde_json::Value::Null),
        allowed = %response["allowed"],
        patched = response.get("patch").is_some(),
        message = %response.pointer("/status/message").unwrap_or(&serde_json::Value::Null),
        "admission review"
    );
    let mut out = Response::new(Full::new(Bytes::from(output.to_string())));
    out.headers_mut().insert(
        http::header::CONTENT_TYPE,
        http::HeaderValue::from_static("application/json"),
    );
    Ok(out)
}

fn text(status: StatusCode, body: &'static str) -> Response<Full<Bytes>> {
    let mut r = Response::new(Full::new(Bytes::from_static(body.as_bytes())));
    *r.status_mut() = status;
    r
}
