//! Where a model comes from when no node has it, as a URL: an S3 prefix, a
//! Hugging Face repository, or one file on an HTTP(S) server.

use std::fmt;
use std::str::FromStr;

/// A remote model source.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Source {
    /// `s3://bucket/prefix`: every object under `prefix` (a diffusers
    /// folder), or the one object named `prefix` (a single file).
    S3 { bucket: String, prefix: String },
    /// `hf://org/repo[@revision][/subfolder]`: the repository's files at
    /// `revision` (default `main`), under `subfolder` if one is given.
    Hf {
        repo: String,
        revision: String,
        subfolder: String,
    },
    /// `https://host/path/file` (or `http://`): one file.
    Http { url: String },
}

/// Why a source URL is refused; the message says what form it must take.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SourceError {
    #[error("source {0:?} must start with s3://, hf://, https:// or http://")]
    Scheme(String),
    #[error("source {0:?}: the bucket must be 3–63 characters of lowercase letters, digits, '.' and '-' (s3://bucket/prefix)")]
    Bucket(String),
    #[error("source {0:?} must name a repository as hf://org/repo[@revision][/subfolder]")]
    Repo(String),
    #[error("source {0:?} must name one file: https://host/path/file")]
    File(String),
    #[error(
        "source {0:?} must not contain '..' segments, empty segments, spaces or control characters"
    )]
    Path(String),
}

/// A Hugging Face organisation, repository or revision name.
fn hf_name(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 96
        && s.chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'))
        && !s.starts_with(['.', '-'])
}

/// A relative object path: segments without `..`, empty ones or odd characters.
fn clean_path(p: &str) -> bool {
    p.split('/')
        .all(|seg| !seg.is_empty() && seg != "." && seg != "..")
        && !p.chars().any(|c| c.is_control() || c.is_whitespace())
}

impl FromStr for Source {
    type Err = SourceError;

    fn from_str(url: &str) -> Result<Self, SourceError> {
        if let Some(rest) = url.strip_prefix("s3://") {
            let (bucket, prefix) = rest.split_once('/').unwrap_or((rest, ""));
            let bucket_ok = (3..=63).contains(&bucket.len())
                && bucket.chars().all(|c| {
                    c.is_ascii_lowercase() || c.is_ascii_digit() || matches!(c, '.' | '-')
                })
                && !bucket.starts_with(['.', '-'])
                && !bucket.ends_with(['.', '-']);
            if !bucket_ok {
                return Err(SourceError::Bucket(url.into()));
            }
            let prefix = prefix.trim_end_matches('/');
            if !prefix.is_empty() && !clean_path(prefix) {
                return Err(SourceError::Path(url.into()));
            }
            return Ok(Source::S3 {
                bucket: bucket.into(),
                prefix: prefix.into(),
            });
        }
        if let Some(rest) = url.strip_prefix("hf://") {
            let bad = || SourceError::Repo(url.into());
            let mut parts = rest.splitn(3, '/');
            let (org, repo) = (parts.next().ok_or_else(bad)?, parts.next().ok_or_else(bad)?);
            let subfolder = parts.next().unwrap_or("").trim_end_matches('/');
            let (repo, revision) = repo.split_once('@').unwrap_or((repo, "main"));
            if !hf_name(org) || !hf_name(repo) || !hf_name(revision) {
                return Err(bad());
            }
            if !subfolder.is_empty() && !clean_path(subfolder) {
                return Err(SourceError::Path(url.into()));
            }
            return Ok(Source::Hf {
                repo: format!("{org}/{repo}"),
                revision: revision.into(),
                subfolder: subfolder.into(),
            });
        }
        let rest = url
            .strip_prefix("https://")
            .or_else(|| url.strip_prefix("http://"))
            .ok_or_else(|| SourceError::Scheme(url.into()))?;
        let path = rest.split(['?', '#']).next().unwrap_or_default();
        let Some((host, path)) = path.split_once('/') else {
            return Err(SourceError::File(url.into()));
        };
        if host.is_empty() || path.is_empty() || path.ends_with('/') {
            return Err(SourceError::File(url.into()));
        }
        if !clean_path(path) || url.chars().any(|c| c.is_control() || c.is_whitespace()) {
            return Err(SourceError::Path(url.into()));
        }
        Ok(Source::Http { url: url.into() })
    }
}

