//! Applying LTX files from the primary on a replica's mount, as a writer would against
//! local readers.

use std::fs::OpenOptions;
use std::os::unix::fs::FileExt;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use fuser::{INodeNo, Notifier};
use tracing::{debug, warn};

use super::fs::Shared;
use crate::replicate::Apply;
use crate::store::{Applied, StoreError, Verified, wal};

/// Applies received LTX files to the mounted store. Built by
/// [`Mount::replica_applier`](super::Mount::replica_applier).
pub struct ReplicaApplier {
    pub(crate) shared: Arc<Shared>,
    pub(crate) notifier: Notifier,
    pub(crate) mount_dir: PathBuf,
}

impl std::fmt::Debug for ReplicaApplier {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ReplicaApplier")
            .field("mount_dir", &self.mount_dir)
            .finish_non_exhaustive()
    }
}

impl Apply for ReplicaApplier {
    /// Waits for the writer's locks (readers finish their transactions first; a reader
    /// never sees half a file), applies every file through the store, invalidates the kernel's
    /// cached pages and attributes of the database, rewrites the WAL-index header (so
    /// WAL readers drop their cached pages and read the database file), then releases
    /// the locks.
    fn apply(&self, db: &str, files: Vec<Verified>) -> Result<Applied, StoreError> {
        let files = self.skip_forwarded(db, files);
        if files.is_empty() {
            let pos = self
                .shared
                .store()
                .db(db)
                .map(|d| d.pos())
                .unwrap_or_default();
            return Ok(Applied {
                pos,
                ..Applied::default()
            });
        }
        self.lock(db);
        let store = self.shared.store();
        let mut last = Ok(Applied::default());
        let mut any = false;
        for f in files {
            last = store.apply_replicated(db, f);
            match &last {
                Ok(_) => any = true,
                Err(_) => break,
            }
        }
        if any {
            if let Some(ino) = self.shared.ino_of(db)
                && let Err(e) = self.notifier.inval_inode(INodeNo(ino), 0, 0)
                && e.raw_os_error() != Some(libc::ENOENT)
            {
                warn!(db, error = %e, "cannot invalidate the kernel's cache of the database");
            }
            if let Some(d) = store.db(db)
                && let Err(e) = self.reset_wal_index(db, d.commit(), d.page_size())
            {
                warn!(db, error = %e, "cannot reset the WAL index");
            }
        }
        if let Ok(applied) = &last {
            debug!(db, pos = %applied.pos, "applied");
        }
        self.shared.release_replica_locks(db);
        last
    }

    fn remove(&self, db: &str) -> Result<(), StoreError> {
        self.lock(db);
        let ino = self.shared.ino_of(db);
        let r = self.shared.store().remove_replicated(db);
        if let Some(ino) = ino
            && let Err(e) = self.notifier.inval_inode(INodeNo(ino), 0, 0)
            && e.raw_os_error() != Some(libc::ENOENT)
        {
            warn!(db, error = %e, "cannot invalidate the kernel's cache of the database");
        }
        self.shared.release_replica_locks(db);
        r
    }
}

impl ReplicaApplier {
    /// Drops the files this replica already holds: transactions it forwarded to the
    /// primary under the HALT lock, streamed back. While it holds the lock the primary
    /// can only be sending those, and one may arrive before the local commit finished
    /// (the primary applied it before answering): it waits for that (up to 2 s)
    /// instead of taking the locks the local writer holds.
    fn skip_forwarded(&self, db: &str, files: Vec<Verified>) -> Vec<Verified> {
        let store = self.shared.store();
        let forwarding = store.db(db).is_some_and(|d| d.is_forwarding());
        if forwarding && let Some(first) = files.first() {
            let deadline = Instant::now() + Duration::from_secs(2);
            while !store.already_applied(db, first) && Instant::now() < deadline {
                std::thread::sleep(Duration::from_millis(1));
            }
        }
        files
            .into_iter()
            .filter(|f| !store.already_applied(db, f))
            .collect()
    }

