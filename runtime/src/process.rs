//! What every meshid binary does around its work: logs on stderr, filtered by `MESHID_LOG`
//! (`tracing` directives, default `info`) as text or JSON, errors printed with their causes once,
//! and a stop on SIGTERM or SIGINT.

use std::io::IsTerminal;

/// How log lines are written.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, clap::ValueEnum)]
pub enum LogFormat {
    /// One human-readable line per event; coloured only on a terminal, and never with `NO_COLOR`.
    #[default]
    Text,
    /// One JSON object per line: `timestamp`, `level`, `target`, `message` and every other field
    /// of the event at the top level.
    Json,
}

impl LogFormat {
    /// The flag value that selects this format (`text`, `json`).
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Text => "text",
            Self::Json => "json",
        }
    }
}

/// Installs the global log subscriber: stderr, `MESHID_LOG` filter, text or JSON.
pub fn init_tracing(format: LogFormat) {
    let color = use_color(
        std::io::stderr().is_terminal(),
        std::env::var_os("NO_COLOR").as_deref(),
    );
    // Also routes `log` records (rustls) here. Fails only when a subscriber is already installed;
    // the first one stays.
    let _ = tracing_subscriber::util::SubscriberInitExt::try_init(subscriber(
        format,
        color,
        std::io::stderr,
    ));
}

/// Whether text logs are coloured: only on a terminal, and not when `NO_COLOR` is set to anything
/// but the empty string (<https://no-color.org>).
pub fn use_color(terminal: bool, no_color: Option<&std::ffi::OsStr>) -> bool {
    terminal && no_color.is_none_or(std::ffi::OsStr::is_empty)
}

/// The log subscriber every binary installs, writing to `writer`.
pub fn subscriber<W>(
    format: LogFormat,
    color: bool,
    writer: W,
) -> Box<dyn tracing::Subscriber + Send + Sync>
where
    W: for<'w> tracing_subscriber::fmt::MakeWriter<'w> + Send + Sync + 'static,
{
    let filter = log_filter(std::env::var("MESHID_LOG").ok().as_deref());
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(writer);
    match format {
        LogFormat::Json => Box::new(builder.json().flatten_event(true).finish()),
        LogFormat::Text => Box::new(builder.with_ansi(color).finish()),
    }
}

/// The log filter for a `MESHID_LOG` value (`info` when unset or unreadable). rustls's own lines
/// are left out at every level below `error` unless the value names `rustls`: rustls warns about
/// what a peer sent during a handshake (an illegal SNI, quoted whole; up to four warning alerts per
/// connection) before meshid sees the connection, so anyone reaching a TLS port could write log
/// lines at will past meshid's own limits ([`crate::log_limit`]). meshid logs and counts refused
/// handshakes itself.
pub fn log_filter(spec: Option<&str>) -> tracing_subscriber::EnvFilter {
    use tracing_subscriber::EnvFilter;
    let parsed = spec.and_then(|s| EnvFilter::try_new(s).ok().map(|f| (s, f)));
    // Only a value that parsed can ask for rustls's lines: one that did not falls back to `info`,
    // without them.
    let filter = match parsed {
        Some((s, filter)) if s.contains("rustls") => return filter,
        Some((_, filter)) => filter,
        None => EnvFilter::new("info"),
    };
    match "rustls=error".parse() {
        Ok(quiet) => filter.add_directive(quiet),
        Err(_) => filter,
    }
}

