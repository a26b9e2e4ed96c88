//! The LTX encoder. Always writes format 3 in its current form: 6-byte page
//! headers with flag 0x0001, a 4-byte size, one LZ4 block per page, then the
//! page index and the trailer.

use std::io::Write;

use crc_fast::Digest;

use super::checksum::crc64_digest;
use super::{
    CHECKSUM_FLAG, Checksum, Format, HEADER_SIZE, Header, LtxError, RollingChecksum, Trailer,
    lock_pgno, page_checksum, validate_post_apply,
};

/// Page header flag of the current format 3: a 4-byte size and an LZ4 block follow.
pub(crate) const PAGE_FLAG_SIZE: u16 = 0x0001;
/// Page header plus size field of a current format-3 frame.
pub(crate) const FRAME_PREFIX: usize = 10;

/// Appends `v` as an unsigned LEB128 varint (Go's `binary.PutUvarint`).
pub(crate) fn put_uvarint(out: &mut Vec<u8>, mut v: u64) {
    while v >= 0x80 {
        out.push((v as u8) | 0x80);
        v >>= 7;
    }
    out.push(v as u8);
}

/// The page that must follow `prev` in a snapshot (the lock page is skipped).
/// The page-order rules shared by the encoder and the decoder: strictly ascending,
/// within `commit`, never the lock page, and contiguous in a snapshot.
pub(crate) fn check_page_order(
    h: &Header,
    lock: u32,
    prev: u32,
    pgno: u32,
) -> Result<(), LtxError> {
    if pgno <= prev {
        return Err(LtxError::PageOutOfOrder { pgno, prev });
    }
    if pgno > h.commit {
        return Err(LtxError::PageBeyondCommit {
            pgno,
            commit: h.commit,
        });
    }
    if pgno == lock {
        return Err(LtxError::LockPage { pgno });
    }
    if h.is_snapshot() {
        let expected = next_snapshot_pgno(prev, lock);
        if pgno != expected {
            return Err(LtxError::MissingPage {
                expected,
                found: pgno,
            });
        }
    }
    Ok(())
}

pub(crate) fn next_snapshot_pgno(prev: u32, lock: u32) -> u32 {
    let next = prev.saturating_add(1);
    if next == lock {
        next.saturating_add(1)
    } else {
        next
    }
}

/// Writes one LTX file. Pages must come in ascending order; [`Encoder::finish`]
/// writes the index and trailer. After an error the encoder must be dropped.
pub struct Encoder<W: Write> {
    w: W,
    header: Header,
    hash: Digest,
    offset: u64,
    prev_pgno: u32,
    lock: u32,
    index: Vec<u8>,
    frame: Vec<u8>,
    /// Database checksum of a snapshot's pages, to refuse a wrong post-apply checksum.
    snapshot_sum: Option<RollingChecksum>,
}

impl<W: Write> Encoder<W> {
    /// Validates `header` (format 3 rules) and writes it.
    ///
    /// # Errors
    /// [`LtxError::InvalidHeader`], or an I/O error from the writer.
    pub fn new(mut w: W, header: &Header) -> Result<Self, LtxError> {
        header.validate(Format::V3)?;
        let bytes = header.to_bytes();
        w.write_all(&bytes)?;
        let mut hash = crc64_digest();
        hash.update(&bytes);
        let ps = header.page_size as usize;
        Ok(Encoder {
            w,
            header: header.clone(),
            hash,
            offset: HEADER_SIZE as u64,
            prev_pgno: 0,
            lock: lock_pgno(header.page_size),
            index: Vec::new(),
            frame: vec![0u8; FRAME_PREFIX + lz4_flex::block::get_maximum_output_size(ps)],
            snapshot_sum: (header.is_snapshot() && !header.no_checksum())
                .then(RollingChecksum::new),
        })
    }

    /// The header being written.
    pub fn header(&self) -> &Header {
        &self.header
    }

    /// Compresses and writes one page.
    ///
    /// # Errors
    /// The page size is wrong, pgno is 0, above commit, the lock page, not above
    /// the previous page, or (snapshots) not the next page; or an I/O error.
    pub fn encode_page(&mut self, pgno: u32, data: &[u8]) -> Result<(), LtxError> {
        let h = &self.header;
        if data.len() != h.page_size as usize {
            return Err(LtxError::PageSize {
                pgno,
                what: "page data",
                expected: h.page_size,
                got: data.len() as u64,
            });
        }
        if pgno == 0 {
            return Err(LtxError::InvalidPageHeader {
                pgno,
                flags: PAGE_FLAG_SIZE,
                offset: self.offset,
            });
        }
        check_page_order(h, self.lock, self.prev_pgno, pgno)?;

        let size =
            lz4_flex::block::compress_into(data, &mut self.frame[FRAME_PREFIX..]).map_err(|e| {
                LtxError::Decompress {
                    pgno,
                    reason: format!("compression failed: {e}"),
                }
            })?;
        self.frame[0..4].copy_from_slice(&pgno.to_be_bytes());
        self.frame[4..6].copy_from_slice(&PAGE_FLAG_SIZE.to_be_bytes());
        self.frame[6..10].copy_from_slice(&(size as u32).to_be_bytes());
        let len = FRAME_PREFIX + size;
        self.w.write_all(&self.frame[..len])?;

        self.hash.update(&self.frame[..FRAME_PREFIX]);
        self.hash.update(data);
        if let Some(sum) = &mut self.snapshot_sum {
            sum.toggle(page_checksum(pgno, data));
        }
        put_uvarint(&mut self.index, u64::from(pgno));
        put_uvarint(&mut self.index, self.offset);
        put_uvarint(&mut self.index, len as u64);
        self.offset += len as u64;
        self.prev_pgno = pgno;
        Ok(())
    }

    /// Writes the terminator, page index and trailer, flushes, and returns the
    /// writer with the trailer written.
    ///
    /// # Errors
    /// A snapshot that lacks pages; a post-apply checksum that breaks the
    /// reference rules (§8) or, for a snapshot, differs from its pages; I/O.
    pub fn finish(mut self, post_apply_checksum: Checksum) -> Result<(W, Trailer), LtxError> {
        let h = &self.header;
        if h.is_snapshot() {
            let expected = next_snapshot_pgno(self.prev_pgno, self.lock);
            if expected <= h.commit {
                return Err(LtxError::MissingPage { expected, found: 0 });
            }
        }
        validate_post_apply(h, post_apply_checksum)?;
        if let Some(sum) = self.snapshot_sum
            && sum.value() != post_apply_checksum
        {
            return Err(LtxError::ChecksumMismatch {
                what: "post-apply (snapshot pages)",
                expected: post_apply_checksum,
                got: sum.value(),
            });
        }

        let terminator = [0u8; 6];
        self.index.push(0);
        let index_len = (self.index.len() as u64).to_be_bytes();
        let post = post_apply_checksum.0.to_be_bytes();
        for part in [&terminator[..], &self.index, &index_len, &post] {
            self.w.write_all(part)?;
            self.hash.update(part);
        }
        let file_checksum = Checksum(CHECKSUM_FLAG | self.hash.finalize());
        self.w.write_all(&file_checksum.0.to_be_bytes())?;
        self.w.flush()?;
        Ok((
            self.w,
            Trailer {
                post_apply_checksum,
                file_checksum,
            },
        ))
    }
}
