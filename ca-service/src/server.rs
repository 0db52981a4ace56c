//! Putting the CA together: load the directory, bind, serve gRPC and admin, follow bundle changes,
//! shut down gracefully.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use arc_swap::ArcSwap;
use meshid_proto::ca::v1::certificate_authority_server::CertificateAuthorityServer;
use prometheus_client::registry::Registry;
use tokio::net::TcpListener;
use tokio::sync::watch;
use tokio::task::JoinHandle;

use crate::auth::{JoinTokenStore, JwtAuthenticator, JwtConfig};
use crate::authority::Authority;
use crate::metrics::Metrics;
use crate::ratelimit::{RateLimit, RateLimiter};
use crate::service::{Bundle, CaService, CaState};
use crate::signer::LifetimePolicy;
use crate::tls::{self, ListenerLimits};

/// The largest gRPC message accepted (a CSR plus a token fit in a few KiB).
pub const MAX_MESSAGE_BYTES: usize = 64 * 1024;
/// The largest health request taken (a service name, a few dozen bytes).
pub const MAX_HEALTH_MESSAGE_BYTES: usize = 1024;
/// Streams (calls) open at once on one connection. A sidecar holds one bundle stream and now and
/// then an `Issue` (its own certificate, its app's), an `IssueJwtSvid` for its app or an
/// `AckTrustBundle`; its client waits for a free stream past this. tonic sets aside room for a
/// whole message (up to [`MAX_MESSAGE_BYTES`] and its 8 KiB read buffer) as soon as a request
/// declares its length, so this is also what one connection's unfinished requests can hold: 16 x
/// 72 KiB, about 1.2 MiB (it was 256 streams, 18 MiB). Across connections the calls whose request
/// is still arriving are bounded too ([`crate::arrivals`], `ListenerLimits::max_arriving_requests`:
/// 448, about 32 MiB at most whatever the number of connections).
pub const MAX_STREAMS_PER_CONNECTION: u32 = 16;
/// The h2 receive window of a stream: room for a whole message and its 5-byte prefix.
const STREAM_WINDOW: u32 = 128 * 1024;
/// The h2 receive window of a connection: the most request bytes h2 holds for a connection's
/// streams before tonic has read them (tonic reads them as they come, into the room counted under
/// [`MAX_STREAMS_PER_CONNECTION`]; this bounds what waits in between).
const CONNECTION_WINDOW: u32 = 256 * 1024;
/// Streams a connection may have reset by the server for its protocol errors before it is closed
/// with GOAWAY `ENHANCE_YOUR_CALM`: hyper's default, which tonic does not pass on. Each such reset
/// costs the server a stream's work without counting against the concurrent-stream limit.
pub const MAX_LOCAL_ERROR_RESETS: usize = 1024;
/// How often the bundle file is checked for changes.
const BUNDLE_POLL: Duration = Duration::from_secs(1);
/// How often the serving certificate's re-issue point is compared with the wall clock.
const SERVING_CERT_CHECK: Duration = Duration::from_secs(60);

/// Everything `meshid-ca serve` is configured with.
#[derive(Debug, Clone)]
pub struct ServeConfig {
    pub dir: PathBuf,
    pub listen: SocketAddr,
    pub admin_listen: SocketAddr,
    /// DNS names and IPs of the CA's serving certificate.
    pub sans: Vec<String>,
    pub jwt: Option<JwtConfig>,
    pub lifetimes: LifetimePolicy,
    /// How long after its last attestation (service-account token or join token) an identity still
    /// renews on its certificate alone.
    pub max_attestation_age: Duration,
    /// Lifetime of a JWT-SVID.
    pub jwt_svid_ttl: Duration,
    pub rate_limit: RateLimit,
    /// The limit of one namespace's identities together, alongside each one's `rate_limit`
    /// (default: [`RateLimit::per_namespace`] of it).
    pub namespace_rate_limit: RateLimit,
    pub limits: ListenerLimits,
    /// How long in-flight calls may take to finish after shutdown starts.
    pub grace: Duration,
}

