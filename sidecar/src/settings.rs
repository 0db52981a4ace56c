//! The sidecar's settings, typed: what `meshid-sidecar run` was told, checked once at the edge
//! ([`crate::cli`] turns flags and files into these) and passed to [`crate::run::start`]. Tests build
//! them directly. The value parsers here are pure: no file is read and no socket is bound.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use meshid_identity::SpiffeId;
use meshid_identity::policy::Protocol;
use rustls::pki_types::CertificateDer;

/// An inbound listener.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Inbound {
    pub listen: SocketAddr,
    pub target: SocketAddr,
    pub protocol: Protocol,
    /// TCP only: send the app a PROXY protocol v2 header (peer address, verified SPIFFE ID) first.
    pub proxy_protocol: bool,
}

/// The `--inbound` option that turns on the PROXY protocol v2 header to the app.
pub const PROXY_V2: &str = "proxy-v2";

/// An upstream the app reaches through a local plaintext listener.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Outbound {
    pub local: SocketAddr,
    /// `host:port` of the peer sidecar's inbound listener.
    pub remote: String,
    pub expected: SpiffeId,
    pub protocol: Protocol,
}

/// Credential files.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FileCreds {
    pub cert: PathBuf,
    pub key: PathBuf,
    pub bundle: PathBuf,
}

/// Limits on everything a peer controls.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    pub handshake_timeout: Duration,
    pub idle_timeout: Duration,
    pub max_connections: usize,
    /// Most inbound connections one peer (an authenticated identity at one address) may hold on a
    /// listener (at most `max_connections`): a workload with a valid certificate cannot take every
    /// slot.
    pub max_connections_per_peer: usize,
    /// Most of those connections one peer may hold speaking h2 (`--max-h2-connections-per-peer`;
    /// HTTP/1.1 and TCP ones count only against `max_connections_per_peer`). An h2 connection
    /// costs far more than an HTTP/1.1 one: what the peer sends ahead of the app (the connection
    /// window) and the answers held for it on each of its streams (see `crate::http`). A meshid
    /// outbound opens at most `max_upstream_h2_connections` (4) to an upstream per outbound
    /// listener, twice that for a moment while renewed certificates replace them.
    pub max_h2_connections_per_peer: usize,
    pub max_header_bytes: usize,
    pub request_timeout: Duration,
    pub connect_timeout: Duration,
    pub grace: Duration,
    /// Close inbound connections when the peer's certificate expires.
    pub cap_connection_age: bool,
    /// How often an outbound h2 connection to an upstream sidecar is pinged (30 s; no flag). One
    /// whose answer takes longer than a third of this is closed, so a peer that vanished without a
    /// FIN or RST stops holding requests until their timeout. A pooled HTTP/1.1 connection to an
    /// upstream idle for longer than this is not used again (`outbound::h1`).
    pub upstream_ping: Duration,
    /// Most pooled HTTP/1.1 connections to one upstream carrying an exchange at once
    /// (`--max-upstream-http1-connections`); past it requests go over h2. A response the app does
    /// not read holds its connection, and the upstream caps our connections (its
    /// `max_connections_per_peer`).
    pub max_upstream_http1_connections: usize,
    /// Most h2 connections to one upstream (`--max-upstream-h2-connections`): another is opened
    /// when every earlier one has all its streams in use (`outbound::upstream::MAX_STREAMS`, or
    /// fewer if the upstream allows fewer); past them a request is answered 503 at once.
    pub max_upstream_h2_connections: usize,
    /// Most HTTP/1.1 connections to one inbound's app carrying a peer's request at once
    /// (`--max-app-connections`); past it a request is answered 503 at once. A response the peer
    /// does not take (an h2 stream window of zero) holds its app connection, and without a cap a
    /// peer could make the sidecar open app connections until loopback's ephemeral ports ran out.
    /// Once half of them carry requests, one peer identity's requests hold at most a quarter of
    /// them (at least one).
    pub max_app_connections: usize,
    /// Bytes the form bodies read whole to find their `_method` fields may hold together, across
    /// every connection (`--form-body-memory`, 16 MiB): past it such a request is answered 503 at
    /// once (see [`crate::inbound::form_budget`]).
    pub form_body_memory: usize,
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            handshake_timeout: Duration::from_secs(10),
            idle_timeout: Duration::from_secs(300),
            max_connections: 10_000,
            max_connections_per_peer: 1_000,
            // Eight outbound listeners of one pod to this one inbound, each at its 4 h2
            // connections and replacing all of them at once.
            max_h2_connections_per_peer: 64,
            max_header_bytes: 16 * 1024,
            request_timeout: Duration::from_secs(30),
            connect_timeout: Duration::from_secs(5),
            grace: Duration::from_secs(20),
            cap_connection_age: true,
            upstream_ping: Duration::from_secs(30),
            max_upstream_http1_connections: 64,
            max_upstream_h2_connections: 4,
            max_app_connections: 1024,
            form_body_memory: crate::inbound::form_budget::DEFAULT_FORM_BODY_MEMORY,
        }
    }
}

