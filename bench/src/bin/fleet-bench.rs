//! Fleet scale at one CA replica: N simulated sidecars (`meshid_bench::simsidecar`, what a CA-mode
//! sidecar does against the CA) hold their trust-bundle streams open against a real `meshid-ca serve`
//! pinned to one CPU, for each N of `--sizes`. For each size, on a fresh CA:
//!
//! - the time for the whole fleet to join (first certificate, stream, acknowledgement);
//! - the CA's resident and anonymous memory per connected sidecar (growth over the CA before the
//!   fleet, divided by N) and its open file descriptors;
//! - the CA's CPU while the fleet is connected and idle;
//! - the time from a bundle change (`meshid-ca rotate prepare` adds a root) until every sidecar
//!   acknowledged it, and the CA CPU that push cost;
//! - the time from `meshid-ca revoke` until every sidecar holds the revocation (applied, as a
//!   sidecar applies it before refusing handshakes), and when every one acknowledged it;
//! - renewals per second sustained by `--renewal-clients` closed-loop renewers alongside the fleet.
//!
//! Each stream is one TCP connection at the CA and one here: a size above the open-file limit
//! (`RLIMIT_NOFILE`) of this process cannot be measured and is reported as skipped, with the limit.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use anyhow::{Result, bail};
use clap::Parser;
use meshid_bench::benchca::{self, BenchCa};
use meshid_bench::procfs::{Backlog, backlog_drops, cpu_seconds, mem};
use meshid_bench::simsidecar::{Sim, SimConfig, SimStats};
use meshid_proto::ca::v1::IssueRequest;
use meshid_tests::pki::WorkloadKey;
use serde_json::{Value, json};

#[derive(Debug, Parser)]
struct Args {
    /// Fleet sizes, one fresh CA each.
    #[arg(long, value_delimiter = ',', default_value = "1000,5000,10000,19000")]
    sizes: Vec<usize>,
    /// Sidecars started per second while the fleet joins (spreads the first issuances).
    #[arg(long, default_value_t = 1000)]
    join_rate: usize,
    /// Closed-loop renewal clients (one mTLS connection each) run alongside the connected fleet.
    #[arg(long, default_value_t = 8)]
    renewal_clients: usize,
    /// Length of the renewal run.
    #[arg(long, default_value = "10s")]
    window: String,
    /// Length of the idle-CPU window, from 2 s after the last sidecar acknowledged the bundle:
    /// longer than any periodic per-connection work (keep-alive probes start after 30 s of
    /// silence), so the figure is the steady state, not the quiet just after joining.
    #[arg(long, default_value = "40s")]
    idle_window: String,
    /// One fleet of 200, 3 s windows (CI smoke run).
    #[arg(long)]
    smoke: bool,
    /// Directory holding the meshid-ca binary.
    #[arg(long, default_value = "target/release")]
    bin_dir: PathBuf,
    /// Raise `net.core.netdev_max_backlog` to at least this many packets per CPU for the run and
    /// put it back after (0: the largest fleet size; root only; a run stopped by Ctrl-C or SIGTERM
    /// puts it back too, one killed with SIGKILL leaves it raised).
    /// Every loopback packet passes through that backlog, and the kernel sends its keep-alive
    /// probes in batches: with the default of 1,000, a fleet of 19,000 idle streams lost probes
    /// there, three in a row ended about a thousand connections within 40 s, and their
    /// reconnections were most of the idle CA's CPU. The drops are counted per phase either way.
    #[arg(long, default_value_t = 0)]
    netdev_max_backlog: u64,
    /// Pin the CA to this CPU (taskset); run this process on the others.
    #[arg(long, default_value_t = 1)]
    ca_cpu: usize,
    /// Where to write the JSON results.
    #[arg(long)]
    out: Option<PathBuf>,
}

/// The soft `RLIMIT_NOFILE` of this process (the CA inherits it), from `/proc/self/limits`.
fn open_file_limit() -> Option<usize> {
    let limits = std::fs::read_to_string("/proc/self/limits").ok()?;
    let line = limits.lines().find(|l| l.starts_with("Max open files"))?;
    line.split_whitespace().nth(3)?.parse().ok()
}

