//! Scenario `ca-outage`: the CA killed with SIGKILL during a renewal storm, and kept down past the
//! expiry of the sidecars' certificates.
//!
//! A real CA-mode sidecar pair (outbound -> mTLS -> inbound -> app) carries traffic; N simulated
//! sidecars, started together, renew together at half their lifetime: the CA is killed once a tenth
//! of them renewed. While it is down the pair must keep serving on its current certificates; at
//! their expiry it must fail closed (readiness drops, and the inbound listener serves no request,
//! even to a client whose own certificate is valid); once the CA is back, everything must recover.

use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use anyhow::{Result, bail};
use rcgen::{CertificateParams, ExtendedKeyUsagePurpose, KeyPair, SanType};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use super::mesh::{CaPair, SidecarProc, ca_mode_args, outbound_args};
use super::traffic::{Tally, Traffic, first_ok_after, sent_between};
use super::{Env, ScenarioReport, SimFleet, admin_metric, instant_at, poll_until, ready};
use crate::harness::free_addr;
use crate::harness::pki::{CLIENT_ID, SERVER_ID};
use crate::simsidecar::{SimConfig, SimStats};
use crate::tlsconf::{TlsOptions, client_config};

/// Sizes of a run.
pub struct Params {
    pub sims: usize,
    pub ttl: Duration,
}

impl Params {
    pub fn new(smoke: bool, sims: usize) -> Self {
        if smoke {
            Self {
                sims: sims.min(100),
                ttl: Duration::from_secs(10),
            }
        } else {
            Self {
                sims,
                ttl: Duration::from_secs(30),
            }
        }
    }
}

pub async fn run(env: &Env, p: &Params, mut r: ScenarioReport) -> (ScenarioReport, Result<()>) {
    r.setup = format!(
        "meshid-ca serve with {ttl} s certificates; a CA-mode sidecar pair (service-account token \
         files) in front of bench-app, with 4 connections of traffic through the outbound sidecar \
         (each sends a request, waits for the answer, pauses 20 ms); {n} simulated CA-mode sidecars \
         (chaos-run's tokio tasks: fresh key and CSR per certificate, bundle stream, acknowledgements) \
         started within one second, so they renew together at half their lifetime. The CA is killed \
         with SIGKILL once a tenth of them renewed, stays down until the pair's certificates expired \
         (and at least half a lifetime), then starts again on the same directory and ports. The 30 s certificates (10 s in --smoke) \
         stand in for the 1 h default, so that the outage outlasts them within a minute; a sidecar \
         started while the CA is down (default flags, no certificate yet) shows how fast one that \
         has none comes back.",
        ttl = p.ttl.as_secs(),
        n = p.sims
    );
    let result = scenario(env, p, &mut r).await;
    (r, result)
}

/// A client certificate for `CLIENT_ID` signed by the CA's intermediate with a long lifetime, so
/// that a refused request after the sidecars' expiry can only be the sidecar's doing.
pub(super) fn long_lived_client(ca_dir: &Path, out: &Path) -> Result<TlsOptions> {
    let authority = meshid_ca::authority::Authority::load(ca_dir)
        .map_err(|e| anyhow::anyhow!("loading the CA's authority: {e}"))?;
    let key = KeyPair::generate()?;
    let mut params = CertificateParams::default();
    params.subject_alt_names = vec![SanType::URI(CLIENT_ID.try_into()?)];
    params.extended_key_usages = vec![
        ExtendedKeyUsagePurpose::ClientAuth,
        ExtendedKeyUsagePurpose::ServerAuth,
    ];
    let cert = params.signed_by(&key, &authority.issuer)?;
    let mut chain = cert.pem();
    chain.push_str(&meshid_tests::pki::pem(&authority.intermediate_der));
    let (cert_path, key_path) = (out.join("client-long.pem"), out.join("client-long.key"));
    std::fs::write(&cert_path, chain)?;
    std::fs::write(&key_path, key.serialize_pem())?;
    Ok(TlsOptions {
        cert: Some(cert_path),
        key: Some(key_path),
        // The server's certificate is not judged: only whether the sidecar serves.
        dangerous_skip_verify: true,
        ..TlsOptions::default()
    })
}

