//! Scenario `floods`: connection floods and slow clients at ten times the connection limit on every
//! listener (sidecar inbound, outbound and admin; CA gRPC and admin; the injector's webhook), one
//! listener at a time, while allowed traffic flows. Half of the flood connects and sends nothing; the
//! other half dribbles a byte every 250 ms (a TLS ClientHello on TLS listeners, an HTTP request head
//! that never ends on plaintext HTTP ones). Every flood connection the server closes is reopened,
//! from 32 source addresses (8 in smoke; 127.0.1.x) while the allowed clients use 127.0.0.1. Measured per
//! listener: the attacked process's peak RSS, allowed traffic's success rate and p99 on connections
//! opened before the flood and on new ones, and when the flood's connections were closed. Last, the
//! CA and the injector are flooded from one host, whose per-source limit must leave every other
//! client served.

use std::net::{IpAddr, SocketAddr};
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use meshid_proto::ca::v1::{IssueRequest, issue_request::Credential};
use meshid_tests::pki::WorkloadKey;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use super::attack::{self, Allowed, Attack, Flood, FloodLog, Req, RequestFn, RssSampler};
use super::mesh::{
    CaProc, SidecarProc, file_mode_args, inbound_args, outbound_args, policy_yaml, start_app,
};
use super::traffic::{Outcome, Rec, Traffic};
use super::{Env, ScenarioReport, admin_get, admin_metric, poll_until};
use crate::harness::pki::{BenchPki, CLIENT_ID, SERVER_ID};
use crate::harness::{Guard, free_addr};
use crate::tlsconf::{TlsOptions, client_config};

/// The TLS handshake timeout given to the sidecars and the CA.
const HANDSHAKE: Duration = Duration::from_secs(2);
/// The sidecars' and the CA's `--idle-timeout` (a sidecar waits at most this long for a request
/// head).
const IDLE: Duration = Duration::from_secs(3);
/// The injector's `--header-read-timeout` (its TLS handshake and each request head).
const HEADER_READ: Duration = Duration::from_secs(2);
/// The admin servers' request-head timeout (`meshid_runtime::admin`, not a flag).
const ADMIN_HEAD: Duration = Duration::from_secs(5);
/// The admin servers' connection cap (not a flag).
const ADMIN_CAP: usize = meshid_runtime::admin::MAX_CONNECTIONS;
/// How far past its timeout a flood connection may be closed on a busy shared machine.
fn slack(timeout: Duration) -> Duration {
    Duration::from_secs(3) + timeout / 2
}
/// A connection the server closed sooner than this was refused at accept.
const AT_ONCE: Duration = Duration::from_millis(500);
/// The RSS a held connection may cost at most (the bound's slope), and the bound's constant part.
const PER_CONN_KIB: u64 = 256;
const SLACK_KIB: u64 = 32 * 1024;
const SAN: &str = "meshid-injector.meshid.svc";

pub struct Params {
    /// Every listener's connection limit; the flood opens ten times as many connections.
    pub limit: usize,
    /// How many addresses the many-host floods come from. Fewer than the limit: a flood from more
    /// addresses than the cap has slots ties every address at one unproven connection, and a new
    /// client whose address holds no proven connection then lasts only as long as the flood takes
    /// to cycle the cap (the limit over the flood's reconnect rate).
    pub sources: u8,
    /// Flood connections against an admin port (whose cap is
    /// `meshid_runtime::admin::MAX_CONNECTIONS`).
    pub admin_flood: usize,
    /// Allowed traffic alone before each flood.
    pub baseline: Duration,
    /// The flood lasts at least this, and at least its listener's timeout plus 1.5 s (in smoke,
    /// only where it is held below the cap).
    pub flood: Duration,
    pub smoke: bool,
}

impl Params {
    pub fn new(smoke: bool) -> Self {
        if smoke {
            Self {
                limit: 20,
                sources: 8,
                admin_flood: 2 * ADMIN_CAP,
                baseline: Duration::from_secs(1),
                flood: Duration::from_secs(3),
                smoke,
            }
        } else {
            Self {
                limit: 100,
                sources: 32,
                admin_flood: 10 * ADMIN_CAP,
                baseline: Duration::from_secs(3),
                flood: Duration::from_secs(15),
                smoke,
            }
        }
    }
}

