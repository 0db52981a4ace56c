//! The inbound allow-list: which peers (by SPIFFE ID) may connect to which inbound port, and on
//! HTTP ports with which methods and paths. Default deny; `audit` mode computes the same decisions
//! but allows, so that a new policy can be tried out against live traffic.
//!
//! Parsing and deciding are pure; the sidecar's policy watcher keeps the current policy up to date
//! with the file on disk. A document is checked whole: every problem is reported with its line and
//! column ([`PolicyError::problems`]), and one problem refuses the whole file. The format, for
//! service owners, is in `docs/policy.md`.
//!
//! ```yaml
//! mode: enforce            # or audit (default: enforce)
//! inbound:
//!   - port: 8080           # the inbound listener's port
//!     protocol: http       # or tcp (default: tcp)
//!     allow:
//!       - id: spiffe://cluster.local/ns/shop/sa/frontend
//!       - id: spiffe://cluster.local/ns/ops/sa/*     # '*' matches exactly one whole path segment
//!         methods: [GET]                             # optional, http only; exact, case-sensitive
//!         paths: [/metrics, /api/*]                  # optional, http only; exact, or '/prefix/*'
//! ```

mod document;
mod explain;
mod lint;
mod node;
mod parse;
mod pattern;
mod suggest;

pub use document::MAX_PROBLEMS;
pub use explain::{ExplainedRule, Explanation};
pub use lint::Warning;
pub use suggest::{MAX_PATHS_PER_PREFIX, Observed, suggest_annotations, suggest_yaml};

/// Reads a policy file within [`MAX_POLICY_BYTES`], refusing what is not a regular file.
pub use parse::read_file;

use std::fmt;
use std::path::{Path, PathBuf};

use crate::SpiffeId;
use serde::Deserialize;

use parse::{PortPolicy, Rule};

/// The largest policy file accepted, in bytes.
pub const MAX_POLICY_BYTES: usize = 1024 * 1024;
/// How deep `[ ]` and `{ }` may nest in a policy. A policy needs two or three levels; the YAML
/// parser's work grows with the depth times the length (100,000 nested brackets, 200 KB, kept a
/// core busy for 17 s), so depth is checked before the parser sees the text.
pub const MAX_FLOW_DEPTH: usize = 64;
/// The most rules (over all ports) a policy may have.
pub const MAX_RULES: usize = 10_000;

/// Whether denials are enforced or only reported.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Mode {
    /// Deny what the rules do not allow.
    #[default]
    Enforce,
    /// Allow everything; decisions still say what the rules would have done.
    Audit,
}

/// How an inbound port is decided: per connection, or per HTTP request.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Protocol {
    #[default]
    Tcp,
    Http,
}

impl Mode {
    /// The word a policy file uses: `enforce` or `audit`.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Enforce => "enforce",
            Self::Audit => "audit",
        }
    }
}

impl Protocol {
    /// The word a policy file uses: `tcp` or `http`.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Tcp => "tcp",
            Self::Http => "http",
        }
    }
}

/// A parsed and fully validated policy. Immutable; a new file makes a new `Policy`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Policy {
    mode: Mode,
    /// Sorted by port, ports unique.
    ports: Vec<PortPolicy>,
}

/// What to do with a connection or request, and why.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Decision {
    /// What to do: true in audit mode even when the rules deny.
    pub allowed: bool,
    /// What the rules say.
    pub would_allow: bool,
    /// The rule that allowed, or why nothing did.
    pub rule: RuleRef,
}

/// The rule behind a [`Decision`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum RuleRef {
    /// The 0-based index of the first matching rule in the port's `allow` list.
    Rule(usize),
    /// The port is in the policy but no rule allows this peer (and request).
    NoRuleMatched,
    /// The port is not listed in the policy.
    PortNotInPolicy,
    /// No policy is loaded.
    NoPolicy,
    /// The request path cannot be matched safely, so it is denied whatever the rules say: it does
    /// not start with '/', or it has a `.` or `..` segment (also as `..;x`), `//`, a backslash, a
    /// NUL, or an escape unsafe to decode: a percent-encoded `/`, `\`, `.` or `%` (`%2f`, `%5c`,
    /// `%2e`, `%25`, any case), control character (`%00`), or overlong UTF-8 (`%c0%ae`), or a `%`
    /// not followed by two hex digits (`%u002e`). The application might resolve such a path to
    /// another one than the path matched (`/public/%2e%2e/admin`).
    UnsafePath,
}

impl RuleRef {
    /// A low-cardinality metric label: `rule-0`, `no-rule-matched`, `port-not-in-policy`,
    /// `no-policy` or `unsafe-path`.
    pub fn label(&self) -> String {
        match self {
            Self::Rule(i) => format!("rule-{i}"),
            Self::NoRuleMatched => "no-rule-matched".to_owned(),
            Self::PortNotInPolicy => "port-not-in-policy".to_owned(),
            Self::NoPolicy => "no-policy".to_owned(),
            Self::UnsafePath => "unsafe-path".to_owned(),
        }
    }
}

