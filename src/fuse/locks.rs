//! POSIX byte-range locks, served by the file system itself.
//!
//! SQLite coordinates readers and writers with `fcntl(F_SETLK)` on the database file
//! and on the WAL index. With `FUSE_POSIX_LOCKS` negotiated the kernel forwards those
//! calls to us, so the lock state lives here: one [`LockTable`] per (database, file
//! kind). The semantics follow POSIX record locks:
//!
//! - a lock belongs to a *lock owner* (the kernel passes the `files_struct` of the
//!   process, so every fd of one process shares an owner);
//! - read locks of different owners may overlap, a write lock excludes every other
//!   owner's lock on the bytes it covers;
//! - an owner's own locks never conflict with each other: a new lock replaces the
//!   owner's previous lock on the bytes it covers (splitting ranges), and adjacent or
//!   overlapping ranges of the same type merge;
//! - unlocking part of a range splits it.
//!
//! Requests never wait: a conflict is reported to the caller, who answers `EAGAIN`.
//! SQLite only ever uses non-blocking locks.

use std::fmt;

/// Inclusive end offset that stands for "to the end of the file" (the kernel sends
/// `OFFSET_MAX` for `l_len == 0`).
pub const LOCK_EOF: u64 = i64::MAX as u64;

/// The type of a held lock.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum LockKind {
    /// Shared (`F_RDLCK`).
    Read,
    /// Exclusive (`F_WRLCK`).
    Write,
}

impl LockKind {
    /// The `fcntl` lock type constant.
    pub fn as_fcntl(self) -> i32 {
        match self {
            LockKind::Read => libc::F_RDLCK,
            LockKind::Write => libc::F_WRLCK,
        }
    }

    fn conflicts_with(self, other: LockKind) -> bool {
        self == LockKind::Write || other == LockKind::Write
    }
}

/// One held lock: `start..=end` of `owner`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct HeldLock {
    /// The kernel's lock owner id.
    pub owner: u64,
    /// First byte covered.
    pub start: u64,
    /// Last byte covered (inclusive; [`LOCK_EOF`] for "to the end").
    pub end: u64,
    /// Shared or exclusive.
    pub kind: LockKind,
    /// Process id that took the lock, reported by `F_GETLK`.
    pub pid: u32,
}

impl HeldLock {
    fn overlaps(&self, start: u64, end: u64) -> bool {
        self.start <= end && start <= self.end
    }
}

impl fmt::Display for HeldLock {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{:?} lock {}..={} by owner {:#x} (pid {})",
            self.kind, self.start, self.end, self.owner, self.pid
        )
    }
}

/// The lock state of one file.
#[derive(Debug, Default)]
pub struct LockTable {
    // Kept sorted by (owner, start); an owner's ranges never overlap each other.
    locks: Vec<HeldLock>,
}

impl LockTable {
    /// An empty table.
    pub fn new() -> Self {
        Self::default()
    }

    /// The first lock of another owner that would conflict with `kind` on
    /// `start..=end`, as `F_GETLK` reports it.
    pub fn conflict(&self, owner: u64, start: u64, end: u64, kind: LockKind) -> Option<HeldLock> {
        self.locks
            .iter()
            .find(|l| l.owner != owner && l.overlaps(start, end) && l.kind.conflicts_with(kind))
            .copied()
    }

    /// Takes (or converts) a lock on `start..=end` for `owner`.
    ///
    /// # Errors
    /// Returns the conflicting lock of another owner; the table is then unchanged.
    pub fn lock(
        &mut self,
        owner: u64,
        pid: u32,
        start: u64,
        end: u64,
        kind: LockKind,
    ) -> Result<(), HeldLock> {
        if let Some(c) = self.conflict(owner, start, end, kind) {
            return Err(c);
        }
        self.remove_range(owner, start, end);
        self.locks.push(HeldLock {
            owner,
            start,
            end,
            kind,
            pid,
        });
        self.normalize(owner);
        Ok(())
    }

    /// Releases `owner`'s locks on `start..=end`, splitting ranges that extend past it.
    pub fn unlock(&mut self, owner: u64, start: u64, end: u64) {
        self.remove_range(owner, start, end);
    }

    /// Releases every lock of `owner` (close of a file by that owner).
    pub fn release_owner(&mut self, owner: u64) {
        self.locks.retain(|l| l.owner != owner);
    }

    /// The owner holding a write lock that covers `byte`, if any.
    pub fn write_holder(&self, byte: u64) -> Option<u64> {
        self.locks
            .iter()
            .find(|l| l.kind == LockKind::Write && l.start <= byte && byte <= l.end)
            .map(|l| l.owner)
    }

