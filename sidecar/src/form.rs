//! The methods a request asks the app to take it as, beside its own: override headers
//! (`X-HTTP-Method-Override`...), a query's `_method`, the `_method` fields of a form body
//! (urlencoded or multipart) and the top-level `_method` members of a JSON one ([`json`]), each read as the most lenient framework reads it, since a peer picks
//! the app it lies to. This module parses and reports: the methods it finds, or the reason a form
//! cannot be checked. The inbound ([`crate::inbound::http`]) decides each method found as it
//! decides the request's own, and what to answer for a form that cannot be checked.

use http::header::{self, HeaderMap};

use crate::http::names_one_of;

mod json;

/// Request headers that ask the app to take the request as another method (Express's
/// `method-override`, Spring's `HiddenHttpMethodFilter` variants, OData, Google's APIs): the inbound
/// decides the methods they name as it decides the request's own, so that a peer allowed `POST`
/// cannot have the app `DELETE`. Matched as [`PEER_HEADERS`](crate::http::PEER_HEADERS) are (`X.HTTP.Method.Override` is
/// one: PHP reads it as `X-HTTP-Method-Override`).
pub const METHOD_OVERRIDES: [&str; 3] = [
    "x-http-method-override",
    "x-http-method",
    "x-method-override",
];

/// The most distinct methods one request may name in method overrides (its headers, query and
/// body together, its own method aside): each is a decision, and a form of thousands of `_method`
/// fields was thousands of decisions and strings held for the response's life. Beyond, 400 (in
/// audit mode, the rest go undecided).
pub const MAX_OVERRIDES: usize = 8;

/// Adds `method` to `found` unless it is there already; `false` once `found` holds
/// `MAX_OVERRIDES + 2` methods, to stop reading: one of them may be the request's own, and the
/// others are then one more than a request may name, so it is refused whatever came after.
/// Every list of methods below is made this way: each method once, at most `MAX_OVERRIDES + 2`.
fn add_distinct(found: &mut Vec<String>, method: String) -> bool {
    if !found.contains(&method) {
        found.push(method);
    }
    found.len() < MAX_OVERRIDES + 2
}

/// The methods `headers` ask the app to take the request as ([`METHOD_OVERRIDES`]), each trimmed
/// and upper-cased as frameworks take it (Rack and Symfony upper-case it; a value that is not text
/// is given as `?`, which no method rule names).
pub(crate) fn method_overrides(headers: &HeaderMap) -> Vec<String> {
    let mut found = Vec::new();
    if !headers
        .keys()
        .any(|n| names_one_of(n.as_str(), &METHOD_OVERRIDES))
    {
        return found;
    }
    for (_, v) in headers
        .iter()
        .filter(|(n, _)| names_one_of(n.as_str(), &METHOD_OVERRIDES))
    {
        let method = v
            .to_str()
            .map_or_else(|_| "?".to_owned(), |v| v.trim().to_ascii_uppercase());
        if !add_distinct(&mut found, method) {
            break;
        }
    }
    found
}

/// The methods a request's query asks the app to take it as: `_method=...`, which Laravel and
/// Symfony, Express's `method-override('_method')` and Spring's `HiddenHttpMethodFilter` read
/// from the query. Pairs are split at `&` and `;`; a name is percent-decoded with PHP's folding of
/// `.`, ` ` and `[` into `_` (so `.method` and `%5Fmethod` are `_method` too) and compared in any
/// case; a value is percent-decoded, trimmed and upper-cased, as those frameworks take it (one
/// that is not UTF-8 is given as `?`, which no method rule names; an empty one is none).
pub(crate) fn query_method_overrides(query: Option<&str>) -> Vec<String> {
    let mut found = Vec::new();
    let Some(query) = query else {
        return found;
    };
    for pair in query.split(['&', ';']) {
        let (name, value) = pair.split_once('=').unwrap_or((pair, ""));
        if !names_method(lenient_decode(name)) {
            continue;
        }
        if let Some(method) = override_named(percent_decode(value).as_deref())
            && !add_distinct(&mut found, method)
        {
            break;
        }
    }
    found
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
            // `_method[]` and `_method[0]` are an array to `qs` (Express, Koa), whose
            // method-override takes its first element.
            0 | b'[' => return true,
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
/// `_method` field from an `application/x-www-form-urlencoded` or `multipart/form-data` body, and
/// Laravel a top-level `_method` member from a JSON one.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Form {
    Urlencoded,
    /// With its boundary (one that names none is [`Form::Urlencoded`]).
    Multipart(String),
    /// A `Content-Type` holding `/json` or `+json` anywhere (Laravel's test), no form type.
    Json,
    /// A form type whose `Content-Type` value also holds `/json` or `+json` (`multipart/form-data;
    /// x=/json`): Rack reads the body as the form, Laravel as JSON, so it is read both ways.
    AlsoJson(Box<Form>),
}

