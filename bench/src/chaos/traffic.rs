//! Traffic that remembers every request: HTTP/1.1 keep-alive connections to a plaintext address (an
//! outbound sidecar's local listener), each request recorded with when it was sent, when it ended
//! and how. The chaos scenarios ask afterwards what happened before, during and after a fault. Runs
//! too long to remember every request ([`Traffic::counting`]) keep the failed ones and count the rest.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::{Request, StatusCode};
use http_body_util::{BodyExt, Empty};
use hyper::client::conn::http1;
use hyper_util::rt::TokioIo;
use tokio::net::TcpStream;
use tokio::sync::watch;

/// How one request ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    Ok,
    /// Any status but 200, with the sidecar's `x-meshid-reason` if it gave one.
    Status(u16, String),
    /// The connection could not be opened.
    Connect,
    /// The connection broke before an answer (reset, closed).
    Broken,
    /// No answer within the request timeout.
    Timeout,
}

impl Outcome {
    pub fn label(&self) -> String {
        match self {
            Self::Ok => "200".into(),
            Self::Status(code, reason) if reason.is_empty() => code.to_string(),
            Self::Status(code, reason) => format!("{code} ({reason})"),
            Self::Connect => "connection refused".into(),
            Self::Broken => "connection closed or reset before an answer".into(),
            Self::Timeout => "no answer within 10 s".into(),
        }
    }
}

/// One request.
#[derive(Debug, Clone)]
pub struct Rec {
    pub sent: Instant,
    pub done: Instant,
    pub outcome: Outcome,
}

/// Requests counted by outcome.
#[derive(Debug, Clone, Default)]
pub struct Tally {
    pub ok: u64,
    pub failed: u64,
    pub kinds: BTreeMap<String, u64>,
}

impl Tally {
    pub fn of<'a>(recs: impl IntoIterator<Item = &'a Rec>) -> Self {
        let mut t = Self::default();
        for r in recs {
            if r.outcome == Outcome::Ok {
                t.ok += 1;
            } else {
                t.failed += 1;
                *t.kinds.entry(r.outcome.label()).or_default() += 1;
            }
        }
        t
    }

    pub fn total(&self) -> u64 {
        self.ok + self.failed
    }

    /// "N failed (kind: n, ...)" or "none failed".
    pub fn describe(&self) -> String {
        if self.failed == 0 {
            return format!("{} sent, none failed", self.total());
        }
        let kinds: Vec<String> = self
            .kinds
            .iter()
            .map(|(k, n)| format!("{k}: {n}"))
            .collect();
        format!(
            "{} sent, {} failed ({})",
            self.total(),
            self.failed,
            kinds.join(", ")
        )
    }
}

/// Requests (in `recs`) sent at or after `from` and before `to`.
pub fn sent_between(recs: &[Rec], from: Instant, to: Instant) -> Vec<Rec> {
    recs.iter()
        .filter(|r| r.sent >= from && r.sent < to)
        .cloned()
        .collect()
}

/// Requests in flight at `at`: sent before it, ended after it.
pub fn in_flight_at(recs: &[Rec], at: Instant) -> Vec<Rec> {
    recs.iter()
        .filter(|r| r.sent < at && r.done >= at)
        .cloned()
        .collect()
}

/// The end of the first successful request sent at or after `from`.
pub fn first_ok_after(recs: &[Rec], from: Instant) -> Option<Instant> {
    recs.iter()
        .filter(|r| r.sent >= from && r.outcome == Outcome::Ok)
        .map(|r| r.done)
        .min()
}

/// How each connection spaces its requests.
#[derive(Debug, Clone, Copy)]
pub enum Pace {
    /// Send, wait for the answer, pause this long (zero: closed loop, as fast as answers come).
    Pause(Duration),
    /// One request every this long, on a fixed schedule: a fixed rate while answers come in time
    /// (a late answer delays the next request; a connection never sends two at once).
    Every(Duration),
}

/// Running traffic.
pub struct Traffic {
    stop: watch::Sender<bool>,
    recs: Arc<Mutex<Vec<Rec>>>,
    /// Successful requests ended so far (also those not kept in `recs`).
    ok: Arc<AtomicU64>,
    keep_ok: bool,
    tasks: Vec<tokio::task::JoinHandle<()>>,
}

const REQUEST_TIMEOUT: Duration = Duration::from_secs(10);

impl Traffic {
    /// `connections` workers against `addr`, each sending a request, waiting for its answer, then
    /// pausing `pause` (zero: closed loop, as fast as answers come).
    pub fn start(addr: SocketAddr, connections: usize, pause: Duration) -> Self {
        Self::spawn(addr, connections, Pace::Pause(pause), true)
    }