fn open_fds(pid: u32) -> usize {
    std::fs::read_dir(format!("/proc/{pid}/fd")).map_or(0, |d| d.count())
}

/// How long a wait for the fleet goes on without one more sidecar getting there before it is
/// given up: a slower host takes longer, but a fleet that stopped moving has failed.
const STALL: Duration = Duration::from_secs(60);

/// Waits until every simulated sidecar acknowledged `version`: the time it took. Fails when no
/// sidecar more got there for [`STALL`], or after `cap` in all.
async fn wait_acked(stats: &[Arc<SimStats>], version: u64, cap: Duration) -> Result<Duration> {
    wait_all(stats, cap, &format!("acknowledge bundle v{version}"), |s| {
        s.acked_version.load(Ordering::Relaxed) >= version
    })
    .await
}

/// Waits until `there` has held for every simulated sidecar: the time it took. Fails when no
/// sidecar more got there for [`STALL`], or after `cap` in all; `what` names the step in that error.
///
/// Every step waited for only moves forward (a version acknowledged, a revocation held), so a
/// sidecar that got there is not looked at again, and the poll interval grows with the number
/// still behind (5 ms, plus 2 us per sidecar): scanning all of them every 5 ms took a large share
/// of the simulator's one CPU at 19,000 (cache misses over 19,000 separate allocations, 200 times
/// a second), and the simulator's CPU is what the join and push times of a large fleet measure.
/// The time of the last sidecar is still seen within about 5 ms.
async fn wait_all(
    stats: &[Arc<SimStats>],
    cap: Duration,
    what: &str,
    there: impl Fn(&SimStats) -> bool,
) -> Result<Duration> {
    let t0 = Instant::now();
    let mut behind: Vec<&SimStats> = stats.iter().map(|s| &**s).collect();
    let mut last = (usize::MAX, t0);
    loop {
        behind.retain(|s| !there(s));
        if behind.is_empty() {
            return Ok(t0.elapsed());
        }
        if behind.len() < last.0 {
            last = (behind.len(), Instant::now());
        }
        let elapsed = t0.elapsed();
        if last.1.elapsed() > STALL || elapsed > cap {
            bail!(
                "{} of {} sidecar(s) did not {what}: none more for {:.0} s, {:.0} s after \
                 it began",
                behind.len(),
                stats.len(),
                last.1.elapsed().as_secs_f64(),
                elapsed.as_secs_f64()
            );
        }
        tokio::time::sleep(poll_interval(behind.len())).await;
    }
}

/// How long [`wait_all`] sleeps between two looks at `behind` sidecars.
fn poll_interval(behind: usize) -> Duration {
    Duration::from_millis(5) + Duration::from_micros(2 * behind as u64)
}

fn errors(stats: &[Arc<SimStats>]) -> u64 {
    stats.iter().map(|s| s.errors.load(Ordering::Relaxed)).sum()
}

/// Waits for SIGINT or SIGTERM; the exit status a shell gives for it (128 + the signal).
async fn stopped_by_signal() -> i32 {
    use tokio::signal::unix::{SignalKind, signal};
    let (Ok(mut int), Ok(mut term)) = (
        signal(SignalKind::interrupt()),
        signal(SignalKind::terminate()),
    ) else {
        // No handler: the default action ends the process as before.
        return std::future::pending().await;
    };
    tokio::select! {
        _ = int.recv() => 130,
        _ = term.recv() => 143,
    }
}

