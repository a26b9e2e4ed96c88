//! Reading SQLite WAL files: the header, frames, and the cumulative checksum that tells
//! valid frames from stale ones.
//!
//! Only what transaction capture needs: find the committed transactions that follow a
//! known position (offset + running checksum), stopping at the first frame whose salts or
//! checksum do not match, and ignoring trailing frames without a commit frame.

use std::collections::BTreeMap;
use std::fs::File;
use std::io;
use std::os::unix::fs::FileExt;

/// Size of the WAL header.
pub const HEADER_SIZE: u64 = 32;
/// Size of a frame header.
pub const FRAME_HEADER_SIZE: u64 = 24;

const MAGIC_LE: u32 = 0x377f_0682;
const MAGIC_BE: u32 = 0x377f_0683;
const FORMAT_VERSION: u32 = 3_007_000;

/// The running WAL checksum: two wrapping 32-bit sums.
pub type WalChecksum = (u32, u32);

/// A parsed and checksum-verified WAL header.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct WalHeader {
    /// Checksums run over big-endian words (magic 0x377f0683) rather than little-endian.
    pub big_endian: bool,
    /// Page size of every frame.
    pub page_size: u32,
    /// Checkpoint sequence number.
    pub checkpoint_seq: u32,
    /// Salt-1: incremented on every WAL restart.
    pub salt1: u32,
    /// Salt-2: random on every WAL restart.
    pub salt2: u32,
    /// Checksum over the first 24 header bytes; the seed of the frame checksums.
    pub checksum: WalChecksum,
}

impl WalHeader {
    /// Parses a 32-byte header. `None` when the magic, version, page size or header
    /// checksum is wrong: such a WAL holds no valid frame.
    pub fn parse(b: &[u8]) -> Option<WalHeader> {
        if b.len() < HEADER_SIZE as usize {
            return None;
        }
        let magic = be32(b, 0);
        let big_endian = match magic {
            MAGIC_LE => false,
            MAGIC_BE => true,
            _ => return None,
        };
        if be32(b, 4) != FORMAT_VERSION {
            return None;
        }
        let page_size = match be32(b, 8) {
            1 => 65536,
            n => n,
        };
        if !(512..=65536).contains(&page_size) || !page_size.is_power_of_two() {
            return None;
        }
        let checksum = (be32(b, 24), be32(b, 28));
        if wal_checksum(big_endian, &b[..24], (0, 0)) != checksum {
            return None;
        }
        Some(WalHeader {
            big_endian,
            page_size,
            checkpoint_seq: be32(b, 12),
            salt1: be32(b, 16),
            salt2: be32(b, 20),
            checksum,
        })
    }

    /// Size of one frame (header + page).
    pub fn frame_size(&self) -> u64 {
        FRAME_HEADER_SIZE + u64::from(self.page_size)
    }
}

/// SQLite's WAL checksum over `data` (a multiple of 8 bytes), continuing from `seed`.
pub fn wal_checksum(big_endian: bool, data: &[u8], seed: WalChecksum) -> WalChecksum {
    debug_assert_eq!(data.len() % 8, 0);
    let (mut s0, mut s1) = seed;
    for w in data.chunks_exact(8) {
        let (x0, x1) = if big_endian {
            (be32(w, 0), be32(w, 4))
        } else {
            (
                u32::from_le_bytes([w[0], w[1], w[2], w[3]]),
                u32::from_le_bytes([w[4], w[5], w[6], w[7]]),
            )
        };
        s0 = s0.wrapping_add(x0).wrapping_add(s1);
        s1 = s1.wrapping_add(x1).wrapping_add(s0);
    }
    (s0, s1)
}

/// One committed transaction found in the WAL.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct WalTxn {
    /// Offset of its first frame.
    pub offset: u64,
    /// Offset just past its commit frame.
    pub end: u64,
    /// Database size in pages after the transaction (the commit frame's field).
    pub commit: u32,
    /// Newest copy of each page written by the transaction: page number -> offset of
    /// the page data (not the frame header) in the WAL.
    pub pages: BTreeMap<u32, u64>,
    /// Running checksum after the commit frame: the seed for the next transaction.
    pub checksum_after: WalChecksum,
}

impl WalTxn {
    /// Size of the transaction's frames in bytes.
    pub fn size(&self) -> u64 {
        self.end - self.offset
    }
}