impl fmt::Display for Source {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Source::S3 { bucket, prefix } => write!(f, "s3://{bucket}/{prefix}"),
            Source::Hf {
                repo,
                revision,
                subfolder,
            } => {
                write!(f, "hf://{repo}@{revision}")?;
                if !subfolder.is_empty() {
                    write!(f, "/{subfolder}")?;
                }
                Ok(())
            }
            Source::Http { url } => f.write_str(url),
        }
    }
}

impl Source {
    /// The name a download of this source is kept under: the last segment
    /// of its path (a file keeps its extension), else the repository's or
    /// bucket's name.
    pub fn file_name(&self) -> &str {
        match self {
            Source::S3 { bucket, prefix } if prefix.is_empty() => bucket,
            Source::S3 { prefix, .. } => prefix.rsplit('/').next().unwrap_or(prefix),
            Source::Hf {
                repo, subfolder, ..
            } if subfolder.is_empty() => repo.rsplit('/').next().unwrap_or(repo),
            Source::Hf { subfolder, .. } => subfolder.rsplit('/').next().unwrap_or(subfolder),
            Source::Http { url } => {
                let path = url.split(['?', '#']).next().unwrap_or(url);
                path.rsplit('/').next().unwrap_or(path)
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn parse(s: &str) -> Result<Source, SourceError> {
        s.parse()
    }

    #[test]
    fn the_three_forms_parse() {
        assert_eq!(
            parse("s3://models/sdxl/base/").unwrap(),
            Source::S3 {
                bucket: "models".into(),
                prefix: "sdxl/base".into()
            }
        );
        assert_eq!(
            parse("hf://stabilityai/sdxl-turbo@fp16/unet").unwrap(),
            Source::Hf {
                repo: "stabilityai/sdxl-turbo".into(),
                revision: "fp16".into(),
                subfolder: "unet".into()
            }
        );
        assert_eq!(
            parse("hf://org/repo").unwrap().to_string(),
            "hf://org/repo@main"
        );
        let http = parse("https://example.com/m/v1-5.safetensors?download=true").unwrap();
        assert_eq!(http.file_name(), "v1-5.safetensors");
        assert_eq!(parse("s3://models/sdxl/base").unwrap().file_name(), "base");
        assert_eq!(parse("hf://org/repo@v2").unwrap().file_name(), "repo");
    }

    #[test]
    fn malformed_sources_say_what_form_they_take() {
        for (url, want) in [
            ("ftp://x/y", "must start with"),
            ("s3://A_B/x", "bucket must be"),
            ("s3://ab/x", "bucket must be"),
            ("s3://models/a/../b", "'..'"),
            ("hf://only-org", "hf://org/repo"),
            ("hf://org/repo@", "hf://org/repo"),
            ("hf://org/re po", "hf://org/repo"),
            ("hf://org/repo/a//b", "'..'"),
            ("https://example.com", "one file"),
            ("https://example.com/dir/", "one file"),
            ("https:///file", "one file"),
            ("https://example.com/a/../b", "'..'"),
        ] {
            let e = parse(url).unwrap_err().to_string();
            assert!(e.contains(want), "{url}: {e}");
        }
    }

    proptest! {
        /// Whatever a user writes, parsing never panics, and what parses
        /// prints back to a URL that parses to the same source.
        #[test]
        fn parsing_is_total_and_round_trips(url in "(s3|hf|https?|x)://[a-z0-9./@_ -]{0,40}") {
            if let Ok(s) = parse(&url) {
                prop_assert_eq!(parse(&s.to_string()).unwrap(), s);
            }
        }
    }
}
