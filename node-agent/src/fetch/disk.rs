//! The disk tier: models downloaded into one managed folder under a byte
//! budget. Each finished download is a folder with a marker file (its bytes
//! and source); the marker's modification time is when it was last used.
//! Room is made before a download by deleting the least recently used
//! downloads that the caller does not protect (placed here, or in use);
//! models a user put in the models folder by hand are never under this
//! folder, so never deleted.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::SystemTime;

/// The marker a finished download carries.
pub const MARKER: &str = ".modelcache-download.json";

/// Why room could not be made, or a download not recorded.
#[derive(Debug, thiserror::Error)]
pub enum DiskError {
    #[error("{name} needs {needed} bytes but the disk cache's budget is {budget} bytes (--disk-cache-bytes)")]
    TooLarge {
        name: String,
        needed: u64,
        budget: u64,
    },
    #[error("disk cache full: {name} needs {needed} bytes, {free} are free of {budget}, and the rest is held by models placed here or in use ({held}) or downloads in progress ({reserved} bytes)")]
    Full {
        name: String,
        needed: u64,
        free: u64,
        budget: u64,
        held: String,
        reserved: u64,
    },
    #[error("{}: {source}", path.display())]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
}

/// One finished download.
#[derive(Debug, Clone, PartialEq)]
pub struct Download {
    /// Its path under the folder, as the deployment names the model.
    pub name: String,
    pub bytes: u64,
    pub last_used: SystemTime,
}

#[derive(Debug, Default)]
struct State {
    downloads: BTreeMap<String, Download>,
    /// Bytes promised to downloads in progress.
    reserved: u64,
}

/// The managed folder and its budget.
#[derive(Debug, Clone)]
pub struct DiskTier {
    root: PathBuf,
    budget: u64,
    state: Arc<Mutex<State>>,
}

/// Room held for a download in progress; given back when dropped, whether
/// the download was recorded or not.
#[derive(Debug)]
pub struct Room {
    state: Arc<Mutex<State>>,
    bytes: u64,
}

impl Drop for Room {
    fn drop(&mut self) {
        let mut st = self.state.lock().unwrap_or_else(|p| p.into_inner());
        st.reserved = st.reserved.saturating_sub(self.bytes);
    }
}

/// Bytes of every file under `dir`.
fn size_of(dir: &Path) -> u64 {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return 0;
    };
    entries
        .flatten()
        .map(|e| match e.file_type() {
            Ok(t) if t.is_dir() => size_of(&e.path()),
            Ok(t) if t.is_file() => e.metadata().map_or(0, |m| m.len()),
            _ => 0,
        })
        .sum()
}

/// Every folder under `dir` that carries a marker, by path relative to `root`.
fn find(root: &Path, dir: &Path, out: &mut BTreeMap<String, Download>) {
    let marker = dir.join(MARKER);
    if let Ok(meta) = std::fs::metadata(&marker) {
        if let Ok(rel) = dir.strip_prefix(root) {
            let name = rel.to_string_lossy().into_owned();
            out.insert(
                name.clone(),
                Download {
                    name,
                    bytes: size_of(dir),
                    last_used: meta.modified().unwrap_or(SystemTime::UNIX_EPOCH),
                },
            );
        }
        return;
    }
    let Ok(entries) = std::fs::read_dir(dir) else {
        return;
    };
    for e in entries.flatten() {
        // Staging folders (`.name.partial`) are not downloads yet.
        let hidden = e.file_name().to_string_lossy().starts_with('.');
        if !hidden && e.file_type().is_ok_and(|t| t.is_dir()) {
            find(root, &e.path(), out);
        }
    }
}

