//! The machine and the versions of everything measured, recorded with every run.

use std::process::Command;

use serde_json::{Value, json};

fn run(program: &str, args: &[&str]) -> String {
    Command::new(program)
        .args(args)
        .output()
        .map(|o| {
            let mut s = String::from_utf8_lossy(&o.stdout).into_owned();
            s.push_str(&String::from_utf8_lossy(&o.stderr));
            s.trim().to_owned()
        })
        .unwrap_or_else(|e| format!("unavailable: {e}"))
}

fn first_line(s: String) -> String {
    s.lines().next().unwrap_or_default().to_owned()
}

fn cpuinfo(key: &str) -> Option<String> {
    let text = std::fs::read_to_string("/proc/cpuinfo").ok()?;
    text.lines()
        .find(|l| l.starts_with(key))
        .and_then(|l| l.split_once(':'))
        .map(|(_, v)| v.trim().to_owned())
}

fn meminfo_total_kib() -> Option<u64> {
    let text = std::fs::read_to_string("/proc/meminfo").ok()?;
    text.lines()
        .find(|l| l.starts_with("MemTotal:"))?
        .split_whitespace()
        .nth(1)?
        .parse()
        .ok()
}

/// Machine description.
pub fn machine() -> Value {
    let os = std::fs::read_to_string("/etc/os-release")
        .ok()
        .and_then(|t| {
            t.lines().find(|l| l.starts_with("PRETTY_NAME=")).map(|l| {
                l.trim_start_matches("PRETTY_NAME=")
                    .trim_matches('"')
                    .to_owned()
            })
        })
        .unwrap_or_default();
    json!({
        "cpu_model": cpuinfo("model name"),
        "cpus": std::fs::read_to_string("/proc/cpuinfo")
            .map(|t| t.lines().filter(|l| l.starts_with("processor")).count())
            .unwrap_or(0),
        "memory_kib": meminfo_total_kib(),
        "kernel": run("uname", &["-srm"]),
        "os": os,
        "loadavg_at_start": std::fs::read_to_string("/proc/loadavg").unwrap_or_default().trim(),
    })
}

/// Versions of the contenders and tools.
pub fn versions(bin_dir: &std::path::Path) -> Value {
    let sidecar = bin_dir.join("meshid-sidecar");
    let git_dirty = !run(
        "git",
        &[
            "--no-optional-locks",
            "status",
            "--porcelain",
            "--untracked-files=no",
        ],
    )
    .is_empty();
    json!({
        "meshid_sidecar": first_line(run(&sidecar.to_string_lossy(), &["--version"])),
        "meshid_git_commit": run("git", &["rev-parse", "HEAD"]),
        "meshid_git_dirty": git_dirty,
        "rustc": run("rustc", &["--version"]),
        "nginx": run("nginx", &["-v"]),
        "haproxy": first_line(run("haproxy", &["-v"])),
        "openssl": run("openssl", &["version"]),
        "tls_load_generator": "meshload (hyper 1 + rustls 0.23 with aws-lc-rs), one thread",
    })
}
