//! Inbound mTLS over real sockets: every hostile peer is refused with a reason in the metrics, and the
//! sidecar keeps serving the peers it should.

use std::time::Duration;

use meshid_identity::policy::Protocol;
use meshid_sidecar::settings::Limits;
use meshid_tests::mesh::{
    SidecarSpec, TestPki, TestSidecar, Workload, client_config, echo_roundtrip, eventually, get,
    handshake_failure_lines, handshake_failures, http_echo, http_request, metric, mtls_connect,
    tcp_echo,
};
use meshid_tests::pki::ForeignCa;
use rcgen::SanType;
use time::OffsetDateTime;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

const SERVER: &str = "spiffe://cluster.local/ns/shop/sa/server";
const CLIENT: &str = "spiffe://cluster.local/ns/shop/sa/client";
const STRANGER: &str = "spiffe://cluster.local/ns/shop/sa/stranger";

fn policy() -> String {
    format!(
        "mode: enforce\ninbound:\n  - port: {{port0}}\n    protocol: tcp\n    allow:\n      - id: {CLIENT}\n"
    )
}

enum Client {
    Cert(Workload),
    NoCert,
}

struct Case {
    name: &'static str,
    client: Client,
    /// `None`: the echo comes back. `Some(reason)`: refused, counted under this reason label.
    refused: Option<&'static str>,
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hostile_peers_are_refused_and_others_served() {
    let pki = TestPki::new();
    let app = tcp_echo().await;
    let server_cert = pki.workload(SERVER);
    let sidecar = TestSidecar::start(
        &pki,
        &server_cert,
        SERVER,
        SidecarSpec {
            inbound: vec![("127.0.0.3", app, Protocol::Tcp)],
            policy: Some(policy()),
            limits: Some(Limits {
                handshake_timeout: Duration::from_secs(1),
                max_connections: 20,
                ..Limits::default()
            }),
            ..Default::default()
        },
    )
    .await;
    let addr = sidecar.inbound[0];
    let roots = pki.roots();
    let now = OffsetDateTime::now_utc();

    let cases = vec![
        Case {
            name: "allowed peer",
            client: Client::Cert(pki.workload(CLIENT)),
            refused: None,
        },
        Case {
            name: "no client certificate",
            client: Client::NoCert,
            refused: Some("no_client_cert"),
        },
        Case {
            name: "certificate from another CA",
            client: Client::Cert({
                let foreign = ForeignCa::new();
                let (chain, key) = foreign.workload(CLIENT);
                workload_from(&pki, chain, key)
            }),
            refused: Some("unknown_ca"),
        },
        Case {
            name: "other trust domain",
            client: Client::Cert(pki.workload("spiffe://evil.example/ns/shop/sa/client")),
            refused: Some("wrong_trust_domain"),
        },
        Case {
            name: "expired peer",
            client: Client::Cert(pki.workload_at(
                CLIENT,
                now - time::Duration::hours(3),
                Duration::from_secs(3600),
            )),
            refused: Some("expired"),
        },
        Case {
            name: "not yet valid peer",
            client: Client::Cert(pki.workload_at(
                CLIENT,
                now + time::Duration::hours(3),
                Duration::from_secs(3600),
            )),
            refused: Some("not_yet_valid"),
        },
        Case {
            name: "no URI SAN",
            client: Client::Cert(pki.with_sans(vec![SanType::DnsName(
                "client.shop.svc".try_into().unwrap(),
            )])),
            refused: Some("bad_identity"),
        },
        Case {
            name: "two URI SANs",
            client: Client::Cert(pki.with_sans(vec![
                SanType::URI(CLIENT.try_into().unwrap()),
                SanType::URI(STRANGER.try_into().unwrap()),
            ])),
            refused: Some("bad_identity"),
        },
        Case {
            name: "CA certificate used as a leaf",
            client: Client::Cert(pki.intermediate_as_leaf()),
            refused: Some("ca_as_leaf"),
        },
        Case {
            name: "SPIFFE ID with a dot-dot segment",
            client: Client::Cert(pki.with_sans(vec![SanType::URI(
                "spiffe://cluster.local/ns/../sa/client".try_into().unwrap(),
            )])),
            refused: Some("bad_identity"),
        },
        Case {
            name: "SPIFFE ID with a query",
            client: Client::Cert(pki.with_sans(vec![SanType::URI(
                    "spiffe://cluster.local/ns/shop/sa/client?admin=1"
                        .try_into()
                        .unwrap(),
                )])),
            refused: Some("bad_identity"),
        },
        Case {
            name: "SPIFFE ID with userinfo before the trust domain",
            client: Client::Cert(pki.with_sans(vec![SanType::URI(
                    "spiffe://client@cluster.local/ns/shop/sa/client"
                        .try_into()
                        .unwrap(),
                )])),
            refused: Some("bad_identity"),
        },
        Case {
            name: "SPIFFE ID with a port",
            client: Client::Cert(pki.with_sans(vec![SanType::URI(
                    "spiffe://cluster.local:443/ns/shop/sa/client"
                        .try_into()
                        .unwrap(),
                )])),
            refused: Some("bad_identity"),
        },
        Case {
            name: "SPIFFE ID with percent-encoding",
            client: Client::Cert(pki.with_sans(vec![SanType::URI(
                    "spiffe://cluster.local/ns/shop/sa/cl%69ent"
                        .try_into()
                        .unwrap(),
                )])),
            refused: Some("bad_identity"),
        },
        Case {
            name: "SPIFFE ID with an upper-case scheme",
            client: Client::Cert(pki.with_sans(
                vec![SanType::URI("SPIFFE://cluster.local/ns/shop/sa/client".try_into().unwrap())],
            )),
            refused: Some("bad_identity"),
        },
        Case {
            name: "https URI instead of a SPIFFE ID",
            client: Client::Cert(pki.with_sans(
                vec![SanType::URI("https://cluster.local/ns/shop/sa/client".try_into().unwrap())],
            )),
            refused: Some("bad_identity"),
        },
        Case {
            name: "SPIFFE ID over 2048 bytes",
            client: Client::Cert(pki.with_sans(vec![SanType::URI(
                format!("{CLIENT}/{}", "a".repeat(2100)).try_into().unwrap(),
            )])),
            refused: Some("bad_identity"),
        },
        Case {
            name: "server-only certificate (EKU serverAuth) used as a client",
            client: Client::Cert(pki.forge(|p| {
                p.subject_alt_names = vec![SanType::URI(CLIENT.try_into().unwrap())];
                p.extended_key_usages = vec![rcgen::ExtendedKeyUsagePurpose::ServerAuth];
            })),
            refused: Some("wrong_purpose"),
        },
        Case {
            name: "leaf signed by another leaf",
            client: Client::Cert(pki.under_extra_level(CLIENT, |_| {})),
            refused: Some("bad_chain"),
        },
        Case {
            name: "CA below the path-length-0 intermediate",
            client: Client::Cert(pki.under_extra_level(CLIENT, |p| {
                p.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
            })),
            refused: Some("bad_chain"),
        },
    ];

    let mut failures = Vec::new();
    for case in cases {
        let cfg = match &case.client {
            Client::Cert(w) => client_config(&roots, &pki.trust_domain, Some(w), &sidecar.id, &[]),
            Client::NoCert => client_config(&roots, &pki.trust_domain, None, &sidecar.id, &[]),
        };
        let count = |metrics: String, reason: &str| handshake_failures(&metrics, "inbound", reason);
        let before = match case.refused {
            Some(reason) => count(sidecar.metrics().await, reason),
            None => 0,
        };
        let got = echo_roundtrip(addr, cfg, b"hello").await;
        match (case.refused, got) {
            (None, Ok(back)) if back == b"hello" => {}
            (Some(reason), Err(_)) => {
                // This case's own refusal, counted under its reason (not an earlier case's).
                let counted = eventually(Duration::from_secs(5), || async {
                    count(sidecar.metrics().await, reason) > before
                })
                .await;
                if !counted {
                    let metrics = sidecar.metrics().await;
                    let seen = handshake_failure_lines(&metrics);
                    failures.push(format!(
                        "{}: refused but not counted as {reason}; counted: {seen:?}",
                        case.name
                    ));
                }
            }
            (want, got) => failures.push(format!(
                "{}: expected {}, got {:?}",
                case.name,
                want.map_or("echo".to_string(), |r| format!("refusal ({r})")),
                got.map(|b| String::from_utf8_lossy(&b).into_owned())
            )),
        }
    }
    assert!(
        failures.is_empty(),
        "failing cases:\n{}",
        failures.join("\n")
    );

    // A peer the policy does not list gets through TLS but is denied, named in the metrics.
    let stranger = pki.workload(STRANGER);
    let cfg = client_config(&roots, &pki.trust_domain, Some(&stranger), &sidecar.id, &[]);
    let back = echo_roundtrip(addr, cfg, b"hello").await;
    assert!(
        !matches!(&back, Ok(b) if b == b"hello"),
        "stranger must not reach the app: {back:?}"
    );
    let metrics = sidecar.metrics().await;
    assert!(
        metrics.contains(r#"decision="deny",rule="no-rule-matched""#),
        "{metrics}"
    );

    // The allowed peer is still served after all of that.
    let client = pki.workload(CLIENT);
    let cfg = client_config(&roots, &pki.trust_domain, Some(&client), &sidecar.id, &[]);
    assert_eq!(echo_roundtrip(addr, cfg, b"still").await.unwrap(), b"still");
}

fn workload_from(
    pki: &TestPki,
    chain: Vec<rustls::pki_types::CertificateDer<'static>>,
    key: rustls::pki_types::PrivateKeyDer<'static>,
) -> Workload {
    let _ = pki;
    Workload {
        chain,
        key_der: key.secret_der().to_vec(),
        cert_path: Default::default(),
        key_path: Default::default(),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn garbage_slowloris_and_floods_do_not_stop_service() {
    let pki = TestPki::new();
    let app = tcp_echo().await;
    let server_cert = pki.workload(SERVER);
    let sidecar = TestSidecar::start(
        &pki,
        &server_cert,
        SERVER,
        SidecarSpec {
            inbound: vec![("127.0.0.4", app, Protocol::Tcp)],
            policy: Some(policy()),
            limits: Some(Limits {
                handshake_timeout: Duration::from_millis(800),
                max_connections: 8,
                ..Limits::default()
            }),
            ..Default::default()
        },
    )
    .await;
    let addr = sidecar.inbound[0];

    // Plaintext HTTP and random bytes on the TLS port.
    for junk in [
        &b"GET / HTTP/1.1\r\nHost: x\r\n\r\n"[..],
        &[0x16, 0x03, 0x01, 0xff, 0xff, 0x01, 0x02, 0x03][..],
        &[0u8; 512][..],
    ] {
        let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
        s.write_all(junk).await.unwrap();
        let mut buf = Vec::new();
        let r = tokio::time::timeout(Duration::from_secs(5), s.read_to_end(&mut buf)).await;
        assert!(r.is_ok(), "the sidecar closes a garbage connection");
        assert!(!String::from_utf8_lossy(&buf).contains("HTTP/1.1 200"));
    }
    // A ClientHello that never finishes is cut at the handshake timeout.
    let mut slow = tokio::net::TcpStream::connect(addr).await.unwrap();
    slow.write_all(&[0x16, 0x03, 0x01]).await.unwrap();
    let mut buf = [0u8; 8];
    let r = tokio::time::timeout(Duration::from_secs(5), slow.read(&mut buf)).await;
    assert!(
        matches!(r, Ok(Ok(0)) | Ok(Err(_))),
        "slowloris closed: {r:?}"
    );

    // A flood of silent connections past max connections: each newcomer displaces the oldest
    // connection still in its handshake, counted; nothing crashes, and an allowed peer is served
    // while the flood is held open.
    let mut idle = Vec::new();
    for _ in 0..12 {
        idle.push(tokio::net::TcpStream::connect(addr).await.unwrap());
    }
    let counted = eventually(Duration::from_secs(5), || async {
        sidecar.metrics().await.contains(r#"reason="displaced""#)
    })
    .await;
    assert!(counted, "{}", sidecar.metrics().await);
    let client = pki.workload(CLIENT);
    let during = client_config(
        &pki.roots(),
        &pki.trust_domain,
        Some(&client),
        &sidecar.id,
        &[],
    );
    for round in 0..3 {
        let reply = echo_roundtrip(addr, during.clone(), b"during").await;
        assert!(
            reply.as_ref().is_ok_and(|b| b == b"during"),
            "allowed peer refused while the flood holds every slot (round {round}): {reply:?}"
        );
        // The flood comes back for the room the peer's connection gave up.
        idle.push(tokio::net::TcpStream::connect(addr).await.unwrap());
    }
    assert!(
        !sidecar
            .metrics()
            .await
            .contains(r#"reason="max_connections""#),
        "a newcomer was refused while unauthenticated connections held the slots"
    );
    drop(idle);

    let metrics = sidecar.metrics().await;
    assert!(metrics.contains(r#"reason="protocol""#), "{metrics}");
    assert!(metrics.contains(r#"reason="timeout""#), "{metrics}");

    // The allowed peer is served once the flood is gone.
    let client = pki.workload(CLIENT);
    let cfg = client_config(
        &pki.roots(),
        &pki.trust_domain,
        Some(&client),
        &sidecar.id,
        &[],
    );
    let ok = eventually(Duration::from_secs(5), || {
        let cfg = cfg.clone();
        async move {
            echo_roundtrip(addr, cfg, b"after")
                .await
                .is_ok_and(|b| b == b"after")
        }
    })
    .await;
    assert!(ok, "allowed peer served after the flood");
}

/// A policy port must agree with its listener: HTTP rules (with paths) on a TCP listener would open a
/// raw tunnel to any peer whose ID matches. Refused at start naming the port; refused on reload with
/// the last good policy kept; a peer that only an HTTP rule names never gets through.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn http_rules_never_open_a_tcp_tunnel() {
    let pki = TestPki::new();
    let app = tcp_echo().await;
    let server_cert = pki.workload(SERVER);
    let http_policy = format!(
        "inbound:\n  - port: {{port0}}\n    protocol: http\n    allow:\n      - id: {STRANGER}\n        paths: [/public]\n"
    );
    let spec = |policy: String| SidecarSpec {
        inbound: vec![("127.0.0.3", app, Protocol::Tcp)],
        policy: Some(policy),
        ..Default::default()
    };
    let refused = TestSidecar::try_start(&pki, &server_cert, SERVER, spec(http_policy.clone()))
        .await
        .err()
        .expect("a TCP listener with HTTP rules must not start");
    let why = refused.to_string();
    assert!(
        why.contains("inbound port") && why.contains("protocol: http") && why.contains("tcp"),
        "{why}"
    );

    let sidecar = TestSidecar::start(&pki, &server_cert, SERVER, spec(policy())).await;
    let addr = sidecar.inbound[0];
    let roots = pki.roots();
    let passes = |who: &Workload| {
        let cfg = client_config(&roots, &pki.trust_domain, Some(who), &sidecar.id, &[]);
        async move {
            echo_roundtrip(addr, cfg, b"hi")
                .await
                .is_ok_and(|b| b == b"hi")
        }
    };
    let client = pki.workload(CLIENT);
    let stranger = pki.workload(STRANGER);
    assert!(passes(&client).await);
    assert!(!passes(&stranger).await);
    sidecar.write_policy(&http_policy);
    let rejected = eventually(Duration::from_secs(10), || async {
        sidecar
            .metrics()
            .await
            .contains("meshid_sidecar_policy_reloads_total{result=\"rejected\"} 1")
    })
    .await;
    assert!(rejected, "{}", sidecar.metrics().await);
    // The last good policy still decides: the client passes, the stranger gets no tunnel.
    assert!(passes(&client).await);
    assert!(!passes(&stranger).await);
}

/// Between meshid's own ends the key exchange is the post-quantum hybrid X25519MLKEM768 (meshid's
/// clients offer it first); a client that offers only classical groups (OpenSSL 3.0, curl) still
/// gets X25519, with no extra round trip forced on it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn post_quantum_key_exchange_between_meshid_ends_classical_for_others() {
    let pki = TestPki::new();
    let server = pki.workload(SERVER);
    let app = tcp_echo().await;
    let sidecar = TestSidecar::start(
        &pki,
        &server,
        SERVER,
        SidecarSpec {
            inbound: vec![("127.0.0.39", app, Protocol::Tcp)],
            policy: Some(policy()),
            ..Default::default()
        },
    )
    .await;
    let client = pki.workload(CLIENT);
    let ours = client_config(
        &pki.roots(),
        &pki.trust_domain,
        Some(&client),
        &sidecar.id,
        &[],
    );
    assert_eq!(
        ours.crypto_provider().kx_groups[0].name(),
        rustls::NamedGroup::X25519MLKEM768,
        "meshid's provider offers the hybrid first"
    );
    let tls = mtls_connect(sidecar.inbound[0], ours).await.unwrap();
    assert_eq!(
        tls.get_ref()
            .1
            .negotiated_key_exchange_group()
            .map(|g| g.name()),
        Some(rustls::NamedGroup::X25519MLKEM768)
    );
    // A classical-only client.
    let mut provider = rustls::crypto::aws_lc_rs::default_provider();
    provider.kx_groups = vec![rustls::crypto::aws_lc_rs::kx_group::X25519];
    let anchors =
        meshid_identity::verify::Anchors::new(&pki.roots(), pki.trust_domain.clone()).unwrap();
    let verifier =
        meshid_identity::verify::SpiffeServerVerifier::new(anchors, sidecar.id.clone(), &provider);
    let classical = rustls::ClientConfig::builder_with_provider(std::sync::Arc::new(provider))
        .with_protocol_versions(&[&rustls::version::TLS13])
        .unwrap()
        .dangerous()
        .with_custom_certificate_verifier(std::sync::Arc::new(verifier))
        .with_client_auth_cert(client.chain.clone(), client.key())
        .unwrap();
    let tls = mtls_connect(sidecar.inbound[0], std::sync::Arc::new(classical))
        .await
        .unwrap();
    assert_eq!(
        tls.get_ref()
            .1
            .negotiated_key_exchange_group()
            .map(|g| g.name()),
        Some(rustls::NamedGroup::X25519)
    );
}

/// A workload with a valid certificate holds authenticated connections, which are never displaced
/// at the listener's cap: `--max-connections-per-peer` keeps it to its share, so another peer still
/// gets in, and the capped peer gets in again once it closes one.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_peer_identity_cannot_hold_every_inbound_connection() {
    let pki = TestPki::new();
    let app = tcp_echo().await;
    let server_cert = pki.workload(SERVER);
    const OTHER: &str = "spiffe://cluster.local/ns/shop/sa/other";
    let sidecar = TestSidecar::start(
        &pki,
        &server_cert,
        SERVER,
        SidecarSpec {
            inbound: vec![("127.0.0.5", app, Protocol::Tcp)],
            policy: Some(format!(
                "mode: enforce\ninbound:\n  - port: {{port0}}\n    protocol: tcp\n    allow:\n      - id: {CLIENT}\n      - id: {OTHER}\n"
            )),
            limits: Some(Limits {
                max_connections: 6,
                max_connections_per_peer: 3,
                ..Limits::default()
            }),
            ..Default::default()
        },
    )
    .await;
    let addr = sidecar.inbound[0];
    let config = |who: &str| {
        client_config(
            &pki.roots(),
            &pki.trust_domain,
            Some(&pki.workload(who)),
            &sidecar.id,
            &[],
        )
    };
    let (liar, other) = (config(CLIENT), config(OTHER));
    // The liar holds three served connections, its share.
    let mut held = Vec::new();
    for _ in 0..3 {
        let mut tls = mtls_connect(addr, liar.clone()).await.unwrap();
        tls.write_all(b"x").await.unwrap();
        let mut b = [0u8; 1];
        tls.read_exact(&mut b).await.unwrap();
        held.push(tls);
    }
    // Its fourth is closed after the handshake, and counted.
    for _ in 0..3 {
        let reply = echo_roundtrip(addr, liar.clone(), b"more").await;
        assert!(
            !reply.as_ref().is_ok_and(|b| b == b"more"),
            "a peer past its share was served: {reply:?}"
        );
    }
    let metrics = sidecar.metrics().await;
    assert!(
        metrics.contains(r#"reason="max_connections_per_peer""#),
        "{metrics}"
    );
    // Another peer is served, on free slots.
    for _ in 0..3 {
        let reply = echo_roundtrip(addr, other.clone(), b"other").await;
        assert!(
            reply.as_ref().is_ok_and(|b| b == b"other"),
            "another peer refused: {reply:?}"
        );
    }
    // The liar's held connections still work; closing one lets it in again.
    let mut first = held.remove(0);
    first.write_all(b"y").await.unwrap();
    let mut b = [0u8; 1];
    first.read_exact(&mut b).await.unwrap();
    drop(first);
    let back = eventually(Duration::from_secs(5), || {
        let liar = liar.clone();
        async move {
            echo_roundtrip(addr, liar, b"again")
                .await
                .is_ok_and(|b| b == b"again")
        }
    })
    .await;
    assert!(back, "the peer's closed connection gave its share back");
}

/// An h2 connection held open as `client` asking for h2 with `alpn` (none, `h2`, or `http/1.1`
/// and the preface all the same): its sender and driver once a first request was answered 200, or
/// why it was not (a GOAWAY's reason and debug data among it).
async fn h2_connection(
    sidecar: &TestSidecar,
    pki: &TestPki,
    client: &Workload,
    alpn: &[&[u8]],
) -> Result<
    (
        h2::client::SendRequest<bytes::Bytes>,
        tokio::task::JoinHandle<()>,
    ),
    String,
> {
    let config = client_config(
        &pki.roots(),
        &pki.trust_domain,
        Some(client),
        &sidecar.id,
        alpn,
    );
    let tls = mtls_connect(sidecar.inbound[0], config).await?;
    let (send, conn) = h2::client::handshake(tls)
        .await
        .map_err(|e| format!("{e:?}"))?;
    let conn = tokio::spawn(async move { drop(conn.await) });
    let status = tokio::time::timeout(Duration::from_secs(10), h2_get(&send))
        .await
        .map_err(|_| "timed out".to_owned())??;
    match status {
        200 => Ok((send, conn)),
        status => Err(format!("answered {status}")),
    }
}

/// The status of a `GET /api/x` on an h2 connection.
async fn h2_get(send: &h2::client::SendRequest<bytes::Bytes>) -> Result<u16, String> {
    let req = http::Request::get("https://app/api/x").body(()).unwrap();
    let mut send = send.clone().ready().await.map_err(|e| format!("{e:?}"))?;
    let (answer, _) = send.send_request(req, true).map_err(|e| format!("{e:?}"))?;
    let answer = answer.await.map_err(|e| format!("{e:?}"))?;
    Ok(answer.status().as_u16())
}

/// An h2 connection holds far more of the inbound than an HTTP/1.1 one (a connection window of
/// request data ahead of the app, answers buffered on every stream): a peer holds at most
/// `--max-h2-connections-per-peer` of them, however it asks for h2 (ALPN `h2`, no ALPN, or the
/// preface after agreeing to `http/1.1`). Past them its new h2 connection is told to go away and
/// counted, while its HTTP/1.1 connections are served, other peers' h2 ones too, and a closed h2
/// connection gives its place back.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_peer_holds_at_most_its_h2_connections() {
    const MAX_H2: usize = 2;
    const OTHER: &str = "spiffe://cluster.local/ns/shop/sa/other";
    const H2: &[&[u8]] = &[b"h2"];
    const NO_ALPN: &[&[u8]] = &[];
    const HTTP1: &[&[u8]] = &[b"http/1.1"];
    let pki = TestPki::new();
    let server_cert = pki.workload(SERVER);
    let sidecar = TestSidecar::start(
        &pki,
        &server_cert,
        SERVER,
        SidecarSpec {
            inbound: vec![("127.0.0.5", http_echo().await, Protocol::Http)],
            policy: Some(format!(
                "mode: enforce\ninbound:\n  - port: {{port0}}\n    protocol: http\n    allow:\n      \
                 - id: {CLIENT}\n        paths: [/api/*]\n      - id: {OTHER}\n        paths: [/api/*]\n"
            )),
            limits: Some(Limits {
                max_h2_connections_per_peer: MAX_H2,
                ..Limits::default()
            }),
            ..Default::default()
        },
    )
    .await;
    let (client, other) = (pki.workload(CLIENT), pki.workload(OTHER));
    let mut held = Vec::new();
    for alpn in [H2, NO_ALPN] {
        held.push(
            h2_connection(&sidecar, &pki, &client, alpn)
                .await
                .expect("an h2 connection within the cap"),
        );
    }
    // Past the cap, every way of asking for h2 is refused with a GOAWAY.
    for alpn in [H2, NO_ALPN, HTTP1] {
        let refused = h2_connection(&sidecar, &pki, &client, alpn)
            .await
            .map(drop)
            .unwrap_err();
        assert!(
            refused.contains("GoAway")
                && refused.contains("ENHANCE_YOUR_CALM")
                && refused.contains("--max-h2-connections-per-peer"),
            "{alpn:?}: {refused}"
        );
    }
    let metrics = sidecar.metrics().await;
    assert_eq!(
        metric(
            &metrics,
            "meshid_sidecar_connections_refused_total{",
            &[r#"reason="max_h2_connections_per_peer""#]
        ),
        3,
        "{metrics}"
    );
    // The same peer's HTTP/1.1 connections are served, and so is another peer's h2.
    for _ in 0..3 {
        let config = client_config(
            &pki.roots(),
            &pki.trust_domain,
            Some(&client),
            &sidecar.id,
            HTTP1,
        );
        let tls = mtls_connect(sidecar.inbound[0], config).await.unwrap();
        let (status, _, body) = http_request(tls, false, get("/api/x", &[])).await.unwrap();
        assert_eq!(status, 200, "{body}");
    }
    let other_h2 = h2_connection(&sidecar, &pki, &other, H2).await;
    assert!(other_h2.is_ok(), "another peer's h2: {:?}", other_h2.err());
    // The held connections still work; closing one gives its place back.
    for (send, _) in &held {
        assert_eq!(h2_get(send).await, Ok(200));
    }
    let (send, conn) = held.remove(0);
    drop(send);
    conn.await.unwrap();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
    let _again = loop {
        match h2_connection(&sidecar, &pki, &client, H2).await {
            Ok(again) => break again,
            Err(_) if tokio::time::Instant::now() < deadline => {
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            Err(e) => panic!("the peer's closed h2 connection did not give its place back: {e}"),
        }
    };
    let refused = h2_connection(&sidecar, &pki, &client, H2)
        .await
        .map(drop)
        .unwrap_err();
    assert!(refused.contains("GoAway"), "at the cap again: {refused}");
}
