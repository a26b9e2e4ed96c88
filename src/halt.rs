//! Write forwarding: the HALT lock, taken on the primary on behalf of a replica so that
//! SQLite on the replica can write a database through the primary.
//!
//! # Protocol (details in `docs/design.md`, "Write forwarding")
//!
//! - `POST /halt?name=DB` on the primary takes DB's HALT lock for [`HaltRegistry::ttl`]
//!   (default [`DEFAULT_TTL`]) and answers a lock id and the primary's position of DB.
//!   While it is held, the primary's mount holds SQLite's RESERVED lock byte of DB
//!   under its own owner, so local writers get `SQLITE_BUSY`; readers go on.
//! - `POST /tx?name=DB&id=ID` applies one LTX file written on the replica: only while
//!   ID holds the lock, only when the file verifies completely, starts at the
//!   primary's TXID + 1 with the primary's checksum as pre-apply checksum, and its
//!   post-apply checksum adds up. It then is part of the primary's history like a
//!   local commit (LTX log, streams, archive).
//! - `POST /halt?name=DB&id=ID` renews it for another TTL (the replica does so every
//!   TTL/3 while it holds the lock); `DELETE /halt?name=DB&id=ID` drops it. The
//!   primary drops it by itself once a TTL passed without renewal (the replica died
//!   or lost the primary), and drops every lock when it stops being the primary.
//!
//! The primary side is [`HaltRegistry`] over a [`HaltHost`] (the mount's lock table);
//! the replica side is a [`HaltClient`] (HTTP) used by the mount's `<db>-lock` file.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex, OnceLock, Weak};
use std::time::{Duration, Instant};

use tracing::{info, warn};

use crate::ltx::Pos;
use crate::store::{Store, StoreError, Verified};

/// The byte of a `<db>-lock` file whose write lock is the HALT lock.
pub const HALT_BYTE: u64 = 72;
/// How long the primary keeps a HALT lock by default.
pub const DEFAULT_TTL: Duration = Duration::from_secs(30);
/// How long `POST /halt` waits for a local writer (or another replica's lock) to finish.
pub const ACQUIRE_WAIT: Duration = Duration::from_secs(10);

/// Why a HALT lock or a forwarded transaction was refused.
#[derive(Debug, thiserror::Error)]
pub enum HaltError {
    /// This node is not the primary.
    #[error("not the primary")]
    NotPrimary,
    /// No such database on the primary.
    #[error("database {0:?} does not exist on the primary")]
    NotFound(String),
    /// A local writer or another replica kept the lock for [`ACQUIRE_WAIT`].
    #[error("database {0:?} is busy: a writer holds its write lock")]
    Busy(String),
    /// The lock id is not the current holder's (never granted, released or expired).
    #[error("halt lock {id} is not held on {db:?} (released or expired)")]
    NotHeld {
        /// Database name.
        db: String,
        /// The id given.
        id: u64,
    },
    /// The database cannot be written through the primary this way.
    #[error("database {db:?}: {reason}")]
    Unsupported {
        /// Database name.
        db: String,
        /// Why.
        reason: String,
    },
    /// The file does not start at the primary's position.
    #[error(
        "database {db:?}: the transaction starts at TXID {min_txid} (pre-apply {pre_apply}) \
         but the primary is at {primary}: stale position"
    )]
    Stale {
        /// Database name.
        db: String,
        /// The primary's position.
        primary: Pos,
        /// The file's first TXID.
        min_txid: crate::ltx::TxId,
        /// The file's pre-apply checksum.
        pre_apply: crate::ltx::Checksum,
    },
    /// The file does not verify or does not add up.
    #[error("invalid transaction: {0}")]
    Invalid(String),
    /// Applying failed on the primary.
    #[error("applying the transaction failed: {0}")]
    Store(#[source] StoreError),
    /// The primary could not be reached or answered something unexpected.
    #[error("primary: {0}")]
    Transport(String),
}

/// What a granted HALT lock is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct HaltGrant {
    /// The lock id, to send with `/tx` and `DELETE /halt`.
    pub id: u64,
    /// The primary's position of the database when the lock was granted.
    pub pos: Pos,
    /// How long the primary keeps the lock.
    pub ttl: Duration,
}

