//! CRC-64/GO-ISO, page checksums and the rolling database checksum.

use std::io::{self, Read};

use crc_fast::{CrcAlgorithm, Digest};

use super::{CHECKSUM_FLAG, Checksum};

const ALGO: CrcAlgorithm = CrcAlgorithm::Crc64GoIso;

/// CRC-64/GO-ISO of `data` (Go's `crc64.Checksum(data, crc64.MakeTable(crc64.ISO))`).
pub fn crc64(data: &[u8]) -> u64 {
    crc_fast::checksum(ALGO, data)
}

/// A streaming CRC-64/GO-ISO.
pub(crate) fn crc64_digest() -> Digest {
    Digest::new(ALGO)
}

/// Checksum of one page: `FLAG | crc(be32(pgno) || data)`.
pub fn page_checksum(pgno: u32, data: &[u8]) -> Checksum {
    let mut d = crc64_digest();
    d.update(&pgno.to_be_bytes());
    d.update(data);
    Checksum(CHECKSUM_FLAG | d.finalize())
}

/// The page holding SQLite's PENDING_BYTE (offset 2^30); never stored in LTX files
/// and excluded from database checksums.
pub fn lock_pgno(page_size: u32) -> u32 {
    ((1u64 << 30) / u64::from(page_size.max(1))) as u32 + 1
}

/// Rolling database checksum: XOR of page checksums (low 63 bits), reported with
/// bit 63 set. XOR makes updates incremental: toggle a page's old checksum out and
/// its new one in; toggle truncated pages out.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct RollingChecksum(u64);

impl RollingChecksum {
    /// The checksum of an empty database.
    pub fn new() -> Self {
        RollingChecksum(0)
    }

    /// Continues from a known database checksum.
    pub fn from_checksum(c: Checksum) -> Self {
        RollingChecksum(c.0 & !CHECKSUM_FLAG)
    }

    /// XORs a page checksum in (or, a second time, out).
    pub fn toggle(&mut self, page: Checksum) {
        self.0 ^= page.0 & !CHECKSUM_FLAG;
    }

    /// The database checksum (an empty database gives exactly `CHECKSUM_FLAG`).
    pub fn value(&self) -> Checksum {
        Checksum(CHECKSUM_FLAG | self.0)
    }
}

/// Pages per read in the streaming functions: big reads keep syscalls rare.
const CHUNK_BYTES: usize = 1 << 20;

/// Calls `f(pgno, page)` for every page of a database stream. A trailing partial
/// page is an `InvalidData` error.
fn for_each_page<R: Read>(
    mut r: R,
    page_size: u32,
    first_pgno: u32,
    mut f: impl FnMut(u32, &[u8]),
) -> io::Result<()> {
    let ps = page_size as usize;
    if !super::is_valid_page_size(page_size) {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            format!("invalid page size {page_size}"),
        ));
    }
    let mut buf = vec![0u8; CHUNK_BYTES.max(ps)];
    let mut pgno = first_pgno;
    loop {
        let n = read_full(&mut r, &mut buf)?;
        let whole = n - n % ps;
        for page in buf[..whole].chunks_exact(ps) {
            f(pgno, page);
            pgno = pgno.checked_add(1).ok_or_else(|| {
                io::Error::new(io::ErrorKind::InvalidData, "database has too many pages")
            })?;
        }
        if n < buf.len() {
            if n != whole {
                return Err(io::Error::new(
                    io::ErrorKind::InvalidData,
                    format!(
                        "database size is not a multiple of the page size {page_size} \
                         ({} trailing bytes)",
                        n - whole
                    ),
                ));
            }
            return Ok(());
        }
    }
}

