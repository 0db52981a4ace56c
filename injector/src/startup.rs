//! `meshid-injector`'s flags, their validation (every problem named at once) and its run loop: the
//! webhook over TLS with a certificate from `meshid-ca webhook-cert` (the injector holds no CA key),
//! the serving pair and the trust bundle re-read when their files change.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use arc_swap::ArcSwap;
use clap::Parser;
use meshid_identity::parse_duration_at_least;
use meshid_runtime::process::LogFormat;
use time::OffsetDateTime;

use super::metrics::InjectorMetrics;
use super::serving::{self, ServingCert};
use super::{InjectConfig, TrustBundle, reload, server};

#[derive(Debug, Parser)]
#[command(
    name = "meshid-injector",
    version,
    about = "meshid sidecar injection webhook"
)]
pub struct InjectorArgs {
    /// Serving certificate chain (PEM, leaf first), from `meshid-ca webhook-cert`; re-read when it
    /// changes.
    #[arg(long, env = "MESHID_INJECTOR_TLS_CERT")]
    pub tls_cert: PathBuf,
    /// The serving certificate's private key (PEM).
    #[arg(long, env = "MESHID_INJECTOR_TLS_KEY")]
    pub tls_key: PathBuf,
    /// Trust bundle (PEM roots) given to every injected sidecar; re-read when it changes.
    #[arg(long, env = "MESHID_INJECTOR_TRUST_BUNDLE")]
    pub trust_bundle: PathBuf,
    /// The name the API server calls the injector by (its Service's DNS name, e.g.
    /// meshid-injector.meshid.svc): the certificate must be valid for it, at start and at reloads.
    #[arg(long, env = "MESHID_INJECTOR_SERVER_NAME")]
    pub server_name: Option<String>,
    /// How often the certificate, key and bundle files are checked for changes.
    #[arg(long, env = "MESHID_INJECTOR_RELOAD_INTERVAL", default_value = "5s")]
    pub reload_interval: String,
    /// HTTPS listener for the API server.
    #[arg(long, env = "MESHID_INJECTOR_LISTEN", default_value = "0.0.0.0:9443")]
    pub listen: String,
    /// Plain-HTTP admin listener: `/healthz`, `/readyz` and `/metrics` (OpenMetrics text, or
    /// Prometheus text when asked for; including the serving certificate's expiry). None unless
    /// set.
    #[arg(long, env = "MESHID_INJECTOR_ADMIN_LISTEN")]
    pub admin_listen: Option<String>,
    /// Sidecar image.
    #[arg(long, env = "MESHID_INJECTOR_SIDECAR_IMAGE")]
    pub sidecar_image: String,
    /// Sidecar image pull policy, as Kubernetes spells it.
    #[arg(
        long,
        env = "MESHID_INJECTOR_PULL_POLICY",
        value_enum,
        default_value_t = PullPolicy::IfNotPresent
    )]
    pub pull_policy: PullPolicy,
    /// The CA's gRPC address as sidecars reach it.
    #[arg(long, env = "MESHID_INJECTOR_CA_ADDR")]
    pub ca_addr: String,
    /// Lifetime of the sidecar's projected token, in seconds (at least 600; at most the CA's
    /// --max-token-lifetime, 48h by default, or the CA refuses the token).
    #[arg(
        long,
        env = "MESHID_INJECTOR_TOKEN_EXPIRATION_SECONDS",
        default_value_t = 600
    )]
    pub token_expiration_seconds: u32,
    /// Sidecar resources as JSON (`{"requests":{...},"limits":{...}}`).
    #[arg(long, env = "MESHID_INJECTOR_SIDECAR_RESOURCES")]
    pub sidecar_resources: Option<String>,
    /// Log format of the injector, and of the sidecars it injects unless --sidecar-log-format is
    /// given: text (coloured only on a terminal, never with NO_COLOR) or json (one object per line,
    /// the message and every field at the top level).
    #[arg(long, env = "MESHID_LOG_FORMAT", value_enum, default_value_t = LogFormat::Text)]
    pub log_format: LogFormat,
    /// Log format of the sidecars it injects (default: --log-format).
    #[arg(long, env = "MESHID_INJECTOR_SIDECAR_LOG_FORMAT", value_enum)]
    pub sidecar_log_format: Option<LogFormat>,
    /// Injected sidecars label their request and byte metrics with the peer's SPIFFE ID, so
    /// dashboards can show who calls whom (one series per peer: mind the cardinality).
    #[arg(long, env = "MESHID_INJECTOR_SIDECAR_METRICS_PEER_IDENTITY")]
    pub sidecar_metrics_peer_identity: bool,
    /// Most webhook connections open at once; at the cap a connection with no request yet is
    /// displaced, else the newcomer is closed at accept
    /// (meshid_injector_connections_refused_total).
    #[arg(long, env = "MESHID_INJECTOR_MAX_CONNECTIONS", default_value_t = 512)]
    pub max_connections: usize,
    /// Most webhook connections open at once from one source IP.
    #[arg(
        long,
        env = "MESHID_INJECTOR_MAX_CONNECTIONS_PER_SOURCE",
        default_value_t = 64
    )]
    pub max_connections_per_source: usize,
    /// The TLS handshake and each HTTP/1 request head (or the wait for the next request on an idle
    /// keep-alive connection) must complete within this.
    #[arg(
        long,
        env = "MESHID_INJECTOR_HEADER_READ_TIMEOUT",
        default_value = "10s"
    )]
    pub header_read_timeout: String,
    /// A request's body must arrive within this (answered 408 otherwise).
    #[arg(long, env = "MESHID_INJECTOR_REQUEST_TIMEOUT", default_value = "10s")]
    pub request_timeout: String,
    /// Largest request body in bytes (answered 413 above it); at most 3 MiB.
    #[arg(long, env = "MESHID_INJECTOR_MAX_REQUEST_BYTES", default_value_t = server::DEFAULT_MAX_REQUEST_BYTES)]
    pub max_request_bytes: usize,
    /// A connection this old is told to go away (HTTP/2 GOAWAY; HTTP/1: closed after its request).
    #[arg(long, env = "MESHID_INJECTOR_MAX_CONNECTION_AGE", default_value = "5m")]
    pub max_connection_age: String,
    /// Memory, in bytes, that reviews in flight may use together: a quarter for request bodies
    /// being received (one source address at most an eighth of that, and at least
    /// --max-request-bytes), the rest for parsing, answering and sending (each review charged
    /// what its body's JSON can cost once parsed). A request waits for room up to --review-wait,
    /// then is answered 503; one that could never fit is answered 413. At least 4 x
    /// --max-request-bytes; keep it well under the container's memory limit.
    #[arg(long, env = "MESHID_INJECTOR_REVIEW_MEMORY", default_value_t = super::budget::DEFAULT_REVIEW_MEMORY)]
    pub review_memory: usize,
    /// The longest a request waits for room in --review-memory before it is answered 503 (keep it
    /// under the webhook's timeoutSeconds, so the API server gets that answer).
    #[arg(long, env = "MESHID_INJECTOR_REVIEW_WAIT", default_value = "3s")]
    pub review_wait: String,
    /// On SIGTERM or Ctrl-C /readyz answers 503 at once, and the injector goes on accepting and
    /// answering reviews for this long: the API server (through the Service, kube-proxy's rules or
    /// its own endpoint watch) goes on sending reviews to a terminating pod for a moment, and a
    /// refused connection fails the pod's creation under `failurePolicy: Fail`. Then it drains
    /// (--shutdown-grace). 0s: drain at once.
    #[arg(long, env = "MESHID_INJECTOR_SHUTDOWN_DELAY", default_value = "5s")]
    pub shutdown_delay: String,
    /// Once draining, the injector stops accepting connections and answers the reviews in flight
    /// for at most this long, then exits (keep --shutdown-delay plus this under
    /// terminationGracePeriodSeconds).
    #[arg(long, env = "MESHID_INJECTOR_SHUTDOWN_GRACE", default_value = "5s")]
    pub shutdown_grace: String,
}

