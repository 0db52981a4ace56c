//! What operators expect of every binary's command line and logs, on the real binaries: each error
//! printed once, no escape codes in piped logs, JSON logs with a top-level `message`, enum flags
//! that list their values, one duration wording, renamed environment twins that still accept their
//! old names, the demo stopping everything on SIGTERM, and no libm loaded for the one `pow` the
//! sidecar and the CA call (`meshid_runtime::math`).

use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use meshid_tests::process::{Proc, free_addr, wait_http_ok};
use meshid_tests::tools::{bin_dir, workspace_bin};

fn output(cmd: &mut Command) -> (Option<i32>, String) {
    let out = cmd.stdin(Stdio::null()).output().unwrap();
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    (out.status.code(), text)
}

fn ca_dir() -> (tempfile::TempDir, String) {
    let dir = tempfile::tempdir().unwrap();
    let ca = dir.path().join("ca").to_str().unwrap().to_owned();
    let (code, out) = output(Command::new(workspace_bin("meshid-ca")).args(["init", "--dir", &ca]));
    assert_eq!(code, Some(0), "{out}");
    (dir, ca)
}

#[test]
fn a_bind_error_is_printed_once() {
    let (_dir, ca) = ca_dir();
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = taken.local_addr().unwrap().to_string();
    let admin = free_addr("127.0.0.1").to_string();
    let (code, out) = output(Command::new(workspace_bin("meshid-ca")).args([
        "serve",
        "--dir",
        &ca,
        "--listen",
        &addr,
        "--admin-listen",
        &admin,
    ]));
    assert_eq!(code, Some(1), "{out}");
    assert!(out.contains(&format!("binding {addr}: ")), "{out}");
    assert_eq!(out.matches("Address already in use").count(), 1, "{out}");
}

/// Runs `meshid-ca serve` with stderr piped until it is ready, stops it, and returns its stderr.
fn ca_log(format: &str) -> String {
    let (_dir, ca) = ca_dir();
    let admin = free_addr("127.0.0.1");
    let log = tempfile::NamedTempFile::new().unwrap();
    let mut proc = Proc::spawn(
        "meshid-ca",
        Command::new(workspace_bin("meshid-ca"))
            .args(["--log-format", format, "serve", "--dir", &ca])
            .args(["--listen", &free_addr("127.0.0.1").to_string()])
            .args(["--admin-listen", &admin.to_string(), "--grace", "1s"])
            .env("MESHID_LOG", "info")
            .env_remove("NO_COLOR")
            .stderr(log.reopen().unwrap()),
    );
    assert!(wait_http_ok(admin, "/readyz", Duration::from_secs(15)));
    proc.signal("TERM");
    assert!(proc.wait_timeout(Duration::from_secs(10)).is_some());
    std::fs::read_to_string(log.path()).unwrap()
}

#[test]
fn piped_text_logs_carry_no_escape_codes() {
    let text = ca_log("text");
    assert!(text.contains("shutting down"), "{text}");
    assert!(!text.contains('\x1b'), "{text:?}");
}

#[test]
fn json_logs_have_a_top_level_message() {
    let text = ca_log("json");
    let lines: Vec<serde_json::Value> = text
        .lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("{e}: {l}")))
        .collect();
    let stop = lines
        .iter()
        .find(|v| {
            v["message"]
                .as_str()
                .is_some_and(|m| m.starts_with("shutting down"))
        })
        .unwrap_or_else(|| panic!("no shutdown line in {text}"));
    assert!(stop.get("fields").is_none(), "{stop}");
    for key in ["timestamp", "level", "target"] {
        assert!(stop[key].is_string(), "{key} missing: {stop}");
    }
}

#[test]
fn enum_flags_list_their_values() {
    for (bin, args, listed) in [
        (
            "meshid-ca",
            &["--log-format", "yaml", "serve", "--dir", "x"][..],
            "[possible values: text, json]",
        ),
        (
            "meshid-sidecar",
            &["run", "--log-format", "yaml"][..],
            "[possible values: text, json]",
        ),
        (
            "meshid-injector",
            &["--pull-policy", "Sometimes"][..],
            "[possible values: Always, IfNotPresent, Never]",
        ),
    ] {
        let (code, out) = output(Command::new(workspace_bin(bin)).args(args));
        assert_eq!(code, Some(64), "{bin}: {out}");
        assert!(out.contains(listed), "{bin}: {out}");
    }
}

