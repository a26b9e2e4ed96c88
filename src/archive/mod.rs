//! The archive: every LTX file of every database shipped to a [`SnapshotSink`], and
//! restore from it.
//!
//! # Layout (per database, under the sink's root or prefix)
//!
//! - `<db>/ltx/0/<min>-<max>.ltx`: one file per transaction, as the store wrote it but
//!   re-encoded **without database checksums** (header flag 0x2, pre- and post-apply
//!   checksums 0, WAL fields and node id zeroed). Litestream 0.5.17 restores only such
//!   files, so `litestream restore -o OUT file://<root>/<db>` works on a file archive.
//! - `<db>/ltx/9/0000000000000001-<max>.ltx`: snapshots (full database at `max`), same
//!   encoding. Levels 1..8 (Litestream's compactions) are not written; restore reads
//!   them when present (Litestream-written replicas).
//! - `<db>/litefs/positions/<min>-<max>.json`: the real positions of the files shipped
//!   in one batch ([`PositionsFile`]): TXID, post-apply checksum and timestamp per
//!   file. Litestream never looks outside `ltx/`; our restore compares the restored
//!   database's rolling checksum with them.
//!
//! Every write is create-if-absent: a file that already exists is compared byte for
//! byte with ours (a restart may ship a file twice); a different file means another
//! node wrote a different history, and the archiver stops for that database instead
//! of overwriting anything.

mod bootstrap;
mod live;
mod restore;
mod shipper;
mod state;

use std::fs::File;
use std::io::{self, BufReader, BufWriter, Read, Seek, SeekFrom};
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::ltx::{
    self, Checksum, Decoder, HEADER_FLAG_NO_CHECKSUM, Header, LtxError, Pos, ResultExt,
    TRAILER_SIZE, Trailer, TxId,
};
use crate::sink::{LtxKey, SinkError};

pub use bootstrap::{Bootstrapped, bootstrap, catch_up_db, catch_up_to};
pub use restore::{Progress, RestoreOptions, RestoreTarget, Restored, restore};
pub use shipper::{Archiver, ArchiverOptions};
pub use state::{ArchiveDbState, ArchiveInfo, ArchiveState};

/// Directory (under `<db>/litefs/`) of the recorded positions.
pub const POSITIONS_DIR: &str = "positions";

/// Why archiving or restoring failed.
#[derive(Debug, thiserror::Error)]
pub enum ArchiveError {
    /// The sink failed.
    #[error(transparent)]
    Sink(#[from] SinkError),
    /// An LTX file is invalid or does not fit (checksum, TXID gap, page rules).
    #[error("{db}: {source}")]
    Ltx {
        /// Database.
        db: String,
        /// The LTX error (it names the file).
        #[source]
        source: LtxError,
    },
    /// A local file operation failed.
    #[error("{db}: {operation} {}: {source}", path.display())]
    Io {
        /// Database.
        db: String,
        /// What was being done.
        operation: &'static str,
        /// The file.
        path: PathBuf,
        /// The I/O error.
        #[source]
        source: io::Error,
    },
    /// The archive already holds a different file under the same name: another node
    /// wrote another history. Nothing is overwritten.
    #[error("{key}: the archive holds a different file (another node's history); not overwritten")]
    Diverged {
        /// The file.
        key: LtxKey,
    },
    /// The archive cannot reach the requested point.
    #[error("{db}: {reason}")]
    Unrestorable {
        /// Database.
        db: String,
        /// What is missing.
        reason: String,
    },
    /// The restored database disagrees with the position the primary recorded.
    #[error(
        "{db}: restored database at TXID {txid} has checksum {got}, the primary recorded {recorded}"
    )]
    PositionMismatch {
        /// Database.
        db: String,
        /// TXID checked.
        txid: TxId,
        /// Recorded post-apply checksum.
        recorded: Checksum,
        /// Checksum of the restored database.
        got: Checksum,
    },
    /// `-o` names an existing file and overwriting was not asked for.
    #[error("{}: already exists (use -f to overwrite)", path.display())]
    OutputExists {
        /// The output.
        path: PathBuf,
    },
}

