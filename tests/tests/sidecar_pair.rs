//! Traffic through a pair of sidecars: app A -> sidecar A (outbound, plaintext on 127.0.0.1) -> mTLS ->
//! sidecar B (inbound) -> app B, for TCP, HTTP/1.1, h2 and gRPC; and upstreams with the wrong
//! identity or a hostile certificate, which the outbound side refuses.

use std::net::SocketAddr;
use std::time::Duration;

use meshid_identity::policy::Protocol;
use meshid_tests::mesh::{
    SidecarSpec, TestPki, TestSidecar, Workload, get, handshake_failure_lines, handshake_failures,
    http_echo, http_request, metric, read_request, read_response, tcp_echo,
};
use meshid_tests::pki::ForeignCa;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

const A: &str = "spiffe://cluster.local/ns/shop/sa/frontend";
const B: &str = "spiffe://cluster.local/ns/shop/sa/backend";

/// Sidecar B in front of `app` (on 127.0.0.6), allowing A; sidecar A with one upstream to B.
async fn pair(
    pki: &TestPki,
    app: SocketAddr,
    protocol: Protocol,
    expected: &str,
) -> (TestSidecar, TestSidecar) {
    let b = backend(pki, app, protocol).await;
    let a = frontend(pki, &b.inbound[0].to_string(), protocol, expected, None).await;
    (a, b)
}

/// Sidecar B in front of `app` (on 127.0.0.6), allowing A.
async fn backend(pki: &TestPki, app: SocketAddr, protocol: Protocol) -> TestSidecar {
    let proto = match protocol {
        Protocol::Tcp => "tcp",
        Protocol::Http => "http",
    };
    TestSidecar::start(
        pki,
        &pki.workload(B),
        B,
        SidecarSpec {
            inbound: vec![("127.0.0.6", app, protocol)],
            policy: Some(format!(
                "inbound:\n  - port: {{port0}}\n    protocol: {proto}\n    allow:\n      - id: {A}\n"
            )),
            ..Default::default()
        },
    )
    .await
}

