//! One-time join tokens for workloads outside Kubernetes.
//!
//! `meshid-ca token create` writes `join-tokens/<sha256(token)>.json` (the token itself is printed once
//! and never stored). Redeeming renames that file to `<hash>.used`: the rename is the atomic claim, so a
//! token works once even when several requests race, and a reuse can be told apart from a typo.

use std::fs;
use std::io::Write;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime};

use base64::Engine;
use meshid_identity::{SpiffeId, TrustDomain};
use serde::{Deserialize, Serialize};

use super::{AuthError, Reason};
use crate::serial::sha256_hex;

const PREFIX: &str = "meshid-join-";
/// 32 random bytes, base64url without padding.
const SECRET_LEN: usize = 43;
/// How long redeemed and expired records are kept (so reuse gets a clear answer), then pruned.
const KEEP_USED: Duration = Duration::from_secs(24 * 3600);

#[derive(Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct Record {
    id: String,
    expires_at_unix: u64,
}

/// Errors of the token store's own files (not of a presented token).
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum JoinStoreError {
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("join token identity {0} is not in this CA's trust domain {1}")]
    WrongTrustDomain(SpiffeId, TrustDomain),
    #[error("no randomness available")]
    Random,
    #[error("the token's lifetime reaches past what the clock can tell")]
    TtlTooLong,
    #[error(
        "{0}: the CA directory is read-only (a Kubernetes Secret volume, or a read-only mount): join \
         tokens need a writable CA directory shared by every CA process, so they are for CAs outside a \
         cluster; in Kubernetes, workloads authenticate with their service-account tokens"
    )]
    ReadOnly(PathBuf),
}

/// Why join tokens cannot work on a directory: it is a Kubernetes Secret volume (kubelet replaces
/// its files whole, and mounts it read-only).
pub fn is_secret_volume(ca_dir: &Path) -> bool {
    ca_dir.join("..data").exists()
}

/// Why a looked-up join token was not consumed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum RedeemError {
    /// Another request consumed it first.
    #[error(transparent)]
    Used(AuthError),
    /// Its use could not be recorded in `dir` (read-only, full): the token is still unused.
    #[error("cannot record the join token's use in {}: {source}", dir.display())]
    Unrecorded {
        dir: PathBuf,
        source: std::io::Error,
    },
}

/// The join tokens of a CA directory.
#[derive(Debug, Clone)]
pub struct JoinTokenStore {
    dir: PathBuf,
    trust_domain: TrustDomain,
    /// The CA directory is a read-only Secret volume: tokens can be neither created nor redeemed.
    read_only: bool,
}

/// A token that was found and is still valid, not yet consumed.
#[derive(Debug)]
pub struct PendingJoin {
    pub id: SpiffeId,
    hash: String,
}

impl JoinTokenStore {
    /// The store under `<ca dir>/join-tokens`.
    pub fn new(ca_dir: &Path, trust_domain: TrustDomain) -> Self {
        Self {
            dir: ca_dir.join("join-tokens"),
            trust_domain,
            read_only: is_secret_volume(ca_dir),
        }
    }

