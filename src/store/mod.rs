//! The store: databases in the data directory, their positions, and the capture of every
//! SQLite transaction into an LTX file.
//!
//! # FUSE boundary
//!
//! The FUSE layer (`src/fuse/`) owns inodes, handles, byte passthrough, locks and
//! mounting; it reports SQLite's file operations to a [`Db`] through its hook methods and
//! never interprets page contents. The contract of `/work/wt/store-api.md` holds, with
//! these refinements (the store branch is the source of truth):
//!
//! - Every hook returns `Result<(), StoreError>`; the FUSE layer answers EIO on `Err`
//!   without passing the operation through (for the BEFORE hooks).
//! - `database_written`/`database_truncated` (AFTER) accept any offset and length: pages
//!   touched are re-checked at the next commit point, and a page whose content did not
//!   change is never put in an LTX. In WAL mode (the WAL has been written and not yet
//!   truncated to 0 or unlinked) database writes are checkpoint copies and are ignored.
//! - `journal_write(offset, data)` (BEFORE): a write at offset 0 whose first 28 bytes are
//!   zero is the PERSIST-mode commit point. SQLite's first header write of a transaction
//!   has zeroed magic but a non-zero sector and page size, so it is never mistaken for one.
//! - `wal_truncate(size)`/`wal_unlink()` (BEFORE) capture anything committed first, so the
//!   FUSE layer may call them for every truncate/unlink of a WAL.
//! - `wal_write_lock_released()` may also be called at any other point while WRITE is
//!   held: a capture finds only whole committed transactions after its cursor and is
//!   idempotent.
//! - `database_flushed()` may be called on every flush/fsync/release of a database handle
//!   that wrote; the store itself decides whether the writes were outside a transaction
//!   (no journal with a valid header, not in WAL mode) and only then captures them.
//! - Changed: [`Db::wal_write`] (BEFORE each WAL write: captured bytes may only be
//!   written again unchanged; `Err(StoreError::CapturedWalRewrite)` is fatal) and
//!   [`Db::wal_written`]`(offset, data)` (AFTER, before the reply: a write that completes
//!   a valid commit frame is captured right there, so a failed capture fails the write
//!   and with it the commit, and no checkpoint can copy frames before their LTX exists).
//!   The store never fsyncs the WAL; a failed fsync of the WAL is fatal for the node.
//! - Added: [`Store::retention_pass`] (the background thread calls it every
//!   `retention_monitor_interval`; 0 disables the thread), [`Store::deleted_databases`]
//!   (positions of deleted databases whose commit-0 LTX file is still kept), [`Db::verify`]
//!   (full re-hash), [`Store::set_strict_verify`] (`strict-verify`: a full re-hash after
//!   every capture fails the hook on a mismatch), [`Db::commit`], [`Db::ltx_dir`].
//! - Added for replication (`src/store/replica.rs`, `src/store/snapshot.rs`):
//!   [`Store::set_primary`] (a replica's mount is read-only and captures nothing),
//!   [`Store::write_gate`] and [`Store::may_write`] (the write gate: what a demotion
//!   waits for, and which transactions may still finish after it),
//!   [`Store::subscribe_changes`] (a `tokio::sync::watch` bumped after every capture,
//!   creation and deletion: what wakes the primary's streams), [`Store::apply_replicated`]
//!   (verify a received LTX file completely, then apply it; the caller holds the FUSE
//!   locks; not synced, see [`Store::sync_replicated`] and the `replicating` marker),
//!   [`Db::write_snapshot`] (a consistent snapshot under the state lock) and
//!   [`read_ltx_ends`] (header and trailer of an LTX file).
//! - Added for write forwarding (`src/store/forward.rs`, the HALT lock): on a replica
//!   [`Db::set_forwarder`] makes each captured rollback-journal transaction go to the
//!   primary before it is persisted (refused: rolled back from the journal, the hook
//!   fails with [`StoreError::Forward`]); on the primary [`Store::apply_forwarded`]
//!   commits such a file; [`Store::already_applied`] lets a replica skip its own
//!   transactions streamed back.
//! - After [`Store::close`] every hook fails with [`StoreError::Closed`]: nothing may
//!   change once the clean-shutdown record is written.
//! - An `Err` from `wal_write_lock_released` means SQLite considers the transaction
//!   committed (it ignores unlock errors) but no LTX exists: as in LiteFS, the node should
//!   treat that as fatal (exit 99); the next start-up cuts the uncaptured frames off.
//!   An `Err` from a journal commit-point hook leaves the journal in place (hot), so the
//!   transaction is rolled back, never half-captured; the state is unchanged and the next
//!   commit point retries.
//! - `tests/it/store_vfs.rs` is a SQLite VFS that calls the hooks exactly where the FUSE
//!   layer must (before/after each operation, WRITE release on unlock/unmap/close, CKPT
//!   refused while another connection holds WRITE): a reference for the call order.
//! - Also exported: [`list_ltx_files`]/[`LtxFile`] (a database's LTX files by TXID),
//!   [`journal`] and [`wal`] (file-format readers).
//!
//! # Data directory
//!
//! `<data.dir>/dbs/<name>/{database,journal,wal,shm}` and `ltx/<min>-<max>.ltx` as in
//! LiteFS 0.5, plus `clean-shutdown` (see below), `ltx-log` (the LTX append log, see
//! `ltxlog.rs`: a commit is durable once its record is there; its named file is fsynced
//! later, in batches, by the `litefs-ltx-sync` thread) and `ltx/*.tmp` (an LTX file
//! being written). Start-up removes every `*.tmp` and restores, from the log, every LTX
//! file whose named file is missing or damaged.
//!
//! # Invariants
//!
//! - An LTX file is durable (its record appended to `ltx-log` and fdatasynced, or, for a
//!   file too large for the log, fsynced, renamed and its directory fsynced) and visible
//!   under its name before the hook that produced it returns, and the in-memory position
//!   changes only after that. A failed
//!   capture leaves the state as it was, so the next commit point retries it.
//! - TXIDs are contiguous; each file's pre-apply checksum is the previous file's
//!   post-apply checksum; the first file (TXID 1) is a snapshot (pre-apply 0, every page).
//! - The in-memory page checksums describe the logical database (database file plus
//!   captured WAL frames); a commit costs O(pages changed), never a re-hash.
//!
//! # Start-up
//!
//! See `recovery.rs`. Hot journal rolled back (then the journal removed); WAL frames past
//! the last LTX file's WAL range removed (a WAL of another generation than the last LTX
//! file's salts is removed whole: SQLite restarts a WAL only after a complete checkpoint);
//! after a hot-journal rollback the last LTX file is written again (idempotent). It is
//! not re-applied otherwise: the database already holds it, and rewriting its pages
//! unconditionally would hide a corruption of exactly those pages. Then the logical
//! database is hashed in full and must equal the last post-apply checksum, or
//! [`StoreError::ChecksumMismatch`]. A `clean-shutdown` record (written by
//! [`Store::close`], consumed by the next open) carries the position and page checksums
//! and is trusted only when the database and WAL files have the size, inode and mtime it
//! recorded and its CRC matches: then nothing is hashed (1 GB database: 1.4 ms, against
//! 120 ms for the full re-hash from the page cache). A change to the files within the
//! file system's timestamp granularity after a clean shutdown that keeps the size goes
//! unnoticed; remove the record to force the full check. A database file with content
//! but no LTX history is captured as a snapshot (TXID 1).
//!
//! # Page-size changes
//!
//! `VACUUM` with a new `page_size` (rollback mode) is captured as one LTX file in the new
//! page size holding every page, whose pre-apply checksum is the old database's.
//! `ltx::apply_file` refuses a page size that differs from the database file's; a
//! replica ([`Store::apply_replicated`]) applies such a file as a full rewrite.
//!
//! # Deletion
//!
//! [`Store::delete_db`] writes an LTX file with commit 0 (post-apply = the checksum flag,
//! no pages) and removes database, journal, WAL and shm. The `ltx/` directory stays, so
//! the deletion can be replicated and TXIDs continue if the name is created again; the
//! retention pass removes the whole directory once the commit-0 file is older than the
//! retention period.
//!
//! # Retention
//!
//! By file modification time (the time the file was written on this node, which is also
//! right for files received from a primary): LTX files older than `retention` are removed,
//! the newest file of each database is always kept. When an archive is configured
//! ([`Store::hold_for_archive`]), a file is also kept until the archiver has shipped it
//! ([`Store::set_archived`]: every TXID up to the watermark is in the archive).

