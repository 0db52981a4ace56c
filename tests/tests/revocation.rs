//! Revocation end to end: `meshid-ca revoke` (the real command) against a running CA and a sidecar
//! pair in CA mode. A revoked identity loses its open connections and every new handshake, in
//! both directions, within seconds, and the CA issues it nothing until `unrevoke`; a revoked
//! serial refuses that one certificate and no other; a broken list loses nothing.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::sync::Arc;
use std::time::{Duration, Instant};

use meshid_ca::signer::LifetimePolicy;
use meshid_identity::policy::Protocol;
use meshid_identity::{SpiffeId, TrustDomain};
use meshid_proto::ca::v1::{GetTrustBundleRequest, IssueRequest, issue_request::Credential};
use meshid_tests::ca::{CaOptions, TestCa};
use meshid_tests::mesh::{
    SidecarSpec, TestPki, TestSidecar, eventually, get, handshake_failures, http_echo,
    http_request, metric, tcp_echo,
};
use meshid_tests::pki::WorkloadKey;
use meshid_tests::rotation_cli::meshid_ca;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

const A: &str = "spiffe://cluster.local/ns/shop/sa/frontend";
const B: &str = "spiffe://cluster.local/ns/shop/sa/backend";
const C: &str = "spiffe://cluster.local/ns/shop/sa/cart";
/// Long enough that no renewal happens during a test.
const TTL: Duration = Duration::from_secs(600);
/// "Within seconds": the CA polls its directory every second, sidecars apply the bundle at once.
const ENFORCED_WITHIN: Duration = Duration::from_secs(10);

async fn ca() -> TestCa {
    TestCa::start(CaOptions {
        lifetimes: LifetimePolicy {
            default: TTL,
            max: TTL,
        },
        ..CaOptions::default()
    })
    .await
}

fn dir_of(ca: &TestCa) -> String {
    ca.dir.path().to_string_lossy().into_owned()
}

/// `meshid_ca_directory_rejected` of `ca`: 1 while it refuses its directory's newest files.
fn directory_rejected(ca: &TestCa) -> u64 {
    let m = meshid_tests::process::http_get(ca.admin_addr, "/metrics")
        .unwrap()
        .1;
    metric(&m, "meshid_ca_directory_rejected", &[])
}

/// Whether the bundle `ca` serves lists the revocation of identity `id`.
async fn served_lists(ca: &TestCa, id: &str) -> bool {
    ca.served_bundle()
        .await
        .revoked
        .iter()
        .any(|r| r.spiffe_id == id)
}

/// `meshid-ca revoke|unrevoke --dir DIR ARGS...`, which must succeed.
fn cli(ca: &TestCa, command: &str, args: &[&str]) -> String {
    let dir = dir_of(ca);
    let mut all = vec![command, "--dir", dir.as_str()];
    all.extend(args);
    let (code, out) = meshid_ca(&all);
    assert_eq!(code, 0, "meshid-ca {all:?}: {out}");
    out
}

/// A certificate for service account `sa` from the CA with its service-account token, and its
/// key; or the refusal's code and message.
async fn issue_with_token(
    ca: &TestCa,
    sa: &str,
) -> Result<(Vec<CertificateDer<'static>>, PrivateKeyDer<'static>), (tonic::Code, String)> {
    let w = WorkloadKey::new();
    let resp = ca
        .client()
        .await
        .issue(IssueRequest {
            csr: w.csr.clone(),
            credential: Some(Credential::ServiceAccountToken(
                ca.cluster.token("shop", sa),
            )),
            ttl_seconds: 0,
            app_svid: false,
        })
        .await
        .map_err(|s| (s.code(), s.message().to_owned()))?
        .into_inner();
    let chain = resp
        .cert_chain
        .into_iter()
        .map(CertificateDer::from)
        .collect();
    Ok((chain, w.private_key_der()))
}

