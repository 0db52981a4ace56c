//! The `meshid-sidecar` binary: bad configuration exits 64 naming every problem; a good one serves
//! its admin endpoints and exits 0 on SIGTERM.

#![allow(clippy::unwrap_used)] // test helpers outside #[test] functions

use std::io::{Read, Write};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

fn bin() -> Command {
    Command::new(env!("CARGO_BIN_EXE_meshid-sidecar"))
}

#[test]
fn bad_configuration_exits_64_naming_every_problem() {
    let out = bin()
        .args([
            "run",
            "--inbound",
            "0.0.0.0:15443=10.0.0.9:8080,http",
            "--outbound",
            "127.0.0.1:9001=payments:15443,not-a-spiffe-id",
            "--handshake-timeout",
            "soon",
            "--policy",
            "/nonexistent/policy.yaml",
        ])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(64));
    let err = String::from_utf8_lossy(&out.stderr);
    for needle in [
        "--inbound",
        "--outbound",
        "--handshake-timeout",
        "--policy",
        "--cert",
    ] {
        assert!(err.contains(needle), "{needle} not named in:\n{err}");
    }
}

fn get(addr: &str, path: &str) -> Option<(u16, String)> {
    let mut s = std::net::TcpStream::connect(addr).ok()?;
    s.set_read_timeout(Some(Duration::from_secs(2))).ok()?;
    write!(
        s,
        "GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
    )
    .ok()?;
    let mut out = String::new();
    s.read_to_string(&mut out).ok()?;
    let code = out.split_whitespace().nth(1)?.parse().ok()?;
    Some((code, out))
}

fn write_creds(dir: &std::path::Path) -> (String, String, String) {
    let root_key = rcgen::KeyPair::generate().unwrap();
    let mut root = rcgen::CertificateParams::default();
    root.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
    root.key_usages = vec![rcgen::KeyUsagePurpose::KeyCertSign];
    let root_cert = root.self_signed(&root_key).unwrap();
    let issuer = rcgen::Issuer::new(root, root_key);
    let key = rcgen::KeyPair::generate().unwrap();
    let mut leaf = rcgen::CertificateParams::default();
    leaf.subject_alt_names = vec![rcgen::SanType::URI(
        "spiffe://cluster.local/ns/demo/sa/app".try_into().unwrap(),
    )];
    leaf.extended_key_usages = vec![
        rcgen::ExtendedKeyUsagePurpose::ServerAuth,
        rcgen::ExtendedKeyUsagePurpose::ClientAuth,
    ];
    let cert = leaf.signed_by(&key, &issuer).unwrap();
    let paths = ["cert.pem", "key.pem", "bundle.pem"].map(|n| dir.join(n));
    std::fs::write(&paths[0], cert.pem()).unwrap();
    std::fs::write(&paths[1], key.serialize_pem()).unwrap();
    std::fs::write(&paths[2], root_cert.pem()).unwrap();
    let [a, b, c] = paths.map(|p| p.to_str().unwrap().to_owned());
    (a, b, c)
}

#[test]
fn serves_admin_and_exits_0_on_sigterm() {
    let dir = tempfile::tempdir().unwrap();
    let (cert, key, bundle) = write_creds(dir.path());
    let policy = dir.path().join("policy.yaml");
    let port = std::net::TcpListener::bind("127.0.0.7:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    std::fs::write(
        &policy,
        format!("inbound:\n  - port: {port}\n    allow: []\n"),
    )
    .unwrap();
    let admin = std::net::TcpListener::bind("127.0.0.7:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .to_string();
    let mut child = bin()
        .args([
            "run",
            "--inbound",
            &format!("127.0.0.7:{port}=127.0.0.1:1"),
            "--policy",
            policy.to_str().unwrap(),
            "--cert",
            &cert,
            "--key",
            &key,
            "--bundle",
            &bundle,
            "--admin-listen",
            &admin,
        ])
        .stdin(Stdio::null())
        .spawn()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(10);
    let mut ready = false;
    while Instant::now() < deadline {
        if matches!(get(&admin, "/readyz"), Some((200, _))) {
            ready = true;
            break;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    if !ready {
        let _ = child.kill();
        panic!("sidecar never became ready");
    }
    let (code, identity) = get(&admin, "/identity").unwrap();
    assert_eq!(code, 200);
    assert!(
        identity.contains("spiffe://cluster.local/ns/demo/sa/app"),
        "{identity}"
    );
    assert!(!identity.contains("PRIVATE"), "{identity}");
    let (code, metrics) = get(&admin, "/metrics").unwrap();
    assert_eq!(code, 200);
    assert!(
        metrics.contains("meshid_sidecar_certificate_expiry_timestamp_seconds"),
        "{metrics}"
    );
    Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        if let Some(status) = child.try_wait().unwrap() {
            assert!(status.success(), "{status:?}");
            break;
        }
        assert!(
            Instant::now() < deadline,
            "sidecar did not exit after SIGTERM"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}
