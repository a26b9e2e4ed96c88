//! One database: its files, its position, the in-memory page checksums, and the hooks
//! through which the FUSE layer reports SQLite's file operations.

use std::collections::BTreeSet;
use std::fs::{self, File};
use std::io;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Mutex, MutexGuard, mpsc};

use tracing::{debug, info, warn};

use crate::ltx::{self, CHECKSUM_FLAG, Checksum, Header, Pos, RollingChecksum, TxId};

use super::ltxio::{self, Encoded, PendingLtx};
use super::ltxlog::LtxLog;
use super::wal::{self, WalChecksum, WalHeader, WalTxn};
use super::{FileKind, StoreError, journal};

/// Page size used for a commit-0 LTX of a database that never had a header.
const DEFAULT_PAGE_SIZE: u32 = 4096;
/// Above this many dirty pages a truncation marks the whole database for re-checking
/// instead of listing every page.
const MAX_TRACKED_TRUNCATED_PAGES: u32 = 1 << 20;

/// Where the WAL has been captured up to.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct WalCursor {
    pub salt1: u32,
    pub salt2: u32,
    /// Offset just past the last captured commit frame (32 when none yet).
    pub offset: u64,
    /// Running WAL checksum at `offset`.
    pub checksum: WalChecksum,
}

/// Mutable per-database state, guarded by [`Db`]'s mutex.
pub(crate) struct DbState {
    pub pos: Pos,
    /// `None` until the database has a SQLite header.
    pub page_size: Option<u32>,
    /// Logical size in pages (database file plus committed WAL frames).
    pub commit: u32,
    /// Page checksums of the logical database, index pgno-1; the lock page's slot is 0.
    pub checksums: Vec<Checksum>,
    pub rolling: RollingChecksum,
    /// Pages written to the database file since the last capture.
    pub dirty: BTreeSet<u32>,
    /// Every page must be re-checked (page size unknown when written, or huge truncation).
    pub all_dirty: bool,
    pub wal: Option<WalCursor>,
    /// The WAL holds (or may hold) frames: database writes are checkpoint copies.
    pub wal_present: bool,
    /// Page size of the WAL's frames, learnt from its header.
    pub wal_page_size: Option<u32>,
    /// End of the highest WAL write (or the WAL's size when first seen).
    pub wal_end: u64,
    /// Offset of the frame whose header was last written with a non-zero commit field:
    /// the write that completes it ends a transaction.
    pub commit_frame: Option<u64>,
    pub deleted: bool,
    pub closed: bool,
    /// The LTX append log, opened at the first commit.
    pub log: Option<LtxLog>,
}

impl std::fmt::Debug for DbState {
    // Summarised: the page checksums of a large database would flood any log line.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DbState")
            .field("pos", &self.pos)
            .field("page_size", &self.page_size)
            .field("commit", &self.commit)
            .field("dirty_pages", &self.dirty.len())
            .field("all_dirty", &self.all_dirty)
            .field("wal", &self.wal)
            .field("wal_present", &self.wal_present)
            .field("deleted", &self.deleted)
            .field("closed", &self.closed)
            .finish_non_exhaustive()
    }
}

impl DbState {
    pub(crate) fn empty(pos: Pos) -> DbState {
        DbState {
            pos,
            page_size: None,
            commit: 0,
            checksums: Vec::new(),
            rolling: RollingChecksum::new(),
            dirty: BTreeSet::new(),
            all_dirty: false,
            wal: None,
            wal_present: false,
            wal_page_size: None,
            wal_end: 0,
            commit_frame: None,
            deleted: false,
            closed: false,
            log: None,
        }
    }
}

/// A database in the store. Shared as `Arc<Db>`; internally synchronized, so hooks may be
/// called from any thread. Hooks of different databases never block each other.
#[derive(Debug)]
pub struct Db {
    name: String,
    dir: PathBuf,
    node_id: u64,
    /// `strict-verify`: re-hash the whole database after every capture.
    strict: AtomicBool,
    /// Named LTX files written so far (their records are in the log)...
    named_written: AtomicU64,
    /// ...and how many of them the last `syncfs` made durable.
    named_synced: AtomicU64,
    /// The `ltx/` directory, open since before the first named file was written, so
    /// `syncfs` on it reports any writeback error since (see `sync_ltx_files`), and the
    /// device of its file system.
    ltx_dir_file: std::sync::OnceLock<(File, u64)>,
    /// Held while named files are being synced, so a log restart can wait for it.
    syncing: Mutex<()>,
    /// A sync of named LTX files failed: the log must not restart (see `sync_ltx_files`).
    sync_failed: AtomicBool,
    /// The sync thread was asked to sync this database and has not started yet.
    sync_queued: AtomicBool,
    /// The store's spare files, taken for named LTX files (see `spare.rs`).
    spares: std::sync::OnceLock<std::sync::Arc<super::spare::Spares>>,
    /// Asks the store's sync thread to fsync `unsynced` (by database name).
    syncer: Mutex<Option<mpsc::Sender<Option<String>>>>,
    pub(crate) state: Mutex<DbState>,
    /// A copy of `state.pos`, set with it ([`Db::set_pos`]): [`Db::pos`] reads it without
    /// waiting for the state lock, which a commit holds through its device flush.
    pos: Mutex<Pos>,
    /// The store's change counter, bumped after the position changes.
    changes: std::sync::OnceLock<std::sync::Arc<tokio::sync::watch::Sender<u64>>>,
    /// Counters for `/metrics`.
    counters: Counters,
    /// Writes and truncations of the database file so far.
    db_changes: std::sync::atomic::AtomicU64,
    /// `db_changes` as it was before the last fsync of the database file that succeeded.
    db_synced: std::sync::atomic::AtomicU64,
    /// Set on a replica while it holds the HALT lock: every captured transaction is
    /// sent to the primary before it counts (see `forward.rs`).
    pub(super) forward: Mutex<Option<std::sync::Arc<dyn super::Forwarder>>>,
}

#[derive(Debug, Default)]
struct Counters {
    commits: std::sync::atomic::AtomicU64,
    ltx_files: std::sync::atomic::AtomicU64,
    ltx_bytes: std::sync::atomic::AtomicU64,
}

/// What a database has done since the store was opened (for `/metrics`).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct DbStats {
    /// Transactions captured (primary) or applied (replica).
    pub commits: u64,
    /// LTX files written.
    pub ltx_files: u64,
    /// Bytes of those LTX files.
    pub ltx_bytes: u64,
}

/// Page changes of one capture, before they are made visible in the state.
struct Capture {
    page_size: u32,
    commit: u32,
    changes: Vec<(u32, Checksum)>,
    rolling: RollingChecksum,
}

