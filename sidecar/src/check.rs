//! `meshid-sidecar check-policy`: a policy file (YAML, or a pod's downward-API annotations) checked
//! exactly as the running sidecar loads it, every problem reported with its line, rules that never
//! decide anything warned about, and optionally one caller's connection or request decided by it,
//! without running anything. What a service owner runs before shipping an allow-list, and what
//! answers "why was this call denied?" afterwards.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::process::ExitCode;

use meshid_identity::{SpiffeId, TrustDomain};

use meshid_identity::annotations::{
    ALLOW_PREFIX, INBOUND, annotation_lines, is_downward_api, policy_or_annotations,
};
use meshid_identity::policy::{Policy, PolicyError, Protocol, Warning, read_file};

use crate::cli::{CheckPolicyArgs, EXIT_USAGE};
use crate::settings::parse_inbound;

/// What a check found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    /// The file is valid and no decision was asked for, or the asked one allows.
    Allowed,
    /// The file is valid and the asked decision denies (in audit mode: would deny).
    Denied,
}

/// Why a check could not give an answer.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum CheckError {
    /// The file cannot be read or is invalid: every problem is in it ([`PolicyError::problems`]).
    #[error("{0}")]
    Policy(#[from] PolicyError),
    #[error("--peer: {0}")]
    Peer(String),
    #[error("--inbound: {0}")]
    Inbound(String),
    #[error("--trust-domain: {0}")]
    TrustDomain(String),
}

/// Runs the check, prints the report (stdout) or the problems (stderr, one per line), and maps the
/// result to the exit code: 0 valid (and allowed), 1 invalid file, 2 denied, 64 bad arguments.
pub fn run(args: &CheckPolicyArgs) -> ExitCode {
    match check_policy(args) {
        Ok((report, outcome)) => {
            print!("{report}");
            match outcome {
                Outcome::Allowed => ExitCode::SUCCESS,
                Outcome::Denied => ExitCode::from(2),
            }
        }
        Err(CheckError::Policy(e)) => {
            eprint!("{}", problems_report(&args.file.display().to_string(), &e));
            ExitCode::FAILURE
        }
        Err(e) => {
            eprintln!("meshid-sidecar check-policy: {e}");
            ExitCode::from(EXIT_USAGE)
        }
    }
}

/// `error: FILE: PROBLEM` for each problem, then a line that counts them.
pub fn problems_report(file: &str, error: &PolicyError) -> String {
    let problems = error.problems();
    let mut out = String::new();
    for problem in &problems {
        let _ = writeln!(out, "error: {file}: {problem}");
    }
    let plural = if problems.len() == 1 { "" } else { "s" };
    let _ = writeln!(
        out,
        "meshid-sidecar check-policy: {file}: {} error{plural}; the sidecar refuses this file as a \
         whole (a running one keeps its last good policy)",
        problems.len()
    );
    out
}

