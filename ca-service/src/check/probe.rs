//! The network side of `meshid-ca check`: the CA's admin port, the certificate chain a TLS server
//! presents, and reads from the API server. Every failure is a sentence, never a panic.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use hyper::body::Bytes;
use meshid_runtime::http_client::{self, Call};
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::{DigitallySignedStruct, SignatureScheme};
use rustls_pki_types::{CertificateDer, ServerName, UnixTime};

use super::KubeAccess;
use crate::auth::jwks_remote::{self, RemoteJwks};

/// The largest admin answer read (a `/rotation` report of a big fleet is a few MiB).
pub(crate) const MAX_ADMIN_BODY: usize = 16 << 20;

/// `GET path` on an admin port: the status and body.
pub async fn admin_get(
    addr: SocketAddr,
    path: &str,
    timeout: Duration,
) -> Result<(u16, Bytes), String> {
    admin_get_with(addr, path, timeout, &[]).await
}

/// `GET path` on an admin port with request headers (the admin token): the status and body.
pub async fn admin_get_with(
    addr: SocketAddr,
    path: &str,
    timeout: Duration,
    headers: &[(String, String)],
) -> Result<(u16, Bytes), String> {
    let mut call = Call::get(addr, path);
    call.headers = headers;
    call.host = Some("meshid-ca");
    call.timeout = timeout;
    call.max_body = MAX_ADMIN_BODY;
    http_client::send(&call)
        .await
        .map(|r| (r.status, r.body))
        .map_err(|e| e.to_string())
}

/// `GET path` on the API server (a JSON object), with its token and CA bundle.
pub async fn kube_get(kube: &KubeAccess, path: &str, timeout: Duration) -> Result<Bytes, String> {
    let mut config = RemoteJwks::new(format!("{}{path}", kube.api));
    config.token_file = kube.token_file.clone();
    config.ca_file = kube.ca_file.clone();
    config.connect_timeout = timeout;
    config.request_timeout = timeout;
    jwks_remote::fetch_document(&config)
        .await
        .map_err(|e| e.0.replace("--jwks-", "--kube-"))
}

/// Connects to `addr` (`HOST:PORT`) with TLS, sending `server_name` as SNI, and returns the chain
/// the server presented (leaf first). Whether that chain is any good is decided afterwards by
/// [`super::certs::verify_server`], which can say why it is not.
pub async fn peer_chain(
    addr: &str,
    server_name: &str,
    timeout: Duration,
) -> Result<Vec<CertificateDer<'static>>, String> {
    tokio::time::timeout(timeout, async {
        let tcp = tokio::net::TcpStream::connect(addr)
            .await
            .map_err(|e| format!("cannot connect to {addr}: {e}"))?;
        let captured = Arc::new(DangerousCapture::default());
        let mut tls = rustls::ClientConfig::builder_with_provider(crate::tls::provider())
            .with_safe_default_protocol_versions()
            .map_err(|e| format!("TLS setup: {e}"))?
            .dangerous()
            .with_custom_certificate_verifier(captured.clone())
            .with_no_client_auth();
        tls.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
        let name = ServerName::try_from(server_name.to_owned())
            .map_err(|_| format!("{server_name:?} is not a DNS name or IP"))?;
        let stream = tokio_rustls::TlsConnector::from(Arc::new(tls))
            .connect(name, tcp)
            .await
            .map_err(|e| format!("TLS handshake with {addr}: {e}"))?;
        drop(stream);
        let chain = captured
            .chain
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone();
        Ok(chain)
    })
    .await
    .map_err(|_| format!("no TLS handshake with {addr} within {timeout:?}"))?
}

/// Accepts any server certificate and keeps the chain, so the check can verify it afterwards against
/// the roots it is about (a trust bundle, a webhook's caBundle) and name what is wrong instead of
/// a bare handshake error. Dangerous as a TLS client: used only to look at a certificate; nothing
/// is sent over the connection. Handshake signatures are still verified, so the server holds the
/// leaf's key.
#[derive(Debug, Default)]
struct DangerousCapture {
    chain: std::sync::Mutex<Vec<CertificateDer<'static>>>,
}

impl ServerCertVerifier for DangerousCapture {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        _now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        let mut chain = vec![end_entity.clone().into_owned()];
        chain.extend(intermediates.iter().map(|c| c.clone().into_owned()));
        *self.chain.lock().unwrap_or_else(|p| p.into_inner()) = chain;
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(
            message,
            cert,
            dss,
            &crate::tls::provider().signature_verification_algorithms,
        )
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(
            message,
            cert,
            dss,
            &crate::tls::provider().signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        crate::tls::provider()
            .signature_verification_algorithms
            .supported_schemes()
    }
}
