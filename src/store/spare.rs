//! Spare files: empty files made ahead of need in `<data>/spare/`, so that writing a
//! named LTX file on the commit path (primary) or the apply path (replica) renames an
//! existing inode into `ltx/` instead of allocating one.
//!
//! Allocating an inode is cheap on most file systems, but not on ext4 without a journal:
//! there the allocator skips every free inode deleted in the last minutes
//! (`recently_deleted`), reading the inode table for each, so with retention removing
//! LTX files as fast as commits create them, one `create` cost hundreds of microseconds
//! (measured: about 28% of all CPU time of a primary and a replica at 640 tx/s). The
//! `litefs-spares` thread keeps the pool filled off the commit path. (Expired LTX files
//! are not recycled into the pool: a reader may still hold one open, and unlink is what
//! keeps its content intact for that reader.)
//!
//! Spares carry no data that matters: a crash may leave one that was being written
//! (taken, written, not yet renamed); start-up removes it, so every spare handed out is
//! empty and is opened without `O_TRUNC` (on ext4 a truncated file is written out when
//! it is closed, which queued a write of each named LTX file ahead of the next commit's
//! device flush: `docs/performance.md`). Nothing needs spares to be durable.

use std::fs::{self, File, OpenOptions};
use std::io;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::thread::JoinHandle;
use std::time::Duration;

use tracing::warn;

use super::ltxio::remove_file_if_exists;

/// How many spares the pool keeps ready.
const TARGET: usize = 256;
/// The refill thread wakes when the pool falls below this.
const LOW: usize = TARGET - 32;
/// Spares made between pauses of [`REFILL_PAUSE`] (at most 8,000 a second in all).
const REFILL_STEP: usize = 8;
const REFILL_PAUSE: Duration = Duration::from_millis(1);
/// Subdirectory where new spares are created before they join the pool.
const STAGING: &str = "new";

#[derive(Debug, Default)]
struct State {
    free: Vec<PathBuf>,
    next: u64,
    stop: bool,
}

/// The pool of spare files of a store.
#[derive(Debug)]
pub(crate) struct Spares {
    dir: PathBuf,
    state: Mutex<State>,
    wake: Condvar,
}

impl Spares {
    /// Opens the pool in `dir` (created if missing), adopting the files already there.
    pub(crate) fn open(dir: PathBuf) -> io::Result<Spares> {
        let staging = dir.join(STAGING);
        fs::create_dir_all(&staging)?;
        // Files a crash left half made: gone (their numbers are not reused below). One
        // may vanish meanwhile (renamed by the thread of a store being dropped).
        for entry in fs::read_dir(&staging)? {
            remove_file_if_exists(&entry?.path())?;
        }
        let mut st = State::default();
        for entry in fs::read_dir(&dir)? {
            let entry = entry?;
            if entry.file_name() == STAGING {
                continue;
            }
            match entry
                .file_name()
                .to_str()
                .and_then(|n| n.parse::<u64>().ok())
            {
                Some(n) => {
                    st.next = st.next.max(n + 1);
                    // One a crash left holding bytes (taken and written, not yet
                    // renamed) is removed: `take` hands out files as they are.
                    match entry.metadata() {
                        Ok(m) if m.len() == 0 => st.free.push(entry.path()),
                        Ok(_) => {
                            remove_file_if_exists(&entry.path())?;
                        }
                        // Gone meanwhile (taken by another store on this directory).
                        Err(e) if e.kind() == io::ErrorKind::NotFound => {}
                        Err(e) => return Err(e),
                    }
                }
                None => {
                    warn!(path = %entry.path().display(), "ignoring unexpected file among spare files")
                }
            }
        }
        // Taken from the end: the highest-numbered first.
        st.free
            .sort_by_key(|p| p.file_name().and_then(|n| n.to_str()?.parse::<u64>().ok()));
        Ok(Spares {
            dir,
            state: Mutex::new(st),
            wake: Condvar::new(),
        })
    }

