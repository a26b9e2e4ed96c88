//! TEMPORARY stand-in for the store (branch `store`), with the documented API only,
//! so the FUSE layer compiles and can be exercised before the real store lands.
//! Replaced by `git merge store`; never part of the final branch.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Duration;

/// Kind of a file in a database directory.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum FileKind {
    /// The database.
    Database,
    /// `-journal`.
    Journal,
    /// `-wal`.
    Wal,
    /// `-shm`.
    Shm,
}

/// Parses a mount-root name.
pub fn parse_mount_name(name: &str) -> Option<(&str, FileKind)> {
    if name.starts_with('.') || name.is_empty() {
        return None;
    }
    for (suffix, kind) in [
        ("-journal", FileKind::Journal),
        ("-wal", FileKind::Wal),
        ("-shm", FileKind::Shm),
    ] {
        if let Some(db) = name.strip_suffix(suffix) {
            return (!db.is_empty()).then_some((db, kind));
        }
    }
    if name.ends_with("-pos") || name.ends_with("-lock") {
        return None;
    }
    Some((name, FileKind::Database))
}

/// Store error.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// I/O.
    #[error("{0}")]
    Io(#[from] std::io::Error),
}

/// Options.
pub struct StoreOptions {
    /// Data dir.
    pub data_dir: PathBuf,
    /// Retention.
    pub retention: Duration,
    /// Retention monitor interval.
    pub retention_monitor_interval: Duration,
    /// Node id.
    pub node_id: u64,
}

pub use crate::ltx::Pos;

/// Store.
pub struct Store {
    dir: PathBuf,
    dbs: Mutex<BTreeMap<String, Arc<Db>>>,
}

impl Store {
    /// Opens.
    pub fn open(opts: StoreOptions) -> Result<Arc<Store>, StoreError> {
        let dir = opts.data_dir.join("dbs");
        std::fs::create_dir_all(&dir)?;
        let mut dbs = BTreeMap::new();
        for e in std::fs::read_dir(&dir)? {
            let name = e?.file_name().to_string_lossy().into_owned();
            dbs.insert(
                name.clone(),
                Arc::new(Db {
                    name: name.clone(),
                    dir: dir.join(&name),
                }),
            );
        }
        Ok(Arc::new(Store {
            dir,
            dbs: Mutex::new(dbs),
        }))
    }
    /// Databases.
    pub fn databases(&self) -> Vec<Arc<Db>> {
        self.dbs.lock().unwrap().values().cloned().collect()
    }
    /// One database.
    pub fn db(&self, name: &str) -> Option<Arc<Db>> {
        self.dbs.lock().unwrap().get(name).cloned()
    }
    /// Create.
    pub fn create_db(&self, name: &str) -> Result<Arc<Db>, StoreError> {
        let mut dbs = self.dbs.lock().unwrap();
        if let Some(db) = dbs.get(name) {
            return Ok(db.clone());
        }
        let db = Arc::new(Db {
            name: name.to_string(),
            dir: self.dir.join(name),
        });
        std::fs::create_dir_all(&db.dir)?;
        std::fs::File::create(db.path(FileKind::Database))?;
        dbs.insert(name.to_string(), db.clone());
        Ok(db)
    }
    /// Delete.
    pub fn delete_db(&self, name: &str) -> Result<(), StoreError> {
        if let Some(db) = self.dbs.lock().unwrap().remove(name) {
            std::fs::remove_dir_all(&db.dir)?;
        }
        Ok(())
    }
    /// Close.
    pub fn close(&self) -> Result<(), StoreError> {
        Ok(())
    }
    /// Primary.
    pub fn is_primary(&self) -> bool {
        true
    }
}

/// Database.
pub struct Db {
    name: String,
    dir: PathBuf,
}

#[allow(missing_docs)]
impl Db {
    pub fn name(&self) -> &str {
        &self.name
    }
    pub fn path(&self, kind: FileKind) -> PathBuf {
        self.dir.join(match kind {
            FileKind::Database => "database",
            FileKind::Journal => "journal",
            FileKind::Wal => "wal",
            FileKind::Shm => "shm",
        })
    }
    pub fn pos(&self) -> Pos {
        Pos::default()
    }
    pub fn page_size(&self) -> Option<u32> {
        None
    }
    pub fn database_written(&self, _offset: u64, _len: usize) -> Result<(), StoreError> {
        Ok(())
    }
    pub fn database_truncated(&self, _size: u64) -> Result<(), StoreError> {
        Ok(())
    }
    pub fn journal_write(&self, _offset: u64, _data: &[u8]) -> Result<(), StoreError> {
        Ok(())
    }
    pub fn journal_truncate(&self, _size: u64) -> Result<(), StoreError> {
        Ok(())
    }
    pub fn journal_unlink(&self) -> Result<(), StoreError> {
        Ok(())
    }
    pub fn wal_written(&self, _offset: u64, _len: usize) -> Result<(), StoreError> {
        Ok(())
    }
    pub fn wal_write_lock_released(&self) -> Result<(), StoreError> {
        Ok(())
    }
    pub fn wal_truncate(&self, _size: u64) -> Result<(), StoreError> {
        Ok(())
    }
    pub fn wal_unlink(&self) -> Result<(), StoreError> {
        Ok(())
    }
    pub fn database_flushed(&self) -> Result<(), StoreError> {
        Ok(())
    }
}
