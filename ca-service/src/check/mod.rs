//! `meshid-ca check`: an installed mesh checked from outside, like `linkerd check`. Every check
//! ends in one [`Finding`]: ok, a warning, a failure (with what is wrong and how to fix it), or
//! skipped (with why: a check that could not run is never reported as passing).
//!
//! [`certs`] and [`prom`] are pure (certificates made by rcgen in their tests); [`probe`] does the
//! network (CA admin port, TLS handshakes, the API server); `checks` runs the checks (those of the
//! CA itself), `cluster` those against the API server, `fleet` those of sidecars.

pub mod certs;
mod checks;
mod cluster;
mod fleet;
pub mod probe;
pub mod prom;

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use serde::Serialize;

pub use checks::run;

/// How a check ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Status {
    Ok,
    Warn,
    Fail,
    Skip,
}

impl Status {
    /// The plain word (pipes, `NO_COLOR`) and the terminal mark.
    fn marks(self) -> (&'static str, &'static str, &'static str) {
        match self {
            Self::Ok => ("ok", "\u{2714}", "\x1b[32m"),
            Self::Warn => ("warn", "\u{203c}", "\x1b[33m"),
            Self::Fail => ("FAIL", "\u{2718}", "\x1b[31m"),
            Self::Skip => ("skip", "-", "\x1b[2m"),
        }
    }
}

/// The outcome of one check.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Finding {
    /// A stable name (`ca-admin`, `webhook`, ...), for scripts.
    pub check: &'static str,
    pub status: Status,
    /// What was found (for a failure: what is wrong).
    pub summary: String,
    /// How to fix it (failures and warnings).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub fix: Option<String>,
}

impl Finding {
    pub fn ok(check: &'static str, summary: impl Into<String>) -> Self {
        Self {
            check,
            status: Status::Ok,
            summary: summary.into(),
            fix: None,
        }
    }

    pub fn skip(check: &'static str, why: impl Into<String>) -> Self {
        Self {
            check,
            status: Status::Skip,
            summary: why.into(),
            fix: None,
        }
    }

    pub fn fail(check: &'static str, what: impl Into<String>, fix: impl Into<String>) -> Self {
        Self {
            check,
            status: Status::Fail,
            summary: what.into(),
            fix: Some(fix.into()),
        }
    }

    pub fn warn(check: &'static str, what: impl Into<String>, fix: impl Into<String>) -> Self {
        Self {
            check,
            status: Status::Warn,
            summary: what.into(),
            fix: Some(fix.into()),
        }
    }
}

/// How long before expiry each kind of certificate is reported, matching the chart's alerts
/// (`MeshidIntermediateExpiresSoon`, `MeshidRootExpiresSoon`, `MeshidInjectorCertificateExpiresSoon`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Thresholds {
    pub intermediate: Duration,
    pub root: Duration,
    pub webhook: Duration,
}

impl Default for Thresholds {
    fn default() -> Self {
        Self {
            intermediate: Duration::from_secs(7 * 86400),
            root: Duration::from_secs(30 * 86400),
            webhook: Duration::from_secs(14 * 86400),
        }
    }
}

/// Where the trust bundle comes from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum BundleSource {
    /// A PEM file (the CA directory's `bundle.pem`).
    File(PathBuf),
    /// The chart's ConfigMap (key `bundle.pem`), read from the API server.
    ConfigMap { namespace: String, name: String },
}

/// How to reach the API server.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KubeAccess {
    /// `https://host[:port]`, without a trailing slash.
    pub api: String,
    pub token_file: PathBuf,
    pub ca_file: PathBuf,
}

/// Everything `meshid-ca check` needs, checked.
#[derive(Debug, Clone)]
pub struct CheckConfig {
    /// Admin address of every CA replica.
    pub admins: Vec<SocketAddr>,
    /// The CA directory's admin token, which opens the rotation reports (`None`: not asked for).
    pub admin_token: Option<crate::admin_token::AdminToken>,
    /// The CA's gRPC address (`HOST:PORT`) and the name its certificate must carry.
    pub ca_addr: Option<(String, String)>,
    pub bundle: Option<BundleSource>,
    pub kube: Option<KubeAccess>,
    /// The release namespace.
    pub namespace: String,
    /// The MutatingWebhookConfiguration's name.
    pub webhook: String,
    /// Where to reach the injector (default: the Service the webhook configuration names).
    pub injector_addr: Option<String>,
    /// Sidecar admin (stats) addresses to scrape.
    pub sidecar_admins: Vec<SocketAddr>,
    pub thresholds: Thresholds,
    /// Per network exchange.
    pub timeout: Duration,
}

/// All findings, in the order the checks ran.
#[derive(Debug, Clone, Default, Serialize)]
pub struct Report {
    pub findings: Vec<Finding>,
}

impl Report {
    /// Whether any check failed (the command then exits 1).
    pub fn failed(&self) -> bool {
        self.findings.iter().any(|f| f.status == Status::Fail)
    }

    /// Plain text, or marks and colour for a terminal. Strings from the network are escaped.
    pub fn render(&self, terminal: bool) -> String {
        let width = self
            .findings
            .iter()
            .map(|f| f.check.len())
            .max()
            .unwrap_or(0);
        let mut out = String::new();
        for f in &self.findings {
            let (word, mark, colour) = f.status.marks();
            let head = if terminal {
                format!("{colour}{mark}\x1b[0m")
            } else {
                format!("{word:<4}")
            };
            out.push_str(&format!(
                "{head} {:<width$}  {}\n",
                f.check,
                shown(&f.summary)
            ));
            if let Some(fix) = &f.fix {
                out.push_str(&format!("     {:<width$}  fix: {}\n", "", shown(fix)));
            }
        }
        let count = |s: Status| self.findings.iter().filter(|f| f.status == s).count();
        out.push_str(&format!(
            "{} ok, {} warnings, {} failed, {} skipped\n",
            count(Status::Ok),
            count(Status::Warn),
            count(Status::Fail),
            count(Status::Skip)
        ));
        out
    }
}

/// A string as a terminal may show it: control characters escaped, newlines kept as `\n`.
fn shown(s: &str) -> String {
    s.chars()
        .flat_map(|c| {
            if c.is_control() {
                c.escape_default().collect::<Vec<_>>()
            } else {
                vec![c]
            }
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn plain_output_has_words_and_no_escapes() {
        let report = Report {
            findings: vec![
                Finding::ok("ca-admin", "ready"),
                Finding::fail("webhook", "bad\x1b[31m", "do this"),
                Finding::skip("jwks", "no --kube-api"),
            ],
        };
        let plain = report.render(false);
        assert!(!plain.contains('\x1b'), "{plain:?}");
        assert!(plain.contains("ok   ca-admin  ready\n"), "{plain}");
        assert!(plain.contains("FAIL webhook   bad\\u{1b}[31m\n"), "{plain}");
        assert!(plain.contains("fix: do this"), "{plain}");
        assert!(
            plain.ends_with("1 ok, 0 warnings, 1 failed, 1 skipped\n"),
            "{plain}"
        );
        assert!(report.failed());
        assert!(report.render(true).contains('\u{2718}'));
    }
}
