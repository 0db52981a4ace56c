//! Root rotation under continuous traffic through a sidecar pair: prepare -> activate -> retire with no
//! failed request and no restart, each gate refusing (naming what blocks) until the fleet converged.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::Duration;

use meshid_ca::rotation::{self, RotateError};
use meshid_ca::signer::LifetimePolicy;
use meshid_proto::ca::v1::{
    AckTrustBundleRequest, IssueRequest, WatchTrustBundleRequest, issue_request::Credential,
};
use meshid_sidecar::ca_client::CaEndpoint;
use meshid_sidecar::config::CredSource;
use meshid_sidecar::identity::{Bootstrap, CaMode};
use meshid_sidecar::policy::Protocol;
use meshid_tests::ca::{CaOptions, TestCa};
use meshid_tests::mesh::{
    SidecarSpec, TestPki, TestSidecar, eventually, get, http_echo, http_request,
};
use meshid_tests::pki::WorkloadKey;
use rustls::pki_types::CertificateDer;

const A: &str = "spiffe://cluster.local/ns/shop/sa/frontend";
const B: &str = "spiffe://cluster.local/ns/shop/sa/backend";
const TTL: Duration = Duration::from_secs(8);

fn ca_mode(ca: &TestCa, sa: &str) -> CredSource {
    let token = ca.dir.path().join(format!("{sa}.token"));
    std::fs::write(&token, ca.cluster.token("shop", sa)).unwrap();
    CredSource::Ca(CaMode {
        endpoint: CaEndpoint {
            addr: ca.addr.to_string(),
            server_name: Some("localhost".into()),
            roots: ca.roots.clone(),
        },
        bootstrap: Bootstrap::TokenFile(token),
        ttl: Some(TTL),
    })
}

async fn anchors(sidecar: &TestSidecar) -> Option<u64> {
    let m = sidecar.metrics().await;
    m.lines()
        .find_map(|l| l.strip_prefix("meshid_sidecar_trust_anchors "))
        .and_then(|v| v.trim().parse().ok())
}

