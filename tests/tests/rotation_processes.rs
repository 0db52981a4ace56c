//! Root rotation done by real processes only: two `meshid-ca serve` on one CA directory, three
//! `meshid-sidecar` binaries in CA mode (a pair with an app behind the inbound, and a third one that
//! lags), continuous HTTP traffic through the pair, and the rotation driven by the `meshid-ca rotate`
//! command line, with one CA killed (-9) and restarted in the middle.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use meshid_ca::rotation::RotationReport;
use meshid_identity::{SpiffeId, TrustDomain};
use meshid_tests::fake_cluster::{FakeCluster, unix_now};
use meshid_tests::mesh::{Traffic, client_config, mtls_connect};
use meshid_tests::process::{Proc, ca_mode_sidecar, free_addr, wait_http_ok};
use meshid_tests::rotation_cli::{
    anchors, identity, meshid_ca, poll, read_roots, report_of, root_sha, rotate, rotate_until_ok,
    served_bundle, status,
};
use meshid_tests::tools::workspace_bin;

const A: &str = "spiffe://cluster.local/ns/shop/sa/frontend";
const B: &str = "spiffe://cluster.local/ns/shop/sa/backend";
const LAGGING: &str = "spiffe://cluster.local/ns/shop/sa/lagging";
/// Certificate lifetime: renewals (half-life) and expiries happen within the test.
const TTL: &str = "8s";

/// One `meshid-ca serve` process and the addresses it was started on (to restart it there).
struct Ca {
    proc: Proc,
    grpc: SocketAddr,
    admin: SocketAddr,
}

fn start_ca(dir: &Path, jwks: &Path, grpc: SocketAddr, admin: SocketAddr) -> Ca {
    start_ca_issuing_for(dir, jwks, grpc, admin, TTL)
}

/// [`start_ca`], issuing certificates that live `ttl`.
fn start_ca_issuing_for(
    dir: &Path,
    jwks: &Path,
    grpc: SocketAddr,
    admin: SocketAddr,
    ttl: &str,
) -> Ca {
    let proc = Proc::spawn(
        "meshid-ca",
        Command::new(workspace_bin("meshid-ca"))
            .args(["serve", "--dir"])
            .arg(dir)
            .args(["--listen", &grpc.to_string()])
            .args(["--admin-listen", &admin.to_string()])
            .args(["--san", "localhost", "--ttl", ttl, "--max-ttl", ttl])
            .arg("--jwks")
            .arg(jwks)
            .env("MESHID_LOG", "warn"),
    );
    assert!(
        wait_http_ok(admin, "/readyz", Duration::from_secs(10)),
        "CA on {grpc} ready"
    );
    Ca { proc, grpc, admin }
}

