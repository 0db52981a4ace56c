//! The admin server: `/healthz` (process up), `/readyz` (valid certificate, and a policy when there
//! are inbound listeners), the app's forwarded kubelet probes (`/app-health/CONTAINER/KIND`),
//! `/metrics` (Prometheus text), `/identity` (nothing secret), `/decisions` (recent denials by
//! decision ID, JSON: `/decisions/ID` one, `/decisions` the newest 100) and `/observed` (the
//! traffic seen, for `suggest-policy`). With `--stats-listen` the last four move to a server of
//! their own and the admin port answers only what Kubernetes needs. `/decisions` and `/observed`
//! name peers and what they called, so only callers on loopback get them (`--remote-decisions`
//! opens them to others).

use std::collections::{BTreeMap, HashMap};
use std::net::IpAddr;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};

use http::StatusCode;
use meshid_identity::annotations::{app_probe, parse_downward_api};
use meshid_runtime::admin::{self, AdminFuture, AdminResponse, AdminRoutes};
use meshid_runtime::http_client::{self, Call};
use meshid_runtime::time::unix_now;

use crate::conn::Shared;

/// Which routes one admin server answers.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AdminRole {
    /// Everything (no `--stats-listen`).
    All,
    /// Health, readiness and forwarded app probes: what the kubelet needs.
    Probes,
    /// `/metrics` and `/identity` (with health and readiness).
    Stats,
}

/// The sidecar's additions to the shared admin server.
pub struct SidecarAdmin {
    pub shared: Shared,
    /// Ready needs a policy too (there are inbound listeners and a policy source).
    pub needs_policy: bool,
    /// Readiness also fails while the newest policy file is rejected.
    pub unready_on_policy_error: bool,
    /// `/decisions` and `/observed` answer callers beyond loopback too (`--remote-decisions`).
    pub remote_decisions: bool,
    pub role: AdminRole,
    /// The app's probes, from the downward-API annotations file (`meshid.io/app-probes`).
    pub probes: Arc<ProbeTable>,
}

impl AdminRoutes for SidecarAdmin {
    fn not_ready(&self) -> Option<String> {
        if let Some(why) = not_ready_reason(&self.shared, self.needs_policy) {
            return Some(why.to_owned());
        }
        if self.needs_policy
            && self.unready_on_policy_error
            && self.shared.metrics.policy_rejected.get() == 1
        {
            return Some(
                "the newest policy file was rejected (the last good policy is in force; see the log)"
                    .to_owned(),
            );
        }
        None
    }

    fn serves_metrics(&self) -> bool {
        self.role != AdminRole::Probes
    }

    fn loopback_only(&self, path: &str) -> bool {
        !self.remote_decisions && names_peers(path)
    }

    fn route(
        &self,
        path: &str,
        _headers: &http::HeaderMap,
        peer: std::net::SocketAddr,
    ) -> Option<AdminFuture> {
        if path == "/identity" && self.role != AdminRole::Probes {
            return Some(admin::ready(identity(&self.shared)));
        }
        if path == "/observed" && self.role != AdminRole::Probes {
            let report = self
                .shared
                .observed
                .report(self.shared.policy.load().as_deref());
            let resp = match serde_json::to_string(&report) {
                Ok(json) => admin::json(format!("{json}\n")),
                Err(e) => admin::text(StatusCode::INTERNAL_SERVER_ERROR, format!("{e}\n")),
            };
            return Some(admin::ready(resp));
        }
        if (path == "/decisions" || path.starts_with("/decisions/"))
            && self.role != AdminRole::Probes
        {
            return Some(admin::ready(decisions(&self.shared, path)));
        }
        if self.role == AdminRole::Stats {
            return None;
        }
        let key = path.strip_prefix("/app-health/")?.to_owned();
        let probes = self.probes.clone();
        Some(Box::pin(
            async move { probes.forward(&key, peer.ip()).await },
        ))
    }
}

