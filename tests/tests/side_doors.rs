//! What an authenticated, allowed peer (or a pod next to ours) can still try, over real sockets:
//! identity and forwarding headers in every spelling (and in trailers), method overrides the
//! policy would not allow (and form bodies that never end, or whose boundary RFC 2046 does not
//! allow), h2 responses left untaken (a window of zero), upgrades other than
//! WebSocket, a tunnel held
//! past its certificate's expiry or past a policy change, a flood of upgrades against
//! `max_connections`, TCP connections of a peer the policy drops, a `Host` that is not an authority,
//! hostile app-probe paths and probe floods on the admin port, the stats split, a rejected policy
//! reload, an accept loop out of file descriptors, handshakes made to be logged, and h2 rapid-reset
//! floods and untaken responses on connection after connection (their lines limited). Each ends
//! refused or closed with a clear
//! reason while allowed traffic keeps flowing.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::net::SocketAddr;
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use meshid_identity::policy::Protocol;
use meshid_sidecar::settings::Limits;
use meshid_tests::mesh::{
    SidecarSpec, TestPki, TestSidecar, Workload, client_config, eventually, http_echo,
    mtls_connect, tcp_echo,
};
use meshid_tests::process::{Proc, free_addr, http_get};
use meshid_tests::tools::workspace_bin;
use time::OffsetDateTime;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

const SERVER: &str = "spiffe://cluster.local/ns/shop/sa/server";
const CLIENT: &str = "spiffe://cluster.local/ns/shop/sa/client";
const OTHER: &str = "spiffe://cluster.local/ns/shop/sa/other";

fn http_policy(allowed: &[&str]) -> String {
    let mut p = "inbound:\n  - port: {port0}\n    protocol: http\n    allow:\n".to_owned();
    for id in allowed {
        p.push_str(&format!("      - id: {id}\n        paths: [/api/*]\n"));
    }
    if allowed.is_empty() {
        p = "inbound:\n  - port: {port0}\n    protocol: http\n    allow: []\n".to_owned();
    }
    p
}

fn tcp_policy(allowed: &[&str]) -> String {
    let mut p = "inbound:\n  - port: {port0}\n    protocol: tcp\n    allow:\n".to_owned();
    for id in allowed {
        p.push_str(&format!("      - id: {id}\n"));
    }
    p
}

/// Reads one request head (up to the blank line) as an app does; `None` when the connection ends
/// first or the head passes 64 KiB.
async fn app_read_head(s: &mut tokio::net::TcpStream) -> Option<Vec<u8>> {
    let mut head = Vec::new();
    let mut b = [0u8; 1];
    while !head.ends_with(b"\r\n\r\n") {
        if s.read(&mut b).await.unwrap_or(0) == 0 || head.len() > 65536 {
            return None;
        }
        head.push(b[0]);
    }
    Some(head)
}

/// An app that answers every request with the request head it received (so a test sees exactly
/// the headers the sidecar passed on), and becomes an echo tunnel when asked for an upgrade.
async fn head_app() -> SocketAddr {
    let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = l.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((mut s, _)) = l.accept().await {
            tokio::spawn(async move {
                loop {
                    let Some(head) = app_read_head(&mut s).await else {
                        return;
                    };
                    let text = String::from_utf8_lossy(&head).to_lowercase();
                    if text.contains("\r\nupgrade:") {
                        let _ = s
                            .write_all(b"HTTP/1.1 101 Switching Protocols\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n\r\n")
                            .await;
                        let (mut r, mut w) = s.split();
                        let _ = tokio::io::copy(&mut r, &mut w).await;
                        return;
                    }
                    let reply =
                        format!("HTTP/1.1 200 OK\r\nContent-Length: {}\r\n\r\n", head.len());
                    if s.write_all(reply.as_bytes()).await.is_err()
                        || s.write_all(&head).await.is_err()
                    {
                        return;
                    }
                }
            });
        }
    });
    addr
}

struct Http {
    pki: TestPki,
    sidecar: TestSidecar,
}

async fn http_sidecar(ip: &'static str, limits: Limits, policy: String) -> Http {
    http_sidecar_for(ip, head_app().await, limits, policy).await
}

/// [`http_sidecar`] in front of `app`.
async fn http_sidecar_for(
    ip: &'static str,
    app: SocketAddr,
    limits: Limits,
    policy: String,
) -> Http {
    sidecar_for((ip, app, Protocol::Http), limits, policy).await
}

/// A sidecar with one inbound listener (`ip`, the app, its protocol) under `policy`.
async fn sidecar_for(
    inbound: (&'static str, SocketAddr, Protocol),
    limits: Limits,
    policy: String,
) -> Http {
    let pki = TestPki::new();
    let server = pki.workload(SERVER);
    let sidecar = TestSidecar::start(
        &pki,
        &server,
        SERVER,
        SidecarSpec {
            inbound: vec![inbound],
            policy: Some(policy),
            limits: Some(limits),
            ..Default::default()
        },
    )
    .await;
    Http { pki, sidecar }
}

type Tls = tokio_rustls::client::TlsStream<TcpStream>;

/// A sidecar on `ip` with a TCP inbound listener in front of `app`, its policy allowing `allowed`.
async fn tcp_sidecar(ip: &'static str, app: SocketAddr, allowed: &[&str]) -> Http {
    sidecar_for(
        (ip, app, Protocol::Tcp),
        Limits::default(),
        tcp_policy(allowed),
    )
    .await
}

/// An mTLS connection as `who` to a TCP listener (no ALPN).
async fn tcp_connect_as(
    pki: &TestPki,
    sidecar: &TestSidecar,
    who: &Workload,
) -> Result<Tls, String> {
    let cfg = client_config(&pki.roots(), &pki.trust_domain, Some(who), &sidecar.id, &[]);
    mtls_connect(sidecar.inbound[0], cfg).await
}

async fn connect_as(pki: &TestPki, sidecar: &TestSidecar, who: &Workload) -> Result<Tls, String> {
    let cfg = client_config(
        &pki.roots(),
        &pki.trust_domain,
        Some(who),
        &sidecar.id,
        &[b"http/1.1"],
    );
    mtls_connect(sidecar.inbound[0], cfg).await
}

/// Reads one response head (up to the blank line).
async fn read_head(tls: &mut Tls) -> String {
    let mut head = Vec::new();
    let mut b = [0u8; 1];
    while !head.ends_with(b"\r\n\r\n") {
        match tokio::time::timeout(Duration::from_secs(10), tls.read(&mut b)).await {
            Ok(Ok(1)) => head.push(b[0]),
            other => panic!(
                "response head cut short ({other:?}): {}",
                String::from_utf8_lossy(&head)
            ),
        }
    }
    String::from_utf8_lossy(&head).into_owned()
}

/// Sends a raw HTTP/1.1 request (`Connection: close` added) and returns the whole response.
async fn raw_request(mut tls: Tls, head: &str) -> String {
    tls.write_all(format!("{head}Connection: close\r\n\r\n").as_bytes())
        .await
        .unwrap();
    let mut out = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(10), tls.read_to_end(&mut out)).await;
    String::from_utf8_lossy(&out).into_owned()
}

/// Opens a WebSocket tunnel through the sidecar and checks that bytes echo through it.
async fn open_tunnel(pki: &TestPki, sidecar: &TestSidecar, who: &Workload) -> Tls {
    let mut tls = connect_as(pki, sidecar, who).await.unwrap();
    tls.write_all(
        b"GET /api/ws HTTP/1.1\r\nHost: app\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n\r\n",
    )
    .await
    .unwrap();
    let head = read_head(&mut tls).await;
    assert!(head.starts_with("HTTP/1.1 101"), "{head}");
    tls.write_all(b"ping").await.unwrap();
    let mut back = [0u8; 4];
    tls.read_exact(&mut back).await.unwrap();
    assert_eq!(&back, b"ping");
    tls
}

/// Whether the tunnel ends (EOF or error) within `within`, bytes echoing until then.
async fn tunnel_ends_within(tls: &mut Tls, within: Duration) -> bool {
    let deadline = Instant::now() + within;
    let mut buf = [0u8; 64];
    while Instant::now() < deadline {
        if tls.write_all(b"x").await.is_err() {
            return true;
        }
        let read = tokio::time::timeout(Duration::from_millis(500), tls.read(&mut buf)).await;
        if let Ok(Ok(0) | Err(_)) = read {
            return true;
        }
    }
    false
}

