//! Kubernetes pod annotations as sidecar configuration: the `meshid.io/*` annotations a service
//! owner writes, and the downward-API file (`key="value"` lines) in which the kubelet publishes them
//! to the pod, updated in place when someone runs `kubectl annotate`.
//!
//! ```text
//! meshid.io/inject: "enabled"
//! meshid.io/inbound: "8080=http,9000=tcp"          # ports the sidecar takes on the pod IP
//! meshid.io/allow-8080: "spiffe://cluster.local/ns/shop/sa/frontend, spiffe://cluster.local/ns/ops/sa/*"
//! meshid.io/outbound: "9001=payments.shop.svc:8080,spiffe://cluster.local/ns/shop/sa/payments,http"
//! meshid.io/mode: "audit"                           # or enforce (default)
//! meshid.io/proxy-protocol: "9000"                  # tcp ports whose app gets a PROXY v2 header
//! meshid.io/workload-api: "enabled"                 # the SPIFFE Workload API for the app containers
//! ```
//!
//! Pure: the webhook uses the same parser to refuse a pod whose annotations do not parse, so a pod
//! is never started with a sidecar that would refuse its configuration.

use std::collections::BTreeMap;
use std::fmt;
use std::net::{IpAddr, SocketAddr};

use crate::SpiffeId;

use crate::policy::{Policy, PolicyError, Protocol, check_id_pattern};

mod downward;
mod probes;

pub use downward::{DownwardApiError, quote, to_downward_api};
pub use probes::AppProbe;

/// Reads the downward-API annotations file's text into its annotations.
pub fn parse_downward_api(text: &str) -> Result<BTreeMap<String, String>, AnnotationError> {
    downward::parse_downward_api(text).map_err(|e| AnnotationError {
        annotation: "(downward-API file)".to_owned(),
        problem: e.why,
        line: Some(e.line),
    })
}

/// The 1-based line of each annotation in a downward-API file's text.
pub fn annotation_lines(text: &str) -> BTreeMap<String, usize> {
    downward::key_lines(text)
}

/// The app probe recorded for `CONTAINER/KIND` (e.g. `app/readiness`) in [`APP_PROBES`].
pub fn app_probe(annotations: &BTreeMap<String, String>, key: &str) -> Option<AppProbe> {
    probes::probe_in(annotations.get(APP_PROBES)?, key)
}

/// Annotation prefix shared by every meshid annotation.
pub const PREFIX: &str = "meshid.io/";
/// `enabled` asks for a sidecar (on the pod or its namespace).
pub const INJECT: &str = "meshid.io/inject";
/// Inbound ports: `PORT=PROTOCOL` separated by commas.
pub const INBOUND: &str = "meshid.io/inbound";
/// Upstreams: `LOCAL_PORT=HOST:PORT,SPIFFE_ID[,tcp|http]` separated by `;` or newlines.
pub const OUTBOUND: &str = "meshid.io/outbound";
/// `enforce` (default) or `audit`.
pub const MODE: &str = "meshid.io/mode";
/// Allowed peers of one inbound port: `meshid.io/allow-<port>`.
pub const ALLOW_PREFIX: &str = "meshid.io/allow-";
/// Inbound TCP ports (comma-separated) whose app is sent a PROXY protocol v2 header first: the
/// peer's address and its verified SPIFFE ID.
pub const PROXY_PROTOCOL: &str = "meshid.io/proxy-protocol";
/// `enabled` gives the app containers the SPIFFE Workload API (a socket on a shared volume and
/// `SPIFFE_ENDPOINT_SOCKET`); `disabled` (the default) does not.
pub const WORKLOAD_API: &str = "meshid.io/workload-api";
/// Set by the injector on pods it has changed.
pub const INJECTED: &str = "meshid.io/injected";
/// Set by the injector: the app's HTTP probes it moved to the sidecar's admin port, as JSON
/// `{"CONTAINER/KIND": {"port": 8080, "path": "/ready", "scheme": "HTTP", "httpHeaders": [...]}}`.
pub const APP_PROBES: &str = "meshid.io/app-probes";

