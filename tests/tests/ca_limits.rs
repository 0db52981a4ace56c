//! The CA listener's limits over real sockets: connections per source IP, the idle timeout, the
//! maximum connection age; and service-account tokens with a `crit` header member. Limits are short
//! here; the tests assert what happens, never how fast.

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use hyper_util::rt::TokioIo;
use meshid_proto::ca::v1::certificate_authority_client::CertificateAuthorityClient;
use meshid_proto::ca::v1::{
    GetTrustBundleRequest, IssueJwtSvidRequest, IssueRequest, IssueResponse,
    WatchTrustBundleRequest, issue_request::Credential,
};
use meshid_tests::ca::{CaOptions, TestCa};
use meshid_tests::pki::{ForeignCa, WorkloadKey, pem};
use rustls_pki_types::{CertificateDer, PrivateKeyDer, ServerName};
use serde_json::json;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpSocket, TcpStream};
use tokio_rustls::client::TlsStream;
use tonic::Code;
use tonic::transport::{Channel, Endpoint, Uri};

const FRONTEND: &str = "spiffe://cluster.local/ns/shop/sa/frontend";
const HERE: IpAddr = IpAddr::V4(Ipv4Addr::new(127, 0, 0, 1));
const ELSEWHERE: IpAddr = IpAddr::V4(Ipv4Addr::new(127, 0, 0, 2));

type Client = CertificateAuthorityClient<Channel>;
type ClientCert = (Vec<CertificateDer<'static>>, PrivateKeyDer<'static>);

/// TLS 1.3, h2, trusting the CA's roots, optionally presenting a certificate.
fn tls_connector(ca: &TestCa, client_cert: Option<ClientCert>) -> tokio_rustls::TlsConnector {
    let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
    let mut roots = rustls::RootCertStore::empty();
    for root in &ca.roots {
        roots.add(root.clone()).unwrap();
    }
    let builder = rustls::ClientConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13])
        .unwrap()
        .with_root_certificates(roots);
    let mut config = match client_cert {
        Some((chain, key)) => builder.with_client_auth_cert(chain, key).unwrap(),
        None => builder.with_no_client_auth(),
    };
    config.alpn_protocols = vec![b"h2".to_vec()];
    tokio_rustls::TlsConnector::from(Arc::new(config))
}

/// A TCP connection to `addr` from the local address `from`.
async fn tcp_from(from: IpAddr, addr: SocketAddr) -> std::io::Result<TcpStream> {
    let socket = TcpSocket::new_v4()?;
    socket.bind(SocketAddr::new(from, 0))?;
    socket.connect(addr).await
}

/// A TLS connection to the CA from `from`, handshake done, nothing sent over it.
async fn tls_from(
    ca: &TestCa,
    connector: &tokio_rustls::TlsConnector,
    from: IpAddr,
) -> std::io::Result<TlsStream<TcpStream>> {
    let tcp = tcp_from(from, ca.addr).await?;
    let name = ServerName::try_from("localhost").unwrap();
    let tls = connector.connect(name, tcp).await?;
    Ok(tls)
}

/// A gRPC client of the CA whose connections come from `from`; `opened` counts them (every
/// reconnect opens one more).
async fn client_from(
    ca: &TestCa,
    from: IpAddr,
    client_cert: Option<ClientCert>,
    opened: Arc<AtomicUsize>,
) -> Result<Client, tonic::transport::Error> {
    channel_from(ca, from, client_cert, opened)
        .await
        .map(CertificateAuthorityClient::new)
}

/// The channel of [`client_from`]: one connection at a time, for any gRPC service of the CA.
async fn channel_from(
    ca: &TestCa,
    from: IpAddr,
    client_cert: Option<ClientCert>,
    opened: Arc<AtomicUsize>,
) -> Result<Channel, tonic::transport::Error> {
    let connector = tls_connector(ca, client_cert);
    let addr = ca.addr;
    let channel = Endpoint::from_static("http://meshid-ca")
        .connect_timeout(Duration::from_secs(5))
        .connect_with_connector(tower::service_fn(move |_: Uri| {
            let connector = connector.clone();
            let opened = opened.clone();
            async move {
                let tcp = tcp_from(from, addr).await?;
                let name = ServerName::try_from("localhost").unwrap();
                let tls = connector.connect(name, tcp).await?;
                opened.fetch_add(1, Ordering::SeqCst);
                Ok::<_, std::io::Error>(TokioIo::new(tls))
            }
        }))
        .await?;
    Ok(channel)
}

