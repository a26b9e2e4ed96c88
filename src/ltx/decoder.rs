//! The streaming LTX decoder: formats 1 and 3, constant memory in the number of
//! pages, every rule of the reference (§8) plus page order, pages <= commit, the
//! lock page, snapshot completeness, exact decompressed size, page index
//! consistency and trailing data.

use std::fs::File;
use std::io::{self, BufReader, Read};
use std::path::Path;

use crc_fast::Digest;
use lz4_flex::frame::FrameDecoder;

use super::checksum::{crc64_digest, read_full};
use super::encoder::{PAGE_FLAG_SIZE, check_page_order, next_snapshot_pgno};
use super::{
    CHECKSUM_FLAG, Checksum, Format, HEADER_FLAG_COMPRESS_LZ4, HEADER_SIZE, Header, LtxError,
    ResultExt, RollingChecksum, TRAILER_SIZE, Trailer, lock_pgno, page_checksum,
    validate_post_apply,
};

/// Magic number of a standard LZ4 frame, as stored (little-endian).
const LZ4_FRAME_MAGIC: [u8; 4] = [0x04, 0x22, 0x4d, 0x18];
/// Bytes peeked after the header to tell format 1 from format 3.
const PEEK: usize = 15;

/// A reader that counts bytes and can replay a few peeked bytes.
struct Src<R> {
    inner: R,
    pending: [u8; PEEK],
    pending_start: usize,
    pending_end: usize,
    pos: u64,
}

impl<R: Read> Read for Src<R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let n = if self.pending_start < self.pending_end {
            let n = buf.len().min(self.pending_end - self.pending_start);
            buf[..n].copy_from_slice(&self.pending[self.pending_start..self.pending_start + n]);
            self.pending_start += n;
            n
        } else {
            self.inner.read(buf)?
        };
        self.pos += n as u64;
        Ok(n)
    }
}

/// Where page-block bytes come from: the file itself, or (format 1 with flag
/// 0x1) one LZ4 frame stream over the page block.
enum Body<R: Read> {
    Raw(Src<R>),
    Lz4(Box<FrameDecoder<Src<R>>>),
    /// Only while switching between the two.
    Switching,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum State {
    Pages,
    Index,
    Done,
}

/// Where a decoded page was found.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct FrameInfo {
    /// Page number.
    pub pgno: u32,
    /// Byte offset of the page header: in the file for format 3 and uncompressed
    /// format 1; in the decompressed page block stream (from 100) for LZ4 format 1.
    pub offset: u64,
    /// Frame length: page header, size field and payload as stored.
    pub len: u64,
}

/// Streaming decoder of one LTX file.
///
/// Read pages with [`Decoder::next_page`] until it returns `None`, then call
/// [`Decoder::finish`], which checks the page index, the trailer and the file
/// checksum. A page returned by `next_page` has passed every per-page check, but
/// the file as a whole is only verified once `finish` succeeds: never apply pages
/// before that (see [`crate::ltx::apply_file`], which decodes twice).
///
/// Readers are read in small pieces; wrap files in a `BufReader`.
pub struct Decoder<R: Read> {
    body: Body<R>,
    header: Header,
    format: Format,
    state: State,
    hash: Digest,
    lock: u32,
    prev_pgno: u32,
    /// Logical offset in the page block stream (format 1).
    logical: u64,
    snapshot_sum: Option<RollingChecksum>,
    scratch: Vec<u8>,
    last_frame: Option<FrameInfo>,
    /// Number of frames and a digest of their (pgno, offset, len), compared with the
    /// index so that it is checked without keeping an entry per page.
    frames: u64,
    frames_digest: Digest,
    terminator_offset: u64,
}

fn be32(b: &[u8]) -> u32 {
    u32::from_be_bytes([b[0], b[1], b[2], b[3]])
}

/// Decides the format from the header and the bytes after it; the rule is
/// documented on [`Decoder::new`].
fn detect(header: &Header, peek: &[u8]) -> Format {
    if header.flags & HEADER_FLAG_COMPRESS_LZ4 != 0 {
        return Format::V1;
    }
    if peek.len() < 6 {
        // Too short for either format; the decoder reports the truncation.
        return Format::V3;
    }
    let pgno = be32(&peek[0..4]);
    let flags = u16::from_be_bytes([peek[4], peek[5]]);
    if pgno == 0 {
        let empty_v3 =
            flags == 0 && peek.len() >= 15 && peek[6] == 0 && peek[7..15] == 1u64.to_be_bytes();
        return if empty_v3 { Format::V3 } else { Format::V1 };
    }
    if peek.len() >= 10 {
        if flags == PAGE_FLAG_SIZE {
            let size = be32(&peek[6..10]) as usize;
            if size >= 1 && size <= max_compressed(header.page_size) {
                return Format::V3;
            }
        } else if flags == 0 && peek[6..10] == LZ4_FRAME_MAGIC {
            return Format::V3;
        }
    }
    Format::V1
}

