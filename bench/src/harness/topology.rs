//! The contenders, each started fresh on the server core: the app alone (direct), or the app behind a
//! pair of proxies (outbound on plaintext loopback -> mTLS -> inbound -> app) of meshid, nginx or
//! haproxy, all with the same certificates and the same thread budget.

use std::net::SocketAddr;
use std::path::Path;
use std::process::Command;
use std::time::Duration;

use anyhow::{Result, bail};
use serde::Serialize;

use super::pki::{BenchPki, CLIENT_ID, SERVER_ID, hex_upper};
use super::{Ctx, Guard, SERVER_CPU, free_addr, pinned, wait_http_ok, wait_tcp};

const NGINX_SERVER: &str = include_str!("../../nginx/server.conf");
const NGINX_CLIENT: &str = include_str!("../../nginx/client.conf");
const HAPROXY_SERVER: &str = include_str!("../../haproxy/server.cfg");
const HAPROXY_CLIENT: &str = include_str!("../../haproxy/client.cfg");
const NGINX_SERVER_TCP: &str = include_str!("../../nginx/server-tcp.conf");
const NGINX_CLIENT_TCP: &str = include_str!("../../nginx/client-tcp.conf");
const HAPROXY_SERVER_TCP: &str = include_str!("../../haproxy/server-tcp.cfg");
const HAPROXY_CLIENT_TCP: &str = include_str!("../../haproxy/client-tcp.cfg");

/// What the proxies see: HTTP requests (the default) or opaque TCP streams.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    Http,
    Tcp,
}

impl Mode {
    fn name(self) -> &'static str {
        match self {
            Self::Http => "http",
            Self::Tcp => "tcp",
        }
    }
}

/// Response body of the app, in bytes.
pub const BODY_BYTES: usize = 64;

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Contender {
    Direct,
    Meshid,
    Nginx,
    Haproxy,
}

impl Contender {
    pub const ALL: [Contender; 4] = [Self::Direct, Self::Meshid, Self::Nginx, Self::Haproxy];
    pub const PROXIES: [Contender; 3] = [Self::Meshid, Self::Nginx, Self::Haproxy];

    pub fn name(self) -> &'static str {
        match self {
            Self::Direct => "direct",
            Self::Meshid => "meshid",
            Self::Nginx => "nginx",
            Self::Haproxy => "haproxy",
        }
    }
}

/// A started contender.
pub struct Running {
    pub contender: Contender,
    /// Its own directory (configs, logs).
    pub dir: std::path::PathBuf,
    /// Where the load sends plaintext HTTP: the outbound proxy (or the app, direct).
    pub entry: SocketAddr,
    /// The terminating proxy's mTLS listener.
    pub terminator: Option<SocketAddr>,
    pub app: Guard,
    pub outbound: Option<Guard>,
    pub inbound: Option<Guard>,
}

impl Running {
    /// Role name and the pids whose CPU counts for it.
    pub fn roles(&self) -> Vec<(&'static str, Vec<u32>)> {
        let mut r = vec![("app", self.app.pids())];
        if let Some(g) = &self.outbound {
            r.push(("outbound", g.pids()));
        }
        if let Some(g) = &self.inbound {
            r.push(("inbound", g.pids()));
        }
        r
    }

    /// Fails if any process of this contender has exited.
    pub fn check_alive(&mut self) -> Result<()> {
        for g in [
            Some(&mut self.app),
            self.outbound.as_mut(),
            self.inbound.as_mut(),
        ]
        .into_iter()
        .flatten()
        {
            if !g.running() {
                bail!("{} exited: {}", g.name, g.log_tail());
            }
        }
        Ok(())
    }
}

fn render(template: &str, vars: &[(&str, String)]) -> String {
    let mut out = template.to_owned();
    for (k, v) in vars {
        out = out.replace(&format!("{{{{{k}}}}}"), v);
    }
    out
}

fn write_config(ctx: &Ctx, dir: &Path, name: &str, text: String) -> Result<std::path::PathBuf> {
    let path = dir.join(name);
    std::fs::write(&path, &text)?;
    ctx.configs
        .borrow_mut()
        .entry(name.to_owned())
        .or_insert(text);
    Ok(path)
}

