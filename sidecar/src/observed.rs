//! What the inbound has seen, for `meshid-sidecar suggest-policy`: a bounded summary of (port,
//! peer, method, path) with counts, in enforce and audit mode alike, allowed and denied. The admin
//! port serves it at `/observed` with each entry decided again by the policy now in force, and the
//! rules of that policy that decided none of it.
//!
//! Bounded, with denied calls apart: at most [`MAX_ENTRIES`] distinct calls let through at least
//! once, and at most [`MAX_DENIED_ENTRIES`] more that were only ever denied (paths without their
//! query, cut to [`MAX_PATH`] bytes); calls past that are only counted as dropped. A peer that
//! floods the sidecar with denied probes fills only the smaller table: it never takes the place of
//! a call that was let through, and suggest-policy never turns its calls into allow rules.

use std::collections::HashMap;
use std::hash::{BuildHasher, BuildHasherDefault, Hasher, RandomState};
use std::sync::Mutex;

use meshid_identity::SpiffeId;
use meshid_identity::policy::{Policy, RuleRef, no_policy_decision};
use serde::{Deserialize, Serialize};

/// The most distinct calls kept that were let through at least once.
pub const MAX_ENTRIES: usize = 4096;
/// The most distinct calls kept that were denied every time, apart from [`MAX_ENTRIES`].
pub const MAX_DENIED_ENTRIES: usize = 512;
/// The most distinct calls of one peer kept in each table: a peer allowed `/api/*` that calls ever
/// new paths fills its share, never the room of the others (one quarter of a table each).
pub const PER_PEER_SHARE: usize = 4;
/// The longest path kept, in bytes.
pub const MAX_PATH: usize = 256;
/// The most calls, or rules, `suggest-policy` lists one by one in a comment; the rest are counted.
const MAX_LISTED: usize = 100;

#[derive(Debug, Clone)]
struct Entry {
    port: u16,
    peer: String,
    method: String,
    path: String,
    count: u64,
    /// How many of `count` were denied (not let through).
    denied: u64,
}

/// What [`ObservedTraffic::record`] did with a call.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Recorded {
    /// A call seen before: its count went up.
    Counted,
    /// A new distinct call, kept.
    New,
    /// Not kept: the summary has no room for it.
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

type Table = HashMap<u64, Entry, BuildHasherDefault<KeyIsHash>>;

/// The two tables and what did not fit in them.
#[derive(Debug, Default)]
struct Tables {
    /// Calls let through at least once (at most [`MAX_ENTRIES`]).
    let_through: Table,
    /// Calls denied every time so far (at most [`MAX_DENIED_ENTRIES`]). One let through later
    /// moves to `let_through` when that has room, and otherwise stays here, counted as let through.
    denied: Table,
    /// Calls let through that were not kept.
    dropped: u64,
    /// Denied calls that were not kept.
    dropped_denied: u64,
    /// Per peer, its entries in `let_through` and in `denied`.
    per_peer: HashMap<String, (usize, usize)>,
}

impl Tables {
    fn drop_call(&mut self, allowed: bool) -> Recorded {
        if allowed {
            self.dropped += 1;
        } else {
            self.dropped_denied += 1;
        }
        Recorded::Dropped
    }
}

/// The summary.
#[derive(Debug, Default)]
pub struct ObservedTraffic {
    hasher: RandomState,
    tables: Mutex<Tables>,
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
    /// How many of `count` the sidecar denied (did not let through). A call denied every time is
    /// never suggested. Absent from the reports of sidecars before it: unknown, and then a call
    /// the policy in force denies is taken as denied every time (read as none, every probe such
    /// a sidecar refused would be suggested).
    #[serde(default)]
    pub denied: Option<u64>,
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
    /// Calls let through that were not kept: the suggestion may not allow them.
    pub dropped: u64,
    /// Denied calls that were not kept (they would not be suggested anyway).
    #[serde(default)]
    pub dropped_denied: u64,
    pub unused_rules: Vec<UnusedRule>,
}

