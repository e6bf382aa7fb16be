//! The Hugging Face hub's layout: a repository's file list from its tree API
//! (`/api/models/{repo}/tree/{revision}/{path}?recursive=true`, paged by
//! `Link` headers), files read from `/{repo}/resolve/{revision}/{path}`, and
//! which of a repository's files make up the model.

use super::connector::HyperConnector;
use super::download::RemoteFile;
use object_store::client::{HttpConnector, HttpRequestBody};
use object_store::path::Path as ObjectPath;
use object_store::ClientOptions;
use serde::Deserialize;
use std::collections::HashSet;

/// One entry of the tree API's answer.
#[derive(Debug, Clone, Deserialize, PartialEq, Eq)]
pub struct Entry {
    #[serde(rename = "type")]
    pub kind: String,
    pub path: String,
    #[serde(default)]
    pub size: u64,
    #[serde(default)]
    pub oid: Option<String>,
    #[serde(default)]
    pub lfs: Option<Lfs>,
}

/// A file stored in LFS: its oid is its SHA-256.
#[derive(Debug, Clone, Deserialize, PartialEq, Eq)]
pub struct Lfs {
    pub oid: String,
}

/// Why a repository could not be listed.
#[derive(Debug, thiserror::Error)]
pub enum HfError {
    #[error("{0}")]
    Http(String),
    #[error("the hub answered {status} for {what}{hint}")]
    Status {
        status: u16,
        what: String,
        hint: &'static str,
    },
    #[error("the hub's file list is not what was expected: {0}")]
    Parse(String),
    #[error("the file list has more than {0} pages")]
    TooManyPages(usize),
}

/// Most pages of a tree listing followed (1,000 entries each).
const MAX_PAGES: usize = 100;

/// Lists every file under `subfolder` of `repo` at `revision`.
pub async fn list(
    endpoint: &str,
    repo: &str,
    revision: &str,
    subfolder: &str,
    options: &ClientOptions,
) -> Result<Vec<Entry>, HfError> {
    let client = HyperConnector::default()
        .connect(options)
        .map_err(|e| HfError::Http(e.to_string()))?;
    let mut url = format!("{endpoint}/api/models/{repo}/tree/{revision}");
    if !subfolder.is_empty() {
        url.push('/');
        url.push_str(subfolder);
    }
    url.push_str("?recursive=true");
    let mut entries = Vec::new();
    for _ in 0..MAX_PAGES {
        // The token is among the client's default headers.
        let req = http::Request::get(&url)
            .body(HttpRequestBody::empty())
            .map_err(|e| HfError::Http(e.to_string()))?;
        let resp = client
            .execute(req)
            .await
            .map_err(|e| HfError::Http(e.to_string()))?;
        let status = resp.status().as_u16();
        if status != 200 {
            return Err(HfError::Status {
                status,
                what: format!("{repo}@{revision}"),
                hint: match status {
                    401 | 403 => ": the repository needs a token with access to it",
                    404 => ": no such repository, revision or folder",
                    _ => "",
                },
            });
        }
        let next = resp
            .headers()
            .get_all(http::header::LINK)
            .iter()
            .filter_map(|v| v.to_str().ok())
            .find_map(next_link);
        let body = resp
            .into_body()
            .bytes()
            .await
            .map_err(|e| HfError::Http(e.to_string()))?;
        entries.extend(parse_tree(&body)?);
        match next {
            Some(n) => url = n,
            None => return Ok(entries),
        }
    }
    Err(HfError::TooManyPages(MAX_PAGES))
}

/// One page of the tree API's answer.
pub fn parse_tree(body: &[u8]) -> Result<Vec<Entry>, HfError> {
    serde_json::from_slice(body).map_err(|e| HfError::Parse(e.to_string()))
}

/// The `rel="next"` URL of a `Link` header, if it has one.
fn next_link(header: &str) -> Option<String> {
    header.split(',').find_map(|part| {
        let (url, params) = part.split_once(';')?;
        params
            .split(';')
            .any(|p| matches!(p.trim(), "rel=\"next\"" | "rel=next"))
            .then(|| {
                url.trim()
                    .trim_start_matches('<')
                    .trim_end_matches('>')
                    .to_string()
            })
    })
}

/// Formats a repository holds that the agent does not read, weights in
/// other frameworks and everything that is not a model file.
fn wanted(path: &str) -> bool {
    let name = path.rsplit('/').next().unwrap_or(path);
    let ext = name.rsplit_once('.').map_or("", |(_, e)| e);
    matches!(ext, "json" | "txt" | "safetensors" | "yaml" | "model")
        && !name.starts_with('.')
        && name != "README.md"
}

/// A weights file's name without its variant (`x.fp16.safetensors` →
/// `x.safetensors`), and whether it had one.
fn without_variant(path: &str) -> (String, bool) {
    let Some(stem) = path.strip_suffix(".safetensors") else {
        return (path.to_string(), false);
    };
    let (dir, name) = stem.rsplit_once('/').map_or(("", stem), |(d, n)| (d, n));
    match name.rsplit_once('.') {
        Some((base, _variant)) if !base.is_empty() => {
            let base = if dir.is_empty() {
                format!("{base}.safetensors")
            } else {
                format!("{dir}/{base}.safetensors")
            };
            (base, true)
        }
        _ => (path.to_string(), false),
    }
}

