//! The FUSE mount with real SQLite: file operations, locks, journal modes, the LTX
//! chain, and the mount lifecycle of the `litefs` process.

use std::fs;
use std::io::Read;
use std::os::unix::fs::MetadataExt;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::Duration;

use rusqlite::Connection;

use crate::support::{Node, Process, apply_chain, is_mounted, wait_until};

const MODES: [&str; 4] = ["delete", "truncate", "persist", "wal"];
const PAGE_SIZES: [u32; 3] = [1024, 4096, 65536];

fn open(path: &Path, mode: &str, page_size: u32) -> Connection {
    let c = Connection::open(path).unwrap();
    c.pragma_update(None, "page_size", page_size).unwrap();
    let got: String = c
        .query_row(&format!("PRAGMA journal_mode={mode}"), [], |r| r.get(0))
        .unwrap();
    assert_eq!(got, mode);
    c
}

fn integrity(c: &Connection) -> String {
    c.query_row("PRAGMA integrity_check", [], |r| r.get(0))
        .unwrap()
}

/// Creates, inserts, updates, deletes, indexes, stores overflowing blobs and vacuums.
fn workload(c: &Connection) {
    c.execute_batch("CREATE TABLE t (id INTEGER PRIMARY KEY, name TEXT, n INTEGER, blob BLOB);")
        .unwrap();
    for batch in 0..5 {
        let tx = c.unchecked_transaction().unwrap();
        for i in 0..40 {
            let id = batch * 40 + i;
            tx.execute(
                "INSERT INTO t (id, name, n, blob) VALUES (?1, ?2, ?3, zeroblob(?4))",
                rusqlite::params![id, format!("row-{id}"), id * 7, (id % 3) * 100],
            )
            .unwrap();
        }
        tx.commit().unwrap();
    }
    c.execute(
        "UPDATE t SET name = name || '-updated' WHERE id % 2 = 0",
        [],
    )
    .unwrap();
    c.execute("DELETE FROM t WHERE id % 5 = 0", []).unwrap();
    c.execute_batch("CREATE INDEX t_name ON t (name);").unwrap();
    // Blobs larger than any page size: overflow page chains.
    let big: Vec<u8> = (0..200_000u32).map(|i| (i * 31 % 251) as u8).collect();
    for id in 1000..1003 {
        c.execute(
            "INSERT INTO t (id, name, n, blob) VALUES (?1, 'big', 0, ?2)",
            rusqlite::params![id, big],
        )
        .unwrap();
    }
    c.execute("DELETE FROM t WHERE id = 1001", []).unwrap();
    c.execute_batch("VACUUM;").unwrap();
    c.execute(
        "INSERT INTO t (id, name, n) VALUES (5000, 'after vacuum', 1)",
        [],
    )
    .unwrap();
}

fn checkpoint(c: &Connection) {
    // Bring the WAL's content into the database file so the file can be compared
    // with the replayed chain (no-op in rollback modes).
    let _: (i64, i64, i64) = c
        .query_row("PRAGMA wal_checkpoint(TRUNCATE)", [], |r| {
            Ok((r.get(0)?, r.get(1)?, r.get(2)?))
        })
        .unwrap();
}

fn assert_chain_reproduces(node: &Node, db: &str) {
    let files = node.ltx_files(db);
    let (replayed, pos) = apply_chain(&files);
    let actual = fs::read(node.data_db(db)).unwrap();
    assert_eq!(
        replayed.len(),
        actual.len(),
        "{db}: size differs from replayed chain"
    );
    assert!(
        replayed == actual,
        "{db}: content differs from replayed chain"
    );
    let shown = fs::read_to_string(node.path(&format!("{db}-pos"))).unwrap();
    assert_eq!(
        shown,
        format!("{pos}\n"),
        "{db}-pos is not the last LTX position"
    );
}

#[test]
fn workload_in_every_journal_mode_and_page_size_is_captured_exactly() {
    let node = Node::start();
    for mode in MODES {
        for ps in PAGE_SIZES {
            let name = format!("{mode}-{ps}.db");
            let c = open(&node.path(&name), mode, ps);
            workload(&c);
            checkpoint(&c);
            assert_eq!(integrity(&c), "ok", "{name}");
            let page_size: u32 = c.query_row("PRAGMA page_size", [], |r| r.get(0)).unwrap();
            assert_eq!(page_size, ps, "{name}");
            drop(c);
            // The mount shows exactly the bytes of the real file.
            assert_eq!(
                fs::read(node.path(&name)).unwrap(),
                fs::read(node.data_db(&name)).unwrap(),
                "{name}"
            );
            assert_chain_reproduces(&node, &name);
        }
    }
}

#[test]
fn data_survives_a_remount() {
    let mut node = Node::start();
    for mode in ["delete", "wal"] {
        let c = open(&node.path(&format!("{mode}.db")), mode, 4096);
        c.execute_batch("CREATE TABLE t (x); INSERT INTO t VALUES (1), (2), (3);")
            .unwrap();
    }
    node.restart();
    for mode in ["delete", "wal"] {
        let c = Connection::open(node.path(&format!("{mode}.db"))).unwrap();
        let n: i64 = c
            .query_row("SELECT sum(x) FROM t", [], |r| r.get(0))
            .unwrap();
        assert_eq!(n, 6, "{mode}");
        assert_eq!(integrity(&c), "ok");
    }
}

