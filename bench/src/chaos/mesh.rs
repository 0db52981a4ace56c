//! The real processes a chaos scenario runs: a `meshid-ca` that can be killed and started again on
//! the same directory and ports, sidecars that can be signalled and restarted with the same flags, and
//! the app. Every command goes through the harness context, so the report lists it exactly as run.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use meshid_sidecar::settings::CaEndpoint;
use meshid_tests::fake_cluster::FakeCluster;
use rustls_pki_types::CertificateDer;
use rustls_pki_types::pem::PemObject;

use super::{Env, wait_ready};
use crate::harness::pki::{CLIENT_ID, SERVER_ID};
use crate::harness::{Guard, free_addr, wait_tcp};

/// A `meshid-ca` on a directory of its own, with a fake cluster's keys.
pub struct CaProc {
    pub dir: PathBuf,
    pub grpc: SocketAddr,
    pub admin: SocketAddr,
    pub cluster: FakeCluster,
    work: PathBuf,
    jwks: PathBuf,
    flags: Vec<String>,
    user: Option<(u32, u32)>,
    guard: Option<Guard>,
    starts: usize,
}

impl CaProc {
    /// `meshid-ca init` in `work/ca`; `serve` will run with `flags` added.
    pub fn init(env: &Env, work: &Path, flags: &[&str]) -> Result<Self> {
        Self::init_in(env, &work.join("ca"), work, flags, None)
    }

    /// `meshid-ca init` in `dir` (logs and keys of the fake cluster in `work`), every command of
    /// this CA run as `user` when given.
    pub fn init_in(
        env: &Env,
        dir: &Path,
        work: &Path,
        flags: &[&str],
        user: Option<(u32, u32)>,
    ) -> Result<Self> {
        let dir = dir.to_path_buf();
        env.ctx.output(
            as_user(env.ctx.bin("meshid-ca"), user)
                .args(["init", "--dir"])
                .arg(&dir),
        )?;
        let cluster = FakeCluster::new();
        let jwks = work.join("jwks.json");
        cluster.write_jwks(&jwks);
        Ok(Self {
            dir,
            grpc: free_addr(),
            admin: free_addr(),
            cluster,
            work: work.to_path_buf(),
            jwks,
            flags: flags.iter().map(|s| (*s).to_owned()).collect(),
            user,
            guard: None,
            starts: 0,
        })
    }

    /// `meshid-ca ARGS` as this CA's user: (success, stdout and stderr).
    pub fn cli(&self, env: &Env, args: &[&str]) -> Result<(bool, String)> {
        let mut cmd = as_user(env.ctx.bin("meshid-ca"), self.user);
        cmd.args(args).env("MESHID_LOG", "warn");
        env.ctx.record(&cmd);
        let out = cmd.stdin(std::process::Stdio::null()).output()?;
        let mut text = String::from_utf8_lossy(&out.stdout).into_owned();
        text.push_str(&String::from_utf8_lossy(&out.stderr));
        Ok((out.status.success(), text.trim().to_owned()))
    }

    /// Starts `serve` (again, on the same directory and ports) and waits until it is ready: the
    /// time from the spawn to its first 200 on `/readyz`.
    pub async fn serve(&mut self, env: &Env) -> Result<Duration> {
        self.starts += 1;
        let mut cmd = as_user(env.ctx.bin("meshid-ca"), self.user);
        cmd.args(["serve", "--dir"])
            .arg(&self.dir)
            .args(["--listen", &self.grpc.to_string()])
            .args(["--admin-listen", &self.admin.to_string()])
            .arg("--jwks")
            .arg(&self.jwks)
            .args(&self.flags)
            .env("MESHID_LOG", "warn");
        // Every simulated workload connects from 127.0.0.1, one source standing for many hosts;
        // rate limits are not what these scenarios measure (unless a scenario sets them itself).
        let given = |flag: &str| self.flags.iter().any(|f| f == flag);
        if !given("--max-connections-per-source") {
            cmd.args(["--max-connections-per-source", "1000000"]);
        }
        // The same source holds the calls whose request is still arriving: lift its share too.
        if !given("--max-arriving-requests") {
            cmd.args(["--max-arriving-requests", "1000000"]);
        }
        if !given("--rate-limit") {
            cmd.args(["--rate-limit", "1000000000", "--rate-burst", "1000000000"]);
        }
        let t0 = Instant::now();
        let log = self.work.join(format!("ca-{}.log", self.starts));
        self.guard = Some(env.ctx.spawn("meshid-ca serve", &mut cmd, &log)?);
        wait_ready(self.admin, Duration::from_secs(20))
            .await
            .with_context(|| format!("the CA did not become ready: {}", self.log_tail()))?;
        Ok(t0.elapsed())
    }

