//! The CA's TLS listener: its own serving certificate, optional client certificates (for renewal), a
//! handshake timeout, connection limits (overall, per source IP, and proven ones per certificate
//! lineage), an idle timeout, a time limit on calls that are not streams, and a maximum connection
//! age. Accepted connections feed tonic as a stream.

use std::collections::HashMap;
use std::future::Future;
use std::io;
use std::net::{IpAddr, SocketAddr};
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicI64, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::task::{Context, Poll};
use std::time::Duration;

use arc_swap::ArcSwap;
use meshid_identity::verify::Anchors;
use meshid_runtime::admission::{Admission, Displaceable, Ticket, is_displaced};
use meshid_runtime::io::Coalesce;
use rcgen::{
    CertificateParams, DnType, ExtendedKeyUsagePurpose, KeyPair, KeyUsagePurpose, SanType,
};
use rustls::crypto::WebPkiSupportedAlgorithms;
use rustls::server::danger::{ClientCertVerified, ClientCertVerifier};
use rustls::{DistinguishedName, ServerConfig};
use rustls_pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer, UnixTime};
use time::OffsetDateTime;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::mpsc;
use tokio::time::{Instant, Sleep};
use tokio_rustls::TlsAcceptor;
use tokio_rustls::server::TlsStream;
use tokio_stream::wrappers::ReceiverStream;
use tonic::transport::server::Connected;
use x509_parser::prelude::{FromDer, X509Certificate};

use crate::authority::Authority;
use crate::metrics::{Metrics, ReasonLabels};
use crate::serial::random_serial;

/// Lifetime of the CA's own serving certificate; it is re-issued well before.
pub const SERVING_CERT_LIFETIME: Duration = Duration::from_secs(7 * 24 * 3600);

/// Errors building the TLS configuration.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum TlsSetupError {
    #[error("serving certificate: {0}")]
    Cert(#[from] rcgen::Error),
    #[error("tls configuration: {0}")]
    Rustls(#[from] rustls::Error),
    #[error("invalid --san {0:?}")]
    San(String),
    #[error("serving certificate: reading back its dates: {0}")]
    Dates(String),
}

/// The validity of a certificate, in Unix seconds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Validity {
    pub not_before: i64,
    pub not_after: i64,
}

impl Validity {
    /// The dates of the certificate `der`.
    pub fn of(der: &[u8]) -> Result<Self, String> {
        let (_, cert) = X509Certificate::from_der(der).map_err(|e| e.to_string())?;
        Ok(Self {
            not_before: cert.validity().not_before.timestamp(),
            not_after: cert.validity().not_after.timestamp(),
        })
    }

    /// When half of its lifetime has passed.
    pub fn half_life(&self) -> i64 {
        let lifetime = self.not_after.saturating_sub(self.not_before).max(0);
        self.not_before.saturating_add(lifetime / 2)
    }
}

/// The dates of the serving certificate in force, for its re-issue schedule, its metric
/// (`meshid_ca_serving_certificate_expiry_timestamp_seconds`) and `/readyz`.
#[derive(Debug, Default)]
pub struct ServingDates {
    not_before: AtomicI64,
    not_after: AtomicI64,
    expiry: prometheus_client::metrics::gauge::Gauge,
}

impl ServingDates {
    /// Dates that also set `expiry` (the registered gauge).
    pub fn new(expiry: prometheus_client::metrics::gauge::Gauge) -> Self {
        Self {
            expiry,
            ..Self::default()
        }
    }

    /// A certificate with `validity` is now served.
    pub fn set(&self, validity: Validity) {
        self.not_before
            .store(validity.not_before, Ordering::Relaxed);
        self.not_after.store(validity.not_after, Ordering::Relaxed);
        self.expiry.set(validity.not_after);
    }

    pub fn get(&self) -> Validity {
        Validity {
            not_before: self.not_before.load(Ordering::Relaxed),
            not_after: self.not_after.load(Ordering::Relaxed),
        }
    }

    /// Why the CA is not ready at wall-clock time `now` because of its serving certificate:
    /// expired (every client refuses it), or none yet.
    pub fn not_ready(&self, now: i64) -> Option<String> {
        let not_after = self.get().not_after;
        (now >= not_after).then(|| {
            format!(
                "the CA's TLS serving certificate expired at {not_after} (Unix seconds) by this \
                 host's clock, now {now}: clients refuse it; it is re-issued within a minute \
                 (see the log if it is not)"
            )
        })
    }
}

/// The process-wide crypto provider: aws-lc-rs.
pub fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::aws_lc_rs::default_provider())
}

/// Issues the CA's serving certificate (DNS and IP SANs) from the intermediate, with a fresh key.
pub fn serving_cert(
    authority: &Authority,
    sans: &[String],
) -> Result<(Vec<CertificateDer<'static>>, PrivateKeyDer<'static>), TlsSetupError> {
    issue_serving_cert(authority, sans, "meshid-ca", SERVING_CERT_LIFETIME)
}

/// Issues a serverAuth certificate for `sans` (DNS names or IPs) from the active intermediate, with
/// a fresh P-256 key: (leaf + intermediate, key). Its lifetime is `lifetime`, capped by the
/// intermediate's not-after.
pub fn issue_serving_cert(
    authority: &Authority,
    sans: &[String],
    common_name: &str,
    lifetime: Duration,
) -> Result<(Vec<CertificateDer<'static>>, PrivateKeyDer<'static>), TlsSetupError> {
    let key = KeyPair::generate()?;
    let mut params = CertificateParams::default();
    params
        .distinguished_name
        .push(DnType::CommonName, common_name);
    for san in sans {
        let entry = match san.parse::<IpAddr>() {
            Ok(ip) => SanType::IpAddress(ip),
            Err(_) => SanType::DnsName(
                san.as_str()
                    .try_into()
                    .map_err(|_| TlsSetupError::San(san.clone()))?,
            ),
        };
        params.subject_alt_names.push(entry);
    }
    params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
    params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
    params.use_authority_key_identifier_extension = true;
    params.serial_number = Some(random_serial());
    let now = OffsetDateTime::now_utc();
    // Backdated as workload certificates are: a sidecar whose clock is behind still trusts it.
    params.not_before = now - crate::signer::to_time(crate::signer::BACKDATE);
    params.not_after = now
        .checked_add(crate::signer::to_time(lifetime))
        .map_or(authority.intermediate_not_after, |t| {
            t.min(authority.intermediate_not_after)
        });
    let cert = params.signed_by(&key, &authority.issuer)?;
    let key_der = PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(key.serialize_der()));
    Ok((
        vec![cert.der().clone(), authority.intermediate_der.clone()],
        key_der,
    ))
}

