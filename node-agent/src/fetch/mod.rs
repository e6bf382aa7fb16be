//! Models from remote storage: where they come from (a [`Source`], parsed
//! where the resources are defined), how their files are listed and read ([`store`]; the Hugging Face hub's layout in
//! [`hf`]; all over this crate's own HTTP client, [`connector`]), and how
//! they land on disk ([`download`]), under a budget ([`disk`]), one
//! download per model at a time ([`fetcher`]), from a neighbour that has
//! the model when one does ([`peer`]).

pub mod connector;
pub mod disk;
pub mod download;
pub mod fetcher;
pub mod hf;
pub mod peer;
pub mod store;

pub use download::{download, DownloadError, Options, RemoteFile};
pub use fetcher::{normalize, FetchError, FetchMetrics, Fetched, Fetcher};
pub use modelcache_crds::{Source, SourceError};
pub use store::{open, Access, StoreError};
