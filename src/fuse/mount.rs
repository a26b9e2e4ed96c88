//! Mounting, unmounting, signals and stale mounts.

use std::future::Future;
use std::io;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Arc;
use std::time::{Duration, Instant};

use fuser::{BackgroundSession, Config, IoUringStatus, MountOption, SessionACL};
use tracing::{error, info, warn};

use super::fs::{LiteFs, Shared};
use crate::store::{Store, StoreError};

/// The file system type name: shows up as `litefs` (source) and `fuse.litefs` (type)
/// in `/proc/self/mountinfo`, which is how a stale mount is recognised as ours.
const FS_NAME: &str = "litefs";

/// How the mount is set up (the `fuse` section of the config plus the data dir).
#[derive(Clone, Debug)]
pub struct MountOptions {
    /// Where the file system is mounted (`fuse.dir`); created if missing.
    pub fuse_dir: PathBuf,
    /// The data directory (`data.dir`); `statfs` on the mount reports its file system.
    pub data_dir: PathBuf,
    /// Let users other than the one running litefs use the mount (`fuse.allow-other`).
    pub allow_other: bool,
    /// Log every file-system operation that reaches litefs (`fuse.debug`).
    pub debug: bool,
    /// Leave the file system mounted when litefs exits (`-skip-unmount`, for
    /// debugging; the mount is then stale until `fusermount3 -u`).
    pub skip_unmount: bool,
    /// Kernel request threads reading `/dev/fuse`. More than one lets a commit's fsync
    /// run while other processes keep reading.
    pub threads: usize,
    /// Serve requests over io_uring when the kernel offers it (`fuse.io-uring`): one
    /// queue per CPU, answered by threads pinned to that CPU, so a request is served
    /// on the CPU it was made on. `/dev/fuse` otherwise.
    pub io_uring: bool,
    /// Threads per CPU with io_uring (`fuse.io-uring-threads`); each serves one request
    /// at a time, so more let a slow request (a commit's fsync) not hold up others
    /// made on the same CPU.
    pub io_uring_threads: usize,
}

impl MountOptions {
    /// Options with the defaults for everything but the two directories.
    pub fn new(fuse_dir: impl Into<PathBuf>, data_dir: impl Into<PathBuf>) -> Self {
        MountOptions {
            fuse_dir: fuse_dir.into(),
            data_dir: data_dir.into(),
            allow_other: false,
            debug: false,
            skip_unmount: false,
            threads: 4,
            io_uring: true,
            io_uring_threads: DEFAULT_IO_URING_THREADS,
        }
    }
}

/// Default of [`MountOptions::io_uring_threads`] (see `docs/performance.md`).
pub const DEFAULT_IO_URING_THREADS: usize = 2;

/// Where to turn FUSE over io_uring on (Linux 6.14+ built with `CONFIG_FUSE_IO_URING`).
const ENABLE_URING: &str = "/sys/module/fuse/parameters/enable_uring";

/// Why mounting, running or unmounting failed.
#[derive(Debug, thiserror::Error)]
pub enum MountError {
    /// A stale FUSE mount is in the way and cannot be cleaned up automatically.
    #[error(
        "{dir} is a stale FUSE mount (\"Transport endpoint is not connected\"): {why}; \
         fix it with `fusermount3 -u {dir}` (or `umount -f {dir}`) once no process uses it"
    )]
    StaleMount {
        /// The mount point.
        dir: String,
        /// Why it was not unmounted automatically.
        why: String,
    },
    /// Something is already mounted at the mount point.
    #[error(
        "{dir} is already a mount point ({fstype}); is another litefs running? \
         Stop it, or unmount with `fusermount3 -u {dir}` (or `umount -f {dir}`)"
    )]
    AlreadyMounted {
        /// The mount point.
        dir: String,
        /// Its file system type.
        fstype: String,
    },
    /// The mount point exists and is not a directory.
    #[error("mount point {dir} exists and is not a directory")]
    NotADirectory {
        /// The mount point.
        dir: String,
    },
    /// The mount point cannot be unmounted because processes still use it.
    #[error(
        "cannot unmount {dir}: device or resource busy (processes still have files open \
         there); stop them, then run `fusermount3 -u {dir}` (or `umount -f {dir}`)"
    )]
    Busy {
        /// The mount point.
        dir: String,
    },
    /// An I/O error while preparing, mounting or unmounting.
    #[error("{op} {path}: {source}")]
    Io {
        /// What was being done.
        op: &'static str,
        /// The path involved.
        path: String,
        /// The cause.
        #[source]
        source: io::Error,
    },
    /// A transaction SQLite considers committed could not be captured; the node stopped
    /// (`litefs mount` exits with status 99, as LiteFS does).
    #[error("fatal: {0}")]
    Fatal(String),
    /// The store failed to close cleanly.
    #[error("closing the store: {0}")]
    Store(#[from] StoreError),
}

