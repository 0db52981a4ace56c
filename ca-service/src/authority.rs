//! The CA's key material on disk: `meshid-ca init` writes it, `meshid-ca serve` loads it.
//!
//! Layout of the CA directory:
//!
//! | file | content |
//! | --- | --- |
//! | `ca.json` | trust domain and format version |
//! | `root.pem` | the root certificate |
//! | `root.key` | the root key (0600; absent when the root was imported) |
//! | `intermediate.pem` | the signing intermediate (path length 0), signed by the root |
//! | `intermediate.key` | its key (0600) |
//! | `jwt.key` | the authority's JWT-SVID signing key, ECDSA P-256 PKCS#8 (0600) |
//! | `jwt.pub` | its public key, published in the trust bundle |
//! | `bundle.pem` | the trust bundle: every root workloads must trust |
//! | `join-tokens/` | hashes of outstanding join tokens |
//! | `admin-token` | the bearer token of the admin port's rotation report (0600; [`crate::admin_token`]) |
//!
//! `serve` never reads a root key, which may stay offline: it signs with the active authority's
//! `intermediate.pem`, `intermediate.key` and `jwt.key`, and reads `ca.json`, `authorities.json`,
//! `bundle.pem`, `revocations.json` and, of every authority not retired, `root.pem`, `jwt.pub` and
//! (an imported root) `intermediate.pem`.

use std::fs;
use std::io::Write;
use std::os::unix::fs::OpenOptionsExt;
use std::path::Path;

use meshid_identity::TrustDomain;
use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, IsCa, Issuer, KeyPair,
    KeyUsagePurpose,
};
use rustls_pki_types::CertificateDer;
use rustls_pki_types::pem::PemObject;
use serde::{Deserialize, Serialize};
use time::{Duration, OffsetDateTime};
use x509_parser::prelude::{FromDer, X509Certificate};

use meshid_identity::verify::Anchors;

use crate::authorities::{AuthorityState, RotationState};
use crate::ca_dir::{
    AuthorityFiles, DirLock, MAX_CA_FILE, check_is_ca, invalid, io_err, read_file, write_atomic,
};
use crate::serial::random_serial;

pub use crate::ca_dir::{AuthorityError, read_bundle};
use meshid_identity::jwt_svid::{JwtKey, JwtSigner, key_id};
use meshid_identity::pem::pem_block;
pub use meshid_identity::pem::pem_cert;

const ROOT_LIFETIME: Duration = Duration::days(3650);
const INTERMEDIATE_LIFETIME: Duration = Duration::days(365);
const FORMAT_VERSION: u32 = 1;

#[derive(Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct CaFile {
    version: u32,
    trust_domain: String,
}

/// An existing root to import instead of generating one (enterprise PKI).
pub struct ImportedRoot {
    pub cert_pem: String,
    pub key_pem: String,
}

/// What `init` wrote, for the command's output.
#[derive(Debug)]
pub struct InitReport {
    pub root_fingerprint: String,
    pub root_not_after: OffsetDateTime,
    pub intermediate_not_after: OffsetDateTime,
}

/// Creates a new CA in `dir`: a root (generated, or imported), a signing intermediate and the bundle.
pub fn init(
    dir: &Path,
    trust_domain: &TrustDomain,
    import: Option<ImportedRoot>,
) -> Result<InitReport, AuthorityError> {
    let ca_file = dir.join("ca.json");
    if ca_file.exists() {
        return Err(AuthorityError::AlreadyExists(dir.to_owned()));
    }
    if let Some(incomplete) = cut_short_init(dir) {
        return Err(incomplete);
    }
    fs::create_dir_all(dir).map_err(io_err(dir))?;
    let report = create_authority_files(&AuthorityFiles::plain(dir), trust_domain, import)?;
    let root_path = dir.join("root.pem");
    let root_pem = read_file(&root_path, MAX_CA_FILE).map_err(io_err(&root_path))?;
    write_file(&dir.join("bundle.pem"), &root_pem, false)?;
    let tokens = dir.join("join-tokens");
    fs::create_dir_all(&tokens).map_err(io_err(&tokens))?;
    let meta = CaFile {
        version: FORMAT_VERSION,
        trust_domain: trust_domain.to_string(),
    };
    let json = serde_json::to_vec_pretty(&meta).map_err(|e| invalid(&ca_file, e.to_string()))?;
    crate::admin_token::AdminToken::generate()?.write(dir)?;
    // ca.json last: its presence marks a complete CA.
    write_file(&ca_file, &json, false)?;
    // The new names (the files are synced as written), so `init` that printed success survives a
    // power loss.
    crate::ca_dir::sync_dir_of(&ca_file).map_err(io_err(dir))?;
    Ok(report)
}

/// The files `init` writes before `ca.json`, which it writes last.
const INIT_FILES: [&str; 9] = [
    "root.pem",
    "root.key",
    IMPORTED_MARKER,
    "intermediate.pem",
    "intermediate.key",
    JWT_KEY,
    JWT_PUB,
    "bundle.pem",
    crate::admin_token::TOKEN_FILE,
];

/// Files only a CA that was used has: a rotation's state, a revocation list, issuance records.
const USED_FILES: [&str; 3] = [
    crate::authorities::STATE_FILE,
    crate::revocations::REVOCATIONS_FILE,
    crate::issued::ISSUED_DIR,
];

/// What a `meshid-ca init` cut short (a crash before it wrote `ca.json`) left in `dir`, if it
/// left anything: an error naming a file it wrote and telling the operator to start again (not
/// "a CA exists", not "no CA": neither `init` nor `serve` could use the directory). Nothing is
/// removed: the operator decides. A directory with signs of use (a CA that lost its `ca.json`,
/// whose keys must not be thrown away) is not taken for one.
pub fn cut_short_init(dir: &Path) -> Option<AuthorityError> {
    let present = |name: &str| dir.join(name).symlink_metadata().is_ok();
    if present("ca.json") || USED_FILES.iter().any(|name| present(name)) {
        return None;
    }
    let found = INIT_FILES.iter().find(|name| present(name))?;
    Some(AuthorityError::Incomplete {
        dir: dir.to_owned(),
        found: (*found).to_owned(),
    })
}

/// The text of `path`, a CA file of at most [`MAX_CA_FILE`] bytes.
fn read_text(path: &Path) -> Result<String, AuthorityError> {
    let bytes = read_file(path, MAX_CA_FILE).map_err(io_err(path))?;
    String::from_utf8(bytes).map_err(|_| invalid(path, "not UTF-8 text"))
}

/// Writes one authority into `dir`: a root (generated, or imported: its key is then not stored) and a
/// signing intermediate with path length 0. Used by `init` and by `rotate prepare`.
pub fn create_authority_files(
    files: &AuthorityFiles,
    trust_domain: &TrustDomain,
    import: Option<ImportedRoot>,
) -> Result<InitReport, AuthorityError> {
    let dir = &files.dir;
    fs::create_dir_all(dir).map_err(io_err(dir))?;
    if files.path("intermediate.key").exists() {
        return Err(AuthorityError::AlreadyExists(
            files.path("intermediate.key"),
        ));
    }
    let now = OffsetDateTime::now_utc();

    let (root_der, root_issuer, root_key_pem) = match import {
        Some(imported) => {
            let der =
                CertificateDer::from_pem_slice(imported.cert_pem.as_bytes()).map_err(|e| {
                    invalid(
                        Path::new("--root-cert"),
                        format!("not a PEM certificate: {e}"),
                    )
                })?;
            check_is_ca(&der).map_err(|r| invalid(Path::new("--root-cert"), r))?;
            let key = KeyPair::from_pem(&imported.key_pem).map_err(|e| {
                invalid(
                    Path::new("--root-key"),
                    format!("not a PEM private key: {e}"),
                )
            })?;
            if !key_matches_cert(&key, &der) {
                return Err(invalid(
                    Path::new("--root-key"),
                    "the key does not belong to the root certificate",
                ));
            }
            let issuer = Issuer::from_ca_cert_der(&der, key)?;
            (der, issuer, None)
        }
        None => {
            let key = KeyPair::generate()?;
            let mut params = ca_params(&format!("meshid root CA {trust_domain}"), 1);
            params.not_before = now - Duration::minutes(5);
            params.not_after = now + ROOT_LIFETIME;
            let cert = params.self_signed(&key)?;
            let key_pem = key.serialize_pem();
            (cert.der().clone(), Issuer::new(params, key), Some(key_pem))
        }
    };
    let root_not_after = not_after_of(&root_der).map_err(|r| invalid(Path::new("root"), r))?;

    let inter_key = KeyPair::generate()?;
    let mut params = ca_params(&format!("meshid intermediate CA {trust_domain}"), 0);
    params.not_before = now - Duration::minutes(5);
    params.not_after = (now + INTERMEDIATE_LIFETIME).min(root_not_after);
    params.use_authority_key_identifier_extension = true;
    let inter = params.signed_by(&inter_key, &root_issuer)?;

    let mut new_files = vec![("root.pem", pem_cert(&root_der).into_bytes(), false)];
    match root_key_pem {
        Some(key_pem) => new_files.push(("root.key", key_pem.into_bytes(), true)),
        // Other issuing CAs may share an imported root: trust under it is pinned to this
        // authority's intermediate (see `pinned_intermediate`).
        None => new_files.push((IMPORTED_MARKER, IMPORTED_NOTE.as_bytes().to_vec(), false)),
    }
    new_files.push(("intermediate.pem", inter.pem().into_bytes(), false));
    new_files.push((
        "intermediate.key",
        inter_key.serialize_pem().into_bytes(),
        true,
    ));
    new_files.extend(jwt_key_files(files)?);
    install(files, &new_files)?;
    Ok(InitReport {
        root_fingerprint: crate::serial::sha256_hex(&root_der),
        root_not_after,
        intermediate_not_after: params.not_after,
    })
}

