//! The archive seam: where LTX files and snapshots are kept outside the cluster.
//!
//! A [`SnapshotSink`] stores LTX files per database and level, in the layout
//! Litestream 0.5 reads: level 0 holds each transaction's file, higher levels hold
//! compactions, level 9 holds snapshots. The primary ships files to it; restore and
//! bootstrap read them back. Implementations live in `backends/`;
//! `backends::build_sink` is the only code that picks one.
//!
//! # Contract
//!
//! - **Create-if-absent.** [`SnapshotSink::put`] never replaces an existing file: it
//!   fails with [`SinkError::AlreadyExists`] where the store can tell, so two nodes that
//!   both believe they are primary cannot overwrite each other's history. A file that
//!   exists is complete: writes are atomic (temp + rename, or a single/multipart PUT).
//! - **Nothing is trusted.** The sink stores and returns bytes; readers verify every
//!   LTX file before using it.
//! - **Errors.** [`SinkError::is_retryable`] tells whether the same call may succeed
//!   later (store down, timeouts). The node keeps unshipped files locally and retries
//!   with backoff; a sink outage never fails a commit.
//! - **Retries.** Implementations may retry a single request internally (object
//!   stores do), but do not loop for long: the node owns the backlog and its backoff.
//! - **Cancellation.** Dropping `put` leaves either no file or a complete one, never a
//!   partial file under the final name. Dropping a reader returned by `open` just
//!   stops the download. Dropping `delete` leaves the file present or gone.

use std::fmt::{self, Debug};
use std::path::Path;
use std::pin::Pin;
use std::time::SystemTime;

use async_trait::async_trait;
use tokio::io::AsyncRead;

/// Level of the snapshots, as in Litestream 0.5.
pub const SNAPSHOT_LEVEL: u8 = 9;
/// Highest compaction level (levels 1 to 8 hold compactions).
pub const MAX_COMPACTION_LEVEL: u8 = 8;

/// Names one archived LTX file: database, level and TXID range.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct LtxKey {
    /// Database name.
    pub db: String,
    /// 0 for per-transaction files, higher for compactions, 9 for snapshots.
    pub level: u8,
    /// First TXID in the file.
    pub min_txid: u64,
    /// Last TXID in the file.
    pub max_txid: u64,
}

impl LtxKey {
    /// File name in the Litestream layout: `%016x-%016x.ltx`.
    pub fn file_name(&self) -> String {
        format!("{:016x}-{:016x}.ltx", self.min_txid, self.max_txid)
    }
}

impl fmt::Display for LtxKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/ltx/{}/{}", self.db, self.level, self.file_name())
    }
}

/// An archived file as listed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LtxObject {
    /// Which file.
    pub key: LtxKey,
    /// Size in bytes.
    pub size: u64,
    /// When the store recorded it.
    pub last_modified: SystemTime,
}

/// A reader over one archived file.
pub type LtxReader = Pin<Box<dyn AsyncRead + Send>>;