/// Builds the server config: our serving chain, client certificates optional and, when sent, verified
/// against the trust bundle and its pins (`authority.anchors`); h2 by ALPN.
/// Also returns the serving certificate's dates.
pub fn server_config(
    authority: &Authority,
    sans: &[String],
) -> Result<(Arc<ServerConfig>, Validity), TlsSetupError> {
    let provider = provider();
    let verifier = Arc::new(OptionalClientVerifier {
        anchors: authority.anchors.clone(),
        algs: provider.signature_verification_algorithms,
    });
    let (chain, key) = serving_cert(authority, sans)?;
    let validity = chain
        .first()
        .ok_or_else(|| TlsSetupError::Dates("no certificate".into()))
        .and_then(|leaf| Validity::of(leaf).map_err(TlsSetupError::Dates))?;
    // TLS 1.3 only: every client of the CA is ours (sidecars, the CLI), and under TLS 1.2 a
    // client certificate (an identity, a serial, a lineage) would cross the network in the clear.
    let mut config = ServerConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .with_client_cert_verifier(verifier)
        .with_single_cert(chain, key)?;
    config.alpn_protocols = vec![b"h2".to_vec()];
    // No resumption: a resumed session carries the client certificate of its first handshake
    // without verifying it again (an expired or revoked one would hold a connection slot), and a
    // sidecar reconnects rarely enough (every 30 minutes or so) that a full handshake costs
    // nothing that matters.
    config.session_storage = Arc::new(rustls::server::NoServerSessionStorage {});
    config.send_tls13_tickets = 0;
    Ok((Arc::new(config), validity))
}

/// Client certificates are optional (a new sidecar has none yet, bundle watchers may have none); one
/// that is sent must chain to the trust bundle for client auth, and under a shared root through
/// one of the mesh's own intermediates. That holds for the handshake only: every call that takes the
/// certificate as its credential (renewals, JWT-SVIDs, bundle streams, acknowledgements) checks it
/// again, against the bundle and the revocation list of that moment.
#[derive(Debug)]
struct OptionalClientVerifier {
    anchors: Anchors,
    algs: WebPkiSupportedAlgorithms,
}

impl ClientCertVerifier for OptionalClientVerifier {
    fn offer_client_auth(&self) -> bool {
        true
    }

    fn client_auth_mandatory(&self) -> bool {
        false
    }

    fn root_hint_subjects(&self) -> &[DistinguishedName] {
        &[]
    }

    fn verify_client_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        now: UnixTime,
    ) -> Result<ClientCertVerified, rustls::Error> {
        self.anchors.verify_chain(
            &self.algs,
            end_entity,
            intermediates,
            now,
            webpki::KeyUsage::client_auth(),
        )?;
        Ok(ClientCertVerified::assertion())
    }

    meshid_identity::signatures_by_algs!();
}

/// What a handler learns about the connection a call arrived on.
#[derive(Clone, Debug)]
pub struct PeerInfo {
    pub remote_addr: SocketAddr,
    /// The client's verified certificate chain (leaf first), if it sent one.
    pub certificates: Option<Arc<Vec<CertificateDer<'static>>>>,
    /// The leaf's identity, parsed once per connection (renewals on one connection reuse it).
    pub leaf_identity: Option<Arc<Result<meshid_identity::CertIdentity, String>>>,
    /// Calls in flight on the connection (kept by [`TrackCallsLayer`], read by the idle timeout).
    pub activity: Arc<ConnActivity>,
}

/// Calls in flight on one connection, and when the last one ended: all the idle timeout reads.
/// Also the unary calls (every call but a stream) in flight by the period they began in, for the
/// call timeout ([`ListenerLimits::call_timeout`]). Two or three atomics per call, no lock and no
/// timer work on the call path.
#[derive(Debug)]
pub struct ConnActivity {
    in_flight: AtomicUsize,
    /// Unary calls in flight by the period they began in, modulo 3 ([`Self::next_period`]).
    unary: [AtomicUsize; 3],
    /// The current period, advanced by the connection's timer at least a call timeout apart.
    period: AtomicUsize,
    /// Milliseconds from `opened` to the end of the last call (0: none ended yet).
    last_end_ms: AtomicU64,
    opened: Instant,
    /// The connection's slot at the listener (see [`meshid_runtime::admission`]), given back when
    /// the last holder of this drops; proven only through `lineage` ([`Self::prove`]).
    ticket: Option<Ticket>,
    /// The lineage of the connection's client certificate, which proves the ticket by a call the
    /// CA served for it. `None` (no certificate, an app SVID, an identity that cannot be read):
    /// the connection is never proven. Any caller can make calls (the bundle, health checks), so
    /// calls alone would let anonymous clients from many addresses hold every slot against
    /// sidecars; such connections stay displaceable at the cap.
    lineage: Option<LineageProof>,
}

impl Default for ConnActivity {
    fn default() -> Self {
        Self::new(None)
    }
}

impl ConnActivity {
    fn new(ticket: Option<Ticket>) -> Self {
        Self {
            in_flight: AtomicUsize::new(0),
            unary: Default::default(),
            period: AtomicUsize::new(0),
            last_end_ms: AtomicU64::new(0),
            opened: Instant::now(),
            ticket,
            lineage: None,
        }
    }

    /// What proves the connection's ticket (see [`Self::prove`]).
    fn proven_by(mut self, lineage: Option<LineageProof>) -> Self {
        self.lineage = lineage;
        self
    }

    /// A call starts; it is in flight until the guard drops. It proves nothing by itself. A unary
    /// call (`stream`: false) must end within the call timeout, or its connection is closed.
    pub fn call(self: &Arc<Self>, stream: bool) -> CallGuard {
        self.in_flight.fetch_add(1, Ordering::AcqRel);
        let period = (!stream).then(|| {
            let period = self.period.load(Ordering::Acquire) % 3;
            self.unary[period].fetch_add(1, Ordering::AcqRel);
            period
        });
        CallGuard {
            activity: self.clone(),
            period,
        }
    }

    /// Unary calls in flight now.
    fn unary_in_flight(&self) -> bool {
        self.unary.iter().any(|n| n.load(Ordering::Acquire) > 0)
    }

