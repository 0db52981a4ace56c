//! The checks of `meshid-ca check`, in the order they run, and those of the CA itself (admin port,
//! gRPC TLS, rotation, expiries). The CA's admin ports are asked once for all checks;
//! [`super::cluster`] asks the API server, [`super::fleet`] looks at sidecars.

use std::collections::BTreeSet;
use std::net::SocketAddr;

use meshid_runtime::time::unix_now;
use rustls_pki_types::CertificateDer;
use serde::Deserialize;

use super::certs::{self, ChainProblem};
use super::probe::{MAX_ADMIN_BODY, admin_get, kube_get, peer_chain};
use super::prom::Scrape;
use super::{BundleSource, CheckConfig, Finding, Report, Status};
use crate::auth::JwksSummary;
use crate::rotation::RotationReport;

/// What one CA replica's admin port told us.
pub(super) struct Replica {
    pub(super) addr: SocketAddr,
    /// `/readyz`: `Err` when it could not be asked or is not ready.
    pub(super) ready: Result<(), String>,
    pub(super) rotation: Option<Result<RotationReport, String>>,
    pub(super) metrics: Option<Scrape>,
    /// `Ok(None)`: the CA verifies no service-account tokens.
    pub(super) jwks: Option<Result<Option<JwksSummary>, String>>,
}

impl Replica {
    async fn ask(addr: SocketAddr, config: &CheckConfig) -> Self {
        let t = config.timeout;
        let ready = match admin_get(addr, "/readyz", t).await {
            Ok((200, _)) => Ok(()),
            Ok((status, body)) => Err(format!(
                "not ready (HTTP {status}: {})",
                String::from_utf8_lossy(&body[..body.len().min(200)]).trim()
            )),
            Err(e) => {
                return Self {
                    addr,
                    ready: Err(e),
                    rotation: None,
                    metrics: None,
                    jwks: None,
                };
            }
        };
        let rotation = match &config.admin_token {
            None => None,
            Some(token) => Some(
                match crate::admin_token::signed_get(token, addr, "/rotation", t, MAX_ADMIN_BODY)
                    .await
                    .map(|r| (r.status, r.body))
                {
                    Ok((200, body)) => serde_json::from_slice(&body)
                        .map_err(|e| format!("/rotation is not a rotation report: {e}")),
                    Ok((401, _)) => Err(
                        "/rotation refused the admin token of --dir (HTTP 401): is it the \
                         directory this CA serves?"
                            .to_owned(),
                    ),
                    Ok((status, _)) => Err(format!("/rotation answered HTTP {status}")),
                    Err(e) => Err(e),
                },
            ),
        };
        let metrics = match admin_get(addr, "/metrics", t).await {
            Ok((200, body)) => Some(Scrape::parse(&String::from_utf8_lossy(&body))),
            _ => None,
        };
        let jwks = Some(match admin_get(addr, "/jwks-status", t).await {
            Ok((200, body)) => serde_json::from_slice(&body)
                .map(Some)
                .map_err(|e| format!("/jwks-status is not a JWKS summary: {e}")),
            Ok((404, _)) => Ok(None),
            Ok((status, _)) => Err(format!("/jwks-status answered HTTP {status}")),
            Err(e) => Err(e),
        });
        Self {
            addr,
            ready,
            rotation,
            metrics,
            jwks,
        }
    }

    pub(super) fn report(&self) -> Option<&RotationReport> {
        self.rotation.as_ref()?.as_ref().ok()
    }
}

/// Runs every check.
pub async fn run(config: &CheckConfig) -> Report {
    let now = unix_now();
    let mut replicas = Vec::new();
    for addr in &config.admins {
        replicas.push(Replica::ask(*addr, config).await);
    }
    let bundle = load_bundle(config).await;
    let mut findings = vec![
        ca_admin(config, &replicas),
        ca_tls(config, bundle.as_ref(), now).await,
        rotation(config, &replicas),
        ca_expiry(config, &replicas, bundle.as_ref(), now),
    ];
    findings.extend(super::cluster::webhook(config, now).await);
    findings.push(super::cluster::jwks(config, &replicas).await);
    findings.push(super::fleet::sidecars(&replicas, now));
    if !config.sidecar_admins.is_empty() {
        findings.push(super::fleet::sidecar_certs(config, now).await);
    }
    Report { findings }
}

pub(super) fn kube_hint(config: &CheckConfig) -> String {
    format!(
        "check the CA pods: kubectl -n {ns} get pods -l app.kubernetes.io/component=ca, and their \
         logs; from outside the cluster, kubectl -n {ns} port-forward svc/meshid-ca-admin 9090 and \
         --admin 127.0.0.1:9090",
        ns = config.namespace
    )
}

