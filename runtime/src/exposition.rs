//! What `/metrics` answers and in which format. prometheus-client encodes OpenMetrics 1.0.0; a
//! scraper whose `Accept` prefers `text/plain` gets the Prometheus text format 0.0.4 instead,
//! converted here line by line. And [`Listed`], which keeps a metric family in the exposition (its
//! `# HELP` and `# TYPE`) before its first series exists.

use prometheus_client::encoding::{EncodeMetric, MetricEncoder};
use prometheus_client::metrics::MetricType;

/// `Content-Type` of an OpenMetrics answer.
pub const OPENMETRICS: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";
/// `Content-Type` of a Prometheus text answer.
pub const PROMETHEUS_TEXT: &str = "text/plain; version=0.0.4; charset=utf-8";

/// An exposition format.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Format {
    /// OpenMetrics 1.0.0, what prometheus-client encodes: the default.
    OpenMetrics,
    /// Prometheus text 0.0.4.
    PrometheusText,
}

impl Format {
    pub fn content_type(self) -> &'static str {
        match self {
            Self::OpenMetrics => OPENMETRICS,
            Self::PrometheusText => PROMETHEUS_TEXT,
        }
    }
}

/// The format for the `Accept` header values `accept` (every `Accept` line of the request): the one
/// with the higher q-value, the more specific media range deciding which q applies (`text/plain`
/// before `text/*` before `*/*`). OpenMetrics on a tie, without an `Accept`, and when the header
/// accepts neither or cannot be read: a scraper that asks for something we do not serve still gets
/// metrics rather than a 406. Never panics; an entry whose q-value is not `0`..`1` with up to three
/// decimals is ignored.
pub fn negotiate<'a>(accept: impl IntoIterator<Item = &'a [u8]>) -> Format {
    // (specificity, q) of the most specific range matching each format; specificity 0 = no match.
    let (mut om, mut text) = ((0u8, 0u16), (0u8, 0u16));
    for line in accept {
        let Ok(line) = std::str::from_utf8(line) else {
            continue;
        };
        for range in line.split(',') {
            let Some((kind, q)) = media_range(range) else {
                continue;
            };
            for (candidate, best) in [
                (("application", "openmetrics-text"), &mut om),
                (("text", "plain"), &mut text),
            ] {
                let specificity = match kind {
                    (t, s) if t.eq_ignore_ascii_case(candidate.0) => {
                        if s.eq_ignore_ascii_case(candidate.1) {
                            3
                        } else if s == "*" {
                            2
                        } else {
                            0
                        }
                    }
                    ("*", "*") => 1,
                    _ => 0,
                };
                if specificity > best.0 {
                    *best = (specificity, q);
                }
            }
        }
    }
    if text.1 > om.1 {
        Format::PrometheusText
    } else {
        Format::OpenMetrics
    }
}

/// `type/subtype` and q-value (in thousandths) of one `Accept` entry.
fn media_range(range: &str) -> Option<((&str, &str), u16)> {
    let mut parts = range.split(';');
    let (kind, sub) = parts.next()?.trim().split_once('/')?;
    let (kind, sub) = (kind.trim(), sub.trim());
    if kind.is_empty() || sub.is_empty() {
        return None;
    }
    let mut q = 1000;
    for param in parts {
        if let Some((name, value)) = param.split_once('=')
            && name.trim().eq_ignore_ascii_case("q")
        {
            q = qvalue(value.trim())?;
        }
    }
    Some(((kind, sub), q))
}

/// RFC 9110's `qvalue`: `0[.ddd]` or `1[.000]`, in thousandths.
fn qvalue(v: &str) -> Option<u16> {
    let (int, frac) = v.split_once('.').unwrap_or((v, ""));
    if frac.len() > 3 || !frac.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    let thousandths = frac
        .bytes()
        .chain(std::iter::repeat(b'0'))
        .take(3)
        .fold(0u16, |n, d| n * 10 + u16::from(d - b'0'));
    match int {
        "0" => Some(thousandths),
        "1" if thousandths == 0 => Some(1000),
        _ => None,
    }
}

