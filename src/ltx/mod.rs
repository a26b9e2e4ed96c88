//! The LTX file format: checksums, encoder, streaming decoder (formats 1 and 3),
//! compaction, and applying a file to a database file.
//!
//! The byte format is described in `../shared/reference/ltx-format.md`; this module
//! implements it on `Read`/`Write` without knowing about nodes or networks.
//! Every integer on disk is big-endian.

mod apply;
mod checksum;
mod compactor;
mod decoder;
mod encoder;
mod error;

use std::fmt;
use std::str::FromStr;

pub use apply::{ApplyCheck, apply_file, apply_file_with, checksum_after, database_page_size};
pub use checksum::{
    RollingChecksum, crc64, database_checksum, lock_pgno, page_checksum, page_checksums,
};
pub use compactor::compact;
pub use decoder::{Decoder, FrameInfo, verify, verify_path};
pub use encoder::Encoder;
pub use error::{LtxError, ResultExt};

/// The four magic bytes every LTX file starts with.
pub const MAGIC: [u8; 4] = *b"LTX1";
/// Size of the fixed header at offset 0.
pub const HEADER_SIZE: usize = 100;
/// Size of the trailer at the end of the file.
pub const TRAILER_SIZE: usize = 16;
/// Format 1 only: the page block is one LZ4 frame stream.
pub const HEADER_FLAG_COMPRESS_LZ4: u32 = 0x1;
/// No database checksums are tracked (pre- and post-apply checksums are 0).
pub const HEADER_FLAG_NO_CHECKSUM: u32 = 0x2;
/// Bit 63, forced on in every valid page, database and file checksum.
pub const CHECKSUM_FLAG: u64 = 1 << 63;
/// Smallest valid page size.
pub const MIN_PAGE_SIZE: u32 = 512;
/// Largest valid page size.
pub const MAX_PAGE_SIZE: u32 = 65536;

/// A transaction id. Text form: 16 lowercase hex digits.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct TxId(pub u64);

/// A page, database or file checksum. Text form: 16 lowercase hex digits.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct Checksum(pub u64);

/// A database position: the last applied TXID and the database checksum after it.
/// Text form `TXID/CHECKSUM` (33 characters).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct Pos {
    /// The last TXID applied.
    pub txid: TxId,
    /// The database checksum after that TXID.
    pub post_apply_checksum: Checksum,
}

fn parse_hex16(s: &str, what: &'static str) -> Result<u64, LtxError> {
    let invalid = || LtxError::InvalidText {
        what,
        text: s.to_owned(),
    };
    if s.len() != 16 || !s.bytes().all(|b| b.is_ascii_hexdigit()) {
        return Err(invalid());
    }
    u64::from_str_radix(s, 16).map_err(|_| invalid())
}

impl fmt::Display for TxId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:016x}", self.0)
    }
}

impl FromStr for TxId {
    type Err = LtxError;
    fn from_str(s: &str) -> Result<Self, LtxError> {
        parse_hex16(s, "TXID").map(TxId)
    }
}

impl fmt::Display for Checksum {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:016x}", self.0)
    }
}

impl FromStr for Checksum {
    type Err = LtxError;
    fn from_str(s: &str) -> Result<Self, LtxError> {
        parse_hex16(s, "checksum").map(Checksum)
    }
}

impl fmt::Display for Pos {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.txid, self.post_apply_checksum)
    }
}

impl FromStr for Pos {
    type Err = LtxError;
    fn from_str(s: &str) -> Result<Self, LtxError> {
        let invalid = || LtxError::InvalidText {
            what: "position",
            text: s.to_owned(),
        };
        let (txid, checksum) = s.split_once('/').ok_or_else(invalid)?;
        Ok(Pos {
            txid: txid.parse().map_err(|_| invalid())?,
            post_apply_checksum: checksum.parse().map_err(|_| invalid())?,
        })
    }
}

/// The file name of an LTX file covering `min..=max`: `%016x-%016x.ltx`.
pub fn format_filename(min: TxId, max: TxId) -> String {
    format!("{min}-{max}.ltx")
}

/// Parses a name made by [`format_filename`]; lowercase hex only, as upstream.
pub fn parse_filename(name: &str) -> Option<(TxId, TxId)> {
    let stem = name.strip_suffix(".ltx")?;
    let (min, max) = stem.split_once('-')?;
    let lower = |s: &str| {
        s.bytes()
            .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
    };
    if !lower(min) || !lower(max) {
        return None;
    }
    Some((min.parse().ok()?, max.parse().ok()?))
}

