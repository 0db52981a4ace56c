//! HTTP plumbing both directions share: the server builder and graceful connection loop, hop-by-hop
//! header rules, upgrades, the sidecar's own short answers (`x-meshid-reason`), and error causes.
//! Inbound requests are served by [`crate::inbound::http`], outbound ones by
//! [`crate::outbound::http`].

use std::time::Duration;

use bytes::Bytes;
use http::header::{self, HeaderMap, HeaderName, HeaderValue};
use http::{Request, Response, StatusCode, Version};
use http_body_util::combinators::BoxBody;
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper_util::rt::{TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use prometheus_client::metrics::gauge::Gauge;
use tokio::io::{AsyncRead, AsyncWrite};

use crate::conn::Shared;
pub use crate::idle::{Call, ReqBody, RespBody, respond};
use crate::idle::{Opening, Tracked};

/// What a body's error is passed on as (hyper's, h2's on the outbound's upstream side).
pub type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// The body of every response we return.
pub type Body = BoxBody<Bytes, BoxError>;

/// Set on requests between sidecars when the originating app spoke h2 (the peer then speaks h2c to
/// its app). Stripped before any app sees it.
pub const APP_H2_HINT: &str = "x-meshid-app-h2";
/// [`APP_H2_HINT`] as a header name, made once: a name given as `&str` is parsed and checked at
/// every lookup, on every request.
pub static APP_H2_HINT_NAME: HeaderName = HeaderName::from_static(APP_H2_HINT);
/// The identity header: `By=<own id>;Hash=<peer cert sha256>;URI=<peer id>`.
pub const XFCC: &str = "x-forwarded-client-cert";
/// [`XFCC`] as a header name.
pub static XFCC_NAME: HeaderName = HeaderName::from_static(XFCC);

/// Request headers that tell the app who is calling and how, or what a trusted front proxy saw
/// before it rewrote the request (the host, port and prefix it was reached at, the URL before a
/// rewrite: frameworks such as Spring and IIS act on them as the request's own). Only the inbound
/// sidecar sets the first ones, and no peer is a front proxy of the app: every peer-sent header
/// whose name matches one of these, ignoring ASCII case and treating `_` and `.` as `-`, is removed
/// first (CGI, WSGI and PHP servers fold `X_Forwarded_Client_Cert` and `X-Forwarded-Client-Cert`
/// into one variable, and PHP behind nginx folds `X.Forwarded.Client.Cert` into it too, so any of
/// these spellings would reach the app as ours). The policy decides on the request line; a peer
/// must not have the app serve another path than the one it was allowed. The client-IP headers
/// that frameworks take as the caller's address (chi's `RealIP` prefers `True-Client-IP`, Rails
/// reads `Client-Ip`) go too, and `Proxy`, which CGI and FastCGI apps turn into `HTTP_PROXY` for
/// their own outgoing calls ("httpoxy").
pub const PEER_HEADERS: [&str; 17] = [
    XFCC,
    "x-forwarded-for",
    "forwarded",
    "x-real-ip",
    "x-forwarded-proto",
    "x-forwarded-host",
    "x-forwarded-port",
    "x-forwarded-prefix",
    "x-original-url",
    "x-rewrite-url",
    "true-client-ip",
    "client-ip",
    "x-client-ip",
    "x-cluster-client-ip",
    "cf-connecting-ip",
    "fastly-client-ip",
    "proxy",
];

/// Request headers that ask the app to take the request as another method (Express's
/// `method-override`, Spring's `HiddenHttpMethodFilter` variants, OData, Google's APIs): the inbound
/// decides the methods they name as it decides the request's own, so that a peer allowed `POST`
/// cannot have the app `DELETE`. Matched as [`PEER_HEADERS`] are (`X.HTTP.Method.Override` is
/// one: PHP reads it as `X-HTTP-Method-Override`).
pub const METHOD_OVERRIDES: [&str; 3] = [
    "x-http-method-override",
    "x-http-method",
    "x-method-override",
];

/// The methods `headers` ask the app to take the request as ([`METHOD_OVERRIDES`]), each trimmed
/// and upper-cased as frameworks take it (Rack and Symfony upper-case it; a value that is not text
/// is given as `?`, which no method rule names).
pub(crate) fn method_overrides(headers: &HeaderMap) -> Vec<String> {
    if !headers
        .keys()
        .any(|n| names_one_of(n.as_str(), &METHOD_OVERRIDES))
    {
        return Vec::new();
    }
    headers
        .iter()
        .filter(|(n, _)| names_one_of(n.as_str(), &METHOD_OVERRIDES))
        .map(|(_, v)| {
            v.to_str()
                .map_or_else(|_| "?".to_owned(), |v| v.trim().to_ascii_uppercase())
        })
        .collect()
}

/// The methods a request's query asks the app to take it as: `_method=...`, which Laravel and
/// Symfony, Express's `method-override('_method')` and Spring's `HiddenHttpMethodFilter` read
/// from the query. Pairs are split at `&` and `;`; a name is percent-decoded with PHP's folding of
/// `.`, ` ` and `[` into `_` (so `.method` and `%5Fmethod` are `_method` too) and compared in any
/// case; a value is percent-decoded, trimmed and upper-cased, as those frameworks take it (one
/// that is not UTF-8 is given as `?`, which no method rule names; an empty one is none).
pub(crate) fn query_method_overrides(query: Option<&str>) -> Vec<String> {
    let Some(query) = query else {
        return Vec::new();
    };
    query
        .split(['&', ';'])
        .filter_map(|pair| {
            let (name, value) = pair.split_once('=').unwrap_or((pair, ""));
            if !names_method(lenient_decode(name)) {
                return None;
            }
            override_named(percent_decode(value).as_deref())
        })
        .collect()
}

/// The bytes of a form-encoded name as PHP decodes them: `%XX` escapes decoded, `+` a space, and a
/// `%` that starts no escape kept as it is. Without allocating: every pair of every query is
/// read.
fn lenient_decode(s: &str) -> impl Iterator<Item = u8> + '_ {
    let bytes = s.as_bytes();
    let hex = |b: u8| (b as char).to_digit(16).map(|d| d as u8);
    let mut i = 0;
    std::iter::from_fn(move || {
        let b = *bytes.get(i)?;
        i += 1;
        Some(match b {
            b'%' => match (
                bytes.get(i).and_then(|&h| hex(h)),
                bytes.get(i + 1).and_then(|&l| hex(l)),
            ) {
                (Some(h), Some(l)) => {
                    i += 2;
                    (h << 4) | l
                }
                _ => b'%',
            },
            b'+' => b' ',
            b => b,
        })
    })
}

/// Whether a form field's (decoded) name is `_method` as the most lenient framework reads it: any
/// leading whitespace and brackets dropped (PHP drops leading spaces; Rack 2 drops leading `[` and
/// `]`), cut at a NUL (PHP), trailing whitespace and `]` dropped (Rack 2), `.`, ` ` and `[` folded
/// into `_` (PHP), in any case. A peer that spells the name so that only some app would read it
/// gets it decided all the same; a few names no framework reads as `_method` are decided too.
fn names_method(mut name: impl Iterator<Item = u8>) -> bool {
    let fold = |b: u8| match b {
        b'.' | b' ' | b'[' => b'_',
        b => b.to_ascii_lowercase(),
    };
    let first = loop {
        match name.next() {
            None | Some(0) => return false,
            Some(b) if b.is_ascii_whitespace() || b == b'[' || b == b']' => {}
            Some(b) => break b,
        }
    };
    if fold(first) != b'_' {
        return false;
    }
    for want in b"method" {
        match name.next() {
            Some(b) if fold(b) == *want => {}
            _ => return false,
        }
    }
    for b in name {
        match b {
            0 => return true,
            b if b.is_ascii_whitespace() || b == b']' => {}
            _ => return false,
        }
    }
    true
}

/// The method a `_method` field's (decoded) value names: trimmed and upper-cased; `?` (which no
/// method rule names) for one that is not UTF-8 or could not be decoded; `None` for an empty one,
/// which asks for nothing.
fn override_named(value: Option<&[u8]>) -> Option<String> {
    let method = value
        .and_then(|v| std::str::from_utf8(v).ok())
        .map_or_else(|| "?".to_owned(), |v| v.trim().to_ascii_uppercase());
    (!method.is_empty()).then_some(method)
}

/// A request body a framework reads form fields from, `_method` among them: Rails'
/// `Rack::MethodOverride`, Laravel, Symfony and Spring's `HiddenHttpMethodFilter` take a `POST`'s
/// `_method` field from an `application/x-www-form-urlencoded` or `multipart/form-data` body.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Form {
    Urlencoded,
    /// With its boundary (one that names none is [`Form::Urlencoded`]).
    Multipart(String),
}

impl Form {
    /// The form a request's `Content-Type` says its body is, if any, read as the most lenient
    /// framework reads it: none is a form (Rack parses a `POST` without one), and so is a blank
    /// one or one with an empty media type (Rack takes an empty `CONTENT_TYPE` for none), the
    /// value is trimmed first (Puma trims what h2 may send with a leading space), the media type
    /// ends at `;`, `,` or a space (PHP), any `multipart/*` is multipart (Rack), and a multipart
    /// type without a usable boundary is urlencoded (Rack finds no part, then parses the body as
    /// an urlencoded form). (JSON bodies are not read: Laravel takes a top-level `_method` member
    /// from one, see docs/policy.md.) `Err` with the reason for what no check can follow: two
    /// `Content-Type` headers, a second `boundary` or one outside its `boundary=` parameter
    /// (frameworks pick different ones), a boundary RFC 2046 does not allow ([`check_boundary`])
    /// or one holding `,`, a `charset` other than [`FORM_CHARSETS`] (Tomcat and ASP.NET Core
    /// decode the form by it), or a `Content-Encoding` (the body's fields are not its bytes).
    /// `headers` are those the app will get (hop-by-hop ones removed).
    pub(crate) fn of(headers: &HeaderMap) -> Option<Result<Self, String>> {
        let mut types = headers.get_all(header::CONTENT_TYPE).iter();
        let form = match (types.next(), types.next()) {
            (None, _) => Some(Ok(Self::Urlencoded)),
            (Some(_), Some(_)) => Some(Err("two Content-Type headers".to_owned())),
            (Some(value), None) => match value.to_str() {
                Ok(value) => Self::of_type(value),
                Err(_) => Some(Err("a Content-Type that is not text".to_owned())),
            },
        }?;
        let encoded = headers
            .get_all(header::CONTENT_ENCODING)
            .iter()
            .any(|v| !v.as_bytes().trim_ascii().eq_ignore_ascii_case(b"identity"));
        Some(match form {
            Ok(_) if encoded => Err("a form body with a Content-Encoding".to_owned()),
            form => form,
        })
    }

