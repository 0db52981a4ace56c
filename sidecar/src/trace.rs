//! W3C trace context (<https://www.w3.org/TR/trace-context/>): the sidecar passes `traceparent`
//! through untouched in both directions and names it in each request's decision log line, so a
//! denial can be found from the trace. A peer controls the header, so only a well-formed value is
//! logged, and at most its fixed-size version-00 part: nothing else a caller writes reaches the logs.

use http::HeaderMap;

/// The request header.
pub const TRACEPARENT: &str = "traceparent";
/// [`TRACEPARENT`] as a header name (a `&str` is parsed at every lookup).
static TRACEPARENT_NAME: http::HeaderName = http::HeaderName::from_static(TRACEPARENT);

/// Length of `version-traceid-parentid-flags`: 2 + 1 + 32 + 1 + 16 + 1 + 2.
const LEN: usize = 55;

/// The request's `traceparent`, if it has exactly one and it is well formed: lowercase hex fields
/// of the W3C lengths, version not `ff`, trace and parent IDs not all zeros. A future version may
/// append `-`-separated fields; only the first 55 characters are returned then.
pub fn traceparent(headers: &HeaderMap) -> Option<&str> {
    let mut values = headers.get_all(&TRACEPARENT_NAME).iter();
    let value = values.next()?;
    if values.next().is_some() {
        return None;
    }
    parse(value.to_str().ok()?)
}

/// The logged part of a `traceparent` value, or `None` when it is malformed.
pub fn parse(value: &str) -> Option<&str> {
    let head = value.get(..LEN)?;
    let rest = &value[LEN..];
    let fields: Vec<&str> = head.split('-').collect();
    let [version, trace_id, parent_id, flags] = fields.as_slice() else {
        return None;
    };
    let hex = |s: &str, n: usize| {
        s.len() == n && s.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f'))
    };
    let zeros = |s: &str| s.bytes().all(|b| b == b'0');
    let well_formed = hex(version, 2)
        && *version != "ff"
        && hex(trace_id, 32)
        && !zeros(trace_id)
        && hex(parent_id, 16)
        && !zeros(parent_id)
        && hex(flags, 2);
    // Version 00 is exactly 55 characters; a later one may go on after a `-`.
    let rest_ok = rest.is_empty() || (*version != "00" && rest.starts_with('-'));
    (well_formed && rest_ok).then_some(head)
}

#[cfg(test)]
mod tests {
    use super::*;

    const GOOD: &str = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";

    #[test]
    fn only_well_formed_values_are_logged() {
        assert_eq!(parse(GOOD), Some(GOOD));
        let later = format!("01{}-more-fields", &GOOD[2..]);
        assert_eq!(parse(&later), Some(&later[..LEN]));
        for bad in [
            "",
            "00",
            &GOOD.to_uppercase(),
            &format!("{GOOD}-x"),
            &format!("ff{}", &GOOD[2..]),
            "00-00000000000000000000000000000000-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-0000000000000000-01",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-0g",
            "00_4bf92f3577b34da6a3ce929d0e0e4736_00f067aa0ba902b7_01",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b-701",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01\n2024 INFO forged",
            "00-4bf92f3577b34da6a3ce929d0e0e47é-00f067aa0ba902b7-01",
        ] {
            assert_eq!(parse(bad), None, "{bad:?}");
        }
    }

    #[test]
    fn one_header_or_none() {
        let mut h = HeaderMap::new();
        assert_eq!(traceparent(&h), None);
        h.insert(TRACEPARENT, GOOD.parse().unwrap());
        assert_eq!(traceparent(&h), Some(GOOD));
        h.append(TRACEPARENT, GOOD.parse().unwrap());
        assert_eq!(traceparent(&h), None);
    }

    #[test]
    fn the_sidecar_never_strips_it() {
        let mut h = HeaderMap::new();
        h.insert(TRACEPARENT, GOOD.parse().unwrap());
        h.insert("tracestate", "congo=t61rcWkgMzE".parse().unwrap());
        h.insert("connection", "keep-alive".parse().unwrap());
        crate::http::strip_hop_by_hop(&mut h, false);
        crate::http::strip_peer_headers(&mut h);
        assert_eq!(h.get(TRACEPARENT).unwrap(), GOOD);
        assert_eq!(h.get("tracestate").unwrap(), "congo=t61rcWkgMzE");
    }
}
