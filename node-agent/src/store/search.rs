//! Finding models under a root folder, without the traps of the search this
//! project grew from (it descended into model folders and followed symlinks out
//! of the root):
//! a folder with a marker file is one model and is not searched further;
//! weight files elsewhere are models; hidden entries are skipped; symlinks are
//! followed only while they stay inside the root, and never in a cycle;
//! unreadable entries are reported and skipped. A model is only listed when
//! everything in it is a regular file or folder that resolves inside the root:
//! a FIFO or device would hang whatever reads it, and a link out of the root
//! would serve (or copy) files the models folder does not hold.

use super::probe::MODEL_FOLDER_MARKERS;
use super::WEIGHT_SUFFIXES;
use std::collections::HashSet;
use std::path::{Path, PathBuf};

/// What a search found.
#[derive(Debug, Default)]
pub struct SearchResult {
    /// Model files and folders, sorted.
    pub models: Vec<PathBuf>,
    /// Entries that could not be read, with why.
    pub skipped: Vec<(PathBuf, String)>,
    /// Directory entries looked at.
    pub items_scanned: u64,
}

/// Most entries looked at inside one model folder (a diffusers pipeline has tens).
const MAX_MODEL_ENTRIES: usize = 10_000;

/// Why a model folder cannot be served: an entry in it (at any depth) that
/// resolves outside `root`, or that is neither a regular file nor a folder.
fn unsafe_entry(folder: &Path, root: &Path) -> Option<String> {
    let mut stack = vec![folder.to_path_buf()];
    let mut seen = HashSet::new();
    let mut count = 0;
    while let Some(dir) = stack.pop() {
        let Ok(entries) = std::fs::read_dir(&dir) else {
            return Some(format!("{} cannot be read", dir.display()));
        };
        for entry in entries.flatten() {
            count += 1;
            if count > MAX_MODEL_ENTRIES {
                return Some(format!("holds more than {MAX_MODEL_ENTRIES} entries"));
            }
            let path = entry.path();
            let rel = path
                .strip_prefix(folder)
                .unwrap_or(&path)
                .display()
                .to_string();
            let Ok(real) = path.canonicalize() else {
                return Some(format!("{rel} is a broken link"));
            };
            if !real.starts_with(root) {
                return Some(format!("{rel} links outside the model root"));
            }
            match std::fs::metadata(&real) {
                Ok(m) if m.is_dir() => {
                    if seen.insert(real) {
                        stack.push(path);
                    }
                }
                Ok(m) if m.is_file() => {}
                _ => {
                    return Some(format!(
                        "{rel} is not a regular file (a FIFO, socket or device)"
                    ))
                }
            }
        }
    }
    None
}

/// Whether `dir` is `<name>.config/` beside a checkpoint `<name>.<weights suffix>`.
fn is_config_of_checkpoint(dir: &Path) -> bool {
    dir.extension().is_some_and(|e| e == "config")
        && WEIGHT_SUFFIXES
            .iter()
            .any(|s| super::config_beside(&dir.with_extension(s)).is_some())
}

/// Walks `root` (which is never itself a model) and returns every model in it.
pub fn find_models(root: &Path) -> SearchResult {
    let mut result = SearchResult::default();
    let canonical_root = match root.canonicalize() {
        Ok(r) => r,
        Err(e) => {
            result.skipped.push((root.to_path_buf(), e.to_string()));
            return result;
        }
    };
    let mut visited = HashSet::new();
    visited.insert(canonical_root.clone());
    let mut stack = vec![root.to_path_buf()];
    while let Some(dir) = stack.pop() {
        let entries = match std::fs::read_dir(&dir) {
            Ok(rd) => rd,
            Err(e) => {
                result.skipped.push((dir, e.to_string()));
                continue;
            }
        };
        for entry in entries {
            let entry = match entry {
                Ok(e) => e,
                Err(e) => {
                    result.skipped.push((dir.clone(), e.to_string()));
                    continue;
                }
            };
            result.items_scanned += 1;
            let path = entry.path();
            let name = entry.file_name();
            if name.to_string_lossy().starts_with('.') {
                continue;
            }
            // Resolve symlinks and keep only what stays under the root.
            let real = match path.canonicalize() {
                Ok(r) => r,
                Err(e) => {
                    result.skipped.push((path, e.to_string()));
                    continue;
                }
            };
            if !real.starts_with(&canonical_root) {
                result
                    .skipped
                    .push((path, "symlink leads outside the model root".into()));
                continue;
            }
            let Ok(meta) = std::fs::metadata(&real) else {
                continue;
            };
            let is_weights = path
                .extension()
                .and_then(|e| e.to_str())
                .is_some_and(|e| WEIGHT_SUFFIXES.contains(&e));
            if meta.is_dir() && is_config_of_checkpoint(&path) {
                continue; // `<name>.config/` describes `<name>.safetensors`; not a model
            }
            if meta.is_dir() {
                if !visited.insert(real) {
                    continue; // already seen: a symlink cycle or a second link to the same folder
                }
                if MODEL_FOLDER_MARKERS.iter().any(|m| path.join(m).is_file()) {
                    match unsafe_entry(&path, &canonical_root) {
                        None => result.models.push(path),
                        Some(why) => result.skipped.push((path, why)),
                    }
                } else {
                    stack.push(path);
                }
            } else if is_weights && !meta.is_file() {
                result
                    .skipped
                    .push((path, "not a regular file (a FIFO, socket or device)".into()));
            } else if is_weights {
                result.models.push(path);
            }
        }
    }
    result.models.sort();
    result
}