    fn of_type(value: &str) -> Option<Result<Self, String>> {
        let value = value.trim();
        // ASCII lower case: every byte stays where it was, so offsets in it are offsets in `value`.
        let lower = value.to_ascii_lowercase();
        let end = lower.find([';', ',', ' ', '\t']).unwrap_or(lower.len());
        let media = &lower[..end];
        let urlencoded = media.is_empty() || media == "application/x-www-form-urlencoded";
        if !urlencoded && !media.starts_with("multipart/") {
            return None;
        }
        if let Err(refused) = check_charset(&lower) {
            return Some(Err(refused));
        }
        if urlencoded {
            return Some(Ok(Self::Urlencoded));
        }
        Some(multipart_boundary(value, &lower))
    }

    /// The methods the form's `_method` fields name (see [`query_method_overrides`] for how a
    /// name and a value are read). `Err` with the reason for a multipart body whose parts
    /// frameworks would read differently ([`multipart_method_overrides`]).
    pub(crate) fn method_overrides(&self, body: &[u8]) -> Result<Vec<String>, String> {
        match self {
            Self::Urlencoded => Ok(query_method_overrides(Some(&String::from_utf8_lossy(body)))),
            Self::Multipart(boundary) => multipart_method_overrides(body, boundary),
        }
    }
}

/// The boundary of a `multipart/*` Content-Type (`lower`: `value` in ASCII lower case), found as
/// PHP (`strstr`) and Rack (a regex) find it, whatever parameter comes before: the `boundary`
/// followed by `=`, its value quoted or up to `;` or `,`. Refused, as frameworks would read another
/// boundary: a second `boundary=` (Rack takes the last, PHP the first), and any other `boundary`
/// outside that one's value (older PHP takes the first `boundary` anywhere and the first `=` after
/// it: `boundary-x; y=B` is `B` to it), and a boundary holding `,` (only a quoted one can: PHP
/// takes the whole quoted value, Rack's regex stops at the comma). The word inside the boundary's
/// own value is fine: a browser's boundary holds it (`----WebKitFormBoundary...`). No boundary,
/// or an empty one, is no multipart body to any parser: Rack then parses the body as an
/// urlencoded form, and so it is read ([`Form::Urlencoded`]).
fn multipart_boundary(value: &str, lower: &str) -> Result<Form, String> {
    const WORD: &str = "boundary";
    let found: Vec<usize> = lower.match_indices(WORD).map(|(at, _)| at).collect();
    let value_at = |at: usize| value[at + WORD.len()..].trim_start().strip_prefix('=');
    let named: Vec<usize> = found
        .iter()
        .copied()
        .filter(|&at| value_at(at).is_some())
        .collect();
    if named.len() > 1 {
        return Err("a multipart Content-Type naming more than one boundary".to_owned());
    }
    let stray = || {
        "a multipart Content-Type with `boundary` outside its one `boundary=` parameter (older \
         PHP takes the first `=` after any `boundary`)"
            .to_owned()
    };
    let Some(rest) = named.first().and_then(|&at| value_at(at)) else {
        return if found.is_empty() {
            Ok(Form::Urlencoded)
        } else {
            Err(stray())
        };
    };
    let start = value.len() - rest.len();
    let (boundary, len) = param_value(rest);
    let within = start..start + len;
    let inside = |at: usize| within.start <= at && at + WORD.len() <= within.end;
    if found.iter().any(|&at| !named.contains(&at) && !inside(at)) {
        return Err(stray());
    }
    if boundary.is_empty() {
        return Ok(Form::Urlencoded);
    }
    if boundary.contains(',') {
        return Err(
            "a multipart boundary holding `,` (PHP takes the whole quoted value, Rack stops at \
             the comma)"
                .to_owned(),
        );
    }
    check_boundary(&boundary).map(|()| Form::Multipart(boundary))
}

/// The charsets a form may declare by name: those in which the sidecar's bytes are the app's
/// characters for every `_method=` field it reads. Beside them, every single-byte charset whose
/// first 128 codes are ASCII ([`single_byte_ascii`]).
const FORM_CHARSETS: [&str; 6] = ["utf-8", "utf8", "us-ascii", "ascii", "iso-8859-1", "latin1"];

/// Whether `charset` (lower case) names a single-byte charset whose ASCII bytes are ASCII
/// characters, as `_method=` and `&` are in UTF-8: the ISO 8859 parts (`iso-8859-2`,
/// `iso8859-15`, `iso_8859-5`), `latin2`..`latin10`, `windows-1250`..`windows-1258` and their
/// `cp125x` names, KOI8-R and KOI8-U. Multi-byte charsets other than UTF-8 (UTF-16 and -32, UTF-7,
/// ISO-2022, the CJK ones) and EBCDIC are not.
fn single_byte_ascii(charset: &str) -> bool {
    // Digits only, no leading zero (`u32::from_str` also takes `+1` and `01`).
    let numbered = |rest: &str, range: std::ops::RangeInclusive<u32>| {
        !rest.is_empty()
            && rest.bytes().all(|b| b.is_ascii_digit())
            && !rest.starts_with('0')
            && rest.parse::<u32>().is_ok_and(|n| range.contains(&n))
    };
    if let Some(part) = ["iso-8859-", "iso8859-", "iso_8859-"]
        .iter()
        .find_map(|p| charset.strip_prefix(p))
    {
        // There is no ISO 8859-12.
        return numbered(part, 1..=16) && part != "12";
    }
    if let Some(n) = charset
        .strip_prefix("windows-")
        .or_else(|| charset.strip_prefix("cp"))
    {
        return numbered(n, 1250..=1258);
    }
    if let Some(n) = charset.strip_prefix("latin") {
        return numbered(n, 1..=10);
    }
    matches!(charset, "koi8-r" | "koi8-u")
}

/// Refuses a form whose Content-Type (`lower`, in ASCII lower case) declares a charset other than
/// [`FORM_CHARSETS`] (quoted or not): Tomcat and ASP.NET Core decode a form by it, and
/// `_method=DELETE` in UTF-16LE is not the bytes the sidecar looks for. Every `charset=` counts,
/// wherever it stands: Tomcat looks for the text `charset=` anywhere in the value.
fn check_charset(lower: &str) -> Result<(), String> {
    const WORD: &str = "charset";
    for (at, _) in lower.match_indices(WORD) {
        let Some(rest) = lower[at + WORD.len()..].trim_start().strip_prefix('=') else {
            continue;
        };
        let (charset, _) = param_value(rest);
        if !FORM_CHARSETS.contains(&charset.as_str()) && !single_byte_ascii(&charset) {
            return Err(format!(
                "a form in the charset {charset:?} (the sidecar reads forms in {}, or a \
                 single-byte charset whose first 128 codes are ASCII, only)",
                FORM_CHARSETS.join(", ")
            ));
        }
    }
    Ok(())
}

/// A Content-Type parameter's value at the start of `rest` (what follows its `=`): quoted (without
/// its quotes), or up to `;` or `,` (trimmed); with the length of `rest` it takes up.
fn param_value(rest: &str) -> (String, usize) {
    let lead = rest.len() - rest.trim_start().len();
    let rest = &rest[lead..];
    if let Some(quoted) = rest.strip_prefix('"') {
        let close = quoted.find('"').map_or(rest.len(), |i| i + 2);
        (unquote(&rest[..close]), lead + close)
    } else {
        let end = rest.find([';', ',']).unwrap_or(rest.len());
        (rest[..end].trim().to_owned(), lead + end)
    }
}

/// The longest multipart boundary RFC 2046 allows.
pub(crate) const MAX_BOUNDARY: usize = 70;

/// Whether `boundary` is one RFC 2046 allows: 1 to 70 characters of `bchars` (letters, digits,
/// `'()+_,-./:=?` and space), not ending in a space. Checked before a body is searched for it: a
/// peer's boundary is the needle of that search, and one of 16 KiB made each step of it cost 16 KiB
/// of compares; browsers, curl and every multipart library make boundaries within these rules.
fn check_boundary(boundary: &str) -> Result<(), String> {
    if boundary.len() > MAX_BOUNDARY {
        return Err(format!(
            "a multipart boundary of {} bytes: RFC 2046 allows at most {MAX_BOUNDARY}",
            boundary.len()
        ));
    }
    let bchar = |b: u8| b.is_ascii_alphanumeric() || b"'()+_,-./:=? ".contains(&b);
    if let Some(bad) = boundary.bytes().find(|&b| !bchar(b)) {
        return Err(format!(
            "a multipart boundary with the byte {:?}, which RFC 2046 does not allow in one",
            bad as char
        ));
    }
    if boundary.ends_with(' ') {
        return Err(
            "a multipart boundary that ends in a space, which RFC 2046 does not allow".into(),
        );
    }
    Ok(())
}

/// A header parameter's value without its quotes (and `\` escapes inside them).
fn unquote(v: &str) -> String {
    match v.strip_prefix('"').and_then(|v| v.strip_suffix('"')) {
        Some(inner) => {
            let mut out = String::with_capacity(inner.len());
            let mut chars = inner.chars();
            while let Some(c) = chars.next() {
                out.push(if c == '\\' {
                    chars.next().unwrap_or(c)
                } else {
                    c
                });
            }
            out
        }
        None => v.to_owned(),
    }
}

/// The `_method` parts of a `multipart/form-data` body: each part after a `--boundary` (wherever
/// it stands, so that no part an app's parser would find is missed; after the closing delimiter
/// too), its head as [`part_head`] reads it, named as [`head_names_method`] reads a name, its value
/// the rest of the part without the line break before the next boundary (an unterminated last part
/// too). `Err` with the reason for a part whose head frameworks would read differently.
fn multipart_method_overrides(body: &[u8], boundary: &str) -> Result<Vec<String>, String> {
    let delimiter = [b"--", boundary.as_bytes()].concat();
    let delimiter = memchr::memmem::Finder::new(&delimiter);
    let parts = split_on(body, &delimiter).skip(1);
    let mut found = Vec::new();
    for part in parts {
        // The closing delimiter (`--boundary--`) ends the body for most parsers, not for PHP's,
        // which reads on at the next `--boundary` line: parts after it are read too. Nothing but
        // white space after a delimiter holds no field.
        if part.starts_with(b"--") || part.iter().all(u8::is_ascii_whitespace) {
            continue;
        }
        let (head, value) = part_head(part)?;
        if head_names_method(head)? {
            let value = value.strip_suffix(b"\n").unwrap_or(value);
            let value = value.strip_suffix(b"\r").unwrap_or(value);
            found.extend(override_named(Some(value)));
        }
    }
    Ok(found)
}

