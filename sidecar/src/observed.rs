//! What the inbound has seen, for `meshid-sidecar suggest-policy`: a bounded summary of (port,
//! peer, method, path) with counts, in enforce and audit mode alike, allowed and denied. The admin
//! port serves it at `/observed` with each entry decided again by the policy now in force, and the
//! rules of that policy that decided none of it.
//!
//! Bounded: at most [`MAX_ENTRIES`] distinct calls are kept (paths without their query, cut to
//! [`MAX_PATH`] bytes); calls past that are only counted as `dropped`.

use std::collections::HashMap;
use std::hash::{BuildHasher, BuildHasherDefault, Hasher, RandomState};
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};

use meshid_identity::SpiffeId;
use meshid_identity::policy::{Policy, RuleRef, no_policy_decision};
use serde::{Deserialize, Serialize};

/// The most distinct calls kept.
pub const MAX_ENTRIES: usize = 4096;
/// The longest path kept, in bytes.
pub const MAX_PATH: usize = 256;

#[derive(Debug, Clone)]
struct Entry {
    port: u16,
    peer: String,
    method: String,
    path: String,
    count: u64,
}

/// What [`ObservedTraffic::record`] did with a call.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Recorded {
    /// A call seen before: its count went up.
    Counted,
    /// A new distinct call, kept.
    New,
    /// Not kept: the summary is full.
    Dropped,
}

/// The map's keys are already keyed SipHash values of the whole call: they are used as they are
/// rather than hashed a second time on every request.
#[derive(Debug, Default)]
struct KeyIsHash(u64);

impl Hasher for KeyIsHash {
    fn finish(&self) -> u64 {
        self.0
    }

    fn write(&mut self, bytes: &[u8]) {
        // Only `u64` keys reach here (`write_u64`); anything else is folded in, still correctly.
        for &b in bytes {
            self.0 = self.0.rotate_left(8) ^ u64::from(b);
        }
    }

    fn write_u64(&mut self, n: u64) {
        self.0 = n;
    }
}

/// The summary.
#[derive(Debug, Default)]
pub struct ObservedTraffic {
    hasher: RandomState,
    map: Mutex<HashMap<u64, Entry, BuildHasherDefault<KeyIsHash>>>,
    dropped: AtomicU64,
}

/// One observed call as `/observed` serves it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ObservedCall {
    pub port: u16,
    /// Empty for a TCP connection.
    pub method: String,
    pub path: String,
    pub peer: String,
    pub count: u64,
    /// What the policy in force now decides for it: `allow`, `deny`, or `audit_deny`.
    pub decision: String,
    /// The rule behind that decision (`rule-0`, `no-rule-matched`, ...).
    pub rule: String,
}

/// A rule of the policy in force that decided none of the observed calls.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct UnusedRule {
    pub port: u16,
    pub rule: usize,
    /// `rule N (ID pattern)`.
    pub describe: String,
}

/// What `/observed` serves.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ObservedReport {
    pub calls: Vec<ObservedCall>,
    pub dropped: u64,
    pub unused_rules: Vec<UnusedRule>,
}

impl ObservedTraffic {
    fn lock(
        &self,
    ) -> std::sync::MutexGuard<'_, HashMap<u64, Entry, BuildHasherDefault<KeyIsHash>>> {
        self.map.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Counts one call: `request` is the method and path of an HTTP request, `None` a TCP
    /// connection.
    pub fn record(&self, port: u16, peer: &SpiffeId, request: Option<(&str, &str)>) -> Recorded {
        let (method, path) = request.unwrap_or(("", ""));
        // Methods are short tokens; a longer one is kept (and matched) by its first 32 bytes.
        let method = &method[..method.floor_char_boundary(32)];
        let path = path.split_once('?').map_or(path, |(p, _)| p);
        // Cut without a copy: a call seen before (nearly every one) allocates nothing.
        let path = crate::decisions::cut_str(path, MAX_PATH);
        let key = self.hasher.hash_one((port, peer.as_str(), method, path));
        let mut map = self.lock();
        let room = map.len() < MAX_ENTRIES;
        match map.get_mut(&key) {
            Some(e)
                if e.port == port
                    && e.peer == peer.as_str()
                    && e.method == method
                    && e.path == path =>
            {
                e.count += 1;
                Recorded::Counted
            }
            Some(_) => {
                self.dropped.fetch_add(1, Ordering::Relaxed);
                Recorded::Dropped
            }
            None if room => {
                map.insert(
                    key,
                    Entry {
                        port,
                        peer: peer.as_str().to_owned(),
                        method: method.to_owned(),
                        path: path.to_owned(),
                        count: 1,
                    },
                );
                Recorded::New
            }
            None => {
                self.dropped.fetch_add(1, Ordering::Relaxed);
                Recorded::Dropped
            }
        }
    }

