//! The one admin HTTP server every meshid process runs (plain HTTP/1.1, GET and HEAD only):
//! `/healthz` (the process is up), `/readyz` (the process's own readiness, with the reason when it is
//! not ready), `/metrics` (the registry it is given, in OpenMetrics 1.0.0 or, for a scraper whose
//! `Accept` prefers `text/plain`, Prometheus text 0.0.4: [`crate::exposition`]), and whatever further routes
//! the process adds through [`AdminRoutes::route`] (JSON documents, forwarded probes).

use std::convert::Infallible;
use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use http::{Method, Request, Response, StatusCode, header};
use http_body_util::Full;
use hyper::body::{Bytes, Incoming};
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper_util::rt::{TokioIo, TokioTimer};
use prometheus_client::registry::Registry;
use tokio::net::TcpListener;
use tokio::sync::watch;

use crate::admission::{Admission, Displaceable};
use crate::exposition::Format;

/// An admin response.
pub type AdminResponse = Response<Full<Bytes>>;
/// A route's answer, computed later (e.g. a forwarded probe).
pub type AdminFuture = Pin<Box<dyn Future<Output = AdminResponse> + Send>>;

/// What one process adds to the shared routes.
pub trait AdminRoutes: Send + Sync + 'static {
    /// Why the process is not ready, or `None` when it is.
    fn not_ready(&self) -> Option<String>;

    /// Whether this server answers `/metrics` (a process may serve them on another port).
    fn serves_metrics(&self) -> bool {
        true
    }

    /// Whether `path` is answered only to callers on this host's loopback (routes that name peers
    /// and what they asked for); anyone else gets 403. In a pod, `kubectl port-forward` and
    /// `kubectl exec` arrive on loopback.
    fn loopback_only(&self, path: &str) -> bool {
        let _ = path;
        false
    }

    /// Refuses a request for `path` from `peer` that lacks a credential the route needs (checked
    /// before [`route`](Self::route); never asked for `/healthz`, `/readyz` or `/metrics`), or
    /// `None` to let it through.
    fn refuse(
        &self,
        path: &str,
        headers: &http::HeaderMap,
        peer: SocketAddr,
    ) -> Option<AdminResponse> {
        let _ = (path, headers, peer);
        None
    }

    /// Answers a path beyond `/healthz`, `/readyz` and `/metrics` asked by `peer` with `headers`
    /// (a route may sign its answer for the request), or `None` for 404.
    fn route(
        &self,
        path: &str,
        headers: &http::HeaderMap,
        peer: SocketAddr,
    ) -> Option<AdminFuture> {
        let _ = (path, headers, peer);
        None
    }
}

/// The time a client has to send its request head; admin clients are probes and scrapers.
const HEADER_TIMEOUT: Duration = Duration::from_secs(5);
/// The largest request head the admin server reads.
const MAX_HEAD_BYTES: usize = 16 * 1024;

/// The longest an admin connection stays open: its request head ([`HEADER_TIMEOUT`]), the slowest
/// route (a forwarded app probe waits up to 5 s) and writing the answer. A client that stops reading
/// a large answer is closed then.
const CONNECTION_DEADLINE: Duration = Duration::from_secs(15);

/// Connections open at once. Every connection serves one request and closes (probes and scrapes
/// are one request each; a scraper's reconnect every interval costs nothing), and no connection is
/// ever proven (see [`crate::admission`]): at the cap a newcomer takes the place of the oldest
/// connection of the source holding the most, whatever state it is in (silent, sending its head,
/// waiting for a route, or writing an answer its client does not read). Any pod can reach a
/// sidecar's admin port, where the kubelet's probes go; so a client that filled every slot with
/// connections that each sent a request (keep-alive ones between requests, or ones asking for a
/// large answer and never reading it) would keep the probes out if such connections kept their
/// slots, and the kubelet would restart the pod.
pub const MAX_CONNECTIONS: usize = 256;

