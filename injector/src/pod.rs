//! The pieces added to a pod: volumes, the sidecar container, and rewritten probes, as JSONPatch
//! operations.

use std::collections::BTreeMap;

use meshid_identity::annotations::MeshAnnotations;
use serde_json::{Value, json};

use super::{InjectConfig, escape};

/// Name of the injected init container (the native sidecar).
pub const SIDECAR_NAME: &str = "meshid-sidecar";
/// The sidecar's admin port: the kubelet's probes (`/healthz`, `/readyz`, `/app-health/...`).
pub const ADMIN_PORT: u16 = 15021;
/// The sidecar's stats port (`--stats-listen`): `/metrics` and `/identity`, for Prometheus and
/// operators, apart from the probes.
pub const STATS_PORT: u16 = 15020;
/// Value of `meshid.io/injected`.
pub(super) const INJECTED_VALUE: &str = "v1";
pub use meshid_identity::annotations::APP_PROBES;

const TOKEN_VOLUME: &str = "meshid-token";
const POD_VOLUME: &str = "meshid-pod";
const TOKEN_DIR: &str = "/var/run/secrets/meshid/token";
const POD_DIR: &str = "/var/run/meshid/pod";
/// The shared volume of the SPIFFE Workload API socket (`meshid.io/workload-api: enabled`).
const WORKLOAD_API_VOLUME: &str = "meshid-workload-api";
/// Where that volume is mounted, in the sidecar and in every app container.
pub const WORKLOAD_API_DIR: &str = "/run/spiffe";
/// The socket: in a directory the sidecar makes (and owns) inside the shared volume.
pub const WORKLOAD_API_SOCKET: &str = "/run/spiffe/workload/api.sock";
/// How SPIFFE clients find the Workload API.
pub const SPIFFE_ENDPOINT_SOCKET: &str = "SPIFFE_ENDPOINT_SOCKET";

/// The sidecar's arguments; its listeners and policy come from the annotations file, its pod IP from
/// the `MESHID_SIDECAR_POD_IP` environment variable (downward API `status.podIP`), the trust bundle from
/// `MESHID_SIDECAR_CA_BUNDLE_PEM`. Probes go to [`ADMIN_PORT`], metrics and `/identity` to [`STATS_PORT`].
pub fn sidecar_args(config: &InjectConfig) -> Vec<String> {
    [
        "run",
        "--annotations",
        &format!("{POD_DIR}/annotations"),
        "--ca-addr",
        &config.ca_addr,
        "--token-file",
        &format!("{TOKEN_DIR}/token"),
        "--admin-listen",
        &format!("0.0.0.0:{ADMIN_PORT}"),
        "--stats-listen",
        &format!("0.0.0.0:{STATS_PORT}"),
    ]
    .iter()
    .map(|s| (*s).to_owned())
    .collect()
}

pub(super) fn has_sidecar(pod: &Value) -> bool {
    ["/spec/initContainers", "/spec/containers"]
        .iter()
        .any(|p| {
            pod.pointer(p)
                .and_then(Value::as_array)
                .is_some_and(|cs| cs.iter().any(|c| c["name"] == SIDECAR_NAME))
        })
}

pub(super) fn add_volumes(
    config: &InjectConfig,
    mesh: &MeshAnnotations,
    pod: &Value,
    ops: &mut Vec<Value>,
    problems: &mut Vec<String>,
) {
    let mut volumes = vec![
        json!({
            "name": TOKEN_VOLUME,
            "projected": {"sources": [{"serviceAccountToken": {
                "audience": "meshid-ca",
                "expirationSeconds": config.token_expiration_seconds,
                "path": "token",
            }}]},
        }),
        json!({
            "name": POD_VOLUME,
            "downwardAPI": {"items": [{"path": "annotations", "fieldRef": {"fieldPath": "metadata.annotations"}}]},
        }),
    ];
    if mesh.workload_api {
        // In memory and small: it only ever holds the socket.
        volumes.push(json!({
            "name": WORKLOAD_API_VOLUME,
            "emptyDir": {"medium": "Memory", "sizeLimit": "1Mi"},
        }));
    }
    match pod.pointer("/spec/volumes").and_then(Value::as_array) {
        None => ops.push(json!({"op": "add", "path": "/spec/volumes", "value": volumes})),
        Some(existing) => {
            for v in volumes {
                if existing.iter().any(|e| e["name"] == v["name"]) {
                    problems.push(format!(
                        "the pod already has a volume named {} (reserved for meshid)",
                        v["name"]
                    ));
                }
                ops.push(json!({"op": "add", "path": "/spec/volumes/-", "value": v}));
            }
        }
    }
}

