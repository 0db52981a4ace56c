//! CA mode: get a certificate at start, renew it well before expiry with a fresh key, follow the trust
//! bundle stream, and survive CA outages. Everything lands in the [`CredentialStore`].
//!
//! Keys are ECDSA P-256, generated in memory for every CSR; they never touch disk or logs.

use std::path::{Path, PathBuf};
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
use meshid_identity::jwt_svid::JwtKey;
use meshid_identity::revocation::{RevocationSet, Revoked};
use meshid_identity::timing::{Backoff, random_unit, refresh_in, retry_wait};
use meshid_identity::{CertIdentity, SpiffeId};
use meshid_runtime::net::stopped;
use meshid_runtime::time::{sleep_wall, unix_now};

/// What the issuer and the bundle watcher share.
#[derive(Debug)]
pub struct Lifecycle {
    /// A random ID for this sidecar process, so the CA can count it once.
    pub instance_id: String,
    /// The bundle version applied to new handshakes (0: none yet).
    pub applied_version: std::sync::atomic::AtomicU64,
    /// Signalled by the bundle stream when the CA asks everyone to renew now.
    pub renew_now: tokio::sync::Notify,
    /// The bundle version whose "renew now" was last taken (0: none): the CA marks every message
    /// of that version so, the first of each new stream too, and the renewal itself opens a new
    /// stream, so taking each one renewed in a loop until the version moved on.
    pub renew_now_version: std::sync::atomic::AtomicU64,
    /// Signalled by the issuer after each new certificate (so it is acknowledged).
    pub renewed: tokio::sync::Notify,
    /// The bundle stream's connection while it is open, for renewals to share.
    pub stream_conn: StreamConn,
    /// The trust domain's JWT-SVID keys, as the bundle stream last carried them (`None` until
    /// the first bundle message).
    pub jwt_keys: watch::Sender<Option<Arc<Vec<JwtKey>>>>,
}

/// The connection that carries our bundle stream, published while the stream is open, and the leaf
/// certificate it presents. A renewal presents that same certificate, so it goes over this
/// connection as one more HTTP/2 stream instead of a connection of its own: the CA holds one
/// connection per sidecar, and a CA at its `--max-connections` with every slot taken by bundle
/// streams still renews everyone (a connection per renewal would be refused at accept, and the
/// stream it waits beside would hold its slot until the certificate expired).
#[derive(Debug, Default)]
pub struct StreamConn(std::sync::Mutex<Option<(Vec<u8>, ca_client::CaClient)>>);

impl StreamConn {
    fn lock(&self) -> std::sync::MutexGuard<'_, Option<(Vec<u8>, ca_client::CaClient)>> {
        self.0.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The open stream's connection, if it presents the certificate `leaf`.
    pub fn presenting(&self, leaf: &[u8]) -> Option<ca_client::CaClient> {
        self.lock()
            .as_ref()
            .filter(|(l, _)| l.as_slice() == leaf)
            .map(|(_, c)| c.clone())
    }

    /// Publishes `client` (presenting `leaf`) until the returned guard is dropped.
    fn publish(&self, leaf: &[u8], client: &ca_client::CaClient) -> Published<'_> {
        *self.lock() = Some((leaf.to_vec(), client.clone()));
        Published(self)
    }
}

/// Withdraws the published connection when the stream ends (its last clone then closes it).
struct Published<'a>(&'a StreamConn);

impl Drop for Published<'_> {
    fn drop(&mut self) {
        self.0.lock().take();
    }
}

impl Lifecycle {
    pub fn new() -> Self {
        let mut b = [0u8; 16];
        let _ = aws_lc_rs::rand::fill(&mut b);
        Self {
            instance_id: meshid_identity::identity::hex(&b),
            applied_version: Default::default(),
            renew_now: Default::default(),
            renew_now_version: Default::default(),
            renewed: Default::default(),
            stream_conn: StreamConn::default(),
            jwt_keys: watch::Sender::new(None),
        }
    }
}

/// At most this many JWT keys in a bundle (one per authority in it: two or three in a rotation).
pub const MAX_JWT_KEYS: usize = 16;

/// The JWT keys of a bundle message, each checked to be a P-256 public key under an ID.
fn jwt_keys(keys: Vec<meshid_proto::ca::v1::JwtKey>) -> Result<Vec<JwtKey>, String> {
    if keys.len() > MAX_JWT_KEYS {
        return Err(format!("{} JWT keys; at most {MAX_JWT_KEYS}", keys.len()));
    }
    keys.iter()
        .map(|k| JwtKey::new(&k.key_id, &k.public_key).map_err(|e| e.to_string()))
        .collect()
}

impl Default for Lifecycle {
    fn default() -> Self {
        Self::new()
    }
}

