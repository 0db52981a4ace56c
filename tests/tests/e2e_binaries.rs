//! The whole loop over real processes: `meshid-ca` and two `meshid-sidecar`s, each on its own
//! 127.0.0.x "host", one sidecar bootstrapped by a Kubernetes service-account token (fake cluster
//! issuer), the other by a join token; short certificate lifetimes; traffic through the pair while the
//! policy changes, certificates renew and the CA restarts; then a SIGTERM drain.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::net::SocketAddr;
use std::path::Path;
use std::process::Command;
use std::time::Duration;

use meshid_tests::fake_cluster::FakeCluster;
use meshid_tests::mesh::{Traffic, eventually, get, http_request};
use meshid_tests::process::{Proc, free_addr, http_get, wait_http_ok};
use meshid_tests::tools::workspace_bin;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

const A: &str = "spiffe://cluster.local/ns/shop/sa/frontend";
const B: &str = "spiffe://cluster.local/ns/shop/sa/backend";

fn start_ca(dir: &Path, grpc: SocketAddr, admin: SocketAddr, jwks: &Path) -> Proc {
    let p = Proc::spawn(
        "meshid-ca",
        Command::new(workspace_bin("meshid-ca"))
            .args(["serve", "--dir"])
            .arg(dir)
            .args([
                "--listen",
                &grpc.to_string(),
                "--admin-listen",
                &admin.to_string(),
            ])
            .args(["--san", "localhost", "--ttl", "16s", "--max-ttl", "16s"])
            .arg("--jwks")
            .arg(jwks)
            .env("MESHID_LOG", "warn"),
    );
    assert!(
        wait_http_ok(admin, "/readyz", Duration::from_secs(10)),
        "CA ready"
    );
    p
}

