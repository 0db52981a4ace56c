//! Automatic sidecar injection: the mutating admission webhook's decision, as a pure function from an
//! `admission.k8s.io/v1` AdmissionReview to its answer (a JSONPatch, or a denial naming the bad
//! annotation). [`server`] serves it over TLS for `meshid-injector`.
//!
//! A pod is injected when its annotation `meshid.io/inject` is `enabled`, or when the webhook was
//! called for a namespace labelled `meshid.io/inject=enabled` ([`Scope::Namespace`]) and the pod
//! does not say `disabled`. The pod gets the sidecar as a native sidecar (an init container with
//! `restartPolicy: Always`), a projected service-account token for the CA, the trust bundle (as an
//! environment variable, so no namespace needs a ConfigMap of its own), and a downward-API file of
//! its annotations, from which the sidecar reads its listeners and its live allow-list.
//! Only the injector adds the sidecar and its volumes: a pod asking for injection that declares a
//! container named [`SIDECAR_NAME`] itself, or mounts one of the injector's volumes
//! ([`RESERVED_VOLUMES`]) in a container of its own, is refused. The injector's own annotations
//! ([`OWNED`]) carry only what it wrote: a preset value is overwritten or removed at creation, and
//! an update may not touch them.
//!
//! On a pod UPDATE the webhook only validates: an update that changes the pod's `meshid.io/*`
//! annotations into something the sidecar would refuse (`kubectl annotate` with a typo) is denied,
//! naming every problem, instead of being accepted and then ignored by the sidecar, and so is one
//! that changes the sidecar's image (`kubectl set image`) or removes it. An UPDATE is never
//! patched ([`validate_update`]). Ephemeral containers (`kubectl debug`) may not take the
//! sidecar's name, target it, or mount its volumes ([`validate_ephemeral_containers`]).

pub mod admission;
pub mod budget;
mod bundle;
pub mod cost;
pub mod metrics;
mod patch;
mod pod;
pub mod proof;
pub mod reload;
pub mod reply;
pub mod server;
pub mod serving;
pub mod startup;

use std::collections::BTreeMap;

use base64::Engine;
use meshid_identity::annotations::{self, MeshAnnotations};
use serde::Deserialize;
use serde_json::{Value, json};

pub use bundle::{BUNDLE_ENV, MAX_BUNDLE_BYTES, TrustBundle};
pub use patch::apply_patch;
pub use pod::{
    ADMIN_PORT, APP_PROBES, MAX_APP_PROBES_BYTES, MAX_CONTAINERS, MAX_MOVED_HEADERS,
    RESERVED_VOLUMES, SIDECAR_NAME, SPIFFE_ENDPOINT_SOCKET, STATS_PORT, WORKLOAD_API_DIR,
    WORKLOAD_API_SOCKET, sidecar_args,
};

/// What the injected sidecar is configured with.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct InjectConfig {
    /// Sidecar image, e.g. `ghcr.io/meshid/sidecar:0.1.0`.
    pub image: String,
    pub image_pull_policy: String,
    /// The CA's gRPC address, e.g. `meshid-ca.meshid.svc:8443`.
    pub ca_addr: String,
    /// The trust bundle, set as the sidecar's `MESHID_SIDECAR_CA_BUNDLE_PEM` (its anchor for the CA's
    /// serving certificate until the CA's bundle stream takes over).
    pub trust_bundle: TrustBundle,
    /// Lifetime of the projected token (the kubelet refreshes it at 80%); at least 600.
    pub token_expiration_seconds: u32,
    /// Sidecar resources (`{requests: ..., limits: ...}`).
    pub resources: Value,
    /// Log format of the sidecar (text or json).
    pub log_format: String,
    /// Sidecars label their request and byte metrics with the peer's SPIFFE ID (who calls whom;
    /// one series per peer, so off by default).
    pub metrics_peer_identity: bool,
}

impl InjectConfig {
    /// The defaults, with the trust bundle (which has none).
    pub fn new(trust_bundle: TrustBundle) -> Self {
        Self {
            image: "meshid/sidecar:latest".to_owned(),
            image_pull_policy: "IfNotPresent".to_owned(),
            ca_addr: "meshid-ca.meshid.svc:8443".to_owned(),
            trust_bundle,
            token_expiration_seconds: 600,
            resources: json!({
                "requests": {"cpu": "10m", "memory": "32Mi"},
                "limits": {"cpu": "500m", "memory": "128Mi"},
            }),
            log_format: "json".to_owned(),
            metrics_peer_identity: false,
        }
    }
}

/// How the webhook was reached: which of the chart's two webhook entries matched.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Scope {
    /// The namespace is not opted in: only pods annotated `meshid.io/inject: enabled`.
    Pod,
    /// The namespace is labelled `meshid.io/inject=enabled`: every pod not annotated `disabled`.
    Namespace,
}

