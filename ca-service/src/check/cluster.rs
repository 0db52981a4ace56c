//! The checks against the cluster: the injector's webhook certificate against the caBundle the
//! API server uses, and the CA's service-account issuer and keys against the API server's.

use std::collections::BTreeSet;
use std::net::SocketAddr;

use base64::Engine;
use serde::Deserialize;

use super::certs::{self, ChainProblem};
use super::checks::Replica;
use super::probe::{kube_get, peer_chain};
use super::{CheckConfig, Finding, Status};
use crate::auth::JwksSummary;

#[derive(Deserialize)]
struct WebhookConfiguration {
    #[serde(default)]
    webhooks: Vec<Webhook>,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct Webhook {
    name: String,
    client_config: ClientConfig,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct ClientConfig {
    #[serde(default)]
    ca_bundle: String,
    service: Option<ServiceRef>,
    url: Option<String>,
}

#[derive(Deserialize)]
struct ServiceRef {
    name: String,
    namespace: String,
    port: Option<u16>,
}

/// Where the webhook's caBundle comes from, by the chart's `injector.tls.source`.
const CA_BUNDLE_FIX: &str = "the caBundle must hold the CA of the injector's certificate: with \
    injector.tls.source webhookCert it is ca.trustBundle (helm upgrade --set-file \
    ca.trustBundle=ca/bundle.pem), with secret injector.tls.caBundle, with certManager \
    cert-manager's cainjector fills it (check the webhook's cert-manager.io/inject-ca-from \
    annotation and the cainjector's log)";

fn no_kube(check: &'static str) -> Finding {
    Finding::skip(
        check,
        "no API server: run it in a pod, or give --kube-api URL with --kube-token-file and --kube-ca-file",
    )
}

/// `webhook` (the caBundle, the name, validity) and `webhook-expiry`.
pub(super) async fn webhook(config: &CheckConfig, now: i64) -> Vec<Finding> {
    const NAME: &str = "webhook";
    const EXPIRY: &str = "webhook-expiry";
    let Some(kube) = &config.kube else {
        return vec![no_kube(NAME), no_kube(EXPIRY)];
    };
    let path = format!(
        "/apis/admissionregistration.k8s.io/v1/mutatingwebhookconfigurations/{}",
        config.webhook
    );
    let parsed = match kube_get(kube, &path, config.timeout).await {
        Ok(body) => serde_json::from_slice::<WebhookConfiguration>(&body)
            .map_err(|e| format!("not a MutatingWebhookConfiguration: {e}")),
        Err(e) => Err(e),
    };
    let webhooks = match parsed {
        Ok(c) if !c.webhooks.is_empty() => c.webhooks,
        Ok(_) => {
            return vec![
                Finding::fail(
                    NAME,
                    format!(
                        "MutatingWebhookConfiguration {} has no webhooks",
                        config.webhook
                    ),
                    "reinstall the chart with injector.enabled=true",
                ),
                Finding::skip(EXPIRY, "no webhook to check"),
            ];
        }
        // Not allowed to look is not a finding about the webhook: the check could not run.
        Err(e) if e.contains("answered 401") || e.contains("answered 403") => {
            return vec![
                Finding::skip(
                    NAME,
                    format!(
                        "MutatingWebhookConfiguration {}: {e} (the token needs get on \
                         mutatingwebhookconfigurations; docs/check.md has a ClusterRole)",
                        config.webhook
                    ),
                ),
                Finding::skip(EXPIRY, "the webhook configuration could not be read"),
            ];
        }
        Err(e) => {
            return vec![
                Finding::fail(
                    NAME,
                    format!("MutatingWebhookConfiguration {}: {e}", config.webhook),
                    "is the injector installed (chart: injector.enabled) and --webhook its name (default meshid-injector)? The token needs get on mutatingwebhookconfigurations",
                ),
                Finding::skip(EXPIRY, "the webhook configuration could not be read"),
            ];
        }
    };
    let mut problems = Vec::new();
    let mut fixes = BTreeSet::new();
    let mut checked = Vec::new();
    let mut leaf_expiry: Option<(i64, String)> = None;
    let mut done = BTreeSet::new();
    for w in &webhooks {
        let (dns, port) = match (&w.client_config.service, &w.client_config.url) {
            (Some(s), _) => (
                format!("{}.{}.svc", s.name, s.namespace),
                s.port.unwrap_or(443),
            ),
            (None, Some(url)) => match crate::auth::jwks_remote::Target::parse(url) {
                Ok(t) => (t.host, t.port),
                Err(e) => {
                    problems.push(format!("{}: url {e}", w.name));
                    continue;
                }
            },
            (None, None) => {
                problems.push(format!("{}: clientConfig names no service or url", w.name));
                continue;
            }
        };
        if !done.insert((w.client_config.ca_bundle.clone(), dns.clone(), port)) {
            continue;
        }
        let roots = base64::engine::general_purpose::STANDARD
            .decode(w.client_config.ca_bundle.trim())
            .map_err(|e| format!("caBundle is not base64: {e}"))
            .and_then(|pem| certs::parse_pem(&pem).map_err(|e| format!("caBundle {e}")));
        let roots = match roots {
            Ok(r) => r,
            Err(e) => {
                problems.push(format!("{}: {e}", w.name));
                fixes.insert(CA_BUNDLE_FIX.to_owned());
                continue;
            }
        };
        let connect = config
            .injector_addr
            .clone()
            .unwrap_or_else(|| format!("{dns}:{port}"));
        let chain = match peer_chain(&connect, &dns, config.timeout).await {
            Ok(c) => c,
            Err(e) => {
                problems.push(format!(
                    "{}: cannot read the injector's certificate: {e}",
                    w.name
                ));
                fixes.insert(format!(
                    "is the injector running (kubectl -n {ns} get pods -l app.kubernetes.io/component=injector)? From outside the cluster {dns} does not resolve: kubectl -n {ns} port-forward svc/{svc} 9443:{port} and --injector-addr 127.0.0.1:9443",
                    ns = config.namespace,
                    svc = dns.split('.').next().unwrap_or("meshid-injector"),
                ));
                continue;
            }
        };
        let leaf_not_after = chain.first().and_then(|l| certs::not_after(l).ok());
        if let Some(na) = leaf_not_after {
            leaf_expiry = Some((na, dns.clone()));
        }
        let renew = format!(
            "issue a new one: meshid-ca webhook-cert --dir ./ca --dns {dns} --out-dir ./injector-tls --force, then replace the injector's TLS Secret (kubectl -n {ns} create secret tls ... --dry-run=client -o yaml | kubectl apply -f -); no restart is needed (injector.tls.source certManager: see the Certificate's status, kubectl -n {ns} describe certificate)",
            ns = config.namespace
        );
        // The leaf's expiry is webhook-expiry's to report: an expired leaf is judged here (chain
        // and name) as of its last valid second; if the chain was not valid yet then either, only
        // the expiry is reported.
        let verdict = match certs::verify_server(&chain, &roots, &dns, now) {
            Err(ChainProblem::Expired) if leaf_not_after.is_some_and(|na| na <= now) => {
                let last = leaf_not_after.unwrap_or(now) - 1;
                match certs::verify_server(&chain, &roots, &dns, last) {
                    Err(ChainProblem::NotYetValid) => Ok(()),
                    other => other,
                }
            }
            other => other,
        };
        match verdict {
            Ok(()) => checked.push(dns.clone()),
            Err(ChainProblem::UnknownIssuer) => {
                problems.push(format!("{}: the injector's certificate does not chain to the webhook's caBundle, so the API server refuses to call it (pods that ask for a sidecar fail to start, or start without one)", w.name));
                fixes.insert(format!("either the caBundle or the certificate comes from another CA: {CA_BUNDLE_FIX}; or {renew}"));
            }
            Err(ChainProblem::WrongName { covers, .. }) => {
                problems.push(format!("{}: the injector's certificate covers {covers}, not {dns} (the Service the webhook calls)", w.name));
                fixes.insert(renew);
            }
            Err(e) => {
                problems.push(format!("{}: the injector's certificate {e}", w.name));
                fixes.insert(renew);
            }
        }
    }
    let main = if problems.is_empty() {
        Finding::ok(
            NAME,
            format!(
                "the injector's certificate chains to the caBundle and covers {} ({} webhook(s))",
                checked.join(", "),
                webhooks.len()
            ),
        )
    } else {
        Finding::fail(
            NAME,
            problems.join("; "),
            fixes.into_iter().collect::<Vec<_>>().join("; "),
        )
    };
    let expiry = match leaf_expiry {
        None => Finding::skip(
            EXPIRY,
            "the injector's certificate could not be read (see webhook)",
        ),
        Some((na, dns)) => match certs::expiry(
            "the injector's serving certificate",
            na,
            now,
            config.thresholds.webhook,
        ) {
            (Status::Ok, text) => Finding::ok(EXPIRY, text),
            (s, text) => Finding {
                check: EXPIRY,
                status: s,
                summary: text,
                fix: Some(format!(
                    "meshid-ca webhook-cert --dir ./ca --dns {dns} --out-dir ./injector-tls --force, then replace the injector's TLS Secret; no restart is needed"
                )),
            },
        },
    };
    vec![main, expiry]
}

pub(super) async fn jwks(config: &CheckConfig, replicas: &[Replica]) -> Finding {
    const NAME: &str = "jwks";
    let Some(kube) = &config.kube else {
        return no_kube(NAME);
    };
    let summaries: Vec<(SocketAddr, &Result<Option<JwksSummary>, String>)> = replicas
        .iter()
        .filter_map(|r| r.jwks.as_ref().map(|j| (r.addr, j)))
        .collect();
    if summaries.is_empty() {
        return Finding::skip(NAME, "no CA admin port answered (see ca-admin)");
    }
    #[derive(Deserialize)]
    struct Discovery {
        issuer: String,
    }
    #[derive(Deserialize)]
    struct Jwk {
        kid: Option<String>,
    }
    #[derive(Deserialize)]
    struct Jwks {
        keys: Vec<Jwk>,
    }
    let cluster_fix = "the token needs the ClusterRole system:service-account-issuer-discovery";
    let issuer = match kube_get(kube, "/.well-known/openid-configuration", config.timeout).await {
        Ok(body) => match serde_json::from_slice::<Discovery>(&body) {
            Ok(d) => d.issuer,
            Err(e) => {
                return Finding::fail(
                    NAME,
                    format!(
                        "the API server's /.well-known/openid-configuration is not a discovery document: {e}"
                    ),
                    cluster_fix,
                );
            }
        },
        Err(e) => return Finding::fail(NAME, format!("the cluster's issuer: {e}"), cluster_fix),
    };
    let cluster: BTreeSet<String> = match kube_get(kube, "/openid/v1/jwks", config.timeout).await {
        Ok(body) => match serde_json::from_slice::<Jwks>(&body) {
            Ok(j) => j.keys.into_iter().filter_map(|k| k.kid).collect(),
            Err(e) => {
                return Finding::fail(
                    NAME,
                    format!("the API server's /openid/v1/jwks is not a JWKS: {e}"),
                    cluster_fix,
                );
            }
        },
        Err(e) => return Finding::fail(NAME, format!("the cluster's keys: {e}"), cluster_fix),
    };
    let mut warnings = Vec::new();
    for (addr, summary) in summaries {
        let s = match summary {
            Ok(Some(s)) => s,
            Ok(None) => {
                return Finding::skip(
                    NAME,
                    format!(
                        "the CA at {addr} verifies no service-account tokens (no --jwks, --jwks-url or --jwks-discovery)"
                    ),
                );
            }
            Err(e) => {
                return Finding::fail(
                    NAME,
                    format!("{addr}: {e}"),
                    "is --admin the meshid CA's admin port, and is the CA this version or newer?",
                );
            }
        };
        let refresh_fix = if let Some(path) = s.source.strip_prefix("file ") {
            format!(
                "the CA reads its keys from {path}: kubectl get --raw /openid/v1/jwks > jwks.json; helm upgrade --set-file ca.jwks=jwks.json (or drop ca.jwks to let the CA fetch them itself)"
            )
        } else {
            "the CA fetches its keys itself: see meshid_ca_jwks_refreshes_total{result=\"error\"} and the CA's log (unreachable API server, 401/403: its ServiceAccount needs the ClusterRole system:service-account-issuer-discovery)".to_owned()
        };
        if s.issuer != issuer {
            return Finding::fail(
                NAME,
                format!(
                    "the CA at {addr} expects tokens from issuer {:?}, the cluster's issuer is {issuer:?}: every service-account token is refused (wrong_issuer)",
                    s.issuer
                ),
                format!("set the CA's --issuer to {issuer} (chart: ca.issuer)"),
            );
        }
        let ours: BTreeSet<String> = s.kids.iter().cloned().collect();
        let missing: Vec<&String> = cluster.difference(&ours).collect();
        if !missing.is_empty() {
            return Finding::fail(
                NAME,
                format!(
                    "the CA at {addr} ({}) lacks the cluster's key(s) {missing:?}: tokens they sign are refused (unknown_key)",
                    s.source
                ),
                refresh_fix,
            );
        }
        let stale: Vec<&String> = ours.difference(&cluster).collect();
        if !stale.is_empty() {
            warnings.push((
                format!(
                    "the CA at {addr} still trusts key(s) {stale:?} the cluster no longer publishes"
                ),
                refresh_fix,
            ));
        }
    }
    if let Some((what, fix)) = warnings.into_iter().next() {
        return Finding::warn(NAME, what, fix);
    }
    Finding::ok(
        NAME,
        format!(
            "the CA holds the cluster's {} key(s) and expects its issuer {issuer}",
            cluster.len()
        ),
    )
}