/// Whether a part's head (its header lines) may name the part `_method` to some framework, each
/// parser's way to a name followed (a peer picks the app it lies to), on bytes (PHP takes any):
/// - `Content-Disposition` followed by a colon, found anywhere in the head in any case (Rack's
///   regex is not anchored: in `X-A: Content-Disposition: form-data; name="_method"` it finds the
///   name, before a real header after it); after the first one, to the end of the head, every
///   `name` parameter counts (Rack 2 reads past the line end, and into quoted values: to it
///   `filename="a;name=_method"` names `_method`), its value read each way a parser reads one
///   ([`any_reading`]), `name*` decoded as RFC 2231;
/// - `Content-ID` followed by a colon, found the same way: Rack names a part by its value (to the
///   end of the line) when its `Content-Disposition` names none.
///
/// A name found so that no framework reads it as `_method` costs only the decision of its value.
/// Linear in the head, however many labels and `name`s it holds: the values are read lazily, and
/// [`names_method`] stops at the first byte that is not `_method`'s. `Err` for RFC 2231
/// continuations (`name*0=`), which Go's parser joins into one name.
fn head_names_method(head: &[u8]) -> Result<bool, String> {
    let lower = head.to_ascii_lowercase();
    let mut named = false;
    // Every later label's parameters are within the first one's.
    if let Some(from) = after_label(&lower, b"content-disposition").next() {
        for at in memchr::memmem::find_iter(&lower[from..], b"name").map(|at| from + at) {
            // Another parameter's name (`filename`, `x-name`); `from` follows a colon.
            if matches!(lower[at - 1], b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_') {
                continue;
            }
            let mut i = at + b"name".len();
            let encoded = lower.get(i) == Some(&b'*');
            if encoded {
                i += 1;
                if lower.get(i).is_some_and(u8::is_ascii_digit) {
                    return Err(
                        "a multipart part named in RFC 2231 continuations (`name*0=`), which \
                         Go's parser joins into one name"
                            .to_owned(),
                    );
                }
            }
            let Some(value) = after_equals(&head[i..]) else {
                continue;
            };
            named |= if encoded {
                // A token or a quoted string (Go), then charset'language'percent-encoded.
                let token = &mut value.iter().copied().take_while(|b| !ends_token(*b));
                names_method(rfc2231_value(token))
                    || quoted(value).is_some_and(|v| names_method(rfc2231_value(v)))
            } else {
                any_reading(value)
            };
        }
    }
    for from in after_label(&lower, b"content-id") {
        let value = &head[from..];
        // Rack's `\s*` (past a line end too), then the rest of the line.
        let value = &value[value
            .iter()
            .position(|b| !b.is_ascii_whitespace())
            .unwrap_or(value.len())..];
        named |= names_method(
            value
                .iter()
                .copied()
                .take_while(|b| !matches!(b, b'\r' | b'\n')),
        ) || any_reading(value);
    }
    Ok(named)
}

/// Offsets in `lower` just past every `label` (lower case) that is followed by a colon (white
/// space before it allowed).
fn after_label<'a>(lower: &'a [u8], label: &'a [u8]) -> impl Iterator<Item = usize> + 'a {
    memchr::memmem::find_iter(lower, label).filter_map(move |at| {
        let rest = &lower[at + label.len()..];
        let colon = rest.iter().position(|b| !matches!(b, b' ' | b'\t'))?;
        (rest[colon] == b':').then_some(lower.len() - rest.len() + colon + 1)
    })
}

/// What follows `=` at the start of `rest` (spaces and tabs around it skipped), if it is there.
fn after_equals(rest: &[u8]) -> Option<&[u8]> {
    let skip = |v: &[u8]| {
        v.iter()
            .position(|b| !matches!(b, b' ' | b'\t'))
            .unwrap_or(v.len())
    };
    let rest = &rest[skip(rest)..];
    let rest = rest.strip_prefix(b"=")?;
    Some(&rest[skip(rest)..])
}

/// Whether `b` ends a token (RFC 2045's `tspecials` and white space).
fn ends_token(b: u8) -> bool {
    b.is_ascii_whitespace() || b"()<>@,;:\\\"/[]?=".contains(&b)
}

/// Whether the parameter value at the start of `v` names `_method` as some parser reads it: an
/// optional `"` then up to `"` or `;` (Rack 2.0), a token (Rack 2.2), up to white space or `;`
/// (PHP's unquoted word), or quoted ([`quoted`]: RFC 7578, Rack 2.2, PHP). Each is read lazily.
fn any_reading(v: &[u8]) -> bool {
    let unquoted = v.strip_prefix(b"\"").unwrap_or(v);
    names_method(
        unquoted
            .iter()
            .copied()
            .take_while(|b| !matches!(b, b'"' | b';')),
    ) || names_method(v.iter().copied().take_while(|b| !ends_token(*b)))
        || names_method(
            v.iter()
                .copied()
                .take_while(|b| !b.is_ascii_whitespace() && *b != b';'),
        )
        || quoted(v).is_some_and(names_method)
}

/// The quoted string at the start of `v`, if it starts with one, without its quotes, lazily: in
/// `"` with `\` escapes, or in `'` (PHP).
fn quoted(v: &[u8]) -> Option<impl Iterator<Item = u8> + '_> {
    let (&quote, rest) = v.split_first()?;
    if quote != b'"' && quote != b'\'' {
        return None;
    }
    let mut bytes = rest.iter().copied();
    Some(
        std::iter::from_fn(move || match bytes.next()? {
            b if b == quote => None,
            b'\\' if quote == b'"' => bytes.next(),
            b => Some(b),
        })
        .fuse(),
    )
}

/// An RFC 2231 value (`charset'language'percent-encoded`) decoded, lazily: the bytes after its
/// second `'` (Go splits at the first two), each `%XX` decoded (a `%` that starts no escape is
/// kept, which [`names_method`] never takes).
fn rfc2231_value(mut encoded: impl Iterator<Item = u8>) -> impl Iterator<Item = u8> {
    let hex = |b: u8| (b as char).to_digit(16).map(|d| d as u8);
    let mut quotes = 0;
    std::iter::from_fn(move || {
        while quotes < 2 {
            if encoded.next()? == b'\'' {
                quotes += 1;
            }
        }
        Some(match encoded.next()? {
            b'%' => match (encoded.next().and_then(hex), encoded.next().and_then(hex)) {
                (Some(h), Some(l)) => (h << 4) | l,
                _ => b'%',
            },
            b => b,
        })
    })
    .fuse()
}

/// A multipart part's head (its header lines, each with its CRLF) and its value, `part` being
/// what follows its `--boundary`: the rest of that line, then header lines up to an empty one. Read
/// strictly, since frameworks read a malformed head each their own way, and a peer picks the way
/// its target app reads: every line ends in CRLF (PHP ends a line at LF alone too, so `\n\r\n` ends
/// its headers where Commons FileUpload reads on to the next CRLFCRLF, into the next part's), each
/// header line has a colon and does not start with a space or tab (PHP and FileUpload append such
/// a line to the header before it: a folded `; name="_method"`), and a header comes before the
/// empty line (FileUpload and Rack look for CRLFCRLF only after the boundary line's CRLF: they
/// read a part's first lines as its headers when it has none). `Err` with the reason otherwise.
fn part_head(part: &[u8]) -> Result<(&[u8], &[u8]), String> {
    let mut rest = part;
    let mut head_start = None;
    let mut boundary_line = true;
    loop {
        let Some(lf) = memchr::memchr(b'\n', rest) else {
            return Err("a multipart part whose headers do not end in an empty line".to_owned());
        };
        let Some(line) = rest[..lf].strip_suffix(b"\r") else {
            return Err("a multipart part with a line ended by LF alone, not CRLF".to_owned());
        };
        let line_start = part.len() - rest.len();
        rest = &rest[lf + 1..];
        if std::mem::take(&mut boundary_line) {
            // The rest of the boundary line: transport padding, or what follows a boundary that
            // stands inside a value (no parser takes it for a header).
            continue;
        }
        match line.first() {
            None => {
                let Some(start) = head_start else {
                    return Err("a multipart part without headers".to_owned());
                };
                return Ok((&part[start..line_start], rest));
            }
            Some(b' ' | b'\t') => {
                return Err(
                    "a multipart part header line that starts with white space (a folded line)"
                        .to_owned(),
                );
            }
            Some(_) if !line.contains(&b':') => {
                return Err("a multipart part header line without a colon".to_owned());
            }
            Some(_) => {
                head_start.get_or_insert(line_start);
            }
        }
    }
}

/// `hay` split at every occurrence of `sep` (not empty). Each search starts where the last one
/// ended, so the whole split is linear in `hay`.
fn split_on<'a>(
    mut hay: &'a [u8],
    sep: &'a memchr::memmem::Finder<'a>,
) -> impl Iterator<Item = &'a [u8]> + 'a {
    let mut done = false;
    std::iter::from_fn(move || {
        if done {
            return None;
        }
        match sep.find(hay) {
            Some(at) => {
                let piece = &hay[..at];
                hay = &hay[at + sep.needle().len()..];
                Some(piece)
            }
            None => {
                done = true;
                Some(hay)
            }
        }
    })
}

/// `s` with `%XX` escapes decoded and `+` as a space (form encoding); `None` for a `%` that does
/// not start an escape.
fn percent_decode(s: &str) -> Option<Vec<u8>> {
    let hex = |b: u8| (b as char).to_digit(16).map(|d| d as u8);
    let mut out = Vec::with_capacity(s.len());
    let mut bytes = s.bytes();
    while let Some(b) = bytes.next() {
        out.push(match b {
            b'%' => (hex(bytes.next()?)? << 4) | hex(bytes.next()?)?,
            b'+' => b' ',
            b => b,
        });
    }
    Some(out)
}

/// The form and method-override parsing above, for the `form_overrides` fuzz target
/// (`fuzz/fuzz_targets/form_overrides.rs`) and nothing else: not an API.
#[doc(hidden)]
pub mod fuzzing {
    use http::HeaderMap;

    /// A request body's form; made only by [`form_of_type`] and [`form_of`], as the inbound gets
    /// one (a multipart boundary is always one they checked).
    #[derive(Debug, Clone, PartialEq, Eq)]
    pub struct Form(super::Form);

    impl Form {
        /// The multipart boundary; `None` for an urlencoded form.
        pub fn boundary(&self) -> Option<&str> {
            match &self.0 {
                super::Form::Urlencoded => None,
                super::Form::Multipart(boundary) => Some(boundary),
            }
        }

        /// [`super::Form::method_overrides`].
        pub fn method_overrides(&self, body: &[u8]) -> Result<Vec<String>, String> {
            self.0.method_overrides(body)
        }
    }

    /// [`super::Form::of_type`]: the form one `Content-Type` value says a body is.
    pub fn form_of_type(value: &str) -> Option<Result<Form, String>> {
        super::Form::of_type(value).map(|form| form.map(Form))
    }

    /// [`super::Form::of`]: the form a request's headers say its body is.
    pub fn form_of(headers: &HeaderMap) -> Option<Result<Form, String>> {
        super::Form::of(headers).map(|form| form.map(Form))
    }

    /// [`super::method_overrides`]: the methods a request's override headers name.
    pub fn method_overrides(headers: &HeaderMap) -> Vec<String> {
        super::method_overrides(headers)
    }
}

