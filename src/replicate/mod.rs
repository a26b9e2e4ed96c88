//! Replication: what the primary streams to each replica, and how a replica applies it.
//!
//! - [`decide`]: the pure per-database decision (next file, snapshot, or nothing).
//! - [`primary`]: one stream per connected replica, as [`Frame`](crate::transport::Frame)s
//!   into a channel that the transport's server writes out. Each stream is its own task
//!   reading LTX files from disk and woken by the store's change counter, so a slow
//!   replica only ever slows its own stream; commits never wait for replicas.
//! - [`replica`]: the replica's loop: connect through a [`Transport`](crate::transport::Transport),
//!   receive each file (in memory, or a temp file when large), verify it, hand batches to
//!   an [`Apply`] (the FUSE layer, which
//!   takes the writer's locks against local readers), reconnect with backoff.
//! - [`cluster_id`]: the cluster id kept in the data directory.

pub mod cluster_id;
pub mod decide;
pub mod primary;
pub mod replica;

use crate::store::{Applied, StoreError, Verified};

/// Applies verified LTX files on a replica. The FUSE mount implements it (locks against
/// local readers, shm reset, kernel cache invalidation around
/// [`Store::apply_replicated`](crate::store::Store::apply_replicated)).
pub trait Apply: Send + Sync {
    /// Applies `files` (consecutive files of database `db`, in order) under one
    /// acquisition of the writer's locks and returns what the last one did.
    ///
    /// # Errors
    /// As [`Store::apply_replicated`](crate::store::Store::apply_replicated): the files
    /// before the failing one stay applied; nothing of the failing one is.
    fn apply(&self, db: &str, files: Vec<Verified>) -> Result<Applied, StoreError>;

    /// Removes database `db`, which the primary does not have, under the same locks.
    ///
    /// # Errors
    /// As [`Store::remove_replicated`](crate::store::Store::remove_replicated).
    fn remove(&self, db: &str) -> Result<(), StoreError>;
}
