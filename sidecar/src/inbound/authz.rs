//! The one authorization point for inbound traffic. The verifier established who the peer is
//! ([`meshid_identity::peer`]); here the current policy decides what that peer may do on this
//! listener, the decision is logged and counted (a deny names the rule or the missing rule, the peer
//! and the port), and the answer is made: `Err` with a 403 naming the reason for an HTTP request, or
//! `Err(Denied)` for a TCP connection, which the caller then closes. Every deny (and in audit mode
//! every would-deny) gets a decision ID, kept with its explanation in [`crate::decisions`]: it is in
//! the log line and, for HTTP, in the `x-meshid-decision` response header.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use http::{Response, StatusCode};
use meshid_identity::SpiffeId;
use meshid_identity::peer::VerifiedPeer;
use meshid_identity::policy::{Decision, Policy, RuleRef, no_policy_decision};
use prometheus_client::metrics::counter::Counter;
use rustls::pki_types::CertificateDer;

use crate::conn::Shared;
use crate::http::{Body, Closing, reply};
use crate::metrics::AuthzLabels;

/// Who is on the other end of an accepted inbound connection, as the verifier established it.
#[derive(Debug)]
pub struct Peer {
    pub verified: Arc<VerifiedPeer>,
    pub addr: SocketAddr,
    /// The chain the peer presented (leaf first), kept to verify it again when the trust bundle
    /// changes: a peer under a removed root or intermediate loses its open connections.
    pub chain: Arc<[CertificateDer<'static>]>,
    /// The trust the chain was verified against in the handshake ([`crate::creds::Snapshot::trust_key`]).
    pub trust_key: u64,
    /// The earliest not-after of the chain this connection's peer presented: its leaf's, or an
    /// intermediate's that ends first (an issuer outside meshid may let a leaf outlive it).
    pub not_after: i64,
    /// The trust the chain last verified against for a request ([`Authorizer::still_trusted`]):
    /// verified again only once the trust in force is another.
    trust_checked: AtomicU64,
}

impl Clone for Peer {
    fn clone(&self) -> Self {
        Self {
            verified: self.verified.clone(),
            addr: self.addr,
            chain: self.chain.clone(),
            trust_key: self.trust_key,
            not_after: self.not_after,
            trust_checked: AtomicU64::new(self.trust_checked.load(Ordering::Relaxed)),
        }
    }
}

impl Peer {
    /// The peer a handshake verified: `presented` (this connection's chain, leaf first; `chain`
    /// is the copy its leaf keeps) against the trust named `trust_key`.
    pub fn new(
        verified: Arc<VerifiedPeer>,
        addr: SocketAddr,
        (chain, presented): (Arc<[CertificateDer<'static>]>, &[CertificateDer<'_>]),
        trust_key: u64,
    ) -> Self {
        let not_after =
            meshid_identity::peer::chain_not_after(presented, meshid_runtime::time::unix_now())
                .map_or(verified.not_after, |t| t.min(verified.not_after));
        Self {
            verified,
            addr,
            chain,
            trust_key,
            not_after,
            trust_checked: AtomicU64::new(trust_key),
        }
    }

    /// When the peer is no longer trusted by the clock, if connection ages are capped (`cap`).
    pub fn expiry(&self, cap: bool) -> Option<crate::creds::Expiry> {
        cap.then_some(crate::creds::Expiry {
            not_after: self.not_after,
            grace: 0,
        })
    }

    pub fn id(&self) -> &SpiffeId {
        &self.verified.id
    }

    /// When this connection must end: the peer chain's expiry, unless the cap is off.
    pub fn deadline(&self, cap: bool) -> Option<tokio::time::Instant> {
        cap.then(|| meshid_runtime::time::expiry_instant(self.not_after))
    }
}

/// What an HTTP request was allowed under, to decide it again while its response is in flight
/// ([`Authorizer::request_revoked`]).
#[derive(Debug, Clone)]
pub struct Decided {
    /// The policy version in force before it was decided (`Shared::policy_changed`).
    pub version: u64,
    pub method: http::Method,
    /// Methods its overrides named (header, query or form body) other than its own.
    pub overrides: Vec<String>,
    /// The request target as the peer sent it (its path is what was decided).
    pub uri: http::Uri,
}

/// A connection the policy refused; the caller closes it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Denied;

/// Decides, records and answers for one inbound listener.
#[derive(Clone)]
pub struct Authorizer {
    port: u16,
    shared: Shared,
    allowed: Arc<AllowedByRule>,
}

/// How many rules of a port keep their `allow` counter at hand (rules past it are looked up).
const RULES_AT_HAND: usize = 64;

/// The listener's `meshid_sidecar_authz_decisions_total{decision="allow",rule="rule-N"}` counters
/// by rule index, each looked up once: an allowed request then neither formats its rule's label
/// nor hashes a label set. Entries of the family are never removed, so a handle kept here is the
/// counter `/metrics` shows.
#[derive(Default)]
struct AllowedByRule(std::sync::RwLock<Vec<Option<Counter>>>);

impl AllowedByRule {
    fn inc(&self, rule: usize, lookup: impl FnOnce() -> Counter) {
        let read = self.0.read().unwrap_or_else(|p| p.into_inner());
        if let Some(Some(c)) = read.get(rule) {
            c.inc();
            return;
        }
        drop(read);
        let counter = lookup();
        counter.inc();
        let mut kept = self.0.write().unwrap_or_else(|p| p.into_inner());
        if kept.len() <= rule {
            kept.resize(rule + 1, None);
        }
        kept[rule] = Some(counter);
    }
}

impl Authorizer {
    pub fn new(port: u16, shared: Shared) -> Self {
        Self {
            port,
            shared,
            allowed: Arc::default(),
        }
    }

