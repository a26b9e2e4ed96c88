//! The replica's loop: stream from the primary, verify, apply, reconnect.

use std::collections::HashMap;
use std::io::Write;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use tokio::sync::watch;
use tracing::{error, info, warn};

use super::{Apply, cluster_id};
use crate::store::Store;
use crate::transport::{DbPosition, Frame, Transport, TransportError};

/// Consecutive failures to apply a database's files after which the replica asks for a
/// snapshot of it.
pub const SNAPSHOT_AFTER_FAILURES: u32 = 3;
/// A replica asks for a snapshot by reporting this TXID (no primary is ever ahead of
/// it, so the primary's rule "replica ahead: snapshot" applies).
pub const SNAPSHOT_REQUEST_TXID: u64 = u64::MAX;
const MIN_BACKOFF: Duration = Duration::from_millis(100);
const MAX_BACKOFF: Duration = Duration::from_secs(5);

/// Milliseconds behind the primary, shown in the mount's `.lag`.
#[derive(Debug, Default)]
pub struct Lag(AtomicU64);

impl Lag {
    /// Current value in milliseconds.
    pub fn millis(&self) -> u64 {
        self.0.load(Ordering::Relaxed)
    }

    fn set_since(&self, primary_ms: u64) {
        self.0
            .store(now_ms().saturating_sub(primary_ms), Ordering::Relaxed);
    }
}

fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

/// What a replica needs to run.
pub struct Replica {
    /// This node's store (in replica mode).
    pub store: Arc<Store>,
    /// How to reach the primary.
    pub transport: Arc<dyn Transport>,
    /// The primary's advertise URL.
    pub primary_url: String,
    /// Applies received files (the FUSE mount).
    pub applier: Arc<dyn Apply>,
    /// This node's id (for the primary's logs).
    pub node_id: u64,
    /// Where `.lag` reads from.
    pub lag: Arc<Lag>,
    /// Set to true at the first `Ready` (the node is in sync; `exec` may start).
    pub synced: Arc<watch::Sender<bool>>,
}

impl Replica {
    /// Streams from the primary until `stop` turns true: reconnects with exponential
    /// backoff (100 ms to 5 s) after any failure; a file that fails to apply drops the
    /// connection and is requested again; after [`SNAPSHOT_AFTER_FAILURES`] failures
    /// in a row for one database a snapshot of it is requested. A primary of another
    /// cluster is refused and retried (it may be replaced) with the longest backoff.
    pub async fn run(self, mut stop: watch::Receiver<bool>) {
        let tmp_dir = self.store.options().data_dir.join("repl-tmp");
        let mut failures: HashMap<String, u32> = HashMap::new();
        let mut backoff = MIN_BACKOFF;
        let mut first = true;
        loop {
            if *stop.borrow() {
                return;
            }
            // Not before the first connection: the start-up bootstrap just ran.
            if !first {
                tokio::select! {
                    _ = self.catch_up_from_archive() => {}
                    _ = stop.changed() => return,
                }
            }
            first = false;
            let result = tokio::select! {
                r = self.session(&tmp_dir, &mut failures) => r,
                _ = stop.changed() => return,
            };
            match result {
                Ok(()) => backoff = MIN_BACKOFF,
                Err(SessionError::Transport(e)) => {
                    if matches!(e, TransportError::ClusterMismatch { .. }) {
                        error!(error = %e, "refusing a primary of another cluster");
                        backoff = MAX_BACKOFF;
                    } else {
                        warn!(error = %e, retry_in = ?backoff, "replication stream failed");
                    }
                }
                Err(SessionError::Apply { db, error }) => {
                    let n = failures.entry(db.clone()).or_insert(0);
                    *n += 1;
                    error!(
                        db,
                        error,
                        failures = *n,
                        "cannot apply a file from the primary; dropping the connection"
                    );
                }
                Err(SessionError::Local(e)) => {
                    error!(error = e, "replica error");
                }
            }
            tokio::select! {
                _ = tokio::time::sleep(backoff) => {}
                _ = stop.changed() => return,
            }
            backoff = (backoff * 2).min(MAX_BACKOFF);
        }
    }

    /// Before a reconnect: brings each database that is behind the archive (on the same
    /// history) to the archive's newest TXID, so that a primary whose retention
    /// already removed the files this replica needs does not have to send a snapshot.
    /// Failures are logged; the primary then sends what is missing.
    async fn catch_up_from_archive(&self) {
        let Some(sink) = self.store.archive_sink() else {
            return;
        };
        let applier = self.applier.clone();
        let apply = move |db: &str, path: &std::path::Path| {
            tokio::task::block_in_place(|| applier.apply(db, path))
                .map(|a| a.pos)
                .map_err(|e| e.to_string())
        };
        for db in self.store.databases() {
            if let Err(e) =
                crate::archive::catch_up_db(&self.store, sink.as_ref(), db.name(), &apply).await
            {
                warn!(db = db.name(), error = %e, "cannot catch up from the archive; the primary sends what is missing");
            }
        }
    }