/// An error and its causes on one line, `outer: inner: innermost`, each text once: a cause whose
/// text its wrapper already shows (an error that prints its source and also returns it from
/// `source()`) is not repeated.
pub fn error_chain(error: &(dyn std::error::Error + 'static)) -> String {
    let mut out = error.to_string();
    let mut cause = error.source();
    while let Some(e) = cause {
        let text = e.to_string();
        if !text.is_empty() && !out.contains(&text) {
            out.push_str(": ");
            out.push_str(&text);
        }
        cause = e.source();
    }
    out
}

/// Resolves at the first SIGTERM or SIGINT; an error when the handlers cannot be installed. A
/// second one, while the process drains, ends it at once (exit status 1): an operator's second
/// Ctrl-C, or a second `kill`, is not ignored (the handlers replace the default action for good).
pub async fn wait_for_signal() -> std::io::Result<()> {
    let (mut term, mut int) = wait_for_first_signal().await?;
    tokio::spawn(async move {
        tokio::select! {
            _ = term.recv() => {}
            _ = int.recv() => {}
        }
        tracing::warn!("second signal: exiting now, without waiting for the drain to end");
        std::process::exit(1);
    });
    Ok(())
}

/// Resolves at the first SIGTERM or SIGINT, and leaves later ones to the caller (the handlers it
/// returns; dropped, later signals are ignored): for a process whose own cleanup must run
/// whatever comes (the local-mesh demo stopping its children and removing its directory).
pub async fn wait_for_first_signal()
-> std::io::Result<(tokio::signal::unix::Signal, tokio::signal::unix::Signal)> {
    use tokio::signal::unix::{SignalKind, signal};
    let mut term = signal(SignalKind::terminate())?;
    let mut int = signal(SignalKind::interrupt())?;
    tokio::select! {
        _ = term.recv() => {}
        _ = int.recv() => {}
    }
    Ok((term, int))
}

/// This process's limit on open files, after [`raise_open_files_limit`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct OpenFiles {
    /// The soft limit the process started with (`None`: unlimited).
    pub before: Option<u64>,
    /// The soft limit now.
    pub now: Option<u64>,
}

/// Raises this process's soft limit on open files (`RLIMIT_NOFILE`) to its hard limit, as Go's
/// runtime does at start. Every connection is a file: under a soft limit of 1,024 (systemd's
/// default for services) a busy sidecar would fail to accept, to dial its upstreams and to reach
/// its CA for renewals long before its own connection caps; meshid never uses `select(2)`, the
/// reason the soft limit is kept low by default. Needs no privilege. On failure the limit stays
/// as it was.
pub fn raise_open_files_limit() -> std::io::Result<OpenFiles> {
    use rustix::process::{Resource, getrlimit, setrlimit};
    let limit = getrlimit(Resource::Nofile);
    let before = limit.current;
    if limit.current != limit.maximum {
        let raised = rustix::process::Rlimit {
            current: limit.maximum,
            maximum: limit.maximum,
        };
        setrlimit(Resource::Nofile, raised)?;
    }
    Ok(OpenFiles {
        before,
        now: getrlimit(Resource::Nofile).current,
    })
}

/// [`raise_open_files_limit`], logged: the limit raised (info), or why it could not be (warning).
/// Returns the soft limit in force (`None`: unlimited).
pub fn raise_open_files_limit_logged() -> Option<u64> {
    match raise_open_files_limit() {
        Ok(OpenFiles { before, now }) => {
            if before != now {
                let shown =
                    |n: Option<u64>| n.map_or_else(|| "unlimited".into(), |n| n.to_string());
                tracing::info!(
                    before = %shown(before),
                    now = %shown(now),
                    "raised the open files limit (RLIMIT_NOFILE) to its hard limit"
                );
            }
            now
        }
        Err(error) => {
            let now = rustix::process::getrlimit(rustix::process::Resource::Nofile).current;
            tracing::warn!(%error, ?now, "could not raise the open files limit (RLIMIT_NOFILE)");
            now
        }
    }
}

/// Keeps the keys this process holds out of reach of other processes of its user and off the
/// disk: no core dumps (`RLIMIT_CORE` 0), and not dumpable (`PR_SET_DUMPABLE` 0: another process
/// of the same user can no longer read its memory through `/proc/<pid>/mem` or ptrace, as an app
/// container under the same UID could in a pod that shares its process namespace). Its
/// `/proc/self` then belongs to root: ask [`effective_uid`] who this process runs as.
pub fn protect_memory() -> std::io::Result<()> {
    use rustix::process::{DumpableBehavior, Resource, Rlimit, setrlimit};
    setrlimit(
        Resource::Core,
        Rlimit {
            current: Some(0),
            maximum: Some(0),
        },
    )?;
    rustix::process::set_dumpable_behavior(DumpableBehavior::NotDumpable)?;
    Ok(())
}

