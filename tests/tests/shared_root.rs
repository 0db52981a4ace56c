//! An imported enterprise root is shared with other issuing CAs. Trust under it is pinned to the
//! mesh's own intermediates: a sibling CA under the same root that mints certificates with our
//! SPIFFE IDs is refused by a real sidecar's inbound and by a real CA (handshake and renewal), while
//! the mesh's own certificates keep working. Real `meshid-ca` and `meshid-sidecar` processes.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::process::Command;
use std::sync::Arc;
use std::time::Duration;

use meshid_identity::verify::{Anchors, SpiffeServerVerifier};
use meshid_identity::{SpiffeId, TrustDomain};
use meshid_proto::ca::v1::{GetTrustBundleRequest, IssueRequest, issue_request::Credential};
use meshid_tests::fake_cluster::FakeCluster;
use meshid_tests::mesh::{eventually, handshake_failures};
use meshid_tests::pki::{EnterpriseRoot, WorkloadKey};
use meshid_tests::process::{Proc, ca_mode_sidecar, free_addr, http_get, wait_http_ok};
use meshid_tests::rotation_cli::{meshid_ca, read_roots};
use meshid_tests::tools::workspace_bin;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

const A: &str = "spiffe://cluster.local/ns/shop/sa/frontend";
const B: &str = "spiffe://cluster.local/ns/shop/sa/backend";

/// Sends `msg` to `addr` over mTLS as `chain`/`key`, expecting the server to be `B`; returns what
/// came back, or the error text.
async fn echo_as(
    addr: std::net::SocketAddr,
    anchors: &Anchors,
    chain: Vec<CertificateDer<'static>>,
    key: PrivateKeyDer<'static>,
    msg: &[u8],
) -> Result<Vec<u8>, String> {
    let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
    let verifier =
        SpiffeServerVerifier::new(anchors.clone(), SpiffeId::parse(B).unwrap(), &provider);
    let config = rustls::ClientConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13])
        .unwrap()
        .dangerous()
        .with_custom_certificate_verifier(Arc::new(verifier))
        .with_client_auth_cert(chain, key)
        .unwrap();
    let tcp = tokio::net::TcpStream::connect(addr)
        .await
        .map_err(|e| e.to_string())?;
    let mut tls = tokio_rustls::TlsConnector::from(Arc::new(config))
        .connect(ServerName::try_from("sidecar.invalid").unwrap(), tcp)
        .await
        .map_err(|e| e.to_string())?;
    tls.write_all(msg).await.map_err(|e| e.to_string())?;
    tls.shutdown().await.map_err(|e| e.to_string())?;
    let mut back = Vec::new();
    match tokio::time::timeout(Duration::from_secs(10), tls.read_to_end(&mut back)).await {
        Ok(Ok(_)) => Ok(back),
        Ok(Err(e)) => Err(e.to_string()),
        Err(_) => Err("timed out".into()),
    }
}

/// `meshid-ca bundle --dir DIR` written to a file beside `dir`.
fn bootstrap_bundle(dir: &std::path::Path) -> std::path::PathBuf {
    let out = Command::new(workspace_bin("meshid-ca"))
        .args(["bundle", "--dir"])
        .arg(dir)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let path = dir.with_file_name("bootstrap-bundle.pem");
    std::fs::write(&path, &out.stdout).unwrap();
    path
}

