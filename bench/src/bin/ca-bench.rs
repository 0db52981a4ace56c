//! End-to-end CA issuance benchmark: N concurrent gRPC clients over TLS, each sending Issue calls with a
//! Kubernetes service-account token and a CSR prepared before the clock starts.
//!
//! Reports certificates per second, latency percentiles, the CA process's CPU time per certificate,
//! and — side by side — this machine's own `openssl speed ecdsap256` sign+verify ceiling.

use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use clap::Parser;
use meshid_bench::benchca::{self, BenchCa};
use meshid_proto::ca::v1::{IssueRequest, issue_request::Credential};
use meshid_sidecar::creds::ca_client;
use meshid_sidecar::settings::CaEndpoint;
use meshid_tests::fake_cluster::FakeCluster;
use meshid_tests::pki::WorkloadKey;
use meshid_tests::process::Proc;

#[derive(Debug, Parser)]
struct Args {
    /// Concurrent clients (one connection each).
    #[arg(long, default_value_t = 32)]
    concurrency: usize,
    /// Certificates to issue in the measured run.
    #[arg(long, default_value_t = 20_000)]
    count: usize,
    /// A few hundred certificates only (CI smoke run).
    #[arg(long)]
    smoke: bool,
    /// Directory holding the meshid-ca binary.
    #[arg(long, default_value = "target/release")]
    bin_dir: PathBuf,
    /// Pin the CA to this CPU (taskset), the load to the others.
    #[arg(long, default_value_t = 1)]
    ca_cpu: usize,
    /// Where to write the JSON results.
    #[arg(long)]
    out: Option<PathBuf>,
    /// Skip measuring `openssl speed ecdsap256` (the ceiling the figures are compared to).
    #[arg(long)]
    skip_ceiling: bool,
    /// Record a CPU profile of the CA during the measured run with `perf record` into this file.
    #[arg(long)]
    perf: Option<PathBuf>,
    /// Measured rounds per credential mode, each bracketed by its own `openssl speed` ceiling on the
    /// CA's CPU (the machine's speed drifts; the ratio is taken within a round). Default 3, smoke 1.
    #[arg(long)]
    rounds: Option<usize>,
}

/// utime + stime of a process, in seconds.
fn cpu_seconds(pid: u32) -> Result<f64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat"))?;
    let after = stat.rsplit_once(')').context("stat format")?.1;
    let fields: Vec<&str> = after.split_whitespace().collect();
    let utime: f64 = fields.get(11).context("utime")?.parse()?;
    let stime: f64 = fields.get(12).context("stime")?.parse()?;
    let tck = Command::new("getconf")
        .arg("CLK_TCK")
        .output()
        .ok()
        .and_then(|o| String::from_utf8(o.stdout).ok())
        .and_then(|s| s.trim().parse::<f64>().ok())
        .unwrap_or(100.0);
    Ok((utime + stime) / tck)
}

/// Signs/s and verifies/s of `openssl speed ecdsap256` on one core.
fn openssl_ceiling(cpu: usize) -> Option<(f64, f64)> {
    // On the CA's CPU, like the CA itself.
    let mut cmd = if benchca::have("taskset") {
        let mut c = Command::new("taskset");
        c.args(["-c", &cpu.to_string(), "openssl"]);
        c
    } else {
        Command::new("openssl")
    };
    let out = cmd
        .args(["speed", "-seconds", "2", "ecdsap256"])
        .stderr(Stdio::null())
        .output()
        .ok()?;
    let text = String::from_utf8_lossy(&out.stdout);
    let line = text.lines().find(|l| l.contains("ecdsa (nistp256)"))?;
    let nums: Vec<f64> = line
        .split_whitespace()
        .filter_map(|w| w.parse::<f64>().ok())
        .collect();
    // "256 bits ecdsa (nistp256)   0.0000s   0.0001s  40000.0  13000.0"
    let n = nums.len();
    (n >= 2).then(|| (nums[n - 2], nums[n - 1]))
}

fn median(v: &[f64]) -> Option<f64> {
    let mut v = v.to_vec();
    v.sort_by(f64::total_cmp);
    v.get(v.len() / 2).copied()
}

/// "median (min-max)", or "n/a".
fn median_range(v: &[f64], decimals: usize) -> String {
    let (Some(m), Some(lo), Some(hi)) = (
        median(v),
        v.iter().copied().min_by(f64::total_cmp),
        v.iter().copied().max_by(f64::total_cmp),
    ) else {
        return "n/a".into();
    };
    format!("{m:.decimals$} ({lo:.decimals$}-{hi:.decimals$})")
}

