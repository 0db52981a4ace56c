//! The parts of a rule: SPIFFE ID patterns, HTTP methods and request-path patterns, each parsed
//! from one YAML string (so a bad value is reported at its own line and column).
//!
//! Request paths are matched byte for byte, never decoded. Because every rule allows, a path
//! spelled differently from the rule (say `/%61pi` for `/api`) simply does not match and is denied.
//! The dangerous spellings are the ones that match a rule here but mean another path to the
//! application after it normalizes or decodes them (`/public/../admin`, `/public/%2e%2e/admin`,
//! `/public/..%2fadmin`, `/public\..\admin`, and for lenient or legacy decoders
//! `/public/%c0%ae%c0%ae/admin` or `/public/%u002e%u002e/admin`); [`is_safe_path`] rejects those
//! outright.

use std::fmt;

use crate::{SpiffeId, SpiffeIdError};

/// Why a pattern in a rule is invalid; shown after the value, as in `"/a*": '*' is only ...`.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub(super) enum PatternError {
    #[error("'*' is not allowed in the trust domain")]
    WildcardTrustDomain,
    #[error("'*' must be a whole path segment")]
    PartialWildcard,
    #[error("not a spiffe id pattern: {0}")]
    Id(SpiffeIdError),
    #[error("an http method is one or more ascii letters, like GET")]
    Method,
    #[error("a path must start with '/'")]
    PathStart,
    #[error("'*' is only allowed as a final \"/*\"")]
    PathWildcard,
    #[error("a path may only have printable ascii characters other than '?' and '#'")]
    PathChar,
    #[error(
        "a path with a '.' or '..' segment, \"//\", '\\', a '%' not followed by two hex digits, or \
        an encoded '/', '\\', '.', '%', control character, overlong utf-8 or look-alike of '.', '/' \
        or '\\' never matches"
    )]
    UnsafePath,
}

/// A SPIFFE ID in which `*` stands for exactly one whole path segment.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) struct IdPattern {
    text: String,
    trust_domain: String,
    segments: Vec<Segment>,
    /// The ID itself when no segment is `*`: matched as one string (every request is matched
    /// against the rules, and most rules name one ID).
    exact: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
enum Segment {
    Any,
    Exact(String),
}

impl IdPattern {
    /// Parses `spiffe://td/a/*/c`: the pattern, with each `*` segment replaced by a valid segment,
    /// must be a valid SPIFFE ID.
    pub(super) fn parse(text: &str) -> Result<Self, PatternError> {
        // With the scheme right, pieces 0..3 are "spiffe:", "" and the trust domain.
        let mut wildcards = Vec::new();
        let mut pieces: Vec<&str> = text.split('/').collect();
        for (i, piece) in pieces.iter_mut().enumerate().skip(3) {
            if *piece == "*" {
                *piece = "x";
                wildcards.push(i - 3);
            }
        }
        let id = SpiffeId::parse(&pieces.join("/")).map_err(|e| match e {
            SpiffeIdError::TrustDomainChar('*') => PatternError::WildcardTrustDomain,
            SpiffeIdError::PathChar('*') => PatternError::PartialWildcard,
            other => PatternError::Id(other),
        })?;
        let segments = id
            .segments()
            .enumerate()
            .map(|(i, s)| {
                if wildcards.contains(&i) {
                    Segment::Any
                } else {
                    Segment::Exact(s.to_owned())
                }
            })
            .collect();
        Ok(Self {
            text: text.to_owned(),
            trust_domain: id.trust_domain_name().to_owned(),
            segments,
            exact: wildcards.is_empty().then(|| id.as_str().to_owned()),
        })
    }

