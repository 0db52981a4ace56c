//! Clients we did not write: curl and openssl s_client against a sidecar's inbound listener, and a
//! Python grpcio client against the CA. Each test is ignored (with the reason) where its tool is
//! missing; CI installs them all.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::process::{Command, Stdio};
use std::time::Duration;

use base64::Engine;
use meshid_identity::policy::Protocol;
use meshid_tests::mesh::{SidecarSpec, TestPki, TestSidecar, Workload, http_echo};
use meshid_tests::tools::run;

const SERVER: &str = "spiffe://cluster.local/ns/shop/sa/server";
const CLIENT: &str = "spiffe://cluster.local/ns/shop/sa/client";
const STRANGER: &str = "spiffe://cluster.local/ns/shop/sa/stranger";

struct Env {
    pki: TestPki,
    sidecar: TestSidecar,
    server: Workload,
}

async fn env() -> Env {
    let pki = TestPki::new();
    let server = pki.workload(SERVER);
    let sidecar = TestSidecar::start(
        &pki,
        &server,
        SERVER,
        SidecarSpec {
            inbound: vec![("127.0.0.10", http_echo().await, Protocol::Http)],
            policy: Some(format!(
                "inbound:\n  - port: {{port0}}\n    protocol: http\n    allow:\n      - id: {CLIENT}\n"
            )),
            ..Default::default()
        },
    )
    .await;
    Env {
        pki,
        sidecar,
        server,
    }
}

/// curl's `--pinnedpubkey` value for a certificate: our stand-in for a SPIFFE-aware server check
/// (curl cannot check URI SANs; pinning the sidecar's key proves it is the right server).
fn pin(cert_der: &[u8]) -> String {
    use x509_parser::prelude::*;
    let (_, cert) = X509Certificate::from_der(cert_der).unwrap();
    let spki = cert.public_key().raw;
    let digest = aws_lc_rs::digest::digest(&aws_lc_rs::digest::SHA256, spki);
    format!(
        "sha256//{}",
        base64::engine::general_purpose::STANDARD.encode(digest.as_ref())
    )
}

async fn curl(e: &Env, who: &Workload, path: &str) -> (bool, String) {
    let url = format!("https://{}{path}", e.sidecar.inbound[0]);
    let pin = pin(&e.server.chain[0]);
    let (cert, key) = (who.cert_path.clone(), who.key_path.clone());
    tokio::task::spawn_blocking(move || {
        run(Command::new("curl")
            .args(["-sS", "--max-time", "10", "-k", "--pinnedpubkey", &pin])
            .arg("--cert")
            .arg(cert)
            .arg("--key")
            .arg(key)
            .args(["-w", "\nstatus=%{http_code} http=%{http_version}\n", &url]))
    })
    .await
    .unwrap()
}

#[cfg_attr(not(have_curl), ignore = "curl is not installed")]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn curl_with_our_certificates_allowed_and_denied() {
    let e = env().await;
    let client = e.pki.workload(CLIENT);
    let (ok, out) = curl(&e, &client, "/api/orders").await;
    assert!(ok, "{out}");
    assert!(out.contains("status=200"), "{out}");
    assert!(out.contains(&format!("caller={CLIENT}")), "{out}");
    // curl negotiates h2 by ALPN.
    assert!(out.contains("http=2"), "{out}");

    let stranger = e.pki.workload(STRANGER);
    let (_, out) = curl(&e, &stranger, "/api/orders").await;
    assert!(out.contains("status=403"), "{out}");
    assert!(out.contains("no rule matched"), "{out}");

    // A wrong pin (another key) makes curl refuse the server.
    let other = e.pki.workload(SERVER);
    let url = format!("https://{}/api/orders", e.sidecar.inbound[0]);
    let (ok, out) = run(Command::new("curl")
        .args([
            "-sS",
            "--max-time",
            "10",
            "-k",
            "--pinnedpubkey",
            &pin(&other.chain[0]),
        ])
        .arg("--cert")
        .arg(&client.cert_path)
        .arg("--key")
        .arg(&client.key_path)
        .arg(&url));
    assert!(!ok, "pinning must fail for another key: {out}");
    // curl's own refusal (exit 90, CURLE_SSL_PINNEDPUBKEYNOTMATCH), not some other failure.
    assert!(
        out.contains("(90)") && out.contains("public key does not match pinned public key"),
        "{out}"
    );
}