mod db;
mod error;
mod forward;
pub mod journal;
mod ltxio;
mod ltxlog;
mod record;
mod recovery;
mod replica;
mod snapshot;
mod spare;
pub mod wal;

use std::collections::BTreeMap;
use std::fs;
use std::io;
use std::path::{Path, PathBuf};
use std::sync::mpsc::{self, RecvTimeoutError};
use std::sync::{Arc, Mutex, MutexGuard, Weak};
use std::thread::JoinHandle;
use std::time::{Duration, Instant, SystemTime};

use tracing::{error, info, warn};

use crate::ltx::{Pos, TxId};

pub(crate) use db::read_page_or_zeros;
pub use db::{Db, DbStats};
pub use error::StoreError;
pub use forward::{Forwarder, wal_mode};
pub use ltxio::read_ltx_ends;
pub use ltxio::{LtxFile, list as list_ltx_files};
pub(crate) use ltxio::{ltx_ends_in, read_ltx_ends_of};
use record::{CleanRecord, Stamp};
use recovery::Recovered;
pub use replica::{Applied, MEMORY_FILE_LIMIT, Received, Verified};

/// The kind of a file in the mount.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum FileKind {
    /// The database file itself (`<name>`).
    Database,
    /// Rollback journal (`<name>-journal`).
    Journal,
    /// Write-ahead log (`<name>-wal`).
    Wal,
    /// WAL index (`<name>-shm`).
    Shm,
}

