//! The replica's side of the store: the primary/replica flag, change notifications for
//! the primary's streams, and applying LTX files received from the primary.
//!
//! # Applying
//!
//! A received file is first verified completely and decoded once ([`Verified::verify`]):
//! every page, the file checksum, and each page's checksum computed on the way. Files up
//! to [`MEMORY_FILE_LIMIT`] arrive in memory and keep their decoded pages (up to
//! [`DECODED_LIMIT`]), so applying them reads nothing back; larger files (snapshots)
//! live in a temp file and are decoded a second time while their pages are written.
//! [`Store::apply_replicated`] then checks the file against the database's position and
//! computes the post-apply checksum from the in-memory page checksums (O(pages in the
//! file)), and only when it equals the file's does it write anything.
//!
//! Three kinds of files: a snapshot (min TXID 1) replaces everything; a file in another
//! page size than the database's (a `VACUUM` that changed `page_size` on the primary)
//! must follow the position and hold every page, and replaces the content; any other
//! file follows the position and overwrites the pages it holds.
//!
//! # Crash safety and durability
//!
//! Nothing is fsynced per applied file. Instead a marker file `replicating` in the
//! database's directory is made durable before the first page of a file is written and
//! stays until [`Store::sync_replicated`] has synced the file system (the replica loop
//! calls it when it stops, so also before an elected node turns primary; [`Store::close`]
//! calls it too). Each file is moved into `ltx/` *before* its pages are written. So a
//! start-up that finds the marker knows the database may hold any prefix of the writes
//! of the last LTX file: it re-writes that file's pages (idempotent) and checks the
//! checksum; if the database still does not match (a power loss lost unsynced writes),
//! the database starts empty and the primary sends a snapshot. Either way the replica
//! re-requests from a position its files really have.

use std::fs::{self, File, OpenOptions};
use std::io::{self, BufReader, Read};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::Ordering;

use tracing::{info, warn};

use crate::ltx::{self, Checksum, Decoder, Header, LtxError, Pos, RollingChecksum, Trailer};

use super::{Db, FileKind, Store, StoreError, ltxio};

/// Received files up to this size are kept in memory; larger ones go to a temp file.
pub const MEMORY_FILE_LIMIT: usize = 8 << 20;
/// Decoded pages of an in-memory file are kept up to this many bytes; a file that
/// decompresses to more is decoded again while its pages are written.
pub const DECODED_LIMIT: usize = 16 << 20;
/// Marker file: the database may hold unsynced writes of replicated files.
const MARKER: &str = "replicating";

/// What applying a received LTX file did.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Applied {
    /// The database's position afterwards.
    pub pos: Pos,
    /// The file had commit 0: the database was deleted.
    pub deleted: bool,
    /// A snapshot replaced a local history that was not a prefix of the primary's:
    /// the local position it discarded.
    pub discarded: Option<Pos>,
}

/// An LTX file received from the primary, not yet trusted.
#[derive(Debug)]
pub enum Received {
    /// The whole file, in memory.
    Memory(Vec<u8>),
    /// A temp file on the data directory's file system (moved into `ltx/` when applied).
    File(PathBuf),
}

/// A received LTX file that verified completely, with the checksum of each of its pages.
pub struct Verified {
    pub(super) header: Header,
    pub(super) trailer: Trailer,
    /// Every page number in the file, ascending, with its page checksum.
    pub(super) sums: Vec<(u32, Checksum)>,
    pub(super) body: Body,
}

impl std::fmt::Debug for Verified {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Verified")
            .field("header", &self.header)
            .field("pages", &self.sums.len())
            .finish_non_exhaustive()
    }
}

pub(super) enum Body {
    /// File bytes and the decoded pages, in `sums` order.
    Decoded { raw: Vec<u8>, pages: Vec<u8> },
    /// File bytes only (decoded again when written).
    Raw(Vec<u8>),
    /// A temp file (decoded again when written).
    File(PathBuf),
}

