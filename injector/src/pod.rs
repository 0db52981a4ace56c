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
/// The sidecar's own small state that outlives its container (not the pod): the trust bundle it
/// last received (`--bundle-cache`), so that a sidecar restarted after a CA rotation still reaches
/// the CA, whose serving certificate chains to a root newer than the one in this pod's spec.
const STATE_VOLUME: &str = "meshid-state";
const STATE_DIR: &str = "/var/run/meshid/state";
/// The bundle cache in it.
const BUNDLE_CACHE: &str = "/var/run/meshid/state/bundle.pem";
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

/// The most containers (app and init containers together) a pod may have to be injected: a pod's
/// patch grows with them (probes moved, the Workload API socket mounted in each), and real pods
/// have a handful. Far more is a pod built to make the injector work, refused by name.
pub const MAX_CONTAINERS: usize = 128;

/// Every container of the pod: init containers, then app containers.
fn all_containers(pod: &Value) -> impl Iterator<Item = &Value> {
    ["/spec/initContainers", "/spec/containers"]
        .into_iter()
        .filter_map(|p| pod.pointer(p).and_then(Value::as_array))
        .flatten()
}

/// Containers the injector will not build a patch for: more than [`MAX_CONTAINERS`], or a name
/// that is not a DNS label of at most 63 characters (the API server refuses such a pod anyway,
/// after the webhook; the name goes into the probes' paths). Checked before any patch is built,
/// so the patch never grows with an absurd pod.
pub(super) fn container_shape_problems(pod: &Value) -> Vec<String> {
    let count = all_containers(pod).count();
    if count > MAX_CONTAINERS {
        return vec![format!(
            "the pod has {count} containers; meshid injects pods of at most {MAX_CONTAINERS}"
        )];
    }
    all_containers(pod)
        .filter_map(|c| {
            let name = c["name"].as_str().unwrap_or_default();
            let label = !name.is_empty()
                && name.len() <= 63
                && name
                    .bytes()
                    .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
                && !name.starts_with('-')
                && !name.ends_with('-');
            (!label).then(|| {
                let shown: String = name.chars().take(64).collect();
                format!("container {shown:?}: the name is not a DNS label of at most 63 characters")
            })
        })
        .collect()
}

/// Containers that declare one of the sidecar's own ports: the app would take the port the
/// kubelet probes the sidecar on (or its metrics port), or the sidecar would fail to start.
pub(super) fn reserved_container_ports(pod: &Value) -> Vec<String> {
    let mut problems = Vec::new();
    for c in all_containers(pod) {
        let name = c["name"].as_str().unwrap_or_default();
        let ports = c["ports"].as_array().map(Vec::as_slice).unwrap_or_default();
        for (port, what) in [(ADMIN_PORT, "admin"), (STATS_PORT, "stats")] {
            if ports.iter().any(|p| p["containerPort"] == port) {
                problems.push(format!(
                    "container {name}: declares port {port}, the sidecar's {what} port"
                ));
            }
        }
    }
    problems
}

/// The volumes the injector adds: a pod may neither declare a volume of one of these names
/// ([`add_volumes`]) nor mount one in a container of its own ([`reserved_mounts`]); the only mounts
/// of them are the ones the injector writes (the sidecar's, and the Workload API socket's,
/// read-only, in app containers).
pub const RESERVED_VOLUMES: [&str; 4] =
    [TOKEN_VOLUME, POD_VOLUME, STATE_VOLUME, WORKLOAD_API_VOLUME];

/// Every container list of a pod, with what messages call a container in it.
const CONTAINER_LISTS: [(&str, &str); 3] = [
    ("/spec/initContainers", "init container"),
    ("/spec/containers", "container"),
    ("/spec/ephemeralContainers", "ephemeral container"),
];

/// Every container of the pod, ephemeral ones included, with what messages call it.
fn containers_of(pod: &Value) -> impl Iterator<Item = (&'static str, &Value)> {
    CONTAINER_LISTS
        .into_iter()
        .flat_map(move |(pointer, what)| {
            pod.pointer(pointer)
                .and_then(Value::as_array)
                .into_iter()
                .flatten()
                .map(move |c| (what, c))
        })
}