    /// Creates a token for `id` valid for `ttl`; returns the token (shown once, stored only hashed).
    pub fn create(&self, id: &SpiffeId, ttl: Duration) -> Result<String, JoinStoreError> {
        if id.trust_domain() != self.trust_domain {
            return Err(JoinStoreError::WrongTrustDomain(
                id.clone(),
                self.trust_domain.clone(),
            ));
        }
        if self.read_only {
            return Err(JoinStoreError::ReadOnly(self.dir.clone()));
        }
        let io = |path: &Path| {
            let path = path.to_owned();
            let store = self.dir.clone();
            move |source: std::io::Error| match source.kind() {
                std::io::ErrorKind::ReadOnlyFilesystem | std::io::ErrorKind::PermissionDenied => {
                    JoinStoreError::ReadOnly(store)
                }
                _ => JoinStoreError::Io { path, source },
            }
        };
        fs::create_dir_all(&self.dir).map_err(io(&self.dir))?;
        self.prune();
        let mut secret = [0u8; 32];
        aws_lc_rs::rand::fill(&mut secret).map_err(|_| JoinStoreError::Random)?;
        let token = format!(
            "{PREFIX}{}",
            base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(secret)
        );
        let record = Record {
            id: id.to_string(),
            expires_at_unix: unix(
                SystemTime::now()
                    .checked_add(ttl)
                    .ok_or(JoinStoreError::TtlTooLong)?,
            ),
        };
        let hash = sha256_hex(token.as_bytes());
        let tmp = self.dir.join(format!(".{hash}.tmp"));
        let path = self.dir.join(format!("{hash}.json"));
        let json = serde_json::to_vec(&record).unwrap_or_default();
        put_record(&tmp, &path, &json).map_err(|(p, e)| io(&p)(e))?;
        Ok(token)
    }

    /// Finds a presented token and checks it is unused and unexpired, without consuming it.
    pub fn lookup(&self, token: &str) -> Result<PendingJoin, AuthError> {
        if self.read_only {
            return Err(AuthError::unauthenticated(
                Reason::UnknownJoinToken,
                "join tokens are not available on this CA: its directory is a read-only Kubernetes \
                 Secret volume; authenticate with a service-account token",
            ));
        }
        let secret = token.strip_prefix(PREFIX).unwrap_or("");
        if secret.len() != SECRET_LEN
            || !secret
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
        {
            return Err(AuthError::unauthenticated(
                Reason::UnknownJoinToken,
                "join token is malformed",
            ));
        }
        let hash = sha256_hex(token.as_bytes());
        let path = self.dir.join(format!("{hash}.json"));
        // A record is a few hundred bytes; a FIFO or a device in its place is refused unread.
        let record = match meshid_runtime::file::read_regular(&path, 64 * 1024) {
            Ok(bytes) => bytes,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                let used = self.dir.join(format!("{hash}.used"));
                return Err(match fs::symlink_metadata(&used) {
                    Ok(_) => AuthError::unauthenticated(
                        Reason::JoinTokenUsed,
                        "join token was already used",
                    ),
                    Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                        AuthError::unauthenticated(
                            Reason::UnknownJoinToken,
                            "join token is not known",
                        )
                    }
                    Err(error) => unreadable(&used, &error),
                });
            }
            // EMFILE, EIO, EACCES, a directory in the record's place: the CA's own failure, which
            // says nothing of the token. UNAVAILABLE, so the workload keeps it (it treats
            // UNAUTHENTICATED as spent).
            Err(error) => return Err(unreadable(&path, &error)),
        };
        let record: Record = serde_json::from_slice(&record).map_err(|_| {
            AuthError::unauthenticated(Reason::UnknownJoinToken, "join token record is corrupt")
        })?;
        // A clock before the epoch (unreadable) counts every token as expired, not as fresh.
        let now = SystemTime::now()
            .duration_since(SystemTime::UNIX_EPOCH)
            .map_or(u64::MAX, |d| d.as_secs());
        if now >= record.expires_at_unix {
            return Err(AuthError::unauthenticated(
                Reason::JoinTokenExpired,
                "join token has expired",
            ));
        }
        let id = SpiffeId::parse(&record.id).map_err(|_| {
            AuthError::unauthenticated(Reason::UnknownJoinToken, "join token record is corrupt")
        })?;
        if id.trust_domain() != self.trust_domain {
            return Err(AuthError::permission_denied(
                Reason::WrongTrustDomain,
                "join token identity is outside this trust domain",
            ));
        }
        Ok(PendingJoin { id, hash })
    }

    /// Consumes a looked-up token. Fails if another request consumed it first, or if the use
    /// cannot be recorded (the token then stays unused).
    pub fn redeem(&self, pending: PendingJoin) -> Result<SpiffeId, RedeemError> {
        let from = self.dir.join(format!("{}.json", pending.hash));
        let to = self.dir.join(format!("{}.used", pending.hash));
        let recorded = fs::rename(&from, &to).and_then(|()| {
            // The use must survive a power loss, or a one-time token could be used twice: when
            // the directory cannot be synced, the token goes back to unused.
            crate::ca_dir::sync_dir_of(&to).inspect_err(|_| {
                let _ = fs::rename(&to, &from);
            })
        });
        if recorded.is_ok() {
            // The mark is kept a day from its use, not from the token's creation (a rename keeps
            // the record's time): a token made to live past a day and used late would otherwise
            // lose its mark at the next prune, and a second use be answered "not known" rather
            // than "used". Best effort: without it the token still cannot be used again.
            let _ = fs::OpenOptions::new()
                .write(true)
                .open(&to)
                .and_then(|f| f.set_modified(SystemTime::now()));
        }
        recorded.map_err(|source| match source.kind() {
            std::io::ErrorKind::NotFound => RedeemError::Used(AuthError::unauthenticated(
                Reason::JoinTokenUsed,
                "join token was already used",
            )),
            // A read-only or full directory, or anything else in the way: not the token's fault.
            _ => RedeemError::Unrecorded {
                dir: self.dir.clone(),
                source,
            },
        })?;
        Ok(pending.id)
    }

    /// Removes expired records and old tombstones. Best effort.
    fn prune(&self) {
        let Ok(entries) = fs::read_dir(&self.dir) else {
            return;
        };
        let now = SystemTime::now();
        for entry in entries.flatten() {
            let path = entry.path();
            let old = entry
                .metadata()
                .and_then(|m| m.modified())
                .map(|t| now.duration_since(t).unwrap_or_default() > KEEP_USED)
                .unwrap_or(false);
            let expired_json = path.extension().is_some_and(|e| e == "json")
                && fs::read(&path)
                    .ok()
                    .and_then(|b| serde_json::from_slice::<Record>(&b).ok())
                    .is_some_and(|r| {
                        unix(now) >= r.expires_at_unix.saturating_add(KEEP_USED.as_secs())
                    });
            let leftover = crate::ca_dir::is_leftover_temp(&path, now);
            if old && path.extension().is_some_and(|e| e == "used") || expired_json || leftover {
                let _ = fs::remove_file(&path);
            }
        }
    }
}