/// A file of an authority to write: its name (after the prefix), content, and whether it is secret
/// (mode 0600).
type NewFile = (&'static str, Vec<u8>, bool);

/// The ending of an authority's file while it is written (`install`).
const INSTALL_TMP: &str = ".new";

/// Puts an authority's files (name, content, secret) in place as far as the filesystem allows at
/// once: every file is written in full (and synced) under a temporary name first, then each is
/// renamed to its own. A failure removes the temporary files and those already renamed, so an
/// interrupted write leaves either no file of the authority or, after a crash during the
/// renames, some of them, which `rotate prepare` replaces when it runs again (the state does
/// not list them).
fn install(files: &AuthorityFiles, new_files: &[NewFile]) -> Result<(), AuthorityError> {
    let tmp = |name: &str| files.path(&format!("{name}{INSTALL_TMP}"));
    let remove_all = |upto_renamed: usize| {
        for (i, (name, _, _)) in new_files.iter().enumerate() {
            let _ = fs::remove_file(tmp(name));
            if i < upto_renamed {
                let _ = fs::remove_file(files.path(name));
            }
        }
    };
    for (name, bytes, secret) in new_files {
        let _ = fs::remove_file(tmp(name));
        if let Err(e) = write_file(&tmp(name), bytes, *secret) {
            remove_all(0);
            return Err(e);
        }
    }
    for (i, (name, _, _)) in new_files.iter().enumerate() {
        if let Err(e) = fs::rename(tmp(name), files.path(name)) {
            remove_all(i);
            return Err(io_err(&files.path(name))(e));
        }
    }
    // One sync of the directory for all the renames: until it, they may not survive a power
    // loss.
    if let Some((name, _, _)) = new_files.first()
        && let Err(e) = crate::ca_dir::sync_dir_of(&files.path(name))
    {
        remove_all(new_files.len());
        return Err(io_err(&files.dir)(e));
    }
    Ok(())
}

/// A new JWT-SVID signing key for the authority: `jwt.key` (PKCS#8 PEM, 0600) and `jwt.pub`
/// (SubjectPublicKeyInfo PEM), as files to write. The key belongs to the authority, not to its
/// intermediate: it is published with the authority's root and signs while the authority is
/// active, so it rotates with the authorities (`rotate prepare` makes the next one).
fn jwt_key_files(files: &AuthorityFiles) -> Result<[NewFile; 2], AuthorityError> {
    use aws_lc_rs::signature::{ECDSA_P256_SHA256_FIXED_SIGNING, EcdsaKeyPair};
    let path = files.path(JWT_KEY);
    let pkcs8 = EcdsaKeyPair::generate_pkcs8(
        &ECDSA_P256_SHA256_FIXED_SIGNING,
        &aws_lc_rs::rand::SystemRandom::new(),
    )
    .map_err(|_| invalid(&path, "generating the JWT key failed"))?;
    let signer =
        JwtSigner::from_pkcs8(pkcs8.as_ref()).map_err(|e| invalid(&path, e.to_string()))?;
    Ok([
        (
            JWT_KEY,
            pem_block("PRIVATE KEY", pkcs8.as_ref()).into_bytes(),
            true,
        ),
        (
            JWT_PUB,
            pem_block("PUBLIC KEY", &signer.spki).into_bytes(),
            false,
        ),
    ])
}

/// Writes a new JWT-SVID signing key for the authority ([`jwt_key_files`]).
pub fn write_jwt_key(files: &AuthorityFiles) -> Result<(), AuthorityError> {
    install(files, &jwt_key_files(files)?)
}

/// The JWT key's files in an authority.
pub const JWT_KEY: &str = "jwt.key";
pub const JWT_PUB: &str = "jwt.pub";

/// An authority's published JWT key (`jwt.pub`), if it has one (authorities made before meshid
/// signed JWT-SVIDs have none).
fn read_jwt_public(files: &AuthorityFiles) -> Result<Option<JwtKey>, AuthorityError> {
    use rustls_pki_types::SubjectPublicKeyInfoDer;
    let path = files.path(JWT_PUB);
    let pem = match read_file(&path, MAX_CA_FILE) {
        Ok(pem) => pem,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(io_err(&path)(e)),
    };
    let spki = SubjectPublicKeyInfoDer::from_pem_slice(&pem)
        .map_err(|e| invalid(&path, format!("not a PEM public key: {e}")))?;
    JwtKey::new(&key_id(spki.as_ref()), spki.as_ref())
        .map(Some)
        .map_err(|e| invalid(&path, e.to_string()))
}

/// The active authority's JWT signer (`jwt.key`), which must be the key `jwt.pub` publishes.
fn read_jwt_signer(
    files: &AuthorityFiles,
    public: Option<&JwtKey>,
) -> Result<Option<JwtSigner>, AuthorityError> {
    use rustls_pki_types::PrivatePkcs8KeyDer;
    let path = files.path(JWT_KEY);
    let pem = match read_file(&path, MAX_CA_FILE) {
        Ok(pem) => pem,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(io_err(&path)(e)),
    };
    let der = PrivatePkcs8KeyDer::from_pem_slice(&pem)
        .map_err(|e| invalid(&path, format!("not a PEM PKCS#8 key: {e}")))?;
    let signer =
        JwtSigner::from_pkcs8(der.secret_pkcs8_der()).map_err(|e| invalid(&path, e.to_string()))?;
    match public {
        Some(p) if p.spki == signer.spki => Ok(Some(signer)),
        Some(_) => Err(invalid(
            &path,
            format!("the key does not belong to {JWT_PUB} beside it"),
        )),
        None => Err(invalid(
            &path,
            format!("{JWT_PUB} is missing beside it: the key would sign tokens no one can check"),
        )),
    }
}

/// Replaces the signing intermediate of the authority in `dir` with a new one under the same root
/// (which needs `root.key` in `dir`). Certificate and key are replaced as a pair
/// ([`replace_intermediate`]).
pub fn renew_intermediate(
    files: &AuthorityFiles,
    trust_domain: &TrustDomain,
) -> Result<(), AuthorityError> {
    let root_path = files.path("root.pem");
    let root_pem = read_text(&root_path)?;
    let key_path = files.path("root.key");
    let key_pem = match read_text(&key_path) {
        Err(AuthorityError::Io { source, .. }) if source.kind() == std::io::ErrorKind::NotFound => {
            return Err(invalid(
                &key_path,
                "the root key is needed to sign a new intermediate (imported roots keep theirs \
                 offline)",
            ));
        }
        read => read?,
    };
    let root_key = KeyPair::from_pem(&key_pem)
        .map_err(|e| invalid(&key_path, format!("not a PEM private key: {e}")))?;
    let root_der = CertificateDer::from_pem_slice(root_pem.as_bytes())
        .map_err(|e| invalid(&root_path, format!("not a PEM certificate: {e}")))?;
    let root_not_after = not_after_of(&root_der).map_err(|r| invalid(&root_path, r))?;
    let issuer = Issuer::from_ca_cert_der(&root_der, root_key)?;
    let now = OffsetDateTime::now_utc();
    let inter_key = KeyPair::generate()?;
    let mut params = ca_params(&format!("meshid intermediate CA {trust_domain}"), 0);
    params.not_before = now - Duration::minutes(5);
    params.not_after = (now + INTERMEDIATE_LIFETIME).min(root_not_after);
    params.use_authority_key_identifier_extension = true;
    let inter = params.signed_by(&inter_key, &issuer)?;
    replace_intermediate(
        files,
        inter.pem().as_bytes(),
        inter_key.serialize_pem().as_bytes(),
    )
}

/// Where a new intermediate key waits, complete, while its certificate replaces the old one.
fn pending_key(files: &AuthorityFiles) -> std::path::PathBuf {
    files.path("intermediate.key.tmp")
}

/// Replaces the intermediate's certificate and key as a pair. The new key is written in full (and
/// synced) beside the old one first, then the certificate is replaced, then the key: a failure
/// before the key's turn puts the old certificate back, and a crash in between leaves a pair that
/// [`Authority::load`] uses (the pending key is the one the new certificate names) and, with the
/// directory's lock, completes. No step leaves a certificate beside a key that is not its own, and
/// nothing half-written. The caller holds the directory's lock ([`DirLock`]).
fn replace_intermediate(
    files: &AuthorityFiles,
    cert_pem: &[u8],
    key_pem: &[u8],
) -> Result<(), AuthorityError> {
    let (cert_path, pending) = (files.path("intermediate.pem"), pending_key(files));
    // A replacement cut short before: its key goes in place first, or the old certificate put
    // back on a failure below would have none (the waiting key is removed next).
    complete_cut_short(files)?;
    let old_cert = read_file(&cert_path, MAX_CA_FILE).map_err(io_err(&cert_path))?;
    let _ = fs::remove_file(&pending);
    if let Err(e) = write_file(&pending, key_pem, true) {
        let _ = fs::remove_file(&pending);
        return Err(e);
    }
    if let Err(e) = write_atomic(&cert_path, cert_pem) {
        let _ = fs::remove_file(&pending);
        return Err(e);
    }
    put_key_in_place(files, &old_cert, cert_pem)
}

/// The last step of [`replace_intermediate`]: the waiting key replaces the old one, or, when it
/// cannot, the old certificate goes back.
fn put_key_in_place(
    files: &AuthorityFiles,
    old_cert: &[u8],
    cert_pem: &[u8],
) -> Result<(), AuthorityError> {
    let (cert_path, key_path, pending) = (
        files.path("intermediate.pem"),
        files.path("intermediate.key"),
        pending_key(files),
    );
    if let Err(e) = fs::rename(&pending, &key_path) {
        // Gone: a CA that loaded the directory meanwhile put it in place itself (an older meshid
        // did so without the directory's lock). Done, when the key in place is the new
        // certificate's: putting the old certificate back would leave it beside the new key.
        if e.kind() == std::io::ErrorKind::NotFound
            && CertificateDer::from_pem_slice(cert_pem)
                .is_ok_and(|der| read_key(&key_path).is_ok_and(|k| key_matches_cert(&k, &der)))
        {
            return crate::ca_dir::sync_dir_of(&key_path).map_err(io_err(&files.dir));
        }
        let restored = write_atomic(&cert_path, old_cert);
        let _ = fs::remove_file(&pending);
        if let Err(r) = restored {
            tracing::error!(error = %r, "putting the old intermediate certificate back failed");
        }
        return Err(io_err(&key_path)(e));
    }
    // The new certificate and key are both in place: a failed sync leaves them (they belong
    // together) and says they may not survive a power loss.
    crate::ca_dir::sync_dir_of(&key_path).map_err(io_err(&files.dir))
}

/// A private key file of the CA directory.
fn read_key(path: &Path) -> Result<KeyPair, AuthorityError> {
    KeyPair::from_pem(&read_text(path)?)
        .map_err(|e| invalid(path, format!("not a PEM private key: {e}")))
}

/// Puts the key waiting beside the intermediate (a `rotate intermediate` cut short) in place when
/// it is the key of `intermediate.pem` and the key in place is not. Only for a holder of the
/// directory's lock ([`DirLock`]), which `rotate intermediate` holds from its first write to its
/// last: then no replacement is under way, and a waiting key that fits is one a replacement cut
/// short left.
fn complete_cut_short(files: &AuthorityFiles) -> Result<(), AuthorityError> {
    let (cert_path, key_path, pending) = (
        files.path("intermediate.pem"),
        files.path("intermediate.key"),
        pending_key(files),
    );
    if !pending.try_exists().map_err(io_err(&pending))? {
        return Ok(());
    }
    let cert_pem = read_file(&cert_path, MAX_CA_FILE).map_err(io_err(&cert_path))?;
    let Ok(cert) = CertificateDer::from_pem_slice(&cert_pem) else {
        return Ok(());
    };
    let fits = |path: &Path| read_key(path).is_ok_and(|k| key_matches_cert(&k, &cert));
    if !fits(&key_path) && fits(&pending) {
        crate::ca_dir::rename_synced(&pending, &key_path).map_err(io_err(&key_path))?;
    }
    Ok(())
}

/// The key of `cert` (an intermediate): `intermediate.key`, or, when a `rotate intermediate` was
/// cut short between its certificate and its key, the complete new key waiting beside it (moved
/// into place when the directory's lock is free: see [`complete_cut_short`]).
fn intermediate_key(
    files: &AuthorityFiles,
    cert: &CertificateDer<'_>,
) -> Result<KeyPair, AuthorityError> {
    let key_path = files.path("intermediate.key");
    let key = read_key(&key_path)?;
    if key_matches_cert(&key, cert) {
        return Ok(key);
    }
    let waiting = read_key(&pending_key(files))
        .ok()
        .filter(|k| key_matches_cert(k, cert));
    let Some(waiting) = waiting else {
        // A `rotate intermediate` under way may have put its new key in place between the two
        // reads above.
        let again = read_key(&key_path)?;
        if key_matches_cert(&again, cert) {
            return Ok(again);
        }
        return Err(invalid(
            &key_path,
            "the key does not belong to intermediate.pem",
        ));
    };
    tracing::warn!(
        key = %key_path.display(),
        "intermediate.pem is newer than intermediate.key (a `rotate intermediate` was cut short, \
         or is under way): using the new key that is waiting beside it"
    );
    // Never without the lock: a `rotate intermediate` under way holds it, and its own rename of
    // the waiting key must not find it gone. Held (or a read-only directory), the key serves from
    // memory, and a later load or `rotate intermediate` puts it in place.
    if let Ok(_lock) = DirLock::acquire_within(&files.dir, std::time::Duration::ZERO)
        && let Err(error) = complete_cut_short(files)
    {
        tracing::warn!(%error, "putting the waiting intermediate key in place failed");
    }
    Ok(waiting)
}

/// How many times a load reads the signing intermediate and its key when the pair it read does
/// not match while `intermediate.pem` changed meanwhile ([`signing_pair`]).
const PAIR_READS: usize = 5;

/// The active authority's intermediate and its key, read as a pair. A `rotate intermediate` in
/// another process replaces the certificate and then the key ([`replace_intermediate`]): a read
/// of the old certificate before it and of the key after it sees a pair that does not match,
/// although the directory holds a whole one before and after. So when the key does not fit and
/// `intermediate.pem` changed since it was read, the pair is read again (up to [`PAIR_READS`]
/// times: each retry follows a change another process made); a pair that does not match while
/// the certificate stays the same is refused at once.
fn signing_pair(
    files: &AuthorityFiles,
) -> Result<(CertificateDer<'static>, KeyPair), AuthorityError> {
    let path = files.path("intermediate.pem");
    let mut reads = 1;
    loop {
        let pem = read_file(&path, MAX_CA_FILE).map_err(io_err(&path))?;
        let der = CertificateDer::from_pem_slice(&pem)
            .map_err(|e| invalid(&path, format!("not a PEM certificate: {e}")))?;
        #[cfg(test)]
        between_pair_reads::run();
        let error = match intermediate_key(files, &der) {
            Ok(key) => return Ok((der, key)),
            Err(error) => error,
        };
        let changed = read_file(&path, MAX_CA_FILE).is_ok_and(|now| now != pem);
        if !changed || reads >= PAIR_READS {
            return Err(error);
        }
        tracing::info!(
            cert = %path.display(),
            %error,
            "the intermediate changed while it was read with its key (a `rotate intermediate` \
             under way): reading the pair again"
        );
        reads += 1;
    }
}

/// What a test does between a load's read of `intermediate.pem` and of its key (tests only): the
/// steps of a `rotate intermediate` in another process, at the moment that splits the pair.
#[cfg(test)]
mod between_pair_reads {
    use std::cell::RefCell;

    type Step = Box<dyn FnMut()>;

    thread_local!(static STEP: RefCell<Option<Step>> = const { RefCell::new(None) });

    /// Runs `step` between the two reads of every load on this thread, until [`clear`].
    pub(super) fn set(step: impl FnMut() + 'static) {
        STEP.with(|s| *s.borrow_mut() = Some(Box::new(step)));
    }

    pub(super) fn clear() {
        STEP.with(|s| *s.borrow_mut() = None);
    }

    pub(super) fn run() {
        let step = STEP.with(|s| s.borrow_mut().take());
        if let Some(mut step) = step {
            step();
            STEP.with(|s| {
                let mut slot = s.borrow_mut();
                if slot.is_none() {
                    *slot = Some(step);
                }
            });
        }
    }
}

fn ca_params(common_name: &str, path_len: u8) -> CertificateParams {
    let mut params = CertificateParams::default();
    let mut dn = DistinguishedName::new();
    dn.push(DnType::OrganizationName, "meshid");
    dn.push(DnType::CommonName, common_name);
    params.distinguished_name = dn;
    params.is_ca = IsCa::Ca(BasicConstraints::Constrained(path_len));
    params.key_usages = vec![
        KeyUsagePurpose::KeyCertSign,
        KeyUsagePurpose::CrlSign,
        KeyUsagePurpose::DigitalSignature,
    ];
    params.serial_number = Some(random_serial());
    params
}

/// The material `serve` signs with. Cloned only to change its revocation list alone
/// (`server::apply_revocations_alone`): the keys are shared, not copied.
#[derive(Clone)]
pub struct Authority {
    pub trust_domain: TrustDomain,
    /// The active authority's name (see `authorities.json`).
    pub name: String,
    /// The root of `roots` the signing intermediate chains to.
    pub active_root: CertificateDer<'static>,
    /// The authorities `authorities.json` says were retired (`gone`).
    pub retired: Vec<String>,
    /// The signing intermediate, DER.
    pub intermediate_der: CertificateDer<'static>,
    pub intermediate_not_after: OffsetDateTime,
    /// Signs leaves.
    pub issuer: std::sync::Arc<Issuer<'static, KeyPair>>,
    /// The trust bundle's roots, DER.
    pub roots: Vec<CertificateDer<'static>>,
    /// The issuing intermediates trust is pinned to: those of the authorities whose root key this
    /// directory does not hold (an imported root, which other CAs may share). Published with the
    /// bundle; see [`meshid_identity::verify::Anchors::with_pins`].
    pub pinned: Vec<CertificateDer<'static>>,
    /// `roots` with `pinned`, as renewals are verified.
    pub anchors: Anchors,
    /// Every authority still in the bundle, by name, with its root (and its pin, if pinned).
    pub authority_anchors: Vec<(String, Anchors)>,
    /// Those of `authority_anchors` whose root is in `roots`: a chain one of them verifies also
    /// verifies under `anchors` (the same root, its pins among all of them).
    pub bundled_authorities: Vec<String>,
    pub bundle_version: u64,
    /// Sidecars should renew at once (after a forced retirement).
    pub renew_now: bool,
    /// Signs JWT-SVIDs: the active authority's JWT key (`None`: it has none).
    pub jwt_signer: Option<std::sync::Arc<JwtSigner>>,
    /// The JWT keys of every authority in the bundle, published with it.
    pub jwt_keys: Vec<JwtKey>,
    /// What `meshid-ca revoke` listed (`revocations.json`).
    pub revocations: std::sync::Arc<crate::revocations::Revocations>,
}

impl std::fmt::Debug for Authority {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Authority")
            .field("trust_domain", &self.trust_domain)
            .field("intermediate_not_after", &self.intermediate_not_after)
            .field("roots", &self.roots.len())
            .finish_non_exhaustive()
    }
}

