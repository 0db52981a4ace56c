//! The local mesh demo: the whole loop on loopback, everything generated in a temporary directory.
//!
//! `meshid-ca init` + `serve`; two example apps (an HTTP echo that reports the caller identity it
//! got from `x-forwarded-client-cert`, and a TCP echo); a sidecar in front of each, getting
//! certificates from the CA with join tokens. Then: an allowed call, a denied call (and its explanation), a TCP call, the
//! certificates' identities and expiries, and where to look. Ctrl-C or SIGTERM (what `timeout`,
//! systemd and CI runners send) stops everything and cleans up, at any step.
//!
//! `--check` runs the same steps non-interactively and ends with `N passed, M failed`.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitCode, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use clap::Parser;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;

const FRONTEND: &str = "spiffe://cluster.local/ns/demo/sa/frontend";
const BACKEND: &str = "spiffe://cluster.local/ns/demo/sa/backend";

#[derive(Debug, Parser)]
#[command(
    name = "local-mesh",
    about = "Run the meshid local mesh demo on loopback"
)]
struct Args {
    /// Run every step once, print `N passed, M failed`, and exit (0 only if all passed).
    #[arg(long)]
    check: bool,
    /// Certificate lifetime (e.g. 30s to watch renewals happen).
    #[arg(long, default_value = "1h")]
    ttl: String,
    /// Directory holding meshid-ca and meshid-sidecar (default: next to this program, built by
    /// cargo when run through it).
    #[arg(long)]
    bin_dir: Option<PathBuf>,
}

/// Stops (SIGTERM, then SIGKILL) and reaps the child on drop, so Ctrl-C or a failed step never
/// leaves a process behind.
struct Guard(Child);

/// The children running now, by process ID: a signal during setup (while a step blocks) stops
/// them from the signal task ([`stop_on_signal`]).
static CHILDREN: std::sync::Mutex<Vec<u32>> = std::sync::Mutex::new(Vec::new());

/// Set once the demo is up and waiting: a signal then lets `main` stop everything in order.
static RUNNING: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);

/// Set (under the [`CHILDREN`] lock) when a signal stops the demo during setup: no child may start
/// after that, or it would outlive the demo.
static STOPPING: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);

/// Starts `cmd` as a child the signal task knows of (every child, short-lived steps included: a
/// signal while one runs stops it), unless the demo is already stopping.
fn spawn_child(cmd: &mut Command) -> std::io::Result<Child> {
    let mut children = CHILDREN.lock().unwrap_or_else(|p| p.into_inner());
    if STOPPING.load(std::sync::atomic::Ordering::SeqCst) {
        return Err(std::io::Error::other("the demo is stopping"));
    }
    let child = cmd.spawn()?;
    children.push(child.id());
    Ok(child)
}

/// The child `pid` has been reaped: the signal task must not signal its (reusable) PID.
fn forget_child(pid: u32) {
    if let Ok(mut c) = CHILDREN.lock() {
        c.retain(|p| *p != pid);
    }
}

impl Guard {
    fn spawn(cmd: &mut Command) -> std::io::Result<Self> {
        spawn_child(cmd).map(Self)
    }
}

/// Sends `signal` to `pid` (`None`: whether it is there, signal 0), by the system call: no `kill`
/// program needed, which a minimal image without procps lacks (the demo then waited for ever on
/// children it never stopped).
fn signal(pid: u32, signal: Option<rustix::process::Signal>) -> bool {
    let Some(pid) = i32::try_from(pid)
        .ok()
        .and_then(rustix::process::Pid::from_raw)
    else {
        return false;
    };
    match signal {
        Some(s) => rustix::process::kill_process(pid, s).is_ok(),
        None => rustix::process::test_kill_process(pid).is_ok(),
    }
}

