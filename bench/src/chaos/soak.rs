//! Scenario `soak`: a CA-mode sidecar pair at half of its saturation throughput for a long time
//! (30 minutes by default) with certificates that renew about every minute, the CA and both sidecars
//! sampled every few seconds: resident memory and open file descriptors from `/proc`, live tokio
//! tasks from each process's `runtime_alive_tasks` gauge. What must hold: no request fails, and
//! none of the three grows: the slope per hour after a warm-up (least squares) stays under a bound a
//! leak would exceed, and descriptors and tasks end where they started.

use std::time::{Duration, Instant};

use anyhow::{Result, bail};

use super::mesh::CaPair;
use super::rotations::{CONNECTIONS, IdentityWatch};
use super::traffic::{Pace, Traffic};
use super::{Env, ScenarioReport, admin_get, metric};
use crate::procfs;

/// Sizes of a run.
pub struct Params {
    pub soak: Duration,
    pub ttl: Duration,
    pub sample_every: Duration,
    /// Samples before this are not judged (connections, pools and allocator arenas fill up).
    pub warmup: Duration,
    /// How long saturation is measured before the soak.
    pub saturation: Duration,
}

impl Params {
    /// `minutes`: the soak's length (default: 30, or 0.5 with `smoke`).
    pub fn new(smoke: bool, minutes: Option<f64>) -> Self {
        let soak =
            Duration::from_secs_f64(60.0 * minutes.unwrap_or(if smoke { 0.5 } else { 30.0 }));
        if smoke {
            Self {
                soak,
                ttl: Duration::from_secs(15),
                sample_every: Duration::from_secs(2),
                warmup: (soak / 5).min(Duration::from_secs(15)),
                saturation: Duration::from_secs(4),
            }
        } else {
            Self {
                soak,
                ttl: Duration::from_secs(120),
                sample_every: Duration::from_secs(5),
                warmup: (soak / 10).min(Duration::from_secs(180)),
                saturation: Duration::from_secs(10),
            }
        }
    }
}

/// At rest (traffic stopped, its connections closed), a process's descriptor and task counts at the
/// end may exceed those after the warm-up by this much: a renewal just then may hold a connection
/// being retired. Under load the counts follow the requests in flight, so they are not compared.
const COUNT_SLACK: f64 = 4.0;
/// How long after the traffic stops a process counts as at rest.
const AT_REST: Duration = Duration::from_secs(3);
/// Resident memory may grow by at most this per hour after the warm-up: a leak of one byte per
/// request at the soak's rate (thousands of requests per second) exceeds it several times over.
const RSS_SLOPE_MIB_PER_HOUR: f64 = 16.0;
/// Growth below this (median of the last fifth over that of the first) is allocator noise, too
/// small to call a slope in a short soak.
const RSS_NOISE_MIB: f64 = 2.0;

pub async fn run(env: &Env, p: &Params, mut r: ScenarioReport) -> (ScenarioReport, Result<()>) {
    r.setup = format!(
        "meshid-ca serve with {ttl} s certificates (each sidecar renews at about half the \
         lifetime, every {half} s); a CA-mode sidecar pair (service-account token files) in front of \
         bench-app. First {sat} s of saturation ({CONNECTIONS} HTTP/1.1 keep-alive connections into \
         the outbound sidecar, each sending its next request as soon as the last one is answered) \
         measure the pair's throughput; then the same {CONNECTIONS} connections send half of it on a \
         fixed schedule for {soak:.0} s. The CA and both sidecars are sampled every {every} s: \
         resident memory (`/proc/PID/smaps_rollup`), open file descriptors (`/proc/PID/fd`) and live \
         tokio tasks (`meshid_ca_runtime_alive_tasks`, `meshid_sidecar_runtime_alive_tasks`). Slopes \
         are least-squares fits over the samples after a {warm} s warm-up; \"start\" and \"end\" \
         are medians of the first and last fifth of those samples. The traffic stops for a moment \
         after the warm-up and at the end: {rest} s later, with its connections closed and no \
         request in flight, each process is sampled at rest, and those two samples are compared \
         (under load, task counts follow the requests in flight).",
        ttl = p.ttl.as_secs(),
        half = p.ttl.as_secs() / 2,
        sat = p.saturation.as_secs(),
        soak = p.soak.as_secs_f64(),
        every = p.sample_every.as_secs(),
        warm = p.warmup.as_secs(),
        rest = AT_REST.as_secs(),
    );
    let result = scenario(env, p, &mut r).await;
    (r, result)
}

/// One process being watched.
struct Watched {
    name: &'static str,
    pid: u32,
    admin: std::net::SocketAddr,
    tasks_metric: &'static str,
}