/// Serves admin requests on `listener` until `shutdown` turns true.
pub async fn serve(
    listener: TcpListener,
    registry: Arc<Registry>,
    routes: Arc<dyn AdminRoutes>,
    mut shutdown: watch::Receiver<bool>,
) {
    let admission = Admission::new(MAX_CONNECTIONS, None);
    while let Some((tcp, addr)) = crate::net::accept(&listener, &mut shutdown, "admin").await {
        let admitted = match admission.admit(addr.ip()) {
            Ok(admitted) => admitted,
            Err(_) => {
                tracing::debug!(%addr, "admin connection limit reached; refusing");
                continue;
            }
        };
        let registry = registry.clone();
        let routes = routes.clone();
        tokio::spawn(async move {
            // Held, never proven, until the connection ends: its slot.
            let _ticket = admitted.ticket;
            let tcp = Displaceable::new(tcp, admitted.displacement);
            let svc = service_fn(move |req: Request<Incoming>| {
                let answer = answer(&req, addr, &registry, routes.as_ref());
                async move {
                    Ok::<_, Infallible>(match answer {
                        Answer::Now(r) => r,
                        Answer::Later(f) => f.await,
                    })
                }
            });
            let conn = http1::Builder::new()
                .timer(TokioTimer::new())
                .header_read_timeout(HEADER_TIMEOUT)
                .max_buf_size(MAX_HEAD_BYTES)
                .keep_alive(false)
                .serve_connection(TokioIo::new(tcp), svc);
            let _ = tokio::time::timeout(CONNECTION_DEADLINE, conn).await;
        });
    }
}

enum Answer {
    Now(AdminResponse),
    Later(AdminFuture),
}

fn answer<B>(
    req: &Request<B>,
    peer: SocketAddr,
    registry: &Registry,
    routes: &dyn AdminRoutes,
) -> Answer {
    if req.method() != Method::GET && req.method() != Method::HEAD {
        return Answer::Now(text(StatusCode::METHOD_NOT_ALLOWED, "method not allowed\n"));
    }
    if !peer.ip().to_canonical().is_loopback() && routes.loopback_only(req.uri().path()) {
        return Answer::Now(text(
            StatusCode::FORBIDDEN,
            "served only to callers on the host's loopback (in a pod: kubectl port-forward or kubectl exec)\n",
        ));
    }
    Answer::Now(match req.uri().path() {
        "/healthz" => text(StatusCode::OK, "ok\n"),
        "/readyz" => match routes.not_ready() {
            None => text(StatusCode::OK, "ready\n"),
            Some(why) => text(
                StatusCode::SERVICE_UNAVAILABLE,
                format!("not ready: {why}\n"),
            ),
        },
        "/metrics" if routes.serves_metrics() => metrics(
            registry,
            crate::exposition::negotiate(
                req.headers()
                    .get_all(header::ACCEPT)
                    .iter()
                    .map(|v| v.as_bytes()),
            ),
        ),
        path => match routes
            .refuse(path, req.headers(), peer)
            .map(Answer::Now)
            .or_else(|| routes.route(path, req.headers(), peer).map(Answer::Later))
        {
            Some(answer) => return answer,
            None => text(StatusCode::NOT_FOUND, "not found\n"),
        },
    })
}

fn metrics(registry: &Registry, format: Format) -> AdminResponse {
    let mut body = String::new();
    if prometheus_client::encoding::text::encode(&mut body, registry).is_err() {
        return text(StatusCode::INTERNAL_SERVER_ERROR, "encoding failed\n");
    }
    if format == Format::PrometheusText {
        body = crate::exposition::to_prometheus_text(&body);
    }
    let mut resp = with_type(StatusCode::OK, body, format.content_type());
    // Caches between a scraper and us must keep the formats apart.
    resp.headers_mut()
        .insert(header::VARY, header::HeaderValue::from_static("accept"));
    resp
}

/// A plain-text answer.
pub fn text(status: StatusCode, body: impl Into<Bytes>) -> AdminResponse {
    with_type(status, body, "text/plain; charset=utf-8")
}

/// A JSON answer (200).
pub fn json(body: impl Into<Bytes>) -> AdminResponse {
    with_type(StatusCode::OK, body, "application/json")
}

/// An answer with a content type.
pub fn with_type(
    status: StatusCode,
    body: impl Into<Bytes>,
    content_type: &'static str,
) -> AdminResponse {
    let mut resp = Response::new(Full::new(body.into()));
    *resp.status_mut() = status;
    resp.headers_mut().insert(
        header::CONTENT_TYPE,
        header::HeaderValue::from_static(content_type),
    );
    resp
}