/// Where credentials come from.
#[derive(Debug, Clone)]
pub enum CredSource {
    /// PEM files (`--cert`, `--key`, `--bundle`).
    Files(FileCreds),
    /// The meshid CA (`--ca-addr` ...).
    Ca(CaMode),
}

/// Everything `run` needs, checked.
#[derive(Debug, Clone)]
pub struct RunConfig {
    pub inbound: Vec<Inbound>,
    pub outbound: Vec<Outbound>,
    pub policy: Option<PathBuf>,
    pub admin_listen: SocketAddr,
    /// Where /metrics and /identity are served instead of the admin port (`--stats-listen`).
    pub stats_listen: Option<SocketAddr>,
    /// Readiness fails while the newest policy file is rejected (`--unready-on-policy-error`).
    pub unready_on_policy_error: bool,
    /// `/decisions` and `/observed` answer callers beyond loopback too (`--remote-decisions`).
    pub remote_decisions: bool,
    /// Request, duration and byte metrics carry the peer's SPIFFE ID (`--metrics-peer-identity`).
    pub metrics_peer_identity: bool,
    /// Serve the SPIFFE Workload API to the app on this unix socket (`--workload-api-socket`).
    pub workload_api: Option<PathBuf>,
    pub creds: CredSource,
    /// File mode: the CA to report to (`--report-ca-addr`); its roots come from the bundle file.
    pub report_to: Option<CaEndpoint>,
    pub limits: Limits,
}

/// How the first certificate is obtained.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Bootstrap {
    /// A projected service-account token, re-read at every request (the kubelet rotates it).
    TokenFile(PathBuf),
    /// A one-time join token (first certificate only).
    JoinTokenFile(PathBuf),
}

/// CA mode settings.
#[derive(Debug, Clone)]
pub struct CaMode {
    /// The CA's address; `roots` are the `--ca-bundle` roots its serving certificate chains to.
    pub endpoint: CaEndpoint,
    pub bootstrap: Bootstrap,
    /// Lifetime to ask for (`None`: the CA's default).
    pub ttl: Option<Duration>,
    /// Where the trust bundle last received is kept, and read back at start as more roots to reach
    /// the CA with (`--bundle-cache`; see `creds::bundle_cache`).
    pub bundle_cache: Option<std::path::PathBuf>,
}

/// Where the CA is and how to trust it.
#[derive(Clone, Debug)]
pub struct CaEndpoint {
    /// `host:port`.
    pub addr: String,
    /// The name the CA's certificate must carry; defaults to the host of `addr`.
    pub server_name: Option<String>,
    /// Roots the CA's serving certificate chains to.
    pub roots: Vec<CertificateDer<'static>>,
    /// The issuing intermediates trust under a shared root is pinned to (an imported enterprise
    /// root): under such a root the CA's certificate must come from one of them.
    pub pinned: Vec<CertificateDer<'static>>,
}

