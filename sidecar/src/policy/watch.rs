//! Hot reload: a thread that keeps a [`PolicyStore`] in step with the policy file.
//!
//! The file's parent directory is watched (inotify, non-recursive), which sees in-place writes,
//! atomic renames over the file, and Kubernetes volume updates, where `policy.yaml` is a symlink
//! to `..data/policy.yaml` and `..data` is a symlink swapped atomically to a new timestamped
//! directory. Any event re-reads the path (following symlinks) once events have been quiet for a
//! moment (or at most a second after the first one), and only content that differs from the last
//! content seen is parsed. A slow periodic re-read covers whatever inotify misses: a symlink target
//! in another directory, a replaced parent directory, an exhausted inotify limit.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use arc_swap::ArcSwapOption;

pub use super::reload::ParseFn;
use super::reload::Reloader;
use super::{Policy, PolicyError};
use crate::watch::{DirWatcher, Timing};

/// The current policy, shared with the data plane (readers never block). `None` until one loads.
pub type PolicyStore = Arc<ArcSwapOption<Policy>>;

/// What a re-read of the policy file found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ReloadOutcome {
    /// A new valid policy is now in the store.
    Applied,
    /// The file changed but cannot be used (the reason names the path); the last good policy stays.
    Rejected(String),
    /// The file has the content already seen.
    Unchanged,
}

/// Watches the policy file until dropped; dropping it stops the watch thread and waits for it.
pub struct PolicyWatcher {
    path: PathBuf,
    watcher: DirWatcher,
}

/// Loads the policy file into `store`, then keeps it up to date.
///
/// A missing or invalid file at start is returned as `Err` and the store is left as it was. After
/// that, a valid new file is applied at once; an invalid (or unreadable) one keeps the last good
/// policy, is logged with `tracing::error!` and reported as [`ReloadOutcome::Rejected`].
/// `on_reload` is not called for the first load; it is called after every event-triggered re-read
/// (including [`ReloadOutcome::Unchanged`]) and after a periodic re-read that found something new.
/// It runs on the watch thread.
pub fn watch_policy_file(
    path: PathBuf,
    store: PolicyStore,
    on_reload: Box<dyn Fn(&ReloadOutcome) + Send + Sync>,
) -> Result<PolicyWatcher, PolicyError> {
    watch_with_timing(
        path,
        store,
        on_reload,
        POLICY_TIMING,
        Arc::new(Policy::parse),
    )
}

/// [`watch_policy_file`] for a file in another format: `parse` turns its text into a policy (e.g.
/// `meshid_identity::annotations::policy_or_annotations` for a policy or a downward-API
/// annotations file), and may check more than the text (e.g. that ports agree with listeners).
pub fn watch_policy_file_with(
    path: PathBuf,
    store: PolicyStore,
    on_reload: Box<dyn Fn(&ReloadOutcome) + Send + Sync>,
    parse: ParseFn,
) -> Result<PolicyWatcher, PolicyError> {
    watch_with_timing(path, store, on_reload, POLICY_TIMING, parse)
}

const POLICY_TIMING: Timing = Timing {
    quiet: Duration::from_millis(100),
    max_delay: Duration::from_secs(1),
    poll: Duration::from_secs(2),
};

fn watch_with_timing(
    path: PathBuf,
    store: PolicyStore,
    on_reload: Box<dyn Fn(&ReloadOutcome) + Send + Sync>,
    timing: Timing,
    parse: ParseFn,
) -> Result<PolicyWatcher, PolicyError> {
    let mut reloader = Reloader::load_with(path.clone(), store, parse)?;
    let watcher = DirWatcher::spawn(
        "policy-watch",
        "policy file",
        &[path.as_path()],
        timing,
        false,
        move |from_event| {
            let outcome = reloader.check();
            if from_event || outcome != ReloadOutcome::Unchanged {
                on_reload(&outcome);
            }
        },
    )
    .map_err(PolicyError::Watch)?;
    Ok(PolicyWatcher { path, watcher })
}