    /// Starts the next period, at least a call timeout after the current one began (the
    /// connection's timer is the only caller). `Err` when a unary call that began in the period
    /// before the current one is still in flight: it began before the current period, so it is
    /// older than a call timeout. Calls that begin in the new period take the counter of the one
    /// before the previous, found empty when the current period began.
    fn next_period(&self) -> Result<(), ()> {
        let period = self.period.load(Ordering::Acquire);
        if self.unary[(period + 2) % 3].load(Ordering::Acquire) > 0 {
            return Err(());
        }
        self.period.store(period.wrapping_add(1), Ordering::Release);
        Ok(())
    }

    /// The CA served a call that takes the connection's certificate as its credential
    /// ([`PROVING_METHODS`]): the connection is no longer displaced at the connection limit, if
    /// its certificate's lineage holds fewer than [`MAX_PROVEN_CONNECTIONS_PER_LINEAGE`] proven
    /// connections on this listener. Past that it stays displaceable, and a later call proves it
    /// once one of them has closed. One atomic load once proven.
    fn prove(&self) {
        if let (Some(ticket), Some(lineage)) = (&self.ticket, &self.lineage)
            && lineage.hold()
        {
            ticket.proven();
        }
    }

    /// Calls in flight now.
    pub fn in_flight(&self) -> usize {
        self.in_flight.load(Ordering::Acquire)
    }

    /// Since when the connection has had no call in flight (`None`: a call is in flight).
    fn idle_since(&self) -> Option<Instant> {
        if self.in_flight() > 0 {
            return None;
        }
        let ms = self.last_end_ms.load(Ordering::Acquire);
        Some(self.opened + Duration::from_millis(ms))
    }
}

/// The most connections of one certificate lineage that one CA listener holds proven (never
/// displaced at `--max-connections`); the next ones of that lineage stay displaceable. A lineage
/// is one sidecar's chain of certificates (its first, attested with a token, and every renewal
/// of it, whatever their keys), which holds one or two connections to a CA process: its bundle
/// stream's, and now and then one for a call while that one is reconnecting. Without a bound, one
/// valid certificate could take every slot with connections that each made one renewal.
pub const MAX_PROVEN_CONNECTIONS_PER_LINEAGE: usize = 8;

/// The most connections from one address that one CA listener holds proven; the next ones stay displaceable. Every token issuance starts a lineage, so one pod could
/// otherwise hold [`MAX_PROVEN_CONNECTIONS_PER_LINEAGE`] proven connections for each lineage it
/// mints; a pod's sidecar holds one or two.
pub const MAX_PROVEN_CONNECTIONS_PER_SOURCE: usize = 32;

/// The proven connections of each certificate lineage, and of each source, on one listener.
#[derive(Debug)]
struct ProvenLineages {
    max: usize,
    held: Mutex<HashMap<Arc<str>, Held>>,
    max_per_source: usize,
    /// Taken after `held`, never before.
    sources: Mutex<HashMap<IpAddr, Held>>,
}

#[derive(Debug, Default)]
struct Held {
    proven: usize,
    /// Whether its reaching `max` was logged (once until it holds none).
    warned: bool,
}

impl ProvenLineages {
    fn new(max: usize) -> Self {
        Self {
            max,
            held: Mutex::default(),
            max_per_source: MAX_PROVEN_CONNECTIONS_PER_SOURCE,
            sources: Mutex::default(),
        }
    }

    fn lock(&self) -> MutexGuard<'_, HashMap<Arc<str>, Held>> {
        self.held.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn lock_sources(&self) -> MutexGuard<'_, HashMap<IpAddr, Held>> {
        self.sources.lock().unwrap_or_else(|p| p.into_inner())
    }
}

/// The source `peer` counts under: its address (an IPv6 /64 may be a whole node's pods: Kubernetes
/// gives each node a /64 by default, where `--max-connections-per-source` groups them).
fn source_of(peer: SocketAddr) -> IpAddr {
    peer.ip().to_canonical()
}

/// One connection's claim to be counted among its certificate lineage's proven connections.
#[derive(Debug)]
struct LineageProof {
    /// The certificate's SPIFFE ID and lineage serial (normalized).
    lineage: Arc<str>,
    lineages: Arc<ProvenLineages>,
    peer: SocketAddr,
    /// Whether it counts in `lineages` (then until it drops).
    held: AtomicBool,
}

impl LineageProof {
    /// For a connection from `peer` presenting `leaf`; `None` for an app SVID, which is never a
    /// credential at the CA.
    fn new(
        lineages: &Arc<ProvenLineages>,
        leaf: &meshid_identity::CertIdentity,
        peer: SocketAddr,
    ) -> Option<Self> {
        if leaf.app_svid {
            return None;
        }
        let serial = leaf.lineage_serial();
        let serial = meshid_identity::revocation::normalize_serial(serial)
            .unwrap_or_else(|_| serial.to_owned());
        Some(Self {
            lineage: format!("{} {serial}", leaf.id).into(),
            lineages: lineages.clone(),
            peer,
            held: AtomicBool::new(false),
        })
    }

    /// Whether the connection counts among its lineage's proven connections, taking a place if
    /// one is free.
    fn hold(&self) -> bool {
        if self.held.load(Ordering::Acquire) {
            return true;
        }
        let max = self.lineages.max;
        let mut held = self.lineages.lock();
        if self.held.load(Ordering::Acquire) {
            return true;
        }
        let entry = held.entry(self.lineage.clone()).or_default();
        if entry.proven >= max {
            if !std::mem::replace(&mut entry.warned, true) {
                tracing::warn!(
                    lineage = %self.lineage,
                    peer = %self.peer,
                    max,
                    "a certificate lineage holds the most proven connections to this CA process; \
                     its further connections stay displaceable at --max-connections"
                );
            }
            return false;
        }
        let mut sources = self.lineages.lock_sources();
        let source = sources.entry(source_of(self.peer)).or_default();
        if source.proven >= self.lineages.max_per_source {
            if !std::mem::replace(&mut source.warned, true) {
                tracing::warn!(
                    peer = %self.peer,
                    max = self.lineages.max_per_source,
                    "a source holds the most proven connections to this CA process; its further \
                     connections stay displaceable at --max-connections"
                );
            }
            if entry.proven == 0 {
                held.remove(&self.lineage);
            }
            return false;
        }
        source.proven += 1;
        entry.proven += 1;
        self.held.store(true, Ordering::Release);
        true
    }
}

impl Drop for LineageProof {
    fn drop(&mut self) {
        if !*self.held.get_mut() {
            return;
        }
        let mut held = self.lineages.lock();
        if let Some(entry) = held.get_mut(&self.lineage) {
            entry.proven = entry.proven.saturating_sub(1);
            if entry.proven == 0 {
                held.remove(&self.lineage);
            }
        }
        let mut sources = self.lineages.lock_sources();
        let source = source_of(self.peer);
        if let Some(entry) = sources.get_mut(&source) {
            entry.proven = entry.proven.saturating_sub(1);
            if entry.proven == 0 {
                sources.remove(&source);
            }
        }
    }
}

