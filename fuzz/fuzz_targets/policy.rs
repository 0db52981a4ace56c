//! The sidecar's policy file: never panics; a policy that parses answers decisions without
//! panicking, on fixed requests and on the fuzzer's own: after a line `---`, each line is
//! `METHOD PATH` (any bytes a peer could send in a request line: look-alikes, escapes,
//! `;` parameters), decided on every port.
#![no_main]

use libfuzzer_sys::fuzz_target;
use meshid_identity::SpiffeId;
use meshid_identity::policy::Policy;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let (policy, requests) = text.split_once("\n---\n").unwrap_or((text, ""));
    if let Ok(policy) = Policy::parse(policy) {
        let peer = SpiffeId::parse("spiffe://cluster.local/ns/shop/sa/frontend").expect("id");
        for port in [80, 8080, 9000] {
            let _ = policy.decide_connection(port, &peer);
            let _ = policy.decide_request(port, &peer, "GET", "/metrics");
            let _ = policy.decide_request(port, &peer, "POST", "/a/../b");
            for line in requests.lines().take(16) {
                let (method, path) = line.split_once(' ').unwrap_or((line, "/"));
                let _ = policy.decide_request(port, &peer, method, path);
            }
        }
    }
});