/// Every `meshid.io/*` name there is, `meshid.io/allow-<port>` aside.
pub const NAMES: [&str; 8] = [
    INJECT,
    INBOUND,
    OUTBOUND,
    MODE,
    PROXY_PROTOCOL,
    WORKLOAD_API,
    INJECTED,
    APP_PROBES,
];

/// Whether `name` (any annotation's) is under [`PREFIX`] but no meshid annotation: a misspelt one
/// (`meshid.io/inbond`), which the readers would pass over as if it were not there.
pub fn is_unknown(name: &str) -> bool {
    name.starts_with(PREFIX) && !name.starts_with(ALLOW_PREFIX) && !NAMES.contains(&name)
}

/// One problem with one annotation.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{}annotation {annotation}: {problem}", line.map(|n| format!("line {n}: ")).unwrap_or_default())]
pub struct AnnotationError {
    pub annotation: String,
    pub problem: String,
    /// The annotation's line in a downward-API file, when read from one.
    pub line: Option<usize>,
}

fn problem(annotation: &str, problem: impl Into<String>) -> AnnotationError {
    AnnotationError {
        annotation: annotation.to_owned(),
        problem: problem.into(),
        line: None,
    }
}

/// An inbound port the sidecar serves on the pod IP, forwarding to `127.0.0.1:<port>`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct InboundPort {
    pub port: u16,
    pub protocol: Protocol,
    /// Named in [`PROXY_PROTOCOL`]: the app gets a PROXY protocol v2 header first.
    pub proxy_protocol: bool,
}

/// An upstream: the app calls `127.0.0.1:<local_port>`, the sidecar calls `remote` with mTLS.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Upstream {
    pub local_port: u16,
    pub remote: String,
    pub expected: SpiffeId,
    pub protocol: Protocol,
}

/// The meshid configuration a pod's annotations declare, fully checked.
#[derive(Debug, Clone)]
pub struct MeshAnnotations {
    pub inbound: Vec<InboundPort>,
    pub outbound: Vec<Upstream>,
    pub audit: bool,
    /// [`WORKLOAD_API`] is `enabled`.
    pub workload_api: bool,
    /// Allowed SPIFFE ID patterns per inbound port (a port without `allow-<port>` denies everyone).
    pub allow: BTreeMap<u16, Vec<String>>,
    policy: Policy,
}

