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
//! Already-injected pods are left alone.

mod bundle;
pub mod metrics;
mod patch;
mod pod;
pub mod reload;
pub mod server;
pub mod serving;
pub mod startup;

use std::collections::BTreeMap;

use base64::Engine;
use meshid_identity::annotations::{self, MeshAnnotations};
use serde_json::{Value, json};

pub use bundle::{BUNDLE_ENV, MAX_BUNDLE_BYTES, TrustBundle};
pub use patch::apply_patch;
pub use pod::{ADMIN_PORT, APP_PROBES, SIDECAR_NAME, sidecar_args};

/// What the injected sidecar is configured with.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct InjectConfig {
    /// Sidecar image, e.g. `ghcr.io/meshid/sidecar:0.1.0`.
    pub image: String,
    pub image_pull_policy: String,
    /// The CA's gRPC address, e.g. `meshid-ca.meshid.svc:8443`.
    pub ca_addr: String,
    /// The trust bundle, set as the sidecar's `MESHID_CA_BUNDLE_PEM` (its anchor for the CA's
    /// serving certificate until the CA's bundle stream takes over).
    pub trust_bundle: TrustBundle,
    /// Lifetime of the projected token (the kubelet refreshes it at 80%); at least 600.
    pub token_expiration_seconds: u32,
    /// Sidecar resources (`{requests: ..., limits: ...}`).
    pub resources: Value,
    /// Log format of the sidecar (text or json).
    pub log_format: String,
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
    let meta_annotations = pod.pointer("/metadata/annotations");
    let annotations: BTreeMap<String, String> = meta_annotations
        .and_then(Value::as_object)
        .map(|m| {
            m.iter()
                .filter_map(|(k, v)| Some((k.clone(), v.as_str()?.to_owned())))
                .collect()
        })
        .unwrap_or_default();
    let wanted = match annotations.get(annotations::INJECT).map(String::as_str) {
        Some("enabled") => true,
        Some("disabled") => false,
        Some(other) => {
            return Outcome::Deny(vec![format!(
                "annotation {}: {other:?} is not enabled or disabled",
                annotations::INJECT
            )]);
        }
        None => scope == Scope::Namespace,
    };
    if !wanted {
        return Outcome::Skip("injection not requested");
    }
    if annotations.contains_key(annotations::INJECTED) || pod::has_sidecar(pod) {
        return Outcome::Skip("already injected");
    }
    let mesh = match MeshAnnotations::from_map(&annotations) {
        Ok(mesh) => mesh,
        Err(problems) => return Outcome::Deny(problems.iter().map(ToString::to_string).collect()),
    };
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
    if mesh.inbound.iter().any(|i| i.port == ADMIN_PORT) {
        problems.push(format!(
            "annotation {}: port {ADMIN_PORT} is the sidecar's admin port",
            annotations::INBOUND
        ));
    }
    if mesh.outbound.iter().any(|o| o.local_port == ADMIN_PORT) {
        problems.push(format!(
            "annotation {}: port {ADMIN_PORT} is the sidecar's admin port",
            annotations::OUTBOUND
        ));
    }
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
    pod::add_volumes(config, pod, &mut ops, &mut problems);
    pod::add_sidecar(config, pod, &mut ops);
    pod::rewrite_probes(&mesh, pod, &mut ops, &mut problems);
    if problems.is_empty() {
        Outcome::Patch(ops)
    } else {
        Outcome::Deny(problems)
    }
}

/// Answers an `admission.k8s.io/v1` AdmissionReview. Anything that is not a pod CREATE is admitted
/// unchanged; a request that cannot be read is answered with an error status (and `allowed: false`,
/// so a broken request never yields a half-injected pod; the chart's failurePolicy decides what the
/// API server does when the webhook itself is unreachable).
pub fn review(config: &InjectConfig, scope: Scope, review: &Value) -> Value {
    let uid = review
        .pointer("/request/uid")
        .cloned()
        .unwrap_or(Value::String(String::new()));
    let answer = |response: Value| {
        let mut response = response;
        response["uid"] = uid.clone();
        json!({
            "apiVersion": "admission.k8s.io/v1",
            "kind": "AdmissionReview",
            "response": response,
        })
    };
    let Some(request) = review.get("request") else {
        return answer(denied(400, "the AdmissionReview has no request".to_owned()));
    };
    let is_pod = request.pointer("/kind/kind").and_then(Value::as_str) == Some("Pod")
        && request
            .pointer("/resource/resource")
            .and_then(Value::as_str)
            == Some("pods");
    let is_create = request.get("operation").and_then(Value::as_str) == Some("CREATE");
    let has_sub = request
        .get("subResource")
        .and_then(Value::as_str)
        .is_some_and(|s| !s.is_empty());
    if !is_pod || !is_create || has_sub {
        return answer(json!({"allowed": true}));
    }
    let Some(pod) = request.get("object") else {
        return answer(denied(400, "the request has no pod object".to_owned()));
    };
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

fn denied(code: u16, message: String) -> Value {
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
        let r = json!({"request": {"uid": "u1", "kind": {"kind": "Service"},
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
}
