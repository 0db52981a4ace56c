//! The local mesh demo: everything on loopback, generated in a temporary directory.
//!
//! Today it runs the CA stage of the mesh: `meshid-ca init`, two join tokens, `meshid-ca serve`, and
//! two workloads getting their SPIFFE certificates with fresh in-memory keys. The sidecars and example
//! apps join the demo as they are built.
//!
//! `--check` runs the same steps non-interactively and ends with `N passed, M failed`.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitCode, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use clap::Parser;
use meshid_proto::ca::v1::{GetTrustBundleRequest, IssueRequest, issue_request::Credential};
use meshid_sidecar::ca_client::{self, CaEndpoint};
use rcgen::{CertificateParams, KeyPair};
use rustls_pki_types::CertificateDer;
use rustls_pki_types::pem::PemObject;

#[derive(Debug, Parser)]
#[command(
    name = "local-mesh",
    about = "Run the meshid local mesh demo on loopback"
)]
struct Args {
    /// Run every step once, print `N passed, M failed`, and exit (0 only if all passed).
    #[arg(long)]
    check: bool,
    /// Certificate lifetime to request (e.g. 30s to watch renewals once sidecars run).
    #[arg(long, default_value = "1h")]
    ttl: String,
    /// Directory holding meshid-ca (default: next to this program, built if missing).
    #[arg(long)]
    bin_dir: Option<PathBuf>,
}

/// Kills and reaps the child on drop, so Ctrl-C or a failed step never leaves a process behind.
struct Guard(Child);