impl CaEndpoint {
    /// The host part of `addr` (IPv6 without brackets).
    pub fn host(&self) -> Result<&str, String> {
        let (host, port) = self
            .addr
            .rsplit_once(':')
            .ok_or_else(|| format!("{:?} is not HOST:PORT", self.addr))?;
        if host.is_empty() || port.parse::<u16>().is_err() {
            return Err(format!("{:?} is not HOST:PORT", self.addr));
        }
        Ok(host.trim_start_matches('[').trim_end_matches(']'))
    }
}

pub fn is_host_port(addr: &str) -> bool {
    addr.rsplit_once(':')
        .is_some_and(|(h, p)| !h.is_empty() && p.parse::<u16>().is_ok())
}

pub fn parse_protocol(s: Option<&str>) -> Result<Protocol, String> {
    match s {
        None | Some("tcp") => Ok(Protocol::Tcp),
        Some("http") => Ok(Protocol::Http),
        Some(other) => Err(format!("protocol {other:?} is not tcp or http")),
    }
}

/// Parses `LISTEN=TARGET[,tcp|http][,proxy-v2]`.
pub fn parse_inbound(s: &str, allow_non_local: bool) -> Result<Inbound, String> {
    let (listen, rest) = s
        .split_once('=')
        .ok_or_else(|| format!("{s:?} is not LISTEN=TARGET[,tcp|http][,{PROXY_V2}]"))?;
    let mut parts = rest.split(',');
    let target = parts.next().unwrap_or_default();
    let mut next = parts.next();
    let protocol = match next {
        Some(PROXY_V2) => Protocol::Tcp,
        other => {
            next = parts.next();
            parse_protocol(other)?
        }
    };
    let proxy_protocol = match next {
        None => false,
        Some(PROXY_V2) if protocol == Protocol::Tcp => true,
        Some(PROXY_V2) => {
            return Err(format!(
                "{s:?}: {PROXY_V2} is for tcp listeners (an HTTP app learns its caller from \
                 x-forwarded-client-cert)"
            ));
        }
        Some(other) => return Err(format!("{s:?}: {other:?} is not {PROXY_V2}")),
    };
    if parts.next().is_some() {
        return Err(format!("{s:?} has too many fields"));
    }
    let listen: SocketAddr = listen
        .parse()
        .map_err(|_| format!("listen address {listen:?} is not IP:PORT"))?;
    let target: SocketAddr = target
        .parse()
        .map_err(|_| format!("target {target:?} is not IP:PORT"))?;
    if !target.ip().is_loopback() && !allow_non_local {
        return Err(format!(
            "target {target} is not loopback (the app must listen on localhost; \
             --dangerous-allow-non-local-target overrides)"
        ));
    }
    if listen.port() == 0 || target.port() == 0 {
        return Err(format!("{s:?}: port 0 is not allowed"));
    }
    Ok(Inbound {
        listen,
        target,
        protocol,
        proxy_protocol,
    })
}

/// Parses `LOCAL=REMOTE,SPIFFE_ID[,tcp|http]`.
pub fn parse_outbound(s: &str, allow_non_local: bool) -> Result<Outbound, String> {
    let (local, rest) = s
        .split_once('=')
        .ok_or_else(|| format!("{s:?} is not LOCAL=REMOTE,SPIFFE_ID[,tcp|http]"))?;
    let mut parts = rest.split(',');
    let remote = parts.next().unwrap_or_default();
    let id = parts
        .next()
        .ok_or_else(|| format!("{s:?} has no expected SPIFFE ID"))?;
    let protocol = parse_protocol(parts.next())?;
    if parts.next().is_some() {
        return Err(format!("{s:?} has too many fields"));
    }
    let local: SocketAddr = local
        .parse()
        .map_err(|_| format!("local address {local:?} is not IP:PORT"))?;
    if !local.ip().is_loopback() && !allow_non_local {
        return Err(format!(
            "local address {local} is not loopback (anyone who reaches it would borrow this \
             workload's identity)"
        ));
    }
    let (host, port) = remote
        .rsplit_once(':')
        .ok_or_else(|| format!("remote {remote:?} is not HOST:PORT"))?;
    if host.is_empty() || port.parse::<u16>().map(|p| p == 0).unwrap_or(true) {
        return Err(format!("remote {remote:?} is not HOST:PORT"));
    }
    let expected = SpiffeId::parse(id).map_err(|e| format!("expected id {id:?}: {e}"))?;
    Ok(Outbound {
        local,
        remote: remote.to_owned(),
        expected,
        protocol,
    })
}

