//! The SPIFFE Workload API the sidecar serves to its app (`--workload-api-socket`), checked with an
//! outside client (rust-spiffe, the `spiffe` crate) and with raw calls made from our .proto: the
//! app's own X.509-SVID (its key, not the sidecar's) and the bundle, a new SVID streamed after a
//! renewal, the security header enforced, file mode refusing SVIDs but serving bundles; JWT-SVIDs
//! signed by the CA for the pod's identity, its JWT keys as a JWK set, tokens checked by the
//! sidecar and offline by rust-spiffe and py-spiffe, through a CA rotation.

use std::path::{Path, PathBuf};
use std::time::Duration;

use meshid_ca::signer::LifetimePolicy;
use meshid_identity::SpiffeId;
use meshid_proto::workload::spiffe_workload_api_client::SpiffeWorkloadApiClient;
use meshid_proto::workload::{
    JwtBundlesRequest, JwtsvidRequest, ValidateJwtsvidRequest, X509BundlesRequest, X509svidRequest,
};
use meshid_sidecar::settings::CredSource;
use meshid_tests::ca::{CaOptions, TestCa};
use meshid_tests::mesh::{SidecarSpec, TestPki, TestSidecar};
use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer};
use spiffe::{TrustDomain, WorkloadApiClient};
use tokio_stream::StreamExt;

const ID: &str = "spiffe://cluster.local/ns/shop/sa/orders";

fn ca_mode(ca: &TestCa, ttl: Duration) -> CredSource {
    ca.sidecar_creds("shop", "orders", ttl)
}

/// A CA whose certificates live 4 s: sidecars renew about every 2 s.
async fn short_lived_ca() -> TestCa {
    TestCa::start(CaOptions {
        lifetimes: LifetimePolicy {
            default: Duration::from_secs(4),
            max: Duration::from_secs(4),
        },
        ..Default::default()
    })
    .await
}

/// A sidecar of [`ID`] serving the Workload API, and what it runs on.
struct ApiSidecar {
    /// Its PKI: with `creds` `None`, its certificate and bundle files.
    pki: TestPki,
    /// Holds the socket's directory.
    dir: tempfile::TempDir,
    socket: PathBuf,
    sidecar: TestSidecar,
}

/// A sidecar of [`ID`] with `creds` (files of a test PKI when `None`) serving the Workload API on
/// `<tempdir>/<sub>/workload.sock`.
async fn api_sidecar(creds: Option<CredSource>, sub: &str) -> ApiSidecar {
    let pki = TestPki::new();
    let dir = tempfile::tempdir().unwrap();
    let socket = dir.path().join(sub).join("workload.sock");
    let sidecar = sidecar(&pki, creds, &socket).await;
    ApiSidecar {
        pki,
        dir,
        socket,
        sidecar,
    }
}

async fn sidecar(pki: &TestPki, creds: Option<CredSource>, socket: &Path) -> TestSidecar {
    TestSidecar::start(
        pki,
        &pki.workload(ID),
        ID,
        SidecarSpec {
            creds,
            workload_api: Some(socket.to_owned()),
            ..Default::default()
        },
    )
    .await
}

/// Our own client over the socket, sending the security header only when asked to.
async fn raw_client(
    socket: &Path,
    header: bool,
) -> SpiffeWorkloadApiClient<
    tonic::service::interceptor::InterceptedService<
        tonic::transport::Channel,
        impl FnMut(tonic::Request<()>) -> Result<tonic::Request<()>, tonic::Status> + Clone,
    >,
> {
    try_raw_client(socket, header)
        .await
        .expect("connect to the socket")
}

/// [`raw_client`], or the error of a connection the socket closed.
async fn try_raw_client(
    socket: &Path,
    header: bool,
) -> Result<
    SpiffeWorkloadApiClient<
        tonic::service::interceptor::InterceptedService<
            tonic::transport::Channel,
            impl FnMut(tonic::Request<()>) -> Result<tonic::Request<()>, tonic::Status> + Clone,
        >,
    >,
    tonic::transport::Error,
> {
    let path = socket.to_owned();
    let channel = tonic::transport::Endpoint::from_static("http://workload.invalid")
        .connect_with_connector(tower::service_fn(move |_| {
            let path = path.clone();
            async move {
                tokio::net::UnixStream::connect(path)
                    .await
                    .map(hyper_util::rt::TokioIo::new)
            }
        }))
        .await?;
    Ok(SpiffeWorkloadApiClient::with_interceptor(
        channel,
        move |mut req: tonic::Request<()>| {
            if header {
                req.metadata_mut()
                    .insert("workload.spiffe.io", "true".parse().unwrap());
            }
            Ok(req)
        },
    ))
}

