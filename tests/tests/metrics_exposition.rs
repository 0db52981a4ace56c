//! What the real binaries serve on `/metrics`: every family docs/metrics.md names (its tables are
//! parsed, so the doc and the code cannot drift apart) is there from the start, with `# HELP` and
//! `# TYPE`, in OpenMetrics and in Prometheus text 0.0.4, and nothing undocumented is; and after
//! traffic through a sidecar pair, promtool (Prometheus' own checker) finds nothing wrong with any
//! endpoint's 0.0.4 text (promtool 2.42 reads only that format), nor the Prometheus project's
//! Python client's strict OpenMetrics parser with any endpoint's OpenMetrics.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::BTreeSet;
use std::net::SocketAddr;
use std::path::Path;
use std::process::Command;
use std::time::Duration;

use meshid_runtime::http_client::{Call, send};
use meshid_tests::fake_cluster::FakeCluster;
use meshid_tests::mesh::TestPki;
use meshid_tests::process::{Proc, free_addr, http_get, wait_http_ok};
use meshid_tests::tools::workspace_bin;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

const A: &str = "spiffe://cluster.local/ns/shop/sa/frontend";
const B: &str = "spiffe://cluster.local/ns/shop/sa/backend";
const TEXT_004: &str = "text/plain;version=0.0.4";

/// The metric names docs/metrics.md lists, by prefix (`meshid_ca`, ...): the first column of every
/// table headed `metric` under a `## ... (`meshid_x_*`)` heading.
fn documented() -> Vec<(String, BTreeSet<String>)> {
    let doc = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/../docs/metrics.md"))
        .unwrap();
    let mut sections: Vec<(String, BTreeSet<String>)> = Vec::new();
    let mut metric_table = false;
    for line in doc.lines() {
        if let Some(heading) = line.strip_prefix("## ") {
            metric_table = false;
            if let Some(prefix) = heading.split('`').nth(1).and_then(|p| p.strip_suffix("_*")) {
                sections.push((prefix.to_owned(), BTreeSet::new()));
            }
            continue;
        }
        let Some(row) = line.strip_prefix('|') else {
            metric_table = false;
            continue;
        };
        let first = row.split('|').next().unwrap_or("").trim();
        if first == "metric" {
            metric_table = true;
        } else if metric_table
            && !first.starts_with("---")
            && let Some((prefix, names)) = sections.last_mut()
        {
            names.extend(
                first
                    .split('`')
                    .skip(1)
                    .step_by(2)
                    .map(|n| format!("{prefix}_{n}")),
            );
        }
    }
    sections.retain(|(_, names)| !names.is_empty());
    assert_eq!(
        sections.iter().map(|(p, _)| p.as_str()).collect::<Vec<_>>(),
        ["meshid_ca", "meshid_sidecar", "meshid_injector"],
        "docs/metrics.md's sections"
    );
    sections
}

/// `/metrics` of `addr`, with `Accept: accept` if given: (content type, body).
async fn scrape(addr: SocketAddr, accept: Option<&str>) -> (String, String) {
    let headers: Vec<(String, String)> = accept
        .map(|a| vec![("accept".to_owned(), a.to_owned())])
        .unwrap_or_default();
    let mut call = Call::get(addr, "/metrics");
    call.headers = &headers;
    let reply = send(&call).await.unwrap();
    assert_eq!(reply.status, 200, "{addr}");
    let ctype = reply.headers[http::header::CONTENT_TYPE]
        .to_str()
        .unwrap()
        .to_owned();
    (ctype, String::from_utf8(reply.body.to_vec()).unwrap())
}

/// The family names of `# TYPE` lines.
fn families(body: &str) -> BTreeSet<String> {
    body.lines()
        .filter_map(|l| l.strip_prefix("# TYPE "))
        .filter_map(|l| l.split(' ').next())
        .map(str::to_owned)
        .collect()
}

/// A CA, an injector, and sidecars A (outbound, with `--metrics-peer-identity`) and B (inbound),
/// as real processes, every listener on its own loopback address `ip` (one per test, so that no
/// other test takes a port between `free_addr` and the bind).
struct Stack {
    _dir: tempfile::TempDir,
    _procs: Vec<Proc>,
    ca: SocketAddr,
    injector: SocketAddr,
    a: SocketAddr,
    b: SocketAddr,
    a_http: SocketAddr,
    a_tcp: SocketAddr,
    b_http: SocketAddr,
}