/// Largest LZ4 block accepted for one page: the bound of both lz4_flex and
/// liblz4/pierrec (n + n/255 + 16).
fn max_compressed(page_size: u32) -> usize {
    let ps = page_size as usize;
    lz4_flex::block::get_maximum_output_size(ps).max(ps + ps / 255 + 16)
}

fn lz4_error(e: &io::Error) -> bool {
    e.get_ref()
        .is_some_and(|inner| inner.is::<lz4_flex::frame::Error>())
}

impl<R: Read> Decoder<R> {
    /// Reads and validates the header, detecting format 1 vs 3 from the bytes
    /// alone (the file length is not needed): header flag 0x1 exists only in
    /// format 1; otherwise the first page header decides. Format-3 frames carry
    /// flags 0x0001 and a plausible compressed size (1..=LZ4 bound of the page
    /// size), or flags 0 and the LZ4 frame magic (early format 3); an empty
    /// format-3 page block is the 6-byte terminator, a 0 varint and the u64 1.
    /// Anything else is format 1, whose frames start with a raw page. A format-1
    /// page whose first 6 bytes mimic a format-3 frame would be misdetected (the
    /// file then fails verification; use [`Decoder::with_format`]).
    ///
    /// # Errors
    /// Truncated or invalid header, or I/O.
    pub fn new(r: R) -> Result<Self, LtxError> {
        Self::open(r, None)
    }

    /// Like [`Decoder::new`] with the format given instead of detected.
    ///
    /// # Errors
    /// As [`Decoder::new`].
    pub fn with_format(r: R, format: Format) -> Result<Self, LtxError> {
        Self::open(r, Some(format))
    }

    fn open(r: R, format: Option<Format>) -> Result<Self, LtxError> {
        let mut src = Src {
            inner: r,
            pending: [0; PEEK],
            pending_start: 0,
            pending_end: 0,
            pos: 0,
        };
        let mut hb = [0u8; HEADER_SIZE];
        if read_full(&mut src, &mut hb)? < HEADER_SIZE {
            return Err(LtxError::Truncated {
                what: "header",
                offset: 0,
            });
        }
        let header = Header::from_bytes(&hb)?;
        let format = match format {
            Some(f) => f,
            None => {
                let mut peek = [0u8; PEEK];
                let n = read_full(&mut src.inner, &mut peek)?;
                src.pending = peek;
                src.pending_end = n;
                detect(&header, &peek[..n])
            }
        };
        header.validate(format)?;
        let mut hash = crc64_digest();
        hash.update(&hb);
        let body = if format == Format::V1 && header.flags & HEADER_FLAG_COMPRESS_LZ4 != 0 {
            Body::Lz4(Box::new(FrameDecoder::new(src)))
        } else {
            Body::Raw(src)
        };
        Ok(Decoder {
            body,
            lock: lock_pgno(header.page_size),
            snapshot_sum: (header.is_snapshot() && !header.no_checksum())
                .then(RollingChecksum::new),
            header,
            format,
            state: State::Pages,
            hash,
            prev_pgno: 0,
            logical: HEADER_SIZE as u64,
            scratch: Vec::new(),
            last_frame: None,
            frames: 0,
            frames_digest: crc64_digest(),
            terminator_offset: 0,
        })
    }

    /// The validated header.
    pub fn header(&self) -> &Header {
        &self.header
    }

    /// The detected (or given) format.
    pub fn format(&self) -> Format {
        self.format
    }

    /// Where the page last returned by [`Decoder::next_page`] was stored.
    pub fn last_frame(&self) -> Option<FrameInfo> {
        self.last_frame
    }

    fn pos(&self) -> u64 {
        match &self.body {
            Body::Raw(src) if self.format == Format::V3 => src.pos,
            _ => self.logical,
        }
    }

    /// Reads exactly `buf.len()` page-block bytes.
    fn read_body(&mut self, buf: &mut [u8], what: &'static str, pgno: u32) -> Result<(), LtxError> {
        let offset = self.pos();
        let n = match &mut self.body {
            Body::Raw(src) => read_full(src, buf)?,
            Body::Lz4(dec) => read_full(dec, buf).map_err(|e| {
                if lz4_error(&e) {
                    LtxError::Decompress {
                        pgno,
                        reason: e.to_string(),
                    }
                } else {
                    LtxError::Io(e)
                }
            })?,
            Body::Switching => return Err(LtxError::Usage("decoder used after an error")),
        };
        self.logical += n as u64;
        if n < buf.len() {
            return Err(LtxError::Truncated { what, offset });
        }
        Ok(())
    }