async fn serving_root_sha(sidecar: &TestSidecar) -> String {
    let admin = sidecar.admin;
    let body =
        tokio::task::spawn_blocking(move || meshid_tests::process::http_get(admin, "/identity"))
            .await
            .unwrap()
            .map(|(_, b)| b)
            .unwrap_or_default();
    body
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn root_rotation_under_traffic_with_gates() {
    let ca = TestCa::start(CaOptions {
        lifetimes: LifetimePolicy {
            default: TTL,
            max: TTL,
        },
        ..CaOptions::default()
    })
    .await;
    let dir = ca.dir.path().to_owned();
    let admins = [ca.admin_addr];
    let pki = TestPki::new();
    let dummy = pki.workload(A);
    let b = TestSidecar::start(
        &pki,
        &dummy,
        B,
        SidecarSpec {
            inbound: vec![("127.0.0.11", http_echo().await, Protocol::Http)],
            policy: Some(format!(
                "inbound:\n  - port: {{port0}}\n    protocol: http\n    allow:\n      - id: {A}\n"
            )),
            creds: Some(ca_mode(&ca, "backend")),
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
            creds: Some(ca_mode(&ca, "frontend")),
            ..Default::default()
        },
    )
    .await;
    let local = a.outbound[0];
    assert!(
        eventually(Duration::from_secs(10), || async {
            let Ok(tcp) = tokio::net::TcpStream::connect(local).await else {
                return false;
            };
            matches!(
                http_request(tcp, false, get("/x", &[])).await,
                Ok((200, _, _))
            )
        })
        .await,
        "the pair serves traffic"
    );

    // Continuous traffic for the whole rotation.
    let stop = Arc::new(AtomicBool::new(false));
    let (ok, failed) = (Arc::new(AtomicUsize::new(0)), Arc::new(AtomicUsize::new(0)));
    let traffic = {
        let (stop, ok, failed) = (stop.clone(), ok.clone(), failed.clone());
        tokio::spawn(async move {
            while !stop.load(Ordering::Relaxed) {
                let r = match tokio::net::TcpStream::connect(local).await {
                    Ok(tcp) => http_request(tcp, false, get("/orders", &[])).await,
                    Err(e) => Err(e.to_string()),
                };
                match r {
                    Ok((200, _, _)) => ok.fetch_add(1, Ordering::Relaxed),
                    other => {
                        eprintln!("request failed: {other:?}");
                        failed.fetch_add(1, Ordering::Relaxed)
                    }
                };
                tokio::time::sleep(Duration::from_millis(25)).await;
            }
        })
    };

    // Nothing to activate or retire yet.
    assert!(matches!(
        rotation::activate(&dir, &admins, false),
        Err(RotateError::Refused(_))
    ));
    assert!(matches!(
        rotation::retire(&dir, &admins, false),
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
            })
            .await
            .unwrap()
            .into_inner();
        c.ack_trust_bundle(AckTrustBundleRequest {
            instance_id: "lagging-1".into(),
            bundle_version: 1,
            serving_chain: resp.cert_chain.clone(),
        })
        .await
        .unwrap();
        // An ack for a certificate the caller does not hold is refused.
        let forged = c
            .ack_trust_bundle(AckTrustBundleRequest {
                instance_id: "lagging-1".into(),
                bundle_version: 99,
                serving_chain: vec![ca.roots[0].to_vec()],
            })
            .await;
        assert!(forged.is_err());
        stream
    };

    // Prepare: the new root reaches every sidecar without a restart.
    let new_name = rotation::prepare(&dir, None).unwrap();
    assert!(
        eventually(Duration::from_secs(10), || async {
            anchors(&a).await == Some(2) && anchors(&b).await == Some(2)
        })
        .await,
        "both sidecars trust both roots"
    );
    // The activate gate names the sidecar that has not acknowledged.
    match rotation::activate(&dir, &admins, false) {
        Err(RotateError::Refused(why)) => assert!(why.contains("lagging-1"), "{why}"),
        other => panic!("activate must wait for the lagging sidecar: {other:?}"),
    }
    drop(lagging);
    // Once only converged sidecars are connected, activate passes.
    let activated = {
        let mut result = None;
        for _ in 0..100 {
            match rotation::activate(&dir, &admins, false) {
                Ok(name) => {
                    result = Some(name);
                    break;
                }
                Err(_) => tokio::time::sleep(Duration::from_millis(100)).await,
            }
        }
        result.expect("activate passes once every connected sidecar acknowledged")
    };
    assert_eq!(activated, new_name);

    // Retire refuses while certificates under the old root are live, naming them...
    match rotation::retire(&dir, &admins, false) {
        Err(RotateError::Refused(why)) => assert!(why.contains("authority 1"), "{why}"),
        other => panic!("retire must wait for old certificates: {other:?}"),
    }
    // ...and passes once they have expired and every sidecar serves a certificate of the new root.
    let retired = {
        let mut result = None;
        for _ in 0..200 {
            match rotation::retire(&dir, &admins, false) {
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
            anchors(&a).await == Some(1) && anchors(&b).await == Some(1)
        })
        .await,
        "the old root left every sidecar's trust anchors"
    );
    let report = rotation::status(&dir, &admins).unwrap();
    assert!(
        report.authorities.iter().all(|x| x.name == new_name),
        "{report:?}"
    );
    assert!(
        report
            .sidecars
            .iter()
            .filter(|s| s.connected)
            .all(|s| s.serving_authority.as_deref() == Some(new_name.as_str())),
        "{report:?}"
    );
    let _ = serving_root_sha(&b).await;

    stop.store(true, Ordering::Relaxed);
    traffic.await.unwrap();
    assert!(ok.load(Ordering::Relaxed) > 50, "traffic flowed");
    assert_eq!(
        failed.load(Ordering::Relaxed),
        0,
        "no request failed during the rotation"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn intermediate_rotation_and_forced_retire_renew_at_once() {
    // Long lifetimes: nothing renews on its own during this test.
    let ca = TestCa::start(CaOptions::default()).await;
    let dir = ca.dir.path().to_owned();
    let admins = [ca.admin_addr];
    let pki = TestPki::new();
    let dummy = pki.workload(A);
    let long = |sa: &str| match ca_mode(&ca, sa) {
        CredSource::Ca(mut m) => {
            m.ttl = Some(Duration::from_secs(3600));
            CredSource::Ca(m)
        }
        other => other,
    };
    let b = TestSidecar::start(
        &pki,
        &dummy,
        B,
        SidecarSpec {
            inbound: vec![("127.0.0.12", http_echo().await, Protocol::Http)],
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
    let local = a.outbound[0];
    let works = || async move {
        let Ok(tcp) = tokio::net::TcpStream::connect(local).await else {
            return false;
        };
        matches!(
            http_request(tcp, false, get("/x", &[])).await,
            Ok((200, _, _))
        )
    };
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
            anchors(&a).await == Some(2) && anchors(&b).await == Some(2)
        })
        .await
    );
    let mut activated = false;
    for _ in 0..100 {
        if rotation::activate(&dir, &admins, false).is_ok() {
            activated = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(activated);
    assert!(matches!(
        rotation::retire(&dir, &admins, false),
        Err(RotateError::Refused(_))
    ));
    rotation::retire(&dir, &admins, true).unwrap();
    let converged = eventually(Duration::from_secs(15), || async {
        let report = rotation::status(&dir, &admins).unwrap();
        anchors(&a).await == Some(1)
            && anchors(&b).await == Some(1)
            && report
                .sidecars
                .iter()
                .filter(|s| s.connected)
                .all(|s| s.serving_authority.as_deref() == Some(new_name.as_str()))
    })
    .await;
    assert!(converged, "{:?}", rotation::status(&dir, &admins));
    assert!(
        eventually(Duration::from_secs(10), works).await,
        "traffic under the new root"
    );
}