/// Renew presenting `chain`: `Ok` or the refusal's message.
async fn renew(
    ca: &TestCa,
    chain: &[CertificateDer<'static>],
    key: &PrivateKeyDer<'static>,
) -> Result<(), (tonic::Code, String)> {
    let w = WorkloadKey::new();
    let mut client = ca
        .client_with_cert(chain.to_vec(), key.clone_key())
        .await
        .expect("connect");
    client
        .issue(IssueRequest {
            csr: w.csr.clone(),
            credential: None,
            ttl_seconds: 0,
            app_svid: false,
        })
        .await
        .map(|_| ())
        .map_err(|s| (s.code(), s.message().to_owned()))
}

/// One request through the frontend's HTTP outbound: the status, or the connection error.
async fn call(local: std::net::SocketAddr) -> Result<u16, String> {
    let tcp = tokio::net::TcpStream::connect(local)
        .await
        .map_err(|e| e.to_string())?;
    http_request(tcp, false, get("/x", &[]))
        .await
        .map(|(status, _, _)| status)
}

/// A long-lived TCP connection through the frontend's TCP outbound, proven open by an echo
/// (tried until one is: the backend's policy for that port may still be loading).
async fn open_tunnel(local: std::net::SocketAddr) -> tokio::net::TcpStream {
    let deadline = Instant::now() + Duration::from_secs(15);
    loop {
        let mut back = [0u8; 4];
        // A refused tunnel reaches us as a reset (`outbound::tcp`), maybe before the write, or
        // even before the connect is seen done (then it reports the reset).
        if let Ok(mut tcp) = tokio::net::TcpStream::connect(local).await
            && tcp.write_all(b"ping").await.is_ok()
            && let Ok(Ok(_)) =
                tokio::time::timeout(Duration::from_secs(5), tcp.read_exact(&mut back)).await
            && &back == b"ping"
        {
            return tcp;
        }
        assert!(Instant::now() < deadline, "no tunnel through the pair");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// After a revocation: `tunnel` (through the pair) is closed within seconds, no call through
/// `http_out` gets an answer from the app any more, and `enforcer`, the sidecar that refuses the
/// revoked side on its `direction`, counts a handshake refused and a connection closed for it.
/// Returns how long the tunnel took to close.
async fn assert_cut_off(
    enforcer: &TestSidecar,
    direction: &str,
    tunnel: &mut tokio::net::TcpStream,
    http_out: std::net::SocketAddr,
) -> Duration {
    let start = Instant::now();
    assert!(
        closed_within(tunnel, ENFORCED_WITHIN).await,
        "{direction}: the tunnel with the revoked side is closed"
    );
    let closed_after = start.elapsed();
    assert!(
        eventually(ENFORCED_WITHIN, || async {
            call(http_out).await != Ok(200)
        })
        .await,
        "{direction}: no call crosses the revocation"
    );
    // TLS 1.3: the refused side can see the alert before the enforcer has counted the refusal.
    assert!(
        eventually(ENFORCED_WITHIN, || async {
            handshake_failures(&enforcer.metrics().await, direction, "revoked") >= 1
        })
        .await,
        "{direction}: a handshake refused as revoked:\n{}",
        enforcer.metrics().await
    );
    let m = enforcer.metrics().await;
    let closed = format!("direction=\"{direction}\"");
    assert!(
        metric(
            &m,
            "meshid_sidecar_revoked_peer_connections_closed_total",
            &[closed.as_str()]
        ) >= 1,
        "{m}"
    );
    assert_eq!(metric(&m, "meshid_sidecar_revocations ", &[]), 1, "{m}");
    closed_after
}

/// Waits until the connection is closed from the other end (EOF or reset).
async fn closed_within(tcp: &mut tokio::net::TcpStream, within: Duration) -> bool {
    let mut buf = [0u8; 64];
    matches!(
        tokio::time::timeout(within, tcp.read(&mut buf)).await,
        Ok(Ok(0) | Err(_))
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_revoked_identity_is_cut_off_both_ways_within_seconds_until_unrevoked() {
    let ca = ca().await;
    let pki = TestPki::new();
    let dummy = pki.workload(A);
    let b = TestSidecar::start(
        &pki,
        &dummy,
        B,
        SidecarSpec {
            inbound: vec![
                ("127.0.0.21", http_echo().await, Protocol::Http),
                ("127.0.0.21", tcp_echo().await, Protocol::Tcp),
            ],
            // Both ports' rules are written once the second port is known (below).
            policy: Some(format!(
                "inbound:\n  - port: {{port0}}\n    protocol: http\n    allow:\n      - id: {A}\n"
            )),
            creds: Some(ca.sidecar_creds("shop", "backend", TTL)),
            ..Default::default()
        },
    )
    .await;
    b.write_policy(&format!(
        "inbound:\n  - port: {}\n    protocol: http\n    allow:\n      - id: {A}\n  - port: {}\n    protocol: tcp\n    allow:\n      - id: {A}\n",
        b.inbound[0].port(),
        b.inbound[1].port()
    ));
    let a = TestSidecar::start(
        &pki,
        &dummy,
        A,
        SidecarSpec {
            outbound: vec![
                (b.inbound[0].to_string(), B.into(), Protocol::Http),
                (b.inbound[1].to_string(), B.into(), Protocol::Tcp),
            ],
            creds: Some(ca.sidecar_creds("shop", "frontend", TTL)),
            ..Default::default()
        },
    )
    .await;
    let (http_out, tcp_out) = (a.outbound[0], a.outbound[1]);
    assert!(
        eventually(Duration::from_secs(15), || async {
            call(http_out).await == Ok(200)
        })
        .await,
        "the pair serves traffic"
    );

    // The upstream (backend) is revoked: the frontend closes its open tunnel and refuses to
    // dial it again; the backend gets nothing more from the CA.
    let mut tunnel = open_tunnel(tcp_out).await;
    let out = cli(&ca, "revoke", &["--id", B, "--reason", "incident 42"]);
    assert!(out.contains(&format!("revoked identity {B}")), "{out}");
    // The frontend closes its tunnel to the revoked backend and refuses to dial it again.
    let closed_after = assert_cut_off(&a, "outbound", &mut tunnel, http_out).await;
    let (code, message) = issue_with_token(&ca, "backend").await.unwrap_err();
    assert_eq!(code, tonic::Code::PermissionDenied, "{message}");
    assert!(
        message.contains(&format!("identity {B} is revoked (incident 42)")),
        "{message}"
    );
    // Another identity is untouched.
    let (cart_chain, cart_key) = issue_with_token(&ca, "cart").await.unwrap();
    // Anyone may read the list, but the operator's reason goes only to the trust domain's members.
    let anonymous = ca.client().await;
    let member = ca.client_with_cert(cart_chain, cart_key).await.unwrap();
    for (mut client, reason) in [(anonymous, ""), (member, "incident 42")] {
        let bundle = client
            .get_trust_bundle(GetTrustBundleRequest {})
            .await
            .unwrap()
            .into_inner();
        let entry = bundle.revoked.iter().find(|r| r.spiffe_id == B);
        assert_eq!(
            entry.map(|r| r.reason.as_str()),
            Some(reason),
            "{:?}",
            bundle.revoked
        );
    }
    let listed = cli(&ca, "revocations", &[]);
    assert!(
        listed.contains(B) && listed.contains("incident 42"),
        "{listed}"
    );
    let ca_metrics = meshid_tests::process::http_get(ca.admin_addr, "/metrics")
        .unwrap()
        .1;
    assert_eq!(
        metric(&ca_metrics, "meshid_ca_revocations", &["kind=\"identity\""]),
        1,
        "{ca_metrics}"
    );
    assert!(
        metric(
            &ca_metrics,
            "meshid_ca_issue_requests_total",
            &["result=\"revoked\""]
        ) >= 1,
        "{ca_metrics}"
    );

    // Lifted: the backend is trusted again (its certificate never changed) and may be issued.
    let out = cli(&ca, "unrevoke", &["--id", B]);
    assert!(
        out.contains(&format!("lifted the revocation of identity {B}")),
        "{out}"
    );
    assert!(
        eventually(ENFORCED_WITHIN, || async {
            call(http_out).await == Ok(200)
        })
        .await,
        "the backend is reachable again after unrevoke"
    );
    issue_with_token(&ca, "backend").await.unwrap();

    // Now the caller (frontend) is revoked: the backend closes the frontend's tunnel and refuses
    // its handshakes.
    let mut tunnel = open_tunnel(tcp_out).await;
    cli(&ca, "revoke", &["--id", A]);
    assert_cut_off(&b, "inbound", &mut tunnel, http_out).await;
    eprintln!("tunnel to the revoked backend closed {closed_after:?} after `meshid-ca revoke`");
}

/// A TLS 1.3 client presenting `chain` (with `key`) to a sidecar of `server` under `ca`'s roots.
fn client_config(
    ca: &TestCa,
    server: &str,
    chain: &[CertificateDer<'static>],
    key: &PrivateKeyDer<'static>,
) -> Arc<rustls::ClientConfig> {
    let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
    let anchors = meshid_identity::verify::Anchors::new(
        &ca.authority().roots,
        TrustDomain::new("cluster.local").unwrap(),
    )
    .unwrap();
    let verifier = meshid_identity::verify::SpiffeServerVerifier::new(
        anchors,
        SpiffeId::parse(server).unwrap(),
        &provider,
    );
    Arc::new(
        rustls::ClientConfig::builder_with_provider(provider)
            .with_protocol_versions(&[&rustls::version::TLS13])
            .unwrap()
            .dangerous()
            .with_custom_certificate_verifier(Arc::new(verifier))
            .with_client_auth_cert(chain.to_vec(), key.clone_key())
            .unwrap(),
    )
}

/// Backend (B) on `ip`: a TCP echo only cart (C) may reach, with the credentials (and the rest) of
/// `spec`.
async fn backend_for_cart(ip: &'static str, spec: SidecarSpec) -> TestSidecar {
    let pki = TestPki::new();
    let dummy = pki.workload(B);
    TestSidecar::start(
        &pki,
        &dummy,
        B,
        SidecarSpec {
            inbound: vec![(ip, tcp_echo().await, Protocol::Tcp)],
            policy: Some(format!(
                "inbound:\n  - port: {{port0}}\n    protocol: tcp\n    allow:\n      - id: {C}\n"
            )),
            ..spec
        },
    )
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_revoked_serial_refuses_that_certificate_and_no_other() {
    let ca = ca().await;
    let b = backend_for_cart(
        "127.0.0.22",
        SidecarSpec {
            creds: Some(ca.sidecar_creds("shop", "backend", TTL)),
            ..Default::default()
        },
    )
    .await;
    // Two certificates of one identity, each with its own key.
    let (first, first_key) = issue_with_token(&ca, "cart").await.unwrap();
    let (second, second_key) = issue_with_token(&ca, "cart").await.unwrap();
    let echo = |chain: Vec<CertificateDer<'static>>, key: PrivateKeyDer<'static>| {
        let config = client_config(&ca, B, &chain, &key);
        let addr = b.inbound[0];
        async move { meshid_tests::mesh::echo_roundtrip(addr, config, b"hi").await }
    };
    assert!(
        eventually(Duration::from_secs(15), || {
            let f = echo(first.clone(), first_key.clone_key());
            async move { f.await.as_deref() == Ok(b"hi".as_slice()) }
        })
        .await,
        "the first certificate is served"
    );

    // The serial as `openssl x509 -noout -serial` prints it.
    let serial = meshid_identity::cert_identity_from_der(&first[0])
        .unwrap()
        .serial_hex
        .to_uppercase();
    let revoked_refusals =
        || async { handshake_failures(&b.metrics().await, "inbound", "revoked") };
    let refusals_before = revoked_refusals().await;
    let out = cli(&ca, "revoke", &["--serial", &format!("serial={serial}")]);
    assert!(out.contains("revoked certificate serial"), "{out}");
    assert!(out.contains("revoke the lineage"), "{out}");
    // Refused, and refused as revoked (TLS 1.3: the client may see the alert before the sidecar
    // has counted it).
    assert!(
        eventually(ENFORCED_WITHIN, || {
            let f = echo(first.clone(), first_key.clone_key());
            async move { f.await.is_err() && revoked_refusals().await > refusals_before }
        })
        .await,
        "the revoked certificate is refused as revoked:\n{}",
        b.metrics().await
    );
    assert_eq!(
        echo(second.clone(), second_key.clone_key())
            .await
            .as_deref(),
        Ok(b"hi".as_slice()),
        "another certificate of the same identity is still served"
    );
    let (code, message) = renew(&ca, &first, &first_key).await.unwrap_err();
    assert_eq!(code, tonic::Code::PermissionDenied, "{message}");
    assert!(message.contains("is revoked"), "{message}");
    renew(&ca, &second, &second_key).await.unwrap();
    // The identity itself may still attest with its token.
    issue_with_token(&ca, "cart").await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_revocations_are_refused_and_a_broken_list_loses_nothing() {
    let ca = ca().await;
    let dir = dir_of(&ca);
    for (args, says) in [
        (vec!["--serial", "xyz"], "--serial"),
        (
            vec!["--id", "spiffe://elsewhere/ns/a/sa/b"],
            "outside this CA's trust domain",
        ),
        (vec!["--id", "https://cluster.local/x"], "--id"),
        (vec!["--id", A, "--serial", "01"], "cannot be used with"),
        (
            vec!["--id", A, "--reason", "a\u{1b}[2J"],
            "control characters",
        ),
    ] {
        let mut all = vec!["revoke", "--dir", dir.as_str()];
        all.extend(args.iter());
        let (code, out) = meshid_ca(&all);
        assert_eq!(code, 64, "{all:?}: {out}");
        assert!(out.contains(says), "{all:?}: {out}");
    }
    let (code, out) = meshid_ca(&["unrevoke", "--dir", dir.as_str(), "--id", A]);
    assert_eq!(code, 1, "{out}");
    assert!(out.contains("is not revoked"), "{out}");

    let version = || {
        meshid_ca::authorities::RotationState::load(ca.dir.path())
            .unwrap()
            .bundle_version
    };
    let served = || async { ca.served_bundle().await };
    let before = version();
    cli(&ca, "revoke", &["--id", A]);
    assert!(
        eventually(ENFORCED_WITHIN, || async {
            issue_with_token(&ca, "frontend").await.is_err()
        })
        .await,
        "the CA applies the revocation"
    );
    // The change is served under the directory's next version, so a rotation prepared after it
    // gets a version no sidecar acknowledged with the revocation alone: the activation gate
    // still waits for the new root.
    assert_eq!(version(), before + 1);
    let bundle = served().await;
    assert_eq!((bundle.version, bundle.revoked.len()), (before + 1, 1));
    meshid_ca::rotation::prepare(ca.dir.path(), None).unwrap();
    assert!(
        eventually(ENFORCED_WITHIN, || async {
            let b = served().await;
            b.version == before + 2 && b.roots.len() == 2
        })
        .await,
        "the prepared root is served under a version of its own"
    );
    // A broken list: the CA keeps enforcing what it had, and the command refuses to write over it.
    let rejected = || directory_rejected(&ca);
    assert_eq!(rejected(), 0);
    let path = ca.dir.path().join("revocations.json");
    std::fs::write(&path, "{ not json").unwrap();
    // The CA has read the broken list (and refused it) before we look at what it enforces.
    assert!(
        eventually(ENFORCED_WITHIN, || async { rejected() == 1 }).await,
        "the broken list is refused"
    );
    let (code, message) = issue_with_token(&ca, "frontend").await.unwrap_err();
    assert_eq!(code, tonic::Code::PermissionDenied, "{message}");
    let (code, out) = meshid_ca(&["revoke", "--dir", dir.as_str(), "--id", B]);
    assert_eq!(code, 1, "{out}");
    assert!(out.contains("revocations.json"), "{out}");
    assert_eq!(std::fs::read_to_string(&path).unwrap(), "{ not json");
}

/// A deleted `revocations.json` is a lost list, not an empty one: the running CA keeps serving
/// the revocation and counts the directory as refused, and a CA started on the directory refuses
/// to start (it cannot keep a list it never read). A directory from before `authorities.json`
/// recorded the list's writes is refused by the running CA too.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_deleted_revocation_list_lifts_nothing() {
    let ca = ca().await;
    let rejected = || directory_rejected(&ca);
    let served = || async { ca.served_bundle().await };
    cli(&ca, "revoke", &["--id", A]);
    assert!(
        eventually(ENFORCED_WITHIN, || async {
            served().await.revoked.len() == 1
        })
        .await
    );
    let path = ca.dir.path().join("revocations.json");
    let state = ca.dir.path().join(meshid_ca::authorities::STATE_FILE);
    let list = std::fs::read(&path).unwrap();
    std::fs::remove_file(&path).unwrap();
    assert!(eventually(ENFORCED_WITHIN, || async { rejected() == 1 }).await);
    // Past a few polls: still served and enforced.
    tokio::time::sleep(Duration::from_millis(2500)).await;
    assert_eq!(served().await.revoked.len(), 1);
    let (code, message) = issue_with_token(&ca, "frontend").await.unwrap_err();
    assert_eq!(code, tonic::Code::PermissionDenied, "{message}");
    // A CA started on the directory refuses, naming the file; so does a command that would write
    // over the lost list.
    let err = ca
        .try_start_replica()
        .await
        .err()
        .expect("refused")
        .to_string();
    assert!(err.contains("revocations.json: missing"), "{err}");
    let dir = dir_of(&ca);
    let (code, out) = meshid_ca(&["revoke", "--dir", dir.as_str(), "--id", B]);
    assert_eq!(code, 1, "{out}");
    assert!(out.contains("revocations.json"), "{out}");

    // An older directory: authorities.json without the record of the list. The running CA,
    // which enforces a revocation, still refuses the missing file.
    let mut json: serde_json::Value =
        serde_json::from_slice(&std::fs::read(&state).unwrap()).unwrap();
    json.as_object_mut()
        .unwrap()
        .remove("revocations_written_at")
        .expect("recorded by revoke");
    std::fs::write(&state, serde_json::to_vec_pretty(&json).unwrap()).unwrap();
    tokio::time::sleep(Duration::from_millis(2500)).await;
    assert_eq!(rejected(), 1);
    assert_eq!(served().await.revoked.len(), 1);
    // Put back: applied again.
    std::fs::write(&path, list).unwrap();
    assert!(eventually(ENFORCED_WITHIN, || async { rejected() == 0 }).await);
    assert_eq!(served().await.revoked.len(), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_refused_directory_is_measured_and_retried_until_it_loads() {
    let ca = ca().await;
    let scrape = || {
        meshid_tests::process::http_get(ca.admin_addr, "/metrics")
            .unwrap()
            .1
    };
    let rejected = || metric(&scrape(), "meshid_ca_directory_rejected", &[]);
    let m = scrape();
    assert_eq!(metric(&m, "meshid_ca_directory_rejected", &[]), 0, "{m}");
    assert!(
        m.contains("meshid_ca_directory_reloads_total{result=\"rejected\"} 0"),
        "{m}"
    );

    // A broken revocations.json: refused and measured; the CA keeps serving.
    let path = ca.dir.path().join("revocations.json");
    std::fs::write(&path, "{ not json").unwrap();
    assert!(eventually(ENFORCED_WITHIN, || async { rejected() == 1 }).await);
    issue_with_token(&ca, "frontend").await.unwrap();
    let m = scrape();
    assert!(
        metric(
            &m,
            "meshid_ca_directory_reloads_total",
            &["result=\"rejected\""]
        ) >= 1,
        "{m}"
    );
    // Fixed (a revocation of A written in its place): applied, and the gauge back to 0.
    std::fs::remove_file(&path).unwrap();
    cli(&ca, "revoke", &["--id", A]);
    assert!(
        eventually(ENFORCED_WITHIN, || async {
            rejected() == 0 && issue_with_token(&ca, "frontend").await.is_err()
        })
        .await,
        "the fixed list is applied"
    );

    // A failure that clears with no watched file changing (jwt.pub is read at every reload, not
    // watched): the newest files are tried again every second, and applied once they load.
    let jwt_pub = ca.dir.path().join("jwt.pub");
    let good = std::fs::read(&jwt_pub).unwrap();
    std::fs::write(&jwt_pub, "not a key").unwrap();
    cli(&ca, "unrevoke", &["--id", A]);
    assert!(eventually(ENFORCED_WITHIN, || async { rejected() == 1 }).await);
    let (code, _) = issue_with_token(&ca, "frontend").await.unwrap_err();
    assert_eq!(code, tonic::Code::PermissionDenied, "still the list it had");
    std::fs::write(&jwt_pub, good).unwrap();
    assert!(
        eventually(ENFORCED_WITHIN, || async {
            rejected() == 0 && issue_with_token(&ca, "frontend").await.is_ok()
        })
        .await,
        "applied once it loads"
    );
}

/// The CA lists the revocations in force with every certificate it issues a sidecar (so a sidecar
/// enforces them from its first certificate, before its bundle stream is up), and none with an
/// app's SVID.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_ca_lists_its_revocations_with_every_certificate() {
    let ca = ca().await;
    cli(&ca, "revoke", &["--id", C, "--reason", "key leaked"]);
    let issue = |credential: Option<Credential>, app_svid: bool| {
        let ca = &ca;
        async move {
            let w = WorkloadKey::new();
            let mut client = match &credential {
                Some(_) => ca.client().await,
                None => {
                    let (chain, key) = issue_with_token(ca, "frontend").await.unwrap();
                    ca.client_with_cert(chain, key).await.expect("connect")
                }
            };
            let resp = client
                .issue(IssueRequest {
                    csr: w.csr.clone(),
                    credential,
                    ttl_seconds: 0,
                    app_svid,
                })
                .await
                .unwrap()
                .into_inner();
            resp.revoked
        }
    };
    let token = || {
        Some(Credential::ServiceAccountToken(
            ca.cluster.token("shop", "frontend"),
        ))
    };
    let listed = eventually(ENFORCED_WITHIN, || async {
        issue(token(), false).await.iter().any(|r| r.spiffe_id == C)
    })
    .await;
    assert!(
        listed,
        "a certificate issued on a token lists the revocation"
    );
    let revoked = issue(token(), false).await;
    assert_eq!(revoked.len(), 1, "{revoked:?}");
    assert_eq!(revoked[0].reason, "key leaked");
    assert!(revoked[0].expires_at_unix > revoked[0].revoked_at_unix);
    let renewed = issue(None, false).await;
    assert_eq!(renewed, revoked, "a renewal lists it too");
    assert!(issue(None, true).await.is_empty(), "an app SVID lists none");
}

/// A sidecar in file mode (certificate and anchors from files) that reports to the CA
/// (`--report-ca-addr`) applies the revocations of the CA's bundle: a revoked peer's handshakes are
/// refused there too, and lifting the revocation serves it again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reporting_file_mode_sidecar_applies_the_cas_revocations() {
    use meshid_sidecar::settings::CredSource;
    let ca = ca().await;
    // Backend's certificate from this CA, handed over as files (operator tooling).
    let files = tempfile::tempdir().unwrap();
    let creds = ca.issue_to_files("shop", "backend", files.path()).await;
    let b = backend_for_cart(
        "127.0.0.23",
        SidecarSpec {
            creds: Some(CredSource::Files(creds)),
            report_to: Some(ca.report_endpoint()),
            ..Default::default()
        },
    )
    .await;
    let (cart, cart_key) = issue_with_token(&ca, "cart").await.unwrap();
    let echo = || {
        let config = client_config(&ca, B, &cart, &cart_key);
        let addr = b.inbound[0];
        async move { meshid_tests::mesh::echo_roundtrip(addr, config, b"hi").await }
    };
    assert!(
        eventually(Duration::from_secs(15), || async {
            echo().await.as_deref() == Ok(b"hi".as_slice())
        })
        .await,
        "cart is served"
    );
    let revoked_refusals =
        || async { handshake_failures(&b.metrics().await, "inbound", "revoked") };
    assert_eq!(revoked_refusals().await, 0);
    cli(&ca, "revoke", &["--id", C]);
    // The echo that sees the revocation may be on a connection it closed: new handshakes are
    // refused, and counted as revoked (TLS 1.3: maybe after the client saw the alert).
    assert!(
        eventually(ENFORCED_WITHIN, || async {
            echo().await.is_err() && revoked_refusals().await >= 1
        })
        .await,
        "the revoked identity is refused as revoked by the file-mode sidecar:\n{}",
        b.metrics().await
    );
    // The gauge says what is in force, as a CA-mode sidecar's does.
    let m = b.metrics().await;
    assert_eq!(metric(&m, "meshid_sidecar_revocations ", &[]), 1, "{m}");
    cli(&ca, "unrevoke", &["--id", C]);
    assert!(
        eventually(ENFORCED_WITHIN, || async {
            echo().await.as_deref() == Ok(b"hi".as_slice())
        })
        .await,
        "served again once lifted"
    );
    let m = b.metrics().await;
    assert_eq!(metric(&m, "meshid_sidecar_revocations ", &[]), 0, "{m}");
}

/// A revocation written while the rest of the directory is refused (a broken `jwt.pub`, as a hand
/// edit or a newer CA's files leave it) is enforced at once: by this CA's calls and in the bundle
/// it serves, so a sidecar that reconnects to this replica keeps it. Lifting it waits for the
/// directory to load.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_refused_directory_still_takes_new_revocations() {
    let ca = ca().await;
    let (chain, key) = issue_with_token(&ca, "frontend").await.unwrap();
    let scrape = || {
        meshid_tests::process::http_get(ca.admin_addr, "/metrics")
            .unwrap()
            .1
    };
    let rejected = || metric(&scrape(), "meshid_ca_directory_rejected", &[]);
    let reloads_refused = || {
        metric(
            &scrape(),
            "meshid_ca_directory_reloads_total",
            &["result=\"rejected\""],
        )
    };
    // jwt.pub is read at every reload but not watched: the revocation's write is what makes the
    // CA read the directory, and refuse it.
    let jwt_pub = ca.dir.path().join("jwt.pub");
    let good = std::fs::read(&jwt_pub).unwrap();
    std::fs::write(&jwt_pub, "not a key").unwrap();
    cli(&ca, "revoke", &["--id", A]);
    assert!(eventually(ENFORCED_WITHIN, || async { rejected() == 1 }).await);
    let lists_a = || async {
        ca.served_bundle()
            .await
            .revoked
            .iter()
            .any(|r| r.spiffe_id == A)
    };
    assert!(
        eventually(ENFORCED_WITHIN, lists_a).await,
        "the bundle of a CA that refuses its directory carries the new revocation"
    );
    assert_eq!(rejected(), 1, "the rest of the directory is still refused");
    let (code, message) = issue_with_token(&ca, "frontend").await.unwrap_err();
    assert_eq!(code, tonic::Code::PermissionDenied, "{message}");
    let (code, message) = renew(&ca, &chain, &key).await.unwrap_err();
    assert_eq!(code, tonic::Code::PermissionDenied, "{message}");

    // Lifted while the directory is refused: kept, over two more reloads, until it loads.
    cli(&ca, "unrevoke", &["--id", A]);
    let polls = reloads_refused();
    assert!(eventually(ENFORCED_WITHIN, || async { reloads_refused() >= polls + 2 }).await);
    assert!(
        lists_a().await,
        "a lifted revocation waits for the directory"
    );
    issue_with_token(&ca, "frontend").await.unwrap_err();
    std::fs::write(&jwt_pub, good).unwrap();
    assert!(
        eventually(ENFORCED_WITHIN, || async {
            rejected() == 0 && issue_with_token(&ca, "frontend").await.is_ok()
        })
        .await,
        "lifted once the directory loads"
    );
    assert!(!lists_a().await);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_entry_revoked_for_less_than_the_cas_max_ttl_is_served_as_long_as_its_certificates_live()
{
    // The CA's certificates live up to TTL (600 s); the entry was written for one minute.
    let ca = ca().await;
    cli(&ca, "revoke", &["--id", A, "--max-ttl", "1m"]);
    let served = eventually(ENFORCED_WITHIN, || async {
        let bundle = ca.served_bundle().await;
        bundle.revoked.first().is_some_and(|r| {
            // From when this running CA learned of it: at the write, or a poll or two later.
            let floor = r.revoked_at_unix
                + TTL.as_secs() as i64
                + meshid_ca::revocations::EXPIRY_SLACK_SECS;
            (floor..=floor + 30).contains(&r.expires_at_unix)
        })
    })
    .await;
    assert!(
        served,
        "served until the CA's --max-ttl + 10 minutes after it learned of it"
    );
}

/// A revocation list past tonic's default message size (4 MiB: about 1,800 entries of the longest
/// SPIFFE ID) still reaches the sidecars: in the bundle, and beside every certificate the CA
/// issues. Before, renewals and bundle streams failed past it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_revocation_list_past_four_mib_still_reaches_the_sidecars() {
    let ca = ca().await;
    let now = meshid_runtime::time::unix_now();
    let mut list = meshid_ca::revocations::Revocations::default();
    let long = "x".repeat(1990);
    for i in 0..2_200 {
        let id = SpiffeId::parse(&format!("spiffe://cluster.local/ns/n/sa/{i:05}{long}")).unwrap();
        list.revoke(
            meshid_identity::revocation::Revoked::Id(id),
            now,
            3600,
            "r".repeat(200),
        )
        .unwrap();
    }
    list.save(ca.dir.path()).unwrap();
    meshid_ca::authorities::RotationState::bump_version_for_revocations(ca.dir.path()).unwrap();
    assert!(
        eventually(ENFORCED_WITHIN, || async {
            ca.served_bundle().await.revoked.len() == 2_200
        })
        .await,
        "the bundle carries the whole list"
    );
    let resp = ca
        .client()
        .await
        .issue(IssueRequest {
            csr: WorkloadKey::new().csr,
            credential: Some(Credential::ServiceAccountToken(
                ca.cluster.token("shop", "frontend"),
            )),
            ttl_seconds: 0,
            app_svid: false,
        })
        .await
        .expect("issued, with the list beside it")
        .into_inner();
    assert_eq!(resp.revoked.len(), 2_200, "listed with the certificate");
}

/// An HTTP/1.1 app on 127.0.0.1 that answers every request `200 ok` and counts them in `count`.
async fn counting_app(count: Arc<std::sync::atomic::AtomicUsize>) -> std::net::SocketAddr {
    let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = l.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((mut tcp, _)) = l.accept().await {
            let count = count.clone();
            tokio::spawn(async move {
                let mut pending = Vec::new();
                let mut buf = [0u8; 4096];
                loop {
                    while let Some(end) = pending.windows(4).position(|w| w == b"\r\n\r\n") {
                        pending.drain(..end + 4);
                        count.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                        let ok = b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok";
                        if tcp.write_all(ok).await.is_err() {
                            return;
                        }
                    }
                    match tcp.read(&mut buf).await {
                        Ok(0) | Err(_) => return,
                        Ok(n) => pending.extend_from_slice(&buf[..n]),
                    }
                }
            });
        }
    });
    addr
}

/// The keep-alive connections of a peer that is then revoked: idle when the revocation comes, each
/// is closed (or refuses its next request), and not one more request reaches the app. Before, an
/// idle connection did not wait for the revocation, and a request sent after it reached the app
/// about half the time.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_revoked_peers_idle_keep_alive_connections_carry_no_request_to_the_app() {
    const CONNECTIONS: usize = 20;
    let ca = ca().await;
    let pki = TestPki::new();
    let dummy = pki.workload(A);
    let count = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let app = counting_app(count.clone()).await;
    let b = TestSidecar::start(
        &pki,
        &dummy,
        B,
        SidecarSpec {
            inbound: vec![("127.0.0.71", app, Protocol::Http)],
            policy: Some(format!(
                "inbound:\n  - port: {{port0}}\n    protocol: http\n    allow:\n      - id: {A}\n      - id: {C}\n"
            )),
            creds: Some(ca.sidecar_creds("shop", "backend", TTL)),
            ..Default::default()
        },
    )
    .await;
    // The frontend's own certificate, presented directly to the backend's inbound.
    let (chain, key) = issue_with_token(&ca, "frontend").await.unwrap();
    let frontend = meshid_tests::mesh::Workload {
        chain,
        key_der: key.secret_der().to_vec(),
        cert_path: Default::default(),
        key_path: Default::default(),
    };
    let config = meshid_tests::mesh::client_config(
        &ca.roots,
        &ca.trust_domain,
        Some(&frontend),
        &SpiffeId::parse(B).unwrap(),
        &[b"http/1.1"],
    );
    // Cart, allowed too and never revoked: its idle keep-alive connection is the control.
    let (chain, key) = issue_with_token(&ca, "cart").await.unwrap();
    let cart = meshid_tests::mesh::Workload {
        chain,
        key_der: key.secret_der().to_vec(),
        cert_path: Default::default(),
        key_path: Default::default(),
    };
    let cart_config = meshid_tests::mesh::client_config(
        &ca.roots,
        &ca.trust_domain,
        Some(&cart),
        &SpiffeId::parse(B).unwrap(),
        &[b"http/1.1"],
    );
    let mut senders = Vec::new();
    let mut cart_sender = None;
    let deadline = Instant::now() + Duration::from_secs(15);
    while senders.len() < CONNECTIONS || cart_sender.is_none() {
        assert!(Instant::now() < deadline, "no answer from the app");
        let for_cart = senders.len() == CONNECTIONS;
        let config = if for_cart { &cart_config } else { &config };
        // The sidecar's certificate or policy may still be loading: keep only connections the
        // app answered on.
        let Ok(tls) = meshid_tests::mesh::mtls_connect(b.inbound[0], config.clone()).await else {
            tokio::time::sleep(Duration::from_millis(100)).await;
            continue;
        };
        let (mut send, conn) =
            hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(tls))
                .await
                .unwrap();
        tokio::spawn(conn);
        match send.send_request(get("/x", &[])).await {
            Ok(resp) if resp.status() == 200 && for_cart => cart_sender = Some(send),
            Ok(resp) if resp.status() == 200 => senders.push(send),
            _ => tokio::time::sleep(Duration::from_millis(100)).await,
        }
    }
    let mut cart_sender = cart_sender.unwrap();
    let closed_by_revocation = || async {
        metric(
            &b.metrics().await,
            "meshid_sidecar_revoked_peer_connections_closed_total",
            &["direction=\"inbound\""],
        )
    };
    assert_eq!(closed_by_revocation().await, 0);
    // Every connection idle (its hyper state let go) before the revocation.
    tokio::time::sleep(Duration::from_millis(500)).await;

    cli(&ca, "revoke", &["--id", A]);
    assert!(
        eventually(ENFORCED_WITHIN, || async {
            metric(&b.metrics().await, "meshid_sidecar_revocations ", &[]) == 1
        })
        .await,
        "the backend applies the revocation:\n{}",
        b.metrics().await
    );
    count.store(0, std::sync::atomic::Ordering::SeqCst);
    let mut answered = Vec::new();
    let mut unanswered = 0;
    for send in &mut senders {
        let sent = tokio::time::timeout(Duration::from_secs(5), send.send_request(get("/x", &[])));
        match sent.await {
            Ok(Ok(resp)) => answered.push(resp.status().as_u16()),
            Ok(Err(_)) => unanswered += 1,
            Err(_) => panic!("a request of the revoked peer got neither an answer nor a close"),
        }
    }
    // Time for anything forwarded to land at the app.
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(
        count.load(std::sync::atomic::Ordering::SeqCst),
        0,
        "requests of a revoked peer reached the app (answers: {answered:?})"
    );
    assert!(answered.iter().all(|s| *s == 403), "{answered:?}");
    // Every connection is accounted for: refused with a 403, or closed for the revocation.
    let all_accounted = eventually(ENFORCED_WITHIN, || async {
        closed_by_revocation().await as usize + answered.len() == CONNECTIONS
    })
    .await;
    assert!(
        all_accounted,
        "{} closed for the revocation, {} answered {answered:?}, {unanswered} unanswered, of \
         {CONNECTIONS}:\n{}",
        closed_by_revocation().await,
        answered.len(),
        b.metrics().await
    );
    // The control: cart's idle connection, open all along, still reaches the app.
    let resp = tokio::time::timeout(
        Duration::from_secs(5),
        cart_sender.send_request(get("/x", &[])),
    )
    .await
    .expect("cart's request is answered")
    .expect("cart's connection is open");
    assert_eq!(resp.status(), 200);
    assert_eq!(count.load(std::sync::atomic::Ordering::SeqCst), 1);
}

/// An HTTP/1.1 app on 127.0.0.1 whose every response is an endless chunked body.
async fn endless_app() -> std::net::SocketAddr {
    let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = l.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((mut tcp, _)) = l.accept().await {
            tokio::spawn(async move {
                let mut head = Vec::new();
                let mut buf = [0u8; 4096];
                while !head.windows(4).any(|w| w == b"\r\n\r\n") {
                    match tcp.read(&mut buf).await {
                        Ok(0) | Err(_) => return,
                        Ok(n) => head.extend_from_slice(&buf[..n]),
                    }
                }
                let start = b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n";
                if tcp.write_all(start).await.is_err() {
                    return;
                }
                let mut chunk = b"4000\r\n".to_vec();
                chunk.extend_from_slice(&[b'x'; 0x4000]);
                chunk.extend_from_slice(b"\r\n");
                while tcp.write_all(&chunk).await.is_ok() {}
            });
        }
    });
    addr
}