/// Parses a mount-root file name into (database name, kind). `None` for names that are
/// not databases or their side files: names starting with '.', containing '/', the
/// virtual `-pos`/`-lock` files, or a bare suffix.
pub fn parse_mount_name(name: &str) -> Option<(&str, FileKind)> {
    if name.is_empty() || name.starts_with('.') || name.contains('/') || name.contains('\0') {
        return None;
    }
    for (suffix, kind) in [
        ("-journal", Some(FileKind::Journal)),
        ("-wal", Some(FileKind::Wal)),
        ("-shm", Some(FileKind::Shm)),
        ("-pos", None),
        ("-lock", None),
    ] {
        if let Some(db) = name.strip_suffix(suffix) {
            return match kind {
                Some(k) if !db.is_empty() => Some((db, k)),
                _ => None,
            };
        }
    }
    Some((name, FileKind::Database))
}

/// How to open a store.
#[derive(Clone, Debug)]
pub struct StoreOptions {
    /// `data.dir`.
    pub data_dir: PathBuf,
    /// `data.retention`: LTX files older than this are removed (the newest is kept).
    pub retention: Duration,
    /// `data.retention-monitor-interval`; zero disables the background retention thread.
    pub retention_monitor_interval: Duration,
    /// Written into every LTX header.
    pub node_id: u64,
}

#[derive(Default)]
struct Inner {
    dbs: BTreeMap<String, Arc<Db>>,
    tombstones: BTreeMap<String, Pos>,
    closed: bool,
}

struct Retention {
    stop: mpsc::Sender<()>,
    thread: JoinHandle<()>,
}

/// All databases of a node. Shared as `Arc<Store>`.
pub struct Store {
    opts: StoreOptions,
    strict_verify: std::sync::atomic::AtomicBool,
    dbs_dir: PathBuf,
    inner: Mutex<Inner>,
    retention: Mutex<Option<Retention>>,
    syncer: Mutex<Option<Syncer>>,
    /// Archive watermarks (`None`: no archive, retention by age only).
    archived: Mutex<Option<BTreeMap<String, TxId>>>,
    /// The archive a replica may catch up from (see [`Store::set_archive_sink`]).
    archive_sink: Mutex<Option<Arc<dyn crate::sink::SnapshotSink>>>,
    /// Whether this node takes writes (see [`Store::set_primary`]).
    primary: std::sync::atomic::AtomicBool,
    /// Held shared by every mutating file-system operation from its permission check
    /// to the end of its commit hook; exclusively by a demotion (see
    /// [`Store::write_gate`]).
    write_gate: std::sync::RwLock<()>,
    /// Per database, the lock owners whose write transaction began while this node
    /// was the primary (see [`Store::writer_began`]).
    writers: Mutex<BTreeMap<String, std::collections::BTreeSet<u64>>>,
    /// Bumped after every change of a position or of the set of databases.
    changes: Arc<tokio::sync::watch::Sender<u64>>,
    /// Empty files for named LTX files (see `spare.rs`).
    spares: Arc<spare::Spares>,
    spares_thread: Mutex<Option<JoinHandle<()>>>,
}

