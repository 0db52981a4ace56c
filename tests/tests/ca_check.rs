//! `meshid-ca check` against a real `meshid-ca serve` process, a fake API server (the webhook
//! configuration, the trust-bundle ConfigMap, the service-account issuer) and a TLS server standing
//! for the injector: a healthy install passes every check; each fault breaks its own check, with a
//! fix; garbage from the network is an error, never a panic.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Arc;
use std::time::Duration;

use base64::Engine;
use meshid_tests::fake_apiserver::{Answer, FakeApiServer, test_ca};
use meshid_tests::fake_cluster::{self, FakeCluster};
use meshid_tests::process::{Proc, ca_mode_sidecar, free_addr, wait_http_ok};
use meshid_tests::tools::workspace_bin;
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};
use serde_json::{Value, json};
use tokio::io::AsyncWriteExt;
use tokio::net::TcpListener;

const INJECTOR_DNS: &str = "meshid-injector.meshid.svc";
const MWC_PATH: &str =
    "/apis/admissionregistration.k8s.io/v1/mutatingwebhookconfigurations/meshid-injector";
const CONFIGMAP_PATH: &str = "/api/v1/namespaces/meshid/configmaps/meshid-trust-bundle";

fn meshid_ca(args: &[&str]) -> (Option<i32>, String, String) {
    let out = Command::new(workspace_bin("meshid-ca"))
        .args(args)
        .env_remove("KUBERNETES_SERVICE_HOST")
        .env("NO_COLOR", "1")
        .output()
        .expect("run meshid-ca");
    (
        out.status.code(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// A TLS server presenting `chain_pem`/`key_pem` (the injector, as far as the check can tell).
async fn tls_server(chain_pem: &[u8], key_pem: &[u8]) -> (SocketAddr, tokio::task::JoinHandle<()>) {
    let chain: Vec<CertificateDer<'static>> = CertificateDer::pem_slice_iter(chain_pem)
        .collect::<Result<_, _>>()
        .unwrap();
    let key = PrivateKeyDer::from_pem_slice(key_pem).unwrap();
    let config = rustls::ServerConfig::builder_with_provider(Arc::new(
        rustls::crypto::aws_lc_rs::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .unwrap()
    .with_no_client_auth()
    .with_single_cert(chain, key)
    .unwrap();
    let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(config));
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let task = tokio::spawn(async move {
        while let Ok((tcp, _)) = listener.accept().await {
            let acceptor = acceptor.clone();
            tokio::spawn(async move {
                if let Ok(mut tls) = acceptor.accept(tcp).await {
                    let _ = tls.shutdown().await;
                }
            });
        }
    });
    (addr, task)
}

/// A TCP server answering every connection with junk.
async fn junk_server() -> (SocketAddr, tokio::task::JoinHandle<()>) {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let task = tokio::spawn(async move {
        while let Ok((mut tcp, _)) = listener.accept().await {
            let _ = tcp
                .write_all(b"\x16\x03\x01\xff\xffHTTP/9.9 ??? \x00\x01\r\n\r\n{{{{\xff\xfe")
                .await;
            let _ = tcp.shutdown().await;
        }
    });
    (addr, task)
}

/// A mesh as the chart installs it: a CA process, an injector certificate, the API server's objects.
struct Install {
    dir: tempfile::TempDir,
    ca: Proc,
    admin: SocketAddr,
    grpc: SocketAddr,
    api: FakeApiServer,
    cluster: FakeCluster,
    injector: SocketAddr,
    _injector_task: tokio::task::JoinHandle<()>,
    /// A sidecar in CA mode (a service-account token) and its admin address.
    _sidecar: Option<Proc>,
    sidecar_admin: Option<SocketAddr>,
}

impl Install {
    async fn start() -> Self {
        Self::start_with_issuer(fake_cluster::ISSUER).await
    }

    /// An install whose CA expects tokens from `issuer` (`--issuer`); with a sidecar when that is
    /// the cluster's issuer (otherwise it could get no certificate).
    async fn start_with_issuer(issuer: &str) -> Self {
        let dir = tempfile::tempdir().unwrap();
        let ca_dir = dir.path().join("ca");
        let ca_dir_s = ca_dir.to_str().unwrap().to_owned();
        let (code, out, err) = meshid_ca(&["init", "--dir", &ca_dir_s]);
        assert_eq!(code, Some(0), "{out}{err}");
        let cluster = FakeCluster::new();
        let jwks = dir.path().join("jwks.json");
        cluster.write_jwks(&jwks);
        let (admin, grpc) = (free_addr("127.0.0.1"), free_addr("127.0.0.1"));
        let ca = Proc::spawn(
            "meshid-ca",
            Command::new(workspace_bin("meshid-ca"))
                .args(["serve", "--dir", &ca_dir_s, "--san", "localhost"])
                .args(["--listen", &grpc.to_string()])
                .args(["--admin-listen", &admin.to_string()])
                .args(["--jwks", jwks.to_str().unwrap()])
                .args(["--issuer", issuer, "--grace", "1s"]),
        );
        assert!(wait_http_ok(admin, "/readyz", Duration::from_secs(20)));

        let api = FakeApiServer::start(Answer::Json(cluster.jwks())).await;
        let bundle = std::fs::read_to_string(ca_dir.join("bundle.pem")).unwrap();
        api.serve(
            CONFIGMAP_PATH,
            Answer::Json(json!({"kind": "ConfigMap", "data": {"bundle.pem": bundle}})),
        );
        api.serve(MWC_PATH, Answer::Json(webhook_configuration(&bundle)));
        let (injector, task) = Self::injector_with(&ca_dir, INJECTOR_DNS, "365d").await;
        let (sidecar, sidecar_admin) = if issuer == fake_cluster::ISSUER {
            let token = dir.path().join("token");
            std::fs::write(&token, cluster.token("shop", "frontend")).unwrap();
            let admin = free_addr("127.0.0.1");
            let sidecar = Proc::spawn(
                "meshid-sidecar",
                ca_mode_sidecar(
                    grpc,
                    &ca_dir.join("bundle.pem"),
                    "--token-file",
                    &token,
                    admin,
                )
                .arg("--outbound")
                .arg(format!(
                    "{}=127.0.0.1:9,spiffe://cluster.local/ns/shop/sa/payments",
                    free_addr("127.0.0.1")
                )),
            );
            assert!(wait_http_ok(admin, "/readyz", Duration::from_secs(20)));
            (Some(sidecar), Some(admin))
        } else {
            (None, None)
        };
        Self {
            dir,
            ca,
            admin,
            grpc,
            api,
            cluster,
            injector,
            _injector_task: task,
            _sidecar: sidecar,
            sidecar_admin,
        }
    }

    /// An injector serving a certificate from `meshid-ca webhook-cert --dns dns --ttl ttl`.
    async fn injector_with(
        ca_dir: &Path,
        dns: &str,
        ttl: &str,
    ) -> (SocketAddr, tokio::task::JoinHandle<()>) {
        let out_dir = ca_dir
            .parent()
            .unwrap()
            .join(format!("injector-{dns}-{ttl}"));
        let (code, out, err) = meshid_ca(&[
            "webhook-cert",
            "--dir",
            ca_dir.to_str().unwrap(),
            "--dns",
            dns,
            "--ttl",
            ttl,
            "--out-dir",
            out_dir.to_str().unwrap(),
        ]);
        assert_eq!(code, Some(0), "{out}{err}");
        tls_server(
            &std::fs::read(out_dir.join("tls.crt")).unwrap(),
            &std::fs::read(out_dir.join("tls.key")).unwrap(),
        )
        .await
    }

    fn ca_dir(&self) -> PathBuf {
        self.dir.path().join("ca")
    }

    /// The flags pointing `check` at this install, as (flag, value).
    fn flags(&self) -> Vec<(String, String)> {
        [
            ("--admin", self.admin.to_string()),
            ("--dir", self.ca_dir().display().to_string()),
            ("--ca-addr", self.grpc.to_string()),
            ("--ca-name", "localhost".to_owned()),
            ("--kube-api", self.api.url()),
            (
                "--kube-token-file",
                self.api.token_file.display().to_string(),
            ),
            ("--kube-ca-file", self.api.ca_file.display().to_string()),
            ("--injector-addr", self.injector.to_string()),
            ("--timeout", "3s".to_owned()),
        ]
        .into_iter()
        .chain(
            self.sidecar_admin
                .map(|a| ("--sidecar-admin", a.to_string())),
        )
        .map(|(f, v)| (f.to_owned(), v))
        .collect()
    }

    /// `check` with the install's flags, those named in `extra` replaced by `extra`'s.
    fn args(&self, extra: &[&str]) -> Vec<String> {
        let mut args = vec!["check".to_owned()];
        for (flag, value) in self.flags() {
            if !extra.contains(&flag.as_str()) {
                args.extend([flag, value]);
            }
        }
        args.extend(extra.iter().map(|s| (*s).to_owned()));
        args
    }

    /// Runs `check` with the install's flags and `extra`, as JSON.
    async fn check(&self, extra: &[&str]) -> Outcome {
        let mut args = self.args(extra);
        args.extend(["--output".to_owned(), "json".to_owned()]);
        let (code, out, err) = tokio::task::spawn_blocking(move || {
            let args: Vec<&str> = args.iter().map(String::as_str).collect();
            meshid_ca(&args)
        })
        .await
        .unwrap();
        assert!(!err.contains("panicked"), "{err}");
        let report: Value =
            serde_json::from_str(&out).unwrap_or_else(|e| panic!("{e}: {out}\n{err}"));
        let findings = report["findings"]
            .as_array()
            .unwrap()
            .iter()
            .map(|f| {
                (
                    f["check"].as_str().unwrap().to_owned(),
                    (
                        f["status"].as_str().unwrap().to_owned(),
                        f["summary"].as_str().unwrap().to_owned(),
                        f["fix"].as_str().unwrap_or("").to_owned(),
                    ),
                )
            })
            .collect();
        Outcome {
            code,
            findings,
            text: format!("{out}{err}"),
        }
    }
}

fn webhook_configuration(ca_bundle_pem: &str) -> Value {
    let b64 = base64::engine::general_purpose::STANDARD.encode(ca_bundle_pem);
    let entry = |name: &str, path: &str| {
        json!({
            "name": name,
            "admissionReviewVersions": ["v1"],
            "clientConfig": {
                "service": {"name": "meshid-injector", "namespace": "meshid", "path": path, "port": 443},
                "caBundle": b64,
            },
        })
    };
    json!({
        "apiVersion": "admissionregistration.k8s.io/v1",
        "kind": "MutatingWebhookConfiguration",
        "metadata": {"name": "meshid-injector"},
        "webhooks": [entry("namespace.inject.meshid.io", "/inject-namespace"), entry("pod.inject.meshid.io", "/inject")],
    })
}

struct Outcome {
    code: Option<i32>,
    /// check -> (status, summary, fix)
    findings: BTreeMap<String, (String, String, String)>,
    text: String,
}

const ALL: [&str; 9] = [
    "ca-admin",
    "ca-tls",
    "rotation",
    "ca-expiry",
    "webhook",
    "webhook-expiry",
    "jwks",
    "sidecars",
    "sidecar-certs",
];

impl Outcome {
    fn status(&self, check: &str) -> &str {
        &self.findings[check].0
    }

    /// `broken` has `status` with a fix containing `fix`; every other check is ok.
    fn only(&self, broken: &str, status: &str, summary: &str, fix: &str) {
        let (s, sum, f) = &self.findings[broken];
        assert_eq!(s, status, "{broken}: {}", self.text);
        assert!(
            sum.contains(summary),
            "{broken} summary {sum:?} lacks {summary:?}"
        );
        assert!(f.contains(fix), "{broken} fix {f:?} lacks {fix:?}");
        // sidecar-certs runs only with --sidecar-admin.
        let optional = |c: &str| c == "sidecar-certs" && !self.findings.contains_key(c);
        for check in ALL.iter().filter(|c| **c != broken && !optional(c)) {
            assert_eq!(self.status(check), "ok", "{check}: {}", self.text);
        }
        let expected = if status == "fail" { Some(1) } else { Some(0) };
        assert_eq!(self.code, expected, "{}", self.text);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_healthy_install_passes_and_each_fault_breaks_its_own_check() {
    let install = Install::start().await;

    // The sidecar acknowledges the bundle once its stream is open.
    let deadline = std::time::Instant::now() + Duration::from_secs(15);
    let healthy = loop {
        let outcome = install.check(&[]).await;
        if outcome.findings["sidecars"].1.starts_with("1 connected")
            || std::time::Instant::now() > deadline
        {
            break outcome;
        }
        tokio::time::sleep(Duration::from_millis(300)).await;
    };
    assert!(
        healthy.findings["sidecars"]
            .1
            .starts_with("1 connected sidecar(s), all on trust bundle v1"),
        "{}",
        healthy.text
    );
    assert_eq!(healthy.code, Some(0), "{}", healthy.text);
    for check in ALL {
        assert_eq!(healthy.status(check), "ok", "{check}: {}", healthy.text);
    }
    // Plain text off a terminal: words, no escape codes, the counts at the end.
    let args = install.args(&[]);
    let (code, out, _) = meshid_ca(&args.iter().map(String::as_str).collect::<Vec<_>>());
    assert_eq!(code, Some(0), "{out}");
    assert!(
        out.contains("ok   ca-admin ") && !out.contains('\x1b'),
        "{out}"
    );
    assert!(
        out.ends_with("9 ok, 0 warnings, 0 failed, 0 skipped\n"),
        "{out}"
    );

    // The webhook's caBundle from another CA.
    let (other_ca, _) = test_ca("another CA");
    install
        .api
        .serve(MWC_PATH, Answer::Json(webhook_configuration(&other_ca)));
    install.check(&[]).await.only(
        "webhook",
        "fail",
        "does not chain to the webhook's caBundle",
        "caBundle",
    );
    let bundle = std::fs::read_to_string(install.ca_dir().join("bundle.pem")).unwrap();
    install
        .api
        .serve(MWC_PATH, Answer::Json(webhook_configuration(&bundle)));

    // The injector's certificate for another name than the Service the webhook calls.
    let (wrong_name, _t) =
        Install::injector_with(&install.ca_dir(), "other.meshid.svc", "365d").await;
    install
        .check(&["--injector-addr", &wrong_name.to_string()])
        .await
        .only(
            "webhook",
            "fail",
            "covers other.meshid.svc, not meshid-injector.meshid.svc",
            "--dns meshid-injector.meshid.svc",
        );

    // The injector's certificate near its expiry (the chart's alert: 14 days).
    let (short, _t) = Install::injector_with(&install.ca_dir(), INJECTOR_DNS, "2h").await;
    install
        .check(&["--injector-addr", &short.to_string()])
        .await
        .only(
            "webhook-expiry",
            "warn",
            "serving certificate expires in",
            "meshid-ca webhook-cert",
        );

    // The CA's intermediate within a (raised) warning threshold.
    install.check(&["--warn-intermediate", "400d"]).await.only(
        "ca-expiry",
        "warn",
        "the signing intermediate expires in",
        "rotate intermediate",
    );

    // The cluster signs with a key the CA does not have (a rollover it missed).
    let mut rolled = install.cluster.jwks();
    let mut extra = rolled["keys"][0].clone();
    extra["kid"] = json!("rolled-key-2");
    rolled["keys"].as_array_mut().unwrap().push(extra);
    install.api.answer(Answer::Json(rolled));
    install.check(&[]).await.only(
        "jwks",
        "fail",
        "rolled-key-2",
        "kubectl get --raw /openid/v1/jwks",
    );
    install.api.answer(Answer::Json(install.cluster.jwks()));

    // A rotation left half-done: a prepared authority (the CA follows its directory within a
    // second).
    let (code, out, err) = meshid_ca(&[
        "rotate",
        "prepare",
        "--dir",
        install.ca_dir().to_str().unwrap(),
    ]);
    assert_eq!(code, Some(0), "{out}{err}");
    let deadline = std::time::Instant::now() + Duration::from_secs(15);
    let outcome = loop {
        let outcome = install.check(&[]).await;
        let settled = outcome.status("rotation") != "ok" && outcome.status("sidecars") == "ok";
        if settled || std::time::Instant::now() > deadline {
            break outcome;
        }
        tokio::time::sleep(Duration::from_millis(300)).await;
    };
    outcome.only(
        "rotation",
        "warn",
        "authority 2 is prepared",
        "rotate status",
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_ca_expecting_another_issuer_fails_the_jwks_check() {
    let install = Install::start_with_issuer("https://issuer.example").await;
    install.check(&[]).await.only(
        "jwks",
        "fail",
        "expects tokens from issuer \"https://issuer.example\"",
        "--issuer to https://kubernetes.default.svc.cluster.local",
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_expired_webhook_certificate_and_an_unreachable_ca_fail_with_a_fix() {
    let mut install = Install::start().await;

    // An expired injector certificate, issued by the mesh intermediate for the right name.
    let ca_dir = install.ca_dir();
    let issuer = rcgen::Issuer::from_ca_cert_pem(
        &std::fs::read_to_string(ca_dir.join("intermediate.pem")).unwrap(),
        rcgen::KeyPair::from_pem(
            &std::fs::read_to_string(ca_dir.join("intermediate.key")).unwrap(),
        )
        .unwrap(),
    )
    .unwrap();
    let key = rcgen::KeyPair::generate().unwrap();
    let mut params = rcgen::CertificateParams::new(vec![INJECTOR_DNS.to_owned()]).unwrap();
    let now = time::OffsetDateTime::now_utc();
    params.not_before = now - time::Duration::days(10);
    params.not_after = now - time::Duration::days(1);
    let leaf = params.signed_by(&key, &issuer).unwrap();
    let chain = format!(
        "{}{}",
        leaf.pem(),
        std::fs::read_to_string(ca_dir.join("intermediate.pem")).unwrap()
    );
    let (expired, _t) = tls_server(chain.as_bytes(), key.serialize_pem().as_bytes()).await;
    install
        .check(&["--injector-addr", &expired.to_string()])
        .await
        .only(
            "webhook-expiry",
            "fail",
            "expired 1d",
            "meshid-ca webhook-cert",
        );

    // The CA down: its own checks fail with where to look; nothing is reported as passing that
    // could not be checked.
    install.ca.signal("TERM");
    assert!(install.ca.wait_timeout(Duration::from_secs(10)).is_some());
    let down = install.check(&[]).await;
    assert_eq!(down.code, Some(1), "{}", down.text);
    for check in ["ca-admin", "ca-tls"] {
        let (status, summary, fix) = &down.findings[check];
        assert_eq!(status, "fail", "{check}: {}", down.text);
        assert!(summary.contains("cannot connect"), "{summary}");
        assert!(fix.contains("kubectl -n meshid get pods"), "{fix}");
    }
    for check in ["rotation", "jwks", "sidecars"] {
        assert_eq!(down.status(check), "skip", "{check}: {}", down.text);
    }
    for check in ["webhook", "webhook-expiry", "ca-expiry"] {
        assert_eq!(down.status(check), "ok", "{check}: {}", down.text);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn garbage_from_the_network_is_a_clear_error() {
    let install = Install::start().await;
    let (junk, _t) = junk_server().await;
    let junk = junk.to_string();
    // Junk where the CA's admin port, its gRPC port and the injector should be.
    let out = install
        .check(&[
            "--admin",
            &junk,
            "--ca-addr",
            &junk,
            "--injector-addr",
            &junk,
        ])
        .await;
    assert_eq!(out.code, Some(1), "{}", out.text);
    for check in ["ca-admin", "ca-tls", "webhook"] {
        assert_eq!(out.status(check), "fail", "{check}: {}", out.text);
    }
    assert!(
        out.findings["ca-tls"].1.contains("TLS handshake"),
        "{}",
        out.text
    );

    // A token that may not read the webhook configuration: that check is skipped, with why.
    install.api.serve(
        MWC_PATH,
        Answer::Raw(403, br#"{"kind":"Status","code":403}"#.to_vec()),
    );
    let out = install.check(&[]).await;
    let (status, summary, _) = &out.findings["webhook"];
    assert_eq!(status, "skip", "{}", out.text);
    assert!(
        summary.contains("403") && summary.contains("ClusterRole"),
        "{summary}"
    );

    // Junk from the API server: a webhook configuration, a ConfigMap and keys that are not JSON.
    install.api.serve(
        MWC_PATH,
        Answer::Raw(200, b"\xff\xfe not json {{{".to_vec()),
    );
    install.api.serve(
        CONFIGMAP_PATH,
        Answer::Json(json!({"data": {"bundle.pem": "-----BEGIN CERTIFICATE-----\nAAAA\n"}})),
    );
    install.api.answer(Answer::Raw(200, b"[1,2,3]".to_vec()));
    let out = install.check(&[]).await;
    assert_eq!(out.code, Some(1), "{}", out.text);
    assert!(
        out.findings["webhook"]
            .1
            .contains("not a MutatingWebhookConfiguration"),
        "{}",
        out.text
    );
    assert!(
        out.findings["jwks"].1.contains("not a JWKS"),
        "{}",
        out.text
    );
    assert!(
        out.findings["ca-tls"].1.contains("trust bundle"),
        "{}",
        out.text
    );
    for check in ["webhook", "jwks", "ca-tls"] {
        assert_eq!(out.status(check), "fail", "{check}: {}", out.text);
    }
}

#[test]
fn bad_flags_exit_64_naming_each() {
    let (code, out, err) = meshid_ca(&[
        "check",
        "--admin",
        "no-port",
        "--timeout",
        "soon",
        "--kube-api",
        "http://insecure",
    ]);
    assert_eq!(code, Some(64), "{out}{err}");
    for flag in ["--admin: ", "--timeout: ", "--kube-api: "] {
        assert!(err.contains(flag), "{flag}: {err}");
    }
}
