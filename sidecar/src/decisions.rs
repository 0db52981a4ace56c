//! Recent denials, each under a short decision ID: the ID goes into the deny's log line and (for
//! HTTP) the `x-meshid-decision` response header; `GET /decisions/ID` on the admin port and
//! `meshid-sidecar explain --admin ADDR ID` give back the whole decision: peer, port, method,
//! path, policy version, and the rule that decided or came closest and what in it did not match.
//!
//! Bounded: at most [`MAX_DECISIONS`] are kept, each with its method and path cut to
//! [`MAX_FIELD`] bytes, so a flood of denied requests costs a fixed amount of memory. Room is kept
//! per peer (SPIFFE ID): a peer holding [`PER_PEER_DECISIONS`] pushes out only its own oldest, and
//! when the whole log is full the peer holding the most gives way, so one peer flooding denied
//! requests never pushes out the decisions on others. The log lines of denials are limited per
//! peer ([`DENIAL_LOG_LINES`]). Refused TLS handshakes (anyone who can reach a port can cause them,
//! no certificate needed) are kept apart, the newest [`MAX_HANDSHAKE_FAILURES`], so that a flood
//! of them never pushes out the decisions on authenticated peers; and their log lines are limited
//! ([`HANDSHAKE_LOG_LINES`]). Those refused after their chain verified (a revoked certificate,
//! another trust domain's, another identity than the one dialed: [`chain_verified`]) have a ring
//! and a line budget of their own: only a holder of a certificate of the mesh can cause them, and
//! junk ClientHellos from anyone must not hide them.

use std::collections::{HashMap, VecDeque};
use std::sync::{Arc, Mutex};

use meshid_runtime::log_limit::LineBudget;
use serde::{Deserialize, Serialize};

/// How many decisions are kept.
pub const MAX_DECISIONS: usize = 1024;
/// How many decisions one peer keeps at most: its older ones make room for its newer ones.
pub const PER_PEER_DECISIONS: usize = 128;
/// Log lines of one peer's denials (and audit-mode would-denials): this many at once, then one
/// per tenth of a second; the ones left out are counted in the next line written for that peer
/// (every decision is counted in the metrics and kept as above).
pub const DENIAL_LOG_LINES: (f64, f64) = (50.0, 10.0);
/// The longest method or path kept, in bytes.
pub const MAX_FIELD: usize = 512;
/// How many `GET /decisions` lists, newest first.
pub const LISTED: usize = 100;
/// How many refused handshakes are kept, apart from the decisions.
pub const MAX_HANDSHAKE_FAILURES: usize = 256;
/// Log lines of refused handshakes: this many at once, then one per tenth of a second; the ones
/// left out are counted in the next line written (every refusal is counted in the metrics).
pub const HANDSHAKE_LOG_LINES: (f64, f64) = (50.0, 10.0);

/// One recorded decision.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Recorded {
    pub id: String,
    /// When, in seconds since the epoch.
    pub at: i64,
    /// `deny`, or `audit_deny` (audit mode let it through).
    pub decision: String,
    pub peer: String,
    pub peer_addr: String,
    pub port: u16,
    /// Empty for a connection (a TCP port).
    pub method: String,
    pub path: String,
    /// The policy in force: 0 for the one loaded at start, then one more per change applied.
    pub policy_version: u64,
    /// The metric label of the deciding reason (`no-rule-matched`, ...).
    pub rule: String,
    /// The whole explanation, as `check-policy` prints it for the same call.
    pub explanation: String,
}

/// The recent decisions, per peer, and the refused handshakes apart.
#[derive(Debug, Default)]
pub struct DecisionLog {
    decisions: Mutex<Decisions>,
    handshakes: Mutex<Handshakes>,
}

/// Decisions by peer; each numbered in the order it was kept, so that the newest can be listed
/// across peers.
#[derive(Debug, Default)]
struct Decisions {
    peers: HashMap<String, PeerDecisions>,
    total: usize,
    kept: u64,
}

/// One peer's decisions, oldest first, and the budget of its log lines.
#[derive(Debug, Default)]
struct PeerDecisions {
    ring: VecDeque<(u64, Arc<Recorded>)>,
    lines: LineBudget,
}

