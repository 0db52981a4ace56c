//! Strict SPIFFE IDs: `spiffe://<trust-domain>/<segment>/<segment>...`.
//!
//! Follows the SPIFFE ID specification and is stricter where the specification allows latitude: the
//! scheme must be exactly `spiffe://` in lowercase, a workload ID must have a path, and no
//! percent-encoding is accepted (the allowed characters never need it).

use std::fmt;
use std::str::FromStr;

/// The longest SPIFFE ID accepted, in bytes (as the SPIFFE specification requires of implementations).
pub const MAX_ID_LEN: usize = 2048;
/// The longest trust domain name accepted, in bytes (a DNS name's limit).
pub const MAX_TRUST_DOMAIN_LEN: usize = 255;

const SCHEME: &str = "spiffe://";

/// Why a string is not a SPIFFE ID. Messages are lowercase and say which rule was broken.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum SpiffeIdError {
    #[error("spiffe id is empty")]
    Empty,
    #[error("spiffe id is longer than {MAX_ID_LEN} bytes")]
    TooLong,
    #[error("spiffe id must start with \"spiffe://\"")]
    WrongScheme,
    #[error("trust domain is missing")]
    MissingTrustDomain,
    #[error("trust domain is longer than {MAX_TRUST_DOMAIN_LEN} bytes")]
    TrustDomainTooLong,
    #[error("trust domain must not contain a port")]
    Port,
    #[error("spiffe id must not contain userinfo")]
    UserInfo,
    #[error("spiffe id must not contain a query")]
    Query,
    #[error("spiffe id must not contain a fragment")]
    Fragment,
    #[error(
        "trust domain has a character other than lowercase letters, digits, '.', '-' and '_': {0:?}"
    )]
    TrustDomainChar(char),
    #[error("spiffe id has no path")]
    MissingPath,
    #[error("path has an empty segment")]
    EmptySegment,
    #[error("path has a '.' or '..' segment")]
    DotSegment,
    #[error("path has a trailing '/'")]
    TrailingSlash,
    #[error("path has a character other than letters, digits, '.', '-' and '_': {0:?}")]
    PathChar(char),
}

/// A validated trust domain name, e.g. `cluster.local`.
#[derive(Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct TrustDomain(String);

impl TrustDomain {
    /// Parses a bare trust domain name (no scheme).
    pub fn new(name: &str) -> Result<Self, SpiffeIdError> {
        if name.is_empty() {
            return Err(SpiffeIdError::MissingTrustDomain);
        }
        if name.len() > MAX_TRUST_DOMAIN_LEN {
            return Err(SpiffeIdError::TrustDomainTooLong);
        }
        for c in name.chars() {
            match c {
                'a'..='z' | '0'..='9' | '.' | '-' | '_' => {}
                ':' => return Err(SpiffeIdError::Port),
                '@' => return Err(SpiffeIdError::UserInfo),
                '?' => return Err(SpiffeIdError::Query),
                '#' => return Err(SpiffeIdError::Fragment),
                other => return Err(SpiffeIdError::TrustDomainChar(other)),
            }
        }
        Ok(Self(name.to_owned()))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for TrustDomain {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl fmt::Debug for TrustDomain {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "TrustDomain({})", self.0)
    }
}

impl FromStr for TrustDomain {
    type Err = SpiffeIdError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Self::new(s)
    }
}

/// A validated workload SPIFFE ID. Only constructors that check every rule exist.
#[derive(Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct SpiffeId {
    /// The whole ID, `spiffe://td/path`.
    id: String,
    /// Byte offset of the path's leading '/'.
    path_start: usize,
}

impl SpiffeId {
    /// Parses and validates a SPIFFE ID.
    pub fn parse(input: &str) -> Result<Self, SpiffeIdError> {
        if input.is_empty() {
            return Err(SpiffeIdError::Empty);
        }
        if input.len() > MAX_ID_LEN {
            return Err(SpiffeIdError::TooLong);
        }
        let rest = input
            .strip_prefix(SCHEME)
            .ok_or(SpiffeIdError::WrongScheme)?;
        // Query and fragment are reported as such wherever they appear.
        if rest.contains('#') {
            return Err(SpiffeIdError::Fragment);
        }
        if rest.contains('?') {
            return Err(SpiffeIdError::Query);
        }
        let (td, path) = match rest.find('/') {
            Some(i) => rest.split_at(i),
            None => (rest, ""),
        };
        TrustDomain::new(td)?;
        validate_path(path)?;
        Ok(Self {
            id: input.to_owned(),
            path_start: SCHEME.len() + td.len(),
        })
    }

    /// Builds `spiffe://<td>/<segments joined by '/'>`, validating every segment.
    pub fn from_segments(td: &TrustDomain, segments: &[&str]) -> Result<Self, SpiffeIdError> {
        let mut id = String::with_capacity(SCHEME.len() + td.0.len() + 32);
        id.push_str(SCHEME);
        id.push_str(&td.0);
        for s in segments {
            // A '/' inside a segment would smuggle in extra segments.
            if s.contains('/') {
                return Err(SpiffeIdError::PathChar('/'));
            }
            id.push('/');
            id.push_str(s);
        }
        Self::parse(&id)
    }

    /// The Kubernetes workload identity `spiffe://<td>/ns/<namespace>/sa/<service-account>`.
    pub fn for_service_account(
        td: &TrustDomain,
        namespace: &str,
        service_account: &str,
    ) -> Result<Self, SpiffeIdError> {
        Self::from_segments(td, &["ns", namespace, "sa", service_account])
    }

    pub fn as_str(&self) -> &str {
        &self.id
    }

    /// The trust domain name.
    pub fn trust_domain_name(&self) -> &str {
        &self.id[SCHEME.len()..self.path_start]
    }

