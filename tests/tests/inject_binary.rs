//! `meshid-injector` as the API server sees it: HTTPS with a serving certificate from
//! `meshid-ca webhook-cert` (verified here against the trust bundle, which the chart puts in the
//! webhook's `caBundle`, and independently with `openssl verify`), an AdmissionReview in, a
//! JSONPatch out carrying the trust bundle; a replaced certificate or bundle is picked up without a
//! restart, a broken one is refused (at start: exit 64) or ignored (while running), and the admin
//! port's metrics follow (the serving certificate's expiry, reloads, reviews); bad flags exit 64
//! naming every problem. Pod UPDATEs (as the API server sends them for `kubectl annotate`: the
//! patched pod and the one before) are validated: a meshid annotation the sidecar would refuse is
//! denied by name, anything else is admitted without a patch. Hostile clients (slow heads, silent
//! connections, oversized and deeply nested bodies, connection floods) are refused and counted
//! while real reviews, over HTTP/1.1 and HTTP/2, keep being answered in time.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::net::SocketAddr;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use base64::Engine;
use meshid_tests::mesh::tls_connect;
use meshid_tests::process::{Proc, free_addr, http_get};
use meshid_tests::tools::{run, workspace_bin};
use rustls_pki_types::{CertificateDer, pem::PemObject};
use serde_json::{Value, json};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

const SAN: &str = "meshid-injector.meshid.svc";