/// One call in flight on a connection; dropping it ends the call.
#[derive(Debug)]
pub struct CallGuard {
    activity: Arc<ConnActivity>,
    /// The period a unary call began in (`None`: a stream).
    period: Option<usize>,
}

impl Drop for CallGuard {
    fn drop(&mut self) {
        let a = &self.activity;
        let ms = u64::try_from(a.opened.elapsed().as_millis()).unwrap_or(u64::MAX);
        if let Some(period) = self.period {
            a.unary[period].fetch_sub(1, Ordering::AcqRel);
        }
        // The end time first, then the count: whoever sees no call in flight sees this end.
        a.last_end_ms.fetch_max(ms, Ordering::AcqRel);
        a.in_flight.fetch_sub(1, Ordering::AcqRel);
    }
}

/// Why the listener ended a connection itself.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Closed {
    IdleTimeout,
    CallTimeout,
    MaxConnectionAge,
}

impl Closed {
    fn as_str(self) -> &'static str {
        match self {
            Self::IdleTimeout => "idle_timeout",
            Self::CallTimeout => "call_timeout",
            Self::MaxConnectionAge => "max_connection_age",
        }
    }
}

/// An accepted TLS connection, handed to tonic.
pub struct TlsConn {
    /// Writes coalesced until h2 flushes: one TLS record and one `writev` per response, not three.
    stream: Coalesce<TlsStream<Displaceable<TcpStream>>>,
    info: PeerInfo,
    idle_timeout: Duration,
    call_timeout: Duration,
    /// When the current period of unary calls began ([`ConnActivity::next_period`]).
    period_began: Instant,
    /// When the connection is cut whatever it is doing: its maximum age (tonic sends GOAWAY then)
    /// plus the grace for calls and streams still running.
    hard_deadline: Instant,
    /// The next time the limits are checked: the idle deadline or the hard deadline, whichever
    /// comes first, and with a unary call in flight the end of the current period. Polled only
    /// when a read would block, so busy connections pay nothing.
    timer: Pin<Box<Sleep>>,
    /// Set once the listener ended the connection: every later read is end-of-file.
    closed: Option<Closed>,
    metrics: Metrics,
}

impl Drop for TlsConn {
    fn drop(&mut self) {
        self.metrics.connections_open.dec();
    }
}

impl TlsConn {
    /// Checks the limits when the timer fires; re-arms it while the connection may live on.
    /// `Some` when the connection must end now.
    fn poll_limits(&mut self, cx: &mut Context<'_>) -> Option<Closed> {
        while self.timer.as_mut().poll(cx).is_ready() {
            let now = Instant::now();
            if now >= self.hard_deadline {
                return Some(Closed::MaxConnectionAge);
            }
            let activity = &self.info.activity;
            // A unary call's response not taken (a client that stopped reading, or left its h2
            // window at zero) keeps its call, and the message tonic encoded for it, in flight:
            // without this the connection would hold them until its maximum age.
            let period_ends = later(self.period_began, self.call_timeout);
            if now >= period_ends {
                if activity.next_period().is_err() {
                    return Some(Closed::CallTimeout);
                }
                self.period_began = now;
            }
            let mut next = match activity.idle_since() {
                // A call (or a bundle stream) is in flight: look again an idle period from now.
                None => later(now, self.idle_timeout),
                Some(since) => {
                    let idle_at = later(since, self.idle_timeout);
                    if now >= idle_at {
                        return Some(Closed::IdleTimeout);
                    }
                    idle_at
                }
            };
            if activity.unary_in_flight() {
                next = next.min(later(self.period_began, self.call_timeout));
            }
            self.timer.as_mut().reset(next.min(self.hard_deadline));
        }
        None
    }
}

/// `at + d`, or far in the future when that overflows.
fn later(at: Instant, d: Duration) -> Instant {
    at.checked_add(d)
        .unwrap_or_else(|| at + Duration::from_secs(100 * 365 * 86_400))
}

impl Connected for TlsConn {
    type ConnectInfo = PeerInfo;
    fn connect_info(&self) -> PeerInfo {
        self.info.clone()
    }
}

impl AsyncRead for TlsConn {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = &mut *self;
        if this.closed.is_some() {
            return Poll::Ready(Ok(()));
        }
        match Pin::new(&mut this.stream).poll_read(cx, buf) {
            Poll::Pending => {}
            ready => return ready,
        }
        // Nothing to read: the moment to look at the limits. End-of-file ends the h2 connection
        // (and with it any stream still open); the client reconnects when it needs to.
        if this.limits_reached(cx) {
            Poll::Ready(Ok(()))
        } else {
            Poll::Pending
        }
    }
}

impl TlsConn {
    /// Looks at the limits (when nothing can be read or written: the timer wakes the connection's
    /// task); `true` once the connection must close, counted and logged once.
    fn limits_reached(&mut self, cx: &mut Context<'_>) -> bool {
        if self.closed.is_some() {
            return true;
        }
        let Some(why) = self.poll_limits(cx) else {
            return false;
        };
        self.closed = Some(why);
        self.metrics
            .connections_closed
            .get_or_create(&ReasonLabels {
                reason: why.as_str(),
            })
            .inc();
        tracing::debug!(peer = %self.info.remote_addr, reason = why.as_str(), "closing connection");
        true
    }

    /// A write that cannot go on (the client does not read): h2 then reads nothing either (it
    /// will not take the next frame while a PONG waits to be written), so the limits are looked at
    /// here too. Before, a client that sent PINGs and read one segment a minute kept its
    /// connection past every limit, its maximum age and a revoked certificate's included.
    fn stuck<T>(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<T>> {
        if self.limits_reached(cx) {
            Poll::Ready(Err(io::Error::new(
                io::ErrorKind::TimedOut,
                "the connection reached a limit while its writes were stuck",
            )))
        } else {
            Poll::Pending
        }
    }
}

impl AsyncWrite for TlsConn {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let this = &mut *self;
        match Pin::new(&mut this.stream).poll_write(cx, buf) {
            Poll::Pending => this.stuck(cx),
            ready => ready,
        }
    }
    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = &mut *self;
        match Pin::new(&mut this.stream).poll_flush(cx) {
            Poll::Pending => this.stuck(cx),
            ready => ready,
        }
    }
    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.stream).poll_shutdown(cx)
    }
    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let this = &mut *self;
        match Pin::new(&mut this.stream).poll_write_vectored(cx, bufs) {
            Poll::Pending => this.stuck(cx),
            ready => ready,
        }
    }
    fn is_write_vectored(&self) -> bool {
        self.stream.is_write_vectored()
    }
}

