//! An AdmissionReview body as the injector's webhook reads it: first its memory charge
//! (`cost::review_cost`, a scanner of its own over the raw bytes), then the parse and the answer in
//! both scopes. Never panics; the charge is at least the body's length; every answer is an
//! AdmissionReview whose response carries the request's `uid` and says allowed or not, and a patch
//! it carries is base64 of a JSON Patch (an array of operations, each with an `op` and a `path`
//! that is a JSON Pointer).
#![no_main]

use std::sync::LazyLock;

use base64::Engine;
use libfuzzer_sys::fuzz_target;
use meshid_injector::{InjectConfig, Scope, TrustBundle, admission, answer, cost};

static CONFIG: LazyLock<InjectConfig> = LazyLock::new(|| {
    let mut params = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
    params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
    let key = rcgen::KeyPair::generate().unwrap();
    let root = params.self_signed(&key).unwrap();
    InjectConfig::new(TrustBundle::from_pem(root.pem().as_bytes()).unwrap())
});

fuzz_target!(|data: &[u8]| {
    let bundle = CONFIG.trust_bundle.len();
    assert!(cost::review_cost(data, bundle) >= data.len() as u64);
    let Ok(review) = admission::parse(data) else {
        return;
    };
    let uid = review.request.as_ref().map_or("", |r| r.uid.as_str());
    for scope in [Scope::Pod, Scope::Namespace] {
        let out = answer(&CONFIG, scope, &review);
        assert_eq!(out["kind"], "AdmissionReview");
        let response = &out["response"];
        assert_eq!(response["uid"], uid);
        assert!(response["allowed"].is_boolean(), "{out}");
        if let Some(patch) = response["patch"].as_str() {
            let text = base64::engine::general_purpose::STANDARD
                .decode(patch)
                .expect("a patch is base64");
            let ops: serde_json::Value = serde_json::from_slice(&text).expect("a patch is JSON");
            for op in ops.as_array().expect("a JSON Patch is an array") {
                assert!(op["op"].is_string(), "{op}");
                let path = op["path"].as_str().expect("every operation has a path");
                assert!(path.is_empty() || path.starts_with('/'), "{path}");
            }
        }
    }
});
