//! The whole loop over real processes: `meshid-ca` and two `meshid-sidecar`s, each on its own
//! 127.0.0.x "host", one sidecar bootstrapped by a Kubernetes service-account token (fake cluster
//! issuer), the other by a join token; short certificate lifetimes; traffic through the pair while the
//! policy changes, certificates renew and the CA restarts; then a SIGTERM drain. And every port of
//! every binary under a battery of hostile bytes at once.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::net::SocketAddr;
use std::path::Path;
use std::process::Command;
use std::time::Duration;

use meshid_tests::fake_cluster::FakeCluster;
use meshid_tests::mesh::{Traffic, eventually, get, http_request, tls_connect};
use meshid_tests::process::{
    Proc, ca_mode_sidecar, free_addr, http_get, tcp_connections, wait_http_ok,
};
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
            ca_mode_sidecar(ca_grpc, &ca_bundle, token_flag, token, admin)
                .args(["--grace", "10s"])
                .args(args),
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

    // A bundle stream is silent between bundle changes. Both ends leave noticing a vanished peer
    // to the kernel's keep-alive (the CA sends no h2 PINGs): every connection between the sidecars
    // and the CA has its keep-alive timer armed, on both sides.
    assert!(
        eventually(Duration::from_secs(10), || async {
            let conns = tcp_connections(ca_grpc);
            let ca_side = conns.iter().filter(|c| c.local == ca_grpc).count();
            let sidecar_side = conns.iter().filter(|c| c.remote == ca_grpc).count();
            ca_side >= 2 && sidecar_side >= 2 && conns.iter().all(|c| c.keepalive)
        })
        .await,
        "keep-alive on every connection to the CA: {:?}",
        tcp_connections(ca_grpc)
    );

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
    // B's inbound sends no h2 PINGs: the kernel's keep-alive watches A's connections to it.
    assert!(
        eventually(Duration::from_secs(10), || async {
            let conns: Vec<_> = tcp_connections(b_http)
                .into_iter()
                .filter(|c| c.local == b_http)
                .collect();
            !conns.is_empty() && conns.iter().all(|c| c.keepalive)
        })
        .await,
        "keep-alive on B's inbound connections: {:?}",
        tcp_connections(b_http)
    );
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