fn io_err(op: &'static str, path: &Path) -> impl FnOnce(io::Error) -> MountError + use<> {
    let path = path.display().to_string();
    move |source| MountError::Io { op, path, source }
}

/// A mounted file system. Dropping it unmounts (best effort); call
/// [`Mount::unmount`] to see errors.
pub struct Mount {
    session: Option<BackgroundSession>,
    shared: Arc<Shared>,
    dir: PathBuf,
    io_uring: bool,
}

impl std::fmt::Debug for Mount {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Mount").field("dir", &self.dir).finish()
    }
}

impl Mount {
    /// Mounts the store's databases at `opts.fuse_dir` and serves them from background
    /// threads. A stale litefs mount left by a crash is cleaned up first when no
    /// process uses it.
    ///
    /// # Errors
    /// [`MountError`] says what is in the way (stale or live mount, busy, not a
    /// directory) and how to fix it.
    pub fn start(opts: &MountOptions, store: Arc<Store>) -> Result<Mount, MountError> {
        let dir = absolute(&opts.fuse_dir);
        prepare_mount_point(&dir)?;
        let shared = Shared::new(store, opts.data_dir.clone(), opts.debug);
        let mut cfg = Config::default();
        cfg.mount_options = vec![
            MountOption::FSName(FS_NAME.to_string()),
            MountOption::Subtype(FS_NAME.to_string()),
            MountOption::DefaultPermissions,
            MountOption::NoAtime,
        ];
        if opts.allow_other {
            cfg.acl = SessionACL::All;
        }
        cfg.n_threads = Some(opts.threads.max(1));
        cfg.clone_fd = true;
        cfg.io_uring_threads_per_cpu = if opts.io_uring {
            opts.io_uring_threads.max(1)
        } else {
            0
        };
        let session = fuser::spawn_mount(LiteFs::new(shared.clone()), &dir, &cfg).map_err(|e| {
            if e.raw_os_error() == Some(libc::EBUSY) {
                MountError::Busy {
                    dir: dir.display().to_string(),
                }
            } else {
                io_err("mount", &dir)(e)
            }
        })?;
        let _ = shared.notifier.set(session.notifier());
        let io_uring = log_transport(&session, &dir, opts.allow_other);
        Ok(Mount {
            session: Some(session),
            shared,
            dir,
            io_uring,
        })
    }

    /// The mount point.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Whether requests are served over io_uring (see [`MountOptions::io_uring`]).
    pub fn io_uring(&self) -> bool {
        self.io_uring
    }

    /// Requests served over io_uring so far (the others came through `/dev/fuse`).
    pub fn io_uring_requests(&self) -> u64 {
        self.session
            .as_ref()
            .map_or(0, BackgroundSession::io_uring_requests)
    }

    /// The applier a replica hands received LTX files to (see [`ReplicaApplier`]), and
    /// the source of the mount's `.lag`.
    pub fn replica_applier(
        &self,
        lag: Arc<crate::replicate::replica::Lag>,
    ) -> Option<Arc<super::ReplicaApplier>> {
        let notifier = self.session.as_ref()?.notifier();
        self.shared.set_lag(lag);
        Some(Arc::new(super::ReplicaApplier {
            shared: self.shared.clone(),
            notifier,
            mount_dir: self.dir.clone(),
        }))
    }

    /// The primary side of write forwarding: this mount's lock table and apply path,
    /// for the node's [`crate::halt::HaltRegistry`].
    pub fn halt_host(&self) -> Arc<super::PrimaryHalt> {
        Arc::new(super::PrimaryHalt {
            shared: self.shared.clone(),
        })
    }

    /// The replica side of write forwarding: how `<db>-lock` reaches the primary.
    pub fn set_halt_client(&self, client: Arc<dyn crate::halt::HaltClient>) {
        self.shared.set_halt_client(client);
    }