/// What a peer's request trailers may not carry to the app: its trailers reach the app as its
/// headers do (hyper's HTTP/1.1 client writes those that the request's `Trailer` header names; h2
/// passes them all), and frameworks read them or merge them into the headers.
pub(crate) fn strip_peer_trailers(trailers: &mut HeaderMap) {
    strip_hop_by_hop(trailers, false);
    trailers.remove(&APP_H2_HINT_NAME);
    strip_peer_headers(trailers);
    // Overrides are decided from the headers only: in trailers they are never let through.
    remove_spellings(trailers, &METHOD_OVERRIDES);
}

/// Whether `name` (a lowercase header name) spells one of `targets` with `_`, `.`, ` ` or `[` for
/// `-`: CGI, WSGI and PHP servers turn `-` into `_`, and PHP turns `.`, ` ` and a first `[` of a
/// variable name into `_` as well (nginx passes `X.Forwarded.Client.Cert` to PHP-FPM as
/// `HTTP_X.FORWARDED.CLIENT.CERT`, which PHP stores as `HTTP_X_FORWARDED_CLIENT_CERT`). A header
/// name cannot hold ` ` or `[`; `.` it can.
fn names_one_of(name: &str, targets: &[&str]) -> bool {
    targets.iter().any(|t| {
        t.len() == name.len()
            && t.bytes()
                .zip(name.bytes())
                .all(|(t, n)| t == n || (t == b'-' && matches!(n, b'_' | b'.' | b' ' | b'[')))
    })
}

/// Removes every peer-sent spelling of [`PEER_HEADERS`].
pub(crate) fn strip_peer_headers(headers: &mut HeaderMap) {
    remove_spellings(headers, &PEER_HEADERS);
}

/// Removes every spelling of `targets` (see [`names_one_of`]).
fn remove_spellings(headers: &mut HeaderMap, targets: &[&str]) {
    // Checked first without allocating: most messages carry none.
    if !headers.keys().any(|n| names_one_of(n.as_str(), targets)) {
        return;
    }
    let doomed: Vec<HeaderName> = headers
        .keys()
        .filter(|n| names_one_of(n.as_str(), targets))
        .cloned()
        .collect();
    for name in doomed {
        headers.remove(name);
    }
}

/// Hop-by-hop and framing names with a `-`, whose `_` spellings ([`names_one_of`]) are dropped
/// wherever the hop-by-hop headers are: hyper and h2 frame a message by `Content-Length` and
/// `Transfer-Encoding` alone and pass `Transfer_Encoding` on as any other header, but servers of
/// the Mongrel family (Thin, Unicorn, Puma before 6.4.3) fold `-` into `_` and would read it as
/// the framing of a body we framed otherwise: a request smuggled behind the one the policy saw.
/// `Content_Type` too: they take it as `CONTENT_TYPE`, the type a `_method` form is read by, where
/// the sidecar reads the body by `Content-Type` alone. (Only `_`: those servers fold nothing else,
/// and PHP, which folds `.` too, takes `CONTENT_TYPE` from the real header alone.)
const FOLDED_FRAMING: [&str; 6] = [
    "content-length",
    "transfer-encoding",
    "content-type",
    "keep-alive",
    "proxy-connection",
    "proxy-authorization",
];

/// Whether `name` spells one of [`FOLDED_FRAMING`] with a `_`.
fn is_folded_framing(name: &HeaderName) -> bool {
    let name = name.as_str();
    name.contains('_') && names_one_of(name, &FOLDED_FRAMING)
}

/// Names, not strings: removing by `&str` parses the name at every call, eight times a request.
static HOP_BY_HOP: [HeaderName; 8] = [
    header::CONNECTION,
    HeaderName::from_static("keep-alive"),
    HeaderName::from_static("proxy-connection"),
    header::PROXY_AUTHENTICATE,
    header::PROXY_AUTHORIZATION,
    header::TE,
    header::TRANSFER_ENCODING,
    header::UPGRADE,
];

/// A short plain-text answer generated by the sidecar.
pub fn reply(status: StatusCode, reason: String) -> Response<Body> {
    let mut resp = Response::new(
        Full::new(Bytes::from(format!("meshid: {reason}\n")))
            .map_err(|never| match never {})
            .boxed(),
    );
    *resp.status_mut() = status;
    resp.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    if let Ok(v) = HeaderValue::from_str(&reason) {
        resp.headers_mut().insert("x-meshid-reason", v);
    }
    resp
}

/// Whether `name` is one of [`HOP_BY_HOP`]: one comparison by length and bytes, where
/// `HOP_BY_HOP.contains` compares with each of the eight in turn.
fn is_hop_by_hop(name: &HeaderName) -> bool {
    matches!(
        name.as_str(),
        "connection"
            | "keep-alive"
            | "proxy-connection"
            | "proxy-authenticate"
            | "proxy-authorization"
            | "te"
            | "transfer-encoding"
            | "upgrade"
    )
}

pub(crate) fn strip_hop_by_hop(headers: &mut HeaderMap, keep_upgrade: bool) {
    // Most requests and responses carry none of them: one pass over the names they do carry
    // says so, where removing each name would hash it and probe the map eight times.
    if !headers
        .keys()
        .any(|n| is_hop_by_hop(n) || is_folded_framing(n))
    {
        return;
    }
    if headers.keys().any(is_folded_framing) {
        let folded: Vec<HeaderName> = headers
            .keys()
            .filter(|n| is_folded_framing(n))
            .cloned()
            .collect();
        for name in folded {
            headers.remove(name);
        }
    }
    // Headers named by `Connection` are hop-by-hop too.
    let named: Vec<HeaderName> = headers
        .get_all(header::CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .filter_map(|n| HeaderName::from_bytes(n.trim().as_bytes()).ok())
        .collect();
    for name in named {
        if !(keep_upgrade && name == header::UPGRADE) {
            headers.remove(name);
        }
    }
    let te_trailers = headers
        .get(header::TE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| {
            v.split(',')
                .any(|t| t.trim().eq_ignore_ascii_case("trailers"))
        });
    for h in &HOP_BY_HOP {
        if keep_upgrade && (*h == header::UPGRADE || *h == header::CONNECTION) {
            continue;
        }
        headers.remove(h);
    }
    if te_trailers {
        headers.insert(header::TE, HeaderValue::from_static("trailers"));
    }
    // An upgrade keeps `Connection`, but only to say so: any other name it lists (another
    // header, ours among them) would have a proxy in front of the app drop that header.
    if keep_upgrade && headers.contains_key(header::CONNECTION) {
        headers.insert(header::CONNECTION, HeaderValue::from_static("upgrade"));
    }
}

/// Drops every `x-meshid-*` header from an app's response. Those are the sidecars' own words (why
/// a request was refused, the decision's ID): a caller that reads one must be able to trust that a
/// sidecar wrote it, not an app imitating a denial.
pub(crate) fn strip_sidecar_headers(headers: &mut http::HeaderMap) {
    const PREFIX: &str = "x-meshid-";
    let ours = |name: &HeaderName| name.as_str().starts_with(PREFIX);
    // Nearly every response has none: look before collecting.
    if headers.keys().any(ours) {
        let names: Vec<HeaderName> = headers.keys().filter(|n| ours(n)).cloned().collect();
        for name in names {
            headers.remove(name);
        }
    }
}

/// Joins a request's `cookie` fields into one, separated by `; `, as an h2 request must be before
/// it goes on as HTTP/1.1 (RFC 9113, 8.2.3): h2 clients send each cookie in a field of its own,
/// and an HTTP/1.1 server expects one `Cookie` line (RFC 6265, 5.4: many read only the first).
/// Allocates only for a request with several.
pub(crate) fn join_cookies(headers: &mut HeaderMap) {
    let mut cookies = headers.get_all(header::COOKIE).iter();
    if cookies.next().is_none() || cookies.next().is_none() {
        return;
    }
    let mut joined = Vec::new();
    for value in headers.get_all(header::COOKIE) {
        if !joined.is_empty() {
            joined.extend_from_slice(b"; ");
        }
        joined.extend_from_slice(value.as_bytes());
    }
    // Each part is a valid value, and `; ` joins them into one.
    if let Ok(value) = HeaderValue::from_bytes(&joined) {
        headers.insert(header::COOKIE, value);
    }
}

/// Whether a request carries more than one `Host` line. A server answers such a request 400
/// (RFC 9112, section 3.2): the hops after us and the app may each read a different one.
pub(crate) fn has_several_hosts(headers: &http::HeaderMap) -> bool {
    let mut hosts = headers.get_all(header::HOST).iter();
    hosts.next().is_some() && hosts.next().is_some()
}

pub(crate) fn is_upgrade<B>(req: &Request<B>) -> bool {
    req.version() == Version::HTTP_11
        && req.headers().contains_key(header::UPGRADE)
        && req
            .headers()
            .get_all(header::CONNECTION)
            .iter()
            .filter_map(|v| v.to_str().ok())
            .any(|v| {
                v.split(',')
                    .any(|t| t.trim().eq_ignore_ascii_case("upgrade"))
            })
}

/// Whether an upgrade request asks for WebSocket, the one upgrade the inbound side passes on (any
/// other `Upgrade` is dropped as a hop-by-hop header and the request served as a plain one).
pub(crate) fn upgrades_to_websocket(headers: &HeaderMap) -> bool {
    let mut tokens = headers
        .get_all(header::UPGRADE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .map(str::trim)
        .filter(|t| !t.is_empty());
    // Exactly one protocol, and it is WebSocket (a list would let the app pick another).
    matches!((tokens.next(), tokens.next()), (Some(t), None) if t.eq_ignore_ascii_case("websocket"))
}

/// What an upgraded connection keeps from the connection it came on, so that a tunnel is bounded
/// like any other connection.
pub(crate) struct Tunnel {
    /// The client side of the upgrade.
    pub client: hyper::upgrade::OnUpgrade,
    /// Held until the tunnel ends: the connection's permit and its count in `connections_open`.
    pub slot: std::sync::Arc<crate::conn::ConnSlot>,
    /// The peer certificate's expiry, when connections end at it.
    pub deadline: Option<tokio::time::Instant>,
    /// Resolves when a new policy no longer allows the request that opened the tunnel.
    pub revoked: std::pin::Pin<Box<dyn std::future::Future<Output = ()> + Send>>,
}

/// The protocol label of a request as it reached the sidecar: `grpc` (h2 with a gRPC content type),
/// `h2` or `http1`.
pub(crate) fn protocol_of<B>(req: &Request<B>) -> crate::metrics::HttpProtocol {
    use crate::metrics::HttpProtocol;
    if is_grpc(req.headers()) {
        HttpProtocol::Grpc
    } else if req.version() == Version::HTTP_2 {
        HttpProtocol::H2
    } else {
        HttpProtocol::Http1
    }
}

pub(crate) fn is_grpc(headers: &HeaderMap) -> bool {
    headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.starts_with("application/grpc"))
}

/// How long a connection may wait for a request head (idle keep-alive included).
pub(crate) fn head_timeout(shared: &Shared) -> Duration {
    shared.limits.idle_timeout.min(Duration::from_secs(60))
}

pub(crate) fn http1_builder(shared: &Shared) -> http1::Builder {
    let mut builder = http1::Builder::new();
    builder
        .timer(TokioTimer::new())
        .header_read_timeout(head_timeout(shared))
        .max_buf_size(shared.limits.max_header_bytes);
    builder
}

/// The h2 server's flow-control windows: what a client may send ahead of what the app has read.
/// The connection window bounds it in all (memory the sidecar holds for an app that does not read
/// its request bodies); a stream may use the whole of it, so that one upload streams at full speed
/// (1 MiB in flight: over 1 GB/s at a 1 ms round trip). hyper's defaults, set here so that the
/// bound is ours.
const H2_CONNECTION_WINDOW: u32 = 1024 * 1024;
const H2_STREAM_WINDOW: u32 = 1024 * 1024;
/// Streams a client may have open at once on one connection. A meshid outbound sends all its
/// app's requests to an upstream over at most `--max-upstream-h2-connections` connections, and
/// opens another only when every stream we allow is in use: one outbound listener gets this many
/// requests in flight per connection it may open (hyper's default, kept: fewer would have a busy
/// outbound answer its app 503 sooner).
const H2_MAX_STREAMS: u32 = 200;
/// Bytes of an answer h2 buffers per stream ahead of the socket before the body is polled again
/// (hyper's default is 400 KiB). The socket's own buffer lies below it, so 64 KiB (four frames)
/// keeps a large answer streaming at full speed, and a client that advertises large windows and
/// then stops reading holds at most 64 KiB per stream, 12.5 MiB per connection
/// ([`H2_MAX_STREAMS`] streams), not 78 MiB.
const H2_SEND_BUFFER: usize = 64 * 1024;

/// The h2 server of both directions: peers' connections at the inbound (a peer holds at most
/// `--max-h2-connections-per-peer` of them), and the local app's at the outbound, whose bounds
/// cost nothing on loopback.
fn h2_builder(
    shared: &Shared,
    streams: std::sync::Arc<crate::streams::Streams>,
) -> auto::Builder<crate::streams::StreamExecutor> {
    let limits = shared.limits;
    let mut builder = auto::Builder::new(crate::streams::StreamExecutor(streams)).http2_only();
    builder
        .http2()
        .timer(TokioTimer::new())
        .initial_connection_window_size(H2_CONNECTION_WINDOW)
        .initial_stream_window_size(H2_STREAM_WINDOW)
        .max_concurrent_streams(H2_MAX_STREAMS)
        .max_send_buf_size(H2_SEND_BUFFER)
        .max_header_list_size(u32::try_from(limits.max_header_bytes).unwrap_or(u32::MAX));
    // No keep-alive PINGs: hyper's ping timer is reset on every frame it reads (2.3% of the
    // inbound's instructions per request), and each PING costs both ends a wake-up and an encrypted
    // round trip. The inbound hands the vanished-peer check to the kernel instead
    // (`meshid_runtime::net::keepalive` on every accepted connection); the outbound's own h2 client
    // pings its upstream, and the outbound's app side is on loopback.
    builder
}

/// A peer's connection, as the inbound hands it to [`serve_connection`].
pub(crate) struct FromPeer {
    /// The connection's place, its peer's share among it: an h2 connection is counted among its
    /// peer's h2 ones ([`crate::conn::ConnSlot::speak_h2`]).
    pub slot: std::sync::Arc<crate::conn::ConnSlot>,
    /// The listener's port (the refusal's metric).
    pub port: u16,
}

/// What a peer's h2 connection past its `--max-h2-connections-per-peer` is sent before it is
/// closed: the server preface (an empty SETTINGS frame), then a GOAWAY that refuses every stream
/// (last stream ID 0) with `ENHANCE_YOUR_CALM` and the flag as its debug data (RFC 9113, 6.5 and
/// 6.8).
const H2_REFUSAL: &[u8] = b"\
    \0\0\0\x04\0\0\0\0\0\
    \0\0\x25\x07\0\0\0\0\0\
    \0\0\0\0\
    \0\0\0\x0b\
    --max-h2-connections-per-peer";

/// How long a refused h2 connection is given to take [`H2_REFUSAL`] and close.
const H2_REFUSAL_LINGER: Duration = Duration::from_secs(1);

/// Counts a peer's connection that opened with the h2 preface among its peer's h2 ones; `false`
/// (counted and logged) when the peer holds `--max-h2-connections-per-peer` already.
fn admit_h2(peer: &FromPeer, shared: &Shared) -> bool {
    let Err(over) = peer.slot.speak_h2() else {
        return true;
    };
    shared
        .metrics
        .refused("inbound", peer.port, "max_h2_connections_per_peer");
    if over.first {
        tracing::warn!(
            peer = peer.slot.peer_id().unwrap_or_default(),
            "peer holds its --max-h2-connections-per-peer; closing its new h2 connections until it \
             closes some"
        );
    }
    false
}

/// Sends a refused h2 connection [`H2_REFUSAL`] and closes it, reading what the client sent
/// meanwhile (closing with it unread would reset the connection, and the client might lose the
/// GOAWAY), for at most [`H2_REFUSAL_LINGER`].
async fn refuse_h2<IO: AsyncRead + AsyncWrite + Unpin>(mut io: IO) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let _ = tokio::time::timeout(H2_REFUSAL_LINGER, async {
        io.write_all(H2_REFUSAL).await?;
        io.shutdown().await?;
        let mut unread = [0u8; 1024];
        while io.read(&mut unread).await? > 0 {}
        Ok::<_, std::io::Error>(())
    })
    .await;
}

