//! Revocations, from both sides: any bytes as the CA directory's `revocations.json`, and any
//! serial text as `meshid-ca revoke --serial` and a trust bundle's entries give it. Never panic; a
//! list that parses is written back out and read again the same; a serial that normalizes is a
//! fixed point of the normalization.
#![no_main]

use std::path::Path;

use libfuzzer_sys::fuzz_target;
use meshid_ca::revocations::Revocations;
use meshid_identity::revocation::{RevocationSet, normalize_serial};

fuzz_target!(|data: &[u8]| {
    let path = Path::new("revocations.json");
    if let Ok(list) = Revocations::parse(path, data) {
        let dir = tempfile::tempdir().expect("tempdir");
        list.save(dir.path()).expect("save");
        assert_eq!(Revocations::load(dir.path()).expect("reload"), list);
    }
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    if let Ok(serial) = normalize_serial(text) {
        assert_eq!(normalize_serial(&serial).as_deref(), Ok(serial.as_str()));
        assert!(serial.len() <= 40 && serial.bytes().all(|b| b.is_ascii_hexdigit()));
    }
    let (id, serial) = text.split_once('\n').unwrap_or((text, ""));
    let _ = RevocationSet::entry(id, serial);
});