/// Environment twins renamed after their flags, `(new, old)`; the old names still work, with a
/// warning.
pub const RENAMED_ENV: &[(&str, &str)] = &[(
    "MESHID_INJECTOR_TOKEN_EXPIRATION_SECONDS",
    "MESHID_INJECTOR_TOKEN_EXPIRATION",
)];

/// The shortest interval or timeout the flags accept.
const MIN_DURATION: Duration = Duration::from_millis(100);
/// The most `--review-memory` may be (a review's charge is counted in 32 bits).
const MAX_REVIEW_MEMORY: usize = 3 << 30;

/// A container's `imagePullPolicy`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum PullPolicy {
    /// Pull at every container start.
    #[value(name = "Always")]
    Always,
    /// Pull only when the node lacks the image.
    #[value(name = "IfNotPresent")]
    IfNotPresent,
    /// Never pull: the image must be on the node.
    #[value(name = "Never")]
    Never,
}

impl PullPolicy {
    /// The Kubernetes spelling.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Always => "Always",
            Self::IfNotPresent => "IfNotPresent",
            Self::Never => "Never",
        }
    }
}

/// Everything checked and loaded, ready to serve.
pub struct Startup {
    args: InjectorArgs,
    listen: SocketAddr,
    admin_listen: Option<SocketAddr>,
    interval: Duration,
    pair: Arc<rustls::sign::CertifiedKey>,
    pair_files: Vec<Vec<u8>>,
    bundle_file: Vec<Vec<u8>>,
    config: InjectConfig,
    limits: server::Limits,
}