/// The decision for one pod.
#[derive(Debug, Clone, PartialEq)]
pub enum Outcome {
    /// Admit unchanged (not asked for, or already injected); the reason is for the log.
    Skip(&'static str),
    /// Admit with this JSONPatch (RFC 6902 operations).
    Patch(Vec<Value>),
    /// Refuse the pod: every problem, each naming its annotation.
    Deny(Vec<String>),
}

/// Decides for a pod object (the AdmissionReview's `request.object`).
pub fn mutate_pod(config: &InjectConfig, scope: Scope, pod: &Value) -> Outcome {
    if let Some(problem) = annotations_too_large(pod) {
        return Outcome::Deny(vec![problem]);
    }
    let meta_annotations = pod.pointer("/metadata/annotations");
    let annotations = meshid_annotations(pod);
    if let Some(problem) = inject_value_problem(&annotations) {
        return Outcome::Deny(vec![problem]);
    }
    let wanted = match annotations.get(annotations::INJECT).map(String::as_str) {
        Some("enabled") => true,
        Some(_) => false,
        None => scope == Scope::Namespace,
    };
    if !wanted {
        return Outcome::Skip("injection not requested");
    }
    // Only the injector adds its sidecar: a pod that declares a container of its name (a copy of
    // an injected pod, or a fake sidecar beside forged annotations) is refused, never admitted
    // unchecked. `meshid.io/injected` is the injector's to set too, so a pod that arrives with it
    // and no sidecar is injected anyway (the annotation overwritten).
    if let Some(problem) = pod::declared_sidecar(pod) {
        return Outcome::Deny(vec![problem]);
    }
    let unknown = unknown_name_problems(annotations.keys());
    if !unknown.is_empty() {
        return Outcome::Deny(unknown);
    }
    let mesh = match MeshAnnotations::from_map(&annotations) {
        Ok(mesh) => mesh,
        Err(problems) => return Outcome::Deny(problems.iter().map(ToString::to_string).collect()),
    };
    let shape = pod::container_shape_problems(pod);
    if !shape.is_empty() {
        return Outcome::Deny(shape);
    }
    let asked = annotations.get(annotations::INJECT).map(String::as_str) == Some("enabled");
    if mesh.inbound.is_empty() && mesh.outbound.is_empty() && !asked {
        // Opted in only through its namespace: a pod without ports has no use for a sidecar.
        return Outcome::Skip("no meshid ports declared");
    }
    if mesh.inbound.is_empty() && mesh.outbound.is_empty() {
        return Outcome::Deny(vec![format!(
            "annotation {}: the pod declares no {} or {} port, so its sidecar would have \
             nothing to do (set {}: disabled to run it without one)",
            annotations::INJECT,
            annotations::INBOUND,
            annotations::OUTBOUND,
            annotations::INJECT
        )]);
    }
    let mut problems = Vec::new();
    if pod.pointer("/spec/hostNetwork") == Some(&Value::Bool(true)) {
        problems.push(format!(
            "annotation {}: a hostNetwork pod cannot be injected (its sidecar would take ports on \
             the node)",
            annotations::INJECT
        ));
    }
    // A process the app's containers can signal is one they can stop: a sidecar killed while
    // the app holds its admin port cannot start again (the pod crash-loops), and one it can trace
    // gives up its key. Both fields are immutable: a pod is checked once, when it is created.
    for (field, why) in [
        (
            "shareProcessNamespace",
            "its containers would see and signal the sidecar's process",
        ),
        (
            "hostPID",
            "its containers would see and signal every process on the node, the sidecar's too",
        ),
    ] {
        if pod.pointer(&format!("/spec/{field}")) == Some(&Value::Bool(true)) {
            problems.push(format!(
                "annotation {}: a pod with {field} cannot be injected ({why})",
                annotations::INJECT
            ));
        }
    }
    problems.extend(reserved_port_problems(&mesh));
    problems.extend(pod::reserved_container_ports(pod));
    problems.extend(pod::reserved_mounts(pod));
    let mut ops = Vec::new();
    match meta_annotations {
        Some(Value::Object(_)) => ops.push(json!({
            "op": "add",
            "path": format!("/metadata/annotations/{}", escape(annotations::INJECTED)),
            "value": pod::INJECTED_VALUE,
        })),
        _ => ops.push(json!({
            "op": "add",
            "path": "/metadata/annotations",
            "value": {annotations::INJECTED: pod::INJECTED_VALUE},
        })),
    }
    pod::add_volumes(config, &mesh, pod, &mut ops, &mut problems);
    pod::add_sidecar(config, &mesh, pod, &mut ops);
    if mesh.workload_api {
        pod::add_workload_api(pod, &mut ops, &mut problems);
    }
    pod::rewrite_probes(&mesh, pod, &mut ops, &mut problems);
    if problems.is_empty() {
        Outcome::Patch(ops)
    } else {
        Outcome::Deny(problems)
    }
}

/// Decides for a pod UPDATE: `pod` is the AdmissionReview's `request.object`, `old` its
/// `oldObject`. The injector's sidecar may not be removed, renamed or given another image
/// (`kubectl set image pod/x meshid-sidecar=...`), nor a container of its name added. Otherwise
/// only the `meshid.io/*` annotations are looked at, and only when this update changes
/// them (added, changed or removed): other updates of the pod (labels, finalizers, another
/// annotation) are admitted whatever the pod carries, so a pod admitted earlier without checks
/// (created while the webhook was unreachable under `failurePolicy: Ignore`) is never stuck. The
/// injector's own annotations ([`OWNED`]: `meshid.io/injected`, `meshid.io/app-probes`) may not be
/// added, changed or removed (the sidecar forwards its probes to whatever `app-probes` names); the
/// changed annotations must pass the parser the sidecar loads them with (the one [`mutate_pod`]
/// uses), `meshid.io/inject` must be `enabled` or `disabled`, and no port may be one of the
/// sidecar's own. Never [`Outcome::Patch`]: a running pod is not mutated.
pub fn validate_update(pod: &Value, old: Option<&Value>) -> Outcome {
    let sidecar = old.map_or_else(Vec::new, |old| pod::sidecar_changes(pod, old));
    let new = meshid_annotations(pod);
    let old = old.map(meshid_annotations);
    if old.as_ref() == Some(&new) {
        return if sidecar.is_empty() {
            Outcome::Skip("meshid annotations unchanged")
        } else {
            Outcome::Deny(sidecar)
        };
    }
    if let Some(problem) = annotations_too_large(pod) {
        return Outcome::Deny(vec![problem]);
    }
    let none = BTreeMap::new();
    let before = old.as_ref().unwrap_or(&none);
    let mut problems = sidecar;
    problems.extend(
        OWNED
            .iter()
            .filter(|key| new.get(**key) != before.get(**key))
            .map(|key| {
                format!(
                    "annotation {key}: set by the injector; an update may not add, change or \
                     remove it"
                )
            }),
    );
    if new.is_empty() && problems.is_empty() {
        return Outcome::Skip("no meshid annotations");
    }
    problems.extend(inject_value_problem(&new));
    // Only names this update adds: one a pod already carried stays its own business.
    problems.extend(unknown_name_problems(
        new.keys().filter(|name| !before.contains_key(*name)),
    ));
    match MeshAnnotations::from_map(&new) {
        Ok(mesh) => problems.extend(reserved_port_problems(&mesh)),
        Err(errors) => problems.extend(errors.iter().map(ToString::to_string)),
    }
    if problems.is_empty() {
        Outcome::Skip("meshid annotations valid")
    } else {
        Outcome::Deny(problems)
    }
}

/// Decides for an UPDATE of a pod's `ephemeralcontainers` subresource (`kubectl debug`): `pod` is
/// the pod with its ephemeral containers (`request.object`), `old` the pod before (`oldObject`).
/// An ephemeral container added by this update (one whose name `old` does not list) may not be
/// named [`SIDECAR_NAME`], target the sidecar's processes, or mount one of the volumes the
/// injector adds ([`pod::RESERVED_VOLUMES`]); ephemeral containers cannot be changed once added,
/// so those already there are not looked at again. Never [`Outcome::Patch`].
pub fn validate_ephemeral_containers(pod: &Value, old: Option<&Value>) -> Outcome {
    let list = |p: Option<&Value>| -> Vec<Value> {
        p.and_then(|p| p.pointer("/spec/ephemeralContainers"))
            .and_then(Value::as_array)
            .cloned()
            .unwrap_or_default()
    };
    let before = list(old);
    // One look-up per container (comparing each with every one before was quadratic in a list
    // a pod writes).
    let before: std::collections::HashSet<&Value> = before.iter().map(|b| &b["name"]).collect();
    let problems: Vec<String> = list(Some(pod))
        .iter()
        .filter(|c| !before.contains(&c["name"]))
        .flat_map(pod::ephemeral_container_problems)
        .collect();
    if problems.is_empty() {
        Outcome::Skip("ephemeral containers valid")
    } else {
        Outcome::Deny(problems)
    }
}

/// The annotations only the injector writes: a pod may carry them only as the injector left them.
pub const OWNED: [&str; 2] = [annotations::INJECTED, annotations::APP_PROBES];

/// The pod's `meshid.io/*` annotations whose values are strings (all of them, in a pod the API
/// server accepted). No other annotation is copied: the parser ignores them.
fn meshid_annotations(pod: &Value) -> BTreeMap<String, String> {
    pod.pointer("/metadata/annotations")
        .and_then(Value::as_object)
        .map(|m| {
            m.iter()
                .filter(|(k, _)| k.starts_with(annotations::PREFIX))
                .filter_map(|(k, v)| Some((k.clone(), v.as_str()?.to_owned())))
                .collect()
        })
        .unwrap_or_default()
}

/// Kubernetes' limit on a pod's annotations, keys and values together (the API server checks it
/// after the webhooks have run).
pub const MAX_ANNOTATION_BYTES: usize = 256 * 1024;

/// The pod's annotations take more than [`MAX_ANNOTATION_BYTES`]: the API server would refuse the
/// pod anyway, so it is refused before the meshid annotations are parsed.
fn annotations_too_large(pod: &Value) -> Option<String> {
    let total: usize = pod
        .pointer("/metadata/annotations")
        .and_then(Value::as_object)?
        .iter()
        .map(|(k, v)| k.len() + v.as_str().map_or_else(|| v.to_string().len(), str::len))
        .sum();
    (total > MAX_ANNOTATION_BYTES).then(|| {
        format!(
            "the pod's annotations take {total} bytes, more than Kubernetes allows \
             ({MAX_ANNOTATION_BYTES})"
        )
    })
}

/// `meshid.io/inject` is absent, `enabled` or `disabled`.
/// The `meshid.io/*` names among `names` that no meshid annotation has: a misspelt one would
/// otherwise be passed over (a pod in an opted-in namespace with `meshid.io/inbond` admitted
/// without a sidecar, say, and no word said).
/// At most eight are named (a pod may carry thousands), then how many more there are.
fn unknown_name_problems<'a>(names: impl IntoIterator<Item = &'a String>) -> Vec<String> {
    const NAMED: usize = 8;
    let unknown: Vec<&String> = names
        .into_iter()
        .filter(|name| annotations::is_unknown(name))
        .collect();
    let mut problems: Vec<String> = unknown
        .iter()
        .take(NAMED)
        .map(|name| {
            format!(
                "annotation {name}: no meshid annotation has this name (the names: {}, and \
                 {}<port>)",
                annotations::NAMES.join(", "),
                annotations::ALLOW_PREFIX
            )
        })
        .collect();
    if unknown.len() > NAMED {
        problems.push(format!(
            "{} more {}* annotations no meshid annotation has the name of",
            unknown.len() - NAMED,
            annotations::PREFIX
        ));
    }
    problems
}

