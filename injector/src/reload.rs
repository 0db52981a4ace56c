//! Re-reading the injector's mounted files (serving pair, trust bundle) when they change. Kubernetes
//! updates Secret and ConfigMap volumes in place by swapping a `..data` symlink, so a poll that
//! compares contents (following symlinks) sees every update. The files of one poll are read from
//! one version of their volume (`..data` resolved once: [`meshid_runtime::volume`]), never a
//! certificate of one version with the key of the next, and only as regular files of at most
//! [`MAX_FILE_BYTES`] (a FIFO or a device in a file's place is refused, never waited on). A change
//! is applied only if it passes, otherwise the last good value keeps serving and the refusal is
//! logged once. A refusal that time may lift ([`Refused::NotYet`]: a certificate not valid yet,
//! from a rotator whose clock runs ahead of this node's) is tried again at every poll, and the
//! files are applied as soon as they pass.

use std::path::PathBuf;
use std::time::Duration;

/// The most bytes read of one watched file (a certificate chain, a key, a trust bundle): far above
/// any real one, so that a file that never ends is refused rather than read.
pub const MAX_FILE_BYTES: u64 = 1 << 20;

/// Why changed files were not applied.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum Refused {
    /// The files are wrong as they are: tried again only once they change.
    Invalid(String),
    /// The same files may pass at a later moment (a certificate not valid yet): tried again at
    /// every poll.
    NotYet(String),
}

impl Refused {
    fn reason(&self) -> &str {
        match self {
            Self::Invalid(reason) | Self::NotYet(reason) => reason,
        }
    }
}

