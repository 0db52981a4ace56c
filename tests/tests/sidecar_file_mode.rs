//! File mode kept live: the sidecar follows its `--cert`/`--key`/`--bundle` files as cert-manager or
//! a Kubernetes Secret volume rewrites them, publishes only a consistent set, and keeps serving the
//! last good one through torn writes, mismatched keys and foreign certificates. And
//! `meshid-sidecar check-policy`, which checks a policy file as the sidecar loads it.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::fs;
use std::io::Write;
use std::os::unix::fs::symlink;
use std::path::{Path, PathBuf};
use std::time::Duration;

use meshid_ca::authority::pem_cert;
use meshid_ca::csr::CsrPublicKey;
use meshid_ca::signer::{BACKDATE, sign_leaf};
use meshid_identity::policy::Protocol;
use meshid_identity::{SpiffeId, cert_identity_from_der};
use meshid_sidecar::settings::{CredSource, FileCreds};
use meshid_tests::mesh::{
    SidecarSpec, TestPki, TestSidecar, Workload, client_config, echo_roundtrip, eventually,
    mtls_connect, tcp_echo,
};
use meshid_tests::pki::ForeignCa;
use meshid_tests::process::http_get;
use rustls::pki_types::CertificateDer;
use time::OffsetDateTime;

const SERVER: &str = "spiffe://cluster.local/ns/shop/sa/server";
const CLIENT: &str = "spiffe://cluster.local/ns/shop/sa/client";
const PATIENCE: Duration = Duration::from_secs(20);

/// A sidecar serving inbound TCP to an echo app from credential files the test rewrites.
struct Mesh {
    pki: TestPki,
    sidecar: TestSidecar,
    client: Workload,
}

impl Mesh {
    /// Starts a sidecar on `files`, which must hold a set for [`SERVER`] from `pki`.
    async fn start(pki: TestPki, first: &Workload, files: FileCreds) -> Self {
        let app = tcp_echo().await;
        let policy = format!(
            "mode: enforce\ninbound:\n  - port: {{port0}}\n    protocol: tcp\n    allow:\n      - id: {CLIENT}\n"
        );
        let sidecar = TestSidecar::start(
            &pki,
            first,
            SERVER,
            SidecarSpec {
                inbound: vec![("127.0.0.1", app, Protocol::Tcp)],
                policy: Some(policy),
                creds: Some(CredSource::Files(files)),
                ..Default::default()
            },
        )
        .await;
        let client = pki.workload(CLIENT);
        Self {
            pki,
            sidecar,
            client,
        }
    }

    /// The serial in `/identity`.
    async fn serial(&self) -> Option<String> {
        let admin = self.sidecar.admin;
        let (code, body) = tokio::task::spawn_blocking(move || http_get(admin, "/identity"))
            .await
            .ok()?
            .ok()?;
        if code != 200 {
            return None;
        }
        let json: serde_json::Value = serde_json::from_str(body.split("\r\n\r\n").nth(1)?).ok()?;
        assert_eq!(json["spiffe_id"], SERVER);
        json["serial"].as_str().map(str::to_owned)
    }

    /// `meshid_sidecar_credential_updates_total{result="<result>"}`.
    async fn updates(&self, result: &str) -> u64 {
        let prefix = format!("meshid_sidecar_credential_updates_total{{result=\"{result}\"}} ");
        let text = self.sidecar.metrics().await;
        text.lines()
            .find_map(|l| l.strip_prefix(&prefix))
            .map_or(0, |v| v.trim().parse().unwrap())
    }

    /// `meshid_sidecar_last_renewal_timestamp_seconds`: the current certificate's not-before in
    /// file mode (the chart's `MeshidSidecarCertificateNotRenewed` reads the lifetime from it).
    async fn last_renewal(&self) -> i64 {
        let text = self.sidecar.metrics().await;
        text.lines()
            .find_map(|l| l.strip_prefix("meshid_sidecar_last_renewal_timestamp_seconds "))
            .map_or(0, |v| v.trim().parse().unwrap())
    }

