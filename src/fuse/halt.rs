//! The HALT lock in the mount (write forwarding, see [`crate::halt`]).
//!
//! - On a replica, a write lock on byte 72 of `<db>-lock` (`fcntl` `F_SETLK`,
//!   `F_SETLKW` or the OFD variants) asks the primary for `db`'s HALT lock
//!   (`POST /halt`), waits until this replica has reached the position the primary
//!   answered, then lets SQLite write `db` through this mount: each transaction is
//!   forwarded before it is acknowledged (`crate::store`'s `forward.rs`). Unlocking
//!   the byte, closing the descriptor (POSIX locks: any descriptor of the process;
//!   OFD locks: the last reference to the open file) or the process dying releases
//!   it (`DELETE /halt`). While held, a thread renews it every TTL/3. One holder per
//!   database; another owner gets `EAGAIN`.
//! - On the primary, the byte is only recorded (its writes need no lock), and
//!   [`PrimaryHalt`] serves the primary's registry: the HALT lock is SQLite's
//!   RESERVED byte of the database held under [`HALT_OWNER`] in this mount's lock
//!   table, so local writers get `SQLITE_BUSY` while a replica holds it.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use fuser::Errno;
use tracing::{error, info, warn};

use super::fs::{DB_LOCKS, DB_RESERVED, Shared, covers, lock};
use super::locks::LockKind;
use crate::halt::{HALT_BYTE, HaltClient, HaltError, HaltGrant, HaltHost};
use crate::ltx::Pos;
use crate::store::{FileKind, Forwarder, StoreError, Verified};

/// Lock owner under which the primary holds SQLite's locks for a replica's HALT lock.
pub(super) const HALT_OWNER: u64 = u64::MAX - 1;
/// How long a replica waits to reach the primary's position after the grant.
const CATCH_UP_WAIT: Duration = Duration::from_secs(10);
/// How long the primary waits for its local readers before applying a forwarded file.
const READERS_WAIT: Duration = Duration::from_secs(5);

/// A HALT lock taken through a `<db>-lock` file.
#[derive(Debug, Clone)]
pub(crate) struct HaltHold {
    /// The lock owner (POSIX: the process's files; OFD: the open file).
    owner: u64,
    /// The handle it was taken through.
    fh: u64,
    /// The primary's lock id (`None` on the primary itself).
    remote: Option<u64>,
    /// False while the primary is being asked.
    ready: bool,
    /// Stops the thread that renews the lock on the primary.
    stop: Arc<AtomicBool>,
}

/// Sends a replica's transactions to the primary under lock `id`.
struct RemoteForwarder {
    client: Arc<dyn HaltClient>,
    id: u64,
}

impl std::fmt::Debug for RemoteForwarder {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RemoteForwarder")
            .field("id", &self.id)
            .finish_non_exhaustive()
    }
}

impl Forwarder for RemoteForwarder {
    fn forward(&self, db: &str, ltx: &[u8]) -> Result<Pos, String> {
        self.client
            .commit(db, self.id, ltx)
            .map_err(|e| e.to_string())
    }
}

impl Shared {
    /// Connects a replica's mount to its primary's `/halt` and `/tx`.
    pub(crate) fn set_halt_client(&self, client: Arc<dyn HaltClient>) {
        let _ = self.halt_client.set(client);
    }

    /// `fcntl` set-lock on a `<db>-lock` file.
    pub(super) fn halt_setlk(
        &self,
        db: &str,
        fh: u64,
        owner: u64,
        start: u64,
        end: u64,
        typ: i32,
    ) -> Result<(), Errno> {
        if !covers(start, end, HALT_BYTE) {
            return Ok(());
        }
        match typ {
            libc::F_UNLCK => {
                self.halt_drop(db, |h| h.owner == owner);
                Ok(())
            }
            libc::F_RDLCK => match self.halt_conflict(db, owner, start, end) {
                Some(_) => Err(Errno::EAGAIN),
                None => Ok(()),
            },
            libc::F_WRLCK => self.halt_take(db, fh, owner),
            _ => Err(Errno::EINVAL),
        }
    }

    /// The range held by another owner, if `start..=end` covers the HALT byte.
    pub(super) fn halt_conflict(
        &self,
        db: &str,
        owner: u64,
        start: u64,
        end: u64,
    ) -> Option<(u64, u64)> {
        let halts = lock(&self.halts);
        (covers(start, end, HALT_BYTE) && halts.get(db).is_some_and(|h| h.owner != owner))
            .then_some((HALT_BYTE, HALT_BYTE))
    }

