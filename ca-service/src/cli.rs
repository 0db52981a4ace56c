//! Command line of `meshid-ca`: flags with `MESHID_CA_*` environment twins, checked all at once into typed
//! configuration.

use std::collections::BTreeSet;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use clap::{Args, Parser, Subcommand};
use meshid_identity::{SpiffeId, TrustDomain, parse_duration};

use crate::auth::jwks_remote::{self, RemoteJwks, Target};
use crate::auth::{JwksSource, JwtConfig};
use crate::ratelimit::RateLimit;
use crate::server::ServeConfig;
use crate::signer::LifetimePolicy;
use crate::tls::ListenerLimits;

pub use meshid_runtime::EXIT_USAGE;

mod check;
pub use check::{CheckArgs, Output};

/// Environment twins renamed after their flags, `(new, old)`; the old names still work, with a
/// warning.
pub const RENAMED_ENV: &[(&str, &str)] = &[
    ("MESHID_CA_SAN", "MESHID_CA_SANS"),
    (
        "MESHID_CA_ALLOWED_NAMESPACE",
        "MESHID_CA_ALLOWED_NAMESPACES",
    ),
    ("MESHID_CA_TRUST_DOMAIN", "MESHID_TRUST_DOMAIN"),
];
pub use meshid_runtime::process::LogFormat;

#[derive(Debug, Parser)]
#[command(
    name = "meshid-ca",
    version,
    about = "meshid certificate authority: short-lived SPIFFE certificates for authenticated workloads"
)]
pub struct Cli {
    /// Log format: text (coloured only on a terminal, never with NO_COLOR) or json (one object per
    /// line, the message and every field at the top level).
    #[arg(
        long,
        env = "MESHID_LOG_FORMAT",
        value_enum,
        default_value_t = LogFormat::Text,
        global = true
    )]
    pub log_format: LogFormat,
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Create a new CA (root, signing intermediate, trust bundle) in a directory.
    Init(InitArgs),
    /// Serve the CA's gRPC API and its admin endpoints.
    Serve(Box<ServeArgs>),
    /// Manage join tokens for workloads outside Kubernetes.
    Token {
        #[command(subcommand)]
        command: TokenCommand,
    },
    /// Rotate the CA without restarting anything: prepare, activate, retire (each gated).
    Rotate {
        #[command(subcommand)]
        command: RotateCommand,
    },
    /// Issue the sidecar injector's serving certificate (offline, from the active intermediate):
    /// writes tls.crt (leaf + intermediate) and tls.key for `kubectl create secret tls`.
    WebhookCert(WebhookCertArgs),
    /// Print the CA directory as a Kubernetes Secret (YAML, root keys left out) for the Helm
    /// chart: `meshid-ca secret --dir ./ca | kubectl apply --server-side -f -` creates it, and updates it after
    /// every rotation step.
    Secret(SecretArgs),
    /// Check an installed mesh from outside: the CA (readiness, TLS, rotation, expiries), the
    /// injector's webhook certificate against its caBundle, the CA's JWKS against the cluster's,
    /// and sidecars renewing. Each check says what is wrong and how to fix it; exit 1 when one
    /// fails.
    Check(Box<CheckArgs>),
    /// Revoke one certificate (--serial) or every certificate of an identity (--id): every CA
    /// on the directory refuses to renew or issue for it within a second and streams it with the
    /// trust bundle; every sidecar then refuses its handshakes and closes its connections.
    Revoke(RevokeArgs),
    /// Lift a revocation: an identity may be issued certificates again, and a certificate whose
    /// serial was revoked (with, for a lineage's first, its renewals) is trusted again by every
    /// sidecar and renewed by the CA for as long as it is still valid.
    Unrevoke(UnrevokeArgs),
    /// List the revocations of a CA directory.
    Revocations(RevocationsArgs),
    /// Print the trust bundle sidecars start with, as PEM: the roots of bundle.pem, then the
    /// issuing intermediates trust under an imported root is pinned to. With an imported root,
    /// give sidecars this (`--ca-bundle`, the chart's `ca.trustBundle`) rather than bundle.pem:
    /// they then refuse a CA certificate that a sibling CA under the shared root issued, before
    /// their first token leaves the pod. Without one it is bundle.pem's roots.
    Bundle(BundleArgs),
}

/// What a revocation names: exactly one of an identity and a certificate serial.
#[derive(Debug, Args)]
#[group(required = true, multiple = false)]
pub struct RevokeTarget {
    /// Every certificate of this identity, e.g. spiffe://cluster.local/ns/shop/sa/cart.
    #[arg(long, value_name = "SPIFFE_ID")]
    pub id: Option<String>,
    /// The one certificate with this serial number, in hex as `openssl x509 -noout -serial`
    /// prints it (colons and 0x allowed); when it is the first of a lineage (the `lineage` of any
    /// of its renewals' `certificate issued` audit lines), every certificate renewed from it too.
    #[arg(long, value_name = "SERIAL")]
    pub serial: Option<String>,
}

impl RevokeTarget {
    /// The revocation, checked against the CA's trust domain.
    pub fn parse(
        &self,
        trust_domain: &TrustDomain,
    ) -> Result<meshid_identity::revocation::Revoked, Vec<String>> {
        use meshid_identity::revocation::{Revoked, normalize_serial};
        match (&self.id, &self.serial) {
            (Some(id), None) => {
                let id = SpiffeId::parse(id).map_err(|e| vec![format!("--id: {e}")])?;
                if id.trust_domain_name() != trust_domain.as_str() {
                    return Err(vec![format!(
                        "--id: {id} is outside this CA's trust domain {trust_domain}"
                    )]);
                }
                Ok(Revoked::Id(id))
            }
            (None, Some(serial)) => normalize_serial(serial)
                .map(Revoked::Serial)
                .map_err(|e| vec![format!("--serial: {e}")]),
            _ => Err(vec!["give exactly one of --id and --serial".into()]),
        }
    }
}

#[derive(Debug, Args)]
pub struct RevokeArgs {
    /// CA directory.
    #[arg(long, env = "MESHID_CA_DIR")]
    pub dir: PathBuf,
    #[command(flatten)]
    pub target: RevokeTarget,
    /// Why (kept in the list, the CAs' audit log and the sidecars' logs; at most 256 bytes).
    #[arg(long, default_value = "")]
    pub reason: String,
    /// The longest lifetime of a certificate the CA issues (its --max-ttl): the entry stays in
    /// the trust bundle this long (plus ten minutes), until no certificate it names can still be
    /// live. A CA serves it at least as long as its own --max-ttl allows from when it learned of
    /// it, and warns when that is longer than the file says.
    #[arg(long, env = "MESHID_CA_MAX_TTL", default_value = "24h")]
    pub max_ttl: String,
}

