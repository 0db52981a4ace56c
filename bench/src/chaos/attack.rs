//! The attacker's and the allowed client's side of the `floods` scenario: connection floods (idle
//! connections and slow clients dribbling a TLS ClientHello or an HTTP request head a byte at a
//! time), each connection's life recorded; allowed requests recorded with when they were sent, when
//! they ended and whether they succeeded; and the attacked process's resident memory sampled from
//! `/proc`.

use std::future::Future;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::Result;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpSocket, TcpStream};
use tokio::sync::watch;

/// What a flood connection does once connected.
#[derive(Clone)]
pub enum Attack {
    /// Connects and sends nothing.
    Idle,
    /// Sends these bytes one at a time, `every` apart (then keeps sending the last one).
    Slow {
        bytes: Arc<Vec<u8>>,
        every: Duration,
    },
}

/// The flood's sources: 127.0.1.1 to 127.0.1.n (the allowed clients connect from 127.0.0.1), so
/// that per-source limits see a flood from many hosts.
pub fn sources(n: u8) -> Vec<IpAddr> {
    (1..=n.max(1))
        .map(|i| IpAddr::V4(Ipv4Addr::new(127, 0, 1, i)))
        .collect()
}

/// One flood connection's life.
#[derive(Debug, Clone, Copy)]
pub struct ConnLife {
    pub opened: Instant,
    /// How long it lived: until the server closed it, or until the flood ended (`by_server` false).
    pub lived: Duration,
    pub by_server: bool,
}

/// Everything one flood did.
#[derive(Debug, Default, Clone)]
pub struct FloodLog {
    pub lives: Vec<ConnLife>,
    /// Connection attempts that did not connect within 2 s (listen backlog full) or failed.
    pub connect_failed: u64,
    /// Most flood connections open at once (as seen by the attacker).
    pub peak_open: usize,
}

impl FloodLog {
    /// Connections the server closed within `at_once` of their opening (refused at a limit).
    pub fn closed_at_once(&self, at_once: Duration) -> usize {
        self.lives
            .iter()
            .filter(|l| l.by_server && l.lived < at_once)
            .count()
    }

    /// The longest a connection lived, closed by the server or still open at the end.
    pub fn longest(&self) -> Duration {
        self.lives.iter().map(|l| l.lived).max().unwrap_or_default()
    }
}

/// A flood: `slots` connections kept open at once, from `sources` in turn, each reopened (after a
/// short pause) whenever the server closes it, until `stop`.
pub struct Flood {
    stop: watch::Sender<bool>,
    log: Arc<Mutex<FloodLog>>,
    tasks: Vec<tokio::task::JoinHandle<()>>,
}

impl Flood {
    pub fn start(addr: SocketAddr, slots: usize, sources: &[IpAddr], attack: Attack) -> Self {
        let (stop, rx) = watch::channel(false);
        let log = Arc::new(Mutex::new(FloodLog::default()));
        let open = Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let tasks = (0..slots)
            .map(|i| {
                let from = sources[i % sources.len()];
                tokio::spawn(slot(
                    addr,
                    from,
                    attack.clone(),
                    log.clone(),
                    open.clone(),
                    rx.clone(),
                ))
            })
            .collect();
        Self { stop, log, tasks }
    }

    /// Ends every flood connection and returns what happened to them.
    pub async fn stop(self) -> FloodLog {
        self.stop.send_replace(true);
        for t in self.tasks {
            let _ = t.await;
        }
        self.log.lock().map(|l| l.clone()).unwrap_or_default()
    }
}

async fn connect_from(from: IpAddr, addr: SocketAddr) -> std::io::Result<TcpStream> {
    let socket = TcpSocket::new_v4()?;
    socket.bind(SocketAddr::new(from, 0))?;
    match tokio::time::timeout(Duration::from_secs(2), socket.connect(addr)).await {
        Ok(r) => r,
        Err(_) => Err(std::io::ErrorKind::TimedOut.into()),
    }
}

async fn slot(
    addr: SocketAddr,
    from: IpAddr,
    attack: Attack,
    log: Arc<Mutex<FloodLog>>,
    open: Arc<std::sync::atomic::AtomicUsize>,
    mut stop: watch::Receiver<bool>,
) {
    use std::sync::atomic::Ordering::Relaxed;
    while !*stop.borrow() {
        let mut tcp = match connect_from(from, addr).await {
            Ok(t) => t,
            Err(_) => {
                if let Ok(mut l) = log.lock() {
                    l.connect_failed += 1;
                }
                tokio::time::sleep(Duration::from_millis(200)).await;
                continue;
            }
        };
        let opened = Instant::now();
        let now_open = open.fetch_add(1, Relaxed) + 1;
        if let Ok(mut l) = log.lock() {
            l.peak_open = l.peak_open.max(now_open);
        }
        let by_server = tokio::select! {
            () = hold(&mut tcp, &attack) => true,
            _ = stop.wait_for(|s| *s) => false,
        };
        let lived = opened.elapsed();
        open.fetch_sub(1, Relaxed);
        drop(tcp);
        if let Ok(mut l) = log.lock() {
            l.lives.push(ConnLife {
                opened,
                lived,
                by_server,
            });
        }
        // A connection refused at once is tried again after a pause (the flood keeps its pressure
        // without spinning); one that lived is replaced sooner.
        let pause = if lived < Duration::from_millis(500) {
            Duration::from_millis(500)
        } else {
            Duration::from_millis(50)
        };
        tokio::select! {
            () = tokio::time::sleep(pause) => {}
            _ = stop.wait_for(|s| *s) => {}
        }
    }
}

