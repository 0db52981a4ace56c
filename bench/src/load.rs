//! The load engine behind `meshload`: closed loop (N connections, each sending its next request when
//! the previous answer is in) or open loop (a fixed rate; latency measured from the time each request
//! was due, so a stalled server is charged for the requests it delayed: no coordinated omission).
//! HTTP/1.1 keep-alive or h2, plaintext or TLS with a client certificate, optionally one new
//! connection (and so one full handshake) per request.
//!
//! Run it on a single-threaded runtime pinned to one core: the numbers then say what one core of
//! load can offer, and `loadgen_cpu_utilization` says whether that core was the bottleneck.

use std::collections::BTreeMap;
use std::io::Write;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::header::{CONNECTION, HOST};
use http::{HeaderValue, Request, StatusCode, Uri};
use http_body_util::{BodyExt, Empty};
use hyper::client::conn::{http1, http2};
use hyper_util::rt::{TokioExecutor, TokioIo};
use rustls::pki_types::ServerName;
use rustls::{ClientConfig, NamedGroup};
use serde::{Deserialize, Serialize};
use tokio::net::TcpStream;
use tokio::sync::{Mutex, mpsc};
use tokio_rustls::TlsConnector;

use crate::procfs::self_cpu_seconds;
use crate::stats::quantile;

/// Where requests go and how they are spoken.
pub struct Target {
    pub addr: SocketAddr,
    /// TLS client configuration (with ALPN set for the protocol), or plaintext.
    pub tls: Option<Arc<ClientConfig>>,
    pub server_name: ServerName<'static>,
    pub h2: bool,
    /// Request URI: a path for HTTP/1.1, absolute (`http://authority/path`) for h2.
    pub uri: Uri,
    pub host: HeaderValue,
    /// Leave Nagle's algorithm on (no TCP_NODELAY), as Python's `ssl` and many Java clients do.
    pub nagle: bool,
}

impl Target {
    fn request(&self, close: bool) -> Request<Empty<Bytes>> {
        let mut req = Request::new(Empty::new());
        *req.uri_mut() = self.uri.clone();
        if !self.h2 {
            req.headers_mut().insert(HOST, self.host.clone());
            if close {
                req.headers_mut()
                    .insert(CONNECTION, HeaderValue::from_static("close"));
            }
        }
        req
    }
}

/// When requests are sent.
#[derive(Debug, Clone, Copy)]
pub enum Schedule {
    /// Each connection sends its next request as soon as the previous one is answered.
    Closed,
    /// `rate` requests per second in total, spread over the connections.
    Open { rate: f64 },
}

/// How much load, for how long.
#[derive(Debug, Clone)]
pub struct Plan {
    pub connections: usize,
    /// h2 only: concurrent streams per connection.
    pub streams: usize,
    pub schedule: Schedule,
    /// A new connection for every request (with `Connection: close` on HTTP/1.1).
    pub new_conn: bool,
    pub warmup: Duration,
    pub duration: Duration,
    /// Print `window-start` / `window-end` lines on stdout as the measured window opens and closes.
    pub markers: bool,
}

/// Latency percentiles in microseconds.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct Latency {
    pub p50: f64,
    pub p90: f64,
    pub p99: f64,
    pub p999: f64,
    pub max: f64,
    pub mean: f64,
}

/// What one run measured (only the window after warm-up counts).
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct Report {
    pub schedule: String,
    pub protocol: String,
    pub tls: bool,
    pub new_connection_per_request: bool,
    pub connections: usize,
    pub rate: Option<f64>,
    pub seconds: f64,
    /// Successful requests.
    pub count: u64,
    pub errors: u64,
    pub error_kinds: BTreeMap<String, u64>,
    pub requests_per_second: f64,
    /// Open loop: requests due in the window (count + errors + those never sent).
    pub intended: Option<u64>,
    pub connections_opened: u64,
    /// TLS key exchange group of each connection opened in the window (by name), when TLS.
    #[serde(default)]
    pub key_exchange: BTreeMap<String, u64>,
    pub latency_us: Latency,
    pub loadgen_cpu_seconds: f64,
    /// Load generator CPU / window: near 1.0 means the load generator, not the server, was the limit.
    pub loadgen_cpu_utilization: f64,
}

