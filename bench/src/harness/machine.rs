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
    // What the measured binaries were built with: the directory says the profile (`dist`: fat
    // LTO with the recorded PGO profile and symbol order; `release`; a `MESHID_BIN_DIR`), and
    // the two files' hashes say which profile and order (recorded on these benchmark loads).
    let profile = bin_dir.file_name().map_or_else(
        || bin_dir.display().to_string(),
        |n| n.to_string_lossy().into_owned(),
    );
    let hash = |file: &str| {
        // The files of the tree this harness was built from.
        let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("..")
            .join(file);
        let out = run("sha256sum", &[&path.to_string_lossy()]);
        match out.split_whitespace().next() {
            Some(h) if h.len() == 64 => h[..16].to_owned(),
            _ => "none".to_owned(),
        }
    };
    let (pgo, order) = if profile == "dist" {
        (
            hash("sidecar/pgo.profdata.gz"),
            hash("sidecar/symbol-order.txt"),
        )
    } else {
        ("not used".to_owned(), "not used".to_owned())
    };
    json!({
        "meshid_build": format!("{profile} ({})", bin_dir.display()),
        "meshid_pgo_profile_sha256": pgo,
        "meshid_symbol_order_sha256": order,
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

#[cfg(test)]
mod tests {
    use super::*;

    /// A dist run names its build and the hashes of the PGO profile and symbol order it used; any
    /// other build says they were not used.
    #[test]
    fn the_build_and_its_profile_are_recorded() {
        let v = versions(std::path::Path::new("target/dist"));
        assert!(v["meshid_build"].as_str().unwrap().starts_with("dist ("));
        for k in ["meshid_pgo_profile_sha256", "meshid_symbol_order_sha256"] {
            let h = v[k].as_str().unwrap();
            assert!(
                h.len() == 16 && h.bytes().all(|b| b.is_ascii_hexdigit()),
                "{k}: {h}"
            );
        }
        let v = versions(std::path::Path::new("target/release"));
        assert_eq!(v["meshid_pgo_profile_sha256"], "not used");
    }
}
