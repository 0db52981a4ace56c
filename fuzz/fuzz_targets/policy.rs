//! The sidecar's policy file: never panics; a policy that parses answers decisions without panicking.
#![no_main]

use libfuzzer_sys::fuzz_target;
use meshid_identity::SpiffeId;
use meshid_identity::policy::Policy;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    if let Ok(policy) = Policy::parse(text) {
        let peer = SpiffeId::parse("spiffe://cluster.local/ns/shop/sa/frontend").expect("id");
        for port in [80, 8080, 9000] {
            let _ = policy.decide_connection(port, &peer);
            let _ = policy.decide_request(port, &peer, "GET", "/metrics");
            let _ = policy.decide_request(port, &peer, "POST", "/a/../b");
        }
    }
});