/// Routes that name peers and what they called: served to loopback callers unless
/// `--remote-decisions`.
fn names_peers(path: &str) -> bool {
    path == "/observed" || path == "/decisions" || path.starts_with("/decisions/")
}

/// The app's probes, read from the annotations file without blocking the runtime, parsed once per
/// version of the file, and forwarded at a bounded rate: the admin port is reachable by every pod.
#[derive(Debug)]
pub struct ProbeTable {
    annotations: Option<PathBuf>,
    cache: Mutex<Option<(FileStamp, Annotations)>>,
    buckets: Mutex<HashMap<IpAddr, Bucket>>,
}

/// The parsed annotations file.
type Annotations = Arc<BTreeMap<String, String>>;

/// A file version as its metadata shows it.
#[derive(Debug, Clone, PartialEq, Eq)]
struct FileStamp {
    modified: Option<SystemTime>,
    len: u64,
}

/// A token bucket for forwarded probes.
#[derive(Debug, Clone, Copy)]
struct Bucket {
    tokens: f64,
    at: Instant,
    /// It was answered 429 (it asked for more than the kubelet does): let go first when the
    /// table is full.
    throttled: bool,
}

/// Forwarded probes allowed at once from one source address, and per second over time. The
/// kubelet probes each container a few times per period from the node's address; anything far
/// above that is someone else, answered 429, and only that source's probes are limited: any pod
/// can reach the admin port, and one flooding it must not fail the kubelet's probes (a liveness
/// probe failing restarts the app).
const PROBE_BURST: f64 = 20.0;
const PROBE_RATE: f64 = 10.0;
/// Sources whose buckets are kept; past it, a source that was answered 429 is let go for the
/// newcomer, else full buckets (sources quiet for a while), and when none is either the newcomer
/// shares the bucket of every source past the cap. The kubelet, which probes within the rate and
/// is quiet between its probes, so keeps its bucket while sources that flood are about.
const PROBE_SOURCES: usize = 1024;
/// The largest annotations file read (the kubelet writes a few KiB).
const MAX_ANNOTATIONS_BYTES: u64 = 256 * 1024;

impl ProbeTable {
    pub fn new(annotations: Option<PathBuf>) -> Self {
        Self {
            annotations,
            cache: Mutex::new(None),
            buckets: Mutex::new(HashMap::new()),
        }
    }

    /// Takes a token of `source`'s bucket if one is left.
    fn admit(&self, source: IpAddr) -> bool {
        let mut buckets = self.buckets.lock().unwrap_or_else(|p| p.into_inner());
        let now = Instant::now();
        let refilled = |b: &Bucket| {
            (b.tokens + now.duration_since(b.at).as_secs_f64() * PROBE_RATE).min(PROBE_BURST)
        };
        let mut source = source.to_canonical();
        if !buckets.contains_key(&source) && buckets.len() >= PROBE_SOURCES {
            let flooder = buckets.iter().find(|(_, b)| b.throttled).map(|(ip, _)| *ip);
            match flooder {
                Some(ip) => {
                    buckets.remove(&ip);
                }
                None => buckets.retain(|_, b| refilled(b) < PROBE_BURST),
            }
            if buckets.len() >= PROBE_SOURCES {
                // Every kept source probed within the last two seconds: newcomers share one.
                source = IpAddr::from([0, 0, 0, 0]);
            }
        }
        let b = buckets.entry(source).or_insert(Bucket {
            tokens: PROBE_BURST,
            at: now,
            throttled: false,
        });
        b.tokens = refilled(b);
        b.at = now;
        if b.tokens >= 1.0 {
            b.tokens -= 1.0;
            true
        } else {
            b.throttled = true;
            false
        }
    }

