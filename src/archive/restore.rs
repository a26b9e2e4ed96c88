//! Restore: the newest snapshot at or before the target plus the files after it,
//! each verified, applied into a temp file that is renamed over the output.

use std::collections::BTreeMap;
use std::fs::{self, File, OpenOptions};
use std::path::{Path, PathBuf};

use tokio::io::AsyncReadExt;
use tracing::{info, warn};

use super::{ArchiveError, POSITIONS_DIR, PositionsFile};
use crate::ltx::{self, ApplyCheck, Checksum, HEADER_SIZE, Header, Pos, TxId};
use crate::sink::{LtxKey, LtxObject, SNAPSHOT_LEVEL, SnapshotSink};

/// Which state to restore.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RestoreTarget {
    /// The newest TXID the archive reaches.
    Latest,
    /// Exactly this TXID (an error if no file ends there).
    Txid(TxId),
    /// The last transaction whose LTX timestamp is at or before this time (ms since
    /// the epoch).
    Timestamp(i64),
}

/// What to restore where.
#[derive(Debug, Clone)]
pub struct RestoreOptions {
    /// Database name in the archive.
    pub db: String,
    /// The database file to write.
    pub output: PathBuf,
    /// Which state.
    pub target: RestoreTarget,
    /// Replace `output` if it exists.
    pub force: bool,
}

/// Progress of a restore, reported after each file.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Progress {
    /// Files applied so far.
    pub files_done: usize,
    /// Files in the plan.
    pub files_total: usize,
    /// Bytes of LTX files applied so far.
    pub bytes_done: u64,
    /// Bytes of LTX files in the plan.
    pub bytes_total: u64,
}

/// The outcome of a restore.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Restored {
    /// Position of the restored database (checksum computed from its pages).
    pub pos: Pos,
    /// LTX files applied.
    pub files: usize,
    /// Bytes of LTX files read.
    pub bytes: u64,
    /// TXIDs whose recorded position was compared with the restored checksum.
    pub positions_checked: usize,
    /// Whether the final TXID had a recorded position (archives written by
    /// Litestream have none: then the result rests on file checksums and TXID
    /// continuity).
    pub final_position_recorded: bool,
}

/// Downloads one archived file to `path`; returns its size.
pub(crate) async fn download(
    sink: &dyn SnapshotSink,
    key: &LtxKey,
    path: &Path,
) -> Result<u64, ArchiveError> {
    let mut r = sink.open(key).await?;
    let mut f = tokio::fs::File::create(path)
        .await
        .map_err(|e| ArchiveError::io(&key.db, "create", path, e))?;
    let n = tokio::io::copy(&mut r, &mut f)
        .await
        .map_err(|e| ArchiveError::io(&key.db, "download", path, e))?;
    Ok(n)
}

/// Reads only the header of an archived file.
async fn remote_header(sink: &dyn SnapshotSink, key: &LtxKey) -> Result<Header, ArchiveError> {
    let mut r = sink.open(key).await?;
    let mut b = [0u8; HEADER_SIZE];
    r.read_exact(&mut b)
        .await
        .map_err(|e| ArchiveError::io(&key.db, "read header of", Path::new(&key.to_string()), e))?;
    Header::from_bytes(&b).map_err(|e| ArchiveError::ltx(&key.db, e.with_path(key.to_string())))
}

/// Positions recorded by the archiver (TXID -> post-apply checksum).
pub(crate) async fn recorded_positions(
    sink: &dyn SnapshotSink,
    db: &str,
) -> Result<BTreeMap<TxId, Checksum>, ArchiveError> {
    let mut out = BTreeMap::new();
    for name in sink.list_meta(db, POSITIONS_DIR).await? {
        let Some(body) = sink
            .get_meta(db, &format!("{POSITIONS_DIR}/{name}"))
            .await?
        else {
            continue;
        };
        match serde_json::from_slice::<PositionsFile>(&body) {
            Ok(file) => {
                for p in file.positions.iter().filter_map(|r| r.pos()) {
                    out.insert(p.txid, p.post_apply_checksum);
                }
            }
            Err(e) => {
                warn!(db, object = name, error = %e, "ignoring an unreadable positions object")
            }
        }
    }
    Ok(out)
}

