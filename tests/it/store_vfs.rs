//! A SQLite VFS that drives the store's hooks exactly where the FUSE layer does, so real
//! SQLite workloads exercise transaction capture without a mount.
//!
//! SQLite opens `<mnt>/<name>` (plus `-journal`, `-wal`); the VFS maps those names to the
//! store's files (`dbs/<name>/database`, `journal`, `wal`) and calls, around the real
//! unix VFS operation:
//! - database: `database_written`/`database_truncated` after a write/truncate,
//!   `database_fsynced` and `database_flushed` after an fsync, `database_flushed` at close
//!   of a handle that wrote;
//! - journal: `journal_write`/`journal_truncate` before the write/truncate,
//!   `journal_unlink` before the delete;
//! - WAL: `wal_write` before and `wal_written` after a write (which captures a commit at
//!   the write completing its commit frame), `wal_truncate`/`wal_unlink` before;
//! - shm: `wal_write_lock_released` before the WRITE lock (index 0 = byte 120) is released
//!   by its holder or its holder unmaps the shm; a CKPT lock (index 1) is refused with
//!   SQLITE_BUSY while another connection holds WRITE.
//!
//! A hook error fails the SQLite operation with an I/O error and is recorded, so tests can
//! assert that no hook ever failed.

use std::ffi::{CStr, CString, c_char, c_int, c_void};
use std::path::{Path, PathBuf};
use std::ptr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use litefs::store::{Db, FileKind, Store, StoreError, parse_mount_name};
use rusqlite::{Connection, OpenFlags, ffi};

/// A registered hook VFS over one store.
pub struct HookVfs {
    ctx: &'static Ctx,
}

struct Ctx {
    root: *mut ffi::sqlite3_vfs,
    store: Mutex<Arc<Store>>,
    mnt: PathBuf,
    name: CString,
    errors: Mutex<Vec<String>>,
    crash: Mutex<Option<(CrashAt, PathBuf)>>,
    /// Per database, the open file (address) holding the shm WRITE lock: a CKPT lock is
    /// refused to everyone else meanwhile, as the FUSE layer does.
    writers: Mutex<std::collections::HashMap<String, usize>>,
}

/// Where a simulated power cut copies the data directory (everything written so far is
/// taken as durable, nothing after it).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum CrashAt {
    /// At the end of a rollback-journal transaction (unlink, truncation to 0 or header
    /// zeroing), before the store captured it.
    JournalEndUncaptured,
    /// At the end of a rollback-journal transaction, after the LTX file is durable but
    /// before the journal is removed.
    JournalEndCaptured,
    /// At a WAL commit (the write of the commit frame's page), before the store captured
    /// it.
    WalCommitUncaptured,
    /// At a WAL commit, after the LTX file is durable.
    WalCommitCaptured,
}

// The raw root VFS pointer is SQLite's static default VFS: safe to share.
unsafe impl Send for Ctx {}
unsafe impl Sync for Ctx {}

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Kind {
    Db(FileKind),
    Other,
}

#[repr(C)]
struct HookFile {
    base: ffi::sqlite3_file,
    real: *mut ffi::sqlite3_file,
    ctx: *const Ctx,
    db: *const Db,
    kind: Kind,
    /// Owned name passed to the real VFS (freed at close); sqlite3_create_filename for the
    /// main database, a CString otherwise.
    name: *mut c_char,
    name_is_sqlite: bool,
    holds_write: bool,
    wrote: bool,
    /// WAL: the last frame header written had a non-zero commit field.
    commit_header: bool,
}

static COUNTER: AtomicUsize = AtomicUsize::new(0);

