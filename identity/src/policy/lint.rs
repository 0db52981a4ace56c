//! Rules that can never decide anything, which `meshid-sidecar check-policy` warns about. Such a
//! policy is valid and loads; the warnings point at what was probably meant otherwise.

use std::collections::BTreeSet;

use super::{Policy, Protocol};
use crate::TrustDomain;

/// A rule or port that never decides anything, found by [`Policy::warnings`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Warning {
    /// The inbound port concerned, if one.
    pub port: Option<u16>,
    /// The rule's 0-based index in the port's `allow` list (`rule 1` in decisions), if one.
    pub rule: Option<usize>,
    /// Where the rule's `id` (or the port number) is in a YAML policy: 1-based line and column.
    pub location: Option<(usize, usize)>,
    pub message: String,
}

impl Policy {
    /// What in this (valid) policy never decides anything, in port and rule order:
    /// - with `trust_domain` (the sidecar's own): a rule for another trust domain, whose peers the
    ///   TLS handshake refuses before any rule is consulted; without it, a policy naming several
    ///   trust domains (all but one of them never match);
    /// - a rule after an earlier rule of the same port that allows every peer and request it
    ///   allows (a duplicate, or one shadowed by a wildcard), since the first matching rule decides;
    /// - with `listeners` (`(port, protocol)` of the sidecar's inbound listeners): a policy port
    ///   no listener has, and a listener whose port the policy does not name (everyone denied).
    pub fn warnings(
        &self,
        trust_domain: Option<&TrustDomain>,
        listeners: Option<&[(u16, Protocol)]>,
    ) -> Vec<Warning> {
        let mut warnings = Vec::new();
        for port in &self.ports {
            if let Some(listeners) = listeners
                && !listeners.iter().any(|(p, _)| *p == port.port)
            {
                warnings.push(Warning {
                    port: Some(port.port),
                    rule: None,
                    location: port.at,
                    message: format!(
                        "no inbound listener has port {}, so its rules never match",
                        port.port
                    ),
                });
            }
            for (j, rule) in port.rules.iter().enumerate() {
                let message = match trust_domain {
                    Some(td) if rule.id.trust_domain() != td.as_str() => format!(
                        "{} is in trust domain `{}`, not this sidecar's `{td}`: the TLS handshake \
                         refuses peers of another trust domain, so this rule never matches",
                        rule.id.as_str(),
                        rule.id.trust_domain()
                    ),
                    _ => match port.rules[..j]
                        .iter()
                        .position(|earlier| earlier.covers(rule))
                    {
                        Some(i) if rule.covers(&port.rules[i]) => format!(
                            "{} is a duplicate of rule {i}{}, so it never decides anything",
                            rule.id.as_str(),
                            at_line(port.rules[i].at)
                        ),
                        Some(i) => format!(
                            "{} never decides anything: rule {i} ({}){} comes first and allows \
                             every peer and request it allows",
                            rule.id.as_str(),
                            port.rules[i].id.as_str(),
                            at_line(port.rules[i].at)
                        ),
                        None => continue,
                    },
                };
                warnings.push(Warning {
                    port: Some(port.port),
                    rule: Some(j),
                    location: rule.at,
                    message,
                });
            }
        }
        if trust_domain.is_none() {
            let domains: BTreeSet<&str> = self
                .ports
                .iter()
                .flat_map(|p| p.rules.iter().map(|r| r.id.trust_domain()))
                .collect();
            if domains.len() > 1 {
                let names: Vec<String> = domains.iter().map(|d| format!("`{d}`")).collect();
                warnings.push(Warning {
                    port: None,
                    rule: None,
                    location: None,
                    message: format!(
                        "the rules name {} trust domains ({}), but a sidecar accepts peers of its \
                         own trust domain only: the rules for the others never match",
                        names.len(),
                        names.join(", ")
                    ),
                });
            }
        }
        for (port, _) in listeners.unwrap_or_default() {
            if self.port(*port).is_none() {
                warnings.push(Warning {
                    port: Some(*port),
                    rule: None,
                    location: None,
                    message: format!(
                        "the listener on port {port} is not in the policy, so every peer is \
                         denied there"
                    ),
                });
            }
        }
        warnings
    }
}

