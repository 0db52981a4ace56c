//! JWKS discovery (`--jwks-url`, `--jwks-discovery`): an in-process CA fetches the service-account
//! issuer's keys from a fake API server over real HTTPS (its own CA, bearer token required), picks
//! up a key rollover on the first token signed by the new key, keeps the last good keys through
//! outages and garbage, and cannot be made to hammer the server with made-up `kid`s.

use std::time::{Duration, Instant};

use meshid_ca::auth::{JwksSource, RemoteJwks};
use meshid_proto::ca::v1::{IssueRequest, issue_request::Credential};
use meshid_tests::ca::{CaOptions, TestCa};
use meshid_tests::fake_apiserver::{Answer, FakeApiServer, test_ca};
use meshid_tests::fake_cluster::{FakeCluster, KeyKind};
use meshid_tests::pki::WorkloadKey;
use serde_json::json;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tonic::Code;

const FRONTEND: &str = "spiffe://cluster.local/ns/shop/sa/frontend";
const OK: &str = r#"meshid_ca_jwks_refreshes_total{result="ok"}"#;
const ERROR: &str = r#"meshid_ca_jwks_refreshes_total{result="error"}"#;

/// A CA fetching its JWKS from `server` at `url`, refreshing every `refresh_every`.
async fn ca_for(server: &FakeApiServer, url: String, refresh_every: Duration) -> TestCa {
    TestCa::start(CaOptions {
        jwks: Some(JwksSource::Remote(RemoteJwks {
            token_file: server.token_file.clone(),
            ca_file: server.ca_file.clone(),
            refresh_every,
            min_forced_interval: Duration::from_secs(15),
            connect_timeout: Duration::from_secs(2),
            request_timeout: Duration::from_secs(3),
            ..RemoteJwks::new(url)
        })),
        ..CaOptions::default()
    })
    .await
}

/// Issue with a service-account token: the identity issued, or the status code.
async fn issue(ca: &TestCa, token: String) -> Result<String, Code> {
    issue_with(ca.client().await, token).await
}

/// Issue calls with `tokens`, all at once (each on a connection of its own), in their order.
async fn issue_all(ca: &TestCa, tokens: Vec<String>) -> Vec<Result<String, Code>> {
    let mut calls = Vec::new();
    for token in tokens {
        let client = ca.client().await;
        calls.push(tokio::spawn(issue_with(client, token)));
    }
    let mut answers = Vec::new();
    for call in calls {
        answers.push(call.await.expect("the call's task"));
    }
    answers
}

async fn issue_with(
    mut client: meshid_proto::ca::v1::certificate_authority_client::CertificateAuthorityClient<
        tonic::transport::Channel,
    >,
    token: String,
) -> Result<String, Code> {
    client
        .issue(IssueRequest {
            csr: WorkloadKey::new().csr,
            credential: Some(Credential::ServiceAccountToken(token)),
            ttl_seconds: 0,
            app_svid: false,
        })
        .await
        .map(|r| r.into_inner().spiffe_id)
        .map_err(|s| s.code())
}

