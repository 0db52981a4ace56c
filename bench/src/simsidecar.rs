//! Simulated sidecars for the rotation benchmark: each one does against the CA what a real sidecar in
//! CA mode does, without a data plane. A fresh P-256 key and CSR for every certificate; the first with a
//! service-account token; a `WatchTrustBundle` stream over mTLS; an `AckTrustBundle` (over a
//! connection presenting the reported certificate) for every bundle received and after every renewal;
//! renewal at half of the remaining lifetime (±10%), or at once when a bundle says `renew_now`, over the
//! bundle stream's connection.

use meshid_runtime::time::unix_now;
use std::sync::Arc;
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use meshid_proto::ca::v1::{
    AckTrustBundleRequest, IssueRequest, TrustBundle, WatchTrustBundleRequest,
    issue_request::Credential,
};
use meshid_sidecar::creds::ca_client;
use meshid_sidecar::settings::CaEndpoint;
use meshid_tests::pki::WorkloadKey;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};
use tokio::sync::watch;

/// What one simulated sidecar needs.
#[derive(Clone)]
pub struct SimConfig {
    /// The CA; `roots` are the initial trust bundle.
    pub endpoint: CaEndpoint,
    /// A service-account token for the first certificate (and to recover from an expired one).
    pub token: String,
    pub instance: String,
    /// Multiplies the renewal delay (0.9..1.1: the jitter a real sidecar draws).
    pub jitter: f64,
    /// Delay before the first certificate (spreads the fleet's renewals like a real fleet).
    pub start_delay: Duration,
}

/// What one simulated sidecar did, readable while it runs.
#[derive(Debug, Default)]
pub struct SimStats {
    /// When each renewal (not the first issuance) completed.
    pub renewals: Mutex<Vec<Instant>>,
    /// Renewals started by a bundle's `renew_now`.
    pub forced_renewals: AtomicU64,
    /// The last bundle version acknowledged (0: none yet).
    pub acked_version: AtomicU64,
    /// Revocations in the last bundle applied (checked as a sidecar checks them).
    pub revocations: AtomicU64,
    /// Failed calls (each retried).
    pub errors: AtomicU64,
    /// The last failure: what failed and why (for a bench that stalls to say so).
    pub last_error: Mutex<String>,
}

impl SimStats {
    /// Renewals completed in `[from, to)`.
    pub fn renewals_between(&self, from: Instant, to: Instant) -> usize {
        self.renewals
            .lock()
            .map(|r| r.iter().filter(|t| **t >= from && **t < to).count())
            .unwrap_or(0)
    }

    fn record_renewal(&self) {
        if let Ok(mut r) = self.renewals.lock() {
            r.push(Instant::now());
        }
    }

    fn error(&self, what: &str, why: impl std::fmt::Display) {
        self.errors.fetch_add(1, Ordering::Relaxed);
        if let Ok(mut last) = self.last_error.lock() {
            *last = format!("{what}: {why}");
        }
    }

    /// The most common last failures among `stats`, most frequent first: (count, text).
    pub fn common_errors(stats: &[std::sync::Arc<SimStats>], top: usize) -> Vec<(usize, String)> {
        let mut by_text = std::collections::HashMap::<String, usize>::new();
        for s in stats {
            if let Ok(last) = s.last_error.lock()
                && !last.is_empty()
            {
                *by_text.entry(last.clone()).or_default() += 1;
            }
        }
        let mut v: Vec<(usize, String)> = by_text.into_iter().map(|(t, n)| (n, t)).collect();
        v.sort_by(|a, b| b.0.cmp(&a.0).then_with(|| a.1.cmp(&b.1)));
        v.truncate(top);
        v
    }
}

/// The certificate the sidecar serves.
struct Cert {
    chain: Vec<CertificateDer<'static>>,
    key: PrivateKeyDer<'static>,
    not_after: i64,
    renew_at: tokio::time::Instant,
}

impl Cert {
    fn pair(&self) -> (Vec<CertificateDer<'static>>, PrivateKeyDer<'static>) {
        (self.chain.clone(), self.key.clone_key())
    }
}