impl InjectorArgs {
    /// Checks every flag and loads the files; on failure, every problem.
    pub fn into_startup(self) -> Result<Startup, Vec<String>> {
        let mut problems = Vec::new();
        let listen: Option<SocketAddr> = self.listen.parse().ok();
        if listen.is_none() {
            problems.push(format!("--listen: {:?} is not IP:PORT", self.listen));
        }
        let admin_listen = match self.admin_listen.as_deref().map(str::parse::<SocketAddr>) {
            None => Some(None),
            Some(Ok(addr)) => Some(Some(addr)),
            Some(Err(_)) => {
                problems.push(format!(
                    "--admin-listen: {:?} is not IP:PORT",
                    self.admin_listen.as_deref().unwrap_or_default()
                ));
                None
            }
        };
        if self.token_expiration_seconds < 600 {
            problems
                .push("--token-expiration-seconds: Kubernetes requires at least 600".to_owned());
        }
        let interval = match parse_duration_at_least(&self.reload_interval, MIN_DURATION) {
            Ok(d) => Some(d),
            Err(e) => {
                problems.push(format!("--reload-interval: {e}"));
                None
            }
        };
        let limits = self.limits(&mut problems);
        let resources = match self.sidecar_resources.as_deref().map(serde_json::from_str) {
            None => None,
            Some(Ok(v)) => Some(v),
            Some(Err(e)) => {
                problems.push(format!("--sidecar-resources: {e}"));
                None
            }
        };
        let pair_files = read_all(
            &[&self.tls_cert, &self.tls_key],
            &["--tls-cert", "--tls-key"],
        );
        let pair = match &pair_files {
            Ok(files) => match load_pair(files, self.server_name.as_deref()) {
                Ok(pair) => Some(pair),
                Err(e) => {
                    problems.push(format!(
                        "--tls-cert/--tls-key: {e} ({}, {})",
                        self.tls_cert.display(),
                        self.tls_key.display()
                    ));
                    None
                }
            },
            Err(e) => {
                problems.extend(e.iter().cloned());
                None
            }
        };
        let bundle_file = read_all(&[&self.trust_bundle], &["--trust-bundle"]);
        let bundle = match &bundle_file {
            Ok(files) => match load_bundle(files) {
                Ok(b) => Some(b),
                Err(e) => {
                    problems.push(format!(
                        "--trust-bundle: {}: {e}",
                        self.trust_bundle.display()
                    ));
                    None
                }
            },
            Err(e) => {
                problems.extend(e.iter().cloned());
                None
            }
        };
        let (
            Some(listen),
            Some(admin_listen),
            Some(interval),
            Some(limits),
            Some(pair),
            Some(bundle),
            Ok(pair_files),
            Ok(bundle_file),
            true,
        ) = (
            listen,
            admin_listen,
            interval,
            limits,
            pair,
            bundle,
            pair_files,
            bundle_file,
            problems.is_empty(),
        )
        else {
            return Err(problems);
        };
        let mut config = InjectConfig {
            image: self.sidecar_image.clone(),
            image_pull_policy: self.pull_policy.as_str().to_owned(),
            ca_addr: self.ca_addr.clone(),
            token_expiration_seconds: self.token_expiration_seconds,
            log_format: self
                .sidecar_log_format
                .unwrap_or(self.log_format)
                .as_str()
                .to_owned(),
            metrics_peer_identity: self.sidecar_metrics_peer_identity,
            ..InjectConfig::new(bundle)
        };
        if let Some(resources) = resources {
            config.resources = resources;
        }
        tracing::info!(
            not_after = ?serving::not_after(&pair),
            roots = config.trust_bundle.len(),
            "serving certificate and trust bundle loaded"
        );
        Ok(Startup {
            args: self,
            listen,
            admin_listen,
            interval,
            pair,
            pair_files,
            bundle_file,
            config,
            limits,
        })
    }

