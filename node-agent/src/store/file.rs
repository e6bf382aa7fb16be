//! Opening model files without trusting what sits at their path.
//!
//! A FIFO, socket or device named like a model would block `open` or `read`
//! forever (`/dev/zero` never ends), hanging whatever thread touched it. Files
//! are opened without blocking and checked on the open descriptor, so nothing
//! can be swapped in between the check and the read; only regular files are
//! read.

use super::error::{Result, StoreError};
use std::fs::{File, FileType};
use std::io::Read;
use std::os::unix::fs::{FileTypeExt, OpenOptionsExt};
use std::path::Path;

/// What a non-regular file is, for messages.
fn kind(t: FileType) -> &'static str {
    if t.is_dir() {
        "folder"
    } else if t.is_fifo() {
        "FIFO"
    } else if t.is_socket() {
        "socket"
    } else if t.is_char_device() || t.is_block_device() {
        "device"
    } else {
        "special file"
    }
}

/// Refuses what is not a regular file, naming what it is.
pub fn check_regular(path: &Path, t: FileType) -> Result<()> {
    if t.is_file() {
        Ok(())
    } else {
        Err(StoreError::NotRegular {
            path: path.to_path_buf(),
            kind: kind(t),
        })
    }
}

/// Opens `path` for reading if it is a regular file. `O_NONBLOCK` keeps a
/// FIFO's `open` from waiting for a writer; on regular files it changes nothing.
pub fn open_regular(path: &Path) -> Result<File> {
    let file = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NONBLOCK | libc::O_NOCTTY)
        .open(path)
        .map_err(StoreError::io(path))?;
    let meta = file.metadata().map_err(StoreError::io(path))?;
    check_regular(path, meta.file_type())?;
    Ok(file)
}

/// The text of a regular file.
pub fn read_to_string(path: &Path) -> Result<String> {
    let mut text = String::new();
    open_regular(path)?
        .read_to_string(&mut text)
        .map_err(StoreError::io(path))?;
    Ok(text)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fifos_and_devices_are_refused_without_blocking() {
        let dir = tempfile::tempdir().unwrap();
        let fifo = dir.path().join("pipe.safetensors");
        let c = std::ffi::CString::new(fifo.to_str().unwrap()).unwrap();
        // SAFETY: a valid NUL-terminated path.
        assert_eq!(unsafe { libc::mkfifo(c.as_ptr(), 0o600) }, 0);
        let e = open_regular(&fifo).unwrap_err().to_string();
        assert!(e.contains("not a regular file (a FIFO)"), "{e}");
        let e = read_to_string(Path::new("/dev/zero"))
            .unwrap_err()
            .to_string();
        assert!(e.contains("(a device)"), "{e}");
        let e = open_regular(dir.path()).unwrap_err().to_string();
        assert!(e.contains("(a folder)"), "{e}");
        let file = dir.path().join("ok.json");
        std::fs::write(&file, "{}").unwrap();
        assert_eq!(read_to_string(&file).unwrap(), "{}");
    }
}