/// [`protect_memory`], logged when it cannot be done (a seccomp profile refusing `prctl`).
pub fn protect_memory_logged() {
    if let Err(error) = protect_memory() {
        tracing::warn!(%error, "could not turn core dumps off and keep other processes out of this one's memory");
    }
}

/// Whether users other than the file's owner and group may read `path` (its mode's "other" bits;
/// a symlink is followed, as a Kubernetes Secret volume's files are reached). Group bits are
/// allowed: a Secret volume mounts its files 0440 for the pod's `fsGroup`. `false` when the file
/// cannot be looked at.
pub fn others_can_read(path: &std::path::Path) -> bool {
    use std::os::unix::fs::PermissionsExt;
    std::fs::metadata(path).is_ok_and(|m| m.permissions().mode() & 0o004 != 0)
}

/// Warns, once per file, about each key file of `paths` that others may read
/// ([`others_can_read`]): the process takes it all the same.
pub fn warn_about_readable_keys<'a>(paths: impl IntoIterator<Item = &'a std::path::Path>) {
    for path in paths {
        if others_can_read(path) {
            tracing::warn!(
                path = %path.display(),
                "this private key file can be read by every user of the host: chmod 600 it \
                 (or 640 for a group)"
            );
        }
    }
}

/// A new directory of this process's user alone (0700) under the temporary directory, named
/// `<prefix><pid>-<random>`: the demo and the benchmarks keep CA keys and join tokens there, and
/// another local user must neither read them nor have prepared the path (a directory or
/// symlinks of theirs) before they are written. A path that exists already is refused, never
/// reused.
pub fn private_temp_dir(prefix: &str) -> std::io::Result<std::path::PathBuf> {
    new_temp_dir(prefix, 0o700)
}

/// [`private_temp_dir`] with the directory's `mode`: 0755 where processes run under another
/// user must reach files in it (the chaos run's unprivileged sidecars and CAs). Still new, and
/// never one someone prepared.
pub fn new_temp_dir(prefix: &str, mode: u32) -> std::io::Result<std::path::PathBuf> {
    use std::hash::{BuildHasher, Hasher};
    use std::os::unix::fs::DirBuilderExt;
    // RandomState is seeded from the OS's randomness.
    let random = std::collections::hash_map::RandomState::new()
        .build_hasher()
        .finish();
    let dir = std::env::temp_dir().join(format!("{prefix}{}-{random:016x}", std::process::id()));
    std::fs::DirBuilder::new().mode(mode).create(&dir)?;
    Ok(dir)
}

/// The user this process runs as (its effective UID).
pub fn effective_uid() -> u32 {
    rustix::process::geteuid().as_raw()
}

/// Exit code for a bad configuration (EX_USAGE): every binary names every bad setting, then exits
/// with it.
pub const EXIT_USAGE: u8 = 64;

#[cfg(test)]
mod tests {
    use super::*;