/// An HTTP connection ready to send on.
pub enum Conn {
    H1(http1::SendRequest<Empty<Bytes>>),
    H2(http2::SendRequest<Empty<Bytes>>),
}

impl Conn {
    fn is_closed(&self) -> bool {
        match self {
            Self::H1(s) => s.is_closed(),
            Self::H2(s) => s.is_closed(),
        }
    }

    fn share(&self) -> Option<Conn> {
        match self {
            Self::H1(_) => None,
            Self::H2(s) => Some(Self::H2(s.clone())),
        }
    }
}

#[derive(Debug, Clone, Copy)]
enum Failure {
    Connect,
    Tls,
    Http,
    Status(u16),
}

impl Failure {
    fn label(self) -> String {
        match self {
            Self::Connect => "connect".into(),
            Self::Tls => "tls".into(),
            Self::Http => "http".into(),
            Self::Status(s) => format!("status_{s}"),
        }
    }
}

/// Opens a connection (TCP, TLS if configured, HTTP handshake), with the TLS key exchange group.
async fn open(t: &Target) -> Result<(Conn, Option<NamedGroup>), Failure> {
    let tcp = TcpStream::connect(t.addr)
        .await
        .map_err(|_| Failure::Connect)?;
    if !t.nagle {
        let _ = tcp.set_nodelay(true);
    }
    match &t.tls {
        Some(cfg) => {
            let tls = TlsConnector::from(cfg.clone())
                .connect(t.server_name.clone(), tcp)
                .await
                .map_err(|_| Failure::Tls)?;
            let group = tls
                .get_ref()
                .1
                .negotiated_key_exchange_group()
                .map(|g| g.name());
            Ok((handshake(TokioIo::new(tls), t.h2).await?, group))
        }
        None => Ok((handshake(TokioIo::new(tcp), t.h2).await?, None)),
    }
}

async fn handshake<I>(io: I, h2: bool) -> Result<Conn, Failure>
where
    I: hyper::rt::Read + hyper::rt::Write + Unpin + Send + 'static,
{
    if h2 {
        let (send, conn) = http2::handshake(TokioExecutor::new(), io)
            .await
            .map_err(|_| Failure::Http)?;
        tokio::spawn(conn);
        Ok(Conn::H2(send))
    } else {
        let (send, conn) = http1::handshake(io).await.map_err(|_| Failure::Http)?;
        tokio::spawn(conn);
        Ok(Conn::H1(send))
    }
}

/// Sends one request and reads the whole answer; anything but 200 is a failure.
async fn send(conn: &mut Conn, req: Request<Empty<Bytes>>) -> Result<(), Failure> {
    let resp = match conn {
        Conn::H1(s) => {
            s.ready().await.map_err(|_| Failure::Http)?;
            s.send_request(req).await
        }
        Conn::H2(s) => {
            s.ready().await.map_err(|_| Failure::Http)?;
            s.send_request(req).await
        }
    }
    .map_err(|_| Failure::Http)?;
    let status = resp.status();
    resp.into_body()
        .collect()
        .await
        .map_err(|_| Failure::Http)?;
    if status != StatusCode::OK {
        return Err(Failure::Status(status.as_u16()));
    }
    Ok(())
}

#[derive(Clone, Copy)]
struct Clock {
    measure_start: Instant,
    end: Instant,
}

#[derive(Default)]
struct Tally {
    latencies_ns: Vec<u64>,
    errors: BTreeMap<String, u64>,
    opened: u64,
    /// Key exchange groups negotiated by the connections opened (few distinct: a short list).
    groups: Vec<(Option<NamedGroup>, u64)>,
}

impl Tally {
    fn fail(&mut self, f: Failure) {
        *self.errors.entry(f.label()).or_default() += 1;
    }

    fn merge(&mut self, o: Tally) {
        self.latencies_ns.extend(o.latencies_ns);
        for (k, v) in o.errors {
            *self.errors.entry(k).or_default() += v;
        }
        self.opened += o.opened;
        for (g, n) in o.groups {
            self.opened_with(g, n);
        }
    }

    fn opened_with(&mut self, group: Option<NamedGroup>, n: u64) {
        match self.groups.iter_mut().find(|(g, _)| *g == group) {
            Some((_, m)) => *m += n,
            None => self.groups.push((group, n)),
        }
    }
}