impl MeshAnnotations {
    /// Reads the `meshid.io/*` annotations of a pod; every problem is reported, each naming its
    /// annotation. Other annotations are ignored.
    pub fn from_map(annotations: &BTreeMap<String, String>) -> Result<Self, Vec<AnnotationError>> {
        let mut problems = Vec::new();
        let mut inbound = match annotations.get(INBOUND) {
            Some(v) => parse_inbound_ports(v).unwrap_or_else(|e| {
                problems.push(problem(INBOUND, e));
                Vec::new()
            }),
            None => Vec::new(),
        };
        if let Some(v) = annotations.get(PROXY_PROTOCOL) {
            if split_list(v).nth(MAX_LIST_ITEMS).is_some() {
                problems.push(problem(PROXY_PROTOCOL, too_many(PROXY_PROTOCOL)));
            }
            for item in split_list(v).take(MAX_LIST_ITEMS) {
                let port = match parse_port(item) {
                    Ok(port) => port,
                    Err(e) => {
                        problems.push(problem(PROXY_PROTOCOL, e));
                        continue;
                    }
                };
                match inbound.iter_mut().find(|i| i.port == port) {
                    Some(i) if i.protocol == Protocol::Tcp => i.proxy_protocol = true,
                    Some(_) => problems.push(problem(
                        PROXY_PROTOCOL,
                        format!(
                            "port {port} is http in {INBOUND}: the PROXY header is for tcp ports \
                             (an HTTP app learns its caller from x-forwarded-client-cert)"
                        ),
                    )),
                    None => problems.push(problem(
                        PROXY_PROTOCOL,
                        format!("port {port} is not declared in {INBOUND}"),
                    )),
                }
            }
        }
        let outbound = match annotations.get(OUTBOUND) {
            Some(v) => parse_upstreams(v).unwrap_or_else(|e| {
                problems.push(problem(OUTBOUND, e));
                Vec::new()
            }),
            None => Vec::new(),
        };
        let audit = match annotations.get(MODE).map(|m| m.trim()) {
            None | Some("enforce") => false,
            Some("audit") => true,
            Some(other) => {
                problems.push(problem(MODE, format!("{other:?} is not enforce or audit")));
                false
            }
        };
        let workload_api = match annotations.get(WORKLOAD_API).map(|m| m.trim()) {
            None | Some("disabled") => false,
            Some("enabled") => true,
            Some(other) => {
                problems.push(problem(
                    WORKLOAD_API,
                    format!("{other:?} is not enabled or disabled"),
                ));
                false
            }
        };
        let mut allow = BTreeMap::new();
        for (key, value) in annotations.range(ALLOW_PREFIX.to_owned()..) {
            let Some(port) = key.strip_prefix(ALLOW_PREFIX) else {
                break;
            };
            // Written as a port is (`allow-08080` is refused: beside `allow-8080`, one of the two
            // lists would silently be lost).
            let port = match port.parse::<u16>() {
                Ok(p) if p != 0 && p.to_string() == port => p,
                _ => {
                    problems.push(problem(key, format!("{port:?} is not a port number")));
                    continue;
                }
            };
            if !inbound.iter().any(|i| i.port == port) {
                problems.push(problem(
                    key,
                    format!("port {port} is not declared in {INBOUND}"),
                ));
                continue;
            }
            let ids: Vec<String> = split_list(value).map(str::to_owned).collect();
            // Each pattern is checked alone, so that every bad one is named with its annotation.
            let bad: Vec<String> = ids
                .iter()
                .filter_map(|id| check_id_pattern(id).err())
                .collect();
            if !bad.is_empty() {
                problems.extend(bad.into_iter().map(|why| problem(key, why)));
                continue;
            }
            allow.insert(port, ids);
        }
        for o in &outbound {
            if inbound.iter().any(|i| i.port == o.local_port) {
                problems.push(problem(
                    OUTBOUND,
                    format!("port {} is also an inbound port in {INBOUND}", o.local_port),
                ));
            }
        }
        if !problems.is_empty() {
            return Err(problems);
        }
        let lists: Vec<(u16, &Vec<String>)> = allow.iter().map(|(p, ids)| (*p, ids)).collect();
        // The authority: the same parser as a policy file (the checks above name annotations).
        let policy = Policy::parse(&policy_json(audit, &inbound, &lists))
            .map_err(|e| {
                e.problems()
                    .into_iter()
                    .map(|e| problem(PREFIX, policy_problem(e)))
                    .collect::<Vec<_>>()
            })?
            .without_locations();
        Ok(Self {
            inbound,
            outbound,
            audit,
            workload_api,
            allow,
            policy,
        })
    }

    /// Reads the downward-API annotations file's text; each problem has its annotation's line.
    pub fn from_downward_api(text: &str) -> Result<Self, Vec<AnnotationError>> {
        let map = parse_downward_api(text).map_err(|e| vec![e])?;
        Self::from_map(&map).map_err(|mut problems| {
            let lines = downward::key_lines(text);
            for p in &mut problems {
                p.line = lines.get(&p.annotation).copied();
            }
            problems
        })
    }

    /// The allow-list these annotations declare.
    pub fn policy(&self) -> &Policy {
        &self.policy
    }

    /// `--inbound` values: `POD_IP:PORT=127.0.0.1:PORT,PROTOCOL[,proxy-v2]`.
    pub fn inbound_args(&self, pod_ip: IpAddr) -> Vec<String> {
        self.inbound
            .iter()
            .map(|i| {
                let listen = SocketAddr::new(pod_ip, i.port);
                let proxy = if i.proxy_protocol { ",proxy-v2" } else { "" };
                format!(
                    "{listen}=127.0.0.1:{},{}{proxy}",
                    i.port,
                    i.protocol.as_str()
                )
            })
            .collect()
    }