    /// Sets what `.primary` shows on a replica (`None` before the primary is known).
    pub fn set_primary_hostname(&self, hostname: Option<String>) {
        self.shared.set_primary_hostname(hostname);
    }

    /// Why the node must stop, once a transaction SQLite considers committed could not
    /// be captured ([`run`] then exits with [`MountError::Fatal`]).
    pub fn fatal(&self) -> Option<String> {
        self.shared.fatal()
    }

    /// Whether the kernel connection is still served (false after an external
    /// `fusermount3 -u` or `umount`).
    pub fn is_alive(&self) -> bool {
        self.session
            .as_ref()
            .is_some_and(|s| !s.guard.is_finished())
    }

    /// Unmounts and waits for the request threads to finish. While processes keep
    /// files open it retries for up to `busy_wait`, then detaches lazily (those
    /// processes get `ENOTCONN`) and reports [`MountError::Busy`].
    ///
    /// # Errors
    /// [`MountError::Busy`] after a lazy detach, or the unmount's I/O error.
    pub fn unmount(mut self, busy_wait: Duration) -> Result<(), MountError> {
        self.unmount_inner(busy_wait)
    }

    fn unmount_inner(&mut self, busy_wait: Duration) -> Result<(), MountError> {
        let Some(session) = self.session.take() else {
            return Ok(());
        };
        if session.guard.is_finished() {
            // Unmounted from outside; just collect the thread.
            return session.join().map_err(io_err("join", &self.dir));
        }
        let deadline = Instant::now() + busy_wait;
        loop {
            match umount(&self.dir) {
                Ok(()) => break,
                Err(e) if e.raw_os_error() == Some(libc::EBUSY) && Instant::now() < deadline => {
                    std::thread::sleep(Duration::from_millis(100));
                }
                Err(e) if e.raw_os_error() == Some(libc::EBUSY) => {
                    let dir = self.dir.display().to_string();
                    warn!(dir, "mount point busy; detaching lazily");
                    lazy_unmount(&self.dir).map_err(io_err("lazy unmount", &self.dir))?;
                    // The request threads keep serving the open files until they close.
                    drop(session);
                    return Err(MountError::Busy { dir });
                }
                // Already gone (unmounted from outside between the check and now).
                Err(e) if e.raw_os_error() == Some(libc::EINVAL) => break,
                Err(e) => return Err(io_err("unmount", &self.dir)(e)),
            }
        }
        let io_uring_requests = session.io_uring_requests();
        session.join().map_err(io_err("join", &self.dir))?;
        info!(dir = %self.dir.display(), io_uring_requests, "unmounted");
        Ok(())
    }
}

impl Drop for Mount {
    fn drop(&mut self) {
        if let Err(e) = self.unmount_inner(Duration::from_secs(2)) {
            error!(error = %e, "unmount on drop failed");
        }
    }
}

/// Logs the mount and how requests reach litefs (once the rings registered); returns
/// whether that is io_uring.
fn log_transport(session: &BackgroundSession, dir: &Path, allow_other: bool) -> bool {
    let dir = dir.display();
    match session.io_uring_status(Duration::from_secs(10)) {
        Some(IoUringStatus::Active {
            queues,
            threads_per_queue,
        }) => {
            info!(%dir, allow_other, transport = "io_uring", queues, threads_per_queue, "mounted");
            return true;
        }
        Some(IoUringStatus::Off) => {
            info!(%dir, allow_other, transport = "/dev/fuse", "mounted (fuse.io-uring is off)");
        }
        Some(IoUringStatus::NotOffered) => {
            info!(%dir, allow_other, transport = "/dev/fuse", "mounted");
            info!(
                "FUSE over io_uring is not offered by the kernel; it needs Linux 6.14+ built \
                 with CONFIG_FUSE_IO_URING, enabled by root with `echo Y > {ENABLE_URING}` \
                 (before mounting); requests are served from /dev/fuse"
            );
        }
        Some(IoUringStatus::Failed(why)) => {
            info!(%dir, allow_other, transport = "/dev/fuse", "mounted");
            warn!(
                why,
                "FUSE over io_uring could not be set up; requests are served from /dev/fuse"
            );
        }
        // Not expected: the rings register without waiting for anything.
        Some(_) | None => {
            warn!(%dir, allow_other, "mounted; FUSE over io_uring still not set up after 10 s");
        }
    }
    false
}

