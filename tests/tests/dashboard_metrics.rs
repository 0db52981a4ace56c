//! The chart's Grafana dashboard (`helm/meshid/dashboards/meshid.json`) and PrometheusRule
//! (`helm/meshid/templates/prometheusrule.yaml`) query only metrics the real binaries export: every
//! PromQL expression (panel targets, template variables, alert rules) is scanned for `meshid_*`
//! names, and each must be a series the CA, the injector or a sidecar (CA mode, stats on their own
//! port as injected sidecars serve them) publishes on `/metrics`: a gauge by its name, a counter as
//! `<family>_total`, a histogram as `<family>_bucket`, `_sum` or `_count`. prometheus-client prints
//! a labelled family only once it has a series, so the binaries are driven through the events that
//! create them first (see [`scrape_real_binaries`]); a failure lists each missing name and the
//! panels or alerts that query it. The dashboard must also be valid JSON with unique panel ids and
//! every query on the `${datasource}` template variable.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::{BTreeMap, BTreeSet};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use meshid_tests::fake_cluster::FakeCluster;
use meshid_tests::process::{Proc, ca_mode_sidecar, free_addr, http_get, wait_http_ok};
use meshid_tests::tools::workspace_bin;
use rustls_pki_types::{CertificateDer, pem::PemObject};
use serde_json::Value;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

const DATASOURCE: &str = "${datasource}";
const INJECTOR_SAN: &str = "meshid-injector.meshid.svc";
const FRONTEND: &str = "spiffe://cluster.local/ns/shop/sa/frontend";
const BACKEND: &str = "spiffe://cluster.local/ns/shop/sa/backend";

fn chart() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../helm/meshid")
}

fn dashboard() -> Value {
    let path = chart().join("dashboards/meshid.json");
    let text = std::fs::read_to_string(&path).unwrap();
    serde_json::from_str(&text).unwrap_or_else(|e| panic!("{}: not JSON: {e}", path.display()))
}

/// Every panel, rows' nested panels included.
fn panels(dashboard: &Value) -> Vec<&Value> {
    let mut out = Vec::new();
    for p in dashboard["panels"].as_array().expect("panels") {
        out.push(p);
        if let Some(nested) = p["panels"].as_array() {
            out.extend(nested);
        }
    }
    out
}

/// `(where, expression)` for every PromQL expression of the dashboard.
fn dashboard_queries(dashboard: &Value) -> Vec<(String, String)> {
    let mut out = Vec::new();
    for p in panels(dashboard) {
        for t in p["targets"].as_array().into_iter().flatten() {
            let expr = t["expr"].as_str().expect("every target has a PromQL expr");
            out.push((
                format!("panel {:?}", p["title"].as_str().unwrap_or("?")),
                expr.to_owned(),
            ));
        }
    }
    for v in dashboard["templating"]["list"]
        .as_array()
        .expect("templating")
    {
        if v["type"] == "query" {
            let q = v["query"]["query"]
                .as_str()
                .or(v["query"].as_str())
                .unwrap();
            out.push((
                format!("variable ${}", v["name"].as_str().unwrap()),
                q.to_owned(),
            ));
        }
    }
    out
}

/// `(alert, expression)` for the PrometheusRule template: `expr: <one line>` or `expr: |` and the
/// more-indented lines under it.
fn rule_queries() -> Vec<(String, String)> {
    let text = std::fs::read_to_string(chart().join("templates/prometheusrule.yaml")).unwrap();
    let lines: Vec<&str> = text.lines().collect();
    let (mut out, mut alert) = (Vec::new(), String::new());
    for (i, line) in lines.iter().enumerate() {
        let trimmed = line.trim_start();
        if let Some(name) = trimmed.strip_prefix("- alert: ") {
            alert = name.trim().to_owned();
        }
        let Some(rest) = trimmed.strip_prefix("expr:") else {
            continue;
        };
        let rest = rest.trim();
        let expr = if rest == "|" || rest == ">-" {
            let indent = line.len() - trimmed.len();
            lines[i + 1..]
                .iter()
                .take_while(|l| l.len() - l.trim_start().len() > indent || l.trim().is_empty())
                .map(|l| l.trim())
                .collect::<Vec<_>>()
                .join(" ")
        } else {
            rest.to_owned()
        };
        out.push((format!("alert {alert}"), expr));
    }
    assert!(out.len() >= 5, "found too few alert expressions: {out:?}");
    out
}

