//! Assembling a running sidecar: credentials, policy, listeners, admin; and draining on shutdown.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use prometheus_client::registry::Registry;
use tokio::net::TcpListener;
use tokio::sync::watch;

use meshid_identity::annotations::policy_or_annotations;
use meshid_identity::policy::Policy;

use crate::conn::{ConnLimit, Shared};
use crate::creds::{CredentialStore, UpstreamSpec, files};
use crate::metrics::{Metrics, ResultLabels};
use crate::policy::{PolicyStore, PolicyWatcher, ReloadOutcome};
use crate::settings::{CredSource, RunConfig};

/// Why the sidecar could not start.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum StartError {
    #[error("credentials: {0}")]
    Files(#[from] files::FileError),
    #[error("credentials: {0}")]
    Creds(#[from] crate::creds::CredError),
    #[error("policy: {0}")]
    Policy(#[from] crate::policy::PolicyError),
    #[error("--workload-api-socket: {0}")]
    WorkloadApi(#[from] crate::workload_api::SocketError),
    #[error("binding {addr}: {source}{}", taken_hint(.addr, .source))]
    Bind {
        addr: SocketAddr,
        source: std::io::Error,
    },
}

impl StartError {
    /// Whether the configuration itself cannot work here (a listen address that cannot be bound,
    /// e.g. an app that took the port on all addresses): the binary then exits 64, like a bad flag.
    pub fn is_configuration(&self) -> bool {
        matches!(self, Self::Bind { .. } | Self::WorkloadApi(_))
    }
}

/// A running sidecar.
pub struct RunningSidecar {
    pub admin_addr: SocketAddr,
    /// Where /metrics and /identity are served when `--stats-listen` is set.
    pub stats_addr: Option<SocketAddr>,
    pub inbound_addrs: Vec<SocketAddr>,
    pub outbound_addrs: Vec<SocketAddr>,
    pub shared: Shared,
    shutdown: watch::Sender<bool>,
    /// Ends the admin (and stats) server when dropped: with the sidecar, after the drain, so that
    /// probes and scrapes get `/readyz` 503 and the drain's metrics while it lasts, not a refused
    /// connection (which looks like a crash).
    _admin_stop: watch::Sender<bool>,
    limits: Vec<ConnLimit>,
    grace: Duration,
    _policy: Option<PolicyWatcher>,
    _cred_watcher: Option<files::CredWatcher>,
}

/// The usual mistake in a pod: the app listens on all addresses, so the sidecar cannot take its
/// port on the pod IP (and the app would be reachable without the sidecar).
fn taken_hint(addr: &SocketAddr, error: &std::io::Error) -> &'static str {
    if error.kind() == std::io::ErrorKind::AddrInUse && !addr.ip().is_unspecified() {
        " (is the app listening on all addresses? It must listen on 127.0.0.1 only)"
    } else {
        ""
    }
}

async fn bind(addr: SocketAddr) -> Result<(TcpListener, SocketAddr), StartError> {
    let l = TcpListener::bind(addr)
        .await
        .map_err(|source| StartError::Bind { addr, source })?;
    let local = l
        .local_addr()
        .map_err(|source| StartError::Bind { addr, source })?;
    Ok((l, local))
}

/// Loads credentials and policy, binds every listener, and starts serving.
pub async fn start(
    config: RunConfig,
    registry: &mut Registry,
) -> Result<RunningSidecar, StartError> {
    let mut metrics = Metrics::register(registry);
    metrics.peer_identity = config.metrics_peer_identity;
    let upstreams = config
        .outbound
        .iter()
        .map(|o| UpstreamSpec {
            expected: o.expected.clone(),
            protocol: o.protocol,
        })
        .collect();
    let creds = Arc::new(CredentialStore::new(upstreams));
    let mut cred_watcher = None;
    if let CredSource::Files(files) = &config.creds {
        meshid_runtime::process::warn_about_readable_keys([files.key.as_path()]);
        let snapshot = creds.set_certificate(files::load(files)?)?;
        metrics
            .credential_updates
            .get_or_create(&ResultLabels { result: "applied" })
            .inc();
        metrics.record_file_certificate(&snapshot);
        tracing::info!(id = %snapshot.identity.id, not_after = snapshot.identity.not_after, "certificate loaded");
        cred_watcher = Some(files::watch_credential_files(
            files.clone(),
            creds.clone(),
            metrics.clone(),
        )?);
    }

    // Listeners first: the policy is checked against the ports actually bound.
    let (admin, admin_addr) = bind(config.admin_listen).await?;
    let stats = match config.stats_listen {
        Some(addr) => Some(bind(addr).await?),
        None => None,
    };
    let mut limits = Vec::new();
    let mut inbound_addrs = Vec::new();
    let mut inbound_listeners = Vec::new();
    for spec in &config.inbound {
        let (l, addr) = bind(spec.listen).await?;
        inbound_addrs.push(addr);
        let mut spec = spec.clone();
        // The policy is keyed by the port actually bound (it may have been 0 in tests).
        spec.listen = addr;
        inbound_listeners.push((l, spec));
    }
    let workload_api = match &config.workload_api {
        Some(path) => Some(crate::workload_api::bind(path)?),
        None => None,
    };
    let mut outbound_addrs = Vec::new();
    let mut outbound_listeners = Vec::new();
    for spec in &config.outbound {
        let (l, addr) = bind(spec.local).await?;
        outbound_addrs.push(addr);
        outbound_listeners.push((l, spec.clone()));
    }
    let listeners: Vec<(u16, meshid_identity::policy::Protocol)> = inbound_listeners
        .iter()
        .map(|(_, spec)| (spec.listen.port(), spec.protocol))
        .collect();
    let policy: PolicyStore = Default::default();
    // Open connections re-check their peer against every policy applied after they opened.
    let (policy_changed_tx, policy_changed) = watch::channel(0u64);
    let watcher = match &config.policy {
        Some(path) => {
            let m = metrics.clone();
            let on_reload = Box::new(move |outcome: &ReloadOutcome| {
                let result = match outcome {
                    ReloadOutcome::Applied => {
                        m.policy_rejected.set(0);
                        policy_changed_tx.send_modify(|g| *g += 1);
                        "applied"
                    }
                    ReloadOutcome::Rejected(_) => {
                        m.policy_rejected.set(1);
                        "rejected"
                    }
                    ReloadOutcome::Unchanged => return,
                };
                m.policy_reloads
                    .get_or_create(&ResultLabels { result })
                    .inc();
            });
            // A downward-API annotations file (--annotations) or a policy document (--policy).
            // A policy whose ports disagree with the listeners is refused like a broken file.
            let parse = Arc::new(
                move |text: &str| -> Result<Policy, crate::policy::PolicyError> {
                    let policy = policy_or_annotations(text)?;
                    policy.check_listeners(&listeners)?;
                    Ok(policy)
                },
            );
            let w = crate::policy::watch::watch_policy_file_with(
                path.clone(),
                policy.clone(),
                on_reload,
                parse,
            )?;
            metrics.policy_loaded.set(1);
            Some(w)
        }
        None => {
            if !config.inbound.is_empty() {
                tracing::warn!("no --policy: every inbound peer is denied (default deny)");
            }
            None
        }
    };

    let (shutdown_tx, shutdown_rx) = watch::channel(false);
    let shared = Shared {
        creds,
        policy,
        policy_changed,
        metrics,
        limits: config.limits,
        shutdown: shutdown_rx,
        decisions: Arc::default(),
        observed: Arc::default(),
        heap: meshid_runtime::heap::Trimmer::new(),
        form_bodies: crate::inbound::form_budget::FormBudget::new(config.limits.form_body_memory),
    };
    let trim_metrics = shared.metrics.clone();
    tokio::spawn(shared.heap.clone().run(move || {
        let started = std::time::Instant::now();
        let released = meshid_runtime::heap::release_free_pages();
        trim_metrics.heap_trimmed(released, started.elapsed());
    }));

    // Connection deadlines are monotonic timers set at the handshake; certificate validity is
    // wall-clock time. When the two clocks part (an NTP step, a resumed VM), every open connection
    // looks at its peer's expiry again by the wall clock.
    let stepped = shared.creds.clone();
    tokio::spawn(meshid_runtime::time::watch_clock(move |moved| {
        tracing::warn!(
            moved_secs = moved,
            "the wall clock moved apart from the monotonic clock; checking every open connection's \
             peer certificate against it"
        );
        stepped.clock_moved();
    }));

    let mut app_svids = None;
    let mut jwt_svids = None;
    if let CredSource::Ca(mode) = &config.creds {
        let mut mode = mode.clone();
        if let Some(path) = mode.bundle_cache.clone() {
            // The roots last received, to reach a CA rotated since this pod was configured.
            let cached = crate::creds::bundle_cache::load(&path);
            if !cached.roots.is_empty() {
                tracing::info!(path = %path.display(), roots = cached.roots.len(), pinned = cached.pinned.len(), "trusting the CA's roots last received as well as the configured ones");
            }
            for root in cached.roots {
                if !mode.endpoint.roots.contains(&root) {
                    mode.endpoint.roots.push(root);
                }
            }
            for pin in cached.pinned {
                if !mode.endpoint.pinned.contains(&pin) {
                    mode.endpoint.pinned.push(pin);
                }
            }
            tokio::spawn(crate::creds::bundle_cache::keep(
                path,
                shared.creds.clone(),
                shared.shutdown.clone(),
            ));
        }
        let mode = &mode;
        let life = Arc::new(crate::creds::ca::Lifecycle::new());
        if workload_api.is_some() {
            jwt_svids = Some(Arc::new(crate::creds::jwt_svid::JwtSvids::new(
                mode.clone(),
                shared.creds.clone(),
                life.clone(),
                shared.metrics.clone(),
            )));
            let (tx, rx) = watch::channel(None);
            app_svids = Some(rx);
            tokio::spawn(crate::creds::app_svid::run_app_svids(
                mode.clone(),
                shared.creds.clone(),
                life.clone(),
                shared.metrics.clone(),
                tx,
                shared.shutdown.clone(),
            ));
        }
        tokio::spawn(crate::creds::ca::run_issuer(
            mode.clone(),
            shared.creds.clone(),
            shared.metrics.clone(),
            life.clone(),
            shared.shutdown.clone(),
        ));
        tokio::spawn(crate::creds::ca::run_bundle_watch(
            mode.clone(),
            shared.creds.clone(),
            shared.metrics.clone(),
            life,
            shared.shutdown.clone(),
        ));
    }

    if let (CredSource::Files(_), Some(endpoint)) = (&config.creds, &config.report_to) {
        tokio::spawn(crate::creds::ca::run_file_mode_report(
            endpoint.clone(),
            shared.creds.clone(),
            shared.metrics.clone(),
            shared.shutdown.clone(),
        ));
    }

    if let Some(listener) = workload_api {
        tokio::spawn(crate::workload_api::serve(
            listener,
            shared.creds.clone(),
            shared.metrics.clone(),
            app_svids,
            jwt_svids,
            config.limits.idle_timeout,
            shared.shutdown.clone(),
        ));
    }
    for (l, spec) in inbound_listeners {
        let limit = ConnLimit::new(config.limits.max_connections);
        limits.push(limit.clone());
        tokio::spawn(crate::inbound::serve(l, spec, shared.clone(), limit));
    }
    for (index, (l, mut spec)) in outbound_listeners.into_iter().enumerate() {
        if let Ok(addr) = l.local_addr() {
            spec.local = addr;
        }
        let limit = ConnLimit::new(config.limits.max_connections);
        limits.push(limit.clone());
        tokio::spawn(crate::outbound::serve(
            l,
            spec,
            index,
            shared.clone(),
            limit,
        ));
    }
    let registry = Arc::new(std::mem::take(registry));
    let probes = Arc::new(crate::admin::ProbeTable::new(config.policy.clone()));
    let admin_routes = |role| {
        Arc::new(crate::admin::SidecarAdmin {
            shared: shared.clone(),
            needs_policy: !config.inbound.is_empty() && config.policy.is_some(),
            unready_on_policy_error: config.unready_on_policy_error,
            remote_decisions: config.remote_decisions,
            role,
            probes: probes.clone(),
        })
    };
    let (admin_stop, admin_stopped) = watch::channel(false);
    let mut stats_addr = None;
    let admin_role = match stats {
        Some((listener, addr)) => {
            stats_addr = Some(addr);
            tokio::spawn(meshid_runtime::admin::serve(
                listener,
                registry.clone(),
                admin_routes(crate::admin::AdminRole::Stats),
                admin_stopped.clone(),
            ));
            crate::admin::AdminRole::Probes
        }
        None => crate::admin::AdminRole::All,
    };
    tokio::spawn(meshid_runtime::admin::serve(
        admin,
        registry,
        admin_routes(admin_role),
        admin_stopped,
    ));
    tracing::info!(%admin_addr, stats = ?stats_addr, inbound = ?inbound_addrs, outbound = ?outbound_addrs, "sidecar serving");
    Ok(RunningSidecar {
        admin_addr,
        stats_addr,
        inbound_addrs,
        outbound_addrs,
        shared,
        shutdown: shutdown_tx,
        _admin_stop: admin_stop,
        limits,
        grace: config.limits.grace,
        _policy: watcher,
        _cred_watcher: cred_watcher,
    })
}

impl RunningSidecar {
    /// Stops accepting, lets in-flight requests and connections finish (up to the grace period).
    pub async fn shutdown(self) {
        let _ = self.shutdown.send(true);
        let drained = async {
            for l in &self.limits {
                l.drained().await;
            }
        };
        if tokio::time::timeout(self.grace, drained).await.is_err() {
            let open: usize = self.limits.iter().map(ConnLimit::open).sum();
            tracing::warn!(open, "grace period over; closing remaining connections");
        } else {
            tracing::info!("drained; exiting");
        }
    }
}
