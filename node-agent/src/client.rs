//! The HTTP client of `modelcache-agent request` (the chart's `helm test`):
//! hyper's, plain `http://` only, so the image carries no TLS stack for an
//! in-cluster call.

use http_body_util::{BodyExt, Full, Limited};
use hyper::body::Bytes;
use hyper::header::{AUTHORIZATION, CONTENT_TYPE};
use hyper::{Method, Request, Uri};
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;
use std::time::Duration;

/// A generation on a cold model can take minutes.
const TIMEOUT: Duration = Duration::from_secs(600);
/// Four 2048×2048 PNGs in base64 fit with room to spare.
const MAX_REPLY_BYTES: usize = 256 << 20;

#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error("{0:?} is not an http://HOST:PORT URL")]
    Url(String),
    #[error("{url}: {source}")]
    Request {
        url: Uri,
        source: hyper_util::client::legacy::Error,
    },
    #[error("{url}: reading the reply: {message}")]
    Reply { url: Uri, message: String },
    #[error("{url}: no reply within {} s", TIMEOUT.as_secs())]
    Timeout { url: Uri },
}

/// POSTs `body` as JSON to `base` + `path`; returns the status and the body.
pub async fn post_json(
    base: &str,
    path: &str,
    body: &serde_json::Value,
    token: Option<&str>,
) -> Result<(u16, Vec<u8>), ClientError> {
    let bad = || ClientError::Url(base.to_string());
    let base_uri: Uri = base.parse().map_err(|_| bad())?;
    if base_uri.scheme_str() != Some("http")
        || base_uri.authority().is_none()
        || !matches!(base_uri.path(), "" | "/")
    {
        return Err(bad());
    }
    let url: Uri = format!("{}{path}", base.trim_end_matches('/'))
        .parse()
        .map_err(|_| bad())?;
    let mut req = Request::builder()
        .method(Method::POST)
        .uri(url.clone())
        .header(CONTENT_TYPE, "application/json");
    if let Some(t) = token {
        req = req.header(AUTHORIZATION, format!("Bearer {t}"));
    }
    let req = req
        .body(Full::new(Bytes::from(body.to_string())))
        .map_err(|_| bad())?;
    let client = Client::builder(TokioExecutor::new()).build_http();
    let exchange = async {
        let reply = client
            .request(req)
            .await
            .map_err(|source| ClientError::Request {
                url: url.clone(),
                source,
            })?;
        let status = reply.status().as_u16();
        let bytes = Limited::new(reply.into_body(), MAX_REPLY_BYTES)
            .collect()
            .await
            .map_err(|e| ClientError::Reply {
                url: url.clone(),
                message: e.to_string(),
            })?
            .to_bytes();
        Ok((status, bytes.to_vec()))
    };
    tokio::time::timeout(TIMEOUT, exchange)
        .await
        .map_err(|_| ClientError::Timeout { url: url.clone() })?
}

#[cfg(test)]
mod tests {
    use super::*;
    use axum::http::HeaderMap;
    use axum::routing::post;

    #[tokio::test]
    async fn posts_json_with_the_token_and_reads_the_reply() {
        let app = axum::Router::new().route(
            "/echo",
            post(|headers: HeaderMap, body: String| async move {
                let auth = headers
                    .get("authorization")
                    .and_then(|v| v.to_str().ok())
                    .unwrap_or_default()
                    .to_string();
                (axum::http::StatusCode::ACCEPTED, format!("{auth}|{body}"))
            }),
        );
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let server = tokio::spawn(async move { axum::serve(listener, app).await });
        let (status, body) = post_json(
            &format!("http://{addr}"),
            "/echo",
            &serde_json::json!({"a": 1}),
            Some("t0k"),
        )
        .await
        .unwrap();
        server.abort();
        assert_eq!(status, 202);
        assert_eq!(String::from_utf8(body).unwrap(), "Bearer t0k|{\"a\":1}");
    }

    #[tokio::test]
    async fn only_plain_http_urls() {
        let body = serde_json::json!({});
        for bad in ["https://x:1", "x:1", "http://", "http://a/b", "not a url"] {
            assert!(
                matches!(
                    post_json(bad, "/", &body, None).await,
                    Err(ClientError::Url(_))
                ),
                "{bad}"
            );
        }
    }

    #[tokio::test]
    async fn a_closed_port_is_a_request_error_naming_the_url() {
        // Bind and drop a listener: nothing listens on that port any more.
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let e = post_json(
            &format!("http://127.0.0.1:{port}"),
            "/x",
            &serde_json::json!({}),
            None,
        )
        .await
        .unwrap_err();
        assert!(matches!(e, ClientError::Request { .. }), "{e}");
        assert!(
            e.to_string().contains(&format!("127.0.0.1:{port}/x")),
            "{e}"
        );
    }
}
