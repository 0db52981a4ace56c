//! Scenario `ca-dir`: the CA directory full (a small tmpfs, filled) or read-only (mode a-w, the CA
//! running as an unprivileged user) during a rotation step and during a join-token redemption. The
//! step must fail with a clear error, leave every file of the directory as it was (no torn file, no
//! half-written leftover), the CA must keep serving its fleet, and once the fault is gone the step
//! must succeed and the join token must still be good.

use std::collections::BTreeMap;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};

use super::mesh::{CaProc, SidecarProc, outbound_args};
use super::{Env, ScenarioReport, SimFleet, poll_until, ready, running_as_root};
use crate::harness::free_addr;
use crate::harness::pki::SERVER_ID;
use crate::simsidecar::{SimConfig, SimStats};

const JOINER: &str = "spiffe://cluster.local/ns/chaos/sa/joiner";
const SIMS: usize = 20;

pub async fn run(env: &Env, mut r: ScenarioReport) -> (ScenarioReport, Result<()>) {
    r.setup = format!(
        "meshid-ca serve (10 s certificates) on a CA directory of its own, {SIMS} simulated \
         CA-mode sidecars renewing against it. Full: the directory is on a 2 MiB tmpfs, filled to \
         the last byte by a filler file, then `meshid-ca rotate intermediate` runs and a CA-mode \
         sidecar redeems a join token. Read-only: the directory tree loses its write permissions \
         (the CA and its commands run as an unprivileged user, for whom that binds), then \
         `meshid-ca rotate prepare` runs and a sidecar redeems another join token. Each time the \
         files (but the CA's own issuance marks) are compared byte for byte before and after, the \
         fault is removed, and the step is run again."
    );
    let result = scenario(env, &mut r).await;
    (r, result)
}

/// Every file under `dir` (but `issued/`, the CA's own marks, and the empty lock file the admin
/// commands take, which holds no state) and its bytes.
fn snapshot(dir: &Path) -> BTreeMap<PathBuf, Vec<u8>> {
    let mut out = BTreeMap::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        let Ok(entries) = std::fs::read_dir(&d) else {
            continue;
        };
        for e in entries.flatten() {
            let p = e.path();
            let rel = p.strip_prefix(dir).unwrap_or(&p).to_path_buf();
            if rel.starts_with("issued") || rel == Path::new(meshid_ca::ca_dir::LOCK_FILE) {
                continue;
            }
            if p.is_dir() {
                stack.push(p);
            } else {
                out.insert(rel, std::fs::read(&p).unwrap_or_default());
            }
        }
    }
    out
}

/// What differs between two snapshots, in words (empty: nothing).
fn differences(
    before: &BTreeMap<PathBuf, Vec<u8>>,
    after: &BTreeMap<PathBuf, Vec<u8>>,
) -> Vec<String> {
    let mut d = Vec::new();
    for (p, b) in before {
        match after.get(p) {
            None => d.push(format!("{} removed", p.display())),
            Some(a) if a != b => d.push(format!(
                "{} changed ({} -> {} bytes)",
                p.display(),
                b.len(),
                a.len()
            )),
            Some(_) => {}
        }
    }
    for (p, a) in after {
        if !before.contains_key(p) {
            d.push(format!("{} appeared ({} bytes)", p.display(), a.len()));
        }
    }
    d
}

/// A small tmpfs at `at`, owned by `user`; unmounted on drop.
struct Tmpfs(PathBuf);

impl Tmpfs {
    fn mount(env: &Env, at: &Path, user: Option<(u32, u32)>) -> Result<Self> {
        std::fs::create_dir_all(at)?;
        let (uid, gid) = user.unwrap_or((0, 0));
        let mut cmd = Command::new("mount");
        cmd.args(["-t", "tmpfs", "-o"])
            .arg(format!("size=2m,mode=0755,uid={uid},gid={gid}"))
            .arg("tmpfs")
            .arg(at);
        env.ctx.output(&mut cmd)?;
        Ok(Self(at.to_path_buf()))
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg(&self.0).status();
    }
}

/// Fills the filesystem of `dir` to the last byte; the filler's path.
fn fill(dir: &Path) -> Result<PathBuf> {
    use std::io::Write;
    let path = dir.join("filler");
    let mut f = std::fs::File::create(&path)?;
    let block = vec![0u8; 4096];
    loop {
        if f.write_all(&block).is_err() {
            break;
        }
    }
    // Whatever a page could not hold.
    loop {
        if f.write_all(&[0u8]).is_err() {
            break;
        }
    }
    let _ = f.sync_all();
    Ok(path)
}