/// Listener limits.
#[derive(Debug, Clone, Copy)]
pub struct ListenerLimits {
    pub handshake_timeout: Duration,
    /// Connections open at once. Past it a connection not proven yet is displaced
    /// ([`meshid_runtime::admission`], [`ConnActivity::prove`]); the newcomer is refused only
    /// when every one is proven.
    pub max_connections: usize,
    /// Most connections (handshaking or established) from one source IP; the one past it is closed
    /// at once, before any TLS work.
    pub max_connections_per_source: usize,
    /// A connection with no call in flight for this long is closed (an open bundle stream is a
    /// call in flight).
    pub idle_timeout: Duration,
    /// A connection with a unary call (every call but a stream: `WatchTrustBundle`, health
    /// `Watch`) still in flight this long after it began is closed: its client is not taking its
    /// response. Noticed between one and two of these after the call began, once the connection's
    /// timer is on it: that is at its first check (a call timeout after it opened), or with a
    /// call already in flight at the next check, which may be up to an idle timeout away.
    pub call_timeout: Duration,
    /// A connection this old is told to go away (HTTP/2 GOAWAY): it takes no new calls, those in
    /// flight finish, and the client opens a new connection for the next one.
    pub max_connection_age: Duration,
    /// How long a connection past its maximum age may keep its calls and streams before it is cut
    /// (bundle streams never end by themselves; their clients reconnect).
    pub max_connection_age_grace: Duration,
    /// Calls whose request is still arriving, at once on the process (an eighth of them from one
    /// source): what bounds the memory of unfinished messages ([`crate::arrivals`]). Each holds
    /// at most about 72 KiB, so the default of 448 is at most about 32 MiB.
    pub max_arriving_requests: usize,
}

impl Default for ListenerLimits {
    fn default() -> Self {
        Self {
            handshake_timeout: Duration::from_secs(10),
            max_connections: 10_000,
            max_connections_per_source: 256,
            idle_timeout: Duration::from_secs(5 * 60),
            call_timeout: Duration::from_secs(60),
            max_connection_age: Duration::from_secs(30 * 60),
            max_connection_age_grace: Duration::from_secs(30),
            max_arriving_requests: 448,
        }
    }
}

/// The gRPC health service's streaming method: a stream that never ends by itself, open to
/// anyone (no certificate needed), so they are bounded ([`MAX_HEALTH_WATCHES`]).
const HEALTH_WATCH: &str = "/grpc.health.v1.Health/Watch";

/// The most health `Watch` streams open at once on one CA process; beyond, `RESOURCE_EXHAUSTED`
/// (probes use `Check`, which is not bounded here). Without a bound, anonymous clients could hold
/// any number of never-ending streams (`MAX_STREAMS_PER_CONNECTION` per connection).
pub const MAX_HEALTH_WATCHES: usize = 256;

/// The CA's streaming methods: calls that last as long as their client likes. Every other call is
/// unary, bound by [`ListenerLimits::call_timeout`].
const STREAMING_METHODS: [&str; 2] = [
    "/meshid.ca.v1.CertificateAuthority/WatchTrustBundle",
    HEALTH_WATCH,
];

/// The CA's calls that prove their connection ([`ConnActivity::prove`]) when the CA serves them:
/// those that take the caller's certificate as its credential, checked at the call (revocation,
/// the app-SVID mark, the trust domain), and `Issue` (a renewal, or a token's first certificate).
/// Not `GetTrustBundle`, which answers anyone, nor health checks or reflection.
const PROVING_METHODS: [&str; 4] = [
    "/meshid.ca.v1.CertificateAuthority/Issue",
    "/meshid.ca.v1.CertificateAuthority/IssueJwtSvid",
    "/meshid.ca.v1.CertificateAuthority/WatchTrustBundle",
    "/meshid.ca.v1.CertificateAuthority/AckTrustBundle",
];

/// Whether a response head shows its call served: HTTP 200 and no gRPC status but OK in the head.
/// A call refused before its first message is answered Trailers-Only, its `grpc-status` in the
/// head; a served one has its status in the trailers.
fn served<B>(response: &http::Response<B>) -> bool {
    response.status() == http::StatusCode::OK
        && response
            .headers()
            .get("grpc-status")
            .is_none_or(|status| status.as_bytes() == b"0")
}

/// Marks every call as in flight on its connection ([`PeerInfo::activity`]) until its response
/// body has ended or is dropped, so a `WatchTrustBundle` stream keeps its connection busy for as
/// long as it is open. The idle timeout reads the count. A call of [`PROVING_METHODS`] whose
/// response head shows it served proves its connection. Also bounds the health `Watch` streams
/// open at once ([`MAX_HEALTH_WATCHES`]).
#[derive(Debug, Clone)]
pub struct TrackCallsLayer {
    health_watches: Arc<tokio::sync::Semaphore>,
}

impl Default for TrackCallsLayer {
    fn default() -> Self {
        Self::with_health_watches(MAX_HEALTH_WATCHES)
    }
}

impl TrackCallsLayer {
    /// At most `max` health `Watch` streams open at once.
    pub fn with_health_watches(max: usize) -> Self {
        Self {
            health_watches: Arc::new(tokio::sync::Semaphore::new(max)),
        }
    }
}

impl<S> tower::Layer<S> for TrackCallsLayer {
    type Service = TrackCalls<S>;
    fn layer(&self, inner: S) -> TrackCalls<S> {
        TrackCalls {
            inner,
            health_watches: self.health_watches.clone(),
        }
    }
}

/// See [`TrackCallsLayer`].
#[derive(Debug, Clone)]
pub struct TrackCalls<S> {
    inner: S,
    health_watches: Arc<tokio::sync::Semaphore>,
}

type BoxFuture<T> = Pin<Box<dyn Future<Output = T> + Send>>;

