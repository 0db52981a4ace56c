//! Root rotation under continuous traffic through a sidecar pair: prepare -> activate -> retire with no
//! failed request and no restart, each gate refusing (naming what blocks) until the fleet converged.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::time::Duration;

use meshid_ca::rotation::{self, RotateError};
use meshid_ca::signer::LifetimePolicy;
use meshid_identity::policy::Protocol;
use meshid_proto::ca::v1::{
    AckTrustBundleRequest, IssueRequest, WatchTrustBundleRequest, issue_request::Credential,
};
use meshid_sidecar::settings::CredSource;
use meshid_sidecar::settings::{Bootstrap, CaMode};
use meshid_tests::ca::{CaOptions, TestCa};
use meshid_tests::mesh::{
    SidecarSpec, TestPki, TestSidecar, Traffic, eventually, get, http_echo, http_request,
};
use meshid_tests::pki::WorkloadKey;
use rustls::pki_types::CertificateDer;

const A: &str = "spiffe://cluster.local/ns/shop/sa/frontend";
const B: &str = "spiffe://cluster.local/ns/shop/sa/backend";
const TTL: Duration = Duration::from_secs(8);

/// A CA whose certificates all live [`TTL`].
async fn ca_issuing_for_ttl() -> TestCa {
    TestCa::start(CaOptions {
        lifetimes: LifetimePolicy {
            default: TTL,
            max: TTL,
        },
        ..CaOptions::default()
    })
    .await
}

fn ca_mode(ca: &TestCa, sa: &str) -> CredSource {
    let token = ca.dir.path().join(format!("{sa}.token"));
    std::fs::write(&token, ca.cluster.token("shop", sa)).unwrap();
    CredSource::Ca(CaMode {
        endpoint: ca.endpoint(),
        bootstrap: Bootstrap::TokenFile(token),
        ttl: Some(TTL),
        bundle_cache: None,
    })
}

/// `rotate activate`, tried every 100 ms for up to 10 s (until the sidecars converged).
async fn activate_within_10s(
    dir: &std::path::Path,
    admins: &[std::net::SocketAddr],
) -> Option<String> {
    for _ in 0..100 {
        match rotation::activate(dir, admins, false).await {
            Ok(name) => return Some(name),
            Err(_) => tokio::time::sleep(Duration::from_millis(100)).await,
        }
    }
    None
}

