//! Fetching the service-account issuer's keys from the cluster itself (`--jwks-url`,
//! `--jwks-discovery`): one HTTPS GET per refresh, authenticated with the pod's own service-account
//! token (re-read at every fetch: the kubelet rotates it) and verifying the server against the
//! cluster CA bundle (re-read too). Timeouts on connect and on the whole exchange, a cap on the body.
//! Nothing the server sends can make this panic: every answer is an `Ok` body or a [`FetchError`].

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use http::header::{ACCEPT, AUTHORIZATION, CONNECTION, CONTENT_TYPE, HOST, HeaderValue};
use http_body_util::{BodyExt, Full, Limited};
use hyper::body::Bytes;
use hyper_util::rt::TokioIo;
use rustls_pki_types::ServerName;
use rustls_pki_types::pem::PemObject;
use tokio::net::TcpStream;

/// Where `--jwks-discovery` fetches the keys: the API server's own JWKS endpoint.
pub const DEFAULT_JWKS_URL: &str = "https://kubernetes.default.svc/openid/v1/jwks";
/// The pod's service-account token, as the kubelet mounts it.
pub const DEFAULT_TOKEN_FILE: &str = "/var/run/secrets/kubernetes.io/serviceaccount/token";
/// The cluster CA bundle, as the kubelet mounts it.
pub const DEFAULT_CA_FILE: &str = "/var/run/secrets/kubernetes.io/serviceaccount/ca.crt";
/// The OIDC discovery document's path: a URL ending in it is read for its `jwks_uri`.
pub const DISCOVERY_PATH: &str = "/.well-known/openid-configuration";
/// The largest body read (a JWKS is a few KiB).
pub const MAX_BODY: usize = 1 << 20;

/// How the CA fetches the issuer's keys.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RemoteJwks {
    /// `https://host[:port]/path`: a JWKS, or an OIDC discovery document (path
    /// [`DISCOVERY_PATH`]) whose `jwks_uri` (same host and port) is then fetched.
    pub url: String,
    /// Bearer token sent with every request, re-read at every fetch.
    pub token_file: PathBuf,
    /// PEM bundle the server's certificate must chain to, re-read at every fetch.
    pub ca_file: PathBuf,
    /// How often the keys are fetched.
    pub refresh_every: Duration,
    /// The least time between two refreshes forced by tokens naming an unknown `kid`.
    pub min_forced_interval: Duration,
    /// Time allowed to open the TCP connection.
    pub connect_timeout: Duration,
    /// Time allowed for one whole fetch (connect, TLS, request, body; both documents).
    pub request_timeout: Duration,
}

impl RemoteJwks {
    /// `url` with the defaults of `meshid-ca serve`.
    pub fn new(url: impl Into<String>) -> Self {
        Self {
            url: url.into(),
            token_file: DEFAULT_TOKEN_FILE.into(),
            ca_file: DEFAULT_CA_FILE.into(),
            refresh_every: Duration::from_secs(300),
            min_forced_interval: Duration::from_secs(15),
            connect_timeout: Duration::from_secs(5),
            request_timeout: Duration::from_secs(15),
        }
    }
}

/// Why a fetch brought no usable body. The message never holds the token.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct FetchError(pub String);

/// A checked `https://` URL.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Target {
    /// Host name or IP (without brackets), for DNS and for the server name.
    pub host: String,
    pub port: u16,
    /// `host[:port]` as written, for the `Host` header.
    pub authority: String,
    pub path: String,
}

impl Target {
    /// Parses and checks an `https://host[:port]/path` URL (no user info, no fragment).
    pub fn parse(url: &str) -> Result<Self, String> {
        let uri: http::Uri = url.parse().map_err(|_| format!("{url:?} is not a URL"))?;
        if uri.scheme_str() != Some("https") {
            return Err(format!("{url:?} is not an https:// URL"));
        }
        let authority = uri
            .authority()
            .ok_or_else(|| format!("{url:?} has no host"))?;
        if authority.as_str().contains('@') {
            return Err(format!("{url:?}: user info is not allowed"));
        }
        let host = authority
            .host()
            .trim_start_matches('[')
            .trim_end_matches(']')
            .to_owned();
        if host.is_empty() || ServerName::try_from(host.clone()).is_err() {
            return Err(format!("{url:?}: {host:?} is not a DNS name or IP"));
        }
        let path = uri.path_and_query().map_or("/", |p| p.as_str()).to_owned();
        Ok(Self {
            host,
            port: authority.port_u16().unwrap_or(443),
            authority: authority.as_str().to_owned(),
            path: if path.is_empty() { "/".into() } else { path },
        })
    }

