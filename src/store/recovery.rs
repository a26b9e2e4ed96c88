//! Start-up recovery of one database directory.
//!
//! Order: LTX files whose named file was lost before the background fsync reached it are
//! restored from the LTX log (`ltxlog.rs`); a hot journal is rolled back; the WAL is cut back to the last captured commit
//! (frames past the last LTX file's WAL range were never acknowledged to a client); after
//! a hot-journal rollback the last LTX file is written into the database again
//! (idempotent; this redoes a transaction whose LTX became durable before the crash,
//! which the rollback just undid); then the database checksum is rebuilt and must equal
//! the last LTX file's post-apply checksum. A clean-shutdown record whose files are untouched replaces all of
//! that (no hashing at all).

use std::fs::{self, File, OpenOptions};
use std::io;
use std::os::unix::fs::FileExt;
use std::path::Path;

use tracing::{info, warn};

use crate::ltx::{CHECKSUM_FLAG, Checksum, Header, Pos, RollingChecksum};

use super::db::{self, Db, DbState, WalCursor, remove_if_exists};
use super::record::{CleanRecord, Stamp};
use super::wal::{self, WalTxn};
use super::{FileKind, StoreError, journal};
use super::{ltxio, ltxlog};

/// Outcome of recovering one database directory.
pub(crate) enum Recovered {
    /// A live database, and whether it still needs its first (snapshot) capture because
    /// its file has content but no LTX history.
    Live(Box<Db>, bool),
    /// A deleted database whose commit-0 LTX file is still kept.
    Tombstone(Pos),
    /// Nothing there (a directory without database or LTX files).
    Nothing,
}

fn io_err(db: &str, op: &'static str, path: &Path) -> impl FnOnce(io::Error) -> StoreError {
    let db = db.to_string();
    let path = path.to_path_buf();
    move |e| StoreError::io(&db, op, path, e)
}