impl Verified {
    /// Verifies and decodes a received file for database `db` (every page, the file
    /// checksum; see the decoder's rules). A temp file that does not verify is removed.
    ///
    /// # Errors
    /// [`StoreError::Ltx`] for a file that does not verify; I/O errors.
    pub fn verify(db: &str, received: Received) -> Result<Verified, StoreError> {
        match received {
            Received::Memory(raw) => {
                let label = PathBuf::from(format!("<{db} from the primary>"));
                let (header, trailer, sums, pages) =
                    decode(&raw[..], true).map_err(|e| StoreError::ltx(db, &label, e))?;
                let body = match pages {
                    Some(pages) => Body::Decoded { raw, pages },
                    None => Body::Raw(raw),
                };
                Ok(Verified {
                    header,
                    trailer,
                    sums,
                    body,
                })
            }
            Received::File(path) => {
                let decoded = File::open(&path)
                    .map_err(|e| StoreError::io(db, "open received ltx", &path, e))
                    .and_then(|f| {
                        decode(BufReader::with_capacity(1 << 20, f), false)
                            .map_err(|e| StoreError::ltx(db, &path, e))
                    });
                match decoded {
                    Ok((header, trailer, sums, _)) => Ok(Verified {
                        header,
                        trailer,
                        sums,
                        body: Body::File(path),
                    }),
                    Err(e) => {
                        let _ = fs::remove_file(&path);
                        Err(e)
                    }
                }
            }
        }
    }

    /// Bytes of memory the file holds (its raw bytes and decoded pages).
    pub fn memory(&self) -> usize {
        match &self.body {
            Body::Decoded { raw, pages } => raw.len() + pages.len(),
            Body::Raw(raw) => raw.len(),
            Body::File(_) => 0,
        }
    }

    /// The file's header.
    pub fn header(&self) -> &Header {
        &self.header
    }

    /// The position the file leads to.
    pub fn pos(&self) -> Pos {
        Pos {
            txid: self.header.max_txid,
            post_apply_checksum: self.trailer.post_apply_checksum,
        }
    }

    /// Removes a temp file that will not be applied.
    pub(super) fn discard(self) {
        if let Body::File(p) = self.body {
            let _ = fs::remove_file(p);
        }
    }

    /// The file's size when it is held in memory.
    pub(super) fn raw_len(&self) -> Option<u64> {
        match &self.body {
            Body::Decoded { raw, .. } | Body::Raw(raw) => Some(raw.len() as u64),
            Body::File(_) => None,
        }
    }

    /// Puts the file's bytes at `dest` (not synced), in a spare file when one is ready.
    pub(super) fn keep(
        &self,
        db: &str,
        dest: &Path,
        spares: Option<&super::spare::Spares>,
    ) -> Result<(), StoreError> {
        match &self.body {
            Body::Decoded { raw, .. } | Body::Raw(raw) => {
                let tmp = dest.with_extension(format!("ltx{}", ltxio::TEMP_SUFFIX));
                super::spare::write_renamed(spares, &tmp, dest, raw)
                    .map_err(|e| StoreError::io(db, "keep ltx", dest, e))
            }
            Body::File(p) => {
                fs::rename(p, dest).map_err(|e| StoreError::io(db, "keep ltx", dest, e))
            }
        }
    }

    /// Calls `f` with every page, in order. `kept` is where [`Verified::keep`] put the
    /// file (read again for files not held in memory).
    pub(super) fn for_each_page(
        &self,
        db: &str,
        kept: &Path,
        mut f: impl FnMut(u32, &[u8]) -> io::Result<()>,
    ) -> Result<(), StoreError> {
        let ps = self.header.page_size as usize;
        let write_err = |e| StoreError::io(db, "write page", kept, e);
        let decoded = |r: &mut dyn Read, f: &mut dyn FnMut(u32, &[u8]) -> io::Result<()>| {
            let mut dec = Decoder::new(r).map_err(|e| StoreError::ltx(db, kept, e))?;
            let mut buf = vec![0u8; ps];
            while let Some(pgno) = dec
                .next_page(&mut buf)
                .map_err(|e| StoreError::ltx(db, kept, e))?
            {
                f(pgno, &buf).map_err(write_err)?;
            }
            dec.finish().map_err(|e| StoreError::ltx(db, kept, e))?;
            Ok(())
        };
        match &self.body {
            Body::Decoded { pages, .. } => {
                for (i, (pgno, _)) in self.sums.iter().enumerate() {
                    f(*pgno, &pages[i * ps..(i + 1) * ps]).map_err(write_err)?;
                }
                Ok(())
            }
            Body::Raw(raw) => decoded(&mut &raw[..], &mut f),
            Body::File(_) => {
                let file = File::open(kept).map_err(|e| StoreError::io(db, "open ltx", kept, e))?;
                decoded(&mut BufReader::with_capacity(1 << 20, file), &mut f)
            }
        }
    }
}