/// Chooses the files: a base (a snapshot: level 9, or any file starting at TXID 1)
/// and then, at each step, the file starting right after the current TXID that
/// reaches furthest without passing the target (level 0 first for a timestamp, so
/// that the stop is per transaction).
pub(crate) async fn plan(
    sink: &dyn SnapshotSink,
    db: &str,
    target: RestoreTarget,
) -> Result<Vec<LtxObject>, ArchiveError> {
    let mut all = Vec::new();
    for level in 0..=SNAPSHOT_LEVEL {
        all.extend(sink.list(db, level).await?);
    }
    let unrestorable = |reason: String| ArchiveError::Unrestorable {
        db: db.to_string(),
        reason,
    };
    if all.is_empty() {
        return Err(unrestorable("no LTX files in the archive".into()));
    }
    let limit = match target {
        RestoreTarget::Txid(t) => t.0,
        _ => u64::MAX,
    };
    let mut bases: Vec<&LtxObject> = all
        .iter()
        .filter(|o| o.key.min_txid == 1 && o.key.max_txid <= limit)
        .collect();
    // Newest first; at equal TXIDs the highest level (the snapshot) first.
    bases.sort_by_key(|o| std::cmp::Reverse((o.key.max_txid, o.key.level)));
    let base = match target {
        RestoreTarget::Timestamp(ts) => {
            let mut found = None;
            for b in bases {
                if remote_header(sink, &b.key).await?.timestamp <= ts {
                    found = Some(b);
                    break;
                }
            }
            found
        }
        _ => bases.first().copied(),
    };
    let Some(base) = base else {
        return Err(unrestorable(format!(
            "no snapshot at or before the target ({target:?})"
        )));
    };
    let mut out = vec![base.clone()];
    let at = extend_chain(&all, &mut out, base.key.max_txid, limit, target);
    if let RestoreTarget::Txid(t) = target
        && at != t.0
    {
        if let Some(o) = all
            .iter()
            .find(|o| o.key.level == 0 && o.key.min_txid <= t.0 && t.0 < o.key.max_txid)
        {
            return Err(unrestorable(format!(
                "TXID {t} is inside {}, whose transactions {}..{} were shipped together \
                 (backup.max-files-per-sync); restore TXID {} or {} instead",
                o.key,
                TxId(o.key.min_txid),
                TxId(o.key.max_txid),
                TxId(o.key.min_txid - 1),
                TxId(o.key.max_txid)
            )));
        }
        return Err(unrestorable(format!(
            "no file in the archive ends at TXID {t} (the chain from the snapshot at {} stops at {})",
            TxId(base.key.max_txid),
            TxId(at)
        )));
    }
    Ok(out)
}

/// Appends to `out`, from TXID `at`, the files that continue it up to `limit`: at each
/// step the one starting at `at + 1` that reaches furthest (level 0 first for a
/// timestamp target). Returns the TXID reached.
fn extend_chain(
    all: &[LtxObject],
    out: &mut Vec<LtxObject>,
    mut at: u64,
    limit: u64,
    target: RestoreTarget,
) -> u64 {
    loop {
        let next = all
            .iter()
            .filter(|o| {
                o.key.level != SNAPSHOT_LEVEL && o.key.min_txid == at + 1 && o.key.max_txid <= limit
            })
            .max_by_key(|o| match target {
                RestoreTarget::Timestamp(_) => (o.key.level == 0, o.key.max_txid),
                _ => (true, o.key.max_txid),
            });
        match next {
            Some(o) => {
                at = o.key.max_txid;
                out.push(o.clone());
            }
            None => return at,
        }
    }
}

/// The files that take a database at TXID `from` to the newest TXID the archive
/// holds (empty: already there, or the archive does not continue `from`).
pub(crate) async fn plan_from(
    sink: &dyn SnapshotSink,
    db: &str,
    from: TxId,
) -> Result<Vec<LtxObject>, ArchiveError> {
    let mut all = Vec::new();
    for level in 0..SNAPSHOT_LEVEL {
        all.extend(sink.list(db, level).await?);
    }
    let mut out = Vec::new();
    extend_chain(&all, &mut out, from.0, u64::MAX, RestoreTarget::Latest);
    Ok(out)
}