    /// Whether the URL is an OpenID discovery document: its path (the query aside) ends in
    /// `/.well-known/openid-configuration`, at the root or under an issuer's own path (EKS-style
    /// issuers have one), as the README and the chart say.
    fn is_discovery(&self) -> bool {
        let path = self.path.split('?').next().unwrap_or_default();
        path.ends_with(DISCOVERY_PATH)
    }
}

/// Fetches the JWKS body `config` points at (through the discovery document when the URL is one).
pub async fn fetch(config: &RemoteJwks) -> Result<Bytes, FetchError> {
    tokio::time::timeout(config.request_timeout, fetch_inner(config))
        .await
        .map_err(|_| {
            FetchError(format!(
                "no complete answer within {:?}",
                config.request_timeout
            ))
        })?
}

/// Fetches the one document at `config.url` as it is (a discovery document is not followed): the
/// same token, CA bundle, timeouts and body cap as [`fetch`]. `meshid-ca check` reads the API
/// server's objects with it.
pub async fn fetch_document(config: &RemoteJwks) -> Result<Bytes, FetchError> {
    one_exchange(config, None).await
}

/// POSTs the JSON `body` to `config.url` (the token review): the same token, CA bundle, timeouts
/// and body cap as [`fetch`]; the answer's body when the server answered 200 or 201.
pub async fn post_json(config: &RemoteJwks, body: Bytes) -> Result<Bytes, FetchError> {
    one_exchange(config, Some(body)).await
}

/// One GET (`body`: `None`) or JSON POST to `config.url`, within its request timeout.
async fn one_exchange(config: &RemoteJwks, body: Option<Bytes>) -> Result<Bytes, FetchError> {
    tokio::time::timeout(config.request_timeout, async {
        let target = Target::parse(&config.url).map_err(FetchError)?;
        let tls = Arc::new(client_config(config)?);
        let token = read_token(config)?;
        exchange(&target, &tls, &token, config, body).await
    })
    .await
    .map_err(|_| {
        FetchError(format!(
            "{}: no complete answer within {:?}",
            config.url, config.request_timeout
        ))
    })?
}

async fn fetch_inner(config: &RemoteJwks) -> Result<Bytes, FetchError> {
    let target = Target::parse(&config.url).map_err(FetchError)?;
    let tls = Arc::new(client_config(config)?);
    let token = read_token(config)?;
    if !target.is_discovery() {
        return get(&target, &tls, &token, config).await;
    }
    let document = get(&target, &tls, &token, config).await?;
    #[derive(serde::Deserialize)]
    struct Discovery {
        jwks_uri: String,
    }
    let discovery: Discovery = serde_json::from_slice(&document).map_err(|_| {
        FetchError(format!(
            "{}: not an OIDC discovery document with a jwks_uri",
            config.url
        ))
    })?;
    let jwks = Target::parse(&discovery.jwks_uri)
        .map_err(|e| FetchError(format!("{}: jwks_uri: {e}", config.url)))?;
    // The token and the cluster CA are for this server only.
    if (jwks.host.as_str(), jwks.port) != (target.host.as_str(), target.port) {
        return Err(FetchError(format!(
            "{}: jwks_uri {:?} is on another host; point --jwks-url at a JWKS this CA can reach \
             with its token and CA bundle",
            config.url, discovery.jwks_uri
        )));
    }
    get(&jwks, &tls, &token, config).await
}

fn client_config(config: &RemoteJwks) -> Result<rustls::ClientConfig, FetchError> {
    let bad = |what: String| {
        FetchError(format!(
            "--jwks-ca-file {}: {what}",
            config.ca_file.display()
        ))
    };
    let pem = std::fs::read(&config.ca_file).map_err(|e| bad(e.to_string()))?;
    let mut store = rustls::RootCertStore::empty();
    for cert in rustls_pki_types::CertificateDer::pem_slice_iter(&pem) {
        let cert = cert.map_err(|e| bad(format!("not PEM certificates: {e}")))?;
        store
            .add(cert)
            .map_err(|e| bad(format!("unusable certificate: {e}")))?;
    }
    if store.is_empty() {
        return Err(bad("holds no certificate".into()));
    }
    let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
    let mut tls = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| FetchError(format!("TLS setup: {e}")))?
        .with_root_certificates(store)
        .with_no_client_auth();
    tls.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok(tls)
}

fn read_token(config: &RemoteJwks) -> Result<HeaderValue, FetchError> {
    let bad = |what: &str| {
        FetchError(format!(
            "--jwks-token-file {}: {what}",
            config.token_file.display()
        ))
    };
    let raw = std::fs::read_to_string(&config.token_file).map_err(|e| bad(&e.to_string()))?;
    let token = raw.trim();
    if token.is_empty() {
        return Err(bad("is empty"));
    }
    let mut value = HeaderValue::from_str(&format!("Bearer {token}"))
        .map_err(|_| bad("holds characters a header cannot carry"))?;
    value.set_sensitive(true);
    Ok(value)
}