    /// Reads the next page into `buf` (whose length must be the page size) and
    /// returns its page number; `None` after the terminator.
    ///
    /// # Errors
    /// Any rule a page breaks (order, commit, lock page, snapshot completeness,
    /// flags, decompression, size), truncation, I/O.
    pub fn next_page(&mut self, buf: &mut [u8]) -> Result<Option<u32>, LtxError> {
        if self.state != State::Pages {
            return Ok(None);
        }
        let ps = self.header.page_size;
        if buf.len() != ps as usize {
            return Err(LtxError::Usage(
                "page buffer length must equal the page size",
            ));
        }
        let frame_start = self.pos();
        let hs = self.format.page_header_size();
        let mut ph = [0u8; 6];
        self.read_body(&mut ph[..hs], "page header", self.prev_pgno)?;
        let pgno = be32(&ph);
        let flags = match self.format {
            Format::V1 => 0,
            Format::V3 => u16::from_be_bytes([ph[4], ph[5]]),
        };
        let invalid = || LtxError::InvalidPageHeader {
            pgno,
            flags,
            offset: frame_start,
        };
        if pgno == 0 {
            if flags != 0 {
                return Err(invalid());
            }
            self.hash.update(&ph[..hs]);
            self.terminator_offset = frame_start;
            self.end_pages()?;
            return Ok(None);
        }
        if flags & !PAGE_FLAG_SIZE != 0 {
            return Err(invalid());
        }
        check_page_order(&self.header, self.lock, self.prev_pgno, pgno)?;
        self.hash.update(&ph[..hs]);

        match (self.format, flags) {
            (Format::V1, _) => self.read_body(buf, "page data", pgno)?,
            (Format::V3, PAGE_FLAG_SIZE) => self.read_block(pgno, buf)?,
            (Format::V3, _) => self.read_lz4_frame(pgno, buf)?,
        }
        self.hash.update(buf);
        if let Some(sum) = &mut self.snapshot_sum {
            sum.toggle(page_checksum(pgno, buf));
        }
        let len = self.pos() - frame_start;
        self.frames += 1;
        for v in [u64::from(pgno), frame_start, len] {
            self.frames_digest.update(&v.to_be_bytes());
        }
        self.last_frame = Some(FrameInfo {
            pgno,
            offset: frame_start,
            len,
        });
        self.prev_pgno = pgno;
        Ok(Some(pgno))
    }

    /// Current format 3: u32 size, then one LZ4 block.
    fn read_block(&mut self, pgno: u32, buf: &mut [u8]) -> Result<(), LtxError> {
        let mut sb = [0u8; 4];
        self.read_body(&mut sb, "page size field", pgno)?;
        self.hash.update(&sb);
        let size = u32::from_be_bytes(sb) as usize;
        let max = max_compressed(self.header.page_size);
        if size > max {
            return Err(LtxError::Decompress {
                pgno,
                reason: format!("compressed size {size} exceeds the bound {max} for the page size"),
            });
        }
        let mut scratch = std::mem::take(&mut self.scratch);
        scratch.resize(size, 0);
        let read = self.read_body(&mut scratch, "compressed page", pgno);
        let decoded = read.and_then(|()| {
            lz4_flex::block::decompress_into(&scratch, buf).map_err(|e| LtxError::Decompress {
                pgno,
                reason: e.to_string(),
            })
        });
        self.scratch = scratch;
        let n = decoded?;
        if n != buf.len() {
            return Err(LtxError::PageSize {
                pgno,
                what: "decompressed page",
                expected: self.header.page_size,
                got: n as u64,
            });
        }
        Ok(())
    }

    /// Early format 3: one standard LZ4 frame, whose end only the frame itself tells.
    fn read_lz4_frame(&mut self, pgno: u32, buf: &mut [u8]) -> Result<(), LtxError> {
        let Body::Raw(src) = &mut self.body else {
            return Err(LtxError::Usage("decoder used after an error"));
        };
        let decompress = |e: io::Error| {
            if lz4_error(&e) {
                LtxError::Decompress {
                    pgno,
                    reason: e.to_string(),
                }
            } else {
                LtxError::Io(e)
            }
        };
        let offset = src.pos;
        let mut frame = FrameDecoder::new(src);
        let n = read_full(&mut frame, buf).map_err(decompress)?;
        if n < buf.len() {
            // Either the frame ended early or the file did; the frame's own
            // structure cannot tell them apart once the input is exhausted.
            return Err(LtxError::PageSize {
                pgno,
                what: "decompressed page (or truncated LZ4 frame)",
                expected: self.header.page_size,
                got: n as u64,
            });
        }
        let mut extra = [0u8; 1];
        if read_full(&mut frame, &mut extra).map_err(decompress)? != 0 {
            return Err(LtxError::Decompress {
                pgno,
                reason: format!(
                    "LZ4 frame at offset {offset} decompresses to more than the page size"
                ),
            });
        }
        Ok(())
    }

    /// After the terminator: snapshot completeness, and the end of format 1's LZ4 stream.
    fn end_pages(&mut self) -> Result<(), LtxError> {
        if self.header.is_snapshot() {
            let expected = next_snapshot_pgno(self.prev_pgno, self.lock);
            if expected <= self.header.commit {
                return Err(LtxError::MissingPage { expected, found: 0 });
            }
        }
        if let Body::Lz4(_) = self.body {
            let Body::Lz4(mut dec) = std::mem::replace(&mut self.body, Body::Switching) else {
                unreachable!("matched above");
            };
            let mut extra = [0u8; 1];
            let n = read_full(&mut dec, &mut extra).map_err(|e| {
                if lz4_error(&e) {
                    LtxError::Decompress {
                        pgno: 0,
                        reason: e.to_string(),
                    }
                } else {
                    LtxError::Io(e)
                }
            })?;
            if n != 0 {
                return Err(LtxError::TrailingData {
                    after: "page block terminator (inside the LZ4 stream)",
                });
            }
            self.body = Body::Raw(dec.into_inner());
        }
        self.state = State::Index;
        Ok(())
    }