impl HookVfs {
    /// Registers a VFS whose mount directory is `mnt` (created; SQLite opens files there
    /// by name, nothing is ever stored in it).
    pub fn register(store: Arc<Store>, mnt: &Path) -> HookVfs {
        std::fs::create_dir_all(mnt).unwrap();
        let name = CString::new(format!(
            "litefs-hook-{}",
            COUNTER.fetch_add(1, Ordering::SeqCst)
        ))
        .unwrap();
        // SAFETY: initialise SQLite and read its default VFS.
        let root = unsafe {
            ffi::sqlite3_initialize();
            ffi::sqlite3_vfs_find(ptr::null())
        };
        assert!(!root.is_null());
        let ctx: &'static Ctx = Box::leak(Box::new(Ctx {
            root,
            store: Mutex::new(store),
            mnt: mnt.canonicalize().unwrap(),
            name,
            errors: Mutex::new(Vec::new()),
            crash: Mutex::new(None),
            writers: Mutex::new(std::collections::HashMap::new()),
        }));
        // SAFETY: copy of the default VFS with our entry points; leaked so it outlives SQLite's use.
        unsafe {
            let mut vfs: ffi::sqlite3_vfs = *root;
            vfs.szOsFile = (std::mem::size_of::<HookFile>() as c_int) + (*root).szOsFile;
            vfs.pNext = ptr::null_mut();
            vfs.zName = ctx.name.as_ptr();
            vfs.pAppData = ctx as *const Ctx as *mut c_void;
            vfs.xOpen = Some(x_open);
            vfs.xDelete = Some(x_delete);
            vfs.xAccess = Some(x_access);
            vfs.xFullPathname = Some(x_full_pathname);
            let vfs = Box::leak(Box::new(vfs));
            assert_eq!(ffi::sqlite3_vfs_register(vfs, 0), ffi::SQLITE_OK);
        }
        HookVfs { ctx }
    }

    /// Replaces the store (after a simulated restart).
    pub fn set_store(&self, store: Arc<Store>) {
        *self.ctx.store.lock().unwrap() = store;
    }

    /// Opens `<mnt>/<name>` through the hooks.
    pub fn open(&self, name: &str) -> Connection {
        let flags = OpenFlags::SQLITE_OPEN_READ_WRITE
            | OpenFlags::SQLITE_OPEN_CREATE
            | OpenFlags::SQLITE_OPEN_NO_MUTEX;
        Connection::open_with_flags_and_vfs(
            self.ctx.mnt.join(name),
            flags,
            self.ctx.name.as_c_str(),
        )
        .unwrap()
    }

    /// Arms a one-shot simulated crash: at the next `at` point the data directory is
    /// copied to `dst`.
    pub fn crash_copy(&self, at: CrashAt, dst: &Path) {
        *self.ctx.crash.lock().unwrap() = Some((at, dst.to_path_buf()));
    }

    /// Whether the armed crash point was reached.
    pub fn crash_pending(&self) -> bool {
        self.ctx.crash.lock().unwrap().is_some()
    }

    /// Hook errors seen so far.
    pub fn errors(&self) -> Vec<String> {
        self.ctx.errors.lock().unwrap().clone()
    }
}

impl Ctx {
    fn store(&self) -> Arc<Store> {
        self.store.lock().unwrap().clone()
    }

    /// Maps a SQLite path to (db name, kind) when it is inside the mount directory.
    fn map(&self, z: *const c_char) -> Option<(String, FileKind)> {
        if z.is_null() {
            return None;
        }
        // SAFETY: SQLite passes NUL-terminated names.
        let s = unsafe { CStr::from_ptr(z) }.to_str().ok()?;
        let p = Path::new(s);
        if p.parent()? != self.mnt {
            return None;
        }
        let (db, kind) = parse_mount_name(p.file_name()?.to_str()?)?;
        Some((db.to_string(), kind))
    }

    fn real_path(&self, db: &str, kind: FileKind) -> PathBuf {
        self.store()
            .options()
            .data_dir
            .join("dbs")
            .join(db)
            .join(match kind {
                FileKind::Database => "database",
                FileKind::Journal => "journal",
                FileKind::Wal => "wal",
                FileKind::Shm => "shm",
            })
    }

    fn maybe_crash(&self, at: CrashAt) {
        let mut c = self.crash.lock().unwrap();
        if c.as_ref().is_some_and(|(a, _)| *a == at) {
            let (_, dst) = c.take().unwrap();
            copy_dir(&self.store().options().data_dir, &dst);
        }
    }

    fn record(&self, what: &str, r: Result<(), StoreError>) -> bool {
        match r {
            Ok(()) => true,
            Err(e) => {
                self.errors.lock().unwrap().push(format!("{what}: {e}"));
                false
            }
        }
    }
}

unsafe fn ctx_of(vfs: *mut ffi::sqlite3_vfs) -> &'static Ctx {
    unsafe { &*((*vfs).pAppData as *const Ctx) }
}

