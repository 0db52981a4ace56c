//! An in-process CA on 127.0.0.1:0 with a fresh directory, and a gRPC client that speaks to it over
//! real TLS (optionally presenting a client certificate).

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use hyper_util::rt::TokioIo;
use meshid_ca::auth::{JoinTokenStore, JwtConfig};
use meshid_ca::authority::{self, Authority};
use meshid_ca::ratelimit::RateLimit;
use meshid_ca::server::{RunningCa, ServeConfig};
use meshid_ca::signer::LifetimePolicy;
use meshid_ca::tls::ListenerLimits;
use meshid_proto::ca::v1::certificate_authority_client::CertificateAuthorityClient;
use meshid_proto::{SpiffeId, TrustDomain};
use prometheus_client::registry::Registry;
use rustls_pki_types::{CertificateDer, PrivateKeyDer, ServerName};
use tempfile::TempDir;
use tokio::net::TcpStream;
use tonic::transport::{Channel, Endpoint, Uri};

use crate::fake_cluster::{self, FakeCluster};

/// A gRPC client of the CA.
pub type Client = CertificateAuthorityClient<Channel>;

/// Settings for a test CA.
#[derive(Debug, Clone)]
pub struct CaOptions {
    pub trust_domain: String,
    pub allowed_namespaces: Option<Vec<String>>,
    pub rate_limit: RateLimit,
    pub lifetimes: LifetimePolicy,
    pub handshake_timeout: Duration,
}

impl Default for CaOptions {
    fn default() -> Self {
        Self {
            trust_domain: "cluster.local".into(),
            allowed_namespaces: None,
            rate_limit: RateLimit::default(),
            lifetimes: LifetimePolicy::default(),
            handshake_timeout: Duration::from_secs(10),
        }
    }
}

/// A running in-process CA and everything a test needs around it.
pub struct TestCa {
    pub dir: TempDir,
    pub addr: SocketAddr,
    pub admin_addr: SocketAddr,
    pub roots: Vec<CertificateDer<'static>>,
    pub cluster: FakeCluster,
    pub trust_domain: TrustDomain,
    running: Option<RunningCa>,
}

impl TestCa {
    /// Inits a CA in a temporary directory and serves it on 127.0.0.1 with ephemeral ports.
    pub async fn start(opts: CaOptions) -> Self {
        let dir = tempfile::tempdir().expect("tempdir");
        let td = TrustDomain::new(&opts.trust_domain).expect("trust domain");
        authority::init(dir.path(), &td, None).expect("init");
        let cluster = FakeCluster::new();
        let jwks = dir.path().join("jwks.json");
        cluster.write_jwks(&jwks);
        let config = ServeConfig {
            dir: dir.path().to_owned(),
            listen: "127.0.0.1:0".parse().expect("addr"),
            admin_listen: "127.0.0.1:0".parse().expect("addr"),
            sans: vec!["localhost".into(), "127.0.0.1".into()],
            jwt: Some(JwtConfig {
                jwks_path: jwks,
                issuer: fake_cluster::ISSUER.into(),
                audience: fake_cluster::AUDIENCE.into(),
                allowed_namespaces: opts.allowed_namespaces.map(|v| v.into_iter().collect()),
            }),
            lifetimes: opts.lifetimes,
            rate_limit: opts.rate_limit,
            limits: ListenerLimits {
                handshake_timeout: opts.handshake_timeout,
                max_connections: 1000,
            },
            grace: Duration::from_secs(5),
        };
        let mut registry = Registry::default();
        let running = meshid_ca::start(config, &mut registry)
            .await
            .expect("start CA");
        let roots = authority::read_bundle(&dir.path().join("bundle.pem")).expect("bundle");
        Self {
            addr: running.addr,
            admin_addr: running.admin_addr,
            dir,
            roots,
            cluster,
            trust_domain: td,
            running: Some(running),
        }
    }

    /// Stops the CA gracefully.
    pub async fn stop(&mut self) {
        if let Some(r) = self.running.take() {
            r.shutdown().await;
        }
    }

    /// A client without a certificate.
    pub async fn client(&self) -> Client {
        connect(self.addr, &self.roots, None)
            .await
            .expect("connect")
    }

    /// A client presenting `chain`/`key` (renewal).
    pub async fn client_with_cert(
        &self,
        chain: Vec<CertificateDer<'static>>,
        key: PrivateKeyDer<'static>,
    ) -> Result<Client, tonic::transport::Error> {
        connect(self.addr, &self.roots, Some((chain, key))).await
    }

    /// Creates a join token as `meshid-ca token create` would.
    pub fn join_token(&self, id: &str, ttl: Duration) -> String {
        JoinTokenStore::new(self.dir.path(), self.trust_domain.clone())
            .create(&SpiffeId::parse(id).expect("id"), ttl)
            .expect("create token")
    }

    /// Loads this CA's signing material (to mint certificates tests cannot get through the API,
    /// such as already expired ones).
    pub fn authority(&self) -> Authority {
        Authority::load(self.dir.path()).expect("load authority")
    }
}

/// Connects to a CA at `addr` over TLS, trusting `roots`, as server name `localhost`.
pub async fn connect(
    addr: SocketAddr,
    roots: &[CertificateDer<'static>],
    client_cert: Option<(Vec<CertificateDer<'static>>, PrivateKeyDer<'static>)>,
) -> Result<Client, tonic::transport::Error> {
    let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
    let mut store = rustls::RootCertStore::empty();
    for r in roots {
        store.add(r.clone()).expect("root");
    }
    let builder = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .expect("versions")
        .with_root_certificates(store);
    let mut config = match client_cert {
        Some((chain, key)) => builder
            .with_client_auth_cert(chain, key)
            .expect("client cert"),
        None => builder.with_no_client_auth(),
    };
    config.alpn_protocols = vec![b"h2".to_vec()];
    let connector = tokio_rustls::TlsConnector::from(Arc::new(config));
    let channel = Endpoint::from_static("http://localhost")
        .connect_timeout(Duration::from_secs(5))
        .connect_with_connector(tower::service_fn(move |_: Uri| {
            let connector = connector.clone();
            async move {
                let tcp = TcpStream::connect(addr).await?;
                let name = ServerName::try_from("localhost").expect("server name");
                let tls = connector.connect(name, tcp).await?;
                Ok::<_, std::io::Error>(TokioIo::new(tls))
            }
        }))
        .await?;
    Ok(CertificateAuthorityClient::new(channel))
}