/// Makes sure `conn` is usable (opening a new one if needed); false after a failed open.
async fn ensure(
    t: &Target,
    conn: &mut Option<Conn>,
    fresh: bool,
    tally: &mut Tally,
    counted: bool,
) -> bool {
    if !fresh && conn.as_ref().is_some_and(|c| !c.is_closed()) {
        return true;
    }
    match open(t).await {
        Ok((c, group)) => {
            *conn = Some(c);
            if counted {
                tally.opened += 1;
                tally.opened_with(group, 1);
            }
            true
        }
        Err(f) => {
            *conn = None;
            if counted {
                tally.fail(f);
            }
            false
        }
    }
}

async fn closed_worker(
    t: Arc<Target>,
    plan: Arc<Plan>,
    clock: Clock,
    mut conn: Option<Conn>,
) -> Tally {
    let mut tally = Tally::default();
    loop {
        let t0 = Instant::now();
        if t0 >= clock.end {
            break;
        }
        let counted = t0 >= clock.measure_start;
        if !ensure(&t, &mut conn, plan.new_conn, &mut tally, counted).await {
            tokio::time::sleep(Duration::from_millis(10)).await;
            continue;
        }
        let Some(c) = conn.as_mut() else { continue };
        let r = send(c, t.request(plan.new_conn)).await;
        let done = Instant::now();
        if plan.new_conn {
            conn = None;
        }
        match r {
            Ok(()) if counted && done <= clock.end => {
                tally.latencies_ns.push((done - t0).as_nanos() as u64);
            }
            Ok(()) => {}
            Err(f) => {
                if counted {
                    tally.fail(f);
                }
                conn = None;
            }
        }
    }
    tally
}

type Queue = Arc<Mutex<mpsc::UnboundedReceiver<Instant>>>;

async fn open_worker(
    t: Arc<Target>,
    plan: Arc<Plan>,
    clock: Clock,
    queue: Queue,
    mut conn: Option<Conn>,
) -> Tally {
    // Requests still queued this long after the end are abandoned (reported as not sent).
    let give_up = clock.end + Duration::from_secs(2);
    let mut tally = Tally::default();
    loop {
        let due = {
            let mut q = queue.lock().await;
            match q.recv().await {
                Some(due) => due,
                None => break,
            }
        };
        if Instant::now() > give_up {
            break;
        }
        let counted = due >= clock.measure_start && due < clock.end;
        if !ensure(&t, &mut conn, plan.new_conn, &mut tally, counted).await {
            continue;
        }
        let Some(c) = conn.as_mut() else { continue };
        let r = send(c, t.request(plan.new_conn)).await;
        let done = Instant::now();
        if plan.new_conn {
            conn = None;
        }
        match r {
            Ok(()) if counted => tally.latencies_ns.push((done - due).as_nanos() as u64),
            Ok(()) => {}
            Err(f) => {
                if counted {
                    tally.fail(f);
                }
                conn = None;
            }
        }
    }
    tally
}

/// Sleeps then spins until `t`: the runtime's timer has millisecond granularity, too coarse to
/// schedule requests whose latency is a few hundred microseconds.
fn wait_until(t: Instant) {
    loop {
        let now = Instant::now();
        if now >= t {
            return;
        }
        let left = t - now;
        if left > Duration::from_micros(300) {
            std::thread::sleep(left - Duration::from_micros(200));
        } else {
            std::hint::spin_loop();
        }
    }
}

/// The open-loop pacer: a thread that enqueues each request's due time at that time.
fn pacer(rate: f64, start: Instant, end: Instant, tx: mpsc::UnboundedSender<Instant>) {
    std::thread::spawn(move || {
        let period = Duration::from_secs_f64(1.0 / rate);
        let mut k: u32 = 0;
        loop {
            let due = start + period * k;
            if due >= end {
                return;
            }
            wait_until(due);
            if tx.send(due).is_err() {
                return;
            }
            k += 1;
        }
    });
}

fn marker(line: &str) {
    let mut out = std::io::stdout().lock();
    let _ = writeln!(out, "{line}");
    let _ = out.flush();
}