    /// Same trust domain, same number of segments, and every non-`*` segment equal (byte-exact).
    pub(super) fn matches(&self, id: &SpiffeId) -> bool {
        // With no `*`, that is the same string: `spiffe://`, the trust domain (no '/' in it),
        // then the segments, each after one '/'.
        if let Some(exact) = &self.exact {
            return id.as_str() == exact;
        }
        if id.trust_domain_name() != self.trust_domain {
            return false;
        }
        let mut peer = id.segments();
        for want in &self.segments {
            match (want, peer.next()) {
                (_, None) => return false,
                (Segment::Any, Some(_)) => {}
                (Segment::Exact(want), Some(got)) if want != got => return false,
                (Segment::Exact(_), Some(_)) => {}
            }
        }
        peer.next().is_none()
    }

    pub(super) fn as_str(&self) -> &str {
        &self.text
    }

    pub(super) fn trust_domain(&self) -> &str {
        &self.trust_domain
    }

    /// Whether this pattern matches every ID that `other` matches.
    pub(super) fn covers(&self, other: &IdPattern) -> bool {
        self.trust_domain == other.trust_domain
            && self.segments.len() == other.segments.len()
            && self
                .segments
                .iter()
                .zip(&other.segments)
                .all(|pair| match pair {
                    (Segment::Any, _) => true,
                    (Segment::Exact(a), Segment::Exact(b)) => a == b,
                    (Segment::Exact(_), Segment::Any) => false,
                })
    }
}

/// An HTTP method token, matched exactly (case-sensitive).
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) struct Method(String);

impl Method {
    pub(super) fn parse(text: &str) -> Result<Self, PatternError> {
        if text.is_empty() || !text.bytes().all(|b| b.is_ascii_alphabetic()) {
            return Err(PatternError::Method);
        }
        Ok(Self(text.to_owned()))
    }

    pub(super) fn as_str(&self) -> &str {
        &self.0
    }
}

/// A request path: exact, or every path under a prefix when written as `/prefix/*`.
///
/// `/api/*` matches `/api/` and anything below it, not `/api` itself; `/*` matches every path.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) enum PathPattern {
    Exact(String),
    /// The prefix keeps its trailing '/'.
    Prefix(String),
}

impl PathPattern {
    pub(super) fn parse(text: &str) -> Result<Self, PatternError> {
        if !text.starts_with('/') {
            return Err(PatternError::PathStart);
        }
        if text
            .bytes()
            .any(|b| !b.is_ascii_graphic() || b == b'?' || b == b'#')
        {
            return Err(PatternError::PathChar);
        }
        let (body, prefix) = match text.strip_suffix("/*") {
            Some(body) => (&text[..=body.len()], true),
            None => (text, false),
        };
        if body.contains('*') {
            return Err(PatternError::PathWildcard);
        }
        if !is_safe_path(body) {
            return Err(PatternError::UnsafePath);
        }
        let body = body.to_owned();
        Ok(if prefix {
            Self::Prefix(body)
        } else {
            Self::Exact(body)
        })
    }

    /// `path` must already be safe (see [`is_safe_path`]) and have no query.
    pub(super) fn matches(&self, path: &str) -> bool {
        match self {
            Self::Exact(want) => path == want,
            Self::Prefix(prefix) => path.starts_with(prefix.as_str()),
        }
    }

    /// Whether this pattern matches every path that `other` matches.
    pub(super) fn covers(&self, other: &PathPattern) -> bool {
        match (self, other) {
            (Self::Exact(a), Self::Exact(b)) => a == b,
            (Self::Exact(_), Self::Prefix(_)) => false,
            (Self::Prefix(prefix), Self::Exact(path) | Self::Prefix(path)) => {
                path.starts_with(prefix.as_str())
            }
        }
    }
}

/// Whether a request path (without its query) can be matched without being misread.
///
/// Deliberately strict: it must start with '/', and it must not contain a `.` or `..` segment
/// (also when followed by `;params`, as some servers strip those), an empty segment (`//`), a
/// backslash, a NUL, or an escape that is unsafe to decode (see [`safe_escapes`]). Such a path is
/// denied whatever the rules say, because the application may resolve it to a different path
/// than the one matched here.
pub(super) fn is_safe_path(path: &str) -> bool {
    let bytes = path.as_bytes();
    is_plain_path(bytes) || is_safe_path_in_full(path)
}

