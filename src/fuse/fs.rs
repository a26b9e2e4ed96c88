//! The [`fuser::Filesystem`] implementation: a flat root directory mirroring the
//! store's databases, their side files and the virtual files.

use std::collections::HashMap;
use std::ffi::OsStr;
use std::fs::{File, OpenOptions};
use std::io;
use std::os::unix::fs::{FileExt, MetadataExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, RwLock};
use std::time::{Duration, SystemTime};

use fuser::{
    Errno, FileAttr, FileHandle, FileType, FopenFlags, Generation, INodeNo, InitFlags,
    KernelConfig, LockOwner, OpenAccMode, OpenFlags, RenameFlags, ReplyAttr, ReplyCreate,
    ReplyData, ReplyDirectory, ReplyEmpty, ReplyEntry, ReplyLock, ReplyOpen, ReplyStatfs,
    ReplyWrite, ReplyXattr, Request, TimeOrNow, WriteFlags,
};
use tracing::{debug, error, info, warn};

use super::locks::{LockKind, LockTable};
use crate::store::{Db, FileKind, Store, StoreError, parse_mount_name};

/// How long the kernel may cache names and attributes. Every change to a file on a
/// primary goes through this mount, so the kernel's own bookkeeping stays right; the
/// short TTL bounds staleness for changes the store makes behind the kernel's back
/// (side files removed by `delete_db`).
const TTL: Duration = Duration::from_secs(1);

const ROOT: u64 = 1;
const PRIMARY_FILE: &str = ".primary";
const LAG_FILE: &str = ".lag";
/// Lock owner under which a replica applying an LTX file holds SQLite's locks.
const REPLICA_OWNER: u64 = u64::MAX;
/// Database-file lock bytes a rollback-mode writer holds: PENDING, RESERVED, SHARED.
pub(super) const DB_LOCKS: (u64, u64) = (0x4000_0000, 0x4000_0000 + 2 + 510 - 1);
/// WAL-index lock bytes taken exclusively while applying: WRITE, CKPT, RECOVER,
/// READ0-4.
const SHM_LOCKS: (u64, u64) = (120, 127);
/// The WAL-index dead-man switch, held shared.
const SHM_DMS: u64 = 128;
const POS_SUFFIX: &str = "-pos";
/// `<db>-lock`: byte 72 is the HALT lock (write forwarding, see `halt.rs`).
const LOCK_SUFFIX: &str = "-lock";

/// Byte offsets of the WAL-index locks SQLite takes on the `-shm` file.
const SHM_WRITE: u64 = 120;
const SHM_CKPT: u64 = 121;
/// SQLite's RESERVED lock byte of a database file: a rollback-mode writer holds it.
pub(super) const DB_RESERVED: u64 = DB_LOCKS.0 + 1;

/// A POSIX lock request from the kernel: owner, pid, inclusive byte range, type.
#[derive(Clone, Copy, Debug)]
struct LockRequest {
    owner: u64,
    pid: u32,
    start: u64,
    end: u64,
    typ: i32,
}

/// What an inode number stands for.
#[derive(Clone, Debug, PartialEq, Eq)]
enum Node {
    File { db: String, kind: FileKind },
    Pos { db: String },
    Lock { db: String },
    Primary,
    Lag,
}

/// Inode numbers, handed out per name and kept while the name exists, so `ls -i`
/// and the kernel see one number per file. A name that is removed and created again
/// gets a fresh number, which keeps the kernel from mixing up the two files' caches.
#[derive(Default)]
struct Inodes {
    by_ino: HashMap<u64, Node>,
    by_name: HashMap<String, u64>,
    next: u64,
}

impl Inodes {
    fn ino_for(&mut self, name: &str, node: Node) -> u64 {
        if let Some(&ino) = self.by_name.get(name)
            && self.by_ino.get(&ino) == Some(&node)
        {
            return ino;
        }
        self.next = self.next.max(ROOT) + 1;
        let ino = self.next;
        self.by_ino.insert(ino, node);
        self.by_name.insert(name.to_string(), ino);
        ino
    }

    fn forget_name(&mut self, name: &str) {
        self.by_name.remove(name);
    }
}

/// One open file.
enum Handle {
    Real {
        db: Arc<Db>,
        kind: FileKind,
        file: File,
        /// The database was written through this handle since its last flush/fsync.
        dirty: AtomicBool,
        /// Opened, or used to take SQLite's writer lock, while this node was the
        /// primary: a connection that may try to write after a demotion (see
        /// [`Shared::refused_writer_lock`]).
        primary_era: AtomicBool,
    },
    Virtual {
        data: Vec<u8>,
    },
    /// An open `<db>-lock` file: no content, only its locks count.
    Lock {
        db: String,
    },
}

/// State shared between the kernel-facing [`LiteFs`] and the mount runner.
pub(crate) struct Shared {
    pub(super) store: Arc<Store>,
    data_dir: PathBuf,
    inodes: Mutex<Inodes>,
    handles: RwLock<HashMap<u64, Arc<Handle>>>,
    next_fh: AtomicU64,
    pub(super) locks: Mutex<HashMap<(String, FileKind), LockTable>>,
    /// HALT locks taken through `<db>-lock` files (see `halt.rs`), by database.
    pub(super) halts: Mutex<HashMap<String, super::halt::HaltHold>>,
    /// How a replica reaches its primary's `/halt` and `/tx`.
    pub(super) halt_client: std::sync::OnceLock<Arc<dyn crate::halt::HaltClient>>,
    /// The kernel connection, to drop cached pages changed behind the kernel's back.
    pub(super) notifier: std::sync::OnceLock<fuser::Notifier>,
    primary_hostname: RwLock<Option<String>>,
    /// What `.lag` shows on a replica.
    lag: RwLock<Option<Arc<crate::replicate::replica::Lag>>>,
    /// Set when a committed transaction could not be captured (see `set_fatal`).
    fatal: Mutex<Option<String>>,
    /// Database directories with entries created, removed or renamed through the mount
    /// since the last `fsyncdir`: the only ones it needs to fsync.
    dirty_dirs: Mutex<std::collections::HashSet<PathBuf>>,
    /// `fuse.debug`: log every operation that changes something or takes a lock.
    debug: bool,
    uid: u32,
    gid: u32,
}

impl Shared {
    pub(crate) fn new(store: Arc<Store>, data_dir: PathBuf, debug: bool) -> Arc<Self> {
        // SAFETY: geteuid/getegid have no preconditions and cannot fail.
        let (uid, gid) = unsafe { (libc::geteuid(), libc::getegid()) };
        Arc::new(Shared {
            store,
            data_dir,
            inodes: Mutex::new(Inodes::default()),
            handles: RwLock::new(HashMap::new()),
            next_fh: AtomicU64::new(1),
            locks: Mutex::new(HashMap::new()),
            halts: Mutex::new(HashMap::new()),
            halt_client: std::sync::OnceLock::new(),
            notifier: std::sync::OnceLock::new(),
            primary_hostname: RwLock::new(None),
            lag: RwLock::new(None),
            fatal: Mutex::new(None),
            dirty_dirs: Mutex::new(std::collections::HashSet::new()),
            debug,
            uid,
            gid,
        })
    }

    pub(crate) fn set_primary_hostname(&self, hostname: Option<String>) {
        *write_lock(&self.primary_hostname) = hostname;
    }

    pub(crate) fn set_lag(&self, lag: Arc<crate::replicate::replica::Lag>) {
        *write_lock(&self.lag) = Some(lag);
    }

    pub(crate) fn store(&self) -> &Arc<Store> {
        &self.store
    }

    /// The inode number the kernel knows `name` by, if it looked it up.
    pub(crate) fn ino_of(&self, name: &str) -> Option<u64> {
        lock(&self.inodes).by_name.get(name).copied()
    }