/// How long the LTX sync thread lets named files accumulate before it syncs them.
const SYNC_INTERVAL: Duration = Duration::from_secs(1);

/// The thread that makes named LTX files and their directory entries durable in batches
/// (see `ltxlog.rs`).
struct Syncer {
    /// `None` asks the thread to stop.
    tx: mpsc::Sender<Option<String>>,
    thread: JoinHandle<()>,
}

impl Store {
    /// Stops the spare-file thread and waits for it (at most one refill step).
    fn stop_spares(&self) {
        self.spares.stop();
        if let Some(t) = self
            .spares_thread
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .take()
            && t.join().is_err()
        {
            error!("spare-file thread panicked");
        }
    }
}

impl Drop for Store {
    /// A store dropped without [`Store::close`] leaves no thread making spare files in
    /// its data directory (a store opened there next would race it).
    fn drop(&mut self) {
        self.stop_spares();
    }
}

impl std::fmt::Debug for Store {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Store")
            .field("data_dir", &self.opts.data_dir)
            .finish_non_exhaustive()
    }
}

impl Store {
    /// Opens the data directory (creating it if needed) and recovers every database: hot
    /// journal rolled back, WAL cut back to the last captured commit, last LTX re-applied,
    /// checksums rebuilt or taken from the clean-shutdown record. Starts the retention
    /// thread when `retention_monitor_interval` is non-zero.
    ///
    /// # Errors
    /// [`StoreError::ChecksumMismatch`] (naming the database and both checksums) when a
    /// database and its LTX history disagree; I/O and LTX errors naming the file.
    pub fn open(opts: StoreOptions) -> Result<Arc<Store>, StoreError> {
        let dbs_dir = opts.data_dir.join("dbs");
        fs::create_dir_all(&dbs_dir)
            .map_err(|e| StoreError::io("", "create data dir", &dbs_dir, e))?;
        let mut inner = Inner::default();
        let mut names = Vec::new();
        for entry in
            fs::read_dir(&dbs_dir).map_err(|e| StoreError::io("", "list data dir", &dbs_dir, e))?
        {
            let entry = entry.map_err(|e| StoreError::io("", "list data dir", &dbs_dir, e))?;
            let is_dir = entry.file_type().map(|t| t.is_dir()).unwrap_or(false);
            match entry.file_name().into_string() {
                Ok(name)
                    if is_dir
                        && parse_mount_name(&name) == Some((name.as_str(), FileKind::Database)) =>
                {
                    names.push(name)
                }
                Ok(name) => warn!(
                    entry = name,
                    "ignoring unexpected entry in the data directory"
                ),
                Err(name) => warn!(entry = ?name, "ignoring non-UTF-8 entry in the data directory"),
            }
        }
        names.sort();
        for name in names {
            let dir = dbs_dir.join(&name);
            match recovery::recover(&name, &dir, opts.node_id)? {
                Recovered::Live(db, needs_snapshot) => {
                    if needs_snapshot {
                        info!(
                            db = name,
                            "database has no LTX history: capturing it as TXID 1"
                        );
                        let mut st = db.lock();
                        db.capture_database(&mut st)?;
                    }
                    inner.dbs.insert(name, Arc::from(db));
                }
                Recovered::Tombstone(pos) => {
                    inner.tombstones.insert(name, pos);
                }
                Recovered::Nothing => {}
            }
        }
        let spare_dir = opts.data_dir.join("spare");
        let spares = Arc::new(
            spare::Spares::open(spare_dir.clone())
                .map_err(|e| StoreError::io("", "open spare files", &spare_dir, e))?,
        );
        let store = Arc::new(Store {
            opts,
            strict_verify: std::sync::atomic::AtomicBool::new(false),
            dbs_dir,
            inner: Mutex::new(inner),
            retention: Mutex::new(None),
            syncer: Mutex::new(None),
            archived: Mutex::new(None),
            archive_sink: Mutex::new(None),
            primary: std::sync::atomic::AtomicBool::new(true),
            write_gate: std::sync::RwLock::new(()),
            writers: Mutex::new(BTreeMap::new()),
            changes: Arc::new(tokio::sync::watch::Sender::new(0)),
            spares,
            spares_thread: Mutex::new(None),
        });
        for db in store.inner().dbs.values() {
            db.set_changes(store.changes.clone());
            db.set_spares(store.spares.clone());
        }
        store.start_syncer();
        match store.spares.start() {
            Ok(t) => {
                *store
                    .spares_thread
                    .lock()
                    .unwrap_or_else(|p| p.into_inner()) = Some(t)
            }
            Err(e) => {
                warn!(error = %e, "cannot start the spare-file thread; LTX files are created as needed")
            }
        }
        if !store.opts.retention_monitor_interval.is_zero() {
            store.start_retention();
        }
        Ok(store)
    }

