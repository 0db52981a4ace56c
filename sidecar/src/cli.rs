//! The command line: flags with `MESHID_SIDECAR_*` environment twins (clap), turned once into typed
//! [`crate::settings`] by [`RunArgs::into_config`], which reads the files the flags name (the
//! annotations file, the CA bundle) and names every bad setting at once. Nothing here binds a
//! socket: a port taken by the app is reported when the sidecar binds it.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use clap::{Args, Parser, Subcommand};
use meshid_identity::annotations::MeshAnnotations;
use meshid_identity::{parse_duration, parse_duration_at_least};

use rustls::pki_types::CertificateDer;

use crate::settings::{
    Bootstrap, CaEndpoint, CaMode, CredSource, FileCreds, Inbound, Limits, Outbound, RunConfig,
    is_host_port, parse_inbound, parse_outbound, roots_from_pem,
};

pub use meshid_runtime::EXIT_USAGE;

/// Environment twins renamed into the sidecar's own `MESHID_SIDECAR_` prefix (`MESHID_CA_ADDR` was
/// in the CA's namespace): `(new, old)`. The old names still work, with a warning, for pods
/// injected before the rename.
pub const RENAMED_ENV: &[(&str, &str)] = &[
    ("MESHID_SIDECAR_INBOUND", "MESHID_INBOUND"),
    ("MESHID_SIDECAR_OUTBOUND", "MESHID_OUTBOUND"),
    ("MESHID_SIDECAR_POLICY", "MESHID_POLICY"),
    ("MESHID_SIDECAR_ANNOTATIONS", "MESHID_ANNOTATIONS"),
    ("MESHID_SIDECAR_POD_IP", "MESHID_POD_IP"),
    ("MESHID_SIDECAR_ADMIN_LISTEN", "MESHID_ADMIN_LISTEN"),
    ("MESHID_SIDECAR_STATS_LISTEN", "MESHID_STATS_LISTEN"),
    (
        "MESHID_SIDECAR_UNREADY_ON_POLICY_ERROR",
        "MESHID_UNREADY_ON_POLICY_ERROR",
    ),
    ("MESHID_SIDECAR_CERT", "MESHID_CERT"),
    ("MESHID_SIDECAR_KEY", "MESHID_KEY"),
    ("MESHID_SIDECAR_BUNDLE", "MESHID_BUNDLE"),
    ("MESHID_SIDECAR_CA_ADDR", "MESHID_CA_ADDR"),
    ("MESHID_SIDECAR_CA_BUNDLE", "MESHID_CA_BUNDLE"),
    ("MESHID_SIDECAR_CA_BUNDLE_PEM", "MESHID_CA_BUNDLE_PEM"),
    ("MESHID_SIDECAR_REPORT_CA_ADDR", "MESHID_REPORT_CA_ADDR"),
    ("MESHID_SIDECAR_CA_SERVER_NAME", "MESHID_CA_SERVER_NAME"),
    ("MESHID_SIDECAR_TOKEN_FILE", "MESHID_TOKEN_FILE"),
    ("MESHID_SIDECAR_JOIN_TOKEN_FILE", "MESHID_JOIN_TOKEN_FILE"),
    ("MESHID_SIDECAR_TTL", "MESHID_TTL"),
    (
        "MESHID_SIDECAR_DANGEROUS_ALLOW_NON_LOCAL_TARGET",
        "MESHID_DANGEROUS_ALLOW_NON_LOCAL_TARGET",
    ),
    (
        "MESHID_SIDECAR_HANDSHAKE_TIMEOUT",
        "MESHID_HANDSHAKE_TIMEOUT",
    ),
    ("MESHID_SIDECAR_IDLE_TIMEOUT", "MESHID_IDLE_TIMEOUT"),
    ("MESHID_SIDECAR_MAX_CONNECTIONS", "MESHID_MAX_CONNECTIONS"),
    ("MESHID_SIDECAR_MAX_HEADER_BYTES", "MESHID_MAX_HEADER_BYTES"),
    ("MESHID_SIDECAR_REQUEST_TIMEOUT", "MESHID_REQUEST_TIMEOUT"),
    ("MESHID_SIDECAR_CONNECT_TIMEOUT", "MESHID_CONNECT_TIMEOUT"),
    (
        "MESHID_SIDECAR_NO_CONNECTION_AGE_CAP",
        "MESHID_NO_CONNECTION_AGE_CAP",
    ),
    ("MESHID_SIDECAR_GRACE", "MESHID_GRACE"),
];
pub use meshid_runtime::process::LogFormat;

#[derive(Debug, Parser)]
#[command(
    name = "meshid-sidecar",
    version,
    about = "meshid sidecar: mTLS in and out, SPIFFE identity, allow-lists"
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
    /// Run the sidecar.
    Run(Box<RunArgs>),
    /// Check a policy file as the sidecar would load it (every problem, each with its line), warn
    /// about rules that never decide anything, and, with --peer and --port, say what it decides for
    /// that caller. Exit 0: valid (and allowed), warnings or not; 1: invalid file; 2: denied; 64:
    /// a usage error (such as --method without --path).
    CheckPolicy(CheckPolicyArgs),
    /// Explain a denial: the peer, port, method, path, policy version, and the rule that decided
    /// or the closest rule and what in it did not match, for a decision ID from a deny's log line
    /// or `x-meshid-decision` header. Asks the sidecar's admin (or stats) port. Exit 0: found;
    /// 1: not kept any more, or the sidecar could not be asked.
    Explain(ExplainArgs),
    /// Print a policy (YAML, or with --annotations a pod's annotations) that allows exactly the
    /// traffic the sidecar has let through, paths collapsed into patterns (a call it denied every
    /// time is only listed, as a comment), followed (as comments) by the observed calls the policy
    /// in force denies and its rules that decided none of them.
    /// Asks the sidecar's admin (or stats) port. Exit 0: printed; 1: the sidecar could not be asked.
    SuggestPolicy(SuggestPolicyArgs),
}

