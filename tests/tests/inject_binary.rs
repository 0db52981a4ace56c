//! `meshid-injector` as the API server sees it: HTTPS with a serving certificate from the meshid CA
//! (verified here against the trust bundle, which the chart puts in the webhook's `caBundle`), an
//! AdmissionReview in, a JSONPatch out; bad flags exit 64 naming every problem.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::net::SocketAddr;
use std::process::Command;
use std::sync::Arc;
use std::time::Duration;

use base64::Engine;
use meshid_tests::process::{Proc, free_addr};
use meshid_tests::tools::workspace_bin;
use rustls_pki_types::{CertificateDer, ServerName, pem::PemObject};
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
    let mut store = rustls::RootCertStore::empty();
    for r in roots {
        store.add(r.clone()).unwrap();
    }
    let config = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::aws_lc_rs::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .unwrap()
    .with_root_certificates(store)
    .with_no_client_auth();
    let tcp = tokio::net::TcpStream::connect(addr).await?;
    let mut tls = tokio_rustls::TlsConnector::from(Arc::new(config))
        .connect(ServerName::try_from(SAN).unwrap(), tcp)
        .await?;
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

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn injector_serves_admission_reviews_over_tls_from_our_ca() {
    let dir = tempfile::tempdir().unwrap();
    let ca_dir = dir.path().join("ca");
    let out = Command::new(workspace_bin("meshid-ca"))
        .args(["init", "--dir"])
        .arg(&ca_dir)
        .output()
        .unwrap();
    assert!(out.status.success(), "{out:?}");
    let roots: Vec<CertificateDer<'static>> =
        CertificateDer::pem_file_iter(ca_dir.join("bundle.pem"))
            .unwrap()
            .map(Result::unwrap)
            .collect();
    let addr = free_addr("127.0.0.1");
    let _injector = Proc::spawn(
        "meshid-injector",
        Command::new(workspace_bin("meshid-injector"))
            .arg("--ca-dir")
            .arg(&ca_dir)
            .args(["--listen", &addr.to_string(), "--san", SAN])
            .args(["--sidecar-image", "registry.example/meshid/sidecar:0.1.0"])
            .args(["--ca-addr", "meshid-ca.meshid.svc:8443"])
            .env("MESHID_LOG", "warn"),
    );
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    loop {
        match https(addr, &roots, "GET", "/healthz", "").await {
            Ok((200, _)) => break,
            other => assert!(
                std::time::Instant::now() < deadline,
                "injector not healthy: {other:?}"
            ),
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }

    let pod = json!({
        "apiVersion": "v1", "kind": "Pod",
        "metadata": {"generateName": "web-", "namespace": "shop",
            "annotations": {"meshid.io/inbound": "8080=http"}},
        "spec": {"serviceAccountName": "web", "containers": [{"name": "app", "image": "web:1"}]},
    });
    let review = |pod: &Value| {
        json!({
            "apiVersion": "admission.k8s.io/v1", "kind": "AdmissionReview",
            "request": {"uid": "abc", "namespace": "shop", "operation": "CREATE",
                "kind": {"group": "", "version": "v1", "kind": "Pod"},
                "resource": {"group": "", "version": "v1", "resource": "pods"},
                "object": pod}
        })
        .to_string()
    };
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

#[test]
fn bad_flags_exit_64_naming_each() {
    let dir = tempfile::tempdir().unwrap();
    let out = Command::new(workspace_bin("meshid-injector"))
        .arg("--ca-dir")
        .arg(dir.path().join("missing"))
        .args(["--listen", "nope", "--san", SAN, "--sidecar-image", "x"])
        .args(["--ca-addr", "ca:1", "--token-expiration-seconds", "60"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(64), "{out:?}");
    let stderr = String::from_utf8_lossy(&out.stderr);
    for flag in ["--listen", "--token-expiration-seconds", "--ca-dir"] {
        assert!(stderr.contains(flag), "{flag} missing from {stderr}");
    }
}