/// An LTX archive. Held as `Arc<dyn SnapshotSink>`.
///
/// See the module documentation for the contract.
#[async_trait]
pub trait SnapshotSink: Debug + Send + Sync + 'static {
    /// Short name for logs and metrics (`"file"`, `"s3"`).
    fn type_name(&self) -> &'static str;

    /// Names the archive: sinks with the same location read and write the same objects
    /// (`file:///<absolute dir>`, `s3://<bucket>/<prefix>`). A replica tells its primary
    /// which archive it reads; the primary sends it there instead of sending a snapshot
    /// only when the location is its own.
    fn location(&self) -> String;

    /// Stores the local file at `path` under `key`, streaming it (snapshots can be
    /// large).
    ///
    /// # Errors
    /// [`SinkError::AlreadyExists`] if `key` is already stored; [`SinkError::Io`] if
    /// the local file cannot be read; [`SinkError::Store`] for the store's failures.
    async fn put(&self, key: &LtxKey, path: &Path) -> Result<LtxObject, SinkError>;

    /// Lists the files of `db` at `level`, sorted by `min_txid`.
    ///
    /// # Errors
    /// [`SinkError::Store`] if the listing fails.
    async fn list(&self, db: &str, level: u8) -> Result<Vec<LtxObject>, SinkError>;

    /// Names of the databases in the archive, sorted. A database whose files were all
    /// deleted may still be listed by a store with real directories.
    ///
    /// # Errors
    /// [`SinkError::Store`] if the listing fails.
    async fn databases(&self) -> Result<Vec<String>, SinkError>;

    /// Opens one file for reading.
    ///
    /// # Errors
    /// [`SinkError::NotFound`] if it is not stored; [`SinkError::Store`] otherwise.
    async fn open(&self, key: &LtxKey) -> Result<LtxReader, SinkError>;

    /// Deletes one file (retention). Deleting a missing file is not an error.
    ///
    /// # Errors
    /// [`SinkError::Store`] if the store fails.
    async fn delete(&self, key: &LtxKey) -> Result<(), SinkError>;

    /// Stores a small object of ours at `<db>/litefs/<name>` (`name` may contain `/`),
    /// outside the `ltx/` tree, so Litestream never sees it. Create-if-absent: returns
    /// `false`, leaving the stored bytes alone, when the object already exists.
    ///
    /// # Errors
    /// [`SinkError::Store`] if the store fails.
    async fn put_meta(&self, db: &str, name: &str, data: Vec<u8>) -> Result<bool, SinkError>;

    /// Deletes an object stored by [`SnapshotSink::put_meta`] (retention). Deleting a
    /// missing object is not an error.
    ///
    /// # Errors
    /// [`SinkError::Store`] if the store fails.
    async fn delete_meta(&self, db: &str, name: &str) -> Result<(), SinkError>;

    /// Names (relative to `<db>/litefs/<dir>/`) of the objects directly in that
    /// directory, sorted.
    ///
    /// # Errors
    /// [`SinkError::Store`] if the listing fails.
    async fn list_meta(&self, db: &str, dir: &str) -> Result<Vec<String>, SinkError>;

    /// Reads an object stored by [`SnapshotSink::put_meta`]; `None` if absent.
    ///
    /// # Errors
    /// [`SinkError::Store`] if the store fails.
    async fn get_meta(&self, db: &str, name: &str) -> Result<Option<Vec<u8>>, SinkError>;
}

/// Why an archive operation failed.
#[derive(Debug, thiserror::Error)]
pub enum SinkError {
    /// The file is already stored (create-if-absent refused the write).
    #[error("{backend}: {key} already exists")]
    AlreadyExists {
        /// Implementation name.
        backend: &'static str,
        /// The file.
        key: LtxKey,
    },
    /// The file is not stored.
    #[error("{backend}: {key} not found")]
    NotFound {
        /// Implementation name.
        backend: &'static str,
        /// The file.
        key: LtxKey,
    },
    /// A local file could not be read.
    #[error("{backend}: cannot read local file {path}")]
    Io {
        /// Implementation name.
        backend: &'static str,
        /// The local path.
        path: std::path::PathBuf,
        /// The I/O error.
        #[source]
        source: std::io::Error,
    },
    /// The store failed.
    #[error("{backend}: {operation} failed")]
    Store {
        /// Implementation name.
        backend: &'static str,
        /// What was being done (`"put 00..01-00..01.ltx"`, `"list db/ltx/0"`).
        operation: String,
        /// Whether the failure looks temporary (network, 5xx, throttling).
        retryable: bool,
        /// The underlying failure.
        #[source]
        source: Box<dyn std::error::Error + Send + Sync>,
    },
}

impl SinkError {
    /// Whether the same call may succeed later.
    pub fn is_retryable(&self) -> bool {
        match self {
            SinkError::Store { retryable, .. } => *retryable,
            SinkError::AlreadyExists { .. } | SinkError::NotFound { .. } | SinkError::Io { .. } => {
                false
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_use_the_litestream_file_names() {
        let key = LtxKey {
            db: "app.db".into(),
            level: 0,
            min_txid: 1,
            max_txid: 0x1f,
        };
        assert_eq!(key.file_name(), "0000000000000001-000000000000001f.ltx");
        assert_eq!(
            key.to_string(),
            "app.db/ltx/0/0000000000000001-000000000000001f.ltx"
        );
    }
}