fn spawn_sidecar(
    ca: SocketAddr,
    ca_bundle: &Path,
    token_flag: &str,
    token: &Path,
    admin: SocketAddr,
    listeners: Vec<String>,
) -> Proc {
    Proc::spawn(
        "meshid-sidecar",
        ca_mode_sidecar(ca, ca_bundle, token_flag, token, admin)
            .args(["--ttl", TTL])
            .args(listeners),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn root_rotation_by_real_processes_under_traffic() {
    let started = Instant::now();
    let work = tempfile::tempdir().unwrap();
    let dir: PathBuf = work.path().join("ca");
    let (code, out) = meshid_ca(&["init", "--dir", &dir.to_string_lossy()]);
    assert_eq!(code, 0, "{out}");
    let cluster = FakeCluster::new();
    let jwks = work.path().join("jwks.json");
    cluster.write_jwks(&jwks);

    // Two CA processes on one directory, each on its own "host".
    let mut ca1 = start_ca(
        &dir,
        &jwks,
        free_addr("127.0.0.21"),
        free_addr("127.0.0.21"),
    );
    let ca2 = start_ca(
        &dir,
        &jwks,
        free_addr("127.0.0.22"),
        free_addr("127.0.0.22"),
    );
    let admins = [ca1.admin, ca2.admin];
    let roots_v1 = read_roots(&dir.join("bundle.pem"));
    assert_eq!(roots_v1.len(), 1);

    // Credentials: B (service-account token) and the lagging sidecar talk to CA 1, A (join token) to
    // CA 2. The CA bundle file is a copy: the directory's bundle.pem changes during the rotation.
    let ca_bundle = work.path().join("ca-bundle.pem");
    std::fs::copy(dir.join("bundle.pem"), &ca_bundle).unwrap();
    let b_token = work.path().join("backend.token");
    std::fs::write(&b_token, cluster.token("shop", "backend")).unwrap();
    let lag_token = work.path().join("lagging.token");
    std::fs::write(&lag_token, cluster.token("shop", "lagging")).unwrap();
    let join = Command::new(workspace_bin("meshid-ca"))
        .args(["token", "create", "--dir"])
        .arg(&dir)
        .args(["--id", A])
        .output()
        .unwrap();
    assert!(join.status.success(), "{join:?}");
    let a_join = work.path().join("frontend.join");
    std::fs::write(&a_join, &join.stdout).unwrap();

    // The app behind B, and the pair.
    let app = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let app_addr = app.local_addr().unwrap();
    tokio::spawn(meshid_examples::http_echo(app));
    let (b_in, b_admin) = (free_addr("127.0.0.23"), free_addr("127.0.0.23"));
    let b_policy = work.path().join("b-policy.yaml");
    std::fs::write(
        &b_policy,
        format!(
            "inbound:\n  - port: {}\n    protocol: http\n    allow:\n      - id: {A}\n",
            b_in.port()
        ),
    )
    .unwrap();
    let _b = spawn_sidecar(
        ca1.grpc,
        &ca_bundle,
        "--token-file",
        &b_token,
        b_admin,
        vec![
            "--inbound".into(),
            format!("{b_in}={app_addr},http"),
            "--policy".into(),
            b_policy.to_string_lossy().into_owned(),
        ],
    );
    let (a_local, a_admin) = (free_addr("127.0.0.1"), free_addr("127.0.0.24"));
    let _a = spawn_sidecar(
        ca2.grpc,
        &ca_bundle,
        "--join-token-file",
        &a_join,
        a_admin,
        vec!["--outbound".into(), format!("{a_local}={b_in},{B},http")],
    );
    let (lag_local, lag_admin) = (free_addr("127.0.0.1"), free_addr("127.0.0.25"));
    let lagging = spawn_sidecar(
        ca1.grpc,
        &ca_bundle,
        "--token-file",
        &lag_token,
        lag_admin,
        vec!["--outbound".into(), format!("{lag_local}={b_in},{B},http")],
    );
    for (name, admin) in [("B", b_admin), ("A", a_admin), ("lagging", lag_admin)] {
        assert!(
            wait_http_ok(admin, "/readyz", Duration::from_secs(15)),
            "sidecar {name} ready"
        );
    }
    let traffic = Traffic::start(a_local, Some(format!("caller={A}")));

    // Every sidecar is connected to its CA and acknowledged bundle v1.
    assert!(
        poll(Duration::from_secs(15), || {
            let r = status(&dir, &admins);
            [A, B, LAGGING].iter().all(|id| {
                r.sidecars
                    .iter()
                    .any(|s| s.identity == *id && s.connected && s.acked_version == 1)
            })
        }),
        "all three sidecars acknowledged v1: {:?}",
        status(&dir, &admins)
    );

    // Nothing to activate or retire yet.
    let (code, out) = rotate("activate", &dir, &admins, &[]);
    assert!(
        code != 0 && out.contains("no prepared authority"),
        "{code}: {out}"
    );
    let (code, out) = rotate("retire", &dir, &admins, &[]);
    assert!(
        code != 0 && out.contains("no retiring authority"),
        "{code}: {out}"
    );

    // The lagging sidecar is frozen (SIGSTOP): its bundle stream stays open, it acknowledges nothing.
    lagging.signal("STOP");
    let (code, out) = meshid_ca(&["rotate", "prepare", "--dir", &dir.to_string_lossy()]);
    assert_eq!(code, 0, "prepare: {out}");
    assert!(out.contains("prepared authority 2"), "{out}");
    eprintln!("prepared at {:?}", started.elapsed());

    // Both CA processes serve bundle v2 with both roots; A and B apply and acknowledge it.
    let roots_v2 = read_roots(&dir.join("bundle.pem"));
    assert_eq!(roots_v2.len(), 2);
    for ca in [&ca1, &ca2] {
        let mut served = (0, Vec::new());
        let same = tokio::time::timeout(Duration::from_secs(10), async {
            loop {
                served = served_bundle(ca.grpc, &roots_v1).await;
                if served == (2, roots_v2.clone()) {
                    break;
                }
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        })
        .await;
        assert!(same.is_ok(), "CA {} serves v2: {served:?}", ca.grpc);
    }
    assert!(
        poll(Duration::from_secs(15), || {
            let r = status(&dir, &admins);
            [A, B].iter().all(|id| {
                r.sidecars
                    .iter()
                    .any(|s| s.identity == *id && s.connected && s.acked_version == 2)
            })
        }),
        "A and B acknowledged v2: {:?}",
        status(&dir, &admins)
    );

    // activate refuses, naming the one sidecar that has not acknowledged; status says the same.
    let (code, out) = rotate("activate", &dir, &admins, &[]);
    assert!(
        code != 0,
        "activate must refuse while a sidecar lags: {out}"
    );
    assert!(
        out.contains(LAGGING) && out.contains("needs v2"),
        "the refusal names the lagging sidecar: {out}"
    );
    assert!(
        !out.contains(A) && !out.contains(B),
        "only the lagging sidecar blocks: {out}"
    );
    let (code, out) = rotate("status", &dir, &admins, &[]);
    assert_eq!(code, 0, "{out}");
    assert!(
        out.contains("activate is waiting") && out.contains(LAGGING),
        "{out}"
    );
    // Each sidecar line names what releases that instance alone, without --json.
    let lagging_line = out
        .lines()
        .skip_while(|l| !l.contains(&format!("sidecar {LAGGING}")))
        .nth(1)
        .unwrap_or_default();
    assert!(
        lagging_line.contains("serial ")
            && lagging_line.contains("release it alone with `meshid-ca revoke --serial "),
        "{out}"
    );

    // Thawed, it acknowledges v2 (still connected), and activate passes.
    lagging.signal("CONT");
    assert!(
        poll(Duration::from_secs(15), || {
            status(&dir, &admins)
                .sidecars
                .iter()
                .any(|s| s.identity == LAGGING && s.connected && s.acked_version == 2)
        }),
        "the lagging sidecar acknowledged v2: {:?}",
        status(&dir, &admins)
    );
    let out = rotate_until_ok("activate", &dir, &admins, Duration::from_secs(10));
    assert!(out.contains("authority 2 now signs"), "{out}");
    eprintln!("activated at {:?}", started.elapsed());

    // retire refuses while certificates under the old root are live, naming the authority and the
    // latest expiry.
    let (code, out) = rotate("retire", &dir, &admins, &[]);
    assert!(code != 0, "retire must refuse right after activate: {out}");
    assert!(
        out.contains("authority 1") && out.contains("the last expires at"),
        "{out}"
    );

    // kill -9 of CA 1 in the middle of the rotation; restarted on the same addresses, it keeps the
    // state (bundle v2, authority 2 active, authority 1 retiring) and the sidecars come back to it.
    let before = report_of(&dir, ca2.admin).expect("CA 2 report");
    // The latest expiry of the old-root certificates CA 2 issued (CA 2 keeps running, so it never
    // forgets them): retire must not pass before it.
    let old_expiry_ca2 = before
        .authorities
        .iter()
        .find(|a| a.name == "1")
        .map(|a| a.latest_certificate_expiry)
        .expect("authority 1 in CA 2's report");
    assert!(old_expiry_ca2 > unix_now(), "{before:?}");
    ca1.proc.signal("KILL");
    assert!(
        ca1.proc.wait_timeout(Duration::from_secs(5)).is_some(),
        "CA 1 died"
    );
    ca1 = start_ca(&dir, &jwks, ca1.grpc, ca1.admin);
    eprintln!("CA 1 killed and restarted at {:?}", started.elapsed());
    let after = report_of(&dir, ca1.admin).expect("restarted CA 1 report");
    assert_eq!(after.bundle_version, 2);
    let states = |r: &RotationReport| -> Vec<(String, String, String)> {
        r.authorities
            .iter()
            .map(|a| (a.name.clone(), a.state.clone(), a.root_sha256.clone()))
            .collect()
    };
    assert_eq!(states(&after), states(&before));
    assert!(
        states(&after).contains(&("2".into(), "active".into(), root_sha(&before, "2")))
            && states(&after)
                .iter()
                .any(|(n, s, _)| n == "1" && s == "retiring"),
        "{after:?}"
    );
    assert!(
        poll(Duration::from_secs(15), || {
            report_of(&dir, ca1.admin).is_some_and(|r| {
                [B, LAGGING].iter().all(|id| {
                    r.sidecars
                        .iter()
                        .any(|s| s.identity == *id && s.connected && s.acked_version == 2)
                })
            })
        }),
        "B and the lagging sidecar reconnected to the restarted CA: {:?}",
        report_of(&dir, ca1.admin)
    );

    // retire passes once every old certificate expired (the sidecars renewed under authority 2).
    let out = rotate_until_ok("retire", &dir, &admins, Duration::from_secs(30));
    assert!(out.contains("authority 1 retired"), "{out}");
    assert!(
        unix_now() >= old_expiry_ca2,
        "retire passed before the old certificates expired ({old_expiry_ca2})"
    );
    let retired_at = started.elapsed();

    // Both CA processes serve bundle v3 with only the new root.
    let roots_v3 = read_roots(&dir.join("bundle.pem"));
    assert_eq!(roots_v3.len(), 1);
    assert_ne!(roots_v3[0], roots_v1[0]);
    assert!(roots_v2.contains(&roots_v3[0]));
    for ca in [&ca1, &ca2] {
        let mut served = (0, Vec::new());
        let same = tokio::time::timeout(Duration::from_secs(10), async {
            loop {
                served = served_bundle(ca.grpc, &roots_v3).await;
                if served == (3, roots_v3.clone()) {
                    break;
                }
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        })
        .await;
        assert!(
            same.is_ok(),
            "CA {} serves v3 without the old root: {served:?}",
            ca.grpc
        );
    }

    // Every sidecar serves a certificate under the new root and trusts only the new root.
    let report = status(&dir, &admins);
    assert_eq!(report.bundle_version, 3);
    assert!(
        report.authorities.iter().all(|a| a.name == "2"),
        "{report:?}"
    );
    let new_sha = root_sha(&report, "2");
    let old_sha = meshid_ca::serial::sha256_hex(&roots_v1[0]).to_lowercase();
    assert!(
        poll(Duration::from_secs(10), || {
            let r = status(&dir, &admins);
            [A, B, LAGGING].iter().all(|id| {
                r.sidecars.iter().any(|s| {
                    s.identity == *id
                        && s.connected
                        && s.acked_version == 3
                        && s.serving_authority.as_deref() == Some("2")
                })
            }) && [a_admin, b_admin, lag_admin]
                .iter()
                .all(|adm| anchors(&identity(*adm)) == vec![new_sha.clone()])
        }),
        "every sidecar acknowledged v3, serves under authority 2 and trusts only it: {:?} {:?}",
        status(&dir, &admins),
        [a_admin, b_admin, lag_admin].map(identity)
    );
    for adm in [a_admin, b_admin, lag_admin] {
        let ident = identity(adm);
        assert!(!anchors(&ident).contains(&old_sha), "{ident}");
    }
    // Independently of the CA's view: B's serving certificate verifies against the new root alone.
    let td = TrustDomain::new("cluster.local").unwrap();
    let only_new = client_config(&roots_v3, &td, None, &SpiffeId::parse(B).unwrap(), &[]);
    assert!(
        mtls_connect(b_in, only_new).await.is_ok(),
        "B's certificate chains to the new root"
    );
    let only_old = client_config(&roots_v1, &td, None, &SpiffeId::parse(B).unwrap(), &[]);
    assert!(
        mtls_connect(b_in, only_old).await.is_err(),
        "B's certificate no longer chains to the old root"
    );

    // The traffic through the pair never failed.
    let (ok, failed) = traffic.finish().await;
    eprintln!(
        "rotation by processes: retire passed at {retired_at:?}, {ok} requests ok, total {:?}",
        started.elapsed()
    );
    assert!(ok > 100, "traffic flowed: {ok}");
    assert_eq!(failed, 0, "no request failed during the rotation");
}

/// A CA process killed (-9) between `prepare` and `activate` and restarted starts knowing none of
/// the sidecars it served: with the one sidecar not back yet (frozen), no sidecar is listed at
/// all. `activate` must not read that as "every sidecar trusts the new root": it waits, naming the
/// restart, and passes once the sidecar is back and acknowledged the new root.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_ca_restarted_before_activate_holds_it_until_its_sidecars_could_have_reconnected() {
    // The hold ends when the frozen sidecar's certificate (issued as it started, renewed at the
    // earliest 16 s later) expires: long enough that the first `activate` after the restart comes
    // tens of seconds before that on a loaded machine too, short enough not to wait the whole
    // reconnect window (60 s) after it.
    const LONGER_TTL: &str = "40s";
    let OneSidecar {
        work: _work,
        dir,
        jwks,
        mut ca,
        sidecar,
        sidecar_admin: _,
    } = one_ca_one_sidecar("127.0.0.26", "127.0.0.27", LONGER_TTL);
    let (grpc, admin) = (ca.grpc, ca.admin);
    assert!(
        poll(Duration::from_secs(15), || {
            status(&dir, &[admin])
                .sidecars
                .iter()
                .any(|s| s.identity == B && s.connected && s.acked_version == 1)
        }),
        "the sidecar acknowledged v1: {:?}",
        status(&dir, &[admin])
    );

    // Frozen, it cannot come back; prepare, then the CA dies and starts again.
    sidecar.signal("STOP");
    let (code, out) = meshid_ca(&["rotate", "prepare", "--dir", &dir.to_string_lossy()]);
    assert_eq!(code, 0, "prepare: {out}");
    ca.proc.signal("KILL");
    assert!(
        ca.proc.wait_timeout(Duration::from_secs(5)).is_some(),
        "the CA died"
    );
    ca = start_ca_issuing_for(&dir, &jwks, grpc, admin, LONGER_TTL);
    let after = status(&dir, &[admin]);
    assert!(after.sidecars.is_empty(), "{after:?}");
    // What the CA says it holds for, in its own time, rather than what the test assumes.
    let held = after
        .processes
        .iter()
        .map(|p| p.reconnect_until - p.reported_unix)
        .max()
        .unwrap_or(0);
    assert!(
        held >= 10,
        "the restarted CA holds activate for {held} s only: this machine took too long from the \
         sidecar's issuance to the restart to see the hold: {after:?}"
    );
    let (code, out) = rotate("activate", &dir, &[admin], &[]);
    assert!(
        code != 0
            && out.contains("a CA process started")
            && out.contains("its sidecars may not have reconnected yet")
            && out.contains("activate waits until"),
        "activate must wait for the sidecars of the restarted CA: {code}: {out}"
    );
    let (code, out) = rotate("status", &dir, &[admin], &[]);
    assert!(
        code == 0 && out.contains("may reconnect until") && out.contains("activate is waiting"),
        "{out}"
    );

    // Thawed, it reconnects and acknowledges the new root; activate passes.
    sidecar.signal("CONT");
    let held = u64::try_from(held).unwrap();
    let out = rotate_until_ok("activate", &dir, &[admin], Duration::from_secs(held + 40));
    assert!(out.contains("authority 2 now signs"), "{out}");
    let r = status(&dir, &[admin]);
    assert!(
        r.sidecars
            .iter()
            .any(|s| s.identity == B && s.connected && s.acked_version >= 2),
        "{r:?}"
    );
    drop(ca);
}

/// A CA directory, one `meshid-ca serve` on it (on `ca_ip`, certificates living `ttl`), and one
/// CA-mode sidecar of `B` (its admin port on `sidecar_ip`, an outbound listener).
struct OneSidecar {
    work: tempfile::TempDir,
    dir: PathBuf,
    jwks: PathBuf,
    ca: Ca,
    sidecar: Proc,
    sidecar_admin: SocketAddr,
}

fn one_ca_one_sidecar(ca_ip: &str, sidecar_ip: &str, ttl: &str) -> OneSidecar {
    let work = tempfile::tempdir().unwrap();
    let dir: PathBuf = work.path().join("ca");
    let (code, out) = meshid_ca(&["init", "--dir", &dir.to_string_lossy()]);
    assert_eq!(code, 0, "{out}");
    let cluster = FakeCluster::new();
    let jwks = work.path().join("jwks.json");
    cluster.write_jwks(&jwks);
    let (grpc, admin) = (free_addr(ca_ip), free_addr(ca_ip));
    let ca = start_ca_issuing_for(&dir, &jwks, grpc, admin, ttl);
    let ca_bundle = work.path().join("ca-bundle.pem");
    std::fs::copy(dir.join("bundle.pem"), &ca_bundle).unwrap();
    let token = work.path().join("backend.token");
    std::fs::write(&token, cluster.token("shop", "backend")).unwrap();
    let sidecar_admin = free_addr(sidecar_ip);
    let sidecar = Proc::spawn(
        "meshid-sidecar",
        ca_mode_sidecar(grpc, &ca_bundle, "--token-file", &token, sidecar_admin)
            .args(["--ttl", ttl])
            .arg("--outbound")
            .arg(format!(
                "{}={},{B},http",
                free_addr("127.0.0.1"),
                sidecar_admin
            )),
    );
    OneSidecar {
        work,
        dir,
        jwks,
        ca,
        sidecar,
        sidecar_admin,
    }
}

/// The CA's reconnect window counts on how fast a sidecar reopens a broken bundle stream.
#[test]
fn the_reconnect_window_covers_the_sidecars_retries() {
    let cap = i64::try_from(meshid_sidecar::creds::ca::BUNDLE_RETRY_CAP.as_secs()).unwrap();
    // Two full retry waits and a 5 s connect timeout each: what a sidecar takes to reach a CA
    // process that came back, twice over.
    assert!(
        meshid_ca::rotation::gates::RECONNECT_WINDOW_SECONDS >= 2 * (cap + 5),
        "{} s",
        meshid_ca::rotation::gates::RECONNECT_WINDOW_SECONDS
    );
}

/// A `rotate prepare` cut short while it wrote the new authority's files leaves a root that
/// `authorities.json` does not list, maybe unreadable (here a FIFO, which the CA refuses to open):
/// no part of the trust. `meshid-ca serve` starts all the same, warning about the file, and
/// `rotate prepare` run again makes the authority anew over it; the running CA serves its root.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_ca_starts_beside_an_unreadable_unlisted_root_and_prepare_replaces_it() {
    let work = tempfile::tempdir().unwrap();
    let dir: PathBuf = work.path().join("ca");
    let (code, out) = meshid_ca(&["init", "--dir", &dir.to_string_lossy()]);
    assert_eq!(code, 0, "{out}");
    // What `rotate prepare` writes before any file of the new authority, then its root.
    let state = r#"{"bundle_version":1,"authorities":[{"name":"1","prefix":"","state":"active","in_bundle_since":1}]}"#;
    std::fs::write(dir.join("authorities.json"), state).unwrap();
    let root = dir.join("a2-root.pem");
    let made = Command::new("mkfifo").arg(&root).status().unwrap();
    assert!(made.success(), "mkfifo");
    let cluster = FakeCluster::new();
    let jwks = work.path().join("jwks.json");
    cluster.write_jwks(&jwks);
    let (grpc, admin) = (free_addr("127.0.0.28"), free_addr("127.0.0.28"));
    let log = work.path().join("ca.log");
    let proc = Proc::spawn(
        "meshid-ca",
        Command::new(workspace_bin("meshid-ca"))
            .args(["serve", "--dir"])
            .arg(&dir)
            .args(["--listen", &grpc.to_string()])
            .args(["--admin-listen", &admin.to_string()])
            .args(["--san", "localhost", "--ttl", TTL, "--max-ttl", TTL])
            .arg("--jwks")
            .arg(&jwks)
            .env("MESHID_LOG", "warn")
            .stderr(std::fs::File::create(&log).unwrap()),
    );
    let ready = wait_http_ok(admin, "/readyz", Duration::from_secs(30));
    let logged = std::fs::read_to_string(&log).unwrap();
    assert!(
        ready,
        "the CA started beside an unlisted FIFO root: {logged}"
    );
    assert!(
        logged.contains("a2-root.pem")
            && logged.contains("authorities.json does not list")
            && logged.contains("rotate prepare"),
        "the warning names the file and what to do: {logged}"
    );
    let roots = read_roots(&dir.join("bundle.pem"));
    assert_eq!(served_bundle(grpc, &roots).await.1.len(), 1);

    let (code, out) = rotate("prepare", &dir, &[admin], &[]);
    assert_eq!(code, 0, "prepare over the leftover: {out}");
    assert!(std::fs::symlink_metadata(&root).unwrap().is_file());
    let new_root = read_roots(&root);
    let mut served = Vec::new();
    let follows = tokio::time::timeout(Duration::from_secs(30), async {
        loop {
            served = served_bundle(grpc, &roots).await.1;
            if served.contains(&new_root[0]) {
                break;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    })
    .await;
    assert!(
        follows.is_ok(),
        "the CA serves the prepared root: {served:?}"
    );
    drop(proc);
}

/// Writes `text` to `path` as one rename, as an operator's tool would.
fn replace_file(path: &Path, text: &str) {
    let tmp = path.with_extension("tmp");
    std::fs::write(&tmp, text).unwrap();
    std::fs::rename(&tmp, path).unwrap();
}

/// A CA process numbers changes of `bundle.pem` made by hand itself, above the directory's version;
/// restarted, it serves the directory's lower version again. Its sidecars keep the higher version
/// they took (an older version must not roll trust back): `rotate prepare` without `--admin`
/// numbers the new root below it, and such a sidecar must not acknowledge that version (the
/// activate gate reads an acknowledgement as trust in the new root, and would sign with it while
/// this sidecar refuses its certificates). With `--admin`, the CA reports the version its sidecars
/// hold (their acknowledgements say it), and the new root is numbered above it: taken at once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_sidecar_does_not_acknowledge_an_older_bundle_whose_roots_it_did_not_take() {
    sidecar_ahead_of_a_restarted_ca(false).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn prepare_numbers_the_new_root_above_what_a_restarted_cas_sidecars_hold() {
    sidecar_ahead_of_a_restarted_ca(true).await;
}

async fn sidecar_ahead_of_a_restarted_ca(prepare_with_admin: bool) {
    const LONG_TTL: &str = "60s";
    let OneSidecar {
        work: _work,
        dir,
        jwks,
        mut ca,
        sidecar: _sidecar,
        sidecar_admin,
    } = one_ca_one_sidecar("127.0.0.28", "127.0.0.29", LONG_TTL);
    let (grpc, admin) = (ca.grpc, ca.admin);
    let acked = |version: u64| {
        poll(Duration::from_secs(15), || {
            status(&dir, &[admin])
                .sidecars
                .iter()
                .any(|s| s.identity == B && s.connected && s.acked_version == version)
        })
    };
    assert!(acked(1), "v1 acknowledged: {:?}", status(&dir, &[admin]));

    // Two changes by hand: this process serves them as v2 and v3; the directory stays at v1.
    let bundle = dir.join("bundle.pem");
    let original = std::fs::read_to_string(&bundle).unwrap();
    let foreign = meshid_tests::pki::ForeignCa::new();
    replace_file(
        &bundle,
        &format!("{original}{}", meshid_tests::pki::pem(&foreign.root_der)),
    );
    assert!(acked(2), "v2 acknowledged: {:?}", status(&dir, &[admin]));
    replace_file(&bundle, &original);
    assert!(acked(3), "v3 acknowledged: {:?}", status(&dir, &[admin]));

    // Restarted, the CA serves the directory's v1: the roots the sidecar holds, so acknowledged.
    ca.proc.signal("KILL");
    assert!(
        ca.proc.wait_timeout(Duration::from_secs(5)).is_some(),
        "the CA died"
    );
    ca = start_ca_issuing_for(&dir, &jwks, grpc, admin, LONG_TTL);
    assert!(
        acked(1),
        "v1 of the restarted CA acknowledged: {:?}",
        status(&dir, &[admin])
    );

    if prepare_with_admin {
        // The restarted process serves v1, and reports its sidecar holding v3: the new root
        // comes as v4, which the sidecar takes and acknowledges.
        let (code, out) = rotate("prepare", &dir, &[admin], &[]);
        assert_eq!(code, 0, "prepare: {out}");
        let r = status(&dir, &[admin]);
        let prepared = r
            .authorities
            .iter()
            .find(|a| a.state == "prepared")
            .unwrap_or_else(|| panic!("{r:?}"));
        assert_eq!(prepared.in_bundle_since, 4, "{r:?}");
        assert!(acked(4), "v4 acknowledged: {:?}", status(&dir, &[admin]));
        drop(ca);
        return;
    }
    // Without --admin the new root comes as v2, below the sidecar's v3: its roots are not taken,
    // and v2 must not be acknowledged.
    let (code, out) = meshid_ca(&["rotate", "prepare", "--dir", &dir.to_string_lossy()]);
    assert_eq!(code, 0, "prepare: {out}");
    let older_counted = poll(Duration::from_secs(15), || {
        meshid_tests::process::http_get(sidecar_admin, "/metrics").is_ok_and(|(_, m)| {
            m.contains("meshid_sidecar_bundle_updates_total{result=\"older\"} 1")
        })
    });
    assert!(older_counted, "the sidecar saw the older v2");
    // Time for an acknowledgement to arrive, had one been sent with the count.
    std::thread::sleep(Duration::from_secs(2));
    let r = status(&dir, &[admin]);
    let s = r
        .sidecars
        .iter()
        .find(|s| s.identity == B && s.connected)
        .unwrap_or_else(|| panic!("the sidecar is connected: {r:?}"));
    assert_eq!(
        s.acked_version, 1,
        "the sidecar acknowledged a version whose roots it did not take: {r:?}"
    );
    drop(ca);
}
