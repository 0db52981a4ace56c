//! The CA's admin routes on the shared admin server ([`meshid_runtime::admin`]): `/healthz`,
//! `/readyz`, `/metrics`, the `/rotation` JSON report (and `/rotation/fresh`), and `/jwks-status`
//! (what service-account tokens are verified against, for `meshid-ca check`). The rotation report
//! lists every identity, serial and lineage of the fleet: it answers only a caller that presents
//! the CA directory's admin token ([`crate::admin_token`]) as `Authorization: Bearer`; the other
//! routes stay open to whoever reaches the port.

use std::path::PathBuf;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::StatusCode;
use meshid_runtime::admin::{self, AdminFuture, AdminResponse, AdminRoutes};
use meshid_runtime::log_limit::LineBudget;
use prometheus_client::metrics::counter::Counter;
use tokio::sync::watch;

use crate::admin_token::{
    AdminToken, MAX_SKEW_SECS, Proof, RESPONSE_INSTANCE_HEADER, RESPONSE_MAC_HEADER, signed_nonce,
};

/// Produces the `/rotation` JSON document. Blocking: it reads the CA directory and walks the
/// whole fleet.
pub type RotationJson = Arc<dyn Fn() -> Result<String, String> + Send + Sync>;

/// Produces the `/jwks-status` JSON document (`None`: service-account tokens are not enabled).
pub type JwksJson = Box<dyn Fn() -> Option<String> + Send + Sync>;

/// The `/rotation` report, computed on the blocking pool (never on the async workers, which serve
/// issuance), one computation at a time. A report of 100k sidecars takes tens of milliseconds and
/// megabytes: a burst of GETs (dashboards, `meshid-ca check` of every replica) shares one
/// computation, and a report started at most [`RotationCache::MAX_AGE`] ago answers them.
/// `fresh` callers (the rotation commands, whose gates decide on the report) get one started after
/// they asked, so it shows everything that happened before, their own last step included.
pub struct RotationCache {
    compute: RotationJson,
    max_age: Duration,
    /// The last report and when its computation started; held across the computation, so
    /// callers queue behind it instead of starting their own.
    last: tokio::sync::Mutex<Option<(Instant, Result<Bytes, String>)>>,
}

impl RotationCache {
    /// How old a report may be when it answers a plain `/rotation`.
    pub const MAX_AGE: Duration = Duration::from_secs(1);

    pub fn new(compute: RotationJson, max_age: Duration) -> Self {
        Self {
            compute,
            max_age,
            last: tokio::sync::Mutex::new(None),
        }
    }

    /// The report: the last one if it suits (`fresh`: started after this call; otherwise started
    /// within `max_age`), else a new one.
    pub async fn get(self: &Arc<Self>, fresh: bool) -> Result<Bytes, String> {
        let asked = Instant::now();
        // In a task of its own: a caller that gives up (its connection's deadline) leaves the
        // computation to finish and answer those queued behind it. Computed in the caller's
        // future, a cancelled caller let go of the lock with its computation still running on
        // the blocking pool, and the next caller started another beside it.
        let this = self.clone();
        match tokio::spawn(async move { this.get_after(asked, fresh).await }).await {
            Ok(report) => report,
            Err(e) => Err(format!("rotation report failed: {e}")),
        }
    }

    async fn get_after(&self, asked: Instant, fresh: bool) -> Result<Bytes, String> {
        let mut last = self.last.lock().await;
        if let Some((started, result)) = &*last {
            let suits = if fresh {
                *started >= asked
            } else {
                started.elapsed() <= self.max_age
            };
            if suits {
                return result.clone();
            }
        }
        let started = Instant::now();
        let compute = self.compute.clone();
        let result = match tokio::task::spawn_blocking(move || compute()).await {
            Ok(r) => r.map(Bytes::from),
            Err(e) => Err(format!("rotation report failed: {e}")),
        };
        *last = Some((started, result.clone()));
        result
    }
}

