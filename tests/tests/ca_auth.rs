//! Who may get which identity: every way of authenticating to the CA, good and hostile, over real
//! gRPC and TLS to an in-process CA. Each case states the exact answer it expects.

use std::time::Duration;

use meshid_ca::auth::{JwksSource, RemoteJwks};
use meshid_ca::signer::sign_leaf;
use meshid_identity::SpiffeId;
use meshid_proto::ca::v1::{IssueRequest, issue_request::Credential};
use meshid_tests::ca::{CaOptions, TestCa};
use meshid_tests::fake_apiserver::{Answer, FakeApiServer};
use meshid_tests::fake_cluster::{FakeCluster, KeyKind, TokenSpec, unix_now};
use meshid_tests::mesh::metric;
use meshid_tests::pki::{ForeignCa, WorkloadKey};
use meshid_tests::process::http_get;
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer};
use serde_json::json;
use time::OffsetDateTime;
use tonic::Code;

const FRONTEND: &str = "spiffe://cluster.local/ns/shop/sa/frontend";
const BACKEND: &str = "spiffe://cluster.local/ns/shop/sa/backend";

#[derive(Debug)]
enum Expect {
    /// A certificate for this identity.
    Issued(&'static str),
    /// This gRPC status code.
    Status(Code),
    /// The TLS layer refuses the client certificate: no answer at the gRPC level, and the CA
    /// counts a failed handshake for this reason (`meshid_ca_tls_handshake_failures_total`).
    TlsRefused(&'static str),
}

enum Cred {
    Token(String),
    Join(String),
    Cert(Vec<CertificateDer<'static>>, PrivateKeyDer<'static>),
    Nothing,
}

struct Case {
    name: &'static str,
    cred: Cred,
    expected: Expect,
}

async fn issue(ca: &TestCa, cred: Cred) -> Result<String, Result<Code, String>> {
    let workload = WorkloadKey::new();
    let (credential, client) = match cred {
        Cred::Token(t) => (Some(Credential::ServiceAccountToken(t)), ca.client().await),
        Cred::Join(t) => (Some(Credential::JoinToken(t)), ca.client().await),
        Cred::Nothing => (None, ca.client().await),
        Cred::Cert(chain, key) => match ca.client_with_cert(chain, key).await {
            Ok(c) => (None, c),
            Err(e) => return Err(Err(format!("connect: {e}"))),
        },
    };
    let mut client = client;
    let resp = client
        .issue(IssueRequest {
            csr: workload.csr.clone(),
            credential,
            ttl_seconds: 0,
            app_svid: false,
        })
        .await;
    match resp {
        Ok(r) => Ok(r.into_inner().spiffe_id),
        // Transport failures (the server's TLS alert) surface as Unavailable, Unknown or Cancelled; the
        // service itself never answers with either.
        Err(s)
            if matches!(
                s.code(),
                Code::Unavailable | Code::Unknown | Code::Cancelled
            ) =>
        {
            Err(Err(format!("{:?}: {}", s.code(), s.message())))
        }
        Err(s) => Err(Ok(s.code())),
    }
}

/// The CA's failed TLS handshakes (`meshid_ca_tls_handshake_failures_total`).
const CA_HANDSHAKE_FAILURES: &str = "meshid_ca_tls_handshake_failures_total";

/// The CA's failed TLS handshakes counted for `reason` (0 before the first, or when the admin
/// port does not answer).
async fn ca_handshake_failures(ca: &TestCa, reason: &'static str) -> u64 {
    let admin = ca.admin_addr;
    let metrics = tokio::task::spawn_blocking(move || http_get(admin, "/metrics"))
        .await
        .unwrap()
        .map(|(_, m)| m)
        .unwrap_or_default();
    metric(
        &metrics,
        CA_HANDSHAKE_FAILURES,
        &[&format!("reason=\"{reason}\"")],
    )
}

/// Mints a certificate for `id` directly with the CA's key, valid from `start` for `lifetime`.
fn direct_cert(
    ca: &TestCa,
    id: &str,
    start: OffsetDateTime,
    lifetime: Duration,
) -> (Vec<CertificateDer<'static>>, PrivateKeyDer<'static>) {
    let w = WorkloadKey::new();
    let key = meshid_ca::csr::CsrPublicKey::from_csr_der(&w.csr).unwrap();
    let issued = sign_leaf(
        &ca.authority(),
        &SpiffeId::parse(id).unwrap(),
        &key,
        lifetime,
        start,
    )
    .unwrap();
    (issued.chain, w.private_key_der())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn authentication_cases() {
    let mut ca = TestCa::start(CaOptions {
        allowed_namespaces: Some(vec!["shop".into(), "ops".into()]),
        ..CaOptions::default()
    })
    .await;
    let c = &ca.cluster;
    let now = unix_now();

    let valid = c.spec("shop", "frontend", KeyKind::Rsa);
    let with = |f: &dyn Fn(&mut serde_json::Value)| {
        let mut s = valid.clone();
        f(&mut s.claims);
        c.sign(&s)
    };
    let with_header = |f: &dyn Fn(&mut serde_json::Value)| {
        let mut s = valid.clone();
        f(&mut s.header);
        c.sign(&s)
    };

    let used_join = ca.join_token(
        "spiffe://cluster.local/ns/vm/sa/db",
        Duration::from_secs(600),
    );
    let expired_join = ca.join_token("spiffe://cluster.local/ns/vm/sa/db", Duration::ZERO);
    let fresh_join = ca.join_token(
        "spiffe://cluster.local/ns/vm/sa/db",
        Duration::from_secs(600),
    );
    // Spend `used_join` once before the table runs.
    assert!(issue(&ca, Cred::Join(used_join.clone())).await.is_ok());

    let foreign = ForeignCa::new();
    let (foreign_chain, foreign_key) = foreign.workload(FRONTEND);
    let (valid_chain, valid_key) = direct_cert(
        &ca,
        FRONTEND,
        OffsetDateTime::now_utc(),
        Duration::from_secs(3600),
    );
    let (expired_chain, expired_key) = direct_cert(
        &ca,
        FRONTEND,
        OffsetDateTime::now_utc() - time::Duration::hours(3),
        Duration::from_secs(3600),
    );
    let (denied_ns_chain, denied_ns_key) = direct_cert(
        &ca,
        "spiffe://cluster.local/ns/kube-system/sa/default",
        OffsetDateTime::now_utc(),
        Duration::from_secs(3600),
    );

    // Renewal certificates signed by this CA but shaped to attack it.
    let authority = ca.authority();
    let forged = |shape: &dyn Fn(&mut rcgen::CertificateParams)| {
        let (chain, key) = meshid_tests::pki::forge_leaf(&authority, shape);
        Cred::Cert(chain, PrivatePkcs8KeyDer::from(key).into())
    };
    let uri = |id: &str| rcgen::SanType::URI(id.try_into().unwrap());
    let inter_key = PrivateKeyDer::from_pem_file(ca.dir.path().join("intermediate.key")).unwrap();
    let below_leaf = {
        let (chain, key) = meshid_tests::pki::forge_below_extra_level(&authority, FRONTEND, |_| {});
        Cred::Cert(chain, PrivatePkcs8KeyDer::from(key).into())
    };
    let below_ca = {
        let (chain, key) = meshid_tests::pki::forge_below_extra_level(&authority, FRONTEND, |p| {
            p.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
        });
        Cred::Cert(chain, PrivatePkcs8KeyDer::from(key).into())
    };
    let hostile_renewals = vec![
        Case {
            name: "renewal with two URI SANs",
            cred: forged(&|p| p.subject_alt_names = vec![uri(FRONTEND), uri(BACKEND)]),
            expected: Expect::Status(Code::Unauthenticated),
        },
        Case {
            name: "renewal with no URI SAN",
            cred: forged(&|p| {
                p.subject_alt_names = vec![rcgen::SanType::DnsName(
                    "frontend.shop.svc".try_into().unwrap(),
                )];
            }),
            expected: Expect::Status(Code::Unauthenticated),
        },
        Case {
            name: "renewal with a dot-dot SPIFFE ID",
            cred: forged(&|p| {
                p.subject_alt_names = vec![uri("spiffe://cluster.local/ns/../sa/frontend")];
            }),
            expected: Expect::Status(Code::Unauthenticated),
        },
        Case {
            name: "renewal with another trust domain's ID signed by this CA",
            cred: forged(&|p| {
                p.subject_alt_names = vec![uri("spiffe://evil.example/ns/shop/sa/frontend")];
            }),
            // A genuine signature, an identity this CA does not serve.
            expected: Expect::Status(Code::PermissionDenied),
        },
        Case {
            name: "renewal with a server-only certificate (EKU serverAuth)",
            cred: forged(&|p| {
                p.subject_alt_names = vec![uri(FRONTEND)];
                p.extended_key_usages = vec![rcgen::ExtendedKeyUsagePurpose::ServerAuth];
            }),
            expected: Expect::TlsRefused("wrong_purpose"),
        },
        Case {
            name: "renewal with the intermediate CA certificate as the leaf",
            cred: Cred::Cert(vec![authority.intermediate_der.clone()], inter_key),
            expected: Expect::TlsRefused("ca_as_leaf"),
        },
        Case {
            name: "renewal with a leaf signed by another leaf",
            cred: below_leaf,
            expected: Expect::TlsRefused("bad_chain"),
        },
        Case {
            name: "renewal with a CA below the path-length-0 intermediate",
            cred: below_ca,
            expected: Expect::TlsRefused("bad_chain"),
        },
    ];

    let cases = vec![
        Case {
            name: "valid RS256 token",
            cred: Cred::Token(c.sign(&valid)),
            expected: Expect::Issued(FRONTEND),
        },
        Case {
            name: "valid ES256 token",
            cred: Cred::Token(c.sign(&c.spec("ops", "metrics", KeyKind::Ec))),
            expected: Expect::Issued("spiffe://cluster.local/ns/ops/sa/metrics"),
        },
        Case {
            name: "expired token",
            cred: Cred::Token(with(&|cl| cl["exp"] = json!(now - 120))),
            expected: Expect::Status(Code::Unauthenticated),
        },
        Case {
            name: "expired within the allowed skew",
            cred: Cred::Token(with(&|cl| cl["exp"] = json!(now - 20))),
            expected: Expect::Issued(FRONTEND),
        },
        Case {
            name: "not yet valid (nbf)",
            cred: Cred::Token(with(&|cl| cl["nbf"] = json!(now + 300))),
            expected: Expect::Status(Code::Unauthenticated),
        },
        Case {
            name: "issued in the future (iat)",
            cred: Cred::Token(with(&|cl| cl["iat"] = json!(now + 300))),
            expected: Expect::Status(Code::Unauthenticated),
        },
        Case {
            name: "token living 10 years from iat to exp (kubectl create token --duration)",
            cred: Cred::Token(with(&|cl| cl["exp"] = json!(now + 10 * 365 * 24 * 3600))),
            expected: Expect::Status(Code::Unauthenticated),
        },
        Case {
            name: "token living 48h from iat to exp (the default cap)",
            cred: Cred::Token(with(&|cl| cl["exp"] = json!(now + 48 * 3600))),
            expected: Expect::Issued(FRONTEND),
        },
        Case {
            name: "no iat",
            cred: Cred::Token(with(&|cl| {
                cl.as_object_mut().unwrap().remove("iat");
            })),
            expected: Expect::Status(Code::Unauthenticated),
        },
        Case {
            name: "not bound to a pod (no kubernetes.io.pod)",
            cred: Cred::Token(with(&|cl| {
                cl["kubernetes.io"].as_object_mut().unwrap().remove("pod");
            })),
            expected: Expect::Status(Code::Unauthenticated),
        },
        Case {
            name: "extended by Kubernetes to a year (3607 s asked), within warnafter",
            cred: Cred::Token(with(&|cl| {
                cl["exp"] = json!(now + 365 * 24 * 3600);
                cl["kubernetes.io"]["warnafter"] = json!(now + 3607);
            })),
            expected: Expect::Issued(FRONTEND),
        },
        Case {
            name: "wrong audience",
            cred: Cred::Token(with(&|cl| {
                cl["aud"] = json!(["https://kubernetes.default.svc"])
            })),
            expected: Expect::Status(Code::Unauthenticated),
        },
        Case {
            name: "no audience",
            cred: Cred::Token(with(&|cl| {
                cl.as_object_mut().unwrap().remove("aud");
            })),
            expected: Expect::Status(Code::Unauthenticated),
        },
        Case {
            name: "wrong issuer",
            cred: Cred::Token(with(&|cl| cl["iss"] = json!("https://evil.example"))),
            expected: Expect::Status(Code::Unauthenticated),
        },
        Case {
            name: "no expiry",
            cred: Cred::Token(with(&|cl| {
                cl.as_object_mut().unwrap().remove("exp");
            })),
            expected: Expect::Status(Code::Unauthenticated),
        },
        Case {
            name: "alg none",
            cred: Cred::Token(c.forge_alg_none(&valid)),
            expected: Expect::Status(Code::Unauthenticated),
        },
        Case {
            name: "HS256 signed with the public key as secret",
            cred: Cred::Token(c.forge_hs256_with_public_key(&valid)),
            expected: Expect::Status(Code::Unauthenticated),
        },
        Case {
            name: "unknown kid",
            cred: Cred::Token(with_header(&|h| h["kid"] = json!("rotated-away"))),
            expected: Expect::Status(Code::Unauthenticated),
        },
        Case {
            name: "no kid",
            cred: Cred::Token(with_header(&|h| {
                h.as_object_mut().unwrap().remove("kid");
            })),
            expected: Expect::Status(Code::Unauthenticated),
        },
        Case {
            name: "crit header member (RFC 7515 extension we do not understand)",
            cred: Cred::Token(with_header(&|h| h["crit"] = json!(["exp"]))),
            expected: Expect::Status(Code::Unauthenticated),
        },
        Case {
            name: "crit header member that is not even a list",
            cred: Cred::Token(with_header(&|h| h["crit"] = json!(null))),
            expected: Expect::Status(Code::Unauthenticated),
        },
        Case {
            name: "RS256 header with the EC key's kid",
            cred: Cred::Token(with_header(&|h| h["kid"] = json!(c.ec_kid))),
            expected: Expect::Status(Code::Unauthenticated),
        },
        Case {
            name: "tampered payload",
            cred: Cred::Token({
                let mut evil = valid.claims.clone();
                evil["sub"] = json!("system:serviceaccount:ops:admin");
                evil["kubernetes.io"]["namespace"] = json!("ops");
                evil["kubernetes.io"]["serviceaccount"]["name"] = json!("admin");
                c.tamper(&c.sign(&valid), &evil)
            }),
            expected: Expect::Status(Code::Unauthenticated),
        },
        Case {
            name: "malformed sub",
            cred: Cred::Token(with(&|cl| cl["sub"] = json!("system:serviceaccount:shop"))),
            expected: Expect::Status(Code::Unauthenticated),
        },
        Case {
            name: "sub not a service account",
            cred: Cred::Token(with(&|cl| cl["sub"] = json!("system:node:node-1"))),
            expected: Expect::Status(Code::Unauthenticated),
        },
        Case {
            name: "sub disagrees with kubernetes.io claims",
            cred: Cred::Token(with(&|cl| {
                cl["sub"] = json!("system:serviceaccount:shop:admin")
            })),
            expected: Expect::Status(Code::Unauthenticated),
        },
        Case {
            name: "namespace not allowed",
            cred: Cred::Token(c.token("kube-system", "default")),
            expected: Expect::Status(Code::PermissionDenied),
        },
        Case {
            name: "garbage token",
            cred: Cred::Token("not.a.jwt".into()),
            expected: Expect::Status(Code::Unauthenticated),
        },
        Case {
            name: "huge token",
            cred: Cred::Token("a".repeat(40_000)),
            expected: Expect::Status(Code::Unauthenticated),
        },
        Case {
            name: "join token",
            cred: Cred::Join(fresh_join),
            expected: Expect::Issued("spiffe://cluster.local/ns/vm/sa/db"),
        },
        Case {
            name: "join token reused",
            cred: Cred::Join(used_join),
            expected: Expect::Status(Code::Unauthenticated),
        },
        Case {
            name: "join token expired",
            cred: Cred::Join(expired_join),
            expected: Expect::Status(Code::Unauthenticated),
        },
        Case {
            name: "join token unknown",
            cred: Cred::Join(format!("meshid-join-{}", "x".repeat(43))),
            expected: Expect::Status(Code::Unauthenticated),
        },
        Case {
            name: "renewal with a valid certificate",
            cred: Cred::Cert(valid_chain, valid_key),
            expected: Expect::Issued(FRONTEND),
        },
        Case {
            name: "renewal from a namespace no longer allowed",
            cred: Cred::Cert(denied_ns_chain, denied_ns_key),
            expected: Expect::Status(Code::PermissionDenied),
        },
        Case {
            name: "renewal with an expired certificate",
            cred: Cred::Cert(expired_chain, expired_key),
            expected: Expect::TlsRefused("expired"),
        },
        Case {
            name: "renewal with a certificate from another CA",
            cred: Cred::Cert(foreign_chain, foreign_key),
            expected: Expect::TlsRefused("unknown_ca"),
        },
        Case {
            name: "no credential at all",
            cred: Cred::Nothing,
            expected: Expect::Status(Code::Unauthenticated),
        },
    ];

    // A renewal that must work after the hostile ones: the CA is still up and still renews.
    let (control_chain, control_key) = direct_cert(
        &ca,
        FRONTEND,
        OffsetDateTime::now_utc(),
        Duration::from_secs(3600),
    );
    let control = Case {
        name: "renewal with a valid certificate, after the hostile ones",
        cred: Cred::Cert(control_chain, control_key),
        expected: Expect::Issued(FRONTEND),
    };

    let mut failures = Vec::new();
    for case in cases.into_iter().chain(hostile_renewals).chain([control]) {
        let refusals_before = match case.expected {
            Expect::TlsRefused(reason) => ca_handshake_failures(&ca, reason).await,
            _ => 0,
        };
        let got = issue(&ca, case.cred).await;
        let ok = match (&case.expected, &got) {
            (Expect::Issued(id), Ok(got_id)) => got_id == id,
            (Expect::Status(code), Err(Ok(got_code))) => code == got_code,
            // The client sees the alert, maybe before the CA has counted its refusal (TLS 1.3).
            (Expect::TlsRefused(reason), Err(Err(_))) => {
                let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
                loop {
                    if ca_handshake_failures(&ca, reason).await > refusals_before {
                        break true;
                    }
                    if tokio::time::Instant::now() > deadline {
                        let admin = ca.admin_addr;
                        let m = tokio::task::spawn_blocking(move || http_get(admin, "/metrics"))
                            .await
                            .unwrap()
                            .map(|(_, m)| m)
                            .unwrap_or_default();
                        let counted: Vec<&str> = m
                            .lines()
                            .filter(|l| l.starts_with(CA_HANDSHAKE_FAILURES))
                            .collect();
                        eprintln!("{}: no {reason} refusal counted: {counted:?}", case.name);
                        break false;
                    }
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
            }
            _ => false,
        };
        if !ok {
            failures.push(format!(
                "{}: expected {:?}, got {:?}",
                case.name, case.expected, got
            ));
        }
    }
    ca.stop().await;
    assert!(
        failures.is_empty(),
        "failing cases:\n{}",
        failures.join("\n")
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn token_from_another_cluster_is_unauthenticated() {
    // Same kid, same claims, but signed by another cluster's key.
    let ca = TestCa::start(CaOptions::default()).await;
    let other = meshid_tests::fake_cluster::FakeCluster::new();
    let got = issue(&ca, Cred::Token(other.token("shop", "frontend"))).await;
    assert_eq!(got, Err(Ok(Code::Unauthenticated)));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn jwks_rotation_is_picked_up_without_restart() {
    let ca = TestCa::start(CaOptions::default()).await;
    let new_cluster = meshid_tests::fake_cluster::FakeCluster::new();
    let token = new_cluster.token("shop", "frontend");
    assert_eq!(
        issue(&ca, Cred::Token(token.clone())).await,
        Err(Ok(Code::Unauthenticated))
    );
    // The cluster rotates its service-account signing keys; the JWKS file is replaced.
    let mut jwks = new_cluster.jwks();
    jwks["keys"][0]["kid"] = json!(new_cluster.rsa_kid.clone());
    std::fs::write(ca.dir.path().join("jwks.json.tmp"), jwks.to_string()).unwrap();
    std::fs::rename(
        ca.dir.path().join("jwks.json.tmp"),
        ca.dir.path().join("jwks.json"),
    )
    .unwrap();
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    loop {
        match issue(&ca, Cred::Token(token.clone())).await {
            Ok(id) => {
                assert_eq!(id, FRONTEND);
                break;
            }
            Err(_) if std::time::Instant::now() < deadline => {
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
            Err(e) => panic!("new JWKS never picked up: {e:?}"),
        }
    }
    // A broken JWKS file keeps the last good keys. The file is looked at again on the calls that
    // follow; each is still served, until the CA has read the broken file and counted the error.
    let jwks_errors = || async {
        let admin = ca.admin_addr;
        let metrics = tokio::task::spawn_blocking(move || http_get(admin, "/metrics"))
            .await
            .unwrap()
            .map(|(_, m)| m)
            .unwrap_or_default();
        metric(
            &metrics,
            "meshid_ca_jwks_refreshes_total",
            &["result=\"error\""],
        )
    };
    let errors_before = jwks_errors().await;
    std::fs::write(ca.dir.path().join("jwks.json"), "{ not json").unwrap();
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while jwks_errors().await == errors_before {
        assert!(
            std::time::Instant::now() < deadline,
            "the broken JWKS file was never read"
        );
        assert_eq!(
            issue(&ca, Cred::Token(new_cluster.token("shop", "frontend"))).await,
            Ok(FRONTEND.to_owned())
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    assert_eq!(
        issue(&ca, Cred::Token(new_cluster.token("shop", "frontend"))).await,
        Ok(FRONTEND.to_owned()),
        "the last good keys are kept once the broken file was read"
    );
}

/// A join token whose use the CA cannot record (its directory read-only or full; here the record's
/// place is taken by a directory, which fails alike for root) is not consumed: the CA answers
/// UNAVAILABLE saying so, not "already used" (which made sidecars drop the token for good), and the
/// same token works once the directory can be written. Found by the chaos scenario `ca-dir`
/// (docs/reliability.md).
#[tokio::test]
async fn a_join_token_whose_use_cannot_be_recorded_stays_good() {
    const DB: &str = "spiffe://cluster.local/ns/vm/sa/db";
    let ca = TestCa::start(CaOptions::default()).await;
    let token = ca.join_token(DB, Duration::from_secs(600));
    let hash = meshid_identity::pem::sha256_hex(token.as_bytes());
    let blocker = ca
        .dir
        .path()
        .join("join-tokens")
        .join(format!("{hash}.used"));
    std::fs::create_dir(&blocker).unwrap();
    std::fs::write(blocker.join("in-the-way"), "x").unwrap();
    let request = || IssueRequest {
        csr: WorkloadKey::new().csr,
        credential: Some(Credential::JoinToken(token.clone())),
        ttl_seconds: 0,
        app_svid: false,
    };
    let mut client = ca.client().await;
    let refused = client.issue(request()).await.unwrap_err();
    assert_eq!(refused.code(), Code::Unavailable, "{refused:?}");
    assert!(
        refused.message().contains("not consumed"),
        "{}",
        refused.message()
    );
    std::fs::remove_dir_all(&blocker).unwrap();
    let issued = client.issue(request()).await.unwrap().into_inner();
    assert_eq!(issued.spiffe_id, DB);
}

/// A CA fetching its JWKS from a fake API server; forced refreshes at most every `interval`.
async fn ca_fetching_from(server: &FakeApiServer, interval: Duration) -> TestCa {
    TestCa::start(CaOptions {
        jwks: Some(JwksSource::Remote(RemoteJwks {
            token_file: server.token_file.clone(),
            ca_file: server.ca_file.clone(),
            refresh_every: Duration::from_secs(3600),
            min_forced_interval: interval,
            connect_timeout: Duration::from_secs(2),
            request_timeout: Duration::from_secs(3),
            ..RemoteJwks::new(server.jwks_url())
        })),
        ..CaOptions::default()
    })
    .await
}

/// An Issue call with a service-account token and `csr`: the identity, or the status code.
async fn issue_with(ca: &TestCa, token: String, csr: Vec<u8>) -> Result<String, Code> {
    ca.client()
        .await
        .issue(IssueRequest {
            csr,
            credential: Some(Credential::ServiceAccountToken(token)),
            ttl_seconds: 0,
            app_svid: false,
        })
        .await
        .map(|r| r.into_inner().spiffe_id)
        .map_err(|s| s.code())
}

/// A token of `cluster` naming the unknown key `kid`, its claims changed by `change`.
fn naming(cluster: &FakeCluster, kid: &str, change: impl FnOnce(&mut TokenSpec)) -> String {
    let mut spec = cluster.spec("shop", "frontend", KeyKind::Rsa);
    spec.header["kid"] = json!(kid);
    change(&mut spec);
    cluster.sign(&spec)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn calls_that_could_not_be_issued_for_force_no_jwks_refresh_before_a_key_rollover() {
    let old = FakeCluster::new();
    let server = FakeApiServer::start(Answer::Json(old.jwks())).await;
    let ca = ca_fetching_from(&server, Duration::from_secs(15)).await;
    let fetches = server.counts().jwks;
    // Anonymous callers naming made-up keys, just before the cluster rolls its keys: none of
    // these could be the cluster's, so none takes the one forced refresh per 15 s.
    let junk: [(&str, String, Vec<u8>); 5] = [
        (
            "another issuer",
            naming(&old, "made-up-1", |s| {
                s.claims["iss"] = json!("https://evil")
            }),
            WorkloadKey::new().csr,
        ),
        (
            "another audience",
            naming(&old, "made-up-2", |s| s.claims["aud"] = json!(["vault"])),
            WorkloadKey::new().csr,
        ),
        (
            "expired",
            naming(&old, "made-up-3", |s| {
                s.claims["exp"] = json!(unix_now() - 3600)
            }),
            WorkloadKey::new().csr,
        ),
        (
            "not a service account",
            naming(&old, "made-up-4", |s| s.claims["sub"] = json!("admin")),
            WorkloadKey::new().csr,
        ),
        (
            "plausible claims, but a broken CSR",
            naming(&old, "made-up-5", |_| {}),
            b"not a csr".to_vec(),
        ),
    ];
    for (name, token, csr) in junk {
        assert!(issue_with(&ca, token, csr).await.is_err(), "{name}");
        assert_eq!(server.counts().jwks, fetches, "{name}: no fetch");
    }
    // The cluster rolls its keys: the first token of the new key is taken at once.
    let mut new = FakeCluster::new();
    new.rsa_kid = "rsa-key-rolled".into();
    new.ec_kid = "ec-key-rolled".into();
    let mut both = new.jwks();
    let old_keys = old.jwks()["keys"].as_array().unwrap().clone();
    both["keys"].as_array_mut().unwrap().extend(old_keys);
    server.answer(Answer::Json(both));
    assert_eq!(
        issue_with(&ca, new.token("shop", "frontend"), WorkloadKey::new().csr).await,
        Ok(FRONTEND.to_owned())
    );
    assert_eq!(server.counts().jwks, fetches + 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_key_id_a_forced_refresh_did_not_find_forces_no_other() {
    let cluster = FakeCluster::new();
    let server = FakeApiServer::start(Answer::Json(cluster.jwks())).await;
    let ca = ca_fetching_from(&server, Duration::from_millis(100)).await;
    let fetches = server.counts().jwks;
    let ghost = || naming(&cluster, "ghost", |_| {});
    let csr = || WorkloadKey::new().csr;
    assert_eq!(
        issue_with(&ca, ghost(), csr()).await,
        Err(Code::Unauthenticated)
    );
    assert_eq!(server.counts().jwks, fetches + 1, "looked for once");
    tokio::time::sleep(Duration::from_millis(300)).await;
    for _ in 0..5 {
        assert_eq!(
            issue_with(&ca, ghost(), csr()).await,
            Err(Code::Unauthenticated)
        );
    }
    assert_eq!(server.counts().jwks, fetches + 1, "not looked for again");
    // Another key ID is looked for.
    let other = naming(&cluster, "ghost-2", |_| {});
    assert_eq!(
        issue_with(&ca, other, csr()).await,
        Err(Code::Unauthenticated)
    );
    assert_eq!(server.counts().jwks, fetches + 2);
}
