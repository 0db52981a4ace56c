//! What the CA issues: CSR handling, certificates checked by independent verifiers (openssl, webpki),
//! rate limits, the trust bundle stream and the admin endpoints.

use std::io::{Read, Write};
use std::time::Duration;

use meshid_ca::ratelimit::RateLimit;
use meshid_proto::ca::v1::{
    GetTrustBundleRequest, IssueRequest, IssueResponse, WatchTrustBundleRequest,
    issue_request::Credential,
};
use meshid_tests::ca::{CaOptions, TestCa};
use meshid_tests::pki::{ForeignCa, WorkloadKey, pem};
use rustls_pki_types::{CertificateDer, UnixTime};
use tonic::Code;

const FRONTEND: &str = "spiffe://cluster.local/ns/shop/sa/frontend";

fn req(csr: Vec<u8>, credential: Credential) -> IssueRequest {
    IssueRequest {
        csr,
        credential: Some(credential),
        ttl_seconds: 0,
        app_svid: false,
    }
}

async fn issue_with_token(ca: &TestCa, csr: Vec<u8>) -> Result<IssueResponse, tonic::Status> {
    let token = ca.cluster.token("shop", "frontend");
    ca.client()
        .await
        .issue(req(csr, Credential::ServiceAccountToken(token)))
        .await
        .map(|r| r.into_inner())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_csrs_are_invalid_argument_and_do_not_burn_the_join_token() {
    let ca = TestCa::start(CaOptions::default()).await;
    let join = ca.join_token(FRONTEND, Duration::from_secs(600));
    let good = WorkloadKey::new();
    let mut bad_sig = good.csr.clone();
    let n = bad_sig.len();
    bad_sig[n - 3] ^= 0x55;
    let cases: Vec<(&str, Vec<u8>, &[Code])> = vec![
        ("bad signature", bad_sig, &[Code::InvalidArgument]),
        (
            "garbage bytes",
            b"\x30\x03garbage".to_vec(),
            &[Code::InvalidArgument],
        ),
        ("empty", vec![], &[Code::InvalidArgument]),
        ("oversized", vec![0x30; 9000], &[Code::InvalidArgument]),
        // Past the gRPC message limit the transport refuses it before our code runs.
        (
            "larger than the message limit",
            vec![0x30; 100_000],
            &[
                Code::OutOfRange,
                Code::ResourceExhausted,
                Code::InvalidArgument,
            ],
        ),
    ];
    for (name, csr, codes) in cases {
        let got = ca
            .client()
            .await
            .issue(req(csr, Credential::JoinToken(join.clone())))
            .await;
        match got {
            Ok(_) => panic!("{name}: issued"),
            Err(s) => assert!(codes.contains(&s.code()), "{name}: got {s:?}"),
        }
    }
    let resp = ca
        .client()
        .await
        .issue(req(good.csr.clone(), Credential::JoinToken(join)))
        .await
        .expect("the join token survives bad CSRs")
        .into_inner();
    assert_eq!(resp.spiffe_id, FRONTEND);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn csr_asking_for_another_identity_gets_the_authenticated_one() {
    let ca = TestCa::start(CaOptions::default()).await;
    let w = WorkloadKey::asking_for(
        "spiffe://cluster.local/ns/kube-system/sa/admin",
        "evil.example",
    );
    let resp = issue_with_token(&ca, w.csr.clone()).await.unwrap();
    let leaf = &resp.cert_chain[0];
    assert_eq!(
        meshid_identity::spiffe_id_from_der(leaf).unwrap().as_str(),
        FRONTEND
    );
    use x509_parser::prelude::*;
    let (_, cert) = X509Certificate::from_der(leaf).unwrap();
    assert!(!cert.is_ca(), "a CSR asking for CA:TRUE must not get it");
    let san = cert.subject_alternative_name().unwrap().unwrap();
    assert_eq!(san.value.general_names.len(), 1, "exactly one SAN: {san:?}");
    assert!(cert.subject().iter_common_name().next().is_none());
    assert_eq!(
        cert.public_key().subject_public_key.data.as_ref(),
        w.key.public_key_raw()
    );
}

#[cfg_attr(not(have_openssl), ignore = "openssl is not installed")]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rsa_1024_csr_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let csr_path = dir.path().join("csr.der");
    let (ok, out) = meshid_tests::tools::run(std::process::Command::new("openssl").args([
        "req",
        "-new",
        "-newkey",
        "rsa:1024",
        "-nodes",
        "-keyout",
        dir.path().join("k.pem").to_str().unwrap(),
        "-subj",
        "/CN=weak",
        "-outform",
        "DER",
        "-out",
        csr_path.to_str().unwrap(),
    ]));
    assert!(ok, "openssl req failed: {out}");
    let ca = TestCa::start(CaOptions::default()).await;
    let err = issue_with_token(&ca, std::fs::read(&csr_path).unwrap())
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument);
    assert!(err.message().contains("1024"), "{}", err.message());
}

