//! `docs/reliability.md`, generated from the run's JSON: every figure next to the command that
//! produced it, and the scenarios of issue #18 not built yet named as such.

use std::fmt::Write as _;

use serde::{Deserialize, Serialize};
use serde_json::Value;

use super::ScenarioReport;

/// The whole run, as written to JSON.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct RunReport {
    pub mode: String,
    pub generated_unix: u64,
    pub seconds: f64,
    /// How this run was started.
    pub command: String,
    /// Placeholders used in the recorded commands: `$BIN` and `$WORK`.
    pub bin_dir: String,
    pub work_dir: String,
    pub machine: Value,
    pub versions: Value,
    pub scenarios: Vec<ScenarioReport>,
}

/// What the scenarios found, and what became of it (kept by hand: the checks that caught each one
/// stay in the scenarios as its regression test).
pub const FOUND: &[&str] = &[
    "`rotations-under-load`, first measured by hand in issue #18 (`local-mesh --ttl 20s`, 32 \
     connections at saturation): 3 answers of 502 in 678,251 requests, the outbound sidecar \
     logging \"upstream request failed ... connection closed\" as the upstream ended an h2 \
     connection at the expiry of the certificate presented on it, with requests crossing its \
     GOAWAY. Fixed before this scenario existed (d5d36d8: the outbound sidecar moves to a new \
     connection once its renewed certificate is in force and 2 s before either end's expiry, and \
     sends once more a request a closing connection hands back unsent; tests \
     `sidecar_lifecycle::connections_retired_at_renewal_and_expiry_fail_no_request_in_flight` and \
     `sidecar_lifecycle::after_a_renewal_requests_go_out_on_a_connection_presenting_the_new_certificate`). \
     The scenario's zero-failure check is its regression test here: against a sidecar with those \
     outbound changes undone, 3 of 7 smoke runs failed (25 to 32 answers of 502 \"connection \
     closed\" each, all within a millisecond, next to a certificate's expiry or renewal) and one \
     full run of 1,000,802 requests did not; with them, none of 7 smoke runs and none of the full \
     runs failed. The race is not hit on every run, so one passing run does not prove it absent.",
    "`ca-outage`: a sidecar without a valid certificate (started while the CA was down, or expired \
     during the outage) retried on a backoff sized for the certificate lifetime, a tenth of it: six \
     minutes between attempts with the default 1 h certificates, so it kept failing closed for up \
     to six minutes after the CA was back. Fixed: without a valid certificate it asks again at \
     least every 5 s, and a held certificate's expiry bounds every wait \
     (`meshid_identity::timing::retry_wait`; test \
     `sidecar_lifecycle::without_a_valid_certificate_the_sidecar_asks_the_ca_again_within_seconds`, \
     which fails on the old sidecar with a 6.7 s wait). The check on the late sidecar's announced \
     waits above is its regression test here.",
    "`ca-dir`, read-only: a join token the CA could not mark used (the rename in a read-only \
     directory failed) was answered `UNAUTHENTICATED` \"join token was already used\", so the sidecar \
     dropped the still-unused token for good and never got a certificate, even once the directory \
     was writable again. Fixed: the CA answers `UNAVAILABLE` saying the token was not consumed \
     (metric result `join_token_unrecorded`), and the sidecar tries the same token again \
     (test `ca_auth::a_join_token_whose_use_cannot_be_recorded_stays_good`).",
    "`ca-dir`, full: `meshid-ca rotate intermediate` on a full directory failed cleanly but left \
     its empty temporary file (`intermediate.tmp<pid>`) in the CA directory. Fixed: a failed \
     atomic write removes its temporary file (test \
     `ca_dir::tests::a_failed_write_leaves_the_file_as_it_was_and_nothing_else`).",
    "`clock-steps`, 5 minutes back: the CA backdated a leaf's not-before by only min(60 s, 10% of \
     the lifetime), and its own TLS certificate by 60 s, so a sidecar whose clock was stepped back \
     5 minutes (run against the sidecar and CA of 7f148c4) went unready at once (its own \
     certificate was not yet valid by its clock: 15 of 15 readiness samples failed), refused a \
     restarted peer's fresh certificate (no request served), and once restarted itself never got \
     a certificate it could take. Fixed: every leaf and the CA's TLS certificate are backdated by \
     5 minutes whatever the lifetime, as Kubernetes' CSR signer does \
     (`meshid_ca::signer::BACKDATE`; unit test \
     `signer::tests::short_lifetimes_are_backdated_as_far_as_long_ones`). The three 5-minutes-back \
     checks above are its regression test.",
    "`clock-steps`, forward: the renewal wait was a monotonic timer set when the certificate came, \
     so a wall clock stepped forward left it in place: a sidecar stepped 5 minutes ahead did not \
     renew although its certificate was past its renewal point by its clock (the same clock that \
     decides when it fails closed), and one stepped past its certificate's lifetime failed closed \
     without asking the CA at all (0 attempts in 10 s) and without saying why. Fixed: the wait \
     also ends when the wall clock has moved past it, checked every 5 s \
     (`meshid_runtime::time::sleep_wall`; unit tests \
     `time::tests::a_wall_clock_stepped_forward_ends_the_wait_within_a_check` and \
     `a_wall_clock_stepped_back_or_standing_still_never_delays_the_wait`), and a fresh \
     certificate refused as expired or not yet valid is logged as a clock disagreement with the \
     CA. The forward and past-the-lifetime checks above are its regression test.",
    "Seen in the code while writing `ca-dir`, not produced by it (on a filled tmpfs the first \
     write fails): `rotate intermediate` replaced `intermediate.pem` and then `intermediate.key`, \
     each atomically but not together, so a failure or a crash between the two left a new \
     certificate beside the old key, and a CA that would not start on it. Fixed: the new key is \
     written in full beside the old one first, a failure before the key's rename puts the old \
     certificate back, and a CA loading a certificate whose key is still waiting takes that key \
     (unit tests `authority::tests::an_intermediate_rotation_cut_short_between_certificate_and_key_is_completed_at_load` \
     and `an_intermediate_key_that_cannot_be_put_in_place_puts_the_old_certificate_back`).",
    "`floods` (session 9's run, against 9a736d2): a listener whose `--max-connections` a flood \
     from many hosts filled (sidecar inbound and outbound, CA gRPC, injector) refused new allowed \
     connections as it refused the flood's: only 1.8-2.9% of the allowed clients' new connections \
     got through during the flood, each when it won a slot a timeout had just freed. Fixed: at a \
     cap a newcomer displaces the oldest connection that has not proved itself yet (no \
     authenticated handshake, call or request head), from the address holding the most of them, \
     an address with a proven connection last (`meshid_runtime::admission`; unit tests in \
     `admission::tests`, and `sidecar_inbound::garbage_slowloris_and_floods_do_not_stop_service`, \
     `ca_limits::silent_connections_at_the_cap_make_room_for_a_client` and \
     `inject_binary::hostile_clients_cannot_hold_up_admission_reviews`, each asserting that \
     allowed clients are served while silent connections fill the cap). The many-host checks above (every allowed new connection served during the flood) \
     are its regression test.",
    "`floods` (same run): the admin servers (sidecar, CA, injector) had no connection limit, only \
     a 5 s request-head timeout: a flood of 1,000 connections cost about 19 KiB of RSS per held \
     connection, and one holding more connections than the process has file descriptors would \
     have starved the data-plane listeners of the same process too. Fixed: every admin port holds \
     at most 256 connections (`meshid_runtime::admin::MAX_CONNECTIONS`), with the same \
     displacement, so probes and scrapes are still served past the cap (test \
     `admin::tests::probes_are_answered_while_silent_connections_flood_the_cap`). The admin \
     checks above, with a flood of 10 x that cap, are its regression test.",
    "review (session 34, not a chaos run): a connection to an admin port became proven with its \
     first request head and then kept its slot: keep-alive clients between requests, or clients \
     asking for `/metrics` and never reading the answer, from any pod, could fill the 256 slots \
     and keep the kubelet's probes out (restarts). Fixed: an admin connection serves one \
     request, is never proven (so the displacement reaches it in any state) and ends 15 s after \
     accept at the latest (test \
     `admin::tests::probes_are_answered_while_finished_and_stalled_requests_fill_the_cap`).",
];

