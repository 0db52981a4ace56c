//! The rotation gates against a workload that holds a valid certificate and lies: it cannot
//! acknowledge for another sidecar, invent instances, claim versions the CA never published, or
//! flip its mode; anonymous watchers cannot take the sidecars' room. Every lie ends with a clear
//! status, and the honest sidecar's acknowledgement still lets `activate` pass. Once revoked, a
//! liar that never acknowledges no longer holds the rotation, nor, revoked, one that asked for a
//! long certificate before it.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use meshid_ca::rotation::{self, RotateError};
use meshid_proto::ca::v1::{
    AckTrustBundleRequest, IssueRequest, TrustBundle, WatchTrustBundleRequest,
    issue_request::Credential,
};
use meshid_sidecar::creds::ca_client::CaClient;
use meshid_tests::ca::{CaOptions, TestCa};
use meshid_tests::pki::WorkloadKey;
use meshid_tests::rotation_cli::meshid_ca;
use rustls::pki_types::CertificateDer;
use tonic::{Code, Streaming};

/// A workload with a valid certificate for `ns/shop/sa/<sa>`, and a client presenting it.
struct Workload {
    chain: Vec<Vec<u8>>,
    client: CaClient,
}

impl Workload {
    async fn new(ca: &TestCa, sa: &str) -> Self {
        Self::with_ttl(ca, sa, 0).await
    }

