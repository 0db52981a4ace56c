//! JWT-SVID verification as the sidecar's `ValidateJWTSVID` does it for an app, against a fixed JWT
//! bundle: never panics, and nothing the fuzzer makes up is accepted (it does not hold the signing
//! key). The same bytes as a bundle key (the CA's `TrustBundle.jwt_keys`) never panic either.
#![no_main]

use std::sync::OnceLock;

use libfuzzer_sys::fuzz_target;
use meshid_identity::TrustDomain;
use meshid_identity::jwt_svid::{JwtKey, JwtSigner, verify};

fn keys() -> &'static [JwtKey] {
    static KEYS: OnceLock<Vec<JwtKey>> = OnceLock::new();
    KEYS.get_or_init(|| {
        // Its private half is dropped at once.
        let key = rcgen::KeyPair::generate().expect("keygen");
        let signer = JwtSigner::from_pkcs8(&key.serialize_der()).expect("signer");
        vec![signer.public()]
    })
}

fuzz_target!(|data: &[u8]| {
    let _ = JwtKey::new("fuzz", data);
    let Ok(token) = std::str::from_utf8(data) else {
        return;
    };
    let td = TrustDomain::new("cluster.local").expect("td");
    assert!(verify(token, "db", keys(), &td, 1_700_000_000).is_err());
});
