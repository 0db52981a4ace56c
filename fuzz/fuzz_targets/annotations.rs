//! The downward-API annotations file and the `meshid.io/*` annotations in it (what the sidecar and
//! the injector read from a pod): never panic.
#![no_main]

use libfuzzer_sys::fuzz_target;
use meshid_sidecar::annotations::{MeshAnnotations, parse_downward_api};

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    if let Ok(map) = parse_downward_api(text) {
        let _ = MeshAnnotations::from_map(&map);
    }
});