/// Refused handshakes: their own ring, and the budget of their log lines; those whose chain
/// verified apart ([`chain_verified`]).
#[derive(Debug, Default)]
struct Handshakes {
    ring: VecDeque<Arc<Recorded>>,
    lines: LineBudget,
    verified_ring: VecDeque<Arc<Recorded>>,
    verified_lines: LineBudget,
}

/// How many refused handshakes whose chain verified are kept, apart from the others.
pub const MAX_VERIFIED_HANDSHAKE_FAILURES: usize = 64;

/// Whether a handshake refused for `reason` (its metrics label) had a chain that verified to the
/// mesh's roots: no one without a certificate of the mesh can cause such a refusal.
pub fn chain_verified(reason: &str) -> bool {
    matches!(
        reason,
        "revoked" | "wrong_trust_domain" | "unexpected_identity" | "unpinned_issuer"
    )
}

impl Decisions {
    /// Makes room for one more decision of `peer`: its own oldest when it holds its share,
    /// otherwise, when the log is full, the oldest of the peer holding the most.
    fn make_room(&mut self, peer: &str) {
        let own = self.peers.get(peer).map_or(0, |p| p.ring.len());
        let victim = if own >= PER_PEER_DECISIONS {
            peer.to_owned()
        } else if self.total >= MAX_DECISIONS {
            match self
                .peers
                .iter()
                .max_by_key(|(_, p)| {
                    (
                        p.ring.len(),
                        std::cmp::Reverse(p.ring.front().map_or(0, |(n, _)| *n)),
                    )
                })
                .map(|(id, _)| id.clone())
            {
                Some(id) => id,
                None => return,
            }
        } else {
            return;
        };
        if let Some(p) = self.peers.get_mut(&victim) {
            if p.ring.pop_front().is_some() {
                self.total -= 1;
            }
            if p.ring.is_empty() && victim != peer {
                self.peers.remove(&victim);
            }
        }
    }
}

/// A new decision ID: 12 lowercase hex digits (48 random bits).
pub fn new_id() -> String {
    let mut b = [0u8; 6];
    let _ = aws_lc_rs::rand::fill(&mut b);
    meshid_identity::identity::hex(&b)
}

/// `s` cut to at most `max` bytes at a character boundary.
pub fn cut(s: &str, max: usize) -> String {
    cut_str(s, max).to_owned()
}

/// [`cut`] without the copy.
pub fn cut_str(s: &str, max: usize) -> &str {
    &s[..s.floor_char_boundary(max)]
}

