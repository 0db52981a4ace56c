//! Playing kubelet: two pods are injected by the webhook, then run as a kubelet would run them, from
//! the injected pod specs alone. The CA trusts a fake cluster's JWKS; each pod has its own
//! 127.0.0.x "pod IP"; the projected token and downward-API annotations files are written where the
//! injected volumes mount them (the annotations file as the kubelet's atomic `..data` symlink swap);
//! the sidecars are started with the injected arguments and environment alone (the trust bundle
//! comes in the `MESHID_SIDECAR_CA_BUNDLE_PEM` variable: the pods' namespace has no meshid ConfigMap).
//! Then: an allowed call, a denied one, and a live `kubectl annotate` that changes the allow-list of
//! the running pod without a restart.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::net::SocketAddr;
use std::process::Command;
use std::time::Duration;

use meshid_injector::{InjectConfig, TrustBundle};
use meshid_tests::fake_cluster::FakeCluster;
use meshid_tests::kubelet::{inject, pod, run_sidecar};
use meshid_tests::mesh::{handshake_failure_lines, handshake_failures, metric};
use meshid_tests::process::{Proc, free_addr, http_get, wait_http_ok};
use meshid_tests::tools::workspace_bin;
use serde_json::json;

const FRONTEND: &str = "spiffe://cluster.local/ns/shop/sa/frontend";
const BACKEND: &str = "spiffe://cluster.local/ns/shop/sa/backend";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn injected_pods_run_allow_deny_and_follow_annotation_changes() {
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
    let _ca = Proc::spawn(
        "meshid-ca",
        Command::new(workspace_bin("meshid-ca"))
            .args(["serve", "--dir"])
            .arg(&ca_dir)
            .args(["--listen", &ca_grpc.to_string()])
            .args(["--admin-listen", &ca_admin.to_string()])
            .args(["--san", "localhost", "--audience", "meshid-ca"])
            .arg("--jwks")
            .arg(&jwks)
            .env("MESHID_LOG", "warn"),
    );
    assert!(
        wait_http_ok(ca_admin, "/readyz", Duration::from_secs(10)),
        "CA ready"
    );
    let bundle_pem = std::fs::read_to_string(ca_dir.join("bundle.pem")).unwrap();

    // The backend app listens on 127.0.0.1:PORT, as injected apps must; its sidecar takes PORT on
    // the pod IP 127.0.0.3.
    let app = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = app.local_addr().unwrap().port();
    tokio::spawn(meshid_examples::http_echo(app));
    let local = free_addr("127.0.0.1").port();

    let config = InjectConfig {
        ca_addr: ca_grpc.to_string(),
        ..InjectConfig::new(TrustBundle::from_pem(bundle_pem.as_bytes()).unwrap())
    };
    let backend_annotations = |allowed: &str| {
        json!({
            "meshid.io/inject": "enabled",
            "meshid.io/inbound": format!("{port}=http"),
            format!("meshid.io/allow-{port}"): allowed,
        })
    };
    let backend = inject(&config, &pod("backend", backend_annotations(FRONTEND)));
    let frontend = inject(
        &config,
        &pod(
            "frontend",
            json!({
                "meshid.io/inject": "enabled",
                "meshid.io/outbound": format!("{local}=127.0.0.3:{port},{BACKEND},http"),
                "meshid.io/workload-api": "enabled",
            }),
        ),
    );

    let (b_admin, f_admin) = (free_addr("127.0.0.3"), free_addr("127.0.0.4"));
    let (b_stats, f_stats) = (free_addr("127.0.0.3"), free_addr("127.0.0.4"));
    let (_b, mut b_files) = run_sidecar(
        &backend,
        &dir.path().join("pod-b"),
        "127.0.0.3",
        &cluster,
        b_admin,
        b_stats,
    );
    let (_f, f_files) = run_sidecar(
        &frontend,
        &dir.path().join("pod-f"),
        "127.0.0.4",
        &cluster,
        f_admin,
        f_stats,
    );
    assert!(
        wait_http_ok(b_admin, "/readyz", Duration::from_secs(15)),
        "backend sidecar ready"
    );
    assert!(
        wait_http_ok(f_admin, "/readyz", Duration::from_secs(15)),
        "frontend sidecar ready"
    );
    // Identity and metrics on the stats port; the admin port only answers the kubelet's probes.
    let (code, identity) = http_get(b_stats, "/identity").unwrap();
    assert_eq!(code, 200, "{identity}");
    assert!(identity.contains(BACKEND), "{identity}");
    assert_eq!(http_get(f_stats, "/metrics").unwrap().0, 200);
    for path in ["/metrics", "/identity"] {
        let (code, _) = http_get(b_admin, path).unwrap();
        assert_ne!(code, 200, "{path} is not served on the admin port");
    }

    // The frontend asked for the Workload API: its app container finds the socket through
    // SPIFFE_ENDPOINT_SOCKET (on the shared volume) and gets an SVID of its own.
    let app_env = frontend["spec"]["containers"][0]["env"].as_array().unwrap();
    let endpoint = app_env
        .iter()
        .find(|v| v["name"] == "SPIFFE_ENDPOINT_SOCKET")
        .and_then(|v| v["value"].as_str())
        .expect("SPIFFE_ENDPOINT_SOCKET in the app container");
    let socket = f_files.path(endpoint.strip_prefix("unix://").unwrap());
    let client = spiffe::WorkloadApiClient::connect_to(format!("unix:{}", socket.display()))
        .await
        .expect("the app reaches the Workload API");
    let svid = tokio::time::timeout(Duration::from_secs(15), client.fetch_x509_svid())
        .await
        .expect("an SVID within 15 s")
        .expect("an X509-SVID");
    assert_eq!(svid.spiffe_id().to_string(), FRONTEND);
    assert!(
        backend["spec"]["containers"][0]["env"].is_null(),
        "a pod that did not ask gets no Workload API"
    );

    // The frontend app calls 127.0.0.1:LOCAL; the backend app sees the caller's identity.
    let via = SocketAddr::from(([127, 0, 0, 1], local));
    let (code, body) = http_get(via, "/orders").unwrap();
    assert_eq!(code, 200, "{body}");
    assert!(body.contains(&format!("caller={FRONTEND}")), "{body}");
    // The backend's inbound port on the pod IP refuses plaintext: only the mesh gets in. The
    // port is there (the connection is accepted), the request gets no answer from the app, and the
    // sidecar counts a failed handshake.
    let b_metrics = || http_get(b_stats, "/metrics").unwrap().1;
    let plaintext_refusals = || handshake_failures(&b_metrics(), "inbound", "protocol");
    let refusals_before = plaintext_refusals();
    let answer = plaintext_get(SocketAddr::from(([127, 0, 0, 3], port)), "/orders");
    assert!(
        !answer.contains("HTTP/1.1 200") && !answer.contains("caller="),
        "a plaintext request reached the app: {answer:?}"
    );
    assert!(
        eventually(|| plaintext_refusals() > refusals_before),
        "the plaintext connection is counted as a failed handshake:\n{}",
        handshake_failure_lines(&b_metrics()).join("\n")
    );

    // kubectl annotate pod backend meshid.io/allow-PORT=spiffe://.../sa/ops --overwrite
    b_files.write_annotations(&backend_annotations(
        "spiffe://cluster.local/ns/shop/sa/ops",
    ));
    let denied = eventually(|| {
        http_get(via, "/orders")
            .map(|(c, _)| c == 403)
            .unwrap_or(false)
    });
    assert!(denied, "the new allow-list denies the frontend");
    let (_, body) = http_get(via, "/orders").unwrap();
    assert!(body.to_lowercase().contains("x-meshid-reason"), "{body}");

    // A broken annotation keeps the last good policy; fixing it applies at once.
    let rejected_reloads = || metric(&b_metrics(), REJECTED_RELOADS, &[]);
    let rejected_before = rejected_reloads();
    assert_eq!(metric(&b_metrics(), POLICY_REJECTED, &[]), 0);
    let mut broken = backend_annotations(FRONTEND);
    broken[format!("meshid.io/allow-{port}")] = json!("spiffe://cluster.local/ns/shop/sa/fr*nt");
    b_files.write_annotations(&broken);
    // The sidecar has read the broken file and refused it before we look at what is in force.
    assert!(
        eventually(|| rejected_reloads() > rejected_before),
        "the broken annotation is rejected:\n{}",
        b_metrics()
    );
    let m = b_metrics();
    assert_eq!(metric(&m, POLICY_REJECTED, &[]), 1, "{m}");
    assert_eq!(
        http_get(via, "/orders").unwrap().0,
        403,
        "last good policy kept"
    );
    b_files.write_annotations(&backend_annotations(&format!(
        "{FRONTEND}, spiffe://cluster.local/ns/shop/sa/ops"
    )));
    assert!(
        eventually(|| http_get(via, "/orders")
            .map(|(c, _)| c == 200)
            .unwrap_or(false)),
        "allowed again without a restart"
    );
    let metrics = b_metrics();
    assert_eq!(
        metric(&metrics, REJECTED_RELOADS, &[]),
        rejected_before + 1,
        "the rejected reload is counted once: {metrics}"
    );
    assert_eq!(
        metric(&metrics, POLICY_REJECTED, &[]),
        0,
        "the fixed annotation clears the rejection: {metrics}"
    );

    // An app that listens on all addresses leaves its sidecar no port: a clear startup error.
    let greedy = std::net::TcpListener::bind("0.0.0.0:0").unwrap();
    let taken = greedy.local_addr().unwrap().port();
    let greedy_pod = inject(
        &config,
        &pod(
            "greedy",
            json!({"meshid.io/inject": "enabled", "meshid.io/inbound": format!("{taken}=http")}),
        ),
    );
    let (mut c, _) = run_sidecar(
        &greedy_pod,
        &dir.path().join("pod-c"),
        "127.0.0.5",
        &cluster,
        free_addr("127.0.0.5"),
        free_addr("127.0.0.5"),
    );
    let status = c
        .wait_timeout(Duration::from_secs(10))
        .expect("sidecar exits");
    assert_eq!(status.code(), Some(64), "bad configuration");
}

