//! FUSE over io_uring: requests are served from rings when the kernel offers them (the
//! test script turns `/sys/module/fuse/parameters/enable_uring` on), `fuse.io-uring:
//! false` keeps `/dev/fuse`, SQLite processes on every CPU are served correctly, and
//! an aborted connection still ends litefs cleanly.

use std::os::unix::fs::MetadataExt;
use std::os::unix::process::CommandExt;
use std::path::Path;
use std::process::{Command, Output};
use std::sync::Arc;
use std::time::Duration;

use litefs::fuse::{Mount, MountOptions};
use litefs::store::{Store, StoreOptions};
use rusqlite::Connection;

use crate::support::{Process, is_mounted, wait_until};

const ENABLE_URING: &str = "/sys/module/fuse/parameters/enable_uring";

/// Whether this kernel offers FUSE over io_uring to new mounts; when it does not, the
/// io_uring tests only say so (the test script enables it where the kernel has it).
fn offered(test: &str) -> bool {
    let on = std::fs::read_to_string(ENABLE_URING).is_ok_and(|s| s.trim() == "Y");
    if !on {
        eprintln!("{test}: skipped: {ENABLE_URING} is not Y (needs Linux 6.14+)");
    }
    on
}

/// A store in a temporary directory mounted in this process with `io_uring` on or off.
struct InProcess {
    mount: Option<Mount>,
    store: Arc<Store>,
    mnt: std::path::PathBuf,
    _tmp: tempfile::TempDir,
}

impl InProcess {
    fn start(io_uring: bool) -> InProcess {
        let tmp = tempfile::tempdir().unwrap();
        let mnt = tmp.path().join("mnt");
        let data = tmp.path().join("data");
        let store = Store::open(StoreOptions {
            data_dir: data.clone(),
            retention: Duration::from_secs(600),
            retention_monitor_interval: Duration::from_secs(60),
            node_id: 1,
        })
        .unwrap();
        let mut opts = MountOptions::new(&mnt, &data);
        opts.io_uring = io_uring;
        let mount = Mount::start(&opts, store.clone()).unwrap();
        InProcess {
            mount: Some(mount),
            store,
            mnt,
            _tmp: tmp,
        }
    }

    fn mount(&self) -> &Mount {
        self.mount.as_ref().unwrap()
    }
}

impl Drop for InProcess {
    fn drop(&mut self) {
        if let Some(m) = self.mount.take() {
            let _ = m.unmount(Duration::from_secs(5));
        }
        let _ = self.store.close();
    }
}