#[derive(Debug, Args)]
pub struct UnrevokeArgs {
    /// CA directory.
    #[arg(long, env = "MESHID_CA_DIR")]
    pub dir: PathBuf,
    #[command(flatten)]
    pub target: RevokeTarget,
}

#[derive(Debug, Args)]
pub struct RevocationsArgs {
    /// CA directory.
    #[arg(long, env = "MESHID_CA_DIR")]
    pub dir: PathBuf,
    /// Print the list as JSON.
    #[arg(long)]
    pub json: bool,
}

#[derive(Debug, Args)]
pub struct BundleArgs {
    /// CA directory.
    #[arg(long, env = "MESHID_CA_DIR")]
    pub dir: PathBuf,
}

#[derive(Debug, Args)]
pub struct SecretArgs {
    /// CA directory.
    #[arg(long, env = "MESHID_CA_DIR")]
    pub dir: PathBuf,
    /// The Secret's name (the chart's `ca.existingSecret`).
    #[arg(long, default_value = "meshid-ca")]
    pub name: String,
    /// The Secret's namespace (the release's).
    #[arg(long, default_value = "meshid")]
    pub namespace: String,
}

#[derive(Debug, Args)]
pub struct WebhookCertArgs {
    /// CA directory (from `meshid-ca init`).
    #[arg(long, env = "MESHID_CA_DIR")]
    pub dir: PathBuf,
    /// DNS name of the injector's Service (repeatable), e.g. meshid-injector.meshid.svc.
    #[arg(long = "dns", value_name = "NAME", required = true)]
    pub dns: Vec<String>,
    /// Directory to write tls.crt and tls.key into (created if missing).
    #[arg(long, value_name = "DIR")]
    pub out_dir: PathBuf,
    /// Certificate lifetime (capped by the intermediate's expiry).
    #[arg(long, default_value = "365d")]
    pub ttl: String,
    /// Replace existing tls.crt/tls.key (as a pair: a failure leaves the old pair).
    #[arg(long)]
    pub force: bool,
}

impl WebhookCertArgs {
    /// Checks the names, lifetime and CA directory; returns every problem at once.
    pub fn parse(&self) -> Result<(Vec<String>, Duration), Vec<String>> {
        let mut p = Problems::default();
        let ttl = p.check("--ttl", parse_duration(&self.ttl));
        if ttl.is_some_and(|t| t < Duration::from_secs(3600)) {
            p.0.push("--ttl: must be at least 1h".into());
        }
        let dns: Vec<String> = self
            .dns
            .iter()
            .map(|d| d.trim().to_owned())
            .filter(|d| !d.is_empty())
            .collect();
        if dns.is_empty() {
            p.0.push(
                "--dns: name the injector's Service, e.g. --dns meshid-injector.meshid.svc".into(),
            );
        }
        for d in &dns {
            let syntactic = rustls_pki_types::DnsName::try_from(d.as_str()).is_ok();
            if !syntactic || d.parse::<std::net::IpAddr>().is_ok() || d.ends_with('.') {
                p.0.push(format!("--dns: {d:?} is not a DNS name"));
            }
        }
        if !self.dir.join("ca.json").is_file() {
            p.0.push(no_ca(&self.dir, ""));
        }
        match ttl {
            Some(ttl) if p.0.is_empty() => Ok((dns, ttl)),
            _ => Err(p.0),
        }
    }
}

#[derive(Debug, Subcommand)]
pub enum RotateCommand {
    /// A new root (generated or imported) joins the trust bundle; signing continues as before.
    Prepare {
        #[command(flatten)]
        target: RotateTarget,
        /// Import this root certificate (PEM) instead of generating one.
        #[arg(long, requires = "root_key")]
        root_cert: Option<PathBuf>,
        /// The imported root's private key (PEM); used once, never stored.
        #[arg(long, requires = "root_cert")]
        root_key: Option<PathBuf>,
    },
    /// The CA signs with the new authority. Refuses until every connected sidecar acknowledged a
    /// bundle with the new root.
    Activate {
        #[command(flatten)]
        target: RotateTarget,
        /// Skip the convergence check (loudly audited).
        #[arg(long)]
        force: bool,
    },
    /// The old root leaves the bundle. Refuses while certificates under it are live or served.
    Retire {
        #[command(flatten)]
        target: RotateTarget,
        /// Retire even while certificates under the old root are live or served (loudly audited);
        /// connected sidecars are told to renew at once.
        #[arg(long)]
        force: bool,
    },
    /// A new signing intermediate under the active root (no bundle change).
    Intermediate {
        #[command(flatten)]
        target: RotateTarget,
    },
    /// Authorities, acknowledged bundle versions, live certificates, and what the next step waits for.
    Status {
        #[command(flatten)]
        target: RotateTarget,
        /// Print the report as JSON.
        #[arg(long)]
        json: bool,
    },
}

#[derive(Debug, Args)]
pub struct RotateTarget {
    /// CA directory.
    #[arg(long, env = "MESHID_CA_DIR")]
    pub dir: PathBuf,
    /// Admin address of every running CA on this directory (repeatable), e.g. 127.0.0.1:9090, or
    /// NAME:PORT standing for every address the name resolves to (a headless Service, whose name
    /// resolves to every CA replica: meshid-ca-admin.meshid.svc:9090). Every address must answer.
    #[arg(long = "admin", env = "MESHID_CA_ADMIN", value_delimiter = ',')]
    pub admins: Vec<String>,
}

/// The problem of a `--dir` without `ca.json`: an `init` cut short (remove the directory and start
/// again), or no CA at all (`hint` says what to run).
fn no_ca(dir: &std::path::Path, hint: &str) -> String {
    match crate::authority::cut_short_init(dir) {
        Some(incomplete) => format!("--dir: {incomplete}"),
        None => format!("--dir: {} holds no CA{hint}", dir.display()),
    }
}