/// Sidecar A with one upstream, `remote`, whose identity must be `expected`.
async fn frontend(
    pki: &TestPki,
    remote: &str,
    protocol: Protocol,
    expected: &str,
    limits: Option<meshid_sidecar::settings::Limits>,
) -> TestSidecar {
    TestSidecar::start(
        pki,
        &pki.workload(A),
        A,
        SidecarSpec {
            outbound: vec![(remote.to_string(), expected.to_string(), protocol)],
            limits,
            ..Default::default()
        },
    )
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tcp_echo_through_a_pair() {
    let pki = TestPki::new();
    let (a, _b) = pair(&pki, tcp_echo().await, Protocol::Tcp, B).await;
    let mut s = tokio::net::TcpStream::connect(a.outbound[0]).await.unwrap();
    let payload: Vec<u8> = (0..200_000u32).map(|i| (i % 251) as u8).collect();
    s.write_all(&payload).await.unwrap();
    s.shutdown().await.unwrap();
    let mut back = Vec::new();
    tokio::time::timeout(Duration::from_secs(10), s.read_to_end(&mut back))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(back, payload);
}

const TRACEPARENT: &str = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn http1_and_h2_through_a_pair() {
    let pki = TestPki::new();
    let (a, _b) = pair(&pki, http_echo().await, Protocol::Http, B).await;
    for h2 in [false, true] {
        for i in 0..3 {
            let tcp = tokio::net::TcpStream::connect(a.outbound[0]).await.unwrap();
            let (status, _, body) = http_request(
                tcp,
                h2,
                get(&format!("/orders/{i}"), &[("traceparent", TRACEPARENT)]),
            )
            .await
            .unwrap();
            assert_eq!(status, 200, "h2={h2}: {body}");
            // The trace context crosses both sidecars untouched.
            assert!(
                body.contains(&format!("traceparent={TRACEPARENT}")),
                "{body}"
            );
            // App B sees who called, and the original host.
            assert!(body.contains(&format!("URI={A}")), "{body}");
            assert!(body.contains("host=app.example"), "{body}");
            // The app side speaks what the calling app spoke.
            let want = if h2 {
                "version=HTTP/2.0"
            } else {
                "version=HTTP/1.1"
            };
            assert!(body.contains(want), "h2={h2}: {body}");
        }
    }
    let m = a.metrics().await;
    assert!(
        m.contains(r#"direction="outbound""#) && m.contains(r#"code="200""#),
        "{m}"
    );
}

/// The app's bodiless HTTP/1.1 requests with an idempotent method cross between the sidecars as
/// HTTP/1.1, one after another on one pooled connection; a request with a body, a bodiless
/// `POST` (not safe to send again) and an h2 app's requests cross on the h2 connection.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bodiless_idempotent_http1_requests_share_a_pooled_http1_connection() {
    let pki = TestPki::new();
    let (a, b) = pair(&pki, http_echo().await, Protocol::Http, B).await;
    let outbound = a.outbound[0];
    let send = |h2: bool, req: hyper::Request<http_body_util::Full<bytes::Bytes>>| async move {
        let tcp = tokio::net::TcpStream::connect(outbound).await.unwrap();
        http_request(tcp, h2, req).await.unwrap()
    };
    let with = |method: &str, path: &str, body: &'static str| {
        hyper::Request::builder()
            .method(method)
            .uri(path)
            .header("host", "app.example")
            .body(http_body_util::Full::new(bytes::Bytes::from_static(
                body.as_bytes(),
            )))
            .unwrap()
    };
    for i in 0..4 {
        let (status, _, body) = send(false, get(&format!("/get/{i}"), &[])).await;
        assert_eq!(status, 200, "{body}");
        assert!(body.starts_with(&format!("GET /get/{i}")), "{body}");
        assert!(body.contains(&format!("URI={A}")), "{body}");
        assert!(body.contains("host=app.example"), "{body}");
    }
    let (status, _, body) = send(false, with("HEAD", "/head", "")).await;
    assert_eq!((status, body.as_str()), (200, ""));
    let (status, _, body) = send(false, with("DELETE", "/item", "")).await;
    assert_eq!(status, 200, "{body}");
    assert!(body.starts_with("DELETE /item"), "{body}");
    // Over h2:
    let (status, _, body) = send(false, with("POST", "/upload", "payload")).await;
    assert_eq!(status, 200, "{body}");
    assert!(
        body.starts_with("POST /upload") && body.ends_with("payload"),
        "{body}"
    );
    let (status, _, body) = send(false, with("POST", "/empty", "")).await;
    assert_eq!(status, 200, "{body}");
    assert!(body.starts_with("POST /empty"), "{body}");
    let (status, _, body) = send(true, get("/from-h2", &[])).await;
    assert_eq!(status, 200, "{body}");
    assert!(body.contains("version=HTTP/2.0"), "{body}");

    let m = b.metrics().await;
    let inbound = r#"direction="inbound""#;
    let requests = "meshid_sidecar_requests_total{";
    assert_eq!(
        metric(&m, requests, &[inbound, r#"protocol="http1""#]),
        6,
        "{m}"
    );
    assert_eq!(
        metric(&m, requests, &[inbound, r#"protocol="h2""#]),
        3,
        "{m}"
    );
    // One HTTP/1.1 connection, used six times, and one h2 connection.
    assert_eq!(
        metric(&m, "meshid_sidecar_connections_total{", &[inbound]),
        2,
        "{m}"
    );
}

/// An HTTP/1.0 app: its bodiless requests cross on the pooled HTTP/1.1 connection like the others
/// (the app behind the inbound is asked in HTTP/1.1), and the outbound answers it as HTTP/1.0 asks:
/// without `Connection: keep-alive` the connection ends with the response; with it, the connection
/// carries the next request.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_http10_app_is_answered_as_http10_asks() {
    let pki = TestPki::new();
    let (a, b) = pair(&pki, http_echo().await, Protocol::Http, B).await;
    let within = Duration::from_secs(10);

    // No keep-alive: the whole response, then the end of the connection.
    let mut tcp = tokio::net::TcpStream::connect(a.outbound[0]).await.unwrap();
    tcp.write_all(b"GET /old HTTP/1.0\r\nHost: app.example\r\n\r\n")
        .await
        .unwrap();
    let mut all = Vec::new();
    tokio::time::timeout(within, tcp.read_to_end(&mut all))
        .await
        .expect("the connection ends after the response")
        .unwrap();
    let text = String::from_utf8_lossy(&all).into_owned();
    assert!(text.starts_with("HTTP/1.0 200 OK\r\n"), "{text}");
    let (head, body) = text.split_once("\r\n\r\n").unwrap();
    assert!(!head.to_ascii_lowercase().contains("keep-alive"), "{head}");
    assert!(body.starts_with("GET /old"), "{body}");
    assert!(body.contains("version=HTTP/1.1"), "{body}");
    assert!(body.contains(&format!("URI={A}")), "{body}");

    // Keep-alive asked for: two requests on one connection, each response framed by its length.
    let mut tcp = tokio::net::TcpStream::connect(a.outbound[0]).await.unwrap();
    let mut pending = Vec::new();
    for path in ["/kept/1", "/kept/2"] {
        let req =
            format!("GET {path} HTTP/1.0\r\nHost: app.example\r\nConnection: keep-alive\r\n\r\n");
        tcp.write_all(req.as_bytes()).await.unwrap();
        let (_, head, body) = tokio::time::timeout(within, read_response(&mut tcp, &mut pending))
            .await
            .expect("a response")
            .unwrap();
        assert!(head.starts_with("HTTP/1.0 200 OK\r\n"), "{head}");
        assert!(
            head.to_ascii_lowercase().contains("connection: keep-alive"),
            "{head}"
        );
        assert!(body.starts_with(&format!("GET {path}")), "{body}");
    }

    let m = b.metrics().await;
    let inbound = r#"direction="inbound""#;
    assert_eq!(
        metric(
            &m,
            "meshid_sidecar_requests_total{",
            &[inbound, r#"protocol="http1""#]
        ),
        3,
        "{m}"
    );
}

/// An upstream that does not agree to HTTP/1.1 in ALPN (here a TCP-mode inbound, which offers none)
/// gets every request over h2, as it did before there was an HTTP/1.1 path: the app behind it may
/// speak h2 only. The HTTP/1.1 connection is tried once, not per request (again only after
/// `DECLINE_REMEMBERED`, 5 minutes: a unit test in `sidecar/src/outbound/h1.rs`).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_upstream_that_does_not_agree_to_http1_gets_every_request_over_h2() {
    let pki = TestPki::new();
    let b = backend(&pki, http_echo().await, Protocol::Tcp).await;
    let a = frontend(&pki, &b.inbound[0].to_string(), Protocol::Http, B, None).await;
    for i in 0..4 {
        let tcp = tokio::net::TcpStream::connect(a.outbound[0]).await.unwrap();
        let (status, _, body) = http_request(tcp, false, get(&format!("/get/{i}"), &[]))
            .await
            .unwrap();
        assert_eq!(status, 200, "{body}");
        assert!(body.starts_with(&format!("GET /get/{i}")), "{body}");
        assert!(body.contains("version=HTTP/2.0"), "{body}");
    }
    // The declined HTTP/1.1 connection and the h2 one.
    let m = b.metrics().await;
    assert_eq!(
        metric(
            &m,
            "meshid_sidecar_connections_total{",
            &[r#"direction="inbound""#]
        ),
        2,
        "{m}"
    );
}

/// Bodies larger than every flow-control window on the way (h2's 64 KiB default, the 1 MiB the
/// outbound grants per stream) stream through in both directions, from an HTTP/1.1 and an h2 app.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bodies_larger_than_the_windows_stream_both_ways() {
    let pki = TestPki::new();
    let (a, _b) = pair(&pki, http_echo().await, Protocol::Http, B).await;
    let payload: String = (0..3 * 1024 * 1024u32)
        .map(|i| char::from(b'a' + (i % 26) as u8))
        .collect();
    for h2 in [false, true] {
        let tcp = tokio::net::TcpStream::connect(a.outbound[0]).await.unwrap();
        let req = hyper::Request::post("/upload")
            .header("host", "app.example")
            .body(http_body_util::Full::new(bytes::Bytes::from(
                payload.clone(),
            )))
            .unwrap();
        let (status, _, body) =
            tokio::time::timeout(Duration::from_secs(30), http_request(tcp, h2, req))
                .await
                .expect("the upload finishes")
                .unwrap();
        assert_eq!(status, 200, "h2={h2}");
        let (line, echoed) = body.split_once('\n').unwrap();
        assert!(line.starts_with("POST /upload"), "h2={h2}: {line}");
        assert!(
            echoed == payload,
            "h2={h2}: {} bytes echoed of {}",
            echoed.len(),
            payload.len()
        );
    }
}

/// A TCP relay to `to` whose open connections can be frozen (`freeze.send_modify(|n| *n += 1)`):
/// bytes stop in both directions and the sockets stay open, as when a host vanishes without a FIN
/// or RST. Connections accepted after a freeze pass bytes again.
async fn freezable_relay(to: SocketAddr) -> (SocketAddr, tokio::sync::watch::Sender<u64>) {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let (freeze, epochs) = tokio::sync::watch::channel(0u64);
    tokio::spawn(async move {
        while let Ok((client, _)) = listener.accept().await {
            let Ok(server) = tokio::net::TcpStream::connect(to).await else {
                continue;
            };
            let born = *epochs.borrow();
            let (cr, cw) = client.into_split();
            let (sr, sw) = server.into_split();
            for (mut r, mut w) in [(cr, sw), (sr, cw)] {
                let epochs = epochs.clone();
                tokio::spawn(async move {
                    let mut buf = vec![0u8; 16 * 1024];
                    loop {
                        let n = match r.read(&mut buf).await {
                            Ok(0) | Err(_) => return,
                            Ok(n) => n,
                        };
                        if *epochs.borrow() > born {
                            // Frozen: hold both sockets open, pass nothing.
                            std::future::pending::<()>().await;
                        }
                        if w.write_all(&buf[..n]).await.is_err() {
                            return;
                        }
                    }
                });
            }
        }
    });
    (addr, freeze)
}

/// An upstream connection that stops answering (no FIN, no RST) is given up once a keep-alive ping
/// goes unanswered, so the next request goes out on a new connection instead of waiting for its
/// timeout on the dead one.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_upstream_connection_that_stops_answering_is_replaced() {
    let pki = TestPki::new();
    let b = backend(&pki, http_echo().await, Protocol::Http).await;
    let (relay, freeze) = freezable_relay(b.inbound[0]).await;
    let limits = meshid_sidecar::settings::Limits {
        upstream_ping: Duration::from_millis(600),
        request_timeout: Duration::from_secs(5),
        ..Default::default()
    };
    let a = frontend(&pki, &relay.to_string(), Protocol::Http, B, Some(limits)).await;
    let outbound = a.outbound[0];
    let call = |path: &'static str| async move {
        let tcp = tokio::net::TcpStream::connect(outbound).await.unwrap();
        http_request(tcp, false, get(path, &[])).await.unwrap()
    };
    let (status, _, body) = call("/before").await;
    assert_eq!(status, 200, "{body}");
    freeze.send_modify(|n| *n += 1);
    // The first ping after the freeze (within 600 ms) goes unanswered for 200 ms; four periods
    // leave room for a loaded machine.
    tokio::time::sleep(Duration::from_millis(2400)).await;
    let started = std::time::Instant::now();
    let (status, _, body) = call("/after").await;
    assert_eq!(
        status,
        200,
        "after {:?} (504 after 5 s: sent on the dead connection): {body}",
        started.elapsed()
    );
    assert!(body.starts_with("GET /after"), "{body}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn upstream_with_the_wrong_identity_is_refused() {
    let pki = TestPki::new();
    let expected = "spiffe://cluster.local/ns/shop/sa/payments";
    // HTTP: 502 naming the identity problem.
    let (a, _b) = pair(&pki, http_echo().await, Protocol::Http, expected).await;
    let tcp = tokio::net::TcpStream::connect(a.outbound[0]).await.unwrap();
    let (status, headers, body) = http_request(tcp, false, get("/", &[])).await.unwrap();
    assert_eq!(status, 502, "{body}");
    let reason = headers.get("x-meshid-reason").unwrap().to_str().unwrap();
    assert!(reason.contains(expected) && reason.contains(B), "{reason}");
    let m = a.metrics().await;
    assert!(m.contains(r#"reason="unexpected_identity""#), "{m}");

    // TCP: the app's connection is closed without data, and the outbound counts why.
    let echo = tcp_echo().await;
    let (a, b) = pair(&pki, echo, Protocol::Tcp, expected).await;
    let mut s = tokio::net::TcpStream::connect(a.outbound[0]).await.unwrap();
    let _ = s.write_all(b"secret").await;
    let mut back = Vec::new();
    let ended = tokio::time::timeout(Duration::from_secs(10), s.read_to_end(&mut back)).await;
    assert!(ended.is_ok(), "the app's connection is closed");
    assert!(back.is_empty(), "no data from a wrong upstream");
    let m = a.metrics().await;
    assert_eq!(
        handshake_failures(&m, "outbound", "unexpected_identity"),
        1,
        "{}",
        handshake_failure_lines(&m).join("\n")
    );
    // The control: an outbound to the same backend expecting its real identity gets the echo.
    let right = frontend(&pki, &b.inbound[0].to_string(), Protocol::Tcp, B, None).await;
    let mut s = tokio::net::TcpStream::connect(right.outbound[0])
        .await
        .unwrap();
    s.write_all(b"secret").await.unwrap();
    s.shutdown().await.unwrap();
    let mut back = Vec::new();
    tokio::time::timeout(Duration::from_secs(10), s.read_to_end(&mut back))
        .await
        .expect("the echo ends")
        .expect("the right upstream's connection ends cleanly");
    assert_eq!(back, b"secret", "the right upstream echoes");
    let m = right.metrics().await;
    assert!(
        handshake_failure_lines(&m)
            .iter()
            .all(|l| l.ends_with(" 0")),
        "{m}"
    );
}

/// gRPC-Web is HTTP/1.1 traffic whose content type begins with `application/grpc`: it reaches an
/// HTTP/1.1 app over HTTP/1.1 (a gRPC-Web app often speaks nothing else), while gRPC itself
/// (`application/grpc`, `+proto`, `;` parameters) goes to the app over h2, which it needs.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn grpc_web_reaches_the_app_over_http1() {
    let pki = TestPki::new();
    let (a, _b) = pair(&pki, http_echo().await, Protocol::Http, B).await;
    for (content_type, version) in [
        ("application/grpc-web", "HTTP/1.1"),
        ("application/grpc-web+proto", "HTTP/1.1"),
        ("application/grpc-web-text", "HTTP/1.1"),
        ("application/grpcfoo", "HTTP/1.1"),
        ("application/grpc", "HTTP/2.0"),
        ("application/grpc+proto", "HTTP/2.0"),
        ("Application/GRPC; charset=utf-8", "HTTP/2.0"),
    ] {
        let tcp = tokio::net::TcpStream::connect(a.outbound[0]).await.unwrap();
        let req = hyper::Request::post("/api/rpc")
            .header("host", "app.example")
            .header("content-type", content_type)
            .body(http_body_util::Full::new(bytes::Bytes::from_static(
                b"\0\0\0\0\0",
            )))
            .unwrap();
        let (status, _, body) = http_request(tcp, false, req).await.unwrap();
        assert_eq!(status, 200, "{content_type}: {body}");
        assert!(
            body.contains(&format!("version={version}")),
            "{content_type}: the app should see {version}: {body}"
        );
    }
}

/// The outbound times a gRPC call by its own deadline too, not by `--request-timeout` (see
/// `sidecar_http::a_grpc_call_is_timed_by_its_own_deadline` for the inbound): a call without one
/// outlives the outbound's timeout. (The deadline itself is enforced by both sidecars here, so
/// its case checks the pair, not the outbound alone.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_outbound_times_a_grpc_call_by_its_own_deadline() {
    let pki = TestPki::new();
    let b = backend(&pki, http_echo().await, Protocol::Http).await;
    let limits = meshid_sidecar::settings::Limits {
        request_timeout: Duration::from_millis(400),
        ..Default::default()
    };
    let a = frontend(
        &pki,
        &b.inbound[0].to_string(),
        Protocol::Http,
        B,
        Some(limits),
    )
    .await;
    let call = |h2: bool, path: &'static str, headers: &'static [(&'static str, &'static str)]| {
        let outbound = a.outbound[0];
        async move {
            let tcp = tokio::net::TcpStream::connect(outbound).await.unwrap();
            http_request(tcp, h2, get(path, headers)).await.unwrap()
        }
    };
    const GRPC: (&str, &str) = ("content-type", "application/grpc");
    let (status, headers, body) = call(true, "/slow?ms=1200", &[GRPC]).await;
    assert_eq!(status, 200, "{body}");
    assert!(headers.get("grpc-status").is_none(), "{headers:?}");
    let (status, headers, _) = call(true, "/slow?ms=5000", &[GRPC, ("grpc-timeout", "600m")]).await;
    assert_eq!(status, 200);
    assert_eq!(headers.get("grpc-status").unwrap(), "4", "{headers:?}");
    let (status, _, body) = call(false, "/slow?ms=1500", &[]).await;
    assert_eq!(status, 504, "{body}");
}

/// A gRPC app: the standard health service over h2c on 127.0.0.1.
async fn grpc_app() -> SocketAddr {
    let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = l.local_addr().unwrap();
    let (reporter, service) = tonic_health::server::health_reporter();
    reporter
        .set_service_status("shop.Orders", tonic_health::ServingStatus::Serving)
        .await;
    tokio::spawn(async move {
        // Keep the reporter alive for the watch stream.
        let _reporter = reporter;
        let incoming = tokio_stream_listener(l);
        let _ = tonic::transport::Server::builder()
            .add_service(service)
            .serve_with_incoming(incoming)
            .await;
    });
    addr
}

fn tokio_stream_listener(
    l: tokio::net::TcpListener,
) -> impl tokio_stream::Stream<Item = std::io::Result<tokio::net::TcpStream>> {
    tokio_stream::wrappers::TcpListenerStream::new(l)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn grpc_unary_and_streaming_through_a_pair() {
    use tonic_health::pb::health_check_response::ServingStatus;
    use tonic_health::pb::{HealthCheckRequest, health_client::HealthClient};
    let pki = TestPki::new();
    let (a, _b) = pair(&pki, grpc_app().await, Protocol::Http, B).await;
    let channel = tonic::transport::Endpoint::from_shared(format!("http://{}", a.outbound[0]))
        .unwrap()
        .connect()
        .await
        .unwrap();
    let mut client = HealthClient::new(channel);
    let status = client
        .check(HealthCheckRequest {
            service: "shop.Orders".into(),
        })
        .await
        .unwrap()
        .into_inner()
        .status;
    assert_eq!(status, ServingStatus::Serving as i32);
    // Errors travel as trailers.
    let err = client
        .check(HealthCheckRequest {
            service: "unknown".into(),
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), tonic::Code::NotFound);
    // Server streaming.
    let mut stream = client
        .watch(HealthCheckRequest {
            service: "shop.Orders".into(),
        })
        .await
        .unwrap()
        .into_inner();
    let first = tokio::time::timeout(Duration::from_secs(5), stream.message())
        .await
        .unwrap()
        .unwrap()
        .unwrap();
    assert_eq!(first.status, ServingStatus::Serving as i32);
}

/// A TLS upstream that presents `workload`'s chain (whatever it is) and, once a handshake
/// completes, answers HTTP (h2 or HTTP/1.1 by ALPN) with 200 "upstream".
async fn forged_upstream(workload: Option<Workload>) -> SocketAddr {
    let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = l.local_addr().unwrap();
    let acceptor = workload.map(|w| w.upstream_acceptor(&[b"h2", b"http/1.1"]));
    tokio::spawn(async move {
        while let Ok((tcp, _)) = l.accept().await {
            let acceptor = acceptor.clone();
            tokio::spawn(async move {
                let service = hyper::service::service_fn(|_req| async {
                    Ok::<_, std::convert::Infallible>(hyper::Response::new(
                        http_body_util::Full::new(bytes::Bytes::from_static(b"upstream")),
                    ))
                });
                let builder = hyper_util::server::conn::auto::Builder::new(
                    hyper_util::rt::TokioExecutor::new(),
                );
                match acceptor {
                    Some(acceptor) => {
                        if let Ok(tls) = acceptor.accept(tcp).await {
                            let _ = builder
                                .serve_connection(hyper_util::rt::TokioIo::new(tls), service)
                                .await;
                        }
                    }
                    // No TLS at all: a plaintext HTTP server where an upstream sidecar should be.
                    None => {
                        let _ = builder
                            .serve_connection(hyper_util::rt::TokioIo::new(tcp), service)
                            .await;
                    }
                }
            });
        }
    });
    addr
}

/// Every hostile upstream certificate is refused by the outbound side (502 naming why, counted
/// by reason), and the one honest upstream among them is reached.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hostile_upstreams_are_refused_by_the_outbound_side() {
    let pki = TestPki::new();
    let uri = |id: &str| rcgen::SanType::URI(id.try_into().unwrap());
    let now = time::OffsetDateTime::now_utc();
    let foreign = {
        let f = ForeignCa::new();
        let (chain, key) = f.workload(B);
        Workload {
            chain,
            key_der: key.secret_der().to_vec(),
            cert_path: Default::default(),
            key_path: Default::default(),
        }
    };
    // (case, upstream certificate, reason counted; None: served)
    let cases: Vec<(&str, Option<Workload>, Option<&str>)> = vec![
        ("the expected upstream", Some(pki.workload(B)), None),
        (
            "another workload of the same mesh",
            Some(pki.workload(A)),
            Some("unexpected_identity"),
        ),
        (
            "certificate from another CA",
            Some(foreign),
            Some("unknown_ca"),
        ),
        (
            "other trust domain",
            Some(pki.workload("spiffe://evil.example/ns/shop/sa/backend")),
            Some("wrong_trust_domain"),
        ),
        (
            "expired",
            Some(pki.workload_at(B, now - time::Duration::hours(3), Duration::from_secs(3600))),
            Some("expired"),
        ),
        (
            "client-only certificate (EKU clientAuth) as a server",
            Some(pki.forge(|p| {
                p.subject_alt_names = vec![uri(B)];
                p.extended_key_usages = vec![rcgen::ExtendedKeyUsagePurpose::ClientAuth];
            })),
            Some("wrong_purpose"),
        ),
        (
            "two URI SANs, the expected one among them",
            Some(pki.with_sans(vec![uri(B), uri(A)])),
            Some("bad_identity"),
        ),
        (
            "CA certificate as the server's leaf",
            Some(pki.intermediate_as_leaf()),
            Some("ca_as_leaf"),
        ),
        (
            "leaf signed by another leaf",
            Some(pki.under_extra_level(B, |_| {})),
            Some("bad_chain"),
        ),
        ("plaintext HTTP instead of TLS", None, Some("protocol")),
    ];
    let mut outbound = Vec::new();
    for (_, workload, _) in &cases {
        let upstream = forged_upstream(workload.clone()).await;
        outbound.push((upstream.to_string(), B.to_string(), Protocol::Http));
    }
    let a = TestSidecar::start(
        &pki,
        &pki.workload(A),
        A,
        SidecarSpec {
            outbound,
            ..Default::default()
        },
    )
    .await;
    let count = |metrics: &str, reason: &str| handshake_failures(metrics, "outbound", reason);
    let mut failures = Vec::new();
    for (i, (name, _, refused)) in cases.iter().enumerate() {
        let before = count(&a.metrics().await, refused.unwrap_or("none"));
        let tcp = tokio::net::TcpStream::connect(a.outbound[i]).await.unwrap();
        let got = tokio::time::timeout(
            Duration::from_secs(20),
            http_request(tcp, false, get("/", &[])),
        )
        .await;
        let after = count(&a.metrics().await, refused.unwrap_or("none"));
        match (refused, got) {
            (None, Ok(Ok((200, _, body)))) if body == "upstream" => {}
            (Some(reason), Ok(Ok((502, headers, _)))) => {
                let why = headers
                    .get("x-meshid-reason")
                    .and_then(|v| v.to_str().ok())
                    .unwrap_or_default();
                if after <= before {
                    let m = a.metrics().await;
                    let seen = handshake_failure_lines(&m);
                    failures.push(format!(
                        "{name}: 502 ({why}) but not counted as {reason}; counted: {seen:?}"
                    ));
                } else if !why.contains(&format!("({reason})")) || why.contains("OtherError") {
                    failures.push(format!("{name}: x-meshid-reason does not say why: {why:?}"));
                }
            }
            (want, got) => failures.push(format!(
                "{name}: expected {}, got {got:?}",
                want.map_or("200 from the upstream".to_owned(), |r| format!("502 ({r})"))
            )),
        }
    }
    assert!(
        failures.is_empty(),
        "failing cases:\n{}",
        failures.join("\n")
    );
}

/// An upstream (holding the expected identity) that answers every request at once and never opens
/// its flow-control window for the request body, nor resets the stream as an honest server does,
/// does not keep the outbound copying each body for ever: the stream is reset once the app has its
/// answer (before, each request left a task, the app's body and an open stream behind).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_upstream_that_answers_and_takes_no_body_does_not_keep_the_outbound_copying() {
    let pki = TestPki::new();
    let (upstream, mut held) = windowless_upstream(pki.workload(B)).await;
    let a = outbound_to(&pki, upstream).await;
    for i in 0..3 {
        let tcp = tokio::net::TcpStream::connect(a.outbound[0]).await.unwrap();
        let req = hyper::Request::post("/upload")
            .header("host", "backend")
            .body(http_body_util::Full::new(bytes::Bytes::from(vec![
                b'x';
                1000
            ])))
            .unwrap();
        let (status, _, _) =
            tokio::time::timeout(Duration::from_secs(10), http_request(tcp, false, req))
                .await
                .expect("an answer")
                .expect("a response");
        assert_eq!(status, 200, "request {i}");
        let mut body = tokio::time::timeout(Duration::from_secs(5), held.recv())
            .await
            .expect("the upstream got the request")
            .expect("the upstream is up");
        // Whatever the outbound sent before it saw the window (at most the 64 KiB default, less
        // than the body), then the end of the stream.
        let mut got = 0;
        let ended = tokio::time::timeout(Duration::from_secs(5), async {
            loop {
                match body.data().await {
                    Some(Ok(data)) => got += data.len(),
                    end => return end.map(|r| r.map(|_| ())),
                }
            }
        })
        .await;
        assert!(
            matches!(ended, Ok(None | Some(Err(_)))),
            "request {i}: the outbound still holds the stream open after sending {got} bytes"
        );
    }
}

/// A bodiless request the upstream refused unprocessed (REFUSED_STREAM, as it refuses a stream
/// above its GOAWAY's last stream ID when it goes away gracefully, such as on SIGTERM) is sent once
/// more on a new connection, not answered 502: the app never sees the upstream's restart.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_bodiless_request_the_upstream_refused_unprocessed_is_sent_again() {
    let pki = TestPki::new();
    let (upstream, connections) = refusing_first_upstream(pki.workload(B)).await;
    let a = outbound_to(&pki, upstream).await;
    let tcp = tokio::net::TcpStream::connect(a.outbound[0]).await.unwrap();
    // A POST goes over h2 (the HTTP/1.1 pool takes idempotent requests only).
    let req = hyper::Request::post("/orders")
        .header("host", "backend")
        .body(http_body_util::Full::new(bytes::Bytes::new()))
        .unwrap();
    let (status, _, _) =
        tokio::time::timeout(Duration::from_secs(10), http_request(tcp, false, req))
            .await
            .expect("an answer")
            .expect("a response");
    assert_eq!(status, 200, "sent again after the refusal");
    assert_eq!(
        connections.load(std::sync::atomic::Ordering::SeqCst),
        2,
        "on a new connection"
    );
}

