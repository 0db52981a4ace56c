//! `chaos-run`: the chaos and soak suite of issue #18 (see `meshid_bench::chaos`). Runs each
//! scenario against the real binaries in `--bin-dir`, prints what it checks as it goes, writes the
//! JSON results and `docs/reliability.md`, and exits 1 when a scenario's promised behaviour broke.

use std::path::PathBuf;
use std::time::{Duration, Instant};

use anyhow::{Result, bail};
use clap::Parser;
use meshid_bench::chaos::markdown::RunReport;
use meshid_bench::chaos::{
    Env, ca_dir, ca_outage, clock_steps, files, floods, rotations, run_scenario, signals, soak,
};
use meshid_bench::harness::{self, Ctx, Settings, machine};

const SCENARIOS: [&str; 8] = [
    "ca-outage",
    "signals",
    "files",
    "ca-dir",
    "clock-steps",
    "floods",
    "rotations-under-load",
    "soak",
];

#[derive(Debug, Parser)]
#[command(
    name = "chaos-run",
    about = "meshid chaos scenarios against the real binaries"
)]
struct Args {
    /// Directory holding meshid-ca, meshid-sidecar, bench-app (and meshid-injector for floods).
    #[arg(long, default_value = "target/release")]
    bin_dir: PathBuf,
    /// Smaller and shorter (CI): every scenario still runs and checks; figures are not published.
    #[arg(long)]
    smoke: bool,
    /// Scenarios to run, comma-separated.
    #[arg(long, value_delimiter = ',', default_values_t = SCENARIOS.map(String::from))]
    scenarios: Vec<String>,
    /// Simulated sidecars in the ca-outage renewal storm (the smoke run takes at most 100).
    #[arg(long, default_value_t = 500)]
    sidecars: usize,
    /// Length of the soak in minutes (default 30; 1 with --smoke).
    #[arg(long)]
    soak_minutes: Option<f64>,
    /// Where to write the JSON results.
    #[arg(long)]
    out: Option<PathBuf>,
    /// Where to write the Markdown report.
    #[arg(long)]
    doc: Option<PathBuf>,
}

