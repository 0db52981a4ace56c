//! Reading several files of one Kubernetes volume as one version of it.
//!
//! The kubelet keeps a Secret, ConfigMap or projected volume's files in a timestamped directory,
//! links each name to `..data/<name>`, and updates the volume by swapping the `..data` symlink to a
//! new directory. Reading `tls.crt` and then `tls.key` through their links can straddle a swap and
//! give a certificate of one version with the key of the next. [`one_version`] resolves each
//! directory's `..data` once, so files read through its answer all come from one version (or fail,
//! if the kubelet removed that version's directory in between: a reader then tries again).

use std::path::{Path, PathBuf};

/// `paths`, with every file the kubelet linked as `<dir>/<name> -> ..data/<name>` replaced by the
/// same file inside the directory `<dir>/..data` points to now (resolved once per directory).
/// Any other path is returned as it is.
pub fn one_version(paths: &[&Path]) -> Vec<PathBuf> {
    let mut resolved: Vec<(PathBuf, Option<PathBuf>)> = Vec::new();
    paths
        .iter()
        .map(|path| in_version(path, &mut resolved).unwrap_or_else(|| path.to_path_buf()))
        .collect()
}

/// Reads `paths` as [`one_version`] resolves them, each one a regular file of at most `max` bytes
/// ([`crate::file::read_regular`]: a FIFO, a device or a file that never ends is refused, never
/// waited on or read whole), to its bytes or the reason it could not be read (naming the path as
/// given, and the file inside the volume's version when that is another path).
pub fn read_one_version(paths: &[&Path], max: u64) -> Vec<Result<Vec<u8>, String>> {
    one_version(paths)
        .iter()
        .zip(paths)
        .map(|(file, given)| {
            crate::file::read_regular(file, max).map_err(|e| {
                // `e` names `file`.
                if file == given {
                    e.to_string()
                } else {
                    format!("{}: {e}", given.display())
                }
            })
        })
        .collect()
}

fn in_version(path: &Path, resolved: &mut Vec<(PathBuf, Option<PathBuf>)>) -> Option<PathBuf> {
    let name = path.file_name()?;
    let dir = path.parent()?;
    if std::fs::read_link(path).ok()? != Path::new("..data").join(name) {
        return None;
    }
    let version = match resolved.iter().find(|(d, _)| d == dir) {
        Some((_, version)) => version.clone(),
        None => {
            let version = std::fs::canonicalize(dir.join("..data"))
                .ok()
                .filter(|v| v.is_dir());
            resolved.push((dir.to_path_buf(), version.clone()));
            version
        }
    };
    Some(version?.join(name))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::fs;
    use std::os::unix::fs::symlink;

    /// A volume laid out as the kubelet does, at version `v` of `tls.crt` and `tls.key`.
    fn publish(dir: &Path, v: &str) {
        let version = dir.join(format!("..2026_12_06_10_00_00.{v}"));
        fs::create_dir(&version).unwrap();
        fs::write(version.join("tls.crt"), format!("cert {v}")).unwrap();
        fs::write(version.join("tls.key"), format!("key {v}")).unwrap();
        let tmp = dir.join("..data_tmp");
        symlink(version.file_name().unwrap(), &tmp).unwrap();
        fs::rename(&tmp, dir.join("..data")).unwrap();
        for name in ["tls.crt", "tls.key"] {
            let _ = symlink(Path::new("..data").join(name), dir.join(name));
        }
    }

    #[test]
    fn files_resolved_together_stay_in_their_version_across_a_swap() {
        let dir = tempfile::tempdir().unwrap();
        publish(dir.path(), "1");
        let cert = dir.path().join("tls.crt");
        let key = dir.path().join("tls.key");
        let resolved = one_version(&[&cert, &key]);
        publish(dir.path(), "2");
        let read = |p: &PathBuf| fs::read_to_string(p).unwrap();
        assert_eq!(
            (read(&resolved[0]), read(&resolved[1])),
            ("cert 1".to_owned(), "key 1".to_owned())
        );
        let now = read_one_version(&[&cert, &key], 64);
        assert_eq!(now[0].as_deref(), Ok(&b"cert 2"[..]));
        assert_eq!(now[1].as_deref(), Ok(&b"key 2"[..]));
    }

    #[test]
    fn other_files_are_read_where_they_are() {
        let dir = tempfile::tempdir().unwrap();
        let plain = dir.path().join("plain.pem");
        fs::write(&plain, "plain").unwrap();
        let elsewhere = dir.path().join("elsewhere.pem");
        symlink(&plain, &elsewhere).unwrap();
        let missing = dir.path().join("missing.pem");
        assert_eq!(
            one_version(&[&plain, &elsewhere, &missing]),
            vec![plain.clone(), elsewhere.clone(), missing.clone()]
        );
        let read = read_one_version(&[&missing], 64);
        assert!(
            read[0].as_ref().unwrap_err().contains("missing.pem"),
            "{read:?}"
        );
    }

    #[test]
    fn files_that_are_not_regular_or_too_large_are_refused_by_name() {
        let dir = tempfile::tempdir().unwrap();
        publish(dir.path(), "1");
        let key = dir.path().join("tls.key");
        let zero = dir.path().join("zero.pem");
        symlink("/dev/zero", &zero).unwrap();
        let fifo = dir.path().join("fifo.pem");
        rustix::fs::mkfifoat(
            rustix::fs::CWD,
            &fifo,
            rustix::fs::Mode::from_raw_mode(0o600),
        )
        .unwrap();
        // A blocking read would wait for a writer on the FIFO, and never end on /dev/zero.
        let read = read_one_version(&[&key, &zero, &fifo], 64);
        assert_eq!(read[0].as_deref(), Ok(&b"key 1"[..]));
        for (result, name) in read[1..].iter().zip(["zero.pem", "fifo.pem"]) {
            let error = result.as_ref().unwrap_err();
            assert!(error.contains(name), "{error}");
            assert!(error.contains("not a regular file"), "{error}");
        }
        // Read through `..data`: named as given, and as the file of the version read.
        let read = read_one_version(&[&key], 4);
        let error = read[0].as_ref().unwrap_err();
        assert!(
            error.starts_with(&format!("{}: ", key.display()))
                && error.contains("..2026_12_06_10_00_00.1/tls.key"),
            "{error}"
        );
        assert!(error.contains("larger than 4 bytes"), "{error}");
    }
}
