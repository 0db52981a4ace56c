//! Scenario `rotations-under-load`: a CA-mode sidecar pair carries requests at saturation while
//! both sidecars renew their certificates several times, the CA's signing intermediate is rotated
//! (`meshid-ca rotate intermediate`) and its root is rotated (`rotate prepare`, `activate`,
//! `retire`, each gated step retried until it passes). Every failed request counts: retiring a
//! connection, a renewal or a rotation must never fail one.
//!
//! What happened is read from the sidecars themselves: their `/identity` is polled throughout, so
//! each renewal (a new leaf), the intermediate that issued each leaf and the trust anchors held are
//! seen as they change, and each failed request is placed next to the nearest of those events.

use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use meshid_identity::pem::sha256_hex;

use super::mesh::{CaPair, CaProc};
use super::traffic::{Pace, Rec, Traffic};
use super::{Env, ScenarioReport, admin_get, poll_until};

/// Connections of traffic, each sending its next request as soon as the last one is answered.
pub const CONNECTIONS: usize = 32;

/// Sizes of a run.
pub struct Params {
    /// Requests to send at least (the run goes on until the rotations are done, too).
    pub requests: u64,
    pub ttl: Duration,
    /// Renewals each sidecar must go through during the traffic.
    pub renewals: usize,
}

impl Params {
    pub fn new(smoke: bool) -> Self {
        if smoke {
            Self {
                requests: 0,
                ttl: Duration::from_secs(10),
                renewals: 1,
            }
        } else {
            Self {
                requests: 1_000_000,
                ttl: Duration::from_secs(20),
                renewals: 3,
            }
        }
    }
}

pub async fn run(env: &Env, p: &Params, mut r: ScenarioReport) -> (ScenarioReport, Result<()>) {
    r.setup = format!(
        "meshid-ca serve with {ttl} s certificates (renewal at about half the lifetime); a CA-mode \
         sidecar pair (service-account token files) in front of bench-app; {CONNECTIONS} HTTP/1.1 \
         keep-alive connections into the outbound sidecar, each sending its next request as soon as \
         the last one is answered (saturation). Once both sidecars renewed, `meshid-ca rotate \
         intermediate`; once both serve a certificate from the new intermediate, `rotate prepare`, \
         then `rotate activate --admin` and `rotate retire --admin`, each retried every second until \
         its gate passes. The traffic goes on until both sidecars trust the new root alone and serve \
         a certificate under it, each renewed at least {renewals} times, and at least {requests} \
         requests were sent. Both sidecars' `/identity` is polled every 100 ms throughout.",
        ttl = p.ttl.as_secs(),
        renewals = p.renewals,
        requests = p.requests,
    );
    let result = scenario(env, p, &mut r).await;
    (r, result)
}

/// What a sidecar's `/identity` says, reduced to what a rotation changes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Seen {
    pub leaf: String,
    /// SHA-256 of the intermediate that issued the leaf.
    pub issuer: String,
    /// SHA-256 of each trust anchor held.
    pub anchors: Vec<String>,
    /// The leaf's not-after (seconds since the epoch).
    pub not_after: i64,
}

impl Seen {
    fn parse(body: &str) -> Option<Self> {
        let v: serde_json::Value = serde_json::from_str(body).ok()?;
        let text = |k: &str| v[k].as_str().map(str::to_owned);
        Some(Self {
            leaf: text("leaf_sha256")?,
            issuer: text("issuer_sha256").unwrap_or_default(),
            anchors: v["trust_anchors_sha256"]
                .as_array()?
                .iter()
                .filter_map(|a| a.as_str().map(str::to_owned))
                .collect(),
            not_after: v["not_after"].as_i64().unwrap_or(0),
        })
    }
}

/// Every change of each watched sidecar's `/identity`, timed.
type Histories = Arc<Mutex<Vec<Vec<(Instant, Seen)>>>>;

/// Polls the `/identity` of some sidecars in the background and keeps every change.
pub struct IdentityWatch {
    histories: Histories,
    task: tokio::task::JoinHandle<()>,
}

impl IdentityWatch {
    pub fn start(admins: Vec<std::net::SocketAddr>, every: Duration) -> Self {
        let histories: Histories = Arc::new(Mutex::new(vec![Vec::new(); admins.len()]));
        let h = histories.clone();
        let task = tokio::spawn(async move {
            loop {
                for (i, admin) in admins.iter().enumerate() {
                    let Ok((200, body)) = admin_get(*admin, "/identity").await else {
                        continue;
                    };
                    let Some(seen) = Seen::parse(&body) else {
                        continue;
                    };
                    if let Ok(mut all) = h.lock()
                        && all[i].last().is_none_or(|(_, last)| *last != seen)
                    {
                        all[i].push((Instant::now(), seen));
                    }
                }
                tokio::time::sleep(every).await;
            }
        });
        Self { histories, task }
    }

