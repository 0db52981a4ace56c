//! The `admission.k8s.io/v1` AdmissionReview envelope as typed structs: only the fields the webhook
//! reads (everything else, such as `userInfo` or `options`, is skipped while parsing). The pod
//! objects stay [`Value`]s, for the JSON-patch logic.
//!
//! Parsing goes through serde_json's deserializer, whose recursion limit (128 nested arrays or
//! objects, for the envelope and the objects in it alike) refuses a deeply nested body with an
//! error instead of exhausting the stack: [`parse`] says so by name. Fields the webhook does not
//! read are skipped by serde_json without recursion, however deep.

use serde::Deserialize;
use serde_json::Value;

/// The only AdmissionReview version the chart registers (`admissionReviewVersions: [v1]`).
pub const API_VERSION: &str = "admission.k8s.io/v1";

/// An AdmissionReview as the API server sends it.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct AdmissionReview {
    #[serde(default)]
    pub api_version: Option<String>,
    #[serde(default)]
    pub kind: Option<String>,
    #[serde(default)]
    pub request: Option<AdmissionRequest>,
}

/// The review's `request`.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct AdmissionRequest {
    /// Copied into the response, which the API server matches by it.
    #[serde(default)]
    pub uid: String,
    #[serde(default)]
    pub kind: Option<GroupVersionKind>,
    #[serde(default)]
    pub resource: Option<GroupVersionResource>,
    #[serde(default)]
    pub sub_resource: Option<String>,
    /// CREATE, UPDATE, DELETE or CONNECT.
    #[serde(default)]
    pub operation: Option<String>,
    #[serde(default)]
    pub namespace: Option<String>,
    #[serde(default)]
    pub name: Option<String>,
    /// The pod as it would be stored (absent or null for DELETE).
    #[serde(default)]
    pub object: Option<Value>,
    /// The pod before an UPDATE (null for CREATE).
    #[serde(default)]
    pub old_object: Option<Value>,
}

/// `request.kind`.
#[derive(Debug, Clone, Default, Deserialize)]
pub struct GroupVersionKind {
    #[serde(default)]
    pub group: String,
    #[serde(default)]
    pub version: String,
    #[serde(default)]
    pub kind: String,
}

/// `request.resource`.
#[derive(Debug, Clone, Default, Deserialize)]
pub struct GroupVersionResource {
    #[serde(default)]
    pub group: String,
    #[serde(default)]
    pub version: String,
    #[serde(default)]
    pub resource: String,
}

impl AdmissionReview {
    /// What makes this review one the API server never sends (another `apiVersion` than v1, a
    /// top-level `kind` other than `AdmissionReview`, no request, a request without a `uid`), as
    /// the message its answer carries; `None` for a well-formed review.
    pub fn problem(&self) -> Option<String> {
        if let Some(version) = self.api_version.as_deref()
            && version != API_VERSION
        {
            return Some(format!(
                "AdmissionReview {version} is not supported (only {API_VERSION})"
            ));
        }
        if self.kind.as_deref() != Some("AdmissionReview") {
            return Some(format!(
                "kind {} is not AdmissionReview",
                self.kind
                    .as_deref()
                    .map_or("(none)".to_owned(), |k| format!("{k:?}"))
            ));
        }
        match &self.request {
            None => Some("the AdmissionReview has no request".to_owned()),
            // The API server matches the answer to its request by the uid, and never sends one
            // without.
            Some(request) if request.uid.is_empty() => Some("the request has no uid".to_owned()),
            Some(_) => None,
        }
    }
}

impl AdmissionRequest {
    /// A pod (core group), not one of its subresources (`status`, `ephemeralcontainers`, ...).
    pub fn is_pod(&self) -> bool {
        self.is_pod_resource() && self.sub_resource.as_deref().is_none_or(str::is_empty)
    }

    /// A pod's `ephemeralcontainers` subresource (what `kubectl debug` updates); its `object` and
    /// `oldObject` are the whole Pod.
    pub fn is_pod_ephemeral_containers(&self) -> bool {
        self.is_pod_resource() && self.sub_resource.as_deref() == Some("ephemeralcontainers")
    }

    /// A pod's `status` subresource: the API server keeps the spec of the update, but not the
    /// metadata, so its annotations change as a pod update's do.
    pub fn is_pod_status(&self) -> bool {
        self.is_pod_resource() && self.sub_resource.as_deref() == Some("status")
    }

