//! Talking to the meshid CA: a gRPC channel over our own rustls (aws-lc-rs) connection, verifying the
//! CA's serving certificate against the CA bundle, optionally presenting our current certificate (the
//! credential for renewal).
//!
//! The bundle may carry, beside its roots, the issuing intermediates trust under a shared root is
//! pinned to (an imported enterprise root: `meshid-ca bundle` prints both, and the CA streams
//! them). Under such a root the CA's certificate must come from one of those intermediates: a
//! sibling CA's certificate for the CA's name is refused before the sidecar sends its token.

use std::sync::Arc;
use std::time::Duration;

use hyper_util::rt::TokioIo;
use meshid_identity::verify::{Chains, NamedServerVerifier};
use meshid_proto::ca::v1::certificate_authority_client::CertificateAuthorityClient;
use rustls_pki_types::{CertificateDer, PrivateKeyDer, ServerName};
use tokio::net::TcpStream;
use tonic::transport::{Channel, Endpoint, Uri};

use crate::settings::CaEndpoint;

/// A gRPC client of the CA.
pub type CaClient = CertificateAuthorityClient<Channel>;

/// The largest message the CA's answers may be: a trust bundle, or a certificate with the
/// revocations listed beside it, carries up to 10,000 revocations of up to a 2,048-byte SPIFFE ID
/// and a 256-byte reason each (about 24 MiB). tonic's default (4 MiB) failed every renewal and
/// bundle stream once the list passed about 1,800 such entries.
pub const MAX_CA_MESSAGE_BYTES: usize = 32 * 1024 * 1024;

/// Why a connection to the CA could not be set up.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum CaClientError {
    #[error("CA address {0:?} is not host:port")]
    Address(String),
    #[error("CA bundle: {0}")]
    Bundle(rustls::Error),
    #[error("CA bundle: not usable as trust anchors: {0:?}")]
    Anchors(webpki::Error),
    #[error("client certificate: {0}")]
    ClientCert(rustls::Error),
    #[error("connecting to the CA: {0}")]
    Connect(#[from] tonic::transport::Error),
}

/// Connects to the CA, presenting `client_cert` (chain, key) if given.
pub async fn connect(
    endpoint: &CaEndpoint,
    client_cert: Option<(Vec<CertificateDer<'static>>, PrivateKeyDer<'static>)>,
) -> Result<CaClient, CaClientError> {
    Ok(
        CertificateAuthorityClient::new(channel(endpoint, client_cert).await?)
            .max_decoding_message_size(MAX_CA_MESSAGE_BYTES),
    )
}

/// A gRPC channel to the CA's TLS port (for the CA API or its health service).
pub async fn channel(
    endpoint: &CaEndpoint,
    client_cert: Option<(Vec<CertificateDer<'static>>, PrivateKeyDer<'static>)>,
) -> Result<Channel, CaClientError> {
    let host = endpoint
        .host()
        .map_err(|_| CaClientError::Address(endpoint.addr.clone()))?
        .to_owned();
    let name = endpoint.server_name.clone().unwrap_or_else(|| host.clone());
    let server_name =
        ServerName::try_from(name.clone()).map_err(|_| CaClientError::Address(name.clone()))?;
    let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
    let chains = Chains::new(&endpoint.roots, &endpoint.pinned).map_err(CaClientError::Anchors)?;
    let verifier = NamedServerVerifier::new(chains, &provider);
    let builder = rustls::ClientConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13])
        .map_err(CaClientError::Bundle)?
        .dangerous()
        .with_custom_certificate_verifier(Arc::new(verifier));
    let mut config = match client_cert {
        Some((chain, key)) => builder
            .with_client_auth_cert(chain, key)
            .map_err(CaClientError::ClientCert)?,
        None => builder.with_no_client_auth(),
    };
    config.alpn_protocols = vec![b"h2".to_vec()];
    let connector = tokio_rustls::TlsConnector::from(Arc::new(config));
    let addr = endpoint.addr.clone();
    let channel = Endpoint::from_static("http://meshid-ca")
        .connect_timeout(Duration::from_secs(5))
        .timeout(Duration::from_secs(30))
        .connect_with_connector(tower::service_fn(move |_: Uri| {
            let connector = connector.clone();
            let server_name = server_name.clone();
            let addr = addr.clone();
            async move {
                let tcp = TcpStream::connect(addr.as_str()).await?;
                tcp.set_nodelay(true)?;
                // The bundle stream stays silent between bundle changes: a CA that vanished
                // (its node gone, no FIN) is noticed by the kernel, and the stream reopened.
                meshid_runtime::net::keepalive(&tcp)?;
                let tls = connector.connect(server_name, tcp).await?;
                Ok::<_, std::io::Error>(TokioIo::new(tls))
            }
        }))
        .await?;
    Ok(channel)
}