/// The replica's side: requests to the primary. Blocking (called from the mount's
/// request threads).
///
/// # Contract
/// Errors are final for that request: [`HaltError::Busy`] may succeed later; any
/// other error means the lock is not (or no longer) held. Nothing is retried.
pub trait HaltClient: Send + Sync {
    /// `POST /halt?name=DB`.
    fn acquire(&self, db: &str) -> Result<HaltGrant, HaltError>;
    /// `POST /halt?name=DB&id=ID`: extends the lock by its TTL.
    fn renew(&self, db: &str, id: u64) -> Result<(), HaltError>;
    /// `POST /tx?name=DB&id=ID` with one LTX file; the primary's new position.
    fn commit(&self, db: &str, id: u64, ltx: &[u8]) -> Result<Pos, HaltError>;
    /// `DELETE /halt?name=DB&id=ID`.
    fn release(&self, db: &str, id: u64) -> Result<(), HaltError>;
}

/// The primary's side of the mount: its lock table and the apply path.
///
/// # Contract
/// `try_lock` never blocks; `apply` is called only while the lock is held.
pub trait HaltHost: Send + Sync {
    /// Takes SQLite's writer lock of `db` for the HALT owner; `Ok(false)` while a local
    /// writer holds it.
    fn try_lock(&self, db: &str) -> Result<bool, HaltError>;
    /// Releases what `try_lock` took.
    fn unlock(&self, db: &str);
    /// Applies a verified forwarded file (readers are kept out while pages change).
    fn apply(&self, db: &str, file: Verified) -> Result<Pos, HaltError>;
}

#[derive(Debug, Clone, Copy)]
struct Held {
    id: u64,
    expires: Instant,
}

/// The primary's HALT locks, at most one per database, each with a deadline the
/// primary enforces itself (a thread drops expired locks, and every lock once the
/// node is no longer the primary).
pub struct HaltRegistry {
    ttl: Duration,
    store: Arc<Store>,
    host: OnceLock<Arc<dyn HaltHost>>,
    held: Mutex<HashMap<String, Held>>,
    wake: Condvar,
    next_id: AtomicU64,
}

impl std::fmt::Debug for HaltRegistry {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("HaltRegistry")
            .field("ttl", &self.ttl)
            .finish_non_exhaustive()
    }
}

impl HaltRegistry {
    /// A registry whose locks last `ttl`; its expiry thread runs as long as the
    /// registry lives.
    pub fn new(store: Arc<Store>, ttl: Duration) -> Arc<HaltRegistry> {
        let seed = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(1, |d| d.as_nanos() as u64);
        let r = Arc::new(HaltRegistry {
            ttl,
            store,
            host: OnceLock::new(),
            held: Mutex::new(HashMap::new()),
            wake: Condvar::new(),
            // Ids differ across restarts, so a lock id from before a restart is unknown.
            next_id: AtomicU64::new(seed | 1),
        });
        let weak = Arc::downgrade(&r);
        if let Err(e) = std::thread::Builder::new()
            .name("litefs-halt-expiry".into())
            .spawn(move || expiry_loop(weak))
        {
            warn!(error = %e, "cannot start the halt lock expiry thread");
        }
        r
    }

    /// How long a granted lock lasts.
    pub fn ttl(&self) -> Duration {
        self.ttl
    }

    /// Connects the mount (once it is mounted).
    pub fn set_host(&self, host: Arc<dyn HaltHost>) {
        let _ = self.host.set(host);
    }

    fn host(&self) -> Result<&Arc<dyn HaltHost>, HaltError> {
        self.host
            .get()
            .ok_or_else(|| HaltError::Transport("the file system is not mounted yet".into()))
    }

    fn held(&self) -> std::sync::MutexGuard<'_, HashMap<String, Held>> {
        self.held.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Takes `db`'s HALT lock, waiting up to [`ACQUIRE_WAIT`] for a local writer or
    /// another holder. Blocking.
    ///
    /// # Errors
    /// [`HaltError::NotPrimary`], [`HaltError::NotFound`], [`HaltError::Busy`],
    /// [`HaltError::Unsupported`] (WAL mode).
    pub fn acquire(&self, db: &str) -> Result<HaltGrant, HaltError> {
        let host = self.host()?;
        let deadline = Instant::now() + ACQUIRE_WAIT;
        loop {
            if !self.store.is_primary() {
                return Err(HaltError::NotPrimary);
            }
            let Some(d) = self.store.db(db) else {
                return Err(HaltError::NotFound(db.to_string()));
            };
            {
                let mut held = self.held();
                if !held.contains_key(db) && host.try_lock(db)? {
                    let id = self.next_id.fetch_add(2, Ordering::Relaxed);
                    held.insert(
                        db.to_string(),
                        Held {
                            id,
                            expires: Instant::now() + self.ttl,
                        },
                    );
                    let pos = d.pos();
                    drop(held);
                    self.wake.notify_all();
                    info!(db, id, %pos, ttl = ?self.ttl, "halt lock granted");
                    return Ok(HaltGrant {
                        id,
                        pos,
                        ttl: self.ttl,
                    });
                }
            }
            if Instant::now() >= deadline {
                return Err(HaltError::Busy(db.to_string()));
            }
            std::thread::sleep(Duration::from_millis(5));
        }
    }