/// An imported CA directory in `work`/ca, its enterprise root beside it.
fn imported_ca(work: &std::path::Path) -> (std::path::PathBuf, EnterpriseRoot) {
    let dir = work.join("ca");
    let enterprise = EnterpriseRoot::new();
    let (root_cert, root_key) = (work.join("root.pem"), work.join("root.key"));
    std::fs::write(&root_cert, &enterprise.cert_pem).unwrap();
    std::fs::write(&root_key, &enterprise.key_pem).unwrap();
    let (code, out) = meshid_ca(&[
        "init",
        "--dir",
        &dir.to_string_lossy(),
        "--root-cert",
        &root_cert.to_string_lossy(),
        "--root-key",
        &root_key.to_string_lossy(),
    ]);
    assert_eq!(code, 0, "{out}");
    assert!(
        out.contains("meshid-ca bundle"),
        "init names the bundle to give sidecars: {out}"
    );
    (dir, enterprise)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_sibling_ca_under_an_imported_root_mints_nothing_the_mesh_accepts() {
    let work = tempfile::tempdir().unwrap();
    let (dir, enterprise) = imported_ca(work.path());
    assert!(
        !dir.join("root.key").exists(),
        "an imported root's key is not kept"
    );
    assert!(dir.join("root.imported").exists(), "the import is marked");

    let cluster = FakeCluster::new();
    let jwks = work.path().join("jwks.json");
    cluster.write_jwks(&jwks);
    let (grpc, admin) = (free_addr("127.0.0.31"), free_addr("127.0.0.31"));
    let _ca = Proc::spawn(
        "meshid-ca",
        Command::new(workspace_bin("meshid-ca"))
            .args(["serve", "--dir"])
            .arg(&dir)
            .args(["--listen", &grpc.to_string()])
            .args(["--admin-listen", &admin.to_string()])
            .args(["--san", "localhost"])
            .arg("--jwks")
            .arg(&jwks)
            .env("MESHID_LOG", "warn"),
    );
    assert!(wait_http_ok(admin, "/readyz", Duration::from_secs(10)));
    let roots = read_roots(&dir.join("bundle.pem"));

    // The CA publishes its issuing intermediate as the pin, in the bundle and with certificates.
    let intermediate = read_roots(&dir.join("intermediate.pem"));
    let mut client = meshid_tests::ca::connect(grpc, &roots, None).await.unwrap();
    let bundle = client
        .get_trust_bundle(GetTrustBundleRequest::default())
        .await
        .unwrap()
        .into_inner();
    assert_eq!(
        bundle.pinned_intermediates,
        vec![intermediate[0].to_vec()],
        "the bundle carries the mesh's intermediate beside the root"
    );

    // B: a real sidecar (service-account token), its inbound in front of a TCP echo app, allowing A.
    let app = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let app_addr = app.local_addr().unwrap();
    tokio::spawn(meshid_examples::tcp_echo(app));
    let (b_in, b_admin) = (free_addr("127.0.0.32"), free_addr("127.0.0.32"));
    let policy = work.path().join("policy.yaml");
    std::fs::write(
        &policy,
        format!(
            "inbound:\n  - port: {}\n    protocol: tcp\n    allow:\n      - id: {A}\n",
            b_in.port()
        ),
    )
    .unwrap();
    let token = work.path().join("backend.token");
    std::fs::write(&token, cluster.token("shop", "backend")).unwrap();
    // The bundle it starts with is `meshid-ca bundle`'s: the root and the pinned intermediate.
    let bundle_file = work.path().join("ca-bundle.pem");
    let started_with = bootstrap_bundle(&dir);
    assert_eq!(
        read_roots(&started_with),
        [roots.clone(), intermediate.clone()].concat()
    );
    std::fs::copy(&started_with, &bundle_file).unwrap();
    let _b = Proc::spawn(
        "meshid-sidecar",
        ca_mode_sidecar(grpc, &bundle_file, "--token-file", &token, b_admin)
            .args(["--inbound", &format!("{b_in}={app_addr},tcp")])
            .arg("--policy")
            .arg(&policy),
    );
    assert!(wait_http_ok(b_admin, "/readyz", Duration::from_secs(15)));

    let td = TrustDomain::new("cluster.local").unwrap();
    let pinned: Vec<CertificateDer<'static>> = bundle
        .pinned_intermediates
        .iter()
        .cloned()
        .map(CertificateDer::from)
        .collect();
    let anchors = Anchors::with_pins(&roots, &pinned, td).unwrap();

    // The genuine A (its certificate from the CA, by token) reaches B's app.
    let key = WorkloadKey::new();
    let issued = client
        .issue(IssueRequest {
            csr: key.csr.clone(),
            credential: Some(Credential::ServiceAccountToken(
                cluster.token("shop", "frontend"),
            )),
            ttl_seconds: 0,
            app_svid: false,
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(issued.pinned_intermediates, bundle.pinned_intermediates);
    let genuine: Vec<CertificateDer<'static>> = issued
        .cert_chain
        .iter()
        .cloned()
        .map(CertificateDer::from)
        .collect();
    let back = echo_as(
        b_in,
        &anchors,
        genuine.clone(),
        key.private_key_der(),
        b"genuine",
    )
    .await;
    assert_eq!(back.as_deref(), Ok(&b"genuine"[..]));

    // A sibling CA under the same root mints A's identity: it chains to a root B trusts, and is
    // still refused, counted under its own reason.
    let (forged, forged_key) = enterprise.sibling_workload(A);
    let refused = echo_as(
        b_in,
        &anchors,
        forged.clone(),
        forged_key.clone_key(),
        b"forged",
    )
    .await;
    assert!(
        refused.as_ref().map_or(true, Vec::is_empty),
        "the forged A got through: {refused:?}"
    );
    // TLS 1.3: the refused client can see the alert before the sidecar has counted the failure.
    let counted = eventually(Duration::from_secs(5), || async {
        http_get(b_admin, "/metrics")
            .is_ok_and(|(_, m)| handshake_failures(&m, "inbound", "unpinned_issuer") >= 1)
    })
    .await;
    let (_, metrics) = http_get(b_admin, "/metrics").unwrap();
    assert!(counted, "{metrics}");

    // The CA refuses the sibling's certificate as a client (no renewal into a genuine meshid
    // certificate), while the genuine one still renews.
    let renew = |chain: Vec<CertificateDer<'static>>, key: PrivateKeyDer<'static>| {
        let roots = roots.clone();
        async move {
            let mut c = meshid_tests::ca::connect(grpc, &roots, Some((chain, key)))
                .await
                .map_err(|e| e.to_string())?;
            c.issue(IssueRequest {
                csr: WorkloadKey::new().csr,
                credential: None,
                ttl_seconds: 0,
                app_svid: false,
            })
            .await
            .map(|r| r.into_inner())
            .map_err(|s| format!("{:?}: {}", s.code(), s.message()))
        }
    };
    let forged_renewal = renew(forged, forged_key).await;
    assert!(forged_renewal.is_err(), "{forged_renewal:?}");
    let renewed = renew(genuine, key.private_key_der()).await.unwrap();
    let leaf = meshid_identity::cert_identity_from_der(&renewed.cert_chain[0]).unwrap();
    assert_eq!(leaf.id.as_str(), A);
    let (_, ca_metrics) = http_get(admin, "/metrics").unwrap();
    assert!(
        ca_metrics
            .lines()
            .any(|l| l.contains("handshake") && l.contains("unpinned_issuer")),
        "the CA counts the refused handshake: {ca_metrics}"
    );
}

/// What an impostor of the CA saw of one sidecar: TLS handshakes that completed, handshakes the
/// sidecar broke off, and whether the sidecar's token reached it.
#[derive(Debug, Default)]
struct Impostor {
    completed: usize,
    refused: usize,
    token_seen: bool,
}

/// Serves TLS on `listener` as `chain`/`key` (a sibling CA's certificate for the CA's name), reads
/// whatever a client sends after the handshake, and records it in `seen`.
async fn impostor_ca(
    listener: tokio::net::TcpListener,
    chain: Vec<CertificateDer<'static>>,
    key: PrivateKeyDer<'static>,
    token: String,
    seen: Arc<std::sync::Mutex<Impostor>>,
) {
    let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
    let mut config = rustls::ServerConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13])
        .unwrap()
        .with_no_client_auth()
        .with_single_cert(chain, key)
        .unwrap();
    config.alpn_protocols = vec![b"h2".to_vec()];
    let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(config));
    loop {
        let Ok((tcp, _)) = listener.accept().await else {
            return;
        };
        let (acceptor, token, seen) = (acceptor.clone(), token.clone(), seen.clone());
        tokio::spawn(async move {
            let mut tls = match acceptor.accept(tcp).await {
                Ok(tls) => tls,
                Err(_) => {
                    seen.lock().unwrap().refused += 1;
                    return;
                }
            };
            seen.lock().unwrap().completed += 1;
            // The h2 preface, SETTINGS, then the Issue call's HEADERS and DATA: its body holds
            // the token as it is (gRPC messages are not compressed here).
            let mut got = Vec::new();
            let mut buf = [0u8; 4096];
            while let Ok(Ok(n)) =
                tokio::time::timeout(Duration::from_secs(3), tls.read(&mut buf)).await
            {
                if n == 0 {
                    break;
                }
                got.extend_from_slice(&buf[..n]);
                if got.windows(token.len()).any(|w| w == token.as_bytes()) {
                    seen.lock().unwrap().token_seen = true;
                    return;
                }
            }
        });
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_sibling_cas_certificate_for_the_cas_name_gets_no_token() {
    let work = tempfile::tempdir().unwrap();
    let (dir, enterprise) = imported_ca(work.path());
    let cluster = FakeCluster::new();
    let token = cluster.token("shop", "backend");
    let token_file = work.path().join("backend.token");
    std::fs::write(&token_file, &token).unwrap();
    // Another team's CA under the shared root issued a server certificate for the CA's name.
    let (chain, key) = enterprise.sibling_server("localhost");

    // Two sidecars dial the impostor (as a poisoned DNS name or a hijacked Service would send
    // them): one started with `meshid-ca bundle` (root and pinned intermediate), one with
    // bundle.pem's root alone, as every sidecar was before pins reached the CA's channel.
    let pinned = bootstrap_bundle(&dir);
    let cases = [
        ("the root and its pinned intermediate", pinned, false),
        ("the root alone", dir.join("bundle.pem"), true),
    ];
    for (i, (what, bundle, token_expected)) in cases.into_iter().enumerate() {
        let listener = tokio::net::TcpListener::bind(format!("127.0.0.3{}:0", 3 + i))
            .await
            .unwrap();
        let addr = listener.local_addr().unwrap();
        let seen = Arc::new(std::sync::Mutex::new(Impostor::default()));
        let server = tokio::spawn(impostor_ca(
            listener,
            chain.clone(),
            key.clone_key(),
            token.clone(),
            seen.clone(),
        ));
        let sidecar_admin = free_addr(&format!("127.0.0.3{}", 3 + i));
        let _sidecar = Proc::spawn(
            "meshid-sidecar",
            ca_mode_sidecar(addr, &bundle, "--token-file", &token_file, sidecar_admin).args([
                "--outbound",
                &format!("{}=127.0.0.1:9,{A}", free_addr("127.0.0.1")),
            ]),
        );
        // Tried at least twice (the sidecar backs off and tries again), then judged.
        let tried = eventually(Duration::from_secs(20), || {
            let seen = seen.clone();
            async move {
                let s = seen.lock().unwrap();
                s.token_seen || s.completed + s.refused >= 2
            }
        })
        .await;
        let s = seen
            .lock()
            .map(|s| (s.completed, s.refused, s.token_seen))
            .unwrap();
        server.abort();
        assert!(
            tried,
            "{what}: the sidecar never dialled the impostor: {s:?}"
        );
        if token_expected {
            assert!(
                s.2,
                "{what}: without the pin the impostor gets the token (the hole the pin closes): {s:?}"
            );
        } else {
            assert_eq!(
                s,
                (0, s.1, false),
                "{what}: every handshake refused, no token sent"
            );
            assert!(s.1 >= 2, "{what}: {s:?}");
            // Refused, not ready: the sidecar has no certificate.
            let ready = http_get(sidecar_admin, "/readyz").map(|(status, _)| status);
            assert!(matches!(ready, Ok(s) if s != 200), "{what}: {ready:?}");
        }
    }
}