/// Short human text for logs and 403 bodies, e.g. `rule 0` or `no rule matched`.
/// [`Policy::describe`] adds the rule's ID pattern.
impl fmt::Display for RuleRef {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Rule(i) => write!(f, "rule {i}"),
            Self::NoRuleMatched => f.write_str("no rule matched"),
            Self::PortNotInPolicy => f.write_str("port not in policy"),
            Self::NoPolicy => f.write_str("no policy loaded"),
            Self::UnsafePath => f.write_str("unsafe request path"),
        }
    }
}

/// The decision when no policy is loaded at all: default deny.
pub fn no_policy_decision() -> Decision {
    Decision {
        allowed: false,
        would_allow: false,
        rule: RuleRef::NoPolicy,
    }
}

/// Why a policy was rejected. YAML-level errors carry the line and column.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum PolicyError {
    #[error("policy file {}: {error}", .path.display())]
    File {
        path: PathBuf,
        error: Box<PolicyError>,
    },
    #[error("cannot read the policy: {0}")]
    Read(std::io::Error),
    #[error("the policy is not a regular file")]
    NotAFile,
    #[error("the policy is larger than the limit of {MAX_POLICY_BYTES} bytes")]
    TooLarge,
    #[error("the policy is not valid utf-8")]
    NotUtf8,
    #[error("the policy is empty")]
    Empty,
    /// Bad YAML, an unknown field, a wrong type or a bad value; `message` names the field.
    #[error("{}{}", LineColumn(.location), Printable(.message))]
    Yaml {
        /// 1-based `(line, column)`, when the YAML library knows it.
        location: Option<(usize, usize)>,
        message: String,
    },
    /// The watch thread could not be started.
    #[error("cannot watch the policy: {0}")]
    Watch(std::io::Error),
    /// A check across fields failed, e.g. a port disagrees with its listener; `field` says where.
    #[error("{}: {}", Printable(.field), Printable(.message))]
    Invalid { field: String, message: String },
    /// Several problems (in file order); the policy is refused as a whole, as for one.
    #[error("{} problems: {}", .0.len(), Joined(.0))]
    Several(Vec<PolicyError>),
}

impl PolicyError {
    /// Each problem on its own: the errors of [`PolicyError::Several`], or this one (without the
    /// file name of [`PolicyError::File`]).
    pub fn problems(&self) -> Vec<&PolicyError> {
        match self {
            Self::File { error, .. } => error.problems(),
            Self::Several(errors) => errors.iter().collect(),
            other => vec![other],
        }
    }
}

struct Joined<'a>(&'a [PolicyError]);

impl fmt::Display for Joined<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, error) in self.0.iter().enumerate() {
            if i > 0 {
                f.write_str("; ")?;
            }
            write!(f, "{error}")?;
        }
        Ok(())
    }
}

/// Checks one SPIFFE ID pattern of an allow list (`*` for one whole path segment); the error
/// quotes the pattern, e.g. `"spiffe://td/a*": '*' must be a whole path segment`.
pub fn check_id_pattern(pattern: &str) -> Result<(), String> {
    pattern::IdPattern::parse(pattern)
        .map(drop)
        .map_err(|e| format!("{}: {e}", pattern::Shown(pattern)))
}

/// Names the file in an error about its content.
pub fn in_file(path: &Path, error: PolicyError) -> PolicyError {
    PolicyError::File {
        path: path.to_owned(),
        error: Box::new(error),
    }
}

/// Text that quotes the policy (a key, a value, the YAML parser's excerpt) with its control
/// characters escaped (`\n`, `\u{1b}`): a policy's author (an annotation on a pod) could
/// otherwise forge lines of the sidecar's log and of `check-policy`'s output, or send a terminal
/// escape sequences, through an error that quotes them.
struct Printable<'a>(&'a str);

impl fmt::Display for Printable<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut rest = self.0;
        while let Some(at) = rest.find(char::is_control) {
            f.write_str(&rest[..at])?;
            let c = rest[at..].chars().next().unwrap_or_default();
            write!(f, "{}", c.escape_default())?;
            rest = &rest[at + c.len_utf8()..];
        }
        f.write_str(rest)
    }
}

struct LineColumn<'a>(&'a Option<(usize, usize)>);

impl fmt::Display for LineColumn<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match *self.0 {
            Some((line, column)) => write!(f, "line {line} column {column}: "),
            None => Ok(()),
        }
    }
}

impl Policy {
    /// Parses and validates a policy document (at most [`MAX_POLICY_BYTES`] and [`MAX_RULES`]).
    pub fn parse(yaml: &str) -> Result<Policy, PolicyError> {
        let (mode, ports) = parse::parse_document(yaml)?;
        Ok(Policy { mode, ports })
    }

