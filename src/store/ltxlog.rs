//! The per-database LTX append log, `dbs/<name>/ltx-log`: where a primary's commit
//! becomes durable.
//!
//! A new, empty file and its directory entry cost a file-system journal commit to make
//! durable, several times the cost of SQLite's own commit. So a commit appends its LTX
//! file as one record to this preallocated, zero-filled file (written, not `fallocate`d,
//! so an append changes no metadata) with one `pwrite` and one `fdatasync`: that is the
//! durability point. The named file `ltx/<min>-<max>.ltx` is then written from the same
//! bytes and renamed into place without an fsync; a background thread
//! (`litefs-ltx-sync`) makes such files and the `ltx/` directory durable about once a
//! second with one `syncfs` (one device flush for every file written meanwhile).
//! Start-up restores every record whose named file is missing or damaged.
//!
//! # Format
//!
//! [`LOG_SIZE`] bytes. Records from offset 0, back to back: `b"LTXR"`, the LTX length as
//! a big-endian u32, then the LTX file's bytes. A record is valid when its bytes verify as
//! an LTX file (length, file checksum, page headers). The valid records form a run from
//! offset 0 in which each record's min TXID is the previous record's max TXID + 1; a scan
//! stops at the first record that is invalid or breaks the run, so bytes left from an
//! earlier pass are never mistaken for records.
//!
//! # Invariants
//!
//! - A record is appended only when it continues the run and fits; otherwise every named
//!   file written so far is made durable (with its directory) first and the log restarts at
//!   offset 0. So a named file not known to be durable always has its record in the run.
//!   The sync is a `syncfs` of the data file system (files and directory entries in one
//!   flush; see `Db::sync_ltx_files`).
//! - An LTX file too large for the log is written durably under its name directly
//!   (temp file, fsync, rename, directory fsync), after the same flush.

use std::fs::{self, File, OpenOptions};
use std::io;
use std::os::unix::fs::FileExt;
use std::path::Path;

use tracing::{info, warn};

use crate::ltx::{self, Header, Pos, TxId};

use super::StoreError;
use super::ltxio::{self, TEMP_SUFFIX};

/// File name of the log in the database directory.
pub const FILE_NAME: &str = "ltx-log";
/// Size of the log file.
pub const LOG_SIZE: u64 = 8 << 20;
/// Bytes before the LTX file in a record.
pub const RECORD_HEADER: usize = 8;
const MAGIC: &[u8; 4] = b"LTXR";

/// The open log of one database (held in its state, used under the state lock).
#[derive(Debug)]
pub(crate) struct LtxLog {
    file: File,
    /// Offset of the next record.
    next: u64,
    /// Max TXID of the last record of the current run.
    last: Option<TxId>,
}

impl LtxLog {
    /// Opens the log in `dir`, creating and zero-filling it (durably) if needed. The run
    /// starts empty: the caller makes sure every named file of an older run is durable
    /// (start-up recovery does).
    pub(crate) fn open(dir: &Path) -> io::Result<LtxLog> {
        let path = dir.join(FILE_NAME);
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(&path)?;
        let len = file.metadata()?.len();
        if len < LOG_SIZE {
            let zeros = vec![0u8; 1 << 20];
            let mut off = len;
            while off < LOG_SIZE {
                let n = (LOG_SIZE - off).min(zeros.len() as u64) as usize;
                file.write_all_at(&zeros[..n], off)?;
                off += n as u64;
            }
            file.sync_all()?;
            ltxio::fsync_dir(dir)?;
        }
        Ok(LtxLog {
            file,
            next: 0,
            last: None,
        })
    }

    /// Whether an LTX file of `len` bytes fits in the log at all.
    pub(crate) fn fits(len: usize) -> bool {
        (RECORD_HEADER + len) as u64 <= LOG_SIZE
    }

    /// Whether the LTX file `min..` of `len` bytes can be appended to the current run.
    pub(crate) fn can_append(&self, min: TxId, len: usize) -> bool {
        self.last.is_none_or(|t| t.0 + 1 == min.0)
            && self.next + (RECORD_HEADER + len) as u64 <= LOG_SIZE
    }

    /// Starts a new run at offset 0 (every named file of the old run must be durable).
    pub(crate) fn restart(&mut self) {
        self.next = 0;
        self.last = None;
    }

    /// Appends `record` (the LTX bytes after [`RECORD_HEADER`] reserved bytes, which this
    /// fills in) and makes it durable. The caller checked [`LtxLog::can_append`].
    pub(crate) fn append(&mut self, max: TxId, record: &mut [u8]) -> io::Result<()> {
        let len = u32::try_from(record.len() - RECORD_HEADER)
            .map_err(|_| io::Error::other("LTX record too large"))?;
        record[..4].copy_from_slice(MAGIC);
        record[4..8].copy_from_slice(&len.to_be_bytes());
        self.file.write_all_at(record, self.next)?;
        self.file.sync_data()?;
        self.next += record.len() as u64;
        self.last = Some(max);
        Ok(())
    }
}