impl Drop for Guard {
    fn drop(&mut self) {
        let _ = Command::new("kill")
            .args(["-TERM", &self.0.id().to_string()])
            .status();
        let deadline = Instant::now() + Duration::from_secs(5);
        while Instant::now() < deadline {
            if let Ok(Some(_)) = self.0.try_wait() {
                return;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

#[derive(Default)]
struct Tally {
    passed: u32,
    failed: u32,
}

impl Tally {
    fn step(&mut self, name: &str, result: Result<String>) {
        match result {
            Ok(detail) => {
                self.passed += 1;
                println!("  ok    {name}: {detail}");
            }
            Err(e) => {
                self.failed += 1;
                println!("  FAIL  {name}: {e:#}");
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
    if !dir.join("meshid-ca").exists() {
        let release = dir.ends_with("release");
        let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
        let mut cmd = Command::new(cargo);
        cmd.args(["build", "-p", "meshid-ca", "--bin", "meshid-ca"]);
        if release {
            cmd.arg("--release");
        }
        println!("building meshid-ca ...");
        if !cmd.status().context("running cargo build")?.success() {
            bail!("cargo build of meshid-ca failed");
        }
    }
    Ok(dir)
}

fn free_port() -> Result<u16> {
    Ok(std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port())
}

fn run_ok(cmd: &mut Command) -> Result<String> {
    let out = cmd.output().context("spawning")?;
    if !out.status.success() {
        bail!("{}", String::from_utf8_lossy(&out.stderr).trim());
    }
    Ok(String::from_utf8_lossy(&out.stdout).trim().to_owned())
}

fn wait_ready(admin: &str, timeout: Duration) -> Result<()> {
    use std::io::{Read, Write};
    let deadline = Instant::now() + timeout;
    while Instant::now() < deadline {
        if let Ok(mut s) = std::net::TcpStream::connect(admin) {
            let _ = write!(
                s,
                "GET /readyz HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
            );
            let mut body = String::new();
            let _ = s.read_to_string(&mut body);
            if body.starts_with("HTTP/1.1 200") {
                return Ok(());
            }
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    bail!("not ready after {timeout:?}")
}

async fn get_certificate(
    endpoint: &CaEndpoint,
    token: &str,
    ttl: Duration,
) -> Result<(String, i64, String)> {
    // The key lives only in this process's memory, as a sidecar's does.
    let key = KeyPair::generate()?;
    let csr = CertificateParams::default().serialize_request(&key)?;
    let mut client = ca_client::connect(endpoint, None).await?;
    let resp = client
        .issue(IssueRequest {
            csr: csr.der().to_vec(),
            credential: Some(Credential::JoinToken(token.to_owned())),
            ttl_seconds: u32::try_from(ttl.as_secs()).unwrap_or(u32::MAX),
        })
        .await
        .map_err(|s| anyhow::anyhow!("{:?}: {}", s.code(), s.message()))?
        .into_inner();
    let leaf = resp.cert_chain.first().context("empty chain")?;
    let info = meshid_proto::cert_identity_from_der(leaf)?;
    if info.id.as_str() != resp.spiffe_id {
        bail!(
            "certificate says {} but the CA said {}",
            info.id,
            resp.spiffe_id
        );
    }
    Ok((resp.spiffe_id, resp.not_after_unix, info.serial_hex))
}

async fn demo(args: &Args, work: &Path, tally: &mut Tally) -> Result<Option<Guard>> {
    let ttl = meshid_proto::parse_duration(&args.ttl).map_err(anyhow::Error::msg)?;
    let bins = bin_dir(args)?;
    let ca_bin = bins.join("meshid-ca");
    let ca_dir = work.join("ca");
    let ca_dir_s = ca_dir.to_string_lossy().into_owned();

    println!("\n== certificate authority");
    tally.step(
        "meshid-ca init",
        run_ok(Command::new(&ca_bin).args(["init", "--dir", &ca_dir_s]))
            .map(|out| out.lines().next().unwrap_or_default().to_owned()),
    );
    let mut tokens = Vec::new();
    for id in [
        "spiffe://cluster.local/ns/demo/sa/frontend",
        "spiffe://cluster.local/ns/demo/sa/backend",
    ] {
        let token = run_ok(Command::new(&ca_bin).args([
            "token", "create", "--dir", &ca_dir_s, "--id", id, "--ttl", "10m",
        ]));
        tally.step(
            &format!("join token for {id}"),
            token
                .as_ref()
                .map(|_| "created (shown once, stored hashed)".to_owned())
                .map_err(|e| anyhow::anyhow!("{e:#}")),
        );
        if let Ok(t) = token {
            tokens.push((id, t));
        }
    }

    let grpc = format!("127.0.0.1:{}", free_port()?);
    let admin = format!("127.0.0.1:{}", free_port()?);
    let child = Command::new(&ca_bin)
        .args([
            "serve",
            "--dir",
            &ca_dir_s,
            "--listen",
            &grpc,
            "--admin-listen",
            &admin,
            "--max-ttl",
            "24h",
        ])
        .stdin(Stdio::null())
        .stderr(std::fs::File::create(work.join("ca.log")).context("creating ca.log")?)
        .spawn()
        .context("starting meshid-ca serve")?;
    let guard = Guard(child);
    tally.step(
        "meshid-ca serve",
        wait_ready(&admin, Duration::from_secs(10))
            .map(|()| format!("gRPC on {grpc}, admin on {admin}")),
    );

    let bundle_pem = std::fs::read(ca_dir.join("bundle.pem"))?;
    let roots: Vec<CertificateDer<'static>> =
        CertificateDer::pem_slice_iter(&bundle_pem).collect::<Result<_, _>>()?;
    let endpoint = CaEndpoint {
        addr: grpc.clone(),
        server_name: Some("localhost".into()),
        roots,
    };

    println!("\n== workloads get their identities");
    for (id, token) in &tokens {
        let got = get_certificate(&endpoint, token, ttl).await;
        tally.step(
            &format!("certificate for {id}"),
            got.and_then(|(got_id, not_after, serial)| {
                if got_id != *id {
                    bail!("got {got_id}");
                }
                let left = not_after - unix_now();
                Ok(format!("issued, serial {serial}, expires in {left}s"))
            }),
        );
        let reuse = get_certificate(&endpoint, token, ttl).await;
        tally.step(
            "the same join token again",
            match reuse {
                Ok(_) => Err(anyhow::anyhow!("a used join token was accepted")),
                Err(e) => Ok(format!("refused ({e:#})")),
            },
        );
    }
    let bundle = async {
        let mut c = ca_client::connect(&endpoint, None).await?;
        let b = c
            .get_trust_bundle(GetTrustBundleRequest {})
            .await?
            .into_inner();
        Ok::<_, anyhow::Error>(format!(
            "trust domain {}, {} root(s), version {}",
            b.trust_domain,
            b.roots.len(),
            b.version
        ))
    }
    .await;
    tally.step("trust bundle", bundle);

    println!("\n== where to look");
    println!("  CA metrics:  http://{admin}/metrics");
    println!("  CA health:   http://{admin}/healthz");
    println!("  CA files:    {}", ca_dir.display());
    println!(
        "  CA log:      {} (audit events included)",
        work.join("ca.log").display()
    );
    Ok(Some(guard))
}

fn unix_now() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs() as i64)
        .unwrap_or(0)
}

#[tokio::main]
async fn main() -> ExitCode {
    let args = Args::parse();
    let work = match tempfile_dir() {
        Ok(w) => w,
        Err(e) => {
            eprintln!("local-mesh: {e:#}");
            return ExitCode::FAILURE;
        }
    };
    println!(
        "meshid local mesh (loopback only), working in {}",
        work.display()
    );
    let mut tally = Tally::default();
    let guard = match demo(&args, &work, &mut tally).await {
        Ok(g) => g,
        Err(e) => {
            tally.step("demo setup", Err(e));
            None
        }
    };
    if !args.check && tally.failed == 0 {
        println!("\nrunning; press Ctrl-C to stop");
        let _ = tokio::signal::ctrl_c().await;
        println!("\nstopping");
    }
    drop(guard);
    let _ = std::fs::remove_dir_all(&work);
    println!("\n{} passed, {} failed", tally.passed, tally.failed);
    if tally.failed == 0 {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    }
}

fn tempfile_dir() -> Result<PathBuf> {
    let dir = std::env::temp_dir().join(format!("meshid-local-mesh-{}", std::process::id()));
    std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
    Ok(dir)
}
