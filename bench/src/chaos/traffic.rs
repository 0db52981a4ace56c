//! Traffic that remembers every request: HTTP/1.1 keep-alive connections to a plaintext address (an
//! outbound sidecar's local listener), each request recorded with when it was sent, when it ended
//! and how. The chaos scenarios ask afterwards what happened before, during and after a fault.

use std::collections::BTreeMap;
use std::net::SocketAddr;
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

/// Running traffic.
pub struct Traffic {
    stop: watch::Sender<bool>,
    recs: Arc<Mutex<Vec<Rec>>>,
    tasks: Vec<tokio::task::JoinHandle<()>>,
}

const REQUEST_TIMEOUT: Duration = Duration::from_secs(10);

impl Traffic {
    /// `connections` workers against `addr`, each sending a request, waiting for its answer, then
    /// pausing `pause` (zero: closed loop, as fast as answers come).
    pub fn start(addr: SocketAddr, connections: usize, pause: Duration) -> Self {
        let (stop, rx) = watch::channel(false);
        let recs = Arc::new(Mutex::new(Vec::new()));
        let tasks = (0..connections)
            .map(|_| tokio::spawn(worker(addr, pause, recs.clone(), rx.clone())))
            .collect();
        Self { stop, recs, tasks }
    }

    /// Every request recorded so far.
    pub fn snapshot(&self) -> Vec<Rec> {
        self.recs.lock().map(|r| r.clone()).unwrap_or_default()
    }

    pub fn count(&self) -> usize {
        self.recs.lock().map(|r| r.len()).unwrap_or(0)
    }

    /// Stops the workers (a request in flight finishes first) and returns every request.
    pub async fn stop(self) -> Vec<Rec> {
        self.stop.send_replace(true);
        for t in self.tasks {
            let _ = t.await;
        }
        let mut recs = self.recs.lock().map(|r| r.clone()).unwrap_or_default();
        recs.sort_by_key(|r| r.sent);
        recs
    }
}

async fn worker(
    addr: SocketAddr,
    pause: Duration,
    recs: Arc<Mutex<Vec<Rec>>>,
    stop: watch::Receiver<bool>,
) {
    let mut conn: Option<http1::SendRequest<Empty<Bytes>>> = None;
    while !*stop.borrow() {
        let sent = Instant::now();
        let outcome = match tokio::time::timeout(REQUEST_TIMEOUT, one(addr, &mut conn)).await {
            Ok(o) => o,
            Err(_) => {
                conn = None;
                Outcome::Timeout
            }
        };
        let failed = outcome != Outcome::Ok;
        if failed {
            conn = None;
        }
        if let Ok(mut r) = recs.lock() {
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
