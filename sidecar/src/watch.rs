//! The file watcher behind credential files and policy files: a thread that re-reads once a burst of
//! inotify events on the files' parent directories goes quiet (or at most a moment after the first
//! event), and periodically anyway, for what inotify misses (a symlink target in another directory,
//! a replaced parent directory, an exhausted inotify limit).

use std::io;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::{self, Receiver, RecvTimeoutError, Sender};
use std::thread::{self, JoinHandle};
use std::time::{Duration, Instant};

use notify::event::{AccessKind, AccessMode};
use notify::{EventKind, RecommendedWatcher, RecursiveMode, Watcher};

/// How long to wait: for events to go quiet, at most after the first event of a burst, and between
/// periodic re-reads.
#[derive(Debug, Clone, Copy)]
pub struct Timing {
    pub quiet: Duration,
    pub max_delay: Duration,
    pub poll: Duration,
}

impl Timing {
    pub const DEFAULT: Timing = Timing {
        quiet: Duration::from_millis(100),
        max_delay: Duration::from_secs(1),
        poll: Duration::from_secs(2),
    };
}

enum Message {
    /// Something happened in a watched directory.
    Changed,
    /// The watcher is being dropped.
    Stop,
}

/// Watches until dropped; dropping it stops the thread and waits for it.
pub struct DirWatcher {
    stop: Arc<AtomicBool>,
    wake: Sender<Message>,
    thread: Option<JoinHandle<()>>,
    inotify: Option<RecommendedWatcher>,
}

impl DirWatcher {
    /// Watches the parent directories of `files`, then (with `check_first`) calls `check(false)`
    /// once before returning (watch first, then read: a change in between is seen either way), then
    /// calls `check(true)` on thread `name` after each quiet burst of events and `check(false)` at
    /// every poll. `what` names the files in warnings.
    pub fn spawn(
        name: &str,
        what: &'static str,
        files: &[&Path],
        timing: Timing,
        check_first: bool,
        mut check: impl FnMut(bool) + Send + 'static,
    ) -> io::Result<Self> {
        let (wake, events) = mpsc::channel();
        let inotify = watch_directories(what, files, wake.clone());
        if check_first {
            check(false);
        }
        let stop = Arc::new(AtomicBool::new(false));
        let thread_stop = stop.clone();
        let thread = thread::Builder::new()
            .name(name.to_owned())
            .spawn(move || run(&mut check, &events, &thread_stop, timing))?;
        Ok(Self {
            stop,
            wake,
            thread: Some(thread),
            inotify,
        })
    }

    /// Whether inotify watches anything (otherwise only the periodic re-read runs).
    pub fn inotify(&self) -> bool {
        self.inotify.is_some()
    }
}

/// The parent directory of a file (`.` for a bare name).
fn parent(path: &Path) -> PathBuf {
    match path.parent() {
        Some(dir) if !dir.as_os_str().is_empty() => dir.to_owned(),
        _ => PathBuf::from("."),
    }
}

/// Watches each distinct parent directory, or returns `None` (after a warning) and leaves it to
/// polling. A directory that alone cannot be watched is also left to polling.
fn watch_directories(
    what: &'static str,
    files: &[&Path],
    wake: Sender<Message>,
) -> Option<RecommendedWatcher> {
    let handler = move |event: notify::Result<notify::Event>| {
        match event {
            // Opening or reading files (our own re-reads included) changes nothing.
            Ok(event) if is_read_only(&event.kind) => return,
            Ok(_) => {}
            Err(error) => tracing::warn!(%error, what, "watch error, re-reading"),
        }
        // A send fails only once the watch thread has stopped.
        let _ = wake.send(Message::Changed);
    };
    let mut watcher = match notify::recommended_watcher(handler) {
        Ok(watcher) => watcher,
        Err(error) => {
            tracing::warn!(%error, what, "cannot watch, polling only");
            return None;
        }
    };
    let mut seen = Vec::new();
    for file in files {
        let dir = parent(file);
        let key = dir.canonicalize().unwrap_or_else(|_| dir.clone());
        if seen.contains(&key) {
            continue;
        }
        seen.push(key);
        if let Err(error) = watcher.watch(&dir, RecursiveMode::NonRecursive) {
            let dir = dir.display();
            tracing::warn!(%error, %dir, what, "cannot watch a directory, polling it");
        }
    }
    Some(watcher)
}

fn is_read_only(kind: &EventKind) -> bool {
    matches!(kind, EventKind::Access(access) if *access != AccessKind::Close(AccessMode::Write))
}

/// The watch thread: re-read after a burst of events goes quiet, or when the poll interval passes.
fn run(check: &mut dyn FnMut(bool), events: &Receiver<Message>, stop: &AtomicBool, timing: Timing) {
    // (first, last) event of the current burst.
    let mut burst: Option<(Instant, Instant)> = None;
    let mut next_poll = Instant::now() + timing.poll;
    while !stop.load(Ordering::Acquire) {
        let due = match burst {
            Some((first, last)) => (last + timing.quiet).min(first + timing.max_delay),
            None => next_poll,
        };
        let now = Instant::now();
        if now >= due {
            check(burst.take().is_some());
            next_poll = Instant::now() + timing.poll;
            continue;
        }
        match events.recv_timeout(due - now) {
            Ok(Message::Changed) => {
                let now = Instant::now();
                burst = Some((burst.map_or(now, |(first, _)| first), now));
            }
            Ok(Message::Stop) | Err(RecvTimeoutError::Disconnected) => return,
            Err(RecvTimeoutError::Timeout) => {}
        }
    }
}

impl Drop for DirWatcher {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Release);
        // A failed send means the thread is already gone.
        let _ = self.wake.send(Message::Stop);
        // Joining from the watch thread itself (a callback dropping its watcher) would hang.
        if let Some(thread) = self.thread.take()
            && thread.thread().id() != thread::current().id()
        {
            let _ = thread.join();
        }
    }
}

impl std::fmt::Debug for DirWatcher {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DirWatcher")
            .field("inotify", &self.inotify.is_some())
            .finish_non_exhaustive()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parent_directories_and_read_events() {
        let dir = tempfile::tempdir().unwrap_or_else(|e| panic!("tempdir: {e}"));
        assert_eq!(parent(Path::new("tls.crt")), PathBuf::from("."));
        assert_eq!(parent(&dir.path().join("tls.key")), dir.path());
        assert!(is_read_only(&EventKind::Access(AccessKind::Open(
            AccessMode::Any
        ))));
        assert!(is_read_only(&EventKind::Access(AccessKind::Close(
            AccessMode::Read
        ))));
        assert!(!is_read_only(&EventKind::Any));
        assert!(!is_read_only(&EventKind::Access(AccessKind::Close(
            AccessMode::Write
        ))));
    }
}
