//! The CA's TLS listener: its own serving certificate, optional client certificates (for renewal), a
//! handshake timeout and a connection limit. Accepted connections feed tonic as a stream.

use std::io;
use std::net::{IpAddr, SocketAddr};
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use arc_swap::ArcSwap;
use meshid_runtime::io::Coalesce;
use rcgen::{
    CertificateParams, DnType, ExtendedKeyUsagePurpose, KeyPair, KeyUsagePurpose, SanType,
};
use rustls::ServerConfig;
use rustls::server::WebPkiClientVerifier;
use rustls_pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer};
use time::OffsetDateTime;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{Semaphore, mpsc};
use tokio_rustls::TlsAcceptor;
use tokio_rustls::server::TlsStream;
use tokio_stream::wrappers::ReceiverStream;
use tonic::transport::server::Connected;

use crate::authority::Authority;
use crate::metrics::Metrics;
use crate::serial::random_serial;

/// Lifetime of the CA's own serving certificate; it is re-issued well before.
pub const SERVING_CERT_LIFETIME: Duration = Duration::from_secs(7 * 24 * 3600);

/// Errors building the TLS configuration.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum TlsSetupError {
    #[error("serving certificate: {0}")]
    Cert(#[from] rcgen::Error),
    #[error("tls configuration: {0}")]
    Rustls(#[from] rustls::Error),
    #[error("client verifier: {0}")]
    Verifier(#[from] rustls::server::VerifierBuilderError),
    #[error("invalid --san {0:?}")]
    San(String),
}

/// The process-wide crypto provider: aws-lc-rs.
pub fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::aws_lc_rs::default_provider())
}

/// Issues the CA's serving certificate (DNS and IP SANs) from the intermediate, with a fresh key.
pub fn serving_cert(
    authority: &Authority,
    sans: &[String],
) -> Result<(Vec<CertificateDer<'static>>, PrivateKeyDer<'static>), TlsSetupError> {
    issue_serving_cert(authority, sans, "meshid-ca", SERVING_CERT_LIFETIME)
}

/// Issues a serverAuth certificate for `sans` (DNS names or IPs) from the active intermediate, with
/// a fresh P-256 key: (leaf + intermediate, key). Its lifetime is `lifetime`, capped by the
/// intermediate's not-after.
pub fn issue_serving_cert(
    authority: &Authority,
    sans: &[String],
    common_name: &str,
    lifetime: Duration,
) -> Result<(Vec<CertificateDer<'static>>, PrivateKeyDer<'static>), TlsSetupError> {
    let key = KeyPair::generate()?;
    let mut params = CertificateParams::default();
    params
        .distinguished_name
        .push(DnType::CommonName, common_name);
    for san in sans {
        let entry = match san.parse::<IpAddr>() {
            Ok(ip) => SanType::IpAddress(ip),
            Err(_) => SanType::DnsName(
                san.as_str()
                    .try_into()
                    .map_err(|_| TlsSetupError::San(san.clone()))?,
            ),
        };
        params.subject_alt_names.push(entry);
    }
    params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
    params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
    params.use_authority_key_identifier_extension = true;
    params.serial_number = Some(random_serial());
    let now = OffsetDateTime::now_utc();
    params.not_before = now - time::Duration::minutes(1);
    params.not_after = now
        .checked_add(crate::signer::to_time(lifetime))
        .map_or(authority.intermediate_not_after, |t| {
            t.min(authority.intermediate_not_after)
        });
    let cert = params.signed_by(&key, &authority.issuer)?;
    let key_der = PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(key.serialize_der()));
    Ok((
        vec![cert.der().clone(), authority.intermediate_der.clone()],
        key_der,
    ))
}

/// Builds the server config: our serving chain, client certificates optional and, when sent, verified
/// against the trust bundle; h2 by ALPN.
pub fn server_config(
    authority: &Authority,
    bundle: &[CertificateDer<'static>],
    sans: &[String],
) -> Result<Arc<ServerConfig>, TlsSetupError> {
    let provider = provider();
    let mut roots = rustls::RootCertStore::empty();
    for root in bundle {
        roots.add(root.clone())?;
    }
    let verifier = WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider.clone())
        .allow_unauthenticated()
        .build()?;
    let (chain, key) = serving_cert(authority, sans)?;
    let mut config = ServerConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13, &rustls::version::TLS12])?
        .with_client_cert_verifier(verifier)
        .with_single_cert(chain, key)?;
    config.alpn_protocols = vec![b"h2".to_vec()];
    Ok(Arc::new(config))
}