    /// Everything kept, decided again by `policy` (the one in force now), with the rules that
    /// decided none of it.
    pub fn report(&self, policy: Option<&Policy>) -> ObservedReport {
        let entries: Vec<Entry> = self.lock().values().cloned().collect();
        let mut used: std::collections::BTreeSet<(u16, usize)> = Default::default();
        let mut calls: Vec<ObservedCall> = entries
            .into_iter()
            .map(|e| {
                let decision = match (policy, SpiffeId::parse(&e.peer)) {
                    (Some(p), Ok(peer)) if e.method.is_empty() => {
                        p.decide_connection(e.port, &peer)
                    }
                    (Some(p), Ok(peer)) => p.decide_request(e.port, &peer, &e.method, &e.path),
                    _ => no_policy_decision(),
                };
                if let RuleRef::Rule(i) = decision.rule {
                    used.insert((e.port, i));
                }
                let word = if decision.would_allow {
                    "allow"
                } else if decision.allowed {
                    "audit_deny"
                } else {
                    "deny"
                };
                ObservedCall {
                    port: e.port,
                    method: e.method,
                    path: e.path,
                    peer: e.peer,
                    count: e.count,
                    decision: word.to_owned(),
                    rule: decision.rule.label(),
                }
            })
            .collect();
        calls.sort_by(|a, b| {
            (a.port, &a.peer, &a.method, &a.path).cmp(&(b.port, &b.peer, &b.method, &b.path))
        });
        let unused_rules = policy
            .map(|p| {
                p.ports()
                    .flat_map(|(port, _, rules)| (0..rules).map(move |i| (port, i)))
                    .filter(|k| !used.contains(k))
                    .map(|(port, rule)| UnusedRule {
                        port,
                        rule,
                        describe: p.describe(port, &RuleRef::Rule(rule)),
                    })
                    .collect()
            })
            .unwrap_or_default();
        ObservedReport {
            calls,
            dropped: self.dropped.load(Ordering::Relaxed),
            unused_rules,
        }
    }
}

/// `meshid-sidecar suggest-policy --admin ADDR [--annotations]`: a policy allowing exactly what the
/// sidecar observed, then (as comments) the difference from the policy in force.
pub fn suggest(args: &crate::cli::SuggestPolicyArgs) -> std::process::ExitCode {
    use std::process::ExitCode;
    let rt = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("meshid-sidecar suggest-policy: {e}");
            return ExitCode::FAILURE;
        }
    };
    let call = meshid_runtime::http_client::Call::get(args.admin, "/observed");
    let reply = match rt.block_on(meshid_runtime::http_client::send(&call)) {
        Ok(r) if r.status == 200 => r,
        Ok(r) => {
            eprintln!(
                "meshid-sidecar suggest-policy: {} answered HTTP {}",
                args.admin, r.status
            );
            return ExitCode::FAILURE;
        }
        Err(e) => {
            eprintln!("meshid-sidecar suggest-policy: asking {}: {e}", args.admin);
            return ExitCode::FAILURE;
        }
    };
    let report: ObservedReport = match serde_json::from_slice(&reply.body) {
        Ok(r) => r,
        Err(e) => {
            eprintln!(
                "meshid-sidecar suggest-policy: {} sent no report: {e}",
                args.admin
            );
            return ExitCode::FAILURE;
        }
    };
    print!("{}", render(&report, args.annotations));
    ExitCode::SUCCESS
}