pub(crate) fn recover(name: &str, dir: &Path, node_id: u64) -> Result<Recovered, StoreError> {
    let ltx_dir = dir.join("ltx");
    fs::create_dir_all(&ltx_dir).map_err(io_err(name, "create ltx dir", &ltx_dir))?;
    ltxio::remove_temp_files(&ltx_dir).map_err(io_err(name, "remove temp files", &ltx_dir))?;
    let restored = ltxlog::restore(name, dir)?;
    if restored > 0 {
        info!(
            db = name,
            files = restored,
            "restored LTX files from the LTX log"
        );
    }
    super::replica::finish_interrupted_apply(name, dir)?;
    let files = ltxio::list(&ltx_dir).map_err(io_err(name, "list ltx", &ltx_dir))?;
    let last: Option<(Header, Pos)> = match files.last() {
        Some(f) => Some(ltxio::read_position(name, &f.path)?),
        None => None,
    };
    let record = CleanRecord::take(dir).map_err(io_err(name, "read clean-shutdown record", dir))?;
    let scratch = Db::new(
        name.to_string(),
        dir.to_path_buf(),
        node_id,
        DbState::empty(Pos::default()),
    );
    let db_path = scratch.path(FileKind::Database);
    let db_exists = db_path.exists();

    match &last {
        Some((h, pos)) if h.commit == 0 => {
            // Deleted (possibly a crash in the middle of deleting): finish the deletion.
            for kind in [
                FileKind::Database,
                FileKind::Journal,
                FileKind::Wal,
                FileKind::Shm,
            ] {
                remove_if_exists(name, &scratch.path(kind))?;
            }
            return Ok(Recovered::Tombstone(*pos));
        }
        Some((h, _)) if !db_exists => {
            return Err(StoreError::MissingDatabase {
                db: name.to_string(),
                path: db_path,
                txid: h.max_txid,
            });
        }
        None if !db_exists => return Ok(Recovered::Nothing),
        _ => {}
    }
    let last_pos = last.as_ref().map(|(_, p)| *p);

    if let Some(rec) = record {
        if let Some(st) = from_record(&scratch, rec, last_pos)? {
            info!(db = name, pos = %st.pos, "opened from clean-shutdown record");
            return Ok(Recovered::Live(
                Box::new(Db::new(name.to_string(), dir.to_path_buf(), node_id, st)),
                false,
            ));
        }
        warn!(
            db = name,
            "clean-shutdown record does not match the files; rebuilding checksums"
        );
    }

    // 1. Hot journal.
    let jpath = scratch.path(FileKind::Journal);
    let mut rolled_back = false;
    if jpath.exists() {
        let j = File::open(&jpath).map_err(io_err(name, "open journal", &jpath))?;
        let dbf = OpenOptions::new()
            .write(true)
            .open(&db_path)
            .map_err(io_err(name, "open database", &db_path))?;
        if let Some(r) =
            journal::rollback(&j, &dbf).map_err(io_err(name, "roll back journal", &jpath))?
        {
            info!(
                db = name,
                pages = r.pages_restored,
                size = r.db_size,
                "rolled back hot journal"
            );
            rolled_back = true;
        }
        remove_if_exists(name, &jpath)?;
    }

    // 2. WAL: keep only what the last LTX file says was captured.
    let wpath = scratch.path(FileKind::Wal);
    let mut kept: Vec<WalTxn> = Vec::new();
    let mut cursor = None;
    let mut wal_file = None;
    if wpath.exists() {
        let wf = OpenOptions::new()
            .read(true)
            .write(true)
            .open(&wpath)
            .map_err(io_err(name, "open wal", &wpath))?;
        let wh = wal::read_header(&wf).map_err(io_err(name, "read wal", &wpath))?;
        let keep_end = match (&last, &wh) {
            (Some((h, _)), Some(wh))
                if h.wal_offset > 0 && (h.wal_salt1, h.wal_salt2) == (wh.salt1, wh.salt2) =>
            {
                (h.wal_offset + h.wal_size) as u64
            }
            _ => 0,
        };
        if let Some(wh) = wh.filter(|_| keep_end > 0) {
            let txns = wal::scan(&wf, &wh, wal::HEADER_SIZE, wh.checksum)
                .map_err(io_err(name, "read wal", &wpath))?;
            kept = txns.into_iter().filter(|t| t.end <= keep_end).collect();
            if let Some(t) = kept.last() {
                cursor = Some(WalCursor {
                    salt1: wh.salt1,
                    salt2: wh.salt2,
                    offset: t.end,
                    checksum: t.checksum_after,
                });
            }
        }
        let len = wf
            .metadata()
            .map_err(io_err(name, "stat wal", &wpath))?
            .len();
        match cursor {
            Some(c) => {
                if len > c.offset {
                    info!(
                        db = name,
                        from = len,
                        to = c.offset,
                        "truncating WAL to its last captured commit"
                    );
                    wf.set_len(c.offset)
                        .map_err(io_err(name, "truncate wal", &wpath))?;
                    wf.sync_all().map_err(io_err(name, "fsync wal", &wpath))?;
                    remove_if_exists(name, &scratch.path(FileKind::Shm))?;
                }
                wal_file = Some(wf);
            }
            None => {
                if len > 0 {
                    info!(
                        db = name,
                        bytes = len,
                        "removing WAL without captured commits"
                    );
                }
                drop(wf);
                remove_if_exists(name, &wpath)?;
                remove_if_exists(name, &scratch.path(FileKind::Shm))?;
            }
        }
    }

    // 3. Redo the last transaction. Only needed after a hot-journal rollback: the crash
    //    may have come after its LTX file became durable but before the journal was
    //    removed, and the rollback just undid it. Otherwise the database already holds it
    //    (pages are fsynced before the LTX is written; WAL frames are in the WAL), and
    //    rewriting its pages unconditionally would hide a corruption of exactly those
    //    pages from the comparison below.
    if rolled_back
        && kept.is_empty()
        && let Some(f) = files.last()
    {
        let dbf = OpenOptions::new()
            .write(true)
            .open(&db_path)
            .map_err(io_err(name, "open database", &db_path))?;
        ltxio::rewrite_pages(name, &dbf, &f.path)?;
    }

    // 4. Rebuild the checksums and compare.
    let mut r = rebuild(
        name,
        &db_path,
        wal_file.as_ref().map(|f| (f, kept.as_slice())),
    )?;
    // 4b. LTX files whose WAL frames never reached the disk: the LTX log made the
    //     commit durable before SQLite's own fsync of the WAL (or without one, with
    //     synchronous=NORMAL). Re-apply them to the database.
    if let Some(pos) = last_pos
        && r.actual != pos.post_apply_checksum
        && reapply_lost_wal_frames(
            name,
            &db_path,
            &files,
            r.actual,
            wal_file.as_ref().map(|f| (f, kept.as_slice())),
        )?
    {
        drop(wal_file.take());
        kept.clear();
        cursor = None;
        remove_if_exists(name, &scratch.path(FileKind::Wal))?;
        remove_if_exists(name, &scratch.path(FileKind::Shm))?;
        r = rebuild(name, &db_path, None)?;
    }
    let Rebuilt {
        page_size,
        checksums,
        commit,
        rolling,
        actual,
    } = r;
    let Some(pos) = last_pos else {
        // Content without any LTX history: capture it as the first (snapshot) transaction.
        let needs_snapshot = commit > 0;
        let mut st = DbState::empty(Pos::default());
        st.all_dirty = needs_snapshot;
        return Ok(Recovered::Live(
            Box::new(Db::new(name.to_string(), dir.to_path_buf(), node_id, st)),
            needs_snapshot,
        ));
    };
    if actual != pos.post_apply_checksum {
        return Err(StoreError::ChecksumMismatch {
            db: name.to_string(),
            txid: pos.txid,
            ltx: pos.post_apply_checksum,
            database: actual,
        });
    }
    let mut st = DbState::empty(pos);
    st.page_size = page_size;
    st.commit = commit;
    st.checksums = checksums;
    st.rolling = rolling;
    st.wal_present = cursor.is_some();
    st.wal = cursor;
    info!(db = name, pos = %pos, "recovered");
    Ok(Recovered::Live(
        Box::new(Db::new(name.to_string(), dir.to_path_buf(), node_id, st)),
        false,
    ))
}