#[test]
fn ls_shows_databases_side_files_and_pos_but_no_primary_on_a_primary() {
    let node = Node::start();
    let c = open(&node.path("app.db"), "wal", 4096);
    c.execute_batch("CREATE TABLE t (x); INSERT INTO t VALUES (1);")
        .unwrap();
    let out = Command::new("ls")
        .arg("-a")
        .arg(&node.mnt)
        .output()
        .unwrap();
    assert!(out.status.success());
    let names: Vec<String> = String::from_utf8(out.stdout)
        .unwrap()
        .lines()
        .map(str::to_string)
        .collect();
    for want in ["app.db", "app.db-wal", "app.db-shm", "app.db-pos"] {
        assert!(
            names.iter().any(|n| n == want),
            "{want} missing in {names:?}"
        );
    }
    assert!(!names.iter().any(|n| n == ".primary"), "{names:?}");
    assert!(!node.path(".primary").exists());
    // Inode numbers are stable.
    let a = fs::metadata(node.path("app.db")).unwrap().ino();
    let b = fs::metadata(node.path("app.db")).unwrap().ino();
    assert_eq!(a, b);
    // -pos is read-only and well-formed.
    let pos = fs::read_to_string(node.path("app.db-pos")).unwrap();
    assert_eq!(pos.len(), 34, "{pos:?}");
    assert!(pos.ends_with('\n') && pos.as_bytes()[16] == b'/', "{pos:?}");
    assert!(fs::write(node.path("app.db-pos"), b"x").is_err());
    // statfs reports the data dir's file system.
    let blocks = |p: &Path| {
        let o = Command::new("stat")
            .args(["-f", "-c", "%b %S"])
            .arg(p)
            .output()
            .unwrap();
        assert!(o.status.success(), "{o:?}");
        String::from_utf8(o.stdout).unwrap()
    };
    assert_eq!(blocks(&node.mnt), blocks(&node.data));
    // chmod and utimens work as on a local disk (`touch`, `chmod`, `cp -p`).
    drop(c);
    for args in [
        &["chmod", "600"][..],
        &["touch", "-d", "2020-01-02 03:04:05"],
    ] {
        let st = Command::new(args[0])
            .args(&args[1..])
            .arg(node.path("app.db"))
            .status()
            .unwrap();
        assert!(st.success(), "{args:?}");
    }
    let meta = fs::metadata(node.path("app.db")).unwrap();
    assert_eq!(meta.mode() & 0o777, 0o600);
    assert_eq!(
        meta.mtime(),
        fs::metadata(node.data_db("app.db")).unwrap().mtime()
    );
    let tmp = tempfile::tempdir().unwrap();
    let st = Command::new("cp")
        .arg("-p")
        .arg(node.path("app.db"))
        .arg(tmp.path().join("copy.db"))
        .status()
        .unwrap();
    assert!(st.success());
    let copied = fs::metadata(tmp.path().join("copy.db")).unwrap();
    assert_eq!(copied.mtime(), meta.mtime());
}

#[test]
fn directories_and_database_renames_are_refused_side_file_renames_work() {
    let node = Node::start();
    let c = open(&node.path("a.db"), "delete", 4096);
    c.execute_batch("CREATE TABLE t (x);").unwrap();
    drop(c);
    let e = fs::create_dir(node.path("sub")).unwrap_err();
    assert_eq!(e.raw_os_error(), Some(libc::EPERM));
    let e = fs::rename(node.path("a.db"), node.path("b.db")).unwrap_err();
    assert_eq!(e.raw_os_error(), Some(libc::EXDEV));
    // `mv` falls back to copy + unlink.
    let st = Command::new("mv")
        .arg(node.path("a.db"))
        .arg(node.path("b.db"))
        .status()
        .unwrap();
    assert!(st.success());
    assert!(!node.path("a.db").exists());
    let c = Connection::open(node.path("b.db")).unwrap();
    assert_eq!(integrity(&c), "ok");
    drop(c);
    // A side file renamed onto another database's side file.
    let c = open(&node.path("c.db"), "delete", 4096);
    c.execute_batch("CREATE TABLE t (x);").unwrap();
    drop(c);
    fs::write(node.path("b.db-shm"), b"0123").unwrap();
    fs::rename(node.path("b.db-shm"), node.path("c.db-shm")).unwrap();
    assert!(!node.path("b.db-shm").exists());
    assert_eq!(fs::read(node.path("c.db-shm")).unwrap(), b"0123");
    fs::remove_file(node.path("c.db-shm")).unwrap();
    assert!(!node.path("c.db-shm").exists());
    // Side files of different kinds cannot trade places.
    fs::write(node.path("c.db-shm"), b"").unwrap();
    let e = fs::rename(node.path("c.db-shm"), node.path("c.db-wal")).unwrap_err();
    assert_eq!(e.raw_os_error(), Some(libc::EXDEV));
}