/// The files of the model under `subfolder`, named relative to it:
/// - a diffusers pipeline (a `model_index.json` at the top) keeps only its
///   components' folders and the index, not single-file checkpoints beside
///   them;
/// - configs, tokenizers, sidecars and `.safetensors` weights only;
/// - a variant (`*.fp16.safetensors`) only where the plain file is missing.
pub fn model_files(entries: &[Entry], subfolder: &str) -> Vec<RemoteFile> {
    let under = |p: &str| -> Option<String> {
        if subfolder.is_empty() {
            Some(p.to_string())
        } else {
            p.strip_prefix(subfolder)?
                .strip_prefix('/')
                .map(str::to_string)
        }
    };
    let files: Vec<(&Entry, String)> = entries
        .iter()
        .filter(|e| e.kind == "file")
        .filter_map(|e| Some((e, under(&e.path)?)))
        .filter(|(_, name)| wanted(name))
        .collect();
    let pipeline = files.iter().any(|(_, n)| n == "model_index.json");
    let names: HashSet<&str> = files.iter().map(|(_, n)| n.as_str()).collect();
    let mut out: Vec<RemoteFile> = files
        .iter()
        .filter(|(_, n)| !pipeline || n == "model_index.json" || n.contains('/'))
        .filter(|(_, n)| {
            let (plain, variant) = without_variant(n);
            !variant || !names.contains(plain.as_str())
        })
        .map(|(e, name)| RemoteFile {
            location: ObjectPath::from(e.path.as_str()),
            name: name.clone(),
            size: e.size,
            version: e.lfs.as_ref().map(|l| l.oid.clone()).or(e.oid.clone()),
            sha256: e.lfs.as_ref().map(|l| l.oid.to_ascii_lowercase()),
        })
        .collect();
    out.sort_by(|a, b| a.name.cmp(&b.name));
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn file(path: &str, size: u64, lfs: Option<&str>) -> Entry {
        Entry {
            kind: "file".into(),
            path: path.into(),
            size,
            oid: Some("blob".into()),
            lfs: lfs.map(|o| Lfs { oid: o.into() }),
        }
    }

    #[test]
    fn a_pipeline_repo_keeps_its_components_safetensors_and_configs() {
        let entries = vec![
            file("model_index.json", 500, None),
            file("README.md", 10, None),
            file("v1-5-pruned.safetensors", 4 << 30, Some("AA")),
            file("v1-5-pruned.ckpt", 4 << 30, Some("bb")),
            file("unet/config.json", 900, None),
            file(
                "unet/diffusion_pytorch_model.safetensors",
                3 << 30,
                Some("cc"),
            ),
            file(
                "unet/diffusion_pytorch_model.fp16.safetensors",
                1 << 30,
                Some("dd"),
            ),
            file("unet/diffusion_pytorch_model.bin", 3 << 30, Some("ee")),
            file(
                "vae/diffusion_pytorch_model.fp16.safetensors",
                1 << 20,
                Some("ff"),
            ),
            file("tokenizer/merges.txt", 5, None),
            Entry {
                kind: "directory".into(),
                path: "unet".into(),
                size: 0,
                oid: None,
                lfs: None,
            },
        ];
        let names: Vec<String> = model_files(&entries, "")
            .into_iter()
            .map(|f| f.name)
            .collect();
        assert_eq!(
            names,
            [
                "model_index.json",
                "tokenizer/merges.txt",
                "unet/config.json",
                "unet/diffusion_pytorch_model.safetensors",
                "vae/diffusion_pytorch_model.fp16.safetensors",
            ]
        );
        let unet = &model_files(&entries, "")[3];
        assert_eq!(unet.sha256.as_deref(), Some("cc"), "LFS oids are SHA-256");
    }

    #[test]
    fn a_subfolder_names_files_below_it_and_a_single_file_repo_keeps_its_file() {
        let entries = vec![
            file("unet/config.json", 1, None),
            file("unet/diffusion_pytorch_model.safetensors", 2, Some("AB")),
            file("vae/config.json", 1, None),
        ];
        let f = model_files(&entries, "unet");
        assert_eq!(f.len(), 2);
        assert_eq!(f[1].name, "diffusion_pytorch_model.safetensors");
        assert_eq!(
            f[1].location.as_ref(),
            "unet/diffusion_pytorch_model.safetensors"
        );
        assert_eq!(f[1].sha256.as_deref(), Some("ab"));
        let single = vec![
            file("dreamshaper.safetensors", 2 << 30, Some("x")),
            file("x.md", 1, None),
        ];
        assert_eq!(model_files(&single, "")[0].name, "dreamshaper.safetensors");
    }

    #[test]
    fn the_next_page_comes_from_the_link_header() {
        assert_eq!(
            next_link(r#"<https://hf.co/api/models/a/b/tree/main?cursor=x>; rel="next""#)
                .as_deref(),
            Some("https://hf.co/api/models/a/b/tree/main?cursor=x")
        );
        assert_eq!(next_link(r#"<https://x>; rel="prev""#), None);
    }
}