/// Roots from PEM text (`--ca-bundle-pem`): only CERTIFICATE blocks, at least one, each X.509.
pub fn roots_from_pem(
    pem: &str,
) -> Result<Vec<rustls::pki_types::CertificateDer<'static>>, String> {
    use rustls::pki_types::CertificateDer;
    use rustls::pki_types::pem::PemObject;
    use x509_parser::prelude::FromDer;
    if pem.matches("-----BEGIN ").count() != pem.matches("-----BEGIN CERTIFICATE-----").count() {
        return Err("holds a PEM block that is not a CERTIFICATE".into());
    }
    let roots = CertificateDer::pem_slice_iter(pem.as_bytes())
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| format!("not PEM certificates: {e}"))?;
    if roots.is_empty() {
        return Err("no PEM certificate in the value".into());
    }
    for (i, root) in roots.iter().enumerate() {
        x509_parser::certificate::X509Certificate::from_der(root)
            .map_err(|e| format!("certificate {} is not X.509: {e}", i + 1))?;
    }
    Ok(roots)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn inbound_and_outbound_syntax() {
        let i = parse_inbound("0.0.0.0:15443=127.0.0.1:8080,http", false).unwrap();
        assert_eq!(i.listen.port(), 15443);
        assert_eq!(i.protocol, Protocol::Http);
        assert_eq!(
            parse_inbound("127.0.0.1:1=127.0.0.1:2", false)
                .unwrap()
                .protocol,
            Protocol::Tcp
        );
        assert!(parse_inbound("0.0.0.0:1=10.0.0.1:2", false).is_err());
        assert!(parse_inbound("0.0.0.0:1=10.0.0.1:2", true).is_ok());
        for bad in [
            "x",
            "0.0.0.0:1=",
            "0.0.0.0:1=127.0.0.1:2,udp",
            "a=b",
            "0.0.0.0:1=127.0.0.1:2,http,x",
            "0.0.0.0:1=127.0.0.1:2,http,proxy-v2",
            "0.0.0.0:1=127.0.0.1:2,tcp,proxy-v1",
            "0.0.0.0:1=127.0.0.1:2,tcp,proxy-v2,x",
            "0.0.0.0:1=127.0.0.1:2,proxy-v2,tcp",
        ] {
            assert!(parse_inbound(bad, false).is_err(), "{bad}");
        }
        for (spec, proxy) in [
            ("127.0.0.1:1=127.0.0.1:2", false),
            ("127.0.0.1:1=127.0.0.1:2,tcp", false),
            ("127.0.0.1:1=127.0.0.1:2,tcp,proxy-v2", true),
            ("127.0.0.1:1=127.0.0.1:2,proxy-v2", true),
        ] {
            let i = parse_inbound(spec, false).unwrap();
            assert_eq!(
                (i.protocol, i.proxy_protocol),
                (Protocol::Tcp, proxy),
                "{spec}"
            );
        }
        let o = parse_outbound(
            "127.0.0.1:9001=payments.shop.svc:15443,spiffe://cluster.local/ns/shop/sa/payments,http",
            false,
        )
        .unwrap();
        assert_eq!(o.remote, "payments.shop.svc:15443");
        assert_eq!(o.protocol, Protocol::Http);
        for bad in [
            "127.0.0.1:9001=host:1",
            "127.0.0.1:9001=host,spiffe://td/a",
            "127.0.0.1:9001=host:1,spiffe://td/../a",
            "0.0.0.0:9001=host:1,spiffe://td/a",
            "127.0.0.1:9001=:1,spiffe://td/a",
        ] {
            assert!(parse_outbound(bad, false).is_err(), "{bad}");
        }
    }
}
