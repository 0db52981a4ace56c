//! The rotation gates: what `activate` and `retire` wait for, decided from a report and the
//! directory state alone (pure; the report is measured elsewhere).

use super::report::RotationReport;
use crate::authorities::{AuthorityState, RotationState};

/// Recomputes what follows from the sidecars: the next step and the unknowns.
pub fn refresh(r: &mut RotationReport, state: &RotationState, now: i64) {
    r.unknown = unknown_sidecars(r);
    r.next_step = next_step(state, r, now);
}

/// Sidecars whose trust the CA cannot measure: file mode takes its anchors from files.
pub fn unknown_sidecars(r: &RotationReport) -> Vec<String> {
    r.sidecars
        .iter()
        .filter(|s| (s.connected || !s.turned_away.is_empty()) && s.file_mode && !s.revoked)
        .map(|s| {
            format!(
                "sidecar {} ({}) is in file mode: which roots it trusts is unknown to the CA; \
                 check that its bundle file holds the roots before each step",
                s.identity, s.instance
            )
        })
        .collect()
}

/// How long after a CA process starts the sidecars of a process it replaced may still be on their
/// way back. A sidecar whose bundle stream breaks tries again at once, then at most every 10 s
/// (its backoff's cap, jittered down to half), each try taking up to 5 s to connect; a restarted
/// CA pod is reached once its readiness probe passed (every 5 s in the chart) and the Service's
/// endpoints list it: about 25 s in all, doubled. Until then such a sidecar is on no process's
/// list, and the gate would not know it exists. The window runs from the new process's start, not
/// from when the sidecars lose their streams: those of a process that stops later (the old pod of
/// a rolling update, stopped once the new one is ready) are not covered, and the refusal says so.
pub const RECONNECT_WINDOW_SECONDS: i64 = 60;

/// Until when a CA process started at `started` holds `activate` (see
/// [`super::report::CaProcess::reconnect_until`]): [`RECONNECT_WINDOW_SECONDS`] after its start,
/// but never longer than the longest certificate lifetime (`max_ttl_seconds`) or past
/// `recorded_until`, the latest expiry the CA directory's issuance marks gave for certificates
/// issued before the start: a sidecar whose certificate expired serves nothing, and one that
/// renewed reconnects with its new certificate. `recorded_until` at or before the start (nothing
/// issued earlier can be live: a new CA) holds nothing; `None` (not known: the directory cannot be
/// written, or a mark cannot be read) holds the whole window.
pub fn reconnect_until(started: i64, max_ttl_seconds: u64, recorded_until: Option<i64>) -> i64 {
    let longest = i64::try_from(max_ttl_seconds).unwrap_or(i64::MAX);
    let window_end = started.saturating_add(RECONNECT_WINDOW_SECONDS.min(longest));
    match recorded_until {
        Some(until) if until <= started => 0,
        Some(until) => window_end.min(until),
        None => window_end,
    }
}

/// The time the gates decide at: the earliest clock of the CA processes that reported it (their
/// certificate expiries, starts and issuance are in their time; the earliest is the side that
/// waits longer), or `fallback` (this machine's clock) when none did.
pub fn report_time(r: &RotationReport, fallback: i64) -> i64 {
    reported_times(r).min().unwrap_or(fallback)
}

/// The latest clock of the CA processes that reported it, or `fallback`: what a step records as
/// the end of something (an authority's signing) in the CAs' time, on the side that waits longer.
pub fn report_time_latest(r: &RotationReport, fallback: i64) -> i64 {
    reported_times(r).max().unwrap_or(fallback)
}

fn reported_times(r: &RotationReport) -> impl Iterator<Item = i64> + '_ {
    r.processes
        .iter()
        .map(|p| p.reported_unix)
        .filter(|t| *t > 0)
}

/// What releases the instance `s` alone, leaving the other instances of its identity (the honest
/// replicas of its service account) be: revoking the first serial of its lineage (every renewal
/// of it too), or its certificate's serial when its lineage is not known.
pub fn release(s: &super::report::SidecarReport) -> String {
    match (s.lineage.as_str(), s.serial.as_str()) {
        ("", "") => {
            "no serial reported (an older CA): only `meshid-ca revoke --id` releases it".to_owned()
        }
        ("", serial) => format!("release it alone with `meshid-ca revoke --serial {serial}`"),
        (lineage, _) => format!(
            "release it alone with `meshid-ca revoke --serial {lineage}` (its lineage: its \
             renewals too)"
        ),
    }
}

