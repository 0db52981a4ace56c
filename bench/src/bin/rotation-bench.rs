//! CA root rotation benchmark: a real `meshid-ca serve` (pinned with taskset) and N simulated sidecars
//! in this process (see `meshid_bench::simsidecar`), then `meshid-ca rotate prepare`, `activate`
//! (retried until its gate passes) and `retire` (likewise) with the real command line.
//!
//! Reports the CA process's CPU time over the whole rotation and over an equally long window without
//! one, per sidecar, the renewals each sidecar made during the rotation, and the wall time of each step.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use clap::Parser;
use meshid_bench::benchca::{self, BenchCa};
use meshid_bench::procfs::{cpu_seconds, mem};
use meshid_bench::simsidecar::{Sim, SimConfig, SimStats};
use meshid_tests::process::http_get_with;

#[derive(Debug, Parser)]
struct Args {
    /// Simulated sidecars.
    #[arg(long, default_value_t = 200)]
    sidecars: usize,
    /// Certificate lifetime the CA issues (sidecars renew at half of it).
    #[arg(long, default_value = "20s")]
    ttl: String,
    /// 20 sidecars, 10 s certificates (CI smoke run).
    #[arg(long)]
    smoke: bool,
    /// Directory holding the meshid-ca binary.
    #[arg(long, default_value = "target/release")]
    bin_dir: PathBuf,
    /// Pin the CA to this CPU (taskset), the simulated sidecars to the others.
    #[arg(long, default_value_t = 1)]
    ca_cpu: usize,
    /// How often `rotate activate` / `rotate retire` are retried while their gate refuses.
    #[arg(long, default_value = "500ms")]
    retry_every: String,
    /// Where to write the JSON results.
    #[arg(long)]
    out: Option<PathBuf>,
}

/// The rotation's steps and when each completed.
struct Rotation {
    prepare: Duration,
    until_activate: Duration,
    activate_attempts: usize,
    first_activate_refusal: String,
    until_retire: Duration,
    retire_attempts: usize,
    first_retire_refusal: String,
    until_converged: Duration,
    activated_at: Instant,
    retired_at: Instant,
}

/// `meshid-ca rotate <step> --dir DIR --admin ADDR`: (success, stdout + stderr).
fn rotate(ca_bin: &Path, step: &str, dir: &Path, admin: &str) -> Result<(bool, String)> {
    let mut cmd = Command::new(ca_bin);
    cmd.args(["rotate", step, "--dir"]).arg(dir);
    if step != "prepare" {
        cmd.args(["--admin", admin]);
    }
    let out = cmd
        .env("MESHID_LOG", "error")
        .output()
        .with_context(|| format!("running meshid-ca rotate {step}"))?;
    let mut text = String::from_utf8_lossy(&out.stdout).into_owned();
    text.push_str(&String::from_utf8_lossy(&out.stderr));
    Ok((out.status.success(), text.trim().to_owned()))
}

/// Retries a gated step until it passes or `timeout`: (attempts, first refusal).
async fn rotate_until_ok(
    ca_bin: &Path,
    step: &str,
    dir: &Path,
    admin: &str,
    every: Duration,
    timeout: Duration,
) -> Result<(usize, String)> {
    let deadline = Instant::now() + timeout;
    let mut first_refusal = String::new();
    let mut attempts = 0;
    loop {
        attempts += 1;
        let (ok, out) = rotate(ca_bin, step, dir, admin)?;
        if ok {
            return Ok((attempts, first_refusal));
        }
        if first_refusal.is_empty() {
            first_refusal = out.chars().take(300).collect();
        }
        if Instant::now() > deadline {
            bail!("rotate {step} still refused after {timeout:?}: {out}");
        }
        tokio::time::sleep(every).await;
    }
}