    /// Every change of sidecar `i` so far.
    pub fn history(&self, i: usize) -> Vec<(Instant, Seen)> {
        self.histories
            .lock()
            .map(|h| h[i].clone())
            .unwrap_or_default()
    }

    /// What sidecar `i` said last.
    pub fn current(&self, i: usize) -> Option<Seen> {
        self.history(i).last().map(|(_, s)| s.clone())
    }

    /// The times sidecar `i` took up a new leaf (renewals) after `from`.
    pub fn renewals_after(&self, i: usize, from: Instant) -> Vec<Instant> {
        let h = self.history(i);
        h.windows(2)
            .filter(|w| w[1].1.leaf != w[0].1.leaf && w[1].0 > from)
            .map(|w| w[1].0)
            .collect()
    }

    /// Waits until `f` holds for every watched sidecar's latest state (or `timeout`).
    pub async fn until(
        &self,
        n: usize,
        timeout: Duration,
        f: impl Fn(usize, &Seen) -> bool,
    ) -> Option<Duration> {
        poll_until(timeout, Duration::from_millis(50), || {
            let all = (0..n).all(|i| self.current(i).is_some_and(|s| f(i, &s)));
            async move { all }
        })
        .await
    }
}

impl Drop for IdentityWatch {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// The active authority of a CA directory: (SHA-256 of its signing intermediate, of each root in
/// the bundle).
fn authority(dir: &Path) -> Result<(String, Vec<String>)> {
    let a = meshid_ca::authority::Authority::load(dir)
        .map_err(|e| anyhow::anyhow!("reading the CA directory: {e}"))?;
    Ok((
        sha256_hex(&a.intermediate_der),
        a.roots.iter().map(|r| sha256_hex(r)).collect(),
    ))
}

/// `meshid-ca ARGS` (blocking this worker thread while it runs): (success, output).
fn cli(env: &Env, ca: &CaProc, args: &[&str]) -> Result<(bool, String)> {
    tokio::task::block_in_place(|| ca.cli(env, args))
}

/// `meshid-ca rotate STEP`, naming the CA's admin port for the gated steps (`activate`,
/// `retire`), retried every second for up to `retry_for` while it is refused: the attempts it took.
async fn rotate(env: &Env, ca: &CaProc, step: &str, retry_for: Duration) -> Result<usize> {
    let dir = ca.dir.display().to_string();
    let admin = ca.admin.to_string();
    let mut args = vec!["rotate", step, "--dir", &dir];
    if matches!(step, "activate" | "retire") {
        args.extend(["--admin", &admin]);
    }
    let t0 = Instant::now();
    let mut attempts = 0;
    loop {
        attempts += 1;
        let (ok, out) = cli(env, ca, &args)?;
        if ok {
            return Ok(attempts);
        }
        if t0.elapsed() >= retry_for {
            bail!("rotate {step} refused (attempt {attempts}, {retry_for:?}): {out}");
        }
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
}

/// A named moment of the run.
struct Event {
    at: Instant,
    what: String,
}

/// Records `what` as happening now: the moment.
fn mark(events: &mut Vec<Event>, what: &str) -> Instant {
    let at = Instant::now();
    events.push(Event {
        at,
        what: what.into(),
    });
    at
}

/// "1.234 s after <event>" for the event nearest to `at`.
fn nearest(events: &[Event], at: Instant) -> String {
    let signed = |e: &Event| {
        if at >= e.at {
            (at - e.at).as_secs_f64()
        } else {
            -(e.at - at).as_secs_f64()
        }
    };
    events
        .iter()
        .min_by(|a, b| signed(a).abs().total_cmp(&signed(b).abs()))
        .map_or_else(String::new, |e| {
            let d = signed(e);
            if d >= 0.0 {
                format!("{d:.3} s after {}", e.what)
            } else {
                format!("{:.3} s before {}", -d, e.what)
            }
        })
}

const NAMES: [&str; 2] = ["inbound", "outbound"];

async fn scenario(env: &Env, p: &Params, r: &mut ScenarioReport) -> Result<()> {
    let work = env.ctx.dir("rotations-under-load")?;
    let ttl = format!("{}s", p.ttl.as_secs());
    let pair = CaPair::start(env, &work, &["--ttl", &ttl, "--max-ttl", &ttl]).await?;
    let ca = &pair.ca;
    let watch = IdentityWatch::start(
        pair.sidecars().iter().map(|s| s.admin).collect(),
        Duration::from_millis(100),
    );
    let (first_inter, first_roots) = authority(&ca.dir)?;
    watch
        .until(2, Duration::from_secs(10), |_, s| s.issuer == first_inter)
        .await
        .context("the sidecars' /identity does not name the CA's intermediate")?;
    let step_timeout = p.ttl * 3 + Duration::from_secs(30);

    let traffic = Traffic::counting(pair.local, CONNECTIONS, Pace::Pause(Duration::ZERO));
    let mut events = Vec::new();
    let t0 = mark(&mut events, "the start of the traffic");
    watch
        .until(2, p.ttl * 2, |i, _| !watch.renewals_after(i, t0).is_empty())
        .await
        .context("the sidecars did not renew within two lifetimes")?;

    // The intermediate.
    rotate(env, ca, "intermediate", Duration::ZERO).await?;
    mark(&mut events, "`rotate intermediate`");
    let (second_inter, _) = authority(&ca.dir)?;
    let inter_taken = watch
        .until(2, step_timeout, |_, s| s.issuer == second_inter)
        .await;
    println!("  rotate intermediate: both sidecars on the new one after {inter_taken:?}");

    // The root.
    rotate(env, ca, "prepare", Duration::ZERO).await?;
    let t_prepare = mark(&mut events, "`rotate prepare`");
    let activate_attempts = rotate(env, ca, "activate", step_timeout).await?;
    let t_activate = mark(&mut events, "`rotate activate`");
    let (third_inter, _) = authority(&ca.dir)?;
    let retire_attempts = rotate(env, ca, "retire", step_timeout).await?;
    let t_retire = mark(&mut events, "`rotate retire`");
    let (_, last_roots) = authority(&ca.dir)?;
    println!(
        "  root rotation: activate after {activate_attempts} attempt(s), retire after {retire_attempts}"
    );
    let on_new_root = watch
        .until(2, step_timeout, |_, s| {
            s.anchors == last_roots && s.issuer == third_inter
        })
        .await;

    // Until enough requests and renewals.
    let enough = poll_until(Duration::from_secs(900), Duration::from_millis(100), || {
        let n = traffic.count() as u64;
        let renewals_done = (0..2).all(|i| watch.renewals_after(i, t0).len() >= p.renewals);
        async move { n >= p.requests && renewals_done }
    })
    .await;
    let (ok_count, failures) = traffic.finish().await;
    let t_end = Instant::now();
    let run_s = (t_end - t0).as_secs_f64();
    let total = ok_count + failures.len() as u64;

    // Every leaf change, leaf expiry and bundle change of each sidecar, as events: the upstream
    // ends a connection at the expiry of the certificate the outbound side presented on it.
    for (i, name) in NAMES.iter().enumerate() {
        let h = watch.history(i);
        let mut leaves = 0;
        for (k, (seen_at, seen)) in h.iter().enumerate() {
            let before = k.checked_sub(1).map(|j| &h[j].1);
            if before.is_none_or(|b| b.leaf != seen.leaf) {
                leaves += 1;
                if before.is_some() {
                    events.push(Event {
                        at: *seen_at,
                        what: format!("the {name} sidecar taking up its certificate {leaves}"),
                    });
                }
                let expiry = super::instant_at(seen.not_after as f64);
                if expiry < t_end {
                    events.push(Event {
                        at: expiry,
                        what: format!("the expiry of the {name} sidecar's certificate {leaves}"),
                    });
                }
            }
            if before.is_some_and(|b| b.anchors != seen.anchors) {
                events.push(Event {
                    at: *seen_at,
                    what: format!("a trust-bundle change at the {name} sidecar"),
                });
            }
        }
    }

    r.figure_target(
        "failed requests per million",
        failures.len() as f64 * 1e6 / total.max(1) as f64,
        "",
        "0",
    );
    r.figure("requests", total as f64, "");
    r.figure("failed requests", failures.len() as f64, "");
    r.figure("traffic duration", run_s, "s");
    r.figure("throughput (saturation)", total as f64 / run_s, "req/s");
    for (i, name) in NAMES.iter().enumerate() {
        r.figure(
            &format!("renewals of the {name} sidecar during the traffic"),
            watch.renewals_after(i, t0).len() as f64,
            "",
        );
    }
    if let Some(d) = inter_taken {
        r.figure(
            "`rotate intermediate` to both sidecars serving a certificate from the new intermediate",
            d.as_secs_f64(),
            "s",
        );
    }
    r.figure(
        "`rotate prepare` to `activate` passing",
        (t_activate - t_prepare).as_secs_f64(),
        "s",
    );
    r.figure("`rotate activate` attempts", activate_attempts as f64, "");
    r.figure(
        "`rotate activate` to `retire` passing",
        (t_retire - t_activate).as_secs_f64(),
        "s",
    );
    r.figure("`rotate retire` attempts", retire_attempts as f64, "");
    if let Some(d) = on_new_root {
        r.figure(
            "`rotate retire` to both sidecars trusting the new root alone",
            d.as_secs_f64(),
            "s",
        );
    }
    let failed_detail = describe_failures(&failures, &events);
    for line in failed_detail.iter().take(20) {
        r.notes.push(format!("Failed request: {line}."));
    }
    for s in pair.sidecars() {
        let warnings: Vec<String> = s
            .log()
            .lines()
            .filter(|l| l.contains(" WARN ") || l.contains(" ERROR "))
            .take(10)
            .map(str::to_owned)
            .collect();
        if !warnings.is_empty() {
            r.notes.push(format!(
                "The {} sidecar's log, first warnings: {}",
                s.name,
                warnings.join(" / ")
            ));
        }
    }

    r.check(
        "no request fails across the renewals and rotations",
        failures.is_empty() && ok_count > 0,
        if failures.is_empty() {
            format!("{total} sent, none failed")
        } else {
            format!(
                "{total} sent, {} failed: {}",
                failures.len(),
                failed_detail
                    .iter()
                    .take(5)
                    .cloned()
                    .collect::<Vec<_>>()
                    .join("; ")
            )
        },
    );
    r.check(
        &format!(
            "the run sent at least {} requests and each sidecar renewed at least {} times during it",
            p.requests, p.renewals
        ),
        enough.is_some(),
        format!(
            "{total} requests; renewals: inbound {}, outbound {}",
            watch.renewals_after(0, t0).len(),
            watch.renewals_after(1, t0).len()
        ),
    );
    r.check(
        "`rotate intermediate` took effect: both sidecars serve a certificate the new intermediate issued",
        second_inter != first_inter && inter_taken.is_some(),
        format!(
            "intermediate {} -> {}; sidecars on it after {inter_taken:?}",
            short(&first_inter),
            short(&second_inter)
        ),
    );
    let end: Vec<Option<Seen>> = (0..2).map(|i| watch.current(i)).collect();
    r.check(
        "the root rotation took effect: both sidecars trust the new root alone and serve a certificate under it",
        on_new_root.is_some() && last_roots.len() == 1 && !first_roots.contains(&last_roots[0]),
        format!(
            "bundle {:?} -> {:?}; sidecars' anchors {:?}, issuers {:?} (new authority's intermediate {})",
            first_roots.iter().map(|s| short(s)).collect::<Vec<_>>(),
            last_roots.iter().map(|s| short(s)).collect::<Vec<_>>(),
            end.iter()
                .map(|s| s.as_ref().map(|s| s.anchors.iter().map(|a| short(a)).collect::<Vec<_>>()))
                .collect::<Vec<_>>(),
            end.iter()
                .map(|s| s.as_ref().map(|s| short(&s.issuer)))
                .collect::<Vec<_>>(),
            short(&third_inter),
        ),
    );
    Ok(())
}

/// The first 12 hex digits of a fingerprint.
fn short(h: &str) -> String {
    h.chars().take(12).collect()
}

/// Each failed request: when, how, and the nearest event.
fn describe_failures(failures: &[Rec], events: &[Event]) -> Vec<String> {
    let t0 = events.first().map_or_else(Instant::now, |e| e.at);
    failures
        .iter()
        .map(|f| {
            format!(
                "sent at t+{:.3} s, ended after {:.3} s: {} ({})",
                f.sent.saturating_duration_since(t0).as_secs_f64(),
                (f.done - f.sent).as_secs_f64(),
                f.outcome.label(),
                nearest(events, f.sent)
            )
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn identity_answers_are_read() {
        let body = r#"{"spiffe_id":"spiffe://x/ns/a/sa/b","not_after":1800000000,"leaf_sha256":"aa","issuer_sha256":"bb","trust_anchors_sha256":["cc","dd"]}"#;
        assert_eq!(
            Seen::parse(body),
            Some(Seen {
                leaf: "aa".into(),
                issuer: "bb".into(),
                anchors: vec!["cc".into(), "dd".into()],
                not_after: 1_800_000_000,
            })
        );
        assert_eq!(Seen::parse("no certificate loaded\n"), None);
    }

    #[test]
    fn failures_are_placed_next_to_the_nearest_event() {
        let t0 = Instant::now();
        let at = |ms| t0 + Duration::from_millis(ms);
        let events = vec![
            Event {
                at: t0,
                what: "start".into(),
            },
            Event {
                at: at(5000),
                what: "a renewal".into(),
            },
        ];
        assert_eq!(nearest(&events, at(4990)), "0.010 s before a renewal");
        assert_eq!(nearest(&events, at(5250)), "0.250 s after a renewal");
        assert_eq!(nearest(&events, at(100)), "0.100 s after start");
    }
}
