//! `meshid-ca`: init a CA, serve it, create join tokens, rotate, issue the injector's certificate,
//! check an install. Bad configuration exits with code 64 after naming every bad setting.

use std::process::ExitCode;

use meshid_ca::auth::JoinTokenStore;
use meshid_ca::authority::{self, ImportedRoot};
use meshid_ca::cli::{
    Cli, Command, EXIT_USAGE, RENAMED_ENV, RevocationsArgs, RevokeArgs, RotateCommand,
    TokenCommand, UnrevokeArgs, WebhookCertArgs,
};
use meshid_ca::revocations::{Revocations, check_reason};
use meshid_ca::rotation;
use prometheus_client::registry::Registry;

fn main() -> ExitCode {
    let (parsed, renamed) = meshid_runtime::cli::parse_with_renamed_env::<Cli>(RENAMED_ENV);
    let cli = match parsed {
        Ok(cli) => cli,
        Err(e) if e.use_stderr() => {
            let _ = e.print();
            return ExitCode::from(EXIT_USAGE);
        }
        Err(e) => {
            let _ = e.print();
            return ExitCode::SUCCESS;
        }
    };
    meshid_runtime::process::init_tracing(cli.log_format);
    for warning in renamed {
        tracing::warn!("{warning}");
    }
    match run(cli) {
        Ok(()) => ExitCode::SUCCESS,
        Err(Failure::Usage(problems)) => {
            eprintln!("meshid-ca: invalid configuration:");
            for p in problems {
                eprintln!("  {p}");
            }
            ExitCode::from(EXIT_USAGE)
        }
        Err(Failure::Runtime(e)) => {
            eprintln!(
                "meshid-ca: {}",
                meshid_runtime::process::error_chain(e.as_ref())
            );
            ExitCode::FAILURE
        }
    }
}

enum Failure {
    Usage(Vec<String>),
    Runtime(anyhow::Error),
}

impl<E: Into<anyhow::Error>> From<E> for Failure {
    fn from(e: E) -> Self {
        Self::Runtime(e.into())
    }
}

