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
//!
//! The token never crosses the network from our own commands: `rotate` and `check` sign each
//! request with it (`Authorization: MeshidAdmin t=..,nonce=..,mac=..`, an HMAC-SHA256 over the
//! path, the time and a fresh nonce) and the CA signs its answer to such a request the same way
//! (`x-meshid-admin-mac`, over the nonce, the status and the body). So whoever sits between the
//! command and the CA (a hijacked Service or DNS name, a tap on the pod network) learns no token
//! and cannot hand the rotation gates a forged report: an answer without a valid signature is
//! refused. `Authorization: Bearer <token>` is still admitted (curl, older commands); its answer
//! is not signed.

use std::fmt;
use std::path::Path;

use crate::ca_dir::{AuthorityError, invalid, io_err};

/// The token's file in the CA directory.
pub const TOKEN_FILE: &str = "admin-token";
/// The shortest token `admin-token` may hold.
const MIN_LEN: usize = 32;
/// What the derivation from `jwt.key` hashes before the key.
const DERIVE_LABEL: &[u8] = b"meshid-ca admin token v1\0";
/// The `Authorization` scheme of a signed request.
const SIGNED_SCHEME: &[u8] = b"MeshidAdmin ";
/// What a request's and an answer's signatures cover first (so one is never taken for the other).
const REQUEST_LABEL: &[u8] = b"meshid-ca admin request v1\0";
const RESPONSE_LABEL: &[u8] = b"meshid-ca admin response v1\0";
/// The answer's signature (hex), to a signed request.
pub const RESPONSE_MAC_HEADER: &str = "x-meshid-admin-mac";
/// The answering CA process (32 hex digits, random at its start), covered by the signature: one
/// process's answer cannot be passed off as another's.
pub const RESPONSE_INSTANCE_HEADER: &str = "x-meshid-admin-instance";
/// How far a signed request's time may be from the CA's clock, either way.
pub const MAX_SKEW_SECS: i64 = 300;

/// How an `Authorization` header proved the admin token.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Proof {
    /// `Bearer <token>`: the token itself.
    Bearer,
    /// A signed request: its time and nonce (the answer is signed for the nonce).
    Signed { t: i64, nonce: String },
}

/// A signed request's parts, as the header carries them.
fn parse_signed(value: &[u8]) -> Option<(i64, &str, &str)> {
    let rest = std::str::from_utf8(value.strip_prefix(SIGNED_SCHEME)?).ok()?;
    let (mut t, mut nonce, mut mac) = (None, None, None);
    for part in rest.split(',') {
        let (k, v) = part.trim().split_once('=')?;
        let slot = match k {
            "t" => &mut t,
            "nonce" => &mut nonce,
            "mac" => &mut mac,
            _ => return None,
        };
        if slot.replace(v).is_some() {
            return None;
        }
    }
    let nonce = nonce?;
    if nonce.len() != 32 || !nonce.bytes().all(|b| b.is_ascii_hexdigit()) {
        return None;
    }
    Some((t?.parse().ok()?, nonce, mac?))
}