/// `meshid-sidecar suggest-policy`.
#[derive(Debug, Args)]
pub struct SuggestPolicyArgs {
    /// The sidecar's admin address (`--admin-listen`, or `--stats-listen` when set).
    #[arg(long)]
    pub admin: std::net::SocketAddr,
    /// Print pod annotations (`meshid.io/inbound`, `meshid.io/allow-PORT`) instead of a policy
    /// file; they allow whole peers, so on HTTP ports more than was observed.
    #[arg(long)]
    pub annotations: bool,
}

/// `meshid-sidecar explain`.
#[derive(Debug, Args)]
pub struct ExplainArgs {
    /// The sidecar's admin address (`--admin-listen`, or `--stats-listen` when set), e.g.
    /// 127.0.0.1:15020.
    #[arg(long)]
    pub admin: std::net::SocketAddr,
    /// The decision ID (12 hex digits).
    pub id: String,
}

/// `meshid-sidecar check-policy`.
#[derive(Debug, Args)]
pub struct CheckPolicyArgs {
    /// The policy: a YAML policy file, or a pod's downward-API annotations file.
    pub file: PathBuf,
    /// Decide for this caller (a SPIFFE ID); needs --port.
    #[arg(long, requires = "port")]
    pub peer: Option<String>,
    /// The inbound port the caller connects to.
    #[arg(long, requires = "peer")]
    pub port: Option<u16>,
    /// The request's method, on an HTTP port (with --path: without it only the connection is
    /// decided, and a method alone is refused rather than ignored).
    #[arg(long, default_value = "GET", requires = "path")]
    pub method: String,
    /// The request's path, on an HTTP port; without it only the connection is decided.
    #[arg(long)]
    pub path: Option<String>,
    /// The sidecar's inbound listeners, as given to `run` (LISTEN=TARGET[,tcp|http][,proxy-v2], repeatable):
    /// a policy port whose protocol disagrees with its listener is refused, as `run` refuses it.
    /// Also warn about a policy port no listener has, and a listener the policy does not name.
    #[arg(long)]
    pub inbound: Vec<String>,
    /// The sidecar's trust domain (that of its certificate's SPIFFE ID, e.g. cluster.local): warn
    /// about rules for another one, whose peers the TLS handshake refuses, and deny such a --peer.
    /// Without it, a policy naming several trust domains gets one warning.
    #[arg(long)]
    pub trust_domain: Option<String>,
}

