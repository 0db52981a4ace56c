//! Runs `meshload` on the load core and snapshots the CPU time of every role on the server core at
//! the exact moments its measured window opens and closes.

use std::collections::BTreeMap;
use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::Stdio;
use std::time::Instant;

use anyhow::{Context, Result, bail};

use super::{Ctx, Guard, LOAD_CPU, pinned};
use crate::load::Report;
use crate::procfs::cpu_seconds;

/// CPU used during the measured window.
#[derive(Debug, Clone, Default)]
pub struct Window {
    pub seconds: f64,
    /// CPU seconds per role (app, outbound, inbound).
    pub cpu: BTreeMap<String, f64>,
    /// Busy share of each core over the window, from /proc/stat (all processes).
    pub core_busy: Vec<f64>,
}

struct Snapshot {
    at: Instant,
    cpu: BTreeMap<String, f64>,
    cores: Vec<(u64, u64)>,
}

/// The CPU each role has used so far: its processes and their descendants as they are now, not as
/// they were when the roles were listed (nginx's worker may not exist yet when its master listens,
/// and a worker missed at both ends of the window counts nothing).
fn snapshot(roles: &[(&'static str, Vec<u32>)]) -> Snapshot {
    let mut cpu = BTreeMap::new();
    for (name, pids) in roles {
        let all: std::collections::BTreeSet<u32> =
            pids.iter().flat_map(|p| crate::procfs::tree(*p)).collect();
        let total: f64 = all.iter().filter_map(|p| cpu_seconds(*p).ok()).sum();
        cpu.insert((*name).to_owned(), total);
    }
    Snapshot {
        at: Instant::now(),
        cpu,
        cores: core_times(),
    }
}

/// (busy, total) jiffies per core from /proc/stat.
fn core_times() -> Vec<(u64, u64)> {
    let text = std::fs::read_to_string("/proc/stat").unwrap_or_default();
    text.lines()
        .filter(|l| l.starts_with("cpu") && !l.starts_with("cpu "))
        .map(|l| {
            let v: Vec<u64> = l
                .split_whitespace()
                .skip(1)
                .filter_map(|x| x.parse().ok())
                .collect();
            let total: u64 = v.iter().take(8).sum();
            let idle = v.get(3).copied().unwrap_or(0) + v.get(4).copied().unwrap_or(0);
            (total - idle, total)
        })
        .collect()
}

/// Runs meshload with `args` (plus `--json --markers`) pinned to the load core.
pub fn meshload(
    ctx: &Ctx,
    dir: &Path,
    args: &[String],
    roles: &[(&'static str, Vec<u32>)],
) -> Result<(Report, Window)> {
    let mut cmd = pinned(LOAD_CPU, ctx.bin("meshload"));
    cmd.args(args).args(["--json", "--markers"]);
    ctx.record(&cmd);
    let log = dir.join("meshload.log");
    let child = cmd
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(std::fs::File::create(&log)?)
        .spawn()
        .context("starting meshload")?;
    let mut guard = Guard::new("meshload", child, &log);
    let stdout = guard
        .child
        .as_mut()
        .and_then(|c| c.stdout.take())
        .context("meshload stdout")?;
    let (mut start, mut end, mut report) = (None, None, None);
    for line in BufReader::new(stdout).lines() {
        let line = line?;
        match line.as_str() {
            "window-start" => start = Some(snapshot(roles)),
            "window-end" => end = Some(snapshot(roles)),
            l => {
                if let Some(json) = l.strip_prefix("result ") {
                    report = Some(serde_json::from_str::<Report>(json)?);
                }
            }
        }
    }
    if let Some(c) = guard.child.as_mut() {
        let _ = c.wait();
    }
    let (Some(s), Some(e), Some(report)) = (start, end, report) else {
        bail!("meshload gave no result: {}", guard.log_tail());
    };
    let mut window = Window {
        seconds: (e.at - s.at).as_secs_f64(),
        ..Window::default()
    };
    for (k, v) in &e.cpu {
        window
            .cpu
            .insert(k.clone(), v - s.cpu.get(k).copied().unwrap_or(0.0));
    }
    window.core_busy = s
        .cores
        .iter()
        .zip(&e.cores)
        .map(|(a, b)| {
            let total = b.1.saturating_sub(a.1);
            if total == 0 {
                0.0
            } else {
                b.0.saturating_sub(a.0) as f64 / total as f64
            }
        })
        .collect();
    Ok((report, window))
}

/// Common meshload arguments.
pub fn args(list: &[&str]) -> Vec<String> {
    list.iter().map(|s| (*s).to_owned()).collect()
}
