//! A source opened: the object store its files are read from, and the list
//! of files that make up the model.

use super::connector::HyperConnector;
use super::download::RemoteFile;
use futures::TryStreamExt;
use modelcache_crds::Source;
use object_store::aws::AmazonS3Builder;
use object_store::http::HttpBuilder;
use object_store::path::Path as ObjectPath;
use object_store::{ClientOptions, ObjectStore, ObjectStoreExt, RetryConfig};
use std::fmt;
use std::sync::Arc;
use std::time::Duration;

/// How to reach a source: its endpoint and region, and credentials (from a
/// Secret or the agent's environment). Never printed: `Debug` hides the keys.
#[derive(Clone, Default)]
pub struct Access {
    /// An S3-compatible endpoint (MinIO, SeaweedFS, R2…; default AWS), or a
    /// Hugging Face hub (default `https://huggingface.co`).
    pub endpoint: Option<String>,
    pub region: Option<String>,
    pub access_key_id: Option<String>,
    pub secret_access_key: Option<String>,
    /// A Hugging Face token.
    pub token: Option<String>,
}

impl fmt::Debug for Access {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let set = |v: &Option<String>| if v.is_some() { "set" } else { "unset" };
        f.debug_struct("Access")
            .field("endpoint", &self.endpoint)
            .field("region", &self.region)
            .field("access_key_id", &set(&self.access_key_id))
            .field("secret_access_key", &set(&self.secret_access_key))
            .field("token", &set(&self.token))
            .finish()
    }
}

/// Why a source could not be listed.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("{source_url}: {message}")]
    Open { source_url: String, message: String },
    #[error("{0}: nothing to download there")]
    Empty(String),
}

/// The default Hugging Face hub.
pub const HF_ENDPOINT: &str = "https://huggingface.co";

/// A few retries inside object_store for each request; the downloader
/// resumes on top of them.
fn retry() -> RetryConfig {
    RetryConfig {
        max_retries: 3,
        retry_timeout: Duration::from_secs(60),
        ..Default::default()
    }
}

/// Opens `source` and lists the files of the model there.
pub async fn open(
    source: &Source,
    access: &Access,
) -> Result<(Arc<dyn ObjectStore>, Vec<RemoteFile>), StoreError> {
    let failed = |e: &dyn fmt::Display| StoreError::Open {
        source_url: source.to_string(),
        message: e.to_string(),
    };
    match source {
        Source::S3 { bucket, prefix } => {
            // The environment's AWS_* settings first; the deployment's win.
            let mut b = AmazonS3Builder::from_env()
                .with_bucket_name(bucket)
                .with_http_connector(HyperConnector::default())
                .with_retry(retry());
            if let Some(e) = &access.endpoint {
                b = b.with_endpoint(e).with_allow_http(e.starts_with("http://"));
            }
            if let Some(r) = &access.region {
                b = b.with_region(r);
            }
            if let (Some(id), Some(secret)) = (&access.access_key_id, &access.secret_access_key) {
                b = b.with_access_key_id(id).with_secret_access_key(secret);
            }
            let store: Arc<dyn ObjectStore> = Arc::new(b.build().map_err(|e| failed(&e))?);
            let files = list_s3(store.as_ref(), prefix)
                .await
                .map_err(|e| failed(&e))?;
            if files.is_empty() {
                return Err(StoreError::Empty(source.to_string()));
            }
            Ok((store, files))
        }
        Source::Http { url } => {
            let path = url.split(['?', '#']).next().unwrap_or(url);
            let (base, name) = path.rsplit_once('/').unwrap_or((path, ""));
            let store = HttpBuilder::new()
                .with_url(base)
                .with_http_connector(HyperConnector::default())
                .with_retry(retry())
                .build()
                .map_err(|e| failed(&e))?;
            let location = ObjectPath::from(name);
            let meta = store.head(&location).await.map_err(|e| failed(&e))?;
            Ok((
                Arc::new(store),
                vec![RemoteFile {
                    location,
                    name: name.to_string(),
                    size: meta.size,
                    version: meta.e_tag,
                    sha256: None,
                }],
            ))
        }
        Source::Hf {
            repo,
            revision,
            subfolder,
        } => {
            let endpoint = access
                .endpoint
                .as_deref()
                .unwrap_or(HF_ENDPOINT)
                .trim_end_matches('/');
            let mut headers = http::HeaderMap::new();
            if let Some(token) = &access.token {
                let mut v = http::HeaderValue::from_str(&format!("Bearer {token}"))
                    .map_err(|_| failed(&"the token is not a valid header value"))?;
                v.set_sensitive(true);
                headers.insert(http::header::AUTHORIZATION, v);
            }
            let options = ClientOptions::new()
                .with_default_headers(headers)
                .with_allow_http(endpoint.starts_with("http://"));
            let entries = super::hf::list(endpoint, repo, revision, subfolder, &options)
                .await
                .map_err(|e| failed(&e))?;
            let files = super::hf::model_files(&entries, subfolder);
            if files.is_empty() {
                return Err(StoreError::Empty(source.to_string()));
            }
            let store = HttpBuilder::new()
                .with_url(format!("{endpoint}/{repo}/resolve/{revision}"))
                .with_client_options(options)
                .with_http_connector(HyperConnector::default())
                .with_retry(retry())
                .build()
                .map_err(|e| failed(&e))?;
            Ok((Arc::new(store), files))
        }
    }
}

/// The objects of an S3 source: the one object named `prefix`, or every
/// object under `prefix/`, named by their path below it.
async fn list_s3(
    store: &dyn ObjectStore,
    prefix: &str,
) -> Result<Vec<RemoteFile>, object_store::Error> {
    let file = |location: ObjectPath, name: String, meta: &object_store::ObjectMeta| RemoteFile {
        location,
        name,
        size: meta.size,
        version: meta.e_tag.clone(),
        sha256: None,
    };
    if !prefix.is_empty() {
        match store.head(&ObjectPath::from(prefix)).await {
            Ok(meta) => {
                let name = prefix.rsplit('/').next().unwrap_or(prefix).to_string();
                return Ok(vec![file(meta.location.clone(), name, &meta)]);
            }
            Err(object_store::Error::NotFound { .. }) => {}
            Err(e) => return Err(e),
        }
    }
    let root = (!prefix.is_empty()).then(|| ObjectPath::from(prefix));
    let listed: Vec<object_store::ObjectMeta> = store.list(root.as_ref()).try_collect().await?;
    let mut files: Vec<RemoteFile> = listed
        .into_iter()
        .filter_map(|meta| {
            let full = meta.location.as_ref();
            let name = match prefix {
                "" => full,
                p => full.strip_prefix(p)?.strip_prefix('/')?,
            };
            (!name.is_empty()).then(|| file(meta.location.clone(), name.to_string(), &meta))
        })
        .collect();
    files.sort_by(|a, b| a.name.cmp(&b.name));
    Ok(files)
}
