//! The clean-shutdown record: written by `Store::close`, read and removed at the next
//! open. It holds the position and the per-page checksums, so a clean restart needs no
//! full re-hash of the database (the fast start-up). It is trusted only if the database
//! and WAL files are exactly as they were when it was written (size, inode, mtime) and
//! its own CRC matches.

use std::fs::{self, File, OpenOptions};
use std::io::{self, Read, Write};
use std::os::unix::fs::MetadataExt;
use std::path::Path;

use crate::ltx::{self, Checksum, Pos, TxId};

/// File name inside the database directory.
pub const FILE_NAME: &str = "clean-shutdown";
const MAGIC: &[u8; 8] = b"LFSCLEAN";
const VERSION: u32 = 1;

/// Identity of a file's content as far as the record is concerned.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Stamp {
    pub len: u64,
    pub ino: u64,
    pub mtime: i64,
    pub mtime_nsec: i64,
}

impl Stamp {
    /// `None` when the file does not exist.
    pub fn of(path: &Path) -> io::Result<Option<Stamp>> {
        match fs::metadata(path) {
            Ok(m) => Ok(Some(Stamp {
                len: m.len(),
                ino: m.ino(),
                mtime: m.mtime(),
                mtime_nsec: m.mtime_nsec(),
            })),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(e),
        }
    }
}

/// What the record holds.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CleanRecord {
    pub pos: Pos,
    pub page_size: u32,
    pub commit: u32,
    pub checksums: Vec<Checksum>,
    pub database: Option<Stamp>,
    pub wal: Option<Stamp>,
}

fn put_stamp(b: &mut Vec<u8>, s: Option<Stamp>) {
    match s {
        None => b.push(0),
        Some(s) => {
            b.push(1);
            b.extend_from_slice(&s.len.to_be_bytes());
            b.extend_from_slice(&s.ino.to_be_bytes());
            b.extend_from_slice(&s.mtime.to_be_bytes());
            b.extend_from_slice(&s.mtime_nsec.to_be_bytes());
        }
    }
}

impl CleanRecord {
    fn encode(&self) -> Vec<u8> {
        let mut b = Vec::with_capacity(64 + self.checksums.len() * 8);
        b.extend_from_slice(MAGIC);
        b.extend_from_slice(&VERSION.to_be_bytes());
        b.extend_from_slice(&self.pos.txid.0.to_be_bytes());
        b.extend_from_slice(&self.pos.post_apply_checksum.0.to_be_bytes());
        b.extend_from_slice(&self.page_size.to_be_bytes());
        b.extend_from_slice(&self.commit.to_be_bytes());
        put_stamp(&mut b, self.database);
        put_stamp(&mut b, self.wal);
        b.extend_from_slice(&(self.checksums.len() as u32).to_be_bytes());
        for c in &self.checksums {
            b.extend_from_slice(&c.0.to_be_bytes());
        }
        let crc = ltx::crc64(&b);
        b.extend_from_slice(&crc.to_be_bytes());
        b
    }

    fn decode(b: &[u8]) -> Option<CleanRecord> {
        if b.len() < 8 + 8 {
            return None;
        }
        let (body, crc) = b.split_at(b.len() - 8);
        if ltx::crc64(body).to_be_bytes() != crc {
            return None;
        }
        let mut r = Cursor { b: body, off: 0 };
        if r.take(8)? != MAGIC || r.u32()? != VERSION {
            return None;
        }
        let txid = TxId(r.u64()?);
        let checksum = Checksum(r.u64()?);
        let page_size = r.u32()?;
        let commit = r.u32()?;
        let database = r.stamp()?;
        let wal = r.stamp()?;
        let n = r.u32()? as usize;
        if n != commit as usize {
            return None;
        }
        let mut checksums = Vec::with_capacity(n);
        for _ in 0..n {
            checksums.push(Checksum(r.u64()?));
        }
        (r.off == body.len()).then_some(CleanRecord {
            pos: Pos {
                txid,
                post_apply_checksum: checksum,
            },
            page_size,
            commit,
            checksums,
            database,
            wal,
        })
    }

    /// Writes the record durably into `dir` (temp file, fsync, rename, directory fsync).
    pub fn write(&self, dir: &Path) -> io::Result<()> {
        let tmp = dir.join(format!("{FILE_NAME}.tmp"));
        let mut f = OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .open(&tmp)?;
        f.write_all(&self.encode())?;
        f.sync_all()?;
        fs::rename(&tmp, dir.join(FILE_NAME))?;
        File::open(dir)?.sync_all()
    }

    /// Reads the record in `dir` and removes it (whatever its state): a record must never
    /// outlive the open that consumed it, or a later crash would be mistaken for a clean
    /// shutdown. `None` when absent or damaged.
    pub fn take(dir: &Path) -> io::Result<Option<CleanRecord>> {
        let path = dir.join(FILE_NAME);
        let _ = fs::remove_file(dir.join(format!("{FILE_NAME}.tmp")));
        let mut b = Vec::new();
        match File::open(&path) {
            Ok(mut f) => f.read_to_end(&mut b)?,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(e),
        };
        fs::remove_file(&path)?;
        File::open(dir)?.sync_all()?;
        Ok(CleanRecord::decode(&b))
    }
}

struct Cursor<'a> {
    b: &'a [u8],
    off: usize,
}

impl<'a> Cursor<'a> {
    fn take(&mut self, n: usize) -> Option<&'a [u8]> {
        let s = self.b.get(self.off..self.off + n)?;
        self.off += n;
        Some(s)
    }
    fn u32(&mut self) -> Option<u32> {
        Some(u32::from_be_bytes(self.take(4)?.try_into().ok()?))
    }
    fn u64(&mut self) -> Option<u64> {
        Some(u64::from_be_bytes(self.take(8)?.try_into().ok()?))
    }
    fn stamp(&mut self) -> Option<Option<Stamp>> {
        match self.take(1)?[0] {
            0 => Some(None),
            1 => Some(Some(Stamp {
                len: self.u64()?,
                ino: self.u64()?,
                mtime: self.u64()? as i64,
                mtime_nsec: self.u64()? as i64,
            })),
            _ => None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> CleanRecord {
        CleanRecord {
            pos: Pos {
                txid: TxId(7),
                post_apply_checksum: Checksum(0x8000_0000_0000_1234),
            },
            page_size: 4096,
            commit: 3,
            checksums: vec![Checksum(1), Checksum(2), Checksum(3)],
            database: Some(Stamp {
                len: 12288,
                ino: 5,
                mtime: 100,
                mtime_nsec: 7,
            }),
            wal: None,
        }
    }

    #[test]
    fn round_trips_and_is_consumed() {
        let dir = tempfile::tempdir().unwrap();
        sample().write(dir.path()).unwrap();
        assert_eq!(CleanRecord::take(dir.path()).unwrap(), Some(sample()));
        assert_eq!(CleanRecord::take(dir.path()).unwrap(), None);
    }

    #[test]
    fn damaged_record_is_ignored() {
        let dir = tempfile::tempdir().unwrap();
        let mut b = sample().encode();
        b[30] ^= 1;
        fs::write(dir.path().join(FILE_NAME), &b).unwrap();
        assert_eq!(CleanRecord::take(dir.path()).unwrap(), None);
        assert!(!dir.path().join(FILE_NAME).exists());
    }
}