#[test]
fn cp_out_of_the_mount_and_sqlite3_backup_into_it() {
    let node = Node::start();
    let c = open(&node.path("src.db"), "wal", 4096);
    workload(&c);
    checkpoint(&c);
    drop(c);
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("copy.db");
    let st = Command::new("cp")
        .arg(node.path("src.db"))
        .arg(&out)
        .status()
        .unwrap();
    assert!(st.success());
    let copy = Connection::open(&out).unwrap();
    assert_eq!(integrity(&copy), "ok");
    let n: i64 = copy
        .query_row("SELECT count(*) FROM t", [], |r| r.get(0))
        .unwrap();
    assert!(n > 100);
    drop(copy);

    // .backup from a plain file into a new database in the mount.
    let o = Command::new("sqlite3")
        .arg(&out)
        .arg(format!(".backup '{}'", node.path("backup.db").display()))
        .output()
        .unwrap();
    assert!(o.status.success(), "{o:?}");
    let b = Connection::open(node.path("backup.db")).unwrap();
    assert_eq!(integrity(&b), "ok");
    let m: i64 = b
        .query_row("SELECT count(*) FROM t", [], |r| r.get(0))
        .unwrap();
    assert_eq!(m, n);
    drop(b);
    assert_chain_reproduces(&node, "backup.db");

    // cp into the mount creates a database too.
    let st = Command::new("cp")
        .arg(&out)
        .arg(node.path("copied-in.db"))
        .status()
        .unwrap();
    assert!(st.success());
    assert_eq!(
        fs::read(node.path("copied-in.db")).unwrap(),
        fs::read(&out).unwrap()
    );
    assert_chain_reproduces(&node, "copied-in.db");
}

#[test]
fn unlinking_a_database_removes_it_and_its_side_files() {
    let node = Node::start();
    let c = open(&node.path("gone.db"), "wal", 4096);
    c.execute_batch("CREATE TABLE t (x); INSERT INTO t VALUES (1);")
        .unwrap();
    drop(c);
    fs::remove_file(node.path("gone.db")).unwrap();
    assert!(!node.path("gone.db").exists());
    assert!(!node.path("gone.db-pos").exists());
    assert!(node.store().db("gone.db").is_none());
    // The name can be used again for a fresh database.
    let c = open(&node.path("gone.db"), "delete", 1024);
    let n: i64 = c
        .query_row("SELECT count(*) FROM sqlite_master", [], |r| r.get(0))
        .unwrap();
    assert_eq!(n, 0);
}

fn sqlite3_cli(db: &Path, sql: &str) -> std::process::Output {
    Command::new("sqlite3").arg(db).arg(sql).output().unwrap()
}

#[test]
fn locks_are_served_across_processes_in_both_journal_modes() {
    let node = Node::start();
    for mode in ["delete", "wal"] {
        let path = node.path(&format!("locks-{mode}.db"));
        let c = open(&path, mode, 4096);
        c.execute_batch("CREATE TABLE t (x);").unwrap();
        c.execute_batch("BEGIN IMMEDIATE; INSERT INTO t VALUES (1);")
            .unwrap();
        // Another process cannot write while this one holds RESERVED / WRITE...
        let o = sqlite3_cli(&path, "INSERT INTO t VALUES (2);");
        assert!(!o.status.success(), "{mode}: second writer got in");
        let err = String::from_utf8_lossy(&o.stderr);
        assert!(err.contains("database is locked"), "{mode}: {err}");
        // ...but can read the committed state.
        let o = sqlite3_cli(&path, "SELECT count(*) FROM t;");
        assert!(o.status.success(), "{mode}: {o:?}");
        assert_eq!(String::from_utf8_lossy(&o.stdout).trim(), "0");
        c.execute_batch("COMMIT;").unwrap();
        let o = sqlite3_cli(&path, "INSERT INTO t VALUES (2); SELECT count(*) FROM t;");
        assert!(o.status.success(), "{mode}: {o:?}");
        assert_eq!(String::from_utf8_lossy(&o.stdout).trim(), "2");
    }
}

#[test]
fn exclusive_locking_mode_with_wal_is_refused() {
    let node = Node::start();
    let c = Connection::open(node.path("excl.db")).unwrap();
    c.execute_batch("CREATE TABLE t (x);").unwrap();
    let _: String = c
        .query_row("PRAGMA locking_mode=EXCLUSIVE", [], |r| r.get(0))
        .unwrap();
    let r = c
        .query_row("PRAGMA journal_mode=WAL", [], |r| r.get::<_, String>(0))
        .and_then(|_| c.execute("INSERT INTO t VALUES (1)", []));
    let err = r.expect_err("a WAL write in exclusive locking mode must fail");
    assert!(err.to_string().contains("disk I/O error"), "{err}");
}