fn inject_value_problem(annotations: &BTreeMap<String, String>) -> Option<String> {
    match annotations.get(annotations::INJECT).map(String::as_str) {
        None | Some("enabled" | "disabled") => None,
        Some(other) => Some(format!(
            "annotation {}: {other:?} is not enabled or disabled",
            annotations::INJECT
        )),
    }
}

/// Inbound or outbound ports that are the sidecar's own admin or stats port.
fn reserved_port_problems(mesh: &MeshAnnotations) -> Vec<String> {
    let mut problems = Vec::new();
    for (port, what) in [(ADMIN_PORT, "admin"), (STATS_PORT, "stats")] {
        if mesh.inbound.iter().any(|i| i.port == port) {
            problems.push(format!(
                "annotation {}: port {port} is the sidecar's {what} port",
                annotations::INBOUND
            ));
        }
        if mesh.outbound.iter().any(|o| o.local_port == port) {
            problems.push(format!(
                "annotation {}: port {port} is the sidecar's {what} port",
                annotations::OUTBOUND
            ));
        }
    }
    problems
}

/// Answers an `admission.k8s.io/v1` AdmissionReview given as a JSON tree: parsed into the typed
/// envelope ([`admission::AdmissionReview`]) and answered by [`answer`]. An envelope with fields of
/// the wrong type is answered like one without a request (`allowed: false`, code 400).
pub fn review(config: &InjectConfig, scope: Scope, review: &Value) -> Value {
    match admission::AdmissionReview::deserialize(review) {
        Ok(parsed) => answer(config, scope, &parsed),
        Err(error) => {
            let uid = review
                .pointer("/request/uid")
                .and_then(Value::as_str)
                .unwrap_or_default();
            envelope(uid, denied(400, format!("not an AdmissionReview: {error}")))
        }
    }
}

