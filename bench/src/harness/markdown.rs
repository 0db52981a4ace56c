//! `bench/results/latest.json` and `docs/benchmarks.md` (with SVG plots beside the JSON).

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::path::Path;
use std::time::Duration;

use anyhow::Result;
use serde::{Deserialize, Serialize};
use serde_json::{Value, json};

use super::Ctx;
use super::report::{Check, ScenarioResult};
use super::svg::{bars, number};
use crate::stats::Summary;

/// Everything one harness run produced.
#[derive(Debug, Serialize, Deserialize)]
pub struct Results {
    pub generated_unix: u64,
    pub mode: String,
    pub settings: Value,
    pub machine: Value,
    pub versions: Value,
    pub elapsed_seconds: f64,
    pub scenarios: Vec<ScenarioResult>,
    pub checks: Vec<Check>,
    pub commands: Vec<String>,
    pub configs: BTreeMap<String, String>,
}

impl Results {
    pub fn new(ctx: &Ctx, machine: Value, versions: Value) -> Self {
        let s = &ctx.settings;
        Self {
            generated_unix: std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map(|d| d.as_secs())
                .unwrap_or(0),
            mode: if s.smoke { "smoke" } else { "full" }.into(),
            settings: json!({
                "runs": s.runs,
                "workers_per_proxy": s.workers,
                "duration_seconds": s.duration.as_secs_f64(),
                "warmup_seconds": s.warmup.as_secs_f64(),
                "throughput_connections": s.connections,
                "latency_rate": s.rate,
                "idle_connections": s.idle_connections,
                "ca_count": s.ca_count,
                "ca_concurrency": s.ca_concurrency,
                "scenarios": s.scenarios,
                "load_cpu": super::LOAD_CPU,
                "server_cpu": super::SERVER_CPU,
            }),
            machine,
            versions,
            elapsed_seconds: 0.0,
            scenarios: Vec::new(),
            checks: Vec::new(),
            commands: Vec::new(),
            configs: BTreeMap::new(),
        }
    }

    pub fn push(&mut self, r: ScenarioResult) {
        self.checks.extend(r.checks.iter().cloned());
        self.scenarios.push(r);
    }

    /// Copies the commands and configs recorded so far.
    pub fn finish(&mut self, ctx: &Ctx, elapsed: Duration) {
        self.elapsed_seconds = elapsed.as_secs_f64();
        self.commands = ctx.commands.borrow().clone();
        self.configs = ctx.configs.borrow().clone();
    }

    /// Reads a results file written by `write`.
    pub fn read(json_path: &Path) -> Result<Self> {
        Ok(serde_json::from_slice(&std::fs::read(json_path)?)?)
    }

    /// Writes the plots (beside `json_path`) and the markdown, from these results.
    pub fn render(&self, json_path: &Path, md_path: &Path) -> Result<()> {
        let plot_dir = json_path.parent().unwrap_or(Path::new("."));
        let plots = self.plots(plot_dir)?;
        let rel = relative(md_path, plot_dir);
        if let Some(d) = md_path.parent() {
            std::fs::create_dir_all(d)?;
        }
        std::fs::write(md_path, self.markdown(&plots, &rel))?;
        Ok(())
    }

    /// Writes the JSON, the plots (beside it) and the markdown.
    pub fn write(&self, json_path: &Path, md_path: &Path) -> Result<()> {
        if let Some(d) = json_path.parent() {
            std::fs::create_dir_all(d)?;
        }
        std::fs::write(json_path, serde_json::to_vec_pretty(self)?)?;
        self.render(json_path, md_path)
    }

    fn scenario(&self, id: &str) -> Option<&ScenarioResult> {
        self.scenarios.iter().find(|s| s.id == id)
    }

    /// Writes the SVG plots; returns scenario id -> file names.
    fn plots(&self, dir: &Path) -> Result<BTreeMap<String, Vec<String>>> {
        let mut out: BTreeMap<String, Vec<String>> = BTreeMap::new();
        const P: &[&str] = &["meshid", "nginx", "haproxy"];
        let specs: [(&str, &str, &str, &str, &[&str]); 10] = [
            (
                "throughput",
                "requests_per_second",
                "Max throughput, pair",
                "req/s",
                P,
            ),
            (
                "throughput",
                "proxy_cpu_us_per_request",
                "Proxy CPU per request (both proxies)",
                "us",
                P,
            ),
            (
                "throughput_tcp",
                "requests_per_second",
                "Max throughput, pair in TCP mode",
                "req/s",
                P,
            ),
            (
                "latency",
                "added_p50_us",
                "Added p50 latency at 1000 req/s",
                "us",
                P,
            ),
            (
                "latency",
                "added_p90_us",
                "Added p90 latency at 1000 req/s",
                "us",
                P,
            ),
            (
                "handshakes",
                "handshakes_per_second",
                "New mTLS handshakes at the terminator",
                "per s",
                P,
            ),
            (
                "handshakes",
                "terminator_cpu_us_per_handshake",
                "Terminator CPU per handshake",
                "us",
                P,
            ),
            (
                "memory",
                "idle_rss_kib",
                "Idle RSS of the terminating proxy",
                "KiB",
                P,
            ),
            (
                "memory",
                "per_connection_rss_kib",
                "Memory per idle mTLS connection",
                "KiB",
                P,
            ),
            (
                "memory_tcp",
                "per_connection_rss_kib",
                "Memory per idle mTLS connection, TCP mode",
                "KiB",
                P,
            ),
        ];
        for (id, figure, title, unit, who) in specs {
            let Some(s) = self.scenario(id) else { continue };
            let items: Vec<(String, Option<Summary>)> = who
                .iter()
                .map(|c| {
                    let v = s
                        .contenders
                        .get(*c)
                        .filter(|r| !r.failed)
                        .and_then(|r| r.summary.get(figure))
                        .copied();
                    ((*c).to_owned(), v)
                })
                .collect();
            let name = format!("{}-{}.svg", id.replace('_', "-"), figure.replace('_', "-"));
            std::fs::write(dir.join(&name), bars(title, unit, &items))?;
            out.entry(id.into()).or_default().push(name);
        }
        Ok(out)
    }

    fn markdown(&self, plots: &BTreeMap<String, Vec<String>>, plot_rel: &str) -> String {
        let mut md = String::new();
        md.push_str(INTRO);
        if self.mode == "smoke" {
            md.push_str("\n> **This is a smoke run** (one short run per scenario, for CI): the figures below only show that the harness works. Run `bench/run.sh` for real figures.\n");
        }
        let _ = writeln!(md, "\n## This run\n");
        let _ = writeln!(md, "| | |\n| --- | --- |");
        let m = &self.machine;
        let v = &self.versions;
        let row = |md: &mut String, k: &str, val: &Value| {
            let s = match val {
                Value::String(s) => s.clone(),
                Value::Null => "unknown".into(),
                other => other.to_string(),
            };
            let _ = writeln!(md, "| {k} | {} |", s.replace('|', "/").replace('\n', " "));
        };
        row(&mut md, "mode", &json!(self.mode));
        row(
            &mut md,
            "generated (unix time)",
            &json!(self.generated_unix),
        );
        row(
            &mut md,
            "duration of the whole run",
            &json!(format!("{:.0} s", self.elapsed_seconds)),
        );
        row(&mut md, "CPU", &m["cpu_model"]);
        row(&mut md, "CPUs", &m["cpus"]);
        row(&mut md, "memory (KiB)", &m["memory_kib"]);
        row(&mut md, "kernel", &m["kernel"]);
        row(&mut md, "OS", &m["os"]);
        row(&mut md, "load average at start", &m["loadavg_at_start"]);
        for k in [
            "meshid_build",
            "meshid_pgo_profile_sha256",
            "meshid_symbol_order_sha256",
        ] {
            // Recorded since session 39; a run before says nothing.
            if !v[k].is_null() {
                row(&mut md, k, &v[k]);
            }
        }
        for k in [
            "meshid_sidecar",
            "meshid_git_commit",
            "meshid_git_dirty",
            "rustc",
            "nginx",
            "haproxy",
            "openssl",
            "tls_load_generator",
        ] {
            row(&mut md, k, &v[k]);
        }
        let s = &self.settings;
        row(&mut md, "runs per figure", &s["runs"]);
        row(&mut md, "threads per proxy", &s["workers_per_proxy"]);

        let _ = writeln!(md, "\n## Targets\n");
        let _ = writeln!(
            md,
            "| scenario | target | measured | met |\n| --- | --- | --- | --- |"
        );
        for c in &self.checks {
            let met = match c.met {
                Some(true) => "yes",
                Some(false) => "**no**",
                None => "**not evaluated**",
            };
            let _ = writeln!(
                md,
                "| {} | {} | {} | {met} |",
                c.scenario, c.target, c.measured
            );
        }

        for s in &self.scenarios {
            let _ = writeln!(md, "\n## {}\n\n{}.\n", s.title, s.setup);
            if s.id == "ca" {
                ca_table(&mut md, s);
            } else if s.id == "fleet" {
                fleet_table(&mut md, s);
            } else {
                figure_table(&mut md, s, columns(&s.id));
            }
            if !s.ratios.is_empty() {
                let _ = writeln!(
                    md,
                    "\nRatios (a/b) and differences (a-b, in the figure's unit), computed within each round then summarised:\n"
                );
                let _ = writeln!(
                    md,
                    "| ratio or difference | median | min | max |\n| --- | --- | --- | --- |"
                );
                for (k, r) in &s.ratios {
                    let _ = writeln!(
                        md,
                        "| {k} | {:.2} | {:.2} | {:.2} |",
                        r.median, r.min, r.max
                    );
                }
            }
            for (name, c) in &s.contenders {
                for r in c.runs.iter().filter(|r| r.error.is_some()) {
                    let _ = writeln!(
                        md,
                        "\n- **{name} failed** in round {}: `{}`",
                        r.round + 1,
                        without_backtrace(r.error.as_deref().unwrap_or_default())
                            .replace('`', "'")
                            .replace('\n', " ")
                    );
                }
            }
            for n in &s.notes {
                let _ = writeln!(md, "\n- {n}");
            }
            if let Some(files) = plots.get(&s.id) {
                md.push('\n');
                for f in files {
                    let _ = writeln!(md, "![{f}]({plot_rel}/{f})");
                }
            }
        }
        md.push_str(PROFILES);
        md.push_str(METHOD);
        let _ = writeln!(
            md,
            "\n## Configs of this run\n\nThe rendered files (later runs differ only in ports and paths). Every command line is in `bench/results/latest.json` (`commands`).\n"
        );
        for (name, text) in &self.configs {
            let lang = if name.ends_with(".yaml") { "yaml" } else { "" };
            let _ = writeln!(
                md,
                "<details><summary><code>{name}</code></summary>\n\n```{lang}\n{}\n```\n\n</details>\n",
                text.trim_end()
            );
        }
        md
    }
}

