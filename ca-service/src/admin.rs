//! The CA's admin routes on the shared admin server ([`meshid_runtime::admin`]): `/healthz`,
//! `/readyz`, `/metrics`, and the `/rotation` JSON report.

use http::StatusCode;
use meshid_runtime::admin::{self, AdminFuture, AdminRoutes};
use tokio::sync::watch;

/// Produces the `/rotation` JSON document.
pub type RotationJson = Box<dyn Fn() -> Result<String, String> + Send + Sync>;

/// What the CA adds to the shared admin server.
pub struct CaAdmin {
    pub rotation: RotationJson,
    pub shutdown: watch::Receiver<bool>,
}

impl AdminRoutes for CaAdmin {
    fn not_ready(&self) -> Option<String> {
        (*self.shutdown.borrow()).then(|| "shutting down".to_owned())
    }

    fn route(&self, path: &str) -> Option<AdminFuture> {
        (path == "/rotation").then(|| {
            admin::ready(match (self.rotation)() {
                Ok(json) => admin::json(json),
                Err(_) => admin::text(
                    StatusCode::INTERNAL_SERVER_ERROR,
                    "rotation state unreadable\n",
                ),
            })
        })
    }
}
