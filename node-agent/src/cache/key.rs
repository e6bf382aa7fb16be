//! What a cache entry is keyed by.

use candle_core::DType;
use std::fmt;
use std::path::{Path, PathBuf};

/// The weights a cache entry holds, named by where they are read from: a
/// weights file (an adapter, a single-file model) or a diffusers component
/// folder (`…/sd15/unet`). Two models or requests that name the same files
/// share one entry. On a device the weights are also held at a dtype, which
/// is part of the key there ([`CacheKey::at`]): deployments of one model at
/// two precisions hold two copies, each charged at its own size.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct CacheKey {
    path: String,
    /// The device copy's dtype (`f16`, `bf16`, `f32`); `None`: the weights
    /// as read, the RAM tier's entries.
    dtype: Option<&'static str>,
}

impl CacheKey {
    pub fn as_str(&self) -> &str {
        &self.path
    }

    /// The file or folder the weights are read from.
    pub fn path(&self) -> &Path {
        Path::new(&self.path)
    }

    /// The same weights held at `dtype` on a device.
    pub fn at(&self, dtype: DType) -> CacheKey {
        CacheKey {
            path: self.path.clone(),
            dtype: Some(dtype.as_str()),
        }
    }

    /// The weights whatever their dtype.
    pub fn weights(&self) -> CacheKey {
        CacheKey {
            path: self.path.clone(),
            dtype: None,
        }
    }

    /// Whether this key names `other`: the same weights, and the same dtype
    /// unless this key has none (then any dtype).
    pub fn covers(&self, other: &CacheKey) -> bool {
        self.path == other.path && (self.dtype.is_none() || self.dtype == other.dtype)
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
        match self.dtype {
            Some(dtype) => write!(f, "{} ({dtype})", self.path),
            None => f.write_str(&self.path),
        }
    }
}

impl From<&Path> for CacheKey {
    fn from(p: &Path) -> Self {
        CacheKey::from(p.to_string_lossy().into_owned())
    }
}

impl From<PathBuf> for CacheKey {
    fn from(p: PathBuf) -> Self {
        CacheKey::from(p.as_path())
    }
}

impl From<&str> for CacheKey {
    fn from(s: &str) -> Self {
        CacheKey::from(s.to_string())
    }
}

impl From<String> for CacheKey {
    fn from(path: String) -> Self {
        CacheKey { path, dtype: None }
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

    #[test]
    fn a_device_copy_is_keyed_by_its_dtype_too() {
        let k = CacheKey::from("/models/sd15/unet");
        let (half, full) = (k.at(DType::F16), k.at(DType::F32));
        assert_ne!(half, full);
        assert_eq!(half.weights(), k);
        assert_eq!(half.to_string(), "/models/sd15/unet (f16)");
        assert!(k.covers(&half) && k.covers(&full) && half.covers(&half));
        assert!(!half.covers(&full) && !half.covers(&k));
        assert!(!k.covers(&CacheKey::from("/models/sd15/vae").at(DType::F16)));
    }
}