/// Starts the app on the server core.
pub fn start_app(ctx: &Ctx, dir: &Path) -> Result<(Guard, SocketAddr)> {
    let addr = free_addr();
    let mut cmd = pinned(SERVER_CPU, ctx.bin("bench-app"));
    cmd.args(["--listen", &addr.to_string()])
        .args(["--body-bytes", &BODY_BYTES.to_string()]);
    let app = ctx.spawn("bench-app", &mut cmd, &dir.join("app.log"))?;
    if !wait_tcp(addr, Duration::from_secs(10)) {
        bail!("bench-app did not listen on {addr}: {}", app.log_tail());
    }
    Ok((app, addr))
}

/// Starts `contender` (app included).
pub fn start(ctx: &Ctx, pki: &BenchPki, contender: Contender) -> Result<Running> {
    start_mode(ctx, pki, contender, Mode::Http)
}

/// Starts `contender` (app included) with its proxies in `mode`.
pub fn start_mode(ctx: &Ctx, pki: &BenchPki, contender: Contender, mode: Mode) -> Result<Running> {
    let dir = ctx.dir(contender.name())?;
    let (app, app_addr) = start_app(ctx, &dir)?;
    let (outbound, inbound, entry, terminator) = match contender {
        Contender::Direct => (None, None, app_addr, None),
        Contender::Meshid => {
            let (o, i, e, t) = meshid(ctx, pki, &dir, app_addr, mode)?;
            (Some(o), Some(i), e, Some(t))
        }
        Contender::Nginx => {
            let (o, i, e, t) = nginx(ctx, pki, &dir, app_addr, mode)?;
            (Some(o), Some(i), e, Some(t))
        }
        Contender::Haproxy => {
            let (o, i, e, t) = haproxy(ctx, pki, &dir, app_addr, mode)?;
            (Some(o), Some(i), e, Some(t))
        }
    };
    Ok(Running {
        contender,
        dir,
        entry,
        terminator,
        app,
        outbound,
        inbound,
    })
}

type Pair = (Guard, Guard, SocketAddr, SocketAddr);

/// A meshid sidecar command pinned to the server core with the configured worker threads.
pub fn sidecar_cmd(ctx: &Ctx) -> Command {
    let mut cmd = pinned(SERVER_CPU, ctx.bin("meshid-sidecar"));
    cmd.env("TOKIO_WORKER_THREADS", ctx.settings.workers.to_string());
    cmd.arg("run");
    cmd
}

/// The allow-list of the inbound sidecar: the client identity, on `port`.
pub fn policy_yaml(port: u16) -> String {
    policy_for(port, Mode::Http)
}

fn policy_for(port: u16, mode: Mode) -> String {
    let protocol = mode.name();
    format!(
        "mode: enforce\ninbound:\n  - port: {port}\n    protocol: {protocol}\n    allow:\n      - id: {CLIENT_ID}\n"
    )
}

fn meshid(ctx: &Ctx, pki: &BenchPki, dir: &Path, app: SocketAddr, mode: Mode) -> Result<Pair> {
    let proto = mode.name();
    let (inb, inb_admin, out, out_admin) = (free_addr(), free_addr(), free_addr(), free_addr());
    let policy = write_config(
        ctx,
        dir,
        &format!("meshid-policy-{proto}.yaml"),
        policy_for(inb.port(), mode),
    )?;
    let mut cmd = sidecar_cmd(ctx);
    cmd.args(["--inbound", &format!("{inb}={app},{proto}")])
        .arg("--policy")
        .arg(&policy)
        .arg("--cert")
        .arg(&pki.server.cert)
        .arg("--key")
        .arg(&pki.server.key)
        .arg("--bundle")
        .arg(&pki.bundle)
        .args(["--admin-listen", &inb_admin.to_string()])
        // The load generator is one peer (one identity, one address) holding every connection
        // (2,000 idle ones in `memory`); nginx and haproxy have no per-peer cap either.
        .args(["--max-connections-per-peer", "10000"]);
    let inbound = ctx.spawn("meshid inbound", &mut cmd, &dir.join("inbound.log"))?;
    let mut cmd = sidecar_cmd(ctx);
    cmd.args(["--outbound", &format!("{out}={inb},{SERVER_ID},{proto}")])
        .arg("--cert")
        .arg(&pki.client.cert)
        .arg("--key")
        .arg(&pki.client.key)
        .arg("--bundle")
        .arg(&pki.bundle)
        .args(["--admin-listen", &out_admin.to_string()]);
    let outbound = ctx.spawn("meshid outbound", &mut cmd, &dir.join("outbound.log"))?;
    for (g, admin) in [(&inbound, inb_admin), (&outbound, out_admin)] {
        if !wait_http_ok(admin, "/readyz", Duration::from_secs(15)) {
            bail!("{} not ready: {}", g.name, g.log_tail());
        }
    }
    Ok((outbound, inbound, out, inb))
}