    fn raw(&mut self) -> Result<&mut Src<R>, LtxError> {
        match &mut self.body {
            Body::Raw(src) => Ok(src),
            _ => Err(LtxError::Usage("decoder used after an error")),
        }
    }

    /// Reads exactly `buf.len()` bytes after the page block.
    fn read_tail(&mut self, buf: &mut [u8], what: &'static str) -> Result<(), LtxError> {
        let src = self.raw()?;
        let offset = src.pos;
        if read_full(src, buf)? < buf.len() {
            return Err(LtxError::Truncated { what, offset });
        }
        Ok(())
    }

    /// Reads one Go `uvarint`, hashing its bytes and counting them into `len`.
    fn read_uvarint(&mut self, len: &mut u64) -> Result<u64, LtxError> {
        let mut v: u64 = 0;
        for i in 0..10 {
            let mut b = [0u8; 1];
            self.read_tail(&mut b, "page index")?;
            self.hash.update(&b);
            *len += 1;
            let byte = b[0];
            if i == 9 && byte > 1 {
                break;
            }
            v |= u64::from(byte & 0x7f) << (7 * i);
            if byte < 0x80 {
                return Ok(v);
            }
        }
        Err(LtxError::IndexMismatch {
            what: format!("varint overflows 64 bits at index byte {}", *len),
            expected: 0,
            got: 0,
        })
    }

    /// Reads the page index and checks it against the frames decoded. The first
    /// inconsistency is returned as `Ok(Some(err))`, so that a corrupt file is
    /// reported by its file checksum first.
    fn read_index(&mut self) -> Result<Option<LtxError>, LtxError> {
        let mut first_err: Option<LtxError> = None;
        let mut note = |e: LtxError| {
            if first_err.is_none() {
                first_err = Some(e);
            }
        };
        let mut len = 0u64;
        let mut entries = 0u64;
        let mut prev = 0u64;
        let mut next_offset = HEADER_SIZE as u64;
        let mut digest = crc64_digest();
        loop {
            let pgno = self.read_uvarint(&mut len)?;
            if pgno == 0 {
                break;
            }
            let offset = self.read_uvarint(&mut len)?;
            let flen = self.read_uvarint(&mut len)?;
            entries += 1;
            if pgno <= prev {
                note(LtxError::IndexMismatch {
                    what: format!("entry {entries}: page numbers not ascending"),
                    expected: prev + 1,
                    got: pgno,
                });
            }
            if offset != next_offset {
                note(LtxError::IndexMismatch {
                    what: format!("entry {entries} (page {pgno}): frame offset"),
                    expected: next_offset,
                    got: offset,
                });
            }
            prev = pgno;
            next_offset = offset.saturating_add(flen);
            for v in [pgno, offset, flen] {
                digest.update(&v.to_be_bytes());
            }
        }
        let mut lb = [0u8; 8];
        self.read_tail(&mut lb, "page index length")?;
        self.hash.update(&lb);
        let stored_len = u64::from_be_bytes(lb);
        if stored_len != len {
            note(LtxError::IndexMismatch {
                what: "index length field".into(),
                expected: len,
                got: stored_len,
            });
        }
        if entries != self.frames {
            note(LtxError::IndexMismatch {
                what: "number of entries".into(),
                expected: self.frames,
                got: entries,
            });
        } else if entries > 0 && next_offset != self.terminator_offset {
            note(LtxError::IndexMismatch {
                what: "end of the last frame".into(),
                expected: self.terminator_offset,
                got: next_offset,
            });
        } else if digest.finalize() != self.frames_digest.finalize() {
            note(LtxError::IndexMismatch {
                what: "page numbers or frame lengths (digest of all entries)".into(),
                expected: self.frames_digest.finalize(),
                got: digest.finalize(),
            });
        }
        Ok(first_err)
    }