fn run(cli: Cli) -> Result<(), Failure> {
    match cli.command {
        Command::Init(args) => {
            let td = args.trust_domain().map_err(Failure::Usage)?;
            let import = match (&args.root_cert, &args.root_key) {
                (Some(cert), Some(key)) => Some(ImportedRoot {
                    cert_pem: std::fs::read_to_string(cert).map_err(|e| {
                        Failure::Usage(vec![format!("--root-cert: {}: {e}", cert.display())])
                    })?,
                    key_pem: std::fs::read_to_string(key).map_err(|e| {
                        Failure::Usage(vec![format!("--root-key: {}: {e}", key.display())])
                    })?,
                }),
                _ => None,
            };
            let report = authority::init(&args.dir, &td, import)?;
            println!("created CA for trust domain {td} in {}", args.dir.display());
            println!("  root sha256 fingerprint: {}", report.root_fingerprint);
            println!("  root expires:            {}", report.root_not_after);
            println!(
                "  intermediate expires:    {}",
                report.intermediate_not_after
            );
            println!(
                "  trust bundle:            {}",
                args.dir.join("bundle.pem").display()
            );
            if args.root_cert.is_some() {
                println!(
                    "  the root is imported: give sidecars `meshid-ca bundle --dir {}` (the root and \
                     the intermediate trust under it is pinned to) rather than bundle.pem",
                    args.dir.display()
                );
            }
            Ok(())
        }
        Command::Token {
            command: TokenCommand::Create(args),
        } => {
            let (id, ttl) = args.parse().map_err(Failure::Usage)?;
            let td = authority::read_trust_domain(&args.dir)?;
            let token = JoinTokenStore::new(&args.dir, td).create(&id, ttl)?;
            eprintln!("join token for {id}, valid once for {}s:", ttl.as_secs());
            println!("{token}");
            Ok(())
        }
        Command::Rotate { command } => rotate(command),
        Command::Revoke(args) => revoke(&args),
        Command::Unrevoke(args) => unrevoke(&args),
        Command::Revocations(args) => list_revocations(&args),
        Command::Bundle(args) => {
            let pem = authority::bootstrap_bundle(&args.dir)?;
            print!("{}", pem.pem);
            eprintln!(
                "{} root(s), {} pinned intermediate(s){}",
                pem.roots,
                pem.pinned,
                if pem.pinned == 0 {
                    " (no imported root: the same roots as bundle.pem)"
                } else {
                    ""
                }
            );
            Ok(())
        }
        Command::Check(args) => check(*args),
        Command::WebhookCert(args) => webhook_cert(&args),
        Command::Secret(args) => {
            let secret = meshid_ca::k8s_secret::render(&args.dir, &args.name, &args.namespace)
                .map_err(|e| Failure::Usage(vec![e.to_string()]))?;
            if let Some(warning) = meshid_ca::k8s_secret::size_warning(secret.data_bytes) {
                eprintln!("{warning}");
            }
            if !secret.left_out.is_empty() {
                eprintln!(
                    "left out of the Secret (root keys, and files no CA reads): {}",
                    secret.left_out.join(", ")
                );
            }
            print!("{}", secret.yaml);
            Ok(())
        }
        Command::Serve(args) => {
            let config = args.into_config().map_err(Failure::Usage)?;
            // Every connected sidecar holds a bundle stream: one file each.
            meshid_runtime::process::raise_open_files_limit_logged();
            // The intermediate's and the JWT keys.
            meshid_runtime::process::protect_memory_logged();
            let rt = tokio::runtime::Builder::new_multi_thread()
                .enable_all()
                .build()?;
            rt.block_on(async move {
                let mut registry = Registry::default();
                let ca = meshid_ca::start(config, &mut registry).await?;
                meshid_runtime::process::wait_for_signal().await?;
                tracing::info!("shutting down: finishing in-flight calls");
                ca.shutdown().await;
                Ok::<(), anyhow::Error>(())
            })?;
            Ok(())
        }
    }
}

fn webhook_cert(args: &WebhookCertArgs) -> Result<(), Failure> {
    use meshid_ca::webhook_cert::{self, WebhookCertError};
    let (dns, ttl) = args.parse().map_err(Failure::Usage)?;
    let authority = meshid_ca::authority::Authority::load(&args.dir)
        .map_err(|e| Failure::Usage(vec![format!("--dir: {e}")]))?;
    let usage = |flag: &str, e: WebhookCertError| match e {
        WebhookCertError::Io { .. } => Failure::Runtime(e.into()),
        e => Failure::Usage(vec![format!("{flag}: {e}")]),
    };
    let cert =
        webhook_cert::issue_webhook_cert(&authority, &dns, ttl).map_err(|e| usage("--dns", e))?;
    let (crt, key) = webhook_cert::write_pair(&args.out_dir, &cert, args.force)
        .map_err(|e| usage("--out-dir", e))?;
    println!(
        "issued the injector's serving certificate for {}",
        dns.join(", ")
    );
    println!("  certificate (leaf + intermediate): {}", crt.display());
    println!("  private key (mode 0600):           {}", key.display());
    println!("  expires:                           {}", cert.not_after);
    if cert.not_after < authority.intermediate_not_after {
        println!(
            "renew it before then: run this command again with --force and replace the Secret"
        );
    } else {
        println!(
            "capped by the intermediate's expiry: renew it after the next `meshid-ca rotate intermediate`"
        );
    }
    Ok(())
}