#[test]
fn rollbacks_savepoints_and_failed_transactions_produce_no_ltx() {
    let node = Node::start();
    for mode in ["delete", "truncate", "persist", "wal"] {
        let name = format!("rb-{mode}.db");
        let c = open(&node.path(&name), mode, 4096);
        c.execute_batch("CREATE TABLE t (x UNIQUE); INSERT INTO t VALUES (1);")
            .unwrap();
        let before = node.ltx_files(&name);
        assert!(!before.is_empty(), "{name}: commits produced no LTX");
        // Explicit rollback of a transaction that wrote pages.
        c.execute_batch(
            "BEGIN;
             WITH RECURSIVE s(i) AS (SELECT 100 UNION ALL SELECT i + 1 FROM s WHERE i < 2000)
             INSERT INTO t SELECT i FROM s;
             ROLLBACK;",
        )
        .unwrap();
        c.execute_batch("BEGIN; INSERT INTO t VALUES (2); ROLLBACK;")
            .unwrap();
        // A savepoint rolled back inside a transaction that is rolled back too.
        c.execute_batch(
            "BEGIN; SAVEPOINT s; INSERT INTO t VALUES (3); ROLLBACK TO s; RELEASE s; ROLLBACK;",
        )
        .unwrap();
        // A statement failing half-way (constraint) in an explicit transaction.
        c.execute_batch("BEGIN;").unwrap();
        assert!(c.execute_batch("INSERT INTO t VALUES (4), (1);").is_err());
        c.execute_batch("ROLLBACK;").unwrap();
        assert_eq!(node.ltx_files(&name), before, "{name}");
        let n: i64 = c
            .query_row("SELECT count(*) FROM t", [], |r| r.get(0))
            .unwrap();
        assert_eq!(n, 1);
        checkpoint(&c);
        drop(c);
        assert_chain_reproduces(&node, &name);
    }
}

const READER_PY: &str = r#"
import sqlite3, sys, time
path, seconds, total = sys.argv[1], float(sys.argv[2]), int(sys.argv[3])
c = sqlite3.connect(path, timeout=0.05, isolation_level=None)
ok = busy = 0
end = time.time() + seconds
while time.time() < end:
    try:
        s, n = c.execute("SELECT sum(balance), count(*) FROM accounts").fetchone()
        if s != total or n != 100:
            print(f"TORN sum={s} count={n}", flush=True)
            sys.exit(3)
        ok += 1
    except sqlite3.OperationalError as e:
        if "locked" in str(e) or "busy" in str(e):
            busy += 1
        else:
            print(f"ERROR {e}", flush=True)
            sys.exit(4)
print(f"ok={ok} busy={busy}", flush=True)
"#;

const WRITER_PY: &str = r#"
import sqlite3, sys, time, random
path, seconds = sys.argv[1], float(sys.argv[2])
c = sqlite3.connect(path, timeout=5, isolation_level=None)
commits = 0
end = time.time() + seconds
rnd = random.Random(1)
while time.time() < end:
    a, b, amt = rnd.randrange(100), rnd.randrange(100), rnd.randrange(1, 50)
    try:
        c.execute("BEGIN IMMEDIATE")
        c.execute("UPDATE accounts SET balance = balance - ? WHERE id = ?", (amt, a))
        c.execute("UPDATE accounts SET balance = balance + ? WHERE id = ?", (amt, b))
        c.execute("COMMIT")
        commits += 1
    except sqlite3.OperationalError as e:
        c.execute("ROLLBACK") if c.in_transaction else None
        if "locked" not in str(e) and "busy" not in str(e):
            print(f"ERROR {e}", flush=True)
            sys.exit(4)
print(f"commits={commits}", flush=True)
"#;

fn concurrency(node: &Node, mode: &str, seconds: f64) {
    let name = format!("bank-{mode}.db");
    let path = node.path(&name);
    let c = open(&path, mode, 4096);
    c.execute_batch(
        "CREATE TABLE accounts (id INTEGER PRIMARY KEY, balance INTEGER NOT NULL);
         WITH RECURSIVE s(i) AS (SELECT 0 UNION ALL SELECT i + 1 FROM s WHERE i < 99)
         INSERT INTO accounts SELECT i, 1000 FROM s;",
    )
    .unwrap();
    drop(c);
    let secs = seconds.to_string();
    let spawn = |script: &str, extra: &[&str]| {
        Command::new("python3")
            .arg("-c")
            .arg(script)
            .arg(&path)
            .arg(&secs)
            .args(extra)
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap()
    };
    let writer = spawn(WRITER_PY, &[]);
    let readers: Vec<_> = (0..4).map(|_| spawn(READER_PY, &["100000"])).collect();
    let w = writer.wait_with_output().unwrap();
    let wout = String::from_utf8_lossy(&w.stdout).into_owned();
    assert!(
        w.status.success(),
        "{mode} writer: {wout} {}",
        String::from_utf8_lossy(&w.stderr)
    );
    let commits: u64 = wout.trim().trim_start_matches("commits=").parse().unwrap();
    assert!(commits > 20, "{mode}: only {commits} commits");
    for r in readers {
        let o = r.wait_with_output().unwrap();
        let out = String::from_utf8_lossy(&o.stdout);
        assert!(
            o.status.success(),
            "{mode} reader: {out} {}",
            String::from_utf8_lossy(&o.stderr)
        );
        assert!(out.starts_with("ok="), "{mode} reader: {out}");
        let ok: u64 = out
            .trim()
            .split(' ')
            .next()
            .unwrap()
            .trim_start_matches("ok=")
            .parse()
            .unwrap();
        assert!(ok > 10, "{mode}: reader made little progress: {out}");
    }
    let c = Connection::open(&path).unwrap();
    checkpoint(&c);
    assert_eq!(integrity(&c), "ok");
    let total: i64 = c
        .query_row("SELECT sum(balance) FROM accounts", [], |r| r.get(0))
        .unwrap();
    assert_eq!(total, 100_000);
    drop(c);
    assert_chain_reproduces(node, &name);
}