    /// `connections` workers against `addr` at `pace`, remembering only the failed requests and
    /// counting the successful ones: for runs of millions of requests.
    pub fn counting(addr: SocketAddr, connections: usize, pace: Pace) -> Self {
        Self::spawn(addr, connections, pace, false)
    }

    fn spawn(addr: SocketAddr, connections: usize, pace: Pace, keep_ok: bool) -> Self {
        let (stop, rx) = watch::channel(false);
        let recs = Arc::new(Mutex::new(Vec::new()));
        let ok = Arc::new(AtomicU64::new(0));
        let t0 = Instant::now();
        let tasks = (0..connections)
            .map(|i| {
                // Fixed schedules start spread over one period, not all at once.
                let first = match pace {
                    Pace::Every(p) => t0 + p.mul_f64(i as f64 / connections as f64),
                    Pace::Pause(_) => t0,
                };
                let w = Worker {
                    addr,
                    pace,
                    first,
                    recs: recs.clone(),
                    ok: ok.clone(),
                    keep_ok,
                };
                tokio::spawn(w.run(rx.clone()))
            })
            .collect();
        Self {
            stop,
            recs,
            ok,
            keep_ok,
            tasks,
        }
    }

    /// Every request recorded so far (with [`Traffic::counting`], the failed ones).
    pub fn snapshot(&self) -> Vec<Rec> {
        self.recs.lock().map(|r| r.clone()).unwrap_or_default()
    }

    /// Requests ended so far.
    pub fn count(&self) -> usize {
        let recorded = self.recs.lock().map(|r| r.len()).unwrap_or(0);
        if self.keep_ok {
            recorded
        } else {
            recorded + self.ok.load(Ordering::Relaxed) as usize
        }
    }

    /// Stops the workers (a request in flight finishes first) and returns every request.
    pub async fn stop(self) -> Vec<Rec> {
        self.finish().await.1
    }

    /// Stops the workers: how many requests succeeded, and every request recorded (with
    /// [`Traffic::counting`], the failed ones), in the order they were sent.
    pub async fn finish(mut self) -> (u64, Vec<Rec>) {
        self.stop.send_replace(true);
        for t in std::mem::take(&mut self.tasks) {
            let _ = t.await;
        }
        let mut recs = self.recs.lock().map(|r| r.clone()).unwrap_or_default();
        recs.sort_by_key(|r| r.sent);
        (self.ok.load(Ordering::Relaxed), recs)
    }
}

impl Drop for Traffic {
    /// Traffic a scenario leaves behind (it could not finish) stops with it.
    fn drop(&mut self) {
        self.stop.send_replace(true);
        for t in &self.tasks {
            t.abort();
        }
    }
}

/// One connection's loop.
struct Worker {
    addr: SocketAddr,
    pace: Pace,
    /// When a fixed schedule sends its first request.
    first: Instant,
    recs: Arc<Mutex<Vec<Rec>>>,
    ok: Arc<AtomicU64>,
    keep_ok: bool,
}

impl Worker {
    async fn run(self, stop: watch::Receiver<bool>) {
        let Self {
            addr,
            pace,
            first,
            recs,
            ok,
            keep_ok,
        } = self;
        let pause = match pace {
            Pace::Pause(p) => p,
            Pace::Every(_) => Duration::ZERO,
        };
        let mut due = first;
        let mut conn: Option<http1::SendRequest<Empty<Bytes>>> = None;
        while !*stop.borrow() {
            if let Pace::Every(period) = pace {
                tokio::time::sleep_until(due.into()).await;
                // Behind by more than a second (a stall): start the schedule again from now
                // rather than sending the missed requests in a burst.
                let now = Instant::now();
                due += period;
                if due + Duration::from_secs(1) < now {
                    due = now;
                }
            }
            let sent = Instant::now();
            let outcome = exchange(addr, &mut conn).await;
            let failed = outcome != Outcome::Ok;
            if failed {
                conn = None;
            } else {
                ok.fetch_add(1, Ordering::Relaxed);
            }
            if (failed || keep_ok)
                && let Ok(mut r) = recs.lock()
            {
                r.push(Rec {
                    sent,
                    done: Instant::now(),
                    outcome,
                });
            }
            // A refused connection fails at once: do not spin on it.
            let wait = if failed {
                pause.max(Duration::from_millis(5))
            } else {
                pause
            };
            if !wait.is_zero() {
                tokio::time::sleep(wait).await;
            }
        }
    }
}

/// One request with the timeout: how it ended (the connection is dropped on a timeout).
async fn exchange(
    addr: SocketAddr,
    conn: &mut Option<http1::SendRequest<Empty<Bytes>>>,
) -> Outcome {
    match tokio::time::timeout(REQUEST_TIMEOUT, one(addr, conn)).await {
        Ok(o) => o,
        Err(_) => {
            *conn = None;
            Outcome::Timeout
        }
    }
}