    /// Extends `db`'s lock by a full TTL from now, if `id` still holds it (the holder
    /// renews while it is alive; a dead holder's lock runs out).
    ///
    /// # Errors
    /// [`HaltError::NotHeld`] otherwise.
    pub fn renew(&self, db: &str, id: u64) -> Result<HaltGrant, HaltError> {
        let mut held = self.held();
        let now = Instant::now();
        match held.get_mut(db) {
            Some(h) if h.id == id && h.expires > now => {
                h.expires = now + self.ttl;
                let pos = self.store.db(db).map(|d| d.pos()).unwrap_or_default();
                Ok(HaltGrant {
                    id,
                    pos,
                    ttl: self.ttl,
                })
            }
            _ => Err(HaltError::NotHeld {
                db: db.to_string(),
                id,
            }),
        }
    }

    /// Drops `db`'s lock if `id` holds it.
    ///
    /// # Errors
    /// [`HaltError::NotHeld`] otherwise.
    pub fn release(&self, db: &str, id: u64) -> Result<(), HaltError> {
        let mut held = self.held();
        match held.get(db) {
            Some(h) if h.id == id => {
                held.remove(db);
                if let Some(host) = self.host.get() {
                    host.unlock(db);
                }
                info!(db, id, "halt lock released");
                Ok(())
            }
            _ => Err(HaltError::NotHeld {
                db: db.to_string(),
                id,
            }),
        }
    }

    /// Applies a forwarded LTX file under lock `id`. The registry stays locked while
    /// it applies, so the lock cannot expire half-way. Blocking.
    ///
    /// # Errors
    /// [`HaltError::NotHeld`] (unknown, released or expired id), [`HaltError::Invalid`]
    /// (does not verify), [`HaltError::Stale`] (another position), [`HaltError::Store`].
    pub fn apply(&self, db: &str, id: u64, ltx: Vec<u8>) -> Result<Pos, HaltError> {
        let host = self.host()?;
        let held = self.held();
        match held.get(db) {
            Some(h) if h.id == id && h.expires > Instant::now() => {}
            _ => {
                return Err(HaltError::NotHeld {
                    db: db.to_string(),
                    id,
                });
            }
        }
        if !self.store.is_primary() {
            return Err(HaltError::NotPrimary);
        }
        let file = Verified::verify(db, crate::store::Received::Memory(ltx))
            .map_err(|e| HaltError::Invalid(e.to_string()))?;
        let h = file.header();
        if h.min_txid != h.max_txid {
            return Err(HaltError::Invalid(format!(
                "TXIDs {}..{}: one transaction per request",
                h.min_txid, h.max_txid
            )));
        }
        let current = self
            .store
            .db(db)
            .ok_or_else(|| HaltError::NotFound(db.to_string()))?
            .pos();
        if h.min_txid.0 != current.txid.0 + 1 || h.pre_apply_checksum != current.post_apply_checksum
        {
            return Err(HaltError::Stale {
                db: db.to_string(),
                primary: current,
                min_txid: h.min_txid,
                pre_apply: h.pre_apply_checksum,
            });
        }
        let pos = host.apply(db, file)?;
        info!(db, id, %pos, "forwarded transaction applied");
        Ok(pos)
    }

    /// Drops expired locks (all of them once the node is not the primary); returns
    /// the next deadline.
    fn expire(&self) -> Option<Instant> {
        let now = Instant::now();
        let primary = self.store.is_primary();
        let mut held = self.held();
        let gone: Vec<(String, u64)> = held
            .iter()
            .filter(|(_, h)| !primary || h.expires <= now)
            .map(|(d, h)| (d.clone(), h.id))
            .collect();
        for (db, id) in gone {
            held.remove(&db);
            if let Some(host) = self.host.get() {
                host.unlock(&db);
            }
            warn!(db, id, primary, "halt lock expired: dropped by the primary");
        }
        held.values().map(|h| h.expires).min()
    }
}

fn expiry_loop(weak: Weak<HaltRegistry>) {
    loop {
        let Some(r) = weak.upgrade() else { return };
        let next = r.expire();
        // Woken by a new grant; otherwise at the next deadline, and at least every
        // 250 ms to notice a demotion (and a dropped registry).
        let wait = next
            .map_or(Duration::from_millis(250), |t| {
                t.saturating_duration_since(Instant::now())
            })
            .min(Duration::from_millis(250));
        let held = r.held();
        let _ = r.wake.wait_timeout(held, wait);
    }
}

