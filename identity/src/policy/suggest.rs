//! A policy that allows exactly what was observed: per port and peer, the methods and paths seen,
//! with paths collapsed into the patterns a policy can say (`/orders/*` for `/orders/123`,
//! `/orders/456`), written as a policy file or as a pod's annotations. Pure: the sidecar's
//! observed-traffic summary goes in, text comes out, and the text parses back as a policy.
//!
//! Only calls the sidecar let through at least once are suggested. A call it denied every time is
//! listed in a comment, never allowed, and counts toward neither a `/prefix/*` nor a whole peer:
//! otherwise any peer of the trust domain could probe the paths it wants and have them (or their
//! whole prefix, or every call it makes) suggested for allowing.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt::Write as _;

use super::pattern::{Method, is_safe_path};

/// One observed call (or connection, on a TCP port: no method, no path).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Observed {
    pub port: u16,
    /// `true` on an HTTP port.
    pub http: bool,
    pub peer: String,
    pub method: String,
    pub path: String,
    /// How many times it was seen.
    pub count: u64,
    /// How many of those the sidecar refused (not let through: `enforce` mode, or no policy). A call
    /// refused every time it was seen is not suggested.
    pub denied: u64,
}

impl Observed {
    /// Whether the sidecar let it through at least once (in `audit` mode, every call).
    fn let_through(&self) -> bool {
        self.denied < self.count
    }
}

/// More distinct paths than this under one first segment, for one peer and port, collapse into
/// `/first/*`.
pub const MAX_PATHS_PER_PREFIX: usize = 16;

/// The most calls listed one by one in the "left out" comment; the rest are counted.
const MAX_LEFT_OUT_LISTED: usize = 100;

/// Whether a path segment looks like a value (an ID, a number, a token) rather than a name.
fn is_variable(segment: &str) -> bool {
    if segment.is_empty() {
        return false;
    }
    let digits = segment.bytes().filter(u8::is_ascii_digit).count();
    let hex = segment.bytes().all(|b| b.is_ascii_hexdigit() || b == b'-');
    segment.bytes().all(|b| b.is_ascii_digit())
        || (hex && segment.len() >= 8 && digits > 0)
        || (segment.len() >= 16 && digits > 0)
        || segment.contains('%')
}

/// The pattern for one path: exact, or `/prefix/*` from its first segment that looks like a
/// value. `None` for a path no rule may name (unsafe, or with characters a pattern cannot hold).
fn pattern_of(path: &str) -> Option<String> {
    let path = path.split_once('?').map_or(path, |(p, _)| p);
    if !is_safe_path(path)
        || path
            .bytes()
            .any(|b| !b.is_ascii_graphic() || b == b'*' || b == b'#')
    {
        return None;
    }
    let mut prefix = String::from("/");
    for segment in path[1..].split('/') {
        if is_variable(segment) {
            prefix.push('*');
            return Some(prefix);
        }
        prefix.push_str(segment);
        prefix.push('/');
    }
    Some(path.to_owned())
}

/// `/first/*` for a pattern, or `None` when it has no first segment of its own.
fn first_segment(pattern: &str) -> Option<String> {
    let rest = &pattern[1..];
    let (first, _) = rest.split_once('/')?;
    (!first.is_empty()).then(|| format!("/{first}/*"))
}

/// Why an observed call is not in the suggested rules.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
enum LeftOut {
    /// The sidecar refused it every time it was seen.
    Denied,
    /// Let through, but with a method a policy cannot name (not only ASCII letters: `M-SEARCH`).
    Method,
    /// Let through (in `audit` mode), but with a path a policy cannot name (unsafe, or with a
    /// character a pattern cannot hold).
    Path,
}

impl LeftOut {
    fn why(self) -> &'static str {
        match self {
            Self::Denied => "denied every time, so not suggested",
            Self::Method => "a method a policy cannot name",
            Self::Path => "a path a policy cannot name",
        }
    }
}

/// Per port: (http, per peer: per path pattern: methods).
type Ports = BTreeMap<u16, (bool, BTreeMap<String, BTreeMap<String, BTreeSet<String>>>)>;

/// What the suggestion is made of: the calls let through, by port and peer, and the calls it
/// leaves out with the reason.
struct Grouped<'a> {
    ports: Ports,
    left_out: Vec<(LeftOut, &'a Observed)>,
}

fn group(observed: &[Observed]) -> Grouped<'_> {
    let mut ports: Ports = BTreeMap::new();
    let mut left_out = Vec::new();
    for o in observed {
        // Before anything else: a denied call names no peer, path or method of the suggestion.
        if !o.let_through() {
            left_out.push((LeftOut::Denied, o));
            continue;
        }
        let (_, peers) = ports.entry(o.port).or_insert((o.http, BTreeMap::new()));
        let paths = peers.entry(o.peer.clone()).or_default();
        if !o.http {
            continue;
        }
        if Method::parse(&o.method).is_err() {
            left_out.push((LeftOut::Method, o));
            continue;
        }
        let Some(pattern) = pattern_of(&o.path) else {
            left_out.push((LeftOut::Path, o));
            continue;
        };
        paths.entry(pattern).or_default().insert(o.method.clone());
    }
    // Too many distinct paths under one first segment: one prefix for them all.
    for (_, peers) in ports.values_mut() {
        for paths in peers.values_mut() {
            let mut by_first: BTreeMap<String, usize> = BTreeMap::new();
            for p in paths.keys() {
                if let Some(f) = first_segment(p) {
                    *by_first.entry(f).or_default() += 1;
                }
            }
            for (first, n) in by_first {
                if n <= MAX_PATHS_PER_PREFIX {
                    continue;
                }
                let stem = &first[..first.len() - 1];
                let merged: BTreeSet<String> = paths
                    .iter()
                    .filter(|(p, _)| p.starts_with(stem))
                    .flat_map(|(_, m)| m.iter().cloned())
                    .collect();
                paths.retain(|p, _| !p.starts_with(stem));
                paths.insert(first, merged);
            }
        }
    }
    left_out.sort_by(|(a, x), (b, y)| {
        (a, x.port, &x.peer, &x.method, &x.path).cmp(&(b, y.port, &y.peer, &y.method, &y.path))
    });
    Grouped { ports, left_out }
}