impl Db {
    pub(crate) fn new(name: String, dir: PathBuf, node_id: u64, state: DbState) -> Db {
        Db {
            name,
            dir,
            node_id,
            strict: AtomicBool::new(false),
            named_written: AtomicU64::new(0),
            named_synced: AtomicU64::new(0),
            ltx_dir_file: std::sync::OnceLock::new(),
            spares: std::sync::OnceLock::new(),
            syncing: Mutex::new(()),
            sync_failed: AtomicBool::new(false),
            sync_queued: AtomicBool::new(false),
            syncer: Mutex::new(None),
            pos: Mutex::new(state.pos),
            state: Mutex::new(state),
            changes: std::sync::OnceLock::new(),
            counters: Counters::default(),
            // 1: the first capture fsyncs whatever was written before the store opened.
            db_changes: std::sync::atomic::AtomicU64::new(1),
            db_synced: std::sync::atomic::AtomicU64::new(0),
            forward: Mutex::new(None),
        }
    }

    /// Counters since the store was opened.
    pub fn stats(&self) -> DbStats {
        DbStats {
            commits: self.counters.commits.load(Ordering::Relaxed),
            ltx_files: self.counters.ltx_files.load(Ordering::Relaxed),
            ltx_bytes: self.counters.ltx_bytes.load(Ordering::Relaxed),
        }
    }

    /// Counts one committed transaction and the LTX file written for it.
    pub(crate) fn count_commit(&self, ltx: &Path) {
        self.count_commit_bytes(fs::metadata(ltx).map_or(0, |m| m.len()));
    }

    pub(crate) fn count_commit_bytes(&self, len: u64) {
        self.counters.commits.fetch_add(1, Ordering::Relaxed);
        self.counters.ltx_files.fetch_add(1, Ordering::Relaxed);
        self.counters.ltx_bytes.fetch_add(len, Ordering::Relaxed);
    }

    pub(crate) fn set_spares(&self, spares: std::sync::Arc<super::spare::Spares>) {
        let _ = self.spares.set(spares);
    }

    /// The store's spare files, once the database is registered with the store.
    pub(crate) fn spares(&self) -> Option<&super::spare::Spares> {
        self.spares.get().map(|s| &**s)
    }

    pub(crate) fn set_changes(&self, tx: std::sync::Arc<tokio::sync::watch::Sender<u64>>) {
        let _ = self.changes.set(tx);
    }

    /// Wakes whoever waits for a change (the primary's replication streams).
    pub(crate) fn notify_change(&self) {
        if let Some(tx) = self.changes.get() {
            tx.send_modify(|n| *n = n.wrapping_add(1));
        }
    }

    /// The database name (the file name in the mount).
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The database's directory in the data directory.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// The directory holding its LTX files.
    pub fn ltx_dir(&self) -> PathBuf {
        self.dir.join("ltx")
    }

    /// The real file in the data directory for a file of this database.
    pub fn path(&self, kind: FileKind) -> PathBuf {
        self.dir.join(match kind {
            FileKind::Database => "database",
            FileKind::Journal => "journal",
            FileKind::Wal => "wal",
            FileKind::Shm => "shm",
        })
    }

    /// Current position: TXID of the last LTX file and the database checksum after it.
    /// `(0, 0)` for a database that never committed.
    pub fn pos(&self) -> Pos {
        *self.pos.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Sets the position; `st` is this database's state, locked.
    pub(crate) fn set_pos(&self, st: &mut DbState, pos: Pos) {
        st.pos = pos;
        *self.pos.lock().unwrap_or_else(|p| p.into_inner()) = pos;
    }

    /// Whether the database file was written since the last capture. When it was not,
    /// ending a transaction through its journal (unlink, truncation, zeroed header)
    /// captures nothing: a node that is not the primary lets a transaction fenced at
    /// its demotion discard its journal, instead of leaving a hot journal behind.
    pub fn has_uncaptured_writes(&self) -> bool {
        let st = self.lock();
        st.all_dirty || !st.dirty.is_empty()
    }

    /// Page size from the SQLite header; `None` before the first commit.
    pub fn page_size(&self) -> Option<u32> {
        self.lock().page_size
    }

    /// Logical size of the database in pages (file plus committed WAL frames).
    pub fn commit(&self) -> u32 {
        self.lock().commit
    }

    pub(crate) fn set_syncer(&self, tx: mpsc::Sender<Option<String>>) {
        *self.syncer.lock().unwrap_or_else(|p| p.into_inner()) = Some(tx);
    }

    pub(crate) fn clear_syncer(&self) {
        *self.syncer.lock().unwrap_or_else(|p| p.into_inner()) = None;
    }

    /// For the sync thread: clears the request (files written from now on ask again)
    /// and returns how many named files a sync starting now must cover.
    pub(crate) fn take_sync_request(&self) -> u64 {
        self.sync_queued.store(false, Ordering::Release);
        self.named_written.load(Ordering::Acquire)
    }

    /// Makes the named LTX files written so far durable, with their directory entries:
    /// one `syncfs` of the data file system (one device flush, however many files).
    /// Called before the log starts a new run and at close. After a failed sync
    /// `sync_failed` is set: a later sync may report success without the data having
    /// reached the disk, so the log keeps the records for good (every later restart of
    /// the log fails, and with it the commit).
    pub(crate) fn sync_ltx_files(&self) -> Result<(), StoreError> {
        let written = self.named_written.load(Ordering::Acquire);
        self.sync_ltx_files_upto(written, &mut Vec::new())
    }

    /// Makes the first `written` named files durable. `synced` lists the devices whose
    /// file system was synced after those files were written (by the sync thread's
    /// round, for another database): no second `syncfs` is needed there; a device
    /// synced here is added to it.
    pub(crate) fn sync_ltx_files_upto(
        &self,
        written: u64,
        synced: &mut Vec<u64>,
    ) -> Result<(), StoreError> {
        let _batch = self.syncing.lock().unwrap_or_else(|p| p.into_inner());
        let dir = self.ltx_dir();
        if self.sync_failed.load(Ordering::Acquire) {
            return Err(StoreError::io(
                &self.name,
                "sync ltx",
                dir,
                io::Error::other("an earlier sync of LTX files failed"),
            ));
        }
        if written <= self.named_synced.load(Ordering::Acquire) {
            return Ok(());
        }
        // Not under a lock the commit path takes: a sync can last many milliseconds.
        if let Some((d, dev)) = self.ltx_dir_file.get()
            && !synced.contains(dev)
        {
            if let Err(e) = ltxio::syncfs(d) {
                self.sync_failed.store(true, Ordering::Release);
                return Err(StoreError::io(&self.name, "sync ltx", dir, e));
            }
            synced.push(*dev);
        }
        self.named_synced.fetch_max(written, Ordering::AcqRel);
        Ok(())
    }

    /// Makes an encoded LTX file durable and visible under its name: appended to the
    /// log (the durability point) and written under its name without an fsync, or, when
    /// too large for the log, written durably under its name. Returns its size.
    pub(super) fn persist(
        &self,
        st: &mut DbState,
        header: &Header,
        enc: Encoded,
    ) -> Result<u64, StoreError> {
        let dir = self.ltx_dir();
        let mut record = match enc {
            Encoded::Record(r) => r,
            Encoded::File(tmp, f) => {
                self.restart_log(st)?;
                let len = f.metadata().map_or(0, |m| m.len());
                ltxio::commit_file(&dir, &tmp, &f, header)
                    .map_err(|e| e.into_store_error(&self.name))?;
                return Ok(len);
            }
        };
        let len = record.len() - super::ltxlog::RECORD_HEADER;
        if st.log.is_none() {
            let log = LtxLog::open(&self.dir)
                .map_err(|e| StoreError::io(&self.name, "open ltx log", &self.dir, e))?;
            st.log = Some(log);
        }
        if !st
            .log
            .as_ref()
            .is_some_and(|l| l.can_append(header.min_txid, len))
        {
            self.restart_log(st)?;
        }
        let log_err = |e| {
            StoreError::io(
                &self.name,
                "append ltx log",
                self.dir.join(super::ltxlog::FILE_NAME),
                e,
            )
        };
        match st.log.as_mut() {
            // The encoder spills a file too large for the log, so it always fits.
            Some(log) if log.can_append(header.min_txid, len) => {
                log.append(header.max_txid, &mut record).map_err(log_err)?
            }
            _ => return Err(log_err(io::Error::other("LTX record larger than the log"))),
        }
        if self.ltx_dir_file.get().is_none() {
            use std::os::unix::fs::MetadataExt;
            let d = File::open(&dir)
                .and_then(|d| {
                    let dev = d.metadata()?.dev();
                    Ok((d, dev))
                })
                .map_err(|e| StoreError::io(&self.name, "open ltx dir", &dir, e))?;
            let _ = self.ltx_dir_file.set(d);
        }
        ltxio::write_named(
            &dir,
            header,
            &record[super::ltxlog::RECORD_HEADER..],
            self.spares(),
        )
        .map_err(|e| e.into_store_error(&self.name))?;
        self.named_written.fetch_add(1, Ordering::AcqRel);
        // One request per batch: waking the sync thread at every commit cost a context
        // switch each.
        if !self.sync_queued.swap(true, Ordering::AcqRel)
            && let Some(tx) = self
                .syncer
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .as_ref()
        {
            let _ = tx.send(Some(self.name.clone()));
        }
        Ok(len as u64)
    }

    /// Makes every named file of the log's run durable, then starts a new run.
    fn restart_log(&self, st: &mut DbState) -> Result<(), StoreError> {
        self.sync_ltx_files()?;
        if let Some(log) = st.log.as_mut() {
            log.restart();
        }
        Ok(())
    }

    pub(crate) fn lock(&self) -> MutexGuard<'_, DbState> {
        // A panic while holding the lock leaves the state as it was before the panicking
        // capture made anything visible (state is only changed after the LTX is durable).
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    pub(super) fn usable(&self) -> Result<MutexGuard<'_, DbState>, StoreError> {
        let st = self.lock();
        if st.deleted {
            return Err(StoreError::Deleted {
                db: self.name.clone(),
            });
        }
        if st.closed {
            return Err(StoreError::Closed {
                db: self.name.clone(),
            });
        }
        Ok(st)
    }

