//! Detects the outside tools the end-to-end tests use, so a test whose tool is missing is ignored with
//! the reason instead of silently passing. Under CI (`CI=true`) every tool counts as present: a
//! missing one then fails its tests loudly, because `.ci/run` installs them.

use std::path::PathBuf;
use std::process::Command;

fn find(tool: &str) -> Option<PathBuf> {
    let path = std::env::var_os("PATH")?;
    std::env::split_paths(&path)
        .map(|d| d.join(tool))
        .find(|p| p.is_file())
}

fn main() {
    let ci = std::env::var("CI").is_ok_and(|v| v == "true" || v == "1");
    println!("cargo::rerun-if-env-changed=CI");
    println!("cargo::rerun-if-env-changed=PATH");
    for (tool, cfg) in [
        ("openssl", "have_openssl"),
        ("curl", "have_curl"),
        ("python3", "have_python3"),
    ] {
        println!("cargo::rustc-check-cfg=cfg({cfg})");
        match find(tool) {
            Some(p) => {
                println!("cargo::rerun-if-changed={}", p.display());
                println!("cargo::rustc-cfg={cfg}");
            }
            None if ci => println!("cargo::rustc-cfg={cfg}"),
            // A path that does not exist makes cargo re-run this script until the tool appears.
            None => println!("cargo::rerun-if-changed=/nonexistent/{tool}"),
        }
    }
    // promtool: scripts/install-test-tools.sh puts it in the workspace's .tools/promtool/bin.
    println!("cargo::rustc-check-cfg=cfg(have_promtool)");
    let local =
        std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../.tools/promtool/bin/promtool");
    println!("cargo::rerun-if-changed={}", local.display());
    let promtool = local
        .is_file()
        .then(|| local.clone())
        .or_else(|| find("promtool"));
    if promtool.is_some() || ci {
        println!("cargo::rustc-cfg=have_promtool");
    }
    println!(
        "cargo::rustc-env=MESHID_TEST_PROMTOOL={}",
        promtool.unwrap_or(local).display()
    );
    println!("cargo::rustc-check-cfg=cfg(have_grpcio)");
    let grpcio = Command::new("python3")
        .args(["-c", "import grpc, grpc_tools"])
        .status()
        .is_ok_and(|s| s.success());
    if grpcio || ci {
        println!("cargo::rustc-cfg=have_grpcio");
    }
    // py-spiffe (`spiffe` on PyPI): an outside client of the sidecar's SPIFFE Workload API.
    println!("cargo::rustc-check-cfg=cfg(have_py_spiffe)");
    let py_spiffe = Command::new("python3")
        .args(["-c", "import spiffe"])
        .status()
        .is_ok_and(|s| s.success());
    if py_spiffe || ci {
        println!("cargo::rustc-cfg=have_py_spiffe");
    }
    println!("cargo::rustc-check-cfg=cfg(have_openmetrics_parser)");
    let parser = Command::new("python3")
        .args(["-c", "import prometheus_client.openmetrics.parser"])
        .status()
        .is_ok_and(|s| s.success());
    if parser || ci {
        println!("cargo::rustc-cfg=have_openmetrics_parser");
    }
}
