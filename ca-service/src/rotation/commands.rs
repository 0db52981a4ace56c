//! The rotation commands of `meshid-ca rotate`: `status`, `prepare`, `activate`, `retire` and
//! `intermediate`. Each step that depends on the fleet asks every named CA process for its report
//! over the admin port, merges them, and refuses while a gate is not met (unless forced, audited).

use std::net::SocketAddr;
use std::path::Path;

use meshid_runtime::time::unix_now;

use super::gates::{
    activate_blockers, report_time, report_time_latest, retire_blockers, summarize,
};
use super::report::RotationReport;
use super::view::merged;
use crate::admin_token::{AdminToken, signed_get};
use crate::authorities::{AuthorityRecord, AuthorityState, RotationState};
use crate::authority::{self, AuthorityError, ImportedRoot};
use crate::ca_dir::{AuthorityFiles, DirLock};

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

/// How long one CA has to answer a report request.
const REPORT_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(10);
/// The largest report read (a fleet of 100,000 sidecars is tens of megabytes).
const MAX_REPORT_BYTES: usize = 64 << 20;

/// Fetches `/rotation/fresh` from running CAs (their admin ports) and parses each report: a
/// report computed after the request, never the cached one `/rotation` may answer with, so the
/// gates see every step taken before (this command's own included). Each request is signed with the
/// admin token of `ca_dir` ([`AdminToken`]), the directory every CA process serves from, and each
/// answer must be signed with it too ([`signed_get`]): a report nobody can vouch for never reaches
/// a gate.
pub async fn fetch_reports(
    ca_dir: &Path,
    admins: &[SocketAddr],
) -> Result<Vec<RotationReport>, RotateError> {
    let token = match AdminToken::load(ca_dir)? {
        Some(token) => Some(token),
        None if admins.is_empty() => None,
        None => {
            return Err(RotateError::Refused(format!(
                "{}: no admin token (neither admin-token nor jwt.key): the CAs' rotation \
                 reports cannot be asked for",
                ca_dir.display()
            )));
        }
    };
    let mut reports = Vec::with_capacity(admins.len());
    // Which CA process answered at each address: one process's answer must not stand for another
    // (its sidecars would then be missing from the gates).
    let mut answered_by: Vec<(String, SocketAddr)> = Vec::with_capacity(admins.len());
    for addr in admins {
        let admin = |reason: String| RotateError::Admin {
            addr: *addr,
            reason,
        };
        let token = token
            .as_ref()
            .ok_or_else(|| admin("no admin token".into()))?;
        // `/rotation/fresh` only: every CA that signs its answers serves it.
        let reply = signed_get(
            token,
            *addr,
            "/rotation/fresh",
            REPORT_TIMEOUT,
            MAX_REPORT_BYTES,
        )
        .await
        .map_err(admin)?;
        let body = &reply.body;
        if reply.status == 401 {
            return Err(admin(format!(
                "refused the signed request of {} (HTTP 401: {}): is --dir the directory this \
                 CA serves, and is the CA as new as this meshid-ca (upgrade the CAs first)?",
                ca_dir.display(),
                String::from_utf8_lossy(&body[..body.len().min(200)]).trim()
            )));
        }
        if reply.status != 200 {
            return Err(admin(format!("answered HTTP {}", reply.status)));
        }
        if let Some((_, first)) = answered_by.iter().find(|(i, _)| *i == reply.instance) {
            return Err(admin(format!(
                "answered as the same CA process as {first} (instance {}): two --admin \
                 addresses reach one CA, or one CA's answer was passed off as another's; give \
                 each CA replica once",
                reply.instance
            )));
        }
        answered_by.push((reply.instance.clone(), *addr));
        reports.push(serde_json::from_slice(body).map_err(|e| admin(e.to_string()))?);
    }
    Ok(reports)
}

/// `rotate status`: the state, merged over every CA given.
pub async fn status(ca_dir: &Path, admins: &[SocketAddr]) -> Result<RotationReport, RotateError> {
    let state = RotationState::load(ca_dir)?;
    Ok(merged(&state, fetch_reports(ca_dir, admins).await?))
}

