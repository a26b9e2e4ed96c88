//! Rollback journals: recognising a valid header, and rolling a hot journal back into
//! the database file at start-up (the same playback SQLite does).

use std::fs::File;
use std::io;
use std::os::unix::fs::FileExt;

use crate::ltx;

/// The 8-byte magic that opens every valid journal header.
pub const MAGIC: [u8; 8] = [0xd9, 0xd5, 0x05, 0xf9, 0x20, 0xa1, 0x63, 0xd7];
/// Bytes of the header that carry information (SQLite zeroes these in PERSIST mode).
pub const HEADER_LEN: usize = 28;

/// A journal segment header.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct JournalHeader {
    /// Number of page records; 0xFFFFFFFF means "up to the end of the file".
    pub nrec: u32,
    /// Seed of the record checksums.
    pub nonce: u32,
    /// Database size in pages before the transaction.
    pub db_size: u32,
    /// Sector size: headers start at multiples of it.
    pub sector_size: u32,
    /// Page size of the records.
    pub page_size: u32,
}

impl JournalHeader {
    /// Parses a header; `None` unless the magic is present and the sizes are sane.
    pub fn parse(b: &[u8]) -> Option<JournalHeader> {
        if b.len() < HEADER_LEN || b[..8] != MAGIC {
            return None;
        }
        let h = JournalHeader {
            nrec: be32(b, 8),
            nonce: be32(b, 12),
            db_size: be32(b, 16),
            sector_size: be32(b, 20),
            page_size: be32(b, 24),
        };
        let ps_ok = (512..=65536).contains(&h.page_size) && h.page_size.is_power_of_two();
        let ss_ok = (32..=65536).contains(&h.sector_size) && h.sector_size.is_power_of_two();
        (ps_ok && ss_ok).then_some(h)
    }
}

/// True if the journal file starts with a valid header: SQLite would consider it hot
/// (or, while a connection holds the write lock, part of a live transaction).
pub fn has_valid_header(file: &File) -> io::Result<bool> {
    let mut b = [0u8; HEADER_LEN];
    match file.read_exact_at(&mut b, 0) {
        Ok(()) => Ok(JournalHeader::parse(&b).is_some()),
        Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => Ok(false),
        Err(e) => Err(e),
    }
}

/// The checksum SQLite stores after each journal record.
fn record_checksum(nonce: u32, page: &[u8]) -> u32 {
    let mut sum = nonce;
    let mut i = page.len() as isize - 200;
    while i > 0 {
        sum = sum.wrapping_add(u32::from(page[i as usize]));
        i -= 200;
    }
    sum
}

/// What a rollback did.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Rollback {
    /// Pages restored from the journal.
    pub pages_restored: u32,
    /// Database size in pages after the rollback.
    pub db_size: u32,
}

/// Rolls a hot journal back into `db`: writes every verified original page back, truncates
/// the database to its size before the transaction and fsyncs it. Returns `None` (and
/// writes nothing) when the journal has no valid header. Playback stops at the first record
/// whose checksum is wrong, as SQLite's does: such a record was never synced, so the
/// database page it names was never overwritten.
pub fn rollback(journal: &File, db: &File) -> io::Result<Option<Rollback>> {
    let len = journal.metadata()?.len();
    let mut hb = [0u8; HEADER_LEN];
    if len < HEADER_LEN as u64 {
        return Ok(None);
    }
    journal.read_exact_at(&mut hb, 0)?;
    let Some(first) = JournalHeader::parse(&hb) else {
        return Ok(None);
    };
    let ps = first.page_size;
    let lock_pgno = ltx::lock_pgno(ps);
    let sector = u64::from(first.sector_size);
    let rec_size = 4 + u64::from(ps) + 4;
    let mut rec = vec![0u8; rec_size as usize];
    let mut restored = 0u32;
    let mut hdr_off = 0u64;
    let mut hdr = first;
    'segments: loop {
        let mut off = hdr_off + sector;
        let nrec = if hdr.nrec == u32::MAX {
            len.saturating_sub(off) / rec_size
        } else {
            u64::from(hdr.nrec)
        };
        for _ in 0..nrec {
            if off + rec_size > len {
                break 'segments;
            }
            journal.read_exact_at(&mut rec, off)?;
            let pgno = be32(&rec, 0);
            let page = &rec[4..4 + ps as usize];
            if pgno == 0
                || pgno == lock_pgno
                || be32(&rec, 4 + ps as usize) != record_checksum(hdr.nonce, page)
            {
                break 'segments;
            }
            if pgno <= first.db_size {
                db.write_all_at(page, u64::from(pgno - 1) * u64::from(ps))?;
                restored += 1;
            }
            off += rec_size;
        }
        // The next segment header starts at the next sector boundary.
        hdr_off = off.div_ceil(sector) * sector;
        if hdr_off + HEADER_LEN as u64 > len {
            break;
        }
        journal.read_exact_at(&mut hb, hdr_off)?;
        match JournalHeader::parse(&hb) {
            Some(h) if h.page_size == ps => hdr = h,
            _ => break,
        }
    }
    db.set_len(u64::from(first.db_size) * u64::from(ps))?;
    db.sync_all()?;
    Ok(Some(Rollback {
        pages_restored: restored,
        db_size: first.db_size,
    }))
}