#[derive(Debug, Args)]
pub struct RunArgs {
    /// Inbound listener: LISTEN=TARGET[,tcp|http][,proxy-v2], e.g. 0.0.0.0:15443=127.0.0.1:8080,http
    /// (repeatable). `proxy-v2` (tcp only): the app first gets a PROXY protocol v2 header with the
    /// peer's address and verified SPIFFE ID (TLV 0xE4).
    #[arg(long, env = "MESHID_SIDECAR_INBOUND", value_delimiter = ' ')]
    pub inbound: Vec<String>,
    /// Upstream: LOCAL=REMOTE,SPIFFE_ID[,tcp|http], e.g.
    /// 127.0.0.1:9001=payments.shop.svc:15443,spiffe://cluster.local/ns/shop/sa/payments,http (repeatable).
    #[arg(long, env = "MESHID_SIDECAR_OUTBOUND", value_delimiter = ' ')]
    pub outbound: Vec<String>,
    /// Allow-list file (YAML), watched and hot-reloaded. Without one every inbound peer is denied.
    #[arg(long, env = "MESHID_SIDECAR_POLICY")]
    pub policy: Option<PathBuf>,
    /// Kubernetes downward-API file of the pod's annotations (`meshid.io/inbound`, `allow-<port>`,
    /// `outbound`, `mode`): adds the inbound listeners (on --pod-ip) and upstreams they declare,
    /// and is the watched policy (so `kubectl annotate` changes the allow-list live). Replaces
    /// --policy.
    #[arg(long, env = "MESHID_SIDECAR_ANNOTATIONS")]
    pub annotations: Option<PathBuf>,
    /// The pod's IP (downward API `status.podIP`): inbound ports from --annotations listen on it and
    /// forward to 127.0.0.1 on the same port.
    #[arg(long, env = "MESHID_SIDECAR_POD_IP")]
    pub pod_ip: Option<String>,
    /// Admin server: /healthz, /readyz, the app's forwarded probes (/app-health/...), and, unless
    /// --stats-listen is set, /metrics and /identity.
    #[arg(
        long,
        env = "MESHID_SIDECAR_ADMIN_LISTEN",
        default_value = "0.0.0.0:15021"
    )]
    pub admin_listen: String,
    /// Serve /metrics and /identity here (IP:PORT) and no longer on the admin port, which then
    /// answers only what Kubernetes needs (probes). E.g. 127.0.0.1:15020, or a port of its own that a
    /// NetworkPolicy opens to the monitoring namespace only.
    #[arg(long, env = "MESHID_SIDECAR_STATS_LISTEN")]
    pub stats_listen: Option<String>,
    /// Fail readiness while the newest policy file is rejected (the last good policy stays in force
    /// either way; without this flag only the log, `meshid_sidecar_policy_rejected` and the
    /// `rejected` reload count say so).
    #[arg(long, env = "MESHID_SIDECAR_UNREADY_ON_POLICY_ERROR")]
    pub unready_on_policy_error: bool,
    /// Answer /decisions and /observed (peer IDs, methods and paths of recent calls) to callers
    /// beyond loopback too. Without it only callers on loopback get them (403 for others): `explain`
    /// and `suggest-policy` run in the pod or through `kubectl port-forward`.
    #[arg(long, env = "MESHID_SIDECAR_REMOTE_DECISIONS")]
    pub remote_decisions: bool,
    /// Add a `peer` label (the verified peer's SPIFFE ID: the client's inbound, the upstream's
    /// outbound) to the request, request-duration and byte metrics, to see who calls whom. Off by
    /// default: it multiplies those series by the number of distinct peers.
    #[arg(long, env = "MESHID_SIDECAR_METRICS_PEER_IDENTITY")]
    pub metrics_peer_identity: bool,
    /// Serve the SPIFFE Workload API to the app on this unix socket (a path, or `unix:///path` as
    /// `SPIFFE_ENDPOINT_SOCKET` spells it): an X.509-SVID with a key of the app's own (CA mode) and
    /// the trust bundle, streamed again at every renewal and bundle change. The socket is mode
    /// 0660 in a directory the sidecar owns (created if missing).
    #[arg(long, env = "MESHID_SIDECAR_WORKLOAD_API_SOCKET")]
    pub workload_api_socket: Option<String>,
    /// Certificate chain (PEM, leaf first).
    #[arg(long, env = "MESHID_SIDECAR_CERT")]
    pub cert: Option<PathBuf>,
    /// Private key (PEM).
    #[arg(long, env = "MESHID_SIDECAR_KEY")]
    pub key: Option<PathBuf>,
    /// Trust bundle (PEM roots).
    #[arg(long, env = "MESHID_SIDECAR_BUNDLE")]
    pub bundle: Option<PathBuf>,
    /// CA mode: the CA's gRPC address (HOST:PORT). Needs --ca-bundle (or --ca-bundle-pem) and
    /// --token-file or --join-token-file; replaces --cert/--key/--bundle.
    #[arg(long, env = "MESHID_SIDECAR_CA_ADDR")]
    pub ca_addr: Option<String>,
    /// Roots the CA's serving certificate chains to (PEM).
    #[arg(long, env = "MESHID_SIDECAR_CA_BUNDLE")]
    pub ca_bundle: Option<PathBuf>,
    /// CA mode: keep the trust bundle last received from the CA in this file, and trust its roots
    /// as well as the --ca-bundle roots to reach the CA at start. A sidecar restarted after a CA
    /// rotation (its pod created before it) then still reaches a CA that serves a certificate of
    /// the new root. Put it on a volume that outlives the container (the injector mounts an
    /// emptyDir); a file that cannot be read or written is ignored with a warning.
    #[arg(long, env = "MESHID_SIDECAR_BUNDLE_CACHE")]
    pub bundle_cache: Option<PathBuf>,
    /// The same roots as PEM text instead of a file (the injector sets MESHID_SIDECAR_CA_BUNDLE_PEM).
    #[arg(
        long,
        env = "MESHID_SIDECAR_CA_BUNDLE_PEM",
        hide_env_values = true,
        allow_hyphen_values = true
    )]
    pub ca_bundle_pem: Option<String>,
    /// File mode: also report to the CA at HOST:PORT (its certificate verified against --bundle), so
    /// the CA's rotation status lists this sidecar, as unknown: its trust comes from files.
    #[arg(long, env = "MESHID_SIDECAR_REPORT_CA_ADDR")]
    pub report_ca_addr: Option<String>,
    /// Name to verify the CA's certificate against (default: the host of --ca-addr).
    #[arg(long, env = "MESHID_SIDECAR_CA_SERVER_NAME")]
    pub ca_server_name: Option<String>,
    /// Kubernetes projected service-account token (re-read at every request).
    #[arg(long, env = "MESHID_SIDECAR_TOKEN_FILE")]
    pub token_file: Option<PathBuf>,
    /// One-time join token (first certificate only; renewals use the certificate).
    #[arg(long, env = "MESHID_SIDECAR_JOIN_TOKEN_FILE")]
    pub join_token_file: Option<PathBuf>,
    /// Certificate lifetime to ask the CA for (default: the CA's).
    #[arg(long, env = "MESHID_SIDECAR_TTL")]
    pub ttl: Option<String>,
    /// Allow inbound targets that are not loopback (the app is then reachable without the sidecar).
    #[arg(long, env = "MESHID_SIDECAR_DANGEROUS_ALLOW_NON_LOCAL_TARGET")]
    pub dangerous_allow_non_local_target: bool,
    /// Time allowed for a TLS handshake.
    #[arg(long, env = "MESHID_SIDECAR_HANDSHAKE_TIMEOUT", default_value = "10s")]
    pub handshake_timeout: String,
    /// Close a connection with no traffic either way for this long (an h2 connection: with no
    /// request in flight, or with a response its peer does not take).
    #[arg(long, env = "MESHID_SIDECAR_IDLE_TIMEOUT", default_value = "5m")]
    pub idle_timeout: String,
    /// Most concurrent connections per listener; at the cap a newcomer displaces the oldest
    /// connection not yet proven (no authenticated handshake or first request), else is refused.
    #[arg(long, env = "MESHID_SIDECAR_MAX_CONNECTIONS", default_value = "10000")]
    pub max_connections: String,
    /// Most inbound connections one peer (an authenticated identity at one address) may hold on a
    /// listener; past it the peer's new connection is closed after its handshake (a workload with
    /// a valid certificate cannot take every slot).
    #[arg(
        long,
        env = "MESHID_SIDECAR_MAX_CONNECTIONS_PER_PEER",
        default_value = "1000"
    )]
    pub max_connections_per_peer: String,
    /// Most of those connections one peer may hold speaking h2 (each holds up to 1 MiB of request
    /// data ahead of the app and 16 KiB of answers per stream); past it the peer's new h2
    /// connection is sent GOAWAY and closed. A meshid outbound opens at most
    /// --max-upstream-h2-connections to an upstream per outbound listener.
    #[arg(
        long,
        env = "MESHID_SIDECAR_MAX_H2_CONNECTIONS_PER_PEER",
        default_value = "64"
    )]
    pub max_h2_connections_per_peer: String,
    /// Largest request or response head (HTTP/1.1 headers; HTTP/2 header list) accepted, in
    /// bytes: a peer's or the app's request, the app's or an upstream's response.
    #[arg(long, env = "MESHID_SIDECAR_MAX_HEADER_BYTES", default_value = "16384")]
    pub max_header_bytes: String,
    /// Most pooled HTTP/1.1 connections to one upstream carrying a request at once (a response
    /// the app does not read holds its connection); past it requests go over h2. Keep it well
    /// below the upstreams' --max-connections-per-peer, which counts all our connections.
    #[arg(
        long,
        env = "MESHID_SIDECAR_MAX_UPSTREAM_HTTP1_CONNECTIONS",
        default_value = "64"
    )]
    pub max_upstream_http1_connections: String,
    /// Most h2 connections to one upstream: another is opened when every earlier one has all its
    /// streams in use (200, or fewer if the upstream allows fewer); past them a request is
    /// answered 503 at once.
    #[arg(
        long,
        env = "MESHID_SIDECAR_MAX_UPSTREAM_H2_CONNECTIONS",
        default_value = "4"
    )]
    pub max_upstream_h2_connections: String,
    /// Most HTTP/1.1 connections to one inbound's app carrying a peer's request at once (a
    /// response the peer does not take holds its connection), and once half of them do, a quarter
    /// of them (at least one) by one peer identity's requests; past either a request is answered
    /// 503 at once. Upgraded
    /// connections (WebSocket) are not counted: each holds a peer connection.
    #[arg(
        long,
        env = "MESHID_SIDECAR_MAX_APP_CONNECTIONS",
        default_value = "1024"
    )]
    pub max_app_connections: String,
    /// Memory, in bytes, that the POST form bodies being read whole to check their `_method`
    /// fields may hold together, across every connection (each body is at most 1 MiB), one peer
    /// identity's at most a quarter of it (never less than 1 MiB). A request whose body finds no
    /// room is answered 503 at once (413 if it alone needs more than this); keep it well under the
    /// container's memory limit.
    #[arg(
        long,
        env = "MESHID_SIDECAR_FORM_BODY_MEMORY",
        default_value = "16777216"
    )]
    pub form_body_memory: String,
    /// Time the app (or upstream) has to answer with response headers. A gRPC call is timed by
    /// its own deadline (`grpc-timeout`) instead, or not at all without one.
    #[arg(long, env = "MESHID_SIDECAR_REQUEST_TIMEOUT", default_value = "30s")]
    pub request_timeout: String,
    /// Time allowed to connect to the app or an upstream.
    #[arg(long, env = "MESHID_SIDECAR_CONNECT_TIMEOUT", default_value = "5s")]
    pub connect_timeout: String,
    /// Keep inbound connections open past the peer certificate's expiry (by default they are closed
    /// gracefully then, so no connection outlives the identity that opened it).
    #[arg(long, env = "MESHID_SIDECAR_NO_CONNECTION_AGE_CAP")]
    pub no_connection_age_cap: bool,
    /// On SIGTERM, how long in-flight requests and connections may take to finish; also how long
    /// any graceful close of an h2 connection (idle timeout, peer certificate expiry) waits for
    /// its streams.
    #[arg(long, env = "MESHID_SIDECAR_GRACE", default_value = "20s")]
    pub grace: String,
}