/// The highest bundle version the CA processes in `reports` serve, or their connected sidecars
/// have applied (0: none reported). A process numbers a change of `bundle.pem` made by hand one
/// past its own version, above the directory's, and forgets it when it restarts: its sidecars
/// keep such a version, and their roots for every lower one.
fn served_versions(reports: &[RotationReport]) -> u64 {
    reports
        .iter()
        .flat_map(|r| &r.processes)
        .map(|p| p.bundle_version.max(p.sidecars_hold_version))
        .max()
        .unwrap_or(0)
}

/// The sidecars whose reported held version decides [`served_versions`]: above every version a
/// CA process serves. An honest one holds a version a restarted process numbered before; a lying
/// one can push the number up by at most [`super::fleet::MAX_HELD_AHEAD`] per command. Logged in
/// the audit log by the commands that number a bundle, so that the instance can be found.
fn numbered_by_sidecars(reports: &[RotationReport], served: u64) -> Vec<String> {
    let processes = reports
        .iter()
        .flat_map(|r| &r.processes)
        .map(|p| p.bundle_version)
        .max()
        .unwrap_or(0);
    if served <= processes {
        return Vec::new();
    }
    let mut named: Vec<String> = reports
        .iter()
        .flat_map(|r| &r.sidecars)
        .filter(|s| s.held_version == served)
        .map(|s| format!("{} ({})", s.instance, s.identity))
        .collect();
    named.sort();
    named.dedup();
    named
}

/// Writes the audit line of [`numbered_by_sidecars`] for `command`.
fn audit_numbering(command: &str, reports: &[RotationReport], served: u64) {
    let sidecars = numbered_by_sidecars(reports, served);
    if !sidecars.is_empty() {
        tracing::warn!(
            target: "meshid_ca::audit",
            command,
            held_version = served,
            sidecars = %sidecars.join(", "),
            "rotate: the new bundle is numbered above the version these connected sidecars \
             report holding, higher than any CA process serves (a CA restarted after numbering a \
             hand edit; or a sidecar lying, which can raise it by at most 1,000)"
        );
    }
}

/// The files of `ca_dir` named like an authority's (`a<n>-...`) whose prefix no authority of
/// `state` has: what an interrupted `rotate prepare` left.
fn unlisted_files(ca_dir: &Path, state: &RotationState) -> Result<Vec<String>, RotateError> {
    let io = |source| AuthorityError::Io {
        path: ca_dir.to_owned(),
        source,
    };
    let mut unlisted = Vec::new();
    for entry in std::fs::read_dir(ca_dir).map_err(io)? {
        let name = entry
            .map_err(io)?
            .file_name()
            .to_string_lossy()
            .into_owned();
        let listed = state
            .authorities
            .iter()
            .any(|a| !a.prefix.is_empty() && name.starts_with(&a.prefix));
        if crate::authorities::is_prefixed_authority_file(&name) && !listed {
            unlisted.push(name);
        }
    }
    unlisted.sort();
    Ok(unlisted)
}

/// The roots of the authorities' files that `state` does not list (`a<n>-root.pem`): an
/// interrupted prepare's, which may have reached `bundle.pem` before `authorities.json` (written
/// last). Not roots added by hand: no command keeps them.
fn leftover_roots(
    ca_dir: &Path,
    state: &RotationState,
) -> Result<Vec<rustls_pki_types::CertificateDer<'static>>, RotateError> {
    Ok(unlisted_files(ca_dir, state)?
        .iter()
        .filter(|f| f.ends_with("-root.pem"))
        .filter_map(|f| authority::read_bundle(&ca_dir.join(f)).ok())
        .flatten()
        .collect())
}