    /// `meshid_sidecar_credentials_rejected`: 1 while the newest files were rejected.
    async fn rejected_now(&self) -> u64 {
        let text = self.sidecar.metrics().await;
        text.lines()
            .find_map(|l| l.strip_prefix("meshid_sidecar_credentials_rejected "))
            .map_or(0, |v| v.trim().parse().unwrap())
    }

    async fn wait_for_updates(&self, result: &str, at_least: u64) {
        let counted = eventually(PATIENCE, || async {
            self.updates(result).await >= at_least
        })
        .await;
        assert!(
            counted,
            "credential_updates{{result={result}}} never reached {at_least}"
        );
    }

    async fn wait_for_serial(&self, serial: &str) {
        let seen = eventually(PATIENCE, || async {
            self.serial().await.as_deref() == Some(serial)
        })
        .await;
        assert!(
            seen,
            "serial {serial} never served: {:?}",
            self.serial().await
        );
    }

    /// Proves mTLS through the sidecar works and that it presents `leaf`.
    async fn serves(&self, leaf: &CertificateDer<'_>) {
        assert!(
            self.presented().await == *leaf,
            "the sidecar presents another leaf"
        );
    }

    /// Proves mTLS through the sidecar works; the leaf it presents.
    async fn presented(&self) -> CertificateDer<'static> {
        let config = client_config(
            &self.pki.roots(),
            &self.pki.trust_domain,
            Some(&self.client),
            &SpiffeId::parse(SERVER).unwrap(),
            &[],
        );
        let addr = self.sidecar.inbound[0];
        let tls = mtls_connect(addr, config.clone()).await.unwrap();
        let presented = tls.get_ref().1.peer_certificates().unwrap()[0].clone();
        let back = echo_roundtrip(addr, config, b"ping").await.unwrap();
        assert_eq!(back, b"ping");
        presented
    }
}

fn serial_of(w: &Workload) -> String {
    cert_identity_from_der(&w.chain[0]).unwrap().serial_hex
}

fn cert_pem(chain: &[CertificateDer<'_>]) -> Vec<u8> {
    chain.iter().map(|c| pem_cert(c)).collect::<String>().into()
}

fn key_pem(key_der: &[u8]) -> Vec<u8> {
    rcgen::KeyPair::try_from(key_der)
        .unwrap()
        .serialize_pem()
        .into()
}

/// Replaces `path` atomically (write a temporary file, rename it over).
fn install(path: &Path, bytes: &[u8]) {
    let tmp = path.with_extension("tmp");
    fs::write(&tmp, bytes).unwrap();
    fs::rename(&tmp, path).unwrap();
}

/// `tls.crt`, `tls.key` and `ca.crt` in `dir`, written from `w` and the CA's bundle.
fn plain_files(pki: &TestPki, dir: &Path, w: &Workload) -> FileCreds {
    let files = FileCreds {
        cert: dir.join("tls.crt"),
        key: dir.join("tls.key"),
        bundle: dir.join("ca.crt"),
    };
    fs::write(&files.cert, cert_pem(&w.chain)).unwrap();
    fs::write(&files.key, key_pem(&w.key_der)).unwrap();
    fs::copy(&pki.bundle_path, &files.bundle).unwrap();
    files
}

/// A renewed certificate for `w`'s key (cert-manager with `rotationPolicy: Never`), issued at
/// `now` by the CA's clock.
fn renew_same_key(pki: &TestPki, w: &Workload, now: OffsetDateTime) -> Workload {
    let key = rcgen::KeyPair::try_from(w.key_der.as_slice()).unwrap();
    let csr = rcgen::CertificateParams::default()
        .serialize_request(&key)
        .unwrap();
    let issued = sign_leaf(
        &pki.authority,
        &SpiffeId::parse(SERVER).unwrap(),
        &CsrPublicKey::from_csr_der(csr.der()).unwrap(),
        Duration::from_secs(3600),
        now,
    )
    .unwrap();
    Workload {
        chain: issued.chain,
        ..w.clone()
    }
}

/// (a) An updater that renames the new key into place, then (later) the new certificate: the
/// half-updated pair is never published, the complete one is.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn file_mode_atomic_rename_of_a_new_pair() {
    let pki = TestPki::new();
    let dir = tempfile::tempdir().unwrap();
    let old = pki.workload(SERVER);
    let files = plain_files(&pki, dir.path(), &old);
    let mesh = Mesh::start(pki, &old, files.clone()).await;
    assert_eq!(mesh.serial().await, Some(serial_of(&old)));
    mesh.serves(&old.chain[0]).await;

    let new = mesh.pki.workload(SERVER);
    install(&files.key, &key_pem(&new.key_der));
    // The old certificate with the new key: refused, the old pair keeps serving.
    mesh.wait_for_updates("rejected", 1).await;
    assert_eq!(mesh.serial().await, Some(serial_of(&old)));
    mesh.serves(&old.chain[0]).await;

    install(&files.cert, &cert_pem(&new.chain));
    mesh.wait_for_serial(&serial_of(&new)).await;
    mesh.serves(&new.chain[0]).await;
    assert_eq!(
        mesh.updates("applied").await,
        2,
        "the first load and the new pair"
    );
}