/// Reads the trust domain from `ca.json`.
pub fn read_trust_domain(dir: &Path) -> Result<TrustDomain, AuthorityError> {
    let path = dir.join("ca.json");
    let bytes = match read_file(&path, MAX_CA_FILE) {
        Ok(bytes) => bytes,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            return Err(cut_short_init(dir).unwrap_or_else(|| io_err(&path)(e)));
        }
        Err(e) => return Err(io_err(&path)(e)),
    };
    let meta: CaFile = serde_json::from_slice(&bytes).map_err(|e| invalid(&path, e.to_string()))?;
    if meta.version != FORMAT_VERSION {
        return Err(invalid(
            &path,
            format!("unsupported format version {}", meta.version),
        ));
    }
    TrustDomain::new(&meta.trust_domain).map_err(|e| invalid(&path, e.to_string()))
}

/// Marks an authority whose root was imported (`root.imported`, or `a<n>-root.imported`).
pub const IMPORTED_MARKER: &str = "root.imported";
const IMPORTED_NOTE: &str = "This authority's root was imported: other issuing CAs may share it, so \
trust under it is pinned to this authority's intermediate. Keep this file with the CA's files.\n";

/// An authority's issuing intermediate when trust in its root is pinned to it: the root was
/// imported (an enterprise root, which other issuing CAs may share), so the mesh cannot vouch for
/// everything under that root, only for its own intermediate. Such an intermediate never changes in
/// place (`rotate intermediate` needs the root key, which an import does not keep): a new one comes
/// as a new authority (`rotate prepare --root-cert --root-key`), published before it signs. A root
/// the mesh generated is not pinned, whether or not its key sits in this directory: nothing but its
/// own key signs under it.
fn pinned_intermediate(
    files: &AuthorityFiles,
) -> Result<Option<CertificateDer<'static>>, AuthorityError> {
    let marker = files.path(IMPORTED_MARKER);
    if !marker.try_exists().map_err(io_err(&marker))? {
        return Ok(None);
    }
    let path = files.path("intermediate.pem");
    // Missing, the root would be trusted unpinned: every sibling CA under it accepted. Refused
    // (the CA keeps its last state and says why), not read as nothing to pin.
    let pem = match read_file(&path, MAX_CA_FILE) {
        Ok(pem) => pem,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            return Err(invalid(
                &path,
                format!(
                    "missing, but {} says this authority's root was imported: trust under that \
                     root is pinned to this intermediate, so the CA needs it (give the CA every \
                     authority's intermediate.pem: meshid-ca secret ships them)",
                    marker.display()
                ),
            ));
        }
        Err(e) => return Err(io_err(&path)(e)),
    };
    let der = CertificateDer::from_pem_slice(&pem)
        .map_err(|e| invalid(&path, format!("not a PEM certificate: {e}")))?;
    Ok(Some(der))
}