/// (figure, column header) per scenario.
fn columns(id: &str) -> &'static [(&'static str, &'static str)] {
    match id {
        "throughput" | "throughput_tcp" => &[
            ("requests_per_second", "req/s"),
            ("p50_us", "p50 us"),
            ("p99_us", "p99 us"),
            ("app_cpu_us_per_request", "app CPU us/req"),
            ("outbound_cpu_us_per_request", "outbound CPU us/req"),
            ("inbound_cpu_us_per_request", "inbound CPU us/req"),
            ("proxy_cpu_us_per_request", "proxies CPU us/req"),
            ("proxy_app_cpu_ratio", "proxies/app CPU"),
            ("server_core_accounted", "CPU 1 used by these"),
            ("loadgen_cpu_utilization", "load gen CPU"),
        ],
        "latency" => &[
            ("p50_us", "p50 us"),
            ("p90_us", "p90 us"),
            ("p99_us", "p99 us"),
            ("p999_us", "p99.9 us"),
            ("added_p50_us", "added p50 us"),
            ("added_p90_us", "added p90 us"),
            ("added_p99_us", "added p99 us"),
            ("completed_share", "completed/due"),
            ("proxy_cpu_us_per_request", "proxies CPU us/req"),
        ],
        "first_request" => &[
            ("p50_us", "p50 us (connect+handshake+GET)"),
            ("p90_us", "p90 us"),
            ("requests_per_second", "connections/s"),
        ],
        "handshakes" => &[
            ("handshakes_per_second", "handshakes/s"),
            (
                "terminator_cpu_us_per_handshake",
                "terminator CPU us/handshake",
            ),
            (
                "handshakes_per_terminator_cpu_second",
                "handshakes per terminator CPU-second",
            ),
            ("terminator_core_share", "terminator share of CPU 1"),
            ("pq_handshakes_per_second", "handshakes/s, X25519MLKEM768"),
            (
                "pq_terminator_cpu_us_per_handshake",
                "terminator CPU us/handshake, X25519MLKEM768",
            ),
            ("app_cpu_us_per_request", "app CPU us/req"),
            ("p50_us", "p50 us (connect+handshake+GET)"),
            ("loadgen_cpu_utilization", "load gen CPU"),
        ],
        "memory" | "memory_tcp" => &[
            ("idle_rss_kib", "idle RSS KiB"),
            ("idle_anon_kib", "idle anonymous KiB"),
            ("idle_private_kib", "idle private KiB"),
            ("per_connection_rss_kib", "RSS KiB per idle conn"),
            ("per_connection_anon_kib", "anonymous KiB per idle conn"),
            ("outbound_idle_rss_kib", "outbound idle RSS KiB"),
            ("outbound_idle_anon_kib", "outbound idle anonymous KiB"),
        ],
        "startup" => &[
            ("ca_start_to_ready_ms", "start-to-ready, CA mode, ms"),
            ("file_start_to_ready_ms", "start-to-ready, files, ms"),
            ("ca_idle_rss_kib", "idle RSS KiB (CA mode)"),
            ("ca_idle_anon_kib", "idle anonymous KiB (CA mode)"),
            ("ca_idle_private_kib", "idle private KiB (CA mode)"),
            ("taskset_exec_ms", "taskset exec ms"),
        ],
        _ => &[],
    }
}

fn cell(s: Option<&Summary>) -> String {
    match s {
        None => "–".into(),
        Some(s) if s.n > 1 => format!("{} ({}–{})", number(s.median), number(s.min), number(s.max)),
        Some(s) => number(s.median),
    }
}

fn figure_table(md: &mut String, s: &ScenarioResult, cols: &[(&str, &str)]) {
    let _ = write!(md, "| contender |");
    for (_, h) in cols {
        let _ = write!(md, " {h} |");
    }
    let _ = write!(md, "\n| --- |");
    for _ in cols {
        let _ = write!(md, " --- |");
    }
    md.push('\n');
    for name in ["direct", "meshid", "nginx", "haproxy"] {
        let Some(c) = s.contenders.get(name) else {
            continue;
        };
        if c.failed {
            let _ = writeln!(
                md,
                "| {name} | **failed** ({} of {} runs) |",
                c.failed_runs,
                c.runs.len()
            );
            continue;
        }
        let _ = write!(md, "| {name} |");
        for (k, _) in cols {
            let _ = write!(md, " {} |", cell(c.summary.get(*k)));
        }
        md.push('\n');
    }
    md.push_str("\nCells: median (min–max) over the runs.\n");
}

fn ca_table(md: &mut String, s: &ScenarioResult) {
    let Some(c) = s.contenders.get("meshid") else {
        return;
    };
    if c.failed {
        let _ = writeln!(
            md,
            "**failed** ({} of {} runs)",
            c.failed_runs,
            c.runs.len()
        );
        return;
    }
    let _ = writeln!(
        md,
        "| credential | clients | certs/s | p50 ms | p99 ms | CA CPU us/cert |\n| --- | --- | --- | --- | --- | --- |"
    );
    let mut conc: Vec<u64> = c
        .summary
        .keys()
        .filter_map(|k| k.strip_prefix("renewal_c")?.split('_').next()?.parse().ok())
        .collect();
    conc.sort_unstable();
    conc.dedup();
    for mode in ["renewal", "token"] {
        for n in &conc {
            let g = |f: &str| cell(c.summary.get(&format!("{mode}_c{n}_{f}")));
            let _ = writeln!(
                md,
                "| {mode} | {n} | {} | {} | {} | {} |",
                g("certs_per_second"),
                g("p50_ms"),
                g("p99_ms"),
                g("ca_cpu_us_per_cert")
            );
        }
    }
    md.push_str("\nCells: median (min–max) over the runs.\n");
}

fn fleet_table(md: &mut String, s: &ScenarioResult) {
    let Some(c) = s.contenders.get("meshid") else {
        return;
    };
    let mut sizes: Vec<u64> = c
        .summary
        .keys()
        .filter_map(|k| k.strip_prefix('n')?.split('_').next()?.parse().ok())
        .collect();
    sizes.sort_unstable();
    sizes.dedup();
    if sizes.is_empty() {
        return;
    }
    let _ = writeln!(
        md,
        "| sidecars | join s | CA RSS per sidecar KiB | CA anonymous per sidecar KiB | CA CPU idle | bundle push to every ack s | push CA CPU s | `meshid-ca revoke` to the last sidecar holding it s | renewals/s alongside | renewal p99 ms | failed renewals | streams broken while idle | loopback backlog drops |\n| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"
    );
    for n in sizes {
        let g = |f: &str| cell(c.summary.get(&format!("n{n}_{f}")));
        let idle = c
            .summary
            .get(&format!("n{n}_idle_ca_cpu_share"))
            .map_or_else(|| "–".into(), |x| format!("{:.2}%", x.median * 100.0));
        // Counts of one run: whole numbers.
        let count = |f: &str| {
            c.summary.get(&format!("n{n}_{f}")).map_or_else(
                || "–".into(),
                |x| {
                    if x.median >= 1000.0 {
                        number(x.median)
                    } else {
                        format!("{:.0}", x.median)
                    }
                },
            )
        };
        let _ = writeln!(
            md,
            "| {} | {} | {} | {} | {idle} | {} | {} | {} | {} | {} | {} | {} | {} |",
            number(n as f64),
            g("join_seconds"),
            g("rss_per_sidecar_kib"),
            g("anon_per_sidecar_kib"),
            g("push_seconds"),
            g("push_ca_cpu_seconds"),
            g("revoke_held_by_all_seconds"),
            g("renewals_per_second"),
            g("renewal_p99_ms"),
            count("renewal_failures"),
            count("sidecar_errors_while_idle"),
            count("backlog_drops"),
        );
    }
}

/// The path from `md`'s directory to `dir`, both relative to the working directory.
fn relative(md: &Path, dir: &Path) -> String {
    if dir.is_absolute() {
        return dir.to_string_lossy().into_owned();
    }
    let depth = md.parent().map(|p| p.components().count()).unwrap_or(0);
    let mut s = "../".repeat(depth);
    s.push_str(&dir.to_string_lossy());
    s.trim_end_matches('/').to_owned()
}

const INTRO: &str = "# Benchmarks: meshid against a direct path, nginx and haproxy

_This file is generated by `bench/run.sh` (`bench-run` in the `meshid-bench` crate); edits are
overwritten. The raw figures, every run, the exact commands and configs are in
[`bench/results/latest.json`](../bench/results/latest.json)._

Absolute times on a shared 2-core VM drift by tens of percent between runs, so the headline figures
are ratios measured within the same round, and every CPU figure comes with the proxies' CPU per
request divided by the app's own CPU per request in the same run.