impl DecisionLog {
    fn lock(&self) -> std::sync::MutexGuard<'_, Decisions> {
        self.decisions.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Keeps `r` (see the module's doc for what makes room). `Some(left_out)` when its log line
    /// may be written (with how many of the same peer's were left out since its last one), `None`
    /// when it must be left out.
    pub fn push(&self, r: Recorded, now: std::time::Instant) -> Option<u64> {
        let mut d = self.lock();
        d.make_room(&r.peer);
        d.kept += 1;
        d.total += 1;
        let n = d.kept;
        let peer = d.peers.entry(r.peer.clone()).or_default();
        peer.ring.push_back((n, Arc::new(r)));
        peer.lines.take(DENIAL_LOG_LINES, now)
    }

    fn handshakes(&self) -> std::sync::MutexGuard<'_, Handshakes> {
        self.handshakes.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Keeps a refused handshake `r` apart from the decisions, dropping the oldest of its kind
    /// when full. `Some(left_out)` when its log line may be written (with how many were left out
    /// since the last one), `None` when it must be left out.
    pub fn push_handshake_failure(&self, r: Recorded, now: std::time::Instant) -> Option<u64> {
        let mut h = self.handshakes();
        let h = &mut *h;
        let (ring, lines, max) = if chain_verified(&r.rule) {
            (
                &mut h.verified_ring,
                &mut h.verified_lines,
                MAX_VERIFIED_HANDSHAKE_FAILURES,
            )
        } else {
            (&mut h.ring, &mut h.lines, MAX_HANDSHAKE_FAILURES)
        };
        if ring.len() >= max {
            ring.pop_front();
        }
        ring.push_back(Arc::new(r));
        lines.take(HANDSHAKE_LOG_LINES, now)
    }

    /// The decision with this ID, while it is kept.
    pub fn get(&self, id: &str) -> Option<Arc<Recorded>> {
        let found = self
            .lock()
            .peers
            .values()
            .flat_map(|p| p.ring.iter())
            .find(|(_, r)| r.id == id)
            .map(|(_, r)| r.clone());
        found.or_else(|| {
            let h = self.handshakes();
            h.ring
                .iter()
                .chain(h.verified_ring.iter())
                .find(|r| r.id == id)
                .cloned()
        })
    }

    /// The newest `n` of both kinds, newest first.
    pub fn newest(&self, n: usize) -> Vec<Arc<Recorded>> {
        let mut decisions: Vec<(u64, Arc<Recorded>)> = self
            .lock()
            .peers
            .values()
            .flat_map(|p| p.ring.iter().cloned())
            .collect();
        decisions.sort_by_key(|(n, _)| std::cmp::Reverse(*n));
        let mut all: Vec<Arc<Recorded>> = decisions.into_iter().take(n).map(|(_, r)| r).collect();
        {
            // The refusals of verified chains before the others of the same second: a flood of
            // junk must not push them off the list either.
            let h = self.handshakes();
            all.extend(h.verified_ring.iter().rev().take(n).cloned());
            all.extend(h.ring.iter().rev().take(n).cloned());
        }
        // Stable: within one second, each kind stays newest first.
        all.sort_by_key(|r| std::cmp::Reverse(r.at));
        all.truncate(n);
        all
    }

    /// Decisions and refused handshakes kept.
    pub fn len(&self) -> usize {
        let h = self.handshakes();
        let handshakes = h.ring.len() + h.verified_ring.len();
        drop(h);
        self.lock().total + handshakes
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

impl Recorded {
    /// For `meshid-sidecar explain`: a few lines a person reads. Every field is shown with its
    /// control characters (line breaks included) and invisible formatting characters escaped
    /// ([`shown`]): the method and path are what the peer sent, and the answer comes from an
    /// admin port; the explanation keeps its own lines.
    pub fn describe(&self) -> String {
        let shown = |s: &str| shown(s);
        let asked = if self.method.is_empty() {
            "connection".to_owned()
        } else {
            format!("{} {}", shown(&self.method), shown(&self.path))
        };
        let explanation: Vec<String> = self.explanation.lines().map(shown).collect();
        // A refused handshake's peer is what its certificate claimed, which nothing verified
        // (anyone can make a certificate naming any workload): said so, never shown as who called.
        let who = match (self.decision.as_str(), self.peer.is_empty()) {
            ("handshake_failure", true) => "a peer with no identity".to_owned(),
            ("handshake_failure", false) => format!(
                "{} (claimed by the refused certificate, not verified)",
                shown(&self.peer)
            ),
            _ => shown(&self.peer),
        };
        format!(
            "decision {} ({}, {} s since the epoch, policy version {})\n\
             {} from {} -> port {} {asked}\n\
             {}\n",
            shown(&self.id),
            shown(&self.decision),
            self.at,
            self.policy_version,
            who,
            shown(&self.peer_addr),
            self.port,
            explanation.join("\n")
        )
    }
}

/// `s` with every control character (escape sequences, line breaks, C1 controls) and invisible
/// formatting character (bidirectional overrides, zero-width ones) as `\u{..}`; the rest, `\` and
/// quotes included, as it is (an explanation names the path rules it quotes as they are written).
fn shown(s: &str) -> String {
    let invisible = |c: char| {
        c.is_control()
            || matches!(c, '\u{200b}'..='\u{200f}' | '\u{202a}'..='\u{202e}' | '\u{2060}'..='\u{206f}' | '\u{feff}')
    };
    if !s.chars().any(invisible) {
        return s.to_owned();
    }
    s.chars()
        .map(|c| {
            if invisible(c) {
                c.escape_unicode().to_string()
            } else {
                c.to_string()
            }
        })
        .collect()
}

/// `meshid-sidecar explain --admin ADDR ID`: asks the sidecar and prints the decision.
pub fn explain(args: &crate::cli::ExplainArgs) -> std::process::ExitCode {
    use std::process::ExitCode;
    let valid = args.id.len() == 12 && args.id.bytes().all(|b| b.is_ascii_hexdigit());
    if !valid {
        eprintln!(
            "meshid-sidecar explain: {:?} is not a decision ID (12 hex digits)",
            crate::decisions::cut(&args.id, 40)
        );
        return ExitCode::from(crate::cli::EXIT_USAGE);
    }
    let rt = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("meshid-sidecar explain: {e}");
            return ExitCode::FAILURE;
        }
    };
    let path = format!("/decisions/{}", args.id.to_ascii_lowercase());
    let call = meshid_runtime::http_client::Call::get(args.admin, &path);
    let reply = match rt.block_on(meshid_runtime::http_client::send(&call)) {
        Ok(r) => r,
        Err(e) => {
            eprintln!("meshid-sidecar explain: asking {}: {e}", args.admin);
            return ExitCode::FAILURE;
        }
    };
    if reply.status != 200 {
        eprintln!(
            "meshid-sidecar explain: {} answered HTTP {}: {}",
            args.admin,
            reply.status,
            String::from_utf8_lossy(&reply.body).trim()
        );
        return ExitCode::FAILURE;
    }
    match serde_json::from_slice::<Recorded>(&reply.body) {
        Ok(r) => {
            print!("{}", r.describe());
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!(
                "meshid-sidecar explain: {} sent no decision: {e}",
                args.admin
            );
            ExitCode::FAILURE
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The method and path are the peer's (a `_method` override is percent-decoded): printed as
    /// they came, escape sequences and line breaks in them would move the operator's cursor,
    /// erase lines or add lines of the peer's choosing to what `explain` shows.
    #[test]
    fn describe_escapes_what_the_peer_sent() {
        let mut r = recorded("0123456789ab");
        r.method = "X\x1b[2A\x1b[2K\nFAKE".into();
        r.path = "/a\u{9b}2K\r\nFAKE \u{202e}txt".into();
        r.peer_addr = "127.0.0.1:1\x07".into();
        r.explanation = "deny: no rule matched\nrule 0 (x)\x1b[0m".into();
        let shown = r.describe();
        assert!(
            !shown.contains(['\x1b', '\u{9b}', '\r', '\x07', '\u{202e}']),
            "{shown:?}"
        );
        assert!(!shown.lines().any(|l| l.starts_with("FAKE")), "{shown:?}");
        // The explanation's own lines stay lines.
        assert_eq!(shown.lines().count(), 4, "{shown:?}");
    }

    fn recorded(id: &str) -> Recorded {
        Recorded {
            id: id.to_owned(),
            at: 1,
            decision: "deny".into(),
            peer: "spiffe://td/a".into(),
            peer_addr: "127.0.0.1:1".into(),
            port: 8080,
            method: "GET".into(),
            path: "/".into(),
            policy_version: 0,
            rule: "no-rule-matched".into(),
            explanation: "deny: no rule matched".into(),
        }
    }

    fn of(peer: usize, id: &str) -> Recorded {
        Recorded {
            peer: format!("spiffe://td/p{peer}"),
            ..recorded(id)
        }
    }

    #[test]
    fn the_newest_are_kept_and_found_by_id() {
        let log = DecisionLog::default();
        let now = std::time::Instant::now();
        // Sixteen peers taking turns: the log fills, then the oldest make room.
        for i in 0..MAX_DECISIONS + 16 * 10 {
            log.push(of(i % 16, &format!("id{i}")), now);
        }
        assert_eq!(log.len(), MAX_DECISIONS);
        assert!(log.get("id0").is_none(), "the oldest made room");
        assert!(log.get("id159").is_none());
        assert_eq!(log.get("id160").unwrap().id, "id160");
        let last = format!("id{}", MAX_DECISIONS + 159);
        assert_eq!(log.newest(2)[0].id, last);
        let listed: Vec<String> = log.newest(LISTED).iter().map(|r| r.id.clone()).collect();
        let want: Vec<String> = (0..LISTED)
            .map(|k| format!("id{}", MAX_DECISIONS + 159 - k))
            .collect();
        assert_eq!(listed, want, "newest first, across peers");
    }

    /// One peer flooding denied requests keeps at most its share, and pushes out no other peer's
    /// decision; its log lines are limited, the others' are not.
    #[test]
    fn a_flooding_peer_pushes_out_only_its_own_decisions_and_lines() {
        let log = DecisionLog::default();
        let now = std::time::Instant::now();
        for p in 1..=20 {
            assert_eq!(log.push(of(p, &format!("honest{p}")), now), Some(0));
        }
        let mut written = 0;
        for i in 0..50_000 {
            if log.push(of(0, &format!("flood{i}")), now).is_some() {
                written += 1;
            }
        }
        for p in 1..=20 {
            assert!(log.get(&format!("honest{p}")).is_some(), "peer {p} kept");
        }
        assert_eq!(log.len(), 20 + PER_PEER_DECISIONS);
        assert!(log.get("flood49999").is_some() && log.get("flood0").is_none());
        assert_eq!(written, 50, "a burst of the flooder's lines, then none");
        assert_eq!(log.push(of(3, "honest-again"), now), Some(0));
        let later = now + std::time::Duration::from_secs(1);
        assert_eq!(log.push(of(0, "flood-later"), later), Some(50_000 - 50));
        // When every peer is at its share the log is full: the peer holding the most gives way.
        for p in 1..=12 {
            for i in 0..PER_PEER_DECISIONS {
                log.push(of(p, &format!("p{p}-{i}")), later);
            }
        }
        assert_eq!(log.len(), MAX_DECISIONS);
        assert!(log.get("p12-127").is_some());
    }

    #[test]
    fn a_flood_of_refused_handshakes_pushes_out_no_decision_and_writes_few_lines() {
        let log = DecisionLog::default();
        let now = std::time::Instant::now();
        log.push(recorded("denied"), now);
        let mut written = 0;
        for i in 0..10_000 {
            let r = Recorded {
                decision: "handshake_failure".into(),
                ..recorded(&format!("hs{i}"))
            };
            if log.push_handshake_failure(r, now).is_some() {
                written += 1;
            }
        }
        assert_eq!(
            log.get("denied").unwrap().id,
            "denied",
            "the decision is kept"
        );
        assert_eq!(log.len(), 1 + MAX_HANDSHAKE_FAILURES);
        assert!(log.get("hs9999").is_some() && log.get("hs0").is_none());
        assert_eq!(
            written, 50,
            "a burst of lines, then none within the same instant"
        );
        // A second later: lines again, the first one saying how many were left out.
        let later = now + std::time::Duration::from_secs(1);
        let r = recorded("hs-later");
        assert_eq!(log.push_handshake_failure(r, later), Some(10_000 - 50));
        assert_eq!(
            log.push_handshake_failure(recorded("hs-next"), later),
            Some(0)
        );
        let newest = log.newest(LISTED);
        assert_eq!(newest.len(), LISTED);
        assert!(newest.iter().any(|r| r.id == "denied"));
    }

    /// A handshake refused after its chain verified (a revoked certificate) is kept and logged
    /// whatever flood of other refusals came first: those anyone can cause share their own ring
    /// and budget.
    #[test]
    fn a_flood_of_junk_handshakes_hides_no_refusal_of_a_verified_chain() {
        let log = DecisionLog::default();
        let now = std::time::Instant::now();
        let refused = |id: &str, rule: &str| Recorded {
            decision: "handshake_failure".into(),
            rule: rule.into(),
            ..recorded(id)
        };
        for i in 0..10_000 {
            log.push_handshake_failure(refused(&format!("junk{i}"), "unknown_ca"), now);
        }
        assert_eq!(
            log.push_handshake_failure(refused("junk-more", "protocol"), now),
            None,
            "the junk's budget is spent"
        );
        assert_eq!(
            log.push_handshake_failure(refused("revoked-1", "revoked"), now),
            Some(0),
            "its line is written"
        );
        for i in 0..MAX_HANDSHAKE_FAILURES {
            log.push_handshake_failure(refused(&format!("later{i}"), "unknown_ca"), now);
        }
        assert!(log.get("revoked-1").is_some(), "kept past the junk's ring");
        assert!(log.newest(LISTED).iter().any(|r| r.id == "revoked-1"));
        assert_eq!(log.len(), MAX_HANDSHAKE_FAILURES + 1);
        assert!(chain_verified("wrong_trust_domain") && !chain_verified("bad_signature"));
    }

    #[test]
    fn ids_are_short_and_distinct_and_fields_are_cut() {
        let a = new_id();
        assert_eq!(a.len(), 12);
        assert!(a.bytes().all(|b| b.is_ascii_hexdigit()));
        assert_ne!(a, new_id());
        assert_eq!(cut("abc", 2), "ab");
        assert_eq!(cut("aé", 2), "a");
        assert_eq!(cut(&"x".repeat(5000), MAX_FIELD).len(), MAX_FIELD);
        assert_eq!(cut_str("aé", 2), "a");
        assert_eq!(cut_str("aé", 3), "aé");
        assert_eq!(cut_str("", 3), "");
    }
}