/// The suggestion and the difference, as `suggest-policy` prints them.
pub fn render(report: &ObservedReport, annotations: bool) -> String {
    use std::fmt::Write as _;
    let observed: Vec<meshid_identity::policy::Observed> = report
        .calls
        .iter()
        .map(|c| meshid_identity::policy::Observed {
            port: c.port,
            http: !c.method.is_empty(),
            peer: c.peer.clone(),
            method: c.method.clone(),
            path: c.path.clone(),
            count: c.count,
        })
        .collect();
    let mut out = String::from(
        "# Suggested by meshid-sidecar suggest-policy from the traffic this sidecar observed.\n",
    );
    if annotations {
        out.push_str(
            "# Annotations allow whole peers: on HTTP ports this allows more than was observed.\n",
        );
        out.push_str(&meshid_identity::policy::suggest_annotations(&observed));
    } else {
        out.push_str(&meshid_identity::policy::suggest_yaml(&observed));
    }
    let denied: Vec<&ObservedCall> = report
        .calls
        .iter()
        .filter(|c| c.decision != "allow")
        .collect();
    let _ = writeln!(
        out,
        "# Observed calls the policy in force denies ({}):",
        denied.len()
    );
    for c in denied {
        let what = if c.method.is_empty() {
            "connection".to_owned()
        } else {
            format!("{} {}", c.method, c.path)
        };
        let _ = writeln!(
            out,
            "#   {} -> port {} {what} ({} times): {}",
            c.peer, c.port, c.count, c.rule
        );
    }
    let _ = writeln!(
        out,
        "# Rules of the policy in force that decided none of them ({}):",
        report.unused_rules.len()
    );
    for r in &report.unused_rules {
        let _ = writeln!(out, "#   port {}: {}", r.port, r.describe);
    }
    if report.dropped > 0 {
        let _ = writeln!(
            out,
            "# {} calls were not kept (the summary holds {MAX_ENTRIES} distinct calls)",
            report.dropped
        );
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn calls_are_counted_bounded_and_decided_again_by_the_policy_in_force() {
        let seen = ObservedTraffic::default();
        let web = SpiffeId::parse("spiffe://cluster.local/ns/shop/sa/web").unwrap();
        let other = SpiffeId::parse("spiffe://cluster.local/ns/shop/sa/other").unwrap();
        for _ in 0..3 {
            seen.record(8080, &web, Some(("GET", "/api/1?q=x")));
        }
        seen.record(8080, &other, Some(("GET", "/api/1")));
        seen.record(5432, &web, None);
        let policy = Policy::parse(
            "inbound:\n  - port: 8080\n    protocol: http\n    allow:\n      - id: spiffe://cluster.local/ns/shop/sa/web\n      - id: spiffe://cluster.local/ns/ops/sa/x\n",
        )
        .unwrap();
        let report = seen.report(Some(&policy));
        assert_eq!(report.calls.len(), 3);
        let web_call = report
            .calls
            .iter()
            .find(|c| c.peer == web.as_str() && c.port == 8080)
            .unwrap();
        assert_eq!((web_call.count, web_call.path.as_str()), (3, "/api/1"));
        assert_eq!(web_call.decision, "allow");
        assert_eq!(
            report.unused_rules,
            vec![UnusedRule {
                port: 8080,
                rule: 1,
                describe: "rule 1 (spiffe://cluster.local/ns/ops/sa/x)".into()
            }]
        );
        let text = render(&report, false);
        assert!(text.contains("denies (2)"), "{text}");
        assert!(
            text.contains("port 5432 connection (1 times): port-not-in-policy"),
            "{text}"
        );
        assert_eq!(seen.record(5432, &web, None), Recorded::Counted);
        for i in 0..MAX_ENTRIES + 5 {
            seen.record(9000, &web, Some(("GET", &format!("/x/{i}"))));
        }
        assert_eq!(
            seen.record(9000, &web, Some(("GET", "/y"))),
            Recorded::Dropped
        );
        let report = seen.report(None);
        assert_eq!(report.calls.len(), MAX_ENTRIES);
        assert!(report.dropped >= 5);
    }
}