    /// Whether `owner` holds a lock of any kind on `byte`.
    pub fn holds(&self, owner: u64, byte: u64) -> Option<LockKind> {
        self.locks
            .iter()
            .find(|l| l.owner == owner && l.start <= byte && byte <= l.end)
            .map(|l| l.kind)
    }

    /// Every held lock, sorted by owner then start.
    pub fn locks(&self) -> &[HeldLock] {
        &self.locks
    }

    fn remove_range(&mut self, owner: u64, start: u64, end: u64) {
        let mut kept = Vec::with_capacity(self.locks.len() + 1);
        for l in self.locks.drain(..) {
            if l.owner != owner || !l.overlaps(start, end) {
                kept.push(l);
                continue;
            }
            if l.start < start {
                kept.push(HeldLock {
                    end: start - 1,
                    ..l
                });
            }
            if l.end > end {
                kept.push(HeldLock {
                    start: end + 1,
                    ..l
                });
            }
        }
        self.locks = kept;
    }

    /// Sorts and merges `owner`'s adjacent or overlapping ranges of the same kind.
    fn normalize(&mut self, owner: u64) {
        self.locks.sort_by_key(|l| (l.owner, l.start));
        let mut merged: Vec<HeldLock> = Vec::with_capacity(self.locks.len());
        for l in self.locks.drain(..) {
            match merged.last_mut() {
                Some(prev)
                    if prev.owner == owner
                        && l.owner == owner
                        && prev.kind == l.kind
                        && prev.end.saturating_add(1) >= l.start =>
                {
                    prev.end = prev.end.max(l.end);
                    prev.pid = l.pid;
                }
                _ => merged.push(l),
            }
        }
        self.locks = merged;
    }
}

#[cfg(test)]
mod tests {
    use super::LockKind::{Read, Write};
    use super::*;

    const PENDING: u64 = 0x4000_0000;
    const RESERVED: u64 = PENDING + 1;
    const SHARED_FIRST: u64 = PENDING + 2;
    const SHARED_LAST: u64 = SHARED_FIRST + 509;

    fn ranges(t: &LockTable, owner: u64) -> Vec<(u64, u64, LockKind)> {
        t.locks()
            .iter()
            .filter(|l| l.owner == owner)
            .map(|l| (l.start, l.end, l.kind))
            .collect()
    }

    #[test]
    fn readers_share_and_a_writer_is_excluded() {
        let mut t = LockTable::new();
        t.lock(1, 10, SHARED_FIRST, SHARED_LAST, Read).unwrap();
        t.lock(2, 20, SHARED_FIRST, SHARED_LAST, Read).unwrap();
        let c = t.lock(3, 30, SHARED_FIRST, SHARED_LAST, Write).unwrap_err();
        assert_eq!(c.owner, 1);
        assert_eq!(c.pid, 10);
        assert_eq!(
            t.conflict(3, SHARED_FIRST, SHARED_LAST, Write)
                .map(|l| l.kind),
            Some(Read)
        );
        // A reader of a single byte of the range also conflicts with nothing but writers.
        assert!(
            t.conflict(3, SHARED_FIRST + 5, SHARED_FIRST + 5, Read)
                .is_none()
        );
    }

    #[test]
    fn a_writer_excludes_readers_and_other_writers() {
        let mut t = LockTable::new();
        t.lock(1, 1, RESERVED, RESERVED, Write).unwrap();
        assert_eq!(t.lock(2, 2, RESERVED, RESERVED, Read).unwrap_err().owner, 1);
        assert_eq!(
            t.lock(2, 2, RESERVED, RESERVED, Write).unwrap_err().owner,
            1
        );
        // Other bytes stay free.
        t.lock(2, 2, PENDING, PENDING, Read).unwrap();
        assert_eq!(t.write_holder(RESERVED), Some(1));
        assert_eq!(t.write_holder(PENDING), None);
    }

    #[test]
    fn a_failed_request_changes_nothing() {
        let mut t = LockTable::new();
        t.lock(1, 1, 0, 10, Read).unwrap();
        t.lock(2, 2, 5, 5, Read).unwrap();
        // Owner 1 tries to upgrade 0..=10 to write: conflicts with owner 2 at byte 5.
        assert!(t.lock(1, 1, 0, 10, Write).is_err());
        assert_eq!(ranges(&t, 1), vec![(0, 10, Read)]);
        assert_eq!(ranges(&t, 2), vec![(5, 5, Read)]);
    }

