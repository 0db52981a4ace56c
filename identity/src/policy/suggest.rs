//! A policy that allows exactly what was observed: per port and peer, the methods and paths seen,
//! with paths collapsed into the patterns a policy can say (`/orders/*` for `/orders/123`,
//! `/orders/456`), written as a policy file or as a pod's annotations. Pure: the sidecar's
//! observed-traffic summary goes in, text comes out, and the text parses back as a policy.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt::Write as _;

use super::pattern::is_safe_path;

/// One observed call (or connection, on a TCP port: no method, no path).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Observed {
    pub port: u16,
    /// `true` on an HTTP port.
    pub http: bool,
    pub peer: String,
    pub method: String,
    pub path: String,
    pub count: u64,
}

/// More distinct paths than this under one first segment, for one peer and port, collapse into
/// `/first/*`.
pub const MAX_PATHS_PER_PREFIX: usize = 16;

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

/// Per port: (http, per peer: per path pattern: methods).
type Grouped = BTreeMap<u16, (bool, BTreeMap<String, BTreeMap<String, BTreeSet<String>>>)>;

fn group(observed: &[Observed]) -> Grouped {
    let mut ports: Grouped = BTreeMap::new();
    for o in observed {
        let (_, peers) = ports.entry(o.port).or_insert((o.http, BTreeMap::new()));
        let paths = peers.entry(o.peer.clone()).or_default();
        if !o.http {
            continue;
        }
        let (Some(pattern), false) = (pattern_of(&o.path), o.method.is_empty()) else {
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
    ports
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

/// The observed traffic as a policy file (`mode: enforce`).
pub fn suggest_yaml(observed: &[Observed]) -> String {
    let mut out = String::from("mode: enforce\ninbound:\n");
    for (port, (http, peers)) in group(observed) {
        let _ = write!(
            out,
            "  - port: {port}\n    protocol: {}\n    allow:\n",
            if http { "http" } else { "tcp" }
        );
        for (peer, paths) in &peers {
            if !http {
                let _ = writeln!(out, "      - id: {}", quoted(peer));
                continue;
            }
            for (methods, paths) in http_rules(paths) {
                let _ = writeln!(out, "      - id: {}", quoted(peer));
                let list =
                    |v: &[String]| v.iter().map(|s| quoted(s)).collect::<Vec<_>>().join(", ");
                let _ = writeln!(out, "        methods: [{}]", list(&methods));
                let _ = writeln!(out, "        paths: [{}]", list(&paths));
            }
        }
    }
    out
}

/// The observed traffic as pod annotations (`meshid.io/inbound`, `meshid.io/allow-PORT`), to put
/// under the pod template's `metadata.annotations`. Annotations allow whole peers (no methods or
/// paths), so on an HTTP port they allow more than was seen; the policy file says it exactly.
pub fn suggest_annotations(observed: &[Observed]) -> String {
    let grouped = group(observed);
    let inbound: Vec<String> = grouped
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
    for (port, (_, peers)) in &grouped {
        let peers: Vec<&str> = peers.keys().map(String::as_str).collect();
        let _ = writeln!(out, "meshid.io/allow-{port}: {}", quoted(&peers.join(", ")));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::SpiffeId;
    use crate::policy::Policy;

    fn seen(port: u16, peer: &str, method: &str, path: &str) -> Observed {
        Observed {
            port,
            http: !method.is_empty(),
            peer: peer.to_owned(),
            method: method.to_owned(),
            path: path.to_owned(),
            count: 1,
        }
    }

    const WEB: &str = "spiffe://cluster.local/ns/shop/sa/web";
    const PROM: &str = "spiffe://cluster.local/ns/ops/sa/prometheus";

    #[test]
    fn values_in_paths_collapse_and_the_result_allows_exactly_what_was_seen() {
        let mut observed = vec![
            seen(8080, WEB, "GET", "/api/orders/123"),
            seen(8080, WEB, "GET", "/api/orders/456?x=1"),
            seen(8080, WEB, "POST", "/api/orders"),
            seen(
                8080,
                WEB,
                "GET",
                "/api/users/3f2a9c01-b2de-4f00-8a00-000000000000/cart",
            ),
            seen(8080, PROM, "GET", "/metrics"),
            seen(8080, WEB, "GET", "/a/../admin"),
            seen(5432, WEB, "", ""),
        ];
        for i in 0..20 {
            observed.push(seen(8080, PROM, "GET", &format!("/static/file{i}.css")));
        }
        let yaml = suggest_yaml(&observed);
        let policy = Policy::parse(&yaml).unwrap_or_else(|e| panic!("{e}\n{yaml}"));
        let web = SpiffeId::parse(WEB).unwrap();
        let prom = SpiffeId::parse(PROM).unwrap();
        let allows = |peer: &SpiffeId, method: &str, path: &str| {
            policy.decide_request(8080, peer, method, path).would_allow
        };
        assert!(allows(&web, "GET", "/api/orders/789"), "{yaml}");
        assert!(allows(&web, "POST", "/api/orders"), "{yaml}");
        assert!(!allows(&web, "POST", "/api/orders/789"), "{yaml}");
        assert!(!allows(&web, "DELETE", "/api/orders"), "{yaml}");
        assert!(
            allows(&web, "GET", "/api/users/other/cart") || yaml.contains("/api/users/*"),
            "{yaml}"
        );
        assert!(!allows(&web, "GET", "/metrics"), "{yaml}");
        assert!(allows(&prom, "GET", "/metrics"), "{yaml}");
        assert!(
            allows(&prom, "GET", "/static/file99.css"),
            "twenty files collapse: {yaml}"
        );
        assert!(!allows(&prom, "GET", "/api/orders/1"), "{yaml}");
        assert!(
            !yaml.contains(".."),
            "an unsafe path is never suggested: {yaml}"
        );
        assert!(policy.decide_connection(5432, &web).would_allow, "{yaml}");
        assert!(!policy.decide_connection(5432, &prom).would_allow, "{yaml}");
        let annotations = suggest_annotations(&observed);
        assert!(
            annotations.contains("meshid.io/inbound: \"5432, 8080=http\"\n"),
            "{annotations}"
        );
        assert!(
            annotations.contains(&format!("meshid.io/allow-5432: \"{WEB}\"\n")),
            "{annotations}"
        );
        assert!(
            annotations.contains(&format!("meshid.io/allow-8080: \"{PROM}, {WEB}\"\n")),
            "{annotations}"
        );
    }

    #[test]
    fn segments_that_look_like_values() {
        for v in [
            "123",
            "3f2a9c01",
            "3f2a9c01-b2de-4f00-8a00-000000000000",
            "a1b2c3d4e5f6g7h8i9",
            "x%20y",
        ] {
            assert!(is_variable(v), "{v}");
        }
        for n in ["orders", "v1", "api", "deadbeef", "metrics", ""] {
            assert!(!is_variable(n), "{n}");
        }
        assert_eq!(
            pattern_of("/api/v1/orders/42/items").as_deref(),
            Some("/api/v1/orders/*")
        );
        assert_eq!(pattern_of("/healthz").as_deref(), Some("/healthz"));
        assert_eq!(pattern_of("/").as_deref(), Some("/"));
        assert_eq!(pattern_of("/a//b"), None);
        assert_eq!(pattern_of("/a/*"), None);
    }
}