/// Writes one kubelet payload directory for `w` under `dir` (not yet visible).
fn kubelet_payload(pki: &TestPki, dir: &Path, name: &str, w: &Workload) {
    let payload = dir.join(name);
    fs::create_dir(&payload).unwrap();
    fs::write(payload.join("tls.crt"), cert_pem(&w.chain)).unwrap();
    fs::write(payload.join("tls.key"), key_pem(&w.key_der)).unwrap();
    fs::copy(&pki.bundle_path, payload.join("ca.crt")).unwrap();
}

/// (b) A Secret volume update exactly as kubelet's atomic writer does it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn file_mode_kubernetes_data_symlink_swap() {
    let pki = TestPki::new();
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let old = pki.workload(SERVER);
    kubelet_payload(&pki, d, "..2026_11_22_12_00_00.1", &old);
    symlink("..2026_11_22_12_00_00.1", d.join("..data")).unwrap();
    for name in ["tls.crt", "tls.key", "ca.crt"] {
        symlink(PathBuf::from("..data").join(name), d.join(name)).unwrap();
    }
    let files = FileCreds {
        cert: d.join("tls.crt"),
        key: d.join("tls.key"),
        bundle: d.join("ca.crt"),
    };
    let mesh = Mesh::start(pki, &old, files).await;
    assert_eq!(mesh.serial().await, Some(serial_of(&old)));

    let new = mesh.pki.workload(SERVER);
    kubelet_payload(&mesh.pki, d, "..2026_11_22_13_00_00.1", &new);
    symlink("..2026_11_22_13_00_00.1", d.join("..data_tmp")).unwrap();
    fs::rename(d.join("..data_tmp"), d.join("..data")).unwrap();
    fs::remove_dir_all(d.join("..2026_11_22_12_00_00.1")).unwrap();

    mesh.wait_for_serial(&serial_of(&new)).await;
    mesh.serves(&new.chain[0]).await;
    mesh.wait_for_updates("applied", 2).await;
}

/// (c) A certificate rewritten in place by a writer that stops half-way: refused and counted; once
/// the writer finishes, the new certificate is applied.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn file_mode_torn_write_is_rejected_then_completed() {
    let pki = TestPki::new();
    let dir = tempfile::tempdir().unwrap();
    let old = pki.workload(SERVER);
    let files = plain_files(&pki, dir.path(), &old);
    let mesh = Mesh::start(pki, &old, files.clone()).await;
    assert_eq!(mesh.updates("rejected").await, 0);

    let renewed = renew_same_key(&mesh.pki, &old, OffsetDateTime::now_utc());
    assert_ne!(serial_of(&renewed), serial_of(&old));
    let pem = cert_pem(&renewed.chain);
    let (head, tail) = pem.split_at(pem.len() / 3);
    let mut writer = fs::File::create(&files.cert).unwrap(); // truncates
    writer.write_all(head).unwrap();
    writer.flush().unwrap();

    mesh.wait_for_updates("rejected", 1).await;
    assert_eq!(
        mesh.rejected_now().await,
        1,
        "the gauge says the last good set is in force"
    );
    assert_eq!(mesh.serial().await, Some(serial_of(&old)));
    mesh.serves(&old.chain[0]).await;

    writer.write_all(tail).unwrap();
    drop(writer);
    mesh.wait_for_serial(&serial_of(&renewed)).await;
    mesh.serves(&renewed.chain[0]).await;
    mesh.wait_for_updates("applied", 2).await;
    assert!(
        eventually(PATIENCE, || async { mesh.rejected_now().await == 0 }).await,
        "the gauge goes back to 0 once a set is applied"
    );
}

