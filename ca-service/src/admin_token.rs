//! The bearer token that opens the CA's rotation report (`/rotation`, `/rotation/fresh` on the
//! admin port), which lists every identity, serial and lineage of the fleet. Whoever runs
//! `meshid-ca rotate` holds the CA directory, and every CA replica reads it (in Kubernetes: the CA
//! Secret, mounted read-only), so the token comes from the directory:
//!
//! 1. `admin-token` (written by `meshid-ca init`, 0600): its content, trimmed, at least 32
//!    characters;
//! 2. else (a directory made before the file existed): derived from the first authority's
//!    `jwt.key`: SHA-256 of a fixed label and the key, in hex. `init` writes that key once and no
//!    command rewrites it (`rotate intermediate` renews `intermediate.key`; a rotation writes
//!    `a<n>-` files; `retire` deletes nothing), so every replica derives the same token before,
//!    during and after a rotation, and the token tells nothing of the key.
//!
//! A directory with neither has no token: the report is then refused to everyone.

use std::fmt;
use std::path::Path;

use crate::ca_dir::{AuthorityError, invalid, io_err};

/// The token's file in the CA directory.
pub const TOKEN_FILE: &str = "admin-token";
/// The shortest token `admin-token` may hold.
const MIN_LEN: usize = 32;
/// What the derivation from `jwt.key` hashes before the key.
const DERIVE_LABEL: &[u8] = b"meshid-ca admin token v1\0";

/// The rotation report's bearer token. `Debug` does not show it.
#[derive(Clone, PartialEq, Eq)]
pub struct AdminToken(String);

impl fmt::Debug for AdminToken {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("AdminToken(..)")
    }
}

impl AdminToken {
    /// A new random token: 32 bytes, in hex.
    pub fn generate() -> Result<Self, AuthorityError> {
        let mut bytes = [0u8; 32];
        aws_lc_rs::rand::fill(&mut bytes).map_err(|_| AuthorityError::Invalid {
            path: TOKEN_FILE.into(),
            reason: "no randomness for a new admin token".into(),
        })?;
        Ok(Self(meshid_identity::identity::hex(&bytes)))
    }

    /// The token of the CA directory `dir` (see the module's documentation), `None` when it has
    /// neither `admin-token` nor the first authority's `jwt.key`.
    pub fn load(dir: &Path) -> Result<Option<Self>, AuthorityError> {
        let file = dir.join(TOKEN_FILE);
        match std::fs::read(&file) {
            Ok(bytes) => {
                let text =
                    String::from_utf8(bytes).map_err(|_| invalid(&file, "not UTF-8 text"))?;
                let token = text.trim();
                if token.len() < MIN_LEN || !token.bytes().all(|b| b.is_ascii_graphic()) {
                    return Err(invalid(
                        &file,
                        format!("an admin token is at least {MIN_LEN} printable characters"),
                    ));
                }
                return Ok(Some(Self(token.to_owned())));
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(io_err(&file)(e)),
        }
        let key = dir.join(crate::authority::JWT_KEY);
        match std::fs::read(&key) {
            Ok(bytes) => {
                let mut input = DERIVE_LABEL.to_vec();
                input.extend_from_slice(&bytes);
                Ok(Some(Self(meshid_identity::pem::sha256_hex(&input))))
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(io_err(&key)(e)),
        }
    }

    /// Writes this token as `dir/admin-token` (0600), for `init`.
    pub fn write(&self, dir: &Path) -> Result<(), AuthorityError> {
        let line = format!("{}\n", self.0);
        crate::authority::write_file(&dir.join(TOKEN_FILE), line.as_bytes(), true)
    }

    /// Whether an `Authorization` header value is `Bearer <this token>`, compared in constant
    /// time.
    pub fn admits(&self, authorization: Option<&[u8]>) -> bool {
        let Some(presented) = authorization.and_then(|v| v.strip_prefix(b"Bearer ")) else {
            return false;
        };
        aws_lc_rs::constant_time::verify_slices_are_equal(presented, self.0.as_bytes()).is_ok()
    }

    /// The `Authorization` header that carries this token.
    pub fn header(&self) -> (String, String) {
        ("authorization".to_owned(), format!("Bearer {}", self.0))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_file_wins_else_the_first_jwt_key_else_none() {
        let dir = tempfile::tempdir().unwrap();
        assert_eq!(AdminToken::load(dir.path()).unwrap(), None);
        std::fs::write(dir.path().join("jwt.key"), "key one").unwrap();
        let derived = AdminToken::load(dir.path()).unwrap().unwrap();
        assert_eq!(
            derived,
            AdminToken::load(dir.path()).unwrap().unwrap(),
            "stable"
        );
        assert!(
            !format!("{derived:?}").contains(&derived.0),
            "Debug hides the token"
        );
        // A rotation's files (`a2-jwt.key`, a renewed `intermediate.key`) change nothing.
        std::fs::write(dir.path().join("a2-jwt.key"), "key two").unwrap();
        std::fs::write(dir.path().join("intermediate.key"), "renewed").unwrap();
        assert_eq!(AdminToken::load(dir.path()).unwrap().unwrap(), derived);
        let token = AdminToken::generate().unwrap();
        token.write(dir.path()).unwrap();
        assert_eq!(AdminToken::load(dir.path()).unwrap().unwrap(), token);
        std::fs::write(dir.path().join(TOKEN_FILE), "short\n").unwrap();
        assert!(AdminToken::load(dir.path()).is_err());
    }

    #[test]
    fn only_the_bearer_token_itself_is_admitted() {
        let token = AdminToken::generate().unwrap();
        let (_, good) = token.header();
        assert!(token.admits(Some(good.as_bytes())));
        for bad in [
            None,
            Some(token.0.as_bytes()),
            Some(&good.as_bytes()[..good.len() - 1]),
            Some(b"Bearer "),
            Some(b"Basic abc"),
        ] {
            assert!(!token.admits(bad), "{:?}", bad.map(String::from_utf8_lossy));
        }
    }
}
