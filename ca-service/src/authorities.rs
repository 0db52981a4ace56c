//! The rotation state in the CA directory: which authorities exist and what each one does.
//!
//! `authorities.json` lists authorities (a root and its signing intermediate, whose files sit in the
//! CA directory under a per-authority prefix: `root.pem` for the first, `a2-root.pem` for the next;
//! flat, so the whole directory fits a Kubernetes Secret) with a state: `prepared` (root in the bundle, not signing), `active` (signing; exactly
//! one), `retiring` (root in the bundle, not signing, leaves still live) or `gone`. Without the file the
//! CA has one active authority: the directory's own `root.pem`/`intermediate.*` (unless `a<n>-` files
//! show a rotation made the directory: the file was lost, and loading refuses). `bundle.pem` is
//! rewritten from the roots of every authority that is not gone (the rotation commands keep the
//! roots added to it by hand, see [`RotationState::bundle_on_disk`]), and `bundle_version`
//! increases with every change, so every CA process on the directory serves the same version. A
//! change of `bundle.pem` made by hand each process numbers itself (one past its own version):
//! `rotate prepare` numbers the next bundle above what the running processes report.

use std::fs;
use std::path::Path;

use rustls_pki_types::CertificateDer;
use serde::{Deserialize, Serialize};

use meshid_identity::pem::pem_cert;

use crate::ca_dir::{AuthorityError, AuthorityFiles, read_bundle, write_atomic};

pub const STATE_FILE: &str = "authorities.json";

/// The highest `bundle_version` a state may hold: 2^53 (JSON readers keep it exact). One step per
/// change never gets there; a state beyond it is refused.
pub const MAX_BUNDLE_VERSION: u64 = 1 << 53;

/// How `bundle.pem` differs from what the rotation state puts in it (see
/// [`RotationState::bundle_on_disk`]).
#[derive(Debug, Default)]
pub struct BundleOnDisk {
    /// Roots it holds that no authority of the state puts there (added by hand).
    pub added: Vec<CertificateDer<'static>>,
    /// Roots the state puts there that it lacks (taken out by hand).
    pub taken_out: Vec<CertificateDer<'static>>,
}

/// What an authority does now.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum AuthorityState {
    Prepared,
    Active,
    Retiring,
    Gone,
}

impl AuthorityState {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Prepared => "prepared",
            Self::Active => "active",
            Self::Retiring => "retiring",
            Self::Gone => "gone",
        }
    }
}

/// One authority.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AuthorityRecord {
    pub name: String,
    /// File-name prefix of `root.pem`, `intermediate.pem`, `intermediate.key` (and maybe
    /// `root.key`) in the CA directory: empty for the first authority, `a<n>-` for later ones.
    pub prefix: String,
    pub state: AuthorityState,
    /// The bundle version that first contained this authority's root.
    pub in_bundle_since: u64,
    /// When it stopped signing (Unix seconds; set by `rotate activate`): every certificate it issued
    /// expires by this plus the CA's maximum lifetime.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub signed_until: Option<i64>,
    /// When it started signing (set by `rotate activate`; unknown for the CA's first authority).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub signing_since: Option<i64>,
}

/// The whole rotation state.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RotationState {
    pub bundle_version: u64,
    /// After a forced retirement: bundle messages of this version tell sidecars to renew at once.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub renew_now_at: Option<u64>,
    pub authorities: Vec<AuthorityRecord>,
    /// The bundle version `revoke` or `unrevoke` last moved on to, after writing
    /// `revocations.json`: set, the directory has a revocation list, and a missing file is a lost
    /// list (refused, [`crate::revocations::Revocations::load`]), not an empty one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub revocations_written_at: Option<u64>,
}

fn invalid(path: &Path, reason: impl Into<String>) -> AuthorityError {
    AuthorityError::Invalid {
        path: path.to_owned(),
        reason: reason.into(),
    }
}

/// The first file named like a rotated authority's (`a<digits>-...`) in `ca_dir`, if any.
fn prefixed_authority_file(ca_dir: &Path) -> Result<Option<String>, AuthorityError> {
    let entries = fs::read_dir(ca_dir).map_err(|source| AuthorityError::Io {
        path: ca_dir.to_owned(),
        source,
    })?;
    for entry in entries {
        let entry = entry.map_err(|source| AuthorityError::Io {
            path: ca_dir.to_owned(),
            source,
        })?;
        let name = entry.file_name().to_string_lossy().into_owned();
        if is_prefixed_authority_file(&name) {
            return Ok(Some(name));
        }
    }
    Ok(None)
}

/// `a<digits>-<rest>`: a file of an authority `rotate prepare` made.
pub(crate) fn is_prefixed_authority_file(name: &str) -> bool {
    let Some(rest) = name.strip_prefix('a') else {
        return false;
    };
    let digits = rest.bytes().take_while(u8::is_ascii_digit).count();
    digits > 0 && rest[digits..].starts_with('-')
}