/// Serves one HTTP connection with `svc`, draining it gracefully on shutdown, at `deadline`, or
/// when `revoked` resolves (it logs why itself). HTTP/1.x connections let go of hyper's buffers
/// while idle ([`crate::idle`]); `idle` counts them. A peer's connection (`from_peer`: the
/// inbound's) that opens with the h2 preface (whatever ALPN said) is counted among its peer's h2
/// connections, or refused past `--max-h2-connections-per-peer`, and is watched for an h2
/// rapid-reset flood ([`crate::streams::RESET_FLOOD`]).
pub(crate) async fn serve_connection<IO, S, F, R>(
    mut io: IO,
    shared: &Shared,
    deadline: Option<tokio::time::Instant>,
    revoked: R,
    svc: S,
    (idle, from_peer): (Gauge, Option<FromPeer>),
) where
    R: std::future::Future<Output = ()> + Send + Unpin,
    IO: AsyncRead + AsyncWrite + Unpin + Send + 'static,
    S: crate::idle::Handler<F>,
    F: crate::idle::Answer,
{
    match crate::idle::opening(&mut io, head_timeout(shared)).await {
        Opening::H1(prefix) => {
            crate::idle::serve_h1(io, prefix, shared, deadline, revoked, svc, idle).await;
        }
        // Boxed: its state (the idle watch among it) would otherwise size every connection's
        // task, HTTP/1.1 ones included (+0.4 KiB per idle connection, `bench-run --scenarios
        // memory`).
        Opening::H2(prefix) => {
            if let Some(peer) = &from_peer
                && !admit_h2(peer, shared)
            {
                Box::pin(refuse_h2(io)).await;
                return;
            }
            let from_peer = from_peer.is_some();
            Box::pin(serve_h2(
                io, prefix, shared, deadline, revoked, svc, from_peer,
            ))
            .await;
        }
        Opening::Gone => {}
    }
}

/// [`serve_connection`] for a connection that opened with the h2 preface (`prefix`, read already).
async fn serve_h2<IO, S, F, R>(
    io: IO,
    prefix: Bytes,
    shared: &Shared,
    deadline: Option<tokio::time::Instant>,
    revoked: R,
    svc: S,
    from_peer: bool,
) where
    R: std::future::Future<Output = ()> + Send + Unpin,
    IO: AsyncRead + AsyncWrite + Unpin + Send + 'static,
    S: crate::idle::Handler<F>,
    F: crate::idle::Answer,
{
    let io = crate::idle::replay(io, prefix);
    let streams = std::sync::Arc::new(if from_peer {
        crate::streams::Streams::guarding_resets()
    } else {
        crate::streams::Streams::default()
    });
    let counted = streams.clone();
    let svc = move |req: Request<Incoming>| {
        let open = counted.request();
        let answer = svc(req.map(Tracked::untracked), None);
        let counted = counted.clone();
        async move {
            let resp = answer.await?;
            // The sidecar's own answers (a denial) carry its reason: not counted against resets.
            if !resp.headers().contains_key("x-meshid-reason") {
                counted.forwarded();
            }
            Ok::<_, std::convert::Infallible>(
                resp.map(|body| crate::streams::Sending::new(body, open)),
            )
        }
    };
    // Owned and boxed: the connection state is allocated once at its own size rather than inline in
    // every enclosing future, which matters for memory per connection.
    let mut conn = Box::pin(
        h2_builder(shared, streams.clone())
            .serve_connection_with_upgrades(TokioIo::new(io), service_fn(svc))
            .into_owned(),
    );
    let mut shutdown = shared.shutdown.clone();
    let expired = async {
        match deadline {
            Some(d) => tokio::time::sleep_until(d).await,
            None => std::future::pending().await,
        }
    };
    // What ends the connection from outside, or its idle limit: polled only when one of them was
    // woken, not at every wake of this task (several per request).
    let idle_timeout = shared.limits.idle_timeout;
    let ended = std::pin::pin!(async {
        tokio::select! {
            () = meshid_runtime::net::stopped(&mut shutdown) => None,
            () = expired => {
                tracing::info!("closing gracefully: the peer's certificate expired");
                None
            }
            () = revoked => None,
            ending = streams.watch(idle_timeout, &shared.metrics.stalled_responses) => Some(ending),
            () = streams.flooded() => Some(crate::streams::Ending::ResetFlood),
        }
    });
    let ending = tokio::select! {
        r = conn.as_mut() => {
            if let Err(error) = r {
                tracing::debug!(%error, "http connection ended");
            }
            return;
        }
        ending = meshid_runtime::wake::WhenWoken::new(ended) => ending,
    };
    if ending == Some(crate::streams::Ending::Stalled) {
        // Graceful would wait for the very responses the peer does not take.
        shared
            .metrics
            .stalled_responses
            .inc_by(streams.held() as u64);
        // A line per connection an authenticated peer chooses to stall: limited, as denials are.
        static STALLED: meshid_runtime::log_limit::LogLimit =
            meshid_runtime::log_limit::LogLimit::new(10.0, 1.0);
        if let Some(left_out) = STALLED.take() {
            tracing::info!(
                idle_timeout_s = idle_timeout.as_secs(),
                left_out,
                "closing: the h2 peer has not taken a response for the idle timeout (its \
                 flow-control window stays closed)"
            );
        }
        return;
    }
    if ending == Some(crate::streams::Ending::ResetFlood) {
        // Graceful would let it go on sending and resetting until the grace period ends.
        shared.metrics.reset_flood_closes.inc();
        // A peer can flood on connection after connection: a line each, limited.
        static FLOODS: meshid_runtime::log_limit::LogLimit =
            meshid_runtime::log_limit::LogLimit::new(10.0, 1.0);
        if let Some(left_out) = FLOODS.take() {
            tracing::warn!(
                reset = streams.premature(),
                left_out,
                "closing: the h2 peer reset more than {} of its requests within a second and \
                 before their answers, more than half of those the app answered or that were \
                 reset (a rapid-reset flood: each reset frees its stream while the app works on)",
                crate::streams::RESET_FLOOD
            );
        }
        return;
    }
    if ending == Some(crate::streams::Ending::Idle) {
        tracing::debug!("closing gracefully: no h2 request for the idle timeout");
    }
    // Finish in-flight requests; h2 peers get GOAWAY. Within the grace period: a response the peer
    // does not take (even one whose body h2 holds whole, the app's side done) would keep it open.
    conn.as_mut().graceful_shutdown();
    if tokio::time::timeout(shared.limits.grace, conn)
        .await
        .is_err()
    {
        static LATE: meshid_runtime::log_limit::LogLimit =
            meshid_runtime::log_limit::LogLimit::new(10.0, 1.0);
        if let Some(left_out) = LATE.take() {
            tracing::info!(
                grace_s = shared.limits.grace.as_secs(),
                left_out,
                "closing: the h2 peer did not take its responses within the grace period"
            );
        }
    }
}

