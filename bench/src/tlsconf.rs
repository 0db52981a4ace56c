//! The load generator's TLS client: TLS 1.3, no resumption (every connection is a full handshake),
//! optionally a client certificate, and the server verified by SPIFFE ID (workload certificates carry
//! no DNS name) or, for handshake-rate runs, not verified at all to keep the load generator's core free.

use std::path::PathBuf;
use std::sync::Arc;

use anyhow::{Context, Result, bail};
use meshid_identity::SpiffeId;
use meshid_identity::verify::{Anchors, SpiffeServerVerifier};
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::{WebPkiSupportedAlgorithms, aws_lc_rs};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName, UnixTime};
use rustls::{ClientConfig, DigitallySignedStruct, SignatureScheme};

/// How the load generator speaks TLS.
#[derive(Debug, Clone, Default)]
pub struct TlsOptions {
    /// Client certificate chain (PEM, leaf first) and key.
    pub cert: Option<PathBuf>,
    pub key: Option<PathBuf>,
    /// Roots the server must chain to.
    pub bundle: Option<PathBuf>,
    /// The server's expected SPIFFE ID.
    pub expect_id: Option<String>,
    /// Accept any server certificate and handshake signature (handshake-rate runs only).
    pub dangerous_skip_verify: bool,
    /// Key exchange groups: `x25519` (the default, what OpenSSL 3.0 servers pick) or `default`
    /// (rustls's own list, which prefers the post-quantum hybrid).
    pub groups: String,
}

/// A client configuration for `alpn` (e.g. `http/1.1` or `h2`).
pub fn client_config(opts: &TlsOptions, alpn: &[u8]) -> Result<Arc<ClientConfig>> {
    let mut provider = aws_lc_rs::default_provider();
    match opts.groups.as_str() {
        "" | "x25519" => provider.kx_groups = vec![aws_lc_rs::kx_group::X25519],
        "default" => {}
        other => bail!("unknown key exchange groups {other:?} (x25519 or default)"),
    }
    let provider = Arc::new(provider);
    let builder = ClientConfig::builder_with_provider(provider.clone())
        .with_protocol_versions(&[&rustls::version::TLS13])?;
    let verifier: Arc<dyn ServerCertVerifier> = if opts.dangerous_skip_verify {
        Arc::new(DangerousAnyServer {
            algs: provider.signature_verification_algorithms,
        })
    } else {
        let bundle = opts
            .bundle
            .as_ref()
            .context("--bundle is needed to verify the server (or --dangerous-skip-verify)")?;
        let id = opts
            .expect_id
            .as_deref()
            .context("--expect-id is needed to verify the server (or --dangerous-skip-verify)")?;
        let id = SpiffeId::parse(id).map_err(|e| anyhow::anyhow!("--expect-id: {e}"))?;
        let roots = read_certs(bundle)?;
        let anchors =
            Anchors::new(&roots, id.trust_domain()).map_err(|e| anyhow::anyhow!("bundle: {e}"))?;
        Arc::new(SpiffeServerVerifier::new(anchors, id, &provider))
    };
    let builder = builder
        .dangerous()
        .with_custom_certificate_verifier(verifier);
    let mut config = match (&opts.cert, &opts.key) {
        (Some(cert), Some(key)) => {
            let chain = read_certs(cert)?;
            let key = PrivateKeyDer::from_pem_file(key)
                .with_context(|| format!("reading key {}", key.display()))?;
            builder.with_client_auth_cert(chain, key)?
        }
        (None, None) => builder.with_no_client_auth(),
        _ => bail!("--cert and --key go together"),
    };
    config.resumption = rustls::client::Resumption::disabled();
    config.alpn_protocols = vec![alpn.to_vec()];
    Ok(Arc::new(config))
}

fn read_certs(path: &PathBuf) -> Result<Vec<CertificateDer<'static>>> {
    CertificateDer::pem_file_iter(path)
        .and_then(|it| it.collect::<Result<Vec<_>, _>>())
        .with_context(|| format!("reading certificates from {}", path.display()))
}

/// Accepts any server certificate and handshake signature. Only for measuring a server's handshake
/// rate: the server's work is unchanged (it signs, and verifies our certificate), while the load
/// generator's core is spared two signature checks per connection so that it is not the limit.
#[derive(Debug)]
struct DangerousAnyServer {
    algs: WebPkiSupportedAlgorithms,
}

impl ServerCertVerifier for DangerousAnyServer {
    fn verify_server_cert(
        &self,
        _end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        _now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        _message: &[u8],
        _cert: &CertificateDer<'_>,
        _dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        Ok(HandshakeSignatureValid::assertion())
    }

    fn verify_tls13_signature(
        &self,
        _message: &[u8],
        _cert: &CertificateDer<'_>,
        _dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        Ok(HandshakeSignatureValid::assertion())
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.algs.supported_schemes()
    }
}