fn key_matches(chain: &[CertificateDer<'static>], key: &[u8]) -> bool {
    let provider = rustls::crypto::aws_lc_rs::default_provider();
    rustls::sign::CertifiedKey::from_der(
        chain.to_vec(),
        PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(key.to_vec())),
        &provider,
    )
    .is_ok()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_app_gets_an_svid_of_its_own_and_a_new_one_after_each_renewal() {
    let ca = short_lived_ca().await;
    let api = api_sidecar(Some(ca_mode(&ca, Duration::from_secs(4))), "spiffe").await;
    let socket = api.socket.clone();
    let s = &api.sidecar;

    let client = WorkloadApiClient::connect_to(format!("unix:{}", socket.display()))
        .await
        .expect("rust-spiffe connects");
    let svid = tokio::time::timeout(Duration::from_secs(10), client.fetch_x509_svid())
        .await
        .expect("an SVID within 10 s")
        .expect("a valid X509-SVID");
    assert_eq!(svid.spiffe_id().to_string(), ID);
    let chain: Vec<CertificateDer<'static>> = svid
        .cert_chain()
        .iter()
        .map(|c| CertificateDer::from(c.as_bytes().to_vec()))
        .collect();
    assert!(
        key_matches(&chain, svid.private_key().as_bytes()),
        "the key is the certificate's"
    );
    // The app's key is its own: the sidecar's certificate has another public key.
    let own = s.running.as_ref().unwrap().shared.creds.current().unwrap();
    let app_leaf = x509_parser::parse_x509_certificate(chain[0].as_ref())
        .unwrap()
        .1;
    let app_key_sha =
        aws_lc_rs::digest::digest(&aws_lc_rs::digest::SHA256, app_leaf.public_key().raw);
    let app_key_hex: String = app_key_sha
        .as_ref()
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect();
    assert_ne!(app_key_hex, own.public_key_sha256, "not the sidecar's key");

    // The bundle: the CA's roots, for the trust domain.
    let bundles = client.fetch_x509_bundles().await.expect("bundles");
    let td = TrustDomain::new("cluster.local").unwrap();
    let bundle = bundles.get(&td).expect("our trust domain's bundle");
    let roots: Vec<&[u8]> = bundle.authorities().iter().map(|c| c.as_bytes()).collect();
    assert_eq!(
        roots,
        ca.roots.iter().map(|r| r.as_ref()).collect::<Vec<_>>()
    );

    // A renewal (4 s certificates renew within about 2.4 s) streams a new SVID with a new key.
    let mut stream = client.stream_x509_svids().await.expect("stream");
    let first = tokio::time::timeout(Duration::from_secs(10), stream.next())
        .await
        .unwrap()
        .unwrap()
        .unwrap();
    let next = tokio::time::timeout(Duration::from_secs(10), stream.next())
        .await
        .expect("a new SVID after the renewal")
        .unwrap()
        .unwrap();
    assert_eq!(next.spiffe_id().to_string(), ID);
    assert_ne!(
        first.leaf().as_bytes(),
        next.leaf().as_bytes(),
        "a new certificate"
    );
    assert_ne!(
        first.private_key().as_bytes(),
        next.private_key().as_bytes(),
        "a new key"
    );
    let metrics = s.metrics().await;
    assert!(
        metrics.contains(r#"meshid_sidecar_app_svid_requests_total{result="issued"}"#),
        "{metrics}"
    );
    assert!(
        !metrics.contains("meshid_sidecar_app_svid_expiry_timestamp_seconds 0\n"),
        "{metrics}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn calls_without_the_security_header_are_refused_and_file_mode_has_no_svids() {
    let api = api_sidecar(None, "api").await;
    let socket = api.socket.clone();
    let pki = &api.pki;

    let mut bare = raw_client(&socket, false).await;
    let refused = bare
        .fetch_x509svid(X509svidRequest {})
        .await
        .expect_err("no header");
    assert_eq!(refused.code(), tonic::Code::InvalidArgument);
    assert!(refused.message().contains("security header"), "{refused:?}");
    let refused = bare
        .fetch_x509_bundles(X509BundlesRequest {})
        .await
        .expect_err("no header");
    assert_eq!(refused.code(), tonic::Code::InvalidArgument);

    let mut client = raw_client(&socket, true).await;
    // File mode: no CA to issue the app an SVID of its own.
    let denied = client
        .fetch_x509svid(X509svidRequest {})
        .await
        .expect_err("file mode");
    assert_eq!(denied.code(), tonic::Code::PermissionDenied, "{denied:?}");
    // Bundles are served in every mode.
    let mut bundles = client
        .fetch_x509_bundles(X509BundlesRequest {})
        .await
        .expect("bundles")
        .into_inner();
    let first = bundles.message().await.unwrap().expect("a bundle");
    let roots = first
        .bundles
        .get("spiffe://cluster.local")
        .expect("keyed by trust domain");
    let want: Vec<u8> = pki.roots().iter().flat_map(|r| r.to_vec()).collect();
    assert_eq!(roots, &want);
    let jwt = client
        .fetch_jwtsvid(JwtsvidRequest {
            audience: vec!["x".into()],
            spiffe_id: String::new(),
        })
        .await
        .expect_err("file mode");
    assert_eq!(jwt.code(), tonic::Code::PermissionDenied, "{jwt:?}");
    let jwt = bare
        .fetch_jwtsvid(JwtsvidRequest {
            audience: vec!["x".into()],
            spiffe_id: String::new(),
        })
        .await
        .expect_err("no header");
    assert_eq!(jwt.code(), tonic::Code::InvalidArgument, "{jwt:?}");

    // Every call is counted by method and outcome.
    let metrics = api.sidecar.metrics().await;
    for line in [
        r#"meshid_sidecar_workload_api_calls_total{method="FetchX509SVID",code="invalid_argument"} 1"#,
        r#"meshid_sidecar_workload_api_calls_total{method="FetchX509SVID",code="permission_denied"} 1"#,
        r#"meshid_sidecar_workload_api_calls_total{method="FetchX509Bundles",code="ok"} 1"#,
        r#"meshid_sidecar_workload_api_calls_total{method="FetchJWTSVID",code="permission_denied"} 1"#,
        r#"meshid_sidecar_workload_api_calls_total{method="FetchJWTSVID",code="invalid_argument"} 1"#,
    ] {
        assert!(metrics.contains(line), "{line} not in\n{metrics}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_socket_is_private() {
    use std::os::unix::fs::PermissionsExt;
    let api = api_sidecar(None, "spiffe").await;
    let socket = api.socket.clone();
    let pki = &api.pki;
    let dir = &api.dir;
    let mode = std::fs::metadata(&socket).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode, 0o660);
    let dir_mode = std::fs::metadata(socket.parent().unwrap())
        .unwrap()
        .permissions()
        .mode()
        & 0o777;
    assert_eq!(dir_mode, 0o750);

    // A directory anyone may write to is refused at start.
    let open = dir.path().join("open");
    std::fs::create_dir(&open).unwrap();
    std::fs::set_permissions(&open, std::fs::Permissions::from_mode(0o777)).unwrap();
    let err = TestSidecar::try_start(
        pki,
        &pki.workload(ID),
        ID,
        SidecarSpec {
            workload_api: Some(open.join("workload.sock")),
            ..Default::default()
        },
    )
    .await
    .err()
    .expect("refused");
    assert!(err.to_string().contains("writable by no one else"), "{err}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_expired_svid_is_never_handed_out() {
    let mut ca = short_lived_ca().await;
    let api = api_sidecar(Some(ca_mode(&ca, Duration::from_secs(4))), "spiffe").await;
    let socket = api.socket.clone();
    let mut client = raw_client(&socket, true).await;
    let mut stream = client
        .fetch_x509svid(X509svidRequest {})
        .await
        .expect("stream")
        .into_inner();
    let first = tokio::time::timeout(Duration::from_secs(10), stream.message())
        .await
        .expect("an SVID")
        .unwrap()
        .unwrap();
    assert_eq!(first.svids[0].spiffe_id, ID);
    // The CA goes away: nothing renews the SVID, which expires within 4 s.
    ca.stop().await;
    let ended = tokio::time::timeout(Duration::from_secs(15), async {
        loop {
            match stream.message().await {
                Ok(Some(_)) => continue,
                other => return other,
            }
        }
    })
    .await
    .expect("the stream ends once the SVID expires");
    let status = ended.expect_err("ends with a status");
    assert_eq!(status.code(), tonic::Code::Unavailable, "{status:?}");
    // A new call gets nothing expired: it waits for a valid SVID.
    let mut again = client
        .fetch_x509svid(X509svidRequest {})
        .await
        .expect("stream")
        .into_inner();
    assert!(
        tokio::time::timeout(Duration::from_secs(2), again.message())
            .await
            .is_err(),
        "an expired SVID was handed out"
    );
}

/// This process's peak resident memory (`VmHWM`), in KiB: the sidecar runs in it.
fn peak_rss_kib() -> u64 {
    let status = std::fs::read_to_string("/proc/self/status").unwrap();
    let line = status
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .expect("VmHWM in /proc/self/status");
    line.trim().trim_end_matches("kB").trim().parse().unwrap()
}

/// An HPACK bomb: a 64 KiB header block (the most a client may send) that adds one ~4 KB field
/// to the dynamic table, then refers to it with a 1-byte index until the block is full. It would
/// decode to ~240 MB; the sidecar closes the connection instead, without the memory, and goes on
/// serving.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_hpack_bomb_closes_its_connection_and_the_api_goes_on() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let api = api_sidecar(None, "api").await;
    let socket = api.socket.clone();
    let before = peak_rss_kib();

    // Literal with incremental indexing, new name `x` (length 1), a value of 4000 bytes (127 in
    // the 7-bit prefix, then 3873 as 0xa1 0x1e), then index 62 (0xbe): the field just added.
    let mut block = vec![0x40, 0x01, b'x', 0x7f, 0xa1, 0x1e];
    block.extend_from_slice(&[b'a'; 4000]);
    block.resize(64 * 1024, 0xbe);
    let mut wire = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n".to_vec();
    wire.extend_from_slice(&[0, 0, 0, 0x4, 0, 0, 0, 0, 0]); // SETTINGS
    let chunks: Vec<&[u8]> = block.chunks(16_384).collect();
    for (i, chunk) in chunks.iter().enumerate() {
        // HEADERS (END_STREAM) on stream 1, then CONTINUATIONs, the last with END_HEADERS.
        let (kind, mut flags) = if i == 0 { (0x1, 0x1) } else { (0x9, 0) };
        if i == chunks.len() - 1 {
            flags |= 0x4;
        }
        let len = u32::try_from(chunk.len()).unwrap().to_be_bytes();
        wire.extend_from_slice(&len[1..]);
        wire.extend_from_slice(&[kind, flags, 0, 0, 0, 1]);
        wire.extend_from_slice(chunk);
    }
    let mut bomb = tokio::net::UnixStream::connect(&socket).await.unwrap();
    bomb.write_all(&wire).await.unwrap();
    let mut answer = Vec::new();
    let closed = tokio::time::timeout(Duration::from_secs(10), bomb.read_to_end(&mut answer))
        .await
        .expect("the connection is closed within 10 s");
    assert!(
        closed.is_ok()
            || closed.as_ref().unwrap_err().kind() == std::io::ErrorKind::ConnectionReset,
        "{closed:?}"
    );
    // Nothing was answered on stream 1: the server's frames are all on stream 0 (its SETTINGS).
    let mut at = 0;
    while let Some(head) = answer.get(at..at + 9) {
        assert_eq!(&head[5..], &[0, 0, 0, 0], "a frame on a stream: {answer:?}");
        at += 9 + (usize::from(head[0]) << 16 | usize::from(head[1]) << 8 | usize::from(head[2]));
    }
    let grown = (peak_rss_kib() - before) / 1024;
    assert!(grown < 64, "the peak resident memory grew by {grown} MiB");

    // The next client is served.
    let mut client = raw_client(&socket, true).await;
    let mut bundles = client
        .fetch_x509_bundles(X509BundlesRequest {})
        .await
        .expect("bundles")
        .into_inner();
    let first = tokio::time::timeout(Duration::from_secs(10), bundles.message())
        .await
        .expect("a bundle within 10 s")
        .unwrap()
        .expect("a bundle");
    assert!(first.bundles.contains_key("spiffe://cluster.local"));
}

/// Connections that never make a call (silent ones, and ones that sent the HTTP/2 preface and
/// stopped) fill every slot of the socket, twice over: the app's next connection still gets in (it
/// takes the place of the oldest connection that has made no call) and is served.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connections_that_make_no_call_cannot_keep_the_app_out() {
    use tokio::io::AsyncWriteExt;
    let api = api_sidecar(None, "api").await;
    let socket = api.socket.clone();
    let mut held = Vec::new();
    for i in 0..2 * meshid_sidecar::workload_api::MAX_CONNECTIONS {
        let mut c = tokio::net::UnixStream::connect(&socket).await.unwrap();
        if i % 2 == 1 {
            c.write_all(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n\0\0\0\x04\0\0\0\0\0")
                .await
                .unwrap();
        }
        held.push(c);
    }
    let bundles = async {
        let mut client = raw_client(&socket, true).await;
        let mut bundles = client
            .fetch_x509_bundles(X509BundlesRequest {})
            .await?
            .into_inner();
        bundles.message().await
    };
    let first = tokio::time::timeout(Duration::from_secs(10), bundles)
        .await
        .expect("answered within 10 s")
        .expect("a bundle")
        .expect("a bundle");
    assert!(first.bundles.contains_key("spiffe://cluster.local"));
    drop(held);
}

/// A process of another user than the app's (a container of the pod that is not the app) that
/// holds a watching stream on every connection it can open gets at most
/// `MAX_CONNECTIONS_PER_USER` of them, and the app still gets in: a connection that has made a
/// call is never displaced and a watching stream is never idle, so it held all 64 before.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn another_user_holding_watching_streams_cannot_keep_the_app_out() {
    use meshid_sidecar::workload_api::{MAX_CONNECTIONS, MAX_CONNECTIONS_PER_USER};
    use std::os::unix::fs::PermissionsExt;
    use tokio::io::AsyncBufReadExt;
    if meshid_runtime::process::effective_uid() != 0 {
        // Starting a process as another user takes root (CI runs as root).
        eprintln!("not run: starting a process as another user takes root");
        return;
    }
    let api = api_sidecar(None, "api").await;
    // The hog runs as `nobody` in root's group: the socket's group may connect, as in a pod.
    std::fs::set_permissions(api.dir.path(), std::fs::Permissions::from_mode(0o750)).unwrap();
    let mut hog = tokio::process::Command::new(env!("CARGO_BIN_EXE_workload-api-hog"))
        .arg(&api.socket)
        .arg(MAX_CONNECTIONS.to_string())
        .uid(65534)
        .gid(0)
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    let mut lines = tokio::io::BufReader::new(hog.stdout.take().unwrap()).lines();
    let held = tokio::time::timeout(Duration::from_secs(120), lines.next_line())
        .await
        .expect("the hog reports within 120 s")
        .unwrap()
        .expect("the hog reports what it holds");
    assert_eq!(
        held,
        format!("held {MAX_CONNECTIONS_PER_USER}"),
        "connections another user holds with watching streams"
    );
    // The app (this process, root) gets the rest: every one of them serves.
    let mut clients = Vec::new();
    for _ in 0..MAX_CONNECTIONS - MAX_CONNECTIONS_PER_USER {
        let bundles = async {
            let mut client = raw_client(&api.socket, true).await;
            let mut bundles = client
                .fetch_x509_bundles(X509BundlesRequest {})
                .await?
                .into_inner();
            let first = bundles.message().await?;
            Ok::<_, tonic::Status>((client, bundles, first))
        };
        let (client, stream, first) = tokio::time::timeout(Duration::from_secs(10), bundles)
            .await
            .expect("the app answered within 10 s")
            .expect("a bundle");
        assert!(
            first
                .expect("a bundle")
                .bundles
                .contains_key("spiffe://cluster.local")
        );
        clients.push((client, stream));
    }
    drop(hog.stdin.take());
    let _ = tokio::time::timeout(Duration::from_secs(10), hog.wait()).await;
}

/// Runs a py-spiffe script (written into `dir`) that finds the socket through
/// `SPIFFE_ENDPOINT_SOCKET`, as apps do; gRPC's HTTP trace goes to its output.
async fn run_python(dir: &Path, script: &str, socket: &Path) -> (bool, String) {
    let path = dir.join("client.py");
    std::fs::write(&path, script).unwrap();
    let endpoint = format!("unix://{}", socket.display());
    tokio::task::spawn_blocking(move || {
        meshid_tests::tools::run(
            std::process::Command::new("python3")
                .arg(&path)
                .env("SPIFFE_ENDPOINT_SOCKET", endpoint)
                .env("GRPC_VERBOSITY", "debug")
                .env("GRPC_TRACE", "http"),
        )
    })
    .await
    .unwrap()
}

/// py-spiffe (`spiffe` on PyPI), finding the socket through `SPIFFE_ENDPOINT_SOCKET` as apps do:
/// its SVID's key is the leaf's, the bundle has the CA's roots, and its stream sees the SVID of
/// the next renewal.
const PY_SPIFFE: &str = r#"
import threading
from cryptography.hazmat.primitives import serialization
from spiffe import TrustDomain, WorkloadApiClient

def spki(key):
    return key.public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)

client = WorkloadApiClient()
svid = client.fetch_x509_svid(timeout=10)
first = svid.leaf.serial_number
print("svid", svid.spiffe_id, spki(svid.private_key.public_key()) == spki(svid.leaf.public_key()))
bundle = client.fetch_x509_bundles(timeout=10).get_bundle_for_trust_domain(TrustDomain("cluster.local"))
print("bundle", len(bundle.x509_authorities))
renewed = threading.Event()
def on_success(ctx):
    if ctx.default_svid.leaf.serial_number != first:
        renewed.set()
def on_error(e):
    print("stream error", e)
handle = client.stream_x509_contexts(on_success, on_error, retry_connect=False)
print("renewed", renewed.wait(15))
handle.cancel()
client.close()
"#;

#[cfg_attr(
    not(have_py_spiffe),
    ignore = "python3 with py-spiffe (`spiffe` on PyPI) is not installed"
)]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn py_spiffe_fetches_the_svid_and_bundle_and_sees_the_renewal() {
    let ca = short_lived_ca().await;
    let api = api_sidecar(Some(ca_mode(&ca, Duration::from_secs(4))), "spiffe").await;
    let socket = api.socket.clone();
    let dir = &api.dir;
    let (ok, out) = run_python(dir.path(), PY_SPIFFE, &socket).await;
    assert!(ok, "{out}");
    assert!(out.contains(&format!("svid {ID} True")), "{out}");
    assert!(out.contains("bundle 1"), "{out}");
    assert!(out.contains("renewed True"), "{out}");
}