    /// SIGKILL, and waits until it is gone.
    pub fn kill(&mut self, env: &Env) -> Result<()> {
        let Some(g) = self.guard.as_mut() else {
            bail!("the CA is not running");
        };
        env.ctx
            .commands
            .borrow_mut()
            .push(format!("kill -KILL {}  # meshid-ca serve", g.pid()));
        g.signal("KILL")?;
        if g.wait_exit(Duration::from_secs(5)).is_none() {
            bail!("the CA survived SIGKILL");
        }
        self.guard = None;
        Ok(())
    }

    pub fn pid(&self) -> u32 {
        self.guard.as_ref().map_or(0, Guard::pid)
    }

    fn log_tail(&self) -> String {
        self.guard.as_ref().map(Guard::log_tail).unwrap_or_default()
    }

    pub fn bundle(&self) -> PathBuf {
        self.dir.join("bundle.pem")
    }

    /// How a client reaches and trusts it.
    pub fn endpoint(&self) -> Result<CaEndpoint> {
        let roots: Vec<CertificateDer<'static>> =
            CertificateDer::pem_slice_iter(&std::fs::read(self.bundle())?)
                .collect::<Result<_, _>>()?;
        Ok(CaEndpoint {
            addr: self.grpc.to_string(),
            server_name: Some("localhost".into()),
            roots,
            pinned: Vec::new(),
        })
    }
}

/// A `meshid-sidecar run` that can be signalled and started again with the same flags.
pub struct SidecarProc {
    pub name: String,
    pub admin: SocketAddr,
    args: Vec<String>,
    /// Environment added to every start (besides the log level and worker count).
    vars: Vec<(String, String)>,
    /// Run as this uid:gid (setpriv).
    user: Option<(u32, u32)>,
    dir: PathBuf,
    guard: Option<Guard>,
    starts: usize,
}

impl SidecarProc {
    /// Starts `meshid-sidecar run ARGS --admin-listen ADMIN` (not waiting for readiness).
    pub fn start(
        env: &Env,
        name: &str,
        dir: &Path,
        args: Vec<String>,
        user: Option<(u32, u32)>,
    ) -> Result<Self> {
        Self::start_with_env(env, name, dir, args, user, Vec::new())
    }

    /// [`SidecarProc::start`] with `vars` added to its environment at every start.
    pub fn start_with_env(
        env: &Env,
        name: &str,
        dir: &Path,
        args: Vec<String>,
        user: Option<(u32, u32)>,
        vars: Vec<(String, String)>,
    ) -> Result<Self> {
        let mut s = Self {
            name: name.into(),
            admin: free_addr(),
            args,
            vars,
            user,
            dir: dir.to_path_buf(),
            guard: None,
            starts: 0,
        };
        s.spawn(env)?;
        Ok(s)
    }