/// What `activate` is waiting for (empty: it may run) at `now`. An instance whose certificate has
/// expired does not count: it can take part in no handshake (peers refuse the certificate, and the
/// sidecar itself stops serving), and the certificate it renews to comes with the bundle the CA
/// serves, new root included; until then its stream may linger (a stuck client, a connection not
/// yet closed). The certificate is known from the stream's connection, acknowledged or not; an
/// instance with none recorded (0) counts. Nor does a revoked instance count (its identity or its
/// certificate is in the revocation list): no peer accepts it any more, and an instance that lies by
/// never acknowledging must not hold the rotation after it has been revoked.
///
/// A sidecar a CA process turned away for lack of room (its bundle stream could not be
/// registered) counts as one that has not acknowledged: the CA cannot see what it trusts. So
/// filling the room cannot hide sidecars from the gate. So does one gone (its stream closed, its
/// certificate live: pushed out of the CA's connections, or its pod gone) before it acknowledged.
/// Neither counts while a connected instance of its lineage (the same sidecar, renewed) stands
/// for it; and revoking the lineage's first serial releases all of them.
pub fn activate_blockers(state: &RotationState, r: &RotationReport, now: i64) -> Vec<String> {
    let Some(prepared) = state.find(AuthorityState::Prepared) else {
        return vec!["no prepared authority: run `meshid-ca rotate prepare` first".into()];
    };
    // A gone instance whose lineage has a connected instance renewed and reconnected: that one
    // stands for it.
    let connected_lineages: std::collections::HashSet<&str> = r
        .sidecars
        .iter()
        .filter(|s| s.connected && !s.lineage.is_empty())
        .map(|s| s.lineage.as_str())
        .collect();
    let stood_for = |s: &super::report::SidecarReport| {
        !s.lineage.is_empty() && connected_lineages.contains(s.lineage.as_str())
    };
    let gone = |s: &super::report::SidecarReport| {
        !s.connected && s.turned_away.is_empty() && s.last_seen > 0 && !stood_for(s)
    };
    // Likewise a sidecar turned away (on some CA process) whose lineage has an instance connected.
    let turned_away = |s: &super::report::SidecarReport| {
        !s.connected && !s.turned_away.is_empty() && !stood_for(s)
    };
    let mut blockers: Vec<String> = r
        .sidecars
        .iter()
        .filter(|s| (s.connected || turned_away(s) || gone(s)) && !s.file_mode && !s.revoked)
        .filter(|s| s.acked_version < prepared.in_bundle_since)
        .filter(|s| s.serving_not_after == 0 || s.serving_not_after > now)
        .map(|s| {
            if s.connected {
                format!(
                    "sidecar {} ({}) has acknowledged bundle v{}, needs v{} (with the new root); {}",
                    s.identity,
                    s.instance,
                    s.acked_version,
                    prepared.in_bundle_since,
                    release(s)
                )
            } else if s.turned_away.is_empty() {
                format!(
                    "sidecar {} ({}) not seen since {} (its bundle stream closed having acknowledged \
                     bundle v{}, not v{}): it may still serve until its certificate expires ({}); \
                     `activate` waits until it reconnects and acknowledges, that expiry, or it is \
                     revoked; {}",
                    s.identity,
                    s.instance,
                    s.last_seen,
                    s.acked_version,
                    prepared.in_bundle_since,
                    s.serving_not_after,
                    release(s)
                )
            } else {
                format!(
                    "sidecar {} ({}) was turned away by a CA ({}): what it trusts is unknown until \
                     a stream of its is registered (make room on the CA: more replicas or higher \
                     limits), its certificate expires ({}), or it is revoked; {}",
                    s.identity,
                    s.instance,
                    s.turned_away,
                    s.serving_not_after,
                    release(s)
                )
            }
        })
        .collect();
    for p in &r.processes {
        // A process that replaced another knows none of the sidecars that one served until they
        // reconnect: with none listed, the gate would say every sidecar trusts the new root.
        if p.reconnect_until > now {
            blockers.push(format!(
                "a CA process started {}s ago (at {}); its sidecars may not have reconnected yet \
                 (certificates issued before it started may be live, and what the process it \
                 replaced knew of their sidecars is lost): activate waits until {} ({}s from \
                 now); this wait runs from that start only: after a rollout, or while another CA \
                 process stops, wait a minute after the last old process stopped",
                now.saturating_sub(p.started_unix).max(0),
                p.started_unix,
                p.reconnect_until,
                p.reconnect_until - now
            ));
        }
        // An acknowledgement names a version of the process it was sent to. A process that served
        // a version at or above the prepared root's without that root (it numbered a change of
        // bundle.pem made by hand itself, and `rotate prepare` did not hear of it, or the root was
        // taken out of bundle.pem since) makes every acknowledgement of such a version
        // meaningless: its sidecars cannot be told apart, so all of them wait.
        if p.served_without_prepared_root >= prepared.in_bundle_since {
            blockers.push(format!(
                "a CA process (started at {}) served bundle v{} without the new root, which the \
                 directory says is in every bundle from v{} (bundle.pem changed by hand, or a \
                 revocation whose version was not moved on, before a `rotate prepare` that did \
                 not name this process with --admin; or the root was taken out of bundle.pem): \
                 acknowledgements of its versions do not show trust in the new root. Make sure \
                 bundle.pem holds the new root, then restart that CA process (it then serves the \
                 directory's version)",
                p.started_unix, p.served_without_prepared_root, prepared.in_bundle_since
            ));
        }
        if p.turned_away_unlisted > 0 && p.turned_away_unlisted_until > now {
            blockers.push(format!(
                "a CA process turned away (or lost the streams of) more sidecars than it lists \
                 ({1} turned away, {4} gone), of more identities than the {2} it counts them for \
                 apart ({0} beyond): what they trust is unknown until their certificates expire \
                 ({3}), revoked or not",
                p.turned_away_unlisted,
                super::fleet::MAX_TURNED_AWAY,
                super::fleet::MAX_UNLISTED_IDENTITIES,
                p.turned_away_unlisted_until,
                super::fleet::MAX_DEPARTED,
            ));
        }
    }
    for u in &r.turned_away_unlisted {
        if !u.revoked && u.until > now {
            blockers.push(format!(
                "a CA process turned away (or lost the streams of) sidecars of {} beyond those \
                 it lists ({} turned away, {} gone of its namespace; {} beyond): what they trust \
                 is unknown until \
                 their certificates expire ({}) or the identity is revoked",
                u.identity,
                super::fleet::MAX_TURNED_AWAY,
                super::fleet::MAX_DEPARTED_PER_NAMESPACE,
                u.refusals,
                u.until
            ));
        }
    }
    blockers
}

