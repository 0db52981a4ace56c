//! The review budget's charge ([`meshid_injector::cost::review_cost`]) against what a review really
//! allocates: each body below, built to make one part of the work as large as it can per byte, is
//! parsed and answered as the server does it while a counting allocator records the peak heap, and
//! the charge must be at least that peak. This binary counts its own allocations, so it holds this
//! one test alone.

// The one `unsafe` here: a global allocator that forwards to the system's and counts.
#![allow(unsafe_code)]
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::alloc::{GlobalAlloc, Layout, System};
use std::sync::atomic::{AtomicUsize, Ordering::Relaxed};

use meshid_injector::{InjectConfig, Scope, TrustBundle, admission, answer, cost};

struct Counting;

static LIVE: AtomicUsize = AtomicUsize::new(0);
static PEAK: AtomicUsize = AtomicUsize::new(0);

fn grew(n: usize) {
    let live = LIVE.fetch_add(n, Relaxed) + n;
    PEAK.fetch_max(live, Relaxed);
}

// SAFETY: every call is forwarded to `System` with the caller's arguments unchanged; the counters
// are plain atomics.
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        grew(layout.size());
        // SAFETY: the caller's contract, passed on.
        unsafe { System.alloc(layout) }
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        LIVE.fetch_sub(layout.size(), Relaxed);
        // SAFETY: the caller's contract, passed on.
        unsafe { System.dealloc(ptr, layout) }
    }

    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        // Counted as if the old and the new block both lived during the copy.
        grew(new_size);
        // SAFETY: the caller's contract, passed on.
        let moved = unsafe { System.realloc(ptr, layout, new_size) };
        LIVE.fetch_sub(layout.size(), Relaxed);
        moved
    }
}

#[global_allocator]
static COUNTING: Counting = Counting;

const HEAD: &str = r#"{"apiVersion":"admission.k8s.io/v1","kind":"AdmissionReview","request":{"uid":"u","kind":{"kind":"Pod"},"resource":{"resource":"pods"},"operation":"CREATE","object":"#;
const ASKING: &str = r#"{"metadata":{"annotations":{"meshid.io/inject":"enabled","meshid.io/inbound":"8080=http","meshid.io/workload-api":"enabled"}},"spec":{"containers":["#;

/// `prefix`, `item` repeated (comma-separated) to about `total` bytes, `suffix`.
fn repeated(prefix: &str, item: &str, suffix: &str, total: usize) -> Vec<u8> {
    let n = (total.saturating_sub(prefix.len() + suffix.len()) / (item.len() + 1)).max(1);
    let mut body = String::with_capacity(total);
    body.push_str(prefix);
    for i in 0..n {
        if i > 0 {
            body.push(',');
        }
        body.push_str(item);
    }
    body.push_str(suffix);
    body.into_bytes()
}

/// A pod asking for injection whose only container has a readiness probe with `header` (a JSON
/// object) repeated to about `total` bytes (once at least).
fn probe_headers(header: &str, total: usize) -> Vec<u8> {
    let container = r#"{"name":"app","readinessProbe":{"httpGet":{"port":8080,"httpHeaders":["#;
    repeated(
        &format!("{HEAD}{ASKING}{container}"),
        header,
        "]}}}]}}}}",
        total,
    )
}

/// A pod asking for injection whose annotation `key` is `items` joined by commas.
fn annotation(key: &str, items: impl Iterator<Item = String>) -> Vec<u8> {
    let value: Vec<String> = items.collect();
    format!(
        r#"{HEAD}{{"metadata":{{"annotations":{{"meshid.io/inject":"enabled","meshid.io/inbound":"8080=http","{key}":"{}"}}}},"spec":{{"containers":[{{"name":"app"}}]}}}}}}}}"#,
        value.join(",")
    )
    .into_bytes()
}

/// `n` containers, each with three probes moved and the Workload API mounted.
fn containers(n: usize) -> Vec<u8> {
    let containers: Vec<String> = (0..n)
        .map(|i| {
            format!(
                r#"{{"name":"app-{i}","ports":[{{"containerPort":8080}}],
                "readinessProbe":{{"httpGet":{{"port":8080,"path":"/ready","httpHeaders":[{{"name":"a","value":"b"}}]}}}},
                "livenessProbe":{{"httpGet":{{"port":8080}}}},"startupProbe":{{"httpGet":{{"port":8080}}}}}}"#
            )
        })
        .collect();
    format!("{HEAD}{ASKING}{}]}}}}}}", containers.join(",")).into_bytes()
}