#[test]
fn durations_read_and_fail_alike_in_every_binary() {
    let (_dir, ca) = ca_dir();
    let want = r#"invalid duration "1.5x": unknown unit "x" (e.g. 30s, 1.5h, 1h30m; units ms, s, m, h, d)"#;
    let (code, out) = output(Command::new(workspace_bin("meshid-ca")).args([
        "serve",
        "--dir",
        &ca,
        "--max-ttl",
        "1.5x",
        "--ttl",
        "1.5h",
    ]));
    assert_eq!(code, Some(64), "{out}");
    assert!(out.contains(&format!("--max-ttl: {want}")), "{out}");
    assert!(!out.contains("--ttl"), "1.5h is a duration: {out}");
    let (code, out) = output(Command::new(workspace_bin("meshid-sidecar")).args([
        "run",
        "--outbound",
        "127.0.0.1:9001=b:80,spiffe://td/b",
        "--idle-timeout",
        "1.5x",
    ]));
    assert_eq!(code, Some(64), "{out}");
    assert!(out.contains(&format!("--idle-timeout: {want}")), "{out}");
}

#[test]
fn a_bad_inbound_is_not_also_nothing_to_do() {
    let (code, out) = output(Command::new(workspace_bin("meshid-sidecar")).args([
        "run",
        "--inbound",
        "0.0.0.0:15443=nope",
    ]));
    assert_eq!(code, Some(64), "{out}");
    assert!(out.contains("--inbound: "), "{out}");
    assert!(!out.contains("nothing to do"), "{out}");
}

#[test]
fn an_old_environment_name_still_works_with_a_warning() {
    let (code, out) = output(
        Command::new(workspace_bin("meshid-sidecar"))
            .args(["run", "--outbound", "127.0.0.1:9001=b:80,spiffe://td/b"])
            .env("MESHID_CA_ADDR", "not a host port")
            .env_remove("MESHID_SIDECAR_CA_ADDR"),
    );
    assert_eq!(code, Some(64), "{out}");
    assert!(
        out.contains("MESHID_CA_ADDR is deprecated") && out.contains("MESHID_SIDECAR_CA_ADDR"),
        "{out}"
    );
    // Read under the old name: CA mode, and its value checked.
    assert!(
        out.contains(r#"--ca-addr: "not a host port" is not HOST:PORT"#),
        "{out}"
    );
}

/// Started under a low soft limit on open files (systemd's default for services is 1,024), the
/// sidecar raises it to the hard limit before anything else, and says when its listeners'
/// connection caps add up to more than that. (Its credentials here are junk: it stops right after.)
#[test]
fn a_low_open_files_limit_is_raised_at_start() {
    let hard: u64 = std::fs::read_to_string("/proc/self/limits")
        .unwrap()
        .lines()
        .find(|l| l.starts_with("Max open files"))
        .and_then(|l| l.split_whitespace().nth(4)?.parse().ok())
        .expect("a numeric hard limit on open files");
    assert!(hard > 256, "hard limit {hard}");
    let dir = tempfile::tempdir().unwrap();
    let junk = dir.path().join("junk.pem");
    std::fs::write(&junk, "junk\n").unwrap();
    let junk = junk.to_str().unwrap();
    let caps = (hard + 1).to_string();
    let (code, out) = output(
        Command::new("bash")
            .args(["-c", "ulimit -Sn 256 && exec \"$0\" \"$@\""])
            .arg(workspace_bin("meshid-sidecar"))
            .args(["run", "--outbound", "127.0.0.1:9001=b:80,spiffe://td/b"])
            .args(["--cert", junk, "--key", junk, "--bundle", junk])
            .args(["--max-connections", &caps])
            .env("MESHID_LOG", "info")
            .env("NO_COLOR", "1"),
    );
    assert_eq!(code, Some(1), "{out}");
    assert!(
        out.contains(&format!(
            "raised the open files limit (RLIMIT_NOFILE) to its hard limit before=256 now={hard}"
        )),
        "{out}"
    );
    assert!(
        out.contains(&format!(
            "add up to more than the open files limit: under that load accepts, dials and \
             renewals fail first open_files={hard} connection_caps={caps}"
        )),
        "{out}"
    );
}

/// Every process whose command line mentions `needle`.
fn processes_mentioning(needle: &str) -> Vec<String> {
    let mut found = Vec::new();
    for entry in std::fs::read_dir("/proc").unwrap().flatten() {
        if let Ok(cmdline) = std::fs::read(entry.path().join("cmdline")) {
            let cmdline = String::from_utf8_lossy(&cmdline).replace('\0', " ");
            if cmdline.contains(needle) {
                found.push(format!(
                    "{}: {cmdline}",
                    entry.file_name().to_string_lossy()
                ));
            }
        }
    }
    found
}

/// The demo, running with the workspace's binaries, and its stdout line by line.
fn demo() -> (Proc, std::sync::mpsc::Receiver<String>) {
    workspace_bin("meshid-ca");
    workspace_bin("meshid-sidecar");
    let mut proc = Proc::spawn(
        "local-mesh",
        Command::new(workspace_bin("local-mesh"))
            .args(["--bin-dir", bin_dir().to_str().unwrap()])
            .env("MESHID_LOG", "warn")
            .stdout(Stdio::piped()),
    );
    let stdout = proc.take_stdout().unwrap();
    let (lines_tx, lines) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines().map_while(Result::ok) {
            let _ = lines_tx.send(line);
        }
    });
    (proc, lines)
}

