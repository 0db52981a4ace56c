//! Decisions, table-driven: each case names a peer and a request and the rule that must decide it.

use super::*;

const POLICY: &str = "\
inbound:
  - port: 8080
    protocol: http
    allow:
      - id: spiffe://cluster.local/ns/shop/sa/frontend
      - id: spiffe://cluster.local/ns/ops/sa/*
        methods: [GET]
        paths: [/metrics, /api/*]
      - id: spiffe://cluster.local/ns/ops/sa/admin
        methods: [POST, DELETE]
  - port: 5432
    allow:
      - id: spiffe://cluster.local/ns/shop/sa/*
  - port: 9000
    allow: []
";

const FRONTEND: &str = "spiffe://cluster.local/ns/shop/sa/frontend";
const OPS_READER: &str = "spiffe://cluster.local/ns/ops/sa/reader";
const OPS_ADMIN: &str = "spiffe://cluster.local/ns/ops/sa/admin";

struct Case {
    name: &'static str,
    port: u16,
    peer: &'static str,
    /// `None` for a connection-level decision.
    request: Option<(&'static str, &'static str)>,
    expected: (bool, RuleRef),
}

fn decide(policy: &Policy, case: &Case) -> Decision {
    let peer = SpiffeId::parse(case.peer).unwrap();
    match case.request {
        Some((method, path)) => policy.decide_request(case.port, &peer, method, path),
        None => policy.decide_connection(case.port, &peer),
    }
}

#[rustfmt::skip]
fn cases() -> Vec<Case> {
    use RuleRef::*;
    let case = |name, port, peer, request, expected| Case { name, port, peer, request, expected };
    let get = |path| Some(("GET", path));
    vec![
        case("tcp: one-segment wildcard", 5432, FRONTEND, None, (true, Rule(0))),
        case("tcp: wildcard is not two segments", 5432, "spiffe://cluster.local/ns/shop/sa/a/b", None, (false, NoRuleMatched)),
        case("tcp: wildcard is not zero segments", 5432, "spiffe://cluster.local/ns/shop/sa", None, (false, NoRuleMatched)),
        case("tcp: trust domain mismatch", 5432, "spiffe://other.local/ns/shop/sa/frontend", None, (false, NoRuleMatched)),
        case("tcp: trust domain suffix", 5432, "spiffe://cluster.local.evil/ns/shop/sa/x", None, (false, NoRuleMatched)),
        case("tcp: request on a tcp port", 5432, FRONTEND, get("/../x"), (true, Rule(0))),
        case("tcp: empty allow list", 9000, FRONTEND, None, (false, NoRuleMatched)),
        case("port not in policy", 1234, FRONTEND, None, (false, PortNotInPolicy)),
        case("request on a port not in policy", 1234, FRONTEND, get("/"), (false, PortNotInPolicy)),
        case("http connection: some rule for the peer", 8080, OPS_READER, None, (true, Rule(1))),
        case("http connection: no rule for the peer", 8080, "spiffe://cluster.local/ns/x/sa/y", None, (false, NoRuleMatched)),
        case("http: rule without methods or paths", 8080, FRONTEND, Some(("PATCH", "/any/thing")), (true, Rule(0))),
        case("http: method and exact path", 8080, OPS_READER, get("/metrics"), (true, Rule(1))),
        case("http: query is ignored", 8080, OPS_READER, get("/metrics?x=/../y"), (true, Rule(1))),
        case("http: exact path is exact", 8080, OPS_READER, get("/metrics/x"), (false, NoRuleMatched)),
        case("http: prefix path", 8080, OPS_READER, get("/api/v1/orders"), (true, Rule(1))),
        case("http: prefix needs the slash", 8080, OPS_READER, get("/api"), (false, NoRuleMatched)),
        case("http: prefix is not a string prefix", 8080, OPS_READER, get("/apix"), (false, NoRuleMatched)),
        case("http: method mismatch", 8080, OPS_READER, Some(("POST", "/metrics")), (false, NoRuleMatched)),
        case("http: method is case-sensitive", 8080, OPS_READER, Some(("get", "/metrics")), (false, NoRuleMatched)),
        case("http: first matching rule wins", 8080, OPS_ADMIN, get("/metrics"), (true, Rule(1))),
        case("http: later rule matches", 8080, OPS_ADMIN, Some(("DELETE", "/metrics")), (true, Rule(2))),
        case("http: later rule, any path", 8080, OPS_ADMIN, Some(("POST", "/x/y")), (true, Rule(2))),
        case("http: dot-dot escapes a prefix", 8080, OPS_READER, get("/api/../admin"), (false, UnsafePath)),
        case("http: encoded dot-dot", 8080, OPS_READER, get("/api/%2E%2e/admin"), (false, UnsafePath)),
        case("http: encoded slash", 8080, OPS_READER, get("/api/..%2Fadmin"), (false, UnsafePath)),
        case("http: backslash", 8080, OPS_READER, get("/api\\..\\admin"), (false, UnsafePath)),
        case("http: double slash", 8080, OPS_READER, get("//metrics"), (false, UnsafePath)),
        case("http: nul", 8080, OPS_READER, get("/metrics\0"), (false, UnsafePath)),
        case("http: encoded nul", 8080, OPS_READER, get("/metrics%00"), (false, UnsafePath)),
        case("http: encoded nul under a prefix", 8080, OPS_READER, get("/api/x%00.json"), (false, UnsafePath)),
        case("http: encoded control character", 8080, OPS_READER, get("/api/x%0a"), (false, UnsafePath)),
        case("http: overlong dot-dot", 8080, OPS_READER, get("/api/%c0%ae%c0%ae/admin"), (false, UnsafePath)),
        case("http: overlong slash", 8080, OPS_READER, get("/api/..%c0%afadmin"), (false, UnsafePath)),
        case("http: overlong backslash", 8080, OPS_READER, get("/api/..%c1%9cadmin"), (false, UnsafePath)),
        case("http: three-byte overlong dot", 8080, OPS_READER, get("/api/%e0%80%ae%e0%80%ae/admin"), (false, UnsafePath)),
        case("http: four-byte overlong dot", 8080, OPS_READER, get("/api/%f0%80%80%ae./admin"), (false, UnsafePath)),
        case("http: %u dot", 8080, OPS_READER, get("/api/%u002e%u002e/admin"), (false, UnsafePath)),
        case("http: %u slash", 8080, OPS_READER, get("/api/..%u002fadmin"), (false, UnsafePath)),
        case("http: a '%' a second decoder completes", 8080, OPS_READER, get("/api/%2%65%2%65/admin"), (false, UnsafePath)),
        case("http: unsafe escape even for a rule with any path", 8080, FRONTEND, get("/a/%c0%ae"), (false, UnsafePath)),
        case("http: utf-8 that is not overlong is matched", 8080, OPS_READER, get("/api/caf%c3%a9"), (true, Rule(1))),
        case("http: unsafe even for a rule with any path", 8080, FRONTEND, get("/a/./b"), (false, UnsafePath)),
        case("http: not origin-form", 8080, FRONTEND, Some(("OPTIONS", "*")), (false, UnsafePath)),
    ]
}

#[test]
fn enforce_mode_decisions() {
    let policy = Policy::parse(POLICY).unwrap();
    assert_eq!(policy.mode(), Mode::Enforce);
    for case in cases() {
        let (would_allow, rule) = case.expected;
        let expected = Decision {
            allowed: would_allow,
            would_allow,
            rule,
        };
        assert_eq!(decide(&policy, &case), expected, "{}", case.name);
    }
}

#[test]
fn audit_mode_allows_but_reports() {
    let policy = Policy::parse(&format!("mode: audit\n{POLICY}")).unwrap();
    assert_eq!(policy.mode(), Mode::Audit);
    for case in cases() {
        let (would_allow, rule) = case.expected;
        let expected = Decision {
            allowed: true,
            would_allow,
            rule,
        };
        assert_eq!(decide(&policy, &case), expected, "{}", case.name);
    }
}

#[test]
fn no_policy_denies() {
    let decision = no_policy_decision();
    assert!(!decision.allowed && !decision.would_allow);
    assert_eq!(decision.rule, RuleRef::NoPolicy);
}

#[test]
fn labels_and_text() {
    let table = [
        (RuleRef::Rule(0), "rule-0", "rule 0"),
        (RuleRef::Rule(12), "rule-12", "rule 12"),
        (RuleRef::NoRuleMatched, "no-rule-matched", "no rule matched"),
        (
            RuleRef::PortNotInPolicy,
            "port-not-in-policy",
            "port not in policy",
        ),
        (RuleRef::NoPolicy, "no-policy", "no policy loaded"),
        (RuleRef::UnsafePath, "unsafe-path", "unsafe request path"),
    ];
    for (rule, label, text) in table {
        assert_eq!(rule.label(), label);
        assert_eq!(rule.to_string(), text);
    }
    let policy = Policy::parse(POLICY).unwrap();
    assert_eq!(
        policy.describe(8080, &RuleRef::Rule(1)),
        "rule 1 (spiffe://cluster.local/ns/ops/sa/*)"
    );
    assert_eq!(policy.describe(8080, &RuleRef::Rule(7)), "rule 7");
    assert_eq!(
        policy.describe(8080, &RuleRef::NoRuleMatched),
        "no rule matched"
    );
}

#[test]
fn a_port_must_agree_with_its_listener() {
    let policy = Policy::parse(
        "inbound:\n  - port: 8080\n    protocol: http\n    allow:\n      - id: spiffe://td/ns/a/sa/b\n        paths: [/public]\n  - port: 5432\n    allow:\n      - id: spiffe://td/ns/a/sa/b\n",
    )
    .unwrap();
    struct Case {
        name: &'static str,
        listeners: &'static [(u16, Protocol)],
        refused_port: Option<u16>,
    }
    let cases = [
        Case {
            name: "both agree",
            listeners: &[(8080, Protocol::Http), (5432, Protocol::Tcp)],
            refused_port: None,
        },
        Case {
            name: "ports the policy does not name",
            listeners: &[(9000, Protocol::Tcp), (9001, Protocol::Http)],
            refused_port: None,
        },
        Case {
            name: "http rules with paths on a tcp listener",
            listeners: &[(5432, Protocol::Tcp), (8080, Protocol::Tcp)],
            refused_port: Some(8080),
        },
        Case {
            name: "tcp rules on an http listener",
            listeners: &[(5432, Protocol::Http)],
            refused_port: Some(5432),
        },
    ];
    for case in cases {
        let result = policy.check_listeners(case.listeners);
        match case.refused_port {
            None => assert!(result.is_ok(), "{}: {result:?}", case.name),
            Some(port) => {
                let message = result.expect_err(case.name).to_string();
                assert!(
                    message.contains(&format!("inbound port {port}")),
                    "{}: {message}",
                    case.name
                );
            }
        }
    }
}

#[test]
fn every_explanation_agrees_with_the_decision_and_names_what_missed() {
    for mode in ["", "mode: audit\n"] {
        let policy = Policy::parse(&format!("{mode}{POLICY}")).unwrap();
        for case in cases() {
            let peer = SpiffeId::parse(case.peer).unwrap();
            let explained = policy.explain(case.port, &peer, case.request);
            assert_eq!(explained.decision, decide(&policy, &case), "{}", case.name);
            match explained.decision.rule {
                RuleRef::Rule(i) => {
                    let rule = explained.rule.as_ref().expect(case.name);
                    assert_eq!(rule.index, i, "{}", case.name);
                    assert!(rule.mismatches.is_empty(), "{}", case.name);
                }
                RuleRef::NoRuleMatched if case.port != 9000 => {
                    let rule = explained.rule.as_ref().expect(case.name);
                    assert!(!rule.mismatches.is_empty(), "{}", case.name);
                }
                _ => {}
            }
        }
    }
    let policy = Policy::parse(POLICY).unwrap();
    let explain = |port, peer: &str, request| {
        policy
            .explain(port, &SpiffeId::parse(peer).unwrap(), request)
            .to_string()
    };
    // The reader's POST /metrics: rule 1 has its identity and path, not its method.
    assert_eq!(
        explain(8080, OPS_READER, Some(("POST", "/metrics"))),
        "deny: no rule matched; closest: rule 1 (spiffe://cluster.local/ns/ops/sa/*, \
         methods [GET], paths [/metrics, /api/*]), which does not match the method"
    );
    assert_eq!(
        explain(8080, OPS_READER, Some(("PUT", "/admin"))),
        "deny: no rule matched; closest: rule 1 (spiffe://cluster.local/ns/ops/sa/*, \
         methods [GET], paths [/metrics, /api/*]), which does not match the method and the path"
    );
    assert_eq!(
        explain(5432, "spiffe://cluster.local/ns/other/sa/x", None),
        "deny: no rule matched; closest: rule 0 (spiffe://cluster.local/ns/shop/sa/*), which \
         does not match the identity"
    );
    assert_eq!(
        explain(8080, OPS_ADMIN, Some(("DELETE", "/x"))),
        "allow: rule 2 (spiffe://cluster.local/ns/ops/sa/admin, methods [POST, DELETE])"
    );
    assert!(explain(1234, FRONTEND, None).contains("names no rules for this port"));
    assert!(explain(9000, FRONTEND, None).contains("allow list is empty"));
    assert!(explain(8080, FRONTEND, Some(("GET", "/a/../b"))).contains("whatever the rules say"));
}

/// A key, a value or a parser excerpt quoted by an error reaches the sidecar's log and
/// `check-policy`'s terminal: its control characters are escaped, so a policy cannot forge a log
/// line or send escape sequences.
#[test]
fn errors_quote_the_policy_without_its_control_characters() {
    let forged = "\"x\\e[2J\\n2026-12-07T01:00:00Z  INFO policy applied\\r\"";
    for (yaml, quoted) in [
        (format!("inbound:\n  - port: 8080\n    {forged}: 1\n"), true),
        (
            format!("inbound:\n  - port: 8080\n    allow:\n      - id: {forged}\n"),
            true,
        ),
        (format!("{forged}: [\n"), false),
    ] {
        let error = Policy::parse(&yaml).unwrap_err().to_string();
        assert!(!error.contains(char::is_control), "{yaml}: {error:?}");
        if quoted {
            assert!(error.contains("\\u{1b}[2J\\n2026"), "{yaml}: {error:?}");
        }
    }
}
