//! `meshid-sidecar check-policy`: a policy file (YAML, or a pod's downward-API annotations) checked
//! exactly as the running sidecar loads it, and optionally one caller's connection or request
//! decided by it, without running anything. What a service owner runs before shipping an
//! allow-list, and what answers "why was this call denied?" afterwards.

use std::fmt::Write as _;
use std::process::ExitCode;

use meshid_identity::SpiffeId;

use meshid_identity::annotations::policy_or_annotations;
use meshid_identity::policy::{Mode, Policy, PolicyError, Protocol, read_file};

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
    #[error("{0}")]
    Policy(#[from] PolicyError),
    #[error("--peer: {0}")]
    Peer(String),
    #[error("--inbound: {0}")]
    Inbound(String),
}

/// Runs the check, prints the report (stdout) or the problem (stderr), and maps the result to the
/// exit code: 0 valid (and allowed), 1 invalid file, 2 denied, 64 bad arguments.
pub fn run(args: &CheckPolicyArgs) -> ExitCode {
    match check_policy(args) {
        Ok((report, outcome)) => {
            print!("{report}");
            match outcome {
                Outcome::Allowed => ExitCode::SUCCESS,
                Outcome::Denied => ExitCode::from(2),
            }
        }
        Err(e @ (CheckError::Peer(_) | CheckError::Inbound(_))) => {
            eprintln!("meshid-sidecar check-policy: {e}");
            ExitCode::from(EXIT_USAGE)
        }
        Err(e) => {
            eprintln!("meshid-sidecar check-policy: {}: {e}", args.file.display());
            ExitCode::FAILURE
        }
    }
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
    let bytes = read_file(&args.file)?;
    let text = std::str::from_utf8(&bytes).map_err(|_| PolicyError::NotUtf8)?;
    let policy = policy_or_annotations(text)?;
    // As the running sidecar refuses it: a port whose protocol disagrees with its listener.
    policy.check_listeners(&listeners)?;
    let mut report = summary(&policy);
    let (Some(peer), Some(port)) = (peer, args.port) else {
        return Ok((report, Outcome::Allowed));
    };
    let (asked, decision) = match (policy.port_protocol(port), &args.path) {
        (Some(Protocol::Http), Some(path)) => (
            format!("{} {path}", args.method),
            policy.decide_request(port, &peer, &args.method, path),
        ),
        _ => (
            "connection".to_owned(),
            policy.decide_connection(port, &peer),
        ),
    };
    let verdict = match (decision.would_allow, policy.mode()) {
        (true, _) => "allow",
        (false, Mode::Enforce) => "deny",
        (false, Mode::Audit) => "would deny (audit mode lets it through)",
    };
    let _ = writeln!(
        report,
        "{peer} -> port {port} {asked}: {verdict}: {}",
        policy.describe(port, &decision.rule)
    );
    let outcome = if decision.would_allow {
        Outcome::Allowed
    } else {
        Outcome::Denied
    };
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
