//! Scenario `clock-steps`: the wall clock seen by one sidecar stepped 5 minutes back, 5 minutes
//! forward, and past its certificate's whole lifetime, while traffic flows through the pair.
//!
//! The machine's clock cannot be stepped under a running suite, so each sidecar runs under
//! libfaketime (`LD_PRELOAD`, Debian's `libfaketime`): its wall clock (`CLOCK_REALTIME`: what
//! certificate checks and renewal deadlines read) is the real one plus the offset written to a file
//! of its own, read again every second; its monotonic clock (timers) is left alone, as a real clock
//! step leaves it. The CA and the other sidecar keep the real time.
//!
//! What must hold, for each sidecar in turn:
//! - **5 minutes back**: it keeps serving, stays ready, takes a restarted peer's fresh certificate
//!   and, restarted itself, its own fresh one (the CA backdates not-before by 5 minutes).
//! - **5 minutes forward**: it keeps serving, and renews within seconds when the step put its
//!   certificate past its renewal point (renewal keeps to the wall clock, as validity does).
//! - **Past the certificate's lifetime**: it fails closed (readiness drops, no new handshake
//!   completes on the inbound), asks the CA again at a bounded rate (every certificate it gets looks
//!   expired), logs that its clock disagrees with the CA's, and serves again within seconds once
//!   its clock is right.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{Context, Result};

use super::ca_outage::{long_lived_client, served};
use super::mesh::{CaPair, SidecarProc};
use super::traffic::{Tally, Traffic, first_ok_after, sent_between};
use super::{Env, ScenarioReport, admin_metric, poll_until, ready};

/// Sizes of a run.
pub struct Params {
    /// Certificate lifetime: long enough that a peer's certificate, renewed at half of it, still has
    /// more than 5 minutes left (what a clock 5 minutes ahead needs), short enough that a 5-minute
    /// step puts a fresh certificate past its renewal point (at most 55% of it).
    pub ttl: Duration,
    /// How long traffic is watched after each step.
    pub window: Duration,
    /// Which sidecars get their clock stepped, in turn.
    pub sides: Vec<Side>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Side {
    Inbound,
    Outbound,
}

impl Params {
    pub fn new(smoke: bool) -> Self {
        Self {
            ttl: Duration::from_secs(540),
            window: Duration::from_secs(if smoke { 3 } else { 8 }),
            sides: if smoke {
                vec![Side::Inbound]
            } else {
                vec![Side::Inbound, Side::Outbound]
            },
        }
    }
}

/// The step back and forward the issue names.
const STEP: i64 = 300;
/// How soon a step must be seen: libfaketime reads the offset file again every second, and the
/// sidecar looks at the wall clock during a wait every 5 s (`meshid_runtime::time::WALL_CLOCK_CHECK`);
/// the rest is slack for a busy machine.
const SEEN_WITHIN: Duration = Duration::from_secs(20);

pub async fn run(env: &Env, p: &Params, mut r: ScenarioReport) -> (ScenarioReport, Result<()>) {
    r.setup = format!(
        "meshid-ca serve (real clock) with {ttl} s certificates; a CA-mode sidecar pair in front of \
         bench-app, each sidecar under libfaketime (LD_PRELOAD of Debian's libfaketimeMT, \
         FAKETIME_TIMESTAMP_FILE read again every second, DONT_FAKE_MONOTONIC=1: only the wall \
         clock moves, timers keep the real monotonic clock), with 4 connections of traffic through \
         the outbound sidecar (each sends a request, waits for the answer, pauses 20 ms). For {sides} \
         in turn: its clock is stepped 5 minutes back (traffic watched for {w} s, then the other \
         sidecar restarted, then this one restarted: fresh certificates on both ends under the \
         stepped clock), 5 minutes forward (its certificate is then past its renewal point by its \
         clock), and past its certificate's whole lifetime ({over} s ahead), then back to the real \
         time. The {ttl} s lifetime stands in for the 1 h default: renewed at half of it a \
         certificate still has more than 5 minutes left, so a clock 5 minutes ahead still takes \
         it, as with 1 h certificates.",
        ttl = p.ttl.as_secs(),
        w = p.window.as_secs(),
        over = p.ttl.as_secs() + 60,
        sides = p
            .sides
            .iter()
            .map(|s| match s {
                Side::Inbound => "the inbound sidecar",
                Side::Outbound => "the outbound sidecar",
            })
            .collect::<Vec<_>>()
            .join(", then ")
    );
    let result = scenario(env, p, &mut r).await;
    (r, result)
}

/// libfaketime's multithreaded build, wherever Debian put it for this architecture.
fn faketime_lib() -> Option<PathBuf> {
    let lib = Path::new("/usr/lib");
    std::fs::read_dir(lib)
        .ok()?
        .filter_map(|e| e.ok())
        .map(|e| e.path().join("faketime/libfaketimeMT.so.1"))
        .chain([lib.join("faketime/libfaketimeMT.so.1")])
        .find(|p| p.exists())
}

/// One sidecar's wall clock: the real one plus the offset in a file of its own.
struct Clock {
    who: String,
    file: PathBuf,
    lib: PathBuf,
}

impl Clock {
    fn new(dir: &Path, who: &str, lib: &Path) -> Result<Self> {
        let c = Self {
            who: who.into(),
            file: dir.join(format!("{who}.clock")),
            lib: lib.to_path_buf(),
        };
        std::fs::write(&c.file, "+0\n")?;
        Ok(c)
    }