    // ----- hooks -----

    /// A write of `len` bytes at `offset` to the database file succeeded. Marks the pages
    /// it touched; any alignment is accepted (a `cp` writes arbitrary chunks). In WAL mode
    /// database writes are checkpoint copies of captured frames and change nothing.
    pub fn database_written(&self, offset: u64, len: usize) -> Result<(), StoreError> {
        let mut st = self.usable()?;
        self.db_changes.fetch_add(1, Ordering::AcqRel);
        if st.wal_present || len == 0 {
            return Ok(());
        }
        match st.page_size {
            Some(ps) => {
                let ps = u64::from(ps);
                let first = offset / ps + 1;
                let last = (offset + len as u64).div_ceil(ps);
                for pgno in first..=last {
                    st.dirty.insert(pgno as u32);
                }
            }
            None => st.all_dirty = true,
        }
        Ok(())
    }

    /// The database file was truncated to `size` bytes. Pages past `size` that are still
    /// part of the captured database are re-checked at the next capture.
    pub fn database_truncated(&self, size: u64) -> Result<(), StoreError> {
        let mut st = self.usable()?;
        self.db_changes.fetch_add(1, Ordering::AcqRel);
        if st.wal_present {
            return Ok(());
        }
        let Some(ps) = st.page_size else {
            st.all_dirty = true;
            return Ok(());
        };
        let from = (size / u64::from(ps)) as u32 + 1;
        if from <= st.commit {
            if st.commit - from > MAX_TRACKED_TRUNCATED_PAGES {
                st.all_dirty = true;
            } else {
                for pgno in from..=st.commit {
                    st.dirty.insert(pgno);
                }
            }
        }
        Ok(())
    }

    /// A write to the journal is about to happen. Zeroing the header's first 28 bytes at
    /// offset 0 is the PERSIST-mode commit point: the transaction is captured first.
    pub fn journal_write(&self, offset: u64, data: &[u8]) -> Result<(), StoreError> {
        let mut st = self.usable()?;
        if offset == 0
            && data.len() >= journal::HEADER_LEN
            && data[..journal::HEADER_LEN].iter().all(|b| *b == 0)
        {
            debug!(db = %self.name, "journal header zeroed: end of transaction");
            self.capture_database(&mut st)?;
        }
        Ok(())
    }

    /// The journal is about to be truncated to `size`; 0 is the TRUNCATE-mode commit point.
    pub fn journal_truncate(&self, size: u64) -> Result<(), StoreError> {
        let mut st = self.usable()?;
        if size == 0 {
            debug!(db = %self.name, "journal truncated: end of transaction");
            self.capture_database(&mut st)?;
        }
        Ok(())
    }

    /// A token to pass to [`Db::database_fsynced`]: take it just before an fsync of the
    /// database file.
    pub fn database_changes(&self) -> u64 {
        self.db_changes.load(Ordering::Acquire)
    }

    /// An fsync (or fdatasync) of the database file succeeded (AFTER); `before` is
    /// [`Db::database_changes`] taken just before it. Optional: it spares the capture of
    /// a rollback-journal transaction its own fsync of the database when SQLite's
    /// covered every write (`synchronous=NORMAL` or `FULL`).
    pub fn database_fsynced(&self, before: u64) {
        self.db_synced.fetch_max(before, Ordering::AcqRel);
    }

    /// The journal is about to be unlinked: the DELETE-mode commit point.
    pub fn journal_unlink(&self) -> Result<(), StoreError> {
        let mut st = self.usable()?;
        debug!(db = %self.name, "journal unlinked: end of transaction");
        self.capture_database(&mut st)
    }