fn check(args: meshid_ca::cli::CheckArgs) -> Result<(), Failure> {
    use std::io::IsTerminal;
    let in_cluster = std::env::var("KUBERNETES_SERVICE_HOST")
        .ok()
        .zip(std::env::var("KUBERNETES_SERVICE_PORT").ok());
    let (config, output) = args.into_config(in_cluster).map_err(Failure::Usage)?;
    let report = block_on(meshid_ca::check::run(&config))?;
    match output {
        meshid_ca::cli::Output::Json => println!("{}", serde_json::to_string_pretty(&report)?),
        meshid_ca::cli::Output::Text => {
            let colour = meshid_runtime::process::use_color(
                std::io::stdout().is_terminal(),
                std::env::var_os("NO_COLOR").as_deref(),
            );
            print!("{}", report.render(colour));
        }
    }
    let failed = report
        .findings
        .iter()
        .filter(|f| f.status == meshid_ca::check::Status::Fail)
        .count();
    if failed > 0 {
        return Err(Failure::Runtime(anyhow::anyhow!(
            "{failed} check(s) failed"
        )));
    }
    Ok(())
}

/// Runs one fleet-measuring rotation step (it asks the CAs' admin ports) to completion.
fn block_on<T>(step: impl std::future::Future<Output = T>) -> Result<T, Failure> {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    Ok(rt.block_on(step))
}

fn unix_now() -> i64 {
    time::OffsetDateTime::now_utc().unix_timestamp()
}

/// Where the CLI changes the list: the CAs on the directory follow it within a second. On
/// Kubernetes the directory is a Secret the operator keeps a copy of: say how to apply it.
fn after_change(dir: &std::path::Path) {
    println!(
        "every CA serving {} applies it within a second; on Kubernetes, apply the copy: \
         `meshid-ca secret --dir {} | kubectl apply --server-side -f -`",
        dir.display(),
        dir.display()
    );
}

fn revoke(args: &RevokeArgs) -> Result<(), Failure> {
    let td = authority::read_trust_domain(&args.dir)?;
    let mut problems = Vec::new();
    let what = args.target.parse(&td).map_err(|p| problems.extend(p)).ok();
    if let Err(p) = check_reason(&args.reason) {
        problems.push(p);
    }
    let max_ttl = meshid_identity::parse_duration(&args.max_ttl)
        .map_err(|e| problems.push(format!("--max-ttl: {e}")))
        .ok();
    let (Some(what), Some(max_ttl), true) = (what, max_ttl, problems.is_empty()) else {
        return Err(Failure::Usage(problems));
    };
    let now = unix_now();
    // Ten minutes past the longest lifetime: clocks, and a certificate issued by a CA that learns of
    // it after another. (Each CA serves the entry at least as long as its own --max-ttl allows
    // from when it learned of it, whatever this says.)
    let keep = i64::try_from(max_ttl.as_secs())
        .unwrap_or(i64::MAX)
        .saturating_add(meshid_ca::revocations::EXPIRY_SLACK_SECS);
    let new = Revocations::update(&args.dir, |list| {
        list.prune(now);
        list.revoke(what.clone(), now, keep, args.reason.clone())
    })?;
    tracing::warn!(
        target: "meshid_ca::audit",
        revoked = %what,
        reason = %shown(&args.reason),
        dir = %args.dir.display(),
        "revoke: written to the revocation list"
    );
    println!(
        "{} {what}{}",
        if new {
            "revoked"
        } else {
            "revoked again (time and reason updated):"
        },
        if args.reason.is_empty() {
            String::new()
        } else {
            format!(" ({})", shown(&args.reason))
        }
    );
    if matches!(what, meshid_identity::revocation::Revoked::Serial(_)) {
        // The CLI cannot tell a lineage's first certificate from a later one: say what each
        // revokes, since a stolen key renewed from a later one goes on under the lineage.
        println!(
            "note: if this is the first certificate of its lineage, every certificate renewed \
             from it is revoked too; if it is a later one, only it is, and renewals made from it \
             go on under their lineage: for a stolen key, revoke the lineage (the `lineage` of \
             this certificate's `certificate issued` audit line) or the identity (--id)"
        );
    }
    after_change(&args.dir);
    Ok(())
}