/// A revoked peer's response in flight (one that never ends, and that the peer has stopped
/// reading) ends at once, over HTTP/1.1 and h2: its key may be in other hands, so nothing of the
/// connection waits for the grace period (a minute here), as outbound, TCP and upgraded
/// connections do not. Before, a revocation drained it as a policy change does: a stream or an
/// upload in flight went on for the grace period (20 s by default).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_revoked_peers_response_in_flight_ends_at_once_over_http1() {
    revoked_while_streaming(false, false).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_revoked_peers_response_in_flight_ends_at_once_over_h2() {
    revoked_while_streaming(true, false).await;
}

/// The same when the revocation comes while the connection drains (a policy change that no
/// longer allows the peer: its requests in flight may finish within the grace period): the
/// revocation cuts it at once, as if it had come first.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_revocation_cuts_a_draining_connection_over_http1() {
    revoked_while_streaming(false, true).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_revocation_cuts_a_draining_connection_over_h2() {
    revoked_while_streaming(true, true).await;
}

async fn revoked_while_streaming(h2: bool, draining: bool) {
    const GRACE: Duration = Duration::from_secs(60);
    let ca = ca().await;
    let pki = TestPki::new();
    let dummy = pki.workload(A);
    let b = TestSidecar::start(
        &pki,
        &dummy,
        B,
        SidecarSpec {
            inbound: vec![("127.0.0.72", endless_app().await, Protocol::Http)],
            policy: Some(format!(
                "inbound:\n  - port: {{port0}}\n    protocol: http\n    allow:\n      - id: {A}\n"
            )),
            creds: Some(ca.sidecar_creds("shop", "backend", TTL)),
            limits: Some(meshid_sidecar::settings::Limits {
                grace: GRACE,
                ..Default::default()
            }),
            ..Default::default()
        },
    )
    .await;
    let (chain, key) = issue_with_token(&ca, "frontend").await.unwrap();
    let frontend = meshid_tests::mesh::Workload {
        chain,
        key_der: key.secret_der().to_vec(),
        cert_path: Default::default(),
        key_path: Default::default(),
    };
    let alpn: &[&[u8]] = if h2 { &[b"h2"] } else { &[b"http/1.1"] };
    let config = meshid_tests::mesh::client_config(
        &ca.roots,
        &ca.trust_domain,
        Some(&frontend),
        &SpiffeId::parse(B).unwrap(),
        alpn,
    );
    // The response has started (the policy may still be loading: tried until it does). What is
    // left of it, read to its end.
    let deadline = Instant::now() + Duration::from_secs(15);
    let rest: std::pin::Pin<Box<dyn std::future::Future<Output = usize> + Send>> = loop {
        assert!(Instant::now() < deadline, "no streaming response");
        let Ok(mut tls) = meshid_tests::mesh::mtls_connect(b.inbound[0], config.clone()).await
        else {
            tokio::time::sleep(Duration::from_millis(100)).await;
            continue;
        };
        if h2 {
            let Ok((mut client, conn)) = h2::client::handshake(tls).await else {
                continue;
            };
            tokio::spawn(conn);
            let req = http::Request::get("https://app/stream").body(()).unwrap();
            let Ok((resp, _)) = client.send_request(req, true) else {
                continue;
            };
            let Ok(Ok(resp)) = tokio::time::timeout(Duration::from_secs(5), resp).await else {
                continue;
            };
            if resp.status() != 200 {
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
            let mut body = resp.into_body();
            // The first bytes came; the rest is left unread (its window stays closed).
            if !matches!(body.data().await, Some(Ok(_))) {
                continue;
            }
            break Box::pin(async move {
                let mut n = 0;
                while let Some(Ok(data)) = body.data().await {
                    n += data.len();
                    let _ = body.flow_control().release_capacity(data.len());
                }
                n
            });
        }
        if tls
            .write_all(b"GET /stream HTTP/1.1\r\nhost: app\r\n\r\n")
            .await
            .is_ok()
        {
            let mut first = [0u8; 12];
            if let Ok(Ok(_)) =
                tokio::time::timeout(Duration::from_secs(5), tls.read_exact(&mut first)).await
                && &first == b"HTTP/1.1 200"
            {
                break Box::pin(async move {
                    let mut n = 0;
                    let mut buf = vec![0u8; 64 * 1024];
                    while let Ok(k @ 1..) = tls.read(&mut buf).await {
                        n += k;
                    }
                    n
                });
            }
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    // The peer reads no more of it.
    tokio::time::sleep(Duration::from_millis(500)).await;
    if draining {
        b.write_policy(&format!(
            "inbound:\n  - port: {{port0}}\n    protocol: http\n    allow:\n      - id: {C}\n"
        ));
        assert!(
            eventually(ENFORCED_WITHIN, || async {
                metric(
                    &b.metrics().await,
                    "meshid_sidecar_connections_revoked_total",
                    &[],
                ) >= 1
            })
            .await,
            "the policy change drains the connection:\n{}",
            b.metrics().await
        );
        // Draining, not closed: the grace period is a minute.
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    cli(&ca, "revoke", &["--id", A]);
    assert!(
        eventually(ENFORCED_WITHIN, || async {
            metric(
                &b.metrics().await,
                "meshid_sidecar_revoked_peer_connections_closed_total",
                &[],
            ) >= 1
        })
        .await,
        "the connection learns of the revocation:\n{}",
        b.metrics().await
    );
    // Closed by now, far within the grace period: reading what is left ends (EOF, or the reset of
    // a dropped connection) instead of streaming on.
    let read = tokio::time::timeout(Duration::from_secs(10), rest).await;
    assert!(
        read.is_ok(),
        "the response still streams after the revocation (grace period {GRACE:?})"
    );
}

/// The top-level files of `dir` copied into a new directory (what an operator's copy of the CA
/// directory holds for `revoke`).
fn copy_of(dir: &std::path::Path) -> tempfile::TempDir {
    let copy = tempfile::tempdir().unwrap();
    for entry in std::fs::read_dir(dir).unwrap() {
        let entry = entry.unwrap();
        if entry.file_type().unwrap().is_file() {
            std::fs::copy(entry.path(), copy.path().join(entry.file_name())).unwrap();
        }
    }
    copy
}

/// Two operators with a copy of the CA directory each: one revokes A and applies it, the other,
/// from a copy taken before, revokes B and applies that (as `meshid-ca secret | kubectl apply`
/// swaps the files). The running CA does not lift A: it refuses the directory (measured, the
/// reason names the revocation it would drop) and still applies B, the revocation the older copy
/// adds. Once a copy that lifts A with `unrevoke` is applied, A is lifted. Before, the older
/// copy's list replaced the newer one and A was lifted with an audit line alone.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_older_copy_of_the_directory_lifts_no_revocation() {
    let ca = ca().await;
    let rejected = || directory_rejected(&ca);
    let lists = |id: &'static str| served_lists(&ca, id);
    let older = copy_of(ca.dir.path());
    cli(&ca, "revoke", &["--id", A]);
    assert!(eventually(ENFORCED_WITHIN, || lists(A)).await);
    let newer = copy_of(ca.dir.path());
    // The other operator revokes B in the older copy and applies it.
    let older_dir = older.path().to_string_lossy().into_owned();
    let (code, out) = meshid_ca(&["revoke", "--dir", older_dir.as_str(), "--id", B]);
    assert_eq!(code, 0, "{out}");
    let apply = |from: &std::path::Path| {
        for name in ["revocations.json", meshid_ca::authorities::STATE_FILE] {
            std::fs::write(
                ca.dir.path().join(name),
                std::fs::read(from.join(name)).unwrap(),
            )
            .unwrap();
        }
    };
    apply(older.path());
    assert!(eventually(ENFORCED_WITHIN, || async { rejected() == 1 }).await);
    assert!(
        eventually(ENFORCED_WITHIN, || lists(B)).await,
        "the older copy's own revocation is applied"
    );
    tokio::time::sleep(Duration::from_millis(2500)).await;
    assert!(lists(A).await, "the newer revocation is kept");
    let (code, message) = issue_with_token(&ca, "frontend").await.unwrap_err();
    assert_eq!(code, tonic::Code::PermissionDenied, "{message}");

    // The newer copy, with B revoked too and A lifted by unrevoke: applied, A lifted.
    let newer_dir = newer.path().to_string_lossy().into_owned();
    for args in [["revoke", "--id", B], ["unrevoke", "--id", A]] {
        let (code, out) = meshid_ca(&[args[0], "--dir", newer_dir.as_str(), args[1], args[2]]);
        assert_eq!(code, 0, "{out}");
    }
    apply(newer.path());
    assert!(
        eventually(ENFORCED_WITHIN, || async {
            rejected() == 0 && issue_with_token(&ca, "frontend").await.is_ok()
        })
        .await,
        "the copy that lifts A is applied"
    );
    assert!(!lists(A).await && lists(B).await);
}

/// A change to `revocations.json` is seen even when the new file has the old one's length and
/// modification time (two writes within one tick of a coarse filesystem clock): every write
/// renames a new file into place, and the CA watches the inode too. Before, it compared time and
/// length alone, and missed such a change for good.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_list_replaced_within_one_clock_tick_is_seen() {
    const TWIN: &str = "spiffe://cluster.local/ns/shop/sa/frontenx";
    let ca = ca().await;
    let lists = |id: &'static str| served_lists(&ca, id);
    cli(&ca, "revoke", &["--id", A]);
    assert!(eventually(ENFORCED_WITHIN, || lists(A)).await);
    let path = ca.dir.path().join("revocations.json");
    let before = std::fs::read_to_string(&path).unwrap();
    let modified = std::fs::metadata(&path).unwrap().modified().unwrap();
    let after = before.replace(A, TWIN);
    assert_eq!(after.len(), before.len());
    let next = ca.dir.path().join(".revocations.json.next");
    std::fs::write(&next, &after).unwrap();
    std::fs::File::options()
        .write(true)
        .open(&next)
        .unwrap()
        .set_modified(modified)
        .unwrap();
    std::fs::rename(&next, &path).unwrap();
    assert_eq!(
        std::fs::metadata(&path).unwrap().modified().unwrap(),
        modified
    );
    // Read: the twin's revocation is applied (and A kept: nothing lifted it).
    assert!(
        eventually(ENFORCED_WITHIN, || lists(TWIN)).await,
        "the replaced list was never read"
    );
    assert!(lists(A).await);
}

/// A sidecar whose own certificate is revoked is not ready: every peer of the same trust refuses
/// it, so the pod must leave its Service's endpoints. A join-token sidecar cannot attest again by
/// itself (its token is spent, and the CA refuses to renew a revoked lineage), so it stays unready
/// until it gets a new token; `/readyz` says why.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_sidecar_whose_own_certificate_is_revoked_is_not_ready() {
    use meshid_sidecar::settings::{Bootstrap, CaMode};
    let ca = ca().await;
    let token_file = ca.dir.path().join("cart.join");
    std::fs::write(&token_file, ca.join_token(C, Duration::from_secs(600))).unwrap();
    let pki = TestPki::new();
    let sidecar = TestSidecar::start(
        &pki,
        &pki.workload(C),
        C,
        SidecarSpec {
            outbound: vec![("127.0.0.1:9".into(), B.into(), Protocol::Tcp)],
            creds: Some(meshid_sidecar::settings::CredSource::Ca(CaMode {
                endpoint: ca.endpoint(),
                bootstrap: Bootstrap::JoinTokenFile(token_file),
                ttl: Some(TTL),
                bundle_cache: None,
            })),
            ..Default::default()
        },
    )
    .await;
    let readyz = || {
        let admin = sidecar.admin;
        async move {
            tokio::task::spawn_blocking(move || meshid_tests::process::http_get(admin, "/readyz"))
                .await
                .unwrap()
                .unwrap_or((0, String::new()))
        }
    };
    assert!(
        eventually(Duration::from_secs(10), || async {
            readyz().await.0 == 200
        })
        .await,
        "ready with its join token"
    );
    let admin = sidecar.admin;
    let (_, identity) =
        tokio::task::spawn_blocking(move || meshid_tests::process::http_get(admin, "/identity"))
            .await
            .unwrap()
            .unwrap();
    let serial = identity
        .split("\"serial\":\"")
        .nth(1)
        .and_then(|rest| rest.split('"').next())
        .expect("a serial in /identity")
        .to_owned();
    cli(&ca, "revoke", &["--serial", &format!("serial={serial}")]);
    let unready = eventually(ENFORCED_WITHIN, || async {
        let (code, body) = readyz().await;
        code == 503 && body.contains("revoked")
    })
    .await;
    assert!(unready, "not ready once revoked: {:?}", readyz().await);
}

/// What a [`holding_relay`] holds back until released.
#[derive(Clone, Copy)]
enum Held {
    /// Everything from the server: an upstream that draws its handshake out.
    UpstreamsAnswer,
    /// Everything from the client after its first write (its ClientHello): a peer that draws its
    /// handshake out.
    ClientsRest,
}

/// A TCP relay to `to` that holds back what `held` says until `release` is notified.
async fn holding_relay(
    to: std::net::SocketAddr,
    held: Held,
    release: Arc<tokio::sync::Notify>,
) -> std::net::SocketAddr {
    let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = l.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((client, _)) = l.accept().await {
            let release = release.clone();
            tokio::spawn(async move {
                let Ok(server) = tokio::net::TcpStream::connect(to).await else {
                    return;
                };
                let (mut cr, mut cw) = client.into_split();
                let (mut sr, mut sw) = server.into_split();
                let (hold_down, hold_up) = match held {
                    Held::UpstreamsAnswer => (Some(release.clone()), None),
                    Held::ClientsRest => (None, Some(release)),
                };
                let down = tokio::spawn(async move {
                    if let Some(release) = hold_down {
                        release.notified().await;
                    }
                    let _ = tokio::io::copy(&mut sr, &mut cw).await;
                    let _ = cw.shutdown().await;
                });
                if let Some(release) = hold_up {
                    let mut first = vec![0u8; 16 * 1024];
                    let Ok(n) = cr.read(&mut first).await else {
                        return;
                    };
                    if sw.write_all(&first[..n]).await.is_err() {
                        return;
                    }
                    release.notified().await;
                }
                let _ = tokio::io::copy(&mut cr, &mut sw).await;
                let _ = sw.shutdown().await;
                let _ = down.await;
            });
        }
    });
    addr
}