    /// A write to the WAL is about to happen (BEFORE). Bytes below the capture cursor of
    /// the current WAL generation are in LTX files: they may be written again only
    /// unchanged (a kernel-split or repeated write). A header write at offset 0 with new
    /// salts starts a new generation (SQLite restarts the WAL only after a complete
    /// checkpoint); anything committed in the old one is captured first.
    ///
    /// # Errors
    /// [`StoreError::CapturedWalRewrite`] for a write that would change captured bytes:
    /// fatal for the node (the FUSE layer stops it with exit status 99).
    pub fn wal_write(&self, offset: u64, data: &[u8]) -> Result<(), StoreError> {
        let mut st = self.usable()?;
        let Some(c) = st.wal else { return Ok(()) };
        if offset >= c.offset || data.is_empty() {
            return Ok(());
        }
        if offset == 0
            && let Some(h) = WalHeader::parse(data)
            && (h.salt1, h.salt2) != (c.salt1, c.salt2)
        {
            return self.capture_wal(&mut st);
        }
        let path = self.path(FileKind::Wal);
        let n = (c.offset - offset).min(data.len() as u64) as usize;
        let mut old = vec![0u8; n];
        let f = File::open(&path).map_err(|e| StoreError::io(&self.name, "open wal", &path, e))?;
        let same = match f.read_exact_at(&mut old, offset) {
            Ok(()) => old == data[..n],
            Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => false,
            Err(e) => return Err(StoreError::io(&self.name, "read wal", &path, e)),
        };
        if same {
            return Ok(());
        }
        Err(StoreError::CapturedWalRewrite {
            db: self.name.clone(),
            offset,
            captured: c.offset,
        })
    }

    /// A write to the WAL succeeded (AFTER, before the reply). A write that completes a
    /// commit frame (its page data, or a rewrite of its header by `walRewriteChecksums`
    /// once its data is there) is where SQLite's transaction ends: it is captured here,
    /// before SQLite can publish the frames to readers or checkpointers.
    pub fn wal_written(&self, offset: u64, data: &[u8]) -> Result<(), StoreError> {
        let mut st = self.usable()?;
        if data.is_empty() {
            return Ok(());
        }
        st.wal_present = true;
        let end = offset + data.len() as u64;
        if offset == 0
            && let Some(h) = WalHeader::parse(data)
        {
            st.wal_page_size = Some(h.page_size);
            st.commit_frame = None;
            if st
                .wal
                .is_some_and(|c| (c.salt1, c.salt2) != (h.salt1, h.salt2))
            {
                st.wal = Some(WalCursor {
                    salt1: h.salt1,
                    salt2: h.salt2,
                    offset: wal::HEADER_SIZE,
                    checksum: h.checksum,
                });
                st.wal_end = end;
            }
        }
        st.wal_end = st.wal_end.max(end);
        if st.wal_page_size.is_none() {
            // First write seen since start-up: learn the frame size from the file.
            let path = self.path(FileKind::Wal);
            let f =
                File::open(&path).map_err(|e| StoreError::io(&self.name, "open wal", &path, e))?;
            if let Some(h) = wal::read_header(&f)
                .map_err(|e| StoreError::io(&self.name, "read wal header", &path, e))?
            {
                st.wal_page_size = Some(h.page_size);
            }
            let len = f
                .metadata()
                .map_err(|e| StoreError::io(&self.name, "stat wal", &path, e))?
                .len();
            st.wal_end = st.wal_end.max(len);
        }
        let Some(ps) = st.wal_page_size else {
            return Ok(());
        };
        if end <= wal::HEADER_SIZE {
            return Ok(());
        }
        let frame_size = wal::FRAME_HEADER_SIZE + u64::from(ps);
        let frame = wal::HEADER_SIZE + (end - 1 - wal::HEADER_SIZE) / frame_size * frame_size;
        let frame_end = frame + frame_size;
        let complete = if offset <= frame + 4 && end >= frame + 8 {
            // The write holds the frame's commit field.
            let i = (frame + 4 - offset) as usize;
            let commit = u32::from_be_bytes([data[i], data[i + 1], data[i + 2], data[i + 3]]);
            st.commit_frame = (commit != 0).then_some(frame);
            commit != 0 && st.wal_end >= frame_end
        } else {
            end == frame_end && st.commit_frame == Some(frame)
        };
        if complete {
            self.capture_wal(&mut st)?;
        }
        Ok(())
    }

    /// The WAL write lock is being released (or its holder's shm closed): every
    /// transaction committed in the WAL since the last capture becomes one LTX file each,
    /// durable before this returns.
    pub fn wal_write_lock_released(&self) -> Result<(), StoreError> {
        self.capture_wal_written()
    }

    /// Captures what was written to the WAL past the capture cursor, if anything (the
    /// usual case is nothing: the commit was captured at its commit frame's write).
    fn capture_wal_written(&self) -> Result<(), StoreError> {
        let mut st = self.usable()?;
        if st.wal.is_some_and(|c| c.offset >= st.wal_end) {
            return Ok(());
        }
        self.capture_wal(&mut st)
    }

    /// SQLite asks for the WAL to be durable (its commit fsync with
    /// `synchronous=FULL`, or the header sync of a restarted WAL). Every transaction
    /// committed in the WAL is captured here if it was not already, so each is durable
    /// in the LTX log when this returns: the caller may skip the WAL's own fsync, since
    /// start-up re-applies LTX files whose frames did not reach the disk. A
    /// checkpoint's sync of the WAL (before it copies frames into the database) is not
    /// such a request: the caller must fsync then.
    pub fn wal_sync_requested(&self) -> Result<(), StoreError> {
        self.capture_wal_written()
    }

    /// The WAL is about to be truncated to `size`. Anything committed is captured first;
    /// truncation to 0 (checkpoint TRUNCATE) ends the WAL generation.
    pub fn wal_truncate(&self, size: u64) -> Result<(), StoreError> {
        let mut st = self.usable()?;
        self.capture_wal(&mut st)?;
        st.wal_end = st.wal_end.min(size);
        if size == 0 {
            st.wal = None;
            st.wal_present = false;
            st.wal_page_size = None;
            st.commit_frame = None;
        }
        Ok(())
    }

    /// The WAL is about to be unlinked (last connection closed after a full checkpoint,
    /// or a switch back to a rollback journal).
    pub fn wal_unlink(&self) -> Result<(), StoreError> {
        let mut st = self.usable()?;
        self.capture_wal(&mut st)?;
        st.wal = None;
        st.wal_present = false;
        st.wal_page_size = None;
        st.wal_end = 0;
        st.commit_frame = None;
        Ok(())
    }