/// A route answered at once.
pub fn ready(resp: AdminResponse) -> AdminFuture {
    Box::pin(std::future::ready(resp))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::http_client::{Call, send};

    struct Routes;

    /// An answer larger than the socket buffers of a client that does not read take.
    static BIG: std::sync::LazyLock<Bytes> =
        std::sync::LazyLock::new(|| Bytes::from(vec![b' '; 16 << 20]));

    impl AdminRoutes for Routes {
        fn not_ready(&self) -> Option<String> {
            Some("no certificate loaded".into())
        }

        fn loopback_only(&self, path: &str) -> bool {
            path == "/private"
        }

        fn route(
            &self,
            path: &str,
            _headers: &http::HeaderMap,
            _peer: SocketAddr,
        ) -> Option<AdminFuture> {
            match path {
                "/doc" => Some(ready(json("{\"a\":1}"))),
                "/private" => Some(ready(json("{\"peers\":[]}"))),
                "/big" => Some(ready(json(BIG.clone()))),
                _ => None,
            }
        }
    }

    fn status_for(path: &str, peer: &str) -> StatusCode {
        let req = Request::get(path).body(()).unwrap();
        let peer: SocketAddr = peer.parse().unwrap();
        match answer(&req, peer, &Registry::default(), &Routes) {
            Answer::Now(r) => r.status(),
            Answer::Later(_) => StatusCode::OK,
        }
    }

    /// A loopback-only route answers callers on loopback (IPv4, IPv6, IPv4-mapped) and refuses
    /// everyone else with 403; the other routes answer anyone.
    #[test]
    fn loopback_only_routes_refuse_other_callers() {
        for local in [
            "127.0.0.1:5000",
            "127.3.4.5:5000",
            "[::1]:5000",
            "[::ffff:127.0.0.1]:5000",
        ] {
            assert_eq!(status_for("/private", local), StatusCode::OK, "{local}");
        }
        for remote in ["10.0.3.7:5000", "[fd00::7]:5000", "[::ffff:10.0.3.7]:5000"] {
            assert_eq!(
                status_for("/private", remote),
                StatusCode::FORBIDDEN,
                "{remote}"
            );
            assert_eq!(status_for("/doc", remote), StatusCode::OK, "{remote}");
            assert_eq!(status_for("/healthz", remote), StatusCode::OK, "{remote}");
        }
    }

    #[tokio::test]
    async fn shared_routes_and_added_ones() {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let (tx, rx) = watch::channel(false);
        let mut registry = Registry::default();
        let counter = prometheus_client::metrics::counter::Counter::<u64>::default();
        registry.register("meshid_test", "a test counter", counter.clone());
        counter.inc();
        let server = tokio::spawn(serve(listener, Arc::new(registry), Arc::new(Routes), rx));
        let fetch = |path: &'static str| async move { send(&Call::get(addr, path)).await.unwrap() };
        let r = fetch("/healthz").await;
        assert_eq!((r.status, &r.body[..]), (200, &b"ok\n"[..]));
        let r = fetch("/readyz").await;
        assert_eq!(r.status, 503);
        assert_eq!(&r.body[..], b"not ready: no certificate loaded\n");
        let r = fetch("/metrics").await;
        assert!(String::from_utf8_lossy(&r.body).contains("meshid_test_total 1"));
        assert_eq!(
            r.headers[header::CONTENT_TYPE],
            crate::exposition::OPENMETRICS
        );
        assert!(String::from_utf8_lossy(&r.body).ends_with("# EOF\n"));
        let headers = [(
            "accept".to_owned(),
            "application/openmetrics-text;q=0.5,text/plain;version=0.0.4;q=0.6".to_owned(),
        )];
        let mut call = Call::get(addr, "/metrics");
        call.headers = &headers;
        let r = send(&call).await.unwrap();
        assert_eq!(
            r.headers[header::CONTENT_TYPE],
            crate::exposition::PROMETHEUS_TEXT
        );
        assert_eq!(
            String::from_utf8_lossy(&r.body),
            "# HELP meshid_test_total a test counter.\n# TYPE meshid_test_total counter\nmeshid_test_total 1\n"
        );
        let r = fetch("/doc").await;
        assert_eq!((r.status, &r.body[..]), (200, &b"{\"a\":1}"[..]));
        assert_eq!(fetch("/nope").await.status, 404);
        tx.send_replace(true);
        server.await.unwrap();
    }

    /// Twice the cap of silent and half-sent connections: probes are still answered (each displaces
    /// the oldest connection with no whole request head), and the server holds at most the cap.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn probes_are_answered_while_silent_connections_flood_the_cap() {
        use tokio::io::AsyncWriteExt;
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let (tx, rx) = watch::channel(false);
        let server = tokio::spawn(serve(
            listener,
            Arc::new(Registry::default()),
            Arc::new(Routes),
            rx,
        ));
        let mut flood = Vec::new();
        for i in 0..2 * MAX_CONNECTIONS {
            let mut tcp = tokio::net::TcpStream::connect(addr).await.unwrap();
            if i % 2 == 0 {
                tcp.write_all(b"GET /healthz HTTP/1.1\r\nHo").await.unwrap();
            }
            flood.push(tcp);
        }
        for _ in 0..5 {
            let r =
                tokio::time::timeout(Duration::from_secs(5), send(&Call::get(addr, "/healthz")))
                    .await
                    .expect("a probe is answered within 5 s while the flood is held")
                    .unwrap();
            assert_eq!(r.status, 200);
        }
        // Every flood connection past the cap was closed by the server: at most the cap stay open.
        // Looked at well within the 5 s head timeout, which would close them all.
        tokio::time::sleep(Duration::from_millis(300)).await;
        let mut closed = 0;
        for tcp in &flood {
            let mut b = [0u8; 1];
            match tcp.try_read(&mut b) {
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {}
                _ => closed += 1,
            }
        }
        assert!(
            closed >= MAX_CONNECTIONS,
            "only {closed} of {} flood connections closed",
            flood.len()
        );
        tx.send_replace(true);
        server.await.unwrap();
    }

    /// A client connection from `source` (a loopback address of its own) to `addr`.
    async fn connect_from(source: &str, addr: SocketAddr) -> tokio::net::TcpStream {
        let socket = tokio::net::TcpSocket::new_v4().unwrap();
        socket
            .bind(SocketAddr::new(source.parse().unwrap(), 0))
            .unwrap();
        // A small window: a large answer stalls in the server's write.
        socket.set_recv_buffer_size(4096).unwrap();
        socket.connect(addr).await.unwrap()
    }

    /// Any pod can reach a sidecar's admin port, where the kubelet's probes go. A client that fills
    /// every slot with connections that each sent a whole request (a keep-alive client between
    /// requests, one that asks for a large answer and never reads it) must not keep the probes out:
    /// a connection serves one request and closes, and one whose answer stalls is displaced by a
    /// newcomer as a silent one is.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn probes_are_answered_while_finished_and_stalled_requests_fill_the_cap() {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let listener = TcpListener::bind("0.0.0.0:0").await.unwrap();
        let addr = SocketAddr::from(([127, 0, 0, 1], listener.local_addr().unwrap().port()));
        let (tx, rx) = watch::channel(false);
        let server = tokio::spawn(serve(
            listener,
            Arc::new(Registry::default()),
            Arc::new(Routes),
            rx,
        ));
        let probe = || async {
            let mut tcp = connect_from("127.0.0.3", addr).await;
            tcp.write_all(b"GET /healthz HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
                .await
                .unwrap();
            let mut answer = Vec::new();
            let _ =
                tokio::time::timeout(Duration::from_secs(5), tcp.read_to_end(&mut answer)).await;
            String::from_utf8_lossy(&answer).into_owned()
        };
        // Keep-alive clients, each after a whole request and its answer.
        let mut held = Vec::new();
        for _ in 0..MAX_CONNECTIONS {
            let mut tcp = connect_from("127.0.0.2", addr).await;
            tcp.write_all(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
                .await
                .unwrap();
            let mut b = [0u8; 512];
            let n = tcp.read(&mut b).await.unwrap();
            assert!(b[..n].starts_with(b"HTTP/1.1 200"));
            held.push(tcp);
        }
        for _ in 0..3 {
            let answer = probe().await;
            assert!(
                answer.starts_with("HTTP/1.1 200"),
                "probe answered: {answer:?}"
            );
        }
        // Clients that ask for a large answer and never read it.
        let mut stalled = Vec::new();
        for _ in 0..MAX_CONNECTIONS {
            let mut tcp = connect_from("127.0.0.2", addr).await;
            tcp.write_all(b"GET /big HTTP/1.1\r\nHost: x\r\n\r\n")
                .await
                .unwrap();
            stalled.push(tcp);
        }
        tokio::time::sleep(Duration::from_millis(300)).await;
        for _ in 0..3 {
            let answer = probe().await;
            assert!(
                answer.starts_with("HTTP/1.1 200"),
                "probe answered: {answer:?}"
            );
        }
        drop((held, stalled));
        tx.send_replace(true);
        server.await.unwrap();
    }
}