/// The on-disk layout of the page block. No version is stored in the file; the
/// decoder detects it (see [`Decoder::new`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Format {
    /// LiteFS 0.5 (ltx v0.3): 4-byte page headers, raw pages, optionally one LZ4
    /// frame over the page block (header flag 0x1), no page index.
    V1,
    /// Current ltx (v0.5): 6-byte page headers, one LZ4 block (or, in early
    /// files, one LZ4 frame) per page, then a page index.
    V3,
}

impl Format {
    /// Length of a page header (and of the all-zero terminator).
    pub fn page_header_size(self) -> usize {
        match self {
            Format::V1 => 4,
            Format::V3 => 6,
        }
    }
}

/// The 100-byte LTX header.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Header {
    /// Header flags ([`HEADER_FLAG_NO_CHECKSUM`], format 1: [`HEADER_FLAG_COMPRESS_LZ4`]).
    pub flags: u32,
    /// Database page size in bytes.
    pub page_size: u32,
    /// Database size in pages after the file is applied.
    pub commit: u32,
    /// First transaction covered.
    pub min_txid: TxId,
    /// Last transaction covered.
    pub max_txid: TxId,
    /// Milliseconds since the Unix epoch; never validated.
    pub timestamp: i64,
    /// Database checksum before the file is applied (0 for snapshots and no-checksum files).
    pub pre_apply_checksum: Checksum,
    /// Offset in the source WAL; 0 for a rollback journal.
    pub wal_offset: i64,
    /// Length of the WAL segment; 0 for a rollback journal.
    pub wal_size: i64,
    /// WAL header salt 1.
    pub wal_salt1: u32,
    /// WAL header salt 2.
    pub wal_salt2: u32,
    /// Node that wrote the file; 0 if unset.
    pub node_id: u64,
}

fn be_u32(b: &[u8], off: usize) -> u32 {
    u32::from_be_bytes([b[off], b[off + 1], b[off + 2], b[off + 3]])
}

fn be_u64(b: &[u8], off: usize) -> u64 {
    let mut a = [0u8; 8];
    a.copy_from_slice(&b[off..off + 8]);
    u64::from_be_bytes(a)
}

/// Whether `page_size` is a power of two in 512..=65536.
pub fn is_valid_page_size(page_size: u32) -> bool {
    (MIN_PAGE_SIZE..=MAX_PAGE_SIZE).contains(&page_size) && page_size.is_power_of_two()
}

impl Header {
    /// The on-disk bytes (reserved bytes zero).
    pub fn to_bytes(&self) -> [u8; HEADER_SIZE] {
        let mut b = [0u8; HEADER_SIZE];
        b[0..4].copy_from_slice(&MAGIC);
        b[4..8].copy_from_slice(&self.flags.to_be_bytes());
        b[8..12].copy_from_slice(&self.page_size.to_be_bytes());
        b[12..16].copy_from_slice(&self.commit.to_be_bytes());
        b[16..24].copy_from_slice(&self.min_txid.0.to_be_bytes());
        b[24..32].copy_from_slice(&self.max_txid.0.to_be_bytes());
        b[32..40].copy_from_slice(&self.timestamp.to_be_bytes());
        b[40..48].copy_from_slice(&self.pre_apply_checksum.0.to_be_bytes());
        b[48..56].copy_from_slice(&self.wal_offset.to_be_bytes());
        b[56..64].copy_from_slice(&self.wal_size.to_be_bytes());
        b[64..68].copy_from_slice(&self.wal_salt1.to_be_bytes());
        b[68..72].copy_from_slice(&self.wal_salt2.to_be_bytes());
        b[72..80].copy_from_slice(&self.node_id.to_be_bytes());
        b
    }

    /// Parses the header bytes. Checks only the magic; see [`Header::validate`].
    ///
    /// # Errors
    /// [`LtxError::InvalidMagic`] if the file does not start with `LTX1`.
    pub fn from_bytes(b: &[u8; HEADER_SIZE]) -> Result<Header, LtxError> {
        if b[0..4] != MAGIC {
            return Err(LtxError::InvalidMagic {
                got: [b[0], b[1], b[2], b[3]],
            });
        }
        Ok(Header {
            flags: be_u32(b, 4),
            page_size: be_u32(b, 8),
            commit: be_u32(b, 12),
            min_txid: TxId(be_u64(b, 16)),
            max_txid: TxId(be_u64(b, 24)),
            timestamp: be_u64(b, 32) as i64,
            pre_apply_checksum: Checksum(be_u64(b, 40)),
            wal_offset: be_u64(b, 48) as i64,
            wal_size: be_u64(b, 56) as i64,
            wal_salt1: be_u32(b, 64),
            wal_salt2: be_u32(b, 68),
            node_id: be_u64(b, 72),
        })
    }