impl From<StoreError> for HaltError {
    fn from(e: StoreError) -> Self {
        match e {
            StoreError::Forward { db, reason } => HaltError::Unsupported { db, reason },
            e => HaltError::Store(e),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::StoreOptions;

    /// A lock table of one lock, counting unlocks.
    #[derive(Default)]
    struct FakeHost {
        locked: Mutex<bool>,
        unlocks: AtomicU64,
    }

    impl HaltHost for FakeHost {
        fn try_lock(&self, _db: &str) -> Result<bool, HaltError> {
            let mut l = self.locked.lock().unwrap();
            Ok(!std::mem::replace(&mut *l, true))
        }
        fn unlock(&self, _db: &str) {
            *self.locked.lock().unwrap() = false;
            self.unlocks.fetch_add(1, Ordering::Relaxed);
        }
        fn apply(&self, _db: &str, _file: Verified) -> Result<Pos, HaltError> {
            unreachable!("no file in these tests verifies")
        }
    }

    fn registry(ttl: Duration) -> (tempfile::TempDir, Arc<HaltRegistry>, Arc<FakeHost>) {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(StoreOptions {
            data_dir: dir.path().to_path_buf(),
            retention: Duration::from_secs(600),
            retention_monitor_interval: Duration::ZERO,
            node_id: 1,
        })
        .unwrap();
        store.create_db("a.db").unwrap();
        let r = HaltRegistry::new(store, ttl);
        let host = Arc::new(FakeHost::default());
        r.set_host(host.clone());
        (dir, r, host)
    }

    #[test]
    fn only_the_holder_may_release_or_send_and_the_lock_expires() {
        let (_dir, r, host) = registry(Duration::from_millis(200));
        assert!(matches!(r.acquire("b.db"), Err(HaltError::NotFound(_))));
        let g = r.acquire("a.db").unwrap();
        assert_eq!(g.pos, Pos::default());
        assert!(matches!(
            r.release("a.db", g.id + 2),
            Err(HaltError::NotHeld { .. })
        ));
        assert!(matches!(
            r.apply("a.db", g.id + 2, b"garbage".to_vec()),
            Err(HaltError::NotHeld { .. })
        ));
        // The holder's file is verified before anything else.
        assert!(matches!(
            r.apply("a.db", g.id, b"garbage".to_vec()),
            Err(HaltError::Invalid(_))
        ));
        r.release("a.db", g.id).unwrap();
        assert_eq!(host.unlocks.load(Ordering::Relaxed), 1);
        assert!(matches!(
            r.release("a.db", g.id),
            Err(HaltError::NotHeld { .. })
        ));

        // Renewed, it outlives its first TTL.
        let g1 = r.acquire("a.db").unwrap();
        for _ in 0..4 {
            std::thread::sleep(Duration::from_millis(100));
            r.renew("a.db", g1.id).unwrap();
        }
        assert!(matches!(
            r.renew("a.db", g1.id + 2),
            Err(HaltError::NotHeld { .. })
        ));
        r.release("a.db", g1.id).unwrap();
        assert_eq!(host.unlocks.load(Ordering::Relaxed), 2);

        // Never released: the registry drops it after the TTL by itself.
        let g2 = r.acquire("a.db").unwrap();
        assert_ne!(g2.id, g.id);
        let deadline = Instant::now() + Duration::from_secs(5);
        while host.unlocks.load(Ordering::Relaxed) < 3 && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(10));
        }
        assert_eq!(host.unlocks.load(Ordering::Relaxed), 3, "not expired");
        assert!(matches!(
            r.apply("a.db", g2.id, b"garbage".to_vec()),
            Err(HaltError::NotHeld { .. })
        ));
    }

    #[test]
    fn a_node_that_is_no_longer_primary_drops_its_locks() {
        let (_dir, r, host) = registry(Duration::from_secs(600));
        let g = r.acquire("a.db").unwrap();
        r.store.set_primary(false);
        let deadline = Instant::now() + Duration::from_secs(5);
        while host.unlocks.load(Ordering::Relaxed) < 1 && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(10));
        }
        assert_eq!(host.unlocks.load(Ordering::Relaxed), 1);
        assert!(matches!(r.acquire("a.db"), Err(HaltError::NotPrimary)));
        assert!(matches!(
            r.release("a.db", g.id),
            Err(HaltError::NotHeld { .. })
        ));
    }
}
