//! The suggestion, tested by parsing it back as a policy and asking that policy.

use super::*;
use crate::SpiffeId;
use crate::policy::{Policy, Protocol};

fn seen(port: u16, peer: &str, method: &str, path: &str) -> Observed {
    Observed {
        port,
        http: !method.is_empty(),
        peer: peer.to_owned(),
        method: method.to_owned(),
        path: path.to_owned(),
        count: 1,
        denied: 0,
    }
}

/// A call the sidecar refused every time (`times` times).
fn denied(port: u16, peer: &str, method: &str, path: &str, times: u64) -> Observed {
    Observed {
        count: times,
        denied: times,
        ..seen(port, peer, method, path)
    }
}

/// The suggestion without its comments: what it allows.
fn rules(text: &str) -> String {
    text.lines()
        .filter(|l| !l.starts_with('#'))
        .map(|l| format!("{l}\n"))
        .collect()
}

const WEB: &str = "spiffe://cluster.local/ns/shop/sa/web";
const PROM: &str = "spiffe://cluster.local/ns/ops/sa/prometheus";
const PROBE: &str = "spiffe://cluster.local/ns/dev/sa/scanner";

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
        !rules(&yaml).contains(".."),
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

#[test]
fn calls_denied_every_time_are_listed_but_never_allowed_nor_widen_a_rule() {
    let mut observed = vec![
        seen(8080, WEB, "GET", "/api/orders/1"),
        // Let through once (say in audit mode), denied since: suggested.
        Observed {
            count: 3,
            denied: 2,
            ..seen(8080, WEB, "GET", "/api/mixed")
        },
        denied(8080, PROBE, "DELETE", "/api/orders/1", 4),
        denied(5432, PROBE, "", "", 1),
    ];
    // A peer that probes twenty paths: alone they would collapse into `/admin/*`.
    for i in 0..20 {
        observed.push(denied(8080, PROBE, "GET", &format!("/admin/secret{i}"), 1));
    }
    // Sixteen paths let through and five denied under one prefix: no `/files/*`.
    for name in "abcdefghijklmnop".chars() {
        observed.push(seen(8080, WEB, "GET", &format!("/files/report-{name}")));
    }
    for name in "qrstu".chars() {
        observed.push(denied(
            8080,
            WEB,
            "GET",
            &format!("/files/report-{name}"),
            1,
        ));
    }
    let yaml = suggest_yaml(&observed);
    let policy = Policy::parse(&yaml).unwrap_or_else(|e| panic!("{e}\n{yaml}"));
    let web = SpiffeId::parse(WEB).unwrap();
    let probe = SpiffeId::parse(PROBE).unwrap();
    let allows = |peer: &SpiffeId, method: &str, path: &str| {
        policy.decide_request(8080, peer, method, path).would_allow
    };
    assert!(allows(&web, "GET", "/api/orders/2"), "{yaml}");
    assert!(allows(&web, "GET", "/api/mixed"), "{yaml}");
    assert!(allows(&web, "GET", "/files/report-p"), "{yaml}");
    assert!(
        !allows(&web, "GET", "/files/report-q"),
        "denied paths do not collapse a prefix: {yaml}"
    );
    for path in ["/admin/secret0", "/admin/other", "/api/orders/1"] {
        assert!(!allows(&probe, "GET", path), "{path}: {yaml}");
    }
    assert!(!allows(&probe, "DELETE", "/api/orders/1"), "{yaml}");
    assert!(
        !policy.decide_connection(5432, &probe).would_allow,
        "{yaml}"
    );
    let body = rules(&yaml);
    assert!(!body.contains(PROBE), "{body}");
    assert!(!body.contains("/admin"), "{body}");
    assert!(!body.contains("report-q"), "{body}");
    assert!(!body.contains("5432"), "{body}");
    // Listed in a comment, each saying it was denied.
    assert!(
        yaml.contains("# Left out of the suggestion (27):\n"),
        "{yaml}"
    );
    assert!(yaml.contains("never suggested"), "{yaml}");
    for line in [
        format!("#   {PROBE} -> port 8080 GET /admin/secret0 (1 times): denied every time"),
        format!("#   {PROBE} -> port 8080 DELETE /api/orders/1 (4 times): denied every time"),
        format!("#   {PROBE} -> port 5432 connection (1 times): denied every time"),
        format!("#   {WEB} -> port 8080 GET /files/report-q (1 times): denied every time"),
    ] {
        assert!(yaml.contains(&line), "{line}\n{yaml}");
    }
    // Annotations allow whole peers: never one whose every call was denied.
    let annotations = suggest_annotations(&observed);
    assert!(
        annotations.contains("meshid.io/inbound: \"8080=http\"\n"),
        "{annotations}"
    );
    assert!(
        annotations.contains(&format!("meshid.io/allow-8080: \"{WEB}\"\n")),
        "{annotations}"
    );
    assert!(!rules(&annotations).contains(PROBE), "{annotations}");
    assert!(
        annotations.contains(&format!(
            "#   {PROBE} -> port 5432 connection (1 times): denied every time"
        )),
        "{annotations}"
    );
    // Nothing let through: an empty policy, still one that parses.
    let only_denied = [denied(8080, PROBE, "GET", "/admin", 9)];
    let yaml = suggest_yaml(&only_denied);
    let policy = Policy::parse(&yaml).unwrap_or_else(|e| panic!("{e}\n{yaml}"));
    assert_eq!(policy.ports().count(), 0, "{yaml}");
    assert!(
        yaml.contains("GET /admin (9 times): denied every time"),
        "{yaml}"
    );
    let annotations = suggest_annotations(&only_denied);
    assert!(
        annotations.starts_with("meshid.io/inbound: \"\"\n"),
        "{annotations}"
    );
    assert!(!rules(&annotations).contains(PROBE), "{annotations}");
}

