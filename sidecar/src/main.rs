//! `meshid-sidecar run`: one per pod. Bad configuration exits 64 after naming every bad setting.
//! `meshid-sidecar check-policy`: a policy file checked, and a caller decided, without running.
//! `meshid-sidecar explain`: a denial explained by its decision ID, asked of a running sidecar.
//! `meshid-sidecar suggest-policy`: a policy allowing what a running sidecar has observed.

use std::process::ExitCode;

use meshid_runtime::process::error_chain;
use meshid_sidecar::cli::{Cli, Command, EXIT_USAGE, RENAMED_ENV};
use prometheus_client::registry::Registry;

fn main() -> ExitCode {
    let (parsed, renamed) = meshid_runtime::cli::parse_with_renamed_env::<Cli>(RENAMED_ENV);
    let cli = match parsed {
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
    meshid_runtime::process::init_tracing(cli.log_format);
    for warning in renamed {
        tracing::warn!("{warning}");
    }
    let args = match cli.command {
        Command::Run(args) => args,
        Command::CheckPolicy(args) => return meshid_sidecar::check::run(&args),
        Command::Explain(args) => return meshid_sidecar::decisions::explain(&args),
        Command::SuggestPolicy(args) => return meshid_sidecar::observed::suggest(&args),
    };
    let config = match args.into_config() {
        Ok(c) => c,
        Err(problems) => {
            eprintln!("meshid-sidecar: invalid configuration:");
            for p in problems {
                eprintln!("  {p}");
            }
            return ExitCode::from(EXIT_USAGE);
        }
    };
    // Every connection is a file: a soft limit below the connection caps would fail accepts, dials
    // and renewals first.
    let files = meshid_runtime::process::raise_open_files_limit_logged();
    // Its key (the renewal credential), the app's SVID keys and JWT-SVIDs live in its memory only.
    meshid_runtime::process::protect_memory_logged();
    let listeners = config.inbound.len() + config.outbound.len();
    let caps = listeners.saturating_mul(config.limits.max_connections) as u64;
    if let Some(files) = files
        && caps > files
    {
        tracing::warn!(
            open_files = files,
            connection_caps = caps,
            "the listeners' connection caps (--max-connections for each) add up to more than \
             the open files limit: under that load accepts, dials and renewals fail first"
        );
    }
    let rt = match runtime_builder().enable_all().build() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("meshid-sidecar: {e}");
            return ExitCode::FAILURE;
        }
    };
    rt.block_on(async move {
        let mut registry = Registry::default();
        let sidecar = match meshid_sidecar::run::start(config, &mut registry).await {
            Ok(s) => s,
            Err(e) if e.is_configuration() => {
                eprintln!(
                    "meshid-sidecar: invalid configuration:\n  {}",
                    error_chain(&e)
                );
                return ExitCode::from(EXIT_USAGE);
            }
            Err(e) => {
                eprintln!("meshid-sidecar: {}", error_chain(&e));
                return ExitCode::FAILURE;
            }
        };
        if let Err(e) = meshid_runtime::process::wait_for_signal().await {
            eprintln!("meshid-sidecar: {e}");
            return ExitCode::FAILURE;
        }
        tracing::info!("shutting down: draining in-flight requests");
        sidecar.shutdown().await;
        ExitCode::SUCCESS
    })
}

/// One worker (`TOKIO_WORKER_THREADS=1`, for a sidecar given one CPU): tokio's current-thread
/// scheduler, which runs every task on the one thread without the work-stealing machinery (4-5%
/// less CPU per request at saturation, docs/benchmarks.md); otherwise the multi-thread scheduler
/// with tokio's default worker count (or `TOKIO_WORKER_THREADS`).
fn runtime_builder() -> tokio::runtime::Builder {
    let one = std::env::var("TOKIO_WORKER_THREADS").is_ok_and(|v| v.trim() == "1");
    if one {
        tokio::runtime::Builder::new_current_thread()
    } else {
        tokio::runtime::Builder::new_multi_thread()
    }
}