unsafe extern "C" fn x_open(
    vfs: *mut ffi::sqlite3_vfs,
    z_name: ffi::sqlite3_filename,
    file: *mut ffi::sqlite3_file,
    flags: c_int,
    out_flags: *mut c_int,
) -> c_int {
    unsafe {
        let ctx = ctx_of(vfs);
        let hf = file as *mut HookFile;
        (*hf).base.pMethods = ptr::null();
        let real = (file as *mut u8).add(std::mem::size_of::<HookFile>()) as *mut ffi::sqlite3_file;
        let mut kind = Kind::Other;
        let mut db_ptr: *const Db = ptr::null();
        let mut name: *mut c_char = ptr::null_mut();
        let mut name_is_sqlite = false;
        if let Some((db, fk)) = ctx.map(z_name) {
            let store = ctx.store();
            let db_arc = match (store.db(&db), fk) {
                (Some(d), _) => d,
                (None, FileKind::Database) if flags & ffi::SQLITE_OPEN_CREATE != 0 => {
                    match store.create_db(&db) {
                        Ok(d) => d,
                        Err(e) => {
                            ctx.record("create_db", Err(e));
                            return ffi::SQLITE_CANTOPEN;
                        }
                    }
                }
                _ => return ffi::SQLITE_CANTOPEN,
            };
            let c = |k| CString::new(ctx.real_path(&db, k).to_str().unwrap()).unwrap();
            if fk == FileKind::Database {
                let (d, j, w) = (
                    c(FileKind::Database),
                    c(FileKind::Journal),
                    c(FileKind::Wal),
                );
                name = ffi::sqlite3_create_filename(
                    d.as_ptr(),
                    j.as_ptr(),
                    w.as_ptr(),
                    0,
                    ptr::null_mut(),
                ) as *mut c_char;
                name_is_sqlite = true;
            } else {
                name = c(fk).into_raw();
            }
            kind = Kind::Db(fk);
            db_ptr = Arc::into_raw(db_arc);
        }
        let real_name = if name.is_null() {
            z_name
        } else {
            name as *const c_char
        };
        let rc = ((*ctx.root).xOpen.unwrap())(ctx.root, real_name, real, flags, out_flags);
        if rc != ffi::SQLITE_OK {
            free_name(name, name_is_sqlite);
            if !db_ptr.is_null() {
                drop(Arc::from_raw(db_ptr));
            }
            return rc;
        }
        ptr::write(
            hf,
            HookFile {
                base: ffi::sqlite3_file { pMethods: &METHODS },
                real,
                ctx,
                db: db_ptr,
                kind,
                name,
                name_is_sqlite,
                holds_write: false,
                wrote: false,
                commit_header: false,
            },
        );
        ffi::SQLITE_OK
    }
}

unsafe fn free_name(name: *mut c_char, is_sqlite: bool) {
    unsafe {
        if name.is_null() {
            return;
        }
        if is_sqlite {
            ffi::sqlite3_free_filename(name);
        } else {
            drop(CString::from_raw(name));
        }
    }
}

unsafe extern "C" fn x_delete(
    vfs: *mut ffi::sqlite3_vfs,
    z_name: *const c_char,
    sync_dir: c_int,
) -> c_int {
    unsafe {
        let ctx = ctx_of(vfs);
        if let Some((db, fk)) = ctx.map(z_name) {
            if let Some(d) = ctx.store().db(&db) {
                let ok = match fk {
                    FileKind::Journal => {
                        ctx.maybe_crash(CrashAt::JournalEndUncaptured);
                        let ok = ctx.record("journal_unlink", d.journal_unlink());
                        ctx.maybe_crash(CrashAt::JournalEndCaptured);
                        ok
                    }
                    FileKind::Wal => ctx.record("wal_unlink", d.wal_unlink()),
                    _ => true,
                };
                if !ok {
                    return ffi::SQLITE_IOERR_DELETE;
                }
            }
            let real = CString::new(ctx.real_path(&db, fk).to_str().unwrap()).unwrap();
            return ((*ctx.root).xDelete.unwrap())(ctx.root, real.as_ptr(), sync_dir);
        }
        ((*ctx.root).xDelete.unwrap())(ctx.root, z_name, sync_dir)
    }
}

unsafe extern "C" fn x_access(
    vfs: *mut ffi::sqlite3_vfs,
    z_name: *const c_char,
    flags: c_int,
    out: *mut c_int,
) -> c_int {
    unsafe {
        let ctx = ctx_of(vfs);
        if let Some((db, fk)) = ctx.map(z_name) {
            let real = CString::new(ctx.real_path(&db, fk).to_str().unwrap()).unwrap();
            return ((*ctx.root).xAccess.unwrap())(ctx.root, real.as_ptr(), flags, out);
        }
        ((*ctx.root).xAccess.unwrap())(ctx.root, z_name, flags, out)
    }
}

