//! The summary: counted, bounded with denied calls apart, and turned into a suggestion.

use super::*;

const WEB: &str = "spiffe://cluster.local/ns/shop/sa/web";
const PROBE: &str = "spiffe://cluster.local/ns/dev/sa/scanner";

fn id(s: &str) -> SpiffeId {
    SpiffeId::parse(s).unwrap()
}

/// The suggestion without its comments: what it allows.
fn rules(text: &str) -> String {
    text.lines()
        .filter(|l| !l.starts_with('#'))
        .map(|l| format!("{l}\n"))
        .collect()
}

#[test]
fn calls_are_counted_bounded_and_decided_again_by_the_policy_in_force() {
    let seen = ObservedTraffic::default();
    let web = id(WEB);
    let other = id("spiffe://cluster.local/ns/shop/sa/other");
    // Audit mode: every call is let through.
    for _ in 0..3 {
        seen.record(8080, &web, Some(("GET", "/api/1?q=x")), true);
    }
    seen.record(8080, &other, Some(("GET", "/api/1")), true);
    seen.record(5432, &web, None, true);
    let policy = Policy::parse(
        "inbound:\n  - port: 8080\n    protocol: http\n    allow:\n      - id: spiffe://cluster.local/ns/shop/sa/web\n      - id: spiffe://cluster.local/ns/ops/sa/x\n",
    )
    .unwrap();
    let report = seen.report(Some(&policy));
    assert_eq!(report.calls.len(), 3);
    let web_call = report
        .calls
        .iter()
        .find(|c| c.peer == web.as_str() && c.port == 8080)
        .unwrap();
    assert_eq!((web_call.count, web_call.path.as_str()), (3, "/api/1"));
    assert_eq!(web_call.decision, "allow");
    assert_eq!(
        report.unused_rules,
        vec![UnusedRule {
            port: 8080,
            rule: 1,
            describe: "rule 1 (spiffe://cluster.local/ns/ops/sa/x)".into()
        }]
    );
    let text = render(&report, false);
    assert!(text.contains("denies (2)"), "{text}");
    assert!(
        text.contains("port 5432 connection (1 times): port-not-in-policy"),
        "{text}"
    );
    assert!(!text.contains("not kept"), "{text}");
    assert_eq!(seen.record(5432, &web, None, true), Recorded::Counted);
    // Eight peers fill the table (one peer alone would fill only its share).
    for i in 0..MAX_ENTRIES + 5 {
        let peer = id(&format!("spiffe://cluster.local/ns/shop/sa/w{}", i % 8));
        seen.record(9000, &peer, Some(("GET", &format!("/x/{i}"))), true);
    }
    assert_eq!(
        seen.record(9000, &web, Some(("GET", "/y")), true),
        Recorded::Dropped
    );
    let report = seen.report(None);
    assert_eq!(report.calls.len(), MAX_ENTRIES);
    assert_eq!((report.dropped, report.dropped_denied), (9, 0));
    let text = render(&report, false);
    assert!(
        text.contains(&format!(
            "# Incomplete: 9 calls let through were not kept (the summary holds {MAX_ENTRIES} \
             distinct calls let through), so this may not allow all the traffic seen.\n"
        )),
        "{text}"
    );
    // However many calls, the whole text parses: the lists are cut.
    Policy::parse(&text).unwrap_or_else(|e| panic!("{e}\n{text}"));
    assert!(
        text.contains(&format!(
            "#   ... and {} more (all of them: the admin port's /observed)\n",
            MAX_ENTRIES - MAX_LISTED
        )),
        "{text}"
    );
}