pub(crate) fn finish_response(
    mut resp: Response<Body>,
    tunnel: Option<Tunnel>,
    shared: &Shared,
) -> Response<Body> {
    let switching = resp.status() == StatusCode::SWITCHING_PROTOCOLS;
    if switching && let Some(tunnel) = tunnel {
        let app_side = hyper::upgrade::on(&mut resp);
        let idle = shared.limits.idle_timeout;
        let mut shutdown = shared.shutdown.clone();
        tokio::spawn(async move {
            let Tunnel {
                client,
                slot,
                deadline,
                revoked,
            } = tunnel;
            let copy = async {
                match tokio::try_join!(client, app_side) {
                    Ok((client, app)) => {
                        let _ = crate::conn::copy_bidirectional_idle(
                            TokioIo::new(client),
                            TokioIo::new(app),
                            idle,
                        )
                        .await;
                    }
                    Err(error) => tracing::debug!(%error, "upgrade failed"),
                }
            };
            let expired = async {
                match deadline {
                    Some(d) => tokio::time::sleep_until(d).await,
                    None => std::future::pending().await,
                }
            };
            tokio::select! {
                () = copy => {}
                () = expired => tracing::info!("closing an upgraded connection: the peer's certificate expired"),
                () = revoked => {}
                () = meshid_runtime::net::stopped(&mut shutdown) => {
                    tracing::debug!("closing an upgraded connection: shutting down");
                }
            }
            drop(slot);
        });
    }
    strip_hop_by_hop(resp.headers_mut(), switching);
    resp
}