    /// The listener's port.
    pub fn port(&self) -> u16 {
        self.port
    }

    /// The sidecar's shared state, as this listener's connections see it.
    pub fn shared(&self) -> &Shared {
        &self.shared
    }

    /// A TCP connection: the peer may open it, or it is closed.
    pub fn connection(&self, peer: &Peer) -> Result<(), Denied> {
        let guard = self.shared.policy.load();
        let policy = guard.as_deref();
        let decision = match policy {
            Some(p) => p.decide_connection(self.port, peer.id()),
            None => no_policy_decision(),
        };
        self.record(policy, peer, &decision, None, None);
        if decision.allowed {
            Ok(())
        } else {
            Err(Denied)
        }
    }

    /// An HTTP request: the peer may send it (with the decision ID of an audit-mode would-deny,
    /// for the response's `x-meshid-decision`), or here is the 403 that says why not (boxed: only
    /// denials pay for it). `traceparent` (already checked, see [`crate::trace`]) goes into the
    /// decision's log line.
    pub fn request(
        &self,
        peer: &Peer,
        method: &str,
        path: &str,
        traceparent: Option<&str>,
    ) -> Result<Option<String>, Box<Response<Body>>> {
        let guard = self.shared.policy.load();
        let policy = guard.as_deref();
        let decision = match policy {
            Some(p) => p.decide_request(self.port, peer.id(), method, path),
            None => no_policy_decision(),
        };
        let id = self.record(policy, peer, &decision, Some((method, path)), traceparent);
        if decision.allowed {
            return Ok(id);
        }
        let mut resp = reply(
            StatusCode::FORBIDDEN,
            format!(
                "denied: {} on port {}: {}",
                peer.id(),
                self.port,
                decision.rule
            ),
        );
        if let Some(v) = id.and_then(|id| http::HeaderValue::from_str(&id).ok()) {
            resp.headers_mut().insert(DECISION_HEADER, v);
        }
        Err(Box::new(resp))
    }

    /// Whether `peer` may use any method at all on `path` here (a rule that names no methods
    /// allows it), decided and recorded nowhere: then no method override it sends can take it
    /// anywhere it may not go. What the rules say, in audit mode too (where every decision is
    /// allowed): there the overrides are decided as well, and their would-denies recorded.
    pub fn allows_any_method(&self, peer: &Peer, path: &str) -> bool {
        // No rule names this method: only one that names none allows it.
        const NO_METHOD: &str = "\u{0}";
        let guard = self.shared.policy.load();
        match guard.as_deref() {
            Some(p) => {
                p.decide_request(self.port, peer.id(), NO_METHOD, path)
                    .would_allow
            }
            None => no_policy_decision().would_allow,
        }
    }

    /// Whether the policy in force has a rule for `id` on this port (in audit mode: whether it
    /// lets it in, as it lets everyone), decided silently: a connection of a peer without one may
    /// only be refused, request after request, and is not worth holding against newcomers.
    pub fn has_a_rule_for(&self, id: &SpiffeId) -> bool {
        self.shared
            .policy
            .load()
            .as_deref()
            .is_some_and(|p| p.decide_connection(self.port, id).allowed)
    }

    /// Whether the policy in force is in audit mode: its denials are only recorded.
    pub fn audits(&self) -> bool {
        self.shared
            .policy
            .load()
            .as_deref()
            .is_some_and(|p| p.mode() == meshid_identity::policy::Mode::Audit)
    }