/// One valid record found by [`read_records`].
pub(crate) struct Record {
    pub header: Header,
    pub pos: Pos,
    /// The LTX file's bytes.
    pub bytes: Vec<u8>,
}

/// Reads the run of valid records from the start of the log at `path` (none when the
/// file does not exist).
pub(crate) fn read_records(path: &Path) -> io::Result<Vec<Record>> {
    let buf = match fs::read(path) {
        Ok(b) => b,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => return Err(e),
    };
    let mut out: Vec<Record> = Vec::new();
    let mut off = 0usize;
    while off + RECORD_HEADER <= buf.len() && &buf[off..off + 4] == MAGIC {
        let len = u32::from_be_bytes([buf[off + 4], buf[off + 5], buf[off + 6], buf[off + 7]]);
        let start = off + RECORD_HEADER;
        let Some(end) = start.checked_add(len as usize).filter(|e| *e <= buf.len()) else {
            break;
        };
        let bytes = &buf[start..end];
        let Ok((header, trailer)) = ltx::verify(bytes) else {
            break;
        };
        if out
            .last()
            .is_some_and(|r| r.header.max_txid.0 + 1 != header.min_txid.0)
        {
            break;
        }
        out.push(Record {
            pos: Pos {
                txid: header.max_txid,
                post_apply_checksum: trailer.post_apply_checksum,
            },
            header,
            bytes: bytes.to_vec(),
        });
        off = end;
    }
    Ok(out)
}

/// Start-up: writes the named file of every record of the log in `dir` whose file is
/// missing or damaged, and makes every record's named file and the `ltx/` directory
/// durable (one `syncfs`), so the log can start a new run. Returns how many files were restored.
///
/// Records older than the oldest LTX file present were removed by retention and are
/// not restored. A present file that verifies but differs from its record (a history
/// received from another primary since) is kept. A missing file is restored only when
/// its record follows the position before it (pre-apply checksum), so a record from a
/// history this node has left is never put back.
pub(crate) fn restore(db: &str, dir: &Path) -> Result<usize, StoreError> {
    let log_path = dir.join(FILE_NAME);
    let records =
        read_records(&log_path).map_err(|e| StoreError::io(db, "read ltx log", &log_path, e))?;
    if records.is_empty() {
        return Ok(0);
    }
    let ltx_dir = dir.join("ltx");
    let io_err = |op: &'static str, p: &Path| {
        let p = p.to_path_buf();
        move |e| StoreError::io(db, op, p, e)
    };
    let present = ltxio::list(&ltx_dir).map_err(io_err("list ltx", &ltx_dir))?;
    let oldest = present.first().map(|f| f.min);
    // The position before the first record, when a file ends there.
    let mut prev: Option<Pos> = match present
        .iter()
        .find(|f| f.max.0 + 1 == records[0].header.min_txid.0)
    {
        Some(f) => ltxio::read_position(db, &f.path).ok().map(|(_, p)| p),
        None => None,
    };
    let mut restored = 0;
    for rec in &records {
        let h = &rec.header;
        if oldest.is_some_and(|o| h.max_txid < o) {
            prev = Some(rec.pos);
            continue;
        }
        let path = ltx_dir.join(ltx::format_filename(h.min_txid, h.max_txid));
        let keep = match fs::read(&path) {
            Ok(existing) if existing == rec.bytes => true,
            Ok(existing) if ltx::verify(existing.as_slice()).is_ok() => {
                warn!(db, ltx = %path.display(), "LTX file differs from its log record but is valid; keeping the file");
                true
            }
            Ok(_) => false,
            Err(e) if e.kind() == io::ErrorKind::NotFound => false,
            Err(e) => return Err(StoreError::io(db, "read ltx", &path, e)),
        };
        if !keep {
            let follows = h.is_snapshot() || prev.is_some_and(|p| p == h.pre_apply_pos());
            if !follows {
                warn!(db, txid = %h.max_txid, "LTX log record does not follow the files before it; not restoring it or later records");
                break;
            }
            let tmp = ltx_dir.join(format!(
                "{}{TEMP_SUFFIX}",
                ltx::format_filename(h.min_txid, h.max_txid)
            ));
            fs::write(&tmp, &rec.bytes).map_err(io_err("write ltx", &tmp))?;
            fs::rename(&tmp, &path).map_err(io_err("rename ltx", &path))?;
            info!(db, ltx = %path.display(), "restored LTX file from the log");
            restored += 1;
        }
        prev = Some(rec.pos);
    }
    // The kept and the restored files, and their directory entries, in one flush.
    File::open(&ltx_dir)
        .and_then(|d| ltxio::syncfs(&d))
        .map_err(io_err("sync ltx dir", &ltx_dir))?;
    Ok(restored)
}
