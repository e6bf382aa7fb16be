//! The endpoint other agents copy a model from, so that a node that needs a
//! model a neighbour has does not download it from remote storage:
//! `GET /internal/v1/models/<model.path>/-/<file>` with HTTP ranges, and
//! `…/-/.listing.json` for the files and their sizes. A file whose weights
//! are in the RAM tier is sent from there (the region, locked while it is
//! sent, without a copy); others from disk. Only agents holding the
//! cluster's peer token (`--peer-token-file`) may read; without a token the
//! endpoint does not exist.

use super::AppState;
use crate::cache::region::Segment;
use crate::cache::{ModelGuard, RamModel};
use crate::catalog::CatalogEntry;
use crate::fetch::disk::MARKER;
use crate::fetch::peer::{PeerFile, LISTING, PREFIX};
use axum::body::Body;
use axum::extract::{Path as UrlPath, Request, State};
use axum::http::{header, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::{Json, Router};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use tower::ServiceExt;

pub fn router() -> Router<Arc<AppState>> {
    Router::new().route(&format!("{PREFIX}/{{*rest}}"), get(serve))
}

fn status(code: StatusCode, message: &str) -> Response {
    (code, message.to_string()).into_response()
}

async fn serve(
    State(s): State<Arc<AppState>>,
    UrlPath(rest): UrlPath<String>,
    req: Request,
) -> Response {
    let Some(token) = s.peer_token.as_deref() else {
        return status(StatusCode::NOT_FOUND, "not found");
    };
    let sent = req
        .headers()
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok());
    if !modelcache_support::bearer_allowed(Some(token), sent) {
        return status(StatusCode::UNAUTHORIZED, "missing or invalid peer token");
    }
    let Some((model, file)) = rest.split_once("/-/") else {
        return status(StatusCode::NOT_FOUND, "expected <model>/-/<file>");
    };
    let Some(entry) = s.agent.catalog.by_path(model) else {
        return status(StatusCode::NOT_FOUND, "no such model here");
    };
    let listed = tokio::task::spawn_blocking(move || files(&entry)).await;
    let Ok(listed) = listed else {
        return status(StatusCode::INTERNAL_SERVER_ERROR, "listing failed");
    };
    if file == LISTING {
        let list: Vec<PeerFile> = listed
            .iter()
            .map(|(name, _, size)| PeerFile {
                name: name.clone(),
                size: *size,
            })
            .collect();
        return Json(list).into_response();
    }
    // Only a listed file, by its exact name: nothing outside the model is reachable.
    let Some((_, path, _)) = listed.into_iter().find(|(name, _, _)| name == file) else {
        return status(StatusCode::NOT_FOUND, "no such file in the model");
    };
    // From the RAM tier when the file's data is there: no disk read, no copy.
    let agent = s.agent.clone();
    let file_path = path.clone();
    let ram = tokio::task::spawn_blocking(move || agent.cache.ram_copy_of(&file_path))
        .await
        .ok()
        .flatten();
    if let Some((guard, segment)) = ram {
        let range = req
            .headers()
            .get(header::RANGE)
            .and_then(|v| v.to_str().ok())
            .map(str::to_string);
        return from_ram(&path, guard, &segment, range.as_deref());
    }
    match tower_http::services::ServeFile::new(path)
        .oneshot(req)
        .await
    {
        Ok(r) => r.map(Body::new),
        Err(e) => status(StatusCode::INTERNAL_SERVER_ERROR, &e.to_string()),
    }
}

/// A part of a RAM-tier region, kept resident (locked) while it is sent.
struct RegionSlice {
    guard: ModelGuard<RamModel>,
    start: usize,
    end: usize,
}

impl AsRef<[u8]> for RegionSlice {
    fn as_ref(&self) -> &[u8] {
        &self.guard.region.as_slice()[self.start..self.end]
    }
}

/// The bytes `start..end` of a range header over `len` bytes (one range, as
/// the downloader asks); `None` for the whole file.
fn byte_range(range: Option<&str>, len: u64) -> Option<(u64, u64)> {
    let (a, b) = range?.strip_prefix("bytes=")?.split_once('-')?;
    let start: u64 = a.trim().parse().ok()?;
    let end = match b.trim() {
        "" => len,
        b => b.parse::<u64>().ok()?.saturating_add(1).min(len),
    };
    (start < end).then_some((start, end))
}

