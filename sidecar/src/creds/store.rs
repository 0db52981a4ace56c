//! The one seam where credentials enter the data plane.
//!
//! Every source (PEM files today; the CA client and file watcher next) calls
//! [`CredentialStore::set_certificate`]. A new set is validated — the key matches the leaf, the chain
//! verifies to the bundle, the identity is a valid SPIFFE ID — before anything is published; then the
//! TLS configs for every listener and upstream are built once and swapped in atomically. New
//! handshakes use them at once; live connections keep theirs. Until the first set arrives, handshakes
//! are refused; a rejected set leaves the last good one serving.

use std::fmt;
use std::sync::Arc;

use arc_swap::ArcSwapOption;
use meshid_identity::{CertIdentity, IdentityError, SpiffeId, cert_identity_from_der};
use rustls::crypto::CryptoProvider;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, UnixTime};
use rustls::sign::CertifiedKey;
use rustls::{ClientConfig, ServerConfig};
use tokio::sync::watch;

use meshid_identity::peer::{VerifiedPeer, VerifiedPeers};
use meshid_identity::policy::Protocol;
use meshid_identity::revocation::{RevocationSet, RevokedBy};
use meshid_identity::verify::{Anchors, SpiffeClientVerifier, SpiffeServerVerifier};

/// See [`Snapshot::trust_key`]: a hash of the roots and pinned intermediates, in their order.
fn trust_key(roots: &[CertificateDer<'_>], pinned: &[CertificateDer<'_>]) -> u64 {
    use std::hash::{Hash, Hasher};
    let mut h = std::collections::hash_map::DefaultHasher::new();
    for c in roots {
        c.as_ref().hash(&mut h);
    }
    pinned.len().hash(&mut h);
    for c in pinned {
        c.as_ref().hash(&mut h);
    }
    h.finish()
}

/// When a connection's peer is no longer trusted by the clock ([`CredentialStore::distrusts`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Expiry {
    /// The earliest not-after of the chain the peer presented (its leaf's, or an intermediate's
    /// that ends first: [`meshid_identity::peer::chain_not_after`]).
    pub not_after: i64,
    /// Seconds past it the connection may still live.
    pub grace: i64,
}

/// Why an open connection's peer is no longer trusted: the connection must end.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Distrusted {
    /// The bundle revokes its certificate, its lineage or its identity.
    Revoked(RevokedBy),
    /// Its chain no longer verifies against the bundle (its root or intermediate was removed).
    Unanchored,
    /// Its certificate expired by the wall clock (plus the grace its connection has), found when
    /// the wall clock moved apart from the monotonic one that times the connection's own deadline
    /// ([`CredentialStore::clock_moved`]).
    Expired { not_after: i64 },
}

impl Distrusted {
    /// Whether the bundle no longer trusts the peer (a revocation or a missing anchor), as
    /// `revoked_peer_connections_closed_total` counts; not an expiry.
    pub fn by_bundle(&self) -> bool {
        !matches!(self, Self::Expired { .. })
    }
}

impl fmt::Display for Distrusted {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Revoked(r) => write!(f, "revoked {r}"),
            Self::Unanchored => {
                f.write_str("its chain no longer verifies against the trust bundle")
            }
            Self::Expired { not_after } => write!(
                f,
                "its certificate expired at {not_after} (Unix seconds) by the wall clock, which \
                 moved ahead of the connection's timer"
            ),
        }
    }
}

/// A certificate chain (leaf first), its private key, and the trust bundle, as one set.
pub struct Credentials {
    pub chain: Vec<CertificateDer<'static>>,
    pub key: PrivateKeyDer<'static>,
    pub roots: Vec<CertificateDer<'static>>,
    /// The issuing intermediates trust under a shared root is pinned to (from the CA; none in
    /// file mode). See [`Anchors::with_pins`].
    pub pinned: Vec<CertificateDer<'static>>,
}

impl fmt::Debug for Credentials {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // Never print the key.
        f.debug_struct("Credentials")
            .field("chain", &self.chain.len())
            .field("key", &"<redacted>")
            .field("roots", &self.roots.len())
            .field("pinned", &self.pinned.len())
            .finish()
    }
}

/// Why a credential set was refused.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum CredError {
    #[error("certificate chain is empty")]
    EmptyChain,
    #[error(
        "certificate chain of {certs} certificates is {bytes} bytes in a TLS Certificate message, \
         over the {MAX_CHAIN_MESSAGE} it may be: peers would refuse every handshake (a bundle \
         appended to the certificate file?)"
    )]
    ChainTooLarge { certs: usize, bytes: usize },
    #[error(
        "certificate chain holds {0} certificates past its leaf; peers take at most {max} (its \
         intermediate, and the root if it is sent): a bundle appended to the certificate file?",
        max = meshid_identity::verify::MAX_INTERMEDIATES
    )]
    ChainTooLong(usize),
    #[error("trust bundle is empty")]
    EmptyBundle,
    #[error("certificate identity: {0}")]
    Identity(#[from] IdentityError),
    #[error("trust bundle: {0:?}")]
    Bundle(webpki::Error),
    #[error("private key: {0}")]
    Key(rustls::Error),
    #[error(
        "certificate does not verify against the trust bundle: {}",
        meshid_identity::verify::describe(.0)
    )]
    Chain(rustls::Error),
    #[error("tls configuration: {0}")]
    Tls(#[from] rustls::Error),
    #[error("the new certificate is for {offered}, but this sidecar is {current}")]
    IdentityChanged {
        current: SpiffeId,
        offered: SpiffeId,
    },
}