    /// Takes, for a replica applying a file to `db`, the locks a writer would hold
    /// against local readers: in WAL mode (`wal`) WRITE, CKPT, RECOVER and READ0-4
    /// exclusively and DMS shared on the WAL index (WAL-mode connections hold SHARED on
    /// the database for as long as they are open, so the database's bytes are left
    /// alone); in rollback mode PENDING, RESERVED and SHARED on the database. Locks
    /// already taken are kept, so repeated calls make progress while readers come and
    /// go (PENDING and WRITE first keep new transactions out). Returns true once all
    /// are held.
    pub(crate) fn try_replica_locks(&self, db: &str, wal: bool) -> bool {
        let mut tables = lock(&self.locks);
        let steps: &[(FileKind, u64, u64, LockKind)] = if wal {
            &[
                (FileKind::Shm, SHM_LOCKS.0, SHM_LOCKS.0 + 2, LockKind::Write),
                (FileKind::Shm, SHM_LOCKS.0 + 3, SHM_LOCKS.1, LockKind::Write),
                (FileKind::Shm, SHM_DMS, SHM_DMS, LockKind::Read),
            ]
        } else {
            &[
                (
                    FileKind::Database,
                    DB_LOCKS.0,
                    DB_LOCKS.0 + 1,
                    LockKind::Write,
                ),
                (
                    FileKind::Database,
                    DB_LOCKS.0 + 2,
                    DB_LOCKS.1,
                    LockKind::Write,
                ),
            ]
        };
        let mut all = true;
        for &(kind, start, end, lk) in steps {
            let t = tables.entry((db.to_string(), kind)).or_default();
            if t.holds(REPLICA_OWNER, end) == Some(lk) && t.holds(REPLICA_OWNER, start) == Some(lk)
            {
                continue;
            }
            if t.lock(REPLICA_OWNER, 0, start, end, lk).is_err() {
                all = false;
            }
        }
        all
    }

    /// Releases what [`Shared::try_replica_locks`] took.
    pub(crate) fn release_replica_locks(&self, db: &str) {
        let mut tables = lock(&self.locks);
        for kind in [FileKind::Database, FileKind::Shm] {
            if let Some(t) = tables.get_mut(&(db.to_string(), kind)) {
                t.release_owner(REPLICA_OWNER);
            }
        }
    }
}

/// The file system handed to fuser.
pub(crate) struct LiteFs {
    shared: Arc<Shared>,
}

impl LiteFs {
    pub(crate) fn new(shared: Arc<Shared>) -> Self {
        LiteFs { shared }
    }
}

pub(super) fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    // A panic in another FUSE thread must not take the whole mount down with it.
    m.lock().unwrap_or_else(|e| e.into_inner())
}

fn read_lock<T>(m: &RwLock<T>) -> std::sync::RwLockReadGuard<'_, T> {
    m.read().unwrap_or_else(|e| e.into_inner())
}

fn write_lock<T>(m: &RwLock<T>) -> std::sync::RwLockWriteGuard<'_, T> {
    m.write().unwrap_or_else(|e| e.into_inner())
}

/// The one place where failures become errno values: I/O errors keep their OS code,
/// store hook errors are logged and become `EIO`.
fn io_errno(op: &str, path: &Path, e: io::Error) -> Errno {
    if e.kind() != io::ErrorKind::NotFound {
        warn!(op, path = %path.display(), error = %e, "I/O error in the data directory");
    }
    Errno::from(e)
}

fn hook_errno(hook: &'static str, db: &Db, r: Result<(), StoreError>) -> Result<(), Errno> {
    r.map_err(|e| {
        error!(db = db.name(), hook, error = %e, "store hook failed; answering EIO");
        Errno::EIO
    })
}

impl Shared {
    /// A hook of an operation that can end a transaction. A transaction the primary
    /// refused (write forwarding) was rolled back in the database file behind the
    /// kernel's back: its cached pages are dropped before SQLite hears of the error.
    fn commit_hook(
        &self,
        hook: &'static str,
        db: &Db,
        r: Result<(), StoreError>,
    ) -> Result<(), Errno> {
        if matches!(r, Err(StoreError::Forward { .. })) {
            self.invalidate(db.name());
        }
        hook_errno(hook, db, r)
    }

    /// Drops the kernel's cached pages and attributes of database `db`.
    pub(super) fn invalidate(&self, db: &str) {
        if let (Some(n), Some(ino)) = (self.notifier.get(), self.ino_of(db))
            && let Err(e) = n.inval_inode(INodeNo(ino), 0, 0)
            && e.raw_os_error() != Some(libc::ENOENT)
        {
            warn!(db, error = %e, "cannot invalidate the kernel's cache of the database");
        }
    }

    /// A replica writing under the HALT lock: its changes must be undoable if the
    /// primary refuses them, so database pages are written only inside a
    /// rollback-journal transaction (not `journal_mode=OFF` or `MEMORY`).
    fn check_forwarded_write(&self, db: &Db) -> Result<(), Errno> {
        if self.store.is_primary() || !db.is_forwarding() || db.journal_open() {
            return Ok(());
        }
        error!(
            db = db.name(),
            "write refused: write forwarding needs a rollback journal \
             (journal_mode DELETE, TRUNCATE or PERSIST)"
        );
        Err(Errno::EROFS)
    }
}

fn mount_name(db: &str, kind: FileKind) -> String {
    match kind {
        FileKind::Database => db.to_string(),
        FileKind::Journal => format!("{db}-journal"),
        FileKind::Wal => format!("{db}-wal"),
        FileKind::Shm => format!("{db}-shm"),
    }
}

fn pos_content(db: &Db) -> Vec<u8> {
    format!("{}\n", db.pos()).into_bytes()
}

pub(super) fn covers(start: u64, end: u64, byte: u64) -> bool {
    start <= byte && byte <= end
}

impl Shared {
    /// `fuse.debug` logging of one operation.
    fn trace(&self, op: &str, args: std::fmt::Arguments<'_>) {
        if self.debug {
            info!(target: "litefs::fuse::ops", "{op} {args}");
        }
    }

    fn db(&self, name: &str) -> Result<Arc<Db>, Errno> {
        self.store.db(name).ok_or(Errno::ENOENT)
    }

    fn node(&self, ino: u64) -> Result<Node, Errno> {
        lock(&self.inodes)
            .by_ino
            .get(&ino)
            .cloned()
            .ok_or(Errno::ENOENT)
    }

    fn handle(&self, fh: FileHandle) -> Result<Arc<Handle>, Errno> {
        read_lock(&self.handles)
            .get(&fh.0)
            .cloned()
            .ok_or(Errno::EBADF)
    }

    fn add_handle(&self, h: Handle) -> FileHandle {
        let fh = self.next_fh.fetch_add(1, Ordering::Relaxed);
        write_lock(&self.handles).insert(fh, Arc::new(h));
        FileHandle(fh)
    }

    /// Resolves a name in the root directory.
    fn resolve(&self, name: &str) -> Result<Node, Errno> {
        if name == PRIMARY_FILE || name == LAG_FILE {
            return if self.store.is_primary() {
                Err(Errno::ENOENT)
            } else if name == LAG_FILE {
                Ok(Node::Lag)
            } else {
                Ok(Node::Primary)
            };
        }
        if let Some(db) = name.strip_suffix(POS_SUFFIX)
            && self.store.db(db).is_some()
        {
            return Ok(Node::Pos { db: db.to_string() });
        }
        if let Some(db) = name.strip_suffix(LOCK_SUFFIX)
            && self.store.db(db).is_some()
        {
            return Ok(Node::Lock { db: db.to_string() });
        }
        let (db, kind) = parse_mount_name(name).ok_or(Errno::ENOENT)?;
        let d = self.db(db)?;
        if !d.path(kind).exists() {
            return Err(Errno::ENOENT);
        }
        Ok(Node::File {
            db: db.to_string(),
            kind,
        })
    }

    fn virtual_content(&self, node: &Node) -> Result<Vec<u8>, Errno> {
        match node {
            Node::Pos { db } => Ok(pos_content(&*self.db(db)?)),
            Node::Primary => Ok(format!(
                "{}\n",
                read_lock(&self.primary_hostname).as_deref().unwrap_or("")
            )
            .into_bytes()),
            Node::Lag => Ok(format!(
                "{}\n",
                read_lock(&self.lag).as_ref().map_or(0, |l| l.millis())
            )
            .into_bytes()),
            Node::Lock { .. } => Ok(Vec::new()),
            Node::File { .. } => Err(Errno::EINVAL),
        }
    }