fn unrevoke(args: &UnrevokeArgs) -> Result<(), Failure> {
    let td = authority::read_trust_domain(&args.dir)?;
    let what = args.target.parse(&td).map_err(Failure::Usage)?;
    let lifted = Revocations::update(&args.dir, |list| {
        list.prune(unix_now());
        list.unrevoke(&what, unix_now())
            .ok_or_else(|| format!("{what} is not revoked"))
    })?;
    tracing::warn!(
        target: "meshid_ca::audit",
        revoked = %lifted.what,
        dir = %args.dir.display(),
        "unrevoke: removed from the revocation list"
    );
    println!("lifted the revocation of {}", lifted.what);
    after_change(&args.dir);
    Ok(())
}

fn list_revocations(args: &RevocationsArgs) -> Result<(), Failure> {
    authority::read_trust_domain(&args.dir)?;
    let list = Revocations::load(&args.dir)?;
    let now = unix_now();
    if args.json {
        let entries: Vec<serde_json::Value> = list
            .entries()
            .iter()
            .map(|e| {
                let p = e.to_proto();
                serde_json::json!({
                    "id": (!p.spiffe_id.is_empty()).then_some(p.spiffe_id),
                    "serial": (!p.serial.is_empty()).then_some(p.serial),
                    "revoked_at": e.revoked_at,
                    "expires_at": e.expires_at,
                    "applied_by_sidecars": e.in_force(now),
                    "reason": e.reason,
                })
            })
            .collect();
        println!("{}", serde_json::to_string_pretty(&entries)?);
        return Ok(());
    }
    if list.entries().is_empty() {
        println!("nothing is revoked");
    }
    for e in list.entries() {
        println!(
            "{}  revoked {}  {}{}",
            e.what,
            e.revoked_at,
            if e.in_force(now) {
                format!("applied by sidecars until {}", e.expires_at)
            } else {
                "expired: no certificate it names is live, sidecars no longer apply it".to_owned()
            },
            if e.reason.is_empty() {
                String::new()
            } else {
                format!("  reason: {}", shown(&e.reason))
            }
        );
    }
    Ok(())
}