    /// One connection: returns when the primary ends the stream.
    async fn session(
        &self,
        tmp_dir: &std::path::Path,
        failures: &mut HashMap<String, u32>,
    ) -> Result<(), SessionError> {
        let data_dir = &self.store.options().data_dir;
        let ours = cluster_id::read(data_dir).map_err(|e| SessionError::Local(e.to_string()))?;
        let mut positions: Vec<DbPosition> = self
            .store
            .databases()
            .iter()
            .map(|db| {
                let p = db.pos();
                DbPosition {
                    db: db.name().to_string(),
                    txid: p.txid.0,
                    post_apply_checksum: p.post_apply_checksum.0,
                }
            })
            .collect();
        for p in &mut positions {
            if failures.get(&p.db).copied().unwrap_or(0) >= SNAPSHOT_AFTER_FAILURES {
                info!(
                    db = p.db,
                    "asking the primary for a snapshot after repeated failures"
                );
                p.txid = SNAPSHOT_REQUEST_TXID;
                p.post_apply_checksum = 0;
            }
        }
        let request = crate::transport::StreamRequest {
            node_id: self.node_id,
            cluster_id: ours.clone(),
            positions,
        };
        let mut stream = self
            .transport
            .connect(&self.primary_url, request)
            .await
            .map_err(SessionError::Transport)?;
        if ours.is_none()
            && let Some(theirs) = stream.cluster_id()
        {
            cluster_id::write(data_dir, &theirs).map_err(|e| SessionError::Local(e.to_string()))?;
            info!(cluster_id = theirs, "joined cluster");
        }
        info!(primary = self.primary_url, "connected to primary");
        tokio::fs::create_dir_all(tmp_dir)
            .await
            .map_err(|e| SessionError::Local(e.to_string()))?;
        // The file being received: database, temp path, open file.
        let mut current: Option<(String, PathBuf, std::fs::File)> = None;
        loop {
            let frame = stream.next_frame().await.map_err(SessionError::Transport)?;
            let Some(frame) = frame else { return Ok(()) };
            match frame {
                Frame::Ltx { db, chunk, last } => {
                    if let Some((cur, _, _)) = &current
                        && *cur != db
                    {
                        return Err(SessionError::Transport(TransportError::Malformed {
                            url: self.primary_url.clone(),
                            message: format!("chunk of {db} inside a file of {cur}"),
                        }));
                    }
                    if current.is_none() {
                        if crate::store::parse_mount_name(&db)
                            != Some((db.as_str(), crate::store::FileKind::Database))
                        {
                            return Err(SessionError::Transport(TransportError::Malformed {
                                url: self.primary_url.clone(),
                                message: format!("invalid database name {db:?}"),
                            }));
                        }
                        let path = tmp_dir.join(format!("{db}.ltx.tmp"));
                        let f = std::fs::File::create(&path)
                            .map_err(|e| SessionError::Local(format!("{}: {e}", path.display())))?;
                        current = Some((db.clone(), path, f));
                    }
                    if let Some((_, path, f)) = current.as_mut() {
                        f.write_all(&chunk)
                            .map_err(|e| SessionError::Local(format!("{}: {e}", path.display())))?;
                    }
                    if last && let Some((db, path, f)) = current.take() {
                        drop(f);
                        let written = crate::store::read_ltx_ends(&db, &path)
                            .ok()
                            .map(|(h, _)| h.timestamp);
                        let applier = self.applier.clone();
                        let (d, p) = (db.clone(), path.clone());
                        let r = tokio::task::spawn_blocking(move || applier.apply(&d, &p))
                            .await
                            .map_err(|e| SessionError::Local(e.to_string()))?;
                        let _ = std::fs::remove_file(&path);
                        if let Err(e) = r {
                            return Err(SessionError::Apply {
                                db,
                                error: e.to_string(),
                            });
                        }
                        failures.remove(&db);
                        if let Some(ts) = written {
                            self.lag.set_since(ts.max(0) as u64);
                        }
                    }
                }
                Frame::Ready => {
                    info!("caught up with the primary");
                    self.synced.send_replace(true);
                }
                Frame::Heartbeat { primary_time_ms } => self.lag.set_since(primary_time_ms),
                Frame::Handoff { .. } => {
                    warn!("handoff offered, but this build's static lease cannot take it")
                }
                Frame::End => return Ok(()),
            }
        }
    }
}

enum SessionError {
    Transport(TransportError),
    Apply { db: String, error: String },
    Local(String),
}