fn fmt_value(v: f64, unit: &str) -> String {
    let n = if v.is_nan() {
        "n/a".to_owned()
    } else if v.fract() == 0.0 && v.abs() < 1e12 {
        format!("{}", v as i64)
    } else if v.abs() >= 100.0 {
        format!("{v:.0}")
    } else if v.abs() >= 1.0 {
        format!("{v:.2}")
    } else {
        format!("{v:.3}")
    };
    if unit.is_empty() {
        n
    } else {
        format!("{n} {unit}")
    }
}

/// Whether `value` meets a target written as `N` (exactly), `< N`, `<= N`, `> N` or `>= N`.
fn target_met(value: f64, target: &str) -> bool {
    let t = target.trim();
    let num = |s: &str| s.trim().parse::<f64>().ok();
    if let Some(n) = t.strip_prefix("<=").and_then(num) {
        value <= n
    } else if let Some(n) = t.strip_prefix('<').and_then(num) {
        value < n
    } else if let Some(n) = t.strip_prefix(">=").and_then(num) {
        value >= n
    } else if let Some(n) = t.strip_prefix('>').and_then(num) {
        value > n
    } else {
        num(t).is_some_and(|n| value == n)
    }
}

fn cell(s: &str) -> String {
    s.replace('|', "\\|").replace('\n', " ")
}

