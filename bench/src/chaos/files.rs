//! Scenario `files`: the policy and credential files a file-mode sidecar watches, broken while
//! traffic flows: torn (a write that stopped half-way), truncated to nothing, replaced by a directory,
//! made unreadable. Each time the last good state must stay in force (no failed request), a metric
//! must count the rejection, readiness must behave as the README says (a rejected policy fails
//! readiness only with `--unready-on-policy-error`; rejected credential files do not, while the
//! certificate in force is valid), and the repaired file must be applied again.

use std::net::SocketAddr;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};

use super::mesh::{
    SidecarProc, file_mode_args, inbound_args, outbound_args, policy_yaml, start_app,
};
use super::traffic::{Tally, Traffic, sent_between};
use super::{Env, ScenarioReport, admin_metric, poll_until, ready, running_as_root};
use crate::harness::free_addr;
use crate::harness::pki::{BenchPki, CLIENT_ID, SERVER_ID};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Fault {
    Torn,
    Truncated,
    Directory,
    Unreadable,
}

impl Fault {
    fn name(self) -> &'static str {
        match self {
            Self::Torn => "torn",
            Self::Truncated => "truncated to 0 bytes",
            Self::Directory => "replaced by a directory",
            Self::Unreadable => "unreadable (mode 000)",
        }
    }
}

/// Which file.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Target {
    Policy,
    Cert,
    Key,
    Bundle,
}

impl Target {
    fn name(self) -> &'static str {
        match self {
            Self::Policy => "policy",
            Self::Cert => "certificate",
            Self::Key => "key",
            Self::Bundle => "bundle",
        }
    }

    /// The gauge that is 1 while the newest version of the file is rejected.
    fn gauge(self) -> &'static str {
        match self {
            Self::Policy => "meshid_sidecar_policy_rejected",
            _ => "meshid_sidecar_credentials_rejected",
        }
    }

    /// The counter that says a new version of the file was rejected / applied.
    fn counter(self) -> &'static str {
        match self {
            Self::Policy => "meshid_sidecar_policy_reloads_total",
            _ => "meshid_sidecar_credential_updates_total",
        }
    }
}

pub async fn run(env: &Env, mut r: ScenarioReport) -> (ScenarioReport, Result<()>) {
    let user = match env.unprivileged {
        Some((uid, gid)) => format!(
            " (as uid {uid}, gid {gid}, with setpriv: the harness runs as root, for which mode 000 means nothing)"
        ),
        None => String::new(),
    };
    r.setup = format!(
        "Two file-mode inbound sidecars{user} watching the same policy and credential files: A \
         (defaults) carries the traffic, B has --unready-on-policy-error; an outbound sidecar sends \
         to A; 4 HTTP/1.1 keep-alive connections of traffic (20 ms pause after each answer). For each \
         file and each fault: break the file in place, wait until A counts the rejection, keep the \
         traffic on for half a second, check readiness and metrics, then write the good file back \
         and wait until A applies it. A torn policy stops inside `protocol: http` (`protocol: ht`); \
         a torn PEM file after half of its bytes."
    );
    let result = scenario(env, &mut r).await;
    (r, result)
}

/// A file as the sidecars read it, and how to break and repair it.
struct Watched {
    target: Target,
    path: PathBuf,
    good: Vec<u8>,
}

impl Watched {
    fn torn(&self) -> Vec<u8> {
        if self.target == Target::Policy {
            let text = String::from_utf8_lossy(&self.good);
            let at = text
                .find("protocol: http")
                .map_or(self.good.len() / 2, |i| i + "protocol: ht".len());
            return self.good[..at].to_vec();
        }
        self.good[..self.good.len() / 2].to_vec()
    }

    fn apply(&self, fault: Fault) -> Result<()> {
        match fault {
            Fault::Torn => std::fs::write(&self.path, self.torn())?,
            Fault::Truncated => std::fs::write(&self.path, b"")?,
            Fault::Directory => {
                std::fs::remove_file(&self.path)?;
                std::fs::create_dir(&self.path)?;
            }
            Fault::Unreadable => {
                std::fs::set_permissions(&self.path, std::fs::Permissions::from_mode(0o000))?
            }
        }
        Ok(())
    }

