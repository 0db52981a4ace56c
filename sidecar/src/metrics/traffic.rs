//! Request and byte metrics on the data path, where every nanosecond is paid per request.
//!
//! The cost model: label sets and metric handles are resolved once per connection, when its
//! direction, port and (with `--metrics-peer-identity`) peer are known ([`ConnMetrics::new`]: two
//! family lookups, as many as `connections_total` and `connections_open` already cost). Bytes are
//! counted by [`crate::conn::Metered`] with one relaxed atomic add on a pre-resolved counter per
//! read or write system-call-sized chunk (the TLS record or the 16 KiB copy buffer around it costs
//! far more), so a scrape sees live values even on a long WebSocket or TCP stream and nothing needs
//! flushing at close. A request looks its (protocol, status code) handles up in a small per-connection
//! list under an uncontended mutex: a family's hash lookup (which hashes the whole label set and
//! takes the family's shared lock) is paid only by a connection's first request with a new status.
//! The request clock is one monotonic clock read at the request head and one at the response head.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use prometheus_client::encoding::{EncodeLabelSet, LabelSetEncoder};
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::Histogram;

/// `meshid_sidecar_request_duration_seconds` buckets: a proxy's own answers take well under a
/// millisecond, an app's up to the 30 s default request timeout (beyond 10 s: `+Inf`).
const DURATION_BUCKETS: [f64; 14] = [
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
];

/// The `peer` label: the verified peer's SPIFFE ID with `--metrics-peer-identity`, else no label at
/// all (not an empty one), so the series are those of a sidecar without the flag.
#[derive(Clone, Debug, Default, Hash, PartialEq, Eq)]
pub struct PeerLabel(pub Option<Arc<str>>);

impl EncodeLabelSet for PeerLabel {
    fn encode(&self, encoder: &mut LabelSetEncoder) -> Result<(), std::fmt::Error> {
        match &self.0 {
            Some(id) => prometheus_client::encoding::EncodeLabel::encode(
                &("peer", id.as_ref()),
                encoder.encode_label(),
            ),
            None => Ok(()),
        }
    }
}

/// How a request reached the sidecar.
#[derive(Clone, Copy, Debug, Hash, PartialEq, Eq)]
pub enum HttpProtocol {
    Http1,
    H2,
    /// h2 with a `content-type` of `application/grpc*`.
    Grpc,
}

impl HttpProtocol {
    pub fn label(self) -> &'static str {
        match self {
            Self::Http1 => "http1",
            Self::H2 => "h2",
            Self::Grpc => "grpc",
        }
    }
}

/// `1xx` .. `5xx`; `other` for the non-standard 600..999 a server may send.
pub fn status_class(code: u16) -> &'static str {
    match code / 100 {
        1 => "1xx",
        2 => "2xx",
        3 => "3xx",
        4 => "4xx",
        5 => "5xx",
        _ => "other",
    }
}

/// The `code` label: the status code when it is a registered one (one `http` knows a reason phrase
/// for), `other` for the rest. On an outbound port the code is the remote app's, and HTTP/1.1 and
/// h2 carry any code from 100 to 999: each kept as its own label would let a peer add about 900
/// series per port (and per peer with `--metrics-peer-identity`).
#[derive(Clone, Copy, Debug, Hash, PartialEq, Eq)]
pub struct CodeLabel(Option<u16>);

impl CodeLabel {
    pub fn of(code: u16) -> Self {
        let registered = http::StatusCode::from_u16(code)
            .ok()
            .and_then(|s| s.canonical_reason())
            .is_some();
        Self(registered.then_some(code))
    }
}

