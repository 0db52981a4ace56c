//! Reading a file that is input: a regular file, read to a bound.
//!
//! `std::fs::read` on a path an operator or a volume controls can block forever (a FIFO's `open`
//! waits for a writer; a read of one waits for data) or exhaust memory (`/dev/zero`, a file that
//! grows as it is read). [`read_regular`] opens without blocking, checks the opened file (no race
//! with a swap between a `stat` and the `open`), and reads at most one byte past its bound.

use std::io::{self, Read};
use std::os::unix::fs::OpenOptionsExt;
use std::path::Path;

/// `path`'s bytes, if it is a regular file (a symlink to one counts) of at most `max` bytes;
/// otherwise an error naming the path and why.
pub fn read_regular(path: &Path, max: u64) -> io::Result<Vec<u8>> {
    let named = |kind: io::ErrorKind, why: String| {
        io::Error::new(kind, format!("{}: {why}", path.display()))
    };
    let file = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(rustix::fs::OFlags::NONBLOCK.bits() as i32)
        .open(path)
        .map_err(|e| named(e.kind(), e.to_string()))?;
    let meta = file
        .metadata()
        .map_err(|e| named(e.kind(), e.to_string()))?;
    if !meta.is_file() {
        return Err(named(
            io::ErrorKind::InvalidInput,
            "not a regular file".to_owned(),
        ));
    }
    let too_large = || {
        named(
            io::ErrorKind::InvalidData,
            format!("larger than {max} bytes"),
        )
    };
    if meta.len() > max {
        return Err(too_large());
    }
    let mut bytes = Vec::with_capacity(usize::try_from(meta.len()).unwrap_or(0));
    file.take(max.saturating_add(1))
        .read_to_end(&mut bytes)
        .map_err(|e| named(e.kind(), e.to_string()))?;
    if bytes.len() as u64 > max {
        return Err(too_large());
    }
    Ok(bytes)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_regular_file_within_its_bound_is_read_whole() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("tls.crt");
        std::fs::write(&path, b"0123456789").unwrap();
        assert_eq!(read_regular(&path, 10).unwrap(), b"0123456789");
        let link = dir.path().join("link");
        std::os::unix::fs::symlink(&path, &link).unwrap();
        assert_eq!(read_regular(&link, 10).unwrap(), b"0123456789");
    }

    #[test]
    fn a_file_over_its_bound_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("tls.crt");
        std::fs::write(&path, b"0123456789").unwrap();
        let err = read_regular(&path, 9).unwrap_err();
        assert!(err.to_string().contains("larger than 9 bytes"), "{err}");
        assert!(err.to_string().contains("tls.crt"), "{err}");
    }

    #[test]
    fn a_device_that_never_ends_is_refused_unread() {
        let err = read_regular(Path::new("/dev/zero"), 1 << 20).unwrap_err();
        assert!(err.to_string().contains("not a regular file"), "{err}");
    }

    #[test]
    fn a_fifo_without_a_writer_is_refused_at_once() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("tls.key");
        rustix::fs::mkfifoat(
            rustix::fs::CWD,
            &path,
            rustix::fs::Mode::from_raw_mode(0o600),
        )
        .unwrap();
        // A blocking open would wait here for a writer, for ever.
        let err = read_regular(&path, 1 << 20).unwrap_err();
        assert!(err.to_string().contains("not a regular file"), "{err}");
    }

    #[test]
    fn a_directory_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let err = read_regular(dir.path(), 1 << 20).unwrap_err();
        assert!(err.to_string().contains("not a regular file"), "{err}");
    }
}