pub async fn run(env: &Env, p: &Params, mut r: ScenarioReport) -> (ScenarioReport, Result<()>) {
    let l = p.limit;
    r.setup = format!(
        "One listener at a time, 10 x its connection limit in flood connections: {flood} from {n} \
         source addresses (127.0.1.1-{n}), half connecting and sending nothing, half sending a byte \
         every 250 ms (a real TLS ClientHello on TLS listeners, an HTTP request head that never \
         ends on plaintext ones), each reopened 50 ms after the server closes it (500 ms after a \
         refusal at accept), for at least {f:.0} s (and at least the listener's timeout plus \
         1.5 s). Limits: sidecars (file mode, one worker thread) --max-connections {l} \
         --handshake-timeout 2s --idle-timeout 3s; CA --max-connections {l} \
         --max-connections-per-source {ps} --handshake-timeout 2s --idle-timeout 3s; injector \
         --max-connections {l} --max-connections-per-source {ps} --header-read-timeout 2s; the \
         admin servers' fixed cap of {cap} connections (their flood is {af} connections), 5 s \
         request-head timeout and one request per connection. At a cap, a newcomer displaces the \
         oldest connection not yet proven (no authenticated handshake, call or request head yet; \
         an admin connection is never proven) of the source holding the most of them. Allowed traffic from 127.0.0.1 throughout: 4 HTTP/1.1 keep-alive \
         connections through the sidecar pair (outbound -> mTLS -> inbound -> bench-app, 10 ms \
         pause), 2 CA clients renewing on their own mTLS connection (50 ms pause); and per flooded \
         listener, one client opening a new connection for each request (50 ms pause): an mTLS GET \
         to the inbound listener, a plain GET to the outbound one, a /metrics scrape on an admin \
         port, a first certificate (Issue with a service-account token) from the CA, an \
         AdmissionReview POST to the injector. Allowed traffic is measured {b:.0} s before and \
         during each flood; afterwards, a new-connection request must succeed again. Last, the CA \
         and the injector are flooded from one host (127.0.1.1 alone, 10 x its \
         --max-connections-per-source of {ps}): the others' new connections must all be served.",
        flood = 10 * l,
        n = p.sources,
        cap = ADMIN_CAP,
        af = p.admin_flood,
        f = p.flood.as_secs_f64(),
        ps = per_source(l),
        b = p.baseline.as_secs_f64(),
    );
    let result = scenario(env, p, &mut r).await;
    (r, result)
}

fn per_source(limit: usize) -> usize {
    (limit / 4).max(4)
}

/// One listener under attack.
struct Target {
    name: &'static str,
    addr: SocketAddr,
    pid: u32,
    /// The timeout that must close an accepted flood connection, and where it comes from.
    timeout: Duration,
    timeout_doc: &'static str,
    slow: Attack,
    /// Connections the process may hold at once (its limit).
    held: usize,
    /// An allowed request on a new connection.
    fresh: RequestFn,
    /// Where the flood comes from, and how many connections it keeps open.
    sources: Vec<IpAddr>,
    slots: usize,
    /// A counter (index into `counters`) the flood must move: the limit it is there to meet.
    must_count: Option<usize>,
    /// Which long-lived allowed traffic crosses this process.
    kept: Kept,
    /// The process's admin port and the metrics saying what it refused and closed.
    admin: SocketAddr,
    counters: Vec<Counter>,
}

/// A counter on the attacked process's admin port: (what it says, metric name, labels).
type Counter = (
    &'static str,
    &'static str,
    Vec<(&'static str, &'static str)>,
);

#[derive(Clone, Copy, PartialEq, Eq)]
enum Kept {
    DataPlane,
    Renewals,
    None,
}