    /// `--outbound` values: `127.0.0.1:LOCAL=REMOTE,SPIFFE_ID,PROTOCOL`.
    pub fn outbound_args(&self) -> Vec<String> {
        self.outbound
            .iter()
            .map(|o| {
                format!(
                    "127.0.0.1:{}={},{},{}",
                    o.local_port,
                    o.remote,
                    o.expected.as_str(),
                    o.protocol.as_str()
                )
            })
            .collect()
    }
}

/// The policy in a downward-API annotations file: the parse function the sidecar's policy watcher
/// uses for `--annotations`.
/// Each problem is a [`PolicyError::Invalid`] of field `annotations` (several make a
/// [`PolicyError::Several`]), its message naming the annotation and its line.
pub fn policy_from_downward_api(text: &str) -> Result<Policy, PolicyError> {
    MeshAnnotations::from_downward_api(text)
        .map(|a| a.policy)
        .map_err(|problems| {
            let mut errors: Vec<PolicyError> = problems
                .iter()
                .map(|p| PolicyError::Invalid {
                    field: "annotations".to_owned(),
                    message: p.to_string(),
                })
                .collect();
            match errors.len() {
                1 => errors.remove(0),
                _ => PolicyError::Several(errors),
            }
        })
}

/// The sidecar's policy file parser: a downward-API annotations file (what `--annotations` points
/// to: `key="value"` lines) is read with [`policy_from_downward_api`], anything else is a policy
/// document for [`Policy::parse`]. A YAML policy never has a line of the form `key="...`.
pub fn policy_or_annotations(text: &str) -> Result<Policy, PolicyError> {
    if is_downward_api(text) {
        policy_from_downward_api(text)
    } else {
        Policy::parse(text)
    }
}

/// Whether the first non-blank line is `KEY="...` with a Kubernetes annotation key: how
/// [`policy_or_annotations`] tells a downward-API annotations file from a policy document.
pub fn is_downward_api(text: &str) -> bool {
    let Some(line) = text.lines().find(|l| !l.trim().is_empty()) else {
        return false;
    };
    line.split_once("=\"").is_some_and(|(key, _)| {
        !key.is_empty()
            && key
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '/' | '-' | '_'))
    })
}

fn parse_protocol(s: &str) -> Result<Protocol, String> {
    match s.trim() {
        "http" => Ok(Protocol::Http),
        "tcp" => Ok(Protocol::Tcp),
        other => Err(format!("unknown protocol {other:?} (tcp or http)")),
    }
}

fn parse_port(s: &str) -> Result<u16, String> {
    match s.trim().parse::<u16>() {
        Ok(p) if p != 0 => Ok(p),
        _ => Err(format!("{:?} is not a port number (1-65535)", s.trim())),
    }
}

/// Comma- and/or whitespace-separated items, empty ones skipped.
fn split_list(s: &str) -> impl Iterator<Item = &str> {
    s.split(|c: char| c == ',' || c.is_whitespace())
        .filter(|s| !s.is_empty())
}

/// The most items one list annotation may hold (inbound ports, upstreams, PROXY-header ports): a
/// pod serves a handful, and each item is checked against those before it (a list of 45,000
/// ports was 10^9 comparisons in the webhook before the pod was denied).
pub const MAX_LIST_ITEMS: usize = 256;

fn too_many(annotation: &str) -> String {
    format!("more than {MAX_LIST_ITEMS} items in {annotation}")
}

/// `8080=http,9000=tcp` (`=PROTOCOL` may be left out: tcp).
fn parse_inbound_ports(value: &str) -> Result<Vec<InboundPort>, String> {
    let mut ports: Vec<InboundPort> = Vec::new();
    for item in split_list(value) {
        if ports.len() == MAX_LIST_ITEMS {
            return Err(too_many(INBOUND));
        }
        let (port, protocol) = match item.split_once('=') {
            Some((port, protocol)) => (parse_port(port)?, parse_protocol(protocol)?),
            None => (parse_port(item)?, Protocol::Tcp),
        };
        if ports.iter().any(|p| p.port == port) {
            return Err(format!("port {port} is declared twice"));
        }
        ports.push(InboundPort {
            port,
            protocol,
            proxy_protocol: false,
        });
    }
    Ok(ports)
}