/// An h2 upstream presenting `workload` that refuses the first stream it ever gets
/// (REFUSED_STREAM) and answers every other with an empty 200; counts its connections.
async fn refusing_first_upstream(
    workload: Workload,
) -> (SocketAddr, std::sync::Arc<std::sync::atomic::AtomicUsize>) {
    use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
    let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = l.local_addr().unwrap();
    let acceptor = workload.upstream_acceptor(&[b"h2"]);
    let connections = std::sync::Arc::new(AtomicUsize::new(0));
    let refused = std::sync::Arc::new(AtomicBool::new(false));
    let counted = connections.clone();
    tokio::spawn(async move {
        while let Ok((tcp, _)) = l.accept().await {
            let (acceptor, refused) = (acceptor.clone(), refused.clone());
            counted.fetch_add(1, Ordering::SeqCst);
            tokio::spawn(async move {
                let Ok(tls) = acceptor.accept(tcp).await else {
                    return;
                };
                let Ok(mut conn) = h2::server::handshake(tls).await else {
                    return;
                };
                while let Some(Ok((_req, mut respond))) = conn.accept().await {
                    if !refused.swap(true, Ordering::SeqCst) {
                        respond.send_reset(h2::Reason::REFUSED_STREAM);
                    } else {
                        let _ = respond.send_response(hyper::Response::new(()), true);
                    }
                }
            });
        }
    });
    (addr, connections)
}