    /// The current annotations (read again only when the file changed).
    async fn annotations(&self) -> Option<Annotations> {
        let path = self.annotations.as_ref()?;
        let meta = tokio::fs::metadata(path).await.ok()?;
        let stamp = FileStamp {
            modified: meta.modified().ok(),
            len: meta.len(),
        };
        {
            let cache = self.cache.lock().unwrap_or_else(|p| p.into_inner());
            if let Some((seen, parsed)) = cache.as_ref()
                && *seen == stamp
            {
                return Some(parsed.clone());
            }
        }
        if meta.len() > MAX_ANNOTATIONS_BYTES {
            return None;
        }
        let text = tokio::fs::read_to_string(path).await.ok()?;
        let parsed = Arc::new(parse_downward_api(&text).ok()?);
        *self.cache.lock().unwrap_or_else(|p| p.into_inner()) = Some((stamp, parsed.clone()));
        Some(parsed)
    }

    /// Forwards a kubelet probe, moved here by the injector, to the app's original probe endpoint.
    pub async fn forward(&self, key: &str, source: IpAddr) -> AdminResponse {
        if !self.admit(source) {
            return admin::text(
                StatusCode::TOO_MANY_REQUESTS,
                "too many app probe requests\n",
            );
        }
        let probe = self.annotations().await.and_then(|a| app_probe(&a, key));
        let Some(probe) = probe else {
            return admin::text(StatusCode::NOT_FOUND, format!("no app probe {key:?}\n"));
        };
        app_health(probe).await
    }
}

/// Why the sidecar is not ready, if it is not.
pub fn not_ready_reason(shared: &Shared, needs_policy: bool) -> Option<&'static str> {
    match shared.creds.current() {
        None => return Some("no certificate loaded"),
        Some(s) if !s.valid_at(unix_now()) => return Some("certificate is not valid now"),
        // Peers of the same trust refuse it (its root retired by `rotate retire --force`, or it
        // was revoked): serving traffic is impossible until the next certificate.
        Some(s) if s.own_refused.is_some() => return s.own_refused,
        Some(_) => {}
    }
    if needs_policy && shared.policy.load().is_none() {
        return Some("no valid policy loaded");
    }
    if *shared.shutdown.borrow() {
        return Some("shutting down");
    }
    None
}

/// `/identity`: who we are and what we trust (nothing secret).
fn identity(shared: &Shared) -> AdminResponse {
    match shared.creds.current() {
        Some(s) => {
            let json = serde_json::json!({
                "spiffe_id": s.identity.id.as_str(),
                "serial": s.identity.serial_hex,
                "not_before": s.identity.not_before,
                "not_after": s.identity.not_after,
                "issuer": s.identity.issuer,
                "public_key_sha256": s.public_key_sha256,
                "leaf_sha256": s.leaf_sha256,
                "issuer_sha256": s.issuer_sha256,
                "trust_anchors_sha256": s.anchor_fingerprints,
            });
            admin::json(format!("{json}\n"))
        }
        None => admin::text(StatusCode::SERVICE_UNAVAILABLE, "no certificate loaded\n"),
    }
}

/// `/decisions/ID`: one recent decision (404 when it is not, or no longer, kept); `/decisions`:
/// the newest, newest first.
fn decisions(shared: &Shared, path: &str) -> AdminResponse {
    let log = &shared.decisions;
    let body = match path.strip_prefix("/decisions/") {
        Some(id) => match log.get(id) {
            Some(r) => serde_json::to_string(&*r),
            None => {
                return admin::text(
                    StatusCode::NOT_FOUND,
                    format!(
                        "no decision {:.40} is kept here (the newest {} are)\n",
                        id,
                        crate::decisions::MAX_DECISIONS
                    ),
                );
            }
        },
        None => {
            let newest = log.newest(crate::decisions::LISTED);
            let list: Vec<&crate::decisions::Recorded> = newest.iter().map(|r| &**r).collect();
            serde_json::to_string(&list)
        }
    };
    match body {
        Ok(json) => admin::json(format!("{json}\n")),
        Err(e) => admin::text(StatusCode::INTERNAL_SERVER_ERROR, format!("{e}\n")),
    }
}