fn metric(metrics: &str, prefix: &str) -> f64 {
    metrics
        .lines()
        .filter(|l| l.starts_with(prefix))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

/// Writes `yaml` as the sidecar's policy and waits until the sidecar has applied it (its applied
/// reloads rise): what follows runs under the new policy.
async fn apply_policy(sidecar: &TestSidecar, yaml: &str) {
    const APPLIED: &str = "meshid_sidecar_policy_reloads_total{result=\"applied\"}";
    let before = metric(&sidecar.metrics().await, APPLIED);
    sidecar.write_policy(yaml);
    let applied = eventually(Duration::from_secs(10), || async {
        metric(&sidecar.metrics().await, APPLIED) > before
    })
    .await;
    assert!(
        applied,
        "the policy was not applied:\n{yaml}\n{}",
        sidecar.metrics().await
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn only_the_sidecar_says_who_called_in_any_spelling() {
    let e = http_sidecar("127.0.0.40", Limits::default(), http_policy(&[CLIENT])).await;
    let client = e.pki.workload(CLIENT);
    let tls = connect_as(&e.pki, &e.sidecar, &client).await.unwrap();
    let forged = "GET /api/x HTTP/1.1\r\nHost: app\r\n\
        X-Forwarded-Client-Cert: By=x;URI=spiffe://cluster.local/ns/shop/sa/admin\r\n\
        X_Forwarded_Client_Cert: URI=spiffe://cluster.local/ns/shop/sa/admin\r\n\
        x-forwarded_client-cert: forged\r\n\
        X-Forwarded-For: 10.9.9.9\r\nX_Forwarded_For: 10.9.9.9\r\n\
        Forwarded: for=10.9.9.9\r\nX-Real-IP: 10.9.9.9\r\nX_Real_IP: 10.9.9.9\r\n\
        X-Forwarded-Proto: http\r\nX-Forwarded-Host: evil.example\r\n\
        X_Forwarded_Port: 1\r\nX-Forwarded-Prefix: /evil\r\n\
        X-Original-URL: /admin/evil\r\nX-Rewrite-URL: /admin/evil\r\nX-App-Header: kept\r\n\
        True-Client-IP: 10.9.9.9\r\nClient-Ip: 10.9.9.9\r\nX_Client_IP: 10.9.9.9\r\n\
        X-Cluster-Client-IP: 10.9.9.9\r\nCF-Connecting-IP: 10.9.9.9\r\n\
        Fastly-Client-IP: 10.9.9.9\r\nProxy: http://evil.example:3128\r\n\
        X-Client-Cert: forged\r\nssl_client_cert: forged\r\nX-SSL-Client-Cert: forged\r\n\
        X-ARR-ClientCert: forged\r\nX-Forwarded-Tls-Client-Cert: forged\r\n\
        X-Amzn-Mtls-Clientcert-Leaf: forged\r\nSSL-Client-Verify: forged\r\n\
        SCRIPT_NAME: /evil\r\nPath-Info: /evil\r\nREMOTE_USER: forged\r\nX-Script-Name: /evil\r\n";
    let resp = raw_request(tls, forged).await;
    assert!(resp.starts_with("HTTP/1.1 200"), "{resp}");
    let seen = resp.to_lowercase();
    assert!(
        !seen.contains("sa/admin"),
        "a forged identity reached the app: {resp}"
    );
    assert!(
        !seen.contains("forged") && !seen.contains("10.9.9.9") && !seen.contains("evil"),
        "{resp}"
    );
    assert!(
        !seen.contains("x_forwarded") && !seen.contains("x_real"),
        "{resp}"
    );
    let xfcc: Vec<&str> = seen
        .lines()
        .filter(|l| l.starts_with("x-forwarded-client-cert:"))
        .collect();
    assert_eq!(xfcc.len(), 1, "{resp}");
    assert!(xfcc[0].contains(&format!("uri={CLIENT}")), "{resp}");
    assert!(
        seen.contains("\r\nx-forwarded-for: 127.0.0.1\r\n"),
        "{resp}"
    );
    assert!(
        seen.contains("\r\nforwarded: for=127.0.0.1;proto=https\r\n"),
        "{resp}"
    );
    assert!(seen.contains("\r\nx-forwarded-proto: https\r\n"), "{resp}");
    assert!(seen.contains("\r\nx-app-header: kept\r\n"), "{resp}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn only_websocket_upgrades_pass() {
    let e = http_sidecar("127.0.0.41", Limits::default(), http_policy(&[CLIENT])).await;
    let client = e.pki.workload(CLIENT);
    for asked in ["h2c", "echo", "websocket, echo", "TLS/1.0"] {
        let tls = connect_as(&e.pki, &e.sidecar, &client).await.unwrap();
        let resp = raw_request(
            tls,
            &format!(
                "GET /api/ws HTTP/1.1\r\nHost: app\r\nConnection: Upgrade\r\nUpgrade: {asked}\r\n"
            ),
        )
        .await;
        assert!(resp.starts_with("HTTP/1.1 200"), "{asked}: {resp}");
        assert!(
            !resp.to_lowercase().contains("\r\nupgrade:"),
            "{asked}: the app was asked to upgrade: {resp}"
        );
    }
    // Only a WebSocket handshake as RFC 6455 has it (a bodiless GET, its method not overridden)
    // is passed on as an upgrade: with a body, the app's 101 would leave the body flowing to it as
    // a tunnel outside the tunnel's watch.
    let ws = "Connection: Upgrade\r\nUpgrade: websocket\r\n";
    for (why, request) in [
        (
            "a body",
            format!(
                "GET /api/ws HTTP/1.1\r\nHost: app\r\n{ws}Content-Length: 4\r\nConnection: close\r\n\r\nping"
            ),
        ),
        (
            "a chunked body",
            format!(
                "GET /api/ws HTTP/1.1\r\nHost: app\r\n{ws}Transfer-Encoding: chunked\r\nConnection: close\r\n\r\n4\r\nping\r\n0\r\n\r\n"
            ),
        ),
        (
            "POST",
            format!(
                "POST /api/ws HTTP/1.1\r\nHost: app\r\n{ws}Content-Length: 0\r\nConnection: close\r\n\r\n"
            ),
        ),
        (
            "a method override",
            format!(
                "GET /api/ws HTTP/1.1\r\nHost: app\r\n{ws}X-HTTP-Method-Override: PUT\r\nConnection: close\r\n\r\n"
            ),
        ),
    ] {
        let mut tls = connect_as(&e.pki, &e.sidecar, &client).await.unwrap();
        tls.write_all(request.as_bytes()).await.unwrap();
        let mut out = Vec::new();
        let _ = tokio::time::timeout(Duration::from_secs(10), tls.read_to_end(&mut out)).await;
        let resp = String::from_utf8_lossy(&out);
        assert!(resp.starts_with("HTTP/1.1 200"), "{why}: {resp}");
        assert!(
            !resp.to_lowercase().contains("\r\nupgrade:"),
            "{why}: the app was asked to upgrade: {resp}"
        );
    }
    // CONNECT is no upgrade the inbound passes on either: the app would open a tunnel wherever
    // it names, decided by the policy on an empty path.
    let tls = connect_as(&e.pki, &e.sidecar, &client).await.unwrap();
    let resp = raw_request(
        tls,
        "CONNECT internal.example:443 HTTP/1.1\r\nHost: internal.example:443\r\n",
    )
    .await;
    assert!(resp.starts_with("HTTP/1.1 501"), "CONNECT: {resp}");
    let _tunnel = open_tunnel(&e.pki, &e.sidecar, &client).await;
}

/// An h2 peer's `cookie` fields (h2 clients send one per cookie) reach an HTTP/1.1 app as one
/// `Cookie` line, joined by `; ` (RFC 9113, 8.2.3): many servers read only the first line.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn h2_cookie_fields_reach_an_http1_app_as_one_line() {
    use http_body_util::BodyExt;
    let e = http_sidecar("127.0.0.115", Limits::default(), http_policy(&[CLIENT])).await;
    let (mut h2, conn) = h2_as(&e, &e.pki.workload(CLIENT), 65_535).await;
    let req = http::Request::get("https://app/api/x")
        .header("cookie", "a=1")
        .header("cookie", "b=2")
        .header("cookie", "c=3")
        .body(http_body_util::Empty::new())
        .unwrap();
    let resp = h2.send_request(req).await.unwrap();
    assert_eq!(resp.status(), 200);
    let seen = resp.into_body().collect().await.unwrap().to_bytes();
    let seen = String::from_utf8_lossy(&seen).to_lowercase();
    assert_eq!(seen.matches("\r\ncookie:").count(), 1, "{seen}");
    assert!(seen.contains("\r\ncookie: a=1; b=2; c=3\r\n"), "{seen}");
    drop(h2);
    conn.abort();
}

/// An app that answers every request with everything it received: the head, then a chunked body
/// to its end (its trailers included).
async fn raw_app() -> SocketAddr {
    let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = l.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((mut s, _)) = l.accept().await {
            tokio::spawn(async move {
                let mut got = Vec::new();
                let mut b = [0u8; 1024];
                // The head, then (chunked) up to the blank line after the last chunk.
                loop {
                    let text = String::from_utf8_lossy(&got).to_lowercase();
                    let done = match text.find("\r\n\r\n") {
                        Some(end) if !text[..end].contains("transfer-encoding: chunked") => true,
                        Some(end) => {
                            let body = &text[end + 4..];
                            (body.starts_with("0\r\n") || body.contains("\r\n0\r\n"))
                                && body.ends_with("\r\n\r\n")
                        }
                        None => false,
                    };
                    if done || got.len() > 65536 {
                        break;
                    }
                    match s.read(&mut b).await {
                        Ok(0) | Err(_) => return,
                        Ok(n) => got.extend_from_slice(&b[..n]),
                    }
                }
                let reply = format!(
                    "HTTP/1.1 200 OK\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
                    got.len()
                );
                let _ = s.write_all(reply.as_bytes()).await;
                let _ = s.write_all(&got).await;
            });
        }
    });
    addr
}

/// Sends `bytes` as the CLIENT to a sidecar on `ip` in front of [`raw_app`] (the policy allowing
/// CLIENT `/api/*`), and reads the response to its end: the app's answer says what it received.
async fn to_raw_app(ip: &'static str, bytes: &[u8]) -> String {
    let e = http_sidecar_for(
        ip,
        raw_app().await,
        Limits::default(),
        http_policy(&[CLIENT]),
    )
    .await;
    let client = e.pki.workload(CLIENT);
    let mut tls = connect_as(&e.pki, &e.sidecar, &client).await.unwrap();
    tls.write_all(bytes).await.unwrap();
    let mut out = Vec::new();
    tokio::time::timeout(Duration::from_secs(10), tls.read_to_end(&mut out))
        .await
        .expect("the response ends")
        .unwrap();
    String::from_utf8_lossy(&out).into_owned()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_peer_cannot_say_who_called_in_its_trailers() {
    // hyper's HTTP/1.1 client writes the trailers that the request's `Trailer` header names.
    let resp = to_raw_app(
        "127.0.0.45",
        b"POST /api/x HTTP/1.1\r\nHost: app\r\nTransfer-Encoding: chunked\r\n\
          Connection: close\r\n\
          Trailer: X-Forwarded-Client-Cert, X_Forwarded_Client_Cert, X-Forwarded-For, X-Trace-End\r\n\
          \r\n5\r\nhello\r\n0\r\n\
          X-Forwarded-Client-Cert: By=x;URI=spiffe://cluster.local/ns/shop/sa/admin\r\n\
          X_Forwarded_Client_Cert: URI=spiffe://cluster.local/ns/shop/sa/admin\r\n\
          X-Forwarded-For: 10.9.9.9\r\nX-Trace-End: kept\r\n\r\n",
    )
    .await;
    assert!(resp.starts_with("HTTP/1.1 200"), "{resp}");
    let seen = resp.to_lowercase();
    assert!(seen.contains("hello"), "the body reached the app: {resp}");
    assert!(
        seen.contains("\r\nx-trace-end: kept\r\n"),
        "the app's own trailers pass: {resp}"
    );
    assert!(
        !seen.contains("sa/admin") && !seen.contains("10.9.9.9"),
        "a forged identity reached the app in a trailer: {resp}"
    );
}

/// An HTTP/1.1 request never goes to the app over h2, whatever it says (gRPC's content type, the
/// sidecars' h2 hint): each HTTP/1.1 peer connection asking for it got an h2 connection to the app
/// of its own, outside the caps on h2 peer connections. The app here speaks HTTP/1.1 only.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_http1_request_never_goes_to_the_app_over_h2() {
    for (ip, hint) in [
        ("127.0.0.61", "x-meshid-app-h2: 1"),
        ("127.0.0.62", "content-type: application/grpc"),
    ] {
        let resp = to_raw_app(
            ip,
            format!("GET /api/x HTTP/1.1\r\nHost: app\r\n{hint}\r\nConnection: close\r\n\r\n")
                .as_bytes(),
        )
        .await;
        assert!(resp.starts_with("HTTP/1.1 200"), "{hint}: {resp}");
        assert!(
            resp.contains("GET /api/x HTTP/1.1\r\n"),
            "{hint}: the app got an HTTP/1.1 request: {resp}"
        );
    }
}

/// `Transfer_Encoding` and `Content_Length` never reach the app: a Mongrel-family server (Thin,
/// Unicorn, older Puma) folds `_` into `-` and would end the body where hyper did not, leaving a
/// request the policy never saw on a pooled app connection. Nor does `Content_Type`, which they
/// take as the type of a body the sidecar read (or not) for `_method` by `Content-Type` alone.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn underscore_spellings_of_framing_headers_never_reach_the_app() {
    let smuggled = "0\r\n\r\nGET /admin/delete-all HTTP/1.1\r\nHost: svc\r\nX-Pad: ";
    let resp = to_raw_app(
        "127.0.0.55",
        format!(
            "POST /api/echo HTTP/1.1\r\nHost: app\r\nContent-Length: {}\r\n\
             Transfer_Encoding: chunked\r\nContent_Length: 5\r\nKeep_Alive: 1\r\n\
             Content_Type: application/x-www-form-urlencoded\r\n\
             Connection: close\r\n\r\n{smuggled}",
            smuggled.len()
        )
        .as_bytes(),
    )
    .await;
    assert!(resp.starts_with("HTTP/1.1 200"), "{resp}");
    let seen = resp.to_lowercase();
    for folded in [
        "transfer_encoding",
        "content_length",
        "keep_alive",
        "content_type",
    ] {
        assert!(!seen.contains(folded), "{folded} reached the app: {resp}");
    }
    assert!(
        seen.contains(&format!("\r\ncontent-length: {}\r\n", smuggled.len())),
        "{resp}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_method_override_is_decided_as_the_method_it_names() {
    let policy = format!(
        "inbound:\n  - port: {{port0}}\n    protocol: http\n    allow:\n      \
         - id: {CLIENT}\n        methods: [GET, POST]\n        paths: [/api/*]\n"
    );
    let e = http_sidecar("127.0.0.46", Limits::default(), policy).await;
    let client = e.pki.workload(CLIENT);
    for (header, status) in [
        ("X-HTTP-Method-Override: DELETE", "403"),
        ("X_HTTP_Method: PUT", "403"),
        ("x-method-override: delete", "403"),
        ("X-HTTP-Method-Override: GET", "200"),
        ("X-HTTP-Method-Override: POST", "200"),
        // Upper-cased as frameworks take it, as a query's or a form's value is.
        ("X-HTTP-Method-Override: get", "200"),
        ("X_HTTP_Method:  post ", "200"),
        // PHP folds `.` into `_` as it does `-`: `HTTP_X_HTTP_METHOD_OVERRIDE`.
        ("X.HTTP.Method.Override: DELETE", "403"),
        ("X-App-Header: none", "200"),
        // In the query (Laravel, Express's method-override, Spring), in any spelling.
        ("?_method=DELETE", "403"),
        ("?a=1&%5Fmethod=put", "403"),
        ("?.method=Delete", "403"),
        ("?_method=get", "200"),
        ("?_method[]=DELETE", "403"),
        ("?payment_method=DELETE&method=DELETE", "200"),
    ] {
        let tls = connect_as(&e.pki, &e.sidecar, &client).await.unwrap();
        let (query, header) = match header.strip_prefix('?') {
            Some(q) => (format!("?{q}"), String::new()),
            None => (String::new(), format!("{header}\r\n")),
        };
        let resp = raw_request(
            tls,
            &format!("POST /api/x{query} HTTP/1.1\r\nHost: app\r\nContent-Length: 0\r\n{header}"),
        )
        .await;
        assert!(
            resp.starts_with(&format!("HTTP/1.1 {status}")),
            "{header}: {resp}"
        );
        if status == "403" {
            assert!(resp.contains("x-meshid-decision"), "{header}: {resp}");
        }
    }
}

/// `ascii` in UTF-16LE (each character, then a NUL).
fn utf16le(ascii: &str) -> String {
    ascii.chars().flat_map(|c| [c, '\0']).collect()
}

/// Rails' `Rack::MethodOverride`, Laravel, Symfony and Spring read `_method` from a POST's form
/// body, and Laravel from a JSON one: for a peer that may not use every method on the path, the
/// body is read whole, each method its `_method` fields (or top-level members) name decided, and
/// the body passed on as it came.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_method_override_in_a_form_body_is_decided_as_the_method_it_names() {
    let policy = format!(
        "inbound:\n  - port: {{port0}}\n    protocol: http\n    allow:\n      \
         - id: {CLIENT}\n        methods: [GET, POST]\n        paths: [/api/*]\n      \
         - id: {OTHER}\n        paths: [/api/*]\n"
    );
    let e = http_sidecar_for("127.0.0.58", raw_app().await, Limits::default(), policy).await;
    let multipart = |name: &str, value: &str| {
        format!(
            "--XyZ\r\nContent-Disposition: form-data; name=\"title\"\r\n\r\nhello\r\n\
             --XyZ\r\nContent-Disposition: form-data; name=\"{name}\"\r\n\r\n{value}\r\n--XyZ--\r\n"
        )
    };
    let urlencoded = "application/x-www-form-urlencoded";
    let form_data = "multipart/form-data; boundary=XyZ";
    let cases = [
        (CLIENT, urlencoded, "a=1&_method=DELETE".to_owned(), "403"),
        (CLIENT, urlencoded, "a=1&%5Fmethod=put".to_owned(), "403"),
        (CLIENT, urlencoded, "_method=get&a=1".to_owned(), "200"),
        (
            CLIENT,
            urlencoded,
            "payment_method=DELETE".to_owned(),
            "200",
        ),
        (CLIENT, form_data, multipart("_method", "DELETE"), "403"),
        (CLIENT, form_data, multipart("_method", "post"), "200"),
        // An array to `qs` (Express, Koa; multer too), whose method-override takes its first
        // element.
        (CLIENT, urlencoded, "_method[]=DELETE".to_owned(), "403"),
        (
            CLIENT,
            urlencoded,
            "_method%5B0%5D=delete".to_owned(),
            "403",
        ),
        (CLIENT, form_data, multipart("_method[]", "DELETE"), "403"),
        (
            CLIENT,
            form_data,
            multipart("note", "_method=DELETE"),
            "200",
        ),
        // Laravel reads a top-level `_method` member of a JSON body (`/json` or `+json` anywhere
        // in the Content-Type) as the method.
        (
            CLIENT,
            "application/json",
            r#"{"title":"x","_method":"DELETE"}"#.to_owned(),
            "403",
        ),
        (
            CLIENT,
            "application/vnd.api+json; charset=utf-8",
            r#"{"\u005fmethod" : "delete"}"#.to_owned(),
            "403",
        ),
        (
            CLIENT,
            "application/json",
            r#"{"title":{"_method":"DELETE"},"_method":"post"}"#.to_owned(),
            "200",
        ),
        // A peer that may use any method there: nothing to decide.
        (OTHER, urlencoded, "_method=DELETE".to_owned(), "200"),
        (
            OTHER,
            "application/json",
            r#"{"_method":"DELETE"}"#.to_owned(),
            "200",
        ),
    ];
    for (who, content_type, body, status) in cases {
        let tls = connect_as(&e.pki, &e.sidecar, &e.pki.workload(who))
            .await
            .unwrap();
        let resp = exchange(
            tls,
            &format!(
                "POST /api/x HTTP/1.1\r\nHost: app\r\nContent-Type: {content_type}\r\n\
                 Connection: close\r\nContent-Length: {}\r\n\r\n{body}",
                body.len()
            ),
        )
        .await;
        assert!(
            resp.starts_with(&format!("HTTP/1.1 {status}")),
            "{who} {body:?}: {resp}"
        );
        if status == "403" {
            assert!(resp.contains("x-meshid-decision"), "{body:?}: {resp}");
        } else {
            // The app got the body as it was sent.
            assert!(resp.ends_with(&body), "{body:?}: {resp}");
        }
    }
    // The spellings and framings some framework reads a form from: each is decided, or refused
    // when no check can follow it. (target and extra headers, body, status)
    let lenient = [
        // No Content-Type: Rack parses the body as a form.
        ("/api/x", "", "_method=DELETE", "403"),
        ("/api/x", "", "hello", "200"),
        // Content-Type removed on the way by the peer's own Connection header.
        (
            "/api/x",
            "Content-Type: text/plain\r\nConnection: content-type\r\n",
            "_method=DELETE",
            "403",
        ),
        // A media type PHP and Rack cut at the comma.
        (
            "/api/x",
            "Content-Type: application/x-www-form-urlencoded, x\r\n",
            "a=1&  _method=DELETE",
            "403",
        ),
        // A blank Content-Type is none to Rack; a multipart one without a usable boundary has
        // Rack parse the body as urlencoded.
        ("/api/x", "Content-Type:\r\n", "_method=DELETE", "403"),
        ("/api/x", "Content-Type: \r\n", "a=1", "200"),
        (
            "/api/x",
            "Content-Type: multipart/form-data\r\n",
            "_method=DELETE",
            "403",
        ),
        (
            "/api/x",
            "Content-Type: multipart/form-data; boundary=\r\n",
            "_method=DELETE",
            "403",
        ),
        (
            "/api/x",
            "Content-Type: multipart/mixed\r\n",
            "_method=DELETE",
            "403",
        ),
        // Rack finds `Content-Disposition:` anywhere in a part head (the first one first), and
        // names a part by its Content-ID when that names none.
        (
            "/api/x",
            &format!("Content-Type: {form_data}\r\n"),
            "--XyZ\r\nX-A: Content-Disposition: form-data; name=\"_method\"\r\n\
             Content-Disposition: form-data; name=\"title\"\r\n\r\nDELETE\r\n--XyZ--",
            "403",
        ),
        (
            "/api/x",
            &format!("Content-Type: {form_data}\r\n"),
            "--XyZ\r\nContent-ID: _method\r\n\r\nDELETE\r\n--XyZ--",
            "403",
        ),
        // Names PHP and Rack read as _method.
        (
            "/api/x?+_method=DELETE",
            "Content-Type: text/plain\r\n",
            "",
            "403",
        ),
        (
            "/api/x",
            &format!("Content-Type: {urlencoded}\r\n"),
            "_method%00=DELETE",
            "403",
        ),
        (
            "/api/x",
            &format!("Content-Type: {urlencoded}\r\n"),
            "[_method]=DELETE",
            "403",
        ),
        // Two boundaries (parsers pick different ones), a compressed form: refused.
        (
            "/api/x",
            "Content-Type: multipart/form-data; boundary=A; boundary=XyZ\r\n",
            "x",
            "400",
        ),
        (
            "/api/x",
            &format!("Content-Type: {urlencoded}\r\nContent-Encoding: gzip\r\n"),
            "x",
            "400",
        ),
        // A folded part header (PHP and Commons FileUpload append it to the one before), a part
        // head PHP ends at `\n\r\n`, a `boundary` older PHP reads past (`boundary-x; y=XyZ` is
        // `XyZ` to it), a charset Tomcat and ASP.NET Core decode the form by: refused.
        (
            "/api/x",
            &format!("Content-Type: {form_data}\r\n"),
            "--XyZ\r\nContent-Disposition: form-data\r\n ; name=\"_method\"\r\n\r\nDELETE\r\n\
             --XyZ--",
            "400",
        ),
        (
            "/api/x",
            &format!("Content-Type: {form_data}\r\n"),
            "--XyZ\r\nContent-Disposition: form-data; name=\"_method\"\n\r\nDELETE\r\n--XyZ--",
            "400",
        ),
        (
            "/api/x",
            "Content-Type: multipart/form-data; boundary-x; y=XyZ\r\n",
            "--XyZ\r\nContent-Disposition: form-data; name=\"_method\"\r\n\r\nDELETE\r\n--XyZ--",
            "400",
        ),
        (
            "/api/x",
            &format!("Content-Type: {urlencoded}; charset=utf-16le\r\n"),
            &utf16le("_method=DELETE"),
            "400",
        ),
    ];
    for (target, extra, body, status) in lenient {
        let tls = connect_as(&e.pki, &e.sidecar, &e.pki.workload(CLIENT))
            .await
            .unwrap();
        let resp = exchange(
            tls,
            &format!(
                "POST {target} HTTP/1.1\r\nHost: app\r\n{extra}Connection: close\r\n\
                 Content-Length: {}\r\n\r\n{body}",
                body.len()
            ),
        )
        .await;
        assert!(
            resp.starts_with(&format!("HTTP/1.1 {status}")),
            "{target} {extra:?} {body:?}: {resp}"
        );
    }
    // Over h2 a Content-Type may start with white space, which Puma trims: read all the same.
    let cfg = client_config(
        &e.pki.roots(),
        &e.pki.trust_domain,
        Some(&e.pki.workload(CLIENT)),
        &e.sidecar.id,
        &[b"h2"],
    );
    let tls = mtls_connect(e.sidecar.inbound[0], cfg).await.unwrap();
    let (mut h2, conn) =
        hyper::client::conn::http2::Builder::new(hyper_util::rt::TokioExecutor::new())
            .handshake::<_, http_body_util::Full<bytes::Bytes>>(hyper_util::rt::TokioIo::new(tls))
            .await
            .unwrap();
    let conn = tokio::spawn(async move { drop(conn.await) });
    for (content_type, body, status) in [
        (" application/x-www-form-urlencoded", "_method=DELETE", 403),
        (
            "\tapplication/x-www-form-urlencoded",
            "a=1&_method=put",
            403,
        ),
        (
            " multipart/form-data; boundary=XyZ",
            &multipart("_method", "DELETE"),
            403,
        ),
        (" application/x-www-form-urlencoded", "_method=GET", 200),
    ] {
        let req = http::Request::post("https://app/api/x")
            .header("content-type", content_type)
            .body(http_body_util::Full::new(bytes::Bytes::from(
                body.to_owned(),
            )))
            .unwrap();
        let resp = h2.send_request(req).await.unwrap();
        assert_eq!(resp.status(), status, "{content_type:?} {body:?}");
    }
    drop(h2);
    conn.abort();
    // Chunked, the field split across chunks, with a trailer: found all the same.
    let tls = connect_as(&e.pki, &e.sidecar, &e.pki.workload(CLIENT))
        .await
        .unwrap();
    let resp = exchange(
        tls,
        &format!(
            "POST /api/x HTTP/1.1\r\nHost: app\r\nContent-Type: {urlencoded}\r\n\
             Connection: close\r\nTransfer-Encoding: chunked\r\n\r\n4\r\na=1&\r\n6\r\n\
             _metho\r\n8\r\nd=DELETE\r\n0\r\nX-End: 1\r\n\r\n"
        ),
    )
    .await;
    assert!(resp.starts_with("HTTP/1.1 403"), "{resp}");
    // A form larger than can be read first is refused, not passed on unread.
    let big = format!("a={}", "x".repeat(super_big()));
    let tls = connect_as(&e.pki, &e.sidecar, &e.pki.workload(CLIENT))
        .await
        .unwrap();
    let resp = exchange(
        tls,
        &format!(
            "POST /api/x HTTP/1.1\r\nHost: app\r\nContent-Type: {urlencoded}\r\n\
             Connection: close\r\nContent-Length: {}\r\n\r\n{big}",
            big.len()
        ),
    )
    .await;
    assert!(
        resp.starts_with("HTTP/1.1 413"),
        "{}",
        &resp[..resp.len().min(300)]
    );
    // A multipart boundary longer than RFC 2046's 70 bytes (searching a body of dashes for 8 KiB
    // of dashes cost 8 KiB of compares per byte) is refused from the header, before the body is
    // read. (8 KiB: the whole head stays within the default --max-header-bytes.)
    let boundary = "-".repeat(8 * 1024);
    let body = "-".repeat(64 * 1024);
    let tls = connect_as(&e.pki, &e.sidecar, &e.pki.workload(CLIENT))
        .await
        .unwrap();
    let resp = exchange(
        tls,
        &format!(
            "POST /api/x HTTP/1.1\r\nHost: app\r\n\
             Content-Type: multipart/form-data; boundary={boundary}\r\n\
             Connection: close\r\nContent-Length: {}\r\n\r\n{body}",
            body.len()
        ),
    )
    .await;
    assert!(
        resp.starts_with("HTTP/1.1 400") && resp.contains("RFC 2046 allows at most 70"),
        "{}",
        &resp[..resp.len().min(300)]
    );
}

