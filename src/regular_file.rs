//! Reading the operator's small text files (the pricing and budgets files)
//! so that no path can hang or exhaust the exporter: only regular files
//! (a symlink to one is fine: Kubernetes mounts ConfigMaps that way), opened
//! without ever blocking, and read up to a bound.
//!
//! A FIFO named by mistake would otherwise block the open until some writer
//! came along (at start, and in every reload after it), and `/dev/zero`
//! would be read until memory ran out.

use std::fs::{FileType, OpenOptions};
use std::io::{self, Read};
use std::os::unix::fs::{FileTypeExt, OpenOptionsExt};
use std::path::Path;

/// The most bytes such a file may hold: 4 MiB. That is far above any real
/// price table, and room for the largest budgets file accepted (10,000
/// entries, even with channel names of the longest kind and comments),
/// while a wrong path costs at most this much memory.
pub(crate) const MAX_BYTES: u64 = 4 * 1024 * 1024;

/// Reads a regular file of at most [`MAX_BYTES`] as UTF-8 text. Anything
/// else is an `io::Error` whose message says what was found.
pub(crate) fn read_to_string(path: &Path) -> io::Result<String> {
    read_bounded(path, MAX_BYTES)
}

/// Reads a regular file of at most [`MAX_BYTES`] as bytes (certificates and
/// keys), refusing anything else as [`read_to_string`] does.
pub(crate) fn read(path: &Path) -> io::Result<Vec<u8>> {
    read_bytes(path, MAX_BYTES)
}

/// [`read_to_string`] with the bound as an argument, for the tests.
fn read_bounded(path: &Path, max: u64) -> io::Result<String> {
    let bytes = read_bytes(path, max)?;
    String::from_utf8(bytes).map_err(|e| io::Error::new(io::ErrorKind::InvalidData, format!("not UTF-8 text: {e}")))
}

/// [`read`] with the bound as an argument.
fn read_bytes(path: &Path, max: u64) -> io::Result<Vec<u8>> {
    // O_NONBLOCK: opening a FIFO for reading would otherwise wait for a
    // writer, forever. It changes nothing for a regular file.
    let file = OpenOptions::new().read(true).custom_flags(libc::O_NONBLOCK).open(path)?;
    // The type of what was opened (fstat), not of what the path named a
    // moment earlier, so nothing swapped in between can slip through.
    let kind = file.metadata()?.file_type();
    if !kind.is_file() {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            format!("not a regular file but {}; give a regular file (a symlink to one is fine)", describe(kind)),
        ));
    }
    let mut bytes = Vec::new();
    // One byte more than allowed tells a file of exactly the limit from a
    // larger one, without reading the rest of a huge one.
    file.take(max.saturating_add(1)).read_to_end(&mut bytes)?;
    if bytes.len() as u64 > max {
        return Err(io::Error::new(
            io::ErrorKind::InvalidData,
            format!("larger than {max} bytes ({} MiB), the most this file may hold", max / (1024 * 1024)),
        ));
    }
    Ok(bytes)
}

/// What a file that is not regular is, for the message.
fn describe(kind: FileType) -> &'static str {
    if kind.is_fifo() {
        "a FIFO (named pipe)"
    } else if kind.is_char_device() {
        "a character device"
    } else if kind.is_block_device() {
        "a block device"
    } else if kind.is_dir() {
        "a directory"
    } else if kind.is_socket() {
        "a socket"
    } else {
        "a special file"
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn regular_files_within_the_bound_are_read_and_others_refused() {
        let tmp = tempfile::tempdir().unwrap();
        let file = tmp.path().join("f.toml");
        std::fs::write(&file, "x = 1\n").unwrap();
        assert_eq!(read_to_string(&file).unwrap(), "x = 1\n");
        let link = tmp.path().join("link.toml");
        std::os::unix::fs::symlink(&file, &link).unwrap();
        assert_eq!(read_to_string(&link).unwrap(), "x = 1\n", "a symlink to a regular file is fine");

        std::fs::write(&file, "0123456789").unwrap();
        assert_eq!(read_bounded(&file, 10).unwrap(), "0123456789", "exactly the bound");
        let e = read_bounded(&file, 9).unwrap_err().to_string();
        assert!(e.contains("larger than 9 bytes"), "{e}");

        let refused = |p: &Path| read_to_string(p).unwrap_err().to_string();
        assert!(refused(tmp.path()).contains("not a regular file but a directory"));
        assert!(refused(Path::new("/dev/zero")).contains("not a regular file but a character device"));
        let fifo = tmp.path().join("fifo");
        let c = std::ffi::CString::new(fifo.to_str().unwrap()).unwrap();
        // SAFETY: mkfifo only reads the NUL-terminated path.
        assert_eq!(unsafe { libc::mkfifo(c.as_ptr(), 0o600) }, 0);
        assert!(refused(&fifo).contains("not a regular file but a FIFO"), "and the open did not block");
        std::fs::write(&file, [0xff, 0xfe]).unwrap();
        assert!(refused(&file).contains("not UTF-8"));
    }
}