    /// One whose certificate was asked to live `ttl_seconds` (0: the CA's default).
    async fn with_ttl(ca: &TestCa, sa: &str, ttl_seconds: u32) -> Self {
        let key = WorkloadKey::new();
        let resp = ca
            .client()
            .await
            .issue(IssueRequest {
                csr: key.csr.clone(),
                credential: Some(Credential::ServiceAccountToken(
                    ca.cluster.token("shop", sa),
                )),
                ttl_seconds,
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
        let client = ca
            .client_with_cert(chain, key.private_key_der())
            .await
            .unwrap();
        Self {
            chain: resp.cert_chain,
            client,
        }
    }

    async fn watch(&mut self, file_mode: bool) -> Result<Streaming<TrustBundle>, tonic::Status> {
        Ok(self
            .client
            .watch_trust_bundle(WatchTrustBundleRequest {
                instance_id: "pod".into(),
                file_mode,
            })
            .await?
            .into_inner())
    }

    async fn ack(&mut self, req: AckTrustBundleRequest) -> Result<(), tonic::Status> {
        self.client.ack_trust_bundle(req).await.map(|_| ())
    }

    fn ack_of(&self, version: u64) -> AckTrustBundleRequest {
        AckTrustBundleRequest {
            instance_id: "pod".into(),
            bundle_version: version,
            serving_chain: self.chain.clone(),
            file_mode: false,
            held_version: 0,
        }
    }
}

/// What the liar sends, given itself and the honest sidecar.
type Lie = Box<dyn Fn(&Workload, &Workload) -> AckTrustBundleRequest>;

struct Case {
    name: &'static str,
    ack: Lie,
    expected: Code,
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_workload_with_a_valid_certificate_cannot_fool_the_gates() {
    let ca = TestCa::start(CaOptions::default()).await;
    let dir = ca.dir.path().to_owned();
    let admins = [ca.admin_addr];

    // The honest sidecar: its stream is open, it acknowledged version 1.
    let mut honest = Workload::new(&ca, "frontend").await;
    let mut honest_stream = honest.watch(false).await.unwrap();
    assert_eq!(honest_stream.message().await.unwrap().unwrap().version, 1);
    let ack = honest.ack_of(1);
    honest.ack(ack).await.unwrap();

    let name = rotation::prepare(&dir, None).unwrap();
    assert_eq!(name, "2");
    // The new bundle (version 2) reaches the honest sidecar's stream; it has not acknowledged it.
    let v2 = tokio::time::timeout(std::time::Duration::from_secs(10), async {
        loop {
            let b = honest_stream.message().await.unwrap().unwrap();
            if b.version >= 2 {
                return b.version;
            }
        }
    })
    .await
    .unwrap();
    assert_eq!(v2, 2);

    // The liar holds a valid certificate of its own.
    let mut liar = Workload::new(&ca, "evil").await;
    let cases = [
        Case {
            name: "an acknowledgement with no stream of its own (an invented instance)",
            ack: Box::new(|liar, _| liar.ack_of(2)),
            expected: Code::FailedPrecondition,
        },
        Case {
            name: "the honest sidecar's certificate reported on the liar's connection",
            ack: Box::new(|_, honest| AckTrustBundleRequest {
                instance_id: "pod".into(),
                bundle_version: 2,
                serving_chain: honest.chain.clone(),
                file_mode: false,
                held_version: 0,
            }),
            expected: Code::PermissionDenied,
        },
    ];
    for case in &cases {
        let req = (case.ack)(&liar, &honest);
        let status = liar.ack(req).await.unwrap_err();
        assert_eq!(status.code(), case.expected, "{}: {status:?}", case.name);
    }

    // With a stream of its own, the liar still speaks only for its own key.
    let _liar_stream = liar.watch(false).await.unwrap();
    let after_stream = [
        Case {
            name: "a version the CA never published",
            ack: Box::new(|liar, _| liar.ack_of(99)),
            expected: Code::InvalidArgument,
        },
        Case {
            name: "file mode on an instance registered in CA mode",
            ack: Box::new(|liar, _| AckTrustBundleRequest {
                file_mode: true,
                ..liar.ack_of(0)
            }),
            expected: Code::InvalidArgument,
        },
        Case {
            name: "the honest sidecar's certificate, again, with a stream open",
            ack: Box::new(|_, honest| AckTrustBundleRequest {
                instance_id: "pod".into(),
                bundle_version: 2,
                serving_chain: honest.chain.clone(),
                file_mode: false,
                held_version: 0,
            }),
            expected: Code::PermissionDenied,
        },
    ];
    for case in &after_stream {
        let req = (case.ack)(&liar, &honest);
        let status = liar.ack(req).await.unwrap_err();
        assert_eq!(status.code(), case.expected, "{}: {status:?}", case.name);
    }
    // Its own acknowledgement (same instance_id text as the honest one's) moves only itself.
    let own = liar.ack_of(2);
    liar.ack(own).await.unwrap();
    match rotation::activate(&dir, &admins, false).await {
        Err(RotateError::Refused(why)) => {
            assert!(why.contains("ns/shop/sa/frontend"), "{why}");
            assert!(!why.contains("ns/shop/sa/evil"), "{why}");
        }
        other => panic!("activate must wait for the honest sidecar: {other:?}"),
    }
    // The report names identities and short key labels, never what the sidecars sent.
    let report = rotation::status(&dir, &admins).await.unwrap();
    assert_eq!(report.sidecars.len(), 2);
    assert!(report.sidecars.iter().all(|s| s.instance != "pod"));

    // A file-mode reporter is unknown, never counted as having a version.
    let mut files = Workload::new(&ca, "files").await;
    let _files_stream = files.watch(true).await.unwrap();
    let lie = files.ack_of(2);
    assert_eq!(
        files.ack(lie).await.unwrap_err().code(),
        Code::InvalidArgument,
        "a file-mode instance cannot claim CA mode"
    );
    let report_ack = AckTrustBundleRequest {
        file_mode: true,
        ..files.ack_of(2)
    };
    files.ack(report_ack).await.unwrap();
    let report = rotation::status(&dir, &admins).await.unwrap();
    let f = report
        .sidecars
        .iter()
        .find(|s| s.identity.ends_with("/sa/files"))
        .unwrap();
    assert!(f.file_mode);
    assert_eq!(f.acked_version, 0);
    assert_eq!(report.unknown.len(), 1, "{:?}", report.unknown);

    // The honest acknowledgement lets activate pass.
    let ack = honest.ack_of(2);
    honest.ack(ack).await.unwrap();
    assert_eq!(rotation::activate(&dir, &admins, false).await.unwrap(), "2");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_certificate_holds_at_most_four_bundle_streams() {
    let ca = TestCa::start(CaOptions::default()).await;
    // A workload with one valid certificate opens stream after stream on one connection (before,
    // it could take every sidecar's place on the CA).
    let mut liar = Workload::new(&ca, "liar").await;
    let mut held = Vec::new();
    for _ in 0..4 {
        held.push(liar.watch(false).await.unwrap());
    }
    for _ in 0..3 {
        let refused = liar.watch(false).await.unwrap_err();
        assert_eq!(refused.code(), Code::ResourceExhausted, "{refused:?}");
        assert!(
            refused.message().contains("4 bundle streams"),
            "{refused:?}"
        );
    }
    // Another sidecar registers and is counted; the liar is one instance.
    let mut honest = Workload::new(&ca, "frontend").await;
    let mut stream = honest.watch(false).await.unwrap();
    assert_eq!(stream.message().await.unwrap().unwrap().version, 1);
    let report = rotation::status(ca.dir.path(), &[ca.admin_addr])
        .await
        .unwrap();
    assert_eq!(report.sidecars.len(), 2, "{:?}", report.sidecars);
    // A stream that ends gives its place back to the same certificate.
    held.pop();
    let again = tokio::time::timeout(std::time::Duration::from_secs(10), async {
        loop {
            if let Ok(s) = liar.watch(false).await {
                return s;
            }
            tokio::time::sleep(std::time::Duration::from_millis(20)).await;
        }
    })
    .await;
    assert!(again.is_ok(), "a closed stream's place comes back");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn anonymous_streams_cannot_take_the_sidecars_room() {
    let ca = TestCa::start(CaOptions::default()).await;
    // One connection holds at most 4 anonymous streams.
    let mut one = ca.client().await;
    let mut held = Vec::new();
    for _ in 0..4 {
        held.push(
            one.watch_trust_bundle(WatchTrustBundleRequest::default())
                .await
                .unwrap()
                .into_inner(),
        );
    }
    let fifth = one
        .watch_trust_bundle(WatchTrustBundleRequest::default())
        .await
        .unwrap_err();
    assert_eq!(fifth.code(), Code::ResourceExhausted, "{fifth:?}");
    // Fill the anonymous room (256 streams) from many connections.
    let mut clients = Vec::new();
    let mut refused = None;
    for _ in 0..70 {
        let mut c = ca.client().await;
        for _ in 0..4 {
            match c
                .watch_trust_bundle(WatchTrustBundleRequest::default())
                .await
            {
                Ok(s) => held.push(s.into_inner()),
                Err(status) => refused = Some(status),
            }
        }
        clients.push(c);
    }
    assert_eq!(held.len(), 256, "anonymous streams are capped");
    assert_eq!(refused.unwrap().code(), Code::ResourceExhausted);
    // A real sidecar still registers and is counted.
    let mut sidecar = Workload::new(&ca, "frontend").await;
    let mut stream = sidecar.watch(false).await.unwrap();
    assert_eq!(stream.message().await.unwrap().unwrap().version, 1);
    let ack = sidecar.ack_of(1);
    sidecar.ack(ack).await.unwrap();
    let report = rotation::status(ca.dir.path(), &[ca.admin_addr])
        .await
        .unwrap();
    assert_eq!(
        report.sidecars.len(),
        1,
        "anonymous streams count for nothing"
    );
    assert!(report.sidecars[0].connected);
    // Ending anonymous streams gives their room back.
    held.clear();
    drop(clients);
    let back = tokio::time::timeout(std::time::Duration::from_secs(10), async {
        loop {
            let mut c = ca.client().await;
            if c.watch_trust_bundle(WatchTrustBundleRequest::default())
                .await
                .is_ok()
            {
                return;
            }
            tokio::time::sleep(std::time::Duration::from_millis(50)).await;
        }
    })
    .await;
    assert!(back.is_ok(), "room comes back when anonymous streams end");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_revoked_instance_that_never_acknowledges_does_not_hold_the_rotation() {
    let ca = TestCa::start(CaOptions::default()).await;
    let dir = ca.dir.path().to_owned();
    let dir_arg = dir.to_string_lossy().into_owned();
    let admins = [ca.admin_addr];
    // Two liars keep a bundle stream open and never acknowledge: one is revoked by identity, the
    // other by its certificate's serial. A third instance of the second liar's identity, on
    // another certificate, is not revoked.
    let mut by_id = Workload::new(&ca, "stolen").await;
    let _s1 = by_id.watch(false).await.unwrap();
    let mut by_serial = Workload::new(&ca, "leaked").await;
    let _s2 = by_serial.watch(false).await.unwrap();
    let mut sibling = Workload::new(&ca, "leaked").await;
    let mut sibling_stream = sibling.watch(false).await.unwrap();
    assert_eq!(sibling_stream.message().await.unwrap().unwrap().version, 1);

    rotation::prepare(&dir, None).unwrap();
    let blocked = match rotation::activate(&dir, &admins, false).await {
        Err(RotateError::Refused(why)) => why,
        other => panic!("activate must wait for three instances: {other:?}"),
    };
    for sa in ["stolen", "leaked"] {
        assert!(blocked.contains(&format!("sa/{sa} ")), "{blocked}");
    }

    let serial = meshid_identity::cert_identity_from_der(&by_serial.chain[0])
        .unwrap()
        .serial_hex;
    for args in [
        ["--id", "spiffe://cluster.local/ns/shop/sa/stolen"],
        ["--serial", serial.as_str()],
    ] {
        let mut all = vec!["revoke", "--dir", dir_arg.as_str()];
        all.extend(args);
        let (code, out) = meshid_ca(&all);
        assert_eq!(code, 0, "{out}");
    }
    // The CA reads its directory every second: the two revoked instances drop out of the gate;
    // the sibling, on a certificate that is not revoked, still holds it.
    let report = tokio::time::timeout(std::time::Duration::from_secs(15), async {
        loop {
            let r = rotation::status(&dir, &admins).await.unwrap();
            if r.sidecars.iter().filter(|s| s.revoked).count() == 2 {
                return r;
            }
            tokio::time::sleep(std::time::Duration::from_millis(100)).await;
        }
    })
    .await
    .expect("the revoked instances are marked in the report");
    let unrevoked: Vec<_> = report.sidecars.iter().filter(|s| !s.revoked).collect();
    assert_eq!(unrevoked.len(), 1, "{:?}", report.sidecars);
    assert!(unrevoked[0].identity.ends_with("sa/leaked"));
    // The metrics count them apart too: a dashboard's share of sidecars on the newest bundle is
    // not held down by instances no gate waits for.
    let counted = tokio::time::timeout(std::time::Duration::from_secs(15), async {
        loop {
            let (_, m) = meshid_tests::process::http_get(ca.admin_addr, "/metrics").unwrap();
            let connected: f64 = m
                .lines()
                .filter(|l| l.starts_with("meshid_ca_sidecars{"))
                .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
                .sum();
            if m.lines().any(|l| l == "meshid_ca_revoked_sidecars 2") && connected == 1.0 {
                return;
            }
            tokio::time::sleep(std::time::Duration::from_millis(100)).await;
        }
    })
    .await;
    assert!(
        counted.is_ok(),
        "{}",
        meshid_tests::process::http_get(ca.admin_addr, "/metrics")
            .unwrap()
            .1
    );
    match rotation::activate(&dir, &admins, false).await {
        Err(RotateError::Refused(why)) => {
            assert!(!why.contains("sa/stolen"), "{why}");
            assert_eq!(why.matches("sa/leaked").count(), 1, "{why}");
        }
        other => panic!("activate must wait for the sibling: {other:?}"),
    }
    // The sibling takes the new bundle and acknowledges it: the revoked liars hold nothing.
    let version = loop {
        let b = sibling_stream.message().await.unwrap().unwrap();
        if b.version >= 2 {
            break b.version;
        }
    };
    let ack = sibling.ack_of(version);
    sibling.ack(ack).await.unwrap();
    assert_eq!(rotation::activate(&dir, &admins, false).await.unwrap(), "2");
}

/// A CA whose certificates live 3 s unless asked for longer (up to an hour).
async fn ca_of_short_certificates() -> TestCa {
    TestCa::start(CaOptions {
        lifetimes: meshid_ca::signer::LifetimePolicy {
            default: std::time::Duration::from_secs(3),
            max: std::time::Duration::from_secs(3600),
        },
        ..Default::default()
    })
    .await
}

/// `rotate retire`, tried every 200 ms while it is refused, for up to 15 s: the retired
/// authority's name, or the timeout.
async fn retire_within_15s(
    dir: &std::path::Path,
    admins: &[std::net::SocketAddr],
) -> Result<String, tokio::time::error::Elapsed> {
    tokio::time::timeout(std::time::Duration::from_secs(15), async {
        loop {
            match rotation::retire(dir, admins, false).await {
                Ok(name) => return name,
                Err(RotateError::Refused(_)) => {
                    tokio::time::sleep(std::time::Duration::from_millis(200)).await;
                }
                Err(e) => panic!("{e}"),
            }
        }
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_revoked_workload_does_not_hold_retire_with_a_long_certificate() {
    use std::time::Duration;
    let ca = ca_of_short_certificates().await;
    let dir = ca.dir.path().to_owned();
    let dir_arg = dir.to_string_lossy().into_owned();
    let admins = [ca.admin_addr];
    // Before the rotation, a workload asks for the longest certificate it may have; an honest
    // one takes the default.
    let liar = Workload::with_ttl(&ca, "liar", 3600).await;
    let long = meshid_identity::cert_identity_from_der(&liar.chain[0]).unwrap();
    assert!(long.not_after - long.not_before > 3000);
    let _honest = Workload::new(&ca, "web").await;
    rotation::prepare(&dir, None).unwrap();
    assert_eq!(rotation::activate(&dir, &admins, false).await.unwrap(), "2");
    // The honest certificate expires within seconds; the long one holds `retire`.
    tokio::time::sleep(Duration::from_secs(5)).await;
    match rotation::retire(&dir, &admins, false).await {
        Err(RotateError::Refused(why)) => assert!(why.contains("live"), "{why}"),
        other => panic!("retire must wait for the long certificate: {other:?}"),
    }
    // Revoked, its certificate is refused by every peer for as long as it lives: it no longer
    // holds the rotation (the CA reads its directory every second).
    let (code, out) = meshid_ca(&[
        "revoke",
        "--dir",
        dir_arg.as_str(),
        "--id",
        "spiffe://cluster.local/ns/shop/sa/liar",
    ]);
    assert_eq!(code, 0, "{out}");
    let retired = retire_within_15s(&dir, &admins).await;
    assert!(retired.is_ok(), "retire still refused after the revocation");
}

/// A long certificate taken by a renewal is counted under its identity and lineage: `retire`
/// names that lineage, and revoking it (`revoke --serial`, as the gates offer for one instance)
/// releases the gate, without revoking every instance of the identity.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn revoking_its_lineage_releases_retire_from_a_renewed_long_certificate() {
    use std::time::Duration;
    let ca = ca_of_short_certificates().await;
    let dir = ca.dir.path().to_owned();
    let dir_arg = dir.to_string_lossy().into_owned();
    let admins = [ca.admin_addr];
    // A default certificate, then a renewal on it asking for the longest lifetime.
    let mut liar = Workload::new(&ca, "liar").await;
    let lineage = meshid_identity::cert_identity_from_der(&liar.chain[0])
        .unwrap()
        .serial_hex;
    let lineage = meshid_identity::revocation::normalize_serial(&lineage).unwrap();
    let renewed = liar
        .client
        .issue(IssueRequest {
            csr: WorkloadKey::new().csr,
            credential: None,
            ttl_seconds: 3600,
            app_svid: false,
        })
        .await
        .unwrap()
        .into_inner();
    let long = meshid_identity::cert_identity_from_der(&renewed.cert_chain[0]).unwrap();
    assert!(long.not_after - long.not_before > 3000);
    rotation::prepare(&dir, None).unwrap();
    assert_eq!(rotation::activate(&dir, &admins, false).await.unwrap(), "2");
    tokio::time::sleep(Duration::from_secs(5)).await;
    match rotation::retire(&dir, &admins, false).await {
        Err(RotateError::Refused(why)) => assert!(
            why.contains(&format!("revoke --serial {lineage}"))
                && why.contains("spiffe://cluster.local/ns/shop/sa/liar"),
            "{why}"
        ),
        other => panic!("retire must wait for the long certificate: {other:?}"),
    }
    let (code, out) = meshid_ca(&["revoke", "--dir", dir_arg.as_str(), "--serial", &lineage]);
    assert_eq!(code, 0, "{out}");
    let retired = retire_within_15s(&dir, &admins).await;
    assert!(
        retired.is_ok(),
        "retire still refused after the lineage's revocation"
    );
}

/// A sidecar whose bundle stream closed (pushed out of the CA's connections, or its pod gone)
/// before it acknowledged the new root is not forgotten: `activate` waits for it ("not seen
/// since"), until it is revoked (or its certificate expires, or it reconnects and acknowledges).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_sidecar_gone_before_it_acknowledged_holds_activate_until_revoked() {
    use std::time::Duration;

    let ca = TestCa::start(CaOptions::default()).await;
    let dir = ca.dir.path().to_owned();
    let dir_arg = dir.to_string_lossy().into_owned();
    let admins = [ca.admin_addr];
    let mut gone = Workload::new(&ca, "pushed").await;
    let mut stream = gone.watch(false).await.unwrap();
    assert_eq!(stream.message().await.unwrap().unwrap().version, 1);
    let ack = gone.ack_of(1);
    gone.ack(ack).await.unwrap();
    // Its stream closes, and with it its connection.
    drop(stream);
    drop(gone.client);
    let report = tokio::time::timeout(Duration::from_secs(10), async {
        loop {
            let r = rotation::status(&dir, &admins).await.unwrap();
            if r.sidecars.iter().any(|s| !s.connected && s.last_seen > 0) {
                return r;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    })
    .await
    .expect("the instance is listed as gone");
    assert_eq!(report.sidecars.len(), 1, "{:?}", report.sidecars);

    rotation::prepare(&dir, None).unwrap();
    match rotation::activate(&dir, &admins, false).await {
        Err(RotateError::Refused(why)) => {
            assert!(
                why.contains("sa/pushed") && why.contains("not seen since"),
                "{why}"
            );
        }
        other => panic!("activate must wait for the sidecar that is gone: {other:?}"),
    }
    let serial = meshid_identity::cert_identity_from_der(&gone.chain[0])
        .unwrap()
        .serial_hex;
    let (code, out) = meshid_ca(&["revoke", "--dir", dir_arg.as_str(), "--serial", &serial]);
    assert_eq!(code, 0, "{out}");
    // The CA reads its directory every second: the revoked instance no longer holds the gate.
    let activated = tokio::time::timeout(Duration::from_secs(15), async {
        loop {
            if let Ok(name) = rotation::activate(&dir, &admins, false).await {
                return name;
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    })
    .await
    .expect("activate runs once the gone sidecar is revoked");
    assert_eq!(activated, "2");
}

/// One pod of a service account that never acknowledges (a compromised one, starting a lineage
/// with its token) is released by what the refusal names, `revoke --serial` of its own lineage,
/// without revoking the identity the honest replicas share: they keep their place and their
/// acknowledgements, and `activate` passes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_holdout_is_released_alone_by_what_the_refusal_names() {
    use std::time::Duration;

    let ca = TestCa::start(CaOptions::default()).await;
    let dir = ca.dir.path().to_owned();
    let dir_arg = dir.to_string_lossy().into_owned();
    let admins = [ca.admin_addr];
    let mut honest = Workload::new(&ca, "web").await;
    let mut holdout = Workload::new(&ca, "web").await;
    let mut honest_stream = honest.watch(false).await.unwrap();
    let _holdout_stream = holdout.watch(false).await.unwrap();
    rotation::prepare(&dir, None).unwrap();
    let version = tokio::time::timeout(Duration::from_secs(10), async {
        loop {
            let b = honest_stream.message().await.unwrap().unwrap();
            if b.roots.len() == 2 {
                return b.version;
            }
        }
    })
    .await
    .expect("the new root reaches the honest sidecar");
    let ack = honest.ack_of(version);
    honest.ack(ack).await.unwrap();

    let why = match rotation::activate(&dir, &admins, false).await {
        Err(RotateError::Refused(why)) => why,
        other => panic!("activate must wait for the holdout: {other:?}"),
    };
    let holdout_serial = meshid_identity::cert_identity_from_der(&holdout.chain[0])
        .unwrap()
        .serial_hex
        .to_lowercase();
    let command = why
        .split_once("`meshid-ca revoke --serial ")
        .and_then(|(_, rest)| rest.split_once('`'))
        .map(|(serial, _)| serial.to_owned())
        .unwrap_or_else(|| panic!("the refusal names what releases the holdout: {why}"));
    assert_eq!(command, holdout_serial, "{why}");
    let (code, out) = meshid_ca(&["revoke", "--dir", dir_arg.as_str(), "--serial", &command]);
    assert_eq!(code, 0, "{out}");

    let activated = tokio::time::timeout(Duration::from_secs(15), async {
        loop {
            if let Ok(name) = rotation::activate(&dir, &admins, false).await {
                return name;
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    })
    .await
    .expect("activate runs once the holdout alone is revoked");
    assert_eq!(activated, "2");
    // The honest replica of the same identity is not revoked: the CA still takes its word.
    let report = rotation::status(&dir, &admins).await.unwrap();
    let mut revoked: Vec<bool> = report.sidecars.iter().map(|s| s.revoked).collect();
    revoked.sort();
    assert_eq!(revoked, [false, true], "{:?}", report.sidecars);
    let ack = honest.ack_of(version);
    honest.ack(ack).await.unwrap();
}