async fn get(
    target: &Target,
    tls: &Arc<rustls::ClientConfig>,
    token: &HeaderValue,
    config: &RemoteJwks,
) -> Result<Bytes, FetchError> {
    exchange(target, tls, token, config, None).await
}

/// A GET (`body`: `None`) or a JSON POST of `body` to `target`: the answer's body when its status
/// is 200 (or, for a POST, 201).
async fn exchange(
    target: &Target,
    tls: &Arc<rustls::ClientConfig>,
    token: &HeaderValue,
    config: &RemoteJwks,
    body: Option<Bytes>,
) -> Result<Bytes, FetchError> {
    let url = format!("https://{}{}", target.authority, target.path);
    let fail = |what: String| FetchError(format!("{url}: {what}"));
    let tcp = tokio::time::timeout(
        config.connect_timeout,
        TcpStream::connect((target.host.as_str(), target.port)),
    )
    .await
    .map_err(|_| fail(format!("no connection within {:?}", config.connect_timeout)))?
    .map_err(|e| fail(format!("cannot connect: {e}")))?;
    let _ = tcp.set_nodelay(true);
    let name =
        ServerName::try_from(target.host.clone()).map_err(|_| fail("bad server name".into()))?;
    let stream = tokio_rustls::TlsConnector::from(tls.clone())
        .connect(name, tcp)
        .await
        .map_err(|e| fail(format!("TLS: {e}")))?;
    let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
        .await
        .map_err(|e| fail(format!("HTTP: {e}")))?;
    // Ended with this fetch however it ends (the caller's timeout drops this future).
    let _conn = meshid_runtime::http_client::AbortOnDrop(tokio::spawn(conn));
    async {
        let posting = body.is_some();
        let mut request = http::Request::builder()
            .method(if posting {
                http::Method::POST
            } else {
                http::Method::GET
            })
            .uri(target.path.as_str())
            .header(HOST, target.authority.as_str())
            .header(AUTHORIZATION, token.clone())
            .header(ACCEPT, "application/json")
            .header(CONNECTION, "close");
        if posting {
            request = request.header(CONTENT_TYPE, "application/json");
        }
        let request = request
            .body(Full::new(body.unwrap_or_default()))
            .map_err(|e| fail(format!("request: {e}")))?;
        let response = sender
            .send_request(request)
            .await
            .map_err(|e| fail(format!("HTTP: {e}")))?;
        let status = response.status();
        if status != http::StatusCode::OK && !(posting && status == http::StatusCode::CREATED) {
            return Err(fail(format!("answered {status}")));
        }
        let body = Limited::new(response.into_body(), MAX_BODY)
            .collect()
            .await
            .map_err(|e| {
                if e.is::<http_body_util::LengthLimitError>() {
                    fail(format!("body larger than {MAX_BODY} bytes"))
                } else {
                    fail(format!("reading the body: {e}"))
                }
            })?;
        Ok(body.to_bytes())
    }
    .await
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn urls_are_checked() {
        let t = Target::parse("https://kubernetes.default.svc/openid/v1/jwks").unwrap();
        assert_eq!(
            (t.host.as_str(), t.port, t.path.as_str()),
            ("kubernetes.default.svc", 443, "/openid/v1/jwks")
        );
        let t = Target::parse("https://[::1]:6443/.well-known/openid-configuration").unwrap();
        assert_eq!(
            (t.host.as_str(), t.port, t.authority.as_str()),
            ("::1", 6443, "[::1]:6443")
        );
        assert!(t.is_discovery());
        for discovery in [
            "https://host/id/ABC123/.well-known/openid-configuration",
            "https://host/.well-known/openid-configuration?x=1",
        ] {
            assert!(
                Target::parse(discovery).unwrap().is_discovery(),
                "{discovery}"
            );
        }
        for jwks in [
            "https://host/openid/v1/jwks",
            "https://host/.well-known/openid-configuration/keys",
            "https://host/jwks?next=/.well-known/openid-configuration",
        ] {
            assert!(!Target::parse(jwks).unwrap().is_discovery(), "{jwks}");
        }
        for bad in [
            "http://kubernetes.default.svc/openid/v1/jwks",
            "kubernetes.default.svc",
            "https://user:pw@host/jwks",
            "https:///jwks",
            "",
        ] {
            assert!(Target::parse(bad).is_err(), "{bad}");
        }
    }
}