impl prometheus_client::encoding::EncodeLabelValue for CodeLabel {
    fn encode(
        &self,
        encoder: &mut prometheus_client::encoding::LabelValueEncoder,
    ) -> Result<(), std::fmt::Error> {
        match self.0 {
            Some(code) => prometheus_client::encoding::EncodeLabelValue::encode(&code, encoder),
            None => prometheus_client::encoding::EncodeLabelValue::encode(&"other", encoder),
        }
    }
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, prometheus_client::encoding::EncodeLabelSet)]
pub struct RequestLabels {
    pub direction: &'static str,
    pub port: u16,
    pub protocol: &'static str,
    pub class: &'static str,
    pub code: CodeLabel,
    #[prometheus(flatten)]
    pub peer: PeerLabel,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, prometheus_client::encoding::EncodeLabelSet)]
pub struct DurationLabels {
    pub direction: &'static str,
    pub port: u16,
    pub protocol: &'static str,
    pub class: &'static str,
    #[prometheus(flatten)]
    pub peer: PeerLabel,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, prometheus_client::encoding::EncodeLabelSet)]
pub struct BytesLabels {
    pub direction: &'static str,
    pub port: u16,
    #[prometheus(flatten)]
    pub peer: PeerLabel,
}

/// `meshid_sidecar_request_duration_seconds`.
#[derive(Clone, Debug)]
pub struct Durations(pub Family<DurationLabels, Histogram, fn() -> Histogram>);

impl Default for Durations {
    fn default() -> Self {
        Self(Family::new_with_constructor(|| {
            Histogram::new(DURATION_BUCKETS)
        }))
    }
}

/// A connection's handles.
#[derive(Debug)]
pub struct ConnMetrics {
    direction: &'static str,
    port: u16,
    peer: PeerLabel,
    /// Application bytes from the side that connected to us, and back to it.
    pub received: Counter,
    pub sent: Counter,
    /// `idle_http_connections` of the connection's listener.
    pub idle: Gauge,
    requests: Family<RequestLabels, Counter>,
    durations: Durations,
    resolved: Mutex<Vec<Resolved>>,
}

#[derive(Debug)]
struct Resolved {
    protocol: HttpProtocol,
    code: u16,
    count: Counter,
    duration: Histogram,
}

/// Distinct (protocol, status) pairs a connection keeps handles for; beyond that (an app answering
/// with many codes on one connection) the family is asked each time.
const MAX_RESOLVED: usize = 8;

impl ConnMetrics {
    pub fn new(
        metrics: &super::Metrics,
        direction: &'static str,
        port: u16,
        peer: PeerLabel,
    ) -> Self {
        let bytes = BytesLabels {
            direction,
            port,
            peer: peer.clone(),
        };
        Self {
            direction,
            port,
            idle: metrics
                .idle_http_connections
                .get_or_create(&super::ConnLabels { direction, port })
                .clone(),
            received: metrics.received_bytes.get_or_create(&bytes).clone(),
            sent: metrics.sent_bytes.get_or_create(&bytes).clone(),
            peer,
            requests: metrics.requests.clone(),
            durations: metrics.request_durations.clone(),
            resolved: Mutex::new(Vec::new()),
        }
    }

    /// Counts a request answered with `code` after `elapsed` (request head in, response head out).
    pub fn request(&self, protocol: HttpProtocol, code: u16, elapsed: Duration) {
        let seconds = elapsed.as_secs_f64();
        // A poisoned list is still a valid list of handles.
        let mut resolved = self.resolved.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(r) = resolved
            .iter()
            .find(|r| r.protocol == protocol && r.code == code)
        {
            r.count.inc();
            r.duration.observe(seconds);
            return;
        }
        let r = self.resolve(protocol, code);
        r.count.inc();
        r.duration.observe(seconds);
        if resolved.len() < MAX_RESOLVED {
            resolved.push(r);
        }
    }

