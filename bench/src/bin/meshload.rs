//! `meshload`: an HTTP load generator for the meshid benchmarks (hyper + rustls/aws-lc-rs).
//!
//! Closed loop (`--connections N`), open loop at a fixed rate (`--rate R`, latency from each request's
//! due time), a new connection per request (`--new-conn`, for handshake rates), HTTP/1.1 keep-alive or
//! h2 (`--h2`), TLS with a client certificate (`--tls --cert --key`). `--hold N` opens N connections,
//! sends one request on each and keeps them idle (for memory per connection).
//!
//! Runs on one thread: pin it to a core with `taskset`.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, Result};
use clap::Parser;
use http::{HeaderValue, Uri};
use meshid_bench::load::{self, Plan, Report, Schedule, Target};
use meshid_bench::tlsconf::{TlsOptions, client_config};
use rustls::pki_types::ServerName;

#[derive(Debug, Parser)]
#[command(
    name = "meshload",
    about = "HTTP load generator for the meshid benchmarks"
)]
struct Args {
    /// Address to send requests to.
    #[arg(long)]
    target: SocketAddr,
    /// Request path.
    #[arg(long, default_value = "/")]
    path: String,
    /// Host header / h2 authority.
    #[arg(long, default_value = "bench")]
    host: String,
    /// Speak TLS (TLS 1.3, resumption off: every connection is a full handshake).
    #[arg(long)]
    tls: bool,
    /// Client certificate chain (PEM) to present.
    #[arg(long)]
    cert: Option<PathBuf>,
    /// Client private key (PEM).
    #[arg(long)]
    key: Option<PathBuf>,
    /// Roots to verify the server against.
    #[arg(long)]
    bundle: Option<PathBuf>,
    /// The server's SPIFFE ID (checked instead of a host name).
    #[arg(long)]
    expect_id: Option<String>,
    /// Verify neither the server certificate nor its handshake signature: keeps the load
    /// generator's core free when measuring a server's handshake rate (the server's work is the same).
    #[arg(long)]
    dangerous_skip_verify: bool,
    /// Key exchange groups offered: x25519 (what every contender picks) or default (rustls's list).
    #[arg(long, default_value = "x25519")]
    groups: String,
    /// SNI sent to the server.
    #[arg(long, default_value = "localhost")]
    server_name: String,
    /// Use h2 (ALPN h2 over TLS, prior knowledge in plaintext) instead of HTTP/1.1.
    #[arg(long)]
    h2: bool,
    /// Concurrent connections.
    #[arg(long, default_value_t = 32)]
    connections: usize,
    /// h2: concurrent streams per connection.
    #[arg(long, default_value_t = 1)]
    streams: usize,
    /// Open loop at this many requests per second in total (default: closed loop).
    #[arg(long)]
    rate: Option<f64>,
    /// A new connection for every request.
    #[arg(long)]
    new_conn: bool,
    /// Leave Nagle's algorithm on (no TCP_NODELAY), as Python's ssl and many Java clients do.
    #[arg(long)]
    nagle: bool,
    /// Warm-up before the measured window.
    #[arg(long, default_value = "2s", value_parser = duration)]
    warmup: Duration,
    /// Length of the measured window.
    #[arg(long, default_value = "10s", value_parser = duration)]
    duration: Duration,
    /// Print window-start / window-end lines as the measured window opens and closes.
    #[arg(long)]
    markers: bool,
    /// Print the result as `result <json>` instead of text.
    #[arg(long)]
    json: bool,
    /// Open this many connections, one request each, then keep them idle.
    #[arg(long)]
    hold: Option<usize>,
    /// Connections opened at a time with --hold.
    #[arg(long, default_value_t = 16)]
    hold_concurrency: usize,
    /// How long --hold keeps the connections.
    #[arg(long, default_value = "10m", value_parser = duration)]
    hold_for: Duration,
}

fn duration(s: &str) -> Result<Duration, String> {
    meshid_identity::parse_duration(s)
}

fn main() -> Result<()> {
    let args = Args::parse();
    let target = Arc::new(target(&args)?);
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    rt.block_on(async move {
        if let Some(n) = args.hold {
            let (held, failed) = load::hold(target, n, args.hold_concurrency).await;
            println!(
                "{}",
                serde_json::json!({ "held": held.len(), "failed": failed })
            );
            tokio::time::sleep(args.hold_for).await;
            drop(held);
            return Ok(());
        }
        let plan = Plan {
            connections: args.connections.max(1),
            streams: args.streams.max(1),
            schedule: match args.rate {
                Some(rate) if rate > 0.0 => Schedule::Open { rate },
                _ => Schedule::Closed,
            },
            new_conn: args.new_conn,
            warmup: args.warmup,
            duration: args.duration,
            markers: args.markers,
        };
        let report = load::run(target, plan).await;
        if args.json {
            println!("result {}", serde_json::to_string(&report)?);
        } else {
            print_text(&report);
        }
        Ok(())
    })
}

fn target(args: &Args) -> Result<Target> {
    let alpn: &[u8] = if args.h2 { b"h2" } else { b"http/1.1" };
    let tls = if args.tls {
        let opts = TlsOptions {
            cert: args.cert.clone(),
            key: args.key.clone(),
            bundle: args.bundle.clone(),
            expect_id: args.expect_id.clone(),
            dangerous_skip_verify: args.dangerous_skip_verify,
            groups: args.groups.clone(),
        };
        Some(client_config(&opts, alpn)?)
    } else {
        None
    };
    let scheme = if args.tls { "https" } else { "http" };
    let uri: Uri = if args.h2 {
        format!("{scheme}://{}{}", args.host, args.path).parse()
    } else {
        args.path.parse()
    }
    .context("bad --path or --host")?;
    Ok(Target {
        addr: args.target,
        tls,
        server_name: ServerName::try_from(args.server_name.clone()).context("bad --server-name")?,
        h2: args.h2,
        uri,
        host: HeaderValue::from_str(&args.host).context("bad --host")?,
        nagle: args.nagle,
    })
}

fn print_text(r: &Report) {
    let l = &r.latency_us;
    println!(
        "{} loop, {}{}, {} connections{}{}",
        r.schedule,
        r.protocol,
        if r.tls { " over TLS" } else { "" },
        r.connections,
        r.rate.map(|x| format!(", {x} req/s")).unwrap_or_default(),
        if r.new_connection_per_request {
            ", new connection per request"
        } else {
            ""
        }
    );
    println!(
        "  {} requests in {:.1} s: {:.0} req/s, {} errors {:?}",
        r.count, r.seconds, r.requests_per_second, r.errors, r.error_kinds
    );
    println!(
        "  latency us: p50 {:.0}  p90 {:.0}  p99 {:.0}  p99.9 {:.0}  max {:.0}  (mean {:.0})",
        l.p50, l.p90, l.p99, l.p999, l.max, l.mean
    );
    println!(
        "  connections opened: {}; load generator CPU {:.0}% of one core",
        r.connections_opened,
        r.loadgen_cpu_utilization * 100.0
    );
}