/// Repeated `_method` fields are one decision per method, not per field, and a request naming more
/// than eight methods (headers, query and body together, its own method aside) is refused: before,
/// a 1 MiB form of `_method=GET` fields was about 87,000 decisions, each a path match and a lock on
/// the observed calls, and as many strings held for the response's life.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn repeated_method_overrides_are_decided_once_each_and_bounded() {
    let many: Vec<String> = (b'A'..=b'I').map(|c| format!("M{}", c as char)).collect();
    let policy = format!(
        "inbound:\n  - port: {{port0}}\n    protocol: http\n    allow:\n      \
         - id: {CLIENT}\n        methods: [GET, POST]\n        paths: [/api/*]\n      \
         - id: {OTHER}\n        methods: [POST, {}]\n        paths: [/api/*]\n",
        many.join(", ")
    );
    let e = http_sidecar_for("127.0.0.59", raw_app().await, Limits::default(), policy).await;
    // Every decision of this sidecar (one request at a time).
    let decisions = || async {
        metric(
            &e.sidecar.metrics().await,
            "meshid_sidecar_authz_decisions_total{",
        )
    };
    let post = |who: &'static str, target: String, body: String| {
        let e = &e;
        async move {
            let tls = connect_as(&e.pki, &e.sidecar, &e.pki.workload(who))
                .await
                .unwrap();
            exchange(
                tls,
                &format!(
                    "POST {target} HTTP/1.1\r\nHost: app\r\n\
                     Content-Type: application/x-www-form-urlencoded\r\n\
                     Connection: close\r\nContent-Length: {}\r\n\r\n{body}",
                    body.len()
                ),
            )
            .await
        }
    };
    // 10,000 fields naming one allowed method (and a query naming it 500 times): two decisions,
    // the request's method and that one.
    let before = decisions().await;
    let resp = post(
        CLIENT,
        format!("/api/x?{}", "_method=get&".repeat(500)),
        "_method=GET&".repeat(10_000),
    )
    .await;
    assert!(
        resp.starts_with("HTTP/1.1 200"),
        "{}",
        &resp[..200.min(resp.len())]
    );
    assert_eq!(decisions().await - before, 2.0);
    // Eight methods, each allowed, repeated: passed on; a ninth: 400, however they are spread.
    let eight = many[..8]
        .iter()
        .map(|m| format!("_method={m}&"))
        .collect::<String>()
        .repeat(100);
    let resp = post(OTHER, "/api/x".into(), eight.clone()).await;
    assert!(
        resp.starts_with("HTTP/1.1 200"),
        "{}",
        &resp[..200.min(resp.len())]
    );
    for (target, body) in [
        ("/api/x".to_owned(), format!("{eight}_method=MI")),
        ("/api/x?_method=MI".to_owned(), eight.clone()),
        (
            format!("/api/x?{eight}"),
            "_method=post&_method=mi".to_owned(),
        ),
    ] {
        let resp = post(OTHER, target, body).await;
        assert!(
            resp.starts_with("HTTP/1.1 400") && resp.contains("more than 8 methods"),
            "{resp}"
        );
    }
}

/// Audit mode decides a form's `_method` as enforce mode does, and records what it would deny, but
/// lets everything through: a form enforce mode refuses because it cannot check it passes on as
/// it came.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn audit_mode_records_the_form_method_overrides_it_would_deny() {
    const AUDIT_DENY: &str = "decision=\"audit_deny\"";
    let policy = format!(
        "mode: audit\ninbound:\n  - port: {{port0}}\n    protocol: http\n    allow:\n      \
         - id: {CLIENT}\n        methods: [GET, POST]\n        paths: [/api/*]\n"
    );
    // A budget smaller than one of the bodies below.
    let limits = Limits {
        form_body_memory: 4096,
        ..Limits::default()
    };
    let e = http_sidecar_for("127.0.0.114", raw_app().await, limits, policy).await;
    let would_deny = || async {
        let metrics = e.sidecar.metrics().await;
        metrics
            .lines()
            .filter(|l| l.starts_with("meshid_sidecar_authz_decisions_total{"))
            .filter(|l| l.contains(AUDIT_DENY))
            .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
            .sum::<f64>()
    };
    let urlencoded = "application/x-www-form-urlencoded";
    let big = format!("_method=DELETE&a={}", "x".repeat(8192));
    let ten = (b'A'..=b'J')
        .map(|c| format!("_method=M{}&", c as char))
        .collect::<String>()
        .repeat(3);
    // (extra headers, body, would-denies it adds)
    let cases = [
        (
            format!("Content-Type: {urlencoded}\r\n"),
            "a=1&_method=DELETE",
            1.0,
        ),
        (
            format!("Content-Type: {urlencoded}\r\n"),
            "_method=GET",
            0.0,
        ),
        // What enforce mode refuses (400) as it cannot check it.
        (
            format!("Content-Type: {urlencoded}\r\nContent-Encoding: gzip\r\n"),
            "_method=DELETE",
            0.0,
        ),
        (
            "Content-Type: multipart/form-data; boundary=XyZ\r\n".to_owned(),
            "--XyZ\r\nContent-Disposition: form-data\r\n ; name=\"_method\"\r\n\r\nDELETE",
            0.0,
        ),
        // A declared length over the whole budget (413 before any of it is read).
        (format!("Content-Type: {urlencoded}\r\n"), &big, 0.0),
        // Ten methods, repeated (enforce mode refuses more than eight): the first eight decided.
        (format!("Content-Type: {urlencoded}\r\n"), &ten, 8.0),
    ];
    for (extra, body, adds) in cases {
        let before = would_deny().await;
        let tls = connect_as(&e.pki, &e.sidecar, &e.pki.workload(CLIENT))
            .await
            .unwrap();
        let resp = exchange(
            tls,
            &format!(
                "POST /api/x HTTP/1.1\r\nHost: app\r\n{extra}Connection: close\r\n\
                 Content-Length: {}\r\n\r\n{body}",
                body.len()
            ),
        )
        .await;
        let head = &resp[..resp.len().min(300)];
        assert!(resp.starts_with("HTTP/1.1 200"), "{extra:?}: {head}");
        // The app answers with what it has at its first read: a short body is there whole.
        assert!(
            body.len() > 1024 || resp.ends_with(body),
            "the app got the body: {resp}"
        );
        let after = would_deny().await;
        assert_eq!(after - before, adds, "{extra:?} {body:?}");
    }
}

/// Audit mode passes on a form it cannot check, but only if the policy still audits once the
/// body has come: one enforced while the body was arriving refuses it (400), as enforce mode
/// would have from the start.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_form_audit_mode_cannot_check_is_refused_if_enforced_before_it_came() {
    let policy = |mode: &str| {
        format!(
            "mode: {mode}\ninbound:\n  - port: {{port0}}\n    protocol: http\n    allow:\n      \
             - id: {CLIENT}\n        methods: [GET, POST]\n        paths: [/api/*]\n"
        )
    };
    let e = http_sidecar_for(
        "127.0.0.116",
        raw_app().await,
        Limits::default(),
        policy("audit"),
    )
    .await;
    // A part head frameworks read differently (a folded line): unchecked.
    let body = "--XyZ\r\nContent-Disposition: form-data\r\n ; name=\"_method\"\r\n\r\nDELETE";
    let (first, rest) = body.split_at(10);
    let mut tls = connect_as(&e.pki, &e.sidecar, &e.pki.workload(CLIENT))
        .await
        .unwrap();
    tls.write_all(
        format!(
            "POST /api/x HTTP/1.1\r\nHost: app\r\nConnection: close\r\n\
             Content-Type: multipart/form-data; boundary=XyZ\r\nContent-Length: {}\r\n\r\n{first}",
            body.len()
        )
        .as_bytes(),
    )
    .await
    .unwrap();
    tls.flush().await.unwrap();
    apply_policy(&e.sidecar, &policy("enforce")).await;
    let resp = exchange(tls, rest).await;
    assert!(
        resp.starts_with("HTTP/1.1 400") && resp.contains("cannot be checked"),
        "{}",
        &resp[..resp.len().min(300)]
    );
}

/// Form bodies are read whole to find `_method`, and h2 flow control does not bound what that
/// holds (each read gives the window back): one connection's streams, each sending all but the
/// last byte of a form and never ending, held 1 MiB each, 200 MiB a connection. They are held
/// within `--form-body-memory`: a stream past it is answered 503 at once, and the memory comes
/// back when the streams go.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unfinished_h2_form_bodies_are_held_within_the_form_budget() {
    use http_body_util::BodyExt;
    type Feed = tokio::sync::mpsc::Sender<
        Result<hyper::body::Frame<bytes::Bytes>, std::convert::Infallible>,
    >;
    type Chunks = http_body_util::StreamBody<
        tokio_stream::wrappers::ReceiverStream<
            Result<hyper::body::Frame<bytes::Bytes>, std::convert::Infallible>,
        >,
    >;
    // Each body declares 60 KiB + 1, charged at once: three fit in the budget, a fourth does not.
    const BUDGET: usize = 200 * 1024;
    const DECLARED: usize = 60 * 1024 + 1;
    const STREAMS: usize = 8;
    const HELD: usize = BUDGET / DECLARED;
    let policy = format!(
        "inbound:\n  - port: {{port0}}\n    protocol: http\n    allow:\n      \
         - id: {CLIENT}\n        methods: [GET, POST]\n        paths: [/api/*]\n"
    );
    let limits = Limits {
        form_body_memory: BUDGET,
        ..Limits::default()
    };
    let e = http_sidecar_for("127.0.0.73", raw_app().await, limits, policy).await;
    let client = e.pki.workload(CLIENT);
    let cfg = client_config(
        &e.pki.roots(),
        &e.pki.trust_domain,
        Some(&client),
        &e.sidecar.id,
        &[b"h2"],
    );
    let tls = mtls_connect(e.sidecar.inbound[0], cfg).await.unwrap();
    let (mut sender, conn) =
        hyper::client::conn::http2::Builder::new(hyper_util::rt::TokioExecutor::new())
            .handshake::<_, Chunks>(hyper_util::rt::TokioIo::new(tls))
            .await
            .unwrap();
    let conn = tokio::spawn(async move { drop(conn.await) });
    let mut feeds: Vec<Feed> = Vec::new();
    let mut answers = tokio::task::JoinSet::new();
    for _ in 0..STREAMS {
        let (feed, chunks) = tokio::sync::mpsc::channel(1);
        let most = format!("a={}", "x".repeat(DECLARED - 3));
        feed.send(Ok(hyper::body::Frame::data(most.into())))
            .await
            .unwrap();
        feeds.push(feed);
        let req = http::Request::post("https://app/api/x")
            .header("content-type", "application/x-www-form-urlencoded")
            .header("content-length", DECLARED)
            .body(http_body_util::StreamBody::new(
                tokio_stream::wrappers::ReceiverStream::new(chunks),
            ))
            .unwrap();
        sender.ready().await.unwrap();
        let answer = sender.send_request(req);
        answers.spawn(async move {
            let resp = answer.await?;
            let status = resp.status();
            let body = resp.into_body().collect().await?.to_bytes();
            Ok::<_, hyper::Error>((status, String::from_utf8_lossy(&body).into_owned()))
        });
    }
    // The streams past the budget are refused at once; the others wait for the rest of their body.
    for _ in HELD..STREAMS {
        let (status, body) = tokio::time::timeout(Duration::from_secs(10), answers.join_next())
            .await
            .expect("a stream past the budget is answered at once")
            .unwrap()
            .unwrap()
            .unwrap();
        assert_eq!(status, 503, "{body}");
        assert!(body.contains("--form-body-memory"), "{body}");
    }
    assert!(
        tokio::time::timeout(Duration::from_millis(500), answers.join_next())
            .await
            .is_err(),
        "the streams within the budget are still being read"
    );
    // A form larger than what the held streams leave (over HTTP/1.1, another connection): refused,
    // with its length declared (charged at once) or chunked (charged as its buffer grows).
    let form = format!("a=1&_method=post&b={}", "x".repeat(30_000));
    let post_form = |chunked: bool| {
        let framing = if chunked {
            format!(
                "Transfer-Encoding: chunked\r\n\r\n{:x}\r\n{form}\r\n0\r\n\r\n",
                form.len()
            )
        } else {
            format!("Content-Length: {}\r\n\r\n{form}", form.len())
        };
        let tls = connect_as(&e.pki, &e.sidecar, &client);
        async move {
            exchange(
                tls.await.unwrap(),
                &format!(
                    "POST /api/x HTTP/1.1\r\nHost: app\r\n\
                     Content-Type: application/x-www-form-urlencoded\r\n\
                     Connection: close\r\n{framing}"
                ),
            )
            .await
        }
    };
    for chunked in [false, true] {
        let resp = post_form(chunked).await;
        assert!(
            resp.starts_with("HTTP/1.1 503"),
            "chunked {chunked}: {resp}"
        );
    }
    let m = e.sidecar.metrics().await;
    assert_eq!(
        metric(&m, "meshid_sidecar_form_bodies_refused_total"),
        (STREAMS - HELD + 2) as f64,
        "{m}"
    );
    // The peer goes (its streams with it): the budget is given back, and the forms are read.
    answers.abort_all();
    drop((feeds, sender));
    conn.abort();
    for chunked in [false, true] {
        let served = eventually(Duration::from_secs(10), || async {
            post_form(chunked).await.starts_with("HTTP/1.1 200")
        })
        .await;
        assert!(
            served,
            "chunked {chunked}: the form is read once the streams are gone"
        );
    }
}

