//! A root rotation on Kubernetes, played as kubelet and the operator would play it: the CA's state
//! is one Secret, mounted whole in two `meshid-ca serve` replicas as kubelet lays out a Secret
//! volume (timestamped directory, `..data` symlink, atomic swap). The operator runs each step on
//! their own copy of the CA directory (`meshid-ca rotate ... --admin` naming both replicas) and
//! applies it to the Secret (`meshid-ca secret --dir ... | kubectl apply --server-side -f -`: here a kubelet-style
//! swap of the volume). Pods are injected by the webhook (with the bundle the injector holds at that
//! step, which the operator updates with the chart's `ca.trustBundle`) and run from their specs as
//! kubelet would; a pair carries traffic throughout, and a pod injected after each step gets its
//! certificate and is served. No request may fail.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use meshid_injector::{InjectConfig, TrustBundle};
use meshid_tests::fake_cluster::FakeCluster;
use meshid_tests::kubelet::{self, SecretVolume, inject, run_sidecar};
use meshid_tests::mesh::{Traffic, get, http_request};
use meshid_tests::process::{Proc, free_addr, wait_http_ok};
use meshid_tests::rotation_cli::{
    meshid_ca, poll, read_roots, rotate_until_ok, served_bundle, status,
};
use meshid_tests::tools::workspace_bin;
use serde_json::json;

const A: &str = "spiffe://cluster.local/ns/shop/sa/frontend";
const B: &str = "spiffe://cluster.local/ns/shop/sa/backend";
/// Short certificates: renewals, and the wait before `retire`, happen within the test.
const TTL: &str = "8s";

fn start_ca(volume: &Path, jwks: &Path, ip: &str) -> (Proc, SocketAddr, SocketAddr) {
    let (grpc, admin) = (free_addr(ip), free_addr(ip));
    let proc = Proc::spawn(
        "meshid-ca",
        Command::new(workspace_bin("meshid-ca"))
            .args(["serve", "--dir"])
            .arg(volume)
            .args(["--listen", &grpc.to_string()])
            .args(["--admin-listen", &admin.to_string()])
            .args(["--san", "localhost", "--ttl", TTL, "--max-ttl", TTL])
            .arg("--jwks")
            .arg(jwks)
            .env("MESHID_LOG", "warn"),
    );
    assert!(
        wait_http_ok(admin, "/readyz", Duration::from_secs(10)),
        "CA on {grpc} ready"
    );
    (proc, grpc, admin)
}

/// A pod as the injector makes it (the webhook's patch, with the bundle the injector holds at this
/// step and the CA replica `ca`), run as kubelet would run it on its own "pod IP".
struct Pod {
    _proc: Proc,
    _files: meshid_tests::kubelet::PodFiles,
    admin: SocketAddr,
}

fn pod(
    work: &Path,
    cluster: &FakeCluster,
    ca: SocketAddr,
    bundle: &Path,
    sa: &str,
    ip: &str,
    annotations: serde_json::Value,
) -> Pod {
    let pem = std::fs::read(bundle).unwrap();
    let config = InjectConfig {
        ca_addr: ca.to_string(),
        ..InjectConfig::new(TrustBundle::from_pem(&pem).unwrap())
    };
    let injected = inject(&config, &kubelet::pod(sa, annotations));
    let root = work.join(format!("pod-{sa}"));
    let (admin, stats) = (free_addr(ip), free_addr(ip));
    let (proc, files) = run_sidecar(&injected, &root, ip, cluster, admin, stats);
    assert!(
        wait_http_ok(admin, "/readyz", Duration::from_secs(15)),
        "pod {sa} ready"
    );
    Pod {
        _proc: proc,
        _files: files,
        admin,
    }
}

/// The bundle the injector holds after the operator updated it (the chart's `ca.trustBundle`):
/// the operator directory's bundle at this step.
fn injector_bundle(ops: &Path, work: &Path, step: &str) -> PathBuf {
    let path = work.join(format!("injector-bundle-{step}.pem"));
    std::fs::copy(ops.join("bundle.pem"), &path).unwrap();
    path
}

