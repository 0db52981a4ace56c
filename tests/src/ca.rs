//! An in-process CA on 127.0.0.1:0 with a fresh directory, and a gRPC client that speaks to it over
//! real TLS (optionally presenting a client certificate).

use std::net::SocketAddr;
use std::time::Duration;

use meshid_ca::auth::{JoinTokenStore, JwksSource, JwtConfig};
use meshid_ca::authority::{self, Authority};
use meshid_ca::ratelimit::RateLimit;
use meshid_ca::server::{RunningCa, ServeConfig};
use meshid_ca::signer::LifetimePolicy;
use meshid_ca::tls::ListenerLimits;
use meshid_identity::{SpiffeId, TrustDomain};
use meshid_sidecar::settings::{Bootstrap, CaEndpoint, CaMode, CredSource};
use prometheus_client::registry::Registry;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};
use tempfile::TempDir;

use crate::fake_cluster::{self, FakeCluster};

/// A gRPC client of the CA.
pub type Client = meshid_sidecar::creds::ca_client::CaClient;

/// Settings for a test CA.
#[derive(Debug, Clone)]
pub struct CaOptions {
    pub trust_domain: String,
    pub allowed_namespaces: Option<Vec<String>>,
    pub rate_limit: RateLimit,
    pub lifetimes: LifetimePolicy,
    /// `--max-attestation-age` (default: that of `meshid-ca serve`, 24h).
    pub max_attestation_age: Duration,
    pub handshake_timeout: Duration,
    /// Listener limits (defaults: those of `meshid-ca serve`).
    pub max_connections: usize,
    pub max_connections_per_source: usize,
    pub idle_timeout: Duration,
    pub call_timeout: Duration,
    pub max_connection_age: Duration,
    pub max_connection_age_grace: Duration,
    /// Calls whose request is still arriving, at once (an eighth from one source).
    pub max_arriving_requests: usize,
    /// Where the service-account issuer's keys come from (default: a JWKS file of
    /// [`TestCa::cluster`] in the CA directory).
    pub jwks: Option<JwksSource>,
    /// `--token-review` (with a remote `jwks`).
    pub token_review: bool,
}

