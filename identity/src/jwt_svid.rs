//! JWT-SVIDs (the SPIFFE JWT-SVID profile), as meshid makes and checks them: ES256 only, a `kid`
//! naming one of the trust domain's JWT keys (P-256, published in the trust bundle as
//! SubjectPublicKeyInfo DER), claims `sub` (the SPIFFE ID), `aud`, `iat` and `exp`, and the
//! private claims [`LINEAGE_CLAIM`] and [`SERIAL_CLAIM`]: the lineage and the serial of the
//! certificate the token was issued on, so that a revoked serial refuses the token as it refuses
//! the certificate.
//!
//! The CA signs ([`sign`]); the sidecar verifies for the app ([`verify`], the Workload API's
//! `ValidateJWTSVID`) and publishes the keys as a JWK set ([`jwks`]). Everything a token says is
//! untrusted until its signature verified under a key of the bundle: the header is read only to
//! pick that key, and a token is refused, not repaired, when anything in it is off.

use aws_lc_rs::digest;
use aws_lc_rs::rand::SystemRandom;
use aws_lc_rs::signature::{
    ECDSA_P256_SHA256_FIXED, ECDSA_P256_SHA256_FIXED_SIGNING, EcdsaKeyPair, KeyPair,
    UnparsedPublicKey,
};
use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD as B64;
use serde_json::{Map, Value, json};
use x509_parser::prelude::FromDer;
use x509_parser::x509::SubjectPublicKeyInfo;

use crate::{SpiffeId, TrustDomain};

/// At most this many audiences in a request or a token.
pub const MAX_AUDIENCES: usize = 8;
/// At most this many bytes in one audience.
pub const MAX_AUDIENCE_LEN: usize = 256;
/// The longest token [`verify`] reads (ours are under 1 KiB).
pub const MAX_TOKEN_LEN: usize = 8 * 1024;
/// How far `iat` and `nbf` may be in the future, for clocks apart: as far as the CA backdates the
/// certificates it signs (5 minutes), so that a skew X.509-SVIDs survive does not refuse JWT-SVIDs.
pub const MAX_SKEW_SECS: i64 = 300;
/// The private claim naming the lineage of the certificate a token was issued on: the serial of
/// the lineage's first certificate, normalized as revocations name serials
/// ([`crate::revocation::normalize_serial`]). Tokens of a CA from before it are without it.
pub const LINEAGE_CLAIM: &str = "meshid_lineage";
/// The private claim naming the serial of the certificate a token was issued on, normalized as
/// [`LINEAGE_CLAIM`]'s: revoking that one certificate (not its lineage's first) refuses the token
/// too. Tokens of a CA from before it are without it.
pub const SERIAL_CLAIM: &str = "meshid_serial";

/// Why a token, a key or an audience was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct JwtSvidError(pub String);

fn err(reason: impl Into<String>) -> JwtSvidError {
    JwtSvidError(reason.into())
}

/// Checks the audiences asked for: 1 to [`MAX_AUDIENCES`] values, each 1 to [`MAX_AUDIENCE_LEN`]
/// bytes with no control characters.
pub fn check_audiences(audiences: &[String]) -> Result<(), JwtSvidError> {
    if audiences.is_empty() {
        return Err(err("at least one audience is required"));
    }
    if audiences.len() > MAX_AUDIENCES {
        return Err(err(format!(
            "{} audiences asked for; at most {MAX_AUDIENCES}",
            audiences.len()
        )));
    }
    for a in audiences {
        if a.is_empty() || a.len() > MAX_AUDIENCE_LEN {
            return Err(err(format!(
                "an audience must be 1 to {MAX_AUDIENCE_LEN} bytes (one is {})",
                a.len()
            )));
        }
        if a.chars().any(char::is_control) {
            return Err(err("an audience holds a control character"));
        }
    }
    Ok(())
}

/// A trust domain's JWT key: its ID and its P-256 point.
#[derive(Clone, PartialEq, Eq)]
pub struct JwtKey {
    pub kid: String,
    /// SubjectPublicKeyInfo DER, as published.
    pub spki: Vec<u8>,
    /// The uncompressed point (0x04 ‖ x ‖ y).
    point: Vec<u8>,
}

impl std::fmt::Debug for JwtKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("JwtKey").field("kid", &self.kid).finish()
    }
}

