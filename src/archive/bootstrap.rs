//! Start-up from the archive: before the node mounts (and so before it takes writes,
//! replicates or starts `exec`), every database the archive holds is brought to the
//! archive's newest state when that is safe, so that neither a new replica nor the
//! first node of a lost cluster needs a snapshot from a primary.
//!
//! - A database missing locally is rebuilt from the newest snapshot and the files
//!   after it.
//! - A local database that is behind, on the same history (the archive recorded its
//!   exact position), is continued file by file.
//! - Anything else (ahead, diverged, WAL frames not yet checkpointed, an archive that
//!   does not continue the local TXID) is left to replication.
//!
//! Archive files carry no database checksums; each one is re-encoded with them (the
//! pre-apply checksum is the local position's, the post-apply checksum is computed
//! from the database's current pages and the file's) and applied through
//! [`Store::apply_replicated`], so the store keeps a verified, checksummed history as
//! if a primary had sent it. Every TXID the primary recorded a position for is
//! compared with the computed checksum.

use std::collections::BTreeMap;
use std::fs::File;
use std::io::{BufReader, BufWriter};
use std::path::Path;

use tracing::info;

use super::restore::{download, plan, plan_from, recorded_positions};
use super::{ArchiveError, RestoreTarget};
use crate::ltx::{self, Checksum, Decoder, Encoder, Header, Pos, RollingChecksum, TxId};
use crate::sink::{LtxObject, SnapshotSink};
use crate::store::{FileKind, Received, Store, Verified};

/// What bootstrap did to one database.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Bootstrapped {
    /// Rebuilt (missing locally) or continued (behind) to this position.
    Restored {
        /// Database.
        db: String,
        /// Local position before (`None`: the database was missing).
        from: Option<Pos>,
        /// Position reached.
        to: Pos,
        /// Archive files applied.
        files: usize,
    },
    /// Left as it was (up to date, ahead, or not on the archive's history).
    Left {
        /// Database.
        db: String,
        /// Why.
        reason: String,
    },
}

/// Brings every database of the archive to its newest state where that is safe (see
/// the module documentation). `store` must not be mounted yet.
///
/// # Errors
/// The archive cannot be listed or read, a file does not verify, or a computed
/// checksum differs from the position the primary recorded. Databases handled
/// before the failure stay as they were brought.
pub async fn bootstrap(
    store: &Store,
    sink: &dyn SnapshotSink,
) -> Result<Vec<Bootstrapped>, ArchiveError> {
    let tmp = store.options().data_dir.join("archive-bootstrap");
    let _ = std::fs::remove_dir_all(&tmp);
    std::fs::create_dir_all(&tmp).map_err(|e| ArchiveError::io("", "create", &tmp, e))?;
    let mut out = Vec::new();
    let mut result = Ok(());
    for db in sink.databases().await? {
        match bootstrap_db(store, sink, &db, &tmp).await {
            Ok(b) => out.push(b),
            Err(e) => {
                result = Err(e);
                break;
            }
        }
    }
    let _ = std::fs::remove_dir_all(&tmp);
    result.map(|()| out)
}

/// Catches up a database that a running replica holds from the archive, when the
/// archive recorded the replica's exact position (same history) and its files from
/// there reach the archive's newest TXID; applies through `apply` (the mount's
/// applier, which keeps readers out). Anything else is left to the primary (a
/// diverged replica still gets the primary's snapshot).
///
/// # Errors
/// As [`bootstrap`].
pub async fn catch_up_db(
    store: &Store,
    sink: &dyn SnapshotSink,
    db: &str,
    apply: &(dyn Fn(&str, &Path) -> Result<Pos, String> + Sync),
) -> Result<Bootstrapped, ArchiveError> {
    let tmp = store.options().data_dir.join("archive-catch-up");
    let _ = std::fs::remove_dir_all(&tmp);
    std::fs::create_dir_all(&tmp).map_err(|e| ArchiveError::io(db, "create", &tmp, e))?;
    let top = super::shipper::archive_top(sink, db).await?;
    let r = continue_db(store, sink, db, &tmp, apply, Some(top)).await;
    let _ = std::fs::remove_dir_all(&tmp);
    r
}