/// The `meshid_*` metric names a PromQL expression refers to (string literals, label values and
/// Grafana variables skipped).
fn metric_names(expr: &str) -> BTreeSet<String> {
    let mut names = BTreeSet::new();
    let mut chars = expr.char_indices().peekable();
    let mut prev: Option<char> = None;
    while let Some((i, c)) = chars.next() {
        if matches!(c, '"' | '\'' | '`') {
            let mut escaped = false;
            for (_, d) in chars.by_ref() {
                if !escaped && d == c {
                    break;
                }
                escaped = d == '\\' && !escaped;
            }
            prev = Some(c);
            continue;
        }
        if c.is_ascii_alphabetic() || c == '_' || c == ':' {
            let mut end = i + c.len_utf8();
            while let Some(&(j, d)) = chars.peek() {
                if d.is_ascii_alphanumeric() || d == '_' || d == ':' {
                    end = j + d.len_utf8();
                    chars.next();
                } else {
                    break;
                }
            }
            let word = &expr[i..end];
            if word.starts_with("meshid_") && prev != Some('$') {
                names.insert(word.to_owned());
            }
            prev = word.chars().last();
            continue;
        }
        prev = Some(c);
    }
    names
}

/// The series names one `/metrics` page lets a query use: gauges (and untyped) by name, counters
/// as `_total`, histograms as `_bucket`, `_sum`, `_count`, and every sample name present.
fn queryable(page: &str) -> BTreeSet<String> {
    let mut out = BTreeSet::new();
    for line in page.lines() {
        if let Some(rest) = line.strip_prefix("# TYPE ") {
            let mut words = rest.split_whitespace();
            let (Some(family), Some(kind)) = (words.next(), words.next()) else {
                continue;
            };
            let suffixes: &[&str] = match kind {
                "counter" => &["_total"],
                "histogram" => &["_bucket", "_sum", "_count"],
                "summary" => &["", "_sum", "_count"],
                _ => &[""],
            };
            for s in suffixes {
                out.insert(format!("{family}{s}"));
            }
        } else if !line.starts_with('#') && !line.is_empty() {
            let name: String = line
                .chars()
                .take_while(|c| c.is_ascii_alphanumeric() || *c == '_' || *c == ':')
                .collect();
            out.insert(name);
        }
    }
    out
}

#[test]
fn dashboard_is_valid_with_unique_ids_and_a_templated_datasource() {
    let d = dashboard();
    assert!(
        d["title"].is_string() && d["uid"].is_string(),
        "title and uid"
    );
    let mut ids = BTreeSet::new();
    let mut problems = Vec::new();
    for p in panels(&d) {
        let id = p["id"].as_u64().expect("every panel has a numeric id");
        if !ids.insert(id) {
            problems.push(format!("panel id {id} used twice ({})", p["title"]));
        }
        if p["type"] == "row" {
            continue;
        }
        if p["datasource"]["uid"] != DATASOURCE {
            problems.push(format!(
                "panel {}: datasource {}",
                p["title"], p["datasource"]
            ));
        }
        let targets = p["targets"]
            .as_array()
            .map(Vec::as_slice)
            .unwrap_or_default();
        if targets.is_empty() {
            problems.push(format!("panel {} has no query", p["title"]));
        }
        for t in targets {
            if t["datasource"]["uid"] != DATASOURCE {
                problems.push(format!(
                    "panel {}: a target's datasource {}",
                    p["title"], t["datasource"]
                ));
            }
        }
    }
    let vars = d["templating"]["list"].as_array().expect("templating.list");
    let ds: Vec<_> = vars.iter().filter(|v| v["name"] == "datasource").collect();
    if !(ds.len() == 1 && ds[0]["type"] == "datasource" && ds[0]["query"] == "prometheus") {
        problems.push(format!(
            "no `datasource` variable of type datasource (prometheus): {ds:?}"
        ));
    }
    for v in vars.iter().filter(|v| v["type"] == "query") {
        if v["datasource"]["uid"] != DATASOURCE {
            problems.push(format!(
                "variable {}: datasource {}",
                v["name"], v["datasource"]
            ));
        }
    }
    assert!(
        problems.is_empty(),
        "dashboard problems:\n{}",
        problems.join("\n")
    );
}

