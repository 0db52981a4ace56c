//! What the CA knows about the fleet, measured rather than assumed: which sidecars are connected, which
//! bundle version each acknowledged, which authority each one's certificate chains to, and the live
//! certificates each authority has issued.

use std::collections::{BTreeMap, HashMap};
use std::sync::Mutex;

use rustls_pki_types::{CertificateDer, TrustAnchor, UnixTime};
use serde::Serialize;

/// Forget sidecars that have been disconnected this long.
const FORGET_AFTER_SECS: i64 = 600;

/// One sidecar as last reported.
#[derive(Debug, Clone, Serialize)]
pub struct SidecarView {
    pub instance: String,
    pub identity: String,
    pub connected: bool,
    pub acked_version: u64,
    /// The authority its serving certificate chains to (`None`: unknown to this CA).
    pub serving_authority: Option<String>,
    pub serving_not_after: i64,
    /// Certificate and trust anchors from files: what it trusts is unknown to the CA.
    pub file_mode: bool,
}

/// What one acknowledgement says.
#[derive(Debug, Clone)]
pub struct Ack {
    pub version: u64,
    pub identity: String,
    /// The authority the serving chain verifies under (`None`: none this CA holds).
    pub authority: Option<String>,
    pub not_after: i64,
    pub file_mode: bool,
}

#[derive(Debug, Default)]
struct Sidecar {
    identity: String,
    streams: u32,
    acked_version: u64,
    serving_authority: Option<String>,
    serving_not_after: i64,
    file_mode: bool,
    last_seen: i64,
}

/// Live certificates one authority issued (as far as this CA process knows).
#[derive(Debug, Clone, Default, Serialize)]
pub struct IssuedView {
    pub live: usize,
    pub latest_not_after: i64,
}

/// The fleet tracker.
#[derive(Debug, Default)]
pub struct Fleet {
    inner: Mutex<Inner>,
    /// This CA process: since when it tracks issuance, and its longest lifetime.
    pub process: CaProcess,
}

/// One CA process as its report describes it: its live-certificate counts cover only what it issued
/// since it started, so certificates an earlier process issued may be live until `started_unix` plus
/// `max_ttl_seconds`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, serde::Deserialize)]
pub struct CaProcess {
    pub started_unix: i64,
    pub max_ttl_seconds: u64,
}

#[derive(Debug, Default)]
struct Inner {
    sidecars: HashMap<String, Sidecar>,
    /// authority name -> live certificates it issued, counted per not-after second.
    issued: HashMap<String, Expiries>,
}

/// Certificates counted by their not-after second: recording one and dropping the expired ones cost
/// O(log n), however many certificates are live (a busy CA issues thousands per second).
#[derive(Debug, Default)]
struct Expiries {
    by_second: BTreeMap<i64, u64>,
    live: u64,
}

impl Expiries {
    fn prune(&mut self, now: i64) {
        while let Some(entry) = self.by_second.first_entry() {
            if *entry.key() > now {
                break;
            }
            self.live -= entry.remove();
        }
    }

    fn add(&mut self, not_after: i64) {
        *self.by_second.entry(not_after).or_default() += 1;
        self.live += 1;
    }

    fn latest(&self) -> i64 {
        self.by_second.last_key_value().map_or(0, |(t, _)| *t)
    }
}

