//! Secrets (bearer tokens) come from files, as Kubernetes mounts Secrets, and
//! never from flags or the environment, where `ps` and crash dumps show them.
//! Errors name the file but never its contents.

use std::path::{Path, PathBuf};

#[derive(Debug, thiserror::Error)]
pub enum SecretError {
    #[error("reading the secret file {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("the secret file {path} is empty")]
    Empty { path: PathBuf },
    #[error("the secret file {path} is not UTF-8 text")]
    NotText { path: PathBuf },
}

/// The secret in `path`, without surrounding whitespace (the newline editors
/// and `kubectl create secret --from-file` leave). An empty file is an error:
/// an empty token would let every client in.
pub fn read_secret(path: &Path) -> Result<String, SecretError> {
    let bytes = std::fs::read(path).map_err(|source| SecretError::Read {
        path: path.to_path_buf(),
        source,
    })?;
    let text = String::from_utf8(bytes).map_err(|_| SecretError::NotText {
        path: path.to_path_buf(),
    })?;
    let secret = text.trim();
    if secret.is_empty() {
        return Err(SecretError::Empty {
            path: path.to_path_buf(),
        });
    }
    Ok(secret.to_string())
}

/// Whether a request with this `Authorization` header value may pass: always
/// when no token is configured, else when it carries the bearer token.
pub fn bearer_allowed(token: Option<&str>, authorization: Option<&str>) -> bool {
    let Some(want) = token else { return true };
    let got = authorization
        .and_then(|v| v.strip_prefix("Bearer "))
        .unwrap_or("");
    token_matches(want, got)
}

/// Whether a bearer token a client sent is `want`, compared as SHA-256
/// digests in constant time: neither the first differing byte nor the
/// token's length shows in the timing.
pub fn token_matches(want: &str, got: &str) -> bool {
    use sha2::{Digest, Sha256};
    use subtle::ConstantTimeEq;
    bool::from(Sha256::digest(want.as_bytes()).ct_eq(&Sha256::digest(got.as_bytes())))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn trims_and_refuses_empty_missing_and_binary_files() {
        let dir = tempfile::tempdir().unwrap();
        let file = |name: &str, bytes: &[u8]| {
            let p = dir.path().join(name);
            std::fs::write(&p, bytes).unwrap();
            p
        };
        assert_eq!(read_secret(&file("t", b"  s3cret\n")).unwrap(), "s3cret");
        let empty = read_secret(&file("e", b" \n")).unwrap_err();
        assert!(matches!(empty, SecretError::Empty { .. }), "{empty}");
        let binary = read_secret(&file("b", &[0xff, 0xfe])).unwrap_err();
        assert!(matches!(binary, SecretError::NotText { .. }), "{binary}");
        let missing = read_secret(&dir.path().join("missing")).unwrap_err();
        assert!(missing.to_string().contains("missing"), "{missing}");
    }

    #[test]
    fn errors_never_show_the_secret() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("t");
        std::fs::write(&p, [b's', b'3', 0xff]).unwrap();
        let e = read_secret(&p).unwrap_err().to_string();
        assert!(!e.contains("s3"), "{e}");
    }

    #[test]
    fn tokens_match_only_when_equal() {
        assert!(token_matches("secret-token-1234", "secret-token-1234"));
        assert!(!token_matches("secret-token-1234", "secret-token-123"));
        assert!(!token_matches("secret-token-1234", ""));
        let want = Some("secret-token-1234");
        assert!(bearer_allowed(want, Some("Bearer secret-token-1234")));
        assert!(!bearer_allowed(want, Some("secret-token-1234")));
        assert!(!bearer_allowed(want, None));
        assert!(bearer_allowed(None, None), "no token configured: open");
    }
}
