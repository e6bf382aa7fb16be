//! Finding models under a root folder, without the traps of the search this
//! project grew from (it descended into model folders and followed symlinks out
//! of the root):
//! a folder with a marker file is one model and is not searched further;
//! weight files elsewhere are models; hidden entries are skipped; symlinks are
//! followed only while they stay inside the root, and never in a cycle;
//! unreadable entries are reported and skipped.

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
            if meta.is_dir() {
                if !visited.insert(real) {
                    continue; // already seen: a symlink cycle or a second link to the same folder
                }
                if MODEL_FOLDER_MARKERS.iter().any(|m| path.join(m).is_file()) {
                    result.models.push(path);
                } else {
                    stack.push(path);
                }
            } else if path
                .extension()
                .and_then(|e| e.to_str())
                .is_some_and(|e| WEIGHT_SUFFIXES.contains(&e))
            {
                result.models.push(path);
            }
        }
    }
    result.models.sort();
    result
}