/// The innermost error message of a chain (the useful part of a client error).
pub fn root_cause(error: &(dyn std::error::Error + 'static)) -> String {
    let mut current: &(dyn std::error::Error + 'static) = error;
    // Prefer our identity verdict when the handshake failed on it.
    loop {
        if let Some(rustls::Error::InvalidCertificate(rustls::CertificateError::Other(other))) =
            current.downcast_ref::<rustls::Error>()
        {
            return other.0.to_string();
        }
        match current.source() {
            Some(next) => current = next,
            None => return current.to_string(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A refused h2 connection reads as a well-formed refusal to an h2 client: its request fails
    /// with the GOAWAY's `ENHANCE_YOUR_CALM`, not with a protocol error or a reset.
    #[tokio::test]
    async fn a_refused_h2_client_is_told_to_go_away() {
        let (client, mut server) = tokio::io::duplex(64 * 1024);
        let refused = tokio::spawn(async move {
            assert!(matches!(
                crate::idle::opening(&mut server, Duration::from_secs(5)).await,
                Opening::H2(_)
            ));
            refuse_h2(server).await;
        });
        let (mut send, conn) = h2::client::handshake(client).await.unwrap();
        let conn = tokio::spawn(conn);
        let req = Request::get("https://app/").body(()).unwrap();
        let error = match send.send_request(req, true) {
            Ok((answer, _)) => answer.await.unwrap_err(),
            Err(error) => error,
        };
        assert!(error.is_go_away(), "{error}");
        assert_eq!(error.reason(), Some(h2::Reason::ENHANCE_YOUR_CALM));
        // The client closes once told; the refusal ends with it, not at its linger.
        drop((send, conn.await.unwrap()));
        tokio::time::timeout(H2_REFUSAL_LINGER / 2, refused)
            .await
            .expect("the refusal ends when the client closes")
            .unwrap();
    }

    #[test]
    fn hop_by_hop_headers_are_removed() {
        let mut h = HeaderMap::new();
        h.insert("connection", HeaderValue::from_static("close, x-secret"));
        h.insert("x-secret", HeaderValue::from_static("1"));
        h.insert("keep-alive", HeaderValue::from_static("timeout=5"));
        h.insert("te", HeaderValue::from_static("trailers, deflate"));
        h.insert("x-app", HeaderValue::from_static("kept"));
        strip_hop_by_hop(&mut h, false);
        assert!(h.get("connection").is_none());
        assert!(h.get("x-secret").is_none());
        assert!(h.get("keep-alive").is_none());
        assert_eq!(h.get("te").unwrap(), "trailers");
        assert_eq!(h.get("x-app").unwrap(), "kept");
    }

    #[test]
    fn the_quick_check_knows_exactly_the_hop_by_hop_names() {
        for name in &HOP_BY_HOP {
            assert!(is_hop_by_hop(name), "{name}");
        }
        for name in [
            "connections",
            "t",
            "upgrade-insecure-requests",
            "proxy",
            "transfer-encodings",
            "host",
        ] {
            assert!(!is_hop_by_hop(&HeaderName::from_static(name)), "{name}");
        }
    }

    #[test]
    fn each_hop_by_hop_header_is_removed_on_its_own() {
        // Parsed from the wire as the codecs parse them, in any case: the check that skips a map
        // without hop-by-hop headers must still see every one of them.
        for name in [
            "connection",
            "Keep-Alive",
            "proxy-connection",
            "PROXY-AUTHENTICATE",
            "proxy-authorization",
            "te",
            "Transfer-Encoding",
            "upgrade",
        ] {
            let mut h = HeaderMap::new();
            h.insert("x-app", HeaderValue::from_static("kept"));
            h.append(
                HeaderName::from_bytes(name.as_bytes()).unwrap(),
                HeaderValue::from_static("x"),
            );
            strip_hop_by_hop(&mut h, false);
            let left: Vec<&str> = h.keys().map(HeaderName::as_str).collect();
            assert_eq!(left, ["x-app"], "{name}");
        }
        let mut none = HeaderMap::new();
        none.insert("x-app", HeaderValue::from_static("kept"));
        strip_hop_by_hop(&mut none, false);
        assert_eq!(none.len(), 1);
    }

    #[test]
    fn every_spelling_of_the_peer_headers_is_removed() {
        let mut h = HeaderMap::new();
        for name in [
            "x-forwarded-client-cert",
            "X_Forwarded_Client_Cert",
            "x-forwarded_client-cert",
            "x-forwarded-for",
            "x_forwarded_for",
            "forwarded",
            "x-real-ip",
            "X_REAL_IP",
            "x-forwarded-proto",
            "x-forwarded-host",
            "X_Forwarded_Port",
            "x-forwarded-prefix",
            "x-original-url",
            "X-Rewrite-URL",
            "True-Client-IP",
            "client_ip",
            "x-client-ip",
            "X-Cluster-Client-Ip",
            "cf-connecting-ip",
            "fastly_client_ip",
            "Proxy",
            // PHP folds `.` into `_` too: one `$_SERVER` key with the sidecar's own header.
            "x.forwarded.client.cert",
            "X.Forwarded_Client-Cert",
            "X.Real.IP",
            "true.client.ip",
        ] {
            h.append(
                HeaderName::from_bytes(name.as_bytes()).unwrap(),
                HeaderValue::from_static("forged"),
            );
        }
        for kept in [
            "x-forwarded-client-certs",
            "x-forwarded",
            "forwarded-x",
            "x.forwarded",
            "xforwarded-for",
        ] {
            h.insert(kept, HeaderValue::from_static("app"));
        }
        strip_peer_headers(&mut h);
        let mut left: Vec<&str> = h.keys().map(HeaderName::as_str).collect();
        left.sort_unstable();
        assert_eq!(
            left,
            [
                "forwarded-x",
                "x-forwarded",
                "x-forwarded-client-certs",
                "x.forwarded",
                "xforwarded-for"
            ]
        );
        // Space and `[`, which PHP folds into `_` as well, cannot be in a header name; matched
        // all the same, should a name ever hold them.
        assert!(names_one_of("x forwarded[client-cert", &PEER_HEADERS));
        assert!(!names_one_of("x-forwarded-client-cer", &PEER_HEADERS));
    }

    /// `_` spellings of the framing names are dropped (a Mongrel-family server would frame the
    /// body by them); the names themselves are left to the codecs, other `_` names to the app.
    #[test]
    fn underscore_spellings_of_framing_headers_are_removed() {
        for name in [
            "Transfer_Encoding",
            "CONTENT_LENGTH",
            "transfer_Encoding",
            "content_length",
            "Keep_Alive",
            "proxy_connection",
            "Proxy_Authorization",
            // Taken as CONTENT_TYPE: the type a `_method` form is read by.
            "Content_Type",
            "content_type",
        ] {
            let mut h = HeaderMap::new();
            h.insert("content-length", HeaderValue::from_static("58"));
            h.insert("x_app_key", HeaderValue::from_static("kept"));
            h.append(
                HeaderName::from_bytes(name.as_bytes()).unwrap(),
                HeaderValue::from_static("chunked"),
            );
            strip_hop_by_hop(&mut h, false);
            let mut left: Vec<&str> = h.keys().map(HeaderName::as_str).collect();
            left.sort_unstable();
            assert_eq!(left, ["content-length", "x_app_key"], "{name}");
        }
        let mut trailers = HeaderMap::new();
        trailers.insert("transfer_encoding", HeaderValue::from_static("chunked"));
        trailers.insert("x_http_method_override", HeaderValue::from_static("DELETE"));
        trailers.insert("x-http-method", HeaderValue::from_static("DELETE"));
        trailers.insert("grpc-status", HeaderValue::from_static("0"));
        strip_peer_trailers(&mut trailers);
        let left: Vec<&str> = trailers.keys().map(HeaderName::as_str).collect();
        assert_eq!(left, ["grpc-status"]);
    }

    #[test]
    fn form_method_overrides_are_found_in_either_kind_of_form() {
        let headers = |ct: &str| {
            let mut h = HeaderMap::new();
            h.insert(header::CONTENT_TYPE, HeaderValue::from_str(ct).unwrap());
            h
        };
        // No Content-Type: Rack parses a POST's body as a form all the same.
        assert_eq!(Form::of(&HeaderMap::new()), Some(Ok(Form::Urlencoded)));
        assert_eq!(Form::of(&headers("application/json")), None);
        let urlencoded = Form::of(&headers("Application/X-WWW-Form-Urlencoded; charset=utf-8"));
        assert_eq!(urlencoded, Some(Ok(Form::Urlencoded)));
        assert_eq!(
            Form::Urlencoded
                .method_overrides(b"a=1&_method=delete&%5Fmethod=put&payment_method=x")
                .unwrap(),
            ["DELETE", "PUT"]
        );
        let multipart = Form::of(&headers("multipart/form-data; boundary=\"b-1\""));
        assert_eq!(multipart, Some(Ok(Form::Multipart("b-1".into()))));
        let body = b"preamble\r\n--b-1\r\nContent-Disposition: form-data; name=\"title\"\r\n\r\n\
                     _method\r\n--b-1\r\ncontent-disposition: form-data; name=\"_method\"\r\n\r\n\
                     delete\r\n--b-1 \r\nContent-Disposition: form-data; name=_METHOD\r\n\r\n\
                     patch\r\n\
                     --b-1\r\nContent-Disposition: form-data; name*=utf-8''%5Fmethod\r\n\r\nput\r\n\
                     --b-1\r\nContent-Disposition: form-data; name=\"payment_method\"\r\n\r\nx\r\n\
                     --b-1--\r\n--b-1\r\nContent-Disposition: form-data; name=\"_method\"\r\n\r\nget";
        // The part after the closing delimiter too: PHP reads on to it.
        assert_eq!(
            Form::Multipart("b-1".into())
                .method_overrides(body)
                .unwrap(),
            ["DELETE", "PATCH", "PUT", "GET"]
        );
        // An unterminated last part is read too, and nothing after a last delimiter is no part.
        for body in [
            &b"--x\r\nContent-Disposition: form-data; name=\"_method\"\r\n\r\nDELETE"[..],
            b"--x\r\nContent-Disposition: form-data; name=\"_method\"\r\n\r\nDELETE\r\n--x\r\n",
        ] {
            assert_eq!(
                Form::Multipart("x".into()).method_overrides(body).unwrap(),
                ["DELETE"]
            );
        }
        // No usable boundary: Rack finds no part, and parses the body as an urlencoded form.
        for value in [
            "multipart/form-data",
            "multipart/form-data; boundary=",
            "multipart/form-data; boundary=\"\"",
            "multipart/mixed",
        ] {
            assert_eq!(
                Form::of(&headers(value)),
                Some(Ok(Form::Urlencoded)),
                "{value}"
            );
        }
    }

    /// Every spelling of `_method` some framework reads, and every Content-Type some framework
    /// parses a form from, is decided (a peer picks the one its target app reads).
    #[test]
    fn lenient_spellings_of_method_fields_and_form_types_are_read() {
        for query in [
            "+_method=delete",
            "%20_method=delete",
            "_method%00=delete",
            "_method%00x=delete",
            "x=1&  _method=delete",
            "[_method]=delete",
            "_method]=delete",
            "%5B_method%5D=delete",
            ".method=delete",
            "_METHOD=delete",
            "]_method=delete",
            "_method]]=delete",
            "[[_method]]=delete",
            "_method%00%=delete",
            "%6dethod=x&_%6Dethod=delete",
        ] {
            assert_eq!(query_method_overrides(Some(query)), ["DELETE"], "{query}");
        }
        // However many spaces come first.
        let padded = format!("{}_method=delete", "+".repeat(500));
        assert_eq!(query_method_overrides(Some(&padded)), ["DELETE"]);
        for query in ["payment_method=x", "_methods=x", "x_method=x", "method=x"] {
            assert!(query_method_overrides(Some(query)).is_empty(), "{query}");
        }
        let headers = |pairs: &[(&str, &str)]| {
            let mut h = HeaderMap::new();
            for (k, v) in pairs {
                h.append(
                    HeaderName::from_bytes(k.as_bytes()).unwrap(),
                    HeaderValue::from_str(v).unwrap(),
                );
            }
            h
        };
        let of = |pairs: &[(&str, &str)]| Form::of(&headers(pairs));
        let ct = "content-type";
        for value in [
            "application/x-www-form-urlencoded, x",
            "application/x-www-form-urlencoded x",
            "APPLICATION/X-WWW-FORM-URLENCODED;charset=utf-8",
            // The charsets in which the bytes read are the characters the app gets.
            "application/x-www-form-urlencoded; charset=\"UTF-8\"",
            "application/x-www-form-urlencoded; Charset = US-ASCII",
            "application/x-www-form-urlencoded; charset=iso-8859-1",
            // Their aliases, and single-byte charsets whose first 128 codes are ASCII.
            "application/x-www-form-urlencoded; charset=utf8",
            "application/x-www-form-urlencoded; charset=latin1",
            "application/x-www-form-urlencoded; charset=windows-1252",
            "application/x-www-form-urlencoded; charset=cp1251",
            "application/x-www-form-urlencoded; charset=ISO-8859-15",
            "application/x-www-form-urlencoded; charset=iso8859-2",
            "application/x-www-form-urlencoded; charset=KOI8-R",
            // Blank, or no media type: Rack takes an empty CONTENT_TYPE for none, and parses.
            "",
            "  ",
            "; charset=utf-8",
            // Leading white space (h2 passes it; Puma trims it).
            " application/x-www-form-urlencoded",
            "\tapplication/x-www-form-urlencoded",
            // Multipart without a usable boundary: Rack parses the body as urlencoded.
            " multipart/form-data",
            "multipart/related; boundary=\"\"; type=x",
        ] {
            assert_eq!(of(&[(ct, value)]), Some(Ok(Form::Urlencoded)), "{value}");
        }
        for value in [
            "multipart/form-data,boundary=B",
            "multipart/mixed; boundary=B",
            "multipart/related; boundary=\"B\"",
            "multipart/form-data; charset=utf-8, boundary=B",
            "multipart/form-data; x-boundary=B",
            " multipart/form-data; boundary=B",
        ] {
            assert_eq!(
                of(&[(ct, value)]),
                Some(Ok(Form::Multipart("B".into()))),
                "{value}"
            );
        }
        // What no check can follow is refused.
        for pairs in [
            &[(ct, "multipart/form-data; boundary=A; boundary=B")][..],
            &[(ct, "multipart/form-data; xboundary=A; boundary=B")],
            &[
                (ct, "application/x-www-form-urlencoded"),
                (ct, "text/plain"),
            ],
            &[
                (ct, "application/x-www-form-urlencoded"),
                ("content-encoding", "gzip"),
            ],
            &[("content-encoding", "gzip")],
            // Rack's regex takes the last `boundary=`, PHP the first.
            &[(ct, "multipart/form-data; boundary=xboundary=B")],
            // Older PHP takes the first `boundary` anywhere, then the first `=` after it: `B`.
            &[(ct, "multipart/form-data; boundary-x; y=B")],
            &[(ct, "multipart/form-data; boundary=A; x=boundary")],
            &[(ct, "multipart/boundary; y=B")],
            &[(ct, "multipart/form-data; boundary")],
            // PHP takes the whole quoted value, Rack's regex stops at the comma.
            &[(ct, "multipart/form-data; boundary=\"A,XyZ\"")],
            // Tomcat and ASP.NET Core decode the form by its charset; Tomcat finds `charset=`
            // anywhere in the value.
            &[(ct, "application/x-www-form-urlencoded; charset=utf-16le")],
            &[(ct, "application/x-www-form-urlencoded; charset=\"UTF-16\"")],
            &[(ct, "application/x-www-form-urlencoded; xcharset=utf-16le")],
            &[(ct, "application/x-www-form-urlencoded, charset=utf-7")],
            &[(ct, "multipart/form-data; charset=utf-16; boundary=B")],
            &[(ct, "application/x-www-form-urlencoded; charset=utf-32")],
            &[(ct, "application/x-www-form-urlencoded; charset=iso-2022-jp")],
            &[(ct, "application/x-www-form-urlencoded; charset=shift_jis")],
            &[(ct, "application/x-www-form-urlencoded; charset=ibm037")],
            &[(ct, "application/x-www-form-urlencoded; charset=iso-8859-17")],
            &[(
                ct,
                "application/x-www-form-urlencoded; charset=windows-1259",
            )],
            &[(ct, "application/x-www-form-urlencoded; charset=cp037")],
            &[(ct, "application/x-www-form-urlencoded; charset=iso-8859-+1")],
            &[(ct, "application/x-www-form-urlencoded; charset=cp01252")],
            &[(ct, "application/x-www-form-urlencoded; charset=latin01")],
            &[(ct, "application/x-www-form-urlencoded; charset=iso-8859-12")],
        ] {
            assert!(matches!(of(pairs), Some(Err(_))), "{pairs:?}");
        }
        // A part head frameworks read each their own way is refused; `B` is the boundary.
        let form = Form::Multipart("B".into());
        let refused: [&[u8]; 8] = [
            // Folded: PHP and Commons FileUpload append the line to the header before it.
            b"--B\r\nContent-Disposition: form-data\r\n ; name=\"_method\"\r\n\r\nDELETE\r\n--B--",
            b"--B\r\nContent-Disposition: form-data\r\n\t; name=\"_method\"\r\n\r\nDELETE\r\n--B--",
            // A line without a colon: appended to the header before it as well.
            b"--B\r\nContent-Disposition: form-data\r\n; name=\"_method\"\r\n\r\nDELETE\r\n--B--",
            // `\n\r\n` ends PHP's headers (it strips the CR), not FileUpload's.
            b"--B\r\nContent-Disposition: form-data; name=\"_method\"\n\r\nDELETE\r\n--B--",
            // LF alone: PHP reads it, FileUpload reads on to the next CRLFCRLF.
            b"--B\nContent-Disposition: form-data; name=\"_method\"\n\nDELETE\n--B--",
            // No headers: FileUpload and Rack take the part's first lines for them.
            b"--B\r\n\r\nContent-Disposition: form-data; name=\"_method\"\r\n\r\nDELETE\r\n--B--",
            // The boundary inside a header: no parser ends the part there.
            b"--B\r\nContent-Disposition: form-data; x=\"--B\"; name=\"_method\"\r\n\r\nDELETE",
            // Headers that never end.
            b"--B\r\nContent-Disposition: form-data; name=\"_method\"",
        ];
        for body in refused {
            let read = form.method_overrides(body);
            let text = String::from_utf8_lossy(body);
            assert!(read.is_err(), "{text:?}: {read:?}");
        }
        // A part name as some framework finds it in a head: each is decided.
        let named: [&[u8]; 11] = [
            // Rack's regex finds `Content-Disposition:` anywhere, the first one first.
            b"X-A: Content-Disposition: form-data; name=\"_method\"\r\n\
              Content-Disposition: form-data; name=\"title\"",
            b"X-A: x\r\nX-Content-Disposition: form-data; name=\"_method\"",
            // Rack names a part by its Content-ID when no Content-Disposition names it.
            b"Content-ID: _method",
            b"X-A: 1\r\ncontent-id:\t_method ",
            // Rack 2.2 reads past the line end, and into quoted values.
            b"Content-Disposition: form-data\r\nX-B; name=\"_method\": y",
            b"Content-Disposition: form-data; name=\"x\"; filename=\"a;name=_method\"",
            // A token (Rack 2.2), single quotes (PHP), an escape, white space around `:` and `=`.
            b"Content-Disposition: form-data; name=_method x",
            b"content-disposition : form-data; name='_method'",
            b"Content-Disposition: form-data; name=\"\\_method\"",
            b"Content-Disposition: form-data; name = \"_method\"",
            b"Content-Disposition: name=\"_method\"",
        ];
        for head in named {
            let body = [b"--B\r\n", head, b"\r\n\r\ndelete\r\n--B--"].concat();
            let text = String::from_utf8_lossy(head);
            assert_eq!(
                form.method_overrides(&body),
                Ok(vec!["DELETE".to_owned()]),
                "{text:?}"
            );
        }
        // Other parameters and headers name no `_method` part.
        for head in [
            &b"Content-Disposition: form-data; filename=\"_method\""[..],
            b"Content-Disposition: form-data; x-name=\"_method\"; name=\"a\"",
            b"Content-Disposition: form-data; name=\"payment_method\"",
            b"Content-Type: _method\r\nX-ID: _method",
        ] {
            let body = [b"--B\r\n", head, b"\r\n\r\ndelete\r\n--B--"].concat();
            let text = String::from_utf8_lossy(head);
            assert_eq!(form.method_overrides(&body), Ok(vec![]), "{text:?}");
        }
        // RFC 2231 continuations, which Go joins into one name: refused.
        assert!(
            form.method_overrides(
                b"--B\r\nContent-Disposition: form-data; name*0=\"_me\"; name*1=\"thod\"\r\n\r\n\
                  DELETE\r\n--B--"
            )
            .is_err()
        );
        // A byte that is not UTF-8 elsewhere in the header does not hide the name (PHP reads it).
        assert_eq!(
            form.method_overrides(
                b"--B\r\nContent-Disposition: form-data; x=\"\xff\"; name=\"_method\"\r\n\r\n\
                  DELETE\r\n--B--"
            ),
            Ok(vec!["DELETE".to_owned()])
        );
        assert_eq!(
            of(&[
                (ct, "application/x-www-form-urlencoded"),
                ("content-encoding", "identity")
            ]),
            Some(Ok(Form::Urlencoded))
        );
        assert_eq!(of(&[(ct, "text/plain")]), None);
        // A browser's boundary holds the word itself: one boundary all the same.
        for value in [
            "multipart/form-data; boundary=----WebKitFormBoundary7MA4YWxkTrZu0gW",
            "multipart/form-data; boundary=----geckoformboundary4c5a0f0e",
        ] {
            let want = value.split_once('=').unwrap().1.to_owned();
            assert_eq!(
                of(&[(ct, value)]),
                Some(Ok(Form::Multipart(want))),
                "{value}"
            );
        }
    }

    /// A part head of 1 MiB packed with labels, `name`s and their values (each read from where it
    /// starts) is read in linear time: read from each one to the end, it took minutes.
    #[test]
    fn a_part_head_full_of_names_is_read_in_linear_time() {
        let form = Form::Multipart("B".into());
        for unit in [
            &b"content-disposition:"[..],
            b" name=a",
            b" name*=a",
            b" name=\"a",
            b"content-id:",
            b"; name=[",
        ] {
            let mut body = b"--B\r\nX: content-disposition: form-data".to_vec();
            while body.len() < 1 << 20 {
                body.extend_from_slice(unit);
            }
            body.extend_from_slice(b"\r\n\r\nDELETE");
            let start = std::time::Instant::now();
            let _ = form.method_overrides(&body);
            let took = start.elapsed();
            let unit = String::from_utf8_lossy(unit);
            assert!(took < Duration::from_secs(5), "{unit:?}: {took:?}");
        }
    }

    #[test]
    fn a_multipart_boundary_rfc_2046_does_not_allow_is_refused_before_any_search() {
        let headers = |ct: &str| {
            let mut h = HeaderMap::new();
            h.insert(header::CONTENT_TYPE, HeaderValue::from_str(ct).unwrap());
            h
        };
        let of = |boundary: &str| {
            Form::of(&headers(&format!(
                "multipart/form-data; boundary={boundary}"
            )))
        };
        // The attack: a boundary of 16 KiB of dashes, against a body of dashes, made every step of
        // the search compare 16 KiB. It is refused from the header alone.
        let long = "-".repeat(16 * 1024);
        let refused = of(&long).unwrap().unwrap_err();
        assert!(
            refused.contains("16384 bytes") && refused.contains("at most 70"),
            "{refused}"
        );
        assert!(of(&"-".repeat(MAX_BOUNDARY + 1)).unwrap().is_err());
        // Quoted, the same.
        assert!(of(&format!("\"{long}\"")).unwrap().is_err());
        // At the limit, and with every character RFC 2046 allows (a space inside quotes), accepted;
        // but `,`, where Rack's regex ends a boundary that PHP reads on (refused, see
        // `lenient_spellings_of_method_fields_and_form_types_are_read`).
        let longest = "-".repeat(MAX_BOUNDARY);
        assert_eq!(of(&longest), Some(Ok(Form::Multipart(longest.clone()))));
        let every = "\"aZ09'()+_-./:=? x\"";
        assert!(matches!(of(every), Some(Ok(Form::Multipart(_)))));
        // A byte outside them, or a trailing space: refused.
        assert!(of("a<b").unwrap().unwrap_err().contains("'<'"));
        assert!(of("\"ab \"").unwrap().unwrap_err().contains("space"));
        // The longest boundary allowed, of dashes, against a body of dashes (the worst case of the
        // search): nothing found, and the search is linear by construction (`memchr::memmem`).
        let body = vec![b'-'; 1 << 20];
        assert!(
            Form::Multipart(longest)
                .method_overrides(&body)
                .unwrap()
                .is_empty()
        );
    }

    #[test]
    fn query_method_overrides_are_found_in_any_spelling() {
        assert!(query_method_overrides(None).is_empty());
        assert!(query_method_overrides(Some("a=1&method=card&x_method=y")).is_empty());
        assert_eq!(
            query_method_overrides(Some(
                "a=1&_method=delete&%5Fmethod=PUT;_METHOD=+patch+&.method=Get&_%6dethod=x&[method"
            )),
            ["DELETE", "PUT", "PATCH", "GET", "X"]
        );
        assert_eq!(query_method_overrides(Some("_method=%ff")), ["?"]);
        // A name that is not an escape is not `_method` (frameworks keep it as it is).
        assert!(query_method_overrides(Some("_method%=DELETE")).is_empty());
    }

    #[test]
    fn cookie_fields_are_joined_into_one() {
        let mut h = HeaderMap::new();
        h.insert(header::COOKIE, HeaderValue::from_static("a=1"));
        join_cookies(&mut h);
        assert_eq!(
            h.get_all(header::COOKIE).iter().collect::<Vec<_>>(),
            ["a=1"]
        );
        h.append(header::COOKIE, HeaderValue::from_static("b=2"));
        h.append(header::COOKIE, HeaderValue::from_static("c=3"));
        join_cookies(&mut h);
        assert_eq!(
            h.get_all(header::COOKIE).iter().collect::<Vec<_>>(),
            ["a=1; b=2; c=3"]
        );
        let mut none = HeaderMap::new();
        join_cookies(&mut none);
        assert!(none.is_empty());
    }

    #[test]
    fn upgrade_headers_survive_when_upgrading() {
        let mut h = HeaderMap::new();
        h.insert("connection", HeaderValue::from_static("Upgrade"));
        h.insert("upgrade", HeaderValue::from_static("websocket"));
        strip_hop_by_hop(&mut h, true);
        assert_eq!(h.get("upgrade").unwrap(), "websocket");
        assert_eq!(h.get("connection").unwrap(), "upgrade");
    }

    #[test]
    fn an_upgrade_keeps_connection_only_to_say_upgrade() {
        // Another name in the list would have a proxy in front of the app drop that header: ours.
        let mut h = HeaderMap::new();
        h.insert(
            "connection",
            HeaderValue::from_static("Upgrade, x-forwarded-client-cert, keep-alive"),
        );
        h.insert("upgrade", HeaderValue::from_static("websocket"));
        h.insert(
            "x-forwarded-client-cert",
            HeaderValue::from_static("forged"),
        );
        strip_hop_by_hop(&mut h, true);
        assert_eq!(
            h.get_all("connection").iter().collect::<Vec<_>>(),
            ["upgrade"]
        );
        assert!(!h.contains_key("x-forwarded-client-cert"));
    }

    #[test]
    fn method_overrides_are_found_in_any_spelling() {
        let mut h = HeaderMap::new();
        assert!(method_overrides(&h).is_empty());
        h.insert(
            "x-http-method-override",
            HeaderValue::from_static(" DELETE "),
        );
        h.insert("X_HTTP_Method", HeaderValue::from_static("PUT"));
        h.insert(
            "x-method-override",
            HeaderValue::from_bytes(b"\xff").unwrap(),
        );
        h.insert("x-http-method-overrides", HeaderValue::from_static("PATCH"));
        // PHP reads `X.HTTP.Method.Override` as `X-HTTP-Method-Override` (`.` folded into `_`).
        h.insert("x.http.method.override", HeaderValue::from_static("PURGE"));
        h.insert("X.Method_Override", HeaderValue::from_static("TRACE"));
        // Upper-cased, as frameworks take it (and as query and form values are).
        h.insert("x_method_override", HeaderValue::from_static(" get"));
        let mut found = method_overrides(&h);
        found.sort_unstable();
        assert_eq!(found, ["?", "DELETE", "GET", "PURGE", "PUT", "TRACE"]);
    }

    #[test]
    fn peer_trailers_lose_what_only_the_sidecar_says() {
        let mut t = HeaderMap::new();
        t.insert(
            "x-forwarded-client-cert",
            HeaderValue::from_static("URI=spiffe://td/ns/x/sa/admin"),
        );
        t.insert("X_Forwarded_For", HeaderValue::from_static("10.0.0.1"));
        t.insert("x-meshid-app-h2", HeaderValue::from_static("1"));
        t.insert("transfer-encoding", HeaderValue::from_static("chunked"));
        t.insert("grpc-status", HeaderValue::from_static("0"));
        strip_peer_trailers(&mut t);
        assert_eq!(
            t.keys().map(HeaderName::as_str).collect::<Vec<_>>(),
            ["grpc-status"]
        );
    }
}
