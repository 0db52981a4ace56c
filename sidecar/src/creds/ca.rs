//! CA mode: get a certificate at start, renew it well before expiry with a fresh key, follow the trust
//! bundle stream, and survive CA outages. Everything lands in the [`CredentialStore`].
//!
//! Keys are ECDSA P-256, generated in memory for every CSR; they never touch disk or logs.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use meshid_proto::ca::v1::{IssueRequest, WatchTrustBundleRequest, issue_request::Credential};
use rcgen::{CertificateParams, KeyPair};
use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer};
use tokio::sync::watch;

use super::ca_client;
use super::store::{CredError, CredentialStore, Credentials, Snapshot};
use crate::metrics::{Metrics, ResultLabels};
use crate::settings::{Bootstrap, CaEndpoint, CaMode};
use meshid_identity::timing::{Backoff, random_unit, refresh_in};
use meshid_runtime::net::stopped;
use meshid_runtime::time::unix_now;

/// What the issuer and the bundle watcher share.
#[derive(Debug)]
pub struct Lifecycle {
    /// A random ID for this sidecar process, so the CA can count it once.
    pub instance_id: String,
    /// The bundle version applied to new handshakes (0: none yet).
    pub applied_version: std::sync::atomic::AtomicU64,
    /// Signalled by the bundle stream when the CA asks everyone to renew now.
    pub renew_now: tokio::sync::Notify,
    /// Signalled by the issuer after each new certificate (so it is acknowledged).
    pub renewed: tokio::sync::Notify,
}

impl Lifecycle {
    pub fn new() -> Self {
        let mut b = [0u8; 16];
        let _ = aws_lc_rs::rand::fill(&mut b);
        Self {
            instance_id: meshid_identity::identity::hex(&b),
            applied_version: Default::default(),
            renew_now: Default::default(),
            renewed: Default::default(),
        }
    }
}

impl Default for Lifecycle {
    fn default() -> Self {
        Self::new()
    }
}

/// Tells the CA which bundle version we use and which certificate we serve, over a connection that
/// presents that certificate (the CA checks they are the same).
pub async fn acknowledge(
    mode: &CaMode,
    store: &CredentialStore,
    life: &Lifecycle,
) -> Result<(), IssueError> {
    let version = life
        .applied_version
        .load(std::sync::atomic::Ordering::Relaxed);
    send_ack(
        &endpoint_with_bundle(&mode.endpoint, store),
        store,
        life,
        version,
        false,
    )
    .await
}

async fn send_ack(
    endpoint: &CaEndpoint,
    store: &CredentialStore,
    life: &Lifecycle,
    version: u64,
    file_mode: bool,
) -> Result<(), IssueError> {
    let Some((chain, key)) = store.chain_and_key() else {
        return Ok(());
    };
    let mut client = ca_client::connect(endpoint, Some((chain.clone(), key))).await?;
    client
        .ack_trust_bundle(meshid_proto::ca::v1::AckTrustBundleRequest {
            instance_id: life.instance_id.clone(),
            bundle_version: version,
            serving_chain: chain.iter().map(|c| c.to_vec()).collect(),
            file_mode,
        })
        .await
        .map_err(|s| IssueError::Response(s.message().to_owned()))?;
    Ok(())
}

