//! The parts of a rule: SPIFFE ID patterns, HTTP methods and request-path patterns, each parsed
//! from one YAML string (so a bad value is reported at its own line and column).
//!
//! Request paths are matched byte for byte, never decoded. Because every rule allows, a path
//! spelled differently from the rule (say `/%61pi` for `/api`) simply does not match and is denied.
//! The dangerous spellings are the ones that match a rule here but mean another path to the
//! application after it normalizes or decodes them (`/public/../admin`, `/public/%2e%2e/admin`,
//! `/public/..%2fadmin`, `/public\..\admin`); [`is_safe_path`] rejects those outright.

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
        "a path with a '.' or '..' segment, \"//\", '\\' or an encoded '/', '\\' or '.' \
        never matches"
    )]
    UnsafePath,
}

/// A SPIFFE ID in which `*` stands for exactly one whole path segment.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) struct IdPattern {
    text: String,
    trust_domain: String,
    segments: Vec<Segment>,
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
        })
    }

    /// Same trust domain, same number of segments, and every non-`*` segment equal (byte-exact).
    pub(super) fn matches(&self, id: &SpiffeId) -> bool {
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
/// backslash, a NUL, or a percent-encoded `/`, `\`, `.` or `%` (`%2f`, `%5c`, `%2e`, `%25`, any case). Such a
/// path is denied whatever the rules say, because the application may resolve it to a different
/// path than the one matched here.
pub(super) fn is_safe_path(path: &str) -> bool {
    let bytes = path.as_bytes();
    if bytes.first() != Some(&b'/') || path.contains("//") || path.contains(['\\', '\0']) {
        return false;
    }
    let encoded_separator = bytes.windows(3).any(|w| {
        w[0] == b'%'
            && matches!(
                (w[1], w[2].to_ascii_lowercase()),
                // %2f '/', %5c '\\', %2e '.', and %25 '%' (double encoding, for apps that decode twice)
                (b'2', b'f') | (b'5', b'c') | (b'2', b'e') | (b'2', b'5')
            )
    });
    if encoded_separator {
        return false;
    }
    !path.split('/').any(|segment| {
        let name = segment.split(';').next().unwrap_or(segment);
        name == "." || name == ".."
    })
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
        ];
        for (pattern, peer, expected) in cases {
            let matches = IdPattern::parse(pattern).unwrap().matches(&id(peer));
            assert_eq!(matches, expected, "{pattern} vs {peer}");
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
        ];
        for (text, want) in bad {
            let got = PathPattern::parse(text);
            assert_eq!(got.as_ref().err(), Some(want), "{text:?}");
        }
    }

    #[test]
    fn safe_paths() {
        #[rustfmt::skip]
        let safe = ["/", "/a", "/a/", "/a/b.c", "/.well-known/x", "/a..b", "/a/...", "/%41", "/a;b"];
        for ok in safe {
            assert!(is_safe_path(ok), "{ok:?}");
        }
        #[rustfmt::skip]
        let not_safe = [
            "", "a", "*", "/.", "/..", "/a/./b", "/a/../b", "/a/..;x/b", "/a/.;/b", "//a", "/a//b",
            "/a\\b", "/a\0b", "/a%2fb", "/a%2Fb", "/a%5cb", "/a%5Cb", "/%2e%2e/x", "/%2E", "/..%2f", "/a%252fb",
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