/// A sidecar of A whose one HTTP outbound listener goes to B at `upstream`.
async fn outbound_to(pki: &TestPki, upstream: SocketAddr) -> TestSidecar {
    TestSidecar::start(
        pki,
        &pki.workload(A),
        A,
        SidecarSpec {
            outbound: vec![(upstream.to_string(), B.to_string(), Protocol::Http)],
            ..Default::default()
        },
    )
    .await
}

/// An h2 upstream presenting `workload` that grants no stream window (SETTINGS_INITIAL_WINDOW_SIZE
/// 0), answers each request with an empty 200 at once and keeps the request's body stream (sent on
/// the channel) without reading it or resetting it.
async fn windowless_upstream(
    workload: Workload,
) -> (
    SocketAddr,
    tokio::sync::mpsc::UnboundedReceiver<h2::RecvStream>,
) {
    let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = l.local_addr().unwrap();
    let acceptor = workload.upstream_acceptor(&[b"h2"]);
    let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
    tokio::spawn(async move {
        while let Ok((tcp, _)) = l.accept().await {
            let (acceptor, tx) = (acceptor.clone(), tx.clone());
            tokio::spawn(async move {
                let Ok(tls) = acceptor.accept(tcp).await else {
                    return;
                };
                let Ok(mut conn) = h2::server::Builder::new()
                    .initial_window_size(0)
                    .handshake::<_, bytes::Bytes>(tls)
                    .await
                else {
                    return;
                };
                while let Some(Ok((req, mut respond))) = conn.accept().await {
                    let _ = respond.send_response(hyper::Response::new(()), true);
                    let _ = tx.send(req.into_body());
                }
            });
        }
    });
    (addr, rx)
}