/// Mounts, serves until `shutdown` resolves (or the mount is removed from outside, or
/// a committed transaction could not be captured), then unmounts and closes the
/// store. This is what `litefs mount` runs.
///
/// `shutdown` is first polled once the file system is mounted, and is dropped before
/// it is unmounted, so it may run work that needs the mount (`exec`'s application)
/// and stop that work when dropped.
///
/// # Errors
/// Mount problems ([`MountError`]), a busy mount point at shutdown, the store
/// failing to close, or [`MountError::Fatal`] (exit status 99).
pub async fn run(
    opts: MountOptions,
    store: Arc<Store>,
    shutdown: impl Future<Output = ()>,
) -> Result<(), MountError> {
    run_with(opts, store, shutdown, |_| {}).await
}

/// As [`run`], calling `on_mount` once the file system is mounted (a replica starts
/// its replication loop there, with [`Mount::replica_applier`]).
///
/// # Errors
/// As [`run`].
pub async fn run_with(
    opts: MountOptions,
    store: Arc<Store>,
    shutdown: impl Future<Output = ()>,
    on_mount: impl FnOnce(&Mount),
) -> Result<(), MountError> {
    let mount = Mount::start(&opts, store.clone())?;
    on_mount(&mount);
    let mut shutdown = Box::pin(shutdown);
    let mut fatal = None;
    let mut tick = tokio::time::interval(Duration::from_millis(250));
    loop {
        tokio::select! {
            _ = &mut shutdown => {
                info!("shutting down");
                break;
            }
            _ = tick.tick() => {
                if let Some(why) = mount.fatal() {
                    fatal = Some(why);
                    break;
                }
                if !mount.is_alive() {
                    warn!(dir = %opts.fuse_dir.display(), "the mount was removed from outside");
                    break;
                }
            }
        }
    }
    drop(shutdown);
    if opts.skip_unmount {
        warn!(dir = %opts.fuse_dir.display(), "-skip-unmount: leaving the file system mounted");
        store.close()?;
        std::mem::forget(mount);
        return Ok(());
    }
    let unmounted = tokio::task::spawn_blocking(move || mount.unmount(Duration::from_secs(5)))
        .await
        .map_err(|e| MountError::Io {
            op: "unmount",
            path: opts.fuse_dir.display().to_string(),
            source: io::Error::other(e),
        })?;
    let closed = store.close();
    if let Some(why) = fatal {
        return Err(MountError::Fatal(why));
    }
    unmounted?;
    closed?;
    info!("store closed");
    Ok(())
}

/// Checks the mount point before anything else touches the data directory: creates
/// it if missing, clears a stale litefs mount nobody uses, and refuses a live mount
/// (another litefs on the same directories must not see its store recovered under it).
/// [`Mount::start`] does the same; calling this first keeps a refused start from
/// opening the store at all.
///
/// # Errors
/// As [`Mount::start`] for the mount point.
pub fn prepare(opts: &MountOptions) -> Result<(), MountError> {
    prepare_mount_point(&absolute(&opts.fuse_dir))
}

fn absolute(p: &Path) -> PathBuf {
    // canonicalize() fails on a stale mount point itself, so only its parent is
    // resolved.
    let p = std::path::absolute(p).unwrap_or_else(|_| p.to_path_buf());
    match (p.parent(), p.file_name()) {
        (Some(parent), Some(name)) => parent
            .canonicalize()
            .map(|c| c.join(name))
            .unwrap_or(p.clone()),
        _ => p,
    }
}

/// One line of `/proc/self/mountinfo` that matters here.
#[derive(Debug, PartialEq, Eq)]
struct MountEntry {
    fstype: String,
    source: String,
}

/// Finds the mount at exactly `dir`, if any (the last one wins when mounts are
/// stacked, as the kernel shows the top one).
fn mount_at(dir: &Path) -> io::Result<Option<MountEntry>> {
    let info = std::fs::read_to_string("/proc/self/mountinfo")?;
    Ok(parse_mountinfo(&info, dir))
}