/// [`is_safe_path`] without its shortcut for plain paths.
fn is_safe_path_in_full(path: &str) -> bool {
    let bytes = path.as_bytes();
    if bytes.first() != Some(&b'/') || path.contains("//") || path.contains(['\\', '\0']) {
        return false;
    }
    if !safe_escapes(bytes) || has_look_alike(bytes) {
        return false;
    }
    // A segment's name ends at its first ';' (path parameters: Tomcat and Jetty strip them), or at
    // a `%3b`, which a front proxy that decodes before it forwards (nginx with a URI in
    // `proxy_pass`) turns into one: `..%3b` is `..;`, which such a stack resolves to `..`.
    !path.split('/').any(|segment| {
        let b = segment.as_bytes();
        let end = (0..b.len())
            .find(|&i| {
                b[i] == b';'
                    || (b[i] == b'%'
                        && b.get(i + 1) == Some(&b'3')
                        && matches!(b.get(i + 2), Some(b'b' | b'B')))
            })
            .unwrap_or(b.len());
        let name = &segment[..end];
        name == "." || name == ".."
    })
}

/// The common case, settled in one pass: a '/' first, then only letters, digits, `-`, `_`, `~`
/// and single '/'s. With no '.', no '%', no '\\', no control or non-ASCII byte and no empty
/// segment, none of [`is_safe_path`]'s refusals can apply.
fn is_plain_path(bytes: &[u8]) -> bool {
    let [b'/', rest @ ..] = bytes else {
        return false;
    };
    let mut after_slash = true;
    for &b in rest {
        if b == b'/' {
            if after_slash {
                return false;
            }
            after_slash = true;
        } else if b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'~') {
            after_slash = false;
        } else {
            return false;
        }
    }
    true
}

/// Characters that an app's Unicode normalisation (NFKC) or a Windows "best fit" conversion to a
/// code page turns into a '.', a '/' or a '\\' (fullwidth and small forms, leaders and the
/// ellipsis, `℀` = "a/c", the division and fraction slashes, set minus): a path matched here as one
/// segment would become a dot segment or two segments in such an app.
#[rustfmt::skip]
const LOOK_ALIKES: &[char] = &[
    // '.', "..", "..." (one and two dot leaders, ellipsis, small and fullwidth full stops, and
    // the vertical presentation forms of the two dot leader and the ellipsis)
    '\u{2024}', '\u{2025}', '\u{2026}', '\u{FE52}', '\u{FF0E}', '\u{FE30}', '\u{FE19}',
    // '/' (fullwidth solidus, division slash, fraction slash, big solidus)
    '\u{FF0F}', '\u{2215}', '\u{2044}', '\u{29F8}',
    // '\\' (fullwidth and small reverse solidus, set minus, reverse solidus operator, big one)
    '\u{FF3C}', '\u{FE68}', '\u{2216}', '\u{29F5}', '\u{29F9}',
    // "a/c", "a/s", "c/o", "c/u"
    '\u{2100}', '\u{2101}', '\u{2105}', '\u{2106}',
    // '\\' in the Japanese and Korean code pages (cp932's yen sign, cp949's won sign), and so to
    // Windows' best-fit conversion into them
    '\u{00A5}', '\u{20A9}',
];

/// Whether the path, raw or percent-decoded (its escapes already checked by [`safe_escapes`]),
/// holds one of the [`LOOK_ALIKES`]. None is ASCII, so an ASCII path with no escape of a byte
/// from 0x80 on is passed over without decoding.
fn has_look_alike(bytes: &[u8]) -> bool {
    let high_escape = |s: &[u8]| matches!(escaped(s), Some(0x80..=0xff));
    if bytes.is_ascii() && !bytes.windows(3).any(high_escape) {
        return false;
    }
    let mut decoded = Vec::with_capacity(bytes.len());
    let mut rest = bytes;
    while let Some((&b, tail)) = rest.split_first() {
        match escaped(rest) {
            Some(byte) => {
                decoded.push(byte);
                rest = &rest[3..];
            }
            None => {
                decoded.push(b);
                rest = tail;
            }
        }
    }
    String::from_utf8_lossy(&decoded).contains(LOOK_ALIKES)
}