/// Tells the CA which bundle version we use and which certificate we serve, on `client`: the
/// connection that carries our bundle stream and presents that certificate (the CA takes an
/// acknowledgement only for the certificate on its connection, whose stream is open there).
async fn send_ack(
    client: &mut ca_client::CaClient,
    chain: &[CertificateDer<'static>],
    life: &Lifecycle,
    version: u64,
    file_mode: bool,
) -> Result<(), IssueError> {
    client
        .ack_trust_bundle(meshid_proto::ca::v1::AckTrustBundleRequest {
            instance_id: life.instance_id.clone(),
            bundle_version: version,
            serving_chain: chain.iter().map(|c| c.to_vec()).collect(),
            file_mode,
            held_version: life
                .applied_version
                .load(std::sync::atomic::Ordering::Relaxed),
        })
        .await
        .map_err(|s| IssueError::Response(s.message().to_owned()))?;
    Ok(())
}

/// File mode with `--report-ca-addr`: keeps a bundle stream open so the CA counts this sidecar, and
/// reports the certificate it serves (again whenever the files change it). Of the CA's bundle only
/// the revocations are applied ([`apply_reported_revocations`]): certificate and anchors stay the
/// files'. The CA lists the sidecar as unknown.
pub async fn run_file_mode_report(
    endpoint: CaEndpoint,
    store: Arc<CredentialStore>,
    metrics: Metrics,
    mut shutdown: watch::Receiver<bool>,
) {
    let life = Lifecycle::new();
    let mut backoff = Backoff::new(Duration::from_millis(500), Duration::from_secs(30));
    // The version of the last bundle whose revocations replaced those in force, across
    // reconnections: the next stream may reach a replica that has not read the last change yet.
    let mut applied = 0u64;
    loop {
        let result = async {
            let endpoint = endpoint_with_bundle(&endpoint, &store);
            let mut conn = BundleStream::open(&endpoint, &store, &life, true).await?;
            let mut reported: Option<Vec<u8>> = None;
            let mut tick = tokio::time::interval(Duration::from_secs(5));
            loop {
                tokio::select! {
                    m = conn.stream.message() => match m {
                        Ok(Some(bundle)) => {
                            apply_reported_revocations(
                                &store,
                                &metrics,
                                (bundle.version, &mut applied),
                                &bundle.revoked,
                            );
                            reported = None;
                        }
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
                    if leaf.as_deref() != conn.leaf() {
                        // The files brought a new certificate: report it on a stream of its own.
                        return Err(IssueError::Response("new certificate; reconnecting".into()));
                    }
                    match send_ack(&mut conn.client, &conn.chain, &life, 0, true).await {
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

/// File mode: the revocations of the CA's bundle on the report stream (`entries`, of bundle
/// `version`) replace those in force, as a CA-mode sidecar takes them, so a revoked peer is refused
/// here too and its connections closed. A bundle older than the last one applied (`applied`: a
/// replica that has not read the CA directory's last change yet, reached after a reconnection)
/// lifts nothing: its revocations are added to those in force. A list that cannot be read
/// changes nothing.
fn apply_reported_revocations(
    store: &CredentialStore,
    metrics: &Metrics,
    (version, applied): (u64, &mut u64),
    entries: &[meshid_proto::ca::v1::Revocation],
) {
    let held = store.revocations();
    let older = version < *applied;
    let revoked = match revocations(entries, unix_now()) {
        Ok((set, unreadable)) if unreadable.is_empty() && !older => {
            *applied = version;
            set
        }
        Ok((set, unreadable)) if older => {
            say_unreadable(&unreadable);
            tracing::info!(
                offered = version,
                in_force = *applied,
                "the CA's bundle is older than the one in force: only its revocations added"
            );
            held.union(&set).unwrap_or_else(|_| (*held).clone())
        }
        // Entries that cannot be read: what can is added, nothing in force is lifted.
        Ok((set, unreadable)) => {
            say_unreadable(&unreadable);
            held.union(&set).unwrap_or_else(|_| (*held).clone())
        }
        Err(error) => {
            tracing::error!(%error, "the revocations of the CA's bundle are refused; keeping those in force");
            return;
        }
    };
    if revoked == *held {
        return;
    }
    let newly = newly_revoked(entries, &held);
    match store.set_revocations(Arc::new(revoked)) {
        Ok(snapshot) => {
            warn_in_force(&newly);
            metrics.record_snapshot(&snapshot);
        }
        Err(error) => {
            tracing::error!(%error, "the revocations of the CA's bundle could not be applied");
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
    // `source` names the path.
    #[error("reading {source}")]
    Credential {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error(
        "the join token in {} was already used (redeemed, or refused by the CA) and there is no \
         certificate the CA accepts to renew with: put a new join token there \
         (`meshid-ca token create`)",
        .0.display()
    )]
    JoinTokenSpent(PathBuf),
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
/// One connection to the CA presenting our current certificate: the bundle stream on it, and the
/// client that acknowledges on the same connection.
struct BundleStream {
    client: ca_client::CaClient,
    stream: tonic::Streaming<meshid_proto::ca::v1::TrustBundle>,
    /// The certificate presented on this connection (empty before the first one).
    chain: Vec<CertificateDer<'static>>,
}

impl BundleStream {
    /// Opens the bundle stream, presenting our certificate (if any yet) so the CA counts this
    /// sidecar as connected: the instance it registers is that certificate's key.
    async fn open(
        endpoint: &CaEndpoint,
        store: &CredentialStore,
        life: &Lifecycle,
        file_mode: bool,
    ) -> Result<Self, IssueError> {
        let cert = store.chain_and_key();
        let chain = cert.as_ref().map(|(c, _)| c.clone()).unwrap_or_default();
        let mut client = ca_client::connect(endpoint, cert).await?;
        let stream = client
            .watch_trust_bundle(WatchTrustBundleRequest {
                instance_id: life.instance_id.clone(),
                file_mode,
            })
            .await
            .map_err(|s| IssueError::Response(s.message().to_owned()))?
            .into_inner();
        Ok(Self {
            client,
            stream,
            chain,
        })
    }

    fn leaf(&self) -> Option<&[u8]> {
        self.chain.first().map(|c| c.as_ref())
    }

    /// Acknowledges `version` for the certificate on this connection.
    async fn ack(&mut self, life: &Lifecycle, version: u64) -> Result<(), IssueError> {
        if self.chain.is_empty() {
            return Ok(());
        }
        send_ack(&mut self.client, &self.chain, life, version, false).await
    }

    /// Acknowledges `version`; when the CA does not take it, what to try again and when
    /// (`earlier`: the failed attempts so far at this version, whose backoff continues).
    async fn ack_or_retry(
        &mut self,
        life: &Lifecycle,
        version: u64,
        earlier: Option<UnackedBundle>,
    ) -> Option<UnackedBundle> {
        let error = self.ack(life, version).await.err()?;
        let mut backoff = earlier
            .filter(|u| u.version == version)
            .map_or_else(UnackedBundle::backoff, |u| u.backoff);
        let wait = backoff.next_delay(random_unit(), None);
        tracing::warn!(%error, version, retry_in = ?wait, "acknowledging the trust bundle failed; trying again");
        Some(UnackedBundle {
            version,
            retry_at: tokio::time::Instant::now() + wait,
            backoff,
        })
    }
}

/// A bundle version the CA has not taken our acknowledgement of. A rotation's gates wait for every
/// sidecar's acknowledgement, so one lost call must not hold a rotation until the next bundle:
/// it is sent again (1 s, doubling to 30 s, jittered) on the same connection until the CA takes
/// it or a newer bundle replaces it.
struct UnackedBundle {
    version: u64,
    retry_at: tokio::time::Instant,
    backoff: Backoff,
}

impl UnackedBundle {
    fn backoff() -> Backoff {
        Backoff::new(Duration::from_secs(1), Duration::from_secs(30))
    }
}

/// Counts and logs a bundle older than the one in force that is not acknowledged
/// (`bundle_updates_total{result="older"}`).
fn not_acknowledged_older(metrics: &Metrics, version: u64, in_force: u64) {
    metrics
        .bundle_updates
        .get_or_create(&ResultLabels { result: "older" })
        .inc();
    tracing::warn!(
        offered = version,
        in_force,
        "trust bundle older than the one in force: only its revocations are taken, and it is not \
         acknowledged (a rotation would count this sidecar as trusting roots it does not hold). \
         A CA process restarted after numbering bundle changes of its own serves lower versions: \
         restart this sidecar to take the CA's bundle as it is now"
    );
}

/// Sleeps until `at`, or forever when there is nothing to wait for.
async fn sleep_until_some(at: Option<tokio::time::Instant>) {
    match at {
        Some(at) => tokio::time::sleep_until(at).await,
        None => std::future::pending().await,
    }
}

/// `endpoint` trusting the bundle the sidecar holds (its roots, and the intermediates trust under
/// a shared root is pinned to) in place of its own roots once there is one: the configured roots
/// (`--ca-bundle`, and those of `--bundle-cache` read at start) only reach the CA for the first
/// certificate. Kept beside the bundle, a root the CA has since retired (`rotate retire --force`,
/// its key lost) would go on vouching for whoever serves a certificate of it at the CA's address,
/// for as long as the pod lives. The CA's own certificate always chains to its bundle: a new root
/// is in the bundle before the CA serves from it.
fn endpoint_with_bundle(endpoint: &CaEndpoint, store: &CredentialStore) -> CaEndpoint {
    let roots = store.roots();
    if roots.is_empty() {
        return endpoint.clone();
    }
    CaEndpoint {
        roots,
        pinned: store.pinned(),
        ..endpoint.clone()
    }
}

/// The credential an issuance presented.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Presented {
    /// Our current certificate (a renewal).
    Certificate,
    ServiceAccountToken,
    JoinToken,
}

impl Presented {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Certificate => "certificate",
            Self::ServiceAccountToken => "service_account_token",
            Self::JoinToken => "join_token",
        }
    }
}

/// What the issuer carries from one attempt to the next.
#[derive(Debug, Default)]
pub struct IssuerState {
    /// The CA refused our certificate as a renewal credential (its root left the bundle, or the
    /// identity was attested too long ago): attest again with the bootstrap credential.
    pub reattest: bool,
    /// SHA-256 of the last join token this process sent and the CA redeemed or refused. A join
    /// token is good once: the same file content is not sent again; a new one (the operator's way
    /// to attest a join-token workload again) is, at the next request.
    pub used_join_token: Option<[u8; 32]>,
    /// What the last attempt presented (`None` when it failed before choosing).
    pub presented: Option<Presented>,
}

fn token_digest(token: &str) -> [u8; 32] {
    let mut out = [0u8; 32];
    out.copy_from_slice(
        aws_lc_rs::digest::digest(&aws_lc_rs::digest::SHA256, token.as_bytes()).as_ref(),
    );
    out
}

/// One issuance: a fresh key, a CSR, and whichever credential fits: our valid certificate first,
/// unless the CA refused it (then the service-account token), and a join token not used yet
/// before anything (it starts a new lineage).
pub async fn issue_once(
    mode: &CaMode,
    store: &CredentialStore,
    state: &mut IssuerState,
    stream_conn: &StreamConn,
) -> Result<(Arc<Snapshot>, u64), IssueError> {
    state.presented = None;
    let key = KeyPair::generate()?;
    let csr = CertificateParams::default().serialize_request(&key)?;
    let valid = store
        .current()
        .is_some_and(|s| s.identity.not_after > unix_now() + 1);
    // After a forced root retirement our certificate no longer chains to the bundle and the CA
    // refuses it at the handshake: prove who we are again with the bootstrap credential (a join
    // token file is read again: the operator may have put a new token there).
    let orphaned = valid && !store.own_chain_trusted(unix_now());
    let renewable = valid && !orphaned;
    let mut redeeming = None;
    let (client_cert, credential) = match &mode.bootstrap {
        Bootstrap::TokenFile(_) if renewable && !state.reattest => (store.chain_and_key(), None),
        Bootstrap::TokenFile(path) => (
            None,
            Some(Credential::ServiceAccountToken(read_secret(path).await?)),
        ),
        // The file is read at every request: a join token put there (after the CA refused our
        // certificate, or ahead of it) is redeemed at once, and its expiry may be short.
        Bootstrap::JoinTokenFile(path) => {
            let token = read_secret(path).await;
            match (token, state.used_join_token) {
                (Ok(token), used) if used != Some(token_digest(&token)) => {
                    redeeming = Some(token_digest(&token));
                    (None, Some(Credential::JoinToken(token)))
                }
                (Err(e), None) if !renewable => return Err(e),
                // Only a token already used (or no readable file): renew, also after the CA
                // refused our certificate (its operator may raise the attestation age); without
                // a certificate the CA may take there is nothing left to present.
                _ if renewable => (store.chain_and_key(), None),
                _ => return Err(IssueError::JoinTokenSpent(path.clone())),
            }
        }
    };
    state.presented = Some(match &credential {
        None => Presented::Certificate,
        Some(Credential::ServiceAccountToken(_)) => Presented::ServiceAccountToken,
        Some(Credential::JoinToken(_)) => Presented::JoinToken,
    });
    let req = issue_request(mode, &csr, credential);
    let resp = send_issue(mode, store, stream_conn, client_cert, req).await?;
    // A join token the CA redeemed, or refused (used, expired, unknown), is not sent again; one it
    // could not look at (rate limit, outage) is.
    if redeeming.is_some()
        && resp.as_ref().map_or_else(
            |s| {
                matches!(
                    s.code(),
                    tonic::Code::Unauthenticated | tonic::Code::PermissionDenied
                )
            },
            |_| true,
        )
    {
        state.used_join_token = redeeming;
    }
    let resp = resp.map_err(status_error)?.into_inner();
    install(store, resp, private_key(&key))
}

/// Puts the certificate of the CA's answer `resp` (for `key`) in force, with the revocations the
/// CA listed at its bundle version added to those in force: they hold from this certificate on,
/// also before the bundle stream delivers them (or while the CA turns the stream away), and only a
/// trust bundle lifts one. A list that cannot be read adds nothing (the bundle's own check then
/// says why); the certificate is taken all the same. Returns the response's bundle version.
fn install(
    store: &CredentialStore,
    resp: meshid_proto::ca::v1::IssueResponse,
    key: PrivateKeyDer<'static>,
) -> Result<(Arc<Snapshot>, u64), IssueError> {
    let version = resp.bundle_version;
    let revoked = match revocations(&resp.revoked, unix_now()) {
        Ok((set, unreadable)) => {
            say_unreadable(&unreadable);
            set
        }
        Err(error) => {
            tracing::error!(%error, "the revocations listed with the new certificate are refused; enforcing those of the trust bundle");
            RevocationSet::default()
        }
    };
    let newly = newly_revoked(&resp.revoked, &store.revocations());
    let snapshot = store.set_certificate_revoking(credentials(resp, key)?, &revoked, version)?;
    let in_force = store.revocations();
    warn_in_force(newly.iter().filter(|r| in_force.contains(&r.0)));
    Ok((snapshot, version))
}

/// `key` as a certificate set holds it.
fn private_key(key: &KeyPair) -> PrivateKeyDer<'static> {
    PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(key.serialize_der()))
}

/// The credentials an Issue response gives, with the key the CSR was made from.
fn credentials(
    resp: meshid_proto::ca::v1::IssueResponse,
    key: PrivateKeyDer<'static>,
) -> Result<Credentials, IssueError> {
    if resp.cert_chain.is_empty() || resp.trust_anchors.is_empty() {
        return Err(IssueError::Response("empty chain or bundle".into()));
    }
    let ders = |v: Vec<Vec<u8>>| v.into_iter().map(CertificateDer::from).collect();
    Ok(Credentials {
        chain: ders(resp.cert_chain),
        key,
        roots: ders(resp.trust_anchors),
        pinned: ders(resp.pinned_intermediates),
    })
}

/// An Issue request for `csr`, with `credential` (none: a renewal on the presented certificate) and
/// the lifetime we ask for.
fn issue_request(
    mode: &CaMode,
    csr: &rcgen::CertificateSigningRequest,
    credential: Option<Credential>,
) -> IssueRequest {
    IssueRequest {
        csr: csr.der().to_vec(),
        credential,
        ttl_seconds: mode
            .ttl
            .map(|t| u32::try_from(t.as_secs()).unwrap_or(u32::MAX))
            .unwrap_or(0),
        app_svid: false,
    }
}

/// Sends an Issue request presenting `client_cert` (if any). A renewal presents our certificate:
/// over the bundle stream's connection when that one presents it too (see [`StreamConn`]). Should
/// that connection have broken under us, a connection of our own follows at once. The outer error
/// is about reaching the CA; the inner result is the CA's answer.
async fn send_issue(
    mode: &CaMode,
    store: &CredentialStore,
    stream_conn: &StreamConn,
    client_cert: Option<(Vec<CertificateDer<'static>>, PrivateKeyDer<'static>)>,
    req: IssueRequest,
) -> Result<Result<tonic::Response<meshid_proto::ca::v1::IssueResponse>, tonic::Status>, IssueError>
{
    call_ca(mode, store, stream_conn, client_cert, |mut client| {
        let req = req.clone();
        async move { client.issue(req).await }
    })
    .await
}

/// Makes one call to the CA presenting `client_cert` (if any): over the bundle stream's connection
/// when that one presents the same certificate, else (or should that connection have broken under
/// us) over a connection of its own.
async fn call_ca<T, F, Fut>(
    mode: &CaMode,
    store: &CredentialStore,
    stream_conn: &StreamConn,
    client_cert: Option<(Vec<CertificateDer<'static>>, PrivateKeyDer<'static>)>,
    call: F,
) -> Result<Result<tonic::Response<T>, tonic::Status>, IssueError>
where
    F: Fn(ca_client::CaClient) -> Fut,
    Fut: Future<Output = Result<tonic::Response<T>, tonic::Status>>,
{
    let shared = client_cert
        .as_ref()
        .and_then(|(chain, _)| chain.first())
        .and_then(|leaf| stream_conn.presenting(leaf));
    if let Some(client) = shared {
        match call(client).await {
            Err(s) if connection_failed(&s) => {
                tracing::debug!(error = %s, "call on the bundle stream's connection failed; connecting");
            }
            answered => return Ok(answered),
        }
    }
    let client =
        ca_client::connect(&endpoint_with_bundle(&mode.endpoint, store), client_cert).await?;
    Ok(call(client).await)
}

/// A JWT-SVID for this sidecar's identity and `audience`, asked for on the sidecar's current
/// certificate (the CA's `IssueJwtSvid`). The CA's answer is checked before use: the token must
/// verify under the bundle's JWT keys, for the first audience, for this sidecar's own identity.
/// Returned with what verified (its key: a cached token is handed out only while that key is in
/// the bundle).
pub async fn issue_jwt_svid(
    mode: &CaMode,
    store: &CredentialStore,
    stream_conn: &StreamConn,
    keys: &[meshid_identity::jwt_svid::JwtKey],
    audience: Vec<String>,
) -> Result<
    (
        meshid_proto::ca::v1::IssueJwtSvidResponse,
        meshid_identity::jwt_svid::Verified,
    ),
    IssueError,
> {
    let now = unix_now();
    let own = store
        .current()
        .filter(|s| s.identity.not_after > now + 1 && store.own_chain_trusted(now))
        .ok_or_else(|| IssueError::Response("no certificate of our own the CA takes yet".into()))?;
    let first = audience.first().cloned().unwrap_or_default();
    let req = meshid_proto::ca::v1::IssueJwtSvidRequest { audience };
    let resp = call_ca(
        mode,
        store,
        stream_conn,
        store.chain_and_key(),
        |mut client| {
            let req = req.clone();
            async move { client.issue_jwt_svid(req).await }
        },
    )
    .await?
    .map_err(status_error)?
    .into_inner();
    let verified = meshid_identity::jwt_svid::verify(
        &resp.token,
        &first,
        keys,
        &own.identity.id.trust_domain(),
        unix_now(),
    )
    .map_err(|e| IssueError::Response(format!("the CA's JWT-SVID does not check out: {e}")))?;
    if verified.id != own.identity.id {
        return Err(IssueError::Response(format!(
            "the CA issued a JWT-SVID for {}, not for this sidecar's {}",
            verified.id, own.identity.id
        )));
    }
    Ok((resp, verified))
}

/// The CA's refusal, with its `retry-after-ms` hint.
fn status_error(s: tonic::Status) -> IssueError {
    IssueError::Status {
        code: s.code(),
        message: s.message().to_owned(),
        retry_after: s
            .metadata()
            .get("retry-after-ms")
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.parse().ok())
            .map(Duration::from_millis),
    }
}

/// An X.509-SVID for the app behind this sidecar (served on the SPIFFE Workload API): a key of its
/// own, never the sidecar's, and a certificate for the sidecar's identity. Asked for presenting the
/// sidecar's current certificate (over the bundle stream's connection when it is open), marked as an
/// app SVID (`app_svid`), so it needs no credential of its own and is never one at the CA; checked like the sidecar's own certificate (key
/// matches the leaf, chain verifies to the bundle both ways, the same SPIFFE ID) before it is used.
pub async fn issue_for_app(
    mode: &CaMode,
    store: &CredentialStore,
    stream_conn: &StreamConn,
) -> Result<super::AppSvid, IssueError> {
    let now = unix_now();
    let own = store
        .current()
        .filter(|s| s.identity.not_after > now + 1 && store.own_chain_trusted(now))
        .ok_or_else(|| IssueError::Response("no certificate of our own the CA takes yet".into()))?;
    let client_cert = store.chain_and_key();
    let key = KeyPair::generate()?;
    let csr = CertificateParams::default().serialize_request(&key)?;
    // Marked as the app's: the CA writes the app-SVID mark into it, so that the app, which holds
    // its key, cannot use it as this sidecar's credential (renew it, get JWT-SVIDs, open bundle
    // streams), and ends it no later than our own certificate.
    let req = IssueRequest {
        app_svid: true,
        ..issue_request(mode, &csr, None)
    };
    let resp = send_issue(mode, store, stream_conn, client_cert, req)
        .await?
        .map_err(status_error)?
        .into_inner();
    let creds = credentials(resp, private_key(&key))?;
    let chain = creds.chain.clone();
    let identity = check_app_svid(store, &own.identity.id, creds)?;
    Ok(super::AppSvid {
        id: identity.id,
        chain,
        key: key.serialize_der(),
        not_before: identity.not_before,
        not_after: identity.not_after,
        // As revocations name serials (no leading zeros), whatever the CA's serials look like.
        serial: meshid_identity::revocation::normalize_serial(&identity.serial_hex)
            .unwrap_or(identity.serial_hex),
        lineage: identity.lineage,
        issued_on: own.leaf_sha256.clone(),
    })
}

/// The CA's answer to our request for the app's SVID (`creds`), checked before the app gets it: as
/// our own certificate is, for our own identity `own`, and marked as an app SVID.
fn check_app_svid(
    store: &CredentialStore,
    own: &SpiffeId,
    creds: Credentials,
) -> Result<CertIdentity, IssueError> {
    let identity = store.check(creds)?;
    if identity.id != *own {
        return Err(IssueError::Response(format!(
            "the CA issued the app an SVID for {}, not for this sidecar's {own}",
            identity.id
        )));
    }
    // Unmarked (a CA older than the mark, during its upgrade), the app's certificate would be a
    // credential the CA cannot tell from this sidecar's: the app could renew it past the pod's
    // life, get JWT-SVIDs and open bundle streams as this sidecar, and spend its renewal budget.
    if !identity.app_svid {
        return Err(IssueError::Response(
            "the CA issued the app an SVID without the app-SVID mark (a CA older than the mark?): \
             not handed to the app, which could then stand for this sidecar at the CA"
                .into(),
        ));
    }
    Ok(identity)
}

impl IssueError {
    /// The CA's new certificate was refused as expired or not yet valid: our clock disagrees with
    /// the CA's by more than the certificate's validity allows.
    pub fn is_clock_skew(&self) -> bool {
        matches!(
            self,
            IssueError::Store(CredError::Chain(e))
                if matches!(
                    meshid_identity::verify::failure_label(e),
                    "expired" | "not_yet_valid"
                )
        )
    }
}

/// A call that failed for the connection's sake (the CA itself never answers these codes).
fn connection_failed(s: &tonic::Status) -> bool {
    matches!(
        s.code(),
        tonic::Code::Unavailable | tonic::Code::Unknown | tonic::Code::Cancelled
    )
}

/// The most bytes read of a token file (a projected service-account token is about 1 KiB, a join
/// token less): a file that never ends is refused rather than read.
pub const MAX_TOKEN_FILE_BYTES: u64 = 64 * 1024;

/// A token file's text, trimmed; only a regular file is read, never a FIFO or a device
/// ([`meshid_runtime::file::read_regular`]).
async fn read_secret(path: &Path) -> Result<String, IssueError> {
    let file = path.to_path_buf();
    let read = tokio::task::spawn_blocking(move || {
        let bytes = meshid_runtime::file::read_regular(&file, MAX_TOKEN_FILE_BYTES)?;
        String::from_utf8(bytes).map_err(|_| {
            std::io::Error::new(
                std::io::ErrorKind::InvalidData,
                format!("{}: not UTF-8 text", file.display()),
            )
        })
    })
    .await
    .unwrap_or_else(|join| Err(std::io::Error::other(format!("{}: {join}", path.display()))));
    read.map(|s| s.trim().to_owned())
        .map_err(|source| IssueError::Credential {
            path: path.to_path_buf(),
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
    let mut state = IssuerState::default();
    loop {
        let wait = match issue_once(&mode, &store, &mut state, &life.stream_conn).await {
            Ok((snapshot, bundle_version)) => {
                // The response's trust anchors are that bundle version; it is in use from now on.
                life.applied_version
                    .fetch_max(bundle_version, std::sync::atomic::Ordering::Relaxed);
                let id = &snapshot.identity;
                let lifetime = Duration::from_secs((id.not_after - unix_now()).max(1) as u64);
                backoff = Backoff::for_lifetime(lifetime);
                state.reattest = false;
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
                    credential = state.presented.map_or("", Presented::as_str),
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
                let refused = matches!(
                    &error,
                    IssueError::Status {
                        code: tonic::Code::Unauthenticated | tonic::Code::PermissionDenied,
                        ..
                    }
                );
                let current = store.current();
                let valid = current.as_ref().is_some_and(|s| s.valid_at(unix_now()));
                let not_after = current.as_ref().map_or(0, |s| s.identity.not_after);
                // Sized for the last lifetime, the backoff can reach minutes: never sleep past
                // the expiry of the certificate we serve, and without one (we serve nothing)
                // ask again within seconds.
                let wait = retry_wait(
                    backoff.next_delay(random_unit(), error.retry_after()),
                    valid.then_some(not_after),
                    unix_now(),
                    random_unit(),
                );
                let retry_in_s = wait.as_secs_f64();
                match (&mode.bootstrap, state.presented) {
                    // The CA no longer renews on our certificate (its root left the bundle, or
                    // the identity was last attested longer ago than the CA allows): attest
                    // again with the bootstrap credential.
                    (Bootstrap::TokenFile(_), Some(Presented::Certificate)) if refused => {
                        state.reattest = true;
                        tracing::warn!(
                            %error,
                            retry_in_s,
                            holding_valid_certificate = valid,
                            "the CA refused to renew our certificate; re-attesting with the service-account token"
                        );
                    }
                    // A join token is good once: only the operator can attest us again. Keep
                    // retrying (a new token in the file is redeemed at the next attempt, and the
                    // CA may be reconfigured), and say what fixes it.
                    (Bootstrap::JoinTokenFile(path), Some(Presented::Certificate)) if refused => {
                        tracing::error!(
                            %error,
                            retry_in_s,
                            holding_valid_certificate = valid,
                            certificate_not_after = not_after,
                            join_token_file = %path.display(),
                            "the CA refused to renew our certificate, and a join-token workload \
                             cannot attest again by itself: put a new join token \
                             (`meshid-ca token create --id <this identity>`) in the \
                             --join-token-file before the certificate expires, or have the CA's \
                             operator raise --max-attestation-age; retrying"
                        );
                    }
                    (Bootstrap::JoinTokenFile(path), Some(Presented::JoinToken)) if refused => {
                        tracing::error!(
                            %error,
                            retry_in_s,
                            holding_valid_certificate = valid,
                            join_token_file = %path.display(),
                            "the CA refused the join token: put a new join token \
                             (`meshid-ca token create`) in the --join-token-file; retrying"
                        );
                    }
                    _ if matches!(error, IssueError::JoinTokenSpent(_)) => {
                        tracing::error!(
                            %error,
                            retry_in_s,
                            holding_valid_certificate = valid,
                            "no credential left to present; retrying"
                        );
                    }
                    _ if error.is_clock_skew() => {
                        tracing::error!(
                            %error,
                            retry_in_s,
                            holding_valid_certificate = valid,
                            "the certificate the CA just issued is not valid by this machine's \
                             clock (the CA dates certificates from 5 minutes before it issues them): \
                             this clock is off from the CA's; check its time synchronisation (NTP); \
                             retrying"
                        );
                    }
                    _ => {
                        tracing::warn!(
                            %error,
                            retry_in_s,
                            holding_valid_certificate = valid,
                            "certificate request failed"
                        );
                    }
                }
                wait
            }
        };
        // The wait ends early when the wall clock is stepped forward past it: validity is checked
        // by the wall clock, so renewal must keep to it too.
        tokio::select! {
            () = sleep_wall(wait) => {}
            () = life.renew_now.notified() => {
                // Spread over a second: every sidecar is told at once.
                let mut b = [0u8; 2];
                let _ = aws_lc_rs::rand::fill(&mut b);
                let spread = Duration::from_millis(u64::from(u16::from_le_bytes(b)) % 1_000);
                tracing::warn!(
                    in_ms = spread.as_millis(),
                    "the CA asked for an immediate renewal"
                );
                tokio::select! {
                    () = tokio::time::sleep(spread) => {}
                    () = stopped(&mut shutdown) => return,
                }
            }
            () = stopped(&mut shutdown) => return,
        }
    }
}

/// The revocations a trust bundle carries that are in force at `now` (an entry past its
/// `expires_at_unix` names no live certificate; 0: no expiry), checked: each names exactly one
/// identity or serial. An entry that cannot be read (a CA newer than this sidecar, a corrupt
/// answer) is left out and said (`.1`), and the caller adds what could be read to what is in
/// force: refusing the whole list left a starting sidecar with no revocation at all, and a
/// running one without any new entry. More than
/// [`meshid_identity::revocation::MAX_REVOCATIONS`] entries refuse the list.
pub fn revocations(
    entries: &[meshid_proto::ca::v1::Revocation],
    now: i64,
) -> Result<(RevocationSet, Vec<String>), meshid_identity::revocation::RevocationError> {
    if entries.len() > meshid_identity::revocation::MAX_REVOCATIONS {
        return Err(meshid_identity::revocation::RevocationError::TooMany(
            entries.len(),
        ));
    }
    let mut in_force = Vec::with_capacity(entries.len());
    let mut unreadable = Vec::new();
    for e in entries {
        match RevocationSet::entry(&e.spiffe_id, &e.serial) {
            Ok(entry) if e.expires_at_unix == 0 || now < e.expires_at_unix => in_force.push(entry),
            Ok(_) => {}
            Err(error) => unreadable.push(error.to_string()),
        }
    }
    Ok((RevocationSet::new(in_force)?, unreadable))
}

/// Logs the entries of a revocation list that could not be read (at most three of them).
fn say_unreadable(unreadable: &[String]) {
    if let Some(first) = unreadable.first() {
        tracing::error!(
            count = unreadable.len(),
            first = %first,
            "revocations that cannot be read are left out; the others are added to those in force and none is lifted"
        );
    }
}

/// The entries of `entries` that `held` does not revoke yet, with their reasons (for the log).
fn newly_revoked(
    entries: &[meshid_proto::ca::v1::Revocation],
    held: &RevocationSet,
) -> Vec<(Revoked, String)> {
    entries
        .iter()
        .filter_map(|e| {
            let what = RevocationSet::entry(&e.spiffe_id, &e.serial).ok()?;
            (!held.contains(&what)).then(|| (what, e.reason.chars().take(256).collect()))
        })
        .collect()
}

/// Logs each revocation of `newly` (from [`newly_revoked`]) that has just come into force.
fn warn_in_force<'a>(newly: impl IntoIterator<Item = &'a (Revoked, String)>) {
    for (revoked, reason) in newly {
        tracing::warn!(
            %revoked,
            reason = %reason.escape_debug(),
            "revocation in force: refusing handshakes that present it and closing its connections"
        );
    }
}

/// Why a bundle stream ended without an error.
enum Reconnect {
    /// A new certificate: open a stream with it at once.
    Now,
    Stop,
}

/// The longest wait between two tries to reopen a broken bundle stream. A CA process that
/// replaced another (a crash, an eviction) does not know the sidecars that one served until they
/// reopen theirs, so `rotate activate` waits a while after such a start
/// (`meshid_ca::rotation::gates::RECONNECT_WINDOW_SECONDS`, which counts on this cap).
pub const BUNDLE_RETRY_CAP: Duration = Duration::from_secs(10);

/// Follows the CA's trust bundle stream, reconnecting with backoff when it breaks, and at once with
/// every new certificate.
pub async fn run_bundle_watch(
    mode: CaMode,
    store: Arc<CredentialStore>,
    metrics: Metrics,
    life: Arc<Lifecycle>,
    mut shutdown: watch::Receiver<bool>,
) {
    let mut backoff = Backoff::new(Duration::from_millis(200), BUNDLE_RETRY_CAP);
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
            let mut conn = BundleStream::open(&endpoint, &store, &life, false).await?;
            let _published = conn
                .leaf()
                .map(|leaf| life.stream_conn.publish(leaf, &conn.client));
            let mut unacked: Option<UnackedBundle> = None;
            loop {
                let retry_at = unacked.as_ref().map(|u| u.retry_at);
                let msg = tokio::select! {
                    m = conn.stream.message() => m,
                    () = sleep_until_some(retry_at) => {
                        if let Some(u) = unacked.take() {
                            unacked = conn.ack_or_retry(&life, u.version, Some(u)).await;
                        }
                        continue;
                    }
                    // A new certificate is a new instance for the CA: a stream of its own, on a
                    // connection that presents it (the old stream ends with the old connection).
                    () = life.renewed.notified() => return Ok(Reconnect::Now),
                    () = stopped(&mut shutdown) => return Ok(Reconnect::Stop),
                };
                let mut bundle = match msg {
                    Ok(Some(b)) => b,
                    Ok(None) => return Err(IssueError::Response("bundle stream ended".into())),
                    Err(s) => return Err(IssueError::Response(s.message().to_owned())),
                };
                backoff.reset();
                // Once per version.
                if bundle.renew_now
                    && life
                        .renew_now_version
                        .fetch_max(bundle.version, std::sync::atomic::Ordering::AcqRel)
                        < bundle.version
                {
                    life.renew_now.notify_one();
                }
                // A version is acknowledged only once applied in full: a rotation's gate counts
                // an acknowledgement as "trusts the new authority", JWT-SVIDs signed with its key
                // included.
                let rejected = |why: &str| {
                    metrics
                        .bundle_updates
                        .get_or_create(&ResultLabels { result: "rejected" })
                        .inc();
                    tracing::error!(
                        version = bundle.version,
                        "{why}; this version is not acknowledged"
                    );
                };
                if bundle.roots.is_empty() {
                    rejected("trust bundle without roots rejected; keeping the current one");
                    continue;
                }
                // A version older than the one in force (a replica behind the CA directory, or a
                // CA process restarted after numbering changes of its own above the directory's):
                // only its revocations are taken (`set_bundle_at`), and it is acknowledged only
                // if it carries the trust in force: a rotation's gates read an acknowledgement
                // as "trusts this version's roots".
                let older = bundle.version != 0 && store.bundle_version() > bundle.version;
                let jwt_keys_taken = match jwt_keys(std::mem::take(&mut bundle.jwt_keys)) {
                    // Not taken from an older version (the same keys, or not acknowledged),
                    // unless none are held yet (the first bundle after a certificate from a
                    // replica ahead of this one).
                    Ok(keys) if older && life.jwt_keys.borrow().is_some() => {
                        life.jwt_keys.borrow().as_deref() == Some(&keys)
                    }
                    Ok(keys) => {
                        life.jwt_keys.send_if_modified(|held| {
                            let changed = held.as_deref() != Some(&keys);
                            if changed {
                                *held = Some(Arc::new(keys));
                            }
                            changed
                        });
                        true
                    }
                    Err(error) => {
                        rejected(&format!(
                            "JWT keys of the trust bundle rejected ({error}); keeping the current ones"
                        ));
                        false
                    }
                };
                let roots: Vec<CertificateDer<'static>> =
                    bundle.roots.into_iter().map(CertificateDer::from).collect();
                let pinned: Vec<CertificateDer<'static>> = bundle
                    .pinned_intermediates
                    .into_iter()
                    .map(CertificateDer::from)
                    .collect();
                if store.current().is_none() {
                    continue;
                }
                let revoked = match revocations(&bundle.revoked, unix_now()) {
                    Ok((set, unreadable)) if unreadable.is_empty() => Arc::new(set),
                    // Entries that cannot be read: what can is added, nothing in force lifted.
                    Ok((set, unreadable)) => {
                        say_unreadable(&unreadable);
                        let held = store.revocations();
                        Arc::new(held.union(&set).unwrap_or_else(|_| (*held).clone()))
                    }
                    Err(error) => {
                        metrics
                            .bundle_updates
                            .get_or_create(&ResultLabels { result: "rejected" })
                            .inc();
                        tracing::error!(%error, "trust bundle update rejected (its revocations); keeping the current one");
                        continue;
                    }
                };
                let same_roots = roots == store.roots() && pinned == store.pinned();
                if same_roots && *revoked == *store.revocations() {
                    life.applied_version
                        .fetch_max(bundle.version, std::sync::atomic::Ordering::Relaxed);
                    if jwt_keys_taken {
                        unacked = conn.ack_or_retry(&life, bundle.version, None).await;
                    } else if older {
                        not_acknowledged_older(&metrics, bundle.version, store.bundle_version());
                    }
                    continue;
                }
                let newly_revoked = newly_revoked(&bundle.revoked, &store.revocations());
                match store.set_bundle_at(bundle.version, roots, pinned, revoked) {
                    Ok(snapshot) => {
                        warn_in_force(&newly_revoked);
                        metrics.record_snapshot(&snapshot);
                        // Of an older version, only its revocations were taken: acknowledged
                        // only if its roots, pins and JWT keys are those in force.
                        if older && !(same_roots && jwt_keys_taken) {
                            not_acknowledged_older(&metrics, bundle.version, store.bundle_version());
                            continue;
                        }
                        tracing::info!(version = bundle.version, anchors = snapshot.anchors.len(), "trust bundle updated");
                        life.applied_version
                            .fetch_max(bundle.version, std::sync::atomic::Ordering::Relaxed);
                        // Its anchors and revocations are in force; its JWT keys maybe not
                        // (counted as rejected above).
                        if jwt_keys_taken {
                            metrics
                                .bundle_updates
                                .get_or_create(&ResultLabels { result: "applied" })
                                .inc();
                            unacked = conn.ack_or_retry(&life, bundle.version, None).await;
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
        match result {
            Ok(Reconnect::Now) => continue,
            Ok(Reconnect::Stop) => return,
            Err(error) => tracing::warn!(%error, "trust bundle stream broken; reconnecting"),
        }
        let wait = backoff.next_delay(random_unit(), None);
        tokio::select! {
            () = tokio::time::sleep(wait) => {}
            () = stopped(&mut shutdown) => return,
        }
    }
}

#[cfg(test)]
mod tests {
    //! The bundle watch against an in-process CA that refuses the first acknowledgement.

    use std::sync::atomic::{AtomicUsize, Ordering};

    use meshid_identity::testing::{LeafShape, TestPki};
    use meshid_proto::ca::v1::certificate_authority_server::{
        CertificateAuthority, CertificateAuthorityServer,
    };
    use meshid_proto::ca::v1::{
        AckTrustBundleRequest, AckTrustBundleResponse, GetTrustBundleRequest, IssueResponse,
        TrustBundle,
    };
    use tokio::sync::mpsc;
    use tonic::{Request, Response, Status};

    use super::*;

    type Bundles = std::pin::Pin<
        Box<dyn tokio_stream::Stream<Item = Result<TrustBundle, Status>> + Send + 'static>,
    >;

    /// Serves one bundle on every stream; refuses the first `refuse` acknowledgements.
    struct FakeCa {
        bundle: TrustBundle,
        refuse: usize,
        calls: AtomicUsize,
        acks: mpsc::UnboundedSender<(u64, bool)>,
    }

    #[tonic::async_trait]
    impl CertificateAuthority for FakeCa {
        async fn issue(&self, _: Request<IssueRequest>) -> Result<Response<IssueResponse>, Status> {
            Err(Status::unimplemented("not in this test"))
        }

        async fn issue_jwt_svid(
            &self,
            _: Request<meshid_proto::ca::v1::IssueJwtSvidRequest>,
        ) -> Result<Response<meshid_proto::ca::v1::IssueJwtSvidResponse>, Status> {
            Err(Status::unimplemented("not in this test"))
        }

        async fn get_trust_bundle(
            &self,
            _: Request<GetTrustBundleRequest>,
        ) -> Result<Response<TrustBundle>, Status> {
            Ok(Response::new(self.bundle.clone()))
        }

        type WatchTrustBundleStream = Bundles;

        async fn watch_trust_bundle(
            &self,
            _: Request<WatchTrustBundleRequest>,
        ) -> Result<Response<Bundles>, Status> {
            let first = tokio_stream::iter([Ok(self.bundle.clone())]);
            let open = tokio_stream::pending();
            Ok(Response::new(Box::pin(tokio_stream::StreamExt::chain(
                first, open,
            ))))
        }

        async fn ack_trust_bundle(
            &self,
            req: Request<AckTrustBundleRequest>,
        ) -> Result<Response<AckTrustBundleResponse>, Status> {
            let taken = self.calls.fetch_add(1, Ordering::SeqCst) >= self.refuse;
            let _ = self.acks.send((req.get_ref().bundle_version, taken));
            if taken {
                Ok(Response::new(AckTrustBundleResponse {}))
            } else {
                Err(Status::unavailable("busy"))
            }
        }
    }

    /// A TLS listener for `ca` on loopback (TLS here, plaintext h2 to tonic over a duplex pipe).
    async fn serve(pki: &TestPki, ca: FakeCa) -> std::net::SocketAddr {
        let leaf = pki.leaf_shaped(
            "spiffe://cluster.local/ns/meshid/sa/ca",
            &LeafShape {
                dns: vec!["localhost".into()],
                ..LeafShape::default()
            },
        );
        let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
        let mut config = rustls::ServerConfig::builder_with_provider(provider)
            .with_protocol_versions(&[&rustls::version::TLS13])
            .unwrap()
            .with_no_client_auth()
            .with_single_cert(leaf.chain, leaf.key)
            .unwrap();
        config.alpn_protocols = vec![b"h2".to_vec()];
        let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(config));
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let (tx, rx) = mpsc::unbounded_channel::<std::io::Result<tokio::io::DuplexStream>>();
        tokio::spawn(async move {
            while let Ok((tcp, _)) = listener.accept().await {
                let acceptor = acceptor.clone();
                let tx = tx.clone();
                tokio::spawn(async move {
                    let Ok(mut tls) = acceptor.accept(tcp).await else {
                        return;
                    };
                    let (mut ours, theirs) = tokio::io::duplex(64 * 1024);
                    if tx.send(Ok(theirs)).is_ok() {
                        let _ = tokio::io::copy_bidirectional(&mut tls, &mut ours).await;
                    }
                });
            }
        });
        tokio::spawn(
            tonic::transport::Server::builder()
                .add_service(CertificateAuthorityServer::new(ca))
                .serve_with_incoming(tokio_stream::wrappers::UnboundedReceiverStream::new(rx)),
        );
        addr
    }

    #[test]
    fn a_bundle_s_revocations_are_read_entry_by_entry() {
        use meshid_proto::ca::v1::Revocation;
        let entry = |id: &str, serial: &str| Revocation {
            spiffe_id: id.into(),
            serial: serial.into(),
            ..Default::default()
        };
        let (set, _) = revocations(
            &[
                entry("spiffe://cluster.local/ns/a/sa/x", ""),
                entry("", "0A:1B"),
            ],
            1000,
        )
        .unwrap();
        assert_eq!(set.counts(), (1, 1));
        assert!(set.contains(&Revoked::Serial("a1b".into())));
        // An entry past its expiry names no live certificate: not applied (but still checked).
        let mut expired = entry("", "0c");
        expired.expires_at_unix = 1000;
        let mut live = entry("", "0d");
        live.expires_at_unix = 1001;
        let (set, unreadable) = revocations(&[expired, live], 1000).unwrap();
        assert!(unreadable.is_empty());
        assert_eq!(set.counts(), (0, 1));
        assert!(set.contains(&Revoked::Serial("d".into())));
        // A bad entry is left out and said; the others are read (a list refused whole left a
        // starting sidecar with no revocation at all).
        for bad in [
            entry("spiffe://cluster.local/ns/a/sa/x", "01"),
            entry("", ""),
            entry("", "not hex"),
            entry("x", ""),
        ] {
            let (set, unreadable) = revocations(
                &[bad.clone(), entry("spiffe://cluster.local/ns/a/sa/y", "")],
                1000,
            )
            .unwrap();
            assert_eq!(unreadable.len(), 1, "{bad:?}");
            assert_eq!(set.counts(), (1, 0), "{bad:?}");
        }
        let many: Vec<Revocation> = (0..=meshid_identity::revocation::MAX_REVOCATIONS)
            .map(|i| entry("", &format!("{i:x}")))
            .collect();
        assert!(revocations(&many, 1000).is_err());
        // What is new is logged once, with its reason.
        let held = RevocationSet::new([Revoked::Serial("a1b".into())]).unwrap();
        let mut with_reason = entry("spiffe://cluster.local/ns/a/sa/x", "");
        with_reason.reason = "incident".into();
        let new = newly_revoked(&[with_reason, entry("", "0a1b")], &held);
        assert_eq!(new.len(), 1);
        assert_eq!(new[0].1, "incident");
    }

    /// The revocations the CA lists with a certificate are in force from that certificate on
    /// (before any bundle stream), added to those in force: a renewal's answer lifts none. A list
    /// that cannot be read adds nothing, and the certificate is taken all the same.
    #[test]
    fn the_revocations_listed_with_a_certificate_are_in_force_with_it() {
        use meshid_proto::ca::v1::Revocation;
        let pki = TestPki::new("issued-revocations");
        let me = "spiffe://cluster.local/ns/shop/sa/web";
        let answer = |revoked: Vec<Revocation>| {
            let leaf = pki.leaf(me);
            let resp = IssueResponse {
                cert_chain: leaf.chain.iter().map(|c| c.to_vec()).collect(),
                trust_anchors: vec![pki.root.to_vec()],
                spiffe_id: me.into(),
                bundle_version: 3,
                revoked,
                ..Default::default()
            };
            (resp, leaf.key)
        };
        let revocation = |id: &str, serial: &str, expires_at_unix: i64| Revocation {
            spiffe_id: id.into(),
            serial: serial.into(),
            expires_at_unix,
            ..Default::default()
        };
        let peer = "spiffe://cluster.local/ns/shop/sa/cart";
        let store = CredentialStore::new(Vec::new());
        let (resp, key) = answer(vec![
            revocation(peer, "", 0),
            revocation("", "0a", unix_now() - 1),
        ]);
        let (_, version) = install(&store, resp, key).unwrap();
        assert_eq!(version, 3);
        let in_force = store.revocations();
        assert!(in_force.contains(&Revoked::Id(SpiffeId::parse(peer).unwrap())));
        assert_eq!(in_force.counts(), (1, 0), "an expired entry is not applied");

        let (resp, key) = answer(vec![revocation("", "0b", 0)]);
        install(&store, resp, key).unwrap();
        assert_eq!(store.revocations().counts(), (1, 1), "added, none lifted");

        let (resp, key) = answer(vec![revocation("not an id", "", 0)]);
        install(&store, resp, key).expect("the certificate is taken");
        assert_eq!(store.revocations().counts(), (1, 1));
    }

    /// A renewal answered with an older bundle than the one in force (a lagging replica, or a
    /// bundle applied while the answer was on its way) does not bring that bundle's anchors
    /// back: a retired root stays out, an added one stays in. A newer answer's are taken.
    #[test]
    fn a_renewal_answered_with_an_older_bundle_keeps_the_anchors_in_force() {
        let pki = TestPki::new("renewal-anchors");
        let other = TestPki::new("renewal-anchors-added");
        let me = "spiffe://cluster.local/ns/shop/sa/web";
        let answer = |version: u64| {
            let leaf = pki.leaf(me);
            let resp = IssueResponse {
                cert_chain: leaf.chain.iter().map(|c| c.to_vec()).collect(),
                trust_anchors: vec![pki.root.to_vec()],
                spiffe_id: me.into(),
                bundle_version: version,
                ..Default::default()
            };
            (resp, leaf.key)
        };
        let store = CredentialStore::new(Vec::new());
        let (resp, key) = answer(3);
        install(&store, resp, key).unwrap();
        assert_eq!(store.roots(), vec![pki.root.clone()]);
        // Version 5 adds a root on the bundle stream.
        let both = vec![pki.root.clone(), other.root.clone()];
        store
            .set_bundle_at(5, both.clone(), Vec::new(), Arc::default())
            .unwrap();
        let (resp, key) = answer(4);
        install(&store, resp, key).expect("the certificate is taken");
        assert_eq!(store.roots(), both, "version 4's anchors are not taken");
        let (resp, key) = answer(6);
        install(&store, resp, key).unwrap();
        assert_eq!(store.roots(), vec![pki.root.clone()], "version 6's are");
        // Version 7 retires our root: an answer of version 6 cannot bring it back, and its
        // certificate does not verify under the anchors in force.
        store
            .set_bundle_at(7, vec![other.root.clone()], Vec::new(), Arc::default())
            .ok();
        let (resp, key) = answer(6);
        assert!(install(&store, resp, key).is_err());
        assert_eq!(store.roots(), vec![other.root.clone()]);
    }

    /// A store holding a leaf of `pki` for `spiffe://cluster.local/ns/shop/sa/web`, as the CA
    /// answered it with bundle `version` (0: none).
    fn store_with_a_leaf(pki: &TestPki, version: u64) -> CredentialStore {
        let me = "spiffe://cluster.local/ns/shop/sa/web";
        let store = CredentialStore::new(Vec::new());
        let leaf = pki.leaf(me);
        let resp = IssueResponse {
            cert_chain: leaf.chain.iter().map(|c| c.to_vec()).collect(),
            trust_anchors: vec![pki.root.to_vec()],
            spiffe_id: me.into(),
            bundle_version: version,
            ..Default::default()
        };
        install(&store, resp, leaf.key).unwrap();
        store
    }

    /// An older bundle on the stream (a lagging replica, a CA restarted from a stale copy) lifts
    /// nothing: the roots in force stay and its revocations are added; a newer one is taken.
    #[test]
    fn a_streamed_bundle_older_than_the_one_in_force_lifts_nothing() {
        let pki = TestPki::new("stream-lag");
        let other = TestPki::new("stream-lag-retired");
        let store = store_with_a_leaf(&pki, 3);
        let r = Revoked::Id(
            meshid_identity::SpiffeId::parse("spiffe://cluster.local/ns/x/sa/r").unwrap(),
        );
        let s = Revoked::Id(
            meshid_identity::SpiffeId::parse("spiffe://cluster.local/ns/x/sa/s").unwrap(),
        );
        // Version 5 retires the other root and revokes R.
        store
            .set_bundle_at(
                5,
                vec![pki.root.clone()],
                Vec::new(),
                Arc::new(RevocationSet::new([r.clone()]).unwrap()),
            )
            .unwrap();
        // Version 4, from a replica that has not read that yet: neither comes back.
        store
            .set_bundle_at(
                4,
                vec![pki.root.clone(), other.root.clone()],
                Vec::new(),
                Arc::default(),
            )
            .unwrap();
        assert_eq!(
            store.roots(),
            vec![pki.root.clone()],
            "the retired root stays out"
        );
        assert!(store.revocations().contains(&r), "R stays revoked");
        // Its own revocations are added all the same.
        store
            .set_bundle_at(
                4,
                vec![pki.root.clone()],
                Vec::new(),
                Arc::new(RevocationSet::new([s.clone()]).unwrap()),
            )
            .unwrap();
        assert!(store.revocations().contains(&r) && store.revocations().contains(&s));
        // Version 6 lifts both, and is taken whole.
        store
            .set_bundle_at(6, vec![pki.root.clone()], Vec::new(), Arc::default())
            .unwrap();
        assert!(store.revocations().is_empty());
    }

    /// File mode, reporting to the CA: a bundle on the report stream older than the last one
    /// applied (the stream reconnected to a replica that has not read the last change yet) lifts
    /// no revocation and adds its own; a newer one is taken whole, an unversioned one as before.
    #[test]
    fn a_reported_bundle_older_than_the_one_applied_lifts_nothing() {
        use meshid_proto::ca::v1::Revocation;
        let pki = TestPki::new("report-lag");
        let store = store_with_a_leaf(&pki, 0);
        let metrics = Metrics::default();
        let revocation = |id: &str| Revocation {
            spiffe_id: id.into(),
            ..Default::default()
        };
        let (r, s) = (
            "spiffe://cluster.local/ns/x/sa/r",
            "spiffe://cluster.local/ns/x/sa/s",
        );
        let revoked = |id: &str| {
            store
                .revocations()
                .contains(&Revoked::Id(SpiffeId::parse(id).unwrap()))
        };
        let mut applied = 0;
        apply_reported_revocations(&store, &metrics, (5, &mut applied), &[revocation(r)]);
        assert!(revoked(r));
        assert_eq!(applied, 5);
        // Version 4, after a reconnection to a lagging replica: R stays, S is added.
        apply_reported_revocations(&store, &metrics, (4, &mut applied), &[]);
        assert!(revoked(r), "an older bundle lifted a revocation");
        apply_reported_revocations(&store, &metrics, (4, &mut applied), &[revocation(s)]);
        assert!(revoked(r) && revoked(s));
        assert_eq!(applied, 5);
        // Version 6 lifts both.
        apply_reported_revocations(&store, &metrics, (6, &mut applied), &[]);
        assert!(store.revocations().is_empty());
        assert_eq!(applied, 6);
    }

    /// The app's SVID is handed over only for our own identity and with the app-SVID mark: an
    /// unmarked one (a CA older than the mark) would be a credential the CA cannot tell from ours.
    #[test]
    fn the_apps_svid_must_be_ours_and_marked() {
        let pki = TestPki::new("app-svid-mark");
        let me = "spiffe://cluster.local/ns/shop/sa/web";
        let store = CredentialStore::new(Vec::new());
        let own = pki.leaf(me);
        store
            .set_certificate(Credentials {
                chain: own.chain,
                key: own.key,
                roots: vec![pki.root.clone()],
                pinned: Vec::new(),
            })
            .unwrap();
        let creds = |id: &str, app_svid: bool| {
            let leaf = pki.leaf_shaped(
                id,
                &LeafShape {
                    app_svid,
                    ..LeafShape::default()
                },
            );
            Credentials {
                chain: leaf.chain,
                key: leaf.key,
                roots: vec![pki.root.clone()],
                pinned: Vec::new(),
            }
        };
        let me_id = SpiffeId::parse(me).unwrap();
        let marked = check_app_svid(&store, &me_id, creds(me, true)).unwrap();
        assert!(marked.app_svid);
        let unmarked = check_app_svid(&store, &me_id, creds(me, false)).unwrap_err();
        assert!(
            unmarked.to_string().contains("without the app-SVID mark"),
            "{unmarked}"
        );
        let other = check_app_svid(
            &store,
            &me_id,
            creds("spiffe://cluster.local/ns/shop/sa/cart", true),
        )
        .unwrap_err();
        assert!(
            other.to_string().contains("not for this sidecar's"),
            "{other}"
        );
    }

    /// A bundle watch of a sidecar holding a certificate of `pki`, against a fake CA serving
    /// `bundle` and refusing the first `refuse` acknowledgements (each one sent, taken or not, is
    /// on `acks`).
    struct Watching {
        acks: mpsc::UnboundedReceiver<(u64, bool)>,
        life: Arc<Lifecycle>,
        metrics: Metrics,
        stop: watch::Sender<bool>,
        task: tokio::task::JoinHandle<()>,
    }

    impl Watching {
        async fn start(pki: &TestPki, bundle: TrustBundle, refuse: usize) -> Self {
            let (acks_tx, acks) = mpsc::unbounded_channel();
            let addr = serve(
                pki,
                FakeCa {
                    bundle,
                    refuse,
                    calls: AtomicUsize::new(0),
                    acks: acks_tx,
                },
            )
            .await;
            let store = Arc::new(CredentialStore::new(Vec::new()));
            let me = pki.leaf("spiffe://cluster.local/ns/shop/sa/web");
            store
                .set_certificate(Credentials {
                    chain: me.chain,
                    key: me.key,
                    roots: vec![pki.root.clone()],
                    pinned: Vec::new(),
                })
                .unwrap();
            let mode = CaMode {
                endpoint: CaEndpoint {
                    addr: addr.to_string(),
                    server_name: Some("localhost".into()),
                    roots: vec![pki.root.clone()],
                    pinned: Vec::new(),
                },
                bootstrap: Bootstrap::TokenFile(PathBuf::from("/nonexistent")),
                ttl: None,
                bundle_cache: None,
            };
            let (stop, stopped) = watch::channel(false);
            let life = Arc::new(Lifecycle::new());
            let metrics = Metrics::default();
            let task = tokio::spawn(run_bundle_watch(
                mode,
                store,
                metrics.clone(),
                life.clone(),
                stopped,
            ));
            Self {
                acks,
                life,
                metrics,
                stop,
                task,
            }
        }

        fn bundle_updates(&self, result: &'static str) -> u64 {
            self.metrics
                .bundle_updates
                .get_or_create(&ResultLabels { result })
                .get()
        }

        async fn stop(self) {
            self.stop.send_replace(true);
            self.task.await.unwrap();
        }
    }

    fn bundle_of(pki: &TestPki, version: u64) -> TrustBundle {
        TrustBundle {
            trust_domain: "cluster.local".into(),
            roots: vec![pki.root.to_vec()],
            version,
            renew_now: false,
            pinned_intermediates: Vec::new(),
            jwt_keys: Vec::new(),
            revoked: Vec::new(),
        }
    }

    /// A rotation's gate counts an acknowledgement as "trusts the new authority": a version the
    /// sidecar did not apply in full (JWT keys it rejected, so JWT-SVIDs signed with the new key
    /// would not verify here; no roots at all) is not acknowledged, and is counted as rejected.
    #[tokio::test]
    async fn a_bundle_not_applied_in_full_is_not_acknowledged() {
        struct Case {
            name: &'static str,
            bundle: TrustBundle,
            acknowledged: bool,
        }
        let pki = TestPki::new("partial");
        let cases = [
            Case {
                name: "a JWT key that is no P-256 key",
                bundle: TrustBundle {
                    jwt_keys: vec![meshid_proto::ca::v1::JwtKey {
                        key_id: "k2".into(),
                        public_key: b"not a key".to_vec(),
                    }],
                    ..bundle_of(&pki, 7)
                },
                acknowledged: false,
            },
            Case {
                name: "no roots",
                bundle: TrustBundle {
                    roots: Vec::new(),
                    ..bundle_of(&pki, 7)
                },
                acknowledged: false,
            },
            Case {
                name: "applied in full",
                bundle: bundle_of(&pki, 7),
                acknowledged: true,
            },
        ];
        for case in cases {
            let mut w = Watching::start(&pki, case.bundle, 0).await;
            // The first of: an acknowledgement, or the bundle counted as rejected (then anything
            // sent within a while after).
            let first = tokio::time::timeout(Duration::from_secs(10), async {
                loop {
                    tokio::select! {
                        ack = w.acks.recv() => return ack,
                        () = tokio::time::sleep(Duration::from_millis(20)) => {
                            if w.bundle_updates("rejected") > 0 {
                                return None;
                            }
                        }
                    }
                }
            })
            .await
            .unwrap_or_else(|_| panic!("{}: the bundle was neither taken nor rejected", case.name));
            let ack = match first {
                Some(ack) => Some(ack),
                None => tokio::time::timeout(Duration::from_millis(1_500), w.acks.recv())
                    .await
                    .ok()
                    .flatten(),
            };
            if case.acknowledged {
                assert_eq!(ack, Some((7, true)), "{}", case.name);
                assert_eq!(w.bundle_updates("rejected"), 0, "{}", case.name);
            } else {
                assert_eq!(ack, None, "{}: acknowledged", case.name);
                assert_eq!(w.bundle_updates("rejected"), 1, "{}", case.name);
                assert!(w.life.jwt_keys.borrow().is_none(), "{}", case.name);
            }
            w.stop().await;
        }
    }

    #[tokio::test]
    async fn an_acknowledgement_the_ca_refused_is_sent_again_until_taken() {
        let pki = TestPki::new("ack-retry");
        let Watching {
            mut acks,
            life,
            metrics: _,
            stop: stop_tx,
            task: watch,
        } = Watching::start(&pki, bundle_of(&pki, 7), 2).await;

        // Refused twice, then taken: three calls for version 7, spaced by the backoff (0.5-1 s,
        // then 1-2 s), all on the one stream (no reconnect needed).
        let mut seen = Vec::new();
        let started = tokio::time::Instant::now();
        while seen.len() < 3 {
            let ack = tokio::time::timeout(Duration::from_secs(10), acks.recv())
                .await
                .expect("the sidecar acknowledges again after a refusal")
                .unwrap();
            seen.push((ack, started.elapsed()));
        }
        assert_eq!(
            seen.iter().map(|(a, _)| *a).collect::<Vec<_>>(),
            vec![(7, false), (7, false), (7, true)]
        );
        assert!(
            seen[1].1 - seen[0].1 >= Duration::from_millis(450),
            "{seen:?}"
        );
        assert!(
            seen[2].1 - seen[1].1 >= Duration::from_millis(950),
            "{seen:?}"
        );
        assert_eq!(life.applied_version.load(Ordering::Relaxed), 7);

        // Taken: nothing more is sent.
        assert!(
            tokio::time::timeout(Duration::from_millis(2500), acks.recv())
                .await
                .is_err()
        );
        stop_tx.send_replace(true);
        watch.await.unwrap();
    }

    /// A token file that is a FIFO (no writer) or a link to a device is refused at once, naming
    /// it; a real one is read and trimmed.
    #[test]
    fn token_files_are_read_only_when_regular() {
        let dir = tempfile::tempdir().unwrap();
        let token = dir.path().join("token");
        std::fs::write(&token, "header.claims.signature\n").unwrap();
        let fifo = dir.path().join("fifo-token");
        let made = std::process::Command::new("mkfifo").arg(&fifo).status();
        assert!(made.is_ok_and(|s| s.success()), "mkfifo");
        let zero = dir.path().join("zero-token");
        std::os::unix::fs::symlink("/dev/zero", &zero).unwrap();
        // Never dropped: a read stuck in a FIFO's open (a regression) must not hold up the end of
        // the test, as dropping the runtime would.
        let runtime: &tokio::runtime::Runtime = Box::leak(Box::new(
            tokio::runtime::Builder::new_current_thread()
                .enable_time()
                .build()
                .unwrap(),
        ));
        let read = |path: &Path| {
            runtime.block_on(async {
                tokio::time::timeout(Duration::from_secs(5), read_secret(path))
                    .await
                    .map_err(|_| format!("{}: still reading", path.display()))?
                    .map_err(|e| e.to_string())
            })
        };
        assert_eq!(read(&token).as_deref(), Ok("header.claims.signature"));
        for (path, name) in [(&fifo, "fifo-token"), (&zero, "zero-token")] {
            let error = read(path).unwrap_err();
            assert!(
                error.contains(&format!("{name}: not a regular file")),
                "{error}"
            );
        }
    }
}