/// Answers an AdmissionReview: a pod CREATE is decided by [`mutate_pod`], a pod UPDATE by
/// [`validate_update`] (its `status` subresource too: a status update carries metadata) and an
/// UPDATE of its `ephemeralcontainers` subresource by [`validate_ephemeral_containers`]
/// (admitted or denied, never patched), anything else (other kinds, other operations) is
/// admitted unchanged. A
/// review that is not one the API server sends (another `apiVersion` than v1, a top-level `kind`
/// other than `AdmissionReview`, no request, a request without a `uid`, a pod CREATE or UPDATE
/// without its object) is answered with an error status (and `allowed: false`, so a broken
/// request never yields a half-injected pod; the chart's failurePolicy decides what the API server
/// does when the webhook itself is unreachable).
pub fn answer(config: &InjectConfig, scope: Scope, review: &admission::AdmissionReview) -> Value {
    let uid = review.request.as_ref().map_or("", |r| r.uid.as_str());
    let answer = |response: Value| envelope(uid, response);
    if let Some(problem) = review.problem() {
        return answer(denied(400, problem));
    }
    let Some(request) = review.request.as_ref() else {
        return answer(denied(400, "the AdmissionReview has no request".to_owned()));
    };
    if request.is_pod_ephemeral_containers() {
        if request.operation.as_deref() != Some("UPDATE") {
            return answer(json!({"allowed": true}));
        }
        let Some(pod) = request.object.as_ref() else {
            return answer(denied(400, "the request has no pod object".to_owned()));
        };
        return match validate_ephemeral_containers(pod, request.old_object.as_ref()) {
            Outcome::Deny(problems) => answer(denied(
                400,
                format!(
                    "meshid: ephemeral container refused: {}",
                    problems.join("; ")
                ),
            )),
            Outcome::Skip(_) | Outcome::Patch(_) => answer(json!({"allowed": true})),
        };
    }
    let operation = request.operation.as_deref();
    // A status update may change the pod's annotations (the API server keeps only the spec of
    // the old pod): decided as a pod update is, or `kubectl patch --subresource=status` would
    // change meshid.io/* annotations unchecked.
    if request.is_pod_status() && operation == Some("UPDATE") {
        let Some(pod) = request.object.as_ref() else {
            return answer(denied(400, "the request has no pod object".to_owned()));
        };
        return match validate_update(pod, request.old_object.as_ref()) {
            Outcome::Deny(problems) => answer(denied(
                400,
                format!("meshid annotations refused: {}", problems.join("; ")),
            )),
            Outcome::Skip(_) | Outcome::Patch(_) => answer(json!({"allowed": true})),
        };
    }
    if !request.is_pod() {
        return answer(json!({"allowed": true}));
    }
    if !matches!(operation, Some("CREATE" | "UPDATE")) {
        return answer(json!({"allowed": true}));
    }
    let Some(pod) = request.object.as_ref() else {
        return answer(denied(400, "the request has no pod object".to_owned()));
    };
    if operation == Some("UPDATE") {
        return match validate_update(pod, request.old_object.as_ref()) {
            Outcome::Deny(problems) => answer(denied(
                400,
                format!("meshid annotations refused: {}", problems.join("; ")),
            )),
            Outcome::Skip(_) | Outcome::Patch(_) => answer(json!({"allowed": true})),
        };
    }
    match mutate_pod(config, scope, pod) {
        Outcome::Skip(_) => answer(json!({"allowed": true})),
        Outcome::Deny(problems) => answer(denied(
            400,
            format!("meshid injection refused: {}", problems.join("; ")),
        )),
        Outcome::Patch(ops) => {
            let patch = base64::engine::general_purpose::STANDARD
                .encode(Value::Array(ops).to_string().as_bytes());
            answer(json!({
                "allowed": true,
                "patchType": "JSONPatch",
                "patch": patch,
            }))
        }
    }
}

/// The AdmissionReview carrying `response`, with the request's `uid`.
pub fn envelope(uid: &str, response: Value) -> Value {
    let mut response = response;
    response["uid"] = Value::String(uid.to_owned());
    json!({
        "apiVersion": admission::API_VERSION,
        "kind": "AdmissionReview",
        "response": response,
    })
}

/// A refusal with an HTTP-like `code` and a message the API server shows the user.
pub fn denied(code: u16, message: String) -> Value {
    json!({
        "allowed": false,
        "status": {"code": code, "message": message},
    })
}