/// `HOST:PORT` as every address it stands for: an IP address as itself, a name as every address it
/// resolves to.
pub fn resolve_admin(value: &str) -> Result<Vec<SocketAddr>, String> {
    if let Ok(addr) = value.parse::<SocketAddr>() {
        return Ok(vec![addr]);
    }
    let Some((host, port)) = value.rsplit_once(':') else {
        return Err(format!("--admin: {value:?} is not HOST:PORT"));
    };
    if host.is_empty() || port.parse::<u16>().is_err() {
        return Err(format!("--admin: {value:?} is not HOST:PORT"));
    }
    let mut addrs: Vec<SocketAddr> = std::net::ToSocketAddrs::to_socket_addrs(value)
        .map_err(|e| format!("--admin: {host} does not resolve: {e}"))?
        .collect();
    addrs.sort();
    addrs.dedup();
    if addrs.is_empty() {
        return Err(format!("--admin: {host} resolves to no address"));
    }
    Ok(addrs)
}

impl RotateTarget {
    /// The admin addresses, checked.
    pub fn admin_addrs(&self) -> Result<Vec<SocketAddr>, Vec<String>> {
        let mut out = Vec::new();
        let mut problems = Vec::new();
        for a in self.admins.iter().filter(|a| !a.is_empty()) {
            match resolve_admin(a) {
                Ok(addrs) => {
                    for addr in addrs {
                        if !out.contains(&addr) {
                            out.push(addr);
                        }
                    }
                }
                Err(problem) => problems.push(problem),
            }
        }
        if !self.dir.join("ca.json").is_file() {
            problems.push(no_ca(&self.dir, ""));
        }
        if problems.is_empty() {
            Ok(out)
        } else {
            Err(problems)
        }
    }
}

#[derive(Debug, Args)]
pub struct InitArgs {
    /// CA directory to create.
    #[arg(long, env = "MESHID_CA_DIR")]
    pub dir: PathBuf,
    /// Trust domain of the identities this CA issues.
    #[arg(long, env = "MESHID_CA_TRUST_DOMAIN", default_value = "cluster.local")]
    pub trust_domain: String,
    /// Import this root certificate (PEM) instead of generating one.
    #[arg(long, requires = "root_key")]
    pub root_cert: Option<PathBuf>,
    /// The imported root's private key (PEM). Used once to sign the intermediate, never stored.
    #[arg(long, requires = "root_cert")]
    pub root_key: Option<PathBuf>,
}

#[derive(Debug, Subcommand)]
pub enum TokenCommand {
    /// Create a one-time join token bound to one identity; prints the token once.
    Create(TokenCreateArgs),
}

#[derive(Debug, Args)]
pub struct TokenCreateArgs {
    /// CA directory.
    #[arg(long, env = "MESHID_CA_DIR")]
    pub dir: PathBuf,
    /// The identity the token grants, e.g. spiffe://cluster.local/ns/vm/sa/db.
    #[arg(long)]
    pub id: String,
    /// How long the token stays redeemable.
    #[arg(long, default_value = "10m")]
    pub ttl: String,
}

