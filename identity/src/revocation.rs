//! Revoked certificates and identities (`meshid-ca revoke`), as the trust bundle carries them to
//! every sidecar: a handshake presenting a revoked certificate, or any certificate of a revoked
//! identity, is refused, and a connection one of them opened is closed.
//!
//! A certificate is named by its serial number, written as lowercase hex without leading zeros
//! ([`normalize_serial`] accepts what `openssl x509 -serial` prints, colons and `0x` included). An
//! identity is named by its SPIFFE ID, exactly.

use std::collections::HashSet;

use crate::spiffe::SpiffeId;

/// The most entries a set holds: a trust bundle naming more is refused whole (a CA revokes a
/// handful of workloads, and its entries expire with the certificates they name).
pub const MAX_REVOCATIONS: usize = 10_000;

/// The longest serial number, in hex digits: RFC 5280 allows 20 octets.
const MAX_SERIAL_DIGITS: usize = 40;

/// What a revocation names.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Revoked {
    /// Every certificate of this identity.
    Id(SpiffeId),
    /// The one certificate with this serial number (normalized hex).
    Serial(String),
}

impl std::fmt::Display for Revoked {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Id(id) => write!(f, "identity {id}"),
            Self::Serial(s) => write!(f, "certificate serial {s}"),
        }
    }
}

/// What revokes a certificate: an entry of the set, naming the certificate itself (its identity
/// or its serial) or, through its lineage, the first certificate it was renewed from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RevokedBy {
    pub entry: Revoked,
    /// The entry is the serial of the certificate's lineage, not its own.
    pub through_lineage: bool,
}

impl std::fmt::Display for RevokedBy {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match (&self.entry, self.through_lineage) {
            (Revoked::Serial(s), true) => {
                write!(f, "lineage {s} (the certificate it was renewed from)")
            }
            (entry, _) => entry.fmt(f),
        }
    }
}

/// Why a revocation list or a serial number was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum RevocationError {
    #[error(
        "serial number {0:?}: expected hex digits (colons and a 0x prefix allowed), at most 20 bytes"
    )]
    Serial(String),
    #[error("revocation names {0:?}, which is not a SPIFFE ID: {1}")]
    Id(String, crate::spiffe::SpiffeIdError),
    #[error("a revocation must name exactly one of an identity and a serial number")]
    Ambiguous,
    #[error("{0} revocations, more than the {MAX_REVOCATIONS} a trust bundle may carry")]
    TooMany(usize),
}

/// A serial number as revocations name it: hex digits only, lowercase, no leading zeros (`0` for
/// zero). Accepts `openssl x509 -serial` output (`serial=0A1B...`), colon-separated bytes and a
/// `0x` prefix.
pub fn normalize_serial(text: &str) -> Result<String, RevocationError> {
    let bad = || RevocationError::Serial(text.chars().take(100).collect());
    let t = text.trim();
    let t = t.strip_prefix("serial=").unwrap_or(t);
    let t = t
        .strip_prefix("0x")
        .or_else(|| t.strip_prefix("0X"))
        .unwrap_or(t);
    let mut digits = String::with_capacity(t.len());
    for c in t.chars() {
        match c {
            ':' => {}
            c if c.is_ascii_hexdigit() => digits.push(c.to_ascii_lowercase()),
            _ => return Err(bad()),
        }
    }
    if digits.is_empty() {
        return Err(bad());
    }
    let trimmed = digits.trim_start_matches('0');
    let normalized = if trimmed.is_empty() { "0" } else { trimmed };
    if normalized.len() > MAX_SERIAL_DIGITS {
        return Err(bad());
    }
    Ok(normalized.to_owned())
}

/// The revocations in force, for lookups on every handshake: empty costs one branch.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct RevocationSet {
    ids: HashSet<SpiffeId>,
    serials: HashSet<String>,
}

impl RevocationSet {
    /// The set of `entries`, refused whole past [`MAX_REVOCATIONS`].
    pub fn new(entries: impl IntoIterator<Item = Revoked>) -> Result<Self, RevocationError> {
        let mut set = Self::default();
        for entry in entries {
            match entry {
                Revoked::Id(id) => {
                    set.ids.insert(id);
                }
                Revoked::Serial(s) => {
                    set.serials.insert(s);
                }
            }
            if set.len() > MAX_REVOCATIONS {
                return Err(RevocationError::TooMany(set.len()));
            }
        }
        Ok(set)
    }

    /// Reads one entry as the trust bundle carries it: exactly one of a SPIFFE ID and a serial.
    pub fn entry(spiffe_id: &str, serial: &str) -> Result<Revoked, RevocationError> {
        match (spiffe_id.is_empty(), serial.is_empty()) {
            (false, true) => SpiffeId::parse(spiffe_id)
                .map(Revoked::Id)
                .map_err(|e| RevocationError::Id(spiffe_id.chars().take(100).collect(), e)),
            (true, false) => normalize_serial(serial).map(Revoked::Serial),
            _ => Err(RevocationError::Ambiguous),
        }
    }

    pub fn is_empty(&self) -> bool {
        self.ids.is_empty() && self.serials.is_empty()
    }