/// The bundle sidecars start with ([`bootstrap_bundle`]).
#[derive(Debug)]
pub struct BootstrapBundle {
    /// The roots, then the pinned intermediates, as PEM.
    pub pem: String,
    pub roots: usize,
    pub pinned: usize,
}

/// What a sidecar starts with to reach the CA of `dir`: the roots of bundle.pem, then the issuing
/// intermediates trust under an imported root is pinned to (the same lists the CA serves).
pub fn bootstrap_bundle(dir: &Path) -> Result<BootstrapBundle, AuthorityError> {
    let authority = Authority::load(dir)?;
    let pem = authority
        .roots
        .iter()
        .chain(&authority.pinned)
        .map(|c| meshid_identity::pem::pem_cert(c))
        .collect();
    Ok(BootstrapBundle {
        pem,
        roots: authority.roots.len(),
        pinned: authority.pinned.len(),
    })
}

/// The prefixes (`a<n>-`) of authority files in `dir` that `state` does not list: what `rotate
/// prepare` writes before it lists the authority.
fn unlisted_prefixes(dir: &Path, state: &RotationState) -> Vec<String> {
    let Ok(entries) = fs::read_dir(dir) else {
        return Vec::new();
    };
    let mut prefixes: Vec<String> = entries
        .filter_map(Result::ok)
        .filter_map(|e| {
            let name = e.file_name().into_string().ok()?;
            let n = name.strip_prefix('a')?.strip_suffix("-root.pem")?;
            (!n.is_empty() && n.bytes().all(|b| b.is_ascii_digit())).then(|| format!("a{n}-"))
        })
        .filter(|p| !state.authorities.iter().any(|a| &a.prefix == p))
        .collect();
    prefixes.sort();
    prefixes
}

impl Authority {
    /// Loads the signing material and bundle from a CA directory, checking that they fit together.
    pub fn load(dir: &Path) -> Result<Self, AuthorityError> {
        let trust_domain = read_trust_domain(dir)?;
        let state = RotationState::load(dir)?;
        let active = state.active().clone();
        let files = state.files_of(dir, &active);
        let inter_path = files.path("intermediate.pem");
        let (intermediate_der, key) = signing_pair(&files)?;
        check_is_ca(&intermediate_der).map_err(|r| invalid(&inter_path, r))?;
        let intermediate_not_after =
            not_after_of(&intermediate_der).map_err(|r| invalid(&inter_path, r))?;

        let issuer = Issuer::from_ca_cert_der(&intermediate_der, key)?;

        // bundle.pem is what is served (rotation commands write it from the state, keeping roots
        // an operator added by hand, e.g. during a migration; each CA numbers such an edit as a
        // version of its own: `Bundle::next`).
        let roots = read_bundle(&dir.join("bundle.pem"))?;
        // Never sign under a root the bundle does not carry: every certificate would be refused.
        let active_root = issuing_root(&intermediate_der, &roots)
            .ok_or_else(|| {
                invalid(
                    &inter_path,
                    format!(
                        "authority {} signs with this intermediate, but bundle.pem holds no root \
                         it chains to: refusing to sign certificates no one would trust",
                        active.name
                    ),
                )
            })?
            .clone();
        let retired = state
            .authorities
            .iter()
            .filter(|a| a.state == AuthorityState::Gone)
            .map(|a| a.name.clone())
            .collect();
        let mut pinned = Vec::new();
        let mut authority_anchors = Vec::new();
        let mut bundled_authorities = Vec::new();
        let mut jwt_keys = Vec::new();
        let mut jwt_signer = None;
        let mut listed_roots = Vec::new();
        for a in state
            .authorities
            .iter()
            .filter(|a| a.state != AuthorityState::Gone)
        {
            let files = state.files_of(dir, a);
            let pin = pinned_intermediate(&files)?;
            pinned.extend(pin.clone());
            let jwt = read_jwt_public(&files)?;
            if a.name == active.name {
                jwt_signer = read_jwt_signer(&files, jwt.as_ref())?;
            }
            jwt_keys.extend(jwt);
            // Unreadable, the authority would have no anchors: a sidecar serving under it would
            // be counted as serving under none, and the retire gate that waits for such sidecars
            // would let it go. Refused (the CA keeps its last state and says why).
            let root_path = files.path("root.pem");
            let root = authority_root(&root_path)?;
            let bundled = roots.contains(&root);
            listed_roots.push(root.clone());
            let anchors = Anchors::with_pins(&[root], pin.as_slice(), trust_domain.clone())
                .map_err(|e| invalid(&root_path, format!("not usable as a trust anchor: {e:?}")))?;
            authority_anchors.push((a.name.clone(), anchors));
            if bundled {
                bundled_authorities.push(a.name.clone());
            }
        }
        // An imported root `rotate prepare` has put into bundle.pem before authorities.json lists
        // its authority (two writes: a reload may fall between them, and a prepare cut short
        // stops there) is pinned to that authority's intermediate all the same: unpinned, a root
        // other issuing CAs share would take their certificates too.
        for prefix in unlisted_prefixes(dir, &state) {
            let files = AuthorityFiles {
                dir: dir.to_owned(),
                prefix,
            };
            let root_path = files.path("root.pem");
            let root = match authority_root(&root_path) {
                Ok(root) => root,
                Err(error) => {
                    unreadable_unlisted_root(&files, &roots, &listed_roots, error)?;
                    continue;
                }
            };
            if roots.contains(&root)
                && let Some(pin) = pinned_intermediate(&files)?
            {
                pinned.push(pin);
            }
        }
        let bundle_path = dir.join("bundle.pem");
        let anchors = Anchors::with_pins(&roots, &pinned, trust_domain.clone())
            .map_err(|e| invalid(&bundle_path, format!("not usable as trust anchors: {e:?}")))?;
        Ok(Self {
            trust_domain,
            name: active.name,
            active_root,
            retired,
            intermediate_der,
            intermediate_not_after,
            issuer: std::sync::Arc::new(issuer),
            roots,
            pinned,
            anchors,
            authority_anchors,
            bundled_authorities,
            bundle_version: state.bundle_version,
            renew_now: state.renew_now_at == Some(state.bundle_version),
            jwt_signer: jwt_signer.map(std::sync::Arc::new),
            jwt_keys,
            revocations: std::sync::Arc::new(crate::revocations::Revocations::load(dir)?),
        })
    }
}