/// The report and the outcome of checking `args.file` (and deciding for `args.peer`).
pub fn check_policy(args: &CheckPolicyArgs) -> Result<(String, Outcome), CheckError> {
    let peer = args
        .peer
        .as_deref()
        .map(|p| SpiffeId::parse(p).map_err(|e| CheckError::Peer(e.to_string())))
        .transpose()?;
    let listeners = args
        .inbound
        .iter()
        .map(|s| {
            parse_inbound(s, true)
                .map(|i| (i.listen.port(), i.protocol))
                .map_err(CheckError::Inbound)
        })
        .collect::<Result<Vec<_>, _>>()?;
    let trust_domain = args
        .trust_domain
        .as_deref()
        .map(|td| TrustDomain::new(td).map_err(|e| CheckError::TrustDomain(e.to_string())))
        .transpose()?;
    let bytes = read_file(&args.file)?;
    let text = std::str::from_utf8(&bytes).map_err(|_| PolicyError::NotUtf8)?;
    // The running sidecar's parse, and its refusal of a port whose protocol disagrees with its
    // listener.
    let policy = policy_or_annotations(text)?;
    policy.check_listeners(&listeners)?;
    let mut report = summary(&policy);
    let places = if is_downward_api(text) {
        Places::Annotations(annotation_lines(text))
    } else {
        Places::Yaml
    };
    let listeners = (!args.inbound.is_empty()).then_some(listeners.as_slice());
    let warnings = policy.warnings(trust_domain.as_ref(), listeners);
    for warning in &warnings {
        let _ = writeln!(report, "warning: {}", places.describe(warning));
    }
    if trust_domain.is_none() && warnings.iter().any(|w| w.port.is_none()) {
        report.push_str("  (give --trust-domain, the sidecar's, to see which rules never match)\n");
    }
    let (Some(peer), Some(port)) = (peer, args.port) else {
        return Ok((report, Outcome::Allowed));
    };
    if let Some(td) = &trust_domain
        && peer.trust_domain_name() != td.as_str()
    {
        let _ = writeln!(
            report,
            "{peer} -> port {port}: deny: the TLS handshake refuses a peer of trust domain `{}` \
             (this sidecar's is `{td}`)",
            peer.trust_domain_name()
        );
        return Ok((report, Outcome::Denied));
    }
    let request = match (policy.port_protocol(port), &args.path) {
        (Some(Protocol::Http), Some(path)) => Some((args.method.as_str(), path.as_str())),
        _ => None,
    };
    let asked = request.map_or_else(
        || "connection".to_owned(),
        |(method, path)| format!("{method} {path}"),
    );
    // The running sidecar's explanation of the same decision (`meshid-sidecar explain`).
    let explained = policy.explain(port, &peer, request);
    let _ = writeln!(report, "{peer} -> port {port} {asked}: {explained}");
    let mut outcome = if explained.decision.would_allow {
        Outcome::Allowed
    } else {
        Outcome::Denied
    };
    // The sidecar decides each method a `?_method=` in the query names (on the path without the
    // query), each a decision of its own: so does this, each on a line as `explain` prints it.
    if let Some((method, path)) = request {
        let (bare, query) = path
            .split_once('?')
            .map_or((path, None), |(p, q)| (p, Some(q)));
        for named in crate::form::query_method_overrides(query) {
            if named == method {
                continue;
            }
            let explained = policy.explain(port, &peer, Some((named.as_str(), bare)));
            let _ = writeln!(
                report,
                "  and the query's _method={named}, decided as the sidecar does:"
            );
            let _ = writeln!(report, "{peer} -> port {port} {named} {bare}: {explained}");
            if !explained.decision.would_allow {
                outcome = Outcome::Denied;
            }
        }
    }
    Ok((report, outcome))
}

/// `policy OK: mode enforce` and one line per port.
fn summary(policy: &Policy) -> String {
    let mut out = format!("policy OK: mode {}\n", policy.mode().as_str());
    for (port, protocol, rules) in policy.ports() {
        let plural = if rules == 1 { "" } else { "s" };
        let _ = writeln!(
            out,
            "  port {port} ({}): {rules} rule{plural}",
            protocol.as_str()
        );
    }
    out
}

/// How a warning's place is named: a YAML line and column, or an annotation and its line.
enum Places {
    Yaml,
    Annotations(BTreeMap<String, usize>),
}

impl Places {
    /// `line 9 column 13: port 8080 rule 2: ...`, or
    /// `line 2: annotation meshid.io/allow-8080: rule 2: ...`.
    fn describe(&self, w: &Warning) -> String {
        let mut out = String::new();
        match self {
            Self::Yaml => {
                if let Some((line, column)) = w.location {
                    let _ = write!(out, "line {line} column {column}: ");
                }
                if let Some(port) = w.port {
                    let _ = write!(out, "port {port}");
                    if let Some(rule) = w.rule {
                        let _ = write!(out, " rule {rule}");
                    }
                    out.push_str(": ");
                }
            }
            Self::Annotations(lines) => {
                if let Some(port) = w.port {
                    let key = match w.rule {
                        Some(_) => format!("{ALLOW_PREFIX}{port}"),
                        None => INBOUND.to_owned(),
                    };
                    if let Some(line) = lines.get(&key) {
                        let _ = write!(out, "line {line}: ");
                    }
                    let _ = write!(out, "annotation {key}: ");
                    if let Some(rule) = w.rule {
                        let _ = write!(out, "rule {rule}: ");
                    }
                }
            }
        }
        out.push_str(&w.message);
        out
    }
}