impl Default for CaOptions {
    fn default() -> Self {
        Self {
            trust_domain: "cluster.local".into(),
            allowed_namespaces: None,
            rate_limit: RateLimit::default(),
            lifetimes: LifetimePolicy::default(),
            max_attestation_age: Duration::from_secs(24 * 3600),
            handshake_timeout: Duration::from_secs(10),
            max_connections: 1000,
            max_connections_per_source: ListenerLimits::default().max_connections_per_source,
            idle_timeout: ListenerLimits::default().idle_timeout,
            call_timeout: ListenerLimits::default().call_timeout,
            max_connection_age: ListenerLimits::default().max_connection_age,
            max_connection_age_grace: ListenerLimits::default().max_connection_age_grace,
            max_arriving_requests: ListenerLimits::default().max_arriving_requests,
            jwks: None,
            token_review: false,
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
    config: ServeConfig,
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
                jwks: opts.jwks.clone().unwrap_or(JwksSource::File(jwks)),
                issuer: fake_cluster::ISSUER.into(),
                audience: fake_cluster::AUDIENCE.into(),
                allowed_namespaces: opts.allowed_namespaces.map(|v| v.into_iter().collect()),
                max_token_lifetime: meshid_ca::auth::JwtConfig::DEFAULT_MAX_TOKEN_LIFETIME,
                dangerous_accept_unbound_tokens: false,
                token_review: opts.token_review,
            }),
            lifetimes: opts.lifetimes,
            max_attestation_age: opts.max_attestation_age,
            jwt_svid_ttl: Duration::from_secs(300),
            rate_limit: opts.rate_limit,
            namespace_rate_limit: opts.rate_limit.per_namespace(),
            limits: ListenerLimits {
                handshake_timeout: opts.handshake_timeout,
                max_connections: opts.max_connections,
                max_connections_per_source: opts.max_connections_per_source,
                idle_timeout: opts.idle_timeout,
                call_timeout: opts.call_timeout,
                max_connection_age: opts.max_connection_age,
                max_connection_age_grace: opts.max_connection_age_grace,
                max_arriving_requests: opts.max_arriving_requests,
            },
            grace: Duration::from_secs(5),
        };
        let mut registry = Registry::default();
        let running = meshid_ca::start(config.clone(), &mut registry)
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
            config,
        }
    }

    /// Starts another CA process-equivalent on the same directory (new ports): a replica.
    pub async fn start_replica(&self) -> RunningCa {
        self.try_start_replica().await.expect("start replica")
    }

    /// [`TestCa::start_replica`], or why it does not start.
    pub async fn try_start_replica(&self) -> Result<RunningCa, meshid_ca::server::StartError> {
        let mut config = self.config.clone();
        config.listen = "127.0.0.1:0".parse().expect("addr");
        config.admin_listen = "127.0.0.1:0".parse().expect("addr");
        let mut registry = Registry::default();
        meshid_ca::start(config, &mut registry).await
    }

    /// Starts the CA again on the same addresses (after [`TestCa::stop`]).
    pub async fn restart(&mut self) {
        let mut config = self.config.clone();
        config.listen = self.addr;
        config.admin_listen = self.admin_addr;
        // The stopped CA's accept loop may still hold the port for a moment: retry the bind.
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
        loop {
            let mut registry = Registry::default();
            match meshid_ca::start(config.clone(), &mut registry).await {
                Ok(running) => {
                    self.running = Some(running);
                    return;
                }
                Err(e) if std::time::Instant::now() < deadline => {
                    eprintln!("restart CA: {e}; retrying");
                    tokio::time::sleep(std::time::Duration::from_millis(100)).await;
                }
                Err(e) => panic!("restart CA: {e}"),
            }
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

    /// A certificate for `ns/sa` issued on its service-account token and written into `dir` as a
    /// file-mode sidecar reads it (operator tooling): `cert.pem` (the chain), `key.pem` and
    /// `bundle.pem` (the roots of the answer).
    pub async fn issue_to_files(
        &self,
        ns: &str,
        sa: &str,
        dir: &std::path::Path,
    ) -> meshid_sidecar::settings::FileCreds {
        use meshid_proto::ca::v1::{IssueRequest, issue_request::Credential};
        let w = crate::pki::WorkloadKey::new();
        let resp = self
            .client()
            .await
            .issue(IssueRequest {
                csr: w.csr.clone(),
                credential: Some(Credential::ServiceAccountToken(self.cluster.token(ns, sa))),
                ttl_seconds: 0,
                app_svid: false,
            })
            .await
            .expect("issued")
            .into_inner();
        let creds = meshid_sidecar::settings::FileCreds {
            cert: dir.join("cert.pem"),
            key: dir.join("key.pem"),
            bundle: dir.join("bundle.pem"),
        };
        let pems = |ders: &[Vec<u8>]| ders.iter().map(|c| crate::pki::pem(c)).collect::<String>();
        std::fs::write(&creds.cert, pems(&resp.cert_chain)).expect("write cert.pem");
        std::fs::write(&creds.key, w.key.serialize_pem()).expect("write key.pem");
        std::fs::write(&creds.bundle, pems(&resp.trust_anchors)).expect("write bundle.pem");
        creds
    }

    /// How a sidecar reaches this CA: by its address, as `localhost`, trusting its roots.
    pub fn endpoint(&self) -> CaEndpoint {
        CaEndpoint {
            addr: self.addr.to_string(),
            server_name: Some("localhost".into()),
            roots: self.roots.clone(),
            pinned: Vec::new(),
        }
    }

    /// How a file-mode sidecar reports to this CA (`--report-ca-addr`): trusting its own bundle
    /// file, no roots of its own.
    pub fn report_endpoint(&self) -> CaEndpoint {
        CaEndpoint {
            roots: Vec::new(),
            pinned: Vec::new(),
            ..self.endpoint()
        }
    }

    /// The trust bundle this CA serves anyone who asks (`GetTrustBundle`, no client certificate).
    pub async fn served_bundle(&self) -> meshid_proto::ca::v1::TrustBundle {
        self.client()
            .await
            .get_trust_bundle(meshid_proto::ca::v1::GetTrustBundleRequest {})
            .await
            .expect("GetTrustBundle")
            .into_inner()
    }

    /// A client presenting `chain`/`key` (renewal).
    pub async fn client_with_cert(
        &self,
        chain: Vec<CertificateDer<'static>>,
        key: PrivateKeyDer<'static>,
    ) -> Result<Client, meshid_sidecar::creds::ca_client::CaClientError> {
        connect(self.addr, &self.roots, Some((chain, key))).await
    }

    /// Creates a join token as `meshid-ca token create` would.
    pub fn join_token(&self, id: &str, ttl: Duration) -> String {
        JoinTokenStore::new(self.dir.path(), self.trust_domain.clone())
            .create(&SpiffeId::parse(id).expect("id"), ttl)
            .expect("create token")
    }

    /// CA-mode credentials for a sidecar of service account `ns/sa`: its projected token in a file
    /// of this CA's directory, certificates of lifetime `ttl`.
    pub fn sidecar_creds(&self, ns: &str, sa: &str, ttl: Duration) -> CredSource {
        let token = self.dir.path().join(format!("{ns}-{sa}.token"));
        std::fs::write(&token, self.cluster.token(ns, sa)).expect("write token");
        CredSource::Ca(CaMode {
            endpoint: self.endpoint(),
            bootstrap: Bootstrap::TokenFile(token),
            ttl: Some(ttl),
            bundle_cache: None,
        })
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
) -> Result<Client, meshid_sidecar::creds::ca_client::CaClientError> {
    let endpoint = CaEndpoint {
        addr: addr.to_string(),
        server_name: Some("localhost".into()),
        roots: roots.to_vec(),
        pinned: Vec::new(),
    };
    meshid_sidecar::creds::ca_client::connect(&endpoint, client_cert).await
}
