//! Content identity of a model: a streaming SHA-256 over its files in sorted
//! order, cached by (path, size, mtime) under the agent's state folder so that
//! read-only model folders work and unchanged models are hashed once.

use super::error::{Result, StoreError};
use sha2::{Digest, Sha256};
use std::io::Read;
use std::path::{Path, PathBuf};
use std::time::UNIX_EPOCH;

/// Files whose bytes make up a model, sorted by relative path so that directory
/// listing order never changes the hash.
pub fn content_files(path: &Path) -> Result<Vec<PathBuf>> {
    let meta = std::fs::metadata(path).map_err(StoreError::io(path))?;
    if !meta.is_dir() {
        super::file::check_regular(path, meta.file_type())?;
        return Ok(vec![path.to_path_buf()]);
    }
    let mut out = Vec::new();
    let mut stack = vec![path.to_path_buf()];
    while let Some(dir) = stack.pop() {
        for entry in std::fs::read_dir(&dir).map_err(StoreError::io(&dir))? {
            let entry = entry.map_err(StoreError::io(&dir))?;
            let p = entry.path();
            if entry.file_name().to_string_lossy().starts_with('.') {
                continue;
            }
            let ft = entry.file_type().map_err(StoreError::io(&p))?;
            if ft.is_dir() {
                stack.push(p);
            } else if ft.is_file() {
                out.push(p);
            }
        }
    }
    out.sort();
    Ok(out)
}

/// A cache key that changes whenever any file's size or mtime changes.
fn fingerprint(files: &[PathBuf], root: &Path) -> Result<String> {
    let mut h = Sha256::new();
    h.update(root.to_string_lossy().as_bytes());
    for f in files {
        let m = std::fs::metadata(f).map_err(StoreError::io(f))?;
        let mtime = m
            .modified()
            .ok()
            .and_then(|t| t.duration_since(UNIX_EPOCH).ok())
            .map_or(0, |d| d.as_nanos());
        h.update(f.to_string_lossy().as_bytes());
        h.update(m.len().to_le_bytes());
        h.update(mtime.to_le_bytes());
    }
    Ok(hex(&h.finalize()))
}

pub(crate) fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// SHA-256 of a model's content. For a folder, the hash of each file's relative
/// path and bytes in sorted order; for a file, the plain SHA-256 of its bytes
/// (what `sha256sum` prints, so users can pin `model.sha256` with it).
pub fn sha256(path: &Path, state_dir: Option<&Path>) -> Result<String> {
    let files = content_files(path)?;
    let cache = match state_dir {
        Some(dir) => Some(dir.join("hashes").join(fingerprint(&files, path)?)),
        None => None,
    };
    if let Some(c) = &cache {
        if let Ok(v) = std::fs::read_to_string(c) {
            if v.len() == 64 {
                return Ok(v);
            }
        }
    }
    let is_dir = path.is_dir();
    let mut outer = Sha256::new();
    let mut buf = vec![0u8; 1 << 20];
    for f in &files {
        let mut h = Sha256::new();
        let mut file = super::file::open_regular(f)?;
        loop {
            let n = file.read(&mut buf).map_err(StoreError::io(f))?;
            if n == 0 {
                break;
            }
            h.update(&buf[..n]);
        }
        if !is_dir {
            outer = h;
            break;
        }
        let rel = f.strip_prefix(path).unwrap_or(f);
        outer.update(rel.to_string_lossy().as_bytes());
        outer.update([0]);
        outer.update(h.finalize());
    }
    let digest = hex(&outer.finalize());
    if let Some(c) = &cache {
        // A cache that cannot be written only costs a re-hash next time.
        if let Some(parent) = c.parent() {
            let _ = std::fs::create_dir_all(parent);
        }
        let _ = std::fs::write(c, &digest);
    }
    Ok(digest)
}