/// Reads until `buf` is full or the input ends; returns the bytes read.
pub(crate) fn read_full<R: Read>(r: &mut R, buf: &mut [u8]) -> io::Result<usize> {
    let mut n = 0;
    while n < buf.len() {
        match r.read(&mut buf[n..]) {
            Ok(0) => break,
            Ok(k) => n += k,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(n)
}

/// Reads a whole database file (streaming) and returns its checksum, lock page
/// excluded.
///
/// # Errors
/// I/O errors, an invalid page size, or a size that is not a multiple of it.
pub fn database_checksum<R: Read>(r: R, page_size: u32) -> io::Result<Checksum> {
    checksum_from(r, page_size, 1)
}

/// Checksum of the pages of `r`, the first being `first_pgno`.
fn checksum_from<R: Read>(r: R, page_size: u32, first_pgno: u32) -> io::Result<Checksum> {
    let lock = lock_pgno(page_size);
    let mut sum = RollingChecksum::new();
    for_each_page(r, page_size, first_pgno, |pgno, page| {
        if pgno != lock {
            sum.toggle(page_checksum(pgno, page));
        }
    })?;
    Ok(sum.value())
}

/// Per-page checksums of a database file, for callers that keep them in memory
/// (index i = pgno - 1; the lock page's slot is `Checksum(0)`).
///
/// # Errors
/// As [`database_checksum`].
pub fn page_checksums<R: Read>(r: R, page_size: u32) -> io::Result<Vec<Checksum>> {
    let lock = lock_pgno(page_size);
    let mut out = Vec::new();
    for_each_page(r, page_size, 1, |pgno, page| {
        out.push(if pgno == lock {
            Checksum(0)
        } else {
            page_checksum(pgno, page)
        });
    })?;
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn crc64_is_go_iso() {
        assert_eq!(crc64(b"123456789"), 0xB90956C775A41001);
    }

    #[test]
    fn lock_pages() {
        assert_eq!(lock_pgno(512), 2097153);
        assert_eq!(lock_pgno(4096), 262145);
        assert_eq!(lock_pgno(65536), 16385);
    }

    fn pages(page_size: usize, fills: &[u8]) -> Vec<u8> {
        fills
            .iter()
            .flat_map(|&b| std::iter::repeat_n(b, page_size))
            .collect()
    }

    #[test]
    fn reference_vectors() {
        // ltx_test.go TestChecksumReader.
        let db = pages(512, &[1, 2, 3]);
        assert_eq!(
            database_checksum(&db[..], 512).unwrap(),
            Checksum(0xefffffffecd99000)
        );
        // decoder_test.go DecodeDatabaseTo/OK.
        let db = pages(512, b"23");
        assert_eq!(
            database_checksum(&db[..], 512).unwrap(),
            Checksum(0x8b87423eeeeeeeee)
        );
        // decoder_test.go TestDecoder post-apply.
        let db = pages(1024, b"23");
        assert_eq!(
            database_checksum(&db[..], 1024).unwrap(),
            Checksum(0xe1899b6d587aaaaa)
        );
        // compactor_test.go.
        let one =
            |ps: usize, fills: &[u8]| database_checksum(&pages(ps, fills)[..], ps as u32).unwrap();
        assert_eq!(one(512, b"1"), Checksum(0xeb1a999231044ddd));
        assert_eq!(one(1024, &[0x81]), Checksum(0xeb953fc47685d740));
        assert_eq!(one(1024, &[0x81, 0x82, 0x83]), Checksum(0x8a249272ad9f7dea));
    }

    #[test]
    fn lock_page_vector_without_a_gigabyte() {
        // decoder_test.go DecodeDatabaseTo/WithLockPage: ps 4096, commit L+10, every
        // page 4096 x 'x'. crc(a || b) = shift(crc(a), len b) ^ crc(b), and shift is
        // linear, so the XOR over all pages of crc(be32(p) || data) equals
        // shift(XOR of crc(be32(p)), 4096) ^ (crc(data) if the page count is odd):
        // one combine instead of hashing a gigabyte.
        let lock = lock_pgno(4096);
        let data = vec![b'x'; 4096];
        let data_crc = crc64(&data);
        let pgnos: Vec<u32> = (1..=lock + 10).filter(|&p| p != lock).collect();
        let heads = pgnos
            .iter()
            .fold(0u64, |acc, p| acc ^ crc64(&p.to_be_bytes()));
        let tail = if pgnos.len() % 2 == 1 { data_crc } else { 0 };
        let xor = crc_fast::checksum_combine(ALGO, heads, tail, 4096);
        assert_eq!(Checksum(CHECKSUM_FLAG | xor), Checksum(0xc19b668c376662c7));
        // The same identity for a single page, against the direct computation.
        let one = crc_fast::checksum_combine(ALGO, crc64(&7u32.to_be_bytes()), data_crc, 4096);
        assert_eq!(Checksum(CHECKSUM_FLAG | one), page_checksum(7, &data));
    }

    #[test]
    fn database_checksum_skips_the_lock_page() {
        // Pages L-1, L, L+1 of a 4096-byte-page database; the lock page's content
        // must not count, whatever it holds.
        let lock = lock_pgno(4096);
        let mut pages = vec![7u8; 3 * 4096];
        let expected = {
            let mut s = RollingChecksum::new();
            s.toggle(page_checksum(lock - 1, &pages[..4096]));
            s.toggle(page_checksum(lock + 1, &pages[8192..]));
            s.value()
        };
        assert_eq!(checksum_from(&pages[..], 4096, lock - 1).unwrap(), expected);
        pages[4096..8192].fill(0xee);
        assert_eq!(checksum_from(&pages[..], 4096, lock - 1).unwrap(), expected);
    }

    #[test]
    fn rolling_toggle_is_incremental() {
        let a = pages(512, b"abc");
        let mut b = a.clone();
        b[512..1024].fill(b'z');
        let before = database_checksum(&a[..], 512).unwrap();
        let mut sum = RollingChecksum::from_checksum(before);
        sum.toggle(page_checksum(2, &a[512..1024]));
        sum.toggle(page_checksum(2, &b[512..1024]));
        assert_eq!(sum.value(), database_checksum(&b[..], 512).unwrap());
        // Truncating page 3 away.
        sum.toggle(page_checksum(3, &b[1024..]));
        assert_eq!(sum.value(), database_checksum(&b[..1024], 512).unwrap());
        assert_eq!(RollingChecksum::new().value(), Checksum(CHECKSUM_FLAG));
        assert_eq!(
            database_checksum(&[][..], 512).unwrap(),
            Checksum(CHECKSUM_FLAG)
        );
    }

    #[test]
    fn streaming_functions_agree_and_reject_partial_pages() {
        let db: Vec<u8> = (0..(3 * 1024 * 1024 + 4096))
            .map(|i| (i % 251) as u8)
            .collect();
        let sums = page_checksums(&db[..], 4096).unwrap();
        assert_eq!(sums.len(), db.len() / 4096);
        assert_eq!(sums[9], page_checksum(10, &db[9 * 4096..10 * 4096]));
        let mut r = RollingChecksum::new();
        sums.iter().for_each(|&c| r.toggle(c));
        assert_eq!(r.value(), database_checksum(&db[..], 4096).unwrap());
        let err = database_checksum(&db[..db.len() - 1], 4096).unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::InvalidData);
    }
}
