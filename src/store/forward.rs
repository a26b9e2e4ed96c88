//! Write forwarding in the store (the HALT lock, see `crate::halt`).
//!
//! - On a replica holding a database's HALT lock, a [`Forwarder`] is set on the
//!   [`Db`]: each rollback-journal transaction captured there is sent to the primary
//!   *before* it becomes durable here or is acknowledged to SQLite (the capture runs
//!   in the hook of the operation that ends the transaction). If the primary refuses
//!   it, the transaction is rolled back from its journal, the journal is made
//!   non-hot, and the hook fails (SQLite reports an I/O error for the `COMMIT`): the
//!   replica never keeps a transaction the primary does not have. WAL transactions
//!   are refused.
//! - On the primary, [`Store::apply_forwarded`] applies such a file as its own
//!   commit: checked like a replicated file, made durable in the LTX log, then its
//!   pages written and fsynced. A `replicating` marker covers the moment in between:
//!   a crash there is completed at start-up by writing the last file's pages again.

use std::fs::{self, File, OpenOptions};
use std::os::unix::fs::FileExt;
use std::sync::Arc;

use tracing::{info, warn};

use super::db::DbState;
use super::ltxio::{self, Encoded};
use super::ltxlog::{LtxLog, RECORD_HEADER};
use super::replica::{Body, commit_state, ensure_marker, plan_apply, remove_marker, write_pages};
use super::{Db, FileKind, Store, StoreError, Verified, journal};
use crate::ltx::{self, Checksum, Header, Pos};

/// Where a replica sends a transaction captured under the HALT lock.
///
/// # Contract
/// `forward` blocks until the primary answered. `Ok` carries the primary's new
/// position, which must be the transaction's; any `Err` means the primary did not
/// apply it (the caller undoes the transaction locally).
pub trait Forwarder: Send + Sync + std::fmt::Debug {
    /// Sends one LTX file (one transaction) to the primary.
    fn forward(&self, db: &str, ltx: &[u8]) -> Result<Pos, String>;
}

impl Db {
    /// Sets (HALT lock taken) or clears (released) where this database's transactions
    /// are forwarded.
    pub fn set_forwarder(&self, f: Option<Arc<dyn Forwarder>>) {
        *self.forward.lock().unwrap_or_else(|p| p.into_inner()) = f;
    }

    /// Whether this replica holds the database's HALT lock (writes are allowed and
    /// forwarded).
    pub fn is_forwarding(&self) -> bool {
        self.forward
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .is_some()
    }

    /// Whether a rollback journal with a valid header exists: a rollback-mode write
    /// transaction is open, so its pages can be restored if the primary refuses it.
    pub fn journal_open(&self) -> bool {
        File::open(self.path(FileKind::Journal))
            .and_then(|j| journal::has_valid_header(&j))
            .unwrap_or(false)
    }

    /// Called by the capture with the encoded file, before it is made durable: with a
    /// forwarder set, sends it and waits for the primary; on refusal undoes the
    /// transaction and fails. Returns the file unchanged otherwise.
    pub(super) fn forward_capture(
        &self,
        st: &mut DbState,
        header: &Header,
        post: Checksum,
        enc: Encoded,
    ) -> Result<Encoded, StoreError> {
        let Some(fw) = self
            .forward
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
        else {
            return Ok(enc);
        };
        let want = Pos {
            txid: header.max_txid,
            post_apply_checksum: post,
        };
        let bytes = match &enc {
            Encoded::Record(r) => Ok(std::borrow::Cow::Borrowed(&r[RECORD_HEADER..])),
            Encoded::File(tmp, _) => fs::read(tmp)
                .map(std::borrow::Cow::Owned)
                .map_err(|e| e.to_string()),
        };
        let sent = bytes
            .and_then(|b| fw.forward(self.name(), &b))
            .and_then(|p| {
                if p == want {
                    Ok(())
                } else {
                    Err(format!("the primary reached {p}, not {want}"))
                }
            });
        match sent {
            Ok(()) => {
                info!(db = self.name(), pos = %want, "transaction forwarded to the primary");
                Ok(enc)
            }
            Err(reason) => {
                if let Encoded::File(tmp, _) = &enc {
                    let _ = fs::remove_file(tmp);
                }
                warn!(db = self.name(), pos = %want, reason, "the primary did not take the transaction: rolling it back");
                self.undo_transaction(st)?;
                Err(StoreError::Forward {
                    db: self.name().to_string(),
                    reason: format!(
                        "the primary did not apply the transaction (rolled back here): {reason}"
                    ),
                })
            }
        }
    }

