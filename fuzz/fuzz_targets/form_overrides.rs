//! The inbound's reading of a POST's `_method` fields (`meshid_sidecar::form`): the data's first
//! line is a `Content-Type` value, the rest the body. The value is classified (no form,
//! urlencoded, multipart with a boundary, JSON, or a form type that also says JSON), the body's
//! `_method` fields (or top-level JSON members) read by that form, and
//! the body's first lines up to an empty one (`name: value`) are also taken as request headers
//! beside that `Content-Type`, for the form the headers say and their override headers
//! (`X-HTTP-Method-Override`...). Never panics; a multipart boundary is one RFC 2046 allows
//! (1 to 70 `bchars`, no `,`, not ending in a space); a blank `Content-Type` is an urlencoded
//! form; every method a form names is non-empty, trimmed and has no ASCII lower case; every
//! method an override header names is ASCII, trimmed, with no lower case, each named once, and
//! every value of a header spelled exactly as `METHOD_OVERRIDES` is named (unless the list stopped
//! at its most, `MAX_OVERRIDES + 2`); the headers, with that one `Content-Type` and no
//! `Content-Encoding`, give the form the value gives.
#![no_main]

use http::header::{CONTENT_ENCODING, CONTENT_TYPE};
use http::{HeaderMap, HeaderName, HeaderValue};
use libfuzzer_sys::fuzz_target;
use meshid_sidecar::form::fuzzing::{Form, form_of, form_of_type, method_overrides};
use meshid_sidecar::form::{MAX_OVERRIDES, METHOD_OVERRIDES};

/// Header lines taken from the body, at most.
const MAX_HEADERS: usize = 64;

fuzz_target!(|data: &[u8]| {
    let (content_type, body) = match data.iter().position(|&b| b == b'\n') {
        Some(lf) => (&data[..lf], &data[lf + 1..]),
        None => (data, &[][..]),
    };

    let by_type = std::str::from_utf8(content_type).ok().map(|value| {
        let form = form_of_type(value);
        if value.trim().is_empty() {
            assert!(
                matches!(&form, Some(Ok(f)) if f.boundary().is_none()),
                "a blank Content-Type is an urlencoded form: {form:?}"
            );
        }
        if let Some(Ok(form)) = &form {
            check_form(form, body);
        }
        form
    });

    let mut headers = HeaderMap::new();
    if let Ok(value) = HeaderValue::from_bytes(content_type) {
        headers.append(CONTENT_TYPE, value);
    }
    for line in body
        .split(|&b| b == b'\n')
        .map(|l| l.strip_suffix(b"\r").unwrap_or(l))
        .take_while(|l| !l.is_empty())
        .take(MAX_HEADERS)
    {
        let Some(colon) = line.iter().position(|&b| b == b':') else {
            continue;
        };
        if let (Ok(name), Ok(value)) = (
            HeaderName::from_bytes(&line[..colon]),
            HeaderValue::from_bytes(line[colon + 1..].trim_ascii()),
        ) {
            headers.append(name, value);
        }
    }

    let overrides = method_overrides(&headers);
    for method in &overrides {
        assert!(method.is_ascii(), "{method:?}");
        assert_eq!(method.trim(), method);
        assert!(
            !method.bytes().any(|b| b.is_ascii_lowercase()),
            "{method:?}"
        );
    }
    // Each method once, and at most MAX_OVERRIDES + 2 of them; short of that, every value of a
    // header spelled exactly as METHOD_OVERRIDES is among them (trimmed, upper-cased; `?` for one
    // that is not text).
    let most = MAX_OVERRIDES + 2;
    assert!(overrides.len() <= most, "{overrides:?}");
    for (i, method) in overrides.iter().enumerate() {
        assert!(
            !overrides[..i].contains(method),
            "{overrides:?} repeats {method:?}"
        );
    }
    if overrides.len() < most {
        for name in METHOD_OVERRIDES {
            for value in headers.get_all(name) {
                let method = value
                    .to_str()
                    .map_or_else(|_| "?".to_owned(), |v| v.trim().to_ascii_uppercase());
                assert!(
                    overrides.contains(&method),
                    "{method:?} not in {overrides:?} for {headers:?}"
                );
            }
        }
    }

    let form = form_of(&headers);
    // The first line's value, alone, as text (a body line may have added another, or the only one).
    let mut types = headers.get_all(CONTENT_TYPE).iter();
    let one_type = matches!(
        (types.next(), types.next()),
        (Some(v), None) if v.as_bytes() == content_type && v.to_str().is_ok()
    );
    if one_type && !headers.contains_key(CONTENT_ENCODING) {
        let by_type = by_type
            .as_ref()
            .expect("a header value that is text is UTF-8");
        assert_eq!(&form, by_type, "{headers:?}");
    } else if let Some(Ok(form)) = &form {
        check_form(form, body);
    }
});

/// The boundary of a multipart form is one RFC 2046 allows, and every method the body's `_method`
/// fields name is non-empty, trimmed and has no ASCII lower case.
fn check_form(form: &Form, body: &[u8]) {
    if let Some(boundary) = form.boundary() {
        let bchar = |b: u8| b.is_ascii_alphanumeric() || b"'()+_-./:=? ".contains(&b);
        assert!((1..=70).contains(&boundary.len()), "{boundary:?}");
        assert!(boundary.bytes().all(bchar), "{boundary:?}");
        assert!(!boundary.ends_with(' '), "{boundary:?}");
    }
    if let Ok(methods) = form.method_overrides(body) {
        for method in methods {
            assert!(!method.is_empty());
            assert_eq!(method.trim(), method);
            assert!(
                !method.bytes().any(|b| b.is_ascii_lowercase()),
                "{method:?}"
            );
        }
    }
}