unsafe extern "C" fn x_full_pathname(
    vfs: *mut ffi::sqlite3_vfs,
    z_name: *const c_char,
    n: c_int,
    out: *mut c_char,
) -> c_int {
    unsafe {
        let ctx = ctx_of(vfs);
        ((*ctx.root).xFullPathname.unwrap())(ctx.root, z_name, n, out)
    }
}

static METHODS: ffi::sqlite3_io_methods = ffi::sqlite3_io_methods {
    iVersion: 2,
    xClose: Some(f_close),
    xRead: Some(f_read),
    xWrite: Some(f_write),
    xTruncate: Some(f_truncate),
    xSync: Some(f_sync),
    xFileSize: Some(f_file_size),
    xLock: Some(f_lock),
    xUnlock: Some(f_unlock),
    xCheckReservedLock: Some(f_check_reserved),
    xFileControl: Some(f_file_control),
    xSectorSize: Some(f_sector_size),
    xDeviceCharacteristics: Some(f_device_characteristics),
    xShmMap: Some(f_shm_map),
    xShmLock: Some(f_shm_lock),
    xShmBarrier: Some(f_shm_barrier),
    xShmUnmap: Some(f_shm_unmap),
    xFetch: None,
    xUnfetch: None,
};

unsafe fn hf<'a>(f: *mut ffi::sqlite3_file) -> &'a mut HookFile {
    unsafe { &mut *(f as *mut HookFile) }
}

unsafe fn real_methods(h: &HookFile) -> &ffi::sqlite3_io_methods {
    unsafe { &*(*h.real).pMethods }
}

unsafe fn db_of<'a>(h: &HookFile) -> Option<&'a Db> {
    unsafe { h.db.as_ref() }
}

unsafe fn ctx_f<'a>(h: &HookFile) -> &'a Ctx {
    unsafe { &*h.ctx }
}

unsafe extern "C" fn f_close(f: *mut ffi::sqlite3_file) -> c_int {
    unsafe {
        let h = hf(f);
        let mut rc = ffi::SQLITE_OK;
        if let Some(db) = db_of(h) {
            if h.holds_write && !release_write(h, db, "wal_write_lock_released (close)") {
                rc = ffi::SQLITE_IOERR_CLOSE;
            }
            if h.kind == Kind::Db(FileKind::Database)
                && h.wrote
                && !ctx_f(h).record("database_flushed (close)", db.database_flushed())
            {
                rc = ffi::SQLITE_IOERR_CLOSE;
            }
        }
        let r = (real_methods(h).xClose.unwrap())(h.real);
        free_name(h.name, h.name_is_sqlite);
        h.name = ptr::null_mut();
        if !h.db.is_null() {
            drop(Arc::from_raw(h.db));
            h.db = ptr::null();
        }
        if rc != ffi::SQLITE_OK { rc } else { r }
    }
}

unsafe extern "C" fn f_read(
    f: *mut ffi::sqlite3_file,
    buf: *mut c_void,
    amt: c_int,
    off: i64,
) -> c_int {
    unsafe {
        let h = hf(f);
        (real_methods(h).xRead.unwrap())(h.real, buf, amt, off)
    }
}

unsafe extern "C" fn f_write(
    f: *mut ffi::sqlite3_file,
    buf: *const c_void,
    amt: c_int,
    off: i64,
) -> c_int {
    unsafe {
        let h = hf(f);
        let ctx = ctx_f(h);
        let data = std::slice::from_raw_parts(buf as *const u8, amt as usize);
        let db = db_of(h);
        if let (Some(db), Kind::Db(FileKind::Journal)) = (db, h.kind) {
            // PERSIST mode ends a transaction by zeroing the header.
            let end = off == 0 && data.len() >= 28 && data[..28].iter().all(|b| *b == 0);
            if end {
                ctx.maybe_crash(CrashAt::JournalEndUncaptured);
            }
            if !ctx.record("journal_write", db.journal_write(off as u64, data)) {
                return ffi::SQLITE_IOERR_WRITE;
            }
            if end {
                ctx.maybe_crash(CrashAt::JournalEndCaptured);
            }
        }
        // SQLite writes a frame's 24-byte header, then its page: the page of a frame
        // whose header has a commit size ends the transaction.
        let mut commit_write = false;
        if let (Some(db), Kind::Db(FileKind::Wal)) = (db, h.kind) {
            if !ctx.record("wal_write", db.wal_write(off as u64, data)) {
                return ffi::SQLITE_IOERR_WRITE;
            }
            if data.len() == 24 {
                h.commit_header = data[4..8] != [0, 0, 0, 0];
            } else {
                commit_write = h.commit_header && off > 32;
                h.commit_header = false;
            }
        }
        let rc = (real_methods(h).xWrite.unwrap())(h.real, buf, amt, off);
        if rc != ffi::SQLITE_OK {
            return rc;
        }
        if commit_write {
            ctx.maybe_crash(CrashAt::WalCommitUncaptured);
        }
        let ok = match (db, h.kind) {
            (Some(db), Kind::Db(FileKind::Database)) => {
                h.wrote = true;
                ctx.record(
                    "database_written",
                    db.database_written(off as u64, amt as usize),
                )
            }
            (Some(db), Kind::Db(FileKind::Wal)) => {
                let ok = ctx.record("wal_written", db.wal_written(off as u64, data));
                if commit_write {
                    ctx.maybe_crash(CrashAt::WalCommitCaptured);
                }
                ok
            }
            _ => true,
        };
        if ok {
            ffi::SQLITE_OK
        } else {
            ffi::SQLITE_IOERR_WRITE
        }
    }
}

