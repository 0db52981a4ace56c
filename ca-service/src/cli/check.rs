//! Flags of `meshid-ca check`, checked all at once into a [`CheckConfig`].

use std::path::PathBuf;
use std::time::Duration;

use clap::Args;
use meshid_identity::parse_duration;
use rustls_pki_types::ServerName;

use super::{Problems, resolve_admin};
use crate::auth::jwks_remote::{self, Target};
use crate::check::{BundleSource, CheckConfig, KubeAccess, Thresholds};

/// How `check` prints its findings.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, clap::ValueEnum)]
pub enum Output {
    /// One line per check (marks and colour only on a terminal without NO_COLOR), fixes below.
    #[default]
    Text,
    /// One JSON document: {"findings": [{"check", "status", "summary", "fix"}]}.
    Json,
}

#[derive(Debug, Args)]
pub struct CheckArgs {
    /// Admin address of every CA replica (repeatable), e.g. 127.0.0.1:9090, or NAME:PORT standing
    /// for every address the name resolves to (the chart's headless meshid-ca-admin.meshid.svc:9090).
    #[arg(long = "admin", env = "MESHID_CA_ADMIN", value_delimiter = ',')]
    pub admins: Vec<String>,
    /// The CA directory (as `meshid-ca rotate --dir`): its admin token opens the CAs' rotation
    /// reports. Without it the rotation check is skipped.
    #[arg(long, env = "MESHID_CA_DIR", value_name = "DIR")]
    pub dir: Option<PathBuf>,
    /// The CA's gRPC address, HOST:PORT (e.g. meshid-ca.meshid.svc:8443): its certificate must
    /// chain to the trust bundle and name HOST (or --ca-name).
    #[arg(long, env = "MESHID_CA_CA_ADDR", value_name = "HOST:PORT")]
    pub ca_addr: Option<String>,
    /// The name the CA's certificate must carry (default: the host of --ca-addr).
    #[arg(long, env = "MESHID_CA_CA_NAME", value_name = "NAME")]
    pub ca_name: Option<String>,
    /// The trust bundle (PEM), e.g. the CA directory's bundle.pem. Default: the chart's ConfigMap
    /// (--bundle-configmap in --namespace), read from the API server.
    #[arg(long, env = "MESHID_CA_BUNDLE", value_name = "FILE")]
    pub bundle: Option<PathBuf>,
    /// The chart's trust-bundle ConfigMap (key bundle.pem), read when no --bundle is given.
    #[arg(
        long,
        env = "MESHID_CA_BUNDLE_CONFIGMAP",
        default_value = "meshid-trust-bundle"
    )]
    pub bundle_configmap: String,
    /// The namespace meshid is installed in (the Helm release's).
    #[arg(long, env = "MESHID_CA_NAMESPACE", default_value = "meshid")]
    pub namespace: String,
    /// The injector's MutatingWebhookConfiguration.
    #[arg(long, env = "MESHID_CA_WEBHOOK", default_value = "meshid-injector")]
    pub webhook: String,
    /// Where to reach the injector, HOST:PORT (default: the Service the webhook configuration
    /// names, SERVICE.NAMESPACE.svc:PORT, which resolves only inside the cluster).
    #[arg(long, env = "MESHID_CA_INJECTOR_ADDR", value_name = "HOST:PORT")]
    pub injector_addr: Option<String>,
    /// The API server, https://HOST[:PORT]. Default in a pod: KUBERNETES_SERVICE_HOST and
    /// KUBERNETES_SERVICE_PORT. Without one, the checks that need it are skipped.
    #[arg(long, env = "MESHID_CA_KUBE_API", value_name = "URL")]
    pub kube_api: Option<String>,
    /// Bearer token for the API server.
    #[arg(
        long,
        env = "MESHID_CA_KUBE_TOKEN_FILE",
        value_name = "FILE",
        default_value = jwks_remote::DEFAULT_TOKEN_FILE
    )]
    pub kube_token_file: PathBuf,
    /// PEM bundle the API server's certificate must chain to.
    #[arg(
        long,
        env = "MESHID_CA_KUBE_CA_FILE",
        value_name = "FILE",
        default_value = jwks_remote::DEFAULT_CA_FILE
    )]
    pub kube_ca_file: PathBuf,
    /// A sidecar's stats address (repeatable; injected sidecars: POD_IP:15020) whose certificate
    /// expiry and last renewal are checked.
    #[arg(
        long = "sidecar-admin",
        env = "MESHID_CA_SIDECAR_ADMIN",
        value_delimiter = ','
    )]
    pub sidecar_admins: Vec<String>,
    /// Warn when the signing intermediate expires within this (the chart's alert: 7d).
    #[arg(long, env = "MESHID_CA_WARN_INTERMEDIATE", default_value = "7d")]
    pub warn_intermediate: String,
    /// Warn when a root expires within this (the chart's alert: 30d).
    #[arg(long, env = "MESHID_CA_WARN_ROOT", default_value = "30d")]
    pub warn_root: String,
    /// Warn when the injector's serving certificate expires within this (the chart's alert: 14d).
    #[arg(long, env = "MESHID_CA_WARN_WEBHOOK", default_value = "14d")]
    pub warn_webhook: String,
    /// Time allowed for each network exchange.
    #[arg(long, env = "MESHID_CA_TIMEOUT", default_value = "5s")]
    pub timeout: String,
    /// Output format.
    #[arg(long, env = "MESHID_CA_OUTPUT", value_enum, default_value_t = Output::Text)]
    pub output: Output,
}