async fn scenario(env: &Env, p: &Params, r: &mut ScenarioReport) -> Result<()> {
    let work = env.ctx.dir("floods")?;
    let l = p.limit.to_string();
    let pki = BenchPki::new()?;
    let (_app, app) = start_app(env, &work, 0)?;
    let (inb, local) = (free_addr(), free_addr());
    let policy = work.join("policy.yaml");
    std::fs::write(&policy, policy_yaml(&[inb.port()], CLIENT_ID))?;
    let limits: Vec<String> = [
        "--max-connections",
        &l,
        "--handshake-timeout",
        "2s",
        "--idle-timeout",
        "3s",
    ]
    .map(String::from)
    .to_vec();
    let mut args = inbound_args(inb, app, &policy);
    args.extend(file_mode_args(
        &pki.server.cert,
        &pki.server.key,
        &pki.bundle,
    ));
    args.extend(limits.clone());
    let mut inbound = SidecarProc::start(env, "inbound", &work, args, None)?;
    let mut args = outbound_args(local, inb, SERVER_ID);
    args.extend(file_mode_args(
        &pki.client.cert,
        &pki.client.key,
        &pki.bundle,
    ));
    args.extend(limits);
    let mut outbound = SidecarProc::start(env, "outbound", &work, args, None)?;
    inbound.wait_ready(Duration::from_secs(15)).await?;
    outbound.wait_ready(Duration::from_secs(15)).await?;

    let ps = per_source(p.limit).to_string();
    let mut ca = CaProc::init(
        env,
        &work,
        &[
            "--max-connections",
            &l,
            "--max-connections-per-source",
            &ps,
            "--handshake-timeout",
            "2s",
            "--idle-timeout",
            "3s",
        ],
    )?;
    let webhook = work.join("webhook");
    env.ctx.output(
        std::process::Command::new(env.ctx.bin("meshid-ca"))
            .args(["webhook-cert", "--dir"])
            .arg(&ca.dir)
            .args(["--dns", SAN, "--out-dir"])
            .arg(&webhook),
    )?;
    ca.serve(env).await?;
    let (injector, inj_addr, inj_admin) = start_injector(env, &work, &webhook, &ca, p.limit)?;
    let ca_roots = ca.endpoint()?.roots;
    poll_until(Duration::from_secs(15), Duration::from_millis(100), || {
        let roots = ca_roots.clone();
        async move { review(inj_addr, &roots).await.is_ok() }
    })
    .await
    .with_context(|| format!("the injector did not answer: {}", injector.log_tail()))?;

    // Long-lived allowed traffic, for the whole scenario.
    let data_plane = Traffic::start(local, 4, Duration::from_millis(10));
    let endpoint = ca.endpoint()?;
    let mut renewers = Vec::new();
    for i in 0..2 {
        let client =
            crate::benchca::renewal_client(&endpoint, &ca.cluster, &format!("floods-{i}")).await?;
        renewers.push(client);
    }
    let renewals = {
        let next = Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let f: RequestFn = Arc::new(move || {
            let i = next.fetch_add(1, std::sync::atomic::Ordering::Relaxed) % renewers.len();
            let mut client = renewers[i].clone();
            Box::pin(async move {
                client
                    .issue(IssueRequest {
                        csr: WorkloadKey::new().csr,
                        credential: None,
                        ttl_seconds: 0,
                        app_svid: false,
                    })
                    .await?;
                Ok(())
            })
        });
        Allowed::start(f, 2, Duration::from_millis(50))
    };

    let hello = Arc::new(attack::client_hello()?);
    let slow_tls = Attack::Slow {
        bytes: hello,
        every: Duration::from_millis(250),
    };
    let slow_http = |path: &str| Attack::Slow {
        bytes: Arc::new(attack::endless_head(path)),
        every: Duration::from_millis(250),
    };
    let flood_size = 10 * p.limit;

    let inbound_client = client_config(
        &TlsOptions {
            cert: Some(pki.client.cert.clone()),
            key: Some(pki.client.key.clone()),
            bundle: Some(pki.bundle.clone()),
            expect_id: Some(SERVER_ID.into()),
            dangerous_skip_verify: false,
            groups: String::new(),
        },
        b"http/1.1",
    )?;
    let fresh_inbound: RequestFn = Arc::new(move || {
        let config = inbound_client.clone();
        Box::pin(async move {
            let tcp = tokio::net::TcpStream::connect(inb).await?;
            let name = rustls_pki_types::ServerName::try_from("sidecar.invalid")?;
            let tls = tokio_rustls::TlsConnector::from(config)
                .connect(name, tcp)
                .await?;
            expect_200(tls).await
        })
    });
    let fresh_outbound: RequestFn = Arc::new(move || {
        Box::pin(async move { expect_200(tokio::net::TcpStream::connect(local).await?).await })
    });
    let scrape = |admin: SocketAddr| -> RequestFn {
        Arc::new(move || {
            Box::pin(async move {
                match admin_get(admin, "/metrics").await? {
                    (200, _) => Ok(()),
                    (code, _) => bail!("answered {code}"),
                }
            })
        })
    };
    let fresh_issue: RequestFn = {
        let endpoint = endpoint.clone();
        let token = ca.cluster.token("floods", "newcomer");
        Arc::new(move || {
            let (endpoint, token) = (endpoint.clone(), token.clone());
            Box::pin(async move {
                let mut client = meshid_sidecar::creds::ca_client::connect(&endpoint, None).await?;
                client
                    .issue(IssueRequest {
                        csr: WorkloadKey::new().csr,
                        credential: Some(Credential::ServiceAccountToken(token)),
                        ttl_seconds: 0,
                        app_svid: false,
                    })
                    .await?;
                Ok(())
            })
        })
    };
    let fresh_review: RequestFn = {
        let roots = ca_roots.clone();
        Arc::new(move || {
            let roots = roots.clone();
            Box::pin(async move { review(inj_addr, &roots).await })
        })
    };
    let sidecar_counters = |direction: &'static str| {
        vec![
            (
                "unproven connections displaced at the limit (meshid_sidecar_connections_refused_total)",
                "meshid_sidecar_connections_refused_total",
                vec![("direction", direction), ("reason", "displaced")],
            ),
            (
                "refused at the limit (meshid_sidecar_connections_refused_total)",
                "meshid_sidecar_connections_refused_total",
                vec![("direction", direction), ("reason", "max_connections")],
            ),
            (
                "handshakes timed out (meshid_sidecar_tls_handshake_failures_total)",
                "meshid_sidecar_tls_handshake_failures_total",
                vec![("direction", direction), ("reason", "timeout")],
            ),
        ]
    };
    let ca_counters = vec![
        (
            "unproven connections displaced at --max-connections",
            "meshid_ca_connections_refused_total",
            vec![("reason", "displaced")],
        ),
        (
            "refused at --max-connections (meshid_ca_connections_refused_total)",
            "meshid_ca_connections_refused_total",
            vec![("reason", "max_connections")],
        ),
        (
            "refused at --max-connections-per-source",
            "meshid_ca_connections_refused_total",
            vec![("reason", "max_connections_per_source")],
        ),
        (
            "handshakes timed out (meshid_ca_tls_handshake_failures_total)",
            "meshid_ca_tls_handshake_failures_total",
            vec![("reason", "timeout")],
        ),
    ];
    let many = attack::sources(p.sources);
    let one_host = attack::sources(1);
    let host_share = per_source(p.limit);
    let mut targets = vec![
        Target {
            name: "sidecar inbound",
            addr: inb,
            pid: inbound.pid(),
            timeout: HANDSHAKE,
            timeout_doc: "--handshake-timeout",
            slow: slow_tls.clone(),
            held: p.limit,
            fresh: fresh_inbound,
            kept: Kept::DataPlane,
            sources: many.clone(),
            slots: flood_size,
            must_count: Some(0),
            admin: inbound.admin,
            counters: sidecar_counters("inbound"),
        },
        Target {
            name: "sidecar outbound",
            addr: local,
            pid: outbound.pid(),
            timeout: IDLE,
            timeout_doc: "--idle-timeout (the wait for a request head)",
            slow: slow_http("/"),
            held: p.limit,
            fresh: fresh_outbound,
            kept: Kept::DataPlane,
            sources: many.clone(),
            slots: flood_size,
            must_count: Some(0),
            admin: outbound.admin,
            counters: sidecar_counters("outbound"),
        },
        Target {
            name: "sidecar admin",
            addr: inbound.admin,
            pid: inbound.pid(),
            timeout: ADMIN_HEAD,
            timeout_doc: "the admin server's 5 s request-head timeout",
            slow: slow_http("/metrics"),
            held: ADMIN_CAP,
            fresh: scrape(inbound.admin),
            kept: Kept::DataPlane,
            sources: many.clone(),
            slots: p.admin_flood,
            must_count: None,
            admin: inbound.admin,
            counters: Vec::new(),
        },
        Target {
            name: "CA gRPC",
            addr: ca.grpc,
            pid: ca.pid(),
            timeout: HANDSHAKE,
            timeout_doc: "--handshake-timeout",
            slow: slow_tls.clone(),
            held: p.limit,
            fresh: fresh_issue.clone(),
            kept: Kept::Renewals,
            sources: many.clone(),
            slots: flood_size,
            must_count: Some(0),
            admin: ca.admin,
            counters: ca_counters.clone(),
        },
        Target {
            name: "CA admin",
            addr: ca.admin,
            pid: ca.pid(),
            timeout: ADMIN_HEAD,
            timeout_doc: "the admin server's 5 s request-head timeout",
            slow: slow_http("/metrics"),
            held: ADMIN_CAP,
            fresh: scrape(ca.admin),
            kept: Kept::Renewals,
            sources: many.clone(),
            slots: p.admin_flood,
            must_count: None,
            admin: ca.admin,
            counters: Vec::new(),
        },
        Target {
            name: "injector",
            addr: inj_addr,
            pid: injector.pid(),
            timeout: HEADER_READ,
            timeout_doc: "--header-read-timeout",
            slow: slow_tls.clone(),
            held: p.limit,
            fresh: fresh_review.clone(),
            kept: Kept::None,
            sources: many.clone(),
            slots: flood_size,
            must_count: Some(0),
            admin: inj_admin,
            counters: vec![
                (
                    "unproven connections displaced at --max-connections",
                    "meshid_injector_connections_refused_total",
                    vec![("reason", "displaced")],
                ),
                (
                    "refused at --max-connections (meshid_injector_connections_refused_total)",
                    "meshid_injector_connections_refused_total",
                    vec![("reason", "max_connections")],
                ),
                (
                    "refused at --max-connections-per-source",
                    "meshid_injector_connections_refused_total",
                    vec![("reason", "max_connections_per_source")],
                ),
            ],
        },
    ];
    let injector_counters = targets[5].counters.clone();
    // The one-host floods meet the per-source limit (index 2 of both lists).
    // One flooding host against the listeners with a per-source limit: held to its share, it
    // leaves everyone else served, new connections included.
    targets.push(Target {
        name: "CA gRPC, one flooding host",
        addr: ca.grpc,
        pid: ca.pid(),
        timeout: HANDSHAKE,
        timeout_doc: "--handshake-timeout",
        slow: slow_tls.clone(),
        held: host_share,
        fresh: fresh_issue,
        kept: Kept::Renewals,
        sources: one_host.clone(),
        slots: 10 * host_share,
        must_count: Some(2),
        admin: ca.admin,
        counters: ca_counters,
    });
    targets.push(Target {
        name: "injector, one flooding host",
        addr: inj_addr,
        pid: injector.pid(),
        timeout: HEADER_READ,
        timeout_doc: "--header-read-timeout",
        slow: slow_tls,
        held: host_share,
        fresh: fresh_review,
        kept: Kept::None,
        sources: one_host,
        slots: 10 * host_share,
        must_count: Some(2),
        admin: inj_admin,
        counters: injector_counters,
    });
    for t in &targets {
        one_listener(r, p, t, &data_plane, &renewals).await?;
    }
    let recs = data_plane.stop().await;
    let _ = renewals.stop().await;
    let failed = recs.iter().filter(|x| x.outcome != Outcome::Ok).count();
    r.figure(
        "data-plane requests through the pair, whole scenario",
        recs.len() as f64,
        "",
    );
    r.figure("of which failed", failed as f64, "");
    r.notes.push(
        "Idle flood connections are timed from the attacker's side, from connect() to the server's \
         close. When a listener's accept queue overflows (the machine-wide ListenOverflows figure: \
         the flood reconnects hundreds of times a second), Linux drops the client's final ACK and \
         the connection is established for the client only, until a retransmitted SYN-ACK lets the \
         process accept it seconds later; such a connection outlives the timeout by the time it \
         spent in the kernel, and costs the process nothing meanwhile. So the timeout check is \
         judged on the slow clients, which send their first byte at once, and the idle connections \
         that lived past the timeout are counted as a figure."
            .into(),
    );
    r.notes.push(
        "At a listener's connection cap a newcomer is not refused while any connection is unproven \
         (meshid_runtime::admission): it displaces the oldest unproven connection of the source \
         holding the most of them. The flood's connections never prove themselves, so they \
         displace one another within milliseconds, while an allowed client's connection is \
         unproven only for its handshake or first request and comes from the source holding the \
         fewest: every allowed new connection is served (checked), as are connections opened \
         before the flood. The admin ports have no displacement counter; their check is that \
         probes are served and the flood's connections are closed at once."
            .into(),
    );
    drop(injector);
    Ok(())
}

