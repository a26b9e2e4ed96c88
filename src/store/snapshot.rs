//! Snapshots for replication: the whole logical database (database file overlaid with
//! the captured WAL frames) as one LTX file from TXID 1 at the current position.

use std::collections::BTreeMap;
use std::fs::File;
use std::io::BufWriter;
use std::os::unix::fs::FileExt;
use std::path::Path;

use crate::ltx::{self, Checksum, Encoder, Header, Pos, RollingChecksum, TxId};

use super::db::read_page_or_zeros;
use super::{Db, FileKind, StoreError, wal};

impl Db {
    /// Writes a snapshot LTX file of the database at its current position to `out`
    /// (created or truncated) and returns that position. `None` when the database has
    /// never committed (nothing to snapshot).
    ///
    /// Taken under the database's state lock, so no commit interleaves; pages are
    /// streamed from disk one at a time (memory does not grow with the database). The
    /// file is written front to back and never rewritten, so a reader may send it while
    /// it grows; it is not fsynced (it only lives while it is sent). The
    /// checksum of the pages written is compared with the position before returning, so
    /// a snapshot never claims a position its pages do not have.
    ///
    /// # Errors
    /// I/O errors naming the file; [`StoreError::ChecksumMismatch`] if the pages read
    /// do not add up to the position (the database changed behind the store).
    pub fn write_snapshot(&self, out: &Path) -> Result<Option<Pos>, StoreError> {
        let st = self.lock();
        let (Some(ps), pos) = (st.page_size, st.pos) else {
            return Ok(None);
        };
        if pos.txid.0 == 0 || st.deleted || st.commit == 0 {
            return Ok(None);
        }
        let name = self.name();
        // Newest captured WAL copy of each page (only frames up to the capture cursor).
        let mut overlay: BTreeMap<u32, u64> = BTreeMap::new();
        let mut wal_file = None;
        if let Some(c) = st.wal {
            let path = self.path(FileKind::Wal);
            let f = File::open(&path).map_err(|e| StoreError::io(name, "open wal", &path, e))?;
            let h = wal::read_header(&f)
                .map_err(|e| StoreError::io(name, "read wal", &path, e))?
                .filter(|h| h.salt1 == c.salt1 && h.salt2 == c.salt2);
            if let Some(h) = h {
                let txns = wal::scan(&f, &h, wal::HEADER_SIZE, h.checksum)
                    .map_err(|e| StoreError::io(name, "read wal", &path, e))?;
                for t in txns.into_iter().filter(|t| t.end <= c.offset) {
                    overlay.extend(t.pages);
                }
            }
            wal_file = Some(f);
        }
        let db_path = self.path(FileKind::Database);
        let db_file =
            File::open(&db_path).map_err(|e| StoreError::io(name, "open database", &db_path, e))?;
        let header = Header {
            flags: 0,
            page_size: ps,
            commit: st.commit,
            min_txid: TxId(1),
            max_txid: pos.txid,
            timestamp: super::ltxio::now_ms(),
            pre_apply_checksum: Checksum(0),
            node_id: 0,
            ..Header::default()
        };
        let w = File::create(out).map_err(|e| StoreError::io(name, "create snapshot", out, e))?;
        let ltx_err = |e| StoreError::ltx(name, out, e);
        let mut enc =
            Encoder::new(BufWriter::with_capacity(1 << 20, w), &header).map_err(ltx_err)?;
        let lock = ltx::lock_pgno(ps);
        let mut buf = vec![0u8; ps as usize];
        let mut rolling = RollingChecksum::new();
        for pgno in 1..=st.commit {
            if pgno == lock {
                continue;
            }
            match (overlay.get(&pgno), wal_file.as_ref()) {
                (Some(&off), Some(wf)) => wf
                    .read_exact_at(&mut buf, off)
                    .map_err(|e| StoreError::io(name, "read wal frame", &db_path, e))?,
                _ => read_page_or_zeros(&db_file, u64::from(pgno - 1) * u64::from(ps), &mut buf)
                    .map_err(|e| StoreError::io(name, "read page", &db_path, e))?,
            }
            rolling.toggle(ltx::page_checksum(pgno, &buf));
            enc.encode_page(pgno, &buf).map_err(ltx_err)?;
        }
        if rolling.value() != pos.post_apply_checksum {
            return Err(StoreError::ChecksumMismatch {
                db: name.to_string(),
                txid: pos.txid,
                ltx: pos.post_apply_checksum,
                database: rolling.value(),
            });
        }
        let (w, _) = enc.finish(pos.post_apply_checksum).map_err(ltx_err)?;
        // Not fsynced: a snapshot lives only while it is sent.
        w.into_inner()
            .map_err(|e| StoreError::io(name, "write snapshot", out, e.into_error()))?;
        drop(st);
        Ok(Some(pos))
    }
}