#[derive(Debug, Args)]
pub struct ServeArgs {
    /// CA directory (from `meshid-ca init`).
    #[arg(long, env = "MESHID_CA_DIR")]
    pub dir: PathBuf,
    /// gRPC (TLS) listen address.
    #[arg(long, env = "MESHID_CA_LISTEN", default_value = "0.0.0.0:8443")]
    pub listen: String,
    /// Admin (plain HTTP: /healthz, /readyz, /metrics) listen address.
    #[arg(long, env = "MESHID_CA_ADMIN_LISTEN", default_value = "0.0.0.0:9090")]
    pub admin_listen: String,
    /// DNS name or IP for the CA's serving certificate (repeatable). Default: localhost, 127.0.0.1.
    #[arg(long, env = "MESHID_CA_SAN", value_delimiter = ',')]
    pub san: Vec<String>,
    /// JWKS file of the cluster's service-account issuer (re-read when it changes); enables
    /// service-account tokens. For a CA outside the cluster; inside, use --jwks-discovery.
    #[arg(long, env = "MESHID_CA_JWKS")]
    pub jwks: Option<PathBuf>,
    /// Fetch the issuer's JWKS from this https:// URL (a JWKS, or an OIDC discovery document at
    /// /.well-known/openid-configuration whose jwks_uri is on the same host), with
    /// --jwks-token-file and --jwks-ca-file; enables service-account tokens.
    #[arg(long, env = "MESHID_CA_JWKS_URL", value_name = "URL")]
    pub jwks_url: Option<String>,
    /// Inside a cluster: fetch the issuer's JWKS from the API server,
    /// https://kubernetes.default.svc/openid/v1/jwks (same as --jwks-url with that URL).
    #[arg(long, env = "MESHID_CA_JWKS_DISCOVERY")]
    pub jwks_discovery: bool,
    /// Bearer token sent when fetching the JWKS, re-read at every fetch (the kubelet rotates it).
    #[arg(
        long,
        env = "MESHID_CA_JWKS_TOKEN_FILE",
        value_name = "FILE",
        default_value = jwks_remote::DEFAULT_TOKEN_FILE
    )]
    pub jwks_token_file: PathBuf,
    /// PEM bundle the JWKS server's certificate must chain to, re-read at every fetch.
    #[arg(
        long,
        env = "MESHID_CA_JWKS_CA_FILE",
        value_name = "FILE",
        default_value = jwks_remote::DEFAULT_CA_FILE
    )]
    pub jwks_ca_file: PathBuf,
    /// How often a fetched JWKS is refreshed. A token naming an unknown key also refreshes it at
    /// once, at most every --jwks-min-refresh-interval.
    #[arg(long, env = "MESHID_CA_JWKS_REFRESH", default_value = "5m")]
    pub jwks_refresh: String,
    /// The least time between two refreshes forced by tokens naming an unknown key.
    #[arg(
        long,
        env = "MESHID_CA_JWKS_MIN_REFRESH_INTERVAL",
        default_value = "15s"
    )]
    pub jwks_min_refresh_interval: String,
    /// Expected token issuer (`iss`).
    #[arg(
        long,
        env = "MESHID_CA_ISSUER",
        default_value = "https://kubernetes.default.svc.cluster.local"
    )]
    pub issuer: String,
    /// Expected token audience (`aud`).
    #[arg(long, env = "MESHID_CA_AUDIENCE", default_value = "meshid-ca")]
    pub audience: String,
    /// Only these namespaces may get identities (repeatable; default: all).
    #[arg(long, env = "MESHID_CA_ALLOWED_NAMESPACE", value_delimiter = ',')]
    pub allowed_namespace: Vec<String>,
    /// Longest lifetime (`exp - iat`) of a service-account token: a longer-lived one (`kubectl
    /// create token --duration 8760h`) would re-attest its identity until it expires, past
    /// --max-attestation-age. The default, 48h, is far above the 10 minutes our injector asks
    /// for (--token-expiration-seconds); a 3607 s token Kubernetes extended to a year
    /// (--service-account-extend-token-expiration) is measured to its `warnafter`, one hour.
    #[arg(long, env = "MESHID_CA_MAX_TOKEN_LIFETIME", default_value = "48h")]
    pub max_token_lifetime: String,
    /// Accept service-account tokens not bound to a pod (no `kubernetes.io.pod` claim), as
    /// `kubectl create token` makes them. Dangerous: such a token outlives every pod, and whoever
    /// holds it gets the identity until it expires. Injected sidecars never need it: they use
    /// projected, pod-bound tokens.
    #[arg(long, env = "MESHID_CA_DANGEROUS_ACCEPT_UNBOUND_TOKENS")]
    pub dangerous_accept_unbound_tokens: bool,
    /// Also ask the API server whether it still takes each service-account token before the
    /// certificate it attests (a TokenReview at the host of --jwks-url or --jwks-discovery, with
    /// --jwks-token-file and --jwks-ca-file): a token whose pod was deleted stops attesting at
    /// once, not at its expiry. Needs RBAC to create tokenreviews (the chart's ClusterRole).
    /// When the API server cannot answer, callers are answered Unavailable and try again.
    #[arg(long, env = "MESHID_CA_TOKEN_REVIEW")]
    pub token_review: bool,
    /// Default certificate lifetime.
    #[arg(long, env = "MESHID_CA_TTL", default_value = "1h")]
    pub ttl: String,
    /// Longest lifetime a caller may ask for.
    #[arg(long, env = "MESHID_CA_MAX_TTL", default_value = "24h")]
    pub max_ttl: String,
    /// How long after its last attestation (a service-account token or a join token) an identity
    /// keeps renewing on its certificate alone: no certificate lives past it (the first of a
    /// lineage, a token's or join token's, at most this long, whatever --max-ttl), a renewal
    /// with less than half its lifetime left before it is refused, and the workload must present
    /// its token (or a new join token) again.
    #[arg(long, env = "MESHID_CA_MAX_ATTESTATION_AGE", default_value = "24h")]
    pub max_attestation_age: String,
    /// Lifetime of a JWT-SVID (never past the expiry of the certificate the sidecar asks with);
    /// 10s to 1h.
    #[arg(long, env = "MESHID_CA_JWT_SVID_TTL", default_value = "5m")]
    pub jwt_svid_ttl: String,
    /// Sustained certificates per second per identity.
    #[arg(long, env = "MESHID_CA_RATE_LIMIT", default_value = "50")]
    pub rate_limit: String,
    /// Certificates per identity allowed in a burst.
    #[arg(long, env = "MESHID_CA_RATE_BURST", default_value = "200")]
    pub rate_burst: String,
    /// Sustained certificates per second for all the identities of one namespace together
    /// (`ns/<ns>/sa/<sa>`), checked alongside each identity's --rate-limit, so that one namespace
    /// cannot take the CA from the others by creating service accounts (JWT-SVIDs are counted
    /// apart, at the same rate). A positive number. Default: 4 x --rate-limit.
    #[arg(long, env = "MESHID_CA_NAMESPACE_RATE_LIMIT")]
    pub namespace_rate_limit: Option<String>,
    /// Certificates one namespace's identities together may get in a burst. Default: 4 x
    /// --rate-burst.
    #[arg(long, env = "MESHID_CA_NAMESPACE_RATE_BURST")]
    pub namespace_rate_burst: Option<String>,
    /// Time allowed for a TLS handshake.
    #[arg(long, env = "MESHID_CA_HANDSHAKE_TIMEOUT", default_value = "10s")]
    pub handshake_timeout: String,
    /// Most concurrent connections.
    #[arg(long, env = "MESHID_CA_MAX_CONNECTIONS", default_value = "10000")]
    pub max_connections: String,
    /// Most concurrent connections from one source IP; the one past it is closed at once.
    #[arg(
        long,
        env = "MESHID_CA_MAX_CONNECTIONS_PER_SOURCE",
        default_value = "256"
    )]
    pub max_connections_per_source: String,
    /// Most calls whose request is still arriving, at once on this process (an eighth of them from
    /// one source IP): each holds up to about 72 KiB until its message is in, so this bounds what
    /// unfinished requests can hold (448: about 32 MiB). Past it a call is answered
    /// RESOURCE_EXHAUSTED at once (sidecars try again).
    #[arg(long, env = "MESHID_CA_MAX_ARRIVING_REQUESTS", default_value = "448")]
    pub max_arriving_requests: String,
    /// Close a connection that has had no call in flight for this long (an open WatchTrustBundle
    /// stream is a call in flight).
    #[arg(long, env = "MESHID_CA_IDLE_TIMEOUT", default_value = "5m")]
    pub idle_timeout: String,
    /// Close a connection with a call (every one but a stream: WatchTrustBundle, health Watch)
    /// still unfinished this long after it began: its client is not taking its response. Noticed
    /// within twice this, or an --idle-timeout and twice this on a connection that had been quiet.
    #[arg(long, env = "MESHID_CA_CALL_TIMEOUT", default_value = "1m")]
    pub call_timeout: String,
    /// Tell connections this old to go away (HTTP/2 GOAWAY): calls in flight finish, clients
    /// reconnect for the next; what is still open --grace later (bundle streams) is cut.
    #[arg(long, env = "MESHID_CA_MAX_CONNECTION_AGE", default_value = "30m")]
    pub max_connection_age: String,
    /// How long in-flight calls may take to finish on SIGTERM, and on a connection past
    /// --max-connection-age.
    #[arg(long, env = "MESHID_CA_GRACE", default_value = "30s")]
    pub grace: String,
}

/// Collects every problem instead of stopping at the first.
#[derive(Default)]
struct Problems(Vec<String>);

impl Problems {
    fn check<T, E: std::fmt::Display>(&mut self, flag: &str, r: Result<T, E>) -> Option<T> {
        match r {
            Ok(v) => Some(v),
            Err(e) => {
                self.0.push(format!("{flag}: {e}"));
                None
            }
        }
    }
}

