//! The one authorization point for inbound traffic. The verifier established who the peer is
//! ([`meshid_identity::peer`]); here the current policy decides what that peer may do on this
//! listener, the decision is logged and counted (a deny names the rule or the missing rule, the peer
//! and the port), and the answer is made: `Err` with a 403 naming the reason for an HTTP request, or
//! `Err(Denied)` for a TCP connection, which the caller then closes.

use std::net::SocketAddr;
use std::sync::Arc;

use http::{Response, StatusCode};
use meshid_identity::SpiffeId;
use meshid_identity::peer::VerifiedPeer;
use meshid_identity::policy::{Decision, no_policy_decision};

use crate::conn::Shared;
use crate::http::{Body, reply};
use crate::metrics::AuthzLabels;

/// Who is on the other end of an accepted inbound connection, as the verifier established it.
#[derive(Debug, Clone)]
pub struct Peer {
    pub verified: Arc<VerifiedPeer>,
    pub addr: SocketAddr,
}

impl Peer {
    pub fn id(&self) -> &SpiffeId {
        &self.verified.id
    }

    /// When this connection must end: the peer certificate's expiry, unless the cap is off.
    pub fn deadline(&self, cap: bool) -> Option<tokio::time::Instant> {
        cap.then(|| meshid_runtime::time::expiry_instant(self.verified.not_after))
    }
}

/// A connection the policy refused; the caller closes it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Denied;

/// Decides, records and answers for one inbound listener.
#[derive(Clone)]
pub struct Authorizer {
    port: u16,
    shared: Shared,
}

impl Authorizer {
    pub fn new(port: u16, shared: Shared) -> Self {
        Self { port, shared }
    }

    /// A TCP connection: the peer may open it, or it is closed.
    pub fn connection(&self, peer: &Peer) -> Result<(), Denied> {
        let decision = match self.shared.policy.load().as_ref() {
            Some(p) => p.decide_connection(self.port, peer.id()),
            None => no_policy_decision(),
        };
        self.record(peer.id(), &decision, None, None);
        if decision.allowed {
            Ok(())
        } else {
            Err(Denied)
        }
    }

    /// An HTTP request: the peer may send it, or here is the 403 that says why not (boxed: only
    /// denials pay for it). `traceparent` (already checked, see [`crate::trace`]) goes into the
    /// decision's log line.
    pub fn request(
        &self,
        peer: &Peer,
        method: &str,
        path: &str,
        traceparent: Option<&str>,
    ) -> Result<(), Box<Response<Body>>> {
        let decision = match self.shared.policy.load().as_ref() {
            Some(p) => p.decide_request(self.port, peer.id(), method, path),
            None => no_policy_decision(),
        };
        self.record(peer.id(), &decision, Some((method, path)), traceparent);
        if decision.allowed {
            return Ok(());
        }
        Err(Box::new(reply(
            StatusCode::FORBIDDEN,
            format!(
                "denied: {} on port {}: {}",
                peer.id(),
                self.port,
                decision.rule
            ),
        )))
    }

    /// Resolves once a policy change no longer allows what this open connection was let in for:
    /// `request` is the method and path of an upgraded HTTP request, `None` a TCP connection. The
    /// closing is logged and counted; audit mode never closes anything.
    pub async fn revoked(&self, peer: &Peer, request: Option<(&str, &str)>) {
        let mut changes = self.shared.policy_changed.clone();
        changes.borrow_and_update();
        while changes.changed().await.is_ok() {
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
            let (method, path) = request.unwrap_or(("", ""));
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

    /// Logs an allow-list decision and counts it.
    fn record(
        &self,
        peer: &SpiffeId,
        decision: &Decision,
        request: Option<(&str, &str)>,
        traceparent: Option<&str>,
    ) {
        let port = self.port;
        let kind = if decision.would_allow {
            "allow"
        } else if decision.allowed {
            "audit_deny"
        } else {
            "deny"
        };
        self.shared
            .metrics
            .authz
            .get_or_create(&AuthzLabels {
                port,
                decision: kind,
                rule: decision.rule.label(),
            })
            .inc();
        let (method, path) = request.unwrap_or(("", ""));
        match kind {
            "deny" => {
                tracing::warn!(peer = %peer, port, rule = %decision.rule, method, path, traceparent, "denied")
            }
            "audit_deny" => {
                tracing::warn!(peer = %peer, port, rule = %decision.rule, method, path, traceparent, "audit: would deny")
            }
            _ => {
                tracing::debug!(peer = %peer, port, rule = %decision.rule, method, path, traceparent, "allowed")
            }
        }
    }
}
