//! The one error type of the LTX module.

use std::io;
use std::path::{Path, PathBuf};

use super::{Checksum, Pos, TxId};

/// Everything that can be wrong with an LTX file or with applying it.
///
/// Variants name the field or page at fault. Errors about a file on disk are
/// wrapped in [`LtxError::File`] by whoever knows the path (see [`ResultExt`]).
#[derive(Debug, thiserror::Error)]
pub enum LtxError {
    /// An I/O error from the underlying reader, writer or file.
    #[error("i/o error: {0}")]
    Io(#[from] io::Error),
    /// The input ended before the structure being read was complete.
    #[error("file truncated: {what} incomplete at byte offset {offset}")]
    Truncated {
        /// What was being read.
        what: &'static str,
        /// Logical byte offset where the read started.
        offset: u64,
    },
    /// The file does not start with `LTX1`.
    #[error("invalid magic {got:02x?}: not an LTX file")]
    InvalidMagic {
        /// The first four bytes found.
        got: [u8; 4],
    },
    /// A header field breaks a rule.
    #[error("invalid header: {field} = {value:#x}: {rule}")]
    InvalidHeader {
        /// Field name.
        field: &'static str,
        /// Its value (signed fields as two's complement).
        value: u64,
        /// The rule it breaks.
        rule: &'static str,
    },
    /// A trailer field breaks a rule.
    #[error("invalid trailer: {field} = {value:016x}: {rule}")]
    InvalidTrailer {
        /// Field name.
        field: &'static str,
        /// Its value.
        value: u64,
        /// The rule it breaks.
        rule: &'static str,
    },
    /// A page header has flags outside 0x0001, or the terminator is not all zero.
    #[error("invalid page header at byte offset {offset}: pgno {pgno}, flags {flags:#06x}")]
    InvalidPageHeader {
        /// Page number found.
        pgno: u32,
        /// Flags found.
        flags: u16,
        /// Byte offset of the page header.
        offset: u64,
    },
    /// Pages must be in strictly ascending order.
    #[error("page {pgno} out of order: follows page {prev}")]
    PageOutOfOrder {
        /// The offending page.
        pgno: u32,
        /// The page before it.
        prev: u32,
    },
    /// A page number above the commit (database size after the file).
    #[error("page {pgno} beyond commit {commit}")]
    PageBeyondCommit {
        /// The offending page.
        pgno: u32,
        /// The header's commit.
        commit: u32,
    },
    /// The lock page (holding SQLite's PENDING_BYTE) is never stored.
    #[error("page {pgno} is the lock page and must not be stored")]
    LockPage {
        /// The lock page number.
        pgno: u32,
    },
    /// A snapshot (or a file growing a database) lacks a page it must hold.
    #[error("page {expected} missing (next page found: {found})")]
    MissingPage {
        /// The page that should come next.
        expected: u32,
        /// The page found instead (0: the end of the page block).
        found: u32,
    },
    /// Page data of the wrong length (encoder input, or decompressed size).
    #[error("page {pgno}: {what} is {got} bytes, page size is {expected}")]
    PageSize {
        /// The page.
        pgno: u32,
        /// Which length.
        what: &'static str,
        /// The page size.
        expected: u32,
        /// The length found.
        got: u64,
    },
    /// A compressed payload does not decode.
    #[error("page {pgno}: cannot decompress: {reason}")]
    Decompress {
        /// The page.
        pgno: u32,
        /// What the decompressor said.
        reason: String,
    },
    /// The page index does not describe the frames of the file.
    #[error("page index: {what}: expected {expected}, got {got}")]
    IndexMismatch {
        /// What differs (names the entry or page where known).
        what: String,
        /// Value derived from the frames.
        expected: u64,
        /// Value found in the index.
        got: u64,
    },
    /// A checksum differs from the one computed.
    #[error("{what} checksum mismatch: expected {expected}, got {got}")]
    ChecksumMismatch {
        /// Which checksum (file, post-apply, pre-apply, database).
        what: &'static str,
        /// The value stored or claimed.
        expected: Checksum,
        /// The value computed.
        got: Checksum,
    },
    /// Bytes follow the trailer (or the LZ4 stream of the page block).
    #[error("unexpected data after the {after}")]
    TrailingData {
        /// What the data follows.
        after: &'static str,
    },
    /// The file does not start where the database is.
    #[error("position mismatch: database is at {current}, file applies to {pre_apply}")]
    PosMismatch {
        /// The database position.
        current: Pos,
        /// The file's pre-apply position.
        pre_apply: Pos,
    },
    /// The file's TXIDs do not follow the database's.
    #[error("TXID gap: database is at TXID {current}, file starts at TXID {min_txid}")]
    TxidGap {
        /// The database's TXID.
        current: TxId,
        /// The file's first TXID.
        min_txid: TxId,
    },
    /// The database's position is unknown and the file cannot establish it.
    #[error("database position unknown: {reason}")]
    UnknownPosition {
        /// Why the file cannot be applied.
        reason: &'static str,
    },
    /// A database file is not a whole number of pages, or has another page size.
    #[error("database file: {reason} (size {size}, page size {page_size})")]
    InvalidDatabase {
        /// What is wrong.
        reason: &'static str,
        /// File size in bytes.
        size: u64,
        /// Page size in use.
        page_size: u32,
    },
    /// Compaction inputs that do not form one run.
    #[error("compaction: {reason}")]
    Compaction {
        /// What is wrong with the inputs.
        reason: String,
    },
    /// Caller misuse of the encoder or decoder (buffer size, calls out of order).
    #[error("usage: {0}")]
    Usage(&'static str),
    /// Text that is not a valid TXID, checksum or position.
    #[error("invalid {what}: {text:?}")]
    InvalidText {
        /// What was parsed.
        what: &'static str,
        /// The text.
        text: String,
    },
    /// An error about a named file.
    #[error("{}: {source}", path.display())]
    File {
        /// The file.
        path: PathBuf,
        /// What is wrong with it.
        source: Box<LtxError>,
    },
}

impl LtxError {
    /// Wraps the error with the path of the file it concerns.
    pub fn with_path(self, path: impl AsRef<Path>) -> LtxError {
        LtxError::File {
            path: path.as_ref().to_path_buf(),
            source: Box::new(self),
        }
    }

    /// The error without any [`LtxError::File`] wrapping.
    pub fn root(&self) -> &LtxError {
        match self {
            LtxError::File { source, .. } => source.root(),
            e => e,
        }
    }
}

/// Adds a path to errors: `decoder.finish().in_file(&path)?`.
pub trait ResultExt<T> {
    /// Wraps the error with [`LtxError::with_path`].
    fn in_file(self, path: impl AsRef<Path>) -> Result<T, LtxError>;
}

impl<T> ResultExt<T> for Result<T, LtxError> {
    fn in_file(self, path: impl AsRef<Path>) -> Result<T, LtxError> {
        self.map_err(|e| e.with_path(path))
    }
}
