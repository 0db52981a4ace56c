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