/// A root rotation's new root reaches the app on both streams without a new call: the bundle
/// stream sends the two roots, and the SVID stream sends its SVID again with the new bundle.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_bundle_change_is_streamed_to_the_app() {
    let ca = TestCa::start(CaOptions::default()).await;
    let api = api_sidecar(Some(ca_mode(&ca, Duration::from_secs(3600))), "spiffe").await;
    let socket = api.socket.clone();
    let client = WorkloadApiClient::connect_to(format!("unix:{}", socket.display()))
        .await
        .unwrap();
    let td = TrustDomain::new("cluster.local").unwrap();
    let mut bundles = client.stream_x509_bundles().await.expect("bundle stream");
    let mut contexts = client.stream_x509_contexts().await.expect("SVID stream");
    let roots = |set: &spiffe::X509BundleSet| set.get(&td).map_or(0, |b| b.authorities().len());
    let first = tokio::time::timeout(Duration::from_secs(10), bundles.next())
        .await
        .unwrap()
        .unwrap()
        .unwrap();
    assert_eq!(roots(&first), 1);
    let first = tokio::time::timeout(Duration::from_secs(10), contexts.next())
        .await
        .unwrap()
        .unwrap()
        .unwrap();
    assert_eq!(roots(first.bundle_set()), 1);

    meshid_ca::rotation::prepare(ca.dir.path(), None).expect("prepare a new root");
    let next = tokio::time::timeout(Duration::from_secs(15), bundles.next())
        .await
        .expect("the new bundle is streamed")
        .unwrap()
        .unwrap();
    assert_eq!(roots(&next), 2);
    let next = tokio::time::timeout(Duration::from_secs(15), contexts.next())
        .await
        .expect("the SVID is streamed again with the new bundle")
        .unwrap()
        .unwrap();
    assert_eq!(roots(next.bundle_set()), 2);
}