/// Converts prometheus-client's OpenMetrics text to the Prometheus text format 0.0.4: a counter's
/// `# HELP` and `# TYPE` name its `_total` sample, an info metric's its `_info` sample (as a gauge),
/// `unknown` becomes `untyped`; `# UNIT`, `# EOF`, `_created` samples, timestamps and exemplars are
/// dropped.
pub fn to_prometheus_text(openmetrics: &str) -> String {
    let mut out = String::with_capacity(openmetrics.len());
    let mut help: Option<(&str, &str)> = None;
    // The family being written, and the sample suffix that is not carried over.
    let mut created: Option<String> = None;
    for line in openmetrics.lines() {
        if let Some(rest) = line.strip_prefix("# HELP ") {
            help = Some(rest.split_once(' ').unwrap_or((rest, "")));
        } else if let Some(rest) = line.strip_prefix("# TYPE ") {
            let (name, kind) = rest.split_once(' ').unwrap_or((rest, "unknown"));
            let (suffix, kind) = match kind {
                "counter" => ("_total", "counter"),
                "info" => ("_info", "gauge"),
                "gauge" | "histogram" | "summary" => ("", kind),
                _ => ("", "untyped"),
            };
            created = matches!(kind, "counter" | "histogram" | "summary")
                .then(|| format!("{name}_created"));
            if let Some((help_name, text)) = help.take()
                && help_name == name
            {
                let text = text.replace("\\\"", "\"");
                out.push_str(&format!("# HELP {name}{suffix} {text}\n"));
            }
            out.push_str(&format!("# TYPE {name}{suffix} {kind}\n"));
        } else if line.starts_with('#') || line.trim().is_empty() {
            // `# UNIT`, `# EOF`, other comments.
        } else {
            let sample = sample_without_extras(line);
            let name_end = sample.find(['{', ' ']).unwrap_or(sample.len());
            if created.as_deref() == Some(&sample[..name_end]) {
                continue;
            }
            out.push_str(sample);
            out.push('\n');
        }
    }
    out
}

/// `name{labels} value` of an OpenMetrics sample line, without its timestamp and exemplar. Quoted
/// label values are skipped with their escapes, so a ` # ` inside one is not taken for an exemplar.
fn sample_without_extras(line: &str) -> &str {
    let bytes = line.as_bytes();
    let mut i = 0;
    let (mut in_labels, mut in_quotes, mut escaped) = (false, false, false);
    while i < bytes.len() {
        let b = bytes[i];
        if in_quotes {
            if escaped {
                escaped = false;
            } else if b == b'\\' {
                escaped = true;
            } else if b == b'"' {
                in_quotes = false;
            }
        } else if in_labels {
            match b {
                b'"' => in_quotes = true,
                b'}' => in_labels = false,
                _ => {}
            }
        } else if b == b'{' {
            in_labels = true;
        } else if b == b' ' {
            break;
        }
        i += 1;
    }
    // Past the name and labels: the value is the next space-separated token.
    let rest = &line[i..];
    let value_start = rest.len() - rest.trim_start().len();
    let value_len = rest[value_start..]
        .find(' ')
        .unwrap_or(rest.len() - value_start);
    &line[..i + value_start + value_len]
}

/// A metric that stays in the exposition while it has no series: prometheus-client leaves out an
/// empty family entirely, so a family whose label sets appear only with their first event (a
/// refusal reason, a status code) would be missing from a fresh scrape. Wrapped, it shows its
/// `# HELP` and `# TYPE` from the start.
#[derive(Debug, Clone, Default)]
pub struct Listed<M>(pub M);

impl<M: EncodeMetric> EncodeMetric for Listed<M> {
    fn encode(&self, encoder: MetricEncoder) -> Result<(), std::fmt::Error> {
        self.0.encode(encoder)
    }

    fn metric_type(&self) -> MetricType {
        self.0.metric_type()
    }

    fn is_empty(&self) -> bool {
        false
    }
}