    fn resolve(&self, protocol: HttpProtocol, code: u16) -> Resolved {
        let class = status_class(code);
        let count = self
            .requests
            .get_or_create(&RequestLabels {
                direction: self.direction,
                port: self.port,
                protocol: protocol.label(),
                class,
                code: CodeLabel::of(code),
                peer: self.peer.clone(),
            })
            .clone();
        let duration = self
            .durations
            .0
            .get_or_create(&DurationLabels {
                direction: self.direction,
                port: self.port,
                protocol: protocol.label(),
                class,
                peer: self.peer.clone(),
            })
            .clone();
        Resolved {
            protocol,
            code,
            count,
            duration,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use prometheus_client::registry::Registry;

    fn scrape(registry: &Registry) -> String {
        let mut out = String::new();
        prometheus_client::encoding::text::encode(&mut out, registry).unwrap();
        out
    }

    #[test]
    fn requests_carry_protocol_class_and_code_and_peer_only_when_asked() {
        let mut registry = Registry::default();
        let metrics = super::super::Metrics::register(&mut registry);
        let plain = ConnMetrics::new(&metrics, "inbound", 8080, PeerLabel(None));
        plain.request(HttpProtocol::Grpc, 200, Duration::from_millis(3));
        plain.request(HttpProtocol::Grpc, 200, Duration::from_millis(3));
        plain.request(HttpProtocol::Http1, 403, Duration::from_micros(100));
        let peer = ConnMetrics::new(
            &metrics,
            "outbound",
            9001,
            PeerLabel(Some("spiffe://cluster.local/ns/shop/sa/b".into())),
        );
        peer.request(HttpProtocol::H2, 502, Duration::from_secs(1));
        plain.received.inc_by(10);
        let text = scrape(&registry);
        for line in [
            "meshid_sidecar_requests_total{direction=\"inbound\",port=\"8080\",protocol=\"grpc\",class=\"2xx\",code=\"200\"} 2",
            "meshid_sidecar_requests_total{direction=\"inbound\",port=\"8080\",protocol=\"http1\",class=\"4xx\",code=\"403\"} 1",
            "meshid_sidecar_requests_total{direction=\"outbound\",port=\"9001\",protocol=\"h2\",class=\"5xx\",code=\"502\",peer=\"spiffe://cluster.local/ns/shop/sa/b\"} 1",
            "meshid_sidecar_request_duration_seconds_count{direction=\"inbound\",port=\"8080\",protocol=\"grpc\",class=\"2xx\"} 2",
            "meshid_sidecar_request_duration_seconds_bucket{le=\"0.005\",direction=\"inbound\",port=\"8080\",protocol=\"grpc\",class=\"2xx\"} 2",
            "meshid_sidecar_received_bytes_total{direction=\"inbound\",port=\"8080\"} 10",
            "meshid_sidecar_sent_bytes_total{direction=\"outbound\",port=\"9001\",peer=\"spiffe://cluster.local/ns/shop/sa/b\"} 0",
        ] {
            assert!(text.contains(line), "{line}\nnot in\n{text}");
        }
    }

    /// A peer's app answering with every code from 100 to 999 adds the registered codes' series
    /// and one `other` per class, not 900.
    #[test]
    fn unregistered_codes_share_one_label() {
        let mut registry = Registry::default();
        let metrics = super::super::Metrics::register(&mut registry);
        let conn = ConnMetrics::new(&metrics, "outbound", 9001, PeerLabel(None));
        for code in 100..1000 {
            conn.request(HttpProtocol::Http1, code, Duration::from_millis(1));
        }
        let text = scrape(&registry);
        let series = text
            .lines()
            .filter(|l| l.starts_with("meshid_sidecar_requests_total{"))
            .count();
        assert!(series < 80, "{series} series:\n{text}");
        for line in [
            "protocol=\"http1\",class=\"2xx\",code=\"200\"} 1",
            "protocol=\"http1\",class=\"4xx\",code=\"418\"} 1",
            "protocol=\"http1\",class=\"2xx\",code=\"other\"}",
            "protocol=\"http1\",class=\"other\",code=\"other\"} 400",
        ] {
            assert!(text.contains(line), "{line}\nnot in\n{text}");
        }
    }

    #[test]
    fn classes() {
        for (code, class) in [
            (101, "1xx"),
            (204, "2xx"),
            (308, "3xx"),
            (499, "4xx"),
            (599, "5xx"),
            (600, "other"),
            (999, "other"),
        ] {
            assert_eq!(status_class(code), class);
        }
    }
}
