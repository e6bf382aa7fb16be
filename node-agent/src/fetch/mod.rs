//! Models from remote storage: where they come from ([`source`]), how their
//! files are listed and read ([`store`]; the Hugging Face hub's layout in
//! [`hf`]; all over this crate's own HTTP client, [`connector`]), and how
//! they land on disk ([`download`]).

pub mod connector;
pub mod download;
pub mod hf;
pub mod source;
pub mod store;

pub use download::{download, DownloadError, Options, RemoteFile};
pub use source::{Source, SourceError};
pub use store::{open, Access, StoreError};