/// Whether every `%` in a path starts an escape that no decoder, however lenient, turns into a
/// separator, a dot, a `%` or a control character. Refused, in any case:
/// - a `%` not followed by two hex digits: IIS's `%u002e` is a '.', and a decoder that leaves
///   `%2%65` alone hands `%2e` to one that decodes again;
/// - `%2f` '/', `%5c` '\\', `%2e` '.', and `%25` '%' (double encoding, for apps that decode twice);
/// - `%00` to `%1f` and `%7f`: a C string ends at the NUL, and some apps strip the others;
/// - UTF-8 that spells ASCII in more bytes than it takes (overlong: `%c0%ae` is '.', `%c0%af` '/',
///   `%c1%9c` '\\', `%e0%80%ae` '.'), which legacy decoders accept: every `%c0`, `%c1`, and `%f5`
///   to `%ff` (never in UTF-8; old decoders read `%f8` and `%fc` as five- and six-byte forms), and
///   `%e0` or `%f0` unless the next escape makes a sequence too long to be ASCII (`%e0%a0` to
///   `%e0%bf`, `%f0%90` to `%f0%bf`), since a decoder that skips checks may take raw bytes after
///   them. Other UTF-8 (`%c3%a9`, `%e2%82%ac`, `%f0%9f%98%80`) and Latin-1 (`%e9`) stay.
fn safe_escapes(bytes: &[u8]) -> bool {
    let mut rest = bytes;
    while let Some(at) = rest.iter().position(|&b| b == b'%') {
        rest = &rest[at..];
        let Some(byte) = escaped(rest) else {
            return false;
        };
        rest = &rest[3..];
        let unsafe_byte = match byte {
            b'/' | b'\\' | b'.' | b'%' | 0x00..=0x1f | 0x7f | 0xc0 | 0xc1 | 0xf5..=0xff => true,
            0xe0 => !matches!(escaped(rest), Some(0xa0..=0xbf)),
            0xf0 => !matches!(escaped(rest), Some(0x90..=0xbf)),
            _ => false,
        };
        if unsafe_byte {
            return false;
        }
    }
    true
}

/// The byte that the `%XX` escape at the start of `s` stands for, if it is one.
fn escaped(s: &[u8]) -> Option<u8> {
    let hex = |b: u8| match b {
        b'0'..=b'9' => Some(b - b'0'),
        b'a'..=b'f' => Some(b - b'a' + 10),
        b'A'..=b'F' => Some(b - b'A' + 10),
        _ => None,
    };
    match s {
        [b'%', high, low, ..] => Some((hex(*high)? << 4) | hex(*low)?),
        _ => None,
    }
}

/// A value quoted for an error message, shortened so that a huge value does not flood the log.
pub(super) struct Shown<'a>(pub(super) &'a str);

