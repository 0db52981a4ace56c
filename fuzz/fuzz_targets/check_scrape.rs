//! What `meshid-ca check` reads from the network without a library's parser: Prometheus text from a
//! CA or sidecar `/metrics`, and PEM certificates from a ConfigMap or a webhook's caBundle. Never
//! panic; every sample read back names itself.
#![no_main]

use libfuzzer_sys::fuzz_target;
use meshid_ca::check::certs::parse_pem;
use meshid_ca::check::prom::Scrape;

fuzz_target!(|data: &[u8]| {
    let _ = parse_pem(data);
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let scrape = Scrape::parse(text);
    for s in &scrape.samples {
        assert!(!s.name.is_empty());
        assert!(scrape.find(&s.name, &[]).next().is_some());
    }
});