fn percentile(sorted: &[Duration], p: f64) -> f64 {
    if sorted.is_empty() {
        return 0.0;
    }
    let i = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[i].as_secs_f64() * 1000.0
}

#[tokio::main]
async fn main() -> Result<()> {
    let mut args = Args::parse();
    if args.smoke {
        args.count = args.count.min(400);
        args.concurrency = args.concurrency.min(8);
    }
    let ca_bin = args.bin_dir.join("meshid-ca");
    if !ca_bin.exists() {
        bail!("{} not found (run bench/ca.sh)", ca_bin.display());
    }
    let work = tempdir()?;
    let BenchCa {
        proc: ca,
        cluster,
        endpoint,
        ..
    } = benchca::start(&ca_bin, &work, args.ca_cpu, &[])?;

    let rounds = args.rounds.unwrap_or(if args.smoke { 1 } else { 3 }).max(1);
    let modes = [Mode::Renewal, Mode::Token];
    // Rounds outside, modes inside: both modes see the same stretches of machine noise.
    let mut runs: Vec<Vec<serde_json::Value>> = vec![Vec::new(); modes.len()];
    for round in 1..=rounds {
        for (i, &mode) in modes.iter().enumerate() {
            let ceiling = if args.skip_ceiling {
                None
            } else {
                openssl_ceiling(args.ca_cpu)
            };
            println!("\n[{} round {round}/{rounds}]", mode.name());
            let stats = measure(&args, &endpoint, &cluster, &ca, mode).await?;
            runs[i].push(stats.report(&args, mode, ceiling));
        }
    }
    let mut results = serde_json::Map::new();
    let mut summary = Vec::new();
    for (mode, runs) in modes.iter().zip(runs) {
        let per_core: Vec<f64> = runs
            .iter()
            .filter_map(|r| r["certs_per_ca_cpu_second"].as_f64())
            .collect();
        let ratios: Vec<f64> = runs
            .iter()
            .filter_map(|r| r["ratio_to_openssl_ceiling"].as_f64())
            .collect();
        summary.push(format!(
            "{:<22} per core of CA CPU {} certs/s (target >= 8000); ratio to openssl {} (target >= 0.6)",
            mode.name(),
            median_range(&per_core, 0),
            median_range(&ratios, 2),
        ));
        results.insert(
            mode.name().into(),
            serde_json::json!({
                "rounds": runs,
                "median_certs_per_ca_cpu_second": median(&per_core),
                "median_ratio_to_openssl_ceiling": median(&ratios),
            }),
        );
    }
    drop(ca);
    println!("\nmedian (min-max) over {rounds} round(s), each ratio within its own round:");
    for line in &summary {
        println!("  {line}");
    }
    if let Some(out) = &args.out {
        let json = serde_json::json!({
            "concurrency": args.concurrency,
            "count": args.count,
            "rounds": rounds,
            "results": results,
        });
        std::fs::write(out, serde_json::to_vec_pretty(&json)?)?;
        println!("\nresults: {}", out.display());
    }
    let _ = std::fs::remove_dir_all(&work);
    Ok(())
}

/// How the benchmark's clients authenticate.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Mode {
    /// The steady state of a mesh: renewing with the current certificate over mTLS.
    Renewal,
    /// First issuance with a Kubernetes service-account token (an RS256 verify per call).
    Token,
}

impl Mode {
    fn name(self) -> &'static str {
        match self {
            Self::Renewal => "renewal",
            Self::Token => "service_account_token",
        }
    }
}

struct Stats {
    latencies: Vec<Duration>,
    errors: usize,
    wall: f64,
    cpu: f64,
}

