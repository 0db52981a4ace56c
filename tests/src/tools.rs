//! Outside tools (openssl, curl, python3 grpcio) that check our work independently.

use std::path::PathBuf;
use std::process::Command;

/// Whether a command can be run.
pub fn have(tool: &str) -> bool {
    Command::new(tool)
        .arg("version")
        .output()
        .map(|_| true)
        .unwrap_or(false)
}

/// Fails the test with an install hint when a required tool is missing.
pub fn require(tool: &str, install: &str) {
    assert!(
        have(tool),
        "{tool} is required by this test; install it with `{install}` (scripts/test does this)"
    );
}

/// Runs a command, returning (success, stdout + stderr).
pub fn run(cmd: &mut Command) -> (bool, String) {
    let out = cmd.output().expect("spawn");
    let mut text = String::from_utf8_lossy(&out.stdout).into_owned();
    text.push_str(&String::from_utf8_lossy(&out.stderr));
    (out.status.success(), text)
}

/// The directory holding the workspace's built binaries (`target/debug` next to the test binary).
pub fn bin_dir() -> PathBuf {
    let exe = std::env::current_exe().expect("current exe");
    // target/debug/deps/<test> -> target/debug
    exe.parent()
        .and_then(|p| p.parent())
        .map(PathBuf::from)
        .expect("target dir")
}

/// Path of a workspace binary, building it with cargo if it is not there yet.
pub fn workspace_bin(name: &str) -> PathBuf {
    let path = bin_dir().join(name);
    if !path.exists() {
        let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
        let status = Command::new(cargo)
            .args(["build", "--workspace", "--bin", name])
            .status()
            .expect("run cargo build");
        assert!(
            status.success(),
            "cargo build --workspace --bin {name} failed"
        );
    }
    path
}