    /// Starts the process (again).
    pub fn spawn(&mut self, env: &Env) -> Result<()> {
        self.starts += 1;
        let mut cmd = as_user(env.ctx.bin("meshid-sidecar"), self.user);
        cmd.arg("run")
            .args(&self.args)
            .args(["--admin-listen", &self.admin.to_string()])
            .env("MESHID_LOG", "warn")
            // One worker, as the benchmarks run it.
            .env("TOKIO_WORKER_THREADS", "1")
            .envs(self.vars.iter().map(|(k, v)| (k, v)));
        let log = self.dir.join(format!("{}-{}.log", self.name, self.starts));
        self.guard = Some(env.ctx.spawn(&self.name, &mut cmd, &log)?);
        Ok(())
    }

    pub async fn wait_ready(&mut self, timeout: Duration) -> Result<Duration> {
        match wait_ready(self.admin, timeout).await {
            Ok(d) => Ok(d),
            Err(e) => bail!("{}: {e}: {}", self.name, self.log_tail()),
        }
    }

    /// Sends `sig` (recorded as a command).
    pub fn signal(&self, env: &Env, sig: &str) -> Result<()> {
        let g = self.guard.as_ref().context("not running")?;
        env.ctx
            .commands
            .borrow_mut()
            .push(format!("kill -{sig} {}  # {}", g.pid(), self.name));
        g.signal(sig)
    }

    /// Waits for the process to exit: its exit code (None: killed by a signal), or an error if it
    /// is still running after `timeout`.
    pub fn wait_exit(&mut self, timeout: Duration) -> Result<Option<i32>> {
        let g = self.guard.as_mut().context("not running")?;
        let Some(status) = g.wait_exit(timeout) else {
            bail!("{} still running {timeout:?} after the signal", self.name);
        };
        self.guard = None;
        Ok(status.code())
    }

    pub fn log_tail(&self) -> String {
        self.guard.as_ref().map(Guard::log_tail).unwrap_or_default()
    }

    /// The running process's pid (0 when it is not running).
    pub fn pid(&self) -> u32 {
        self.guard.as_ref().map_or(0, Guard::pid)
    }

    /// The whole log of the current (or last) start.
    pub fn log(&self) -> String {
        let path = self.dir.join(format!("{}-{}.log", self.name, self.starts));
        std::fs::read_to_string(path).unwrap_or_default()
    }
}

/// A `meshid-ca` and a CA-mode sidecar pair (service-account token files) in front of bench-app:
/// plaintext HTTP into the outbound sidecar's `local` listener, mTLS to the inbound one, the app.
pub struct CaPair {
    pub ca: CaProc,
    pub inbound: SidecarProc,
    pub outbound: SidecarProc,
    /// The outbound sidecar's local listener.
    pub local: SocketAddr,
    /// The inbound sidecar's mTLS listener.
    pub inbound_addr: SocketAddr,
    /// The outbound (client) sidecar's token file, for more sidecars of that identity.
    pub client_token: PathBuf,
    _app: Guard,
}

impl CaPair {
    /// Starts the CA (`serve` with `ca_flags` added) in `work/ca`, the app and the pair, and waits
    /// until both sidecars are ready.
    pub async fn start(env: &Env, work: &Path, ca_flags: &[&str]) -> Result<Self> {
        Self::start_with_env(env, work, ca_flags, [Vec::new(), Vec::new()]).await
    }

    /// [`CaPair::start`] with environment variables added to the inbound and the outbound
    /// sidecar (`vars[0]`, `vars[1]`) at every start.
    pub async fn start_with_env(
        env: &Env,
        work: &Path,
        ca_flags: &[&str],
        vars: [Vec<(String, String)>; 2],
    ) -> Result<Self> {
        let [inbound_vars, outbound_vars] = vars;
        let mut ca = CaProc::init(env, work, ca_flags)?;
        ca.serve(env).await?;
        let (app_guard, app) = start_app(env, work, 0)?;
        let (inbound_addr, local) = (free_addr(), free_addr());
        let policy = work.join("policy.yaml");
        std::fs::write(&policy, policy_yaml(&[inbound_addr.port()], CLIENT_ID))?;
        let (server_token, client_token) = (work.join("server.token"), work.join("client.token"));
        std::fs::write(&server_token, ca.cluster.token("bench", "server"))?;
        std::fs::write(&client_token, ca.cluster.token("bench", "client"))?;
        let mut args = inbound_args(inbound_addr, app, &policy);
        args.extend(ca_mode_args(&ca, &server_token));
        let mut inbound =
            SidecarProc::start_with_env(env, "inbound", work, args, None, inbound_vars)?;
        let mut args = outbound_args(local, inbound_addr, SERVER_ID);
        args.extend(ca_mode_args(&ca, &client_token));
        let mut outbound =
            SidecarProc::start_with_env(env, "outbound", work, args, None, outbound_vars)?;
        inbound.wait_ready(Duration::from_secs(20)).await?;
        outbound.wait_ready(Duration::from_secs(20)).await?;
        Ok(Self {
            ca,
            inbound,
            outbound,
            local,
            inbound_addr,
            client_token,
            _app: app_guard,
        })
    }