/// Escapes a JSON Pointer token (RFC 6901).
fn escape(token: &str) -> String {
    token.replace('~', "~0").replace('/', "~1")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pointer_escape() {
        assert_eq!(escape("meshid.io/injected"), "meshid.io~1injected");
        assert_eq!(escape("a~b"), "a~0b");
    }

    #[test]
    fn non_pod_requests_are_admitted() {
        let r = json!({"kind": "AdmissionReview",
            "request": {"uid": "u1", "kind": {"kind": "Service"},
            "resource": {"resource": "services"}, "operation": "CREATE", "object": {}}});
        let key = rcgen::KeyPair::generate().unwrap();
        let root = rcgen::CertificateParams::new(Vec::<String>::new())
            .unwrap()
            .self_signed(&key)
            .unwrap();
        let config = InjectConfig::new(TrustBundle::from_pem(root.pem().as_bytes()).unwrap());
        let out = review(&config, Scope::Pod, &r);
        assert_eq!(out["response"]["allowed"], true);
        assert_eq!(out["response"]["uid"], "u1");
        assert!(out["response"].get("patch").is_none());
    }

    #[test]
    fn malformed_envelopes_are_refused_by_name() {
        let config = config();
        let wrong_version = json!({"apiVersion": "admission.k8s.io/v1beta1",
            "request": {"uid": "u3", "kind": {"kind": "Pod"}, "resource": {"resource": "pods"},
            "operation": "CREATE", "object": {}}});
        let out = review(&config, Scope::Pod, &wrong_version);
        assert_eq!(out["response"]["uid"], "u3");
        assert_eq!(out["response"]["allowed"], false);
        let message = out["response"]["status"]["message"].as_str().unwrap();
        assert!(message.contains("v1beta1"), "{message}");
        let wrong_type = json!({"request": {"uid": "u4", "operation": 7}});
        let out = review(&config, Scope::Pod, &wrong_type);
        assert_eq!(out["response"]["uid"], "u4");
        assert_eq!(out["response"]["allowed"], false);
        assert_eq!(out["response"]["status"]["code"], 400);
    }

    fn update(object: Value, old: Value) -> Value {
        json!({"kind": "AdmissionReview", "request": {"uid": "u2", "kind": {"kind": "Pod"},
            "resource": {"resource": "pods"}, "operation": "UPDATE",
            "object": object, "oldObject": old}})
    }

    fn pod_with(annotations: Value) -> Value {
        json!({"metadata": {"name": "web", "annotations": annotations},
            "spec": {"containers": [{"name": "app", "image": "web:1"}]}})
    }

    fn config() -> InjectConfig {
        let key = rcgen::KeyPair::generate().unwrap();
        let root = rcgen::CertificateParams::new(Vec::<String>::new())
            .unwrap()
            .self_signed(&key)
            .unwrap();
        InjectConfig::new(TrustBundle::from_pem(root.pem().as_bytes()).unwrap())
    }

    #[test]
    fn the_peer_identity_label_is_switched_on_for_injected_sidecars_only_when_asked() {
        let env_of = |config: &InjectConfig| {
            let mut ops = Vec::new();
            let mesh = MeshAnnotations::from_map(&BTreeMap::new()).unwrap();
            pod::add_sidecar(config, &mesh, &pod_with(json!({})), &mut ops);
            // The pod has no init containers: the patch adds the list, the sidecar in it.
            let sidecar = ops
                .iter()
                .find(|op| op["path"] == "/spec/initContainers")
                .map(|op| op["value"][0].clone())
                .expect("a sidecar container");
            assert_eq!(sidecar["name"], pod::SIDECAR_NAME);
            sidecar["env"]
                .as_array()
                .unwrap()
                .iter()
                .filter_map(|e| Some((e["name"].as_str()?.to_owned(), e["value"].clone())))
                .collect::<Vec<_>>()
        };
        let mut config = config();
        let off = env_of(&config);
        assert!(
            !off.iter()
                .any(|(n, _)| n == "MESHID_SIDECAR_METRICS_PEER_IDENTITY"),
            "{off:?}"
        );
        config.metrics_peer_identity = true;
        let on = env_of(&config);
        assert!(
            on.iter()
                .any(|(n, v)| n == "MESHID_SIDECAR_METRICS_PEER_IDENTITY" && v == "true"),
            "{on:?}"
        );
    }

    #[test]
    fn the_workload_api_annotation_gives_every_app_container_the_socket() {
        let config = config();
        let mut pod = json!({"metadata": {"name": "web", "annotations": {
                "meshid.io/inject": "enabled", "meshid.io/inbound": "8080=http",
                "meshid.io/workload-api": "enabled"}},
            "spec": {"containers": [
                {"name": "app", "image": "web:1"},
                {"name": "worker", "image": "w:1", "env": [{"name": "A", "value": "1"}],
                 "volumeMounts": [{"name": "data", "mountPath": "/data"}]}]}});
        let Outcome::Patch(ops) = mutate_pod(&config, Scope::Pod, &pod) else {
            panic!("not patched");
        };
        patch::apply_patch(&mut pod, &ops).unwrap();
        let sidecar = &pod["spec"]["initContainers"][0];
        let args: Vec<&str> = sidecar["args"]
            .as_array()
            .unwrap()
            .iter()
            .map(|a| a.as_str().unwrap())
            .collect();
        let at = args
            .iter()
            .position(|a| *a == "--workload-api-socket")
            .unwrap();
        assert_eq!(args[at + 1], pod::WORKLOAD_API_SOCKET);
        let volume = pod["spec"]["volumes"]
            .as_array()
            .unwrap()
            .iter()
            .find(|v| v["name"] == "meshid-workload-api")
            .expect("the shared volume");
        assert_eq!(volume["emptyDir"]["medium"], "Memory");
        assert!(
            sidecar["volumeMounts"]
                .as_array()
                .unwrap()
                .iter()
                .any(|m| m["mountPath"] == pod::WORKLOAD_API_DIR && m["readOnly"].is_null())
        );
        for c in pod["spec"]["containers"].as_array().unwrap() {
            let env = c["env"].as_array().unwrap();
            assert!(
                env.iter().any(|v| v["name"] == "SPIFFE_ENDPOINT_SOCKET"
                    && v["value"] == "unix:///run/spiffe/workload/api.sock"),
                "{c}"
            );
            assert!(
                c["volumeMounts"]
                    .as_array()
                    .unwrap()
                    .iter()
                    .any(|m| m["name"] == "meshid-workload-api"
                        && m["mountPath"] == "/run/spiffe"
                        && m["readOnly"] == true),
                "{c}"
            );
        }
        // Kept what the worker had.
        assert_eq!(pod["spec"]["containers"][1]["env"][0]["name"], "A");

        // Without the annotation: nothing of it.
        let mut plain =
            pod_with(json!({"meshid.io/inject": "enabled", "meshid.io/inbound": "8080=http"}));
        let Outcome::Patch(ops) = mutate_pod(&config, Scope::Pod, &plain) else {
            panic!("not patched");
        };
        patch::apply_patch(&mut plain, &ops).unwrap();
        assert!(!plain.to_string().contains("workload-api"));
        assert!(!plain.to_string().contains("SPIFFE_ENDPOINT_SOCKET"));

        // An app that already points SPIFFE_ENDPOINT_SOCKET elsewhere is refused, naming it.
        let taken = json!({"metadata": {"name": "web", "annotations": {
                "meshid.io/inject": "enabled", "meshid.io/inbound": "8080=http",
                "meshid.io/workload-api": "enabled"}},
            "spec": {"containers": [{"name": "app", "image": "web:1",
                "env": [{"name": "SPIFFE_ENDPOINT_SOCKET", "value": "unix:///spire/api.sock"}]}]}});
        let Outcome::Deny(problems) = mutate_pod(&config, Scope::Pod, &taken) else {
            panic!("not refused");
        };
        assert!(
            problems[0].contains("container app already sets SPIFFE_ENDPOINT_SOCKET"),
            "{problems:?}"
        );
    }

    #[test]
    fn updates_are_validated_only_when_they_change_meshid_annotations() {
        let good = json!({"meshid.io/inject": "enabled", "meshid.io/inbound": "8080=http",
            "meshid.io/allow-8080": "spiffe://cluster.local/ns/shop/sa/frontend"});
        let mut typo = good.clone();
        typo["meshid.io/allow-8080"] = json!("spiffe://cluster.local/ns/shop/sa/front*end");
        typo["meshid.io/mode"] = json!("permisive");
        let config = config();
        // Changed into something the sidecar would refuse: denied, naming both problems.
        let out = review(
            &config,
            Scope::Pod,
            &update(pod_with(typo.clone()), pod_with(good.clone())),
        );
        let response = &out["response"];
        assert_eq!(response["uid"], "u2");
        assert_eq!(response["allowed"], false);
        assert_eq!(response["status"]["code"], 400);
        let message = response["status"]["message"].as_str().unwrap();
        for needle in ["meshid.io/allow-8080", "meshid.io/mode", "permisive"] {
            assert!(message.contains(needle), "{needle} not in {message}");
        }
        assert!(response.get("patch").is_none());
        // Removing the inbound port leaves an allow list for an undeclared port: denied too.
        let mut removed = good.clone();
        removed.as_object_mut().unwrap().remove("meshid.io/inbound");
        let out = review(
            &config,
            Scope::Pod,
            &update(pod_with(removed), pod_with(good.clone())),
        );
        assert_eq!(out["response"]["allowed"], false, "{out}");
        // A valid change: admitted, no patch.
        let mut changed = good.clone();
        changed["meshid.io/allow-8080"] = json!("spiffe://cluster.local/ns/ops/sa/*");
        let out = review(
            &config,
            Scope::Namespace,
            &update(pod_with(changed), pod_with(good.clone())),
        );
        assert_eq!(out["response"]["allowed"], true, "{out}");
        assert!(out["response"].get("patch").is_none());
        // An update that leaves broken meshid annotations as they were (a label, a finalizer):
        // admitted, so that such a pod can still be relabelled and deleted.
        let mut relabelled = pod_with(typo.clone());
        relabelled["metadata"]["labels"] = json!({"app": "web"});
        let out = review(
            &config,
            Scope::Pod,
            &update(relabelled, pod_with(typo.clone())),
        );
        assert_eq!(out["response"]["allowed"], true, "{out}");
        // Without an old object, the annotations are checked as they are.
        let out = review(&config, Scope::Pod, &update(pod_with(typo), Value::Null));
        assert_eq!(out["response"]["allowed"], false, "{out}");
        // No meshid annotation at all: admitted untouched.
        let out = review(
            &config,
            Scope::Pod,
            &update(pod_with(json!({"team": "web"})), pod_with(json!({}))),
        );
        assert_eq!(out["response"]["allowed"], true, "{out}");
        assert!(out["response"].get("patch").is_none());
    }

    #[test]
    fn updates_check_the_inject_value_and_the_sidecar_ports() {
        let config = config();
        for (annotations, needles) in [
            (
                json!({"meshid.io/inject": "yes"}),
                &["meshid.io/inject", "\"yes\""][..],
            ),
            (
                json!({"meshid.io/inbound": "15020=http"}),
                &[
                    "meshid.io/inbound",
                    "port 15020 is the sidecar's stats port",
                ][..],
            ),
            (
                json!({"meshid.io/outbound": "15021=db.shop.svc:5432,spiffe://cluster.local/ns/shop/sa/db,tcp"}),
                &[
                    "meshid.io/outbound",
                    "port 15021 is the sidecar's admin port",
                ][..],
            ),
        ] {
            let out = review(
                &config,
                Scope::Pod,
                &update(pod_with(annotations), pod_with(json!({}))),
            );
            assert_eq!(out["response"]["allowed"], false, "{out}");
            let message = out["response"]["status"]["message"].as_str().unwrap();
            for needle in needles {
                assert!(message.contains(needle), "{needle} not in {message}");
            }
        }
        // A status update changes annotations too (the API server keeps only the spec): decided
        // as a pod update is.
        let mut r = update(
            pod_with(json!({"meshid.io/inject": "yes"})),
            pod_with(json!({})),
        );
        r["request"]["subResource"] = json!("status");
        assert_eq!(
            review(&config, Scope::Pod, &r)["response"]["allowed"],
            false
        );
        let mut owned = update(
            pod_with(
                json!({"meshid.io/app-probes": r#"{"app/ready":{"port":9901,"path":"/quitquitquit"}}"#}),
            ),
            pod_with(json!({})),
        );
        owned["request"]["subResource"] = json!("status");
        let out = review(&config, Scope::Pod, &owned);
        assert_eq!(out["response"]["allowed"], false, "{out}");
        // One that leaves the annotations as they were (the kubelet's) is admitted.
        let mut kubelet = update(
            pod_with(json!({"meshid.io/inject": "enabled"})),
            pod_with(json!({"meshid.io/inject": "enabled"})),
        );
        kubelet["request"]["subResource"] = json!("status");
        assert_eq!(
            review(&config, Scope::Pod, &kubelet)["response"]["allowed"],
            true
        );
        // Other subresources are not looked at.
        r["request"]["subResource"] = json!("binding");
        assert_eq!(review(&config, Scope::Pod, &r)["response"]["allowed"], true);
        // Nor the annotations in an ephemeral containers update (it cannot change them).
        r["request"]["subResource"] = json!("ephemeralcontainers");
        assert_eq!(review(&config, Scope::Pod, &r)["response"]["allowed"], true);
    }

    fn opted_in(spec: Value) -> Value {
        json!({"metadata": {"name": "web", "annotations": {
                "meshid.io/inject": "enabled", "meshid.io/inbound": "8080=http",
                "meshid.io/injected": "v1"}},
            "spec": spec})
    }

    /// A pod that asks for injection but brings the injector's own container, or mounts one of its
    /// volumes in a container of its own, is refused naming it; never admitted unchecked.
    #[test]
    fn pods_may_not_bring_the_sidecar_or_mount_its_volumes() {
        struct Case {
            name: &'static str,
            spec: Value,
            expected: &'static [&'static str],
        }
        let app = json!({"name": "app", "image": "web:1"});
        let fake = json!({"name": SIDECAR_NAME, "image": "evil:1", "restartPolicy": "Always"});
        let mounting = |volume: &str| {
            json!({"name": "app", "image": "web:1",
                "volumeMounts": [{"name": volume, "mountPath": "/x"}]})
        };
        let cases = [
            Case {
                name: "a fake sidecar as an init container, with forged annotations",
                spec: json!({"initContainers": [fake.clone()], "containers": [app.clone()]}),
                expected: &[
                    "init container meshid-sidecar",
                    "remove it from the pod spec and let the injector add it",
                ],
            },
            Case {
                name: "a fake sidecar as an app container",
                spec: json!({"containers": [app.clone(), fake.clone()]}),
                expected: &["container meshid-sidecar", "injector's own container"],
            },
            Case {
                name: "the sidecar's state mounted by an app container",
                spec: json!({"containers": [mounting("meshid-state")]}),
                expected: &["container app: mounts volume meshid-state", "reserved"],
            },
            Case {
                name: "the token volume mounted by an init container",
                spec: json!({"initContainers": [{"name": "init", "image": "i:1",
                    "volumeMounts": [{"name": "meshid-token", "mountPath": "/t"}]}],
                    "containers": [app.clone()]}),
                expected: &["init container init: mounts volume meshid-token"],
            },
            Case {
                name: "the annotations file and the Workload API volume",
                spec: json!({"containers": [{"name": "app", "image": "web:1", "volumeMounts": [
                    {"name": "meshid-pod", "mountPath": "/p"},
                    {"name": "meshid-workload-api", "mountPath": "/w"}]}]}),
                expected: &[
                    "mounts volume meshid-pod",
                    "mounts volume meshid-workload-api",
                ],
            },
        ];
        let config = config();
        for case in cases {
            let pod = opted_in(case.spec);
            for scope in [Scope::Pod, Scope::Namespace] {
                let Outcome::Deny(problems) = mutate_pod(&config, scope, &pod) else {
                    panic!("{}: not refused", case.name);
                };
                let text = problems.join("; ");
                for needle in case.expected {
                    assert!(
                        text.contains(needle),
                        "{}: {needle:?} not in {text}",
                        case.name
                    );
                }
            }
        }
        // Not asked for: left alone, whatever it carries.
        let mut pod = opted_in(json!({"containers": [app, fake]}));
        pod["metadata"]["annotations"]["meshid.io/inject"] = json!("disabled");
        assert_eq!(
            mutate_pod(&config, Scope::Namespace, &pod),
            Outcome::Skip("injection not requested")
        );
        // A volume of another name mounted anywhere is the pod's own business.
        let pod = opted_in(json!({"containers": [mounting("meshid-data")]}));
        assert!(matches!(
            mutate_pod(&config, Scope::Pod, &pod),
            Outcome::Patch(_)
        ));
    }

    fn injected_pod() -> Value {
        let mut pod = opted_in(json!({"containers": [{"name": "app", "image": "web:1"}]}));
        let Outcome::Patch(ops) = mutate_pod(&config(), Scope::Pod, &pod) else {
            panic!("not injected");
        };
        patch::apply_patch(&mut pod, &ops).unwrap();
        pod
    }

    /// The injected pod's sidecar (its first init container).
    fn sidecar_at(pod: &mut Value) -> &mut Value {
        let sidecar = &mut pod["spec"]["initContainers"][0];
        assert_eq!(sidecar["name"], SIDECAR_NAME);
        sidecar
    }

    /// `kubectl set image pod/web meshid-sidecar=evil`: refused (the chart's matchCondition sends
    /// UPDATEs that change an image); the app's image may change.
    #[test]
    fn updates_may_not_change_remove_or_add_the_sidecar() {
        let config = config();
        let old = injected_pod();
        let mut evil = old.clone();
        sidecar_at(&mut evil)["image"] = json!("registry.evil/sidecar:1");
        let mut renamed = old.clone();
        sidecar_at(&mut renamed)["name"] = json!("not-the-sidecar");
        let mut removed = old.clone();
        removed["spec"]["initContainers"] = json!([]);
        let mut added = old.clone();
        added["spec"]["containers"]
            .as_array_mut()
            .unwrap()
            .push(json!({"name": SIDECAR_NAME, "image": "x:1"}));
        for (name, new, needle) in [
            (
                "image changed",
                evil.clone(),
                "init container meshid-sidecar: set by the injector; an update may not change \
                 its image (from \"meshid/sidecar:latest\" to \"registry.evil/sidecar:1\")",
            ),
            ("renamed", renamed, "may not remove, rename or move it"),
            ("removed", removed, "may not remove, rename or move it"),
            (
                "a second one added",
                added,
                "may not add a container of the injector's sidecar's name",
            ),
        ] {
            let out = review(&config, Scope::Pod, &update(new, old.clone()));
            assert_eq!(out["response"]["allowed"], false, "{name}: {out}");
            let message = out["response"]["status"]["message"].as_str().unwrap();
            assert!(
                message.contains(needle),
                "{name}: {needle:?} not in {message}"
            );
        }
        // Added to a pod that had none: refused too.
        let plain = pod_with(json!({}));
        let mut with_one = plain.clone();
        with_one["spec"]["containers"]
            .as_array_mut()
            .unwrap()
            .push(json!({"name": SIDECAR_NAME, "image": "x:1"}));
        let Outcome::Deny(problems) = validate_update(&with_one, Some(&plain)) else {
            panic!("not refused");
        };
        assert!(problems[0].contains("may not add"), "{problems:?}");
        // Together with an annotation change: both named.
        let mut both = evil;
        both["metadata"]["annotations"]["meshid.io/mode"] = json!("permisive");
        let Outcome::Deny(problems) = validate_update(&both, Some(&old)) else {
            panic!("not refused");
        };
        assert_eq!(problems.len(), 2, "{problems:?}");
        // The app's image: admitted, unpatched.
        let mut app = old.clone();
        app["spec"]["containers"][0]["image"] = json!("web:2");
        let out = review(&config, Scope::Namespace, &update(app, old));
        assert_eq!(out["response"]["allowed"], true, "{out}");
        assert!(out["response"].get("patch").is_none());
    }

    /// `kubectl debug` adds ephemeral containers through the pods/ephemeralcontainers subresource,
    /// whose object is the whole pod: one that mounts the sidecar's volumes, takes its name or
    /// targets it is refused; any other is admitted.
    #[test]
    fn ephemeral_containers_may_not_reach_into_the_sidecar() {
        let config = config();
        let old = injected_pod();
        let debug = |container: Value| {
            let mut pod = old.clone();
            pod["spec"]["ephemeralContainers"] = json!([container]);
            let mut r = update(pod, old.clone());
            r["request"]["subResource"] = json!("ephemeralcontainers");
            review(&config, Scope::Pod, &r)
        };
        for (container, needles) in [
            (
                json!({"name": "debugger", "image": "busybox",
                    "volumeMounts": [{"name": "meshid-state", "mountPath": "/s"}]}),
                &["ephemeral container debugger: mounts volume meshid-state"][..],
            ),
            (
                json!({"name": "debugger", "image": "busybox",
                    "volumeMounts": [{"name": "meshid-token", "mountPath": "/t",
                        "readOnly": true}]}),
                &["mounts volume meshid-token"][..],
            ),
            (
                json!({"name": SIDECAR_NAME, "image": "busybox"}),
                &["ephemeral container meshid-sidecar: the name is the injector's sidecar's"][..],
            ),
            (
                json!({"name": "debugger", "image": "busybox",
                    "targetContainerName": SIDECAR_NAME}),
                &[
                    "ephemeral container debugger: targets meshid-sidecar",
                    "target an app container instead",
                ][..],
            ),
        ] {
            let out = debug(container);
            let response = &out["response"];
            assert_eq!(response["allowed"], false, "{response}");
            assert_eq!(response["status"]["code"], 400);
            let message = response["status"]["message"].as_str().unwrap();
            assert!(
                message.starts_with("meshid: ephemeral container refused: "),
                "{message}"
            );
            for needle in needles {
                assert!(message.contains(needle), "{needle:?} not in {message}");
            }
        }
        // A debugger of the app, with its own volume: admitted, unpatched.
        let out = debug(
            json!({"name": "debugger", "image": "busybox", "targetContainerName": "app",
            "volumeMounts": [{"name": "data", "mountPath": "/d"}]}),
        );
        assert_eq!(out["response"]["allowed"], true, "{out}");
        assert!(out["response"].get("patch").is_none());
        // One already there (added while the webhook was down) does not block the next.
        let mut had = old.clone();
        had["spec"]["ephemeralContainers"] = json!([{"name": "old", "image": "b",
            "volumeMounts": [{"name": "meshid-state", "mountPath": "/s"}]}]);
        let mut now = had.clone();
        now["spec"]["ephemeralContainers"]
            .as_array_mut()
            .unwrap()
            .push(json!({"name": "new", "image": "b"}));
        assert_eq!(
            validate_ephemeral_containers(&now, Some(&had)),
            Outcome::Skip("ephemeral containers valid")
        );
        // Without an old object every ephemeral container is looked at.
        assert!(matches!(
            validate_ephemeral_containers(&now, None),
            Outcome::Deny(_)
        ));
    }

    #[test]
    fn injected_sidecar_serves_stats_apart_from_probes() {
        let config = config();
        let args = sidecar_args(&config);
        let at = args.iter().position(|a| a == "--stats-listen").unwrap();
        assert_eq!(args[at + 1], "0.0.0.0:15020");
        let at = args.iter().position(|a| a == "--admin-listen").unwrap();
        assert_eq!(args[at + 1], "0.0.0.0:15021");
        let pod =
            pod_with(json!({"meshid.io/inject": "enabled", "meshid.io/inbound": "8080=http"}));
        let Outcome::Patch(ops) = mutate_pod(&config, Scope::Pod, &pod) else {
            panic!("not injected");
        };
        let sidecar = ops
            .iter()
            .find(|o| o["path"] == "/spec/initContainers")
            .unwrap();
        assert_eq!(
            sidecar["value"][0]["ports"],
            json!([
                {"name": "meshid-admin", "containerPort": 15021, "protocol": "TCP"},
                {"name": "meshid-stats", "containerPort": 15020, "protocol": "TCP"},
            ])
        );
        assert_eq!(
            sidecar["value"][0]["readinessProbe"]["httpGet"]["port"],
            15021
        );
    }
}
