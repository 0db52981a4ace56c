//! The app's own X.509-SVID, for the SPIFFE Workload API ([`crate::workload_api`]): issued by the
//! CA for a key made for the app (never the sidecar's key), for the sidecar's identity, and issued
//! again whenever the sidecar's own certificate changes (every renewal, and a rotation's forced
//! renewal with it) or half of its own validity has passed, whichever comes first. While the CA
//! cannot be reached the last SVID is kept until it expires; an expired one is never handed out.

use std::fmt;
use std::sync::Arc;
use std::time::Duration;

use meshid_identity::SpiffeId;
use meshid_identity::revocation::RevocationSet;
use meshid_identity::timing::{Backoff, random_unit, refresh_in, retry_wait};
use meshid_runtime::net::stopped;
use meshid_runtime::time::unix_now;
use rustls::pki_types::CertificateDer;
use tokio::sync::watch;

use super::CredentialStore;
use super::ca::{Lifecycle, issue_for_app};
use crate::metrics::{Metrics, ResultLabels};
use crate::settings::CaMode;

/// An X.509-SVID for the app.
pub struct AppSvid {
    pub id: SpiffeId,
    /// Leaf first.
    pub chain: Vec<CertificateDer<'static>>,
    /// The app's private key, unencrypted PKCS#8 DER (the Workload API hands it to the app).
    pub key: Vec<u8>,
    pub not_before: i64,
    pub not_after: i64,
    /// Its serial (lowercase hex, as revocations name serials) and its lineage's, when the CA
    /// marked one: a revocation of either (or of the identity) ends it.
    pub serial: String,
    pub lineage: Option<String>,
    /// SHA-256 (hex) of the sidecar leaf it was issued on: a new sidecar certificate means a new
    /// app SVID.
    pub issued_on: String,
}

impl fmt::Debug for AppSvid {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("AppSvid")
            .field("id", &self.id.as_str())
            .field("chain", &self.chain.len())
            .field("key", &"<redacted>")
            .field("not_after", &self.not_after)
            .finish()
    }
}

impl AppSvid {
    /// Whether it may be handed out at `now` (seconds since the epoch).
    pub fn valid_at(&self, now: i64) -> bool {
        self.not_before <= now && now < self.not_after
    }

    /// Whether `revoked` revokes it: its serial, its lineage or its identity. Every meshid peer
    /// refuses it then, so it is neither handed out nor kept: a new one is asked for.
    pub fn revoked_in(&self, revoked: &RevocationSet) -> bool {
        meshid_identity::jwt_svid::revoked_by(
            revoked,
            &self.id,
            self.lineage.as_deref(),
            Some(&self.serial),
        )
        .is_some()
    }

    /// Whether it may be handed to the app at `now`: valid, and not revoked.
    pub fn usable(&self, now: i64, revoked: &RevocationSet) -> bool {
        self.valid_at(now) && !self.revoked_in(revoked)
    }
}

/// The current app SVID (`None` until the first one), for the Workload API's streams.
pub type AppSvids = watch::Receiver<Option<Arc<AppSvid>>>;

/// Keeps an app SVID current until shutdown; publishes each new one on `tx`.
pub async fn run_app_svids(
    mode: CaMode,
    store: Arc<CredentialStore>,
    life: Arc<Lifecycle>,
    metrics: Metrics,
    tx: watch::Sender<Option<Arc<AppSvid>>>,
    mut shutdown: watch::Receiver<bool>,
) {
    let mut changes = store.subscribe();
    let mut backoff = Backoff::new(Duration::from_millis(200), Duration::from_secs(30));
    // When the current app SVID is due for renewal on its own account.
    let mut due: Option<tokio::time::Instant> = None;
    loop {
        let current = tx.borrow().clone();
        let own_leaf = store.current().map(|s| s.leaf_sha256.clone());
        let stale = match (&current, &own_leaf) {
            (_, None) => false,
            (None, Some(_)) => true,
            (Some(svid), Some(leaf)) => {
                svid.issued_on != *leaf
                    || due.is_some_and(|d| tokio::time::Instant::now() >= d)
                    || svid.revoked_in(&store.revocations())
            }
        };
        if stale {
            match issue_for_app(&mode, &store, &life.stream_conn).await {
                Ok(svid) => {
                    metrics
                        .app_svids
                        .get_or_create(&ResultLabels { result: "issued" })
                        .inc();
                    metrics.app_svid_expiry.set(svid.not_after);
                    backoff.reset();
                    let now = unix_now();
                    due = Some(
                        tokio::time::Instant::now()
                            + refresh_in(now, svid.not_after, random_unit() * 2.0 - 1.0),
                    );
                    tracing::info!(id = %svid.id, not_after = svid.not_after, "app SVID issued (Workload API)");
                    tx.send_replace(Some(Arc::new(svid)));
                    continue;
                }
                Err(error) => {
                    metrics
                        .app_svids
                        .get_or_create(&ResultLabels { result: "failed" })
                        .inc();
                    let not_after = current.as_ref().map(|s| s.not_after);
                    let wait = retry_wait(
                        backoff.next_delay(random_unit(), None),
                        not_after,
                        unix_now(),
                        random_unit(),
                    );
                    tracing::warn!(%error, retry_in = ?wait, "could not get an app SVID from the CA");
                    tokio::select! {
                        () = tokio::time::sleep(wait) => {}
                        () = stopped(&mut shutdown) => return,
                    }
                    continue;
                }
            }
        }
        let renewal = async {
            match due {
                Some(d) => tokio::time::sleep_until(d).await,
                None => std::future::pending().await,
            }
        };
        tokio::select! {
            changed = changes.changed() => if changed.is_err() { return },
            () = renewal => {}
            () = stopped(&mut shutdown) => return,
        }
    }
}