/// `LOCAL_PORT=HOST:PORT,SPIFFE_ID[,tcp|http]` entries separated by `;` or newlines.
fn parse_upstreams(value: &str) -> Result<Vec<Upstream>, String> {
    let mut upstreams: Vec<Upstream> = Vec::new();
    for item in value
        .split([';', '\n'])
        .map(str::trim)
        .filter(|s| !s.is_empty())
    {
        if upstreams.len() == MAX_LIST_ITEMS {
            return Err(too_many(OUTBOUND));
        }
        let (local, rest) = item
            .split_once('=')
            .ok_or_else(|| format!("{item:?} is not LOCAL_PORT=HOST:PORT,SPIFFE_ID[,tcp|http]"))?;
        let local_port = parse_port(local)?;
        let fields: Vec<&str> = rest.split(',').map(str::trim).collect();
        let (remote, id, protocol) = match fields.as_slice() {
            [remote, id] => (*remote, *id, Protocol::Tcp),
            [remote, id, protocol] => (*remote, *id, parse_protocol(protocol)?),
            _ => {
                return Err(format!(
                    "{item:?} is not LOCAL_PORT=HOST:PORT,SPIFFE_ID[,tcp|http]"
                ));
            }
        };
        let valid_remote = remote.rsplit_once(':').is_some_and(|(h, p)| {
            !h.is_empty() && !h.contains(['/', ' ']) && parse_port(p).is_ok()
        });
        if !valid_remote {
            return Err(format!("remote {remote:?} is not HOST:PORT"));
        }
        let expected =
            SpiffeId::parse(id).map_err(|e| format!("{id:?} is not a SPIFFE ID: {e}"))?;
        if upstreams.iter().any(|u| u.local_port == local_port) {
            return Err(format!("local port {local_port} is declared twice"));
        }
        upstreams.push(Upstream {
            local_port,
            remote: remote.to_owned(),
            expected,
            protocol,
        });
    }
    Ok(upstreams)
}

/// A policy document as JSON (which is YAML), for [`Policy::parse`].
fn policy_json(audit: bool, inbound: &[InboundPort], allow: &[(u16, &Vec<String>)]) -> String {
    let ports: Vec<serde_json::Value> = inbound
        .iter()
        .map(|i| {
            let ids = allow
                .iter()
                .find(|(p, _)| *p == i.port)
                .map(|(_, ids)| {
                    ids.iter()
                        .map(|id| serde_json::json!({ "id": id }))
                        .collect()
                })
                .unwrap_or_else(Vec::new);
            serde_json::json!({
                "port": i.port,
                "protocol": i.protocol.as_str(),
                "allow": ids,
            })
        })
        .collect();
    serde_json::json!({
        "mode": if audit { "audit" } else { "enforce" },
        "inbound": ports,
    })
    .to_string()
}

/// The policy parser's message without the JSON position (meaningless for an annotation).
fn policy_problem(error: &PolicyError) -> String {
    match error {
        PolicyError::Yaml { message, .. } => message.clone(),
        other => other.to_string(),
    }
}

