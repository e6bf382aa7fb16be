//! object_store's HTTP requests over this crate's own hyper client, with
//! rustls on ring: one TLS stack in the agent, no C crypto build.

use async_trait::async_trait;
use http_body_util::BodyExt;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::Client;
use object_store::client::{
    HttpClient, HttpError, HttpErrorKind, HttpRequest, HttpRequestBody, HttpResponse,
    HttpResponseBody, HttpService,
};
use object_store::ClientOptions;
use std::sync::Arc;
use std::time::Duration;

/// Makes object_store's HTTP clients. Connections time out after
/// `connect_timeout`, responses whose headers take longer than
/// `header_timeout`; both are retried by object_store.
#[derive(Debug, Clone)]
pub struct HyperConnector {
    pub connect_timeout: Duration,
    pub header_timeout: Duration,
}

impl Default for HyperConnector {
    fn default() -> Self {
        HyperConnector {
            connect_timeout: Duration::from_secs(10),
            header_timeout: Duration::from_secs(60),
        }
    }
}

impl object_store::client::HttpConnector for HyperConnector {
    fn connect(&self, options: &ClientOptions) -> object_store::Result<HttpClient> {
        let mut http = HttpConnector::new();
        http.enforce_http(false);
        http.set_connect_timeout(Some(self.connect_timeout));
        http.set_nodelay(true);
        let tls = hyper_rustls::HttpsConnectorBuilder::new()
            .with_provider_and_webpki_roots(Arc::new(rustls::crypto::ring::default_provider()))
            .map_err(|e| object_store::Error::Generic {
                store: "http",
                source: Box::new(e),
            })?
            .https_or_http()
            .enable_http1()
            .wrap_connector(http);
        let client = Client::builder(hyper_util::rt::TokioExecutor::new()).build(tls);
        Ok(HttpClient::new(HyperService {
            client,
            header_timeout: self.header_timeout,
            default_headers: options.get_default_headers().cloned().unwrap_or_default(),
        }))
    }
}

#[derive(Debug)]
struct HyperService {
    client: Client<hyper_rustls::HttpsConnector<HttpConnector>, HttpRequestBody>,
    header_timeout: Duration,
    /// Sent with every request that does not set them (a token, say).
    default_headers: http::HeaderMap,
}

/// Redirects followed for one request (the Hugging Face hub sends LFS files
/// to a CDN).
const MAX_REDIRECTS: usize = 10;

impl HyperService {
    async fn send(&self, req: HttpRequest) -> Result<HttpResponse, HttpError> {
        let response = tokio::time::timeout(self.header_timeout, self.client.request(req))
            .await
            .map_err(|e| HttpError::new(HttpErrorKind::Timeout, e))?
            .map_err(|e| {
                let kind = if e.is_connect() {
                    HttpErrorKind::Connect
                } else {
                    HttpErrorKind::Request
                };
                HttpError::new(kind, e)
            })?;
        let (parts, body) = response.into_parts();
        let body = body.map_err(|e| HttpError::new(HttpErrorKind::Interrupted, e));
        Ok(HttpResponse::from_parts(parts, HttpResponseBody::new(body)))
    }
}

/// A copy of a bodiless GET or HEAD, to send again to where a redirect points.
fn again(req: &HttpRequest) -> Option<HttpRequest> {
    if !matches!(*req.method(), http::Method::GET | http::Method::HEAD) || !req.body().is_empty() {
        return None;
    }
    let mut copy = http::Request::new(HttpRequestBody::empty());
    *copy.method_mut() = req.method().clone();
    *copy.uri_mut() = req.uri().clone();
    *copy.headers_mut() = req.headers().clone();
    *copy.version_mut() = req.version();
    Some(copy)
}

/// Where a `Location` header sends a request for `from`: an absolute URL, or
/// a path on the same server.
fn redirect_target(from: &http::Uri, location: &str) -> Option<http::Uri> {
    let to: http::Uri = location.parse().ok()?;
    if to.scheme().is_some() && to.authority().is_some() {
        return Some(to);
    }
    if !location.starts_with('/') {
        return None;
    }
    http::Uri::builder()
        .scheme(from.scheme()?.clone())
        .authority(from.authority()?.clone())
        .path_and_query(location)
        .build()
        .ok()
}

#[async_trait]
impl HttpService for HyperService {
    /// Sends the request, following redirects of GETs and HEADs; credentials
    /// are not sent on to another server.
    async fn call(&self, req: HttpRequest) -> Result<HttpResponse, HttpError> {
        let mut req = req;
        for (name, value) in &self.default_headers {
            if !req.headers().contains_key(name) {
                req.headers_mut().insert(name, value.clone());
            }
        }
        for _ in 0..MAX_REDIRECTS {
            let retry = again(&req);
            let from = req.uri().clone();
            let response = self.send(req).await?;
            let location = response
                .headers()
                .get(http::header::LOCATION)
                .and_then(|v| v.to_str().ok());
            let target = location.and_then(|l| redirect_target(&from, l));
            let (true, Some(mut next), Some(target)) =
                (response.status().is_redirection(), retry, target)
            else {
                return Ok(response);
            };
            if target.authority() != from.authority() {
                next.headers_mut().remove(http::header::AUTHORIZATION);
            }
            *next.uri_mut() = target;
            req = next;
        }
        Err(HttpError::new(
            HttpErrorKind::Request,
            std::io::Error::other(format!("more than {MAX_REDIRECTS} redirects")),
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn redirects_resolve_absolute_and_server_relative_locations() {
        let from: http::Uri = "https://huggingface.co/a/b/resolve/main/x".parse().unwrap();
        assert_eq!(
            redirect_target(&from, "https://cdn.example/obj?sig=1").unwrap(),
            "https://cdn.example/obj?sig=1"
        );
        assert_eq!(
            redirect_target(&from, "/api/resolve-cache/x").unwrap(),
            "https://huggingface.co/api/resolve-cache/x"
        );
        assert_eq!(redirect_target(&from, "relative/path"), None);
    }
}
