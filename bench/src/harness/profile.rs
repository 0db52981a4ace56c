//! Optional CPU profiles (`bench-run --perf DIR`): one extra, unscored throughput run per proxy with
//! `perf record` attached to each proxy process, and a `perf report` summary beside each profile.

use std::path::Path;
use std::process::{Command, Stdio};
use std::time::Duration;

use anyhow::{Context, Result};

use super::pki::BenchPki;
use super::topology::{Contender, start};
use super::{Ctx, Guard, drive};

/// Profiles every proxy contender under the throughput load; writes into `out`.
pub fn profile(ctx: &Ctx, pki: &BenchPki, out: &Path) -> Result<()> {
    std::fs::create_dir_all(out)?;
    for c in Contender::PROXIES {
        for rate in [None, Some(ctx.settings.rate)] {
            if let Err(e) = profile_one(ctx, pki, c, out, rate) {
                eprintln!("[perf] {}: {e:#}", c.name());
            }
        }
    }
    Ok(())
}

/// One profiled run: closed loop at max throughput, or open loop at `rate`.
fn profile_one(
    ctx: &Ctx,
    pki: &BenchPki,
    c: Contender,
    out: &Path,
    rate: Option<f64>,
) -> Result<()> {
    let t = start(ctx, pki, c)?;
    let load = match rate {
        Some(r) => format!("{}-rate{r}", c.name()),
        None => format!("{}-max", c.name()),
    };
    let s = &ctx.settings;
    let mut perfs = Vec::new();
    let mut stats = Vec::new();
    for (role, g) in [("outbound", &t.outbound), ("inbound", &t.inbound)] {
        let g = g.as_ref().context("no proxy")?;
        let pids: Vec<String> = g.pids().iter().map(u32::to_string).collect();
        let base = out.join(format!("{load}-{role}"));
        let file = base.with_extension("perf.data");
        let mut cmd = Command::new("perf");
        cmd.args(["record", "-F", "2000", "-g", "-p", &pids.join(","), "-o"])
            .arg(&file);
        perfs.push((
            ctx.spawn("perf", &mut cmd, &base.with_extension("perf.log"))?,
            file,
        ));
        let stat_file = base.with_extension("stat.csv");
        let mut cmd = Command::new("perf");
        cmd.args([
            "stat",
            "-x,",
            "-e",
            "raw_syscalls:sys_enter,context-switches,task-clock",
            "-p",
            &pids.join(","),
            "-o",
        ])
        .arg(&stat_file);
        stats.push((
            role,
            ctx.spawn("perf stat", &mut cmd, &base.with_extension("stat.log"))?,
            stat_file,
        ));
    }
    std::thread::sleep(Duration::from_millis(300));
    let mut a = drive::args(&[
        "--target",
        &t.entry.to_string(),
        "--warmup",
        "0ms",
        "--duration",
        &format!("{}ms", s.duration.as_millis()),
    ]);
    match rate {
        Some(r) => a.extend(drive::args(&[
            "--rate",
            &r.to_string(),
            "--connections",
            "16",
        ])),
        None => a.extend(drive::args(&["--connections", &s.connections.to_string()])),
    }
    let (r, _) = drive::meshload(ctx, &t.dir, &a, &t.roles())?;
    eprintln!(
        "[perf] {load}: {:.0} req/s while profiled",
        r.requests_per_second
    );
    let requests = r.count.max(1) as f64;
    let mut summary = String::new();
    for (role, g, file) in stats {
        stop(g);
        let text = std::fs::read_to_string(&file).unwrap_or_default();
        for line in text
            .lines()
            .filter(|l| !l.starts_with('#') && !l.is_empty())
        {
            let f: Vec<&str> = line.split(',').collect();
            if let (Some(v), Some(event)) =
                (f.first().and_then(|v| v.parse::<f64>().ok()), f.get(2))
            {
                summary.push_str(&format!(
                    "{load} {role}: {event} per request: {:.3}\n",
                    v / requests
                ));
            }
        }
    }
    eprint!("{summary}");
    let path = out.join("per-request.txt");
    let mut all = std::fs::read_to_string(&path).unwrap_or_default();
    all.push_str(&summary);
    std::fs::write(path, all)?;
    for (g, file) in perfs {
        stop(g);
        let report = Command::new("perf")
            .args([
                "report",
                "--stdio",
                "--no-children",
                "--percent-limit",
                "0.7",
                "-g",
                "none",
                "-i",
            ])
            .arg(&file)
            .stderr(Stdio::null())
            .output()?;
        std::fs::write(file.with_extension("txt"), report.stdout)?;
    }
    Ok(())
}

/// Stops `perf record` with SIGINT so it writes its file.
fn stop(mut g: Guard) {
    let _ = Command::new("kill")
        .args(["-INT", &g.pid().to_string()])
        .status();
    for _ in 0..200 {
        if !g.running() {
            break;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}
