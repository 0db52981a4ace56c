//! Decision IDs: every deny (and in audit mode every would-deny) carries `x-meshid-decision`; the
//! real `meshid-sidecar explain` binary, asking the running sidecar's admin port, gives back the
//! peer, port, request, policy version and why; and on a table of requests its explanation is the
//! one `meshid-sidecar check-policy` prints for the same call on the same file.

use std::net::SocketAddr;
use std::process::Command;
use std::time::Duration;

use meshid_identity::policy::Protocol;
use meshid_tests::mesh::{
    SidecarSpec, TestPki, TestSidecar, Workload, client_config, eventually, get, http_echo,
    http_request, mtls_connect, tcp_echo,
};
use meshid_tests::tools::workspace_bin;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

const SERVER: &str = "spiffe://cluster.local/ns/shop/sa/server";
const CLIENT: &str = "spiffe://cluster.local/ns/shop/sa/client";
const STRANGER: &str = "spiffe://cluster.local/ns/shop/sa/stranger";
const PROM: &str = "spiffe://cluster.local/ns/ops/sa/prometheus";

fn policy(mode: &str, protocol: &str) -> String {
    format!(
        "mode: {mode}
inbound:
  - port: {{port0}}
    protocol: {protocol}
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

fn tcp_policy() -> String {
    format!("inbound:\n  - port: {{port0}}\n    protocol: tcp\n    allow:\n      - id: {CLIENT}\n")
}

async fn sidecar(pki: &TestPki, app: SocketAddr, protocol: Protocol, yaml: String) -> TestSidecar {
    TestSidecar::start(
        pki,
        &pki.workload(SERVER),
        SERVER,
        SidecarSpec {
            inbound: vec![("127.0.0.5", app, protocol)],
            policy: Some(yaml),
            ..Default::default()
        },
    )
    .await
}

async fn call(
    pki: &TestPki,
    s: &TestSidecar,
    who: &Workload,
    method: &str,
    path: &str,
) -> (u16, Option<String>) {
    let cfg = client_config(
        &pki.roots(),
        &pki.trust_domain,
        Some(who),
        &s.id,
        &[b"http/1.1"],
    );
    let tls = mtls_connect(s.inbound[0], cfg).await.expect("connect");
    let mut req = get(path, &[]);
    *req.method_mut() = method.parse().unwrap();
    let (status, headers, _) = http_request(tls, false, req).await.expect("answer");
    let id = headers
        .get("x-meshid-decision")
        .map(|v| v.to_str().unwrap().to_owned());
    (status, id)
}

/// `GET /decisions` on the admin port: the newest decisions, newest first.
async fn decisions(admin: SocketAddr) -> serde_json::Value {
    let reply = meshid_runtime::http_client::send(&meshid_runtime::http_client::Call::get(
        admin,
        "/decisions",
    ))
    .await
    .unwrap();
    assert_eq!(reply.status, 200);
    serde_json::from_slice(&reply.body).unwrap()
}

/// `meshid-sidecar explain --admin ADDR ID`: exit code and output.
fn explain(admin: SocketAddr, id: &str) -> (Option<i32>, String) {
    let out = Command::new(workspace_bin("meshid-sidecar"))
        .args(["explain", "--admin", &admin.to_string(), id])
        .output()
        .unwrap();
    let mut text = String::from_utf8_lossy(&out.stdout).into_owned();
    text.push_str(&String::from_utf8_lossy(&out.stderr));
    (out.status.code(), text)
}

/// `meshid-sidecar check-policy FILE --peer P --port N --method M --path X`: the verdict line's
/// explanation (after `-> port N METHOD PATH: `).
fn check_policy(file: &std::path::Path, peer: &str, port: u16, method: &str, path: &str) -> String {
    let (_, text) = run_check_policy(file, peer, port, method, path);
    let marker = format!("-> port {port} {method} {path}: ");
    let line = text
        .lines()
        .find(|l| l.contains(&marker))
        .unwrap_or_else(|| panic!("no verdict line in {text}"));
    line.split_once(&marker).unwrap().1.to_owned()
}

/// The same command: its exit code and what it printed on stdout.
fn run_check_policy(
    file: &std::path::Path,
    peer: &str,
    port: u16,
    method: &str,
    path: &str,
) -> (Option<i32>, String) {
    let out = Command::new(workspace_bin("meshid-sidecar"))
        .arg("check-policy")
        .arg(file)
        .args(["--peer", peer, "--port", &port.to_string()])
        .args(["--method", method, "--path", path])
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    (out.status.code(), text)
}

/// `check-policy --method` without `--path` is refused (exit 64, naming `--path`): it decided the
/// connection alone, said allow and exited 0 for a method the sidecar denies on every path.
#[test]
fn check_policy_refuses_a_method_without_a_path() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("policy.yaml");
    std::fs::write(
        &file,
        format!(
            "inbound:\n  - port: 8080\n    protocol: http\n    allow:\n      - id: {CLIENT}\n        \
             methods: [GET]\n        paths: [/api/*]\n"
        ),
    )
    .unwrap();
    let run = |extra: &[&str]| {
        let out = Command::new(workspace_bin("meshid-sidecar"))
            .arg("check-policy")
            .arg(&file)
            .args(["--peer", CLIENT, "--port", "8080"])
            .args(extra)
            .output()
            .unwrap();
        let mut text = String::from_utf8_lossy(&out.stdout).into_owned();
        text.push_str(&String::from_utf8_lossy(&out.stderr));
        (out.status.code(), text)
    };
    let (code, text) = run(&["--method", "DELETE"]);
    assert_eq!(code, Some(64), "{text}");
    assert!(text.contains("--path"), "{text}");
    // The connection alone, and the method with a path, as before.
    assert_eq!(run(&[]).0, Some(0));
    assert_eq!(run(&["--method", "DELETE", "--path", "/api/x"]).0, Some(2));
}

/// A `?_method=` override is decided by the sidecar as the method it names: check-policy decides it
/// too, printing the verdict `explain` prints for the sidecar's denial, and exits 2 (it printed
/// "allow" and exited 0 for a request the sidecar refused).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn check_policy_decides_a_query_method_override_as_the_sidecar_does() {
    let pki = TestPki::new();
    let app = http_echo().await;
    let s = sidecar(&pki, app, Protocol::Http, policy("enforce", "http")).await;
    let port = s.inbound[0].port();
    let client = pki.workload(CLIENT);
    let path = "/api/orders?_method=delete";
    let (status, id) = call(&pki, &s, &client, "GET", path).await;
    assert_eq!(status, 403);
    let id = id.expect("a deny carries x-meshid-decision");
    let (code, out) = tokio::task::spawn_blocking({
        let admin = s.admin;
        move || explain(admin, &id)
    })
    .await
    .unwrap();
    assert_eq!(code, Some(0), "{out}");
    assert!(
        out.contains(&format!("-> port {port} DELETE /api/orders\n")),
        "{out}"
    );
    let (code, text) = run_check_policy(&s.policy_path, CLIENT, port, "GET", path);
    assert_eq!(code, Some(2), "{text}");
    let marker = format!("-> port {port} DELETE /api/orders: ");
    let verdict = text
        .lines()
        .find_map(|l| l.split_once(&marker).map(|(_, v)| v))
        .unwrap_or_else(|| panic!("no verdict on the override in {text}"));
    assert!(
        out.lines().any(|l| l == verdict),
        "explain and check-policy disagree:\nexplain:\n{out}\ncheck-policy:\n{text}"
    );
    // An override naming the request's own method, or an allowed one, changes nothing.
    for path in ["/api/orders?_method=get", "/api/orders"] {
        let (code, text) = run_check_policy(&s.policy_path, CLIENT, port, "GET", path);
        assert_eq!(code, Some(0), "{path}: {text}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_denial_has_an_id_that_explain_and_check_policy_agree_on() {
    let pki = TestPki::new();
    let app = http_echo().await;
    let s = sidecar(&pki, app, Protocol::Http, policy("enforce", "http")).await;
    let port = s.inbound[0].port();
    let client = pki.workload(CLIENT);
    let stranger = pki.workload(STRANGER);
    let prom = pki.workload(PROM);
    let table: [(&Workload, &str, &str, &str, bool); 8] = [
        (&client, CLIENT, "GET", "/api/orders", true),
        (&client, CLIENT, "POST", "/api/orders", false),
        (&client, CLIENT, "GET", "/admin", false),
        (&client, CLIENT, "DELETE", "/admin", false),
        (&stranger, STRANGER, "GET", "/api/orders", false),
        (&prom, PROM, "GET", "/metrics", true),
        (&prom, PROM, "GET", "/api/orders", false),
        (&client, CLIENT, "GET", "/api/..%2fadmin", false),
    ];
    let mut ids = Vec::new();
    for (who, peer, method, path, allowed) in table {
        let (status, id) = call(&pki, &s, who, method, path).await;
        let what = format!("{peer} {method} {path}");
        if allowed {
            assert_eq!(status, 200, "{what}");
            assert!(
                id.is_none(),
                "{what}: an allowed request has no decision ID"
            );
            continue;
        }
        assert_eq!(status, 403, "{what}");
        let id = id.unwrap_or_else(|| panic!("{what}: a deny carries x-meshid-decision"));
        assert_eq!(id.len(), 12, "{id}");
        let (code, out) = tokio::task::spawn_blocking({
            let (admin, id) = (s.admin, id.clone());
            move || explain(admin, &id)
        })
        .await
        .unwrap();
        assert_eq!(code, Some(0), "{out}");
        assert!(out.contains(&format!("decision {id} (deny")), "{out}");
        assert!(out.contains(&format!("{peer} from 127.0.0.1:")), "{out}");
        assert!(
            out.contains(&format!("-> port {port} {method} {path}")),
            "{out}"
        );
        assert!(out.contains("policy version 0"), "{out}");
        let checked = check_policy(&s.policy_path, peer, port, method, path);
        assert!(
            out.lines().any(|l| l == checked),
            "{what}: explain and check-policy disagree:\nexplain:\n{out}\ncheck-policy: {checked}"
        );
        ids.push((id, checked));
    }
    // The reasons are the ones a service owner needs.
    assert!(
        ids[0].1.contains("closest: rule 0") && ids[0].1.ends_with("the method"),
        "{ids:?}"
    );
    assert!(ids[1].1.ends_with("the path"), "{ids:?}");
    assert!(ids[2].1.ends_with("the method and the path"), "{ids:?}");
    assert!(ids[3].1.ends_with("the identity"), "{ids:?}");
    assert!(ids[5].1.contains("unsafe request path"), "{ids:?}");
    // Listed on the admin port, newest first.
    let list = decisions(s.admin).await;
    assert_eq!(list.as_array().unwrap().len(), ids.len());
    assert_eq!(list[0]["id"], serde_json::json!(ids.last().unwrap().0));
    // An ID the sidecar does not hold, and something that is no ID.
    let (code, out) = explain(s.admin, "0123456789ab");
    assert_eq!(code, Some(1), "{out}");
    assert!(out.contains("404"), "{out}");
    let (code, _) = explain(s.admin, "../metrics");
    assert_eq!(code, Some(64));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_audit_mode_would_deny_passes_with_its_decision_id_and_a_new_policy_version() {
    let pki = TestPki::new();
    let app = http_echo().await;
    let s = sidecar(&pki, app, Protocol::Http, policy("enforce", "http")).await;
    s.write_policy(&policy("audit", "http"));
    let stranger = pki.workload(STRANGER);
    let mut seen = None;
    for _ in 0..200 {
        let (status, id) = call(&pki, &s, &stranger, "GET", "/api/x").await;
        if status == 200 {
            seen = Some(id);
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let seen = seen.expect("audit mode lets it through");
    let id = seen.expect("the app's answer carries the decision ID");
    let (code, out) = explain(s.admin, &id);
    assert_eq!(code, Some(0), "{out}");
    assert!(out.contains("(audit_deny"), "{out}");
    assert!(out.contains("policy version 1"), "{out}");
    assert!(
        out.contains("would deny (audit mode lets it through)"),
        "{out}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_refused_tcp_connection_is_logged_with_its_decision() {
    let pki = TestPki::new();
    let app = tcp_echo().await;
    let s = sidecar(&pki, app, Protocol::Tcp, tcp_policy()).await;
    let stranger = pki.workload(STRANGER);
    let cfg = client_config(&pki.roots(), &pki.trust_domain, Some(&stranger), &s.id, &[]);
    let mut tls = mtls_connect(s.inbound[0], cfg).await.expect("handshake");
    let _ = tls.write_all(b"hello").await;
    let mut buf = [0u8; 8];
    let read = tokio::time::timeout(Duration::from_secs(5), tls.read(&mut buf)).await;
    assert!(
        matches!(read, Ok(Ok(0)) | Ok(Err(_))),
        "the connection is closed"
    );
    let list = decisions(s.admin).await;
    let d = &list[0];
    assert_eq!(d["peer"], serde_json::json!(STRANGER));
    assert_eq!(d["method"], serde_json::json!(""));
    let id = d["id"].as_str().unwrap().to_owned();
    let (code, out) = explain(s.admin, &id);
    assert_eq!(code, Some(0), "{out}");
    assert!(
        out.contains(&format!("-> port {} connection", s.inbound[0].port())),
        "{out}"
    );
    assert!(out.contains("does not match the identity"), "{out}");
}

/// `meshid-sidecar suggest-policy` (the real binary, asking the running sidecar): after traffic
/// in audit mode, it prints a policy that parses, allows every observed call (values in paths
/// collapsed) and nothing else tried here, and lists the observed calls the policy in force denies
/// and the rule that decided none of them.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn suggest_policy_allows_what_was_observed_and_shows_the_difference() {
    let pki = TestPki::new();
    let app = http_echo().await;
    let s = sidecar(&pki, app, Protocol::Http, policy("audit", "http")).await;
    let port = s.inbound[0].port();
    let client = pki.workload(CLIENT);
    let stranger = pki.workload(STRANGER);
    let calls: [(&Workload, &str, &str); 5] = [
        (&client, "GET", "/api/orders/17"),
        (&client, "GET", "/api/orders/18"),
        (&client, "PUT", "/api/orders/18"),
        (&stranger, "GET", "/api/orders/17"),
        (&stranger, "POST", "/checkout"),
    ];
    for (who, method, path) in calls {
        let (status, _) = call(&pki, &s, who, method, path).await;
        assert_eq!(status, 200, "audit mode lets {method} {path} through");
    }
    let out = tokio::task::spawn_blocking({
        let admin = s.admin.to_string();
        move || {
            Command::new(workspace_bin("meshid-sidecar"))
                .args(["suggest-policy", "--admin", &admin])
                .output()
                .unwrap()
        }
    })
    .await
    .unwrap();
    assert!(out.status.success(), "{out:?}");
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    let suggested = meshid_identity::policy::Policy::parse(&text)
        .unwrap_or_else(|e| panic!("the suggestion parses: {e}\n{text}"));
    let id = |s: &str| meshid_identity::SpiffeId::parse(s).unwrap();
    let allows = |peer: &str, method: &str, path: &str| {
        suggested
            .decide_request(port, &id(peer), method, path)
            .would_allow
    };
    assert!(allows(CLIENT, "GET", "/api/orders/17"), "{text}");
    assert!(
        allows(CLIENT, "GET", "/api/orders/99"),
        "an ID in the path collapses: {text}"
    );
    assert!(allows(CLIENT, "PUT", "/api/orders/5"), "{text}");
    assert!(allows(STRANGER, "POST", "/checkout"), "{text}");
    assert!(!allows(STRANGER, "PUT", "/api/orders/17"), "{text}");
    assert!(!allows(CLIENT, "POST", "/checkout"), "{text}");
    assert!(!allows(PROM, "GET", "/metrics"), "{text}");
    // The difference from the policy in force: the stranger's two calls, and the ops rule.
    assert!(text.contains("denies (2)"), "{text}");
    assert!(
        text.contains(&format!(
            "#   {STRANGER} -> port {port} POST /checkout (1 times): no-rule-matched"
        )),
        "{text}"
    );
    assert!(text.contains("decided none of them (1)"), "{text}");
    assert!(
        text.contains(&format!(
            "#   port {port}: rule 1 (spiffe://cluster.local/ns/ops/sa/*)"
        )),
        "{text}"
    );
    // As annotations: whole peers.
    let out = Command::new(workspace_bin("meshid-sidecar"))
        .args([
            "suggest-policy",
            "--annotations",
            "--admin",
            &s.admin.to_string(),
        ])
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        text.contains(&format!("meshid.io/allow-{port}: \"{CLIENT}, {STRANGER}\"")),
        "{text}"
    );
}

/// A refused handshake is a decision too: its reason, the caller's address and the identity its
/// certificate claimed, under an ID in the log and on `/decisions`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_refused_handshake_is_recorded_with_the_identity_it_claimed() {
    let pki = TestPki::new();
    let app = http_echo().await;
    let s = sidecar(&pki, app, Protocol::Http, policy("enforce", "http")).await;
    // A certificate for our client's identity, from a CA the sidecar does not trust.
    let impostor_ca = TestPki::new();
    let impostor = impostor_ca.workload(CLIENT);
    let cfg = client_config(
        &pki.roots(),
        &pki.trust_domain,
        Some(&impostor),
        &s.id,
        &[b"http/1.1"],
    );
    let refused = match mtls_connect(s.inbound[0], cfg).await {
        Err(_) => true,
        // TLS 1.3: the client may finish first and learn of the refusal at its first read.
        Ok(tls) => http_request(tls, false, get("/api/x", &[])).await.is_err(),
    };
    assert!(refused, "an untrusted certificate is refused");
    // TLS 1.3: the client can see the refusal before the sidecar has recorded it.
    let recorded = eventually(Duration::from_secs(10), || async {
        decisions(s.admin).await[0].is_object()
    })
    .await;
    let list = decisions(s.admin).await;
    assert!(recorded, "the refused handshake was never recorded: {list}");
    let d = &list[0];
    assert_eq!(
        d["decision"],
        serde_json::json!("handshake_failure"),
        "{list}"
    );
    assert_eq!(
        d["peer"],
        serde_json::json!(CLIENT),
        "the claimed identity: {list}"
    );
    // Its issuer has our CA's names but not its key: a bad signature (an unknown CA otherwise).
    let reason = d["rule"].as_str().unwrap().to_owned();
    assert!(
        reason == "bad_signature" || reason == "unknown_ca",
        "{list}"
    );
    assert!(
        d["peer_addr"].as_str().unwrap().starts_with("127.0.0.1:"),
        "{list}"
    );
    let (code, out) = explain(s.admin, d["id"].as_str().unwrap());
    assert_eq!(code, Some(0), "{out}");
    assert!(
        out.contains(&format!("handshake refused ({reason})")),
        "{out}"
    );
    // The claim is said to be one: anyone can make a certificate that names a workload.
    assert!(
        out.contains(&format!(
            "{CLIENT} (claimed by the refused certificate, not verified)"
        )),
        "{out}"
    );
}
