//! LTX files on disk: listing a database's `ltx/` directory, encoding a new file (in
//! memory for the log, see `ltxlog.rs`, or spilled to a temp file when too large) and
//! putting it under its name.

use std::fs::{self, File, OpenOptions};
use std::io::{self, BufWriter, Write};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

use crate::ltx::{self, Checksum, Decoder, Encoder, Header, LtxError, Pos, Trailer, TxId};

use super::StoreError;
use super::ltxlog::{LtxLog, RECORD_HEADER};

/// Suffix of files being written; never a valid LTX name, removed at start-up.
pub const TEMP_SUFFIX: &str = ".tmp";

/// One LTX file of a database.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LtxFile {
    /// First TXID it covers.
    pub min: TxId,
    /// Last TXID it covers.
    pub max: TxId,
    /// Its path.
    pub path: PathBuf,
}

/// Lists the LTX files in `dir`, sorted by max TXID. A missing directory is empty.
pub fn list(dir: &Path) -> io::Result<Vec<LtxFile>> {
    let mut out = Vec::new();
    let entries = match fs::read_dir(dir) {
        Ok(e) => e,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(out),
        Err(e) => return Err(e),
    };
    for entry in entries {
        let entry = entry?;
        let name = entry.file_name();
        let Some(name) = name.to_str() else { continue };
        if let Some((min, max)) = ltx::parse_filename(name) {
            out.push(LtxFile {
                min,
                max,
                path: entry.path(),
            });
        }
    }
    out.sort_by_key(|f| (f.max, f.min));
    Ok(out)
}

/// Removes temp files left by a crash in the middle of writing an LTX file.
pub fn remove_temp_files(dir: &Path) -> io::Result<()> {
    let entries = match fs::read_dir(dir) {
        Ok(e) => e,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(()),
        Err(e) => return Err(e),
    };
    for entry in entries {
        let entry = entry?;
        if entry.file_name().to_string_lossy().ends_with(TEMP_SUFFIX) {
            fs::remove_file(entry.path())?;
        }
    }
    Ok(())
}

/// fsyncs a directory so that a rename or unlink in it is durable.
pub fn fsync_dir(dir: &Path) -> io::Result<()> {
    File::open(dir)?.sync_all()
}

