//! Playing kubelet: two pods are injected by the webhook, then run as a kubelet would run them, from
//! the injected pod specs alone. The CA trusts a fake cluster's JWKS; each pod has its own
//! 127.0.0.x "pod IP"; the projected token and downward-API annotations files are written where the
//! injected volumes mount them (the annotations file as the kubelet's atomic `..data` symlink swap);
//! the sidecars are started with the injected arguments and environment alone (the trust bundle
//! comes in the `MESHID_CA_BUNDLE_PEM` variable: the pods' namespace has no meshid ConfigMap).
//! Then: an allowed call, a denied one, and a live `kubectl annotate` that changes the allow-list of
//! the running pod without a restart.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use base64::Engine;
use meshid_identity::annotations::to_downward_api;
use meshid_injector::{InjectConfig, Scope, TrustBundle, apply_patch, review};
use meshid_tests::fake_cluster::FakeCluster;
use meshid_tests::process::{Proc, free_addr, http_get, wait_http_ok};
use meshid_tests::tools::workspace_bin;
use serde_json::{Value, json};

const FRONTEND: &str = "spiffe://cluster.local/ns/shop/sa/frontend";
const BACKEND: &str = "spiffe://cluster.local/ns/shop/sa/backend";

fn pod(sa: &str, annotations: Value) -> Value {
    json!({
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"generateName": format!("{sa}-6c9d-"), "namespace": "shop",
                     "labels": {"app": sa}, "annotations": annotations},
        "spec": {
            "serviceAccountName": sa,
            "containers": [{"name": "app", "image": format!("registry.example/{sa}:1")}],
        }
    })
}

/// The webhook's answer applied to `pod`.
fn inject(config: &InjectConfig, pod: &Value) -> Value {
    let review_in = json!({
        "apiVersion": "admission.k8s.io/v1",
        "kind": "AdmissionReview",
        "request": {
            "uid": "1", "namespace": "shop", "operation": "CREATE",
            "kind": {"group": "", "version": "v1", "kind": "Pod"},
            "resource": {"group": "", "version": "v1", "resource": "pods"},
            "object": pod,
        }
    });
    let out = review(config, Scope::Pod, &review_in);
    let patch = out["response"]["patch"]
        .as_str()
        .unwrap_or_else(|| panic!("no patch: {out}"));
    let ops: Vec<Value> = serde_json::from_slice(
        &base64::engine::general_purpose::STANDARD
            .decode(patch)
            .unwrap(),
    )
    .unwrap();
    let mut pod = pod.clone();
    apply_patch(&mut pod, &ops).unwrap();
    pod
}

/// A pod's volumes on "this node": mount paths are re-rooted under `root`.
struct PodFiles {
    root: PathBuf,
    annotations_dir: PathBuf,
    generation: u32,
}

impl PodFiles {
    fn path(&self, p: &str) -> PathBuf {
        self.root.join(p.trim_start_matches('/'))
    }

    /// Writes the annotations as the kubelet does for a downward-API volume: a new timestamped
    /// directory, then `..data` swapped to it by rename; `annotations` links to `..data/annotations`.
    fn write_annotations(&mut self, annotations: &Value) {
        let map: BTreeMap<String, String> = serde_json::from_value(annotations.clone()).unwrap();
        self.generation += 1;
        let name = format!("..2026_11_22_10_00_00.{}", self.generation);
        let dir = self.annotations_dir.join(&name);
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(dir.join("annotations"), to_downward_api(&map)).unwrap();
        let tmp = self.annotations_dir.join("..data_tmp");
        let _ = std::fs::remove_file(&tmp);
        std::os::unix::fs::symlink(&name, &tmp).unwrap();
        std::fs::rename(&tmp, self.annotations_dir.join("..data")).unwrap();
        let link = self.annotations_dir.join("annotations");
        if !link.exists() {
            std::os::unix::fs::symlink("..data/annotations", &link).unwrap();
        }
    }
}

