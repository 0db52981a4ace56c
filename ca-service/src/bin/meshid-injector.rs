//! `meshid-injector`: the sidecar-injection admission webhook, served over TLS with a certificate
//! from the meshid CA's intermediate. Bad configuration exits with code 64 after naming every bad
//! setting.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;

use clap::Parser;
use meshid_ca::authority::Authority;
use meshid_ca::inject::{InjectConfig, server};

const EXIT_USAGE: u8 = 64;

#[derive(Debug, Parser)]
#[command(
    name = "meshid-injector",
    version,
    about = "meshid sidecar injection webhook"
)]
struct Cli {
    /// CA directory (from `meshid-ca init`; only the intermediate and bundle are read).
    #[arg(long, env = "MESHID_INJECTOR_CA_DIR")]
    ca_dir: PathBuf,
    /// HTTPS listener for the API server.
    #[arg(long, env = "MESHID_INJECTOR_LISTEN", default_value = "0.0.0.0:9443")]
    listen: String,
    /// DNS names of the serving certificate (repeatable), e.g. meshid-injector.meshid.svc.
    #[arg(
        long,
        env = "MESHID_INJECTOR_SAN",
        value_delimiter = ',',
        required = true
    )]
    san: Vec<String>,
    /// Sidecar image.
    #[arg(long, env = "MESHID_INJECTOR_SIDECAR_IMAGE")]
    sidecar_image: String,
    /// Sidecar image pull policy.
    #[arg(
        long,
        env = "MESHID_INJECTOR_PULL_POLICY",
        default_value = "IfNotPresent"
    )]
    pull_policy: String,
    /// The CA's gRPC address as sidecars reach it.
    #[arg(long, env = "MESHID_INJECTOR_CA_ADDR")]
    ca_addr: String,
    /// ConfigMap with `bundle.pem` in each injected namespace.
    #[arg(
        long,
        env = "MESHID_INJECTOR_BUNDLE_CONFIGMAP",
        default_value = "meshid-trust-bundle"
    )]
    bundle_configmap: String,
    /// Lifetime of the sidecar's projected token, in seconds (at least 600).
    #[arg(long, env = "MESHID_INJECTOR_TOKEN_EXPIRATION", default_value_t = 600)]
    token_expiration_seconds: u32,
    /// Sidecar resources as JSON (`{"requests":{...},"limits":{...}}`).
    #[arg(long, env = "MESHID_INJECTOR_SIDECAR_RESOURCES")]
    sidecar_resources: Option<String>,
    /// Log format: text or json.
    #[arg(long, env = "MESHID_LOG_FORMAT", default_value = "text")]
    log_format: String,
}

fn main() -> ExitCode {
    let cli = match Cli::try_parse() {
        Ok(cli) => cli,
        Err(e) => {
            let _ = e.print();
            return if e.use_stderr() {
                ExitCode::from(EXIT_USAGE)
            } else {
                ExitCode::SUCCESS
            };
        }
    };
    let subscriber = tracing_subscriber::fmt().with_env_filter(
        tracing_subscriber::EnvFilter::try_from_default_env()
            .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
    );
    if cli.log_format == "json" {
        subscriber.json().init();
    } else {
        subscriber.init();
    }
    let mut problems = Vec::new();
    let listen: Option<SocketAddr> = cli.listen.parse().ok();
    if listen.is_none() {
        problems.push(format!("--listen: {:?} is not IP:PORT", cli.listen));
    }
    if cli.token_expiration_seconds < 600 {
        problems.push("--token-expiration-seconds: Kubernetes requires at least 600".to_owned());
    }
    let mut config = InjectConfig {
        image: cli.sidecar_image.clone(),
        image_pull_policy: cli.pull_policy.clone(),
        ca_addr: cli.ca_addr.clone(),
        bundle_config_map: cli.bundle_configmap.clone(),
        token_expiration_seconds: cli.token_expiration_seconds,
        log_format: cli.log_format.clone(),
        ..InjectConfig::default()
    };
    if let Some(r) = &cli.sidecar_resources {
        match serde_json::from_str(r) {
            Ok(v) => config.resources = v,
            Err(e) => problems.push(format!("--sidecar-resources: {e}")),
        }
    }
    let authority = match Authority::load(&cli.ca_dir) {
        Ok(a) => Some(a),
        Err(e) => {
            problems.push(format!("--ca-dir: {e}"));
            None
        }
    };
    let (Some(listen), Some(authority), true) = (listen, authority, problems.is_empty()) else {
        eprintln!("meshid-injector: invalid configuration:");
        for p in problems {
            eprintln!("  {p}");
        }
        return ExitCode::from(EXIT_USAGE);
    };
    let tls = match server::tls_config(&authority, &cli.san) {
        Ok(tls) => tls,
        Err(e) => {
            eprintln!("meshid-injector: invalid configuration:\n  --san: {e}");
            return ExitCode::from(EXIT_USAGE);
        }
    };
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
        tracing::info!(%listen, "meshid-injector serving");
        tokio::select! {
            () = server::serve(listener, tls, Arc::new(config)) => {}
            _ = shutdown_signal() => tracing::info!("signal received; exiting"),
        }
        ExitCode::SUCCESS
    })
}

async fn shutdown_signal() {
    use tokio::signal::unix::{SignalKind, signal};
    match signal(SignalKind::terminate()) {
        Ok(mut term) => {
            tokio::select! {
                _ = term.recv() => {}
                _ = tokio::signal::ctrl_c() => {}
            }
        }
        Err(_) => {
            let _ = tokio::signal::ctrl_c().await;
        }
    }
}