    /// A private temporary directory is new, 0700, and never one that existed before.
    #[test]
    fn a_private_temp_dir_is_new_and_ours_alone() {
        use std::os::unix::fs::PermissionsExt;
        let a = private_temp_dir("meshid-test-").unwrap();
        let b = private_temp_dir("meshid-test-").unwrap();
        assert_ne!(a, b);
        let mode = std::fs::metadata(&a).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o700);
        assert!(
            a.file_name()
                .unwrap()
                .to_string_lossy()
                .starts_with(&format!("meshid-test-{}-", std::process::id()))
        );
        for d in [a, b] {
            std::fs::remove_dir(d).unwrap();
        }
    }

    /// A key file others may read is told apart from one only its owner and group may.
    #[test]
    fn a_key_file_others_can_read_is_noticed() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        let key = dir.path().join("k.key");
        std::fs::write(&key, "x").unwrap();
        for (mode, others) in [
            (0o600, false),
            (0o640, false),
            (0o440, false),
            (0o644, true),
            (0o604, true),
        ] {
            std::fs::set_permissions(&key, std::fs::Permissions::from_mode(mode)).unwrap();
            assert_eq!(others_can_read(&key), others, "{mode:o}");
        }
        assert!(!others_can_read(&dir.path().join("missing")));
    }

    /// No core dumps, not dumpable; `effective_uid` still tells who this process is.
    #[test]
    fn memory_is_kept_from_dumps_and_from_the_users_other_processes() {
        use rustix::process::{DumpableBehavior, Resource, getrlimit};
        protect_memory().unwrap();
        let core = getrlimit(Resource::Core);
        assert_eq!((core.current, core.maximum), (Some(0), Some(0)));
        assert_eq!(
            rustix::process::dumpable_behavior().unwrap(),
            DumpableBehavior::NotDumpable
        );
        assert_eq!(effective_uid(), rustix::process::getuid().as_raw());
    }

    /// Started under a low soft limit (as under systemd), the process may open as many files as
    /// its hard limit allows. (nextest runs each test in a process of its own.)
    #[test]
    fn the_open_files_limit_is_raised_to_the_hard_one() {
        use rustix::process::{Resource, Rlimit, getrlimit, setrlimit};
        let hard = getrlimit(Resource::Nofile).maximum;
        let low = hard.map_or(256, |h| h.min(256));
        setrlimit(
            Resource::Nofile,
            Rlimit {
                current: Some(low),
                maximum: hard,
            },
        )
        .unwrap();
        let raised = raise_open_files_limit().unwrap();
        assert_eq!(raised.before, Some(low));
        assert_eq!(raised.now, hard);
        assert_eq!(getrlimit(Resource::Nofile).current, hard);
        // Again: nothing to raise, nothing changes.
        let again = raise_open_files_limit().unwrap();
        assert_eq!((again.before, again.now), (hard, hard));
    }
    use std::sync::{Arc, Mutex};

    #[derive(Clone, Default)]
    struct Captured(Arc<Mutex<Vec<u8>>>);

    impl std::io::Write for Captured {
        fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
            self.0.lock().unwrap().extend_from_slice(buf);
            Ok(buf.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    fn logged(format: LogFormat, color: bool) -> String {
        let out = Captured::default();
        let writer = out.clone();
        let sub = subscriber(format, color, move || writer.clone());
        tracing::subscriber::with_default(sub, || {
            tracing::info!(peer = "spiffe://td/a", port = 8080u16, "denied");
        });
        String::from_utf8(out.0.lock().unwrap().clone()).unwrap()
    }

    #[test]
    fn json_lines_carry_the_message_and_fields_at_the_top_level() {
        let line = logged(LogFormat::Json, false);
        let v: serde_json::Value = serde_json::from_str(line.trim()).unwrap();
        assert_eq!(v["message"], "denied", "{line}");
        assert_eq!(v["peer"], "spiffe://td/a", "{line}");
        assert_eq!(v["port"], 8080, "{line}");
        assert_eq!(v["level"], "INFO", "{line}");
        assert!(
            v["timestamp"].is_string() && v["target"].is_string(),
            "{line}"
        );
        assert!(v.get("fields").is_none(), "{line}");
    }

    /// The JSON format writes an event's own fields first and then its `timestamp`, `level`,
    /// `message` and `target` keys: an event field of one of those names made a line with two
    /// such keys (Elasticsearch refuses it, `jq` keeps the last), as the inbound's "app
    /// unreachable" lines did with `target` for the app's address. No crate of the workspace
    /// names a field so.
    #[test]
    fn no_log_field_is_named_like_a_key_of_the_json_format() {
        fn sources(dir: &std::path::Path, out: &mut Vec<std::path::PathBuf>) {
            for entry in std::fs::read_dir(dir).into_iter().flatten().flatten() {
                let path = entry.path();
                if path.is_dir() {
                    sources(&path, out);
                } else if path.extension().is_some_and(|e| e == "rs") {
                    out.push(path);
                }
            }
        }
        let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
        let mut files = Vec::new();
        for krate in ["runtime", "identity", "sidecar", "ca-service", "injector"] {
            sources(&root.join(krate).join("src"), &mut files);
        }
        assert!(files.len() > 20, "found the workspace's sources");
        let reserved = [
            "target",
            "timestamp",
            "level",
            "message",
            "fields",
            "span",
            "spans",
        ];
        let mut found = Vec::new();
        for file in &files {
            let text = std::fs::read_to_string(file).unwrap();
            for (n, line) in text.lines().enumerate() {
                if !(line.contains("tracing::") || line.contains("_span!")) {
                    continue;
                }
                for name in reserved {
                    // `name = %x`, `name = ?x`, `name = x`, and the shorthands `%name`, `?name`.
                    let named = [
                        format!("({name} ="),
                        format!(", {name} ="),
                        format!("(%{name},"),
                        format!(", %{name},"),
                        format!(", %{name})"),
                        format!("(?{name},"),
                        format!(", ?{name},"),
                        format!(", ?{name})"),
                    ];
                    if named.iter().any(|p| line.contains(p.as_str())) {
                        found.push(format!("{}:{}: {}", file.display(), n + 1, line.trim()));
                    }
                }
            }
        }
        assert!(
            found.is_empty(),
            "log fields named like JSON keys:\n{}",
            found.join("\n")
        );
    }

    #[test]
    fn text_lines_are_coloured_only_when_asked() {
        assert!(!logged(LogFormat::Text, false).contains('\x1b'));
        assert!(logged(LogFormat::Text, true).contains('\x1b'));
        let set = |v: &str| Some(std::ffi::OsString::from(v));
        for (terminal, no_color, want) in [
            (false, None, false),
            (true, None, true),
            (true, set("1"), false),
            (true, set(""), true),
            (false, set("1"), false),
        ] {
            assert_eq!(
                use_color(terminal, no_color.as_deref()),
                want,
                "terminal={terminal} NO_COLOR={no_color:?}"
            );
        }
    }

    /// What a warning from `target` writes under the filter for `MESHID_LOG=spec`.
    fn filtered(spec: Option<&str>, target: &str) -> bool {
        let out = Captured::default();
        let writer = out.clone();
        let sub = tracing_subscriber::fmt()
            .with_env_filter(log_filter(spec))
            .with_writer(move || writer.clone())
            .finish();
        tracing::subscriber::with_default(sub, || match target {
            "rustls" => {
                tracing::warn!(target: "rustls::common_state", "TLS alert warning received")
            }
            _ => tracing::warn!(target: "meshid_sidecar::tls", "handshake failed"),
        });
        !out.0.lock().unwrap().is_empty()
    }

    #[test]
    fn rustls_warnings_are_left_out_unless_asked_for() {
        for spec in [None, Some("info"), Some("debug"), Some("warn")] {
            assert!(!filtered(spec, "rustls"), "MESHID_LOG={spec:?}");
            assert!(filtered(spec, "meshid"), "MESHID_LOG={spec:?}");
        }
        assert!(filtered(Some("info,rustls=warn"), "rustls"));
        // A value that does not parse falls back to `info`, rustls left out, even if it names it.
        for spec in ["info,rustls=verbose", "rustls=loud", "[rustls"] {
            assert!(!filtered(Some(spec), "rustls"), "MESHID_LOG={spec}");
            assert!(filtered(Some(spec), "meshid"), "MESHID_LOG={spec}");
        }
        assert!(!filtered(Some("error"), "meshid"));
    }

    #[derive(Debug)]
    struct Wrapper(std::io::Error, bool);

    impl std::fmt::Display for Wrapper {
        fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
            if self.1 {
                write!(f, "binding 0.0.0.0:8443: {}", self.0)
            } else {
                write!(f, "binding 0.0.0.0:8443")
            }
        }
    }

    impl std::error::Error for Wrapper {
        fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
            Some(&self.0)
        }
    }

    #[test]
    fn a_cause_is_printed_once() {
        let io = || std::io::Error::new(std::io::ErrorKind::AddrInUse, "Address already in use");
        let want = "binding 0.0.0.0:8443: Address already in use";
        // Whether the wrapper shows its source or leaves it to the chain, the text is the same.
        assert_eq!(error_chain(&Wrapper(io(), true)), want);
        assert_eq!(error_chain(&Wrapper(io(), false)), want);
    }
}