    /// The server's limits, or `None` after naming each bad one in `problems`.
    fn limits(&self, problems: &mut Vec<String>) -> Option<server::Limits> {
        let before = problems.len();
        let mut duration =
            |flag: &str, value: &str| match parse_duration_at_least(value, MIN_DURATION) {
                Ok(d) => d,
                Err(e) => {
                    problems.push(format!("{flag}: {e}"));
                    Duration::ZERO
                }
            };
        let header_read_timeout = duration("--header-read-timeout", &self.header_read_timeout);
        let request_timeout = duration("--request-timeout", &self.request_timeout);
        let max_connection_age = duration("--max-connection-age", &self.max_connection_age);
        let review_wait = duration("--review-wait", &self.review_wait);
        let shutdown_grace = duration("--shutdown-grace", &self.shutdown_grace);
        // 0s is a choice here (drain at once), not a mistake.
        let shutdown_delay = match parse_duration_at_least(&self.shutdown_delay, Duration::ZERO) {
            Ok(d) => d,
            Err(e) => {
                problems.push(format!("--shutdown-delay: {e}"));
                Duration::ZERO
            }
        };
        if self.max_connections == 0 {
            problems.push("--max-connections: must be at least 1".to_owned());
        }
        if self.max_connections_per_source == 0 {
            problems.push("--max-connections-per-source: must be at least 1".to_owned());
        }
        if !(1024..=server::MAX_REQUEST_BYTES_LIMIT).contains(&self.max_request_bytes) {
            problems.push(format!(
                "--max-request-bytes: must be between 1024 and {} (the API server's own limit)",
                server::MAX_REQUEST_BYTES_LIMIT
            ));
        }
        let smallest = 4 * self.max_request_bytes;
        if !(smallest..=MAX_REVIEW_MEMORY).contains(&self.review_memory) {
            problems.push(format!(
                "--review-memory: must be between 4 x --max-request-bytes ({smallest}: a quarter \
                 of it holds the bodies being received) and {MAX_REVIEW_MEMORY}"
            ));
        }
        (problems.len() == before).then_some(server::Limits {
            max_connections: self.max_connections,
            max_connections_per_source: self.max_connections_per_source,
            header_read_timeout,
            request_timeout,
            max_request_bytes: self.max_request_bytes,
            max_connection_age,
            review_memory: self.review_memory,
            review_wait,
            shutdown_grace,
            shutdown_delay,
        })
    }
}