/// A gauge read at scrape time: the tasks alive in the tokio runtime that answers `/metrics` (spawned
/// and not yet finished; each meshid process runs one runtime). Under steady load it stays level; one
/// that keeps climbing is a task leak. Zero outside a runtime.
#[derive(Debug, Clone, Copy, Default)]
pub struct AliveTasks;

impl EncodeMetric for AliveTasks {
    fn encode(&self, mut encoder: MetricEncoder) -> Result<(), std::fmt::Error> {
        let alive =
            tokio::runtime::Handle::try_current().map_or(0, |h| h.metrics().num_alive_tasks());
        encoder.encode_gauge(&i64::try_from(alive).unwrap_or(i64::MAX))
    }

    fn metric_type(&self) -> MetricType {
        MetricType::Gauge
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use prometheus_client::metrics::counter::Counter;
    use prometheus_client::metrics::family::Family;
    use prometheus_client::metrics::histogram::Histogram;
    use prometheus_client::registry::{Registry, Unit};

    fn negotiated(accept: &[&str]) -> Format {
        negotiate(accept.iter().map(|s| s.as_bytes()))
    }

    #[test]
    fn accept_headers_choose_the_format() {
        use Format::{OpenMetrics as Om, PrometheusText as Text};
        struct Case {
            accept: &'static [&'static str],
            expected: Format,
        }
        let cases = [
            Case {
                accept: &[],
                expected: Om,
            },
            Case {
                accept: &[""],
                expected: Om,
            },
            Case {
                accept: &["*/*"],
                expected: Om,
            },
            Case {
                accept: &["text/plain"],
                expected: Text,
            },
            Case {
                accept: &["text/plain;version=0.0.4"],
                expected: Text,
            },
            Case {
                accept: &["TEXT/Plain ; Version=0.0.4"],
                expected: Text,
            },
            Case {
                accept: &["text/*"],
                expected: Text,
            },
            Case {
                accept: &["application/openmetrics-text"],
                expected: Om,
            },
            Case {
                accept: &["application/json"],
                expected: Om,
            },
            // Prometheus 2.x's scrape header.
            Case {
                accept: &[
                    "application/openmetrics-text;version=1.0.0,application/openmetrics-text;version=0.0.1;q=0.75,text/plain;version=0.0.4;q=0.5,*/*;q=0.1",
                ],
                expected: Om,
            },
            Case {
                accept: &[
                    "application/openmetrics-text;version=1.0.0;q=0.5,text/plain;version=0.0.4;q=0.4,*/*;q=0.1",
                ],
                expected: Om,
            },
            // Prometheus with `scrape_protocols: [PrometheusText0.0.4]` first.
            Case {
                accept: &[
                    "text/plain;version=0.0.4;q=0.9,application/openmetrics-text;version=1.0.0;q=0.5,*/*;q=0.1",
                ],
                expected: Text,
            },
            Case {
                accept: &["text/plain;q=0.4, */*;q=0.5"],
                expected: Om,
            },
            Case {
                accept: &["text/plain", "application/openmetrics-text;q=0.2"],
                expected: Text,
            },
            // The more specific range decides: text/plain is refused even though */* is welcome.
            Case {
                accept: &["text/plain;q=0, */*"],
                expected: Om,
            },
            Case {
                accept: &["application/openmetrics-text;q=0, text/*;q=0.1"],
                expected: Text,
            },
            // Equal preference: the default.
            Case {
                accept: &["text/plain, application/openmetrics-text"],
                expected: Om,
            },
            Case {
                accept: &["text/plain;q=1.000"],
                expected: Text,
            },
        ];
        for case in cases {
            assert_eq!(negotiated(case.accept), case.expected, "{:?}", case.accept);
        }
    }