#[test]
fn denied_probes_cannot_crowd_out_calls_let_through() {
    let seen = ObservedTraffic::default();
    // Four probing peers and four callers: each within its share, together filling the tables.
    let nth = |name: &str, i: usize| {
        id(&format!(
            "spiffe://cluster.local/ns/shop/sa/{name}{}",
            i % 4
        ))
    };
    let probe = nth("probe", 0);
    let probes = MAX_DENIED_ENTRIES + 100;
    for i in 0..probes {
        let path = format!("/junk/p{i}");
        let kept = seen.record(8080, &nth("probe", i), Some(("GET", &path)), false);
        let want = if i < MAX_DENIED_ENTRIES {
            Recorded::New
        } else {
            Recorded::Dropped
        };
        assert_eq!(kept, want, "{path}");
    }
    // Every call let through still finds room, as many as with no probes at all.
    for i in 0..MAX_ENTRIES {
        let path = format!("/api/{i}");
        let kept = seen.record(8080, &nth("web", i), Some(("GET", &path)), true);
        assert_eq!(kept, Recorded::New, "{path}");
    }
    let web = nth("web", 0);
    // A probe let through later (say in audit mode) counts as let through, even with no room
    // to move it.
    let counted = seen.record(8080, &probe, Some(("GET", "/junk/p0")), true);
    assert_eq!(counted, Recorded::Counted);
    let report = seen.report(None);
    assert_eq!(report.calls.len(), MAX_ENTRIES + MAX_DENIED_ENTRIES);
    assert_eq!((report.dropped, report.dropped_denied), (0, 100));
    let junk0 = report.calls.iter().find(|c| c.path == "/junk/p0").unwrap();
    assert_eq!((junk0.count, junk0.denied), (2, Some(1)));
    let text = render(&report, false);
    assert!(
        text.contains(&format!(
            "\n# 100 denied calls were not kept (the summary holds {MAX_DENIED_ENTRIES} \
             distinct calls only ever denied); a denied call is never suggested.\n"
        )),
        "{text}"
    );
    assert!(!text.contains("Incomplete"), "{text}");
    let policy = Policy::parse(&text).unwrap_or_else(|e| panic!("{e}\n{text}"));
    let allows =
        |peer: &SpiffeId, path: &str| policy.decide_request(8080, peer, "GET", path).would_allow;
    assert!(allows(&web, "/api/4092"), "{text}");
    assert!(allows(&probe, "/junk/p0"), "{text}");
    assert!(!allows(&probe, "/junk/p1"), "{text}");
    // Past the room for calls let through, the next one is dropped and the output says so.
    let dropped = seen.record(8080, &web, Some(("POST", "/api/0")), true);
    assert_eq!(dropped, Recorded::Dropped);
    let text = render(&seen.report(None), false);
    assert!(
        text.contains("# Incomplete: 1 calls let through were not kept"),
        "{text}"
    );
}

/// A peer calling ever new paths (allowed `/api/*`, or probing denied ones) fills its own share of
/// each table, never the room of the others.
#[test]
fn one_peer_fills_only_its_share() {
    let seen = ObservedTraffic::default();
    let (flooder, web) = (id(PROBE), id(WEB));
    let kept = |allowed: bool, n: usize| {
        (0..n)
            .filter(|i| {
                let path = format!("/api/{allowed}/{i}");
                seen.record(8080, &flooder, Some(("GET", &path)), allowed) == Recorded::New
            })
            .count()
    };
    assert_eq!(kept(true, MAX_ENTRIES), MAX_ENTRIES / PER_PEER_SHARE);
    assert_eq!(
        kept(false, MAX_DENIED_ENTRIES),
        MAX_DENIED_ENTRIES / PER_PEER_SHARE
    );
    for (i, allowed) in [(0, true), (1, false), (2, true)] {
        let path = format!("/orders/{i}");
        assert_eq!(
            seen.record(8080, &web, Some(("GET", &path)), allowed),
            Recorded::New,
            "{path}"
        );
    }
    // A denied call of the flooder let through later stays where it is when its share is full.
    assert_eq!(
        seen.record(8080, &flooder, Some(("GET", "/api/false/0")), true),
        Recorded::Counted
    );
    let report = seen.report(None);
    assert_eq!(
        report.calls.len(),
        MAX_ENTRIES / PER_PEER_SHARE + MAX_DENIED_ENTRIES / PER_PEER_SHARE + 3
    );
    assert_eq!(
        (report.dropped, report.dropped_denied),
        (
            (MAX_ENTRIES - MAX_ENTRIES / PER_PEER_SHARE) as u64,
            (MAX_DENIED_ENTRIES - MAX_DENIED_ENTRIES / PER_PEER_SHARE) as u64
        )
    );
}

