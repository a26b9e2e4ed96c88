//! The replica's loop: stream from the primary, verify, apply, reconnect.
//!
//! Two stages per connection: the receiving task reads frames and queues each complete
//! file (in memory up to [`MEMORY_FILE_LIMIT`], else in a temp file); a blocking applier
//! thread takes up to [`MAX_BATCH`] consecutive queued files of one database, verifies
//! and decodes each once, and applies them under one acquisition of the writer's locks.
//! The queue holds at most [`QUEUE_BYTES`] of in-memory files, so memory stays bounded
//! while a replica catches up. `Ready` is queued too: the node is in sync once
//! everything before it was applied.

use std::collections::HashMap;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use tokio::sync::{OwnedSemaphorePermit, Semaphore, mpsc, watch};
use tracing::{debug, error, info, warn};

use super::{Apply, cluster_id};
use crate::ltx::{Checksum, Pos, TxId};
use crate::progress::Tenths;
use crate::store::{MEMORY_FILE_LIMIT, Received, Store, Verified};
use crate::transport::{DbPosition, Frame, Transport, TransportError};

/// Most files applied under one acquisition of a database's locks.
pub const MAX_BATCH: usize = 64;
/// Bytes of received in-memory files queued for the applier at most.
pub const QUEUE_BYTES: usize = 32 << 20;
/// A batch is applied early once its verified files hold this much memory.
const BATCH_BYTES: usize = 32 << 20;

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
    /// When it returns, everything received was applied and synced
    /// ([`Store::sync_replicated`]).
    pub async fn run(self, stop: watch::Receiver<bool>) {
        let (_never, drain) = watch::channel(false);
        self.run_draining(stop, drain).await
    }

    /// As [`Replica::run`]; in addition, once `drain` turns true the replica does not
    /// connect again: a stream in progress goes on until the primary ends it (with
    /// `End` after its last file, when it steps down) or it fails. So a replica that
    /// learns of a new primary first receives everything the old one committed.
    pub async fn run_draining(
        self,
        mut stop: watch::Receiver<bool>,
        mut drain: watch::Receiver<bool>,
    ) {
        self.run_until(&mut stop, &mut drain).await;
        let store = self.store.clone();
        match tokio::task::spawn_blocking(move || store.sync_replicated()).await {
            Ok(Ok(())) => {}
            Ok(Err(e)) => error!(error = %e, "cannot sync replicated changes"),
            Err(e) => error!(error = %e, "sync task failed"),
        }
    }

    async fn run_until(&self, stop: &mut watch::Receiver<bool>, drain: &mut watch::Receiver<bool>) {
        let tmp_dir = self.store.options().data_dir.join("repl-tmp");
        // Files a previous run was receiving.
        let _ = std::fs::remove_dir_all(&tmp_dir);
        let failures: Failures = Arc::default();
        let mut backoff = MIN_BACKOFF;
        let mut first = true;
        let mut outage = Outage::default();
        // Set when the archive could not serve what the primary sent us there for: the
        // next request names no archive, so the primary sends a snapshot.
        let mut skip_archive = false;
        // The last `Archive` frame's database and position: the same one again means
        // the archive did not get us past it.
        let mut last_directive: Option<(String, Pos)> = None;
        loop {
            if *stop.borrow() || *drain.borrow() {
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
            let ask_archive = !std::mem::take(&mut skip_archive);
            match self
                .session(&tmp_dir, &failures, stop, &mut outage, ask_archive)
                .await
            {
                Ok(Ended::Closed) => backoff = MIN_BACKOFF,
                Ok(Ended::Archive { db, target }) => {
                    backoff = MIN_BACKOFF;
                    let directive = Some((db.clone(), target));
                    if last_directive == directive {
                        warn!(db, target = %target, "sent to the archive again for the same position; asking the primary for a snapshot");
                        skip_archive = true;
                    } else {
                        let caught_up = tokio::select! {
                            ok = self.catch_up_as_directed(&db, target) => ok,
                            _ = stop.changed() => return,
                        };
                        skip_archive = !caught_up;
                        if caught_up {
                            // A snapshot asked for after failures came from the archive.
                            failures
                                .lock()
                                .unwrap_or_else(|p| p.into_inner())
                                .remove(&db);
                        }
                    }
                    last_directive = directive;
                    // Reconnect at once, from the new position.
                    continue;
                }
                Err(SessionError::Transport(e)) => {
                    if matches!(e, TransportError::ClusterMismatch { .. }) {
                        error!(error = %e, "refusing a primary of another cluster");
                        backoff = MAX_BACKOFF;
                    } else {
                        outage.failed(&self.primary_url, &e, backoff);
                    }
                }
                Err(SessionError::Apply { db, error }) => {
                    let mut f = failures.lock().unwrap_or_else(|p| p.into_inner());
                    let n = f.entry(db.clone()).or_insert(0);
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
            if *stop.borrow() {
                return;
            }
            tokio::select! {
                _ = tokio::time::sleep(backoff) => {}
                _ = stop.changed() => return,
                _ = drain.wait_for(|d| *d) => return,
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
        let apply = self.archive_applier();
        for db in self.store.databases() {
            if let Err(e) =
                crate::archive::catch_up_db(&self.store, sink.as_ref(), db.name(), &apply).await
            {
                warn!(db = db.name(), error = %e, "cannot catch up from the archive; the primary sends what is missing");
            }
        }
    }

    /// Applies one archive file (re-encoded with checksums) through the mount's
    /// applier, which keeps readers out; for [`crate::archive`]'s catch-up functions.
    fn archive_applier(&self) -> impl Fn(&str, &Path) -> Result<Pos, String> + Sync + use<> {
        let applier = self.applier.clone();
        move |db: &str, path: &Path| {
            tokio::task::block_in_place(|| {
                let file = Verified::verify(db, Received::File(path.to_path_buf()))?;
                applier.apply(db, vec![file])
            })
            .map(|a| a.pos)
            .map_err(|e| e.to_string())
        }
    }

    /// The primary sent us to the archive for `db` instead of sending a snapshot:
    /// catches it up to at least `target` ([`crate::archive::catch_up_to`]). Returns
    /// whether it got there; if not, the next request names no archive, so the primary
    /// sends the snapshot after all.
    async fn catch_up_as_directed(&self, db: &str, target: Pos) -> bool {
        let Some(sink) = self.store.archive_sink() else {
            return false;
        };
        let apply = self.archive_applier();
        match crate::archive::catch_up_to(&self.store, sink.as_ref(), db, target, &apply).await {
            Ok(pos) if pos.txid >= target.txid => {
                info!(db, pos = %pos, "caught up from the archive, as the primary asked");
                true
            }
            Ok(pos) => {
                warn!(db, pos = %pos, target = %target, "the archive did not reach the primary's position; asking the primary for a snapshot");
                false
            }
            Err(e) => {
                warn!(db, error = %e, "cannot catch up from the archive; asking the primary for a snapshot");
                false
            }
        }
    }

    /// One connection: returns when the primary ends the stream (or sends the replica
    /// to the archive), the stream fails, a file fails to apply, or `stop` turns true;
    /// in every case only after the applier finished what was queued before. With
    /// `ask_archive`, the request names this node's archive, if it has one.
    async fn session(
        &self,
        tmp_dir: &Path,
        failures: &Failures,
        stop: &mut watch::Receiver<bool>,
        outage: &mut Outage,
        ask_archive: bool,
    ) -> Result<Ended, SessionError> {
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
        {
            let f = failures.lock().unwrap_or_else(|p| p.into_inner());
            for p in &mut positions {
                if f.get(&p.db).copied().unwrap_or(0) >= SNAPSHOT_AFTER_FAILURES {
                    info!(
                        db = p.db,
                        "asking the primary for a snapshot after repeated failures"
                    );
                    p.txid = SNAPSHOT_REQUEST_TXID;
                    p.post_apply_checksum = 0;
                }
            }
        }
        let archive = if ask_archive {
            self.store.archive_sink().map(|s| s.location())
        } else {
            None
        };
        let request = crate::transport::StreamRequest {
            node_id: self.node_id,
            cluster_id: ours.clone(),
            archive,
            positions,
        };
        let mut stream = tokio::select! {
            s = self.transport.connect(&self.primary_url, request) => s.map_err(SessionError::Transport)?,
            _ = stop.changed() => return Ok(Ended::Closed),
        };
        if ours.is_none()
            && let Some(theirs) = stream.cluster_id()
        {
            cluster_id::write(data_dir, &theirs).map_err(|e| SessionError::Local(e.to_string()))?;
            info!(cluster_id = theirs, "joined cluster");
        }
        outage.connected(&self.primary_url);
        tokio::fs::create_dir_all(tmp_dir)
            .await
            .map_err(|e| SessionError::Local(e.to_string()))?;

        let (qtx, qrx) = mpsc::unbounded_channel();
        let budget = Arc::new(Semaphore::new(QUEUE_BYTES >> 10));
        let stage = ApplyStage {
            store: self.store.clone(),
            applier: self.applier.clone(),
            lag: self.lag.clone(),
            synced: self.synced.clone(),
            failures: failures.clone(),
        };
        let mut applier = tokio::task::spawn_blocking(move || stage.run(qrx));
        let mut receiving = Receiving::default();
        let mut progress = SnapshotProgress::default();
        let received: Result<Ended, SessionError> = loop {
            let frame = tokio::select! {
                r = &mut applier => {
                    // The applier stops early only on an error.
                    receiving.discard();
                    return match r {
                        Ok(Err(e)) => Err(e),
                        Ok(Ok(())) => Err(SessionError::Local("applier stopped".into())),
                        Err(e) => Err(SessionError::Local(e.to_string())),
                    };
                }
                f = stream.next_frame() => f,
                _ = stop.changed() => break Ok(Ended::Closed),
            };
            let frame = match frame {
                Ok(Some(f)) => f,
                Ok(None) => break Ok(Ended::Closed),
                Err(e) => break Err(SessionError::Transport(e)),
            };
            match frame {
                Frame::Ltx { db, chunk, last } => {
                    progress.chunk(&db, &chunk, receiving.current.is_none(), last);
                    if let Err(e) = receiving.chunk(&self.primary_url, tmp_dir, db, chunk) {
                        break Err(e);
                    }
                    if last && let Some((db, data, size)) = receiving.take() {
                        let kib = (size >> 10).clamp(1, QUEUE_BYTES >> 10) as u32;
                        let permit = budget
                            .clone()
                            .acquire_many_owned(kib)
                            .await
                            .map_err(|e| SessionError::Local(e.to_string()))?;
                        if qtx.send(Item::File { db, data, permit }).is_err() {
                            break Ok(Ended::Closed);
                        }
                    }
                }
                Frame::Ready { databases } => {
                    if qtx.send(Item::Ready(databases)).is_err() {
                        break Ok(Ended::Closed);
                    }
                }
                Frame::Heartbeat { primary_time_ms } => self.lag.set_since(primary_time_ms),
                Frame::Handoff { .. } => {
                    warn!("handoff offered, but this build's static lease cannot take it")
                }
                Frame::End => {
                    info!(
                        primary = self.primary_url,
                        "the primary ended the stream: it has stopped taking writes"
                    );
                    break Ok(Ended::Closed);
                }
                Frame::Archive {
                    db,
                    txid,
                    post_apply_checksum,
                } => {
                    let target = Pos {
                        txid: TxId(txid),
                        post_apply_checksum: Checksum(post_apply_checksum),
                    };
                    info!(db, target = %target, "the primary sends this replica to the archive instead of a snapshot");
                    break Ok(Ended::Archive { db, target });
                }
            }
        };
        receiving.discard();
        drop(qtx);
        let applied = applier
            .await
            .map_err(|e| SessionError::Local(e.to_string()))?;
        applied.and(received)
    }
}

/// How often a replica that still cannot reach its primary says so.
const OUTAGE_REMINDER: Duration = Duration::from_secs(60);

/// The primary has been unreachable (or its stream cut) since the first failure:
/// the replica warns once when that starts, logs each further attempt at debug level
/// (with a reminder every [`OUTAGE_REMINDER`]), and says when it is back.
#[derive(Default)]
struct Outage {
    /// Since when, how many failed attempts, when it last warned.
    down: Option<(std::time::Instant, u32, std::time::Instant)>,
}

impl Outage {
    fn failed(&mut self, url: &str, e: &TransportError, retry_in: Duration) {
        let now = std::time::Instant::now();
        match &mut self.down {
            None => {
                let what = match e {
                    TransportError::Connect { .. } | TransportError::Closed { .. } => {
                        "the primary went away or cannot be reached"
                    }
                    _ => "the primary's stream cannot be used",
                };
                warn!(
                    primary = url,
                    error = %e,
                    "replication stream failed ({what}); reconnecting with backoff up to \
                     {MAX_BACKOFF:?}, further failures at debug level until it is back"
                );
                self.down = Some((now, 1, now));
            }
            Some((since, attempts, warned)) => {
                *attempts += 1;
                if now.duration_since(*warned) >= OUTAGE_REMINDER {
                    *warned = now;
                    warn!(
                        primary = url,
                        error = %e,
                        attempts = *attempts,
                        down_for = ?since.elapsed(),
                        "still cannot reach the primary"
                    );
                } else {
                    debug!(primary = url, error = %e, attempts = *attempts, ?retry_in, "primary still unreachable");
                }
            }
        }
    }

    fn connected(&mut self, url: &str) {
        match self.down.take() {
            Some((since, attempts, _)) => info!(
                primary = url,
                down_for = ?since.elapsed(),
                attempts,
                "connected to primary again"
            ),
            None => info!(primary = url, "connected to primary"),
        }
    }
}

/// How a connection ended without an error.
enum Ended {
    /// The primary ended it, or the replica is stopping.
    Closed,
    /// The primary sent the replica to the archive for `db` (to at least `target`).
    Archive { db: String, target: Pos },
}

/// Consecutive failures to apply, per database.
type Failures = Arc<Mutex<HashMap<String, u32>>>;

/// The file being received.
#[derive(Default)]
struct Receiving {
    current: Option<(String, Partial)>,
    size: usize,
}

enum Partial {
    Memory(Vec<u8>),
    File(PathBuf, std::fs::File),
}

impl Receiving {
    /// Adds a chunk of database `db`'s file; the first chunk starts a file.
    fn chunk(
        &mut self,
        url: &str,
        tmp_dir: &Path,
        db: String,
        chunk: Vec<u8>,
    ) -> Result<(), SessionError> {
        let malformed = |message| {
            SessionError::Transport(TransportError::Malformed {
                url: url.to_string(),
                message,
            })
        };
        match &self.current {
            Some((cur, _)) if *cur != db => {
                return Err(malformed(format!("chunk of {db} inside a file of {cur}")));
            }
            Some(_) => {}
            None => {
                if crate::store::parse_mount_name(&db)
                    != Some((db.as_str(), crate::store::FileKind::Database))
                {
                    return Err(malformed(format!("invalid database name {db:?}")));
                }
                self.size = 0;
                self.current = Some((db, Partial::Memory(Vec::new())));
            }
        }
        let Some((db, partial)) = self.current.as_mut() else {
            return Ok(());
        };
        self.size += chunk.len();
        let local =
            |p: &Path, e: std::io::Error| SessionError::Local(format!("{}: {e}", p.display()));
        if let Partial::Memory(buf) = partial
            && self.size > MEMORY_FILE_LIMIT
        {
            // Too large for memory: continue in a temp file.
            static SEQ: AtomicU64 = AtomicU64::new(0);
            let n = SEQ.fetch_add(1, Ordering::Relaxed);
            let path = tmp_dir.join(format!("{db}.{n}.ltx.tmp"));
            let mut f = std::fs::File::create(&path).map_err(|e| local(&path, e))?;
            f.write_all(buf).map_err(|e| local(&path, e))?;
            *partial = Partial::File(path, f);
        }
        match partial {
            Partial::Memory(buf) => buf.extend_from_slice(&chunk),
            Partial::File(path, f) => f.write_all(&chunk).map_err(|e| local(path, e))?,
        }
        Ok(())
    }

    /// The complete file: database, contents, size.
    fn take(&mut self) -> Option<(String, Received, usize)> {
        let (db, partial) = self.current.take()?;
        let data = match partial {
            Partial::Memory(b) => Received::Memory(b),
            Partial::File(p, _) => Received::File(p),
        };
        Some((db, data, self.size))
    }

    /// Drops a file received in part.
    fn discard(&mut self) {
        if let Some((_, Partial::File(p, _))) = self.current.take() {
            let _ = std::fs::remove_file(p);
        }
    }
}

/// Progress of a large snapshot being received: a log line per tenth.
#[derive(Default)]
struct SnapshotProgress {
    current: Option<(Tenths, std::time::Instant)>,
}

impl SnapshotProgress {
    /// Counts a chunk of `db`'s file; `first` and `last` mark the file's ends.
    fn chunk(&mut self, db: &str, chunk: &[u8], first: bool, last: bool) {
        if first {
            self.current = large_snapshot(chunk).map(|total| {
                info!(
                    db,
                    mib = total >> 20,
                    "receiving a snapshot from the primary"
                );
                (Tenths::new(total), std::time::Instant::now())
            });
        }
        let Some((tenths, started)) = self.current.as_mut() else {
            return;
        };
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
            self.current = None;
        }
    }
}

/// What the receiving task hands the applier.
enum Item {
    /// A complete file; `permit` holds its share of [`QUEUE_BYTES`] until it is applied.
    File {
        db: String,
        data: Received,
        permit: OwnedSemaphorePermit,
    },
    /// The primary's `Ready`, with its databases.
    Ready(Vec<String>),
}

/// The applier thread of one connection.
struct ApplyStage {
    store: Arc<Store>,
    applier: Arc<dyn Apply>,
    lag: Arc<Lag>,
    synced: Arc<watch::Sender<bool>>,
    failures: Failures,
}

impl ApplyStage {
    /// Applies verified files of `db` (if any) and updates `.lag`.
    fn apply_verified(
        &self,
        db: &str,
        verified: Vec<Verified>,
    ) -> Result<(), crate::store::StoreError> {
        let Some(ts) = verified.last().map(|v| v.header().timestamp) else {
            return Ok(());
        };
        self.applier.apply(db, verified)?;
        self.lag.set_since(ts.max(0) as u64);
        Ok(())
    }

    /// Removes the local databases the primary does not list (none for an empty list:
    /// a primary that has no database yet must not wipe its replicas).
    fn remove_others(&self, primary: &[String]) {
        if primary.is_empty() {
            return;
        }
        for db in self.store.databases() {
            let name = db.name();
            if primary.iter().any(|p| p == name) {
                continue;
            }
            match self.applier.remove(name) {
                Ok(()) => info!(db = name, "removed a database the primary does not have"),
                Err(e) => {
                    warn!(db = name, error = %e, "cannot remove a database the primary does not have")
                }
            }
        }
    }

    /// Applies queued items until the queue closes or a file fails.
    fn run(self, mut rx: mpsc::UnboundedReceiver<Item>) -> Result<(), SessionError> {
        let mut next: Option<Item> = None;
        loop {
            let Some(item) = next.take().or_else(|| rx.blocking_recv()) else {
                return Ok(());
            };
            let (db, first, permit) = match item {
                Item::Ready(databases) => {
                    self.remove_others(&databases);
                    info!("caught up with the primary");
                    self.synced.send_replace(true);
                    continue;
                }
                Item::File { db, data, permit } => (db, data, permit),
            };
            // Every file already queued behind it, up to MAX_BATCH in all, grouped by
            // database in arrival order: the primary interleaves busy databases, and
            // one lock acquisition per database covers its whole group. A Ready is
            // handled after the files before it.
            let mut groups: Vec<(String, Vec<Received>)> = vec![(db, vec![first])];
            let mut permits = vec![permit];
            while permits.len() < MAX_BATCH {
                match rx.try_recv() {
                    Ok(Item::File { db, data, permit }) => {
                        match groups.iter_mut().find(|(d, _)| *d == db) {
                            Some((_, files)) => files.push(data),
                            None => groups.push((db, vec![data])),
                        }
                        permits.push(permit);
                    }
                    Ok(other) => {
                        next = Some(other);
                        break;
                    }
                    Err(_) => break,
                }
            }
            let mut groups = groups.into_iter();
            while let Some((db, files)) = groups.next() {
                if let Err(e) = self.apply_group(&db, files) {
                    for (_, files) in groups {
                        discard_received(files);
                    }
                    return Err(e);
                }
            }
            drop(permits);
        }
    }

    /// Verifies and applies one database's consecutive files.
    fn apply_group(&self, db: &str, files: Vec<Received>) -> Result<(), SessionError> {
        let mut verified = Vec::with_capacity(files.len());
        let mut held = 0;
        let mut failed = None;
        let total = files.len();
        let mut files = files.into_iter();
        for (i, data) in files.by_ref().enumerate() {
            match Verified::verify(db, data) {
                Ok(v) => {
                    held += v.memory();
                    verified.push(v);
                }
                Err(e) => failed = Some(e),
            }
            // Apply what verified at the end, before a failure, or when the batch holds
            // too much memory.
            if i + 1 == total || failed.is_some() || held > BATCH_BYTES {
                held = 0;
                if let Err(e) = self.apply_verified(db, std::mem::take(&mut verified)) {
                    failed.get_or_insert(e);
                }
            }
            if failed.is_some() {
                break;
            }
        }
        if let Some(e) = failed {
            discard_received(files.collect());
            return Err(SessionError::Apply {
                db: db.to_string(),
                error: e.to_string(),
            });
        }
        self.failures
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(db);
        Ok(())
    }
}

/// Removes the temp files of received files that will not be applied.
fn discard_received(files: Vec<Received>) {
    for data in files {
        if let Received::File(p) = data {
            let _ = std::fs::remove_file(p);
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