impl RunArgs {
    /// The `--inbound` and `--outbound` values the `--annotations` file declares.
    fn annotation_listeners(&self, problems: &mut Vec<String>) -> (Vec<String>, Vec<String>) {
        let Some(path) = &self.annotations else {
            if self.pod_ip.is_some() {
                problems.push("--pod-ip is only used with --annotations".into());
            }
            return (Vec::new(), Vec::new());
        };
        if self.policy.is_some() {
            problems.push(
                "--annotations and --policy are two sources of the allow-list; use one".into(),
            );
        }
        let text = match std::fs::read_to_string(path) {
            Ok(text) => text,
            Err(e) => {
                problems.push(format!("--annotations: {}: {e}", path.display()));
                return (Vec::new(), Vec::new());
            }
        };
        let parsed = match MeshAnnotations::from_downward_api(&text) {
            Ok(a) => a,
            Err(errors) => {
                problems.extend(errors.iter().map(|e| format!("--annotations: {e}")));
                return (Vec::new(), Vec::new());
            }
        };
        let pod_ip = match self.pod_ip.as_deref().map(str::parse::<std::net::IpAddr>) {
            Some(Ok(ip)) => Some(ip),
            Some(Err(_)) => {
                problems.push(format!("--pod-ip: {:?} is not an IP address", self.pod_ip));
                None
            }
            None if parsed.inbound.is_empty() => None,
            None => {
                problems
                    .push("--pod-ip is required when the annotations declare inbound ports".into());
                None
            }
        };
        let inbound = pod_ip.map(|ip| parsed.inbound_args(ip)).unwrap_or_default();
        (inbound, parsed.outbound_args())
    }