/// Starts the pod's injected sidecar as the kubelet would: its args, its env (with the downward-API
/// values resolved), its volumes' files in place. `admin` (probes) and `stats` (`/metrics`,
/// `/identity`) replace the injected `0.0.0.0:15021` and `0.0.0.0:15020`.
fn run_sidecar(
    pod: &Value,
    root: &Path,
    pod_ip: &str,
    cluster: &FakeCluster,
    admin: SocketAddr,
    stats: SocketAddr,
) -> (Proc, PodFiles) {
    let c = &pod["spec"]["initContainers"][0];
    assert_eq!(c["name"], "meshid-sidecar");
    assert_eq!(c["restartPolicy"], "Always");
    let mut files = PodFiles {
        root: root.to_owned(),
        annotations_dir: PathBuf::new(),
        generation: 0,
    };
    let volumes = pod["spec"]["volumes"].as_array().unwrap();
    let sa = pod["spec"]["serviceAccountName"].as_str().unwrap();
    for mount in c["volumeMounts"].as_array().unwrap() {
        let dir = files.path(mount["mountPath"].as_str().unwrap());
        std::fs::create_dir_all(&dir).unwrap();
        let volume = volumes.iter().find(|v| v["name"] == mount["name"]).unwrap();
        if let Some(projected) = volume.get("projected") {
            let sat = &projected["sources"][0]["serviceAccountToken"];
            assert_eq!(sat["audience"], "meshid-ca");
            let path = dir.join(sat["path"].as_str().unwrap());
            std::fs::write(path, cluster.token("shop", sa)).unwrap();
        } else if volume.get("downwardAPI").is_some() {
            files.annotations_dir = dir;
        } else {
            panic!("unexpected volume {volume}");
        }
    }
    files.write_annotations(&pod["metadata"]["annotations"]);

    let mut args: Vec<String> = c["args"]
        .as_array()
        .unwrap()
        .iter()
        .map(|a| {
            let a = a.as_str().unwrap();
            match a.starts_with('/') {
                true => files.path(a).to_string_lossy().into_owned(),
                false => a.to_owned(),
            }
        })
        .collect();
    // Every pod has its own IP in a cluster; here they share loopback, so the admin and stats
    // ports move.
    for (flag, injected, here) in [
        ("--admin-listen", "0.0.0.0:15021", admin),
        ("--stats-listen", "0.0.0.0:15020", stats),
    ] {
        let i = args.iter().position(|a| a == flag).unwrap();
        assert_eq!(args[i + 1], injected, "{flag}");
        args[i + 1] = here.to_string();
    }
    assert!(
        !args.iter().any(|a| a == "--ca-bundle"),
        "the bundle is not a file: {args:?}"
    );
    let mut cmd = Command::new(workspace_bin("meshid-sidecar"));
    cmd.args(&args)
        .env("MESHID_LOG", "warn")
        .env_remove("MESHID_CA_BUNDLE_PEM");
    let env = c["env"].as_array().unwrap();
    assert!(
        env.iter().any(|e| e["name"] == "MESHID_CA_BUNDLE_PEM"
            && e["value"]
                .as_str()
                .is_some_and(|v| v.contains("BEGIN CERTIFICATE"))),
        "the trust bundle is in the sidecar's environment: {env:?}"
    );
    for e in c["env"].as_array().unwrap() {
        let value = match e["valueFrom"]["fieldRef"]["fieldPath"].as_str() {
            Some("status.podIP") => pod_ip.to_owned(),
            Some(other) => panic!("unexpected fieldRef {other}"),
            None => e["value"].as_str().unwrap().to_owned(),
        };
        cmd.env(e["name"].as_str().unwrap(), value);
    }
    // The CA serves a certificate for "localhost" in this test (in a cluster: its Service name).
    cmd.env("MESHID_CA_SERVER_NAME", "localhost");
    (Proc::spawn(&format!("sidecar {sa}"), &mut cmd), files)
}

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
    let (_f, _f_files) = run_sidecar(
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

    // The frontend app calls 127.0.0.1:LOCAL; the backend app sees the caller's identity.
    let via = SocketAddr::from(([127, 0, 0, 1], local));
    let (code, body) = http_get(via, "/orders").unwrap();
    assert_eq!(code, 200, "{body}");
    assert!(body.contains(&format!("caller={FRONTEND}")), "{body}");
    // The backend's inbound port on the pod IP refuses plaintext: only the mesh gets in.
    assert!(
        http_get(SocketAddr::from(([127, 0, 0, 3], port)), "/orders")
            .map(|(c, _)| c != 200)
            .unwrap_or(true)
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
    let mut broken = backend_annotations(FRONTEND);
    broken[format!("meshid.io/allow-{port}")] = json!("spiffe://cluster.local/ns/shop/sa/fr*nt");
    b_files.write_annotations(&broken);
    tokio::time::sleep(Duration::from_millis(1500)).await;
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
    let (_, metrics) = http_get(b_stats, "/metrics").unwrap();
    assert!(
        metrics.contains("rejected"),
        "the rejected reload is counted"
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
