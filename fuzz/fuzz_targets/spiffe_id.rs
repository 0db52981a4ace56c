//! SPIFFE ID parsing: never panics; whatever parses is within the limits and parses again to itself.
#![no_main]

use libfuzzer_sys::fuzz_target;
use meshid_identity::SpiffeId;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    if let Ok(id) = SpiffeId::parse(text) {
        assert!(id.as_str().len() <= 2048);
        assert!(id.as_str().starts_with("spiffe://"));
        assert_eq!(SpiffeId::parse(id.as_str()).as_ref(), Ok(&id));
        assert!(
            id.segments()
                .all(|s| !s.is_empty() && s != "." && s != "..")
        );
    }
});