    /// Rolls the open transaction back from its journal, then zeroes the journal's
    /// header so nobody rolls it back again.
    fn undo_transaction(&self, st: &mut DbState) -> Result<(), StoreError> {
        let jpath = self.path(FileKind::Journal);
        let dpath = self.path(FileKind::Database);
        let j = OpenOptions::new()
            .read(true)
            .write(true)
            .open(&jpath)
            .map_err(|e| StoreError::io(self.name(), "open journal", &jpath, e))?;
        let dbf = OpenOptions::new()
            .write(true)
            .open(&dpath)
            .map_err(|e| StoreError::io(self.name(), "open database", &dpath, e))?;
        journal::rollback(&j, &dbf)
            .and_then(|_| dbf.sync_all())
            .map_err(|e| StoreError::io(self.name(), "roll back journal", &jpath, e))?;
        j.write_all_at(&[0u8; journal::HEADER_LEN], 0)
            .and_then(|()| j.sync_all())
            .map_err(|e| StoreError::io(self.name(), "zero journal header", &jpath, e))?;
        st.dirty.clear();
        st.all_dirty = false;
        Ok(())
    }

    /// A WAL transaction cannot be forwarded: refused while forwarding.
    pub(super) fn refuse_forwarded_wal(&self) -> Result<(), StoreError> {
        if self.is_forwarding() {
            return Err(StoreError::Forward {
                db: self.name().to_string(),
                reason: "write forwarding supports rollback-journal databases only, \
                         not WAL mode"
                    .into(),
            });
        }
        Ok(())
    }
}

impl Store {
    /// Applies, on the primary, one transaction a replica wrote under the HALT lock:
    /// it must follow the current position exactly (TXID + 1, pre-apply checksum) and
    /// its post-apply checksum must add up. The file is made durable in the LTX log
    /// first, then its pages are written and fsynced; it then is part of the history
    /// like a local commit (streams are woken). The caller keeps local writers and
    /// readers out (the FUSE layer's locks).
    ///
    /// # Errors
    /// [`StoreError::Ltx`] for a file that does not follow or add up,
    /// [`StoreError::Forward`] for what is not forwarded (WAL mode, deletions, files
    /// without checksums), I/O errors.
    pub fn apply_forwarded(&self, name: &str, file: Verified) -> Result<Pos, StoreError> {
        let db = self.db(name).ok_or_else(|| StoreError::NotFound {
            name: name.to_string(),
        })?;
        let h = file.header.clone();
        let refuse = |reason: &str| StoreError::Forward {
            db: name.to_string(),
            reason: reason.to_string(),
        };
        if h.commit == 0 {
            return Err(refuse("deleting a database is not forwarded"));
        }
        if h.no_checksum() {
            return Err(refuse("a forwarded file must carry checksums"));
        }
        let raw = match &file.body {
            Body::Decoded { raw, .. } | Body::Raw(raw) => raw,
            Body::File(_) => return Err(refuse("a forwarded file must be in memory")),
        };
        let ltx_dir = db.ltx_dir();
        let dest = ltx_dir.join(ltx::format_filename(h.min_txid, h.max_txid));
        let mut st = db.usable()?;
        if st.wal_present || wal_mode(&db) {
            return Err(refuse(
                "the database is in WAL mode; write forwarding supports rollback-journal \
                 databases only",
            ));
        }
        let plan = plan_apply(name, &st, &file, &dest)?;
        ensure_marker(&db)?;
        let enc = if LtxLog::fits(raw.len()) {
            let mut r = vec![0u8; RECORD_HEADER];
            r.extend_from_slice(raw);
            Encoded::Record(r)
        } else {
            let tmp = ltx_dir.join(format!(
                "{}{}",
                ltx::format_filename(h.min_txid, h.max_txid),
                ltxio::TEMP_SUFFIX
            ));
            let f = fs::write(&tmp, raw)
                .and_then(|()| File::open(&tmp))
                .map_err(|e| StoreError::io(name, "write ltx", &tmp, e))?;
            Encoded::File(tmp, f)
        };
        let len = db.persist(&mut st, &h, enc)?;
        let dbf = write_pages(&db, &st, &file, &dest, plan.replace)?;
        dbf.sync_all()
            .map_err(|e| StoreError::io(name, "fsync database", db.path(FileKind::Database), e))?;
        remove_marker(db.dir());
        db.count_commit_bytes(len);
        let pos = commit_state(&db, &mut st, &file, plan);
        drop(st);
        db.notify_change();
        Ok(pos)
    }

    /// Whether `name` already holds `file` (a transaction this replica forwarded,
    /// streamed back by the primary).
    pub fn already_applied(&self, name: &str, file: &Verified) -> bool {
        self.db(name)
            .is_some_and(|db| super::replica::already_applied(&db, &db.lock(), file))
    }
}

/// Whether the database file's header says WAL mode (read and write versions 2).
pub fn wal_mode(db: &Db) -> bool {
    let mut b = [0u8; 2];
    File::open(db.path(FileKind::Database))
        .and_then(|f| f.read_exact_at(&mut b, 18))
        .is_ok_and(|()| b == [2, 2])
}