/// JWT-SVIDs through rust-spiffe: a token for the pod's identity and the audiences asked for,
/// verified offline against the JWK set the sidecar hands out and by the sidecar's
/// ValidateJWTSVID; the same audiences get the cached token; bad requests and tampered tokens are
/// refused; a prepared authority's key is streamed before it signs, and once it is active new
/// tokens carry its key and still verify.
/// An app whose 16 workers each ask for a token for the same audience at once gets 16 tokens
/// from one request to the CA: the callers that missed the cache together wait for the first
/// one's token. Before, each asked the CA, whose per-lineage rate (a burst of 8) refused half.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn many_callers_missing_the_cache_at_once_share_one_request_to_the_ca() {
    let ca = TestCa::start(CaOptions::default()).await;
    let api = api_sidecar(Some(ca_mode(&ca, Duration::from_secs(3600))), "spiffe").await;
    // The sidecar has its certificate (the first call waits for it otherwise).
    let client = WorkloadApiClient::connect_to(format!("unix:{}", api.socket.display()))
        .await
        .unwrap();
    tokio::time::timeout(Duration::from_secs(10), client.fetch_x509_svid())
        .await
        .expect("an SVID within 10 s")
        .expect("a valid X509-SVID");
    let calls = (0..16).map(|_| {
        let socket = api.socket.clone();
        tokio::spawn(async move {
            let mut raw = raw_client(&socket, true).await;
            raw.fetch_jwtsvid(JwtsvidRequest {
                audience: vec!["db".into()],
                spiffe_id: String::new(),
            })
            .await
            .map(|r| r.into_inner().svids[0].svid.clone())
        })
    });
    let mut tokens = Vec::new();
    for call in calls.collect::<Vec<_>>() {
        tokens.push(call.await.unwrap().expect("every caller gets a token"));
    }
    tokens.dedup();
    assert_eq!(tokens.len(), 1, "one token, shared");
    let metrics = api.sidecar.metrics().await;
    assert!(
        metrics.contains("meshid_sidecar_jwt_svid_requests_total{result=\"issued\"} 1\n"),
        "{metrics}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_app_gets_jwt_svids_that_verify_through_a_rotation() {
    let ca = TestCa::start(CaOptions::default()).await;
    let api = api_sidecar(Some(ca_mode(&ca, Duration::from_secs(3600))), "spiffe").await;
    let socket = api.socket.clone();
    let s = &api.sidecar;
    let client = WorkloadApiClient::connect_to(format!("unix:{}", socket.display()))
        .await
        .unwrap();
    let svid = tokio::time::timeout(
        Duration::from_secs(10),
        client.fetch_jwt_svid(["db", "cache"], None),
    )
    .await
    .expect("a JWT-SVID within 10 s")
    .expect("a valid JWT-SVID");
    assert_eq!(svid.spiffe_id().to_string(), ID);
    let mut aud = svid.audience().to_vec();
    aud.sort();
    assert_eq!(aud, ["cache", "db"]);
    let td = TrustDomain::new("cluster.local").unwrap();
    let bundles = client.fetch_jwt_bundles().await.expect("JWT bundles");
    let bundle = bundles.get(&td).expect("our trust domain's JWT bundle");
    assert!(bundle.find_jwt_authority(svid.key_id()).is_some());
    // Offline, as an app verifying a caller's token would.
    let checked = spiffe::JwtSvid::parse_and_validate(svid.token(), &bundles, &["db"])
        .expect("verifies offline under the bundle");
    assert_eq!(checked.spiffe_id().to_string(), ID);
    assert!(spiffe::JwtSvid::parse_and_validate(svid.token(), &bundles, &["other"]).is_err());
    // And by the sidecar.
    let validated = client
        .validate_jwt_token("cache", svid.token())
        .await
        .expect("the sidecar validates it");
    assert_eq!(validated.spiffe_id().to_string(), ID);
    // The same audiences again: the cached token, no second request to the CA.
    let again = client.fetch_jwt_svid(["cache", "db"], None).await.unwrap();
    assert_eq!(again.token(), svid.token());

    let mut raw = raw_client(&socket, true).await;
    let jwt = |audience: Vec<String>, spiffe_id: &str| JwtsvidRequest {
        audience,
        spiffe_id: spiffe_id.to_owned(),
    };
    for (audience, what) in [
        (vec![], "no audience"),
        (vec!["x".repeat(257)], "an oversized audience"),
        ((0..9).map(|i| format!("a{i}")).collect(), "nine audiences"),
        (vec!["a\u{7}b".to_owned()], "a control character"),
    ] {
        let refused = raw.fetch_jwtsvid(jwt(audience, "")).await.expect_err(what);
        assert_eq!(
            refused.code(),
            tonic::Code::InvalidArgument,
            "{what}: {refused:?}"
        );
    }
    let other = raw
        .fetch_jwtsvid(jwt(
            vec!["db".into()],
            "spiffe://cluster.local/ns/shop/sa/admin",
        ))
        .await
        .expect_err("another identity");
    assert_eq!(other.code(), tonic::Code::PermissionDenied, "{other:?}");
    let mine = raw.fetch_jwtsvid(jwt(vec!["db".into()], ID)).await.unwrap();
    assert_eq!(mine.into_inner().svids[0].spiffe_id, ID);
    // Validation refuses the wrong audience, a changed token, garbage and empty fields.
    let validate = |audience: &str, svid: &str| ValidateJwtsvidRequest {
        audience: audience.to_owned(),
        svid: svid.to_owned(),
    };
    let mut parts: Vec<String> = svid.token().split('.').map(str::to_owned).collect();
    parts[1] = parts[1].chars().rev().collect();
    let tampered = parts.join(".");
    for (req, what) in [
        (validate("other", svid.token()), "wrong audience"),
        (validate("db", &tampered), "tampered"),
        (validate("db", "not.a.jwt"), "garbage"),
        (validate("", svid.token()), "no audience"),
        (validate("db", ""), "no token"),
    ] {
        let refused = raw.validate_jwtsvid(req).await.expect_err(what);
        assert_eq!(
            refused.code(),
            tonic::Code::InvalidArgument,
            "{what}: {refused:?}"
        );
    }
    let ok = raw
        .validate_jwtsvid(validate("db", svid.token()))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(ok.spiffe_id, ID);
    let claims = ok.claims.expect("claims");
    assert!(claims.fields.contains_key("exp"), "{claims:?}");

    // A rotation: the prepared authority's key is streamed beside the active one's...
    let mut keys = raw
        .fetch_jwt_bundles(JwtBundlesRequest {})
        .await
        .unwrap()
        .into_inner();
    let count = |m: &meshid_proto::workload::JwtBundlesResponse| {
        let jwks: serde_json::Value =
            serde_json::from_slice(&m.bundles["spiffe://cluster.local"]).unwrap();
        jwks["keys"].as_array().unwrap().len()
    };
    let first = keys.message().await.unwrap().unwrap();
    assert_eq!(count(&first), 1);
    meshid_ca::rotation::prepare(ca.dir.path(), None).expect("prepare");
    let next = tokio::time::timeout(Duration::from_secs(15), keys.message())
        .await
        .expect("the new key is streamed")
        .unwrap()
        .unwrap();
    assert_eq!(count(&next), 2);
    // ...and once it signs, new tokens carry it and still verify.
    meshid_ca::rotation::activate(ca.dir.path(), &[ca.admin_addr], true)
        .await
        .expect("activate");
    // The CA follows its directory within about a second; each try asks for a new audience, so
    // no cached token answers.
    let (rotated, audience) = tokio::time::timeout(Duration::from_secs(15), async {
        for i in 0.. {
            let audience = format!("after-rotation-{i}");
            if let Ok(t) = client.fetch_jwt_svid([audience.as_str()], None).await
                && t.key_id() != svid.key_id()
            {
                return (t, audience);
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
        unreachable!()
    })
    .await
    .expect("a token under the new authority's key");
    let bundles = client.fetch_jwt_bundles().await.unwrap();
    spiffe::JwtSvid::parse_and_validate(rotated.token(), &bundles, &[audience.as_str()])
        .expect("the new key verifies");
    // The old token still verifies: the old authority's key stays while it retires.
    spiffe::JwtSvid::parse_and_validate(svid.token(), &bundles, &["db"])
        .expect("the old key is still published");
    // The old authority retired by force: its key leaves the bundle, and the first token, still
    // cached and fresh, is no longer handed out (it verifies nowhere); a new one is.
    meshid_ca::rotation::retire(ca.dir.path(), &[ca.admin_addr], true)
        .await
        .expect("retire");
    tokio::time::timeout(Duration::from_secs(15), async {
        while count(&keys.message().await.unwrap().unwrap()) != 1 {}
    })
    .await
    .expect("the old key leaves the JWT bundle");
    let fetched = tokio::time::timeout(Duration::from_secs(15), async {
        loop {
            if let Ok(t) = client.fetch_jwt_svid(["db", "cache"], None).await {
                return t;
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    })
    .await
    .expect("a token after the retirement");
    assert_ne!(fetched.key_id(), svid.key_id(), "the retired key's token");
    let bundles = client.fetch_jwt_bundles().await.unwrap();
    spiffe::JwtSvid::parse_and_validate(fetched.token(), &bundles, &["db"])
        .expect("a token fetched after the retirement verifies under the fetched bundles");
    assert!(spiffe::JwtSvid::parse_and_validate(svid.token(), &bundles, &["db"]).is_err());

    let metrics = s.metrics().await;
    assert!(
        metrics.contains(r#"meshid_sidecar_jwt_svid_requests_total{result="issued"}"#),
        "{metrics}"
    );

    // The identity is revoked: a token signed before is refused by ValidateJWTSVID once the
    // sidecar holds the revocation, and the CA issues no new one.
    let mut list = meshid_ca::revocations::Revocations::default();
    list.revoke(
        meshid_identity::revocation::Revoked::Id(meshid_identity::SpiffeId::parse(ID).unwrap()),
        meshid_runtime::time::unix_now(),
        3600,
        "test".into(),
    )
    .unwrap();
    list.save(ca.dir.path()).unwrap();
    let refused = tokio::time::timeout(Duration::from_secs(15), async {
        loop {
            match raw
                .validate_jwtsvid(validate(&audience, rotated.token()))
                .await
            {
                Err(refused) => return refused,
                Ok(_) => tokio::time::sleep(Duration::from_millis(100)).await,
            }
        }
    })
    .await
    .expect("the revocation reaches the sidecar");
    assert_eq!(refused.code(), tonic::Code::InvalidArgument, "{refused:?}");
    assert!(refused.message().contains("revoked"), "{refused:?}");
    assert!(
        client
            .fetch_jwt_svid(["after-revocation"], None)
            .await
            .is_err(),
        "no JWT-SVID for a revoked identity"
    );
}

/// A JWT-SVID names the lineage of the sidecar's certificate it was issued on: revoking that
/// lineage's serial (`meshid-ca revoke --serial`) refuses the token in ValidateJWTSVID once the
/// sidecar holds the revocation, as revoking the identity does (before, such a token validated
/// until it expired).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_jwt_svid_is_refused_once_its_certificate_lineage_is_revoked() {
    let ca = TestCa::start(CaOptions::default()).await;
    let api = api_sidecar(Some(ca_mode(&ca, Duration::from_secs(3600))), "spiffe").await;
    let socket = api.socket.clone();
    let s = &api.sidecar;
    let client = WorkloadApiClient::connect_to(format!("unix:{}", socket.display()))
        .await
        .unwrap();
    let svid = tokio::time::timeout(Duration::from_secs(10), client.fetch_jwt_svid(["db"], None))
        .await
        .expect("a JWT-SVID within 10 s")
        .expect("a valid JWT-SVID");
    // The sidecar's first certificate (it lives an hour): its serial is its lineage's.
    let admin = s.admin;
    let (_, body) =
        tokio::task::spawn_blocking(move || meshid_tests::process::http_get(admin, "/identity"))
            .await
            .unwrap()
            .expect("/identity");
    let serial = body
        .split("\"serial\":\"")
        .nth(1)
        .and_then(|rest| rest.split('"').next())
        .unwrap_or_else(|| panic!("a serial in /identity: {body}"));
    let serial = meshid_identity::revocation::normalize_serial(serial).unwrap();
    let mut raw = raw_client(&socket, true).await;
    let validate = || ValidateJwtsvidRequest {
        audience: "db".into(),
        svid: svid.token().to_owned(),
    };
    let ok = raw.validate_jwtsvid(validate()).await.unwrap().into_inner();
    let claims = ok.claims.expect("claims");
    let lineage = format!("{:?}", claims.fields.get("meshid_lineage"));
    assert!(
        lineage.contains(&format!("StringValue({serial:?})")),
        "the token names the lineage {serial}: {claims:?}"
    );

    let mut list = meshid_ca::revocations::Revocations::default();
    list.revoke(
        meshid_identity::revocation::Revoked::Serial(serial.clone()),
        meshid_runtime::time::unix_now(),
        3600,
        "test".into(),
    )
    .unwrap();
    list.save(ca.dir.path()).unwrap();
    let refused = tokio::time::timeout(Duration::from_secs(15), async {
        loop {
            match raw.validate_jwtsvid(validate()).await {
                Err(refused) => return refused,
                Ok(_) => tokio::time::sleep(Duration::from_millis(100)).await,
            }
        }
    })
    .await
    .expect("the revocation reaches the sidecar");
    assert_eq!(refused.code(), tonic::Code::InvalidArgument, "{refused:?}");
    assert!(refused.message().contains("revoked"), "{refused:?}");
    assert!(refused.message().contains(&serial), "{refused:?}");
}

/// The serial of `leaf` as revocations name it.
fn serial_of(leaf: &[u8]) -> String {
    let cert = x509_parser::parse_x509_certificate(leaf).unwrap().1;
    let hex: String = cert
        .raw_serial()
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect();
    meshid_identity::revocation::normalize_serial(&hex).unwrap()
}

/// Writes `entry` into the CA directory's revocation list, as `meshid-ca revoke` does.
fn revoke(ca: &TestCa, entry: meshid_identity::revocation::Revoked) {
    let dir = ca.dir.path();
    let mut list = meshid_ca::revocations::Revocations::load(dir).unwrap();
    list.revoke(entry, meshid_runtime::time::unix_now(), 3600, "test".into())
        .unwrap();
    list.save(dir).unwrap();
}

/// The app's SVID is the key most likely to leak (the app holds it in the clear). Once its serial
/// is revoked, every meshid peer refuses it: the sidecar streams the app a new one (a new serial
/// and key) instead of handing out the revoked one until its own renewal, half its life away (an
/// hour here). Once the identity itself is revoked, no new one comes: the stream tells the app to
/// stop using the one it holds.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_revoked_app_svid_is_replaced_and_a_revoked_identity_gets_none() {
    let ca = TestCa::start(CaOptions::default()).await;
    let api = api_sidecar(Some(ca_mode(&ca, Duration::from_secs(3600))), "spiffe").await;
    let client = WorkloadApiClient::connect_to(format!("unix:{}", api.socket.display()))
        .await
        .expect("rust-spiffe connects");
    let mut stream = client.stream_x509_svids().await.expect("stream");
    let first = tokio::time::timeout(Duration::from_secs(10), stream.next())
        .await
        .expect("an SVID within 10 s")
        .unwrap()
        .unwrap();
    let serial = serial_of(first.leaf().as_bytes());
    revoke(
        &ca,
        meshid_identity::revocation::Revoked::Serial(serial.clone()),
    );
    let next = tokio::time::timeout(Duration::from_secs(15), stream.next())
        .await
        .expect("a new SVID once the old one's serial is revoked")
        .unwrap()
        .unwrap();
    assert_eq!(next.spiffe_id().to_string(), ID);
    assert_ne!(
        serial_of(next.leaf().as_bytes()),
        serial,
        "a new certificate"
    );
    assert_ne!(
        first.private_key().as_bytes(),
        next.private_key().as_bytes(),
        "a new key"
    );
    // A new call is handed the new one too.
    let (chain, _) = fetch_app_svid(&api.socket).await;
    assert_ne!(serial_of(chain[0].as_ref()), serial);

    revoke(
        &ca,
        meshid_identity::revocation::Revoked::Id(SpiffeId::parse(ID).unwrap()),
    );
    let ended = tokio::time::timeout(Duration::from_secs(15), stream.next())
        .await
        .expect("the stream says something once the identity is revoked");
    assert!(
        !matches!(ended, Some(Ok(_))),
        "no SVID of a revoked identity is handed out: {ended:?}"
    );
}

/// py-spiffe's JWT side: a JWT-SVID for the audience asked for, the JWT bundle, the token verified
/// offline by py-spiffe (PyJWT) under that bundle and by the sidecar's ValidateJWTSVID; a request
/// without an audience and a changed token are refused.
const PY_SPIFFE_JWT: &str = r#"
from spiffe import JwtSvid, TrustDomain, WorkloadApiClient

client = WorkloadApiClient()
svid = client.fetch_jwt_svid(audience={"db"}, timeout=10)
print("jwt", svid.spiffe_id, sorted(svid.audience))
bundle = client.fetch_jwt_bundles(timeout=10).get_bundle_for_trust_domain(TrustDomain("cluster.local"))
print("keys", len(bundle.jwt_authorities))
offline = JwtSvid.parse_and_validate(svid.token, bundle, {"db"})
print("offline", offline.spiffe_id)
print("validated", client.validate_jwt_svid(svid.token, "db", timeout=10).spiffe_id)
try:
    client.fetch_jwt_svid(audience=set(), timeout=10)
    print("empty audience accepted")
except Exception as e:
    print("empty audience refused")
head, claims, sig = svid.token.split(".")
try:
    client.validate_jwt_svid(head + "." + claims[::-1] + "." + sig, "db", timeout=10)
    print("tampered accepted")
except Exception as e:
    print("tampered refused")
client.close()
"#;

#[cfg_attr(
    not(have_py_spiffe),
    ignore = "python3 with py-spiffe (`spiffe` on PyPI) is not installed"
)]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn py_spiffe_fetches_and_verifies_jwt_svids() {
    let ca = TestCa::start(CaOptions::default()).await;
    let api = api_sidecar(Some(ca_mode(&ca, Duration::from_secs(3600))), "spiffe").await;
    let socket = api.socket.clone();
    let dir = &api.dir;
    let (ok, out) = run_python(dir.path(), PY_SPIFFE_JWT, &socket).await;
    assert!(ok, "{out}");
    for line in [
        format!("jwt {ID} ['db']"),
        "keys 1".to_owned(),
        format!("offline {ID}"),
        format!("validated {ID}"),
        "empty audience refused".to_owned(),
        "tampered refused".to_owned(),
    ] {
        assert!(out.contains(&line), "{line} not in\n{out}");
    }
}

/// The app's X.509-SVID (cert chain and key) as rust-spiffe fetches it from `socket`.
async fn fetch_app_svid(socket: &Path) -> (Vec<CertificateDer<'static>>, PrivateKeyDer<'static>) {
    let client = WorkloadApiClient::connect_to(format!("unix:{}", socket.display()))
        .await
        .expect("rust-spiffe connects");
    let svid = tokio::time::timeout(Duration::from_secs(10), client.fetch_x509_svid())
        .await
        .expect("an SVID within 10 s")
        .expect("a valid X509-SVID");
    let chain = svid
        .cert_chain()
        .iter()
        .map(|c| CertificateDer::from(c.as_bytes().to_vec()))
        .collect();
    let key = PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(
        svid.private_key().as_bytes().to_vec(),
    ));
    (chain, key)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_apps_svid_serves_peers_but_is_no_credential_at_the_ca() {
    use meshid_identity::policy::Protocol;
    use meshid_proto::ca::v1::{IssueJwtSvidRequest, IssueRequest, WatchTrustBundleRequest};
    use meshid_tests::mesh::{echo_roundtrip, eventually, tcp_echo};

    const PEER: &str = "spiffe://cluster.local/ns/shop/sa/backend";
    let ca = TestCa::start(CaOptions::default()).await;
    let api = api_sidecar(Some(ca_mode(&ca, Duration::from_secs(600))), "spiffe").await;
    let socket = api.socket.clone();
    let pki = &api.pki;
    let dir = &api.dir;
    let s = &api.sidecar;
    let (chain, key) = fetch_app_svid(&socket).await;

    // Marked as the app's, and no longer-lived than the sidecar's own certificate.
    let app = meshid_identity::cert_identity_from_der(&chain[0]).unwrap();
    let own = s.running.as_ref().unwrap().shared.creds.current().unwrap();
    assert!(app.app_svid && !own.identity.app_svid);
    assert_eq!(app.id.as_str(), ID);
    assert!(app.not_after <= own.identity.not_after, "{app:?}");

    // Presented to the CA (the TLS handshake takes it), it is no credential.
    let mut liar = ca
        .client_with_cert(chain.clone(), key.clone_key())
        .await
        .expect("the handshake takes the app's SVID");
    let refused_as_app_svid = |what: &str, status: tonic::Status| {
        assert_eq!(
            status.code(),
            tonic::Code::PermissionDenied,
            "{what}: {status:?}"
        );
        assert!(status.message().contains("app SVID"), "{what}: {status:?}");
    };
    for app_svid in [false, true] {
        let renewal = IssueRequest {
            csr: meshid_tests::pki::WorkloadKey::new().csr,
            credential: None,
            ttl_seconds: 0,
            app_svid,
        };
        refused_as_app_svid("renewal", liar.issue(renewal).await.unwrap_err());
    }
    let jwt = IssueJwtSvidRequest {
        audience: vec!["db".into()],
    };
    refused_as_app_svid("JWT-SVID", liar.issue_jwt_svid(jwt).await.unwrap_err());
    let watch = WatchTrustBundleRequest {
        instance_id: "app".into(),
        file_mode: false,
    };
    refused_as_app_svid(
        "bundle stream",
        liar.watch_trust_bundle(watch).await.unwrap_err(),
    );
    // The CA's view has no instance for the app's key; the sidecar's own stream is there.
    let app_key = meshid_ca::service::instance_key(&chain[0]).unwrap();
    let own_key = own.public_key_sha256.clone();
    assert!(
        eventually(Duration::from_secs(10), || async {
            let report = meshid_ca::rotation::status(ca.dir.path(), &[ca.admin_addr])
                .await
                .unwrap();
            assert!(
                report
                    .sidecars
                    .iter()
                    .all(|i| !app_key.starts_with(&i.instance)),
                "{:?}",
                report.sidecars
            );
            report
                .sidecars
                .iter()
                .any(|i| own_key.starts_with(&i.instance))
        })
        .await,
        "the sidecar's own instance registers"
    );

    // A peer sidecar takes it for mTLS.
    let peer = TestSidecar::start(
        pki,
        &pki.workload(PEER),
        PEER,
        SidecarSpec {
            inbound: vec![("127.0.0.41", tcp_echo().await, Protocol::Tcp)],
            policy: Some(format!(
                "inbound:\n  - port: {{port0}}\n    protocol: tcp\n    allow:\n      - id: {ID}\n"
            )),
            creds: Some(ca.sidecar_creds("shop", "backend", Duration::from_secs(600))),
            ..Default::default()
        },
    )
    .await;
    let provider = std::sync::Arc::new(rustls::crypto::aws_lc_rs::default_provider());
    let anchors = meshid_identity::verify::Anchors::new(
        &ca.roots,
        meshid_identity::TrustDomain::new("cluster.local").unwrap(),
    )
    .unwrap();
    let verifier = meshid_identity::verify::SpiffeServerVerifier::new(
        anchors,
        meshid_identity::SpiffeId::parse(PEER).unwrap(),
        &provider,
    );
    let config = std::sync::Arc::new(
        rustls::ClientConfig::builder_with_provider(provider)
            .with_protocol_versions(&[&rustls::version::TLS13])
            .unwrap()
            .dangerous()
            .with_custom_certificate_verifier(std::sync::Arc::new(verifier))
            .with_client_auth_cert(chain.clone(), key.clone_key())
            .unwrap(),
    );
    let addr = peer.inbound[0];
    assert!(
        eventually(Duration::from_secs(15), || {
            let config = config.clone();
            async move { echo_roundtrip(addr, config, b"hi").await.as_deref() == Ok(b"hi".as_slice()) }
        })
        .await,
        "the peer serves the app's SVID"
    );

    // And openssl takes it for both TLS usages.
    meshid_tests::tools::require("openssl", "apt-get install openssl");
    {
        let pem = meshid_tests::pki::pem;
        let path = |n: &str| dir.path().join(n).to_str().unwrap().to_owned();
        std::fs::write(path("root.pem"), pem(&ca.roots[0])).unwrap();
        std::fs::write(path("inter.pem"), pem(&chain[1])).unwrap();
        std::fs::write(path("leaf.pem"), pem(&chain[0])).unwrap();
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
    }
}

/// Requests on the Workload API are small: one larger than `MAX_REQUEST_BYTES` (tonic's default
/// would take 4 MiB) is refused with `OUT_OF_RANGE` naming the limit, and the API goes on.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_oversize_request_is_refused() {
    let api = api_sidecar(None, "api").await;
    let socket = api.socket.clone();
    let mut client = raw_client(&socket, true).await;
    let limit = meshid_sidecar::workload_api::MAX_REQUEST_BYTES;
    let refused = client
        .validate_jwtsvid(ValidateJwtsvidRequest {
            audience: "x".into(),
            svid: "a".repeat(limit + 1),
        })
        .await
        .expect_err("an oversize request");
    assert_eq!(refused.code(), tonic::Code::OutOfRange, "{refused:?}");
    assert!(
        refused.message().contains(&limit.to_string()),
        "{refused:?}"
    );
    // A request of normal size is still answered (a bad token, but read and checked).
    let answered = client
        .validate_jwtsvid(ValidateJwtsvidRequest {
            audience: "x".into(),
            svid: "a".repeat(1024),
        })
        .await
        .expect_err("not a token");
    // File mode: refused for want of a CA, after the request was read.
    assert_eq!(
        answered.code(),
        tonic::Code::PermissionDenied,
        "{answered:?}"
    );
}