    fn inner(&self) -> MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The options the store was opened with.
    pub fn options(&self) -> &StoreOptions {
        &self.opts
    }

    /// Live databases, sorted by name.
    pub fn databases(&self) -> Vec<Arc<Db>> {
        self.inner().dbs.values().cloned().collect()
    }

    /// The live database of that name.
    pub fn db(&self, name: &str) -> Option<Arc<Db>> {
        self.inner().dbs.get(name).cloned()
    }

    /// Deleted databases whose commit-0 LTX file is still kept, with their last position.
    pub fn deleted_databases(&self) -> Vec<(String, Pos)> {
        self.inner()
            .tombstones
            .iter()
            .map(|(n, p)| (n.clone(), *p))
            .collect()
    }

    /// Creates the database (directory, `ltx/`, empty database file) if absent and returns
    /// it. A name that was deleted continues its TXID sequence.
    pub fn create_db(&self, name: &str) -> Result<Arc<Db>, StoreError> {
        if parse_mount_name(name) != Some((name, FileKind::Database)) {
            return Err(StoreError::InvalidName {
                name: name.to_string(),
            });
        }
        let mut inner = self.inner();
        if inner.closed {
            return Err(StoreError::Closed {
                db: name.to_string(),
            });
        }
        if let Some(db) = inner.dbs.get(name) {
            return Ok(db.clone());
        }
        let dir = self.dbs_dir.join(name);
        let ltx_dir = dir.join("ltx");
        fs::create_dir_all(&ltx_dir)
            .map_err(|e| StoreError::io(name, "create db dir", &ltx_dir, e))?;
        let pos = inner.tombstones.remove(name).unwrap_or_default();
        let db = Db::new(
            name.to_string(),
            dir.clone(),
            self.opts.node_id,
            db::DbState::empty(pos),
        );
        let path = db.path(FileKind::Database);
        fs::OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(false)
            .open(&path)
            .and_then(|f| f.sync_all())
            .and_then(|()| ltxio::fsync_dir(&dir))
            .and_then(|()| ltxio::fsync_dir(&self.dbs_dir))
            .map_err(|e| StoreError::io(name, "create database", &path, e))?;
        db.set_strict_verify(
            self.strict_verify
                .load(std::sync::atomic::Ordering::Relaxed),
        );
        if let Some(m) = self
            .syncer
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .as_ref()
        {
            db.set_syncer(m.tx.clone());
        }
        db.set_changes(self.changes.clone());
        db.set_spares(self.spares.clone());
        let db = Arc::new(db);
        inner.dbs.insert(name.to_string(), db.clone());
        self.notify_change();
        info!(db = name, "database created");
        Ok(db)
    }

