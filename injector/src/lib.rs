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
//! Pods already running the sidecar are left alone. The injector's own annotations ([`OWNED`])
//! carry only what it wrote: a preset value is overwritten or removed at creation, and an update
//! may not touch them.
//!
//! On a pod UPDATE the webhook only validates: an update that changes the pod's `meshid.io/*`
//! annotations into something the sidecar would refuse (`kubectl annotate` with a typo) is denied,
//! naming every problem, instead of being accepted and then ignored by the sidecar. An UPDATE is
//! never patched ([`validate_update`]).

pub mod admission;
pub mod budget;
mod bundle;
pub mod cost;
pub mod metrics;
mod patch;
mod pod;
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
    ADMIN_PORT, APP_PROBES, MAX_APP_PROBES_BYTES, MAX_CONTAINERS, MAX_MOVED_HEADERS, SIDECAR_NAME,
    SPIFFE_ENDPOINT_SOCKET, STATS_PORT, WORKLOAD_API_DIR, WORKLOAD_API_SOCKET, sidecar_args,
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
    // Injected means running the sidecar (a copy of an injected pod, say): `meshid.io/injected`
    // is the injector's to set, so a pod that arrives with it and no sidecar is injected anyway
    // (the annotation overwritten).
    if pod::has_sidecar(pod) {
        return Outcome::Skip("already injected");
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
    problems.extend(reserved_port_problems(&mesh));
    problems.extend(pod::reserved_container_ports(pod));
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
/// `oldObject`. Only the `meshid.io/*` annotations are looked at, and only when this update changes
/// them (added, changed or removed): other updates of the pod (labels, finalizers, another
/// annotation) are admitted whatever the pod carries, so a pod admitted earlier without checks
/// (created while the webhook was unreachable under `failurePolicy: Ignore`) is never stuck. The
/// injector's own annotations ([`OWNED`]: `meshid.io/injected`, `meshid.io/app-probes`) may not be
/// added, changed or removed (the sidecar forwards its probes to whatever `app-probes` names); the
/// changed annotations must pass the parser the sidecar loads them with (the one [`mutate_pod`]
/// uses), `meshid.io/inject` must be `enabled` or `disabled`, and no port may be one of the
/// sidecar's own. Never [`Outcome::Patch`]: a running pod is not mutated.
pub fn validate_update(pod: &Value, old: Option<&Value>) -> Outcome {
    let new = meshid_annotations(pod);
    let old = old.map(meshid_annotations);
    if old.as_ref() == Some(&new) {
        return Outcome::Skip("meshid annotations unchanged");
    }
    if let Some(problem) = annotations_too_large(pod) {
        return Outcome::Deny(vec![problem]);
    }
    let none = BTreeMap::new();
    let before = old.as_ref().unwrap_or(&none);
    let mut problems: Vec<String> = OWNED
        .iter()
        .filter(|key| new.get(**key) != before.get(**key))
        .map(|key| {
            format!(
                "annotation {key}: set by the injector; an update may not add, change or remove it"
            )
        })
        .collect();
    if new.is_empty() && problems.is_empty() {
        return Outcome::Skip("no meshid annotations");
    }
    problems.extend(inject_value_problem(&new));
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
/// [`validate_update`] (admitted or denied, never patched), anything else (other kinds, other
/// operations, subresources such as `status` or `ephemeralcontainers`) is admitted unchanged. A
/// review that is not one the API server sends (another `apiVersion` than v1, a top-level `kind`
/// other than `AdmissionReview`, no request, a request without a `uid`, a pod CREATE or UPDATE
/// without its object) is answered with an error status (and `allowed: false`, so a broken
/// request never yields a half-injected pod; the chart's failurePolicy decides what the API server
/// does when the webhook itself is unreachable).
pub fn answer(config: &InjectConfig, scope: Scope, review: &admission::AdmissionReview) -> Value {
    let uid = review.request.as_ref().map_or("", |r| r.uid.as_str());
    let answer = |response: Value| envelope(uid, response);
    if let Some(version) = review.api_version.as_deref()
        && version != admission::API_VERSION
    {
        return answer(denied(
            400,
            format!(
                "AdmissionReview {version} is not supported (only {})",
                admission::API_VERSION
            ),
        ));
    }
    if review.kind.as_deref() != Some("AdmissionReview") {
        return answer(denied(
            400,
            format!(
                "kind {} is not AdmissionReview",
                review
                    .kind
                    .as_deref()
                    .map_or("(none)".to_owned(), |k| format!("{k:?}"))
            ),
        ));
    }
    let Some(request) = review.request.as_ref() else {
        return answer(denied(400, "the AdmissionReview has no request".to_owned()));
    };
    if request.uid.is_empty() {
        // The API server matches the answer to its request by the uid, and never sends one without.
        return answer(denied(400, "the request has no uid".to_owned()));
    }
    if !request.is_pod() {
        return answer(json!({"allowed": true}));
    }
    let operation = request.operation.as_deref();
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
        // Subresource updates (status, ephemeral containers) are not looked at.
        let mut r = update(
            pod_with(json!({"meshid.io/inject": "yes"})),
            pod_with(json!({})),
        );
        r["request"]["subResource"] = json!("status");
        assert_eq!(review(&config, Scope::Pod, &r)["response"]["allowed"], true);
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