    pub fn len(&self) -> usize {
        self.ids.len() + self.serials.len()
    }

    /// How many identities and how many certificates are revoked.
    pub fn counts(&self) -> (usize, usize) {
        (self.ids.len(), self.serials.len())
    }

    /// Every entry of `self` and of `other`, refused past [`MAX_REVOCATIONS`].
    pub fn union(&self, other: &Self) -> Result<Self, RevocationError> {
        let mut set = self.clone();
        set.ids.extend(other.ids.iter().cloned());
        set.serials.extend(other.serials.iter().cloned());
        if set.len() > MAX_REVOCATIONS {
            return Err(RevocationError::TooMany(set.len()));
        }
        Ok(set)
    }

    /// Whether `entry` is in the set.
    pub fn contains(&self, entry: &Revoked) -> bool {
        match entry {
            Revoked::Id(id) => self.ids.contains(id),
            Revoked::Serial(s) => self.serials.contains(s),
        }
    }

    /// What revokes a certificate of `id` with `serial` (normalized, see [`normalize_serial`]: a certificate's serial is its DER content octets in hex), if
    /// anything does: the identity first.
    pub fn check(&self, id: &SpiffeId, serial: &str) -> Option<Revoked> {
        if self.is_empty() {
            return None;
        }
        if self.ids.contains(id) {
            return Some(Revoked::Id(id.clone()));
        }
        self.serials
            .contains(serial)
            .then(|| Revoked::Serial(serial.to_owned()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn serials_are_read_as_openssl_prints_them_and_compared_as_numbers() {
        for (text, want) in [
            ("0A1B", "a1b"),
            ("serial=0A1B", "a1b"),
            ("0x0a:1b", "a1b"),
            (" 00:0a:1b ", "a1b"),
            ("0", "0"),
            ("0000", "0"),
            ("7f", "7f"),
        ] {
            assert_eq!(normalize_serial(text).as_deref(), Ok(want), "{text:?}");
        }
        for bad in ["", "0x", "xyz", "12 34", "-1", "a\u{0}", &"f".repeat(41)] {
            assert!(
                matches!(normalize_serial(bad), Err(RevocationError::Serial(_))),
                "{bad:?}"
            );
        }
        // DER adds a zero octet before a high bit (a certificate's serial, its content octets in
        // hex, has it); the number is the same.
        assert_eq!(normalize_serial("008001").unwrap(), "8001");
        assert_eq!(normalize_serial("00").unwrap(), "0");
    }

    /// A match through the lineage says so, not "certificate serial" of a serial the peer's
    /// own certificate does not have.
    #[test]
    fn a_lineage_match_is_told_as_one() {
        let own = RevokedBy {
            entry: Revoked::Serial("ab".into()),
            through_lineage: false,
        };
        assert_eq!(own.to_string(), "certificate serial ab");
        let lineage = RevokedBy {
            through_lineage: true,
            ..own
        };
        assert_eq!(
            lineage.to_string(),
            "lineage ab (the certificate it was renewed from)"
        );
    }

    #[test]
    fn a_set_revokes_identities_and_serials_and_nothing_else() {
        let id = |s: &str| SpiffeId::parse(s).unwrap();
        let set = RevocationSet::new([
            Revoked::Id(id("spiffe://td/ns/a/sa/x")),
            Revoked::Serial("a1b".into()),
        ])
        .unwrap();
        assert_eq!(set.counts(), (1, 1));
        assert_eq!(
            set.check(&id("spiffe://td/ns/a/sa/x"), "ff"),
            Some(Revoked::Id(id("spiffe://td/ns/a/sa/x")))
        );
        assert_eq!(
            set.check(&id("spiffe://td/ns/a/sa/y"), "a1b"),
            Some(Revoked::Serial("a1b".into()))
        );
        assert_eq!(set.check(&id("spiffe://td/ns/a/sa/y"), "a1c"), None);
        // Exact identities: no prefix or case games.
        assert_eq!(set.check(&id("spiffe://td/ns/a/sa/x2"), "1"), None);
        assert_eq!(
            RevocationSet::default().check(&id("spiffe://td/ns/a/sa/x"), "a1b"),
            None
        );
    }

    #[test]
    fn bundle_entries_name_exactly_one_thing_and_sets_are_bounded() {
        assert!(matches!(
            RevocationSet::entry("spiffe://td/ns/a/sa/x", "01"),
            Err(RevocationError::Ambiguous)
        ));
        assert!(matches!(
            RevocationSet::entry("", ""),
            Err(RevocationError::Ambiguous)
        ));
        assert!(matches!(
            RevocationSet::entry("https://td/x", ""),
            Err(RevocationError::Id(..))
        ));
        assert_eq!(
            RevocationSet::entry("", "0x01").unwrap(),
            Revoked::Serial("1".into())
        );
        let many = (0..=MAX_REVOCATIONS).map(|i| Revoked::Serial(format!("{i:x}")));
        assert!(matches!(
            RevocationSet::new(many),
            Err(RevocationError::TooMany(_))
        ));
    }
}
