//! Data-plane fixtures: a CA directory that mints workload certificates (good and hostile), in-process
//! sidecars, example apps (TCP echo, HTTP echo), and mTLS clients.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::Request;
use hyper_util::rt::{TokioExecutor, TokioIo};
use meshid_ca::authority::{self, Authority, pem_cert};
use meshid_ca::csr::CsrPublicKey;
use meshid_ca::signer::sign_leaf;
use meshid_identity::policy::Protocol;
use meshid_identity::verify::{Anchors, SpiffeServerVerifier};
use meshid_identity::{SpiffeId, TrustDomain};
use meshid_sidecar::run::RunningSidecar;
use meshid_sidecar::settings::{CredSource, FileCreds, Inbound, Limits, Outbound, RunConfig};
use prometheus_client::registry::Registry;
use rcgen::{CertificateParams, KeyPair, SanType};
use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer, ServerName};
use tempfile::TempDir;
use time::OffsetDateTime;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

use crate::pki::WorkloadKey;

/// A certificate and key, in memory and as PEM files.
#[derive(Clone)]
pub struct Workload {
    pub chain: Vec<CertificateDer<'static>>,
    pub key_der: Vec<u8>,
    pub cert_path: PathBuf,
    pub key_path: PathBuf,
}

impl Workload {
    pub fn key(&self) -> PrivateKeyDer<'static> {
        PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(self.key_der.clone()))
    }

    /// A TLS server presenting this chain (whatever it is), offering `alpn`, asking for no
    /// client certificate: an upstream as the outbound sees it.
    pub fn upstream_acceptor(&self, alpn: &[&[u8]]) -> tokio_rustls::TlsAcceptor {
        let mut config = rustls::ServerConfig::builder_with_provider(Arc::new(
            rustls::crypto::aws_lc_rs::default_provider(),
        ))
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_no_client_auth()
        .with_single_cert(self.chain.clone(), self.key())
        .unwrap();
        config.alpn_protocols = alpn.iter().map(|p| p.to_vec()).collect();
        tokio_rustls::TlsAcceptor::from(Arc::new(config))
    }
}

/// A CA directory that mints certificates for tests.
pub struct TestPki {
    pub dir: TempDir,
    pub authority: Authority,
    pub trust_domain: TrustDomain,
    pub bundle_path: PathBuf,
    counter: std::sync::atomic::AtomicUsize,
}

impl TestPki {
    /// A fresh CA for `cluster.local`.
    pub fn new() -> Self {
        Self::with_trust_domain("cluster.local")
    }

    pub fn with_trust_domain(td: &str) -> Self {
        let dir = tempfile::tempdir().expect("tempdir");
        let trust_domain = TrustDomain::new(td).expect("td");
        authority::init(&dir.path().join("ca"), &trust_domain, None).expect("init");
        let authority = Authority::load(&dir.path().join("ca")).expect("load");
        let bundle_path = dir.path().join("ca/bundle.pem");
        Self {
            dir,
            authority,
            trust_domain,
            bundle_path,
            counter: Default::default(),
        }
    }