fn s_client(addr: std::net::SocketAddr, extra: &[&str]) -> String {
    let mut child = Command::new("openssl")
        .args([
            "s_client",
            "-connect",
            &addr.to_string(),
            "-tls1_3",
            "-ign_eof",
        ])
        .args(extra)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    {
        use std::io::Write;
        let mut stdin = child.stdin.take().unwrap();
        let _ =
            stdin.write_all(b"GET /api/orders HTTP/1.1\r\nHost: app\r\nConnection: close\r\n\r\n");
    }
    let deadline = std::time::Instant::now() + Duration::from_secs(15);
    while std::time::Instant::now() < deadline {
        if let Ok(Some(_)) = child.try_wait() {
            break;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    let _ = child.kill();
    let out = child.wait_with_output().unwrap();
    format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

#[cfg_attr(not(have_openssl), ignore = "openssl is not installed")]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn openssl_s_client_without_or_with_foreign_certificate_is_refused() {
    let e = env().await;
    let addr = e.sidecar.inbound[0];
    // No client certificate.
    let out = tokio::task::spawn_blocking(move || s_client(addr, &[]))
        .await
        .unwrap();
    assert!(!out.contains("HTTP/1.1 200"), "{out}");
    assert!(out.contains("alert") || out.contains("error"), "{out}");

    // A certificate from a foreign CA, same SPIFFE ID.
    let foreign = meshid_tests::pki::ForeignCa::new();
    let (chain, key) = foreign.workload(CLIENT);
    let dir = tempfile::tempdir().unwrap();
    let (cert_path, key_path) = (dir.path().join("c.pem"), dir.path().join("k.pem"));
    std::fs::write(&cert_path, meshid_tests::pki::pem(&chain[0])).unwrap();
    let key_pem = rcgen::KeyPair::try_from(key.secret_der())
        .unwrap()
        .serialize_pem();
    std::fs::write(&key_path, key_pem).unwrap();
    let (c, k) = (
        cert_path.to_str().unwrap().to_owned(),
        key_path.to_str().unwrap().to_owned(),
    );
    let out = tokio::task::spawn_blocking(move || s_client(addr, &["-cert", &c, "-key", &k]))
        .await
        .unwrap();
    assert!(!out.contains("HTTP/1.1 200"), "{out}");
    assert!(out.contains("alert") || out.contains("error"), "{out}");

    // Our own client certificate is accepted by the same tool (the refusals above are real).
    let client = e.pki.workload(CLIENT);
    let (c, k) = (
        client.cert_path.to_str().unwrap().to_owned(),
        client.key_path.to_str().unwrap().to_owned(),
    );
    let out = tokio::task::spawn_blocking(move || {
        // s_client sends only the first certificate of -cert; the chain needs -cert_chain.
        s_client(
            addr,
            &[
                "-cert",
                &c,
                "-cert_chain",
                &c,
                "-key",
                &k,
                "-alpn",
                "http/1.1",
            ],
        )
    })
    .await
    .unwrap();
    assert!(out.contains("HTTP/1.1 200"), "{out}");
    let m = e.sidecar.metrics().await;
    assert!(m.contains(r#"reason="no_client_cert""#), "{m}");
    assert!(m.contains(r#"reason="unknown_ca""#), "{m}");
}

const PY_CLIENT: &str = r#"
import os, sys, grpc
sys.path.insert(0, os.environ["STUBS"])
from meshid.ca.v1 import ca_pb2, ca_pb2_grpc
roots = open(os.environ["BUNDLE"], "rb").read()
creds = grpc.ssl_channel_credentials(root_certificates=roots)
channel = grpc.secure_channel(os.environ["ADDR"], creds, options=[("grpc.ssl_target_name_override", "localhost")])
stub = ca_pb2_grpc.CertificateAuthorityStub(channel)
csr = open(os.environ["CSR"], "rb").read()
resp = stub.Issue(ca_pb2.IssueRequest(csr=csr, join_token=os.environ["TOKEN"]), timeout=10)
print("issued", resp.spiffe_id, len(resp.cert_chain), resp.not_after_unix - resp.not_before_unix)
try:
    stub.Issue(ca_pb2.IssueRequest(csr=csr, join_token=os.environ["TOKEN"]), timeout=10)
    print("reuse accepted")
except grpc.RpcError as e:
    print("reuse refused", e.code().name)
stream = stub.WatchTrustBundle(ca_pb2.WatchTrustBundleRequest(), timeout=10)
first = next(stream)
print("bundle", first.trust_domain, first.version, len(first.roots))
stream.cancel()
"#;

#[cfg_attr(
    not(have_grpcio),
    ignore = "python3 with grpcio and grpcio-tools is not installed"
)]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn python_grpcio_client_issues_and_watches_the_bundle() {
    let ca = meshid_tests::ca::TestCa::start(Default::default()).await;
    let dir = tempfile::tempdir().unwrap();
    let stubs = dir.path().join("stubs");
    std::fs::create_dir_all(&stubs).unwrap();
    let proto_root = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../proto");
    let (ok, out) = run(Command::new("python3")
        .args(["-m", "grpc_tools.protoc"])
        .arg(format!("-I{}", proto_root.display()))
        .arg(format!("--python_out={}", stubs.display()))
        .arg(format!("--grpc_python_out={}", stubs.display()))
        .arg(proto_root.join("meshid/ca/v1/ca.proto")));
    assert!(ok, "protoc: {out}");
    let csr_path = dir.path().join("csr.der");
    std::fs::write(&csr_path, meshid_tests::pki::WorkloadKey::new().csr).unwrap();
    let token = ca.join_token(
        "spiffe://cluster.local/ns/vm/sa/py",
        Duration::from_secs(600),
    );
    let script = dir.path().join("client.py");
    std::fs::write(&script, PY_CLIENT).unwrap();
    let addr = ca.addr.to_string();
    let bundle = ca.dir.path().join("bundle.pem");
    let (ok, out) = tokio::task::spawn_blocking(move || {
        run(Command::new("python3")
            .arg(&script)
            .env("STUBS", &stubs)
            .env("BUNDLE", &bundle)
            .env("ADDR", &addr)
            .env("CSR", &csr_path)
            .env("TOKEN", &token))
    })
    .await
    .unwrap();
    assert!(ok, "{out}");
    // An hour, plus the 5 minutes the CA backdates not-before by.
    assert!(
        out.contains("issued spiffe://cluster.local/ns/vm/sa/py 2 3900"),
        "{out}"
    );
    assert!(out.contains("reuse refused UNAUTHENTICATED"), "{out}");
    assert!(out.contains("bundle cluster.local 1 1"), "{out}");
}