#[test]
fn one_writer_and_four_reader_processes_never_see_a_torn_state() {
    let node = Node::start();
    concurrency(&node, "wal", 10.0);
    concurrency(&node, "delete", 4.0);
}

#[test]
fn sigterm_and_sigint_unmount_cleanly_and_exit_zero() {
    for sig in [libc::SIGTERM, libc::SIGINT] {
        let mut p = Process::start();
        let c = open(&p.path("x.db"), "wal", 4096);
        c.execute_batch("CREATE TABLE t (x); INSERT INTO t VALUES (42);")
            .unwrap();
        drop(c);
        let status = p.signal(sig);
        assert!(status.success(), "exit {status:?}; log:\n{}", p.log_text());
        assert!(!is_mounted(&p.mnt), "still mounted after signal {sig}");
        // The data is there on the next start.
        p.spawn();
        let c = Connection::open(p.path("x.db")).unwrap();
        let x: i64 = c.query_row("SELECT x FROM t", [], |r| r.get(0)).unwrap();
        assert_eq!(x, 42);
    }
}

const CRASH_WRITER_PY: &str = r#"
import sqlite3, sys
path, mode = sys.argv[1], sys.argv[2]
c = sqlite3.connect(path, timeout=5, isolation_level=None)
c.execute(f"PRAGMA journal_mode={mode}")
c.execute("PRAGMA synchronous=FULL")
c.execute("CREATE TABLE IF NOT EXISTS acked (id INTEGER PRIMARY KEY, pad BLOB)")
while True:
    try:
        cur = c.execute("INSERT INTO acked (pad) VALUES (randomblob(3000))")
    except Exception as e:
        print(f"stopped {e}", flush=True)
        break
    print(cur.lastrowid, flush=True)
"#;

#[test]
fn kill_9_mid_workload_loses_no_acknowledged_commit() {
    for mode in ["wal", "delete"] {
        let mut p = Process::start();
        let path = p.path("crash.db");
        for round in 1..=3 {
            let mut writer = Command::new("python3")
                .arg("-c")
                .arg(CRASH_WRITER_PY)
                .arg(&path)
                .arg(mode)
                .stdout(Stdio::piped())
                .stderr(Stdio::piped())
                .spawn()
                .unwrap();
            // Let it commit a while, then kill litefs under it.
            let mut stdout = writer.stdout.take().unwrap();
            let ok = wait_until(Duration::from_secs(10), || {
                super::support::ltx_files(&p.data, "crash.db").len() > round * 40
            });
            assert!(ok, "{mode}: no progress; log:\n{}", p.log_text());
            let status = p.signal(libc::SIGKILL);
            assert!(!status.success());
            let _ = writer.wait();
            let mut out = String::new();
            stdout.read_to_string(&mut out).unwrap();
            let acked: Vec<i64> = out.lines().filter_map(|l| l.parse().ok()).collect();
            assert!(!acked.is_empty(), "{mode}: {out}");
            // The mount is stale now; a restart detects and clears it.
            p.spawn();
            assert!(
                p.log_text().matches("stale litefs mount").count() == round,
                "{mode}: restart did not report the stale mount:\n{}",
                p.log_text()
            );
            let c = Connection::open(&path).unwrap();
            assert_eq!(integrity(&c), "ok", "{mode}");
            let max: i64 = c
                .query_row("SELECT max(id) FROM acked", [], |r| r.get(0))
                .unwrap_or_else(|e| {
                    panic!(
                        "{mode} round {round}: {e}; mounted: {}; data dir ltx files: {}; writer: {out}\nlog:\n{}",
                        is_mounted(&p.mnt),
                        super::support::ltx_files(&p.data, "crash.db").len(),
                        p.log_text()
                    )
                });
            let last = *acked.last().unwrap();
            assert!(
                max >= last,
                "{mode} round {round}: acknowledged commit {last} missing (max {max})"
            );
            let n: i64 = c
                .query_row("SELECT count(*) FROM acked", [], |r| r.get(0))
                .unwrap();
            assert_eq!(n, max, "{mode}: rows missing");
            checkpoint(&c);
            drop(c);
            let files = super::support::ltx_files(&p.data, "crash.db");
            let (replayed, _) = apply_chain(&files);
            let actual = fs::read(p.data.join("dbs/crash.db/database")).unwrap();
            assert!(
                replayed == actual,
                "{mode} round {round}: chain does not reproduce the database"
            );
        }
    }
}