impl Startup {
    /// Serves until SIGTERM or Ctrl-C, then answers the reviews in flight (within
    /// `--shutdown-grace`) and returns.
    pub fn run(self) -> ExitCode {
        let Startup {
            args,
            listen,
            admin_listen,
            interval,
            pair,
            pair_files,
            bundle_file,
            config,
            limits,
        } = self;
        meshid_runtime::process::warn_about_readable_keys([args.tls_key.as_path()]);
        let mut registry = prometheus_client::registry::Registry::default();
        let metrics = Arc::new(InjectorMetrics::register(&mut registry));
        metrics.serving_cert(serving::not_after(&pair));
        metrics.bundle_roots(config.trust_bundle.len());
        let registry = Arc::new(registry);
        let cert = ServingCert::new(pair);
        let tls = match serving::server_config(cert.clone()) {
            Ok(tls) => tls,
            Err(e) => {
                eprintln!("meshid-injector: tls: {e}");
                return ExitCode::FAILURE;
            }
        };
        let config = Arc::new(ArcSwap::from_pointee(config));
        let runtime = match tokio::runtime::Runtime::new() {
            Ok(rt) => rt,
            Err(e) => {
                eprintln!("meshid-injector: {e}");
                return ExitCode::FAILURE;
            }
        };
        runtime.block_on(async move {
            let listener = match tokio::net::TcpListener::bind(listen).await {
                Ok(l) => l,
                Err(e) => {
                    eprintln!("meshid-injector: cannot listen on {listen}: {e}");
                    return ExitCode::FAILURE;
                }
            };
            // Dropped when this function returns; the admin server stops with it.
            let (_stop_admin, admin_shutdown) = tokio::sync::watch::channel(false);
            let draining = Arc::new(std::sync::atomic::AtomicBool::new(false));
            if let Some(admin) = admin_listen {
                let listener = match tokio::net::TcpListener::bind(admin).await {
                    Ok(l) => l,
                    Err(e) => {
                        eprintln!(
                            "meshid-injector: cannot listen on {admin} (--admin-listen): {e}"
                        );
                        return ExitCode::FAILURE;
                    }
                };
                tokio::spawn(meshid_runtime::admin::serve(
                    listener,
                    registry,
                    Arc::new(Readiness {
                        cert: cert.clone(),
                        draining: draining.clone(),
                    }),
                    admin_shutdown,
                ));
            }
            tracing::info!(%listen, ?admin_listen, ?limits, "meshid-injector serving");
            let pair_paths = vec![args.tls_cert.clone(), args.tls_key.clone()];
            let server_name = args.server_name.clone();
            let m = metrics.clone();
            let counted = metrics.clone();
            tokio::spawn(reload::watch_files(
                "serving certificate",
                pair_paths,
                pair_files,
                interval,
                move |files| {
                    let pair = load_pair(files, server_name.as_deref()).map_err(|e| match e {
                        // The rotator's clock runs ahead of ours: valid in a moment.
                        serving::ServingError::NotYetValid(_) => {
                            reload::Refused::NotYet(e.to_string())
                        }
                        e => reload::Refused::Invalid(e.to_string()),
                    })?;
                    let not_after = serving::not_after(&pair);
                    m.serving_cert(not_after);
                    cert.set(pair);
                    Ok(format!("not after {not_after:?}"))
                },
                move |ok| counted.reload("serving_certificate", ok),
            ));
            let swap = config.clone();
            let m = metrics.clone();
            let counted = metrics.clone();
            tokio::spawn(reload::watch_files(
                "trust bundle",
                vec![args.trust_bundle.clone()],
                bundle_file,
                interval,
                move |files| {
                    let bundle = load_bundle(files).map_err(reload::Refused::Invalid)?;
                    m.bundle_roots(bundle.len());
                    let summary = format!("{} roots", bundle.len());
                    let mut next = InjectConfig::clone(&swap.load());
                    next.trust_bundle = bundle;
                    swap.store(Arc::new(next));
                    Ok(summary)
                },
                move |ok| counted.reload("trust_bundle", ok),
            ));
            let no_signals = std::cell::Cell::new(false);
            let signal = async {
                match meshid_runtime::process::wait_for_signal().await {
                    Ok(()) => {
                        draining.store(true, std::sync::atomic::Ordering::Relaxed);
                        tracing::info!(
                            delay = ?limits.shutdown_delay,
                            grace = ?limits.shutdown_grace,
                            "signal received; not ready, still answering reviews for the delay, \
                             then answering the reviews in flight and exiting"
                        );
                        tokio::time::sleep(limits.shutdown_delay).await;
                        tracing::info!("draining: no new connections");
                    }
                    Err(error) => {
                        eprintln!("meshid-injector: cannot handle signals: {error}");
                        no_signals.set(true);
                    }
                }
            };
            server::serve(listener, tls, config, metrics, limits, signal).await;
            if no_signals.get() {
                return ExitCode::FAILURE;
            }
            tracing::info!("exiting");
            ExitCode::SUCCESS
        })
    }
}