    /// Reads any pages left, the page index and the trailer; checks the index
    /// against the frames, the file checksum, the trailer rules and, for
    /// snapshots with checksums, the post-apply checksum against the pages.
    /// Data after the trailer is an error.
    ///
    /// # Errors
    /// The first rule broken, truncation, I/O.
    pub fn finish(mut self) -> Result<Trailer, LtxError> {
        if self.state == State::Pages {
            let mut page = vec![0u8; self.header.page_size as usize];
            while self.next_page(&mut page)?.is_some() {}
        }
        if self.state == State::Done {
            return Err(LtxError::Usage("finish called twice"));
        }
        let index_err = match self.format {
            Format::V3 => self.read_index()?,
            Format::V1 => None,
        };
        let mut tb = [0u8; TRAILER_SIZE];
        self.read_tail(&mut tb, "trailer")?;
        self.state = State::Done;
        let trailer = Trailer::from_bytes(&tb);
        self.hash.update(&tb[..8]);
        let computed = Checksum(CHECKSUM_FLAG | self.hash.finalize());
        if computed != trailer.file_checksum {
            return Err(LtxError::ChecksumMismatch {
                what: "file",
                expected: trailer.file_checksum,
                got: computed,
            });
        }
        let mut extra = [0u8; 1];
        if read_full(self.raw()?, &mut extra)? != 0 {
            return Err(LtxError::TrailingData { after: "trailer" });
        }
        if let Some(e) = index_err {
            return Err(e);
        }
        validate_post_apply(&self.header, trailer.post_apply_checksum)?;
        if let Some(sum) = self.snapshot_sum
            && sum.value() != trailer.post_apply_checksum
        {
            return Err(LtxError::ChecksumMismatch {
                what: "post-apply (snapshot pages)",
                expected: trailer.post_apply_checksum,
                got: sum.value(),
            });
        }
        Ok(trailer)
    }
}

/// Full verification of one file; returns its header and trailer.
///
/// # Errors
/// Whatever [`Decoder::new`], [`Decoder::next_page`] or [`Decoder::finish`] report.
pub fn verify<R: Read>(r: R) -> Result<(Header, Trailer), LtxError> {
    let dec = Decoder::new(r)?;
    let header = dec.header().clone();
    let trailer = dec.finish()?;
    Ok((header, trailer))
}

/// [`verify`] of a file on disk; errors carry the path.
///
/// # Errors
/// As [`verify`], wrapped in [`LtxError::File`].
pub fn verify_path(path: &Path) -> Result<(Header, Trailer), LtxError> {
    let f = File::open(path).map_err(LtxError::from).in_file(path)?;
    verify(BufReader::with_capacity(1 << 16, f)).in_file(path)
}

#[cfg(test)]
mod tests {
    use std::io::Write;

    use super::*;
    use crate::ltx::encoder::put_uvarint;
    use crate::ltx::{Encoder, HEADER_FLAG_NO_CHECKSUM, TxId, crc64, database_checksum};

    fn snapshot_header(page_size: u32, commit: u32) -> Header {
        Header {
            page_size,
            commit,
            min_txid: TxId(1),
            max_txid: TxId(1),
            timestamp: 1000,
            ..Header::default()
        }
    }

    fn encode(header: &Header, pages: &[(u32, Vec<u8>)], post: Checksum) -> Vec<u8> {
        let mut enc = Encoder::new(Vec::new(), header).unwrap();
        for (pgno, data) in pages {
            enc.encode_page(*pgno, data).unwrap();
        }
        enc.finish(post).unwrap().0
    }

    type Decoded = (Header, Vec<(u32, Vec<u8>)>, Trailer);

    fn decode_all(file: &[u8]) -> Result<Decoded, LtxError> {
        let mut dec = Decoder::new(file)?;
        let header = dec.header().clone();
        let mut buf = vec![0u8; header.page_size as usize];
        let mut pages = Vec::new();
        while let Some(pgno) = dec.next_page(&mut buf)? {
            pages.push((pgno, buf.clone()));
        }
        Ok((header, pages, dec.finish()?))
    }

    /// decoder_test.go TestDecoder: lz4_flex compresses each page to 15 bytes where
    /// pierrec gives 26, so the index (`01 64 19 02 7d 19 00`, 187-byte file) is
    /// checked for structure, not for Go's exact bytes.
    #[test]
    fn reference_test_decoder_file() {
        let header = snapshot_header(1024, 2);
        let pages = vec![(1, vec![b'2'; 1024]), (2, vec![b'3'; 1024])];
        let file = encode(&header, &pages, Checksum(0xe1899b6d587aaaaa));
        let (h, got, trailer) = decode_all(&file).unwrap();
        assert_eq!(h, header);
        assert_eq!(got, pages);
        assert_eq!(trailer.post_apply_checksum, Checksum(0xe1899b6d587aaaaa));
        // Walk the frames by their size fields and rebuild the expected index and
        // the logical stream the file checksum covers (reference §6).
        let size1 = be32(&file[106..110]) as usize;
        let f2 = 100 + 10 + size1;
        let size2 = be32(&file[f2 + 6..f2 + 10]) as usize;
        let term = f2 + 10 + size2;
        assert_eq!(file[term..term + 6], [0u8; 6]);
        let mut index = Vec::new();
        for (pgno, off, len) in [(1u64, 100u64, 10 + size1), (2, f2 as u64, 10 + size2)] {
            put_uvarint(&mut index, pgno);
            put_uvarint(&mut index, off);
            put_uvarint(&mut index, len as u64);
        }
        index.push(0);
        let idx = term + 6;
        assert_eq!(file[idx..idx + index.len()], index[..]);
        assert_eq!(
            file[idx + index.len()..idx + index.len() + 8],
            (index.len() as u64).to_be_bytes()
        );
        assert_eq!(file.len(), idx + index.len() + 8 + 16);
        let mut logical = file[..110].to_vec();
        logical.extend_from_slice(&pages[0].1);
        logical.extend_from_slice(&file[f2..f2 + 10]);
        logical.extend_from_slice(&pages[1].1);
        logical.extend_from_slice(&file[term..file.len() - 8]);
        assert_eq!(
            trailer.file_checksum,
            Checksum(CHECKSUM_FLAG | crc64(&logical))
        );
    }

