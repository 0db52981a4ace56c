//! Scenario `signals`: SIGTERM to each sidecar of a pair under load (in-flight requests must all be
//! answered, the process must exit 0), then SIGKILL to the inbound one: what the client sees, and
//! how long until a restarted one serves again.

use std::time::{Duration, Instant};

use anyhow::{Result, bail};

use super::mesh::{
    SidecarProc, file_mode_args, inbound_args, outbound_args, policy_yaml, start_app,
};
use super::traffic::{Rec, Tally, Traffic, first_ok_after, in_flight_at, sent_between};
use super::{Env, ScenarioReport};
use crate::harness::free_addr;
use crate::harness::pki::{BenchPki, CLIENT_ID, SERVER_ID};

/// The app's answer time: long enough that every signal lands on requests in flight.
const APP_DELAY_MS: u64 = 50;
const CONNECTIONS: usize = 16;

pub async fn run(env: &Env, mut r: ScenarioReport) -> (ScenarioReport, Result<()>) {
    r.setup = format!(
        "A file-mode sidecar pair (outbound -> mTLS -> inbound) in front of bench-app answering \
         after {APP_DELAY_MS} ms; {CONNECTIONS} HTTP/1.1 keep-alive connections to the outbound \
         sidecar, each sending its next request as soon as the last one is answered. Each step \
         signals one sidecar, waits for it to exit, keeps the traffic going for half a second, then \
         starts the sidecar again with the same flags and waits until requests succeed for a second. \
         A request is in flight when it was sent before the signal and answered (or failed) after it."
    );
    let result = scenario(env, &mut r).await;
    (r, result)
}

/// One signal and its aftermath.
struct Step {
    name: &'static str,
    sig: &'static str,
    signalled: Instant,
    exited: Instant,
    exit_code: Option<i32>,
    restarted: Instant,
    ready_after: Duration,
}

async fn scenario(env: &Env, r: &mut ScenarioReport) -> Result<()> {
    let work = env.ctx.dir("signals")?;
    let pki = BenchPki::new()?;
    let (_app, app) = start_app(env, &work, APP_DELAY_MS)?;
    let (inb, local) = (free_addr(), free_addr());
    let policy = work.join("policy.yaml");
    std::fs::write(&policy, policy_yaml(&[inb.port()], CLIENT_ID))?;
    let mut args = inbound_args(inb, app, &policy);
    args.extend(file_mode_args(
        &pki.server.cert,
        &pki.server.key,
        &pki.bundle,
    ));
    let mut inbound = SidecarProc::start(env, "inbound", &work, args, None)?;
    let mut args = outbound_args(local, inb, SERVER_ID);
    args.extend(file_mode_args(
        &pki.client.cert,
        &pki.client.key,
        &pki.bundle,
    ));
    let mut outbound = SidecarProc::start(env, "outbound", &work, args, None)?;
    inbound.wait_ready(Duration::from_secs(15)).await?;
    outbound.wait_ready(Duration::from_secs(15)).await?;

    let t_start = Instant::now();
    let traffic = Traffic::start(local, CONNECTIONS, Duration::ZERO);
    settle(&traffic).await?;
    let mut steps = Vec::new();
    for (name, sig) in [
        ("inbound", "TERM"),
        ("outbound", "TERM"),
        ("inbound", "KILL"),
    ] {
        let sidecar = if name == "inbound" {
            &mut inbound
        } else {
            &mut outbound
        };
        println!("  SIG{sig} to the {name} sidecar");
        let signalled = Instant::now();
        sidecar.signal(env, sig)?;
        let exit_code = sidecar.wait_exit(Duration::from_secs(30))?;
        let exited = Instant::now();
        // What a client sees while the sidecar is gone.
        tokio::time::sleep(Duration::from_millis(500)).await;
        let restarted = Instant::now();
        sidecar.spawn(env)?;
        let ready_after = sidecar.wait_ready(Duration::from_secs(15)).await?;
        steps.push(Step {
            name,
            sig,
            signalled,
            exited,
            exit_code,
            restarted,
            ready_after,
        });
        settle(&traffic).await?;
    }
    let recs = traffic.stop().await;
    let before = Tally::of(&sent_between(&recs, t_start, steps[0].signalled));
    r.figure(
        "requests before the first signal (baseline, from the first request)",
        before.total() as f64,
        "",
    );
    r.figure(
        "requests failed before the first signal",
        before.failed as f64,
        "",
    );
    for s in &steps {
        report_step(r, s, &recs);
    }
    Ok(())
}