pub(super) fn add_sidecar(
    config: &InjectConfig,
    mesh: &MeshAnnotations,
    pod: &Value,
    ops: &mut Vec<Value>,
) {
    let probe = |path: &str, failures: u32| {
        json!({
            "httpGet": {"path": path, "port": ADMIN_PORT},
            "periodSeconds": 2,
            "failureThreshold": failures,
        })
    };
    let mut env = vec![
        json!({"name": "MESHID_SIDECAR_POD_IP", "valueFrom": {"fieldRef": {"fieldPath": "status.podIP"}}}),
        json!({"name": "MESHID_LOG_FORMAT", "value": config.log_format}),
        json!({"name": super::BUNDLE_ENV, "value": config.trust_bundle.pem()}),
    ];
    if config.metrics_peer_identity {
        env.push(json!({"name": "MESHID_SIDECAR_METRICS_PEER_IDENTITY", "value": "true"}));
    }
    let mut args = sidecar_args(config);
    let mut mounts = vec![
        json!({"name": TOKEN_VOLUME, "mountPath": TOKEN_DIR, "readOnly": true}),
        json!({"name": POD_VOLUME, "mountPath": POD_DIR, "readOnly": true}),
    ];
    if mesh.workload_api {
        args.extend([
            "--workload-api-socket".to_owned(),
            WORKLOAD_API_SOCKET.to_owned(),
        ]);
        mounts.push(json!({"name": WORKLOAD_API_VOLUME, "mountPath": WORKLOAD_API_DIR}));
    }
    let container = json!({
        "name": SIDECAR_NAME,
        "image": config.image,
        "imagePullPolicy": config.image_pull_policy,
        // A native sidecar: started before the app, ready first, stopped after it; Jobs complete.
        "restartPolicy": "Always",
        "args": args,
        "env": env,
        // Probes on meshid-admin; Prometheus scrapes meshid-stats (`/metrics`).
        "ports": [
            {"name": "meshid-admin", "containerPort": ADMIN_PORT, "protocol": "TCP"},
            {"name": "meshid-stats", "containerPort": STATS_PORT, "protocol": "TCP"},
        ],
        // The app starts only once the sidecar has its certificate and policy.
        "startupProbe": probe("/readyz", 60),
        "readinessProbe": probe("/readyz", 3),
        "livenessProbe": probe("/healthz", 5),
        "resources": config.resources,
        "securityContext": {
            "runAsNonRoot": true,
            "runAsUser": 65532,
            "runAsGroup": 65532,
            "allowPrivilegeEscalation": false,
            "readOnlyRootFilesystem": true,
            "privileged": false,
            "capabilities": {"drop": ["ALL"]},
            "seccompProfile": {"type": "RuntimeDefault"},
        },
        "volumeMounts": mounts,
    });
    match pod
        .pointer("/spec/initContainers")
        .and_then(Value::as_array)
    {
        // First, so that other init containers already have the mesh.
        Some(_) => {
            ops.push(json!({"op": "add", "path": "/spec/initContainers/0", "value": container}))
        }
        None => {
            ops.push(json!({"op": "add", "path": "/spec/initContainers", "value": [container]}))
        }
    }
}