    /// The two sidecars, inbound first.
    pub fn sidecars(&self) -> [&SidecarProc; 2] {
        [&self.inbound, &self.outbound]
    }
}

/// `bin`, run as `user` (uid, gid) with setpriv when given.
pub fn as_user(bin: PathBuf, user: Option<(u32, u32)>) -> Command {
    match user {
        Some((uid, gid)) => {
            let mut c = Command::new("setpriv");
            c.args([
                format!("--reuid={uid}"),
                format!("--regid={gid}"),
                "--clear-groups".into(),
                "--".into(),
            ])
            .arg(bin);
            c
        }
        None => Command::new(bin),
    }
}

/// The app: `bench-app`, answering after `delay_ms`.
pub fn start_app(env: &Env, dir: &Path, delay_ms: u64) -> Result<(Guard, SocketAddr)> {
    let addr = free_addr();
    let mut cmd = Command::new(env.ctx.bin("bench-app"));
    cmd.args(["--listen", &addr.to_string()])
        .args(["--delay-ms", &delay_ms.to_string()]);
    let app = env.ctx.spawn("bench-app", &mut cmd, &dir.join("app.log"))?;
    if !wait_tcp(addr, Duration::from_secs(10)) {
        bail!("bench-app did not listen on {addr}: {}", app.log_tail());
    }
    Ok((app, addr))
}

/// An allow-list letting `client` call HTTP on each of `ports`.
pub fn policy_yaml(ports: &[u16], client: &str) -> String {
    let mut y = String::from("mode: enforce\ninbound:\n");
    for p in ports {
        y.push_str(&format!(
            "  - port: {p}\n    protocol: http\n    allow:\n      - id: {client}\n"
        ));
    }
    y
}

/// `--inbound LISTEN=APP,http --policy POLICY`.
pub fn inbound_args(listen: SocketAddr, app: SocketAddr, policy: &Path) -> Vec<String> {
    vec![
        "--inbound".into(),
        format!("{listen}={app},http"),
        "--policy".into(),
        policy.display().to_string(),
    ]
}

/// `--outbound LOCAL=REMOTE,SERVER_ID,http`.
pub fn outbound_args(local: SocketAddr, remote: SocketAddr, server_id: &str) -> Vec<String> {
    vec![
        "--outbound".into(),
        format!("{local}={remote},{server_id},http"),
    ]
}

/// CA mode with a service-account token file.
pub fn ca_mode_args(ca: &CaProc, token_file: &Path) -> Vec<String> {
    vec![
        "--ca-addr".into(),
        ca.grpc.to_string(),
        "--ca-server-name".into(),
        "localhost".into(),
        "--ca-bundle".into(),
        ca.bundle().display().to_string(),
        "--token-file".into(),
        token_file.display().to_string(),
    ]
}

/// File mode.
pub fn file_mode_args(cert: &Path, key: &Path, bundle: &Path) -> Vec<String> {
    vec![
        "--cert".into(),
        cert.display().to_string(),
        "--key".into(),
        key.display().to_string(),
        "--bundle".into(),
        bundle.display().to_string(),
    ]
}