/// What the CA adds to the shared admin server.
pub struct CaAdmin {
    pub rotation: Arc<RotationCache>,
    pub jwks: JwksJson,
    pub shutdown: watch::Receiver<bool>,
    /// The CA directory, whose admin token opens the rotation report (read at every request, so
    /// a Secret update reaches it without a restart).
    pub dir: PathBuf,
    /// Rotation report requests refused for a missing or wrong token.
    pub unauthorized: Counter,
    /// Lines about refused requests (anyone who reaches the port can cause them).
    pub refusal_log: Mutex<LineBudget>,
    /// The dates of the CA's TLS serving certificate: not ready once it has expired.
    pub serving: Arc<crate::tls::ServingDates>,
    /// The nonces of the signed requests admitted within the last [`MAX_SKEW_SECS`] (twice: a
    /// request's time may be that far either way): one replayed is refused.
    pub seen_nonces: Mutex<SeenNonces>,
    /// This process's instance ([`crate::admin_token::new_instance`]), in its signed answers.
    pub instance: String,
}

/// Nonces of admitted signed requests, with their times, oldest first.
#[derive(Default)]
pub struct SeenNonces(std::collections::VecDeque<(i64, String)>);

/// The most nonces remembered: every one is of a request signed with the admin token.
const MAX_SEEN_NONCES: usize = 4096;

impl SeenNonces {
    /// Records `nonce` of a request of time `t` at `now`; false when it was seen already (or
    /// the window is full of requests: only holders of the token can fill it).
    fn first_time(&mut self, nonce: &str, now: i64) -> bool {
        while self
            .0
            .front()
            .is_some_and(|(t, _)| t.saturating_add(2 * MAX_SKEW_SECS) < now)
        {
            self.0.pop_front();
        }
        if self.0.len() >= MAX_SEEN_NONCES || self.0.iter().any(|(_, n)| n == nonce) {
            return false;
        }
        self.0.push_back((now, nonce.to_owned()));
        true
    }
}

/// Refusal lines: 5 at once, then one a second.
const REFUSAL_LINES: (f64, f64) = (5.0, 1.0);

impl CaAdmin {
    /// Why a rotation report request for `path` with this `Authorization` header is refused, if
    /// it is.
    fn unauthorized(
        &self,
        authorization: Option<&[u8]>,
        path: &str,
    ) -> Option<(StatusCode, &'static str)> {
        let now = meshid_runtime::time::unix_now();
        match AdminToken::load(&crate::ca_dir::snapshot(&self.dir)) {
            Ok(Some(token)) => match token.admits_at(authorization, path, now) {
                Some(Proof::Bearer) => None,
                Some(Proof::Signed { nonce, .. }) => {
                    if self
                        .seen_nonces
                        .lock()
                        .unwrap_or_else(PoisonError::into_inner)
                        .first_time(&nonce, now)
                    {
                        None
                    } else {
                        Some((
                            StatusCode::UNAUTHORIZED,
                            "this signed request was answered already (a replay): sign a new \
                             one\n",
                        ))
                    }
                }
                None if authorization.is_none() => Some((
                    StatusCode::UNAUTHORIZED,
                    "the rotation report needs the CA directory's admin token: meshid-ca rotate \
                     and check --dir sign their requests with it (or send `Authorization: \
                     Bearer <token>`)\n",
                )),
                None => Some((
                    StatusCode::UNAUTHORIZED,
                    "wrong admin token, or a signed request of another path or more than 5 \
                     minutes off this CA's clock: the rotation report needs the CA directory's \
                     admin token\n",
                )),
            },
            Ok(None) => Some((
                StatusCode::UNAUTHORIZED,
                "this CA directory has no admin token (no admin-token, no jwt.key): the rotation \
                 report is served to no one\n",
            )),
            Err(e) => {
                tracing::error!(error = %e, "reading the admin token");
                Some((
                    StatusCode::INTERNAL_SERVER_ERROR,
                    "the CA directory's admin token is unreadable (see the CA's log)\n",
                ))
            }
        }
    }
}