/// The logical database's checksums, rebuilt from the files.
struct Rebuilt {
    page_size: Option<u32>,
    checksums: Vec<Checksum>,
    commit: u32,
    rolling: RollingChecksum,
    actual: Checksum,
}

fn rebuild(
    name: &str,
    db_path: &Path,
    wal: Option<(&File, &[WalTxn])>,
) -> Result<Rebuilt, StoreError> {
    let dbf = File::open(db_path).map_err(io_err(name, "open database", db_path))?;
    let len = dbf
        .metadata()
        .map_err(io_err(name, "stat database", db_path))?
        .len();
    let page_size = if len == 0 {
        None
    } else {
        let hdr = db::read_db_header(name, &dbf, db_path)?;
        Some(
            db::parse_page_size(&hdr).ok_or_else(|| StoreError::InvalidDatabaseHeader {
                db: name.to_string(),
                reason: "invalid page size".into(),
            })?,
        )
    };
    let (checksums, commit) = match page_size {
        Some(ps) => {
            let l = db::logical_checksums(name, db_path, ps, wal)?;
            (l.checksums, l.commit)
        }
        None => (Vec::new(), 0),
    };
    let mut rolling = RollingChecksum::new();
    for c in &checksums {
        rolling.toggle(*c);
    }
    let actual = if commit == 0 {
        Checksum(CHECKSUM_FLAG)
    } else {
        rolling.value()
    };
    Ok(Rebuilt {
        page_size,
        checksums,
        commit,
        rolling,
        actual,
    })
}