/// Why a bundle stream ended.
enum Ended {
    /// A new certificate: the next stream presents it.
    Renewed,
    Broken(String),
}

/// What woke the bundle loop.
enum Event {
    Bundle(TrustBundle),
    RenewalDue,
}

/// One simulated sidecar: runs until `stop` turns true.
pub struct Sim {
    cfg: SimConfig,
    stats: Arc<SimStats>,
    /// The trust bundle we hold (the CA's serving certificate moves to the new root mid-rotation).
    roots: Vec<CertificateDer<'static>>,
    applied_version: u64,
    cert: Option<Cert>,
}

impl Sim {
    pub fn new(cfg: SimConfig, stats: Arc<SimStats>) -> Self {
        let roots = cfg.endpoint.roots.clone();
        Self {
            cfg,
            stats,
            roots,
            applied_version: 0,
            cert: None,
        }
    }

    fn endpoint(&self) -> CaEndpoint {
        CaEndpoint {
            roots: self.roots.clone(),
            pinned: Vec::new(),
            ..self.cfg.endpoint.clone()
        }
    }

    /// Issues a certificate: over mTLS with the current one when it is still valid, else with the
    /// service-account token.
    /// A renewal goes over `via`, the bundle stream's connection (it presents the current
    /// certificate), as a real sidecar's does; the first certificate and a failed renewal's retries
    /// use a connection of their own.
    async fn issue(&mut self, via: Option<&ca_client::CaClient>) -> anyhow::Result<()> {
        let w = WorkloadKey::new();
        let current = self
            .cert
            .as_ref()
            .filter(|c| c.not_after > unix_now() + 1)
            .map(Cert::pair);
        let renewal = current.is_some();
        let credential =
            (!renewal).then(|| Credential::ServiceAccountToken(self.cfg.token.clone()));
        let mut client = match via {
            Some(client) if renewal => client.clone(),
            _ => ca_client::connect(&self.endpoint(), current).await?,
        };
        let resp = client
            .issue(IssueRequest {
                csr: w.csr.clone(),
                credential,
                ttl_seconds: 0,
                app_svid: false,
            })
            .await?
            .into_inner();
        let now = unix_now();
        let remaining = (resp.not_after_unix - now).max(1) as f64;
        // At most a day: a CA answering with an absurd lifetime must not overflow the timer.
        let delay = Duration::from_secs_f64((remaining / 2.0 * self.cfg.jitter).min(86_400.0));
        self.cert = Some(Cert {
            chain: resp
                .cert_chain
                .into_iter()
                .map(CertificateDer::from)
                .collect(),
            key: w.private_key_der(),
            not_after: resp.not_after_unix,
            renew_at: tokio::time::Instant::now() + delay,
        });
        if renewal {
            self.stats.record_renewal();
        }
        Ok(())
    }

    /// Issues until it works (backoff 0.5 s to 5 s), unless stopped.
    async fn issue_retrying(
        &mut self,
        mut via: Option<&ca_client::CaClient>,
        stop: &mut watch::Receiver<bool>,
    ) -> bool {
        let mut wait = Duration::from_millis(500);
        loop {
            match self.issue(via.take()).await {
                Ok(()) => return true,
                Err(e) => self.stats.error("issue", format!("{e:#}")),
            }
            tokio::select! {
                () = tokio::time::sleep(wait) => {}
                _ = stop.wait_for(|s| *s) => return false,
            }
            wait = (wait * 2).min(Duration::from_secs(5));
        }
    }

    /// Acknowledges the applied bundle version on `client`, the connection that carries our
    /// bundle stream and presents the current certificate (the CA takes nothing else).
    async fn ack(&mut self, client: &mut ca_client::CaClient) {
        let Some(cert) = &self.cert else { return };
        // Fields added to the message later keep their defaults (a CA-mode sidecar).
        #[allow(clippy::needless_update)]
        let req = AckTrustBundleRequest {
            instance_id: self.cfg.instance.clone(),
            bundle_version: self.applied_version,
            serving_chain: cert.chain.iter().map(|c| c.to_vec()).collect(),
            ..Default::default()
        };
        // Sent again after a refusal, as a sidecar does (1 s, doubling), a few times at most.
        let mut wait = Duration::from_secs(1);
        for _ in 0..5 {
            match client.ack_trust_bundle(req.clone()).await {
                Ok(_) => {
                    self.stats
                        .acked_version
                        .store(self.applied_version, Ordering::Relaxed);
                    return;
                }
                Err(e) => self.stats.error("ack", e.message()),
            }
            tokio::time::sleep(wait).await;
            wait *= 2;
        }
    }