/// With `synchronous=FULL` a WAL commit is made durable by the LTX log, not by an fsync
/// of the WAL, and named LTX files are synced in batches. A power cut can then lose the
/// WAL's frames and the newest named files: simulated here by killing litefs and then
/// removing both, which a restart must repair from the log without losing a commit.
#[test]
fn commits_survive_losing_unsynced_wal_frames_and_ltx_files() {
    let mut p = Process::start();
    let path = p.path("cut.db");
    let c = Connection::open(&path).unwrap();
    c.execute_batch(
        "PRAGMA journal_mode=WAL; PRAGMA synchronous=FULL; CREATE TABLE t (x INTEGER);",
    )
    .unwrap();
    for i in 1..=60 {
        c.execute("INSERT INTO t VALUES (?1)", [i]).unwrap();
    }
    let status = p.signal(libc::SIGKILL);
    assert!(!status.success());
    drop(c);
    let dir = p.data.join("dbs/cut.db");
    let wal = fs::OpenOptions::new()
        .write(true)
        .open(dir.join("wal"))
        .unwrap();
    assert!(wal.metadata().unwrap().len() > 32, "no WAL frames to lose");
    wal.set_len(32).unwrap();
    drop(wal);
    let files = super::support::ltx_files(&p.data, "cut.db");
    for f in &files[files.len() - 5..] {
        fs::remove_file(f).unwrap();
    }
    p.spawn();
    let log = p.log_text();
    assert!(log.contains("restored LTX file from the log"), "{log}");
    assert!(
        log.contains("re-applied LTX files whose WAL frames were lost"),
        "{log}"
    );
    let c = Connection::open(&path).unwrap();
    let (n, sum): (i64, i64) = c
        .query_row("SELECT count(*), sum(x) FROM t", [], |r| {
            Ok((r.get(0)?, r.get(1)?))
        })
        .unwrap();
    assert_eq!((n, sum), (60, 60 * 61 / 2), "acknowledged commits lost");
    assert_eq!(integrity(&c), "ok");
    checkpoint(&c);
    drop(c);
    let files = super::support::ltx_files(&p.data, "cut.db");
    let (replayed, _) = apply_chain(&files);
    assert!(
        replayed == fs::read(dir.join("database")).unwrap(),
        "chain does not reproduce the database"
    );
}

#[test]
fn a_stale_mount_still_in_use_is_reported_with_the_fix() {
    let mut p = Process::start();
    fs::write(p.path("held.db"), b"").unwrap();
    // A process keeps a file of the mount open across the crash.
    let mut holder = Command::new("python3")
        .arg("-c")
        .arg("import sys,time; f=open(sys.argv[1],'rb'); print('open', flush=True); time.sleep(60)")
        .arg(p.path("held.db"))
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let mut line = [0u8; 5];
    holder
        .stdout
        .as_mut()
        .unwrap()
        .read_exact(&mut line)
        .unwrap();
    p.signal(libc::SIGKILL);
    let out = Command::new(env!("CARGO_BIN_EXE_litefs"))
        .args(["mount", "-config"])
        .arg(&p.config)
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(err.contains("stale FUSE mount"), "{err}");
    assert!(
        err.contains(&format!("fusermount3 -u {}", p.mnt.display())),
        "{err}"
    );
    assert!(err.contains(&holder.id().to_string()), "{err}");
    holder.kill().unwrap();
    holder.wait().unwrap();
    // Once nobody uses it, start-up clears it by itself.
    p.spawn();
    assert!(p.path("held.db").exists());
}

#[test]
fn sigterm_while_a_process_keeps_a_file_open_reports_busy_and_detaches() {
    let mut p = Process::start();
    let c = open(&p.path("busy.db"), "delete", 4096);
    c.execute_batch("CREATE TABLE t (x);").unwrap();
    drop(c);
    let mut holder = Command::new("python3")
        .arg("-c")
        .arg("import sys,time; f=open(sys.argv[1],'rb'); print('open', flush=True); time.sleep(60)")
        .arg(p.path("busy.db"))
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let mut line = [0u8; 5];
    holder
        .stdout
        .as_mut()
        .unwrap()
        .read_exact(&mut line)
        .unwrap();
    let status = p.signal(libc::SIGTERM);
    holder.kill().unwrap();
    holder.wait().unwrap();
    let log = p.log_text();
    assert_eq!(status.code(), Some(1), "{log}");
    assert!(log.contains("device or resource busy"), "{log}");
    assert!(
        log.contains(&format!("fusermount3 -u {}", p.mnt.display())),
        "{log}"
    );
    assert!(!is_mounted(&p.mnt), "the busy mount was not detached");
}

const REWRITE_WAL_PY: &str = r#"
import fcntl, os, sys
shm = open(sys.argv[1], "r+b")
fcntl.lockf(shm, fcntl.LOCK_EX | fcntl.LOCK_NB, 1, 120)
fd = os.open(sys.argv[2], os.O_WRONLY)
try:
    os.pwrite(fd, b"\xab" * 24, 32)
    print("written")
except OSError as e:
    print(f"refused errno {e.errno}")
"#;

