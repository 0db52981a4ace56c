//! A real `meshid-ca` for the CA benchmarks: initialised in a work directory, serving with a fake
//! cluster's JWKS, rate limits out of the way, pinned to one CPU when `taskset` is there.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Duration;

use anyhow::{Result, bail};
use meshid_proto::ca::v1::{IssueRequest, issue_request::Credential};
use meshid_sidecar::creds::ca_client;
use meshid_sidecar::settings::CaEndpoint;
use meshid_tests::fake_cluster::FakeCluster;
use meshid_tests::pki::WorkloadKey;
use meshid_tests::process::{Proc, free_addr, wait_http_ok};
use rustls_pki_types::CertificateDer;
use rustls_pki_types::pem::PemObject;

/// A running benchmark CA.
pub struct BenchCa {
    pub proc: Proc,
    pub dir: PathBuf,
    pub admin: SocketAddr,
    pub cluster: FakeCluster,
    /// How clients reach and trust it.
    pub endpoint: CaEndpoint,
}

/// Whether a tool runs here.
pub fn have(tool: &str) -> bool {
    Command::new(tool).arg("--version").output().is_ok()
}

/// `meshid-ca init` in `work/ca`, then `serve` on CPU `cpu` with `extra` flags, ready when it returns.
pub fn start(ca_bin: &Path, work: &Path, cpu: usize, extra: &[&str]) -> Result<BenchCa> {
    let dir = work.join("ca");
    let st = Command::new(ca_bin)
        .args(["init", "--dir"])
        .arg(&dir)
        .stdout(Stdio::null())
        .status()?;
    if !st.success() {
        bail!("meshid-ca init failed");
    }
    let cluster = FakeCluster::new();
    let jwks = work.join("jwks.json");
    cluster.write_jwks(&jwks);

    let grpc = free_addr("127.0.0.1");
    let admin = free_addr("127.0.0.1");
    let mut cmd = if have("taskset") {
        let mut c = Command::new("taskset");
        c.args(["-c", &cpu.to_string()]).arg(ca_bin);
        c
    } else {
        Command::new(ca_bin)
    };
    cmd.args(["serve", "--dir"])
        .arg(&dir)
        .args(["--listen", &grpc.to_string()])
        .args(["--admin-listen", &admin.to_string()])
        .args(extra)
        .arg("--jwks")
        .arg(&jwks)
        .args(["--rate-limit", "1000000000", "--rate-burst", "1000000000"])
        .args(per_source_cap_off(ca_bin))
        .env("MESHID_LOG", "error");
    let proc = Proc::spawn("meshid-ca", &mut cmd);
    if !wait_http_ok(admin, "/readyz", Duration::from_secs(10)) {
        bail!("CA did not become ready");
    }
    let roots: Vec<CertificateDer<'static>> =
        CertificateDer::pem_slice_iter(&std::fs::read(dir.join("bundle.pem"))?)
            .collect::<Result<_, _>>()?;
    let endpoint = CaEndpoint {
        addr: grpc.to_string(),
        server_name: Some("localhost".into()),
        roots,
        pinned: Vec::new(),
    };
    Ok(BenchCa {
        proc,
        dir,
        admin,
        cluster,
        endpoint,
    })
}

/// Every simulated workload connects from 127.0.0.1, one source standing for many hosts: the CA's
/// per-source caps (connections, and calls whose request is still arriving) are lifted, those the
/// build has (the harness also measures older builds of the CA).
fn per_source_cap_off(ca_bin: &Path) -> Vec<&'static str> {
    let help = Command::new(ca_bin).args(["serve", "--help"]).output();
    let Ok(out) = help else {
        return Vec::new();
    };
    let help = String::from_utf8_lossy(&out.stdout);
    let mut args = Vec::new();
    if help.contains("--max-connections-per-source") {
        args.extend(["--max-connections-per-source", "1000000"]);
    }
    if help.contains("--max-arriving-requests") {
        args.extend(["--max-arriving-requests", "1000000"]);
    }
    args
}

/// A client that renews, as a sidecar does after its first certificate: one certificate issued with
/// a service-account token for `fleet/<name>`, then a connection presenting it (the renewal
/// credential: `Issue` calls on it need no token).
pub async fn renewal_client(
    endpoint: &CaEndpoint,
    cluster: &FakeCluster,
    name: &str,
) -> Result<ca_client::CaClient> {
    let first = WorkloadKey::new();
    let resp = ca_client::connect(endpoint, None)
        .await?
        .issue(IssueRequest {
            csr: first.csr.clone(),
            credential: Some(Credential::ServiceAccountToken(
                cluster.token("fleet", name),
            )),
            ttl_seconds: 0,
            app_svid: false,
        })
        .await?
        .into_inner();
    let chain = resp
        .cert_chain
        .into_iter()
        .map(CertificateDer::from)
        .collect();
    Ok(ca_client::connect(endpoint, Some((chain, first.private_key_der()))).await?)
}