impl ServeArgs {
    /// Checks every setting; returns all problems at once.
    pub fn into_config(self) -> Result<ServeConfig, Vec<String>> {
        let mut p = Problems::default();
        let listen = p.check("--listen", self.listen.parse::<SocketAddr>());
        let admin = p.check("--admin-listen", self.admin_listen.parse::<SocketAddr>());
        let ttl = p.check("--ttl", parse_duration(&self.ttl));
        let max_ttl = p.check("--max-ttl", parse_duration(&self.max_ttl));
        let max_attestation_age = p.check(
            "--max-attestation-age",
            parse_duration(&self.max_attestation_age),
        );
        if max_attestation_age.is_some_and(|d| d < Duration::from_secs(1)) {
            p.0.push("--max-attestation-age: must be at least 1s".into());
        }
        let max_token_lifetime = p.check(
            "--max-token-lifetime",
            parse_duration(&self.max_token_lifetime),
        );
        if max_token_lifetime.is_some_and(|d| d < Duration::from_secs(600)) {
            // Kubernetes issues no projected token shorter than 10 minutes.
            p.0.push("--max-token-lifetime: must be at least 10m".into());
        }
        let jwt_svid_ttl = p
            .check("--jwt-svid-ttl", parse_duration(&self.jwt_svid_ttl))
            .and_then(|d| {
                if (Duration::from_secs(10)..=Duration::from_secs(3600)).contains(&d) {
                    Some(d)
                } else {
                    p.0.push("--jwt-svid-ttl: must be from 10s to 1h".into());
                    None
                }
            });
        let rate = p.check("--rate-limit", self.rate_limit.parse::<f64>());
        let burst = p.check("--rate-burst", self.rate_burst.parse::<u32>());
        // Outer None: not given (the default, derived from --rate-limit and --rate-burst).
        let ns_rate = self
            .namespace_rate_limit
            .as_deref()
            .map(|r| p.check("--namespace-rate-limit", r.parse::<f64>()));
        let ns_burst = self
            .namespace_rate_burst
            .as_deref()
            .map(|b| p.check("--namespace-rate-burst", b.parse::<u32>()));
        let handshake = p.check(
            "--handshake-timeout",
            parse_duration(&self.handshake_timeout),
        );
        let max_conns = p.check("--max-connections", self.max_connections.parse::<usize>());
        let per_source = p.check(
            "--max-connections-per-source",
            self.max_connections_per_source.parse::<usize>(),
        );
        let arriving = p.check(
            "--max-arriving-requests",
            self.max_arriving_requests.parse::<usize>(),
        );
        let idle = p.check("--idle-timeout", parse_duration(&self.idle_timeout));
        let call = p.check("--call-timeout", parse_duration(&self.call_timeout));
        let max_age = p.check(
            "--max-connection-age",
            parse_duration(&self.max_connection_age),
        );
        let grace = p.check("--grace", parse_duration(&self.grace));
        if let Some(ttl) = ttl {
            if ttl < Duration::from_secs(1) {
                p.0.push("--ttl: must be at least 1s".into());
            }
            if let Some(max) = max_ttl
                && ttl > max
            {
                p.0.push(format!(
                    "--ttl: {} is longer than --max-ttl {}",
                    self.ttl, self.max_ttl
                ));
            }
        }
        for (flag, rate) in [
            ("--rate-limit", rate),
            ("--namespace-rate-limit", ns_rate.flatten()),
        ] {
            if let Some(rate) = rate
                && !(rate.is_finite() && rate > 0.0)
            {
                p.0.push(format!("{flag}: must be a positive number"));
            }
        }
        for (flag, burst) in [
            ("--rate-burst", burst),
            ("--namespace-rate-burst", ns_burst.flatten()),
        ] {
            if burst == Some(0) {
                p.0.push(format!("{flag}: must be at least 1"));
            }
        }
        if max_conns == Some(0) {
            p.0.push("--max-connections: must be at least 1".into());
        }
        if per_source == Some(0) {
            p.0.push("--max-connections-per-source: must be at least 1".into());
        }
        if arriving == Some(0) {
            p.0.push("--max-arriving-requests: must be at least 1".into());
        }
        if idle.is_some_and(|d| d < Duration::from_secs(1)) {
            p.0.push("--idle-timeout: must be at least 1s".into());
        }
        // Above the 30 s tonic gives a handler: a call still working is not a client not reading.
        if call.is_some_and(|d| d <= Duration::from_secs(30)) {
            p.0.push("--call-timeout: must be longer than 30s (the time a call may take)".into());
        }
        if max_age.is_some_and(|d| d < Duration::from_secs(1)) {
            p.0.push("--max-connection-age: must be at least 1s".into());
        }
        let mut namespaces = BTreeSet::new();
        for ns in &self.allowed_namespace {
            if ns.trim().is_empty() {
                // Dropped, an empty value (a template that rendered nothing, a stray comma) left
                // the list empty: every namespace allowed, without a word.
                p.0.push(
                    "--allowed-namespace: an empty namespace (an empty value or a stray comma); \
                     give namespaces, or leave the flag out to allow every namespace"
                        .into(),
                );
                continue;
            }
            namespaces.insert(ns.clone());
        }
        let jwks_refresh = p.check("--jwks-refresh", parse_duration(&self.jwks_refresh));
        if jwks_refresh.is_some_and(|d| d < Duration::from_secs(1)) {
            p.0.push("--jwks-refresh: must be at least 1s".into());
        }
        let jwks_min = p.check(
            "--jwks-min-refresh-interval",
            parse_duration(&self.jwks_min_refresh_interval),
        );
        if jwks_min.is_some_and(|d| d < Duration::from_secs(1)) {
            p.0.push("--jwks-min-refresh-interval: must be at least 1s".into());
        }
        let sources = [
            self.jwks.is_some(),
            self.jwks_url.is_some(),
            self.jwks_discovery,
        ];
        if sources.iter().filter(|s| **s).count() > 1 {
            p.0.push(
                "--jwks, --jwks-url, --jwks-discovery: give one source of the service-account \
                 issuer's keys, not several"
                    .into(),
            );
        }
        let jwks_url = match (&self.jwks_url, self.jwks_discovery) {
            (Some(url), _) => Some(url.clone()),
            (None, true) => Some(jwks_remote::DEFAULT_JWKS_URL.to_owned()),
            (None, false) => None,
        };
        if !namespaces.is_empty() && !sources.contains(&true) {
            p.0.push(
                "--allowed-namespace: needs --jwks, --jwks-url or --jwks-discovery \
                 (service-account tokens)"
                    .into(),
            );
        }
        if self.token_review && jwks_url.is_none() {
            p.0.push(
                "--token-review: needs --jwks-url or --jwks-discovery (the review goes to the \
                 API server the keys come from)"
                    .into(),
            );
        }
        if let Some(jwks) = &self.jwks
            && !jwks.is_file()
        {
            p.0.push(format!("--jwks: {} is not a readable file", jwks.display()));
        }
        if let Some(url) = &jwks_url {
            let flag = if self.jwks_url.is_some() {
                "--jwks-url"
            } else {
                "--jwks-discovery"
            };
            if let Err(e) = Target::parse(url) {
                p.0.push(format!("{flag}: {e}"));
            }
            if !self.jwks_token_file.is_file() {
                p.0.push(format!(
                    "--jwks-token-file: {} is not a readable file (needed by {flag}; in a pod, \
                     mount the service-account token)",
                    self.jwks_token_file.display()
                ));
            }
            if !self.jwks_ca_file.is_file() {
                p.0.push(format!(
                    "--jwks-ca-file: {} is not a readable file (needed by {flag})",
                    self.jwks_ca_file.display()
                ));
            }
        }
        if !self.dir.join("ca.json").is_file() {
            let hint = format!(" (run `meshid-ca init --dir {}` first)", self.dir.display());
            p.0.push(no_ca(&self.dir, &hint));
        }
        let sans: Vec<String> = if self.san.iter().all(|s| s.is_empty()) {
            vec!["localhost".into(), "127.0.0.1".into()]
        } else {
            self.san.into_iter().filter(|s| !s.is_empty()).collect()
        };
        if !p.0.is_empty() {
            return Err(p.0);
        }
        // Every Option below is Some: a None pushed a problem and returned above.
        let (
            Some(listen),
            Some(admin_listen),
            Some(ttl),
            Some(max_ttl),
            Some(rate),
            Some(burst),
            Some(handshake),
            Some(max_conns),
            Some(per_source),
            Some(idle),
            Some(call),
            Some(max_age),
            Some(grace),
        ) = (
            listen, admin, ttl, max_ttl, rate, burst, handshake, max_conns, per_source, idle, call,
            max_age, grace,
        )
        else {
            return Err(vec!["internal: unchecked setting".into()]);
        };
        let (
            Some(max_attestation_age),
            Some(max_token_lifetime),
            Some(jwks_refresh),
            Some(jwks_min),
            Some(jwt_svid_ttl),
            Some(arriving),
        ) = (
            max_attestation_age,
            max_token_lifetime,
            jwks_refresh,
            jwks_min,
            jwt_svid_ttl,
            arriving,
        )
        else {
            return Err(vec!["internal: unchecked setting".into()]);
        };
        let jwks = match (self.jwks, jwks_url) {
            (Some(path), _) => Some(JwksSource::File(path)),
            (None, Some(url)) => Some(JwksSource::Remote(RemoteJwks {
                token_file: self.jwks_token_file,
                ca_file: self.jwks_ca_file,
                refresh_every: jwks_refresh,
                min_forced_interval: jwks_min,
                ..RemoteJwks::new(url)
            })),
            (None, None) => None,
        };
        let rate_limit = RateLimit {
            per_second: rate,
            burst,
        };
        let ns_default = rate_limit.per_namespace();
        Ok(ServeConfig {
            dir: self.dir,
            listen,
            admin_listen,
            sans,
            jwt: jwks.map(|jwks| JwtConfig {
                jwks,
                issuer: self.issuer,
                audience: self.audience,
                allowed_namespaces: (!namespaces.is_empty()).then_some(namespaces),
                max_token_lifetime,
                dangerous_accept_unbound_tokens: self.dangerous_accept_unbound_tokens,
                token_review: self.token_review,
            }),
            lifetimes: LifetimePolicy {
                default: ttl,
                max: max_ttl,
            },
            max_attestation_age,
            jwt_svid_ttl,
            rate_limit,
            // A bad value pushed a problem and returned above: only "not given" is left as None.
            namespace_rate_limit: RateLimit {
                per_second: ns_rate.flatten().unwrap_or(ns_default.per_second),
                burst: ns_burst.flatten().unwrap_or(ns_default.burst),
            },
            limits: ListenerLimits {
                handshake_timeout: handshake,
                max_connections: max_conns,
                max_connections_per_source: per_source,
                idle_timeout: idle,
                call_timeout: call,
                max_connection_age: max_age,
                max_connection_age_grace: grace,
                max_arriving_requests: arriving,
            },
            grace,
        })
    }
}