/// Sets the write permission of everything under `dir` (and `dir`).
fn writable(dir: &Path, on: bool) -> Result<()> {
    let mut stack = vec![dir.to_path_buf()];
    while let Some(p) = stack.pop() {
        let meta = std::fs::symlink_metadata(&p)?;
        let mut mode = meta.permissions().mode();
        if on {
            mode |= 0o200;
        } else {
            mode &= !0o222;
        }
        std::fs::set_permissions(&p, std::fs::Permissions::from_mode(mode))?;
        if meta.is_dir() {
            for e in std::fs::read_dir(&p)?.flatten() {
                stack.push(e.path());
            }
        }
    }
    Ok(())
}

/// Failed CA calls of the fleet so far.
fn fleet_errors(stats: &[Arc<SimStats>]) -> u64 {
    stats.iter().map(|s| s.errors.load(Ordering::Relaxed)).sum()
}

/// A CA-mode sidecar (one outbound listener) bootstrapped with `token`.
fn joiner(env: &Env, ca: &CaProc, work: &Path, name: &str, token: &str) -> Result<SidecarProc> {
    let file = work.join(format!("{name}.join-token"));
    std::fs::write(&file, token)?;
    let mut args = outbound_args(free_addr(), free_addr(), SERVER_ID);
    args.extend([
        "--ca-addr".into(),
        ca.grpc.to_string(),
        "--ca-server-name".into(),
        "localhost".into(),
        "--ca-bundle".into(),
        work.join("ca-bundle.pem").display().to_string(),
        "--join-token-file".into(),
        file.display().to_string(),
    ]);
    SidecarProc::start(env, name, work, args, None)
}

/// The token `meshid-ca token create` printed.
fn token_of(out: &str) -> Result<String> {
    out.split_whitespace()
        .find(|w| w.starts_with("meshid-join-"))
        .map(str::to_owned)
        .context("no join token in the output of meshid-ca token create")
}

async fn scenario(env: &Env, r: &mut ScenarioReport) -> Result<()> {
    let work = env.ctx.dir("ca-dir")?;
    std::fs::set_permissions(&work, std::fs::Permissions::from_mode(0o755))?;
    let user = env.unprivileged;
    let tmpfs = match Tmpfs::mount(env, &work.join("mnt"), user) {
        Ok(t) => Some(t),
        Err(e) => {
            r.notes.push(format!(
                "The full-directory half was not run: no small filesystem could be mounted here ({e:#})."
            ));
            None
        }
    };
    let dir = match &tmpfs {
        Some(t) => t.0.join("ca"),
        None => {
            let d = work.join("cadir");
            std::fs::create_dir_all(&d)?;
            if let Some((uid, gid)) = user {
                std::os::unix::fs::chown(&d, Some(uid), Some(gid))?;
            }
            d
        }
    };
    let mut ca = CaProc::init_in(
        env,
        &dir,
        &work,
        &["--ttl", "10s", "--max-ttl", "10s"],
        user,
    )?;
    ca.serve(env).await?;
    std::fs::copy(ca.bundle(), work.join("ca-bundle.pem"))?;

    let endpoint = ca.endpoint()?;
    let fleet = SimFleet::start((0..SIMS).map(|i| SimConfig {
        endpoint: endpoint.clone(),
        token: ca.cluster.token("fleet", &format!("sidecar-{i}")),
        instance: format!("ca-dir-{i:03}"),
        jitter: 0.9 + 0.2 * (i as f64 / SIMS as f64),
        start_delay: Duration::from_millis(100 * i as u64),
    }));
    let stats = &fleet.stats;
    let joined = fleet.joined(Duration::from_secs(30)).await;
    if joined.is_none() {
        bail!("the simulated sidecars did not join within 30 s");
    }
    let dir_s = dir.display().to_string();
    let mut tokens = Vec::new();
    for _ in 0..2 {
        let (ok, out) = ca.cli(
            env,
            &[
                "token", "create", "--dir", &dir_s, "--id", JOINER, "--ttl", "10m",
            ],
        )?;
        if !ok {
            bail!("meshid-ca token create failed: {out}");
        }
        tokens.push(token_of(&out)?);
    }

    if let Some(t) = &tmpfs {
        let filler = fill(&t.0)?;
        fault_phase(
            env,
            r,
            &ca,
            &work,
            stats,
            "full",
            &["rotate", "intermediate", "--dir", &dir_s],
            &tokens[0],
            || std::fs::remove_file(&filler).context("removing the filler"),
        )
        .await?;
    }
    if user.is_none() && running_as_root() {
        r.notes.push(
            "The read-only half was not run: the harness runs as root without setpriv, and root \
             writes into a directory without write permissions."
                .into(),
        );
    } else {
        writable(&dir, false)?;
        let restore = dir.clone();
        fault_phase(
            env,
            r,
            &ca,
            &work,
            stats,
            "read-only",
            &["rotate", "prepare", "--dir", &dir_s],
            &tokens[1],
            move || writable(&restore, true),
        )
        .await?;
    }

    fleet.stop().await;
    drop(ca);
    drop(tmpfs);
    Ok(())
}

