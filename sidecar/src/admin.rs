//! The admin server: `/healthz` (process up), `/readyz` (valid certificate, and a policy when there
//! are inbound listeners), `/metrics` (Prometheus text) and `/identity` (nothing secret).

use std::path::PathBuf;
use std::time::Duration;

use http::StatusCode;
use meshid_identity::annotations::{app_probe, parse_downward_api};
use meshid_runtime::admin::{self, AdminFuture, AdminResponse, AdminRoutes};
use meshid_runtime::http_client::{self, Call};
use meshid_runtime::time::unix_now;

use crate::conn::Shared;

/// The sidecar's additions to the shared admin server.
pub struct SidecarAdmin {
    pub shared: Shared,
    /// Ready needs a policy too (there are inbound listeners and a policy source).
    pub needs_policy: bool,
    /// The downward-API annotations file, whose `meshid.io/app-probes` lets
    /// `/app-health/<container>/<kind>` forward kubelet probes to the app.
    pub annotations: Option<PathBuf>,
}

impl AdminRoutes for SidecarAdmin {
    fn not_ready(&self) -> Option<String> {
        not_ready_reason(&self.shared, self.needs_policy).map(str::to_owned)
    }

    fn route(&self, path: &str) -> Option<AdminFuture> {
        if path == "/identity" {
            return Some(admin::ready(identity(&self.shared)));
        }
        let key = path.strip_prefix("/app-health/")?.to_owned();
        let annotations = self.annotations.clone();
        Some(Box::pin(async move {
            app_health(annotations.as_deref(), &key).await
        }))
    }
}

/// Why the sidecar is not ready, if it is not.
pub fn not_ready_reason(shared: &Shared, needs_policy: bool) -> Option<&'static str> {
    match shared.creds.current() {
        None => return Some("no certificate loaded"),
        Some(s) if !s.valid_at(unix_now()) => return Some("certificate is not valid now"),
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
                "trust_anchors_sha256": s.anchor_fingerprints,
            });
            admin::json(format!("{json}\n"))
        }
        None => admin::text(StatusCode::SERVICE_UNAVAILABLE, "no certificate loaded\n"),
    }
}

/// Forwards a kubelet probe, moved here by the injector, to the app's original probe endpoint.
async fn app_health(annotations: Option<&std::path::Path>, key: &str) -> AdminResponse {
    let probe = annotations
        .and_then(|p| std::fs::read_to_string(p).ok())
        .and_then(|t| parse_downward_api(&t).ok())
        .and_then(|a| app_probe(&a, key));
    let Some(probe) = probe else {
        return admin::text(StatusCode::NOT_FOUND, format!("no app probe {key:?}\n"));
    };
    if !probe.scheme.eq_ignore_ascii_case("http") {
        return admin::text(
            StatusCode::BAD_GATEWAY,
            "only HTTP app probes are forwarded\n",
        );
    }
    let host = format!("127.0.0.1:{}", probe.port);
    let mut get = Call::get(
        std::net::SocketAddr::from(([127, 0, 0, 1], probe.port)),
        &probe.path,
    );
    get.host = Some(&host);
    // Headers that are not valid HTTP (a CR or LF in them, say) are not forwarded.
    let headers: Vec<(String, String)> = probe
        .headers
        .iter()
        .filter(|(k, v)| {
            http::HeaderName::from_bytes(k.as_bytes()).is_ok()
                && http::HeaderValue::from_str(v).is_ok()
        })
        .cloned()
        .collect();
    get.headers = &headers;
    get.timeout = Duration::from_secs(5);
    get.max_body = 64 * 1024;
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