/// Starts `meshid-injector` with the webhook certificate: (process, webhook address, admin address).
fn start_injector(
    env: &Env,
    work: &Path,
    webhook: &Path,
    ca: &CaProc,
    limit: usize,
) -> Result<(Guard, SocketAddr, SocketAddr)> {
    let (addr, admin) = (free_addr(), free_addr());
    let mut cmd = std::process::Command::new(env.ctx.bin("meshid-injector"));
    cmd.arg("--tls-cert")
        .arg(webhook.join("tls.crt"))
        .arg("--tls-key")
        .arg(webhook.join("tls.key"))
        .arg("--trust-bundle")
        .arg(ca.bundle())
        .args(["--listen", &addr.to_string()])
        .args(["--admin-listen", &admin.to_string()])
        .args(["--server-name", SAN])
        .args(["--sidecar-image", "registry.example/meshid/sidecar:0.1.0"])
        .args(["--ca-addr", &ca.grpc.to_string()])
        .args(["--max-connections", &limit.to_string()])
        .args([
            "--max-connections-per-source",
            &per_source(limit).to_string(),
        ])
        .args(["--header-read-timeout", "2s"])
        .env("MESHID_LOG", "warn");
    let g = env
        .ctx
        .spawn("meshid-injector", &mut cmd, &work.join("injector.log"))?;
    Ok((g, addr, admin))
}