    /// Takes the writer's locks on `db` against local readers, waiting for them to end
    /// their transactions.
    fn lock(&self, db: &str) {
        let start = Instant::now();
        let mut warned = false;
        let wal = self.wal_mode(db);
        while !self.shared.try_replica_locks(db, wal) {
            if !warned && start.elapsed() > Duration::from_secs(5) {
                warn!(
                    db,
                    "waiting for local readers to end their transactions before applying"
                );
                warned = true;
            }
            std::thread::sleep(Duration::from_micros(200));
        }
    }

    /// Whether the replica's copy of `db` is in WAL mode (header bytes 18 and 19 are 2),
    /// which decides the locks local readers hold.
    fn wal_mode(&self, db: &str) -> bool {
        let Some(d) = self.shared.store().db(db) else {
            return false;
        };
        let mut b = [0u8; 2];
        std::fs::File::open(d.path(crate::store::FileKind::Database))
            .and_then(|f| f.read_exact_at(&mut b, 18))
            .is_ok_and(|()| b == [2, 2])
    }

    /// Writes a fresh, valid WAL-index header (mxFrame 0, change counter + 1) through
    /// the mount, so that it reaches the page cache every reader has mapped. Readers
    /// see a changed header, drop their page caches and read the database file.
    fn reset_wal_index(
        &self,
        db: &str,
        commit: u32,
        page_size: Option<u32>,
    ) -> std::io::Result<()> {
        // Without a WAL index in the data directory there is nothing to reset, and no
        // request into our own mount is made (one in flight when the process is killed
        // could keep it from ever exiting).
        if !self
            .shared
            .store()
            .db(db)
            .is_some_and(|d| d.path(crate::store::FileKind::Shm).exists())
        {
            return Ok(());
        }
        let path = self.mount_dir.join(format!("{db}-shm"));
        let f = match OpenOptions::new().read(true).write(true).open(&path) {
            Ok(f) => f,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(()),
            Err(e) => return Err(e),
        };
        let mut old = [0u8; 136];
        let n = f.read_at(&mut old, 0)?;
        if n < 48 {
            return Ok(());
        }
        let ne = |b: &[u8], o: usize| u32::from_ne_bytes([b[o], b[o + 1], b[o + 2], b[o + 3]]);
        let mut h = [0u8; 48];
        h[0..4].copy_from_slice(&3_007_000u32.to_ne_bytes());
        h[8..12].copy_from_slice(&ne(&old, 8).wrapping_add(1).to_ne_bytes());
        h[12] = 1; // isInit
        h[13] = old[13]; // bigEndCksum
        let ps = page_size.unwrap_or(4096);
        let ps_field: u16 = if ps == 65536 { 1 } else { ps as u16 };
        h[14..16].copy_from_slice(&ps_field.to_ne_bytes());
        // mxFrame (16..20) stays 0: nothing in the WAL is valid.
        h[20..24].copy_from_slice(&commit.to_ne_bytes());
        // Frame checksums zero; salts kept.
        h[32..40].copy_from_slice(&old[32..40]);
        let (c1, c2) = wal::wal_checksum(cfg!(target_endian = "big"), &h[..40], (0, 0));
        h[40..44].copy_from_slice(&c1.to_ne_bytes());
        h[44..48].copy_from_slice(&c2.to_ne_bytes());
        let mut out = [0u8; 136];
        out[..48].copy_from_slice(&h);
        out[48..96].copy_from_slice(&h);
        // Checkpoint info: nBackfill 0, read mark 0 = 0, others unused.
        for i in 1..5 {
            let o = 100 + 4 * i;
            out[o..o + 4].copy_from_slice(&0xffff_ffffu32.to_ne_bytes());
        }
        // Lock bytes (120..128) and the rest are left as they were.
        out[120..136].copy_from_slice(&old[120..136]);
        f.write_all_at(&out[..120], 0)?;
        Ok(())
    }
}

impl ReplicaApplier {
    /// Sets what `.primary` shows (`None` on the primary itself or while the primary
    /// is unknown); the election task holds the applier, not the mount.
    pub fn set_primary_hostname(&self, hostname: Option<String>) {
        self.shared.set_primary_hostname(hostname);
    }
}