/// The roots added to `bundle.pem` by hand, which every command keeps (they are served already;
/// dropping them would cut trust an operator put there, e.g. for a migration). Refuses when a root
/// the command would keep in the bundle was taken out of `bundle.pem` by hand: writing the bundle
/// would put it back. `leaving`: the authority whose root the command takes out (retire).
fn kept_roots(
    ca_dir: &Path,
    state: &RotationState,
    leaving: Option<&str>,
) -> Result<Vec<rustls_pki_types::CertificateDer<'static>>, RotateError> {
    let mut disk = state.bundle_on_disk(ca_dir)?;
    let leftovers = leftover_roots(ca_dir, state)?;
    if disk.added.iter().any(|r| leftovers.contains(r)) {
        tracing::warn!(
            target: "meshid_ca::audit",
            "bundle.pem holds the root of an authority authorities.json does not list (an \
             interrupted prepare): left out of the bundle this command writes"
        );
        disk.added.retain(|r| !leftovers.contains(r));
    }
    let leaving_root = leaving
        .and_then(|name| state.authorities.iter().find(|a| a.name == name))
        .and_then(|a| authority::read_bundle(&state.files_of(ca_dir, a).path("root.pem")).ok())
        .and_then(|r| r.into_iter().next());
    let taken_out: Vec<String> = disk
        .taken_out
        .iter()
        .filter(|r| leaving_root.as_ref() != Some(*r))
        .map(|r| crate::serial::sha256_hex(r))
        .collect();
    if !taken_out.is_empty() {
        return Err(RotateError::Refused(format!(
            "bundle.pem lacks {} root(s) of authorities.json (sha256 {}): taken out by hand? This \
             command writes bundle.pem from authorities.json and would put them back; put them \
             back in bundle.pem first, or finish with their authority through the rotation",
            taken_out.len(),
            taken_out.join(", ")
        )));
    }
    if !disk.added.is_empty() {
        let added: Vec<String> = disk
            .added
            .iter()
            .map(|r| crate::serial::sha256_hex(r))
            .collect();
        tracing::warn!(
            target: "meshid_ca::audit",
            roots = %added.join(", "),
            "bundle.pem holds roots no authority of authorities.json puts there (added by hand): \
             kept in the bundle this command writes"
        );
    }
    Ok(disk.added)
}

/// Removes `path`, a file of an authority `authorities.json` does not list, whatever it holds
/// (garbage, a FIFO: a CA ignores such a root, see [`crate::authority::Authority::load`]), so
/// `rotate prepare` makes that authority anew. An empty directory in its place goes too; one with
/// files in it is the operator's to remove (they may be anything).
fn remove_leftover(path: &Path) -> Result<(), RotateError> {
    let io = |source| AuthorityError::Io {
        path: path.to_owned(),
        source,
    };
    if !std::fs::symlink_metadata(path).map_err(io)?.is_dir() {
        return Ok(std::fs::remove_file(path).map_err(io)?);
    }
    std::fs::remove_dir(path).map_err(|e| {
        RotateError::Refused(format!(
            "{}: a directory where rotate prepare writes a file of the new authority, and it \
             cannot be removed ({e}): remove it by hand, then run rotate prepare again",
            path.display()
        ))
    })
}

/// `rotate prepare`: a new authority whose root joins the bundle; signing continues as before.
/// The CA processes named by `admins` are asked which bundle version each serves: the new root
/// joins at a version above all of them (and above the directory's), so no acknowledgement of a
/// version served before it counts for the new root.
pub async fn prepare_measured(
    ca_dir: &Path,
    admins: &[SocketAddr],
    import: Option<ImportedRoot>,
) -> Result<String, RotateError> {
    let reports = fetch_reports(ca_dir, admins).await?;
    let served = served_versions(&reports);
    audit_numbering("prepare", &reports, served);
    prepare_above(ca_dir, import, served)
}

/// `rotate prepare` with no running CA asked: the new root joins at the directory's next version.
/// A process that numbered a change of `bundle.pem` made by hand itself may have served that
/// version already; `activate` then waits until it is restarted (see
/// [`super::gates::activate_blockers`]). [`prepare_measured`] avoids that.
pub fn prepare(ca_dir: &Path, import: Option<ImportedRoot>) -> Result<String, RotateError> {
    prepare_above(ca_dir, import, 0)
}