    fn root_attr(&self) -> FileAttr {
        let mtime = std::fs::metadata(&self.data_dir)
            .and_then(|m| m.modified())
            .unwrap_or(SystemTime::UNIX_EPOCH);
        FileAttr {
            ino: INodeNo(ROOT),
            size: 0,
            blocks: 0,
            atime: mtime,
            mtime,
            ctime: mtime,
            crtime: mtime,
            kind: FileType::Directory,
            perm: if self.store.is_primary() {
                0o777
            } else {
                0o555
            },
            nlink: 2,
            uid: self.uid,
            gid: self.gid,
            rdev: 0,
            blksize: 4096,
            flags: 0,
        }
    }

    fn file_attr(&self, ino: u64, meta: &std::fs::Metadata) -> FileAttr {
        let t = |r: io::Result<SystemTime>| r.unwrap_or(SystemTime::UNIX_EPOCH);
        let mtime = t(meta.modified());
        FileAttr {
            ino: INodeNo(ino),
            size: meta.len(),
            blocks: meta.blocks(),
            atime: t(meta.accessed()),
            mtime,
            ctime: SystemTime::UNIX_EPOCH + Duration::new(meta.ctime().max(0) as u64, 0),
            crtime: mtime,
            kind: FileType::RegularFile,
            perm: (meta.mode() & 0o7777) as u16,
            nlink: 1,
            uid: meta.uid(),
            gid: meta.gid(),
            rdev: 0,
            blksize: 4096,
            flags: 0,
        }
    }

    fn virtual_attr(&self, ino: u64, size: u64) -> FileAttr {
        let now = SystemTime::now();
        FileAttr {
            ino: INodeNo(ino),
            size,
            blocks: size.div_ceil(512),
            atime: now,
            mtime: now,
            ctime: now,
            crtime: now,
            kind: FileType::RegularFile,
            perm: 0o444,
            nlink: 1,
            uid: self.uid,
            gid: self.gid,
            rdev: 0,
            blksize: 4096,
            flags: 0,
        }
    }

    fn attr(&self, ino: u64, node: &Node, handle: Option<&Handle>) -> Result<FileAttr, Errno> {
        match node {
            Node::File { db, kind } => {
                let meta = match handle {
                    Some(Handle::Real { file, .. }) => file.metadata(),
                    _ => std::fs::metadata(self.db(db)?.path(*kind)),
                };
                let meta = meta.map_err(Errno::from)?;
                Ok(self.file_attr(ino, &meta))
            }
            Node::Pos { .. } | Node::Primary | Node::Lag => {
                let len = self.virtual_content(node)?.len() as u64;
                Ok(self.virtual_attr(ino, len))
            }
            Node::Lock { .. } => {
                // Opened for writing by whoever takes the HALT lock (F_WRLCK needs it).
                let mut attr = self.virtual_attr(ino, 0);
                attr.perm = 0o666;
                Ok(attr)
            }
        }
    }

    /// Whether a missing `name` may be cached as absent by the kernel: a side file of an
    /// existing database, on a primary.
    fn negative_cacheable(&self, name: &OsStr) -> bool {
        self.store.is_primary()
            && name
                .to_str()
                .and_then(parse_mount_name)
                .is_some_and(|(db, kind)| kind != FileKind::Database && self.store.db(db).is_some())
    }

    fn lookup_name(&self, name: &str) -> Result<(u64, FileAttr), Errno> {
        let node = self.resolve(name)?;
        let ino = lock(&self.inodes).ino_for(name, node.clone());
        Ok((ino, self.attr(ino, &node, None)?))
    }

    fn open_flags(&self) -> FopenFlags {
        // On a primary every byte of every file changes only through this mount, and
        // without the writeback cache the kernel's page cache is updated by each write
        // as it passes through: cached pages stay right across opens.
        if self.store.is_primary() {
            FopenFlags::FOPEN_KEEP_CACHE
        } else {
            FopenFlags::empty()
        }
    }

    /// Truncates a real file, calling the store hooks around it.
    fn truncate(&self, db: &Db, kind: FileKind, file: &File, size: u64) -> Result<(), Errno> {
        match kind {
            FileKind::Journal => {
                self.commit_hook("journal_truncate", db, db.journal_truncate(size))?
            }
            FileKind::Wal => hook_errno("wal_truncate", db, db.wal_truncate(size))?,
            FileKind::Database | FileKind::Shm => {}
        }
        file.set_len(size)
            .map_err(|e| io_errno("truncate", &db.path(kind), e))?;
        if kind == FileKind::Database {
            hook_errno("database_truncated", db, db.database_truncated(size))?;
        }
        Ok(())
    }

    fn open_real(
        &self,
        db: &Db,
        kind: FileKind,
        flags: i32,
        create_mode: Option<u32>,
    ) -> Result<File, Errno> {
        let path = db.path(kind);
        self.trace(
            "open",
            format_args!("{} {kind:?} flags={flags:#x}", db.name()),
        );
        let acc = OpenFlags(flags).acc_mode();
        let writable = acc != OpenAccMode::O_RDONLY;
        let _gate = self.store.write_gate();
        // A replica's readers keep the WAL index (and, in WAL mode, an empty WAL) of
        // their own; only the database and its journal are read-only.
        if writable && !self.store.may_write(db.name()) && !replica_writable(kind) {
            return Err(Errno::EACCES);
        }
        let mut opts = OpenOptions::new();
        // Reads of a write-only handle never reach us; always opening readable keeps
        // one code path for pread.
        opts.read(true).write(writable);
        if let Some(mode) = create_mode {
            opts.create(true).mode(mode);
            if flags & libc::O_EXCL != 0 {
                opts.create_new(true);
            }
        }
        let file = opts.open(&path).map_err(|e| io_errno("open", &path, e))?;
        if flags & libc::O_TRUNC != 0 && writable {
            self.truncate(db, kind, &file, 0)?;
        }
        Ok(file)
    }

    fn release_locks(&self, db: &Db, kind: FileKind, owner: u64) {
        let key = (db.name().to_string(), kind);
        if kind == FileKind::Shm {
            let holds_write = lock(&self.locks)
                .get(&key)
                .and_then(|t| t.holds(owner, SHM_WRITE))
                == Some(LockKind::Write);
            if holds_write && let Err(e) = db.wal_write_lock_released() {
                self.set_fatal(db, &e);
            }
        }
        if let Some(t) = lock(&self.locks).get_mut(&key) {
            t.release_owner(owner);
        }
        self.sync_writer(db.name(), owner);
    }

    /// Tells the store when `owner` no longer holds SQLite's writer lock on `db`
    /// (WAL-index WRITE or the database's RESERVED byte): its transaction ended.
    fn sync_writer(&self, db: &str, owner: u64) {
        let tables = lock(&self.locks);
        let holds = |kind, byte| {
            tables
                .get(&(db.to_string(), kind))
                .and_then(|t| t.holds(owner, byte))
                == Some(LockKind::Write)
        };
        if !holds(FileKind::Shm, SHM_WRITE) && !holds(FileKind::Database, DB_RESERVED) {
            drop(tables);
            self.store.writer_ended(db, owner);
        }
    }

    /// The node can no longer vouch for its history: a capture failed after SQLite
    /// considered the transaction committed (it ignores errors from unlocking and
    /// closing), a write would change WAL frames already captured, or an fsync of the
    /// WAL failed after its frames were captured. The mount runner stops with exit
    /// status 99, as LiteFS does; the next start-up cuts uncaptured frames off and
    /// re-applies LTX files whose frames were lost.
    fn set_fatal(&self, db: &Db, e: &StoreError) {
        error!(db = db.name(), error = %e, "stopping (exit 99)");
        let mut f = lock(&self.fatal);
        if f.is_none() {
            *f = Some(format!("database {}: {e}", db.name()));
        }
    }

    pub(crate) fn fatal(&self) -> Option<String> {
        lock(&self.fatal).clone()
    }

