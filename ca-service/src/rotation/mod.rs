//! Restart-free CA rotation for platform teams: prepare (new root joins the bundle), activate (the CA
//! signs with it), retire (the old root leaves the bundle), each step refusing until the previous one
//! has measurably converged. The state lives in the CA directory; running CAs follow it.

pub mod fleet;
pub mod state;

use std::collections::HashMap;
use std::net::SocketAddr;
use std::path::Path;

use serde::{Deserialize, Serialize};
use x509_parser::prelude::{FromDer, X509Certificate};

use crate::authority::{self, AuthorityError, ImportedRoot};
pub use fleet::{CaProcess, Fleet, IssuedView, SidecarView};
pub use state::{AuthorityRecord, AuthorityState, RotationState};

/// One authority as `status` shows it.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct AuthorityView {
    pub name: String,
    pub state: String,
    pub root_sha256: String,
    pub root_not_after: i64,
    pub intermediate_not_after: i64,
    pub in_bundle_since: u64,
    pub live_certificates: usize,
    pub latest_certificate_expiry: i64,
}

/// Everything a rotation step decides on; served as JSON at the CA's admin `/rotation`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct RotationReport {
    pub bundle_version: u64,
    pub authorities: Vec<AuthorityView>,
    pub sidecars: Vec<SidecarReport>,
    pub next_step: String,
    /// What the CA cannot measure (file-mode sidecars): reported, never silently counted as converged.
    #[serde(default)]
    pub unknown: Vec<String>,
    /// The CA processes whose views this report merges (since when each tracks issuance).
    #[serde(default)]
    pub processes: Vec<CaProcess>,
}

/// A sidecar in the report.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct SidecarReport {
    pub instance: String,
    pub identity: String,
    pub connected: bool,
    pub acked_version: u64,
    pub serving_authority: Option<String>,
    pub serving_not_after: i64,
    /// Certificate and trust anchors from files: the CA cannot tell which roots it trusts.
    #[serde(default)]
    pub file_mode: bool,
}

fn not_after(der: &[u8]) -> i64 {
    X509Certificate::from_der(der)
        .map(|(_, c)| c.validity().not_after.timestamp())
        .unwrap_or(0)
}

/// Builds the report from the directory state and this CA's fleet view.
pub fn report(
    ca_dir: &Path,
    state: &RotationState,
    sidecars: Vec<SidecarView>,
    issued: &HashMap<String, IssuedView>,
    process: CaProcess,
) -> RotationReport {
    let authorities = state
        .authorities
        .iter()
        .filter(|a| a.state != AuthorityState::Gone)
        .map(|a| {
            let files = state.files_of(ca_dir, a);
            let root = authority::read_bundle(&files.path("root.pem"))
                .ok()
                .and_then(|r| r.into_iter().next());
            let inter = std::fs::read(files.path("intermediate.pem"))
                .ok()
                .and_then(|pem| {
                    use rustls_pki_types::pem::PemObject;
                    rustls_pki_types::CertificateDer::from_pem_slice(&pem).ok()
                });
            let i = issued.get(&a.name).cloned().unwrap_or_default();
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
                live_certificates: i.live,
                latest_certificate_expiry: i.latest_not_after,
            }
        })
        .collect();
    let sidecars = sidecars
        .into_iter()
        .map(|s| SidecarReport {
            instance: s.instance,
            identity: s.identity,
            connected: s.connected,
            acked_version: s.acked_version,
            serving_authority: s.serving_authority,
            serving_not_after: s.serving_not_after,
            file_mode: s.file_mode,
        })
        .collect();
    let mut r = RotationReport {
        bundle_version: state.bundle_version,
        authorities,
        sidecars,
        next_step: String::new(),
        unknown: Vec::new(),
        processes: vec![process],
    };
    r.refresh(state, unix_now());
    r
}

impl RotationReport {
    /// Recomputes what follows from the sidecars: the next step and the unknowns.
    fn refresh(&mut self, state: &RotationState, now: i64) {
        self.unknown = unknown_sidecars(self);
        self.next_step = next_step(state, self, now);
    }
}