    /// A descriptor of `<db>-lock` was closed by `owner` (POSIX locks go with it).
    pub(super) fn halt_flushed(&self, db: &str, owner: u64) {
        self.halt_drop(db, |h| h.owner == owner);
    }

    /// The open file `fh` of `<db>-lock` is gone (OFD locks go with it).
    pub(super) fn halt_closed(&self, db: &str, fh: u64) {
        self.halt_drop(db, |h| h.fh == fh);
    }

    fn halt_take(&self, db: &str, fh: u64, owner: u64) -> Result<(), Errno> {
        let stop = Arc::new(AtomicBool::new(false));
        {
            let mut halts = lock(&self.halts);
            match halts.get(db) {
                Some(h) if h.owner == owner && h.ready => return Ok(()),
                Some(_) => return Err(Errno::EAGAIN),
                None => {
                    halts.insert(
                        db.to_string(),
                        HaltHold {
                            owner,
                            fh,
                            remote: None,
                            ready: false,
                            stop: stop.clone(),
                        },
                    );
                }
            }
        }
        let r = self.halt_acquire(db, stop);
        let mut halts = lock(&self.halts);
        match r {
            Ok(remote) => {
                if let Some(h) = halts.get_mut(db) {
                    h.remote = remote;
                    h.ready = true;
                }
                Ok(())
            }
            Err(e) => {
                halts.remove(db);
                Err(e)
            }
        }
    }

    /// Asks the primary (on a replica) and waits to reach its position.
    fn halt_acquire(&self, db: &str, stop: Arc<AtomicBool>) -> Result<Option<u64>, Errno> {
        let d = self.store.db(db).ok_or(Errno::ENOENT)?;
        if self.store.is_primary() {
            return Ok(None);
        }
        let Some(client) = self.halt_client.get().cloned() else {
            error!(
                db,
                "HALT lock refused: this mount has no way to reach its primary"
            );
            return Err(Errno::ENOLCK);
        };
        let grant = client.acquire(db).map_err(|e| match e {
            HaltError::Busy(_) => Errno::EAGAIN,
            e => {
                error!(db, error = %e, "the primary refused the HALT lock");
                Errno::ENOLCK
            }
        })?;
        let deadline = Instant::now() + CATCH_UP_WAIT;
        loop {
            let pos = d.pos();
            if pos.txid >= grant.pos.txid {
                if pos.txid == grant.pos.txid && pos != grant.pos {
                    error!(db, local = %pos, primary = %grant.pos, "HALT lock: this replica diverged from the primary");
                    let _ = client.release(db, grant.id);
                    return Err(Errno::ENOLCK);
                }
                break;
            }
            if Instant::now() >= deadline {
                warn!(db, local = %pos, primary = %grant.pos, "HALT lock: replica did not catch up in time");
                let _ = client.release(db, grant.id);
                return Err(Errno::EAGAIN);
            }
            std::thread::sleep(Duration::from_millis(2));
        }
        d.set_forwarder(Some(Arc::new(RemoteForwarder {
            client: client.clone(),
            id: grant.id,
        })));
        spawn_renewal(client, db.to_string(), grant, stop);
        info!(db, id = grant.id, pos = %grant.pos, ttl = ?grant.ttl, "HALT lock held: writes are forwarded to the primary");
        Ok(Some(grant.id))
    }

    fn halt_drop(&self, db: &str, which: impl Fn(&HaltHold) -> bool) {
        let hold = {
            let mut halts = lock(&self.halts);
            match halts.get(db) {
                Some(h) if h.ready && which(h) => halts.remove(db),
                _ => None,
            }
        };
        let Some(hold) = hold else { return };
        hold.stop.store(true, Ordering::Release);
        if let Some(d) = self.store.db(db) {
            d.set_forwarder(None);
        }
        if let (Some(id), Some(client)) = (hold.remote, self.halt_client.get()) {
            match client.release(db, id) {
                Ok(()) => info!(db, id, "HALT lock released"),
                Err(e) => {
                    warn!(db, id, error = %e, "releasing the HALT lock failed (it expires on the primary)")
                }
            }
        }
    }
}