type Decoded = (Header, Trailer, Vec<(u32, Checksum)>, Option<Vec<u8>>);

/// Decodes a whole file, with every page's checksum; with `keep`, also the pages (up to
/// [`DECODED_LIMIT`] bytes, else `None`).
fn decode<R: Read>(r: R, keep: bool) -> Result<Decoded, LtxError> {
    let mut dec = Decoder::new(r)?;
    let header = dec.header().clone();
    let ps = header.page_size as usize;
    let mut sums = Vec::new();
    let mut pages = keep.then(Vec::new);
    let mut buf = vec![0u8; ps];
    loop {
        if pages.as_ref().is_some_and(|p| p.len() + ps > DECODED_LIMIT) {
            pages = None;
        }
        if let Some(p) = pages.as_mut() {
            let at = p.len();
            p.resize(at + ps, 0);
            match dec.next_page(&mut p[at..])? {
                Some(pgno) => sums.push((pgno, ltx::page_checksum(pgno, &p[at..]))),
                None => {
                    p.truncate(at);
                    break;
                }
            }
        } else {
            match dec.next_page(&mut buf)? {
                Some(pgno) => sums.push((pgno, ltx::page_checksum(pgno, &buf))),
                None => break,
            }
        }
    }
    let trailer = dec.finish()?;
    Ok((header, trailer, sums, pages))
}

