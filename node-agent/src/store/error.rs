use std::path::PathBuf;

/// Everything that can go wrong between a file on disk and tensors in memory.
/// Every variant names the file, so a message is actionable on its own.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{path}: not a valid safetensors file: {reason}")]
    Safetensors { path: PathBuf, reason: String },
    #[error("{path}: not a readable PyTorch checkpoint: {reason}")]
    Pickle { path: PathBuf, reason: String },
    #[error("{path}: refused: the pickle references {global}, which is not a tensor type; only plain tensor state dicts are loaded (convert the file to safetensors)")]
    UnsafePickle { path: PathBuf, global: String },
    #[error(
        "{path}: unsupported model file type (expected .safetensors, .ckpt, .pt, .pth or .bin)"
    )]
    UnknownFormat { path: PathBuf },
    #[error("{path}: {reason}")]
    InvalidModel { path: PathBuf, reason: String },
    #[error("{path}: invalid JSON in {file}: {reason}")]
    Config {
        path: PathBuf,
        file: String,
        reason: String,
    },
    #[error("{path}: tensor {tensor}: {reason}")]
    Tensor {
        path: PathBuf,
        tensor: String,
        reason: String,
    },
    #[error("{path}: {reason}")]
    Conversion { path: PathBuf, reason: String },
    #[error("{path}: {reason}")]
    Candle { path: PathBuf, reason: String },
    #[error("{path}: not a regular file (a {kind}); only regular files are read")]
    NotRegular { path: PathBuf, kind: &'static str },
}

impl StoreError {
    pub(crate) fn io(path: impl Into<PathBuf>) -> impl FnOnce(std::io::Error) -> StoreError {
        let path = path.into();
        move |source| StoreError::Io { path, source }
    }

    pub(crate) fn invalid(path: impl Into<PathBuf>, reason: impl Into<String>) -> StoreError {
        StoreError::InvalidModel {
            path: path.into(),
            reason: reason.into(),
        }
    }
}

/// candle's message without the backtrace it captures when RUST_BACKTRACE is set.
pub fn candle_message(e: &candle_core::Error) -> String {
    match e {
        candle_core::Error::WithBacktrace { inner, .. } => candle_message(inner),
        other => other
            .to_string()
            .lines()
            .next()
            .unwrap_or_default()
            .to_string(),
    }
}

pub type Result<T, E = StoreError> = std::result::Result<T, E>;
