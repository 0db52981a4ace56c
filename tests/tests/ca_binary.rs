//! The real `meshid-ca` binary, as a platform engineer runs it: init, token create, serve on its own
//! "host" address, issue, and a graceful SIGTERM.

use std::process::Command;
use std::time::Duration;

use meshid_proto::ca::v1::{IssueRequest, WatchTrustBundleRequest, issue_request::Credential};
use meshid_tests::pki::WorkloadKey;
use meshid_tests::process::{Proc, free_addr, http_get, wait_http_ok};
use meshid_tests::tools::workspace_bin;
use rustls_pki_types::CertificateDer;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn init_token_serve_issue_and_sigterm() {
    let ca_bin = workspace_bin("meshid-ca");
    let dir = tempfile::tempdir().unwrap();
    let ca_dir = dir.path().join("ca");
    let ca_dir_s = ca_dir.to_str().unwrap();
    let out = Command::new(&ca_bin)
        .args(["init", "--dir", ca_dir_s])
        .output()
        .unwrap();
    assert!(out.status.success(), "{out:?}");
    let out = Command::new(&ca_bin)
        .args([
            "token",
            "create",
            "--dir",
            ca_dir_s,
            "--id",
            "spiffe://cluster.local/ns/vm/sa/db",
            "--ttl",
            "5m",
        ])
        .output()
        .unwrap();
    assert!(out.status.success(), "{out:?}");
    let token = String::from_utf8(out.stdout).unwrap().trim().to_owned();
    assert!(token.starts_with("meshid-join-"), "{token}");

    let log_path = dir.path().join("ca.log");
    let grpc = free_addr("127.0.0.2");
    let admin = free_addr("127.0.0.2");
    let mut proc = Proc::spawn(
        "meshid-ca",
        Command::new(&ca_bin)
            .args([
                "serve",
                "--dir",
                ca_dir_s,
                "--listen",
                &grpc.to_string(),
                "--admin-listen",
                &admin.to_string(),
                "--grace",
                "5s",
            ])
            .stderr(std::fs::File::create(&log_path).unwrap()),
    );
    assert!(
        wait_http_ok(admin, "/readyz", Duration::from_secs(10)),
        "CA never became ready"
    );

    let roots = meshid_ca::authority::read_bundle(&ca_dir.join("bundle.pem")).unwrap();
    let mut client = meshid_tests::ca::connect(grpc, &roots, None).await.unwrap();
    let first_key = WorkloadKey::new();
    let resp = client
        .issue(IssueRequest {
            csr: first_key.csr.clone(),
            credential: Some(Credential::JoinToken(token.clone())),
            ttl_seconds: 0,
            app_svid: false,
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(resp.spiffe_id, "spiffe://cluster.local/ns/vm/sa/db");
    // The token is single-use, and the file on disk never held it.
    let again = client
        .issue(IssueRequest {
            csr: WorkloadKey::new().csr,
            credential: Some(Credential::JoinToken(token.clone())),
            ttl_seconds: 0,
            app_svid: false,
        })
        .await
        .unwrap_err();
    assert_eq!(again.code(), tonic::Code::Unauthenticated);
    for entry in std::fs::read_dir(ca_dir.join("join-tokens")).unwrap() {
        let text = std::fs::read_to_string(entry.unwrap().path()).unwrap();
        assert!(!text.contains(&token["meshid-join-".len()..]));
    }

    let (code, metrics) = http_get(admin, "/metrics").unwrap();
    assert_eq!(code, 200);
    assert!(metrics.contains(r#"result="issued"} 1"#), "{metrics}");

    // A renewal on that certificate, then a revocation of the first serial: the renewed one is
    // refused too (it carries the first serial as its lineage).
    let chain = |resp: &meshid_proto::ca::v1::IssueResponse| -> Vec<CertificateDer<'static>> {
        resp.cert_chain
            .iter()
            .map(|c| CertificateDer::from(c.clone()))
            .collect()
    };
    let serial_of = |chain: &[CertificateDer<'static>]| {
        meshid_identity::cert_identity_from_der(&chain[0])
            .unwrap()
            .serial_hex
    };
    let first = chain(&resp);
    let renew = |presented: Vec<CertificateDer<'static>>, key: &WorkloadKey| {
        let roots = roots.clone();
        let key = key.private_key_der();
        async move {
            let next = WorkloadKey::new();
            let mut holder = meshid_tests::ca::connect(grpc, &roots, Some((presented, key)))
                .await
                .unwrap();
            let resp = holder
                .issue(IssueRequest {
                    csr: next.csr.clone(),
                    credential: None,
                    ttl_seconds: 0,
                    app_svid: false,
                })
                .await?
                .into_inner();
            Ok::<_, tonic::Status>((resp, next))
        }
    };
    let (renewed, second_key) = renew(first.clone(), &first_key).await.unwrap();
    let second = chain(&renewed);
    let out = Command::new(&ca_bin)
        .args(["revoke", "--dir", ca_dir_s, "--serial", &serial_of(&first)])
        .output()
        .unwrap();
    assert!(out.status.success(), "{out:?}");
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    let refused = loop {
        match renew(second.clone(), &second_key).await {
            Err(status) => break status,
            Ok(_) if std::time::Instant::now() < deadline => {
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
            Ok(_) => panic!("a certificate renewed from a revoked serial still renews"),
        }
    };
    assert_eq!(refused.code(), tonic::Code::PermissionDenied, "{refused:?}");
    assert!(refused.message().contains("is revoked"), "{refused:?}");

    // A long-lived bundle stream is open when SIGTERM arrives: the CA ends it and exits 0.
    let mut stream = client
        .watch_trust_bundle(WatchTrustBundleRequest::default())
        .await
        .unwrap()
        .into_inner();
    assert!(stream.message().await.unwrap().is_some());
    proc.signal("TERM");
    let status = tokio::task::spawn_blocking(move || {
        let s = proc.wait_timeout(Duration::from_secs(10));
        (s, proc)
    })
    .await
    .unwrap();
    let exit = status.0.expect("CA exits after SIGTERM");
    assert!(exit.success(), "exit status {exit:?}");
    let end = tokio::time::timeout(Duration::from_secs(5), stream.message()).await;
    assert!(
        matches!(end, Ok(Ok(None)) | Ok(Err(_))),
        "stream ends: {end:?}"
    );

    // Every decision is in the audit log; no credential is.
    let log = std::fs::read_to_string(&log_path).unwrap();
    assert!(log.contains("certificate issued"), "{log}");
    // The renewal's audit line names its new serial, the one it renewed and its lineage.
    let line = log
        .lines()
        .find(|l| l.contains("certificate issued") && l.contains(&serial_of(&second)))
        .unwrap_or_else(|| panic!("no audit line names the renewed certificate: {log}"));
    assert!(line.contains("renewal"), "{line}");
    assert!(
        line.contains("renewed") && line.contains(&serial_of(&first)),
        "{line}"
    );
    assert!(line.contains("lineage"), "{line}");
    assert!(log.contains("join_token_used"), "{log}");
    assert!(log.contains("spiffe://cluster.local/ns/vm/sa/db"), "{log}");
    assert!(
        !log.contains(&token["meshid-join-".len()..]),
        "token leaked into the log"
    );
    assert!(!log.contains("PRIVATE KEY"), "key leaked into the log");
}