    fn flush_handle(&self, h: &Handle) -> Result<(), Errno> {
        if let Handle::Real {
            db,
            kind: FileKind::Database,
            dirty,
            ..
        } = h
            && dirty.swap(false, Ordering::AcqRel)
        {
            hook_errno("database_flushed", db, db.database_flushed())?;
        }
        Ok(())
    }

    fn do_write(&self, h: &Handle, offset: u64, data: &[u8]) -> Result<u32, Errno> {
        let Handle::Real {
            db,
            kind,
            file,
            dirty,
            ..
        } = h
        else {
            return Err(Errno::EACCES);
        };
        self.trace(
            "write",
            format_args!("{} {kind:?} @{offset} +{}", db.name(), data.len()),
        );
        let pwrite = |file: &File| {
            file.write_all_at(data, offset)
                .map_err(|e| io_errno("write", &db.path(*kind), e))
        };
        // Held to the end of the commit hook the write may trigger.
        let _gate = self.store.write_gate();
        if *kind != FileKind::Shm
            && !self.store.may_write(db.name())
            && !self.discardable_journal(db, *kind)
        {
            debug!(
                db = db.name(),
                "write refused: not the primary, and no transaction begun as primary"
            );
            return Err(Errno::EROFS);
        }
        match kind {
            FileKind::Database => {
                self.check_forwarded_write(db)?;
                pwrite(file)?;
                dirty.store(true, Ordering::Release);
                hook_errno(
                    "database_written",
                    db,
                    db.database_written(offset, data.len()),
                )?;
            }
            FileKind::Journal => {
                self.commit_hook("journal_write", db, db.journal_write(offset, data))?;
                pwrite(file)?;
            }
            FileKind::Wal => {
                // In WAL mode every WAL write happens under the WAL-index WRITE lock. A
                // writer without it uses heap memory for the index
                // (`locking_mode=EXCLUSIVE`): its commits would be invisible to us.
                let key = (db.name().to_string(), FileKind::Shm);
                let locked = lock(&self.locks)
                    .get(&key)
                    .and_then(|t| t.write_holder(SHM_WRITE))
                    .is_some();
                if !locked {
                    error!(
                        db = db.name(),
                        "WAL write without the WAL-index write lock: \
                         locking_mode=EXCLUSIVE is not supported with journal_mode=WAL; \
                         refusing the write"
                    );
                    return Err(Errno::EIO);
                }
                if let Err(e) = db.wal_write(offset, data) {
                    if matches!(e, StoreError::CapturedWalRewrite { .. }) {
                        self.set_fatal(db, &e);
                    }
                    return hook_errno("wal_write", db, Err(e)).map(|()| 0);
                }
                pwrite(file)?;
                // A write that completes a commit frame is captured before the reply.
                hook_errno("wal_written", db, db.wal_written(offset, data))?;
            }
            FileKind::Shm => pwrite(file)?,
        }
        Ok(data.len() as u32)
    }

    fn do_setlk(
        &self,
        db: &Db,
        kind: FileKind,
        lock: LockRequest,
        primary_era: &AtomicBool,
    ) -> Result<(), Errno> {
        let LockRequest {
            owner,
            pid,
            start,
            end,
            typ,
        } = lock;
        self.trace(
            "setlk",
            format_args!(
                "{} {kind:?} owner={owner:#x} {start}..={end} type={typ}",
                db.name()
            ),
        );
        let key = (db.name().to_string(), kind);
        let new_kind = match typ {
            libc::F_RDLCK => Some(LockKind::Read),
            libc::F_WRLCK => Some(LockKind::Write),
            libc::F_UNLCK => None,
            _ => return Err(Errno::EINVAL),
        };
        let writer_byte = match kind {
            FileKind::Shm => Some(SHM_WRITE),
            FileKind::Database => Some(DB_RESERVED),
            _ => None,
        }
        .filter(|&b| covers(start, end, b));
        // Taking the writer lock begins a transaction: as the primary (checked under
        // the gate) it may finish after a demotion. Releasing it runs the WAL commit
        // hook, also under the gate.
        let _gate = writer_byte.map(|_| self.store.write_gate());
        if new_kind == Some(LockKind::Write)
            && let Some(errno) =
                self.refused_writer_lock(db, kind, &lock, primary_era.load(Ordering::Acquire))
        {
            debug!(
                db = db.name(),
                ?kind,
                start,
                "writer lock refused: not the primary, and no transaction begun as primary"
            );
            return Err(errno);
        }
        let r = self.setlk_locked(db, kind, owner, pid, start, end, new_kind, &key);
        if writer_byte.is_some() {
            if r.is_ok() && new_kind == Some(LockKind::Write) && self.store.is_primary() {
                primary_era.store(true, Ordering::Release);
                self.store.writer_began(db.name(), owner);
            } else {
                self.sync_writer(db.name(), owner);
            }
        }
        r
    }

    /// The errno with which a node that is not the primary refuses a write lock, if it
    /// does. Only connections opened while it was the primary (their database and WAL
    /// index are open for writing) ask for the locks that begin or commit a
    /// transaction; each is refused where SQLite reports the clearest error (see
    /// "Writers on a demoted primary" in `docs/design.md`):
    /// - WAL-index WRITE byte: `EACCES`, which SQLite reports as `SQLITE_BUSY`
    ///   ("database is locked"); any errno on a WAL-index lock would. A WAL index
    ///   neither opened nor written through while primary is left alone: its readers
    ///   take WRITE to rebuild a damaged index, and they cannot write the database
    ///   anyway.
    /// - RESERVED byte with a journal file present (`journal_mode` PERSIST or
    ///   TRUNCATE): `EPERM`, `SQLITE_PERM` ("access permission denied"); otherwise
    ///   (DELETE) the lock is granted and creating the journal fails with `EACCES`,
    ///   `SQLITE_READONLY` ("attempt to write a readonly database").
    /// - PENDING byte or the SHARED range (EXCLUSIVE, before writing the database
    ///   file, or to checkpoint at close): `EACCES`, `SQLITE_BUSY`: a transaction
    ///   fenced after a demotion does not start writing its pages into the database.
    ///
    /// Owners whose transaction began while this node was the primary, and was not
    /// fenced, are let through, and so is every writer of a database whose HALT lock
    /// this replica holds.
    fn refused_writer_lock(
        &self,
        db: &Db,
        kind: FileKind,
        lock: &LockRequest,
        primary_era: bool,
    ) -> Option<Errno> {
        let (start, end) = (lock.start, lock.end);
        // A replica holding the HALT lock writes through the primary (see `halt.rs`).
        if self.store.is_primary()
            || self.store.is_writer(db.name(), lock.owner)
            || db.is_forwarding()
        {
            return None;
        }
        match kind {
            FileKind::Shm if primary_era && covers(start, end, SHM_WRITE) => Some(Errno::EACCES),
            FileKind::Database if covers(start, end, DB_RESERVED) => {
                db.path(FileKind::Journal).exists().then_some(Errno::EPERM)
            }
            FileKind::Database if start <= DB_LOCKS.1 && end >= DB_LOCKS.0 => Some(Errno::EACCES),
            _ => None,
        }
    }

    /// On a node that is not the primary, a rollback journal may still be written,
    /// truncated or unlinked while the database file has no uncaptured writes: only a
    /// transaction fenced at the demotion has it open, and it is rolling back (its
    /// `COMMIT` is refused at the EXCLUSIVE lock). Its end then captures nothing, and
    /// no hot journal is left to be rolled back over pages replicated later.
    fn discardable_journal(&self, db: &Db, kind: FileKind) -> bool {
        kind == FileKind::Journal && !self.store.is_primary() && !db.has_uncaptured_writes()
    }