impl Store {
    /// Makes this node a replica (`false`: the mount turns read-only and captures
    /// nothing new) or a primary again (`true`: HALT-lock forwarding stops, its writes
    /// are local).
    ///
    /// Demotion takes the [write gate](Store::write_gate) exclusively, so it returns
    /// only once every file-system operation that saw this node as the primary has
    /// finished, commit hook included. Transactions that began before it (see
    /// [`Store::writer_began`]) may still finish; [`Store::fence_writers`] ends that.
    /// Blocks the calling thread: call it off the async runtime's workers.
    pub fn set_primary(&self, primary: bool) {
        if primary {
            self.primary.store(true, Ordering::Release);
            // Its own writes are local now: nothing is forwarded any more.
            for db in self.databases() {
                db.set_forwarder(None);
            }
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
    /// later frames and its commit are accepted, new transactions are not); on a
    /// replica while it holds `db`'s HALT lock (its transactions are forwarded).
    pub fn may_write(&self, db: &str) -> bool {
        self.is_primary()
            || self.writers_of(db) > 0
            || self.db(db).is_some_and(|d| d.is_forwarding())
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

    /// Whether `owner`'s write transaction on `db`, begun while this node was the
    /// primary, is still open and not fenced.
    pub fn is_writer(&self, db: &str, owner: u64) -> bool {
        let w = self.writers.lock().unwrap_or_else(|p| p.into_inner());
        w.get(db).is_some_and(|s| s.contains(&owner))
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

    /// Applies a verified LTX file from the primary to database `name` (created if
    /// absent) and keeps the file in the database's `ltx/` directory.
    ///
    /// A snapshot replaces everything; any other file must follow the current position
    /// exactly (TXID and pre-apply checksum); a file in another page size than the
    /// database's must also hold every page. The post-apply checksum is computed from
    /// the in-memory page checksums and must equal the file's before anything is
    /// written. Commit 0 deletes the database. Not synced: see the module docs and
    /// [`Store::sync_replicated`]. The caller (the FUSE layer) holds the locks that
    /// keep local readers out while pages change.
    ///
    /// # Errors
    /// [`StoreError::Ltx`] for a file that does not follow or does not add up; I/O
    /// errors. On error nothing was written unless the error came from the disk while
    /// writing pages (then the next start-up or snapshot repairs it).
    pub fn apply_replicated(&self, name: &str, file: Verified) -> Result<Applied, StoreError> {
        let h = file.header.clone();
        if h.commit == 0 {
            let pos = file.pos();
            file.discard();
            self.remove_replicated(name)?;
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
        let ltx_dir = db.ltx_dir();
        let dest = ltx_dir.join(ltx::format_filename(h.min_txid, h.max_txid));
        let mut st = db.lock();
        let current = st.pos;
        if already_applied(&db, &st, &file) {
            // A transaction this node forwarded to the primary, coming back.
            file.discard();
            return Ok(Applied {
                pos: current,
                deleted: false,
                discarded: None,
            });
        }
        let plan = plan_apply(name, &st, &file, &dest)?;

        // Verified: write. Marker first, then the file into ltx/, then the pages.
        ensure_marker(&db)?;
        if h.is_snapshot() {
            for old in
                ltxio::list(&ltx_dir).map_err(|e| StoreError::io(name, "list ltx", &ltx_dir, e))?
            {
                if let Err(e) = fs::remove_file(&old.path) {
                    warn!(db = name, path = %old.path.display(), error = %e, "cannot remove an LTX file replaced by a snapshot");
                }
            }
        }
        file.keep(name, &dest, db.spares())?;
        write_pages(&db, &st, &file, &dest, plan.replace)?;
        match file.raw_len() {
            Some(len) => db.count_commit_bytes(len),
            None => db.count_commit(&dest),
        }
        let pos = commit_state(&db, &mut st, &file, plan);
        drop(st);
        db.notify_change();
        // Provably diverged: the local history reaches the snapshot's TXID (or beyond)
        // with other content. (A replica that was merely behind loses nothing.)
        let discarded =
            (h.is_snapshot() && current.txid.0 > 0 && current.txid >= pos.txid && current != pos)
                .then_some(current);
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

    /// Deletes database `name` on a replica (a deletion from the primary, or a database
    /// the primary does not have); nothing if it does not exist.
    ///
    /// # Errors
    /// As [`Store::delete_db`].
    pub fn remove_replicated(&self, name: &str) -> Result<(), StoreError> {
        if let Some(db) = self.db(name) {
            self.delete_db(name)?;
            remove_marker(db.dir());
        }
        Ok(())
    }

    /// Makes everything applied from the primary durable: one `syncfs` of the data
    /// directory's file system, then the `replicating` markers go. Called when the
    /// replica loop stops and by [`Store::close`].
    ///
    /// # Errors
    /// I/O errors (the markers then stay, and the next start-up checks the databases).
    pub fn sync_replicated(&self) -> Result<(), StoreError> {
        let dir_err = |e| StoreError::io("", "list data dir", &self.dbs_dir, e);
        let mut marked = Vec::new();
        for entry in fs::read_dir(&self.dbs_dir).map_err(dir_err)? {
            let m = entry.map_err(dir_err)?.path().join(MARKER);
            if m.exists() {
                marked.push(m);
            }
        }
        if marked.is_empty() {
            return Ok(());
        }
        let d = File::open(&self.dbs_dir).map_err(dir_err)?;
        super::ltxio::syncfs(&d)
            .map_err(|e| StoreError::io("", "sync data dir", &self.dbs_dir, e))?;
        for m in &marked {
            let _ = fs::remove_file(m);
        }
        info!(databases = marked.len(), "replicated changes synced");
        Ok(())
    }
}

/// How a verified file changes a database: whether it replaces the content, and the
/// checksum the database will have.
pub(super) struct Plan {
    pub replace: bool,
    pub rolling: RollingChecksum,
    pub post: Checksum,
}

/// Checks `file` against the database's state (a snapshot applies whatever the
/// position; any other file must follow it exactly; pages above the old size must
/// all be present) and computes the post-apply checksum from the in-memory page
/// checksums, which must equal the file's. Writes nothing.
pub(super) fn plan_apply(
    name: &str,
    st: &super::db::DbState,
    file: &Verified,
    dest: &Path,
) -> Result<Plan, StoreError> {
    let h = &file.header;
    let current = st.pos;
    let ps = h.page_size;
    let lock = ltx::lock_pgno(ps);
    let replace = h.is_snapshot() || st.page_size != Some(ps);
    let ltx_err = |e| StoreError::ltx(name, dest, e);
    if !h.is_snapshot() {
        if current.txid.0 == 0 || current.txid.0.checked_add(1) != Some(h.min_txid.0) {
            return Err(ltx_err(LtxError::TxidGap {
                current: current.txid,
                min_txid: h.min_txid,
            }));
        }
        if !h.no_checksum() && h.pre_apply_checksum != current.post_apply_checksum {
            return Err(ltx_err(LtxError::PosMismatch {
                current,
                pre_apply: h.pre_apply_pos(),
            }));
        }
    }
    // The checksum the database will have, and the pages it must gain.
    let old_commit = if replace { 0 } else { st.commit };
    let mut rolling = if replace {
        RollingChecksum::new()
    } else {
        RollingChecksum::from_checksum(current.post_apply_checksum)
    };
    let old = |p: u32| st.checksums.get(p as usize - 1).copied();
    let mut next_new = ltx_next(old_commit, lock);
    for &(p, c) in &file.sums {
        if p <= old_commit {
            if let Some(o) = old(p) {
                rolling.toggle(o);
            }
        } else {
            if p != next_new {
                return Err(ltx_err(LtxError::MissingPage {
                    expected: next_new,
                    found: p,
                }));
            }
            next_new = ltx_next(p, lock);
        }
        rolling.toggle(c);
    }
    if next_new <= h.commit {
        return Err(ltx_err(LtxError::MissingPage {
            expected: next_new,
            found: 0,
        }));
    }
    for p in h.commit.saturating_add(1)..=old_commit {
        if let Some(o) = old(p) {
            rolling.toggle(o);
        }
    }
    let post = rolling.value();
    if !h.no_checksum() && post != file.trailer.post_apply_checksum {
        return Err(ltx_err(LtxError::ChecksumMismatch {
            what: "post-apply",
            expected: file.trailer.post_apply_checksum,
            got: post,
        }));
    }
    Ok(Plan {
        replace,
        rolling,
        post,
    })
}

/// Writes the file's pages into the database file and truncates it to the file's
/// size (not synced). `kept` is where the file's bytes are (see [`Verified::keep`]).
pub(super) fn write_pages(
    db: &Db,
    st: &super::db::DbState,
    file: &Verified,
    kept: &Path,
    replace: bool,
) -> Result<File, StoreError> {
    let name = db.name();
    let h = &file.header;
    let ps = h.page_size;
    let db_path = db.path(FileKind::Database);
    let io_err = |op, e| StoreError::io(name, op, &db_path, e);
    let dbf = OpenOptions::new()
        .read(true)
        .write(true)
        .open(&db_path)
        .map_err(|e| io_err("open database", e))?;
    if replace && st.page_size.is_some_and(|p| p != ps) {
        dbf.set_len(0).map_err(|e| io_err("truncate database", e))?;
    }
    let ps64 = u64::from(ps);
    file.for_each_page(name, kept, |pgno, page| {
        dbf.write_all_at(page, u64::from(pgno - 1) * ps64)
    })?;
    // An unchanged size leaves the inode alone (ftruncate would still touch it).
    let size = u64::from(h.commit) * ps64;
    let len = dbf
        .metadata()
        .map_err(|e| io_err("stat database", e))?
        .len();
    if len != size {
        dbf.set_len(size)
            .map_err(|e| io_err("truncate database", e))?;
    }
    Ok(dbf)
}

/// Makes the in-memory state describe the database after `file` (planned by
/// [`plan_apply`]); returns the new position.
pub(super) fn commit_state(
    db: &Db,
    st: &mut super::db::DbState,
    file: &Verified,
    plan: Plan,
) -> Pos {
    let h = &file.header;
    let lock = ltx::lock_pgno(h.page_size);
    if plan.replace {
        st.checksums.clear();
    }
    st.checksums.resize(h.commit as usize, Checksum(0));
    for &(p, c) in &file.sums {
        st.checksums[p as usize - 1] = c;
    }
    if let Some(c) = st.checksums.get_mut(lock as usize - 1) {
        *c = Checksum(0);
    }
    let pos = Pos {
        txid: h.max_txid,
        post_apply_checksum: plan.post,
    };
    st.page_size = Some(h.page_size);
    st.commit = h.commit;
    st.rolling = plan.rolling;
    st.dirty.clear();
    st.all_dirty = false;
    st.wal = None;
    st.wal_present = false;
    db.set_pos(st, pos);
    pos
}

/// Whether the database already holds `file`: not a snapshot, at or below the current
/// TXID, and the local LTX file of the same TXIDs (or the current position) has the
/// same post-apply checksum. This is a transaction this node wrote under the HALT lock
/// and the primary now streams back.
pub(super) fn already_applied(db: &Db, st: &super::db::DbState, file: &Verified) -> bool {
    let h = &file.header;
    if h.is_snapshot() || h.max_txid > st.pos.txid || h.commit == 0 {
        return false;
    }
    let want = file.trailer.post_apply_checksum;
    if h.max_txid == st.pos.txid {
        return want == st.pos.post_apply_checksum;
    }
    let path = db
        .ltx_dir()
        .join(ltx::format_filename(h.min_txid, h.max_txid));
    ltxio::read_ltx_ends(db.name(), &path).is_ok_and(|(_, t)| t.post_apply_checksum == want)
}

/// The page after `p` that a database growing from `p` pages must hold next.
fn ltx_next(p: u32, lock: u32) -> u32 {
    let n = p.saturating_add(1);
    if n == lock { n.saturating_add(1) } else { n }
}

/// Makes the `replicating` marker of `db` durable, unless it already exists.
pub(super) fn ensure_marker(db: &Db) -> Result<(), StoreError> {
    let m = db.dir().join(MARKER);
    if m.exists() {
        return Ok(());
    }
    File::create(&m)
        .and_then(|f| f.sync_all())
        .and_then(|()| ltxio::fsync_dir(db.dir()))
        .map_err(|e| StoreError::io(db.name(), "create marker", &m, e))
}

pub(super) fn remove_marker(dir: &Path) {
    let _ = fs::remove_file(dir.join(MARKER));
}

/// Start-up of a database directory whose `replicating` marker is present (a crash
/// while applying files from the primary, before they were synced): brings the
/// database to its last LTX file by writing that file's pages again, or, if it still
/// does not match (writes lost), empties it so that the primary sends a snapshot.
/// Leaves no WAL or shm (a replica's database is the database file alone) and removes
/// the marker. Nothing to do without a marker.
pub(crate) fn finish_interrupted_apply(name: &str, dir: &Path) -> Result<(), StoreError> {
    let marker = dir.join(MARKER);
    if !marker.exists() {
        return Ok(());
    }
    let ltx_dir = dir.join("ltx");
    let db_path = dir.join("database");
    let files = ltxio::list(&ltx_dir).map_err(|e| StoreError::io(name, "list ltx", &ltx_dir, e))?;
    let redone = match files.last() {
        Some(f) => redo_last(name, &db_path, &f.path).unwrap_or_else(|e| {
            warn!(db = name, error = %e, "cannot re-apply the last LTX file");
            false
        }),
        None => false,
    };
    if redone {
        info!(
            db = name,
            "start-up after an interrupted apply: the database holds its last LTX file"
        );
    } else {
        warn!(
            db = name,
            "start-up after an interrupted apply: the database does not match its LTX files; \
             starting it empty, the primary will send a snapshot"
        );
        for f in &files {
            fs::remove_file(&f.path).map_err(|e| StoreError::io(name, "remove ltx", &f.path, e))?;
        }
        let f = OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .open(&db_path)
            .map_err(|e| StoreError::io(name, "truncate database", &db_path, e))?;
        f.sync_all()
            .map_err(|e| StoreError::io(name, "fsync database", &db_path, e))?;
    }
    for side in ["wal", "shm"] {
        match fs::remove_file(dir.join(side)) {
            Err(e) if e.kind() != io::ErrorKind::NotFound => {
                return Err(StoreError::io(name, "remove", dir.join(side), e));
            }
            _ => {}
        }
    }
    fs::remove_file(&marker)
        .and_then(|()| ltxio::fsync_dir(&ltx_dir))
        .and_then(|()| ltxio::fsync_dir(dir))
        .map_err(|e| StoreError::io(name, "remove marker", &marker, e))
}

/// Whether the database at `db_path` holds the LTX file at `ltx_path` after writing
/// its pages again if needed.
fn redo_last(name: &str, db_path: &Path, ltx_path: &Path) -> Result<bool, StoreError> {
    let (h, t) = ltxio::verify(name, ltx_path)?;
    if h.commit == 0 {
        // A deletion: the regular start-up finishes it.
        return Ok(true);
    }
    let matches = || -> bool {
        File::open(db_path)
            .and_then(|f| ltx::database_checksum(BufReader::with_capacity(1 << 20, f), h.page_size))
            .is_ok_and(|c| c == t.post_apply_checksum)
    };
    if h.no_checksum() || !db_path.exists() {
        return Ok(false);
    }
    if matches() {
        return Ok(true);
    }
    let f = OpenOptions::new()
        .read(true)
        .write(true)
        .open(db_path)
        .map_err(|e| StoreError::io(name, "open database", db_path, e))?;
    ltxio::rewrite_pages(name, &f, ltx_path)?;
    Ok(matches())
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ltx::TxId;
    use crate::store::testutil;
    use std::sync::Arc;

    const PS: u32 = 4096;

    /// Page `pgno` of a 3-page SQLite database, filled with `fill`.
    fn page(pgno: u32, fill: u8) -> Vec<u8> {
        testutil::page(PS, 3, pgno, fill)
    }

    /// An LTX file of TXID `txid` holding `pages` of a 3-page database, following the
    /// database `before` (page checksums), and the page checksums after it.
    fn file(txid: u64, before: &[Checksum], pages: &[(u32, Vec<u8>)]) -> (Vec<u8>, Vec<Checksum>) {
        testutil::ltx_file(txid, PS, 3, before, pages)
    }

    fn open(dir: &Path) -> Arc<Store> {
        testutil::replica_store(dir)
    }

    fn apply(s: &Store, bytes: Vec<u8>) -> Applied {
        testutil::apply(s, "t.db", bytes)
    }

    /// A replica store with two files applied and not synced: file 1 writes pages 1-3
    /// (page 2 = 0xAB), file 2 rewrites page 2 (0xCD); the marker is present.
    fn two_files_applied_unsynced() -> (tempfile::TempDir, Arc<Store>, std::path::PathBuf) {
        let dir = tempfile::tempdir().unwrap();
        let s = open(dir.path());
        let (f1, c1) = file(
            1,
            &[],
            &[(1, page(1, 0)), (2, page(2, 0xAB)), (3, page(3, 1))],
        );
        let (f2, _) = file(2, &c1, &[(2, page(2, 0xCD))]);
        apply(&s, f1);
        assert_eq!(apply(&s, f2).pos.txid, TxId(2));
        let db_dir = dir.path().join("dbs/t.db");
        assert!(db_dir.join(MARKER).exists());
        (dir, s, db_dir)
    }

    /// Overwrites bytes of the database file behind the store's back (a torn or lost write).
    fn write_db_at(db_dir: &Path, offset: u64, bytes: &[u8]) {
        OpenOptions::new()
            .write(true)
            .open(db_dir.join("database"))
            .unwrap()
            .write_all_at(bytes, offset)
            .unwrap();
    }

    /// Page `pgno` of the database file as it is on disk.
    fn read_page(db_dir: &Path, pgno: u32) -> Vec<u8> {
        let mut buf = vec![0u8; PS as usize];
        File::open(db_dir.join("database"))
            .unwrap()
            .read_exact_at(&mut buf, u64::from(pgno - 1) * u64::from(PS))
            .unwrap();
        buf
    }

    /// A replica with applied but unsynced files whose process died while it wrote the
    /// pages of its last file (page 2 torn): start-up writes that file again and opens
    /// at its TXID; marker gone.
    #[test]
    fn start_up_completes_a_torn_last_file() {
        let (dir, s, db_dir) = two_files_applied_unsynced();
        // Torn: half of page 2 still has the old content.
        write_db_at(&db_dir, u64::from(PS), &[0xAB; 2048]);
        drop(s);
        let s = open(dir.path());
        let db = s.db("t.db").unwrap();
        assert_eq!(db.pos().txid, TxId(2));
        db.verify().unwrap();
        assert!(!db_dir.join(MARKER).exists());
        assert_eq!(read_page(&db_dir, 2), page(2, 0xCD));
        s.close().unwrap();
    }

    /// Lost writes of an earlier file (page 3 differs and the last file does not hold
    /// it): start-up cannot trust the database and empties it, so the primary sends a
    /// snapshot; a later sync leaves no marker, and a synced replica reopens unchanged.
    #[test]
    fn start_up_empties_a_database_that_lost_writes() {
        let (dir, s, db_dir) = two_files_applied_unsynced();
        write_db_at(&db_dir, 2 * u64::from(PS), &[9; 16]);
        drop(s);
        let s = open(dir.path());
        let db = s.db("t.db").unwrap();
        assert_eq!(db.pos(), Pos::default());
        assert!(ltxio::list(&db_dir.join("ltx")).unwrap().is_empty());
        assert!(!db_dir.join(MARKER).exists());

        // Applied again and synced: no marker, the next start trusts the files.
        let (f1, _) = file(
            1,
            &[],
            &[(1, page(1, 0)), (2, page(2, 0xAB)), (3, page(3, 1))],
        );
        apply(&s, f1);
        assert!(db_dir.join(MARKER).exists());
        s.sync_replicated().unwrap();
        assert!(!db_dir.join(MARKER).exists());
        drop(s);
        assert_eq!(open(dir.path()).db("t.db").unwrap().pos().txid, TxId(1));
    }

    /// A primary with file 1 applied and synced, and file 2 (page 2 = 0xCD) as a
    /// replica would forward it.
    fn primary_with_forwarded_file() -> (tempfile::TempDir, Arc<Store>, Vec<u8>) {
        let dir = tempfile::tempdir().unwrap();
        let s = open(dir.path());
        s.set_primary(true);
        let (f1, c1) = file(
            1,
            &[],
            &[(1, page(1, 0)), (2, page(2, 0xAB)), (3, page(3, 1))],
        );
        let (f2, _) = file(2, &c1, &[(2, page(2, 0xCD))]);
        apply(&s, f1);
        s.sync_replicated().unwrap();
        (dir, s, f2)
    }

    fn verified(bytes: &[u8]) -> Verified {
        Verified::verify("t.db", Received::Memory(bytes.to_vec())).unwrap()
    }

    #[test]
    fn a_forwarded_file_is_committed_like_a_local_transaction() {
        let (dir, s, f2) = primary_with_forwarded_file();
        let pos = s.apply_forwarded("t.db", verified(&f2)).unwrap();
        assert_eq!(pos.txid, TxId(2));
        let db = s.db("t.db").unwrap();
        assert_eq!(db.pos(), pos);
        db.verify().unwrap();
        let db_dir = dir.path().join("dbs/t.db");
        assert!(!db_dir.join(MARKER).exists());
        assert!(db_dir.join(super::super::ltxlog::FILE_NAME).exists());
        assert_eq!(
            fs::read(
                db_dir
                    .join("ltx")
                    .join(ltx::format_filename(TxId(2), TxId(2)))
            )
            .unwrap(),
            f2
        );
        // The same file again is not at the next TXID: refused, nothing changes.
        assert!(matches!(
            s.apply_forwarded("t.db", verified(&f2)),
            Err(StoreError::Ltx { .. })
        ));
        assert_eq!(db.pos(), pos);
    }

    /// The primary died after the forwarded file reached the LTX log but before its
    /// pages reached the database: start-up writes them (the marker says so).
    #[test]
    fn a_crash_before_the_forwarded_pages_are_written_is_completed_at_start_up() {
        let (dir, s, f2) = primary_with_forwarded_file();
        let pos = s.apply_forwarded("t.db", verified(&f2)).unwrap();
        let db_dir = dir.path().join("dbs/t.db");
        write_db_at(&db_dir, u64::from(PS), &page(2, 0xAB));
        File::create(db_dir.join(MARKER)).unwrap();
        drop(s);
        let s = open(dir.path());
        let db = s.db("t.db").unwrap();
        assert_eq!(db.pos(), pos);
        db.verify().unwrap();
        assert_eq!(read_page(&db_dir, 2), page(2, 0xCD));
    }
}