impl CredError {
    /// Whether the same set may pass at a later moment: its chain is not valid yet (a rotator
    /// whose clock runs ahead of this node's). Any other refusal stands until the set changes: an
    /// expired certificate does not become valid again, and the trust bundle a chain is checked
    /// against comes with the set (the file mode's bundle file) or is the CA's, whose client
    /// retries by itself.
    pub fn may_pass_later(&self) -> bool {
        matches!(
            self,
            Self::Chain(e) if meshid_identity::verify::failure_label(e) == "not_yet_valid"
        )
    }
}

/// The longest Certificate message a chain may make: rustls (every meshid peer) takes handshake
/// messages of up to 64 KiB and buffers at most that much of a flight while joining one, so a
/// chain whose message is longer passes every check of ours and then fails every handshake; 4 KiB
/// of it are left for the records' overhead and the rest of the flight. (A mesh chain is 1-3 KiB.)
pub const MAX_CHAIN_MESSAGE: usize = 0xffff - 4096;

/// The length of a TLS 1.3 Certificate message's body carrying `chain`: the request context's
/// length (1), the list's length (3), and per certificate its length (3) and its extensions' (2).
fn chain_message_len(chain: &[CertificateDer<'_>]) -> usize {
    chain.iter().map(|c| c.len() + 5).sum::<usize>() + 4
}

/// One upstream's expectations, fixed at start.
#[derive(Debug, Clone)]
pub struct UpstreamSpec {
    pub expected: SpiffeId,
    pub protocol: Protocol,
}

/// A validated credential set with every TLS config built from it.
pub struct Snapshot {
    pub identity: CertIdentity,
    pub anchors: Anchors,
    /// Who the inbound verifier of this snapshot's server configs found each peer to be.
    pub peers: Arc<VerifiedPeers>,
    /// SHA-256 fingerprints of the trust anchors (hex), for `/identity`.
    pub anchor_fingerprints: Vec<String>,
    /// Not-after of each trust anchor (seconds since the epoch).
    pub anchor_not_after: Vec<i64>,
    pub server_tcp: Arc<ServerConfig>,
    pub server_http: Arc<ServerConfig>,
    /// Indexed like the store's upstreams (HTTP upstreams: ALPN `h2`).
    pub clients: Vec<Arc<ClientConfig>>,
    /// The same, offering ALPN `http/1.1` to HTTP upstreams (the same config for TCP ones).
    pub clients_h1: Vec<Arc<ClientConfig>>,
    /// SHA-256 (hex) of our own leaf.
    pub leaf_sha256: String,
    /// SHA-256 (hex) of the certificate that issued our leaf (the chain's second; `None` when the
    /// chain is the leaf alone): shows which intermediate a rotation left us under.
    pub issuer_sha256: Option<String>,
    /// SHA-256 (hex) of our public key (changes at every renewal: a fresh key each time).
    pub public_key_sha256: String,
    /// Names the roots and pinned intermediates peers are verified against: equal for two
    /// snapshots of the same trust (a renewal), so open connections re-verify their peer's chain
    /// only when the trust itself changed ([`CredentialStore::until_distrusted`]).
    pub trust_key: u64,
    /// Why peers that share this snapshot's trust would refuse our own certificate, if they would
    /// (its chain does not verify against the roots and pins in force, or the revocations in force
    /// name it, its lineage or its identity): `/readyz` is not ready then.
    pub own_refused: Option<&'static str>,
}

impl fmt::Debug for Snapshot {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Snapshot")
            .field("identity", &self.identity)
            .field("anchors", &self.anchors)
            .finish_non_exhaustive()
    }
}

/// Why peers verifying against `anchors` (and their revocations) would refuse our own `chain`, if
/// they would. Its chain is verified at a time within its life: expiry is the readiness check's
/// own (`Snapshot::valid_at`).
fn own_refusal(
    anchors: &Anchors,
    identity: &CertIdentity,
    leaf: &CertificateDer<'_>,
    chain: &[CertificateDer<'static>],
    provider: &CryptoProvider,
) -> Option<&'static str> {
    let within = meshid_runtime::time::unix_now()
        .min(identity.not_after.saturating_sub(1))
        .max(identity.not_before)
        .max(0);
    let time = UnixTime::since_unix_epoch(std::time::Duration::from_secs(within as u64));
    if anchors
        .verify_workload_chain(
            &provider.signature_verification_algorithms,
            chain,
            time,
            webpki::KeyUsage::client_auth(),
        )
        .is_err()
    {
        return Some("certificate is not trusted by the trust bundle in force (its root retired?)");
    }
    let own = VerifiedPeer::from_leaf(leaf).ok()?;
    anchors
        .revokes(&own)
        .map(|_| "certificate is revoked by the trust bundle in force")
}

impl Snapshot {
    /// The server config for an inbound listener of `protocol`.
    pub fn server(&self, protocol: Protocol) -> &Arc<ServerConfig> {
        match protocol {
            Protocol::Tcp => &self.server_tcp,
            Protocol::Http => &self.server_http,
        }
    }

    /// Whether the leaf is valid at `now` (seconds since the epoch).
    pub fn valid_at(&self, now: i64) -> bool {
        self.identity.not_before <= now && now < self.identity.not_after
    }
}

/// The credential store shared by every listener.
pub struct CredentialStore {
    provider: Arc<CryptoProvider>,
    upstreams: Vec<UpstreamSpec>,
    current: ArcSwapOption<Snapshot>,
    generation: watch::Sender<u64>,
    /// The accepted chain and key, kept (in memory only) to rebuild configs when the bundle changes
    /// and to authenticate renewals.
    held: std::sync::Mutex<Option<Held>>,
}

struct Held {
    chain: Vec<CertificateDer<'static>>,
    key: PrivateKeyDer<'static>,
    roots: Vec<CertificateDer<'static>>,
    pinned: Vec<CertificateDer<'static>>,
    revoked: Arc<RevocationSet>,
    /// The CA's bundle version `roots` and `pinned` are from (0: unknown, files).
    bundle_version: u64,
}