/// `rotate prepare`, the new root joining at a version above `served` and the directory's.
pub fn prepare_above(
    ca_dir: &Path,
    import: Option<ImportedRoot>,
    served: u64,
) -> Result<String, RotateError> {
    let _lock = DirLock::acquire(ca_dir)?;
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
    let kept = kept_roots(ca_dir, &state, None)?;
    let td = authority::read_trust_domain(ca_dir)?;
    // The implied single-authority state written down first: `a<n>-` files beside no
    // `authorities.json` are refused at load (a lost state), so none may appear before it.
    if !ca_dir.join(crate::authorities::STATE_FILE).exists() {
        state.save_keeping(ca_dir, &kept)?;
    }
    let next = state
        .authorities
        .iter()
        .filter_map(|a| a.name.parse::<u64>().ok())
        .max()
        .unwrap_or(0)
        + 1;
    let name = next.to_string();
    let prefix = format!("a{name}-");
    // What an interrupted prepare of this authority left (the state does not list it): replaced.
    for leftover in unlisted_files(ca_dir, &state)?
        .into_iter()
        .filter(|f| f.starts_with(&prefix))
    {
        remove_leftover(&ca_dir.join(&leftover))?;
        tracing::warn!(
            target: "meshid_ca::audit",
            file = %leftover,
            "rotate prepare: removed a file of authority {name} that authorities.json does not list \
             (left by an interrupted prepare); making the authority anew"
        );
    }
    authority::create_authority_files(
        &AuthorityFiles {
            dir: ca_dir.to_owned(),
            prefix: prefix.clone(),
        },
        &td,
        import,
    )?;
    state.bundle_version = state.bundle_version.max(served).saturating_add(1);
    state.authorities.push(AuthorityRecord {
        name: name.clone(),
        prefix,
        state: AuthorityState::Prepared,
        in_bundle_since: state.bundle_version,
        signed_until: None,
        signing_since: None,
    });
    state.save_keeping(ca_dir, &kept)?;
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
    let _lock = DirLock::acquire(ca_dir)?;
    let mut state = RotationState::load(ca_dir)?;
    let report = merged(&state, fetch_reports(ca_dir, admins).await?);
    // In the CAs' time: what the gates compare (expiries, starts) is theirs.
    let now = report_time(&report, unix_now());
    let blockers = activate_blockers(&state, &report, now);
    if state.find(AuthorityState::Prepared).is_none() {
        return Err(RotateError::Refused(summarize(&blockers)));
    }
    let kept = kept_roots(ca_dir, &state, None)?;
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
                a.signed_until = Some(report_time_latest(&report, unix_now()));
            }
            AuthorityState::Prepared => {
                a.state = AuthorityState::Active;
                a.signing_since = Some(now);
                new_active = a.name.clone();
            }
            _ => {}
        }
    }
    state.save_keeping(ca_dir, &kept)?;
    Ok(new_active)
}

/// `rotate retire`: the retiring authority's root leaves the bundle.
pub async fn retire(
    ca_dir: &Path,
    admins: &[SocketAddr],
    force: bool,
) -> Result<String, RotateError> {
    let _lock = DirLock::acquire(ca_dir)?;
    let mut state = RotationState::load(ca_dir)?;
    let reports = fetch_reports(ca_dir, admins).await?;
    let served = served_versions(&reports);
    audit_numbering("retire", &reports, served);
    let report = merged(&state, reports);
    let mut blockers = retire_blockers(&state, &report, report_time(&report, unix_now()));
    // Marks the report could not count: the certificates they account for may be live.
    blockers.extend(
        crate::issued::unreadable_marks(ca_dir)
            .into_iter()
            .map(|m| {
                format!(
                    "an issuance mark cannot be read ({m}): certificates it records may be live"
                )
            }),
    );
    let Some(retiring) = state.find(AuthorityState::Retiring) else {
        return Err(RotateError::Refused(summarize(&blockers)));
    };
    let kept = kept_roots(ca_dir, &state, Some(retiring.name.as_str()))?;
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
    state.bundle_version = state.bundle_version.max(served).saturating_add(1);
    if force {
        state.renew_now_at = Some(state.bundle_version);
    }
    state.save_keeping(ca_dir, &kept)?;
    Ok(retired)
}