fn ca_dir(dir: &Path) -> std::path::PathBuf {
    let ca_dir = dir.join("ca");
    let out = Command::new(workspace_bin("meshid-ca"))
        .args(["init", "--dir"])
        .arg(&ca_dir)
        .output()
        .unwrap();
    assert!(out.status.success(), "{out:?}");
    ca_dir
}

impl Stack {
    async fn start(ip: &str) -> Self {
        let dir = tempfile::tempdir().unwrap();
        let mut procs = Vec::new();

        let ca_dir = ca_dir(dir.path());
        let jwks = dir.path().join("jwks.json");
        FakeCluster::new().write_jwks(&jwks);
        let ca = free_addr(ip);
        procs.push(Proc::spawn(
            "meshid-ca",
            Command::new(workspace_bin("meshid-ca"))
                .args(["serve", "--dir"])
                .arg(&ca_dir)
                .args(["--listen", &free_addr(ip).to_string()])
                .args(["--admin-listen", &ca.to_string(), "--san", "localhost"])
                .arg("--jwks")
                .arg(&jwks)
                .env("MESHID_LOG", "warn"),
        ));

        let tls = dir.path().join("tls");
        let out = Command::new(workspace_bin("meshid-ca"))
            .args(["webhook-cert", "--dir"])
            .arg(&ca_dir)
            .args(["--dns", "meshid-injector.meshid.svc", "--out-dir"])
            .arg(&tls)
            .output()
            .unwrap();
        assert!(out.status.success(), "{out:?}");
        let injector = free_addr(ip);
        procs.push(Proc::spawn(
            "meshid-injector",
            Command::new(workspace_bin("meshid-injector"))
                .arg("--tls-cert")
                .arg(tls.join("tls.crt"))
                .arg("--tls-key")
                .arg(tls.join("tls.key"))
                .arg("--trust-bundle")
                .arg(ca_dir.join("bundle.pem"))
                .args(["--listen", &free_addr(ip).to_string()])
                .args(["--admin-listen", &injector.to_string()])
                .args(["--sidecar-image", "registry.example/meshid/sidecar:0.1.0"])
                .args(["--ca-addr", "meshid-ca.meshid.svc:8443"])
                .env("MESHID_LOG", "warn"),
        ));

        let http_app = tokio::net::TcpListener::bind((ip, 0)).await.unwrap();
        let tcp_app = tokio::net::TcpListener::bind((ip, 0)).await.unwrap();
        let (http_target, tcp_target) = (
            http_app.local_addr().unwrap(),
            tcp_app.local_addr().unwrap(),
        );
        tokio::spawn(meshid_examples::http_echo(http_app));
        tokio::spawn(meshid_examples::tcp_echo(tcp_app));

        let pki = TestPki::new();
        let sidecar = |id: &str, admin: SocketAddr| {
            let w = pki.workload(id);
            let mut cmd = Command::new(workspace_bin("meshid-sidecar"));
            cmd.arg("run")
                .arg("--cert")
                .arg(&w.cert_path)
                .arg("--key")
                .arg(&w.key_path)
                .arg("--bundle")
                .arg(&pki.bundle_path)
                .args(["--admin-listen", &admin.to_string()])
                .env("MESHID_LOG", "warn");
            cmd
        };
        let (b, b_http, b_tcp) = (free_addr(ip), free_addr(ip), free_addr(ip));
        let policy = dir.path().join("policy.yaml");
        std::fs::write(
            &policy,
            format!(
                "inbound:\n  - port: {}\n    protocol: http\n    allow:\n      - id: {A}\n        paths: [/allowed]\n  - port: {}\n    protocol: tcp\n    allow:\n      - id: {A}\n",
                b_http.port(),
                b_tcp.port()
            ),
        )
        .unwrap();
        procs.push(Proc::spawn(
            "meshid-sidecar B",
            sidecar(B, b)
                .args(["--inbound", &format!("{b_http}={http_target},http")])
                .args(["--inbound", &format!("{b_tcp}={tcp_target},tcp")])
                .arg("--policy")
                .arg(&policy),
        ));
        let (a, a_http, a_tcp) = (free_addr(ip), free_addr(ip), free_addr(ip));
        procs.push(Proc::spawn(
            "meshid-sidecar A",
            sidecar(A, a)
                .args(["--outbound", &format!("{a_http}={b_http},{B},http")])
                .args(["--outbound", &format!("{a_tcp}={b_tcp},{B},tcp")])
                .arg("--metrics-peer-identity"),
        ));
        for (what, addr) in [("CA", ca), ("injector", injector), ("A", a), ("B", b)] {
            let ready = tokio::task::spawn_blocking(move || {
                wait_http_ok(addr, "/readyz", Duration::from_secs(20))
            });
            assert!(ready.await.unwrap(), "{what} ready");
        }
        Self {
            _dir: dir,
            _procs: procs,
            ca,
            injector,
            a,
            b,
            a_http,
            a_tcp,
            b_http,
        }
    }