    #[allow(clippy::too_many_arguments)]
    fn setlk_locked(
        &self,
        db: &Db,
        kind: FileKind,
        owner: u64,
        pid: u32,
        start: u64,
        end: u64,
        new_kind: Option<LockKind>,
        key: &(String, FileKind),
    ) -> Result<(), Errno> {
        if kind == FileKind::Shm && covers(start, end, SHM_WRITE) {
            let releases_write = new_kind != Some(LockKind::Write)
                && lock(&self.locks)
                    .get(key)
                    .and_then(|t| t.holds(owner, SHM_WRITE))
                    == Some(LockKind::Write);
            // The lock stays held while the store captures the commit, so no
            // checkpointer can copy the frames into the database before their LTX exists.
            if releases_write && let Err(e) = db.wal_write_lock_released() {
                self.set_fatal(db, &e);
                return Err(Errno::EIO);
            }
        }
        let mut tables = lock(&self.locks);
        let table = tables.entry(key.clone()).or_default();
        match new_kind {
            None => {
                table.unlock(owner, start, end);
                Ok(())
            }
            Some(k) => {
                if kind == FileKind::Shm
                    && k == LockKind::Write
                    && covers(start, end, SHM_CKPT)
                    && table.write_holder(SHM_WRITE).is_some_and(|o| o != owner)
                {
                    debug!(
                        db = db.name(),
                        "CKPT refused while another owner holds WRITE"
                    );
                    return Err(Errno::EAGAIN);
                }
                table
                    .lock(owner, pid, start, end, k)
                    .map_err(|_| Errno::EAGAIN)
            }
        }
    }

    /// Whether a checkpointer holds `db`'s WAL-index CKPT lock: its sync of the WAL must
    /// reach the disk before it overwrites database pages with the frames.
    fn checkpointing(&self, db: &Db) -> bool {
        lock(&self.locks)
            .get(&(db.name().to_string(), FileKind::Shm))
            .is_some_and(|t| t.write_holder(SHM_CKPT).is_some())
    }

    fn do_unlink(&self, name: &str) -> Result<(), Errno> {
        self.trace("unlink", format_args!("{name}"));
        if name == PRIMARY_FILE
            || name == LAG_FILE
            || self
                .resolve(name)
                .is_ok_and(|n| matches!(n, Node::Pos { .. } | Node::Lock { .. }))
        {
            return Err(Errno::EACCES);
        }
        let (dbname, kind) = parse_mount_name(name).ok_or(Errno::ENOENT)?;
        let _gate = self.store.write_gate();
        // Deleting a database begins no transaction: only the primary may.
        let allowed = match kind {
            FileKind::Database => self.store.is_primary(),
            FileKind::Journal => {
                self.store.may_write(dbname)
                    || self
                        .store
                        .db(dbname)
                        .is_some_and(|db| self.discardable_journal(&db, kind))
            }
            _ => self.store.may_write(dbname),
        };
        if !allowed {
            return Err(Errno::EACCES);
        }
        let db = self.db(dbname)?;
        let path = db.path(kind);
        match kind {
            FileKind::Database => {
                hook_errno("delete_db", &db, self.store.delete_db(dbname))?;
                let mut inodes = lock(&self.inodes);
                for k in [
                    FileKind::Database,
                    FileKind::Journal,
                    FileKind::Wal,
                    FileKind::Shm,
                ] {
                    inodes.forget_name(&mount_name(dbname, k));
                }
                inodes.forget_name(&format!("{dbname}{POS_SUFFIX}"));
                drop(inodes);
                lock(&self.locks).retain(|(d, _), _| d != dbname);
                return Ok(());
            }
            FileKind::Journal => {
                if !path.exists() {
                    return Err(Errno::ENOENT);
                }
                self.commit_hook("journal_unlink", &db, db.journal_unlink())?;
            }
            FileKind::Wal => {
                if !path.exists() {
                    return Err(Errno::ENOENT);
                }
                hook_errno("wal_unlink", &db, db.wal_unlink())?;
            }
            FileKind::Shm => {}
        }
        match std::fs::remove_file(&path) {
            // The store may already have removed the file as part of the commit.
            Ok(()) => {}
            Err(e) if e.kind() == io::ErrorKind::NotFound && kind != FileKind::Shm => {}
            Err(e) => return Err(io_errno("unlink", &path, e)),
        }
        lock(&self.inodes).forget_name(name);
        lock(&self.dirty_dirs).insert(db.dir().to_path_buf());
        Ok(())
    }

    fn do_rename(&self, from: &str, to: &str, flags: RenameFlags) -> Result<(), Errno> {
        self.trace("rename", format_args!("{from} -> {to}"));
        if flags.contains(RenameFlags::RENAME_EXCHANGE) {
            return Err(Errno::EINVAL);
        }
        let (Some((sdb, skind)), Some((tdb, tkind))) =
            (parse_mount_name(from), parse_mount_name(to))
        else {
            return Err(Errno::EACCES);
        };
        let _gate = self.store.write_gate();
        if !self.store.may_write(sdb) || !self.store.may_write(tdb) {
            return Err(Errno::EACCES);
        }
        if skind == FileKind::Database || tkind == FileKind::Database || skind != tkind {
            // A database cannot change its name in the replicated history; EXDEV makes
            // `mv` fall back to copy + unlink, which replicates as create + delete.
            warn!(
                from,
                to, "rename refused (EXDEV): only side files of one kind can be renamed"
            );
            return Err(Errno::EXDEV);
        }
        let src = self.db(sdb)?;
        let dst = self.db(tdb)?;
        let (spath, tpath) = (src.path(skind), dst.path(tkind));
        if !spath.exists() {
            return Err(Errno::ENOENT);
        }
        let target_exists = tpath.exists();
        if target_exists && flags.contains(RenameFlags::RENAME_NOREPLACE) {
            return Err(Errno::EEXIST);
        }
        // The source name disappears and an existing target is replaced: both are
        // unlinks as far as transaction boundaries go.
        let unlink_hook = |db: &Db, kind| match kind {
            FileKind::Journal => self.commit_hook("journal_unlink", db, db.journal_unlink()),
            FileKind::Wal => hook_errno("wal_unlink", db, db.wal_unlink()),
            _ => Ok(()),
        };
        unlink_hook(&src, skind)?;
        if target_exists {
            unlink_hook(&dst, tkind)?;
        }
        std::fs::rename(&spath, &tpath).map_err(|e| io_errno("rename", &spath, e))?;
        {
            let mut dirty = lock(&self.dirty_dirs);
            dirty.insert(src.dir().to_path_buf());
            dirty.insert(dst.dir().to_path_buf());
        }
        let mut inodes = lock(&self.inodes);
        let node = Node::File {
            db: tdb.to_string(),
            kind: tkind,
        };
        if let Some(ino) = inodes.by_name.remove(from) {
            inodes.by_ino.insert(ino, node);
            inodes.by_name.insert(to.to_string(), ino);
        } else {
            inodes.forget_name(to);
        }
        Ok(())
    }

    fn do_create(
        &self,
        name: &str,
        mode: u32,
        flags: i32,
    ) -> Result<(u64, FileAttr, FileHandle), Errno> {
        self.trace(
            "create",
            format_args!("{name} mode={mode:o} flags={flags:#x}"),
        );
        if name == PRIMARY_FILE || name == LAG_FILE || name.ends_with(POS_SUFFIX) {
            return Err(Errno::EACCES);
        }
        let (dbname, kind) = parse_mount_name(name).ok_or(Errno::EPERM)?;
        let replica_may = replica_writable(kind) && self.store.db(dbname).is_some();
        let gate = self.store.write_gate();
        if !self.store.may_write(dbname) && !replica_may {
            return Err(Errno::EACCES);
        }
        let mut flags = flags;
        let db = match kind {
            FileKind::Database => match self.store.db(dbname) {
                Some(_) if flags & libc::O_EXCL != 0 => return Err(Errno::EEXIST),
                Some(db) => db,
                None => {
                    let db = self.store.create_db(dbname).map_err(|e| {
                        error!(db = dbname, error = %e, "create_db failed; answering EIO");
                        Errno::EIO
                    })?;
                    // The store created the (empty) file: O_EXCL was honoured above.
                    flags &= !libc::O_EXCL;
                    db
                }
            },
            _ => self.db(dbname)?,
        };
        // open_real takes the gate itself.
        drop(gate);
        let file = self.open_real(&db, kind, flags, Some(mode & 0o7777))?;
        lock(&self.dirty_dirs).insert(db.dir().to_path_buf());
        let node = Node::File {
            db: dbname.to_string(),
            kind,
        };
        let ino = lock(&self.inodes).ino_for(name, node);
        let meta = file.metadata().map_err(Errno::from)?;
        let attr = self.file_attr(ino, &meta);
        let fh = self.add_handle(Handle::Real {
            db,
            kind,
            file,
            dirty: AtomicBool::new(false),
            primary_era: AtomicBool::new(self.store.is_primary()),
        });
        Ok((ino, attr, fh))
    }