/// (d) A key that does not match the certificate, then a consistent pair from a CA outside the
/// bundle: both refused, one at a time, while the last good identity keeps serving mTLS.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn file_mode_mismatched_key_and_foreign_cert_keep_the_last_good_set() {
    let pki = TestPki::new();
    let dir = tempfile::tempdir().unwrap();
    let old = pki.workload(SERVER);
    let files = plain_files(&pki, dir.path(), &old);
    let mesh = Mesh::start(pki, &old, files.clone()).await;

    let (foreign_chain, foreign_key) = ForeignCa::new().workload(SERVER);
    install(&files.key, &key_pem(foreign_key.secret_der()));
    mesh.wait_for_updates("rejected", 1).await;
    assert_eq!(mesh.serial().await, Some(serial_of(&old)));
    mesh.serves(&old.chain[0]).await;

    // Now the key matches the certificate, but the certificate does not chain to the bundle.
    install(&files.cert, &cert_pem(&foreign_chain));
    mesh.wait_for_updates("rejected", 2).await;
    assert_eq!(mesh.serial().await, Some(serial_of(&old)));
    mesh.serves(&old.chain[0]).await;
    assert_eq!(mesh.updates("applied").await, 1, "only the first load");
}

/// A bundle file that also holds a certificate that is no CA (a workload's own, pasted in by
/// mistake) is refused whole, the last good set serving on: webpki takes any certificate as an
/// anchor, so before, that workload's key was a root of the trust domain, able to sign any of its
/// identities.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn file_mode_a_bundle_holding_a_workload_certificate_is_refused() {
    let pki = TestPki::new();
    let dir = tempfile::tempdir().unwrap();
    let old = pki.workload(SERVER);
    let files = plain_files(&pki, dir.path(), &old);
    let mesh = Mesh::start(pki, &old, files.clone()).await;
    let pasted = mesh.pki.workload(CLIENT);
    let mut bundle = fs::read(&mesh.pki.bundle_path).unwrap();
    bundle.extend(cert_pem(&pasted.chain[..1]));
    install(&files.bundle, &bundle);
    mesh.wait_for_updates("rejected", 1).await;
    assert_eq!(mesh.serial().await, Some(serial_of(&old)));
    mesh.serves(&old.chain[0]).await;
    assert_eq!(mesh.updates("applied").await, 1, "only the first load");
}