/// `HOST:PORT` split, the host without brackets.
fn host_port(value: &str) -> Result<(String, u16), String> {
    let (host, port) = value
        .rsplit_once(':')
        .ok_or_else(|| format!("{value:?} is not HOST:PORT"))?;
    let port = port
        .parse::<u16>()
        .map_err(|_| format!("{value:?} is not HOST:PORT"))?;
    let host = host.trim_start_matches('[').trim_end_matches(']');
    if host.is_empty() {
        return Err(format!("{value:?} is not HOST:PORT"));
    }
    Ok((host.to_owned(), port))
}

impl CheckArgs {
    /// Checks every flag; returns all problems at once. `in_cluster` is `KUBERNETES_SERVICE_HOST`
    /// and `KUBERNETES_SERVICE_PORT` when set (the caller reads the environment).
    pub fn into_config(
        self,
        in_cluster: Option<(String, String)>,
    ) -> Result<(CheckConfig, Output), Vec<String>> {
        let mut p = Problems::default();
        let mut admins = Vec::new();
        for a in self.admins.iter().filter(|a| !a.is_empty()) {
            if let Some(addrs) = p.check("--admin", resolve_admin(a).map_err(strip_flag)) {
                for addr in addrs {
                    if !admins.contains(&addr) {
                        admins.push(addr);
                    }
                }
            }
        }
        let mut sidecar_admins = Vec::new();
        for a in self.sidecar_admins.iter().filter(|a| !a.is_empty()) {
            if let Some(addrs) = p.check("--sidecar-admin", resolve_admin(a).map_err(strip_flag)) {
                sidecar_admins.extend(addrs);
            }
        }
        let ca_addr = self.ca_addr.as_deref().and_then(|a| {
            let (host, _) = p.check("--ca-addr", host_port(a))?;
            let name = self.ca_name.clone().unwrap_or(host);
            if ServerName::try_from(name.clone()).is_err() {
                p.0.push(format!("--ca-name: {name:?} is not a DNS name or IP"));
                return None;
            }
            Some((a.to_owned(), name))
        });
        if let Some(a) = &self.injector_addr {
            p.check("--injector-addr", host_port(a));
        }
        let thresholds = Thresholds {
            intermediate: p
                .check(
                    "--warn-intermediate",
                    parse_duration(&self.warn_intermediate),
                )
                .unwrap_or_default(),
            root: p
                .check("--warn-root", parse_duration(&self.warn_root))
                .unwrap_or_default(),
            webhook: p
                .check("--warn-webhook", parse_duration(&self.warn_webhook))
                .unwrap_or_default(),
        };
        let timeout = p.check("--timeout", parse_duration(&self.timeout));
        if timeout.is_some_and(|t| t < Duration::from_millis(100)) {
            p.0.push("--timeout: must be at least 100ms".into());
        }
        let kube = match (&self.kube_api, in_cluster) {
            (Some(url), _) => {
                let url = url.trim_end_matches('/').to_owned();
                if let Err(e) = Target::parse(&url) {
                    p.0.push(format!("--kube-api: {e}"));
                }
                for (flag, file) in [
                    ("--kube-token-file", &self.kube_token_file),
                    ("--kube-ca-file", &self.kube_ca_file),
                ] {
                    if !file.is_file() {
                        p.0.push(format!(
                            "{flag}: {} is not a readable file (needed by --kube-api)",
                            file.display()
                        ));
                    }
                }
                Some(url)
            }
            (None, Some((host, port))) if self.kube_token_file.is_file() => {
                let host = if host.contains(':') {
                    format!("[{host}]")
                } else {
                    host
                };
                Some(format!("https://{host}:{port}"))
            }
            (None, _) => None,
        }
        .map(|api| KubeAccess {
            api,
            token_file: self.kube_token_file.clone(),
            ca_file: self.kube_ca_file.clone(),
        });
        let bundle = match (&self.bundle, &kube) {
            (Some(file), _) => {
                if !file.is_file() {
                    p.0.push(format!(
                        "--bundle: {} is not a readable file",
                        file.display()
                    ));
                }
                Some(BundleSource::File(file.clone()))
            }
            (None, Some(_)) => Some(BundleSource::ConfigMap {
                namespace: self.namespace.clone(),
                name: self.bundle_configmap.clone(),
            }),
            (None, None) => None,
        };
        let admin_token = match &self.dir {
            None => None,
            Some(dir) => match crate::admin_token::AdminToken::load(dir) {
                Ok(Some(token)) => Some(token),
                Ok(None) => {
                    p.0.push(format!(
                        "--dir: {} has no admin token (neither admin-token nor jwt.key)",
                        dir.display()
                    ));
                    None
                }
                Err(e) => {
                    p.0.push(format!("--dir: {e}"));
                    None
                }
            },
        };
        if !p.0.is_empty() {
            return Err(p.0);
        }
        let config = CheckConfig {
            admin_token,
            admins,
            ca_addr,
            bundle,
            kube,
            namespace: self.namespace,
            webhook: self.webhook,
            injector_addr: self.injector_addr,
            sidecar_admins,
            thresholds,
            timeout: timeout.unwrap_or(Duration::from_secs(5)),
        };
        Ok((config, self.output))
    }
}