## How to run

```sh
bench/run.sh            # everything: 3 runs per figure (fleet: one), about 20 minutes
bench/run.sh --smoke    # one short run per scenario (CI), into bench/results/smoke/: ~1 min once built
bench/run.sh --runs 5 --scenarios throughput,latency   # any bench-run flag passes through
bench/run.sh --perf /tmp/prof   # also: perf profiles + syscalls per request of every proxy
target/dist/bench-run --serve meshid   # start one contender and keep it up, for manual poking
target/dist/meshload --help            # the load generator on its own
bench/fleet.sh --sizes 1000,5000       # the fleet scenario alone, any sizes (release build)
```

`bench/run.sh` installs `nginx`, `libnginx-mod-stream` and `haproxy` with apt if they are missing,
builds the binaries once in the `dist` profile with `scripts/dist-build.sh` (fat LTO, one codegen
unit, optimised with the sidecar's recorded profile `sidecar/pgo.profdata.gz`: what the Dockerfiles
ship; `--smoke` uses `release`; `MESHID_BIN_DIR=DIR` runs the binaries already in DIR and builds nothing,
as CI's smoke run does with its test build's `target/debug`), runs `target/dist/bench-run` pinned to
CPU 0 (at a raised priority when allowed, inherited by everything it starts), and rewrites
`bench/results/latest.json`, the SVG plots beside it and this file. Scenarios: `throughput`,
`throughput_tcp`, `latency`, `handshakes`, `first_request`, `memory`, `memory_tcp`, `startup`, `ca`,
`fleet`.
";

/// What the profiles of meshid found, and what was tried: written by hand from the commands it
/// names (this file is generated, so the findings live here).
const PROFILES: &str = "
## Where the time and memory go (profiles)

Taken with `bench/run.sh --perf DIR` (perf profiles, syscalls and context switches per request of
every proxy, at saturation and at 1,000 req/s), `perf record` on a `bench-run --serve meshid` pair
under `meshload`, and `perf probe -x libc.so.6 malloc` with `perf stat -e probe_libc:malloc` for
allocations. This VM exposes no hardware counters, so these are cpu-clock samples.

- **The ratios move with the host's CPU, not only with our code.** The same code and build
  (f54a2c0 differs from 319d017 only in the fleet harness) on an Intel Xeon host after an AMD
  EPYC one: pair throughput 2.55x -> 1.56x nginx's, proxies/app CPU at saturation 0.51x ->
  0.70x, proxies' CPU per request at saturation 0.35x -> 0.61x, at 1,000 req/s 0.78x -> 0.67x;
  p50 / p90 at 1,000 req/s 0.85x / 1.04x -> 0.90x / 0.60x. nginx gained more from the faster
  host (92.4 -> 24.2 us per request, both halves) than meshid (32.6 -> 14.8). Read a target as
  met on the host of the run shown, and compare runs within one host only. On the faster host
  the p50 target at 1,000 req/s is out of any pair's reach: the direct path alone (load
  generator to app, no proxy) had a p50 of 113 us against nginx pair's 162, 0.70x, so a pair
  at 0.7x would add no latency at all. meshid added 31 us to nginx's 45 (0.65x, median of the
  rounds' ratios), and 53 us to 157 at p90.
- **What the proxies/app target at saturation asks for** (Intel host, dist build of c825b66; user
  and system ticks of each proxy from `/proc/PID/stat` over 10 s of closed-loop `meshload` against
  a `bench-run --serve meshid|nginx` pair, and `perf stat -e 'raw_syscalls:sys_enter'` with the
  per-call `syscalls:sys_enter_*` events for 2 s of it). meshid's two sidecars took 7.7 us of user
  time and 7.5 us of system time per request, in 4.2 syscalls (a read and a write on the client's
  connection, a write and a read on the app's, 0.2 `epoll_wait` and a share of the batched h2
  writes between the sidecars); nginx's two halves 11.7 us and 13.6 us, in 11.9 syscalls. The
  target (0.5x nginx's ratio, the app taking 3.35 us per request beside meshid and 3.87 beside
  nginx in that run) asks for about 11.4 us per request. The syscalls are at the floor of one read
  and one write per request on each app-facing connection, so that means about 3.9 us of user
  time, half of today's. No single user-space item is over a few percent: hyper's HTTP/1.1 on both
  app sides, the `h2` crate between the sidecars, tokio, rustls, and 11% `memcpy` in about 95 small
  copies per request as messages pass between those layers (`scripts/request-instructions.sh
  outbound`). A cut of that size means replacing the layering, not trimming it. Measured and left:
  hyper's header-read timer, a boxed tokio sleep armed and dropped for every request read from the
  app, is 1.5% of the outbound's instructions.
- **The hardening of session 32 on the request path** (an h2 idle and stalled-peer watch on
  every h2 connection, a peer's trailers stripped as its headers are, method overrides decided by
  the policy; Intel host, dist): callgrind on the inbound (`scripts/request-instructions.sh
  inbound`, two runs each) counted 35.8k and 36.9k instructions per request before, 34.8k and
  35.8k after, within the noise. What moved was memory: idle sidecar RSS 5.17 -> 6.05 MiB and
  memory per idle mTLS connection 11.8 -> 12.2 KiB (`--scenarios memory --runs 1`), because the h2
  branch's state (the watch's timer) sized every connection's task, HTTP/1.1 ones included, and the
  new and renamed functions were missing from the recorded symbol order. With the h2 branch in a
  boxed future of its own and the symbol order recorded again: 5.22 MiB and 11.2 KiB. At 1,000
  req/s, the sidecar before and after side by side (`--scenarios latency --runs 1`, the same
  bench tools and CA, alternating, twice): proxy CPU per request 67 and 80 us before, 69 and 73
  after, nginx's 84-89; this host's ratio to nginx (0.8-0.95x) is above the 0.67x of f54a2c0's run
  with either build.