    /// Deletes a database: an LTX file with commit 0 (unless it never committed, in which
    /// case its directory simply goes), then its database, journal, WAL and shm files.
    /// Handles held by others fail with [`StoreError::Deleted`] afterwards.
    pub fn delete_db(&self, name: &str) -> Result<(), StoreError> {
        let mut inner = self.inner();
        let db = inner
            .dbs
            .get(name)
            .cloned()
            .ok_or_else(|| StoreError::NotFound {
                name: name.to_string(),
            })?;
        let pos = db.delete()?;
        inner.dbs.remove(name);
        if pos.txid.0 == 0 {
            fs::remove_dir_all(db.dir())
                .map_err(|e| StoreError::io(name, "remove db dir", db.dir(), e))?;
        } else {
            inner.tombstones.insert(name.to_string(), pos);
        }
        self.notify_change();
        Ok(())
    }

    /// Clean shutdown: stops retention and writes each database's clean-shutdown record
    /// (position and page checksums), so the next open needs no re-hash. Every hook fails
    /// afterwards.
    pub fn close(&self) -> Result<(), StoreError> {
        self.stop_spares();
        // Replicated changes are synced (and their markers removed) before the records.
        if let Err(e) = self.sync_replicated() {
            error!(error = %e, "cannot sync replicated changes");
        }
        if let Some(r) = self
            .retention
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .take()
        {
            drop(r.stop);
            if r.thread.join().is_err() {
                error!("retention thread panicked");
            }
        }
        let syncer = self.syncer.lock().unwrap_or_else(|p| p.into_inner()).take();
        if let Some(m) = syncer {
            // Not under the inner lock: the thread looks databases up through it.
            let _ = m.tx.send(None);
            if m.thread.join().is_err() {
                error!("LTX sync thread panicked");
            }
        }
        let mut inner = self.inner();
        inner.closed = true;
        for db in inner.dbs.values() {
            db.clear_syncer();
            db.sync_ltx_files()?;
        }
        for db in inner.dbs.values() {
            let mut st = db.lock();
            if st.closed || st.deleted {
                continue;
            }
            st.closed = true;
            let stamp = |kind| {
                let p = db.path(kind);
                Stamp::of(&p).map_err(|e| StoreError::io(db.name(), "stat", &p, e))
            };
            let rec = CleanRecord {
                pos: st.pos,
                page_size: st.page_size.unwrap_or(0),
                commit: st.commit,
                checksums: st.checksums.clone(),
                database: stamp(FileKind::Database)?,
                wal: stamp(FileKind::Wal)?,
            };
            rec.write(db.dir()).map_err(|e| {
                StoreError::io(db.name(), "write clean-shutdown record", db.dir(), e)
            })?;
        }
        info!(databases = inner.dbs.len(), "store closed");
        Ok(())
    }

    /// Turns `strict-verify` on or off for every database, present and future: after each
    /// capture the whole database is re-hashed and compared with the position (O(database)
    /// per commit; for tests). A failure means the database changed behind the store's
    /// back after the LTX file was written: treat it as fatal, as LiteFS does.
    pub fn set_strict_verify(&self, on: bool) {
        self.strict_verify
            .store(on, std::sync::atomic::Ordering::Relaxed);
        for db in self.inner().dbs.values() {
            db.set_strict_verify(on);
        }
    }

    /// Whether this node takes writes: true unless [`Store::set_primary`] made it a
    /// replica.
    pub fn is_primary(&self) -> bool {
        self.primary.load(std::sync::atomic::Ordering::Acquire)
    }

    /// From now on retention keeps every LTX file not yet shipped to the archive: a
    /// database without a watermark keeps all its files. Called once by the archiver.
    pub fn hold_for_archive(&self) {
        let mut a = self.archived.lock().unwrap_or_else(|p| p.into_inner());
        a.get_or_insert_with(BTreeMap::new);
    }

    /// Names the archive this node's replica loop may catch up from instead of asking
    /// the primary for a snapshot (`backup` set).
    pub fn set_archive_sink(&self, sink: Arc<dyn crate::sink::SnapshotSink>) {
        *self.archive_sink.lock().unwrap_or_else(|p| p.into_inner()) = Some(sink);
    }