/// One sample of one process.
#[derive(Debug, Clone, Copy)]
struct Sample {
    /// Seconds since the soak's traffic started.
    t: f64,
    rss_mib: f64,
    fds: f64,
    tasks: f64,
}

async fn sample(w: &Watched, t: f64) -> Result<Sample> {
    let rss_mib = procfs::mem(w.pid)?.rss_kib as f64 / 1024.0;
    let fds = procfs::fd_count(w.pid)? as f64;
    let tasks = match admin_get(w.admin, "/metrics").await {
        Ok((200, body)) => metric(&body, w.tasks_metric, &[]),
        _ => None,
    };
    let Some(tasks) = tasks else {
        bail!("{}: no {} on its /metrics", w.name, w.tasks_metric);
    };
    Ok(Sample {
        t,
        rss_mib,
        fds,
        tasks,
    })
}

/// Least-squares slope of `(x, y)` points (0 with fewer than two distinct x).
pub fn slope(points: &[(f64, f64)]) -> f64 {
    let n = points.len() as f64;
    if points.len() < 2 {
        return 0.0;
    }
    let (sx, sy) = points
        .iter()
        .fold((0.0, 0.0), |(a, b), (x, y)| (a + x, b + y));
    let (mx, my) = (sx / n, sy / n);
    let (num, den) = points.iter().fold((0.0, 0.0), |(num, den), (x, y)| {
        (num + (x - mx) * (y - my), den + (x - mx) * (x - mx))
    });
    if den == 0.0 { 0.0 } else { num / den }
}

/// The median of some values (NaN when there are none).
fn median(mut v: Vec<f64>) -> f64 {
    if v.is_empty() {
        return f64::NAN;
    }
    v.sort_by(f64::total_cmp);
    let m = v.len() / 2;
    if v.len() % 2 == 1 {
        v[m]
    } else {
        (v[m - 1] + v[m]) / 2.0
    }
}

/// What one series did after the warm-up.
#[derive(Debug, Clone, Copy, PartialEq)]
struct Trend {
    /// Least-squares slope.
    per_hour: f64,
    /// Medians of the first and of the last fifth of the samples (at least three each).
    start: f64,
    end: f64,
}

fn trend(samples: &[Sample], of: impl Fn(&Sample) -> f64) -> Trend {
    let per_hour = slope(
        &samples
            .iter()
            .map(|s| (s.t / 3600.0, of(s)))
            .collect::<Vec<_>>(),
    );
    let fifth = (samples.len() / 5).max(3).min(samples.len());
    Trend {
        per_hour,
        start: median(samples[..fifth].iter().map(&of).collect()),
        end: median(samples[samples.len() - fifth..].iter().map(&of).collect()),
    }
}