    /// The file Go's TestDecoder writes, rebuilt byte for byte except for the LZ4
    /// payloads: pierrec/lz4 emits 26-byte blocks, so 26-byte blocks that decode
    /// to the same pages are crafted here. The file checksum hashes the sizes but
    /// not the compressed bytes, so it must equal the value derived in the
    /// reference (§11): 210 bytes, index `01 64 24 02 88 01 24 00`, length 8.
    #[test]
    fn go_test_decoder_file_checksum() {
        // One sequence of 13 literals and a 1006-byte match at offset 1, then the
        // 5 literals LZ4 requires at the end: 26 bytes.
        let block = |b: u8| {
            let mut v = vec![0xdf];
            v.extend_from_slice(&[b; 13]);
            v.extend_from_slice(&[0x01, 0x00, 0xff, 0xff, 0xff, 0xde, 0x50]);
            v.extend_from_slice(&[b; 5]);
            v
        };
        let mut file = snapshot_header(1024, 2).to_bytes().to_vec();
        for (pgno, b) in [(1u32, b'2'), (2, b'3')] {
            let payload = block(b);
            assert_eq!(payload.len(), 26);
            file.extend_from_slice(&pgno.to_be_bytes());
            file.extend_from_slice(&1u16.to_be_bytes());
            file.extend_from_slice(&26u32.to_be_bytes());
            file.extend_from_slice(&payload);
        }
        file.extend_from_slice(&[0u8; 6]);
        file.extend_from_slice(&[0x01, 0x64, 0x24, 0x02, 0x88, 0x01, 0x24, 0x00]);
        file.extend_from_slice(&8u64.to_be_bytes());
        file.extend_from_slice(&0xe1899b6d587aaaaau64.to_be_bytes());
        file.extend_from_slice(&0xf86fcff36247df82u64.to_be_bytes());
        assert_eq!(file.len(), 210);
        let (h, pages, trailer) = decode_all(&file).unwrap();
        assert_eq!(h, snapshot_header(1024, 2));
        assert_eq!(pages, [(1, vec![b'2'; 1024]), (2, vec![b'3'; 1024])]);
        assert_eq!(trailer.file_checksum, Checksum(0xf86fcff36247df82));
    }

    /// Writes a format-1 file the way ltx v0.3 did: 4-byte page headers, raw pages,
    /// optionally the page block as one LZ4 frame.
    fn format1(header: &Header, pages: &[(u32, Vec<u8>)], post: Checksum) -> Vec<u8> {
        let mut block = Vec::new();
        for (pgno, data) in pages {
            block.extend_from_slice(&pgno.to_be_bytes());
            block.extend_from_slice(data);
        }
        block.extend_from_slice(&[0u8; 4]);
        let hb = header.to_bytes();
        let mut logical = hb.to_vec();
        logical.extend_from_slice(&block);
        logical.extend_from_slice(&post.0.to_be_bytes());
        let file_checksum = CHECKSUM_FLAG | crc64(&logical);
        let mut file = hb.to_vec();
        if header.flags & HEADER_FLAG_COMPRESS_LZ4 != 0 {
            let mut enc = lz4_flex::frame::FrameEncoder::new(Vec::new());
            enc.write_all(&block).unwrap();
            file.extend_from_slice(&enc.finish().unwrap());
        } else {
            file.extend_from_slice(&block);
        }
        file.extend_from_slice(&post.0.to_be_bytes());
        file.extend_from_slice(&file_checksum.to_be_bytes());
        file
    }

    fn sample_pages(page_size: usize, pgnos: &[u32]) -> Vec<(u32, Vec<u8>)> {
        pgnos
            .iter()
            .map(|&p| {
                let data = (0..page_size)
                    .map(|i| {
                        if i < 100 {
                            (i as u32 * p) as u8
                        } else {
                            (p % 7) as u8
                        }
                    })
                    .collect();
                (p, data)
            })
            .collect()
    }