impl fmt::Display for InboundPort {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}={}", self.port, self.protocol.as_str())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn map(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
        pairs
            .iter()
            .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
            .collect()
    }

    #[test]
    fn good_annotations_make_arguments_and_a_policy() {
        let a = MeshAnnotations::from_map(&map(&[
            (INBOUND, "8080=http, 9000=tcp"),
            (
                "meshid.io/allow-8080",
                "spiffe://cluster.local/ns/shop/sa/frontend, spiffe://cluster.local/ns/ops/sa/*",
            ),
            (
                OUTBOUND,
                "9001=payments.shop.svc:8080,spiffe://cluster.local/ns/shop/sa/payments,http;\n\
                 9002=db.shop.svc:5432,spiffe://cluster.local/ns/shop/sa/db",
            ),
            ("app.kubernetes.io/name", "x"),
        ]))
        .unwrap();
        assert_eq!(
            a.inbound_args("10.1.2.3".parse().unwrap()),
            [
                "10.1.2.3:8080=127.0.0.1:8080,http",
                "10.1.2.3:9000=127.0.0.1:9000,tcp"
            ]
        );
        let proxied = MeshAnnotations::from_map(&map(&[
            (INBOUND, "8080=http, 9000=tcp, 5432"),
            (PROXY_PROTOCOL, "9000, 5432"),
        ]))
        .unwrap();
        assert_eq!(
            proxied.inbound_args("10.1.2.3".parse().unwrap()),
            [
                "10.1.2.3:8080=127.0.0.1:8080,http",
                "10.1.2.3:9000=127.0.0.1:9000,tcp,proxy-v2",
                "10.1.2.3:5432=127.0.0.1:5432,tcp,proxy-v2"
            ]
        );
        assert_eq!(a.outbound_args().len(), 2);
        let peer = SpiffeId::parse("spiffe://cluster.local/ns/ops/sa/metrics").unwrap();
        assert!(a.policy().decide_connection(8080, &peer).allowed);
        assert!(!a.policy().decide_connection(9000, &peer).allowed);
        assert!(
            a.inbound_args("fd00::1".parse().unwrap())[0].starts_with("[fd00::1]:8080="),
            "ipv6"
        );
    }

    #[test]
    fn every_bad_annotation_is_named() {
        let cases = [
            (INBOUND, "8080=http,8080=tcp", "declared twice"),
            (INBOUND, "8080=udp", "unknown protocol"),
            (INBOUND, "80x", "not a port"),
            (
                OUTBOUND,
                "9001=payments:80,spiffe://x/../y",
                "not a SPIFFE ID",
            ),
            (OUTBOUND, "9001=payments,spiffe://td/a", "HOST:PORT"),
            (MODE, "loose", "enforce or audit"),
            ("meshid.io/allow-7000", "spiffe://td/a", "not declared"),
            (PROXY_PROTOCOL, "8080", "for tcp ports"),
            (PROXY_PROTOCOL, "9000", "not declared"),
            (PROXY_PROTOCOL, "x", "not a port"),
            (WORKLOAD_API, "yes", "enabled or disabled"),
            (
                "meshid.io/allow-08080",
                "spiffe://td/a",
                "not a port number",
            ),
            (
                "meshid.io/allow-+8080",
                "spiffe://td/a",
                "not a port number",
            ),
        ];
        for (key, value, needle) in cases {
            let mut m = map(&[(INBOUND, "8080=http")]);
            m.insert(key.to_owned(), value.to_owned());
            let errors = MeshAnnotations::from_map(&m).unwrap_err();
            let text = errors[0].to_string();
            assert!(text.contains(key) && text.contains(needle), "{key}: {text}");
        }
        let mut m = map(&[(INBOUND, "8080=http")]);
        m.insert(
            "meshid.io/allow-8080".into(),
            "spiffe://cluster.local/ns/a/sa/x*".into(),
        );
        let text = MeshAnnotations::from_map(&m).unwrap_err()[0].to_string();
        assert!(
            text.starts_with("annotation meshid.io/allow-8080:"),
            "{text}"
        );
        // Lists of at most MAX_LIST_ITEMS items: a longer one is refused at its first extra item
        // (each item is compared with those before it).
        let ports = |n: usize| (1..=n).map(|p| p.to_string()).collect::<Vec<_>>().join(",");
        let upstreams = |n: usize| {
            (1..=n)
                .map(|p| format!("{p}=svc:80,spiffe://td/a"))
                .collect::<Vec<_>>()
                .join(";")
        };
        assert!(MeshAnnotations::from_map(&map(&[(INBOUND, &ports(MAX_LIST_ITEMS))])).is_ok());
        for (key, value) in [
            (INBOUND, ports(45_000)),
            (OUTBOUND, upstreams(MAX_LIST_ITEMS + 1)),
            (PROXY_PROTOCOL, ports(45_000)),
        ] {
            let mut m = map(&[(INBOUND, "1")]);
            m.insert(key.to_owned(), value);
            let errors = MeshAnnotations::from_map(&m).unwrap_err();
            assert!(
                errors.iter().any(|e| e
                    .to_string()
                    .contains(&format!("more than {MAX_LIST_ITEMS} items in {key}"))),
                "{key}: {errors:?}"
            );
        }
    }

    /// Every problem of a downward-API file, each with its annotation and line; every bad pattern
    /// of an allow list on its own.
    #[test]
    fn every_problem_has_its_line() {
        let text = "meshid.io/allow-8080=\"spiffe://cluster.local/ns/a/sa/x*, spiffe://td/ok, spiffe://*/b\"\n\
                    meshid.io/allow-9999=\"spiffe://td/a\"\n\
                    meshid.io/inbound=\"8080=http\"\n\
                    meshid.io/mode=\"strict\"\n";
        let problems: Vec<String> = MeshAnnotations::from_downward_api(text)
            .unwrap_err()
            .iter()
            .map(ToString::to_string)
            .collect();
        assert_eq!(
            problems,
            [
                "line 4: annotation meshid.io/mode: \"strict\" is not enforce or audit",
                "line 1: annotation meshid.io/allow-8080: \"spiffe://cluster.local/ns/a/sa/x*\": '*' \
                 must be a whole path segment",
                "line 1: annotation meshid.io/allow-8080: \"spiffe://*/b\": '*' is not allowed in \
                 the trust domain",
                "line 2: annotation meshid.io/allow-9999: port 9999 is not declared in \
                 meshid.io/inbound",
            ]
        );
        let error = policy_from_downward_api(text).unwrap_err().to_string();
        assert!(
            error.contains("line 2: annotation meshid.io/allow-9999"),
            "{error}"
        );
        // A policy made from annotations has no positions (they would point into JSON).
        let good =
            "meshid.io/inbound=\"80\"\nmeshid.io/allow-80=\"spiffe://td/a, spiffe://td/a\"\n";
        let policy = policy_from_downward_api(good).unwrap();
        let warnings = policy.warnings(None, None);
        assert_eq!(warnings.len(), 1, "{warnings:?}");
        assert_eq!((warnings[0].rule, warnings[0].location), (Some(1), None));
        assert!(!warnings[0].message.contains("(line"), "{warnings:?}");
    }

    #[test]
    fn app_probes_are_read_back() {
        let m = map(&[(
            APP_PROBES,
            r#"{"app/readiness":{"port":8080,"path":"/ready","httpHeaders":[{"name":"x","value":"1"}]}}"#,
        )]);
        let p = app_probe(&m, "app/readiness").unwrap();
        assert_eq!(
            (p.port, p.path.as_str(), p.scheme.as_str()),
            (8080, "/ready", "HTTP")
        );
        assert_eq!(p.headers, [("x".to_owned(), "1".to_owned())]);
        assert!(app_probe(&m, "app/liveness").is_none());
    }

    #[test]
    fn downward_api_round_trip() {
        let m = map(&[(INBOUND, "8080=http"), ("note", "a \"quoted\"\nline\\ é")]);
        let text = to_downward_api(&m);
        assert_eq!(parse_downward_api(&text).unwrap(), m);
        // As the kubelet writes it (Go %q).
        let kubelet = "a=\"x\\u00e9\\x41\\ty\"\nmeshid.io/inbound=\"8080=http\"\n";
        let parsed = parse_downward_api(kubelet).unwrap();
        assert_eq!(parsed["a"], "xéA\ty");
        assert!(parse_downward_api("a=unquoted\n").is_err());
        assert!(parse_downward_api("a=\"open\n").is_err());
        let policy = policy_from_downward_api(kubelet).unwrap();
        assert_eq!(policy.port_protocol(8080), Some(Protocol::Http));
        assert!(policy_from_downward_api("meshid.io/inbound=\"x\"\n").is_err());
        assert!(policy_or_annotations(kubelet).is_ok());
        assert!(policy_or_annotations("inbound:\n  - port: 1\n    allow: []\n").is_ok());
        let e = policy_or_annotations("meshid.io/inbound=\"8080=udp\"\n").unwrap_err();
        assert!(e.to_string().contains("meshid.io/inbound"), "{e}");
    }
}
