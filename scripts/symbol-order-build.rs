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
//!
//! With `MESHID_PACKED_RELOCS=on` (the Dockerfiles and `bench/run.sh` set it), optimised builds
//! also pack the binary's relative relocations (`-z pack-relative-relocs`, DT_RELR) where the
//! build machine's glibc can load them (2.36 and later: the Dockerfiles' build image and their
//! distroless Debian 12 run image). A position-independent executable carries one relocation per
//! pointer in its read-only data (vtables, string slices: about 15,000), 24 bytes each in
//! `.rela.dyn`, and the loader reads all of them at every start: 368 KiB of a sidecar's idle RSS.
//! Packed, they are a bitmap of a few KiB, and the binary stays position-independent. Not the
//! default: such a binary needs glibc 2.36 to start (it names `GLIBC_ABI_DT_RELR`), and a sidecar
//! built for a VM beside its workload may run on an older one (RHEL 9: 2.34).

use std::path::Path;

fn main() {
    let order = Path::new(env!("CARGO_MANIFEST_DIR")).join("symbol-order.txt");
    println!("cargo::rerun-if-changed={}", order.display());
    println!("cargo::rerun-if-env-changed=MESHID_SYMBOL_ORDER");
    println!("cargo::rerun-if-env-changed=MESHID_PACKED_RELOCS");
    let target = std::env::var("TARGET").unwrap_or_default();
    let profile = std::env::var("PROFILE").unwrap_or_default();
    let bin = env!("CARGO_PKG_NAME");
    if target != "x86_64-unknown-linux-gnu" || profile != "release" {
        return;
    }
    if std::env::var("MESHID_PACKED_RELOCS").is_ok_and(|v| v == "on") {
        if glibc_loads_relr() {
            println!("cargo::rustc-link-arg-bin={bin}=-Wl,-z,pack-relative-relocs");
        } else {
            println!(
                "cargo::warning=MESHID_PACKED_RELOCS=on, but this machine's glibc is older than \
                 2.36: relocations left unpacked"
            );
        }
    }
    // `MESHID_SYMBOL_ORDER=off` builds without it (to measure what it changes).
    let off = std::env::var("MESHID_SYMBOL_ORDER").is_ok_and(|v| v == "off");
    if off || !order.exists() {
        return;
    }
    println!(
        "cargo::rustc-link-arg-bin={bin}=-Wl,--symbol-ordering-file={}",
        order.display()
    );
    // Names the build no longer has are expected after a dependency update: no warning per name.
    println!("cargo::rustc-link-arg-bin={bin}=-Wl,--no-warn-symbol-ordering");
}

/// Whether this machine's glibc (which the binary is built against; the Dockerfiles run it on the
/// same Debian release) understands DT_RELR: 2.36 or later.
fn glibc_loads_relr() -> bool {
    let Ok(out) = std::process::Command::new("getconf")
        .arg("GNU_LIBC_VERSION")
        .output()
    else {
        return false;
    };
    // "glibc 2.36"
    let text = String::from_utf8_lossy(&out.stdout);
    let Some(version) = text.trim().strip_prefix("glibc ") else {
        return false;
    };
    let mut parts = version.split('.').map(|p| p.parse::<u32>().ok());
    match (parts.next().flatten(), parts.next().flatten()) {
        (Some(major), Some(minor)) => (major, minor) >= (2, 36),
        _ => false,
    }
}
