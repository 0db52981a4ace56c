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

/// A free TCP port on `ip` (bound and released; the small race with other processes is acceptable
/// in tests). Never one this process was given before: the kernel may hand the same ephemeral port
/// to consecutive binds once it is released, and two processes told the same address collide.
pub fn free_addr(ip: &str) -> SocketAddr {
    static GIVEN: std::sync::Mutex<std::collections::BTreeSet<SocketAddr>> =
        std::sync::Mutex::new(std::collections::BTreeSet::new());
    loop {
        let l = TcpListener::bind((ip, 0)).expect("bind ephemeral port");
        let addr = l.local_addr().expect("local addr");
        if GIVEN.lock().unwrap_or_else(|p| p.into_inner()).insert(addr) {
            return addr;
        }
    }
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
    http_get_with(addr, path, &[])
}

/// [`http_get`] with request headers, e.g. the CA directory's admin token
/// (`meshid_ca::admin_token::AdminToken::header`).
pub fn http_get_with(
    addr: SocketAddr,
    path: &str,
    headers: &[(String, String)],
) -> std::io::Result<(u16, String)> {
    use std::io::{Read, Write};
    let mut s = std::net::TcpStream::connect_timeout(&addr, Duration::from_secs(2))?;
    s.set_read_timeout(Some(Duration::from_secs(5)))?;
    let extra: String = headers
        .iter()
        .map(|(name, value)| format!("{name}: {value}\r\n"))
        .collect();
    write!(
        s,
        "GET {path} HTTP/1.1\r\nHost: meshid\r\n{extra}Connection: close\r\n\r\n"
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

/// An established IPv4 TCP connection, as `/proc/net/tcp` lists it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TcpConn {
    pub local: SocketAddr,
    pub remote: SocketAddr,
    /// The kernel's keep-alive timer is armed: SO_KEEPALIVE is on and nothing is in flight (the
    /// `tr` column is 2; it is 1 while data waits to be acknowledged, 0 with no timer at all).
    pub keepalive: bool,
}

/// Every established IPv4 TCP connection of this machine with `addr` at one end, either side.
pub fn tcp_connections(addr: SocketAddr) -> Vec<TcpConn> {
    let table = std::fs::read_to_string("/proc/net/tcp").unwrap_or_default();
    table
        .lines()
        .skip(1)
        .filter_map(|line| {
            let f: Vec<&str> = line.split_whitespace().collect();
            if f.len() < 6 || f[3] != "01" {
                return None;
            }
            let (local, remote) = (proc_net_addr(f[1])?, proc_net_addr(f[2])?);
            (local == addr || remote == addr).then(|| TcpConn {
                local,
                remote,
                keepalive: f[5].starts_with("02:"),
            })
        })
        .collect()
}

/// `0100007F:1F90` (the address's bytes as a host-order word, the port in hex) as 127.0.0.1:8080.
fn proc_net_addr(s: &str) -> Option<SocketAddr> {
    let (ip, port) = s.split_once(':')?;
    let ip = u32::from_str_radix(ip, 16).ok()?;
    let port = u16::from_str_radix(port, 16).ok()?;
    Some(SocketAddr::from((ip.to_ne_bytes(), port)))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn proc_net_tcp_addresses_are_read_as_the_kernel_writes_them() {
        assert_eq!(
            proc_net_addr("0100007F:1F90"),
            Some("127.0.0.1:8080".parse().unwrap())
        );
        assert_eq!(proc_net_addr("garbage"), None);
    }

    #[test]
    fn a_connection_with_keepalive_on_shows_its_timer() {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap();
        let client = std::net::TcpStream::connect(addr).unwrap();
        let (_server, _) = listener.accept().unwrap();
        let ours = |conns: Vec<TcpConn>| {
            conns
                .into_iter()
                .find(|c| c.local == client.local_addr().unwrap())
                .unwrap()
        };
        assert!(!ours(tcp_connections(addr)).keepalive);
        socket2::SockRef::from(&client).set_keepalive(true).unwrap();
        assert!(ours(tcp_connections(addr)).keepalive);
    }
}