    pub fn roots(&self) -> Vec<CertificateDer<'static>> {
        self.authority.roots.clone()
    }

    /// `chain` and its key written as PEM files under this PKI's directory.
    pub fn write(&self, chain: Vec<CertificateDer<'static>>, key_der: Vec<u8>) -> Workload {
        let n = self
            .counter
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let cert_path = self.dir.path().join(format!("w{n}.pem"));
        let key_path = self.dir.path().join(format!("w{n}.key"));
        let pem: String = chain.iter().map(|c| pem_cert(c)).collect();
        std::fs::write(&cert_path, pem).expect("write cert");
        let key_pem = rcgen::KeyPair::try_from(key_der.as_slice())
            .expect("key")
            .serialize_pem();
        std::fs::write(&key_path, key_pem).expect("write key");
        Workload {
            chain,
            key_der,
            cert_path,
            key_path,
        }
    }

    /// A certificate for `id`, valid now for an hour.
    pub fn workload(&self, id: &str) -> Workload {
        self.workload_at(id, OffsetDateTime::now_utc(), Duration::from_secs(3600))
    }

    /// A certificate for `id` valid from `start` for `lifetime` (backdated as the CA does).
    pub fn workload_at(&self, id: &str, start: OffsetDateTime, lifetime: Duration) -> Workload {
        let w = WorkloadKey::new();
        let key = CsrPublicKey::from_csr_der(&w.csr).expect("csr");
        let issued = sign_leaf(
            &self.authority,
            &SpiffeId::parse(id).expect("id"),
            &key,
            lifetime,
            start,
        )
        .expect("sign");
        self.write(issued.chain, w.key.serialize_der())
    }

    /// A certificate signed by this CA with arbitrary SANs (to forge hostile identities).
    pub fn with_sans(&self, sans: Vec<SanType>) -> Workload {
        self.forge(|params| params.subject_alt_names = sans)
    }

    /// A leaf signed by this CA's intermediate, shaped by the test (see [`crate::pki::forge_leaf`]).
    pub fn forge(&self, shape: impl FnOnce(&mut CertificateParams)) -> Workload {
        let (chain, key) = crate::pki::forge_leaf(&self.authority, shape);
        self.write(chain, key)
    }

    /// A leaf for `id` below an extra certificate (see [`crate::pki::forge_below_extra_level`]).
    pub fn under_extra_level(
        &self,
        id: &str,
        shape_middle: impl FnOnce(&mut CertificateParams),
    ) -> Workload {
        let (chain, key) = crate::pki::forge_below_extra_level(&self.authority, id, shape_middle);
        self.write(chain, key)
    }

    /// The intermediate CA's own certificate and key, to present a CA certificate as a leaf.
    pub fn intermediate_as_leaf(&self) -> Workload {
        let key_pem =
            std::fs::read_to_string(self.dir.path().join("ca/intermediate.key")).expect("key");
        let key = KeyPair::from_pem(&key_pem).expect("key");
        self.write(
            vec![self.authority.intermediate_der.clone()],
            key.serialize_der(),
        )
    }
}

impl Default for TestPki {
    fn default() -> Self {
        Self::new()
    }
}

/// A sidecar running in this process.
pub struct TestSidecar {
    pub running: Option<RunningSidecar>,
    pub admin: SocketAddr,
    /// The stats server (`SidecarSpec::stats`).
    pub stats: Option<SocketAddr>,
    pub inbound: Vec<SocketAddr>,
    pub outbound: Vec<SocketAddr>,
    pub policy_path: PathBuf,
    pub id: SpiffeId,
    _dir: TempDir,
}

/// What a test sidecar serves.
#[derive(Default, Clone)]
pub struct SidecarSpec {
    /// (listen ip, app target, protocol); the port is chosen by the OS.
    pub inbound: Vec<(&'static str, SocketAddr, Protocol)>,
    /// (remote, expected id, protocol)
    pub outbound: Vec<(String, String, Protocol)>,
    /// Policy YAML; `None` starts with no policy file. Use `{port0}` for the first inbound port.
    pub policy: Option<String>,
    pub limits: Option<Limits>,
    /// Credentials from somewhere else than the workload's files (CA mode).
    pub creds: Option<CredSource>,
    /// File mode: the CA to report to (`--report-ca-addr`).
    pub report_to: Option<meshid_sidecar::settings::CaEndpoint>,
    /// Serve /metrics and /identity on a port of their own (`--stats-listen 127.0.0.1:0`).
    pub stats: bool,
    /// `--unready-on-policy-error`.
    pub unready_on_policy_error: bool,
    /// `--metrics-peer-identity`.
    pub metrics_peer_identity: bool,
    /// `proxy-v2` on every TCP inbound listener: the app gets a PROXY protocol v2 header first.
    pub proxy_protocol: bool,
    /// `--workload-api-socket`.
    pub workload_api: Option<PathBuf>,
}

/// A pod's downward-API annotations file as the injector writes it (values in Go's %q quoting):
/// one HTTP inbound port (`{port0}`, which the test sidecar fills in) allowing `client`, and the
/// app probes `probes` (the `meshid.io/app-probes` JSON).
pub fn probe_annotations(client: &str, probes: &str) -> String {
    let quoted = format!("{probes:?}");
    format!(
        "meshid.io/inject=\"enabled\"\nmeshid.io/inbound=\"{{port0}}=http\"\nmeshid.io/allow-{{port0}}=\"{client}\"\nmeshid.io/app-probes={quoted}\n"
    )
}

/// Binds a free port on `ip` and returns it (released; tests tolerate the small race).
pub fn free_port(ip: &str) -> u16 {
    crate::process::free_addr(ip).port()
}

impl TestSidecar {
    /// Starts a sidecar with `workload`'s credentials.
    /// The listen ports are picked free and released before the sidecar binds them, so another
    /// test's socket can take one meanwhile: a port found taken is picked again (a few times).
    pub async fn start(pki: &TestPki, workload: &Workload, id: &str, spec: SidecarSpec) -> Self {
        let mut tries = 0;
        loop {
            match Self::try_start(pki, workload, id, spec.clone()).await {
                Ok(sidecar) => return sidecar,
                Err(meshid_sidecar::run::StartError::Bind { source, .. })
                    if source.kind() == std::io::ErrorKind::AddrInUse && tries < 5 =>
                {
                    tries += 1;
                }
                Err(error) => panic!("start sidecar: {error}"),
            }
        }
    }