    /// Checks the header rules of the reference (§8) for `format`.
    ///
    /// # Errors
    /// [`LtxError::InvalidHeader`] naming the field and the rule it breaks.
    pub fn validate(&self, format: Format) -> Result<(), LtxError> {
        let bad = |field: &'static str, value: u64, rule: &'static str| {
            Err(LtxError::InvalidHeader { field, value, rule })
        };
        let allowed = match format {
            Format::V1 => HEADER_FLAG_COMPRESS_LZ4 | HEADER_FLAG_NO_CHECKSUM,
            Format::V3 => HEADER_FLAG_NO_CHECKSUM,
        };
        if self.flags & !allowed != 0 {
            return bad("flags", self.flags.into(), "unknown flag set");
        }
        if !is_valid_page_size(self.page_size) {
            return bad(
                "page_size",
                self.page_size.into(),
                "must be a power of two in 512..=65536",
            );
        }
        if self.min_txid.0 == 0 {
            return bad("min_txid", 0, "must not be zero");
        }
        if self.max_txid.0 == 0 {
            return bad("max_txid", 0, "must not be zero");
        }
        if self.min_txid > self.max_txid {
            return bad("min_txid", self.min_txid.0, "must not exceed max_txid");
        }
        if self.wal_offset < 0 {
            return bad("wal_offset", self.wal_offset as u64, "must not be negative");
        }
        if self.wal_size < 0 {
            return bad("wal_size", self.wal_size as u64, "must not be negative");
        }
        if (self.wal_salt1 != 0 || self.wal_salt2 != 0) && self.wal_offset == 0 {
            return bad("wal_offset", 0, "must be set when a WAL salt is set");
        }
        if self.wal_offset == 0 && self.wal_size != 0 {
            return bad(
                "wal_size",
                self.wal_size as u64,
                "must be zero when wal_offset is zero",
            );
        }
        let pre = self.pre_apply_checksum.0;
        if self.is_snapshot() {
            if pre != 0 {
                return bad("pre_apply_checksum", pre, "must be zero in a snapshot");
            }
        } else if self.no_checksum() {
            if pre != 0 {
                return bad(
                    "pre_apply_checksum",
                    pre,
                    "must be zero when the no-checksum flag is set",
                );
            }
        } else if pre & CHECKSUM_FLAG == 0 {
            return bad(
                "pre_apply_checksum",
                pre,
                "must be non-zero with bit 63 set",
            );
        }
        Ok(())
    }

    /// A snapshot (MinTXID 1) holds every page of the database.
    pub fn is_snapshot(&self) -> bool {
        self.min_txid.0 == 1
    }

    /// Whether the file tracks no database checksums (flag 0x2).
    pub fn no_checksum(&self) -> bool {
        self.flags & HEADER_FLAG_NO_CHECKSUM != 0
    }

    /// The position the database must be at before this file applies.
    pub fn pre_apply_pos(&self) -> Pos {
        Pos {
            txid: TxId(self.min_txid.0.saturating_sub(1)),
            post_apply_checksum: self.pre_apply_checksum,
        }
    }

    /// The lock page for this header's page size.
    pub fn lock_pgno(&self) -> u32 {
        lock_pgno(self.page_size)
    }
}

/// The 16-byte trailer.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Trailer {
    /// Database checksum after applying the file (0 in no-checksum files).
    pub post_apply_checksum: Checksum,
    /// Checksum of the logical byte stream of the file (reference §6).
    pub file_checksum: Checksum,
}

impl Trailer {
    /// The on-disk bytes.
    pub fn to_bytes(&self) -> [u8; TRAILER_SIZE] {
        let mut b = [0u8; TRAILER_SIZE];
        b[0..8].copy_from_slice(&self.post_apply_checksum.0.to_be_bytes());
        b[8..16].copy_from_slice(&self.file_checksum.0.to_be_bytes());
        b
    }

    /// Parses the trailer bytes (no validation).
    pub fn from_bytes(b: &[u8; TRAILER_SIZE]) -> Trailer {
        Trailer {
            post_apply_checksum: Checksum(be_u64(b, 0)),
            file_checksum: Checksum(be_u64(b, 8)),
        }
    }
}