    #[test]
    fn hostile_accept_headers_fall_back_without_panicking() {
        let long = "text/plain;q=0.1,".repeat(10_000);
        let nested = format!("{}text/plain", ";".repeat(5000));
        for accept in [
            ",,,;;;===",
            "/",
            "text/",
            "/plain",
            "text/plain;q=",
            "text/plain;q=2",
            "text/plain;q=-1",
            "text/plain;q=0.0001",
            "text/plain;q=NaN",
            "text/plain;q=1e0",
            "text/plain;q=1.5",
            "text/plain;q=0.\u{663}",
            "text/plain;q",
            "\u{0}\u{7f}é/ü;q=0.5",
            "*/*;q=0.5;q=0.1;q=abc",
            &long,
            &nested,
        ] {
            let _ = negotiated(&[accept]);
        }
        // A range with a bad q-value is ignored, not taken at q=1.
        assert_eq!(negotiated(&["text/plain;q=2"]), Format::OpenMetrics);
        assert_eq!(negotiated(&["text/plain;q=0.5x"]), Format::OpenMetrics);
        assert_eq!(
            negotiate([&b"\xff\xfetext/plain"[..], b"text/plain"]),
            Format::PrometheusText
        );
    }

    #[test]
    fn q_values_are_parsed_strictly() {
        for (v, q) in [
            ("0", 0),
            ("1", 1000),
            ("0.5", 500),
            ("0.25", 250),
            ("1.0", 1000),
        ] {
            assert_eq!(qvalue(v), Some(q), "{v}");
        }
        for v in ["", ".5", "1.001", "0.1234", "01", "+0.5", " 0.5", "0,5"] {
            assert_eq!(qvalue(v), None, "{v:?}");
        }
    }

    fn sample_registry() -> Registry {
        let mut registry = Registry::default();
        let r = registry.sub_registry_with_prefix("meshid_test");
        let requests = Family::<Vec<(String, String)>, Counter>::default();
        requests
            .get_or_create(&vec![("path".into(), "a # {b} \"c\" \\".into())])
            .inc();
        r.register("requests", "Requests \"seen\"", requests);
        r.register(
            "empty",
            "No series yet",
            Listed(Family::<Vec<(String, String)>, Counter>::default()),
        );
        r.register(
            "hidden",
            "Not listed",
            Family::<Vec<(String, String)>, Counter>::default(),
        );
        let histogram = Histogram::new([0.1, 1.0]);
        histogram.observe(0.5);
        r.register_with_unit("duration", "Time taken", Unit::Seconds, histogram);
        let with_unit = Counter::<u64>::default();
        r.register_with_unit("sent", "Bytes sent", Unit::Bytes, with_unit);
        registry
    }