impl RotationState {
    /// Reads `authorities.json`, or the single-authority default when it does not exist.
    pub fn load(ca_dir: &Path) -> Result<Self, AuthorityError> {
        let path = ca_dir.join(STATE_FILE);
        let bytes = match crate::ca_dir::read_file(&path, crate::ca_dir::MAX_CA_FILE) {
            Ok(b) => b,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                // Without the file the directory has one authority, its own unprefixed files;
                // `a<n>-` files beside them belong to a later authority, which only a rotation
                // (and so `authorities.json`) makes: the file was lost, and guessing "authority
                // 1" would sign with whatever the unprefixed files hold (maybe a retired one).
                if let Some(name) = prefixed_authority_file(ca_dir)? {
                    return Err(invalid(
                        &path,
                        format!(
                            "missing, but the directory holds {name}, a file of an authority a \
                             rotation made: put authorities.json back (the CA does not guess which \
                             authority signs); if it is what a `rotate prepare` of an older meshid \
                             left when cut short, before any rotation, remove the a<n>- files"
                        ),
                    ));
                }
                return Ok(Self {
                    bundle_version: 1,
                    renew_now_at: None,
                    revocations_written_at: None,
                    authorities: vec![AuthorityRecord {
                        name: "1".into(),
                        prefix: String::new(),
                        state: AuthorityState::Active,
                        in_bundle_since: 1,
                        signed_until: None,
                        signing_since: None,
                    }],
                });
            }
            Err(source) => return Err(AuthorityError::Io { path, source }),
        };
        let state: Self =
            serde_json::from_slice(&bytes).map_err(|e| invalid(&path, e.to_string()))?;
        state.check().map_err(|r| invalid(&path, r))?;
        Ok(state)
    }

    /// Exactly one active authority; names unique; directories inside the CA directory.
    fn check(&self) -> Result<(), String> {
        // One step per change: a version this high is a hand edit or a lying report, and the
        // next step would leave no room (a version may never go back).
        if self.bundle_version > MAX_BUNDLE_VERSION {
            return Err(format!(
                "bundle_version {} is beyond {MAX_BUNDLE_VERSION}",
                self.bundle_version
            ));
        }
        let active = self
            .authorities
            .iter()
            .filter(|a| a.state == AuthorityState::Active)
            .count();
        if active != 1 {
            return Err(format!(
                "{active} active authorities; exactly one must be active"
            ));
        }
        let mut names = std::collections::HashSet::new();
        for a in &self.authorities {
            if !names.insert(&a.name) {
                return Err(format!("authority {:?} is listed twice", a.name));
            }
            let safe = a
                .prefix
                .bytes()
                .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-');
            if !safe {
                return Err(format!(
                    "authority {:?}: prefix may hold only lowercase letters, digits and '-'",
                    a.name
                ));
            }
        }
        Ok(())
    }

    pub fn active(&self) -> &AuthorityRecord {
        // `check` guarantees one; `load` and `save` run it.
        self.authorities
            .iter()
            .find(|a| a.state == AuthorityState::Active)
            .unwrap_or(&self.authorities[0])
    }

    pub fn find(&self, state: AuthorityState) -> Option<&AuthorityRecord> {
        self.authorities.iter().find(|a| a.state == state)
    }

    /// Where an authority's files are.
    pub fn files_of(&self, ca_dir: &Path, record: &AuthorityRecord) -> AuthorityFiles {
        AuthorityFiles {
            dir: ca_dir.to_owned(),
            prefix: record.prefix.clone(),
        }
    }

    /// Roots of every authority that is not gone, in list order, each once (two authorities may
    /// share an imported root: each has its own intermediate under it).
    pub fn bundle_roots(
        &self,
        ca_dir: &Path,
    ) -> Result<Vec<CertificateDer<'static>>, AuthorityError> {
        let mut roots = Vec::new();
        for a in self
            .authorities
            .iter()
            .filter(|a| a.state != AuthorityState::Gone)
        {
            for root in read_bundle(&self.files_of(ca_dir, a).path("root.pem"))? {
                if !roots.contains(&root) {
                    roots.push(root);
                }
            }
        }
        Ok(roots)
    }

    /// Moves the bundle version on by one for a change of the bundle that is not a rotation (the
    /// revocation list), writing only `authorities.json`, so every CA on the directory serves the
    /// change under the same new version and a later `rotate prepare` gets a version no sidecar
    /// acknowledged before (the activation gate waits for exactly that one). Returns the version.
    /// The caller holds the directory's lock ([`crate::ca_dir::DirLock`]).
    pub fn bump_version(ca_dir: &Path) -> Result<u64, AuthorityError> {
        Self::bump_version_with(ca_dir, false)
    }

    /// [`Self::bump_version`] after writing `revocations.json`: also records that the directory
    /// has a revocation list (`revocations_written_at`).
    pub fn bump_version_for_revocations(ca_dir: &Path) -> Result<u64, AuthorityError> {
        Self::bump_version_with(ca_dir, true)
    }

    fn bump_version_with(ca_dir: &Path, revocations: bool) -> Result<u64, AuthorityError> {
        let mut state = Self::load(ca_dir)?;
        state.bundle_version = state.bundle_version.saturating_add(1);
        if revocations {
            state.revocations_written_at = Some(state.bundle_version);
        }
        let json = serde_json::to_vec_pretty(&state)
            .map_err(|e| invalid(&ca_dir.join(STATE_FILE), e.to_string()))?;
        write_atomic(&ca_dir.join(STATE_FILE), &json)?;
        Ok(state.bundle_version)
    }

    /// `bundle.pem` as it stands against the roots this state puts in it: an operator may add roots
    /// by hand (a migration) or take some out, and every CA on the directory serves the file as it
    /// is. A missing `bundle.pem` differs in nothing (it is written from the state); one that
    /// cannot be read is an error naming it (what it held is unknown, so nothing may write over
    /// it).
    pub fn bundle_on_disk(&self, ca_dir: &Path) -> Result<BundleOnDisk, AuthorityError> {
        let path = ca_dir.join("bundle.pem");
        let on_disk = match read_bundle(&path) {
            Ok(roots) => roots,
            Err(AuthorityError::Io { source, .. })
                if source.kind() == std::io::ErrorKind::NotFound =>
            {
                return Ok(BundleOnDisk::default());
            }
            Err(e) => return Err(e),
        };
        let implied = self.bundle_roots(ca_dir)?;
        Ok(BundleOnDisk {
            added: on_disk
                .iter()
                .filter(|r| !implied.contains(r))
                .cloned()
                .collect(),
            taken_out: implied
                .into_iter()
                .filter(|r| !on_disk.contains(r))
                .collect(),
        })
    }

    /// Writes the state (atomically) and the bundle it implies. The bundle first, so a reader that
    /// sees the new state also finds its bundle. Roots added to `bundle.pem` by hand are dropped:
    /// the rotation commands use [`Self::save_keeping`].
    pub fn save(&self, ca_dir: &Path) -> Result<(), AuthorityError> {
        self.save_keeping(ca_dir, &[])
    }

    /// [`Self::save`], with `kept` (roots added to `bundle.pem` by hand, see
    /// [`Self::bundle_on_disk`]) after the state's own roots in the bundle.
    pub fn save_keeping(
        &self,
        ca_dir: &Path,
        kept: &[CertificateDer<'static>],
    ) -> Result<(), AuthorityError> {
        self.check()
            .map_err(|r| invalid(&ca_dir.join(STATE_FILE), r))?;
        let mut roots = self.bundle_roots(ca_dir)?;
        for root in kept {
            if !roots.contains(root) {
                roots.push(root.clone());
            }
        }
        let path = ca_dir.join("bundle.pem");
        // The same roots as the file holds (`rotate intermediate`, `activate`): left as it is, so
        // that no reordering makes the CAs serve a new version of the same trust.
        let same = read_bundle(&path)
            .is_ok_and(|now| now.len() == roots.len() && now.iter().all(|r| roots.contains(r)));
        if !same {
            let bundle: String = roots.iter().map(|r| pem_cert(r)).collect();
            write_atomic(&path, bundle.as_bytes())?;
        }
        let json = serde_json::to_vec_pretty(self)
            .map_err(|e| invalid(&ca_dir.join(STATE_FILE), e.to_string()))?;
        write_atomic(&ca_dir.join(STATE_FILE), &json)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use meshid_identity::TrustDomain;

    #[test]
    fn default_state_and_round_trip() {
        let dir = tempfile::tempdir().unwrap();
        crate::authority::init(dir.path(), &TrustDomain::new("td").unwrap(), None).unwrap();
        let state = RotationState::load(dir.path()).unwrap();
        assert_eq!(state.active().prefix, "");
        assert_eq!(state.bundle_roots(dir.path()).unwrap().len(), 1);
        state.save(dir.path()).unwrap();
        assert_eq!(RotationState::load(dir.path()).unwrap(), state);
    }

    #[test]
    fn rejects_broken_states() {
        let dir = tempfile::tempdir().unwrap();
        for bad in [
            r#"{"bundle_version":1,"authorities":[]}"#,
            r#"{"bundle_version":1,"authorities":[{"name":"a","prefix":"","state":"prepared","in_bundle_since":1}]}"#,
            r#"{"bundle_version":1,"authorities":[{"name":"a","prefix":"../x","state":"active","in_bundle_since":1}]}"#,
            r#"{"bundle_version":1,"authorities":[],"extra":1}"#,
            r#"{"bundle_version":18446744073709551615,"authorities":[{"name":"a","prefix":"","state":"active","in_bundle_since":1}]}"#,
            r#"{"bundle_version":9007199254740993,"authorities":[{"name":"a","prefix":"","state":"active","in_bundle_since":1}]}"#,
            "garbage",
        ] {
            fs::write(dir.path().join(STATE_FILE), bad).unwrap();
            assert!(RotationState::load(dir.path()).is_err(), "{bad}");
        }
    }
}
