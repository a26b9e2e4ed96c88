//! The store's error type: every variant names the database (where there is one) and
//! keeps the underlying cause as its `source`.

use std::io;
use std::path::PathBuf;

use crate::ltx::{Checksum, LtxError, TxId};

/// What can go wrong in the store. The FUSE layer maps every variant to EIO.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// An I/O operation on a file of the data directory failed.
    #[error("database {db:?}: {op} {path}: {source}")]
    Io {
        /// Database name ("" for data-directory level operations).
        db: String,
        /// What the store was doing, e.g. "read page", "fsync ltx".
        op: &'static str,
        /// The file or directory involved.
        path: PathBuf,
        /// The underlying error.
        #[source]
        source: io::Error,
    },
    /// Encoding, decoding or verifying an LTX file failed.
    #[error("database {db:?}: ltx file {path}: {source}")]
    Ltx {
        /// Database name.
        db: String,
        /// The LTX file.
        path: PathBuf,
        /// The LTX library's error.
        #[source]
        source: LtxError,
    },
    /// The database file and the LTX history disagree at start-up. Never repaired silently.
    #[error(
        "database {db:?}: database checksum {database} does not match the post-apply checksum \
         {ltx} of its last LTX file (TXID {txid}); the data directory needs attention"
    )]
    ChecksumMismatch {
        /// Database name.
        db: String,
        /// TXID of the last LTX file.
        txid: TxId,
        /// The post-apply checksum recorded in the last LTX file.
        ltx: Checksum,
        /// The checksum computed from the database file (and its WAL).
        database: Checksum,
    },
    /// The LTX history says the database exists, but its file is missing.
    #[error(
        "database {db:?}: database file {path} is missing but LTX files up to TXID {txid} exist"
    )]
    MissingDatabase {
        /// Database name.
        db: String,
        /// The file that should exist.
        path: PathBuf,
        /// TXID of the last LTX file.
        txid: TxId,
    },
    /// The first page of the database does not hold a usable SQLite header.
    #[error("database {db:?}: invalid SQLite header: {reason}")]
    InvalidDatabaseHeader {
        /// Database name.
        db: String,
        /// What is wrong.
        reason: String,
    },
    /// The WAL disagrees with the database in a way SQLite never produces.
    #[error("database {db:?}: invalid WAL: {reason}")]
    InvalidWal {
        /// Database name.
        db: String,
        /// What is wrong.
        reason: String,
    },
    /// A write would change WAL bytes that were already captured into an LTX file (same
    /// WAL generation, below the capture cursor). The history and the WAL would disagree:
    /// the node must stop (exit 99).
    #[error(
        "database {db:?}: a write at WAL offset {offset} would change frames already captured \
         (up to offset {captured}); stopping"
    )]
    CapturedWalRewrite {
        /// Database name.
        db: String,
        /// Offset of the write.
        offset: u64,
        /// End of the captured frames.
        captured: u64,
    },
    /// A name that cannot be a database name (empty, a side-file suffix, a leading dot, a slash).
    #[error("invalid database name {name:?}")]
    InvalidName {
        /// The rejected name.
        name: String,
    },
    /// No database of that name exists.
    #[error("database {name:?} does not exist")]
    NotFound {
        /// The name asked for.
        name: String,
    },
    /// The database was deleted; its handle can no longer be used.
    #[error("database {db:?} has been deleted")]
    Deleted {
        /// Database name.
        db: String,
    },
    /// Write forwarding (the HALT lock) refused or failed: the transaction was not
    /// applied (on a replica it was rolled back).
    #[error("database {db:?}: write forwarding: {reason}")]
    Forward {
        /// Database name.
        db: String,
        /// What happened.
        reason: String,
    },
    /// The store was closed (clean shutdown); no more changes are accepted.
    #[error("database {db:?}: the store is closed")]
    Closed {
        /// Database name.
        db: String,
    },
}

impl StoreError {
    pub(crate) fn io(
        db: &str,
        op: &'static str,
        path: impl Into<PathBuf>,
        source: io::Error,
    ) -> Self {
        StoreError::Io {
            db: db.to_string(),
            op,
            path: path.into(),
            source,
        }
    }

    pub(crate) fn ltx(db: &str, path: impl Into<PathBuf>, source: LtxError) -> Self {
        StoreError::Ltx {
            db: db.to_string(),
            path: path.into(),
            source,
        }
    }
}
