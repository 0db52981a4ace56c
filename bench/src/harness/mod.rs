//! `bench-run`: starts each contender, drives `meshload` against it, reads CPU and memory from
//! `/proc`, and writes `bench/results/latest.json` and `docs/benchmarks.md`.
//!
//! CPU 0 runs the load generator (and this orchestrator, idle while measuring); CPU 1 runs the app
//! and every proxy, so a pair's throughput is what one core pushes through app + outbound + inbound.

pub mod ca;
pub mod drive;
pub mod machine;
pub mod markdown;
pub mod pki;
pub mod profile;
pub mod report;
pub mod scenarios;
pub mod svg;
pub mod topology;

use std::cell::RefCell;
use std::fmt::Write as _;
use std::net::{SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};

/// The core the load generator runs on.
pub const LOAD_CPU: usize = 0;
/// The core the app and every proxy run on.
pub const SERVER_CPU: usize = 1;

/// Settings for one harness run.
#[derive(Debug, Clone)]
pub struct Settings {
    pub bin_dir: PathBuf,
    pub work: PathBuf,
    pub smoke: bool,
    /// Runs per figure (the median is reported, with min and max).
    pub runs: usize,
    /// Threads (tokio workers, nginx worker processes, haproxy threads) per proxy.
    pub workers: usize,
    /// Length of each measured window and its warm-up.
    pub duration: Duration,
    pub warmup: Duration,
    /// Connections for the closed-loop throughput runs.
    pub connections: usize,
    /// Open-loop rate for the latency runs.
    pub rate: f64,
    /// Idle connections held for the memory runs.
    pub idle_connections: usize,
    /// Certificates per CA benchmark run.
    pub ca_count: usize,
    pub ca_concurrency: Vec<usize>,
    pub scenarios: Vec<String>,
}

/// The harness's state: settings and every command it ran.
pub struct Ctx {
    pub settings: Settings,
    pub commands: RefCell<Vec<String>>,
    /// The first rendering of every config file (later ones differ only in ports and paths).
    pub configs: RefCell<std::collections::BTreeMap<String, String>>,
    counter: RefCell<usize>,
}

impl Ctx {
    pub fn new(settings: Settings) -> Self {
        Self {
            settings,
            commands: RefCell::new(Vec::new()),
            configs: RefCell::default(),
            counter: RefCell::new(0),
        }
    }

    pub fn bin(&self, name: &str) -> PathBuf {
        self.settings.bin_dir.join(name)
    }

    /// A fresh directory under the work directory.
    pub fn dir(&self, name: &str) -> Result<PathBuf> {
        let n = {
            let mut c = self.counter.borrow_mut();
            *c += 1;
            *c
        };
        let d = self.settings.work.join(format!("{n:04}-{name}"));
        std::fs::create_dir_all(&d)?;
        Ok(d)
    }

    /// Records `cmd` (with the environment it sets) as it will run.
    pub fn record(&self, cmd: &Command) {
        let mut line = String::new();
        for (k, v) in cmd.get_envs() {
            if let Some(v) = v {
                let _ = write!(
                    line,
                    "{}={} ",
                    k.to_string_lossy(),
                    quote(&v.to_string_lossy())
                );
            }
        }
        line.push_str(&quote(&cmd.get_program().to_string_lossy()));
        for a in cmd.get_args() {
            line.push(' ');
            line.push_str(&quote(&a.to_string_lossy()));
        }
        self.commands.borrow_mut().push(line);
    }

    /// Spawns `cmd` (recorded), stdout and stderr into `log`; killed with its children on drop.
    pub fn spawn(&self, name: &str, cmd: &mut Command, log: &Path) -> Result<Guard> {
        self.record(cmd);
        let out = std::fs::File::create(log)?;
        let child = cmd
            .stdin(Stdio::null())
            .stdout(out.try_clone()?)
            .stderr(out)
            .spawn()
            .with_context(|| format!("starting {name}"))?;
        Ok(Guard::new(name, child, log))
    }

    /// Runs `cmd` (recorded) to completion and returns its stdout.
    pub fn output(&self, cmd: &mut Command) -> Result<String> {
        self.record(cmd);
        let out = cmd.stdin(Stdio::null()).output()?;
        if !out.status.success() {
            bail!(
                "{:?} failed: {}",
                cmd.get_program(),
                String::from_utf8_lossy(&out.stderr).trim()
            );
        }
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    }
}

/// `program` pinned to `cpu` with taskset.
pub fn pinned(cpu: usize, program: impl AsRef<std::ffi::OsStr>) -> Command {
    let mut c = Command::new("taskset");
    c.args(["-c", &cpu.to_string()]).arg(program);
    c
}

fn quote(s: &str) -> String {
    if !s.is_empty()
        && s.chars()
            .all(|c| c.is_ascii_alphanumeric() || "-_./:=,@+%".contains(c))
    {
        s.to_owned()
    } else {
        format!("'{}'", s.replace('\'', r"'\''"))
    }
}

/// A child process; on drop it and its descendants are killed and reaped.
pub struct Guard {
    pub name: String,
    child: Option<Child>,
    pub log: PathBuf,
}