    /// Refuses a request of a peer the bundle in force no longer trusts, whatever the policy says:
    /// it revokes the peer, or the peer's chain no longer verifies against it (its root or
    /// intermediate was removed), or (connections capped at the peer's expiry, the default) the
    /// peer's certificate expired. The connection's own watch for these ends it gracefully, but
    /// its requests must not wait for that: the watch may not have run yet when a request arrives,
    /// and an h2 peer that never acknowledges the PING of the graceful GOAWAY may open streams
    /// until the grace period ends. A recorded decision like any denial
    /// ([`Self::untrusted_decision`]): its ID is in the log line and the 403's `x-meshid-decision`.
    /// The 403 also closes an HTTP/1.1 connection. The chain is verified again only when the
    /// trust in force changed since it last was.
    pub fn still_trusted<B>(
        &self,
        peer: &Peer,
        req: &http::Request<B>,
    ) -> Result<(), Box<Response<Body>>> {
        use crate::creds::Distrusted;
        let expiry = peer.expiry(self.shared.limits.cap_connection_age);
        let mut trust_key = peer.trust_checked.load(Ordering::Relaxed);
        let Some(why) = self.shared.creds.distrusts(
            &peer.verified,
            &peer.chain,
            webpki::KeyUsage::client_auth(),
            &mut trust_key,
            expiry,
        ) else {
            // Verified against the trust in force (or nothing changed since it last was).
            peer.trust_checked.store(trust_key, Ordering::Relaxed);
            return Ok(());
        };
        let (rule, said, reason) = match &why {
            Distrusted::Revoked(by) => (
                "revoked",
                "revoked".to_owned(),
                format!(
                    "deny: the trust bundle in force revokes the peer ({by}), whatever the \
                     policy allows"
                ),
            ),
            Distrusted::Unanchored => (
                "untrusted",
                "no longer trusted".to_owned(),
                "deny: the peer's chain no longer verifies against the trust bundle in force \
                 (its root or intermediate was removed), whatever the policy allows"
                    .to_owned(),
            ),
            Distrusted::Expired { not_after } => (
                "expired",
                "its certificate expired".to_owned(),
                format!(
                    "deny: the peer's certificate expired at {not_after} (Unix seconds), \
                     whatever the policy allows"
                ),
            ),
        };
        let id = self.untrusted_decision(peer, req, rule, reason);
        let mut resp = reply(
            StatusCode::FORBIDDEN,
            format!("denied: {} on port {}: {said}", peer.id(), self.port),
        );
        if let Ok(v) = http::HeaderValue::from_str(&id) {
            resp.headers_mut().insert(DECISION_HEADER, v);
        }
        if req.version() < http::Version::HTTP_2 {
            resp.headers_mut().insert(
                http::header::CONNECTION,
                http::HeaderValue::from_static("close"),
            );
        }
        Err(Box::new(resp))
    }

    /// Keeps the refusal of `req` because the trust bundle or the clock no longer trusts its peer
    /// under a new decision ID (`rule`: `revoked`, `untrusted` or `expired`; `reason` its
    /// explanation), logs it (as limited per peer as every denial) and returns the ID. Not counted
    /// in `authz_decisions_total`: the policy did not decide it.
    fn untrusted_decision<B>(
        &self,
        peer: &Peer,
        req: &http::Request<B>,
        rule: &'static str,
        reason: String,
    ) -> String {
        let (port, id) = (self.port, peer.id());
        let (method, path) = (req.method().as_str(), req.uri().path());
        let traceparent = crate::trace::traceparent(req.headers());
        let (decision_id, logged) = self.keep(
            peer,
            "deny",
            rule.to_owned(),
            (method, path),
            reason.clone(),
        );
        if let Some(left_out) = logged {
            let (method, path) = logged_request(method, path);
            tracing::warn!(peer = %id, port, rule, why = %reason, method, path, traceparent, decision = %decision_id, left_out, "denied");
        }
        decision_id
    }