/// A token record that could not be read: logged with the file and the error (the caller is told
/// neither), answered UNAVAILABLE.
fn unreadable(path: &Path, error: &std::io::Error) -> AuthError {
    tracing::error!(
        path = %path.display(),
        %error,
        "reading the join token store failed; the token was not consumed"
    );
    AuthError::unavailable(
        Reason::JoinTokenUnreadable,
        "could not read the token store; the token was not consumed: try again later",
    )
}

fn unix(t: SystemTime) -> u64 {
    t.duration_since(SystemTime::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

/// Writes a new token record: `json` to `tmp` (mode 0600, synced), renamed to `path`, then the
/// directory synced, so a token is handed out only once its record would survive a power loss.
/// On failure nothing of it is left (no temporary file, no record) and the error names the file.
fn put_record(tmp: &Path, path: &Path, json: &[u8]) -> Result<(), (PathBuf, std::io::Error)> {
    let written = fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(tmp)
        .and_then(|mut f| {
            f.write_all(json)?;
            f.sync_all()
        });
    if let Err(e) = written {
        let _ = fs::remove_file(tmp);
        return Err((tmp.to_owned(), e));
    }
    if let Err(e) = fs::rename(tmp, path) {
        let _ = fs::remove_file(tmp);
        return Err((path.to_owned(), e));
    }
    if let Err(e) = crate::ca_dir::sync_dir_of(path) {
        let _ = fs::remove_file(path);
        return Err((path.to_owned(), e));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn store() -> (tempfile::TempDir, JoinTokenStore) {
        let dir = tempfile::tempdir().unwrap();
        let s = JoinTokenStore::new(dir.path(), TrustDomain::new("td").unwrap());
        (dir, s)
    }

    /// A lifetime the clock cannot reach is a clear error, never a panic of `token create`.
    #[test]
    fn a_lifetime_past_the_clock_is_refused() {
        let (_dir, s) = store();
        let id = SpiffeId::parse("spiffe://td/vm/db").unwrap();
        let err = s.create(&id, Duration::MAX).unwrap_err();
        assert!(matches!(err, JoinStoreError::TtlTooLong), "{err}");
    }

    #[test]
    fn a_secret_volume_says_join_tokens_do_not_work_there() {
        let dir = tempfile::tempdir().unwrap();
        let data = dir.path().join("..2026_12_02_00_00_00.000000001");
        fs::create_dir(&data).unwrap();
        std::os::unix::fs::symlink(&data, dir.path().join("..data")).unwrap();
        let s = JoinTokenStore::new(dir.path(), TrustDomain::new("td").unwrap());
        let id = SpiffeId::parse("spiffe://td/vm/db").unwrap();
        let err = s.create(&id, Duration::from_secs(600)).unwrap_err();
        assert!(matches!(err, JoinStoreError::ReadOnly(_)), "{err}");
        assert!(err.to_string().contains("service-account tokens"), "{err}");
        assert!(!dir.path().join("join-tokens").exists(), "nothing written");
        let refused = s
            .lookup("meshid-join-AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA")
            .unwrap_err();
        assert!(
            refused.message.contains("read-only Kubernetes Secret"),
            "{}",
            refused.message
        );
    }

    /// Creating and redeeming a token sync the tokens' directory after the rename (what this
    /// cannot show: that it reached the disk), and a record that cannot be put in place leaves
    /// no temporary file behind.
    #[test]
    fn token_records_are_synced_and_a_failed_write_leaves_nothing() {
        let (dir, s) = store();
        let tokens = dir.path().join("join-tokens");
        let id = SpiffeId::parse("spiffe://td/vm/db").unwrap();
        crate::ca_dir::synced_dirs::take();
        let token = s.create(&id, Duration::from_secs(600)).unwrap();
        assert_eq!(crate::ca_dir::synced_dirs::take(), vec![tokens.clone()]);
        assert_eq!(s.redeem(s.lookup(&token).unwrap()).unwrap(), id);
        assert_eq!(crate::ca_dir::synced_dirs::take(), vec![tokens.clone()]);

        // A non-empty directory in the record's place fails the rename (also for root).
        let path = tokens.join("f00.json");
        fs::create_dir(&path).unwrap();
        fs::write(path.join("in-the-way"), "x").unwrap();
        let tmp = tokens.join(".f00.tmp");
        let (named, _) = put_record(&tmp, &path, b"{}").unwrap_err();
        assert_eq!(named, path);
        assert!(!tmp.exists(), "the temporary file is removed");
        assert_eq!(crate::ca_dir::synced_dirs::take(), Vec::<PathBuf>::new());
    }

    #[test]
    fn token_works_once() {
        let (dir, s) = store();
        let id = SpiffeId::parse("spiffe://td/vm/db").unwrap();
        let token = s.create(&id, Duration::from_secs(600)).unwrap();
        // Only the hash is on disk.
        for e in fs::read_dir(dir.path().join("join-tokens")).unwrap() {
            let content = fs::read_to_string(e.unwrap().path()).unwrap();
            assert!(!content.contains(&token[PREFIX.len()..]));
        }
        let p = s.lookup(&token).unwrap();
        assert_eq!(s.redeem(p).unwrap(), id);
        let again = s.lookup(&token).unwrap_err();
        assert_eq!(again.reason, Reason::JoinTokenUsed);
    }

    #[test]
    fn racing_redeems_consume_once() {
        let (_dir, s) = store();
        let id = SpiffeId::parse("spiffe://td/vm/db").unwrap();
        let token = s.create(&id, Duration::from_secs(600)).unwrap();
        let a = s.lookup(&token).unwrap();
        let b = s.lookup(&token).unwrap();
        assert!(s.redeem(a).is_ok());
        assert!(
            matches!(s.redeem(b), Err(RedeemError::Used(e)) if e.reason == Reason::JoinTokenUsed)
        );
    }

    /// A token made long ago and used now keeps its mark a day from its use: a second use is
    /// answered "used" after a prune, not "unknown".
    #[test]
    fn a_late_use_is_remembered_a_day_from_the_use() {
        let (_dir, s) = store();
        let id = SpiffeId::parse("spiffe://td/vm/db").unwrap();
        let token = s.create(&id, Duration::from_secs(3 * 24 * 3600)).unwrap();
        // The record written two days ago.
        let record = std::fs::read_dir(&s.dir)
            .unwrap()
            .map(|e| e.unwrap().path())
            .find(|p| p.extension().is_some_and(|e| e == "json"))
            .unwrap();
        std::fs::File::options()
            .write(true)
            .open(&record)
            .unwrap()
            .set_modified(SystemTime::now() - Duration::from_secs(2 * 24 * 3600))
            .unwrap();
        s.redeem(s.lookup(&token).unwrap()).unwrap();
        s.prune();
        assert_eq!(s.lookup(&token).unwrap_err().reason, Reason::JoinTokenUsed);
    }

    #[test]
    fn expired_unknown_and_malformed_tokens() {
        let (_dir, s) = store();
        let id = SpiffeId::parse("spiffe://td/vm/db").unwrap();
        let token = s.create(&id, Duration::from_secs(0)).unwrap();
        assert_eq!(
            s.lookup(&token).unwrap_err().reason,
            Reason::JoinTokenExpired
        );
        let unknown = format!("{PREFIX}{}", "A".repeat(SECRET_LEN));
        assert_eq!(
            s.lookup(&unknown).unwrap_err().reason,
            Reason::UnknownJoinToken
        );
        for bad in [
            "",
            "meshid-join-",
            "../../etc/passwd",
            &format!("{PREFIX}{}/", "a".repeat(42)),
        ] {
            assert_eq!(s.lookup(bad).unwrap_err().reason, Reason::UnknownJoinToken);
        }
    }

    #[test]
    fn a_record_that_cannot_be_read_is_unavailable_not_unknown() {
        let (dir, s) = store();
        let id = SpiffeId::parse("spiffe://td/vm/db").unwrap();
        let token = s.create(&id, Duration::from_secs(600)).unwrap();
        let record = dir
            .path()
            .join("join-tokens")
            .join(format!("{}.json", sha256_hex(token.as_bytes())));
        let bytes = fs::read(&record).unwrap();
        fs::remove_file(&record).unwrap();
        fs::create_dir(&record).unwrap();
        let err = s.lookup(&token).unwrap_err();
        assert_ne!(err.reason, Reason::UnknownJoinToken);
        assert_eq!(err.reason, Reason::JoinTokenUnreadable);
        assert_eq!(err.code(), tonic::Code::Unavailable);
        assert!(err.message.contains("not consumed"), "{}", err.message);
        // Put right, the token works (it was not spent).
        fs::remove_dir(&record).unwrap();
        fs::write(&record, bytes).unwrap();
        assert_eq!(s.redeem(s.lookup(&token).unwrap()).unwrap(), id);
    }

    #[test]
    fn refuses_other_trust_domains() {
        let (_dir, s) = store();
        let id = SpiffeId::parse("spiffe://other/vm/db").unwrap();
        assert!(matches!(
            s.create(&id, Duration::from_secs(60)),
            Err(JoinStoreError::WrongTrustDomain(..))
        ));
    }
}