/// Brings database `db` of a running replica to at least `target` from the archive,
/// because its primary sent it there instead of sending a snapshot. The archive must
/// have recorded `target` (the primary's position at that TXID: the same archive and
/// history). A local database whose exact position the archive recorded is continued
/// file by file; anything else (missing, diverged, ahead) is rebuilt from the newest
/// snapshot and the files after it, replacing its content as a primary's snapshot
/// would. Applies through `apply` (the mount's applier). Returns the position reached.
///
/// # Errors
/// [`ArchiveError::Unrestorable`] when the archive did not record `target` or its
/// files do not reach it; otherwise as [`bootstrap`]. Files applied before a failure
/// stay applied (each is a complete, verified transaction).
pub async fn catch_up_to(
    store: &Store,
    sink: &dyn SnapshotSink,
    db: &str,
    target: Pos,
    apply: &(dyn Fn(&str, &Path) -> Result<Pos, String> + Sync),
) -> Result<Pos, ArchiveError> {
    let unrestorable = |reason: String| ArchiveError::Unrestorable {
        db: db.to_string(),
        reason,
    };
    let recorded = recorded_positions(sink, db).await?;
    if recorded.get(&target.txid) != Some(&target.post_apply_checksum) {
        return Err(unrestorable(format!(
            "the archive did not record the primary's position {target} (another archive or history)"
        )));
    }
    let local = store.db(db).map(|d| {
        let st = d.lock();
        (st.pos, st.wal_present || st.wal.is_some())
    });
    let from = match local {
        Some((pos, false))
            if pos.txid.0 > 0 && recorded.get(&pos.txid) == Some(&pos.post_apply_checksum) =>
        {
            Some(pos)
        }
        _ => None,
    };
    let files = match from {
        Some(pos) if pos.txid >= target.txid => return Ok(pos),
        Some(pos) => plan_from(sink, db, pos.txid).await?,
        None => plan(sink, db, RestoreTarget::Latest).await?,
    };
    let reach = files.last().map_or(0, |o| o.key.max_txid);
    if reach < target.txid.0 {
        return Err(unrestorable(format!(
            "the archive's files stop at TXID {}, before the primary's {}",
            TxId(reach),
            target.txid
        )));
    }
    let tmp = store.options().data_dir.join("archive-catch-up");
    let _ = std::fs::remove_dir_all(&tmp);
    std::fs::create_dir_all(&tmp).map_err(|e| ArchiveError::io(db, "create", &tmp, e))?;
    let r = apply_files(store, sink, db, from, &files, &recorded, &tmp, apply).await;
    let _ = std::fs::remove_dir_all(&tmp);
    let to = r?;
    match from {
        Some(from) => {
            info!(db, %from, %to, files = files.len(), "database caught up from the archive")
        }
        None => info!(db, %to, files = files.len(), "database rebuilt from the archive"),
    }
    Ok(to)
}

async fn bootstrap_db(
    store: &Store,
    sink: &dyn SnapshotSink,
    db: &str,
    tmp: &Path,
) -> Result<Bootstrapped, ArchiveError> {
    let apply = |name: &str, path: &Path| -> Result<Pos, String> {
        let file = Verified::verify(name, Received::File(path.to_path_buf()))
            .map_err(|e| e.to_string())?;
        store
            .apply_replicated(name, file)
            .map(|a| a.pos)
            .map_err(|e| e.to_string())
    };
    if store.db(db).is_some() {
        return continue_db(store, sink, db, tmp, &apply, None).await;
    }
    if store.deleted_databases().iter().any(|(n, _)| n == db) {
        return Ok(left(db, "deleted locally; left to replication"));
    }
    let files = match plan(sink, db, RestoreTarget::Latest).await {
        Ok(f) => f,
        Err(ArchiveError::Unrestorable { reason, .. }) => return Ok(left(db, &reason)),
        Err(e) => return Err(e),
    };
    let recorded = recorded_positions(sink, db).await?;
    let to = apply_files(store, sink, db, None, &files, &recorded, tmp, &apply).await?;
    info!(db, pos = %to, files = files.len(), "database rebuilt from the archive");
    Ok(Bootstrapped::Restored {
        db: db.to_string(),
        from: None,
        to,
        files: files.len(),
    })
}

fn left(db: &str, reason: &str) -> Bootstrapped {
    info!(db, reason, "not bootstrapped from the archive");
    Bootstrapped::Left {
        db: db.to_string(),
        reason: reason.to_string(),
    }
}