#[cfg(test)]
mod tests {
    use std::path::PathBuf;

    use super::*;

    fn args(file: PathBuf, extra: &[&str]) -> CheckPolicyArgs {
        use clap::Parser;
        let mut argv = vec!["meshid-sidecar", "check-policy", file.to_str().unwrap()];
        argv.extend(extra);
        match crate::cli::Cli::try_parse_from(argv).unwrap().command {
            crate::cli::Command::CheckPolicy(args) => args,
            _ => panic!("check-policy"),
        }
    }

    #[test]
    fn every_error_is_printed_on_its_own_line() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("policy.yaml");
        std::fs::write(
            &file,
            "inbound:\n  - port: 0\n    allow:\n      - id: spiffe://td/a*\n  - port: 9\n    allow: x\n",
        )
        .unwrap();
        let Err(CheckError::Policy(error)) = check_policy(&args(file, &[])) else {
            panic!("an invalid file")
        };
        let report = problems_report("p.yaml", &error);
        let lines: Vec<&str> = report.lines().collect();
        assert_eq!(lines.len(), 4, "{report}");
        assert!(lines[0].starts_with("error: p.yaml: line 2 column 11: inbound[0].port: "));
        assert!(lines[1].starts_with("error: p.yaml: line 4 column 13: inbound[0].allow[0].id: "));
        assert!(lines[2].starts_with("error: p.yaml: line 6 column 12: inbound[1].allow: "));
        assert!(lines[3].contains("p.yaml: 3 errors; the sidecar refuses this file"));
    }

    #[test]
    fn warnings_name_their_place() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("policy.yaml");
        std::fs::write(
            &file,
            "inbound:\n  - port: 80\n    allow:\n      - id: spiffe://td/ns/a/sa/*\n      - id: spiffe://td/ns/a/sa/b\n      - id: spiffe://other/ns/a/sa/b\n",
        )
        .unwrap();
        let (report, outcome) = check_policy(&args(file.clone(), &[])).unwrap();
        assert_eq!(outcome, Outcome::Allowed);
        assert!(report.starts_with("policy OK: mode enforce\n"), "{report}");
        assert!(report.contains("warning: line 5 column 13: port 80 rule 1: spiffe://td/ns/a/sa/b never decides anything: rule 0"), "{report}");
        assert!(
            report.contains("warning: the rules name 2 trust domains"),
            "{report}"
        );
        assert!(report.contains("give --trust-domain"), "{report}");
        let (report, _) = check_policy(&args(file.clone(), &["--trust-domain", "td"])).unwrap();
        assert!(report.contains("warning: line 6 column 13: port 80 rule 2: spiffe://other/ns/a/sa/b is in trust domain `other`, not this sidecar's `td`"), "{report}");
        assert!(!report.contains("give --trust-domain"), "{report}");
        // A peer of another trust domain is refused before any rule, as the handshake does.
        let peer = [
            "--trust-domain",
            "td",
            "--peer",
            "spiffe://other/ns/a/sa/b",
            "--port",
            "80",
        ];
        let (report, outcome) = check_policy(&args(file.clone(), &peer)).unwrap();
        assert_eq!(outcome, Outcome::Denied, "{report}");
        assert!(
            report.contains("deny: the TLS handshake refuses"),
            "{report}"
        );
        assert!(matches!(
            check_policy(&args(file, &["--trust-domain", "Not A Domain"])),
            Err(CheckError::TrustDomain(_))
        ));

        let annotations = dir.path().join("annotations");
        std::fs::write(
            &annotations,
            "meshid.io/allow-80=\"spiffe://td/a, spiffe://td/a\"\nmeshid.io/inbound=\"80\"\n",
        )
        .unwrap();
        let (report, _) = check_policy(&args(annotations, &["--trust-domain", "td"])).unwrap();
        assert!(report.contains("warning: line 1: annotation meshid.io/allow-80: rule 1: spiffe://td/a is a duplicate of rule 0"), "{report}");
    }
}
