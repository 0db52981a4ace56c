//! One re-read of the policy file: read (following symlinks), compare with what the last read
//! found, and parse and apply what is new. Each new state of the file, good or bad, is reported once.
//!
//! New content is applied only when a second read [`SETTLE`] later finds the same bytes: a file
//! written in place (`cat >`, an editor without a rename) can be read halfway, and a policy cut
//! after a rule's `id` line still parses, as a rule allowing that peer every method and path.
//! While the file keeps changing, nothing is applied; the next event or poll reads it again.

use std::path::PathBuf;
use std::sync::Arc;

use super::{Policy, PolicyError, PolicyStore, ReloadOutcome, in_file, read_file};

/// The policy file, the store it feeds, and what the last read found.
pub(super) struct Reloader {
    path: PathBuf,
    store: PolicyStore,
    last_seen: Seen,
    parse: ParseFn,
}

/// How long a new file content must stay the same before it is applied.
pub(super) const SETTLE: std::time::Duration = std::time::Duration::from_millis(150);

/// Turns a file's text into a policy: [`Policy::parse`], or another format's parser.
pub type ParseFn = Arc<dyn Fn(&str) -> Result<Policy, PolicyError> + Send + Sync>;

/// What the last read found, applied or not, so that one bad file is reported once.
#[derive(PartialEq, Eq)]
enum Seen {
    Content(Vec<u8>),
    ReadError(String),
}

impl Reloader {
    /// The first load: every failure is an error for the caller.
    #[cfg(test)]
    pub(super) fn load(path: PathBuf, store: PolicyStore) -> Result<Self, PolicyError> {
        Self::load_with(path, store, Arc::new(Policy::parse))
    }

    /// The first load, with `parse` for this and every later read.
    pub(super) fn load_with(
        path: PathBuf,
        store: PolicyStore,
        parse: ParseFn,
    ) -> Result<Self, PolicyError> {
        let (policy, bytes) = read_file(&path)
            .and_then(|bytes| Ok((parse_bytes(&parse, &bytes)?, bytes)))
            .map_err(|error| in_file(&path, error))?;
        store.store(Some(Arc::new(policy)));
        tracing::info!(path = %path.display(), "policy loaded");
        Ok(Self {
            path,
            store,
            last_seen: Seen::Content(bytes),
            parse,
        })
    }

    /// Re-reads the file; applies it when it is new and valid.
    pub(super) fn check(&mut self) -> ReloadOutcome {
        let seen = match read_file(&self.path) {
            Ok(bytes) => Seen::Content(bytes),
            Err(error) => Seen::ReadError(in_file(&self.path, error).to_string()),
        };
        if seen == self.last_seen {
            return ReloadOutcome::Unchanged;
        }
        if let Seen::Content(bytes) = &seen {
            std::thread::sleep(SETTLE);
            if !matches!(read_file(&self.path), Ok(again) if again == *bytes) {
                tracing::debug!(path = %self.path.display(), "policy file still changing");
                return ReloadOutcome::Unchanged;
            }
        }
        let result = match &seen {
            Seen::Content(bytes) => parse_bytes(&self.parse, bytes)
                .map_err(|error| in_file(&self.path, error).to_string()),
            Seen::ReadError(reason) => Err(reason.clone()),
        };
        self.last_seen = seen;
        match result {
            Ok(policy) => {
                self.store.store(Some(Arc::new(policy)));
                tracing::info!(path = %self.path.display(), "policy reloaded");
                ReloadOutcome::Applied
            }
            Err(reason) => {
                tracing::error!(
                    path = %self.path.display(),
                    error = %reason,
                    "policy rejected, keeping the last good policy"
                );
                ReloadOutcome::Rejected(reason)
            }
        }
    }
}

fn parse_bytes(parse: &ParseFn, bytes: &[u8]) -> Result<Policy, PolicyError> {
    parse(std::str::from_utf8(bytes).map_err(|_| PolicyError::NotUtf8)?)
}

#[cfg(test)]
mod tests {
    use std::fs;

    use super::*;

    fn policy_for(port: u16) -> String {
        format!("inbound:\n  - port: {port}\n    allow: []\n")
    }

    fn current_port(store: &PolicyStore) -> Option<u16> {
        store
            .load()
            .as_ref()
            .and_then(|p| p.ports().next().map(|(port, _, _)| port))
    }

    #[test]
    fn each_change_is_reported_once() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("policy.yaml");
        fs::write(&path, policy_for(1)).unwrap();
        let store = PolicyStore::default();
        let mut r = Reloader::load(path.clone(), store.clone()).unwrap();
        assert_eq!(r.check(), ReloadOutcome::Unchanged);
        fs::write(&path, "inbound: 7\n").unwrap();
        let rejected = r.check();
        let at = "line 1 column 10";
        assert!(
            matches!(&rejected, ReloadOutcome::Rejected(reason) if reason.contains(at)),
            "{rejected:?}"
        );
        assert_eq!(r.check(), ReloadOutcome::Unchanged);
        fs::remove_file(&path).unwrap();
        let rejected = r.check();
        assert!(
            matches!(&rejected, ReloadOutcome::Rejected(reason) if reason.contains("cannot read")),
            "{rejected:?}"
        );
        assert_eq!(r.check(), ReloadOutcome::Unchanged);
        assert_eq!(current_port(&store), Some(1));
        fs::write(&path, policy_for(1)).unwrap();
        assert_eq!(r.check(), ReloadOutcome::Applied);
        fs::write(&path, policy_for(4)).unwrap();
        assert_eq!(r.check(), ReloadOutcome::Applied);
        assert_eq!(current_port(&store), Some(4));
    }

    /// A file caught halfway through an in-place write is not applied: cut after a rule's `id`,
    /// it would still parse, as a rule allowing that peer everything.
    #[test]
    fn a_file_still_being_written_is_not_applied() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("policy.yaml");
        let whole = "inbound:\n  - port: 8080\n    protocol: http\n    allow:\n      \
                     - id: spiffe://cluster.local/ns/ops/sa/*\n        methods: [GET]\n        \
                     paths: [/metrics]\n";
        fs::write(&path, policy_for(1)).unwrap();
        let store = PolicyStore::default();
        let mut r = Reloader::load(path.clone(), store.clone()).unwrap();
        let cut = &whole[..whole.find("        methods").unwrap()];
        fs::write(&path, cut).unwrap();
        // The writer goes on while the reloader waits for the content to settle.
        let writer = {
            let path = path.clone();
            std::thread::spawn(move || {
                std::thread::sleep(SETTLE / 3);
                fs::write(&path, whole).unwrap();
            })
        };
        assert_eq!(r.check(), ReloadOutcome::Unchanged);
        writer.join().unwrap();
        assert_eq!(
            current_port(&store),
            Some(1),
            "the cut policy was never applied"
        );
        assert_eq!(r.check(), ReloadOutcome::Applied);
        let policy = store.load();
        let ops = meshid_identity::SpiffeId::parse("spiffe://cluster.local/ns/ops/sa/x").unwrap();
        let policy = policy.as_ref().unwrap();
        assert!(policy.decide_request(8080, &ops, "GET", "/metrics").allowed);
        assert!(!policy.decide_request(8080, &ops, "DELETE", "/x").allowed);
    }
}