/// Scans the WAL from `offset` (a frame boundary whose preceding running checksum is
/// `seed`) and returns every committed transaction, in order. Stops at end of file, at
/// the first frame whose salts differ from the header's, or whose checksum is wrong;
/// frames after the last commit frame are not returned (not committed).
pub fn scan(
    file: &File,
    header: &WalHeader,
    offset: u64,
    seed: WalChecksum,
) -> io::Result<Vec<WalTxn>> {
    let frame_size = header.frame_size();
    let mut buf = vec![0u8; frame_size as usize];
    let mut txns = Vec::new();
    let mut pos = offset;
    let mut cksum = seed;
    let mut txn_start = offset;
    let mut pages: BTreeMap<u32, u64> = BTreeMap::new();
    // Read until a frame is cut short by the end of the file, without a stat: on Linux
    // 6.13+ a stat marks the WAL's times as queried, so its next write takes a
    // fine-grained time, which moves every file's next time forward: the LTX log's
    // mtime then changed at every commit and each commit's fdatasync wrote its inode too.
    while super::db::read_up_to(file, &mut buf, pos)? == buf.len() {
        let pgno = be32(&buf, 0);
        let commit = be32(&buf, 4);
        if pgno == 0 || be32(&buf, 8) != header.salt1 || be32(&buf, 12) != header.salt2 {
            break;
        }
        let c = wal_checksum(header.big_endian, &buf[..8], cksum);
        let c = wal_checksum(header.big_endian, &buf[FRAME_HEADER_SIZE as usize..], c);
        if c != (be32(&buf, 16), be32(&buf, 20)) {
            break;
        }
        cksum = c;
        pages.insert(pgno, pos + FRAME_HEADER_SIZE);
        pos += frame_size;
        if commit != 0 {
            txns.push(WalTxn {
                offset: txn_start,
                end: pos,
                commit,
                pages: std::mem::take(&mut pages),
                checksum_after: cksum,
            });
            txn_start = pos;
        }
    }
    Ok(txns)
}

/// Reads and parses the header of the WAL `file`; `None` if it is short or invalid.
pub fn read_header(file: &File) -> io::Result<Option<WalHeader>> {
    let mut b = [0u8; HEADER_SIZE as usize];
    match file.read_exact_at(&mut b, 0) {
        Ok(()) => Ok(WalHeader::parse(&b)),
        Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => Ok(None),
        Err(e) => Err(e),
    }
}

fn be32(b: &[u8], off: usize) -> u32 {
    u32::from_be_bytes([b[off], b[off + 1], b[off + 2], b[off + 3]])
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::path::Path;

    fn fixture(name: &str) -> File {
        // `../shared/testdata` from the repository root; a worktree nested deeper finds
        // it in the nearest ancestor that has it.
        let root = Path::new(env!("CARGO_MANIFEST_DIR"));
        let testdata = root
            .ancestors()
            .skip(1)
            .map(|d| d.join("shared/testdata"))
            .find(|p| p.is_dir())
            .unwrap_or_else(|| root.join("../shared/testdata"));
        let p = testdata.join("litefs-wal-reader").join(name).join("wal");
        File::open(p).unwrap()
    }

    fn scan_fixture(name: &str) -> Vec<WalTxn> {
        let f = fixture(name);
        let h = read_header(&f).unwrap().unwrap();
        assert_eq!(h.page_size, 4096);
        scan(&f, &h, HEADER_SIZE, h.checksum).unwrap()
    }

    fn frames(txns: &[WalTxn]) -> u64 {
        txns.iter()
            .map(|t| t.size() / (FRAME_HEADER_SIZE + 4096))
            .sum()
    }

    #[test]
    fn ok_fixture_yields_both_transactions() {
        // Frames: page 1 (no commit), page 2 (commit 2), page 2 again (commit 2).
        let txns = scan_fixture("ok");
        assert_eq!(frames(&txns), 3);
        assert_eq!(txns.len(), 2);
        assert_eq!(txns[0].offset, HEADER_SIZE);
        assert_eq!(txns[0].commit, 2);
        assert_eq!(
            txns[0].pages.keys().copied().collect::<Vec<_>>(),
            vec![1, 2]
        );
        assert_eq!(txns[1].offset, txns[0].end);
        assert_eq!(txns[1].pages.keys().copied().collect::<Vec<_>>(), vec![2]);
        assert_eq!(txns[1].end, 12392);
    }

    #[test]
    fn checksum_mismatch_stops_at_the_bad_frame() {
        // The second frame (the first transaction's commit frame) has a wrong checksum,
        // so no transaction is committed and the third frame is never reached.
        assert!(scan_fixture("frame-checksum-mismatch").is_empty());
    }

    #[test]
    fn salt_mismatch_stops_at_the_bad_frame() {
        assert!(scan_fixture("salt-mismatch").is_empty());
    }

    #[test]
    fn scan_resumes_from_a_committed_position() {
        let f = fixture("ok");
        let h = read_header(&f).unwrap().unwrap();
        let all = scan(&f, &h, HEADER_SIZE, h.checksum).unwrap();
        let rest = scan(&f, &h, all[0].end, all[0].checksum_after).unwrap();
        assert_eq!(rest, all[1..]);
        // A wrong seed makes the next frame invalid.
        assert!(scan(&f, &h, all[0].end, (1, 2)).unwrap().is_empty());
    }

    #[test]
    fn header_with_bad_checksum_is_rejected() {
        let f = fixture("ok");
        let mut b = [0u8; 32];
        f.read_exact_at(&mut b, 0).unwrap();
        assert!(WalHeader::parse(&b).is_some());
        b[17] ^= 1;
        assert!(WalHeader::parse(&b).is_none());
    }
}