/// An upstream whose certificate expires while it streams responses without end does not keep
/// them (nor their connections) past the expiry and the grace period after it: the app's
/// responses end, over the HTTP/1.1 pool (a GET) and over h2 (a POST with a body), as the inbound
/// ends an expired peer's exchanges. Before, only new requests stopped going to it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_upstream_streaming_past_its_certificate_expiry_is_cut_after_the_grace_period() {
    use http_body_util::BodyExt;
    let pki = TestPki::new();
    let lifetime = Duration::from_secs(6);
    let expires = std::time::Instant::now() + lifetime;
    let upstream = endless_upstream(pki.workload_at(
        B,
        time::OffsetDateTime::now_utc() - time::Duration::seconds(1),
        lifetime + Duration::from_secs(1),
    ))
    .await;
    let grace = Duration::from_secs(1);
    let a = TestSidecar::start(
        &pki,
        &pki.workload(A),
        A,
        SidecarSpec {
            outbound: vec![(upstream.to_string(), B.to_string(), Protocol::Http)],
            limits: Some(meshid_sidecar::settings::Limits {
                grace,
                ..Default::default()
            }),
            ..Default::default()
        },
    )
    .await;
    let mut streams = Vec::new();
    for (name, req) in [
        ("GET (HTTP/1.1 pool)", get("/stream", &[])),
        (
            "POST with a body (h2)",
            hyper::Request::post("/stream")
                .header("host", "backend")
                .body(http_body_util::Full::new(bytes::Bytes::from_static(b"x")))
                .unwrap(),
        ),
    ] {
        let tcp = tokio::net::TcpStream::connect(a.outbound[0]).await.unwrap();
        let (mut send, conn) =
            hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(tcp))
                .await
                .unwrap();
        tokio::spawn(conn);
        let resp = send.send_request(req).await.unwrap();
        assert_eq!(resp.status(), 200, "{name}");
        streams.push(tokio::spawn(async move {
            let mut body = resp.into_body();
            let mut ticks = 0;
            while let Some(Ok(_)) = body.frame().await {
                ticks += 1;
            }
            (name, ticks, std::time::Instant::now())
        }));
    }
    for s in streams {
        let (name, ticks, ended) = tokio::time::timeout(lifetime + Duration::from_secs(15), s)
            .await
            .expect("the stream ended")
            .unwrap();
        assert!(ticks > 0, "{name}: streamed nothing");
        let past = ended.saturating_duration_since(expires);
        assert!(
            ended + Duration::from_secs(1) >= expires && past <= grace + Duration::from_secs(4),
            "{name}: ended {past:?} after the upstream's certificate expired (grace {grace:?})"
        );
    }
}