/// A pod that asks for the sidecar but declares a container of its name itself (a copy of an
/// injected pod, or a fake sidecar with forged annotations that would look meshed): refused, since
/// admitting it unchanged would skip every check, and injecting beside it would make two.
pub(super) fn declared_sidecar(pod: &Value) -> Option<String> {
    containers_of(pod)
        .find(|(_, c)| c["name"] == SIDECAR_NAME)
        .map(|(what, _)| {
            format!(
                "{what} {SIDECAR_NAME}: the pod declares the injector's own container (a copy of \
                 an injected pod?); remove it from the pod spec and let the injector add it"
            )
        })
}

/// Containers (init, app and ephemeral) that mount one of [`RESERVED_VOLUMES`]: an app that
/// mounted the sidecar's state could plant roots in its bundle cache, or read its token.
pub(super) fn reserved_mounts(pod: &Value) -> Vec<String> {
    containers_of(pod)
        .flat_map(|(what, c)| reserved_mounts_of(what, c))
        .collect()
}

fn reserved_mounts_of(what: &str, container: &Value) -> Vec<String> {
    let name = container["name"].as_str().unwrap_or_default();
    container["volumeMounts"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|m| m["name"].as_str())
        .filter(|v| RESERVED_VOLUMES.contains(v))
        .map(|v| {
            format!(
                "{what} {name}: mounts volume {v}, which is reserved for meshid's sidecar (only \
                 the injector mounts it)"
            )
        })
        .collect()
}

/// What an ephemeral container (added through `pods/ephemeralcontainers`, e.g. `kubectl debug`)
/// may not do in a pod: take the sidecar's name, mount one of [`RESERVED_VOLUMES`], or target the
/// sidecar's process (sharing its process namespace, it could read the sidecar's token and key
/// through `/proc`).
pub(super) fn ephemeral_container_problems(container: &Value) -> Vec<String> {
    let name = container["name"].as_str().unwrap_or_default();
    let mut problems = Vec::new();
    if name == SIDECAR_NAME {
        problems.push(format!(
            "ephemeral container {SIDECAR_NAME}: the name is the injector's sidecar's"
        ));
    }
    if container["targetContainerName"] == SIDECAR_NAME {
        problems.push(format!(
            "ephemeral container {name}: targets {SIDECAR_NAME}, whose processes hold the pod's \
             token and private key; target an app container instead"
        ));
    }
    problems.extend(reserved_mounts_of("ephemeral container", container));
    problems
}