#[tokio::main]
async fn main() -> Result<()> {
    let mut args = Args::parse();
    if args.smoke {
        args.sizes = vec![200];
        args.window = "3s".into();
        args.idle_window = "3s".into();
        args.renewal_clients = args.renewal_clients.min(4);
    }
    if args.sizes.is_empty() || args.sizes.contains(&0) {
        bail!("--sizes: give one or more fleet sizes, each at least 1");
    }
    let window = meshid_identity::parse_duration(&args.window)
        .map_err(|e| anyhow::anyhow!("--window: {e}"))?;
    let idle_window = meshid_identity::parse_duration(&args.idle_window)
        .map_err(|e| anyhow::anyhow!("--idle-window: {e}"))?;
    let ca_bin = args.bin_dir.join("meshid-ca");
    if !ca_bin.exists() {
        bail!("{} not found (run bench/fleet.sh)", ca_bin.display());
    }
    let limit = open_file_limit();
    let largest = args.sizes.iter().copied().max().unwrap_or(0) as u64;
    let backlog = Backlog::at_least(match args.netdev_max_backlog {
        0 => largest,
        n => n,
    });
    if let Some(why) = &backlog.refused {
        println!(
            "net.core.netdev_max_backlog stays {} ({why}): loopback drops are counted per phase",
            backlog.before.map_or("unknown".into(), |b| b.to_string())
        );
    }
    // The sizes run until done or until Ctrl-C / SIGTERM: then the fleet and its CA are dropped
    // (the CA is killed) and the backlog is put back before the process ends.
    let measured = async {
        let mut results = Vec::new();
        // A size that fails is recorded and ends the run (larger ones would fail the same way, each
        // after minutes); the sizes measured before it are kept, and the exit status says it failed.
        let mut failed = None;
        for &n in &args.sizes {
            if let Some(smaller) = failed {
                results.push(json!({
                    "sidecars": n,
                    "skipped": format!("not tried: the fleet of {smaller} failed"),
                }));
                continue;
            }
            // Each sidecar holds one connection here and one at the CA; leave room for the rest.
            let needed = n + args.renewal_clients + 256;
            if let Some(limit) = limit.filter(|l| needed > *l) {
                println!(
                    "\n[{n} sidecars] skipped: needs about {needed} open files per process, RLIMIT_NOFILE here is {limit}"
                );
                results.push(json!({
                    "sidecars": n,
                    "skipped": format!("needs about {needed} open files per process; RLIMIT_NOFILE is {limit} (raise it with ulimit -n, which needs a hard limit at least that high)"),
                }));
                continue;
            }
            println!("\n[{n} sidecars]");
            let work = meshid_runtime::process::private_temp_dir("meshid-fleet-bench-")?;
            let r = one_size(&args, &ca_bin, &work, n, window, idle_window).await;
            let _ = std::fs::remove_dir_all(&work);
            match r {
                Ok(r) => {
                    print_size(&r);
                    results.push(r);
                }
                Err(e) => {
                    // `{:#}`: the cause chain on one line, without a backtrace.
                    let error = format!("{e:#}");
                    println!("  FAILED: {error}");
                    results.push(json!({ "sidecars": n, "failed": error }));
                    failed = Some(n);
                }
            }
        }
        Ok::<_, anyhow::Error>((results, failed))
    };
    let (results, failed) = tokio::select! {
        done = measured => done?,
        code = stopped_by_signal() => {
            drop(backlog);
            // The work directory of the size that was running (the CA's directory among it).
            let prefix = format!("meshid-fleet-bench-{}-", std::process::id());
            for entry in std::fs::read_dir(std::env::temp_dir()).into_iter().flatten().flatten() {
                if entry.file_name().to_string_lossy().starts_with(&prefix) {
                    let _ = std::fs::remove_dir_all(entry.path());
                }
            }
            eprintln!("fleet-bench: stopped by a signal; the CA is stopped and net.core.netdev_max_backlog put back");
            std::process::exit(code);
        }
    };
    let json = json!({
        "join_rate_per_second": args.join_rate,
        "renewal_clients": args.renewal_clients,
        "window_seconds": window.as_secs_f64(),
        "idle_window_seconds": idle_window.as_secs_f64(),
        "open_file_limit": limit,
        "netdev_max_backlog": {
            "before": backlog.before,
            "during": backlog.now,
            "refused": backlog.refused,
        },
        "sizes": results,
    });
    drop(backlog);
    if let Some(out) = &args.out {
        std::fs::write(out, serde_json::to_vec_pretty(&json)?)?;
        println!("\nresults: {}", out.display());
    }
    match failed {
        Some(n) => bail!("the fleet of {n} failed (the sizes before it were measured)"),
        None => Ok(()),
    }
}