/// One request on the worker's connection (opened first if there is none).
async fn one(addr: SocketAddr, conn: &mut Option<http1::SendRequest<Empty<Bytes>>>) -> Outcome {
    if conn.as_ref().is_none_or(|c| c.is_closed()) {
        let Ok(tcp) = TcpStream::connect(addr).await else {
            return Outcome::Connect;
        };
        let _ = tcp.set_nodelay(true);
        let Ok((send, c)) = http1::handshake(TokioIo::new(tcp)).await else {
            return Outcome::Broken;
        };
        tokio::spawn(c);
        *conn = Some(send);
    }
    let Some(send) = conn.as_mut() else {
        return Outcome::Broken;
    };
    if send.ready().await.is_err() {
        return Outcome::Broken;
    }
    let mut req = Request::new(Empty::new());
    *req.uri_mut() = http::Uri::from_static("/");
    req.headers_mut()
        .insert(http::header::HOST, http::HeaderValue::from_static("chaos"));
    let Ok(resp) = send.send_request(req).await else {
        return Outcome::Broken;
    };
    let status = resp.status();
    let reason = resp
        .headers()
        .get("x-meshid-reason")
        .and_then(|v| v.to_str().ok())
        .unwrap_or_default()
        .to_owned();
    if resp.into_body().collect().await.is_err() {
        return Outcome::Broken;
    }
    if status == StatusCode::OK {
        Outcome::Ok
    } else {
        Outcome::Status(status.as_u16(), reason)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rec(sent_ms: u64, done_ms: u64, outcome: Outcome, t0: Instant) -> Rec {
        Rec {
            sent: t0 + Duration::from_millis(sent_ms),
            done: t0 + Duration::from_millis(done_ms),
            outcome,
        }
    }

    /// An app answering every request with `status`.
    async fn app(status: StatusCode) -> SocketAddr {
        use hyper::service::service_fn;
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(async move {
            while let Ok((tcp, _)) = listener.accept().await {
                tokio::spawn(async move {
                    let svc = service_fn(move |_req| async move {
                        let mut resp = http::Response::new(http_body_util::Empty::<Bytes>::new());
                        *resp.status_mut() = status;
                        Ok::<_, std::convert::Infallible>(resp)
                    });
                    let _ = hyper::server::conn::http1::Builder::new()
                        .serve_connection(TokioIo::new(tcp), svc)
                        .await;
                });
            }
        });
        addr
    }

    #[tokio::test]
    async fn counting_traffic_keeps_only_the_failures() {
        let all_ok = app(StatusCode::OK).await;
        let t = Traffic::counting(all_ok, 4, Pace::Every(Duration::from_millis(5)));
        tokio::time::sleep(Duration::from_millis(300)).await;
        assert!(t.count() > 0);
        let (ok, recs) = t.finish().await;
        assert!(ok > 0 && recs.is_empty(), "{ok} {recs:?}");

        // A fixed schedule sends no faster than it says, however fast the answers come.
        let t0 = Instant::now();
        let t = Traffic::counting(all_ok, 2, Pace::Every(Duration::from_millis(100)));
        tokio::time::sleep(Duration::from_millis(250)).await;
        let (ok, _) = t.finish().await;
        let due = 2.0 * (t0.elapsed().as_secs_f64() / 0.1 + 1.0);
        assert!(ok as f64 <= due, "{ok} sent, {due} due at most");

        let failing = app(StatusCode::SERVICE_UNAVAILABLE).await;
        let t = Traffic::counting(failing, 2, Pace::Pause(Duration::ZERO));
        tokio::time::sleep(Duration::from_millis(100)).await;
        let n = t.count();
        let (ok, recs) = t.finish().await;
        assert_eq!(ok, 0);
        assert!(n > 0 && recs.len() >= n, "{n} {}", recs.len());
        assert!(
            recs.iter()
                .all(|r| r.outcome == Outcome::Status(503, String::new()))
        );
    }

    #[test]
    fn windows_and_in_flight() {
        let t0 = Instant::now();
        let recs = vec![
            rec(0, 10, Outcome::Ok, t0),
            rec(5, 30, Outcome::Broken, t0),
            rec(20, 25, Outcome::Connect, t0),
            rec(40, 50, Outcome::Ok, t0),
        ];
        let at = t0 + Duration::from_millis(22);
        assert_eq!(in_flight_at(&recs, at).len(), 2);
        let t = Tally::of(&sent_between(&recs, t0, at));
        assert_eq!((t.ok, t.failed), (1, 2));
        assert_eq!(
            first_ok_after(&recs, t0 + Duration::from_millis(1)),
            Some(t0 + Duration::from_millis(50))
        );
        assert!(t.describe().contains("connection refused: 1"));
    }
}