/// One peer holds at most a quarter of `--form-body-memory` (never less than one largest form):
/// its unfinished form bodies past that are answered 503 at once, naming its share, while another
/// peer's form is still read and served.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_peer_cannot_take_the_whole_form_budget() {
    const BUDGET: usize = 4 << 20;
    const DECLARED: usize = 300 * 1024;
    let policy = format!(
        "inbound:\n  - port: {{port0}}\n    protocol: http\n    allow:\n      \
         - id: {CLIENT}\n        methods: [GET, POST]\n        paths: [/api/*]\n      \
         - id: {OTHER}\n        methods: [GET, POST]\n        paths: [/api/*]\n"
    );
    let limits = Limits {
        form_body_memory: BUDGET,
        ..Limits::default()
    };
    let e = http_sidecar_for("127.0.0.74", raw_app().await, limits, policy).await;
    let head = |len: usize| {
        format!(
            "POST /api/x HTTP/1.1\r\nHost: app\r\n\
             Content-Type: application/x-www-form-urlencoded\r\n\
             Content-Length: {len}\r\nConnection: close\r\n\r\na="
        )
    };
    // Three unfinished forms of one peer: its whole share (1 MiB of the 4).
    let client = e.pki.workload(CLIENT);
    let mut held = Vec::new();
    for _ in 0..3 {
        let mut tls = connect_as(&e.pki, &e.sidecar, &client).await.unwrap();
        tls.write_all(head(DECLARED).as_bytes()).await.unwrap();
        held.push(tls);
    }
    // Its fourth is refused at once, though three quarters of the budget are free.
    let fourth = {
        let mut tls = connect_as(&e.pki, &e.sidecar, &client).await.unwrap();
        tls.write_all(head(DECLARED).as_bytes()).await.unwrap();
        let mut out = Vec::new();
        tokio::time::timeout(Duration::from_secs(10), tls.read_to_end(&mut out))
            .await
            .expect("refused at once")
            .unwrap();
        String::from_utf8_lossy(&out).into_owned()
    };
    assert!(fourth.starts_with("HTTP/1.1 503"), "{fourth}");
    assert!(fourth.contains("share"), "{fourth}");
    // Another peer's form is read whole and served meanwhile.
    let form = format!("a=1&_method=post&b={}", "x".repeat(DECLARED));
    let other = connect_as(&e.pki, &e.sidecar, &e.pki.workload(OTHER))
        .await
        .unwrap();
    let resp = exchange(
        other,
        &format!(
            "POST /api/x HTTP/1.1\r\nHost: app\r\n\
             Content-Type: application/x-www-form-urlencoded\r\n\
             Content-Length: {}\r\nConnection: close\r\n\r\n{form}",
            form.len()
        ),
    )
    .await;
    assert!(
        resp.starts_with("HTTP/1.1 200"),
        "{}",
        &resp[..resp.len().min(300)]
    );
    let m = e.sidecar.metrics().await;
    assert!(m.contains("reason=\"peer_share\""), "{m}");
    drop(held);
}

/// Writes a whole request (head and body) and reads the answer to its end.
async fn exchange(mut tls: Tls, request: &str) -> String {
    // Written beside the read: a refusal may come before the whole request is taken.
    let (mut rd, mut wr) = tokio::io::split(&mut tls);
    let write = async {
        let _ = wr.write_all(request.as_bytes()).await;
    };
    let read = async {
        let mut out = Vec::new();
        let _ = tokio::time::timeout(Duration::from_secs(10), rd.read_to_end(&mut out)).await;
        out
    };
    let ((), out) = tokio::join!(write, read);
    String::from_utf8_lossy(&out).into_owned()
}

/// Just over the largest form body the sidecar reads to find `_method`.
fn super_big() -> usize {
    meshid_sidecar::inbound::http::MAX_FORM_BODY + 1
}

/// An h2 connection to the sidecar's inbound as `who`, with the stream window `window`: the
/// request sender, and the connection's driver (ends when the connection does).
async fn h2_as(
    e: &Http,
    who: &Workload,
    window: u32,
) -> (
    hyper::client::conn::http2::SendRequest<http_body_util::Empty<bytes::Bytes>>,
    tokio::task::JoinHandle<()>,
) {
    let cfg = client_config(
        &e.pki.roots(),
        &e.pki.trust_domain,
        Some(who),
        &e.sidecar.id,
        &[b"h2"],
    );
    let tls = mtls_connect(e.sidecar.inbound[0], cfg).await.unwrap();
    let (sender, conn) =
        hyper::client::conn::http2::Builder::new(hyper_util::rt::TokioExecutor::new())
            .initial_stream_window_size(window)
            .handshake(hyper_util::rt::TokioIo::new(tls))
            .await
            .unwrap();
    (sender, tokio::spawn(async move { drop(conn.await) }))
}

/// Eight responses asked for on an h2 connection as `who` with a window of zero: every head
/// arrives, no body can (kept, so that nothing is reset), and the connection's driver.
async fn untaken_responses(
    e: &Http,
    who: &Workload,
) -> (
    Vec<http::Response<hyper::body::Incoming>>,
    tokio::task::JoinHandle<()>,
) {
    let (mut stuck, conn) = h2_as(e, who, 0).await;
    let mut heads = Vec::new();
    for _ in 0..8 {
        let resp = stuck.send_request(h2_get()).await.unwrap();
        assert_eq!(resp.status(), 200);
        heads.push(resp);
    }
    (heads, conn)
}

fn h2_get() -> http::Request<http_body_util::Empty<bytes::Bytes>> {
    http::Request::get("https://app/api/x")
        .body(http_body_util::Empty::new())
        .unwrap()
}

