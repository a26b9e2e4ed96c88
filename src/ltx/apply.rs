//! Applying an LTX file to a database file.

use std::fs::File;
use std::io::{self, BufReader, Read, Seek, SeekFrom};
use std::os::unix::fs::FileExt;
use std::path::Path;

use super::encoder::next_snapshot_pgno;
use super::{
    Checksum, Decoder, Header, LtxError, Pos, ResultExt, RollingChecksum, database_checksum,
    is_valid_page_size, lock_pgno, page_checksum,
};

/// The 16 bytes every SQLite database file starts with.
const SQLITE_MAGIC: &[u8; 16] = b"SQLite format 3\0";

/// Page size of a SQLite database from its header (big-endian u16 at offset 16,
/// where 1 means 65536). `None` for an empty file.
///
/// # Errors
/// Not a SQLite header, an invalid page size, or I/O.
pub fn database_page_size<R: Read>(mut r: R) -> Result<Option<u32>, LtxError> {
    let mut b = [0u8; 18];
    let n = super::checksum::read_full(&mut r, &mut b)?;
    if n == 0 {
        return Ok(None);
    }
    if n < b.len() || &b[..16] != SQLITE_MAGIC {
        return Err(LtxError::InvalidDatabase {
            reason: "not a SQLite database (header magic missing)",
            size: n as u64,
            page_size: 0,
        });
    }
    let raw = u32::from(u16::from_be_bytes([b[16], b[17]]));
    let page_size = if raw == 1 { 65536 } else { raw };
    if !is_valid_page_size(page_size) {
        return Err(LtxError::InvalidDatabase {
            reason: "invalid page size in the SQLite header",
            size: n as u64,
            page_size,
        });
    }
    Ok(Some(page_size))
}

/// Reads a file from an offset without moving its cursor.
struct ReadAt<'a> {
    file: &'a File,
    pos: u64,
}

impl Read for ReadAt<'_> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let n = self.file.read_at(buf, self.pos)?;
        self.pos += n as u64;
        Ok(n)
    }
}

fn open_decoder(file: &File) -> Result<Decoder<BufReader<&File>>, LtxError> {
    let mut f = file;
    f.seek(SeekFrom::Start(0))?;
    Decoder::new(BufReader::with_capacity(1 << 16, f))
}

/// What a file builds on.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Base {
    /// A snapshot: replaces everything.
    Snapshot,
    /// A file of another page size than the database's (`VACUUM` after `PRAGMA
    /// page_size`): it must hold every page, and replaces the content.
    Resize,
    /// The database's current checksum, which the file changes page by page.
    Follows(Checksum),
}

impl Base {
    /// Pages of the current database the file builds on, and its checksum (`None`:
    /// nothing carries over, and the file must hold every page only if it is not a
    /// snapshot, which the decoder checks itself).
    fn carried(self, db_pages: u32) -> (u32, Option<Checksum>) {
        match self {
            Base::Snapshot => (db_pages, None),
            Base::Resize => (0, Some(RollingChecksum::new().value())),
            Base::Follows(c) => (db_pages, Some(c)),
        }
    }
}

/// Checks that the file may follow the database's position and says what it builds
/// on.
fn check_position(
    db: &File,
    db_len: u64,
    header: &Header,
    current: Option<Pos>,
    check: ApplyCheck,
) -> Result<Base, LtxError> {
    if header.is_snapshot() {
        return Ok(Base::Snapshot);
    }
    if header.no_checksum() && current.is_none() {
        return Err(LtxError::UnknownPosition {
            reason: "a file without checksums can only follow a known TXID; \
                     start the chain with a snapshot (min TXID 1)",
        });
    }
    if let Some(pos) = current
        && pos.txid.0.checked_add(1) != Some(header.min_txid.0)
    {
        return Err(LtxError::TxidGap {
            current: pos.txid,
            min_txid: header.min_txid,
        });
    }
    // Page 1 of a SQLite database names its page size; other content (tests,
    // a database being built) has nothing to compare.
    let db_ps = if db_len > 0 {
        database_page_size(ReadAt { file: db, pos: 0 })
            .ok()
            .flatten()
    } else {
        None
    };
    let resize = db_ps.is_some_and(|p| p != header.page_size);
    let actual = match (check, current) {
        (ApplyCheck::Incremental, Some(pos)) => pos.post_apply_checksum,
        _ => database_checksum(
            ReadAt { file: db, pos: 0 },
            db_ps.unwrap_or(header.page_size),
        )?,
    };
    if let Some(pos) = current
        && pos.post_apply_checksum != actual
    {
        return Err(LtxError::ChecksumMismatch {
            what: "database (against its recorded position)",
            expected: pos.post_apply_checksum,
            got: actual,
        });
    }
    if !header.no_checksum() && header.pre_apply_checksum != actual {
        return Err(match current {
            Some(pos) => LtxError::PosMismatch {
                current: pos,
                pre_apply: header.pre_apply_pos(),
            },
            None => LtxError::ChecksumMismatch {
                what: "pre-apply (database)",
                expected: header.pre_apply_checksum,
                got: actual,
            },
        });
    }
    Ok(if resize {
        Base::Resize
    } else {
        Base::Follows(actual)
    })
}