    /// Resolves once this open HTTP connection must close: the trust bundle no longer trusts its
    /// peer (as [`Self::peer_revoked`] decides), or a policy change leaves no rule that could allow
    /// the peer on this port (its requests would all be denied: a stream, long poll or download in
    /// flight must not outlive that; audit mode never closes). The closing is logged and counted;
    /// the connection then ends gracefully within the grace period ([`Closing::Drain`]), but for a
    /// revoked peer: at once, its requests in flight with it ([`Closing::Cut`]).
    ///
    /// One future watching both changes, holding one copy of what it needs (not the whole
    /// listener state): every idle connection keeps one, and two futures side by side each held
    /// their own peer, port, handles and state.
    pub fn http_connection_revoked(
        &self,
        peer: &Peer,
    ) -> impl std::future::Future<Output = Closing> + Send + 'static + use<> {
        let creds = self.shared.creds.clone();
        let mut trust = creds.subscribe();
        let policy = self.shared.policy.clone();
        let mut policies = self.shared.policy_changed.clone();
        policies.borrow_and_update();
        let peer = peer.clone();
        let port = self.port;
        let metrics = (
            self.shared.metrics.revoked_peer_closes.clone(),
            self.shared.metrics.connections_revoked.clone(),
        );
        let expiry = peer.expiry(self.shared.limits.cap_connection_age);
        async move {
            let mut trust_key = peer.trust_key;
            let (mut trust_open, mut policies_open) = (true, true);
            loop {
                trust.borrow_and_update();
                if let Some(why) = creds.distrusts(
                    &peer.verified,
                    &peer.chain,
                    webpki::KeyUsage::client_auth(),
                    &mut trust_key,
                    expiry,
                ) {
                    closed_untrusted(&metrics.0, &peer, port, &why);
                    return match why {
                        crate::creds::Distrusted::Revoked(_) => Closing::Cut,
                        // Counted already, by the bundle or not: a revocation then is not.
                        _ => Closing::Drain(Some(cut_if_revoked(
                            creds, trust, peer, trust_key, None, port,
                        ))),
                    };
                }
                tokio::select! {
                    biased;
                    changed = trust.changed(), if trust_open => trust_open = changed.is_ok(),
                    changed = policies.changed(), if policies_open => {
                        policies_open = changed.is_ok();
                        if !policies_open {
                            continue;
                        }
                        let decision = match policy.load().as_deref() {
                            Some(p) => p.decide_connection(port, &peer.verified.id),
                            None => continue,
                        };
                        if !decision.allowed {
                            metrics
                                .1
                                .get_or_create(&crate::metrics::ConnLabels {
                                    direction: "inbound",
                                    port,
                                })
                                .inc();
                            tracing::warn!(
                                peer = %peer.verified.id,
                                port,
                                rule = %decision.rule,
                                "closing: the new policy has no rule for this peer on this port"
                            );
                            let closes = Some(metrics.0.clone());
                            return Closing::Drain(Some(cut_if_revoked(
                                creds, trust, peer, trust_key, closes, port,
                            )));
                        }
                    }
                    // Both senders are gone (shutdown): nothing will revoke this connection any more.
                    else => std::future::pending::<()>().await,
                }
            }
        }
    }

    /// Resolves once this open connection must close: a policy change no longer allows what it
    /// was let in for (`request` is the method and path of an upgraded HTTP request, `None` a TCP
    /// connection), or the trust bundle revokes its peer. The closing is logged and counted.
    /// `decided_under` is the policy version read before it was let in
    /// ([`Self::policy_version`]): a policy applied since is decided again at the first poll.
    pub async fn revoked(&self, peer: &Peer, request: Option<(&str, &str)>, decided_under: u64) {
        tokio::select! {
            () = self.policy_revoked(peer, request, decided_under) => {}
            () = self.peer_revoked(peer) => {}
        }
    }

    /// The policy version in force now: read before a decision, it tells [`Self::revoked`] which
    /// policies the decision may not have seen.
    pub fn policy_version(&self) -> u64 {
        *self.shared.policy_changed.borrow()
    }