    /// [`TestSidecar::start`], returning why it did not start.
    pub async fn try_start(
        pki: &TestPki,
        workload: &Workload,
        id: &str,
        spec: SidecarSpec,
    ) -> Result<Self, meshid_sidecar::run::StartError> {
        let dir = tempfile::tempdir().expect("tempdir");
        let inbound: Vec<Inbound> = spec
            .inbound
            .iter()
            .map(|(ip, target, protocol)| Inbound {
                listen: SocketAddr::new(ip.parse().expect("ip"), free_port(ip)),
                target: *target,
                protocol: *protocol,
                proxy_protocol: spec.proxy_protocol && *protocol == Protocol::Tcp,
            })
            .collect();
        let policy_path = dir.path().join("policy.yaml");
        let policy = spec.policy.as_ref().map(|p| {
            let text = match inbound.first() {
                Some(i) => p.replace("{port0}", &i.listen.port().to_string()),
                None => p.clone(),
            };
            std::fs::write(&policy_path, text).expect("write policy");
            policy_path.clone()
        });
        let outbound = spec
            .outbound
            .iter()
            .map(|(remote, expected, protocol)| Outbound {
                local: SocketAddr::from(([127, 0, 0, 1], free_port("127.0.0.1"))),
                remote: remote.clone(),
                expected: SpiffeId::parse(expected).expect("expected id"),
                protocol: *protocol,
            })
            .collect();
        let config = RunConfig {
            inbound,
            outbound,
            policy,
            admin_listen: "127.0.0.1:0".parse().expect("addr"),
            stats_listen: spec.stats.then(|| "127.0.0.1:0".parse().expect("addr")),
            unready_on_policy_error: spec.unready_on_policy_error,
            remote_decisions: false,
            metrics_peer_identity: spec.metrics_peer_identity,
            workload_api: spec.workload_api.clone(),
            creds: spec.creds.clone().unwrap_or_else(|| {
                CredSource::Files(FileCreds {
                    cert: workload.cert_path.clone(),
                    key: workload.key_path.clone(),
                    bundle: pki.bundle_path.clone(),
                })
            }),
            report_to: spec.report_to.clone(),
            limits: spec.limits.unwrap_or_default(),
        };
        let mut registry = Registry::default();
        let running = meshid_sidecar::run::start(config, &mut registry).await?;
        Ok(Self {
            admin: running.admin_addr,
            stats: running.stats_addr,
            inbound: running.inbound_addrs.clone(),
            outbound: running.outbound_addrs.clone(),
            running: Some(running),
            policy_path,
            id: SpiffeId::parse(id).expect("id"),
            _dir: dir,
        })
    }

    /// Replaces the policy file atomically (as a ConfigMap update would).
    pub fn write_policy(&self, yaml: &str) {
        let yaml = yaml.replace("{port0}", &self.inbound[0].port().to_string());
        let tmp = self.policy_path.with_extension("tmp");
        std::fs::write(&tmp, yaml).expect("write");
        std::fs::rename(&tmp, &self.policy_path).expect("rename");
    }

    /// The admin server's `/metrics` text.
    pub async fn metrics(&self) -> String {
        let admin = self.admin;
        tokio::task::spawn_blocking(move || crate::process::http_get(admin, "/metrics"))
            .await
            .expect("join")
            .map(|(_, body)| body)
            .unwrap_or_default()
    }