impl RunReport {
    /// A recorded command with the run's directories replaced by `$BIN` and `$WORK`.
    fn shorten(&self, cmd: &str) -> String {
        let mut c = cmd.to_owned();
        if !self.bin_dir.is_empty() {
            c = c.replace(&self.bin_dir, "$BIN");
        }
        if !self.work_dir.is_empty() {
            c = c.replace(&self.work_dir, "$WORK");
        }
        c
    }

    pub fn render(&self, json_path: &str) -> String {
        let mut md = String::new();
        let w = &mut md;
        let _ = writeln!(w, "# Reliability: faults survived, measured\n");
        let _ = writeln!(
            w,
            "_Generated by `bench/chaos.sh` (`chaos-run` in the `meshid-bench` crate); edits are \
             overwritten. Raw figures: [`{json_path}`](../{json_path})._\n"
        );
        let _ = writeln!(
            w,
            "Each scenario runs the real `meshid-ca`, `meshid-sidecar` (and, for `floods`, `meshid-injector`) release binaries on \
             loopback, under load, injects one fault, checks what the README promises for it (a \
             broken promise fails the run, in CI too) and measures what the fault cost. Absolute \
             times come from a shared 2-core VM and move between runs; the checks do not depend on \
             them.\n"
        );
        let _ = writeln!(w, "## How to run\n");
        let _ = writeln!(
            w,
            "```sh\n\
             bench/chaos.sh                         # every scenario, published figures (this file)\n\
             bench/chaos.sh --smoke                 # CI: every scenario, smaller and shorter; into bench/results/smoke/\n\
             bench/chaos.sh --scenarios ca-outage   # some scenarios (ca-outage, signals, files, ca-dir, clock-steps, floods, rotations-under-load, soak); the others' results are kept\n\
             bench/chaos.sh --scenarios soak --soak-minutes 10   # a shorter soak\n\
             bench/chaos.sh --sidecars 1000         # a bigger renewal storm for ca-outage\n\
             ```\n"
        );
        let _ = writeln!(w, "## The last run\n");
        let _ = writeln!(
            w,
            "A full run of some scenarios (`--scenarios`) keeps the others' results from the run \
             that measured them; each scenario's heading names the meshid commit it ran against.\n"
        );
        let _ = writeln!(w, "| | |\n| --- | --- |");
        let _ = writeln!(w, "| mode | {} |", self.mode);
        let _ = writeln!(w, "| command | `{}` |", cell(&self.command));
        let _ = writeln!(w, "| generated (unix time) | {} |", self.generated_unix);
        let _ = writeln!(w, "| duration of the whole run | {:.0} s |", self.seconds);
        let _ = writeln!(w, "| `$BIN` in the commands below | `{}` |", self.bin_dir);
        let _ = writeln!(
            w,
            "| `$WORK` in the commands below | `{}` (deleted afterwards) |",
            self.work_dir
        );
        for (k, v) in self
            .machine
            .as_object()
            .into_iter()
            .flatten()
            .chain(self.versions.as_object().into_iter().flatten())
        {
            let v = v.as_str().map_or_else(|| v.to_string(), str::to_owned);
            let _ = writeln!(w, "| {k} | {} |", cell(&v));
        }
        let _ = writeln!(w, "\n## Summary\n");
        let _ = writeln!(
            w,
            "| scenario | status | checks passed | figures with a target met |"
        );
        let _ = writeln!(w, "| --- | --- | --- | --- |");
        for s in &self.scenarios {
            let passed = s.checks.iter().filter(|c| c.passed).count();
            let targets: Vec<_> = s.figures.iter().filter(|f| f.target.is_some()).collect();
            let met = targets
                .iter()
                .filter(|f| f.target.as_deref().is_some_and(|t| target_met(f.value, t)))
                .count();
            let _ = writeln!(
                w,
                "| [{}](#{}) {} | {} | {passed} of {} | {met} of {} |",
                s.id,
                s.id,
                cell(&s.title),
                s.status,
                s.checks.len(),
                targets.len()
            );
        }
        for s in &self.scenarios {
            self.scenario(w, s);
        }
        let _ = writeln!(w, "\n## What these scenarios found\n");
        for f in FOUND {
            let _ = writeln!(w, "- {f}");
        }
        md
    }

