//! The CA's admin routes on the shared admin server ([`meshid_runtime::admin`]): `/healthz`,
//! `/readyz`, `/metrics`, the `/rotation` JSON report, and `/jwks-status` (what service-account
//! tokens are verified against, for `meshid-ca check`).

use http::StatusCode;
use meshid_runtime::admin::{self, AdminFuture, AdminRoutes};
use tokio::sync::watch;

/// Produces the `/rotation` JSON document.
pub type RotationJson = Box<dyn Fn() -> Result<String, String> + Send + Sync>;

/// Produces the `/jwks-status` JSON document (`None`: service-account tokens are not enabled).
pub type JwksJson = Box<dyn Fn() -> Option<String> + Send + Sync>;

/// What the CA adds to the shared admin server.
pub struct CaAdmin {
    pub rotation: RotationJson,
    pub jwks: JwksJson,
    pub shutdown: watch::Receiver<bool>,
}

impl AdminRoutes for CaAdmin {
    fn not_ready(&self) -> Option<String> {
        (*self.shutdown.borrow()).then(|| "shutting down".to_owned())
    }

    fn route(&self, path: &str, _peer: std::net::SocketAddr) -> Option<AdminFuture> {
        match path {
            "/rotation" => Some(admin::ready(match (self.rotation)() {
                Ok(json) => admin::json(json),
                Err(_) => admin::text(
                    StatusCode::INTERNAL_SERVER_ERROR,
                    "rotation state unreadable\n",
                ),
            })),
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
