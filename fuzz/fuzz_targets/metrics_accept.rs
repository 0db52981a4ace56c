//! The admin server's `/metrics` format negotiation and OpenMetrics-to-0.0.4 conversion: an
//! `Accept` header is anyone's input (each line of the data is one header value; the whole data, as
//! text, is also converted). Never panics; the conversion keeps no `# EOF` or `# UNIT` line.
#![no_main]

use libfuzzer_sys::fuzz_target;
use meshid_runtime::exposition::{negotiate, to_prometheus_text};

fuzz_target!(|data: &[u8]| {
    let _ = negotiate(data.split(|b| *b == b'\n'));
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let converted = to_prometheus_text(text);
    assert!(
        !converted
            .lines()
            .any(|l| l == "# EOF" || l.starts_with("# UNIT "))
    );
});
