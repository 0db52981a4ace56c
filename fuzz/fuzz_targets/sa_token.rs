//! Service-account token verification against a fixed JWKS: never panics, and nothing the fuzzer
//! makes up is accepted (it does not hold the signing key).
#![no_main]

use std::sync::OnceLock;

use base64::Engine;
use libfuzzer_sys::fuzz_target;
use meshid_ca::auth::{JwtAuthenticator, JwtConfig};
use meshid_identity::TrustDomain;

fn authenticator() -> &'static JwtAuthenticator {
    static AUTH: OnceLock<(JwtAuthenticator, tempfile::TempDir)> = OnceLock::new();
    &AUTH
        .get_or_init(|| {
            // A P-256 public key as a JWK; its private half is dropped at once.
            let key = rcgen::KeyPair::generate().expect("keygen");
            let point = key.public_key_raw();
            let b64 = |b: &[u8]| base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(b);
            let jwks = serde_json::json!({"keys": [{
                "kty": "EC", "crv": "P-256", "alg": "ES256", "use": "sig", "kid": "fuzz",
                "x": b64(&point[1..33]), "y": b64(&point[33..65]),
            }]});
            let dir = tempfile::tempdir().expect("tempdir");
            let path = dir.path().join("jwks.json");
            std::fs::write(&path, jwks.to_string()).expect("write jwks");
            let config = JwtConfig {
                jwks: meshid_ca::auth::JwksSource::File(path),
                issuer: "https://kubernetes.default.svc.cluster.local".into(),
                audience: "meshid-ca".into(),
                allowed_namespaces: None,
                max_token_lifetime: JwtConfig::DEFAULT_MAX_TOKEN_LIFETIME,
                dangerous_accept_unbound_tokens: false,
                token_review: false,
            };
            let td = TrustDomain::new("cluster.local").expect("td");
            (
                JwtAuthenticator::new(config, td).expect("authenticator"),
                dir,
            )
        })
        .0
}

fuzz_target!(|data: &[u8]| {
    let Ok(token) = std::str::from_utf8(data) else {
        return;
    };
    assert!(authenticator().authenticate(token).is_err());
});
