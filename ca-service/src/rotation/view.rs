//! Building the report: this CA's view of its authorities, sidecars and issuance, and the merge of
//! several CA processes' views.

use std::collections::HashMap;
use std::path::Path;

use meshid_runtime::time::unix_now;
use x509_parser::prelude::{FromDer, X509Certificate};

use super::fleet::IssuedView;
use super::gates::refresh;
use super::report::{AuthorityView, CaProcess, RotationReport, SidecarReport, UnlistedTurnedAway};
use crate::authorities::{AuthorityState, RotationState};
use crate::ca_dir::read_bundle;

/// The most holders of long certificates a report names per authority.
pub const MAX_LONG_HELD_BY: usize = 16;

fn not_after(der: &[u8]) -> i64 {
    X509Certificate::from_der(der)
        .map(|(_, c)| c.validity().not_after.timestamp())
        .unwrap_or(0)
}

/// Builds the report from the directory state and this CA's fleet view. Certificates marked per
/// identity (asked to live longer than the default; a renewal's per identity and lineage:
/// [`crate::issued::long_key`]) count for an authority unless `revocations` revokes their
/// identity, or their lineage: no peer accepts them, and once the authority is retired nothing
/// does, revoked or not (so an entry that lapses, or an `unrevoke`, after the retirement brings
/// none of them back).
pub fn report(
    ca_dir: &Path,
    state: &RotationState,
    sidecars: Vec<SidecarReport>,
    unlisted: Vec<UnlistedTurnedAway>,
    issued: &HashMap<String, IssuedView>,
    process: CaProcess,
    revocations: &crate::revocations::Revocations,
) -> RotationReport {
    let now = unix_now();
    let held = |key: &str| {
        let (identity, lineage) = crate::issued::split_long_key(key);
        !revocations.revokes_identity(identity, now)
            && !lineage.is_some_and(|l| revocations.revokes_serial(l, now))
    };
    let authorities = state
        .authorities
        .iter()
        .filter(|a| a.state != AuthorityState::Gone)
        .map(|a| {
            let files = state.files_of(ca_dir, a);
            let root = read_bundle(&files.path("root.pem"))
                .ok()
                .and_then(|r| r.into_iter().next());
            // Bounded and regular only (a FIFO or a device there would block the CA's directory
            // follower, which reads this every second).
            let inter = crate::ca_dir::read_file(
                &files.path("intermediate.pem"),
                crate::ca_dir::MAX_CA_FILE,
            )
            .ok()
            .and_then(|pem| {
                use rustls_pki_types::pem::PemObject;
                rustls_pki_types::CertificateDer::from_pem_slice(&pem).ok()
            });
            let i = issued.get(&a.name).cloned().unwrap_or_default();
            let (mut live, mut latest) = (i.live, i.latest_not_after);
            for (identity, (n, until)) in &i.long {
                if held(identity) {
                    live = live.saturating_add(*n);
                    latest = latest.max(*until);
                }
            }
            let long_marks: Vec<(String, i64)> = crate::issued::long_issued_until(ca_dir, &a.name)
                .into_iter()
                .filter(|(key, until)| held(key) && *until > now)
                .collect();
            let issued_until = long_marks
                .iter()
                .map(|(_, until)| *until)
                .fold(crate::issued::issued_until(ca_dir, &a.name), i64::max);
            let mut long_held_by: Vec<String> = i
                .long
                .iter()
                .filter(|(key, _)| held(key))
                .map(|(key, _)| key.clone())
                .chain(long_marks.into_iter().map(|(key, _)| key))
                .collect();
            long_held_by.sort();
            long_held_by.dedup();
            long_held_by.truncate(MAX_LONG_HELD_BY);
            AuthorityView {
                name: a.name.clone(),
                state: a.state.as_str().into(),
                root_sha256: root
                    .as_ref()
                    .map(|r| crate::serial::sha256_hex(r))
                    .unwrap_or_default(),
                root_not_after: root.as_ref().map(|r| not_after(r)).unwrap_or(0),
                intermediate_not_after: inter.as_ref().map(|c| not_after(c)).unwrap_or(0),
                in_bundle_since: a.in_bundle_since,
                live_certificates: live,
                latest_certificate_expiry: latest,
                issued_until,
                long_held_by,
            }
        })
        .collect();
    let mut r = RotationReport {
        bundle_version: state.bundle_version,
        authorities,
        sidecars,
        next_step: String::new(),
        unknown: Vec::new(),
        processes: vec![process],
        turned_away_unlisted: unlisted,
    };
    refresh(&mut r, state, unix_now());
    r
}