impl std::fmt::Debug for PolicyWatcher {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PolicyWatcher")
            .field("path", &self.path)
            .field("inotify", &self.watcher.inotify())
            .finish_non_exhaustive()
    }
}

#[cfg(test)]
mod tests {
    use std::fs;
    use std::os::unix::fs::symlink;
    use std::path::Path;
    use std::sync::Mutex;
    use std::thread;
    use std::time::Instant;

    use super::*;

    /// Periodic re-reads effectively off, so that these tests see inotify at work.
    const INOTIFY_ONLY: Timing = Timing {
        quiet: Duration::from_millis(50),
        max_delay: Duration::from_millis(500),
        poll: Duration::from_secs(3600),
    };

    fn policy_for(port: u16) -> String {
        format!("inbound:\n  - port: {port}\n    allow: []\n")
    }

    /// The one port of the current policy.
    fn current_port(store: &PolicyStore) -> Option<u16> {
        store
            .load()
            .as_ref()
            .and_then(|p| p.ports().next().map(|(port, _, _)| port))
    }

    fn wait_for(what: &str, done: impl Fn() -> bool) {
        let deadline = Instant::now() + Duration::from_secs(10);
        while !done() {
            assert!(Instant::now() < deadline, "timed out waiting for {what}");
            thread::sleep(Duration::from_millis(20));
        }
    }

    struct Harness {
        store: PolicyStore,
        outcomes: Arc<Mutex<Vec<ReloadOutcome>>>,
        watcher: PolicyWatcher,
    }

    fn start(path: &Path, timing: Timing) -> Harness {
        let store = PolicyStore::default();
        let outcomes = Arc::new(Mutex::new(Vec::new()));
        let record = outcomes.clone();
        let on_reload = Box::new(move |o: &ReloadOutcome| record.lock().unwrap().push(o.clone()));
        let watcher = watch_with_timing(
            path.to_owned(),
            store.clone(),
            on_reload,
            timing,
            Arc::new(Policy::parse),
        )
        .unwrap();
        assert!(watcher.watcher.inotify(), "inotify is not available");
        Harness {
            store,
            outcomes,
            watcher,
        }
    }

    impl Harness {
        fn wait_for_port(&self, port: u16) {
            wait_for(&format!("port {port}"), || {
                current_port(&self.store) == Some(port)
            });
        }
        fn rejections(&self) -> Vec<String> {
            let outcomes = self.outcomes.lock().unwrap();
            outcomes
                .iter()
                .filter_map(|o| match o {
                    ReloadOutcome::Rejected(reason) => Some(reason.clone()),
                    _ => None,
                })
                .collect()
        }
    }