    #[allow(clippy::too_many_arguments)]
    fn do_setattr(
        &self,
        ino: u64,
        mode: Option<u32>,
        uid: Option<u32>,
        gid: Option<u32>,
        size: Option<u64>,
        atime: Option<TimeOrNow>,
        mtime: Option<TimeOrNow>,
        fh: Option<FileHandle>,
    ) -> Result<FileAttr, Errno> {
        if ino == ROOT {
            return Ok(self.root_attr());
        }
        let node = self.node(ino)?;
        let Node::File { db, kind } = &node else {
            // Virtual files are read-only; chmod/utimens on them are accepted and ignored
            // so that `cp -p` out of the mount does not fail.
            if size.is_some() {
                return Err(Errno::EACCES);
            }
            return self.attr(ino, &node, None);
        };
        let db = self.db(db)?;
        let path = db.path(*kind);
        let handle = fh.and_then(|fh| self.handle(fh).ok());
        let opened;
        let file: &File = match handle.as_deref() {
            Some(Handle::Real { file, .. }) => file,
            _ => {
                opened = OpenOptions::new()
                    .read(true)
                    .write(size.is_some())
                    .open(&path)
                    .map_err(|e| io_errno("open", &path, e))?;
                &opened
            }
        };
        if let Some(size) = size {
            self.trace("truncate", format_args!("{} {kind:?} to {size}", db.name()));
            let _gate = self.store.write_gate();
            if !self.store.may_write(db.name())
                && !replica_writable(*kind)
                && !self.discardable_journal(&db, *kind)
            {
                return Err(Errno::EACCES);
            }
            self.truncate(&db, *kind, file, size)?;
        }
        if let Some(mode) = mode {
            file.set_permissions(std::fs::Permissions::from_mode(mode & 0o7777))
                .map_err(|e| io_errno("chmod", &path, e))?;
        }
        if uid.is_some() || gid.is_some() {
            std::os::unix::fs::fchown(file, uid, gid).map_err(|e| io_errno("chown", &path, e))?;
        }
        if atime.is_some() || mtime.is_some() {
            let resolve = |t: TimeOrNow| match t {
                TimeOrNow::SpecificTime(t) => t,
                TimeOrNow::Now => SystemTime::now(),
            };
            let mut times = std::fs::FileTimes::new();
            if let Some(t) = atime {
                times = times.set_accessed(resolve(t));
            }
            if let Some(t) = mtime {
                times = times.set_modified(resolve(t));
            }
            file.set_times(times)
                .map_err(|e| io_errno("utimens", &path, e))?;
        }
        let meta = file.metadata().map_err(Errno::from)?;
        Ok(self.file_attr(ino, &meta))
    }

    fn dir_entries(&self) -> Vec<(u64, FileType, String)> {
        let mut out = vec![
            (ROOT, FileType::Directory, ".".to_string()),
            (ROOT, FileType::Directory, "..".to_string()),
        ];
        let mut names = Vec::new();
        if !self.store.is_primary() {
            names.push((PRIMARY_FILE.to_string(), Node::Primary));
            names.push((LAG_FILE.to_string(), Node::Lag));
        }
        for db in self.store.databases() {
            for kind in [
                FileKind::Database,
                FileKind::Journal,
                FileKind::Wal,
                FileKind::Shm,
            ] {
                if db.path(kind).exists() {
                    let node = Node::File {
                        db: db.name().to_string(),
                        kind,
                    };
                    names.push((mount_name(db.name(), kind), node));
                }
            }
            names.push((
                format!("{}{POS_SUFFIX}", db.name()),
                Node::Pos {
                    db: db.name().to_string(),
                },
            ));
        }
        let mut inodes = lock(&self.inodes);
        for (name, node) in names {
            let ino = inodes.ino_for(&name, node);
            out.push((ino, FileType::RegularFile, name));
        }
        out
    }
}

fn name_str(name: &OsStr) -> Result<&str, Errno> {
    name.to_str().ok_or(Errno::ENOENT)
}

impl fuser::Filesystem for LiteFs {
    fn init(&mut self, _req: &Request, config: &mut KernelConfig) -> io::Result<()> {
        // Without POSIX lock support the kernel would keep SQLite's locks to itself and
        // we could not see commits in WAL mode: refuse to run.
        config
            .add_capabilities(InitFlags::FUSE_POSIX_LOCKS)
            .map_err(|_| io::Error::other("the kernel does not support FUSE POSIX locks"))?;
        // O_TRUNC arrives with open() instead of as a separate setattr.
        let _ = config.add_capabilities(InitFlags::FUSE_ATOMIC_O_TRUNC);
        Ok(())
    }

    fn lookup(&self, _req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEntry) {
        if parent.0 != ROOT {
            return reply.error(Errno::ENOENT);
        }
        let s = &self.shared;
        match name_str(name).and_then(|n| s.lookup_name(n)) {
            Ok((_, attr)) => reply.entry(&TTL, &attr, Generation(0)),
            Err(Errno::ENOENT) if s.negative_cacheable(name) => {
                // A cached negative entry (inode 0): SQLite asks whether a hot journal
                // exists at the start of every rollback-mode transaction, and on a
                // primary a side file appears only through this mount, which replaces
                // the negative entry.
                reply.entry(&TTL, &s.virtual_attr(0, 0), Generation(0))
            }
            Err(e) => reply.error(e),
        }
    }

    fn getattr(&self, _req: &Request, ino: INodeNo, fh: Option<FileHandle>, reply: ReplyAttr) {
        let s = &self.shared;
        if ino.0 == ROOT {
            return reply.attr(&TTL, &s.root_attr());
        }
        let handle = fh.and_then(|fh| s.handle(fh).ok());
        match s
            .node(ino.0)
            .and_then(|n| s.attr(ino.0, &n, handle.as_deref()))
        {
            Ok(attr) => reply.attr(&TTL, &attr),
            Err(e) => reply.error(e),
        }
    }

    fn setattr(
        &self,
        _req: &Request,
        ino: INodeNo,
        mode: Option<u32>,
        uid: Option<u32>,
        gid: Option<u32>,
        size: Option<u64>,
        atime: Option<TimeOrNow>,
        mtime: Option<TimeOrNow>,
        _ctime: Option<SystemTime>,
        fh: Option<FileHandle>,
        _crtime: Option<SystemTime>,
        _chgtime: Option<SystemTime>,
        _bkuptime: Option<SystemTime>,
        _flags: Option<fuser::BsdFileFlags>,
        reply: ReplyAttr,
    ) {
        match self
            .shared
            .do_setattr(ino.0, mode, uid, gid, size, atime, mtime, fh)
        {
            Ok(attr) => reply.attr(&TTL, &attr),
            Err(e) => reply.error(e),
        }
    }

    fn mknod(
        &self,
        _req: &Request,
        _parent: INodeNo,
        _name: &OsStr,
        _mode: u32,
        _umask: u32,
        _rdev: u32,
        reply: ReplyEntry,
    ) {
        reply.error(Errno::EPERM);
    }

    fn mkdir(
        &self,
        _req: &Request,
        _parent: INodeNo,
        _name: &OsStr,
        _mode: u32,
        _umask: u32,
        reply: ReplyEntry,
    ) {
        // The mount mirrors a flat set of databases; there is nowhere to replicate a
        // directory to.
        reply.error(Errno::EPERM);
    }

    fn unlink(&self, _req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEmpty) {
        if parent.0 != ROOT {
            return reply.error(Errno::ENOENT);
        }
        match name_str(name).and_then(|n| self.shared.do_unlink(n)) {
            Ok(()) => reply.ok(),
            Err(e) => reply.error(e),
        }
    }