    /// Checks every setting; returns all problems at once.
    pub fn into_config(self) -> Result<RunConfig, Vec<String>> {
        let mut problems = Vec::new();
        let limits = self.limits(&mut problems);
        let (inbound, outbound, admin_listen, stats_listen) = self.listeners(&mut problems);
        if let Some(p) = &self.policy
            && !p.exists()
        {
            problems.push(format!("--policy: {} does not exist", p.display()));
        }
        let creds = match &self.ca_addr {
            None => CredSource::Files(FileCreds {
                cert: required_file(&mut problems, "cert", &self.cert),
                key: required_file(&mut problems, "key", &self.key),
                bundle: required_file(&mut problems, "bundle", &self.bundle),
            }),
            Some(addr) => self.ca_mode(addr, &mut problems),
        };
        let report_to = self.report_to(&mut problems);
        if !problems.is_empty() {
            return Err(problems);
        }
        Ok(RunConfig {
            report_to,
            inbound,
            outbound,
            // The policy watcher reads a downward-API file as annotations (see run.rs).
            policy: self.annotations.or(self.policy),
            admin_listen,
            stats_listen,
            unready_on_policy_error: self.unready_on_policy_error,
            remote_decisions: self.remote_decisions,
            metrics_peer_identity: self.metrics_peer_identity,
            workload_api: self
                .workload_api_socket
                .as_deref()
                .map(crate::workload_api::socket_path),
            creds,
            limits,
        })
    }

    /// Timeouts and sizes.
    fn limits(&self, problems: &mut Vec<String>) -> Limits {
        // A timeout of zero would fail every connection: at least 100ms, as the injector's.
        let least = Duration::from_millis(100);
        let mut duration =
            |flag: &str, value: &str, min: Duration| match parse_duration_at_least(value, min) {
                Ok(d) => d,
                Err(e) => {
                    problems.push(format!("--{flag}: {e}"));
                    Duration::ZERO
                }
            };
        let handshake_timeout = duration("handshake-timeout", &self.handshake_timeout, least);
        let idle_timeout = duration("idle-timeout", &self.idle_timeout, least);
        let request_timeout = duration("request-timeout", &self.request_timeout, least);
        let connect_timeout = duration("connect-timeout", &self.connect_timeout, least);
        let grace = duration("grace", &self.grace, Duration::ZERO);
        let max_connections = match self.max_connections.parse::<usize>() {
            Ok(n) if n > 0 => n,
            Ok(_) => {
                problems.push("--max-connections: must be at least 1".into());
                0
            }
            Err(e) => {
                problems.push(format!(
                    "--max-connections: {:?}: {e}",
                    self.max_connections
                ));
                0
            }
        };
        let max_connections_per_peer = match self.max_connections_per_peer.parse::<usize>() {
            Ok(n) if n > 0 => n,
            _ => {
                problems.push("--max-connections-per-peer: must be a number of at least 1".into());
                0
            }
        };
        let max_h2_connections_per_peer = match self.max_h2_connections_per_peer.parse::<usize>() {
            Ok(n) if n > 0 => n,
            _ => {
                problems
                    .push("--max-h2-connections-per-peer: must be a number of at least 1".into());
                0
            }
        };
        let max_header_bytes = match self.max_header_bytes.parse::<usize>() {
            Ok(n) if n >= 8192 => n,
            _ => {
                problems.push("--max-header-bytes: must be a number of at least 8192".into());
                0
            }
        };
        let mut at_least_one = |flag: &str, value: &str| match value.parse::<usize>() {
            Ok(n) if n > 0 => n,
            _ => {
                problems.push(format!("--{flag}: must be a number of at least 1"));
                0
            }
        };
        let max_upstream_http1_connections = at_least_one(
            "max-upstream-http1-connections",
            &self.max_upstream_http1_connections,
        );
        let max_app_connections = at_least_one("max-app-connections", &self.max_app_connections);
        let max_upstream_h2_connections = at_least_one(
            "max-upstream-h2-connections",
            &self.max_upstream_h2_connections,
        );
        let form_body_memory = at_least_one("form-body-memory", &self.form_body_memory);
        Limits {
            handshake_timeout,
            idle_timeout,
            max_connections,
            max_connections_per_peer,
            max_h2_connections_per_peer,
            max_header_bytes,
            request_timeout,
            connect_timeout,
            grace,
            cap_connection_age: !self.no_connection_age_cap,
            upstream_ping: Limits::default().upstream_ping,
            max_upstream_http1_connections,
            max_upstream_h2_connections,
            max_app_connections,
            form_body_memory,
        }
    }