    pub async fn shutdown(&mut self) {
        if let Some(r) = self.running.take() {
            r.shutdown().await;
        }
    }
}

/// An mTLS client config presenting `client` (if any) and accepting only a server with `server_id`.
pub fn client_config(
    pki_roots: &[CertificateDer<'static>],
    trust_domain: &TrustDomain,
    client: Option<&Workload>,
    server_id: &SpiffeId,
    alpn: &[&[u8]],
) -> Arc<rustls::ClientConfig> {
    let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
    let anchors = Anchors::new(pki_roots, trust_domain.clone()).expect("anchors");
    let verifier = SpiffeServerVerifier::new(anchors, server_id.clone(), &provider);
    let builder = rustls::ClientConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13])
        .expect("versions")
        .dangerous()
        .with_custom_certificate_verifier(Arc::new(verifier));
    let mut config = match client {
        Some(w) => builder
            .with_client_auth_cert(w.chain.clone(), w.key())
            .expect("client cert"),
        None => builder.with_no_client_auth(),
    };
    config.alpn_protocols = alpn.iter().map(|a| a.to_vec()).collect();
    Arc::new(config)
}

/// Connects with mTLS and returns the stream, or the handshake error text.
pub async fn mtls_connect(
    addr: SocketAddr,
    config: Arc<rustls::ClientConfig>,
) -> Result<tokio_rustls::client::TlsStream<TcpStream>, String> {
    let tcp = TcpStream::connect(addr).await.map_err(|e| e.to_string())?;
    tokio_rustls::TlsConnector::from(config)
        .connect(ServerName::try_from("sidecar.invalid").expect("name"), tcp)
        .await
        .map_err(|e| e.to_string())
}

/// Sends `msg` over a TLS connection, half-closes, and reads everything back. In TLS 1.3 the server
/// judges the client certificate after the client's handshake finished, so a refusal shows up here.
pub async fn echo_roundtrip(
    addr: SocketAddr,
    config: Arc<rustls::ClientConfig>,
    msg: &[u8],
) -> Result<Vec<u8>, String> {
    let mut tls = mtls_connect(addr, config).await?;
    tls.write_all(msg).await.map_err(|e| e.to_string())?;
    tls.shutdown().await.map_err(|e| e.to_string())?;
    let mut back = Vec::new();
    match tokio::time::timeout(Duration::from_secs(10), tls.read_to_end(&mut back)).await {
        Ok(Ok(_)) => Ok(back),
        Ok(Err(e)) => Err(e.to_string()),
        Err(_) => Err("timed out".into()),
    }
}

/// A TCP echo app on 127.0.0.1 (the example app).
pub async fn tcp_echo() -> SocketAddr {
    let l = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = l.local_addr().expect("addr");
    tokio::spawn(meshid_examples::tcp_echo(l));
    addr
}

/// The example HTTP app (HTTP/1.1 and h2c) on 127.0.0.1: answers
/// `<method> <path> version=<v> host=<host> xfcc=<header> caller=<id> traceparent=<header>` and serves `/slow?ms=N` late.
pub async fn http_echo() -> SocketAddr {
    let l = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = l.local_addr().expect("addr");
    tokio::spawn(meshid_examples::http_echo(l));
    addr
}

/// Sends one HTTP request over an established stream with HTTP/1.1 or h2.
pub async fn http_request<IO>(
    io: IO,
    h2: bool,
    req: Request<Full<Bytes>>,
) -> Result<(u16, hyper::HeaderMap, String), String>
where
    IO: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    let (status, headers, body, _) = http_exchange(io, h2, req).await?;
    Ok((status, headers, body))
}

/// [`http_request`], with the response's trailers (empty when it had none).
pub async fn http_exchange<IO>(
    io: IO,
    h2: bool,
    req: Request<Full<Bytes>>,
) -> Result<(u16, hyper::HeaderMap, String, hyper::HeaderMap), String>
where
    IO: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    let io = TokioIo::new(io);
    let resp = if h2 {
        let (mut send, conn) = hyper::client::conn::http2::handshake(TokioExecutor::new(), io)
            .await
            .map_err(|e| e.to_string())?;
        tokio::spawn(conn);
        send.send_request(req).await.map_err(|e| e.to_string())?
    } else {
        let (mut send, conn) = hyper::client::conn::http1::handshake(io)
            .await
            .map_err(|e| e.to_string())?;
        tokio::spawn(conn);
        send.send_request(req).await.map_err(|e| e.to_string())?
    };
    let status = resp.status().as_u16();
    let headers = resp.headers().clone();
    let collected = resp
        .into_body()
        .collect()
        .await
        .map_err(|e| e.to_string())?;
    let trailers = collected.trailers().cloned().unwrap_or_default();
    let body = collected.to_bytes();
    Ok((
        status,
        headers,
        String::from_utf8_lossy(&body).into_owned(),
        trailers,
    ))
}