    /// The same policy with no positions in a file: for a policy made from another format (the
    /// pod annotations), whose positions would point into text nobody wrote.
    pub(crate) fn without_locations(mut self) -> Self {
        for port in &mut self.ports {
            port.at = None;
            for rule in &mut port.rules {
                rule.at = None;
            }
        }
        self
    }

    /// Reads and parses a policy file; every error names the path.
    pub fn load(path: &Path) -> Result<Policy, PolicyError> {
        parse::read_file(path)
            .and_then(|bytes| Self::parse_bytes(&bytes))
            .map_err(|error| in_file(path, error))
    }

    fn parse_bytes(bytes: &[u8]) -> Result<Policy, PolicyError> {
        Self::parse(std::str::from_utf8(bytes).map_err(|_| PolicyError::NotUtf8)?)
    }

    pub fn mode(&self) -> Mode {
        self.mode
    }

    /// The protocol of an inbound port, or `None` when the port is not in the policy.
    pub fn port_protocol(&self, port: u16) -> Option<Protocol> {
        self.port(port).map(|p| p.protocol)
    }

    /// The connection-level decision. On a TCP port this is the whole decision; on an HTTP port it
    /// says whether any rule for this peer exists (requests are then decided one by one).
    pub fn decide_connection(&self, port: u16, peer: &SpiffeId) -> Decision {
        let Some(port) = self.port(port) else {
            return self.decision(false, RuleRef::PortNotInPolicy);
        };
        self.first_match(port, |rule| rule.id.matches(peer))
    }

    /// The request-level decision on an HTTP port: the first rule whose ID, methods and paths all
    /// match. Anything from a '?' in `path` is ignored. An unsafe path is denied whatever the rules
    /// say (see [`RuleRef::UnsafePath`]). On a TCP port this is [`Policy::decide_connection`].
    pub fn decide_request(&self, port: u16, peer: &SpiffeId, method: &str, path: &str) -> Decision {
        let Some(port_policy) = self.port(port) else {
            return self.decision(false, RuleRef::PortNotInPolicy);
        };
        if port_policy.protocol == Protocol::Tcp {
            return self.decide_connection(port, peer);
        }
        let path = path.split_once('?').map_or(path, |(path, _query)| path);
        if !pattern::is_safe_path(path) {
            return self.decision(false, RuleRef::UnsafePath);
        }
        self.first_match(port_policy, |rule| {
            rule.id.matches(peer) && rule.allows_method(method) && rule.allows_path(path)
        })
    }

    /// `rule` as text with the rule's ID pattern when it names one, e.g.
    /// `rule 1 (spiffe://cluster.local/ns/ops/sa/*)`.
    pub fn describe(&self, port: u16, rule: &RuleRef) -> String {
        let pattern = match rule {
            RuleRef::Rule(i) => self.port(port).and_then(|p| p.rules.get(*i)),
            _ => None,
        };
        match pattern {
            Some(r) => format!("{rule} ({})", r.id.as_str()),
            None => rule.to_string(),
        }
    }

    /// Each port in the policy with its protocol and number of rules, in port order.
    pub fn ports(&self) -> impl Iterator<Item = (u16, Protocol, usize)> + '_ {
        self.ports
            .iter()
            .map(|p| (p.port, p.protocol, p.rules.len()))
    }

    /// Refuses a policy whose port disagrees with the listener on that port: rules for an `http`
    /// port (which may name methods and paths) on a `tcp` listener would open a raw tunnel to any
    /// matching peer, and `tcp` rules on an `http` listener would ignore the request entirely.
    /// `listeners` are `(port, protocol)` of the sidecar's inbound listeners; ports the policy
    /// does not name are fine (everyone is denied there).
    pub fn check_listeners(&self, listeners: &[(u16, Protocol)]) -> Result<(), PolicyError> {
        for &(port, listener) in listeners {
            if let Some(declared) = self.port_protocol(port)
                && declared != listener
            {
                return Err(PolicyError::Invalid {
                    field: format!("inbound port {port}"),
                    message: format!(
                        "the policy declares `protocol: {}` but the listener on port {port} is {}; \
                         make them agree",
                        declared.as_str(),
                        listener.as_str()
                    ),
                });
            }
        }
        Ok(())
    }

    fn port(&self, port: u16) -> Option<&PortPolicy> {
        let i = self.ports.binary_search_by_key(&port, |p| p.port).ok()?;
        self.ports.get(i)
    }

    fn first_match(&self, port: &PortPolicy, matches: impl Fn(&Rule) -> bool) -> Decision {
        match port.rules.iter().position(matches) {
            Some(i) => self.decision(true, RuleRef::Rule(i)),
            None => self.decision(false, RuleRef::NoRuleMatched),
        }
    }

    fn decision(&self, would_allow: bool, rule: RuleRef) -> Decision {
        Decision {
            allowed: would_allow || self.mode == Mode::Audit,
            would_allow,
            rule,
        }
    }
}

#[cfg(test)]
mod tests;
