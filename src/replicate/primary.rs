//! The primary's side of one replication stream.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use tokio::io::AsyncReadExt;
use tokio::sync::mpsc;
use tracing::{debug, info, warn};

use super::decide::{Decision, FileMeta, SnapshotReason, decide};
use crate::ltx::{self, Checksum, Pos, TxId};
use crate::store::{Db, Store, StoreError, list_ltx_files, ltx_ends_in, read_ltx_ends_of};
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
        // A bounded run of files per database per round: a busy database does not
        // starve the others.
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

/// Sends what database `db` needs next for a replica at `have`: the consecutive files
/// that follow it, up to [`ROUND_FILES`] and [`ROUND_BYTES`] (read in one blocking
/// task), or one file too large to read whole, or a snapshot. Where a snapshot is due
/// and `archive_ok` (the replica reads this primary's archive), sends
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
    // A replica one file behind (the usual case while it keeps up) has that file read
    // here: it was just written, so it is in the page cache, and a hop to the blocking
    // pool costs more than reading it. Longer runs are read in the blocking pool.
    let behind = db.pos().txid.0.saturating_sub(have.map_or(0, |p| p.txid.0));
    let round = if behind == 1 {
        plan_round(db, have)?
    } else {
        let d = db.clone();
        tokio::task::spawn_blocking(move || plan_round(&d, have))
            .await
            .map_err(|e| StreamError::Io {
                path: db.ltx_dir(),
                source: std::io::Error::other(e),
            })??
    };
    match round {
        Round::UpToDate => Ok(Step::UpToDate),
        Round::Files(files) => {
            let mut sent = None;
            for (meta, post, data) in files {
                send_bytes(db.name(), data, tx).await?;
                debug!(replica = node, db = db.name(), txid = %meta.max, "sent ltx");
                sent = Some(Pos {
                    txid: meta.max,
                    post_apply_checksum: post,
                });
            }
            Ok(sent.map_or(Step::UpToDate, Step::Sent))
        }
        Round::Large(kept) => {
            send_file(db.name(), &kept.path, tx).await?;
            debug!(replica = node, db = db.name(), txid = %kept.meta.max, "sent ltx");
            Ok(Step::Sent(Pos {
                txid: kept.meta.max,
                post_apply_checksum: kept.post,
            }))
        }
        Round::Snapshot(reason, current) => {
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

/// Most files one round sends of one database (a busy database does not starve the
/// others, and a replica far behind gets many files per round)...
const ROUND_FILES: usize = 64;
/// ...and most bytes; files up to this size are read whole, larger ones are streamed
/// from disk in a round of their own.
const ROUND_BYTES: usize = 1 << 20;

/// What one round sends of one database (see [`plan_round`]).
enum Round {
    UpToDate,
    /// Consecutive files read whole, each with its post-apply checksum.
    Files(Vec<(FileMeta, Checksum, Vec<u8>)>),
    /// The next file, too large to read whole.
    Large(Kept),
    /// A snapshot is due; the primary's position.
    Snapshot(SnapshotReason, Pos),
}

/// Decides ([`decide`]) and reads what a replica at `have` gets next of `db`, file after
/// file, until it would be up to date, a limit is reached, or something other than a
/// small file is due (sent in a round of its own). Blocking.
fn plan_round(db: &Db, mut have: Option<Pos>) -> Result<Round, StreamError> {
    let mut files = Vec::new();
    let mut bytes = 0;
    while files.len() < ROUND_FILES && bytes < ROUND_BYTES {
        let current = db.pos();
        let at = have.map_or(TxId(0), |p| p.txid);
        // Files are looked for only when the replica is behind (a missing name costs a
        // directory scan).
        let kept = if at < current.txid {
            next_file(db, TxId(at.0.saturating_add(1)))?
        } else {
            None
        };
        let metas: Vec<FileMeta> = kept.iter().map(|k| k.meta).collect();
        let decision = decide(have, current, &metas);
        match (decision, kept) {
            (Decision::SendFile(meta), Some(k)) if k.meta == meta => match k.data {
                Some(data) => {
                    bytes += data.len();
                    have = Some(Pos {
                        txid: meta.max,
                        post_apply_checksum: k.post,
                    });
                    files.push((meta, k.post, data));
                }
                None if files.is_empty() => return Ok(Round::Large(k)),
                None => break,
            },
            (Decision::SendSnapshot(reason), _) if files.is_empty() => {
                return Ok(Round::Snapshot(reason, current));
            }
            _ => break,
        }
    }
    Ok(if files.is_empty() {
        Round::UpToDate
    } else {
        Round::Files(files)
    })
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
        .filter(|k| k.meta.min != TxId(1))
        .map(|k| Pos {
            txid: t,
            post_apply_checksum: k.meta.pre_apply,
        }))
}

/// A kept LTX file: what the decision needs, its path and post-apply checksum, and its
/// bytes when it is at most [`ROUND_BYTES`] long.
struct Kept {
    meta: FileMeta,
    post: Checksum,
    path: PathBuf,
    data: Option<Vec<u8>>,
}

/// The kept file starting at `txid` (the one-TXID name first, else a directory scan),
/// opened once: read whole when small, else its two ends.
fn next_file(db: &Db, txid: TxId) -> Result<Option<Kept>, StreamError> {
    let dir = db.ltx_dir();
    let direct = dir.join(ltx::format_filename(txid, txid));
    let (path, file) = match std::fs::File::open(&direct) {
        Ok(f) => (direct, f),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            let found = list_ltx_files(&dir)
                .map_err(|source| StreamError::Io {
                    path: dir.clone(),
                    source,
                })?
                .into_iter()
                .find(|f| f.min == txid);
            let Some(f) = found else {
                return Ok(None);
            };
            match std::fs::File::open(&f.path) {
                Ok(file) => (f.path, file),
                // Removed by retention in between: a snapshot serves instead.
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
                Err(e) => return Ok(unreadable(db, &f.path, e)),
            }
        }
        Err(e) => return Ok(unreadable(db, &direct, e)),
    };
    match read_kept(db.name(), &path, &file) {
        Ok((h, t, data)) => Ok(Some(Kept {
            meta: FileMeta {
                min: h.min_txid,
                max: h.max_txid,
                pre_apply: h.pre_apply_checksum,
            },
            post: t.post_apply_checksum,
            path,
            data,
        })),
        Err(e) => Ok(unreadable(db, &path, e)),
    }
}