    /// A handle of the database file that wrote was flushed, fsynced or closed. Writes made
    /// outside any journal or WAL transaction (a `cp` into the mount,
    /// `journal_mode=OFF`) are captured as one transaction. Inside a rollback-journal
    /// transaction (the journal has a valid header) or in WAL mode this does nothing: the
    /// journal's end or the WAL lock release is the commit point.
    pub fn database_flushed(&self) -> Result<(), StoreError> {
        let mut st = self.usable()?;
        if st.wal_present || (st.dirty.is_empty() && !st.all_dirty) {
            return Ok(());
        }
        let jpath = self.path(FileKind::Journal);
        match File::open(&jpath) {
            Ok(j) => {
                if journal::has_valid_header(&j)
                    .map_err(|e| StoreError::io(&self.name, "read journal", &jpath, e))?
                {
                    return Ok(());
                }
            }
            Err(e) if e.kind() == io::ErrorKind::NotFound => {}
            Err(e) => return Err(StoreError::io(&self.name, "open journal", &jpath, e)),
        }
        self.capture_database(&mut st)
    }

    // ----- capture -----

    fn next_header(&self, st: &DbState, page_size: u32, commit: u32) -> Header {
        let txid = TxId(st.pos.txid.0 + 1);
        Header {
            flags: 0,
            page_size,
            commit,
            min_txid: txid,
            max_txid: txid,
            timestamp: ltxio::now_ms(),
            // A snapshot (TXID 1) carries no pre-apply checksum.
            pre_apply_checksum: if txid.0 == 1 {
                Checksum(0)
            } else {
                st.pos.post_apply_checksum
            },
            wal_offset: 0,
            wal_size: 0,
            wal_salt1: 0,
            wal_salt2: 0,
            node_id: self.node_id,
        }
    }

    /// Captures the database file's current content as one transaction (rollback-journal
    /// mode). Only pages whose checksum differs from the captured state are written, so a
    /// rolled-back transaction (pages restored) produces no LTX.
    pub(crate) fn capture_database(&self, st: &mut DbState) -> Result<(), StoreError> {
        let path = self.path(FileKind::Database);
        let f =
            File::open(&path).map_err(|e| StoreError::io(&self.name, "open database", &path, e))?;
        let len = f
            .metadata()
            .map_err(|e| StoreError::io(&self.name, "stat database", &path, e))?
            .len();
        let (ps, commit) = if len == 0 {
            (st.page_size.unwrap_or(DEFAULT_PAGE_SIZE), 0)
        } else {
            let hdr = read_db_header(&self.name, &f, &path)?;
            let ps = parse_page_size(&hdr).ok_or_else(|| StoreError::InvalidDatabaseHeader {
                db: self.name.clone(),
                reason: format!(
                    "page size field {:02x}{:02x} is not a power of two in 512..=65536",
                    hdr[16], hdr[17]
                ),
            })?;
            (ps, commit_size(&self.name, &hdr, len, ps))
        };
        let same_ps = st.page_size == Some(ps) || st.commit == 0;
        let old_commit = if same_ps { st.commit } else { 0 };
        let lock = ltx::lock_pgno(ps);
        let candidates: Vec<u32> = if !same_ps || st.all_dirty {
            (1..=commit).filter(|p| *p != lock).collect()
        } else {
            let mut c: BTreeSet<u32> = st.dirty.range(..=commit).copied().collect();
            c.extend(old_commit + 1..=commit);
            c.remove(&lock);
            c.into_iter().collect()
        };
        let unchanged_size = commit == st.commit && (same_ps || commit == 0);
        if candidates.is_empty() && unchanged_size {
            st.dirty.clear();
            st.all_dirty = false;
            return Ok(());
        }

        let header = self.next_header(st, ps, commit);
        let ltx_dir = self.ltx_dir();
        let mut pending =
            PendingLtx::create(&ltx_dir, &header).map_err(|e| e.into_store_error(&self.name))?;
        let mut buf = vec![0u8; ps as usize];
        let mut changes = Vec::new();
        for pgno in candidates {
            let read = f
                .read_exact_at(&mut buf, u64::from(pgno - 1) * u64::from(ps))
                .map_err(|e| StoreError::io(&self.name, "read page", &path, e));
            let c = match read {
                Ok(()) => ltx::page_checksum(pgno, &buf),
                Err(e) => {
                    pending.abort();
                    return Err(e);
                }
            };
            if pgno <= old_commit && st.checksums[pgno as usize - 1] == c {
                continue;
            }
            if let Err(e) = pending.page(pgno, &buf) {
                pending.abort();
                return Err(e.into_store_error(&self.name));
            }
            changes.push((pgno, c));
        }
        if changes.is_empty() && unchanged_size {
            pending.abort();
            st.dirty.clear();
            st.all_dirty = false;
            debug!(db = %self.name, "transaction changed nothing (rollback): no LTX");
            return Ok(());
        }
        let cap = self.plan(st, same_ps, ps, commit, changes);
        // The database's new pages must be durable no later than the LTX that names them
        // (SQLite's own fsync of the database usually made them so already).
        let changes = self.db_changes.load(Ordering::Acquire);
        if self.db_synced.load(Ordering::Acquire) < changes {
            if let Err(e) = f.sync_data() {
                pending.abort();
                return Err(StoreError::io(&self.name, "fsync database", &path, e));
            }
            self.db_synced.fetch_max(changes, Ordering::AcqRel);
        }
        let post = post_apply(&cap);
        let enc = pending
            .finish(post)
            .map_err(|e| e.into_store_error(&self.name))?;
        // On a replica holding the HALT lock the primary must accept it first.
        let enc = self.forward_capture(st, &header, post, enc)?;
        let len = self.persist(st, &header, enc)?;
        self.count_commit_bytes(len);
        self.apply_capture(st, cap, header.max_txid, post);
        st.dirty.clear();
        st.all_dirty = false;
        debug!(db = %self.name, pos = %st.pos, "captured transaction");
        self.strict_check(st)
    }

    /// Works out the new rolling checksum from the in-memory page checksums: XOR out the
    /// old checksum of each changed or truncated page, XOR in the new one.
    fn plan(
        &self,
        st: &DbState,
        same_ps: bool,
        ps: u32,
        commit: u32,
        changes: Vec<(u32, Checksum)>,
    ) -> Capture {
        let old_commit = if same_ps { st.commit } else { 0 };
        let mut rolling = if same_ps {
            st.rolling
        } else {
            RollingChecksum::new()
        };
        let lock = ltx::lock_pgno(ps);
        for &(pgno, c) in &changes {
            if pgno <= old_commit {
                rolling.toggle(st.checksums[pgno as usize - 1]);
            }
            rolling.toggle(c);
        }
        for pgno in commit + 1..=old_commit {
            if pgno != lock {
                rolling.toggle(st.checksums[pgno as usize - 1]);
            }
        }
        Capture {
            page_size: ps,
            commit,
            changes,
            rolling,
        }
    }