    /// Resolves once the trust bundle revokes the peer's certificate or identity, or its chain no
    /// longer verifies against the bundle (logged and counted). Audit mode does not change this:
    /// a revoked certificate is not trusted at all.
    /// Holds only what it needs, not the whole listener state: every connection keeps one.
    pub fn peer_revoked(
        &self,
        peer: &Peer,
    ) -> impl std::future::Future<Output = ()> + Send + 'static + use<> {
        let creds = self.shared.creds.clone();
        let verified = peer.verified.clone();
        let (chain, trust_key) = (peer.chain.clone(), peer.trust_key);
        let addr = peer.addr;
        let port = self.port;
        let expiry = peer.expiry(self.shared.limits.cap_connection_age);
        let closed = self
            .shared
            .metrics
            .revoked_peer_closes
            .get_or_create(&crate::metrics::ConnLabels {
                direction: "inbound",
                port,
            })
            .clone();
        async move {
            let why = creds
                .until_distrusted(
                    &verified,
                    &chain,
                    webpki::KeyUsage::client_auth(),
                    trust_key,
                    expiry,
                )
                .await;
            if why.by_bundle() {
                closed.inc();
            }
            log_untrusted(&verified.id, addr, port, &why);
        }
    }

    /// Resolves once a policy change no longer allows what this open connection was let in for.
    /// Audit mode never closes anything.
    async fn policy_revoked(&self, peer: &Peer, request: Option<(&str, &str)>, decided_under: u64) {
        let mut changes = self.shared.policy_changed.clone();
        let mut seen = decided_under;
        loop {
            // A policy applied between the decision and this first poll (the app's connect, its
            // answer to an upgrade) is decided here, not skipped.
            let now = *changes.borrow_and_update();
            if now == seen {
                if changes.changed().await.is_err() {
                    break;
                }
                continue;
            }
            seen = now;
            let guard = self.shared.policy.load();
            let Some(policy) = guard.as_ref() else {
                continue;
            };
            let decision = match request {
                Some((method, path)) => policy.decide_request(self.port, peer.id(), method, path),
                None => policy.decide_connection(self.port, peer.id()),
            };
            if decision.allowed {
                continue;
            }
            self.shared
                .metrics
                .connections_revoked
                .get_or_create(&crate::metrics::ConnLabels {
                    direction: "inbound",
                    port: self.port,
                })
                .inc();
            // Cut as every logged request is: a path can be as long as the header limit.
            let (method, path) = request.map_or(("", ""), |(m, p)| logged_request(m, p));
            tracing::warn!(
                peer = %peer.id(),
                port = self.port,
                rule = %decision.rule,
                method,
                path,
                "closing: the new policy no longer allows this connection"
            );
            return;
        }
        // The sender is gone (shutdown): nothing will revoke this connection any more.
        std::future::pending::<()>().await;
    }

    /// Resolves once a policy change denies a request whose response is still in flight: `decided`
    /// names the methods it was allowed under (its own and any override it named) on its path,
    /// and the policy version it was decided under. Logged and counted in
    /// `requests_revoked_total`; the caller then ends the response. A change that only narrows
    /// the peer's rules (a method or a path taken out) ends the requests it no longer allows,
    /// where [`Self::http_connection_revoked`] ends the connection only when no rule is left.
    /// Audit mode never ends anything. Made per request, only while its response waits for the
    /// app ([`super::revocable::Revocable`]): an idle connection holds none of it.
    pub fn request_revoked(
        &self,
        verified: Arc<VerifiedPeer>,
        decided: Decided,
    ) -> impl std::future::Future<Output = ()> + Send + Sync + 'static + use<> {
        let mut changes = self.shared.policy_changed.clone();
        let policy = self.shared.policy.clone();
        let port = self.port;
        // The family, not the counter: looked up only if the request is ended (one hash and lock
        // less for every response).
        let ended = self.shared.metrics.requests_revoked.clone();
        async move {
            let mut seen = decided.version;
            loop {
                let now = *changes.borrow_and_update();
                if now != seen {
                    seen = now;
                    // A policy with no rule at all for the peer on this port is the
                    // connection's to act on (`http_connection_revoked`: it ends gracefully,
                    // counted once as a connection); this ends what a narrower rule denies.
                    if let Some(p) = policy.load().as_deref()
                        && p.decide_connection(port, &verified.id).allowed
                    {
                        let path = decided.uri.path();
                        let denied = std::iter::once(decided.method.as_str())
                            .chain(decided.overrides.iter().map(String::as_str))
                            .map(|method| {
                                (method, p.decide_request(port, &verified.id, method, path))
                            })
                            .find(|(_, d)| !d.allowed);
                        if let Some((method, decision)) = denied {
                            let (method, path) = logged_request(method, path);
                            ended
                                .get_or_create(&crate::metrics::ConnLabels {
                                    direction: "inbound",
                                    port,
                                })
                                .inc();
                            tracing::warn!(
                                peer = %verified.id,
                                port,
                                rule = %decision.rule,
                                method,
                                path,
                                "ending a request in flight: the new policy no longer allows it"
                            );
                            return;
                        }
                    }
                }
                if changes.changed().await.is_err() {
                    // The sender is gone (shutdown): nothing will end this request any more.
                    std::future::pending::<()>().await;
                }
            }
        }
    }

    /// Logs an allow-list decision and counts it; a deny or would-deny is kept under a new
    /// decision ID, which is returned.
    fn record(
        &self,
        policy: Option<&Policy>,
        peer: &Peer,
        decision: &Decision,
        request: Option<(&str, &str)>,
        traceparent: Option<&str>,
    ) -> Option<String> {
        let port = self.port;
        let kind = if decision.would_allow {
            "allow"
        } else if decision.allowed {
            "audit_deny"
        } else {
            "deny"
        };
        let family = &self.shared.metrics.authz;
        let labels = || AuthzLabels {
            port,
            decision: kind,
            rule: decision.rule.label(),
        };
        match decision.rule {
            RuleRef::Rule(i) if kind == "allow" && i < RULES_AT_HAND => {
                self.allowed
                    .inc(i, || family.get_or_create(&labels()).clone());
            }
            _ => {
                family.get_or_create(&labels()).inc();
            }
        }
        let (method, path) = request.unwrap_or(("", ""));
        let id = peer.id();
        match self
            .shared
            .observed
            .record(port, id, request, decision.allowed)
        {
            crate::observed::Recorded::Counted => {}
            crate::observed::Recorded::New => {
                self.shared.metrics.observed_calls.inc();
            }
            crate::observed::Recorded::Dropped => {
                self.shared.metrics.observed_dropped.inc();
            }
        }
        if kind == "allow" {
            let (method, path) = logged_request(method, path);
            tracing::debug!(peer = %id, port, rule = %decision.rule, method, path, traceparent, "allowed");
            return None;
        }
        let explanation = match policy {
            Some(p) => p.explain(port, id, request).to_string(),
            None => format!("deny: {}", decision.rule),
        };
        let (decision_id, logged) = self.keep(
            peer,
            kind,
            decision.rule.label(),
            (method, path),
            explanation,
        );
        // Lines are limited per peer (see `decisions`); `left_out` counts the peer's lines not
        // written since its last one.
        let (method, path) = logged_request(method, path);
        match logged {
            None => {}
            Some(left_out) if kind == "deny" => {
                tracing::warn!(peer = %id, port, rule = %decision.rule, method, path, traceparent, decision = %decision_id, left_out, "denied");
            }
            Some(left_out) => {
                tracing::warn!(peer = %id, port, rule = %decision.rule, method, path, traceparent, decision = %decision_id, left_out, "audit: would deny");
            }
        }
        Some(decision_id)
    }

    /// Keeps a denial (or an audit-mode would-deny) of `peer`'s `request` (method, path) under a
    /// new decision ID with its explanation, for `explain`; returns the ID and whether to log it
    /// (`Some(left out since the peer's last line)`: lines are limited per peer).
    fn keep(
        &self,
        peer: &Peer,
        kind: &str,
        rule: String,
        (method, path): (&str, &str),
        explanation: String,
    ) -> (String, Option<u64>) {
        let id = crate::decisions::new_id();
        let logged = self.shared.decisions.push(
            crate::decisions::Recorded {
                id: id.clone(),
                at: meshid_runtime::time::unix_now(),
                decision: kind.to_owned(),
                peer: peer.id().as_str().to_owned(),
                peer_addr: peer.addr.to_string(),
                port: self.port,
                method: crate::decisions::cut(method, crate::decisions::MAX_FIELD),
                path: crate::decisions::cut(path, crate::decisions::MAX_FIELD),
                policy_version: *self.shared.policy_changed.borrow(),
                rule,
                explanation,
            },
            std::time::Instant::now(),
        );
        (id, logged)
    }
}