    /// The trust domain.
    pub fn trust_domain(&self) -> TrustDomain {
        TrustDomain(self.trust_domain_name().to_owned())
    }

    /// The path, starting with '/'.
    pub fn path(&self) -> &str {
        &self.id[self.path_start..]
    }

    /// The path's segments.
    pub fn segments(&self) -> impl Iterator<Item = &str> {
        self.path()[1..].split('/')
    }

    /// `(namespace, service account)` when the path is `/ns/<ns>/sa/<sa>`.
    pub fn service_account(&self) -> Option<(&str, &str)> {
        let mut it = self.segments();
        match (it.next(), it.next(), it.next(), it.next(), it.next()) {
            (Some("ns"), Some(ns), Some("sa"), Some(sa), None) => Some((ns, sa)),
            _ => None,
        }
    }
}

fn validate_path(path: &str) -> Result<(), SpiffeIdError> {
    if path.is_empty() {
        return Err(SpiffeIdError::MissingPath);
    }
    let body = &path[1..];
    if body.is_empty() {
        return Err(SpiffeIdError::TrailingSlash);
    }
    let segments: Vec<&str> = body.split('/').collect();
    let last = segments.len() - 1;
    for (i, seg) in segments.iter().enumerate() {
        if seg.is_empty() {
            return Err(if i == last {
                SpiffeIdError::TrailingSlash
            } else {
                SpiffeIdError::EmptySegment
            });
        }
        if *seg == "." || *seg == ".." {
            return Err(SpiffeIdError::DotSegment);
        }
        if let Some(c) = seg
            .chars()
            .find(|c| !(c.is_ascii_alphanumeric() || matches!(c, '.' | '-' | '_')))
        {
            return Err(SpiffeIdError::PathChar(c));
        }
    }
    Ok(())
}

impl fmt::Display for SpiffeId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.id)
    }
}

impl fmt::Debug for SpiffeId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "SpiffeId({})", self.id)
    }
}

impl FromStr for SpiffeId {
    type Err = SpiffeIdError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Self::parse(s)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn accepts_valid_ids() {
        for ok in [
            "spiffe://cluster.local/ns/shop/sa/frontend",
            "spiffe://example.org/a",
            "spiffe://td_1-x.y/A.b_c-D/9",
            "spiffe://a/...x/x..",
        ] {
            let id = SpiffeId::parse(ok).unwrap_or_else(|e| panic!("{ok}: {e}"));
            assert_eq!(id.as_str(), ok);
            assert_eq!(id.to_string(), ok);
        }
    }

    #[test]
    fn parts() {
        let id = SpiffeId::parse("spiffe://cluster.local/ns/shop/sa/frontend").unwrap();
        assert_eq!(id.trust_domain_name(), "cluster.local");
        assert_eq!(id.path(), "/ns/shop/sa/frontend");
        assert_eq!(id.service_account(), Some(("shop", "frontend")));
        let other = SpiffeId::parse("spiffe://cluster.local/ns/shop/sa/frontend/x").unwrap();
        assert_eq!(other.service_account(), None);
        let td = TrustDomain::new("cluster.local").unwrap();
        assert_eq!(
            SpiffeId::for_service_account(&td, "shop", "frontend").unwrap(),
            id
        );
        assert!(SpiffeId::for_service_account(&td, "..", "x").is_err());
        assert!(SpiffeId::for_service_account(&td, "a/b", "x").is_err());
        assert!(SpiffeId::for_service_account(&td, "", "x").is_err());
    }

    #[test]
    fn rejects_hostile_ids() {
        use SpiffeIdError::*;
        let long_path = format!("spiffe://td/{}", "a".repeat(MAX_ID_LEN));
        let long_td = format!("spiffe://{}/a", "a".repeat(MAX_TRUST_DOMAIN_LEN + 1));
        let cases: &[(&str, SpiffeIdError)] = &[
            ("", Empty),
            (&long_path, TooLong),
            (&long_td, TrustDomainTooLong),
            ("http://td/a", WrongScheme),
            ("SPIFFE://td/a", WrongScheme),
            ("spiffe:/td/a", WrongScheme),
            ("spiffe:///a", MissingTrustDomain),
            ("spiffe://td:443/a", Port),
            ("spiffe://user@td/a", UserInfo),
            ("spiffe://td/a?x=1", Query),
            ("spiffe://td/a#frag", Fragment),
            ("spiffe://TD/a", TrustDomainChar('T')),
            ("spiffe://t%64/a", TrustDomainChar('%')),
            ("spiffe://td", MissingPath),
            ("spiffe://td/", TrailingSlash),
            ("spiffe://td/a/", TrailingSlash),
            ("spiffe://td//a", EmptySegment),
            ("spiffe://td/a/./b", DotSegment),
            ("spiffe://td/a/..", DotSegment),
            ("spiffe://td/a%2Fb", PathChar('%')),
            ("spiffe://td/a b", PathChar(' ')),
            ("spiffe://td/a\0b", PathChar('\0')),
            ("spiffe://td/é", PathChar('é')),
            ("spiffe://td/a*", PathChar('*')),
            (" spiffe://td/a", WrongScheme),
        ];
        for (input, want) in cases {
            assert_eq!(
                SpiffeId::parse(input).as_ref().err(),
                Some(want),
                "{input:?}"
            );
        }
    }

    #[test]
    fn max_length_is_inclusive() {
        let prefix = "spiffe://td/";
        let id = format!("{prefix}{}", "a".repeat(MAX_ID_LEN - prefix.len()));
        assert_eq!(id.len(), MAX_ID_LEN);
        assert!(SpiffeId::parse(&id).is_ok());
    }
}