/// A GET request for `path` with extra headers.
pub fn get(path: &str, headers: &[(&str, &str)]) -> Request<Full<Bytes>> {
    let mut b = Request::builder().uri(path).header("host", "app.example");
    for (k, v) in headers {
        b = b.header(*k, *v);
    }
    b.body(Full::new(Bytes::new())).expect("request")
}

/// Polls `f` until it returns true or `timeout` passes.
pub async fn eventually<F, Fut>(timeout: Duration, mut f: F) -> bool
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let deadline = tokio::time::Instant::now() + timeout;
    while tokio::time::Instant::now() < deadline {
        if f().await {
            return true;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    false
}

/// Reads a PEM bundle path into DER roots.
pub fn read_roots(path: &Path) -> Vec<CertificateDer<'static>> {
    authority::read_bundle(path).expect("bundle")
}

/// HTTP requests through a local listener, one connection each, every 25 ms until stopped; counts
/// what succeeded (200, and the body holds `expect` when given) and what failed.
pub struct Traffic {
    stop: Arc<std::sync::atomic::AtomicBool>,
    ok: Arc<std::sync::atomic::AtomicUsize>,
    failed: Arc<std::sync::atomic::AtomicUsize>,
    task: tokio::task::JoinHandle<()>,
}

impl Traffic {
    pub fn start(local: SocketAddr, expect: Option<String>) -> Self {
        use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
        let stop = Arc::new(AtomicBool::new(false));
        let (ok, failed) = (Arc::new(AtomicUsize::new(0)), Arc::new(AtomicUsize::new(0)));
        let task = {
            let (stop, ok, failed) = (stop.clone(), ok.clone(), failed.clone());
            tokio::spawn(async move {
                while !stop.load(Ordering::Relaxed) {
                    let r = match TcpStream::connect(local).await {
                        Ok(tcp) => http_request(tcp, false, get("/orders", &[])).await,
                        Err(e) => Err(e.to_string()),
                    };
                    match r {
                        Ok((200, _, body))
                            if expect.as_deref().is_none_or(|e| body.contains(e)) =>
                        {
                            ok.fetch_add(1, Ordering::Relaxed)
                        }
                        other => {
                            eprintln!("request failed: {other:?}");
                            failed.fetch_add(1, Ordering::Relaxed)
                        }
                    };
                    tokio::time::sleep(Duration::from_millis(25)).await;
                }
            })
        };
        Self {
            stop,
            ok,
            failed,
            task,
        }
    }

    /// Stops the traffic and returns (succeeded, failed).
    pub async fn finish(self) -> (usize, usize) {
        use std::sync::atomic::Ordering;
        self.stop.store(true, Ordering::Relaxed);
        let _ = self.task.await;
        (
            self.ok.load(Ordering::Relaxed),
            self.failed.load(Ordering::Relaxed),
        )
    }
}

/// The sum of the samples of `name` (a metric name and its opening brace) whose labels include
/// every one of `labels`.
pub fn metric(text: &str, name: &str, labels: &[&str]) -> u64 {
    text.lines()
        .filter(|l| l.starts_with(name) && labels.iter().all(|want| l.contains(want)))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .map(|v| v as u64)
        .sum()
}

/// Reads one HTTP/1.x response framed by `Content-Length` from `io`, after the bytes already in
/// `pending` and leaving in it what follows: its status, its head (status line and headers) and
/// its body.
pub async fn read_response<IO: tokio::io::AsyncRead + Unpin>(
    io: &mut IO,
    pending: &mut Vec<u8>,
) -> Result<(u16, String, String), String> {
    let mut buf = [0u8; 4096];
    loop {
        if let Some(end) = pending.windows(4).position(|w| w == b"\r\n\r\n") {
            let head = String::from_utf8_lossy(&pending[..end]).to_string();
            let status: u16 = head
                .split(' ')
                .nth(1)
                .and_then(|s| s.parse().ok())
                .ok_or_else(|| format!("no status in {head:?}"))?;
            let len: usize = head
                .lines()
                .find_map(|l| {
                    let (k, v) = l.split_once(':')?;
                    k.eq_ignore_ascii_case("content-length")
                        .then(|| v.trim().parse().ok())?
                })
                .ok_or_else(|| format!("no content-length in {head:?}"))?;
            while pending.len() < end + 4 + len {
                let n = io.read(&mut buf).await.map_err(|e| e.to_string())?;
                if n == 0 {
                    return Err("closed mid-body".into());
                }
                pending.extend_from_slice(&buf[..n]);
            }
            let body = String::from_utf8_lossy(&pending[end + 4..end + 4 + len]).to_string();
            pending.drain(..end + 4 + len);
            return Ok((status, head, body));
        }
        let n = io.read(&mut buf).await.map_err(|e| e.to_string())?;
        if n == 0 {
            return Err(format!(
                "closed before a response: {:?}",
                String::from_utf8_lossy(pending)
            ));
        }
        pending.extend_from_slice(&buf[..n]);
    }
}