/// Holds the connection as the attack says until the server closes it (EOF, reset, or a write that
/// fails).
async fn hold(tcp: &mut TcpStream, attack: &Attack) {
    let (mut rd, mut wr) = tcp.split();
    let mut buf = [0u8; 4096];
    let reader = async {
        loop {
            match rd.read(&mut buf).await {
                Ok(0) | Err(_) => return,
                Ok(_) => {}
            }
        }
    };
    let writer = async {
        match attack {
            Attack::Idle => std::future::pending::<()>().await,
            Attack::Slow { bytes, every } => {
                let last = bytes.last().copied().unwrap_or(b'a');
                for b in bytes.iter().copied().chain(std::iter::repeat(last)) {
                    if wr.write_all(&[b]).await.is_err() {
                        return;
                    }
                    tokio::time::sleep(*every).await;
                }
            }
        }
    };
    tokio::select! {
        () = reader => {}
        () = writer => {}
    }
}

/// A real TLS ClientHello (as rustls sends it, offering h2 and http/1.1), to dribble.
pub fn client_hello() -> Result<Vec<u8>> {
    let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
    let mut config = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()?
        .with_root_certificates(rustls::RootCertStore::empty())
        .with_no_client_auth();
    config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    let name = rustls_pki_types::ServerName::try_from("localhost")?;
    let mut conn = rustls::ClientConnection::new(Arc::new(config), name)?;
    let mut out = Vec::new();
    while conn.wants_write() {
        conn.write_tls(&mut out)?;
    }
    Ok(out)
}

/// An HTTP/1.1 request head that never ends, to dribble.
pub fn endless_head(path: &str) -> Vec<u8> {
    format!("GET {path} HTTP/1.1\r\nHost: flood\r\nX-Slow: a").into_bytes()
}

/// One allowed request: when it was sent, when it ended, and whether it succeeded.
#[derive(Debug, Clone)]
pub struct Req {
    pub sent: Instant,
    pub done: Instant,
    pub error: Option<String>,
}

/// An allowed request, made again and again by [`Allowed`].
pub type RequestFn =
    Arc<dyn Fn() -> Pin<Box<dyn Future<Output = Result<()>> + Send>> + Send + Sync>;

/// Allowed traffic: `workers` loops, each making a request, waiting `pause`, and again.
pub struct Allowed {
    stop: watch::Sender<bool>,
    recs: Arc<Mutex<Vec<Req>>>,
    tasks: Vec<tokio::task::JoinHandle<()>>,
}

const ALLOWED_TIMEOUT: Duration = Duration::from_secs(10);

impl Allowed {
    pub fn start(f: RequestFn, workers: usize, pause: Duration) -> Self {
        let (stop, rx) = watch::channel(false);
        let recs = Arc::new(Mutex::new(Vec::new()));
        let tasks = (0..workers)
            .map(|_| {
                let (f, recs, rx) = (f.clone(), recs.clone(), rx.clone());
                tokio::spawn(async move {
                    while !*rx.borrow() {
                        let sent = Instant::now();
                        let error = match tokio::time::timeout(ALLOWED_TIMEOUT, f()).await {
                            Ok(Ok(())) => None,
                            Ok(Err(e)) => Some(format!("{e:#}")),
                            Err(_) => Some("no answer within 10 s".into()),
                        };
                        if let Ok(mut r) = recs.lock() {
                            r.push(Req {
                                sent,
                                done: Instant::now(),
                                error,
                            });
                        }
                        tokio::time::sleep(pause).await;
                    }
                })
            })
            .collect();
        Self { stop, recs, tasks }
    }

    pub fn snapshot(&self) -> Vec<Req> {
        self.recs.lock().map(|r| r.clone()).unwrap_or_default()
    }

    pub async fn stop(self) -> Vec<Req> {
        self.stop.send_replace(true);
        for t in self.tasks {
            let _ = t.await;
        }
        self.recs.lock().map(|r| r.clone()).unwrap_or_default()
    }
}

