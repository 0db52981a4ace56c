//! PROXY protocol v2 to TCP apps (`--inbound ...,tcp,proxy-v2`): the app learns the peer's address
//! and the SPIFFE ID the sidecar verified, read by outside parsers (the `ppp` crate, haproxy with
//! `accept-proxy`); only an authenticated, allowed peer ever causes a header; a listener without
//! the option sends none.

use std::net::SocketAddr;
use std::process::Stdio;
use std::time::Duration;

use meshid_identity::policy::Protocol;
use meshid_identity::{SpiffeId, TrustDomain};
use meshid_tests::mesh::{SidecarSpec, TestPki, TestSidecar, client_config, free_port};
use ppp::v2::{Addresses, Command, Header};
use rustls::pki_types::ServerName;
use tokio::io::{AsyncBufReadExt, AsyncRead, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::{TcpListener, TcpSocket, TcpStream};
use tokio::sync::mpsc;

const SERVER: &str = "spiffe://cluster.local/ns/db/sa/postgres";
const CLIENT: &str = "spiffe://cluster.local/ns/shop/sa/orders";
const STRANGER: &str = "spiffe://cluster.local/ns/shop/sa/stranger";
/// The client's own address: a distinct loopback address, so the header's source is checkable.
const CLIENT_IP: &str = "127.0.0.5";

fn policy() -> String {
    format!(
        "mode: enforce\ninbound:\n  - port: {{port0}}\n    protocol: tcp\n    allow:\n      - id: {CLIENT}\n"
    )
}

/// What the app read before the peer's bytes: the raw header, if one came.
struct Arrival {
    header: Option<Vec<u8>>,
    first_bytes: Vec<u8>,
}

/// A TCP app that reads a PROXY v2 header when one starts the stream, reports it, then echoes.
async fn app() -> (SocketAddr, mpsc::UnboundedReceiver<Arrival>) {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let (tx, rx) = mpsc::unbounded_channel();
    tokio::spawn(async move {
        while let Ok((mut s, _)) = listener.accept().await {
            let tx = tx.clone();
            tokio::spawn(async move {
                let mut start = [0u8; 16];
                if s.read_exact(&mut start).await.is_err() {
                    return;
                }
                let (header, first_bytes) = if start[..12] == *b"\r\n\r\n\0\r\nQUIT\n" {
                    let len = usize::from(u16::from_be_bytes([start[14], start[15]]));
                    let mut rest = vec![0u8; len];
                    if s.read_exact(&mut rest).await.is_err() {
                        return;
                    }
                    let mut header = start.to_vec();
                    header.extend_from_slice(&rest);
                    (Some(header), Vec::new())
                } else {
                    (None, start.to_vec())
                };
                let _ = tx.send(Arrival {
                    header,
                    first_bytes: first_bytes.clone(),
                });
                if s.write_all(&first_bytes).await.is_err() {
                    return;
                }
                let (mut r, mut w) = s.split();
                let _ = tokio::io::copy(&mut r, &mut w).await;
            });
        }
    });
    (addr, rx)
}

async fn server(pki: &TestPki, app: SocketAddr, proxy_protocol: bool) -> TestSidecar {
    TestSidecar::start(
        pki,
        &pki.workload(SERVER),
        SERVER,
        SidecarSpec {
            inbound: vec![("127.0.0.3", app, Protocol::Tcp)],
            policy: Some(policy()),
            proxy_protocol,
            ..Default::default()
        },
    )
    .await
}

/// An mTLS connection to `addr` as `id`, from [`CLIENT_IP`]; returns the stream and its local address.
async fn connect_as(
    pki: &TestPki,
    id: &str,
    addr: SocketAddr,
) -> (tokio_rustls::client::TlsStream<TcpStream>, SocketAddr) {
    let socket = TcpSocket::new_v4().unwrap();
    socket
        .bind(format!("{CLIENT_IP}:0").parse().unwrap())
        .unwrap();
    let tcp = socket.connect(addr).await.unwrap();
    let local = tcp.local_addr().unwrap();
    let workload = pki.workload(id);
    let config = client_config(
        &pki.roots(),
        &TrustDomain::new("cluster.local").unwrap(),
        Some(&workload),
        &SpiffeId::parse(SERVER).unwrap(),
        &[],
    );
    let tls = tokio_rustls::TlsConnector::from(config)
        .connect(ServerName::try_from("sidecar.invalid").unwrap(), tcp)
        .await
        .expect("handshake");
    (tls, local)
}

async fn read_n(s: &mut (impl AsyncRead + Unpin), n: usize) -> Vec<u8> {
    let mut buf = vec![0u8; n];
    tokio::time::timeout(Duration::from_secs(10), s.read_exact(&mut buf))
        .await
        .expect("timed out")
        .expect("read");
    buf
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_app_learns_the_peer_address_and_verified_id() {
    let pki = TestPki::new();
    let (app, mut arrivals) = app().await;
    let sidecar = server(&pki, app, true).await;
    let inbound = sidecar.inbound[0];

    let (mut tls, client_addr) = connect_as(&pki, CLIENT, inbound).await;
    let payload = b"SELECT 1; -- bytes after the header are the peer's, unchanged";
    tls.write_all(payload).await.unwrap();
    assert_eq!(read_n(&mut tls, payload.len()).await, payload);

    let arrival = arrivals.recv().await.unwrap();
    let raw = arrival
        .header
        .expect("a PROXY v2 header before the peer's bytes");
    let header = Header::try_from(raw.as_slice()).expect("ppp parses our header");
    assert_eq!(header.command, Command::Proxy);
    match header.addresses {
        Addresses::IPv4(a) => {
            let source = SocketAddr::from((a.source_address, a.source_port));
            let destination = SocketAddr::from((a.destination_address, a.destination_port));
            assert_eq!(
                source, client_addr,
                "the peer's address as the sidecar saw it"
            );
            assert_eq!(destination, inbound, "the address the peer connected to");
        }
        other => panic!("expected IPv4 addresses, got {other:?}"),
    }
    let tlvs: Vec<_> = header.tlvs().map(|t| t.expect("well-formed TLV")).collect();
    let ssl = tlvs.iter().find(|t| t.kind == 0x20).expect("PP2_TYPE_SSL");
    assert_eq!(ssl.value[0], 0x07, "PP2_CLIENT_SSL | CERT_CONN | CERT_SESS");
    assert_eq!(&ssl.value[1..5], &[0, 0, 0, 0], "verify: 0, verified");
    assert_eq!(
        &ssl.value[5..],
        b"\x21\x00\x07TLSv1.3",
        "PP2_SUBTYPE_SSL_VERSION"
    );
    let id = tlvs
        .iter()
        .find(|t| t.kind == 0xE4)
        .expect("the SPIFFE ID TLV");
    assert_eq!(std::str::from_utf8(&id.value).unwrap(), CLIENT);
    assert_eq!(tlvs.len(), 2, "{tlvs:?}");

    // A peer the policy does not allow never reaches the app, so no header speaks for it.
    let (mut tls, _) = connect_as(&pki, STRANGER, inbound).await;
    let _ = tls.write_all(b"hello").await;
    let mut rest = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(5), tls.read_to_end(&mut rest)).await;
    assert!(rest.is_empty());
    assert!(
        tokio::time::timeout(Duration::from_millis(300), arrivals.recv())
            .await
            .is_err(),
        "the app got a connection for a denied peer"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_listener_without_the_option_sends_no_header() {
    let pki = TestPki::new();
    let (app, mut arrivals) = app().await;
    let sidecar = server(&pki, app, false).await;
    let (mut tls, _) = connect_as(&pki, CLIENT, sidecar.inbound[0]).await;
    let payload = b"0123456789abcdef and more";
    tls.write_all(payload).await.unwrap();
    assert_eq!(read_n(&mut tls, payload.len()).await, payload);
    let arrival = arrivals.recv().await.unwrap();
    assert!(arrival.header.is_none());
    assert_eq!(arrival.first_bytes, &payload[..16]);
}

/// haproxy, a real consumer of the PROXY protocol, takes our header with `accept-proxy`: its `src`
/// and `dst` (in the answer and in its log line) are the peer's and the listener's addresses.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn haproxy_accept_proxy_takes_the_header() {
    meshid_tests::tools::require("haproxy", "apt-get install haproxy");
    let pki = TestPki::new();
    let port = free_port("127.0.0.1");
    let dir = tempfile::tempdir().unwrap();
    let cfg = dir.path().join("haproxy.cfg");
    std::fs::write(
        &cfg,
        format!(
            "global\n  log stdout format raw local0\n\
             defaults\n  mode http\n  log global\n  timeout connect 5s\n  timeout client 10s\n  timeout server 10s\n\
             frontend app\n  bind 127.0.0.1:{port} accept-proxy\n\
             \x20 log-format \"haproxy-log client=%ci:%cp\"\n\
             \x20 http-request return status 200 content-type text/plain lf-string \"src=%[src]:%[src_port] dst=%[dst]:%[dst_port]\\n\"\n"
        ),
    )
    .unwrap();
    let mut haproxy = tokio::process::Command::new("haproxy")
        .args(["-db", "-f"])
        .arg(&cfg)
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .kill_on_drop(true)
        .spawn()
        .expect("start haproxy");
    let app: SocketAddr = format!("127.0.0.1:{port}").parse().unwrap();
    assert!(
        meshid_tests::mesh::eventually(Duration::from_secs(10), || async {
            TcpStream::connect(app).await.is_ok()
        })
        .await,
        "haproxy did not start listening"
    );
    // The readiness probe above reached haproxy without a header (a connection haproxy refuses);
    // what matters below is the connection through the sidecar.
    let sidecar = server(&pki, app, true).await;
    let inbound = sidecar.inbound[0];
    let (mut tls, client_addr) = connect_as(&pki, CLIENT, inbound).await;
    tls.write_all(b"GET / HTTP/1.1\r\nhost: app\r\nconnection: close\r\n\r\n")
        .await
        .unwrap();
    let mut answer = Vec::new();
    tokio::time::timeout(Duration::from_secs(10), tls.read_to_end(&mut answer))
        .await
        .expect("timed out")
        .expect("read");
    let answer = String::from_utf8_lossy(&answer);
    assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
    assert!(
        answer.contains(&format!("src={client_addr} dst={inbound}")),
        "{answer}"
    );

    let stdout = haproxy.stdout.take().unwrap();
    let mut lines = BufReader::new(stdout).lines();
    let want = format!("haproxy-log client={client_addr}");
    let logged = tokio::time::timeout(Duration::from_secs(10), async {
        while let Ok(Some(line)) = lines.next_line().await {
            if line.contains(&want) {
                return true;
            }
        }
        false
    })
    .await
    .unwrap_or(false);
    assert!(logged, "haproxy did not log {want}");
}
