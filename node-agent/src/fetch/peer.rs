//! Copying a model from another agent that has it (its internal endpoint,
//! served by `api::peer`): the neighbour's files listed, then read with
//! ranged requests like any other store, authenticated with the cluster's
//! peer token.

use super::connector::HyperConnector;
use super::download::RemoteFile;
use object_store::http::HttpBuilder;
use object_store::path::Path as ObjectPath;
use object_store::{ClientOptions, ObjectStore, ObjectStoreExt, RetryConfig};
use serde::{Deserialize, Serialize};
use std::sync::Arc;
use std::time::Duration;

/// Where an agent serves its models' files: `<PREFIX>/<model.path>/-/<file>`.
pub const PREFIX: &str = "/internal/v1/models";
/// The file name the listing is served under (hidden: never a model file).
pub const LISTING: &str = ".listing.json";
/// Longest wait for a neighbour's listing before the source is used instead.
pub const LIST_TIMEOUT: Duration = Duration::from_secs(5);

/// One file of a model as a neighbour lists it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PeerFile {
    /// Its path inside the model's folder.
    pub name: String,
    pub size: u64,
}

/// A neighbour that has a model: its node name and API address (`ip:port`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Peer {
    pub node: String,
    pub endpoint: String,
}

/// Why a neighbour could not be used (the source is tried next).
#[derive(Debug, thiserror::Error)]
pub enum PeerError {
    #[error("node {node}: {message}")]
    Failed { node: String, message: String },
    #[error("node {0} did not list its files within {LIST_TIMEOUT:?}")]
    Timeout(String),
}

/// Opens `model` on `peer` and lists its files.
pub async fn open(
    peer: &Peer,
    model: &str,
    token: &str,
) -> Result<(Arc<dyn ObjectStore>, Vec<RemoteFile>), PeerError> {
    let failed = |e: &dyn std::fmt::Display| PeerError::Failed {
        node: peer.node.clone(),
        message: e.to_string(),
    };
    let mut auth = http::HeaderValue::from_str(&format!("Bearer {token}"))
        .map_err(|_| failed(&"the peer token is not a valid header value"))?;
    auth.set_sensitive(true);
    let headers = http::HeaderMap::from_iter([(http::header::AUTHORIZATION, auth)]);
    let options = ClientOptions::new()
        .with_default_headers(headers)
        .with_allow_http(true)
        .with_connect_timeout(Duration::from_secs(2));
    let store = HttpBuilder::new()
        .with_url(format!("http://{}{PREFIX}/{model}/-", peer.endpoint))
        .with_client_options(options)
        .with_http_connector(HyperConnector::default())
        // A neighbour that fails is replaced by the source, not retried long.
        .with_retry(RetryConfig {
            max_retries: 1,
            retry_timeout: Duration::from_secs(5),
            ..Default::default()
        })
        .build()
        .map_err(|e| failed(&e))?;
    let listing = async {
        let bytes = store
            .get(&ObjectPath::from(LISTING))
            .await
            .map_err(|e| failed(&e))?
            .bytes()
            .await
            .map_err(|e| failed(&e))?;
        serde_json::from_slice::<Vec<PeerFile>>(&bytes).map_err(|e| failed(&e))
    };
    let listed = tokio::time::timeout(LIST_TIMEOUT, listing)
        .await
        .map_err(|_| PeerError::Timeout(peer.node.clone()))??;
    if listed.is_empty() {
        return Err(failed(&"it lists no files"));
    }
    let files = listed
        .into_iter()
        .map(|f| RemoteFile {
            location: ObjectPath::from(f.name.as_str()),
            name: f.name,
            size: f.size,
            version: None,
            sha256: None,
        })
        .collect();
    Ok((Arc::new(store), files))
}
