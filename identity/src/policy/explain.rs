//! Why a decision came out as it did: the rule that allowed, or the rule that came closest to
//! allowing and what in it did not match (the identity, the method, the path). Built on the same
//! decisions the sidecar makes ([`Policy::decide_request`], [`Policy::decide_connection`]), so an
//! explanation never disagrees with what happened.

use std::fmt::{self, Write as _};

use super::pattern::PathPattern;
use super::{Decision, Mode, Policy, Protocol, RuleRef};
use crate::SpiffeId;

/// A rule as the policy wrote it, and what in it did not match the call.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ExplainedRule {
    /// 0-based, in the port's `allow` list.
    pub index: usize,
    pub id: String,
    /// `None`: any method.
    pub methods: Option<Vec<String>>,
    /// `None`: any path.
    pub paths: Option<Vec<String>>,
    /// What did not match: `identity`, `method`, `path` (empty for the rule that allowed).
    pub mismatches: Vec<&'static str>,
}

/// A decision with its reasons.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Explanation {
    pub decision: Decision,
    pub mode: Mode,
    /// The port's protocol, `None` when the port is not in the policy.
    pub protocol: Option<Protocol>,
    /// The rule that allowed; else the closest one: a rule for this peer before one for others,
    /// then the fewest mismatches, then the first.
    pub rule: Option<ExplainedRule>,
}

impl Policy {
    /// Decides as [`Policy::decide_request`] (with `request`) or [`Policy::decide_connection`]
    /// and says why.
    pub fn explain(
        &self,
        port: u16,
        peer: &SpiffeId,
        request: Option<(&str, &str)>,
    ) -> Explanation {
        let decision = match request {
            Some((method, path)) => self.decide_request(port, peer, method, path),
            None => self.decide_connection(port, peer),
        };
        let port_policy = self.port(port);
        let protocol = port_policy.map(|p| p.protocol);
        // On a TCP port (and for a connection) only the identity counts.
        let request = request.filter(|_| protocol == Some(Protocol::Http));
        let path = request.map(|(_, p)| p.split_once('?').map_or(p, |(p, _)| p));
        let rule = port_policy.and_then(|p| {
            let explained = p.rules.iter().enumerate().map(|(index, r)| {
                let mut mismatches = Vec::new();
                if !r.id.matches(peer) {
                    mismatches.push("identity");
                }
                if let Some((method, _)) = request
                    && !r.allows_method(method)
                {
                    mismatches.push("method");
                }
                if let Some(path) = path
                    && !r.allows_path(path)
                {
                    mismatches.push("path");
                }
                ExplainedRule {
                    index,
                    id: r.id.as_str().to_owned(),
                    methods: r
                        .methods
                        .as_ref()
                        .map(|m| m.iter().map(|m| m.as_str().to_owned()).collect()),
                    paths: r.paths.as_ref().map(|p| p.iter().map(path_text).collect()),
                    mismatches,
                }
            });
            match decision.rule {
                RuleRef::Rule(i) => explained.into_iter().nth(i),
                // The first of the rules for this peer with the fewest mismatches; failing any for
                // this peer, the first with the fewest.
                _ => explained
                    .min_by_key(|r| (r.mismatches.contains(&"identity"), r.mismatches.len())),
            }
        });
        Explanation {
            decision,
            mode: self.mode,
            protocol,
            rule,
        }
    }
}

fn path_text(p: &PathPattern) -> String {
    match p {
        PathPattern::Exact(s) => s.clone(),
        PathPattern::Prefix(s) => format!("{s}*"),
    }
}

impl Explanation {
    /// `allow`, `deny` or `would deny (audit)`.
    pub fn verdict(&self) -> &'static str {
        match (self.decision.would_allow, self.mode) {
            (true, _) => "allow",
            (false, Mode::Enforce) => "deny",
            (false, Mode::Audit) => "would deny (audit mode lets it through)",
        }
    }
}

impl fmt::Display for ExplainedRule {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "rule {} ({}", self.index, self.id)?;
        if let Some(m) = &self.methods {
            write!(f, ", methods [{}]", m.join(", "))?;
        }
        if let Some(p) = &self.paths {
            write!(f, ", paths [{}]", p.join(", "))?;
        }
        f.write_char(')')
    }
}

/// One line: the verdict, the deciding reason, and the rule that decided or came closest.
impl fmt::Display for Explanation {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if let (Some(rule), RuleRef::Rule(_)) = (&self.rule, self.decision.rule) {
            return write!(f, "{}: {rule}", self.verdict());
        }
        write!(f, "{}: {}", self.verdict(), self.decision.rule)?;
        match (&self.rule, self.decision.rule) {
            (Some(rule), RuleRef::NoRuleMatched) => write!(
                f,
                "; closest: {rule}, which does not match the {}",
                rule.mismatches.join(" and the ")
            ),
            (_, RuleRef::PortNotInPolicy) => {
                f.write_str("; the policy names no rules for this port")
            }
            (_, RuleRef::UnsafePath) => f.write_str(
                "; the path has a `.` or `..` segment, `//`, a backslash, a NUL, a `%` not \
                 followed by two hex digits, or an encoded `/`, `\\`, `.`, `%`, control character \
                 or overlong UTF-8, and is denied whatever the rules say",
            ),
            (None, RuleRef::NoRuleMatched) => f.write_str("; the port's allow list is empty"),
            _ => Ok(()),
        }
    }
}
