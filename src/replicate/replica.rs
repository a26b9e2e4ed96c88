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
use crate::progress::Tenths;
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

/// Milliseconds behind the primary, shown in the mount's `.lag`, and when the primary
/// was last heard from.
#[derive(Debug, Default)]
pub struct Lag {
    millis: AtomicU64,
    /// Local wall-clock milliseconds of the last file or heartbeat; 0: never.
    heard_at_ms: AtomicU64,
}

impl Lag {
    /// Current value in milliseconds (as of the last file or heartbeat).
    pub fn millis(&self) -> u64 {
        self.millis.load(Ordering::Relaxed)
    }

    /// Time since the primary was last heard from (a file or a heartbeat); `None`
    /// before the first.
    pub fn since_heard(&self) -> Option<Duration> {
        match self.heard_at_ms.load(Ordering::Relaxed) {
            0 => None,
            at => Some(Duration::from_millis(now_ms().saturating_sub(at))),
        }
    }

    fn set_since(&self, primary_ms: u64) {
        let now = now_ms();
        self.millis
            .store(now.saturating_sub(primary_ms), Ordering::Relaxed);
        self.heard_at_ms.store(now.max(1), Ordering::Relaxed);
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
        loop {
            if *stop.borrow() {
                return;
            }
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
        // Progress of a large snapshot being received, and when it started.
        let mut snapshot: Option<(Tenths, std::time::Instant)> = None;
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
                        snapshot = large_snapshot(&chunk).map(|total| {
                            info!(
                                db,
                                mib = total >> 20,
                                "receiving a snapshot from the primary"
                            );
                            (Tenths::new(total), std::time::Instant::now())
                        });
                    }
                    if let Some((_, path, f)) = current.as_mut() {
                        f.write_all(&chunk)
                            .map_err(|e| SessionError::Local(format!("{}: {e}", path.display())))?;
                    }
                    if let Some((tenths, started)) = snapshot.as_mut() {
                        if let Some(t) = tenths.add(chunk.len() as u64) {
                            info!(
                                db,
                                percent = t * 10,
                                received_mib = tenths.done() >> 20,
                                elapsed = ?started.elapsed(),
                                "snapshot progress"
                            );
                        }
                        if last {
                            // The total was an upper bound (LZ4 shrinks some pages).
                            if tenths.tenth() < 10 {
                                info!(
                                    db,
                                    percent = 100,
                                    received_mib = tenths.done() >> 20,
                                    elapsed = ?started.elapsed(),
                                    "snapshot progress"
                                );
                            }
                            info!(
                                db,
                                received_mib = tenths.done() >> 20,
                                elapsed = ?started.elapsed(),
                                "snapshot received"
                            );
                            snapshot = None;
                        }
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

/// Snapshots at least this large log their progress.
pub const SNAPSHOT_PROGRESS_MIN: u64 = 16 << 20;

/// The database size of a snapshot of at least [`SNAPSHOT_PROGRESS_MIN`] bytes whose
/// LTX file starts with `first_chunk`: the progress total (the LTX's page data is at
/// most that when LZ4 shrinks nothing, and a little less when it does).
fn large_snapshot(first_chunk: &[u8]) -> Option<u64> {
    let hdr: &[u8; crate::ltx::HEADER_SIZE] = first_chunk
        .get(..crate::ltx::HEADER_SIZE)?
        .try_into()
        .ok()?;
    let h = crate::ltx::Header::from_bytes(hdr).ok()?;
    let total = u64::from(h.commit) * u64::from(h.page_size);
    (h.is_snapshot() && total >= SNAPSHOT_PROGRESS_MIN).then_some(total)
}

enum SessionError {
    Transport(TransportError),
    Apply { db: String, error: String },
    Local(String),
}
