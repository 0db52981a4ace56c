//! Build script of `meshid-sidecar` and `meshid-ca`: lays out the shipped binary's machine code in
//! the order it runs.
//!
//! An idle process's largest share of resident memory is its own code: the kernel maps 64 KiB of
//! the binary around every page first touched, so the functions that run at start-up and on the
//! request path, scattered through 8 MiB of `.text`, kept most of it resident. The package's
//! `symbol-order.txt` lists those functions (recorded by `scripts/symbol-order.sh` from the `dist`
//! build); the linker puts them first, together. The list only moves code: a name it no longer
//! finds (another toolchain, another dependency version) leaves that function where it was.
//!
//! Applied to the package's binary of the same name, where the linker is LLD, the default of
//! Rust's `x86_64-unknown-linux-gnu` target, in optimised builds (`release` and `dist`; the names
//! only match `dist`, which ships).

use std::path::Path;

fn main() {
    let order = Path::new(env!("CARGO_MANIFEST_DIR")).join("symbol-order.txt");
    println!("cargo::rerun-if-changed={}", order.display());
    println!("cargo::rerun-if-env-changed=MESHID_SYMBOL_ORDER");
    let target = std::env::var("TARGET").unwrap_or_default();
    let profile = std::env::var("PROFILE").unwrap_or_default();
    let bin = env!("CARGO_PKG_NAME");
    // `MESHID_SYMBOL_ORDER=off` builds without it (to measure what it changes).
    let off = std::env::var("MESHID_SYMBOL_ORDER").is_ok_and(|v| v == "off");
    if target != "x86_64-unknown-linux-gnu" || profile != "release" || off || !order.exists() {
        return;
    }
    println!(
        "cargo::rustc-link-arg-bin={bin}=-Wl,--symbol-ordering-file={}",
        order.display()
    );
    // Names the build no longer has are expected after a dependency update: no warning per name.
    println!("cargo::rustc-link-arg-bin={bin}=-Wl,--no-warn-symbol-ordering");
}
