//! The rotation command line and reports, driven from tests as an operator would: `meshid-ca rotate`
//! against real CA processes, their `/rotation` reports, a sidecar's `/identity`.

use std::net::SocketAddr;
use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use meshid_ca::rotation::RotationReport;
use rustls::pki_types::CertificateDer;

use crate::process::{http_get, http_get_with};
use crate::tools::workspace_bin;

/// `meshid-ca <args>`: (exit code, stdout + stderr).
pub fn meshid_ca(args: &[&str]) -> (i32, String) {
    let out = Command::new(workspace_bin("meshid-ca"))
        .args(args)
        .env("MESHID_LOG", "warn")
        .output()
        .expect("run meshid-ca");
    let mut text = String::from_utf8_lossy(&out.stdout).into_owned();
    text.push_str(&String::from_utf8_lossy(&out.stderr));
    (out.status.code().unwrap_or(-1), text)
}

/// `meshid-ca rotate <step> --dir DIR --admin X --admin Y [extra]`.
pub fn rotate(step: &str, dir: &Path, admins: &[SocketAddr], extra: &[&str]) -> (i32, String) {
    let dir = dir.to_string_lossy().into_owned();
    let admins: Vec<String> = admins.iter().map(|a| a.to_string()).collect();
    let mut args = vec!["rotate", step, "--dir", dir.as_str()];
    for a in &admins {
        args.extend(["--admin", a.as_str()]);
    }
    args.extend(extra);
    meshid_ca(&args)
}

/// `rotate status --json`, merged over both CAs.
pub fn status(dir: &Path, admins: &[SocketAddr]) -> RotationReport {
    let (code, out) = rotate("status", dir, admins, &["--json"]);
    assert_eq!(code, 0, "rotate status: {out}");
    serde_json::from_str(&out).unwrap_or_else(|e| panic!("status JSON: {e}: {out}"))
}

/// One CA process's own `/rotation` report, asked with the admin token of `dir`, its CA directory.
pub fn report_of(dir: &Path, admin: SocketAddr) -> Option<RotationReport> {
    let token = meshid_ca::admin_token::AdminToken::load(dir).ok()??;
    let (code, body) = http_get_with(admin, "/rotation", &[token.header()]).ok()?;
    let json = body.split_once("\r\n\r\n")?.1;
    (code == 200).then(|| serde_json::from_str(json).ok())?
}

/// Polls `f` every 100 ms until it holds or `timeout` passes.
pub fn poll(timeout: Duration, mut f: impl FnMut() -> bool) -> bool {
    let deadline = Instant::now() + timeout;
    loop {
        if f() {
            return true;
        }
        if Instant::now() > deadline {
            return false;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// Runs a rotation step until it succeeds (or `timeout`), returning its last output.
pub fn rotate_until_ok(step: &str, dir: &Path, admins: &[SocketAddr], timeout: Duration) -> String {
    let mut last = String::new();
    let ok = poll(timeout, || {
        let (code, out) = rotate(step, dir, admins, &[]);
        last = out;
        code == 0
    });
    assert!(ok, "rotate {step} never passed; last answer: {last}");
    last
}

/// A sidecar's `/identity` document.
pub fn identity(admin: SocketAddr) -> serde_json::Value {
    let (code, body) = http_get(admin, "/identity").unwrap();
    assert_eq!(code, 200, "{body}");
    serde_json::from_str(body.split_once("\r\n\r\n").unwrap().1).unwrap()
}

pub fn anchors(ident: &serde_json::Value) -> Vec<String> {
    ident["trust_anchors_sha256"]
        .as_array()
        .map(|a| {
            a.iter()
                .filter_map(|v| v.as_str().map(str::to_lowercase))
                .collect()
        })
        .unwrap_or_default()
}

/// The trust bundle a CA process serves over gRPC: (version, roots).
pub async fn served_bundle(
    grpc: SocketAddr,
    roots: &[CertificateDer<'static>],
) -> (u64, Vec<CertificateDer<'static>>) {
    let mut c = crate::ca::connect(grpc, roots, None).await.unwrap();
    let b = c
        .get_trust_bundle(meshid_proto::ca::v1::GetTrustBundleRequest::default())
        .await
        .unwrap()
        .into_inner();
    (
        b.version,
        b.roots.into_iter().map(CertificateDer::from).collect(),
    )
}

pub fn read_roots(path: &Path) -> Vec<CertificateDer<'static>> {
    meshid_ca::authority::read_bundle(path).unwrap()
}

pub fn root_sha(report: &RotationReport, name: &str) -> String {
    report
        .authorities
        .iter()
        .find(|a| a.name == name)
        .map(|a| a.root_sha256.to_lowercase())
        .unwrap_or_else(|| panic!("authority {name} in {report:?}"))
}