/// File mode with `--report-ca-addr`: keeps a bundle stream open so the CA counts this sidecar, and
/// reports the certificate it serves (again whenever the files change it). Nothing from the CA is
/// applied: certificate and anchors stay the files'. The CA lists the sidecar as unknown.
pub async fn run_file_mode_report(
    endpoint: CaEndpoint,
    store: Arc<CredentialStore>,
    mut shutdown: watch::Receiver<bool>,
) {
    let life = Lifecycle::new();
    let mut backoff = Backoff::new(Duration::from_millis(500), Duration::from_secs(30));
    loop {
        let result = async {
            let endpoint = endpoint_with_bundle(&endpoint, &store);
            let mut stream = open_bundle_stream(&endpoint, &store, &life).await?;
            let mut reported: Option<Vec<u8>> = None;
            let mut tick = tokio::time::interval(Duration::from_secs(5));
            loop {
                tokio::select! {
                    m = stream.message() => match m {
                        Ok(Some(_)) => reported = None,
                        Ok(None) => return Err(IssueError::Response("bundle stream ended".into())),
                        Err(s) => return Err(IssueError::Response(s.message().to_owned())),
                    },
                    _ = tick.tick() => {}
                    () = stopped(&mut shutdown) => return Ok(()),
                }
                backoff.reset();
                let leaf = store
                    .chain_and_key()
                    .and_then(|(c, _)| c.first().map(|l| l.to_vec()));
                if leaf.is_some() && leaf != reported {
                    match send_ack(&endpoint, &store, &life, 0, true).await {
                        Ok(()) => reported = leaf,
                        Err(error) => tracing::warn!(%error, "reporting to the CA failed"),
                    }
                }
            }
        }
        .await;
        if *shutdown.borrow() {
            return;
        }
        if let Err(error) = result {
            tracing::warn!(%error, ca = %endpoint.addr, "report stream to the CA broken; reconnecting");
        }
        let wait = backoff.next_delay(random_unit(), None);
        tokio::select! {
            () = tokio::time::sleep(wait) => {}
            () = stopped(&mut shutdown) => return,
        }
    }
}