/// `GET /` on `io`, which must answer 200.
async fn expect_200<IO>(mut io: IO) -> Result<()>
where
    IO: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin,
{
    io.write_all(b"GET / HTTP/1.1\r\nHost: floods\r\nConnection: close\r\n\r\n")
        .await?;
    let mut out = Vec::new();
    io.read_to_end(&mut out).await?;
    if out.starts_with(b"HTTP/1.1 200") {
        Ok(())
    } else {
        bail!(
            "answered {:?}",
            String::from_utf8_lossy(&out[..out.len().min(40)])
        )
    }
}

/// A pod CREATE review on a new TLS connection; the injector must allow it with a patch.
async fn review(
    addr: SocketAddr,
    roots: &[rustls_pki_types::CertificateDer<'static>],
) -> Result<()> {
    let body = serde_json::json!({
        "apiVersion": "admission.k8s.io/v1", "kind": "AdmissionReview",
        "request": {"uid": "floods", "namespace": "shop", "operation": "CREATE",
            "kind": {"group": "", "version": "v1", "kind": "Pod"},
            "resource": {"group": "", "version": "v1", "resource": "pods"},
            "object": {
                "apiVersion": "v1", "kind": "Pod",
                "metadata": {"generateName": "web-", "namespace": "shop",
                    "annotations": {"meshid.io/inject": "enabled", "meshid.io/inbound": "8080=http"}},
                "spec": {"serviceAccountName": "web", "containers": [{"name": "app", "image": "web:1"}]},
            }}
    })
    .to_string();
    let mut tls = meshid_tests::mesh::tls_connect(addr, roots, SAN).await?;
    tls.write_all(
        format!(
            "POST /inject HTTP/1.1\r\nHost: {SAN}\r\nContent-Type: application/json\r\n\
             Content-Length: {}\r\nConnection: close\r\n\r\n{body}",
            body.len()
        )
        .as_bytes(),
    )
    .await?;
    let mut out = Vec::new();
    let _ = tls.read_to_end(&mut out).await;
    let text = String::from_utf8_lossy(&out);
    if text.starts_with("HTTP/1.1 200") && text.contains("\"patch\"") {
        Ok(())
    } else {
        bail!("answered {:?}", &text[..text.len().min(60)])
    }
}

/// The data plane's records as allowed requests.
fn as_reqs(recs: &[Rec]) -> Vec<Req> {
    recs.iter()
        .map(|x| Req {
            sent: x.sent,
            done: x.done,
            error: (x.outcome != Outcome::Ok).then(|| x.outcome.label()),
        })
        .collect()
}

async fn one_listener(
    r: &mut ScenarioReport,
    p: &Params,
    t: &Target,
    data_plane: &Traffic,
    renewals: &Allowed,
) -> Result<()> {
    let name = t.name;
    println!("  flood: {name} ({})", t.addr);
    let fresh = Allowed::start(t.fresh.clone(), 1, Duration::from_millis(50));
    let t_base = Instant::now();
    tokio::time::sleep(p.baseline).await;
    let (rss0, _) = attack::rss_kib(t.pid).context("the process is gone before the flood")?;
    let mut before = Vec::new();
    for (_, metric, labels) in &t.counters {
        before.push(admin_metric(t.admin, metric, labels).await);
    }
    let overflows0 = attack::listen_overflows();
    let sampler = RssSampler::start(t.pid);
    let t_flood = Instant::now();
    let slots = t.slots;
    let idle = Flood::start(t.addr, slots / 2, &t.sources, Attack::Idle);
    let slow = Flood::start(t.addr, slots - slots / 2, &t.sources, t.slow.clone());
    // A flood held below the cap (one host at its per-source share) must outlast its timeout to
    // show it; at a cap the flood displaces itself within milliseconds and the timeout never comes.
    let at_cap = t.counters.is_empty()
        || t.must_count
            .is_some_and(|i| t.counters[i].2.contains(&("reason", "displaced")));
    let length = if at_cap && p.smoke {
        p.flood
    } else {
        p.flood.max(t.timeout + Duration::from_millis(1500))
    };
    tokio::time::sleep(length).await;
    let t_end = Instant::now();
    let (idle, slow) = (idle.stop().await, slow.stop().await);
    let peak = sampler.stop().await;
    let overflows = attack::listen_overflows().saturating_sub(overflows0);
    let alive = attack::rss_kib(t.pid).is_some();
    // Serves again: a new-connection request sent after the flood ended succeeds.
    let back = poll_until(Duration::from_secs(15), Duration::from_millis(50), || {
        let recs = fresh.snapshot();
        async move { recs.iter().any(|x| x.sent >= t_end && x.error.is_none()) }
    })
    .await;
    let rss_after = attack::rss_kib(t.pid).map_or(0, |(now, _)| now);
    let fresh_recs = fresh.stop().await;
    let mut after = Vec::new();
    for (_, metric, labels) in &t.counters {
        after.push(admin_metric(t.admin, metric, labels).await);
    }

    // Figures.
    let base = attack::window(&fresh_recs, t_base, t_flood);
    let during = attack::window(&fresh_recs, t_flood, t_end);
    r.figure(&format!("{name}: flood length"), length.as_secs_f64(), "s");
    let opened = idle.lives.len() + slow.lives.len();
    r.figure(
        &format!("{name}: flood connections opened"),
        opened as f64,
        "",
    );
    r.figure(
        &format!("{name}: flood connections open at once (peak, attacker's count)"),
        (idle.peak_open + slow.peak_open) as f64,
        "",
    );
    let at_once = idle.closed_at_once(AT_ONCE) + slow.closed_at_once(AT_ONCE);
    r.figure(
        &format!(
            "{name}: flood connections closed by the server within 0.5 s (refused or displaced)"
        ),
        at_once as f64,
        "",
    );
    let timed_out = |log: &FloodLog| {
        log.lives
            .iter()
            .filter(|x| x.by_server && x.lived >= AT_ONCE)
            .count()
    };
    r.figure(
        &format!("{name}: idle flood connections closed later (a timeout)"),
        timed_out(&idle) as f64,
        "",
    );
    r.figure(
        &format!("{name}: slow flood connections closed later (a timeout)"),
        timed_out(&slow) as f64,
        "",
    );
    r.figure(
        &format!("{name}: longest-lived idle flood connection"),
        idle.longest().as_secs_f64(),
        "s",
    );
    r.figure(
        &format!("{name}: longest-lived slow flood connection"),
        slow.longest().as_secs_f64(),
        "s",
    );
    if idle.connect_failed + slow.connect_failed > 0 {
        r.figure(
            &format!("{name}: flood connects that failed or hung 2 s (backlog full)"),
            (idle.connect_failed + slow.connect_failed) as f64,
            "",
        );
    }
    for (i, (what, _, _)) in t.counters.iter().enumerate() {
        r.figure(&format!("{name}: {what}"), after[i] - before[i], "");
    }
    r.figure(
        &format!(
            "{name}: accept-queue overflows during the flood (the machine's TcpExt ListenOverflows)"
        ),
        overflows as f64,
        "",
    );
    r.figure(&format!("{name}: RSS before the flood"), mib(rss0), "MiB");
    r.figure(
        &format!("{name}: peak RSS during the flood"),
        mib(peak),
        "MiB",
    );
    r.figure(
        &format!("{name}: RSS once served again after the flood"),
        mib(rss_after),
        "MiB",
    );
    r.figure(
        &format!("{name}: new-connection allowed requests succeeded, before the flood"),
        base.success_pct(),
        "%",
    );
    r.figure(
        &format!("{name}: new-connection allowed requests succeeded, during the flood"),
        during.success_pct(),
        "%",
    );
    r.figure(
        &format!("{name}: new-connection allowed requests sent during the flood"),
        during.total as f64,
        "",
    );
    if let Some(p99) = base.p99 {
        r.figure(
            &format!("{name}: new-connection allowed p99, before the flood"),
            p99 * 1000.0,
            "ms",
        );
    }
    if let Some(p99) = during.p99 {
        r.figure(
            &format!("{name}: new-connection allowed p99, during the flood (succeeded ones)"),
            p99 * 1000.0,
            "ms",
        );
    }
    let kept = match t.kept {
        Kept::DataPlane => Some((
            "requests through the sidecar pair",
            as_reqs(&data_plane.snapshot()),
        )),
        Kept::Renewals => Some(("renewals on open CA connections", renewals.snapshot())),
        Kept::None => None,
    };
    let kept_during = kept.as_ref().map(|(what, recs)| {
        let w = attack::window(recs, t_flood, t_end);
        let b = attack::window(recs, t_base, t_flood);
        r.figure(
            &format!("{name}: {what} succeeded during the flood"),
            w.success_pct(),
            "%",
        );
        if let (Some(pb), Some(pd)) = (b.p99, w.p99) {
            r.figure(
                &format!("{name}: {what}, p99 before the flood"),
                pb * 1000.0,
                "ms",
            );
            r.figure(
                &format!("{name}: {what}, p99 during the flood"),
                pd * 1000.0,
                "ms",
            );
        }
        (*what, w)
    });

    // Checks.
    r.check(
        &format!(
            "{name}: the process stays up and serves a new allowed connection after the flood"
        ),
        alive && back.is_some(),
        if !alive {
            "the process is gone".to_owned()
        } else {
            back.map_or(
                "no new-connection request succeeded within 15 s".into(),
                |d| {
                    format!(
                        "served again {:.2} s after the flood ended",
                        d.as_secs_f64()
                    )
                },
            )
        },
    );
    let bound = rss0 + t.held as u64 * PER_CONN_KIB + SLACK_KIB;
    r.check(
        &format!("{name}: peak RSS stays bounded"),
        peak > 0 && peak <= bound,
        format!(
            "peak {:.1} MiB; bound {:.1} MiB = {:.1} MiB before + {} connections it may hold at once x {PER_CONN_KIB} KiB + {} MiB",
            mib(peak),
            mib(bound),
            mib(rss0),
            t.held,
            SLACK_KIB / 1024
        ),
    );
    let limit = t.timeout + slack(t.timeout);
    let by_timeout = timed_out(&idle) + timed_out(&slow);
    // Judged on the slow clients: each sends its first byte at once, so it lives only while the
    // process holds it. An idle connection can sit in the kernel's accept queue (or, past it, be
    // established on the client's side only) before the process ever sees it; those are counted.
    // At a listener's cap the flood displaces itself long before any timeout; below it (one host
    // held to its per-source share) the timeout closes it. Either way no slow client outlives it.
    let displaced = t
        .must_count
        .filter(|&i| t.counters[i].2.contains(&("reason", "displaced")))
        .map_or(0.0, |i| after[i] - before[i]);
    let admin_closed_at_once = t.counters.is_empty() && at_once > 0;
    r.check(
        &format!(
            "{name}: flood connections are displaced or closed by {}",
            t.timeout_doc
        ),
        slow.longest() <= limit && (by_timeout > 0 || displaced > 0.0 || admin_closed_at_once),
        format!(
            "{} s timeout: {by_timeout} closed after living 0.5 s or more, {displaced} displaced, {at_once} closed within 0.5 s; the longest-lived slow client {:.2} s (allowed: {:.1} s with slack)",
            t.timeout.as_secs_f64(),
            slow.longest().as_secs_f64(),
            limit.as_secs_f64()
        ),
    );
    let queued = idle.lives.iter().filter(|x| x.lived > limit).count();
    r.figure(
        &format!(
            "{name}: idle flood connections alive past the timeout + slack (from the client's side)"
        ),
        queued as f64,
        "",
    );
    if let Some((what, w)) = kept_during {
        r.check(
            &format!("{name}: {what} keep being served during the flood"),
            w.total > 0 && w.ok == w.total,
            w.describe(),
        );
    }
    if let Some(i) = t.must_count {
        let (what, _, _) = &t.counters[i];
        let moved = after[i] - before[i];
        r.check(
            &format!("{name}: the flood meets the limit it is there for"),
            moved > 0.0,
            format!("{what}: {moved}"),
        );
    }
    r.check(
        &format!("{name}: every allowed request on a new connection is served during the flood"),
        during.total > 0 && during.ok == during.total,
        during.describe(),
    );
    Ok(())
}

fn mib(kib: u64) -> f64 {
    kib as f64 / 1024.0
}