    fn repair(&self) -> Result<()> {
        if self.path.is_dir() {
            std::fs::remove_dir(&self.path)?;
        }
        std::fs::write(&self.path, &self.good)?;
        std::fs::set_permissions(&self.path, std::fs::Permissions::from_mode(0o644))?;
        Ok(())
    }
}

/// Copies `from` into `dir` readable by everyone (the sidecars may run as another user).
fn readable_copy(from: &Path, dir: &Path, name: &str) -> Result<PathBuf> {
    let to = dir.join(name);
    std::fs::copy(from, &to).with_context(|| format!("copying {}", from.display()))?;
    std::fs::set_permissions(&to, std::fs::Permissions::from_mode(0o644))?;
    Ok(to)
}

async fn scenario(env: &Env, r: &mut ScenarioReport) -> Result<()> {
    let work = env.ctx.dir("files")?;
    std::fs::set_permissions(&work, std::fs::Permissions::from_mode(0o755))?;
    let pki = BenchPki::new()?;
    let (creds, pol) = (work.join("creds"), work.join("policy"));
    for d in [&creds, &pol] {
        std::fs::create_dir(d)?;
        std::fs::set_permissions(d, std::fs::Permissions::from_mode(0o755))?;
    }
    let cert = readable_copy(&pki.server.cert, &creds, "cert.pem")?;
    let key = readable_copy(&pki.server.key, &creds, "key.pem")?;
    let bundle = readable_copy(&pki.bundle, &creds, "bundle.pem")?;
    let (app_guard, app) = start_app(env, &work, 0)?;
    let _app = app_guard;
    let (a_port, b_port, local) = (free_addr(), free_addr(), free_addr());
    let policy = pol.join("policy.yaml");
    std::fs::write(
        &policy,
        policy_yaml(&[a_port.port(), b_port.port()], CLIENT_ID),
    )?;
    std::fs::set_permissions(&policy, std::fs::Permissions::from_mode(0o644))?;

    let mut args = inbound_args(a_port, app, &policy);
    args.extend(file_mode_args(&cert, &key, &bundle));
    let mut a = SidecarProc::start(env, "inbound-a", &work, args, env.unprivileged)?;
    let mut args = inbound_args(b_port, app, &policy);
    args.extend(file_mode_args(&cert, &key, &bundle));
    args.push("--unready-on-policy-error".into());
    let mut b = SidecarProc::start(env, "inbound-b", &work, args, env.unprivileged)?;
    let mut args = outbound_args(local, a_port, SERVER_ID);
    args.extend(file_mode_args(
        &pki.client.cert,
        &pki.client.key,
        &pki.bundle,
    ));
    let mut out = SidecarProc::start(env, "outbound", &work, args, None)?;
    a.wait_ready(Duration::from_secs(15)).await?;
    b.wait_ready(Duration::from_secs(15)).await?;
    out.wait_ready(Duration::from_secs(15)).await?;

    let files = [
        (Target::Policy, policy),
        (Target::Cert, cert),
        (Target::Key, key),
        (Target::Bundle, bundle),
    ];
    let mut faults = vec![Fault::Torn, Fault::Truncated, Fault::Directory];
    if env.unprivileged.is_some() || !running_as_root() {
        faults.push(Fault::Unreadable);
    } else {
        r.notes.push("Unreadable files were not tried: the harness runs as root without setpriv, and root reads a mode-000 file.".into());
    }
    let traffic = Traffic::start(local, 4, Duration::from_millis(20));
    tokio::time::sleep(Duration::from_millis(300)).await;
    let t0 = Instant::now();
    let mut tried = 0;
    let mut detect = Vec::new();
    let mut repair = Vec::new();
    for (target, path) in &files {
        let w = Watched {
            target: *target,
            good: std::fs::read(path)?,
            path: path.clone(),
        };
        for &fault in &faults {
            let (d, rep) = one_fault(r, &traffic, &w, fault, a.admin, b.admin).await?;
            detect.push(d);
            repair.push(rep);
            tried += 1;
        }
    }
    let recs = traffic.stop().await;
    let all = Tally::of(&sent_between(&recs, t0, Instant::now()));
    r.figure("faults injected", tried as f64, "");
    r.figure_target(
        "requests failed during all faults",
        all.failed as f64,
        "",
        "0",
    );
    r.figure("requests sent during all faults", all.total() as f64, "");
    if let Some(m) = detect.iter().cloned().reduce(f64::max) {
        r.figure("slowest fault to rejection counted", m, "s");
    }
    if let Some(m) = repair.iter().cloned().reduce(f64::max) {
        r.figure("slowest repair to applied", m, "s");
    }
    r.notes.push(
        "The metrics that say so: the gauges `meshid_sidecar_policy_rejected` and \
         `meshid_sidecar_credentials_rejected` (1 until a good file is applied; each check above \
         reads it during the fault and waits for 0 after the repair), and the counters \
         `meshid_sidecar_policy_reloads_total{result=\"rejected\"}` and \
         `meshid_sidecar_credential_updates_total{result=\"rejected\"}`."
            .into(),
    );
    let shown = |s: &SidecarProc| s.log().lines().filter(|l| l.contains("rejected")).count();
    r.notes.push(format!(
        "Log lines naming a rejection: A {}, B {} (one per new state of a file).",
        shown(&a),
        shown(&b)
    ));
    Ok(())
}

