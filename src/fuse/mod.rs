//! The FUSE file system: the mount through which SQLite programs use the databases.
//!
//! The mount's root is a flat directory. Each database of the [`Store`](crate::store::Store)
//! appears as `<db>` with its `<db>-journal`, `<db>-wal` and `<db>-shm` files (real
//! files in `<data.dir>/dbs/<db>/`, read and written with `pread`/`pwrite` on a file
//! descriptor kept per open handle), plus the read-only virtual `<db>-pos`
//! (`TXID/CHECKSUM\n`) and, on a replica, `.primary`. Every operation that can end a
//! transaction calls the store's hook for it first (see `crate::store`'s "FUSE
//! boundary"); a failing hook fails that operation with `EIO` and is logged.
//!
//! POSIX byte-range locks (`fcntl` `F_GETLK`/`F_SETLK`) are served here, per lock
//! owner, by [`locks::LockTable`]: this is how commits in WAL mode are seen (the
//! release of the WAL-index WRITE lock), and how a checkpoint is kept from copying
//! frames into the database before their LTX file exists (CKPT is refused while
//! another owner holds WRITE).
//!
//! A WAL commit is captured at the first of: an fsync of the WAL while an owner holds
//! WRITE (`synchronous=FULL`: the commit's durability point, before SQLite reports
//! success), or the release of WRITE (every mode). SQLite ignores errors from
//! unlocking, so capturing only at the release could acknowledge a commit whose
//! capture failed or was cut short by a crash; a failed fsync fails the commit.
//!
//! # Kernel options, and why
//!
//! - `FUSE_POSIX_LOCKS` (required): the kernel forwards `fcntl` locks to us instead of
//!   keeping them to itself. Mounting fails on a kernel without it.
//! - `default_permissions`: the kernel checks permission bits against the attributes
//!   we report, as on a local disk, so we do not re-implement access checks.
//! - `allow_other` only when `fuse.allow-other` is set: by default only the user that
//!   runs litefs (root here) can see the mount.
//! - Entry and attribute TTL of 1 s: every change on a primary goes through the mount,
//!   so the kernel's cached sizes stay right; the TTL bounds staleness for files the
//!   store removes itself (a deleted database's side files).
//! - No writeback cache: writes must reach us synchronously and in order, because the
//!   order of journal writes, WAL writes and lock releases is what delimits a
//!   transaction; with the writeback cache the kernel would delay and merge them.
//! - `FOPEN_KEEP_CACHE` on a primary: all writes come through this mount and, without
//!   the writeback cache, update the kernel's page cache as they pass, so the cache is
//!   never stale and hot pages are read without a round trip to us across opens.
//!   Replicas (whose files are changed by applying LTX files behind the kernel's back)
//!   open without it, so each open starts from a clean cache.
//! - Virtual files (`-pos`, `.primary`) use `FOPEN_DIRECT_IO`: their content is made at
//!   open and must never come from the cache.
//! - No FUSE passthrough: kernel passthrough of reads and writes would bypass the write
//!   hooks on writable handles, and SQLite opens databases read-write. It remains an
//!   option for read-only handles on replicas.
//! - `FUSE_ATOMIC_O_TRUNC` when available: `O_TRUNC` arrives with `open`, where it is
//!   handled as a truncate (with the journal and WAL truncate hooks).
//! - `noatime`; several request threads (`MountOptions::threads`) with cloned device
//!   fds, so a commit's fsync does not stall readers.
//!
//! Renames: side files may be renamed to another side file of the same kind (each
//! name that disappears is an unlink for the store's transaction tracking). A rename
//! involving a database is refused with `EXDEV`: the replicated history has no
//! rename, and `EXDEV` makes `mv` fall back to copy + unlink, which replicates as a
//! new database and a deletion. `mkdir` and special files are refused with `EPERM`.
//!
//! Blocking lock requests (`F_SETLKW`) are answered like non-blocking ones (`EAGAIN`
//! on conflict): SQLite never blocks in the kernel.
//!
//! `<db>-lock` (not listed, only looked up): byte 72 is the HALT lock of write
//! forwarding (see `halt.rs`).

mod fs;
mod halt;
pub mod locks;
mod mount;
mod replica;

pub use halt::PrimaryHalt;
pub use mount::{
    DEFAULT_IO_URING_THREADS, Mount, MountError, MountOptions, prepare, run, run_with,
};
pub use replica::ReplicaApplier;