/// Continues a local database that is behind the archive on the same history (to
/// `must_reach` exactly, when given).
async fn continue_db(
    store: &Store,
    sink: &dyn SnapshotSink,
    db: &str,
    tmp: &Path,
    apply: &(dyn Fn(&str, &Path) -> Result<Pos, String> + Sync),
    must_reach: Option<TxId>,
) -> Result<Bootstrapped, ArchiveError> {
    let Some(local) = store.db(db) else {
        return Ok(left(db, "not present locally"));
    };
    let (pos, wal) = {
        let st = local.lock();
        (st.pos, st.wal_present || st.wal.is_some())
    };
    if wal {
        return Ok(left(db, "the local WAL holds frames; left to replication"));
    }
    let files = plan_from(sink, db, pos.txid).await?;
    if files.is_empty() {
        return Ok(left(db, "up to date with (or ahead of) the archive"));
    }
    if let Some(top) = must_reach
        && files.last().map(|o| o.key.max_txid) != Some(top.0)
    {
        return Ok(left(db, "the archive's files do not reach its newest TXID"));
    }
    let recorded = recorded_positions(sink, db).await?;
    if pos.txid.0 > 0 && recorded.get(&pos.txid) != Some(&pos.post_apply_checksum) {
        return Ok(left(
            db,
            "the archive did not record this position (another history); left to replication",
        ));
    }
    let to = apply_files(store, sink, db, Some(pos), &files, &recorded, tmp, apply).await?;
    info!(db, from = %pos, to = %to, files = files.len(), "database caught up from the archive");
    Ok(Bootstrapped::Restored {
        db: db.to_string(),
        from: Some(pos),
        to,
        files: files.len(),
    })
}

/// Downloads, re-encodes with checksums and applies `files` in order.
#[allow(clippy::too_many_arguments)]
async fn apply_files(
    store: &Store,
    sink: &dyn SnapshotSink,
    db: &str,
    mut pos: Option<Pos>,
    files: &[LtxObject],
    recorded: &BTreeMap<TxId, Checksum>,
    tmp: &Path,
    apply: &(dyn Fn(&str, &Path) -> Result<Pos, String> + Sync),
) -> Result<Pos, ArchiveError> {
    let raw = tmp.join(format!("{db}.archive.ltx"));
    let ltx_err = |e| ArchiveError::ltx(db, e);
    for o in files {
        download(sink, &o.key, &raw).await?;
        let db_file = store.db(db).map(|d| d.path(FileKind::Database));
        let checked = tmp.join(format!("{db}.{}.ltx", o.key.file_name()));
        let post = with_checksums(&raw, &checked, pos, db_file.as_deref()).map_err(ltx_err)?;
        if let Some(&c) = recorded.get(&TxId(o.key.max_txid))
            && c != post
        {
            let _ = std::fs::remove_file(&checked);
            return Err(ArchiveError::PositionMismatch {
                db: db.to_string(),
                txid: TxId(o.key.max_txid),
                recorded: c,
                got: post,
            });
        }
        let applied = apply(db, &checked).map_err(|reason| ArchiveError::Unrestorable {
            db: db.to_string(),
            reason: format!("applying {}: {reason}", o.key),
        });
        let _ = std::fs::remove_file(&checked);
        pos = Some(applied?);
    }
    let _ = std::fs::remove_file(&raw);
    pos.ok_or_else(|| ArchiveError::Unrestorable {
        db: db.to_string(),
        reason: "nothing to apply".into(),
    })
}

/// Re-encodes the archive file `src` (no checksums) into `dst` with database
/// checksums: pre-apply from `pos`, post-apply computed (from the pages for a
/// snapshot, else from the database file `db` at `pos` and the file's pages).
/// Returns the post-apply checksum.
fn with_checksums(
    src: &Path,
    dst: &Path,
    pos: Option<Pos>,
    db: Option<&Path>,
) -> Result<Checksum, ltx::LtxError> {
    use ltx::ResultExt;
    let open = |p: &Path| File::open(p).map_err(ltx::LtxError::from).in_file(p);
    let mut dec = Decoder::new(BufReader::with_capacity(1 << 16, open(src)?)).in_file(src)?;
    let h = dec.header().clone();
    let post = if h.is_snapshot() {
        None
    } else {
        let Some(db) = db else {
            return Err(ltx::LtxError::UnknownPosition {
                reason: "an incremental file needs a database to follow",
            })
            .in_file(src);
        };
        Some(ltx::checksum_after(&open(db)?, pos, src)?)
    };
    let header = Header {
        flags: 0,
        pre_apply_checksum: match (h.is_snapshot(), pos) {
            (false, Some(p)) => p.post_apply_checksum,
            _ => Checksum(0),
        },
        node_id: 0,
        ..h.clone()
    };
    let out = BufWriter::with_capacity(
        1 << 16,
        File::create(dst)
            .map_err(ltx::LtxError::from)
            .in_file(dst)?,
    );
    let mut enc = Encoder::new(out, &header).in_file(dst)?;
    let mut page = vec![0u8; h.page_size as usize];
    let mut rolling = RollingChecksum::new();
    while let Some(pgno) = dec.next_page(&mut page).in_file(src)? {
        rolling.toggle(ltx::page_checksum(pgno, &page));
        enc.encode_page(pgno, &page).in_file(dst)?;
    }
    dec.finish().in_file(src)?;
    let post = post.unwrap_or_else(|| rolling.value());
    enc.finish(post).in_file(dst)?;
    Ok(post)
}