/// Restores `opts.db` from `sink` into `opts.output`.
///
/// Every file is fully verified before any of its pages is written (file checksum,
/// page rules, TXID continuity; positions for files that carry checksums); the
/// database checksum is tracked through the chain and compared with every position
/// the primary recorded. The result is written to a temp file next to the output,
/// fsynced, and moved into place atomically (without `force`, a file that appeared
/// meanwhile is not replaced).
///
/// # Errors
/// [`ArchiveError::OutputExists`], [`ArchiveError::Unrestorable`],
/// [`ArchiveError::PositionMismatch`], LTX, sink and I/O errors. The output is
/// untouched on error.
pub async fn restore(
    sink: &dyn SnapshotSink,
    opts: &RestoreOptions,
    progress: &mut (dyn FnMut(&Progress) + Send),
) -> Result<Restored, ArchiveError> {
    let db = opts.db.as_str();
    if !opts.force && opts.output.exists() {
        return Err(ArchiveError::OutputExists {
            path: opts.output.clone(),
        });
    }
    let files = plan(sink, db, opts.target).await?;
    let recorded = recorded_positions(sink, db).await?;
    let file_name = opts
        .output
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_else(|| db.to_string());
    let tmp_db = opts
        .output
        .with_file_name(format!(".{file_name}.restore-{}.tmp", std::process::id()));
    let tmp_ltx = tmp_db.with_extension("ltx");
    let result = apply_all(sink, opts, &files, &recorded, &tmp_db, &tmp_ltx, progress).await;
    let _ = fs::remove_file(&tmp_ltx);
    let restored = match result {
        Ok(r) => r,
        Err(e) => {
            let _ = fs::remove_file(&tmp_db);
            return Err(e);
        }
    };
    let placed = if opts.force {
        fs::rename(&tmp_db, &opts.output)
    } else {
        // hard_link refuses an existing name: no clobbering even in a race.
        fs::hard_link(&tmp_db, &opts.output).and_then(|()| fs::remove_file(&tmp_db))
    };
    if let Err(e) = placed {
        let _ = fs::remove_file(&tmp_db);
        return Err(if e.kind() == std::io::ErrorKind::AlreadyExists {
            ArchiveError::OutputExists {
                path: opts.output.clone(),
            }
        } else {
            ArchiveError::io(db, "move into place", &opts.output, e)
        });
    }
    if let Some(parent) = opts.output.parent().filter(|p| !p.as_os_str().is_empty()) {
        File::open(parent)
            .and_then(|d| d.sync_all())
            .map_err(|e| ArchiveError::io(db, "fsync", parent, e))?;
    }
    if restored.final_position_recorded {
        info!(db, pos = %restored.pos, checked = restored.positions_checked, "restored; the database checksum matches the position the primary recorded");
    } else {
        info!(db, pos = %restored.pos, checked = restored.positions_checked, "restored; no recorded position for this TXID (an archive written by Litestream?): verified by file checksums and TXID continuity only");
    }
    Ok(restored)
}

async fn apply_all(
    sink: &dyn SnapshotSink,
    opts: &RestoreOptions,
    files: &[LtxObject],
    recorded: &BTreeMap<TxId, Checksum>,
    tmp_db: &Path,
    tmp_ltx: &Path,
    progress: &mut (dyn FnMut(&Progress) + Send),
) -> Result<Restored, ArchiveError> {
    let db = opts.db.as_str();
    let out = OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(true)
        .open(tmp_db)
        .map_err(|e| ArchiveError::io(db, "create", tmp_db, e))?;
    let mut state = Progress {
        files_done: 0,
        files_total: files.len(),
        bytes_done: 0,
        bytes_total: files.iter().map(|o| o.size).sum(),
    };
    let mut pos: Option<Pos> = None;
    let mut checked = 0;
    let mut final_recorded = false;
    for (i, o) in files.iter().enumerate() {
        let n = download(sink, &o.key, tmp_ltx).await?;
        if let RestoreTarget::Timestamp(ts) = opts.target
            && i > 0
        {
            let (h, _) = super::peek(tmp_ltx).map_err(|e| ArchiveError::ltx(db, e))?;
            if h.timestamp > ts {
                break;
            }
        }
        let p = ltx::apply_file_with(&out, pos, tmp_ltx, ApplyCheck::Incremental)
            .map_err(|e| ArchiveError::ltx(db, e.with_path(o.key.to_string())))?;
        final_recorded = match recorded.get(&p.txid) {
            Some(&c) if c == p.post_apply_checksum => {
                checked += 1;
                true
            }
            Some(&c) => {
                return Err(ArchiveError::PositionMismatch {
                    db: db.to_string(),
                    txid: p.txid,
                    recorded: c,
                    got: p.post_apply_checksum,
                });
            }
            None => false,
        };
        pos = Some(p);
        state.files_done += 1;
        state.bytes_done += n;
        progress(&state);
    }
    out.sync_all()
        .map_err(|e| ArchiveError::io(db, "fsync", tmp_db, e))?;
    let pos = pos.ok_or_else(|| ArchiveError::Unrestorable {
        db: db.to_string(),
        reason: "nothing to apply".into(),
    })?;
    Ok(Restored {
        pos,
        files: state.files_done,
        bytes: state.bytes_done,
        positions_checked: checked,
        final_position_recorded: final_recorded,
    })
}