    fn endpoints(&self) -> [(&'static str, &'static str, SocketAddr); 4] {
        [
            ("CA", "meshid_ca", self.ca),
            ("injector", "meshid_injector", self.injector),
            ("sidecar A", "meshid_sidecar", self.a),
            ("sidecar B", "meshid_sidecar", self.b),
        ]
    }

    /// HTTP requests (allowed and denied) and a TCP exchange from A's app through A and B.
    async fn traffic(&self) {
        let a_http = self.a_http;
        let codes = tokio::task::spawn_blocking(move || {
            ["/allowed", "/allowed", "/denied"]
                .map(|path| http_get(a_http, path).map(|(code, _)| code).unwrap_or(0))
        })
        .await
        .unwrap();
        assert_eq!(codes, [200, 200, 403]);
        let mut tcp = tokio::net::TcpStream::connect(self.a_tcp).await.unwrap();
        tcp.write_all(b"ping").await.unwrap();
        tcp.shutdown().await.unwrap();
        let mut back = Vec::new();
        tokio::time::timeout(Duration::from_secs(10), tcp.read_to_end(&mut back))
            .await
            .unwrap()
            .unwrap();
        assert_eq!(back, b"ping");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_documented_family_is_served_from_the_start() {
    let stack = Stack::start("127.0.0.61").await;
    let documented = documented();
    for (who, prefix, addr) in stack.endpoints() {
        let names = &documented.iter().find(|(p, _)| p == prefix).unwrap().1;
        let (ctype, text) = scrape(addr, Some(TEXT_004)).await;
        assert_eq!(ctype, "text/plain; version=0.0.4; charset=utf-8");
        let served = families(&text);
        assert_eq!(
            &served, names,
            "{who}: served (left) and documented in docs/metrics.md (right) differ\n{text}"
        );
        for name in names {
            assert!(text.contains(&format!("# HELP {name} ")), "{who}: {name}");
        }

        let (ctype, om) = scrape(addr, None).await;
        assert!(ctype.starts_with("application/openmetrics-text"), "{ctype}");
        assert!(om.ends_with("# EOF\n"));
        let served = families(&om);
        for name in names {
            let family = name.strip_suffix("_total").unwrap_or(name);
            assert!(served.contains(family), "{who}: {family} not in\n{om}");
        }
    }
    // Per-listener series exist at zero before any connection.
    let (_, b) = scrape(stack.b, Some(TEXT_004)).await;
    let port = stack.b_http.port();
    for series in [
        format!("meshid_sidecar_connections_total{{direction=\"inbound\",port=\"{port}\"}} 0"),
        format!("meshid_sidecar_received_bytes_total{{direction=\"inbound\",port=\"{port}\"}} 0"),
        format!("meshid_sidecar_sent_bytes_total{{direction=\"inbound\",port=\"{port}\"}} 0"),
    ] {
        assert!(b.contains(&series), "{series} not in\n{b}");
    }
    // A knows its upstream's identity before connecting: its byte series carry it from the start.
    let (_, a) = scrape(stack.a, Some(TEXT_004)).await;
    let port = stack.a_http.port();
    let series = format!(
        "meshid_sidecar_sent_bytes_total{{direction=\"outbound\",port=\"{port}\",peer=\"{B}\"}} 0"
    );
    assert!(a.contains(&series), "{series} not in\n{a}");
}

#[cfg_attr(
    not(have_promtool),
    ignore = "promtool is not installed (scripts/install-test-tools.sh)"
)]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn promtool_finds_nothing_wrong_on_any_endpoint_after_traffic() {
    let stack = Stack::start("127.0.0.62").await;
    stack.traffic().await;
    let promtool = env!("MESHID_TEST_PROMTOOL");
    let dir = tempfile::tempdir().unwrap();
    for (who, _, addr) in stack.endpoints() {
        let (_, text) = scrape(addr, Some(TEXT_004)).await;
        let file = dir.path().join("metrics.txt");
        std::fs::write(&file, &text).unwrap();
        let out = Command::new(promtool)
            .args(["check", "metrics"])
            .stdin(std::fs::File::open(&file).unwrap())
            .output()
            .unwrap_or_else(|e| panic!("running {promtool}: {e} (scripts/install-test-tools.sh)"));
        assert!(
            out.status.success() && out.stdout.is_empty() && out.stderr.is_empty(),
            "promtool check metrics on {who}: {}{}\n{text}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }

    // The series the traffic made: B without peer labels, A with its upstream's identity. A's
    // bodiless GETs, one at a time, cross to B over pooled HTTP/1.1 (a quiet listener).
    let (_, b) = scrape(stack.b, Some(TEXT_004)).await;
    let port = stack.b_http.port();
    for series in [
        format!(
            "meshid_sidecar_requests_total{{direction=\"inbound\",port=\"{port}\",protocol=\"http1\",class=\"2xx\",code=\"200\"}} 2"
        ),
        format!(
            "meshid_sidecar_requests_total{{direction=\"inbound\",port=\"{port}\",protocol=\"http1\",class=\"4xx\",code=\"403\"}} 1"
        ),
        format!(
            "meshid_sidecar_request_duration_seconds_count{{direction=\"inbound\",port=\"{port}\",protocol=\"http1\",class=\"2xx\"}} 2"
        ),
    ] {
        assert!(b.contains(&series), "{series} not in\n{b}");
    }
    assert!(!b.contains("peer="), "{b}");
    let (_, a) = scrape(stack.a, Some(TEXT_004)).await;
    let port = stack.a_http.port();
    let series = format!(
        "meshid_sidecar_requests_total{{direction=\"outbound\",port=\"{port}\",protocol=\"http1\",class=\"2xx\",code=\"200\",peer=\"{B}\"}} 2"
    );
    assert!(a.contains(&series), "{series} not in\n{a}");
    let received = a
        .lines()
        .find(|l| {
            l.starts_with(&format!(
                "meshid_sidecar_received_bytes_total{{direction=\"outbound\",port=\"{}\"",
                stack.a_tcp.port()
            ))
        })
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|v| v.parse::<u64>().ok());
    assert_eq!(received, Some(4), "the TCP app sent 4 bytes\n{a}");
}

#[cfg_attr(
    not(have_openmetrics_parser),
    ignore = "python3 with prometheus-client is not installed (scripts/install-test-tools.sh)"
)]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_openmetrics_parser_accepts_every_endpoint_after_traffic() {
    let stack = Stack::start("127.0.0.63").await;
    stack.traffic().await;
    let dir = tempfile::tempdir().unwrap();
    for (who, _, addr) in stack.endpoints() {
        let (_, om) = scrape(addr, None).await;
        let file = dir.path().join("metrics.om");
        std::fs::write(&file, &om).unwrap();
        let out = Command::new("python3")
            .arg("-c")
            .arg(
                "import sys\n\
                 from prometheus_client.openmetrics.parser import text_string_to_metric_families\n\
                 print(len(list(text_string_to_metric_families(sys.stdin.read()))))",
            )
            .stdin(std::fs::File::open(&file).unwrap())
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "OpenMetrics parser on {who}: {}\n{om}",
            String::from_utf8_lossy(&out.stderr)
        );
        let parsed: usize = String::from_utf8_lossy(&out.stdout).trim().parse().unwrap();
        assert_eq!(parsed, families(&om).len(), "{who}: families parsed");
    }
}