#[test]
fn local_mesh_stops_its_children_and_cleans_up_on_sigterm() {
    let (mut proc, lines) = demo();
    let deadline = Instant::now() + Duration::from_secs(60);
    let mut seen = Vec::new();
    let mut work = None;
    while !seen.iter().any(|l: &String| l.starts_with("running;")) {
        let left = deadline.saturating_duration_since(Instant::now());
        let line = lines
            .recv_timeout(left)
            .unwrap_or_else(|_| panic!("the demo never came up:\n{}", seen.join("\n")));
        if let Some(dir) = line.split("working in ").nth(1) {
            work = Some(dir.trim().to_owned());
        }
        seen.push(line);
    }
    let work = work.expect("the demo names its working directory");
    assert!(
        processes_mentioning(&work).len() >= 3,
        "CA and sidecars running: {:?}",
        processes_mentioning(&work)
    );
    proc.signal("TERM");
    let status = proc.wait_timeout(Duration::from_secs(30));
    assert!(status.is_some(), "local-mesh still running after SIGTERM");
    assert_eq!(processes_mentioning(&work), Vec::<String>::new());
    assert!(!std::path::Path::new(&work).exists(), "{work} left behind");
    let rest: Vec<String> = lines.try_iter().collect();
    assert!(rest.iter().any(|l| l == "stopping"), "{rest:?}");
}

#[test]
fn local_mesh_cleans_up_on_sigterm_in_the_middle_of_its_setup() {
    // Stopped as soon as its first child (the CA) runs, before the sidecars and the checks: no
    // process and no directory may be left behind either.
    let (mut proc, lines) = demo();
    let deadline = Instant::now() + Duration::from_secs(60);
    let mut seen = Vec::new();
    let work = loop {
        let left = deadline.saturating_duration_since(Instant::now());
        let line = lines
            .recv_timeout(left)
            .unwrap_or_else(|_| panic!("the demo never started:\n{}", seen.join("\n")));
        if let Some(dir) = line.split("working in ").nth(1) {
            break dir.trim().to_owned();
        }
        seen.push(line);
    };
    while processes_mentioning(&work).is_empty() {
        assert!(Instant::now() < deadline, "no child ever started");
        std::thread::sleep(Duration::from_millis(10));
    }
    proc.signal("TERM");
    let status = proc.wait_timeout(Duration::from_secs(30));
    assert!(status.is_some(), "local-mesh still running after SIGTERM");
    assert_eq!(processes_mentioning(&work), Vec::<String>::new());
    assert!(!std::path::Path::new(&work).exists(), "{work} left behind");
}

/// The sidecar and the CA define the one libm function they call (`pow`), so the loader maps no
/// libm into them: 0.3 MiB of an idle sidecar's RSS (`meshid_runtime::math`). A dependency that
/// starts calling another libm function brings it back; this names it.
#[test]
fn the_sidecar_and_the_ca_load_no_libm() {
    for name in ["meshid-sidecar", "meshid-ca"] {
        let bin = workspace_bin(name);
        let out = Command::new("readelf")
            .arg("--dynamic")
            .arg(&bin)
            .output()
            .expect("readelf (binutils) runs");
        assert!(out.status.success(), "readelf {}", bin.display());
        let text = String::from_utf8_lossy(&out.stdout);
        assert!(
            text.contains("(NEEDED)") && text.contains("libc.so"),
            "{name}: readelf shows no needed libraries:\n{text}"
        );
        let libm: Vec<&str> = text
            .lines()
            .filter(|l| l.contains("(NEEDED)") && l.contains("libm.so"))
            .collect();
        assert!(
            libm.is_empty(),
            "{name} needs libm again (define the function in meshid_runtime::math, or accept \
             the RSS and update this test): {libm:#?}"
        );
    }
}