/// The ID meshid gives a key: base64url of the first 16 bytes of SHA-256 over its
/// SubjectPublicKeyInfo, the same on every CA process that reads the key.
pub fn key_id(spki: &[u8]) -> String {
    B64.encode(&digest::digest(&digest::SHA256, spki).as_ref()[..16])
}

const EC_PUBLIC_KEY: &str = "1.2.840.10045.2.1";
const P256: &str = "1.2.840.10045.3.1.7";

impl JwtKey {
    /// A key from its ID and SubjectPublicKeyInfo DER, which must hold a P-256 point.
    pub fn new(kid: &str, spki: &[u8]) -> Result<Self, JwtSvidError> {
        if kid.is_empty() || kid.len() > 128 || kid.chars().any(char::is_control) {
            return Err(err("a JWT key ID must be 1 to 128 printable characters"));
        }
        let (rest, info) = SubjectPublicKeyInfo::from_der(spki)
            .map_err(|e| err(format!("JWT key {kid}: not a SubjectPublicKeyInfo: {e}")))?;
        if !rest.is_empty() {
            return Err(err(format!("JWT key {kid}: bytes after the key")));
        }
        let curve = info
            .algorithm
            .parameters
            .as_ref()
            .and_then(|p| p.as_oid().ok())
            .map(|o| o.to_id_string());
        if info.algorithm.algorithm.to_id_string() != EC_PUBLIC_KEY
            || curve.as_deref() != Some(P256)
        {
            return Err(err(format!("JWT key {kid}: not an ECDSA P-256 key")));
        }
        let point = info.subject_public_key.data.to_vec();
        if point.len() != 65 || point[0] != 4 {
            return Err(err(format!(
                "JWT key {kid}: not an uncompressed P-256 point"
            )));
        }
        Ok(Self {
            kid: kid.to_owned(),
            spki: spki.to_vec(),
            point,
        })
    }

    /// The key as a JWK (RFC 7517), marked for JWT-SVIDs as SPIFFE bundles mark them.
    pub fn jwk(&self) -> Value {
        json!({
            "kty": "EC",
            "crv": "P-256",
            "x": B64.encode(&self.point[1..33]),
            "y": B64.encode(&self.point[33..65]),
            "kid": self.kid,
            "use": "jwt-svid",
        })
    }
}

/// The keys as a JWK set, the form the Workload API's `FetchJWTBundles` hands out.
pub fn jwks(keys: &[JwtKey]) -> Vec<u8> {
    let set = json!({ "keys": keys.iter().map(JwtKey::jwk).collect::<Vec<_>>() });
    serde_json::to_vec(&set).unwrap_or_default()
}

/// A JWT signing key: ECDSA P-256 from PKCS#8 DER.
pub struct JwtSigner {
    pub kid: String,
    pub spki: Vec<u8>,
    pair: EcdsaKeyPair,
}

impl std::fmt::Debug for JwtSigner {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("JwtSigner")
            .field("kid", &self.kid)
            .finish_non_exhaustive()
    }
}

impl JwtSigner {
    /// The signer of a PKCS#8 P-256 key; its ID is [`key_id`] of its public key.
    pub fn from_pkcs8(pkcs8: &[u8]) -> Result<Self, JwtSvidError> {
        let pair = EcdsaKeyPair::from_pkcs8(&ECDSA_P256_SHA256_FIXED_SIGNING, pkcs8)
            .map_err(|e| err(format!("not a PKCS#8 ECDSA P-256 key: {e}")))?;
        let spki = spki_of_point(pair.public_key().as_ref());
        Ok(Self {
            kid: key_id(&spki),
            spki,
            pair,
        })
    }

    /// The public half, as published.
    pub fn public(&self) -> JwtKey {
        let point = self.pair.public_key().as_ref().to_vec();
        JwtKey {
            kid: self.kid.clone(),
            spki: self.spki.clone(),
            point,
        }
    }
}