/// Checks the post-apply checksum rules of the reference §8 for `header`.
pub(crate) fn validate_post_apply(header: &Header, post: Checksum) -> Result<(), LtxError> {
    let bad = |rule: &'static str| {
        Err(LtxError::InvalidTrailer {
            field: "post_apply_checksum",
            value: post.0,
            rule,
        })
    };
    if header.no_checksum() {
        if post.0 != 0 {
            return bad("must be zero when the no-checksum flag is set");
        }
    } else if post.0 & CHECKSUM_FLAG == 0 {
        return bad("must be non-zero with bit 63 set");
    } else if header.commit == 0 && post.0 != CHECKSUM_FLAG {
        return bad("must be 8000000000000000 (empty database) when commit is 0");
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn text_forms() {
        let pos = Pos {
            txid: TxId(1000),
            post_apply_checksum: Checksum(2000),
        };
        assert_eq!(pos.to_string(), "00000000000003e8/00000000000007d0");
        assert_eq!(
            "00000000000003e8/00000000000007d0".parse::<Pos>().unwrap(),
            pos
        );
        assert!("00000000000003e8/00000000000007d".parse::<Pos>().is_err());
        assert!("3e8".parse::<TxId>().is_err());
        assert_eq!(
            format_filename(TxId(1), TxId(1000)),
            "0000000000000001-00000000000003e8.ltx"
        );
        assert_eq!(
            parse_filename("0000000000000001-00000000000003e8.ltx"),
            Some((TxId(1), TxId(1000)))
        );
        assert_eq!(
            parse_filename("0000000000000001-00000000000003E8.ltx"),
            None
        );
        assert_eq!(parse_filename("0000000000000001-00000000000003e8.lt"), None);
    }

    fn valid() -> Header {
        Header {
            flags: 0,
            page_size: 4096,
            commit: 3,
            min_txid: TxId(2),
            max_txid: TxId(3),
            pre_apply_checksum: Checksum(CHECKSUM_FLAG | 5),
            ..Header::default()
        }
    }

    #[test]
    fn header_round_trip_and_validation() {
        let h = Header {
            wal_offset: 32,
            wal_size: 4152,
            wal_salt1: 7,
            wal_salt2: 9,
            node_id: 11,
            timestamp: -5,
            ..valid()
        };
        h.validate(Format::V3).unwrap();
        assert_eq!(Header::from_bytes(&h.to_bytes()).unwrap(), h);

        let cases: Vec<(Header, &str)> = vec![
            (
                Header {
                    flags: 1,
                    ..valid()
                },
                "flags",
            ),
            (
                Header {
                    page_size: 1000,
                    ..valid()
                },
                "page_size",
            ),
            (
                Header {
                    page_size: 256,
                    ..valid()
                },
                "page_size",
            ),
            (
                Header {
                    min_txid: TxId(0),
                    ..valid()
                },
                "min_txid",
            ),
            (
                Header {
                    max_txid: TxId(1),
                    ..valid()
                },
                "min_txid",
            ),
            (
                Header {
                    wal_offset: -1,
                    ..valid()
                },
                "wal_offset",
            ),
            (
                Header {
                    wal_salt1: 1,
                    ..valid()
                },
                "wal_offset",
            ),
            (
                Header {
                    wal_size: 1,
                    ..valid()
                },
                "wal_size",
            ),
            (
                Header {
                    pre_apply_checksum: Checksum(5),
                    ..valid()
                },
                "pre_apply_checksum",
            ),
            (
                Header {
                    min_txid: TxId(1),
                    ..valid()
                },
                "pre_apply_checksum",
            ),
            (
                Header {
                    flags: 2,
                    ..valid()
                },
                "pre_apply_checksum",
            ),
        ];
        for (h, field) in cases {
            match h.validate(Format::V3) {
                Err(LtxError::InvalidHeader { field: f, .. }) => assert_eq!(f, field, "{h:?}"),
                other => panic!("{h:?}: {other:?}"),
            }
        }
        // Format 1 allows the LZ4 flag.
        Header {
            flags: 1,
            ..valid()
        }
        .validate(Format::V1)
        .unwrap();
        let mut bytes = valid().to_bytes();
        bytes[0] = b'X';
        assert!(matches!(
            Header::from_bytes(&bytes),
            Err(LtxError::InvalidMagic { .. })
        ));
    }
}