/// A TLS upstream presenting `workload` (h2 or HTTP/1.1 by ALPN) that answers every request with a
/// 200 whose body never ends: a line every 200 ms.
async fn endless_upstream(workload: Workload) -> SocketAddr {
    let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = l.local_addr().unwrap();
    let acceptor = workload.upstream_acceptor(&[b"h2", b"http/1.1"]);
    tokio::spawn(async move {
        while let Ok((tcp, _)) = l.accept().await {
            let acceptor = acceptor.clone();
            tokio::spawn(async move {
                let Ok(tls) = acceptor.accept(tcp).await else {
                    return;
                };
                let service = hyper::service::service_fn(|_req| async {
                    let (tx, rx) = tokio::sync::mpsc::channel::<bytes::Bytes>(1);
                    tokio::spawn(async move {
                        while tx.send(bytes::Bytes::from_static(b"tick\n")).await.is_ok() {
                            tokio::time::sleep(Duration::from_millis(200)).await;
                        }
                    });
                    let body = http_body_util::StreamBody::new(tokio_stream::StreamExt::map(
                        tokio_stream::wrappers::ReceiverStream::new(rx),
                        |b| Ok::<_, std::convert::Infallible>(hyper::body::Frame::data(b)),
                    ));
                    Ok::<_, std::convert::Infallible>(hyper::Response::new(body))
                });
                let _ = hyper_util::server::conn::auto::Builder::new(
                    hyper_util::rt::TokioExecutor::new(),
                )
                .serve_connection(hyper_util::rt::TokioIo::new(tls), service)
                .await;
            });
        }
    });
    addr
}

/// The size of the responses [`big_app`] sends: over what the kernel buffers for a client that does
/// not read, plus the outbound's stream window.
const BIG: usize = 16 << 20;

/// An HTTP/1.1 app that answers every request (its `Content-Length` body read first) with [`BIG`]
/// bytes, or for `POST /drip` with 80 KiB, a KiB every 100 ms; on keep-alive connections.
async fn big_app() -> SocketAddr {
    let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = l.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((mut s, _)) = l.accept().await {
            tokio::spawn(async move {
                let block = vec![b'b'; 64 * 1024];
                let mut pending = Vec::new();
                while let Some((head, _)) = read_request(&mut s, &mut pending).await {
                    if head.starts_with("post /drip") {
                        // 1 KiB every 100 ms for 8 s, chunked.
                        let mut reply =
                            b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n".to_vec();
                        for _ in 0..80 {
                            reply.extend_from_slice(b"400\r\n");
                            reply.extend_from_slice(&block[..1024]);
                            reply.extend_from_slice(b"\r\n");
                            if s.write_all(&reply).await.is_err() {
                                return;
                            }
                            reply.clear();
                            tokio::time::sleep(Duration::from_millis(100)).await;
                        }
                        if s.write_all(b"0\r\n\r\n").await.is_err() {
                            return;
                        }
                        continue;
                    }
                    let reply = format!("HTTP/1.1 200 OK\r\ncontent-length: {BIG}\r\n\r\n");
                    if s.write_all(reply.as_bytes()).await.is_err() {
                        return;
                    }
                    for _ in 0..BIG / block.len() {
                        if s.write_all(&block).await.is_err() {
                            return;
                        }
                    }
                }
            });
        }
    });
    addr
}

/// A request with a body (so it goes over the outbound's shared h2 connection) for [`big_app`]'s
/// answer.
const POST_BIG: &[u8] = b"POST /big HTTP/1.1\r\nhost: backend\r\ncontent-length: 1\r\n\r\nx";

/// Clients of `outbound` that each ask for a large response, get the start of it, and then read
/// no more.
async fn clients_that_stop_reading(outbound: SocketAddr, n: usize) -> Vec<tokio::net::TcpStream> {
    let mut held = Vec::new();
    for i in 0..n {
        let mut s = tokio::net::TcpStream::connect(outbound).await.unwrap();
        s.write_all(POST_BIG).await.unwrap();
        let mut first = [0u8; 12];
        tokio::time::timeout(Duration::from_secs(10), s.read_exact(&mut first))
            .await
            .unwrap_or_else(|_| panic!("client {i} got no response head"))
            .unwrap();
        assert_eq!(&first, b"HTTP/1.1 200", "client {i}");
        held.push(s);
    }
    // Their responses go on until the windows they hold are full.
    tokio::time::sleep(Duration::from_millis(500)).await;
    held
}

/// Asks `outbound` for a large response and reads all of it: how it ended.
async fn read_big(outbound: SocketAddr) -> Result<(), String> {
    let mut s = tokio::net::TcpStream::connect(outbound).await.unwrap();
    s.write_all(POST_BIG).await.unwrap();
    let mut got = Vec::new();
    let mut chunk = vec![0u8; 256 * 1024];
    let mut body_start = None;
    loop {
        if body_start.is_none() {
            body_start = got.windows(4).position(|w| w == b"\r\n\r\n").map(|p| p + 4);
        }
        if body_start.is_some_and(|start| got.len() - start >= BIG) {
            return Ok(());
        }
        match s.read(&mut chunk).await {
            Ok(0) => return Err(format!("closed after {} bytes", got.len())),
            Err(e) => return Err(format!("{e} after {} bytes", got.len())),
            Ok(n) if body_start.is_some() => {
                // Only the count matters once the head is in.
                got.resize(got.len() + n, 0);
            }
            Ok(n) => got.extend_from_slice(&chunk[..n]),
        }
    }
}

/// Clients of one outbound listener share one h2 connection to the upstream. A few that stop
/// reading their large responses each keep at most their stream's window of it (an eighth of the
/// connection's), so another client's large response still streams in full. With the windows the
/// outbound granted before (2 MiB per stream, 5 MiB per connection), three such clients took the
/// whole connection window and every other client got its response head and no body.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn clients_that_stop_reading_leave_the_shared_upstream_connection_to_the_others() {
    let pki = TestPki::new();
    let b = TestSidecar::start(
        &pki,
        &pki.workload(B),
        B,
        SidecarSpec {
            inbound: vec![("127.0.0.80", big_app().await, Protocol::Http)],
            policy: Some(format!(
                "inbound:\n  - port: {{port0}}\n    protocol: http\n    allow:\n      - id: {A}\n"
            )),
            ..Default::default()
        },
    )
    .await;
    // The default idle timeout (5 minutes): the stall watchdog plays no part here.
    let a = frontend(&pki, &b.inbound[0].to_string(), Protocol::Http, B, None).await;
    let held = clients_that_stop_reading(a.outbound[0], 4).await;
    let read = tokio::time::timeout(Duration::from_secs(20), read_big(a.outbound[0])).await;
    assert_eq!(
        read,
        Ok(Ok(())),
        "a reading client's response, beside four that stopped reading"
    );
    drop(held);
}