/// Why the CA could not start.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum StartError {
    #[error(transparent)]
    Authority(#[from] crate::authority::AuthorityError),
    #[error(transparent)]
    Jwks(#[from] crate::auth::JwksError),
    #[error(transparent)]
    Tls(#[from] tls::TlsSetupError),
    #[error("binding {addr}: {source}")]
    Bind {
        addr: SocketAddr,
        source: std::io::Error,
    },
}

/// A running CA.
pub struct RunningCa {
    pub addr: SocketAddr,
    pub admin_addr: SocketAddr,
    shutdown: watch::Sender<bool>,
    /// Ends the admin server when dropped: with the CA, after the drain, so that probes and
    /// scrapes get `/readyz` 503 while it lasts, not a refused connection.
    _admin_stop: watch::Sender<bool>,
    grpc: JoinHandle<Result<(), tonic::transport::Error>>,
    grace: Duration,
}

impl RunningCa {
    /// Stops accepting, lets in-flight calls finish (up to the grace period), and returns.
    pub async fn shutdown(self) {
        let _ = self.shutdown.send(true);
        match tokio::time::timeout(self.grace, self.grpc).await {
            Ok(Ok(Ok(()))) => tracing::info!("CA stopped"),
            Ok(Ok(Err(error))) => tracing::error!(%error, "gRPC server failed"),
            Ok(Err(error)) => tracing::error!(%error, "gRPC server task failed"),
            Err(_) => tracing::warn!("grace period over; closing remaining connections"),
        }
    }
}

async fn bind(addr: SocketAddr) -> Result<TcpListener, StartError> {
    TcpListener::bind(addr)
        .await
        .map_err(|source| StartError::Bind { addr, source })
}

/// Loads the CA directory, binds both listeners and starts serving.
pub async fn start(config: ServeConfig, registry: &mut Registry) -> Result<RunningCa, StartError> {
    // The files' stamps before they are read: a change made while the CA starts is one the
    // directory's follower sees (at worst it reads the same files again), not one it takes as
    // already loaded.
    let loaded = stamps(&config.dir);
    let files = crate::ca_dir::snapshot(&config.dir);
    let mut authority = Authority::load(&files)?;
    serve_revocations_for(&mut authority, config.lifetimes.max, None);
    meshid_runtime::process::warn_about_readable_keys(
        key_files(&files).iter().map(PathBuf::as_path),
    );
    if crate::auth::join::is_secret_volume(&config.dir) {
        tracing::info!(
            dir = %config.dir.display(),
            "the CA directory is a Kubernetes Secret volume: each update is read whole; join tokens \
             are not available (they need a writable directory)"
        );
    }
    let trust_domain = authority.trust_domain.clone();
    let metrics = Metrics::register(registry);
    let jwt = match &config.jwt {
        Some(jwt) => {
            let jwt = JwtAuthenticator::new(jwt.clone(), trust_domain.clone())?
                .with_metrics(metrics.clone());
            // A fetched JWKS: the first fetch before serving. When it fails the CA serves anyway
            // (renewals and join tokens need no JWKS) and keeps fetching.
            jwt.refresh_remote().await;
            Some(jwt)
        }
        None => None,
    };
    let token_review = match &config.jwt {
        Some(jwt) if jwt.token_review => match &jwt.jwks {
            crate::auth::JwksSource::Remote(remote) => {
                let reviewer =
                    crate::auth::token_review::TokenReviewer::new(remote.clone(), &jwt.audience)
                        .map_err(crate::auth::JwksError::TokenReview)?;
                tracing::info!(
                    url = reviewer.url(),
                    "service-account tokens are reviewed at the API server before they attest"
                );
                Some(reviewer)
            }
            crate::auth::JwksSource::File(_) => {
                return Err(crate::auth::JwksError::TokenReview(
                    "needs the keys from the API server (--jwks-url or --jwks-discovery)".into(),
                )
                .into());
            }
        },
        _ => None,
    };
    let (tls_config, serving) = tls::server_config(&authority, &config.sans)?;
    let tls_config = Arc::new(ArcSwap::new(tls_config));
    let serving_dates = Arc::new(tls::ServingDates::new(metrics.serving_cert_expiry.clone()));
    serving_dates.set(serving);
    metrics
        .intermediate_expiry
        .set(authority.intermediate_not_after.unix_timestamp());
    metrics.bundle_version.set(authority.bundle_version as i64);
    metrics.bundle_roots.set(authority.roots.len() as i64);

    let listener = bind(config.listen).await?;
    let admin_listener = bind(config.admin_listen).await?;
    let addr = listener.local_addr().map_err(|source| StartError::Bind {
        addr: config.listen,
        source,
    })?;
    let admin_addr = admin_listener
        .local_addr()
        .map_err(|source| StartError::Bind {
            addr: config.admin_listen,
            source,
        })?;

    let (shutdown_tx, shutdown_rx) = watch::channel(false);
    let bundle = Bundle::of(&authority, authority.bundle_version);
    metrics.record_revocations(&authority.revocations);
    let (bundle_tx, _) = watch::channel(Arc::new(bundle));
    let state = Arc::new(CaState {
        authority: ArcSwap::from_pointee(authority),
        bundle: bundle_tx,
        jwt,
        token_review,
        join: JoinTokenStore::new(&config.dir, trust_domain),
        lifetimes: config.lifetimes,
        max_attestation_age: config.max_attestation_age,
        limiter: RateLimiter::new(config.rate_limit),
        jwt_svid_ttl: config.jwt_svid_ttl,
        jwt_limiter: RateLimiter::new(config.rate_limit),
        namespaces: RateLimiter::new(config.namespace_rate_limit),
        jwt_namespaces: RateLimiter::new(config.namespace_rate_limit),
        renewals: RateLimiter::new(config.rate_limit.renewal_share()),
        renewal_calls: RateLimiter::new(config.rate_limit.per_lineage()),
        jwt_svid_calls: RateLimiter::new(config.rate_limit.per_lineage()),
        bundle_calls: RateLimiter::new(crate::service::BUNDLE_CALLS),
        metrics: metrics.clone(),
        shutdown: shutdown_rx.clone(),
        fleet: crate::rotation::Fleet::new(crate::rotation::fleet::CaProcess {
            started_unix: time::OffsetDateTime::now_utc().unix_timestamp(),
            max_ttl_seconds: config.lifetimes.max.as_secs(),
            ..Default::default()
        })
        .recording_to(&config.dir),
        streams: Default::default(),
        refusals: crate::audit::RefusalLog::new(
            crate::audit::RefusalLimits::default(),
            metrics.audit_refusals_suppressed.clone(),
        ),
    });

    tokio::spawn(follow_bundle(
        config.dir.clone(),
        loaded,
        config.sans.clone(),
        config.lifetimes.max,
        state.clone(),
        tls_config.clone(),
        serving_dates.clone(),
        shutdown_rx.clone(),
    ));
    // The last window of suppressed refusals is summarised when the refusals stop too.
    let refusals_state = state.clone();
    let mut refusals_shutdown = shutdown_rx.clone();
    tokio::spawn(async move {
        loop {
            tokio::select! {
                () = tokio::time::sleep(Duration::from_secs(10)) => {}
                _ = refusals_shutdown.wait_for(|s| *s) => return,
            }
            refusals_state.refusals.flush(std::time::Instant::now());
        }
    });
    let jwks_state = state.clone();
    let jwks_shutdown = shutdown_rx.clone();
    tokio::spawn(async move {
        if let Some(jwt) = &jwks_state.jwt {
            jwt.follow_remote(jwks_shutdown).await;
        }
    });
    tokio::spawn(refresh_serving_cert(
        config.sans.clone(),
        state.clone(),
        tls_config.clone(),
        serving_dates.clone(),
        shutdown_rx.clone(),
    ));

    let (health_reporter, health_service) = tonic_health::server::health_reporter();
    // A health request is a service name: tonic's default bound (4 MiB) let each call declare
    // 4 MiB, which tonic reserves as soon as the length arrives, past what the arrivals bound
    // (`max_arriving_requests`) was sized for.
    let health_service = health_service.max_decoding_message_size(MAX_HEALTH_MESSAGE_BYTES);
    health_reporter
        .set_serving::<CertificateAuthorityServer<CaService>>()
        .await;
    let rotation_state = state.clone();
    let jwks_status = state.clone();
    let ca = CertificateAuthorityServer::new(CaService::new(state))
        .max_decoding_message_size(MAX_MESSAGE_BYTES);
    let admin_unauthorized = metrics.admin_unauthorized.clone();
    let calls_refused = metrics.calls_refused.clone();
    let incoming = tls::incoming(listener, tls_config, config.limits, metrics);
    let mut stop = shutdown_rx.clone();
    let grpc = tokio::spawn(
        tonic::transport::Server::builder()
            .timeout(Duration::from_secs(30))
            .concurrency_limit_per_connection(MAX_STREAMS_PER_CONNECTION as usize)
            // The same bound on open h2 streams (tonic leaves it unbounded): the concurrency
            // limit above holds a call only until its response head, not for a streaming body.
            .max_concurrent_streams(MAX_STREAMS_PER_CONNECTION)
            // Request bytes h2 holds for a stream, and for the whole connection, until tonic reads
            // them (hyper's default is 1 MiB each): a message and a bit, then the client waits.
            .initial_stream_window_size(STREAM_WINDOW)
            .initial_connection_window_size(CONNECTION_WINDOW)
            // hyper's own bound on streams h2 resets for a client's protocol error, past which
            // the connection gets GOAWAY ENHANCE_YOUR_CALM ("MadeYouReset", CVE-2025-8671):
            // tonic passes its own default of `None` down, which in h2 means no bound at all.
            .http2_max_local_error_reset_streams(Some(MAX_LOCAL_ERROR_RESETS))
            // No h2 keep-alive PINGs: with one bundle stream per sidecar, they cost a wake-up, an
            // encrypted PING and its PONG per sidecar every interval, about 5% of a core for the
            // CA at 19,000 sidecars, for nothing the kernel's keep-alive (set on every accepted
            // connection, `meshid_runtime::net::keepalive`) does not do for free: a vanished
            // sidecar is noticed in about a minute, and `max_connection_age` ends every
            // connection, so a hung one too.
            // GOAWAY at the maximum age (tonic's graceful shutdown of the connection); the
            // connection itself ends `max_connection_age_grace` later (tls::TlsConn), which also
            // ends the bundle streams still on it. tonic's own `max_connection_age_grace` is not
            // used: with it set, tonic skips the GOAWAY and only cuts.
            .max_connection_age(config.limits.max_connection_age)
            // Calls in flight per connection, for the idle timeout (tls::TlsConn), and the bound
            // on health Watch streams.
            .layer(tls::TrackCallsLayer::default())
            // The bound on memory held by requests still arriving, across connections.
            .layer(crate::arrivals::ArrivalsLayer::new(
                config.limits.max_arriving_requests,
                calls_refused,
            ))
            .add_service(health_service)
            .add_service(ca)
            .serve_with_incoming_shutdown(incoming, async move {
                let _ = stop.wait_for(|s| *s).await;
            }),
    );

    let rotation: crate::admin::RotationJson = {
        let state = rotation_state;
        let dir = config.dir.clone();
        Arc::new(move || {
            let now = time::OffsetDateTime::now_utc().unix_timestamp();
            let (mut sidecars, issued) = state.fleet.report(now);
            let authority = state.authority.load();
            crate::rotation::fleet::mark_revoked(&mut sidecars, &authority.revocations);
            let files = crate::ca_dir::snapshot(&dir);
            let rotation =
                crate::authorities::RotationState::load(&files).map_err(|e| e.to_string())?;
            let unlisted = state
                .fleet
                .unlisted_turned_away(now, &authority.revocations);
            let report = crate::rotation::report(
                &files,
                &rotation,
                sidecars,
                unlisted,
                &issued,
                state.process_report(&files, &rotation),
                &authority.revocations,
            );
            serde_json::to_string_pretty(&report).map_err(|e| e.to_string())
        })
    };
    let registry = Arc::new(std::mem::take(registry));
    let routes = Arc::new(crate::admin::CaAdmin {
        rotation: Arc::new(crate::admin::RotationCache::new(
            rotation,
            crate::admin::RotationCache::MAX_AGE,
        )),
        jwks: Box::new(move || {
            let jwt = jwks_status.jwt.as_ref()?;
            serde_json::to_string_pretty(&jwt.summary()).ok()
        }),
        shutdown: shutdown_rx.clone(),
        dir: config.dir.clone(),
        unauthorized: admin_unauthorized,
        refusal_log: std::sync::Mutex::new(meshid_runtime::log_limit::LineBudget::new()),
        serving: serving_dates,
        seen_nonces: std::sync::Mutex::default(),
        instance: crate::admin_token::new_instance(),
    });
    let (admin_stop, admin_stopped) = watch::channel(false);
    tokio::spawn(meshid_runtime::admin::serve(
        admin_listener,
        registry,
        routes,
        admin_stopped,
    ));

    tracing::info!(%addr, %admin_addr, "CA serving");
    Ok(RunningCa {
        addr,
        admin_addr,
        shutdown: shutdown_tx,
        _admin_stop: admin_stop,
        grpc,
        grace: config.grace,
    })
}

/// A file as the reload watches it: its modification time, length and inode. Every write to the
/// CA directory renames a new file into place (a new inode), so two writes of the same length
/// within one tick of a coarse filesystem clock (an `unrevoke` then a `revoke` in the same second)
/// still differ from what a poll between them saw.
type Stamp = (SystemTime, u64, u64);

fn stamp(path: &Path) -> Option<Stamp> {
    use std::os::unix::fs::MetadataExt;
    let m = std::fs::metadata(path).ok()?;
    Some((m.modified().ok()?, m.len(), m.ino()))
}

/// What makes the CA reload: the version of a Secret volume (its `..data` target), the bundle, the
/// rotation state, and the active authority's intermediate (a `rotate intermediate` replaces it).
fn stamps(dir: &Path) -> (PathBuf, Vec<Option<Stamp>>) {
    let files = crate::ca_dir::snapshot(dir);
    let active = crate::authorities::RotationState::load(&files)
        .map(|s| s.files_of(&files, s.active()))
        .unwrap_or_else(|_| crate::ca_dir::AuthorityFiles::plain(&files));
    let stamps = vec![
        stamp(&files.join("bundle.pem")),
        stamp(&files.join(crate::authorities::STATE_FILE)),
        stamp(&files.join(crate::revocations::REVOCATIONS_FILE)),
        stamp(&active.path("intermediate.pem")),
        stamp(&active.path("intermediate.key")),
    ];
    (files, stamps)
}

/// Follows the CA directory: a changed bundle goes to every watcher with a new version; a changed
/// rotation state or intermediate swaps the signing authority. Broken files (or a state that goes
/// backwards) are logged and the current material kept, `meshid_ca_directory_rejected` set, and the
/// reload tried again on every poll until it succeeds. Every CA process on the directory follows it
/// the same way.
#[allow(clippy::too_many_arguments)] // the server's parts, each passed once at start
async fn follow_bundle(
    dir: PathBuf,
    loaded: (PathBuf, Vec<Option<Stamp>>),
    sans: Vec<String>,
    max_ttl: Duration,
    state: Arc<CaState>,
    tls_config: Arc<ArcSwap<rustls::ServerConfig>>,
    serving: Arc<tls::ServingDates>,
    mut shutdown: watch::Receiver<bool>,
) {
    let mut last = loaded;
    // Why the newest files were refused (logged once per reason): retried on every poll until
    // they load, not only when a file changes again (EMFILE, a hand edit finished later, ...).
    let mut refused: Option<String> = None;
    // The size of a union of revocations too large to apply alone (logged once per size).
    let mut too_many: Option<usize> = None;
    loop {
        tokio::select! {
            () = tokio::time::sleep(BUNDLE_POLL) => {}
            _ = shutdown.wait_for(|s| *s) => return,
        }
        let now = stamps(&dir);
        if now != last || refused.is_some() {
            last = now;
            let result = reload(&last.0, &sans, max_ttl, &state, &tls_config, &serving);
            if result.is_err() {
                apply_revocations_alone(&last.0, max_ttl, &state, &mut too_many);
            }
            refused = note_reload(result, refused, &state.metrics);
            publish_bundle(&state);
        }
        state
            .metrics
            .issuance_unrecorded
            .set(i64::from(state.fleet.issuance_unrecorded()));
        // The per-authority gauges from the rotation state of the directory, while this process
        // follows it: not from files it refuses (they may name an authority it does not sign with).
        // The fleet's gauges whatever the directory (they froze with the authorities' before).
        if refused.is_none() {
            record_rotation(&last.0, &state);
        } else {
            let authority = state.authority.load();
            let t = time::OffsetDateTime::now_utc().unix_timestamp();
            state
                .metrics
                .record_fleet(&state.fleet.summary(t, &authority.revocations));
        }
    }
}

/// Counts and logs a reload's result (a refusal once per reason); returns why the newest files
/// are refused now, if they are.
fn note_reload(
    result: Result<(), String>,
    refused: Option<String>,
    metrics: &Metrics,
) -> Option<String> {
    match result {
        Ok(()) => {
            metrics.directory_reloads.get_or_create(&OK).inc();
            metrics.directory_rejected.set(0);
            if refused.is_some() {
                tracing::info!("the CA directory loads again: its newest files are applied");
            }
            None
        }
        Err(reason) => {
            metrics.directory_reloads.get_or_create(&REJECTED).inc();
            metrics.directory_rejected.set(1);
            if refused.as_deref() != Some(reason.as_str()) {
                tracing::error!(
                    %reason,
                    "the CA directory's newest files are refused; keeping the current material \
                     and trying again every second"
                );
            }
            Some(reason)
        }
    }
}

/// Sends the bundle of the authority now in force to every watcher, if it changed.
fn publish_bundle(state: &CaState) {
    let authority = state.authority.load_full();
    let current = state.bundle.borrow().clone();
    state.metrics.record_revocations(&authority.revocations);
    let Some(next) = current.next(&authority) else {
        return;
    };
    let (version, renew_now, revoked) = (next.version, next.renew_now, next.revoked.len());
    state.metrics.bundle_version.set(version as i64);
    state.metrics.bundle_roots.set(next.roots.len() as i64);
    state.bundle.send_replace(Arc::new(next));
    tracing::info!(version, renew_now, revoked, "trust bundle updated");
}

/// Publishes the rotation report of the CA directory `files` (one snapshot of it) as gauges.
fn record_rotation(files: &Path, state: &CaState) {
    let Ok(rotation) = crate::authorities::RotationState::load(files) else {
        return;
    };
    let t = time::OffsetDateTime::now_utc().unix_timestamp();
    // The counts only: no copy or sort of the fleet every second.
    let authority = state.authority.load();
    let summary = state.fleet.summary(t, &authority.revocations);
    let report = crate::rotation::report(
        files,
        &rotation,
        Vec::new(),
        Vec::new(),
        &summary.issued,
        state.process_report(files, &rotation),
        &authority.revocations,
    );
    state.metrics.record_rotation(&report, &summary);
}

const OK: crate::metrics::ResultLabels = crate::metrics::ResultLabels { result: "ok" };
const REJECTED: crate::metrics::ResultLabels = crate::metrics::ResultLabels { result: "rejected" };

/// Reloads the CA directory (`files`, one snapshot of it): the signing authority, the TLS serving
/// configuration, the bundle's parts and the revocation list. Broken files, or a state this CA
/// must not take on ([`Authority::refuses_successor`]), leave the current material in place: the
/// error says why.
fn reload(
    files: &Path,
    sans: &[String],
    max_ttl: Duration,
    state: &CaState,
    tls_config: &ArcSwap<rustls::ServerConfig>,
    serving: &tls::ServingDates,
) -> Result<(), String> {
    let mut authority = Authority::load(files).map_err(|e| e.to_string())?;
    let previous = state.authority.load();
    if let Some(reason) = lost_revocations(files, &previous.revocations) {
        return Err(reason);
    }
    if let Some(reason) = dropped_revocations(&previous.revocations, &authority.revocations) {
        return Err(reason);
    }
    serve_revocations_for(&mut authority, max_ttl, Some(&previous.revocations));
    if let Some(reason) = previous.refuses_successor(&authority) {
        return Err(format!(
            "refusing the new state (this CA signs with authority {} at bundle version {}): \
             {reason}",
            previous.name, previous.bundle_version
        ));
    }
    let (cfg, validity) =
        tls::server_config(&authority, sans).map_err(|e| format!("rebuilding TLS: {e}"))?;
    tls_config.store(cfg);
    serving.set(validity);
    if previous.name != authority.name || previous.intermediate_der != authority.intermediate_der {
        tracing::info!(authority = %authority.name, "signing authority changed");
    }
    audit_revocation_changes(&previous.revocations, &authority.revocations);
    state
        .metrics
        .intermediate_expiry
        .set(authority.intermediate_not_after.unix_timestamp());
    state.authority.store(Arc::new(authority));
    Ok(())
}

/// While the rest of the CA directory (`files`) is refused, its revocation list is still applied
/// as far as it narrows trust ([`crate::revocations::Revocations::narrowed_by`]): a revocation
/// written beside a broken or unacceptable file (a hand edit, a directory from a newer CA) is
/// enforced by this process's calls and bundle as by every other replica's, and a sidecar that
/// reconnects here is not handed a bundle without it. A lifted revocation waits for the whole
/// directory to load. A list that cannot be read itself changes nothing (the reload's error names
/// it).
fn apply_revocations_alone(
    files: &Path,
    max_ttl: Duration,
    state: &CaState,
    too_many: &mut Option<usize>,
) {
    let Ok(list) = crate::revocations::Revocations::load(files) else {
        return;
    };
    let previous = state.authority.load_full();
    let max_ttl_secs = i64::try_from(max_ttl.as_secs()).unwrap_or(i64::MAX);
    let (served, _) = list.served_by_ca(
        max_ttl_secs,
        Some((&previous.revocations, meshid_runtime::time::unix_now())),
    );
    let merged = match previous.revocations.narrowed_by(&served) {
        Ok(Some(merged)) => merged,
        Ok(None) => return,
        Err(count) => {
            if *too_many != Some(count) {
                tracing::error!(
                    count,
                    max = meshid_identity::revocation::MAX_REVOCATIONS,
                    "the CA directory is refused, and its revocation list cannot be applied alone: \
                     with the entries in force it would list more than a bundle may carry"
                );
                *too_many = Some(count);
            }
            return;
        }
    };
    *too_many = None;
    audit_revocation_changes(&previous.revocations, &merged);
    tracing::warn!(
        "the CA directory is refused, but the revocations its list adds are applied (those it \
         lifts wait for the whole directory to load)"
    );
    let mut next = Authority::clone(&previous);
    next.revocations = Arc::new(merged);
    state.authority.store(Arc::new(next));
}

/// Why a CA that serves `previous` must refuse a directory (`files`) without `revocations.json`:
/// it had revocations, and a missing list would lift them all. A directory that records writing
/// the list (`revocations_written_at` in `authorities.json`) is refused by [`Authority::load`]
/// already; this is for one written before that was recorded.
fn lost_revocations(files: &Path, previous: &crate::revocations::Revocations) -> Option<String> {
    let path = files.join(crate::revocations::REVOCATIONS_FILE);
    let missing = matches!(std::fs::symlink_metadata(&path), Err(e) if e.kind() == std::io::ErrorKind::NotFound);
    (missing && !previous.entries().is_empty()).then(|| {
        format!(
            "{}: missing, but this CA enforces {} revocations from it: read as empty it would lift \
             them all. Put it back; to lift them on purpose use `meshid-ca unrevoke`",
            path.display(),
            previous.entries().len()
        )
    })
}

/// Why a CA that enforces `previous` must refuse a directory whose list (`next`) no longer holds
/// some of it although nothing lifted it ([`crate::revocations::Revocations::dropped_from`]): an
/// older copy of the CA directory applied over a newer one (two operators with a copy each, each
/// applying their own as the CA's Secret) would lift what the other revoked. The revocations the
/// list adds are still applied (`apply_revocations_alone`).
fn dropped_revocations(
    previous: &crate::revocations::Revocations,
    next: &crate::revocations::Revocations,
) -> Option<String> {
    let dropped = previous.dropped_from(next, meshid_runtime::time::unix_now());
    let first = dropped.first()?;
    Some(format!(
        "revocations.json no longer lists {} revocation(s) this CA enforces ({} revoked at {}{}),          and records no `meshid-ca unrevoke` of them: an older copy of the CA directory? Apply          the newest copy, or revoke them again in this one; to lift one, run `meshid-ca unrevoke`          in a copy that lists it",
        dropped.len(),
        first.what,
        first.revoked_at,
        if dropped.len() > 1 { ", ..." } else { "" }
    ))
}

/// The private key files at the top of the CA directory `dir` (`*.key`).
fn key_files(dir: &Path) -> Vec<PathBuf> {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return Vec::new();
    };
    let mut keys: Vec<PathBuf> = entries
        .filter_map(Result::ok)
        .map(|e| e.path())
        .filter(|p| p.extension().is_some_and(|e| e == "key"))
        .collect();
    keys.sort();
    keys
}

/// Serves every revocation entry of `authority` at least as long as a certificate of this CA
/// (`max_ttl`) can live past it ([`crate::revocations::Revocations::served_by_ca`]), warning
/// about each entry the file keeps shorter (once: not again for one `previous` served the same).
fn serve_revocations_for(
    authority: &mut Authority,
    max_ttl: Duration,
    previous: Option<&crate::revocations::Revocations>,
) {
    let max_ttl_secs = i64::try_from(max_ttl.as_secs()).unwrap_or(i64::MAX);
    let now = meshid_runtime::time::unix_now();
    let (served, raised) = authority
        .revocations
        .served_by_ca(max_ttl_secs, previous.map(|p| (p, now)));
    for e in raised {
        if previous.is_some_and(|p| p.entries().contains(&e)) {
            continue;
        }
        tracing::warn!(
            target: "meshid_ca::audit",
            revoked = %e.what,
            revoked_at = e.revoked_at,
            expires_at = e.expires_at,
            max_ttl_seconds = max_ttl_secs,
            "revocation entry expires before a certificate this CA issued can (revoke --max-ttl \
             shorter than the CA's --max-ttl, or the list reached this CA after it was written): \
             served until the CA's --max-ttl + 10 minutes past revoked_at, or past when this CA \
             learned of it"
        );
    }
    authority.revocations = Arc::new(served);
}

/// One audit line for every revocation this process starts or stops enforcing.
fn audit_revocation_changes(
    before: &crate::revocations::Revocations,
    after: &crate::revocations::Revocations,
) {
    // Looked up, not searched: two lists of up to 10,000 entries, every second while the CA
    // directory is refused.
    let was: std::collections::HashMap<&meshid_identity::revocation::Revoked, Vec<&_>> = before
        .entries()
        .iter()
        .fold(std::collections::HashMap::new(), |mut m, e| {
            m.entry(&e.what).or_insert_with(Vec::new).push(e);
            m
        });
    let now: std::collections::HashSet<&meshid_identity::revocation::Revoked> =
        after.entries().iter().map(|a| &a.what).collect();
    for e in after.entries() {
        if !was.get(&e.what).is_some_and(|b| b.contains(&e)) {
            tracing::warn!(
                target: "meshid_ca::audit",
                revoked = %e.what,
                revoked_at = e.revoked_at,
                expires_at = e.expires_at,
                reason = %e.reason,
                "revocation in force: refusing to issue for it, and streaming it to every sidecar"
            );
        }
    }
    for e in before.entries() {
        if !now.contains(&e.what) {
            tracing::warn!(
                target: "meshid_ca::audit",
                revoked = %e.what,
                "revocation lifted (unrevoke, or expired and pruned)"
            );
        }
    }
}

/// Re-issues the CA's own serving certificate once half its lifetime has passed by the wall clock
/// (the clock every client checks it with), looked at every [`SERVING_CERT_CHECK`]: a wall clock
/// stepped forward past that point (an NTP correction, a resumed VM) re-issues it within a check,
/// where a monotonic timer would wait on while clients refuse an expired certificate.
async fn refresh_serving_cert(
    sans: Vec<String>,
    state: Arc<CaState>,
    tls_config: Arc<ArcSwap<rustls::ServerConfig>>,
    serving: Arc<tls::ServingDates>,
    shutdown: watch::Receiver<bool>,
) {
    keep_serving_cert(
        &serving,
        meshid_runtime::time::unix_now,
        || {
            let (cfg, validity) = tls::server_config(&state.authority.load(), &sans)?;
            tls_config.store(cfg);
            Ok(validity)
        },
        shutdown,
    )
    .await;
}

/// [`refresh_serving_cert`] with the wall clock `wall` (Unix seconds) and the re-issue `reissue`.
async fn keep_serving_cert(
    serving: &tls::ServingDates,
    wall: impl Fn() -> i64,
    mut reissue: impl FnMut() -> Result<tls::Validity, tls::TlsSetupError>,
    mut shutdown: watch::Receiver<bool>,
) {
    loop {
        let now = wall();
        if now >= serving.get().half_life() {
            match reissue() {
                Ok(validity) => {
                    serving.set(validity);
                    tracing::info!(
                        not_after = validity.not_after,
                        "serving certificate re-issued"
                    );
                }
                // Tried again at the next check.
                Err(error) => tracing::error!(%error, "re-issuing the serving certificate failed"),
            }
        }
        let left = serving.get().half_life().saturating_sub(wall());
        let wait = Duration::from_secs(u64::try_from(left).unwrap_or(0)).min(SERVING_CERT_CHECK);
        // Never a busy loop (a certificate whose half-life is already past when issued, as under
        // an intermediate about to expire).
        let wait = if wait.is_zero() {
            SERVING_CERT_CHECK
        } else {
            wait
        };
        tokio::select! {
            () = tokio::time::sleep(wait) => {}
            _ = shutdown.wait_for(|s| *s) => return,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicI64, AtomicUsize, Ordering};

    const WEEK: i64 = 7 * 86_400;

    /// A serving certificate issued at wall-clock time `now` as the CA issues it.
    fn issued_at(now: i64) -> tls::Validity {
        tls::Validity {
            not_before: now - 300,
            not_after: now + WEEK,
        }
    }

    /// The re-issue follows the wall clock: a clock stepped past the certificate's half-life
    /// (here: started 8 days behind, then set right) re-issues it within a check, and a
    /// certificate is re-issued once, not again at every check. The monotonic time is tokio's
    /// paused clock: nothing here waits for real.
    #[tokio::test(start_paused = true)]
    async fn a_wall_clock_stepped_past_the_half_life_reissues_the_serving_cert_within_a_check() {
        let wall = Arc::new(AtomicI64::new(1_800_000_000 - 8 * 86_400));
        let serving = Arc::new(tls::ServingDates::default());
        serving.set(issued_at(wall.load(Ordering::SeqCst)));
        let reissued = Arc::new(AtomicUsize::new(0));
        let (stop, shutdown) = watch::channel(false);
        let task = {
            let (wall, serving, reissued) = (wall.clone(), serving.clone(), reissued.clone());
            tokio::spawn(async move {
                let w = wall.clone();
                keep_serving_cert(
                    &serving,
                    move || w.load(Ordering::SeqCst),
                    || {
                        reissued.fetch_add(1, Ordering::SeqCst);
                        Ok(issued_at(wall.load(Ordering::SeqCst)))
                    },
                    shutdown,
                )
                .await;
            })
        };
        tokio::time::sleep(Duration::from_secs(600)).await;
        assert_eq!(
            reissued.load(Ordering::SeqCst),
            0,
            "not before its half-life"
        );
        // The clock is set right: the certificate expired a day ago by it.
        wall.fetch_add(8 * 86_400, Ordering::SeqCst);
        let now = wall.load(Ordering::SeqCst);
        assert!(serving.not_ready(now).is_some());
        tokio::time::sleep(SERVING_CERT_CHECK + Duration::from_secs(1)).await;
        assert_eq!(
            reissued.load(Ordering::SeqCst),
            1,
            "re-issued within a check"
        );
        assert_eq!(serving.get(), issued_at(now));
        assert_eq!(serving.not_ready(now), None);
        tokio::time::sleep(Duration::from_secs(3600)).await;
        assert_eq!(reissued.load(Ordering::SeqCst), 1, "once");
        // Without a step, by the wall clock moving on with the monotonic one: at its half-life.
        for _ in 0..(WEEK / 2 / 60) {
            wall.fetch_add(60, Ordering::SeqCst);
            tokio::time::sleep(Duration::from_secs(60)).await;
        }
        tokio::time::sleep(SERVING_CERT_CHECK).await;
        assert_eq!(reissued.load(Ordering::SeqCst), 2, "at the next half-life");
        stop.send(true).unwrap();
        task.await.unwrap();
    }
}