#[test]
fn metric_names_are_extracted_from_promql() {
    let names = |e: &str| metric_names(e).into_iter().collect::<Vec<_>>();
    assert_eq!(
        names(
            r#"histogram_quantile(0.99, sum by (le) (rate(meshid_ca_issue_duration_seconds_bucket{job="meshid_x"}[$__rate_interval])))"#
        ),
        ["meshid_ca_issue_duration_seconds_bucket"]
    );
    assert_eq!(
        names(
            r#"100 * sum(meshid_ca_sidecars{acked_version="$bundle_version"}) / sum(meshid_ca_sidecars) or vector(0)"#
        ),
        ["meshid_ca_sidecars"]
    );
    assert_eq!(
        names(r#"label_values(meshid_a:b, namespace) + $meshid_var"#),
        ["meshid_a:b"]
    );
    let page = "# TYPE meshid_c counter\nmeshid_c_total 1\n# TYPE meshid_h histogram\n# TYPE meshid_g gauge\nmeshid_g 2\n";
    let q = queryable(page);
    for ok in [
        "meshid_c_total",
        "meshid_h_bucket",
        "meshid_h_sum",
        "meshid_h_count",
        "meshid_g",
    ] {
        assert!(q.contains(ok), "{ok}");
    }
    for bad in ["meshid_c", "meshid_h", "meshid_g_total"] {
        assert!(!q.contains(bad), "{bad}");
    }
}

/// `n` TCP connections to `to` from source address `from` (held open by the caller).
async fn connections(from: &str, to: SocketAddr, n: usize) -> Vec<TcpStream> {
    let mut out = Vec::new();
    for _ in 0..n {
        let socket = tokio::net::TcpSocket::new_v4().unwrap();
        socket.bind(format!("{from}:0").parse().unwrap()).unwrap();
        out.push(socket.connect(to).await.unwrap());
    }
    out
}

/// Bytes that are not a TLS ClientHello: the server's handshake fails.
async fn garbage(stream: &mut TcpStream) {
    let _ = stream.write_all(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n").await;
    let mut buf = [0u8; 256];
    let _ = tokio::time::timeout(Duration::from_secs(3), stream.read(&mut buf)).await;
}

/// `/metrics` without the HTTP response head.
fn metrics_page(addr: SocketAddr) -> String {
    let (code, response) = http_get(addr, "/metrics").unwrap();
    assert_eq!(code, 200, "{response}");
    response
        .split_once("\r\n\r\n")
        .map(|(_, body)| body.to_owned())
        .unwrap_or_default()
}

/// The CA, the injector and two sidecars (B serves, A calls it), run as the chart runs them, and
/// driven through the events that create each labelled series (prometheus-client prints a family
/// only once it has one): issuance, a rotation report, a JWKS reload, a refused and an idle
/// connection, failed handshakes, an admission request, a reload, HTTP and TCP through both
/// sidecars, a bundle change (`rotate prepare`), a policy reload that revokes a connection. Their `/metrics` pages by binary (B's stats port for the sidecar).
async fn scrape_real_binaries(dir: &Path) -> BTreeMap<&'static str, String> {
    let ca_bin = workspace_bin("meshid-ca");
    let ca_dir = dir.join("ca");
    let run = |args: &[&str]| {
        let out = Command::new(&ca_bin).args(args).output().unwrap();
        assert!(out.status.success(), "meshid-ca {args:?}: {out:?}");
        out.stdout
    };
    let ca_dir_s = ca_dir.to_string_lossy().into_owned();
    run(&["init", "--dir", &ca_dir_s]);
    let bundle = ca_dir.join("bundle.pem");
    let roots: Vec<CertificateDer<'static>> = CertificateDer::pem_file_iter(&bundle)
        .unwrap()
        .map(Result::unwrap)
        .collect();
    let cluster = FakeCluster::new();
    let jwks = dir.join("jwks.json");
    cluster.write_jwks(&jwks);
    let (grpc, ca_admin) = (free_addr("127.0.0.2"), free_addr("127.0.0.2"));
    let _ca = Proc::spawn(
        "meshid-ca",
        Command::new(&ca_bin)
            .args(["serve", "--dir", &ca_dir_s, "--san", "localhost"])
            .args(["--listen", &grpc.to_string()])
            .args(["--admin-listen", &ca_admin.to_string()])
            .args(["--max-connections-per-source", "2", "--idle-timeout", "1s"])
            .args(["--handshake-timeout", "3s"])
            .arg("--jwks")
            .arg(&jwks)
            .env("MESHID_LOG", "warn"),
    );
    assert!(
        wait_http_ok(ca_admin, "/readyz", Duration::from_secs(15)),
        "CA ready"
    );
    // A changed JWKS file is reloaded at the next token (B's): meshid_ca_jwks_refreshes_total.
    std::fs::write(&jwks, serde_json::to_vec(&cluster.jwks()).unwrap()).unwrap();
    // A client that connects and calls nothing: closed after --idle-timeout.
    let idle = meshid_tests::ca::connect(grpc, &roots, None).await.unwrap();
    // Three connections from one source past --max-connections-per-source 2: one refused; one
    // that is not TLS: a failed handshake.
    let mut held = connections("127.0.0.9", grpc, 3).await;
    garbage(&mut held[0]).await;

    // The injector, with a serving pair from `meshid-ca webhook-cert` (the chart's default).
    let tls = dir.join("injector-tls");
    run(&[
        "webhook-cert",
        "--dir",
        &ca_dir_s,
        "--dns",
        INJECTOR_SAN,
        "--out-dir",
        &tls.to_string_lossy(),
    ]);
    let injector_bundle = dir.join("injector-bundle.pem");
    std::fs::copy(&bundle, &injector_bundle).unwrap();
    let (webhook, injector_admin) = (free_addr("127.0.0.1"), free_addr("127.0.0.1"));
    let _injector = Proc::spawn(
        "meshid-injector",
        Command::new(workspace_bin("meshid-injector"))
            .arg("--tls-cert")
            .arg(tls.join("tls.crt"))
            .arg("--tls-key")
            .arg(tls.join("tls.key"))
            .arg("--trust-bundle")
            .arg(&injector_bundle)
            .args([
                "--server-name",
                INJECTOR_SAN,
                "--listen",
                &webhook.to_string(),
            ])
            .args(["--admin-listen", &injector_admin.to_string()])
            .args([
                "--reload-interval",
                "200ms",
                "--max-connections-per-source",
                "1",
            ])
            .args(["--sidecar-image", "registry.example/meshid/sidecar:0.1.0"])
            .args(["--ca-addr", "meshid-ca.meshid.svc:8443"])
            .env("MESHID_LOG", "warn"),
    );
    assert!(
        wait_http_ok(injector_admin, "/readyz", Duration::from_secs(15)),
        "injector ready"
    );
    // A body over --max-request-bytes: refused (413) unread, and a review answered bad_request.
    let mut conn = meshid_tests::mesh::tls_connect(webhook, &roots, INJECTOR_SAN)
        .await
        .unwrap();
    conn.write_all(b"POST /inject HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: 4000000\r\nConnection: close\r\n\r\n{}")
        .await
        .unwrap();
    let mut answer = Vec::new();
    let _ = conn.read_to_end(&mut answer).await;
    // The same bundle, rewritten: a trust_bundle reload.
    let mut pem = std::fs::read(&bundle).unwrap();
    pem.extend_from_slice(b"\n");
    std::fs::write(&injector_bundle, pem).unwrap();
    // Two connections from one source past --max-connections-per-source 1: one refused.
    let held_injector = connections("127.0.0.9", webhook, 2).await;

    // Sidecar B (service-account token) serves an app over HTTP, its metrics on a stats port of
    // their own as injected sidecars serve them on meshid-stats; sidecar A (join token) calls it.
    let app = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let app_addr = app.local_addr().unwrap();
    tokio::spawn(meshid_examples::http_echo(app));
    let tcp_app = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let tcp_app_addr = tcp_app.local_addr().unwrap();
    tokio::spawn(meshid_examples::tcp_echo(tcp_app));
    let tcp_inbound = free_addr("127.0.0.3");
    let (inbound, b_admin, stats) = (
        free_addr("127.0.0.3"),
        free_addr("127.0.0.3"),
        free_addr("127.0.0.3"),
    );
    let policy = dir.join("policy.yaml");
    let policy_text = |tcp_peer: &str| {
        format!(
            "inbound:\n  - port: {}\n    protocol: http\n    allow:\n      - id: {FRONTEND}\n  \
             - port: {}\n    protocol: tcp\n    allow:\n      - id: {tcp_peer}\n",
            inbound.port(),
            tcp_inbound.port()
        )
    };
    std::fs::write(&policy, policy_text(FRONTEND)).unwrap();
    // The CA re-checks its JWKS file at a token at most once a second: B's token comes later.
    tokio::time::sleep(Duration::from_millis(1200)).await;
    let sa_token = dir.join("sa.token");
    std::fs::write(&sa_token, cluster.token("shop", "backend")).unwrap();
    let _b = Proc::spawn(
        "meshid-sidecar B",
        ca_mode_sidecar(grpc, &bundle, "--token-file", &sa_token, b_admin)
            .args(["--inbound", &format!("{inbound}={app_addr},http")])
            .args(["--inbound", &format!("{tcp_inbound}={tcp_app_addr},tcp")])
            .arg("--policy")
            .arg(&policy)
            .args([
                "--stats-listen",
                &stats.to_string(),
                "--max-connections",
                "1",
            ]),
    );
    let join = dir.join("join.token");
    std::fs::write(
        &join,
        run(&["token", "create", "--dir", &ca_dir_s, "--id", FRONTEND]),
    )
    .unwrap();
    let (local, local_tcp, a_admin) = (
        free_addr("127.0.0.1"),
        free_addr("127.0.0.1"),
        free_addr("127.0.0.4"),
    );
    let _a = Proc::spawn(
        "meshid-sidecar A",
        ca_mode_sidecar(grpc, &bundle, "--join-token-file", &join, a_admin)
            .args(["--outbound", &format!("{local}={inbound},{BACKEND},http")])
            .args([
                "--outbound",
                &format!("{local_tcp}={tcp_inbound},{BACKEND},tcp"),
            ]),
    );
    assert!(
        wait_http_ok(b_admin, "/readyz", Duration::from_secs(20)),
        "sidecar B ready"
    );
    assert!(
        wait_http_ok(a_admin, "/readyz", Duration::from_secs(20)),
        "sidecar A ready"
    );
    // Not TLS on B's inbound port: a failed handshake. Then a call through A to B (allowed).
    let mut raw = connections("127.0.0.9", inbound, 1).await;
    garbage(&mut raw[0]).await;
    drop(raw);
    let (code, _) = tokio::task::spawn_blocking(move || http_get(local, "/orders"))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(code, 200, "a call through both sidecars");
    // Past B's --max-connections 1: one refused.
    let held_b = connections("127.0.0.9", inbound, 2).await;
    // A rotation's first step: a new root joins the bundle, which the CA streams to the sidecars.
    run(&["rotate", "prepare", "--dir", &ca_dir_s]);
    // A TCP connection through A to B, open while a new policy no longer allows A on that port:
    // a policy reload, and the connection revoked.
    let mut tunnel = TcpStream::connect(local_tcp).await.unwrap();
    tunnel.write_all(b"ping").await.unwrap();
    let mut echo = [0u8; 4];
    tunnel.read_exact(&mut echo).await.unwrap();
    assert_eq!(&echo, b"ping", "TCP through both sidecars");
    std::fs::write(
        &policy,
        policy_text("spiffe://cluster.local/ns/shop/sa/nobody"),
    )
    .unwrap();

    // The CA publishes its rotation report (authorities, sidecars by acknowledged version) every
    // second; wait until every event above shows.
    let want = [
        (ca_admin, "meshid_ca_sidecars{"),
        (ca_admin, "meshid_ca_connections_closed_total{"),
        (ca_admin, "meshid_ca_jwks_refreshes_total{"),
        (injector_admin, "meshid_injector_reloads_total{"),
        (injector_admin, "meshid_injector_connections_refused_total{"),
        (stats, "meshid_sidecar_policy_reloads_total{"),
        (stats, "meshid_sidecar_connections_revoked_total{"),
        (stats, "meshid_sidecar_connections_refused_total{"),
        (stats, "meshid_sidecar_bundle_updates_total{"),
        (injector_admin, "meshid_injector_requests_refused_total{"),
    ];
    let deadline = std::time::Instant::now() + Duration::from_secs(45);
    for (addr, series) in want {
        while !metrics_page(addr).contains(series) {
            assert!(
                std::time::Instant::now() < deadline,
                "{series} never appeared on {addr}:\n{}",
                metrics_page(addr)
            );
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }
    drop((idle, held, held_injector, held_b, tunnel));
    BTreeMap::from([
        ("meshid-ca", metrics_page(ca_admin)),
        ("meshid-injector", metrics_page(injector_admin)),
        ("meshid-sidecar", metrics_page(stats)),
    ])
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dashboard_and_alerts_query_only_exported_metrics() {
    let mut queries = dashboard_queries(&dashboard());
    queries.extend(rule_queries());
    let mut used: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
    for (place, expr) in &queries {
        let names = metric_names(expr);
        assert!(
            !names.is_empty() || place.starts_with("variable"),
            "{place}: no meshid metric in {expr}"
        );
        for n in names {
            used.entry(n).or_default().insert(place.clone());
        }
    }

    let dir = tempfile::tempdir().unwrap();
    let pages = scrape_real_binaries(dir.path()).await;
    let exported: BTreeSet<String> = pages.values().flat_map(|p| queryable(p)).collect();
    let missing: Vec<String> = used
        .iter()
        .filter(|(name, _)| !exported.contains(*name))
        .map(|(name, places)| {
            format!(
                "  {name}  (used by {})",
                places.iter().cloned().collect::<Vec<_>>().join("; ")
            )
        })
        .collect();
    assert!(
        missing.is_empty(),
        "{} of {} metric names the dashboard and alerts query are not exported by {}:\n{}\n\
         (a counter is queried as <family>_total, a histogram as <family>_bucket/_sum/_count)",
        missing.len(),
        used.len(),
        pages.keys().copied().collect::<Vec<_>>().join(", "),
        missing.join("\n"),
    );
}