impl<S, ReqBody, ResBody> tower::Service<http::Request<ReqBody>> for TrackCalls<S>
where
    S: tower::Service<http::Request<ReqBody>, Response = http::Response<ResBody>>,
    S::Future: Send + 'static,
    ResBody: Default + Send + 'static,
{
    type Response = http::Response<TrackedBody<ResBody>>;
    type Error = S::Error;
    type Future = BoxFuture<Result<Self::Response, S::Error>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), S::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, req: http::Request<ReqBody>) -> Self::Future {
        let permit = if req.uri().path() == HEALTH_WATCH {
            match self.health_watches.clone().try_acquire_owned() {
                Ok(permit) => Some(permit),
                Err(_) => {
                    let status = tonic::Status::resource_exhausted(format!(
                        "too many health Watch streams open on this CA ({MAX_HEALTH_WATCHES} at \
                         most); use Check"
                    ));
                    let response = status
                        .into_http::<ResBody>()
                        .map(|inner| TrackedBody::new(inner, None));
                    return Box::pin(async move { Ok(response) });
                }
            }
        } else {
            None
        };
        let stream = STREAMING_METHODS.contains(&req.uri().path());
        let guard = req
            .extensions()
            .get::<PeerInfo>()
            .map(|p| p.activity.call(stream));
        let proving = PROVING_METHODS.contains(&req.uri().path());
        let response = self.inner.call(req);
        Box::pin(async move {
            let response = response.await?;
            // Proven by what the CA made of the call, not by its arrival: a refused renewal (a
            // revoked certificate, an app SVID) proves nothing.
            if let Some(CallGuard { activity, .. }) = &guard
                && proving
                && served(&response)
            {
                activity.prove();
            }
            Ok(response.map(|inner| TrackedBody::new(inner, Some((guard, permit)))))
        })
    }
}

/// A response body that keeps its call in flight (and a health `Watch` stream's place) until it
/// ends or is dropped.
pub type TrackedBody<B> = meshid_runtime::body::HoldUntilEnd<
    B,
    (Option<CallGuard>, Option<tokio::sync::OwnedSemaphorePermit>),
>;