    #[test]
    fn format1_uncompressed_and_lz4() {
        for flags in [0, HEADER_FLAG_COMPRESS_LZ4] {
            let pages = sample_pages(4096, &[1, 2, 3]);
            let db: Vec<u8> = pages.iter().flat_map(|(_, d)| d.clone()).collect();
            let post = database_checksum(&db[..], 4096).unwrap();
            let header = Header {
                flags,
                ..snapshot_header(4096, 3)
            };
            let file = format1(&header, &pages, post);
            let (h, got, trailer) = decode_all(&file).unwrap();
            assert_eq!(h, header);
            assert_eq!(got, pages);
            assert_eq!(trailer.post_apply_checksum, post);
            let mut dec = Decoder::new(&file[..]).unwrap();
            assert_eq!(dec.format(), Format::V1);
            let mut buf = vec![0u8; 4096];
            dec.next_page(&mut buf).unwrap();
            assert_eq!(dec.last_frame().unwrap().len, 4100);

            // An incremental file, and the wrong post-apply checksum of a snapshot.
            let inc = Header {
                flags,
                min_txid: TxId(2),
                max_txid: TxId(2),
                pre_apply_checksum: post,
                ..snapshot_header(4096, 5)
            };
            let file = format1(
                &inc,
                &sample_pages(4096, &[2, 5]),
                Checksum(CHECKSUM_FLAG | 9),
            );
            decode_all(&file).unwrap();
            let bad = format1(&header, &pages, Checksum(CHECKSUM_FLAG | 9));
            assert!(matches!(
                decode_all(&bad),
                Err(LtxError::ChecksumMismatch {
                    what: "post-apply (snapshot pages)",
                    ..
                })
            ));
        }
    }

    /// Early format 3 (ltx v0.5.0-0.5.1): flags 0 and one LZ4 frame per page, mixed
    /// with current frames in one file.
    #[test]
    fn early_format3_frames() {
        let pages = sample_pages(1024, &[1, 2, 3]);
        let header = Header {
            flags: HEADER_FLAG_NO_CHECKSUM,
            ..snapshot_header(1024, 3)
        };
        let hb = header.to_bytes();
        let mut file = hb.to_vec();
        let mut logical = hb.to_vec();
        let mut index = Vec::new();
        for (i, (pgno, data)) in pages.iter().enumerate() {
            let offset = file.len();
            let mut ph = pgno.to_be_bytes().to_vec();
            if i == 1 {
                let block = lz4_flex::block::compress(data);
                ph.extend_from_slice(&1u16.to_be_bytes());
                ph.extend_from_slice(&(block.len() as u32).to_be_bytes());
                file.extend_from_slice(&ph);
                file.extend_from_slice(&block);
            } else {
                ph.extend_from_slice(&0u16.to_be_bytes());
                let mut enc = lz4_flex::frame::FrameEncoder::new(Vec::new());
                enc.write_all(data).unwrap();
                file.extend_from_slice(&ph);
                file.extend_from_slice(&enc.finish().unwrap());
            }
            logical.extend_from_slice(&ph);
            logical.extend_from_slice(data);
            put_uvarint(&mut index, u64::from(*pgno));
            put_uvarint(&mut index, offset as u64);
            put_uvarint(&mut index, (file.len() - offset) as u64);
        }
        index.push(0);
        let mut tail = vec![0u8; 6];
        tail.extend_from_slice(&index);
        tail.extend_from_slice(&(index.len() as u64).to_be_bytes());
        tail.extend_from_slice(&[0u8; 8]);
        logical.extend_from_slice(&tail);
        file.extend_from_slice(&tail);
        file.extend_from_slice(&(CHECKSUM_FLAG | crc64(&logical)).to_be_bytes());
        let (h, got, _) = decode_all(&file).unwrap();
        assert_eq!(h, header);
        assert_eq!(got, pages);
    }

    #[test]
    fn empty_files_of_both_formats() {
        let header = Header {
            min_txid: TxId(2),
            max_txid: TxId(2),
            pre_apply_checksum: Checksum(CHECKSUM_FLAG | 1),
            ..snapshot_header(4096, 0)
        };
        let v3 = encode(&header, &[], Checksum(CHECKSUM_FLAG));
        assert_eq!(Decoder::new(&v3[..]).unwrap().format(), Format::V3);
        decode_all(&v3).unwrap();
        let v1 = format1(&header, &[], Checksum(CHECKSUM_FLAG));
        assert_eq!(Decoder::new(&v1[..]).unwrap().format(), Format::V1);
        decode_all(&v1).unwrap();
    }