/// (e) A renewal from a rotator whose clock runs 8 s ahead of this node's: not valid yet when it
/// lands, so refused for the moment (counted and logged once) while the old certificate serves;
/// tried again at every poll and served as soon as it is valid.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn file_mode_a_certificate_not_valid_yet_is_applied_once_valid() {
    let pki = TestPki::new();
    let dir = tempfile::tempdir().unwrap();
    let old = pki.workload(SERVER);
    let files = plain_files(&pki, dir.path(), &old);
    let mesh = Mesh::start(pki, &old, files.clone()).await;
    assert_eq!(mesh.last_renewal().await, not_before(&old));

    // The CA backdates not-before; this one starts 8 s from now all the same (7 s at least once
    // cut to whole seconds): room for a loaded machine to see it refused first.
    let ahead = OffsetDateTime::now_utc() + BACKDATE + Duration::from_secs(8);
    let early = renew_same_key(&mesh.pki, &old, ahead);
    let valid_from = not_before(&early);
    let unix_now = || OffsetDateTime::now_utc().unix_timestamp();
    install(&files.cert, &cert_pem(&early.chain));

    // Refused while not valid yet. What is seen is checked only if the clock is still before
    // not-before once it has been seen: past it (a machine stalled for seconds), applying it at
    // once is right, and there is no refusal to see.
    // Applied at once (a sidecar that took a certificate not valid yet) ends the wait too, and
    // then fails the checks below while the clock is still before not-before.
    let before = eventually(PATIENCE, || async {
        mesh.updates("rejected").await >= 1
            || unix_now() >= valid_from
            || mesh.serial().await != Some(serial_of(&old))
    })
    .await;
    assert!(before, "neither refused nor past not-before");
    let (rejected_now, serial) = (mesh.rejected_now().await, mesh.serial().await);
    let presented = mesh.presented().await;
    let refused = mesh.updates("rejected").await >= 1;
    if unix_now() < valid_from {
        assert!(refused, "not refused before not-before");
        assert_eq!(rejected_now, 1);
        assert_eq!(serial, Some(serial_of(&old)));
        assert!(presented == old.chain[0], "the old leaf serves");
    } else {
        eprintln!("not-before passed before the checks: the refusal is not checked");
    }

    // Served within 20 s of not-before, however late the test got there.
    eventually(Duration::from_secs(60), || async {
        mesh.serial().await == Some(serial_of(&early)) || unix_now() >= valid_from + 20
    })
    .await;
    assert_eq!(
        mesh.serial().await,
        Some(serial_of(&early)),
        "never applied"
    );
    mesh.serves(&early.chain[0]).await;
    assert_eq!(
        mesh.updates("applied").await,
        2,
        "the first load and the renewal"
    );
    assert_eq!(
        mesh.updates("rejected").await,
        u64::from(refused),
        "counted once, not at every poll"
    );
    assert_eq!(mesh.rejected_now().await, 0);
    assert_eq!(mesh.last_renewal().await, not_before(&early));
}

/// The leaf's not-before, Unix seconds.
fn not_before(w: &Workload) -> i64 {
    let (_, leaf) = x509_parser::parse_x509_certificate(&w.chain[0]).unwrap();
    leaf.validity().not_before.timestamp()
}

/// Why a file-mode sidecar started on a fresh workload's files, with `key` or `bundle` in their
/// place, did not start (`None`: it started). Started on a thread of its own, so that a start
/// stuck in a read fails the test instead of hanging it.
fn start_error(key: Option<PathBuf>, bundle: Option<PathBuf>) -> Option<String> {
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let pki = TestPki::new();
        let w = pki.workload(SERVER);
        let files = FileCreds {
            cert: w.cert_path.clone(),
            key: key.unwrap_or_else(|| w.key_path.clone()),
            bundle: bundle.unwrap_or_else(|| pki.bundle_path.clone()),
        };
        let spec = SidecarSpec {
            creds: Some(CredSource::Files(files)),
            ..Default::default()
        };
        let runtime = tokio::runtime::Runtime::new().unwrap();
        let error = runtime.block_on(async {
            TestSidecar::try_start(&pki, &w, SERVER, spec)
                .await
                .err()
                .map(|e| e.to_string())
        });
        let _ = tx.send(error);
    });
    rx.recv_timeout(Duration::from_secs(10))
        .expect("the sidecar is still starting after 10 s")
}

/// (f) A key that is a FIFO (a blocking open waits for a writer for ever, with nothing logged)
/// or a bundle that links to /dev/zero (a read that never ends, until memory runs out): the
/// sidecar refuses to start at once, naming the file. (The running watcher meets them too:
/// `meshid_sidecar::creds::files`' unit tests.)
#[test]
fn file_mode_start_refuses_a_fifo_key_or_a_device_bundle() {
    let dir = tempfile::tempdir().unwrap();
    let fifo = dir.path().join("fifo.key");
    let made = std::process::Command::new("mkfifo").arg(&fifo).status();
    assert!(made.is_ok_and(|s| s.success()), "mkfifo");
    let zero = dir.path().join("zero.pem");
    symlink("/dev/zero", &zero).unwrap();
    assert_eq!(start_error(None, None), None, "the files as they are start");
    for (key, bundle, file) in [
        (Some(fifo.clone()), None, &fifo),
        (None, Some(zero.clone()), &zero),
    ] {
        let error = start_error(key, bundle).expect("refused");
        assert!(
            error.contains(&format!(
                "credentials: {}: not a regular file",
                file.display()
            )),
            "{error}"
        );
    }
}