impl DiskTier {
    /// The tier over `root` (created if missing), with what earlier runs
    /// downloaded there.
    pub fn open(root: &Path, budget: u64) -> Result<Self, DiskError> {
        std::fs::create_dir_all(root).map_err(|source| DiskError::Io {
            path: root.to_path_buf(),
            source,
        })?;
        let mut downloads = BTreeMap::new();
        find(root, root, &mut downloads);
        Ok(DiskTier {
            root: root.to_path_buf(),
            budget,
            state: Arc::new(Mutex::new(State {
                downloads,
                reserved: 0,
            })),
        })
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    pub fn root(&self) -> &Path {
        &self.root
    }

    /// Where the download of the model named `name` goes.
    pub fn path_of(&self, name: &str) -> PathBuf {
        self.root.join(name)
    }

    /// (bytes used by downloads and reservations, budget).
    pub fn usage(&self) -> (u64, u64) {
        let st = self.lock();
        let used: u64 = st.downloads.values().map(|d| d.bytes).sum();
        (used + st.reserved, self.budget)
    }

    /// The finished downloads, least recently used first.
    pub fn downloads(&self) -> Vec<Download> {
        let mut v: Vec<Download> = self.lock().downloads.values().cloned().collect();
        v.sort_by_key(|d| d.last_used);
        v
    }

    /// Holds `needed` bytes for downloading `name`, deleting the least
    /// recently used downloads that `protected` does not name until they
    /// fit. Nothing is deleted when they cannot fit.
    pub fn make_room(
        &self,
        name: &str,
        needed: u64,
        protected: &dyn Fn(&str) -> bool,
    ) -> Result<Room, DiskError> {
        if needed > self.budget {
            return Err(DiskError::TooLarge {
                name: name.into(),
                needed,
                budget: self.budget,
            });
        }
        let victims = {
            let mut st = self.lock();
            let used: u64 = st.downloads.values().map(|d| d.bytes).sum::<u64>() + st.reserved;
            let mut free = self.budget.saturating_sub(used);
            let mut candidates: Vec<&Download> = st
                .downloads
                .values()
                .filter(|d| d.name != name && !protected(&d.name))
                .collect();
            candidates.sort_by_key(|d| d.last_used);
            let mut victims = Vec::new();
            for d in candidates {
                if free >= needed {
                    break;
                }
                free += d.bytes;
                victims.push(d.name.clone());
            }
            if free < needed {
                let held: Vec<&str> = st
                    .downloads
                    .values()
                    .filter(|d| protected(&d.name))
                    .map(|d| d.name.as_str())
                    .collect();
                return Err(DiskError::Full {
                    name: name.into(),
                    needed,
                    free: self.budget.saturating_sub(used),
                    budget: self.budget,
                    held: if held.is_empty() {
                        "none".into()
                    } else {
                        held.join(", ")
                    },
                    reserved: st.reserved,
                });
            }
            for v in &victims {
                st.downloads.remove(v);
            }
            st.reserved += needed;
            victims
        };
        for v in victims {
            tracing::info!(model = %v, "deleting a least recently used download to make room");
            let path = self.path_of(&v);
            if let Err(e) = std::fs::remove_dir_all(&path) {
                tracing::warn!(path = %path.display(), "could not delete: {e}");
            }
        }
        Ok(Room {
            state: self.state.clone(),
            bytes: needed,
        })
    }

    /// Records the finished download of `name` (its folder complete at
    /// [`Self::path_of`]) from `source`; the room held for it is given back.
    pub fn finished(&self, name: &str, source: &str, room: Room) -> Result<(), DiskError> {
        let dir = self.path_of(name);
        let marker = dir.join(MARKER);
        let text = serde_json::json!({"source": source}).to_string();
        std::fs::write(&marker, text).map_err(|source| DiskError::Io {
            path: marker.clone(),
            source,
        })?;
        let bytes = size_of(&dir);
        self.lock().downloads.insert(
            name.into(),
            Download {
                name: name.into(),
                bytes,
                last_used: SystemTime::now(),
            },
        );
        drop(room);
        Ok(())
    }

    /// Deletes the download of `name`.
    pub fn remove(&self, name: &str) {
        if self.lock().downloads.remove(name).is_some() {
            let path = self.path_of(name);
            if let Err(e) = std::fs::remove_dir_all(&path) {
                tracing::warn!(path = %path.display(), "could not delete: {e}");
            }
        }
    }

    /// Whether a finished download of `name` is here.
    pub fn has(&self, name: &str) -> bool {
        self.lock().downloads.contains_key(name)
    }

    /// Marks `name` used now (it is the last to be deleted for room).
    pub fn touch(&self, name: &str) {
        let now = SystemTime::now();
        let marker = self.path_of(name).join(MARKER);
        if let Ok(f) = std::fs::File::options().append(true).open(&marker) {
            let _ = f.set_modified(now);
        }
        if let Some(d) = self.lock().downloads.get_mut(name) {
            d.last_used = now;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    /// A finished download of `bytes` bytes, used `age` seconds ago.
    fn downloaded(tier: &DiskTier, name: &str, bytes: usize, age: u64) {
        let room = tier.make_room(name, bytes as u64, &|_| false).unwrap();
        let dir = tier.path_of(name);
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(dir.join("model.safetensors"), vec![0u8; bytes]).unwrap();
        tier.finished(name, "s3://b/x", room).unwrap();
        let when = SystemTime::now() - Duration::from_secs(age);
        std::fs::File::options()
            .append(true)
            .open(dir.join(MARKER))
            .unwrap()
            .set_modified(when)
            .unwrap();
        tier.lock().downloads.get_mut(name).unwrap().last_used = when;
    }

    #[test]
    fn room_is_made_from_the_least_recently_used_unprotected_downloads() {
        let dir = tempfile::tempdir().unwrap();
        let tier = DiskTier::open(dir.path(), 1000).unwrap();
        downloaded(&tier, "a", 300, 30);
        downloaded(&tier, "sd/b", 300, 20);
        downloaded(&tier, "c", 300, 10);
        // 100 free; 400 needed: `a` (oldest) is protected, so `sd/b` then `c` go.
        let room = tier.make_room("d", 400, &|n| n == "a").unwrap();
        let left: Vec<String> = tier.downloads().into_iter().map(|d| d.name).collect();
        assert_eq!(left, ["a"]);
        assert!(!dir.path().join("sd/b").exists() && dir.path().join("a").exists());
        assert_eq!(
            tier.usage().0,
            300 + 400 + MARKER_BYTES,
            "the room counts until dropped"
        );
        drop(room);
        assert_eq!(tier.usage().0, 300 + MARKER_BYTES);
    }

    /// `{"source":"s3://b/x"}`
    const MARKER_BYTES: u64 = 21;

    #[test]
    fn what_cannot_fit_is_refused_with_the_reason_and_deletes_nothing() {
        let dir = tempfile::tempdir().unwrap();
        let tier = DiskTier::open(dir.path(), 1000).unwrap();
        downloaded(&tier, "placed", 600, 5);
        let e = tier
            .make_room("big", 2000, &|_| false)
            .unwrap_err()
            .to_string();
        assert!(e.contains("budget is 1000 bytes"), "{e}");
        let e = tier
            .make_room("next", 500, &|n| n == "placed")
            .unwrap_err()
            .to_string();
        assert!(e.contains("disk cache full") && e.contains("placed"), "{e}");
        assert!(dir.path().join("placed").exists());
    }

    #[test]
    fn downloads_are_found_again_after_a_restart_and_staging_is_not_one() {
        let dir = tempfile::tempdir().unwrap();
        {
            let tier = DiskTier::open(dir.path(), 10_000).unwrap();
            downloaded(&tier, "old", 100, 100);
            downloaded(&tier, "hub/new", 100, 1);
        }
        std::fs::create_dir_all(dir.path().join(".half.partial")).unwrap();
        let tier = DiskTier::open(dir.path(), 10_000).unwrap();
        let names: Vec<String> = tier.downloads().into_iter().map(|d| d.name).collect();
        assert_eq!(names, ["old", "hub/new"], "least recently used first");
        tier.touch("old");
        let names: Vec<String> = tier.downloads().into_iter().map(|d| d.name).collect();
        assert_eq!(names, ["hub/new", "old"]);
    }
}