/// Calls the app's probe endpoint on localhost.
async fn app_health(probe: meshid_identity::annotations::AppProbe) -> AdminResponse {
    // The path goes into a request line: it must be a valid absolute path (no CR, LF, spaces or
    // other bytes that would end the line or start a header), as the headers below must be valid.
    let path_ok = probe.path.starts_with('/')
        && http::uri::PathAndQuery::try_from(probe.path.as_str())
            .is_ok_and(|pq| pq.as_str() == probe.path);
    if !path_ok {
        return admin::text(
            StatusCode::BAD_GATEWAY,
            format!(
                "the app probe's path {:?} is not a valid request path\n",
                probe.path
            ),
        );
    }
    if !probe.scheme.eq_ignore_ascii_case("http") {
        return admin::text(
            StatusCode::BAD_GATEWAY,
            "only HTTP app probes are forwarded\n",
        );
    }
    // Headers that are not valid HTTP (a CR or LF in them, say) are not forwarded.
    let mut headers: Vec<(String, String)> = probe
        .headers
        .iter()
        .filter(|(k, v)| {
            http::HeaderName::from_bytes(k.as_bytes()).is_ok()
                && http::HeaderValue::from_str(v).is_ok()
        })
        .cloned()
        .collect();
    // A probe's own `Host` (its first) is the request's Host, as the kubelet sends it (added as one more
    // header, the app got two and answered 400 to every probe).
    let named_host = headers
        .iter()
        .find(|(k, _)| k.eq_ignore_ascii_case("host"))
        .map(|(_, v)| v.clone());
    headers.retain(|(k, _)| !k.eq_ignore_ascii_case("host"));
    let host = named_host.unwrap_or_else(|| format!("127.0.0.1:{}", probe.port));
    let mut get = Call::get(
        std::net::SocketAddr::from(([127, 0, 0, 1], probe.port)),
        &probe.path,
    );
    get.host = Some(&host);
    get.headers = &headers;
    get.timeout = Duration::from_secs(5);
    // The status is the answer: a longer body is cut, as the kubelet cuts it.
    get.max_body = 64 * 1024;
    get.cut_body = true;
    match http_client::send(&get).await {
        Ok(reply) => admin::text(
            StatusCode::from_u16(reply.status).unwrap_or(StatusCode::BAD_GATEWAY),
            format!("app answered {}\n", reply.status),
        ),
        Err(http_client::ClientError::Timeout(_)) => {
            admin::text(StatusCode::SERVICE_UNAVAILABLE, "app probe timed out\n")
        }
        Err(e) => admin::text(
            StatusCode::SERVICE_UNAVAILABLE,
            format!("app unreachable: {e}\n"),
        ),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn addr(n: u32) -> IpAddr {
        IpAddr::from(std::net::Ipv4Addr::from(0x0a00_0000 + n))
    }

    /// More flooding sources than the table keeps: the kubelet, which probed within the rate and
    /// is quiet between its probes (its bucket full again), keeps its own bucket; the flooders
    /// answered 429 are let go for newcomers instead. Before, full buckets went first: the
    /// kubelet's, which then shared one bucket with every flooder past the table.
    #[test]
    fn the_kubelet_keeps_its_bucket_while_more_sources_than_the_table_flood() {
        let table = ProbeTable::new(None);
        let kubelet = addr(0);
        assert!(table.admit(kubelet));
        // Its bucket is full again (quiet since).
        table
            .buckets
            .lock()
            .unwrap()
            .get_mut(&kubelet)
            .unwrap()
            .tokens = PROBE_BURST;
        for n in 1..=(2 * PROBE_SOURCES as u32) {
            let source = addr(n);
            while table.admit(source) {}
        }
        assert!(
            table.buckets.lock().unwrap().contains_key(&kubelet),
            "the kubelet's bucket was let go"
        );
        for _ in 0..PROBE_BURST as usize {
            assert!(table.admit(kubelet), "the kubelet was answered 429");
        }
        assert!(table.buckets.lock().unwrap().len() <= PROBE_SOURCES);
    }
}
