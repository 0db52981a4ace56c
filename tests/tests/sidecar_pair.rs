//! Traffic through a pair of sidecars: app A -> sidecar A (outbound, plaintext on 127.0.0.1) -> mTLS ->
//! sidecar B (inbound) -> app B, for TCP, HTTP/1.1, h2 and gRPC; and an upstream with the wrong identity.

use std::net::SocketAddr;
use std::time::Duration;

use meshid_sidecar::policy::Protocol;
use meshid_tests::mesh::{
    SidecarSpec, TestPki, TestSidecar, get, http_echo, http_request, tcp_echo,
};
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
    let proto = match protocol {
        Protocol::Tcp => "tcp",
        Protocol::Http => "http",
    };
    let b = TestSidecar::start(
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
    .await;
    let a = TestSidecar::start(
        pki,
        &pki.workload(A),
        A,
        SidecarSpec {
            outbound: vec![(b.inbound[0].to_string(), expected.to_string(), protocol)],
            ..Default::default()
        },
    )
    .await;
    (a, b)
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

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn http1_and_h2_through_a_pair() {
    let pki = TestPki::new();
    let (a, _b) = pair(&pki, http_echo().await, Protocol::Http, B).await;
    for h2 in [false, true] {
        for i in 0..3 {
            let tcp = tokio::net::TcpStream::connect(a.outbound[0]).await.unwrap();
            let (status, _, body) = http_request(tcp, h2, get(&format!("/orders/{i}"), &[]))
                .await
                .unwrap();
            assert_eq!(status, 200, "h2={h2}: {body}");
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

    // TCP: the app's connection is closed without data.
    let (a, _b) = pair(&pki, tcp_echo().await, Protocol::Tcp, expected).await;
    let mut s = tokio::net::TcpStream::connect(a.outbound[0]).await.unwrap();
    let _ = s.write_all(b"secret").await;
    let mut back = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(10), s.read_to_end(&mut back)).await;
    assert!(back.is_empty(), "no data from a wrong upstream");
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