/// An HTTP/1.1 app that answers every request with a 1 MiB body, and counts the connections it
/// has open.
async fn big_app() -> (SocketAddr, Arc<std::sync::atomic::AtomicUsize>) {
    use std::sync::atomic::Ordering::Relaxed;
    let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = l.local_addr().unwrap();
    let open = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let counted = open.clone();
    tokio::spawn(async move {
        let body = vec![b'x'; 1 << 20];
        let body: Arc<[u8]> = body.into();
        while let Ok((mut s, _)) = l.accept().await {
            let (open, body) = (counted.clone(), body.clone());
            open.fetch_add(1, Relaxed);
            tokio::spawn(async move {
                while app_read_head(&mut s).await.is_some() {
                    let reply =
                        format!("HTTP/1.1 200 OK\r\nContent-Length: {}\r\n\r\n", body.len());
                    if s.write_all(reply.as_bytes()).await.is_err()
                        || s.write_all(&body).await.is_err()
                    {
                        break;
                    }
                }
                open.fetch_sub(1, Relaxed);
            });
        }
    });
    (addr, open)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_h2_peer_that_stops_reading_is_closed_at_the_idle_timeout() {
    use std::sync::atomic::Ordering::Relaxed;
    let (app, app_connections) = big_app().await;
    let limits = Limits {
        idle_timeout: Duration::from_secs(1),
        ..Limits::default()
    };
    let e = http_sidecar_for("127.0.0.38", app, limits, http_policy(&[CLIENT])).await;
    let client = e.pki.workload(CLIENT);

    // A window of zero: every response's head arrives, its body never can. Each holds the app
    // connection it comes from (1 MiB does not fit in h2's send buffer).
    let (heads, stuck_conn) = untaken_responses(&e, &client).await;
    assert!(
        app_connections.load(Relaxed) >= 8,
        "each response holds an app connection"
    );
    // A peer that reads, and keeps asking, beside it.
    let (mut reading, reading_conn) = h2_as(&e, &client, 65_535).await;
    let started = Instant::now();
    while started.elapsed() < Duration::from_secs(4) {
        let resp = reading.send_request(h2_get()).await.unwrap();
        assert_eq!(resp.status(), 200);
        let body = http_body_util::BodyExt::collect(resp.into_body())
            .await
            .unwrap();
        assert_eq!(body.to_bytes().len(), 1 << 20);
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    assert!(
        stuck_conn.is_finished(),
        "the connection whose peer took no response was still open after 4 idle timeouts"
    );
    assert!(
        eventually(Duration::from_secs(5), || async {
            app_connections.load(Relaxed) <= 1
        })
        .await,
        "the app connections the untaken responses held were not let go: {}",
        app_connections.load(Relaxed)
    );
    assert!(
        !reading_conn.is_finished(),
        "a connection in use was closed"
    );
    // Once it stops asking, the reading one is closed too (gracefully: idle).
    assert!(
        tokio::time::timeout(Duration::from_secs(4), reading_conn)
            .await
            .is_ok(),
        "an idle h2 connection stayed open past twice the idle timeout"
    );
    drop(heads);
}

/// A peer that leaves its responses untaken (window zero) but keeps asking on the same connection,
/// a request every half idle timeout, is closed all the same: the stalled-peer watch does not wait
/// for the whole connection to fall quiet, only for a response held through two idle periods.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_h2_peer_that_keeps_asking_but_takes_nothing_is_closed() {
    let (app, _open) = big_app().await;
    let limits = Limits {
        idle_timeout: Duration::from_secs(1),
        ..Limits::default()
    };
    let e = http_sidecar_for("127.0.0.59", app, limits, http_policy(&[CLIENT])).await;
    let (mut stuck, stuck_conn) = h2_as(&e, &e.pki.workload(CLIENT), 0).await;
    let mut heads = Vec::new();
    for _ in 0..8 {
        let resp = stuck.send_request(h2_get()).await.unwrap();
        assert_eq!(resp.status(), 200);
        heads.push(resp);
    }
    let started = Instant::now();
    while started.elapsed() < Duration::from_secs(6) && !stuck_conn.is_finished() {
        // Asked and let go (reset) at once: it moves the connection, takes nothing.
        if let Ok(Ok(resp)) =
            tokio::time::timeout(Duration::from_millis(400), stuck.send_request(h2_get())).await
        {
            drop(resp);
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(
        stuck_conn.is_finished(),
        "still open after 6 idle timeouts of untaken responses and a request every 500 ms"
    );
    drop(heads);
}

/// An h2c app (gRPC's kind) that answers every request with 3 MiB.
async fn big_h2c_app() -> SocketAddr {
    let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = l.local_addr().unwrap();
    let body = bytes::Bytes::from(vec![b'x'; 3 << 20]);
    tokio::spawn(async move {
        while let Ok((s, _)) = l.accept().await {
            let body = body.clone();
            let svc = hyper::service::service_fn(move |_req| {
                let body = body.clone();
                async move {
                    Ok::<_, std::convert::Infallible>(http::Response::new(
                        http_body_util::Full::new(body),
                    ))
                }
            });
            tokio::spawn(
                hyper::server::conn::http2::Builder::new(hyper_util::rt::TokioExecutor::new())
                    .serve_connection(hyper_util::rt::TokioIo::new(s), svc),
            );
        }
    });
    addr
}

/// A peer that asks the app for h2 answers (gRPC, or the sidecars' h2 hint) and never takes
/// them holds only what its own connection uses: another peer's h2 calls to the same app still
/// go through. With one h2 connection to the app for every peer, the untaken answers filled that
/// connection's flow-control window, and every other peer's h2 answer stalled behind them.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_peer_that_takes_no_h2_answers_does_not_stall_another_peers() {
    let e = http_sidecar_for(
        "127.0.0.60",
        big_h2c_app().await,
        Limits::default(),
        http_policy(&[CLIENT, OTHER]),
    )
    .await;
    let hinted = || {
        http::Request::get("https://app/api/x")
            .header("x-meshid-app-h2", "1")
            .body(http_body_util::Empty::<bytes::Bytes>::new())
            .unwrap()
    };
    let (mut stuck, stuck_conn) = h2_as(&e, &e.pki.workload(CLIENT), 0).await;
    let mut heads = Vec::new();
    for _ in 0..4 {
        let resp = stuck.send_request(hinted()).await.unwrap();
        assert_eq!(resp.status(), 200);
        heads.push(resp);
    }
    // Time for the app to send what the windows let it.
    tokio::time::sleep(Duration::from_millis(500)).await;
    let (mut other, _other_conn) = h2_as(&e, &e.pki.workload(OTHER), 65_535).await;
    let answered = tokio::time::timeout(Duration::from_secs(5), async {
        let resp = other.send_request(hinted()).await.unwrap();
        assert_eq!(resp.status(), 200);
        http_body_util::BodyExt::collect(resp.into_body())
            .await
            .unwrap()
            .to_bytes()
            .len()
    })
    .await
    .expect("the other peer's answer within 5 s");
    assert_eq!(answered, 3 << 20);
    drop((heads, stuck_conn));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn untaken_small_h2_responses_do_not_hold_a_connection_past_the_grace_period() {
    // Small responses leave the app at once (h2 holds them whole, waiting for the window): the
    // connection looks idle, and its graceful close waits for the peer to take them. Not longer
    // than the grace period.
    let limits = Limits {
        idle_timeout: Duration::from_secs(1),
        grace: Duration::from_secs(1),
        ..Limits::default()
    };
    let e = http_sidecar("127.0.0.39", limits, http_policy(&[CLIENT])).await;
    let client = e.pki.workload(CLIENT);
    let (heads, stuck_conn) = untaken_responses(&e, &client).await;
    assert!(
        tokio::time::timeout(Duration::from_secs(6), stuck_conn)
            .await
            .is_ok(),
        "still open after twice the idle timeout and the grace period"
    );
    drop(heads);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tunnels_keep_their_connection_permit_under_an_upgrade_flood() {
    const MAX: usize = 8;
    const FLOOD: usize = 10_000;
    let limits = Limits {
        max_connections: MAX,
        ..Limits::default()
    };
    let e = Arc::new(http_sidecar("127.0.0.42", limits, http_policy(&[CLIENT])).await);
    let client = e.pki.workload(CLIENT);
    let mut tunnels = Vec::new();
    for _ in 0..MAX {
        tunnels.push(open_tunnel(&e.pki, &e.sidecar, &client).await);
    }
    // Every further connection is refused at the limit, however many come: the sidecar closes it
    // before any TLS, and counts it.
    let addr = e.sidecar.inbound[0];
    let mut flood = Vec::new();
    for _ in 0..(FLOOD / 500) {
        flood.push(tokio::spawn(async move {
            for _ in 0..500 {
                if let Ok(mut tcp) = TcpStream::connect(addr).await {
                    let mut b = [0u8; 1];
                    let _ = tokio::time::timeout(Duration::from_secs(5), tcp.read(&mut b)).await;
                }
            }
        }));
    }
    for f in flood {
        f.await.unwrap();
    }
    assert!(
        connect_as(&e.pki, &e.sidecar, &client).await.is_err(),
        "an mTLS connection past the limit was served"
    );
    let m = e.sidecar.metrics().await;
    assert!(
        metric(&m, "meshid_sidecar_connections_refused_total") > FLOOD as f64,
        "{m}"
    );
    assert_eq!(
        metric(&m, "meshid_sidecar_connections_open{direction=\"inbound\""),
        MAX as f64,
        "the tunnels count as open connections: {m}"
    );
    // The tunnels still work; closing them gives the room back.
    let mut t = tunnels.pop().unwrap();
    t.write_all(b"pong").await.unwrap();
    let mut back = [0u8; 4];
    t.read_exact(&mut back).await.unwrap();
    assert_eq!(&back, b"pong");
    drop(t);
    drop(tunnels);
    let e2 = e.clone();
    let back_in = eventually(Duration::from_secs(10), || {
        let e = e2.clone();
        let client = client.clone();
        async move {
            match connect_as(&e.pki, &e.sidecar, &client).await {
                Ok(tls) => raw_request(tls, "GET /api/x HTTP/1.1\r\nHost: app\r\n")
                    .await
                    .starts_with("HTTP/1.1 200"),
                Err(_) => false,
            }
        }
    })
    .await;
    assert!(back_in, "closed tunnels gave their permits back");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_tunnel_closes_at_its_peer_certificates_expiry() {
    let e = http_sidecar("127.0.0.43", Limits::default(), http_policy(&[CLIENT])).await;
    // A certificate with about three seconds left.
    let short = e.pki.workload_at(
        CLIENT,
        OffsetDateTime::now_utc() - time::Duration::minutes(1),
        Duration::from_secs(63),
    );
    let mut tunnel = open_tunnel(&e.pki, &e.sidecar, &short).await;
    assert!(
        tunnel_ends_within(&mut tunnel, Duration::from_secs(15)).await,
        "the tunnel outlived its peer's certificate"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_policy_that_drops_the_peer_closes_its_tunnels() {
    let e = http_sidecar(
        "127.0.0.44",
        Limits::default(),
        http_policy(&[CLIENT, OTHER]),
    )
    .await;
    let client = e.pki.workload(CLIENT);
    let other = e.pki.workload(OTHER);
    let mut dropped = open_tunnel(&e.pki, &e.sidecar, &client).await;
    let mut kept = open_tunnel(&e.pki, &e.sidecar, &other).await;
    // A change that still allows both keeps both.
    apply_policy(
        &e.sidecar,
        &http_policy(&[CLIENT, OTHER]).replace("/api/*]", "/api/*, /more]"),
    )
    .await;
    assert!(!tunnel_ends_within(&mut dropped, Duration::from_secs(2)).await);
    apply_policy(&e.sidecar, &http_policy(&[OTHER])).await;
    assert!(
        tunnel_ends_within(&mut dropped, Duration::from_secs(10)).await,
        "the dropped peer's tunnel stayed open"
    );
    assert!(
        !tunnel_ends_within(&mut kept, Duration::from_secs(2)).await,
        "the allowed peer's tunnel was closed"
    );
    let m = e.sidecar.metrics().await;
    assert_eq!(
        metric(&m, "meshid_sidecar_connections_revoked_total"),
        1.0,
        "{m}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_policy_that_drops_the_peer_closes_its_tcp_connections() {
    let Http { pki, sidecar } = tcp_sidecar("127.0.0.45", tcp_echo().await, &[CLIENT, OTHER]).await;
    let client = pki.workload(CLIENT);
    let other = pki.workload(OTHER);
    let mut dropped = tcp_connect_as(&pki, &sidecar, &client).await.unwrap();
    let mut kept = tcp_connect_as(&pki, &sidecar, &other).await.unwrap();
    for c in [&mut dropped, &mut kept] {
        assert!(!tunnel_ends_within(c, Duration::from_millis(600)).await);
    }
    sidecar.write_policy(&tcp_policy(&[OTHER]));
    assert!(
        tunnel_ends_within(&mut dropped, Duration::from_secs(10)).await,
        "the dropped peer's TCP connection stayed open"
    );
    assert!(!tunnel_ends_within(&mut kept, Duration::from_secs(2)).await);
    let m = sidecar.metrics().await;
    assert!(
        m.contains("meshid_sidecar_connections_revoked_total{direction=\"inbound\",port=")
            && metric(&m, "meshid_sidecar_connections_revoked_total") == 1.0,
        "{m}"
    );
}

/// A TCP-mode stream the peer's side cut short (its TCP connection closed without TLS's
/// `close_notify`: a FIN that anyone on the path can forge) reaches the app as a reset, never as
/// an ordinary end; one the peer closed cleanly ends with a FIN.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_tcp_stream_cut_short_reaches_the_app_as_a_reset() {
    let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let app = l.local_addr().unwrap();
    let (tx, mut ends) = tokio::sync::mpsc::unbounded_channel();
    tokio::spawn(async move {
        while let Ok((mut s, _)) = l.accept().await {
            let tx = tx.clone();
            tokio::spawn(async move {
                let mut got = Vec::new();
                let end = s.read_to_end(&mut got).await.map_err(|e| e.kind());
                let _ = tx.send(end.map(|_| got));
            });
        }
    });
    let Http { pki, sidecar } = tcp_sidecar("127.0.0.56", app, &[CLIENT]).await;
    let client = pki.workload(CLIENT);
    let connect = || tcp_connect_as(&pki, &sidecar, &client);
    let mut whole = connect().await.unwrap();
    whole.write_all(b"all of it").await.unwrap();
    whole.shutdown().await.unwrap();
    let ended = tokio::time::timeout(Duration::from_secs(10), ends.recv());
    let ended = ended.await.expect("the app's connection ends").unwrap();
    assert_eq!(ended, Ok(b"all of it".to_vec()));
    let mut cut = connect().await.unwrap();
    cut.write_all(b"part of").await.unwrap();
    cut.flush().await.unwrap();
    tokio::time::sleep(Duration::from_millis(200)).await;
    // A FIN on the TCP connection, no close_notify.
    cut.get_mut().0.shutdown().await.unwrap();
    let ended = tokio::time::timeout(Duration::from_secs(10), ends.recv());
    let ended = ended.await.expect("the app's connection ends").unwrap();
    assert_eq!(ended, Err(std::io::ErrorKind::ConnectionReset));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn outbound_refuses_a_host_that_is_not_an_authority() {
    let pki = TestPki::new();
    let me = pki.workload(CLIENT);
    // The upstream is never reached: nothing listens there.
    let upstream = free_addr("127.0.0.46");
    let sidecar = TestSidecar::start(
        &pki,
        &me,
        CLIENT,
        SidecarSpec {
            outbound: vec![(upstream.to_string(), SERVER.into(), Protocol::Http)],
            ..Default::default()
        },
    )
    .await;
    let local = sidecar.outbound[0];
    // One request with these header lines, on a connection of its own: the answer.
    let ask = |host_lines: String| async move {
        let mut tcp = TcpStream::connect(local).await.unwrap();
        let head = format!("GET /path HTTP/1.1\r\n{host_lines}Connection: close\r\n\r\n");
        tcp.write_all(head.as_bytes()).await.unwrap();
        let mut out = String::new();
        tcp.read_to_string(&mut out).await.unwrap();
        out
    };
    for host in ["a/b?c", "a/b", "x#y", "user@backend", "a?b"] {
        let out = ask(format!("Host: {host}\r\n")).await;
        assert!(out.starts_with("HTTP/1.1 400"), "{host}: {out}");
        assert!(
            out.to_lowercase().contains("x-meshid-reason: invalid host"),
            "{host}: {out}"
        );
    }
    // A valid Host with a second one after it: the second would reach the upstream unchecked.
    let out = ask("Host: backend\r\nHost: evil.example/admin?x=@y\r\n".into()).await;
    assert!(out.starts_with("HTTP/1.1 400"), "{out}");
    assert!(
        out.to_lowercase()
            .contains("x-meshid-reason: more than one host header"),
        "{out}"
    );
    // CONNECT is refused as upgrades are (it went to the upstream as an h2 CONNECT).
    let mut tcp = TcpStream::connect(local).await.unwrap();
    tcp.write_all(b"CONNECT backend:443 HTTP/1.1\r\nHost: backend:443\r\n\r\n")
        .await
        .unwrap();
    let mut out = vec![0; 1024];
    let n = tokio::time::timeout(Duration::from_secs(10), tcp.read(&mut out))
        .await
        .unwrap()
        .unwrap();
    let out = String::from_utf8_lossy(&out[..n]);
    assert!(out.starts_with("HTTP/1.1 501"), "CONNECT: {out}");
    // A valid Host gets past the check (and fails only at the unreachable upstream). The listener
    // keeps the last valid Host it checked: one that differs is checked afresh.
    for (host, want) in [
        ("backend:8080", "HTTP/1.1 502"),
        ("backend:8080/admin", "HTTP/1.1 400"),
        ("backend:8080", "HTTP/1.1 502"),
    ] {
        let out = ask(format!("Host: {host}\r\n")).await;
        assert!(out.starts_with(want), "{host}: {out}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_admin_port_forwards_only_valid_probes_at_a_bounded_rate() {
    let app = http_echo().await;
    let pki = TestPki::new();
    let server = pki.workload(SERVER);
    let probes = format!(
        r#"{{"app/readiness":{{"port":{p},"path":"/ready"}},"app/evil":{{"port":{p},"path":"/x HTTP/1.1\r\nHost: evil\r\nX-Injected: 1\r\n\r\nGET /y"}},"app/lf":{{"port":{p},"path":"/x\nX-Injected: 1"}},"app/relative":{{"port":{p},"path":"ready"}}}}"#,
        p = app.port()
    );
    let annotations = meshid_tests::mesh::probe_annotations(CLIENT, &probes);
    let sidecar = TestSidecar::start(
        &pki,
        &server,
        SERVER,
        SidecarSpec {
            inbound: vec![("127.0.0.47", app, Protocol::Http)],
            policy: Some(annotations),
            stats: true,
            ..Default::default()
        },
    )
    .await;
    let admin = sidecar.admin;
    let stats = sidecar.stats.unwrap();
    let results = tokio::task::spawn_blocking(move || {
        let get = |addr, path: &str| http_get(addr, path).unwrap();
        let mut r = vec![get(admin, "/app-health/app/readiness")];
        for key in ["evil", "lf", "relative"] {
            r.push(get(admin, &format!("/app-health/app/{key}")));
        }
        // The stats split: the admin port answers only what the kubelet needs.
        r.push(get(admin, "/metrics"));
        r.push(get(admin, "/identity"));
        r.push(get(admin, "/readyz"));
        r.push(get(stats, "/metrics"));
        r.push(get(stats, "/identity"));
        r.push(get(stats, "/app-health/app/readiness"));
        // A flood: past the burst, probes are answered 429 without touching the app.
        let mut limited = 0;
        for _ in 0..200 {
            if get(admin, "/app-health/app/readiness").0 == 429 {
                limited += 1;
            }
        }
        (r, limited)
    })
    .await
    .unwrap();
    let (r, limited) = results;
    assert_eq!(r[0].0, 200, "a valid probe is forwarded: {}", r[0].1);
    for (i, key) in ["evil", "lf", "relative"].iter().enumerate() {
        let (code, body) = &r[i + 1];
        assert_eq!(*code, 502, "{key}: {body}");
        assert!(body.contains("not a valid request path"), "{key}: {body}");
    }
    assert_eq!(r[4].0, 404, "metrics on the admin port: {}", r[4].1);
    assert_eq!(r[5].0, 404, "identity on the admin port: {}", r[5].1);
    assert_eq!(r[6].0, 200, "readiness on the admin port: {}", r[6].1);
    assert_eq!(r[7].0, 200);
    assert!(r[7].1.contains("meshid_sidecar_"), "{}", r[7].1);
    assert_eq!(r[8].0, 200);
    assert!(r[8].1.contains(SERVER), "{}", r[8].1);
    assert_eq!(r[9].0, 404, "probes are not on the stats port");
    assert!(
        limited >= 150,
        "only {limited} of 200 flooding probes were limited"
    );
    // The flood came from 127.0.0.1: the kubelet, from another address, is still answered.
    let sock = tokio::net::TcpSocket::new_v4().unwrap();
    sock.bind("127.0.0.64:0".parse().unwrap()).unwrap();
    let mut tcp = sock.connect(admin).await.unwrap();
    tcp.write_all(
        b"GET /app-health/app/readiness HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n",
    )
    .await
    .unwrap();
    let mut out = String::new();
    tcp.read_to_string(&mut out).await.unwrap();
    assert!(
        out.starts_with("HTTP/1.1 200"),
        "another source's probe: {out}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rejected_policy_reload_is_loud_and_can_fail_readiness() {
    let app = http_echo().await;
    let pki = TestPki::new();
    let server = pki.workload(SERVER);
    let client = pki.workload(CLIENT);
    let sidecar = TestSidecar::start(
        &pki,
        &server,
        SERVER,
        SidecarSpec {
            inbound: vec![("127.0.0.48", app, Protocol::Http)],
            policy: Some(http_policy(&[CLIENT])),
            unready_on_policy_error: true,
            ..Default::default()
        },
    )
    .await;
    let admin = sidecar.admin;
    let ready = move || http_get(admin, "/readyz").unwrap();
    assert_eq!(tokio::task::spawn_blocking(ready).await.unwrap().0, 200);
    sidecar.write_policy("inbound: [this is not a policy\n");
    let unready = eventually(Duration::from_secs(10), || async {
        tokio::task::spawn_blocking(ready).await.unwrap().0 == 503
    })
    .await;
    assert!(unready, "readiness still green after a rejected policy");
    let (_, body) = tokio::task::spawn_blocking(ready).await.unwrap();
    assert!(body.contains("policy file was rejected"), "{body}");
    let m = sidecar.metrics().await;
    assert!(m.contains("meshid_sidecar_policy_rejected 1"), "{m}");
    // The last good policy still decides.
    let cfg = client_config(
        &pki.roots(),
        &pki.trust_domain,
        Some(&client),
        &sidecar.id,
        &[b"http/1.1"],
    );
    let tls = mtls_connect(sidecar.inbound[0], cfg).await.unwrap();
    let resp = raw_request(tls, "GET /api/x HTTP/1.1\r\nHost: app\r\n").await;
    assert!(resp.starts_with("HTTP/1.1 200"), "{resp}");
    // A good file again: ready, and the gauge is back to 0.
    sidecar.write_policy(&http_policy(&[CLIENT]));
    let ready_again = eventually(Duration::from_secs(10), || async {
        tokio::task::spawn_blocking(ready).await.unwrap().0 == 200
    })
    .await;
    assert!(ready_again);
    assert!(
        sidecar
            .metrics()
            .await
            .contains("meshid_sidecar_policy_rejected 0")
    );
}

/// A real sidecar in file mode as `me`, with one listener (`listener`: `--inbound` or
/// `--outbound` and its value), its admin port on `admin`, the environment `env` (`None`: the
/// variable removed), stderr into `log`; under `sh -c "<shell>; exec ..."` when `shell` is given
/// (a `ulimit`, say). Returned once its admin port answers `/healthz`.
fn file_mode_sidecar(
    pki: &TestPki,
    me: &Workload,
    shell: Option<&str>,
    listener: [&str; 2],
    admin: SocketAddr,
    env: &[(&str, Option<&str>)],
    log: &std::path::Path,
) -> Proc {
    let bin = workspace_bin("meshid-sidecar");
    let mut cmd = match shell {
        Some(shell) => {
            let mut cmd = Command::new("sh");
            cmd.arg("-c")
                .arg(format!("{shell} && exec \"$0\" \"$@\""))
                .arg(&bin);
            cmd
        }
        None => Command::new(&bin),
    };
    cmd.args(["run", "--cert"])
        .arg(&me.cert_path)
        .arg("--key")
        .arg(&me.key_path)
        .arg("--bundle")
        .arg(&pki.bundle_path)
        .args(listener)
        .args(["--admin-listen", &admin.to_string()])
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(log).unwrap());
    for (name, value) in env {
        match value {
            Some(value) => cmd.env(name, value),
            None => cmd.env_remove(name),
        };
    }
    let sidecar = Proc::spawn("meshid-sidecar", &mut cmd);
    assert!(meshid_tests::process::wait_http_ok(
        admin,
        "/healthz",
        Duration::from_secs(10)
    ));
    sidecar
}

/// Out of file descriptors, the admin accept loop waits between attempts instead of spinning, and
/// serves again once descriptors are free. A real sidecar with a small descriptor limit.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_accept_loop_out_of_file_descriptors_backs_off() {
    let pki = TestPki::new();
    let me = pki.workload(SERVER);
    let app = tcp_echo().await;
    let work = tempfile::tempdir().unwrap();
    let log = work.path().join("sidecar.log");
    let admin = free_addr("127.0.0.49");
    let inbound = free_addr("127.0.0.49");
    let _sidecar = file_mode_sidecar(
        &pki,
        &me,
        Some("ulimit -n 64"),
        ["--inbound", &format!("{inbound}={app},tcp")],
        admin,
        &[("MESHID_LOG", Some("warn"))],
        &log,
    );
    // Take every descriptor the process has left, and hold them for three seconds.
    let mut held = Vec::new();
    for _ in 0..200 {
        if let Ok(s) = TcpStream::connect(admin).await {
            held.push(s);
        }
    }
    tokio::time::sleep(Duration::from_secs(3)).await;
    let text = std::fs::read_to_string(&log).unwrap();
    let failures = text.matches("accept failed").count();
    assert!(failures >= 1, "the descriptors never ran out: {text}");
    // Spinning, a loop logs a failure per attempt: many thousands in three seconds. Backing off
    // (a pause of 20 ms or more), at most about 150.
    assert!(
        failures <= 400,
        "{failures} accept failures in 3 s: the loop spins"
    );
    drop(held);
    assert!(
        meshid_tests::process::wait_http_ok(admin, "/healthz", Duration::from_secs(15)),
        "the admin port serves again once descriptors are free"
    );
}

/// A TLS 1.2 ClientHello (record and handshake framing by hand) whose server name is `name`, any
/// bytes at all: what no TLS library would send.
fn client_hello_with_server_name(name: &[u8]) -> Vec<u8> {
    let u16be = |n: usize| u16::try_from(n).unwrap().to_be_bytes();
    let mut sni = Vec::new();
    sni.extend_from_slice(&u16be(name.len() + 3)); // server_name_list
    sni.push(0); // host_name
    sni.extend_from_slice(&u16be(name.len()));
    sni.extend_from_slice(name);
    let mut extensions = vec![0, 0]; // server_name
    extensions.extend_from_slice(&u16be(sni.len()));
    extensions.extend_from_slice(&sni);
    let mut hello = vec![3, 3]; // TLS 1.2
    hello.extend_from_slice(&[7u8; 32]); // random
    hello.push(0); // no session id
    hello.extend_from_slice(&[0, 2, 0xc0, 0x2b]); // ECDHE_ECDSA_WITH_AES_128_GCM_SHA256
    hello.extend_from_slice(&[1, 0]); // no compression
    hello.extend_from_slice(&u16be(extensions.len()));
    hello.extend_from_slice(&extensions);
    let mut handshake = vec![1, 0]; // ClientHello, then a 24-bit length
    handshake.extend_from_slice(&u16be(hello.len()));
    handshake.extend_from_slice(&hello);
    let mut record = vec![22, 3, 1];
    record.extend_from_slice(&u16be(handshake.len()));
    record.extend_from_slice(&handshake);
    record
}

/// What rustls itself would log about a peer's handshake (warning alerts, an illegal server name
/// quoted whole) is not logged: anyone reaching a TLS port could otherwise write lines at will,
/// past the sidecar's own limit on its handshake lines (a burst of 50, then 10 a second). Before,
/// each of these connections wrote five warning lines, one of them holding 16 KB of the peer's
/// bytes. A real sidecar at the default log level.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn what_a_peer_sends_in_a_handshake_writes_few_log_lines() {
    let pki = TestPki::new();
    let me = pki.workload(SERVER);
    let app = tcp_echo().await;
    let work = tempfile::tempdir().unwrap();
    let log = work.path().join("sidecar.log");
    let admin = free_addr("127.0.0.93");
    let inbound = free_addr("127.0.0.93");
    let _sidecar = file_mode_sidecar(
        &pki,
        &me,
        None,
        ["--inbound", &format!("{inbound}={app},tcp")],
        admin,
        &[("MESHID_LOG", None), ("MESHID_LOG_FORMAT", Some("json"))],
        &log,
    );
    let started = Instant::now();
    // Four warning alerts (bad_certificate, at the warning level), then a server name of control
    // bytes.
    let mut hostile = [21u8, 3, 3, 0, 2, 1, 42].repeat(4);
    hostile.extend_from_slice(&client_hello_with_server_name(&[1u8; 16 * 1024]));
    const CONNECTIONS: usize = 100;
    for _ in 0..CONNECTIONS {
        let mut tcp = TcpStream::connect(inbound).await.unwrap();
        tcp.write_all(&hostile).await.unwrap();
        let mut sink = Vec::new();
        let _ = tokio::time::timeout(Duration::from_secs(5), tcp.read_to_end(&mut sink)).await;
    }
    let (_, metrics) = http_get(admin, "/metrics").unwrap();
    let elapsed = started.elapsed().as_secs_f64();
    let refused = meshid_tests::mesh::metric(
        &metrics,
        "meshid_sidecar_tls_handshake_failures_total{",
        &[],
    );
    assert!(refused >= CONNECTIONS as u64, "{metrics}");
    let text = std::fs::read_to_string(&log).unwrap();
    let lines: Vec<serde_json::Value> = text
        .lines()
        .filter_map(|l| serde_json::from_str(l).ok())
        .collect();
    let from_rustls: Vec<_> = lines
        .iter()
        .filter(|v| {
            v["target"]
                .as_str()
                .is_some_and(|t| t.starts_with("rustls"))
        })
        .collect();
    assert!(
        from_rustls.is_empty(),
        "{} rustls lines: {:?}",
        from_rustls.len(),
        from_rustls.first()
    );
    assert!(
        (lines.len() as f64) < 20.0 + 50.0 + 10.0 * elapsed,
        "{} lines in {elapsed:.1} s",
        lines.len()
    );
    assert!(text.len() < 256 * 1024, "{} bytes of log", text.len());
}

/// A local app that opens connections to an outbound whose upstream is down writes few log lines:
/// a burst of 20, then 5 a second (the next line counts those left out), while the metrics count
/// every failure. Before, each connection wrote a line.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connections_to_an_unavailable_upstream_write_few_log_lines() {
    let pki = TestPki::new();
    let me = pki.workload(CLIENT);
    let work = tempfile::tempdir().unwrap();
    let log = work.path().join("sidecar.log");
    let admin = free_addr("127.0.0.93");
    let outbound = free_addr("127.0.0.93");
    // Nothing listens there.
    let upstream = free_addr("127.0.0.93");
    let _sidecar = file_mode_sidecar(
        &pki,
        &me,
        None,
        ["--outbound", &format!("{outbound}={upstream},{SERVER},tcp")],
        admin,
        &[
            ("MESHID_LOG", Some("info")),
            ("MESHID_LOG_FORMAT", Some("json")),
        ],
        &log,
    );
    let started = Instant::now();
    const CONNECTIONS: usize = 300;
    for _ in 0..CONNECTIONS {
        let mut tcp = TcpStream::connect(outbound).await.unwrap();
        let mut sink = Vec::new();
        let _ = tokio::time::timeout(Duration::from_secs(5), tcp.read_to_end(&mut sink)).await;
    }
    let elapsed = started.elapsed().as_secs_f64();
    let text = std::fs::read_to_string(&log).unwrap();
    let lines = text
        .lines()
        .filter(|l| l.contains("upstream unavailable"))
        .count();
    assert!(lines >= 1, "{text}");
    assert!(
        (lines as f64) <= 20.0 + 5.0 * elapsed + 1.0,
        "{lines} lines for {CONNECTIONS} connections in {elapsed:.1} s"
    );
}

/// An app whose every response is an endless chunked body, a small chunk every 100 ms (a stream:
/// SSE, a gRPC server stream, a long download).
async fn streaming_app() -> SocketAddr {
    let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = l.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((mut s, _)) = l.accept().await {
            tokio::spawn(async move {
                let mut head = Vec::new();
                let mut buf = [0u8; 1024];
                while !head.windows(4).any(|w| w == b"\r\n\r\n") {
                    match s.read(&mut buf).await {
                        Ok(0) | Err(_) => return,
                        Ok(n) => head.extend_from_slice(&buf[..n]),
                    }
                }
                let start = b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n";
                if s.write_all(start).await.is_err() {
                    return;
                }
                while s.write_all(b"5\r\ntick\n\r\n").await.is_ok() {
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
            });
        }
    });
    addr
}

/// A stream response started as `who`, its head read.
async fn open_stream(pki: &TestPki, sidecar: &TestSidecar, who: &Workload) -> Tls {
    let mut tls = connect_as(pki, sidecar, who).await.unwrap();
    tls.write_all(b"GET /api/stream HTTP/1.1\r\nHost: app\r\n\r\n")
        .await
        .unwrap();
    let head = read_head(&mut tls).await;
    assert!(head.starts_with("HTTP/1.1 200"), "{head}");
    tls
}

/// Whether the stream ends (EOF or error) within `within`, read all along.
async fn stream_ends_within(tls: &mut Tls, within: Duration) -> bool {
    let mut buf = [0u8; 1024];
    let read = async { while let Ok(1..) = tls.read(&mut buf).await {} };
    tokio::time::timeout(within, read).await.is_ok()
}

/// A policy change that leaves no rule for a peer on the port ends its HTTP requests in flight (a
/// stream that never finishes by itself) within the grace period, as it closes the peer's tunnels;
/// another peer's stream goes on. Before, only tunnels and TCP connections were ended: the
/// stream went on for as long as the app sent it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_policy_that_drops_the_peer_ends_its_http_streams() {
    let limits = Limits {
        grace: Duration::from_secs(2),
        ..Limits::default()
    };
    let e = http_sidecar_for(
        "127.0.0.57",
        streaming_app().await,
        limits,
        http_policy(&[CLIENT, OTHER]),
    )
    .await;
    let client = e.pki.workload(CLIENT);
    let other = e.pki.workload(OTHER);
    let mut dropped = open_stream(&e.pki, &e.sidecar, &client).await;
    let mut kept = open_stream(&e.pki, &e.sidecar, &other).await;
    // A change that still allows both keeps both.
    apply_policy(
        &e.sidecar,
        &http_policy(&[CLIENT, OTHER]).replace("/api/*]", "/api/*, /more]"),
    )
    .await;
    assert!(!stream_ends_within(&mut dropped, Duration::from_secs(2)).await);
    apply_policy(&e.sidecar, &http_policy(&[OTHER])).await;
    assert!(
        stream_ends_within(&mut dropped, Duration::from_secs(10)).await,
        "the dropped peer's stream went on"
    );
    assert!(
        !stream_ends_within(&mut kept, Duration::from_secs(3)).await,
        "the allowed peer's stream was ended"
    );
    let m = e.sidecar.metrics().await;
    assert_eq!(
        metric(&m, "meshid_sidecar_connections_revoked_total"),
        1.0,
        "{m}"
    );
}

/// Responses a peer leaves untaken hold at most `max_app_connections` connections to the app: past
/// it a request is answered 503 at once, and once a held response goes its connection is free for
/// the next request. Before, every such response held one more app connection (a peer with an h2
/// window of zero and 200 streams on each of its connections could use up loopback's ephemeral
/// ports, and every other peer got 502). One peer identity holds at most a quarter of them (one,
/// of two): before, one peer's untaken responses could hold every app connection, and every other
/// peer was answered 503 until the idle timeout.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn responses_left_untaken_hold_no_more_app_connections_than_the_cap() {
    const THIRD: &str = "spiffe://cluster.local/ns/shop/sa/third";
    let limits = Limits {
        max_app_connections: 2,
        ..Limits::default()
    };
    let e = http_sidecar_for(
        "127.0.0.94",
        streaming_app().await,
        limits,
        http_policy(&[CLIENT, OTHER, THIRD]),
    )
    .await;
    let client = e.pki.workload(CLIENT);
    let other = e.pki.workload(OTHER);
    let third = e.pki.workload(THIRD);
    /// The 503's head and the start of its body, for `who`'s request of a stream.
    async fn refused(e: &Http, who: &Workload) -> String {
        let mut tls = connect_as(&e.pki, &e.sidecar, who).await.unwrap();
        tls.write_all(b"GET /api/stream HTTP/1.1\r\nHost: app\r\n\r\n")
            .await
            .unwrap();
        let head = read_head(&mut tls).await;
        assert!(head.starts_with("HTTP/1.1 503"), "{head}");
        let mut body = [0u8; 512];
        let n = tls.read(&mut body).await.unwrap();
        String::from_utf8_lossy(&body[..n]).into_owned()
    }
    let first = open_stream(&e.pki, &e.sidecar, &client).await;
    // The client's share is one: its second request waits on no app connection.
    let body = refused(&e, &client).await;
    assert!(body.contains("its share"), "{body}");
    // Another peer's is its own.
    let _second = open_stream(&e.pki, &e.sidecar, &other).await;
    let body = refused(&e, &third).await;
    assert!(body.contains("--max-app-connections"), "{body}");
    assert!(!body.contains("its share"), "{body}");
    drop(first);
    let freed = eventually(Duration::from_secs(10), || async {
        let mut tls = connect_as(&e.pki, &e.sidecar, &third).await.unwrap();
        tls.write_all(b"GET /api/stream HTTP/1.1\r\nHost: app\r\n\r\n")
            .await
            .unwrap();
        read_head(&mut tls).await.starts_with("HTTP/1.1 200")
    })
    .await;
    assert!(
        freed,
        "the dropped stream's app connection was never let go"
    );
}

/// An app that streams on `/stream` (a chunk every 100 ms, never ending) and answers `ok` to
/// anything else.
async fn stream_or_ok_app() -> SocketAddr {
    let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = l.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((mut s, _)) = l.accept().await {
            tokio::spawn(async move {
                loop {
                    let Some(head) = app_read_head(&mut s).await else {
                        return;
                    };
                    if head.starts_with(b"GET /hold ") {
                        // One chunk, then nothing more, the connection held open.
                        let start =
                            b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n5\r\nheld\n\r\n";
                        if s.write_all(start).await.is_ok() {
                            std::future::pending::<()>().await;
                        }
                        return;
                    }
                    if !head.starts_with(b"GET /stream ") {
                        let ok = b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok";
                        if s.write_all(ok).await.is_err() {
                            return;
                        }
                        continue;
                    }
                    let start = b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n";
                    if s.write_all(start).await.is_err() {
                        return;
                    }
                    while s.write_all(b"5\r\ntick\n\r\n").await.is_ok() {
                        tokio::time::sleep(Duration::from_millis(100)).await;
                    }
                    return;
                }
            });
        }
    });
    addr
}

/// `CLIENT` may GET `paths` on the listener (`mode` first: `enforce` or `audit`).
fn get_policy(mode: &str, paths: &str) -> String {
    format!(
        "mode: {mode}\ninbound:\n  - port: {{port0}}\n    protocol: http\n    allow:\n      - id: \
         {CLIENT}\n        methods: [GET]\n        paths: [{paths}]\n"
    )
}

/// Whether an h2 response body ends (reset, error or end) within `within`, read all along.
async fn h2_body_ends_within(body: &mut hyper::body::Incoming, within: Duration) -> bool {
    use http_body_util::BodyExt;
    let read = async { while let Some(Ok(_)) = body.frame().await {} };
    tokio::time::timeout(within, read).await.is_ok()
}

/// A policy change that only narrows what a peer may do (a path taken out of its rule, a rule for
/// it left) ends its requests in flight that the new policy denies: an h2 stream on `/stream` is
/// reset while a new request on `/other` on the same connection is answered, and an HTTP/1.1
/// stream ends with its connection. So is a response whose app has gone quiet (`/hold`): nothing
/// the app sends wakes it, the policy change alone must. Audit mode ends nothing. Before, only a
/// change leaving no rule for the peer ended anything: the streams went on for as long as the app
/// sent them.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_policy_that_narrows_the_peer_ends_its_requests_it_denies() {
    let e = http_sidecar_for(
        "127.0.0.65",
        stream_or_ok_app().await,
        Limits::default(),
        get_policy("enforce", "/stream, /hold, /other"),
    )
    .await;
    let client = e.pki.workload(CLIENT);
    let (mut h2, _conn) = h2_as(&e, &client, 65_535).await;
    let get = |path: &str| {
        http::Request::get(format!("https://app{path}"))
            .body(http_body_util::Empty::new())
            .unwrap()
    };
    let resp = h2.send_request(get("/stream")).await.unwrap();
    assert_eq!(resp.status(), 200);
    let mut streamed = resp.into_body();
    // A response whose app sends nothing after its first chunk: nothing the app does wakes it.
    let resp = h2.send_request(get("/hold")).await.unwrap();
    assert_eq!(resp.status(), 200);
    let mut held = resp.into_body();
    let first = http_body_util::BodyExt::frame(&mut held)
        .await
        .unwrap()
        .unwrap()
        .into_data()
        .unwrap();
    assert_eq!(&first[..], b"held\n");
    let mut h1 = connect_as(&e.pki, &e.sidecar, &client).await.unwrap();
    h1.write_all(b"GET /stream HTTP/1.1\r\nHost: app\r\n\r\n")
        .await
        .unwrap();
    assert!(read_head(&mut h1).await.starts_with("HTTP/1.1 200"));

    // Audit mode would deny them, and ends nothing.
    apply_policy(&e.sidecar, &get_policy("audit", "/other")).await;
    assert!(!h2_body_ends_within(&mut streamed, Duration::from_secs(2)).await);
    assert!(!stream_ends_within(&mut h1, Duration::from_millis(500)).await);

    apply_policy(&e.sidecar, &get_policy("enforce", "/other")).await;
    assert!(
        h2_body_ends_within(&mut streamed, Duration::from_secs(10)).await,
        "the h2 stream the policy no longer allows went on"
    );
    assert!(
        h2_body_ends_within(&mut held, Duration::from_secs(10)).await,
        "the held h2 stream the policy no longer allows went on"
    );
    assert!(
        stream_ends_within(&mut h1, Duration::from_secs(10)).await,
        "the HTTP/1.1 stream the policy no longer allows went on"
    );
    // The h2 connection goes on: a request the policy still allows is answered on it.
    let resp = h2.send_request(get("/other")).await.unwrap();
    assert_eq!(resp.status(), 200);
    let body = http_body_util::BodyExt::collect(resp.into_body())
        .await
        .unwrap()
        .to_bytes();
    assert_eq!(&body[..], b"ok");
    let m = e.sidecar.metrics().await;
    assert_eq!(
        metric(&m, "meshid_sidecar_requests_revoked_total"),
        3.0,
        "{m}"
    );
    assert_eq!(
        metric(&m, "meshid_sidecar_connections_revoked_total"),
        0.0,
        "{m}"
    );
}

/// A gRPC call waits for its response head as long as its deadline says (none here): a policy
/// change that no longer allows it ends it meanwhile (PERMISSION_DENIED, in gRPC's form), as it
/// ends a response in flight; a call still allowed goes on.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_policy_that_narrows_the_peer_ends_a_grpc_call_waiting_for_its_answer() {
    let e = http_sidecar_for(
        "127.0.0.96",
        http_echo().await,
        Limits {
            request_timeout: Duration::from_millis(300),
            ..Limits::default()
        },
        get_policy("enforce", "/slow, /other"),
    )
    .await;
    let client = e.pki.workload(CLIENT);
    let (mut h2, _conn) = h2_as(&e, &client, 65_535).await;
    let call = |path: &str| {
        http::Request::get(format!("https://app{path}"))
            .header("content-type", "application/grpc")
            .body(http_body_util::Empty::new())
            .unwrap()
    };
    let waiting = tokio::spawn(h2.send_request(call("/slow?ms=30000")));
    let allowed = tokio::spawn(h2.send_request(call("/other")));
    // Past --request-timeout: both still wait.
    tokio::time::sleep(Duration::from_millis(600)).await;
    assert!(!waiting.is_finished());
    apply_policy(&e.sidecar, &get_policy("enforce", "/other")).await;
    let resp = tokio::time::timeout(Duration::from_secs(10), waiting)
        .await
        .expect("the call the policy no longer allows went on waiting")
        .unwrap()
        .unwrap();
    assert_eq!(resp.status(), 200);
    assert_eq!(resp.headers()["grpc-status"], "7", "{:?}", resp.headers());
    let resp = allowed.await.unwrap().unwrap();
    assert_eq!(resp.status(), 200);
    assert!(
        resp.headers().get("grpc-status").is_none(),
        "{:?}",
        resp.headers()
    );
    let m = e.sidecar.metrics().await;
    assert_eq!(
        metric(&m, "meshid_sidecar_requests_revoked_total"),
        1.0,
        "{m}"
    );
}