fn nginx(ctx: &Ctx, pki: &BenchPki, dir: &Path, app: SocketAddr, mode: Mode) -> Result<Pair> {
    let (server_t, client_t, suffix) = match mode {
        Mode::Http => (NGINX_SERVER, NGINX_CLIENT, ""),
        Mode::Tcp => (NGINX_SERVER_TCP, NGINX_CLIENT_TCP, "-tcp"),
    };
    let (inb, out) = (free_addr(), free_addr());
    let workers = ctx.settings.workers.to_string();
    let start = |name: &str, template: &str, vars: Vec<(&str, String)>, listen| {
        let d = dir.join(name);
        std::fs::create_dir_all(&d)?;
        let mut vars = vars;
        vars.push(("DIR", d.display().to_string()));
        vars.push(("WORKERS", workers.clone()));
        let conf = write_config(
            ctx,
            &d,
            &format!("nginx-{name}{suffix}.conf"),
            render(template, &vars),
        )?;
        let mut cmd = pinned(SERVER_CPU, "nginx");
        cmd.arg("-p")
            .arg(&d)
            .arg("-e")
            .arg(d.join("stderr.log"))
            .arg("-c")
            .arg(&conf);
        let g = ctx.spawn(&format!("nginx {name}"), &mut cmd, &d.join("nginx.log"))?;
        if !wait_tcp(listen, Duration::from_secs(10)) {
            let errors = std::fs::read_to_string(d.join("error.log")).unwrap_or_default();
            bail!("nginx {name} did not listen: {} {errors}", g.log_tail());
        }
        Ok::<Guard, anyhow::Error>(g)
    };
    let inbound = start(
        "server",
        server_t,
        vec![
            ("LISTEN", inb.to_string()),
            ("APP", app.to_string()),
            ("CERT", pki.server.cert.display().to_string()),
            ("KEY", pki.server.key.display().to_string()),
            ("BUNDLE", pki.bundle.display().to_string()),
        ],
        inb,
    )?;
    let outbound = start(
        "client",
        client_t,
        vec![
            ("LISTEN", out.to_string()),
            ("UPSTREAM", inb.to_string()),
            ("CERT", pki.client.cert.display().to_string()),
            ("KEY", pki.client.key.display().to_string()),
        ],
        out,
    )?;
    Ok((outbound, inbound, out, inb))
}

fn haproxy(ctx: &Ctx, pki: &BenchPki, dir: &Path, app: SocketAddr, mode: Mode) -> Result<Pair> {
    let (server_t, client_t, suffix) = match mode {
        Mode::Http => (HAPROXY_SERVER, HAPROXY_CLIENT, ""),
        Mode::Tcp => (HAPROXY_SERVER_TCP, HAPROXY_CLIENT_TCP, "-tcp"),
    };
    let (inb, out) = (free_addr(), free_addr());
    let workers = ctx.settings.workers.to_string();
    let start = |name: &str, template: &str, mut vars: Vec<(&str, String)>, listen| {
        vars.push(("WORKERS", workers.clone()));
        let conf = write_config(
            ctx,
            dir,
            &format!("haproxy-{name}{suffix}.cfg"),
            render(template, &vars),
        )?;
        let mut cmd = pinned(SERVER_CPU, "haproxy");
        cmd.arg("-db").arg("-f").arg(&conf);
        let g = ctx.spawn(
            &format!("haproxy {name}"),
            &mut cmd,
            &dir.join(format!("haproxy-{name}.log")),
        )?;
        if !wait_tcp(listen, Duration::from_secs(10)) {
            bail!("haproxy {name} did not listen: {}", g.log_tail());
        }
        Ok::<Guard, anyhow::Error>(g)
    };
    let inbound = start(
        "server",
        server_t,
        vec![
            ("LISTEN", inb.to_string()),
            ("APP", app.to_string()),
            ("CRT", pki.server.combined.display().to_string()),
            ("BUNDLE", pki.bundle.display().to_string()),
            ("PEER_ID_HEX", hex_upper(CLIENT_ID)),
        ],
        inb,
    )?;
    let outbound = start(
        "client",
        client_t,
        vec![
            ("LISTEN", out.to_string()),
            ("UPSTREAM", inb.to_string()),
            ("CRT", pki.client.combined.display().to_string()),
            ("BUNDLE", pki.bundle.display().to_string()),
        ],
        out,
    )?;
    Ok((outbound, inbound, out, inb))
}
