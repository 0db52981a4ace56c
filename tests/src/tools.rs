//! Outside tools (openssl, curl, python3 grpcio, helm) that check our work independently.

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

/// The tools `scripts/k8s/install-tools.sh` installs into the workspace's `.tools/k8s/`: helm, and a
/// Python with PyYAML (the venv of kubernetes-validate and checkov).
fn k8s_tools() -> Option<(PathBuf, PathBuf)> {
    let tools = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()?
        .join(".tools/k8s");
    let helm = tools.join("bin/helm");
    let python = tools.join("venv/bin/python");
    (helm.is_file() && python.is_file()).then_some((helm, python))
}

/// Renders `helm/meshid` (release `meshid` in namespace `meshid`) with `args` (`--set` and the
/// like), each rendered object as JSON; `None` when the tools of `scripts/k8s/install-tools.sh` are
/// not installed. A chart that does not render fails the test with helm's message.
pub fn render_chart(args: &[&str]) -> Option<Vec<serde_json::Value>> {
    let (helm, python) = k8s_tools()?;
    let chart = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()?
        .join("helm/meshid");
    let out = Command::new(helm)
        .args(["template", "meshid"])
        .arg(&chart)
        .args(["--namespace", "meshid"])
        .args(args)
        .output()
        .expect("run helm");
    assert!(
        out.status.success(),
        "helm template {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let dir = tempfile::tempdir().expect("tempdir");
    let rendered = dir.path().join("all.yaml");
    std::fs::write(&rendered, &out.stdout).expect("write the rendering");
    let out = Command::new(python)
        .arg("-c")
        .arg(
            "import json, sys, yaml\n\
             docs = [d for d in yaml.safe_load_all(open(sys.argv[1])) if d]\n\
             print(json.dumps(docs))",
        )
        .arg(&rendered)
        .output()
        .expect("run python");
    assert!(
        out.status.success(),
        "YAML to JSON: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let json = String::from_utf8_lossy(&out.stdout);
    Some(serde_json::from_str(&json).expect("JSON from the rendered chart"))
}
