//! The primary's side of one replication stream.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use tokio::io::AsyncReadExt;
use tokio::sync::mpsc;
use tracing::{debug, info, warn};

use super::decide::{Decision, FileMeta, decide};
use crate::ltx::{self, Checksum, Pos, TxId};
use crate::store::{Db, Store, StoreError, list_ltx_files, read_ltx_ends};
use crate::transport::{Frame, StreamRequest};

/// How often an idle stream sends a heartbeat.
pub const HEARTBEAT_INTERVAL: Duration = Duration::from_secs(1);
/// Size of the LTX chunks put in frames.
const CHUNK: usize = 256 * 1024;

/// Why a stream stopped.
#[derive(Debug, thiserror::Error)]
pub enum StreamError {
    /// The replica went away (the frame channel closed).
    #[error("replica disconnected")]
    Disconnected,
    /// Reading the store failed.
    #[error(transparent)]
    Store(#[from] StoreError),
    /// Reading an LTX file failed.
    #[error("reading {path}: {source}")]
    Io {
        /// The file.
        path: PathBuf,
        /// The cause.
        #[source]
        source: std::io::Error,
    },
}

/// Serves one replica until it disconnects or `tx` is closed: brings every database to
/// the primary's position (next files, or snapshots where [`decide`] says so), sends
/// `Ready` once all are caught up, then follows new commits, with a heartbeat every
/// [`HEARTBEAT_INTERVAL`] when idle. Snapshots are written to `tmp_dir` and removed
/// after sending.
///
/// A replica that reads the primary's own archive (its request names the same
/// [`SnapshotSink::location`](crate::sink::SnapshotSink::location)) gets
/// [`Frame::Archive`] instead of a snapshot when the archive can serve it (see
/// [`archive_target`]); the stream then ends (`Ok(())`) and the replica reconnects
/// once it caught up from the archive.
///
/// Once the store stopped being the primary (step-down, handoff, lost lease) and no
/// transaction begun as primary is still open, the stream sends whatever the replica
/// still lacks, then [`Frame::End`], and returns `Ok(())`.
///
/// # Errors
/// [`StreamError::Disconnected`] when the replica goes away (the normal end); store and
/// I/O errors end the stream (the replica reconnects).
pub async fn serve(
    store: Arc<Store>,
    request: StreamRequest,
    tmp_dir: PathBuf,
    tx: mpsc::Sender<Frame>,
) -> Result<(), StreamError> {
    let node = request.node_id;
    let mut known: HashMap<String, Pos> = request
        .positions
        .iter()
        .map(|p| {
            (
                p.db.clone(),
                Pos {
                    txid: TxId(p.txid),
                    post_apply_checksum: Checksum(p.post_apply_checksum),
                },
            )
        })
        .collect();
    // Only the primary's own archive holds what the primary's files continue.
    let archive_ok =
        request.archive.is_some() && store.archive_sink().map(|s| s.location()) == request.archive;
    let mut changes = store.subscribe_changes();
    let mut ready_sent = false;
    loop {
        changes.borrow_and_update();
        // Read before looking for files: a transaction that ends after this check may
        // commit a file the scan below misses, and must not be taken for the last.
        let stepped_down = !store.is_primary() && store.writers_in_flight() == 0;
        let mut sent_any = false;
        // One file per database per round: a busy database does not starve the others.
        for db in store.databases() {
            let have = known.get(db.name()).copied();
            match step(&store, &db, have, archive_ok, &tmp_dir, node, &tx).await? {
                Step::UpToDate => {}
                Step::Sent(next) => {
                    known.insert(db.name().to_string(), next);
                    sent_any = true;
                }
                Step::ToArchive => return Ok(()),
            }
        }
        for (name, pos) in store.deleted_databases() {
            // Replicas that have the database, or an older life of it, get the commit-0
            // file (it deletes whatever they have).
            if let Some(have) = known.get(&name).copied()
                && have != pos
                && have.txid.0 > 0
            {
                let path = store
                    .options()
                    .data_dir
                    .join("dbs")
                    .join(&name)
                    .join("ltx")
                    .join(ltx::format_filename(pos.txid, pos.txid));
                send_file(&name, &path, &tx).await?;
                info!(replica = node, db = name, "sent deletion");
                known.insert(name, pos);
                sent_any = true;
            }
        }
        if !sent_any && stepped_down {
            tx.send(Frame::End)
                .await
                .map_err(|_| StreamError::Disconnected)?;
            info!(
                replica = node,
                "replica has every committed transaction: ending the stream"
            );
            return Ok(());
        }
        if !ready_sent && !sent_any {
            let databases = store
                .databases()
                .iter()
                .map(|d| d.name().to_string())
                .collect();
            tx.send(Frame::Ready { databases })
                .await
                .map_err(|_| StreamError::Disconnected)?;
            ready_sent = true;
            info!(replica = node, "replica caught up");
        }
        if sent_any {
            continue;
        }
        tokio::select! {
            r = changes.changed() => {
                if r.is_err() {
                    return Ok(());
                }
            }
            _ = tokio::time::sleep(HEARTBEAT_INTERVAL) => {
                let now = SystemTime::now()
                    .duration_since(UNIX_EPOCH)
                    .map(|d| d.as_millis() as u64)
                    .unwrap_or(0);
                tx.send(Frame::Heartbeat { primary_time_ms: now })
                    .await
                    .map_err(|_| StreamError::Disconnected)?;
            }
            _ = tx.closed() => return Err(StreamError::Disconnected),
        }
    }
}

/// What [`step`] did for one database.
enum Step {
    /// The replica has the primary's position (or there was nothing to send).
    UpToDate,
    /// A file or snapshot was sent; the replica's new position.
    Sent(Pos),
    /// [`Frame::Archive`] was sent: the stream ends.
    ToArchive,
}

/// Sends what database `db` needs next for a replica at `have`. Where a snapshot is
/// due and `archive_ok` (the replica reads this primary's archive), sends
/// [`Frame::Archive`] instead when [`archive_target`] finds a position to send it to.
async fn step(
    store: &Store,
    db: &Arc<Db>,
    have: Option<Pos>,
    archive_ok: bool,
    tmp_dir: &Path,
    node: u64,
    tx: &mpsc::Sender<Frame>,
) -> Result<Step, StreamError> {
    let current = db.pos();
    let next_txid = TxId(have.map_or(0, |p| p.txid.0).saturating_add(1));
    let files = next_file(db, next_txid)?;
    let metas: Vec<FileMeta> = files.iter().map(|(m, _, _)| *m).collect();
    match decide(have, current, &metas) {
        Decision::UpToDate => Ok(Step::UpToDate),
        Decision::SendFile(meta) => {
            let Some((_, path, post)) = files.into_iter().find(|(m, _, _)| *m == meta) else {
                return Ok(Step::UpToDate);
            };
            send_file(db.name(), &path, tx).await?;
            debug!(replica = node, db = db.name(), txid = %meta.max, "sent ltx");
            Ok(Step::Sent(Pos {
                txid: meta.max,
                post_apply_checksum: post,
            }))
        }
        Decision::SendSnapshot(reason) => {
            if archive_ok && let Some(target) = archive_target(store, db, current)? {
                info!(
                    replica = node,
                    db = db.name(),
                    replica_pos = %have.unwrap_or_default(),
                    primary_pos = %current,
                    archive_pos = %target,
                    ?reason,
                    "sending the replica to the archive instead of a snapshot"
                );
                tx.send(Frame::Archive {
                    db: db.name().to_string(),
                    txid: target.txid.0,
                    post_apply_checksum: target.post_apply_checksum.0,
                })
                .await
                .map_err(|_| StreamError::Disconnected)?;
                return Ok(Step::ToArchive);
            }
            info!(
                replica = node,
                db = db.name(),
                replica_pos = %have.unwrap_or_default(),
                primary_pos = %current,
                ?reason,
                "sending snapshot"
            );
            tokio::fs::create_dir_all(tmp_dir)
                .await
                .map_err(|source| StreamError::Io {
                    path: tmp_dir.to_path_buf(),
                    source,
                })?;
            let path = tmp_dir.join(format!(
                "snapshot-{}-{node}-{}.ltx.tmp",
                db.name(),
                std::process::id()
            ));
            let (d, p) = (db.clone(), path.clone());
            let writer = tokio::task::spawn_blocking(move || d.write_snapshot(&p));
            let sent = send_growing_file(db.name(), &path, writer, tx).await;
            let _ = tokio::fs::remove_file(&path).await;
            Ok(sent?.map_or(Step::UpToDate, Step::Sent))
        }
    }
}

/// Where a replica that needs a snapshot of `db` can start from the archive instead:
/// the archive's newest TXID as this primary's archiver last recorded it
/// ([`Store::archived`]), with the primary's checksum after it, provided the primary
/// keeps the file that follows it (or it is the primary's position), so that the
/// replica continues with files from there. `None`: the archive cannot serve it (no
/// archiver, nothing archived yet, or the file after it is gone).
fn archive_target(store: &Store, db: &Db, current: Pos) -> Result<Option<Pos>, StreamError> {
    let Some(t) = store.archived(db.name()).filter(|t| t.0 > 0) else {
        return Ok(None);
    };
    if t == current.txid {
        return Ok(Some(current));
    }
    if t > current.txid {
        return Ok(None);
    }
    Ok(next_file(db, TxId(t.0 + 1))?
        .first()
        .filter(|(m, _, _)| m.min != TxId(1))
        .map(|(m, _, _)| Pos {
            txid: t,
            post_apply_checksum: m.pre_apply,
        }))
}

/// The kept file starting at `txid` (the one-TXID name first, else a directory scan),
/// with its path and post-apply checksum.
fn next_file(db: &Db, txid: TxId) -> Result<Vec<(FileMeta, PathBuf, Checksum)>, StreamError> {
    let dir = db.ltx_dir();
    let direct = dir.join(ltx::format_filename(txid, txid));
    let path = if direct.exists() {
        Some(direct)
    } else {
        list_ltx_files(&dir)
            .map_err(|source| StreamError::Io {
                path: dir.clone(),
                source,
            })?
            .into_iter()
            .find(|f| f.min == txid)
            .map(|f| f.path)
    };
    let Some(path) = path else {
        return Ok(Vec::new());
    };
    match read_ltx_ends(db.name(), &path) {
        Ok((h, t)) => Ok(vec![(
            FileMeta {
                min: h.min_txid,
                max: h.max_txid,
                pre_apply: h.pre_apply_checksum,
            },
            path,
            t.post_apply_checksum,
        )]),
        Err(e) => {
            // Removed by retention in between, or unreadable: a snapshot serves instead.
            warn!(db = db.name(), error = %e, "cannot read LTX file; the replica gets a snapshot");
            Ok(Vec::new())
        }
    }
}

/// Streams a snapshot while `writer` is still writing it to `path` (append-only):
/// chunks are sent as they appear, the last one once the writer finished. The writer
/// holds the database's state lock only for its own writing, never while this waits
/// for a slow replica. Returns the snapshot's position (`None`: nothing to snapshot).
async fn send_growing_file(
    db: &str,
    path: &Path,
    mut writer: tokio::task::JoinHandle<Result<Option<Pos>, StoreError>>,
    tx: &mpsc::Sender<Frame>,
) -> Result<Option<Pos>, StreamError> {
    let io = |source| StreamError::Io {
        path: path.to_path_buf(),
        source,
    };
    let mut done: Option<Option<Pos>> = None;
    let mut file: Option<tokio::fs::File> = None;
    // Held back one round, so that the last chunk can carry `last`.
    let mut pending: Option<Vec<u8>> = None;
    loop {
        if file.is_none() {
            match tokio::fs::File::open(path).await {
                Ok(f) => file = Some(f),
                Err(e) if e.kind() == std::io::ErrorKind::NotFound && done.is_none() => {}
                Err(e) if e.kind() == std::io::ErrorKind::NotFound && done == Some(None) => {
                    return Ok(None);
                }
                Err(e) => return Err(io(e)),
            }
        }
        if let Some(f) = file.as_mut() {
            let mut chunk = vec![0u8; CHUNK];
            let mut n = 0;
            while n < CHUNK {
                let r = f.read(&mut chunk[n..]).await.map_err(io)?;
                if r == 0 {
                    break;
                }
                n += r;
            }
            if n > 0 {
                chunk.truncate(n);
                if let Some(prev) = pending.replace(chunk) {
                    send_chunk(db, prev, false, tx).await?;
                }
                continue;
            }
        }
        // At the end of what is written so far.
        match done {
            Some(None) => return Ok(None),
            Some(Some(pos)) => {
                let Some(last) = pending.take() else {
                    return Err(io(std::io::Error::from(std::io::ErrorKind::UnexpectedEof)));
                };
                send_chunk(db, last, true, tx).await?;
                return Ok(Some(pos));
            }
            None => {}
        }
        tokio::select! {
            r = &mut writer => {
                done = Some(r.map_err(|e| io(std::io::Error::other(e)))??);
            }
            _ = tokio::time::sleep(Duration::from_millis(2)) => {}
            _ = tx.closed() => return Err(StreamError::Disconnected),
        }
    }
}

async fn send_chunk(
    db: &str,
    chunk: Vec<u8>,
    last: bool,
    tx: &mpsc::Sender<Frame>,
) -> Result<(), StreamError> {
    tx.send(Frame::Ltx {
        db: db.to_string(),
        chunk,
        last,
    })
    .await
    .map_err(|_| StreamError::Disconnected)
}

/// Streams one LTX file as `Ltx` frames.
async fn send_file(db: &str, path: &Path, tx: &mpsc::Sender<Frame>) -> Result<(), StreamError> {
    let io = |source| StreamError::Io {
        path: path.to_path_buf(),
        source,
    };
    let mut f = tokio::fs::File::open(path).await.map_err(io)?;
    let len = f.metadata().await.map_err(io)?.len();
    let mut left = len;
    loop {
        let n = left.min(CHUNK as u64) as usize;
        let mut chunk = vec![0u8; n];
        f.read_exact(&mut chunk).await.map_err(io)?;
        left -= n as u64;
        tx.send(Frame::Ltx {
            db: db.to_string(),
            chunk,
            last: left == 0,
        })
        .await
        .map_err(|_| StreamError::Disconnected)?;
        if left == 0 {
            return Ok(());
        }
    }
}
