//! The checks of the fleet: sidecars acknowledging the trust bundle and renewing (from the CA's
//! metrics), and given sidecars' own certificates (from their stats port).

use std::collections::BTreeSet;

use super::certs;
use super::checks::Replica;
use super::probe::admin_get;
use super::prom::Scrape;
use super::{CheckConfig, Finding};

pub(super) fn sidecars(replicas: &[Replica], now: i64) -> Finding {
    const NAME: &str = "sidecars";
    let scraped: Vec<(&Replica, &Scrape)> = replicas
        .iter()
        .filter_map(|r| r.metrics.as_ref().map(|m| (r, m)))
        .collect();
    if scraped.is_empty() {
        return Finding::skip(NAME, "no CA /metrics answered (see ca-admin)");
    }
    let (mut connected, mut behind, mut renewed, mut refused) = (0.0, 0.0, 0.0, 0.0);
    let mut version = 0.0;
    let mut oldest_start = i64::MAX;
    let mut reasons = BTreeSet::new();
    for (replica, m) in &scraped {
        let bundle = m.value("meshid_ca_bundle_version").unwrap_or(0.0);
        version = f64::max(version, bundle);
        for s in m.find("meshid_ca_sidecars", &[]) {
            connected += s.value;
            let acked: f64 = s
                .label("acked_version")
                .and_then(|v| v.parse().ok())
                .unwrap_or(0.0);
            if acked < bundle {
                behind += s.value;
            }
        }
        for s in m.find("meshid_ca_issue_requests_total", &[("method", "renewal")]) {
            match s.label("result") {
                Some("issued") => renewed += s.value,
                other => {
                    refused += s.value;
                    if s.value > 0.0 {
                        reasons.insert(other.unwrap_or("?").to_owned());
                    }
                }
            }
        }
        if let Some(p) = replica.report().and_then(|r| r.processes.first()) {
            oldest_start = oldest_start.min(p.started_unix);
        }
    }
    if behind > 0.0 {
        // Who they are, from the replicas' rotation reports (escaped when printed).
        let mut lagging: Vec<String> = replicas
            .iter()
            .filter_map(Replica::report)
            .flat_map(|r| {
                r.sidecars
                    .iter()
                    .filter(move |s| {
                        s.connected && !s.file_mode && s.acked_version < r.bundle_version
                    })
                    .map(|s| format!("{} (v{})", s.identity, s.acked_version))
            })
            .collect();
        lagging.sort();
        lagging.dedup();
        let named = match lagging.len() {
            0 => String::new(),
            n if n <= 3 => format!(": {}", lagging.join(", ")),
            n => format!(": {} and {} more", lagging[..3].join(", "), n - 3),
        };
        return Finding::warn(
            NAME,
            format!(
                "{behind} of {connected} connected sidecar(s) have not acknowledged trust bundle v{version}{named}"
            ),
            "a sidecar acknowledges a bundle once it applied it: look at those sidecars' logs (kubectl logs POD -c meshid-sidecar); meshid-ca rotate status lists them by identity. Right after a bundle change this settles within seconds",
        );
    }
    if refused > 0.0 {
        return Finding::warn(
            NAME,
            format!(
                "{refused} renewal(s) refused ({}), {renewed} issued",
                reasons.into_iter().collect::<Vec<_>>().join(", ")
            ),
            "see meshid_ca_issue_requests_total{method=\"renewal\"} by result: untrusted_chain follows a forced retire (the sidecars re-attest with their tokens), attestation_expired means join-token workloads need a new join token",
        );
    }
    let uptime = now.saturating_sub(oldest_start);
    if connected > 0.0 && renewed == 0.0 && oldest_start != i64::MAX && uptime > 3600 {
        return Finding::warn(
            NAME,
            format!(
                "{connected} sidecar(s) connected, but no renewal in {}",
                certs::human(uptime.unsigned_abs())
            ),
            "sidecars renew at half their certificate's lifetime: look at a sidecar's log and meshid_sidecar_renewals_total",
        );
    }
    Finding::ok(
        NAME,
        format!(
            "{connected} connected sidecar(s), all on trust bundle v{version}; {renewed} renewal(s) issued"
        ),
    )
}