    #[test]
    fn a_bad_file_at_start_is_an_error_and_leaves_the_store_empty() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("policy.yaml");
        let store = PolicyStore::default();
        let error = watch_policy_file(path.clone(), store.clone(), Box::new(|_| {})).unwrap_err();
        assert!(
            error.to_string().contains("policy.yaml: cannot read"),
            "{error}"
        );
        fs::write(&path, "inbound:\n  - port: 0\n    allow: []\n").unwrap();
        let error = watch_policy_file(path, store.clone(), Box::new(|_| {})).unwrap_err();
        assert!(error.to_string().contains("line 2 column 11"), "{error}");
        assert!(store.load().is_none());
    }

    #[test]
    fn in_place_rewrite() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("policy.yaml");
        fs::write(&path, policy_for(1)).unwrap();
        let h = start(&path, INOTIFY_ONLY);
        assert_eq!(current_port(&h.store), Some(1));
        fs::write(&path, policy_for(2)).unwrap();
        h.wait_for_port(2);
        // The store is swapped before the reload is reported: wait for the report too.
        wait_for("the applied reload's report", || {
            h.outcomes.lock().unwrap().contains(&ReloadOutcome::Applied)
        });
    }

    #[test]
    fn atomic_rename_over_the_file() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("policy.yaml");
        fs::write(&path, policy_for(1)).unwrap();
        let h = start(&path, INOTIFY_ONLY);
        let tmp = dir.path().join(".policy.yaml.tmp");
        fs::write(&tmp, policy_for(2)).unwrap();
        fs::rename(&tmp, &path).unwrap();
        h.wait_for_port(2);
        assert!(h.rejections().is_empty(), "{:?}", h.rejections());
    }

    /// Exactly the steps of kubelet's atomic writer for ConfigMap and downward-API volumes.
    #[test]
    fn kubernetes_data_symlink_swap() {
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path();
        fs::create_dir(d.join("..2026_11_22_12_00_00.123")).unwrap();
        fs::write(
            d.join("..2026_11_22_12_00_00.123/policy.yaml"),
            policy_for(1),
        )
        .unwrap();
        symlink("..2026_11_22_12_00_00.123", d.join("..data")).unwrap();
        symlink("..data/policy.yaml", d.join("policy.yaml")).unwrap();
        let h = start(&d.join("policy.yaml"), INOTIFY_ONLY);
        assert_eq!(current_port(&h.store), Some(1));

        fs::create_dir(d.join("..2026_11_22_12_05_00.456")).unwrap();
        fs::write(
            d.join("..2026_11_22_12_05_00.456/policy.yaml"),
            policy_for(2),
        )
        .unwrap();
        symlink("..2026_11_22_12_05_00.456", d.join("..data_tmp")).unwrap();
        fs::rename(d.join("..data_tmp"), d.join("..data")).unwrap();
        fs::remove_dir_all(d.join("..2026_11_22_12_00_00.123")).unwrap();
        h.wait_for_port(2);
        assert!(h.rejections().is_empty(), "{:?}", h.rejections());
    }

    #[test]
    fn an_invalid_update_keeps_the_last_good_policy() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("policy.yaml");
        fs::write(&path, policy_for(1)).unwrap();
        let h = start(&path, INOTIFY_ONLY);
        fs::write(&path, "inbound:\n  - port: 2\n    allow: [\n").unwrap();
        // An in-place write truncates first, so a slow writer may also be seen half done ("empty").
        let syntax_error = |r: &String| r.contains("policy.yaml: line 4 column 1");
        wait_for("a rejection", || h.rejections().iter().any(syntax_error));
        assert_eq!(current_port(&h.store), Some(1));
        fs::write(&path, policy_for(3)).unwrap();
        h.wait_for_port(3);
    }

    /// A symlink to a file in another directory: inotify on the link's directory does not see
    /// writes to the target, the periodic re-read does.
    #[test]
    fn periodic_reread_catches_what_inotify_misses() {
        let (link_dir, target_dir) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
        let target = target_dir.path().join("real.yaml");
        fs::write(&target, policy_for(1)).unwrap();
        let path = link_dir.path().join("policy.yaml");
        symlink(&target, &path).unwrap();
        let h = start(
            &path,
            Timing {
                poll: Duration::from_millis(100),
                ..INOTIFY_ONLY
            },
        );
        fs::write(&target, policy_for(2)).unwrap();
        h.wait_for_port(2);
        // Found by a periodic re-read, so reported although no event came.
        // The store is swapped before the reload is reported: wait for the report too.
        wait_for("the applied reload's report", || {
            h.outcomes.lock().unwrap().contains(&ReloadOutcome::Applied)
        });
    }

    #[test]
    fn dropping_the_watcher_stops_it() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("policy.yaml");
        fs::write(&path, policy_for(1)).unwrap();
        let h = start(
            &path,
            Timing {
                poll: Duration::from_millis(10),
                ..INOTIFY_ONLY
            },
        );
        drop(h.watcher); // joins the thread
        fs::write(&path, policy_for(2)).unwrap();
        thread::sleep(Duration::from_millis(200));
        assert_eq!(current_port(&h.store), Some(1));
    }
}