    #[test]
    fn an_owner_never_conflicts_with_itself_and_upgrades_in_place() {
        let mut t = LockTable::new();
        t.lock(1, 1, SHARED_FIRST, SHARED_FIRST, Read).unwrap();
        t.lock(1, 1, SHARED_FIRST, SHARED_LAST, Write).unwrap();
        assert_eq!(ranges(&t, 1), vec![(SHARED_FIRST, SHARED_LAST, Write)]);
        // Downgrade back to a read lock on one byte, as SQLite does after a commit.
        t.lock(1, 1, SHARED_FIRST, SHARED_LAST, Read).unwrap();
        assert_eq!(ranges(&t, 1), vec![(SHARED_FIRST, SHARED_LAST, Read)]);
    }

    #[test]
    fn partial_unlock_splits_a_range() {
        let mut t = LockTable::new();
        t.lock(1, 1, 100, 200, Write).unwrap();
        t.unlock(1, 120, 130);
        assert_eq!(ranges(&t, 1), vec![(100, 119, Write), (131, 200, Write)]);
        // The hole is free for others, the rest is not.
        t.lock(2, 2, 120, 130, Write).unwrap();
        assert!(t.lock(2, 2, 119, 119, Read).is_err());
        assert!(t.lock(2, 2, 131, 131, Read).is_err());
    }

    #[test]
    fn changing_the_type_of_the_middle_splits_into_three() {
        let mut t = LockTable::new();
        t.lock(1, 1, 0, 99, Read).unwrap();
        t.lock(1, 1, 40, 59, Write).unwrap();
        assert_eq!(
            ranges(&t, 1),
            vec![(0, 39, Read), (40, 59, Write), (60, 99, Read)]
        );
        // And back: the three ranges merge into one.
        t.lock(1, 1, 40, 59, Read).unwrap();
        assert_eq!(ranges(&t, 1), vec![(0, 99, Read)]);
    }

    #[test]
    fn adjacent_and_overlapping_ranges_of_one_type_merge() {
        let mut t = LockTable::new();
        t.lock(1, 1, 123, 123, Read).unwrap();
        t.lock(1, 1, 124, 124, Read).unwrap();
        t.lock(1, 1, 126, 127, Read).unwrap();
        assert_eq!(ranges(&t, 1), vec![(123, 124, Read), (126, 127, Read)]);
        t.lock(1, 1, 125, 126, Read).unwrap();
        assert_eq!(ranges(&t, 1), vec![(123, 127, Read)]);
        // Another owner's adjacent range stays separate.
        t.lock(2, 2, 128, 128, Read).unwrap();
        assert_eq!(ranges(&t, 1), vec![(123, 127, Read)]);
        assert_eq!(ranges(&t, 2), vec![(128, 128, Read)]);
    }

    #[test]
    fn whole_file_locks_reach_the_end() {
        let mut t = LockTable::new();
        t.lock(1, 1, 0, LOCK_EOF, Write).unwrap();
        assert!(
            t.conflict(2, u32::MAX as u64, u32::MAX as u64, Read)
                .is_some()
        );
        t.unlock(1, 0, LOCK_EOF);
        assert!(t.locks().is_empty());
    }

    #[test]
    fn releasing_an_owner_frees_only_its_locks() {
        let mut t = LockTable::new();
        t.lock(1, 1, 120, 120, Write).unwrap();
        t.lock(1, 1, 128, 128, Read).unwrap();
        t.lock(2, 2, 128, 128, Read).unwrap();
        t.release_owner(1);
        assert!(ranges(&t, 1).is_empty());
        assert_eq!(t.write_holder(120), None);
        assert_eq!(ranges(&t, 2), vec![(128, 128, Read)]);
        t.lock(3, 3, 120, 120, Write).unwrap();
    }

    #[test]
    fn sqlite_wal_index_sequence() {
        // DMS shared by two connections, one reader on READ1, a writer on WRITE.
        let (dms, write, ckpt, read1) = (128, 120, 121, 124);
        let mut t = LockTable::new();
        t.lock(1, 1, dms, dms, Read).unwrap();
        t.lock(2, 2, dms, dms, Read).unwrap();
        assert!(
            t.lock(3, 3, dms, dms, Write).is_err(),
            "DMS exclusive while shared"
        );
        t.lock(1, 1, read1, read1, Read).unwrap();
        t.lock(2, 2, write, write, Write).unwrap();
        assert!(t.lock(1, 1, write, write, Write).is_err());
        assert_eq!(t.holds(2, write), Some(Write));
        assert_eq!(t.holds(1, write), None);
        // A checkpointer wanting read1 exclusively is refused while the reader holds it.
        assert!(t.lock(2, 2, read1, read1, Write).is_err());
        t.lock(1, 1, ckpt, ckpt, Write).unwrap();
        t.unlock(2, write, write);
        assert_eq!(t.write_holder(write), None);
    }
}