impl fmt::Debug for CredentialStore {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("CredentialStore")
            .field(
                "current",
                &self.current.load().as_ref().map(|s| s.identity.id.clone()),
            )
            .finish_non_exhaustive()
    }
}

/// The crypto provider used everywhere: aws-lc-rs.
pub fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::aws_lc_rs::default_provider())
}

impl CredentialStore {
    pub fn new(upstreams: Vec<UpstreamSpec>) -> Self {
        Self {
            provider: provider(),
            upstreams,
            current: ArcSwapOption::empty(),
            generation: watch::channel(0).0,
            held: std::sync::Mutex::new(None),
        }
    }

    /// Our current chain and key (to present when renewing), if any set was accepted.
    pub fn chain_and_key(&self) -> Option<(Vec<CertificateDer<'static>>, PrivateKeyDer<'static>)> {
        let held = self.held.lock().unwrap_or_else(|p| p.into_inner());
        held.as_ref().map(|h| (h.chain.clone(), h.key.clone_key()))
    }

    /// Whether our own chain still verifies against our trust bundle at `now` (after a forced root
    /// retirement it does not: the CA will refuse it as a renewal credential).
    pub fn own_chain_trusted(&self, now: i64) -> bool {
        let held = self.held.lock().unwrap_or_else(|p| p.into_inner());
        let Some(h) = held.as_ref() else {
            return false;
        };
        let Some(Ok(identity)) = h.chain.first().map(|leaf| cert_identity_from_der(leaf)) else {
            return false;
        };
        let Ok(anchors) = Anchors::with_pins(&h.roots, &h.pinned, identity.id.trust_domain())
        else {
            return false;
        };
        let time = UnixTime::since_unix_epoch(std::time::Duration::from_secs(now.max(0) as u64));
        anchors
            .verify_workload_chain(
                &self.provider.signature_verification_algorithms,
                &h.chain,
                time,
                webpki::KeyUsage::client_auth(),
            )
            .is_ok()
    }