#[cfg_attr(not(have_openssl), ignore = "openssl is not installed")]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn issued_chains_pass_openssl_verify_strict() {
    let ca = TestCa::start(CaOptions::default()).await;
    let resp = issue_with_token(&ca, WorkloadKey::new().csr).await.unwrap();
    assert_eq!(resp.cert_chain.len(), 2);
    let dir = tempfile::tempdir().unwrap();
    let path = |n: &str| dir.path().join(n).to_str().unwrap().to_owned();
    std::fs::write(path("root.pem"), pem(&resp.trust_anchors[0])).unwrap();
    std::fs::write(path("inter.pem"), pem(&resp.cert_chain[1])).unwrap();
    std::fs::write(path("leaf.pem"), pem(&resp.cert_chain[0])).unwrap();
    for purpose in ["sslclient", "sslserver"] {
        let (ok, out) = meshid_tests::tools::run(std::process::Command::new("openssl").args([
            "verify",
            "-x509_strict",
            "-purpose",
            purpose,
            "-CAfile",
            &path("root.pem"),
            "-untrusted",
            &path("inter.pem"),
            &path("leaf.pem"),
        ]));
        assert!(
            ok && out.contains(": OK"),
            "openssl verify {purpose}: {out}"
        );
    }
    let (ok, out) = meshid_tests::tools::run(std::process::Command::new("openssl").args([
        "x509",
        "-noout",
        "-ext",
        "subjectAltName,basicConstraints,keyUsage,extendedKeyUsage",
        "-in",
        &path("leaf.pem"),
    ]));
    assert!(ok, "{out}");
    assert!(out.contains(&format!("URI:{FRONTEND}")), "{out}");
    assert!(out.contains("CA:FALSE"), "{out}");
    assert!(out.contains("Digital Signature"), "{out}");
    assert!(
        out.contains("TLS Web Server Authentication")
            && out.contains("TLS Web Client Authentication"),
        "{out}"
    );
    // The intermediate verifies against the root alone, as a CA with path length 0.
    let (ok, out) = meshid_tests::tools::run(std::process::Command::new("openssl").args([
        "verify",
        "-x509_strict",
        "-CAfile",
        &path("root.pem"),
        &path("inter.pem"),
    ]));
    assert!(ok, "{out}");
    // A foreign root does not verify our leaf.
    std::fs::write(path("foreign.pem"), pem(&ForeignCa::new().root_der)).unwrap();
    let (ok, _) = meshid_tests::tools::run(std::process::Command::new("openssl").args([
        "verify",
        "-CAfile",
        &path("foreign.pem"),
        "-untrusted",
        &path("inter.pem"),
        &path("leaf.pem"),
    ]));
    assert!(!ok, "a foreign root must not verify our chain");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn issued_chains_pass_webpki_for_client_and_server_auth() {
    let ca = TestCa::start(CaOptions::default()).await;
    let resp = issue_with_token(&ca, WorkloadKey::new().csr).await.unwrap();
    let leaf = CertificateDer::from(resp.cert_chain[0].clone());
    let inter = CertificateDer::from(resp.cert_chain[1].clone());
    let root = CertificateDer::from(resp.trust_anchors[0].clone());
    let anchors = [webpki::anchor_from_trusted_cert(&root).unwrap()];
    let ee = webpki::EndEntityCert::try_from(&leaf).unwrap();
    let algs = rustls::crypto::aws_lc_rs::default_provider()
        .signature_verification_algorithms
        .all;
    for usage in [
        webpki::KeyUsage::client_auth(),
        webpki::KeyUsage::server_auth(),
    ] {
        ee.verify_for_usage(
            algs,
            &anchors,
            std::slice::from_ref(&inter),
            UnixTime::now(),
            usage,
            None,
            None,
        )
        .expect("webpki verifies the chain");
    }
    // Lifetime: the default hour, not-before backdated by 5 minutes.
    assert_eq!(resp.not_after_unix - resp.not_before_unix, 3600 + 300);
    // An hour past expiry, webpki refuses it.
    let later = UnixTime::since_unix_epoch(Duration::from_secs(resp.not_after_unix as u64 + 3600));
    assert!(
        ee.verify_for_usage(
            algs,
            &anchors,
            std::slice::from_ref(&inter),
            later,
            webpki::KeyUsage::client_auth(),
            None,
            None
        )
        .is_err()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn requested_lifetime_is_honoured_and_capped() {
    let ca = TestCa::start(CaOptions {
        lifetimes: meshid_ca::signer::LifetimePolicy {
            default: Duration::from_secs(3600),
            max: Duration::from_secs(7200),
        },
        ..CaOptions::default()
    })
    .await;
    for (asked, want) in [(30u32, 30i64), (600, 600), (100_000, 7200)] {
        let token = ca.cluster.token("shop", "frontend");
        let resp = ca
            .client()
            .await
            .issue(IssueRequest {
                csr: WorkloadKey::new().csr,
                credential: Some(Credential::ServiceAccountToken(token)),
                ttl_seconds: asked,
                app_svid: false,
            })
            .await
            .unwrap()
            .into_inner();
        let now = meshid_tests::fake_cluster::unix_now();
        let got = resp.not_after_unix - now;
        assert!((want - 2..=want).contains(&got), "asked {asked}: got {got}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn issuance_storm_for_one_identity_is_rate_limited_with_a_retry_hint() {
    let ca = TestCa::start(CaOptions {
        rate_limit: RateLimit {
            per_second: 0.1,
            burst: 3,
        },
        ..CaOptions::default()
    })
    .await;
    // Token issuances leave in the identity's bucket what renewals may still take of their three
    // quarters (rounded up: all 3, at most the burst less one): one of a full burst of 3.
    issue_with_token(&ca, WorkloadKey::new().csr).await.unwrap();
    let err = issue_with_token(&ca, WorkloadKey::new().csr)
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::ResourceExhausted);
    let hint: u64 = err
        .metadata()
        .get("retry-after-ms")
        .expect("retry hint")
        .to_str()
        .unwrap()
        .parse()
        .unwrap();
    assert!(hint > 1000 && hint <= 10_000, "{hint}");
    // Other identities are not affected.
    let token = ca.cluster.token("shop", "checkout");
    ca.client()
        .await
        .issue(req(
            WorkloadKey::new().csr,
            Credential::ServiceAccountToken(token),
        ))
        .await
        .expect("another identity still gets certificates");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn trust_bundle_is_served_and_streamed_on_change() {
    let ca = TestCa::start(CaOptions::default()).await;
    let bundle = ca
        .client()
        .await
        .get_trust_bundle(GetTrustBundleRequest {})
        .await
        .unwrap()
        .into_inner();
    assert_eq!(bundle.trust_domain, "cluster.local");
    assert_eq!(bundle.roots, vec![ca.roots[0].to_vec()]);

    let mut stream = ca
        .client()
        .await
        .watch_trust_bundle(WatchTrustBundleRequest::default())
        .await
        .unwrap()
        .into_inner();
    let first = stream.message().await.unwrap().expect("bundle at once");
    assert_eq!(first.version, bundle.version);

    // A second root joins the bundle (as a rotation's prepare step does).
    let foreign = ForeignCa::new();
    let path = ca.dir.path().join("bundle.pem");
    let mut text = std::fs::read_to_string(&path).unwrap();
    text.push_str(&pem(&foreign.root_der));
    std::fs::write(ca.dir.path().join("bundle.tmp"), text).unwrap();
    std::fs::rename(ca.dir.path().join("bundle.tmp"), &path).unwrap();
    let second = tokio::time::timeout(Duration::from_secs(10), stream.message())
        .await
        .expect("bundle change within 10 s")
        .unwrap()
        .expect("stream open");
    assert_eq!(second.version, first.version + 1);
    assert_eq!(second.roots.len(), 2);
    assert!(second.roots.contains(&foreign.root_der.to_vec()));

    // New handshakes trust the new root at once: a workload holding a certificate under it can
    // renew, no restart needed (the identity and trust domain are still checked).
    let (chain, key) = foreign.workload(FRONTEND);
    let mut client = ca.client_with_cert(chain, key).await.unwrap();
    let resp = client
        .issue(IssueRequest {
            csr: WorkloadKey::new().csr,
            credential: None,
            ttl_seconds: 0,
            app_svid: false,
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(resp.spiffe_id, FRONTEND);
    assert_eq!(resp.bundle_version, second.version);

    // A broken bundle file is ignored; the stream stays quiet and open. The CA has read it and
    // refused it (the directory counts as rejected) before the stream is looked at.
    let admin = ca.admin_addr;
    let directory_rejected = move || {
        tokio::task::spawn_blocking(move || {
            let (_, metrics) = http_get(admin, "/metrics");
            metrics
                .lines()
                .find_map(|l| l.strip_prefix("meshid_ca_directory_rejected "))
                .and_then(|v| v.trim().parse::<u64>().ok())
        })
    };
    assert_eq!(directory_rejected().await.unwrap(), Some(0));
    std::fs::write(&path, "garbage").unwrap();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    let refused = loop {
        // The stream must stay quiet meanwhile too.
        let quiet = tokio::time::timeout(Duration::from_millis(200), stream.message()).await;
        assert!(quiet.is_err(), "no update for a broken bundle: {quiet:?}");
        if directory_rejected().await.unwrap() == Some(1) {
            break true;
        }
        if tokio::time::Instant::now() > deadline {
            break false;
        }
    };
    assert!(refused, "the broken bundle file is refused");
    let quiet = tokio::time::timeout(Duration::from_millis(1500), stream.message()).await;
    assert!(quiet.is_err(), "no update for a broken bundle: {quiet:?}");
    // The bundle served is still the last good one.
    let served = ca
        .client()
        .await
        .get_trust_bundle(GetTrustBundleRequest {})
        .await
        .unwrap()
        .into_inner();
    assert_eq!(
        (served.version, served.roots),
        (second.version, second.roots)
    );
}

fn http_get(addr: std::net::SocketAddr, path: &str) -> (u16, String) {
    let mut s = std::net::TcpStream::connect(addr).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    write!(
        s,
        "GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
    )
    .unwrap();
    let mut out = String::new();
    s.read_to_string(&mut out).unwrap();
    let code = out
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or(0);
    (code, out)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn admin_port_serves_health_and_metrics() {
    let ca = TestCa::start(CaOptions::default()).await;
    issue_with_token(&ca, WorkloadKey::new().csr).await.unwrap();
    let _ = ca
        .client()
        .await
        .issue(req(
            WorkloadKey::new().csr,
            Credential::ServiceAccountToken("bogus".into()),
        ))
        .await;
    let admin = ca.admin_addr;
    let (healthz, metrics, missing) = tokio::task::spawn_blocking(move || {
        (
            http_get(admin, "/healthz"),
            http_get(admin, "/metrics"),
            http_get(admin, "/nope"),
        )
    })
    .await
    .unwrap();
    assert_eq!(healthz.0, 200);
    assert_eq!(missing.0, 404);
    assert_eq!(metrics.0, 200);
    let body = metrics.1;
    assert!(
        body.contains(
            r#"meshid_ca_issue_requests_total{method="service_account_token",result="issued"} 1"#
        ),
        "{body}"
    );
    assert!(
        body.contains(r#"meshid_ca_issue_requests_total{method="service_account_token",result="malformed_token"} 1"#),
        "{body}"
    );
    assert!(body.contains("meshid_ca_intermediate_expiry_timestamp_seconds"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn garbage_on_the_grpc_port_does_not_disturb_service() {
    use tokio::io::AsyncWriteExt;
    let ca = TestCa::start(CaOptions {
        handshake_timeout: Duration::from_secs(1),
        ..CaOptions::default()
    })
    .await;
    // Plaintext HTTP, random bytes, and a connection that never finishes its ClientHello.
    let mut plain = tokio::net::TcpStream::connect(ca.addr).await.unwrap();
    plain
        .write_all(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
        .await
        .unwrap();
    let mut random = tokio::net::TcpStream::connect(ca.addr).await.unwrap();
    random
        .write_all(&[0x16, 0x03, 0x01, 0xff, 0xff, 1, 2, 3])
        .await
        .unwrap();
    let mut slow = tokio::net::TcpStream::connect(ca.addr).await.unwrap();
    slow.write_all(&[0x16, 0x03, 0x01]).await.unwrap();
    // Meanwhile a real client is served.
    issue_with_token(&ca, WorkloadKey::new().csr).await.unwrap();
    // The slow one is cut after the handshake timeout.
    let mut buf = [0u8; 16];
    let read = tokio::time::timeout(Duration::from_secs(5), async {
        use tokio::io::AsyncReadExt;
        slow.read(&mut buf).await
    })
    .await
    .expect("server closes a stalled handshake");
    assert!(matches!(read, Ok(0) | Err(_)));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn grpc_health_reports_serving() {
    use tonic_health::pb::health_check_response::ServingStatus;
    use tonic_health::pb::{HealthCheckRequest, health_client::HealthClient};
    let ca = TestCa::start(CaOptions::default()).await;
    // The health service shares the CA's TLS port; reuse the CA client's channel setup.
    let endpoint = meshid_sidecar::settings::CaEndpoint {
        addr: ca.addr.to_string(),
        server_name: Some("localhost".into()),
        roots: ca.roots.clone(),
        pinned: Vec::new(),
    };
    let channel = meshid_sidecar::creds::ca_client::channel(&endpoint, None)
        .await
        .unwrap();
    let mut health = HealthClient::new(channel);
    for service in ["", "meshid.ca.v1.CertificateAuthority"] {
        let status = health
            .check(HealthCheckRequest {
                service: service.into(),
            })
            .await
            .unwrap()
            .into_inner()
            .status;
        assert_eq!(status, ServingStatus::Serving as i32, "{service:?}");
    }
}

/// A CA that cannot record what it issues (its `issued/` marks: a full or read-only disk; here a
/// file in the folder's place) says so on its metrics, for an alert (`MeshidCaIssuanceUnrecorded`),
/// until a write succeeds again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_ca_that_cannot_record_its_issuance_says_so_until_it_can() {
    let ca = TestCa::start(CaOptions::default()).await;
    let unrecorded = || {
        let (_, m) = http_get(ca.admin_addr, "/metrics");
        m.lines()
            .find(|l| l.starts_with("meshid_ca_issuance_unrecorded "))
            .map(|l| l.ends_with(" 1"))
            .unwrap_or_else(|| panic!("no meshid_ca_issuance_unrecorded in\n{m}"))
    };
    // A short certificate first: the next one (the default lifetime) is not covered by its mark,
    // so issuing it writes the marks again.
    let token = ca.cluster.token("shop", "frontend");
    ca.client()
        .await
        .issue(IssueRequest {
            ttl_seconds: 60,
            ..req(
                WorkloadKey::new().csr,
                Credential::ServiceAccountToken(token),
            )
        })
        .await
        .unwrap();
    assert!(!unrecorded(), "recorded at first");
    let issued = ca.dir.path().join("issued");
    std::fs::remove_dir_all(&issued).unwrap();
    std::fs::write(&issued, "in the way").unwrap();
    issue_with_token(&ca, WorkloadKey::new().csr).await.unwrap();
    assert!(
        meshid_tests::mesh::eventually(Duration::from_secs(5), || async { unrecorded() }).await,
        "a failed record is on the metrics"
    );
    std::fs::remove_file(&issued).unwrap();
    issue_with_token(&ca, WorkloadKey::new().csr).await.unwrap();
    assert!(
        meshid_tests::mesh::eventually(Duration::from_secs(5), || async { !unrecorded() }).await,
        "recorded again"
    );
}