/// Runs `plan` against `target`.
pub async fn run(target: Arc<Target>, plan: Plan) -> Report {
    let plan = Arc::new(plan);
    // h2 streams share connections opened up front; HTTP/1.1 workers own theirs.
    let mut initial: Vec<Option<Conn>> = Vec::new();
    let workers = if target.h2 && !plan.new_conn {
        for _ in 0..plan.connections {
            let c = open(&target).await.ok().map(|(c, _)| c);
            for _ in 0..plan.streams.max(1) {
                initial.push(c.as_ref().and_then(Conn::share));
            }
        }
        initial.len()
    } else {
        plan.connections
    };
    initial.resize_with(workers, || None);

    let start = Instant::now();
    let clock = Clock {
        measure_start: start + plan.warmup,
        end: start + plan.warmup + plan.duration,
    };
    let markers = plan.markers;
    let window = tokio::spawn(async move {
        tokio::time::sleep_until(clock.measure_start.into()).await;
        let cpu0 = self_cpu_seconds().unwrap_or(0.0);
        if markers {
            marker("window-start");
        }
        tokio::time::sleep_until(clock.end.into()).await;
        let cpu1 = self_cpu_seconds().unwrap_or(0.0);
        if markers {
            marker("window-end");
        }
        cpu1 - cpu0
    });

    let mut handles = Vec::new();
    match plan.schedule {
        Schedule::Closed => {
            for c in initial {
                handles.push(tokio::spawn(closed_worker(
                    target.clone(),
                    plan.clone(),
                    clock,
                    c,
                )));
            }
        }
        Schedule::Open { rate } => {
            let (tx, rx) = mpsc::unbounded_channel();
            pacer(rate, start, clock.end, tx);
            let queue: Queue = Arc::new(Mutex::new(rx));
            for c in initial {
                handles.push(tokio::spawn(open_worker(
                    target.clone(),
                    plan.clone(),
                    clock,
                    queue.clone(),
                    c,
                )));
            }
        }
    }
    let mut tally = Tally::default();
    for h in handles {
        if let Ok(t) = h.await {
            tally.merge(t);
        }
    }
    let cpu = window.await.unwrap_or(0.0);
    report(&target, &plan, tally, cpu)
}

fn report(target: &Target, plan: &Plan, mut tally: Tally, cpu: f64) -> Report {
    tally.latencies_ns.sort_unstable();
    let lat = &tally.latencies_ns;
    let us = |ns: u64| ns as f64 / 1000.0;
    let seconds = plan.duration.as_secs_f64();
    let count = lat.len() as u64;
    let errors: u64 = tally.errors.values().sum();
    let mean = if lat.is_empty() {
        0.0
    } else {
        lat.iter().map(|&n| n as f64).sum::<f64>() / lat.len() as f64 / 1000.0
    };
    let (schedule, rate, intended) = match plan.schedule {
        Schedule::Closed => ("closed", None, None),
        Schedule::Open { rate } => ("open", Some(rate), Some((rate * seconds).round() as u64)),
    };
    Report {
        schedule: schedule.into(),
        protocol: if target.h2 { "h2" } else { "http/1.1" }.into(),
        tls: target.tls.is_some(),
        new_connection_per_request: plan.new_conn,
        connections: plan.connections,
        rate,
        seconds,
        count,
        errors,
        error_kinds: tally.errors,
        requests_per_second: count as f64 / seconds,
        intended,
        connections_opened: tally.opened,
        key_exchange: tally
            .groups
            .iter()
            .filter_map(|(g, n)| Some((format!("{:?}", (*g)?), *n)))
            .collect(),
        latency_us: Latency {
            p50: us(quantile(lat, 0.50)),
            p90: us(quantile(lat, 0.90)),
            p99: us(quantile(lat, 0.99)),
            p999: us(quantile(lat, 0.999)),
            max: us(lat.last().copied().unwrap_or(0)),
            mean,
        },
        loadgen_cpu_seconds: cpu,
        loadgen_cpu_utilization: cpu / seconds,
    }
}

/// Opens `n` connections (`concurrency` at a time), sends one request on each, and returns the
/// live connections with the number of failures.
pub async fn hold(target: Arc<Target>, n: usize, concurrency: usize) -> (Vec<Conn>, u64) {
    let concurrency = concurrency.clamp(1, n.max(1));
    let mut handles = Vec::new();
    for w in 0..concurrency {
        let target = target.clone();
        let mine = n / concurrency + usize::from(w < n % concurrency);
        handles.push(tokio::spawn(async move {
            let mut held = Vec::with_capacity(mine);
            let mut failed = 0;
            for _ in 0..mine {
                match open(&target).await {
                    Ok((mut c, _)) => match send(&mut c, target.request(false)).await {
                        Ok(()) => held.push(c),
                        Err(_) => failed += 1,
                    },
                    Err(_) => failed += 1,
                }
            }
            (held, failed)
        }));
    }
    let mut all = Vec::with_capacity(n);
    let mut failed = 0;
    for h in handles {
        if let Ok((held, f)) = h.await {
            all.extend(held);
            failed += f;
        }
    }
    (all, failed)
}