/// A peer the policy has no rule for on an HTTP port is answered 403 request by request, and its
/// connections stay displaceable: it cannot hold every place of the listener (a request every few
/// minutes on each keeps them open) and turn away the callers the policy allows.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_peer_without_a_rule_cannot_hold_an_http_listeners_places() {
    const MAX: usize = 4;
    let limits = Limits {
        max_connections: MAX,
        ..Limits::default()
    };
    let e = http_sidecar("127.0.0.98", limits, http_policy(&[CLIENT])).await;
    let other = e.pki.workload(OTHER);
    let mut held = Vec::new();
    for _ in 0..MAX {
        let mut tls = connect_as(&e.pki, &e.sidecar, &other).await.unwrap();
        tls.write_all(b"GET /api/x HTTP/1.1\r\nHost: app\r\n\r\n")
            .await
            .unwrap();
        let head = read_head(&mut tls).await;
        assert!(head.starts_with("HTTP/1.1 403"), "{head}");
        held.push(tls);
    }
    // Every place is taken by the peer without a rule: the allowed caller still gets in.
    let tls = connect_as(&e.pki, &e.sidecar, &e.pki.workload(CLIENT))
        .await
        .expect("the allowed caller was refused at the limit");
    let resp = raw_request(tls, "GET /api/x HTTP/1.1\r\nHost: app\r\n").await;
    assert!(resp.starts_with("HTTP/1.1 200"), "{resp}");
    // While allowed callers hold every place, a peer without a rule is refused.
    let client = e.pki.workload(CLIENT);
    let mut allowed = Vec::new();
    for _ in 0..MAX {
        let mut tls = connect_as(&e.pki, &e.sidecar, &client).await.unwrap();
        tls.write_all(b"GET /api/x HTTP/1.1\r\nHost: app\r\n\r\n")
            .await
            .unwrap();
        assert!(read_head(&mut tls).await.starts_with("HTTP/1.1 200"));
        allowed.push(tls);
    }
    let refused = match connect_as(&e.pki, &e.sidecar, &other).await {
        Err(_) => true,
        Ok(mut tls) => {
            let _ = tls
                .write_all(b"GET /api/x HTTP/1.1\r\nHost: app\r\n\r\n")
                .await;
            let mut b = [0u8; 1];
            matches!(
                tokio::time::timeout(Duration::from_secs(5), tls.read(&mut b)).await,
                Ok(Ok(0) | Err(_))
            )
        }
    };
    assert!(
        refused,
        "a peer without a rule took an allowed caller's place"
    );
    drop(held);
}

