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
/// The signals of one round, in order: (sidecar, signal).
const KINDS: [(&str, &str); 3] = [
    ("inbound", "TERM"),
    ("outbound", "TERM"),
    ("inbound", "KILL"),
];

pub async fn run(env: &Env, mut r: ScenarioReport) -> (ScenarioReport, Result<()>) {
    r.setup = format!(
        "A file-mode sidecar pair (outbound -> mTLS -> inbound) in front of bench-app answering \
         after {APP_DELAY_MS} ms; {CONNECTIONS} HTTP/1.1 keep-alive connections to the outbound \
         sidecar, each sending its next request as soon as the last one is answered. Each step \
         signals one sidecar, waits for it to exit, keeps the traffic going for half a second, then \
         starts the sidecar again with the same flags and waits until requests succeed for a second. \
         A round signals SIGTERM to the inbound sidecar, SIGTERM to the outbound one, SIGKILL to the inbound one; the full run does five rounds, --smoke one. A request is in flight when it was sent before the signal and answered (or failed) after it."
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
    let rounds = if env.smoke { 1 } else { 5 };
    for (name, sig) in std::iter::repeat_n(KINDS, rounds).flatten() {
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
    r.figure("rounds (each signal once per round)", rounds as f64, "");
    for (name, sig) in KINDS {
        let of_kind: Vec<&Step> = steps
            .iter()
            .filter(|s| s.name == name && s.sig == sig)
            .collect();
        report_kind(r, &of_kind, &recs);
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

/// The largest of some durations, in seconds.
fn max_s(v: impl IntoIterator<Item = Duration>) -> f64 {
    v.into_iter().map(|d| d.as_secs_f64()).fold(0.0, f64::max)
}

/// Every round of one signal to one sidecar, summed (requests) or at their worst (times).
fn report_kind(r: &mut ScenarioReport, steps: &[&Step], recs: &[Rec]) {
    let Some(first) = steps.first() else { return };
    let label = format!("SIG{} {}", first.sig, first.name);
    let mut in_flight = Vec::new();
    let mut gone = Vec::new();
    let mut first_ok = Vec::new();
    for s in steps {
        in_flight.extend(in_flight_at(recs, s.signalled));
        gone.extend(sent_between(recs, s.signalled, s.restarted));
        first_ok.push(first_ok_after(recs, s.restarted));
        let back = sent_between(
            recs,
            s.restarted,
            s.restarted + s.ready_after + Duration::from_secs(1),
        );
        let exit = s
            .exit_code
            .map_or("killed by a signal".into(), |c| format!("exit code {c}"));
        r.notes.push(format!(
            "{label}: {exit} after {:.3} s; in flight at the signal: {}; sent while it was gone: {}; \
             in the first second after the restart: {}.",
            s.exited.saturating_duration_since(s.signalled).as_secs_f64(),
            Tally::of(&in_flight_at(recs, s.signalled)).describe(),
            Tally::of(&sent_between(recs, s.signalled, s.restarted)).describe(),
            Tally::of(&back).describe()
        ));
    }
    let in_flight = Tally::of(&in_flight);
    let gone = Tally::of(&gone);
    if first.sig == "TERM" {
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
        &format!("{label}: requests in flight at the signals"),
        in_flight.total() as f64,
        "",
    );
    r.figure(
        &format!("{label}: signal to exit (slowest)"),
        max_s(
            steps
                .iter()
                .map(|s| s.exited.saturating_duration_since(s.signalled)),
        ),
        "s",
    );
    r.figure(
        &format!("{label}: requests sent after the signal, before the restart"),
        gone.total() as f64,
        "",
    );
    r.figure(&format!("{label}: of which failed"), gone.failed as f64, "");
    r.figure(
        &format!("{label}: restart to /readyz 200 (slowest)"),
        max_s(steps.iter().map(|s| s.ready_after)),
        "s",
    );
    let served = first_ok.iter().all(Option::is_some);
    if served {
        r.figure(
            &format!("{label}: restart to the first request served (slowest)"),
            max_s(
                steps
                    .iter()
                    .zip(&first_ok)
                    .filter_map(|(s, ok)| ok.map(|t| t.saturating_duration_since(s.restarted))),
            ),
            "s",
        );
        r.figure(
            &format!("{label}: signal to the first request served again (slowest)"),
            max_s(
                steps
                    .iter()
                    .zip(&first_ok)
                    .filter_map(|(s, ok)| ok.map(|t| t.saturating_duration_since(s.signalled))),
            ),
            "s",
        );
    }
    if first.sig == "TERM" {
        r.check(
            &format!("{label}: every request in flight at the signal is answered"),
            in_flight.failed == 0 && in_flight.total() > 0,
            in_flight.describe(),
        );
        let codes: Vec<Option<i32>> = steps.iter().map(|s| s.exit_code).collect();
        r.check(
            &format!("{label}: the sidecar exits 0"),
            codes.iter().all(|c| *c == Some(0)),
            format!("exit codes {codes:?}"),
        );
    }
    r.check(
        &format!("{label}: a restarted sidecar serves again"),
        served,
        format!("after {} restart(s)", steps.len()),
    );
}