/// Waits until every simulated sidecar acknowledged `version` (or `timeout`).
async fn wait_acked(stats: &[Arc<SimStats>], version: u64, timeout: Duration) -> Result<()> {
    let deadline = Instant::now() + timeout;
    loop {
        let behind = stats
            .iter()
            .filter(|s| s.acked_version.load(Ordering::Relaxed) < version)
            .count();
        if behind == 0 {
            return Ok(());
        }
        if Instant::now() > deadline {
            bail!("{behind} sidecar(s) did not acknowledge bundle v{version} within {timeout:?}");
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// A wait that ran out, with what explains it: the simulated sidecars' failed calls and what the
/// CA says it waits for.
fn stalled(
    e: anyhow::Error,
    stats: &[Arc<SimStats>],
    admin: std::net::SocketAddr,
    auth: &[(String, String)],
) -> anyhow::Error {
    let errors: u64 = stats.iter().map(|s| s.errors.load(Ordering::Relaxed)).sum();
    let next = http_get_with(admin, "/rotation", auth)
        .ok()
        .and_then(|(_, body)| {
            let json = body.split("\r\n\r\n").nth(1)?.to_owned();
            serde_json::from_str::<serde_json::Value>(&json).ok()
        })
        .and_then(|r| r["next_step"].as_str().map(str::to_owned))
        .unwrap_or_else(|| "(no rotation report)".into());
    let common: Vec<String> = SimStats::common_errors(stats, 5)
        .into_iter()
        .map(|(n, text)| format!("{n} x {text}"))
        .collect();
    e.context(format!(
        "simulated sidecars' failed calls so far: {errors} (most common last failures: {}); \
         the CA's next step: {next}",
        common.join("; ")
    ))
}

/// Min, mean and max of per-sidecar counts.
fn spread(counts: &[usize]) -> serde_json::Value {
    let n = counts.len().max(1) as f64;
    serde_json::json!({
        "min": counts.iter().min().copied().unwrap_or(0),
        "mean": counts.iter().sum::<usize>() as f64 / n,
        "max": counts.iter().max().copied().unwrap_or(0),
    })
}

fn renewals(stats: &[Arc<SimStats>], from: Instant, to: Instant) -> Vec<usize> {
    stats.iter().map(|s| s.renewals_between(from, to)).collect()
}

#[tokio::main]
async fn main() -> Result<()> {
    let mut args = Args::parse();
    if args.smoke {
        args.sidecars = args.sidecars.min(20);
        args.ttl = "10s".into();
    }
    if args.sidecars == 0 {
        bail!("--sidecars: must be at least 1");
    }
    let ttl =
        meshid_identity::parse_duration(&args.ttl).map_err(|e| anyhow::anyhow!("--ttl: {e}"))?;
    if ttl < Duration::from_secs(4) || ttl > Duration::from_secs(3600) {
        bail!("--ttl: must be between 4s and 1h");
    }
    let retry_every = meshid_identity::parse_duration(&args.retry_every)
        .map_err(|e| anyhow::anyhow!("--retry-every: {e}"))?;
    if retry_every < Duration::from_millis(50) {
        bail!("--retry-every: must be at least 50ms");
    }
    let ca_bin = args.bin_dir.join("meshid-ca");
    if !ca_bin.exists() {
        bail!("{} not found (run bench/rotation.sh)", ca_bin.display());
    }
    let work = meshid_runtime::process::private_temp_dir("meshid-rotation-bench-")?;
    let result = run(&args, ttl, retry_every, &ca_bin, &work).await;
    let _ = std::fs::remove_dir_all(&work);
    result
}

async fn run(
    args: &Args,
    ttl: Duration,
    retry_every: Duration,
    ca_bin: &Path,
    work: &Path,
) -> Result<()> {
    let BenchCa {
        proc: ca,
        dir: ca_dir,
        admin,
        cluster,
        endpoint,
    } = benchca::start(
        ca_bin,
        work,
        args.ca_cpu,
        &[
            "--ttl",
            &args.ttl,
            "--max-ttl",
            &args.ttl,
            // Room for the fleet (one connection per sidecar) and then some, as an operator sizes
            // a CA replica for its fleet.
            "--max-connections",
            &(args.sidecars + 1000).to_string(),
        ],
    )?;
    // The rotation report answers only the CA directory's admin token (`rotate` sends it too).
    let auth = vec![
        meshid_ca::admin_token::AdminToken::load(&ca_dir)?
            .context("the bench CA directory has no admin token")?
            .header(),
    ];

    // The fleet: starts spread over half a lifetime, so renewals are spread as in a real fleet.
    let n = args.sidecars;
    println!(
        "starting {n} simulated sidecars ({} certificates) ...",
        args.ttl
    );
    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    let mut stats = Vec::with_capacity(n);
    let mut tasks = Vec::with_capacity(n);
    for i in 0..n {
        let s = Arc::new(SimStats::default());
        let cfg = SimConfig {
            endpoint: endpoint.clone(),
            token: cluster.token("bench", &format!("sidecar-{i}")),
            instance: format!("bench-{i:05}"),
            jitter: 0.9 + 0.2 * ((i * 7919) % 1000) as f64 / 1000.0,
            start_delay: ttl.mul_f64(0.5 * i as f64 / n as f64),
        };
        tasks.push(tokio::spawn(Sim::new(cfg, s.clone()).run(stop_rx.clone())));
        stats.push(s);
    }
    wait_acked(
        &stats,
        1,
        ttl.saturating_mul(2)
            .saturating_add(Duration::from_secs(30)),
    )
    .await
    .map_err(|e| stalled(e, &stats, admin, &auth))?;
    // One more half-lifetime: every sidecar renewed once, the fleet is in its steady state.
    tokio::time::sleep(ttl / 2).await;
    let admin_s = admin.to_string();

    // The rotation, measured from `prepare` until every sidecar acknowledged the final bundle.
    println!("rotating ...");
    let cpu0 = cpu_seconds(ca.pid())?;
    let t0 = Instant::now();
    let (ok, out) = rotate(ca_bin, "prepare", &ca_dir, &admin_s)?;
    if !ok {
        bail!("rotate prepare failed: {out}");
    }
    let prepared_at = Instant::now();
    let gate_timeout = ttl
        .saturating_mul(3)
        .saturating_add(Duration::from_secs(30));
    let (activate_attempts, first_activate_refusal) = rotate_until_ok(
        ca_bin,
        "activate",
        &ca_dir,
        &admin_s,
        retry_every,
        gate_timeout,
    )
    .await
    .map_err(|e| stalled(e, &stats, admin, &auth))?;
    let activated_at = Instant::now();
    let (retire_attempts, first_retire_refusal) = rotate_until_ok(
        ca_bin,
        "retire",
        &ca_dir,
        &admin_s,
        retry_every,
        gate_timeout,
    )
    .await
    .map_err(|e| stalled(e, &stats, admin, &auth))?;
    let retired_at = Instant::now();
    wait_acked(&stats, 3, ttl.saturating_add(Duration::from_secs(30)))
        .await
        .map_err(|e| stalled(e, &stats, admin, &auth))?;
    let converged_at = Instant::now();
    let rotation_cpu = cpu_seconds(ca.pid())? - cpu0;
    let rss_after_rotation_kib = mem(ca.pid())?.rss_kib;
    let window = converged_at - t0;
    let rot = Rotation {
        prepare: prepared_at - t0,
        until_activate: activated_at - prepared_at,
        activate_attempts,
        first_activate_refusal,
        until_retire: retired_at - activated_at,
        retire_attempts,
        first_retire_refusal,
        until_converged: converged_at - retired_at,
        activated_at,
        retired_at,
    };

    // The baseline: the same fleet, an equally long window, no rotation.
    println!(
        "baseline ({:.1} s without rotation) ...",
        window.as_secs_f64()
    );
    let cpu1 = cpu_seconds(ca.pid())?;
    let b0 = Instant::now();
    tokio::time::sleep(window).await;
    let b1 = Instant::now();
    let baseline_cpu = cpu_seconds(ca.pid())? - cpu1;

    // What one `/rotation` report costs the CA with the whole fleet connected (every gated
    // `rotate` attempt fetches one: `/rotation/fresh`, never the cached report `/rotation` may
    // answer with within a second, which would measure nothing).
    const REPORTS: usize = 20;
    let rss_after_baseline_kib = mem(ca.pid())?.rss_kib;
    let cpu2 = cpu_seconds(ca.pid())?;
    let wall2 = Instant::now();
    let mut report_bytes = 0;
    for _ in 0..REPORTS {
        let (code, body) =
            http_get_with(admin, "/rotation/fresh", &auth).context("GET /rotation/fresh")?;
        if code != 200 {
            bail!("GET /rotation/fresh answered {code}");
        }
        report_bytes = body.len();
    }
    let report_wall = wall2.elapsed().as_secs_f64() / REPORTS as f64;
    let report_cpu = (cpu_seconds(ca.pid())? - cpu2) / REPORTS as f64;

    stop_tx.send_replace(true);
    for t in tasks {
        let _ = t.await;
    }
    drop(ca);

    let during = renewals(&stats, t0, converged_at);
    let between = renewals(&stats, rot.activated_at, rot.retired_at);
    let baseline = renewals(&stats, b0, b1);
    let forced: u64 = stats
        .iter()
        .map(|s| s.forced_renewals.load(Ordering::Relaxed))
        .sum();
    let errors: u64 = stats.iter().map(|s| s.errors.load(Ordering::Relaxed)).sum();
    let extra_cpu = rotation_cpu - baseline_cpu;
    let json = serde_json::json!({
        "sidecars": n,
        "certificate_ttl_seconds": ttl.as_secs_f64(),
        "retry_every_seconds": retry_every.as_secs_f64(),
        "window_seconds": window.as_secs_f64(),
        "ca_cpu_seconds": {
            "rotation": rotation_cpu,
            "baseline": baseline_cpu,
            "difference": extra_cpu,
            "difference_per_sidecar_ms": extra_cpu * 1000.0 / n as f64,
            "per_rotation_report_ms": report_cpu * 1000.0,
            "per_rotation_report_wall_ms": report_wall * 1000.0,
            "rotation_report_bytes": report_bytes,
            "rotation_reports_fetched": rot.activate_attempts + rot.retire_attempts,
        },
        "ca_rss_kib": {
            "after_rotation": rss_after_rotation_kib,
            "after_baseline": rss_after_baseline_kib,
        },
        "renewals_per_sidecar": {
            "during_rotation": spread(&during),
            "between_activate_and_retire": spread(&between),
            "baseline_window": spread(&baseline),
            "forced_by_renew_now": forced,
        },
        "steps_seconds": {
            "prepare": rot.prepare.as_secs_f64(),
            "prepare_to_activate_passed": rot.until_activate.as_secs_f64(),
            "activate_to_retire_passed": rot.until_retire.as_secs_f64(),
            "retire_to_all_acknowledged": rot.until_converged.as_secs_f64(),
        },
        "activate_attempts": rot.activate_attempts,
        "retire_attempts": rot.retire_attempts,
        "first_activate_refusal": rot.first_activate_refusal,
        "first_retire_refusal": rot.first_retire_refusal,
        "sidecar_call_errors": errors,
    });
    print_summary(&json, &rot);
    if let Some(out) = &args.out {
        std::fs::write(out, serde_json::to_vec_pretty(&json)?)?;
        println!("\nresults: {}", out.display());
    }
    Ok(())
}

fn print_summary(j: &serde_json::Value, rot: &Rotation) {
    let f = |v: &serde_json::Value| v.as_f64().unwrap_or(f64::NAN);
    let r = &j["renewals_per_sidecar"];
    let reports = j["ca_cpu_seconds"]["rotation_reports_fetched"]
        .as_u64()
        .unwrap_or(0);
    let c = &j["ca_cpu_seconds"];
    println!(
        "\nCA root rotation, {} simulated sidecars, {} s certificates",
        j["sidecars"],
        f(&j["certificate_ttl_seconds"])
    );
    println!(
        "  prepare:                       {:.2} s",
        rot.prepare.as_secs_f64()
    );
    println!(
        "  prepare -> activate passed:    {:.2} s ({} attempt(s))",
        rot.until_activate.as_secs_f64(),
        rot.activate_attempts
    );
    println!(
        "  activate -> retire passed:     {:.2} s ({} attempt(s))",
        rot.until_retire.as_secs_f64(),
        rot.retire_attempts
    );
    println!(
        "  retire -> all acknowledged:    {:.2} s",
        rot.until_converged.as_secs_f64()
    );
    println!(
        "  whole rotation (window):       {:.2} s",
        f(&j["window_seconds"])
    );
    println!(
        "  CA CPU, rotation window:       {:.3} s",
        f(&c["rotation"])
    );
    println!(
        "  CA CPU, baseline window:       {:.3} s",
        f(&c["baseline"])
    );
    println!(
        "  CA CPU, difference:            {:.3} s ({:.2} ms per sidecar)",
        f(&c["difference"]),
        f(&c["difference_per_sidecar_ms"])
    );
    println!(
        "  of which /rotation reports:    {} x {:.2} ms = {:.3} s (one per gated attempt)",
        reports,
        f(&c["per_rotation_report_ms"]),
        reports as f64 * f(&c["per_rotation_report_ms"]) / 1000.0
    );
    println!(
        "  one /rotation report:          {:.2} ms wall, {} bytes",
        f(&c["per_rotation_report_wall_ms"]),
        c["rotation_report_bytes"]
    );
    println!(
        "  CA resident memory:            {} KiB after the rotation, {} KiB after the baseline",
        j["ca_rss_kib"]["after_rotation"], j["ca_rss_kib"]["after_baseline"]
    );
    let s = |v: &serde_json::Value| {
        format!(
            "min {} / mean {:.2} / max {}",
            v["min"],
            f(&v["mean"]),
            v["max"]
        )
    };
    println!(
        "  renewals per sidecar, rotation:            {}",
        s(&r["during_rotation"])
    );
    println!(
        "  renewals per sidecar, activate -> retire:  {}",
        s(&r["between_activate_and_retire"])
    );
    println!(
        "  renewals per sidecar, baseline:            {}",
        s(&r["baseline_window"])
    );
    println!(
        "  forced renewals (renew_now):   {}",
        r["forced_by_renew_now"]
    );
    println!(
        "  sidecar call errors (retried): {}",
        j["sidecar_call_errors"]
    );
    println!(
        "  first activate refusal:        {}",
        rot.first_activate_refusal
    );
    println!(
        "  first retire refusal:          {}",
        rot.first_retire_refusal
    );
}
