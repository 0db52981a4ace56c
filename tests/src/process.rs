//! Running the real binaries: a child process that is killed when the test ends, however it ends.

use std::net::{SocketAddr, TcpListener};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

/// A child process killed (and reaped) on drop.
pub struct Proc {
    pub name: String,
    child: Option<Child>,
}

impl Proc {
    /// Spawns `cmd` with stdout/stderr inherited (captured by the test harness on failure).
    pub fn spawn(name: &str, cmd: &mut Command) -> Self {
        let child = cmd
            .stdin(Stdio::null())
            .spawn()
            .unwrap_or_else(|e| panic!("spawning {name}: {e}"));
        Self {
            name: name.into(),
            child: Some(child),
        }
    }

    pub fn pid(&self) -> u32 {
        self.child.as_ref().map(|c| c.id()).unwrap_or(0)
    }

    /// Sends a signal (e.g. `libc`-free: "TERM", "KILL") with the `kill` command.
    pub fn signal(&self, sig: &str) {
        let _ = Command::new("kill")
            .args([format!("-{sig}"), self.pid().to_string()])
            .status();
    }

    /// Waits up to `timeout` for the process to exit.
    pub fn wait_timeout(&mut self, timeout: Duration) -> Option<ExitStatus> {
        let deadline = Instant::now() + timeout;
        let child = self.child.as_mut()?;
        loop {
            if let Ok(Some(status)) = child.try_wait() {
                return Some(status);
            }
            if Instant::now() > deadline {
                return None;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// The child's stdout, when it was spawned with `Stdio::piped()` (once).
    pub fn take_stdout(&mut self) -> Option<std::process::ChildStdout> {
        self.child.as_mut()?.stdout.take()
    }

    /// The child's stderr, when it was spawned with `Stdio::piped()` (once).
    pub fn take_stderr(&mut self) -> Option<std::process::ChildStderr> {
        self.child.as_mut()?.stderr.take()
    }

    /// Whether it is still running.
    pub fn running(&mut self) -> bool {
        self.child
            .as_mut()
            .is_some_and(|c| matches!(c.try_wait(), Ok(None)))
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

/// A free TCP port on `ip` (bound and released; the small race is acceptable in tests).
pub fn free_addr(ip: &str) -> SocketAddr {
    let l = TcpListener::bind((ip, 0)).expect("bind ephemeral port");
    l.local_addr().expect("local addr")
}

/// Polls `addr` with HTTP GET `path` until it answers 200 or `timeout` passes.
pub fn wait_http_ok(addr: SocketAddr, path: &str, timeout: Duration) -> bool {
    let deadline = Instant::now() + timeout;
    while Instant::now() < deadline {
        if http_get(addr, path).map(|(c, _)| c == 200).unwrap_or(false) {
            return true;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    false
}

/// A minimal HTTP/1.1 GET: (status code, whole response).
pub fn http_get(addr: SocketAddr, path: &str) -> std::io::Result<(u16, String)> {
    use std::io::{Read, Write};
    let mut s = std::net::TcpStream::connect_timeout(&addr, Duration::from_secs(2))?;
    s.set_read_timeout(Some(Duration::from_secs(5)))?;
    write!(
        s,
        "GET {path} HTTP/1.1\r\nHost: meshid\r\nConnection: close\r\n\r\n"
    )?;
    let mut out = String::new();
    s.read_to_string(&mut out)?;
    let code = out
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or(0);
    Ok((code, out))
}

/// `meshid-sidecar run` in CA mode: certificates from the CA at `ca` (its serving certificate
/// checked against `bundle` for `localhost`), bootstrapped by `token_flag token`, admin on `admin`.
pub fn ca_mode_sidecar(
    ca: SocketAddr,
    bundle: &std::path::Path,
    token_flag: &str,
    token: &std::path::Path,
    admin: SocketAddr,
) -> Command {
    let mut cmd = Command::new(crate::tools::workspace_bin("meshid-sidecar"));
    cmd.arg("run")
        .args([
            "--ca-addr",
            &ca.to_string(),
            "--ca-server-name",
            "localhost",
        ])
        .arg("--ca-bundle")
        .arg(bundle)
        .arg(token_flag)
        .arg(token)
        .args(["--admin-listen", &admin.to_string()])
        .env("MESHID_LOG", "warn")
        // One worker, as the benchmark runs it: these sidecars use the current-thread scheduler
        // (the in-process and file-mode ones the multi-thread one).
        .env("TOKIO_WORKER_THREADS", "1");
    cmd
}