/// A request's method and path as its log lines name them: at most
/// [`crate::decisions::MAX_FIELD`] bytes each, as `/decisions` keeps them. A `_method` form field
/// names a method of up to a form's 1 MiB, which its line would have quoted whole (escaped, five
/// times that) for every denial.
fn logged_request<'a>(method: &'a str, path: &'a str) -> (&'a str, &'a str) {
    use crate::decisions::{MAX_FIELD, cut_str};
    (cut_str(method, MAX_FIELD), cut_str(path, MAX_FIELD))
}

/// Counts and logs the end of an inbound connection whose peer the trust bundle no longer trusts.
/// While `peer`'s connection drains (a policy change, a certificate no longer anchored):
/// resolves if the bundle revokes the peer meanwhile, and the connection is then cut at once, as
/// a revoked peer's is (its key may be in other hands: a stream in flight must not go on for the
/// rest of the grace period). Counted in `closes` when given (a drain the bundle did not start).
fn cut_if_revoked(
    creds: Arc<crate::creds::CredentialStore>,
    mut trust: tokio::sync::watch::Receiver<u64>,
    peer: Peer,
    mut trust_key: u64,
    closes: Option<prometheus_client::metrics::family::Family<crate::metrics::ConnLabels, Counter>>,
    port: u16,
) -> crate::http::CutWatch {
    Box::pin(async move {
        loop {
            if let Some(why @ crate::creds::Distrusted::Revoked(_)) = creds.distrusts(
                &peer.verified,
                &peer.chain,
                webpki::KeyUsage::client_auth(),
                &mut trust_key,
                None,
            ) {
                match &closes {
                    Some(closes) => closed_untrusted(closes, &peer, port, &why),
                    None => log_untrusted(&peer.verified.id, peer.addr, port, &why),
                }
                return;
            }
            if trust.changed().await.is_err() {
                // Shutdown: nothing will revoke it any more.
                return std::future::pending().await;
            }
        }
    })
}

fn closed_untrusted(
    closes: &prometheus_client::metrics::family::Family<crate::metrics::ConnLabels, Counter>,
    peer: &Peer,
    port: u16,
    why: &crate::creds::Distrusted,
) {
    if why.by_bundle() {
        closes
            .get_or_create(&crate::metrics::ConnLabels {
                direction: "inbound",
                port,
            })
            .inc();
    }
    log_untrusted(&peer.verified.id, peer.addr, port, why);
}

fn log_untrusted(id: &SpiffeId, addr: SocketAddr, port: u16, why: &crate::creds::Distrusted) {
    tracing::warn!(
        peer = %id,
        peer_addr = %addr,
        port,
        why = %why,
        "closing: the peer is no longer trusted"
    );
}

/// The response header that carries a deny's (or an audit-mode would-deny's) decision ID.
pub const DECISION_HEADER: &str = "x-meshid-decision";

#[cfg(test)]
mod tests {
    use super::*;
    use meshid_identity::testing::TestPki;
    use prometheus_client::metrics::family::Family;
    use std::time::Duration;