/// `syncfs(2)`: writes back everything dirty on the file system that holds `f` (file
/// data, metadata, directory entries) and flushes the device cache, in one call. Since
/// Linux 5.8 it reports writeback errors of that file system seen since `f` was opened.
pub fn syncfs(f: &File) -> io::Result<()> {
    use std::os::fd::AsRawFd;
    // SAFETY: syncfs(2) on a descriptor borrowed for the duration of the call.
    if unsafe { libc::syncfs(f.as_raw_fd()) } != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// Removes `path`; `Ok(false)` when it was already gone.
pub(crate) fn remove_file_if_exists(path: &Path) -> io::Result<bool> {
    match fs::remove_file(path) {
        Ok(()) => Ok(true),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(false),
        Err(e) => Err(e),
    }
}

/// Reads and fully verifies an LTX file (file checksum, page headers), returning its
/// header and trailer.
pub fn verify(db: &str, path: &Path) -> Result<(Header, Trailer), StoreError> {
    let f = File::open(path).map_err(|e| StoreError::io(db, "open ltx", path, e))?;
    ltx::verify(io::BufReader::new(f)).map_err(|e| StoreError::ltx(db, path, e))
}

/// Reads only the header and the trailer of an LTX file (any format): enough to know the
/// position it leads to, without reading its pages. Start-up uses this for the newest
/// file so a clean start does not re-read a large snapshot; a file that is re-applied is
/// verified in full first.
pub fn read_position(db: &str, path: &Path) -> Result<(Header, Pos), StoreError> {
    let (header, trailer) = read_ltx_ends(db, path)?;
    let pos = Pos {
        txid: header.max_txid,
        post_apply_checksum: trailer.post_apply_checksum,
    };
    Ok((header, pos))
}

/// Reads the header and trailer of an LTX file without decoding its pages: what the
/// primary needs to decide what follows a replica's position.
///
/// # Errors
/// I/O errors, or [`ltx::LtxError`] for a header that does not parse.
pub fn read_ltx_ends(db: &str, path: &Path) -> Result<(Header, Trailer), StoreError> {
    let f = File::open(path).map_err(|e| StoreError::io(db, "open ltx", path, e))?;
    let len = f
        .metadata()
        .map_err(|e| StoreError::io(db, "stat ltx", path, e))?
        .len();
    read_ltx_ends_of(db, path, &f, len)
}

/// [`read_ltx_ends`] of an open file of `len` bytes.
pub(crate) fn read_ltx_ends_of(
    db: &str,
    path: &Path,
    f: &File,
    len: u64,
) -> Result<(Header, Trailer), StoreError> {
    ltx_ends(db, path, len, |buf, at| f.read_exact_at(buf, at))
}

/// [`read_ltx_ends`] of a whole LTX file held in memory.
pub(crate) fn ltx_ends_in(
    db: &str,
    path: &Path,
    bytes: &[u8],
) -> Result<(Header, Trailer), StoreError> {
    ltx_ends(db, path, bytes.len() as u64, |buf, at| {
        let at = at as usize;
        buf.copy_from_slice(&bytes[at..at + buf.len()]);
        Ok(())
    })
}

/// Parses the header and trailer of an LTX file of `len` bytes, read by `read_at`.
fn ltx_ends(
    db: &str,
    path: &Path,
    len: u64,
    mut read_at: impl FnMut(&mut [u8], u64) -> io::Result<()>,
) -> Result<(Header, Trailer), StoreError> {
    if len < (ltx::HEADER_SIZE + ltx::TRAILER_SIZE) as u64 {
        return Err(StoreError::io(
            db,
            "read ltx",
            path,
            io::Error::new(
                io::ErrorKind::UnexpectedEof,
                format!("file of {len} bytes is too short"),
            ),
        ));
    }
    let mut hb = [0u8; ltx::HEADER_SIZE];
    let mut tb = [0u8; ltx::TRAILER_SIZE];
    read_at(&mut hb, 0)
        .and_then(|()| read_at(&mut tb, len - ltx::TRAILER_SIZE as u64))
        .map_err(|e| StoreError::io(db, "read ltx", path, e))?;
    let header = Header::from_bytes(&hb).map_err(|e| StoreError::ltx(db, path, e))?;
    Ok((header, Trailer::from_bytes(&tb)))
}

/// Writes the pages of a verified LTX file into the database file and truncates it to the
/// file's commit size. The file is verified completely first, so no page of a damaged file
/// is ever written. Idempotent: applying the same file twice gives the same bytes.
pub fn rewrite_pages(db_name: &str, db: &File, path: &Path) -> Result<Header, StoreError> {
    let (header, _) = verify(db_name, path)?;
    let f = File::open(path).map_err(|e| StoreError::io(db_name, "open ltx", path, e))?;
    let mut dec =
        Decoder::new(io::BufReader::new(f)).map_err(|e| StoreError::ltx(db_name, path, e))?;
    let ps = u64::from(header.page_size);
    let mut buf = vec![0u8; header.page_size as usize];
    while let Some(pgno) = dec
        .next_page(&mut buf)
        .map_err(|e| StoreError::ltx(db_name, path, e))?
    {
        db.write_all_at(&buf, u64::from(pgno - 1) * ps)
            .map_err(|e| StoreError::io(db_name, "write page", path, e))?;
    }
    dec.finish()
        .map_err(|e| StoreError::ltx(db_name, path, e))?;
    db.set_len(u64::from(header.commit) * ps)
        .and_then(|()| db.sync_all())
        .map_err(|e| StoreError::io(db_name, "truncate database", path, e))?;
    Ok(header)
}

/// Where an LTX file being encoded goes: memory (after [`RECORD_HEADER`] reserved bytes,
/// ready to be appended to the log as a record) until it outgrows the log, then a temp
/// file in `dir`.
struct Sink {
    mem: Vec<u8>,
    spill: Option<(PathBuf, BufWriter<File>)>,
    dir: PathBuf,
    name: String,
}

impl Write for Sink {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        if self.spill.is_none() && LtxLog::fits(self.mem.len() - RECORD_HEADER + buf.len()) {
            self.mem.extend_from_slice(buf);
            return Ok(buf.len());
        }
        if self.spill.is_none() {
            let tmp = self.dir.join(format!("{}{TEMP_SUFFIX}", self.name));
            let f = OpenOptions::new()
                .write(true)
                .create(true)
                .truncate(true)
                .open(&tmp)?;
            let mut w = BufWriter::with_capacity(256 * 1024, f);
            w.write_all(&self.mem[RECORD_HEADER..])?;
            self.mem = Vec::new();
            self.spill = Some((tmp, w));
        }
        match &mut self.spill {
            Some((_, w)) => w.write(buf),
            None => Ok(0),
        }
    }

    fn flush(&mut self) -> io::Result<()> {
        match &mut self.spill {
            Some((_, w)) => w.flush(),
            None => Ok(()),
        }
    }
}

impl Drop for Sink {
    /// An abandoned (aborted or failed) file leaves no temp file behind.
    fn drop(&mut self) {
        if let Some((tmp, _)) = &self.spill {
            let _ = fs::remove_file(tmp);
        }
    }
}