impl fmt::Display for Shown<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        const MAX: usize = 100;
        match self.0.char_indices().nth(MAX) {
            Some((cut, _)) => write!(f, "{:?}...", &self.0[..cut]),
            None => write!(f, "{:?}", self.0),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn id(s: &str) -> SpiffeId {
        SpiffeId::parse(s).unwrap()
    }

    #[test]
    fn id_pattern_matching() {
        // (pattern, peer, matches)
        #[rustfmt::skip]
        let cases = [
            ("spiffe://td/ns/a/sa/b", "spiffe://td/ns/a/sa/b", true),
            ("spiffe://td/ns/a/sa/b", "spiffe://td/ns/a/sa/B", false),
            ("spiffe://td/ns/a/sa/b", "spiffe://other/ns/a/sa/b", false),
            ("spiffe://td/ns/a/sa/b", "spiffe://td/ns/a/sa/b/c", false),
            ("spiffe://td/ns/a/sa/*", "spiffe://td/ns/a/sa/x", true),
            ("spiffe://td/ns/a/sa/*", "spiffe://td/ns/a/sa", false),
            ("spiffe://td/ns/a/sa/*", "spiffe://td/ns/a/sa/x/y", false),
            ("spiffe://td/ns/a/sa/*", "spiffe://td2/ns/a/sa/x", false),
            ("spiffe://td/ns/a/sa/*", "spiffe://td.evil/ns/a/sa/x", false),
            ("spiffe://td/ns/*/sa/x", "spiffe://td/ns/q/sa/x", true),
            ("spiffe://td/ns/*/sa/x", "spiffe://td/ns/q/r/sa/x", false),
            ("spiffe://td/ns/*/sa/x", "spiffe://td/ns/sa/x", false),
            ("spiffe://td/*", "spiffe://td/a", true),
            ("spiffe://td/*", "spiffe://td/a/b", false),
            ("spiffe://td/*/*", "spiffe://td/a/b", true),
            ("spiffe://td/*/*", "spiffe://td/a", false),
            ("spiffe://td/ns/a/sa/b", "spiffe://td/ns/a/sa/bc", false),
            ("spiffe://td/ns/a/sa/b", "spiffe://td/ns/a/sab", false),
            ("spiffe://td/a", "spiffe://t/d/a", false),
        ];
        for (pattern, peer, expected) in cases {
            let matches = IdPattern::parse(pattern).unwrap().matches(&id(peer));
            assert_eq!(matches, expected, "{pattern} vs {peer}");
        }
    }

    #[test]
    fn a_plain_path_is_one_the_full_check_finds_safe() {
        // Every path of up to five bytes over an alphabet with the bytes that matter.
        let alphabet = b"/a-_~.%2e;\\";
        let mut paths = vec![String::new()];
        let mut plain = 0;
        for _ in 0..5 {
            paths = paths
                .iter()
                .flat_map(|p| alphabet.iter().map(move |&b| format!("{p}{}", b as char)))
                .collect();
            for path in &paths {
                if is_plain_path(path.as_bytes()) {
                    plain += 1;
                    assert!(is_safe_path_in_full(path), "{path:?}");
                }
            }
        }
        assert!(plain > 100, "only {plain} plain paths were tried");
        for unsafe_path in [
            "//",
            "/a//b",
            "/.",
            "/a/..",
            "/%2e",
            "a",
            "",
            "/a\\b",
            "/\u{ff0e}",
        ] {
            assert!(!is_plain_path(unsafe_path.as_bytes()), "{unsafe_path:?}");
        }
        for plain_path in ["/", "/api/v1/users/42", "/a-b_c~d/"] {
            assert!(is_plain_path(plain_path.as_bytes()), "{plain_path:?}");
        }
    }

    #[test]
    fn id_pattern_rejections() {
        use PatternError::*;
        let cases: &[(&str, PatternError)] = &[
            ("spiffe://*/a", WildcardTrustDomain),
            ("spiffe://td*/a", WildcardTrustDomain),
            ("spiffe://td/a*", PartialWildcard),
            ("spiffe://td/*a/b", PartialWildcard),
            ("spiffe://td/**", PartialWildcard),
            ("spiffe://td/a/*/", Id(SpiffeIdError::TrailingSlash)),
            ("spiffe://td//*", Id(SpiffeIdError::EmptySegment)),
            ("spiffe://td", Id(SpiffeIdError::MissingPath)),
            ("http://td/*", Id(SpiffeIdError::WrongScheme)),
            ("spiffe://TD/*", Id(SpiffeIdError::TrustDomainChar('T'))),
            ("spiffe://td/a?x=*", Id(SpiffeIdError::Query)),
            ("", Id(SpiffeIdError::Empty)),
        ];
        for (text, want) in cases {
            let got = IdPattern::parse(text);
            assert_eq!(got.as_ref().err(), Some(want), "{text:?}");
        }
    }

    #[test]
    fn covering() {
        let id = |s| IdPattern::parse(s).unwrap();
        #[rustfmt::skip]
        let ids = [
            ("spiffe://td/ns/a/sa/*", "spiffe://td/ns/a/sa/b", true),
            ("spiffe://td/ns/a/sa/*", "spiffe://td/ns/a/sa/*", true),
            ("spiffe://td/ns/*/sa/*", "spiffe://td/ns/a/sa/*", true),
            ("spiffe://td/ns/a/sa/b", "spiffe://td/ns/a/sa/*", false),
            ("spiffe://td/ns/a/sa/*", "spiffe://td2/ns/a/sa/b", false),
            ("spiffe://td/ns/a/sa/*", "spiffe://td/ns/a/sa/b/c", false),
            ("spiffe://td/*", "spiffe://td/ns/a", false),
        ];
        for (a, b, want) in ids {
            assert_eq!(id(a).covers(&id(b)), want, "{a} covers {b}");
        }
        let path = |s| PathPattern::parse(s).unwrap();
        #[rustfmt::skip]
        let paths = [
            ("/api/*", "/api/v1", true), ("/api/*", "/api/v1/*", true), ("/*", "/x", true),
            ("/api/*", "/api", false), ("/api", "/api/*", false), ("/a", "/a", true),
            ("/a", "/b", false), ("/api/v1/*", "/api/*", false),
        ];
        for (a, b, want) in paths {
            assert_eq!(path(a).covers(&path(b)), want, "{a} covers {b}");
        }
    }

    #[test]
    fn methods() {
        for ok in ["GET", "POST", "get", "PROPFIND"] {
            assert_eq!(Method::parse(ok).unwrap().as_str(), ok);
        }
        for bad in ["", "GE T", "M-SEARCH", "GET\0", "*", "GÉT"] {
            assert_eq!(Method::parse(bad), Err(PatternError::Method), "{bad:?}");
        }
    }

    #[test]
    fn path_patterns() {
        use PatternError::*;
        let exact = PathPattern::parse("/metrics").unwrap();
        assert!(exact.matches("/metrics"));
        assert!(!exact.matches("/metrics/"));
        assert!(!exact.matches("/metricsx"));
        let prefix = PathPattern::parse("/api/*").unwrap();
        assert!(prefix.matches("/api/"));
        assert!(prefix.matches("/api/v1/x"));
        assert!(!prefix.matches("/api"));
        assert!(!prefix.matches("/apix/y"));
        let everything = PathPattern::parse("/*").unwrap();
        assert!(everything.matches("/anything/at/all"));
        let bad: &[(&str, PatternError)] = &[
            ("metrics", PathStart),
            ("", PathStart),
            ("*", PathStart),
            ("/a*", PathWildcard),
            ("/*/a", PathWildcard),
            ("/a/*/*", PathWildcard),
            ("/a b", PathChar),
            ("/a?b", PathChar),
            ("/a#b", PathChar),
            ("/é", PathChar),
            ("/a/../b", UnsafePath),
            ("//a", UnsafePath),
            ("/a/%2e/*", UnsafePath),
            ("/a/%c0%ae/*", UnsafePath),
            ("/a%00", UnsafePath),
            ("/a/%u002e", UnsafePath),
        ];
        for (text, want) in bad {
            let got = PathPattern::parse(text);
            assert_eq!(got.as_ref().err(), Some(want), "{text:?}");
        }
    }

    #[test]
    fn safe_paths() {
        #[rustfmt::skip]
        let safe = [
            "/", "/a", "/a/", "/a/b.c", "/.well-known/x", "/a..b", "/a/...", "/%41", "/a;b", "/%20",
            // UTF-8 that is not overlong, and Latin-1, stay: no decoder makes ASCII of them.
            "/caf%c3%a9", "/caf%C3%A9", "/%e2%82%ac", "/%e0%a0%80", "/%f0%9f%98%80", "/%f0%90%80%80",
            "/caf%e9", "/%c2%a0", "/%df%bf", "/%ef%bf%bd", "/%f4%8f%bf%bf", "/%80", "/a%7e",
            "/a%3bb", "/a..%3b", "/...%3b/x",
        ];
        for ok in safe {
            assert!(is_safe_path(ok), "{ok:?}");
        }
        #[rustfmt::skip]
        let not_safe = [
            "", "a", "*", "/.", "/..", "/a/./b", "/a/../b", "/a/..;x/b", "/a/.;/b", "//a", "/a//b",
            "/a\\b", "/a\0b", "/a%2fb", "/a%2Fb", "/a%5cb", "/a%5Cb", "/%2e%2e/x", "/%2E", "/..%2f", "/a%252fb",
            // Encoded control characters, NUL first.
            "/a%00", "/a%00.jpg", "/a%01", "/a%0a", "/a%0D", "/a%09", "/a%1f", "/a%7f", "/a%7F",
            // Overlong UTF-8 for '.', '/' and '\\', in two, three and four bytes, any case.
            "/%c0%ae%c0%ae/x", "/%C0%AE", "/..%c0%af", "/%c0%2f", "/%c1%9c", "/%c1%1c", "/%c0%80",
            "/%e0%80%ae", "/%E0%80%AF", "/%e0%9f%bf", "/%e0.", "/%e0", "/%e0/x", "/%f0%80%80%ae",
            "/%f0%8f%bf%bf", "/%f0", "/%f0%2e",
            // Lead bytes no UTF-8 has, which old decoders read as five- and six-byte forms.
            "/%f5%80%80%80", "/%f8%80%80%80%ae", "/%fc%80%80%80%80%ae", "/%fe", "/%FF",
            // Not an escape: IIS's %u form, and lone or short '%'s a second decoder may complete.
            "/%u002e%u002e/x", "/%U002F", "/%u2215", "/a%", "/a%2", "/a%g0", "/%2%65", "/%%32%65",
            // Look-alikes that NFKC or a best-fit code page makes '.', '/' or '\\', escaped or raw.
            "/%ef%bc%8e%ef%bc%8e/admin", "/%EF%BC%8E", "/a%ef%bc%8fb", "/a%ef%bc%bcb", "/%e2%80%a5",
            "/%e2%80%a4%e2%80%a4", "/x%e2%80%a6", "/%ef%b9%92", "/%ef%b9%a8", "/a%e2%88%95b",
            "/a%e2%81%84b", "/a%e2%88%96b", "/%e2%84%80", "/%e2%84%85", "/a\u{ff0e}\u{ff0e}/b",
            "/a\u{2215}b", "/caf%c3%a9/%ef%bc%8f", "/public/%ef%b8%b0/admin", "/a/\u{fe30}/b",
            "/a/%EF%B8%99/b", "/public/..%C2%A5admin", "/a/..\u{a5}b", "/a/..%e2%82%a9b",
            // `%3b` is a ';' to a proxy that decodes before it forwards: `..%3b` is `..;`.
            "/public/..%3b/admin", "/a/..%3Bx/b", "/a/.%3b/b",
        ];
        for bad in not_safe {
            assert!(!is_safe_path(bad), "{bad:?}");
        }
    }

    #[test]
    fn long_values_are_shortened_in_errors() {
        let long = "x".repeat(500);
        let shown = Shown(&long).to_string();
        assert!(shown.len() < 110 && shown.ends_with("..."), "{shown}");
        assert_eq!(Shown("é").to_string(), "\"é\"");
    }
}