    fn apply_capture(&self, st: &mut DbState, cap: Capture, txid: TxId, post: Checksum) {
        if st.page_size != Some(cap.page_size) {
            st.checksums.clear();
        }
        st.checksums.resize(cap.commit as usize, Checksum(0));
        for (pgno, c) in cap.changes {
            st.checksums[pgno as usize - 1] = c;
        }
        st.page_size = Some(cap.page_size);
        st.commit = cap.commit;
        st.rolling = cap.rolling;
        self.set_pos(
            st,
            Pos {
                txid,
                post_apply_checksum: post,
            },
        );
        self.notify_change();
    }

    /// Captures every transaction committed in the WAL since the cursor.
    pub(crate) fn capture_wal(&self, st: &mut DbState) -> Result<(), StoreError> {
        let path = self.path(FileKind::Wal);
        let f = match File::open(&path) {
            Ok(f) => f,
            Err(e) if e.kind() == io::ErrorKind::NotFound => {
                st.wal = None;
                return Ok(());
            }
            Err(e) => return Err(StoreError::io(&self.name, "open wal", &path, e)),
        };
        // No fsync of the WAL: the LTX log makes the transaction durable, and start-up
        // re-applies LTX files whose frames did not reach the disk.
        let Some(h) = wal::read_header(&f)
            .map_err(|e| StoreError::io(&self.name, "read wal header", &path, e))?
        else {
            return Ok(());
        };
        if let Some(ps) = st.page_size
            && ps != h.page_size
            && st.commit > 0
        {
            return Err(StoreError::InvalidWal {
                db: self.name.clone(),
                reason: format!(
                    "WAL page size {} differs from the database's {ps}",
                    h.page_size
                ),
            });
        }
        let (start, seed) = match st.wal {
            Some(c) if c.salt1 == h.salt1 && c.salt2 == h.salt2 => (c.offset, c.checksum),
            _ => (wal::HEADER_SIZE, h.checksum),
        };
        let txns = wal::scan(&f, &h, start, seed)
            .map_err(|e| StoreError::io(&self.name, "read wal", &path, e))?;
        st.wal = Some(WalCursor {
            salt1: h.salt1,
            salt2: h.salt2,
            offset: start,
            checksum: seed,
        });
        for txn in txns {
            self.capture_wal_txn(st, &f, &h, &txn)?;
            st.wal = Some(WalCursor {
                salt1: h.salt1,
                salt2: h.salt2,
                offset: txn.end,
                checksum: txn.checksum_after,
            });
            self.strict_check(st)?;
        }
        Ok(())
    }

    fn capture_wal_txn(
        &self,
        st: &mut DbState,
        wal_file: &File,
        h: &WalHeader,
        txn: &WalTxn,
    ) -> Result<(), StoreError> {
        self.refuse_forwarded_wal()?;
        let ps = h.page_size;
        let commit = txn.commit;
        let same_ps = st.page_size == Some(ps) || st.commit == 0;
        let old_commit = if same_ps { st.commit } else { 0 };
        let lock = ltx::lock_pgno(ps);
        // Newest frame of each page up to the commit size, plus any page that the commit
        // adds without a frame (read from the database file, as SQLite would).
        let mut sources: Vec<(u32, Option<u64>)> = txn
            .pages
            .iter()
            .filter(|(p, _)| **p <= commit && **p != lock)
            .map(|(p, off)| (*p, Some(*off)))
            .collect();
        for pgno in old_commit + 1..=commit {
            if pgno != lock && !txn.pages.contains_key(&pgno) {
                sources.push((pgno, None));
            }
        }
        sources.sort_unstable_by_key(|s| s.0);

        let mut header = self.next_header(st, ps, commit);
        header.wal_offset = txn.offset as i64;
        header.wal_size = txn.size() as i64;
        header.wal_salt1 = h.salt1;
        header.wal_salt2 = h.salt2;
        let wal_path = self.path(FileKind::Wal);
        let db_path = self.path(FileKind::Database);
        let mut db_file: Option<File> = None;
        let mut pending = PendingLtx::create(&self.ltx_dir(), &header)
            .map_err(|e| e.into_store_error(&self.name))?;
        let mut buf = vec![0u8; ps as usize];
        let mut changes = Vec::new();
        for (pgno, src) in sources {
            let read = match src {
                Some(off) => wal_file
                    .read_exact_at(&mut buf, off)
                    .map_err(|e| StoreError::io(&self.name, "read wal frame", &wal_path, e)),
                None => read_db_page(&self.name, &mut db_file, &db_path, pgno, &mut buf),
            };
            if let Err(e) = read {
                pending.abort();
                return Err(e);
            }
            let c = ltx::page_checksum(pgno, &buf);
            if pgno <= old_commit && st.checksums[pgno as usize - 1] == c {
                continue;
            }
            if let Err(e) = pending.page(pgno, &buf) {
                pending.abort();
                return Err(e.into_store_error(&self.name));
            }
            changes.push((pgno, c));
        }
        if changes.is_empty() && commit == st.commit && same_ps {
            pending.abort();
            debug!(db = %self.name, offset = txn.offset, "WAL transaction changed nothing: no LTX");
            return Ok(());
        }
        let cap = self.plan(st, same_ps, ps, commit, changes);
        let post = post_apply(&cap);
        let enc = pending
            .finish(post)
            .map_err(|e| e.into_store_error(&self.name))?;
        let len = self.persist(st, &header, enc)?;
        self.count_commit_bytes(len);
        self.apply_capture(st, cap, header.max_txid, post);
        debug!(db = %self.name, pos = %st.pos, wal_offset = txn.offset, "captured WAL transaction");
        Ok(())
    }

    /// Writes the commit-0 LTX that records the database's deletion and removes its
    /// files (the `ltx/` directory stays until retention removes it).
    pub(crate) fn delete(&self) -> Result<Pos, StoreError> {
        let mut st = self.lock();
        if st.deleted {
            return Err(StoreError::Deleted {
                db: self.name.clone(),
            });
        }
        if st.pos.txid.0 > 0 {
            let header = self.next_header(&st, st.page_size.unwrap_or(DEFAULT_PAGE_SIZE), 0);
            let pending = PendingLtx::create(&self.ltx_dir(), &header)
                .map_err(|e| e.into_store_error(&self.name))?;
            let post = Checksum(CHECKSUM_FLAG);
            let enc = pending
                .finish(post)
                .map_err(|e| e.into_store_error(&self.name))?;
            self.persist(&mut st, &header, enc)?;
            self.set_pos(
                &mut st,
                Pos {
                    txid: header.max_txid,
                    post_apply_checksum: post,
                },
            );
        }
        // Nothing of this database is written after this: no log run is left open.
        self.sync_ltx_files()?;
        st.deleted = true;
        self.clear_syncer();
        st.commit = 0;
        st.checksums = Vec::new();
        st.rolling = RollingChecksum::new();
        st.dirty.clear();
        for kind in [
            FileKind::Database,
            FileKind::Journal,
            FileKind::Wal,
            FileKind::Shm,
        ] {
            remove_if_exists(&self.name, &self.path(kind))?;
        }
        ltxio::fsync_dir(&self.dir)
            .map_err(|e| StoreError::io(&self.name, "fsync dir", &self.dir, e))?;
        info!(db = %self.name, pos = %st.pos, "database deleted");
        Ok(st.pos)
    }