/// A response the app has taken none of for the idle timeout is dropped: its upstream stream is
/// reset, which hands its window back to the connection every client of the listener shares, and
/// the app's connection is closed. Ten clients that stop reading hold more than the whole
/// connection window; another client's large response still streams in full once their
/// responses are dropped, and each drop is counted.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_response_the_app_stops_taking_is_dropped_after_the_idle_timeout() {
    let pki = TestPki::new();
    let b = TestSidecar::start(
        &pki,
        &pki.workload(B),
        B,
        SidecarSpec {
            inbound: vec![("127.0.0.81", big_app().await, Protocol::Http)],
            policy: Some(format!(
                "inbound:\n  - port: {{port0}}\n    protocol: http\n    allow:\n      - id: {A}\n"
            )),
            ..Default::default()
        },
    )
    .await;
    let limits = meshid_sidecar::settings::Limits {
        idle_timeout: Duration::from_secs(2),
        ..Default::default()
    };
    let a = frontend(
        &pki,
        &b.inbound[0].to_string(),
        Protocol::Http,
        B,
        Some(limits),
    )
    .await;
    let mut held = clients_that_stop_reading(a.outbound[0], 10).await;
    let read = tokio::time::timeout(Duration::from_secs(30), read_big(a.outbound[0])).await;
    assert_eq!(
        read,
        Ok(Ok(())),
        "a reading client's response, beside ten that stopped reading"
    );
    // The first client that stopped reading (its response had all the window it could take, the
    // last ones' may have waited for the window) finds its response cut short: what was on its
    // way, then the end of the connection.
    let mut cut = held.remove(0);
    let mut chunk = vec![0u8; 256 * 1024];
    let mut got = 0;
    let end = tokio::time::timeout(Duration::from_secs(20), async {
        loop {
            match cut.read(&mut chunk).await {
                Ok(0) | Err(_) => return,
                Ok(n) => got += n,
            }
        }
    })
    .await;
    assert!(
        end.is_ok(),
        "the connection is still open after {got} bytes"
    );
    assert!(got < BIG, "the whole response came ({got} bytes)");
    let m = a.metrics().await;
    assert!(
        metric(&m, "meshid_sidecar_stalled_responses_total", &[]) >= 1,
        "{m}"
    );
    drop(held);
}

/// A remote inbound whose peer (our outbound) leaves one response untaken, because the local
/// client it is for stopped reading, while it takes another one on the same connection, ends the
/// untaken one's stream alone: the other client's long, well-read response goes on to its end.
/// Before, the inbound dropped the whole shared connection after two of its idle timeouts, and
/// every stream on it with it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_remote_inbound_ends_a_stalled_stream_alone_not_the_shared_connection() {
    let pki = TestPki::new();
    let b = TestSidecar::start(
        &pki,
        &pki.workload(B),
        B,
        SidecarSpec {
            inbound: vec![("127.0.0.82", big_app().await, Protocol::Http)],
            policy: Some(format!(
                "inbound:\n  - port: {{port0}}\n    protocol: http\n    allow:\n      - id: {A}\n"
            )),
            limits: Some(meshid_sidecar::settings::Limits {
                idle_timeout: Duration::from_secs(2),
                ..Default::default()
            }),
            ..Default::default()
        },
    )
    .await;
    // The outbound's own idle timeout (5 minutes) is far off: only the inbound acts.
    let a = frontend(&pki, &b.inbound[0].to_string(), Protocol::Http, B, None).await;
    let held = clients_that_stop_reading(a.outbound[0], 1).await;
    let mut v = tokio::net::TcpStream::connect(a.outbound[0]).await.unwrap();
    v.write_all(b"POST /drip HTTP/1.1\r\nhost: backend\r\ncontent-length: 1\r\n\r\nx")
        .await
        .unwrap();
    let mut got = Vec::new();
    let mut chunk = vec![0u8; 64 * 1024];
    let end = tokio::time::timeout(Duration::from_secs(30), async {
        loop {
            if got.ends_with(b"0\r\n\r\n") {
                return "complete";
            }
            match v.read(&mut chunk).await {
                Ok(0) => return "closed",
                Err(_) => return "error",
                Ok(n) => got.extend_from_slice(&chunk[..n]),
            }
        }
    })
    .await;
    assert_eq!(
        end,
        Ok("complete"),
        "the well-read response, after {} bytes",
        got.len()
    );
    let m = b.metrics().await;
    assert!(
        metric(&m, "meshid_sidecar_stalled_responses_total", &[]) >= 1,
        "{m}"
    );
    drop(held);
}

/// A response head longer than `--max-header-bytes` (16 KiB) from an upstream holding the expected
/// identity is a 502 to the app on the pooled HTTP/1.1 path (a bodiless GET on a quiet listener),
/// as it is on h2 (a POST with a body; the limit is our `SETTINGS_MAX_HEADER_LIST_SIZE` there).
/// Before, the pooled path took heads of up to 408 KiB.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_response_head_over_the_header_limit_is_a_502_on_both_paths() {
    let pki = TestPki::new();
    let (upstream, versions) = big_head_upstream(pki.workload(B), 100 * 1024).await;
    let a = outbound_to(&pki, upstream).await;
    for (name, req, version) in [
        (
            "GET (HTTP/1.1 pool)",
            get("/", &[]),
            hyper::Version::HTTP_11,
        ),
        (
            "POST with a body (h2)",
            hyper::Request::post("/")
                .header("host", "backend")
                .body(http_body_util::Full::new(bytes::Bytes::from_static(b"x")))
                .unwrap(),
            hyper::Version::HTTP_2,
        ),
    ] {
        let tcp = tokio::net::TcpStream::connect(a.outbound[0]).await.unwrap();
        let (status, headers, _) =
            tokio::time::timeout(Duration::from_secs(10), http_request(tcp, false, req))
                .await
                .expect("an answer")
                .expect("a response");
        let why = headers
            .get("x-meshid-reason")
            .and_then(|v| v.to_str().ok())
            .unwrap_or_default()
            .to_owned();
        assert_eq!(status, 502, "{name}: {why}");
        let seen = versions.lock().unwrap().pop();
        assert_eq!(seen, Some(version), "{name}: the path taken");
    }
}

/// A TLS upstream presenting `workload` (h2 or HTTP/1.1 by ALPN) that answers every request with
/// an empty 200 carrying a header field of `len` bytes; records each request's HTTP version.
async fn big_head_upstream(
    workload: Workload,
    len: usize,
) -> (
    SocketAddr,
    std::sync::Arc<std::sync::Mutex<Vec<hyper::Version>>>,
) {
    let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = l.local_addr().unwrap();
    let acceptor = workload.upstream_acceptor(&[b"h2", b"http/1.1"]);
    let versions = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
    let seen = versions.clone();
    let value = hyper::header::HeaderValue::try_from("v".repeat(len)).unwrap();
    tokio::spawn(async move {
        while let Ok((tcp, _)) = l.accept().await {
            let (acceptor, seen, value) = (acceptor.clone(), seen.clone(), value.clone());
            tokio::spawn(async move {
                let Ok(tls) = acceptor.accept(tcp).await else {
                    return;
                };
                let service = hyper::service::service_fn(move |req: hyper::Request<_>| {
                    seen.lock().unwrap().push(req.version());
                    let mut resp =
                        hyper::Response::new(http_body_util::Empty::<bytes::Bytes>::new());
                    resp.headers_mut().insert("x-big", value.clone());
                    async { Ok::<_, std::convert::Infallible>(resp) }
                });
                let _ = hyper_util::server::conn::auto::Builder::new(
                    hyper_util::rt::TokioExecutor::new(),
                )
                .serve_connection(hyper_util::rt::TokioIo::new(tls), service)
                .await;
            });
        }
    });
    (addr, versions)
}

