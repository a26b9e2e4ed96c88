//! The replica's side of the store: the primary/replica flag, change notifications for
//! the primary's streams, and applying LTX files received from the primary.

use std::fs::{self, OpenOptions};
use std::io;
use std::path::Path;
use std::sync::atomic::Ordering;

use tracing::warn;

use crate::ltx::{self, ApplyCheck, Decoder, Pos, RollingChecksum};

use super::{FileKind, Store, StoreError, ltxio};

/// What applying a received LTX file did.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Applied {
    /// The database's position afterwards.
    pub pos: Pos,
    /// The file had commit 0: the database was deleted.
    pub deleted: bool,
    /// A snapshot replaced a local history that was not a prefix of the primary's:
    /// the local position it discarded.
    pub discarded: Option<Pos>,
}

impl Store {
    /// Makes this node a replica (`false`: the mount turns read-only and captures
    /// nothing) or a primary again.
    pub fn set_primary(&self, primary: bool) {
        self.primary.store(primary, Ordering::Release);
        self.notify_change();
    }

    /// A receiver that sees a new value after every commit, creation and deletion.
    pub fn subscribe_changes(&self) -> tokio::sync::watch::Receiver<u64> {
        self.changes.subscribe()
    }

    pub(crate) fn notify_change(&self) {
        self.changes.send_modify(|n| *n = n.wrapping_add(1));
    }

    /// Applies an LTX file received from the primary to database `name` (created if
    /// absent), then moves the file into the database's `ltx/` directory.
    ///
    /// The file is verified completely (every page, the file checksum) before any page
    /// is written; an incremental file must follow the current position exactly (TXID
    /// and pre-apply checksum); a snapshot replaces everything. Commit 0 deletes the
    /// database. The caller (the FUSE layer) holds the locks that keep local readers
    /// out while pages change.
    ///
    /// # Errors
    /// [`StoreError::Ltx`] for a file that does not verify or does not follow; I/O
    /// errors. On error nothing was written unless the error came from the disk while
    /// writing pages (then the next snapshot repairs it).
    pub fn apply_replicated(&self, name: &str, ltx_path: &Path) -> Result<Applied, StoreError> {
        let (header, trailer) =
            ltx::verify_path(ltx_path).map_err(|e| StoreError::ltx(name, ltx_path, e))?;
        if header.commit == 0 {
            let pos = Pos {
                txid: header.max_txid,
                post_apply_checksum: trailer.post_apply_checksum,
            };
            if self.db(name).is_some() {
                self.delete_db(name)?;
            }
            let _ = fs::remove_file(ltx_path);
            return Ok(Applied {
                pos,
                deleted: true,
                discarded: None,
            });
        }
        let db = match self.db(name) {
            Some(db) => db,
            None => self.create_db(name)?,
        };
        let mut st = db.lock();
        let current = st.pos;
        let snapshot = header.is_snapshot();
        let db_path = db.path(FileKind::Database);
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .open(&db_path)
            .map_err(|e| StoreError::io(name, "open database", &db_path, e))?;
        let io_err = |op, e| StoreError::io(name, op, &db_path, e);
        if snapshot && st.page_size != Some(header.page_size) {
            // Verified above: only now may the old content go.
            file.set_len(0)
                .map_err(|e| io_err("truncate database", e))?;
        }
        let check_from = if snapshot || current.txid.0 == 0 {
            None
        } else {
            Some(current)
        };
        let pos = ltx::apply_file_with(&file, check_from, ltx_path, ApplyCheck::Incremental)
            .map_err(|e| StoreError::ltx(name, ltx_path, e))?;
        db.count_commit(ltx_path);
        // Page checksums: from the whole file after a snapshot, else from the pages the
        // file wrote.
        let ps = header.page_size;
        if snapshot || st.page_size != Some(ps) {
            let f = fs::File::open(&db_path).map_err(|e| io_err("open database", e))?;
            st.checksums = ltx::page_checksums(io::BufReader::with_capacity(1 << 20, f), ps)
                .map_err(|e| io_err("checksum database", e))?;
        } else {
            let lf = fs::File::open(ltx_path).map_err(|e| io_err("open ltx", e))?;
            let mut dec = Decoder::new(io::BufReader::new(lf))
                .map_err(|e| StoreError::ltx(name, ltx_path, e))?;
            let mut buf = vec![0u8; ps as usize];
            st.checksums
                .resize(header.commit as usize, ltx::Checksum(0));
            while let Some(pgno) = dec
                .next_page(&mut buf)
                .map_err(|e| StoreError::ltx(name, ltx_path, e))?
            {
                st.checksums[pgno as usize - 1] = ltx::page_checksum(pgno, &buf);
            }
        }
        st.checksums
            .resize(header.commit as usize, ltx::Checksum(0));
        let lock = ltx::lock_pgno(ps);
        if let Some(c) = st.checksums.get_mut(lock as usize - 1) {
            *c = ltx::Checksum(0);
        }
        st.page_size = Some(ps);
        st.commit = header.commit;
        st.rolling = RollingChecksum::from_checksum(pos.post_apply_checksum);
        st.dirty.clear();
        st.all_dirty = false;
        st.wal = None;
        st.wal_present = false;
        st.pos = pos;
        // Provably diverged: the local history reaches the snapshot's TXID (or beyond)
        // with other content. (A replica that was merely behind loses nothing.)
        let discarded =
            (snapshot && current.txid.0 > 0 && current.txid >= pos.txid && current != pos)
                .then_some(current);
        // Keep the file as this node's history (a replica may become primary).
        let ltx_dir = db.ltx_dir();
        if snapshot {
            for old in ltxio::list(&ltx_dir).map_err(|e| io_err("list ltx", e))? {
                if let Err(e) = fs::remove_file(&old.path) {
                    warn!(db = name, path = %old.path.display(), error = %e, "cannot remove an LTX file replaced by a snapshot");
                }
            }
        }
        let dest = ltx_dir.join(ltx::format_filename(header.min_txid, header.max_txid));
        fs::rename(ltx_path, &dest).map_err(|e| StoreError::io(name, "keep ltx", &dest, e))?;
        ltxio::fsync_dir(&ltx_dir).map_err(|e| io_err("fsync ltx dir", e))?;
        drop(st);
        db.notify_change();
        if let Some(d) = discarded {
            warn!(
                db = name,
                local = %d,
                snapshot = %pos,
                discarded_txids = %format!("{}..={}", if d.txid > pos.txid { pos.txid.0 + 1 } else { d.txid.0 }, d.txid.0),
                "diverged from the primary: local transactions discarded, replaced by its snapshot"
            );
        }
        Ok(Applied {
            pos,
            deleted: false,
            discarded,
        })
    }
}