    /// Re-hashes the whole logical database (database file plus captured WAL frames) and
    /// compares it with the in-memory checksum. For tests and `strict-verify`.
    ///
    /// # Errors
    /// [`StoreError::ChecksumMismatch`] naming both checksums when they differ.
    pub fn verify(&self) -> Result<(), StoreError> {
        let st = self.lock();
        self.verify_locked(&st)
    }

    /// `strict-verify` (LiteFS's option, for tests): after every capture the whole
    /// database is re-hashed and a mismatch fails the hook.
    pub fn set_strict_verify(&self, on: bool) {
        self.strict.store(on, Ordering::Relaxed);
    }

    fn strict_check(&self, st: &DbState) -> Result<(), StoreError> {
        if self.strict.load(Ordering::Relaxed) {
            self.verify_locked(st)?;
        }
        Ok(())
    }

    fn verify_locked(&self, st: &DbState) -> Result<(), StoreError> {
        let Some(ps) = st.page_size else {
            return Ok(());
        };
        let wal_txns = match st.wal {
            Some(c) => {
                let path = self.path(FileKind::Wal);
                let f = File::open(&path)
                    .map_err(|e| StoreError::io(&self.name, "open wal", &path, e))?;
                let h = wal::read_header(&f)
                    .map_err(|e| StoreError::io(&self.name, "read wal", &path, e))?
                    .filter(|h| h.salt1 == c.salt1 && h.salt2 == c.salt2);
                match h {
                    Some(h) => {
                        let txns = wal::scan(&f, &h, wal::HEADER_SIZE, h.checksum)
                            .map_err(|e| StoreError::io(&self.name, "read wal", &path, e))?;
                        let txns: Vec<WalTxn> =
                            txns.into_iter().filter(|t| t.end <= c.offset).collect();
                        Some((f, txns))
                    }
                    None => None,
                }
            }
            None => None,
        };
        let logical = logical_checksums(
            &self.name,
            &self.path(FileKind::Database),
            ps,
            wal_txns.as_ref().map(|(f, t)| (f, t.as_slice())),
        )?;
        let mut rolling = RollingChecksum::new();
        for c in logical.checksums.iter().take(st.commit as usize) {
            rolling.toggle(*c);
        }
        let got = if st.commit == 0 {
            Checksum(CHECKSUM_FLAG)
        } else {
            rolling.value()
        };
        if got != st.pos.post_apply_checksum && st.pos.txid.0 > 0 {
            return Err(StoreError::ChecksumMismatch {
                db: self.name.clone(),
                txid: st.pos.txid,
                ltx: st.pos.post_apply_checksum,
                database: got,
            });
        }
        Ok(())
    }
}

fn post_apply(cap: &Capture) -> Checksum {
    if cap.commit == 0 {
        Checksum(CHECKSUM_FLAG)
    } else {
        cap.rolling.value()
    }
}

fn read_db_page(
    db: &str,
    file: &mut Option<File>,
    path: &Path,
    pgno: u32,
    buf: &mut [u8],
) -> Result<(), StoreError> {
    let f = match file {
        Some(f) => f,
        None => {
            file.insert(File::open(path).map_err(|e| StoreError::io(db, "open database", path, e))?)
        }
    };
    read_page_or_zeros(f, u64::from(pgno - 1) * buf.len() as u64, buf)
        .map_err(|e| StoreError::io(db, "read page", path, e))
}

/// Reads a page; the part beyond the end of the file reads as zeros (SQLite's view).
pub(crate) fn read_page_or_zeros(f: &File, offset: u64, buf: &mut [u8]) -> io::Result<()> {
    let n = read_up_to(f, buf, offset)?;
    buf[n..].fill(0);
    Ok(())
}