    const ME: &str = "spiffe://cluster.local/ns/shop/sa/server";
    const PEER: &str = "spiffe://cluster.local/ns/shop/sa/client";

    /// What a listener of `ME` shares, with its certificate from `pki`, and the senders of its
    /// policy version (starting at 3) and shutdown.
    fn shared(
        pki: &TestPki,
    ) -> (
        Shared,
        tokio::sync::watch::Sender<u64>,
        tokio::sync::watch::Sender<bool>,
    ) {
        let creds = Arc::new(crate::creds::CredentialStore::new(Vec::new()));
        let own = pki.leaf(ME);
        creds
            .set_certificate(crate::creds::Credentials {
                chain: own.chain,
                key: own.key,
                roots: vec![pki.root.clone()],
                pinned: Vec::new(),
            })
            .unwrap();
        let (policy_tx, policy_changed) = tokio::sync::watch::channel(3u64);
        let (shutdown_tx, shutdown) = tokio::sync::watch::channel(false);
        let shared = Shared {
            creds,
            policy: Arc::default(),
            policy_changed,
            metrics: crate::metrics::Metrics::register(
                &mut prometheus_client::registry::Registry::default(),
            ),
            limits: crate::settings::Limits::default(),
            shutdown,
            decisions: Arc::default(),
            observed: Arc::default(),
            heap: meshid_runtime::heap::Trimmer::new(),
            form_bodies: crate::inbound::form_budget::FormBudget::new(
                crate::inbound::form_budget::DEFAULT_FORM_BODY_MEMORY,
            ),
        };
        (shared, policy_tx, shutdown_tx)
    }

    /// `PEER` as a handshake with a certificate of `pki` makes it.
    fn peer(pki: &TestPki) -> Peer {
        let leaf = pki.leaf(PEER);
        Peer::new(
            Arc::new(VerifiedPeer::from_leaf(&leaf.chain[0]).unwrap()),
            "10.0.0.7:40000".parse().unwrap(),
            (leaf.chain.clone().into(), &leaf.chain),
            0,
        )
    }

    /// A policy applied after a connection was let in but before its watch first runs (while the
    /// app's connection opens, or while the app answers an upgrade) is decided again: the
    /// connection is closed, not left under the policy that let it in.
    #[tokio::test(start_paused = true)]
    async fn a_policy_applied_before_the_watch_first_runs_is_decided_again() {
        use meshid_identity::policy::Policy;
        let pki = TestPki::new("ours");
        let (shared, policy_tx, _shutdown) = shared(&pki);
        let allowing = |id: &str| {
            let yaml = format!(
                "inbound:\n  - port: 8080\n    protocol: tcp\n    allow:\n      - id: {id}\n"
            );
            Some(Arc::new(Policy::parse(&yaml).unwrap()))
        };
        shared.policy.store(allowing(PEER));
        let authz = Authorizer::new(8080, shared.clone());
        let peer = peer(&pki);
        let decided_under = authz.policy_version();
        assert!(authz.connection(&peer).is_ok());
        // The peer is taken out before the connection's watch is polled.
        shared
            .policy
            .store(allowing("spiffe://cluster.local/ns/shop/sa/other"));
        policy_tx.send_modify(|v| *v += 1);
        tokio::time::timeout(
            Duration::from_secs(1),
            authz.revoked(&peer, None, decided_under),
        )
        .await
        .expect("closed: the policy in force no longer allows it");
        assert_eq!(
            shared
                .metrics
                .connections_revoked
                .get_or_create(&crate::metrics::ConnLabels {
                    direction: "inbound",
                    port: 8080,
                })
                .get(),
            1
        );
        // Let in under the policy in force, a connection waits for the next change.
        shared.policy.store(allowing(PEER));
        policy_tx.send_modify(|v| *v += 1);
        let now = authz.policy_version();
        assert!(
            tokio::time::timeout(Duration::from_secs(1), authz.revoked(&peer, None, now))
                .await
                .is_err(),
            "nothing changed since it was let in"
        );
    }