/// An HTTP/1.1 request over mTLS straight to the inbound listener: the status, or why none came.
pub(super) async fn served(addr: std::net::SocketAddr, opts: &TlsOptions) -> Result<u16, String> {
    let config = client_config(opts, b"http/1.1").map_err(|e| e.to_string())?;
    let attempt = async {
        let tcp = tokio::net::TcpStream::connect(addr)
            .await
            .map_err(|e| format!("connect: {e}"))?;
        let name =
            rustls_pki_types::ServerName::try_from("sidecar.invalid").map_err(|e| e.to_string())?;
        let mut tls = tokio_rustls::TlsConnector::from(config)
            .connect(name, tcp)
            .await
            .map_err(|e| format!("handshake: {e}"))?;
        tls.write_all(b"GET / HTTP/1.1\r\nHost: chaos\r\nConnection: close\r\n\r\n")
            .await
            .map_err(|e| format!("write: {e}"))?;
        let mut out = Vec::new();
        let _ = tls.read_to_end(&mut out).await;
        let text = String::from_utf8_lossy(&out);
        text.strip_prefix("HTTP/1.1 ")
            .and_then(|t| t.get(..3))
            .and_then(|c| c.parse::<u16>().ok())
            .ok_or_else(|| "no HTTP answer (connection closed after the handshake)".to_owned())
    };
    tokio::time::timeout(Duration::from_secs(5), attempt)
        .await
        .unwrap_or_else(|_| Err("timed out".into()))
}

