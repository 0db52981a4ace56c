//! The CA's CSR check (signature and key type): never panics on any bytes.
#![no_main]

use libfuzzer_sys::fuzz_target;
use meshid_ca::csr::CsrPublicKey;

fuzz_target!(|data: &[u8]| {
    if let Ok(key) = CsrPublicKey::from_csr_der(data) {
        assert!(!key.raw().is_empty());
    }
});
