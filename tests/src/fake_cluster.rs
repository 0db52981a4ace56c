//! A fake Kubernetes service-account token issuer: its own RSA and EC keys, a JWKS document as the
//! API server serves at `/openid/v1/jwks`, and projected tokens shaped like kube-apiserver's.
//!
//! Tokens are assembled by hand (not with a JWT library) so tests can also forge hostile ones.

use std::path::Path;

use aws_lc_rs::rand::SystemRandom;
use aws_lc_rs::rsa::KeySize;
use aws_lc_rs::signature::{
    ECDSA_P256_SHA256_FIXED_SIGNING, EcdsaKeyPair, KeyPair, RSA_PKCS1_SHA256, RsaKeyPair,
};
use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use serde_json::{Value, json};

/// The issuer real clusters use by default.
pub const ISSUER: &str = "https://kubernetes.default.svc.cluster.local";
/// The audience meshid's projected tokens carry.
pub const AUDIENCE: &str = "meshid-ca";

/// Which of the issuer's keys signs a token.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum KeyKind {
    Rsa,
    Ec,
}

/// A fake cluster token issuer.
pub struct FakeCluster {
    rsa: RsaKeyPair,
    ec: EcdsaKeyPair,
    pub rsa_kid: String,
    pub ec_kid: String,
    rng: SystemRandom,
}

/// The claims of one token, starting from a valid projected token; tests change what they need.
#[derive(Debug, Clone)]
pub struct TokenSpec {
    pub header: Value,
    pub claims: Value,
    pub key: KeyKind,
}

fn b64(bytes: &[u8]) -> String {
    URL_SAFE_NO_PAD.encode(bytes)
}

impl FakeCluster {
    /// A cluster with fresh RSA-2048 and ECDSA P-256 signing keys.
    pub fn new() -> Self {
        let rsa = RsaKeyPair::generate(KeySize::Rsa2048).expect("rsa keygen");
        let ec = EcdsaKeyPair::generate(&ECDSA_P256_SHA256_FIXED_SIGNING).expect("ec keygen");
        Self {
            rsa,
            ec,
            rsa_kid: "rsa-key-1".into(),
            ec_kid: "ec-key-1".into(),
            rng: SystemRandom::new(),
        }
    }

    /// The JWKS document of both keys.
    pub fn jwks(&self) -> Value {
        let n = self.rsa.public_key().modulus();
        let e = self.rsa.public_key().exponent();
        let point = self.ec.public_key().as_ref();
        json!({
            "keys": [
                {
                    "use": "sig", "kty": "RSA", "kid": self.rsa_kid, "alg": "RS256",
                    "n": b64(n.big_endian_without_leading_zero()),
                    "e": b64(e.big_endian_without_leading_zero()),
                },
                {
                    "use": "sig", "kty": "EC", "kid": self.ec_kid, "alg": "ES256", "crv": "P-256",
                    "x": b64(&point[1..33]), "y": b64(&point[33..65]),
                }
            ]
        })
    }

    /// Writes the JWKS to a file, as a ConfigMap or a fetched `/openid/v1/jwks` would be.
    pub fn write_jwks(&self, path: &Path) {
        std::fs::write(path, serde_json::to_vec_pretty(&self.jwks()).unwrap()).unwrap();
    }

    /// A valid projected token for `namespace/service_account`, signed with `key`.
    pub fn spec(&self, namespace: &str, service_account: &str, key: KeyKind) -> TokenSpec {
        let iat = unix_now();
        let (alg, kid) = match key {
            KeyKind::Rsa => ("RS256", &self.rsa_kid),
            KeyKind::Ec => ("ES256", &self.ec_kid),
        };
        TokenSpec {
            header: json!({ "alg": alg, "kid": kid }),
            claims: json!({
                "aud": [AUDIENCE],
                "exp": iat + 600,
                "iat": iat,
                "nbf": iat,
                "iss": ISSUER,
                "jti": "0b7c4f3e-2d5a-4f6e-9b1a-5c8d7e6f5a4b",
                "kubernetes.io": {
                    "namespace": namespace,
                    "node": { "name": "node-1", "uid": "4b0d5e0a-1c2d-4e3f-8a9b-0c1d2e3f4a5b" },
                    "pod": { "name": format!("{service_account}-7d9f8b-x2x4q"), "uid": "9a8b7c6d-5e4f-4a3b-8c2d-1e0f9a8b7c6d" },
                    "serviceaccount": { "name": service_account, "uid": "1f2e3d4c-5b6a-4978-8695-a4b3c2d1e0f9" }
                },
                "sub": format!("system:serviceaccount:{namespace}:{service_account}"),
            }),
            key,
        }
    }

    /// A valid RS256 token.
    pub fn token(&self, namespace: &str, service_account: &str) -> String {
        self.sign(&self.spec(namespace, service_account, KeyKind::Rsa))
    }

    /// Encodes and signs a token spec with the issuer's key for `spec.key`.
    pub fn sign(&self, spec: &TokenSpec) -> String {
        let message = format!(
            "{}.{}",
            b64(spec.header.to_string().as_bytes()),
            b64(spec.claims.to_string().as_bytes())
        );
        let sig = match spec.key {
            KeyKind::Rsa => {
                let mut sig = vec![0; self.rsa.public_modulus_len()];
                self.rsa
                    .sign(&RSA_PKCS1_SHA256, &self.rng, message.as_bytes(), &mut sig)
                    .expect("rsa sign");
                sig
            }
            KeyKind::Ec => self
                .ec
                .sign(&self.rng, message.as_bytes())
                .expect("ec sign")
                .as_ref()
                .to_vec(),
        };
        format!("{message}.{}", b64(&sig))
    }

    /// The classic key-confusion forgery: HS256 with the issuer's RSA public key as the HMAC secret.
    pub fn forge_hs256_with_public_key(&self, spec: &TokenSpec) -> String {
        let mut header = spec.header.clone();
        header["alg"] = json!("HS256");
        let message = format!(
            "{}.{}",
            b64(header.to_string().as_bytes()),
            b64(spec.claims.to_string().as_bytes())
        );
        let secret = self.jwks()["keys"][0]["n"]
            .as_str()
            .unwrap_or("")
            .to_owned();
        let key = aws_lc_rs::hmac::Key::new(aws_lc_rs::hmac::HMAC_SHA256, secret.as_bytes());
        let tag = aws_lc_rs::hmac::sign(&key, message.as_bytes());
        format!("{message}.{}", b64(tag.as_ref()))
    }

    /// An unsigned token (`alg: none`).
    pub fn forge_alg_none(&self, spec: &TokenSpec) -> String {
        let mut header = spec.header.clone();
        header["alg"] = json!("none");
        format!(
            "{}.{}.",
            b64(header.to_string().as_bytes()),
            b64(spec.claims.to_string().as_bytes())
        )
    }

    /// A validly signed token whose payload is then swapped for another (signature no longer matches).
    pub fn tamper(&self, token: &str, new_claims: &Value) -> String {
        let mut parts: Vec<String> = token.split('.').map(str::to_owned).collect();
        parts[1] = b64(new_claims.to_string().as_bytes());
        parts.join(".")
    }
}

impl Default for FakeCluster {
    fn default() -> Self {
        Self::new()
    }
}

/// Seconds since the epoch, for building claims.
pub use meshid_runtime::time::unix_now;