/// A kept file that cannot be opened or read: logged, and treated as not kept (the
/// replica gets a snapshot instead).
fn unreadable(db: &Db, path: &Path, e: impl std::fmt::Display) -> Option<Kept> {
    warn!(db = db.name(), path = %path.display(), error = %e, "cannot read LTX file; the replica gets a snapshot");
    None
}

/// Reads an LTX file's header and trailer, and all of it when it is at most
/// [`ROUND_BYTES`] long.
fn read_kept(
    db: &str,
    path: &Path,
    file: &std::fs::File,
) -> Result<(ltx::Header, ltx::Trailer, Option<Vec<u8>>), StoreError> {
    use std::os::unix::fs::FileExt;
    let len = file
        .metadata()
        .map_err(|e| StoreError::io(db, "stat ltx", path, e))?
        .len();
    if len > ROUND_BYTES as u64 {
        let (h, t) = read_ltx_ends_of(db, path, file, len)?;
        return Ok((h, t, None));
    }
    let mut data = vec![0u8; len as usize];
    file.read_exact_at(&mut data, 0)
        .map_err(|e| StoreError::io(db, "read ltx", path, e))?;
    let (h, t) = ltx_ends_in(db, path, &data)?;
    Ok((h, t, Some(data)))
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

/// Sends one LTX file held in memory as `Ltx` frames.
async fn send_bytes(
    db: &str,
    mut data: Vec<u8>,
    tx: &mpsc::Sender<Frame>,
) -> Result<(), StreamError> {
    while data.len() > CHUNK {
        let rest = data.split_off(CHUNK);
        let chunk = std::mem::replace(&mut data, rest);
        send_chunk(db, chunk, false, tx).await?;
    }
    send_chunk(db, data, true, tx).await
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::testutil::{apply, ltx_file, page, replica_store};

    const PS: u32 = 4096;
    const DB: &str = "t.db";

    /// A store whose database `t.db` has `n` transactions: TXID 1 writes 3 pages, each
    /// later one rewrites page 2 with its TXID; with `large_at`, that TXID instead grows
    /// the database with random pages into a file larger than [`ROUND_BYTES`]. Returns
    /// the position after each TXID (index TXID - 1).
    fn store_with(n: u64, large_at: Option<u64>) -> (tempfile::TempDir, Arc<Store>, Vec<Pos>) {
        let dir = tempfile::tempdir().unwrap();
        let s = replica_store(dir.path());
        let mut sums = Vec::new();
        let mut commit = 3;
        let mut positions = Vec::new();
        for txid in 1..=n {
            let pages: Vec<(u32, Vec<u8>)> = if txid == 1 {
                (1..=3).map(|p| (p, page(PS, 3, p, 1))).collect()
            } else if Some(txid) == large_at {
                let grow = (ROUND_BYTES / PS as usize) as u32 + 8;
                let mut pages = vec![(1, page(PS, commit + grow, 1, 0))];
                for p in commit + 1..=commit + grow {
                    let mut d = vec![0u8; PS as usize];
                    d.iter_mut().enumerate().for_each(|(i, b)| {
                        *b = (i as u32)
                            .wrapping_mul(2_654_435_761)
                            .wrapping_add(p * 7919) as u8
                            ^ (i >> 5) as u8
                    });
                    pages.push((p, d));
                }
                commit += grow;
                pages
            } else {
                vec![(2, page(PS, commit, 2, txid as u8))]
            };
            let (bytes, after) = ltx_file(txid, PS, commit, &sums, &pages);
            sums = after;
            positions.push(apply(&s, DB, bytes).pos);
        }
        (dir, s, positions)
    }

    fn round(s: &Store, have: Option<Pos>) -> Round {
        plan_round(&s.db(DB).unwrap(), have).unwrap()
    }

    /// The TXIDs of a round of files, checking that each file's bytes are the kept
    /// file's and that the post-apply checksums are the positions'.
    fn txids(r: Round, positions: &[Pos]) -> Vec<u64> {
        let Round::Files(files) = r else {
            panic!("expected files");
        };
        files
            .iter()
            .map(|(meta, post, data)| {
                assert_eq!(meta.min, meta.max);
                assert_eq!(
                    *post,
                    positions[meta.max.0 as usize - 1].post_apply_checksum
                );
                let (h, t) = ltx::verify(&data[..]).expect("a whole, valid LTX file");
                assert_eq!((h.max_txid, t.post_apply_checksum), (meta.max, *post));
                meta.max.0
            })
            .collect()
    }

    #[test]
    fn a_round_sends_the_files_that_follow_up_to_its_limit() {
        let (_dir, s, pos) = store_with(100, None);
        let first = txids(round(&s, None), &pos);
        assert_eq!(first, (1..=ROUND_FILES as u64).collect::<Vec<_>>());
        let rest = txids(round(&s, Some(pos[ROUND_FILES - 1])), &pos);
        assert_eq!(rest, (ROUND_FILES as u64 + 1..=100).collect::<Vec<_>>());
        assert!(matches!(round(&s, Some(pos[99])), Round::UpToDate));
    }

    #[test]
    fn a_round_stops_before_a_missing_or_damaged_file_and_the_next_one_sends_a_snapshot() {
        let (_dir, s, pos) = store_with(40, None);
        let ltx_dir = s.db(DB).unwrap().ltx_dir();
        let name = |t| ltx_dir.join(ltx::format_filename(TxId(t), TxId(t)));
        std::fs::remove_file(name(30)).unwrap();
        // A file cut short has no readable trailer: kept no more, as far as replicas go.
        let f35 = std::fs::read(name(35)).unwrap();
        std::fs::write(name(35), &f35[..ltx::HEADER_SIZE + 4]).unwrap();
        assert_eq!(
            txids(round(&s, Some(pos[19])), &pos),
            (21..=29).collect::<Vec<_>>()
        );
        assert!(matches!(
            round(&s, Some(pos[28])),
            Round::Snapshot(SnapshotReason::BehindRetention, p) if p == pos[39]
        ));
        assert_eq!(txids(round(&s, Some(pos[30])), &pos), vec![32, 33, 34]);
        assert!(matches!(
            round(&s, Some(pos[33])),
            Round::Snapshot(SnapshotReason::BehindRetention, _)
        ));
    }

    #[test]
    fn a_replica_on_another_history_gets_a_snapshot_not_files() {
        let (_dir, s, pos) = store_with(10, None);
        let other = Pos {
            txid: TxId(5),
            post_apply_checksum: Checksum(pos[4].post_apply_checksum.0 ^ 1),
        };
        assert!(matches!(
            round(&s, Some(other)),
            Round::Snapshot(SnapshotReason::PreApplyMismatch, _)
        ));
        let ahead = Pos {
            txid: TxId(11),
            post_apply_checksum: Checksum(1),
        };
        assert!(matches!(
            round(&s, Some(ahead)),
            Round::Snapshot(SnapshotReason::ReplicaAhead, _)
        ));
    }

    #[test]
    fn a_file_too_large_to_read_whole_goes_in_a_round_of_its_own() {
        let (_dir, s, pos) = store_with(8, Some(5));
        assert_eq!(txids(round(&s, Some(pos[1])), &pos), vec![3, 4]);
        match round(&s, Some(pos[3])) {
            Round::Large(k) => {
                assert_eq!((k.meta.min, k.post), (TxId(5), pos[4].post_apply_checksum));
                assert!(k.data.is_none());
                assert!(std::fs::metadata(&k.path).unwrap().len() > ROUND_BYTES as u64);
            }
            _ => panic!("expected the large file alone"),
        }
        assert_eq!(txids(round(&s, Some(pos[4])), &pos), vec![6, 7, 8]);
    }
}
