//! `bench-run`: the benchmark harness behind `bench/run.sh`. Starts meshid, nginx and haproxy pairs
//! (and the app alone) on CPU 1, drives them from CPU 0, and writes `bench/results/latest.json` and
//! `docs/benchmarks.md`.

use std::path::PathBuf;
use std::time::{Duration, Instant};

use anyhow::{Result, bail};
use clap::Parser;
use meshid_bench::harness::pki::BenchPki;
use meshid_bench::harness::report::ScenarioResult;
use meshid_bench::harness::{Ctx, Settings, ca, machine, markdown, scenarios};

const ALL: [&str; 10] = [
    "throughput",
    "throughput_tcp",
    "latency",
    "handshakes",
    "first_request",
    "memory",
    "memory_tcp",
    "startup",
    "ca",
    "fleet",
];

const BINARIES: [&str; 6] = [
    "meshid-sidecar",
    "meshid-ca",
    "meshload",
    "bench-app",
    "ca-bench",
    "fleet-bench",
];

#[derive(Debug, Parser)]
#[command(name = "bench-run", about = "meshid vs nginx vs haproxy, side by side")]
struct Args {
    /// Directory with the release binaries (meshid-sidecar, meshid-ca, meshload, bench-app, ca-bench).
    #[arg(long, default_value = "target/release")]
    bin_dir: PathBuf,
    /// A few seconds per scenario and one run (CI).
    #[arg(long)]
    smoke: bool,
    /// Runs per figure (default 3; smoke 1).
    #[arg(long)]
    runs: Option<usize>,
    /// Threads per proxy: tokio workers, nginx worker processes, haproxy threads.
    #[arg(long, default_value_t = 1)]
    workers: usize,
    /// Measured window per load run (default 10s; smoke 2s).
    #[arg(long, value_parser = duration)]
    duration: Option<Duration>,
    /// Warm-up before each window (default 2s; smoke 500ms).
    #[arg(long, value_parser = duration)]
    warmup: Option<Duration>,
    /// Scenarios to run (comma-separated).
    #[arg(long, value_delimiter = ',', default_values_t = ALL.map(String::from))]
    scenarios: Vec<String>,
    /// Results file (default bench/results/latest.json; with --smoke bench/results/smoke/latest.json,
    /// so a smoke run never replaces the published figures).
    #[arg(long)]
    out: Option<PathBuf>,
    /// Markdown report, SVG plots go next to the results file (default docs/benchmarks.md; with
    /// --smoke bench/results/smoke/benchmarks.md).
    #[arg(long)]
    docs: Option<PathBuf>,
    /// Also record CPU profiles of every proxy under the throughput load (extra, unscored runs)
    /// into this directory, with `perf report` summaries.
    #[arg(long)]
    perf: Option<PathBuf>,
    /// Start one contender (direct, meshid, nginx, haproxy), print its addresses and the client
    /// certificate to use, and keep it running for manual measurement (until killed).
    #[arg(long)]
    serve: Option<String>,
    /// Only regenerate the markdown and plots from an existing results file (no measurement).
    #[arg(long)]
    render: Option<PathBuf>,
    /// Keep the work directory (configs, logs) instead of deleting it.
    #[arg(long)]
    keep: bool,
}

fn duration(s: &str) -> Result<Duration, String> {
    meshid_identity::parse_duration(s)
}