async fn one_size(
    args: &Args,
    ca_bin: &Path,
    work: &Path,
    n: usize,
    window: Duration,
    idle_window: Duration,
) -> Result<Value> {
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
            "1h",
            "--max-ttl",
            "1h",
            "--max-connections",
            &(n + 1000).to_string(),
        ],
    )?;
    let pid = ca.pid();
    tokio::time::sleep(Duration::from_millis(500)).await;
    let before = mem(pid)?;

    // The fleet joins at --join-rate; one service account per ten sidecars.
    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    let tokens: Vec<String> = (0..n.div_ceil(10))
        .map(|i| cluster.token("fleet", &format!("sa-{i}")))
        .collect();
    let mut stats = Vec::with_capacity(n);
    let mut tasks = Vec::with_capacity(n);
    let spread = Duration::from_secs_f64(n as f64 / args.join_rate.max(1) as f64);
    let cpu_join = cpu_seconds(pid)?;
    let drops_join = backlog_drops();
    for i in 0..n {
        let s = Arc::new(SimStats::default());
        let cfg = SimConfig {
            endpoint: endpoint.clone(),
            token: tokens[i / 10].clone(),
            instance: format!("fleet-{i:05}"),
            jitter: 1.0,
            start_delay: spread.mul_f64(i as f64 / n as f64),
        };
        tasks.push(tokio::spawn(Sim::new(cfg, s.clone()).run(stop_rx.clone())));
        stats.push(s);
    }
    let joined = wait_acked(&stats, 1, spread * 10 + Duration::from_secs(600)).await?;
    let join_cpu = cpu_seconds(pid)? - cpu_join;
    println!("  joined in {:.1} s", joined.as_secs_f64());

    let join_errors = errors(&stats);

    // Connected and idle: the CA's CPU over the whole window, and in each tenth of it (a periodic
    // cost shows as the tenths where it falls).
    tokio::time::sleep(Duration::from_secs(2)).await;
    let connected = mem(pid)?;
    let fds = open_fds(pid);
    let idle_errors_before = errors(&stats);
    let drops_idle = backlog_drops();
    let cpu0 = cpu_seconds(pid)?;
    let mut idle_tenths = Vec::with_capacity(10);
    let mut at = cpu0;
    for _ in 0..10 {
        tokio::time::sleep(idle_window / 10).await;
        let now = cpu_seconds(pid)?;
        idle_tenths.push(now - at);
        at = now;
    }
    let idle_cpu = (at - cpu0) / idle_window.as_secs_f64();
    let idle_errors = errors(&stats) - idle_errors_before;
    let drops_after_idle = backlog_drops();
    if idle_errors > 0 {
        println!(
            "  {idle_errors} sidecar call(s) failed while idle: {}",
            SimStats::common_errors(&stats, 3)
                .iter()
                .map(|(n, why)| format!("{n} x {why}"))
                .collect::<Vec<_>>()
                .join("; ")
        );
    }

    // A bundle change pushed to everyone.
    let errors_before = errors(&stats);
    let cpu1 = cpu_seconds(pid)?;
    let t_push = Instant::now();
    let out = Command::new(ca_bin)
        .args(["rotate", "prepare", "--dir"])
        .arg(&ca_dir)
        .env("MESHID_LOG", "error")
        .output()?;
    if !out.status.success() {
        bail!(
            "rotate prepare failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    wait_acked(&stats, 2, Duration::from_secs(600)).await?;
    let push = t_push.elapsed();
    let push_cpu = cpu_seconds(pid)? - cpu1;
    println!("  bundle pushed to all in {:.2} s", push.as_secs_f64());

    // A revocation: from the command to the last sidecar holding it, then acknowledging it.
    let cpu_revoke = cpu_seconds(pid)?;
    let acked_before = stats
        .iter()
        .map(|s| s.acked_version.load(Ordering::Relaxed))
        .min()
        .unwrap_or(0);
    let t_revoke = Instant::now();
    let out = Command::new(ca_bin)
        .args([
            "revoke",
            "--id",
            "spiffe://cluster.local/ns/fleet/sa/revoked",
            "--dir",
        ])
        .arg(&ca_dir)
        .args(["--reason", "fleet bench", "--max-ttl", "1h"])
        .env("MESHID_LOG", "error")
        .output()?;
    if !out.status.success() {
        bail!("revoke failed: {}", String::from_utf8_lossy(&out.stderr));
    }
    let command_done = t_revoke.elapsed();
    // As long as the push: every sidecar gets one message either way.
    wait_all(
        &stats,
        Duration::from_secs(600),
        "hold the revocation",
        |s| s.revocations.load(Ordering::Relaxed) >= 1,
    )
    .await?;
    let revoked_all = t_revoke.elapsed();
    wait_acked(&stats, acked_before + 1, Duration::from_secs(600)).await?;
    let revoked_acked = t_revoke.elapsed();
    let revoke_cpu = cpu_seconds(pid)? - cpu_revoke;
    println!(
        "  revocation held by all in {:.2} s, acknowledged by all in {:.2} s",
        revoked_all.as_secs_f64(),
        revoked_acked.as_secs_f64()
    );

    // Renewals alongside the connected fleet.
    let mut renewers = Vec::new();
    for w in 0..args.renewal_clients {
        let client = benchca::renewal_client(&endpoint, &cluster, &format!("renewer-{w}")).await?;
        renewers.push(client);
    }
    let cpu2 = cpu_seconds(pid)?;
    let t_renew = Instant::now();
    let deadline = tokio::time::Instant::now() + window;
    let mut loops = Vec::new();
    for mut client in renewers {
        loops.push(tokio::spawn(async move {
            let mut lat = Vec::new();
            let mut failed = 0u64;
            while tokio::time::Instant::now() < deadline {
                let csr = WorkloadKey::new().csr;
                let t = Instant::now();
                let r = client
                    .issue(IssueRequest {
                        csr,
                        credential: None,
                        ttl_seconds: 0,
                        app_svid: false,
                    })
                    .await;
                match r {
                    Ok(_) => lat.push(t.elapsed().as_secs_f64() * 1000.0),
                    Err(_) => failed += 1,
                }
            }
            (lat, failed)
        }));
    }
    let mut lat = Vec::new();
    let mut renew_failed = 0;
    for l in loops {
        let (l, f) = l.await?;
        lat.extend(l);
        renew_failed += f;
    }
    let renew_wall = t_renew.elapsed().as_secs_f64();
    let renew_cpu = cpu_seconds(pid)? - cpu2;
    lat.sort_by(f64::total_cmp);
    let pct = |p: f64| {
        lat.get(((lat.len() as f64 * p) as usize).min(lat.len().saturating_sub(1)))
            .copied()
    };
    let still_acked = stats
        .iter()
        .filter(|s| s.acked_version.load(Ordering::Relaxed) >= 2)
        .count();
    let after = mem(pid)?;
    let metrics = meshid_tests::process::http_get(admin, "/metrics")
        .map(|(_, b)| b)
        .unwrap_or_default();
    let streams = metrics
        .lines()
        .find(|l| l.starts_with("meshid_ca_watch_streams "))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|v| v.parse::<f64>().ok());
    let stream_errors = errors(&stats) - errors_before;
    let drops_end = backlog_drops();
    let between = |a: Option<u64>, b: Option<u64>| Some(b?.saturating_sub(a?));

    stop_tx.send_replace(true);
    for t in tasks {
        let _ = t.await;
    }
    drop(ca);
    let per = |a: u64, b: u64| (b as f64 - a as f64) / n as f64;
    Ok(json!({
        "sidecars": n,
        "join_seconds": joined.as_secs_f64(),
        "join_ca_cpu_seconds": join_cpu,
        "ca_rss_kib": { "before": before.rss_kib, "connected": connected.rss_kib, "end": after.rss_kib },
        "ca_anon_kib": { "before": before.anon_kib, "connected": connected.anon_kib, "end": after.anon_kib },
        "rss_per_sidecar_kib": per(before.rss_kib, connected.rss_kib),
        "anon_per_sidecar_kib": per(before.anon_kib, connected.anon_kib),
        "ca_open_fds": fds,
        "watch_streams_metric": streams,
        "idle_ca_cpu_share": idle_cpu,
        "idle_ca_cpu_seconds_by_tenth": idle_tenths,
        "sidecar_errors_during_join": join_errors,
        "sidecar_errors_while_idle": idle_errors,
        "push_seconds": push.as_secs_f64(),
        "push_ca_cpu_seconds": push_cpu,
        "revoke_command_seconds": command_done.as_secs_f64(),
        "revoke_held_by_all_seconds": revoked_all.as_secs_f64(),
        "revoke_acked_by_all_seconds": revoked_acked.as_secs_f64(),
        "revoke_ca_cpu_seconds": revoke_cpu,
        "renewals_per_second": lat.len() as f64 / renew_wall,
        "renewals_per_ca_cpu_second": lat.len() as f64 / renew_cpu.max(1e-9),
        "renewal_ms": { "p50": pct(0.5), "p99": pct(0.99) },
        "renewal_failures": renew_failed,
        "sidecars_on_pushed_bundle_after_renewals": still_acked,
        "sidecar_errors_after_join": stream_errors,
        "backlog_drops": {
            "join": between(drops_join, drops_idle),
            "idle": between(drops_idle, drops_after_idle),
            "after_idle": between(drops_after_idle, drops_end),
        },
    }))
}