/// Waits (up to 10 s) until the server ends `tls`: end-of-file or an error on read.
async fn closed_by_server(tls: &mut TlsStream<TcpStream>) -> bool {
    let mut buf = [0u8; 256];
    tokio::time::timeout(Duration::from_secs(10), async {
        loop {
            match tls.read(&mut buf).await {
                Ok(0) | Err(_) => return,
                Ok(_) => {} // h2 SETTINGS, pings: not a close
            }
        }
    })
    .await
    .is_ok()
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

/// Polls `check` until it holds (up to 10 s).
async fn eventually<F, Fut>(what: &str, mut check: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let deadline = Instant::now() + Duration::from_secs(10);
    while !check().await {
        assert!(Instant::now() < deadline, "never happened: {what}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// A certificate of `sa` from `ca` (by its service-account token), with its key.
async fn certificate(ca: &TestCa, sa: &str) -> ClientCert {
    let key = WorkloadKey::new();
    let resp = ca
        .client()
        .await
        .issue(IssueRequest {
            csr: key.csr.clone(),
            credential: Some(Credential::ServiceAccountToken(
                ca.cluster.token("shop", sa),
            )),
            ttl_seconds: 0,
            app_svid: false,
        })
        .await
        .unwrap()
        .into_inner();
    let chain = resp
        .cert_chain
        .into_iter()
        .map(CertificateDer::from)
        .collect();
    (chain, key.private_key_der())
}

/// At `--max-connections`, connections that have made no call (silent TCP, or a finished TLS
/// handshake and nothing after it) from many sources cannot keep a client out: each newcomer
/// displaces the oldest of them from the busiest source. Only when every connection is proven (a
/// call the CA served for its client certificate: here a renewal) is a newcomer refused.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn silent_connections_at_the_cap_make_room_for_a_client() {
    const MAX: usize = 6;
    let ca = TestCa::start(CaOptions {
        max_connections: MAX,
        handshake_timeout: Duration::from_secs(30),
        idle_timeout: Duration::from_secs(60),
        ..CaOptions::default()
    })
    .await;
    let connector = tls_connector(&ca, None);
    // Twice the cap, from four sources: half silent TCP, half silent after their TLS handshake.
    let mut flood_tcp = Vec::new();
    let mut flood_tls = Vec::new();
    for i in 0..MAX {
        let from = IpAddr::V4(Ipv4Addr::new(127, 0, 0, 20 + (i % 4) as u8));
        flood_tcp.push(tcp_from(from, ca.addr).await.unwrap());
        if let Ok(tls) = tls_from(&ca, &connector, from).await {
            flood_tls.push(tls);
        }
    }
    let displaced = r#"meshid_ca_connections_refused_total{reason="displaced"}"#;
    let full = r#"meshid_ca_connections_refused_total{reason="max_connections"}"#;
    eventually("silent connections displaced at the cap", || {
        let ca = &ca;
        async move { sample(&metrics(ca).await, displaced) >= MAX as f64 }
    })
    .await;
    // A client from its own address is served while the flood is held, every time.
    let cert = certificate(&ca, "frontend").await;
    let mut clients = Vec::new();
    for i in 0..MAX {
        let opened = Arc::new(AtomicUsize::new(0));
        let mut client = client_from(
            &ca,
            ELSEWHERE,
            Some((cert.0.clone(), cert.1.clone_key())),
            opened,
        )
        .await
        .unwrap();
        let bundle = client
            .get_trust_bundle(GetTrustBundleRequest {})
            .await
            .expect("a client is served while silent connections fill the cap")
            .into_inner();
        assert_eq!(bundle.roots, vec![ca.roots[0].to_vec()]);
        // Its connection renewed its certificate: it is never displaced, and it keeps its slot.
        renew(&mut client).await.expect("a renewal at the cap");
        clients.push(client);
        if i + 1 < MAX {
            flood_tcp.push(tcp_from(HERE, ca.addr).await.unwrap());
        }
    }
    assert_eq!(
        sample(&metrics(&ca).await, full),
        0.0,
        "a newcomer was refused while silent connections held slots"
    );
    // The last client took the last slot from a silent connection: every slot is now held by a
    // proven connection, so the next one is refused, and the clients are still served.
    let refused = tls_from(&ca, &connector, HERE).await;
    assert!(refused.is_err(), "a connection past the cap was served");
    eventually("the newcomer refused at the cap", || {
        let ca = &ca;
        async move { sample(&metrics(ca).await, full) >= 1.0 }
    })
    .await;
    for client in &mut clients {
        client
            .get_trust_bundle(GetTrustBundleRequest {})
            .await
            .expect("a client that made a call keeps its connection");
    }
    drop((flood_tcp, flood_tls));
}

/// Anonymous clients that make calls (the bundle, then a health `Watch` stream held open, which
/// keeps their connections from idling) from many addresses do not hold the CA's slots against
/// sidecars: a connection without a client certificate is never proven by its calls, so at the
/// cap a sidecar's connection displaces one of theirs instead of being refused, and its bundle
/// stream registers.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn anonymous_callers_at_the_cap_make_room_for_a_sidecar() {
    use tonic_health::pb::HealthCheckRequest;
    use tonic_health::pb::health_client::HealthClient;

    const MAX: usize = 6;
    let ca = TestCa::start(CaOptions {
        max_connections: MAX,
        idle_timeout: Duration::from_secs(60),
        ..CaOptions::default()
    })
    .await;
    let cert = certificate(&ca, "frontend").await;
    let mut held = Vec::new();
    for i in 0..MAX {
        let from = IpAddr::V4(Ipv4Addr::new(127, 0, 0, 30 + i as u8));
        let opened = Arc::new(AtomicUsize::new(0));
        let channel = channel_from(&ca, from, None, opened).await.unwrap();
        let mut client = CertificateAuthorityClient::new(channel.clone());
        client
            .get_trust_bundle(GetTrustBundleRequest {})
            .await
            .expect("an anonymous call below the cap is served");
        // On the same connection: a health Watch stream, held.
        let mut health = HealthClient::new(channel);
        let watch = health
            .watch(HealthCheckRequest {
                service: String::new(),
            })
            .await
            .expect("a health stream below the cap")
            .into_inner();
        held.push((client, watch));
    }
    // A sidecar arrives at the cap: served, its stream registered.
    let _sidecar = served_at_the_cap(&ca, cert, "anonymous connection").await;
    let report = meshid_ca::rotation::status(ca.dir.path(), &[ca.admin_addr])
        .await
        .unwrap();
    assert_eq!(report.sidecars.len(), 1, "{:?}", report.sidecars);
    drop(held);
}

/// An app SVID of `ca` (the sidecar's certificate `cert` asks for it), with its key.
async fn app_svid(ca: &TestCa, cert: ClientCert) -> ClientCert {
    let opened = Arc::new(AtomicUsize::new(0));
    let mut sidecar = client_from(ca, HERE, Some(cert), opened).await.unwrap();
    let key = WorkloadKey::new();
    let resp = sidecar
        .issue(IssueRequest {
            csr: key.csr.clone(),
            credential: None,
            ttl_seconds: 0,
            app_svid: true,
        })
        .await
        .expect("an app SVID")
        .into_inner();
    let chain = resp
        .cert_chain
        .into_iter()
        .map(CertificateDer::from)
        .collect();
    (chain, key.private_key_der())
}

/// Revokes the identity `id` in `ca`'s directory and waits until the CA serves the revocation.
async fn revoke(ca: &TestCa, id: &str) {
    let mut list = meshid_ca::revocations::Revocations::default();
    list.revoke(
        meshid_identity::revocation::Revoked::Id(meshid_identity::SpiffeId::parse(id).unwrap()),
        meshid_runtime::time::unix_now(),
        3600,
        "test".into(),
    )
    .unwrap();
    list.save(ca.dir.path()).unwrap();
    eventually("the CA serves the revocation", || async {
        let bundle = ca.served_bundle().await;
        bundle.revoked.iter().any(|r| r.spiffe_id == id)
    })
    .await;
}

/// Connections presenting a certificate the CA no longer takes as a credential (a revoked one, an
/// app SVID), each with calls the CA refused (and, on an app SVID, a token's first certificate),
/// and connections of a valid certificate that made
/// only calls anyone may make (the bundle, a health check), from many addresses, do not hold the
/// CA's slots against sidecars: none is proven, so at the cap each arriving sidecar displaces one
/// of them, as many sidecars as there are slots.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn refused_and_anonymous_calls_over_a_certificate_hold_no_slot_against_sidecars() {
    use tonic_health::pb::HealthCheckRequest;
    use tonic_health::pb::health_client::HealthClient;

    const MAX: usize = 6;
    const LIAR: &str = "spiffe://cluster.local/ns/shop/sa/liar";
    let ca = TestCa::start(CaOptions {
        max_connections: MAX,
        idle_timeout: Duration::from_secs(60),
        ..CaOptions::default()
    })
    .await;
    // Every certificate is had before the cap is held (`certificate` calls on a connection of
    // its own, never proven).
    let revoked = certificate(&ca, "liar").await;
    let valid = certificate(&ca, "frontend").await;
    let app = app_svid(&ca, (valid.0.clone(), valid.1.clone_key())).await;
    let sidecar = certificate(&ca, "backend").await;
    revoke(&ca, LIAR).await;

    let mut held = Vec::new();
    for i in 0..MAX {
        let from = IpAddr::V4(Ipv4Addr::new(127, 0, 0, 50 + i as u8));
        let cert = match i % 3 {
            0 => &revoked,
            1 => &app,
            _ => &valid,
        };
        let opened = Arc::new(AtomicUsize::new(0));
        let channel = channel_from(
            &ca,
            from,
            Some((cert.0.clone(), cert.1.clone_key())),
            opened,
        )
        .await
        .unwrap();
        let mut client = CertificateAuthorityClient::new(channel.clone());
        match i % 3 {
            0 => {
                let refused = renew(&mut client).await.expect_err("a revoked renewal");
                assert_eq!(refused.code(), Code::PermissionDenied, "{refused:?}");
                let refused = client
                    .watch_trust_bundle(WatchTrustBundleRequest::default())
                    .await
                    .expect_err("a revoked bundle stream");
                assert_eq!(refused.code(), Code::PermissionDenied, "{refused:?}");
            }
            1 => {
                renew(&mut client)
                    .await
                    .expect_err("a renewal on an app SVID");
                client
                    .issue_jwt_svid(IssueJwtSvidRequest {
                        audience: vec!["db".into()],
                    })
                    .await
                    .expect_err("a JWT-SVID on an app SVID");
                // A first certificate by a token is served, on a connection whose certificate is
                // no credential at the CA: it proves nothing either.
                client
                    .issue(IssueRequest {
                        csr: WorkloadKey::new().csr,
                        credential: Some(Credential::ServiceAccountToken(
                            ca.cluster.token("shop", "frontend"),
                        )),
                        ttl_seconds: 0,
                        app_svid: false,
                    })
                    .await
                    .expect("a token's certificate");
            }
            _ => {
                client
                    .get_trust_bundle(GetTrustBundleRequest {})
                    .await
                    .expect("the bundle");
                HealthClient::new(channel)
                    .check(HealthCheckRequest {
                        service: String::new(),
                    })
                    .await
                    .expect("a health check");
            }
        }
        held.push(client);
    }
    let full = r#"meshid_ca_connections_refused_total{reason="max_connections"}"#;
    let displaced = r#"meshid_ca_connections_refused_total{reason="displaced"}"#;
    let before = sample(&metrics(&ca).await, displaced);

    // As many sidecars as there are slots arrive, one after another: each is served and renews.
    let mut sidecars = Vec::new();
    for i in 0..MAX {
        let opened = Arc::new(AtomicUsize::new(0));
        let cert = (sidecar.0.clone(), sidecar.1.clone_key());
        let mut client = client_from(&ca, ELSEWHERE, Some(cert), opened)
            .await
            .unwrap_or_else(|e| panic!("sidecar {i} refused at the cap: {e:?}"));
        renew(&mut client)
            .await
            .unwrap_or_else(|e| panic!("sidecar {i} not served at the cap: {e:?}"));
        sidecars.push(client);
    }
    let m = metrics(&ca).await;
    assert_eq!(sample(&m, full), 0.0, "a sidecar was refused: {m}");
    assert!(
        sample(&m, displaced) >= before + MAX as f64,
        "not every held connection displaced: {m}"
    );
    drop(held);
}

/// One certificate lineage (a certificate and its renewal, two keys) cannot hold every slot of
/// the CA with connections that each made a call the CA served (a renewal): past
/// `MAX_PROVEN_CONNECTIONS_PER_LINEAGE` its connections stay displaceable, and a sidecar of
/// another lineage arriving at the cap is served.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_certificate_lineage_cannot_hold_the_cap_with_served_calls() {
    let per_lineage = meshid_ca::tls::MAX_PROVEN_CONNECTIONS_PER_LINEAGE;
    let max = per_lineage + 4;
    let ca = TestCa::start(CaOptions {
        max_connections: max,
        idle_timeout: Duration::from_secs(60),
        // Every renewal below is served, none rate limited.
        rate_limit: meshid_ca::ratelimit::RateLimit {
            per_second: 1000.0,
            burst: 10_000,
        },
        ..CaOptions::default()
    })
    .await;
    let sidecar = certificate(&ca, "backend").await;
    let first = certificate(&ca, "frontend").await;
    let mut held = Vec::new();
    let opened = Arc::new(AtomicUsize::new(0));
    let from = IpAddr::V4(Ipv4Addr::new(127, 0, 0, 70));
    let mut client = client_from(
        &ca,
        from,
        Some((first.0.clone(), first.1.clone_key())),
        opened,
    )
    .await
    .unwrap();
    // Its renewal: the same lineage, another key.
    let key = WorkloadKey::new();
    let renewed = client
        .issue(IssueRequest {
            csr: key.csr.clone(),
            credential: None,
            ttl_seconds: 0,
            app_svid: false,
        })
        .await
        .unwrap()
        .into_inner();
    let second: ClientCert = (
        renewed
            .cert_chain
            .into_iter()
            .map(CertificateDer::from)
            .collect(),
        key.private_key_der(),
    );
    held.push(client);
    for i in 1..max {
        let from = IpAddr::V4(Ipv4Addr::new(127, 0, 0, 70 + (i % 4) as u8));
        let cert = if i % 2 == 0 { &first } else { &second };
        let opened = Arc::new(AtomicUsize::new(0));
        let mut client = client_from(
            &ca,
            from,
            Some((cert.0.clone(), cert.1.clone_key())),
            opened,
        )
        .await
        .unwrap_or_else(|e| panic!("connection {i} below the cap: {e:?}"));
        let issued = renew(&mut client)
            .await
            .unwrap_or_else(|e| panic!("renewal {i}: {e:?}"));
        assert_eq!(issued.into_inner().spiffe_id, FRONTEND);
        held.push(client);
    }
    // A sidecar of another lineage arrives at the cap: served, its stream registered.
    let _sidecar = served_at_the_cap(&ca, sidecar, "connection of the lineage").await;
    drop(held);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connections_past_the_per_source_cap_are_refused_and_other_sources_still_served() {
    let ca = TestCa::start(CaOptions {
        max_connections_per_source: 2,
        handshake_timeout: Duration::from_secs(1),
        ..CaOptions::default()
    })
    .await;
    let connector = tls_connector(&ca, None);
    let first = tls_from(&ca, &connector, HERE).await.expect("first");
    let second = tls_from(&ca, &connector, HERE).await.expect("second");
    // The third from 127.0.0.1 is closed before any TLS: the handshake fails.
    let third = tls_from(&ca, &connector, HERE).await;
    assert!(
        third.is_err(),
        "a third connection from 127.0.0.1 was served"
    );
    let refused = r#"meshid_ca_connections_refused_total{reason="max_connections_per_source"}"#;
    assert!(sample(&metrics(&ca).await, refused) >= 1.0);

    // Another source is not affected: 127.0.0.2 completes a call on the same CA.
    let opened = Arc::new(AtomicUsize::new(0));
    let mut elsewhere = client_from(&ca, ELSEWHERE, None, opened).await.unwrap();
    let bundle = elsewhere
        .get_trust_bundle(GetTrustBundleRequest {})
        .await
        .expect("127.0.0.2 is served")
        .into_inner();
    assert_eq!(bundle.roots, vec![ca.roots[0].to_vec()]);

    // The count drops when a connection ends: with one of the two gone, 127.0.0.1 connects again.
    drop(first);
    let deadline = Instant::now() + Duration::from_secs(10);
    let replacement = loop {
        match tls_from(&ca, &connector, HERE).await {
            Ok(tls) => break tls,
            Err(e) => assert!(Instant::now() < deadline, "no slot freed: {e}"),
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    drop(replacement);
    drop(second);
    // Only the connection from 127.0.0.2 is left.
    eventually("the connections from 127.0.0.1 closed", || {
        let ca = &ca;
        async move { sample(&metrics(ca).await, "meshid_ca_connections_open") == 1.0 }
    })
    .await;

    // Failed and timed-out handshakes give their slot back too: one at a time (so the cap never
    // refuses them), each ended by the server.
    let protocol = "meshid_ca_tls_handshake_failures_total{reason=\"protocol\"}";
    let timeout = "meshid_ca_tls_handshake_failures_total{reason=\"timeout\"}";
    let before = metrics(&ca).await;
    let (protocol_before, timeout_before) = (sample(&before, protocol), sample(&before, timeout));
    for _ in 0..4 {
        let mut tcp = tcp_from(HERE, ca.addr).await.unwrap();
        tcp.write_all(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
            .await
            .unwrap();
        let mut buf = [0u8; 64];
        let read = tokio::time::timeout(Duration::from_secs(10), tcp.read(&mut buf)).await;
        assert!(read.is_ok(), "the server keeps a failed handshake open");
    }
    let mut stalled = tcp_from(HERE, ca.addr).await.unwrap();
    stalled.write_all(&[0x16, 0x03, 0x01]).await.unwrap();
    let mut buf = [0u8; 16];
    let read = tokio::time::timeout(Duration::from_secs(10), stalled.read(&mut buf)).await;
    assert!(
        matches!(read, Ok(Ok(0) | Err(_))),
        "stalled handshake: {read:?}"
    );
    eventually(
        "five handshake failures counted by reason (4 protocol, 1 timeout)",
        || {
            let ca = &ca;
            async move {
                let now = metrics(ca).await;
                sample(&now, protocol) == protocol_before + 4.0
                    && sample(&now, timeout) == timeout_before + 1.0
            }
        },
    )
    .await;

    // Nothing leaked: two connections from 127.0.0.1 at once again, and a call from there.
    let deadline = Instant::now() + Duration::from_secs(10);
    let (_a, _b) = loop {
        let a = tls_from(&ca, &connector, HERE).await;
        let b = tls_from(&ca, &connector, HERE).await;
        match (a, b) {
            (Ok(a), Ok(b)) => break (a, b),
            other => assert!(Instant::now() < deadline, "slots leaked: {other:?}"),
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    drop((_a, _b));
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let opened = Arc::new(AtomicUsize::new(0));
        let call = match client_from(&ca, HERE, None, opened).await {
            Ok(mut here) => here
                .get_trust_bundle(GetTrustBundleRequest {})
                .await
                .is_ok(),
            Err(_) => false,
        };
        if call {
            break;
        }
        assert!(Instant::now() < deadline, "no call from 127.0.0.1");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// A client from HERE with a bundle stream open, and the bundle it got at once.
struct Watching {
    client: Client,
    stream: tonic::Streaming<meshid_proto::ca::v1::TrustBundle>,
    /// The connections it opened (every reconnect one more).
    opened: Arc<AtomicUsize>,
    first: meshid_proto::ca::v1::TrustBundle,
}

async fn watching(ca: &TestCa) -> Watching {
    let opened = Arc::new(AtomicUsize::new(0));
    let mut client = client_from(ca, HERE, None, opened.clone()).await.unwrap();
    let mut stream = client
        .watch_trust_bundle(WatchTrustBundleRequest::default())
        .await
        .unwrap()
        .into_inner();
    let first = stream.message().await.unwrap().expect("the bundle at once");
    Watching {
        client,
        stream,
        opened,
        first,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idle_connections_are_closed_but_not_those_with_an_open_bundle_stream() {
    let idle = Duration::from_secs(1);
    let ca = TestCa::start(CaOptions {
        idle_timeout: idle,
        ..CaOptions::default()
    })
    .await;
    // A TLS connection that never makes a call.
    let connector = tls_connector(&ca, None);
    let mut silent = tls_from(&ca, &connector, HERE).await.unwrap();
    // A client that makes one call, then nothing.
    let unary_opened = Arc::new(AtomicUsize::new(0));
    let mut unary = client_from(&ca, HERE, None, unary_opened.clone())
        .await
        .unwrap();
    unary
        .get_trust_bundle(GetTrustBundleRequest {})
        .await
        .unwrap();
    // A client with a bundle stream open.
    let Watching {
        client: _watcher,
        mut stream,
        opened: stream_opened,
        first,
    } = watching(&ca).await;

    assert!(
        closed_by_server(&mut silent).await,
        "a connection without calls stayed open past the idle timeout"
    );
    let closed = r#"meshid_ca_connections_closed_total{reason="idle_timeout"}"#;
    eventually(
        "both idle connections closed, the streaming one open",
        || {
            let ca = &ca;
            async move {
                let m = metrics(ca).await;
                sample(&m, closed) == 2.0 && sample(&m, "meshid_ca_connections_open") == 1.0
            }
        },
    )
    .await;

    // Several idle periods later the stream is still open (nothing ended it)...
    tokio::time::sleep(idle * 3).await;
    let quiet = tokio::time::timeout(Duration::from_millis(200), stream.message()).await;
    assert!(quiet.is_err(), "the bundle stream ended: {quiet:?}");
    // ...and still delivers: a root joins the bundle and arrives on the same stream.
    let path = ca.dir.path().join("bundle.pem");
    let mut text = std::fs::read_to_string(&path).unwrap();
    text.push_str(&pem(&ForeignCa::new().root_der));
    std::fs::write(ca.dir.path().join("bundle.tmp"), text).unwrap();
    std::fs::rename(ca.dir.path().join("bundle.tmp"), &path).unwrap();
    let second = tokio::time::timeout(Duration::from_secs(10), stream.message())
        .await
        .expect("bundle change within 10 s")
        .expect("stream open")
        .expect("a message");
    assert_eq!(second.version, first.version + 1);
    assert_eq!(stream_opened.load(Ordering::SeqCst), 1);
    let m = metrics(&ca).await;
    assert_eq!(sample(&m, closed), 2.0, "{m}");

    // The client whose connection was closed for idleness just reconnects for its next call.
    unary
        .get_trust_bundle(GetTrustBundleRequest {})
        .await
        .expect("a call after the idle close");
    assert_eq!(unary_opened.load(Ordering::SeqCst), 2, "one reconnect");
}

/// A client that stops taking its responses (its h2 window left at zero) cannot keep a unary
/// call, and the message the CA encoded for it, in flight until the connection's maximum age: the
/// connection is closed once the call is older than `--call-timeout`. A bundle stream open as long
/// on another connection is not a call that timed out.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_call_whose_response_is_not_taken_ends_its_connection() {
    let call_timeout = Duration::from_secs(1);
    let ca = TestCa::start(CaOptions {
        call_timeout,
        ..CaOptions::default()
    })
    .await;
    let Watching {
        client: mut watcher,
        mut stream,
        opened: watcher_opened,
        ..
    } = watching(&ca).await;

    let tls = tls_from(&ca, &tls_connector(&ca, None), HERE)
        .await
        .unwrap();
    let (h2, connection) = h2::client::Builder::new()
        .initial_window_size(0)
        .handshake(tls)
        .await
        .unwrap();
    let connection = tokio::spawn(connection);
    let mut h2 = h2.ready().await.unwrap();
    let (response, mut body) = h2.send_request(raw_request(Some(5)), false).unwrap();
    // The whole message: an empty GetTrustBundleRequest.
    body.send_data(bytes::Bytes::from_static(&[0; 5]), true)
        .unwrap();
    let started = Instant::now();
    let response = response
        .await
        .expect("the response head, which needs no window");
    assert_eq!(response.status(), http::StatusCode::OK);
    let ended = tokio::time::timeout(Duration::from_secs(10), connection).await;
    assert!(
        ended.is_ok(),
        "the connection of a call whose response was never taken is still open 10 s later"
    );
    assert!(
        started.elapsed() >= call_timeout,
        "closed before the call timed out"
    );
    let closed = r#"meshid_ca_connections_closed_total{reason="call_timeout"}"#;
    eventually("the close counted", || {
        let ca = &ca;
        async move { sample(&metrics(ca).await, closed) == 1.0 }
    })
    .await;

    // The bundle stream, open all along, is still open and was never counted.
    tokio::time::sleep(call_timeout * 2).await;
    let quiet = tokio::time::timeout(Duration::from_millis(200), stream.message()).await;
    assert!(quiet.is_err(), "the bundle stream ended: {quiet:?}");
    assert_eq!(watcher_opened.load(Ordering::SeqCst), 1);
    let m = metrics(&ca).await;
    assert_eq!(sample(&m, closed), 1.0, "{m}");
    // A unary call on the watcher's connection, answered and taken, closes nothing either.
    watcher
        .get_trust_bundle(GetTrustBundleRequest {})
        .await
        .unwrap();
    tokio::time::sleep(call_timeout * 3).await;
    let m = metrics(&ca).await;
    assert_eq!(sample(&m, closed), 1.0, "{m}");
    assert_eq!(watcher_opened.load(Ordering::SeqCst), 1);
}

/// A health request that says it is 4 MiB long is refused as soon as its length arrives (the
/// health service takes 1 KiB): before, tonic's default let each such call reserve 4 MiB for up
/// to its 30 s, past what `max_arriving_requests` bounds.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_health_request_longer_than_a_name_is_refused_at_once() {
    let ca = TestCa::start(CaOptions::default()).await;
    let tls = tls_from(&ca, &tls_connector(&ca, None), HERE)
        .await
        .unwrap();
    let (h2, connection) = h2::client::handshake(tls).await.unwrap();
    tokio::spawn(connection);
    let request = http::Request::post("https://localhost/grpc.health.v1.Health/Check")
        .header("content-type", "application/grpc")
        .header("te", "trailers")
        .body(())
        .unwrap();
    let (response, mut body) = h2
        .ready()
        .await
        .unwrap()
        .send_request(request, false)
        .unwrap();
    // A message of 4 MiB announced, and its first bytes: the rest never comes.
    body.send_data(
        bytes::Bytes::from_static(&[0, 0, 0x40, 0, 0, 1, 2, 3]),
        false,
    )
    .unwrap();
    let response = tokio::time::timeout(Duration::from_secs(5), response)
        .await
        .expect("no answer within 5 s: the CA waits for the 4 MiB")
        .unwrap();
    let status = match response.headers().get("grpc-status") {
        Some(s) => s.clone(),
        None => {
            let mut body = response.into_body();
            while body.data().await.is_some() {}
            body.trailers().await.unwrap().unwrap()["grpc-status"].clone()
        }
    };
    assert_eq!(status, (Code::OutOfRange as i32).to_string().as_str());
}

/// A client that sends PINGs and reads nothing is closed at its idle timeout. h2 takes no next
/// frame while a PONG waits to be written, so once the CA's writes are stuck the connection never
/// waits on a read, where the limits used to be looked at: such a connection outlived its idle
/// timeout, its maximum age and its certificate (a proven one is never displaced).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_that_sends_pings_and_reads_nothing_is_closed_at_its_idle_timeout() {
    let idle = Duration::from_secs(2);
    let ca = TestCa::start(CaOptions {
        idle_timeout: idle,
        ..CaOptions::default()
    })
    .await;
    let tls = tls_from(&ca, &tls_connector(&ca, None), HERE)
        .await
        .unwrap();
    let (_unread, mut write) = tokio::io::split(tls);
    let started = Instant::now();
    let writer = tokio::spawn(async move {
        // The preface, an empty SETTINGS frame, then PINGs for as long as the CA takes them.
        let mut frames = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n".to_vec();
        frames.extend([0, 0, 0, 0x4, 0, 0, 0, 0, 0]);
        write.write_all(&frames).await?;
        let ping = [0, 0, 8, 0x6, 0, 0, 0, 0, 0, 1, 2, 3, 4, 5, 6, 7, 8];
        let burst: Vec<u8> = ping
            .iter()
            .copied()
            .cycle()
            .take(ping.len() * 1024)
            .collect();
        let mut sent = 0usize;
        loop {
            write.write_all(&burst).await?;
            sent += 1024;
            if sent > 10_000_000 {
                return Ok::<usize, std::io::Error>(sent);
            }
        }
    });
    let closed = r#"meshid_ca_connections_closed_total{reason="idle_timeout"}"#;
    eventually("the connection closed at its idle timeout", || {
        let ca = &ca;
        async move { sample(&metrics(ca).await, closed) >= 1.0 }
    })
    .await;
    assert!(started.elapsed() >= idle, "closed before its idle timeout");
    // Its writes then fail: the CA is gone from the other end.
    let ended = tokio::time::timeout(Duration::from_secs(10), writer)
        .await
        .expect("the client's writes still go somewhere 10 s after the close")
        .unwrap();
    assert!(ended.is_err(), "{ended:?}");
}

/// A sidecar presenting `cert` arrives from ELSEWHERE at a CA whose every slot is held: let in
/// and served (its bundle stream opens, it renews), nobody refused at the cap, and one held
/// connection (a `held`, for the message) displaced. Returns the sidecar and its open stream.
async fn served_at_the_cap(
    ca: &TestCa,
    cert: ClientCert,
    held: &str,
) -> (Client, tonic::Streaming<meshid_proto::ca::v1::TrustBundle>) {
    let full = r#"meshid_ca_connections_refused_total{reason="max_connections"}"#;
    let displaced = r#"meshid_ca_connections_refused_total{reason="displaced"}"#;
    let before = sample(&metrics(ca).await, displaced);
    let opened = Arc::new(AtomicUsize::new(0));
    let mut client = client_from(ca, ELSEWHERE, Some(cert), opened)
        .await
        .expect("a sidecar at the cap is let in");
    let mut stream = client
        .watch_trust_bundle(WatchTrustBundleRequest {
            instance_id: "pod".into(),
            file_mode: false,
        })
        .await
        .expect("a sidecar at the cap is served")
        .into_inner();
    assert!(stream.message().await.unwrap().is_some());
    renew(&mut client).await.expect("and renews");
    let m = metrics(ca).await;
    assert_eq!(sample(&m, full), 0.0, "the sidecar was refused: {m}");
    assert!(sample(&m, displaced) > before, "no {held} displaced: {m}");
    (client, stream)
}

/// A renewal over `client`'s connection (its certificate is the credential).
async fn renew(client: &mut Client) -> Result<tonic::Response<IssueResponse>, tonic::Status> {
    client
        .issue(IssueRequest {
            csr: WorkloadKey::new().csr,
            credential: None,
            ttl_seconds: 0,
            app_svid: false,
        })
        .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connections_past_the_maximum_age_are_closed_and_clients_reconnect() {
    let age = Duration::from_secs(2);
    let grace = Duration::from_secs(2);
    let ca = TestCa::start(CaOptions {
        max_connection_age: age,
        max_connection_age_grace: grace,
        ..CaOptions::default()
    })
    .await;
    // An mTLS client (a sidecar renewing) that keeps one connection.
    let workload = WorkloadKey::new();
    let issued = ca
        .client()
        .await
        .issue(IssueRequest {
            csr: workload.csr.clone(),
            credential: Some(Credential::ServiceAccountToken(
                ca.cluster.token("shop", "frontend"),
            )),
            ttl_seconds: 0,
            app_svid: false,
        })
        .await
        .unwrap()
        .into_inner();
    let chain: Vec<CertificateDer<'static>> = issued
        .cert_chain
        .into_iter()
        .map(CertificateDer::from)
        .collect();
    let opened = Arc::new(AtomicUsize::new(0));
    let started = Instant::now();
    let mut client = client_from(
        &ca,
        HERE,
        Some((chain, workload.private_key_der())),
        opened.clone(),
    )
    .await
    .unwrap();
    assert_eq!(
        renew(&mut client).await.unwrap().into_inner().spiffe_id,
        FRONTEND
    );
    let mut stream = client
        .watch_trust_bundle(WatchTrustBundleRequest::default())
        .await
        .unwrap()
        .into_inner();
    stream.message().await.unwrap().expect("the bundle at once");
    assert_eq!(opened.load(Ordering::SeqCst), 1);

    // Past the maximum age the server sends GOAWAY: the old connection takes no new call, and the
    // client moves to a new one. The stream keeps the old connection (and hyper's client task for
    // it) alive, so the client's first call after the GOAWAY is still queued there and cancelled;
    // the next goes over a new connection. (Without a stream the client just reconnects.)
    tokio::time::sleep((age + Duration::from_millis(500)).saturating_sub(started.elapsed())).await;
    let mut failed = Vec::new();
    let deadline = Instant::now() + Duration::from_secs(10);
    while opened.load(Ordering::SeqCst) < 2 {
        match renew(&mut client).await {
            Ok(r) => assert_eq!(r.into_inner().spiffe_id, FRONTEND),
            Err(s) => {
                assert!(
                    matches!(s.code(), Code::Cancelled | Code::Unavailable),
                    "{s:?}"
                );
                failed.push(s);
            }
        }
        assert!(Instant::now() < deadline, "the client never reconnected");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    eprintln!("calls failed on the way to a new connection: {failed:?}");
    assert!(failed.len() <= 1, "{failed:?}");
    let on_new = renew(&mut client).await;
    assert_eq!(
        on_new
            .expect("a call on the new connection")
            .into_inner()
            .spiffe_id,
        FRONTEND
    );
    assert_eq!(
        opened.load(Ordering::SeqCst),
        2,
        "the client reconnected once"
    );

    // The bundle stream on the old connection ends when the grace period is over and the
    // connection is cut: the client sees an error and opens a new stream.
    let ended = tokio::time::timeout(Duration::from_secs(10), async {
        loop {
            match stream.message().await {
                Ok(Some(_)) => continue,
                other => return other,
            }
        }
    })
    .await
    .expect("the stream on a connection past its age ended within 10 s");
    eprintln!("the stream on the aged connection ended with {ended:?}");
    let code = ended.expect_err("cut, not finished").code();
    assert!(
        matches!(
            code,
            Code::Unknown | Code::Unavailable | Code::Internal | Code::Cancelled
        ),
        "{code:?}"
    );
    assert!(started.elapsed() >= age + grace, "ended before age + grace");
    let m = metrics(&ca).await;
    assert!(
        sample(
            &m,
            r#"meshid_ca_connections_closed_total{reason="max_connection_age"}"#
        ) >= 1.0,
        "{m}"
    );
    // The client opens a new stream, as a sidecar does when its stream ends.
    let mut again = client
        .watch_trust_bundle(WatchTrustBundleRequest::default())
        .await
        .expect("a new stream")
        .into_inner();
    again.message().await.unwrap().expect("the bundle at once");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_token_with_a_crit_header_is_unauthenticated() {
    let ca = TestCa::start(CaOptions::default()).await;
    let mut spec = ca
        .cluster
        .spec("shop", "frontend", meshid_tests::fake_cluster::KeyKind::Rsa);
    let valid = ca.cluster.sign(&spec);
    spec.header["crit"] = json!(["exp"]);
    let crit = ca.cluster.sign(&spec);
    let issue = |token: String| {
        let ca = &ca;
        async move {
            ca.client()
                .await
                .issue(IssueRequest {
                    csr: WorkloadKey::new().csr,
                    credential: Some(Credential::ServiceAccountToken(token)),
                    ttl_seconds: 0,
                    app_svid: false,
                })
                .await
        }
    };
    let err = issue(crit).await.expect_err("a crit token was accepted");
    assert_eq!(err.code(), Code::Unauthenticated);
    assert!(err.message().contains("crit"), "{}", err.message());
    // The same token without `crit` is fine: `crit` alone was the reason.
    assert_eq!(issue(valid).await.unwrap().into_inner().spiffe_id, FRONTEND);
    let m = metrics(&ca).await;
    assert_eq!(
        sample(
            &m,
            r#"meshid_ca_issue_requests_total{method="service_account_token",result="crit_header"}"#
        ),
        1.0,
        "{m}"
    );
}

/// Health `Watch` streams never end by themselves and need no certificate: at most
/// `MAX_HEALTH_WATCHES` are open at once on a CA process, the next is `RESOURCE_EXHAUSTED`, and a
/// closed one gives its place back. `Check` is not bounded.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn health_watch_streams_are_bounded() {
    use tonic_health::pb::HealthCheckRequest;
    use tonic_health::pb::health_client::HealthClient;

    let max = meshid_ca::tls::MAX_HEALTH_WATCHES;
    let ca = TestCa::start(CaOptions::default()).await;
    let request = || HealthCheckRequest {
        service: String::new(),
    };
    // Enough connections for them all (each takes `MAX_STREAMS_PER_CONNECTION` streams at once),
    // from two sources, and one more to try past the bound on.
    let per_connection = meshid_ca::server::MAX_STREAMS_PER_CONNECTION as usize;
    let mut clients = Vec::new();
    for i in 0..=max.div_ceil(per_connection) {
        let from = if i % 2 == 0 { HERE } else { ELSEWHERE };
        let opened = Arc::new(AtomicUsize::new(0));
        clients.push(HealthClient::new(
            channel_from(&ca, from, None, opened).await.unwrap(),
        ));
    }
    let spare = clients.len() - 1;
    let mut held = Vec::new();
    for i in 0..max {
        let stream = clients[i / per_connection]
            .watch(request())
            .await
            .unwrap_or_else(|e| panic!("watch {i}: {e:?}"))
            .into_inner();
        held.push(stream);
    }
    let refused = clients[spare].watch(request()).await.unwrap_err();
    assert_eq!(refused.code(), Code::ResourceExhausted, "{refused:?}");
    assert!(refused.message().contains("health Watch"), "{refused:?}");
    clients[spare]
        .check(request())
        .await
        .expect("Check is still answered");
    // One closes: its place comes back.
    drop(held.pop());
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        match clients[spare].watch(request()).await {
            Ok(stream) => {
                held.push(stream.into_inner());
                break;
            }
            Err(status) if status.code() == Code::ResourceExhausted => {
                assert!(
                    Instant::now() < deadline,
                    "the closed stream's place never came back"
                );
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            Err(status) => panic!("{status:?}"),
        }
    }
}

/// A gRPC request head for the raw h2 clients below: `GetTrustBundle`, with the given
/// `content-length` when there is one.
fn raw_request(content_length: Option<usize>) -> http::Request<()> {
    let mut request =
        http::Request::post("https://localhost/meshid.ca.v1.CertificateAuthority/GetTrustBundle")
            .header("content-type", "application/grpc")
            .header("te", "trailers");
    if let Some(len) = content_length {
        request = request.header("content-length", len);
    }
    request.body(()).unwrap()
}

/// A connection whose streams h2 keeps resetting for the client's own protocol errors (here a
/// DATA frame longer than the request's `content-length`) is sent GOAWAY `ENHANCE_YOUR_CALM` once
/// the server has reset `MAX_LOCAL_ERROR_RESETS` of them ("MadeYouReset", CVE-2025-8671), instead
/// of resetting streams for as long as the client likes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_connection_that_keeps_provoking_stream_resets_is_sent_away() {
    let max = meshid_ca::server::MAX_LOCAL_ERROR_RESETS;
    let ca = TestCa::start(CaOptions::default()).await;
    let connector = tls_connector(&ca, None);
    let tls = tls_from(&ca, &connector, HERE).await.unwrap();
    let (mut h2, connection) = h2::client::handshake(tls).await.unwrap();
    let connection = tokio::spawn(connection);
    let mut reset = 0;
    // Well past the limit: without it every one of these is just another reset stream.
    for _ in 0..max + 256 {
        let Ok(ready) = h2.ready().await else { break };
        h2 = ready;
        let Ok((response, mut body)) = h2.send_request(raw_request(Some(1)), false) else {
            break;
        };
        if body
            .send_data(bytes::Bytes::from_static(b"\0\0"), true)
            .is_err()
        {
            break;
        }
        match response.await {
            Err(e) if e.reason() == Some(h2::Reason::PROTOCOL_ERROR) && e.is_reset() => reset += 1,
            // The connection ended: why is in its own result, below.
            Err(e) if e.is_go_away() || e.is_io() => break,
            other => panic!("a stream with too much DATA was not reset (after {reset}): {other:?}"),
        }
    }
    let ended = tokio::time::timeout(Duration::from_secs(10), connection)
        .await
        .unwrap_or_else(|_| panic!("the connection is still open after {reset} resets"))
        .unwrap();
    let error = ended.expect_err("the connection ended without an error");
    assert_eq!(
        error.reason(),
        Some(h2::Reason::ENHANCE_YOUR_CALM),
        "{error:?}"
    );
    assert!(error.is_go_away(), "{error:?}");
    assert!(reset >= max, "sent away after {reset} resets, before {max}");
}

/// A stream that declares a message of `MAX_MESSAGE_BYTES` and sends only its first bytes: tonic
/// sets aside room for all of it. Returned so that the caller keeps it open.
async fn unfinished_request(
    h2: &h2::client::SendRequest<bytes::Bytes>,
) -> (h2::client::ResponseFuture, h2::SendStream<bytes::Bytes>) {
    let mut h2 = h2.clone().ready().await.unwrap();
    let (response, mut body) = h2.send_request(raw_request(None), false).unwrap();
    let mut data = vec![0u8];
    let len = u32::try_from(meshid_ca::server::MAX_MESSAGE_BYTES).unwrap();
    data.extend_from_slice(&len.to_be_bytes());
    data.extend_from_slice(b"only the start");
    // A stream the CA refused as it arrived (its place taken) may be answered and reset before
    // this: its response says why, and the caller reads that.
    let _ = body.send_data(data.into(), false);
    (response, body)
}

/// A raw h2 connection over anonymous TLS from `from`, and the task driving it.
async fn raw_h2_from(
    ca: &TestCa,
    from: IpAddr,
) -> (
    h2::client::SendRequest<bytes::Bytes>,
    tokio::task::JoinHandle<Result<(), h2::Error>>,
) {
    let tls = tls_from(ca, &tls_connector(ca, None), from).await.unwrap();
    let (h2, connection) = h2::client::handshake(tls).await.unwrap();
    (h2, tokio::spawn(connection))
}

/// Why a whole `GetTrustBundle` from `from` (a new connection) is refused because too many
/// requests are arriving (the limit, as the CA names it), or `None` when it is served; panics on
/// any other failure.
async fn bundle_refused_from(ca: &TestCa, from: IpAddr) -> Option<&'static str> {
    let opened = Arc::new(AtomicUsize::new(0));
    let mut client = client_from(ca, from, None, opened).await.unwrap();
    match client.get_trust_bundle(GetTrustBundleRequest {}).await {
        Ok(_) => None,
        Err(status)
            if status.code() == Code::ResourceExhausted
                && status.message().contains("arriving") =>
        {
            Some(arrivals_limit(status.message()))
        }
        Err(status) => panic!("{status:?}"),
    }
}

/// The limit an arrivals refusal names (the per-source one names the overall one too).
fn arrivals_limit(message: &str) -> &'static str {
    if message.contains("max_arriving_requests_per_source") {
        "max_arriving_requests_per_source"
    } else if message.contains("max_arriving_requests") {
        "max_arriving_requests"
    } else {
        panic!("not an arrivals refusal: {message}")
    }
}

/// An unfinished request on a connection of its own, and that connection.
type Held = (
    (h2::client::ResponseFuture, h2::SendStream<bytes::Bytes>),
    (
        h2::client::SendRequest<bytes::Bytes>,
        tokio::task::JoinHandle<Result<(), h2::Error>>,
    ),
);

/// An unfinished request from `from` on a connection of its own (on one connection h2's client
/// sometimes held a later stream's head back behind an earlier stream that never ends).
async fn held_from(ca: &TestCa, from: IpAddr) -> Held {
    let (h2, conn) = raw_h2_from(ca, from).await;
    (unfinished_request(&h2).await, (h2, conn))
}

/// The first of `held` the CA answered (an unfinished request is answered only when refused), and
/// the limit that refused it.
async fn first_refused(held: &mut [Held]) -> (usize, &'static str) {
    let (i, answer) = tokio::time::timeout(
        Duration::from_secs(30),
        std::future::poll_fn(|cx| {
            for (i, ((response, _), _)) in held.iter_mut().enumerate() {
                if let std::task::Poll::Ready(r) = std::pin::Pin::new(response).poll(cx) {
                    return std::task::Poll::Ready((i, r));
                }
            }
            std::task::Poll::Pending
        }),
    )
    .await
    .expect("the CA answered none of the unfinished requests");
    let answer = answer.unwrap();
    let header = |name: &str| {
        answer
            .headers()
            .get(name)
            .and_then(|v| v.to_str().ok())
            .unwrap_or_default()
            .to_owned()
    };
    assert_eq!(header("grpc-status"), "8", "{answer:?}");
    (i, arrivals_limit(&header("grpc-message")))
}

/// Unfinished requests are bounded: a connection takes `MAX_STREAMS_PER_CONNECTION` streams at
/// once (it was 256), and calls whose request is still arriving hold at most
/// `max_arriving_requests` places on the CA, an eighth of them per source. Past a source's share
/// its next call is `RESOURCE_EXHAUSTED` while other sources are served; past the whole, every
/// newcomer is, until a place is given back.
///
/// Each step waits for what the CA answers, not for time to pass: a probe that can take a place
/// (its own request arrives too) is only sent when no unfinished request of the test can still
/// be arriving, or from a source whose share is full (refused before it takes one), so no probe
/// takes a place an unfinished request of the test was meant to hold, however slow the machine.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unfinished_requests_are_bounded_per_connection_per_source_and_overall() {
    let ca = TestCa::start(CaOptions {
        max_arriving_requests: 16,
        ..Default::default()
    })
    .await;
    let per_source = 2;
    let tls = tls_from(&ca, &tls_connector(&ca, None), HERE)
        .await
        .unwrap();
    let (h2, mut connection) = h2::client::handshake(tls).await.unwrap();
    // The server's SETTINGS are in once a first exchange is done.
    let (response, mut body) = h2
        .clone()
        .ready()
        .await
        .unwrap()
        .send_request(raw_request(None), false)
        .unwrap();
    body.send_data(bytes::Bytes::from_static(&[0, 0, 0, 0, 0]), true)
        .unwrap();
    tokio::select! {
        r = response => { r.unwrap(); }
        r = &mut connection => panic!("the connection ended: {r:?}"),
    }
    // A sidecar needs a handful at once.
    assert_eq!(meshid_ca::server::MAX_STREAMS_PER_CONNECTION, 16);
    assert_eq!(connection.max_concurrent_send_streams(), 16);
    let here_conn = tokio::spawn(connection);

    // One more than a source's share: whichever arrives last is refused, and once it is, the
    // others hold the source's share.
    let mut held = Vec::new();
    for _ in 0..=per_source {
        held.push(held_from(&ca, HERE).await);
    }
    let (refused, limit) = first_refused(&mut held).await;
    assert_eq!(limit, "max_arriving_requests_per_source");
    drop(held.remove(refused));
    assert_eq!(
        bundle_refused_from(&ca, HERE).await,
        Some("max_arriving_requests_per_source"),
        "a source's unfinished requests take its share"
    );
    assert_eq!(
        bundle_refused_from(&ca, ELSEWHERE).await,
        None,
        "another source is served"
    );

    // Seven more sources take their share each: all 16 places. Probed from the first source,
    // whose share is full: refused for its share until every place is taken, and for the whole
    // from then on, never taking a place itself.
    for host in 3..10u8 {
        for _ in 0..per_source {
            held.push(held_from(&ca, IpAddr::V4(Ipv4Addr::new(127, 0, 0, host))).await);
        }
    }
    eventually("every place is taken", || async {
        bundle_refused_from(&ca, HERE).await == Some("max_arriving_requests")
    })
    .await;
    let newcomer = IpAddr::V4(Ipv4Addr::new(127, 0, 0, 10));
    assert_eq!(
        bundle_refused_from(&ca, newcomer).await,
        Some("max_arriving_requests"),
        "a newcomer is refused once every place is taken"
    );

    // The first source goes away: its places come back.
    for (_, (_, conn)) in held.drain(..per_source) {
        conn.abort();
    }
    drop(h2);
    here_conn.abort();
    eventually("a place given back serves the newcomer", || async {
        bundle_refused_from(&ca, newcomer).await.is_none()
    })
    .await;
    drop(held);
    // Each limit's refusals are counted apart.
    let m = metrics(&ca).await;
    for reason in ["max_arriving_requests", "max_arriving_requests_per_source"] {
        let series = format!("meshid_ca_calls_refused_total{{reason=\"{reason}\"}}");
        assert!(sample(&m, &series) >= 1.0, "{series}: {m}");
    }
}