/// Decodes the whole file once, computing the database checksum it will produce
/// from `base` (the current checksum) without writing anything.
fn expected_checksum(
    db: &File,
    db_pages: u32,
    mut dec: Decoder<BufReader<&File>>,
    base: Option<Checksum>,
) -> Result<Checksum, LtxError> {
    let h = dec.header().clone();
    let ps = h.page_size as usize;
    let lock = lock_pgno(h.page_size);
    let mut sum = base.map_or_else(RollingChecksum::new, RollingChecksum::from_checksum);
    let mut page = vec![0u8; ps];
    let mut old = vec![0u8; ps];
    // Highest page known to exist after the file: pages above the old size must
    // all be in the file, as SQLite writes every page it allocates.
    let mut covered = db_pages;
    let grow_check = |covered: u32, pgno: u32| {
        let expected = next_snapshot_pgno(covered, lock);
        if base.is_some() && pgno > expected {
            return Err(LtxError::MissingPage {
                expected,
                found: if pgno > h.commit { 0 } else { pgno },
            });
        }
        Ok(())
    };
    while let Some(pgno) = dec.next_page(&mut page)? {
        if base.is_some() && pgno <= db_pages {
            db.read_exact_at(&mut old, u64::from(pgno - 1) * ps as u64)?;
            sum.toggle(page_checksum(pgno, &old));
        }
        if pgno > covered {
            grow_check(covered, pgno)?;
            covered = pgno;
        }
        sum.toggle(page_checksum(pgno, &page));
    }
    if covered < h.commit {
        grow_check(covered, h.commit.saturating_add(1))?;
    }
    if base.is_some() {
        for pgno in (h.commit.saturating_add(1)..=db_pages).filter(|&p| p != lock) {
            db.read_exact_at(&mut old, u64::from(pgno - 1) * ps as u64)?;
            sum.toggle(page_checksum(pgno, &old));
        }
    }
    let trailer = dec.finish()?;
    let expected = sum.value();
    if !h.no_checksum() && trailer.post_apply_checksum != expected {
        return Err(LtxError::ChecksumMismatch {
            what: "post-apply",
            expected: trailer.post_apply_checksum,
            got: expected,
        });
    }
    Ok(expected)
}

/// The database checksum that applying `ltx` (which may carry no checksums) to `db`
/// at position `current` would produce, without writing anything: the file is fully
/// verified and must follow `current` (TXID; pre-apply checksum when it has one);
/// `current` is trusted as the database's checksum ([`ApplyCheck::Incremental`]).
/// For a snapshot the result is the checksum of its pages.
///
/// # Errors
/// As [`apply_file_with`], wrapped with the path of `ltx`.
pub fn checksum_after(db: &File, current: Option<Pos>, ltx: &Path) -> Result<Checksum, LtxError> {
    (|| {
        let file = File::open(ltx)?;
        let dec = open_decoder(&file)?;
        let header = dec.header().clone();
        let db_len = db.metadata()?.len();
        let base = check_position(db, db_len, &header, current, ApplyCheck::Incremental)?;
        let (db_pages, base) = base.carried((db_len / u64::from(header.page_size)) as u32);
        expected_checksum(db, db_pages, dec, base)
    })()
    .in_file(ltx)
}

/// How much of the database [`apply_file_with`] reads to check it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ApplyCheck {
    /// Compute the database checksum before applying (and compare it with the
    /// given position) and again from disk after the fsync. O(database size).
    Full,
    /// Trust the given position's checksum as the database's current one and
    /// update it from the pages the file overwrites and truncates, without
    /// re-reading the whole database. O(file size). For callers that track
    /// positions themselves (a chain of applies, a replica); with no position,
    /// or for a snapshot, it behaves as `Full`.
    Incremental,
}