    fn scenario(&self, w: &mut String, s: &ScenarioReport) {
        let _ = writeln!(w, "\n## {}\n", s.id);
        let at = if s.commit.is_empty() {
            String::new()
        } else {
            format!("; meshid {}, Unix time {}", s.commit, s.generated_unix)
        };
        let _ = writeln!(
            w,
            "**{}** ({}, {:.0} s{at})\n",
            s.title, s.status, s.seconds
        );
        let smoke = if self.mode == "smoke" { " --smoke" } else { "" };
        let _ = writeln!(
            w,
            "Reproduce: `bench/chaos.sh{smoke} --scenarios {}`\n",
            s.id
        );
        let _ = writeln!(w, "{}\n", s.setup);
        if let Some(e) = &s.error {
            let _ = writeln!(w, "**The scenario could not finish:** {}\n", cell(e));
        }
        if !s.figures.is_empty() {
            let _ = writeln!(w, "| figure | value | target |\n| --- | --- | --- |");
            for f in &s.figures {
                let _ = writeln!(
                    w,
                    "| {} | {} | {} |",
                    cell(&f.name),
                    fmt_value(f.value, &f.unit),
                    f.target.as_deref().unwrap_or("")
                );
            }
            let _ = writeln!(w);
        }
        if !s.checks.is_empty() {
            let _ = writeln!(w, "| check | result | what was seen |\n| --- | --- | --- |");
            for c in &s.checks {
                let _ = writeln!(
                    w,
                    "| {} | {} | {} |",
                    cell(&c.what),
                    if c.passed { "passed" } else { "**FAILED**" },
                    cell(&c.detail)
                );
            }
            let _ = writeln!(w);
        }
        for n in &s.notes {
            let _ = writeln!(w, "- {n}");
        }
        if !s.notes.is_empty() {
            let _ = writeln!(w);
        }
        let _ = writeln!(
            w,
            "<details><summary>Every process and command this scenario ran ({})</summary>\n\n```sh",
            s.commands.len()
        );
        for c in &s.commands {
            let _ = writeln!(w, "{}", self.shorten(c));
        }
        let _ = writeln!(w, "```\n</details>");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn targets_are_judged_as_written() {
        assert!(target_met(0.0, "0"));
        assert!(!target_met(1.0, "0"));
        assert!(target_met(0.7, "< 16"));
        assert!(!target_met(16.0, "< 16"));
        assert!(target_met(16.0, "<= 16"));
        assert!(target_met(2.0, ">= 2") && !target_met(2.0, "> 2"));
        assert!(!target_met(1.0, "fast"));
    }

    #[test]
    fn values_read_well() {
        assert_eq!(fmt_value(0.0, ""), "0");
        assert_eq!(fmt_value(1.23456, "s"), "1.23 s");
        assert_eq!(fmt_value(0.01234, "s"), "0.012 s");
        assert_eq!(fmt_value(f64::NAN, "s"), "n/a s");
    }

    #[test]
    fn each_scenario_is_rendered_with_its_commit_and_how_to_reproduce_it() {
        let mut s = ScenarioReport::new("x", "X");
        s.commit = "0123456789ab".into();
        s.generated_unix = 7;
        s.commands = vec!["$BIN/meshid-ca serve --dir $WORK/ca".into()];
        let r = RunReport {
            mode: "smoke".into(),
            generated_unix: 0,
            seconds: 1.0,
            command: "chaos-run --smoke".into(),
            bin_dir: "/b".into(),
            work_dir: "/w".into(),
            machine: Value::Null,
            versions: Value::Null,
            scenarios: vec![s],
        };
        let md = r.render("bench/results/smoke/chaos.json");
        assert!(md.contains("--smoke --scenarios x"));
        assert!(md.contains("meshid 0123456789ab, Unix time 7"));
        assert!(md.contains("$BIN/meshid-ca serve --dir $WORK/ca"));
        assert!(!md.contains("not yet measured"));
    }
}
