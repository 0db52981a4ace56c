//! `chaos-run`: faults against the real binaries on loopback, under load (issue #18). Each scenario
//! starts its own CA, sidecars and app, injects one kind of fault, checks the behaviour the README
//! promises (a broken promise fails the run) and measures what it cost: failed requests, recovery
//! times. Results: `bench/results/chaos-latest.json` and `docs/reliability.md`, every figure next to
//! the command that produced it.

pub mod attack;
pub mod ca_dir;
pub mod ca_outage;
pub mod clock_steps;
pub mod files;
pub mod floods;
pub mod markdown;
pub mod mesh;
pub mod rotations;
pub mod signals;
pub mod soak;
pub mod traffic;

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use serde::{Deserialize, Serialize};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use crate::harness::Ctx;

/// What one scenario found.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ScenarioReport {
    pub id: String,
    pub title: String,
    /// What was started and what was done, in words.
    pub setup: String,
    /// `measured`, or `failed` (a check failed or the scenario could not run).
    pub status: String,
    pub seconds: f64,
    pub figures: Vec<Figure>,
    pub checks: Vec<Check>,
    pub notes: Vec<String>,
    /// Every process the scenario started or command it ran, exactly as run.
    pub commands: Vec<String>,
    /// Why the scenario could not finish.
    pub error: Option<String>,
    /// The meshid commit the scenario ran against (`-dirty` when the tree had changes): a full run
    /// of some scenarios keeps the others' earlier results, each with its own commit.
    #[serde(default)]
    pub commit: String,
    /// When it ran (Unix seconds).
    #[serde(default)]
    pub generated_unix: u64,
}

/// One measured figure.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Figure {
    pub name: String,
    pub value: f64,
    pub unit: String,
    /// The target, when it names one.
    pub target: Option<String>,
}

/// One behaviour the README promises, checked.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Check {
    pub what: String,
    pub passed: bool,
    pub detail: String,
}

impl ScenarioReport {
    pub fn new(id: &str, title: &str) -> Self {
        Self {
            id: id.into(),
            title: title.into(),
            setup: String::new(),
            status: "measured".into(),
            seconds: 0.0,
            figures: Vec::new(),
            checks: Vec::new(),
            notes: Vec::new(),
            commands: Vec::new(),
            error: None,
            commit: String::new(),
            generated_unix: 0,
        }
    }

    pub fn figure(&mut self, name: &str, value: f64, unit: &str) {
        self.figures.push(Figure {
            name: name.into(),
            value,
            unit: unit.into(),
            target: None,
        });
    }

    pub fn figure_target(&mut self, name: &str, value: f64, unit: &str, target: &str) {
        self.figures.push(Figure {
            name: name.into(),
            value,
            unit: unit.into(),
            target: Some(target.into()),
        });
    }

    /// Records a check; the run fails if it did not pass.
    pub fn check(&mut self, what: &str, passed: bool, detail: impl Into<String>) {
        let detail = detail.into();
        println!(
            "  [{}] {what}: {detail}",
            if passed { "ok" } else { "FAILED" }
        );
        self.checks.push(Check {
            what: what.into(),
            passed,
            detail,
        });
    }

    pub fn failed_checks(&self) -> Vec<&Check> {
        self.checks.iter().filter(|c| !c.passed).collect()
    }
}

/// What every scenario gets.
pub struct Env {
    pub ctx: Ctx,
    pub smoke: bool,
    /// Runs the sidecars whose files are made unreadable as this uid:gid (setpriv), so that file
    /// permissions bind even when the harness runs as root.
    pub unprivileged: Option<(u32, u32)>,
}

impl Env {
    /// Commands recorded since `from` (an index into the context's list).
    pub fn commands_since(&self, from: usize) -> Vec<String> {
        self.ctx.commands.borrow()[from..].to_vec()
    }

    pub fn commands_len(&self) -> usize {
        self.ctx.commands.borrow().len()
    }
}

/// Runs one scenario: its report, with the commands it ran and its wall time, whatever happened.
pub async fn run_scenario<F, Fut>(env: &Env, id: &str, title: &str, f: F) -> ScenarioReport
where
    F: FnOnce(ScenarioReport) -> Fut,
    Fut: std::future::Future<Output = (ScenarioReport, Result<()>)>,
{
    println!("== {id}: {title}");
    let from = env.commands_len();
    let t0 = Instant::now();
    let (mut report, result) = f(ScenarioReport::new(id, title)).await;
    report.seconds = t0.elapsed().as_secs_f64();
    report.commands = env.commands_since(from);
    if let Err(e) = result {
        println!("  [FAILED] {id} could not finish: {e:#}");
        report.error = Some(format!("{e:#}"));
    }
    if report.error.is_some() || !report.failed_checks().is_empty() {
        report.status = "failed".into();
    }
    println!("   {id}: {} in {:.1} s", report.status, report.seconds);
    report
}

/// Seconds since the epoch, with a fraction.
pub fn unix_f64() -> f64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0.0, |d| d.as_secs_f64())
}

/// The `Instant` at which the wall clock reads `unix` seconds.
pub fn instant_at(unix: f64) -> Instant {
    let delta = unix - unix_f64();
    if delta >= 0.0 {
        Instant::now() + Duration::from_secs_f64(delta)
    } else {
        Instant::now()
            .checked_sub(Duration::from_secs_f64(-delta))
            .unwrap_or_else(Instant::now)
    }
}

/// Whether this process runs as root (for which file permissions do not bind).
pub fn running_as_root() -> bool {
    std::process::Command::new("id")
        .arg("-u")
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim() == "0")
        .unwrap_or(false)
}

