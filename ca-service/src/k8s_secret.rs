//! The CA directory as one Kubernetes Secret, for the Helm chart (`meshid-ca secret`): the files
//! a CA serves from, base64 in `data` ([`shipped`]: by name, never a root key, which stays
//! offline). Any other file is left out and named on stderr; one that holds a private key stops
//! the command (an enterprise root's key kept beside the CA files must not reach the cluster). Printed as YAML for `kubectl apply --server-side -f -`, so the
//! same command creates the Secret and updates it after every rotation step (a client-side apply
//! copies it into an annotation that fails past 256 KiB: [`size_warning`]); kubelet then swaps the files in
//! every CA replica at once, and each replica reads the new version whole.

use std::fmt::Write as _;
use std::path::Path;

use base64::Engine;

/// The largest Secret the API server stores (1 MiB of data).
const MAX_SECRET_BYTES: usize = 1024 * 1024;

/// Why a directory cannot become a Secret.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum SecretError {
    #[error("{path}: {source}")]
    Io {
        path: std::path::PathBuf,
        source: std::io::Error,
    },
    #[error("{0:?} is not a valid Kubernetes name (lowercase letters, digits and '-', at most 63)")]
    BadName(String),
    #[error("{0}: holds no CA (no ca.json)")]
    NoCa(std::path::PathBuf),
    #[error("the CA's files add up to {0} bytes, more than a Secret holds (1 MiB)")]
    TooLarge(usize),
    #[error(
        "{0}: holds a private key but is none of the CA's files: move it out of the CA directory \
         (a root key stays offline) and run this again"
    )]
    StrayKey(std::path::PathBuf),
}

/// Past this much data (base64, as the manifest carries it), `meshid-ca secret` warns: a
/// client-side `kubectl apply` copies the whole object into its `last-applied-configuration`
/// annotation, and the API server refuses annotations past 262,144 bytes in all.
pub const CLIENT_SIDE_APPLY_WARN_BYTES: usize = 190 * 1024;

/// What to say on stderr about a Secret whose data takes `data_bytes` (base64), if anything.
pub fn size_warning(data_bytes: usize) -> Option<String> {
    (data_bytes > CLIENT_SIDE_APPLY_WARN_BYTES).then(|| {
        format!(
            "warning: the Secret's data is {} KiB: a client-side `kubectl apply` fails past 256 KiB \
             (it copies the Secret into its last-applied-configuration annotation); apply it with \
             `kubectl apply --server-side -f -` (or `kubectl replace -f -`)",
            data_bytes / 1024
        )
    })
}

/// The Secret manifest and the size of its data.
#[derive(Debug)]
pub struct Manifest {
    pub yaml: String,
    /// The data's bytes as the manifest carries them (base64).
    pub data_bytes: usize,
    /// The regular files of the directory left out (none of the CA's; a root key), by name; dot
    /// files (the lock, temporary files) are not named.
    pub left_out: Vec<String>,
}

fn dns_label(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 63
        && s.bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
        && !s.starts_with('-')
        && !s.ends_with('-')
}

/// The directory's own files, once each.
const DIRECTORY_FILES: [&str; 5] = [
    "ca.json",
    "authorities.json",
    "bundle.pem",
    "revocations.json",
    "admin-token",
];
/// An authority's files, without a prefix (the first authority) or with `a<n>-`. Its root key
/// (`root.key`) is not one: it stays offline.
const AUTHORITY_FILES: [&str; 6] = [
    "root.pem",
    "root.imported",
    "intermediate.pem",
    "intermediate.key",
    "jwt.key",
    "jwt.pub",
];

/// Whether a file of the CA directory goes into the Secret: one a CA reads, by name. Anything
/// else (a root key, what an interrupted `init` or `rotate prepare` left, an operator's own file)
/// stays out.
fn shipped(name: &str) -> bool {
    if DIRECTORY_FILES.contains(&name) {
        return true;
    }
    let per_authority = match name.strip_prefix('a').and_then(|r| r.split_once('-')) {
        Some((n, rest)) if !n.is_empty() && n.bytes().all(|b| b.is_ascii_digit()) => rest,
        _ => name,
    };
    AUTHORITY_FILES.contains(&per_authority)
}