/// What a port scanner, a fuzzer or a confused client sends: each payload on its own connection.
fn hostile_payloads() -> Vec<(&'static str, Vec<u8>)> {
    let mut seed = 0x9e37_79b9_7f4a_7c15_u64;
    let mut random = |n: usize| -> Vec<u8> {
        (0..n)
            .map(|_| {
                seed ^= seed << 13;
                seed ^= seed >> 7;
                seed ^= seed << 17;
                seed as u8
            })
            .collect()
    };
    let mut huge_header = b"GET / HTTP/1.1\r\nHost: x\r\nX-Junk: ".to_vec();
    huge_header.extend(std::iter::repeat_n(b'a', 256 * 1024));
    let h2_preface = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n".to_vec();
    let mut h2_bad_frames = h2_preface.clone();
    // SETTINGS with a length that is not a multiple of 6, then a HEADERS frame claiming 16 MiB.
    h2_bad_frames.extend([0, 0, 5, 4, 0, 0, 0, 0, 0, 1, 2, 3, 4, 5]);
    h2_bad_frames.extend([0xff, 0xff, 0xff, 1, 4, 0, 0, 0, 1]);
    h2_bad_frames.extend(random(4096));
    let mut tls_huge_record = vec![0x16, 0x03, 0x01, 0xff, 0xff];
    tls_huge_record.extend(random(8192));
    // A ClientHello record whose handshake message claims far more than the record holds.
    let tls_lying_hello = vec![
        0x16, 0x03, 0x01, 0x00, 0x08, 0x01, 0xff, 0xff, 0xff, 0, 0, 0, 0,
    ];
    vec![
        ("random bytes", random(64 * 1024)),
        ("NUL bytes", vec![0; 4096]),
        ("empty lines", b"\r\n".repeat(20_000)),
        ("TLS record of maximum length", tls_huge_record),
        ("TLS ClientHello that lies about its length", tls_lying_hello),
        ("TLS 1.0 alert", vec![0x15, 0x03, 0x01, 0x00, 0x02, 0x02, 0x28]),
        ("endless HTTP header", huge_header),
        ("HTTP request smuggling attempt", b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 4\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\nGET /admin HTTP/1.1\r\n\r\n".to_vec()),
        ("HTTP with a bad method and target", b"\x00\xffGET \x7f\x7f HTTP/9.9\r\n\r\n".to_vec()),
        ("h2 preface alone", h2_preface),
        ("h2 preface and malformed frames", h2_bad_frames),
        ("nothing at all", Vec::new()),
    ]
}

/// Sends `payload` on a fresh connection, half-closes, and reads until the peer closes or 3 s pass.
async fn throw(addr: SocketAddr, payload: Vec<u8>) {
    let Ok(mut s) = tokio::net::TcpStream::connect(addr).await else {
        return;
    };
    let _ = tokio::time::timeout(Duration::from_secs(3), async {
        let _ = s.write_all(&payload).await;
        let _ = s.shutdown().await;
        let mut sink = vec![0u8; 16 * 1024];
        while matches!(s.read(&mut sink).await, Ok(n) if n > 0) {}
    })
    .await;
}

/// Every listening port of every binary (CA gRPC and admin, a sidecar's inbound, outbound and
/// admin ports, the injector's webhook and admin ports) gets the same battery of hostile bytes,
/// all at once; afterwards every process is still running, nothing panicked, and each port still
/// does its job.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hostile_bytes_on_every_port_of_the_real_binaries() {
    let dir = tempfile::tempdir().unwrap();
    let ca_dir = dir.path().join("ca");
    let run = |args: &[&str]| {
        let out = Command::new(workspace_bin("meshid-ca"))
            .args(args)
            .output()
            .unwrap();
        assert!(out.status.success(), "{args:?}: {out:?}");
        out.stdout
    };
    let ca_dir_s = ca_dir.to_string_lossy().into_owned();
    run(&["init", "--dir", &ca_dir_s]);
    let cluster = FakeCluster::new();
    let jwks = dir.path().join("jwks.json");
    cluster.write_jwks(&jwks);
    let logs = dir.path().join("logs");
    std::fs::create_dir_all(&logs).unwrap();
    let log = |name: &str| std::fs::File::create(logs.join(format!("{name}.log"))).unwrap();

    let (ca_grpc, ca_admin) = (free_addr("127.0.0.2"), free_addr("127.0.0.2"));
    let mut ca = Proc::spawn(
        "meshid-ca",
        Command::new(workspace_bin("meshid-ca"))
            .args(["serve", "--dir", &ca_dir_s])
            .args(["--listen", &ca_grpc.to_string()])
            .args(["--admin-listen", &ca_admin.to_string()])
            .args(["--san", "localhost", "--handshake-timeout", "2s"])
            .arg("--jwks")
            .arg(&jwks)
            .env("MESHID_LOG", "warn")
            .stderr(log("ca")),
    );
    assert!(wait_http_ok(ca_admin, "/readyz", Duration::from_secs(10)));

    let http_app = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let http_app_addr = http_app.local_addr().unwrap();
    tokio::spawn(meshid_examples::http_echo(http_app));
    let bundle = ca_dir.join("bundle.pem");
    let sidecar = |name: &str, id: &str, admin: SocketAddr, args: Vec<String>| {
        let join = dir.path().join(format!("{name}.join"));
        std::fs::write(
            &join,
            run(&["token", "create", "--dir", &ca_dir_s, "--id", id]),
        )
        .unwrap();
        Proc::spawn(
            name,
            ca_mode_sidecar(ca_grpc, &bundle, "--join-token-file", &join, admin)
                .args(["--handshake-timeout", "2s"])
                .args(args)
                .stderr(log(name)),
        )
    };
    let (b_http, b_admin) = (free_addr("127.0.0.3"), free_addr("127.0.0.3"));
    let b_policy = dir.path().join("b-policy.yaml");
    std::fs::write(
        &b_policy,
        format!(
            "inbound:\n  - port: {}\n    protocol: http\n    allow:\n      - id: {A}\n        paths: [/orders]\n",
            b_http.port()
        ),
    )
    .unwrap();
    let mut b = sidecar(
        "sidecar-b",
        B,
        b_admin,
        vec![
            "--inbound".into(),
            format!("{b_http}={http_app_addr},http"),
            "--policy".into(),
            b_policy.to_string_lossy().into_owned(),
        ],
    );
    let (a_http, a_tcp, a_admin) = (
        free_addr("127.0.0.1"),
        free_addr("127.0.0.1"),
        free_addr("127.0.0.4"),
    );
    let mut a = sidecar(
        "sidecar-a",
        A,
        a_admin,
        vec![
            "--outbound".into(),
            format!("{a_http}={b_http},{B},http"),
            "--outbound".into(),
            format!("{a_tcp}={b_http},{B},tcp"),
        ],
    );

    let tls_dir = dir.path().join("injector-tls");
    run(&[
        "webhook-cert",
        "--dir",
        &ca_dir_s,
        "--dns",
        "meshid-injector.meshid.svc",
        "--out-dir",
        &tls_dir.to_string_lossy(),
    ]);
    let (inj, inj_admin) = (free_addr("127.0.0.5"), free_addr("127.0.0.5"));
    let mut injector = Proc::spawn(
        "meshid-injector",
        Command::new(workspace_bin("meshid-injector"))
            .arg("--tls-cert")
            .arg(tls_dir.join("tls.crt"))
            .arg("--tls-key")
            .arg(tls_dir.join("tls.key"))
            .arg("--trust-bundle")
            .arg(&bundle)
            .args(["--listen", &inj.to_string()])
            .args(["--admin-listen", &inj_admin.to_string()])
            .args([
                "--sidecar-image",
                "meshid/sidecar:test",
                "--ca-addr",
                "ca:8443",
            ])
            .env("MESHID_LOG", "warn")
            .stderr(log("injector")),
    );
    for admin in [b_admin, a_admin, inj_admin] {
        assert!(
            wait_http_ok(admin, "/readyz", Duration::from_secs(15)),
            "{admin} ready"
        );
    }
    let roots: Vec<_> = {
        use rustls_pki_types::pem::PemObject;
        rustls_pki_types::CertificateDer::pem_file_iter(&bundle)
            .unwrap()
            .map(Result::unwrap)
            .collect()
    };
    let through_pair = || async {
        let tcp = tokio::net::TcpStream::connect(a_http).await.unwrap();
        matches!(
            http_request(tcp, false, get("/orders", &[])).await,
            Ok((200, _, _))
        )
    };
    assert!(through_pair().await, "the pair works before the attack");

    let ports = [
        ("CA gRPC", ca_grpc),
        ("CA admin", ca_admin),
        ("sidecar inbound (mTLS)", b_http),
        ("sidecar admin", b_admin),
        ("sidecar outbound (HTTP)", a_http),
        ("sidecar outbound (TCP)", a_tcp),
        ("sidecar admin (outbound side)", a_admin),
        ("injector webhook (TLS)", inj),
        ("injector admin", inj_admin),
    ];
    let mut attack = tokio::task::JoinSet::new();
    for (_, addr) in ports {
        for (_, payload) in hostile_payloads() {
            attack.spawn(throw(addr, payload));
        }
    }
    while attack.join_next().await.is_some() {}

    for (name, p) in [
        ("CA", &mut ca),
        ("sidecar B", &mut b),
        ("sidecar A", &mut a),
        ("injector", &mut injector),
    ] {
        assert!(p.running(), "{name} died under hostile bytes");
    }
    // Each port still does its job.
    assert!(wait_http_ok(ca_admin, "/readyz", Duration::from_secs(5)));
    assert!(
        tls_connect(ca_grpc, &roots, "localhost").await.is_ok(),
        "CA TLS"
    );
    assert!(wait_http_ok(b_admin, "/readyz", Duration::from_secs(5)));
    assert!(wait_http_ok(a_admin, "/readyz", Duration::from_secs(5)));
    assert!(
        through_pair().await,
        "the pair still works (outbound, inbound)"
    );
    assert!(wait_http_ok(inj_admin, "/healthz", Duration::from_secs(5)));
    assert!(
        tls_connect(inj, &roots, "meshid-injector.meshid.svc")
            .await
            .is_ok(),
        "injector TLS"
    );
    // The bytes arrived: the TLS ports counted failed handshakes (not every payload gets that far:
    // an empty connection is no handshake).
    let counted = |admin: SocketAddr, series: &str| -> f64 {
        let (_, body) = http_get(admin, "/metrics").unwrap();
        body.lines()
            .filter(|l| l.starts_with(series))
            .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
            .sum()
    };
    let ca_failures = counted(ca_admin, "meshid_ca_tls_handshake_failures_total");
    let b_failures = counted(b_admin, "meshid_sidecar_tls_handshake_failures_total");
    assert!(ca_failures >= 5.0, "CA handshake failures: {ca_failures}");
    assert!(
        b_failures >= 5.0,
        "sidecar handshake failures: {b_failures}"
    );
    // The CA still issues: a new workload with a new join token gets its certificate.
    let token =
        String::from_utf8(run(&["token", "create", "--dir", &ca_dir_s, "--id", A])).unwrap();
    let mut client = meshid_tests::ca::connect(ca_grpc, &roots, None)
        .await
        .unwrap();
    let issued = client
        .issue(meshid_proto::ca::v1::IssueRequest {
            csr: meshid_tests::pki::WorkloadKey::new().csr,
            credential: Some(meshid_proto::ca::v1::issue_request::Credential::JoinToken(
                token.trim().to_owned(),
            )),
            ttl_seconds: 0,
            app_svid: false,
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(issued.spiffe_id, A);
    for name in ["ca", "sidecar-a", "sidecar-b", "injector"] {
        let text = std::fs::read_to_string(logs.join(format!("{name}.log"))).unwrap();
        assert!(
            !text.contains("panicked"),
            "{name} panicked under hostile bytes:\n{text}"
        );
    }
}