async fn scenario(env: &Env, p: &Params, r: &mut ScenarioReport) -> Result<()> {
    let work = env.ctx.dir("soak")?;
    let ttl = format!("{}s", p.ttl.as_secs());
    let pair = CaPair::start(env, &work, &["--ttl", &ttl, "--max-ttl", &ttl]).await?;
    let watched = [
        Watched {
            name: "CA",
            pid: pair.ca.pid(),
            admin: pair.ca.admin,
            tasks_metric: "meshid_ca_runtime_alive_tasks",
        },
        Watched {
            name: "inbound sidecar",
            pid: pair.inbound.pid(),
            admin: pair.inbound.admin,
            tasks_metric: "meshid_sidecar_runtime_alive_tasks",
        },
        Watched {
            name: "outbound sidecar",
            pid: pair.outbound.pid(),
            admin: pair.outbound.admin,
            tasks_metric: "meshid_sidecar_runtime_alive_tasks",
        },
    ];

    // Saturation, after two seconds of warm-up.
    let sat = Traffic::counting(pair.local, CONNECTIONS, Pace::Pause(Duration::ZERO));
    tokio::time::sleep(Duration::from_secs(2)).await;
    let (n0, t_sat) = (sat.count(), Instant::now());
    tokio::time::sleep(p.saturation).await;
    let saturation = (sat.count() - n0) as f64 / t_sat.elapsed().as_secs_f64();
    let (sat_ok, sat_failed) = sat.finish().await;
    if saturation < 2.0 * CONNECTIONS as f64 {
        bail!("the pair's saturation throughput was {saturation:.0} req/s: too little to soak at");
    }
    let rate = saturation / 2.0;
    let period = Duration::from_secs_f64(CONNECTIONS as f64 / rate);
    println!("  saturation {saturation:.0} req/s; soaking at {rate:.0} req/s");

    let ids = IdentityWatch::start(
        pair.sidecars().iter().map(|s| s.admin).collect(),
        Duration::from_secs(1),
    );
    let t0 = Instant::now();
    let mut samples: Vec<Vec<Sample>> = vec![Vec::new(); watched.len()];
    // Each process at rest after the warm-up and at the end.
    let mut idle: Vec<Vec<Sample>> = vec![Vec::new(); watched.len()];
    let (mut ok, mut failures, mut soak_s) = (0, Vec::new(), 0.0);
    let mut last_print = t0;
    for phase_end in [p.warmup, p.soak] {
        let traffic = Traffic::counting(pair.local, CONNECTIONS, Pace::Every(period));
        let started = Instant::now();
        let mut next = started;
        while t0.elapsed() < phase_end {
            for (i, w) in watched.iter().enumerate() {
                samples[i].push(sample(w, t0.elapsed().as_secs_f64()).await?);
            }
            if last_print.elapsed() >= Duration::from_secs(60) {
                last_print = Instant::now();
                println!(
                    "  soak: {:.0} s, {} requests, {} failed",
                    t0.elapsed().as_secs_f64(),
                    ok as usize + failures.len() + traffic.count(),
                    failures.len() + traffic.snapshot().len()
                );
            }
            next += p.sample_every;
            tokio::time::sleep_until(next.into()).await;
        }
        let (n, failed) = traffic.finish().await;
        soak_s += started.elapsed().as_secs_f64();
        ok += n;
        failures.extend(failed);
        // The client connections closed, no request in flight: what remains is what the
        // processes hold on their own (and the inbound sidecar's pool of app connections).
        tokio::time::sleep(AT_REST).await;
        for (i, w) in watched.iter().enumerate() {
            idle[i].push(sample(w, t0.elapsed().as_secs_f64()).await?);
        }
    }
    let total = ok + failures.len() as u64;
    let renewals: Vec<usize> = (0..2).map(|i| ids.renewals_after(i, t0).len()).collect();
    drop(ids);

    r.figure(
        "saturation throughput (measured first)",
        saturation,
        "req/s",
    );
    r.figure("soak rate (half of saturation)", rate, "req/s");
    r.figure("soak duration", soak_s, "s");
    r.figure("requests sent in the soak", total as f64, "");
    r.figure("achieved rate", total as f64 / soak_s, "req/s");
    r.figure_target(
        "failed requests in the soak",
        failures.len() as f64,
        "",
        "0",
    );
    r.figure(
        "failed requests while measuring saturation",
        sat_failed.len() as f64,
        "",
    );
    for (i, name) in ["inbound", "outbound"].iter().enumerate() {
        r.figure(
            &format!("renewals of the {name} sidecar during the soak"),
            renewals[i] as f64,
            "",
        );
    }
    let mut trends = Vec::new();
    for (i, w) in watched.iter().enumerate() {
        let judged: Vec<Sample> = samples[i]
            .iter()
            .copied()
            .filter(|s| s.t >= p.warmup.as_secs_f64())
            .collect();
        if judged.len() < 3 {
            bail!("too few samples after the warm-up ({})", judged.len());
        }
        let rss = trend(&judged, |s| s.rss_mib);
        let fds = trend(&judged, |s| s.fds);
        let tasks = trend(&judged, |s| s.tasks);
        let [rest0, rest1] = [idle[i][0], idle[i][1]];
        let peak = judged.iter().map(|s| s.rss_mib).fold(0.0, f64::max);
        let name = w.name;
        r.figure_target(
            &format!("{name}: resident memory slope"),
            rss.per_hour,
            "MiB/h",
            &format!("< {RSS_SLOPE_MIB_PER_HOUR}"),
        );
        r.figure(&format!("{name}: resident memory start"), rss.start, "MiB");
        r.figure(&format!("{name}: resident memory end"), rss.end, "MiB");
        r.figure(&format!("{name}: resident memory peak"), peak, "MiB");
        r.figure(
            &format!("{name}: open file descriptors slope under load"),
            fds.per_hour,
            "/h",
        );
        r.figure(
            &format!("{name}: open file descriptors under load, start"),
            fds.start,
            "",
        );
        r.figure(
            &format!("{name}: open file descriptors under load, end"),
            fds.end,
            "",
        );
        r.figure(
            &format!("{name}: open file descriptors at rest, after the warm-up"),
            rest0.fds,
            "",
        );
        r.figure(
            &format!("{name}: open file descriptors at rest, at the end"),
            rest1.fds,
            "",
        );
        r.figure(
            &format!("{name}: tokio tasks slope under load"),
            tasks.per_hour,
            "/h",
        );
        r.figure(
            &format!("{name}: tokio tasks under load, start"),
            tasks.start,
            "",
        );
        r.figure(
            &format!("{name}: tokio tasks under load, end"),
            tasks.end,
            "",
        );
        r.figure(
            &format!("{name}: tokio tasks at rest, after the warm-up"),
            rest0.tasks,
            "",
        );
        r.figure(
            &format!("{name}: tokio tasks at rest, at the end"),
            rest1.tasks,
            "",
        );
        trends.push((w.name, rss, fds, tasks, rest0, rest1));
    }
    r.notes.push(series_note(&watched, &samples));

    r.check(
        "no request fails in the soak (nor while measuring saturation)",
        failures.is_empty() && sat_failed.is_empty() && ok > 0 && sat_ok > 0,
        format!(
            "soak: {total} sent, {} failed{}; saturation: {} failed",
            failures.len(),
            failures
                .first()
                .map(|f| format!(" (first: {})", f.outcome.label()))
                .unwrap_or_default(),
            sat_failed.len()
        ),
    );
    let intended = rate * soak_s;
    r.check(
        "the soak's load was applied (at least 90% of the intended requests sent)",
        total as f64 >= 0.9 * intended,
        format!("{total} of {intended:.0}"),
    );
    let expected = (soak_s / p.ttl.as_secs_f64()).floor().max(1.0) as usize;
    r.check(
        &format!(
            "both sidecars kept renewing (at least {expected} times each: half of one renewal per \
             half lifetime)"
        ),
        renewals.iter().all(|&n| n >= expected),
        format!("inbound {}, outbound {}", renewals[0], renewals[1]),
    );
    for (name, rss, fds, tasks, rest0, rest1) in trends {
        r.check(
            &format!(
                "{name}: resident memory grows by less than {RSS_SLOPE_MIB_PER_HOUR} MiB/h \
                 (or by less than {RSS_NOISE_MIB} MiB in all)"
            ),
            rss.per_hour < RSS_SLOPE_MIB_PER_HOUR || rss.end - rss.start < RSS_NOISE_MIB,
            format!(
                "{:+.2} MiB/h ({:.1} -> {:.1} MiB)",
                rss.per_hour, rss.start, rss.end
            ),
        );
        r.check(
            &format!(
                "{name}: at rest, open file descriptors and tokio tasks return to where they were \
                 after the warm-up (within {COUNT_SLACK})"
            ),
            rest1.fds <= rest0.fds + COUNT_SLACK && rest1.tasks <= rest0.tasks + COUNT_SLACK,
            format!(
                "at rest: descriptors {:.0} -> {:.0}, tasks {:.0} -> {:.0}; under load: \
                 descriptors {:.0} -> {:.0} ({:+.1}/h), tasks {:.0} -> {:.0} ({:+.1}/h)",
                rest0.fds,
                rest1.fds,
                rest0.tasks,
                rest1.tasks,
                fds.start,
                fds.end,
                fds.per_hour,
                tasks.start,
                tasks.end,
                tasks.per_hour
            ),
        );
    }
    Ok(())
}