/// `meshid-ca secret --dir OPS | kubectl apply --server-side -f -`, with kubelet's swap for the apply.
fn apply_secret(secret: &mut SecretVolume, ops: &Path) {
    // The manifest on stdout (what `kubectl apply` reads); what was left out, on stderr.
    let out = Command::new(workspace_bin("meshid-ca"))
        .args(["secret", "--dir", &ops.to_string_lossy()])
        .env("MESHID_LOG", "warn")
        .output()
        .expect("run meshid-ca secret");
    let yaml = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{yaml}{stderr}");
    assert!(
        !yaml.contains("root.key"),
        "the root key stays offline: {yaml}"
    );
    assert!(
        stderr.contains("left out of the Secret") && stderr.contains("root.key"),
        "what was left out is named: {stderr}"
    );
    secret.apply_manifest(&yaml);
}

/// Waits until both replicas serve `version` of the bundle with `roots` roots.
async fn replicas_serve(
    cas: &[SocketAddr],
    trust: &[rustls::pki_types::CertificateDer<'static>],
    version: u64,
    roots: usize,
) {
    for ca in cas {
        let mut served = (0, Vec::new());
        let ok = tokio::time::timeout(Duration::from_secs(15), async {
            loop {
                served = served_bundle(*ca, trust).await;
                if served.0 == version && served.1.len() == roots {
                    break;
                }
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        })
        .await;
        assert!(ok.is_ok(), "CA {ca} serves v{version}: got v{}", served.0);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn root_rotation_through_a_secret_volume_with_two_replicas() {
    let started = Instant::now();
    let work = tempfile::tempdir().unwrap();
    let w = work.path();
    let ops = w.join("ops-ca");
    let (code, out) = meshid_ca(&["init", "--dir", &ops.to_string_lossy()]);
    assert_eq!(code, 0, "{out}");
    let mut secret = SecretVolume::new(&w.join("secret"));
    apply_secret(&mut secret, &ops);
    assert!(
        !secret.dir.join("root.key").exists(),
        "the root key stays offline"
    );
    let cluster = FakeCluster::new();
    let jwks = w.join("jwks.json");
    cluster.write_jwks(&jwks);

    let (_ca1, grpc1, admin1) = start_ca(&secret.dir, &jwks, "127.0.0.51");
    let (_ca2, grpc2, admin2) = start_ca(&secret.dir, &jwks, "127.0.0.52");
    let admins = [admin1, admin2];
    let cas = [grpc1, grpc2];
    let roots_v1 = read_roots(&ops.join("bundle.pem"));
    // Join tokens are refused with the reason on a Secret volume.
    let (code, out) = meshid_ca(&[
        "token",
        "create",
        "--dir",
        &secret.dir.to_string_lossy(),
        "--id",
        A,
    ]);
    assert!(
        code != 0 && out.contains("service-account tokens"),
        "{code}: {out}"
    );

    // The pair: B in front of an app, allowing the shop namespace; A calling B.
    let app = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let app_addr = app.local_addr().unwrap();
    tokio::spawn(meshid_examples::http_echo(app));
    let port = app_addr.port();
    let b_in: SocketAddr = format!("127.0.0.53:{port}").parse().unwrap();
    let bundle_v1 = injector_bundle(&ops, w, "v1");
    let _b = pod(
        w,
        &cluster,
        grpc1,
        &bundle_v1,
        "backend",
        "127.0.0.53",
        json!({
            "meshid.io/inject": "enabled",
            "meshid.io/inbound": format!("{port}=http"),
            format!("meshid.io/allow-{port}"): "spiffe://cluster.local/ns/shop/sa/*",
        }),
    );
    let upstream = |local: SocketAddr| {
        json!({
            "meshid.io/inject": "enabled",
            "meshid.io/outbound": format!("{}={b_in},{B},http", local.port()),
        })
    };
    let a_local = free_addr("127.0.0.1");
    let _a = pod(
        w,
        &cluster,
        grpc2,
        &bundle_v1,
        "frontend",
        "127.0.0.54",
        upstream(a_local),
    );
    let traffic = Traffic::start(a_local, Some(format!("caller={A}")));

    // A pod injected now, and after each step: it gets a certificate and B serves it.
    let mut pods = Vec::new();
    let mut new_pod = |step: &str, bundle: &Path, n: usize| {
        let local = free_addr("127.0.0.1");
        let sa = format!("pod-{step}");
        let p = pod(
            w,
            &cluster,
            cas[n % 2],
            bundle,
            &sa,
            &format!("127.0.0.{}", 60 + n),
            upstream(local),
        );
        pods.push(p);
        (
            local,
            format!("caller=spiffe://cluster.local/ns/shop/sa/{sa}"),
        )
    };
    let served = |local: SocketAddr, caller: String| async move {
        let tcp = tokio::net::TcpStream::connect(local).await.unwrap();
        let (code, _, body) = http_request(tcp, false, get("/new-pod", &[]))
            .await
            .unwrap();
        assert_eq!(code, 200, "{body}");
        assert!(body.contains(&caller), "{body}");
    };
    let (local, caller) = new_pod("before", &bundle_v1, 0);
    served(local, caller).await;
    let connected = |version: u64, ids: &[&str]| {
        let ids: Vec<String> = ids.iter().map(|s| (*s).to_owned()).collect();
        let ops = ops.clone();
        move || {
            let r = status(&ops, &admins);
            ids.iter().all(|id| {
                r.sidecars
                    .iter()
                    .any(|s| s.identity == *id && s.connected && s.acked_version >= version)
            })
        }
    };
    assert!(
        poll(Duration::from_secs(15), connected(1, &[A, B])),
        "{:?}",
        status(&ops, &admins)
    );

    // prepare, then the Secret update: both replicas follow the swap and serve v2 (two roots).
    let (code, out) = meshid_ca(&["rotate", "prepare", "--dir", &ops.to_string_lossy()]);
    assert_eq!(code, 0, "prepare: {out}");
    apply_secret(&mut secret, &ops);
    replicas_serve(&cas, &roots_v1, 2, 2).await;
    let bundle_v2 = injector_bundle(&ops, w, "v2");
    let (local, caller) = new_pod("prepared", &bundle_v2, 1);
    served(local, caller).await;
    eprintln!("prepared at {:?}", started.elapsed());

    // activate: the gates ask both replicas (every sidecar acknowledged v2), then the Secret.
    let out = rotate_until_ok("activate", &ops, &admins, Duration::from_secs(30));
    assert!(out.contains("authority 2 now signs"), "{out}");
    apply_secret(&mut secret, &ops);
    let bundle_v3 = injector_bundle(&ops, w, "active");
    let (local, caller) = new_pod("active", &bundle_v3, 2);
    served(local, caller).await;
    eprintln!("activated at {:?}", started.elapsed());

    // retire: waits until no certificate under the old root can be live (the replicas cannot
    // record issuance on a read-only Secret, so start or end of signing + --max-ttl), then the
    // Secret; both replicas serve v3 with the new root alone.
    let out = rotate_until_ok("retire", &ops, &admins, Duration::from_secs(60));
    assert!(out.contains("authority 1 retired"), "{out}");
    apply_secret(&mut secret, &ops);
    let roots_v3 = read_roots(&ops.join("bundle.pem"));
    assert_eq!(roots_v3.len(), 1);
    assert_ne!(roots_v3[0], roots_v1[0]);
    replicas_serve(&cas, &roots_v3, 3, 1).await;
    let bundle_retired = injector_bundle(&ops, w, "retired");
    let (local, caller) = new_pod("retired", &bundle_retired, 3);
    served(local, caller).await;
    assert!(
        poll(Duration::from_secs(20), connected(3, &[A, B])),
        "{:?}",
        status(&ops, &admins)
    );

    let (ok, failed) = traffic.finish().await;
    eprintln!(
        "rotation through a Secret volume: {ok} requests ok, total {:?}",
        started.elapsed()
    );
    assert!(ok > 100, "traffic flowed: {ok}");
    assert_eq!(failed, 0, "no request failed during the rotation");
    for p in &pods {
        assert!(wait_http_ok(p.admin, "/readyz", Duration::from_secs(5)));
    }
}