/// Fills `buf` from `offset` until it is full or the file ends; returns the bytes read.
pub(crate) fn read_up_to(f: &File, buf: &mut [u8], offset: u64) -> io::Result<usize> {
    let mut done = 0;
    while done < buf.len() {
        match f.read_at(&mut buf[done..], offset + done as u64) {
            Ok(0) => break,
            Ok(n) => done += n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(done)
}

pub(crate) fn read_db_header(db: &str, f: &File, path: &Path) -> Result<[u8; 100], StoreError> {
    let mut hdr = [0u8; 100];
    f.read_exact_at(&mut hdr, 0).map_err(|e| match e.kind() {
        io::ErrorKind::UnexpectedEof => StoreError::InvalidDatabaseHeader {
            db: db.to_string(),
            reason: "file shorter than the 100-byte header".into(),
        },
        _ => StoreError::io(db, "read database header", path, e),
    })?;
    if &hdr[..16] != b"SQLite format 3\0" {
        return Err(StoreError::InvalidDatabaseHeader {
            db: db.to_string(),
            reason: "missing \"SQLite format 3\" magic".into(),
        });
    }
    Ok(hdr)
}

/// Page size from the header (offset 16; 1 means 65536).
pub(crate) fn parse_page_size(hdr: &[u8; 100]) -> Option<u32> {
    let ps = match u16::from_be_bytes([hdr[16], hdr[17]]) {
        1 => 65536,
        n => u32::from(n),
    };
    ((512..=65536).contains(&ps) && ps.is_power_of_two()).then_some(ps)
}

/// The database size in pages: the header's size field (offset 28) when it is valid
/// (offset 92 equals the change counter at 24, as SQLite requires), else the file size.
/// Never more pages than the file holds.
pub(crate) fn commit_size(db: &str, hdr: &[u8; 100], file_len: u64, ps: u32) -> u32 {
    let file_pages = (file_len / u64::from(ps)) as u32;
    let be = |o: usize| u32::from_be_bytes([hdr[o], hdr[o + 1], hdr[o + 2], hdr[o + 3]]);
    let in_header = be(28);
    if in_header != 0 && be(92) == be(24) {
        if in_header > file_pages {
            warn!(
                db,
                in_header,
                file_pages,
                "header claims more pages than the file holds; using the file size"
            );
            return file_pages;
        }
        in_header
    } else {
        file_pages
    }
}

/// Removes a file of database `db`, if it exists.
pub(super) fn remove_if_exists(db: &str, path: &Path) -> Result<(), StoreError> {
    ltxio::remove_file_if_exists(path)
        .map(drop)
        .map_err(|e| StoreError::io(db, "remove", path, e))
}

/// Page checksums of the logical database: the database file, overlaid with the newest
/// frame of each page from `wal` transactions (in order), cut at the last commit size.
pub(crate) struct Logical {
    pub checksums: Vec<Checksum>,
    /// Size in pages: the last WAL commit, else the database header / file size.
    pub commit: u32,
}

pub(crate) fn logical_checksums(
    db: &str,
    path: &Path,
    ps: u32,
    wal: Option<(&File, &[WalTxn])>,
) -> Result<Logical, StoreError> {
    let f = File::open(path).map_err(|e| StoreError::io(db, "open database", path, e))?;
    let len = f
        .metadata()
        .map_err(|e| StoreError::io(db, "stat database", path, e))?
        .len();
    let mut sums = ltx::page_checksums(io::BufReader::with_capacity(1 << 20, &f), ps)
        .map_err(|e| StoreError::io(db, "checksum database", path, e))?;
    let mut commit = if len == 0 {
        0
    } else {
        let hdr = read_db_header(db, &f, path)?;
        commit_size(db, &hdr, len, ps)
    };
    let lock = ltx::lock_pgno(ps);
    if let Some((wf, txns)) = wal {
        let mut buf = vec![0u8; ps as usize];
        for txn in txns {
            let file_pages = sums.len() as u32;
            for pgno in file_pages + 1..=txn.commit {
                sums.push(if pgno == lock {
                    Checksum(0)
                } else {
                    buf.fill(0);
                    ltx::page_checksum(pgno, &buf)
                });
            }
            for (&pgno, &off) in &txn.pages {
                if pgno == lock || pgno > txn.commit {
                    continue;
                }
                wf.read_exact_at(&mut buf, off)
                    .map_err(|e| StoreError::io(db, "read wal frame", path, e))?;
                sums[pgno as usize - 1] = ltx::page_checksum(pgno, &buf);
            }
            commit = txn.commit;
        }
    }
    if (sums.len() as u32) < commit {
        return Err(StoreError::InvalidDatabaseHeader {
            db: db.to_string(),
            reason: format!(
                "database holds {} pages, fewer than its size {commit}",
                sums.len()
            ),
        });
    }
    sums.truncate(commit as usize);
    Ok(Logical {
        checksums: sums,
        commit,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ltx::Decoder;

    #[test]
    fn the_position_is_read_while_a_commit_holds_the_state_lock() {
        let dir = tempfile::tempdir().unwrap();
        let at = |txid| Pos {
            txid: TxId(txid),
            post_apply_checksum: Checksum(CHECKSUM_FLAG | txid),
        };
        let db = Db::new(
            "t.db".into(),
            dir.path().to_path_buf(),
            0,
            DbState::empty(at(5)),
        );
        let mut st = db.lock();
        db.set_pos(&mut st, at(6));
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::scope(|s| {
            s.spawn(|| tx.send(db.pos()));
            // A replication stream asking while the commit flushes gets the new position.
            let got = rx.recv_timeout(std::time::Duration::from_secs(10));
            drop(st);
            assert_eq!(got, Ok(at(6)));
        });
        assert_eq!(db.lock().pos, at(6));
    }

    /// A write crossing the lock page (as `cp` of a >1 GiB database does) never puts the
    /// lock page into an LTX file, for every page size. The database file is sparse and
    /// the in-memory checksums are stand-ins, so no gigabyte is ever hashed.
    #[test]
    fn lock_page_is_never_captured() {
        for shift in 9..=16 {
            let ps = 1u32 << shift;
            let lock = ltx::lock_pgno(ps);
            let commit = lock + 1;
            let dir = tempfile::tempdir().unwrap();
            fs::create_dir_all(dir.path().join("ltx")).unwrap();
            let mut st = DbState::empty(Pos {
                txid: TxId(5),
                post_apply_checksum: Checksum(CHECKSUM_FLAG | 1),
            });
            st.page_size = Some(ps);
            st.commit = commit;
            st.checksums = vec![Checksum(CHECKSUM_FLAG | 1); commit as usize];
            st.checksums[lock as usize - 1] = Checksum(0);
            let db = Db::new("lock".into(), dir.path().to_path_buf(), 0, st);

            let f = fs::OpenOptions::new()
                .read(true)
                .write(true)
                .create(true)
                .truncate(true)
                .open(db.path(FileKind::Database))
                .unwrap();
            f.set_len(u64::from(commit) * u64::from(ps)).unwrap();
            let mut hdr = [0u8; 100];
            hdr[..16].copy_from_slice(b"SQLite format 3\0");
            let field = if ps == 65536 { 1u16 } else { ps as u16 };
            hdr[16..18].copy_from_slice(&field.to_be_bytes());
            hdr[24..28].copy_from_slice(&1u32.to_be_bytes());
            hdr[28..32].copy_from_slice(&commit.to_be_bytes());
            hdr[92..96].copy_from_slice(&1u32.to_be_bytes());
            f.write_all_at(&hdr, 0).unwrap();
            let off = u64::from(lock - 2) * u64::from(ps);
            let data = vec![0xABu8; 3 * ps as usize];
            f.write_all_at(&data, off).unwrap();
            db.database_written(off, data.len()).unwrap();
            db.journal_unlink().unwrap();

            assert_eq!(db.pos().txid, TxId(6), "page size {ps}");
            let path = db.ltx_dir().join(ltx::format_filename(TxId(6), TxId(6)));
            let mut dec = Decoder::new(io::BufReader::new(File::open(&path).unwrap())).unwrap();
            assert_eq!(dec.header().commit, commit);
            let mut buf = vec![0u8; ps as usize];
            let mut pages = Vec::new();
            while let Some(pgno) = dec.next_page(&mut buf).unwrap() {
                assert_eq!(buf, vec![0xABu8; ps as usize]);
                pages.push(pgno);
            }
            dec.finish().unwrap();
            assert_eq!(
                pages,
                vec![lock - 1, lock + 1],
                "page size {ps}: lock page {lock}"
            );
        }
    }

    #[test]
    fn commit_size_prefers_a_valid_header_field() {
        let mut hdr = [0u8; 100];
        hdr[24..28].copy_from_slice(&3u32.to_be_bytes());
        hdr[28..32].copy_from_slice(&5u32.to_be_bytes());
        // Offset 92 differs from the change counter: the field is stale, use the file.
        hdr[92..96].copy_from_slice(&2u32.to_be_bytes());
        assert_eq!(commit_size("x", &hdr, 8 * 4096, 4096), 8);
        hdr[92..96].copy_from_slice(&3u32.to_be_bytes());
        assert_eq!(commit_size("x", &hdr, 8 * 4096, 4096), 5);
        // Never more than the file holds.
        assert_eq!(commit_size("x", &hdr, 4 * 4096, 4096), 4);
    }

    #[test]
    fn page_size_field_one_means_65536() {
        let mut hdr = [0u8; 100];
        hdr[16..18].copy_from_slice(&1u16.to_be_bytes());
        assert_eq!(parse_page_size(&hdr), Some(65536));
        hdr[16..18].copy_from_slice(&1000u16.to_be_bytes());
        assert_eq!(parse_page_size(&hdr), None);
    }
}