/// Whether `bytes` hold a private key in PEM.
fn holds_private_key(bytes: &[u8]) -> bool {
    bytes.windows(11).any(|w| w == b"PRIVATE KEY")
}

/// The Secret manifest (YAML) holding `dir`.
pub fn manifest(dir: &Path, name: &str, namespace: &str) -> Result<String, SecretError> {
    render(dir, name, namespace).map(|m| m.yaml)
}

/// The Secret manifest holding `dir`, with the size of its data.
pub fn render(dir: &Path, name: &str, namespace: &str) -> Result<Manifest, SecretError> {
    for n in [name, namespace] {
        if !dns_label(n) {
            return Err(SecretError::BadName(n.to_owned()));
        }
    }
    if !dir.join("ca.json").is_file() {
        return Err(SecretError::NoCa(dir.to_owned()));
    }
    let io = |path: &Path| {
        let path = path.to_owned();
        move |source| SecretError::Io { path, source }
    };
    let mut files = Vec::new();
    let mut left_out = Vec::new();
    for entry in std::fs::read_dir(dir).map_err(io(dir))? {
        let entry = entry.map_err(io(dir))?;
        let file_name = entry.file_name().to_string_lossy().into_owned();
        let is_file = entry.file_type().map_err(io(&entry.path()))?.is_file();
        // Dot files: the directory's lock, temporary files of a write under way.
        if !is_file || file_name.starts_with('.') {
            continue;
        }
        if shipped(&file_name) {
            let bytes = std::fs::read(entry.path()).map_err(io(&entry.path()))?;
            files.push((file_name, bytes));
            continue;
        }
        // A root key by its own name, or what `init` and `prepare` leave while they write one,
        // is expected here; any other key is not.
        let root_key = file_name == "root.key"
            || file_name.starts_with("root.key.")
            || (file_name.starts_with('a') && file_name.contains("-root.key"));
        if !root_key {
            let bytes = std::fs::read(entry.path()).map_err(io(&entry.path()))?;
            if holds_private_key(&bytes) {
                return Err(SecretError::StrayKey(entry.path()));
            }
        }
        left_out.push(file_name);
    }
    files.sort();
    left_out.sort();
    let total: usize = files.iter().map(|(_, b)| b.len()).sum();
    if total > MAX_SECRET_BYTES {
        return Err(SecretError::TooLarge(total));
    }
    let mut out = format!(
        "# The meshid CA directory {} (root keys left out), for the chart's ca.existingSecret.\n\
         apiVersion: v1\nkind: Secret\nmetadata:\n  name: {name}\n  namespace: {namespace}\n  \
         labels:\n    app.kubernetes.io/part-of: meshid\ntype: Opaque\ndata:\n",
        dir.display()
    );
    let mut data_bytes = 0;
    for (file, bytes) in files {
        let encoded = base64::engine::general_purpose::STANDARD.encode(bytes);
        data_bytes += file.len() + encoded.len();
        let _ = writeln!(out, "  {file}: {encoded}");
    }
    Ok(Manifest {
        yaml: out,
        data_bytes,
        left_out,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use meshid_identity::TrustDomain;

    #[test]
    fn a_secret_past_190_kib_of_data_is_warned_about() {
        assert_eq!(size_warning(0), None);
        assert_eq!(size_warning(CLIENT_SIDE_APPLY_WARN_BYTES), None);
        let warning = size_warning(CLIENT_SIDE_APPLY_WARN_BYTES + 1).unwrap();
        assert!(warning.contains("--server-side"), "{warning}");
        // A CA directory with a long revocation list gets there.
        let dir = tempfile::tempdir().unwrap();
        crate::authority::init(dir.path(), &TrustDomain::new("td").unwrap(), None).unwrap();
        let small = render(dir.path(), "meshid-ca", "meshid").unwrap();
        assert!(
            size_warning(small.data_bytes).is_none(),
            "{}",
            small.data_bytes
        );
        let mut revoked = crate::revocations::Revocations::default();
        for i in 0..1_300 {
            revoked
                .revoke(
                    meshid_identity::revocation::Revoked::Id(
                        meshid_identity::SpiffeId::parse(&format!(
                            "spiffe://td/ns/batch/sa/worker-{i}"
                        ))
                        .unwrap(),
                    ),
                    1_700_000_000,
                    86_400,
                    "bulk revocation after incident 42".into(),
                )
                .unwrap();
        }
        revoked.save(dir.path()).unwrap();
        let large = render(dir.path(), "meshid-ca", "meshid").unwrap();
        assert!(
            large.data_bytes > CLIENT_SIDE_APPLY_WARN_BYTES,
            "{}",
            large.data_bytes
        );
        assert!(size_warning(large.data_bytes).is_some());
        assert!(large.yaml.len() > large.data_bytes);
    }

    #[test]
    fn every_file_but_the_root_keys() {
        let dir = tempfile::tempdir().unwrap();
        crate::authority::init(dir.path(), &TrustDomain::new("td").unwrap(), None).unwrap();
        crate::rotation::prepare(dir.path(), None).unwrap();
        let mut revoked = crate::revocations::Revocations::default();
        revoked
            .revoke(
                meshid_identity::revocation::Revoked::Serial("1".into()),
                0,
                60,
                String::new(),
            )
            .unwrap();
        revoked.save(dir.path()).unwrap();
        std::fs::write(dir.path().join(".bundle.pem.tmp"), "x").unwrap();
        // What an interrupted prepare may leave: never a root key in the cluster.
        std::fs::write(dir.path().join("a3-root.key.new"), "x").unwrap();
        std::fs::write(dir.path().join("root.key.new"), "x").unwrap();
        // An operator's own file, left out and named.
        std::fs::write(dir.path().join("notes.txt"), "rotated on monday").unwrap();
        std::fs::write(dir.path().join("a2x-jwt.key"), "x").unwrap();
        let rendered = render(dir.path(), "meshid-ca", "meshid").unwrap();
        assert_eq!(
            rendered.left_out,
            [
                "a2-root.key",
                "a2x-jwt.key",
                "a3-root.key.new",
                "notes.txt",
                "root.key",
                "root.key.new"
            ]
        );
        let yaml = manifest(dir.path(), "meshid-ca", "meshid").unwrap();
        let keys: Vec<&str> = yaml
            .lines()
            .skip_while(|l| *l != "data:")
            .skip(1)
            .filter_map(|l| l.trim().split_once(':').map(|(k, _)| k))
            .collect();
        assert_eq!(
            keys,
            [
                "a2-intermediate.key",
                "a2-intermediate.pem",
                "a2-jwt.key",
                "a2-jwt.pub",
                "a2-root.pem",
                // The rotation report's bearer token: every CA replica needs it.
                "admin-token",
                "authorities.json",
                "bundle.pem",
                "ca.json",
                "intermediate.key",
                "intermediate.pem",
                "jwt.key",
                "jwt.pub",
                "revocations.json",
                "root.pem",
            ]
        );
        assert!(
            yaml.contains("  name: meshid-ca\n  namespace: meshid\n"),
            "{yaml}"
        );
        for bad in ["Meshid", "-x", "a_b", ""] {
            assert!(matches!(
                manifest(dir.path(), bad, "meshid"),
                Err(SecretError::BadName(_))
            ));
        }
        let empty = tempfile::tempdir().unwrap();
        assert!(matches!(
            manifest(empty.path(), "meshid-ca", "meshid"),
            Err(SecretError::NoCa(_))
        ));
        // A private key the CA does not read (an enterprise root's, kept for `--root-key`; a
        // backup) stops the command: it would reach every CA pod and etcd.
        for stray in ["enterprise-root.key", "old-root.pem.bak", "backup.key"] {
            let path = dir.path().join(stray);
            std::fs::write(&path, "-----BEGIN EC PRIVATE KEY-----\nAAAA\n").unwrap();
            let err = manifest(dir.path(), "meshid-ca", "meshid").unwrap_err();
            assert!(
                matches!(&err, SecretError::StrayKey(p) if *p == path),
                "{err}"
            );
            std::fs::remove_file(&path).unwrap();
        }
    }
}