/// A frontend (A) with two TCP upstreams to a backend (B, in front of an app that counts
/// requests), one of them through a [`holding_relay`]: a request through the relay is asked while
/// the handshake is held, `revoked` is revoked meanwhile, and once the sidecars have the bundle
/// the handshake is let go. The request must not reach the app: the handshake was verified against
/// the trust of when it began, and the bytes the app wrote meanwhile went out before the
/// connection's revocation watch first looked.
async fn revoked_while_a_handshake_is_held(held: Held, revoked: &str) {
    let ca = ca().await;
    let pki = TestPki::new();
    let dummy = pki.workload(A);
    let count = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let ip = match held {
        Held::UpstreamsAnswer => "127.0.0.23",
        Held::ClientsRest => "127.0.0.24",
    };
    let b = TestSidecar::start(
        &pki,
        &dummy,
        B,
        SidecarSpec {
            inbound: vec![(ip, counting_app(count.clone()).await, Protocol::Tcp)],
            policy: Some(format!(
                "inbound:\n  - port: {{port0}}\n    protocol: tcp\n    allow:\n      - id: {A}\n"
            )),
            creds: Some(ca.sidecar_creds("shop", "backend", TTL)),
            ..Default::default()
        },
    )
    .await;
    let release = Arc::new(tokio::sync::Notify::new());
    let relay = holding_relay(b.inbound[0], held, release.clone()).await;
    let a = TestSidecar::start(
        &pki,
        &dummy,
        A,
        SidecarSpec {
            outbound: vec![
                (b.inbound[0].to_string(), B.into(), Protocol::Tcp),
                (relay.to_string(), B.into(), Protocol::Tcp),
            ],
            creds: Some(ca.sidecar_creds("shop", "frontend", TTL)),
            ..Default::default()
        },
    )
    .await;
    let ask = |out: std::net::SocketAddr| async move {
        let mut tcp = tokio::net::TcpStream::connect(out).await?;
        tcp.write_all(b"GET / HTTP/1.1\r\nHost: b\r\n\r\n").await?;
        let mut answer = [0u8; 64];
        let n = tokio::time::timeout(Duration::from_secs(5), tcp.read(&mut answer))
            .await
            .map_err(|_| std::io::Error::other("no answer within 5 s"))??;
        Ok::<_, std::io::Error>(String::from_utf8_lossy(&answer[..n]).into_owned())
    };
    assert!(
        eventually(Duration::from_secs(15), || async {
            ask(a.outbound[0]).await.is_ok_and(|a| a.ends_with("ok"))
        })
        .await,
        "the pair serves traffic"
    );
    let served = count.load(std::sync::atomic::Ordering::SeqCst);

    let asked = tokio::spawn(ask(a.outbound[1]));
    tokio::time::sleep(Duration::from_millis(300)).await;
    cli(
        &ca,
        "revoke",
        &["--id", revoked, "--reason", "mid-handshake"],
    );
    assert!(
        eventually(ENFORCED_WITHIN, || served_lists(&ca, revoked)).await,
        "the CA serves the revocation"
    );
    // The sidecars take the bundle within moments of the CA serving it.
    tokio::time::sleep(Duration::from_secs(2)).await;
    release.notify_waiters();
    let answer = asked.await.unwrap();
    assert!(
        !answer.as_ref().is_ok_and(|a| a.ends_with("ok")),
        "answered through a revoked party: {answer:?}"
    );
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(
        count.load(std::sync::atomic::Ordering::SeqCst),
        served,
        "a request reached the app through a revoked party"
    );
}

/// The upstream revoked while it holds back its answer: the outbound checks it against the trust
/// in force once the handshake is done, before any byte goes to it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_revocation_during_an_outbound_handshake_stops_the_bytes_written_meanwhile() {
    revoked_while_a_handshake_is_held(Held::UpstreamsAnswer, B).await;
}

/// The peer revoked while it holds back the rest of its handshake: the inbound TCP listener
/// checks it against the trust in force before the first byte goes to the app.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_peer_revoked_during_its_handshake_gets_no_byte_to_a_tcp_app() {
    revoked_while_a_handshake_is_held(Held::ClientsRest, A).await;
}