    /// Follows the bundle stream, renews on time, reconnects when the stream breaks.
    pub async fn run(mut self, mut stop: watch::Receiver<bool>) {
        tokio::select! {
            () = tokio::time::sleep(self.cfg.start_delay) => {}
            _ = stop.wait_for(|s| *s) => return,
        }
        while !*stop.borrow() {
            if self.cert.as_ref().is_none_or(|c| c.not_after <= unix_now())
                && !self.issue_retrying(None, &mut stop).await
            {
                return;
            }
            match self.follow(&mut stop).await {
                Ok(()) => return,
                Err(Ended::Renewed) => {}
                Err(Ended::Broken(why)) => {
                    self.stats.error("bundle stream", why);
                    tokio::select! {
                        () = tokio::time::sleep(Duration::from_millis(500)) => {}
                        _ = stop.wait_for(|s| *s) => return,
                    }
                }
            }
        }
    }

    /// One bundle stream, until it breaks or a new certificate needs its own (`Err`), or we stop
    /// (`Ok`).
    async fn follow(&mut self, stop: &mut watch::Receiver<bool>) -> Result<(), Ended> {
        let pair = self.cert.as_ref().map(Cert::pair);
        let mut client = ca_client::connect(&self.endpoint(), pair)
            .await
            .map_err(|e| {
                Ended::Broken(format!(
                    "connecting: {}",
                    meshid_runtime::process::error_chain(&e)
                ))
            })?;
        let mut stream = client
            .watch_trust_bundle(WatchTrustBundleRequest {
                instance_id: self.cfg.instance.clone(),
                file_mode: false,
            })
            .await
            .map_err(|e| Ended::Broken(format!("opening: {}", e.message())))?
            .into_inner();
        loop {
            let renew_at = self
                .cert
                .as_ref()
                .map(|c| c.renew_at)
                .unwrap_or_else(tokio::time::Instant::now);
            let event = tokio::select! {
                msg = stream.message() => match msg {
                    Ok(Some(bundle)) => Event::Bundle(bundle),
                    Ok(None) => return Err(Ended::Broken("ended by the CA".into())),
                    Err(e) => return Err(Ended::Broken(e.message().to_owned())),
                },
                () = tokio::time::sleep_until(renew_at) => Event::RenewalDue,
                _ = stop.wait_for(|s| *s) => return Ok(()),
            };
            match event {
                Event::Bundle(bundle) => {
                    if !bundle.roots.is_empty() {
                        self.roots = bundle.roots.into_iter().map(CertificateDer::from).collect();
                    }
                    match meshid_sidecar::creds::ca::revocations(
                        &bundle.revoked,
                        meshid_runtime::time::unix_now(),
                    ) {
                        Ok((set, _)) => self
                            .stats
                            .revocations
                            .store(set.len() as u64, Ordering::Relaxed),
                        Err(e) => self.stats.error("bundle revocations", e),
                    }
                    self.applied_version = bundle.version;
                    if bundle.renew_now {
                        self.stats.forced_renewals.fetch_add(1, Ordering::Relaxed);
                        // A new certificate is a new instance: a new stream presents it (and
                        // acknowledges on its first bundle).
                        return if self.issue_retrying(Some(&client), stop).await {
                            Err(Ended::Renewed)
                        } else {
                            Ok(())
                        };
                    }
                    self.ack(&mut client).await;
                }
                Event::RenewalDue => {
                    return if self.issue_retrying(Some(&client), stop).await {
                        Err(Ended::Renewed)
                    } else {
                        Ok(())
                    };
                }
            }
        }
    }
}