async fn scenario(env: &Env, p: &Params, r: &mut ScenarioReport) -> Result<()> {
    let work = env.ctx.dir("ca-outage")?;
    let ttl = format!("{}s", p.ttl.as_secs());
    let max_conns = (p.sims + 1000).to_string();
    let pair = CaPair::start(
        env,
        &work,
        &[
            "--ttl",
            &ttl,
            "--max-ttl",
            &ttl,
            "--max-connections",
            &max_conns,
        ],
    )
    .await?;
    let CaPair {
        mut ca,
        inbound,
        outbound,
        local,
        inbound_addr: inb,
        ref client_token,
        ..
    } = pair;
    let client = long_lived_client(&ca.dir, &work)?;
    let control = served(inb, &client).await;
    r.check(
        "a client with a valid certificate is served by the inbound sidecar before the fault (the \
         expiry check below can see a refusal)",
        control == Ok(200),
        format!("{control:?}"),
    );

    // The fleet, started together so that it renews together.
    let endpoint = ca.endpoint()?;
    let fleet = SimFleet::start((0..p.sims).map(|i| SimConfig {
        endpoint: endpoint.clone(),
        token: ca.cluster.token("fleet", &format!("sidecar-{i}")),
        instance: format!("chaos-{i:05}"),
        jitter: 0.9 + 0.2 * ((i * 7919) % 1000) as f64 / 1000.0,
        start_delay: Duration::from_secs_f64(i as f64 / p.sims as f64),
    }));
    let stats = &fleet.stats;
    let joined = fleet.joined(Duration::from_secs(60)).await;
    let Some(joined) = joined else {
        bail!("the simulated sidecars did not all join within 60 s");
    };
    r.figure(
        "simulated sidecars joined (first certificate and bundle acknowledged)",
        joined.as_secs_f64(),
        "s",
    );

    let traffic = Traffic::start(local, 4, Duration::from_millis(20));
    let t_start = Instant::now();
    let renewed = |stats: &[Arc<SimStats>]| {
        stats
            .iter()
            .map(|s| s.renewals.lock().map_or(0, |v| v.len()))
            .sum::<usize>()
    };
    let storm = poll_until(p.ttl, Duration::from_millis(10), || {
        let n = renewed(stats);
        async move { n * 10 >= p.sims }
    })
    .await;
    if storm.is_none() {
        bail!("the renewal storm did not start within one lifetime");
    }

    // The fault.
    let errors_before: u64 = stats.iter().map(|s| s.errors.load(Ordering::Relaxed)).sum();
    let renewed_at_kill = renewed(stats);
    let expiries = [
        admin_metric(
            inbound.admin,
            "meshid_sidecar_certificate_expiry_timestamp_seconds",
            &[],
        )
        .await,
        admin_metric(
            outbound.admin,
            "meshid_sidecar_certificate_expiry_timestamp_seconds",
            &[],
        )
        .await,
    ];
    ca.kill(env)?;
    let t_kill = Instant::now();
    // A pod starting while the CA is down: no certificate yet, retries until the CA is back.
    let mut args = outbound_args(free_addr(), inb, SERVER_ID);
    args.extend(ca_mode_args(&ca, client_token));
    let late = SidecarProc::start(env, "late-outbound", &work, args, None)?;
    println!(
        "  CA killed during the storm ({renewed_at_kill} of {} simulated sidecars renewed)",
        p.sims
    );
    // A renewal may have landed between reading the expiry and the kill.
    let expiries = [
        admin_metric(
            inbound.admin,
            "meshid_sidecar_certificate_expiry_timestamp_seconds",
            &[],
        )
        .await
        .max(expiries[0]),
        admin_metric(
            outbound.admin,
            "meshid_sidecar_certificate_expiry_timestamp_seconds",
            &[],
        )
        .await
        .max(expiries[1]),
    ];
    if expiries.iter().any(|e| *e <= 0.0) {
        bail!("a sidecar reports no certificate expiry");
    }
    let exp_at = [instant_at(expiries[0]), instant_at(expiries[1])];
    let first_expiry = exp_at[0].min(exp_at[1]);
    let last_expiry = exp_at[0].max(exp_at[1]);
    let down_until =
        (t_kill + p.ttl / 2 + Duration::from_secs(1)).max(last_expiry + Duration::from_secs(3));

    // While the CA is down: readiness of each sidecar, and whether the inbound still serves.
    let mut unready_at: [Option<Instant>; 2] = [None, None];
    let mut served_while_valid = None;
    let mut served_after_expiry = None;
    let midway = t_kill + (first_expiry.saturating_duration_since(t_kill)) / 2;
    while Instant::now() < down_until {
        let now = Instant::now();
        for (i, admin) in [inbound.admin, outbound.admin].into_iter().enumerate() {
            if unready_at[i].is_none() && !ready(admin).await {
                unready_at[i] = Some(now);
            }
        }
        if served_while_valid.is_none() && now >= midway {
            served_while_valid = Some(served(inb, &client).await);
        }
        if served_after_expiry.is_none() && now >= exp_at[0] + Duration::from_secs(1) {
            served_after_expiry = Some(served(inb, &client).await);
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let refused_expired = admin_metric(
        inbound.admin,
        "meshid_sidecar_connections_refused_total",
        &[("reason", "certificate_expired")],
    )
    .await;
    let sims_down_errors: u64 = stats
        .iter()
        .map(|s| s.errors.load(Ordering::Relaxed))
        .sum::<u64>()
        - errors_before;

    // The CA returns.
    let t_back = Instant::now();
    let ca_ready = ca.serve(env).await?;
    let mut back_ready = [None, None, None];
    let mut all_back = None;
    let expected_streams = (p.sims + 2) as f64;
    let mut recovered = false;
    while t_back.elapsed() < Duration::from_secs(60) {
        for (i, admin) in [inbound.admin, outbound.admin, late.admin]
            .into_iter()
            .enumerate()
        {
            if back_ready[i].is_none() && ready(admin).await {
                back_ready[i] = Some(t_back.elapsed());
            }
        }
        if all_back.is_none()
            && admin_metric(ca.admin, "meshid_ca_watch_streams", &[]).await >= expected_streams
        {
            all_back = Some(t_back.elapsed());
        }
        if back_ready.iter().all(Option::is_some) && all_back.is_some() {
            recovered = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    // Two more seconds of traffic after recovery.
    tokio::time::sleep(Duration::from_secs(2)).await;
    let recs = traffic.stop().await;
    fleet.stop().await;
    let t_end = Instant::now();

    // What the traffic saw, phase by phase.
    let before = Tally::of(&sent_between(&recs, t_start, t_kill));
    let guard = Duration::from_secs(2);
    let down_valid = Tally::of(&sent_between(
        &recs,
        t_kill,
        first_expiry.checked_sub(guard).unwrap_or(first_expiry),
    ));
    let edge = Tally::of(&sent_between(
        &recs,
        first_expiry.checked_sub(guard).unwrap_or(first_expiry),
        first_expiry + Duration::from_secs(1),
    ));
    let edge_before = sent_between(
        &recs,
        first_expiry.checked_sub(guard).unwrap_or(first_expiry),
        first_expiry,
    );
    // The first failure before the expiry: how early the pair stopped serving.
    let early = edge_before
        .iter()
        .find(|rec| rec.outcome != super::traffic::Outcome::Ok)
        .map(|rec| first_expiry.saturating_duration_since(rec.sent));
    let edge_before = Tally::of(&edge_before);
    let expired = Tally::of(&sent_between(
        &recs,
        first_expiry + Duration::from_secs(1),
        t_back,
    ));
    let after = Tally::of(&sent_between(&recs, t_back, t_end));
    let first_ok = first_ok_after(&recs, t_back).map(|t| t.saturating_duration_since(t_back));
    let all = Tally::of(&recs);

    r.figure(
        "simulated sidecars renewed when the CA was killed",
        renewed_at_kill as f64,
        "",
    );
    r.figure(
        "CA down (SIGKILL to restart)",
        t_back.saturating_duration_since(t_kill).as_secs_f64(),
        "s",
    );
    r.figure(
        "CA down, in certificate lifetimes",
        t_back.saturating_duration_since(t_kill).as_secs_f64() / p.ttl.as_secs_f64(),
        "",
    );
    r.figure(
        "pair's first certificate expiry after the kill",
        first_expiry.saturating_duration_since(t_kill).as_secs_f64(),
        "s",
    );
    r.figure("requests before the kill", before.total() as f64, "");
    r.figure("requests failed before the kill", before.failed as f64, "");
    r.figure_target(
        "requests failed while the CA was down and the certificates valid (up to 2 s before expiry)",
        down_valid.failed as f64,
        "",
        "0",
    );
    r.figure("requests in that window", down_valid.total() as f64, "");
    r.figure(
        "requests failed in the 3 s around the first expiry (2 s before, 1 s after)",
        edge.failed as f64,
        "",
    );
    r.figure("requests in that window", edge.total() as f64, "");
    r.figure(
        "of which sent in the 2 s before the expiry, and failed",
        edge_before.failed as f64,
        "",
    );
    if let Some(e) = early {
        r.figure(
            "first failed request before the expiry: sent this long before it",
            e.as_secs_f64(),
            "s",
        );
    }
    r.figure_target(
        "requests served after expiry, CA still down (fail closed)",
        expired.ok as f64,
        "",
        "0",
    );
    r.figure(
        "requests refused after expiry, CA still down",
        expired.failed as f64,
        "",
    );
    r.figure(
        "requests failed after the CA returned",
        after.failed as f64,
        "",
    );
    r.figure("requests failed in all", all.failed as f64, "");
    r.figure("requests in all", all.total() as f64, "");
    r.figure(
        "inbound connections refused at accept as certificate_expired",
        refused_expired,
        "",
    );
    r.figure(
        "simulated sidecars' failed CA calls while the CA was down (each retried)",
        sims_down_errors as f64,
        "",
    );
    r.figure("CA restart to ready", ca_ready.as_secs_f64(), "s");
    for (i, name) in ["inbound", "outbound"].into_iter().enumerate() {
        if let Some(u) = unready_at[i] {
            let lag = u.saturating_duration_since(exp_at[i]).as_secs_f64()
                - exp_at[i].saturating_duration_since(u).as_secs_f64();
            r.figure(
                &format!("{name} sidecar: /readyz stopped answering 200, relative to its certificate's expiry"),
                lag,
                "s",
            );
        }
        if let Some(b) = back_ready[i] {
            r.figure(
                &format!("{name} sidecar: CA restart to /readyz 200"),
                b.as_secs_f64(),
                "s",
            );
        }
    }
    let late_ready = back_ready[2];
    if let Some(b) = late_ready {
        r.figure(
            "sidecar started while the CA was down (no certificate yet): CA restart to /readyz 200",
            b.as_secs_f64(),
            "s",
        );
    }
    if let Some(f) = first_ok {
        r.figure(
            "CA restart to the first request served through the pair",
            f.as_secs_f64(),
            "s",
        );
    }
    if let Some(a) = all_back {
        r.figure(
            "CA restart to every simulated sidecar's bundle stream back",
            a.as_secs_f64(),
            "s",
        );
    }
    r.notes.push(format!(
        "Traffic phases: before the kill {}; CA down, certificates valid {}; around the first expiry {}; \
         expired {}; after the CA returned {}.",
        before.describe(),
        down_valid.describe(),
        edge.describe(),
        expired.describe(),
        after.describe()
    ));

    // The promises.
    r.check(
        "the pair keeps serving on its current certificates while the CA is down",
        down_valid.failed == 0 && down_valid.ok > 0,
        down_valid.describe(),
    );
    r.check(
        "the inbound sidecar serves a valid client while the CA is down and its certificate is valid",
        served_while_valid == Some(Ok(200)),
        format!("{served_while_valid:?}"),
    );
    r.check(
        "no request is served through the pair once a certificate expired",
        expired.ok == 0 && expired.total() > 0,
        expired.describe(),
    );
    r.check(
        "the inbound sidecar serves no request once its certificate expired, even to a valid client",
        matches!(served_after_expiry, Some(Err(_))),
        format!("{served_after_expiry:?}"),
    );
    for (i, name) in ["inbound", "outbound"].into_iter().enumerate() {
        let ok = unready_at[i].is_some_and(|u| u <= exp_at[i] + Duration::from_secs(1));
        r.check(
            &format!(
                "{name} sidecar: /readyz stops answering 200 by its certificate's expiry (+1 s)"
            ),
            ok,
            match unready_at[i] {
                Some(u) if u >= exp_at[i] => format!(
                    "not ready {:.2} s after expiry",
                    u.saturating_duration_since(exp_at[i]).as_secs_f64()
                ),
                Some(u) => format!(
                    "not ready {:.2} s before expiry",
                    exp_at[i].saturating_duration_since(u).as_secs_f64()
                ),
                None => "still ready".into(),
            },
        );
    }
    let late_log = late.log();
    let waits = retry_waits(&late_log);
    let longest = waits.iter().copied().fold(0.0, f64::max);
    r.figure(
        "sidecar started while the CA was down: longest wait it announced between attempts",
        longest,
        "s",
    );
    r.check(
        "a sidecar without a certificate asks the CA again at least every 5 s, and is ready within 10 s of its return",
        !waits.is_empty() && longest <= 5.0 && late_ready.is_some_and(|d| d <= Duration::from_secs(10)),
        format!(
            "ready {late_ready:?} after the CA's return; {} failed attempts logged, waits {:?} s",
            waits.len(),
            waits
        ),
    );
    r.check(
        "after the CA returns, both sidecars are ready, requests succeed and every simulated sidecar reconnects (within 60 s)",
        recovered && first_ok.is_some(),
        format!(
            "sidecars ready after {:?}, first request after {first_ok:?}, fleet after {all_back:?}",
            back_ready
        ),
    );
    let after_first_ok = first_ok.map(|f| Tally::of(&sent_between(&recs, t_back + f, t_end)));
    r.check(
        "no request fails once the first one after the CA's return succeeded",
        after_first_ok
            .as_ref()
            .is_some_and(|t| t.failed == 0 && t.ok > 0),
        after_first_ok.map_or("no request succeeded".into(), |t| t.describe()),
    );
    Ok(())
}

/// The `retry_in_s=` of every failed certificate request in a sidecar's text log.
fn retry_waits(log: &str) -> Vec<f64> {
    log.lines()
        .filter(|l| l.contains("certificate request failed"))
        .filter_map(|l| l.split("retry_in_s=").nth(1))
        .filter_map(|v| v.split_whitespace().next()?.parse::<f64>().ok())
        .map(|v| (v * 100.0).round() / 100.0)
        .collect()
}

#[cfg(test)]
mod tests {
    #[test]
    fn retry_waits_are_read_from_the_log() {
        let log = "2026 WARN meshid_sidecar::creds::ca: certificate request failed error=x retry_in_s=0.0713 holding_valid_certificate=false\n\
                   2026 WARN other line retry_in_s=9\n";
        assert_eq!(super::retry_waits(log), vec![0.07]);
    }
}