/// A raw h2 connection to the Workload API socket, and the task driving it (it ends when the
/// sidecar closes the connection).
async fn raw_h2(
    socket: &Path,
) -> (
    h2::client::SendRequest<bytes::Bytes>,
    tokio::task::JoinHandle<Result<(), h2::Error>>,
) {
    let unix = tokio::net::UnixStream::connect(socket).await.unwrap();
    let (h2, connection) = h2::client::handshake(unix).await.unwrap();
    (h2, tokio::spawn(connection))
}

/// Starts a call of `method` over `h2` (its headers sent, its message not yet).
async fn raw_request(
    h2: &h2::client::SendRequest<bytes::Bytes>,
    method: &str,
) -> (h2::client::ResponseFuture, h2::SendStream<bytes::Bytes>) {
    let request = http::Request::post(format!("http://localhost/SpiffeWorkloadAPI/{method}"))
        .header("content-type", "application/grpc")
        .header("te", "trailers")
        .header("workload.spiffe.io", "true")
        .body(())
        .unwrap();
    h2.clone()
        .ready()
        .await
        .unwrap()
        .send_request(request, false)
        .unwrap()
}

/// Calls `method` with an empty message over `h2`; returns the response body once its head is in.
async fn raw_call(h2: &h2::client::SendRequest<bytes::Bytes>, method: &str) -> h2::RecvStream {
    let (response, mut body) = raw_request(h2, method).await;
    body.send_data(bytes::Bytes::from_static(&[0, 0, 0, 0, 0]), true)
        .unwrap();
    let response = response.await.unwrap();
    // A stream's head carries no status: only an answer at once (an error) does.
    assert!(
        method.starts_with("Validate") || !response.headers().contains_key("grpc-status"),
        "{method}: {response:?}"
    );
    response.into_body()
}