/// One fault on one file: (seconds until the rejection was counted, seconds until the repair was
/// applied).
async fn one_fault(
    r: &mut ScenarioReport,
    traffic: &Traffic,
    w: &Watched,
    fault: Fault,
    a: SocketAddr,
    b: SocketAddr,
) -> Result<(f64, f64)> {
    let label = format!("{} {}", w.target.name(), fault.name());
    let counter = w.target.counter();
    let rejected0 = admin_metric(a, counter, &[("result", "rejected")]).await;
    let applied0 = admin_metric(a, counter, &[("result", "applied")]).await;
    let t_fault = Instant::now();
    w.apply(fault)?;
    let detected = poll_until(
        Duration::from_secs(8),
        Duration::from_millis(20),
        || async move { admin_metric(a, counter, &[("result", "rejected")]).await > rejected0 },
    )
    .await;
    let Some(detected) = detected else {
        let _ = w.repair();
        bail!("{label}: no rejection counted within 8 s");
    };
    tokio::time::sleep(Duration::from_millis(500)).await;
    let (a_ready, b_ready) = (ready(a).await, ready(b).await);
    let gauge_name = w.target.gauge();
    let gauge = admin_metric(a, gauge_name, &[]).await;
    let t_repair = Instant::now();
    w.repair()?;
    let repaired = poll_until(
        Duration::from_secs(8),
        Duration::from_millis(20),
        || async move {
            admin_metric(a, counter, &[("result", "applied")]).await > applied0
                && admin_metric(a, gauge_name, &[]).await == 0.0
                && ready(b).await
        },
    )
    .await;
    let during = Tally::of(&sent_between(&traffic.snapshot(), t_fault, Instant::now()));
    let policy = w.target == Target::Policy;
    let readiness_ok = a_ready && if policy { !b_ready } else { b_ready };
    let metric_ok = gauge == 1.0;
    let ok = during.failed == 0 && readiness_ok && metric_ok && repaired.is_some();
    r.check(
        &format!("{label}: last good state kept, rejection counted, readiness as documented, repair applied"),
        ok,
        format!(
            "requests {}; rejected counted after {:.2} s; /readyz A {} B {}; {gauge_name} {gauge}; repair applied after {}",
            during.describe(),
            detected.as_secs_f64(),
            if a_ready { 200 } else { 503 },
            if b_ready { 200 } else { 503 },
            repaired.map_or("never (8 s)".into(), |d| format!("{:.2} s", d.as_secs_f64())),
        ),
    );
    let _ = t_repair;
    Ok((
        detected.as_secs_f64(),
        repaired.map_or(f64::NAN, |d| d.as_secs_f64()),
    ))
}