    /// The trust bundle's roots as last accepted.
    pub fn roots(&self) -> Vec<CertificateDer<'static>> {
        let held = self.held.lock().unwrap_or_else(|p| p.into_inner());
        held.as_ref().map(|h| h.roots.clone()).unwrap_or_default()
    }

    /// The CA's bundle version the roots and pins in force are from (0: none yet, or files).
    pub fn bundle_version(&self) -> u64 {
        let held = self.held.lock().unwrap_or_else(|p| p.into_inner());
        held.as_ref().map_or(0, |h| h.bundle_version)
    }

    /// The pinned intermediates as last accepted with the bundle.
    pub fn pinned(&self) -> Vec<CertificateDer<'static>> {
        let held = self.held.lock().unwrap_or_else(|p| p.into_inner());
        held.as_ref().map(|h| h.pinned.clone()).unwrap_or_default()
    }

    /// The anchors an app is handed (the Workload API): the roots, with a root trust under which
    /// is pinned replaced by its pinned intermediates (see
    /// [`meshid_identity::verify::anchors_without_pins`]).
    pub fn app_anchors(&self) -> Vec<CertificateDer<'static>> {
        let held = self.held.lock().unwrap_or_else(|p| p.into_inner());
        held.as_ref()
            .map(|h| meshid_identity::verify::anchors_without_pins(&h.roots, &h.pinned))
            .unwrap_or_default()
    }

    /// The revocations as last accepted with the bundle.
    pub fn revocations(&self) -> Arc<RevocationSet> {
        let held = self.held.lock().unwrap_or_else(|p| p.into_inner());
        held.as_ref().map(|h| h.revoked.clone()).unwrap_or_default()
    }

    /// Replaces the trust bundle, keeping our certificate and key. New handshakes trust exactly the
    /// new roots, and refuse what `revoked` names, at once; live connections are untouched here
    /// (those whose peer it revokes or no longer anchors end by [`Self::until_distrusted`]). Our own
    /// chain need not verify against the new bundle (after a forced root retirement it will not,
    /// until the next renewal).
    pub fn set_bundle(
        &self,
        roots: Vec<CertificateDer<'static>>,
        pinned: Vec<CertificateDer<'static>>,
        revoked: Arc<RevocationSet>,
    ) -> Result<Arc<Snapshot>, CredError> {
        self.set_bundle_at(0, roots, pinned, revoked)
    }

    /// [`Self::set_bundle`] of the CA's bundle `version`: a certificate the CA answered with an
    /// older bundle then keeps these anchors ([`Self::set_certificate_revoking`]).
    pub fn set_bundle_at(
        &self,
        version: u64,
        roots: Vec<CertificateDer<'static>>,
        pinned: Vec<CertificateDer<'static>>,
        revoked: Arc<RevocationSet>,
    ) -> Result<Arc<Snapshot>, CredError> {
        // Held from the read of our certificate to the write of the new set: a renewal in between
        // would otherwise be lost, or lose this bundle's revocations.
        let mut guard = self.held.lock().unwrap_or_else(|p| p.into_inner());
        let (chain, key) = guard
            .as_ref()
            .map(|h| (h.chain.clone(), h.key.clone_key()))
            .ok_or(CredError::EmptyChain)?;
        // An older bundle than the one in force (a replica that has not read the CA directory's
        // last change yet, a CA restarted from a stale copy) lifts nothing: the roots and pins in
        // force stay, its revocations are added to those in force. Taken as it came, it brought a
        // retired root back and lifted a revocation until the stream moved to a newer replica.
        let (roots, pinned, revoked, version) = match guard.as_ref() {
            Some(h) if version != 0 && h.bundle_version > version => {
                let union = match h.revoked.union(&revoked) {
                    Ok(union) if union != *h.revoked => Arc::new(union),
                    _ => {
                        tracing::info!(
                            offered = version,
                            in_force = h.bundle_version,
                            "trust bundle older than the one in force: nothing taken from it"
                        );
                        return self.current().ok_or(CredError::EmptyChain);
                    }
                };
                tracing::info!(
                    offered = version,
                    in_force = h.bundle_version,
                    "trust bundle older than the one in force: only its revocations taken"
                );
                (h.roots.clone(), h.pinned.clone(), union, h.bundle_version)
            }
            _ => (roots, pinned, revoked, version),
        };
        let snapshot = Arc::new(self.build(
            Credentials {
                chain: chain.clone(),
                key: key.clone_key(),
                roots: roots.clone(),
                pinned: pinned.clone(),
            },
            false,
            revoked.clone(),
        )?);
        *guard = Some(Held {
            chain,
            key,
            roots,
            pinned,
            revoked,
            bundle_version: version,
        });
        self.current.store(Some(snapshot.clone()));
        drop(guard);
        self.generation.send_modify(|g| *g += 1);
        Ok(snapshot)
    }

    /// Replaces the revocations in force, keeping certificate, key and trust anchors as they are
    /// (file mode: the CA's list on the report stream), in one step with any other change.
    pub fn set_revocations(&self, revoked: Arc<RevocationSet>) -> Result<Arc<Snapshot>, CredError> {
        let mut held = self.held.lock().unwrap_or_else(|p| p.into_inner());
        let h = held.as_mut().ok_or(CredError::EmptyChain)?;
        let snapshot = Arc::new(self.build(
            Credentials {
                chain: h.chain.clone(),
                key: h.key.clone_key(),
                roots: h.roots.clone(),
                pinned: h.pinned.clone(),
            },
            false,
            revoked.clone(),
        )?);
        h.revoked = revoked;
        self.current.store(Some(snapshot.clone()));
        drop(held);
        self.generation.send_modify(|g| *g += 1);
        Ok(snapshot)
    }

    /// The current snapshot, if any set was ever accepted.
    pub fn current(&self) -> Option<Arc<Snapshot>> {
        self.current.load_full()
    }

    /// Whether `s` is still the snapshot in force (no renewal or bundle change since), without
    /// touching its reference count: cheap enough for every request.
    pub fn is_current(&self, s: &Snapshot) -> bool {
        self.current
            .load()
            .as_deref()
            .is_some_and(|c| std::ptr::eq(c, s))
    }

    /// The wall clock moved apart from the monotonic clock (by more than a second or two): every
    /// open connection's watch looks at its peer again ([`Self::distrusts`]), its expiry included.
    pub fn clock_moved(&self) {
        self.generation.send_modify(|g| *g += 1);
    }

    /// Notified with a new generation number on every accepted set.
    pub fn subscribe(&self) -> watch::Receiver<u64> {
        self.generation.subscribe()
    }

    /// What in the bundle in force revokes `peer`, if anything: checked before every request a
    /// connection forwards, since the connection's own wait for a revocation ([`Self::until_distrusted`])
    /// is only noticed when its task next looks. No reference count is touched.
    pub fn revokes(&self, peer: &VerifiedPeer) -> Option<RevokedBy> {
        self.current.load().as_deref()?.anchors.revokes(peer)
    }

    /// Resolves once the bundle in force no longer trusts `peer`, whose `chain` (leaf first) was
    /// verified for `usage` against the trust named `trust_key` ([`Snapshot::trust_key`]): it
    /// revokes its certificate or identity, or the chain no longer verifies (its root or
    /// intermediate left the bundle). The connection `peer` authenticated must end. Checks the
    /// bundle in force first, so a connection set up just before a change is not missed. The chain
    /// is verified again only when the trust changed, at a time within the peer's validity (its
    /// expiry is the connection deadline's business, not this one's).
    pub async fn until_distrusted(
        &self,
        peer: &VerifiedPeer,
        chain: &[CertificateDer<'_>],
        usage: webpki::KeyUsage,
        mut trust_key: u64,
        expiry: Option<Expiry>,
    ) -> Distrusted {
        let mut changes = self.generation.subscribe();
        loop {
            changes.borrow_and_update();
            if let Some(why) = self.distrusts(peer, chain, usage, &mut trust_key, expiry) {
                return why;
            }
            if changes.changed().await.is_err() {
                // The store is gone (shutdown): nothing will revoke this connection any more.
                return std::future::pending().await;
            }
        }
    }

    /// One look of [`Self::until_distrusted`]: whether the bundle in force no longer trusts `peer`
    /// (see there). `trust_key` is the trust the chain was last verified against; it moves to the
    /// bundle in force when the chain is verified again. For a caller that watches the trust
    /// ([`Self::subscribe`]) along with other things in one future: mark the change seen first,
    /// then look.
    ///
    /// `expiry`: when the connection's age is capped, the peer chain's earliest not-after and the
    /// seconds after it the connection may still live (its grace); the peer is then distrusted
    /// once the wall clock is past that.
    /// The connection's own deadline is a monotonic timer set at the handshake, which a wall clock
    /// stepped forward (an NTP correction, a resumed VM) leaves behind: this look, made again
    /// whenever [`Self::clock_moved`] says so, catches up with it.
    pub fn distrusts(
        &self,
        peer: &VerifiedPeer,
        chain: &[CertificateDer<'_>],
        usage: webpki::KeyUsage,
        trust_key: &mut u64,
        expiry: Option<Expiry>,
    ) -> Option<Distrusted> {
        if let Some(Expiry { not_after, grace }) = expiry
            && meshid_runtime::time::unix_now() > not_after.saturating_add(grace)
        {
            return Some(Distrusted::Expired { not_after });
        }
        let current = self.current.load();
        let s = current.as_deref()?;
        if let Some(revoked) = s.anchors.revokes(peer) {
            return Some(Distrusted::Revoked(revoked));
        }
        if s.trust_key != *trust_key && !chain.is_empty() {
            *trust_key = s.trust_key;
            let at = meshid_runtime::time::unix_now().min(peer.not_after).max(0);
            let at = UnixTime::since_unix_epoch(std::time::Duration::from_secs(
                u64::try_from(at).unwrap_or(0),
            ));
            if s.anchors
                .verify_workload_chain(
                    &self.provider.signature_verification_algorithms,
                    chain,
                    at,
                    usage,
                )
                .is_err()
            {
                return Some(Distrusted::Unanchored);
            }
        }
        None
    }

    /// Validates a credential set, builds every TLS config from it, and publishes it. The
    /// revocations in force stay (they come with the bundle).
    pub fn set_certificate(&self, creds: Credentials) -> Result<Arc<Snapshot>, CredError> {
        self.set_certificate_revoking(creds, &RevocationSet::default(), 0)
    }

    /// As [`Self::set_certificate`], with `also` added to the revocations in force (those the CA
    /// listed with the certificate: only a trust bundle lifts one). Past the bundle's bound the
    /// union is not taken, and the revocations in force stay as they are. `bundle_version` is the
    /// CA's bundle version the anchors of `creds` are from (0: files): older than the bundle in
    /// force (a replica that lags, a bundle applied while the answer was on its way), they are
    /// not taken, and the certificate must verify under the anchors in force. A retired root
    /// does not come back with a renewal.
    pub fn set_certificate_revoking(
        &self,
        mut creds: Credentials,
        also: &RevocationSet,
        bundle_version: u64,
    ) -> Result<Arc<Snapshot>, CredError> {
        // Held from the read of the revocations in force to the write of the new set: a bundle
        // applied in between would otherwise lose its revocations.
        let mut guard = self.held.lock().unwrap_or_else(|p| p.into_inner());
        let revoked = guard
            .as_ref()
            .map(|h| h.revoked.clone())
            .unwrap_or_default();
        // Nothing to add (a file reload, a CA that lists none): no copy of the set.
        let revoked = if also.is_empty() {
            revoked
        } else {
            match revoked.union(also) {
                Ok(union) if union != *revoked => Arc::new(union),
                _ => revoked,
            }
        };
        let mut held_version = bundle_version;
        if let Some(h) = guard.as_ref()
            && bundle_version != 0
            && h.bundle_version > bundle_version
        {
            creds.roots.clone_from(&h.roots);
            creds.pinned.clone_from(&h.pinned);
            held_version = h.bundle_version;
        }
        let held = Held {
            chain: creds.chain.clone(),
            key: creds.key.clone_key(),
            roots: creds.roots.clone(),
            pinned: creds.pinned.clone(),
            revoked: revoked.clone(),
            bundle_version: held_version,
        };
        let snapshot = Arc::new(self.build(creds, true, revoked)?);
        // A sidecar is one workload: a source that hands over another identity (a file replaced
        // by another workload's, a CA answering for someone else) is refused, never served.
        if let Some(current) = self.current()
            && current.identity.id != snapshot.identity.id
        {
            return Err(CredError::IdentityChanged {
                current: current.identity.id.clone(),
                offered: snapshot.identity.id.clone(),
            });
        }
        *guard = Some(held);
        self.current.store(Some(snapshot.clone()));
        drop(guard);
        self.generation.send_modify(|g| *g += 1);
        Ok(snapshot)
    }

    /// Checks a set as [`Self::set_certificate`] does (key matches the leaf, the chain verifies to the
    /// bundle both ways, one valid SPIFFE ID) without publishing it: the app's own SVID.
    pub fn check(&self, creds: Credentials) -> Result<CertIdentity, CredError> {
        Ok(self.build(creds, true, self.revocations())?.identity)
    }

    fn build(
        &self,
        creds: Credentials,
        check_own_chain: bool,
        revoked: Arc<RevocationSet>,
    ) -> Result<Snapshot, CredError> {
        let leaf = creds.chain.first().ok_or(CredError::EmptyChain)?.clone();
        let bytes = chain_message_len(&creds.chain);
        if bytes > MAX_CHAIN_MESSAGE {
            return Err(CredError::ChainTooLarge {
                certs: creds.chain.len(),
                bytes,
            });
        }
        let past_leaf = creds.chain.len() - 1;
        if past_leaf > meshid_identity::verify::MAX_INTERMEDIATES {
            return Err(CredError::ChainTooLong(past_leaf));
        }
        if creds.roots.is_empty() {
            return Err(CredError::EmptyBundle);
        }
        let identity = cert_identity_from_der(&leaf)?;
        let anchors = Anchors::with_pins(&creds.roots, &creds.pinned, identity.id.trust_domain())
            .map_err(CredError::Bundle)?
            .with_revocations(revoked);
        let key = CertifiedKey::from_der(creds.chain.clone(), creds.key, &self.provider)
            .map_err(CredError::Key)?;
        let key = Arc::new(key);

        let peers = Arc::new(VerifiedPeers::default());
        let client_verifier = Arc::new(SpiffeClientVerifier::new(
            anchors.clone(),
            &self.provider,
            peers.clone(),
        ));
        if check_own_chain {
            // Our own chain must verify exactly as peers will verify it, both ways.
            let own_server =
                SpiffeServerVerifier::new(anchors.clone(), identity.id.clone(), &self.provider);
            rustls::client::danger::ServerCertVerifier::verify_server_cert(
                &own_server,
                &leaf,
                &creds.chain[1..],
                &rustls::pki_types::ServerName::try_from("meshid.invalid")
                    .map_err(|_| CredError::EmptyChain)?,
                &[],
                UnixTime::now(),
            )
            .map_err(CredError::Chain)?;
            let own_client = rustls::server::danger::ClientCertVerifier::verify_client_cert(
                client_verifier.as_ref(),
                &leaf,
                &creds.chain[1..],
                UnixTime::now(),
            )
            .map_err(CredError::Chain);
            // Our own certificate refused leaves its claim for a handshake failure's record: not
            // one, so take it back at once.
            let _ = meshid_identity::verify::take_refused_claim();
            own_client?;
        }

        let server = |alpn: Vec<Vec<u8>>| -> Result<Arc<ServerConfig>, CredError> {
            let mut config = ServerConfig::builder_with_provider(self.provider.clone())
                .with_protocol_versions(&[&rustls::version::TLS13])?
                .with_client_cert_verifier(client_verifier.clone())
                .with_cert_resolver(Arc::new(rustls::sign::SingleCertAndKey::from(key.clone())));
            config.alpn_protocols = alpn;
            // No resumption: every connection proves its peer's certificate against the current
            // bundle, so a rotation or an expiry can never be skipped by a resumed session.
            config.session_storage = Arc::new(rustls::server::NoServerSessionStorage {});
            config.send_tls13_tickets = 0;
            Ok(Arc::new(config))
        };
        let server_tcp = server(Vec::new())?;
        let server_http = server(vec![b"h2".to_vec(), b"http/1.1".to_vec()])?;

        let mut clients = Vec::with_capacity(self.upstreams.len());
        let mut clients_h1 = Vec::with_capacity(self.upstreams.len());
        for up in &self.upstreams {
            let verifier =
                SpiffeServerVerifier::new(anchors.clone(), up.expected.clone(), &self.provider);
            // `dangerous()` is how rustls admits a custom verifier; ours is not weaker than webpki's
            // hostname check: it verifies the chain and then demands the exact SPIFFE ID.
            let mut config = ClientConfig::builder_with_provider(self.provider.clone())
                .with_protocol_versions(&[&rustls::version::TLS13])?
                .dangerous()
                .with_custom_certificate_verifier(Arc::new(verifier))
                .with_client_cert_resolver(Arc::new(rustls::sign::SingleCertAndKey::from(
                    key.clone(),
                )));
            config.resumption = rustls::client::Resumption::disabled();
            if up.protocol == Protocol::Http {
                let mut h1 = config.clone();
                h1.alpn_protocols = vec![b"http/1.1".to_vec()];
                clients_h1.push(Arc::new(h1));
                config.alpn_protocols = vec![b"h2".to_vec()];
                clients.push(Arc::new(config));
            } else {
                let config = Arc::new(config);
                clients_h1.push(config.clone());
                clients.push(config);
            }
        }

        // A set checked above verified our chain as peers do (revocations included): no need to
        // verify it a second time.
        let own_refused = if check_own_chain {
            None
        } else {
            own_refusal(&anchors, &identity, &leaf, &creds.chain, &self.provider)
        };
        let anchor_fingerprints = creds.roots.iter().map(|r| sha256_hex(r)).collect();
        let anchor_not_after = creds
            .roots
            .iter()
            .filter_map(|r| {
                use x509_parser::prelude::FromDer;
                x509_parser::certificate::X509Certificate::from_der(r)
                    .ok()
                    .map(|(_, c)| c.validity().not_after.timestamp())
            })
            .collect();
        Ok(Snapshot {
            identity,
            anchors,
            peers,
            anchor_fingerprints,
            anchor_not_after,
            server_tcp,
            server_http,
            clients,
            clients_h1,
            public_key_sha256: {
                use x509_parser::prelude::FromDer;
                x509_parser::certificate::X509Certificate::from_der(&leaf)
                    .map(|(_, c)| sha256_hex(c.public_key().raw))
                    .unwrap_or_default()
            },
            leaf_sha256: sha256_hex(&leaf),
            issuer_sha256: creds.chain.get(1).map(|c| sha256_hex(c)),
            trust_key: trust_key(&creds.roots, &creds.pinned),
            own_refused,
        })
    }
}

pub use meshid_identity::pem::sha256_hex;

#[cfg(test)]
mod tests {
    use meshid_identity::testing::{LeafShape, TestPki};
    use meshid_runtime::time::unix_now;

    use super::*;

    const ME: &str = "spiffe://cluster.local/ns/shop/sa/payments";

    fn set(pki: &TestPki, leaf: meshid_identity::testing::TestLeaf) -> Credentials {
        Credentials {
            chain: leaf.chain,
            key: leaf.key,
            roots: vec![pki.root.clone()],
            pinned: Vec::new(),
        }
    }

    #[test]
    fn apps_are_handed_the_pinned_intermediate_in_place_of_a_shared_root() {
        let ours = TestPki::new("enterprise");
        let sibling = ours.sibling("another team's CA");
        let store = CredentialStore::new(Vec::new());
        let mut creds = set(&ours, ours.leaf(ME));
        creds.pinned = vec![ours.intermediate.clone()];
        store.set_certificate(creds).unwrap();
        assert_eq!(store.roots(), vec![ours.root.clone()]);
        let anchors = store.app_anchors();
        assert_eq!(anchors, vec![ours.intermediate.clone()]);
        // An app verifying with what it is handed (webpki, as a Go or Java app would): our leaf
        // passes, a sibling CA's leaf with our SPIFFE ID does not (it would under the root).
        let provider = provider();
        let verdict = |anchors: &[CertificateDer<'static>],
                       leaf: &meshid_identity::testing::TestLeaf| {
            let anchors: Vec<_> = anchors
                .iter()
                .map(|a| webpki::anchor_from_trusted_cert(a).unwrap().to_owned())
                .collect();
            webpki::EndEntityCert::try_from(&leaf.chain[0])
                .unwrap()
                .verify_for_usage(
                    provider.signature_verification_algorithms.all,
                    &anchors,
                    &leaf.chain[1..],
                    UnixTime::now(),
                    webpki::KeyUsage::client_auth(),
                    None,
                    None,
                )
                .map(|_| ())
        };
        assert!(verdict(&anchors, &ours.leaf(ME)).is_ok());
        assert!(verdict(&anchors, &sibling.leaf(ME)).is_err());
        assert!(
            verdict(&store.roots(), &sibling.leaf(ME)).is_ok(),
            "the hole it closes"
        );
    }

    #[test]
    fn refuses_sets_that_do_not_hold_together() {
        let pki = TestPki::new("ours");
        let other = TestPki::new("other");
        let store = CredentialStore::new(Vec::new());
        assert!(store.current().is_none());

        // A key that is not the leaf's.
        let mut mismatched = set(&pki, pki.leaf(ME));
        mismatched.key = pki.leaf(ME).key;
        assert!(matches!(
            store.set_certificate(mismatched),
            Err(CredError::Key(_))
        ));
        // A chain that does not verify against the bundle that comes with it.
        let mut foreign = set(&pki, other.leaf(ME));
        foreign.roots = vec![pki.root.clone()];
        assert!(matches!(
            store.set_certificate(foreign),
            Err(CredError::Chain(_))
        ));
        // An expired leaf.
        let expired = pki.leaf_shaped(
            ME,
            &LeafShape {
                valid: Some((time::Duration::hours(-2), time::Duration::hours(-1))),
                ..LeafShape::default()
            },
        );
        assert!(matches!(
            store.set_certificate(set(&pki, expired)),
            Err(CredError::Chain(_))
        ));
        // A chain no peer would take in a handshake: a bundle appended to the certificate file.
        // Its path verifies (the extra certificates are not needed), so only its size tells.
        let mut appended = set(&pki, pki.leaf(ME));
        let extra = appended.chain.last().unwrap().clone();
        while chain_message_len(&appended.chain) <= MAX_CHAIN_MESSAGE {
            appended.chain.push(extra.clone());
        }
        let error = store.set_certificate(appended).unwrap_err();
        assert!(matches!(error, CredError::ChainTooLarge { .. }), "{error}");
        // Small enough, but more certificates than a peer takes: refused, saying so.
        let mut long = set(&pki, pki.leaf(ME));
        long.chain.extend([extra.clone(), extra.clone()]);
        let error = store.set_certificate(long).unwrap_err();
        assert!(matches!(error, CredError::ChainTooLong(3)), "{error}");
        // The chain and its root: taken.
        let mut fits = set(&pki, pki.leaf(ME));
        fits.chain.push(pki.root.clone());
        assert!(store.set_certificate(fits).is_ok());
        let store = CredentialStore::new(Vec::new());
        // No bundle, no chain.
        let mut no_roots = set(&pki, pki.leaf(ME));
        no_roots.roots.clear();
        assert!(matches!(
            store.set_certificate(no_roots),
            Err(CredError::EmptyBundle)
        ));
        // Under a root pinned to our intermediate, a sibling CA's certificate for our identity.
        let sibling = pki.sibling("another team's CA");
        let mut unpinned = set(&pki, sibling.leaf(ME));
        unpinned.pinned = vec![pki.intermediate.clone()];
        let err = store.set_certificate(unpinned).unwrap_err();
        assert!(matches!(err, CredError::Chain(_)), "{err}");
        assert!(err.to_string().contains("issuing intermediates"), "{err}");
        assert!(store.current().is_none(), "nothing refused was published");

        // The first good set is served; then only the same identity may replace it.
        let first = store.set_certificate(set(&pki, pki.leaf(ME))).unwrap();
        assert_eq!(first.identity.id.as_str(), ME);
        assert!(first.valid_at(unix_now()));
        let other_id = "spiffe://cluster.local/ns/shop/sa/frontend";
        let err = store
            .set_certificate(set(&pki, pki.leaf(other_id)))
            .unwrap_err();
        assert!(matches!(err, CredError::IdentityChanged { .. }), "{err}");
        assert!(err.to_string().contains(other_id), "{err}");
        assert_eq!(store.current().unwrap().identity.id.as_str(), ME);
        // A renewal (fresh key, same identity) replaces it.
        let renewed = store.set_certificate(set(&pki, pki.leaf(ME))).unwrap();
        assert_ne!(renewed.public_key_sha256, first.public_key_sha256);
        assert_eq!(
            store.current().unwrap().public_key_sha256,
            renewed.public_key_sha256
        );
    }

    #[test]
    fn only_a_set_not_valid_yet_may_pass_later() {
        let pki = TestPki::new("ours");
        let other = TestPki::new("other");
        let store = CredentialStore::new(Vec::new());
        let valid = |from: i64, to: i64| LeafShape {
            valid: Some((time::Duration::seconds(from), time::Duration::seconds(to))),
            ..LeafShape::default()
        };
        let mut mismatched = set(&pki, pki.leaf(ME));
        mismatched.key = pki.leaf(ME).key;
        let mut foreign = set(&pki, other.leaf(ME));
        foreign.roots = vec![pki.root.clone()];
        let cases = [
            (
                "not valid yet",
                set(&pki, pki.leaf_shaped(ME, &valid(60, 3600))),
                true,
            ),
            (
                "expired",
                set(&pki, pki.leaf_shaped(ME, &valid(-7200, -3600))),
                false,
            ),
            ("mismatched key", mismatched, false),
            ("foreign chain", foreign, false),
        ];
        for (name, creds, later) in cases {
            let err = store.set_certificate(creds).unwrap_err();
            assert_eq!(err.may_pass_later(), later, "{name}: {err}");
        }
        assert!(store.current().is_none());
    }

    #[test]
    fn a_new_bundle_keeps_the_certificate_and_changes_the_trust() {
        let pki = TestPki::new("ours");
        let next = TestPki::new("next");
        let store = CredentialStore::new(Vec::new());
        let first = store.set_certificate(set(&pki, pki.leaf(ME))).unwrap();
        let both = store
            .set_bundle(
                vec![pki.root.clone(), next.root.clone()],
                Vec::new(),
                Arc::default(),
            )
            .unwrap();
        assert_eq!(both.leaf_sha256, first.leaf_sha256);
        assert_eq!(
            first.issuer_sha256.as_deref(),
            Some(sha256_hex(&pki.intermediate).as_str()),
            "the issuing intermediate is named"
        );
        assert_eq!(both.anchors.len(), 2);
        assert!(store.own_chain_trusted(unix_now()));
        assert_eq!(both.own_refused, None);
        // After the old root leaves (a forced retirement), our own chain is no longer trusted,
        // and the snapshot says peers refuse it (`/readyz`).
        let orphaned = store
            .set_bundle(vec![next.root.clone()], Vec::new(), Arc::default())
            .unwrap();
        assert!(!store.own_chain_trusted(unix_now()));
        assert!(
            orphaned
                .own_refused
                .is_some_and(|why| why.contains("not trusted")),
            "{:?}",
            orphaned.own_refused
        );
        assert!(matches!(
            store.set_bundle(Vec::new(), Vec::new(), Arc::default()),
            Err(CredError::EmptyBundle)
        ));
    }

    /// A connection's peer whose certificate has expired by the wall clock is distrusted when the
    /// wall clock is found to have moved apart from the monotonic one, not before (nothing else
    /// looks at it between trust changes), and only if the connection's age is capped.
    #[tokio::test]
    async fn a_peer_expired_by_the_wall_clock_is_distrusted_when_the_clock_moved() {
        const PEER: &str = "spiffe://cluster.local/ns/shop/sa/frontend";
        let pki = TestPki::new("ours");
        let store = CredentialStore::new(Vec::new());
        let at_handshake = store.set_certificate(set(&pki, pki.leaf(ME))).unwrap();
        let chain = pki.leaf(PEER).chain;
        let mut peer = VerifiedPeer::from_leaf(&chain[0]).unwrap();
        peer.not_after = meshid_runtime::time::unix_now() + 1;
        let watch = |expiry| {
            store.until_distrusted(
                &peer,
                &chain,
                webpki::KeyUsage::client_auth(),
                at_handshake.trust_key,
                expiry,
            )
        };
        let capped = watch(Some(Expiry {
            not_after: peer.not_after,
            grace: 0,
        }));
        let uncapped = watch(None);
        tokio::pin!(capped, uncapped);
        let soon = std::time::Duration::from_millis(50);
        assert!(tokio::time::timeout(soon, &mut capped).await.is_err());
        // Past the not-after by the wall clock: nothing has looked again yet.
        tokio::time::sleep(std::time::Duration::from_millis(2100)).await;
        assert!(tokio::time::timeout(soon, &mut capped).await.is_err());
        store.clock_moved();
        assert_eq!(
            tokio::time::timeout(soon, &mut capped).await,
            Ok(Distrusted::Expired {
                not_after: peer.not_after
            })
        );
        assert!(tokio::time::timeout(soon, &mut uncapped).await.is_err());
    }

    #[tokio::test]
    async fn a_peer_is_distrusted_once_its_root_leaves_the_bundle_and_not_before() {
        const PEER: &str = "spiffe://cluster.local/ns/shop/sa/frontend";
        let pki = TestPki::new("ours");
        let theirs = TestPki::new("theirs");
        let store = CredentialStore::new(Vec::new());
        let with_both = |leaf| Credentials {
            roots: vec![pki.root.clone(), theirs.root.clone()],
            ..set(&pki, leaf)
        };
        let at_handshake = store.set_certificate(with_both(pki.leaf(ME))).unwrap();
        let chain = theirs.leaf(PEER).chain;
        let peer = VerifiedPeer::from_leaf(&chain[0]).unwrap();
        let distrusted = store.until_distrusted(
            &peer,
            &chain,
            webpki::KeyUsage::client_auth(),
            at_handshake.trust_key,
            None,
        );
        tokio::pin!(distrusted);
        let soon = std::time::Duration::from_millis(50);
        assert!(tokio::time::timeout(soon, &mut distrusted).await.is_err());
        // A renewal under the same trust, then one more root: the peer still verifies.
        let renewed = store.set_certificate(with_both(pki.leaf(ME))).unwrap();
        assert_eq!(renewed.trust_key, at_handshake.trust_key);
        assert!(tokio::time::timeout(soon, &mut distrusted).await.is_err());
        let third = TestPki::new("third");
        store
            .set_bundle(
                vec![pki.root.clone(), theirs.root.clone(), third.root.clone()],
                Vec::new(),
                Arc::default(),
            )
            .unwrap();
        assert!(tokio::time::timeout(soon, &mut distrusted).await.is_err());
        // Their root leaves: the peer's connections must end.
        store
            .set_bundle(vec![pki.root.clone()], Vec::new(), Arc::default())
            .unwrap();
        assert_eq!(
            tokio::time::timeout(soon, &mut distrusted).await,
            Ok(Distrusted::Unanchored)
        );
    }
}
