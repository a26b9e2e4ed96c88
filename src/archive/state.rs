//! What the archiver reports to `/info`, `/metrics` and `litefs status`.

use std::collections::BTreeMap;
use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, Ordering};

use serde::{Deserialize, Serialize};

use crate::ltx::TxId;

/// The archiver's state, shared with the HTTP layer.
#[derive(Debug)]
pub struct ArchiveState {
    sink: &'static str,
    active: AtomicBool,
    dbs: Mutex<BTreeMap<String, ArchiveDbState>>,
}

/// One database's archive state.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ArchiveDbState {
    /// Newest TXID in the archive, 16 hex digits.
    pub txid: String,
    /// Local LTX files not yet in the archive.
    pub backlog_files: u64,
    /// Age in milliseconds of the oldest local LTX file not yet in the archive (0: none).
    pub lag_ms: u64,
}

/// The archive part of `/info`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ArchiveInfo {
    /// Sink type (`file`, `s3`).
    pub sink: String,
    /// Whether this node ships (it is the primary).
    pub active: bool,
    /// Per database, by name.
    pub databases: BTreeMap<String, ArchiveDbState>,
}

impl ArchiveState {
    /// State of an archiver writing to a sink of type `sink`, not active yet.
    pub fn new(sink: &'static str) -> ArchiveState {
        ArchiveState {
            sink,
            active: AtomicBool::new(false),
            dbs: Mutex::new(BTreeMap::new()),
        }
    }

    pub(crate) fn set_active(&self, on: bool) {
        self.active.store(on, Ordering::Relaxed);
    }

    /// Whether this node is shipping.
    pub fn active(&self) -> bool {
        self.active.load(Ordering::Relaxed)
    }

    /// Newest archived TXID of `db`, if known.
    pub fn txid(&self, db: &str) -> Option<TxId> {
        self.lock().get(db).and_then(|s| s.txid.parse().ok())
    }

    pub(crate) fn set_txid(&self, db: &str, txid: TxId) {
        self.lock().entry(db.to_string()).or_default().txid = txid.to_string();
    }

    pub(crate) fn set_backlog(&self, db: &str, files: u64, lag_ms: u64) {
        let mut dbs = self.lock();
        let st = dbs.entry(db.to_string()).or_default();
        st.backlog_files = files;
        st.lag_ms = lag_ms;
    }

    /// A copy for `/info`.
    pub fn info(&self) -> ArchiveInfo {
        ArchiveInfo {
            sink: self.sink.to_string(),
            active: self.active(),
            databases: self.lock().clone(),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, BTreeMap<String, ArchiveDbState>> {
        self.dbs.lock().unwrap_or_else(|p| p.into_inner())
    }
}