unsafe extern "C" fn f_truncate(f: *mut ffi::sqlite3_file, size: i64) -> c_int {
    unsafe {
        let h = hf(f);
        let ctx = ctx_f(h);
        let db = db_of(h);
        let before = match (db, h.kind) {
            (Some(db), Kind::Db(FileKind::Journal)) => {
                if size == 0 {
                    ctx.maybe_crash(CrashAt::JournalEndUncaptured);
                }
                let ok = ctx.record("journal_truncate", db.journal_truncate(size as u64));
                if size == 0 {
                    ctx.maybe_crash(CrashAt::JournalEndCaptured);
                }
                ok
            }
            (Some(db), Kind::Db(FileKind::Wal)) => {
                ctx.record("wal_truncate", db.wal_truncate(size as u64))
            }
            _ => true,
        };
        if !before {
            return ffi::SQLITE_IOERR_TRUNCATE;
        }
        let rc = (real_methods(h).xTruncate.unwrap())(h.real, size);
        if rc != ffi::SQLITE_OK {
            return rc;
        }
        if let (Some(db), Kind::Db(FileKind::Database)) = (db, h.kind) {
            h.wrote = true;
            if !ctx.record("database_truncated", db.database_truncated(size as u64)) {
                return ffi::SQLITE_IOERR_TRUNCATE;
            }
        }
        ffi::SQLITE_OK
    }
}

unsafe extern "C" fn f_sync(f: *mut ffi::sqlite3_file, flags: c_int) -> c_int {
    unsafe {
        let h = hf(f);
        let changes = db_of(h).map(|db| db.database_changes());
        let rc = (real_methods(h).xSync.unwrap())(h.real, flags);
        if rc != ffi::SQLITE_OK {
            return rc;
        }
        if let (Some(db), Some(changes), Kind::Db(FileKind::Database)) = (db_of(h), changes, h.kind)
        {
            db.database_fsynced(changes);
        }
        if let (Some(db), Kind::Db(FileKind::Database)) = (db_of(h), h.kind)
            && h.wrote
            && !ctx_f(h).record("database_flushed", db.database_flushed())
        {
            return ffi::SQLITE_IOERR_FSYNC;
        }
        ffi::SQLITE_OK
    }
}

unsafe extern "C" fn f_file_size(f: *mut ffi::sqlite3_file, out: *mut i64) -> c_int {
    unsafe {
        let h = hf(f);
        (real_methods(h).xFileSize.unwrap())(h.real, out)
    }
}

unsafe extern "C" fn f_lock(f: *mut ffi::sqlite3_file, l: c_int) -> c_int {
    unsafe {
        let h = hf(f);
        (real_methods(h).xLock.unwrap())(h.real, l)
    }
}

unsafe extern "C" fn f_unlock(f: *mut ffi::sqlite3_file, l: c_int) -> c_int {
    unsafe {
        let h = hf(f);
        (real_methods(h).xUnlock.unwrap())(h.real, l)
    }
}

unsafe extern "C" fn f_check_reserved(f: *mut ffi::sqlite3_file, out: *mut c_int) -> c_int {
    unsafe {
        let h = hf(f);
        (real_methods(h).xCheckReservedLock.unwrap())(h.real, out)
    }
}

unsafe extern "C" fn f_file_control(
    f: *mut ffi::sqlite3_file,
    op: c_int,
    arg: *mut c_void,
) -> c_int {
    unsafe {
        let h = hf(f);
        (real_methods(h).xFileControl.unwrap())(h.real, op, arg)
    }
}