impl ArchiveError {
    /// Whether trying again later may succeed (the sink or the network is down).
    pub fn is_retryable(&self) -> bool {
        match self {
            ArchiveError::Sink(e) => e.is_retryable(),
            ArchiveError::Io { .. } => true,
            _ => false,
        }
    }

    fn io(db: &str, operation: &'static str, path: &Path, source: io::Error) -> ArchiveError {
        ArchiveError::Io {
            db: db.to_string(),
            operation,
            path: path.to_path_buf(),
            source,
        }
    }

    fn ltx(db: &str, source: LtxError) -> ArchiveError {
        ArchiveError::Ltx {
            db: db.to_string(),
            source,
        }
    }
}

/// One recorded position: the database checksum after `txid` on the primary.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PositionRecord {
    /// TXID, 16 hex digits.
    pub txid: String,
    /// Post-apply database checksum, 16 hex digits.
    pub checksum: String,
    /// The LTX file's timestamp (ms since the epoch).
    pub timestamp_ms: i64,
}

/// `<db>/litefs/positions/<min>-<max>.json`: the positions of one shipped batch.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct PositionsFile {
    /// In TXID order.
    pub positions: Vec<PositionRecord>,
}

impl PositionRecord {
    /// The position it records; `None` if the text is malformed.
    pub fn pos(&self) -> Option<Pos> {
        Some(Pos {
            txid: self.txid.parse().ok()?,
            post_apply_checksum: self.checksum.parse().ok()?,
        })
    }
}

/// Name of the positions object of a batch.
fn positions_name(min: TxId, max: TxId) -> String {
    format!("{POSITIONS_DIR}/{min}-{max}.json")
}

/// Reads the header and the trailer of a local LTX file without decoding its pages.
/// Not verified: [`to_archive_file`] verifies the whole file when it re-encodes it.
fn peek(path: &Path) -> Result<(Header, Trailer), LtxError> {
    let mut f = File::open(path).map_err(LtxError::from).in_file(path)?;
    let header = Decoder::new(BufReader::new(&mut f))
        .in_file(path)?
        .header()
        .clone();
    f.seek(SeekFrom::End(-(TRAILER_SIZE as i64)))
        .map_err(LtxError::from)
        .in_file(path)?;
    let mut t = [0u8; TRAILER_SIZE];
    f.read_exact(&mut t).map_err(LtxError::from).in_file(path)?;
    Ok((header, Trailer::from_bytes(&t)))
}

/// Re-encodes the LTX file `src` into `dst` without database checksums (flag 0x2),
/// verifying `src` completely on the way. Returns the new header. Deterministic: the
/// same input always gives the same bytes.
pub fn to_archive_file(src: &Path, dst: &Path) -> Result<Header, LtxError> {
    let input = Decoder::new(BufReader::with_capacity(
        1 << 16,
        File::open(src).map_err(LtxError::from).in_file(src)?,
    ))
    .in_file(src)?;
    let out = BufWriter::with_capacity(
        1 << 16,
        File::create(dst).map_err(LtxError::from).in_file(dst)?,
    );
    let (header, _) = ltx::compact(vec![input], out, HEADER_FLAG_NO_CHECKSUM).in_file(src)?;
    Ok(header)
}