fn policy(port: u16, tcp_port: u16, extra_path: &str) -> String {
    format!(
        "inbound:\n  - port: {port}\n    protocol: http\n    allow:\n      - id: {A}\n        paths: [/orders, /slow{extra_path}]\n  - port: {tcp_port}\n    protocol: tcp\n    allow:\n      - id: {A}\n"
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn whole_mesh_over_real_processes() {
    let dir = tempfile::tempdir().unwrap();
    let ca_dir = dir.path().join("ca");
    let out = Command::new(workspace_bin("meshid-ca"))
        .args(["init", "--dir"])
        .arg(&ca_dir)
        .output()
        .unwrap();
    assert!(out.status.success(), "{out:?}");
    let cluster = FakeCluster::new();
    let jwks = dir.path().join("jwks.json");
    cluster.write_jwks(&jwks);
    let (ca_grpc, ca_admin) = (free_addr("127.0.0.2"), free_addr("127.0.0.2"));
    let mut ca = start_ca(&ca_dir, ca_grpc, ca_admin, &jwks);

    // Credentials: B gets a projected service-account token, A a join token.
    let sa_token = dir.path().join("sa.token");
    std::fs::write(&sa_token, cluster.token("shop", "backend")).unwrap();
    let out = Command::new(workspace_bin("meshid-ca"))
        .args(["token", "create", "--dir"])
        .arg(&ca_dir)
        .args(["--id", A])
        .output()
        .unwrap();
    let join = dir.path().join("join.token");
    std::fs::write(&join, &out.stdout).unwrap();

    // Apps, on loopback.
    let http_app = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let tcp_app = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let (http_app_addr, tcp_app_addr) = (
        http_app.local_addr().unwrap(),
        tcp_app.local_addr().unwrap(),
    );
    tokio::spawn(meshid_examples::http_echo(http_app));
    tokio::spawn(meshid_examples::tcp_echo(tcp_app));

    // Sidecar B on "host" 127.0.0.3, sidecar A on 127.0.0.4.
    let (b_http, b_tcp, b_admin) = (
        free_addr("127.0.0.3"),
        free_addr("127.0.0.3"),
        free_addr("127.0.0.3"),
    );
    let b_policy = dir.path().join("b-policy.yaml");
    std::fs::write(&b_policy, policy(b_http.port(), b_tcp.port(), "")).unwrap();
    let ca_bundle = ca_dir.join("bundle.pem");
    let sidecar = |token_flag: &str, token: &Path, admin: SocketAddr, args: Vec<String>| {
        Proc::spawn(
            "meshid-sidecar",
            Command::new(workspace_bin("meshid-sidecar"))
                .arg("run")
                .args([
                    "--ca-addr",
                    &ca_grpc.to_string(),
                    "--ca-server-name",
                    "localhost",
                ])
                .arg("--ca-bundle")
                .arg(&ca_bundle)
                .arg(token_flag)
                .arg(token)
                .args(["--admin-listen", &admin.to_string(), "--grace", "10s"])
                .args(args)
                .env("MESHID_LOG", "warn"),
        )
    };
    let mut b = sidecar(
        "--token-file",
        &sa_token,
        b_admin,
        vec![
            "--inbound".into(),
            format!("{b_http}={http_app_addr},http"),
            "--inbound".into(),
            format!("{b_tcp}={tcp_app_addr},tcp"),
            "--policy".into(),
            b_policy.to_string_lossy().into_owned(),
        ],
    );
    let (a_http, a_tcp, a_admin) = (
        free_addr("127.0.0.1"),
        free_addr("127.0.0.1"),
        free_addr("127.0.0.4"),
    );
    let _a = sidecar(
        "--join-token-file",
        &join,
        a_admin,
        vec![
            "--outbound".into(),
            format!("{a_http}={b_http},{B},http"),
            "--outbound".into(),
            format!("{a_tcp}={b_tcp},{B},tcp"),
        ],
    );
    assert!(
        wait_http_ok(b_admin, "/readyz", Duration::from_secs(15)),
        "B ready (service-account token)"
    );
    assert!(
        wait_http_ok(a_admin, "/readyz", Duration::from_secs(15)),
        "A ready (join token)"
    );
    let (_, ident) = http_get(b_admin, "/identity").unwrap();
    assert!(ident.contains(B), "{ident}");

    // Allowed and denied, HTTP/1.1 and h2, and TCP.
    for h2 in [false, true] {
        let tcp = tokio::net::TcpStream::connect(a_http).await.unwrap();
        let (code, _, body) = http_request(tcp, h2, get("/orders", &[])).await.unwrap();
        assert_eq!(code, 200, "{body}");
        assert!(body.contains(&format!("caller={A}")), "{body}");
        let tcp = tokio::net::TcpStream::connect(a_http).await.unwrap();
        let (code, headers, _) = http_request(tcp, h2, get("/admin", &[])).await.unwrap();
        assert_eq!(code, 403);
        assert!(headers.get("x-meshid-reason").is_some());
    }
    let mut s = tokio::net::TcpStream::connect(a_tcp).await.unwrap();
    s.write_all(b"tcp through the pair").await.unwrap();
    s.shutdown().await.unwrap();
    let mut back = Vec::new();
    s.read_to_end(&mut back).await.unwrap();
    assert_eq!(back, b"tcp through the pair");

    // Continuous traffic from here on: it must never fail.
    let traffic = Traffic::start(a_http, None);

    // Policy change applied live: /admin becomes allowed.
    std::fs::write(
        b_policy.with_extension("tmp"),
        policy(b_http.port(), b_tcp.port(), ", /admin"),
    )
    .unwrap();
    std::fs::rename(b_policy.with_extension("tmp"), &b_policy).unwrap();
    assert!(
        eventually(Duration::from_secs(10), || async {
            let Ok(tcp) = tokio::net::TcpStream::connect(a_http).await else {
                return false;
            };
            matches!(
                http_request(tcp, false, get("/admin", &[])).await,
                Ok((200, _, _))
            )
        })
        .await,
        "policy change applied without restart"
    );

    // Renewal under traffic (16 s certificates) and a CA restart in the middle.
    let serial = |admin: SocketAddr| {
        http_get(admin, "/identity")
            .ok()
            .and_then(|(_, body)| {
                body.split("\"serial\":\"")
                    .nth(1)
                    .map(|s| s[..16].to_owned())
            })
            .unwrap_or_default()
    };
    let first = serial(b_admin);
    assert!(
        eventually(Duration::from_secs(15), || async {
            serial(b_admin) != first
        })
        .await,
        "B renewed"
    );
    ca.signal("TERM");
    assert!(
        ca.wait_timeout(Duration::from_secs(10))
            .is_some_and(|s| s.success()),
        "CA exits 0 on SIGTERM"
    );
    let _ca = start_ca(&ca_dir, ca_grpc, ca_admin, &jwks);
    let after_restart = serial(b_admin);
    assert!(
        eventually(Duration::from_secs(15), || async {
            serial(b_admin) != after_restart
        })
        .await,
        "B renews against the restarted CA"
    );
    let (ok, failed) = traffic.finish().await;
    assert!(ok > 50, "traffic flowed");
    assert_eq!(
        failed, 0,
        "no request failed through renewals and a CA restart"
    );

    // SIGTERM drain: an in-flight slow request through B completes; B exits 0.
    let slow = tokio::spawn(async move {
        let tcp = tokio::net::TcpStream::connect(a_http).await.unwrap();
        http_request(tcp, true, get("/slow?ms=1500", &[])).await
    });
    tokio::time::sleep(Duration::from_millis(400)).await;
    b.signal("TERM");
    let (code, _, body) = slow.await.unwrap().unwrap();
    assert_eq!(code, 200, "{body}");
    assert!(
        b.wait_timeout(Duration::from_secs(15))
            .is_some_and(|s| s.success()),
        "B exits 0 after draining"
    );
}
