//! A snapshot read from the live database, for when the archive holds no history from
//! TXID 1 to build one from (archiving enabled after local retention removed it).

use std::collections::BTreeMap;
use std::fs::File;
use std::io::{self, BufWriter};
use std::os::unix::fs::FileExt;
use std::path::Path;

use super::ArchiveError;
use crate::ltx::{
    Checksum, Encoder, HEADER_FLAG_NO_CHECKSUM, Header, Pos, RollingChecksum, TxId, lock_pgno,
    page_checksum,
};
use crate::store::{Db, FileKind, read_page_or_zeros as read_page, wal};

/// Writes a no-checksum snapshot (TXID 1 to the current TXID) of `db` to `dst`, reading
/// the database file overlaid with the captured WAL frames, without holding the
/// database's lock while reading (commits go on). The result is kept only if the
/// position did not move meanwhile and the pages read hash to its checksum; otherwise
/// (a writer was changing pages, a checkpoint restarted the WAL) `Ok(None)`: try later.
pub(crate) fn snapshot_live(db: &Db, dst: &Path) -> Result<Option<Pos>, ArchiveError> {
    let name = db.name();
    let (pos, page_size, commit, cursor) = {
        let st = db.lock();
        (st.pos, st.page_size, st.commit, st.wal)
    };
    let Some(ps) = page_size else {
        return Ok(None);
    };
    if pos.txid.0 == 0 || commit == 0 {
        return Ok(None);
    }
    fn io_err<'a>(
        name: &'a str,
        op: &'static str,
        path: &'a Path,
    ) -> impl FnOnce(io::Error) -> ArchiveError + 'a {
        move |e| ArchiveError::io(name, op, path, e)
    }
    let wal_path = db.path(FileKind::Wal);
    let mut frames: BTreeMap<u32, u64> = BTreeMap::new();
    let wal_file = match cursor {
        Some(c) => {
            let f = File::open(&wal_path).map_err(io_err(name, "open", &wal_path))?;
            let h = wal::read_header(&f)
                .map_err(io_err(name, "read", &wal_path))?
                .filter(|h| h.salt1 == c.salt1 && h.salt2 == c.salt2);
            let Some(h) = h else { return Ok(None) };
            let txns = wal::scan(&f, &h, wal::HEADER_SIZE, h.checksum)
                .map_err(io_err(name, "read", &wal_path))?;
            for t in txns.into_iter().filter(|t| t.end <= c.offset) {
                frames.extend(t.pages);
            }
            Some(f)
        }
        None => None,
    };
    let db_path = db.path(FileKind::Database);
    let db_file = File::open(&db_path).map_err(io_err(name, "open", &db_path))?;
    let header = Header {
        flags: HEADER_FLAG_NO_CHECKSUM,
        page_size: ps,
        commit,
        min_txid: TxId(1),
        max_txid: pos.txid,
        timestamp: std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_millis() as i64)
            .unwrap_or(0),
        ..Header::default()
    };
    let ltx_err = |e| ArchiveError::ltx(name, crate::ltx::LtxError::with_path(e, dst));
    let out = File::create(dst).map_err(io_err(name, "create", dst))?;
    let mut enc = Encoder::new(BufWriter::with_capacity(1 << 16, out), &header).map_err(ltx_err)?;
    let lock = lock_pgno(ps);
    let mut rolling = RollingChecksum::new();
    let mut buf = vec![0u8; ps as usize];
    for pgno in (1..=commit).filter(|&p| p != lock) {
        match (frames.get(&pgno), &wal_file) {
            (Some(&off), Some(w)) => w
                .read_exact_at(&mut buf, off)
                .map_err(io_err(name, "read", &wal_path))?,
            _ => read_page(&db_file, u64::from(pgno - 1) * u64::from(ps), &mut buf)
                .map_err(io_err(name, "read", &db_path))?,
        }
        rolling.toggle(page_checksum(pgno, &buf));
        enc.encode_page(pgno, &buf).map_err(ltx_err)?;
    }
    enc.finish(Checksum(0)).map_err(ltx_err)?;
    if db.pos() != pos || rolling.value() != pos.post_apply_checksum {
        return Ok(None);
    }
    Ok(Some(pos))
}
