//! Re-reading the injector's mounted files (serving pair, trust bundle) when they change. Kubernetes
//! updates Secret and ConfigMap volumes in place by swapping a `..data` symlink, so a poll that
//! compares contents (following symlinks) sees every update; a change is applied only if it parses,
//! otherwise the last good value keeps serving and the error is logged once.

use std::path::PathBuf;
use std::time::Duration;

/// Polls `paths` every `interval`; whenever their contents differ from the last contents seen,
/// calls `apply` with them (in the order of `paths`). `initial` is what was loaded at start.
/// Runs until the task is dropped.
pub async fn watch_files<F>(
    what: &'static str,
    paths: Vec<PathBuf>,
    initial: Vec<Vec<u8>>,
    interval: Duration,
    mut apply: F,
) where
    F: FnMut(&[Vec<u8>]) -> Result<String, String> + Send,
{
    let mut seen = initial;
    let mut last_error: Option<String> = None;
    loop {
        tokio::time::sleep(interval).await;
        let mut contents = Vec::with_capacity(paths.len());
        let mut read_error = None;
        for p in &paths {
            match tokio::fs::read(p).await {
                Ok(c) => contents.push(c),
                Err(e) => {
                    read_error = Some(format!("{}: {e}", p.display()));
                    break;
                }
            }
        }
        if let Some(error) = read_error {
            if last_error.as_ref() != Some(&error) {
                tracing::warn!(%error, what, "cannot re-read; keeping the current one");
                last_error = Some(error);
            }
            continue;
        }
        if contents == seen {
            continue;
        }
        match apply(&contents) {
            Ok(summary) => {
                tracing::info!(what, %summary, "reloaded");
                last_error = None;
            }
            Err(error) => {
                tracing::warn!(%error, what, "rejected the changed files; keeping the current one");
                last_error = Some(error);
            }
        }
        seen = contents;
    }
}