/// The rules for one peer on an HTTP port: paths with the same methods share a rule.
fn http_rules(paths: &BTreeMap<String, BTreeSet<String>>) -> Vec<(Vec<String>, Vec<String>)> {
    let mut by_methods: BTreeMap<Vec<String>, Vec<String>> = BTreeMap::new();
    for (path, methods) in paths {
        by_methods
            .entry(methods.iter().cloned().collect())
            .or_default()
            .push(path.clone());
    }
    by_methods.into_iter().collect()
}

fn quoted(s: &str) -> String {
    serde_json::to_string(s).unwrap_or_default()
}

/// `s` for a comment line: control characters and line separators escaped, so that what a peer
/// sent cannot end the comment and add a line of policy.
fn commented(s: &str) -> String {
    s.escape_debug().to_string()
}

/// The comment listing the calls the suggestion leaves out (the first [`MAX_LEFT_OUT_LISTED`]),
/// each with why; nothing when there are none.
fn write_left_out(out: &mut String, left_out: &[&(LeftOut, &Observed)]) {
    if left_out.is_empty() {
        return;
    }
    let _ = writeln!(out, "# Left out of the suggestion ({}):", left_out.len());
    if left_out.iter().any(|(why, _)| *why == LeftOut::Denied) {
        out.push_str(
            "# (a call the sidecar denied every time it was seen is never suggested, nor counted\n\
             # toward a /prefix/* or a whole peer, so that a peer cannot get what it probes for\n\
             # allowed; allow it by hand if it is wanted)\n",
        );
    }
    for (why, o) in left_out.iter().take(MAX_LEFT_OUT_LISTED) {
        let what = if o.http {
            format!("{} {}", commented(&o.method), commented(&o.path))
        } else {
            "connection".to_owned()
        };
        let _ = writeln!(
            out,
            "#   {} -> port {} {what} ({} times): {}",
            commented(&o.peer),
            o.port,
            o.count,
            why.why()
        );
    }
    if left_out.len() > MAX_LEFT_OUT_LISTED {
        let _ = writeln!(
            out,
            "#   ... and {} more",
            left_out.len() - MAX_LEFT_OUT_LISTED
        );
    }
}

/// The observed traffic as a policy file (`mode: enforce`), then, as comments, the calls it leaves
/// out. The whole text parses as a policy.
pub fn suggest_yaml(observed: &[Observed]) -> String {
    let grouped = group(observed);
    let mut out = String::from("mode: enforce\n");
    if grouped.ports.is_empty() {
        out.push_str("inbound: []\n");
    } else {
        out.push_str("inbound:\n");
    }
    for (port, (http, peers)) in &grouped.ports {
        let mut rules = String::new();
        for (peer, paths) in peers {
            if !http {
                let _ = writeln!(rules, "      - id: {}", quoted(peer));
                continue;
            }
            for (methods, paths) in http_rules(paths) {
                let _ = writeln!(rules, "      - id: {}", quoted(peer));
                let list =
                    |v: &[String]| v.iter().map(|s| quoted(s)).collect::<Vec<_>>().join(", ");
                let _ = writeln!(rules, "        methods: [{}]", list(&methods));
                let _ = writeln!(rules, "        paths: [{}]", list(&paths));
            }
        }
        let _ = writeln!(
            out,
            "  - port: {port}\n    protocol: {}",
            if *http { "http" } else { "tcp" }
        );
        // A port whose calls a policy cannot name: listed (its protocol still says what the
        // listener is), allowing no one.
        if rules.is_empty() {
            out.push_str("    allow: []\n");
        } else {
            out.push_str("    allow:\n");
            out.push_str(&rules);
        }
    }
    write_left_out(&mut out, &grouped.left_out.iter().collect::<Vec<_>>());
    out
}

/// The observed traffic as pod annotations (`meshid.io/inbound`, `meshid.io/allow-PORT`), to put
/// under the pod template's `metadata.annotations`, then, as comments, the calls left out.
/// Annotations allow whole peers (no methods or paths), so on an HTTP port they allow more than
/// was seen; the policy file says it exactly. A peer whose every call was denied is not allowed.
pub fn suggest_annotations(observed: &[Observed]) -> String {
    let grouped = group(observed);
    let inbound: Vec<String> = grouped
        .ports
        .iter()
        .map(|(port, (http, _))| {
            if *http {
                format!("{port}=http")
            } else {
                port.to_string()
            }
        })
        .collect();
    let mut out = format!("meshid.io/inbound: {}\n", quoted(&inbound.join(", ")));
    for (port, (_, peers)) in &grouped.ports {
        let peers: Vec<&str> = peers.keys().map(String::as_str).collect();
        let _ = writeln!(out, "meshid.io/allow-{port}: {}", quoted(&peers.join(", ")));
    }
    // A whole peer is allowed, whatever its methods and paths: only denied calls are left out.
    let denied: Vec<&(LeftOut, &Observed)> = grouped
        .left_out
        .iter()
        .filter(|(why, _)| *why == LeftOut::Denied)
        .collect();
    write_left_out(&mut out, &denied);
    out
}

#[cfg(test)]
mod tests;