/// Reads one HTTP/1.x request as a test app does, after the bytes already in `pending` and leaving
/// in it what follows: its head (request line and headers, lowercased) and its `Content-Length`
/// body (none without one). `None` when the connection ends or fails first.
pub async fn read_request<IO: tokio::io::AsyncRead + Unpin>(
    io: &mut IO,
    pending: &mut Vec<u8>,
) -> Option<(String, Vec<u8>)> {
    let head = read_request_head(io, pending).await?;
    let body = read_request_body(io, pending, &head).await?;
    Some((head, body))
}

/// The head part of [`read_request`]: for an app that acts on a request before its body is in.
pub async fn read_request_head<IO: tokio::io::AsyncRead + Unpin>(
    io: &mut IO,
    pending: &mut Vec<u8>,
) -> Option<String> {
    let end = loop {
        if let Some(p) = pending.windows(4).position(|w| w == b"\r\n\r\n") {
            break p + 4;
        }
        fill(io, pending).await?;
    };
    let head = String::from_utf8_lossy(&pending[..end]).to_ascii_lowercase();
    pending.drain(..end);
    Some(head)
}

/// The body part of [`read_request`], for the (lowercased) `head` read before it.
pub async fn read_request_body<IO: tokio::io::AsyncRead + Unpin>(
    io: &mut IO,
    pending: &mut Vec<u8>,
    head: &str,
) -> Option<Vec<u8>> {
    let length: usize = head
        .lines()
        .find_map(|l| l.strip_prefix("content-length:"))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or(0);
    while pending.len() < length {
        fill(io, pending).await?;
    }
    Some(pending.drain(..length).collect())
}

/// One read onto the end of `pending`; `None` at the end of the stream or on an error.
async fn fill<IO: tokio::io::AsyncRead + Unpin>(io: &mut IO, pending: &mut Vec<u8>) -> Option<()> {
    let mut chunk = [0u8; 16 * 1024];
    match io.read(&mut chunk).await {
        Ok(0) | Err(_) => None,
        Ok(n) => {
            pending.extend_from_slice(&chunk[..n]);
            Some(())
        }
    }
}

/// The sidecar's `meshid_sidecar_tls_handshake_failures_total` lines in a `/metrics` text.
pub fn handshake_failure_lines(metrics: &str) -> Vec<&str> {
    metrics
        .lines()
        .filter(|l| l.starts_with("meshid_sidecar_tls_handshake_failures_total"))
        .collect()
}

/// Handshake failures counted for `direction` (`inbound`, `outbound`) and `reason`, over all ports.
pub fn handshake_failures(metrics: &str, direction: &str, reason: &str) -> u64 {
    let (direction, reason) = (
        format!("direction=\"{direction}\""),
        format!("reason=\"{reason}\"}}"),
    );
    handshake_failure_lines(metrics)
        .into_iter()
        .filter(|l| l.contains(&direction) && l.contains(&reason))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<u64>().ok())
        .sum()
}

/// TLS (no client certificate) to `addr` as the DNS name `name`, trusting only `roots`: how the API
/// server reaches the injector, or any plain client the CA.
pub async fn tls_connect(
    addr: SocketAddr,
    roots: &[CertificateDer<'static>],
    name: &str,
) -> std::io::Result<tokio_rustls::client::TlsStream<TcpStream>> {
    let mut store = rustls::RootCertStore::empty();
    for r in roots {
        store.add(r.clone()).map_err(std::io::Error::other)?;
    }
    let config = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::aws_lc_rs::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .map_err(std::io::Error::other)?
    .with_root_certificates(store)
    .with_no_client_auth();
    let name = ServerName::try_from(name.to_owned()).map_err(std::io::Error::other)?;
    let tcp = TcpStream::connect(addr).await?;
    tokio_rustls::TlsConnector::from(Arc::new(config))
        .connect(name, tcp)
        .await
}