/// Compacts `inputs` (contiguous, TXID order) into `dst` without database checksums,
/// at most `FAN_IN` files at a time (each pass's output is the next pass's first input,
/// kept next to `dst`).
fn compact_files(inputs: &[PathBuf], dst: &Path) -> Result<Header, LtxError> {
    const FAN_IN: usize = 32;
    let open = |p: &Path| -> Result<Decoder<BufReader<File>>, LtxError> {
        Decoder::new(BufReader::with_capacity(
            1 << 16,
            File::open(p).map_err(LtxError::from).in_file(p)?,
        ))
        .in_file(p)
    };
    let mut acc: Option<PathBuf> = None;
    let mut rest = inputs;
    let mut pass = 0;
    loop {
        let mut decs = Vec::new();
        if let Some(a) = &acc {
            decs.push(open(a)?);
        }
        let take = (FAN_IN - decs.len()).min(rest.len());
        for p in &rest[..take] {
            decs.push(open(p)?);
        }
        rest = &rest[take..];
        pass += 1;
        let out_path = if rest.is_empty() {
            dst.to_path_buf()
        } else {
            dst.with_extension(format!("pass{pass}"))
        };
        let result = File::create(&out_path)
            .map_err(LtxError::from)
            .and_then(|f| {
                ltx::compact(
                    decs,
                    BufWriter::with_capacity(1 << 16, f),
                    HEADER_FLAG_NO_CHECKSUM,
                )
            })
            .in_file(&out_path);
        if let Some(a) = acc.take() {
            let _ = std::fs::remove_file(a);
        }
        let (header, _) = result?;
        if rest.is_empty() {
            return Ok(header);
        }
        acc = Some(out_path);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ltx::{Encoder, page_checksum};

    /// A two-page incremental file with checksums, as the store writes them.
    fn local_file(dir: &Path) -> (PathBuf, Checksum) {
        let path = dir.join("0000000000000005-0000000000000005.ltx");
        let header = Header {
            page_size: 512,
            commit: 2,
            min_txid: TxId(5),
            max_txid: TxId(5),
            timestamp: 1_700_000_000_123,
            pre_apply_checksum: Checksum(ltx::CHECKSUM_FLAG | 0x1234),
            wal_offset: 32,
            wal_size: 1088,
            wal_salt1: 7,
            wal_salt2: 9,
            node_id: 3,
            ..Header::default()
        };
        let mut enc = Encoder::new(File::create(&path).unwrap(), &header).unwrap();
        enc.encode_page(1, &[1u8; 512]).unwrap();
        enc.encode_page(2, &[2u8; 512]).unwrap();
        let post = Checksum(
            ltx::CHECKSUM_FLAG | page_checksum(1, &[1u8; 512]).0 ^ page_checksum(2, &[2u8; 512]).0,
        );
        enc.finish(post).unwrap();
        (path, post)
    }

    #[test]
    fn archive_files_carry_no_checksums_and_are_deterministic() {
        let dir = tempfile::tempdir().unwrap();
        let (src, post) = local_file(dir.path());
        let (h, t) = peek(&src).unwrap();
        assert_eq!((h.max_txid, t.post_apply_checksum), (TxId(5), post));

        let a = dir.path().join("a.ltx");
        let b = dir.path().join("b.ltx");
        to_archive_file(&src, &a).unwrap();
        to_archive_file(&src, &b).unwrap();
        assert_eq!(std::fs::read(&a).unwrap(), std::fs::read(&b).unwrap());
        let (h, t) = ltx::verify_path(&a).unwrap();
        assert_eq!(h.flags, HEADER_FLAG_NO_CHECKSUM);
        assert_eq!(
            (h.pre_apply_checksum, t.post_apply_checksum),
            (Checksum(0), Checksum(0))
        );
        assert_eq!((h.min_txid, h.max_txid, h.commit), (TxId(5), TxId(5), 2));
        assert_eq!(h.timestamp, 1_700_000_000_123, "the timestamp is kept");
        let mut dec = Decoder::new(File::open(&a).unwrap()).unwrap();
        let mut buf = [0u8; 512];
        assert_eq!(dec.next_page(&mut buf).unwrap(), Some(1));
        assert_eq!(buf, [1u8; 512]);
        assert_eq!(dec.next_page(&mut buf).unwrap(), Some(2));
        assert_eq!(buf, [2u8; 512]);
    }

    #[test]
    fn a_corrupt_local_file_is_not_archived() {
        let dir = tempfile::tempdir().unwrap();
        let (src, _) = local_file(dir.path());
        let mut bytes = std::fs::read(&src).unwrap();
        let n = bytes.len();
        bytes[n - 1] ^= 1; // file checksum
        std::fs::write(&src, bytes).unwrap();
        assert!(to_archive_file(&src, &dir.path().join("out.ltx")).is_err());
    }
}