/// `resolve_admin` names `--admin` in its messages; the caller names the flag.
fn strip_flag(e: String) -> String {
    e.strip_prefix("--admin: ").map(str::to_owned).unwrap_or(e)
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;

    #[derive(Parser)]
    struct Wrap {
        #[command(flatten)]
        args: CheckArgs,
    }

    fn parse(args: &[&str]) -> Result<(CheckConfig, Output), Vec<String>> {
        let mut all = vec!["check"];
        all.extend_from_slice(args);
        Wrap::try_parse_from(all).unwrap().args.into_config(None)
    }

    #[test]
    fn every_problem_is_named_at_once() {
        let problems = parse(&[
            "--admin",
            "nope",
            "--ca-addr",
            "no-port",
            "--warn-root",
            "soon",
            "--kube-api",
            "http://x",
            "--kube-token-file",
            "/nonexistent/token",
        ])
        .unwrap_err();
        for flag in [
            "--admin: ",
            "--ca-addr: ",
            "--warn-root: ",
            "--kube-api: ",
            "--kube-token-file: ",
        ] {
            assert!(
                problems.iter().any(|p| p.starts_with(flag)),
                "{flag} in {problems:?}"
            );
        }
    }

    #[test]
    fn every_flag_has_help() {
        use clap::CommandFactory;
        let command = crate::cli::Cli::command();
        let check = command
            .get_subcommands()
            .find(|s| s.get_name() == "check")
            .expect("check subcommand");
        assert_eq!(
            meshid_runtime::cli::undocumented_args(check),
            Vec::<String>::new()
        );
    }

    #[test]
    fn defaults_skip_what_has_no_input() {
        let (config, output) = parse(&["--ca-addr", "localhost:8443"]).unwrap();
        assert_eq!(output, Output::Text);
        assert!(config.kube.is_none() && config.bundle.is_none() && config.admins.is_empty());
        assert_eq!(
            config.ca_addr,
            Some(("localhost:8443".into(), "localhost".into()))
        );
        assert_eq!(config.thresholds, Thresholds::default());
    }
}