fn rotate(command: RotateCommand) -> Result<(), Failure> {
    let refused = |e: rotation::RotateError| match e {
        rotation::RotateError::Refused(why) => {
            Failure::Runtime(anyhow::anyhow!("refusing: {}", shown(&why)))
        }
        other => Failure::Runtime(other.into()),
    };
    match command {
        RotateCommand::Prepare {
            target,
            root_cert,
            root_key,
        } => {
            let admins = target.admin_addrs().map_err(Failure::Usage)?;
            let import = match (root_cert, root_key) {
                (Some(c), Some(k)) => Some(ImportedRoot {
                    cert_pem: std::fs::read_to_string(&c)?,
                    key_pem: std::fs::read_to_string(&k)?,
                }),
                _ => None,
            };
            let name = block_on(rotation::prepare_measured(&target.dir, &admins, import))?
                .map_err(refused)?;
            println!(
                "prepared authority {name}: its root is in the bundle; signing continues with the active one"
            );
            println!(
                "next: wait until `meshid-ca rotate status` says every sidecar acknowledged, then `rotate activate`"
            );
        }
        RotateCommand::Activate { target, force } => {
            let admins = target.admin_addrs().map_err(Failure::Usage)?;
            if let Some(why) = rotation::nothing_to_activate(&target.dir)? {
                return Err(Failure::Runtime(anyhow::anyhow!(why)));
            }
            require_admins(&admins, force)?;
            let name =
                block_on(rotation::activate(&target.dir, &admins, force))?.map_err(refused)?;
            println!("authority {name} now signs; the previous one is retiring");
        }
        RotateCommand::Retire { target, force } => {
            let admins = target.admin_addrs().map_err(Failure::Usage)?;
            if let Some(why) = rotation::nothing_to_retire(&target.dir)? {
                return Err(Failure::Runtime(anyhow::anyhow!(why)));
            }
            require_admins(&admins, force)?;
            let name = block_on(rotation::retire(&target.dir, &admins, force))?.map_err(refused)?;
            println!("authority {name} retired: its root left the bundle");
        }
        RotateCommand::Intermediate { target } => {
            target.admin_addrs().map_err(Failure::Usage)?;
            rotation::intermediate(&target.dir).map_err(refused)?;
            println!("new signing intermediate under the active root");
        }
        RotateCommand::Status { target, json } => {
            let admins = target.admin_addrs().map_err(Failure::Usage)?;
            let report = block_on(rotation::status(&target.dir, &admins))?.map_err(refused)?;
            if json {
                println!("{}", serde_json::to_string_pretty(&report)?);
            } else {
                // Every string here came over the network (the CAs' admin ports, and sidecars
                // before them): printed escaped, so no control character reaches the terminal.
                println!("bundle version {}", report.bundle_version);
                for a in &report.authorities {
                    println!(
                        "  authority {:<3} {:<9} root sha256 {}..  root expires {}  live certs {} (latest {})",
                        shown(&a.name),
                        shown(&a.state),
                        shown(&a.root_sha256.chars().take(16).collect::<String>()),
                        a.root_not_after,
                        a.live_certificates,
                        a.latest_certificate_expiry
                    );
                }
                for s in &report.sidecars {
                    let acked = if s.file_mode {
                        "file mode, trust unknown".to_owned()
                    } else if s.held_version > s.acked_version {
                        // Numbers the next bundle (`rotate prepare` / `retire` with --admin).
                        format!("acked v{} holds v{}", s.acked_version, s.held_version)
                    } else {
                        format!("acked v{}", s.acked_version)
                    };
                    println!(
                        "  sidecar {} {} {acked} serving under {}{}",
                        shown(&s.identity),
                        shown(&s.instance),
                        shown(s.serving_authority.as_deref().unwrap_or("unknown")),
                        match (s.connected, s.turned_away.is_empty()) {
                            (true, _) => "",
                            (false, true) => " (disconnected)",
                            (false, false) => " (turned away)",
                        }
                    );
                    if !s.connected && !s.turned_away.is_empty() {
                        println!(
                            "    no room on a CA ({}): what it trusts is unknown",
                            shown(&s.turned_away)
                        );
                    }
                    if s.revoked {
                        println!(
                            "    revoked (serial {}): counts for no gate",
                            shown(&s.serial)
                        );
                    } else {
                        // What `meshid-ca revoke --serial` takes to release this instance alone.
                        println!(
                            "    serial {} lineage {}: {}",
                            or_unknown(&shown(&s.serial)),
                            or_unknown(&shown(&s.lineage)),
                            shown(&rotation::gates::release(s))
                        );
                    }
                }
                for p in &report.processes {
                    println!(
                        "  CA process started {} serving bundle v{}{}",
                        p.started_unix,
                        p.bundle_version,
                        if p.reconnect_until > 0 {
                            format!(
                                " (the sidecars of a process it replaced may reconnect until {})",
                                p.reconnect_until
                            )
                        } else {
                            String::new()
                        }
                    );
                }
                for u in &report.unknown {
                    println!("unknown: {}", shown(u));
                }
                println!("next step: {}", shown(&report.next_step));
            }
        }
    }
    Ok(())
}

/// A string from the network as a terminal may show it: control characters and quotes escaped.
fn shown(s: &str) -> String {
    s.escape_debug().to_string()
}

/// `s`, or "unknown" when empty (a field an older CA does not report).
fn or_unknown(s: &str) -> &str {
    if s.is_empty() { "unknown" } else { s }
}

/// Gates measure convergence through the running CAs; without one, only `--force` may proceed.
fn require_admins(admins: &[std::net::SocketAddr], force: bool) -> Result<(), Failure> {
    if admins.is_empty() && !force {
        return Err(Failure::Usage(vec![
            "--admin: name every running CA's admin address so the step can check convergence \
             (or use --force to skip the check)"
                .into(),
        ]));
    }
    Ok(())
}