- **Sessions 33-35's hardening, and this run against session 32's** (1a99d6a; both Intel hosts,
  dist, the PGO profile and symbol orders recorded again from this code first). Since then the
  inbound checks every request against the bundle in force and decides `_method` in form bodies,
  keeps each peer's chain to verify it again when the trust changes, watches every idle HTTP
  connection's trust and policy, and wraps each response still being sent so that a narrowed
  policy can end it. This host was slower: the direct path 198k -> 173k req/s, nginx's two halves
  24.4 -> 28.0 us per request. meshid's two sidecars 15.5 -> 17.3 us at saturation: 0.64x -> 0.62x
  of nginx's, about the same. The pair throughput 1.53x -> 1.45x nginx's is the median of the
  rounds' ratios (1.44-1.55 this run; the ratio of the median rates is 1.53x). Proxy CPU per request
  at 1,000 req/s went 0.89x -> 0.72x nginx's, with the profile recorded again (the one before was
  bfa5677's, and the request path had changed in many functions). Memory per idle mTLS connection
  is 11.2 -> 11.4 KiB. Last session's dist build had measured 11.9-12.0 KiB (`--scenarios memory
  --runs 1`), grown by the per-connection trust and policy watchers. One future now watches both
  (the boxed watcher each idle HTTP connection holds: 1,080 -> 416 bytes by `size_of_val`; the
  release build's memory per connection 10.9-11.1 -> 10.2-10.3 KiB).
- **Sessions 36-38, and this run** (18fb93b, dist; an Intel host slower than session 37's: the
  nginx pair 33.2k -> 21.1k req/s, its two halves 26 -> 41 us per request). Session 36 trimmed the
  request path (callgrind, `scripts/request-instructions.sh`: inbound -3.7%, outbound -2%
  instructions per request) and added a per-stream stall watch on the h2 path between the sidecars
  (+2% there); session 37 added limits the request path checks (app connections per inbound, a
  budget for form bodies, warning lines limited). Session 37's full run (ee42c4e) went down against
  session 35's (pair throughput 1.45x -> 1.37x nginx's, proxies' CPU at saturation 0.62x -> 0.70x,
  at 1,000 req/s 0.72x -> 0.87x, idle RSS 4.99 -> 5.87 MiB): its PGO profile was recorded before
  four commits changed the inbound's and the outbound's request handlers (b0d19ac, bc58e7f,
  7c6090f, 02752b4), and a function whose code changed loses its profile, so the two hottest
  functions were built without one. Recorded again after the last change to the request path
  (5d59c63), the throughput scenario alone on that host went 45.7k -> 48.4k req/s (1.37x -> 1.46x
  nginx's); the symbol orders were then recorded from that profiled build (a505081). This run: pair
  throughput 1.52x nginx's, both sidecars' CPU per request at saturation 0.60x nginx's (24.8 against
  41.0 us), proxies/app 0.61x (0.73x in session 37's run), idle RSS 5.27 MiB, 11.1 KiB per idle
  connection. At 1,000 req/s the three rounds disagree: proxy CPU per request 0.66x, 0.96x and
  1.01x nginx's (nginx's own 144-160 us here, 85-102 us on session 37's host), so the 0.8x target
  is not met in this run. The X25519MLKEM768 handshake target is not met either (nginx needs
  2.86x meshid's CPU, 2.83x-4.43x over the rounds; 3.41x in session 37's run; X25519 3.35x).
- **Sessions 39-40, and their run** (f1165d7, dist; the same Intel host type as 18fb93b's run,
  the nginx pair 21.1k -> 19.0k req/s). Session 39 added a resend of a bodiless request the
  upstream did not process (one `HeaderMap` copy per bodiless h2 request at the outbound: about
  175 of its 27.2k instructions per request by `CONNECTIONS=8 scripts/request-instructions.sh
  outbound`) and a policy-version read per TCP connection; session 40 recorded the PGO profile
  and the symbol orders again (1cf9551, 9d308dd) and changed the handshake path (a leaf's key
  usage read, the outbound reading the upstream's leaf whole). Against 18fb93b's run: pair
  throughput 1.52x -> 1.56x nginx's; both sidecars' CPU per request at saturation 26.8 us against
  nginx's 45.3 (0.59x); proxies/app 0.61x -> 0.60x (target 0.5x, not met); at 1,000 req/s proxy
  CPU per request 0.96x -> 0.84x nginx's (rounds 0.83x-0.85x; target 0.8x, not met) and p50 /
  p90 1.05x / 0.99x -> 0.94x / 0.95x (the direct path alone is 0.50x / 0.53x nginx pair's, so
  the 0.7x targets ask a pair to add about half what nginx adds); meshid's added latency below
  nginx's in every round at p50 (-17 us, met; +13 us before) and in two of three at p90; the
  X25519MLKEM768 handshake target met (nginx needs 3.35x meshid's CPU; 2.86x before; X25519
  3.40x). Idle RSS 5.27 -> 6.00 MiB, at the target's edge: 56 of the sidecar's 3,287 ordered
  functions changed after the order was recorded and sit outside the start-up pages (record the
  order again on the final code before the next run). That run's version table was first written
  with the wrong build (`bin`, PGO \"not used\": the harness read the name of the directory it
  copies the binaries to); the binaries were the dist ones (`bench/run.sh` builds them with
  `scripts/dist-build.sh`), and the table was corrected from the files' hashes and re-rendered
  (`bench-run --render`); the harness now reads the directory it was given.
- **Session 41, and its run** (b260de9's binaries: the sidecar and CA code of 5f2bf7c, dist,
  with the symbol orders recorded again on that code; the same Intel host type). Session 41
  added a trust check per inbound request (the bundle in force and the peer's expiry: a few
  loads and compares, the chain verified again only after the trust changed) and per-request
  counts for the h2 rapid-reset cutoff. Idle RSS 6.00 -> 5.10 MiB (the order recorded again:
  3,300 of 3,300 functions in place). New scenario `memory_tcp`: 20.7 KiB per idle mTLS
  connection with the proxies in TCP mode (each connection also holding its app connection and
  a pump each way) against nginx's 48.9 and haproxy's 29.1. Pair throughput 1.56x -> 1.48x
  nginx's and proxies/app 0.60x -> 0.63x, with both sidecars' CPU per request at saturation
  unchanged (14.0 / 13.3 us against 13.9 / 12.9). The latency scenario was disturbed in that run:
  meshid's third round had a p50 of 2.5 ms and a p90 of 11.2 ms with 251 us of proxy CPU per
  request (162 us in its second round), and its first a p90 of 738 us, so the 1,000 req/s
  targets read \"no\" here. The same build's `bench-run --scenarios latency,startup --runs 3` right
  after the run (the binaries of `target/dist`, the same host) gave meshid p50 300-314 us, p90
  363-388 us, 164-172 us of proxy CPU per request in every round, and nginx disturbed in two of
  its three (p90 4.5-4.7 ms): read neither run's 1,000 req/s ratios as this code's; start-to-ready
  7.9 ms there (34.0 ms in that run).
- **Sessions 42-43, and their run** (718d701, dist; the PGO profile and both symbol orders
  recorded again on this code first: 21,414 profiled functions, 3,279 of 3,279 ordered sidecar
  functions in place). Since session 41's run the request path gained an idle watch on every
  outbound response body, a 200-stream check per outbound h2 connection, cookie joining per
  h2-to-HTTP/1.1 request, new inbound h2 settings, the form code in a module of its own and a
  measured response head from the app. Both sidecars' CPU per request at saturation 14.0 / 13.3 ->
  15.0 / 13.5 us; meshid pair 29.2k -> 28.0k req/s. This host's nginx pair was slower than session
  41's (20.4k -> 15.2k req/s, its halves 21.6 / 20.7 -> 28.2 / 26.9 us per request), which is most of
  the pair throughput going 1.48x -> 1.67x nginx's (met): read it as this host's, not a gain of the
  code. Proxies/app at saturation 0.63x -> 0.63x (target 0.5x, not met: see \"What the proxies/app
  target at saturation asks for\" below). At 1,000 req/s proxy CPU per request 147, 140 and 192 us
  against nginx's 242, 171 and 209 (0.82x, target 0.8x, not met); the direct path's own p90 was
  4.0 and 3.1 ms in two of the three rounds (host noise), so the p50 / p90 ratios (0.93x / 0.97x)
  say little; meshid added less latency than nginx at p50 in every round (-105, -20, -17 us).
  Idle RSS 5.10 MiB and 11.2 KiB per idle mTLS connection, as in session 41's run. Fleet: 41.0
  KiB of CA memory per connected sidecar at 19,000, the push to every acknowledgement 4.6 s; 50,000
  still needs a hard RLIMIT_NOFILE above this host's 20,000, which no command here can raise (no
  CAP_SYS_RESOURCE).
- **Session 44, and its run** (cd11ef9, dist; the PGO profile and both symbol orders recorded
  again on this code first: 21,421 profiled functions, 3,291 of 3,300 ordered sidecar functions
  in place). `scripts/future-sizes.sh` (rustc's layout of the sidecar's futures) showed every
  outbound request's future at 7,712 bytes, most of it the h2 dial it rarely takes, and the
  inbound's h2 stream future holding its handler's future twice; each is moved whole several
  times per request. With the rare paths boxed and nothing held twice: the outbound's request
  future 2,328 bytes, the h2 stream futures 3,440 / 2,656 (6,280 / 4,712), and
  `CONNECTIONS=8 scripts/request-instructions.sh outbound` on release builds of the two trees
  4,366 -> 3,860 `memcpy` instructions per request (39.9k-40.3k -> 39.2k-39.8k in all).
  Alternating `--scenarios throughput --runs 1` rounds could not tell the two apart on this host.
  A TCP connection's task (the pumps made inside the copy's future, the TLS stream not kept beside
  its halves): 13,832 -> 6,872 bytes at the outbound, 11,120 -> 6,496 at the inbound, and memory
  per idle mTLS connection in TCP mode 20.8 -> 16.2 KiB here (19.9 -> 15.3 in alternating release
  runs). This host was faster than session 43's (the direct path 109k -> 146k req/s, the nginx
  pair 15.2k -> 22.4k): both sidecars' CPU per request at saturation 11.7 / 10.6 us, pair
  throughput 1.58x nginx's, proxies/app 0.63x -> 0.59x (target 0.5x, not met). At 1,000 req/s
  proxy CPU per request 0.75x nginx's (rounds 0.72x-0.85x; met in this run, 0.82x in the last);
  p50 / p90 0.84x / 0.77x (not met; the direct path alone is 0.49x / 0.47x). Idle RSS 5.10 ->
  5.75 MiB (9 ordered functions changed after the order was recorded), 11.5 KiB per idle HTTP
  connection.
- **Sessions 45-46, and this run** (0753fc4, dist; the PGO profile and both symbol orders
  recorded again on this code first: 21,460 profiled functions, all 3,298 ordered sidecar and
  2,139 CA functions in place). Those sessions hardened the request path against peers that lie:
  16 KiB of h2 answer buffered per stream (was 64), each method override decided once, one TLS
  record held once the handshake is done, a per-peer share of the form budget, a count of
  requests abandoned on the outbound's h2 connections. Session 45 measured the buffer change at
  no cost (inbound 47.5k-47.8k instructions per request before and after); the others are off the
  common path and were not measured one by one. This host was faster than session 44's (the direct
  path 146k -> 178k req/s; the nginx pair 22.4k -> 29.6k req/s, its halves 38.6 -> 29.2 us per
  request): both sidecars 11.7 / 10.6 -> 10.2 / 8.0 us per request at saturation, pair
  throughput 1.54x nginx's, proxies/app 0.59x -> 0.68x (target 0.5x, not met). nginx gained more
  from this host (-24% CPU per request) than meshid (-18%), and the app took less CPU per request
  beside meshid (3.82 us) than beside nginx (4.16). At 1,000 req/s: proxy CPU 0.78x nginx's
  (met); p50 / p90 0.91x / 0.85x (not met), where the direct path alone is 0.67x / 0.57x of
  nginx's: a pair at 0.7x p50 would add 5 us, and meshid added 34 us to nginx's 59. Idle RSS 5.05
  MiB, 11.4 KiB per idle mTLS connection, start-to-ready 7.2 ms.
- **Session 47, and this run** (c7b98c9, dist, with the PGO profile and symbol orders of 0753fc4:
  not recorded again, so the functions this session changed lost their profile and their place).
  The session hardened more of the request path against lying peers (a per-identity share of
  the app connections once half are in use, the apps' trailers cleaned, client-certificate
  headers stripped, stuck writes looked at, chains of more than two certificates refused before
  any is verified) and fixed the harness: nginx's worker, started after its master listens, could
  be missed by the CPU count (round 0 of the run before: nginx outbound 0.00 us per request);
  the process tree is now read at each end of the window. This host was faster again (direct
  path 178k -> 194k req/s). meshid's own figures improved: pair 44.8k -> 50.3k req/s, sidecars
  10.2 / 8.0 -> 9.0 / 7.3 us per request at saturation, proxies 77 us per request at 1,000 req/s
  (81-89 before). nginx's improved more: its halves 29.2 -> 26.1 us at saturation, 82 us at
  1,000 req/s (94-119 before, one round with its worker missed). So the ratios moved against
  meshid: pair throughput 1.48x (1.54x), proxies/app 0.70x (0.68x), CPU per request at 1,000
  req/s 0.93x (0.78x), p50 / p90 0.96x / 1.05x (the direct path alone is 0.68x / 0.65x of
  nginx's pair). Idle RSS 5.05 -> 5.56 MiB with certificate files (the symbol order no longer
  covers the changed functions, whose pages the sidecar now touches apart); the new row judges
  the CA-mode sidecar as injected: 7.39 MiB, not met. Record the profile and orders again
  (`scripts/pgo-profile.sh`, `scripts/symbol-order.sh`) before reading these as the code's.
- **Session 48, and this run** (9a0ad68, dist, with the PGO profile and symbol orders recorded
  again on 7a74fdf, and aws-lc without its AVX-512 code). This host was slower than the last
  run's (direct path 194k -> 170k req/s): pair 44.3k req/s against nginx's 30.6k, 1.47x (median of
  the rounds' ratios); sidecars 10.1 / 8.0 us per request at saturation; proxies/app 0.69x; at
  1,000 req/s proxy CPU 80 us per request against nginx's 102 (0.85x; 0.78x in the first
  round), p50 / p90 0.89x / 0.84x; handshakes 3.60x, CPU per handshake 3.67x (ML-KEM 3.30x);
  11.6 KiB per idle mTLS connection. Idle RSS rose: 6.03 MiB with certificate files, 7.71 MiB in
  CA mode. Read from `/proc/PID/pagemap` against `nm` (`scripts/resident-text.py PID
  sidecar/symbol-order.txt` on a CA-mode sidecar 0.5 s after ready): the
  AVX-512 AES-GCM windows are gone (0.5 MiB), but 1.1-1.3 MiB of `.text` is resident outside
  the ordered region, in about 30 windows of 64 KiB around functions this session changed after
  the order was recorded (the connection-serving futures took a new output type, which renames
  their monomorphised copies: `serve_h1`, `serve_outbound`, `run::start` among them), and 2.1 MiB
  inside it. Tried and not kept: `madvise(MADV_RANDOM)` on the binary's mappings (an
  `LD_PRELOAD` constructor, two starts each way) changed nothing: the kernel maps 64 KiB around a
  faulted page whatever the advice (it only turns readahead off). The orders were recorded again
  on 5c055e6 after this run (`scripts/symbol-order.sh`), not measured by a full run: the same
  CA-mode sidecar (one inbound listener, 0.5 s after ready, three starts) then had 2.5 MiB of
  `.text` resident (0.3 MiB outside the ordered region: aws-lc's ML-KEM, X25519 and P-521
  assembly) and an RSS of 6.5-6.6 MiB, against 3.2-3.3 MiB and 7.1-7.3 MiB with the orders of
  7a74fdf. Still over the 6 MiB target: the rest is 1.2 MiB of the binary's read-only data, 1.5
  MiB of libc, libm and the loader, and 0.8 MiB anonymous.
- **Session 50, and this run** (f570c4f, dist, packed relative relocations on, the PGO profile
  of 75f3522 and the symbol orders of 12ab221: session 49's code). Pair throughput 46.0k req/s
  against nginx's 31.0k, 1.55x (median of the rounds' ratios; 1.46x-1.56x), met; sidecars 9.7 /
  7.8 us per request at saturation; proxies/app 0.68x (target 0.5x, not met). At 1,000 req/s
  proxy CPU 86 us per request against nginx's 102 (0.82x; 0.78x-0.91x over the rounds; target
  0.8x, not met), p50 / p90 0.93x / 0.88x, where the direct path alone is 0.69x / 0.70x of
  nginx's pair (meshid added 43 us at p50 to nginx's 57). Idle RSS 4.52 MiB with certificate
  files and 5.81 MiB in CA mode (7.71 MiB in session 48's run): both under the 6 MiB target,
  from session 49's packed relocations, libm gone and the orders recorded again. 11.1 KiB per
  idle mTLS connection. Fleet: 41.6 KiB of CA memory per connected sidecar at 19,000, the push
  to every acknowledgement 3.0 s; 50,000 still needs a hard RLIMIT_NOFILE above this host's
  20,000.
- **Profile-guided optimisation** (`scripts/dist-build.sh`, which the Dockerfiles and
  `bench/run.sh` build with): rustc builds the shipped binaries with `sidecar/pgo.profdata.gz`,
  the branch and call counts of an instrumented sidecar pair under the benchmark's kinds of traffic
  (`scripts/pgo-profile.sh`; run again on 319d017's code it gave back the committed profile:
  the same 20,458 functions, 98.9% edge-count overlap by `llvm-profdata overlap`). Proxy CPU per
  request at 1,000 req/s (a `bench-run --serve meshid` pair, 10 s of `meshload --rate 1000`, the
  two sidecars' CPU ticks; alternating runs, the same load generator and app): 269-333 us without,
  189-249 us with (four runs each way), about -25%. The full run on 319d017 (with the profile and
  the symbol order recorded again from the profiled build) against the one on 5230c30 (neither):
  both sidecars' CPU per request at saturation 60.1 -> 32.6 us, pair throughput 1.76x -> 2.55x
  nginx's, CPU per request at 1,000 req/s 0.91x -> 0.78x nginx's, idle RSS 5.83 -> 4.91 MiB. The
  host was faster in the second run too (direct path 68.5k -> 110k req/s), and the benchmark's app
  and load generator are built with the profile as well (they share tokio, hyper and rustls with
  the sidecar; the app's CPU per request went 13.6 -> 8.8 us), so read the ratios to nginx, which
  are taken within each round with the same app. The instrumented build must be the shipped
  build's command but for the flags: a profile names functions by their symbols, and an explicit
  `--target` changes every symbol's hash. A profile recorded that way matched none of the shipped
  binary's functions and gained nothing (253-341 us against 240-323 us without, five runs each
  way). The symbol order (`scripts/symbol-order.sh`) has to be recorded from the profiled build:
  PGO inlines differently, and the order recorded without it left idle RSS at 6.54 MiB.
- **At saturation** the profile is flat. Per request the outbound makes 2.3 syscalls and 0.08
  context switches, the inbound 2.3 and 0.19 (nginx: 6.2 and 0.15 / 0.29; haproxy 6.6 / 6.5).
  The largest single items are the kernel's loopback TCP path and wake-ups, `memmove` (5-7%: large
  futures and buffers moved), and malloc/free (4-5%: 13.5 allocations per request at the outbound,
  10.3 at the inbound). hyper-util's pooled client on the inbound's app side (pool checkout, SipHash
  of the pool key, a task spawned per request to wait for the connection to be ready again) was
  about 5% of the inbound; the inbound now keeps its own last-in first-out pool of hyper HTTP/1.1
  connections to the app, returned by the response body once read (`sidecar/src/inbound/app.rs`):
  pair throughput went from 1.29x to 1.43x nginx's in back-to-back runs of the `throughput`
  scenario (meshid CPU per request 49.8-59.0 -> 43.8-49.7 us). The per-connection log span costs
  under 1%.
- **At 1,000 req/s** the outbound makes 6 syscalls per request (`epoll_wait`, `recvfrom`, `writev`,
  twice: the floor for a proxy) and 1.4 context switches (the inbound 1.6; nginx 2.4). 43% of the
  outbound's samples are the kernel waking the reader of what it wrote (`writev` -> loopback ->
  `sock_def_readable`; the load generator sleeps on the other CPU, so this is a cross-CPU wake-up,
  costly on a VM) and 17% the wake-up of its own `epoll_wait`. Our own code is a few percent of the
  samples: at this rate a request costs wake-ups and cold caches, so what is left to cut is the
  code a request walks through (h2 between the sidecars, hyper's HTTP/1.1 on both ends), not the
  syscalls. Tried and not kept: fewer task hops on the inbound. A request with no body drove its
  app connection from the h2 stream's task (the request future, then the response body), so no
  connection task was woken to write the request or to hand over the response. The inbound's
  instructions per request (`valgrind --tool=callgrind` on the inbound of a `bench-run --serve
  meshid` pair, counters zeroed after a warm-up, then 5 s of `meshload` over four connections):
  84.6k and 87.3k before, 85.6k and 87.2k after; `--scenarios throughput,latency`, two rounds each way,
  moved within the noise of this host. Two task switches on one thread are about 1% of a
  request, so the simpler code stays.
- **Header names** (`scripts/request-instructions.sh inbound`: the same callgrind count over one
  connection, so that no batching of requests into one wake-up moves it): 13%
  of the inbound's instructions per request were `http::header` functions, most of them parsing
  and checking header names given as `&str` (`headers.remove(\"keep-alive\")`: the name is parsed
  at every call; eight hop-by-hop names a request in each direction, plus the identity, forwarding,
  trace-context and h2-hint headers). They are `HeaderName` statics now: header functions 13.0k ->
  7.4k instructions per request, the inbound's whole request 98.8k -> 90.8k (base 95.3k-99.3k and
  new 86.0k-93.6k over four runs each).