/// `rotate intermediate`: a new signing intermediate under the active root (no bundle change).
pub fn intermediate(ca_dir: &Path) -> Result<(), RotateError> {
    let _lock = DirLock::acquire(ca_dir)?;
    let state = RotationState::load(ca_dir)?;
    let kept = kept_roots(ca_dir, &state, None)?;
    let active = state.active().clone();
    let files = state.files_of(ca_dir, &active);
    authority::renew_intermediate(&files, &authority::read_trust_domain(ca_dir)?)?;
    // Touch the state so running CAs reload the signing material.
    state.save_keeping(ca_dir, &kept)?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::authority::Authority;
    use crate::rotation::fleet::{Ack, Caller, Fleet};
    use crate::rotation::{CaProcess, activate_blockers};
    use crate::service::Bundle;
    use meshid_identity::TrustDomain;

    const NOW: i64 = 1_000;

    /// Something between the command and the CA (a hijacked Service name) answering every report
    /// request with `body`, unsigned or signed with `token`'s signature of another request.
    async fn impostor(body: &'static str, signed_by: Option<AdminToken>) -> SocketAddr {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(async move {
            while let Ok((mut tcp, _)) = listener.accept().await {
                let mut head = [0u8; 4096];
                let _ = tcp.read(&mut head).await;
                let instance = crate::admin_token::new_instance();
                let mac = match &signed_by {
                    Some(t) => format!(
                        "x-meshid-admin-mac: {}\r\nx-meshid-admin-instance: {instance}\r\n",
                        t.sign_response(&"0".repeat(32), &instance, 200, body.as_bytes())
                    ),
                    None => String::new(),
                };
                let reply = format!(
                    "HTTP/1.1 200 OK\r\ncontent-type: application/json\r\n{mac}content-length: \
                     {}\r\nconnection: close\r\n\r\n{body}",
                    body.len()
                );
                let _ = tcp.write_all(reply.as_bytes()).await;
            }
        });
        addr
    }

    /// A CA process that signs its answers properly (it holds `token`) as `instance`.
    async fn signing_ca(token: AdminToken, instance: String) -> SocketAddr {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(async move {
            while let Ok((mut tcp, _)) = listener.accept().await {
                let mut head = vec![0u8; 4096];
                let n = tcp.read(&mut head).await.unwrap_or(0);
                let head = String::from_utf8_lossy(&head[..n]).into_owned();
                let auth = head
                    .lines()
                    .find_map(|l| l.strip_prefix("authorization: "))
                    .unwrap_or_default();
                let nonce = crate::admin_token::signed_nonce(Some(auth.as_bytes())).unwrap();
                let body = r#"{"bundle_version":1,"authorities":[],"sidecars":[],"next_step":""}"#;
                let mac = token.sign_response(&nonce, &instance, 200, body.as_bytes());
                let reply = format!(
                    "HTTP/1.1 200 OK\r\nx-meshid-admin-mac: {mac}\r\nx-meshid-admin-instance: \
                     {instance}\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}",
                    body.len()
                );
                let _ = tcp.write_all(reply.as_bytes()).await;
            }
        });
        addr
    }

    /// One CA process's signed answer at two addresses (a relay passing one replica's answers
    /// off as another's) is refused: the other replica's sidecars would be missing from the gates.
    #[tokio::test]
    async fn one_ca_process_cannot_answer_for_two() {
        let dir = tempfile::tempdir().unwrap();
        let token = AdminToken::generate().unwrap();
        token.write(dir.path()).unwrap();
        let same = crate::admin_token::new_instance();
        let a = signing_ca(token.clone(), same.clone()).await;
        let b = signing_ca(token.clone(), same).await;
        let c = signing_ca(token.clone(), crate::admin_token::new_instance()).await;
        assert_eq!(fetch_reports(dir.path(), &[a, c]).await.unwrap().len(), 2);
        let err = fetch_reports(dir.path(), &[a, b])
            .await
            .unwrap_err()
            .to_string();
        assert!(err.contains("same CA process"), "{err}");
    }

    /// The gates decide on reports: one the admin token does not sign (a forged "every sidecar
    /// has acknowledged") is refused before it is read, whatever it says.
    #[tokio::test]
    async fn a_report_not_signed_with_the_admin_token_reaches_no_gate() {
        let dir = tempfile::tempdir().unwrap();
        let token = AdminToken::generate().unwrap();
        token.write(dir.path()).unwrap();
        let forged = r#"{"sidecars":[],"acknowledged":true}"#;
        for signed_by in [
            None,
            Some(token.clone()),
            Some(AdminToken::generate().unwrap()),
        ] {
            let what = format!("{signed_by:?}");
            let addr = impostor(forged, signed_by).await;
            let err = fetch_reports(dir.path(), &[addr])
                .await
                .unwrap_err()
                .to_string();
            assert!(
                err.contains("without a valid x-meshid-admin-mac signature"),
                "{what}: {err}"
            );
        }
    }

    /// A CA directory, the bundle a CA process serves from it, and one sidecar instance of
    /// that process with a stream open.
    struct Process {
        dir: tempfile::TempDir,
        bundle: Bundle,
        fleet: Fleet,
    }

    impl Process {
        fn start() -> Self {
            let dir = tempfile::tempdir().unwrap();
            authority::init(dir.path(), &TrustDomain::new("td").unwrap(), None).unwrap();
            let a = Authority::load(dir.path()).unwrap();
            let fleet = Fleet::default();
            let caller = Caller {
                key: "k".into(),
                identity: "spiffe://td/ns/a/sa/b".into(),
                file_mode: false,
                not_after: i64::MAX,
                serial: "01".into(),
                lineage: "01".into(),
                authority: None,
            };
            fleet.stream_opened(&caller, NOW).unwrap();
            Self {
                bundle: Bundle::of(&a, a.bundle_version),
                dir,
                fleet,
            }
        }

        /// What the process does within a second of a change of the directory.
        fn follow(&mut self) {
            let a = Authority::load(self.dir.path()).unwrap();
            if let Some(next) = self.bundle.next(&a) {
                self.bundle = next;
            }
        }

        /// The sidecar applies the bundle served now and acknowledges it.
        fn sidecar_acks(&self) {
            let ack = Ack {
                identity: "spiffe://td/ns/a/sa/b".into(),
                version: self.bundle.version,
                authority: Some("1".into()),
                not_after: i64::MAX,
                serial: "01".into(),
                file_mode: false,
                held_version: 0,
            };
            self.fleet.ack("k", ack, self.bundle.version).unwrap();
        }

        /// Adds a root to bundle.pem, as an operator may by hand (a migration).
        fn add_root_by_hand(&self) -> rustls_pki_types::CertificateDer<'static> {
            let other = meshid_identity::testing::TestPki::new("migrating").root;
            let path = self.dir.path().join("bundle.pem");
            let mut pem = std::fs::read_to_string(&path).unwrap();
            pem.push_str(&authority::pem_cert(&other));
            std::fs::write(&path, pem).unwrap();
            other
        }

        fn activate_blockers(&self) -> Vec<String> {
            let state = RotationState::load(self.dir.path()).unwrap();
            let (sidecars, issued) = self.fleet.report(NOW);
            let process = super::super::view::process(
                CaProcess::default(),
                &self.bundle,
                self.dir.path(),
                &state,
            );
            let report = super::super::report(
                self.dir.path(),
                &state,
                sidecars,
                Vec::new(),
                &issued,
                process,
                &crate::revocations::Revocations::default(),
            );
            activate_blockers(&state, &report, NOW)
        }
    }

    #[test]
    fn an_acknowledgement_of_a_bundle_edited_by_hand_does_not_pass_activate_for_a_later_root() {
        // Without asking the running CA: the new root joins at the directory's next version, which
        // the process already served (without it) for the change made by hand.
        let mut p = Process::start();
        p.sidecar_acks();
        let migrating = p.add_root_by_hand();
        p.follow();
        assert_eq!(p.bundle.version, 2, "one past the directory's 1");
        p.sidecar_acks();
        prepare(p.dir.path(), None).unwrap();
        let state = RotationState::load(p.dir.path()).unwrap();
        let prepared = state.find(AuthorityState::Prepared).unwrap();
        assert_eq!(prepared.in_bundle_since, 2);
        p.follow();
        assert_eq!(p.bundle.version, 3);
        let blockers = p.activate_blockers();
        assert_eq!(blockers.len(), 1, "{blockers:?}");
        assert!(
            blockers[0].contains("served bundle v2 without the new root"),
            "{blockers:?}"
        );
        // The root added by hand stayed in the bundle prepare wrote.
        let roots = authority::read_bundle(&p.dir.path().join("bundle.pem")).unwrap();
        assert_eq!(roots.len(), 3);
        assert!(roots.contains(&migrating));

        // Asking the running CA: the new root joins above what it served.
        let mut p = Process::start();
        p.add_root_by_hand();
        p.follow();
        p.sidecar_acks();
        prepare_above(p.dir.path(), None, p.bundle.version).unwrap();
        let state = RotationState::load(p.dir.path()).unwrap();
        assert_eq!(
            state
                .find(AuthorityState::Prepared)
                .unwrap()
                .in_bundle_since,
            3
        );
        p.follow();
        assert_eq!(p.bundle.version, 3, "the directory's version again");
        let blockers = p.activate_blockers();
        assert_eq!(blockers.len(), 1, "{blockers:?}");
        assert!(
            blockers[0].contains("acknowledged bundle v2, needs v3"),
            "{blockers:?}"
        );
        p.sidecar_acks();
        assert!(p.activate_blockers().is_empty());
    }

    #[test]
    fn the_next_bundle_is_numbered_above_what_the_processes_sidecars_hold() {
        let report = |bundle_version, sidecars_hold_version| RotationReport {
            bundle_version: 1,
            authorities: Vec::new(),
            sidecars: Vec::new(),
            next_step: String::new(),
            unknown: Vec::new(),
            processes: vec![CaProcess {
                bundle_version,
                sidecars_hold_version,
                ..CaProcess::default()
            }],
            turned_away_unlisted: Vec::new(),
        };
        assert_eq!(served_versions(&[report(2, 0)]), 2);
        // A restarted process serves v2; a sidecar it serves took v4 from it before.
        assert_eq!(served_versions(&[report(2, 4), report(3, 0)]), 4);
        assert_eq!(served_versions(&[]), 0);
    }

    /// The instances whose held version numbered the bundle are named (for the audit log), and
    /// none when a process's own version did.
    #[test]
    fn the_sidecars_that_numbered_the_next_bundle_are_named() {
        let sidecar = |instance: &str, held_version| crate::rotation::report::SidecarReport {
            held_version,
            ..crate::rotation::report::SidecarReport::connected(
                instance,
                &format!("spiffe://td/ns/a/sa/{instance}"),
                2,
            )
        };
        let report = |bundle_version, sidecars| RotationReport {
            bundle_version: 1,
            authorities: Vec::new(),
            sidecars,
            next_step: String::new(),
            unknown: Vec::new(),
            processes: vec![CaProcess {
                bundle_version,
                sidecars_hold_version: 900,
                ..CaProcess::default()
            }],
            turned_away_unlisted: Vec::new(),
        };
        let reports = [
            report(2, vec![sidecar("liar", 900), sidecar("honest", 2)]),
            report(3, vec![sidecar("liar", 900)]),
        ];
        let served = served_versions(&reports);
        assert_eq!(served, 900);
        assert_eq!(
            numbered_by_sidecars(&reports, served),
            vec!["liar (spiffe://td/ns/a/sa/liar)".to_owned()]
        );
        // A process serving the highest version: no sidecar decided it.
        let reports = [report(900, vec![sidecar("a", 900)])];
        assert!(numbered_by_sidecars(&reports, served_versions(&reports)).is_empty());
    }

    #[test]
    fn a_process_that_follows_several_changes_at_once_served_nothing_in_between() {
        // prepare, then a revocation's version, read in one go: the process goes from v1 to v3
        // and never served v2 without the new root.
        let mut p = Process::start();
        p.sidecar_acks();
        prepare(p.dir.path(), None).unwrap();
        RotationState::bump_version(p.dir.path()).unwrap();
        p.follow();
        assert_eq!(p.bundle.version, 3);
        let blockers = p.activate_blockers();
        assert_eq!(blockers.len(), 1, "{blockers:?}");
        assert!(
            blockers[0].contains("acknowledged bundle v1, needs v2"),
            "{blockers:?}"
        );
        p.sidecar_acks();
        assert!(p.activate_blockers().is_empty());
        // The new root taken out of bundle.pem by hand: the process serves a version without it.
        let state = RotationState::load(p.dir.path()).unwrap();
        let active = state.files_of(p.dir.path(), state.active());
        std::fs::copy(active.path("root.pem"), p.dir.path().join("bundle.pem")).unwrap();
        p.follow();
        let blockers = p.activate_blockers();
        assert!(
            blockers
                .iter()
                .any(|b| b.contains("served bundle v4 without the new root")),
            "{blockers:?}"
        );
    }

    #[test]
    fn rotate_commands_keep_roots_added_by_hand_and_refuse_to_put_back_roots_taken_out() {
        let p = Process::start();
        let migrating = p.add_root_by_hand();
        intermediate(p.dir.path()).unwrap();
        let path = p.dir.path().join("bundle.pem");
        assert!(authority::read_bundle(&path).unwrap().contains(&migrating));
        // The active root taken out by hand: writing the bundle would put it back.
        std::fs::write(&path, authority::pem_cert(&migrating)).unwrap();
        let err = intermediate(p.dir.path()).unwrap_err().to_string();
        assert!(err.contains("bundle.pem lacks 1 root(s)"), "{err}");
        assert!(prepare(p.dir.path(), None).is_err());
        assert_eq!(authority::read_bundle(&path).unwrap(), vec![migrating]);
        assert!(
            !p.dir.path().join("a2-root.pem").exists(),
            "refused before writing anything"
        );
    }

    #[test]
    fn an_interrupted_prepare_is_replaced_when_it_runs_again() {
        // Partial files of authority 2 left behind (a full disk, a crash while writing).
        let p = Process::start();
        let dir = p.dir.path();
        std::fs::write(dir.join("a2-root.pem"), "-----BEGIN CERTIFICATE-----\nMII").unwrap();
        // With no authorities.json (an older meshid's prepare wrote it last), the fix is named.
        let err = prepare(dir, None).unwrap_err().to_string();
        assert!(err.contains("remove the a<n>- files"), "{err}");
        // This one writes the state before any file of the new authority.
        std::fs::remove_file(dir.join("a2-root.pem")).unwrap();
        prepare(dir, None).unwrap();
        std::fs::write(dir.join(crate::authorities::STATE_FILE), r#"{"bundle_version":1,"authorities":[{"name":"1","prefix":"","state":"active","in_bundle_since":1}]}"#).unwrap();
        std::fs::copy(
            p.dir.path().join("root.pem"),
            p.dir.path().join("bundle.pem"),
        )
        .unwrap();
        for f in [
            "a2-root.key",
            "a2-intermediate.pem",
            "a2-jwt.key",
            "a2-jwt.pub",
        ] {
            std::fs::remove_file(dir.join(f)).unwrap();
        }
        std::fs::write(dir.join("a2-root.pem"), "-----BEGIN CERTIFICATE-----\nMII").unwrap();
        std::fs::write(dir.join("a2-intermediate.key"), "").unwrap();
        std::fs::write(dir.join("a2-jwt.key.new"), "").unwrap();
        assert_eq!(prepare(dir, None).unwrap(), "2");
        Authority::load(dir).unwrap();
        assert!(!dir.join("a2-jwt.key.new").exists());
        let roots = authority::read_bundle(&dir.join("bundle.pem")).unwrap();
        assert_eq!(roots.len(), 2);

        // A crash between bundle.pem and authorities.json: the new root is in the bundle, the
        // state does not list its authority. It is the prepare's own, not a root added by hand.
        let q = Process::start();
        let dir = q.dir.path();
        let state = dir.join(crate::authorities::STATE_FILE);
        RotationState::load(dir).unwrap().save(dir).unwrap();
        let before = std::fs::read(&state).unwrap();
        prepare(dir, None).unwrap();
        let leftover = authority::read_bundle(&dir.join("a2-root.pem")).unwrap();
        std::fs::write(&state, &before).unwrap();
        assert_eq!(prepare(dir, None).unwrap(), "2");
        let roots = authority::read_bundle(&dir.join("bundle.pem")).unwrap();
        assert_eq!(roots.len(), 2, "the old root and the new one, nothing kept");
        assert!(!roots.contains(&leftover[0]));
        let made = authority::read_bundle(&dir.join("a2-root.pem")).unwrap();
        assert!(roots.contains(&made[0]));
        Authority::load(dir).unwrap();
    }

    #[tokio::test]
    async fn retire_does_not_refuse_a_retiring_root_already_taken_out_by_hand() {
        let p = Process::start();
        let old_root = authority::read_bundle(&p.dir.path().join("bundle.pem")).unwrap();
        prepare(p.dir.path(), None).unwrap();
        activate(p.dir.path(), &[], true).await.unwrap();
        let state = RotationState::load(p.dir.path()).unwrap();
        let new_root = state.files_of(p.dir.path(), state.active());
        let path = p.dir.path().join("bundle.pem");
        std::fs::copy(new_root.path("root.pem"), &path).unwrap();
        assert_eq!(retire(p.dir.path(), &[], true).await.unwrap(), "1");
        let roots = authority::read_bundle(&path).unwrap();
        assert_eq!(roots.len(), 1);
        assert!(!roots.contains(&old_root[0]));
    }
}
