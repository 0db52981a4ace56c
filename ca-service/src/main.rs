//! `meshid-ca`: init a CA, serve it, create join tokens. Bad configuration exits with code 64 after
//! naming every bad setting.

use std::process::ExitCode;

use clap::Parser;
use meshid_ca::auth::JoinTokenStore;
use meshid_ca::authority::{self, ImportedRoot};
use meshid_ca::cli::{Cli, Command, EXIT_USAGE, TokenCommand};
use prometheus_client::registry::Registry;

fn main() -> ExitCode {
    let cli = match Cli::try_parse() {
        Ok(cli) => cli,
        Err(e) if e.use_stderr() => {
            let _ = e.print();
            return ExitCode::from(EXIT_USAGE);
        }
        Err(e) => {
            let _ = e.print();
            return ExitCode::SUCCESS;
        }
    };
    init_tracing(&cli.log_format);
    match run(cli) {
        Ok(()) => ExitCode::SUCCESS,
        Err(Failure::Usage(problems)) => {
            eprintln!("meshid-ca: invalid configuration:");
            for p in problems {
                eprintln!("  {p}");
            }
            ExitCode::from(EXIT_USAGE)
        }
        Err(Failure::Runtime(e)) => {
            eprintln!("meshid-ca: {e:#}");
            ExitCode::FAILURE
        }
    }
}

enum Failure {
    Usage(Vec<String>),
    Runtime(anyhow::Error),
}

impl<E: Into<anyhow::Error>> From<E> for Failure {
    fn from(e: E) -> Self {
        Self::Runtime(e.into())
    }
}

fn run(cli: Cli) -> Result<(), Failure> {
    match cli.command {
        Command::Init(args) => {
            let td = args.trust_domain().map_err(Failure::Usage)?;
            let import = match (&args.root_cert, &args.root_key) {
                (Some(cert), Some(key)) => Some(ImportedRoot {
                    cert_pem: std::fs::read_to_string(cert).map_err(|e| {
                        Failure::Usage(vec![format!("--root-cert: {}: {e}", cert.display())])
                    })?,
                    key_pem: std::fs::read_to_string(key).map_err(|e| {
                        Failure::Usage(vec![format!("--root-key: {}: {e}", key.display())])
                    })?,
                }),
                _ => None,
            };
            let report = authority::init(&args.dir, &td, import)?;
            println!("created CA for trust domain {td} in {}", args.dir.display());
            println!("  root sha256 fingerprint: {}", report.root_fingerprint);
            println!("  root expires:            {}", report.root_not_after);
            println!(
                "  intermediate expires:    {}",
                report.intermediate_not_after
            );
            println!(
                "  trust bundle:            {}",
                args.dir.join("bundle.pem").display()
            );
            Ok(())
        }
        Command::Token {
            command: TokenCommand::Create(args),
        } => {
            let (id, ttl) = args.parse().map_err(Failure::Usage)?;
            let td = authority::read_trust_domain(&args.dir)?;
            let token = JoinTokenStore::new(&args.dir, td).create(&id, ttl)?;
            eprintln!("join token for {id}, valid once for {}s:", ttl.as_secs());
            println!("{token}");
            Ok(())
        }
        Command::Serve(args) => {
            let config = args.into_config().map_err(Failure::Usage)?;
            let rt = tokio::runtime::Builder::new_multi_thread()
                .enable_all()
                .build()?;
            rt.block_on(async move {
                let mut registry = Registry::default();
                let ca = meshid_ca::start(config, &mut registry).await?;
                wait_for_signal().await?;
                tracing::info!("shutting down: finishing in-flight calls");
                ca.shutdown().await;
                Ok::<(), anyhow::Error>(())
            })?;
            Ok(())
        }
    }
}

async fn wait_for_signal() -> std::io::Result<()> {
    use tokio::signal::unix::{SignalKind, signal};
    let mut term = signal(SignalKind::terminate())?;
    let mut int = signal(SignalKind::interrupt())?;
    tokio::select! {
        _ = term.recv() => {}
        _ = int.recv() => {}
    }
    Ok(())
}

fn init_tracing(format: &str) {
    use tracing_subscriber::EnvFilter;
    let filter = EnvFilter::try_from_env("MESHID_LOG").unwrap_or_else(|_| EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    if format == "json" {
        builder.json().init();
    } else {
        builder.init();
    }
}