fn parse_mountinfo(info: &str, dir: &Path) -> Option<MountEntry> {
    let want = dir.to_string_lossy();
    let mut found = None;
    for line in info.lines() {
        let fields: Vec<&str> = line.split(' ').collect();
        let Some(sep) = fields.iter().position(|f| *f == "-") else {
            continue;
        };
        if fields.len() < 5 || fields.len() < sep + 3 {
            continue;
        }
        if unescape_mountinfo(fields[4]) == want {
            found = Some(MountEntry {
                fstype: fields[sep + 1].to_string(),
                source: unescape_mountinfo(fields[sep + 2]),
            });
        }
    }
    found
}

/// mountinfo escapes space, tab, newline and backslash as `\ooo`.
fn unescape_mountinfo(s: &str) -> String {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'\\'
            && i + 3 < b.len()
            && b[i + 1..i + 4].iter().all(|c| (b'0'..=b'7').contains(c))
        {
            out.push((b[i + 1] - b'0') * 64 + (b[i + 2] - b'0') * 8 + (b[i + 3] - b'0'));
            i += 4;
        } else {
            out.push(b[i]);
            i += 1;
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

fn is_ours(m: &MountEntry) -> bool {
    // Mounted directly by root the type is plain `fuse`; through fusermount3 it
    // carries the subtype.
    m.source == FS_NAME && (m.fstype == "fuse" || m.fstype == format!("fuse.{FS_NAME}"))
}

/// Processes with an open file, a working directory or a root under `dir`.
fn users_of(dir: &Path) -> Vec<u32> {
    let mut pids = Vec::new();
    let Ok(procs) = std::fs::read_dir("/proc") else {
        return pids;
    };
    let inside = |p: &Path| p == dir || p.starts_with(dir);
    for p in procs.flatten() {
        let Some(pid) = p.file_name().to_str().and_then(|s| s.parse::<u32>().ok()) else {
            continue;
        };
        let base = p.path();
        let mut uses = ["cwd", "root"]
            .iter()
            .any(|l| std::fs::read_link(base.join(l)).is_ok_and(|t| inside(&t)));
        if !uses && let Ok(fds) = std::fs::read_dir(base.join("fd")) {
            uses = fds
                .flatten()
                .any(|fd| std::fs::read_link(fd.path()).is_ok_and(|t| inside(&t)));
        }
        if uses {
            pids.push(pid);
        }
    }
    pids
}

fn prepare_mount_point(dir: &Path) -> Result<(), MountError> {
    let shown = dir.display().to_string();
    match std::fs::metadata(dir) {
        Ok(m) if m.is_dir() => match mount_at(dir).map_err(io_err("read mountinfo", dir))? {
            // The kernel answers stat() of a dead FUSE mount from its attribute cache
            // for a while; opendir always asks the server.
            Some(entry)
                if entry.fstype.starts_with("fuse")
                    && std::fs::read_dir(dir).is_err_and(|e| is_disconnected(&e)) =>
            {
                clear_stale_mount(dir, Some(entry))
            }
            Some(entry) => Err(MountError::AlreadyMounted {
                dir: shown,
                fstype: entry.fstype,
            }),
            None => Ok(()),
        },
        Ok(_) => Err(MountError::NotADirectory { dir: shown }),
        Err(e) if e.kind() == io::ErrorKind::NotFound => {
            std::fs::create_dir_all(dir).map_err(io_err("create mount point", dir))?;
            info!(dir = shown, "created mount point");
            Ok(())
        }
        Err(e) if is_disconnected(&e) => {
            let entry = mount_at(dir).map_err(io_err("read mountinfo", dir))?;
            clear_stale_mount(dir, entry)
        }
        Err(e) => Err(io_err("stat mount point", dir)(e)),
    }
}

/// The error of a request to a FUSE mount whose daemon is gone: `ENOTCONN`; over
/// io_uring, a request made while the kernel tears down the dead daemon's rings (a
/// moment after its death) fails with `ECONNABORTED` if it waited for a ring entry, or
/// `ECANCELED` if it was handed to an entry of a ring whose thread had died.
fn is_disconnected(e: &io::Error) -> bool {
    matches!(
        e.raw_os_error(),
        Some(libc::ENOTCONN | libc::ECONNABORTED | libc::ECANCELED)
    )
}

/// A dead FUSE mount is at `dir`: unmount it lazily when it is ours and unused,
/// otherwise explain what to do.
fn clear_stale_mount(dir: &Path, entry: Option<MountEntry>) -> Result<(), MountError> {
    let shown = dir.display().to_string();
    let why = match &entry {
        Some(m) if !is_ours(m) => Some(format!(
            "it is a {} mount from {}, not litefs",
            m.fstype, m.source
        )),
        None => Some("it is not listed in /proc/self/mountinfo".to_string()),
        Some(_) => {
            let users = users_of(dir);
            (!users.is_empty()).then(|| format!("processes {users:?} still use it"))
        }
    };
    if let Some(why) = why {
        return Err(MountError::StaleMount { dir: shown, why });
    }
    warn!(
        dir = shown,
        "found a stale litefs mount left by a crash and unused; unmounting it lazily"
    );
    lazy_unmount(dir).map_err(|e| MountError::StaleMount {
        dir: shown.clone(),
        why: format!("`fusermount3 -uz` failed: {e}"),
    })?;
    match std::fs::metadata(dir) {
        Ok(m) if m.is_dir() => Ok(()),
        Ok(_) => Err(MountError::NotADirectory { dir: shown }),
        Err(e) => Err(io_err("stat mount point", dir)(e)),
    }
}

fn umount(dir: &Path) -> io::Result<()> {
    use std::os::unix::ffi::OsStrExt;
    let c = std::ffi::CString::new(dir.as_os_str().as_bytes())
        .map_err(|_| io::Error::from(io::ErrorKind::InvalidInput))?;
    // SAFETY: `c` is a valid NUL-terminated path.
    if unsafe { libc::umount2(c.as_ptr(), 0) } == 0 {
        return Ok(());
    }
    let err = io::Error::last_os_error();
    if err.raw_os_error() == Some(libc::EPERM) {
        // Not root: only the setuid helper may unmount.
        return run_fusermount(&["-u"], dir);
    }
    Err(err)
}

fn lazy_unmount(dir: &Path) -> io::Result<()> {
    run_fusermount(&["-u", "-z"], dir)
}

fn run_fusermount(args: &[&str], dir: &Path) -> io::Result<()> {
    let out = Command::new("fusermount3")
        .args(args)
        .arg("--")
        .arg(dir)
        .output()?;
    if out.status.success() {
        Ok(())
    } else {
        Err(io::Error::other(format!(
            "fusermount3 {}: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        )))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const INFO: &str = "\
22 1 8:1 / / rw,relatime shared:1 - ext4 /dev/sda1 rw
60 22 0:50 / /tmp/with\\040space rw,nosuid,nodev,relatime shared:30 - fuse.litefs litefs rw,user_id=0,group_id=0
61 22 0:51 / /mnt/other rw - fuse.sshfs host:/x rw
";

    #[test]
    fn mountinfo_finds_the_mount_at_a_path_with_escapes() {
        assert_eq!(
            parse_mountinfo(INFO, Path::new("/tmp/with space")),
            Some(MountEntry {
                fstype: "fuse.litefs".into(),
                source: "litefs".into()
            })
        );
        assert!(is_ours(
            &parse_mountinfo(INFO, Path::new("/tmp/with space")).unwrap()
        ));
        assert!(!is_ours(
            &parse_mountinfo(INFO, Path::new("/mnt/other")).unwrap()
        ));
        assert_eq!(parse_mountinfo(INFO, Path::new("/tmp")), None);
    }

    #[test]
    fn a_regular_directory_is_accepted_and_a_missing_one_created() {
        let tmp = tempfile::tempdir().unwrap();
        prepare_mount_point(tmp.path()).unwrap();
        let sub = tmp.path().join("a/b");
        prepare_mount_point(&sub).unwrap();
        assert!(sub.is_dir());
        let file = tmp.path().join("f");
        std::fs::write(&file, b"x").unwrap();
        assert!(matches!(
            prepare_mount_point(&file),
            Err(MountError::NotADirectory { .. })
        ));
    }

    #[test]
    fn an_existing_mount_point_is_refused_with_a_fix() {
        // /proc is always a mount point.
        let err = prepare_mount_point(Path::new("/proc")).unwrap_err();
        let msg = err.to_string();
        assert!(matches!(err, MountError::AlreadyMounted { .. }), "{msg}");
        assert!(msg.contains("fusermount3 -u /proc"), "{msg}");
    }
}