/// Renews lock `grant` on the primary every TTL/3 until `stop`. A failed renewal is
/// logged and retried; if the lock runs out meanwhile, the primary refuses the next
/// transaction (which is then rolled back here).
fn spawn_renewal(client: Arc<dyn HaltClient>, db: String, grant: HaltGrant, stop: Arc<AtomicBool>) {
    let every = (grant.ttl / 3).max(Duration::from_millis(100));
    let name = db.clone();
    let spawned = std::thread::Builder::new()
        .name("litefs-halt-renew".into())
        .spawn(move || {
            let mut next = Instant::now() + every;
            while !stop.load(Ordering::Acquire) {
                let now = Instant::now();
                if now < next {
                    std::thread::sleep((next - now).min(Duration::from_millis(50)));
                    continue;
                }
                if let Err(e) = client.renew(&db, grant.id) {
                    warn!(db, id = grant.id, error = %e, "cannot renew the HALT lock");
                }
                next = Instant::now() + every;
            }
        });
    if let Err(e) = spawned {
        warn!(db = name, error = %e, "cannot start renewing the HALT lock: it expires after its TTL");
    }
}

/// The primary's mount as the [`crate::halt::HaltRegistry`]'s host.
pub struct PrimaryHalt {
    pub(crate) shared: Arc<Shared>,
}

impl std::fmt::Debug for PrimaryHalt {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PrimaryHalt").finish_non_exhaustive()
    }
}

impl PrimaryHalt {
    /// Takes `locks` (ranges) for [`HALT_OWNER`], keeping those it got; true once all
    /// are held.
    fn try_ranges(&self, db: &str, ranges: &[(u64, u64)]) -> bool {
        let mut tables = lock(&self.shared.locks);
        let t = tables
            .entry((db.to_string(), FileKind::Database))
            .or_default();
        let mut all = true;
        for &(start, end) in ranges {
            if t.holds(HALT_OWNER, start) == Some(LockKind::Write)
                && t.holds(HALT_OWNER, end) == Some(LockKind::Write)
            {
                continue;
            }
            if t.lock(HALT_OWNER, 0, start, end, LockKind::Write).is_err() {
                all = false;
            }
        }
        all
    }

    fn unlock_ranges(&self, db: &str, ranges: &[(u64, u64)]) {
        let mut tables = lock(&self.shared.locks);
        if let Some(t) = tables.get_mut(&(db.to_string(), FileKind::Database)) {
            for &(start, end) in ranges {
                t.unlock(HALT_OWNER, start, end);
            }
        }
    }
}

/// PENDING and the SHARED range: held while a forwarded file's pages are written, so
/// local readers see the transaction whole or not at all.
const EXCLUSIVE: [(u64, u64); 2] = [(DB_LOCKS.0, DB_LOCKS.0), (DB_LOCKS.0 + 2, DB_LOCKS.1)];

impl HaltHost for PrimaryHalt {
    fn try_lock(&self, db: &str) -> Result<bool, HaltError> {
        let d = self
            .shared
            .store
            .db(db)
            .ok_or_else(|| HaltError::NotFound(db.to_string()))?;
        if crate::store::wal_mode(&d) {
            return Err(HaltError::Unsupported {
                db: db.to_string(),
                reason: "the database is in WAL mode; write forwarding supports \
                         rollback-journal databases only"
                    .into(),
            });
        }
        Ok(self.try_ranges(db, &[(DB_RESERVED, DB_RESERVED)]))
    }

    fn unlock(&self, db: &str) {
        let mut tables = lock(&self.shared.locks);
        if let Some(t) = tables.get_mut(&(db.to_string(), FileKind::Database)) {
            t.release_owner(HALT_OWNER);
        }
    }

    fn apply(&self, db: &str, file: Verified) -> Result<Pos, HaltError> {
        let store = &self.shared.store;
        let _gate = store.write_gate();
        if !store.is_primary() {
            return Err(HaltError::NotPrimary);
        }
        let deadline = Instant::now() + READERS_WAIT;
        while !self.try_ranges(db, &EXCLUSIVE) {
            if Instant::now() >= deadline {
                self.unlock_ranges(db, &EXCLUSIVE);
                return Err(HaltError::Busy(db.to_string()));
            }
            std::thread::sleep(Duration::from_micros(200));
        }
        let r = store.apply_forwarded(db, file);
        // Pages changed behind the kernel's back (the primary keeps its page cache).
        self.shared.invalidate(db);
        self.unlock_ranges(db, &EXCLUSIVE);
        r.map_err(|e| match e {
            StoreError::Ltx { .. } => HaltError::Invalid(e.to_string()),
            e => HaltError::from(e),
        })
    }
}