/// Allowed requests sent in `[from, to)`: (total, succeeded, p99 of the succeeded ones' time, the
/// most common error).
pub fn window(recs: &[Req], from: Instant, to: Instant) -> Window {
    let mut w = Window::default();
    let mut times = Vec::new();
    let mut errors: std::collections::BTreeMap<String, u64> = Default::default();
    for r in recs.iter().filter(|r| r.sent >= from && r.sent < to) {
        w.total += 1;
        match &r.error {
            None => {
                w.ok += 1;
                times.push(r.done.saturating_duration_since(r.sent).as_secs_f64());
            }
            Some(e) => *errors.entry(short(e)).or_default() += 1,
        }
    }
    times.sort_by(f64::total_cmp);
    if !times.is_empty() {
        let i = ((times.len() as f64) * 0.99).ceil() as usize;
        w.p99 = Some(times[i.clamp(1, times.len()) - 1]);
    }
    w.top_error = errors.into_iter().max_by_key(|(_, n)| *n);
    w
}

fn short(e: &str) -> String {
    let mut s: String = e.chars().take(90).collect();
    if s.len() < e.len() {
        s.push('…');
    }
    s
}

/// Allowed requests in one window.
#[derive(Debug, Default, Clone)]
pub struct Window {
    pub total: u64,
    pub ok: u64,
    pub p99: Option<f64>,
    pub top_error: Option<(String, u64)>,
}

impl Window {
    /// Succeeded / sent, in percent (NaN when none was sent).
    pub fn success_pct(&self) -> f64 {
        if self.total == 0 {
            f64::NAN
        } else {
            self.ok as f64 * 100.0 / self.total as f64
        }
    }

    pub fn describe(&self) -> String {
        let mut s = format!("{} of {} succeeded", self.ok, self.total);
        if let Some(p) = self.p99 {
            s.push_str(&format!(", p99 {:.1} ms", p * 1000.0));
        }
        if let Some((e, n)) = &self.top_error {
            s.push_str(&format!("; most common failure ({n}): {e}"));
        }
        s
    }
}

/// Resident memory of `pid` in KiB, from `/proc/<pid>/status`: (VmRSS now, VmHWM: the peak so far).
pub fn rss_kib(pid: u32) -> Option<(u64, u64)> {
    let text = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let field = |name: &str| {
        text.lines()
            .find_map(|l| l.strip_prefix(name))
            .and_then(|v| v.split_whitespace().next())
            .and_then(|v| v.parse::<u64>().ok())
    };
    Some((field("VmRSS:")?, field("VmHWM:")?))
}

/// The machine's count of listen-queue overflows (`TcpExt: ListenOverflows` in
/// `/proc/net/netstat`; 0 when unreadable).
pub fn listen_overflows() -> u64 {
    let text = std::fs::read_to_string("/proc/net/netstat").unwrap_or_default();
    let mut lines = text.lines();
    while let (Some(names), Some(values)) = (lines.next(), lines.next()) {
        if !names.starts_with("TcpExt:") {
            continue;
        }
        let at = names
            .split_whitespace()
            .position(|n| n == "ListenOverflows");
        if let Some(v) = at.and_then(|i| values.split_whitespace().nth(i)) {
            return v.parse().unwrap_or(0);
        }
    }
    0
}

/// Samples a process's RSS every 50 ms until stopped: the largest sample.
pub struct RssSampler {
    stop: watch::Sender<bool>,
    task: tokio::task::JoinHandle<u64>,
}

impl RssSampler {
    pub fn start(pid: u32) -> Self {
        let (stop, rx) = watch::channel(false);
        let task = tokio::spawn(async move {
            let mut peak = 0;
            while !*rx.borrow() {
                if let Some((now, _)) = rss_kib(pid) {
                    peak = peak.max(now);
                }
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            peak
        });
        Self { stop, task }
    }

    pub async fn stop(self) -> u64 {
        self.stop.send_replace(true);
        self.task.await.unwrap_or(0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn windows_count_and_rank() {
        let t0 = Instant::now();
        let req = |sent: u64, took: u64, error: Option<&str>| Req {
            sent: t0 + Duration::from_millis(sent),
            done: t0 + Duration::from_millis(sent + took),
            error: error.map(str::to_owned),
        };
        let recs = vec![
            req(0, 5, None),
            req(10, 20, None),
            req(20, 1, Some("refused")),
            req(30, 1, Some("refused")),
            req(500, 1, None),
        ];
        let w = window(&recs, t0, t0 + Duration::from_millis(100));
        assert_eq!((w.total, w.ok), (4, 2));
        assert_eq!(w.p99, Some(0.02));
        assert_eq!(w.top_error, Some(("refused".into(), 2)));
        assert_eq!(w.success_pct(), 50.0);
        assert!(window(&recs, t0, t0).success_pct().is_nan());
    }

    #[test]
    fn a_client_hello_is_a_tls_handshake_record() {
        let hello = client_hello().unwrap();
        assert_eq!(hello[0], 0x16, "handshake record");
        assert!(hello.len() > 100);
    }
}