/// An upstream (holding the expected identity) that answers a head and then sends nothing more has
/// its response ended between one and two idle timeouts later, over the HTTP/1.1 pool (a GET) and
/// over h2 (a POST with a body): the app's response is cut short. Before, nothing timed out after
/// the head: the exchange, its stream and the request body's copy were held until the upstream's
/// certificate expired, or the app gave up. A response that keeps streaming is not cut, however
/// long it lasts.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_response_that_brings_nothing_for_the_idle_timeout_is_ended() {
    use http_body_util::BodyExt;
    let pki = TestPki::new();
    let idle = Duration::from_secs(2);
    let a = TestSidecar::start(
        &pki,
        &pki.workload(A),
        A,
        SidecarSpec {
            outbound: vec![
                (
                    mute_upstream(pki.workload(B)).await.to_string(),
                    B.to_string(),
                    Protocol::Http,
                ),
                (
                    endless_upstream(pki.workload(B)).await.to_string(),
                    B.to_string(),
                    Protocol::Http,
                ),
            ],
            limits: Some(meshid_sidecar::settings::Limits {
                idle_timeout: idle,
                ..Default::default()
            }),
            ..Default::default()
        },
    )
    .await;
    let mut reads = Vec::new();
    for (listener, upstream) in [(a.outbound[0], "mute"), (a.outbound[1], "streaming")] {
        for (path, req) in [
            ("GET (HTTP/1.1 pool)", get("/", &[])),
            (
                "POST with a body (h2)",
                hyper::Request::post("/")
                    .header("host", "backend")
                    .body(http_body_util::Full::new(bytes::Bytes::from_static(b"x")))
                    .unwrap(),
            ),
        ] {
            let name = format!("{upstream} upstream, {path}");
            let tcp = tokio::net::TcpStream::connect(listener).await.unwrap();
            let (mut send, conn) =
                hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(tcp))
                    .await
                    .unwrap();
            tokio::spawn(conn);
            let resp = tokio::time::timeout(Duration::from_secs(10), send.send_request(req))
                .await
                .expect("a response head")
                .unwrap();
            assert_eq!(resp.status(), 200, "{name}");
            let start = std::time::Instant::now();
            reads.push(tokio::spawn(async move {
                let mut body = resp.into_body();
                let mut frames = 0;
                // The end of the body, if it comes within three idle timeouts.
                let end = tokio::time::timeout(idle * 3, async {
                    while let Some(Ok(_)) = body.frame().await {
                        frames += 1;
                    }
                })
                .await;
                (name, frames, end.is_ok().then(|| start.elapsed()))
            }));
            // Apart, as on a quiet listener, where the GET takes the pooled HTTP/1.1 path.
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
    for read in reads {
        let (name, frames, ended) = read.await.unwrap();
        if name.starts_with("mute") {
            let ended = ended.unwrap_or_else(|| panic!("{name}: not ended"));
            assert!(
                ended >= idle - Duration::from_millis(100) && ended <= idle * 2 + idle / 2,
                "{name}: ended after {ended:?}"
            );
            assert_eq!(frames, 0, "{name}");
        } else {
            assert_eq!(ended, None, "{name}: cut after {frames} frames");
            assert!(frames > 10, "{name}: {frames} frames");
        }
    }
}

/// A TLS upstream presenting `workload` (h2 or HTTP/1.1 by ALPN) that answers every request with
/// a 200 head and then sends nothing, for ever.
async fn mute_upstream(workload: Workload) -> SocketAddr {
    let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = l.local_addr().unwrap();
    let acceptor = workload.upstream_acceptor(&[b"h2", b"http/1.1"]);
    tokio::spawn(async move {
        while let Ok((tcp, _)) = l.accept().await {
            let acceptor = acceptor.clone();
            tokio::spawn(async move {
                let Ok(tls) = acceptor.accept(tcp).await else {
                    return;
                };
                let service = hyper::service::service_fn(|_req| async {
                    let body = http_body_util::StreamBody::new(tokio_stream::pending::<
                        Result<hyper::body::Frame<bytes::Bytes>, std::convert::Infallible>,
                    >());
                    Ok::<_, std::convert::Infallible>(hyper::Response::new(body))
                });
                let _ = hyper_util::server::conn::auto::Builder::new(
                    hyper_util::rt::TokioExecutor::new(),
                )
                .serve_connection(hyper_util::rt::TokioIo::new(tls), service)
                .await;
            });
        }
    });
    addr
}

/// An app that holds `POST /slow` until `release` turns true, then answers it, and never answers
/// anything else; `seen` counts the request heads it read.
async fn holding_app(
    release: tokio::sync::watch::Receiver<bool>,
) -> (SocketAddr, std::sync::Arc<std::sync::atomic::AtomicUsize>) {
    let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = l.local_addr().unwrap();
    let seen = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let count = seen.clone();
    tokio::spawn(async move {
        while let Ok((mut s, _)) = l.accept().await {
            let (count, mut release) = (count.clone(), release.clone());
            tokio::spawn(async move {
                let mut head = Vec::new();
                let mut b = [0u8; 1024];
                while !head.windows(4).any(|w| w == b"\r\n\r\n") {
                    match s.read(&mut b).await {
                        Ok(0) | Err(_) => return,
                        Ok(n) => head.extend_from_slice(&b[..n]),
                    }
                }
                count.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                if head.starts_with(b"POST /slow ") {
                    let _ = release.wait_for(|r| *r).await;
                    let _ = s
                        .write_all(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
                        .await;
                }
                // Held until the sidecar lets it go.
                let _ = s.read(&mut b).await;
            });
        }
    });
    (addr, seen)
}

/// A local client that sends requests and hangs up on each before its answer cannot have the
/// upstream connection every client of the listener shares cut under the others: a meshid inbound
/// closes an h2 connection, with every request on it, once over 200 of its requests were reset
/// within a second of arriving. The outbound sends new requests on a new connection after 100
/// such requests, and the first one drains: another client's request in flight on it is answered.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_that_hangs_up_on_its_requests_does_not_cut_the_others_off() {
    use std::sync::atomic::Ordering::SeqCst;
    let pki = TestPki::new();
    let (release, released) = tokio::sync::watch::channel(false);
    let (app, seen) = holding_app(released).await;
    let b = TestSidecar::start(
        &pki,
        &pki.workload(B),
        B,
        SidecarSpec {
            inbound: vec![("127.0.0.81", app, Protocol::Http)],
            policy: Some(format!(
                "inbound:\n  - port: {{port0}}\n    protocol: http\n    allow:\n      - id: {A}\n"
            )),
            ..Default::default()
        },
    )
    .await;
    let a = frontend(&pki, &b.inbound[0].to_string(), Protocol::Http, B, None).await;
    // A request with a body (the POST goes over h2): on the shared connection, held by the app.
    let mut victim = tokio::net::TcpStream::connect(a.outbound[0]).await.unwrap();
    victim
        .write_all(b"POST /slow HTTP/1.1\r\nHost: backend\r\nContent-Length: 2\r\n\r\nhi")
        .await
        .unwrap();
    let wait_seen = |n: usize| {
        let seen = seen.clone();
        async move {
            tokio::time::timeout(Duration::from_secs(10), async {
                while seen.load(SeqCst) < n {
                    tokio::time::sleep(Duration::from_millis(1)).await;
                }
            })
            .await
            .unwrap_or_else(|_| {
                panic!(
                    "the app saw {} of {n} requests (the upstream connection cut, the peer \
                     refused for its resets)",
                    seen.load(SeqCst)
                )
            });
        }
    };
    wait_seen(1).await;
    // 300 requests, each given up once the app has it.
    for i in 0..300 {
        let mut s = tokio::net::TcpStream::connect(a.outbound[0]).await.unwrap();
        s.write_all(
            format!("POST /hang/{i} HTTP/1.1\r\nHost: backend\r\nContent-Length: 2\r\n\r\nhi")
                .as_bytes(),
        )
        .await
        .unwrap();
        wait_seen(i + 2).await;
        drop(s);
    }
    release.send(true).unwrap();
    let mut answer = String::new();
    tokio::time::timeout(Duration::from_secs(10), async {
        let mut b = [0u8; 1024];
        while !answer.ends_with("ok") {
            match victim.read(&mut b).await {
                Ok(0) | Err(_) => break,
                Ok(n) => answer.push_str(&String::from_utf8_lossy(&b[..n])),
            }
        }
    })
    .await
    .expect("the held request is answered");
    assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
    assert!(answer.ends_with("ok"), "{answer}");
}