impl ObservedTraffic {
    fn lock(&self) -> std::sync::MutexGuard<'_, Tables> {
        self.tables.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Counts one call: `request` is the method and path of an HTTP request, `None` a TCP
    /// connection; `allowed` whether the sidecar let it through (`Decision::allowed`: in audit
    /// mode, every call).
    pub fn record(
        &self,
        port: u16,
        peer: &SpiffeId,
        request: Option<(&str, &str)>,
        allowed: bool,
    ) -> Recorded {
        let (method, path) = request.unwrap_or(("", ""));
        // Methods are short tokens; a longer one is kept (and matched) by its first 32 bytes.
        let method = &method[..method.floor_char_boundary(32)];
        let path = path.split_once('?').map_or(path, |(p, _)| p);
        // Cut without a copy: a call seen before (nearly every one) allocates nothing.
        let path = crate::decisions::cut_str(path, MAX_PATH);
        let key = self.hasher.hash_one((port, peer.as_str(), method, path));
        let same = |e: &&mut Entry| {
            e.port == port && e.peer == peer.as_str() && e.method == method && e.path == path
        };
        let denied = u64::from(!allowed);
        let mut tables = self.lock();
        let t = &mut *tables;
        if let Some(e) = t.let_through.get_mut(&key).filter(same) {
            e.count += 1;
            e.denied += denied;
            return Recorded::Counted;
        }
        if let Some(e) = t.denied.get_mut(&key).filter(same) {
            e.count += 1;
            e.denied += denied;
            let held = t.per_peer.get(peer.as_str()).copied().unwrap_or_default();
            if allowed
                && t.let_through.len() < MAX_ENTRIES
                && held.0 < MAX_ENTRIES / PER_PEER_SHARE
                && !t.let_through.contains_key(&key)
                && let Some(e) = t.denied.remove(&key)
            {
                t.let_through.insert(key, e);
                if let Some(held) = t.per_peer.get_mut(peer.as_str()) {
                    held.0 += 1;
                    held.1 -= 1;
                }
            }
            return Recorded::Counted;
        }
        let held = t.per_peer.get(peer.as_str()).copied().unwrap_or_default();
        let (table, max, own, share) = if allowed {
            (
                &mut t.let_through,
                MAX_ENTRIES,
                held.0,
                MAX_ENTRIES / PER_PEER_SHARE,
            )
        } else {
            (
                &mut t.denied,
                MAX_DENIED_ENTRIES,
                held.1,
                MAX_DENIED_ENTRIES / PER_PEER_SHARE,
            )
        };
        // A full table or share, or (all but never) another call with the same 64-bit key.
        if table.len() >= max || own >= share || table.contains_key(&key) {
            return t.drop_call(allowed);
        }
        table.insert(
            key,
            Entry {
                port,
                peer: peer.as_str().to_owned(),
                method: method.to_owned(),
                path: path.to_owned(),
                count: 1,
                denied,
            },
        );
        let held = t.per_peer.entry(peer.as_str().to_owned()).or_default();
        if allowed {
            held.0 += 1;
        } else {
            held.1 += 1;
        }
        Recorded::New
    }

    /// Everything kept, decided again by `policy` (the one in force now), with the rules that
    /// decided none of it.
    pub fn report(&self, policy: Option<&Policy>) -> ObservedReport {
        let (entries, dropped, dropped_denied) = {
            let t = self.lock();
            let entries: Vec<Entry> = t
                .let_through
                .values()
                .chain(t.denied.values())
                .cloned()
                .collect();
            (entries, t.dropped, t.dropped_denied)
        };
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
                    denied: Some(e.denied),
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
            dropped,
            dropped_denied,
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

/// The suggestion and the difference, as `suggest-policy` prints them. The whole text parses as a
/// policy (or, with `annotations`, as annotations): long lists are cut at [`MAX_LISTED`] lines.
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
            denied: c
                .denied
                .unwrap_or(if c.decision == "deny" { c.count } else { 0 }),
        })
        .collect();
    let mut out = String::from(
        "# Suggested by meshid-sidecar suggest-policy from the traffic this sidecar observed.\n",
    );
    if report.dropped > 0 {
        let _ = writeln!(
            out,
            "# Incomplete: {} calls let through were not kept (the summary holds {MAX_ENTRIES} \
             distinct calls let through), so this may not allow all the traffic seen.",
            report.dropped
        );
    }
    if report.dropped_denied > 0 {
        let _ = writeln!(
            out,
            "# {} denied calls were not kept (the summary holds {MAX_DENIED_ENTRIES} distinct calls \
             only ever denied); a denied call is never suggested.",
            report.dropped_denied
        );
    }
    if report.calls.iter().any(|c| c.denied.is_none()) {
        out.push_str(
            "# From a sidecar older than denial counts: a call its policy denies now is taken as \
             denied every time, and not suggested.\n",
        );
    }
    if annotations {
        out.push_str(
            "# Annotations allow whole peers: on HTTP ports this allows more than was observed.\n",
        );
        out.push_str(&meshid_identity::policy::suggest_annotations(&observed));
    } else {
        out.push_str(&meshid_identity::policy::suggest_yaml(&observed));
    }
    let denied: Vec<String> = report
        .calls
        .iter()
        .filter(|c| c.decision != "allow")
        .map(|c| {
            let what = if c.method.is_empty() {
                "connection".to_owned()
            } else {
                format!("{} {}", c.method.escape_debug(), c.path.escape_debug())
            };
            format!(
                "{} -> port {} {what} ({} times): {}",
                c.peer.escape_debug(),
                c.port,
                c.count,
                c.rule.escape_debug()
            )
        })
        .collect();
    let _ = writeln!(
        out,
        "# Observed calls the policy in force denies ({}):",
        denied.len()
    );
    write_listed(&mut out, &denied);
    let unused: Vec<String> = report
        .unused_rules
        .iter()
        .map(|r| format!("port {}: {}", r.port, r.describe.escape_debug()))
        .collect();
    let _ = writeln!(
        out,
        "# Rules of the policy in force that decided none of them ({}):",
        unused.len()
    );
    write_listed(&mut out, &unused);
    out
}

/// `lines` as comment lines, the first [`MAX_LISTED`] of them, then how many more there are.
fn write_listed(out: &mut String, lines: &[String]) {
    use std::fmt::Write as _;
    for line in lines.iter().take(MAX_LISTED) {
        let _ = writeln!(out, "#   {line}");
    }
    if lines.len() > MAX_LISTED {
        let _ = writeln!(
            out,
            "#   ... and {} more (all of them: the admin port's /observed)",
            lines.len() - MAX_LISTED
        );
    }
}

#[cfg(test)]
mod tests;