/// A sidecar serving the Workload API at `api/workload.sock` in the returned directory, with an
/// `--idle-timeout` of one second.
async fn sidecar_idle_after_a_second() -> (TestPki, tempfile::TempDir, TestSidecar) {
    let pki = TestPki::new();
    let dir = tempfile::tempdir().unwrap();
    let sidecar = TestSidecar::start(
        &pki,
        &pki.workload(ID),
        ID,
        SidecarSpec {
            workload_api: Some(dir.path().join("api").join("workload.sock")),
            limits: Some(meshid_sidecar::settings::Limits {
                idle_timeout: Duration::from_secs(1),
                ..Default::default()
            }),
            ..Default::default()
        },
    )
    .await;
    (pki, dir, sidecar)
}

/// A connection with no call open for the sidecar's `--idle-timeout` is closed (one left open
/// after a call would otherwise hold one of the socket's connections for good); one holding a
/// watching stream (`FetchX509Bundles`) is never idle and stays, and still takes calls.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idle_connections_are_closed_but_not_those_with_a_watching_stream() {
    let (_pki, dir, _s) = sidecar_idle_after_a_second().await;
    let socket = dir.path().join("api").join("workload.sock");

    let (watching, watching_conn) = raw_h2(&socket).await;
    let mut bundles = raw_call(&watching, "FetchX509Bundles").await;
    let first = bundles.data().await.expect("a bundle").unwrap();
    assert!(!first.is_empty());

    // Opened after the watching connection, one call, then nothing.
    let (idle, idle_conn) = raw_h2(&socket).await;
    let mut answer = raw_call(&idle, "ValidateJWTSVID").await;
    while answer.data().await.is_some() {}
    drop(answer);
    let _closed = tokio::time::timeout(Duration::from_secs(10), idle_conn)
        .await
        .expect("the idle connection is closed");

    // The watching connection has been open longer than the idle one: it stays, with its stream.
    assert!(
        !watching_conn.is_finished(),
        "the watching connection stays"
    );
    let mut again = raw_call(&watching, "FetchX509Bundles").await;
    assert!(again.data().await.is_some(), "it still takes calls");
    drop(bundles);
}