    fn vars(&self) -> Vec<(String, String)> {
        vec![
            ("LD_PRELOAD".into(), self.lib.display().to_string()),
            (
                "FAKETIME_TIMESTAMP_FILE".into(),
                self.file.display().to_string(),
            ),
            ("FAKETIME_CACHE_DURATION".into(), "1".into()),
            ("DONT_FAKE_MONOTONIC".into(), "1".into()),
        ]
    }

    /// Sets the offset from the real time (replaced atomically, recorded as a command).
    fn set(&self, env: &Env, offset: i64) -> Result<()> {
        let text = format!("{offset:+}");
        let tmp = self.file.with_extension("tmp");
        std::fs::write(&tmp, format!("{text}\n"))?;
        std::fs::rename(&tmp, &self.file)?;
        env.ctx.commands.borrow_mut().push(format!(
            "echo {text} > {}  # {}'s wall clock, {text} s from the real time",
            self.file.display(),
            self.who
        ));
        Ok(())
    }
}

/// `meshid_sidecar_renewals_total{result}`: `success` or `failure`.
async fn renewal_count(admin: std::net::SocketAddr, result: &str) -> f64 {
    admin_metric(
        admin,
        "meshid_sidecar_renewals_total",
        &[("result", result)],
    )
    .await
}

/// Samples `/readyz` every 200 ms for `d`: (samples, samples not 200).
async fn readiness_over(admin: std::net::SocketAddr, d: Duration) -> (u32, u32) {
    let t0 = Instant::now();
    let (mut n, mut bad) = (0, 0);
    while t0.elapsed() < d {
        n += 1;
        if !ready(admin).await {
            bad += 1;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    (n, bad)
}

/// Requests sent in `[from, to)`, once they have ended.
async fn settled(traffic: &Traffic, from: Instant, to: Instant) -> Tally {
    tokio::time::sleep(Duration::from_millis(500)).await;
    Tally::of(&sent_between(&traffic.snapshot(), from, to))
}

async fn scenario(env: &Env, p: &Params, r: &mut ScenarioReport) -> Result<()> {
    let lib = faketime_lib().context(
        "libfaketime not found (Debian package libfaketime; scripts/install-test-tools.sh installs it)",
    )?;
    let work = env.ctx.dir("clock-steps")?;
    let ttl = format!("{}s", p.ttl.as_secs());
    let in_clock = Clock::new(&work, "inbound", &lib)?;
    let out_clock = Clock::new(&work, "outbound", &lib)?;
    let pair = CaPair::start_with_env(
        env,
        &work,
        &["--ttl", &ttl, "--max-ttl", &ttl],
        [in_clock.vars(), out_clock.vars()],
    )
    .await?;
    let CaPair {
        ca,
        mut inbound,
        mut outbound,
        local,
        inbound_addr: inb,
        ..
    } = pair;
    let client = long_lived_client(&ca.dir, &work)?;

    let traffic = Traffic::start(local, 4, Duration::from_millis(20));
    let t0 = Instant::now();
    let first = poll_until(
        Duration::from_secs(10),
        Duration::from_millis(50),
        || async { first_ok_after(&traffic.snapshot(), t0).is_some() },
    )
    .await;
    r.check(
        "traffic flows through the pair before any step",
        first.is_some(),
        format!("first request served after {first:?}"),
    );

    for side in &p.sides {
        let (stepped, peer, clock) = match side {
            Side::Inbound => (&mut inbound, &mut outbound, &in_clock),
            Side::Outbound => (&mut outbound, &mut inbound, &out_clock),
        };
        one_side(env, p, r, &traffic, stepped, peer, clock, inb, &client).await?;
    }

    let recs = traffic.stop().await;
    r.figure("requests in all", recs.len() as f64, "");
    Ok(())
}

/// Restarts `s` (SIGTERM, exit, start) and waits until requests are served again: the time from
/// the start to the first request served, and the requests sent in `window` after that one.
async fn restart(
    env: &Env,
    s: &mut SidecarProc,
    traffic: &Traffic,
    window: Duration,
) -> Result<(Option<Duration>, Tally, String)> {
    s.signal(env, "TERM")?;
    s.wait_exit(Duration::from_secs(10))?;
    s.spawn(env)?;
    let t = Instant::now();
    let ready = s.wait_ready(SEEN_WITHIN).await;
    let served = poll_until(SEEN_WITHIN, Duration::from_millis(50), || async {
        first_ok_after(&traffic.snapshot(), t).is_some()
    })
    .await;
    let Some(first) = first_ok_after(&traffic.snapshot(), t) else {
        let why = match ready {
            Ok(_) => "ready, but no request served".to_owned(),
            Err(e) => format!("{e:#}"),
        };
        return Ok((None, Tally::default(), why));
    };
    tokio::time::sleep(window).await;
    let after = settled(traffic, first, first + window).await;
    Ok((served.map(|_| first - t), after, String::new()))
}

#[allow(clippy::too_many_arguments)]
async fn one_side(
    env: &Env,
    p: &Params,
    r: &mut ScenarioReport,
    traffic: &Traffic,
    stepped: &mut SidecarProc,
    peer: &mut SidecarProc,
    clock: &Clock,
    inb: std::net::SocketAddr,
    client: &crate::tlsconf::TlsOptions,
) -> Result<()> {
    let who = stepped.name.clone();
    let other = peer.name.clone();
    println!("  -- {who}'s clock");

    // 5 minutes back.
    clock.set(env, -STEP)?;
    tokio::time::sleep(Duration::from_secs(2)).await;
    let from = Instant::now();
    let (n, not_ready) = readiness_over(stepped.admin, p.window).await;
    let tally = settled(traffic, from, Instant::now()).await;
    r.figure(
        &format!("{who} 5 min back: requests failed"),
        tally.failed as f64,
        "",
    );
    r.check(
        &format!("{who} 5 min back: every request is served"),
        tally.failed == 0 && tally.ok > 0,
        tally.describe(),
    );
    r.check(
        &format!("{who} 5 min back: /readyz stays 200"),
        not_ready == 0,
        format!("{not_ready} of {n} samples not 200"),
    );
    let (to_served, after, why) = restart(env, peer, traffic, p.window).await?;
    if let Some(d) = to_served {
        r.figure(
            &format!("{who} 5 min back: {other} restarted (fresh certificate), start to the first request served"),
            d.as_secs_f64(),
            "s",
        );
    }
    r.check(
        &format!("{who} 5 min back: a restarted {other}'s fresh certificate is taken, and every request after the first one is served"),
        to_served.is_some() && after.failed == 0,
        if why.is_empty() { after.describe() } else { why },
    );
    let (to_served, after, why) = restart(env, stepped, traffic, p.window).await?;
    if let Some(d) = to_served {
        r.figure(
            &format!("{who} 5 min back: {who} restarted (fresh certificate under the stepped clock), start to the first request served"),
            d.as_secs_f64(),
            "s",
        );
    }
    r.check(
        &format!("{who} 5 min back: restarted, it takes its own fresh certificate and serves every request after the first one"),
        to_served.is_some() && after.failed == 0,
        if why.is_empty() { after.describe() } else { why },
    );

    // 5 minutes forward: the certificate it just got (at most 55% of its lifetime before renewal)
    // is past its renewal point by this clock.
    let before = renewal_count(stepped.admin, "success").await;
    clock.set(env, STEP)?;
    let from = Instant::now();
    let renewed = poll_until(SEEN_WITHIN, Duration::from_millis(200), || async {
        renewal_count(stepped.admin, "success").await > before
    })
    .await;
    if let Some(d) = renewed {
        r.figure(
            &format!("{who} 5 min forward: step to the renewal it brought forward"),
            d.as_secs_f64(),
            "s",
        );
    }
    r.check(
        &format!(
            "{who} 5 min forward: it renews within {} s (its certificate is past its renewal point by its clock)",
            SEEN_WITHIN.as_secs()
        ),
        renewed.is_some(),
        format!("renewed after {renewed:?}"),
    );
    let (n, not_ready) = readiness_over(stepped.admin, p.window).await;
    let tally = settled(traffic, from, Instant::now()).await;
    r.figure(
        &format!("{who} 5 min forward: requests failed"),
        tally.failed as f64,
        "",
    );
    r.check(
        &format!("{who} 5 min forward: every request is served"),
        tally.failed == 0 && tally.ok > 0,
        tally.describe(),
    );
    r.check(
        &format!("{who} 5 min forward: /readyz stays 200"),
        not_ready == 0,
        format!("{not_ready} of {n} samples not 200"),
    );

    // Past the whole lifetime: every certificate, even one the CA issues now, has expired by this
    // clock.
    let over = i64::try_from(p.ttl.as_secs()).unwrap_or(i64::MAX) + 60;
    let failures_at_step = renewal_count(stepped.admin, "failure").await;
    clock.set(env, over)?;
    let dropped = poll_until(SEEN_WITHIN, Duration::from_millis(100), || async {
        !ready(stepped.admin).await
    })
    .await;
    r.check(
        &format!("{who} {over} s forward (past the lifetime): /readyz stops answering 200"),
        dropped.is_some(),
        format!("not ready after {dropped:?}"),
    );
    if stepped.name == "inbound" {
        let fresh = served(inb, client).await;
        r.check(
            "inbound past the lifetime: a new client (valid certificate) is not served",
            fresh.is_err(),
            format!("{fresh:?}"),
        );
    }
    // The issuer sees the step within `WALL_CLOCK_CHECK` (5 s) plus libfaketime's 1 s cache. Its
    // first retries come fast (a backoff from 100 ms: at most 3.1 s for the first five waits);
    // then at least every 1.6 s, and from the seventh at least every 2.5 s (and at most every
    // 5 s), the pace of a sidecar holding no valid certificate. The count starts once the backoff
    // has grown, from the first failure, wherever the step fell in the issuer's 5 s check.
    let looking = Instant::now();
    let first_failure = looking
        + poll_until(
            Duration::from_secs(15),
            Duration::from_millis(50),
            || async { renewal_count(stepped.admin, "failure").await > failures_at_step },
        )
        .await
        .unwrap_or(Duration::from_secs(15));
    tokio::time::sleep(Duration::from_millis(3500).saturating_sub(first_failure.elapsed())).await;
    let failures_before = renewal_count(stepped.admin, "failure").await;
    let watch = Duration::from_secs(10);
    tokio::time::sleep(watch).await;
    let attempts = renewal_count(stepped.admin, "failure").await - failures_before;
    r.figure(
        &format!(
            "{who} past the lifetime: failed renewals in {} s, from 3.5 s after the first",
            watch.as_secs()
        ),
        attempts,
        "",
    );
    r.check(
        &format!(
            "{who} past the lifetime: keeps asking the CA, no more often than every 1.5 s once its backoff grew"
        ),
        attempts >= 1.0 && attempts <= watch.as_secs_f64() / 1.5,
        format!("{attempts} failed renewals in {watch:?}"),
    );
    let log = stepped.log();
    r.check(
        &format!("{who} past the lifetime: its log says its clock disagrees with the CA's"),
        log.contains("not valid by this machine's clock"),
        log.lines()
            .rev()
            .find(|l| l.contains("certificate"))
            .unwrap_or("no certificate line in the log")
            .chars()
            .take(300)
            .collect::<String>(),
    );

    // Back to the real time.
    clock.set(env, 0)?;
    let back = Instant::now();
    let ready_again = poll_until(SEEN_WITHIN, Duration::from_millis(100), || async {
        ready(stepped.admin).await
    })
    .await;
    let served_again = poll_until(SEEN_WITHIN, Duration::from_millis(50), || async {
        first_ok_after(&traffic.snapshot(), back).is_some()
    })
    .await;
    r.figure(
        &format!("{who} past the lifetime, then clock right again: to /readyz 200"),
        ready_again.map_or(f64::NAN, |d| d.as_secs_f64()),
        "s",
    );
    r.check(
        &format!(
            "{who}: clock right again, it is ready and serves within {} s",
            SEEN_WITHIN.as_secs()
        ),
        ready_again.is_some() && served_again.is_some(),
        format!("ready after {ready_again:?}, first request served after {served_again:?}"),
    );
    // Let both ends settle before the next side.
    tokio::time::sleep(Duration::from_secs(1)).await;
    Ok(())
}
