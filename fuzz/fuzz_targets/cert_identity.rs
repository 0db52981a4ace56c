//! Identity extraction from a DER certificate (what both sides do after webpki): never panics, and
//! an identity it returns is a valid SPIFFE ID.
#![no_main]

use libfuzzer_sys::fuzz_target;
use meshid_identity::{SpiffeId, cert_identity_from_der, spiffe_id_from_der};

fuzz_target!(|data: &[u8]| {
    if let Ok(id) = spiffe_id_from_der(data) {
        assert_eq!(SpiffeId::parse(id.as_str()).as_ref(), Ok(&id));
    }
    let _ = cert_identity_from_der(data);
});