/// Accepts TCP connections and completes TLS handshakes off the accept loop, with the current
/// config at the time of each handshake. The stream ends when the receiver is dropped.
pub fn incoming(
    listener: TcpListener,
    config: Arc<ArcSwap<ServerConfig>>,
    limits: ListenerLimits,
    metrics: Metrics,
) -> ReceiverStream<io::Result<TlsConn>> {
    let (tx, rx) = mpsc::channel(128);
    // An IPv6 source is its /64, as for the audit budget (`crate::audit::Source`): one host may
    // hold a whole /64 and draw addresses from it at will.
    let admission = Admission::grouping_ipv6(
        limits.max_connections,
        Some(limits.max_connections_per_source),
        64,
    );
    let lineages = Arc::new(ProvenLineages::new(MAX_PROVEN_CONNECTIONS_PER_LINEAGE));
    tokio::spawn(async move {
        let refused = |reason: &'static str| {
            metrics
                .connections_refused
                .get_or_create(&ReasonLabels { reason })
                .inc();
        };
        loop {
            let (tcp, remote_addr) = tokio::select! {
                pair = meshid_runtime::net::accept_retrying(&listener, "ca") => pair,
                () = tx.closed() => return,
            };
            let admitted = match admission.admit(remote_addr.ip()) {
                Ok(admitted) => admitted,
                Err(why) => {
                    refused(why.reason());
                    // Counted, not logged one by one: a flood from one address would flood the
                    // log.
                    tracing::debug!(peer = %remote_addr, reason = why.reason(), "connection limit reached; refusing");
                    drop(tcp);
                    continue;
                }
            };
            let displaced = admitted.displaced_another;
            if displaced {
                refused("displaced");
            }
            let _ = tcp.set_nodelay(true);
            // A sidecar that vanished (its node gone) is noticed by the kernel, not by h2 PINGs.
            let _ = meshid_runtime::net::keepalive(&tcp);
            let tcp = Displaceable::new(tcp, admitted.displacement);
            let ticket = admitted.ticket;
            let acceptor = TlsAcceptor::from(config.load_full());
            let tx = tx.clone();
            let metrics = metrics.clone();
            let lineages = lineages.clone();
            tokio::spawn(async move {
                let handshake =
                    tokio::time::timeout(limits.handshake_timeout, acceptor.accept(tcp)).await;
                let stream = match handshake {
                    Ok(Ok(stream)) => stream,
                    Ok(Err(error)) if is_displaced(&error) => {
                        tracing::debug!(peer = %remote_addr, "displaced during its tls handshake by a newer connection at the limit");
                        return;
                    }
                    Ok(Err(error)) => {
                        let reason = error
                            .get_ref()
                            .and_then(|e| e.downcast_ref::<rustls::Error>())
                            .map(meshid_identity::verify::failure_label)
                            .unwrap_or("protocol");
                        metrics
                            .handshake_failures
                            .get_or_create(&ReasonLabels { reason })
                            .inc();
                        tracing::debug!(%error, reason, peer = %remote_addr, "tls handshake failed");
                        return;
                    }
                    Err(_) => {
                        metrics
                            .handshake_failures
                            .get_or_create(&ReasonLabels { reason: "timeout" })
                            .inc();
                        tracing::debug!(peer = %remote_addr, "tls handshake timed out");
                        return;
                    }
                };
                let certificates: Option<Arc<Vec<CertificateDer<'static>>>> = stream
                    .get_ref()
                    .1
                    .peer_certificates()
                    .map(|c| Arc::new(c.iter().map(|c| c.clone().into_owned()).collect()));
                let leaf_identity = certificates.as_ref().and_then(|c| c.first()).map(|leaf| {
                    Arc::new(
                        meshid_identity::cert_identity_from_der(leaf).map_err(|e| e.to_string()),
                    )
                });
                metrics.connections_open.inc();
                // Only a connection with a client certificate (verified by the handshake) is proven,
                // by a call the CA serves for it; an anonymous one keeps its ticket unproven until
                // it closes, as does one presenting an app SVID.
                let lineage = leaf_identity
                    .as_deref()
                    .and_then(|leaf| leaf.as_ref().ok())
                    .and_then(|leaf| LineageProof::new(&lineages, leaf, remote_addr));
                let activity = Arc::new(ConnActivity::new(Some(ticket)).proven_by(lineage));
                let opened = activity.opened;
                let hard_deadline = later(
                    later(activity.opened, limits.max_connection_age),
                    limits.max_connection_age_grace,
                );
                let first_check = later(
                    activity.opened,
                    limits.idle_timeout.min(limits.call_timeout),
                )
                .min(hard_deadline);
                let conn = TlsConn {
                    stream: Coalesce::new(stream),
                    info: PeerInfo {
                        remote_addr,
                        certificates,
                        leaf_identity,
                        activity,
                    },
                    idle_timeout: limits.idle_timeout,
                    call_timeout: limits.call_timeout,
                    period_began: opened,
                    hard_deadline,
                    timer: Box::pin(tokio::time::sleep_until(first_check)),
                    closed: None,
                    metrics,
                };
                let _ = tx.send(Ok(conn)).await;
            });
            if displaced {
                // At the cap under a flood: let the connections just admitted (a real client's
                // among them) move their handshakes on before the next arrival displaces the
                // oldest of them.
                tokio::task::yield_now().await;
            }
        }
    });
    ReceiverStream::new(rx)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The CA's port speaks TLS 1.3 only and resumes no session: a client offering only TLS 1.2
    /// is refused, and a client that kept the first handshake's session gets a full handshake
    /// (its certificate verified again) the second time.
    #[tokio::test]
    async fn tls_1_3_only_and_every_handshake_full() {
        let dir = tempfile::tempdir().unwrap();
        let td = meshid_identity::TrustDomain::new("cluster.local").unwrap();
        crate::authority::init(dir.path(), &td, None).unwrap();
        let authority = Authority::load(dir.path()).unwrap();
        let (server, _) = server_config(&authority, &["localhost".to_owned()]).unwrap();
        let acceptor = tokio_rustls::TlsAcceptor::from(server);
        let mut roots = rustls::RootCertStore::empty();
        for r in &authority.roots {
            roots.add(r.clone()).unwrap();
        }
        let client = |versions: &[&'static rustls::SupportedProtocolVersion]| {
            let mut c = rustls::ClientConfig::builder_with_provider(provider())
                .with_protocol_versions(versions)
                .unwrap()
                .with_root_certificates(roots.clone())
                .with_no_client_auth();
            c.alpn_protocols = vec![b"h2".to_vec()];
            Arc::new(c)
        };
        let handshake = |config: Arc<rustls::ClientConfig>| {
            let acceptor = acceptor.clone();
            async move {
                use tokio::io::{AsyncReadExt, AsyncWriteExt};
                let (a, b) = tokio::io::duplex(64 * 1024);
                let server = tokio::spawn(async move {
                    // A byte after the handshake: the client reads any session ticket before it.
                    let mut tls = acceptor.accept(b).await?;
                    tls.write_all(b"x").await?;
                    tls.flush().await?;
                    let mut rest = Vec::new();
                    tls.read_to_end(&mut rest).await.map(|_| ())
                });
                let name = rustls::pki_types::ServerName::try_from("localhost").unwrap();
                let got = async {
                    let mut tls = tokio_rustls::TlsConnector::from(config)
                        .connect(name, a)
                        .await?;
                    let mut byte = [0u8; 1];
                    tls.read_exact(&mut byte).await?;
                    let kind = tls.get_ref().1.handshake_kind();
                    tls.shutdown().await?;
                    Ok::<_, std::io::Error>(kind)
                }
                .await;
                let _ = server.await;
                got
            }
        };
        assert!(handshake(client(&[&rustls::version::TLS12])).await.is_err());
        let resuming = client(&[&rustls::version::TLS13]);
        for _ in 0..2 {
            let kind = handshake(resuming.clone()).await.unwrap();
            assert_eq!(kind, Some(rustls::HandshakeKind::Full));
        }
    }

    fn source(last: u8) -> IpAddr {
        IpAddr::V4(std::net::Ipv4Addr::new(127, 0, 0, last))
    }

    /// A connection from 127.0.0.`last` admitted by `admission`, whose certificate is of
    /// `lineage` (`None`: anonymous).
    fn connection(
        admission: &Admission,
        lineages: &Arc<ProvenLineages>,
        last: u8,
        lineage: Option<&str>,
    ) -> Arc<ConnActivity> {
        let ticket = admission.admit(source(last)).unwrap().ticket;
        let proof = lineage.map(|l| LineageProof {
            lineage: l.into(),
            lineages: lineages.clone(),
            peer: SocketAddr::new(source(last), 1),
            held: AtomicBool::new(false),
        });
        Arc::new(ConnActivity::new(Some(ticket)).proven_by(proof))
    }

    /// Whether every slot of `admission` (full) is held by a proven connection: a newcomer is
    /// refused rather than displacing one.
    fn all_proven(admission: &Admission) -> bool {
        admission.admit(source(250)).is_err()
    }

    struct Case {
        name: &'static str,
        path: &'static str,
        /// The response head's `grpc-status`, if any.
        status: Option<&'static str>,
        certificate: bool,
        proven: bool,
    }

    /// Only a call of the CA's credential-taking methods that the CA served, on a connection that
    /// presented a certificate, proves it: not the anonymous bundle, not a health check, not a
    /// refusal (a Trailers-Only answer), not a method that does not exist.
    #[tokio::test]
    async fn only_a_served_call_that_takes_the_certificate_proves_its_connection() {
        const CA: &str = "/meshid.ca.v1.CertificateAuthority/";
        let cases = [
            Case {
                name: "a renewal served",
                path: "/meshid.ca.v1.CertificateAuthority/Issue",
                status: None,
                certificate: true,
                proven: true,
            },
            Case {
                name: "a JWT-SVID served",
                path: "/meshid.ca.v1.CertificateAuthority/IssueJwtSvid",
                status: None,
                certificate: true,
                proven: true,
            },
            Case {
                name: "a bundle stream opened",
                path: "/meshid.ca.v1.CertificateAuthority/WatchTrustBundle",
                status: None,
                certificate: true,
                proven: true,
            },
            Case {
                name: "an acknowledgement, answered OK in the head",
                path: "/meshid.ca.v1.CertificateAuthority/AckTrustBundle",
                status: Some("0"),
                certificate: true,
                proven: true,
            },
            Case {
                name: "a renewal refused (revoked)",
                path: "/meshid.ca.v1.CertificateAuthority/Issue",
                status: Some("7"),
                certificate: true,
                proven: false,
            },
            Case {
                name: "a bundle stream refused (an app SVID)",
                path: "/meshid.ca.v1.CertificateAuthority/WatchTrustBundle",
                status: Some("16"),
                certificate: true,
                proven: false,
            },
            Case {
                name: "the bundle, answered to anyone",
                path: "/meshid.ca.v1.CertificateAuthority/GetTrustBundle",
                status: None,
                certificate: true,
                proven: false,
            },
            Case {
                name: "a health check",
                path: "/grpc.health.v1.Health/Check",
                status: None,
                certificate: true,
                proven: false,
            },
            Case {
                name: "a method that does not exist",
                path: "/meshid.ca.v1.CertificateAuthority/IssueX",
                status: Some("12"),
                certificate: true,
                proven: false,
            },
            Case {
                name: "a bundle stream without a certificate",
                path: "/meshid.ca.v1.CertificateAuthority/WatchTrustBundle",
                status: None,
                certificate: false,
                proven: false,
            },
        ];
        for case in cases {
            let admission = Admission::new(1, None);
            let lineages = Arc::new(ProvenLineages::new(MAX_PROVEN_CONNECTIONS_PER_LINEAGE));
            let lineage = case.certificate.then_some("spiffe://td/a 1");
            let activity = connection(&admission, &lineages, 1, lineage);
            let status = case.status;
            let inner = tower::service_fn(move |_: http::Request<()>| async move {
                let mut response = http::Response::new(String::new());
                if let Some(status) = status {
                    response
                        .headers_mut()
                        .insert("grpc-status", http::HeaderValue::from_static(status));
                }
                Ok::<_, std::convert::Infallible>(response)
            });
            let mut calls = tower::Layer::layer(&TrackCallsLayer::default(), inner);
            let mut request = http::Request::post(case.path).body(()).unwrap();
            request.extensions_mut().insert(PeerInfo {
                remote_addr: SocketAddr::new(source(1), 1),
                certificates: None,
                leaf_identity: None,
                activity: activity.clone(),
            });
            let response = tower::Service::call(&mut calls, request).await.unwrap();
            drop(response);
            assert_eq!(all_proven(&admission), case.proven, "{}", case.name);
            drop(activity);
        }
        for path in PROVING_METHODS {
            let method = path.strip_prefix(CA).unwrap();
            let proto = include_str!("../../proto/meshid/ca/v1/ca.proto");
            assert!(proto.contains(&format!("rpc {method}(")), "{path}");
        }
        use tonic::server::NamedService;
        type Server =
            meshid_proto::ca::v1::certificate_authority_server::CertificateAuthorityServer<
                crate::service::CaService,
            >;
        assert_eq!(CA, format!("/{}/", Server::NAME));
    }

    /// One lineage holds at most its share of proven connections; the next of it stays
    /// displaceable, other lineages are not affected, and a place given back is taken by the next
    /// served call.
    #[test]
    fn a_lineage_holds_at_most_its_share_of_proven_connections() {
        let admission = Admission::new(4, None);
        let lineages = Arc::new(ProvenLineages::new(2));
        let a = "spiffe://td/a 1";
        let first = connection(&admission, &lineages, 1, Some(a));
        let second = connection(&admission, &lineages, 2, Some(a));
        let third = connection(&admission, &lineages, 3, Some(a));
        let other = connection(&admission, &lineages, 4, Some("spiffe://td/a 2"));
        for c in [&first, &second, &third, &other] {
            c.prove();
            c.prove();
        }
        assert_eq!(lineages.lock()[a].proven, 2);
        // The third of lineage `a` is displaced by a newcomer, not the newcomer refused.
        assert!(!all_proven(&admission), "the third of a lineage was proven");
        // Once one of its proven connections closes, the lineage proves another by a call.
        let fourth = connection(&admission, &lineages, 5, Some(a));
        drop(first);
        drop(third);
        fourth.prove();
        assert_eq!(lineages.lock()[a].proven, 2);
        let fifth = connection(&admission, &lineages, 6, Some("spiffe://td/a 3"));
        fifth.prove();
        assert!(all_proven(&admission));
        drop((second, fourth, fifth));
        assert!(
            !lineages.lock().contains_key(a),
            "a lineage holding none is forgotten"
        );
    }

    /// One source holds at most its share of proven connections, whatever lineages it shows
    /// (each token issuance starts one); the next stays displaceable, and places are given back.
    #[test]
    fn a_source_holds_at_most_its_share_of_proven_connections() {
        let admission = Admission::new(4, None);
        let mut lineages = ProvenLineages::new(MAX_PROVEN_CONNECTIONS_PER_LINEAGE);
        lineages.max_per_source = 2;
        let lineages = Arc::new(lineages);
        let names: Vec<String> = (0..3).map(|i| format!("spiffe://td/a {i}")).collect();
        let minted: Vec<_> = names
            .iter()
            .map(|l| connection(&admission, &lineages, 7, Some(l)))
            .collect();
        for c in &minted {
            c.prove();
        }
        assert_eq!(lineages.lock_sources()[&source(7)].proven, 2);
        let other = connection(&admission, &lineages, 8, Some("spiffe://td/b 1"));
        other.prove();
        assert!(
            !all_proven(&admission),
            "the third of one source was proven"
        );
        assert!(
            !lineages.lock().contains_key(names[2].as_str()),
            "a lineage refused its place holds none"
        );
        drop((minted, other));
        assert!(lineages.lock_sources().is_empty());
        assert!(lineages.lock().is_empty());
    }

    #[tokio::test]
    async fn a_connection_is_idle_only_with_no_call_in_flight() {
        let activity = Arc::new(ConnActivity::default());
        assert_eq!(activity.idle_since(), Some(activity.opened));
        let first = activity.call(false);
        let second = activity.call(true);
        assert_eq!(activity.in_flight(), 2);
        assert_eq!(activity.idle_since(), None);
        drop(first);
        assert_eq!(activity.idle_since(), None, "one call still in flight");
        drop(second);
        assert_eq!(activity.in_flight(), 0);
        let since = activity.idle_since().unwrap();
        assert!(since >= activity.opened && since <= Instant::now());
    }

    /// A unary call is found out at the second period that starts after it began, not before (its
    /// age is then at least one period); a stream never is; a call that ended is forgotten.
    #[test]
    fn a_unary_call_is_found_out_two_periods_after_it_began() {
        let activity = Arc::new(ConnActivity::default());
        let stream = activity.call(true);
        let stuck = activity.call(false);
        assert!(activity.unary_in_flight());
        // Each period a unary call comes and goes: it never trips the check.
        for _ in 0..4 {
            drop(activity.call(false));
        }
        assert_eq!(activity.next_period(), Ok(()), "began in this period");
        let quick = activity.call(false);
        assert_eq!(activity.next_period(), Err(()), "began a whole period ago");
        drop(stuck);
        assert_eq!(activity.next_period(), Ok(()));
        drop(quick);
        for _ in 0..6 {
            let call = activity.call(false);
            assert_eq!(activity.next_period(), Ok(()));
            drop(call);
        }
        assert!(!activity.unary_in_flight());
        assert_eq!(activity.in_flight(), 1, "the stream is still open");
        assert_eq!(
            activity.next_period(),
            Ok(()),
            "a stream is never timed out"
        );
        drop(stream);
    }
}