/// Polls `paths` every `interval`; whenever their contents differ from the last contents seen,
/// calls `apply` with them (in the order of `paths`), and again at every poll while it answers
/// [`Refused::NotYet`] for them. `counted` hears once per set of contents whether it was applied
/// (`true`) or refused (`false`; a set that is tried again is not counted again until it is
/// applied). `initial` is what was loaded at start. Runs until the task is dropped.
pub async fn watch_files<F, C>(
    what: &'static str,
    paths: Vec<PathBuf>,
    initial: Vec<Vec<u8>>,
    interval: Duration,
    mut apply: F,
    mut counted: C,
) where
    F: FnMut(&[Vec<u8>]) -> Result<String, Refused> + Send,
    C: FnMut(bool) + Send,
{
    let mut seen = initial;
    // `seen` was refused only for now: it is tried again at every poll.
    let mut again = false;
    let mut last_error: Option<String> = None;
    loop {
        tokio::time::sleep(interval).await;
        let read = {
            let paths = paths.clone();
            tokio::task::spawn_blocking(move || {
                let paths: Vec<&std::path::Path> = paths.iter().map(PathBuf::as_path).collect();
                meshid_runtime::volume::read_one_version(&paths, MAX_FILE_BYTES)
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
        let changed = contents != seen;
        if !changed && !again {
            continue;
        }
        match apply(&contents) {
            Ok(summary) => {
                counted(true);
                tracing::info!(what, %summary, "reloaded");
                last_error = None;
                again = false;
            }
            Err(refused) => {
                if changed {
                    counted(false);
                }
                let error = refused.reason();
                if changed || last_error.as_deref() != Some(error) {
                    match &refused {
                        Refused::NotYet(_) => tracing::warn!(
                            %error,
                            what,
                            "the changed files are not valid yet; keeping the current one and \
                             trying them again at every poll"
                        ),
                        Refused::Invalid(_) => tracing::warn!(
                            %error,
                            what,
                            "rejected the changed files; keeping the current one"
                        ),
                    }
                }
                last_error = Some(error.to_owned());
                again = matches!(refused, Refused::NotYet(_));
            }
        }
        seen = contents;
    }
}

#[cfg(test)]
mod tests {
    use std::io::Write;
    use std::path::Path;
    use std::sync::{Arc, Mutex};
    use std::time::Instant;

    use super::*;

    /// Log lines written while a test runs.
    #[derive(Clone, Default)]
    struct Captured(Arc<Mutex<Vec<u8>>>);

    impl Write for Captured {
        fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
            self.0.lock().unwrap().extend_from_slice(buf);
            Ok(buf.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    impl Captured {
        fn lines(&self, containing: &str) -> usize {
            String::from_utf8_lossy(&self.0.lock().unwrap())
                .lines()
                .filter(|l| l.contains(containing))
                .count()
        }
    }

    /// Runs `test` on a runtime of this thread with its logs captured; a test whose watch task is
    /// stuck in a read ends anyway (the blocking read is abandoned).
    fn with_logs(test: impl AsyncFnOnce(Captured)) {
        let logs = Captured::default();
        let writer = logs.clone();
        let subscriber = meshid_runtime::process::subscriber(
            meshid_runtime::process::LogFormat::Text,
            false,
            move || writer.clone(),
        );
        let _logging = tracing::subscriber::set_default(subscriber);
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_time()
            .build()
            .unwrap();
        let ran = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            runtime.block_on(test(logs));
        }));
        runtime.shutdown_timeout(Duration::from_millis(100));
        if let Err(panic) = ran {
            std::panic::resume_unwind(panic);
        }
    }

    async fn wait_for(what: &str, done: impl Fn() -> bool) {
        let deadline = Instant::now() + Duration::from_secs(5);
        while !done() {
            assert!(Instant::now() < deadline, "timed out waiting for {what}");
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }

    const POLL: Duration = Duration::from_millis(10);

    /// What `apply` was handed, and what was counted.
    #[derive(Clone, Default)]
    struct Record {
        applied: Arc<Mutex<Vec<Vec<u8>>>>,
        counted: Arc<Mutex<Vec<bool>>>,
    }

    impl Record {
        fn calls(&self) -> usize {
            self.applied.lock().unwrap().len()
        }
        fn counted(&self) -> Vec<bool> {
            self.counted.lock().unwrap().clone()
        }
    }

    /// Watches `path` (initially holding `initial`); `answer` decides each call to `apply`.
    fn watch(
        path: &Path,
        initial: &[u8],
        record: &Record,
        mut answer: impl FnMut(&[u8], usize) -> Result<String, Refused> + Send + 'static,
    ) -> tokio::task::JoinHandle<()> {
        let (applied, counted) = (record.applied.clone(), record.counted.clone());
        tokio::spawn(watch_files(
            "test file",
            vec![path.to_owned()],
            vec![initial.to_vec()],
            POLL,
            move |files| {
                let mut applied = applied.lock().unwrap();
                applied.push(files[0].clone());
                answer(&files[0], applied.len())
            },
            move |ok| counted.lock().unwrap().push(ok),
        ))
    }

    #[test]
    fn files_not_valid_yet_are_tried_again_until_they_pass_and_logged_once() {
        with_logs(async |logs| {
            let dir = tempfile::tempdir().unwrap();
            let path = dir.path().join("tls.crt");
            std::fs::write(&path, "v1").unwrap();
            let record = Record::default();
            // "v2" is not valid for its first three tries; "v3" is broken.
            let task = watch(&path, b"v1", &record, |bytes, call| match bytes {
                b"v2" if call <= 3 => Err(Refused::NotYet("not valid before 12:00".into())),
                b"v3" => Err(Refused::Invalid("not PEM".into())),
                _ => Ok("fine".into()),
            });
            std::fs::write(&path, "v2").unwrap();
            wait_for("v2 applied", || record.counted().contains(&true)).await;
            assert_eq!(record.calls(), 4, "three refusals, then applied");
            assert_eq!(record.counted(), [false, true], "counted once each way");
            assert_eq!(logs.lines("not valid yet"), 1, "logged once");
            assert_eq!(logs.lines("reloaded"), 1);

            // Applied: not tried again. A broken change is tried once, not at every poll.
            tokio::time::sleep(POLL * 10).await;
            assert_eq!(record.calls(), 4);
            std::fs::write(&path, "v3").unwrap();
            wait_for("v3 refused", || record.calls() == 5).await;
            tokio::time::sleep(POLL * 10).await;
            assert_eq!(record.calls(), 5);
            assert_eq!(record.counted(), [false, true, false]);
            assert_eq!(logs.lines("rejected the changed files"), 1);
            task.abort();
        });
    }

    #[test]
    fn a_fifo_in_place_of_a_file_is_refused_and_the_watch_goes_on() {
        with_logs(async |logs| {
            let dir = tempfile::tempdir().unwrap();
            let path = dir.path().join("tls.key");
            std::fs::write(&path, "v1").unwrap();
            let record = Record::default();
            let task = watch(&path, b"v1", &record, |_, _| Ok("fine".into()));
            std::fs::remove_file(&path).unwrap();
            let made = std::process::Command::new("mkfifo").arg(&path).status();
            assert!(made.is_ok_and(|s| s.success()), "mkfifo");
            wait_for("the FIFO reported", || logs.lines("cannot re-read") > 0).await;
            assert_eq!(logs.lines("tls.key: not a regular file"), 1);
            tokio::time::sleep(POLL * 10).await;
            assert_eq!(logs.lines("cannot re-read"), 1, "logged once");
            assert_eq!(record.calls(), 0, "the current one stays");

            // A regular file again: the watch went on.
            std::fs::remove_file(&path).unwrap();
            std::fs::write(&path, "v2").unwrap();
            wait_for("v2 applied", || record.calls() == 1).await;
            assert_eq!(record.applied.lock().unwrap()[0], b"v2");
            task.abort();
        });
    }
}