    fn rename(
        &self,
        _req: &Request,
        parent: INodeNo,
        name: &OsStr,
        newparent: INodeNo,
        newname: &OsStr,
        flags: RenameFlags,
        reply: ReplyEmpty,
    ) {
        if parent.0 != ROOT || newparent.0 != ROOT {
            return reply.error(Errno::ENOENT);
        }
        let r = name_str(name).and_then(|from| {
            let to = name_str(newname)?;
            self.shared.do_rename(from, to, flags)
        });
        match r {
            Ok(()) => reply.ok(),
            Err(e) => reply.error(e),
        }
    }

    fn open(&self, _req: &Request, ino: INodeNo, flags: OpenFlags, reply: ReplyOpen) {
        let s = &self.shared;
        let r = s.node(ino.0).and_then(|node| match node {
            Node::File { db, kind } => {
                let db = s.db(&db)?;
                let file = s.open_real(&db, kind, flags.0, None)?;
                let fh = s.add_handle(Handle::Real {
                    db,
                    kind,
                    file,
                    dirty: AtomicBool::new(false),
                    primary_era: AtomicBool::new(s.store.is_primary()),
                });
                Ok((fh, s.open_flags()))
            }
            Node::Lock { db } => {
                s.db(&db)?;
                Ok((
                    s.add_handle(Handle::Lock { db }),
                    FopenFlags::FOPEN_DIRECT_IO,
                ))
            }
            node => {
                if flags.acc_mode() != OpenAccMode::O_RDONLY {
                    return Err(Errno::EACCES);
                }
                let data = s.virtual_content(&node)?;
                // Direct I/O: the content is generated at open and its length may
                // differ from what the kernel cached from an earlier getattr.
                Ok((
                    s.add_handle(Handle::Virtual { data }),
                    FopenFlags::FOPEN_DIRECT_IO,
                ))
            }
        });
        match r {
            Ok((fh, f)) => reply.opened(fh, f),
            Err(e) => reply.error(e),
        }
    }

    fn create(
        &self,
        _req: &Request,
        parent: INodeNo,
        name: &OsStr,
        mode: u32,
        umask: u32,
        flags: i32,
        reply: ReplyCreate,
    ) {
        if parent.0 != ROOT {
            return reply.error(Errno::ENOENT);
        }
        let r = name_str(name).and_then(|n| self.shared.do_create(n, mode & !umask, flags));
        match r {
            Ok((_, attr, fh)) => {
                reply.created(&TTL, &attr, Generation(0), fh, self.shared.open_flags())
            }
            Err(e) => reply.error(e),
        }
    }

    fn read(
        &self,
        _req: &Request,
        _ino: INodeNo,
        fh: FileHandle,
        offset: u64,
        size: u32,
        _flags: OpenFlags,
        _lock_owner: Option<LockOwner>,
        reply: ReplyData,
    ) {
        let h = match self.shared.handle(fh) {
            Ok(h) => h,
            Err(e) => return reply.error(e),
        };
        match &*h {
            Handle::Lock { .. } => reply.data(&[]),
            Handle::Virtual { data } => {
                let start = (offset as usize).min(data.len());
                let end = start.saturating_add(size as usize).min(data.len());
                reply.data(&data[start..end]);
            }
            Handle::Real { db, kind, file, .. } => {
                let mut buf = vec![0u8; size as usize];
                let mut n = 0;
                while n < buf.len() {
                    match file.read_at(&mut buf[n..], offset + n as u64) {
                        Ok(0) => break,
                        Ok(k) => n += k,
                        Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                        Err(e) => return reply.error(io_errno("read", &db.path(*kind), e)),
                    }
                }
                reply.data(&buf[..n]);
            }
        }
    }

    fn write(
        &self,
        _req: &Request,
        _ino: INodeNo,
        fh: FileHandle,
        offset: u64,
        data: &[u8],
        _write_flags: WriteFlags,
        _flags: OpenFlags,
        _lock_owner: Option<LockOwner>,
        reply: ReplyWrite,
    ) {
        match self
            .shared
            .handle(fh)
            .and_then(|h| self.shared.do_write(&h, offset, data))
        {
            Ok(n) => reply.written(n),
            Err(e) => reply.error(e),
        }
    }

    fn flush(
        &self,
        _req: &Request,
        _ino: INodeNo,
        fh: FileHandle,
        lock_owner: LockOwner,
        reply: ReplyEmpty,
    ) {
        let s = &self.shared;
        let h = match s.handle(fh) {
            Ok(h) => h,
            Err(e) => return reply.error(e),
        };
        // close() drops every POSIX lock the process holds on the file.
        if let Handle::Lock { db } = &*h {
            s.halt_flushed(db, lock_owner.0);
            return reply.ok();
        }
        // Releasing locks and flushing may run commit hooks.
        let _gate = s.store.write_gate();
        if let Handle::Real { db, kind, .. } = &*h {
            s.release_locks(db, *kind, lock_owner.0);
        }
        match s.flush_handle(&h) {
            Ok(()) => reply.ok(),
            Err(e) => reply.error(e),
        }
    }

    fn release(
        &self,
        _req: &Request,
        _ino: INodeNo,
        fh: FileHandle,
        _flags: OpenFlags,
        lock_owner: Option<LockOwner>,
        _flush: bool,
        reply: ReplyEmpty,
    ) {
        let s = &self.shared;
        let Some(h) = write_lock(&s.handles).remove(&fh.0) else {
            return reply.error(Errno::EBADF);
        };
        if let Handle::Lock { db } = &*h {
            // The last reference to the open file is gone: its OFD locks with it.
            s.halt_closed(db, fh.0);
            return reply.ok();
        }
        let _gate = s.store.write_gate();
        if let (Handle::Real { db, kind, .. }, Some(owner)) = (&*h, lock_owner) {
            s.release_locks(db, *kind, owner.0);
        }
        // Errors are already logged; release cannot report them to anyone.
        let _ = s.flush_handle(&h);
        reply.ok();
    }

    fn fsync(
        &self,
        _req: &Request,
        _ino: INodeNo,
        fh: FileHandle,
        datasync: bool,
        reply: ReplyEmpty,
    ) {
        let s = &self.shared;
        let _gate = s.store.write_gate();
        let r = s.handle(fh).and_then(|h| {
            if let Handle::Real { db, kind, file, .. } = &*h {
                if *kind == FileKind::Wal && s.store.is_primary() && !s.checkpointing(db) {
                    // A commit's (or a restarted WAL header's) sync: the LTX log
                    // already holds every committed frame durably, which is one device
                    // flush per commit instead of two (docs/design.md, "WAL fsync").
                    hook_errno("wal_sync_requested", db, db.wal_sync_requested())?;
                    return s.flush_handle(&h);
                }
                let changes = db.database_changes();
                let r = if datasync {
                    file.sync_data()
                } else {
                    file.sync_all()
                };
                if let Err(e) = r {
                    if *kind == FileKind::Wal {
                        // The frames may already be in LTX files: whether they reached
                        // the disk is unknown, and a later fsync could report success
                        // for pages the kernel dropped.
                        let e = StoreError::io(db.name(), "fsync wal", db.path(*kind), e);
                        s.set_fatal(db, &e);
                        return Err(Errno::EIO);
                    }
                    return Err(io_errno("fsync", &db.path(*kind), e));
                }
                if *kind == FileKind::Database {
                    db.database_fsynced(changes);
                }
            }
            s.flush_handle(&h)
        });
        match r {
            Ok(()) => reply.ok(),
            Err(e) => reply.error(e),
        }
    }

    fn readdir(
        &self,
        _req: &Request,
        ino: INodeNo,
        _fh: FileHandle,
        offset: u64,
        mut reply: ReplyDirectory,
    ) {
        if ino.0 != ROOT {
            return reply.error(Errno::ENOTDIR);
        }
        for (i, (ino, kind, name)) in self
            .shared
            .dir_entries()
            .into_iter()
            .enumerate()
            .skip(offset as usize)
        {
            if reply.add(INodeNo(ino), i as u64 + 1, kind, name) {
                break;
            }
        }
        reply.ok();
    }