/// What `suggest-policy` prints for `report`, and whether that suggestion allows a call on port
/// 8080.
fn suggestion(report: &ObservedReport) -> (String, impl Fn(&SpiffeId, &str, &str) -> bool) {
    let text = render(report, false);
    let suggested = Policy::parse(&text).unwrap_or_else(|e| panic!("{e}\n{text}"));
    let allows = move |peer: &SpiffeId, method: &str, path: &str| {
        suggested
            .decide_request(8080, peer, method, path)
            .would_allow
    };
    (text, allows)
}

#[test]
fn a_call_only_ever_denied_is_never_suggested() {
    let policy = Policy::parse(
        "inbound:\n  - port: 8080\n    protocol: http\n    allow:\n      - id: spiffe://cluster.local/ns/shop/sa/web\n        paths: [/api/*]\n",
    )
    .unwrap();
    let seen = ObservedTraffic::default();
    let (web, probe) = (id(WEB), id(PROBE));
    let decide = |peer: &SpiffeId, method: &str, path: &str| {
        let d = policy.decide_request(8080, peer, method, path);
        seen.record(8080, peer, Some((method, path)), d.allowed);
    };
    decide(&web, "GET", "/api/orders/1");
    // Twenty probes under one prefix: if counted, they would suggest `/admin/*`.
    for i in 0..20 {
        decide(&probe, "GET", &format!("/admin/secret{i}"));
    }
    decide(&probe, "GET", "/api/orders/1");
    decide(&web, "DELETE", "/admin/users");
    // Denied once, let through later: suggested, and moved among the calls let through.
    seen.record(8080, &web, Some(("GET", "/healthz")), false);
    seen.record(8080, &web, Some(("GET", "/healthz")), true);
    let report = seen.report(Some(&policy));
    let healthz = report.calls.iter().find(|c| c.path == "/healthz").unwrap();
    assert_eq!((healthz.count, healthz.denied), (2, Some(1)));
    assert_eq!(seen.lock().denied.len(), 22);
    // What `/observed` serves carries the denials to `suggest-policy`.
    let json = serde_json::to_string(&report).unwrap();
    let report: ObservedReport = serde_json::from_str(&json).unwrap();
    let (text, allows) = suggestion(&report);
    assert!(allows(&web, "GET", "/api/orders/2"), "{text}");
    assert!(allows(&web, "GET", "/healthz"), "{text}");
    assert!(!allows(&web, "DELETE", "/admin/users"), "{text}");
    assert!(!allows(&probe, "GET", "/admin/secret0"), "{text}");
    assert!(!allows(&probe, "GET", "/api/orders/1"), "{text}");
    let body = rules(&text);
    assert!(!body.contains(PROBE) && !body.contains("/admin"), "{body}");
    assert!(
        text.contains(&format!(
            "#   {PROBE} -> port 8080 GET /admin/secret0 (1 times): denied every time"
        )),
        "{text}"
    );
    let text = render(&report, true);
    assert!(
        text.contains(&format!("meshid.io/allow-8080: \"{WEB}\"\n")),
        "{text}"
    );
    assert!(!rules(&text).contains(PROBE), "{text}");
    // A report from a sidecar older than the denial counts: what its policy denies now is not
    // suggested (read as never denied, every probe it refused would be).
    let older = json
        .replace(r#""denied":0,"#, "")
        .replace(r#""denied":1,"#, "");
    assert!(!older.contains("\"denied\":"), "{older}");
    let report: ObservedReport = serde_json::from_str(&older).unwrap();
    let (text, allows) = suggestion(&report);
    assert!(text.contains("older than denial counts"), "{text}");
    assert!(allows(&web, "GET", "/api/orders/2"), "{text}");
    assert!(!allows(&probe, "GET", "/admin/secret0"), "{text}");
    assert!(!allows(&web, "DELETE", "/admin/users"), "{text}");
    assert!(!rules(&text).contains("/admin"), "{text}");
}