/// SIGTERM, then SIGKILL after 10 s if it is still there; `running` says whether it still is.
fn stop(pid: u32, mut running: impl FnMut() -> bool) {
    signal(pid, Some(rustix::process::Signal::TERM));
    let deadline = Instant::now() + Duration::from_secs(10);
    while Instant::now() < deadline {
        if !running() {
            return;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    signal(pid, Some(rustix::process::Signal::KILL));
}

impl Drop for Guard {
    fn drop(&mut self) {
        let child = &mut self.0;
        let pid = child.id();
        stop(pid, || matches!(child.try_wait(), Ok(None)));
        let _ = child.wait();
        forget_child(pid);
    }
}

/// Waits for SIGTERM or SIGINT (Ctrl-C): once the demo is up, tells `main` (through `stopping`)
/// to stop everything in order; before that (a step may be blocking), stops the children and
/// removes the working directory itself, then exits.
async fn stop_on_signal(work: PathBuf, stopping: tokio::sync::watch::Sender<bool>) {
    // A second signal must not cut the cleanup short (children left running, the directory left).
    let Ok(_later) = meshid_runtime::process::wait_for_first_signal().await else {
        return;
    };
    let _ = stopping.send(true);
    if RUNNING.load(std::sync::atomic::Ordering::SeqCst) {
        return;
    }
    println!("\nstopping during setup");
    let pids: Vec<u32> = {
        let children = CHILDREN.lock().unwrap_or_else(|p| p.into_inner());
        STOPPING.store(true, std::sync::atomic::Ordering::SeqCst);
        children.clone()
    };
    for pid in pids {
        // Not our child to reap here (the Guard owns it): `kill -0` says whether it is there.
        stop(pid, || signal(pid, None));
    }
    // `main` may still be writing a step's files (it has not noticed the children are gone), and
    // a write under way as the directory goes makes the removal fail or the directory come back:
    // remove it until it stays gone for a moment (at most 5 s).
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let _ = std::fs::remove_dir_all(&work);
        std::thread::sleep(Duration::from_millis(50));
        if !work.exists() || Instant::now() > deadline {
            break;
        }
    }
    std::process::exit(1);
}

#[derive(Default)]
struct Tally {
    passed: u32,
    failed: u32,
}

impl Tally {
    fn step(&mut self, name: &str, result: Result<String>) -> bool {
        match result {
            Ok(detail) => {
                self.passed += 1;
                println!("  ok    {name}: {detail}");
                true
            }
            Err(e) => {
                self.failed += 1;
                println!(
                    "  FAIL  {name}: {}",
                    meshid_runtime::process::error_chain(e.as_ref())
                );
                false
            }
        }
    }
}

fn bin_dir(args: &Args) -> Result<PathBuf> {
    if let Some(d) = &args.bin_dir {
        return Ok(d.clone());
    }
    let exe = std::env::current_exe().context("locating this program")?;
    let dir = exe.parent().context("program directory")?.to_owned();
    let missing = !dir.join("meshid-ca").exists() || !dir.join("meshid-sidecar").exists();
    // Under `cargo run`, make sure the binaries match the source (a no-op when up to date).
    if let Ok(cargo) =
        std::env::var("CARGO").or_else(|e| if missing { Ok("cargo".into()) } else { Err(e) })
    {
        let mut cmd = Command::new(cargo);
        cmd.args(["build", "-p", "meshid-ca", "-p", "meshid-sidecar"]);
        if dir.ends_with("release") {
            cmd.arg("--release");
        }
        if missing {
            // The first run compiles the CA and the sidecar: minutes, with cargo's progress shown.
            println!(
                "building meshid-ca and meshid-sidecar into {} (the first time takes a few minutes)",
                dir.display()
            );
        } else {
            println!("checking that meshid-ca and meshid-sidecar are up to date (cargo build)");
            cmd.arg("-q");
        }
        let mut cargo = spawn_child(&mut cmd).context("running cargo build")?;
        let status = cargo.wait();
        forget_child(cargo.id());
        if !status.context("running cargo build")?.success() {
            bail!("building meshid-ca and meshid-sidecar failed");
        }
    }
    Ok(dir)
}

fn free_addr() -> Result<SocketAddr> {
    Ok(std::net::TcpListener::bind("127.0.0.1:0")?.local_addr()?)
}

fn run_ok(cmd: &mut Command) -> Result<String> {
    let child =
        spawn_child(cmd.stdout(Stdio::piped()).stderr(Stdio::piped())).context("spawning")?;
    let pid = child.id();
    let out = child.wait_with_output();
    forget_child(pid);
    let out = out.context("waiting")?;
    if !out.status.success() {
        bail!("{}", String::from_utf8_lossy(&out.stderr).trim());
    }
    Ok(String::from_utf8_lossy(&out.stdout).trim().to_owned())
}

fn http_get(addr: SocketAddr, path: &str) -> Result<(u16, String)> {
    use std::io::{Read, Write};
    let mut s = std::net::TcpStream::connect_timeout(&addr, Duration::from_secs(2))?;
    s.set_read_timeout(Some(Duration::from_secs(10)))?;
    write!(
        s,
        "GET {path} HTTP/1.1\r\nHost: demo\r\nConnection: close\r\n\r\n"
    )?;
    let mut out = String::new();
    s.read_to_string(&mut out)?;
    let code = out
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or(0);
    let body = out.split("\r\n\r\n").nth(1).unwrap_or("").to_owned();
    let reason = out
        .lines()
        .find_map(|l| l.strip_prefix("x-meshid-reason: "))
        .map(str::to_owned);
    Ok((code, reason.unwrap_or(body)))
}

/// A plain HTTP/1.1 request: the status, the sidecar's reason (or the body) and the decision ID
/// of a denial (`x-meshid-decision`).
fn http_request(
    addr: SocketAddr,
    method: &str,
    path: &str,
) -> Result<(u16, String, Option<String>)> {
    use std::io::{Read, Write};
    let mut s = std::net::TcpStream::connect_timeout(&addr, Duration::from_secs(2))?;
    s.set_read_timeout(Some(Duration::from_secs(10)))?;
    write!(
        s,
        "{method} {path} HTTP/1.1\r\nHost: backend.demo\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"
    )?;
    let mut out = String::new();
    s.read_to_string(&mut out)?;
    let code = out
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or(0);
    let reason = out
        .lines()
        .find_map(|l| l.strip_prefix("x-meshid-reason: "))
        .map(str::to_owned);
    let body = out.split("\r\n\r\n").nth(1).unwrap_or("").trim().to_owned();
    let decision = out
        .lines()
        .find_map(|l| l.strip_prefix("x-meshid-decision: "))
        .map(str::to_owned);
    Ok((code, reason.unwrap_or(body), decision))
}

fn wait_ready(admin: SocketAddr, timeout: Duration) -> Result<()> {
    let deadline = Instant::now() + timeout;
    let mut last = String::new();
    while Instant::now() < deadline {
        match http_get(admin, "/readyz") {
            Ok((200, _)) => return Ok(()),
            Ok((_, body)) => last = body.trim().to_owned(),
            Err(e) => last = e.to_string(),
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    bail!("not ready after {timeout:?}: {last}")
}

/// `(spiffe_id, serial, seconds left)` from a sidecar's `/identity`.
fn identity(admin: SocketAddr) -> Result<(String, String, i64)> {
    let (code, body) = http_get(admin, "/identity")?;
    if code != 200 {
        bail!("/identity answered {code}");
    }
    let v: serde_json::Value = serde_json::from_str(body.trim()).context("parsing /identity")?;
    let now = meshid_runtime::time::unix_now();
    Ok((
        v["spiffe_id"].as_str().unwrap_or_default().to_owned(),
        v["serial"].as_str().unwrap_or_default().to_owned(),
        v["not_after"].as_i64().unwrap_or(0) - now,
    ))
}

struct Mesh {
    _procs: Vec<Guard>,
    ca_admin: SocketAddr,
    frontend_admin: SocketAddr,
    backend_admin: SocketAddr,
    http_local: SocketAddr,
    tcp_local: SocketAddr,
    /// For `meshid-sidecar explain`.
    sidecar_bin: PathBuf,
    /// For `meshid-ca revoke`.
    ca_bin: PathBuf,
    ca_dir: PathBuf,
}

async fn start(args: &Args, work: &Path, tally: &mut Tally) -> Result<Mesh> {
    let bins = bin_dir(args)?;
    let (ca_bin, sidecar_bin) = (bins.join("meshid-ca"), bins.join("meshid-sidecar"));
    let ca_dir = work.join("ca");
    let ca_dir_s = ca_dir.to_string_lossy().into_owned();
    let ttl = meshid_identity::parse_duration(&args.ttl).map_err(anyhow::Error::msg)?;
    let mut procs = Vec::new();

    println!("\n== certificate authority");
    let init = run_ok(Command::new(&ca_bin).args(["init", "--dir", &ca_dir_s]));
    if !tally.step(
        "meshid-ca init",
        init.map(|o| o.lines().next().unwrap_or_default().to_owned()),
    ) {
        bail!("cannot continue without a CA");
    }
    let (ca_grpc, ca_admin) = (free_addr()?, free_addr()?);
    procs.push(
        Guard::spawn(
            Command::new(&ca_bin)
                .args([
                    "serve",
                    "--dir",
                    &ca_dir_s,
                    "--listen",
                    &ca_grpc.to_string(),
                ])
                .args(["--admin-listen", &ca_admin.to_string(), "--max-ttl", "24h"])
                .stdin(Stdio::null())
                .stderr(std::fs::File::create(work.join("ca.log"))?),
        )
        .context("starting meshid-ca serve")?,
    );
    if !tally.step(
        "meshid-ca serve",
        wait_ready(ca_admin, Duration::from_secs(15)).map(|()| format!("gRPC on {ca_grpc}")),
    ) {
        bail!(
            "the CA did not start; see {}",
            work.join("ca.log").display()
        );
    }
    let mut token_files = Vec::new();
    for (name, id) in [("frontend", FRONTEND), ("backend", BACKEND)] {
        let token = run_ok(Command::new(&ca_bin).args([
            "token", "create", "--dir", &ca_dir_s, "--id", id, "--ttl", "10m",
        ]));
        let file = work.join(format!("{name}.join-token"));
        let ok = token.and_then(|t| {
            std::fs::write(&file, t)?;
            Ok(format!("one-time join token for {id}"))
        });
        tally.step(&format!("join token ({name})"), ok);
        token_files.push(file);
    }

    println!("\n== apps and their sidecars");
    let http_app = TcpListener::bind("127.0.0.1:0").await?;
    let tcp_app = TcpListener::bind("127.0.0.1:0").await?;
    let (http_app_addr, tcp_app_addr) = (http_app.local_addr()?, tcp_app.local_addr()?);
    tokio::spawn(meshid_examples::http_echo(http_app));
    tokio::spawn(meshid_examples::tcp_echo(tcp_app));
    println!(
        "  app   backend HTTP echo on {http_app_addr}, TCP echo on {tcp_app_addr} (localhost only)"
    );

    let (b_http, b_tcp, b_admin) = (free_addr()?, free_addr()?, free_addr()?);
    let policy = work.join("backend-policy.yaml");
    std::fs::write(
        &policy,
        format!(
            "mode: enforce\ninbound:\n  - port: {}\n    protocol: http\n    allow:\n      - id: {FRONTEND}\n        methods: [GET]\n        paths: [/hello, /api/*]\n  - port: {}\n    protocol: tcp\n    allow:\n      - id: {FRONTEND}\n",
            b_http.port(),
            b_tcp.port()
        ),
    )?;
    let (f_http, f_tcp, f_admin) = (free_addr()?, free_addr()?, free_addr()?);
    let ca_bundle = ca_dir.join("bundle.pem");
    let ttl_arg = format!("{}s", ttl.as_secs());
    let sidecar =
        |name: &str, token: &Path, admin: SocketAddr, extra: Vec<String>| -> Result<Guard> {
            let mut cmd = Command::new(&sidecar_bin);
            cmd.arg("run")
                .args([
                    "--ca-addr",
                    &ca_grpc.to_string(),
                    "--ca-server-name",
                    "localhost",
                ])
                .arg("--ca-bundle")
                .arg(&ca_bundle)
                .arg("--join-token-file")
                .arg(token)
                .args(["--ttl", &ttl_arg, "--admin-listen", &admin.to_string()])
                .args(extra)
                .stdin(Stdio::null())
                .stderr(std::fs::File::create(work.join(format!("{name}.log")))?);
            Guard::spawn(&mut cmd).with_context(|| format!("starting the {name} sidecar"))
        };
    procs.push(sidecar(
        "backend",
        &token_files[1],
        b_admin,
        vec![
            "--inbound".into(),
            format!("{b_http}={http_app_addr},http"),
            "--inbound".into(),
            format!("{b_tcp}={tcp_app_addr},tcp"),
            "--policy".into(),
            policy.to_string_lossy().into_owned(),
        ],
    )?);
    procs.push(sidecar(
        "frontend",
        &token_files[0],
        f_admin,
        vec![
            "--outbound".into(),
            format!("{f_http}={b_http},{BACKEND},http"),
            "--outbound".into(),
            format!("{f_tcp}={b_tcp},{BACKEND},tcp"),
        ],
    )?);
    for (name, admin) in [("backend", b_admin), ("frontend", f_admin)] {
        let ready = wait_ready(admin, Duration::from_secs(15)).and_then(|()| identity(admin));
        tally.step(
            &format!("{name} sidecar"),
            ready.map(|(id, serial, left)| {
                format!(
                    "ready as {id} (serial {}..., expires in {left}s)",
                    &serial[..8.min(serial.len())]
                )
            }),
        );
    }
    Ok(Mesh {
        _procs: procs,
        ca_admin,
        frontend_admin: f_admin,
        backend_admin: b_admin,
        http_local: f_http,
        tcp_local: f_tcp,
        sidecar_bin: sidecar_bin.clone(),
        ca_bin: ca_bin.clone(),
        ca_dir,
    })
}

async fn calls(mesh: &Mesh, tally: &mut Tally) {
    println!("\n== calls from the frontend app, through both sidecars (mTLS between them)");
    let local = mesh.http_local;
    let allowed = tokio::task::spawn_blocking(move || http_request(local, "GET", "/hello")).await;
    tally.step(
        "allowed: GET /hello",
        allowed
            .map_err(anyhow::Error::from)
            .and_then(|r| r)
            .and_then(|(code, body, _)| {
                let caller = body
                    .split_whitespace()
                    .find_map(|w| w.strip_prefix("caller="))
                    .unwrap_or("-")
                    .to_owned();
                if code == 200 && caller == FRONTEND {
                    Ok(format!("200, the backend app saw caller {caller}"))
                } else {
                    bail!("expected 200 from {FRONTEND}, got {code}: {body}")
                }
            }),
    );
    let denied = tokio::task::spawn_blocking(move || http_request(local, "DELETE", "/admin")).await;
    let mut decision = None;
    tally.step(
        "denied: DELETE /admin",
        denied
            .map_err(anyhow::Error::from)
            .and_then(|r| r)
            .and_then(|(code, reason, id)| {
                decision = id;
                if code == 403 && decision.is_some() {
                    Ok(format!("403, {reason}"))
                } else {
                    bail!("expected 403 with a decision ID, got {code}: {reason}")
                }
            }),
    );
    // The denial explained by its ID, as an operator would ask the backend's sidecar.
    let explained = decision
        .ok_or_else(|| anyhow::anyhow!("no decision ID to explain"))
        .and_then(|id| {
            run_ok(Command::new(&mesh.sidecar_bin).args([
                "explain",
                "--admin",
                &mesh.backend_admin.to_string(),
                &id,
            ]))
        })
        .and_then(|out| {
            let last = out.lines().last().unwrap_or_default().to_owned();
            if last.starts_with("deny: ") {
                Ok(format!("meshid-sidecar explain: {last}"))
            } else {
                bail!("unexpected explanation: {out}")
            }
        });
    tally.step("denial explained", explained);
    let tcp = async {
        let mut s = tokio::net::TcpStream::connect(mesh.tcp_local).await?;
        s.write_all(b"ping over mTLS").await?;
        s.shutdown().await?;
        let mut back = Vec::new();
        tokio::time::timeout(Duration::from_secs(10), s.read_to_end(&mut back)).await??;
        if back == b"ping over mTLS" {
            Ok("the TCP echo answered \"ping over mTLS\"".to_owned())
        } else {
            bail!("echo returned {:?}", String::from_utf8_lossy(&back))
        }
    }
    .await;
    tally.step("TCP call", tcp);
}

/// Polls GET /hello through the frontend for up to ten seconds until `want` says yes; the last
/// answer either way.
fn hello_until(
    local: SocketAddr,
    want: impl Fn(u16, &str) -> bool,
) -> Result<(u16, String, Duration)> {
    let start = Instant::now();
    loop {
        let (code, reason, _) = http_request(local, "GET", "/hello")?;
        if want(code, &reason) || start.elapsed() > Duration::from_secs(10) {
            return Ok((code, reason, start.elapsed()));
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

async fn revocation(mesh: &Mesh, tally: &mut Tally) {
    println!("\n== revoking the backend's identity, then lifting it (meshid-ca revoke / unrevoke)");
    let dir = mesh.ca_dir.to_string_lossy().into_owned();
    let revoked = run_ok(
        Command::new(&mesh.ca_bin)
            .args(["revoke", "--dir", &dir, "--id", BACKEND, "--reason", "demo"]),
    );
    let ok = tally.step(
        "meshid-ca revoke",
        revoked.map(|o| o.lines().next().unwrap_or_default().to_owned()),
    );
    let local = mesh.http_local;
    if ok {
        let refused = tokio::task::spawn_blocking(move || {
            hello_until(local, |code, reason| {
                code == 502 && reason.contains("revoked")
            })
        })
        .await;
        tally.step(
            "refused: the frontend will not reach a revoked backend",
            refused
                .map_err(anyhow::Error::from)
                .and_then(|r| r)
                .and_then(|(code, reason, after)| {
                    if code == 502 && reason.contains("revoked") {
                        Ok(format!("{code} after {} ms, {reason}", after.as_millis()))
                    } else {
                        bail!("expected 502 naming the revocation, got {code}: {reason}")
                    }
                }),
        );
    }
    let lifted =
        run_ok(Command::new(&mesh.ca_bin).args(["unrevoke", "--dir", &dir, "--id", BACKEND]));
    if tally.step(
        "meshid-ca unrevoke",
        lifted.map(|o| o.lines().next().unwrap_or_default().to_owned()),
    ) {
        let back =
            tokio::task::spawn_blocking(move || hello_until(local, |code, _| code == 200)).await;
        tally.step(
            "allowed again: GET /hello",
            back.map_err(anyhow::Error::from)
                .and_then(|r| r)
                .and_then(|(code, reason, after)| {
                    if code == 200 {
                        Ok(format!("200 after {} ms", after.as_millis()))
                    } else {
                        bail!("expected 200 after unrevoke, got {code}: {reason}")
                    }
                }),
        );
    }
}

fn where_to_look(mesh: &Mesh, work: &Path) {
    println!("\n== where to look");
    println!(
        "  frontend app's upstream:  http://{}/hello (plain HTTP on localhost)",
        mesh.http_local
    );
    for (name, admin) in [
        ("CA", mesh.ca_admin),
        ("backend sidecar", mesh.backend_admin),
        ("frontend sidecar", mesh.frontend_admin),
    ] {
        println!("  {name:<17} http://{admin}/metrics");
    }
    println!(
        "  identities:       http://{}/identity, http://{}/identity",
        mesh.backend_admin, mesh.frontend_admin
    );
    println!("  logs and files:   {}", work.display());
}

/// Prints a line whenever a sidecar's certificate changes, until SIGTERM or Ctrl-C.
async fn watch_renewals(mesh: &Mesh, mut stopping: tokio::sync::watch::Receiver<bool>) {
    let admins = [
        ("backend", mesh.backend_admin),
        ("frontend", mesh.frontend_admin),
    ];
    let mut serials: Vec<String> = admins
        .iter()
        .map(|(_, a)| identity(*a).map(|i| i.1).unwrap_or_default())
        .collect();
    loop {
        tokio::select! {
            _ = stopping.wait_for(|s| *s) => return,
            () = tokio::time::sleep(Duration::from_secs(1)) => {}
        }
        for (i, (name, admin)) in admins.iter().enumerate() {
            let admin = *admin;
            if let Ok(Ok((_, serial, left))) =
                tokio::task::spawn_blocking(move || identity(admin)).await
                && serial != serials[i]
            {
                println!(
                    "  renewed  {name}: new certificate (serial {}...), expires in {left}s",
                    &serial[..8.min(serial.len())]
                );
                serials[i] = serial;
            }
        }
    }
}

#[tokio::main]
async fn main() -> ExitCode {
    let args = Args::parse();
    let work = match meshid_runtime::process::private_temp_dir("meshid-local-mesh-") {
        Ok(work) => work,
        Err(e) => {
            eprintln!("local-mesh: creating a working directory: {e}");
            return ExitCode::FAILURE;
        }
    };
    println!(
        "meshid local mesh (loopback only), working in {}",
        work.display()
    );
    let (stopping, stopped) = tokio::sync::watch::channel(false);
    tokio::spawn(stop_on_signal(work.clone(), stopping));
    let mut tally = Tally::default();
    match start(&args, &work, &mut tally).await {
        Ok(mesh) => {
            calls(&mesh, &mut tally).await;
            revocation(&mesh, &mut tally).await;
            where_to_look(&mesh, &work);
            if !args.check {
                RUNNING.store(true, std::sync::atomic::Ordering::SeqCst);
                println!(
                    "\nrunning; certificates renew on their own (try --ttl 30s); Ctrl-C (or SIGTERM) stops everything"
                );
                watch_renewals(&mesh, stopped).await;
                println!("\nstopping");
            }
            drop(mesh);
        }
        Err(e) => {
            tally.step("demo setup", Err(e));
        }
    }
    if tally.failed == 0 {
        let _ = std::fs::remove_dir_all(&work);
    } else {
        // The logs the failures point at (ca.log, the sidecars') stay for reading.
        println!("\nlogs kept in {}", work.display());
    }
    println!("\n{} passed, {} failed", tally.passed, tally.failed);
    if tally.failed == 0 {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    }
}