/// Pids of every process the harness started and has not stopped yet.
static LIVE: std::sync::Mutex<Vec<u32>> = std::sync::Mutex::new(Vec::new());

/// Directories to delete if the run is interrupted.
static TEMP_DIRS: std::sync::Mutex<Vec<PathBuf>> = std::sync::Mutex::new(Vec::new());

/// Deletes `dir` if the run is interrupted by a signal (a finished run cleans up by itself).
pub fn remove_on_signal(dir: &Path) {
    if let Ok(mut d) = TEMP_DIRS.lock() {
        d.push(dir.to_path_buf());
    }
}

/// Kills `pid` and its descendants, parents first: an nginx master that outlived its worker would
/// start another one, left behind once the master is gone.
fn kill_tree(pid: u32) {
    for p in crate::procfs::tree(pid) {
        let _ = Command::new("kill")
            .args(["-KILL", &p.to_string()])
            .stderr(Stdio::null())
            .status();
    }
}

/// On SIGINT or SIGTERM, kills everything the harness started (nginx workers included), then exits:
/// an interrupted run leaves no proxy behind.
pub fn clean_up_on_signal() {
    std::thread::spawn(|| {
        let Ok(rt) = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
        else {
            return;
        };
        rt.block_on(async {
            use tokio::signal::unix::{SignalKind, signal};
            let (Ok(mut term), Ok(mut int)) = (
                signal(SignalKind::terminate()),
                signal(SignalKind::interrupt()),
            ) else {
                return;
            };
            tokio::select! {
                _ = term.recv() => {}
                _ = int.recv() => {}
            }
            let pids = LIVE.lock().map(|l| l.clone()).unwrap_or_default();
            for pid in pids {
                kill_tree(pid);
            }
            for dir in TEMP_DIRS.lock().map(|d| d.clone()).unwrap_or_default() {
                let _ = std::fs::remove_dir_all(dir);
            }
            eprintln!("bench-run: interrupted; stopped everything it had started");
            std::process::exit(130);
        });
    });
}

impl Guard {
    /// Takes charge of `child` (registered for clean-up on a signal).
    pub fn new(name: &str, child: Child, log: &Path) -> Self {
        if let Ok(mut l) = LIVE.lock() {
            l.push(child.id());
        }
        Self {
            name: name.into(),
            child: Some(child),
            log: log.to_path_buf(),
        }
    }

    pub fn pid(&self) -> u32 {
        self.child.as_ref().map(Child::id).unwrap_or(0)
    }

    /// Whether it is still running.
    pub fn running(&mut self) -> bool {
        self.child
            .as_mut()
            .is_some_and(|c| matches!(c.try_wait(), Ok(None)))
    }

    /// The pids of this process and its descendants.
    pub fn pids(&self) -> Vec<u32> {
        crate::procfs::tree(self.pid())
    }

    /// Sends `sig` (e.g. "TERM", "KILL") to the process itself (not its descendants).
    pub fn signal(&self, sig: &str) -> Result<()> {
        let st = Command::new("kill")
            .args([format!("-{sig}"), self.pid().to_string()])
            .stderr(Stdio::null())
            .status()?;
        if !st.success() {
            bail!("kill -{sig} {} failed", self.pid());
        }
        Ok(())
    }

    /// Waits up to `timeout` for the process to exit; its exit status (None: still running).
    pub fn wait_exit(&mut self, timeout: Duration) -> Option<std::process::ExitStatus> {
        let deadline = Instant::now() + timeout;
        let child = self.child.as_mut()?;
        loop {
            if let Ok(Some(status)) = child.try_wait() {
                return Some(status);
            }
            if Instant::now() > deadline {
                return None;
            }
            std::thread::sleep(Duration::from_millis(5));
        }
    }

    /// The last lines of its log, for error messages.
    pub fn log_tail(&self) -> String {
        let text = std::fs::read_to_string(&self.log).unwrap_or_default();
        let lines: Vec<&str> = text.lines().collect();
        lines[lines.len().saturating_sub(8)..].join("\n")
    }
}

impl Drop for Guard {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let descendants = crate::procfs::tree(c.id());
            let _ = c.kill();
            for pid in descendants.into_iter().skip(1) {
                let _ = Command::new("kill")
                    .args(["-KILL", &pid.to_string()])
                    .stderr(Stdio::null())
                    .status();
            }
            let _ = c.wait();
            if let Ok(mut l) = LIVE.lock() {
                l.retain(|p| *p != c.id());
            }
        }
    }
}

/// A free port on 127.0.0.1 (bound then released).
pub fn free_addr() -> SocketAddr {
    meshid_tests::process::free_addr("127.0.0.1")
}

/// Waits until something accepts TCP connections on `addr`.
pub fn wait_tcp(addr: SocketAddr, timeout: Duration) -> bool {
    let deadline = Instant::now() + timeout;
    while Instant::now() < deadline {
        if TcpStream::connect_timeout(&addr, Duration::from_millis(200)).is_ok() {
            return true;
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    false
}

/// Waits until `GET path` on `addr` answers 200.
pub fn wait_http_ok(addr: SocketAddr, path: &str, timeout: Duration) -> bool {
    meshid_tests::process::wait_http_ok(addr, path, timeout)
}