/// What `retire` is waiting for (empty: it may run).
pub fn retire_blockers(state: &RotationState, r: &RotationReport, now: i64) -> Vec<String> {
    let Some(retiring) = state.find(AuthorityState::Retiring) else {
        return vec!["no retiring authority: run `meshid-ca rotate activate` first".into()];
    };
    let mut blockers = Vec::new();
    if let Some(a) = r.authorities.iter().find(|a| a.name == retiring.name)
        && a.live_certificates > 0
    {
        blockers.push(format!(
            "{} certificate(s) issued under authority {} are still live (the last expires at {})",
            a.live_certificates, a.name, a.latest_certificate_expiry
        ));
    }
    // Every CA process records in the CA directory, before handing a certificate out, how long it
    // may live: the latest record bounds what any process, running or not, issued.
    if let Some(a) = r.authorities.iter().find(|a| a.name == retiring.name)
        && a.issued_until > now
    {
        blockers.push(format!(
            "certificates issued under authority {} may be live until {} (the latest not-after \
             the CA processes recorded in the CA directory; {}s from now)",
            a.name,
            a.issued_until,
            a.issued_until - now
        ));
    }
    // Certificates asked to live longer than the default: who holds them, and what releases
    // the gate from each (no peer accepts a revoked one).
    if let Some(a) = r.authorities.iter().find(|a| a.name == retiring.name)
        && !a.long_held_by.is_empty()
    {
        let holders: Vec<String> = a
            .long_held_by
            .iter()
            .map(|key| match crate::issued::split_long_key(key) {
                (identity, Some(lineage)) => {
                    format!("{identity}, lineage {lineage} (`meshid-ca revoke --serial {lineage}`)")
                }
                (identity, None) => format!("{identity} (`meshid-ca revoke --id {identity}`)"),
            })
            .collect();
        blockers.push(format!(
            "of them, certificates longer than the default lifetime are held by: {}; revoking \
             one releases this gate from its certificates",
            holders.join("; ")
        ));
    }
    // A process that cannot record (a read-only CA directory) counts only what it issued since it
    // started: what an earlier process issued under the retiring authority may be live until
    // min(start, end of signing) + the longest lifetime.
    let signed_until = retiring.signed_until.unwrap_or(now);
    if let Some(until) = r
        .processes
        .iter()
        .filter(|p| !p.records_issuance)
        // A process running since before the authority began signing saw all it issued.
        .filter(|p| {
            retiring
                .signing_since
                .is_none_or(|since| p.started_unix > since)
        })
        .map(|p| {
            p.started_unix
                .min(signed_until)
                .saturating_add(i64::try_from(p.max_ttl_seconds).unwrap_or(i64::MAX))
        })
        .filter(|until| *until > now)
        .max()
    {
        blockers.push(format!(
            "a CA process that cannot record issuance in the CA directory (read-only?) started \
             during authority {}'s lifetime and cannot know what an earlier process issued under \
             it: such certificates may be live until {until} (start or end of signing + \
             --max-ttl; {}s from now)",
            retiring.name,
            until - now
        ));
    }
    for s in &r.sidecars {
        if s.connected
            && !s.revoked
            && s.serving_authority.as_deref() == Some(retiring.name.as_str())
            && s.serving_not_after > now
        {
            blockers.push(format!(
                "sidecar {} ({}) still serves a certificate under authority {} until {}",
                s.identity, s.instance, retiring.name, s.serving_not_after
            ));
        }
    }
    blockers
}