/// When the database (with its surviving WAL frames) stands at the post-apply checksum of
/// an LTX file followed only by WAL captures, those later files' frames were lost: the
/// surviving frames are copied into the database file (a checkpoint) and the later files
/// applied to it (each verified first). Returns false, changing nothing, when the
/// database matches no such point: that disagreement is reported, never repaired.
fn reapply_lost_wal_frames(
    name: &str,
    db_path: &Path,
    files: &[ltxio::LtxFile],
    actual: Checksum,
    wal: Option<(&File, &[WalTxn])>,
) -> Result<bool, StoreError> {
    let mut from = None;
    for (i, f) in files.iter().enumerate().rev() {
        let (h, p) = ltxio::read_position(name, &f.path)?;
        if p.post_apply_checksum == actual {
            from = Some(i + 1);
            break;
        }
        if h.wal_offset == 0 {
            return Ok(false);
        }
        if h.is_snapshot() {
            from = Some(i);
            break;
        }
    }
    let Some(from) = from.filter(|i| *i < files.len()) else {
        return Ok(false);
    };
    let dbf = OpenOptions::new()
        .read(true)
        .write(true)
        .open(db_path)
        .map_err(io_err(name, "open database", db_path))?;
    if let Some((wf, txns)) = wal
        && let Some(last) = txns.last()
    {
        let wpath = db_path.with_file_name("wal");
        let h = wal::read_header(wf)
            .map_err(io_err(name, "read wal", &wpath))?
            .ok_or_else(|| StoreError::InvalidWal {
                db: name.to_string(),
                reason: "header vanished during recovery".into(),
            })?;
        let ps = u64::from(h.page_size);
        let mut buf = vec![0u8; h.page_size as usize];
        for t in txns {
            for (&pgno, &off) in &t.pages {
                if pgno > t.commit {
                    continue;
                }
                wf.read_exact_at(&mut buf, off)
                    .map_err(io_err(name, "read wal frame", &wpath))?;
                dbf.write_all_at(&buf, u64::from(pgno - 1) * ps)
                    .map_err(io_err(name, "write database", db_path))?;
            }
        }
        dbf.set_len(u64::from(last.commit) * ps).map_err(io_err(
            name,
            "truncate database",
            db_path,
        ))?;
    }
    for f in &files[from..] {
        ltxio::rewrite_pages(name, &dbf, &f.path)?;
    }
    info!(
        db = name,
        files = files.len() - from,
        "re-applied LTX files whose WAL frames were lost"
    );
    Ok(true)
}

/// State from a clean-shutdown record, if it still describes the files exactly.
fn from_record(
    db: &Db,
    rec: CleanRecord,
    last: Option<Pos>,
) -> Result<Option<DbState>, StoreError> {
    let name = db.name();
    let stamp = |kind| {
        let p = db.path(kind);
        Stamp::of(&p).map_err(io_err(name, "stat", &p))
    };
    if Some(rec.pos) != last
        || stamp(FileKind::Database)? != rec.database
        || stamp(FileKind::Wal)? != rec.wal
    {
        return Ok(None);
    }
    let jpath = db.path(FileKind::Journal);
    if let Ok(j) = File::open(&jpath)
        && journal::has_valid_header(&j).map_err(io_err(name, "read journal", &jpath))?
    {
        return Ok(None);
    }
    // The WAL cursor: the end of its last committed transaction (nothing past the last
    // LTX file can be there after a clean shutdown: every commit was captured).
    let wpath = db.path(FileKind::Wal);
    let mut cursor = None;
    if rec.wal.is_some() {
        let wf = File::open(&wpath).map_err(io_err(name, "open wal", &wpath))?;
        if let Some(h) = wal::read_header(&wf).map_err(io_err(name, "read wal", &wpath))? {
            let txns = wal::scan(&wf, &h, wal::HEADER_SIZE, h.checksum)
                .map_err(io_err(name, "read wal", &wpath))?;
            let (offset, checksum) = txns.last().map_or((wal::HEADER_SIZE, h.checksum), |t| {
                (t.end, t.checksum_after)
            });
            cursor = Some(WalCursor {
                salt1: h.salt1,
                salt2: h.salt2,
                offset,
                checksum,
            });
        }
    }
    let mut rolling = RollingChecksum::new();
    for c in &rec.checksums {
        rolling.toggle(*c);
    }
    let expected = if rec.commit == 0 {
        Checksum(CHECKSUM_FLAG)
    } else {
        rolling.value()
    };
    if rec.pos.txid.0 > 0 && expected != rec.pos.post_apply_checksum {
        return Ok(None);
    }
    let mut st = DbState::empty(rec.pos);
    st.page_size = (rec.commit > 0).then_some(rec.page_size);
    st.commit = rec.commit;
    st.checksums = rec.checksums;
    st.rolling = rolling;
    st.wal_present = rec.wal.is_some_and(|s| s.len > 0);
    st.wal = cursor;
    Ok(Some(st))
}