/// An encoded LTX file, not yet visible under its name.
pub enum Encoded {
    /// A log record: [`RECORD_HEADER`] reserved bytes, then the LTX file.
    Record(Vec<u8>),
    /// Too large for the log: a complete temp file (not yet fsynced).
    File(PathBuf, File),
}

/// An LTX file being encoded. Nothing is visible under the final name until the caller
/// makes the [`Encoded`] result durable.
pub struct PendingLtx {
    enc: Encoder<Sink>,
}

impl PendingLtx {
    /// Starts encoding a file with `header`; `dir` is the `ltx/` directory, where a file
    /// too large for the log is spilled to a temp file.
    pub fn create(dir: &Path, header: &Header) -> Result<PendingLtx, LtxWriteError> {
        let name = ltx::format_filename(header.min_txid, header.max_txid);
        let sink = Sink {
            mem: vec![0u8; RECORD_HEADER],
            spill: None,
            dir: dir.to_path_buf(),
            name,
        };
        let enc =
            Encoder::new(sink, header).map_err(|e| LtxWriteError::Ltx(dir.to_path_buf(), e))?;
        Ok(PendingLtx { enc })
    }

    fn path(&self) -> PathBuf {
        let h = self.enc.header();
        PathBuf::from(ltx::format_filename(h.min_txid, h.max_txid))
    }

    /// Adds a page (ascending page numbers, never the lock page).
    pub fn page(&mut self, pgno: u32, data: &[u8]) -> Result<(), LtxWriteError> {
        let path = self.path();
        self.enc
            .encode_page(pgno, data)
            .map_err(|e| LtxWriteError::Ltx(path, e))
    }

    /// Finishes the file with `post_apply`.
    pub fn finish(self, post_apply: Checksum) -> Result<Encoded, LtxWriteError> {
        let path = self.path();
        let (mut sink, _trailer) = self
            .enc
            .finish(post_apply)
            .map_err(|e| LtxWriteError::Ltx(path.clone(), e))?;
        match sink.spill.take() {
            None => Ok(Encoded::Record(std::mem::take(&mut sink.mem))),
            Some((tmp, w)) => match w.into_inner() {
                Ok(f) => Ok(Encoded::File(tmp, f)),
                Err(e) => {
                    let _ = fs::remove_file(&tmp);
                    Err(LtxWriteError::Io("write ltx", tmp, e.into_error()))
                }
            },
        }
    }

    /// Drops the file.
    pub fn abort(self) {}
}

/// Makes a complete temp file durable under its final name in `dir`: fsync, rename,
/// fsync of the directory. Removes the temp file on failure.
pub fn commit_file(
    dir: &Path,
    tmp: &Path,
    f: &File,
    header: &Header,
) -> Result<PathBuf, LtxWriteError> {
    let result = (|| {
        f.sync_all()
            .map_err(|e| LtxWriteError::Io("fsync ltx", tmp.to_path_buf(), e))?;
        let dst = dir.join(ltx::format_filename(header.min_txid, header.max_txid));
        fs::rename(tmp, &dst).map_err(|e| LtxWriteError::Io("rename ltx", dst.clone(), e))?;
        fsync_dir(dir).map_err(|e| LtxWriteError::Io("fsync ltx dir", dir.to_path_buf(), e))?;
        Ok(dst)
    })();
    if result.is_err() {
        let _ = fs::remove_file(tmp);
    }
    result
}

/// Writes `bytes` (a complete LTX file) under its final name in `dir` by rename of a
/// spare file or a new temp file, without any fsync: the caller has made the bytes
/// durable elsewhere (the log) and makes the file durable later (see
/// `Db::sync_ltx_files`).
pub(crate) fn write_named(
    dir: &Path,
    header: &Header,
    bytes: &[u8],
    spares: Option<&super::spare::Spares>,
) -> Result<(), LtxWriteError> {
    let name = ltx::format_filename(header.min_txid, header.max_txid);
    let tmp = dir.join(format!("{name}{TEMP_SUFFIX}"));
    let dst = dir.join(&name);
    super::spare::write_renamed(spares, &tmp, &dst, bytes)
        .map_err(|e| LtxWriteError::Io("write ltx", dst, e))
}

/// Why writing an LTX file failed (converted to a [`StoreError`] naming the database).
#[derive(Debug)]
pub enum LtxWriteError {
    /// An I/O error on the given path.
    Io(&'static str, PathBuf, io::Error),
    /// The encoder refused something.
    Ltx(PathBuf, LtxError),
}

impl LtxWriteError {
    /// Attaches the database name.
    pub fn into_store_error(self, db: &str) -> StoreError {
        match self {
            LtxWriteError::Io(op, p, e) => StoreError::io(db, op, p, e),
            LtxWriteError::Ltx(p, e) => StoreError::ltx(db, p, e),
        }
    }
}

/// Milliseconds since the Unix epoch, for LTX header timestamps.
pub fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or(0)
}