/// Blockers shown in a refusal or the next step: the first few and how many more (a fleet of
/// thousands must not make a megabyte-long message; `rotate status` lists every sidecar).
const SHOWN_BLOCKERS: usize = 10;

pub fn summarize(blockers: &[String]) -> String {
    let shown = blockers[..blockers.len().min(SHOWN_BLOCKERS)].join("; ");
    match blockers.len().saturating_sub(SHOWN_BLOCKERS) {
        0 => shown,
        more => format!("{shown}; and {more} more (see `meshid-ca rotate status`)"),
    }
}

fn next_step(state: &RotationState, r: &RotationReport, now: i64) -> String {
    let step = next_step_measured(state, r, now);
    let unknown = r
        .sidecars
        .iter()
        .filter(|s| (s.connected || !s.turned_away.is_empty()) && s.file_mode && !s.revoked)
        .count();
    if unknown == 0 || step.starts_with("none") {
        step
    } else {
        format!("{step} ({unknown} file-mode sidecar(s) unknown: not measured)")
    }
}

fn next_step_measured(state: &RotationState, r: &RotationReport, now: i64) -> String {
    if state.find(AuthorityState::Prepared).is_some() {
        let b = activate_blockers(state, r, now);
        if b.is_empty() {
            "activate: every connected sidecar trusts the new root".into()
        } else {
            format!("activate is waiting: {}", summarize(&b))
        }
    } else if state.find(AuthorityState::Retiring).is_some() {
        let b = retire_blockers(state, r, now);
        if b.is_empty() {
            "retire: nothing live depends on the old root".into()
        } else {
            format!("retire is waiting: {}", summarize(&b))
        }
    } else {
        "none: run `rotate prepare` to start a root rotation".into()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::authorities::AuthorityRecord;
    use crate::rotation::fleet::CaProcess;
    use crate::rotation::report::{AuthorityView, SidecarReport};

    fn sidecar(instance: &str, acked: u64, authority: &str, not_after: i64) -> SidecarReport {
        SidecarReport {
            serving_authority: Some(authority.into()),
            serving_not_after: not_after,
            ..SidecarReport::connected(instance, &format!("spiffe://td/{instance}"), acked)
        }
    }

    fn state(states: &[(&str, AuthorityState, u64)], version: u64) -> RotationState {
        RotationState {
            bundle_version: version,
            renew_now_at: None,
            revocations_written_at: None,
            authorities: states
                .iter()
                .map(|(n, s, v)| AuthorityRecord {
                    name: (*n).into(),
                    prefix: String::new(),
                    state: *s,
                    in_bundle_since: *v,
                    signed_until: None,
                    signing_since: None,
                })
                .collect(),
        }
    }

    #[test]
    fn long_refusals_are_summarized() {
        let many: Vec<String> = (0..25).map(|i| format!("sidecar {i}")).collect();
        let text = summarize(&many);
        assert!(
            text.contains("sidecar 9;") && !text.contains("sidecar 10;"),
            "{text}"
        );
        assert!(
            text.ends_with("and 15 more (see `meshid-ca rotate status`)"),
            "{text}"
        );
        assert_eq!(summarize(&many[..2]), "sidecar 0; sidecar 1");
    }

    #[test]
    fn activate_waits_for_every_connected_sidecar() {
        let st = state(
            &[
                ("1", AuthorityState::Active, 1),
                ("2", AuthorityState::Prepared, 2),
            ],
            2,
        );
        let mut r = RotationReport {
            bundle_version: 2,
            authorities: vec![],
            sidecars: vec![sidecar("a", 2, "1", 0), sidecar("b", 1, "1", 0)],
            next_step: String::new(),
            unknown: Vec::new(),
            processes: Vec::new(),
            turned_away_unlisted: Vec::new(),
        };
        // A lingering instance whose certificate expired cannot serve: it does not hold `activate`.
        r.sidecars.push(sidecar("old", 1, "1", 50));
        assert!(
            !activate_blockers(&st, &r, 100)
                .iter()
                .any(|b| b.contains("spiffe://td/old"))
        );
        assert_eq!(
            activate_blockers(&st, &r, 40).len(),
            2,
            "still valid at 40: it counts"
        );
        r.sidecars.pop();
        // A revoked instance (identity or certificate) can serve nobody: it does not count.
        r.sidecars[1].revoked = true;
        assert!(activate_blockers(&st, &r, 100).is_empty());
        r.sidecars[1].revoked = false;
        let b = activate_blockers(&st, &r, 100);
        assert_eq!(b.len(), 1);
        assert!(
            b[0].contains("spiffe://td/b") && b[0].contains("v1") && b[0].contains("v2"),
            "{b:?}"
        );
        r.sidecars[1].connected = false;
        assert!(
            activate_blockers(&st, &r, 100).is_empty(),
            "disconnected sidecars do not block"
        );
        // A file-mode sidecar is unknown: it cannot be measured, so it is reported, not counted.
        r.sidecars[1].connected = true;
        r.sidecars[1].file_mode = true;
        assert!(activate_blockers(&st, &r, 100).is_empty());
        refresh(&mut r, &st, 0);
        assert_eq!(r.unknown.len(), 1);
        assert!(
            r.unknown[0].contains("spiffe://td/b") && r.unknown[0].contains("file mode"),
            "{:?}",
            r.unknown
        );
        assert!(
            r.next_step.contains("1 file-mode sidecar(s) unknown"),
            "{}",
            r.next_step
        );
    }

    #[test]
    fn retire_waits_for_live_certificates_and_serving_sidecars() {
        let st = state(
            &[
                ("1", AuthorityState::Retiring, 1),
                ("2", AuthorityState::Active, 2),
            ],
            2,
        );
        let now = 1000;
        let mut r = RotationReport {
            bundle_version: 2,
            authorities: vec![AuthorityView {
                name: "1".into(),
                state: "retiring".into(),
                root_sha256: String::new(),
                root_not_after: 0,
                intermediate_not_after: 0,
                in_bundle_since: 1,
                live_certificates: 2,
                latest_certificate_expiry: 1500,
                issued_until: 0,
                long_held_by: Vec::new(),
            }],
            sidecars: vec![sidecar("a", 2, "1", 1200), sidecar("b", 2, "2", 5000)],
            next_step: String::new(),
            unknown: Vec::new(),
            processes: Vec::new(),
            turned_away_unlisted: Vec::new(),
        };
        let b = retire_blockers(&st, &r, now);
        assert_eq!(b.len(), 2, "{b:?}");
        assert!(
            b[0].contains("1500") && b[1].contains("spiffe://td/a"),
            "{b:?}"
        );
        r.sidecars[0].revoked = true;
        assert_eq!(
            retire_blockers(&st, &r, now).len(),
            1,
            "a revoked sidecar serves nobody"
        );
        r.sidecars[0].revoked = false;
        // What a file-mode sidecar serves is measured (it presented the chain): it still blocks.
        r.sidecars[0].file_mode = true;
        assert_eq!(retire_blockers(&st, &r, now).len(), 2);
        r.authorities[0].live_certificates = 0;
        r.sidecars[0].serving_authority = Some("2".into());
        assert!(retire_blockers(&st, &r, now).is_empty());
        // A CA process that started 100 s ago (restarted mid-rotation) cannot vouch for what an
        // earlier process issued: retire waits for start + the longest lifetime.
        r.processes = vec![
            CaProcess {
                started_unix: 0,
                max_ttl_seconds: 200,
                records_issuance: false,
                ..Default::default()
            },
            CaProcess {
                started_unix: 900,
                max_ttl_seconds: 200,
                records_issuance: false,
                ..Default::default()
            },
        ];
        let b = retire_blockers(&st, &r, now);
        assert_eq!(b.len(), 1, "{b:?}");
        assert!(b[0].contains("1100"), "{b:?}");
        assert!(retire_blockers(&st, &r, 1101).is_empty());
        // ... unless the authority had stopped signing long before the process started,
        let mut st2 = st.clone();
        st2.authorities[0].signed_until = Some(500);
        assert!(retire_blockers(&st2, &r, now).is_empty());
        // or the process has been running since before the authority began signing.
        let mut st3 = st.clone();
        st3.authorities[0].signing_since = Some(950);
        assert!(retire_blockers(&st3, &r, now).is_empty());
    }

    #[test]
    fn activate_waits_for_sidecars_turned_away_for_lack_of_room() {
        let st = state(
            &[
                ("1", AuthorityState::Active, 1),
                ("2", AuthorityState::Prepared, 2),
            ],
            2,
        );
        let turned_away = |instance: &str, not_after: i64| SidecarReport {
            connected: false,
            acked_version: 0,
            held_version: 0,
            serving_authority: None,
            turned_away: "this CA tracks 100000 sidecar instances already; retry later".into(),
            ..sidecar(instance, 0, "1", not_after)
        };
        let mut r = RotationReport {
            bundle_version: 2,
            authorities: vec![],
            // Every sidecar the CA could register has acknowledged.
            sidecars: vec![sidecar("a", 2, "1", 0), turned_away("hidden", 500)],
            next_step: String::new(),
            unknown: Vec::new(),
            processes: vec![CaProcess::default()],
            turned_away_unlisted: Vec::new(),
        };
        let b = activate_blockers(&st, &r, 100);
        assert_eq!(b.len(), 1, "{b:?}");
        assert!(
            b[0].contains("spiffe://td/hidden") && b[0].contains("turned away"),
            "{b:?}"
        );
        // Until its certificate expires, or it is revoked.
        assert!(activate_blockers(&st, &r, 500).is_empty());
        r.sidecars[1].revoked = true;
        assert!(activate_blockers(&st, &r, 100).is_empty());
        // Or an instance of its lineage (the same sidecar renewed, on this CA process or another)
        // is connected and stands for it; one of another lineage does not.
        r.sidecars[1].revoked = false;
        r.sidecars[1].lineage = "0c".into();
        r.sidecars[0].lineage = "0b".into();
        assert_eq!(activate_blockers(&st, &r, 100).len(), 1);
        r.sidecars[0].lineage = "0c".into();
        assert!(activate_blockers(&st, &r, 100).is_empty());
        r.sidecars[0].lineage = String::new();
        // A disconnected instance (its stream closed) is not one that was turned away.
        r.sidecars[1] = SidecarReport {
            connected: false,
            ..sidecar("gone", 0, "1", 500)
        };
        assert!(activate_blockers(&st, &r, 100).is_empty());
        // In file mode it is unknown, as a connected file-mode sidecar is.
        r.sidecars[1] = SidecarReport {
            file_mode: true,
            ..turned_away("files", 500)
        };
        assert!(activate_blockers(&st, &r, 100).is_empty());
        assert_eq!(unknown_sidecars(&r).len(), 1);
        // More than a process lists: counted, and waited for until their certificates expire.
        r.processes[0].turned_away_unlisted = 3;
        r.processes[0].turned_away_unlisted_until = 700;
        let b = activate_blockers(&st, &r, 100);
        assert_eq!(b.len(), 1, "{b:?}");
        assert!(
            b[0].contains("(3 beyond)") && b[0].contains("(700)"),
            "{b:?}"
        );
        assert!(activate_blockers(&st, &r, 700).is_empty());
    }

    #[test]
    fn revoking_an_identity_releases_activate_from_its_sidecars_turned_away_beyond_the_list() {
        use crate::rotation::fleet::{Caller, Fleet, FleetLimits, mark_revoked};
        use crate::rotation::report::UnlistedTurnedAway;
        let st = state(
            &[
                ("1", AuthorityState::Active, 1),
                ("2", AuthorityState::Prepared, 2),
            ],
            2,
        );
        let fleet = Fleet::with_limits(
            CaProcess::default(),
            FleetLimits {
                max_per_identity: 1,
                ..FleetLimits::default()
            },
        );
        // A liar's identity takes its one room and never acknowledges; its other 1,099 keys are
        // turned away: 1,024 listed by name, the rest beyond the list.
        let liar = "spiffe://td/ns/x/sa/liar";
        for i in 0..1_100 {
            let caller = Caller {
                key: format!("k{i}"),
                identity: liar.into(),
                file_mode: false,
                not_after: 5_000,
                serial: format!("{:x}", i + 1),
                lineage: String::new(),
                authority: None,
            };
            let _ = fleet.stream_opened(&caller, 100);
        }
        let report = |list: &crate::revocations::Revocations| {
            let (mut sidecars, _) = fleet.report(100);
            mark_revoked(&mut sidecars, list);
            RotationReport {
                bundle_version: 2,
                authorities: vec![],
                sidecars,
                next_step: String::new(),
                unknown: Vec::new(),
                processes: vec![fleet.process_now()],
                turned_away_unlisted: fleet.unlisted_turned_away(100, list),
            }
        };
        let none = crate::revocations::Revocations::default();
        let r = report(&none);
        assert_eq!(
            r.turned_away_unlisted,
            vec![UnlistedTurnedAway {
                identity: liar.into(),
                refusals: 75,
                until: 5_000,
                revoked: false,
            }]
        );
        let b = activate_blockers(&st, &r, 100);
        assert_eq!(b.len(), 1 + 1_024 + 1, "{}", summarize(&b));
        assert!(
            b.iter().any(|b| b.contains("; 75 beyond)")),
            "{}",
            summarize(&b)
        );
        // Revoked: no peer accepts any of them; nothing is left to wait for.
        let mut list = crate::revocations::Revocations::default();
        let id = meshid_identity::SpiffeId::parse(liar).unwrap();
        list.revoke(
            meshid_identity::revocation::Revoked::Id(id),
            0,
            10_000,
            String::new(),
        )
        .unwrap();
        let b = activate_blockers(&st, &report(&list), 100);
        assert!(b.is_empty(), "{}", summarize(&b));
    }

    #[test]
    fn after_a_restart_retire_waits_for_what_was_recorded_not_the_longest_lifetime() {
        let st = state(
            &[
                ("1", AuthorityState::Retiring, 1),
                ("2", AuthorityState::Active, 2),
            ],
            2,
        );
        let restarted = CaProcess {
            started_unix: 900,
            max_ttl_seconds: 86_400,
            records_issuance: true,
            ..Default::default()
        };
        let mut r = RotationReport {
            bundle_version: 2,
            authorities: vec![AuthorityView {
                name: "1".into(),
                state: "retiring".into(),
                root_sha256: String::new(),
                root_not_after: 0,
                intermediate_not_after: 0,
                in_bundle_since: 1,
                live_certificates: 0,
                latest_certificate_expiry: 0,
                // An earlier process issued under authority 1 until 1300 (recorded).
                issued_until: 1_300,
                long_held_by: Vec::new(),
            }],
            sidecars: Vec::new(),
            next_step: String::new(),
            unknown: Vec::new(),
            processes: vec![restarted],
            turned_away_unlisted: Vec::new(),
        };
        let b = retire_blockers(&st, &r, 1_000);
        assert_eq!(b.len(), 1, "{b:?}");
        assert!(
            b[0].contains("until 1300") && b[0].contains("300s from now"),
            "{b:?}"
        );
        assert!(
            retire_blockers(&st, &r, 1_300).is_empty(),
            "not start + a day"
        );
        // A process that cannot record falls back to start + --max-ttl, and says so.
        r.processes[0].records_issuance = false;
        let b = retire_blockers(&st, &r, 1_300);
        assert_eq!(b.len(), 1, "{b:?}");
        assert!(
            b[0].contains("read-only") && b[0].contains("87300"),
            "{b:?}"
        );
    }

    #[test]
    fn a_sidecar_gone_before_it_acknowledged_holds_activate_until_seen_expired_or_revoked() {
        let st = state(
            &[
                ("1", AuthorityState::Active, 1),
                ("2", AuthorityState::Prepared, 2),
            ],
            2,
        );
        let gone = |acked: u64, lineage: &str| SidecarReport {
            connected: false,
            last_seen: 50,
            lineage: lineage.into(),
            ..sidecar("gone", acked, "1", 500)
        };
        let report = |sidecars: Vec<SidecarReport>| RotationReport {
            bundle_version: 2,
            authorities: vec![],
            sidecars,
            next_step: String::new(),
            unknown: Vec::new(),
            processes: vec![CaProcess::default()],
            turned_away_unlisted: Vec::new(),
        };
        let mut r = report(vec![sidecar("a", 2, "1", 0), gone(1, "aa")]);
        let b = activate_blockers(&st, &r, 100);
        assert_eq!(b.len(), 1, "{b:?}");
        assert!(
            b[0].contains("spiffe://td/gone") && b[0].contains("not seen since 50"),
            "{b:?}"
        );
        // Until its certificate expires, or it is revoked.
        assert!(activate_blockers(&st, &r, 500).is_empty());
        r.sidecars[1].revoked = true;
        assert!(activate_blockers(&st, &r, 100).is_empty());
        // Gone after acknowledging the version activate waits for: nothing to wait for.
        r.sidecars[1] = gone(2, "aa");
        assert!(activate_blockers(&st, &r, 100).is_empty());
        // Renewed and reconnected (a connected instance of its lineage acknowledged): not waited for.
        let renewed = SidecarReport {
            lineage: "aa".into(),
            ..sidecar("gone", 2, "1", 900)
        };
        r = report(vec![renewed, gone(1, "aa")]);
        assert!(activate_blockers(&st, &r, 100).is_empty());
        // Another lineage's instance does not stand for it.
        r.sidecars[0].lineage = "bb".into();
        assert_eq!(activate_blockers(&st, &r, 100).len(), 1);
    }

    fn prepared() -> RotationState {
        state(
            &[
                ("1", AuthorityState::Active, 1),
                ("2", AuthorityState::Prepared, 2),
            ],
            2,
        )
    }

    fn report_of(sidecars: Vec<SidecarReport>, processes: Vec<CaProcess>) -> RotationReport {
        RotationReport {
            bundle_version: 2,
            authorities: vec![],
            sidecars,
            next_step: String::new(),
            unknown: Vec::new(),
            processes,
            turned_away_unlisted: Vec::new(),
        }
    }

    #[test]
    fn the_reconnect_window_ends_with_what_may_be_live() {
        let day = 86_400;
        // Nothing known about what may be live (a read-only directory): the whole window.
        assert_eq!(reconnect_until(1_000, day, None), 1_060);
        // Nothing issued before the start can be live (a new CA): no wait.
        assert_eq!(reconnect_until(1_000, day, Some(0)), 0);
        assert_eq!(reconnect_until(1_000, day, Some(1_000)), 0);
        // Certificates issued before it expire before the window ends: until then.
        assert_eq!(reconnect_until(1_000, day, Some(1_030)), 1_030);
        assert_eq!(reconnect_until(1_000, day, Some(9_000)), 1_060);
        // Never longer than the longest lifetime.
        assert_eq!(reconnect_until(1_000, 8, None), 1_008);
    }

    /// A CA process that restarted (a crash, an OOM kill, an eviction) knows none of the sidecars
    /// the process it replaced served: with none listed, `activate` would pass. It waits until
    /// they could have reconnected.
    #[test]
    fn a_process_started_moments_ago_holds_activate_until_its_sidecars_could_have_reconnected() {
        let st = prepared();
        let now = 10_000;
        let started = |ago: i64| {
            let started_unix = now - ago;
            CaProcess {
                started_unix,
                max_ttl_seconds: 86_400,
                reconnect_until: reconnect_until(started_unix, 86_400, Some(now + 3_600)),
                ..Default::default()
            }
        };
        let b = activate_blockers(&st, &report_of(vec![], vec![started(5)]), now);
        assert_eq!(b.len(), 1, "{b:?}");
        assert!(
            b[0].contains("a CA process started 5s ago")
                && b[0].contains("may not have reconnected yet")
                && b[0].contains(&format!("activate waits until {}", now + 55))
                && b[0].contains("runs from that start only: after a rollout"),
            "{b:?}"
        );
        // Started long ago: its sidecars are back (or listed as gone or turned away).
        assert!(activate_blockers(&st, &report_of(vec![], vec![started(1_000)]), now).is_empty());
        assert!(activate_blockers(&st, &report_of(vec![], vec![started(5)]), now + 55).is_empty());
        // A process that started before anything was issued has no one to wait for.
        let fresh = CaProcess {
            reconnect_until: reconnect_until(now - 5, 86_400, Some(0)),
            ..started(5)
        };
        assert!(activate_blockers(&st, &report_of(vec![], vec![fresh]), now).is_empty());
    }

    /// Every sidecar a refusal names comes with what releases it alone (`revoke --serial` of its
    /// lineage, or of its certificate), so one holdout does not take revoking its identity, which
    /// would cut off every honest replica of the service account.
    #[test]
    fn each_blocking_sidecar_is_named_with_what_releases_it_alone() {
        let st = prepared();
        let with = |instance: &str, serial: &str, lineage: &str| SidecarReport {
            serial: serial.into(),
            lineage: lineage.into(),
            ..sidecar(instance, 1, "1", 0)
        };
        let gone = SidecarReport {
            connected: false,
            last_seen: 50,
            ..with("gone", "0c", "0b")
        };
        let turned_away = SidecarReport {
            connected: false,
            turned_away: "no room".into(),
            ..with("away", "0e", "")
        };
        let r = report_of(
            vec![
                with("renewed", "0a", "01"),
                with("first", "02", ""),
                gone,
                turned_away,
                with("old", "", ""),
            ],
            vec![],
        );
        let b = activate_blockers(&st, &r, 100);
        assert_eq!(b.len(), 5, "{b:?}");
        for (blocker, release) in b.iter().zip([
            "`meshid-ca revoke --serial 01` (its lineage",
            "`meshid-ca revoke --serial 02`",
            "`meshid-ca revoke --serial 0b` (its lineage",
            "`meshid-ca revoke --serial 0e`",
            "only `meshid-ca revoke --id` releases it",
        ]) {
            assert!(blocker.contains(release), "{release}: {blocker}");
        }
    }

    #[test]
    fn the_gates_decide_at_the_earliest_clock_the_cas_reported() {
        let at = |reported_unix: i64| CaProcess {
            reported_unix,
            ..Default::default()
        };
        let r = report_of(vec![], vec![at(0), at(1_300), at(1_000)]);
        assert_eq!(report_time(&r, 5_000), 1_000);
        assert_eq!(report_time_latest(&r, 5_000), 1_300);
        // CAs before the field: this machine's clock.
        assert_eq!(report_time(&report_of(vec![], vec![at(0)]), 5_000), 5_000);
    }
}