/// The uid and gid to run file-permission faults as, when this process is root and `setpriv`
/// exists (nobody:nogroup).
fn unprivileged() -> Option<(u32, u32)> {
    let root = std::process::Command::new("id")
        .arg("-u")
        .output()
        .is_ok_and(|o| String::from_utf8_lossy(&o.stdout).trim() == "0");
    let setpriv = std::process::Command::new("setpriv")
        .arg("--version")
        .output()
        .is_ok_and(|o| o.status.success());
    (root && setpriv).then_some((65534, 65534))
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() -> Result<()> {
    let args = Args::parse();
    for s in &args.scenarios {
        if !SCENARIOS.contains(&s.as_str()) {
            bail!(
                "--scenarios: unknown scenario {s:?} (known: {})",
                SCENARIOS.join(", ")
            );
        }
    }
    let mut bins = vec!["meshid-ca", "meshid-sidecar", "bench-app"];
    if args.scenarios.iter().any(|s| s == "floods") {
        bins.push("meshid-injector");
    }
    for bin in bins {
        if !args.bin_dir.join(bin).exists() {
            bail!(
                "{} not found in {} (run bench/chaos.sh)",
                bin,
                args.bin_dir.display()
            );
        }
    }
    if args.sidecars == 0 {
        bail!("--sidecars: must be at least 1");
    }
    if args
        .soak_minutes
        .is_some_and(|m| !(m > 0.0 && m <= 24.0 * 60.0))
    {
        bail!("--soak-minutes: must be more than 0 and at most a day");
    }
    harness::clean_up_on_signal();
    let bin_dir = std::fs::canonicalize(&args.bin_dir)?;
    // Some faults run a CA or a sidecar as another user (setpriv): they must reach its files.
    let work = meshid_runtime::process::new_temp_dir("meshid-chaos-", 0o755)?;
    harness::remove_on_signal(&work);
    let settings = Settings {
        bin_dir: bin_dir.clone(),
        work: work.clone(),
        smoke: args.smoke,
        runs: 1,
        workers: 1,
        duration: Duration::ZERO,
        warmup: Duration::ZERO,
        connections: 0,
        rate: 0.0,
        idle_connections: 0,
        ca_count: 0,
        ca_concurrency: Vec::new(),
        scenarios: args.scenarios.clone(),
    };
    let env = Env {
        ctx: Ctx::new(settings),
        smoke: args.smoke,
        unprivileged: unprivileged(),
    };
    // The tree the binaries were built from: read before the scenarios run, since a commit made
    // during a long run must not be credited with its results.
    let head = git(&["rev-parse", "--short=12", "HEAD"]);
    let full_head = git(&["rev-parse", "HEAD"]);
    // What this tool writes does not count as a change to the tree it measures.
    let dirty = !git(&[
        "status",
        "--porcelain",
        "--untracked-files=no",
        "--",
        ".",
        ":!docs/reliability.md",
        ":!bench/results",
    ])
    .is_empty();
    let t0 = Instant::now();
    let machine_info = machine::machine();
    let mut reports = Vec::new();
    for id in &args.scenarios {
        let report = match id.as_str() {
            "ca-outage" => {
                let p = ca_outage::Params::new(args.smoke, args.sidecars);
                run_scenario(
                    &env,
                    "ca-outage",
                    "CA killed (SIGKILL) during a renewal storm, down past the certificates' expiry",
                    |r| async { ca_outage::run(&env, &p, r).await },
                )
                .await
            }
            "ca-dir" => run_scenario(
                &env,
                "ca-dir",
                "CA directory full or read-only during a rotation step and a join-token redemption",
                |r| ca_dir::run(&env, r),
            )
            .await,
            "clock-steps" => {
                let p = clock_steps::Params::new(args.smoke);
                run_scenario(
                    &env,
                    "clock-steps",
                    "Wall clock of each sidecar stepped 5 min back, 5 min forward and past the certificate lifetime",
                    |r| async { clock_steps::run(&env, &p, r).await },
                )
                .await
            }
            "floods" => {
                let p = floods::Params::new(args.smoke);
                run_scenario(
                    &env,
                    "floods",
                    "Connection floods and slow clients at 10x the connection limit on every listener while allowed traffic flows",
                    |r| async { floods::run(&env, &p, r).await },
                )
                .await
            }
            "rotations-under-load" => {
                let p = rotations::Params::new(args.smoke);
                run_scenario(
                    &env,
                    "rotations-under-load",
                    "Requests at saturation through a CA-mode pair across certificate renewals, an intermediate rotation and a root rotation",
                    |r| async { rotations::run(&env, &p, r).await },
                )
                .await
            }
            "soak" => {
                let p = soak::Params::new(args.smoke, args.soak_minutes);
                run_scenario(
                    &env,
                    "soak",
                    "Half of saturation for a long time with renewals every minute: memory, descriptors and tasks stay flat",
                    |r| async { soak::run(&env, &p, r).await },
                )
                .await
            }
            "signals" => run_scenario(
                &env,
                "signals",
                "SIGTERM to each sidecar under load; SIGKILL to the inbound sidecar and a restart",
                |r| signals::run(&env, r),
            )
            .await,
            _ => run_scenario(
                &env,
                "files",
                "Policy and credential files torn, truncated, replaced by a directory, unreadable",
                |r| files::run(&env, r),
            )
            .await,
        };
        reports.push(report);
    }
    let _ = std::fs::remove_dir_all(&work);

    let mode = if args.smoke { "smoke" } else { "full" };
    let default_dir = if args.smoke {
        PathBuf::from("bench/results/smoke")
    } else {
        PathBuf::from("bench/results")
    };
    let out = args
        .out
        .clone()
        .unwrap_or_else(|| default_dir.join("chaos-latest.json"));
    let doc = args.doc.clone().unwrap_or_else(|| {
        if args.smoke {
            default_dir.join("reliability.md")
        } else {
            PathBuf::from("docs/reliability.md")
        }
    });
    let command: Vec<String> = std::env::args().collect();
    let now_unix = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    let (bin_text, work_text) = (bin_dir.display().to_string(), work.display().to_string());
    for r in &mut reports {
        r.commit = if dirty {
            format!("{head}-dirty")
        } else {
            head.clone()
        };
        r.generated_unix = now_unix;
        // Written with the placeholders, so that a later run can keep them as they are.
        for c in &mut r.commands {
            *c = c.replace(&bin_text, "$BIN").replace(&work_text, "$WORK");
        }
    }
    // A full run of some scenarios keeps the others' last results.
    if !args.smoke
        && let Ok(bytes) = std::fs::read(&out)
        && let Ok(old) = serde_json::from_slice::<RunReport>(&bytes)
    {
        for s in old.scenarios {
            if SCENARIOS.contains(&s.id.as_str()) && !reports.iter().any(|r| r.id == s.id) {
                reports.push(s);
            }
        }
    }
    reports.sort_by_key(|r| SCENARIOS.iter().position(|s| *s == r.id));
    let report = RunReport {
        mode: mode.into(),
        generated_unix: now_unix,
        seconds: t0.elapsed().as_secs_f64(),
        command: command.join(" "),
        bin_dir: bin_text,
        work_dir: work_text,
        machine: machine_info,
        versions: serde_json::json!({
            "meshid_git_commit": full_head,
            "meshid_git_dirty": dirty,
            "rustc": run("rustc", &["--version"]),
        }),
        scenarios: reports,
    };
    for p in [&out, &doc] {
        if let Some(parent) = p.parent() {
            std::fs::create_dir_all(parent)?;
        }
    }
    std::fs::write(&out, serde_json::to_vec_pretty(&report)?)?;
    std::fs::write(&doc, report.render(&out.display().to_string()))?;
    println!(
        "\nchaos-run ({mode}) took {:.1} s; results: {}, {}",
        report.seconds,
        out.display(),
        doc.display()
    );
    let failed: Vec<String> = report
        .scenarios
        .iter()
        .filter(|s| s.status != "measured" && args.scenarios.contains(&s.id))
        .map(|s| {
            let mut why: Vec<String> = s
                .failed_checks()
                .iter()
                .map(|c| format!("{}: {}", c.what, c.detail))
                .collect();
            if let Some(e) = &s.error {
                why.push(e.clone());
            }
            format!("{}: {}", s.id, why.join("; "))
        })
        .collect();
    if !failed.is_empty() {
        eprintln!(
            "\nchaos-run: {} scenario(s) broke what they check:",
            failed.len()
        );
        for f in &failed {
            eprintln!("  - {f}");
        }
        std::process::exit(1);
    }
    Ok(())
}

fn run(program: &str, args: &[&str]) -> String {
    std::process::Command::new(program)
        .args(args)
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_owned())
        .unwrap_or_default()
}

fn git(args: &[&str]) -> String {
    run("git", &[&["--no-optional-locks"], args].concat())
}
