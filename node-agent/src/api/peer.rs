//! The endpoint other agents copy a model from, so that a node that needs a
//! model a neighbour has does not download it from remote storage:
//! `GET /internal/v1/models/<model.path>/-/<file>` with HTTP ranges, and
//! `…/-/.listing.json` for the files and their sizes. Only agents holding the
//! cluster's peer token (`--peer-token-file`) may read; without a token the
//! endpoint does not exist.

use super::AppState;
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
    match tower_http::services::ServeFile::new(path)
        .oneshot(req)
        .await
    {
        Ok(r) => r.map(Body::new),
        Err(e) => status(StatusCode::INTERNAL_SERVER_ERROR, &e.to_string()),
    }
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