/// An upload in flight (its body still streaming to the app, no answer yet) is ended by a policy
/// change that no longer allows it: 403, and the body stops there. Before, it went on to the app
/// until the app answered or `--request-timeout` (30 s) passed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_policy_that_narrows_the_peer_ends_its_upload_in_flight() {
    let policy = |paths: &str| {
        format!(
            "inbound:\n  - port: {{port0}}\n    protocol: http\n    allow:\n      - id: \
             {CLIENT}\n        methods: [POST]\n        paths: [{paths}]\n"
        )
    };
    let e = http_sidecar_for(
        "127.0.0.97",
        http_echo().await,
        Limits::default(),
        policy("/up, /other"),
    )
    .await;
    let cfg = client_config(
        &e.pki.roots(),
        &e.pki.trust_domain,
        Some(&e.pki.workload(CLIENT)),
        &e.sidecar.id,
        &[b"h2"],
    );
    let tls = mtls_connect(e.sidecar.inbound[0], cfg).await.unwrap();
    let (client, conn) = h2::client::handshake(tls).await.unwrap();
    tokio::spawn(conn);
    let mut client = client.ready().await.unwrap();
    // Not a form (whose body is read whole before it is decided: see
    // `a_policy_that_narrows_the_peer_while_its_form_is_read_refuses_the_request`).
    let req = http::Request::post("https://app/up")
        .header("content-type", "application/octet-stream")
        .body(())
        .unwrap();
    let (resp, mut upload) = client.send_request(req, false).unwrap();
    upload
        .send_data(bytes::Bytes::from_static(b"part one"), false)
        .unwrap();
    tokio::time::sleep(Duration::from_millis(300)).await;
    apply_policy(&e.sidecar, &policy("/other")).await;
    let resp = match tokio::time::timeout(Duration::from_secs(10), resp).await {
        Ok(resp) => resp.unwrap(),
        Err(_) => panic!(
            "the upload the policy no longer allows went on:\n{}",
            e.sidecar.metrics().await
        ),
    };
    assert_eq!(resp.status(), 403);
    let m = e.sidecar.metrics().await;
    assert_eq!(
        metric(&m, "meshid_sidecar_requests_revoked_total"),
        1.0,
        "{m}"
    );
    // A request the new policy allows is served on the same connection, body and all.
    let mut client = client.ready().await.unwrap();
    let req = http::Request::post("https://app/other").body(()).unwrap();
    let (resp, mut upload) = client.send_request(req, false).unwrap();
    upload
        .send_data(bytes::Bytes::from_static(b"whole"), true)
        .unwrap();
    let resp = resp.await.unwrap();
    assert_eq!(resp.status(), 200);
}

/// An app that answers `ok` to every request (and closes), counting the request heads it got.
async fn counting_app() -> (SocketAddr, Arc<std::sync::atomic::AtomicUsize>) {
    use std::sync::atomic::Ordering::Relaxed;
    let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = l.local_addr().unwrap();
    let seen = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let counted = seen.clone();
    tokio::spawn(async move {
        while let Ok((mut s, _)) = l.accept().await {
            let counted = counted.clone();
            tokio::spawn(async move {
                if app_read_head(&mut s).await.is_some() {
                    counted.fetch_add(1, Relaxed);
                    let ok = b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\nconnection: close\r\n\r\nok";
                    let _ = s.write_all(ok).await;
                }
            });
        }
    });
    (addr, seen)
}

/// A form `POST` is held until its whole body is read (up to `--request-timeout`), to decide its
/// `_method` fields, before the app sees it. A policy applied meanwhile decides it again: one that
/// no longer allows the peer's `POST` there has it refused (403), and the app never sees it; one
/// that still allows it lets it through. Before, it went to the app as first decided.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_policy_that_narrows_the_peer_while_its_form_is_read_refuses_the_request() {
    use std::sync::atomic::Ordering::Relaxed;
    const DECISIONS: &str = "meshid_sidecar_authz_decisions_total";
    let policy = |methods: &str, paths: &str| {
        format!(
            "inbound:\n  - port: {{port0}}\n    protocol: http\n    allow:\n      - id: \
             {CLIENT}\n        methods: [{methods}]\n        paths: [{paths}]\n"
        )
    };
    let (app, seen) = counting_app().await;
    let e = http_sidecar_for(
        "127.0.0.95",
        app,
        Limits::default(),
        policy("GET, POST", "/api/*"),
    )
    .await;
    let client = e.pki.workload(CLIENT);
    let body = "a=1&b=2";
    let (first, rest) = body.split_at(4);
    // (policy applied while the body is held, answer, requests the app has seen after it)
    let cases = [
        (policy("GET, POST", "/api/*, /other"), "200", 1),
        (policy("GET", "/api/*"), "403", 1),
    ];
    for (then, status, seen_after) in cases {
        let decided = metric(&e.sidecar.metrics().await, DECISIONS);
        let mut tls = connect_as(&e.pki, &e.sidecar, &client).await.unwrap();
        tls.write_all(
            format!(
                "POST /api/x HTTP/1.1\r\nHost: app\r\n\
                 Content-Type: application/x-www-form-urlencoded\r\nConnection: close\r\n\
                 Content-Length: {}\r\n\r\n{first}",
                body.len()
            )
            .as_bytes(),
        )
        .await
        .unwrap();
        // Decided, and held for the rest of its body.
        let held = eventually(Duration::from_secs(10), || async {
            metric(&e.sidecar.metrics().await, DECISIONS) > decided
        })
        .await;
        assert!(held, "the request was not decided");
        apply_policy(&e.sidecar, &then).await;
        tls.write_all(rest.as_bytes()).await.unwrap();
        let mut out = Vec::new();
        let _ = tokio::time::timeout(Duration::from_secs(10), tls.read_to_end(&mut out)).await;
        let resp = String::from_utf8_lossy(&out);
        // Any request the app got came before the answer (or the end) the peer got.
        assert_eq!(
            seen.load(Relaxed),
            seen_after,
            "requests the app got, {then}: {resp}"
        );
        assert!(
            resp.starts_with(&format!("HTTP/1.1 {status}")),
            "{then}: {resp}"
        );
        if status == "403" {
            assert!(resp.contains("x-meshid-decision"), "{resp}");
        }
    }
}

/// An outbound TCP stream the upstream's side cut short (the inbound sidecar's app reset its
/// connection: the inbound drops the mTLS stream without `close_notify`) reaches the app as a
/// reset, never as an ordinary end; one the upstream closed cleanly ends with a FIN. Before, the
/// outbound ended the app's side with a FIN either way.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_outbound_tcp_stream_cut_short_reaches_the_app_as_a_reset() {
    // The app behind the inbound: answers `bye`, then closes cleanly on `end`, resets on `cut`.
    let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let app = l.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((mut s, _)) = l.accept().await {
            tokio::spawn(async move {
                let mut asked = [0u8; 3];
                if s.read_exact(&mut asked).await.is_err() {
                    return;
                }
                let _ = s.write_all(b"bye").await;
                if &asked == b"cut" {
                    tokio::time::sleep(Duration::from_millis(200)).await;
                    let _ = s.set_zero_linger();
                    return;
                }
                let _ = s.shutdown().await;
                let mut rest = Vec::new();
                let _ = s.read_to_end(&mut rest).await;
            });
        }
    });
    let Http { pki, sidecar } = tcp_sidecar("127.0.0.66", app, &[CLIENT]).await;
    let me = pki.workload(CLIENT);
    let outbound = TestSidecar::start(
        &pki,
        &me,
        CLIENT,
        SidecarSpec {
            outbound: vec![(sidecar.inbound[0].to_string(), SERVER.into(), Protocol::Tcp)],
            ..Default::default()
        },
    )
    .await;
    let local = outbound.outbound[0];
    let ask = |what: &'static [u8]| async move {
        let mut tcp = TcpStream::connect(local).await.unwrap();
        tcp.write_all(what).await.unwrap();
        let mut got = Vec::new();
        let end = tokio::time::timeout(Duration::from_secs(10), tcp.read_to_end(&mut got));
        end.await
            .expect("the app's connection ends")
            .map(|_| got)
            .map_err(|e| e.kind())
    };
    assert_eq!(ask(b"end").await, Ok(b"bye".to_vec()));
    assert_eq!(ask(b"cut").await, Err(std::io::ErrorKind::ConnectionReset));
}

/// An app that counts the request heads it receives and never answers them.
async fn counting_silent_app() -> (SocketAddr, Arc<std::sync::atomic::AtomicUsize>) {
    let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = l.local_addr().unwrap();
    let seen = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let count = seen.clone();
    tokio::spawn(async move {
        while let Ok((mut s, _)) = l.accept().await {
            let count = count.clone();
            tokio::spawn(async move {
                while app_read_head(&mut s).await.is_some() {
                    count.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                }
            });
        }
    });
    (addr, seen)
}

