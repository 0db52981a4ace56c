//! The `meshid-ca` binary's command line: bad configuration exits 64 naming every bad setting, and
//! `init` never overwrites a CA.

use std::os::unix::fs::PermissionsExt;
use std::process::Command;

fn bin() -> Command {
    Command::new(env!("CARGO_BIN_EXE_meshid-ca"))
}

#[test]
fn bad_serve_configuration_exits_64_naming_every_problem() {
    let out = bin()
        .args([
            "serve",
            "--dir",
            "/nonexistent/meshid",
            "--listen",
            "not-an-address",
            "--admin-listen",
            "127.0.0.1:99999",
            "--ttl",
            "forever",
            "--rate-burst",
            "0",
        ])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(64));
    let err = String::from_utf8_lossy(&out.stderr);
    for flag in [
        "--dir",
        "--listen",
        "--admin-listen",
        "--ttl",
        "--rate-burst",
    ] {
        assert!(err.contains(flag), "{flag} not named in:\n{err}");
    }
}

#[test]
fn two_jwks_sources_exit_64_naming_the_problem() {
    let dir = tempfile::tempdir().unwrap();
    let jwks = dir.path().join("jwks.json");
    std::fs::write(&jwks, r#"{"keys":[]}"#).unwrap();
    let out = bin()
        .args(["serve", "--dir"])
        .arg(dir.path())
        .arg("--jwks")
        .arg(&jwks)
        .args([
            "--jwks-discovery",
            "--jwks-token-file",
            "/nonexistent/token",
        ])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(64));
    let err = String::from_utf8_lossy(&out.stderr);
    for needle in ["--jwks, --jwks-url, --jwks-discovery", "--jwks-token-file"] {
        assert!(err.contains(needle), "{needle} not named in:\n{err}");
    }
}

#[test]
fn unknown_flag_exits_64() {
    let out = bin().args(["serve", "--no-such-flag"]).output().unwrap();
    assert_eq!(out.status.code(), Some(64));
}

#[test]
fn init_writes_private_keys_0600_and_refuses_to_overwrite() {
    let dir = tempfile::tempdir().unwrap();
    let ca = dir.path().join("ca");
    let first = bin()
        .args([
            "init",
            "--dir",
            ca.to_str().unwrap(),
            "--trust-domain",
            "example.org",
        ])
        .output()
        .unwrap();
    assert!(first.status.success(), "{first:?}");
    let stdout = String::from_utf8_lossy(&first.stdout);
    assert!(stdout.contains("example.org"), "{stdout}");
    for key in ["root.key", "intermediate.key"] {
        let mode = std::fs::metadata(ca.join(key))
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o600, "{key}");
    }
    let before = std::fs::read(ca.join("intermediate.key")).unwrap();
    let second = bin()
        .args(["init", "--dir", ca.to_str().unwrap()])
        .output()
        .unwrap();
    assert!(!second.status.success());
    assert!(String::from_utf8_lossy(&second.stderr).contains("refusing to overwrite"));
    assert_eq!(std::fs::read(ca.join("intermediate.key")).unwrap(), before);
}

#[test]
fn bad_trust_domain_and_token_identity_exit_64() {
    let dir = tempfile::tempdir().unwrap();
    let out = bin()
        .args([
            "init",
            "--dir",
            dir.path().to_str().unwrap(),
            "--trust-domain",
            "Bad_Domain:1",
        ])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(64));
    let out = bin()
        .args([
            "token",
            "create",
            "--dir",
            dir.path().to_str().unwrap(),
            "--id",
            "spiffe://td/../x",
            "--ttl",
            "soon",
        ])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(64));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("--id") && err.contains("--ttl"), "{err}");
}

#[test]
fn rotate_commands_against_a_running_ca() {
    use std::io::{Read, Write};
    let dir = tempfile::tempdir().unwrap();
    let ca = dir.path().join("ca");
    let ca_s = ca.to_str().unwrap();
    assert!(
        bin()
            .args(["init", "--dir", ca_s])
            .status()
            .unwrap()
            .success()
    );
    let free = || {
        std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .to_string()
    };
    let (grpc, admin) = (free(), free());
    let mut serve = bin()
        .args([
            "serve",
            "--dir",
            ca_s,
            "--listen",
            &grpc,
            "--admin-listen",
            &admin,
            // Retire waits for what an earlier CA process may have issued: start + the longest
            // lifetime (see the retry below).
            "--ttl",
            "1s",
            "--max-ttl",
            "1s",
        ])
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let ready = (0..200).any(|_| {
        std::thread::sleep(std::time::Duration::from_millis(50));
        std::net::TcpStream::connect(&admin)
            .and_then(|mut s| {
                write!(
                    s,
                    "GET /readyz HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
                )?;
                let mut out = String::new();
                s.read_to_string(&mut out)?;
                Ok(out.starts_with("HTTP/1.1 200"))
            })
            .unwrap_or(false)
    });
    let run = |args: &[&str]| {
        let out = bin().args(args).output().unwrap();
        (
            out.status.success(),
            format!(
                "{}{}",
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            ),
        )
    };
    let result = std::panic::catch_unwind(|| {
        assert!(ready, "CA ready");
        // Nothing prepared: said first, with or without --admin.
        let (ok, out) = run(&["rotate", "activate", "--dir", ca_s, "--admin", &admin]);
        assert!(!ok && out.contains("nothing to activate"), "{out}");
        let (ok, out) = run(&["rotate", "activate", "--dir", ca_s]);
        assert!(
            !ok && out.contains("nothing to activate") && !out.contains("--admin"),
            "{out}"
        );
        let (ok, out) = run(&["rotate", "retire", "--dir", ca_s]);
        assert!(!ok && out.contains("nothing to retire"), "{out}");
        let (ok, out) = run(&["rotate", "prepare", "--dir", ca_s]);
        assert!(ok, "{out}");
        let bundle = std::fs::read_to_string(ca.join("bundle.pem")).unwrap();
        assert_eq!(bundle.matches("BEGIN CERTIFICATE").count(), 2);
        let (ok, out) = run(&["rotate", "prepare", "--dir", ca_s]);
        assert!(!ok && out.contains("finish that rotation first"), "{out}");
        let (ok, out) = run(&[
            "rotate", "status", "--dir", ca_s, "--admin", &admin, "--json",
        ]);
        assert!(ok && out.contains("\"prepared\""), "{out}");
        let (ok, out) = run(&["rotate", "activate", "--dir", ca_s, "--admin", &admin]);
        assert!(ok, "{out}");
        let mut retired = run(&["rotate", "retire", "--dir", ca_s, "--admin", &admin]);
        for _ in 0..30 {
            if retired.0 {
                break;
            }
            assert!(retired.1.contains("may be live until"), "{}", retired.1);
            std::thread::sleep(std::time::Duration::from_millis(200));
            retired = run(&["rotate", "retire", "--dir", ca_s, "--admin", &admin]);
        }
        assert!(retired.0, "{}", retired.1);
        let bundle = std::fs::read_to_string(ca.join("bundle.pem")).unwrap();
        assert_eq!(bundle.matches("BEGIN CERTIFICATE").count(), 1);
        let (ok, out) = run(&["rotate", "status", "--dir", ca_s, "--admin", "not-an-addr"]);
        assert!(!ok && out.contains("--admin"), "{out}");
    });
    let _ = serve.kill();
    let _ = serve.wait();
    if let Err(e) = result {
        std::panic::resume_unwind(e);
    }
}