    #[test]
    fn openmetrics_becomes_prometheus_text() {
        let mut om = String::new();
        prometheus_client::encoding::text::encode(&mut om, &sample_registry()).unwrap();
        assert!(om.contains("# TYPE meshid_test_empty counter\n"), "{om}");
        assert!(!om.contains("meshid_test_hidden"), "{om}");
        let text = to_prometheus_text(&om);
        let expected = "\
# HELP meshid_test_requests_total Requests \"seen\".
# TYPE meshid_test_requests_total counter
meshid_test_requests_total{path=\"a # {b} \\\"c\\\" \\\\\"} 1
# HELP meshid_test_empty_total No series yet.
# TYPE meshid_test_empty_total counter
# HELP meshid_test_duration_seconds Time taken.
# TYPE meshid_test_duration_seconds histogram
meshid_test_duration_seconds_sum 0.5
meshid_test_duration_seconds_count 1
meshid_test_duration_seconds_bucket{le=\"0.1\"} 0
meshid_test_duration_seconds_bucket{le=\"1.0\"} 1
meshid_test_duration_seconds_bucket{le=\"+Inf\"} 1
# HELP meshid_test_sent_bytes_total Bytes sent.
# TYPE meshid_test_sent_bytes_total counter
meshid_test_sent_bytes_total 0
";
        assert_eq!(text, expected, "from:\n{om}");
    }

    #[test]
    fn timestamps_exemplars_and_created_samples_are_dropped() {
        let om = "\
# HELP a A.
# TYPE a counter
# UNIT a seconds
a_total{x=\"1 # {y}\"} 3 1700000000.5 # {trace_id=\"abc\"} 1.0 1700000000.1
a_created 1700000000.0
# TYPE b unknown
b 1
# HELP c C.
# TYPE c info
c_info{v=\"1\"} 1
# EOF
";
        assert_eq!(
            to_prometheus_text(om),
            "# HELP a_total A.\n# TYPE a_total counter\na_total{x=\"1 # {y}\"} 3\n\
             # TYPE b untyped\nb 1\n# HELP c_info C.\n# TYPE c_info gauge\nc_info{v=\"1\"} 1\n"
        );
    }

    fn alive_tasks_sample(registry: &Registry) -> i64 {
        let mut om = String::new();
        prometheus_client::encoding::text::encode(&mut om, registry).unwrap();
        assert!(om.contains("# TYPE t_alive_tasks gauge"), "{om}");
        om.lines()
            .find_map(|l| l.strip_prefix("t_alive_tasks "))
            .and_then(|v| v.parse().ok())
            .unwrap()
    }

    #[tokio::test(flavor = "current_thread")]
    async fn alive_tasks_follow_the_runtime() {
        let mut registry = Registry::default();
        registry.register("t_alive_tasks", "Tasks", AliveTasks);
        let before = alive_tasks_sample(&registry);
        let (tx, rx) = tokio::sync::oneshot::channel::<()>();
        let held: Vec<_> = (0..3)
            .map(|_| tokio::spawn(std::future::pending::<()>()))
            .chain(std::iter::once(tokio::spawn(async move {
                let _ = rx.await;
            })))
            .collect();
        assert_eq!(alive_tasks_sample(&registry), before + 4);
        drop(tx);
        for h in held {
            h.abort();
            let _ = h.await;
        }
        assert_eq!(alive_tasks_sample(&registry), before);
    }

    #[test]
    fn alive_tasks_outside_a_runtime_are_zero() {
        let mut registry = Registry::default();
        registry.register("t_alive_tasks", "Tasks", AliveTasks);
        assert_eq!(alive_tasks_sample(&registry), 0);
    }

    #[test]
    fn hostile_sample_lines_do_not_panic() {
        for line in [
            "{",
            "}",
            "a{",
            "a{\"",
            "a{x=\"\\",
            "a{x=\"é\"} ",
            "a ",
            " ",
            "é é é",
            "a{}}} 1 2 3",
        ] {
            let _ = to_prometheus_text(line);
            let _ = sample_without_extras(line);
        }
    }
}

/// One unit of a gauge, held: counted up when made and down when dropped, whichever way the holder
/// ends (returns, an error, a cancelled future, a panic unwinding its task). A gauge counted up and
/// down by hand around an `.await` drifts up for good each time the code between is cut short.
#[derive(Debug)]
pub struct GaugeHeld(prometheus_client::metrics::gauge::Gauge);

impl GaugeHeld {
    pub fn new(gauge: &prometheus_client::metrics::gauge::Gauge) -> Self {
        gauge.inc();
        Self(gauge.clone())
    }
}

impl Drop for GaugeHeld {
    fn drop(&mut self) {
        self.0.dec();
    }
}

#[cfg(test)]
mod gauge_held_tests {
    use super::GaugeHeld;
    use prometheus_client::metrics::gauge::Gauge;

    #[tokio::test]
    async fn a_held_unit_is_given_back_however_its_holder_ends() {
        let gauge = Gauge::<i64>::default();
        let held = GaugeHeld::new(&gauge);
        assert_eq!(gauge.get(), 1);
        drop(held);
        assert_eq!(gauge.get(), 0);
        // A task that panics while holding it.
        let g = gauge.clone();
        let task = tokio::spawn(async move {
            let _held = GaugeHeld::new(&g);
            panic!("the handler failed");
        });
        assert!(task.await.is_err());
        assert_eq!(gauge.get(), 0);
        // A future dropped while waiting.
        let g = gauge.clone();
        let waiting = tokio::spawn(async move {
            let _held = GaugeHeld::new(&g);
            std::future::pending::<()>().await;
        });
        tokio::task::yield_now().await;
        assert_eq!(gauge.get(), 1);
        waiting.abort();
        assert!(waiting.await.is_err());
        assert_eq!(gauge.get(), 0);
    }
}