/// `meshid-sidecar check-policy`: a valid file is summarised (exit 0); a caller is decided as the
/// running sidecar would (allow 0, deny 2, naming the rule); a broken file exits 1 naming the line;
/// bad arguments exit 64; a pod's annotations file is read like a policy.
#[test]
fn check_policy_validates_files_and_decides_callers() {
    let dir = tempfile::tempdir().unwrap();
    let policy = dir.path().join("policy.yaml");
    fs::write(
        &policy,
        "mode: enforce\ninbound:\n  - port: 8080\n    protocol: http\n    allow:\n      - id: spiffe://cluster.local/ns/shop/sa/frontend\n      - id: spiffe://cluster.local/ns/ops/sa/*\n        methods: [GET]\n        paths: [/metrics]\n  - port: 9000\n    protocol: tcp\n    allow:\n      - id: spiffe://cluster.local/ns/shop/sa/backend\n",
    )
    .unwrap();
    let check = |args: &[&str]| {
        let out = std::process::Command::new(meshid_tests::tools::workspace_bin("meshid-sidecar"))
            .arg("check-policy")
            .args(args)
            .output()
            .unwrap();
        (
            out.status.code(),
            String::from_utf8_lossy(&out.stdout).into_owned(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    };
    let file = policy.to_str().unwrap();
    let (code, out, _) = check(&[file]);
    assert_eq!(code, Some(0), "{out}");
    assert!(
        out.contains("port 8080 (http): 2 rules") && out.contains("port 9000 (tcp): 1 rule"),
        "{out}"
    );

    let prom = "spiffe://cluster.local/ns/ops/sa/prometheus";
    let cases: [(&[&str], i32, &str); 6] = [
        (
            &["--peer", prom, "--port", "8080", "--path", "/metrics"],
            0,
            "allow: rule 1 (spiffe://cluster.local/ns/ops/sa/*",
        ),
        (
            &[
                "--peer", prom, "--port", "8080", "--method", "POST", "--path", "/metrics",
            ],
            2,
            "deny: no rule matched",
        ),
        (
            &[
                "--peer",
                prom,
                "--port",
                "8080",
                "--path",
                "/metrics/../admin",
            ],
            2,
            "deny: unsafe request path",
        ),
        (
            &[
                "--peer",
                "spiffe://cluster.local/ns/shop/sa/backend",
                "--port",
                "9000",
            ],
            0,
            "connection: allow: rule 0",
        ),
        (
            &[
                "--peer",
                "spiffe://cluster.local/ns/shop/sa/frontend",
                "--port",
                "9000",
            ],
            2,
            "connection: deny: no rule matched",
        ),
        (
            &[
                "--peer",
                "spiffe://cluster.local/ns/shop/sa/frontend",
                "--port",
                "7000",
            ],
            2,
            "deny: port not in policy",
        ),
    ];
    for (args, want, says) in cases {
        let mut argv = vec![file];
        argv.extend_from_slice(args);
        let (code, out, err) = check(&argv);
        assert_eq!(code, Some(want), "{args:?}: {out}{err}");
        assert!(out.contains(says), "{args:?}: {out}");
    }

    // Broken files name the problem and the line; the sidecar would refuse them the same way.
    let broken = dir.path().join("broken.yaml");
    fs::write(&broken, "inbound:\n  - port: 80\n    protocl: http\n").unwrap();
    let (code, _, err) = check(&[broken.to_str().unwrap()]);
    assert_eq!(code, Some(1));
    assert!(err.contains("line 3") && err.contains("protocl"), "{err}");
    let (code, _, err) = check(&[dir.path().join("missing").to_str().unwrap()]);
    assert_eq!(code, Some(1), "{err}");
    let (code, _, err) = check(&[file, "--peer", "not-an-id", "--port", "80"]);
    assert_eq!(code, Some(64), "{err}");
    let (code, _, _) = check(&[file, "--peer", prom]);
    assert_eq!(code, Some(64), "--peer needs --port");

    // Checked against the sidecar's listeners: a port whose protocol disagrees is refused (exit 1,
    // naming the port), as `run` refuses it; listeners that agree pass; bad listener syntax is 64.
    let (code, out, err) = check(&[
        file,
        "--inbound",
        "0.0.0.0:8080=127.0.0.1:8080,http",
        "--inbound",
        "0.0.0.0:9000=127.0.0.1:9000,tcp",
    ]);
    assert_eq!(code, Some(0), "{out}{err}");
    for (listener, port) in [
        ("0.0.0.0:8080=127.0.0.1:8080,tcp", "8080"),
        ("0.0.0.0:9000=127.0.0.1:9000,http", "9000"),
    ] {
        let (code, _, err) = check(&[file, "--inbound", listener]);
        assert_eq!(code, Some(1), "{listener}: {err}");
        assert!(err.contains(&format!("inbound port {port}")), "{err}");
    }
    let (code, _, err) = check(&[file, "--inbound", "nonsense"]);
    assert_eq!(code, Some(64), "{err}");

    // A pod's downward-API annotations file, as the injected sidecar reads it.
    let annotations = dir.path().join("annotations");
    fs::write(
        &annotations,
        "meshid.io/inbound=\"8080=http\"\nmeshid.io/allow-8080=\"spiffe://cluster.local/ns/shop/sa/frontend\"\n",
    )
    .unwrap();
    let ann = annotations.to_str().unwrap();
    let (code, out, err) = check(&[
        ann,
        "--peer",
        "spiffe://cluster.local/ns/shop/sa/frontend",
        "--port",
        "8080",
        "--path",
        "/",
    ]);
    assert_eq!(code, Some(0), "{out}{err}");
    assert!(out.contains("port 8080 (http): 1 rule"), "{out}");
}

/// `meshid-sidecar check-policy` on a file with several mistakes reports each one on its own line
/// with its line and column (exit 1); rules that can never match are warned about without failing
/// (exit 0); a good file still says OK with no warning.
#[test]
fn check_policy_reports_every_error_and_warns_about_dead_rules() {
    let dir = tempfile::tempdir().unwrap();
    let check = |name: &str, text: &str, args: &[&str]| {
        let file = dir.path().join(name);
        fs::write(&file, text).unwrap();
        let out = std::process::Command::new(meshid_tests::tools::workspace_bin("meshid-sidecar"))
            .arg("check-policy")
            .arg(&file)
            .args(args)
            .output()
            .unwrap();
        (
            out.status.code(),
            String::from_utf8_lossy(&out.stdout).into_owned(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    };

    // Three mistakes: a misspelt protocol, a partial wildcard, a port listed twice.
    let three = "\
mode: enforce
inbound:
  - port: 8080
    protocol: htp
    allow:
      - id: spiffe://cluster.local/ns/shop/sa/frontend
      - id: spiffe://cluster.local/ns/ops/sa/x*
  - port: 8080
    allow: []
";
    let (code, out, err) = check("three.yaml", three, &[]);
    assert_eq!(code, Some(1), "{out}{err}");
    let errors: Vec<&str> = err.lines().filter(|l| l.starts_with("error: ")).collect();
    assert_eq!(errors.len(), 3, "{err}");
    for (line, (position, field)) in errors.iter().zip([
        ("line 4 column 15", "inbound[0].protocol"),
        ("line 7 column 13", "inbound[0].allow[1].id"),
        ("line 8 column 11", "inbound[1].port"),
    ]) {
        assert!(
            line.contains(&format!("three.yaml: {position}: {field}: ")),
            "{line}"
        );
    }
    assert!(
        err.contains("3 errors; the sidecar refuses this file"),
        "{err}"
    );
    assert!(out.is_empty(), "{out}");

    // An allow entry in another trust domain: a warning, exit 0; named by line and column.
    let foreign = "\
inbound:
  - port: 8080
    allow:
      - id: spiffe://cluster.local/ns/shop/sa/frontend
      - id: spiffe://partner.example/ns/shop/sa/frontend
";
    let (code, out, err) = check(
        "foreign.yaml",
        foreign,
        &["--trust-domain", "cluster.local"],
    );
    assert_eq!(code, Some(0), "{out}{err}");
    assert!(out.starts_with("policy OK: mode enforce\n"), "{out}");
    let warnings: Vec<&str> = out.lines().filter(|l| l.starts_with("warning: ")).collect();
    assert_eq!(warnings.len(), 1, "{out}");
    assert!(
        warnings[0].starts_with("warning: line 5 column 13: port 8080 rule 1: ")
            && warnings[0]
                .contains("trust domain `partner.example`, not this sidecar's `cluster.local`"),
        "{out}"
    );
    // Without --trust-domain, the two trust domains are still pointed out.
    let (code, out, _) = check("foreign.yaml", foreign, &[]);
    assert_eq!(code, Some(0), "{out}");
    assert!(
        out.contains("warning: the rules name 2 trust domains"),
        "{out}"
    );
    assert_eq!(
        check("foreign.yaml", foreign, &["--trust-domain", "Bad_Domain"]).0,
        Some(64)
    );

    // Duplicates, shadowing and a port without a listener: warnings too.
    let dead = "\
inbound:
  - port: 8080
    protocol: http
    allow:
      - id: spiffe://cluster.local/ns/ops/sa/*
      - id: spiffe://cluster.local/ns/ops/sa/prometheus
        paths: [/metrics]
      - id: spiffe://cluster.local/ns/shop/sa/frontend
      - id: spiffe://cluster.local/ns/shop/sa/frontend
  - port: 9000
    allow: []
";
    let listener = ["--inbound", "0.0.0.0:8080=127.0.0.1:8080,http"];
    let (code, out, _) = check("dead.yaml", dead, &listener);
    assert_eq!(code, Some(0), "{out}");
    for needle in [
        "warning: line 6 column 13: port 8080 rule 1: ",
        "warning: line 9 column 13: port 8080 rule 3: spiffe://cluster.local/ns/shop/sa/frontend is a duplicate of rule 2",
        "warning: line 10 column 11: port 9000: no inbound listener has port 9000",
    ] {
        assert!(out.contains(needle), "{needle:?} not in {out}");
    }

    // A good file: OK, no warning.
    let good = "\
inbound:
  - port: 8080
    protocol: http
    allow:
      - id: spiffe://cluster.local/ns/shop/sa/frontend
      - id: spiffe://cluster.local/ns/ops/sa/*
        methods: [GET]
        paths: [/metrics]
";
    let (code, out, err) = check(
        "good.yaml",
        good,
        &["--trust-domain", "cluster.local", listener[0], listener[1]],
    );
    assert_eq!(code, Some(0), "{out}{err}");
    assert_eq!(
        out,
        "policy OK: mode enforce\n  port 8080 (http): 2 rules\n"
    );
    assert!(err.is_empty(), "{err}");

    // Annotations: every bad annotation, each with its line.
    let annotations = "meshid.io/allow-8080=\"spiffe://cluster.local/ns/a/sa/x*\"\nmeshid.io/inbound=\"8080=http\"\nmeshid.io/mode=\"strict\"\n";
    let (code, _, err) = check("annotations", annotations, &[]);
    assert_eq!(code, Some(1), "{err}");
    assert!(
        err.contains("line 1: annotation meshid.io/allow-8080: "),
        "{err}"
    );
    assert!(err.contains("line 3: annotation meshid.io/mode: "), "{err}");
    assert!(err.contains("2 errors"), "{err}");
}