/// What a handler learns about the connection a call arrived on.
#[derive(Clone, Debug)]
pub struct PeerInfo {
    pub remote_addr: SocketAddr,
    /// The client's verified certificate chain (leaf first), if it sent one.
    pub certificates: Option<Arc<Vec<CertificateDer<'static>>>>,
    /// The leaf's identity, parsed once per connection (renewals on one connection reuse it).
    pub leaf_identity: Option<Arc<Result<meshid_identity::CertIdentity, String>>>,
}

/// An accepted TLS connection, handed to tonic.
pub struct TlsConn {
    /// Writes coalesced until h2 flushes: one TLS record and one `writev` per response, not three.
    stream: Coalesce<TlsStream<TcpStream>>,
    info: PeerInfo,
    _permit: tokio::sync::OwnedSemaphorePermit,
    metrics: Metrics,
}

impl Drop for TlsConn {
    fn drop(&mut self) {
        self.metrics.connections_open.dec();
    }
}

impl Connected for TlsConn {
    type ConnectInfo = PeerInfo;
    fn connect_info(&self) -> PeerInfo {
        self.info.clone()
    }
}

impl AsyncRead for TlsConn {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(&mut self.stream).poll_read(cx, buf)
    }
}

impl AsyncWrite for TlsConn {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.stream).poll_write(cx, buf)
    }
    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.stream).poll_flush(cx)
    }
    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.stream).poll_shutdown(cx)
    }
    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.stream).poll_write_vectored(cx, bufs)
    }
    fn is_write_vectored(&self) -> bool {
        self.stream.is_write_vectored()
    }
}

/// Listener limits.
#[derive(Debug, Clone, Copy)]
pub struct ListenerLimits {
    pub handshake_timeout: Duration,
    pub max_connections: usize,
}

impl Default for ListenerLimits {
    fn default() -> Self {
        Self {
            handshake_timeout: Duration::from_secs(10),
            max_connections: 10_000,
        }
    }
}

/// Accepts TCP connections and completes TLS handshakes off the accept loop, with the current
/// config at the time of each handshake. The stream ends when the receiver is dropped.
pub fn incoming(
    listener: TcpListener,
    config: Arc<ArcSwap<ServerConfig>>,
    limits: ListenerLimits,
    metrics: Metrics,
) -> ReceiverStream<io::Result<TlsConn>> {
    let (tx, rx) = mpsc::channel(128);
    let permits = Arc::new(Semaphore::new(limits.max_connections));
    tokio::spawn(async move {
        loop {
            let (tcp, remote_addr) = tokio::select! {
                pair = meshid_runtime::net::accept_retrying(&listener, "ca") => pair,
                () = tx.closed() => return,
            };
            let Ok(permit) = permits.clone().try_acquire_owned() else {
                metrics.connections_refused.inc();
                tracing::warn!(peer = %remote_addr, "connection limit reached; refusing");
                drop(tcp);
                continue;
            };
            let _ = tcp.set_nodelay(true);
            let acceptor = TlsAcceptor::from(config.load_full());
            let tx = tx.clone();
            let metrics = metrics.clone();
            tokio::spawn(async move {
                let handshake =
                    tokio::time::timeout(limits.handshake_timeout, acceptor.accept(tcp)).await;
                let stream = match handshake {
                    Ok(Ok(stream)) => stream,
                    Ok(Err(error)) => {
                        metrics.handshake_failures.inc();
                        tracing::debug!(%error, peer = %remote_addr, "tls handshake failed");
                        return;
                    }
                    Err(_) => {
                        metrics.handshake_failures.inc();
                        tracing::debug!(peer = %remote_addr, "tls handshake timed out");
                        return;
                    }
                };
                let certificates: Option<Arc<Vec<CertificateDer<'static>>>> = stream
                    .get_ref()
                    .1
                    .peer_certificates()
                    .map(|c| Arc::new(c.iter().map(|c| c.clone().into_owned()).collect()));
                let leaf_identity = certificates.as_ref().and_then(|c| c.first()).map(|leaf| {
                    Arc::new(
                        meshid_identity::cert_identity_from_der(leaf).map_err(|e| e.to_string()),
                    )
                });
                metrics.connections_open.inc();
                let conn = TlsConn {
                    stream: Coalesce::new(stream),
                    info: PeerInfo {
                        remote_addr,
                        certificates,
                        leaf_identity,
                    },
                    _permit: permit,
                    metrics,
                };
                let _ = tx.send(Ok(conn)).await;
            });
        }
    });
    ReceiverStream::new(rx)
}