/// What a pod UPDATE (`pod`; `old` before it) changes of the injector's sidecar: removed or
/// renamed, moved to another list, given another image (the only field of a container an update
/// may change), or a container of its name added. Pods are compared by what every list holds
/// under [`SIDECAR_NAME`].
pub(super) fn sidecar_changes(pod: &Value, old: &Value) -> Vec<String> {
    let sidecars = |p: &'_ Value| -> Vec<(&'static str, Value)> {
        containers_of(p)
            .filter(|(_, c)| c["name"] == SIDECAR_NAME)
            .map(|(what, c)| (what, c["image"].clone()))
            .collect()
    };
    let (before, after) = (sidecars(old), sidecars(pod));
    if before == after {
        return Vec::new();
    }
    let problem = match (before.as_slice(), after.as_slice()) {
        ([(what, image)], [(now, new_image)]) if what == now => format!(
            "{what} {SIDECAR_NAME}: set by the injector; an update may not change its image \
             (from {image} to {new_image}): roll a new sidecar image out through the chart and \
             recreate the pod"
        ),
        (before, after) if after.len() > before.len() => format!(
            "container {SIDECAR_NAME}: an update may not add a container of the injector's \
             sidecar's name"
        ),
        _ => format!(
            "{} {SIDECAR_NAME}: set by the injector; an update may not remove, rename or move it",
            before.first().map_or("container", |(what, _)| *what)
        ),
    };
    vec![problem]
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
        // In memory and small: a few roots.
        json!({
            "name": STATE_VOLUME,
            "emptyDir": {"medium": "Memory", "sizeLimit": "1Mi"},
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

/// How many failed `/readyz` startup probes (2 s apart) the kubelet allows the sidecar before it
/// kills it: 10 minutes, as Istio's sidecar allows. The sidecar waits for its first certificate
/// itself, retrying the CA with back-off; a kill helps nothing and, during a CA outage or a
/// rate-limited mass restart longer than the threshold, puts the sidecar in CrashLoopBackOff
/// (restarts up to 5 minutes apart) while its pod's apps wait unstarted after the CA is back.
const STARTUP_PROBE_FAILURES: u32 = 300;

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
        json!({"name": "MESHID_SIDECAR_BUNDLE_CACHE", "value": BUNDLE_CACHE}),
        // One runtime worker per CPU of the sidecar's limit, rounded up (the downward API rounds
        // `limits.cpu` up to whole cores with a divisor of 1; with no limit it gives the node's
        // allocatable CPUs, as tokio would count them): 500m, the chart's default, is one, and
        // one is tokio's current-thread scheduler. Without it every sidecar started as many
        // workers as the node has cores, each with its stack and scheduler state, however little
        // CPU it may use.
        json!({"name": "TOKIO_WORKER_THREADS", "valueFrom": {"resourceFieldRef": {"resource": "limits.cpu", "divisor": "1"}}}),
    ];
    if config.metrics_peer_identity {
        env.push(json!({"name": "MESHID_SIDECAR_METRICS_PEER_IDENTITY", "value": "true"}));
    }
    let mut args = sidecar_args(config);
    let mut mounts = vec![
        json!({"name": TOKEN_VOLUME, "mountPath": TOKEN_DIR, "readOnly": true}),
        json!({"name": POD_VOLUME, "mountPath": POD_DIR, "readOnly": true}),
        json!({"name": STATE_VOLUME, "mountPath": STATE_DIR}),
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
        "startupProbe": probe("/readyz", STARTUP_PROBE_FAILURES),
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

/// Probes of app containers (and of native sidecars: init containers with `restartPolicy: Always`,
/// the only init containers that may have probes) that target an inbound port would reach the
/// sidecar's mTLS listener and fail: HTTP probes move to the sidecar's admin port
/// (`/app-health/CONTAINER/KIND`, the original recorded in [`APP_PROBES`] for the sidecar to
/// forward over plain HTTP on localhost), TCP probes stay (the sidecar accepts the connection on
/// the port), gRPC and HTTPS probes are refused (the sidecar cannot forward them). [`APP_PROBES`]
/// belongs to the injector: a value the pod arrived with is replaced, or removed when no probe
/// moved, so it never points the sidecar at ports the injector did not record.
///
/// Runs after [`add_sidecar`], whose operation inserts the sidecar at `/spec/initContainers/0`:
/// the pod's own init container `i` is then at index `i + 1`.
pub(super) fn rewrite_probes(
    mesh: &MeshAnnotations,
    pod: &Value,
    ops: &mut Vec<Value>,
    problems: &mut Vec<String>,
) {
    let list = |pointer: &str| {
        pod.pointer(pointer)
            .and_then(Value::as_array)
            .map(Vec::as_slice)
            .unwrap_or_default()
    };
    let apps = list("/spec/containers")
        .iter()
        .enumerate()
        .map(|(i, c)| (format!("/spec/containers/{i}"), c));
    let native_sidecars = list("/spec/initContainers")
        .iter()
        .enumerate()
        .filter(|(_, c)| c["restartPolicy"] == "Always")
        .map(|(i, c)| (format!("/spec/initContainers/{}", i + 1), c));
    let mut moved = BTreeMap::new();
    let mut recorded = Recorded::default();
    for (at, c) in apps.chain(native_sidecars) {
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
                match http_get_moved(name, kind, port, get, &mut recorded) {
                    Ok((original, new)) => {
                        let short = kind.trim_end_matches("Probe");
                        moved.insert(format!("{name}/{short}"), original);
                        ops.push(json!({
                            "op": "replace",
                            "path": format!("{at}/{kind}/httpGet"),
                            "value": new,
                        }));
                    }
                    Err(problem) => {
                        problems.push(problem);
                        if recorded.full() {
                            return;
                        }
                    }
                }
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
    let path = format!("/metadata/annotations/{}", escape(APP_PROBES));
    if !moved.is_empty() {
        // `add` replaces a value the pod arrived with.
        ops.push(json!({
            "op": "add",
            "path": path,
            "value": Value::Object(moved.into_iter().collect()).to_string(),
        }));
    } else if pod
        .pointer("/metadata/annotations")
        .and_then(|a| a.get(APP_PROBES))
        .is_some()
    {
        ops.push(json!({"op": "remove", "path": path}));
    }
}

/// The most `httpHeaders` the moved probes of one pod may have together, and the most bytes their
/// paths and headers may take in [`APP_PROBES`] (an annotation: the API server limits a pod's
/// annotations to 256 KiB in all). Real probes have a path and a header or two.
pub const MAX_MOVED_HEADERS: usize = 256;
pub const MAX_APP_PROBES_BYTES: usize = 64 * 1024;

/// What the moved probes of a pod have recorded so far, against [`MAX_MOVED_HEADERS`] and
/// [`MAX_APP_PROBES_BYTES`].
#[derive(Debug, Default)]
struct Recorded {
    headers: usize,
    bytes: usize,
}

impl Recorded {
    fn full(&self) -> bool {
        self.headers > MAX_MOVED_HEADERS || self.bytes > MAX_APP_PROBES_BYTES
    }
}

/// An `httpGet` probe on inbound port `port` moved to the sidecar's admin port: what
/// [`APP_PROBES`] records (port, path, scheme, headers; nothing else of the original is copied)
/// and the new `httpGet`. The sidecar forwards over plain HTTP only, so an HTTPS probe is a
/// problem naming the container and the probe, as is a header that is not a name and a value, and
/// moved probes over [`MAX_MOVED_HEADERS`] or [`MAX_APP_PROBES_BYTES`] (counted in `recorded`
/// before anything is copied).
fn http_get_moved(
    container: &str,
    kind: &str,
    port: u16,
    get: &Value,
    recorded: &mut Recorded,
) -> Result<(Value, Value), String> {
    let scheme = get.get("scheme").map_or(Some("HTTP"), Value::as_str);
    if scheme != Some("HTTP") {
        return Err(format!(
            "container {container}: the {kind} uses scheme {} on inbound port {port}; the \
             sidecar forwards moved probes over plain HTTP only, so use scheme HTTP, a tcpSocket \
             or an exec probe",
            get["scheme"]
        ));
    }
    let given = get
        .get("httpHeaders")
        .and_then(Value::as_array)
        .map(Vec::as_slice)
        .unwrap_or_default();
    let path = get["path"].as_str();
    recorded.headers += given.len();
    recorded.bytes += container.len() + 64 + path.map_or(0, str::len);
    for (i, h) in given.iter().enumerate() {
        let (Some(name), Some(value)) = (h["name"].as_str(), h["value"].as_str()) else {
            return Err(format!(
                "container {container}: the {kind}'s httpHeaders[{i}] is not a name and a value"
            ));
        };
        recorded.bytes += name.len() + value.len() + 32;
    }
    if recorded.full() {
        return Err(format!(
            "the probes moved to the sidecar have more than {MAX_MOVED_HEADERS} httpHeaders or \
             take more than {MAX_APP_PROBES_BYTES} bytes in {APP_PROBES}"
        ));
    }
    let headers: Vec<Value> = given
        .iter()
        .map(|h| json!({"name": h["name"], "value": h["value"]}))
        .collect();
    let mut original = json!({"port": port, "scheme": "HTTP"});
    if let Some(path) = path {
        original["path"] = json!(path);
    }
    let short = kind.trim_end_matches("Probe");
    let mut new = json!({
        "path": format!("/app-health/{container}/{short}"),
        "port": ADMIN_PORT,
        "scheme": "HTTP",
    });
    if get.get("httpHeaders").is_some() {
        original["httpHeaders"] = Value::Array(headers.clone());
        new["httpHeaders"] = Value::Array(headers);
    }
    Ok((original, new))
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