impl AdminRoutes for CaAdmin {
    fn not_ready(&self) -> Option<String> {
        if *self.shutdown.borrow() {
            return Some("shutting down".to_owned());
        }
        self.serving.not_ready(meshid_runtime::time::unix_now())
    }

    fn refuse(
        &self,
        path: &str,
        headers: &http::HeaderMap,
        peer: std::net::SocketAddr,
    ) -> Option<AdminResponse> {
        if !matches!(path, "/rotation" | "/rotation/fresh") {
            return None;
        }
        let authorization = headers
            .get(http::header::AUTHORIZATION)
            .map(|v| v.as_bytes());
        let (status, why) = self.unauthorized(authorization, path)?;
        self.unauthorized.inc();
        let budget = self
            .refusal_log
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .take(REFUSAL_LINES, Instant::now());
        if let Some(left_out) = budget {
            // Never the header's value: a near miss of the token is a secret too.
            tracing::warn!(
                %peer,
                path,
                token_sent = authorization.is_some(),
                left_out,
                "rotation report refused: missing or wrong admin token"
            );
        }
        Some(admin::text(status, why))
    }

    fn route(
        &self,
        path: &str,
        headers: &http::HeaderMap,
        _peer: std::net::SocketAddr,
    ) -> Option<AdminFuture> {
        match path {
            "/rotation" | "/rotation/fresh" => {
                let cache = self.rotation.clone();
                let fresh = path == "/rotation/fresh";
                // A signed request (admitted by `refuse`) gets its answer signed for its nonce.
                let nonce = signed_nonce(
                    headers
                        .get(http::header::AUTHORIZATION)
                        .map(|v| v.as_bytes()),
                );
                let dir = self.dir.clone();
                let instance = self.instance.clone();
                Some(Box::pin(async move {
                    let (json, body) = match cache.get(fresh).await {
                        Ok(json) => (true, json),
                        Err(_) => (false, Bytes::from_static(b"rotation state unreadable\n")),
                    };
                    let status = if json {
                        StatusCode::OK
                    } else {
                        StatusCode::INTERNAL_SERVER_ERROR
                    };
                    let mac = nonce.and_then(|nonce| {
                        let token = AdminToken::load(&crate::ca_dir::snapshot(&dir)).ok()??;
                        let mac = token.sign_response(&nonce, &instance, status.as_u16(), &body);
                        http::HeaderValue::from_str(&mac).ok()
                    });
                    let mut resp = if json {
                        admin::json(body)
                    } else {
                        admin::text(status, body)
                    };
                    if let Some(mac) = mac {
                        resp.headers_mut().insert(RESPONSE_MAC_HEADER, mac);
                        if let Ok(instance) = http::HeaderValue::from_str(&instance) {
                            resp.headers_mut()
                                .insert(RESPONSE_INSTANCE_HEADER, instance);
                        }
                    }
                    resp
                }))
            }
            "/jwks-status" => Some(admin::ready(match (self.jwks)() {
                Some(json) => admin::json(json),
                None => admin::text(
                    StatusCode::NOT_FOUND,
                    "service-account tokens are not enabled (no --jwks, --jwks-url or --jwks-discovery)\n",
                ),
            })),
            _ => None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicUsize, Ordering};

    /// A report that takes 50 ms and says how many were computed, counting how many run at once.
    fn counting() -> (RotationJson, Arc<AtomicUsize>, Arc<AtomicUsize>) {
        let computed = Arc::new(AtomicUsize::new(0));
        let most_at_once = Arc::new(AtomicUsize::new(0));
        let running = Arc::new(AtomicUsize::new(0));
        let (c, m) = (computed.clone(), most_at_once.clone());
        let compute: RotationJson = Arc::new(move || {
            let now = running.fetch_add(1, Ordering::SeqCst) + 1;
            m.fetch_max(now, Ordering::SeqCst);
            std::thread::sleep(Duration::from_millis(50));
            let n = c.fetch_add(1, Ordering::SeqCst) + 1;
            running.fetch_sub(1, Ordering::SeqCst);
            Ok(format!("{{\"report\":{n}}}"))
        });
        (compute, computed, most_at_once)
    }

    /// The rotation report answers only the CA directory's admin token: 401 without one or with
    /// a wrong one (counted, and the token never in the answer), 200 with it; the other routes
    /// need none.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn the_rotation_report_needs_the_directory_admin_token() {
        use meshid_runtime::http_client::{Call, send};
        let dir = tempfile::tempdir().unwrap();
        let token = AdminToken::generate().unwrap();
        token.write(dir.path()).unwrap();
        let compute: RotationJson = Arc::new(|| Ok("{\"report\":1}".to_owned()));
        let (_tx, shutdown) = watch::channel(false);
        let unauthorized = Counter::default();
        let now = meshid_runtime::time::unix_now();
        let serving = Arc::new(crate::tls::ServingDates::default());
        serving.set(crate::tls::Validity {
            not_before: now - 300,
            not_after: now + 3600,
        });
        let routes = Arc::new(CaAdmin {
            rotation: Arc::new(RotationCache::new(compute, Duration::ZERO)),
            jwks: Box::new(|| Some("{}".to_owned())),
            shutdown: shutdown.clone(),
            dir: dir.path().to_owned(),
            unauthorized: unauthorized.clone(),
            refusal_log: Mutex::new(LineBudget::new()),
            serving: serving.clone(),
            seen_nonces: Mutex::default(),
            instance: crate::admin_token::new_instance(),
        });
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(admin::serve(
            listener,
            Arc::new(prometheus_client::registry::Registry::default()),
            routes,
            shutdown,
        ));
        let get = |path: &'static str, headers: Vec<(String, String)>| async move {
            let mut call = Call::get(addr, path);
            call.headers = &headers;
            send(&call).await.unwrap()
        };
        let wrong = AdminToken::generate().unwrap();
        for path in ["/rotation", "/rotation/fresh"] {
            for headers in [vec![], vec![wrong.header()]] {
                let reply = get(path, headers).await;
                assert_eq!(reply.status, 401, "{path}");
                let body = String::from_utf8_lossy(&reply.body).into_owned();
                assert!(body.contains("admin token"), "{body}");
                assert!(
                    !body.contains(&wrong.header().1[7..]),
                    "the token is not echoed"
                );
            }
            let reply = get(path, vec![token.header()]).await;
            assert_eq!(reply.status, 200, "{path}");
            assert_eq!(&reply.body[..], b"{\"report\":1}");
        }
        assert_eq!(unauthorized.get(), 4);
        // A signed request (the token not sent): admitted, and its answer signed for its nonce;
        // the same request again is a replay; one signed for another path is refused.
        let (header, nonce) = token
            .sign_request("/rotation/fresh", meshid_runtime::time::unix_now())
            .unwrap();
        let reply = get("/rotation/fresh", vec![header.clone()]).await;
        assert_eq!(reply.status, 200);
        let mac = reply.headers.get(RESPONSE_MAC_HEADER).map(|v| v.as_bytes());
        let instance = reply.headers[RESPONSE_INSTANCE_HEADER].to_str().unwrap();
        assert!(token.verifies_response(&nonce, instance, 200, &reply.body, mac));
        assert!(!wrong.verifies_response(&nonce, instance, 200, &reply.body, mac));
        let replayed = get("/rotation/fresh", vec![header.clone()]).await;
        assert_eq!(replayed.status, 401);
        assert!(String::from_utf8_lossy(&replayed.body).contains("replay"));
        assert_eq!(get("/rotation", vec![header]).await.status, 401);
        // The client side: signed_get checks the answer.
        let signed = crate::admin_token::signed_get(
            &token,
            addr,
            "/rotation",
            Duration::from_secs(5),
            1 << 20,
        )
        .await
        .unwrap();
        assert_eq!(
            (signed.status, &signed.body[..], signed.instance.as_str()),
            (200, &b"{\"report\":1}"[..], instance)
        );
        assert_eq!(unauthorized.get(), 6);
        // A Bearer request's answer is not signed.
        let bearer = get("/rotation", vec![token.header()]).await;
        assert!(bearer.headers.get(RESPONSE_MAC_HEADER).is_none());
        for open in ["/metrics", "/healthz", "/readyz", "/jwks-status"] {
            assert_eq!(get(open, vec![]).await.status, 200, "{open}");
        }
        // A serving certificate expired by the wall clock: not ready, saying why.
        serving.set(crate::tls::Validity {
            not_before: now - 7200,
            not_after: now - 1,
        });
        let reply = get("/readyz", vec![]).await;
        assert_eq!(reply.status, 503);
        let body = String::from_utf8_lossy(&reply.body).into_owned();
        assert!(body.contains("serving certificate expired"), "{body}");
        serving.set(crate::tls::Validity {
            not_before: now - 300,
            not_after: now + 3600,
        });
        // A directory made before `admin-token` existed: the token derived from its first
        // `jwt.key`, which the rotate commands derive the same way.
        std::fs::remove_file(dir.path().join(crate::admin_token::TOKEN_FILE)).unwrap();
        std::fs::write(dir.path().join("jwt.key"), "the first authority's key").unwrap();
        assert_eq!(get("/rotation", vec![token.header()]).await.status, 401);
        let derived = AdminToken::load(dir.path()).unwrap().unwrap();
        assert_eq!(get("/rotation", vec![derived.header()]).await.status, 200);
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn concurrent_gets_share_one_report_and_a_change_shows_after_the_window() {
        let (compute, computed, most_at_once) = counting();
        let cache = Arc::new(RotationCache::new(compute, Duration::from_millis(300)));
        let gets: Vec<_> = (0..64)
            .map(|_| {
                let cache = cache.clone();
                tokio::spawn(async move { cache.get(false).await })
            })
            .collect();
        for get in gets {
            assert_eq!(get.await.unwrap().unwrap(), "{\"report\":1}");
        }
        assert_eq!(computed.load(Ordering::SeqCst), 1, "64 GETs, one report");
        // Within the window: the same report.
        assert_eq!(cache.get(false).await.unwrap(), "{\"report\":1}");
        assert_eq!(computed.load(Ordering::SeqCst), 1);
        // Past it: a new one.
        tokio::time::sleep(Duration::from_millis(350)).await;
        assert_eq!(cache.get(false).await.unwrap(), "{\"report\":2}");
        // A fresh caller never gets a report started before it asked, cached or not.
        assert_eq!(cache.get(true).await.unwrap(), "{\"report\":3}");
        let fresh: Vec<_> = (0..16)
            .map(|_| {
                let cache = cache.clone();
                tokio::spawn(async move { cache.get(true).await })
            })
            .collect();
        for get in fresh {
            get.await.unwrap().unwrap();
        }
        // 16 fresh callers at once: queued behind at most one report, then sharing the next.
        let n = computed.load(Ordering::SeqCst);
        assert!((4..=6).contains(&n), "{n} reports for 16 fresh callers");
        assert_eq!(
            most_at_once.load(Ordering::SeqCst),
            1,
            "one report at a time"
        );
    }

    /// Callers that give up (their connection's deadline) do not stack reports: each computation
    /// finishes in its own task, holding the lock, before the next starts.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn callers_that_give_up_leave_one_report_at_a_time() {
        let (compute, computed, most_at_once) = counting();
        let cache = Arc::new(RotationCache::new(compute, Duration::ZERO));
        for _ in 0..6 {
            let cache = cache.clone();
            let _ = tokio::time::timeout(Duration::from_millis(5), cache.get(true)).await;
        }
        // Every report started has finished.
        tokio::time::sleep(Duration::from_millis(600)).await;
        assert!(computed.load(Ordering::SeqCst) >= 1);
        assert_eq!(
            most_at_once.load(Ordering::SeqCst),
            1,
            "one report at a time, given-up callers or not"
        );
    }
}