fn main() -> Result<()> {
    let args = Args::parse();
    let (out, docs) = if args.smoke {
        (
            args.out
                .clone()
                .unwrap_or_else(|| "bench/results/smoke/latest.json".into()),
            args.docs
                .clone()
                .unwrap_or_else(|| "bench/results/smoke/benchmarks.md".into()),
        )
    } else {
        (
            args.out
                .clone()
                .unwrap_or_else(|| "bench/results/latest.json".into()),
            args.docs
                .clone()
                .unwrap_or_else(|| "docs/benchmarks.md".into()),
        )
    };
    if let Some(json) = &args.render {
        let mut results = markdown::Results::read(json)?;
        let before = serde_json::to_value(&results)?;
        for s in &mut results.scenarios {
            let id = s.id.clone();
            s.add_meshid_ratios(scenarios::ratio_figures(&id));
            if id == "latency" {
                scenarios::judge_added_latency(s);
            }
        }
        // The targets as the scenarios judge them now, in the scenarios' order (a judgement
        // changed since the run replaces its recorded check).
        let checks: Vec<_> = results
            .scenarios
            .iter()
            .flat_map(|s| s.checks.iter().cloned())
            .collect();
        let order = |c: &meshid_bench::harness::report::Check| {
            results
                .checks
                .iter()
                .position(|r| r.scenario == c.scenario)
                .unwrap_or(usize::MAX)
        };
        let mut checks = checks;
        checks.sort_by_key(|c| order(c));
        results.checks = checks;
        if serde_json::to_value(&results)? != before {
            // Only what is derived from the recorded runs changed: ratios, and judgements.
            std::fs::write(json, serde_json::to_vec_pretty(&results)?)?;
        }
        results.render(json, &docs)?;
        eprintln!("rendered {} from {}", docs.display(), json.display());
        return Ok(());
    }
    for s in &args.scenarios {
        if !ALL.contains(&s.as_str()) {
            bail!("unknown scenario {s:?} (known: {})", ALL.join(", "));
        }
    }
    for bin in BINARIES {
        if !args.bin_dir.join(bin).exists() {
            bail!(
                "{} missing (cargo build --release -p meshid-ca -p meshid-sidecar -p meshid-bench)",
                args.bin_dir.join(bin).display()
            );
        }
    }
    let smoke = args.smoke;
    let work = meshid_runtime::process::private_temp_dir("meshid-bench-")?;
    // A private copy of the binaries: a rebuild in the workspace during a long run must not
    // change what is measured halfway through.
    let bin_dir = work.join("bin");
    std::fs::create_dir_all(&bin_dir)?;
    for bin in BINARIES {
        std::fs::copy(args.bin_dir.join(bin), bin_dir.join(bin))?;
    }
    let settings = Settings {
        bin_dir,
        work: work.clone(),
        smoke,
        runs: args.runs.unwrap_or(if smoke { 1 } else { 3 }).max(1),
        workers: args.workers.max(1),
        duration: args
            .duration
            .unwrap_or(Duration::from_secs(if smoke { 2 } else { 10 })),
        warmup: args.warmup.unwrap_or(if smoke {
            Duration::from_millis(500)
        } else {
            Duration::from_secs(2)
        }),
        connections: 32,
        rate: 1000.0,
        idle_connections: if smoke { 300 } else { 2000 },
        ca_count: if smoke { 200 } else { 4000 },
        ca_concurrency: vec![1, 8, 64],
        scenarios: args.scenarios.clone(),
    };
    let ctx = Ctx::new(settings);
    meshid_bench::harness::clean_up_on_signal();
    let pki = BenchPki::new()?;
    meshid_bench::harness::remove_on_signal(&pki.dir());
    if !args.keep {
        meshid_bench::harness::remove_on_signal(&work);
    }
    if let Some(name) = &args.serve {
        return serve(&ctx, &pki, name, &work);
    }
    let started = Instant::now();
    let mut report = markdown::Results::new(
        &ctx,
        machine::machine(),
        // Where the binaries were built (the copies' directory says nothing of their build).
        machine::versions(&args.bin_dir),
    );
    for name in &args.scenarios {
        eprintln!("== {name}");
        let result: ScenarioResult = match name.as_str() {
            "throughput" => scenarios::throughput(&ctx, &pki),
            "throughput_tcp" => scenarios::throughput_tcp(&ctx, &pki),
            "latency" => scenarios::latency(&ctx, &pki),
            "handshakes" => scenarios::handshakes(&ctx, &pki),
            "first_request" => scenarios::first_request(&ctx, &pki),
            "memory" => scenarios::memory(&ctx, &pki),
            "memory_tcp" => scenarios::memory_tcp(&ctx, &pki),
            "startup" => ca::startup(&ctx, &pki),
            "fleet" => ca::fleet(&ctx),
            _ => ca::ca_issuance(&ctx),
        };
        for c in &result.checks {
            eprintln!(
                "   {} {}: {}",
                match c.met {
                    Some(true) => "MET    ",
                    Some(false) => "NOT MET",
                    None => "FAILED ",
                },
                c.target,
                c.measured
            );
        }
        report.push(result);
        report.finish(&ctx, started.elapsed());
        report.write(&out, &docs)?;
    }
    if let Some(dir) = &args.perf {
        eprintln!("== perf profiles into {}", dir.display());
        meshid_bench::harness::profile::profile(&ctx, &pki, dir)?;
    }
    eprintln!("results: {} and {}", out.display(), docs.display());
    drop(pki);
    if args.keep {
        eprintln!("work directory kept: {}", work.display());
    } else {
        let _ = std::fs::remove_dir_all(&work);
    }
    Ok(())
}

/// `--serve`: one contender, kept up for manual poking.
fn serve(ctx: &Ctx, pki: &BenchPki, name: &str, work: &std::path::Path) -> Result<()> {
    use meshid_bench::harness::topology::{Contender, start};
    let Some(c) = Contender::ALL.into_iter().find(|c| c.name() == name) else {
        bail!("unknown contender {name:?} (direct, meshid, nginx, haproxy)");
    };
    let t = start(ctx, pki, c)?;
    println!("{name}: plaintext entry {}", t.entry);
    if let Some(term) = t.terminator {
        println!(
            "terminator (mTLS) {term}: --tls --cert {} --key {} --bundle {} --expect-id {}",
            pki.client.cert.display(),
            pki.client.key.display(),
            pki.bundle.display(),
            meshid_bench::harness::pki::SERVER_ID
        );
    }
    for (role, pids) in t.roles() {
        println!("{role}: pids {pids:?}");
    }
    println!("work directory: {}", work.display());
    println!("running until interrupted (Ctrl-C or SIGTERM stops everything)");
    loop {
        std::thread::sleep(Duration::from_secs(3600));
    }
}
