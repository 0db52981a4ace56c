//! The CA's admin routes on the shared admin server ([`meshid_runtime::admin`]): `/healthz`,
//! `/readyz`, `/metrics`, the `/rotation` JSON report (and `/rotation/fresh`), and `/jwks-status`
//! (what service-account tokens are verified against, for `meshid-ca check`).

use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::StatusCode;
use meshid_runtime::admin::{self, AdminFuture, AdminRoutes};
use tokio::sync::watch;

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
    pub async fn get(&self, fresh: bool) -> Result<Bytes, String> {
        let asked = Instant::now();
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
}

impl AdminRoutes for CaAdmin {
    fn not_ready(&self) -> Option<String> {
        (*self.shutdown.borrow()).then(|| "shutting down".to_owned())
    }

    fn route(&self, path: &str, _peer: std::net::SocketAddr) -> Option<AdminFuture> {
        match path {
            "/rotation" | "/rotation/fresh" => {
                let cache = self.rotation.clone();
                let fresh = path == "/rotation/fresh";
                Some(Box::pin(async move {
                    match cache.get(fresh).await {
                        Ok(json) => admin::json(json),
                        Err(_) => admin::text(
                            StatusCode::INTERNAL_SERVER_ERROR,
                            "rotation state unreadable\n",
                        ),
                    }
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
}