/// ` (line 4)` for a rule whose place in the file is known.
fn at_line(at: Option<(usize, usize)>) -> String {
    at.map(|(line, _)| format!(" (line {line})"))
        .unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;

    const POLICY: &str = "\
inbound:
  - port: 8080
    protocol: http
    allow:
      - id: spiffe://cluster.local/ns/ops/sa/*
        methods: [GET, POST]
      - id: spiffe://cluster.local/ns/ops/sa/prometheus
        methods: [GET]
        paths: [/metrics]
      - id: spiffe://cluster.local/ns/shop/sa/frontend
      - id: spiffe://other.example/ns/shop/sa/frontend
      - id: spiffe://cluster.local/ns/shop/sa/frontend
      - id: spiffe://cluster.local/ns/ops/sa/admin
        methods: [DELETE]
  - port: 9000
    allow:
      - id: spiffe://cluster.local/ns/shop/sa/frontend
";

    fn summary(warnings: &[Warning]) -> Vec<(Option<u16>, Option<usize>, Option<usize>)> {
        warnings
            .iter()
            .map(|w| (w.port, w.rule, w.location.map(|(line, _)| line)))
            .collect()
    }

    #[test]
    fn rules_that_never_decide() {
        let policy = Policy::parse(POLICY).unwrap();
        let td = TrustDomain::new("cluster.local").unwrap();
        let warnings = policy.warnings(Some(&td), None);
        assert_eq!(
            summary(&warnings),
            [
                (Some(8080), Some(1), Some(7)),
                (Some(8080), Some(3), Some(11)),
                (Some(8080), Some(4), Some(12)),
            ],
            "{warnings:#?}"
        );
        assert!(
            warnings[0]
                .message
                .contains("rule 0 (spiffe://cluster.local/ns/ops/sa/*) (line 5) comes first")
        );
        assert!(
            warnings[1]
                .message
                .contains("trust domain `other.example`, not this sidecar's `cluster.local`")
        );
        assert!(
            warnings[2]
                .message
                .contains("a duplicate of rule 2 (line 10)")
        );

        // Without the trust domain: the two trust domains are named instead.
        let warnings = policy.warnings(None, None);
        assert_eq!(warnings.len(), 3, "{warnings:#?}");
        assert!(
            warnings[2]
                .message
                .contains("2 trust domains (`cluster.local`, `other.example`)")
        );

        // The sidecar's trust domain is the other one: every cluster.local rule is foreign.
        let other = TrustDomain::new("other.example").unwrap();
        let foreign = policy.warnings(Some(&other), None);
        assert_eq!(foreign.len(), 6, "{foreign:#?}");
    }

    #[test]
    fn ports_and_listeners() {
        let policy = Policy::parse(POLICY).unwrap();
        let td = TrustDomain::new("cluster.local").unwrap();
        let listeners = [(8080, Protocol::Http), (7000, Protocol::Tcp)];
        let warnings = policy.warnings(Some(&td), Some(&listeners));
        let about_ports: Vec<_> = warnings.iter().filter(|w| w.rule.is_none()).collect();
        assert_eq!(about_ports.len(), 2, "{warnings:#?}");
        assert_eq!(about_ports[0].port, Some(9000));
        assert_eq!(about_ports[0].location, Some((15, 11)));
        assert!(
            about_ports[0]
                .message
                .contains("no inbound listener has port 9000")
        );
        assert_eq!(about_ports[1].port, Some(7000));
        assert!(about_ports[1].message.contains("not in the policy"));
    }

    #[test]
    fn a_clean_policy_has_no_warnings() {
        let policy = Policy::parse(
            "inbound:\n  - port: 80\n    protocol: http\n    allow:\n      - id: spiffe://td/ns/a/sa/b\n        paths: [/a]\n      - id: spiffe://td/ns/a/sa/*\n      - id: spiffe://td/ns/a/sa/c\n        methods: [GET]\n",
        )
        .unwrap();
        // Rule 1 is broader than rule 0, not shadowed by it; rule 2 is shadowed by rule 1.
        let warnings = policy.warnings(
            Some(&TrustDomain::new("td").unwrap()),
            Some(&[(80, Protocol::Http)]),
        );
        assert_eq!(summary(&warnings), [(Some(80), Some(2), Some(8))]);
        let clean = Policy::parse("inbound:\n  - port: 80\n    allow:\n      - id: spiffe://td/a\n      - id: spiffe://td/b\n").unwrap();
        assert!(
            clean
                .warnings(
                    Some(&TrustDomain::new("td").unwrap()),
                    Some(&[(80, Protocol::Tcp)])
                )
                .is_empty()
        );
    }
}