#[test]
fn a_failed_capture_fails_the_commit_and_a_rewrite_of_captured_frames_stops_the_node() {
    // The capture runs at the write that completes the commit frame, so its failure fails
    // COMMIT whatever `synchronous` is.
    for sync in ["full", "normal"] {
        let node = Node::start();
        let name = format!("{sync}.db");
        let c = open(&node.path(&name), "wal", 4096);
        c.pragma_update(None, "synchronous", sync).unwrap();
        c.execute_batch("CREATE TABLE t (x);").unwrap();
        let n = node.ltx_files(&name).len();
        c.execute_batch("BEGIN IMMEDIATE; INSERT INTO t VALUES (1);")
            .unwrap();
        // A closed store fails every hook.
        node.store().close().unwrap();
        let err = c.execute_batch("COMMIT;").unwrap_err();
        assert!(err.to_string().contains("disk I/O error"), "{sync}: {err}");
        assert_eq!(node.ltx_files(&name).len(), n, "{sync}: an LTX appeared");
    }

    // Another process takes the WAL write lock and overwrites a frame that is already in
    // an LTX file: the write is refused and the node stops with exit status 99.
    let mut p = Process::start();
    let c = open(&p.path("rw.db"), "wal", 4096);
    c.execute_batch("CREATE TABLE t (x); INSERT INTO t VALUES (1);")
        .unwrap();
    let out = Command::new("python3")
        .arg("-c")
        .arg(REWRITE_WAL_PY)
        .arg(p.path("rw.db-shm"))
        .arg(p.path("rw.db-wal"))
        .output()
        .unwrap();
    let out = String::from_utf8_lossy(&out.stdout).to_string();
    assert_eq!(
        out.trim(),
        format!("refused errno {}", libc::EIO),
        "{}",
        p.log_text()
    );
    drop(c);
    let status = p.wait_exit(Duration::from_secs(30));
    let log = p.log_text();
    assert_eq!(status.and_then(|s| s.code()), Some(99), "{log}");
    assert!(
        log.contains("would change frames already captured"),
        "{log}"
    );
}

#[test]
fn a_second_litefs_on_a_live_mount_is_refused_and_the_first_keeps_serving() {
    let p = Process::start();
    fs::write(p.path("live.db"), b"").unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_litefs"))
        .args(["mount", "-config"])
        .arg(&p.config)
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(err.contains("is already a mount point"), "{err}");
    assert!(err.contains("is another litefs running?"), "{err}");
    // Refused before the store of the running node was opened (and recovered).
    assert!(!err.contains("litefs::store"), "{err}");
    assert!(p.path("live.db").exists());
}

fn fcntl_lock(f: &fs::File, cmd: i32, typ: i32, start: i64) -> (i32, libc::flock) {
    use std::os::fd::AsRawFd;
    // SAFETY: a zeroed flock is a valid value; fcntl gets a valid fd and pointer.
    let mut fl: libc::flock = unsafe { std::mem::zeroed() };
    fl.l_type = typ as i16;
    fl.l_whence = libc::SEEK_SET as i16;
    fl.l_start = start;
    fl.l_len = 1;
    // SAFETY: as above.
    let rc = unsafe { libc::fcntl(f.as_raw_fd(), cmd, &mut fl) };
    let rc = if rc == 0 {
        0
    } else {
        std::io::Error::last_os_error().raw_os_error().unwrap()
    };
    (rc, fl)
}

#[test]
fn a_checkpoint_lock_is_refused_while_another_process_holds_the_wal_write_lock() {
    let node = Node::start();
    let c = open(&node.path("ck.db"), "wal", 4096);
    c.execute_batch("CREATE TABLE t (x); INSERT INTO t VALUES (1);")
        .unwrap();
    let shm_path = node.path("ck.db-shm");
    let mut holder = Command::new("python3")
        .arg("-c")
        .arg(
            "import fcntl,sys,time; f=open(sys.argv[1],'r+b'); \
             fcntl.lockf(f, fcntl.LOCK_EX|fcntl.LOCK_NB, 1, 120); \
             print('held', flush=True); time.sleep(60)",
        )
        .arg(&shm_path)
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let mut line = [0u8; 5];
    holder
        .stdout
        .as_mut()
        .unwrap()
        .read_exact(&mut line)
        .unwrap();
    let shm = fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(&shm_path)
        .unwrap();
    // F_GETLK reports the writer, with its pid.
    let (rc, fl) = fcntl_lock(&shm, libc::F_GETLK, libc::F_WRLCK, 120);
    assert_eq!(rc, 0);
    assert_eq!(fl.l_type as i32, libc::F_WRLCK);
    assert_eq!(fl.l_pid as u32, holder.id());
    // CKPT (121) is free as a byte, but refused while WRITE is held by another owner.
    let (rc, _) = fcntl_lock(&shm, libc::F_SETLK, libc::F_WRLCK, 121);
    assert_eq!(rc, libc::EAGAIN);
    // The writer dies: close releases its locks, and CKPT can be taken.
    holder.kill().unwrap();
    holder.wait().unwrap();
    let (rc, _) = fcntl_lock(&shm, libc::F_SETLK, libc::F_WRLCK, 121);
    assert_eq!(rc, 0);
    let (rc, _) = fcntl_lock(&shm, libc::F_SETLK, libc::F_UNLCK, 121);
    assert_eq!(rc, 0);
    drop(shm);
    let n: i64 = c
        .query_row("SELECT count(*) FROM t", [], |r| r.get(0))
        .unwrap();
    assert_eq!(n, 1);
}

