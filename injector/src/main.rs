//! `meshid-injector`: the sidecar-injection admission webhook (see `meshid_injector::startup`).
//! Bad configuration exits with code 64 after naming every bad setting.

use std::process::ExitCode;

use meshid_injector::startup::{InjectorArgs, RENAMED_ENV};

use meshid_runtime::EXIT_USAGE;

fn main() -> ExitCode {
    let (parsed, renamed) =
        meshid_runtime::cli::parse_with_renamed_env::<InjectorArgs>(RENAMED_ENV);
    let args = match parsed {
        Ok(args) => args,
        Err(e) => {
            let _ = e.print();
            return if e.use_stderr() {
                ExitCode::from(EXIT_USAGE)
            } else {
                ExitCode::SUCCESS
            };
        }
    };
    meshid_runtime::process::init_tracing(args.log_format);
    for warning in renamed {
        tracing::warn!("{warning}");
    }
    match args.into_startup() {
        Ok(startup) => {
            meshid_runtime::process::raise_open_files_limit_logged();
            // The webhook's serving key.
            meshid_runtime::process::protect_memory_logged();
            startup.run()
        }
        Err(problems) => {
            eprintln!("meshid-injector: invalid configuration:");
            for p in problems {
                eprintln!("  {p}");
            }
            ExitCode::from(EXIT_USAGE)
        }
    }
}