/// Applies one LTX file to a database file (opened read and write) at position
/// `current` (`None`: unknown, e.g. a plain database file) and returns the new
/// position. Same as [`apply_file_with`] with [`ApplyCheck::Full`].
///
/// # Errors
/// As [`apply_file_with`].
pub fn apply_file(db: &File, current: Option<Pos>, ltx: &Path) -> Result<Pos, LtxError> {
    apply_file_with(db, current, ltx, ApplyCheck::Full)
}

/// Applies one LTX file to a database file; see [`apply_file`].
///
/// Nothing is written unless the whole file verifies and may follow the database:
/// the file is decoded once to check it (file checksum, page rules) and to
/// compute the database checksum it will produce from the current content (old
/// pages XORed out, new pages in, truncated pages out), then decoded again to
/// write. Position rules:
/// - a snapshot (MinTXID 1) always applies and replaces the content;
/// - otherwise MinTXID must be `current.txid + 1`, and for files with checksums
///   the pre-apply checksum must equal the database's checksum (computed, or with
///   [`ApplyCheck::Incremental`] taken from `current`);
/// - with `current == None`, a file with checksums applies if its pre-apply
///   checksum equals the database's; a file without checksums is refused;
/// - pages above the database's current size up to commit must all be present;
/// - a file whose page size differs from the database's (`VACUUM` after `PRAGMA
///   page_size`) must hold every page and replaces the content.
///
/// After writing, the file is truncated to commit pages and fsynced; with
/// [`ApplyCheck::Full`] its checksum is then recomputed from disk. For files with
/// checksums the returned checksum is the file's post-apply checksum; for files
/// without, the computed one.
///
/// The LTX file must not change while this runs (it is read twice).
///
/// # Errors
/// Every error is wrapped with the path of `ltx`.
pub fn apply_file_with(
    db: &File,
    current: Option<Pos>,
    ltx: &Path,
    check: ApplyCheck,
) -> Result<Pos, LtxError> {
    apply_inner(db, current, ltx, check).in_file(ltx)
}

fn apply_inner(
    db: &File,
    current: Option<Pos>,
    ltx: &Path,
    check: ApplyCheck,
) -> Result<Pos, LtxError> {
    let file = File::open(ltx)?;
    let dec = open_decoder(&file)?;
    let header = dec.header().clone();
    let ps = u64::from(header.page_size);
    let db_len = db.metadata()?.len();
    let base = check_position(db, db_len, &header, current, check)?;
    if base != Base::Resize && (db_len % ps != 0 || db_len / ps > u64::from(u32::MAX)) {
        return Err(LtxError::InvalidDatabase {
            reason: "size is not a whole number of pages",
            size: db_len,
            page_size: header.page_size,
        });
    }
    let (db_pages, carried) = base.carried((db_len / ps) as u32);
    let expected = expected_checksum(db, db_pages, dec, carried)?;

    // Verified: now write.
    if base == Base::Resize {
        // Nothing of the old page size stays, not even the lock page's bytes.
        db.set_len(0)?;
    }
    let mut dec = open_decoder(&file)?;
    let mut page = vec![0u8; header.page_size as usize];
    while let Some(pgno) = dec.next_page(&mut page)? {
        db.write_all_at(&page, u64::from(pgno - 1) * ps)?;
    }
    dec.finish()?;
    let len = u64::from(header.commit) * ps;
    db.set_len(len)?;
    db.sync_all()?;
    let recheck =
        check == ApplyCheck::Full || current.is_none() || !matches!(base, Base::Follows(_));
    if recheck {
        let got = database_checksum(ReadAt { file: db, pos: 0 }, header.page_size)?;
        if got != expected {
            tracing::error!(ltx = %ltx.display(), %expected, %got, "database checksum wrong after apply");
            return Err(LtxError::ChecksumMismatch {
                what: "database after writing",
                expected,
                got,
            });
        }
    } else if db.metadata()?.len() != len {
        return Err(LtxError::InvalidDatabase {
            reason: "size after apply differs from commit",
            size: db.metadata()?.len(),
            page_size: header.page_size,
        });
    }
    Ok(Pos {
        txid: header.max_txid,
        post_apply_checksum: expected,
    })
}