    #[test]
    fn page_rules_are_enforced() {
        let ps = 512usize;
        let inc = Header {
            min_txid: TxId(5),
            max_txid: TxId(5),
            pre_apply_checksum: Checksum(CHECKSUM_FLAG | 3),
            ..snapshot_header(512, 4)
        };
        let post = Checksum(CHECKSUM_FLAG | 4);
        // Files the encoder refuses to write, built as format 1 to reach the decoder.
        let expect = |header: &Header, pgnos: &[u32], check: &dyn Fn(&LtxError) -> bool| {
            let file = format1(header, &sample_pages(ps, pgnos), post);
            let err = decode_all(&file).unwrap_err();
            assert!(check(&err), "{pgnos:?}: {err}");
        };
        expect(&inc, &[2, 2], &|e| {
            matches!(e, LtxError::PageOutOfOrder { pgno: 2, prev: 2 })
        });
        expect(&inc, &[3, 1], &|e| {
            matches!(e, LtxError::PageOutOfOrder { pgno: 1, prev: 3 })
        });
        expect(&inc, &[5], &|e| {
            matches!(e, LtxError::PageBeyondCommit { pgno: 5, commit: 4 })
        });
        let snap = snapshot_header(512, 3);
        expect(&snap, &[1, 3], &|e| {
            matches!(
                e,
                LtxError::MissingPage {
                    expected: 2,
                    found: 3
                }
            )
        });
        expect(&snap, &[1, 2], &|e| {
            matches!(
                e,
                LtxError::MissingPage {
                    expected: 3,
                    found: 0
                }
            )
        });
        let big = Header {
            commit: u32::MAX,
            ..inc.clone()
        };
        let lock = lock_pgno(512);
        expect(&big, &[lock], &|e| matches!(e, LtxError::LockPage { .. }));

        // Trailing data, and a wrong file checksum.
        let mut file = encode(&inc, &sample_pages(ps, &[2]), post);
        file.push(0);
        assert!(matches!(
            decode_all(&file),
            Err(LtxError::TrailingData { after: "trailer" })
        ));
        file.pop();
        let n = file.len();
        file[n - 1] ^= 1;
        assert!(matches!(
            decode_all(&file),
            Err(LtxError::ChecksumMismatch { what: "file", .. })
        ));
    }

    #[test]
    fn encoder_refuses_bad_input() {
        let h = snapshot_header(512, 3);
        let mut enc = Encoder::new(Vec::new(), &h).unwrap();
        assert!(matches!(
            enc.encode_page(1, &[0u8; 100]),
            Err(LtxError::PageSize { .. })
        ));
        assert!(matches!(
            enc.encode_page(2, &[0u8; 512]),
            Err(LtxError::MissingPage {
                expected: 1,
                found: 2
            })
        ));
        enc.encode_page(1, &[0u8; 512]).unwrap();
        assert!(matches!(
            enc.encode_page(4, &[0u8; 512]),
            Err(LtxError::PageBeyondCommit { .. })
        ));
        assert!(matches!(
            enc.finish(Checksum(CHECKSUM_FLAG)),
            Err(LtxError::MissingPage {
                expected: 2,
                found: 0
            })
        ));
        let big = Header {
            commit: u32::MAX,
            min_txid: TxId(2),
            max_txid: TxId(2),
            pre_apply_checksum: Checksum(CHECKSUM_FLAG),
            ..h
        };
        let mut enc = Encoder::new(Vec::new(), &big).unwrap();
        assert!(matches!(
            enc.encode_page(lock_pgno(512), &[0u8; 512]),
            Err(LtxError::LockPage { .. })
        ));
        let nc = Header {
            flags: HEADER_FLAG_NO_CHECKSUM,
            ..snapshot_header(512, 1)
        };
        let mut enc = Encoder::new(Vec::new(), &nc).unwrap();
        enc.encode_page(1, &[0u8; 512]).unwrap();
        assert!(matches!(
            enc.finish(Checksum(CHECKSUM_FLAG | 1)),
            Err(LtxError::InvalidTrailer { .. })
        ));
    }

    #[test]
    fn index_is_checked_against_frames() {
        let h = snapshot_header(512, 2);
        let pages = sample_pages(512, &[1, 2]);
        let db: Vec<u8> = pages.iter().flat_map(|(_, d)| d.clone()).collect();
        let post = database_checksum(&db[..], 512).unwrap();
        let file = encode(&h, &pages, post);
        // Rewrite the index with a wrong offset for page 2 and fix the file
        // checksum, as a buggy writer would.
        let idx_len =
            u64::from_be_bytes(file[file.len() - 24..file.len() - 16].try_into().unwrap());
        let idx = file.len() - 24 - idx_len as usize;
        let mut bad = file[..idx].to_vec();
        let mut index = Vec::new();
        let f1 = be32(&file[106..110]) as u64 + 10;
        for (p, o, l) in [
            (1u64, 100u64, f1),
            (
                2,
                100 + f1 + 1,
                10 + be32(&file[100 + f1 as usize + 6..]) as u64,
            ),
        ] {
            put_uvarint(&mut index, p);
            put_uvarint(&mut index, o);
            put_uvarint(&mut index, l);
        }
        index.push(0);
        bad.extend_from_slice(&index);
        bad.extend_from_slice(&(index.len() as u64).to_be_bytes());
        bad.extend_from_slice(&post.0.to_be_bytes());
        let mut logical = bad[..110].to_vec();
        logical.extend_from_slice(&pages[0].1);
        logical.extend_from_slice(&bad[100 + f1 as usize..110 + f1 as usize]);
        logical.extend_from_slice(&pages[1].1);
        let term = idx - 6;
        logical.extend_from_slice(&bad[term..]);
        bad.extend_from_slice(&(CHECKSUM_FLAG | crc64(&logical)).to_be_bytes());
        match decode_all(&bad) {
            Err(LtxError::IndexMismatch {
                what,
                expected,
                got,
            }) => {
                assert!(what.contains("page 2"), "{what}");
                assert_eq!(got, expected + 1);
            }
            other => panic!("{other:?}"),
        }
    }
}