/// Runs `sqlite3` pinned to `cpu`, waiting up to 10 s for locks.
fn sqlite3_on(cpu: usize, db: &Path, sql: &str) -> std::process::Child {
    let mut cmd = Command::new("sqlite3");
    cmd.args(["-cmd", ".timeout 10000"]).arg(db).arg(sql);
    // SAFETY: only sched_setaffinity(2), which is async-signal-safe, runs in the child.
    unsafe {
        cmd.pre_exec(move || {
            let mut set: libc::cpu_set_t = std::mem::zeroed();
            libc::CPU_SET(cpu, &mut set);
            if libc::sched_setaffinity(0, size_of::<libc::cpu_set_t>(), &set) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    cmd.stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap()
}

fn success(o: Output, what: &str) -> String {
    assert!(
        o.status.success(),
        "{what}: {}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    );
    String::from_utf8_lossy(&o.stdout).trim().to_string()
}

fn cpus() -> usize {
    std::thread::available_parallelism().map_or(1, |n| n.get())
}

#[test]
fn sqlite_processes_on_every_cpu_are_served_over_io_uring() {
    if !offered("sqlite_processes_on_every_cpu_are_served_over_io_uring") {
        return;
    }
    let node = InProcess::start(true);
    assert!(node.mount().io_uring(), "the kernel offered io_uring");
    for mode in ["wal", "delete"] {
        let db = node.mnt.join(format!("cpus-{mode}.db"));
        let c = Connection::open(&db).unwrap();
        let _: String = c
            .query_row(&format!("PRAGMA journal_mode={mode}"), [], |r| r.get(0))
            .unwrap();
        c.execute_batch("CREATE TABLE t (cpu INTEGER, i INTEGER);")
            .unwrap();
        drop(c);
        let before = node.mount().io_uring_requests();
        // Two writers per CPU, each committing 40 transactions, and a reader per CPU.
        let mut writers = Vec::new();
        for cpu in 0..cpus() {
            for w in 0..2 {
                let mut sql = String::new();
                for i in 0..40 {
                    sql += &format!("INSERT INTO t VALUES ({cpu}, {});\n", w * 1000 + i);
                }
                writers.push(sqlite3_on(cpu, &db, &sql));
            }
        }
        let readers: Vec<_> = (0..cpus())
            .map(|cpu| {
                let sql = "SELECT count(*) FROM t; PRAGMA integrity_check;";
                sqlite3_on(cpu, &db, sql)
            })
            .collect();
        for w in writers {
            success(w.wait_with_output().unwrap(), "writer");
        }
        for r in readers {
            let out = success(r.wait_with_output().unwrap(), "reader");
            assert!(out.ends_with("ok"), "{mode} reader: {out}");
        }
        let out = success(
            sqlite3_on(0, &db, "SELECT count(*), count(DISTINCT cpu) FROM t;")
                .wait_with_output()
                .unwrap(),
            "count",
        );
        assert_eq!(out, format!("{}|{}", cpus() * 80, cpus()), "{mode}");
        let served = node.mount().io_uring_requests() - before;
        // Every commit is several lock requests and writes: nearly all of them came
        // over the rings (FORGET and requests queued before the rings were complete
        // still use /dev/fuse).
        assert!(
            served > (cpus() * 80 * 4) as u64,
            "{mode}: only {served} requests over io_uring"
        );
    }
}

#[test]
fn io_uring_off_serves_everything_from_dev_fuse() {
    let node = InProcess::start(false);
    assert!(!node.mount().io_uring());
    let c = Connection::open(node.mnt.join("off.db")).unwrap();
    c.execute_batch("PRAGMA journal_mode=wal; CREATE TABLE t (x); INSERT INTO t VALUES (1);")
        .unwrap();
    let n: i64 = c
        .query_row("SELECT count(*) FROM t", [], |r| r.get(0))
        .unwrap();
    assert_eq!(n, 1);
    assert_eq!(node.mount().io_uring_requests(), 0);
}

fn config(io_uring: Option<bool>) -> impl Fn(&Path, &Path) -> String {
    move |mnt, data| {
        let mut fuse = format!("fuse:\n  dir: {}\n", mnt.display());
        if let Some(on) = io_uring {
            fuse += &format!("  io-uring: {on}\n");
        }
        format!(
            "{fuse}data:\n  dir: {}\nlease:\n  type: static\n  candidate: true\n  advertise-url: http://127.0.0.1:20202\nhttp:\n  addr: 127.0.0.1:0\n",
            data.display()
        )
    }
}

/// What the mount and unmount log lines say about the transport of a `litefs mount`
/// process that served one SQLite transaction, and the whole log.
fn logged_transport(io_uring: Option<bool>) -> (String, String, String) {
    let mut p = Process::start_with(config(io_uring));
    let c = Connection::open(p.path("t.db")).unwrap();
    c.execute_batch("CREATE TABLE t (x); INSERT INTO t VALUES (1);")
        .unwrap();
    drop(c);
    assert!(p.signal(libc::SIGTERM).success());
    let log = p.log_text();
    let line = |what: &str| {
        log.lines()
            .find(|l| l.contains(what))
            .unwrap_or_else(|| panic!("no {what:?} line in:\n{log}"))
            .to_string()
    };
    (line("mounted"), line("unmounted"), log.clone())
}

#[test]
fn the_log_says_which_transport_serves_the_mount() {
    let (mounted, unmounted, _) = logged_transport(Some(false));
    assert!(mounted.contains("transport=\"/dev/fuse\""), "{mounted}");
    assert!(mounted.contains("fuse.io-uring is off"), "{mounted}");
    assert!(unmounted.contains("io_uring_requests=0"), "{unmounted}");
    // The default uses io_uring when the kernel offers it, and otherwise says how to
    // turn it on.
    let (mounted, unmounted, log) = logged_transport(None);
    if !offered("the_log_says_which_transport_serves_the_mount") {
        assert!(mounted.contains("transport=\"/dev/fuse\""), "{mounted}");
        assert!(log.contains(&format!("echo Y > {ENABLE_URING}")), "{log}");
        return;
    }
    assert!(mounted.contains("transport=\"io_uring\""), "{mounted}");
    let served: u64 = unmounted
        .split("io_uring_requests=")
        .nth(1)
        .and_then(|s| s.split_whitespace().next())
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("{unmounted}"));
    assert!(served > 10, "{unmounted}");
}

/// Over io_uring when the kernel offers it, else over `/dev/fuse`.
#[test]
fn a_fusectl_abort_ends_litefs_and_it_mounts_again() {
    let conns = Path::new("/sys/fs/fuse/connections");
    let mut p = Process::start();
    let minor = libc::minor(std::fs::metadata(&p.mnt).unwrap().dev());
    let abort = conns.join(minor.to_string()).join("abort");
    if !abort.exists() {
        eprintln!("a_fusectl_abort_ends_litefs_and_it_mounts_again: skipped: fusectl not mounted");
        return;
    }
    let c = Connection::open(p.path("a.db")).unwrap();
    c.execute_batch("PRAGMA journal_mode=wal; CREATE TABLE t (x); INSERT INTO t VALUES (1);")
        .unwrap();
    drop(c);
    std::fs::write(&abort, "1").unwrap();
    // litefs sees its connection gone, unmounts and exits.
    let status = p.wait_exit(Duration::from_secs(20));
    assert!(
        status.is_some(),
        "litefs still runs after the abort:\n{}",
        p.log_text()
    );
    assert!(
        p.log_text().contains("the mount was removed from outside"),
        "{}",
        p.log_text()
    );
    assert!(wait_until(Duration::from_secs(10), || !is_mounted(&p.mnt)));
    p.spawn();
    let c = Connection::open(p.path("a.db")).unwrap();
    let n: i64 = c
        .query_row("SELECT count(*) FROM t", [], |r| r.get(0))
        .unwrap();
    assert_eq!(n, 1);
}

/// A file system whose `getattr` answers from another thread, later.
struct DeferredReplies;

impl fuser::Filesystem for DeferredReplies {
    fn getattr(
        &self,
        _req: &fuser::Request,
        ino: fuser::INodeNo,
        _fh: Option<fuser::FileHandle>,
        reply: fuser::ReplyAttr,
    ) {
        std::thread::spawn(move || {
            std::thread::sleep(Duration::from_millis(20));
            let t = std::time::SystemTime::UNIX_EPOCH;
            let attr = fuser::FileAttr {
                ino,
                size: 0,
                blocks: 0,
                atime: t,
                mtime: t,
                ctime: t,
                crtime: t,
                kind: fuser::FileType::Directory,
                perm: 0o751,
                nlink: 2,
                uid: 0,
                gid: 0,
                rdev: 0,
                blksize: 4096,
                flags: 0,
            };
            reply.attr(&Duration::ZERO, &attr);
        });
    }
}

#[test]
fn a_reply_sent_later_from_another_thread_reaches_the_caller_over_io_uring() {
    if !offered("a_reply_sent_later_from_another_thread_reaches_the_caller_over_io_uring") {
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    let mut cfg = fuser::Config::default();
    cfg.mount_options = vec![fuser::MountOption::FSName("deferred".into())];
    cfg.io_uring_threads_per_cpu = 1;
    // Unmounted on drop, also when an assertion fails.
    let session = Unmount(Some(
        fuser::spawn_mount(DeferredReplies, tmp.path(), &cfg).unwrap(),
    ));
    let s = session.0.as_ref().unwrap();
    assert!(matches!(
        s.io_uring_status(Duration::from_secs(10)),
        Some(fuser::IoUringStatus::Active { .. })
    ));
    for _ in 0..5 {
        let mode = std::fs::metadata(tmp.path()).unwrap().mode();
        assert_eq!(mode & 0o777, 0o751);
    }
    assert!(s.io_uring_requests() >= 5);
}

/// Unmounts a `fuser` session when dropped.
struct Unmount(Option<fuser::BackgroundSession>);

impl Drop for Unmount {
    fn drop(&mut self) {
        if let Some(s) = self.0.take() {
            let _ = s.umount_and_join();
        }
    }
}
