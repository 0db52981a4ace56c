//! Re-reading the injector's mounted files (serving pair, trust bundle) when they change. Kubernetes
//! updates Secret and ConfigMap volumes in place by swapping a `..data` symlink, so a poll that
//! compares contents (following symlinks) sees every update. The files of one poll are read from
//! one version of their volume (`..data` resolved once: [`meshid_runtime::volume`]), never a
//! certificate of one version with the key of the next. A change is applied only if it parses,
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
        let read = {
            let paths = paths.clone();
            tokio::task::spawn_blocking(move || {
                let paths: Vec<&std::path::Path> = paths.iter().map(PathBuf::as_path).collect();
                meshid_runtime::volume::read_one_version(&paths)
                    .into_iter()
                    .collect::<Result<Vec<_>, _>>()
            })
            .await
        };
        let contents = match read.unwrap_or_else(|join| Err(format!("reading failed: {join}"))) {
            Ok(contents) => contents,
            Err(error) => {
                if last_error.as_ref() != Some(&error) {
                    tracing::warn!(%error, what, "cannot re-read; keeping the current one");
                    last_error = Some(error);
                }
                continue;
            }
        };
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