/// A CA process as its report describes it: `process` (its fleet's view) with the version of the
/// `bundle` it serves, and the highest version it served without the root of the authority
/// `rotation` (read from the CA directory `files`) has prepared, and its clock now. A prepared
/// root that cannot be read (its files not mounted here) is not measured (0).
pub fn process(
    process: CaProcess,
    bundle: &crate::service::Bundle,
    files: &Path,
    rotation: &RotationState,
) -> CaProcess {
    let served_without_prepared_root = rotation
        .find(AuthorityState::Prepared)
        .and_then(|a| read_bundle(&rotation.files_of(files, a).path("root.pem")).ok())
        .and_then(|roots| roots.into_iter().next())
        .map_or(0, |root| bundle.served_without(&root));
    CaProcess {
        bundle_version: bundle.version,
        served_without_prepared_root,
        reported_unix: unix_now(),
        ..process
    }
}

/// Merges the fleet views of several CA processes (each knows the sidecars connected to it): an
/// instance is its full key (`SidecarReport::key`), never its 16-digit label, which two sidecars
/// may share (by chance, or by a key ground to collide with another's label and hide it).
pub fn merged(state: &RotationState, reports: Vec<RotationReport>) -> RotationReport {
    let mut sidecars: HashMap<String, SidecarReport> = HashMap::new();
    let mut live: HashMap<String, (usize, i64, i64)> = HashMap::new();
    let mut held_by: HashMap<String, Vec<String>> = HashMap::new();
    for r in &reports {
        for s in &r.sidecars {
            // Older CAs report the label alone.
            let key = if s.key.is_empty() {
                &s.instance
            } else {
                &s.key
            };
            let e = sidecars.entry(key.clone()).or_insert_with(|| s.clone());
            // The newest report of what it serves wins (a sidecar may move between CA processes).
            if s.serving_not_after > e.serving_not_after {
                e.serving_authority = s.serving_authority.clone();
                e.serving_not_after = s.serving_not_after;
                e.identity = s.identity.clone();
                e.serial = s.serial.clone();
            }
            // Revoked only if every process that knows it says so (their lists may differ for
            // a moment after `revoke`): counting it is the safe side.
            e.revoked &= s.revoked;
            e.connected |= s.connected;
            if e.turned_away.is_empty() {
                e.turned_away.clone_from(&s.turned_away);
            }
            e.acked_version = e.acked_version.max(s.acked_version);
            e.held_version = e.held_version.max(s.held_version);
            e.file_mode |= s.file_mode;
            e.last_seen = e.last_seen.max(s.last_seen);
            if e.lineage.is_empty() {
                e.lineage.clone_from(&s.lineage);
            }
        }
        for a in &r.authorities {
            let e = live.entry(a.name.clone()).or_default();
            e.0 = e.0.saturating_add(a.live_certificates);
            e.1 = e.1.max(a.latest_certificate_expiry);
            e.2 = e.2.max(a.issued_until);
            held_by
                .entry(a.name.clone())
                .or_default()
                .extend(a.long_held_by.iter().cloned());
        }
    }
    let processes: Vec<CaProcess> = reports.iter().flat_map(|r| r.processes.clone()).collect();
    let unlisted: Vec<UnlistedTurnedAway> = reports
        .iter()
        .flat_map(|r| r.turned_away_unlisted.clone())
        .collect();
    let mut base = reports.into_iter().next().unwrap_or(RotationReport {
        bundle_version: state.bundle_version,
        authorities: Vec::new(),
        sidecars: Vec::new(),
        next_step: String::new(),
        unknown: Vec::new(),
        processes: Vec::new(),
        turned_away_unlisted: Vec::new(),
    });
    base.processes = processes;
    base.turned_away_unlisted = unlisted;
    for a in &mut base.authorities {
        if let Some((n, t, until)) = live.get(&a.name) {
            a.live_certificates = *n;
            a.latest_certificate_expiry = *t;
            a.issued_until = *until;
        }
        if let Some(keys) = held_by.get_mut(&a.name) {
            keys.sort();
            keys.dedup();
            keys.truncate(MAX_LONG_HELD_BY);
            a.long_held_by = std::mem::take(keys);
        }
    }
    base.sidecars = sidecars.into_values().collect();
    // Turned away by one process, registered on another: measured there.
    for s in base.sidecars.iter_mut().filter(|s| s.connected) {
        s.turned_away.clear();
    }
    base.sidecars.sort_by(|a, b| a.identity.cmp(&b.identity));
    let now = super::gates::report_time(&base, unix_now());
    refresh(&mut base, state, now);
    base
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::authorities::AuthorityRecord;

    /// The directory follower builds this report every second: a FIFO or a device in place of a
    /// prepared authority's intermediate (which `Authority::load` does not read) is skipped at
    /// once, not waited on or read for ever.
    #[test]
    fn a_fifo_or_a_device_in_place_of_an_intermediate_does_not_hold_the_report() {
        use crate::ca_dir::hostile_files::{endless, fifo, within};
        let dir = tempfile::tempdir().unwrap();
        let td = meshid_identity::TrustDomain::new("example.org").unwrap();
        crate::authority::init(dir.path(), &td, None).unwrap();
        crate::rotation::prepare(dir.path(), None).unwrap();
        let path = dir.path().join("a2-intermediate.pem");
        for (kind, hostile) in [("fifo", fifo as fn(&Path)), ("/dev/zero", endless)] {
            std::fs::remove_file(&path).unwrap();
            hostile(&path);
            let at = dir.path().to_owned();
            let authorities = within(kind, move || {
                let state = RotationState::load(&at).unwrap();
                let revocations = crate::revocations::Revocations::load(&at).unwrap();
                report(
                    &at,
                    &state,
                    Vec::new(),
                    Vec::new(),
                    &HashMap::new(),
                    CaProcess::default(),
                    &revocations,
                )
                .authorities
                .len()
            });
            assert_eq!(authorities, 2, "{kind}");
        }
    }

    #[test]
    fn a_sidecar_turned_away_by_one_process_and_registered_on_another_is_measured() {
        let state = RotationState {
            bundle_version: 2,
            renew_now_at: None,
            revocations_written_at: None,
            authorities: vec![AuthorityRecord {
                name: "2".into(),
                prefix: String::new(),
                state: AuthorityState::Prepared,
                in_bundle_since: 2,
                signed_until: None,
                signing_since: None,
            }],
        };
        let sidecar = |connected: bool, turned_away: &str| SidecarReport {
            instance: "0123456789abcdef".into(),
            key: String::new(),
            identity: "spiffe://td/a".into(),
            connected,
            acked_version: if connected { 2 } else { 0 },
            held_version: 0,
            serving_authority: None,
            serving_not_after: i64::MAX,
            file_mode: false,
            serial: String::new(),
            revoked: false,
            turned_away: turned_away.into(),
            last_seen: 0,
            lineage: String::new(),
        };
        let process = |sidecars: Vec<SidecarReport>| RotationReport {
            bundle_version: 2,
            authorities: Vec::new(),
            sidecars,
            next_step: String::new(),
            unknown: Vec::new(),
            processes: vec![CaProcess::default()],
            turned_away_unlisted: Vec::new(),
        };
        let full = process(vec![sidecar(false, "no room")]);
        let roomy = process(vec![sidecar(true, "")]);
        let merged_both = merged(&state, vec![full.clone(), roomy]);
        assert_eq!(merged_both.sidecars.len(), 1);
        assert!(merged_both.sidecars[0].connected);
        assert!(merged_both.sidecars[0].turned_away.is_empty());
        assert!(
            merged_both.next_step.contains("activate"),
            "{}",
            merged_both.next_step
        );
        // Turned away everywhere: still unknown after the merge.
        let alone = merged(&state, vec![full]);
        assert_eq!(alone.sidecars[0].turned_away, "no room");
    }

    #[test]
    fn instances_are_merged_by_their_full_key_not_their_label() {
        let state = RotationState {
            bundle_version: 1,
            renew_now_at: None,
            revocations_written_at: None,
            authorities: Vec::new(),
        };
        let label = "0123456789abcdef";
        let sidecar = |key: &str, identity: &str, acked_version: u64| SidecarReport {
            key: key.into(),
            ..SidecarReport::connected(label, identity, acked_version)
        };
        let process = |sidecars: Vec<SidecarReport>| RotationReport {
            bundle_version: 1,
            authorities: Vec::new(),
            sidecars,
            next_step: String::new(),
            unknown: Vec::new(),
            processes: vec![CaProcess::default()],
            turned_away_unlisted: Vec::new(),
        };
        let honest = format!("{label}{}", "1".repeat(48));
        let liar = format!("{label}{}", "2".repeat(48));
        // Two keys with one label, on two processes: two instances, the honest one's
        // acknowledgement not lifted by the liar's.
        let merged_two = merged(
            &state,
            vec![
                process(vec![sidecar(&honest, "spiffe://td/honest", 0)]),
                process(vec![sidecar(&liar, "spiffe://td/liar", 1)]),
            ],
        );
        let mut seen: Vec<(String, u64)> = merged_two
            .sidecars
            .iter()
            .map(|s| (s.identity.clone(), s.acked_version))
            .collect();
        seen.sort();
        assert_eq!(
            seen,
            [
                ("spiffe://td/honest".to_owned(), 0),
                ("spiffe://td/liar".to_owned(), 1)
            ]
        );
        assert!(merged_two.sidecars.iter().all(|s| s.instance == label));
        // One key on two processes: one instance.
        let merged_one = merged(
            &state,
            vec![
                process(vec![sidecar(&honest, "spiffe://td/honest", 0)]),
                process(vec![sidecar(&honest, "spiffe://td/honest", 1)]),
            ],
        );
        assert_eq!(merged_one.sidecars.len(), 1);
        assert_eq!(merged_one.sidecars[0].acked_version, 1);
    }
}