    fn state(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Takes a spare, opened for writing and empty; `None` when the pool is empty (the
    /// caller creates a file as usual). Wakes the refill thread when the pool runs low.
    pub(crate) fn take(&self) -> Option<(PathBuf, File)> {
        loop {
            let path = {
                let mut st = self.state();
                let p = st.free.pop()?;
                if st.free.len() < LOW {
                    self.wake.notify_one();
                }
                p
            };
            // Not `O_TRUNC`: every spare is empty (made so; start-up removes one a crash
            // left holding bytes), and on ext4 truncating a file marks it to be written
            // out when closed, which would put a write of each named LTX file in the
            // device's queue ahead of the next commit's flush.
            match OpenOptions::new().write(true).open(&path) {
                Ok(f) => return Some((path, f)),
                Err(e) => {
                    warn!(path = %path.display(), error = %e, "cannot open a spare file; dropping it");
                    let _ = fs::remove_file(&path);
                }
            }
        }
    }

    /// Creates spares until the pool holds [`TARGET`]. Each is created in `new/` and then
    /// renamed into the pool: creating a file holds its directory's lock while the
    /// inode is allocated (the slow part), which would stall the commit path's rename
    /// out of the pool's directory.
    fn refill(&self) -> io::Result<()> {
        let staging = self.dir.join(STAGING);
        for made in 1.. {
            // In small steps: a burst of allocations competes with the commit path for
            // the CPU (and, on ext4 without a journal, for the inode bitmap).
            if made % REFILL_STEP == 0 {
                std::thread::sleep(REFILL_PAUSE);
            }
            let name = {
                let mut st = self.state();
                if st.stop || st.free.len() >= TARGET {
                    return Ok(());
                }
                st.next += 1;
                (st.next - 1).to_string()
            };
            let new = staging.join(&name);
            OpenOptions::new().write(true).create_new(true).open(&new)?;
            let path = self.dir.join(&name);
            fs::rename(&new, &path)?;
            self.state().free.push(path);
        }
        Ok(())
    }

    /// Starts the `litefs-spares` thread, which refills the pool whenever it runs low,
    /// until [`Spares::stop`] or the pool is dropped.
    pub(crate) fn start(self: &Arc<Self>) -> io::Result<JoinHandle<()>> {
        let weak = Arc::downgrade(self);
        std::thread::Builder::new()
            .name("litefs-spares".into())
            .spawn(move || {
                while let Some(me) = weak.upgrade() {
                    if let Err(e) = me.refill() {
                        warn!(dir = %me.dir.display(), error = %e, "cannot create spare files; LTX files are created as needed");
                    }
                    let st = me.state();
                    let (st, _) = me
                        .wake
                        .wait_timeout_while(st, Duration::from_secs(1), |s| {
                            !s.stop && s.free.len() >= LOW
                        })
                        .unwrap_or_else(|p| p.into_inner());
                    if st.stop {
                        return;
                    }
                }
            })
    }

    /// Asks the refill thread to stop.
    pub(crate) fn stop(&self) {
        self.state().stop = true;
        self.wake.notify_all();
    }
}

/// Writes `bytes` to a file and renames it to `dest`: a spare from `spares` when one is
/// ready, else a new file `tmp`. No fsync. The source is removed on failure.
pub(crate) fn write_renamed(
    spares: Option<&Spares>,
    tmp: &Path,
    dest: &Path,
    bytes: &[u8],
) -> io::Result<()> {
    use std::os::unix::fs::FileExt;
    let (src, f) = match spares.and_then(Spares::take) {
        Some(s) => s,
        None => {
            let f = OpenOptions::new()
                .write(true)
                .create(true)
                .truncate(true)
                .open(tmp)?;
            (tmp.to_path_buf(), f)
        }
    };
    let r = f.write_all_at(bytes, 0).and_then(|()| {
        drop(f);
        fs::rename(&src, dest)
    });
    if r.is_err() {
        let _ = fs::remove_file(&src);
    }
    r
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Spare files in the pool's directory (not counting the staging directory).
    fn spares_in(dir: &Path) -> usize {
        fs::read_dir(dir)
            .unwrap()
            .filter(|e| e.as_ref().unwrap().file_name() != STAGING)
            .count()
    }

    #[test]
    fn spares_are_taken_refilled_and_adopted() {
        let dir = tempfile::tempdir().unwrap();
        let spare_dir = dir.path().join("spare");
        let pool = Spares::open(spare_dir.clone()).unwrap();
        assert!(pool.take().is_none(), "a new pool is empty until refilled");
        pool.refill().unwrap();
        assert_eq!(spares_in(&spare_dir), TARGET);

        // A named file written through the pool takes a spare's inode.
        let dest = dir.path().join("0000000000000001-0000000000000001.ltx");
        let tmp = dir.path().join("x.tmp");
        write_renamed(Some(&pool), &tmp, &dest, b"hello").unwrap();
        assert_eq!(fs::read(&dest).unwrap(), b"hello");
        assert!(!tmp.exists(), "no new file was created");
        assert_eq!(spares_in(&spare_dir), TARGET - 1);

        // A spare left holding bytes by a crash is removed at start-up; an empty one
        // is adopted; a half-made one in staging is removed.
        drop(pool);
        let leftover = spare_dir.join("9999");
        fs::write(&leftover, b"torn LTX bytes").unwrap();
        let adopted = spare_dir.join("9998");
        fs::write(&adopted, b"").unwrap();
        fs::write(spare_dir.join(STAGING).join("10000"), b"").unwrap();
        let pool = Spares::open(spare_dir.clone()).unwrap();
        assert_eq!(
            fs::read_dir(spare_dir.join(STAGING)).unwrap().count(),
            0,
            "a half-made spare is removed"
        );
        assert!(!leftover.exists(), "a spare holding bytes is removed");
        let (path, f) = pool.take().unwrap();
        assert_eq!(path, adopted, "the highest-numbered file is taken first");
        assert_eq!(f.metadata().unwrap().len(), 0);
        drop(f);
        // Written through the pool, a named file holds exactly the new bytes.
        let dest2 = dir.path().join("0000000000000002-0000000000000002.ltx");
        write_renamed(Some(&pool), &tmp, &dest2, b"hi").unwrap();
        assert_eq!(fs::read(&dest2).unwrap(), b"hi");
        while pool.take().is_some() {}
        pool.refill().unwrap();
        let (next, _) = pool.take().unwrap();
        assert!(
            next.file_name()
                .unwrap()
                .to_str()
                .unwrap()
                .parse::<u64>()
                .unwrap()
                > 9999,
            "new spares never reuse an adopted name"
        );
    }

    #[test]
    fn without_spares_a_file_is_created_and_a_failed_write_leaves_nothing() {
        let dir = tempfile::tempdir().unwrap();
        let dest = dir.path().join("a.ltx");
        let tmp = dir.path().join("a.ltx.tmp");
        write_renamed(None, &tmp, &dest, b"x").unwrap();
        assert_eq!(fs::read(&dest).unwrap(), b"x");
        let missing = dir.path().join("no-such-dir/b.ltx");
        assert!(write_renamed(None, &dir.path().join("b.tmp"), &missing, b"y").is_err());
        assert!(!dir.path().join("b.tmp").exists());
    }
}
