//! HTTP mode over real sockets: allow/deny per peer, method and path; XFCC set and spoofs stripped;
//! 403/502/504/431 answers; WebSocket-style upgrades; policy hot reload under traffic; graceful drain.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use meshid_identity::policy::Protocol;
use meshid_sidecar::settings::Limits;
use meshid_tests::mesh::{
    SidecarSpec, TestPki, TestSidecar, Workload, client_config, eventually, get, http_echo,
    http_exchange, http_request, mtls_connect, read_response,
};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

const SERVER: &str = "spiffe://cluster.local/ns/shop/sa/server";
const CLIENT: &str = "spiffe://cluster.local/ns/shop/sa/client";
const STRANGER: &str = "spiffe://cluster.local/ns/shop/sa/stranger";
const PROM: &str = "spiffe://cluster.local/ns/ops/sa/prometheus";

fn policy() -> String {
    format!(
        "mode: enforce
inbound:
  - port: {{port0}}
    protocol: http
    allow:
      - id: {CLIENT}
        methods: [GET, PUT]
        paths: [/api/*, /slow]
      - id: spiffe://cluster.local/ns/ops/sa/*
        methods: [GET]
        paths: [/metrics]
"
    )
}

struct Env {
    pki: TestPki,
    sidecar: TestSidecar,
}

async fn env(limits: Limits, app: SocketAddr) -> Env {
    let pki = TestPki::new();
    let server = pki.workload(SERVER);
    let sidecar = TestSidecar::start(
        &pki,
        &server,
        SERVER,
        SidecarSpec {
            inbound: vec![("127.0.0.5", app, Protocol::Http)],
            policy: Some(policy()),
            limits: Some(limits),
            ..Default::default()
        },
    )
    .await;
    Env { pki, sidecar }
}

impl Env {
    async fn call(
        &self,
        who: &Workload,
        h2: bool,
        req: hyper::Request<http_body_util::Full<bytes::Bytes>>,
    ) -> Result<(u16, hyper::HeaderMap, String), String> {
        let alpn: &[&[u8]] = if h2 { &[b"h2"] } else { &[b"http/1.1"] };
        let cfg = client_config(
            &self.pki.roots(),
            &self.pki.trust_domain,
            Some(who),
            &self.sidecar.id,
            alpn,
        );
        let tls = mtls_connect(self.sidecar.inbound[0], cfg).await?;
        http_request(tls, h2, req).await
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn allow_deny_and_identity_header() {
    let app = http_echo().await;
    let e = env(Limits::default(), app).await;
    let client = e.pki.workload(CLIENT);
    let stranger = e.pki.workload(STRANGER);
    let prom = e.pki.workload(PROM);
    let client_hash = meshid_sidecar::creds::sha256_hex(&client.chain[0]);

    struct Case<'a> {
        name: &'a str,
        who: &'a Workload,
        method: &'a str,
        path: &'a str,
        status: u16,
        reason_has: &'a str,
    }
    let cases = [
        Case {
            name: "allowed GET",
            who: &client,
            method: "GET",
            path: "/api/orders",
            status: 200,
            reason_has: "",
        },
        Case {
            name: "allowed PUT",
            who: &client,
            method: "PUT",
            path: "/api/orders/1",
            status: 200,
            reason_has: "",
        },
        Case {
            name: "method not allowed",
            who: &client,
            method: "DELETE",
            path: "/api/orders/1",
            status: 403,
            reason_has: "no rule matched",
        },
        Case {
            name: "path not allowed",
            who: &client,
            method: "GET",
            path: "/admin",
            status: 403,
            reason_has: "no rule matched",
        },
        Case {
            name: "dot-dot path",
            who: &client,
            method: "GET",
            path: "/api/../admin",
            status: 403,
            reason_has: "",
        },
        Case {
            name: "encoded slash",
            who: &client,
            method: "GET",
            path: "/api/%2e%2e/admin",
            status: 403,
            reason_has: "",
        },
        Case {
            name: "fullwidth dots (NFKC makes them '..')",
            who: &client,
            method: "GET",
            path: "/api/%ef%bc%8e%ef%bc%8e/admin",
            status: 403,
            reason_has: "unsafe request path",
        },
        Case {
            name: "peer not listed",
            who: &stranger,
            method: "GET",
            path: "/api/orders",
            status: 403,
            reason_has: STRANGER,
        },
        Case {
            name: "wildcard peer, allowed path",
            who: &prom,
            method: "GET",
            path: "/metrics",
            status: 200,
            reason_has: "",
        },
        Case {
            name: "wildcard peer, other path",
            who: &prom,
            method: "GET",
            path: "/api/orders",
            status: 403,
            reason_has: "",
        },
    ];
    let mut failures = Vec::new();
    for h2 in [false, true] {
        for c in &cases {
            let req = hyper::Request::builder()
                .method(c.method)
                .uri(c.path)
                .header("host", "app.example")
                .header(
                    "x-forwarded-client-cert",
                    "By=spiffe://evil/x;URI=spiffe://cluster.local/ns/kube-system/sa/admin",
                )
                .body(http_body_util::Full::new(bytes::Bytes::new()))
                .unwrap();
            match e.call(c.who, h2, req).await {
                Ok((status, headers, body)) => {
                    let reason = headers
                        .get("x-meshid-reason")
                        .and_then(|v| v.to_str().ok())
                        .unwrap_or("");
                    let ok = status == c.status
                        && reason.contains(c.reason_has)
                        && (status != 200
                            || (body.contains(
                                "xfcc=By=spiffe://cluster.local/ns/shop/sa/server;Hash=",
                            ) && !body.contains("evil")
                                && !body.contains("kube-system")
                                && body.contains("host=app.example")));
                    if !ok {
                        failures.push(format!(
                            "{} (h2={h2}): got {status} reason={reason:?} body={body:?}",
                            c.name
                        ));
                    }
                }
                Err(err) => failures.push(format!("{} (h2={h2}): {err}", c.name)),
            }
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));

    // XFCC names exactly the peer and its certificate hash.
    let (_, _, body) = e.call(&client, false, get("/api/x", &[])).await.unwrap();
    assert!(
        body.contains(&format!("Hash={client_hash};URI={CLIENT}")),
        "{body}"
    );
    let metrics = e.sidecar.metrics().await;
    assert!(
        metrics.contains(r#"decision="deny",rule="no-rule-matched""#),
        "{metrics}"
    );
    assert!(
        metrics.contains(r#"decision="allow",rule="rule-1""#),
        "{metrics}"
    );
    assert!(metrics.contains(r#"code="403""#), "{metrics}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn app_down_slow_and_oversized_headers() {
    // A port nothing listens on: the app is down.
    let dead = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        l.local_addr().unwrap()
    };
    let e = env(Limits::default(), dead).await;
    let client = e.pki.workload(CLIENT);
    let (status, headers, _) = e.call(&client, false, get("/api/x", &[])).await.unwrap();
    assert_eq!(status, 502);
    let reason = headers.get("x-meshid-reason").unwrap().to_str().unwrap();
    assert!(
        reason.starts_with("the request to the app failed") && reason.contains("refused"),
        "{reason}"
    );

    let app = http_echo().await;
    let e = env(
        Limits {
            request_timeout: Duration::from_millis(400),
            ..Limits::default()
        },
        app,
    )
    .await;
    let (status, _, _) = e
        .call(&client_of(&e), false, get("/slow?ms=3000", &[]))
        .await
        .unwrap();
    assert_eq!(status, 504);
    let (status, _, _) = e
        .call(&client_of(&e), false, get("/slow?ms=10", &[]))
        .await
        .unwrap();
    assert_eq!(status, 200);

    // A header larger than the limit never reaches the app.
    let big = "x".repeat(40_000);
    for h2 in [false, true] {
        let got = e
            .call(&client_of(&e), h2, get("/api/x", &[("x-big", &big)]))
            .await;
        assert!(
            matches!(got, Ok((431, _, _))),
            "h2={h2}: oversized header not refused as too large: {got:?}"
        );
    }
    // Refused for its size, not because the sidecar stopped serving.
    let (status, _, _) = e
        .call(&client_of(&e), false, get("/api/x", &[("x-small", "y")]))
        .await
        .unwrap();
    assert_eq!(status, 200);
}

/// A gRPC call is timed by its own deadline (`grpc-timeout`), not by `--request-timeout`: a gRPC
/// server sends its response headers when the call's handler returns, so a long call would be cut
/// and reach its client as `UNAVAILABLE`. Past its deadline the call is answered
/// `DEADLINE_EXCEEDED`, in gRPC's own form.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_grpc_call_is_timed_by_its_own_deadline() {
    let e = env(
        Limits {
            request_timeout: Duration::from_millis(400),
            ..Limits::default()
        },
        http_echo().await,
    )
    .await;
    let grpc = ("content-type", "application/grpc");
    // Longer than --request-timeout, no deadline: answered by the app.
    let (status, headers, body) = e
        .call(&client_of(&e), true, get("/slow?ms=1200", &[grpc]))
        .await
        .unwrap();
    assert_eq!(status, 200, "{body}");
    assert!(headers.get("grpc-status").is_none(), "{headers:?}");
    assert!(body.starts_with("GET /slow"), "{body}");
    // The same with a deadline shorter than the app takes: DEADLINE_EXCEEDED, at the deadline.
    let started = std::time::Instant::now();
    let (status, headers, body) = e
        .call(
            &client_of(&e),
            true,
            get("/slow?ms=5000", &[grpc, ("grpc-timeout", "700m")]),
        )
        .await
        .unwrap();
    let took = started.elapsed();
    assert_eq!(status, 200, "{body}");
    assert_eq!(headers.get("grpc-status").unwrap(), "4", "{headers:?}");
    assert_eq!(headers.get("content-type").unwrap(), "application/grpc");
    let message = headers.get("grpc-message").unwrap().to_str().unwrap();
    assert!(message.contains("deadline"), "{message}");
    assert!(
        took >= Duration::from_millis(700) && took < Duration::from_millis(4500),
        "{took:?}"
    );
    // A deadline longer than --request-timeout: answered.
    let (status, headers, _) = e
        .call(
            &client_of(&e),
            true,
            get("/slow?ms=1200", &[grpc, ("grpc-timeout", "10S")]),
        )
        .await
        .unwrap();
    assert_eq!(status, 200);
    assert!(headers.get("grpc-status").is_none(), "{headers:?}");
    // Not gRPC (gRPC-Web, or none): --request-timeout. Nor is HTTP/1.1 with gRPC's content type
    // (gRPC is h2 only; such a request reaches the app over HTTP/1.1).
    for (h2, headers) in [
        (true, &[][..]),
        (true, &[("content-type", "application/grpc-web")][..]),
        (false, &[grpc][..]),
    ] {
        let (status, _, _) = e
            .call(&client_of(&e), h2, get("/slow?ms=3000", headers))
            .await
            .unwrap();
        assert_eq!(status, 504, "h2 {h2}: {headers:?}");
    }
}

fn client_of(e: &Env) -> Workload {
    e.pki.workload(CLIENT)
}

/// An app that accepts one HTTP/1.1 Upgrade and then echoes raw bytes.
async fn upgrade_app() -> SocketAddr {
    let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = l.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((mut s, _)) = l.accept().await {
            tokio::spawn(async move {
                let mut head = Vec::new();
                let mut b = [0u8; 1];
                while !head.ends_with(b"\r\n\r\n") {
                    if s.read(&mut b).await.unwrap_or(0) == 0 {
                        return;
                    }
                    head.push(b[0]);
                }
                let _ = s
                    .write_all(b"HTTP/1.1 101 Switching Protocols\r\nConnection: Upgrade\r\nUpgrade: echo\r\n\r\n")
                    .await;
                let (mut r, mut w) = s.split();
                let _ = tokio::io::copy(&mut r, &mut w).await;
            });
        }
    });
    addr
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn upgrade_passes_through() {
    let app = upgrade_app().await;
    let e = env(Limits::default(), app).await;
    let client = e.pki.workload(CLIENT);
    let cfg = client_config(
        &e.pki.roots(),
        &e.pki.trust_domain,
        Some(&client),
        &e.sidecar.id,
        &[b"http/1.1"],
    );
    let mut tls = mtls_connect(e.sidecar.inbound[0], cfg).await.unwrap();
    tls.write_all(
        b"GET /api/ws HTTP/1.1\r\nHost: app\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n\r\n",
    )
    .await
    .unwrap();
    let mut head = Vec::new();
    let mut b = [0u8; 1];
    while !head.ends_with(b"\r\n\r\n") {
        assert_eq!(
            tls.read(&mut b).await.unwrap(),
            1,
            "{}",
            String::from_utf8_lossy(&head)
        );
        head.push(b[0]);
    }
    assert!(
        head.starts_with(b"HTTP/1.1 101"),
        "{}",
        String::from_utf8_lossy(&head)
    );
    tls.write_all(b"frames both ways").await.unwrap();
    let mut back = [0u8; 16];
    tls.read_exact(&mut back).await.unwrap();
    assert_eq!(&back, b"frames both ways");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn policy_hot_reload_under_traffic_fails_no_allowed_request() {
    let app = http_echo().await;
    let e = Arc::new(env(Limits::default(), app).await);
    let client = e.pki.workload(CLIENT);
    let stranger = e.pki.workload(STRANGER);
    let failed = Arc::new(AtomicUsize::new(0));
    let done = Arc::new(AtomicUsize::new(0));
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let mut traffic = Vec::new();
    for _ in 0..2 {
        let (e, client, failed, done, stop) = (
            e.clone(),
            client.clone(),
            failed.clone(),
            done.clone(),
            stop.clone(),
        );
        traffic.push(tokio::spawn(async move {
            while !stop.load(Ordering::Relaxed) {
                match e.call(&client, true, get("/api/x", &[])).await {
                    Ok((200, _, _)) => {}
                    other => {
                        eprintln!("allowed request failed: {other:?}");
                        failed.fetch_add(1, Ordering::Relaxed);
                    }
                }
                done.fetch_add(1, Ordering::Relaxed);
            }
        }));
    }
    // Add the stranger, then a broken file (kept out), then remove the stranger again.
    let with_stranger = policy().replace(
        "      - id: spiffe://cluster.local/ns/ops/sa/*",
        &format!("      - id: {STRANGER}\n      - id: spiffe://cluster.local/ns/ops/sa/*"),
    );
    e.sidecar.write_policy(&with_stranger);
    let allowed = eventually(Duration::from_secs(10), || async {
        matches!(
            e.call(&stranger, false, get("/anything", &[])).await,
            Ok((200, _, _))
        )
    })
    .await;
    assert!(allowed, "new policy applied");
    e.sidecar
        .write_policy("mode: enforce\ninbound:\n  - port: {port0}\n    bogus_field: 1\n");
    tokio::time::sleep(Duration::from_millis(1500)).await;
    assert!(
        matches!(
            e.call(&stranger, false, get("/anything", &[])).await,
            Ok((200, _, _))
        ),
        "a broken policy keeps the last good one"
    );
    let rejected = e.sidecar.metrics().await;
    assert!(
        rejected.contains(r#"meshid_sidecar_policy_reloads_total{result="rejected"}"#),
        "{rejected}"
    );
    e.sidecar.write_policy(&policy());
    let denied = eventually(Duration::from_secs(10), || async {
        matches!(
            e.call(&stranger, false, get("/anything", &[])).await,
            Ok((403, _, _))
        )
    })
    .await;
    assert!(denied, "stranger removed again");
    stop.store(true, Ordering::Relaxed);
    for t in traffic {
        t.await.unwrap();
    }
    assert!(done.load(Ordering::Relaxed) > 10, "traffic kept flowing");
    assert_eq!(
        failed.load(Ordering::Relaxed),
        0,
        "no allowed request failed"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_drain_lets_in_flight_requests_finish() {
    let app = http_echo().await;
    let mut e = env(Limits::default(), app).await;
    let client = e.pki.workload(CLIENT);
    let cfg = client_config(
        &e.pki.roots(),
        &e.pki.trust_domain,
        Some(&client),
        &e.sidecar.id,
        &[b"h2"],
    );
    let addr = e.sidecar.inbound[0];
    let tls = mtls_connect(addr, cfg.clone()).await.unwrap();
    let slow = tokio::spawn(http_request(tls, true, get("/slow?ms=1500", &[])));
    tokio::time::sleep(Duration::from_millis(300)).await;
    let shutdown = {
        let running = e.sidecar.running.take().unwrap();
        tokio::spawn(running.shutdown())
    };
    tokio::time::sleep(Duration::from_millis(200)).await;
    // New connections are no longer accepted.
    let refused = mtls_connect(addr, cfg).await;
    assert!(refused.is_err(), "listener closed during drain");
    let (status, _, body) = slow.await.unwrap().unwrap();
    assert_eq!(status, 200, "{body}");
    tokio::time::timeout(Duration::from_secs(10), shutdown)
        .await
        .expect("drain finishes")
        .unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn audit_mode_lets_denials_through_and_counts_them() {
    let app = http_echo().await;
    let e = env(Limits::default(), app).await;
    e.sidecar
        .write_policy(&policy().replace("mode: enforce", "mode: audit"));
    let stranger = e.pki.workload(STRANGER);
    let through = eventually(Duration::from_secs(10), || async {
        matches!(
            e.call(&stranger, false, get("/api/x", &[])).await,
            Ok((200, _, _))
        )
    })
    .await;
    assert!(through, "audit mode allows what enforce would deny");
    let m = e.sidecar.metrics().await;
    assert!(
        m.contains(r#"decision="audit_deny",rule="no-rule-matched""#),
        "{m}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kubelet_probes_moved_to_the_admin_port_reach_the_app() {
    let app = http_echo().await;
    let probes = format!(
        r#"{{"app/readiness":{{"port":{},"path":"/ready"}},"app/liveness":{{"port":1,"path":"/"}}}}"#,
        app.port()
    );
    let (_pki, sidecar) = sidecar_with_probes("127.0.0.14", app, &probes).await;
    let admin = sidecar.admin;
    let (ready, live, unknown) = tokio::task::spawn_blocking(move || {
        (
            meshid_tests::process::http_get(admin, "/app-health/app/readiness")
                .unwrap()
                .0,
            meshid_tests::process::http_get(admin, "/app-health/app/liveness")
                .unwrap()
                .0,
            meshid_tests::process::http_get(admin, "/app-health/other/readiness")
                .unwrap()
                .0,
        )
    })
    .await
    .unwrap();
    assert_eq!(ready, 200, "forwarded to the app");
    assert_eq!(live, 503, "nothing listens on the app's liveness port");
    assert_eq!(unknown, 404);
}

/// A sidecar whose policy is an annotations file with one HTTP inbound port on `ip` to `app` and
/// the app probes `probes` ([`meshid_tests::mesh::probe_annotations`]).
async fn sidecar_with_probes(
    ip: &'static str,
    app: std::net::SocketAddr,
    probes: &str,
) -> (TestPki, TestSidecar) {
    let pki = TestPki::new();
    let server = pki.workload(SERVER);
    let annotations = meshid_tests::mesh::probe_annotations(CLIENT, probes);
    let sidecar = TestSidecar::start(
        &pki,
        &server,
        SERVER,
        SidecarSpec {
            inbound: vec![(ip, app, Protocol::Http)],
            policy: Some(annotations),
            ..Default::default()
        },
    )
    .await;
    (pki, sidecar)
}

/// A probe's own `Host` header is the request's one Host, as the kubelet sends it (it was added as
/// a second Host, which an app must answer 400), and a long answer is cut, not a failure (the
/// kubelet reads 10 KiB of it; the sidecar failed every probe whose answer was over 64 KiB).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn probes_keep_their_host_header_and_long_answers() {
    // Answers 200 to a request with exactly one `Host: app.example` (400 otherwise), with a
    // 100 KiB body for `/big`.
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let app = listener.local_addr().unwrap();
    tokio::spawn(async move {
        loop {
            let Ok((mut s, _)) = listener.accept().await else {
                return;
            };
            tokio::spawn(async move {
                use tokio::io::{AsyncReadExt, AsyncWriteExt};
                let mut head = Vec::new();
                let mut buf = [0u8; 4096];
                while !head.windows(4).any(|w| w == b"\r\n\r\n") {
                    match s.read(&mut buf).await {
                        Ok(n) if n > 0 => head.extend_from_slice(&buf[..n]),
                        _ => return,
                    }
                }
                let head = String::from_utf8_lossy(&head).to_lowercase();
                let hosts: Vec<&str> = head.lines().filter(|l| l.starts_with("host:")).collect();
                let ok = hosts == ["host: app.example"];
                let body = if head.starts_with("get /big ") {
                    "x".repeat(100 * 1024)
                } else {
                    String::new()
                };
                let status = if ok { "200 OK" } else { "400 Bad Request" };
                let _ = s
                    .write_all(
                        format!(
                            "HTTP/1.1 {status}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
                            body.len()
                        )
                        .as_bytes(),
                    )
                    .await;
            });
        }
    });
    let host =
        r#""httpHeaders":[{"name":"Host","value":"app.example"},{"name":"X-Probe","value":"1"}]"#;
    let probes = format!(
        r#"{{"app/readiness":{{"port":{port},"path":"/ready",{host}}},"app/liveness":{{"port":{port},"path":"/big",{host}}},"app/startup":{{"port":{port},"path":"/ready"}}}}"#,
        port = app.port()
    );
    let (_pki, sidecar) = sidecar_with_probes("127.0.0.15", app, &probes).await;
    let admin = sidecar.admin;
    let got = tokio::task::spawn_blocking(move || {
        ["readiness", "liveness", "startup"].map(|kind| {
            meshid_tests::process::http_get(admin, &format!("/app-health/app/{kind}"))
                .unwrap()
                .0
        })
    })
    .await
    .unwrap();
    // The startup probe names no Host: the app gets the sidecar's `127.0.0.1:PORT`, and refuses.
    assert_eq!(got, [200, 200, 400]);
}

/// Log lines written while a test runs, as the binaries write them (JSON).
#[derive(Clone, Default)]
struct Logs(Arc<std::sync::Mutex<Vec<u8>>>);

impl std::io::Write for Logs {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_decision_log_names_a_well_formed_traceparent_only() {
    use meshid_runtime::process::{LogFormat, subscriber};
    let logs = Logs::default();
    let writer = logs.clone();
    // Global: the sidecar's tasks run on the runtime's worker threads. Another test of this binary
    // may have installed it first when run in one process (cargo test); nextest runs one per process.
    if tracing::subscriber::set_global_default(subscriber(LogFormat::Json, false, move || {
        writer.clone()
    }))
    .is_err()
    {
        // Skipping is for a local `cargo test` only: in CI (nextest, one test per process) a
        // subscriber already set means this test would check nothing.
        assert!(
            std::env::var("CI").as_deref() != Ok("true"),
            "a global tracing subscriber was already set: the decision log cannot be checked"
        );
        eprintln!("skipped: a global tracing subscriber was already set (run it with nextest)");
        return;
    }
    let app = http_echo().await;
    let e = env(Limits::default(), app).await;
    let stranger = e.pki.workload(STRANGER);
    let good = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";
    let forged = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01 forged=1";
    for (path, tp) in [("/good", good), ("/forged", forged)] {
        let (status, _, body) = e
            .call(&stranger, false, get(path, &[("traceparent", tp)]))
            .await
            .unwrap();
        assert_eq!(status, 403, "{body}");
    }
    let text = String::from_utf8(logs.0.lock().unwrap().clone()).unwrap();
    let denied: Vec<serde_json::Value> = text
        .lines()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .filter(|v| v["message"] == "denied")
        .collect();
    let of = |path: &str| {
        denied
            .iter()
            .find(|v| v["path"] == path)
            .unwrap_or_else(|| panic!("no denied line for {path} in:\n{text}"))
    };
    assert_eq!(of("/good")["traceparent"], good, "{text}");
    assert!(of("/forged").get("traceparent").is_none(), "{text}");
    assert!(!text.contains("forged=1"), "{text}");
}

/// `meshid_sidecar_idle_http_connections` of the sidecar's inbound listener.
async fn idle_connections(e: &Env) -> Option<u64> {
    let port = e.sidecar.inbound[0].port();
    let want =
        format!("meshid_sidecar_idle_http_connections{{direction=\"inbound\",port=\"{port}\"}} ");
    let text = e.sidecar.metrics().await;
    text.lines()
        .find_map(|l| l.strip_prefix(&want).and_then(|v| v.trim().parse().ok()))
}

/// `meshid_sidecar_heap_trims_total`, both results together.
async fn heap_trims(e: &Env) -> u64 {
    let text = e.sidecar.metrics().await;
    text.lines()
        .filter_map(|l| l.strip_prefix("meshid_sidecar_heap_trims_total{"))
        .filter_map(|l| l.rsplit(' ').next()?.trim().parse::<u64>().ok())
        .sum()
}

async fn http1_connection(e: &Env) -> tokio_rustls::client::TlsStream<tokio::net::TcpStream> {
    let cfg = client_config(
        &e.pki.roots(),
        &e.pki.trust_domain,
        Some(&client_of(e)),
        &e.sidecar.id,
        &[b"http/1.1"],
    );
    mtls_connect(e.sidecar.inbound[0], cfg).await.unwrap()
}

/// Only the sidecar speaks `x-meshid-*` to a caller: an app that answers with its own
/// `x-meshid-reason` and `x-meshid-decision` (a 403 dressed as a sidecar's denial) reaches the caller
/// without them. And a request with two `Host` lines is refused (400) before it reaches the app,
/// which could read another one than the hops before it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_sidecars_own_headers_come_from_the_sidecar_alone() {
    let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let app = l.local_addr().unwrap();
    let asked = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let seen = asked.clone();
    tokio::spawn(async move {
        while let Ok((mut s, _)) = l.accept().await {
            let seen = seen.clone();
            tokio::spawn(async move {
                let mut head = Vec::new();
                let mut b = [0u8; 1];
                while !head.ends_with(b"\r\n\r\n") {
                    if s.read(&mut b).await.unwrap_or(0) == 0 {
                        return;
                    }
                    head.push(b[0]);
                }
                seen.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                let _ = s
                    .write_all(
                        b"HTTP/1.1 403 Forbidden\r\nx-meshid-reason: the sidecar says no\r\n\
                          X-Meshid-Decision: d-forged\r\nx-app: kept\r\ncontent-length: 2\r\n\
                          connection: close\r\n\r\nno",
                    )
                    .await;
            });
        }
    });
    let e = env(Limits::default(), app).await;
    let client = client_of(&e);
    for h2 in [false, true] {
        let (status, headers, body) = e.call(&client, h2, get("/api/x", &[])).await.unwrap();
        assert_eq!((status, body.as_str()), (403, "no"), "h2: {h2}");
        assert_eq!(headers.get("x-app").unwrap(), "kept", "h2: {h2}");
        assert!(
            !headers.keys().any(|k| k.as_str().starts_with("x-meshid-")),
            "h2: {h2}: {headers:?}"
        );
    }
    assert_eq!(asked.load(std::sync::atomic::Ordering::SeqCst), 2);

    let mut tls = http1_connection(&e).await;
    tls.write_all(b"GET /api/x HTTP/1.1\r\nHost: app\r\nHost: admin.internal\r\n\r\n")
        .await
        .unwrap();
    let (status, head, _) = read_response(&mut tls, &mut Vec::new()).await.unwrap();
    assert_eq!(status, 400, "{head}");
    assert!(
        head.to_lowercase()
            .contains("x-meshid-reason: more than one host header"),
        "{head}"
    );
    assert_eq!(asked.load(std::sync::atomic::Ordering::SeqCst), 2);
}

/// Nor in its trailers: an app that ends a chunked answer with an `x-meshid-reason` trailer (a gRPC
/// error dressed as a sidecar's denial) reaches the caller without it, its own trailers kept, on
/// both app pools (a bodiless request's and one with a body) and to HTTP/1.1 and h2 callers.
/// Before, only the response head was cleaned.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_sidecars_own_words_are_not_in_an_apps_trailers() {
    let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let app = l.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((mut s, _)) = l.accept().await {
            tokio::spawn(async move {
                let mut got = Vec::new();
                let mut b = [0u8; 1024];
                // One request per connection: the head, then a body of its content-length.
                while !got.windows(4).any(|w| w == b"\r\n\r\n") {
                    match s.read(&mut b).await {
                        Ok(0) | Err(_) => return,
                        Ok(n) => got.extend_from_slice(&b[..n]),
                    }
                }
                let _ = s
                    .write_all(
                        b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\
                          trailer: x-meshid-reason, x-app-trailer\r\nconnection: close\r\n\r\n\
                          2\r\nok\r\n0\r\nx-meshid-reason: the sidecar says no\r\n\
                          X-Meshid-Decision: d-forged\r\nx-app-trailer: kept\r\n\r\n",
                    )
                    .await;
            });
        }
    });
    let e = env(Limits::default(), app).await;
    let client = client_of(&e);
    for h2 in [false, true] {
        for with_body in [false, true] {
            let mut req = if with_body {
                let mut req = get("/api/x", &[("te", "trailers")]);
                *req.method_mut() = hyper::Method::PUT;
                *req.body_mut() = http_body_util::Full::new(bytes::Bytes::from_static(b"hi"));
                req
            } else {
                get("/api/x", &[("te", "trailers")])
            };
            if h2 {
                req.headers_mut().remove("host");
            }
            let alpn: &[&[u8]] = if h2 { &[b"h2"] } else { &[b"http/1.1"] };
            let cfg = client_config(
                &e.pki.roots(),
                &e.pki.trust_domain,
                Some(&client),
                &e.sidecar.id,
                alpn,
            );
            let tls = mtls_connect(e.sidecar.inbound[0], cfg).await.unwrap();
            let (status, _, body, trailers) = http_exchange(tls, h2, req).await.unwrap();
            let case = format!("h2: {h2}, body: {with_body}");
            assert_eq!((status, body.as_str()), (200, "ok"), "{case}");
            assert_eq!(
                trailers.get("x-app-trailer").map(|v| v.to_str().unwrap()),
                Some("kept"),
                "{case}: {trailers:?}"
            );
            assert!(
                !trailers.keys().any(|k| k.as_str().starts_with("x-meshid-")),
                "{case}: {trailers:?}"
            );
        }
    }
}

/// A quiet HTTP/1.1 keep-alive connection gives hyper's buffers back and waits on its socket alone;
/// nothing a client can do on it tells the difference: the next request, pipelined requests, a
/// request body or head that arrives in pieces across the quiet period, a slow response, shutdown.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn quiet_http1_connections_let_go_of_their_buffers_and_serve_on() {
    let app = http_echo().await;
    let mut e = env(Limits::default(), app).await;
    let mut tls = http1_connection(&e).await;
    let mut pending = Vec::new();
    let quiet = Duration::from_millis(1500);

    tls.write_all(b"GET /api/one HTTP/1.1\r\nhost: a\r\n\r\n")
        .await
        .unwrap();
    let (status, _, body) = read_response(&mut tls, &mut pending).await.unwrap();
    assert_eq!(status, 200, "{body}");
    assert!(body.starts_with("GET /api/one"), "{body}");
    assert!(
        eventually(Duration::from_secs(10), || async {
            idle_connections(&e).await == Some(1)
        })
        .await,
        "a quiet connection was never counted as idle"
    );
    // Letting go of them is reported: the heap is trimmed once the freeing stops.
    assert!(
        eventually(Duration::from_secs(10), || async {
            heap_trims(&e).await >= 1
        })
        .await,
        "no heap trim after a connection let go of its buffers"
    );

    // Two pipelined requests in one write wake it: both answered, in order.
    tls.write_all(
        b"GET /api/two HTTP/1.1\r\nhost: a\r\n\r\nGET /api/three HTTP/1.1\r\nhost: a\r\n\r\n",
    )
    .await
    .unwrap();
    for want in ["GET /api/two", "GET /api/three"] {
        let (status, _, body) = read_response(&mut tls, &mut pending).await.unwrap();
        assert_eq!(status, 200, "{body}");
        assert!(body.starts_with(want), "{want}: {body}");
    }

    // A request body that stops halfway for longer than the quiet period: the connection stays with
    // hyper, and the rest of the body is read as body, not as a new request.
    tls.write_all(b"PUT /api/body HTTP/1.1\r\nhost: a\r\ncontent-length: 10\r\n\r\nabcd")
        .await
        .unwrap();
    tokio::time::sleep(quiet).await;
    assert_eq!(idle_connections(&e).await, Some(0), "released mid-body");
    tls.write_all(b"efghij").await.unwrap();
    let (status, _, body) = read_response(&mut tls, &mut pending).await.unwrap();
    assert_eq!(status, 200, "{body}");
    assert!(body.ends_with("abcdefghij"), "{body}");

    // The next request's head cut short right after a response, then finished after the quiet
    // period: the bytes hyper had already read are served in order.
    tls.write_all(b"GET /api/late HT").await.unwrap();
    tokio::time::sleep(quiet).await;
    tls.write_all(b"TP/1.1\r\nhost: a\r\n\r\n").await.unwrap();
    let (status, _, body) = read_response(&mut tls, &mut pending).await.unwrap();
    assert_eq!(status, 200, "{body}");
    assert!(body.starts_with("GET /api/late"), "{body}");

    // A response slower than the quiet period is not cut off.
    tls.write_all(b"GET /slow?ms=1500 HTTP/1.1\r\nhost: a\r\n\r\n")
        .await
        .unwrap();
    let (status, _, body) = read_response(&mut tls, &mut pending).await.unwrap();
    assert_eq!(status, 200, "{body}");
    assert!(body.starts_with("GET /slow"), "{body}");

    // Shutdown closes an idle connection at once and finishes.
    assert!(
        eventually(Duration::from_secs(10), || async {
            idle_connections(&e).await == Some(1)
        })
        .await
    );
    let running = e.sidecar.running.take().unwrap();
    tokio::time::timeout(Duration::from_secs(10), running.shutdown())
        .await
        .expect("shutdown finishes with an idle connection open");
    let mut rest = [0u8; 64];
    let n = tokio::time::timeout(Duration::from_secs(5), tls.read(&mut rest))
        .await
        .expect("the idle connection was closed");
    assert!(matches!(n, Ok(0) | Err(_)), "{n:?}");
}

/// While a shutdown drains, the admin port still answers: `/readyz` 503 "shutting down" (probes
/// and load balancers see a draining sidecar, not a crashed one) and `/metrics`; it closes once the
/// drain is over. Before, it closed with the listeners: a refused probe for the whole drain.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_admin_port_answers_not_ready_while_the_shutdown_drains() {
    let app = http_echo().await;
    let mut e = env(Limits::default(), app).await;
    let admin = e.sidecar.admin;
    let get = |path: &'static str| {
        tokio::task::spawn_blocking(move || meshid_tests::process::http_get(admin, path))
    };
    assert_eq!(get("/readyz").await.unwrap().unwrap().0, 200);
    let mut tls = http1_connection(&e).await;
    tls.write_all(b"GET /slow?ms=2000 HTTP/1.1\r\nhost: a\r\n\r\n")
        .await
        .unwrap();
    tokio::time::sleep(Duration::from_millis(300)).await;
    let running = e.sidecar.running.take().unwrap();
    let drain = tokio::spawn(running.shutdown());
    tokio::time::sleep(Duration::from_millis(300)).await;
    let (status, body) = get("/readyz")
        .await
        .unwrap()
        .expect("the admin port answers");
    assert_eq!(status, 503, "{body}");
    assert!(body.contains("shutting down"), "{body}");
    let (status, _) = get("/metrics")
        .await
        .unwrap()
        .expect("metrics while draining");
    assert_eq!(status, 200);
    // The request in flight is answered, then the drain ends and the admin port with it.
    let mut pending = Vec::new();
    let (status, _, _) = read_response(&mut tls, &mut pending).await.unwrap();
    assert_eq!(status, 200);
    drop(tls);
    tokio::time::timeout(Duration::from_secs(10), drain)
        .await
        .expect("the drain ends")
        .unwrap();
    assert!(
        eventually(Duration::from_secs(5), || async {
            get("/healthz").await.unwrap().is_err()
        })
        .await,
        "the admin port closes with the sidecar"
    );
}

/// The idle limit holds whether a connection waits in hyper or with its buffers released, and a
/// head sent in pieces does not restart it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idle_and_half_sent_heads_are_closed_at_the_idle_limit() {
    let app = http_echo().await;
    let e = env(
        Limits {
            idle_timeout: Duration::from_secs(2),
            ..Limits::default()
        },
        app,
    )
    .await;
    // Authenticated, then silent from the handshake on (no request ever: the wait for the first
    // bytes, which tells h2 from HTTP/1.1, is bounded by the same limit).
    let mut silent = http1_connection(&e).await;
    let closed = async {
        let mut b = [0u8; 64];
        loop {
            if let Ok(0) | Err(_) = silent.read(&mut b).await {
                return;
            }
        }
    };
    tokio::time::timeout(Duration::from_secs(15), closed)
        .await
        .expect("a connection silent since its handshake is open long after the idle limit");
    for partial in [&b""[..], b"GET /api/x HTTP/1.1\r\nho"] {
        let mut tls = http1_connection(&e).await;
        let mut pending = Vec::new();
        tls.write_all(b"GET /api/one HTTP/1.1\r\nhost: a\r\n\r\n")
            .await
            .unwrap();
        let (status, _, _) = read_response(&mut tls, &mut pending).await.unwrap();
        assert_eq!(status, 200);
        tls.write_all(partial).await.unwrap();
        // Well past the limit counted from the response, a byte every 700 ms does not keep a head
        // that never completes alive.
        let closed = async {
            let mut b = [0u8; 256];
            loop {
                if !partial.is_empty() {
                    let _ = tls.write_all(b"x").await;
                }
                let read = tokio::time::timeout(Duration::from_millis(700), tls.read(&mut b)).await;
                if let Ok(Ok(0) | Err(_)) = read {
                    return;
                }
            }
        };
        tokio::time::timeout(Duration::from_secs(15), closed)
            .await
            .unwrap_or_else(|_| {
                panic!(
                    "open long after the idle limit: {:?}",
                    String::from_utf8_lossy(partial)
                )
            });
    }
}

/// An app (HTTP/1.1 and h2c) that answers `/api/head?pad=N` with an `x-pad` field of N bytes and
/// the body `ok`. It counts the HTTP/1.1 requests that arrived on a connection after it had
/// answered one with a pad of at least `over` (the sidecar refused that head: the connection must
/// not have gone back to its pool).
async fn padding_app(over: usize) -> (SocketAddr, Arc<AtomicUsize>) {
    use hyper::service::service_fn;
    let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = l.local_addr().unwrap();
    let reused = Arc::new(AtomicUsize::new(0));
    let count = reused.clone();
    tokio::spawn(async move {
        while let Ok((tcp, _)) = l.accept().await {
            let count = count.clone();
            let refused_here = Arc::new(std::sync::atomic::AtomicBool::new(false));
            let svc = service_fn(move |req: hyper::Request<hyper::body::Incoming>| {
                let (count, refused_here) = (count.clone(), refused_here.clone());
                async move {
                    let http1 = req.version() != hyper::Version::HTTP_2;
                    if http1 && refused_here.load(Ordering::SeqCst) {
                        count.fetch_add(1, Ordering::SeqCst);
                    }
                    let pad: usize = req
                        .uri()
                        .query()
                        .and_then(|q| q.strip_prefix("pad="))
                        .and_then(|n| n.parse().ok())
                        .unwrap_or(1);
                    // The request body is read whole before the answer.
                    let _ = http_body_util::BodyExt::collect(req.into_body()).await;
                    if http1 && pad >= over {
                        refused_here.store(true, Ordering::SeqCst);
                    }
                    hyper::Response::builder()
                        .header("x-pad", "p".repeat(pad))
                        .body(http_body_util::Full::new(bytes::Bytes::from_static(b"ok")))
                }
            });
            tokio::spawn(async move {
                let _ = hyper_util::server::conn::auto::Builder::new(
                    hyper_util::rt::TokioExecutor::new(),
                )
                .serve_connection(hyper_util::rt::TokioIo::new(tcp), svc)
                .await;
            });
        }
    });
    (addr, reused)
}

/// A response head from the app over `--max-header-bytes` (32 KiB here: over hyper's 16 KiB h2
/// default, far under its 408 KiB HTTP/1.1 one) is a 502 to the peer on every path to the app: a
/// bodiless GET (the bare pool), a PUT with a body (hyper's HTTP/1.1 client), h2c (a request whose
/// originating app spoke h2); the next request is answered, on another connection; a head under
/// the limit passes on each path.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_response_head_from_the_app_over_max_header_bytes_is_a_502_on_every_path() {
    const OVER: usize = 40_000;
    const UNDER: usize = 24_000;
    let (app, reused) = padding_app(OVER).await;
    let e = env(
        Limits {
            max_header_bytes: 32 * 1024,
            ..Limits::default()
        },
        app,
    )
    .await;
    let client = client_of(&e);
    let request = |method: &str, pad: usize, h2_app: bool| {
        let mut b = hyper::Request::builder()
            .method(method)
            .uri(format!("/api/head?pad={pad}"))
            .header("host", "app.example");
        if h2_app {
            b = b.header("x-meshid-app-h2", "1");
        }
        let body = if method == "PUT" { "a body" } else { "" };
        b.body(http_body_util::Full::new(bytes::Bytes::from(body)))
            .unwrap()
    };
    for (path, method, h2_app) in [
        ("bare", "GET", false),
        ("hyper http/1.1", "PUT", false),
        ("h2c", "GET", true),
    ] {
        let (status, headers, body) = e
            .call(&client, false, request(method, OVER, h2_app))
            .await
            .unwrap();
        assert_eq!(status, 502, "{path}: {body}");
        let reason = headers
            .get("x-meshid-reason")
            .and_then(|v| v.to_str().ok())
            .unwrap_or("");
        if !h2_app {
            assert!(
                reason.contains("longer than 32768 bytes"),
                "{path}: {reason}"
            );
        }
        for pad in [1, UNDER] {
            let (status, headers, body) = e
                .call(&client, false, request(method, pad, h2_app))
                .await
                .unwrap();
            assert_eq!((status, body.as_str()), (200, "ok"), "{path}, pad {pad}");
            assert_eq!(headers.get("x-pad").map(|v| v.len()), Some(pad), "{path}");
        }
    }
    assert_eq!(
        reused.load(Ordering::SeqCst),
        0,
        "a connection whose head was refused took another request"
    );
}