/// h2 rapid reset: a peer that sends a request and resets its stream once the app has it, again
/// and again, frees its place under the concurrent-stream limit each time while the app works
/// on: the app would take requests as fast as the peer can send them. Past 200 such resets (more
/// than half its requests, the ones the sidecar denied itself left out: two denied requests between
/// reset ones dilute nothing) the connection is closed, and counted.
#[tokio::test]
async fn a_peer_resetting_its_requests_once_the_app_has_them_is_cut_off() {
    use std::sync::atomic::Ordering::SeqCst;
    const SENT: usize = 320;
    let (app, seen) = counting_silent_app().await;
    let policy = format!(
        "inbound:\n  - port: {{port0}}\n    protocol: http\n    allow:\n      \
         - id: {CLIENT}\n        methods: [GET]\n        paths: [/api/*]\n"
    );
    let e = http_sidecar_for("127.0.0.187", app, Limits::default(), policy).await;
    let client = e.pki.workload(CLIENT);
    let cfg = client_config(
        &e.pki.roots(),
        &e.pki.trust_domain,
        Some(&client),
        &e.sidecar.id,
        &[b"h2"],
    );
    let tls = mtls_connect(e.sidecar.inbound[0], cfg).await.unwrap();
    let (mut h2, connection) = h2::client::handshake(tls).await.unwrap();
    let connection = tokio::spawn(connection);
    let mut sent = 0;
    for i in 0..SENT {
        let Ok(ready) = h2.clone().ready().await else {
            break;
        };
        h2 = ready;
        let req = http::Request::get(format!("https://app/api/{i}"))
            .body(())
            .unwrap();
        let Ok((answer, mut stream)) = h2.send_request(req, true) else {
            break;
        };
        sent += 1;
        // Reset once the app has it (or the connection is gone).
        let deadline = Instant::now() + Duration::from_secs(5);
        while seen.load(SeqCst) <= i && !connection.is_finished() {
            assert!(
                Instant::now() < deadline,
                "request {i} never reached the app"
            );
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
        if connection.is_finished() {
            break;
        }
        stream.send_reset(h2::Reason::CANCEL);
        drop(answer);
        // Two requests the sidecar denies itself, between each: their answers do not dilute the
        // resets.
        for _ in 0..2 {
            let Ok(ready) = h2.clone().ready().await else {
                break;
            };
            h2 = ready;
            let denied = http::Request::get(format!("https://app/other/{i}"))
                .body(())
                .unwrap();
            let Ok((answer, _)) = h2.send_request(denied, true) else {
                break;
            };
            match answer.await {
                Ok(resp) => assert_eq!(resp.status(), 403),
                Err(_) => break,
            }
        }
    }
    let closed = tokio::time::timeout(Duration::from_secs(10), connection).await;
    assert!(
        closed.is_ok(),
        "the connection stayed open after {sent} requests reset (the app took {})",
        seen.load(SeqCst)
    );
    assert!(
        sent < SENT && seen.load(SeqCst) <= 260,
        "{sent} requests sent, the app took {}",
        seen.load(SeqCst)
    );
    let m = e.sidecar.metrics().await;
    assert_eq!(
        metric(&m, "meshid_sidecar_h2_reset_flood_connections_closed_total"),
        1.0,
        "{m}"
    );
}

/// A real sidecar (file mode, its log in JSON) whose HTTP inbound listener on `ip` is in front of
/// `app`, allowing `CLIENT` `GET /api/*`, with the extra environment `env`.
struct LoggedSidecar {
    _sidecar: Proc,
    /// Holds the certificate files the sidecar watches.
    _pki: TestPki,
    _work: tempfile::TempDir,
    log: std::path::PathBuf,
    inbound: SocketAddr,
    admin: SocketAddr,
    /// An h2 client config as `CLIENT`.
    cfg: Arc<rustls::ClientConfig>,
}

impl LoggedSidecar {
    fn start(ip: &str, app: SocketAddr, env: &[(&str, Option<&str>)]) -> Self {
        let pki = TestPki::new();
        let me = pki.workload(SERVER);
        let client = pki.workload(CLIENT);
        let work = tempfile::tempdir().unwrap();
        let log = work.path().join("sidecar.log");
        let admin = free_addr(ip);
        let inbound = free_addr(ip);
        let policy = work.path().join("policy.yaml");
        std::fs::write(
            &policy,
            format!(
                "inbound:\n  - port: {}\n    protocol: http\n    allow:\n      \
                 - id: {CLIENT}\n        methods: [GET]\n        paths: [/api/*]\n",
                inbound.port()
            ),
        )
        .unwrap();
        let mut env = env.to_vec();
        env.extend([
            ("MESHID_LOG", None),
            ("MESHID_LOG_FORMAT", Some("json")),
            ("MESHID_SIDECAR_POLICY", policy.to_str()),
        ]);
        let sidecar = file_mode_sidecar(
            &pki,
            &me,
            None,
            ["--inbound", &format!("{inbound}={app},http")],
            admin,
            &env,
            &log,
        );
        let cfg = client_config(
            &pki.roots(),
            &pki.trust_domain,
            Some(&client),
            &meshid_identity::SpiffeId::parse(SERVER).unwrap(),
            &[b"h2"],
        );
        Self {
            _sidecar: sidecar,
            _pki: pki,
            _work: work,
            log,
            inbound,
            admin,
            cfg,
        }
    }

    /// Checks the log lines whose message holds `needle`, one for each of `closes` connections
    /// closed, limited to a burst of 10 then one a second: every close is written or counted as
    /// left out (`left_out` of the next line written), and those but the last (which came a second
    /// after the others) wrote at most the burst and a line a second of `window`, the time within
    /// which they all came.
    fn check_limited_lines(&self, needle: &str, closes: usize, window: Duration) {
        let text = std::fs::read_to_string(&self.log).unwrap();
        let lines: Vec<serde_json::Value> = text
            .lines()
            .filter_map(|l| serde_json::from_str(l).ok())
            .filter(|v: &serde_json::Value| {
                v["message"].as_str().is_some_and(|m| m.contains(needle))
            })
            .collect();
        let left_out: Vec<u64> = lines
            .iter()
            .map(|v| v["left_out"].as_u64().expect("a left_out count"))
            .collect();
        assert_eq!(
            lines.len() as u64 + left_out.iter().sum::<u64>(),
            closes as u64,
            "every close is written or counted as left out (left_out of each line: {left_out:?})"
        );
        // 10 at once, then one a second (and one for a second's fraction), and the last close's.
        let allowed = 10 + window.as_secs() as usize + 1 + 1;
        assert!(
            lines.len() <= allowed,
            "{} lines for {closes} closes, {} of them within {window:?} (left_out of each line: \
             {left_out:?})",
            lines.len(),
            closes - 1
        );
    }
}

/// The targets an app saw requests for.
type Seen = Arc<std::sync::Mutex<std::collections::HashSet<String>>>;

/// An app that reads request heads and never answers, recording each request's target.
async fn recording_silent_app() -> (SocketAddr, Seen) {
    let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = l.local_addr().unwrap();
    let seen = Seen::default();
    let record = seen.clone();
    tokio::spawn(async move {
        while let Ok((mut s, _)) = l.accept().await {
            let record = record.clone();
            tokio::spawn(async move {
                while let Some(head) = app_read_head(&mut s).await {
                    let head = String::from_utf8_lossy(&head);
                    if let Some(target) = head.split(' ').nth(1) {
                        record.lock().unwrap().insert(target.to_owned());
                    }
                }
            });
        }
    });
    (addr, seen)
}

/// A peer's h2 connection that resets each request it sends once the app has it (each one is
/// premature to the sidecar, `meshid_sidecar::streams::PREMATURE`).
struct Resetter {
    h2: h2::client::SendRequest<bytes::Bytes>,
    connection: tokio::task::JoinHandle<Result<(), h2::Error>>,
    /// In the path of each request, to tell this connection's requests apart at the app.
    tag: usize,
    sent: usize,
}

impl Resetter {
    async fn connect(inbound: SocketAddr, cfg: Arc<rustls::ClientConfig>, tag: usize) -> Self {
        let tls = mtls_connect(inbound, cfg).await.unwrap();
        let (h2, connection) = h2::client::handshake(tls).await.unwrap();
        Self {
            h2,
            connection: tokio::spawn(connection),
            tag,
            sent: 0,
        }
    }

    /// Sends up to `count` requests, one at a time, each reset once `seen` shows the app has it;
    /// whether the connection is still open.
    async fn reset(&mut self, count: usize, seen: &Seen) -> bool {
        for _ in 0..count {
            let Ok(ready) = self.h2.clone().ready().await else {
                return false;
            };
            self.h2 = ready;
            let path = format!("/api/{}/{}", self.tag, self.sent);
            let req = http::Request::get(format!("https://app{path}"))
                .body(())
                .unwrap();
            let Ok((answer, mut stream)) = self.h2.send_request(req, true) else {
                return false;
            };
            self.sent += 1;
            let deadline = Instant::now() + Duration::from_secs(10);
            while !seen.lock().unwrap().contains(&path) {
                if self.connection.is_finished() {
                    return false;
                }
                assert!(Instant::now() < deadline, "{path} never reached the app");
                tokio::time::sleep(Duration::from_millis(1)).await;
            }
            stream.send_reset(h2::Reason::CANCEL);
            drop(answer);
        }
        !self.connection.is_finished()
    }

    /// Resets requests until the sidecar closes the connection as a rapid-reset flood (at most 64
    /// more: a request that took over a second to reach the app was not premature); when the
    /// close was seen.
    async fn flood_until_closed(mut self, seen: &Seen) -> Instant {
        let mut more = 0;
        while self.reset(1, seen).await {
            more += 1;
            assert!(
                more < 64,
                "connection {} still open after {} requests reset",
                self.tag,
                self.sent
            );
        }
        let closed = tokio::time::timeout(Duration::from_secs(10), self.connection).await;
        assert!(closed.is_ok(), "connection {} did not close", self.tag);
        Instant::now()
    }
}

/// The line for an h2 connection closed as a rapid-reset flood is limited (a burst of 10, then
/// one a second, each counting those left out): a peer with a valid certificate can flood on
/// connection after connection. Twenty connections brought to the edge of a flood (200 requests
/// each reset once the app had them), then tipped over together, write at most the burst and a
/// line a second while they close; one more, a second later, writes a line counting those left
/// out. Every close is counted in the metric. A real sidecar. Before, each close wrote a line.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rapid_reset_floods_on_many_connections_write_few_log_lines() {
    use meshid_sidecar::streams::RESET_FLOOD;
    const FLOODS: usize = 20;
    let (app, seen) = recording_silent_app().await;
    let s = LoggedSidecar::start("127.0.0.213", app, &[]);
    // Every connection is brought to the edge (200 premature resets: one more tips it over);
    // FLOODS of them then go over at once, the last one after the others have closed.
    let edge = Arc::new(tokio::sync::Barrier::new(FLOODS + 1));
    let mut floods = Vec::new();
    for tag in 0..FLOODS {
        let mut r = Resetter::connect(s.inbound, s.cfg.clone(), tag).await;
        let (seen, edge) = (seen.clone(), edge.clone());
        floods.push(tokio::spawn(async move {
            assert!(
                r.reset(RESET_FLOOD, &seen).await,
                "connection {tag} closed early"
            );
            edge.wait().await;
            r.flood_until_closed(&seen).await
        }));
    }
    let mut last = Resetter::connect(s.inbound, s.cfg.clone(), FLOODS).await;
    let last_seen = seen.clone();
    let last = tokio::spawn(async move {
        assert!(
            last.reset(RESET_FLOOD, &last_seen).await,
            "last connection closed early"
        );
        last
    });
    edge.wait().await;
    let released = Instant::now();
    let mut window = Duration::ZERO;
    for f in floods {
        window = window.max(f.await.unwrap().duration_since(released));
    }
    // A second later, the limit has room for a line again.
    tokio::time::sleep(Duration::from_millis(1500)).await;
    last.await.unwrap().flood_until_closed(&seen).await;

    let (_, metrics) = http_get(s.admin, "/metrics").unwrap();
    assert_eq!(
        metric(
            &metrics,
            "meshid_sidecar_h2_reset_flood_connections_closed_total"
        ),
        (FLOODS + 1) as f64,
        "{metrics}"
    );
    s.check_limited_lines("rapid-reset flood", FLOODS + 1, window);
}

/// An h2 connection to `inbound` with a stream window of zero, and one response on it whose head
/// came and whose body cannot: its request sender and the response (to keep: the client neither
/// resets nor closes anything), and the connection's driver (ends when the connection does).
async fn untaken_response(
    inbound: SocketAddr,
    cfg: Arc<rustls::ClientConfig>,
) -> (
    (
        hyper::client::conn::http2::SendRequest<http_body_util::Empty<bytes::Bytes>>,
        http::Response<hyper::body::Incoming>,
    ),
    tokio::task::JoinHandle<()>,
) {
    let tls = mtls_connect(inbound, cfg).await.unwrap();
    let (mut sender, conn) =
        hyper::client::conn::http2::Builder::new(hyper_util::rt::TokioExecutor::new())
            .initial_stream_window_size(0)
            .handshake(hyper_util::rt::TokioIo::new(tls))
            .await
            .unwrap();
    let conn = tokio::spawn(async move { drop(conn.await) });
    let resp = sender.send_request(h2_get()).await.unwrap();
    assert_eq!(resp.status(), 200);
    ((sender, resp), conn)
}

/// The line for an h2 connection closed because its peer takes no response for the idle timeout
/// is limited as the rapid-reset one is: a peer with a valid certificate can stall connection
/// after connection. Twenty connections that each leave a 1 MiB response untaken (a window of
/// zero), asked for at once, write at most the burst and a line a second as they close at the
/// idle timeout (1 s); one more, a second later, writes a line counting those left out. A real
/// sidecar. Before, each close wrote a line.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stalled_h2_connections_write_few_log_lines() {
    const STALLS: usize = 20;
    let (app, _) = big_app().await;
    let s = LoggedSidecar::start(
        "127.0.0.214",
        app,
        &[("MESHID_SIDECAR_IDLE_TIMEOUT", Some("1s"))],
    );
    let started = Instant::now();
    let stalls: Vec<_> = (0..STALLS)
        .map(|_| tokio::spawn(untaken_response(s.inbound, s.cfg.clone())))
        .collect();
    let mut window = Duration::ZERO;
    for stall in stalls {
        let (kept, conn) = stall.await.unwrap();
        let closed = tokio::time::timeout(Duration::from_secs(15), conn).await;
        assert!(closed.is_ok(), "a stalled connection stayed open");
        window = window.max(started.elapsed());
        drop(kept);
    }
    // A second later, the limit has room for a line again.
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let (kept, conn) = untaken_response(s.inbound, s.cfg.clone()).await;
    let closed = tokio::time::timeout(Duration::from_secs(15), conn).await;
    assert!(closed.is_ok(), "the last stalled connection stayed open");
    drop(kept);
    s.check_limited_lines(
        "has not taken a response for the idle timeout",
        STALLS + 1,
        window,
    );
}

/// A denied request's log line quotes its method and path cut to 512 bytes each, as `/decisions`
/// keeps them: a `_method` form field names a method of up to a form's 1 MiB, and the line quoted
/// it whole (escaped, up to six times that) at every denial, 10 lines a second per peer. A long path
/// shows it here (the same cut applies to both). A real sidecar, its JSON log read back.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_denied_request_is_logged_with_its_method_and_path_cut() {
    let (app, _) = big_app().await;
    let s = LoggedSidecar::start("127.0.0.215", app, &[]);
    // Past the cut, within what a request line may hold.
    let long = "x".repeat(4_000);
    let mut tls = mtls_connect(s.inbound, s.cfg.clone()).await.unwrap();
    tls.write_all(format!("GET /nope/{long} HTTP/1.1\r\nHost: app\r\n\r\n").as_bytes())
        .await
        .unwrap();
    let head = read_head(&mut tls).await;
    assert!(head.starts_with("HTTP/1.1 403"), "{head}");
    let line = eventually_some(Duration::from_secs(10), || {
        let text = std::fs::read_to_string(&s.log).unwrap_or_default();
        text.lines()
            .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
            .find(|v| v["message"] == "denied")
    })
    .await
    .expect("a denied line");
    let path = line["path"].as_str().expect("a path field");
    assert!(path.starts_with("/nope/xxx"), "{line}");
    assert!(path.len() <= 512, "a path of {} bytes logged", path.len());
    assert_eq!(line["method"], "GET", "{line}");

    // A long method: an override the policy denies (GET is allowed on /api/*, this is not).
    let method = "M".repeat(4_000);
    let mut tls = mtls_connect(s.inbound, s.cfg.clone()).await.unwrap();
    tls.write_all(
        format!("GET /api/x HTTP/1.1\r\nHost: app\r\nX-HTTP-Method-Override: {method}\r\n\r\n")
            .as_bytes(),
    )
    .await
    .unwrap();
    let head = read_head(&mut tls).await;
    assert!(head.starts_with("HTTP/1.1 403"), "{head}");
    let line = eventually_some(Duration::from_secs(10), || {
        let text = std::fs::read_to_string(&s.log).unwrap_or_default();
        text.lines()
            .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
            .find(|v| v["message"] == "denied" && v["path"] == "/api/x")
    })
    .await
    .expect("a denied line for the override");
    let logged = line["method"].as_str().expect("a method field");
    assert!(logged.starts_with("MMM"), "{line}");
    assert!(
        logged.len() <= 512,
        "a method of {} bytes logged",
        logged.len()
    );
}

/// Calls `f` every 50 ms until it gives something or `within` has passed.
async fn eventually_some<T>(within: Duration, mut f: impl FnMut() -> Option<T>) -> Option<T> {
    let until = Instant::now() + within;
    loop {
        if let Some(t) = f() {
            return Some(t);
        }
        if Instant::now() > until {
            return None;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}