#[cfg(test)]
mod tests {
    use std::convert::Infallible;

    use http::Response;
    use http_body_util::Full;
    use hyper::service::service_fn;
    use hyper_util::server::conn::auto;
    use tokio::net::TcpListener;

    use super::*;

    /// A fixed-response app (HTTP/1.1 and h2c) on a free port.
    async fn app() -> SocketAddr {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(async move {
            while let Ok((tcp, _)) = listener.accept().await {
                tokio::spawn(async move {
                    let svc = service_fn(|_req| async {
                        Ok::<_, Infallible>(Response::new(Full::new(Bytes::from_static(b"ok"))))
                    });
                    let _ = auto::Builder::new(TokioExecutor::new())
                        .serve_connection(TokioIo::new(tcp), svc)
                        .await;
                });
            }
        });
        addr
    }

    fn target(addr: SocketAddr, h2: bool) -> Arc<Target> {
        let uri = if h2 { "http://bench/" } else { "/" };
        Arc::new(Target {
            addr,
            tls: None,
            server_name: ServerName::try_from("localhost").unwrap(),
            h2,
            uri: uri.parse().unwrap(),
            host: HeaderValue::from_static("bench"),
            nagle: false,
        })
    }

    fn plan(connections: usize, schedule: Schedule) -> Plan {
        Plan {
            connections,
            streams: 1,
            schedule,
            new_conn: false,
            warmup: Duration::from_millis(50),
            duration: Duration::from_millis(400),
            markers: false,
        }
    }

    #[tokio::test]
    async fn closed_loop_keeps_connections_and_counts_answers() {
        let r = run(target(app().await, false), plan(4, Schedule::Closed)).await;
        assert!(r.count > 50, "{r:?}");
        assert_eq!(r.errors, 0, "{r:?}");
        assert_eq!(
            r.connections_opened, 0,
            "connections are opened before the window"
        );
        assert!(r.latency_us.p50 <= r.latency_us.p99 && r.latency_us.p99 <= r.latency_us.max);
    }

    #[tokio::test]
    async fn open_loop_sends_at_the_rate() {
        let r = run(
            target(app().await, false),
            plan(4, Schedule::Open { rate: 500.0 }),
        )
        .await;
        assert_eq!(r.intended, Some(200));
        assert!((190..=200).contains(&r.count), "{r:?}");
        assert_eq!(r.errors, 0);
    }

    #[tokio::test]
    async fn h2_streams_share_a_connection() {
        let mut p = plan(2, Schedule::Closed);
        p.streams = 4;
        let r = run(target(app().await, true), p).await;
        assert_eq!(r.protocol, "h2");
        assert!(r.count > 50 && r.errors == 0, "{r:?}");
    }

    #[tokio::test]
    async fn new_connection_per_request() {
        let mut p = plan(2, Schedule::Closed);
        p.new_conn = true;
        let r = run(target(app().await, false), p).await;
        assert!(r.count > 20, "{r:?}");
        // One connection per request (those straddling the window edges aside).
        assert!(r.connections_opened.abs_diff(r.count) <= 4, "{r:?}");
    }

    #[tokio::test]
    async fn refused_connections_are_errors() {
        let closed = {
            let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
            l.local_addr().unwrap()
        };
        let r = run(target(closed, false), plan(2, Schedule::Closed)).await;
        assert_eq!(r.count, 0);
        assert!(
            r.error_kinds.get("connect").copied().unwrap_or(0) > 0,
            "{r:?}"
        );
    }

    #[tokio::test]
    async fn hold_keeps_connections_open() {
        let (held, failed) = hold(target(app().await, false), 10, 3).await;
        assert_eq!((held.len(), failed), (10, 0));
        assert!(held.iter().all(|c| !c.is_closed()));
    }
}