    /// A request of a peer the bundle in force revokes (arriving before its connection's own wait
    /// for the revocation ends the connection) is refused as a recorded decision: the 403 carries
    /// its ID, and the decision log gives back the peer, the request and why.
    #[tokio::test]
    async fn a_revoked_peers_request_is_a_recorded_decision() {
        use meshid_identity::revocation::{RevocationSet, Revoked};

        let pki = TestPki::new("ours");
        let (shared, _policy_tx, _shutdown) = shared(&pki);
        let creds = shared.creds.clone();
        let authz = Authorizer::new(8080, shared.clone());
        let peer = peer(&pki);
        let req = http::Request::get("/api/orders?x=1").body(()).unwrap();
        assert!(authz.still_trusted(&peer, &req).is_ok(), "not revoked yet");

        let revoked = RevocationSet::new([Revoked::Id(SpiffeId::parse(PEER).unwrap())]).unwrap();
        creds
            .set_bundle(vec![pki.root.clone()], Vec::new(), Arc::new(revoked))
            .unwrap();
        let resp = authz.still_trusted(&peer, &req).unwrap_err();
        assert_eq!(resp.status(), StatusCode::FORBIDDEN);
        assert_eq!(resp.headers()[http::header::CONNECTION], "close");
        let id = resp.headers()[DECISION_HEADER].to_str().unwrap();
        let kept = shared.decisions.get(id).expect("the decision is kept");
        assert_eq!(kept.decision, "deny");
        assert_eq!(kept.rule, "revoked");
        assert_eq!(kept.peer, PEER);
        assert_eq!(kept.peer_addr, "10.0.0.7:40000");
        assert_eq!((kept.port, kept.method.as_str()), (8080, "GET"));
        assert_eq!(kept.path, "/api/orders");
        assert_eq!(kept.policy_version, 3);
        let told = kept.describe();
        assert!(
            told.contains(&format!("revokes the peer (identity {PEER})")),
            "{told}"
        );
    }

    /// A request on a connection whose peer the trust in force no longer anchors, or whose
    /// certificate expired, is refused as a recorded decision, though the connection's own watch
    /// (which ends it gracefully) has not run: an h2 peer that never acknowledges the graceful
    /// GOAWAY's PING could otherwise open streams for the whole grace period.
    #[tokio::test]
    async fn a_request_of_a_peer_no_longer_trusted_or_expired_is_refused() {
        let pki = TestPki::new("ours");
        let (shared, _policy_tx, _shutdown) = shared(&pki);
        let creds = shared.creds.clone();
        let authz = Authorizer::new(8080, shared.clone());
        let peer = peer(&pki);
        let req = http::Request::get("/api/orders").body(()).unwrap();
        // Handshake trust 0 is not the trust in force: verified again, and it holds.
        assert!(authz.still_trusted(&peer, &req).is_ok());
        assert!(authz.still_trusted(&peer, &req).is_ok());

        let refused = |peer: &Peer, rule: &str, said: &str| {
            let resp = authz.still_trusted(peer, &req).unwrap_err();
            assert_eq!(resp.status(), StatusCode::FORBIDDEN);
            assert_eq!(resp.headers()[http::header::CONNECTION], "close");
            let id = resp.headers()[DECISION_HEADER].to_str().unwrap();
            let kept = shared.decisions.get(id).expect("the decision is kept");
            assert_eq!((kept.decision.as_str(), kept.rule.as_str()), ("deny", rule));
            assert!(kept.describe().contains(said), "{}", kept.describe());
        };

        // Expired: refused whatever the trust.
        let leaf = pki.leaf_shaped(
            PEER,
            &meshid_identity::testing::LeafShape {
                valid: Some((time::Duration::hours(-2), time::Duration::minutes(-1))),
                ..Default::default()
            },
        );
        let expired = Peer::new(
            Arc::new(VerifiedPeer::from_leaf(&leaf.chain[0]).unwrap()),
            "10.0.0.7:40001".parse().unwrap(),
            (leaf.chain.clone().into(), &leaf.chain),
            0,
        );
        refused(&expired, "expired", "certificate expired");

        // The root it chains to leaves the bundle: its chain no longer verifies.
        let other = TestPki::new("other");
        creds
            .set_bundle(vec![other.root.clone()], Vec::new(), Arc::default())
            .unwrap();
        refused(&peer, "untrusted", "no longer verifies");
        // Not remembered as checked: refused again.
        refused(&peer, "untrusted", "no longer verifies");
        // Back under a bundle that anchors it.
        creds
            .set_bundle(vec![pki.root.clone()], Vec::new(), Arc::default())
            .unwrap();
        assert!(authz.still_trusted(&peer, &req).is_ok());
    }

    #[test]
    fn allowed_counters_are_looked_up_once_and_count_every_decision() {
        let family: Family<AuthzLabels, Counter> = Family::default();
        let labels = |rule: usize| AuthzLabels {
            port: 8080,
            decision: "allow",
            rule: format!("rule-{rule}"),
        };
        let at_hand = AllowedByRule::default();
        let mut lookups = 0;
        for rule in [0, 3, 3, 0, 3] {
            at_hand.inc(rule, || {
                lookups += 1;
                family.get_or_create(&labels(rule)).clone()
            });
        }
        assert_eq!(lookups, 2, "one lookup per rule");
        assert_eq!(family.get_or_create(&labels(0)).get(), 2);
        assert_eq!(family.get_or_create(&labels(3)).get(), 3);
        // Rules never seen hold nothing.
        assert_eq!(family.get_or_create(&labels(1)).get(), 0);
    }
}