unsafe extern "C" fn f_sector_size(f: *mut ffi::sqlite3_file) -> c_int {
    unsafe {
        let h = hf(f);
        (real_methods(h).xSectorSize.unwrap())(h.real)
    }
}

unsafe extern "C" fn f_device_characteristics(f: *mut ffi::sqlite3_file) -> c_int {
    unsafe {
        let h = hf(f);
        (real_methods(h).xDeviceCharacteristics.unwrap())(h.real)
    }
}

unsafe extern "C" fn f_shm_map(
    f: *mut ffi::sqlite3_file,
    pg: c_int,
    pgsz: c_int,
    extend: c_int,
    pp: *mut *mut c_void,
) -> c_int {
    unsafe {
        let h = hf(f);
        (real_methods(h).xShmMap.unwrap())(h.real, pg, pgsz, extend, pp)
    }
}

const WAL_WRITE_LOCK: c_int = 0;
const WAL_CKPT_LOCK: c_int = 1;

unsafe extern "C" fn f_shm_lock(
    f: *mut ffi::sqlite3_file,
    ofst: c_int,
    n: c_int,
    flags: c_int,
) -> c_int {
    unsafe {
        let h = hf(f);
        let me = f as usize;
        let covers = |lock: c_int| ofst <= lock && lock < ofst + n;
        let db = db_of(h);
        if covers(WAL_CKPT_LOCK)
            && flags & ffi::SQLITE_SHM_LOCK != 0
            && let Some(db) = db
            && ctx_f(h)
                .writers
                .lock()
                .unwrap()
                .get(db.name())
                .is_some_and(|w| *w != me)
        {
            return ffi::SQLITE_BUSY;
        }
        if covers(WAL_WRITE_LOCK)
            && flags == (ffi::SQLITE_SHM_UNLOCK | ffi::SQLITE_SHM_EXCLUSIVE)
            && h.holds_write
            && let Some(db) = db
        {
            // SQLite ignores unlock errors; an error is recorded for the test.
            release_write(h, db, "wal_write_lock_released");
        }
        let rc = (real_methods(h).xShmLock.unwrap())(h.real, ofst, n, flags);
        if rc == ffi::SQLITE_OK
            && covers(WAL_WRITE_LOCK)
            && flags == (ffi::SQLITE_SHM_LOCK | ffi::SQLITE_SHM_EXCLUSIVE)
        {
            h.holds_write = true;
            if let Some(db) = db {
                ctx_f(h)
                    .writers
                    .lock()
                    .unwrap()
                    .insert(db.name().to_string(), me);
            }
        }
        rc
    }
}

/// The WRITE lock holder lets go: capture (anything not captured at its commit frame),
/// then forget the holder.
unsafe fn release_write(h: &mut HookFile, db: &Db, what: &str) -> bool {
    unsafe {
        h.holds_write = false;
        let ctx = ctx_f(h);
        let ok = ctx.record(what, db.wal_write_lock_released());
        ctx.writers.lock().unwrap().remove(db.name());
        ok
    }
}

unsafe extern "C" fn f_shm_barrier(f: *mut ffi::sqlite3_file) {
    unsafe {
        let h = hf(f);
        (real_methods(h).xShmBarrier.unwrap())(h.real)
    }
}

unsafe extern "C" fn f_shm_unmap(f: *mut ffi::sqlite3_file, delete: c_int) -> c_int {
    unsafe {
        let h = hf(f);
        if h.holds_write
            && let Some(db) = db_of(h)
        {
            release_write(h, db, "wal_write_lock_released (unmap)");
        }
        (real_methods(h).xShmUnmap.unwrap())(h.real, delete)
    }
}

/// Recursive copy of a directory tree (regular files only). The store may be running:
/// a file that is gone by the time it is copied (a spare file taken or moved into the
/// pool by the store's refill thread) is left out, as a crash at that moment would.
pub fn copy_dir(src: &Path, dst: &Path) {
    std::fs::create_dir_all(dst).unwrap();
    for e in std::fs::read_dir(src).unwrap() {
        let e = e.unwrap();
        let to = dst.join(e.file_name());
        if e.file_type().unwrap().is_dir() {
            copy_dir(&e.path(), &to);
        } else {
            match std::fs::copy(e.path(), &to) {
                Err(err) if err.kind() == std::io::ErrorKind::NotFound => {}
                r => {
                    r.unwrap();
                }
            }
        }
    }
}