impl Form {
    /// The form a request's `Content-Type` says its body is, if any, read as the most lenient
    /// framework reads it: none is a form (Rack parses a `POST` without one), and so is a blank
    /// one or one with an empty media type (Rack takes an empty `CONTENT_TYPE` for none), the
    /// value is trimmed first (Puma trims what h2 may send with a leading space), the media type
    /// ends at `;`, `,` or a space (PHP), any `multipart/*` is multipart (Rack), and a multipart
    /// type without a usable boundary is urlencoded (Rack finds no part, then parses the body as
    /// an urlencoded form), and one holding `/json` or `+json` anywhere is JSON to Laravel
    /// ([`Form::Json`], or [`Form::AlsoJson`] beside a form type). `Err` with the reason for what no check can follow: two
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
            Ok(Self::Json) if encoded => Err("a JSON body with a Content-Encoding".to_owned()),
            Ok(_) if encoded => Err("a form body with a Content-Encoding".to_owned()),
            form => form,
        })
    }

    fn of_type(value: &str) -> Option<Result<Self, String>> {
        let value = value.trim();
        // ASCII lower case: every byte stays where it was, so offsets in it are offsets in `value`.
        let lower = value.to_ascii_lowercase();
        // ASP.NET Core skips white space on both sides of the `/` (`application /json`): cut at
        // the first space, the type would be `application`, and the body read by no one here.
        let region = &lower[..lower.find([';', ',']).unwrap_or(lower.len())];
        if let Some(slash) = region.find('/')
            && (region[..slash].ends_with([' ', '\t'])
                || region[slash + 1..].starts_with([' ', '\t']))
        {
            return Some(Err(
                "a Content-Type with white space beside its `/` (ASP.NET Core reads the type \
                 without it)"
                    .to_owned(),
            ));
        }
        let end = lower.find([';', ',', ' ', '\t']).unwrap_or(lower.len());
        let media = &lower[..end];
        let urlencoded = media.is_empty() || media == "application/x-www-form-urlencoded";
        // Laravel's `isJson()`: the whole value, parameters too, in any case here.
        let json = lower.contains("/json") || lower.contains("+json");
        if !urlencoded && !media.starts_with("multipart/") {
            // Express's JSON parser decodes the body by any `utf-*` charset (UTF-16, UTF-7): its
            // `{"_method":"DELETE"}` is not the bytes the sidecar looks for.
            return json.then(|| check_charset(&lower).map(|()| Self::Json));
        }
        if let Err(refused) = check_charset(&lower) {
            return Some(Err(refused));
        }
        let form = if urlencoded {
            Ok(Self::Urlencoded)
        } else {
            multipart_boundary(value, &lower)
        };
        Some(match form {
            Ok(form) if json => Ok(Self::AlsoJson(Box::new(form))),
            form => form,
        })
    }

    /// The methods the form's `_method` fields name (see [`query_method_overrides`] for how a
    /// name and a value are read). `Err` with the reason for a multipart body whose parts
    /// frameworks would read differently ([`multipart_method_overrides`]).
    pub(crate) fn method_overrides(&self, body: &[u8]) -> Result<Vec<String>, String> {
        match self {
            Self::Urlencoded => Ok(query_method_overrides(Some(&String::from_utf8_lossy(body)))),
            Self::Multipart(boundary) => multipart_method_overrides(body, boundary),
            Self::Json => Ok(json::method_overrides(body)),
            Self::AlsoJson(form) => {
                let mut found = form.method_overrides(body)?;
                for method in json::method_overrides(body) {
                    if !add_distinct(&mut found, method) {
                        break;
                    }
                }
                Ok(found)
            }
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
            if let Some(method) = override_named(Some(value))
                && !add_distinct(&mut found, method)
            {
                break;
            }
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
            // An RFC 2047 encoded word: Tomcat's FileUpload decodes a value that starts with `=?`
            // (white space before it is kept, and words after others stay apart), so only such a
            // value can turn into `_method`. A `filename` after it may hold one (.NET's
            // `MultipartFormDataContent` encodes non-ASCII file names so).
            if value
                .strip_prefix(b"\"")
                .unwrap_or(value)
                .starts_with(b"=?")
            {
                return Err(
                    "a multipart part named with an RFC 2047 encoded word (`=?charset?B?...?=`), \
                     which Tomcat's FileUpload decodes"
                        .to_owned(),
                );
            }
            if encoded {
                // The charset: up to the first `'`, among the first bytes (no charset's name is
                // longer; with no `'` there, nothing decodes the value as RFC 2231).
                let value = value.strip_prefix(b"\"").unwrap_or(value);
                let value = &value[..value.len().min(MAX_CHARSET_NAME)];
                let charset = &value[..memchr::memchr(b'\'', value).unwrap_or(0)];
                let charset = String::from_utf8_lossy(charset).to_ascii_lowercase();
                if !charset.is_empty()
                    && !FORM_CHARSETS.contains(&charset.as_str())
                    && !single_byte_ascii(&charset)
                {
                    return Err(format!(
                        "a multipart part named in the charset {charset:?} (Tomcat decodes an \
                         RFC 2231 name by its charset)"
                    ));
                }
            }
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

/// The longest charset name read in an RFC 2231 value (IANA's longest is 45 characters).
const MAX_CHARSET_NAME: usize = 64;

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
        /// The multipart boundary; `None` for an urlencoded form or a JSON body.
        pub fn boundary(&self) -> Option<&str> {
            fn of(form: &super::Form) -> Option<&str> {
                match form {
                    super::Form::Urlencoded | super::Form::Json => None,
                    super::Form::Multipart(boundary) => Some(boundary),
                    super::Form::AlsoJson(form) => of(form),
                }
            }
            of(&self.0)
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

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use http::header::{HeaderName, HeaderValue};

    use super::*;

    #[test]
    fn form_method_overrides_are_found_in_either_kind_of_form() {
        let headers = |ct: &str| {
            let mut h = HeaderMap::new();
            h.insert(header::CONTENT_TYPE, HeaderValue::from_str(ct).unwrap());
            h
        };
        // No Content-Type: Rack parses a POST's body as a form all the same.
        assert_eq!(Form::of(&HeaderMap::new()), Some(Ok(Form::Urlencoded)));
        assert_eq!(Form::of(&headers("text/plain")), None);
        // JSON, as Laravel's `isJson()` finds it: `/json` or `+json` anywhere in the value.
        for json in [
            "application/json",
            "Application/JSON; charset=UTF-8",
            "application/vnd.api+json",
            "text/plain; x=/json",
        ] {
            assert_eq!(Form::of(&headers(json)), Some(Ok(Form::Json)), "{json}");
        }
        assert_eq!(
            Form::Json
                .method_overrides(br#"{"a":{"_method":"get"},"_method":"delete"}"#)
                .unwrap(),
            ["DELETE"]
        );
        // A form type that says JSON too is read both ways.
        let both = Form::of(&headers("multipart/form-data; boundary=b; x=/json"));
        assert_eq!(
            both,
            Some(Ok(Form::AlsoJson(Box::new(Form::Multipart("b".into())))))
        );
        let both = Form::of(&headers("application/x-www-form-urlencoded; x=a+json"));
        assert_eq!(both, Some(Ok(Form::AlsoJson(Box::new(Form::Urlencoded)))));
        assert_eq!(
            Form::AlsoJson(Box::new(Form::Urlencoded))
                .method_overrides(br#"{"_method":"DELETE","x":"&_method=put&"}"#)
                .unwrap(),
            ["PUT", "DELETE"]
        );
        // A JSON body with a Content-Encoding cannot be read either.
        let mut encoded = headers("application/json");
        encoded.insert(header::CONTENT_ENCODING, HeaderValue::from_static("gzip"));
        assert_eq!(
            Form::of(&encoded),
            Some(Err("a JSON body with a Content-Encoding".to_owned()))
        );
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
            "_method[]=delete",
            "_method[0]=delete",
            "_method%5B%5D=delete",
            "_method%5b0%5d=delete",
            "_method ][]=delete",
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
            // Express decodes JSON by any `utf-*` charset.
            &[(ct, "application/json; charset=utf-16le")],
            &[(ct, "application/json; charset=utf-7")],
            &[(ct, "text/plain; charset=utf-32; x=/json")],
            // ASP.NET Core skips white space beside the `/`.
            &[(ct, "application /x-www-form-urlencoded")],
            &[(ct, "multipart/\tform-data; boundary=B")],
            &[(ct, "application/ json")],
        ] {
            assert!(matches!(of(pairs), Some(Err(_))), "{pairs:?}");
        }
        // A part head frameworks read each their own way is refused; `B` is the boundary.
        let form = Form::Multipart("B".into());
        let refused: [&[u8]; 11] = [
            // An RFC 2047 encoded word (`_method` in Base64), which Tomcat's FileUpload decodes.
            b"--B\r\nContent-Disposition: form-data; name=\"=?UTF-8?B?X21ldGhvZA==?=\"\r\n\r\nDELETE\r\n--B--",
            b"--B\r\nContent-Disposition: form-data; name==?utf-8?q?=5Fmethod?=\r\n\r\nDELETE\r\n--B--",
            // An RFC 2231 name in UTF-16LE, which Tomcat decodes by its charset.
            b"--B\r\nContent-Disposition: form-data; name*=UTF-16LE''%5F%00m%00e%00t%00h%00o%00d%00\r\n\r\nDELETE\r\n--B--",
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
        // Other parameters and headers name no `_method` part; an encoded word in another
        // parameter (.NET's non-ASCII file names) is no name.
        for head in [
            &b"Content-Disposition: form-data; name=\"files\"; filename=\"=?utf-8?B?w6kucG5n?=\""[..],
            b"Content-Disposition: form-data; filename=\"_method\"",
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

    /// Each method once, and reading stops at `MAX_OVERRIDES + 2` of them (one may be the
    /// request's own; the rest are then too many, so the request is refused whatever follows).
    #[test]
    fn methods_are_listed_once_each_and_reading_stops_past_the_most_a_request_may_name() {
        let names = |n: u8| -> Vec<String> {
            (b'A'..b'A' + n)
                .map(|c| format!("M{}", c as char))
                .collect()
        };
        let fields = |n: u8, sep: &str| -> String {
            names(n)
                .iter()
                .map(|m| format!("_method={m}{sep}"))
                .collect::<String>()
                .repeat(50)
        };
        let most = MAX_OVERRIDES + 2;
        assert_eq!(
            query_method_overrides(Some(&"_method=get&".repeat(1_000))),
            ["GET"]
        );
        assert_eq!(query_method_overrides(Some(&fields(9, "&"))), names(9));
        assert_eq!(query_method_overrides(Some(&fields(20, "&"))).len(), most);
        let form = Form::Urlencoded
            .method_overrides(fields(20, "&").as_bytes())
            .unwrap();
        assert_eq!(form.len(), most);
        let multipart: String = names(20)
            .iter()
            .map(|m| {
                format!("--B\r\nContent-Disposition: form-data; name=\"_method\"\r\n\r\n{m}\r\n")
            })
            .collect::<String>()
            .repeat(3);
        let found = Form::Multipart("B".into())
            .method_overrides(multipart.as_bytes())
            .unwrap();
        assert_eq!(found.len(), most);
        let json: String = format!(
            "{{{}\"a\":1}}",
            names(20)
                .iter()
                .map(|m| format!("\"_method\":\"{m}\","))
                .collect::<String>()
                .repeat(3)
        );
        assert_eq!(json::method_overrides(json.as_bytes()).len(), most);
        let also = Form::AlsoJson(Box::new(Form::Urlencoded));
        assert_eq!(also.method_overrides(json.as_bytes()).unwrap().len(), most);
        let mut headers = HeaderMap::new();
        for m in names(20).iter().cycle().take(60) {
            headers.append("x-http-method-override", HeaderValue::from_str(m).unwrap());
        }
        assert_eq!(method_overrides(&headers).len(), most);
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
}