impl TokenCreateArgs {
    /// Checks the identity and lifetime.
    pub fn parse(&self) -> Result<(SpiffeId, Duration), Vec<String>> {
        let mut p = Problems::default();
        let id = p.check("--id", SpiffeId::parse(&self.id));
        let ttl = p.check("--ttl", parse_duration(&self.ttl));
        match (id, ttl) {
            (Some(id), Some(ttl)) if p.0.is_empty() => Ok((id, ttl)),
            _ => Err(p.0),
        }
    }
}

impl InitArgs {
    /// Checks the trust domain.
    pub fn trust_domain(&self) -> Result<TrustDomain, Vec<String>> {
        TrustDomain::new(&self.trust_domain).map_err(|e| vec![format!("--trust-domain: {e}")])
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_flag_has_help_text() {
        let mut command = <Cli as clap::CommandFactory>::command();
        command.build();
        assert_eq!(
            meshid_runtime::cli::undocumented_args(&command),
            Vec::<String>::new()
        );
    }

    #[test]
    fn admin_addresses_may_be_names_standing_for_every_address() {
        assert_eq!(
            resolve_admin("10.0.0.7:9090").unwrap(),
            vec!["10.0.0.7:9090".parse::<SocketAddr>().unwrap()]
        );
        // A name stands for every address it resolves to (here: the loopback ones).
        let local = resolve_admin("localhost:9090").unwrap();
        assert!(
            !local.is_empty()
                && local
                    .iter()
                    .all(|a| a.ip().is_loopback() && a.port() == 9090)
        );
        for bad in ["nope", "host:", ":9090", "host:port", "host:70000"] {
            let err = resolve_admin(bad).unwrap_err();
            assert!(err.contains("is not HOST:PORT"), "{bad}: {err}");
        }
        let err = resolve_admin("no-such-host.invalid:9090").unwrap_err();
        assert!(err.contains("no-such-host.invalid"), "{err}");
    }

    #[test]
    fn reports_every_bad_setting_at_once() {
        let cli = Cli::try_parse_from([
            "meshid-ca",
            "serve",
            "--dir",
            "/nonexistent",
            "--listen",
            "nope",
            "--ttl",
            "2x",
            "--rate-limit=-1",
            "--max-connections",
            "0",
        ])
        .unwrap();
        let Command::Serve(args) = cli.command else {
            panic!("serve")
        };
        let problems = args.into_config().unwrap_err();
        let joined = problems.join("\n");
        for flag in [
            "--listen",
            "--ttl",
            "--rate-limit",
            "--max-connections",
            "--dir",
        ] {
            assert!(joined.contains(flag), "{flag} missing from {joined}");
        }
    }

    #[test]
    fn durations_take_fractions_and_say_what_is_wrong() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("ca.json"), "{}").unwrap();
        let dir_arg = dir.path().to_str().unwrap();
        let parse = |extra: &[&str]| {
            let argv = [&["meshid-ca", "serve", "--dir", dir_arg], extra].concat();
            let Command::Serve(args) = Cli::try_parse_from(argv).unwrap().command else {
                panic!("serve")
            };
            args.into_config()
        };
        let config = parse(&["--max-ttl", "1.5h"]).unwrap();
        assert_eq!(config.lifetimes.max, Duration::from_secs(5400));
        let problems = parse(&["--max-ttl", "1.5x"]).unwrap_err();
        assert_eq!(
            problems,
            vec![
                r#"--max-ttl: invalid duration "1.5x": unknown unit "x" (e.g. 30s, 1.5h, 1h30m; units ms, s, m, h, d)"#
            ]
        );
    }

    #[test]
    fn max_attestation_age_defaults_to_a_day_and_is_checked() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("ca.json"), "{}").unwrap();
        let dir_arg = dir.path().to_str().unwrap().to_owned();
        let parse = |extra: &[&str]| {
            let mut args = vec!["meshid-ca", "serve", "--dir", dir_arg.as_str()];
            args.extend_from_slice(extra);
            let Command::Serve(args) = Cli::try_parse_from(args).unwrap().command else {
                panic!("serve")
            };
            args.into_config()
        };
        let age = |extra: &[&str]| parse(extra).map(|c| c.max_attestation_age);
        assert_eq!(age(&[]), Ok(Duration::from_secs(86_400)));
        assert_eq!(
            age(&["--max-attestation-age", "7d"]),
            Ok(Duration::from_secs(7 * 86_400))
        );
        assert_eq!(
            age(&["--max-attestation-age=3s"]),
            Ok(Duration::from_secs(3))
        );
        for bad in ["0s", "500ms", "soon", ""] {
            let problems = age(&["--max-attestation-age", bad]).unwrap_err();
            assert!(
                problems.len() == 1 && problems[0].starts_with("--max-attestation-age: "),
                "{bad:?}: {problems:?}"
            );
        }
    }

    #[test]
    fn token_lifetime_and_pod_binding_default_to_strict() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("ca.json"), "{}").unwrap();
        std::fs::write(dir.path().join("jwks.json"), r#"{"keys":[]}"#).unwrap();
        let dir_arg = dir.path().to_str().unwrap().to_owned();
        let jwks_arg = dir.path().join("jwks.json").to_str().unwrap().to_owned();
        let parse = |extra: &[&str]| {
            let mut args = vec!["meshid-ca", "serve", "--dir", &dir_arg, "--jwks", &jwks_arg];
            args.extend_from_slice(extra);
            let Command::Serve(args) = Cli::try_parse_from(args).unwrap().command else {
                panic!("serve")
            };
            args.into_config().map(|c| {
                let jwt = c.jwt.unwrap();
                (jwt.max_token_lifetime, jwt.dangerous_accept_unbound_tokens)
            })
        };
        assert_eq!(parse(&[]), Ok((Duration::from_secs(48 * 3600), false)));
        assert_eq!(
            parse(&[
                "--max-token-lifetime",
                "2h",
                "--dangerous-accept-unbound-tokens"
            ]),
            Ok((Duration::from_secs(7200), true))
        );
        for bad in ["5m", "soon"] {
            let problems = parse(&["--max-token-lifetime", bad]).unwrap_err();
            assert!(
                problems.len() == 1 && problems[0].starts_with("--max-token-lifetime: "),
                "{bad:?}: {problems:?}"
            );
        }
    }

    #[test]
    fn namespace_rate_defaults_to_four_identities_and_is_checked() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("ca.json"), "{}").unwrap();
        let dir_arg = dir.path().to_str().unwrap().to_owned();
        let parse = |extra: &[&str]| {
            let mut args = vec!["meshid-ca", "serve", "--dir", dir_arg.as_str()];
            args.extend_from_slice(extra);
            let Command::Serve(args) = Cli::try_parse_from(args).unwrap().command else {
                panic!("serve")
            };
            args.into_config().map(|c| c.namespace_rate_limit)
        };
        let limit = |per_second, burst| RateLimit { per_second, burst };
        assert_eq!(parse(&[]), Ok(limit(200.0, 800)));
        assert_eq!(
            parse(&["--rate-limit", "10", "--rate-burst", "20"]),
            Ok(limit(40.0, 80))
        );
        assert_eq!(
            parse(&["--namespace-rate-limit", "7", "--namespace-rate-burst", "9"]),
            Ok(limit(7.0, 9))
        );
        let problems = parse(&[
            "--namespace-rate-limit",
            "x",
            "--namespace-rate-burst",
            "lots",
        ])
        .unwrap_err();
        assert_eq!(problems.len(), 2, "{problems:?}");
        // Checked as --rate-limit and --rate-burst are: a rate of nothing is a usage error.
        for bad in ["0", "-1", "NaN", "inf"] {
            let problems = parse(&[&format!("--namespace-rate-limit={bad}")]).unwrap_err();
            assert_eq!(
                problems,
                ["--namespace-rate-limit: must be a positive number"],
                "{bad}"
            );
        }
        let problems = parse(&["--namespace-rate-burst", "0"]).unwrap_err();
        assert_eq!(problems, ["--namespace-rate-burst: must be at least 1"]);
    }

    #[test]
    fn one_jwks_source_and_its_files_are_checked() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("ca.json"), "{}").unwrap();
        for f in ["jwks.json", "token", "ca.crt"] {
            std::fs::write(dir.path().join(f), "x").unwrap();
        }
        let path = |f: &str| dir.path().join(f).to_str().unwrap().to_owned();
        let (jwks, token, ca) = (path("jwks.json"), path("token"), path("ca.crt"));
        let dir_arg = path("");
        let parse = |extra: &[&str]| {
            let mut args = vec!["meshid-ca", "serve", "--dir", dir_arg.as_str()];
            args.extend_from_slice(extra);
            let Command::Serve(args) = Cli::try_parse_from(args).unwrap().command else {
                panic!("serve")
            };
            args.into_config()
        };
        let files = ["--jwks-token-file", &token, "--jwks-ca-file", &ca];
        // An empty namespace would be read as no restriction: refused.
        for empty in ["", "shop,", ",shop"] {
            let refused = parse(&["--jwks", &jwks, "--allowed-namespace", empty]).unwrap_err();
            assert!(
                refused.iter().any(|p| p.contains("an empty namespace")),
                "{empty:?}: {refused:?}"
            );
        }
        assert!(parse(&["--jwks", &jwks, "--allowed-namespace", "shop,pay"]).is_ok());
        let source = |extra: &[&str]| parse(extra).map(|c| c.jwt.map(|j| j.jwks));
        assert_eq!(source(&[]), Ok(None));
        assert_eq!(
            source(&["--jwks", &jwks]),
            Ok(Some(JwksSource::File(jwks.clone().into())))
        );
        let Ok(Some(JwksSource::Remote(remote))) =
            source(&[&["--jwks-discovery", "--jwks-refresh", "1m"], &files[..]].concat())
        else {
            panic!("discovery")
        };
        assert_eq!(remote.url, jwks_remote::DEFAULT_JWKS_URL);
        assert_eq!(remote.refresh_every, Duration::from_secs(60));
        assert_eq!(remote.min_forced_interval, Duration::from_secs(15));
        assert_eq!(remote.token_file, PathBuf::from(&token));
        let url = "https://10.0.0.1:6443/.well-known/openid-configuration";
        let Ok(Some(JwksSource::Remote(remote))) =
            source(&[&["--jwks-url", url], &files[..]].concat())
        else {
            panic!("url")
        };
        assert_eq!(remote.url, url);
        let reviewed = |extra: &[&str]| parse(extra).map(|c| c.jwt.map(|j| j.token_review));
        assert_eq!(
            reviewed(&[&["--jwks-discovery", "--token-review"], &files[..]].concat()),
            Ok(Some(true))
        );
        assert_eq!(
            reviewed(&[&["--jwks-discovery"], &files[..]].concat()),
            Ok(Some(false))
        );

        let problems = |extra: &[&str]| parse(extra).unwrap_err().join("\n");
        // A review needs the API server the keys come from.
        for without in [
            &["--token-review"][..],
            &["--jwks", &jwks, "--token-review"],
        ] {
            let p = problems(without);
            assert!(
                p.contains("--token-review: needs --jwks-url or --jwks-discovery"),
                "{p}"
            );
        }
        let both = problems(&[&["--jwks", &jwks, "--jwks-discovery"], &files[..]].concat());
        assert!(
            both.contains("--jwks, --jwks-url, --jwks-discovery"),
            "{both}"
        );
        let both = problems(&[&["--jwks", &jwks, "--jwks-url", url], &files[..]].concat());
        assert!(both.contains("not several"), "{both}");
        let bad = problems(&[
            "--jwks-url",
            "http://kubernetes.default.svc/openid/v1/jwks",
            "--jwks-token-file",
            "/nonexistent/token",
            "--jwks-ca-file",
            "/nonexistent/ca.crt",
            "--jwks-refresh",
            "0s",
        ]);
        for needle in [
            "--jwks-url: ",
            "https://",
            "--jwks-token-file: /nonexistent/token",
            "--jwks-ca-file: /nonexistent/ca.crt",
            "--jwks-refresh",
        ] {
            assert!(bad.contains(needle), "{needle} missing from {bad}");
        }
        // The token and CA files only matter when fetching.
        assert!(parse(&["--jwks", &jwks, "--jwks-ca-file", "/nonexistent"]).is_ok());
    }

    #[test]
    fn listener_limits_have_defaults_and_are_checked_together() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("ca.json"), "{}").unwrap();
        let dir_arg = dir.path().to_str().unwrap().to_owned();
        let parse = |extra: &[&str]| {
            let mut args = vec!["meshid-ca", "serve", "--dir", dir_arg.as_str()];
            args.extend_from_slice(extra);
            let Command::Serve(args) = Cli::try_parse_from(args).unwrap().command else {
                panic!("serve")
            };
            args.into_config()
        };
        let limits = parse(&[]).unwrap().limits;
        assert_eq!(limits.max_connections_per_source, 256);
        assert_eq!(limits.idle_timeout, Duration::from_secs(300));
        assert_eq!(limits.call_timeout, Duration::from_secs(60));
        assert_eq!(limits.max_connection_age, Duration::from_secs(1800));
        assert_eq!(limits.max_connection_age_grace, Duration::from_secs(30));
        assert_eq!(limits.max_arriving_requests, 448);

        let limits = parse(&[
            "--max-arriving-requests",
            "64",
            "--max-connections-per-source",
            "3",
            "--idle-timeout",
            "90s",
            "--call-timeout",
            "45s",
            "--max-connection-age",
            "1h",
            "--grace",
            "5s",
        ])
        .unwrap()
        .limits;
        assert_eq!(limits.max_connections_per_source, 3);
        assert_eq!(limits.idle_timeout, Duration::from_secs(90));
        assert_eq!(limits.call_timeout, Duration::from_secs(45));
        assert_eq!(limits.max_connection_age, Duration::from_secs(3600));
        assert_eq!(limits.max_connection_age_grace, Duration::from_secs(5));
        assert_eq!(limits.max_arriving_requests, 64);

        let problems = parse(&[
            "--max-arriving-requests",
            "0",
            "--max-connections-per-source",
            "0",
            "--idle-timeout",
            "0s",
            "--call-timeout",
            "30s",
            "--max-connection-age",
            "forever",
        ])
        .unwrap_err()
        .join("\n");
        for flag in [
            "--max-arriving-requests",
            "--max-connections-per-source",
            "--idle-timeout",
            "--call-timeout",
            "--max-connection-age",
        ] {
            assert!(problems.contains(flag), "{flag} missing from {problems}");
        }
    }
}