/// What a lost lease does to the store (`set_primary(false)`, then `fence_writers`),
/// in process: connections opened while primary get SQLite's clearest error at their
/// first lock, by journal mode, and keep reading what they committed; a rollback-mode
/// transaction begun as primary and fenced gets `SQLITE_BUSY` at `COMMIT` (its
/// EXCLUSIVE lock), without a byte of the database file written, and its rollback
/// leaves no journal behind.
#[test]
fn demoted_writers_get_clear_errors_at_their_first_lock() {
    use rusqlite::ErrorCode;
    let node = Node::start();
    let open = |name: &str, mode: &str| {
        let c = Connection::open(node.path(name)).unwrap();
        c.busy_timeout(Duration::from_millis(100)).unwrap();
        let _: String = c
            .query_row(&format!("PRAGMA journal_mode={mode}"), [], |r| r.get(0))
            .unwrap();
        c.execute_batch("CREATE TABLE t (v TEXT); INSERT INTO t VALUES ('primary');")
            .unwrap();
        c
    };
    let modes = [
        ("WAL", ErrorCode::DatabaseBusy),
        ("DELETE", ErrorCode::ReadOnly),
        ("TRUNCATE", ErrorCode::PermissionDenied),
        ("PERSIST", ErrorCode::PermissionDenied),
    ];
    let conns: Vec<Connection> = modes.iter().map(|(m, _)| open(m, m)).collect();
    let fenced = open("fenced", "DELETE");
    fenced
        .execute_batch("BEGIN IMMEDIATE; INSERT INTO t VALUES ('fenced');")
        .unwrap();
    let fenced_file = fs::read(node.data_db("fenced")).unwrap();

    node.store().set_primary(false);
    node.store().fence_writers();
    for (c, (m, want)) in conns.iter().zip(modes) {
        let err = c
            .execute("INSERT INTO t VALUES ('demoted')", [])
            .expect_err("a demoted node took a write");
        assert_eq!(err.sqlite_error_code(), Some(want), "{m}: {err}");
        let n: i64 = c
            .query_row("SELECT count(*) FROM t", [], |r| r.get(0))
            .unwrap();
        assert_eq!(n, 1, "{m}");
    }
    let err = fenced.execute_batch("COMMIT").expect_err("a fenced commit");
    assert_eq!(
        err.sqlite_error_code(),
        Some(ErrorCode::DatabaseBusy),
        "{err}"
    );
    assert!(
        fs::read(node.data_db("fenced")).unwrap() == fenced_file,
        "the fenced transaction wrote into the database file"
    );
    // Its rollback discards the journal (no hot journal is left to be rolled back
    // over pages replicated later) and records nothing.
    let files = node.ltx_files("fenced").len();
    fenced.execute_batch("ROLLBACK").unwrap();
    assert!(
        !node.data.join("dbs/fenced/journal").exists(),
        "the fenced transaction left its journal"
    );
    assert_eq!(node.ltx_files("fenced").len(), files);
    let reader = Connection::open(node.path("fenced")).unwrap();
    let n: i64 = reader
        .query_row("SELECT count(*) FROM t", [], |r| r.get(0))
        .unwrap();
    assert_eq!(n, 1);
    assert!(fs::read(node.data_db("fenced")).unwrap() == fenced_file);
    drop((fenced, reader));
    drop(conns);
}

/// A WAL index the process opened while the node was a replica, then wrote through
/// once the node became the primary, counts as the primary's after a demotion too: a
/// connection that writes through it gets "database is locked", not "disk I/O error".
#[test]
fn a_wal_index_written_as_primary_is_refused_after_demotion() {
    use rusqlite::ErrorCode;
    let node = Node::start();
    Connection::open(node.path("db"))
        .unwrap()
        .execute_batch("PRAGMA journal_mode=WAL; CREATE TABLE t (v TEXT);")
        .unwrap();
    node.store().set_primary(false);
    // Opened as a replica: read-only database, WAL index of its own.
    let reader = Connection::open(node.path("db")).unwrap();
    let n: i64 = reader
        .query_row("SELECT count(*) FROM t", [], |r| r.get(0))
        .unwrap();
    assert_eq!(n, 0);
    node.store().set_primary(true);
    // Shares the process's WAL index with the reader.
    let writer = Connection::open(node.path("db")).unwrap();
    writer.busy_timeout(Duration::from_millis(100)).unwrap();
    writer
        .execute("INSERT INTO t VALUES ('primary')", [])
        .unwrap();
    node.store().set_primary(false);
    node.store().fence_writers();
    let err = writer
        .execute("INSERT INTO t VALUES ('demoted')", [])
        .expect_err("a demoted node took a write");
    assert_eq!(
        err.sqlite_error_code(),
        Some(ErrorCode::DatabaseBusy),
        "{err}"
    );
    drop((reader, writer));
}