/// The nonce of a signed `Authorization` header, unverified (the route signs its answer for it once
/// [`AdminToken::admits_at`] admitted the request).
pub fn signed_nonce(authorization: Option<&[u8]>) -> Option<String> {
    parse_signed(authorization?).map(|(_, nonce, _)| nonce.to_owned())
}

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
        match crate::ca_dir::read_file(&file, crate::ca_dir::MAX_CA_FILE) {
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
        match crate::ca_dir::read_file(&key, crate::ca_dir::MAX_CA_FILE) {
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

    /// How an `Authorization` header for `path` at `now` proves this token: the token itself, or
    /// a request signed with it for this path within [`MAX_SKEW_SECS`] of `now`; `None` when it
    /// does not.
    pub fn admits_at(&self, authorization: Option<&[u8]>, path: &str, now: i64) -> Option<Proof> {
        if self.admits(authorization) {
            return Some(Proof::Bearer);
        }
        let (t, nonce, mac) = parse_signed(authorization?)?;
        if t.abs_diff(now) > MAX_SKEW_SECS.unsigned_abs() {
            return None;
        }
        let mac = hex_decode(mac)?;
        let input = request_input(path, t, nonce);
        aws_lc_rs::hmac::verify(&self.key(), &input, &mac).ok()?;
        Some(Proof::Signed {
            t,
            nonce: nonce.to_owned(),
        })
    }

    /// An `Authorization` header for `GET path` at `now`, signed with this token (the token is
    /// not in it), and the nonce its answer is signed for.
    pub fn sign_request(
        &self,
        path: &str,
        now: i64,
    ) -> Result<((String, String), String), AuthorityError> {
        let mut bytes = [0u8; 16];
        aws_lc_rs::rand::fill(&mut bytes).map_err(|_| AuthorityError::Invalid {
            path: TOKEN_FILE.into(),
            reason: "no randomness for a request nonce".into(),
        })?;
        let nonce = meshid_identity::identity::hex(&bytes);
        let tag = aws_lc_rs::hmac::sign(&self.key(), &request_input(path, now, &nonce));
        let value = format!(
            "MeshidAdmin t={now},nonce={nonce},mac={}",
            meshid_identity::identity::hex(tag.as_ref())
        );
        Ok((("authorization".to_owned(), value), nonce))
    }

    /// The signature of an answer (`status`, `body`) of CA process `instance` to the signed
    /// request of `nonce`, in hex.
    pub fn sign_response(&self, nonce: &str, instance: &str, status: u16, body: &[u8]) -> String {
        let input = response_input(nonce, instance, status, body);
        meshid_identity::identity::hex(aws_lc_rs::hmac::sign(&self.key(), &input).as_ref())
    }

    /// Whether `mac` (the answer's [`RESPONSE_MAC_HEADER`]) signs this answer of `instance` to
    /// the request of `nonce`, compared in constant time.
    pub fn verifies_response(
        &self,
        nonce: &str,
        instance: &str,
        status: u16,
        body: &[u8],
        mac: Option<&[u8]>,
    ) -> bool {
        let Some(mac) = mac
            .and_then(|m| std::str::from_utf8(m).ok())
            .and_then(hex_decode)
        else {
            return false;
        };
        is_instance(instance)
            && aws_lc_rs::hmac::verify(
                &self.key(),
                &response_input(nonce, instance, status, body),
                &mac,
            )
            .is_ok()
    }

    fn key(&self) -> aws_lc_rs::hmac::Key {
        aws_lc_rs::hmac::Key::new(aws_lc_rs::hmac::HMAC_SHA256, self.0.as_bytes())
    }

    /// The `Authorization` header that carries this token.
    pub fn header(&self) -> (String, String) {
        ("authorization".to_owned(), format!("Bearer {}", self.0))
    }
}

/// A new CA process's instance: 32 random hex digits.
pub fn new_instance() -> String {
    let mut bytes = [0u8; 16];
    // Without randomness the instance is still unique enough per process for its purpose.
    if aws_lc_rs::rand::fill(&mut bytes).is_err() {
        bytes[..4].copy_from_slice(&std::process::id().to_be_bytes());
    }
    meshid_identity::identity::hex(&bytes)
}

fn is_instance(instance: &str) -> bool {
    instance.len() == 32 && instance.bytes().all(|b| b.is_ascii_hexdigit())
}

/// A signed answer: its status and body, and the CA process that signed it (empty for a refusal,
/// 401 or 404, which carries no report and is not signed).
#[derive(Debug)]
pub struct SignedReply {
    pub status: u16,
    pub body: bytes::Bytes,
    pub instance: String,
}

/// `GET path` on a CA's admin port `addr`, signed with `token`; the answer once its signature is
/// checked. An answer without a valid signature (something between the command and the CA) is an
/// error: its report must not reach a gate.
pub async fn signed_get(
    token: &AdminToken,
    addr: std::net::SocketAddr,
    path: &str,
    timeout: std::time::Duration,
    max_body: usize,
) -> Result<SignedReply, String> {
    let (header, nonce) = token
        .sign_request(path, meshid_runtime::time::unix_now())
        .map_err(|e| e.to_string())?;
    let headers = [header];
    let mut call = meshid_runtime::http_client::Call::get(addr, path);
    call.headers = &headers;
    call.host = Some("meshid-ca");
    call.timeout = timeout;
    call.max_body = max_body;
    let reply = meshid_runtime::http_client::send(&call)
        .await
        .map_err(|e| e.to_string())?;
    if matches!(reply.status, 401 | 404) {
        // Refusals are not signed: they carry no report, and say why.
        return Ok(SignedReply {
            status: reply.status,
            body: reply.body,
            instance: String::new(),
        });
    }
    let mac = reply.headers.get(RESPONSE_MAC_HEADER).map(|v| v.as_bytes());
    let instance = reply
        .headers
        .get(RESPONSE_INSTANCE_HEADER)
        .and_then(|v| v.to_str().ok())
        .unwrap_or_default()
        .to_owned();
    if !token.verifies_response(&nonce, &instance, reply.status, &reply.body, mac) {
        return Err(format!(
            "{path} answered HTTP {} without a valid {RESPONSE_MAC_HEADER} signature: not \
             signed with the admin token, so not acted on (something between this command and \
             the CA, or a CA that does not serve the directory given as --dir)",
            reply.status
        ));
    }
    Ok(SignedReply {
        status: reply.status,
        body: reply.body,
        instance,
    })
}

fn request_input(path: &str, t: i64, nonce: &str) -> Vec<u8> {
    let mut input = REQUEST_LABEL.to_vec();
    input.extend_from_slice(format!("GET\0{path}\0{t}\0{nonce}").as_bytes());
    input
}

fn response_input(nonce: &str, instance: &str, status: u16, body: &[u8]) -> Vec<u8> {
    let mut input = RESPONSE_LABEL.to_vec();
    input.extend_from_slice(format!("{nonce}\0{instance}\0{status}\0").as_bytes());
    input.extend_from_slice(body);
    input
}

fn hex_decode(hex: &str) -> Option<Vec<u8>> {
    if !hex.len().is_multiple_of(2) || hex.len() > 128 {
        return None;
    }
    (0..hex.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(hex.get(i..i + 2)?, 16).ok())
        .collect()
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
    fn a_signed_request_proves_the_token_without_carrying_it() {
        let token = AdminToken::generate().unwrap();
        let other = AdminToken::generate().unwrap();
        let now = 1_800_000_000;
        let ((name, value), nonce) = token.sign_request("/rotation/fresh", now).unwrap();
        assert_eq!(name, "authorization");
        assert!(!value.contains(&token.0), "the token is not sent");
        let header = Some(value.as_bytes());
        assert_eq!(
            token.admits_at(header, "/rotation/fresh", now + 10),
            Some(Proof::Signed {
                t: now,
                nonce: nonce.clone()
            })
        );
        assert_eq!(signed_nonce(header), Some(nonce.clone()));
        // Another token, another path, out of time, a changed byte: refused.
        assert_eq!(other.admits_at(header, "/rotation/fresh", now), None);
        assert_eq!(token.admits_at(header, "/rotation", now), None);
        assert_eq!(
            token.admits_at(header, "/rotation/fresh", now + MAX_SKEW_SECS + 1),
            None
        );
        assert_eq!(
            token.admits_at(header, "/rotation/fresh", now - MAX_SKEW_SECS - 1),
            None
        );
        let changed = value.replace(&format!("t={now}"), &format!("t={}", now + 1));
        assert_eq!(
            token.admits_at(Some(changed.as_bytes()), "/rotation/fresh", now),
            None
        );
        for garbage in [
            "MeshidAdmin ",
            "MeshidAdmin t=1,t=1",
            "MeshidAdmin t=x,nonce=00,mac=00",
        ] {
            assert_eq!(
                token.admits_at(Some(garbage.as_bytes()), "/rotation", now),
                None
            );
        }
        // Bearer still opens it.
        assert_eq!(
            token.admits_at(Some(token.header().1.as_bytes()), "/rotation", now),
            Some(Proof::Bearer)
        );
        // The answer: signed for that nonce, status and body only.
        let body = br#"{"sidecars":[]}"#;
        let me = new_instance();
        let other_ca = new_instance();
        let mac = token.sign_response(&nonce, &me, 200, body);
        assert!(token.verifies_response(&nonce, &me, 200, body, Some(mac.as_bytes())));
        // Not as another CA process's answer, nor under an instance that is no instance.
        assert!(!token.verifies_response(&nonce, &other_ca, 200, body, Some(mac.as_bytes())));
        assert!(!token.verifies_response(&nonce, "", 200, body, Some(mac.as_bytes())));
        assert!(!token.verifies_response(
            &nonce,
            &me,
            200,
            b"{\"sidecars\":[1]}",
            Some(mac.as_bytes())
        ));
        assert!(!token.verifies_response(&nonce, &me, 500, body, Some(mac.as_bytes())));
        assert!(!token.verifies_response(&"0".repeat(32), &me, 200, body, Some(mac.as_bytes())));
        assert!(!other.verifies_response(&nonce, &me, 200, body, Some(mac.as_bytes())));
        assert!(!token.verifies_response(&nonce, &me, 200, body, None));
        assert!(!token.verifies_response(&nonce, &me, 200, body, Some(b"zz")));
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
