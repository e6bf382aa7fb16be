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
    fn connect(&self, _options: &ClientOptions) -> object_store::Result<HttpClient> {
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
        }))
    }
}

#[derive(Debug)]
struct HyperService {
    client: Client<hyper_rustls::HttpsConnector<HttpConnector>, HttpRequestBody>,
    header_timeout: Duration,
}

#[async_trait]
impl HttpService for HyperService {
    async fn call(&self, req: HttpRequest) -> Result<HttpResponse, HttpError> {
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