async fn anchors(sidecar: &TestSidecar) -> Option<u64> {
    let m = sidecar.metrics().await;
    m.lines()
        .find_map(|l| l.strip_prefix("meshid_sidecar_trust_anchors "))
        .and_then(|v| v.trim().parse().ok())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn root_rotation_under_traffic_with_gates() {
    let ca = ca_issuing_for_ttl().await;
    let dir = ca.dir.path().to_owned();
    let admins = [ca.admin_addr];
    let pair = LongPair::start(&ca, "127.0.0.11", None).await;
    let (a, b) = (&pair.a, &pair.b);
    let local = a.outbound[0];
    assert!(
        eventually(Duration::from_secs(10), || pair.works()).await,
        "the pair serves traffic"
    );

    // Continuous traffic for the whole rotation.
    let traffic = Traffic::start(local, None);

    // Nothing to activate or retire yet.
    assert!(matches!(
        rotation::activate(&dir, &admins, false).await,
        Err(RotateError::Refused(_))
    ));
    assert!(matches!(
        rotation::retire(&dir, &admins, false).await,
        Err(RotateError::Refused(_))
    ));

    // A lagging sidecar: connected with a valid certificate, acknowledging only the old bundle.
    let lagging = {
        let w = WorkloadKey::new();
        let mut c = ca.client().await;
        let resp = c
            .issue(IssueRequest {
                csr: w.csr.clone(),
                credential: Some(Credential::ServiceAccountToken(
                    ca.cluster.token("shop", "lagging"),
                )),
                ttl_seconds: 0,
                app_svid: false,
            })
            .await
            .unwrap()
            .into_inner();
        let chain: Vec<CertificateDer<'static>> = resp
            .cert_chain
            .iter()
            .cloned()
            .map(CertificateDer::from)
            .collect();
        let mut c = ca
            .client_with_cert(chain.clone(), w.private_key_der())
            .await
            .unwrap();
        let stream = c
            .watch_trust_bundle(WatchTrustBundleRequest {
                instance_id: "lagging-1".into(),
                file_mode: false,
            })
            .await
            .unwrap()
            .into_inner();
        c.ack_trust_bundle(AckTrustBundleRequest {
            instance_id: "lagging-1".into(),
            bundle_version: 1,
            serving_chain: resp.cert_chain.clone(),
            file_mode: false,
            held_version: 0,
        })
        .await
        .unwrap();
        // An ack for a certificate the caller does not hold is refused, for that reason (the
        // version is one published: only the certificate is wrong).
        let forged = c
            .ack_trust_bundle(AckTrustBundleRequest {
                instance_id: "lagging-1".into(),
                bundle_version: 1,
                serving_chain: vec![ca.roots[0].to_vec()],
                file_mode: false,
                held_version: 0,
            })
            .await
            .unwrap_err();
        assert_eq!(forged.code(), tonic::Code::PermissionDenied, "{forged:?}");
        assert!(
            forged.message().contains("not the one presented"),
            "{forged:?}"
        );
        stream
    };

    // Prepare: the new root reaches every sidecar without a restart.
    let new_name = rotation::prepare(&dir, None).unwrap();
    assert!(
        eventually(Duration::from_secs(10), || async {
            anchors(a).await == Some(2) && anchors(b).await == Some(2)
        })
        .await,
        "both sidecars trust both roots"
    );
    // The activate gate names the sidecar that has not acknowledged.
    match rotation::activate(&dir, &admins, false).await {
        Err(RotateError::Refused(why)) => assert!(why.contains("ns/shop/sa/lagging"), "{why}"),
        other => panic!("activate must wait for the lagging sidecar: {other:?}"),
    }
    drop(lagging);
    // Once only converged sidecars are connected, activate passes.
    let activated = activate_within_10s(&dir, &admins)
        .await
        .expect("activate passes once every connected sidecar acknowledged");
    assert_eq!(activated, new_name);

    // Retire refuses while certificates under the old root are live, naming them...
    match rotation::retire(&dir, &admins, false).await {
        Err(RotateError::Refused(why)) => assert!(why.contains("authority 1"), "{why}"),
        other => panic!("retire must wait for old certificates: {other:?}"),
    }
    // ...and passes once they have expired and every sidecar serves a certificate of the new root.
    let retired = {
        let mut result = None;
        for _ in 0..200 {
            match rotation::retire(&dir, &admins, false).await {
                Ok(name) => {
                    result = Some(name);
                    break;
                }
                Err(_) => tokio::time::sleep(Duration::from_millis(100)).await,
            }
        }
        result.expect("retire passes after convergence")
    };
    assert_eq!(retired, "1");
    assert!(
        eventually(Duration::from_secs(10), || async {
            anchors(a).await == Some(1) && anchors(b).await == Some(1)
        })
        .await,
        "the old root left every sidecar's trust anchors"
    );
    let report = rotation::status(&dir, &admins).await.unwrap();
    assert!(
        report.authorities.iter().all(|x| x.name == new_name),
        "{report:?}"
    );
    assert!(
        report.sidecars.iter().filter(|s| s.connected).count() >= 2,
        "both sidecars connected: {report:?}"
    );
    assert!(
        report
            .sidecars
            .iter()
            .filter(|s| s.connected)
            .all(|s| s.serving_authority.as_deref() == Some(new_name.as_str())),
        "{report:?}"
    );

    let (ok, failed) = traffic.finish().await;
    assert!(ok > 50, "traffic flowed");
    assert_eq!(failed, 0, "no request failed during the rotation");
}

/// A pair A -> B with certificates from `ca` (of lifetime `ttl`, or the CA's default; an hour:
/// nothing renews on its own during a test), B's inbound on `ip` allowing A.
struct LongPair {
    _pki: TestPki,
    a: TestSidecar,
    b: TestSidecar,
}

impl LongPair {
    async fn start(ca: &TestCa, ip: &'static str, ttl: Option<Duration>) -> Self {
        let pki = TestPki::new();
        let dummy = pki.workload(A);
        let long = |sa: &str| match ca_mode(ca, sa) {
            CredSource::Ca(mut m) if ttl.is_some() => {
                m.ttl = ttl;
                CredSource::Ca(m)
            }
            other => other,
        };
        let b = TestSidecar::start(
            &pki,
            &dummy,
            B,
            SidecarSpec {
                inbound: vec![(ip, http_echo().await, Protocol::Http)],
                policy: Some(format!(
                    "inbound:\n  - port: {{port0}}\n    protocol: http\n    allow:\n      - id: {A}\n"
                )),
                creds: Some(long("backend")),
                ..Default::default()
            },
        )
        .await;
        let a = TestSidecar::start(
            &pki,
            &dummy,
            A,
            SidecarSpec {
                outbound: vec![(b.inbound[0].to_string(), B.into(), Protocol::Http)],
                creds: Some(long("frontend")),
                ..Default::default()
            },
        )
        .await;
        Self { _pki: pki, a, b }
    }

    /// Whether a request from A's app through the pair is answered.
    async fn works(&self) -> bool {
        let Ok(tcp) = tokio::net::TcpStream::connect(self.a.outbound[0]).await else {
            return false;
        };
        matches!(
            http_request(tcp, false, get("/x", &[])).await,
            Ok((200, _, _))
        )
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn intermediate_rotation_and_forced_retire_renew_at_once() {
    // Long lifetimes: nothing renews on its own during this test.
    let ca = TestCa::start(CaOptions::default()).await;
    let dir = ca.dir.path().to_owned();
    let admins = [ca.admin_addr];
    let pair = LongPair::start(&ca, "127.0.0.12", Some(Duration::from_secs(3600))).await;
    let (a, b) = (&pair.a, &pair.b);
    let works = || pair.works();
    assert!(eventually(Duration::from_secs(10), works).await);

    // A new signing intermediate under the same root: no bundle change, traffic unaffected.
    let before = std::fs::read(dir.join("intermediate.pem")).unwrap();
    rotation::intermediate(&dir).unwrap();
    assert_ne!(std::fs::read(dir.join("intermediate.pem")).unwrap(), before);
    let new_inter = meshid_ca::authority::Authority::load(&dir)
        .unwrap()
        .intermediate_der;
    let signed_by_new = eventually(Duration::from_secs(10), || async {
        let w = WorkloadKey::new();
        let resp = ca
            .client()
            .await
            .issue(IssueRequest {
                csr: w.csr,
                credential: Some(Credential::ServiceAccountToken(
                    ca.cluster.token("shop", "probe"),
                )),
                ttl_seconds: 0,
                app_svid: false,
            })
            .await;
        resp.is_ok_and(|r| r.into_inner().cert_chain[1] == new_inter.to_vec())
    })
    .await;
    assert!(
        signed_by_new,
        "the CA signs with the new intermediate without a restart"
    );
    assert!(works().await);

    // Root rotation with a forced retirement: sidecars are told to renew at once.
    let new_name = rotation::prepare(&dir, None).unwrap();
    assert!(
        eventually(Duration::from_secs(10), || async {
            anchors(a).await == Some(2) && anchors(b).await == Some(2)
        })
        .await
    );
    let mut activated = false;
    for _ in 0..100 {
        if rotation::activate(&dir, &admins, false).await.is_ok() {
            activated = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(activated);
    assert!(matches!(
        rotation::retire(&dir, &admins, false).await,
        Err(RotateError::Refused(_))
    ));
    rotation::retire(&dir, &admins, true).await.unwrap();
    let converged = eventually(Duration::from_secs(15), || async {
        let report = rotation::status(&dir, &admins).await.unwrap();
        anchors(a).await == Some(1)
            && anchors(b).await == Some(1)
            && report.sidecars.iter().filter(|s| s.connected).count() >= 2
            && report
                .sidecars
                .iter()
                .filter(|s| s.connected)
                .all(|s| s.serving_authority.as_deref() == Some(new_name.as_str()))
    })
    .await;
    assert!(converged, "{:?}", rotation::status(&dir, &admins).await);
    assert!(
        eventually(Duration::from_secs(10), works).await,
        "traffic under the new root"
    );
    // Renewed once each: every message of the retired version says "renew now", the first of
    // each new stream too, and a renewal opens a new stream (before, each sidecar renewed in a
    // loop, as fast as the CA's rate limit let it, until the bundle version moved on).
    let before = (renewals(a).await, renewals(b).await);
    tokio::time::sleep(Duration::from_secs(3)).await;
    assert_eq!((renewals(a).await, renewals(b).await), before);
}

/// Successful certificate requests of `sidecar`.
async fn renewals(sidecar: &TestSidecar) -> u64 {
    let m = sidecar.metrics().await;
    m.lines()
        .find_map(|l| l.strip_prefix(r#"meshid_sidecar_renewals_total{result="success"} "#))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or(0)
}

async fn bundle_of(addr: std::net::SocketAddr, roots: &[CertificateDer<'static>]) -> (u64, usize) {
    let mut c = meshid_tests::ca::connect(addr, roots, None).await.unwrap();
    let b = c
        .get_trust_bundle(meshid_proto::ca::v1::GetTrustBundleRequest {})
        .await
        .unwrap()
        .into_inner();
    (b.version, b.roots.len())
}

async fn issuing_root(
    ca: &TestCa,
    addr: std::net::SocketAddr,
    roots: &[CertificateDer<'static>],
) -> Option<String> {
    let mut c = meshid_tests::ca::connect(addr, roots, None).await.ok()?;
    let resp = c
        .issue(IssueRequest {
            csr: WorkloadKey::new().csr,
            credential: Some(Credential::ServiceAccountToken(
                ca.cluster.token("shop", "probe"),
            )),
            ttl_seconds: 0,
            app_svid: false,
        })
        .await
        .ok()?
        .into_inner();
    let chain: Vec<CertificateDer<'static>> = resp
        .cert_chain
        .into_iter()
        .map(CertificateDer::from)
        .collect();
    let authorities = meshid_ca::authority::Authority::load(ca.dir.path())
        .ok()?
        .authority_anchors;
    meshid_ca::rotation::fleet::authority_of(
        &chain,
        &authorities,
        meshid_tests::fake_cluster::unix_now(),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_cas_on_one_directory_agree_and_a_restart_keeps_the_state() {
    let mut ca = TestCa::start(CaOptions::default()).await;
    let replica = ca.start_replica().await;
    let dir = ca.dir.path().to_owned();
    let roots_v1 = ca.roots.clone();
    let new_name = rotation::prepare(&dir, None).unwrap();
    // Both processes serve the same new bundle version, with both roots.
    let agreed = eventually(Duration::from_secs(10), || async {
        bundle_of(ca.addr, &roots_v1).await == (2, 2)
            && bundle_of(replica.addr, &roots_v1).await == (2, 2)
    })
    .await;
    assert!(agreed);
    // A restart in the middle of the rotation keeps the state.
    ca.stop().await;
    ca.restart().await;
    assert_eq!(bundle_of(ca.addr, &roots_v1).await, (2, 2));
    assert_eq!(
        issuing_root(&ca, ca.addr, &roots_v1).await.as_deref(),
        Some("1")
    );
    // Activate with both CAs' views (no sidecar connected): both switch to the new authority.
    rotation::activate(&dir, &[ca.admin_addr, replica.admin_addr], false)
        .await
        .unwrap();
    let all_roots = meshid_ca::authority::read_bundle(&dir.join("bundle.pem")).unwrap();
    let switched = eventually(Duration::from_secs(10), || async {
        issuing_root(&ca, ca.addr, &all_roots).await.as_deref() == Some(new_name.as_str())
            && issuing_root(&ca, replica.addr, &all_roots).await.as_deref()
                == Some(new_name.as_str())
    })
    .await;
    assert!(switched, "both CA processes sign with the new authority");
    replica.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_expired_root_can_still_be_replaced() {
    use rcgen::{BasicConstraints, CertificateParams, IsCa, KeyPair, KeyUsagePurpose};
    let dir = tempfile::tempdir().unwrap();
    let ca_dir = dir.path().join("ca");
    // An enterprise root that expired yesterday.
    let key = KeyPair::generate().unwrap();
    let mut params = CertificateParams::default();
    params.is_ca = IsCa::Ca(BasicConstraints::Constrained(1));
    params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
    params.not_before = time::OffsetDateTime::now_utc() - time::Duration::days(400);
    params.not_after = time::OffsetDateTime::now_utc() - time::Duration::days(1);
    let cert = params.self_signed(&key).unwrap();
    meshid_ca::authority::init(
        &ca_dir,
        &meshid_identity::TrustDomain::new("cluster.local").unwrap(),
        Some(meshid_ca::authority::ImportedRoot {
            cert_pem: cert.pem(),
            key_pem: key.serialize_pem(),
        }),
    )
    .unwrap();
    // The CA starts, but cannot sign: its intermediate died with the root.
    let mut registry = prometheus_client::registry::Registry::default();
    let cluster = meshid_tests::fake_cluster::FakeCluster::new();
    cluster.write_jwks(&ca_dir.join("jwks.json"));
    let config = meshid_ca::ServeConfig {
        dir: ca_dir.clone(),
        listen: "127.0.0.1:0".parse().unwrap(),
        admin_listen: "127.0.0.1:0".parse().unwrap(),
        sans: vec!["localhost".into()],
        jwt: Some(meshid_ca::auth::JwtConfig {
            jwks: meshid_ca::auth::JwksSource::File(ca_dir.join("jwks.json")),
            issuer: meshid_tests::fake_cluster::ISSUER.into(),
            audience: meshid_tests::fake_cluster::AUDIENCE.into(),
            allowed_namespaces: None,
            max_token_lifetime: meshid_ca::auth::JwtConfig::DEFAULT_MAX_TOKEN_LIFETIME,
            dangerous_accept_unbound_tokens: false,
            token_review: false,
        }),
        lifetimes: Default::default(),
        max_attestation_age: Duration::from_secs(24 * 3600),
        jwt_svid_ttl: Duration::from_secs(300),
        rate_limit: Default::default(),
        namespace_rate_limit: meshid_ca::ratelimit::RateLimit::default().per_namespace(),
        limits: Default::default(),
        grace: Duration::from_secs(2),
    };
    // The serving certificate is capped by the (expired) intermediate too, so recovery is done on
    // the directory first, then the CA starts with the new authority.
    let started = meshid_ca::start(config.clone(), &mut registry).await;
    if let Ok(ca) = started {
        ca.shutdown().await;
    }
    let name = rotation::prepare(&ca_dir, None).unwrap();
    rotation::activate(&ca_dir, &[], false).await.unwrap();
    rotation::retire(&ca_dir, &[], false).await.unwrap();
    let mut registry = prometheus_client::registry::Registry::default();
    let ca = meshid_ca::start(config, &mut registry)
        .await
        .expect("CA starts on the new root");
    let roots = meshid_ca::authority::read_bundle(&ca_dir.join("bundle.pem")).unwrap();
    assert_eq!(roots.len(), 1);
    let mut c = meshid_tests::ca::connect(ca.addr, &roots, None)
        .await
        .unwrap();
    let resp = c
        .issue(IssueRequest {
            csr: WorkloadKey::new().csr,
            credential: Some(Credential::ServiceAccountToken(
                cluster.token("shop", "frontend"),
            )),
            ttl_seconds: 0,
            app_svid: false,
        })
        .await
        .expect("issues under the replacement root")
        .into_inner();
    let chain: Vec<CertificateDer<'static>> = resp
        .cert_chain
        .into_iter()
        .map(CertificateDer::from)
        .collect();
    let authorities = meshid_ca::authority::Authority::load(&ca_dir)
        .unwrap()
        .authority_anchors;
    assert_eq!(
        meshid_ca::rotation::fleet::authority_of(
            &chain,
            &authorities,
            meshid_tests::fake_cluster::unix_now()
        ),
        Some(name)
    );
    ca.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn file_mode_sidecars_are_reported_as_unknown() {
    let ca = TestCa::start(CaOptions::default()).await;
    let dir = ca.dir.path().to_owned();
    let admins = [ca.admin_addr];
    // Credentials issued by this CA but handed to the sidecar as files (operator tooling).
    let files = tempfile::tempdir().unwrap();
    let creds = ca.issue_to_files("shop", "files", files.path()).await;
    let pki = TestPki::new();
    let dummy = pki.workload(A);
    let id = "spiffe://cluster.local/ns/shop/sa/files";
    let sidecar = TestSidecar::start(
        &pki,
        &dummy,
        id,
        SidecarSpec {
            inbound: vec![("127.0.0.12", http_echo().await, Protocol::Http)],
            creds: Some(CredSource::Files(creds)),
            report_to: Some(ca.report_endpoint()),
            ..Default::default()
        },
    )
    .await;

    // The CA sees it, marked as file mode, serving under the active authority.
    let seen = eventually(Duration::from_secs(10), || async {
        rotation::status(&dir, &admins).await.is_ok_and(|r| {
            r.sidecars.iter().any(|s| {
                s.identity == id && s.connected && s.file_mode && s.serving_authority.is_some()
            })
        })
    })
    .await;
    assert!(seen, "{:?}", rotation::status(&dir, &admins).await);
    let r = rotation::status(&dir, &admins).await.unwrap();
    let s = r.sidecars.iter().find(|s| s.identity == id).unwrap();
    assert_eq!(s.serving_authority.as_deref(), Some("1"));
    assert_eq!(
        s.acked_version, 0,
        "a file-mode bundle version means nothing"
    );
    assert_eq!(r.unknown.len(), 1, "{:?}", r.unknown);

    // Prepare: the CA cannot know whether the sidecar's bundle file holds the new root, so the
    // sidecar does not block activate, and status says it is unknown.
    rotation::prepare(&dir, None).unwrap();
    let r = rotation::status(&dir, &admins).await.unwrap();
    assert!(
        r.next_step.starts_with("activate:")
            && r.next_step.contains("1 file-mode sidecar(s) unknown"),
        "{}",
        r.next_step
    );
    assert!(r.unknown[0].contains(id), "{:?}", r.unknown);
    rotation::activate(&dir, &admins, false).await.unwrap();

    // Retire: what it serves is measured (it presented the chain), so it blocks, naming it.
    match rotation::retire(&dir, &admins, false).await {
        Err(RotateError::Refused(why)) => assert!(why.contains(id), "{why}"),
        other => panic!("retire should refuse: {other:?}"),
    }
    drop(sidecar);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_kept_alive_connection_cannot_renew_after_its_root_was_retired() {
    let ca = TestCa::start(CaOptions::default()).await;
    let dir = ca.dir.path().to_owned();
    let old_root = ca.roots[0].clone();
    // A workload under the first root, with its token.
    let w = WorkloadKey::new();
    let resp = ca
        .client()
        .await
        .issue(IssueRequest {
            csr: w.csr.clone(),
            credential: Some(Credential::ServiceAccountToken(
                ca.cluster.token("shop", "frontend"),
            )),
            ttl_seconds: 0,
            app_svid: false,
        })
        .await
        .unwrap()
        .into_inner();
    let serving_chain = resp.cert_chain.clone();
    let chain: Vec<CertificateDer<'static>> = resp
        .cert_chain
        .into_iter()
        .map(CertificateDer::from)
        .collect();
    // One channel presenting that certificate, kept for the whole test: its TLS handshake (and
    // what the CA learned from it) happened under the first root.
    let mut channel = ca
        .client_with_cert(chain, w.private_key_der())
        .await
        .unwrap();
    let renew = || IssueRequest {
        csr: WorkloadKey::new().csr,
        credential: None,
        ttl_seconds: 0,
        app_svid: false,
    };
    let renewed = channel.issue(renew()).await.expect("renews under its root");
    assert_eq!(renewed.get_ref().spiffe_id, A);
    // On the same connection, a bundle stream (the instance the rotation gates count) and its
    // acknowledgement of the first bundle.
    let watch = || WatchTrustBundleRequest {
        instance_id: "kept-alive".into(),
        file_mode: false,
    };
    let ack = |bundle_version| AckTrustBundleRequest {
        instance_id: "kept-alive".into(),
        bundle_version,
        serving_chain: serving_chain.clone(),
        file_mode: false,
        held_version: 0,
    };
    let mut first_stream = channel
        .watch_trust_bundle(watch())
        .await
        .expect("a bundle stream under its root")
        .into_inner();
    let first = first_stream.message().await.unwrap().unwrap().version;
    channel
        .ack_trust_bundle(ack(first))
        .await
        .expect("acknowledges under its root");

    // Watching the bundle from a connection made now (a new one, once the CA serves under the
    // new root, would have to trust that root).
    let mut anonymous = meshid_tests::ca::connect(ca.addr, &ca.roots, None)
        .await
        .unwrap();

    // The emergency path: a new root, signing at once, the old root out of the bundle.
    rotation::prepare(&dir, None).unwrap();
    rotation::activate(&dir, &[], true).await.unwrap();
    rotation::retire(&dir, &[], true).await.unwrap();
    let retired = eventually(Duration::from_secs(10), || {
        let mut c = anonymous.clone();
        let old_root = old_root.to_vec();
        async move {
            c.get_trust_bundle(meshid_proto::ca::v1::GetTrustBundleRequest {})
                .await
                .is_ok_and(|b| !b.get_ref().roots.contains(&old_root))
        }
    })
    .await;
    assert!(retired, "the CA serves a bundle without the retired root");

    // The next renewal on the same connection is refused, as a new handshake would be.
    let refused = channel
        .issue(renew())
        .await
        .expect_err("a certificate under the retired root must not renew");
    assert_eq!(refused.code(), tonic::Code::Unauthenticated, "{refused:?}");
    assert!(
        refused.message().contains("no longer chains"),
        "refused on the kept-alive connection by the renewal check, not at a new handshake: {refused:?}"
    );
    let admin = ca.admin_addr;
    let (_, metrics) =
        tokio::task::spawn_blocking(move || meshid_tests::process::http_get(admin, "/metrics"))
            .await
            .unwrap()
            .unwrap();
    assert!(
        metrics.contains(
            r#"meshid_ca_issue_requests_total{method="renewal",result="untrusted_chain"} 1"#
        ),
        "{metrics}"
    );

    // Nor does that connection open another bundle stream or acknowledge the new bundle: the
    // same check, at the time of the call.
    let no_longer_chains = |refused: &tonic::Status| {
        assert_eq!(refused.code(), tonic::Code::Unauthenticated, "{refused:?}");
        assert!(
            refused.message().contains("no longer chains")
                && refused.message().contains("service-account token"),
            "says why and what to do: {refused:?}"
        );
    };
    match channel.watch_trust_bundle(watch()).await {
        Ok(_) => panic!("a certificate under the retired root must not open a bundle stream"),
        Err(refused) => no_longer_chains(&refused),
    }
    let current = anonymous
        .get_trust_bundle(meshid_proto::ca::v1::GetTrustBundleRequest {})
        .await
        .unwrap()
        .into_inner()
        .version;
    assert!(current > first, "{current} > {first}");
    let refused = channel
        .ack_trust_bundle(ack(current))
        .await
        .expect_err("a certificate under the retired root must not acknowledge");
    no_longer_chains(&refused);
    // What the CA recorded of the instance is what it acknowledged under its root.
    let report = rotation::status(&dir, &[ca.admin_addr]).await.unwrap();
    let instances: Vec<_> = report.sidecars.iter().filter(|s| s.identity == A).collect();
    assert_eq!(instances.len(), 1, "{:?}", report.sidecars);
    assert_eq!(instances[0].acked_version, first, "{:?}", instances[0]);
    // A caller without a certificate is still served.
    let anonymous_stream = anonymous.watch_trust_bundle(watch()).await;
    assert!(anonymous_stream.is_ok(), "{:?}", anonymous_stream.err());
    drop(first_stream);
}

/// Whether `sidecar` holds a certificate (from the CA).
fn holds_a_certificate(sidecar: &TestSidecar) -> bool {
    sidecar
        .running
        .as_ref()
        .is_some_and(|r| r.shared.creds.current().is_some())
}

/// A pod created before `rotate prepare` carries only the old root (the injector wrote it into the
/// pod spec). Its sidecar restarted after `rotate activate` meets a CA serving a certificate of the
/// new root: with the bundle cache it kept on a volume that outlived it, it reaches the CA.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_sidecar_restarted_after_activate_reaches_the_ca_through_its_bundle_cache() {
    let ca = ca_issuing_for_ttl().await;
    let dir = ca.dir.path().to_owned();
    let admins = [ca.admin_addr];
    let pki = TestPki::new();
    let dummy = pki.workload(A);
    let cache = ca.dir.path().join("frontend-bundle-cache.pem");
    // What the pod was created with: the old root alone.
    let creds = |cache: Option<std::path::PathBuf>| match ca_mode(&ca, "frontend") {
        CredSource::Ca(mode) => CredSource::Ca(CaMode {
            bundle_cache: cache,
            ..mode
        }),
        other => other,
    };
    let spec = |creds: CredSource| SidecarSpec {
        outbound: vec![("127.0.0.1:9".into(), B.into(), Protocol::Tcp)],
        creds: Some(creds),
        ..Default::default()
    };
    let mut first = TestSidecar::start(&pki, &dummy, A, spec(creds(Some(cache.clone())))).await;
    assert!(
        eventually(Duration::from_secs(10), || async {
            holds_a_certificate(&first)
        })
        .await,
        "a certificate at first"
    );

    let new_name = rotation::prepare(&dir, None).unwrap();
    assert!(
        eventually(Duration::from_secs(10), || async {
            meshid_sidecar::creds::bundle_cache::load(&cache)
                .roots
                .len()
                == 2
        })
        .await,
        "the bundle with both roots was kept in the cache"
    );
    let activated = activate_within_10s(&dir, &admins)
        .await
        .expect("activate passes once the sidecar acknowledged");
    assert_eq!(activated, new_name);
    // Once it has reloaded its directory, the CA serves a certificate of the new root.
    assert!(
        eventually(Duration::from_secs(10), || async {
            let Ok(mut c) = meshid_tests::ca::connect(ca.addr, &ca.roots, None).await else {
                return true;
            };
            c.get_trust_bundle(meshid_proto::ca::v1::GetTrustBundleRequest {})
                .await
                .is_err()
        })
        .await,
        "the CA still serves a certificate of the old root"
    );
    first.shutdown().await;

    // Restarted without the cache: the configured old root alone does not reach the CA.
    let mut without = TestSidecar::start(&pki, &dummy, A, spec(creds(None))).await;
    tokio::time::sleep(Duration::from_secs(3)).await;
    assert!(
        !holds_a_certificate(&without),
        "the old root alone reached the CA: the test shows nothing"
    );
    without.shutdown().await;

    // Restarted with it: a certificate, from the new root.
    let with = TestSidecar::start(&pki, &dummy, A, spec(creds(Some(cache.clone())))).await;
    assert!(
        eventually(Duration::from_secs(10), || async {
            holds_a_certificate(&with)
        })
        .await,
        "the restarted sidecar reached the CA with the roots it kept"
    );
}

/// The CA directory's top-level files (flat, as a Secret holds them).
fn files_of(dir: &std::path::Path) -> Vec<(std::ffi::OsString, Vec<u8>)> {
    std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap())
        .filter(|e| e.file_type().unwrap().is_file())
        .map(|e| (e.file_name(), std::fs::read(e.path()).unwrap()))
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_copy_of_the_directory_from_before_the_rotation_is_refused_by_the_running_ca() {
    // `meshid-ca secret | kubectl apply` from a stale copy: the CA keeps the material it signs
    // with and the bundle it serves, and the pair keeps working.
    let ca = TestCa::start(CaOptions::default()).await;
    let dir = ca.dir.path().to_owned();
    let admins = [ca.admin_addr];
    let pair = LongPair::start(&ca, "127.0.0.13", Some(Duration::from_secs(3600))).await;
    let (a, b) = (&pair.a, &pair.b);
    let works = || pair.works();
    assert!(eventually(Duration::from_secs(10), works).await);
    let stale = files_of(&dir);

    let new_name = rotation::prepare(&dir, None).unwrap();
    assert!(
        eventually(Duration::from_secs(10), || async {
            anchors(a).await == Some(2) && anchors(b).await == Some(2)
        })
        .await
    );
    assert_eq!(
        activate_within_10s(&dir, &admins).await.as_deref(),
        Some(new_name.as_str())
    );
    rotation::retire(&dir, &admins, true).await.unwrap();
    let new_roots = meshid_ca::authority::read_bundle(&dir.join("bundle.pem")).unwrap();
    assert_eq!(new_roots.len(), 1);
    let converged = eventually(Duration::from_secs(15), || async {
        anchors(a).await == Some(1)
            && anchors(b).await == Some(1)
            && works().await
            && issuing_root(&ca, ca.addr, &new_roots).await.as_deref() == Some(new_name.as_str())
    })
    .await;
    assert!(converged, "{:?}", rotation::status(&dir, &admins).await);
    let served = bundle_of(ca.addr, &new_roots).await;
    assert_eq!(served.1, 1);

    // The directory swapped back to the copy taken before prepare, whole (as kubelet swaps a
    // Secret's files): no authorities.json, no a2- files, the old root alone in bundle.pem. A
    // complete CA of its own, which the running CA must not take on.
    for (name, _) in files_of(&dir) {
        if !stale.iter().any(|(n, _)| *n == name) {
            std::fs::remove_file(dir.join(name)).unwrap();
        }
    }
    for (name, bytes) in &stale {
        std::fs::write(dir.join(name), bytes).unwrap();
    }
    assert!(!dir.join("authorities.json").exists());
    meshid_ca::authority::Authority::load(&dir).unwrap();
    tokio::time::sleep(Duration::from_secs(3)).await;
    assert_eq!(bundle_of(ca.addr, &new_roots).await, served, "not taken on");
    let mut c = meshid_tests::ca::connect(ca.addr, &new_roots, None)
        .await
        .unwrap();
    let bundle = c
        .get_trust_bundle(meshid_proto::ca::v1::GetTrustBundleRequest {})
        .await
        .unwrap()
        .into_inner();
    assert_eq!(bundle.roots, vec![new_roots[0].to_vec()]);
    // Still signing with the new authority (its files loaded before the swap).
    let mut c = meshid_tests::ca::connect(ca.addr, &new_roots, None)
        .await
        .unwrap();
    let issued = c
        .issue(IssueRequest {
            csr: WorkloadKey::new().csr,
            credential: Some(Credential::ServiceAccountToken(
                ca.cluster.token("shop", "probe"),
            )),
            ttl_seconds: 0,
            app_svid: false,
        })
        .await
        .unwrap()
        .into_inner();
    let (_, new_inter) = x509_parser::parse_x509_certificate(&issued.cert_chain[1]).unwrap();
    let (_, root) = x509_parser::parse_x509_certificate(&new_roots[0]).unwrap();
    assert!(new_inter.verify_signature(Some(root.public_key())).is_ok());
    assert_eq!(anchors(a).await, Some(1));
    assert_eq!(anchors(b).await, Some(1));
    assert!(works().await, "the pair keeps serving");
    // Measured: refused, and the per-authority gauges still name the authority it signs with.
    let m = meshid_tests::process::http_get(ca.admin_addr, "/metrics")
        .unwrap()
        .1;
    assert!(m.contains("meshid_ca_directory_rejected 1"), "{m}");
    let active: Vec<&str> = m
        .lines()
        .filter(|l| l.starts_with("meshid_ca_authority_intermediate_expiry_timestamp_seconds{"))
        .filter(|l| l.contains("state=\"active\""))
        .collect();
    assert_eq!(active.len(), 1, "{m}");
    assert!(
        active[0].contains(&format!("authority=\"{new_name}\"")),
        "{active:?}"
    );
    // The fleet's gauges still follow the fleet: both sidecars gone, none counted.
    let counted = || {
        let m = meshid_tests::process::http_get(ca.admin_addr, "/metrics")
            .unwrap()
            .1;
        m.lines()
            .filter(|l| l.starts_with("meshid_ca_sidecars{"))
            .filter_map(|l| l.rsplit(' ').next()?.parse::<u64>().ok())
            .sum::<u64>()
    };
    assert_eq!(counted(), 2, "both sidecars counted");
    drop(pair);
    assert!(
        eventually(Duration::from_secs(15), || async { counted() == 0 }).await,
        "the fleet gauges froze with the refused directory: {} counted",
        counted()
    );
}

/// Once a sidecar holds the CA's bundle it trusts that bundle alone to reach the CA: a root the CA
/// retired since (`retire --force`, its key lost) no longer vouches for whoever answers at the
/// CA's address, though the pod was configured with it (`--ca-bundle`). A client configured with
/// that root alone would take the impostor.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_retired_root_no_longer_vouches_for_the_ca() {
    let mut ca = ca_issuing_for_ttl().await;
    let dir = ca.dir.path().to_owned();
    let old = ca.authority();
    let old_roots = ca.roots.clone();
    let pki = TestPki::new();
    let dummy = pki.workload(A);
    let spec = SidecarSpec {
        outbound: vec![("127.0.0.1:9".into(), B.into(), Protocol::Tcp)],
        creds: Some(ca_mode(&ca, "frontend")),
        ..Default::default()
    };
    let sidecar = TestSidecar::start(&pki, &dummy, A, spec).await;
    assert!(
        eventually(Duration::from_secs(10), || async {
            holds_a_certificate(&sidecar)
        })
        .await,
        "a certificate at first"
    );

    // The emergency path: a new root, signing at once, the old root out of the bundle.
    rotation::prepare(&dir, None).unwrap();
    rotation::activate(&dir, &[], true).await.unwrap();
    rotation::retire(&dir, &[], true).await.unwrap();
    let store = sidecar.running.as_ref().unwrap().shared.creds.clone();
    assert!(
        eventually(Duration::from_secs(10), || async {
            let roots = store.roots();
            !roots.is_empty() && roots.iter().all(|r| !old_roots.contains(r))
        })
        .await,
        "the sidecar took the bundle without the retired root"
    );

    // The CA's address taken over by whoever holds the retired intermediate's key.
    ca.stop().await;
    let (chain, key) = meshid_ca::tls::issue_serving_cert(
        &old,
        &["localhost".into(), "127.0.0.1".into()],
        "impostor",
        Duration::from_secs(3600),
    )
    .unwrap();
    let mut config = rustls::ServerConfig::builder_with_provider(meshid_ca::tls::provider())
        .with_protocol_versions(&[&rustls::version::TLS13])
        .unwrap()
        .with_no_client_auth()
        .with_single_cert(chain, key)
        .unwrap();
    config.alpn_protocols = vec![b"h2".to_vec()];
    let acceptor = tokio_rustls::TlsAcceptor::from(std::sync::Arc::new(config));
    let listener = {
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        loop {
            match tokio::net::TcpListener::bind(ca.addr).await {
                Ok(l) => break l,
                Err(e) if std::time::Instant::now() < deadline => {
                    eprintln!("bind {}: {e}; retrying", ca.addr);
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
                Err(e) => panic!("bind {}: {e}", ca.addr),
            }
        }
    };
    // Handshakes the impostor completed, of the connections it was offered.
    let accepted = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let taken = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
    {
        let (accepted, taken) = (accepted.clone(), taken.clone());
        tokio::spawn(async move {
            loop {
                let Ok((tcp, _)) = listener.accept().await else {
                    return;
                };
                accepted.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                let (acceptor, taken) = (acceptor.clone(), taken.clone());
                tokio::spawn(async move {
                    if let Ok(tls) = acceptor.accept(tcp).await {
                        taken.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                        // Held open as a CA that never answers would be.
                        tokio::time::sleep(Duration::from_secs(30)).await;
                        drop(tls);
                    }
                });
            }
        });
    }
    // The sidecar reconnects (its bundle stream ended with the CA) a few times.
    assert!(
        eventually(Duration::from_secs(10), || async {
            accepted.load(std::sync::atomic::Ordering::SeqCst) >= 3
        })
        .await,
        "the sidecar did not come back to the CA's address"
    );
    assert_eq!(
        taken.load(std::sync::atomic::Ordering::SeqCst),
        0,
        "the sidecar took a certificate of the retired root for the CA's"
    );
    // The impostor is one the old trust alone takes: a client configured with that root
    // completes its handshake.
    let mut roots = rustls::RootCertStore::empty();
    for root in &old_roots {
        roots.add(root.clone()).unwrap();
    }
    let client = rustls::ClientConfig::builder_with_provider(meshid_ca::tls::provider())
        .with_protocol_versions(&[&rustls::version::TLS13])
        .unwrap()
        .with_root_certificates(roots)
        .with_no_client_auth();
    let tcp = tokio::net::TcpStream::connect(ca.addr).await.unwrap();
    tokio_rustls::TlsConnector::from(std::sync::Arc::new(client))
        .connect(
            rustls::pki_types::ServerName::try_from("localhost").unwrap(),
            tcp,
        )
        .await
        .expect("the old root alone takes the impostor");
    assert!(
        eventually(Duration::from_secs(5), || async {
            taken.load(std::sync::atomic::Ordering::SeqCst) == 1
        })
        .await
    );
}