/// The CA's `/metrics` text.
async fn metrics(ca: &TestCa) -> String {
    let mut s = TcpStream::connect(ca.admin_addr).await.unwrap();
    s.write_all(b"GET /metrics HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        .await
        .unwrap();
    let mut out = String::new();
    s.read_to_string(&mut out).await.unwrap();
    out
}

/// The value of the sample named exactly `series` (name and labels), 0 when absent.
fn sample(metrics: &str, series: &str) -> f64 {
    metrics
        .lines()
        .find_map(|l| l.strip_prefix(series)?.strip_prefix(' '))
        .map_or(0.0, |v| v.trim().parse().unwrap())
}

/// Waits (up to 20 s) until `series` exceeds `above`.
async fn wait_for_metric_above(ca: &TestCa, series: &str, above: f64) -> f64 {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let v = sample(&metrics(ca).await, series);
        if v > above {
            return v;
        }
        assert!(
            Instant::now() < deadline,
            "{series} stayed at {v}:\n{}",
            metrics(ca).await
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// A second issuer with its own keys and kids, as after a key rollover.
fn next_cluster(suffix: &str) -> FakeCluster {
    let mut c = FakeCluster::new();
    c.rsa_kid = format!("rsa-key-{suffix}");
    c.ec_kid = format!("ec-key-{suffix}");
    c
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tokens_signed_by_the_served_keys_are_accepted() {
    let cluster = FakeCluster::new();
    let server = FakeApiServer::start(Answer::Json(cluster.jwks())).await;
    // Straight at the JWKS endpoint, and through the OIDC discovery document.
    for url in [server.jwks_url(), server.discovery_url()] {
        let ca = ca_for(&server, url.clone(), Duration::from_secs(3600)).await;
        for key in [KeyKind::Rsa, KeyKind::Ec] {
            let token = cluster.sign(&cluster.spec("shop", "frontend", key));
            assert_eq!(issue(&ca, token).await, Ok(FRONTEND.to_owned()), "{url}");
        }
        // Another issuer's token is still refused.
        let other = next_cluster("other");
        assert_eq!(
            issue(&ca, other.token("shop", "frontend")).await,
            Err(Code::Unauthenticated)
        );
        let m = metrics(&ca).await;
        assert!(sample(&m, OK) >= 1.0, "{m}");
        assert_eq!(sample(&m, "meshid_ca_jwks_keys"), 2.0, "{m}");
        assert!(sample(&m, "meshid_ca_jwks_last_success_timestamp_seconds") > 1.0e9);
    }
    let counts = server.counts();
    assert!(counts.discovery >= 1, "{counts:?}");
    assert_eq!(counts.unauthorized, 0, "{counts:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_key_rollover_is_picked_up_on_the_first_token_of_the_new_key() {
    let old = FakeCluster::new();
    let server = FakeApiServer::start(Answer::Json(old.jwks())).await;
    // No periodic refresh during the test: only a token naming the new kid can bring it.
    let ca = ca_for(&server, server.jwks_url(), Duration::from_secs(3600)).await;
    assert_eq!(
        issue(&ca, old.token("shop", "frontend")).await,
        Ok(FRONTEND.to_owned())
    );
    let fetches = server.counts().jwks;

    // The cluster rolls its keys: the API server serves the new key next to the old one.
    let new = next_cluster("2");
    let mut both = new.jwks();
    let old_keys = old.jwks()["keys"].as_array().unwrap().clone();
    both["keys"].as_array_mut().unwrap().extend(old_keys);
    server.answer(Answer::Json(both));
    // The very first token signed by the new key is accepted, without a restart or a retry.
    assert_eq!(
        issue(&ca, new.token("shop", "frontend")).await,
        Ok(FRONTEND.to_owned())
    );
    assert_eq!(server.counts().jwks, fetches + 1, "one forced refresh");
    let ec = new.sign(&new.spec("shop", "frontend", KeyKind::Ec));
    assert_eq!(issue(&ca, ec).await, Ok(FRONTEND.to_owned()));
    assert_eq!(
        issue(&ca, old.token("shop", "frontend")).await,
        Ok(FRONTEND.to_owned())
    );
    assert_eq!(sample(&metrics(&ca).await, "meshid_ca_jwks_keys"), 4.0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn outages_and_garbage_keep_the_last_good_keys() {
    let good = FakeCluster::new();
    let server = FakeApiServer::start(Answer::Json(good.jwks())).await;
    let ca = ca_for(&server, server.jwks_url(), Duration::from_millis(300)).await;
    assert_eq!(
        issue(&ca, good.token("shop", "frontend")).await,
        Ok(FRONTEND.to_owned())
    );
    let attacker = next_cluster("attacker");
    let mut huge = attacker.jwks();
    huge["padding"] = json!("x".repeat(2 << 20));
    let bad_key = json!({"keys": [{"use": "sig", "kty": "RSA", "kid": attacker.rsa_kid, "alg": "RS256", "n": "!!not base64!!", "e": "AQAB"}]});
    let answers = [
        ("unreachable", Answer::Down),
        (
            "not JSON",
            Answer::Raw(200, b"<html>503 gateway</html>".to_vec()),
        ),
        (
            "not a JWKS",
            Answer::Json(json!({"kind": "Status", "code": 200})),
        ),
        ("no keys", Answer::Json(json!({"keys": []}))),
        (
            "no usable key",
            Answer::Json(json!({"keys": [{"kty": "oct", "kid": "h", "k": "c2VjcmV0"}]})),
        ),
        ("a key that does not parse", Answer::Json(bad_key)),
        (
            "a body over 1 MiB",
            Answer::Raw(200, huge.to_string().into_bytes()),
        ),
        (
            "500",
            Answer::Raw(500, attacker.jwks().to_string().into_bytes()),
        ),
        (
            "binary",
            Answer::Raw(200, (0..=255u8).cycle().take(4096).collect()),
        ),
    ];
    for (name, answer) in answers {
        let errors = sample(&metrics(&ca).await, ERROR);
        server.answer(answer);
        wait_for_metric_above(&ca, ERROR, errors).await;
        // Tokens of the last good keys still work; the attacker's (served in some answers) do not.
        for key in [KeyKind::Rsa, KeyKind::Ec] {
            let token = good.sign(&good.spec("shop", "frontend", key));
            assert_eq!(issue(&ca, token).await, Ok(FRONTEND.to_owned()), "{name}");
        }
        assert_eq!(
            issue(&ca, attacker.token("shop", "frontend")).await,
            Err(Code::Unauthenticated),
            "{name}"
        );
        assert_eq!(
            sample(&metrics(&ca).await, "meshid_ca_jwks_keys"),
            2.0,
            "{name}"
        );
    }
    // The server recovers: refreshes succeed again.
    let oks = sample(&metrics(&ca).await, OK);
    server.answer(Answer::Json(good.jwks()));
    wait_for_metric_above(&ca, OK, oks).await;
    assert_eq!(
        issue(&ca, good.token("shop", "frontend")).await,
        Ok(FRONTEND.to_owned())
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_flood_of_unknown_kids_costs_a_bounded_number_of_fetches() {
    let cluster = FakeCluster::new();
    let server = FakeApiServer::start(Answer::Json(cluster.jwks())).await;
    let ca = ca_for(&server, server.jwks_url(), Duration::from_secs(3600)).await;
    let before = server.counts().jwks;
    assert_eq!(before, 1, "the first fetch at start");
    let client = ca.client().await;
    let mut calls = Vec::new();
    for i in 0..300 {
        let mut spec = cluster.spec("shop", "frontend", KeyKind::Rsa);
        spec.header["kid"] = json!(format!("random-kid-{i}-{}", rand_suffix(i)));
        let token = cluster.sign(&spec);
        let mut client = client.clone();
        calls.push(tokio::spawn(async move {
            client
                .issue(IssueRequest {
                    csr: WorkloadKey::new().csr,
                    credential: Some(Credential::ServiceAccountToken(token)),
                    ttl_seconds: 0,
                    app_svid: false,
                })
                .await
                .map(|_| ())
                .map_err(|s| s.code())
        }));
    }
    for call in calls {
        assert_eq!(call.await.unwrap(), Err(Code::Unauthenticated));
    }
    let fetched = server.counts().jwks - before;
    // One forced refresh per --jwks-min-refresh-interval (15 s here): one, or two if the flood
    // outlasted an interval on a slow machine. Never one per token.
    assert!(
        (1..=2).contains(&fetched),
        "{fetched} fetches for 300 unknown kids"
    );
    // The known key still works.
    assert_eq!(
        issue(&ca, cluster.token("shop", "frontend")).await,
        Ok(FRONTEND.to_owned())
    );
}

fn rand_suffix(i: usize) -> u64 {
    use std::hash::{BuildHasher, Hasher};
    let mut h = std::collections::hash_map::RandomState::new().build_hasher();
    h.write_usize(i);
    h.finish()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_wrong_token_or_an_untrusted_server_is_an_error_and_keeps_the_keys() {
    let good = FakeCluster::new();
    let server = FakeApiServer::start(Answer::Json(good.jwks())).await;
    let ca = ca_for(&server, server.jwks_url(), Duration::from_millis(300)).await;
    assert_eq!(
        issue(&ca, good.token("shop", "frontend")).await,
        Ok(FRONTEND.to_owned())
    );
    let rolled = next_cluster("rolled");

    // The server now wants another token (as after the kubelet rotated ours): 401, an error.
    server.answer(Answer::Json(rolled.jwks()));
    server.accept_token("a-token-the-ca-does-not-have");
    let errors = sample(&metrics(&ca).await, ERROR);
    wait_for_metric_above(&ca, ERROR, errors).await;
    assert!(server.counts().unauthorized >= 1);
    assert_eq!(
        issue(&ca, good.token("shop", "frontend")).await,
        Ok(FRONTEND.to_owned())
    );
    assert_eq!(
        issue(&ca, rolled.token("shop", "frontend")).await,
        Err(Code::Unauthenticated)
    );

    // The token file is re-read at every fetch: the kubelet's new token works at once.
    std::fs::write(&server.token_file, "the-rotated-token\n").unwrap();
    server.accept_token("the-rotated-token");
    let oks = sample(&metrics(&ca).await, OK);
    wait_for_metric_above(&ca, OK, oks).await;
    assert_eq!(
        issue(&ca, rolled.token("shop", "frontend")).await,
        Ok(FRONTEND.to_owned())
    );

    // The server's certificate no longer chains to the CA bundle the CA trusts: TLS fails.
    let (other_ca, _) = test_ca("not the cluster CA");
    std::fs::write(&server.ca_file, other_ca).unwrap();
    server.answer(Answer::Json(good.jwks()));
    let errors = sample(&metrics(&ca).await, ERROR);
    wait_for_metric_above(&ca, ERROR, errors).await;
    assert_eq!(
        issue(&ca, rolled.token("shop", "frontend")).await,
        Ok(FRONTEND.to_owned())
    );
    assert_eq!(
        issue(&ca, good.token("shop", "frontend")).await,
        Err(Code::Unauthenticated)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_ca_that_cannot_fetch_at_start_serves_and_fetches_later() {
    let cluster = FakeCluster::new();
    let server = FakeApiServer::start(Answer::Down).await;
    let ca = ca_for(&server, server.jwks_url(), Duration::from_millis(300)).await;
    let m = metrics(&ca).await;
    assert!(sample(&m, ERROR) >= 1.0, "{m}");
    assert_eq!(sample(&m, "meshid_ca_jwks_keys"), 0.0, "{m}");
    assert_eq!(
        issue(&ca, cluster.token("shop", "frontend")).await,
        Err(Code::Unauthenticated)
    );
    server.answer(Answer::Json(cluster.jwks()));
    wait_for_metric_above(&ca, "meshid_ca_jwks_keys", 0.0).await;
    assert_eq!(
        issue(&ca, cluster.token("shop", "frontend")).await,
        Ok(FRONTEND.to_owned())
    );
}

/// A CA that fetches its keys from `server` and reviews the tokens it takes there
/// (`--token-review`), each request given `request_timeout`.
async fn token_review_ca(server: &FakeApiServer, request_timeout: Duration) -> TestCa {
    TestCa::start(CaOptions {
        jwks: Some(JwksSource::Remote(RemoteJwks {
            token_file: server.token_file.clone(),
            ca_file: server.ca_file.clone(),
            connect_timeout: Duration::from_secs(2),
            request_timeout,
            ..RemoteJwks::new(server.jwks_url())
        })),
        token_review: true,
        ..CaOptions::default()
    })
    .await
}

/// Calls that arrive together with one token ask the API server once (the others wait for that
/// answer), and one identity's tokens hold at most two reviews in flight: a holder of a valid
/// token cannot take every review slot from other workloads with a burst of calls.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_token_review_a_burst_of_calls_asks_once_per_token_and_twice_per_identity() {
    let cluster = FakeCluster::new();
    let server = FakeApiServer::start(Answer::Json(cluster.jwks())).await;
    let ca = token_review_ca(&server, Duration::from_secs(4)).await;
    let token = |sa: &str, jti: &str| {
        let mut spec = cluster.spec("shop", sa, KeyKind::Rsa);
        spec.claims["jti"] = json!(jti);
        cluster.sign(&spec)
    };
    // The JWKS fetched first, so that the calls below meet at the review.
    assert_eq!(
        issue(&ca, token("frontend", "warm")).await,
        Ok(FRONTEND.to_owned())
    );
    let before = server.counts().token_reviews;
    server.delay_reviews(Duration::from_millis(800));

    // Ten calls with one token: one review, ten certificates.
    let one = token("frontend", "one");
    let answers = issue_all(&ca, vec![one; 10]).await;
    assert!(
        answers.iter().all(|a| a.as_deref() == Ok(FRONTEND)),
        "{answers:?}"
    );
    assert_eq!(
        server.counts().token_reviews - before,
        1,
        "one review per token"
    );

    // Three tokens of one identity at once: two reviewed, the third told to try again; another
    // identity's token is reviewed all the same.
    let before = server.counts().token_reviews;
    let tokens = vec![
        token("frontend", "a"),
        token("frontend", "b"),
        token("frontend", "c"),
        token("cart", "d"),
    ];
    let answers = issue_all(&ca, tokens).await;
    let frontend = &answers[..3];
    assert_eq!(
        frontend
            .iter()
            .filter(|a| a.as_deref() == Ok(FRONTEND))
            .count(),
        2,
        "{answers:?}"
    );
    assert_eq!(
        frontend
            .iter()
            .filter(|a| **a == Err(Code::Unavailable))
            .count(),
        1,
        "{answers:?}"
    );
    assert_eq!(
        answers[3].as_deref(),
        Ok("spiffe://cluster.local/ns/shop/sa/cart"),
        "{answers:?}"
    );
    assert_eq!(server.counts().token_reviews - before, 3);
}

/// With `--token-review`, a token the CA takes is then asked about at the API server before it
/// attests (a TokenReview on the host the keys come from, with the CA's own token): once its pod is
/// deleted the token attests no more, though it verifies and has not expired. A forged token never
/// reaches the API server. When the API server cannot answer nothing is decided: `Unavailable`,
/// and the same token is taken once it answers again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_token_review_a_token_whose_pod_is_deleted_attests_no_more() {
    let cluster = FakeCluster::new();
    let server = FakeApiServer::start(Answer::Json(cluster.jwks())).await;
    let ca = token_review_ca(&server, Duration::from_secs(3)).await;
    // Tokens of one service account told apart by their `jti`, as the kubelet's are.
    let token = |jti: &str| {
        let mut spec = cluster.spec("shop", "frontend", KeyKind::Rsa);
        spec.claims["jti"] = json!(jti);
        cluster.sign(&spec)
    };
    let reviews = || server.counts().token_reviews;

    let live = token("live");
    assert_eq!(issue(&ca, live.clone()).await, Ok(FRONTEND.to_owned()));
    assert_eq!(reviews(), 1, "the token was reviewed");
    assert_eq!(
        server.counts().unauthorized,
        0,
        "the CA reviews with its own token"
    );

    // Another issuer's token: refused by the CA alone, the API server never asked.
    let forged = next_cluster("forged").token("shop", "frontend");
    assert_eq!(issue(&ca, forged).await, Err(Code::Unauthenticated));
    assert_eq!(reviews(), 1);

    // A token whose pod was deleted: valid by its signature and dates, refused by the review.
    let orphan = token("orphan");
    server.delete_pod_of(&orphan);
    assert_eq!(issue(&ca, orphan.clone()).await, Err(Code::Unauthenticated));
    assert_eq!(reviews(), 2);
    let m = metrics(&ca).await;
    assert!(m.contains("token_review_refused"), "{m}");
    // Asked again at once: the answer is remembered, the API server not asked again.
    assert_eq!(issue(&ca, orphan).await, Err(Code::Unauthenticated));
    assert_eq!(reviews(), 2);

    // The API server cannot answer: nothing decided, and nothing remembered.
    let later = token("later");
    server.answer_reviews(Some(Answer::Raw(500, b"{}".to_vec())));
    assert_eq!(issue(&ca, later.clone()).await, Err(Code::Unavailable));
    server.answer_reviews(None);
    assert_eq!(issue(&ca, later).await, Ok(FRONTEND.to_owned()));
    assert_eq!(reviews(), 4);
}