/// SubjectPublicKeyInfo DER of an uncompressed P-256 point.
fn spki_of_point(point: &[u8]) -> Vec<u8> {
    // SEQUENCE { SEQUENCE { id-ecPublicKey, prime256v1 }, BIT STRING { 0 unused bits, point } }
    const PREFIX: [u8; 26] = [
        0x30, 0x59, 0x30, 0x13, 0x06, 0x07, 0x2a, 0x86, 0x48, 0xce, 0x3d, 0x02, 0x01, 0x06, 0x08,
        0x2a, 0x86, 0x48, 0xce, 0x3d, 0x03, 0x01, 0x07, 0x03, 0x42, 0x00,
    ];
    let mut der = PREFIX.to_vec();
    der.extend_from_slice(point);
    der
}

/// Signs a JWT-SVID for `id` and `audiences` (checked with [`check_audiences`]), issued on the
/// certificate `serial` of lineage `lineage` (normalized serials, see [`LINEAGE_CLAIM`]) at
/// `iat`, expiring at `exp` (seconds since the epoch).
pub fn sign(
    signer: &JwtSigner,
    id: &SpiffeId,
    audiences: &[String],
    lineage: &str,
    serial: &str,
    iat: i64,
    exp: i64,
) -> Result<String, JwtSvidError> {
    check_audiences(audiences)?;
    if exp <= iat {
        return Err(err("a token must expire after it is issued"));
    }
    for (what, s) in [("lineage", lineage), ("serial", serial)] {
        if !is_normalized_serial(s) {
            return Err(err(format!(
                "the {what} {:?} is not a normalized serial number",
                s.chars().take(50).collect::<String>()
            )));
        }
    }
    let header = json!({ "alg": "ES256", "kid": signer.kid, "typ": "JWT" });
    let claims = json!({
        "sub": id.as_str(),
        "aud": audiences,
        "iat": iat,
        "exp": exp,
        LINEAGE_CLAIM: lineage,
        SERIAL_CLAIM: serial,
    });
    let signing_input = format!(
        "{}.{}",
        B64.encode(header.to_string()),
        B64.encode(claims.to_string())
    );
    let sig = signer
        .pair
        .sign(&SystemRandom::new(), signing_input.as_bytes())
        .map_err(|_| err("signing failed"))?;
    Ok(format!("{signing_input}.{}", B64.encode(sig.as_ref())))
}

fn is_normalized_serial(serial: &str) -> bool {
    crate::revocation::normalize_serial(serial).is_ok_and(|n| n == serial)
}

/// A verified JWT-SVID.
#[derive(Debug, Clone, PartialEq)]
pub struct Verified {
    pub id: SpiffeId,
    /// Every claim, as the token carries them.
    pub claims: Map<String, Value>,
    pub exp: i64,
    /// The key it verified under.
    pub kid: String,
    /// Its [`LINEAGE_CLAIM`]; `None`: a token of a CA from before the claim.
    pub lineage: Option<String>,
    /// Its [`SERIAL_CLAIM`]; `None`: a token of a CA from before the claim.
    pub serial: Option<String>,
}

impl Verified {
    /// What revokes this token in `revoked`, if anything does: its subject, the certificate it
    /// was issued on, or that certificate's lineage. A token without the claims (from a CA before
    /// them) by its subject alone.
    pub fn revoked_by(
        &self,
        revoked: &crate::revocation::RevocationSet,
    ) -> Option<crate::revocation::Revoked> {
        revoked_by(
            revoked,
            &self.id,
            self.lineage.as_deref(),
            self.serial.as_deref(),
        )
    }
}

/// What revokes a token of `id` issued on the certificate `serial` of lineage `lineage` (either
/// unknown: a token of a CA from before the claims), if anything in `revoked` does.
pub fn revoked_by(
    revoked: &crate::revocation::RevocationSet,
    id: &SpiffeId,
    lineage: Option<&str>,
    serial: Option<&str>,
) -> Option<crate::revocation::Revoked> {
    let serial = serial.unwrap_or_default();
    let lineage = lineage.unwrap_or_default();
    revoked
        .check(id, serial)
        .or_else(|| revoked.check(id, lineage))
}

fn decode_json(part: &str, what: &str) -> Result<Map<String, Value>, JwtSvidError> {
    let bytes = B64
        .decode(part)
        .map_err(|_| err(format!("the token's {what} is not base64url")))?;
    match serde_json::from_slice(&bytes) {
        Ok(Value::Object(map)) => Ok(map),
        _ => Err(err(format!("the token's {what} is not a JSON object"))),
    }
}