/// Sidecars whose trust the CA cannot measure: file mode takes its anchors from files.
pub fn unknown_sidecars(r: &RotationReport) -> Vec<String> {
    r.sidecars
        .iter()
        .filter(|s| s.connected && s.file_mode)
        .map(|s| {
            format!(
                "sidecar {} ({}) is in file mode: which roots it trusts is unknown to the CA; \
                 check that its bundle file holds the roots before each step",
                s.identity, s.instance
            )
        })
        .collect()
}

fn unix_now() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs() as i64)
        .unwrap_or(0)
}

/// What `activate` is waiting for (empty: it may run).
pub fn activate_blockers(state: &RotationState, r: &RotationReport) -> Vec<String> {
    let Some(prepared) = state.find(AuthorityState::Prepared) else {
        return vec!["no prepared authority: run `meshid-ca rotate prepare` first".into()];
    };
    r.sidecars
        .iter()
        .filter(|s| s.connected && !s.file_mode && s.acked_version < prepared.in_bundle_since)
        .map(|s| {
            format!(
                "sidecar {} ({}) has acknowledged bundle v{}, needs v{} (with the new root)",
                s.identity, s.instance, s.acked_version, prepared.in_bundle_since
            )
        })
        .collect()
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
    // A CA process counts only what it issued since it started: what an earlier process issued under
    // the retiring authority may be live until min(start, end of signing) + the longest lifetime.
    let signed_until = retiring.signed_until.unwrap_or(now);
    if let Some(until) = r
        .processes
        .iter()
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
            "a CA process started during authority {}'s lifetime and cannot know what an earlier \
             process issued under it: such certificates may be live until {until} (start or end of \
             signing + --max-ttl)",
            retiring.name
        ));
    }
    for s in &r.sidecars {
        if s.connected
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

fn summarize(blockers: &[String]) -> String {
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
        .filter(|s| s.connected && s.file_mode)
        .count();
    if unknown == 0 || step.starts_with("none") {
        step
    } else {
        format!("{step} ({unknown} file-mode sidecar(s) unknown: not measured)")
    }
}

fn next_step_measured(state: &RotationState, r: &RotationReport, now: i64) -> String {
    if state.find(AuthorityState::Prepared).is_some() {
        let b = activate_blockers(state, r);
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

/// Errors of the rotation commands.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum RotateError {
    #[error(transparent)]
    Authority(#[from] AuthorityError),
    #[error("refusing: {0}")]
    Refused(String),
    #[error("asking the CA at {addr}: {reason}")]
    Admin { addr: SocketAddr, reason: String },
}

/// Fetches `/rotation` from running CAs and merges their views of the fleet.
pub fn fetch_reports(admins: &[SocketAddr]) -> Result<Vec<RotationReport>, RotateError> {
    admins
        .iter()
        .map(|addr| {
            let body = http_get(*addr, "/rotation").map_err(|reason| RotateError::Admin {
                addr: *addr,
                reason,
            })?;
            serde_json::from_str(&body).map_err(|e| RotateError::Admin {
                addr: *addr,
                reason: e.to_string(),
            })
        })
        .collect()
}

fn http_get(addr: SocketAddr, path: &str) -> Result<String, String> {
    use std::io::{Read, Write};
    let mut s = std::net::TcpStream::connect_timeout(&addr, std::time::Duration::from_secs(5))
        .map_err(|e| e.to_string())?;
    s.set_read_timeout(Some(std::time::Duration::from_secs(10)))
        .map_err(|e| e.to_string())?;
    write!(
        s,
        "GET {path} HTTP/1.1\r\nHost: meshid-ca\r\nConnection: close\r\n\r\n"
    )
    .map_err(|e| e.to_string())?;
    let mut out = String::new();
    s.read_to_string(&mut out).map_err(|e| e.to_string())?;
    let (head, body) = out.split_once("\r\n\r\n").ok_or("malformed response")?;
    if !head.starts_with("HTTP/1.1 200") {
        return Err(head.lines().next().unwrap_or_default().to_owned());
    }
    Ok(body.to_owned())
}

/// Merges the fleet views of several CA processes (each knows the sidecars connected to it).
fn merged(state: &RotationState, reports: Vec<RotationReport>) -> RotationReport {
    let mut sidecars: HashMap<String, SidecarReport> = HashMap::new();
    let mut live: HashMap<String, (usize, i64)> = HashMap::new();
    for r in &reports {
        for s in &r.sidecars {
            let e = sidecars
                .entry(s.instance.clone())
                .or_insert_with(|| s.clone());
            // The newest report of what it serves wins (a sidecar may move between CA processes).
            if s.serving_not_after > e.serving_not_after {
                e.serving_authority = s.serving_authority.clone();
                e.serving_not_after = s.serving_not_after;
                e.identity = s.identity.clone();
            }
            e.connected |= s.connected;
            e.acked_version = e.acked_version.max(s.acked_version);
            e.file_mode |= s.file_mode;
        }
        for a in &r.authorities {
            let e = live.entry(a.name.clone()).or_default();
            e.0 += a.live_certificates;
            e.1 = e.1.max(a.latest_certificate_expiry);
        }
    }
    let processes: Vec<CaProcess> = reports.iter().flat_map(|r| r.processes.clone()).collect();
    let mut base = reports.into_iter().next().unwrap_or(RotationReport {
        bundle_version: state.bundle_version,
        authorities: Vec::new(),
        sidecars: Vec::new(),
        next_step: String::new(),
        unknown: Vec::new(),
        processes: Vec::new(),
    });
    base.processes = processes;
    for a in &mut base.authorities {
        if let Some((n, t)) = live.get(&a.name) {
            a.live_certificates = *n;
            a.latest_certificate_expiry = *t;
        }
    }
    base.sidecars = sidecars.into_values().collect();
    base.sidecars.sort_by(|a, b| a.identity.cmp(&b.identity));
    base.refresh(state, unix_now());
    base
}

/// `rotate status`: the state, merged over every CA given.
pub fn status(ca_dir: &Path, admins: &[SocketAddr]) -> Result<RotationReport, RotateError> {
    let state = RotationState::load(ca_dir)?;
    Ok(merged(&state, fetch_reports(admins)?))
}

/// `rotate prepare`: a new authority whose root joins the bundle; signing continues as before.
pub fn prepare(ca_dir: &Path, import: Option<ImportedRoot>) -> Result<String, RotateError> {
    let mut state = RotationState::load(ca_dir)?;
    if let Some(a) = state
        .authorities
        .iter()
        .find(|a| matches!(a.state, AuthorityState::Prepared | AuthorityState::Retiring))
    {
        return Err(RotateError::Refused(format!(
            "authority {} is {}: finish that rotation first",
            a.name,
            a.state.as_str()
        )));
    }
    let td = authority::read_trust_domain(ca_dir)?;
    let next = state
        .authorities
        .iter()
        .filter_map(|a| a.name.parse::<u64>().ok())
        .max()
        .unwrap_or(0)
        + 1;
    let name = next.to_string();
    let prefix = format!("a{name}-");
    authority::create_authority_files(
        &state::AuthorityFiles {
            dir: ca_dir.to_owned(),
            prefix: prefix.clone(),
        },
        &td,
        import,
    )?;
    state.bundle_version += 1;
    state.authorities.push(AuthorityRecord {
        name: name.clone(),
        prefix,
        state: AuthorityState::Prepared,
        in_bundle_since: state.bundle_version,
        signed_until: None,
        signing_since: None,
    });
    state.save(ca_dir)?;
    Ok(name)
}

/// `rotate activate`: the prepared authority signs; the active one starts retiring.
pub fn activate(ca_dir: &Path, admins: &[SocketAddr], force: bool) -> Result<String, RotateError> {
    let mut state = RotationState::load(ca_dir)?;
    let report = merged(&state, fetch_reports(admins)?);
    let blockers = activate_blockers(&state, &report);
    if state.find(AuthorityState::Prepared).is_none() {
        return Err(RotateError::Refused(summarize(&blockers)));
    }
    if !blockers.is_empty() {
        if !force {
            return Err(RotateError::Refused(summarize(&blockers)));
        }
        tracing::warn!(target: "meshid_ca::audit", blockers = %blockers.join("; "), "rotate activate FORCED");
    }
    for unknown in &report.unknown {
        tracing::warn!(target: "meshid_ca::audit", %unknown, "rotate activate: not measured");
    }
    let mut new_active = String::new();
    for a in &mut state.authorities {
        match a.state {
            AuthorityState::Active => {
                a.state = AuthorityState::Retiring;
                a.signed_until = Some(unix_now());
            }
            AuthorityState::Prepared => {
                a.state = AuthorityState::Active;
                a.signing_since = Some(unix_now());
                new_active = a.name.clone();
            }
            _ => {}
        }
    }
    state.save(ca_dir)?;
    Ok(new_active)
}

/// `rotate retire`: the retiring authority's root leaves the bundle.
pub fn retire(ca_dir: &Path, admins: &[SocketAddr], force: bool) -> Result<String, RotateError> {
    let mut state = RotationState::load(ca_dir)?;
    let report = merged(&state, fetch_reports(admins)?);
    let blockers = retire_blockers(&state, &report, unix_now());
    if state.find(AuthorityState::Retiring).is_none() {
        return Err(RotateError::Refused(summarize(&blockers)));
    }
    if !blockers.is_empty() {
        if !force {
            return Err(RotateError::Refused(summarize(&blockers)));
        }
        tracing::warn!(target: "meshid_ca::audit", blockers = %blockers.join("; "), "rotate retire FORCED");
    }
    for unknown in &report.unknown {
        tracing::warn!(target: "meshid_ca::audit", %unknown, "rotate retire: not measured");
    }
    let mut retired = String::new();
    for a in &mut state.authorities {
        if a.state == AuthorityState::Retiring {
            a.state = AuthorityState::Gone;
            retired = a.name.clone();
        }
    }
    state.bundle_version += 1;
    if force {
        state.renew_now_at = Some(state.bundle_version);
    }
    state.save(ca_dir)?;
    Ok(retired)
}

/// `rotate intermediate`: a new signing intermediate under the active root (no bundle change).
pub fn intermediate(ca_dir: &Path) -> Result<(), RotateError> {
    let state = RotationState::load(ca_dir)?;
    let active = state.active().clone();
    let files = state.files_of(ca_dir, &active);
    authority::renew_intermediate(&files, &authority::read_trust_domain(ca_dir)?)?;
    // Touch the state so running CAs reload the signing material.
    state.save(ca_dir)?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sidecar(instance: &str, acked: u64, authority: &str, not_after: i64) -> SidecarReport {
        SidecarReport {
            instance: instance.into(),
            identity: format!("spiffe://td/{instance}"),
            connected: true,
            acked_version: acked,
            serving_authority: Some(authority.into()),
            serving_not_after: not_after,
            file_mode: false,
        }
    }

    fn state(states: &[(&str, AuthorityState, u64)], version: u64) -> RotationState {
        RotationState {
            bundle_version: version,
            renew_now_at: None,
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
        };
        let b = activate_blockers(&st, &r);
        assert_eq!(b.len(), 1);
        assert!(
            b[0].contains("spiffe://td/b") && b[0].contains("v1") && b[0].contains("v2"),
            "{b:?}"
        );
        r.sidecars[1].connected = false;
        assert!(
            activate_blockers(&st, &r).is_empty(),
            "disconnected sidecars do not block"
        );
        // A file-mode sidecar is unknown: it cannot be measured, so it is reported, not counted.
        r.sidecars[1].connected = true;
        r.sidecars[1].file_mode = true;
        assert!(activate_blockers(&st, &r).is_empty());
        r.refresh(&st, 0);
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
            }],
            sidecars: vec![sidecar("a", 2, "1", 1200), sidecar("b", 2, "2", 5000)],
            next_step: String::new(),
            unknown: Vec::new(),
            processes: Vec::new(),
        };
        let b = retire_blockers(&st, &r, now);
        assert_eq!(b.len(), 2, "{b:?}");
        assert!(
            b[0].contains("1500") && b[1].contains("spiffe://td/a"),
            "{b:?}"
        );
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
            },
            CaProcess {
                started_unix: 900,
                max_ttl_seconds: 200,
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
}