/// The samples at about every tenth of the soak, as one line each.
fn series_note(watched: &[Watched], samples: &[Vec<Sample>]) -> String {
    let n = samples.first().map_or(0, Vec::len);
    let step = (n / 10).max(1);
    let mut lines = Vec::new();
    for k in (0..n).step_by(step) {
        let per: Vec<String> = watched
            .iter()
            .zip(samples)
            .filter_map(|(w, s)| {
                let s = s.get(k)?;
                Some(format!(
                    "{} {:.1} MiB, {:.0} fds, {:.0} tasks",
                    w.name, s.rss_mib, s.fds, s.tasks
                ))
            })
            .collect();
        let t = samples[0][k].t;
        lines.push(format!("t={t:.0} s: {}", per.join("; ")));
    }
    format!(
        "Samples (about every tenth of the soak): {}",
        lines.join(" | ")
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn slope_fits_a_line() {
        let pts: Vec<(f64, f64)> = (0..10).map(|i| (i as f64, 3.0 + 2.0 * i as f64)).collect();
        assert!((slope(&pts) - 2.0).abs() < 1e-9);
        assert_eq!(slope(&[(1.0, 5.0)]), 0.0);
        assert_eq!(slope(&[(1.0, 5.0), (1.0, 7.0)]), 0.0);
    }

    #[test]
    fn trends_compare_the_first_and_last_fifth() {
        let samples: Vec<Sample> = (0..40)
            .map(|i| Sample {
                t: i as f64 * 90.0,
                rss_mib: 10.0 + i as f64,
                fds: 20.0,
                tasks: 25.0,
            })
            .collect();
        let rss = trend(&samples, |s| s.rss_mib);
        assert!((rss.per_hour - 40.0).abs() < 1e-6, "{rss:?}");
        assert_eq!((rss.start, rss.end), (13.5, 45.5));
        let fds = trend(&samples, |s| s.fds);
        assert_eq!((fds.per_hour, fds.start, fds.end), (0.0, 20.0, 20.0));
        assert!(median(vec![]).is_nan());
        assert_eq!(median(vec![3.0, 1.0, 2.0]), 2.0);
    }
}
