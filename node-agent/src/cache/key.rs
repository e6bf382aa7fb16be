//! What a cache entry is keyed by.

use std::fmt;
use std::path::{Path, PathBuf};

/// The weights a cache entry holds, named by where they are read from: a
/// weights file (an adapter, a single-file model) or a diffusers component
/// folder (`…/sd15/unet`). Two models or requests that name the same files
/// share one entry.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct CacheKey(String);

impl CacheKey {
    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// The file or folder the weights are read from.
    pub fn path(&self) -> &Path {
        Path::new(&self.0)
    }

    /// The last path component: `unet`, `vae`, … for a model's components.
    pub fn name(&self) -> &str {
        self.path()
            .file_name()
            .and_then(|n| n.to_str())
            .unwrap_or_default()
    }
}

impl fmt::Display for CacheKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl From<&Path> for CacheKey {
    fn from(p: &Path) -> Self {
        CacheKey(p.to_string_lossy().into_owned())
    }
}

impl From<PathBuf> for CacheKey {
    fn from(p: PathBuf) -> Self {
        CacheKey::from(p.as_path())
    }
}

impl From<&str> for CacheKey {
    fn from(s: &str) -> Self {
        CacheKey(s.to_string())
    }
}

impl From<String> for CacheKey {
    fn from(s: String) -> Self {
        CacheKey(s)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_the_component() {
        let k = CacheKey::from(Path::new("/models/sd15/unet"));
        assert_eq!((k.name(), k.as_str()), ("unet", "/models/sd15/unet"));
        assert_eq!(k, CacheKey::from("/models/sd15/unet"));
        assert_eq!(CacheKey::from("").name(), "");
    }
}