fn be32(b: &[u8], off: usize) -> u32 {
    u32::from_be_bytes([b[off], b[off + 1], b[off + 2], b[off + 3]])
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Builds a journal the way SQLite lays it out: header padded to the sector size,
    /// then records (pgno, page, checksum).
    fn journal(ps: u32, db_size: u32, nonce: u32, records: &[(u32, Vec<u8>)]) -> Vec<u8> {
        let sector = 512usize;
        let mut j = vec![0u8; sector];
        j[..8].copy_from_slice(&MAGIC);
        j[8..12].copy_from_slice(&(records.len() as u32).to_be_bytes());
        j[12..16].copy_from_slice(&nonce.to_be_bytes());
        j[16..20].copy_from_slice(&db_size.to_be_bytes());
        j[20..24].copy_from_slice(&(sector as u32).to_be_bytes());
        j[24..28].copy_from_slice(&ps.to_be_bytes());
        for (pgno, page) in records {
            j.extend_from_slice(&pgno.to_be_bytes());
            j.extend_from_slice(page);
            j.extend_from_slice(&record_checksum(nonce, page).to_be_bytes());
        }
        j
    }

    fn file_with(bytes: &[u8]) -> File {
        let f = tempfile::tempfile().unwrap();
        f.write_all_at(bytes, 0).unwrap();
        f
    }

    fn read_all(f: &File) -> Vec<u8> {
        let mut v = vec![0u8; f.metadata().unwrap().len() as usize];
        f.read_exact_at(&mut v, 0).unwrap();
        v
    }

    #[test]
    fn hot_journal_restores_pages_and_size() {
        let ps = 1024u32;
        let old: Vec<u8> = (0..2 * ps).map(|i| (i % 251) as u8).collect();
        // The transaction changed page 2 and added page 3.
        let mut new = old.clone();
        new[ps as usize..].fill(0xAA);
        new.extend(vec![0xBB; ps as usize]);
        let db = file_with(&new);
        let j = file_with(&journal(ps, 2, 7, &[(2, old[ps as usize..].to_vec())]));
        let r = rollback(&j, &db).unwrap().unwrap();
        assert_eq!(
            r,
            Rollback {
                pages_restored: 1,
                db_size: 2
            }
        );
        assert_eq!(read_all(&db), old);
    }

    #[test]
    fn record_with_bad_checksum_ends_playback() {
        let ps = 512u32;
        let old = vec![1u8; 3 * ps as usize];
        let new = vec![2u8; 3 * ps as usize];
        let db = file_with(&new);
        let mut j = journal(
            ps,
            3,
            9,
            &[(1, old[..512].to_vec()), (3, old[1024..].to_vec())],
        );
        // Corrupt the checksum of the second record.
        let last = j.len() - 1;
        j[last] ^= 0xFF;
        let r = rollback(&file_with(&j), &db).unwrap().unwrap();
        assert_eq!(r.pages_restored, 1);
        let got = read_all(&db);
        assert_eq!(&got[..512], &old[..512]);
        assert_eq!(&got[1024..], &new[1024..]);
    }

    #[test]
    fn zeroed_header_is_not_hot() {
        let mut j = journal(512, 1, 1, &[(1, vec![0u8; 512])]);
        j[..HEADER_LEN].fill(0);
        let db = file_with(&[5u8; 512]);
        assert!(rollback(&file_with(&j), &db).unwrap().is_none());
        assert_eq!(read_all(&db), vec![5u8; 512]);
        assert!(!has_valid_header(&file_with(&j)).unwrap());
    }
}