fn ca_admin(config: &CheckConfig, replicas: &[Replica]) -> Finding {
    const NAME: &str = "ca-admin";
    if replicas.is_empty() {
        return Finding::skip(
            NAME,
            "no --admin given (every CA replica's admin address, e.g. meshid-ca-admin.meshid.svc:9090)",
        );
    }
    let bad: Vec<String> = replicas
        .iter()
        .filter_map(|r| r.ready.as_ref().err().map(|e| format!("{}: {e}", r.addr)))
        .collect();
    if bad.is_empty() {
        Finding::ok(
            NAME,
            format!("{} CA replica(s) answer /readyz", replicas.len()),
        )
    } else {
        Finding::fail(NAME, bad.join("; "), kube_hint(config))
    }
}

async fn load_bundle(
    config: &CheckConfig,
) -> Option<Result<(String, Vec<CertificateDer<'static>>), String>> {
    match config.bundle.as_ref()? {
        BundleSource::File(path) => Some(
            std::fs::read(path)
                .map_err(|e| e.to_string())
                .and_then(|pem| certs::parse_pem(&pem))
                .map(|roots| (format!("--bundle {}", path.display()), roots))
                .map_err(|e| format!("--bundle {}: {e}", path.display())),
        ),
        BundleSource::ConfigMap { namespace, name } => {
            let kube = config.kube.as_ref()?;
            let what = format!("ConfigMap {namespace}/{name}");
            #[derive(Deserialize)]
            struct ConfigMap {
                #[serde(default)]
                data: std::collections::BTreeMap<String, String>,
            }
            let path = format!("/api/v1/namespaces/{namespace}/configmaps/{name}");
            Some(
                async {
                    let body = kube_get(kube, &path, config.timeout).await?;
                    let cm: ConfigMap = serde_json::from_slice(&body)
                        .map_err(|e| format!("not a ConfigMap: {e}"))?;
                    let pem = cm.data.get("bundle.pem").ok_or("has no bundle.pem")?;
                    certs::parse_pem(pem.as_bytes())
                }
                .await
                .map(|roots| (what.clone(), roots))
                .map_err(|e| format!("{what}: {e}")),
            )
        }
    }
}