impl Stats {
    fn report(&self, args: &Args, mode: Mode, ceiling: Option<(f64, f64)>) -> serde_json::Value {
        let issued = self.latencies.len() - self.errors;
        let per_sec = issued as f64 / self.wall;
        let per_cpu_sec = if self.cpu > 0.0 {
            issued as f64 / self.cpu
        } else {
            0.0
        };
        let (p50, p99) = (
            percentile(&self.latencies, 0.50),
            percentile(&self.latencies, 0.99),
        );
        println!(
            "\nCA issuance over gRPC/TLS ({}), {} clients, {} certificates",
            mode.name(),
            args.concurrency,
            self.latencies.len()
        );
        println!("  errors:                       {}", self.errors);
        println!("  throughput:                   {per_sec:.0} certs/s (wall clock)");
        println!("  latency p50 / p99:            {p50:.2} ms / {p99:.2} ms");
        println!(
            "  CA CPU time:                  {:.2} s ({:.1} us per certificate)",
            self.cpu,
            self.cpu * 1e6 / issued.max(1) as f64
        );
        println!("  per core of CA CPU:           {per_cpu_sec:.0} certs/s   (target >= 8000)");
        let mut json = serde_json::json!({
            "issued": issued,
            "errors": self.errors,
            "wall_seconds": self.wall,
            "certs_per_second": per_sec,
            "ca_cpu_seconds": self.cpu,
            "certs_per_ca_cpu_second": per_cpu_sec,
            "latency_ms": { "p50": p50, "p99": p99 },
        });
        match ceiling {
            Some((sign, verify)) => {
                let ceil = 1.0 / (1.0 / sign + 1.0 / verify);
                println!(
                    "  openssl speed ecdsap256:      {sign:.0} sign/s, {verify:.0} verify/s -> {ceil:.0} sign+verify/s per core"
                );
                println!(
                    "  ratio to that ceiling:        {:.2}   (target >= 0.6)",
                    per_cpu_sec / ceil
                );
                json["ratio_to_openssl_ceiling"] = serde_json::json!(per_cpu_sec / ceil);
            }
            None => println!("  openssl speed:                unavailable (install openssl)"),
        }
        json
    }
}

/// Prepares every request, then issues `args.count` certificates with `args.concurrency` clients.
async fn measure(
    args: &Args,
    endpoint: &CaEndpoint,
    cluster: &FakeCluster,
    ca: &Proc,
    mode: Mode,
) -> Result<Stats> {
    // Everything a request needs is prepared before the clock starts.
    println!(
        "\npreparing {} CSRs for {} clients ({}) ...",
        args.count,
        args.concurrency,
        mode.name()
    );
    let per_worker = args.count.div_ceil(args.concurrency);
    let mut work_items = Vec::new();
    for w in 0..args.concurrency {
        let csrs: Vec<Vec<u8>> = (0..per_worker).map(|_| WorkloadKey::new().csr).collect();
        let (client, credential) = match mode {
            Mode::Token => (
                ca_client::connect(endpoint, None).await?,
                Some(Credential::ServiceAccountToken(
                    cluster.token("bench", &format!("worker-{w}")),
                )),
            ),
            Mode::Renewal => (
                benchca::renewal_client(endpoint, cluster, &format!("worker-{w}")).await?,
                None,
            ),
        };
        work_items.push((client, credential, csrs));
    }

    let profiler = args.perf.as_ref().map(|file| {
        Proc::spawn(
            "perf",
            Command::new("perf")
                .args([
                    "record",
                    "-F",
                    "999",
                    "-g",
                    "-p",
                    &ca.pid().to_string(),
                    "-o",
                ])
                .arg(file.with_extension(mode.name()))
                .stderr(Stdio::null()),
        )
    });
    let cpu_before = cpu_seconds(ca.pid())?;
    let started = Instant::now();
    let mut tasks = Vec::new();
    for (mut client, credential, csrs) in work_items {
        tasks.push(tokio::spawn(async move {
            let mut lat = Vec::with_capacity(csrs.len());
            let mut errors = 0;
            for csr in csrs {
                let t = Instant::now();
                let r = client
                    .issue(IssueRequest {
                        csr,
                        credential: credential.clone(),
                        ttl_seconds: 0,
                        app_svid: false,
                    })
                    .await;
                if r.is_err() {
                    errors += 1;
                }
                lat.push(t.elapsed());
            }
            (lat, errors)
        }));
    }
    let mut latencies = Vec::new();
    let mut errors = 0;
    for t in tasks {
        let (l, e) = t.await?;
        latencies.extend(l);
        errors += e;
    }
    let wall = started.elapsed().as_secs_f64();
    let cpu = cpu_seconds(ca.pid())? - cpu_before;
    if let Some(mut p) = profiler {
        p.signal("INT");
        let _ = p.wait_timeout(Duration::from_secs(30));
    }
    latencies.sort();
    Ok(Stats {
        latencies,
        errors,
        wall,
        cpu,
    })
}

fn tempdir() -> Result<PathBuf> {
    let d = meshid_runtime::process::private_temp_dir("meshid-ca-bench-")?;
    Ok(d)
}