    /// Inbound listeners, upstreams (from flags and the annotations file) and the admin address,
    /// each address used once.
    fn listeners(
        &self,
        problems: &mut Vec<String>,
    ) -> (Vec<Inbound>, Vec<Outbound>, SocketAddr, Option<SocketAddr>) {
        let allow = self.dangerous_allow_non_local_target;
        let before = problems.len();
        let (from_annotations_in, from_annotations_out) = self.annotation_listeners(problems);
        let flags = |values: &[String]| -> Vec<String> {
            values.iter().filter(|s| !s.is_empty()).cloned().collect()
        };
        let inbound = parse_all(
            problems,
            [
                ("--inbound", flags(&self.inbound), allow),
                ("--annotations", from_annotations_in, false),
            ],
            parse_inbound,
        );
        let outbound = parse_all(
            problems,
            [
                ("--outbound", flags(&self.outbound), allow),
                ("--annotations", from_annotations_out, false),
            ],
            parse_outbound,
        );
        let admin_listen = self.admin_listen.parse::<SocketAddr>().unwrap_or_else(|_| {
            problems.push(format!(
                "--admin-listen: {:?} is not IP:PORT",
                self.admin_listen
            ));
            SocketAddr::from(([0, 0, 0, 0], 0))
        });
        let stats_listen = self.stats_listen.as_ref().and_then(|s| {
            s.parse::<SocketAddr>()
                .map_err(|_| problems.push(format!("--stats-listen: {s:?} is not IP:PORT")))
                .ok()
        });
        let mut seen = std::collections::HashSet::new();
        for addr in inbound
            .iter()
            .map(|i| i.listen)
            .chain(outbound.iter().map(|o| o.local))
            .chain(std::iter::once(admin_listen))
            .chain(stats_listen)
        {
            if addr.port() != 0 && !seen.insert(addr) {
                problems.push(format!("{addr} is used by more than one listener"));
            }
        }
        let mut ports = std::collections::HashSet::new();
        for i in &inbound {
            if !ports.insert(i.listen.port()) {
                problems.push(format!(
                    "--inbound: port {} is used twice (policy rules are per port)",
                    i.listen.port()
                ));
            }
        }
        // Only when none was asked for: a listener refused above is already named.
        if inbound.is_empty() && outbound.is_empty() && problems.len() == before {
            problems.push("no --inbound or --outbound listener: nothing to do".into());
        }
        (inbound, outbound, admin_listen, stats_listen)
    }

    /// CA mode: where the CA is, what its certificate chains to, and the first credential.
    fn ca_mode(&self, addr: &str, problems: &mut Vec<String>) -> CredSource {
        if self.cert.is_some() || self.key.is_some() || self.bundle.is_some() {
            problems.push(
                "--ca-addr and --cert/--key/--bundle are two ways to get credentials; use one"
                    .into(),
            );
        }
        // The bundle file may hold, beside its roots, the intermediates trust under a shared root
        // is pinned to (`meshid-ca bundle`): told apart by who issued them.
        let (roots, pinned) = meshid_identity::verify::split_pins(self.ca_roots(problems));
        let bootstrap = match (&self.token_file, &self.join_token_file) {
            (Some(t), None) => Some(Bootstrap::TokenFile(t.clone())),
            (None, Some(j)) => Some(Bootstrap::JoinTokenFile(j.clone())),
            _ => {
                problems
                    .push("CA mode needs exactly one of --token-file and --join-token-file".into());
                None
            }
        };
        let ttl = match self.ttl.as_deref().map(parse_duration) {
            None => None,
            Some(Ok(t)) => Some(t),
            Some(Err(e)) => {
                problems.push(format!("--ttl: {e}"));
                None
            }
        };
        if !is_host_port(addr) {
            problems.push(format!("--ca-addr: {addr:?} is not HOST:PORT"));
        }
        match bootstrap {
            Some(bootstrap) => CredSource::Ca(CaMode {
                endpoint: CaEndpoint {
                    addr: addr.to_owned(),
                    server_name: self.ca_server_name.clone(),
                    roots,
                    pinned,
                },
                bootstrap,
                ttl,
                bundle_cache: self.bundle_cache.clone(),
            }),
            // Unused: a problem was recorded, so no configuration is returned.
            None => CredSource::Files(FileCreds {
                cert: PathBuf::new(),
                key: PathBuf::new(),
                bundle: PathBuf::new(),
            }),
        }
    }

    /// The roots the CA's serving certificate chains to: `--ca-bundle` or `--ca-bundle-pem`.
    fn ca_roots(&self, problems: &mut Vec<String>) -> Vec<CertificateDer<'static>> {
        match (&self.ca_bundle, &self.ca_bundle_pem) {
            (Some(_), Some(_)) => {
                problems.push(
                    "--ca-bundle and --ca-bundle-pem (MESHID_SIDECAR_CA_BUNDLE_PEM) are two sources of \
                     the CA's roots; use one"
                        .into(),
                );
                Vec::new()
            }
            (None, Some(pem)) => roots_from_pem(pem).unwrap_or_else(|e| {
                problems.push(format!(
                    "--ca-bundle-pem (MESHID_SIDECAR_CA_BUNDLE_PEM): {e}"
                ));
                Vec::new()
            }),
            (_, None) => {
                let ca_bundle = required_file(problems, "ca-bundle", &self.ca_bundle);
                if !ca_bundle.is_file() {
                    return Vec::new();
                }
                crate::creds::files::certs(&ca_bundle).unwrap_or_else(|e| {
                    problems.push(format!("--ca-bundle: {e}"));
                    Vec::new()
                })
            }
        }
    }

    /// File mode's optional report to the CA.
    fn report_to(&self, problems: &mut Vec<String>) -> Option<CaEndpoint> {
        match (&self.report_ca_addr, &self.ca_addr) {
            (None, _) => None,
            (Some(_), Some(_)) => {
                problems.push(
                    "--report-ca-addr is for file mode; in CA mode the sidecar reports to --ca-addr"
                        .into(),
                );
                None
            }
            (Some(addr), None) => {
                if !is_host_port(addr) {
                    problems.push(format!("--report-ca-addr: {addr:?} is not HOST:PORT"));
                }
                Some(CaEndpoint {
                    addr: addr.clone(),
                    server_name: self.ca_server_name.clone(),
                    roots: Vec::new(),
                    pinned: Vec::new(),
                })
            }
        }
    }
}