    fn statfs(&self, _req: &Request, _ino: INodeNo, reply: ReplyStatfs) {
        match statvfs(&self.shared.data_dir) {
            Ok(st) => reply.statfs(
                st.f_blocks,
                st.f_bfree,
                st.f_bavail,
                st.f_files,
                st.f_ffree,
                st.f_bsize as u32,
                st.f_namemax as u32,
                st.f_frsize as u32,
            ),
            Err(e) => reply.error(io_errno("statfs", &self.shared.data_dir, e)),
        }
    }

    fn fsyncdir(
        &self,
        _req: &Request,
        _ino: INodeNo,
        _fh: FileHandle,
        datasync: bool,
        reply: ReplyEmpty,
    ) {
        // SQLite syncs the directory after creating a journal or WAL so the file
        // survives a power cut; the mount's one directory stands for every database
        // directory of the data dir, of which only those changed through the mount since
        // the last fsyncdir need it (a new database's directory is made durable by the
        // store when it is created).
        let dirs: Vec<PathBuf> = lock(&self.shared.dirty_dirs).drain().collect();
        for (i, dir) in dirs.iter().enumerate() {
            let r = File::open(dir).and_then(|d| {
                if datasync {
                    d.sync_data()
                } else {
                    d.sync_all()
                }
            });
            match r {
                // A database deleted since: nothing of it to keep.
                Err(e) if e.kind() == io::ErrorKind::NotFound => {}
                Err(e) => {
                    // Still to be made durable by the next fsyncdir.
                    lock(&self.shared.dirty_dirs).extend(dirs[i..].iter().cloned());
                    return reply.error(io_errno("fsyncdir", dir, e));
                }
                Ok(()) => {}
            }
        }
        reply.ok();
    }

    fn getxattr(
        &self,
        _req: &Request,
        _ino: INodeNo,
        _name: &OsStr,
        _size: u32,
        reply: ReplyXattr,
    ) {
        // ENOSYS tells the kernel once and for all that there are no extended
        // attributes, so it stops asking (it does on every write otherwise).
        reply.error(Errno::ENOSYS);
    }

    fn listxattr(&self, _req: &Request, _ino: INodeNo, _size: u32, reply: ReplyXattr) {
        reply.error(Errno::ENOSYS);
    }

    fn fallocate(
        &self,
        _req: &Request,
        _ino: INodeNo,
        fh: FileHandle,
        offset: u64,
        length: u64,
        mode: i32,
        reply: ReplyEmpty,
    ) {
        // Only plain preallocation, which changes no bytes anyone can read (SQLite may
        // use it to grow the -shm file).
        if mode != 0 {
            return reply.error(Errno::EOPNOTSUPP);
        }
        let r = self.shared.handle(fh).and_then(|h| match &*h {
            Handle::Real {
                kind: FileKind::Shm | FileKind::Wal | FileKind::Journal,
                file,
                ..
            } => {
                let end = offset.saturating_add(length);
                let len = file.metadata().map_err(Errno::from)?.len();
                if end > len {
                    file.set_len(end).map_err(Errno::from)?;
                }
                Ok(())
            }
            _ => Err(Errno::EOPNOTSUPP),
        });
        match r {
            Ok(()) => reply.ok(),
            Err(e) => reply.error(e),
        }
    }

    fn getlk(
        &self,
        _req: &Request,
        _ino: INodeNo,
        fh: FileHandle,
        lock_owner: LockOwner,
        start: u64,
        end: u64,
        typ: i32,
        _pid: u32,
        reply: ReplyLock,
    ) {
        let s = &self.shared;
        let h = match s.handle(fh) {
            Ok(h) => h,
            Err(e) => return reply.error(e),
        };
        let kind = match typ {
            libc::F_RDLCK => LockKind::Read,
            libc::F_WRLCK => LockKind::Write,
            _ => return reply.locked(start, end, libc::F_UNLCK, 0),
        };
        if let Handle::Lock { db } = &*h {
            return match s.halt_conflict(db, lock_owner.0, start, end) {
                Some(c) => reply.locked(c.0, c.1, libc::F_WRLCK, 0),
                None => reply.locked(start, end, libc::F_UNLCK, 0),
            };
        }
        let Handle::Real { db, kind: fk, .. } = &*h else {
            return reply.locked(start, end, libc::F_UNLCK, 0);
        };
        let conflict = lock(&s.locks)
            .get(&(db.name().to_string(), *fk))
            .and_then(|t| t.conflict(lock_owner.0, start, end, kind));
        match conflict {
            Some(c) => reply.locked(c.start, c.end, c.kind.as_fcntl(), c.pid),
            None => reply.locked(start, end, libc::F_UNLCK, 0),
        }
    }

    fn setlk(
        &self,
        _req: &Request,
        _ino: INodeNo,
        fh: FileHandle,
        lock_owner: LockOwner,
        start: u64,
        end: u64,
        typ: i32,
        pid: u32,
        _sleep: bool,
        reply: ReplyEmpty,
    ) {
        // Blocking requests (F_SETLKW) are answered like non-blocking ones: SQLite never
        // waits in the kernel, and a waiting FUSE thread would hold up other requests.
        let s = &self.shared;
        let r = s.handle(fh).and_then(|h| match &*h {
            Handle::Real {
                db,
                kind,
                primary_era,
                ..
            } => {
                let lock = LockRequest {
                    owner: lock_owner.0,
                    pid,
                    start,
                    end,
                    typ,
                };
                s.do_setlk(db, *kind, lock, primary_era)
            }
            Handle::Lock { db } => s.halt_setlk(db, fh.0, lock_owner.0, start, end, typ),
            Handle::Virtual { .. } => Err(Errno::ENOLCK),
        });
        match r {
            Ok(()) => reply.ok(),
            Err(e) => reply.error(e),
        }
    }
}

/// Files a replica's local readers may open for writing (SQLite's WAL index and WAL).
fn replica_writable(kind: FileKind) -> bool {
    matches!(kind, FileKind::Wal | FileKind::Shm)
}

fn statvfs(path: &Path) -> io::Result<libc::statvfs> {
    use std::os::unix::ffi::OsStrExt;
    let c = std::ffi::CString::new(path.as_os_str().as_bytes())
        .map_err(|_| io::Error::from(io::ErrorKind::InvalidInput))?;
    let mut st = std::mem::MaybeUninit::<libc::statvfs>::zeroed();
    // SAFETY: `c` is a valid NUL-terminated path and `st` points to writable memory of
    // the right type; statvfs fills it completely on success.
    let rc = unsafe { libc::statvfs(c.as_ptr(), st.as_mut_ptr()) };
    if rc != 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: statvfs returned 0, so the struct is initialised.
    Ok(unsafe { st.assume_init() })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn file(db: &str, kind: FileKind) -> Node {
        Node::File {
            db: db.to_string(),
            kind,
        }
    }

    #[test]
    fn inode_numbers_are_stable_per_name_and_fresh_after_removal() {
        let mut i = Inodes::default();
        let a = i.ino_for("a.db", file("a.db", FileKind::Database));
        let wal = i.ino_for("a.db-wal", file("a.db", FileKind::Wal));
        assert!(a > ROOT && wal > ROOT && a != wal);
        assert_eq!(i.ino_for("a.db", file("a.db", FileKind::Database)), a);
        // A journal deleted and created again is a different file to the kernel.
        let j1 = i.ino_for("a.db-journal", file("a.db", FileKind::Journal));
        i.forget_name("a.db-journal");
        let j2 = i.ino_for("a.db-journal", file("a.db", FileKind::Journal));
        assert_ne!(j1, j2);
        // The old number still resolves for handles that are open on it.
        assert_eq!(i.by_ino.get(&j1), Some(&file("a.db", FileKind::Journal)));
    }

    #[test]
    fn mount_names_round_trip_through_the_store_parser() {
        for kind in [
            FileKind::Database,
            FileKind::Journal,
            FileKind::Wal,
            FileKind::Shm,
        ] {
            let name = mount_name("app.db", kind);
            assert_eq!(parse_mount_name(&name), Some(("app.db", kind)));
        }
    }
}