/// Why one issuance attempt failed.
#[derive(Debug, thiserror::Error)]
pub enum IssueError {
    #[error("{0}")]
    Connect(#[from] ca_client::CaClientError),
    #[error("CA answered {code:?}: {message}")]
    Status {
        code: tonic::Code,
        message: String,
        retry_after: Option<Duration>,
    },
    #[error("reading {path}: {source}")]
    Credential {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("the join token was already spent and there is no valid certificate to renew with")]
    JoinTokenSpent,
    #[error("CA response: {0}")]
    Response(String),
    #[error("generating a key: {0}")]
    Key(#[from] rcgen::Error),
    #[error("{0}")]
    Store(#[from] CredError),
}

impl IssueError {
    fn retry_after(&self) -> Option<Duration> {
        match self {
            Self::Status { retry_after, .. } => *retry_after,
            _ => None,
        }
    }
}

/// The CA's roots plus the trust bundle we hold (the CA's certificate moves to a new root during a
/// rotation; the bundle stream brings that root before the CA switches).
/// Opens the bundle stream, presenting our certificate (if any yet) so the CA counts this sidecar
/// as connected.
async fn open_bundle_stream(
    endpoint: &CaEndpoint,
    store: &CredentialStore,
    life: &Lifecycle,
) -> Result<tonic::Streaming<meshid_proto::ca::v1::TrustBundle>, IssueError> {
    let mut client = ca_client::connect(endpoint, store.chain_and_key()).await?;
    Ok(client
        .watch_trust_bundle(WatchTrustBundleRequest {
            instance_id: life.instance_id.clone(),
        })
        .await
        .map_err(|s| IssueError::Response(s.message().to_owned()))?
        .into_inner())
}

fn endpoint_with_bundle(endpoint: &CaEndpoint, store: &CredentialStore) -> CaEndpoint {
    let mut endpoint = endpoint.clone();
    for root in store.roots() {
        if !endpoint.roots.contains(&root) {
            endpoint.roots.push(root);
        }
    }
    endpoint
}

/// One issuance: a fresh key, a CSR, and whichever credential fits (our valid certificate first).
pub async fn issue_once(
    mode: &CaMode,
    store: &CredentialStore,
    use_bootstrap: bool,
    join_spent: bool,
) -> Result<(Arc<Snapshot>, u64), IssueError> {
    let key = KeyPair::generate()?;
    let csr = CertificateParams::default().serialize_request(&key)?;
    let valid = store
        .current()
        .is_some_and(|s| s.identity.not_after > unix_now() + 1);
    // After a forced root retirement our certificate no longer chains to the bundle and the CA
    // refuses it at the handshake: prove who we are again with the bootstrap credential (a join
    // token file is read again: the operator may have put a new token there).
    let orphaned = valid && !store.own_chain_trusted(unix_now());
    let (client_cert, credential) = if valid && !orphaned && !use_bootstrap {
        (store.chain_and_key(), None)
    } else {
        let credential = match &mode.bootstrap {
            Bootstrap::TokenFile(path) => Credential::ServiceAccountToken(read_secret(path).await?),
            Bootstrap::JoinTokenFile(_) if join_spent && !orphaned => {
                return Err(IssueError::JoinTokenSpent);
            }
            Bootstrap::JoinTokenFile(path) => Credential::JoinToken(read_secret(path).await?),
        };
        (None, Some(credential))
    };
    let mut client =
        ca_client::connect(&endpoint_with_bundle(&mode.endpoint, store), client_cert).await?;
    let resp = client
        .issue(IssueRequest {
            csr: csr.der().to_vec(),
            credential,
            ttl_seconds: mode
                .ttl
                .map(|t| u32::try_from(t.as_secs()).unwrap_or(u32::MAX))
                .unwrap_or(0),
        })
        .await
        .map_err(|s| IssueError::Status {
            code: s.code(),
            message: s.message().to_owned(),
            retry_after: s
                .metadata()
                .get("retry-after-ms")
                .and_then(|v| v.to_str().ok())
                .and_then(|v| v.parse().ok())
                .map(Duration::from_millis),
        })?
        .into_inner();
    if resp.cert_chain.is_empty() || resp.trust_anchors.is_empty() {
        return Err(IssueError::Response("empty chain or bundle".into()));
    }
    let creds = Credentials {
        chain: resp
            .cert_chain
            .into_iter()
            .map(CertificateDer::from)
            .collect(),
        key: PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(key.serialize_der())),
        roots: resp
            .trust_anchors
            .into_iter()
            .map(CertificateDer::from)
            .collect(),
    };
    Ok((store.set_certificate(creds)?, resp.bundle_version))
}

async fn read_secret(path: &PathBuf) -> Result<String, IssueError> {
    tokio::fs::read_to_string(path)
        .await
        .map(|s| s.trim().to_owned())
        .map_err(|source| IssueError::Credential {
            path: path.clone(),
            source,
        })
}

/// Keeps a valid certificate in the store for as long as the sidecar runs.
pub async fn run_issuer(
    mode: CaMode,
    store: Arc<CredentialStore>,
    metrics: Metrics,
    life: Arc<Lifecycle>,
    mut shutdown: watch::Receiver<bool>,
) {
    let mut backoff = Backoff::for_lifetime(mode.ttl.unwrap_or(Duration::from_secs(3600)));
    let mut use_bootstrap = false;
    let mut join_spent = false;
    loop {
        let wait = match issue_once(&mode, &store, use_bootstrap, join_spent).await {
            Ok((snapshot, bundle_version)) => {
                // The response's trust anchors are that bundle version; it is in use from now on.
                life.applied_version
                    .fetch_max(bundle_version, std::sync::atomic::Ordering::Relaxed);
                let id = &snapshot.identity;
                let lifetime = Duration::from_secs((id.not_after - unix_now()).max(1) as u64);
                backoff = Backoff::for_lifetime(lifetime);
                use_bootstrap = false;
                if matches!(mode.bootstrap, Bootstrap::JoinTokenFile(_)) {
                    join_spent = true;
                }
                metrics
                    .renewals
                    .get_or_create(&ResultLabels { result: "success" })
                    .inc();
                metrics.last_renewal.set(unix_now());
                metrics.record_snapshot(&snapshot);
                life.renewed.notify_one();
                let wait = refresh_in(unix_now(), id.not_after, random_unit() * 2.0 - 1.0);
                tracing::info!(
                    id = %id.id,
                    serial = %id.serial_hex,
                    not_after = id.not_after,
                    renew_in_s = wait.as_secs_f64(),
                    "certificate issued"
                );
                wait
            }
            Err(error) => {
                metrics
                    .renewals
                    .get_or_create(&ResultLabels { result: "failure" })
                    .inc();
                // A refused renewal (our certificate no longer accepted) falls back to the
                // bootstrap credential when it can be used again.
                if let IssueError::Status { code, .. } = &error
                    && matches!(
                        code,
                        tonic::Code::Unauthenticated | tonic::Code::PermissionDenied
                    )
                {
                    use_bootstrap = matches!(mode.bootstrap, Bootstrap::TokenFile(_));
                }
                let wait = backoff.next_delay(random_unit(), error.retry_after());
                let valid = store.current().is_some_and(|s| s.valid_at(unix_now()));
                tracing::warn!(
                    %error,
                    retry_in_s = wait.as_secs_f64(),
                    holding_valid_certificate = valid,
                    "certificate request failed"
                );
                wait
            }
        };
        tokio::select! {
            () = tokio::time::sleep(wait) => {}
            () = life.renew_now.notified() => {
                tracing::warn!("the CA asked for an immediate renewal");
            }
            () = stopped(&mut shutdown) => return,
        }
    }
}

/// Follows the CA's trust bundle stream, reconnecting with backoff when it breaks.
pub async fn run_bundle_watch(
    mode: CaMode,
    store: Arc<CredentialStore>,
    metrics: Metrics,
    life: Arc<Lifecycle>,
    mut shutdown: watch::Receiver<bool>,
) {
    let mut backoff = Backoff::new(Duration::from_millis(200), Duration::from_secs(10));
    // The CA counts a stream as a connected sidecar (the one the rotation gates wait for) only when
    // it was opened with a certificate: open it once the first certificate is there.
    while store.chain_and_key().is_none() {
        tokio::select! {
            () = life.renewed.notified() => {}
            () = stopped(&mut shutdown) => return,
        }
    }
    loop {
        let result = async {
            let endpoint = endpoint_with_bundle(&mode.endpoint, &store);
            let mut stream = open_bundle_stream(&endpoint, &store, &life).await?;
            loop {
                let msg = tokio::select! {
                    m = stream.message() => m,
                    () = life.renewed.notified() => {
                        if let Err(error) = acknowledge(&mode, &store, &life).await {
                            tracing::warn!(%error, "acknowledging the new certificate failed");
                        }
                        continue;
                    }
                    () = stopped(&mut shutdown) => return Ok(()),
                };
                let bundle = match msg {
                    Ok(Some(b)) => b,
                    Ok(None) => return Err(IssueError::Response("bundle stream ended".into())),
                    Err(s) => return Err(IssueError::Response(s.message().to_owned())),
                };
                backoff.reset();
                if bundle.renew_now {
                    life.renew_now.notify_one();
                }
                let roots: Vec<CertificateDer<'static>> =
                    bundle.roots.into_iter().map(CertificateDer::from).collect();
                if store.current().is_none() {
                    continue;
                }
                if roots.is_empty() || roots == store.roots() {
                    life.applied_version
                        .store(bundle.version, std::sync::atomic::Ordering::Relaxed);
                    if let Err(error) = acknowledge(&mode, &store, &life).await {
                        tracing::warn!(%error, "acknowledging the trust bundle failed");
                    }
                    continue;
                }
                match store.set_bundle(roots) {
                    Ok(snapshot) => {
                        metrics
                            .bundle_updates
                            .get_or_create(&ResultLabels { result: "applied" })
                            .inc();
                        metrics.record_snapshot(&snapshot);
                        tracing::info!(version = bundle.version, anchors = snapshot.anchors.len(), "trust bundle updated");
                        life.applied_version
                            .store(bundle.version, std::sync::atomic::Ordering::Relaxed);
                        if let Err(error) = acknowledge(&mode, &store, &life).await {
                            tracing::warn!(%error, "acknowledging the trust bundle failed");
                        }
                    }
                    Err(error) => {
                        metrics
                            .bundle_updates
                            .get_or_create(&ResultLabels { result: "rejected" })
                            .inc();
                        tracing::error!(%error, "trust bundle update rejected; keeping the current one");
                    }
                }
            }
        }
        .await;
        if *shutdown.borrow() {
            return;
        }
        if let Err(error) = result {
            tracing::warn!(%error, "trust bundle stream broken; reconnecting");
        }
        let wait = backoff.next_delay(random_unit(), None);
        tokio::select! {
            () = tokio::time::sleep(wait) => {}
            () = stopped(&mut shutdown) => return,
        }
    }
}