type Bundle = Result<(String, Vec<CertificateDer<'static>>), String>;

async fn ca_tls(config: &CheckConfig, bundle: Option<&Bundle>, now: i64) -> Finding {
    const NAME: &str = "ca-tls";
    let Some((addr, name)) = &config.ca_addr else {
        return Finding::skip(
            NAME,
            "no --ca-addr given (the CA's gRPC address, e.g. meshid-ca.meshid.svc:8443)",
        );
    };
    let (source, roots) = match bundle {
        None => {
            return Finding::skip(
                NAME,
                "no trust bundle: give --bundle FILE, or reach the API server to read the chart's ConfigMap",
            );
        }
        Some(Err(e)) => {
            return Finding::fail(
                NAME,
                format!("trust bundle: {e}"),
                "give the CA directory's bundle.pem (--bundle), or fix the chart's trust-bundle ConfigMap: helm upgrade --set-file ca.trustBundle=ca/bundle.pem",
            );
        }
        Some(Ok(b)) => b,
    };
    let chain = match peer_chain(addr, name, config.timeout).await {
        Ok(chain) => chain,
        Err(e) => {
            return Finding::fail(
                NAME,
                format!("the CA's gRPC port: {e}"),
                format!(
                    "is the CA running, and is --ca-addr its Service and gRPC port (chart: ca.grpcPort)? {}",
                    kube_hint(config)
                ),
            );
        }
    };
    match certs::verify_server(&chain, roots, name, now) {
        Ok(()) => Finding::ok(
            NAME,
            format!(
                "{addr} presents a certificate for {name} that chains to the trust bundle ({source}, {} root(s))",
                roots.len()
            ),
        ),
        Err(ChainProblem::UnknownIssuer) => Finding::fail(
            NAME,
            format!(
                "the CA at {addr} presents a certificate that does not chain to the trust bundle ({source}): sidecars given that bundle cannot reach it"
            ),
            "the trust bundle must be the CA directory's bundle.pem: helm upgrade --set-file ca.trustBundle=ca/bundle.pem (the injector passes it to new sidecars; restart pods injected with the wrong one)",
        ),
        Err(ChainProblem::WrongName { covers, .. }) => Finding::fail(
            NAME,
            format!("the CA's certificate covers {covers}, not {name}"),
            format!(
                "serve with --san {name} (MESHID_CA_SAN), or give --ca-addr with the name sidecars use"
            ),
        ),
        Err(e) => Finding::fail(
            NAME,
            format!("the CA's serving certificate {e}"),
            "the CA renews its serving certificate itself from its signing intermediate: check the intermediate (meshid-ca rotate status) and the CA's log",
        ),
    }
}

fn rotation(config: &CheckConfig, replicas: &[Replica]) -> Finding {
    const NAME: &str = "rotation";
    if config.admin_token.is_none() && !replicas.is_empty() {
        return Finding::skip(
            NAME,
            "not asked: the CAs' rotation reports need the CA directory's admin token (--dir)",
        );
    }
    let reports: Vec<(SocketAddr, &RotationReport)> = replicas
        .iter()
        .filter_map(|r| r.report().map(|rep| (r.addr, rep)))
        .collect();
    if let Some((addr, e)) = replicas.iter().find_map(|r| match &r.rotation {
        Some(Err(e)) => Some((r.addr, e)),
        _ => None,
    }) {
        return Finding::fail(
            NAME,
            format!("{addr}: {e}"),
            "is --admin the meshid CA's admin port (chart: ca.adminPort, 9090)?",
        );
    }
    let Some((_, first)) = reports.first() else {
        return Finding::skip(NAME, "no CA admin port answered (see ca-admin)");
    };
    let versions: BTreeSet<u64> = reports.iter().map(|(_, r)| r.bundle_version).collect();
    if versions.len() > 1 {
        let each: Vec<String> = reports
            .iter()
            .map(|(a, r)| format!("{a}: v{}", r.bundle_version))
            .collect();
        return Finding::fail(
            NAME,
            format!(
                "CA replicas serve different trust bundle versions ({})",
                each.join(", ")
            ),
            "a replica has not picked up the latest CA Secret: check every replica mounts the same Secret and its log; kubelet updates the volume within a minute or two",
        );
    }
    let moving: Vec<String> = first
        .authorities
        .iter()
        .filter(|a| a.state == "prepared" || a.state == "retiring")
        .map(|a| format!("authority {} is {}", a.name, a.state))
        .collect();
    if !moving.is_empty() {
        return Finding::warn(
            NAME,
            format!(
                "a rotation is in progress: {}; next step: {}",
                moving.join(", "),
                first.next_step
            ),
            "meshid-ca rotate status --dir ./ca --admin ... names what the next step waits for; then rotate activate / rotate retire (the chart README's runbook). The alert MeshidRotationStepWaiting fires after an hour",
        );
    }
    Finding::ok(
        NAME,
        format!(
            "trust bundle v{} on {} replica(s), no rotation in progress",
            first.bundle_version,
            reports.len()
        ),
    )
}

fn ca_expiry(
    config: &CheckConfig,
    replicas: &[Replica],
    bundle: Option<&Bundle>,
    now: i64,
) -> Finding {
    const NAME: &str = "ca-expiry";
    let t = config.thresholds;
    let mut items: Vec<(Status, String, &str)> = Vec::new();
    const INTERMEDIATE_FIX: &str = "meshid-ca rotate intermediate --dir ./ca, then meshid-ca secret --dir ./ca | kubectl apply --server-side -f -";
    const ROOT_FIX: &str =
        "rotate the root: meshid-ca rotate prepare, activate, retire (the chart README's runbook)";
    if let Some(report) = replicas.iter().find_map(Replica::report) {
        for a in report.authorities.iter().filter(|a| a.state != "gone") {
            let (s, text) = certs::expiry(
                &format!("root of authority {} ({})", a.name, a.state),
                a.root_not_after,
                now,
                t.root,
            );
            items.push((s, text, ROOT_FIX));
            if a.state == "active" {
                let (s, text) = certs::expiry(
                    "the signing intermediate",
                    a.intermediate_not_after,
                    now,
                    t.intermediate,
                );
                items.push((s, text, INTERMEDIATE_FIX));
            }
        }
    }
    if let Some(Ok((source, roots))) = bundle {
        for (i, root) in roots.iter().enumerate() {
            match certs::not_after(root) {
                Ok(na) => {
                    let (s, text) =
                        certs::expiry(&format!("root {} of {source}", i + 1), na, now, t.root);
                    items.push((s, text, ROOT_FIX));
                }
                Err(e) => items.push((
                    Status::Fail,
                    format!("root {} of {source}: {e}", i + 1),
                    ROOT_FIX,
                )),
            }
        }
    }
    if items.is_empty() {
        return Finding::skip(
            NAME,
            "neither a CA admin port nor a trust bundle to read expiries from",
        );
    }
    let worst = items
        .iter()
        .map(|(s, ..)| *s)
        .max_by_key(|s| match s {
            Status::Fail => 2,
            Status::Warn => 1,
            _ => 0,
        })
        .unwrap_or(Status::Ok);
    let shown: Vec<&(Status, String, &str)> = items.iter().filter(|(s, ..)| *s == worst).collect();
    let summary = shown
        .iter()
        .map(|(_, t, _)| t.as_str())
        .collect::<Vec<_>>()
        .join("; ");
    let fixes: BTreeSet<&str> = shown.iter().map(|(.., f)| *f).collect();
    let fix = fixes.into_iter().collect::<Vec<_>>().join("; ");
    match worst {
        Status::Fail => Finding::fail(NAME, summary, fix),
        Status::Warn => Finding::warn(NAME, summary, fix),
        _ => Finding::ok(NAME, summary),
    }
}