impl Authority {
    /// Why a running CA that signs with `self` must not take on `next` (a reload of its
    /// directory), or `None` when it may. `next` is complete in itself ([`Authority::load`]
    /// checked that); what is refused here is a move backwards: `next` drops from the bundle the
    /// root `self` signs under although it does not say that authority was retired (a stale copy
    /// of the directory, a lost `authorities.json`: every live certificate would stop being
    /// trusted), or numbers its bundle below `self`'s (sidecars would be served an older trust
    /// under versions they may have acknowledged).
    pub fn refuses_successor(&self, next: &Authority) -> Option<String> {
        if next.bundle_version < self.bundle_version {
            return Some(format!(
                "authorities.json moved the bundle version back from {} to {} (an older copy of \
                 the CA directory?)",
                self.bundle_version, next.bundle_version
            ));
        }
        if !next.roots.contains(&self.active_root) && !next.retired.contains(&self.name) {
            return Some(format!(
                "bundle.pem no longer holds the root of authority {}, which signs now, and \
                 authorities.json does not say it was retired (an older copy of the CA \
                 directory, or authorities.json lost?): every certificate it issued would stop \
                 being trusted",
                self.name
            ));
        }
        None
    }
}

/// Whether a load may go on without the root of an authority `authorities.json` does not list
/// (`files`, what a `rotate prepare` cut short left), which cannot be read (`error`): such an
/// authority is no part of the trust, and all a load takes from it is the pin of an imported root
/// that `bundle.pem` already holds. That pin cannot matter when its root was not imported, or
/// when `bundle.pem` holds only roots of listed authorities (`listed_roots`): the trust is then
/// theirs, with their pins. The load goes on, with a warning naming the file. Otherwise the
/// unreadable file may be a root `bundle.pem` serves, which would be trusted unpinned: refused,
/// as a listed authority's unreadable root is (see [`Authority::load`]).
fn unreadable_unlisted_root(
    files: &AuthorityFiles,
    roots: &[CertificateDer<'static>],
    listed_roots: &[CertificateDer<'static>],
    error: AuthorityError,
) -> Result<(), AuthorityError> {
    let marker = files.path(IMPORTED_MARKER);
    let imported = marker.try_exists().map_err(io_err(&marker))?;
    let root_path = files.path("root.pem");
    if imported && roots.iter().any(|r| !listed_roots.contains(r)) {
        return Err(invalid(
            &root_path,
            format!(
                "{}; authorities.json does not list this authority, but {} says its root was \
                 imported and bundle.pem holds a root no listed authority has, which may be this \
                 one (trust under it is pinned to this authority's intermediate): remove the \
                 {}* files, or run `meshid-ca rotate prepare` again, which replaces them",
                why(&error),
                marker.display(),
                files.prefix
            ),
        ));
    }
    tracing::warn!(
        file = %root_path.display(),
        error = %why(&error),
        "a root of an authority authorities.json does not list cannot be read (a `meshid-ca \
         rotate prepare` cut short?): it is no part of the trust and is ignored; remove it, or \
         run `meshid-ca rotate prepare` again, which replaces it"
    );
    Ok(())
}

/// What is wrong with a file, without its path (the caller names it).
fn why(error: &AuthorityError) -> String {
    match error {
        AuthorityError::Io { source, .. } => source.to_string(),
        AuthorityError::Invalid { reason, .. } => reason.clone(),
        other => other.to_string(),
    }
}

/// An authority's root (`root.pem`, its first certificate).
fn authority_root(path: &Path) -> Result<CertificateDer<'static>, AuthorityError> {
    read_bundle(path)?
        .into_iter()
        .next()
        .ok_or_else(|| invalid(path, "the bundle holds no certificate"))
}

/// The root in `roots` that signed `intermediate`, if any.
fn issuing_root<'a>(
    intermediate: &CertificateDer<'_>,
    roots: &'a [CertificateDer<'static>],
) -> Option<&'a CertificateDer<'static>> {
    let (_, inter) = X509Certificate::from_der(intermediate).ok()?;
    roots.iter().find(|root| {
        X509Certificate::from_der(root).is_ok_and(|(_, root)| {
            inter.issuer() == root.subject()
                && inter.verify_signature(Some(root.public_key())).is_ok()
        })
    })
}

fn not_after_of(der: &[u8]) -> Result<OffsetDateTime, String> {
    let (_, cert) =
        X509Certificate::from_der(der).map_err(|e| format!("not an X.509 certificate: {e}"))?;
    Ok(cert.validity().not_after.to_datetime())
}

fn key_matches_cert(key: &KeyPair, der: &[u8]) -> bool {
    match X509Certificate::from_der(der) {
        Ok((_, cert)) => cert.public_key().subject_public_key.data.as_ref() == key.public_key_raw(),
        Err(_) => false,
    }
}

