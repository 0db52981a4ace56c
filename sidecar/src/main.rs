//! `meshid-sidecar`: one per pod. This skeleton parses its command line; `run` (the data plane) is
//! built in the next issues.

use std::process::ExitCode;

use clap::{Parser, Subcommand};

#[derive(Debug, Parser)]
#[command(
    name = "meshid-sidecar",
    version,
    about = "meshid sidecar: mTLS in and out, SPIFFE identity, allow-lists"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Run the sidecar.
    Run,
}

fn main() -> ExitCode {
    let cli = match Cli::try_parse() {
        Ok(cli) => cli,
        Err(e) if e.use_stderr() => {
            let _ = e.print();
            return ExitCode::from(64);
        }
        Err(e) => {
            let _ = e.print();
            return ExitCode::SUCCESS;
        }
    };
    match cli.command {
        Command::Run => {
            eprintln!("meshid-sidecar: the data plane is not built yet (see the open issues)");
            ExitCode::from(69)
        }
    }
}