/// Waits until requests have succeeded for a whole second with none failing.
async fn settle(traffic: &Traffic) -> Result<()> {
    let t0 = Instant::now();
    let mut clean_since = Instant::now();
    while t0.elapsed() < Duration::from_secs(20) {
        tokio::time::sleep(Duration::from_millis(100)).await;
        let recs = traffic.snapshot();
        let recent = Tally::of(&sent_between(&recs, clean_since, Instant::now()));
        if recent.failed > 0 {
            clean_since = Instant::now();
        } else if clean_since.elapsed() >= Duration::from_secs(1) && recent.ok > 0 {
            return Ok(());
        }
    }
    bail!("traffic through the pair did not settle (requests still failing after 20 s)")
}

fn report_step(r: &mut ScenarioReport, s: &Step, recs: &[Rec]) {
    let label = format!("SIG{} {}", s.sig, s.name);
    let in_flight = Tally::of(&in_flight_at(recs, s.signalled));
    let gone = Tally::of(&sent_between(recs, s.signalled, s.restarted));
    let first_ok = first_ok_after(recs, s.restarted);
    let back = sent_between(
        recs,
        s.restarted,
        s.restarted + s.ready_after + Duration::from_secs(1),
    );
    let exit = match s.exit_code {
        Some(c) => format!("exit code {c}"),
        None => "killed by a signal".into(),
    };
    let shutdown = s
        .exited
        .saturating_duration_since(s.signalled)
        .as_secs_f64();
    if s.sig == "TERM" {
        r.figure_target(
            &format!("{label}: in-flight requests failed"),
            in_flight.failed as f64,
            "",
            "0",
        );
    } else {
        r.figure(
            &format!("{label}: in-flight requests failed"),
            in_flight.failed as f64,
            "",
        );
    }
    r.figure(
        &format!("{label}: requests in flight at the signal"),
        in_flight.total() as f64,
        "",
    );
    r.figure(&format!("{label}: signal to exit"), shutdown, "s");
    r.figure(
        &format!("{label}: requests sent after the signal, before the restart"),
        gone.total() as f64,
        "",
    );
    r.figure(&format!("{label}: of which failed"), gone.failed as f64, "");
    r.figure(
        &format!("{label}: restart to /readyz 200"),
        s.ready_after.as_secs_f64(),
        "s",
    );
    if let Some(ok) = first_ok {
        r.figure(
            &format!("{label}: restart to the first request served"),
            ok.saturating_duration_since(s.restarted).as_secs_f64(),
            "s",
        );
        r.figure(
            &format!("{label}: signal to the first request served again"),
            ok.saturating_duration_since(s.signalled).as_secs_f64(),
            "s",
        );
    }
    r.notes.push(format!(
        "{label}: {exit} after {shutdown:.3} s; in flight at the signal: {}; sent while it was gone: {}; \
         in the first second after the restart: {}.",
        in_flight.describe(),
        gone.describe(),
        Tally::of(&back).describe()
    ));
    if s.sig == "TERM" {
        r.check(
            &format!("{label}: every request in flight at the signal is answered"),
            in_flight.failed == 0 && in_flight.total() > 0,
            in_flight.describe(),
        );
        r.check(
            &format!("{label}: the sidecar exits 0"),
            s.exit_code == Some(0),
            exit,
        );
    }
    r.check(
        &format!("{label}: a restarted sidecar serves again"),
        first_ok.is_some(),
        format!(
            "first request served {:?} after the restart",
            first_ok.map(|t| t.saturating_duration_since(s.restarted))
        ),
    );
}