/// `GET path` on an admin port: (status, body). Short timeouts: an admin port that hangs is a
/// finding, not a reason to hang the run.
pub async fn admin_get(addr: SocketAddr, path: &str) -> Result<(u16, String)> {
    let fut = async {
        let mut s = tokio::net::TcpStream::connect(addr).await?;
        s.write_all(
            format!("GET {path} HTTP/1.1\r\nHost: chaos\r\nAccept: text/plain\r\nConnection: close\r\n\r\n")
                .as_bytes(),
        )
        .await?;
        let mut out = Vec::new();
        s.read_to_end(&mut out).await?;
        Ok::<_, std::io::Error>(out)
    };
    let out = tokio::time::timeout(Duration::from_secs(3), fut)
        .await
        .context("admin request timed out")??;
    let text = String::from_utf8_lossy(&out).into_owned();
    let code = text
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .context("not an HTTP answer")?;
    let body = text
        .split_once("\r\n\r\n")
        .map(|(_, b)| b.to_owned())
        .unwrap_or_default();
    Ok((code, body))
}

/// Whether `/readyz` answers 200 (false when it answers anything else or nothing).
pub async fn ready(admin: SocketAddr) -> bool {
    matches!(admin_get(admin, "/readyz").await, Ok((200, _)))
}

/// Polls `/readyz` until it answers 200; the wait.
pub async fn wait_ready(admin: SocketAddr, timeout: Duration) -> Result<Duration> {
    let t0 = Instant::now();
    while t0.elapsed() < timeout {
        if ready(admin).await {
            return Ok(t0.elapsed());
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    bail!("{admin}/readyz not 200 after {timeout:?}")
}

/// The sum of the samples of `name` whose labels include every `labels` pair, from a Prometheus or
/// OpenMetrics text (None: no such sample).
pub fn metric(text: &str, name: &str, labels: &[(&str, &str)]) -> Option<f64> {
    let mut found = None;
    for line in text.lines() {
        if line.starts_with('#') {
            continue;
        }
        let Some(rest) = line.strip_prefix(name) else {
            continue;
        };
        let (label_text, value) = if let Some(r) = rest.strip_prefix('{') {
            let Some((l, v)) = r.split_once('}') else {
                continue;
            };
            (l, v)
        } else if rest.starts_with(' ') {
            ("", rest)
        } else {
            continue;
        };
        let all = labels
            .iter()
            .all(|(k, v)| label_text.contains(&format!("{k}=\"{v}\"")));
        if !all {
            continue;
        }
        if let Some(v) = value
            .split_whitespace()
            .next()
            .and_then(|v| v.parse::<f64>().ok())
        {
            *found.get_or_insert(0.0) += v;
        }
    }
    found
}

/// One metric of the process whose admin port is `admin` (0 when absent or unreachable).
pub async fn admin_metric(admin: SocketAddr, name: &str, labels: &[(&str, &str)]) -> f64 {
    match admin_get(admin, "/metrics").await {
        Ok((200, body)) => metric(&body, name, labels).unwrap_or(0.0),
        _ => 0.0,
    }
}

/// Polls until `f` holds or `timeout` passes; the wait, or None.
/// Simulated sidecars, one task each, and what they count; [`SimFleet::stop`] ends them all.
pub struct SimFleet {
    pub stats: Vec<std::sync::Arc<crate::simsidecar::SimStats>>,
    tasks: Vec<tokio::task::JoinHandle<()>>,
    stop: tokio::sync::watch::Sender<bool>,
}

impl SimFleet {
    pub fn start(configs: impl IntoIterator<Item = crate::simsidecar::SimConfig>) -> Self {
        let (stop, stop_rx) = tokio::sync::watch::channel(false);
        let mut stats = Vec::new();
        let mut tasks = Vec::new();
        for cfg in configs {
            let s = std::sync::Arc::new(crate::simsidecar::SimStats::default());
            let sim = crate::simsidecar::Sim::new(cfg, s.clone());
            tasks.push(tokio::spawn(sim.run(stop_rx.clone())));
            stats.push(s);
        }
        Self { stats, tasks, stop }
    }

    /// How long until every one had its first certificate and acknowledged the bundle (`None`: not
    /// within `timeout`).
    pub async fn joined(&self, timeout: Duration) -> Option<Duration> {
        poll_until(timeout, Duration::from_millis(50), || async {
            self.stats
                .iter()
                .all(|s| s.acked_version.load(std::sync::atomic::Ordering::Relaxed) >= 1)
        })
        .await
    }

    pub async fn stop(self) {
        self.stop.send_replace(true);
        for t in self.tasks {
            let _ = t.await;
        }
    }
}

pub async fn poll_until<F, Fut>(timeout: Duration, every: Duration, mut f: F) -> Option<Duration>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let t0 = Instant::now();
    loop {
        if f().await {
            return Some(t0.elapsed());
        }
        if t0.elapsed() >= timeout {
            return None;
        }
        tokio::time::sleep(every).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn metric_sums_matching_series() {
        let text = "# TYPE x counter\n\
                    x_total{result=\"applied\"} 2\n\
                    x_total{result=\"rejected\",port=\"1\"} 3\n\
                    x_total{result=\"rejected\",port=\"2\"} 4\n\
                    x_totally 9\n\
                    g 1.5\n";
        assert_eq!(
            metric(text, "x_total", &[("result", "rejected")]),
            Some(7.0)
        );
        assert_eq!(metric(text, "x_total", &[]), Some(9.0));
        assert_eq!(metric(text, "g", &[]), Some(1.5));
        assert_eq!(metric(text, "missing", &[]), None);
    }
}