/// A call whose request never ends (its HEADERS sent, its message never finished) is no call for
/// the idle timeout: a local process that stalled one on every connection the socket takes (each
/// connection proven by its call's headers, so never displaced) held every slot for ever, and the
/// app's next connection was closed at accept. Now those connections are idle, closed after the
/// sidecar's `--idle-timeout`, and the app gets in.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn calls_whose_request_never_ends_cannot_keep_the_app_out() {
    let (_pki, dir, _s) = sidecar_idle_after_a_second().await;
    let socket = dir.path().join("api").join("workload.sock");

    let mut stalled = Vec::new();
    // Every connection the app's user may hold (the test runs as the app's user).
    for _ in 0..meshid_sidecar::workload_api::MAX_CONNECTIONS_PER_USER {
        let (h2, conn) = raw_h2(&socket).await;
        let (response, mut body) = raw_request(&h2, "FetchJWTSVID").await;
        // Half a message header, then nothing: the request never ends.
        body.send_data(bytes::Bytes::from_static(&[0, 0]), false)
            .unwrap();
        stalled.push((h2, conn, response, body));
    }
    // Every stalled call's headers passed on (each connection proven) before the app comes.
    tokio::time::sleep(Duration::from_millis(300)).await;
    let bundles = async {
        loop {
            let answered = async {
                let Ok(mut client) = try_raw_client(&socket, true).await else {
                    // Closed at accept: every connection the socket takes is held.
                    return Ok(None);
                };
                let mut bundles = client
                    .fetch_x509_bundles(X509BundlesRequest {})
                    .await?
                    .into_inner();
                bundles.message().await
            };
            match tokio::time::timeout(Duration::from_secs(2), answered).await {
                Ok(Ok(Some(first))) => return first,
                _ => tokio::time::sleep(Duration::from_millis(200)).await,
            }
        }
    };
    let first = tokio::time::timeout(Duration::from_secs(15), bundles)
        .await
        .expect("the app answered within 15 s while stalled calls held every connection");
    assert!(first.bundles.contains_key("spiffe://cluster.local"));
    // The stalled connections were closed as idle.
    for (_, conn, _, _) in stalled {
        tokio::time::timeout(Duration::from_secs(10), conn)
            .await
            .expect("a connection with a stalled call is closed as idle")
            .unwrap()
            .ok();
    }
}