- **Tasks hyper spawns** (the same script, both roles, two runs each way): 11-12% of each sidecar's
  instructions per request were `memcpy`, a third of it tokio moving task futures: at spawn and when
  a task ends (`Core::set_stage` writes the whole stage, finished or consumed). hyper's h2 client
  spawns a task per request (the wait for the response) and its server one per stream (the service
  call), each the size of the largest variant of hyper's enum: on the client, the whole connection.
  They are spawned boxed now (`BoxingExecutor` in `sidecar/src/http.rs`): `memcpy` per request
  10.1k -> 6.7k instructions at the outbound and 10.1k-11.4k -> 7.7k-8.0k at the inbound, the
  outbound's whole request 81.1k-81.2k -> 75.7k-76.7k (the inbound's total moves more between runs
  than the gain: 87.5k-98.6k before, 87.6k-91.6k after). One more allocation per task is the price.
  The outbound has since dropped hyper's h2 client altogether (next item).
- **The outbound's h2 client** (the same script, outbound, three runs each way, alternating):
  hyper's h2 client passed each request through a channel to the connection's task, which spawned
  a task per request to wait for the response and handed the response back through a oneshot.
  The outbound now drives the `h2` crate itself (`sidecar/src/outbound/upstream.rs`): the task
  serving the app's request opens the stream and awaits the response there, and only a request
  with a body gets a task of its own, to stream it within the upstream's flow-control window.
  Instructions per request 70.7k-75.6k -> 59.2k-62.4k; outbound CPU per request at saturation
  15.1-15.3 -> 13.7-13.8 us (`--scenarios throughput --runs 1`, twice each way). What hyper did
  on top of `h2` is done in that file: keep-alive pings that give up a dead connection, capacity
  handed back as the app takes the response. Tried and not kept: the same for the inbound's h2
  server (an accept loop on `h2`, a task per stream as hyper's): 79.3k and 81.6k instructions per
  request before, 79.6k and 77.7k after, within the noise. hyper's server spends little around
  `h2` itself, so it stays.
- **Per-request bookkeeping** (`scripts/request-instructions.sh`, read function by function: the
  totals move by 5% between runs, more than these gains). The inbound formatted its allow rule's
  metric label and hashed the label set for every allowed request, copied the path into the
  observed-calls summary and hashed that summary's key twice: `Authorizer::record` went from 2,157
  to 869 instructions per request (the counter is kept per listener and rule; a path is copied
  only for a new entry). `strip_hop_by_hop` removed eight names, one hashed lookup each, from
  every request and response: 1,026 -> 283 per request at the inbound (one pass over the names
  present first). `tokio::select!` polls every branch at every wake of a connection's task, so
  the shutdown, expiry and revocation watches were polled several times per request: 2.0% of the
  inbound's instructions and 1.1% of the outbound's. `meshid_runtime::wake::WhenWoken` now polls
  them only when one of them was woken. Tried and not kept: building the inbound handshake's
  future in a plain function, so that its unboxed copy would leave the connection task. The task
  measured 4.3 KiB before and 1.7 KiB after, but those sizes came from a build with size prints
  in it, which made the futures larger. Memory per idle connection did not move: 16.0 and 15.4
  KiB before, 16.6 and 16.1 KiB after (`--scenarios memory --runs 1`, twice each way).
- **Against nginx, instruction by instruction** (`scripts/request-instructions.sh inbound|outbound
  DIR nginx`: the same callgrind count on nginx's half of its pair, restarted under `valgrind
  --tool=callgrind` as one process with `master_process off`). Per request: nginx's inbound runs
  38.7k user-space instructions and its outbound 35.8k; meshid's inbound 57.1k before the next
  item and 50.4k after it, its outbound 43.1k. (The counts published here before included the
  load generator's own 2 s warm-up in the callgrind window, so they were 1.4x too high; each
  before-and-after pair was counted the same way and stands.) By crate at meshid's inbound now:
  h2 13.1k, meshid's own code 5.6k, tokio 5.1k, `http` header maps 5.0k, `memcpy` and friends
  4.5k, malloc 3.6k, aws-lc 2.4k, hyper and hyper-util 2.1k, rustls 1.3k. At saturation meshid
  still uses less CPU per request, because it batches (2.3 syscalls per request against nginx's
  6.2); at 1,000 req/s nothing batches and the instructions show: that is where the 1,000 req/s
  CPU target is lost. What would close it is less code per request in the HTTP layers (h2
  between the sidecars, hyper's HTTP/1.1 server at the outbound), not fewer syscalls: at 1,000
  req/s the inbound makes 6.9 per request (`strace -c`: 1.9 `epoll_wait`, 2.0 `sendto`, 3.0
  `recvfrom`, one of them the check that an idle app connection is still open).
- **The inbound's own HTTP/1.1 for bodiless requests**: hyper's HTTP/1.1 client ran each app
  connection as a task of its own, reached through a channel, and handed each response back
  through a oneshot. The inbound now writes a bodiless request's head and reads and frames the
  response itself, in the task that serves the request (`sidecar/src/inbound/bare.rs` over
  `meshid_runtime::h1`, which is fuzzed); requests with a body, and upgrades, stay on hyper.
  Instructions per request at the inbound 57.1k -> 50.4k (base and change built from one tree).
  `--scenarios throughput,latency --runs 1`, two runs each way, alternating: throughput 1.37x and
  1.36x -> 1.53x and 1.45x nginx's, inbound CPU per request at saturation 14.1 and 15.1 -> 12.5
  and 12.7 us. The earlier attempt (fewer task hops, above, not kept) drove hyper's client
  connection from the stream's task and saved nothing: the cost was hyper's client as a whole,
  not the task switch.
- **Keep-alive PINGs at the inbound**: hyper's h2 server resets its keep-alive timer on every
  frame it reads (`Ponger::poll`, 1.9k instructions per request, 2.3% of the inbound's). The
  inbound asks hyper for no PINGs now; the kernel's TCP keep-alive watches every accepted
  connection for a vanished peer, as on the CA (`meshid_runtime::net::keepalive`).
  `scripts/request-instructions.sh inbound`: 80.9k, 81.0k and 83.8k before; 79.3k, 79.4k, 80.2k
  and 82.2k after. Smaller cuts beside it, read function by function at the outbound: the
  hop-by-hop check matches a name once instead of comparing it with eight (`strip_hop_by_hop` 595
  -> 159 per request), the refusal text for a bad `Host` is built only on refusal (125 -> 0), the
  displacement check at every read and write is inlined (195 -> 0).
- **Context switches; tried and not kept: `SCHED_BATCH`** (a `bench-run --serve` pair pinned as
  the benchmark pins it, 10 s of `meshload` over 32 connections, `/proc/PID/task/*/status` before
  and after). Per request at saturation: the app 0.16 voluntary switches, the inbound 0.10
  voluntary and 0.11 involuntary (preempted when another task on its CPU was woken), the outbound
  0.04 and 0.03; nginx's pair: the app 0.20, the inbound 0.15 and 0.15, the outbound 0.06 and
  0.08. With both sidecars under Linux's `SCHED_BATCH` (the same share of the CPU, but their
  wake-ups do not preempt), their involuntary switches fell to 0.01 and the app's voluntary ones
  to 0.05, and the pair moved 6% more requests (278k-291k -> 286k-306k in 10 s, the policy
  switched on the same processes, three rounds each way; `--scenarios throughput,latency`, two
  runs each way: 1.41x and 1.36x -> 1.47x and 1.51x nginx's throughput). But with a CPU-bound
  task on the same CPU, the p50 at 1,000 req/s went from 205-222 us to 2.09-2.12 ms: each hop
  waited for the running task's time slice to end. A mesh's latency must not hang on what a
  neighbour does with the CPU, so the sidecar keeps the kernel's default policy.
- **Memory per idle connection, the rest of it** (`heaptrack` on the terminator holding 2,000 idle
  connections, then `bench-run --scenarios memory`): about 9 KiB per connection was in use, while
  the RSS grew by 16 KiB. The peak heap while the connections opened (16 at a time, one request
  each) was 40.8 MB against 18.0 MB at rest. A connection kept hyper's buffers for 300-600 ms after
  its request (the fixed check), so hundreds of new connections held them at once, and the holes
  they left between the connections' long-lived state stayed resident. The check now comes first
  after 15 ms and backs off (`sidecar/src/idle.rs`), so a connection that sent one request gives
  its buffers back within about 45 ms, and the next connection reuses them. Memory per idle
  connection: 15.9-16.8 -> 11.9 KiB (dist, twice each way). A connection with steady traffic is
  soon checked every 300 ms as before. Proxy CPU per request at 1,000 req/s (first check at 25 ms), two runs each way
  beside nginx: 0.99x and 1.09x before, 1.06x and 1.05x after.
- **A full handshake** at the terminator was 73% aws-lc (P-256 ECDSA signing and verifying a
  third, SHA-384 for the TLS 1.3 key schedule 9%, X25519 7%) and 20% kernel; rustls, tokio and our
  own checks were the rest. Two of its three ECDSA verifications were the client's chain: its leaf
  under the intermediate, and the intermediate under the root, the same few intermediates on every
  handshake. The verifier now remembers intermediates whose path verified (per extended key usage,
  validity checked at every use, never under a root with name constraints, forgotten with every
  new bundle: `identity/src/verify.rs`), so a mesh handshake verifies only its leaf. Terminator CPU
  per handshake, `--scenarios handshakes` on one Intel host, the commit before (b30562a) and after
  (caff247): 559-642 -> 324-422 us; nginx needs 3.11x -> 4.01x meshid's CPU, handshakes/s 3.04x ->
  3.95x nginx's, X25519MLKEM768 2.91x -> 3.93x. X25519MLKEM768 adds ML-KEM-768 encapsulation and the
  larger key shares: see its columns in the handshakes table.
- **Hosts differ**: the run before this one was on an AMD EPYC host, this one on an Intel Xeon
  host. The nginx pair went from 11,979 req/s at 69.4 us of proxy CPU per request there to 29,067
  at 29.6 us here, meshid's from 17,795 at 44.8 us to 28,081 at 30.2 us: the throughput ratio went
  from 1.49x to 0.97x (b30562a, before this run's changes, measured 0.97x here too), while
  meshid's own CPU per request at saturation now meets its 20 us targets. Which host a run gets
  is not ours to choose; compare ratios within one run only.
- **Start-up**: 45 ms of a sidecar's 52 ms start-to-ready (CA mode) was aws-lc collecting CPU-jitter
  entropy at the process's first random draw (`jent_*` functions in `perf record` of a start). It
  is built without that source now (`.cargo/config.toml`), seeded by `getrandom`; 9 ms since.
- **Idle RSS** (`/proc/<pid>/smaps`): anonymous memory (heap, stacks) is 0.4-0.7 MiB. The rest is
  file-backed and shared with every process that maps the same binary. Most of it was the
  sidecar's own code: the kernel maps 64 KiB of the binary around every page first touched, and the
  functions that run at start-up were spread across the 8 MiB `.text`, so 5.5-6.3 MiB of it was
  resident in an idle sidecar. `sidecar/symbol-order.txt` now lists the functions that run at
  start-up (then those of the request path), recorded from the `dist` build under
  `valgrind --tool=callgrind` by `scripts/symbol-order.sh`, and the build script has LLD lay them
  out first, together: 1.3-1.8 MiB of `.text` is resident at idle, and the idle inbound sidecar
  went from 10.0 MiB to 5.1-5.6 MiB (a fresh `bench-run --serve meshid` pair, 1 s idle, three
  starts). The script also records a CA-mode sidecar (join token, bundle stream, one renewal) and
  `meshid-ca serve` itself (`ca-service/symbol-order.txt`): a CA-mode sidecar with an inbound and
  an outbound listener went from 10.5 to 6.9-7.1 MiB idle, an idle CA from 9.3-9.8 to 5.8-6.0 MiB
  (7.2 MiB with one sidecar joined, was 10.8). CA mode keeps more code resident: the gRPC client,
  key generation, the TLS client, and (until session 48) aws-lc's AES-GCM for AVX-512: two
  functions of 340 KiB each, unrolled for bulk data, of which one TLS record on the CA connection
  left about 0.5 MiB resident (valgrind cannot record it, offering no AVX-512, so no order placed
  it). Read from `/proc/PID/pagemap` against `nm` (which 64 KiB windows of `.text` a CA-mode
  sidecar has resident 0.5 s after ready, three starts each way): 3.4-3.8 MiB of `.text` with that
  code, 2.8-3.2 MiB with aws-lc's AVX-512 masked (`OPENSSL_ia32cap=:~0x10000`), RSS 7.3-7.9 ->
  6.7-7.3 MiB; a `bench-run --serve meshid` pair moved the same requests either way (49.7k, 49.7k,
  50.8k req/s with it, 50.7k, 49.4k, 49.3k without; p50 at 1,000 req/s 157-166 us and 161 us).
  aws-lc is built without its AVX-512 code since (`.cargo/config.toml`, as its size-optimised
  builds are; the AVX2 and AES-NI code takes over; `scripts/resident-text.py` names the windows).
  The list goes stale with a toolchain or dependency update (its names carry crate
  hashes; a name the linker no longer finds leaves its function where it was, nothing breaks): rerun
  the script. The rest (before session 49): 1.5 MiB of read-only data and relocations, 0.2 MiB of
  relocated data, and 1.6 MiB of libc, libm and the loader. Session 49 took two of them (a CA-mode
  sidecar, `/proc/PID/smaps` against its sections, five starts each way): packed relative
  relocations (`-z pack-relative-relocs`, `MESHID_PACKED_RELOCS=on`: the loader read all of
  `.rela.dyn`, 15,000 relocations in 368 KiB, at every start; 6.28-6.47 -> 6.03-6.17 MiB), in the
  images' builds only (the Dockerfiles and `bench/run.sh` set it: such a binary needs glibc 2.36,
  and a sidecar built for a VM may run on RHEL 9's 2.34); and libm, which the loader mapped for one
  function (`pow`, in tokio's scheduler statistics; 0.3 MiB): `meshid_runtime::math` defines it
  (the `libm` crate's), and libm is no longer a needed library. Not taken: `panic = \"abort\"`
  (smaller code, but one panicking connection would end the whole sidecar instead of its own
  task).
- **Memory per idle connection** (the terminating sidecar, 2,000 idle HTTP/1.1 mTLS connections,
  release build, `heaptrack` for the heap in use and `/proc/PID/smaps_rollup` for RSS): it was
  26.9 KiB of RSS with 15.9 KiB of heap in use; it is 17.3 KiB with 12.7 KiB in use since f3c1e2a.
  - Fragmentation (about 8 KiB per connection): a connection going idle frees hyper's buffers
    (kilobytes each) below allocations that live on, and glibc gives memory back only from the top
    of its heap. The sidecar now calls `malloc_trim(0)` once reports of freed memory stop for
    100 ms (at most once a second under churn, never while nothing is freed:
    `meshid_runtime::heap`). A trim took 16 us to 6.4 ms (the longest right after 9,000 connections
    went quiet at once). The same trim in the CA changed nothing (`bench/fleet.sh`: 41.5 and
    39.9 KiB per connected sidecar at 1,000 and 10,000, before and after): its per-connection
    memory is in use (h2's codec buffers), so the CA does not trim.
  - The connection's task was 3,928 bytes and is 1,688: the TCP proxy's future (boxed now) no
    longer sizes every HTTP connection's task, a stretch of serving by hyper lives in a boxed
    future freed when the connection goes quiet, and the peer-revocation future is boxed once
    instead of being copied through four nested futures.
  - What was left in use (12.7 KiB): rustls kept 4 KiB for its record buffer, 1.2 KiB of
    connection state, 1.2 KiB of AES-GCM keys, 1 KiB for the peer's chain and 0.6 KiB of
    handshake-joiner capacity for the connection's life (8 KiB in all); the task takes 1.7 KiB,
    the connection's shared state 0.5 KiB, tokio's socket registration 0.25 KiB. None of the
    buffered rustls connection's buffers can be released from outside it.
  - So the sidecar drives rustls's unbuffered API itself (`sidecar/src/tls.rs`, for the inbound
    terminator and the outbound's upstream connections): records are read into a buffer on the
    stack and decrypted there, only the tail of a record that has not fully arrived is kept on the
    heap, and records are encrypted into a write buffer freed once the socket has taken it. An
    idle connection holds no TLS buffer. The terminator's memory per idle connection went from
    19.2-19.8 to 16.2-16.3 KiB of RSS (17.9-18.4 to 14.7 KiB anonymous; `bench-run --scenarios
    memory --runs 1`, dist builds one after the other, two pairs of runs). Instructions per request
    (`scripts/request-instructions.sh`): inbound 91.2k before, 85.8k after; outbound 70.8-77.2k
    before, 72.6-79.8k after (within the spread between runs). Saturation throughput in paired
    runs (`--scenarios throughput --runs 3`, one after the other) moved within the noise: 1.35x
    nginx before, 1.23x after, each run's range overlapping the other's. The first version
    allocated (and zeroed) a 4 KiB read buffer on every poll that found the socket empty: memset
    was then 20% of the inbound's instructions (118k per request); reading on the stack removed it.
    What the 12 KiB target still needs: rustls's own state (4 KiB: connection state, keys, the
    peer's chain, the joiner) and the task (1.7 KiB) stay for the connection's life.
  - Tried before: mimalloc, 19.6 KiB per connection but 20 MiB idle RSS (10.8 MiB anonymous);
    mimalloc with `MIMALLOC_ARENA_EAGER_COMMIT=0 MIMALLOC_PURGE_DELAY=0`, 17.8 KiB and 10.9 MiB
    idle, settings only the environment can give it; glibc with
    `GLIBC_TUNABLES=glibc.malloc.mmap_threshold=8192`, 24.3 KiB; `glibc.malloc.arena_max=1`,
    24.8 KiB (all against 26.3 KiB then).
- **Pooled HTTP/1.1 between the sidecars for quiet listeners** (`sidecar/src/outbound/h1.rs`).
  Alone on its connection, an h2 stream was the largest cost left (the `h2` crate: 13.1k and 12.3k
  instructions per request at the inbound and the outbound). A bodiless idempotent HTTP/1.1
  request now crosses on a pooled HTTP/1.1 mTLS connection, written and read in the task serving
  it (the exchange the inbound already used towards its app, `sidecar/src/bare.rs`), when its
  listener is quiet. `scripts/request-instructions.sh` with every such request on HTTP/1.1: inbound
  50.4k -> 35.4k, outbound 43.0k -> 29.3k instructions per request (nginx 38.5k and 35.8k). At
  1,000 req/s over 32 connections (a `bench-run --serve meshid` pair under `meshload`, the
  sidecars' CPU read from /proc, alternating builds, four runs each way) the proxies' CPU per
  request fell 12-22% and p50 by 40-115 us. Tried and not kept: every bodiless idempotent request
  on HTTP/1.1, which cut the 1,000 req/s CPU as much but made the saturated pair 1.40x -> 1.07x
  nginx: concurrent h2 streams share reads, writes and TLS records, lone exchanges share nothing.
  Not kept either: HTTP/1.1 whenever no other request was in flight. At saturation only 1.3% of
  requests found none in flight, yet they cost 4% of throughput, a lone exchange costing several
  times a shared one. So a listener takes HTTP/1.1 only while its requests begin on average
  500 us apart or more (under about 2,000 a second); at saturation 0.1% of requests (those after
  an idle spell) take it. The exchange's future is boxed: unboxed, its TLS handshake state made
  every request's future larger, h2 ones included, and the saturated pair served 8% fewer
  requests.
- **Fewer moves and no double growth on the HTTP/1.1 path** (`scripts/request-instructions.sh`). A
  request on a pooled HTTP/1.1 connection moved that connection seven times (out of the pool, into
  the request's future, into the response body, back), and a TLS wire's state is over a kilobyte:
  `memcpy` was 11% of the outbound's instructions. The pool now holds its connections boxed:
  outbound 30.6k -> 27.6k instructions per request, `memcpy` 3.5k -> 1.2k of them. At the inbound,
  the request's header map, sized by hyper to the headers it carried, grew twice a request as the
  caller headers went in; room for the four is reserved at once: inbound 35.5k -> 34.6k (both
  changes counted together). Both ends are now below nginx's halves (38.5k and 35.8k). At 1,000
  req/s the proxies' CPU did not move beyond this host's noise (three alternating runs each way,
  /proc ticks of both sidecars over 10 s: 301-311 before, 276-315 after).
";

const METHOD: &str = "
## Method

- **Topologies** (same app, same certificates: one root, one intermediate, ECDSA P-256 leaves with
  one URI SAN each; same thread budget per proxy):
  1. direct: load -> app;
  2. meshid: load -> outbound sidecar (plaintext on 127.0.0.1, HTTP mode) -> mTLS (h2, pooled) ->
     inbound sidecar (allow-list enforced, `x-forwarded-client-cert` added) -> app;
  3. nginx pair: nginx (`proxy_ssl_certificate`, upstream keep-alive) -> nginx
     (`ssl_verify_client on`, upstream keep-alive) -> app;
  4. haproxy pair: haproxy (`ssl crt ... verify required`) -> haproxy (`verify required`, peer SPIFFE
     ID matched in `ssl_c_der`) -> app.

  `throughput_tcp` runs the same pairs in TCP mode (meshid `,tcp` listeners, nginx `stream` from
  `libnginx-mod-stream`, haproxy `mode tcp`).
- **Load generator**: `meshload` (this crate; hyper 1 + rustls with aws-lc-rs, one thread): closed
  loop over N keep-alive connections, or open loop at a fixed rate with latency measured from each
  request's due time (as wrk2: no coordinated omission), HTTP/1.1 or h2, optionally a new TLS
  connection per request with a client certificate. It reports count, errors, req/s,
  p50/p90/p99/p99.9/max and its own CPU share.
- **Pinning**: the load generator runs on CPU 0; the app (`bench-app`, one thread, fixed 64-byte
  response) and every proxy run on CPU 1 (`taskset`), so a pair's throughput is what one core
  pushes through app + outbound + inbound. meshid runs with `TOKIO_WORKER_THREADS=1`, nginx with
  `worker_processes 1`, haproxy with `nbthread 1`. The load generator's own CPU share is reported;
  above 90% its figures may be limited by the load, not the server (expected for direct).
- **CPU** is utime+stime from `/proc/<pid>/stat` (nginx: master + worker) read when the measured
  window opens and closes; per request = CPU / successful requests in the window. `CPU 1 used by
  these` is the share of CPU 1 that the app and proxies got: below 1 at saturation, the rest went to
  the kernel's softirq work or to other jobs on the machine.
- **Latency** at a fixed rate is measured from each request's due time (open loop), so a stall is
  charged to every request it delayed. Added latency = contender - direct in the same round.
- **Handshakes**: TLS 1.3, X25519, full handshakes only (the client never resumes; nginx and haproxy
  have session caches and tickets off, meshid never resumes), one GET per connection, client
  certificate verified by the terminator. meshid is measured once more with the load offering
  X25519MLKEM768 first, as meshid's sidecars and CA do between themselves (OpenSSL 3.0 in nginx and
  haproxy has no ML-KEM); the load generator reports the group each connection negotiated and the run
  fails unless every one was X25519MLKEM768.
- **First request**: the same connections one at a time from a client that leaves Nagle's algorithm
  on (as Python's `ssl` and many Java clients do): its GET waits until the terminator acknowledges
  the client's Finished, which a terminator that sends nothing then delays by the kernel's 40 ms
  delayed ACK (meshid acknowledges at once: TCP_QUICKACK after the handshake).
- **Memory** from `smaps_rollup`: RSS (includes the pages of the binary and libraries it touched),
  anonymous (heap and stacks: what one more instance adds) and private (clean + dirty: also counts
  binary pages no other process maps, so a lone sidecar's private memory includes its code);
  nginx counts master + worker (its anonymous figure counts the pages they share copy-on-write
  twice; private does not).
- **Startup**: meshid is built with aws-lc's CPU-jitter entropy source off
  (`AWS_LC_SYS_NO_JITTER_ENTROPY` in `.cargo/config.toml`): aws-lc seeds from the kernel's
  `getrandom`, as OpenSSL, BoringSSL, ring and Go do. With it on, the first random draw of every
  process spent about 45 ms of CPU collecting jitter (measured: 52 ms start-to-ready in CA mode
  with it, 9 ms without).
- **Rounds**: each figure is the median of the runs (min and max shown); each round starts every
  contender fresh, in a rotated order, with the same warm-up and load. A contender that fails a run
  is listed as failed, never dropped. The binaries are copied at the start, so a rebuild during the
  run cannot change what is measured.
- **Known differences between contenders** (each proxy's own features or design, not tuning):
  - nginx cannot verify a server certificate that has only a URI SAN (`proxy_ssl_verify` always
    checks a host name), so the nginx originating side does not verify the terminator; nginx's
    terminator checks the chain but cannot match the peer's SPIFFE ID (no URI SAN variable), while
    meshid and haproxy check it;
  - the identity header: meshid adds `x-forwarded-client-cert` with its own ID, the peer ID and the
    certificate hash; nginx and haproxy add only the certificate hash;
  - nginx and haproxy speak HTTP/1.1 between the pair (their usual upstream protocol); meshid
    multiplexes h2 between sidecars under load (fewer connections and syscalls per request) and
    sends a bodiless idempotent request over pooled HTTP/1.1 when its listener is quiet (none in
    flight, requests on average 500 us apart or more: about 2,000 a second).
- **What favours meshid here, and how much** (a review of the harness for fairness, session 39):
  - *Throughput*: h2 between the sidecars carries the 32 load connections over one mTLS
    connection, where nginx and haproxy keep about 32 HTTP/1.1 TLS connections. Sending every
    request over HTTP/1.1 took the pair from 1.40x to 1.07x nginx's (the findings below);
    `throughput_tcp`, where each load connection is one mTLS connection end to end for every
    contender, is the like-for-like figure (1.25x this run). haproxy can speak h2 to its server;
    this harness does not ask it to.
  - *Build*: meshid is the `dist` profile (fat LTO, one codegen unit) with a PGO profile and a
    symbol order recorded on these same loads (`scripts/pgo-profile.sh`: 32 connections, 1,000
    req/s, `GET /`, new connections, a Nagle client); nginx and haproxy are Debian's packages. PGO
    took about a quarter off the proxies' CPU per request at 1,000 req/s, and the symbol order is
    what brings idle RSS under 6 MiB.
  - *Handshakes*: they mostly compare TLS libraries: aws-lc in meshid (about 73% of its handshake
    CPU), Debian 12's OpenSSL 3.0 in nginx and haproxy, both 4-5x slower than meshid. meshid also
    remembers intermediates it verified (one ECDSA verification of three saved per handshake; the
    benchmark has one intermediate). Read the handshake targets as \"against nginx on OpenSSL
    3.0\".
  - *First request*: on this kernel no contender hit the 40 ms delayed-ACK stall the scenario is
    about (nginx's and haproxy's slowest first requests were under 13 ms), so its ratio is
    handshake latency again.
  - *Idle memory*: nginx's RSS and anonymous memory add its master's and worker's, counting the
    pages they share twice (its PSS, 11.4 MiB this run, is about 60% of its RSS); meshid's twin
    sidecars share their binary's pages, which lowers their PSS (2.5 MiB) and private figures.
    Per-connection figures grow in one process and are not affected.
  - *haproxy*: its inbound reads the peer certificate's DER and SHA-1 on every request (meshid
    decides the identity once per connection), and its default `http-reuse safe` opens the
    app connection of a session's first request anew.
  - *Noise*: three rounds per figure, on shared virtual machines; a median that clears a target by
    a few percent (throughput: rounds 1.52x, 1.18x, 1.60x) is not a robust \"met\". The added
    latency targets are judged on the difference within each round, then its median.
";

/// A failed command's message without the backtrace that `anyhow` appends to it when
/// `RUST_BACKTRACE` is set: the page shows what failed, not where in the harness.
fn without_backtrace(error: &str) -> &str {
    error
        .find("Stack backtrace:")
        .map_or(error, |i| &error[..i])
        .trim_end()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::harness::report::Run;

    #[test]
    fn failed_contenders_are_listed() {
        let mut round = BTreeMap::new();
        let mut figures = BTreeMap::new();
        figures.insert("requests_per_second".to_owned(), 1234.5);
        round.insert(
            "meshid".to_owned(),
            Run {
                round: 0,
                figures,
                error: None,
                detail: Value::Null,
            },
        );
        round.insert(
            "nginx".to_owned(),
            Run {
                round: 0,
                figures: BTreeMap::new(),
                error: Some("nginx server did not listen".into()),
                detail: Value::Null,
            },
        );
        let s = ScenarioResult::new("throughput", "T", "setup".into(), &[round]);
        let mut md = String::new();
        figure_table(&mut md, &s, columns("throughput"));
        assert!(md.contains("| meshid | 1,234 |"), "{md}");
        assert!(md.contains("| nginx | **failed** (1 of 1 runs) |"), "{md}");
    }

    #[test]
    fn a_failure_is_shown_without_its_backtrace() {
        let e = "fleet of 19000: 5 sidecar(s) did not acknowledge bundle v1\n\nStack backtrace:\n   0: msg";
        assert_eq!(
            without_backtrace(e),
            "fleet of 19000: 5 sidecar(s) did not acknowledge bundle v1"
        );
        assert_eq!(without_backtrace("plain"), "plain");
    }

    #[test]
    fn numbers_read_well() {
        assert_eq!(number(123456.7), "123,457");
        assert_eq!(number(-1500.0), "-1,500");
        assert_eq!(number(15.25), "15.2");
        assert_eq!(number(0.5), "0.50");
        assert_eq!(number(f64::NAN), "n/a");
    }
}