#[test]
fn every_review_costs_less_than_it_is_charged() {
    let key = rcgen::KeyPair::generate().unwrap();
    let root = rcgen::CertificateParams::new(Vec::<String>::new())
        .unwrap()
        .self_signed(&key)
        .unwrap();
    let config = InjectConfig::new(TrustBundle::from_pem(root.pem().as_bytes()).unwrap());
    let bundle = config.trust_bundle.pem().len();
    let mib = 1 << 20;
    let cases: Vec<(&str, Vec<u8>)> = vec![
        ("1 MiB of 0", repeated(&format!("{HEAD}["), "0", "]}}", mib)),
        (
            "1 MiB of \"\"",
            repeated(&format!("{HEAD}["), r#""""#, "]}}", mib),
        ),
        (
            "1 MiB of \"a\"",
            repeated(&format!("{HEAD}["), r#""a""#, "]}}", mib),
        ),
        (
            "1 MiB of [0]",
            repeated(&format!("{HEAD}["), "[0]", "]}}", mib),
        ),
        (
            "1 MiB of {}",
            repeated(&format!("{HEAD}["), "{}", "]}}", mib),
        ),
        (
            "1 MiB of {\"a\":0}",
            repeated(&format!("{HEAD}["), r#"{"a":0}"#, "]}}", mib),
        ),
        (
            "1 MiB of {\"a\":0,\"b\":1}",
            repeated(&format!("{HEAD}["), r#"{"a":0,"b":1}"#, "]}}", mib),
        ),
        (
            "a 250 KB allow list",
            annotation(
                "meshid.io/allow-8080",
                std::iter::repeat_n("spiffe://a/b".to_owned(), 19_000),
            ),
        ),
        (
            // serde_json reads `\/` as `/`: the key is meshid.io/allow-8080 all the same.
            "a 250 KB allow list under an escaped key",
            annotation(
                r"meshid.io\/allow-8080",
                std::iter::repeat_n("spiffe://a/b".to_owned(), 19_000),
            ),
        ),
        (
            "1 MiB of probe headers under an escaped httpGet",
            repeated(
                &format!(
                    r#"{HEAD}{ASKING}{{"name":"app","readinessProbe":{{"http\u0047et":{{"port":8080,"httpHeaders":["#
                ),
                r#"{"name":"","value":""}"#,
                "]}}}]}}}}",
                mib,
            ),
        ),
        (
            "a 250 KB inbound list",
            annotation(
                "meshid.io/inbound",
                (1000..26_000).map(|port| format!("{port}=http")),
            ),
        ),
        (
            "1 MiB of annotations",
            annotation(
                "meshid.io/allow-8080",
                std::iter::repeat_n("spiffe://a/b".to_owned(), 80_000),
            ),
        ),
        (
            "1 MiB of probe headers",
            probe_headers(r#"{"name":"","value":""}"#, mib),
        ),
        (
            "60 KB of escaped quotes in a probe header",
            probe_headers(
                &format!(r#"{{"name":"x","value":"{}"}}"#, r#"\""#.repeat(30_000)),
                70_000,
            ),
        ),
        ("64 containers", containers(64)),
        ("128 containers", containers(128)),
        (
            "128 empty containers",
            format!("{HEAD}{ASKING}{}]}}}}}}", vec!["{}"; 128].join(",")).into_bytes(),
        ),
    ];
    for (name, body) in cases {
        let charged = cost::review_cost(&body, bundle);
        let before = LIVE.load(Relaxed);
        PEAK.store(before, Relaxed);
        let parsed = admission::parse(&body);
        let text = match &parsed {
            Ok(review) => answer(&config, Scope::Pod, review).to_string(),
            Err(error) => error.to_string(),
        };
        drop(parsed);
        drop(text);
        // The body itself is charged too (it was allocated before the count started).
        let used = (PEAK.load(Relaxed) - before + body.len()) as u64;
        eprintln!(
            "{name}: {} bytes of body, {used} used ({:.1} per byte), {charged} charged",
            body.len(),
            used as f64 / body.len() as f64
        );
        assert!(
            charged >= used,
            "{name}: {used} bytes used, {charged} charged"
        );
    }
}
