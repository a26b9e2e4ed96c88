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
    /// nothing new) or a primary again.
    ///
    /// Demotion takes the [write gate](Store::write_gate) exclusively, so it returns
    /// only once every file-system operation that saw this node as the primary has
    /// finished, commit hook included. Transactions that began before it (see
    /// [`Store::writer_began`]) may still finish; [`Store::fence_writers`] ends that.
    /// Blocks the calling thread: call it off the async runtime's workers.
    pub fn set_primary(&self, primary: bool) {
        if primary {
            self.primary.store(true, Ordering::Release);
        } else {
            let _gate = self.write_gate.write().unwrap_or_else(|p| p.into_inner());
            self.primary.store(false, Ordering::Release);
        }
        self.notify_change();
    }

    /// The write gate, shared: every mutating file-system operation holds it from its
    /// "may I write" check ([`Store::may_write`]) to the end of its commit hook, so a
    /// demotion cannot fall between the two. Never take it twice on one thread (a
    /// waiting demotion would deadlock both).
    pub fn write_gate(&self) -> std::sync::RwLockReadGuard<'_, ()> {
        self.write_gate.read().unwrap_or_else(|p| p.into_inner())
    }

    /// Whether a write to `db` may go ahead: on the primary always; after a demotion
    /// only while a transaction that began on the primary is still open on it (its
    /// later frames and its commit are accepted, new transactions are not).
    pub fn may_write(&self, db: &str) -> bool {
        self.is_primary() || self.writers_of(db) > 0
    }

    /// Records that lock owner `owner` began a write transaction on `db` (took
    /// SQLite's writer lock) while this node was the primary. Call it under the
    /// write gate, after checking [`Store::is_primary`].
    pub fn writer_began(&self, db: &str, owner: u64) {
        let mut w = self.writers.lock().unwrap_or_else(|p| p.into_inner());
        w.entry(db.to_string()).or_default().insert(owner);
    }

    /// `owner`'s write transaction on `db` ended (writer lock released).
    pub fn writer_ended(&self, db: &str, owner: u64) {
        let mut w = self.writers.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(set) = w.get_mut(db) {
            set.remove(&owner);
            if set.is_empty() {
                w.remove(db);
                drop(w);
                // A stepping-down primary's streams end once no transaction is open.
                self.notify_change();
            }
        }
    }

    fn writers_of(&self, db: &str) -> usize {
        let w = self.writers.lock().unwrap_or_else(|p| p.into_inner());
        w.get(db).map_or(0, |s| s.len())
    }

    /// Write transactions open now that began while this node was the primary.
    pub fn writers_in_flight(&self) -> usize {
        let w = self.writers.lock().unwrap_or_else(|p| p.into_inner());
        w.values().map(|s| s.len()).sum()
    }

    /// After a demotion: transactions still open may not write any more (the node
    /// waited for them as long as its lease allowed). Takes the write gate, so no
    /// write that was let through is still running when it returns.
    pub fn fence_writers(&self) {
        let _gate = self.write_gate.write().unwrap_or_else(|p| p.into_inner());
        self.writers
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clear();
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

#[cfg(test)]
mod gate_tests {
    use std::sync::mpsc;
    use std::time::Duration;

    use super::*;

    fn store() -> (tempfile::TempDir, std::sync::Arc<Store>) {
        let d = tempfile::tempdir().unwrap();
        let s = Store::open(super::super::StoreOptions {
            data_dir: d.path().to_path_buf(),
            retention: Duration::from_secs(60),
            retention_monitor_interval: Duration::ZERO,
            node_id: 1,
        })
        .unwrap();
        (d, s)
    }

    #[test]
    fn demotion_waits_for_an_operation_holding_the_gate() {
        let (_d, s) = store();
        let gate = s.write_gate();
        assert!(s.may_write("db"));
        let (tx, rx) = mpsc::channel();
        let s2 = s.clone();
        let demoter = std::thread::spawn(move || {
            s2.set_primary(false);
            tx.send(()).unwrap();
        });
        assert!(
            rx.recv_timeout(Duration::from_millis(300)).is_err(),
            "set_primary(false) returned while an operation held the gate"
        );
        // The operation that saw the primary finishes as one.
        assert!(s.is_primary());
        drop(gate);
        rx.recv_timeout(Duration::from_secs(5))
            .expect("demotion finishes once the gate is free");
        demoter.join().unwrap();
        assert!(!s.is_primary() && !s.may_write("db"));
    }

    #[test]
    fn a_transaction_begun_on_the_primary_may_finish_until_fenced() {
        let (_d, s) = store();
        s.writer_began("db", 7);
        s.set_primary(false);
        assert!(s.may_write("db"), "the open transaction may commit");
        assert!(!s.may_write("other"), "no new transaction elsewhere");
        assert_eq!(s.writers_in_flight(), 1);
        s.writer_ended("db", 7);
        assert!(!s.may_write("db"));
        s.writer_began("db", 8);
        s.fence_writers();
        assert!(!s.may_write("db") && s.writers_in_flight() == 0);
    }
}