    fn is_pod_resource(&self) -> bool {
        self.kind.as_ref().is_some_and(|k| k.kind == "Pod")
            && self.resource.as_ref().is_some_and(|r| r.resource == "pods")
    }
}

/// Why a body is not an AdmissionReview.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ParseError {
    #[error("the body nests arrays or objects deeper than 128 levels")]
    TooDeep,
    #[error("not an AdmissionReview: {0}")]
    Invalid(serde_json::Error),
    /// The API server's uids are UUIDs (36 characters); the uid is echoed in the answer and logged.
    #[error("request.uid is longer than {MAX_UID} bytes: not a Kubernetes uid")]
    UidTooLong,
}

/// The longest `request.uid` taken.
pub const MAX_UID: usize = 128;

impl ParseError {
    /// A short label for metrics: `too_deep`, `invalid` or `uid_too_long`.
    pub fn label(&self) -> &'static str {
        match self {
            Self::TooDeep => "too_deep",
            Self::Invalid(_) => "invalid",
            Self::UidTooLong => "uid_too_long",
        }
    }
}

/// Parses a request body (serde_json's recursion limit applies: see the module docs).
pub fn parse(body: &[u8]) -> Result<AdmissionReview, ParseError> {
    let review: AdmissionReview = serde_json::from_slice(body).map_err(|e| {
        if e.to_string().starts_with("recursion limit exceeded") {
            ParseError::TooDeep
        } else {
            ParseError::Invalid(e)
        }
    })?;
    if review
        .request
        .as_ref()
        .is_some_and(|r| r.uid.len() > MAX_UID)
    {
        return Err(ParseError::UidTooLong);
    }
    Ok(review)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn deep_bodies_are_refused_by_name_not_by_crashing() {
        for depth in [200, 100_000] {
            let object = format!("{}{}", "[".repeat(depth), "]".repeat(depth));
            let body = format!(r#"{{"request": {{"uid": "u", "object": {object}}}}}"#);
            let r = parse(body.as_bytes());
            assert!(matches!(r, Err(ParseError::TooDeep)), "{r:?}");
            let object = format!("{}1{}", "{\"a\":".repeat(depth), "}".repeat(depth));
            let body = format!(r#"{{"request": {{"uid": "u", "oldObject": {object}}}}}"#);
            let r = parse(body.as_bytes());
            assert!(matches!(r, Err(ParseError::TooDeep)), "{r:?}");
            // In a field the webhook does not read, nesting is skipped without recursion.
            let body = format!("{}1{}", "{\"a\":".repeat(depth), "}".repeat(depth));
            assert!(parse(body.as_bytes()).unwrap().request.is_none());
        }
        // Within the limit: parsed, the nesting kept in the object.
        let object = format!("{}1{}", "[".repeat(100), "]".repeat(100));
        let body = format!(r#"{{"request": {{"uid": "u", "object": {object}}}}}"#);
        let review = parse(body.as_bytes()).unwrap();
        assert!(review.request.unwrap().object.unwrap().is_array());
    }

    #[test]
    fn envelopes_are_typed() {
        let review = parse(
            br#"{"apiVersion": "admission.k8s.io/v1", "kind": "AdmissionReview",
                "request": {"uid": "u1", "kind": {"group": "", "version": "v1", "kind": "Pod"},
                "resource": {"group": "", "version": "v1", "resource": "pods"},
                "operation": "CREATE", "namespace": "shop", "userInfo": {"username": "x"},
                "object": {"metadata": {}}, "oldObject": null}}"#,
        )
        .unwrap();
        assert_eq!(review.api_version.as_deref(), Some(API_VERSION));
        let request = review.request.unwrap();
        assert!(request.is_pod());
        assert_eq!(request.uid, "u1");
        let uid = "u".repeat(MAX_UID);
        let body = format!(r#"{{"request": {{"uid": "{uid}"}}}}"#);
        assert!(parse(body.as_bytes()).is_ok());
        let body = format!(r#"{{"request": {{"uid": "{uid}x"}}}}"#);
        assert!(matches!(
            parse(body.as_bytes()),
            Err(ParseError::UidTooLong)
        ));
        assert_eq!(request.namespace.as_deref(), Some("shop"));
        assert!(request.old_object.is_none());
        // Wrong types are errors, not silently defaulted.
        assert!(matches!(
            parse(br#"{"request": {"uid": 7}}"#),
            Err(ParseError::Invalid(_))
        ));
        assert!(matches!(parse(b"not json"), Err(ParseError::Invalid(_))));
    }
}
