//! The downward-API annotations file and the `meshid.io/*` annotations in it (what the sidecar and
//! the injector read from a pod): never panic, and writing a parsed file back out and parsing it
//! again gives the same annotations.
#![no_main]

use std::net::{IpAddr, Ipv4Addr};

use libfuzzer_sys::fuzz_target;
use meshid_identity::annotations::{
    MeshAnnotations, app_probe, parse_downward_api, policy_or_annotations, to_downward_api,
};

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let _ = policy_or_annotations(text);
    if let Ok(map) = parse_downward_api(text) {
        assert_eq!(
            parse_downward_api(&to_downward_api(&map)).as_ref(),
            Ok(&map)
        );
        let _ = app_probe(&map, "app/readiness");
        if let Ok(mesh) = MeshAnnotations::from_map(&map) {
            let _ = mesh.inbound_args(IpAddr::V4(Ipv4Addr::new(10, 0, 0, 7)));
            let _ = mesh.outbound_args();
            let _ = mesh.policy();
        }
    }
});