/// Writes a file that must not exist yet; `secret` files get mode 0600.
pub(crate) fn write_file(path: &Path, bytes: &[u8], secret: bool) -> Result<(), AuthorityError> {
    let mut opts = fs::OpenOptions::new();
    opts.write(true).create_new(true);
    opts.mode(if secret { 0o600 } else { 0o644 });
    let mut f = opts.open(path).map_err(io_err(path))?;
    f.write_all(bytes).map_err(io_err(path))?;
    f.sync_all().map_err(io_err(path))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    #[test]
    fn init_then_load_and_refuse_overwrite() {
        let dir = tempfile::tempdir().unwrap();
        let td = TrustDomain::new("example.org").unwrap();
        init(dir.path(), &td, None).unwrap();
        for secret in ["root.key", "intermediate.key"] {
            let mode = fs::metadata(dir.path().join(secret))
                .unwrap()
                .permissions()
                .mode();
            assert_eq!(mode & 0o777, 0o600, "{secret}");
        }
        let auth = Authority::load(dir.path()).unwrap();
        assert_eq!(auth.trust_domain, td);
        assert_eq!(auth.roots.len(), 1);
        assert!(matches!(
            init(dir.path(), &td, None),
            Err(AuthorityError::AlreadyExists(_))
        ));
    }

    fn active_files(dir: &Path) -> AuthorityFiles {
        let state = RotationState::load(dir).unwrap();
        state.files_of(dir, &state.active().clone())
    }

    #[test]
    fn an_intermediate_rotation_cut_short_between_certificate_and_key_is_completed_at_load() {
        let dir = tempfile::tempdir().unwrap();
        let td = TrustDomain::new("example.org").unwrap();
        init(dir.path(), &td, None).unwrap();
        let files = active_files(dir.path());
        let old_key = fs::read(files.path("intermediate.key")).unwrap();
        renew_intermediate(&files, &td).unwrap();
        let new_key = fs::read(files.path("intermediate.key")).unwrap();
        assert_ne!(old_key, new_key);
        assert!(
            !pending_key(&files).exists(),
            "nothing left beside the pair"
        );
        // The state a crash after the certificate's rename leaves: the new certificate, the old
        // key, the new key complete beside it.
        fs::write(pending_key(&files), &new_key).unwrap();
        fs::write(files.path("intermediate.key"), &old_key).unwrap();
        let auth = Authority::load(dir.path()).unwrap();
        assert_eq!(fs::read(files.path("intermediate.key")).unwrap(), new_key);
        assert!(!pending_key(&files).exists());
        let id = meshid_identity::SpiffeId::parse("spiffe://example.org/ns/a/sa/b").unwrap();
        let csr_key = KeyPair::generate().unwrap();
        let csr = rcgen::CertificateParams::default()
            .serialize_request(&csr_key)
            .unwrap();
        let public = crate::csr::CsrPublicKey::from_csr_der(csr.der()).unwrap();
        let issued = crate::signer::sign_leaf(
            &auth,
            &id,
            &public,
            std::time::Duration::from_secs(600),
            OffsetDateTime::now_utc(),
        )
        .unwrap();
        let (_, leaf) = X509Certificate::from_der(&issued.chain[0]).unwrap();
        let (_, inter) = X509Certificate::from_der(&auth.intermediate_der).unwrap();
        leaf.verify_signature(Some(inter.public_key())).unwrap();

        // A stray key that is not the certificate's is no way out.
        fs::write(pending_key(&files), &old_key).unwrap();
        fs::write(files.path("intermediate.key"), &old_key).unwrap();
        assert!(Authority::load(dir.path()).is_err());
    }

    #[test]
    fn an_intermediate_key_that_cannot_be_put_in_place_puts_the_old_certificate_back() {
        let dir = tempfile::tempdir().unwrap();
        let td = TrustDomain::new("example.org").unwrap();
        init(dir.path(), &td, None).unwrap();
        let files = active_files(dir.path());
        let old_cert = fs::read(files.path("intermediate.pem")).unwrap();
        // A non-empty directory where the key goes fails its rename (also for root), as a full or
        // read-only directory fails a write.
        let key_path = files.path("intermediate.key");
        let old_key = fs::read(&key_path).unwrap();
        fs::remove_file(&key_path).unwrap();
        fs::create_dir(&key_path).unwrap();
        fs::write(key_path.join("x"), b"x").unwrap();
        assert!(renew_intermediate(&files, &td).is_err());
        assert_eq!(fs::read(files.path("intermediate.pem")).unwrap(), old_cert);
        assert!(!pending_key(&files).exists());
        fs::remove_dir_all(&key_path).unwrap();
        fs::write(&key_path, &old_key).unwrap();
        Authority::load(dir.path()).unwrap();
        let names: Vec<String> = fs::read_dir(dir.path())
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .filter(|n| n.contains("tmp"))
            .collect();
        assert!(names.is_empty(), "{names:?}");
    }

    /// A CA's reload (or any `Authority::load`) that falls between a `rotate intermediate`'s new
    /// certificate and its key's rename never leaves the old certificate beside the new key.
    #[test]
    fn a_load_during_an_intermediate_rotation_leaves_the_pair_whole() {
        let dir = tempfile::tempdir().unwrap();
        let td = TrustDomain::new("example.org").unwrap();
        init(dir.path(), &td, None).unwrap();
        let files = active_files(dir.path());
        let (cert_path, key_path) = (
            files.path("intermediate.pem"),
            files.path("intermediate.key"),
        );
        let (old_cert, old_key) = (fs::read(&cert_path).unwrap(), fs::read(&key_path).unwrap());
        renew_intermediate(&files, &td).unwrap();
        let (new_cert, new_key) = (fs::read(&cert_path).unwrap(), fs::read(&key_path).unwrap());
        // The rotation up to its last step: the new certificate in place, the new key waiting.
        let midway = || {
            fs::write(&cert_path, &new_cert).unwrap();
            fs::write(&key_path, &old_key).unwrap();
            fs::write(pending_key(&files), &new_key).unwrap();
        };
        let whole = || {
            assert_eq!(fs::read(&cert_path).unwrap(), new_cert);
            assert_eq!(fs::read(&key_path).unwrap(), new_key);
            assert!(!pending_key(&files).exists());
            Authority::load(dir.path()).unwrap();
        };

        // The rotation holds the directory's lock: a load signs with the waiting key and leaves
        // it where the rotation's rename expects it.
        midway();
        let lock = DirLock::acquire(dir.path()).unwrap();
        Authority::load(dir.path()).unwrap();
        assert!(
            pending_key(&files).exists(),
            "a load moved the waiting key under a rotation"
        );
        assert_eq!(fs::read(&key_path).unwrap(), old_key);
        put_key_in_place(&files, &old_cert, &new_cert).unwrap();
        drop(lock);
        whole();

        // A load that did move it (an older meshid, which took no lock): the rotation's rename
        // finds the key in place and is done, not undone.
        midway();
        crate::ca_dir::rename_synced(&pending_key(&files), &key_path).unwrap();
        put_key_in_place(&files, &old_cert, &new_cert).unwrap();
        whole();

        // A rotation that finds one cut short puts the waiting key in place first: failing before
        // its own key's turn (its certificate cannot be written), it leaves a pair.
        midway();
        let blocked = cert_path.with_extension(format!("tmp{}", std::process::id()));
        fs::create_dir(&blocked).unwrap();
        assert!(renew_intermediate(&files, &td).is_err());
        fs::remove_dir(&blocked).unwrap();
        whole();
    }

    /// A load that reads `intermediate.pem` just before a `rotate intermediate` in another process
    /// replaces the pair, and `intermediate.key` just after, has read a certificate and a key
    /// that do not match: it reads the pair again, so a CA starting (or reloading) during the
    /// rotation loads the new pair instead of failing. A rotation between every read of it is
    /// given up on after `PAIR_READS` reads.
    #[test]
    fn a_load_that_reads_the_old_intermediate_and_then_the_new_key_reads_the_pair_again() {
        use std::cell::Cell;
        use std::rc::Rc;
        let dir = tempfile::tempdir().unwrap();
        let td = TrustDomain::new("example.org").unwrap();
        init(dir.path(), &td, None).unwrap();
        let files = active_files(dir.path());
        let old_cert = Authority::load(dir.path()).unwrap().intermediate_der;
        let rotations = Rc::new(Cell::new(0));
        let (f, t, n) = (files.clone(), td.clone(), rotations.clone());
        between_pair_reads::set(move || {
            if n.get() == 0 {
                renew_intermediate(&f, &t).unwrap();
                n.set(1);
            }
        });
        let loaded = Authority::load(dir.path());
        between_pair_reads::clear();
        let loaded = loaded.unwrap();
        assert_eq!(rotations.get(), 1, "the rotation ran between the reads");
        let on_disk =
            CertificateDer::from_pem_slice(&fs::read(files.path("intermediate.pem")).unwrap())
                .unwrap();
        assert_ne!(loaded.intermediate_der, old_cert);
        assert_eq!(loaded.intermediate_der, on_disk);
        let key = read_key(&files.path("intermediate.key")).unwrap();
        assert!(key_matches_cert(&key, &loaded.intermediate_der));

        // A rotation after every read of the certificate: the pair never matches; refused after
        // a bounded number of reads, naming the key.
        let (f, t, n) = (files.clone(), td.clone(), rotations.clone());
        rotations.set(0);
        between_pair_reads::set(move || {
            renew_intermediate(&f, &t).unwrap();
            n.set(n.get() + 1);
        });
        let err = Authority::load(dir.path()).map(|_| ()).unwrap_err();
        between_pair_reads::clear();
        assert_eq!(rotations.get(), PAIR_READS);
        let err = err.to_string();
        assert!(
            err.contains("intermediate.key") && err.contains("does not belong"),
            "{err}"
        );
        // A key that is not the certificate's while the certificate stays as it is: refused at
        // once (no rotation is under way).
        Authority::load(dir.path()).unwrap();
        fs::write(
            files.path("intermediate.key"),
            KeyPair::generate().unwrap().serialize_pem(),
        )
        .unwrap();
        let reads = Rc::new(Cell::new(0));
        let r = reads.clone();
        between_pair_reads::set(move || r.set(r.get() + 1));
        let err = Authority::load(dir.path()).map(|_| ()).unwrap_err();
        between_pair_reads::clear();
        assert!(err.to_string().contains("does not belong"), "{err}");
        assert_eq!(reads.get(), 1);
    }

    /// An authority root that cannot be read is refused, not skipped: skipped, the authority had
    /// no anchors, and the retire gate could not see the sidecars still serving under it.
    #[test]
    fn an_unreadable_authority_root_is_refused_not_skipped() {
        let dir = tempfile::tempdir().unwrap();
        let td = TrustDomain::new("example.org").unwrap();
        init(dir.path(), &td, None).unwrap();
        crate::rotation::prepare(dir.path(), None).unwrap();
        let loaded = Authority::load(dir.path()).unwrap();
        assert!(loaded.authority_anchors.iter().any(|(name, _)| name == "2"));
        let root = dir.path().join("a2-root.pem");
        let good = fs::read(&root).unwrap();
        let refused = |why: &str| {
            let err = Authority::load(dir.path()).unwrap_err().to_string();
            assert!(err.contains("a2-root.pem"), "{why}: {err}");
        };
        fs::write(&root, b"not pem").unwrap();
        refused("garbage");
        fs::remove_file(&root).unwrap();
        fs::create_dir(&root).unwrap();
        refused("a directory");
        fs::remove_dir(&root).unwrap();
        refused("missing");
        // Not listed (a `rotate prepare` between its two writes, or cut short): no part of the
        // trust. See `an_unreadable_unlisted_root_is_ignored_and_prepare_replaces_it`.
        fs::write(&root, &good).unwrap();
        let state = dir.path().join("authorities.json");
        let mut listed: serde_json::Value =
            serde_json::from_slice(&fs::read(&state).unwrap()).unwrap();
        listed["authorities"]
            .as_array_mut()
            .unwrap()
            .retain(|a| a["prefix"] != "a2-");
        fs::write(&state, listed.to_string()).unwrap();
        Authority::load(dir.path()).unwrap();
    }

    /// A `rotate prepare` cut short while writing a new authority's files leaves files
    /// `authorities.json` does not list, whose root may not be readable: no part of the trust.
    /// The CA loads (and so starts) all the same, and `rotate prepare` makes the authority anew
    /// over them. Only what cannot be told apart from trust `bundle.pem` serves is refused (an
    /// imported root: `an_imported_root_is_pinned_before_its_authority_is_listed`).
    #[test]
    fn an_unreadable_unlisted_root_is_ignored_and_prepare_replaces_it() {
        use crate::ca_dir::hostile_files::{fifo, within};
        let dir = tempfile::tempdir().unwrap();
        let td = TrustDomain::new("example.org").unwrap();
        init(dir.path(), &td, None).unwrap();
        // What `rotate prepare` writes before any file of the new authority.
        RotationState::load(dir.path())
            .unwrap()
            .save(dir.path())
            .unwrap();
        let before: Vec<(std::path::PathBuf, Vec<u8>)> = ["authorities.json", "bundle.pem"]
            .iter()
            .map(|n| (dir.path().join(n), fs::read(dir.path().join(n)).unwrap()))
            .collect();
        let root = dir.path().join("a2-root.pem");
        let garbage = |p: &Path| fs::write(p, "-----BEGIN CERTIFICATE-----\nMII").unwrap();
        let empty_dir = |p: &Path| fs::create_dir(p).unwrap();
        for (what, leave) in [
            ("garbage", &garbage as &dyn Fn(&Path)),
            ("a FIFO", &fifo),
            ("an empty directory", &empty_dir),
        ] {
            leave(&root);
            fs::write(dir.path().join("a2-intermediate.key"), "").unwrap();
            let at = dir.path().to_owned();
            let loaded = within(what, move || {
                Authority::load(&at).map_err(|e| e.to_string())
            })
            .unwrap_or_else(|e| panic!("{what}: {e}"));
            let names: Vec<&str> = loaded
                .authority_anchors
                .iter()
                .map(|(n, _)| n.as_str())
                .collect();
            assert_eq!(names, ["1"], "{what}");
            assert_eq!(loaded.roots.len(), 1, "{what}");

            assert_eq!(crate::rotation::prepare(dir.path(), None).unwrap(), "2");
            let prepared = Authority::load(dir.path()).unwrap();
            assert!(
                prepared.authority_anchors.iter().any(|(n, _)| n == "2"),
                "{what}"
            );
            assert_eq!(prepared.roots.len(), 2, "{what}");
            assert!(prepared.roots.contains(&authority_root(&root).unwrap()));

            // Back to before that prepare.
            for entry in fs::read_dir(dir.path()).unwrap() {
                let entry = entry.unwrap();
                if entry.file_name().to_string_lossy().starts_with("a2-") {
                    fs::remove_file(entry.path()).unwrap();
                }
            }
            for (path, bytes) in &before {
                fs::write(path, bytes).unwrap();
            }
        }
        // A directory with files in it: the CA loads, and prepare leaves it to the operator.
        fs::create_dir(&root).unwrap();
        fs::write(root.join("something"), "x").unwrap();
        Authority::load(dir.path()).unwrap();
        let err = crate::rotation::prepare(dir.path(), None)
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("a2-root.pem") && err.contains("remove it by hand"),
            "{err}"
        );
    }

    /// A FIFO or an endless device in place of a file the CA reads is an error naming the file,
    /// at once: not a load blocked for ever (a FIFO's open waits for a writer) or reading until
    /// memory runs out.
    #[test]
    fn a_fifo_or_a_device_in_place_of_a_ca_file_is_refused_at_once() {
        use crate::ca_dir::hostile_files::{endless, fifo, within};
        let dir = tempfile::tempdir().unwrap();
        let td = TrustDomain::new("example.org").unwrap();
        init(dir.path(), &td, None).unwrap();
        crate::rotation::prepare(dir.path(), None).unwrap();
        crate::revocations::Revocations::update(dir.path(), |list| {
            let id = meshid_identity::SpiffeId::parse("spiffe://example.org/ns/a/sa/b").unwrap();
            list.revoke(
                meshid_identity::revocation::Revoked::Id(id),
                1,
                60,
                String::new(),
            )
        })
        .unwrap();
        Authority::load(dir.path()).unwrap();
        for name in [
            "ca.json",
            "authorities.json",
            "intermediate.pem",
            "intermediate.key",
            "bundle.pem",
            "a2-root.pem",
            "a2-jwt.pub",
            JWT_KEY,
            "revocations.json",
        ] {
            let path = dir.path().join(name);
            let good = fs::read(&path).unwrap();
            for (kind, hostile) in [("fifo", fifo as fn(&Path)), ("/dev/zero", endless)] {
                fs::remove_file(&path).unwrap();
                hostile(&path);
                let at = dir.path().to_owned();
                let err = within(&format!("{name} as {kind}"), move || {
                    Authority::load(&at).map(|_| ()).unwrap_err().to_string()
                });
                assert!(
                    err.contains(name) && err.contains("not a regular file"),
                    "{name} as {kind}: {err}"
                );
                fs::remove_file(&path).unwrap();
                fs::write(&path, &good).unwrap();
            }
        }
        Authority::load(dir.path()).unwrap();
    }

    #[test]
    fn an_init_cut_short_is_named_as_such_and_nothing_is_removed() {
        let dir = tempfile::tempdir().unwrap();
        let td = TrustDomain::new("example.org").unwrap();
        init(dir.path(), &td, None).unwrap();
        // A crash before `init` wrote ca.json, its last file.
        fs::remove_file(dir.path().join("ca.json")).unwrap();
        let before = fs::read_dir(dir.path()).unwrap().count();
        for err in [
            init(dir.path(), &td, None).unwrap_err(),
            read_trust_domain(dir.path()).unwrap_err(),
            Authority::load(dir.path()).unwrap_err(),
        ] {
            assert!(matches!(err, AuthorityError::Incomplete { .. }), "{err}");
            let err = err.to_string();
            assert!(
                err.contains("incomplete CA") && err.contains("remove the directory"),
                "{err}"
            );
        }
        assert_eq!(fs::read_dir(dir.path()).unwrap().count(), before);
        // A CA that was used and lost its ca.json is not one to remove.
        fs::write(dir.path().join(crate::authorities::STATE_FILE), "{}").unwrap();
        assert!(cut_short_init(dir.path()).is_none());
        // An empty or missing directory is no CA at all, and `init` makes one there.
        let empty = tempfile::tempdir().unwrap();
        assert!(cut_short_init(empty.path()).is_none());
        assert!(cut_short_init(&empty.path().join("new")).is_none());
        init(&empty.path().join("new"), &td, None).unwrap();
    }

    /// An imported root that `rotate prepare` has put into bundle.pem before authorities.json
    /// lists its authority (a reload between the two writes, or a prepare cut short) is pinned to
    /// that authority's intermediate all the same, as once it is listed.
    #[test]
    fn an_imported_root_is_pinned_before_its_authority_is_listed() {
        let dir = tempfile::tempdir().unwrap();
        let td = TrustDomain::new("corp.example").unwrap();
        init(dir.path(), &td, None).unwrap();
        // After `init`, no authorities.json: the one authority is implied.
        assert!(!dir.path().join("authorities.json").exists());
        let key = KeyPair::generate().unwrap();
        let cert = ca_params("enterprise root", 2).self_signed(&key).unwrap();
        crate::rotation::prepare(
            dir.path(),
            Some(ImportedRoot {
                cert_pem: cert.pem(),
                key_pem: key.serialize_pem(),
            }),
        )
        .unwrap();
        let listed = Authority::load(dir.path()).unwrap();
        assert_eq!(listed.pinned.len(), 1, "the imported root's intermediate");
        // The half-written step: bundle.pem has the root, authorities.json does not list it.
        // (For a first rotation, a missing authorities.json beside a2- files is refused already.)
        let state = dir.path().join("authorities.json");
        let mut listed_state: serde_json::Value =
            serde_json::from_slice(&fs::read(&state).unwrap()).unwrap();
        listed_state["authorities"]
            .as_array_mut()
            .unwrap()
            .retain(|a| a["prefix"] != "a2-");
        fs::write(&state, listed_state.to_string()).unwrap();
        let half = Authority::load(dir.path()).unwrap();
        assert!(half.roots.iter().any(|r| r.as_ref() == cert.der().as_ref()));
        assert_eq!(half.pinned, listed.pinned);
        // Its root unreadable: bundle.pem holds a root no listed authority has, which may be this
        // one; ignored, it would be trusted unpinned. Refused, naming the file.
        let root = dir.path().join("a2-root.pem");
        let good_root = fs::read(&root).unwrap();
        fs::write(&root, b"not pem").unwrap();
        let refused = Authority::load(dir.path()).unwrap_err().to_string();
        assert!(
            refused.contains("a2-root.pem")
                && refused.contains("imported")
                && refused.contains("rotate prepare"),
            "{refused}"
        );
        // With bundle.pem holding only the listed authorities' roots (a prepare cut short before
        // it wrote the bundle), nothing of it is served: ignored.
        let bundle = dir.path().join("bundle.pem");
        let good_bundle = fs::read(&bundle).unwrap();
        fs::copy(dir.path().join("root.pem"), &bundle).unwrap();
        let ignored = Authority::load(dir.path()).unwrap();
        assert!(ignored.pinned.is_empty() && ignored.roots.len() == 1);
        fs::write(&bundle, good_bundle).unwrap();
        fs::write(&root, good_root).unwrap();
        // The imported authority's intermediate missing: refused, not served unpinned.
        fs::remove_file(dir.path().join("a2-intermediate.pem")).unwrap();
        let refused = Authority::load(dir.path()).unwrap_err().to_string();
        assert!(
            refused.contains("a2-intermediate.pem") && refused.contains("imported"),
            "{refused}"
        );
    }

    #[test]
    fn import_root_and_reject_mismatched_key() {
        let dir = tempfile::tempdir().unwrap();
        let td = TrustDomain::new("corp.example").unwrap();
        let key = KeyPair::generate().unwrap();
        let params = ca_params("enterprise root", 2);
        let cert = params.self_signed(&key).unwrap();
        let other = KeyPair::generate().unwrap();
        let bad = init(
            dir.path(),
            &td,
            Some(ImportedRoot {
                cert_pem: cert.pem(),
                key_pem: other.serialize_pem(),
            }),
        );
        assert!(bad.is_err());
        init(
            dir.path(),
            &td,
            Some(ImportedRoot {
                cert_pem: cert.pem(),
                key_pem: key.serialize_pem(),
            }),
        )
        .unwrap();
        assert!(!dir.path().join("root.key").exists());
        let auth = Authority::load(dir.path()).unwrap();
        assert_eq!(auth.roots[0].as_ref(), cert.der().as_ref());
    }

    #[test]
    fn each_authority_has_a_jwt_key_that_must_match_what_it_publishes() {
        let dir = tempfile::tempdir().unwrap();
        let td = TrustDomain::new("example.org").unwrap();
        init(dir.path(), &td, None).unwrap();
        let mode = fs::metadata(dir.path().join(JWT_KEY))
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o600);
        let auth = Authority::load(dir.path()).unwrap();
        let signer = auth
            .jwt_signer
            .as_ref()
            .expect("the active authority signs");
        assert_eq!(auth.jwt_keys.len(), 1);
        assert_eq!(auth.jwt_keys[0], signer.public());

        // A key that is not the published one is refused at load, not used.
        let pub_pem = fs::read(dir.path().join(JWT_PUB)).unwrap();
        let other = tempfile::tempdir().unwrap();
        write_jwt_key(&AuthorityFiles::plain(other.path())).unwrap();
        fs::copy(other.path().join(JWT_PUB), dir.path().join(JWT_PUB)).unwrap();
        let err = Authority::load(dir.path()).unwrap_err().to_string();
        assert!(err.contains("does not belong"), "{err}");
        // A key with nothing published beside it signs nothing anyone could check.
        fs::remove_file(dir.path().join(JWT_PUB)).unwrap();
        let err = Authority::load(dir.path()).unwrap_err().to_string();
        assert!(err.contains("is missing"), "{err}");
        // An authority from before JWT-SVIDs (neither file) loads and signs no tokens.
        fs::remove_file(dir.path().join(JWT_KEY)).unwrap();
        let auth = Authority::load(dir.path()).unwrap();
        assert!(auth.jwt_signer.is_none() && auth.jwt_keys.is_empty());
        // Garbage where the public key goes is an error naming the file.
        fs::write(dir.path().join(JWT_PUB), b"not pem").unwrap();
        let err = Authority::load(dir.path()).unwrap_err().to_string();
        assert!(err.contains(JWT_PUB), "{err}");
        fs::write(dir.path().join(JWT_PUB), &pub_pem).unwrap();
        fs::remove_file(dir.path().join(JWT_PUB)).unwrap();
    }

    /// Copies the CA directory's files (flat, as a Secret holds them) into a new directory.
    fn copy_dir(from: &Path) -> tempfile::TempDir {
        let to = tempfile::tempdir().unwrap();
        for entry in fs::read_dir(from).unwrap() {
            let entry = entry.unwrap();
            if entry.file_type().unwrap().is_file() {
                fs::copy(entry.path(), to.path().join(entry.file_name())).unwrap();
            }
        }
        to
    }

    #[tokio::test]
    async fn a_directory_older_than_what_the_ca_signs_with_is_refused() {
        use crate::rotation::{activate, prepare, retire};
        let dir = tempfile::tempdir().unwrap();
        let td = TrustDomain::new("example.org").unwrap();
        init(dir.path(), &td, None).unwrap();
        let before_prepare = copy_dir(dir.path());
        prepare(dir.path(), None).unwrap();
        let prepared = copy_dir(dir.path());
        activate(dir.path(), &[], true).await.unwrap();
        retire(dir.path(), &[], true).await.unwrap();
        let now = Authority::load(dir.path()).unwrap();
        assert_eq!(now.name, "2");
        assert_eq!(now.retired, vec!["1".to_owned()]);

        // Case B: a stale copy taken before prepare is a complete CA of its own (a CA may start
        // on it), but a CA that signs with authority 2 does not take it on: it drops 2's root
        // and moves the version back.
        let stale = Authority::load(before_prepare.path()).unwrap();
        let why = now.refuses_successor(&stale).expect("refused");
        assert!(why.contains("moved the bundle version back"), "{why}");
        let mut same_version = Authority::load(before_prepare.path()).unwrap();
        same_version.bundle_version = now.bundle_version;
        let why = now.refuses_successor(&same_version).expect("refused");
        assert!(
            why.contains("no longer holds the root of authority 2"),
            "{why}"
        );
        // Going forward is taken on: the process signing with 1 before the rotation follows
        // prepare, and then (in one go) activate and retire, which retired 1 properly.
        let old = Authority::load(prepared.path()).unwrap();
        let mut first = Authority::load(before_prepare.path()).unwrap();
        assert_eq!(first.refuses_successor(&old), None);
        assert_eq!(old.refuses_successor(&now), None);
        first.bundle_version = 0;
        assert_eq!(first.refuses_successor(&now), None);

        // Case A: authorities.json lost after the rotation: the unprefixed files are the retired
        // authority's, whose root left the bundle. Not "authority 1" again.
        fs::remove_file(dir.path().join(crate::authorities::STATE_FILE)).unwrap();
        let err = Authority::load(dir.path()).unwrap_err().to_string();
        assert!(err.contains("authorities.json: missing"), "{err}");
        assert!(err.contains("a2-"), "{err}");
        // Even without the a2- files, the retired intermediate chains to no root of the bundle.
        for entry in fs::read_dir(dir.path()).unwrap() {
            let entry = entry.unwrap();
            if entry.file_name().to_string_lossy().starts_with("a2-") {
                fs::remove_file(entry.path()).unwrap();
            }
        }
        let err = Authority::load(dir.path()).unwrap_err().to_string();
        assert!(
            err.contains("bundle.pem holds no root it chains to"),
            "{err}"
        );
    }

    #[test]
    fn an_authority_that_cannot_be_written_whole_leaves_no_file_of_it() {
        let dir = tempfile::tempdir().unwrap();
        let td = TrustDomain::new("example.org").unwrap();
        let files = AuthorityFiles {
            dir: dir.path().to_owned(),
            prefix: "a2-".into(),
        };
        // A non-empty directory where the last file goes fails its rename (also for root).
        let blocked = files.path(JWT_PUB);
        fs::create_dir(&blocked).unwrap();
        fs::write(blocked.join("x"), b"x").unwrap();
        assert!(create_authority_files(&files, &td, None).is_err());
        let names: Vec<String> = fs::read_dir(dir.path())
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        assert_eq!(names, vec!["a2-jwt.pub".to_owned()]);
        fs::remove_dir_all(&blocked).unwrap();
        create_authority_files(&files, &td, None).unwrap();
        for name in [
            "root.pem",
            "root.key",
            "intermediate.pem",
            "intermediate.key",
            JWT_KEY,
            JWT_PUB,
        ] {
            assert!(files.path(name).is_file(), "{name}");
        }
    }

    #[test]
    fn load_rejects_a_swapped_key() {
        let dir = tempfile::tempdir().unwrap();
        let td = TrustDomain::new("example.org").unwrap();
        init(dir.path(), &td, None).unwrap();
        let key_path = dir.path().join("intermediate.key");
        fs::remove_file(&key_path).unwrap();
        fs::write(&key_path, KeyPair::generate().unwrap().serialize_pem()).unwrap();
        let err = Authority::load(dir.path()).unwrap_err().to_string();
        assert!(err.contains("does not belong"), "{err}");
    }
}