fn load_pair(
    files: &[Vec<u8>],
    server_name: Option<&str>,
) -> Result<Arc<rustls::sign::CertifiedKey>, serving::ServingError> {
    let [cert, key] = files else {
        return Err(serving::ServingError::Cert(
            "internal: two files expected".into(),
        ));
    };
    let pair = serving::load_pair(cert, key, OffsetDateTime::now_utc())?;
    if let Some(name) = server_name {
        serving::require_name(&pair, name)?;
    }
    Ok(pair)
}

fn load_bundle(files: &[Vec<u8>]) -> Result<TrustBundle, String> {
    let [bundle] = files else {
        return Err("internal: one file expected".into());
    };
    TrustBundle::from_pem(bundle)
}

/// Reads every file (of one version of a Kubernetes volume: [`meshid_runtime::volume`]), or names
/// each one that cannot be read.
fn read_all(paths: &[&Path], flags: &[&str]) -> Result<Vec<Vec<u8>>, Vec<String>> {
    let mut out = Vec::new();
    let mut problems = Vec::new();
    let read = meshid_runtime::volume::read_one_version(paths, reload::MAX_FILE_BYTES);
    for (read, flag) in read.into_iter().zip(flags) {
        match read {
            Ok(c) => out.push(c),
            Err(e) => problems.push(format!("{flag}: {e}")),
        }
    }
    if problems.is_empty() {
        Ok(out)
    } else {
        Err(problems)
    }
}

/// The injector is ready while it can answer the API server: its certificate was checked before
/// the listener opened, but it is not ready once that certificate (or a renewed one) has expired
/// (the API server refuses the handshake until a valid pair is put in place), nor once it drains
/// for shutdown (a Service then stops sending it reviews).
struct Readiness {
    cert: Arc<ServingCert>,
    draining: Arc<std::sync::atomic::AtomicBool>,
}

impl meshid_runtime::admin::AdminRoutes for Readiness {
    fn not_ready(&self) -> Option<String> {
        if self.draining.load(std::sync::atomic::Ordering::Relaxed) {
            return Some("shutting down: answering the reviews in flight".to_owned());
        }
        match serving::not_after(&self.cert.current()) {
            Some(not_after) if not_after <= OffsetDateTime::now_utc() => Some(format!(
                "the serving certificate expired at {not_after}; put a valid pair in --tls-cert \
                 and --tls-key (no restart needed)"
            )),
            _ => None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_flag_has_help_text_and_enums_list_their_values() {
        let mut command = <InjectorArgs as clap::CommandFactory>::command();
        command.build();
        assert_eq!(
            meshid_runtime::cli::undocumented_args(&command),
            Vec::<String>::new()
        );
        let required = [
            "meshid-injector",
            "--tls-cert=c",
            "--tls-key=k",
            "--trust-bundle=b",
            "--sidecar-image=i",
            "--ca-addr=a:1",
        ];
        let parse = |extra: &[&str]| InjectorArgs::try_parse_from([&required[..], extra].concat());
        assert_eq!(
            parse(&["--pull-policy", "Never"]).unwrap().pull_policy,
            PullPolicy::Never
        );
        for (flag, bad, listed) in [
            ("--pull-policy", "Sometimes", "Always, IfNotPresent, Never"),
            ("--log-format", "yaml", "text, json"),
        ] {
            let e = parse(&[flag, bad]).unwrap_err().to_string();
            assert!(e.contains(bad) && e.contains(listed), "{e}");
        }
    }
}