#[test]
fn the_left_out_list_is_bounded_and_cannot_add_a_line() {
    // What a peer sent cannot end the comment (hyper lets none of these through; still).
    let observed = [
        denied(8080, PROBE, "GET", "/x\n  - port: 1\u{2028}y", 1),
        seen(8080, WEB, "GET\r\ninbound: []", "/z"),
    ];
    let yaml = suggest_yaml(&observed);
    Policy::parse(&yaml).unwrap_or_else(|e| panic!("{e}\n{yaml}"));
    assert!(
        yaml.lines()
            .all(|l| l.starts_with('#') || !l.contains("port: 1")),
        "{yaml}"
    );
    assert!(
        yaml.contains("GET /x\\n  - port: 1\\u{2028}y (1 times)"),
        "{yaml}"
    );
    assert!(yaml.contains("GET\\r\\ninbound: [] /z (1 times)"), "{yaml}");
    // A flood of probes lists the first ones and counts the rest.
    let observed: Vec<Observed> = (0..MAX_LEFT_OUT_LISTED + 9)
        .map(|i| denied(8080, PROBE, "GET", &format!("/p/{i}"), 1))
        .collect();
    let yaml = suggest_yaml(&observed);
    Policy::parse(&yaml).unwrap_or_else(|e| panic!("{e}\n{yaml}"));
    assert!(
        yaml.contains("# Left out of the suggestion (109):\n"),
        "{yaml}"
    );
    assert!(yaml.ends_with("#   ... and 9 more\n"), "{yaml}");
    let listed = yaml.lines().filter(|l| l.starts_with("#   spiffe")).count();
    assert_eq!(listed, MAX_LEFT_OUT_LISTED, "{yaml}");
}

#[test]
fn methods_a_policy_cannot_name_are_left_out_and_the_suggestion_still_parses() {
    let observed = [
        seen(8080, WEB, "GET", "/x"),
        seen(8080, WEB, "M-SEARCH", "/x"),
        seen(8080, PROM, "M-SEARCH", "*"),
        seen(9090, PROM, "M-SEARCH", "/"),
        seen(9090, PROM, "GET", "/a/../b"),
    ];
    let yaml = suggest_yaml(&observed);
    let policy = Policy::parse(&yaml).unwrap_or_else(|e| panic!("{e}\n{yaml}"));
    let web = SpiffeId::parse(WEB).unwrap();
    assert!(
        policy.decide_request(8080, &web, "GET", "/x").would_allow,
        "{yaml}"
    );
    assert!(!rules(&yaml).contains("M-SEARCH"), "{yaml}");
    // A port with nothing a policy can name: listed with its protocol, allowing no one.
    assert_eq!(
        policy.ports().collect::<Vec<_>>(),
        vec![(8080, Protocol::Http, 1), (9090, Protocol::Http, 0)],
        "{yaml}"
    );
    for line in [
        format!("#   {WEB} -> port 8080 M-SEARCH /x (1 times): a method a policy cannot name"),
        format!("#   {PROM} -> port 9090 M-SEARCH / (1 times): a method a policy cannot name"),
        format!("#   {PROM} -> port 9090 GET /a/../b (1 times): a path a policy cannot name"),
    ] {
        assert!(yaml.contains(&line), "{line}\n{yaml}");
    }
    assert!(!yaml.contains("denied every time"), "{yaml}");
    // Annotations name no methods: the peers were let through, so they are allowed.
    let annotations = suggest_annotations(&observed);
    assert!(
        annotations.contains(&format!("meshid.io/allow-8080: \"{PROM}, {WEB}\"\n")),
        "{annotations}"
    );
    assert!(!annotations.contains("Left out"), "{annotations}");
}