/// Serves `path` (whose data `segment` places in `guard`'s region) with
/// the header bytes before the data read from disk.
fn from_ram(
    path: &Path,
    guard: ModelGuard<RamModel>,
    segment: &Segment,
    range: Option<&str>,
) -> Response {
    let len = segment.file_offset + segment.len;
    let (start, end, partial) = match byte_range(range, len) {
        Some((a, b)) => (a, b, true),
        None if range.is_some() => {
            return Response::builder()
                .status(StatusCode::RANGE_NOT_SATISFIABLE)
                .header(header::CONTENT_RANGE, format!("bytes */{len}"))
                .body(Body::empty())
                .unwrap_or_default();
        }
        None => (0, len, false),
    };
    let mut chunks: Vec<bytes::Bytes> = Vec::new();
    let data = segment.file_offset;
    if start < data {
        let mut head = vec![0u8; (end.min(data) - start) as usize];
        let read = std::fs::File::open(path).and_then(|f| {
            use std::os::unix::fs::FileExt;
            f.read_exact_at(&mut head, start)
        });
        if let Err(e) = read {
            return status(StatusCode::INTERNAL_SERVER_ERROR, &e.to_string());
        }
        chunks.push(head.into());
    }
    if end > data {
        let from = start.max(data) - data + segment.region_offset;
        let to = end - data + segment.region_offset;
        chunks.push(bytes::Bytes::from_owner(RegionSlice {
            guard,
            start: from as usize,
            end: to as usize,
        }));
    }
    let stream = futures::stream::iter(chunks.into_iter().map(Ok::<_, std::io::Error>));
    let mut r = Response::builder()
        .header(header::ACCEPT_RANGES, "bytes")
        .header(header::CONTENT_LENGTH, end - start)
        .header(header::CONTENT_TYPE, "application/octet-stream");
    if partial {
        r = r.status(StatusCode::PARTIAL_CONTENT).header(
            header::CONTENT_RANGE,
            format!("bytes {start}-{}/{len}", end - 1),
        );
    }
    r.body(Body::from_stream(stream)).unwrap_or_default()
}

/// The files a copy of `entry` needs, as (name inside the model's folder,
/// path here, size): every file of a folder (hidden ones excepted); a
/// download of a single file is its folder; another single file is itself
/// with the configs folder beside it, if it has one.
pub fn files(entry: &CatalogEntry) -> Vec<(String, PathBuf, u64)> {
    let p = &entry.path;
    let mut out = Vec::new();
    if p.is_dir() {
        walk(p, p, &mut out);
    } else if let Some(dir) = p.parent().filter(|d| d.join(MARKER).is_file()) {
        walk(dir, dir, &mut out);
    } else {
        if let (Some(name), Ok(meta)) = (p.file_name(), std::fs::metadata(p)) {
            out.push((name.to_string_lossy().into_owned(), p.clone(), meta.len()));
        }
        if let Some(cfg) = crate::store::config_beside(p) {
            if let Some(parent) = cfg.parent() {
                walk(parent, &cfg, &mut out);
            }
        }
    }
    out.sort();
    out
}

fn walk(root: &Path, dir: &Path, out: &mut Vec<(String, PathBuf, u64)>) {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return;
    };
    for e in entries.flatten() {
        if e.file_name().to_string_lossy().starts_with('.') {
            continue;
        }
        let path = e.path();
        match e.file_type() {
            Ok(t) if t.is_dir() => walk(root, &path, out),
            Ok(t) if t.is_file() => {
                if let (Ok(rel), Ok(meta)) = (path.strip_prefix(root), e.metadata()) {
                    let name = rel.to_string_lossy().replace('\\', "/");
                    out.push((name, path.clone(), meta.len()));
                }
            }
            _ => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::byte_range;

    #[test]
    fn one_range_is_read_and_an_unsatisfiable_one_is_not() {
        assert_eq!(byte_range(None, 100), None);
        assert_eq!(byte_range(Some("bytes=0-9"), 100), Some((0, 10)));
        assert_eq!(byte_range(Some("bytes=90-"), 100), Some((90, 100)));
        assert_eq!(byte_range(Some("bytes=90-500"), 100), Some((90, 100)));
        assert_eq!(byte_range(Some("bytes=100-"), 100), None);
        assert_eq!(byte_range(Some("bytes=-5"), 100), None);
        assert_eq!(byte_range(Some("items=0-1"), 100), None);
    }
}