/// Rejected policy reloads (the downward-API annotations file) of a sidecar.
const REJECTED_RELOADS: &str = "meshid_sidecar_policy_reloads_total{result=\"rejected\"}";
/// 1 while the newest policy file is rejected and the last good one is in force.
const POLICY_REJECTED: &str = "meshid_sidecar_policy_rejected ";

/// Connects to `addr` (which must accept), sends a plaintext `GET path`, and returns whatever comes
/// back before the connection ends (lossily decoded: a TLS alert is binary).
fn plaintext_get(addr: SocketAddr, path: &str) -> String {
    use std::io::{Read, Write};
    let mut s = std::net::TcpStream::connect_timeout(&addr, Duration::from_secs(2))
        .expect("the inbound port accepts connections");
    s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    // The sidecar may close as soon as it sees the first bytes: a failed write is an answer too.
    let _ = write!(
        s,
        "GET {path} HTTP/1.1\r\nHost: meshid\r\nConnection: close\r\n\r\n"
    );
    let mut out = Vec::new();
    let _ = s.read_to_end(&mut out);
    String::from_utf8_lossy(&out).into_owned()
}

fn eventually(check: impl Fn() -> bool) -> bool {
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while std::time::Instant::now() < deadline {
        if check() {
            return true;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    false
}