pub(super) async fn sidecar_certs(config: &CheckConfig, now: i64) -> Finding {
    const NAME: &str = "sidecar-certs";
    let mut bad = Vec::new();
    let mut good = 0;
    for addr in &config.sidecar_admins {
        let scrape = match admin_get(*addr, "/metrics", config.timeout).await {
            Ok((200, body)) => Scrape::parse(&String::from_utf8_lossy(&body)),
            Ok((status, _)) => {
                bad.push(format!("{addr}: /metrics answered HTTP {status}"));
                continue;
            }
            Err(e) => {
                bad.push(format!("{addr}: {e}"));
                continue;
            }
        };
        let expiry = scrape.value("meshid_sidecar_certificate_expiry_timestamp_seconds");
        let renewed = scrape.value("meshid_sidecar_last_renewal_timestamp_seconds");
        match (expiry, renewed) {
            (Some(e), _) if (e as i64) <= now => bad.push(format!("{addr}: its certificate has expired")),
            (Some(e), Some(r)) if e > r && (e - now as f64) < 0.25 * (e - r) => bad.push(format!(
                "{addr}: its certificate is past 75% of its lifetime without renewal (expires in {})",
                certs::human((e as i64 - now).unsigned_abs())
            )),
            (Some(_), _) => good += 1,
            (None, _) => bad.push(format!("{addr}: no meshid_sidecar_certificate_expiry_timestamp_seconds (not a sidecar's stats port, e.g. 15020?)")),
        }
    }
    if bad.is_empty() {
        Finding::ok(
            NAME,
            format!("{good} sidecar(s) hold a certificate they renew in time"),
        )
    } else {
        Finding::fail(
            NAME,
            bad.join("; "),
            "look at the sidecar's log (kubectl logs POD -c meshid-sidecar) and whether it reaches the CA (the ca-tls check)",
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::rotation::{RotationReport, SidecarReport};

    fn replica(metrics: &str, sidecars: Vec<SidecarReport>) -> Replica {
        Replica {
            addr: "127.0.0.1:9090".parse().unwrap(),
            ready: Ok(()),
            rotation: Some(Ok(RotationReport {
                bundle_version: 2,
                authorities: Vec::new(),
                sidecars,
                next_step: String::new(),
                unknown: Vec::new(),
                processes: Vec::new(),
                turned_away_unlisted: Vec::new(),
            })),
            metrics: Some(Scrape::parse(metrics)),
            jwks: None,
        }
    }

    fn sidecar(identity: &str, acked_version: u64) -> SidecarReport {
        SidecarReport {
            serving_authority: Some("1".into()),
            ..SidecarReport::connected("0123456789abcdef", identity, acked_version)
        }
    }

    #[test]
    fn lagging_sidecars_are_named_and_refusals_counted() {
        let id = "spiffe://cluster.local/ns/shop/sa/frontend";
        let lagging = replica(
            "meshid_ca_bundle_version 2\nmeshid_ca_sidecars{acked_version=\"1\"} 1\n\
             meshid_ca_sidecars{acked_version=\"2\"} 3\n",
            vec![
                sidecar(id, 1),
                sidecar("spiffe://cluster.local/ns/a/sa/b", 2),
            ],
        );
        let f = sidecars(&[lagging], 0);
        assert_eq!(f.status, crate::check::Status::Warn);
        assert_eq!(
            f.summary,
            format!("1 of 4 connected sidecar(s) have not acknowledged trust bundle v2: {id} (v1)")
        );

        let refused = replica(
            "meshid_ca_bundle_version 2\nmeshid_ca_sidecars{acked_version=\"2\"} 1\n\
             meshid_ca_issue_requests_total{method=\"renewal\",result=\"issued\"} 4\n\
             meshid_ca_issue_requests_total{method=\"renewal\",result=\"untrusted_chain\"} 2\n",
            Vec::new(),
        );
        let f = sidecars(&[refused], 0);
        assert_eq!(f.status, crate::check::Status::Warn);
        assert!(
            f.summary
                .starts_with("2 renewal(s) refused (untrusted_chain), 4 issued"),
            "{}",
            f.summary
        );

        let fine = replica(
            "meshid_ca_bundle_version 2\nmeshid_ca_sidecars{acked_version=\"2\"} 1\n",
            Vec::new(),
        );
        assert_eq!(sidecars(&[fine], 0).status, crate::check::Status::Ok);
    }
}