fn print_size(r: &Value) {
    let f = |k: &str| r.pointer(k).and_then(Value::as_f64).unwrap_or(f64::NAN);
    println!(
        "  CA memory per connected sidecar: {:.1} KiB RSS, {:.1} KiB anonymous ({} open fds)",
        f("/rss_per_sidecar_kib"),
        f("/anon_per_sidecar_kib"),
        r["ca_open_fds"]
    );
    println!(
        "  CA CPU while idle:               {:.2}% of a core ({} sidecar call(s) failed)",
        f("/idle_ca_cpu_share") * 100.0,
        r["sidecar_errors_while_idle"]
    );
    println!(
        "  loopback backlog drops:          {} joining, {} idle, {} after",
        r["backlog_drops"]["join"], r["backlog_drops"]["idle"], r["backlog_drops"]["after_idle"]
    );
    println!(
        "  bundle change to every ack:      {:.2} s ({:.2} s of CA CPU)",
        f("/push_seconds"),
        f("/push_ca_cpu_seconds")
    );
    println!(
        "  revoke to the last sidecar:      {:.2} s holding it, {:.2} s acknowledged",
        f("/revoke_held_by_all_seconds"),
        f("/revoke_acked_by_all_seconds")
    );
    println!(
        "  renewals alongside:              {:.0}/s, p50 {:.1} ms, p99 {:.1} ms, {} failed",
        f("/renewals_per_second"),
        f("/renewal_ms/p50"),
        f("/renewal_ms/p99"),
        r["renewal_failures"]
    );
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn waits_until_every_sidecar_got_there_even_one_that_went_back() {
        let stats: Vec<Arc<SimStats>> = (0..3).map(|_| Arc::new(SimStats::default())).collect();
        let moving = stats.clone();
        tokio::spawn(async move {
            for s in &moving {
                tokio::time::sleep(Duration::from_millis(20)).await;
                s.acked_version.store(2, Ordering::Relaxed);
            }
            // Seen at 2 once: a later lower value does not make the wait start over.
            moving[0].acked_version.store(1, Ordering::Relaxed);
        });
        let took = wait_acked(&stats, 2, Duration::from_secs(30))
            .await
            .unwrap();
        assert!(took >= Duration::from_millis(60), "{took:?}");
        assert!(
            stats
                .iter()
                .skip(1)
                .all(|s| s.acked_version.load(Ordering::Relaxed) == 2)
        );
    }

    #[tokio::test]
    async fn names_how_many_are_behind_when_the_cap_passes() {
        let stats: Vec<Arc<SimStats>> = (0..3).map(|_| Arc::new(SimStats::default())).collect();
        stats[1].acked_version.store(1, Ordering::Relaxed);
        let err = wait_acked(&stats, 1, Duration::from_millis(30))
            .await
            .unwrap_err()
            .to_string();
        assert!(
            err.starts_with("2 of 3 sidecar(s) did not acknowledge bundle v1"),
            "{err}"
        );
    }

    #[test]
    fn polls_less_often_the_more_are_behind() {
        assert_eq!(poll_interval(0), Duration::from_millis(5));
        assert_eq!(poll_interval(19_000), Duration::from_millis(43));
    }
}