/// Parses every value of each source with `parse`, naming the source in each problem.
fn parse_all<T, const N: usize>(
    problems: &mut Vec<String>,
    sources: [(&str, Vec<String>, bool); N],
    parse: fn(&str, bool) -> Result<T, String>,
) -> Vec<T> {
    let mut out = Vec::new();
    for (flag, values, allow_non_local) in sources {
        for value in values {
            match parse(&value, allow_non_local) {
                Ok(v) => out.push(v),
                Err(e) => problems.push(format!("{flag}: {e}")),
            }
        }
    }
    out
}

/// A file a flag must name.
fn required_file(problems: &mut Vec<String>, flag: &str, path: &Option<PathBuf>) -> PathBuf {
    match path {
        Some(p) if p.is_file() => p.clone(),
        Some(p) => {
            problems.push(format!("--{flag}: {} is not a readable file", p.display()));
            PathBuf::new()
        }
        None => {
            problems.push(format!("--{flag} is required"));
            PathBuf::new()
        }
    }
}

/// Parses a whole `meshid-sidecar` command line (program name first) into its checked
/// configuration, as the binary does: the injector's tests check the command lines it writes with
/// this.
pub fn run_config_from_args<I, T>(argv: I) -> Result<RunConfig, Vec<String>>
where
    I: IntoIterator<Item = T>,
    T: Into<std::ffi::OsString> + Clone,
{
    let cli = Cli::try_parse_from(argv).map_err(|e| vec![e.to_string()])?;
    match cli.command {
        Command::Run(run) => run.into_config(),
        Command::CheckPolicy(_) | Command::Explain(_) | Command::SuggestPolicy(_) => {
            Err(vec!["not a `run` command line".to_owned()])
        }
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
    fn every_bad_setting_is_reported() {
        let cli = Cli::try_parse_from([
            "meshid-sidecar",
            "run",
            "--inbound",
            "0.0.0.0:1=10.1.1.1:80",
            "--outbound",
            "nope",
            "--idle-timeout",
            "x",
            "--max-header-bytes",
            "100",
            "--admin-listen",
            "bad",
        ])
        .unwrap();
        let Command::Run(args) = cli.command else {
            panic!("run")
        };
        let problems = args.into_config().unwrap_err().join("\n");
        for needle in [
            "--inbound",
            "--outbound",
            "--idle-timeout",
            "--max-header-bytes",
            "--admin-listen",
            "--cert",
            "--key",
            "--bundle",
        ] {
            assert!(problems.contains(needle), "{needle} missing in {problems}");
        }
    }

    #[test]
    fn a_bad_listener_is_named_once_not_also_as_nothing_to_do() {
        let problems = |argv: &[&str]| {
            let argv = [&["meshid-sidecar", "run"], argv].concat();
            let Command::Run(args) = Cli::try_parse_from(argv).unwrap().command else {
                panic!("run")
            };
            args.into_config().unwrap_err().join("\n")
        };
        let one_bad = problems(&["--inbound", "0.0.0.0:15443=nope"]);
        assert!(one_bad.contains("--inbound: "), "{one_bad}");
        assert!(!one_bad.contains("nothing to do"), "{one_bad}");
        let none = problems(&[]);
        assert!(none.contains("nothing to do"), "{none}");
    }

    #[test]
    fn durations_share_one_grammar_and_wording() {
        let problems = |argv: &[&str]| {
            let argv = [
                &[
                    "meshid-sidecar",
                    "run",
                    "--outbound",
                    "127.0.0.1:9001=b:80,spiffe://td/b",
                ],
                argv,
            ]
            .concat();
            let Command::Run(args) = Cli::try_parse_from(argv).unwrap().command else {
                panic!("run")
            };
            match args.into_config() {
                Ok(_) => String::new(),
                Err(p) => p.join("\n"),
            }
        };
        let p = problems(&[
            "--idle-timeout",
            "1.5h",
            "--handshake-timeout",
            "0s",
            "--grace",
            "1x",
        ]);
        assert!(!p.contains("--idle-timeout"), "{p}");
        assert!(
            p.contains("--handshake-timeout: must be at least 100ms"),
            "{p}"
        );
        assert!(
            p.contains(r#"--grace: invalid duration "1x": unknown unit "x""#),
            "{p}"
        );
    }

    #[test]
    fn connection_caps_per_peer_are_numbers_of_at_least_one() {
        let limits = |argv: &[&str]| {
            let argv = [
                &[
                    "meshid-sidecar",
                    "run",
                    "--outbound",
                    "127.0.0.1:9001=b:80,spiffe://td/b",
                ],
                argv,
            ]
            .concat();
            let Command::Run(args) = Cli::try_parse_from(argv).unwrap().command else {
                panic!("run")
            };
            let mut problems = Vec::new();
            let limits = args.limits(&mut problems);
            (limits, problems.join("\n"))
        };
        let (defaults, problems) = limits(&[]);
        assert_eq!(problems, "");
        assert_eq!(defaults, Limits::default());
        assert_eq!(defaults.max_h2_connections_per_peer, 64);
        let (set, problems) = limits(&[
            "--max-connections-per-peer",
            "10",
            "--max-h2-connections-per-peer",
            "3",
        ]);
        assert_eq!(problems, "");
        assert_eq!(
            (
                set.max_connections_per_peer,
                set.max_h2_connections_per_peer
            ),
            (10, 3)
        );
        for flag in [
            "--max-connections-per-peer",
            "--max-h2-connections-per-peer",
        ] {
            for bad in ["0", "-1", "many", ""] {
                let (_, problems) = limits(&[&format!("{flag}={bad}")]);
                assert_eq!(
                    problems,
                    format!("{flag}: must be a number of at least 1"),
                    "{flag} {bad:?}"
                );
            }
        }
    }

    #[test]
    fn ca_bundle_from_pem_text() {
        let key = rcgen::KeyPair::generate().unwrap();
        let root = rcgen::CertificateParams::new(Vec::<String>::new())
            .unwrap()
            .self_signed(&key)
            .unwrap()
            .pem();
        let dir = tempfile::tempdir().unwrap();
        let token = dir.path().join("token");
        std::fs::write(&token, "t").unwrap();
        let bundle_file = dir.path().join("bundle.pem");
        std::fs::write(&bundle_file, &root).unwrap();
        let run = |extra: &[&str]| {
            let mut argv = vec![
                "meshid-sidecar",
                "run",
                "--outbound",
                "127.0.0.1:9001=b.ns.svc:80,spiffe://td/b",
                "--ca-addr",
                "ca.meshid.svc:8443",
                "--token-file",
                token.to_str().unwrap(),
            ];
            argv.extend(extra);
            let Command::Run(args) = Cli::try_parse_from(argv).unwrap().command else {
                panic!("run")
            };
            args.into_config().map_err(|p| p.join("\n"))
        };
        let config = run(&["--ca-bundle-pem", &root]).unwrap();
        let CredSource::Ca(ca) = config.creds else {
            panic!("CA mode")
        };
        assert_eq!(ca.endpoint.roots.len(), 1);
        let key_pem = key.serialize_pem();
        for (bad, needle) in [
            ("garbage", "no PEM certificate"),
            ("", "no PEM certificate"),
            (key_pem.as_str(), "not a CERTIFICATE"),
            (
                "-----BEGIN CERTIFICATE-----\nAAAA\n-----END CERTIFICATE-----\n",
                "not X.509",
            ),
        ] {
            let problems = run(&["--ca-bundle-pem", bad]).unwrap_err();
            assert!(problems.contains("--ca-bundle-pem"), "{problems}");
            assert!(problems.contains(needle), "{bad:?}: {problems}");
        }
        let both = run(&[
            "--ca-bundle-pem",
            &root,
            "--ca-bundle",
            bundle_file.to_str().unwrap(),
        ]);
        assert!(both.unwrap_err().contains("use one"));
        let neither = run(&[]).unwrap_err();
        assert!(neither.contains("--ca-bundle is required"), "{neither}");
    }

    #[test]
    fn annotations_file_declares_listeners_and_is_the_policy() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("annotations");
        let run = |annotations: &str, extra: &[&str]| {
            std::fs::write(&file, annotations).unwrap();
            let mut argv = vec![
                "meshid-sidecar",
                "run",
                "--annotations",
                file.to_str().unwrap(),
                "--cert",
                "/nonexistent",
                "--key",
                "/nonexistent",
                "--bundle",
                "/nonexistent",
            ];
            argv.extend(extra);
            let Command::Run(args) = Cli::try_parse_from(argv).unwrap().command else {
                panic!("run")
            };
            args.into_config().map_err(|p| p.join("\n"))
        };
        let good = "meshid.io/inbound=\"8080=http\"\nmeshid.io/outbound=\"9001=b.ns.svc:80,spiffe://td/b\"\n";
        let problems = run(good, &["--pod-ip", "10.0.0.7"]).unwrap_err();
        // Only the credential files are wrong: the listeners were derived.
        assert!(!problems.contains("--annotations"), "{problems}");
        assert!(!problems.contains("--pod-ip"), "{problems}");
        let problems = run(good, &[]).unwrap_err();
        assert!(problems.contains("--pod-ip is required"), "{problems}");
        let problems = run(
            "meshid.io/inbound=\"8080=udp\"\n",
            &["--pod-ip", "10.0.0.7"],
        )
        .unwrap_err();
        assert!(
            problems.contains("--annotations: line 1: annotation meshid.io/inbound"),
            "{problems}"
        );
        let problems = run(good, &["--pod-ip", "x", "--policy", "/p.yaml"]).unwrap_err();
        assert!(problems.contains("--pod-ip: "), "{problems}");
        assert!(
            problems.contains("--annotations and --policy"),
            "{problems}"
        );
    }
}