/// The authority a chain belongs to: the first whose root verifies it.
pub fn authority_of(
    chain: &[CertificateDer<'_>],
    authorities: &[(String, CertificateDer<'static>)],
    now: i64,
) -> Option<String> {
    let (leaf, rest) = chain.split_first()?;
    let ee = webpki::EndEntityCert::try_from(leaf).ok()?;
    let algs = rustls::crypto::aws_lc_rs::default_provider()
        .signature_verification_algorithms
        .all;
    let time = UnixTime::since_unix_epoch(std::time::Duration::from_secs(now.max(0) as u64));
    authorities.iter().find_map(|(name, root)| {
        let anchor: TrustAnchor<'_> = webpki::anchor_from_trusted_cert(root).ok()?;
        ee.verify_for_usage(
            algs,
            &[anchor],
            rest,
            time,
            webpki::KeyUsage::client_auth(),
            None,
            None,
        )
        .ok()
        .map(|_| name.clone())
    })
}

impl Fleet {
    pub fn new(process: CaProcess) -> Self {
        Self {
            inner: Mutex::default(),
            process,
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    pub fn stream_opened(&self, instance: &str, now: i64) {
        let mut inner = self.lock();
        let s = inner.sidecars.entry(instance.to_owned()).or_default();
        s.streams += 1;
        s.last_seen = now;
    }

    pub fn stream_closed(&self, instance: &str, now: i64) {
        let mut inner = self.lock();
        if let Some(s) = inner.sidecars.get_mut(instance) {
            s.streams = s.streams.saturating_sub(1);
            s.last_seen = now;
        }
    }

    /// Records an acknowledgement.
    pub fn ack(&self, instance: &str, ack: Ack, now: i64) {
        let mut inner = self.lock();
        let s = inner.sidecars.entry(instance.to_owned()).or_default();
        s.identity = ack.identity;
        s.acked_version = s.acked_version.max(ack.version);
        s.serving_authority = ack.authority;
        s.serving_not_after = ack.not_after;
        s.file_mode = ack.file_mode;
        s.last_seen = now;
    }

    /// Records a certificate issued under `authority`.
    pub fn issued(&self, authority: &str, not_after: i64, now: i64) {
        let mut inner = self.lock();
        if !inner.issued.contains_key(authority) {
            inner
                .issued
                .insert(authority.to_owned(), Expiries::default());
        }
        let Some(expiries) = inner.issued.get_mut(authority) else {
            return;
        };
        expiries.prune(now);
        if not_after > now {
            expiries.add(not_after);
        }
    }

    /// The connected sidecars and the live certificates per authority.
    pub fn report(&self, now: i64) -> (Vec<SidecarView>, HashMap<String, IssuedView>) {
        let mut inner = self.lock();
        inner
            .sidecars
            .retain(|_, s| s.streams > 0 || now - s.last_seen < FORGET_AFTER_SECS);
        let mut sidecars: Vec<SidecarView> = inner
            .sidecars
            .iter()
            .map(|(id, s)| SidecarView {
                instance: id.clone(),
                identity: s.identity.clone(),
                connected: s.streams > 0,
                acked_version: s.acked_version,
                serving_authority: s.serving_authority.clone(),
                serving_not_after: s.serving_not_after,
                file_mode: s.file_mode,
            })
            .collect();
        sidecars.sort_by(|a, b| {
            a.identity
                .cmp(&b.identity)
                .then(a.instance.cmp(&b.instance))
        });
        let issued = inner
            .issued
            .iter_mut()
            .map(|(name, expiries)| {
                expiries.prune(now);
                (
                    name.clone(),
                    IssuedView {
                        live: usize::try_from(expiries.live).unwrap_or(usize::MAX),
                        latest_not_after: expiries.latest(),
                    },
                )
            })
            .collect();
        (sidecars, issued)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tracks_streams_acks_and_live_certificates() {
        let f = Fleet::default();
        f.stream_opened("a", 100);
        let ack = Ack {
            version: 3,
            identity: "spiffe://td/a".into(),
            authority: Some("1".into()),
            not_after: 500,
            file_mode: false,
        };
        f.ack("a", ack, 100);
        f.issued("1", 500, 100);
        f.issued("1", 150, 100);
        f.issued("1", 150, 100);
        f.issued("1", 90, 100);
        let (_, i) = f.report(120);
        assert_eq!(i["1"].live, 3, "expired at issue time is not live");
        let (s, i) = f.report(200);
        assert_eq!(s.len(), 1);
        assert!(s[0].connected);
        assert_eq!(s[0].acked_version, 3);
        assert_eq!(i["1"].live, 1);
        assert_eq!(i["1"].latest_not_after, 500);
        f.stream_closed("a", 200);
        let (s, _) = f.report(200 + FORGET_AFTER_SECS + 1);
        assert!(s.is_empty(), "disconnected sidecars are forgotten");
    }
}