/// As at the CA: a connection whose streams h2 keeps resetting for the client's own protocol
/// errors (DATA past the request's `content-length`) is sent GOAWAY `ENHANCE_YOUR_CALM` after
/// 1024 of them (CVE-2025-8671), instead of resetting streams for as long as it likes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_connection_that_keeps_provoking_stream_resets_is_sent_away() {
    let api = api_sidecar(None, "api").await;
    let socket = api.socket.clone();
    let (mut h2, connection) = raw_h2(&socket).await;
    let mut reset = 0;
    for _ in 0..1024 + 256 {
        let Ok(ready) = h2.ready().await else { break };
        h2 = ready;
        let request = http::Request::post("http://localhost/SpiffeWorkloadAPI/ValidateJWTSVID")
            .header("content-type", "application/grpc")
            .header("content-length", "1")
            .body(())
            .unwrap();
        let Ok((response, mut body)) = h2.send_request(request, false) else {
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
    let error = tokio::time::timeout(Duration::from_secs(10), connection)
        .await
        .unwrap_or_else(|_| panic!("the connection is still open after {reset} resets"))
        .unwrap()
        .expect_err("the connection ended without an error");
    assert_eq!(
        error.reason(),
        Some(h2::Reason::ENHANCE_YOUR_CALM),
        "{error:?}"
    );
    assert!(reset >= 1024, "sent away after {reset} resets, before 1024");
}