/// One HTTP/1.1 request over TLS verified against `roots` for [`SAN`]: (status, body).
async fn https(
    addr: SocketAddr,
    roots: &[CertificateDer<'static>],
    method: &str,
    path: &str,
    body: &str,
) -> std::io::Result<(u16, String)> {
    let mut tls = tls_connect(addr, roots, SAN).await?;
    let request = format!(
        "{method} {path} HTTP/1.1\r\nHost: {SAN}\r\nContent-Type: application/json\r\n\
         Content-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    );
    tls.write_all(request.as_bytes()).await?;
    let mut out = Vec::new();
    let _ = tls.read_to_end(&mut out).await;
    let text = String::from_utf8_lossy(&out).into_owned();
    let code = text
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or(0);
    let body = text
        .split_once("\r\n\r\n")
        .map(|(_, b)| b.to_owned())
        .unwrap_or_default();
    Ok((code, body))
}

/// `meshid-ca init` into `dir/ca`.
fn init_ca(dir: &Path) -> PathBuf {
    let ca_dir = dir.join("ca");
    let out = Command::new(workspace_bin("meshid-ca"))
        .args(["init", "--dir"])
        .arg(&ca_dir)
        .output()
        .unwrap();
    assert!(out.status.success(), "{out:?}");
    ca_dir
}

fn roots_of(ca_dir: &Path) -> Vec<CertificateDer<'static>> {
    CertificateDer::pem_file_iter(ca_dir.join("bundle.pem"))
        .unwrap()
        .map(Result::unwrap)
        .collect()
}

/// An injector started with a webhook certificate of a fresh test CA, listening (and its admin
/// port) on 127.0.0.1, with whatever `configure` adds to its command; returned once healthy.
struct Webhook {
    addr: SocketAddr,
    admin: SocketAddr,
    roots: Vec<CertificateDer<'static>>,
    injector: Proc,
    /// The CA and certificate files, read again at every reload.
    _dir: tempfile::TempDir,
}

async fn webhook_with(configure: impl FnOnce(&mut Command)) -> Webhook {
    let dir = tempfile::tempdir().unwrap();
    let ca_dir = init_ca(dir.path());
    let roots = roots_of(&ca_dir);
    let tls = dir.path().join("tls");
    assert!(webhook_cert(&ca_dir, &tls, &[]).status.success());
    let (addr, admin) = (free_addr("127.0.0.1"), free_addr("127.0.0.1"));
    let mut cmd = injector(
        &tls.join("tls.crt"),
        &tls.join("tls.key"),
        &ca_dir.join("bundle.pem"),
        &addr.to_string(),
    );
    cmd.args(["--admin-listen", &admin.to_string()]);
    configure(&mut cmd);
    let injector = Proc::spawn("meshid-injector", &mut cmd);
    wait_healthy(addr, &roots).await;
    Webhook {
        addr,
        admin,
        roots,
        injector,
        _dir: dir,
    }
}

/// `meshid-ca webhook-cert --dir CA --dns SAN --out-dir OUT EXTRA...`.
fn webhook_cert(ca_dir: &Path, out_dir: &Path, extra: &[&str]) -> std::process::Output {
    Command::new(workspace_bin("meshid-ca"))
        .args(["webhook-cert", "--dir"])
        .arg(ca_dir)
        .args(["--dns", SAN, "--out-dir"])
        .arg(out_dir)
        .args(extra)
        .output()
        .unwrap()
}

/// A Secret volume as the kubelet lays it out: `tls.crt -> ..data/tls.crt`, `..data` -> a
/// timestamped directory, swapped atomically by [`SecretVolume::update`].
struct SecretVolume {
    dir: PathBuf,
    generation: u32,
}

impl SecretVolume {
    fn new(dir: &Path, files: &[(&str, Vec<u8>)]) -> Self {
        std::fs::create_dir_all(dir).unwrap();
        let mut v = Self {
            dir: dir.to_owned(),
            generation: 0,
        };
        v.update(files);
        for (name, _) in files {
            std::os::unix::fs::symlink(format!("..data/{name}"), dir.join(name)).unwrap();
        }
        v
    }

    fn update(&mut self, files: &[(&str, Vec<u8>)]) {
        self.generation += 1;
        let name = format!("..2026_11_22_12_00_00.{}", self.generation);
        std::fs::create_dir(self.dir.join(&name)).unwrap();
        for (file, contents) in files {
            std::fs::write(self.dir.join(&name).join(file), contents).unwrap();
        }
        let tmp = self.dir.join("..data_tmp");
        std::os::unix::fs::symlink(&name, &tmp).unwrap();
        std::fs::rename(&tmp, self.dir.join("..data")).unwrap();
    }

    fn path(&self, name: &str) -> PathBuf {
        self.dir.join(name)
    }
}

fn pair_files(dir: &Path) -> Vec<(&'static str, Vec<u8>)> {
    vec![
        ("tls.crt", std::fs::read(dir.join("tls.crt")).unwrap()),
        ("tls.key", std::fs::read(dir.join("tls.key")).unwrap()),
    ]
}

fn injector(cert: &Path, key: &Path, bundle: &Path, listen: &str) -> Command {
    let mut cmd = Command::new(workspace_bin("meshid-injector"));
    cmd.arg("--tls-cert")
        .arg(cert)
        .arg("--tls-key")
        .arg(key)
        .arg("--trust-bundle")
        .arg(bundle)
        .args(["--listen", listen, "--reload-interval", "200ms"])
        .args(["--server-name", SAN])
        .args(["--sidecar-image", "registry.example/meshid/sidecar:0.1.0"])
        .args(["--ca-addr", "meshid-ca.meshid.svc:8443"])
        .env("MESHID_LOG", "warn");
    cmd
}

async fn wait_healthy(addr: SocketAddr, roots: &[CertificateDer<'static>]) {
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    loop {
        match https(addr, roots, "GET", "/healthz", "").await {
            Ok((200, _)) => break,
            other => assert!(
                std::time::Instant::now() < deadline,
                "injector not healthy: {other:?}"
            ),
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// The leaf certificate the server at `addr` presents (verified against `roots` for [`SAN`]).
async fn served_leaf(
    addr: SocketAddr,
    roots: &[CertificateDer<'static>],
) -> CertificateDer<'static> {
    let tls = tls_connect(addr, roots, SAN).await.unwrap();
    tls.get_ref().1.peer_certificates().unwrap()[0].clone()
}

/// One sample of the injector's `/metrics` on its admin port (`name{labels}` as printed), or 0.
fn metric(admin: SocketAddr, series: &str) -> f64 {
    let (code, body) = http_get(admin, "/metrics").unwrap();
    assert_eq!(code, 200, "{body}");
    body.lines()
        .find_map(|l| l.strip_prefix(series)?.strip_prefix(' '))
        .map_or(0.0, |v| v.trim().parse().unwrap())
}

/// The not-after of the first certificate in `cert_pem`, as Unix seconds.
fn not_after(cert_pem: &Path) -> f64 {
    let der = CertificateDer::pem_file_iter(cert_pem)
        .unwrap()
        .next()
        .unwrap()
        .unwrap();
    let (_, cert) = x509_parser::parse_x509_certificate(&der).unwrap();
    cert.validity().not_after.timestamp() as f64
}

fn review(pod: &Value) -> String {
    json!({
        "apiVersion": "admission.k8s.io/v1", "kind": "AdmissionReview",
        "request": {"uid": "abc", "namespace": "shop", "operation": "CREATE",
            "kind": {"group": "", "version": "v1", "kind": "Pod"},
            "resource": {"group": "", "version": "v1", "resource": "pods"},
            "object": pod}
    })
    .to_string()
}

fn annotated_pod() -> Value {
    json!({
        "apiVersion": "v1", "kind": "Pod",
        "metadata": {"generateName": "web-", "namespace": "other",
            "annotations": {"meshid.io/inject": "enabled", "meshid.io/inbound": "8080=http"}},
        "spec": {"serviceAccountName": "web", "containers": [{"name": "app", "image": "web:1"}]},
    })
}

/// The `MESHID_SIDECAR_CA_BUNDLE_PEM` value in the injector's answer for `pod` on `/inject`.
async fn injected_bundle(addr: SocketAddr, roots: &[CertificateDer<'static>]) -> String {
    let (code, body) = https(addr, roots, "POST", "/inject", &review(&annotated_pod()))
        .await
        .unwrap();
    assert_eq!(code, 200, "{body}");
    let answer: Value = serde_json::from_str(&body).unwrap();
    let patch = base64::engine::general_purpose::STANDARD
        .decode(answer["response"]["patch"].as_str().unwrap())
        .unwrap();
    let ops: Vec<Value> = serde_json::from_slice(&patch).unwrap();
    let sidecar = ops
        .iter()
        .find(|o| o["path"] == "/spec/initContainers")
        .unwrap();
    let env = sidecar["value"][0]["env"].as_array().unwrap();
    env.iter()
        .find(|e| e["name"] == "MESHID_SIDECAR_CA_BUNDLE_PEM")
        .unwrap()["value"]
        .as_str()
        .unwrap()
        .to_owned()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn injector_serves_admission_reviews_over_tls_from_our_ca() {
    let dir = tempfile::tempdir().unwrap();
    let ca_dir = init_ca(dir.path());
    let roots = roots_of(&ca_dir);
    let tls = dir.path().join("tls");
    let out = webhook_cert(&ca_dir, &tls, &[]);
    assert!(out.status.success(), "{out:?}");
    let addr = free_addr("127.0.0.1");
    // The injector logs JSON; the sidecars it injects log text (the chart's `sidecar.logFormat`).
    let _injector = Proc::spawn(
        "meshid-injector",
        injector(
            &tls.join("tls.crt"),
            &tls.join("tls.key"),
            &ca_dir.join("bundle.pem"),
            &addr.to_string(),
        )
        .env("MESHID_LOG_FORMAT", "json")
        .args(["--sidecar-log-format", "text"]),
    );
    wait_healthy(addr, &roots).await;

    let pod = json!({
        "apiVersion": "v1", "kind": "Pod",
        "metadata": {"generateName": "web-", "namespace": "shop",
            "annotations": {"meshid.io/inbound": "8080=http"}},
        "spec": {"serviceAccountName": "web", "containers": [{"name": "app", "image": "web:1"}]},
    });
    // The namespace-wide entry injects a pod without its own annotation.
    let (code, body) = https(addr, &roots, "POST", "/inject-namespace", &review(&pod))
        .await
        .unwrap();
    assert_eq!(code, 200, "{body}");
    let answer: Value = serde_json::from_str(&body).unwrap();
    assert_eq!(answer["response"]["uid"], "abc");
    assert_eq!(answer["response"]["allowed"], true);
    let patch = base64::engine::general_purpose::STANDARD
        .decode(answer["response"]["patch"].as_str().unwrap())
        .unwrap();
    let ops: Vec<Value> = serde_json::from_slice(&patch).unwrap();
    let sidecar = ops
        .iter()
        .find(|o| o["path"] == "/spec/initContainers")
        .unwrap();
    assert_eq!(
        sidecar["value"][0]["image"],
        "registry.example/meshid/sidecar:0.1.0"
    );
    assert!(
        sidecar["value"][0]["args"]
            .as_array()
            .unwrap()
            .contains(&json!("meshid-ca.meshid.svc:8443"))
    );
    // The trust bundle travels in the sidecar's environment: no ConfigMap in the pod's namespace.
    let bundle_pem = std::fs::read_to_string(ca_dir.join("bundle.pem")).unwrap();
    let env = sidecar["value"][0]["env"].as_array().unwrap();
    let injected = env
        .iter()
        .find(|e| e["name"] == "MESHID_SIDECAR_CA_BUNDLE_PEM")
        .unwrap();
    assert_eq!(
        injected["value"].as_str().unwrap().trim(),
        bundle_pem.trim()
    );
    assert!(
        !sidecar["value"][0]["volumeMounts"]
            .to_string()
            .contains("bundle"),
        "no bundle volume: {sidecar}"
    );
    let log_format = env
        .iter()
        .find(|e| e["name"] == "MESHID_LOG_FORMAT")
        .unwrap();
    assert_eq!(log_format["value"], "text");
    // The per-pod entry does not inject it: no annotation asks for it.
    let (_, body) = https(addr, &roots, "POST", "/inject", &review(&pod))
        .await
        .unwrap();
    let answer: Value = serde_json::from_str(&body).unwrap();
    assert_eq!(answer["response"]["allowed"], true);
    assert!(answer["response"].get("patch").is_none());
    let (code, _) = https(addr, &roots, "POST", "/inject", "not json")
        .await
        .unwrap();
    assert_eq!(code, 400);
}

/// The AdmissionReview the API server sends for `kubectl annotate pod NAME ... --overwrite` (a PATCH,
/// which admission sees as an UPDATE): the pod after the change, and before it.
fn update_review(pod: &Value, old: &Value) -> String {
    json!({
        "apiVersion": "admission.k8s.io/v1",
        "kind": "AdmissionReview",
        "request": {
            "uid": "0df28fbd-5f5f-4e5e-8d59-3e2a1c9e0b7a",
            "kind": {"group": "", "version": "v1", "kind": "Pod"},
            "resource": {"group": "", "version": "v1", "resource": "pods"},
            "requestKind": {"group": "", "version": "v1", "kind": "Pod"},
            "requestResource": {"group": "", "version": "v1", "resource": "pods"},
            "name": pod["metadata"]["name"],
            "namespace": "shop",
            "operation": "UPDATE",
            "userInfo": {"username": "jane@example.com", "groups": ["system:authenticated"]},
            "object": pod,
            "oldObject": old,
            "dryRun": false,
            "options": {"apiVersion": "meta.k8s.io/v1", "kind": "PatchOptions",
                "fieldManager": "kubectl-annotate"},
        }
    })
    .to_string()
}

/// POSTs `body` to `path`: the AdmissionReview's response.
async fn answer(
    addr: SocketAddr,
    roots: &[CertificateDer<'static>],
    path: &str,
    body: &str,
) -> Value {
    let (code, body) = https(addr, roots, "POST", path, body).await.unwrap();
    assert_eq!(code, 200, "{body}");
    let answer: Value = serde_json::from_str(&body).unwrap();
    assert_eq!(answer["kind"], "AdmissionReview");
    answer["response"].clone()
}

/// Any pod that reaches the webhook can send reviews: the line each review writes is limited (a
/// burst of 200, then 50 a second, the metrics counting every review) and cut short where the
/// sender chose its text, and a `uid` no API server would send is refused. Before, every review
/// wrote a line quoting whatever `kind` and `uid` it carried, at any rate and length.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reviews_anyone_can_send_write_few_short_log_lines() {
    let dir = tempfile::tempdir().unwrap();
    let ca_dir = init_ca(dir.path());
    let roots = roots_of(&ca_dir);
    let tls = dir.path().join("tls");
    assert!(webhook_cert(&ca_dir, &tls, &[]).status.success());
    let (addr, admin) = (free_addr("127.0.0.1"), free_addr("127.0.0.1"));
    let log = dir.path().join("injector.log");
    let _injector = Proc::spawn(
        "meshid-injector",
        injector(
            &tls.join("tls.crt"),
            &tls.join("tls.key"),
            &ca_dir.join("bundle.pem"),
            &addr.to_string(),
        )
        .args(["--admin-listen", &admin.to_string()])
        .env("MESHID_LOG", "info")
        .env("MESHID_LOG_FORMAT", "json")
        .stderr(std::fs::File::create(&log).unwrap()),
    );
    wait_healthy(addr, &roots).await;
    let started = std::time::Instant::now();
    const REVIEWS: usize = 400;
    let wrong_kind = json!({
        "apiVersion": "admission.k8s.io/v1",
        "kind": "AdmissionReview",
        "request": {"uid": "u", "namespace": "n".repeat(8 * 1024),
            "kind": {"group": "", "version": "v1", "kind": "K".repeat(8 * 1024)}},
    })
    .to_string();
    for _ in 0..REVIEWS {
        answer(addr, &roots, "/inject", &wrong_kind).await;
    }
    let long_uid = json!({
        "apiVersion": "admission.k8s.io/v1",
        "kind": "AdmissionReview",
        "request": {"uid": "u".repeat(64 * 1024)},
    })
    .to_string();
    let (code, body) = https(addr, &roots, "POST", "/inject", &long_uid)
        .await
        .unwrap();
    assert_eq!(code, 400, "{body}");
    assert!(body.contains("uid"), "{body}");
    let elapsed = started.elapsed().as_secs_f64();
    let reviewed: f64 = ["denied", "injected", "unchanged"]
        .iter()
        .map(|r| {
            metric(
                admin,
                &format!("meshid_injector_reviews_total{{result=\"{r}\"}}"),
            )
        })
        .sum();
    assert!(reviewed >= REVIEWS as f64, "{reviewed} reviews counted");
    assert_eq!(
        metric(
            admin,
            "meshid_injector_requests_refused_total{reason=\"uid_too_long\"}"
        ),
        1.0
    );
    let text = std::fs::read_to_string(&log).unwrap();
    let lines: Vec<&str> = text
        .lines()
        .filter(|l| l.contains("\"admission review\""))
        .collect();
    assert!(!lines.is_empty(), "{text}");
    assert!(
        (lines.len() as f64) <= 200.0 + 50.0 * elapsed + 1.0,
        "{} lines in {elapsed:.1} s",
        lines.len()
    );
    let longest = lines.iter().map(|l| l.len()).max().unwrap();
    assert!(longest < 2048, "a line of {longest} bytes");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pod_updates_are_validated_never_patched() {
    let webhook = webhook_with(|_| {}).await;
    let (addr, admin, roots) = (webhook.addr, webhook.admin, webhook.roots.clone());

    // The running pod: created through the webhook (CREATE injects, as before), then as the API
    // server stores it.
    let mut created = annotated_pod();
    created["metadata"]["annotations"]["meshid.io/allow-8080"] =
        json!("spiffe://cluster.local/ns/shop/sa/frontend");
    let response = answer(addr, &roots, "/inject", &review(&created)).await;
    assert_eq!(response["allowed"], true, "{response}");
    let ops: Vec<Value> = serde_json::from_slice(
        &base64::engine::general_purpose::STANDARD
            .decode(response["patch"].as_str().expect("CREATE is patched"))
            .unwrap(),
    )
    .unwrap();
    let mut running = created.clone();
    meshid_injector::apply_patch(&mut running, &ops).unwrap();
    running["metadata"]["name"] = json!("web-5k2xq");
    running["metadata"]["namespace"] = json!("shop");
    running["metadata"]["uid"] = json!("6b1f2b1e-2c43-4a4f-9d1e-5a8c2b7e9f10");
    running["metadata"]["resourceVersion"] = json!("48213");
    running["status"] = json!({"phase": "Running", "podIP": "10.244.1.17"});
    assert_eq!(
        running["spec"]["initContainers"][0]["name"],
        "meshid-sidecar"
    );
    let annotate = |key: &str, value: &str| {
        let mut pod = running.clone();
        pod["metadata"]["annotations"][key] = json!(value);
        pod["metadata"]["resourceVersion"] = json!("48250");
        pod
    };

    // kubectl annotate with a typo (a malformed SPIFFE ID) and a mode that does not exist: denied
    // by both entries, the message naming each annotation and its problem.
    let mut typo = annotate(
        "meshid.io/allow-8080",
        "spiffe://cluster.local/ns/shop/sa/front*end",
    );
    typo["metadata"]["annotations"]["meshid.io/mode"] = json!("permisive");
    for path in ["/inject", "/inject-namespace"] {
        let response = answer(addr, &roots, path, &update_review(&typo, &running)).await;
        assert_eq!(
            response["uid"], "0df28fbd-5f5f-4e5e-8d59-3e2a1c9e0b7a",
            "{path}"
        );
        assert_eq!(response["allowed"], false, "{path}: {response}");
        assert_eq!(response["status"]["code"], 400, "{path}");
        let message = response["status"]["message"].as_str().unwrap();
        for needle in [
            "meshid annotations refused",
            "annotation meshid.io/allow-8080",
            "annotation meshid.io/mode",
            "\"permisive\" is not enforce or audit",
        ] {
            assert!(
                message.contains(needle),
                "{path}: {needle:?} not in {message}"
            );
        }
        assert!(response.get("patch").is_none(), "{path}: {response}");
    }
    // An allow list for a port the pod does not declare: denied too.
    let undeclared = annotate(
        "meshid.io/allow-9000",
        "spiffe://cluster.local/ns/shop/sa/frontend",
    );
    let response = answer(
        addr,
        &roots,
        "/inject",
        &update_review(&undeclared, &running),
    )
    .await;
    assert_eq!(response["allowed"], false, "{response}");
    let message = response["status"]["message"].as_str().unwrap();
    assert!(
        message.contains("meshid.io/allow-9000") && message.contains("not declared"),
        "{message}"
    );

    // A valid change of the allow list: admitted as it is, no patch.
    let valid = annotate(
        "meshid.io/allow-8080",
        "spiffe://cluster.local/ns/shop/sa/frontend, spiffe://cluster.local/ns/ops/sa/*",
    );
    for path in ["/inject", "/inject-namespace"] {
        let response = answer(addr, &roots, path, &update_review(&valid, &running)).await;
        assert_eq!(response["allowed"], true, "{path}: {response}");
        assert!(response.get("patch").is_none(), "{path}: {response}");
        assert!(response.get("patchType").is_none(), "{path}: {response}");
    }

    // Updates that are not about meshid: a pod without sidecar or meshid annotations gets a label,
    // the injected pod gets an annotation of someone else's. Admitted untouched.
    let plain = json!({
        "apiVersion": "v1", "kind": "Pod",
        "metadata": {"name": "batch-7x9", "namespace": "shop", "resourceVersion": "311",
            "annotations": {"example.com/owner": "team-a"}},
        "spec": {"containers": [{"name": "app", "image": "batch:1"}]},
    });
    let mut relabelled = plain.clone();
    relabelled["metadata"]["labels"] = json!({"tier": "batch"});
    let other = annotate("example.com/owner", "team-b");
    for (pod, old) in [(&relabelled, &plain), (&other, &running)] {
        for path in ["/inject", "/inject-namespace"] {
            let response = answer(addr, &roots, path, &update_review(pod, old)).await;
            assert_eq!(response["allowed"], true, "{path}: {response}");
            assert!(response.get("patch").is_none(), "{path}: {response}");
        }
    }

    // CREATE is as before: bad annotations refuse the pod (by the injection's message).
    let mut bad = annotated_pod();
    bad["metadata"]["annotations"]["meshid.io/mode"] = json!("permisive");
    let response = answer(addr, &roots, "/inject", &review(&bad)).await;
    assert_eq!(response["allowed"], false, "{response}");
    let message = response["status"]["message"].as_str().unwrap();
    assert!(message.starts_with("meshid injection refused"), "{message}");

    // Counted: 3 UPDATE denials and the CREATE one; the admitted updates changed nothing.
    assert_eq!(
        metric(admin, "meshid_injector_reviews_total{result=\"denied\"}"),
        4.0
    );
    assert_eq!(
        metric(admin, "meshid_injector_reviews_total{result=\"unchanged\"}"),
        6.0
    );
    assert_eq!(
        metric(admin, "meshid_injector_reviews_total{result=\"injected\"}"),
        1.0
    );
}

#[test]
fn bad_flags_exit_64_naming_each() {
    let dir = tempfile::tempdir().unwrap();
    let missing = dir.path().join("missing");
    let out = Command::new(workspace_bin("meshid-injector"))
        .arg("--tls-cert")
        .arg(missing.join("c"))
        .arg("--tls-key")
        .arg(missing.join("k"))
        .arg("--trust-bundle")
        .arg(missing.join("b"))
        .args(["--listen", "nope", "--reload-interval", "0s"])
        .args(["--admin-listen", "localhost"])
        .args(["--sidecar-image", "x", "--ca-addr", "ca:1"])
        .args(["--token-expiration-seconds", "60"])
        .args([
            "--max-connections",
            "0",
            "--max-connections-per-source",
            "0",
        ])
        .args(["--header-read-timeout", "soon", "--request-timeout", "1ms"])
        .args([
            "--max-request-bytes",
            "4194304",
            "--max-connection-age",
            "0s",
        ])
        .args(["--review-memory", "65536", "--review-wait", "never"])
        .args(["--shutdown-grace", "0s", "--shutdown-delay", "soon"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(64), "{out:?}");
    let stderr = String::from_utf8_lossy(&out.stderr);
    for flag in [
        "--listen",
        "--admin-listen",
        "--token-expiration-seconds",
        "--reload-interval",
        "--max-connections:",
        "--max-connections-per-source:",
        "--header-read-timeout:",
        "--request-timeout: must be at least 100ms",
        "--max-request-bytes: must be between 1024 and 3145728",
        "--max-connection-age:",
        "--review-memory: must be between 4 x --max-request-bytes",
        "--review-wait:",
        "--shutdown-grace:",
        "--shutdown-delay:",
        "--tls-cert",
        "--tls-key",
        "--trust-bundle",
    ] {
        assert!(stderr.contains(flag), "{flag} missing from {stderr}");
    }
    // The CA directory is no longer an input.
    let out = injector(
        &missing.join("c"),
        &missing.join("k"),
        &missing.join("b"),
        "nope",
    )
    .arg("--ca-dir")
    .arg(&missing)
    .output()
    .unwrap();
    assert_eq!(out.status.code(), Some(64), "{out:?}");
}

#[cfg_attr(not(have_openssl), ignore = "openssl is not installed")]
#[test]
fn webhook_cert_passes_openssl_verify_with_the_dns_names() {
    let dir = tempfile::tempdir().unwrap();
    let ca_dir = init_ca(dir.path());
    let out_dir = dir.path().join("out");
    let out = webhook_cert(
        &ca_dir,
        &out_dir,
        &[
            "--dns",
            "meshid-injector.meshid.svc.cluster.local",
            "--ttl",
            "30d",
        ],
    );
    assert!(out.status.success(), "{out:?}");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(stdout.contains("tls.crt"), "{stdout}");
    for f in ["tls.crt", "tls.key"] {
        let mode = std::fs::metadata(out_dir.join(f))
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o600, "{f}");
    }
    let chain: Vec<CertificateDer<'static>> =
        CertificateDer::pem_file_iter(out_dir.join("tls.crt"))
            .unwrap()
            .map(Result::unwrap)
            .collect();
    assert_eq!(chain.len(), 2, "leaf + intermediate");
    let path = |n: &str| dir.path().join(n).to_str().unwrap().to_owned();
    std::fs::write(path("leaf.pem"), meshid_tests::pki::pem(&chain[0])).unwrap();
    std::fs::write(path("inter.pem"), meshid_tests::pki::pem(&chain[1])).unwrap();
    for host in [SAN, "meshid-injector.meshid.svc.cluster.local"] {
        let (ok, text) = run(Command::new("openssl").args([
            "verify",
            "-x509_strict",
            "-purpose",
            "sslserver",
            "-verify_hostname",
            host,
            "-CAfile",
            ca_dir.join("bundle.pem").to_str().unwrap(),
            "-untrusted",
            &path("inter.pem"),
            &path("leaf.pem"),
        ]));
        assert!(ok, "openssl verify for {host}: {text}");
    }
    let (ok, text) = run(Command::new("openssl").args([
        "verify",
        "-verify_hostname",
        "other.meshid.svc",
        "-CAfile",
        ca_dir.join("bundle.pem").to_str().unwrap(),
        "-untrusted",
        &path("inter.pem"),
        &path("leaf.pem"),
    ]));
    assert!(!ok, "a name that was not asked for: {text}");
    let (ok, text) = run(Command::new("openssl").args([
        "x509",
        "-noout",
        "-ext",
        "subjectAltName,extendedKeyUsage",
        "-enddate",
        "-in",
        &path("leaf.pem"),
    ]));
    assert!(ok, "{text}");
    assert!(text.contains(&format!("DNS:{SAN}")), "{text}");
    assert!(text.contains("TLS Web Server Authentication"), "{text}");
    // The key matches the leaf.
    let (ok, cert_pub) =
        run(Command::new("openssl").args(["x509", "-noout", "-pubkey", "-in", &path("leaf.pem")]));
    assert!(ok, "{cert_pub}");
    let (ok, key_pub) = run(Command::new("openssl").args([
        "pkey",
        "-pubout",
        "-in",
        out_dir.join("tls.key").to_str().unwrap(),
    ]));
    assert!(ok, "{key_pub}");
    assert_eq!(cert_pub, key_pub);
}

#[test]
fn webhook_cert_refuses_bad_input_and_existing_files() {
    let dir = tempfile::tempdir().unwrap();
    let ca_dir = init_ca(dir.path());
    let out_dir = dir.path().join("out");
    assert!(webhook_cert(&ca_dir, &out_dir, &[]).status.success());
    let first = std::fs::read(out_dir.join("tls.crt")).unwrap();
    let out = webhook_cert(&ca_dir, &out_dir, &[]);
    assert_eq!(out.status.code(), Some(64), "{out:?}");
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("--force"),
        "{out:?}"
    );
    assert_eq!(
        std::fs::read(out_dir.join("tls.crt")).unwrap(),
        first,
        "left alone"
    );
    let out = webhook_cert(&ca_dir, &out_dir, &["--force"]);
    assert!(out.status.success(), "{out:?}");
    assert_ne!(
        std::fs::read(out_dir.join("tls.crt")).unwrap(),
        first,
        "replaced"
    );

    let fresh = dir.path().join("fresh");
    for (args, needle) in [
        (vec!["--dns", "not a name"], "--dns"),
        (vec!["--dns", "10.0.0.1"], "--dns"),
        (vec!["--ttl", "soon"], "--ttl"),
    ] {
        let out = webhook_cert(&ca_dir, &fresh, &args);
        assert_eq!(out.status.code(), Some(64), "{args:?}: {out:?}");
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(stderr.contains(needle), "{args:?}: {stderr}");
    }
    let out = webhook_cert(&dir.path().join("nope"), &fresh, &[]);
    assert_eq!(out.status.code(), Some(64), "{out:?}");
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("--dir"),
        "{out:?}"
    );
    let out = Command::new(workspace_bin("meshid-ca"))
        .args(["webhook-cert", "--dir"])
        .arg(&ca_dir)
        .arg("--out-dir")
        .arg(&fresh)
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(64), "no --dns: {out:?}");
    assert!(!fresh.exists(), "nothing written on bad input");
}

#[test]
fn injector_refuses_a_mismatched_key_an_expired_certificate_or_a_wrong_name() {
    let dir = tempfile::tempdir().unwrap();
    let ca_dir = init_ca(dir.path());
    let (a, b) = (dir.path().join("a"), dir.path().join("b"));
    assert!(webhook_cert(&ca_dir, &a, &[]).status.success());
    assert!(webhook_cert(&ca_dir, &b, &[]).status.success());
    let bundle = ca_dir.join("bundle.pem");
    let out = injector(
        &a.join("tls.crt"),
        &b.join("tls.key"),
        &bundle,
        "127.0.0.1:0",
    )
    .output()
    .unwrap();
    assert_eq!(out.status.code(), Some(64), "{out:?}");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("does not belong"), "{stderr}");

    let key = rcgen::KeyPair::generate().unwrap();
    let mut params = rcgen::CertificateParams::new(vec![SAN.to_owned()]).unwrap();
    let now = time::OffsetDateTime::now_utc();
    params.not_before = now - time::Duration::days(30);
    params.not_after = now - time::Duration::days(1);
    let expired = params.self_signed(&key).unwrap();
    std::fs::write(dir.path().join("old.crt"), expired.pem()).unwrap();
    std::fs::write(dir.path().join("old.key"), key.serialize_pem()).unwrap();
    let out = injector(
        &dir.path().join("old.crt"),
        &dir.path().join("old.key"),
        &bundle,
        "127.0.0.1:0",
    )
    .output()
    .unwrap();
    assert_eq!(out.status.code(), Some(64), "{out:?}");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("expired"), "{stderr}");

    // A certificate for another name: the API server could not verify it.
    let other = dir.path().join("other");
    let out = Command::new(workspace_bin("meshid-ca"))
        .args(["webhook-cert", "--dir"])
        .arg(&ca_dir)
        .args(["--dns", "other.meshid.svc", "--out-dir"])
        .arg(&other)
        .output()
        .unwrap();
    assert!(out.status.success(), "{out:?}");
    let out = injector(
        &other.join("tls.crt"),
        &other.join("tls.key"),
        &bundle,
        "127.0.0.1:0",
    )
    .output()
    .unwrap();
    assert_eq!(out.status.code(), Some(64), "{out:?}");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains(&format!("not valid for {SAN}")), "{stderr}");

    // A bundle without a certificate is refused too.
    std::fs::write(dir.path().join("empty.pem"), "no roots here\n").unwrap();
    let out = injector(
        &a.join("tls.crt"),
        &a.join("tls.key"),
        &dir.path().join("empty.pem"),
        "127.0.0.1:0",
    )
    .output()
    .unwrap();
    assert_eq!(out.status.code(), Some(64), "{out:?}");
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("--trust-bundle"),
        "{out:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn injector_picks_up_a_replaced_certificate_and_bundle_without_restart() {
    let dir = tempfile::tempdir().unwrap();
    let ca_dir = init_ca(dir.path());
    let roots = roots_of(&ca_dir);
    let (first, second, third) = (
        dir.path().join("1"),
        dir.path().join("2"),
        dir.path().join("3"),
    );
    for d in [&first, &second, &third] {
        assert!(webhook_cert(&ca_dir, d, &[]).status.success());
    }
    // Mounted as Kubernetes mounts a Secret and a ConfigMap.
    let mut secret = SecretVolume::new(&dir.path().join("secret"), &pair_files(&first));
    let bundle_pem = std::fs::read(ca_dir.join("bundle.pem")).unwrap();
    let mut config_map = SecretVolume::new(
        &dir.path().join("bundle"),
        &[("bundle.pem", bundle_pem.clone())],
    );
    let addr = free_addr("127.0.0.1");
    let admin = free_addr("127.0.0.1");
    let mut proc = Proc::spawn(
        "meshid-injector",
        injector(
            &secret.path("tls.crt"),
            &secret.path("tls.key"),
            &config_map.path("bundle.pem"),
            &addr.to_string(),
        )
        .args(["--admin-listen", &admin.to_string()]),
    );
    wait_healthy(addr, &roots).await;
    const EXPIRY: &str = "meshid_injector_serving_certificate_expiry_timestamp_seconds";
    let reloads = |what: &str, result: &str| {
        metric(
            admin,
            &format!("meshid_injector_reloads_total{{what=\"{what}\",result=\"{result}\"}}"),
        )
    };
    assert_eq!(metric(admin, EXPIRY), not_after(&first.join("tls.crt")));
    assert_eq!(metric(admin, "meshid_injector_trust_bundle_roots"), 1.0);
    assert_eq!(http_get(admin, "/readyz").unwrap().0, 200);
    assert_eq!(http_get(admin, "/rotation").unwrap().0, 404);
    let leaf = |d: &Path| -> CertificateDer<'static> {
        CertificateDer::pem_file_iter(d.join("tls.crt"))
            .unwrap()
            .next()
            .unwrap()
            .unwrap()
    };
    assert_eq!(served_leaf(addr, &roots).await, leaf(&first));

    let eventually_serves = |want: CertificateDer<'static>| {
        let roots = roots.clone();
        async move {
            let deadline = std::time::Instant::now() + Duration::from_secs(10);
            while std::time::Instant::now() < deadline {
                if served_leaf(addr, &roots).await == want {
                    return true;
                }
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            false
        }
    };
    secret.update(&pair_files(&second));
    assert!(
        eventually_serves(leaf(&second)).await,
        "the replaced certificate is served"
    );
    assert_eq!(metric(admin, EXPIRY), not_after(&second.join("tls.crt")));
    assert_eq!(reloads("serving_certificate", "applied"), 1.0);

    // A broken pair (third's certificate, second's key) is rejected: the last good one stays.
    let mut broken = pair_files(&third);
    broken[1] = pair_files(&second)[1].clone();
    secret.update(&broken);
    tokio::time::sleep(Duration::from_millis(1000)).await;
    assert_eq!(
        served_leaf(addr, &roots).await,
        leaf(&second),
        "broken pair ignored"
    );
    assert!(proc.running());
    assert_eq!(reloads("serving_certificate", "rejected"), 1.0);
    assert_eq!(metric(admin, EXPIRY), not_after(&second.join("tls.crt")));
    // Fixed: applied.
    secret.update(&pair_files(&third));
    assert!(
        eventually_serves(leaf(&third)).await,
        "a fixed pair is applied"
    );
    wait_healthy(addr, &roots).await;

    // The bundle: a second root joins (as in `meshid-ca rotate prepare`); new pods get both.
    let foreign = meshid_tests::pki::pem(&meshid_tests::pki::ForeignCa::new().root_der);
    assert_eq!(
        injected_bundle(addr, &roots).await.trim(),
        String::from_utf8_lossy(&bundle_pem).trim()
    );
    let mut two = bundle_pem.clone();
    two.extend_from_slice(foreign.as_bytes());
    config_map.update(&[("bundle.pem", two)]);
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    loop {
        let injected = injected_bundle(addr, &roots).await;
        if injected.contains(foreign.trim()) {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "bundle not reloaded: {injected}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(metric(admin, "meshid_injector_trust_bundle_roots"), 2.0);
    // A broken bundle is ignored.
    config_map.update(&[("bundle.pem", b"garbage".to_vec())]);
    tokio::time::sleep(Duration::from_millis(1000)).await;
    assert!(injected_bundle(addr, &roots).await.contains(foreign.trim()));
    assert!(proc.running());
    assert_eq!(reloads("trust_bundle", "applied"), 1.0);
    assert_eq!(reloads("trust_bundle", "rejected"), 1.0);
    assert_eq!(metric(admin, "meshid_injector_trust_bundle_roots"), 2.0);
    // Every review above patched a pod (injected_bundle asks for one each time).
    assert!(metric(admin, "meshid_injector_reviews_total{result=\"injected\"}") >= 2.0);
    assert_eq!(
        metric(admin, "meshid_injector_reviews_total{result=\"denied\"}"),
        0.0
    );
}

/// A serving certificate from a rotator whose clock runs 8 s ahead of the node's: not valid yet
/// when it lands, so refused for the moment (counted once) while the old one keeps serving; tried
/// again at every poll and served as soon as it is valid.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn injector_applies_a_certificate_not_valid_yet_once_valid() {
    let dir = tempfile::tempdir().unwrap();
    let Served {
        ca_dir,
        roots,
        mut secret,
        addr,
        admin,
        _injector,
    } = serving_from_a_secret(dir.path()).await;
    let old = served_leaf(addr, &roots).await;

    // Issued by the CA's intermediate, valid from 8 s from now (7 s at least once cut to whole
    // seconds): room for a loaded machine to see it refused first.
    let now = time::OffsetDateTime::now_utc();
    let (early, files) = serving_pair(
        &ca_dir,
        now + time::Duration::seconds(8),
        now + time::Duration::hours(1),
    );
    let (_, parsed) = x509_parser::parse_x509_certificate(early.der()).unwrap();
    let valid_from = parsed.validity().not_before.timestamp();
    let unix_now = || time::OffsetDateTime::now_utc().unix_timestamp();
    secret.update(&files);

    let reloads = |result: &str| {
        metric(
            admin,
            &format!(
                "meshid_injector_reloads_total{{what=\"serving_certificate\",result=\"{result}\"}}"
            ),
        )
    };
    // Refused while not valid yet. Each look is checked only if the clock is still before
    // not-before once it is done: past it (a machine stalled for seconds), applying it at once is
    // right, and there is no refusal to see.
    // Served at once (an injector that took a certificate not valid yet) ends the wait too, and
    // then fails the checks below while the clock is still before not-before.
    while reloads("rejected") < 1.0
        && unix_now() < valid_from
        && served_leaf(addr, &roots).await == old
    {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let refused = reloads("rejected") >= 1.0;
    let served = served_leaf(addr, &roots).await;
    if unix_now() < valid_from {
        assert!(refused, "not refused before not-before");
        assert_eq!(served, old, "the old one serves");
    } else {
        eprintln!("not-before passed before the checks: the refusal is not checked");
    }
    // Served within 15 s of not-before, however late the test got there.
    while served_leaf(addr, &roots).await != *early.der() {
        assert!(unix_now() < valid_from + 15, "never applied");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(reloads("applied"), 1.0);
    assert_eq!(
        reloads("rejected"),
        if refused { 1.0 } else { 0.0 },
        "counted once, not at every poll"
    );
    assert_eq!(
        metric(
            admin,
            "meshid_injector_serving_certificate_expiry_timestamp_seconds"
        ),
        parsed.validity().not_after.timestamp() as f64
    );
}

/// Once its serving certificate has expired (the API server refuses the handshake), the injector
/// is not ready, and says why; before, it is.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn injector_is_not_ready_once_its_serving_certificate_expired() {
    let dir = tempfile::tempdir().unwrap();
    let Served {
        ca_dir,
        roots,
        mut secret,
        addr,
        admin,
        _injector,
    } = serving_from_a_secret(dir.path()).await;
    assert_eq!(http_get(admin, "/readyz").unwrap().0, 200);

    // A pair that lapses 8 s from now (7 s at least once cut to whole seconds).
    let now = time::OffsetDateTime::now_utc();
    let (brief, files) = serving_pair(
        &ca_dir,
        now - time::Duration::hours(1),
        now + time::Duration::seconds(8),
    );
    let (_, parsed) = x509_parser::parse_x509_certificate(brief.der()).unwrap();
    let expiry = parsed.validity().not_after.timestamp();
    let unix_now = || time::OffsetDateTime::now_utc().unix_timestamp();
    secret.update(&files);
    // Served while valid. An expired pair is refused, so one not served by its expiry (a machine
    // stalled for seconds) leaves nothing to check: the test gives up rather than fail.
    while served_leaf(addr, &roots).await != *brief.der() {
        if unix_now() >= expiry {
            // Only a stalled machine may excuse it: the injector then saw the pair, expired, and
            // refused it. Nothing seen at all is reloading broken.
            let refused = metric(
                admin,
                "meshid_injector_reloads_total{what=\"serving_certificate\",result=\"rejected\"}",
            );
            assert!(refused >= 1.0, "the pair was never served nor refused");
            eprintln!("the pair expired before it was served: nothing to check");
            return;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    // Ready while valid: checked only if the clock is still before expiry once /readyz answered.
    let (status, body) = http_get(admin, "/readyz").unwrap();
    if unix_now() < expiry {
        assert_eq!(status, 200, "ready while the pair is valid: {body}");
    } else {
        eprintln!("the pair expired before /readyz answered: its readiness is not checked");
    }
    // Not ready within 15 s of the expiry, however late the test got there.
    loop {
        let (status, body) = http_get(admin, "/readyz").unwrap();
        if status == 503 {
            assert!(body.contains("serving certificate expired"), "{body}");
            break;
        }
        assert!(unix_now() < expiry + 15, "still ready: {body}");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// An injector serving the pair `meshid-ca webhook-cert` issued, from a Secret volume laid out
/// as the kubelet does, with its admin port.
struct Served {
    ca_dir: PathBuf,
    roots: Vec<CertificateDer<'static>>,
    secret: SecretVolume,
    addr: SocketAddr,
    admin: SocketAddr,
    _injector: Proc,
}

async fn serving_from_a_secret(dir: &Path) -> Served {
    let ca_dir = init_ca(dir);
    let roots = roots_of(&ca_dir);
    let first = dir.join("1");
    assert!(webhook_cert(&ca_dir, &first, &[]).status.success());
    let secret = SecretVolume::new(&dir.join("secret"), &pair_files(&first));
    let (addr, admin) = (free_addr("127.0.0.1"), free_addr("127.0.0.1"));
    let injector = Proc::spawn(
        "meshid-injector",
        injector(
            &secret.path("tls.crt"),
            &secret.path("tls.key"),
            &ca_dir.join("bundle.pem"),
            &addr.to_string(),
        )
        .args(["--admin-listen", &admin.to_string()]),
    );
    wait_healthy(addr, &roots).await;
    Served {
        ca_dir,
        roots,
        secret,
        addr,
        admin,
        _injector: injector,
    }
}

/// A serving pair for [`SAN`] issued by the CA's intermediate for `not_before..not_after`, and
/// its Secret files (`tls.crt` with the intermediate, `tls.key`).
fn serving_pair(
    ca_dir: &Path,
    not_before: time::OffsetDateTime,
    not_after: time::OffsetDateTime,
) -> (rcgen::Certificate, [(&'static str, Vec<u8>); 2]) {
    let intermediate = std::fs::read_to_string(ca_dir.join("intermediate.pem")).unwrap();
    let signing = rcgen::KeyPair::from_pem(
        &std::fs::read_to_string(ca_dir.join("intermediate.key")).unwrap(),
    )
    .unwrap();
    let issuer = rcgen::Issuer::from_ca_cert_pem(&intermediate, signing).unwrap();
    let key = rcgen::KeyPair::generate().unwrap();
    let mut params = rcgen::CertificateParams::new(vec![SAN.to_owned()]).unwrap();
    params.extended_key_usages = vec![rcgen::ExtendedKeyUsagePurpose::ServerAuth];
    params.not_before = not_before;
    params.not_after = not_after;
    let cert = params.signed_by(&key, &issuer).unwrap();
    let files = [
        (
            "tls.crt",
            format!("{}{intermediate}", cert.pem()).into_bytes(),
        ),
        ("tls.key", key.serialize_pem().into_bytes()),
    ];
    (cert, files)
}

/// TLS to the injector from the source address `from` (any 127.0.0.0/8 address: each is a source of
/// its own for the per-source cap), offering `alpn`.
async fn tls_from(
    from: &str,
    addr: SocketAddr,
    roots: &[CertificateDer<'static>],
    alpn: &[&[u8]],
) -> std::io::Result<tokio_rustls::client::TlsStream<tokio::net::TcpStream>> {
    let tcp = tcp_from(from, addr).await?;
    let mut store = rustls::RootCertStore::empty();
    for r in roots {
        store.add(r.clone()).map_err(std::io::Error::other)?;
    }
    let mut config = rustls::ClientConfig::builder_with_provider(std::sync::Arc::new(
        rustls::crypto::aws_lc_rs::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .map_err(std::io::Error::other)?
    .with_root_certificates(store)
    .with_no_client_auth();
    config.alpn_protocols = alpn.iter().map(|p| p.to_vec()).collect();
    let name = rustls_pki_types::ServerName::try_from(SAN).map_err(std::io::Error::other)?;
    tokio_rustls::TlsConnector::from(std::sync::Arc::new(config))
        .connect(name, tcp)
        .await
}

async fn tcp_from(from: &str, addr: SocketAddr) -> std::io::Result<tokio::net::TcpStream> {
    let socket = tokio::net::TcpSocket::new_v4()?;
    socket.bind(SocketAddr::new(from.parse().unwrap(), 0))?;
    socket.connect(addr).await
}

/// Writes `request` over TLS from `from` and reads the answer until the server closes (at most
/// 10 s): the raw HTTP/1.1 response.
async fn raw_exchange(
    from: &str,
    addr: SocketAddr,
    roots: &[CertificateDer<'static>],
    request: &[u8],
) -> String {
    let mut tls = tls_from(from, addr, roots, &[b"http/1.1"]).await.unwrap();
    tls.write_all(request).await.unwrap();
    let mut out = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(10), tls.read_to_end(&mut out)).await;
    String::from_utf8_lossy(&out).into_owned()
}

/// A pod CREATE answered within 10 s over HTTP/1.1 (from 127.0.0.1) or HTTP/2 (the API server's
/// choice when ALPN offers it): the answer injects the pod.
async fn answered_in_time(addr: SocketAddr, roots: &[CertificateDer<'static>], h2: bool) {
    let body = review(&annotated_pod());
    let exchange = async {
        if !h2 {
            return https(addr, roots, "POST", "/inject", &body)
                .await
                .map_err(|e| e.to_string());
        }
        let tls = tls_from("127.0.0.1", addr, roots, &[b"h2"])
            .await
            .map_err(|e| e.to_string())?;
        assert_eq!(tls.get_ref().1.alpn_protocol(), Some(&b"h2"[..]));
        let (mut sender, conn) = hyper::client::conn::http2::handshake(
            hyper_util::rt::TokioExecutor::new(),
            hyper_util::rt::TokioIo::new(tls),
        )
        .await
        .map_err(|e| e.to_string())?;
        tokio::spawn(conn);
        let request = http::Request::post(format!("https://{SAN}/inject"))
            .header("content-type", "application/json")
            .body(http_body_util::Full::new(bytes::Bytes::from(body.clone())))
            .unwrap();
        let response = sender
            .send_request(request)
            .await
            .map_err(|e| e.to_string())?;
        let code = response.status().as_u16();
        let body = http_body_util::BodyExt::collect(response.into_body())
            .await
            .map_err(|e| e.to_string())?
            .to_bytes();
        Ok((code, String::from_utf8_lossy(&body).into_owned()))
    };
    let (code, body) = tokio::time::timeout(Duration::from_secs(10), exchange)
        .await
        .unwrap_or_else(|_| panic!("no answer within 10 s (h2: {h2})"))
        .unwrap_or_else(|e| panic!("review failed (h2: {h2}): {e}"));
    assert_eq!(code, 200, "{body}");
    let answer: Value = serde_json::from_str(&body).unwrap();
    assert_eq!(answer["response"]["uid"], "abc");
    assert_eq!(answer["response"]["allowed"], true, "{answer}");
    assert!(answer["response"]["patch"].is_string(), "{answer}");
}

/// Dribbles an HTTP/1.1 request head from `from`, a byte every 1.5 s, reconnecting whenever the
/// injector drops the connection, until `until`.
async fn slowloris(
    from: &'static str,
    addr: SocketAddr,
    roots: Vec<CertificateDer<'static>>,
    until: std::time::Instant,
) {
    while std::time::Instant::now() < until {
        let Ok(mut tls) = tls_from(from, addr, &roots, &[b"http/1.1"]).await else {
            tokio::time::sleep(Duration::from_millis(200)).await;
            continue;
        };
        let head = b"POST /inject HTTP/1.1\r\nHost: meshid-injector.meshid.svc\r\nX-Slow: ";
        for byte in head.iter().chain(std::iter::repeat(&b'a')) {
            if std::time::Instant::now() >= until
                || tls.write_all(&[*byte]).await.is_err()
                || tls.flush().await.is_err()
            {
                break;
            }
            tokio::time::sleep(Duration::from_millis(1500)).await;
        }
    }
}

/// Opens TCP connections from `from` and sends nothing, reopening each one the injector closes,
/// until `until`.
async fn silent(from: &'static str, addr: SocketAddr, until: std::time::Instant) {
    while std::time::Instant::now() < until {
        match tcp_from(from, addr).await {
            Ok(mut tcp) => {
                let mut buf = [0u8; 64];
                let left = until.saturating_duration_since(std::time::Instant::now());
                let _ = tokio::time::timeout(left, tcp.read(&mut buf)).await;
            }
            Err(_) => tokio::time::sleep(Duration::from_millis(200)).await,
        }
    }
}

/// Hostile clients over real sockets against the real binary, while pod CREATEs (over HTTP/1.1 and
/// HTTP/2) keep being answered within 10 s: slow request heads (slowloris, from one source past its
/// connection cap), silent connections past the per-source cap, bodies over the size cap (with a
/// Content-Length: 413 at once naming the limit; chunked: cut off at the limit), a body that stops
/// arriving (408 after the request timeout), a body nested far
/// deeper than serde_json's recursion limit (400, not a crash), and then enough connections from
/// several sources to pass the overall cap. Every refusal is counted on the admin port, the open
/// connections drain, and the injector still serves afterwards.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn hostile_clients_cannot_hold_up_admission_reviews() {
    let webhook = webhook_with(|c| {
        c.args([
            "--max-connections",
            "48",
            "--max-connections-per-source",
            "16",
        ])
        .args(["--header-read-timeout", "2s", "--request-timeout", "3s"]);
    })
    .await;
    let (addr, admin, roots) = (webhook.addr, webhook.admin, webhook.roots.clone());
    let refused = |reason: &str| {
        metric(
            admin,
            &format!("meshid_injector_connections_refused_total{{reason=\"{reason}\"}}"),
        )
    };
    let rejected = |reason: &str| {
        metric(
            admin,
            &format!("meshid_injector_requests_refused_total{{reason=\"{reason}\"}}"),
        )
    };

    // Phase 1: slowloris from 127.0.0.2 (24 clients, 16 allowed at once), silent connections from
    // 127.0.0.4 (24, 16 allowed), for 8 s.
    let until = std::time::Instant::now() + Duration::from_secs(8);
    let mut hostile = Vec::new();
    for _ in 0..24 {
        hostile.push(tokio::spawn(slowloris(
            "127.0.0.2",
            addr,
            roots.clone(),
            until,
        )));
        hostile.push(tokio::spawn(silent("127.0.0.4", addr, until)));
    }
    tokio::time::sleep(Duration::from_millis(1500)).await;
    answered_in_time(addr, &roots, false).await;
    answered_in_time(addr, &roots, true).await;

    // Over the size cap with a Content-Length: answered 413 at once, the limit named.
    let declared = raw_exchange(
        "127.0.0.3",
        addr,
        &roots,
        format!(
            "POST /inject HTTP/1.1\r\nHost: {SAN}\r\nContent-Type: application/json\r\n\
             Content-Length: {}\r\n\r\n{{",
            64 * 1024 * 1024
        )
        .as_bytes(),
    )
    .await;
    assert!(declared.starts_with("HTTP/1.1 413"), "{declared}");
    assert!(declared.contains("1048576-byte limit"), "{declared}");
    // Over the cap without a length (chunked, 8 MiB): refused once the cap is reached; the
    // injector stops reading (the writer fails or the answer is a 413, never a review).
    let mut chunked = tls_from("127.0.0.3", addr, &roots, &[b"http/1.1"])
        .await
        .unwrap();
    chunked
        .write_all(
            format!(
                "POST /inject HTTP/1.1\r\nHost: {SAN}\r\nContent-Type: application/json\r\n\
                 Transfer-Encoding: chunked\r\n\r\n"
            )
            .as_bytes(),
        )
        .await
        .unwrap();
    let (mut reader, mut writer) = tokio::io::split(chunked);
    let sender = tokio::spawn(async move {
        let chunk = format!("10000\r\n{}\r\n", "[".repeat(0x10000));
        for _ in 0..128 {
            if writer.write_all(chunk.as_bytes()).await.is_err() {
                return false;
            }
        }
        writer.write_all(b"0\r\n\r\n").await.is_ok()
    });
    let mut out = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(10), reader.read_to_end(&mut out)).await;
    let text = String::from_utf8_lossy(&out);
    assert!(
        text.is_empty() || text.starts_with("HTTP/1.1 413"),
        "{text}"
    );
    sender.abort();
    // A body that stops arriving: 408 once the request timeout (3 s) has passed.
    let stalled = raw_exchange(
        "127.0.0.3",
        addr,
        &roots,
        format!(
            "POST /inject HTTP/1.1\r\nHost: {SAN}\r\nContent-Type: application/json\r\n\
             Content-Length: 1000\r\n\r\n{{\"request\":"
        )
        .as_bytes(),
    )
    .await;
    assert!(stalled.starts_with("HTTP/1.1 408"), "{stalled}");
    assert!(stalled.contains("not received within 3s"), "{stalled}");
    // Nested far deeper than serde_json's limit (200 KB, under the size cap): 400, named.
    let depth = 100_000;
    let deep = format!(
        r#"{{"apiVersion":"admission.k8s.io/v1","kind":"AdmissionReview","request":{{"uid":"deep","object":{}{}}}}}"#,
        "[".repeat(depth),
        "]".repeat(depth)
    );
    let answer = raw_exchange(
        "127.0.0.3",
        addr,
        &roots,
        format!(
            "POST /inject HTTP/1.1\r\nHost: {SAN}\r\nContent-Type: application/json\r\n\
             Content-Length: {}\r\nConnection: close\r\n\r\n{deep}",
            deep.len()
        )
        .as_bytes(),
    )
    .await;
    assert!(answer.starts_with("HTTP/1.1 400"), "{answer}");
    assert!(answer.contains("deeper than 128 levels"), "{answer}");
    // Still answered in time while the slow and silent clients keep coming back.
    answered_in_time(addr, &roots, true).await;
    answered_in_time(addr, &roots, false).await;
    for task in hostile {
        task.await.unwrap();
    }
    assert!(refused("max_connections_per_source") >= 8.0);
    assert!(rejected("too_large") >= 2.0);
    assert_eq!(rejected("too_deep"), 1.0);
    assert_eq!(rejected("timeout"), 1.0);
    assert!(
        metric(
            admin,
            "meshid_injector_reviews_total{result=\"bad_request\"}"
        ) >= 4.0
    );
    // The slow and silent connections are all closed by the header-read timeout.
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while metric(admin, "meshid_injector_connections_open") > 0.0 {
        assert!(
            std::time::Instant::now() < deadline,
            "connections still open after the hostile clients left"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }

    // Phase 2: 64 silent connections from four sources (16 each, within the per-source cap) pass
    // the overall cap of 48: each one past it displaces the oldest silent connection of the
    // busiest source, and reviews are still answered in time while they are held.
    let mut held = Vec::new();
    for from in ["127.0.0.6", "127.0.0.7", "127.0.0.8", "127.0.0.9"] {
        for _ in 0..16 {
            held.push(tcp_from(from, addr).await.unwrap());
        }
    }
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while refused("displaced") < 16.0 {
        assert!(
            std::time::Instant::now() < deadline,
            "no silent connection displaced past the overall cap"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    answered_in_time(addr, &roots, false).await;
    answered_in_time(addr, &roots, true).await;
    assert_eq!(
        refused("max_connections"),
        0.0,
        "a newcomer was refused while silent connections held the slots"
    );
    drop(held);
    // Still serving once they are gone.
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while https(addr, &roots, "GET", "/healthz", "")
        .await
        .ok()
        .map(|r| r.0)
        != Some(200)
    {
        assert!(
            std::time::Instant::now() < deadline,
            "not serving after the flood"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    answered_in_time(addr, &roots, false).await;
    answered_in_time(addr, &roots, true).await;
}

/// `GET /healthz`: what a health checker sends.
fn health_check() -> String {
    format!("GET /healthz HTTP/1.1\r\nHost: {SAN}\r\n\r\n")
}

/// A review a pod wrote itself, well-formed and answered (an AdmissionReview of something other
/// than a pod: allowed as it is), as any pod that reaches the port can send.
fn forged_review() -> String {
    let body =
        r#"{"apiVersion":"admission.k8s.io/v1","kind":"AdmissionReview","request":{"uid":"x"}}"#;
    format!(
        "POST /inject HTTP/1.1\r\nHost: {SAN}\r\nContent-Type: application/json\r\n\
         Content-Length: {}\r\n\r\n{body}",
        body.len()
    )
}

/// Sends `request` on one keep-alive HTTP/1.1 connection from `from` every second (within the
/// header-read timeout) until `until`, reconnecting whenever the injector closes it; counts the
/// answers with status `status`.
async fn hold_with(
    from: &'static str,
    addr: SocketAddr,
    roots: Vec<CertificateDer<'static>>,
    until: std::time::Instant,
    answered: std::sync::Arc<std::sync::atomic::AtomicUsize>,
    request: String,
    status: u16,
) {
    'connect: while std::time::Instant::now() < until {
        let Ok(mut tls) = tls_from(from, addr, &roots, &[b"http/1.1"]).await else {
            tokio::time::sleep(Duration::from_millis(200)).await;
            continue;
        };
        while std::time::Instant::now() < until {
            if tls.write_all(request.as_bytes()).await.is_err() {
                continue 'connect;
            }
            // The head, then a body of its Content-Length.
            let mut got = Vec::new();
            let complete = |got: &[u8]| -> Option<u16> {
                let end = got.windows(4).position(|w| w == b"\r\n\r\n")? + 4;
                let head = std::str::from_utf8(&got[..end]).ok()?;
                let code = head.get(9..12)?.parse().ok()?;
                let length: usize = head
                    .lines()
                    .find_map(|l| {
                        let (name, value) = l.split_once(':')?;
                        name.eq_ignore_ascii_case("content-length")
                            .then(|| value.trim().parse().ok())?
                    })
                    .unwrap_or(0);
                (got.len() >= end + length).then_some(code)
            };
            let code = loop {
                if let Some(code) = complete(&got) {
                    break code;
                }
                let mut buf = [0u8; 4096];
                match tokio::time::timeout(Duration::from_secs(2), tls.read(&mut buf)).await {
                    Ok(Ok(n)) if n > 0 => got.extend_from_slice(&buf[..n]),
                    _ => continue 'connect,
                }
            };
            if code != status {
                continue 'connect;
            }
            answered.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            tokio::time::sleep(Duration::from_secs(1)).await;
        }
    }
}

/// From two sources, as many connections as the overall cap (32, 16 per source), each sending
/// `request` every second: once every slot is held by a connection with two answers, a review
/// from the API server (HTTP/1.1 and h2) is still answered in time, by displacing one of them,
/// and no newcomer is refused at accept.
async fn holders_cannot_keep_reviews_out(request: String, holders_are: &str) {
    let webhook = webhook_with(|c| {
        c.args([
            "--max-connections",
            "32",
            "--max-connections-per-source",
            "16",
        ])
        .args(["--header-read-timeout", "3s"]);
    })
    .await;
    let (addr, admin, roots) = (webhook.addr, webhook.admin, webhook.roots.clone());
    let refused = |reason: &str| {
        metric(
            admin,
            &format!("meshid_injector_connections_refused_total{{reason=\"{reason}\"}}"),
        )
    };

    let until = std::time::Instant::now() + Duration::from_secs(12);
    let answered = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let mut holders = Vec::new();
    for from in ["127.0.0.6", "127.0.0.7"] {
        for _ in 0..16 {
            holders.push(tokio::spawn(hold_with(
                from,
                addr,
                roots.clone(),
                until,
                answered.clone(),
                request.clone(),
                200,
            )));
        }
    }
    // Every slot taken by a connection that has had its request answered, twice.
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while metric(admin, "meshid_injector_connections_open") < 32.0
        || answered.load(std::sync::atomic::Ordering::Relaxed) < 64
    {
        assert!(
            std::time::Instant::now() < deadline,
            "the {holders_are} did not fill the slots"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    answered_in_time(addr, &roots, false).await;
    answered_in_time(addr, &roots, true).await;
    assert!(
        refused("displaced") >= 1.0,
        "none of the {holders_are} displaced"
    );
    assert_eq!(
        refused("max_connections"),
        0.0,
        "a newcomer was refused while {holders_are} held the slots"
    );
    for task in holders {
        task.await.unwrap();
    }
}

/// Connections kept open with health checks are not real clients and cannot keep a review out.
/// Only a well-formed AdmissionReview answered proves a connection (before, any request did: at
/// the cap every newcomer, the API server's included, was closed at accept), so at the cap the
/// API server's connection displaces one of them.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn connections_held_with_health_checks_cannot_keep_reviews_out() {
    holders_cannot_keep_reviews_out(health_check(), "health checkers").await;
}

/// Nor can connections kept open with reviews a pod wrote itself: the webhook cannot tell them
/// from the API server's, and an answered review proves a connection (never displaced at the
/// cap), so before, a few pods proved every slot and every newcomer, the API server's
/// reconnections included, was refused at accept. One address proves at most eight connections
/// now (`meshid_injector::proof`): the two sources' 32 connections leave 16 slots displaceable,
/// and the API server's connections take their places.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn connections_held_with_forged_reviews_cannot_keep_reviews_out() {
    holders_cannot_keep_reviews_out(forged_review(), "review forgers").await;
}

/// Bodies are charged on their declared length before they arrive, but one source holds at most
/// its share of the body memory (an eighth of it, at least one largest body): one client
/// declaring 1 MiB bodies on 16 connections and sending them a byte a second (before, twelve of
/// them held the whole 12 MiB body budget for the request timeout) cannot make another source's
/// review wait for room; its own requests past its share are answered 503 after `--review-wait`,
/// naming the share.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn slow_large_bodies_from_one_source_cannot_take_the_body_memory() {
    let webhook = webhook_with(|c| {
        // The chart's review memory (48 MiB: 12 MiB for bodies) and body cap (1 MiB).
        c.args(["--request-timeout", "8s", "--review-wait", "2s"]);
    })
    .await;
    let (addr, admin, roots) = (webhook.addr, webhook.admin, webhook.roots.clone());

    let until = std::time::Instant::now() + Duration::from_secs(10);
    let mut slow = Vec::new();
    for _ in 0..16 {
        let roots = roots.clone();
        slow.push(tokio::spawn(async move {
            let tls = tls_from("127.0.0.5", addr, &roots, &[b"http/1.1"])
                .await
                .unwrap();
            let (mut reader, mut writer) = tokio::io::split(tls);
            let head = format!(
                "POST /inject HTTP/1.1\r\nHost: {SAN}\r\nContent-Type: application/json\r\n\
                 Content-Length: {}\r\n\r\n{{",
                1024 * 1024
            );
            writer.write_all(head.as_bytes()).await.unwrap();
            let trickle = tokio::spawn(async move {
                while std::time::Instant::now() < until {
                    tokio::time::sleep(Duration::from_secs(1)).await;
                    if writer.write_all(b" ").await.is_err() {
                        break;
                    }
                }
            });
            let mut out = Vec::new();
            let left = until.saturating_duration_since(std::time::Instant::now());
            let _ = tokio::time::timeout(left, reader.read_to_end(&mut out)).await;
            trickle.abort();
            String::from_utf8_lossy(&out).into_owned()
        }));
    }
    tokio::time::sleep(Duration::from_millis(1000)).await;
    // Another source's reviews get room at once, over HTTP/1.1 and HTTP/2.
    let start = std::time::Instant::now();
    answered_in_time(addr, &roots, false).await;
    answered_in_time(addr, &roots, true).await;
    assert!(
        start.elapsed() < Duration::from_secs(2),
        "the reviews waited for room: {:?}",
        start.elapsed()
    );
    let mut refused_by_share = 0;
    for task in slow {
        let answer = task.await.unwrap();
        if answer.starts_with("HTTP/1.1 503") {
            assert!(
                answer.contains("held its share of the body memory (1572864 bytes)"),
                "{answer}"
            );
            refused_by_share += 1;
        } else {
            // The one body within the share: cut off when the request timeout passes.
            assert!(
                answer.is_empty() || answer.starts_with("HTTP/1.1 408"),
                "{answer}"
            );
        }
    }
    assert!(refused_by_share >= 14, "{refused_by_share} refused");
    assert!(
        metric(
            admin,
            "meshid_injector_requests_refused_total{reason=\"source_busy\"}"
        ) >= 14.0
    );
}

/// The injector's peak resident memory (`VmHWM` of `pid`), in MiB.
fn peak_mib(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let kib: u64 = status
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .expect("VmHWM");
    kib / 1024
}

/// A pod CREATE whose `object` is `n` copies of `item` in an array: a body the API server never
/// sends, built to make the parser allocate as much as it can per byte.
fn amplifying_review(item: &str, bytes: usize) -> String {
    let head = r#"{"apiVersion":"admission.k8s.io/v1","kind":"AdmissionReview","request":{"uid":"big","kind":{"kind":"Pod"},"resource":{"resource":"pods"},"operation":"CREATE","object":["#;
    let n = (bytes - head.len() - 4) / (item.len() + 1);
    let mut body = String::with_capacity(bytes);
    body.push_str(head);
    for i in 0..n {
        if i > 0 {
            body.push(',');
        }
        body.push_str(item);
    }
    body.push_str("]}}");
    body
}

/// Many large bodies at once, of the shapes that make a JSON tree largest per byte (1 MiB of `0,`
/// parses into 25 MiB; 1 MiB of `{"a":0},` into 85 MiB), sent in parallel from several sources over
/// HTTP/1.1 and HTTP/2 against the injector with the chart's defaults: its memory stays within its
/// review budget (48 MiB) plus its connections' buffers, far under the chart's 128 MiB limit
/// (without the budget, 60 such bodies took it past 120 MiB). Each request is answered: reviewed
/// (200), refused at once when it could never fit (413, the budget named), or refused after
/// waiting `--review-wait` for room (503, "busy"); and a real pod's review is answered in time
/// meanwhile.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn parallel_large_bodies_stay_within_the_review_memory_budget() {
    let webhook = webhook_with(|c| {
        // As the chart runs it (glibc gives large blocks back to the kernel when freed).
        c.env("MALLOC_MMAP_THRESHOLD_", "131072");
    })
    .await;
    let (addr, admin, roots) = (webhook.addr, webhook.admin, webhook.roots.clone());
    let before = peak_mib(webhook.injector.pid());

    let zeros = std::sync::Arc::new(amplifying_review("0", 1_000_000));
    let objects = std::sync::Arc::new(amplifying_review(r#"{"a":0}"#, 1_000_000));
    // Alone, a body that could never fit is refused at once, by name.
    let post = |body: &str| {
        format!(
            "POST /inject HTTP/1.1\r\nHost: {SAN}\r\nContent-Type: application/json\r\n\
             Content-Length: {}\r\nConnection: close\r\n\r\n{body}",
            body.len()
        )
    };
    let answer = raw_exchange("127.0.0.2", addr, &roots, post(&objects).as_bytes()).await;
    assert!(answer.starts_with("HTTP/1.1 413"), "{answer:.300}");
    assert!(answer.contains("review budget"), "{answer:.300}");
    let mut tasks = Vec::new();
    for i in 0..96 {
        let from = ["127.0.0.2", "127.0.0.3", "127.0.0.4", "127.0.0.5"][i % 4];
        let body = if i % 8 == 7 { &objects } else { &zeros }.clone();
        let roots = roots.clone();
        let request = post(&body);
        tasks.push(tokio::spawn(async move {
            raw_exchange(from, addr, &roots, request.as_bytes()).await
        }));
    }
    // And HTTP/2: 32 streams on one connection.
    let h2 = {
        let tls = tls_from("127.0.0.6", addr, &roots, &[b"h2"]).await.unwrap();
        let (sender, conn) = hyper::client::conn::http2::handshake(
            hyper_util::rt::TokioExecutor::new(),
            hyper_util::rt::TokioIo::new(tls),
        )
        .await
        .unwrap();
        tokio::spawn(conn);
        (0..32)
            .map(|_| {
                let mut sender = sender.clone();
                let body = zeros.clone();
                tokio::spawn(async move {
                    let request = http::Request::post(format!("https://{SAN}/inject"))
                        .header("content-type", "application/json")
                        .body(http_body_util::Full::new(bytes::Bytes::from(
                            body.as_bytes().to_vec(),
                        )))
                        .unwrap();
                    let response = sender.send_request(request).await.unwrap();
                    let code = response.status().as_u16();
                    let body = http_body_util::BodyExt::collect(response.into_body())
                        .await
                        .unwrap()
                        .to_bytes();
                    (code, String::from_utf8_lossy(&body).into_owned())
                })
            })
            .collect::<Vec<_>>()
    };
    tokio::time::sleep(Duration::from_millis(500)).await;
    answered_in_time(addr, &roots, false).await;
    answered_in_time(addr, &roots, true).await;

    let mut codes = std::collections::BTreeMap::<u16, usize>::new();
    for task in tasks {
        let answer = task.await.unwrap();
        let code: u16 = answer
            .split_whitespace()
            .nth(1)
            .and_then(|c| c.parse().ok())
            .unwrap_or_else(|| panic!("no answer: {answer:.200}"));
        match code {
            200 => assert!(answer.contains(r#""uid":"big""#), "{answer:.300}"),
            413 => assert!(answer.contains("review budget"), "{answer:.300}"),
            503 => assert!(answer.contains("injector is busy"), "{answer:.300}"),
            other => panic!("answered {other}: {answer:.300}"),
        }
        *codes.entry(code).or_default() += 1;
    }
    for task in h2 {
        let (code, body) = task.await.unwrap();
        assert!(matches!(code, 200 | 503), "{code}: {body:.300}");
        *codes.entry(code).or_default() += 1;
    }
    let peak = peak_mib(webhook.injector.pid());
    eprintln!("answers by status: {codes:?}; peak memory {peak} MiB (at rest {before} MiB)");
    assert!(codes.get(&200).copied().unwrap_or(0) >= 1, "{codes:?}");
    assert!(codes.get(&503).copied().unwrap_or(0) >= 1, "{codes:?}");
    assert!(
        peak < 100,
        "peak {peak} MiB: over the review budget and the connections' buffers"
    );
    let rejected = |reason: &str| {
        metric(
            admin,
            &format!("meshid_injector_requests_refused_total{{reason=\"{reason}\"}}"),
        )
    };
    assert!(rejected("too_costly") >= 1.0);
    assert!(rejected("busy") >= 1.0);
    // Still serving.
    answered_in_time(addr, &roots, false).await;
}

/// A second SIGTERM while the injector waits out its shutdown delay (or drains) ends it at once,
/// exit status 1: not ignored until the delay and the grace have passed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_second_sigterm_ends_the_shutdown_at_once() {
    let mut w = webhook_with(|cmd| {
        cmd.args(["--shutdown-delay", "30s"]);
    })
    .await;
    w.injector.signal("TERM");
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert!(w.injector.running(), "still in its shutdown delay");
    w.injector.signal("TERM");
    let status = w
        .injector
        .wait_timeout(Duration::from_secs(5))
        .expect("a second SIGTERM ends it at once");
    assert_eq!(status.code(), Some(1), "{status:?}");
}

/// For `--shutdown-delay` after SIGTERM the injector is not ready (`/readyz` 503: the Service stops
/// sending to it) but goes on accepting and answering reviews, which the API server still sends
/// to a terminating pod for a moment (a refused connection fails a pod's creation under
/// `failurePolicy: Fail`); then it drains and exits.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_keeps_answering_new_reviews_for_the_shutdown_delay_while_not_ready() {
    let mut w = webhook_with(|cmd| {
        cmd.args(["--shutdown-delay", "3s", "--shutdown-grace", "2s"]);
    })
    .await;
    assert_eq!(http_get(w.admin, "/readyz").unwrap().0, 200);
    let signalled = std::time::Instant::now();
    w.injector.signal("TERM");
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(
        http_get(w.admin, "/readyz").unwrap().0,
        503,
        "not ready once signalled"
    );
    // A review on a new connection is still answered.
    let (status, body) = https(
        w.addr,
        &w.roots,
        "POST",
        "/inject",
        &review(&annotated_pod()),
    )
    .await
    .expect("a new connection during the delay is accepted");
    assert_eq!(status, 200, "{body}");
    assert!(body.contains(r#""patch":"#), "{body}");
    assert!(
        signalled.elapsed() < Duration::from_secs(3),
        "the review came within the delay: {:?}",
        signalled.elapsed()
    );
    // After the delay: no new connections, and it exits.
    tokio::time::sleep(
        Duration::from_secs(3).saturating_sub(signalled.elapsed()) + Duration::from_millis(500),
    )
    .await;
    assert!(
        tcp_from("127.0.0.1", w.addr).await.is_err(),
        "accepted a connection after the delay"
    );
    let status = w
        .injector
        .wait_timeout(Duration::from_secs(5))
        .expect("exited after the delay");
    assert!(status.success(), "{status:?}");
}

/// A rollout sends the old injector SIGTERM while the API server waits on it (with
/// `failurePolicy: Fail` a review lost then is a pod that is not created): the injector stops
/// accepting connections, answers the reviews in flight (here one whose body is still arriving,
/// over HTTP/1.1, and one on HTTP/2), and then exits 0, within `--shutdown-grace`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_answers_the_reviews_in_flight_before_exiting() {
    use tokio_stream::StreamExt as _;
    let dir = tempfile::tempdir().unwrap();
    let ca_dir = init_ca(dir.path());
    let roots = roots_of(&ca_dir);
    let tls = dir.path().join("tls");
    assert!(webhook_cert(&ca_dir, &tls, &[]).status.success());
    let addr = free_addr("127.0.0.1");
    let mut injector = Proc::spawn(
        "meshid-injector",
        injector(
            &tls.join("tls.crt"),
            &tls.join("tls.key"),
            &ca_dir.join("bundle.pem"),
            &addr.to_string(),
        )
        .args(["--shutdown-grace", "5s", "--shutdown-delay", "0s"]),
    );
    wait_healthy(addr, &roots).await;

    // A slow client: the head and half the body now, the rest after the signal.
    let body = review(&annotated_pod());
    let (first, rest) = body.split_at(body.len() / 2);
    let mut slow = tls_from("127.0.0.1", addr, &roots, &[b"http/1.1"])
        .await
        .unwrap();
    slow.write_all(
        format!(
            "POST /inject HTTP/1.1\r\nHost: {SAN}\r\nContent-Type: application/json\r\n\
             Content-Length: {}\r\n\r\n{first}",
            body.len()
        )
        .as_bytes(),
    )
    .await
    .unwrap();
    slow.flush().await.unwrap();
    // An HTTP/2 connection with a stream whose body is still arriving.
    let h2 = tls_from("127.0.0.1", addr, &roots, &[b"h2"]).await.unwrap();
    let (mut sender, conn) = hyper::client::conn::http2::handshake(
        hyper_util::rt::TokioExecutor::new(),
        hyper_util::rt::TokioIo::new(h2),
    )
    .await
    .unwrap();
    tokio::spawn(conn);
    let (h2_body, h2_rx) = tokio::sync::mpsc::channel::<bytes::Bytes>(4);
    let h2_request = http::Request::post(format!("https://{SAN}/inject"))
        .header("content-type", "application/json")
        .body(http_body_util::StreamBody::new(
            tokio_stream::wrappers::ReceiverStream::new(h2_rx)
                .map(|b| Ok::<_, std::convert::Infallible>(hyper::body::Frame::data(b))),
        ))
        .unwrap();
    let h2_answer = tokio::spawn(async move { sender.send_request(h2_request).await });
    h2_body
        .send(bytes::Bytes::copy_from_slice(first.as_bytes()))
        .await
        .unwrap();
    tokio::time::sleep(Duration::from_millis(300)).await;

    let signalled = std::time::Instant::now();
    injector.signal("TERM");
    tokio::time::sleep(Duration::from_millis(500)).await;
    // No new connections once it is draining.
    assert!(
        tcp_from("127.0.0.1", addr).await.is_err(),
        "accepted a connection after SIGTERM"
    );
    assert!(injector.running(), "exited with reviews in flight");

    slow.write_all(rest.as_bytes()).await.unwrap();
    let mut out = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(5), slow.read_to_end(&mut out)).await;
    let text = String::from_utf8_lossy(&out);
    assert!(text.starts_with("HTTP/1.1 200"), "{text}");
    assert!(text.contains(r#""patch":"#), "{text}");
    h2_body
        .send(bytes::Bytes::copy_from_slice(rest.as_bytes()))
        .await
        .unwrap();
    drop(h2_body);
    let response = h2_answer
        .await
        .unwrap()
        .expect("the HTTP/2 review answered");
    assert_eq!(response.status(), 200);
    let answer = http_body_util::BodyExt::collect(response.into_body())
        .await
        .unwrap()
        .to_bytes();
    let answer: Value = serde_json::from_slice(&answer).unwrap();
    assert!(answer["response"]["patch"].is_string(), "{answer}");

    let status = injector
        .wait_timeout(Duration::from_secs(5))
        .expect("exited once its reviews were answered");
    assert!(status.success(), "{status:?}");
    assert!(
        signalled.elapsed() < Duration::from_secs(5),
        "took the whole grace: {:?}",
        signalled.elapsed()
    );
}