/// `meshid.io/workload-api: enabled`: every app container gets the socket's volume (read-only: a
/// client only connects) and `SPIFFE_ENDPOINT_SOCKET`. A container that already sets that variable
/// or mounts something at [`WORKLOAD_API_DIR`] is a problem: the pod would not get what it asked.
pub(super) fn add_workload_api(pod: &Value, ops: &mut Vec<Value>, problems: &mut Vec<String>) {
    let containers = pod
        .pointer("/spec/containers")
        .and_then(Value::as_array)
        .map(Vec::as_slice)
        .unwrap_or_default();
    let endpoint = format!("unix://{WORKLOAD_API_SOCKET}");
    for (i, c) in containers.iter().enumerate() {
        let name = c["name"].as_str().unwrap_or("?");
        let env = c["env"].as_array();
        if env.is_some_and(|e| e.iter().any(|v| v["name"] == SPIFFE_ENDPOINT_SOCKET)) {
            problems.push(format!(
                "annotation {}: container {name} already sets {SPIFFE_ENDPOINT_SOCKET}",
                meshid_identity::annotations::WORKLOAD_API
            ));
        }
        let mounts = c["volumeMounts"].as_array();
        if mounts.is_some_and(|m| m.iter().any(|v| v["mountPath"] == WORKLOAD_API_DIR)) {
            problems.push(format!(
                "annotation {}: container {name} already mounts something at {WORKLOAD_API_DIR}",
                meshid_identity::annotations::WORKLOAD_API
            ));
        }
        let var = json!({"name": SPIFFE_ENDPOINT_SOCKET, "value": endpoint});
        let mount =
            json!({"name": WORKLOAD_API_VOLUME, "mountPath": WORKLOAD_API_DIR, "readOnly": true});
        for (field, list, item) in [("env", env, var), ("volumeMounts", mounts, mount)] {
            match list {
                Some(_) => ops.push(
                    json!({"op": "add", "path": format!("/spec/containers/{i}/{field}/-"), "value": item}),
                ),
                None => ops.push(
                    json!({"op": "add", "path": format!("/spec/containers/{i}/{field}"), "value": [item]}),
                ),
            }
        }
    }
}

/// Probes of app containers that target an inbound port would reach the sidecar's mTLS listener and
/// fail: HTTP probes move to the sidecar's admin port (`/app-health/CONTAINER/KIND`, the original
/// recorded in [`APP_PROBES`] for the sidecar to forward), TCP probes stay (the sidecar accepts the
/// connection on the port), gRPC probes are refused.
pub(super) fn rewrite_probes(
    mesh: &MeshAnnotations,
    pod: &Value,
    ops: &mut Vec<Value>,
    problems: &mut Vec<String>,
) {
    let Some(containers) = pod.pointer("/spec/containers").and_then(Value::as_array) else {
        return;
    };
    let mut moved = BTreeMap::new();
    for (i, c) in containers.iter().enumerate() {
        let name = c["name"].as_str().unwrap_or_default();
        for kind in ["livenessProbe", "readinessProbe", "startupProbe"] {
            let probe = &c[kind];
            if let Some(get) = probe.get("httpGet") {
                let Some(port) = resolve_port(c, &get["port"]) else {
                    continue;
                };
                if !mesh.inbound.iter().any(|p| p.port == port) {
                    continue;
                }
                let short = kind.trim_end_matches("Probe");
                let mut original = get.clone();
                original["port"] = json!(port);
                moved.insert(format!("{name}/{short}"), original);
                let mut new = json!({
                    "path": format!("/app-health/{name}/{short}"),
                    "port": ADMIN_PORT,
                    "scheme": "HTTP",
                });
                if let Some(headers) = get.get("httpHeaders") {
                    new["httpHeaders"] = headers.clone();
                }
                ops.push(json!({
                    "op": "replace",
                    "path": format!("/spec/containers/{i}/{kind}/httpGet"),
                    "value": new,
                }));
            } else if let Some(grpc) = probe.get("grpc") {
                let port = grpc["port"].as_u64().and_then(|p| u16::try_from(p).ok());
                if port.is_some_and(|p| mesh.inbound.iter().any(|i| i.port == p)) {
                    problems.push(format!(
                        "container {name}: the gRPC {kind} targets inbound port {}, which only \
                         accepts mTLS; use an httpGet or exec probe",
                        port.unwrap_or_default()
                    ));
                }
            }
        }
    }
    if !moved.is_empty() {
        ops.push(json!({
            "op": "add",
            "path": format!("/metadata/annotations/{}", escape(APP_PROBES)),
            "value": Value::Object(moved.into_iter().collect()).to_string(),
        }));
    }
}

/// A probe's port: a number, or the name of one of the container's ports.
fn resolve_port(container: &Value, port: &Value) -> Option<u16> {
    match port {
        Value::Number(n) => n.as_u64().and_then(|p| u16::try_from(p).ok()),
        Value::String(s) => s.parse().ok().or_else(|| {
            container["ports"]
                .as_array()?
                .iter()
                .find(|p| p["name"] == *s)
                .and_then(|p| p["containerPort"].as_u64())
                .and_then(|p| u16::try_from(p).ok())
        }),
        _ => None,
    }
}
