//! The rotation commands of `meshid-ca rotate`: `status`, `prepare`, `activate`, `retire` and
//! `intermediate`. Each step that depends on the fleet asks every named CA process for its report
//! over the admin port, merges them, and refuses while a gate is not met (unless forced, audited).

use std::net::SocketAddr;
use std::path::Path;

use meshid_runtime::http_client::{self, Call};
use meshid_runtime::time::unix_now;

use super::gates::{activate_blockers, retire_blockers, summarize};
use super::report::RotationReport;
use super::view::merged;
use crate::authorities::{AuthorityRecord, AuthorityState, RotationState};
use crate::authority::{self, AuthorityError, ImportedRoot};
use crate::ca_dir::AuthorityFiles;

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

/// Fetches `/rotation` from running CAs (their admin ports) and parses each report.
pub async fn fetch_reports(admins: &[SocketAddr]) -> Result<Vec<RotationReport>, RotateError> {
    let mut reports = Vec::with_capacity(admins.len());
    for addr in admins {
        let admin = |reason: String| RotateError::Admin {
            addr: *addr,
            reason,
        };
        let mut get = Call::get(*addr, "/rotation");
        get.host = Some("meshid-ca");
        let reply = http_client::send(&get)
            .await
            .map_err(|e| admin(e.to_string()))?;
        if reply.status != 200 {
            return Err(admin(format!("answered HTTP {}", reply.status)));
        }
        reports.push(serde_json::from_slice(&reply.body).map_err(|e| admin(e.to_string()))?);
    }
    Ok(reports)
}

/// `rotate status`: the state, merged over every CA given.
pub async fn status(ca_dir: &Path, admins: &[SocketAddr]) -> Result<RotationReport, RotateError> {
    let state = RotationState::load(ca_dir)?;
    Ok(merged(&state, fetch_reports(admins).await?))
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
        &AuthorityFiles {
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

/// Why `rotate activate` has nothing to do (no prepared authority), read from the CA directory
/// alone, before any CA is asked; `None` when there is an authority to activate.
pub fn nothing_to_activate(ca_dir: &Path) -> Result<Option<String>, RotateError> {
    let state = RotationState::load(ca_dir)?;
    Ok(state.find(AuthorityState::Prepared).is_none().then(|| {
        "nothing to activate: no prepared authority (run `meshid-ca rotate prepare` first)"
            .to_owned()
    }))
}

/// Why `rotate retire` has nothing to do (no retiring authority); `None` when there is one.
pub fn nothing_to_retire(ca_dir: &Path) -> Result<Option<String>, RotateError> {
    let state = RotationState::load(ca_dir)?;
    Ok(state.find(AuthorityState::Retiring).is_none().then(|| {
        "nothing to retire: no retiring authority (run `meshid-ca rotate activate` first)"
            .to_owned()
    }))
}

/// `rotate activate`: the prepared authority signs; the active one starts retiring.
pub async fn activate(
    ca_dir: &Path,
    admins: &[SocketAddr],
    force: bool,
) -> Result<String, RotateError> {
    let mut state = RotationState::load(ca_dir)?;
    let report = merged(&state, fetch_reports(admins).await?);
    let blockers = activate_blockers(&state, &report, unix_now());
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
pub async fn retire(
    ca_dir: &Path,
    admins: &[SocketAddr],
    force: bool,
) -> Result<String, RotateError> {
    let mut state = RotationState::load(ca_dir)?;
    let report = merged(&state, fetch_reports(admins).await?);
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