fn int_claim(claims: &Map<String, Value>, name: &str) -> Result<Option<i64>, JwtSvidError> {
    match claims.get(name) {
        None => Ok(None),
        Some(v) => v
            .as_i64()
            .or_else(|| v.as_f64().filter(|f| f.is_finite()).map(|f| f as i64))
            .map(Some)
            .ok_or_else(|| err(format!("the `{name}` claim is not a number"))),
    }
}

/// Verifies `token` for `audience` at `now` against the keys of `trust_domain`: ES256 under the key
/// its `kid` names, `sub` a SPIFFE ID of that trust domain, `aud` holding `audience`, `exp` in the
/// future (and `nbf`, `iat` if present not ahead of us by more than [`MAX_SKEW_SECS`]), and
/// [`LINEAGE_CLAIM`], if present, a normalized serial. Whether the subject or the lineage is
/// revoked is the caller's to check.
pub fn verify(
    token: &str,
    audience: &str,
    keys: &[JwtKey],
    trust_domain: &TrustDomain,
    now: i64,
) -> Result<Verified, JwtSvidError> {
    if audience.is_empty() {
        return Err(err("an audience to check the token against is required"));
    }
    if token.len() > MAX_TOKEN_LEN {
        return Err(err(format!(
            "the token is {} bytes; at most {MAX_TOKEN_LEN}",
            token.len()
        )));
    }
    let mut parts = token.split('.');
    let (Some(h), Some(c), Some(s), None) =
        (parts.next(), parts.next(), parts.next(), parts.next())
    else {
        return Err(err("not a JWS in compact form (three base64url parts)"));
    };
    let header = decode_json(h, "header")?;
    match header.get("alg").and_then(Value::as_str) {
        Some("ES256") => {}
        Some(other) => return Err(err(format!("algorithm {other:?} is not accepted (ES256)"))),
        None => return Err(err("the header names no algorithm")),
    }
    if let Some(typ) = header.get("typ")
        && !matches!(typ.as_str(), Some("JWT" | "JOSE"))
    {
        return Err(err("the header's typ is neither JWT nor JOSE"));
    }
    if header.contains_key("crit") {
        return Err(err(
            "the header has critical extensions, none of which are understood",
        ));
    }
    // JWT-SVID 2: the key comes from the trust domain's bundle alone, never from the token.
    if let Some(named) = ["jku", "x5u", "jwk", "x5c"]
        .into_iter()
        .find(|k| header.contains_key(*k))
    {
        return Err(err(format!(
            "the header carries {named:?}: a JWT-SVID names its key by kid only"
        )));
    }
    let kid = header
        .get("kid")
        .and_then(Value::as_str)
        .ok_or_else(|| err("the header names no key (kid)"))?;
    let key = keys
        .iter()
        .find(|k| k.kid == kid)
        .ok_or_else(|| err(format!("no key {kid:?} in the trust domain's JWT bundle")))?;
    let sig = B64
        .decode(s)
        .map_err(|_| err("the token's signature is not base64url"))?;
    let signing_input = &token[..h.len() + 1 + c.len()];
    UnparsedPublicKey::new(&ECDSA_P256_SHA256_FIXED, &key.point)
        .verify(signing_input.as_bytes(), &sig)
        .map_err(|_| err("the token's signature does not verify"))?;

    // Signed by our CA from here on; still checked claim by claim.
    let claims = decode_json(c, "claims")?;
    let sub = claims
        .get("sub")
        .and_then(Value::as_str)
        .ok_or_else(|| err("the token has no subject (sub)"))?;
    let id =
        SpiffeId::parse(sub).map_err(|e| err(format!("the subject is not a SPIFFE ID: {e}")))?;
    if id.trust_domain() != *trust_domain {
        return Err(err(format!(
            "the subject {id} is not of trust domain {trust_domain}"
        )));
    }
    let auds: Vec<&str> = match claims.get("aud") {
        Some(Value::String(a)) => vec![a.as_str()],
        Some(Value::Array(v)) => v
            .iter()
            .map(|a| {
                a.as_str()
                    .ok_or_else(|| err("an audience (aud) is not a string"))
            })
            .collect::<Result<_, _>>()?,
        _ => return Err(err("the token has no audience (aud)")),
    };
    if !auds.contains(&audience) {
        return Err(err(format!("the token is not for audience {audience:?}")));
    }
    let exp = int_claim(&claims, "exp")?.ok_or_else(|| err("the token has no expiry (exp)"))?;
    if exp <= now {
        return Err(err(format!(
            "the token expired {} s ago",
            now.saturating_sub(exp)
        )));
    }
    for name in ["nbf", "iat"] {
        if let Some(t) = int_claim(&claims, name)?
            && t > now + MAX_SKEW_SECS
        {
            return Err(err(format!("the token's {name} is {} s ahead", t - now)));
        }
    }
    let serial_claim = |name: &str| match claims.get(name) {
        None => Ok(None),
        Some(Value::String(l)) if is_normalized_serial(l) => Ok(Some(l.clone())),
        Some(_) => Err(err(format!(
            "the `{name}` claim is not a serial number in lowercase hex"
        ))),
    };
    let lineage = serial_claim(LINEAGE_CLAIM)?;
    let serial = serial_claim(SERIAL_CLAIM)?;
    Ok(Verified {
        id,
        claims,
        exp,
        kid: kid.to_owned(),
        lineage,
        serial,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn signer() -> JwtSigner {
        let rng = SystemRandom::new();
        let pkcs8 = EcdsaKeyPair::generate_pkcs8(&ECDSA_P256_SHA256_FIXED_SIGNING, &rng).unwrap();
        JwtSigner::from_pkcs8(pkcs8.as_ref()).unwrap()
    }

    fn td() -> TrustDomain {
        TrustDomain::new("example.org").unwrap()
    }

    fn id() -> SpiffeId {
        SpiffeId::parse("spiffe://example.org/ns/shop/sa/web").unwrap()
    }

    fn aud(a: &[&str]) -> Vec<String> {
        a.iter().map(|s| (*s).to_owned()).collect()
    }

    /// A token with header and claims as given, signed by `s` (for forgeries of every shape).
    fn raw(s: &JwtSigner, header: Value, claims: Value) -> String {
        let input = format!(
            "{}.{}",
            B64.encode(header.to_string()),
            B64.encode(claims.to_string())
        );
        let sig = s.pair.sign(&SystemRandom::new(), input.as_bytes()).unwrap();
        format!("{input}.{}", B64.encode(sig.as_ref()))
    }

    #[test]
    fn a_signed_token_verifies_for_each_of_its_audiences_and_nothing_else() {
        let s = signer();
        let keys = [s.public()];
        let t = sign(&s, &id(), &aud(&["db", "cache"]), "a1b", "a1b", 1000, 1300).unwrap();
        for a in ["db", "cache"] {
            let v = verify(&t, a, &keys, &td(), 1100).unwrap();
            assert_eq!(v.id, id());
            assert_eq!(v.exp, 1300);
            assert_eq!(
                v.claims["sub"],
                json!("spiffe://example.org/ns/shop/sa/web")
            );
        }
        assert!(verify(&t, "other", &keys, &td(), 1100).is_err());
        assert!(verify(&t, "", &keys, &td(), 1100).is_err());
        // A validator whose clock is behind the CA's: up to 5 minutes, as X.509-SVIDs are
        // backdated (it was 30 s, and a 2-minute skew refused fresh tokens).
        verify(&t, "db", &keys, &td(), 1000 - 120).unwrap();
        verify(&t, "db", &keys, &td(), 1000 - 300).unwrap();
        let e = verify(&t, "db", &keys, &td(), 1000 - 301).unwrap_err();
        assert!(e.0.contains("iat is 301 s ahead"), "{e}");
        // Expired; from another trust domain's point of view.
        assert!(verify(&t, "db", &keys, &td(), 1300).is_err());
        let other = TrustDomain::new("other.org").unwrap();
        assert!(verify(&t, "db", &keys, &other, 1100).is_err());
        // The key ID is the published one, and the JWK carries it.
        let jwks: Value = serde_json::from_slice(&jwks(&keys)).unwrap();
        assert_eq!(jwks["keys"][0]["kid"], json!(s.kid));
        assert_eq!(jwks["keys"][0]["crv"], json!("P-256"));
        assert_eq!(JwtKey::new(&s.kid, &s.spki).unwrap(), keys[0]);
        assert_eq!(key_id(&s.spki), s.kid);
    }

    #[test]
    fn forged_and_malformed_tokens_are_refused() {
        let s = signer();
        let mallory = signer();
        let keys = [s.public()];
        let good_claims = json!({"sub": id().as_str(), "aud": ["db"], "exp": 2000});
        let h = json!({"alg": "ES256", "kid": s.kid});
        // Another key under our key's ID.
        let forged = raw(&mallory, h.clone(), good_claims.clone());
        assert!(verify(&forged, "db", &keys, &td(), 1000).is_err());
        // alg none, and HS256 keyed with the public key.
        for alg in ["none", "HS256", "ES384", "RS256"] {
            let t = raw(&s, json!({"alg": alg, "kid": s.kid}), good_claims.clone());
            let e = verify(&t, "db", &keys, &td(), 1000).unwrap_err();
            assert!(e.0.contains("not accepted"), "{alg}: {e}");
        }
        // An unknown key, no key, a critical header, an odd typ.
        for header in [
            json!({"alg": "ES256", "kid": "nope"}),
            json!({"alg": "ES256"}),
            json!({"alg": "ES256", "kid": s.kid, "crit": ["exp"]}),
            json!({"alg": "ES256", "kid": s.kid, "typ": "at+jwt"}),
        ] {
            let t = raw(&s, header.clone(), good_claims.clone());
            assert!(verify(&t, "db", &keys, &td(), 1000).is_err(), "{header}");
        }
        // A header naming a key of its own (JWT-SVID 2: MUST NOT), even beside our kid.
        for named in ["jku", "x5u", "jwk", "x5c"] {
            let t = raw(
                &s,
                json!({"alg": "ES256", "kid": s.kid, named: "https://evil.example/k"}),
                good_claims.clone(),
            );
            let e = verify(&t, "db", &keys, &td(), 1000).unwrap_err();
            assert!(e.0.contains(named), "{named}: {e}");
        }
        // Claims: no sub, a non-SPIFFE sub, no aud, no exp, a string exp, iat far ahead.
        for claims in [
            json!({"aud": ["db"], "exp": 2000}),
            json!({"sub": "https://example.org/x", "aud": ["db"], "exp": 2000}),
            json!({"sub": id().as_str(), "exp": 2000}),
            json!({"sub": id().as_str(), "aud": ["db"]}),
            json!({"sub": id().as_str(), "aud": ["db"], "exp": "2000"}),
            json!({"sub": id().as_str(), "aud": ["db"], "exp": 2000, "iat": 1500}),
            json!({"sub": id().as_str(), "aud": ["db", 5], "exp": 2000}),
        ] {
            let t = raw(&s, h.clone(), claims.clone());
            assert!(verify(&t, "db", &keys, &td(), 1000).is_err(), "{claims}");
        }
        // A single-string aud is the JWT's other spelling.
        let t = raw(
            &s,
            h.clone(),
            json!({"sub": id().as_str(), "aud": "db", "exp": 2000}),
        );
        verify(&t, "db", &keys, &td(), 1000).unwrap();
        // A token changed after signing.
        let good = raw(&s, h.clone(), good_claims.clone());
        let mut parts: Vec<&str> = good.split('.').collect();
        let other_claims = B64.encode(
            json!({"sub": "spiffe://example.org/ns/shop/sa/admin", "aud": ["db"], "exp": 2000})
                .to_string(),
        );
        parts[1] = &other_claims;
        assert!(verify(&parts.join("."), "db", &keys, &td(), 1000).is_err());
        // Garbage of every shape.
        for t in [
            "",
            ".",
            "..",
            "a.b.c",
            "a.b.c.d",
            "e30.e30.",
            &"x".repeat(MAX_TOKEN_LEN + 1),
        ] {
            assert!(verify(t, "db", &keys, &td(), 1000).is_err(), "{t:.20}");
        }
    }

    /// Every token names the lineage of the certificate it was issued on, as revocations name
    /// serials, so that ValidateJWTSVID can refuse it once that serial is revoked (before, a token
    /// said nothing of its certificate and outlived the revocation of its lineage). A token without
    /// the claim (a CA from before it) still verifies; a claim of another shape does not.
    #[test]
    fn a_token_names_the_lineage_it_was_issued_on() {
        let s = signer();
        let keys = [s.public()];
        let t = sign(&s, &id(), &aud(&["db"]), "4a0bff", "4a0bff", 1000, 1300).unwrap();
        let v = verify(&t, "db", &keys, &td(), 1100).unwrap();
        assert_eq!(v.lineage.as_deref(), Some("4a0bff"));
        assert_eq!(v.claims[LINEAGE_CLAIM], json!("4a0bff"));
        assert_eq!(v.serial.as_deref(), Some("4a0bff"));
        // A renewed certificate's token names both; either revoked refuses it.
        let renewed = sign(&s, &id(), &aud(&["db"]), "4a0bff", "77", 1000, 1300).unwrap();
        let r = verify(&renewed, "db", &keys, &td(), 1100).unwrap();
        assert_eq!(
            (r.lineage.as_deref(), r.serial.as_deref()),
            (Some("4a0bff"), Some("77"))
        );
        use crate::revocation::{RevocationSet, Revoked};
        let set = |r: Revoked| RevocationSet::new([r]).unwrap();
        for (revoked, refused) in [
            (Revoked::Serial("77".into()), true),
            (Revoked::Serial("4a0bff".into()), true),
            (Revoked::Id(id()), true),
            (Revoked::Serial("78".into()), false),
        ] {
            assert_eq!(
                r.revoked_by(&set(revoked.clone())).is_some(),
                refused,
                "{revoked}"
            );
        }
        assert_eq!(v.kid, s.kid);
        // Only a serial as revocations name it is signed.
        for bad in ["", "004a0bff", "4A0BFF", "0x4a", "4a:0b", "xyz"] {
            let r = sign(&s, &id(), &aud(&["db"]), bad, "4a0c", 1000, 1300);
            assert!(r.is_err(), "{bad:?}");
        }
        let h = json!({"alg": "ES256", "kid": s.kid});
        let old = raw(
            &s,
            h.clone(),
            json!({"sub": id().as_str(), "aud": ["db"], "exp": 2000}),
        );
        assert_eq!(
            verify(&old, "db", &keys, &td(), 1000).unwrap().lineage,
            None
        );
        for bad in [
            json!(74),
            json!(null),
            json!(["4a"]),
            json!("4A"),
            json!("0x4a"),
            json!(""),
        ] {
            let claims =
                json!({"sub": id().as_str(), "aud": ["db"], "exp": 2000, LINEAGE_CLAIM: bad});
            let t = raw(&s, h.clone(), claims);
            let e = verify(&t, "db", &keys, &td(), 1000).unwrap_err();
            assert!(e.0.contains(LINEAGE_CLAIM), "{bad}: {e}");
        }
    }

    #[test]
    fn audiences_are_bounded() {
        assert!(check_audiences(&[]).is_err());
        assert!(check_audiences(&aud(&[""])).is_err());
        assert!(check_audiences(&aud(&["a\nb"])).is_err());
        assert!(check_audiences(&["x".repeat(MAX_AUDIENCE_LEN + 1)]).is_err());
        assert!(check_audiences(&vec!["a".to_owned(); MAX_AUDIENCES + 1]).is_err());
        check_audiences(&["x".repeat(MAX_AUDIENCE_LEN)]).unwrap();
        check_audiences(&vec!["a".to_owned(); MAX_AUDIENCES]).unwrap();
        let s = signer();
        assert!(sign(&s, &id(), &[], "a1b", "a1b", 1, 2).is_err());
        assert!(sign(&s, &id(), &aud(&["a"]), "a1b", "a1b", 2, 2).is_err());
    }

    #[test]
    fn keys_that_are_not_p256_points_are_refused() {
        let s = signer();
        assert!(JwtKey::new("", &s.spki).is_err());
        assert!(JwtKey::new("k", &s.spki[..40]).is_err());
        let mut extra = s.spki.clone();
        extra.push(0);
        assert!(JwtKey::new("k", &extra).is_err());
        // An Ed25519 key.
        let ed = aws_lc_rs::signature::Ed25519KeyPair::generate().unwrap();
        let mut spki = vec![
            0x30, 0x2a, 0x30, 0x05, 0x06, 0x03, 0x2b, 0x65, 0x70, 0x03, 0x21, 0x00,
        ];
        spki.extend_from_slice(ed.public_key().as_ref());
        assert!(JwtKey::new("k", &spki).is_err());
    }
}