/// One fault (already in place): the step and a redemption while it lasts, then `repair` and both
/// again.
#[allow(clippy::too_many_arguments)]
async fn fault_phase(
    env: &Env,
    r: &mut ScenarioReport,
    ca: &CaProc,
    work: &Path,
    stats: &[Arc<SimStats>],
    fault: &str,
    step: &[&str],
    token: &str,
    repair: impl FnOnce() -> Result<()>,
) -> Result<()> {
    let step_name = format!("meshid-ca {}", step[..2].join(" "));
    println!("  CA directory {fault}: {step_name}, a join-token redemption");
    let errors0 = fleet_errors(stats);
    let t0 = Instant::now();
    let before = snapshot(&ca.dir);
    let (ok, out) = ca.cli(env, step)?;
    let first_line = out.lines().last().unwrap_or_default().to_owned();
    let after = snapshot(&ca.dir);
    let diff = differences(&before, &after);
    let mut sidecar = joiner(env, ca, work, &format!("joiner-{fault}"), token)?;
    tokio::time::sleep(Duration::from_secs(3)).await;
    let joined_during = ready(sidecar.admin).await;
    let redemption = differences(&after, &snapshot(&ca.dir));
    let ca_ready = ready(ca.admin).await;
    let during_errors = fleet_errors(stats) - errors0;
    let renewals: usize = stats
        .iter()
        .map(|s| s.renewals_between(t0, Instant::now()))
        .sum();
    let log = sidecar.log();
    let refusal = log
        .lines()
        .find(|l| l.contains("ERROR") || l.contains("WARN"))
        .map(|l| {
            l.split_once(": ")
                .map_or(l, |(_, m)| m)
                .chars()
                .take(300)
                .collect::<String>()
        })
        .unwrap_or_default();
    r.check(
        &format!("CA directory {fault}: {step_name} fails and says why"),
        !ok && !first_line.is_empty(),
        format!("exit {}; {first_line}", if ok { "0" } else { "non-zero" }),
    );
    r.check(
        &format!("CA directory {fault}: no file of the directory changed, none appeared (the CA's issuance marks and the admin commands' lock aside)"),
        diff.is_empty(),
        if diff.is_empty() { "identical".into() } else { diff.join("; ") },
    );
    r.check(
        &format!("CA directory {fault}: the CA stays ready and keeps renewing its fleet"),
        ca_ready && during_errors == 0 && renewals > 0,
        format!(
            "/readyz {}; {renewals} renewals, {during_errors} failed fleet calls",
            if ca_ready { 200 } else { 503 }
        ),
    );
    let torn: Vec<&String> = redemption
        .iter()
        .filter(|d| !d.contains(".json removed") && !d.contains(".used appeared"))
        .collect();
    r.check(
        &format!("CA directory {fault}: the join-token redemption tears nothing (the token's record is renamed whole, or left as it was)"),
        torn.is_empty(),
        if redemption.is_empty() { "nothing changed".into() } else { redemption.join("; ") },
    );
    r.notes.push(format!(
        "CA directory {fault}: `{step_name}` answered: {first_line}. The join-token sidecar {} within 3 s{}.",
        if joined_during { "got its certificate" } else { "got no certificate" },
        if refusal.is_empty() { String::new() } else { format!("; its log: {refusal}") }
    ));
    r.figure(
        &format!("CA directory {fault}: files changed or left behind"),
        diff.len() as f64,
        "",
    );
    r.figure(
        &format!("CA directory {fault}: failed fleet calls during the fault"),
        during_errors as f64,
        "",
    );

    repair()?;
    let (ok2, out2) = ca.cli(env, step)?;
    r.check(
        &format!("CA directory {fault}: once repaired, {step_name} succeeds"),
        ok2,
        out2.lines().last().unwrap_or_default().to_owned(),
    );
    let joined_after = poll_until(
        Duration::from_secs(15),
        Duration::from_millis(50),
        || async { ready(sidecar.admin).await },
    )
    .await;
    r.check(
        &format!("CA directory {fault}: the join token still works (the sidecar is ready once the directory is repaired)"),
        joined_during || joined_after.is_some(),
        match (joined_during, joined_after) {
            (true, _) => "redeemed during the fault".into(),
            (false, Some(d)) => format!("ready {:.2} s after the repair", d.as_secs_f64()),
            (false, None) => format!("not ready 15 s after the repair: {}", sidecar.log_tail()),
        },
    );
    let _ = sidecar.signal(env, "TERM");
    let _ = sidecar.wait_exit(Duration::from_secs(10));
    Ok(())
}