    /// The archive set by [`Store::set_archive_sink`].
    pub fn archive_sink(&self) -> Option<Arc<dyn crate::sink::SnapshotSink>> {
        self.archive_sink
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    /// Records that every LTX file of `db` up to `txid` is in the archive, so retention
    /// may remove them (by age, as usual).
    pub fn set_archived(&self, db: &str, txid: TxId) {
        let mut a = self.archived.lock().unwrap_or_else(|p| p.into_inner());
        a.get_or_insert_with(BTreeMap::new)
            .insert(db.to_string(), txid);
    }

    /// The archive watermark of `db` set by [`Store::set_archived`]; `None` before one
    /// was set.
    pub fn archived(&self, db: &str) -> Option<TxId> {
        let a = self.archived.lock().unwrap_or_else(|p| p.into_inner());
        a.as_ref().and_then(|m| m.get(db).copied())
    }

    /// Highest TXID retention may remove for `db`; `None` when no archive holds files.
    fn archive_floor(&self, db: &str) -> Option<TxId> {
        let a = self.archived.lock().unwrap_or_else(|p| p.into_inner());
        a.as_ref().map(|m| m.get(db).copied().unwrap_or_default())
    }

    /// One retention pass at time `now`: removes every LTX file whose modification time is
    /// older than `now - retention`, except each database's newest file; removes the
    /// directory of a deleted database once its commit-0 file is that old. Returns the
    /// number of LTX files removed.
    pub fn retention_pass(&self, now: SystemTime) -> Result<usize, StoreError> {
        let cutoff = now
            .checked_sub(self.opts.retention)
            .unwrap_or(SystemTime::UNIX_EPOCH);
        let (live, deleted): (Vec<_>, Vec<_>) = {
            let inner = self.inner();
            (
                inner
                    .dbs
                    .values()
                    .map(|d| (d.name().to_string(), d.ltx_dir()))
                    .collect(),
                inner.tombstones.keys().cloned().collect(),
            )
        };
        let mut removed = 0;
        for (name, dir) in live {
            removed += prune(&name, &dir, cutoff, self.archive_floor(&name))?;
        }
        for name in deleted {
            let dir = self.dbs_dir.join(&name);
            removed += prune(&name, &dir.join("ltx"), cutoff, self.archive_floor(&name))?;
            let files = ltxio::list(&dir.join("ltx"))
                .map_err(|e| StoreError::io(&name, "list ltx", &dir, e))?;
            let floor = self.archive_floor(&name);
            let expired = match files.last() {
                Some(f) if floor.is_some_and(|t| f.max > t) => false,
                Some(f) => older_than(&f.path, cutoff)
                    .map_err(|e| StoreError::io(&name, "stat ltx", &f.path, e))?,
                None => true,
            };
            if expired {
                let mut inner = self.inner();
                // Re-check under the lock: create_db may have revived the name meanwhile.
                if inner.tombstones.remove(&name).is_some() {
                    removed += files.len();
                    fs::remove_dir_all(&dir)
                        .map_err(|e| StoreError::io(&name, "remove db dir", &dir, e))?;
                    info!(db = name, "removed deleted database after retention");
                }
            }
        }
        Ok(removed)
    }

    fn start_syncer(self: &Arc<Self>) {
        let (tx, rx) = mpsc::channel::<Option<String>>();
        let weak: Weak<Store> = Arc::downgrade(self);
        let spawned = std::thread::Builder::new()
            .name("litefs-ltx-sync".into())
            .spawn(move || {
                loop {
                    // The timeout lets the thread notice a store dropped without close().
                    let first = match rx.recv_timeout(Duration::from_secs(1)) {
                        Ok(Some(name)) => name,
                        Ok(None) | Err(RecvTimeoutError::Disconnected) => return,
                        Err(RecvTimeoutError::Timeout) => {
                            if weak.strong_count() == 0 {
                                return;
                            }
                            continue;
                        }
                    };
                    // Named files are durable through their log records until then:
                    // one sync a second covers every file written meanwhile, at the cost
                    // of one device flush instead of one per file.
                    let deadline = Instant::now() + SYNC_INTERVAL;
                    let mut names = std::collections::BTreeSet::from([first]);
                    loop {
                        match rx.recv_timeout(deadline.saturating_duration_since(Instant::now())) {
                            Ok(Some(n)) => {
                                names.insert(n);
                            }
                            // close() syncs every database itself after the thread ends.
                            Ok(None) | Err(RecvTimeoutError::Disconnected) => return,
                            Err(RecvTimeoutError::Timeout) => break,
                        }
                    }
                    let Some(store) = weak.upgrade() else { return };
                    // What each database had written before the round's first sync: one
                    // `syncfs` covers every database on that file system.
                    let pending: Vec<_> = names
                        .iter()
                        .filter_map(|n| store.db(n))
                        .map(|db| {
                            let written = db.take_sync_request();
                            (db, written)
                        })
                        .collect();
                    let mut synced = Vec::new();
                    for (db, written) in pending {
                        if let Err(e) = db.sync_ltx_files_upto(written, &mut synced) {
                            error!(error = %e, "cannot sync LTX files; they stay in the LTX log");
                        }
                    }
                }
            });
        match spawned {
            Ok(thread) => {
                for db in self.inner().dbs.values() {
                    db.set_syncer(tx.clone());
                }
                *self.syncer.lock().unwrap_or_else(|p| p.into_inner()) =
                    Some(Syncer { tx, thread });
            }
            Err(e) => {
                warn!(error = %e, "cannot start the LTX sync thread; LTX files are fsynced when the log restarts")
            }
        }
    }

    fn start_retention(self: &Arc<Self>) {
        let (tx, rx) = mpsc::channel::<()>();
        let weak: Weak<Store> = Arc::downgrade(self);
        let interval = self.opts.retention_monitor_interval;
        let spawned = std::thread::Builder::new()
            .name("litefs-retention".into())
            .spawn(move || {
                loop {
                    match rx.recv_timeout(interval) {
                        Err(RecvTimeoutError::Timeout) => {}
                        _ => return,
                    }
                    let Some(store) = weak.upgrade() else { return };
                    match store.retention_pass(SystemTime::now()) {
                        Ok(0) => {}
                        Ok(n) => info!(files = n, "retention removed LTX files"),
                        Err(e) => warn!(error = %e, "retention pass failed"),
                    }
                }
            });
        match spawned {
            Ok(thread) => {
                *self.retention.lock().unwrap_or_else(|p| p.into_inner()) =
                    Some(Retention { stop: tx, thread })
            }
            Err(e) => {
                error!(error = %e, "cannot start the retention thread; old LTX files will not be removed")
            }
        }
    }
}

fn older_than(path: &Path, cutoff: SystemTime) -> io::Result<bool> {
    match fs::metadata(path) {
        Ok(m) => Ok(m.modified()? < cutoff),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(false),
        Err(e) => Err(e),
    }
}

/// Removes expired LTX files of one directory, never the newest, never one above the
/// archive watermark `floor`.
fn prune(
    db: &str,
    dir: &Path,
    cutoff: SystemTime,
    floor: Option<TxId>,
) -> Result<usize, StoreError> {
    let files = ltxio::list(dir).map_err(|e| StoreError::io(db, "list ltx", dir, e))?;
    let mut removed = 0;
    if let Some((_, older)) = files.split_last() {
        for f in older {
            if floor.is_some_and(|t| f.max > t) {
                continue;
            }
            if older_than(&f.path, cutoff)
                .map_err(|e| StoreError::io(db, "stat ltx", &f.path, e))?
                && ltxio::remove_file_if_exists(&f.path)
                    .map_err(|e| StoreError::io(db, "remove ltx", &f.path, e))?
            {
                removed += 1;
            }
        }
    }
    Ok(removed)
}

#[cfg(test)]
pub(crate) mod testutil;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mount_names() {
        assert_eq!(
            parse_mount_name("app.db"),
            Some(("app.db", FileKind::Database))
        );
        assert_eq!(
            parse_mount_name("app.db-journal"),
            Some(("app.db", FileKind::Journal))
        );
        assert_eq!(
            parse_mount_name("app.db-wal"),
            Some(("app.db", FileKind::Wal))
        );
        assert_eq!(
            parse_mount_name("app.db-shm"),
            Some(("app.db", FileKind::Shm))
        );
        assert_eq!(parse_mount_name("app.db-pos"), None);
        assert_eq!(parse_mount_name("app.db-lock"), None);
        assert_eq!(parse_mount_name(".primary"), None);
        assert_eq!(parse_mount_name("-wal"), None);
        assert_eq!(parse_mount_name(""), None);
        assert_eq!(parse_mount_name("a/b"), None);
    }
}
