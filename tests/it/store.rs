//! Transaction capture, recovery and retention of `litefs::store`, driven by real SQLite
//! through the hook VFS (`store_vfs`), which calls the hooks where the FUSE layer does.

use std::fs::{self, File, OpenOptions};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use litefs::ltx::{self, Pos, TxId};
use litefs::store::{Store, StoreError, StoreOptions, list_ltx_files};
use rusqlite::Connection;
use tempfile::TempDir;

use crate::store_vfs::{CrashAt, HookVfs};

struct Env {
    dir: TempDir,
    store: Arc<Store>,
    vfs: HookVfs,
}

fn options(data_dir: &Path) -> StoreOptions {
    StoreOptions {
        data_dir: data_dir.to_path_buf(),
        retention: Duration::from_secs(600),
        retention_monitor_interval: Duration::ZERO,
        node_id: 7,
    }
}

impl Env {
    fn new() -> Env {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(options(&dir.path().join("data"))).unwrap();
        let vfs = HookVfs::register(store.clone(), &dir.path().join("mnt"));
        Env { dir, store, vfs }
    }

    fn data(&self) -> PathBuf {
        self.dir.path().join("data")
    }

    fn open(&self, name: &str) -> Connection {
        self.vfs.open(name)
    }

    /// Clean shutdown and start-up of the store.
    fn restart(&mut self) {
        self.store.close().unwrap();
        self.store = Store::open(options(&self.data())).unwrap();
        self.vfs.set_store(self.store.clone());
    }

    fn ltx_count(&self, name: &str) -> usize {
        list_ltx_files(&self.data().join("dbs").join(name).join("ltx"))
            .unwrap()
            .len()
    }

    fn db_file(&self, name: &str) -> PathBuf {
        self.data().join("dbs").join(name).join("database")
    }

    fn assert_no_hook_errors(&self) {
        assert_eq!(self.vfs.errors(), Vec::<String>::new());
    }
}

/// Applies the whole LTX chain of `name` to an empty file with `ltx::apply_file` (which
/// checks every position and checksum; a page-size change, written by the store as a
/// file holding every page in the new size, replaces the content) and returns the bytes
/// and the final position.
fn replay(data: &Path, name: &str) -> (Vec<u8>, Pos) {
    let files = list_ltx_files(&data.join("dbs").join(name).join("ltx")).unwrap();
    assert!(!files.is_empty());
    let out = tempfile::NamedTempFile::new().unwrap();
    let f = OpenOptions::new()
        .read(true)
        .write(true)
        .open(out.path())
        .unwrap();
    let mut pos: Option<Pos> = None;
    for (i, lf) in files.iter().enumerate() {
        assert_eq!(lf.min, TxId(i as u64 + 1), "TXIDs must be contiguous");
        pos = Some(
            ltx::apply_file(&f, pos, &lf.path)
                .unwrap_or_else(|e| panic!("apply {}: {e}", lf.path.display())),
        );
    }
    (fs::read(out.path()).unwrap(), pos.unwrap())
}

fn checksum_of(path: &Path, page_size: u32) -> ltx::Checksum {
    ltx::database_checksum(File::open(path).unwrap(), page_size).unwrap()
}

/// A temporary view `s(value)` of the integers 1..=1000 (the bundled SQLite has no
/// generate_series); temporary, so it never touches the database file.
fn series(c: &Connection) {
    c.execute_batch(
        "CREATE TEMP VIEW s AS WITH RECURSIVE r(value) AS (SELECT 1 UNION ALL SELECT value + 1 FROM r WHERE value < 1000) SELECT value FROM r;",
    )
    .unwrap();
}

fn count(c: &Connection) -> i64 {
    c.query_row("SELECT count(*) FROM t", [], |r| r.get(0))
        .unwrap()
}

/// Creates, inserts (with overflow blobs), indexes, updates, deletes, VACUUMs.
fn workload(c: &Connection, page_size: u32, mode: &str) {
    c.execute_batch(&format!(
        "PRAGMA page_size={page_size}; PRAGMA journal_mode={mode};"
    ))
    .unwrap();
    let got: String = c
        .query_row("PRAGMA journal_mode", [], |r| r.get(0))
        .unwrap();
    assert_eq!(got, mode);
    c.execute_batch("CREATE TABLE t(id INTEGER PRIMARY KEY, v TEXT, b BLOB);")
        .unwrap();
    for i in 0..40 {
        let blob = vec![
            (i % 251) as u8;
            if i % 7 == 0 {
                3 * page_size as usize + 17
            } else {
                100
            }
        ];
        c.execute(
            "INSERT INTO t(v, b) VALUES (?1, ?2)",
            rusqlite::params![format!("value {i}"), blob],
        )
        .unwrap();
    }
    c.execute_batch(
        "CREATE INDEX t_v ON t(v);
         BEGIN; UPDATE t SET v = v || ' updated' WHERE id % 3 = 0; DELETE FROM t WHERE id % 5 = 0; COMMIT;",
    )
    .unwrap();
    c.execute_batch("BEGIN;").unwrap();
    for i in 0..200 {
        c.execute(
            "INSERT INTO t(v, b) VALUES (?1, randomblob(?2))",
            rusqlite::params![format!("bulk {i}"), (i * 37) % 3000],
        )
        .unwrap();
    }
    c.execute_batch("COMMIT; DELETE FROM t WHERE id % 2 = 0; VACUUM;")
        .unwrap();
    c.execute(
        "INSERT INTO t(v, b) VALUES ('after vacuum', randomblob(5000))",
        [],
    )
    .unwrap();
    let ok: String = c
        .query_row("PRAGMA integrity_check", [], |r| r.get(0))
        .unwrap();
    assert_eq!(ok, "ok");
}

/// The workload in one mode and page size: every transaction captured, the chain
/// reproduces the database byte for byte, the in-memory checksum matches the file.
fn capture_roundtrip(mode: &str, page_size: u32) {
    let env = Env::new();
    let c = env.open("db");
    workload(&c, page_size, mode);
    // Ten more single-row transactions: exactly ten more LTX files.
    let before = env.ltx_count("db");
    for i in 0..10 {
        c.execute("INSERT INTO t(v) VALUES (?1)", [format!("single {i}")])
            .unwrap();
    }
    assert_eq!(
        env.ltx_count("db"),
        before + 10,
        "one LTX per committed transaction"
    );
    let rows = count(&c);
    // Closing the last connection checkpoints the WAL into the database file.
    drop(c);
    env.assert_no_hook_errors();

    let db = env.store.db("db").unwrap();
    assert_eq!(db.page_size(), Some(page_size));
    db.verify().unwrap();
    let file = fs::read(env.db_file("db")).unwrap();
    let (replayed, pos) = replay(&env.data(), "db");
    assert!(
        replayed == file,
        "{mode}/{page_size}: replayed chain differs from the database"
    );
    assert_eq!(pos, db.pos());
    assert_eq!(
        checksum_of(&env.db_file("db"), page_size),
        db.pos().post_apply_checksum
    );

    // The replayed file is a healthy database with the same rows.
    let out = env.dir.path().join("replayed.db");
    fs::write(&out, &replayed).unwrap();
    let r = Connection::open(&out).unwrap();
    assert_eq!(count(&r), rows);
    let ok: String = r
        .query_row("PRAGMA integrity_check", [], |r| r.get(0))
        .unwrap();
    assert_eq!(ok, "ok");
}

macro_rules! roundtrip_tests {
    ($($name:ident: $mode:expr, $ps:expr;)*) => {$(
        #[test]
        fn $name() {
            capture_roundtrip($mode, $ps);
        }
    )*};
}

roundtrip_tests! {
    capture_delete_1024: "delete", 1024;
    capture_delete_4096: "delete", 4096;
    capture_delete_65536: "delete", 65536;
    capture_truncate_1024: "truncate", 1024;
    capture_truncate_4096: "truncate", 4096;
    capture_truncate_65536: "truncate", 65536;
    capture_persist_1024: "persist", 1024;
    capture_persist_4096: "persist", 4096;
    capture_persist_65536: "persist", 65536;
    capture_wal_1024: "wal", 1024;
    capture_wal_4096: "wal", 4096;
    capture_wal_65536: "wal", 65536;
}

fn setup(env: &Env, mode: &str) -> Connection {
    let c = env.open("db");
    c.execute_batch(&format!(
        "PRAGMA page_size=4096; PRAGMA journal_mode={mode}; PRAGMA cache_size=2;
         CREATE TABLE t(id INTEGER PRIMARY KEY, v TEXT UNIQUE, b BLOB);
         INSERT INTO t(v, b) VALUES ('a', randomblob(100)), ('b', randomblob(100));"
    ))
    .unwrap();
    series(&c);
    c
}

/// ROLLBACK (after SQLite spilled pages to the database or WAL), a savepoint rolled back,
/// and a statement failing half-way produce no LTX file and leave the position alone.
fn no_ltx_for_rolled_back_work(mode: &str) {
    let env = Env::new();
    let c = setup(&env, mode);
    let db = env.store.db("db").unwrap();
    let (n, pos) = (env.ltx_count("db"), db.pos());

    // cache_size=2 forces SQLite to write changed pages before the end of the transaction.
    c.execute_batch("BEGIN; INSERT INTO t(v, b) SELECT 'x' || value, randomblob(3000) FROM s WHERE value <= 300; ROLLBACK;")
        .unwrap();
    assert_eq!(
        (env.ltx_count("db"), db.pos()),
        (n, pos),
        "{mode}: ROLLBACK produced an LTX"
    );

    let err = c
        .execute_batch("INSERT INTO t(v, b) SELECT CASE WHEN value = 250 THEN 'a' ELSE 'y' || value END, randomblob(3000) FROM s WHERE value <= 300;")
        .unwrap_err();
    assert!(err.to_string().contains("UNIQUE"), "{err}");
    assert_eq!(
        (env.ltx_count("db"), db.pos()),
        (n, pos),
        "{mode}: a failed statement produced an LTX"
    );

    c.execute_batch("BEGIN; SAVEPOINT s; INSERT INTO t(v) SELECT 'z' || value FROM s WHERE value <= 500; ROLLBACK TO s; RELEASE s; ROLLBACK;")
        .unwrap();
    assert_eq!(
        (env.ltx_count("db"), db.pos()),
        (n, pos),
        "{mode}: rolled-back savepoint produced an LTX"
    );

    // A savepoint rolled back inside a committed transaction: one LTX, without its rows.
    c.execute_batch("BEGIN; SAVEPOINT s; INSERT INTO t(v) SELECT 'z' || value FROM s WHERE value <= 500; ROLLBACK TO s; RELEASE s; INSERT INTO t(v) VALUES ('kept'); COMMIT;")
        .unwrap();
    assert_eq!(env.ltx_count("db"), n + 1);
    assert_eq!(count(&c), 3);
    drop(c);
    env.assert_no_hook_errors();
    let (replayed, _) = replay(&env.data(), "db");
    assert!(replayed == fs::read(env.db_file("db")).unwrap());
}

#[test]
fn no_ltx_for_rollback_delete() {
    no_ltx_for_rolled_back_work("delete");
}

#[test]
fn no_ltx_for_rollback_truncate() {
    no_ltx_for_rolled_back_work("truncate");
}

#[test]
fn no_ltx_for_rollback_persist() {
    no_ltx_for_rolled_back_work("persist");
}

#[test]
fn no_ltx_for_rollback_wal() {
    no_ltx_for_rolled_back_work("wal");
}

/// Switching DELETE -> WAL -> DELETE keeps one contiguous chain that reproduces the file.
#[test]
fn journal_mode_switches_both_ways() {
    let env = Env::new();
    let c = setup(&env, "delete");
    c.execute_batch("PRAGMA journal_mode=wal; INSERT INTO t(v) VALUES ('in wal');")
        .unwrap();
    c.execute_batch("PRAGMA journal_mode=delete; INSERT INTO t(v) VALUES ('back in delete');")
        .unwrap();
    c.execute_batch("PRAGMA journal_mode=wal; INSERT INTO t(v) VALUES ('wal again');")
        .unwrap();
    drop(c);
    env.assert_no_hook_errors();
    let (replayed, pos) = replay(&env.data(), "db");
    assert!(replayed == fs::read(env.db_file("db")).unwrap());
    assert_eq!(pos, env.store.db("db").unwrap().pos());
    let r = env.open("db");
    assert_eq!(count(&r), 5);
}

/// Several databases at once, from several threads.
#[test]
fn databases_are_independent_across_threads() {
    let env = Env::new();
    std::thread::scope(|s| {
        for i in 0..4 {
            let env = &env;
            s.spawn(move || {
                let c = env.open(&format!("db{i}"));
                c.execute_batch(if i % 2 == 0 {
                    "PRAGMA journal_mode=wal;"
                } else {
                    "PRAGMA journal_mode=delete;"
                })
                .unwrap();
                c.execute_batch("CREATE TABLE t(id INTEGER PRIMARY KEY, v TEXT);")
                    .unwrap();
                for j in 0..50 {
                    c.execute("INSERT INTO t(v) VALUES (?1)", [format!("{i}/{j}")])
                        .unwrap();
                }
            });
        }
    });
    env.assert_no_hook_errors();
    let names: Vec<String> = env
        .store
        .databases()
        .iter()
        .map(|d| d.name().to_string())
        .collect();
    assert_eq!(names, ["db0", "db1", "db2", "db3"]);
    for name in &names {
        // WAL mode on an empty database writes its header (one LTX); DELETE mode does not.
        let wal = name.ends_with('0') || name.ends_with('2');
        assert_eq!(
            env.ltx_count(name),
            51 + usize::from(wal),
            "{name}: journal_mode + create + 50 inserts"
        );
        let (replayed, _) = replay(&env.data(), name);
        assert!(replayed == fs::read(env.db_file(name)).unwrap());
    }
}

/// `cp` into the mount: arbitrary-sized writes with no journal, captured at flush.
#[test]
fn plain_copy_is_captured_at_flush() {
    let env = Env::new();
    let src = env.dir.path().join("src.db");
    let s = Connection::open(&src).unwrap();
    series(&s);
    s.execute_batch("CREATE TABLE t(id INTEGER PRIMARY KEY, v BLOB); INSERT INTO t(v) SELECT randomblob(700) FROM s WHERE value <= 100;")
        .unwrap();
    drop(s);
    let bytes = fs::read(&src).unwrap();
    let db = env.store.create_db("copied").unwrap();
    let f = OpenOptions::new()
        .write(true)
        .open(db.path(litefs::store::FileKind::Database))
        .unwrap();
    for (i, chunk) in bytes.chunks(10_000).enumerate() {
        f.write_all_at(chunk, (i * 10_000) as u64).unwrap();
        db.database_written((i * 10_000) as u64, chunk.len())
            .unwrap();
    }
    db.database_flushed().unwrap();
    assert_eq!(env.ltx_count("copied"), 1);
    let (replayed, pos) = replay(&env.data(), "copied");
    assert!(replayed == bytes);
    assert_eq!(pos, db.pos());
    // Flushing again without writes changes nothing.
    db.database_flushed().unwrap();
    assert_eq!(env.ltx_count("copied"), 1);
}

/// Deleting writes a commit-0 LTX, removes the files, and a re-created database
/// continues the TXID sequence.
#[test]
fn delete_writes_commit_zero_ltx_and_recreate_continues() {
    let mut env = Env::new();
    let c = setup(&env, "wal");
    drop(c);
    let db = env.store.db("db").unwrap();
    let pos = db.pos();
    env.store.delete_db("db").unwrap();
    assert!(env.store.db("db").is_none());
    assert!(!env.db_file("db").exists());
    assert!(matches!(
        db.wal_written(0, &[0]),
        Err(StoreError::Deleted { .. })
    ));
    let files = list_ltx_files(&env.data().join("dbs/db/ltx")).unwrap();
    let last = files.last().unwrap();
    assert_eq!(last.max, TxId(pos.txid.0 + 1));
    let (h, t) = ltx::verify(File::open(&last.path).unwrap()).unwrap();
    assert_eq!(h.commit, 0);
    assert_eq!(h.pre_apply_checksum, pos.post_apply_checksum);
    assert_eq!(t.post_apply_checksum, ltx::Checksum(ltx::CHECKSUM_FLAG));
    assert_eq!(
        env.store.deleted_databases(),
        vec![(
            "db".to_string(),
            Pos {
                txid: last.max,
                post_apply_checksum: t.post_apply_checksum
            }
        )]
    );

    // The tombstone survives a restart, and the name continues its history.
    env.restart();
    assert!(env.store.db("db").is_none());
    let c = env.open("db");
    c.execute_batch("CREATE TABLE t(x); INSERT INTO t VALUES (1);")
        .unwrap();
    drop(c);
    env.assert_no_hook_errors();
    let db = env.store.db("db").unwrap();
    assert!(db.pos().txid.0 > last.max.0);
    let (replayed, rpos) = replay(&env.data(), "db");
    assert!(replayed == fs::read(env.db_file("db")).unwrap());
    assert_eq!(rpos, db.pos());
}

/// Crash (power cut) at the end of a rollback-journal transaction, before the store
/// captured it: start-up rolls the hot journal back; the transaction is gone (SQLite had
/// not been told it committed) and the database matches the history.
fn hot_journal_without_ltx(mode: &str) {
    let env = Env::new();
    let c = setup(&env, mode);
    let crash = env.dir.path().join("crash");
    env.vfs.crash_copy(CrashAt::JournalEndUncaptured, &crash);
    let pos = env.store.db("db").unwrap().pos();
    let before = fs::read(env.db_file("db")).unwrap();
    c.execute_batch(
        "INSERT INTO t(v, b) SELECT 'n' || value, randomblob(2000) FROM s WHERE value <= 50;",
    )
    .unwrap();
    assert!(!env.vfs.crash_pending());
    assert!(
        crash.join("dbs/db/journal").exists(),
        "the copy holds a hot journal"
    );

    let store = Store::open(options(&crash)).unwrap();
    let db = store.db("db").unwrap();
    assert_eq!(db.pos(), pos);
    db.verify().unwrap();
    assert!(!crash.join("dbs/db/journal").exists());
    assert!(fs::read(crash.join("dbs/db/database")).unwrap() == before);
}

/// Crash after the LTX became durable but before the journal ended: the hot journal is
/// rolled back and the last LTX re-applied, so the transaction survives.
fn hot_journal_with_ltx(mode: &str) {
    let env = Env::new();
    let c = setup(&env, mode);
    let crash = env.dir.path().join("crash");
    env.vfs.crash_copy(CrashAt::JournalEndCaptured, &crash);
    c.execute_batch(
        "INSERT INTO t(v, b) SELECT 'n' || value, randomblob(2000) FROM s WHERE value <= 50;",
    )
    .unwrap();
    let pos = env.store.db("db").unwrap().pos();
    let after = fs::read(env.db_file("db")).unwrap();
    assert!(crash.join("dbs/db/journal").exists());

    let store = Store::open(options(&crash)).unwrap();
    let db = store.db("db").unwrap();
    assert_eq!(db.pos(), pos);
    db.verify().unwrap();
    assert!(fs::read(crash.join("dbs/db/database")).unwrap() == after);
    let (replayed, _) = replay(&crash, "db");
    assert!(replayed == after);
}

#[test]
fn recovery_rolls_back_hot_journal_without_ltx_delete() {
    hot_journal_without_ltx("delete");
}

#[test]
fn recovery_rolls_back_hot_journal_without_ltx_truncate() {
    hot_journal_without_ltx("truncate");
}

#[test]
fn recovery_rolls_back_hot_journal_without_ltx_persist() {
    hot_journal_without_ltx("persist");
}

#[test]
fn recovery_reapplies_last_ltx_after_hot_journal_delete() {
    hot_journal_with_ltx("delete");
}

#[test]
fn recovery_reapplies_last_ltx_after_hot_journal_truncate() {
    hot_journal_with_ltx("truncate");
}

#[test]
fn recovery_reapplies_last_ltx_after_hot_journal_persist() {
    hot_journal_with_ltx("persist");
}

/// A temp file of an LTX write cut short by a crash is removed at start-up; a crash in
/// the middle of deleting a database (commit-0 LTX durable, files still there) finishes
/// the deletion; LTX history without its database file is an error.
#[test]
fn recovery_of_interrupted_ltx_write_and_delete() {
    let env = Env::new();
    drop(setup(&env, "delete"));
    let ltx_dir = env.data().join("dbs/db/ltx");
    let tmp = ltx_dir.join("0000000000000009-0000000000000009.ltx.tmp");
    fs::write(&tmp, b"LTX1 torn").unwrap();
    let saved = fs::read(env.db_file("db")).unwrap();
    let store = Store::open(options(&env.data())).unwrap();
    assert!(!tmp.exists());
    store.delete_db("db").unwrap();
    fs::write(env.db_file("db"), &saved).unwrap();
    let store = Store::open(options(&env.data())).unwrap();
    assert!(store.db("db").is_none());
    assert!(!env.db_file("db").exists());
    assert_eq!(store.deleted_databases().len(), 1);

    let env = Env::new();
    drop(setup(&env, "delete"));
    fs::remove_file(env.db_file("db")).unwrap();
    let err = Store::open(options(&env.data())).unwrap_err();
    assert!(matches!(err, StoreError::MissingDatabase { .. }), "{err:?}");
}

fn wal_crash(at: CrashAt) -> (Env, PathBuf, Pos, Pos) {
    let env = Env::new();
    let c = setup(&env, "wal");
    c.execute_batch("PRAGMA wal_autocheckpoint=0; INSERT INTO t(v) VALUES ('c');")
        .unwrap();
    let crash = env.dir.path().join("crash");
    let before = env.store.db("db").unwrap().pos();
    env.vfs.crash_copy(at, &crash);
    c.execute_batch(
        "INSERT INTO t(v, b) SELECT 'n' || value, randomblob(2000) FROM s WHERE value <= 50;",
    )
    .unwrap();
    assert!(!env.vfs.crash_pending());
    let after = env.store.db("db").unwrap().pos();
    (env, crash, before, after)
}

/// Crash at a WAL commit before capture: the uncaptured frames are cut off at start-up.
#[test]
fn recovery_truncates_wal_to_last_captured_commit() {
    let (env, crash, before, _) = wal_crash(CrashAt::WalCommitUncaptured);
    let wal_len = fs::metadata(crash.join("dbs/db/wal")).unwrap().len();
    let store = Store::open(options(&crash)).unwrap();
    let db = store.db("db").unwrap();
    assert_eq!(db.pos(), before);
    db.verify().unwrap();
    assert!(
        fs::metadata(crash.join("dbs/db/wal")).unwrap().len() < wal_len,
        "uncaptured frames removed"
    );
    // SQLite reads the recovered database: the uncaptured transaction is absent.
    let vfs = HookVfs::register(store.clone(), &env.dir.path().join("mnt2"));
    let c = vfs.open("db");
    assert_eq!(count(&c), 3);
}

/// Crash at a WAL commit after capture: the frames are kept and the transaction survives.
#[test]
fn recovery_keeps_captured_wal_frames() {
    let (env, crash, _, after) = wal_crash(CrashAt::WalCommitCaptured);
    let wal_len = fs::metadata(crash.join("dbs/db/wal")).unwrap().len();
    let store = Store::open(options(&crash)).unwrap();
    let db = store.db("db").unwrap();
    assert_eq!(db.pos(), after);
    db.verify().unwrap();
    assert_eq!(
        fs::metadata(crash.join("dbs/db/wal")).unwrap().len(),
        wal_len
    );
    let vfs = HookVfs::register(store.clone(), &env.dir.path().join("mnt2"));
    let c = vfs.open("db");
    assert_eq!(count(&c), 53);
    c.execute("INSERT INTO t(v) VALUES ('after recovery')", [])
        .unwrap();
    drop(c);
    assert_eq!(vfs.errors(), Vec::<String>::new());
    let (replayed, pos) = replay(&crash, "db");
    assert!(replayed == fs::read(crash.join("dbs/db/database")).unwrap());
    assert_eq!(pos, db.pos());
}

/// The LTX log makes a WAL commit durable before SQLite's fsync of the WAL (with
/// `synchronous=NORMAL`, without one at all): frames that never reached the disk, the
/// last transaction's or the whole WAL's, come back from the LTX files at start-up.
#[test]
fn recovery_reapplies_ltx_files_whose_wal_frames_were_lost() {
    for cut in ["last transaction", "whole WAL"] {
        let env = Env::new();
        let c = setup(&env, "wal");
        c.execute_batch(
            "PRAGMA wal_autocheckpoint=0; PRAGMA synchronous=NORMAL;
             INSERT INTO t(v) VALUES ('c');",
        )
        .unwrap();
        let wal = env.data().join("dbs/db/wal");
        let kept = fs::metadata(&wal).unwrap().len();
        c.execute("INSERT INTO t(v, b) VALUES ('lost', randomblob(3000))", [])
            .unwrap();
        let pos = env.store.db("db").unwrap().pos();
        let crash = env.dir.path().join("crash");
        crate::store_vfs::copy_dir(&env.data(), &crash);
        match cut {
            "last transaction" => OpenOptions::new()
                .write(true)
                .open(crash.join("dbs/db/wal"))
                .unwrap()
                .set_len(kept)
                .unwrap(),
            _ => fs::remove_file(crash.join("dbs/db/wal")).unwrap(),
        }
        let store = Store::open(options(&crash)).unwrap();
        let db = store.db("db").unwrap();
        assert_eq!(db.pos(), pos, "{cut}");
        db.verify().unwrap();
        let vfs = HookVfs::register(store.clone(), &env.dir.path().join("mnt2"));
        let c2 = vfs.open("db");
        let lost: i64 = c2
            .query_row("SELECT count(*) FROM t WHERE v = 'lost'", [], |r| r.get(0))
            .unwrap();
        assert_eq!(lost, 1, "{cut}");
        assert_eq!(
            c2.query_row("PRAGMA integrity_check", [], |r| r.get::<_, String>(0))
                .unwrap(),
            "ok"
        );
        c2.execute("INSERT INTO t(v) VALUES ('after')", []).unwrap();
        drop(c2);
        assert_eq!(vfs.errors(), Vec::<String>::new(), "{cut}");
        let (replayed, rpos) = replay(&crash, "db");
        assert_eq!(rpos, db.pos(), "{cut}");
        // The last connection closed: SQLite checkpointed everything into the database.
        assert!(
            replayed == fs::read(crash.join("dbs/db/database")).unwrap(),
            "{cut}: the chain does not reproduce the database"
        );
    }
}

/// Bytes of the WAL that are in LTX files may be written again only unchanged (a
/// kernel-split or repeated write); a change is refused, as is fatal for the node; a new
/// WAL generation (header with new salts) and anything past the captured frames are free.
#[test]
fn captured_wal_bytes_may_only_be_rewritten_unchanged() {
    let env = Env::new();
    let c = setup(&env, "wal");
    let db = env.store.db("db").unwrap();
    let wal = fs::read(env.data().join("dbs/db/wal")).unwrap();
    db.wal_write(0, &wal[..32]).unwrap();
    db.wal_write(32, &wal[32..56]).unwrap();
    db.wal_write(40, &wal[40..5000]).unwrap();
    let mut changed = wal[32..56].to_vec();
    changed[20] ^= 1;
    let err = db.wal_write(32, &changed).unwrap_err();
    assert!(
        matches!(err, StoreError::CapturedWalRewrite { offset: 32, .. }),
        "{err:?}"
    );
    let err = db.wal_write(56, &[0u8; 4096]).unwrap_err();
    assert!(
        matches!(err, StoreError::CapturedWalRewrite { .. }),
        "{err:?}"
    );
    db.wal_write(wal.len() as u64, &[1u8; 24]).unwrap();
    // A new generation: salt-1 changed, header checksum recomputed.
    let mut hdr = wal[..32].to_vec();
    hdr[16] ^= 1;
    let be = hdr[3] == 0x83;
    let (a, b) = litefs::store::wal::wal_checksum(be, &hdr[..24], (0, 0));
    hdr[24..28].copy_from_slice(&a.to_be_bytes());
    hdr[28..32].copy_from_slice(&b.to_be_bytes());
    db.wal_write(0, &hdr).unwrap();
    // Nothing was written by these calls: SQLite carries on.
    c.execute("INSERT INTO t(v) VALUES ('more')", []).unwrap();
    env.assert_no_hook_errors();
}

/// Corrupts one byte of page 2 of a database file, keeping its size.
fn corrupt_page_2(path: &Path, keep_mtime: bool) {
    let f = OpenOptions::new()
        .read(true)
        .write(true)
        .open(path)
        .unwrap();
    let mtime = f.metadata().unwrap().modified().unwrap();
    let mut b = [0u8; 1];
    f.read_exact_at(&mut b, 4096 + 100).unwrap();
    f.write_all_at(&[b[0] ^ 0xFF], 4096 + 100).unwrap();
    if keep_mtime {
        f.set_times(fs::FileTimes::new().set_modified(mtime))
            .unwrap();
    }
}

/// A database that disagrees with its LTX history is an error naming the database and
/// both checksums; nothing is repaired.
#[test]
fn recovery_mismatch_names_database_and_both_checksums() {
    let env = Env::new();
    drop(setup(&env, "delete"));
    let pos = env.store.db("db").unwrap().pos();
    // No clean shutdown: the store is simply abandoned, as in a crash.
    corrupt_page_2(&env.db_file("db"), false);
    let corrupted = fs::read(env.db_file("db")).unwrap();
    let actual = checksum_of(&env.db_file("db"), 4096);
    let err = Store::open(options(&env.data())).unwrap_err();
    assert!(
        matches!(err, StoreError::ChecksumMismatch { .. }),
        "{err:?}"
    );
    let msg = err.to_string();
    assert!(msg.contains("\"db\""), "{msg}");
    assert!(msg.contains(&pos.post_apply_checksum.to_string()), "{msg}");
    assert!(msg.contains(&actual.to_string()), "{msg}");
    assert!(
        fs::read(env.db_file("db")).unwrap() == corrupted,
        "never a silent repair"
    );
}

/// After a clean shutdown the record gives the checksums: start-up does not read the
/// database (shown by a corruption that keeps size and mtime going unnoticed), while
/// without the record the same files are refused.
#[test]
fn clean_shutdown_record_skips_rehash() {
    let mut env = Env::new();
    drop(setup(&env, "delete"));
    let pos = env.store.db("db").unwrap().pos();
    env.restart();
    assert_eq!(env.store.db("db").unwrap().pos(), pos);
    let record = env.data().join("dbs/db/clean-shutdown");
    assert!(!record.exists(), "the record is consumed at open");

    env.store.close().unwrap();
    assert!(record.exists());
    let saved = fs::read(&record).unwrap();
    corrupt_page_2(&env.db_file("db"), true);
    let store = Store::open(options(&env.data())).unwrap();
    assert_eq!(
        store.db("db").unwrap().pos(),
        pos,
        "record trusted: no re-hash"
    );
    assert!(store.db("db").unwrap().verify().is_err());
    drop(store);
    // Same files, no record: the full re-hash finds the corruption.
    let err = Store::open(options(&env.data())).unwrap_err();
    assert!(
        matches!(err, StoreError::ChecksumMismatch { .. }),
        "{err:?}"
    );
    // A record whose database file changed (mtime) is not trusted either.
    fs::write(&record, &saved).unwrap();
    let f = OpenOptions::new()
        .write(true)
        .open(env.db_file("db"))
        .unwrap();
    f.set_times(fs::FileTimes::new().set_modified(SystemTime::now() + Duration::from_secs(5)))
        .unwrap();
    assert!(matches!(
        Store::open(options(&env.data())),
        Err(StoreError::ChecksumMismatch { .. })
    ));
}

/// A WAL database reopened after a clean shutdown keeps capturing where it left off.
#[test]
fn clean_restart_in_wal_mode_continues_the_chain() {
    let mut env = Env::new();
    let c = setup(&env, "wal");
    c.execute_batch("PRAGMA wal_autocheckpoint=0; INSERT INTO t(v) VALUES ('c');")
        .unwrap();
    drop(c);
    env.restart();
    let c = env.open("db");
    c.execute_batch("INSERT INTO t(v) VALUES ('d');").unwrap();
    drop(c);
    env.restart();
    env.store.close().unwrap();
    // Without the record: the full path agrees.
    fs::remove_file(env.data().join("dbs/db/clean-shutdown")).unwrap();
    let store = Store::open(options(&env.data())).unwrap();
    let db = store.db("db").unwrap();
    db.verify().unwrap();
    let (replayed, pos) = replay(&env.data(), "db");
    assert_eq!(pos, db.pos());
    assert!(replayed == fs::read(env.db_file("db")).unwrap());
    env.assert_no_hook_errors();
}

fn set_mtime(path: &Path, t: SystemTime) {
    File::options()
        .write(true)
        .open(path)
        .unwrap()
        .set_times(fs::FileTimes::new().set_modified(t))
        .unwrap();
}

/// Retention removes LTX files older than the retention period by mtime, never the newest.
#[test]
fn retention_removes_old_files_and_keeps_the_newest() {
    let env = Env::new();
    let c = setup(&env, "delete");
    for i in 0..5 {
        c.execute("INSERT INTO t(v) VALUES (?1)", [format!("r{i}")])
            .unwrap();
    }
    drop(c);
    let dir = env.data().join("dbs/db/ltx");
    let files = list_ltx_files(&dir).unwrap();
    assert_eq!(files.len(), 7);
    let now = SystemTime::now();
    let old = now - Duration::from_secs(3600);
    // The three oldest are expired; the rest are recent.
    for f in &files[..3] {
        set_mtime(&f.path, old);
    }
    assert_eq!(env.store.retention_pass(now).unwrap(), 3);
    let left = list_ltx_files(&dir).unwrap();
    assert_eq!(left, files[3..]);
    // Everything expired: the newest still stays.
    for f in &left {
        set_mtime(&f.path, old);
    }
    assert_eq!(env.store.retention_pass(now).unwrap(), 3);
    assert_eq!(list_ltx_files(&dir).unwrap(), files[6..]);
    // Capture still continues from the kept position.
    let c = env.open("db");
    c.execute("INSERT INTO t(v) VALUES ('more')", []).unwrap();
    assert_eq!(list_ltx_files(&dir).unwrap().last().unwrap().max, TxId(8));
}

/// A deleted database's directory goes once its commit-0 file is past retention.
#[test]
fn retention_removes_expired_tombstones() {
    let env = Env::new();
    drop(setup(&env, "delete"));
    env.store.delete_db("db").unwrap();
    let dir = env.data().join("dbs/db");
    assert!(dir.exists());
    assert_eq!(env.store.retention_pass(SystemTime::now()).unwrap(), 0);
    assert!(dir.exists());
    assert!(
        env.store
            .retention_pass(SystemTime::now() + Duration::from_secs(3600))
            .unwrap()
            >= 1
    );
    assert!(!dir.exists());
    assert!(env.store.deleted_databases().is_empty());
}

/// The background thread runs passes on its own.
#[test]
fn retention_thread_runs() {
    let dir = tempfile::tempdir().unwrap();
    let mut opts = options(&dir.path().join("data"));
    opts.retention = Duration::ZERO;
    opts.retention_monitor_interval = Duration::from_millis(20);
    let store = Store::open(opts).unwrap();
    let vfs = HookVfs::register(store.clone(), &dir.path().join("mnt"));
    let c = vfs.open("db");
    c.execute_batch("CREATE TABLE t(x); INSERT INTO t VALUES (1); INSERT INTO t VALUES (2);")
        .unwrap();
    let ltx_dir = dir.path().join("data/dbs/db/ltx");
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while list_ltx_files(&ltx_dir).unwrap().len() > 1 {
        assert!(
            std::time::Instant::now() < deadline,
            "retention thread did not remove files"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    assert_eq!(list_ltx_files(&ltx_dir).unwrap()[0].max, TxId(3));
    store.close().unwrap();
}

/// Frequent checkpoints and WAL restarts (new salts, frames from offset 32 again), and
/// explicit PASSIVE/RESTART/TRUNCATE/FULL checkpoints: the chain stays contiguous and exact.
#[test]
fn wal_restarts_and_checkpoints_keep_the_chain_exact() {
    let env = Env::new();
    let c = setup(&env, "wal");
    c.execute_batch("PRAGMA wal_autocheckpoint=5;").unwrap();
    let db = env.store.db("db").unwrap();
    for i in 0..60 {
        c.execute(
            "INSERT INTO t(v, b) VALUES (?1, randomblob(1500))",
            [format!("w{i}")],
        )
        .unwrap();
        if i % 15 == 14 {
            let mode = ["PASSIVE", "RESTART", "TRUNCATE", "FULL"][i / 15];
            c.query_row(&format!("PRAGMA wal_checkpoint({mode})"), [], |_| Ok(()))
                .unwrap();
        }
        db.verify().unwrap();
    }
    drop(c);
    env.assert_no_hook_errors();
    let (replayed, pos) = replay(&env.data(), "db");
    assert_eq!(pos, db.pos());
    assert!(replayed == fs::read(env.db_file("db")).unwrap());
}

/// VACUUM to another page size in rollback mode rewrites every page: captured whole.
#[test]
fn page_size_change_by_vacuum() {
    let env = Env::new();
    let c = setup(&env, "delete");
    c.execute_batch(
        "INSERT INTO t(v, b) SELECT 'p' || value, randomblob(900) FROM s WHERE value <= 40;
         PRAGMA page_size=8192; VACUUM;",
    )
    .unwrap();
    let db = env.store.db("db").unwrap();
    assert_eq!(db.page_size(), Some(8192));
    c.execute("INSERT INTO t(v) VALUES ('after')", []).unwrap();
    drop(c);
    env.assert_no_hook_errors();
    db.verify().unwrap();
    let (replayed, pos) = replay(&env.data(), "db");
    assert_eq!(pos, db.pos());
    assert!(replayed == fs::read(env.db_file("db")).unwrap());
}

/// One writer and readers that checkpoint, on separate threads and connections: no hook
/// error, readers never see a torn transaction nor an error other than SQLITE_BUSY, one
/// LTX per commit, the chain reproduces.
fn writer_and_readers(mode: &str) {
    use std::sync::atomic::{AtomicBool, Ordering};
    let env = Env::new();
    let c = setup(&env, mode);
    c.execute_batch("CREATE TABLE pair(a INTEGER, b INTEGER); INSERT INTO pair VALUES (0, 0);")
        .unwrap();
    drop(c);
    let before = env.ltx_count("db");
    let stop = AtomicBool::new(false);
    std::thread::scope(|s| {
        let (env, stop) = (&env, &stop);
        for _ in 0..3 {
            s.spawn(move || {
                let r = env.open("db");
                r.busy_timeout(Duration::from_secs(10)).unwrap();
                let mut reads = 0;
                while !stop.load(Ordering::Relaxed) {
                    // Both columns change in one transaction: a torn read would differ.
                    // SQLITE_BUSY is the one error a reader may see (rollback mode).
                    let (a, b): (i64, i64) = match r.query_row("SELECT a, b FROM pair", [], |row| {
                        Ok((row.get(0)?, row.get(1)?))
                    }) {
                        Ok(v) => v,
                        Err(rusqlite::Error::SqliteFailure(e, _))
                            if e.code == rusqlite::ErrorCode::DatabaseBusy =>
                        {
                            continue;
                        }
                        Err(e) => panic!("reader: {e}"),
                    };
                    assert_eq!(a, b);
                    reads += 1;
                    if reads % 5 == 0 {
                        let _ = r.query_row("PRAGMA wal_checkpoint(PASSIVE)", [], |_| Ok(()));
                    }
                }
            });
        }
        let w = env.open("db");
        w.busy_timeout(Duration::from_secs(10)).unwrap();
        for i in 1..=300 {
            w.execute_batch(&format!(
                "BEGIN IMMEDIATE; UPDATE pair SET a = {i}; INSERT INTO t(v) VALUES ('x{i}'); UPDATE pair SET b = {i}; COMMIT;"
            ))
            .unwrap();
        }
        stop.store(true, Ordering::Relaxed);
    });
    // Connections closing at the same time may each leave the final checkpoint to the
    // other: copy whatever the WAL still holds into the database file before comparing.
    let c = env.open("db");
    let _: i64 = c
        .query_row("PRAGMA wal_checkpoint(TRUNCATE)", [], |r| r.get(0))
        .unwrap_or(0);
    drop(c);
    env.assert_no_hook_errors();
    let db = env.store.db("db").unwrap();
    db.verify().unwrap();
    assert_eq!(env.ltx_count("db"), before + 300);
    let (replayed, pos) = replay(&env.data(), "db");
    assert_eq!(pos, db.pos());
    assert!(replayed == fs::read(env.db_file("db")).unwrap());
}

#[test]
fn writer_and_readers_wal() {
    writer_and_readers("wal");
}

#[test]
fn writer_and_readers_delete() {
    writer_and_readers("delete");
}

fn testdata() -> PathBuf {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    root.ancestors()
        .skip(1)
        .map(|d| d.join("shared/testdata"))
        .find(|p| p.is_dir())
        .unwrap_or_else(|| root.join("../shared/testdata"))
}

/// A LiteFS 0.5 data directory (format-1 LTX history) opens at its position, and new
/// transactions continue its TXIDs in the current format.
#[test]
fn opens_a_litefs_data_directory() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    crate::store_vfs::copy_dir(&testdata().join("litefs-format1"), &data);
    let store = Store::open(options(&data)).unwrap();
    let db = store.db("sqlite.db").unwrap();
    assert_eq!(db.pos().to_string(), "000000000000000d/fe3831a381c602b9");
    assert_eq!(db.page_size(), Some(4096));
    db.verify().unwrap();
    let vfs = HookVfs::register(store.clone(), &dir.path().join("mnt"));
    let c = vfs.open("sqlite.db");
    let tables: i64 = c
        .query_row("SELECT count(*) FROM sqlite_master", [], |r| r.get(0))
        .unwrap();
    assert!(tables > 0);
    c.execute_batch("CREATE TABLE added(x); INSERT INTO added VALUES (1);")
        .unwrap();
    drop(c);
    assert_eq!(vfs.errors(), Vec::<String>::new());
    let files = list_ltx_files(&data.join("dbs/sqlite.db/ltx")).unwrap();
    assert_eq!(files.last().unwrap().max, TxId(0xd + 2));
    // Apply the new files to the old database: they continue its chain exactly.
    let copy = dir.path().join("copy.db");
    fs::copy(
        testdata().join("litefs-format1/dbs/sqlite.db/database"),
        &copy,
    )
    .unwrap();
    let f = OpenOptions::new()
        .read(true)
        .write(true)
        .open(&copy)
        .unwrap();
    let mut pos = Pos {
        txid: TxId(0xd),
        post_apply_checksum: ltx::Checksum(0xfe3831a381c602b9),
    };
    for lf in files.iter().filter(|f| f.min.0 > 0xd) {
        pos = ltx::apply_file(&f, Some(pos), &lf.path).unwrap();
    }
    assert_eq!(pos, db.pos());
    assert!(fs::read(&copy).unwrap() == fs::read(data.join("dbs/sqlite.db/database")).unwrap());
}

/// A database file placed in the data directory without history is captured as a
/// snapshot (TXID 1) at start-up.
#[test]
fn database_without_history_gets_a_snapshot() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    fs::create_dir_all(data.join("dbs/plain")).unwrap();
    let c = Connection::open(data.join("dbs/plain/database")).unwrap();
    series(&c);
    c.execute_batch(
        "CREATE TABLE t(v); INSERT INTO t SELECT randomblob(500) FROM s WHERE value <= 200;",
    )
    .unwrap();
    drop(c);
    let store = Store::open(options(&data)).unwrap();
    let db = store.db("plain").unwrap();
    assert_eq!(db.pos().txid, TxId(1));
    let (replayed, pos) = replay(&data, "plain");
    assert_eq!(pos, db.pos());
    assert!(replayed == fs::read(data.join("dbs/plain/database")).unwrap());
}

/// After a clean shutdown nothing may change: every hook fails.
#[test]
fn hooks_fail_after_close() {
    let env = Env::new();
    drop(setup(&env, "wal"));
    let db = env.store.db("db").unwrap();
    env.store.close().unwrap();
    assert!(matches!(
        db.database_written(0, 4096),
        Err(StoreError::Closed { .. })
    ));
    assert!(matches!(
        db.wal_write_lock_released(),
        Err(StoreError::Closed { .. })
    ));
    assert!(matches!(
        db.journal_unlink(),
        Err(StoreError::Closed { .. })
    ));
    assert!(matches!(
        env.store.create_db("other"),
        Err(StoreError::Closed { .. })
    ));
}

/// A random schedule of writes, rollbacks, savepoints, VACUUMs, checkpoints and journal
/// mode switches; after every step the in-memory checksum matches the files, and at the
/// end the chain reproduces the database. The seed is printed (set STORE_SEED to replay).
#[test]
fn random_schedule_keeps_chain_exact() {
    let seed: u64 = std::env::var("STORE_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| {
            SystemTime::now()
                .duration_since(SystemTime::UNIX_EPOCH)
                .unwrap()
                .as_nanos() as u64
        });
    println!("STORE_SEED={seed}");
    let mut x = seed | 1;
    let mut next = move |n: u64| {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        x % n
    };
    let env = Env::new();
    env.store.set_strict_verify(true);
    let c = setup(&env, "delete");
    let db = env.store.db("db").unwrap();
    let mut rows = count(&c);
    for step in 0..120 {
        let op = next(12);
        let sql = match op {
            0..=3 => {
                rows += 1;
                format!("INSERT INTO t(v, b) VALUES ('r{step}', randomblob({}))", next(9000))
            }
            4 => "UPDATE t SET b = randomblob(700) WHERE id % 3 = 0".to_string(),
            5 => {
                let sql = "DELETE FROM t WHERE id IN (SELECT id FROM t ORDER BY random() LIMIT 2)";
                c.execute_batch(sql).unwrap();
                rows = count(&c);
                continue;
            }
            6 => "BEGIN; INSERT INTO t(v, b) SELECT 'gone' || value, randomblob(2500) FROM s WHERE value <= 80; ROLLBACK".to_string(),
            7 => {
                rows += 1;
                format!("BEGIN; SAVEPOINT p; DELETE FROM t; ROLLBACK TO p; INSERT INTO t(v) VALUES ('sp{step}'); COMMIT")
            }
            8 => "VACUUM".to_string(),
            9 => ["PRAGMA journal_mode=wal", "PRAGMA journal_mode=delete", "PRAGMA journal_mode=truncate", "PRAGMA journal_mode=persist"]
                [next(4) as usize]
                .to_string(),
            10 => "PRAGMA wal_checkpoint(TRUNCATE)".to_string(),
            _ => "PRAGMA wal_checkpoint(PASSIVE)".to_string(),
        };
        c.execute_batch(&sql)
            .unwrap_or_else(|e| panic!("seed {seed} step {step} ({sql}): {e}"));
        db.verify()
            .unwrap_or_else(|e| panic!("seed {seed} step {step} ({sql}): {e}"));
        assert_eq!(count(&c), rows, "seed {seed} step {step} ({sql})");
    }
    drop(c);
    env.assert_no_hook_errors();
    let (replayed, pos) = replay(&env.data(), "db");
    assert_eq!(pos, db.pos(), "seed {seed}");
    assert!(
        replayed == fs::read(env.db_file("db")).unwrap(),
        "seed {seed}"
    );
}

/// With strict-verify a change made behind the store's back (not through the hooks) fails
/// the next commit point instead of going unnoticed until the next start-up.
#[test]
fn strict_verify_catches_writes_behind_the_store() {
    let env = Env::new();
    env.store.set_strict_verify(true);
    let c = setup(&env, "delete");
    c.execute_batch("CREATE TABLE u(x);").unwrap();
    let root: i64 = c
        .query_row(
            "SELECT rootpage FROM sqlite_master WHERE name = 'u'",
            [],
            |r| r.get(0),
        )
        .unwrap();
    env.assert_no_hook_errors();
    // The last byte of u's empty root page is unused by SQLite.
    let f = OpenOptions::new()
        .write(true)
        .open(env.db_file("db"))
        .unwrap();
    f.write_all_at(&[0x5A], root as u64 * 4096 - 1).unwrap();
    let _ = c.execute("INSERT INTO t(v) VALUES ('z')", []);
    let errors = env.vfs.errors();
    assert_eq!(errors.len(), 1, "{errors:?}");
    assert!(errors[0].contains("does not match"), "{errors:?}");
}

/// A commit is durable once its record is in `ltx-log`; the named file is fsynced later.
/// Files lost before that fsync (missing, cut short, zeroed) come back from the log at
/// start-up, byte for byte, in both journal modes; a file retention removed does not.
#[test]
fn ltx_files_lost_before_their_fsync_are_restored_from_the_log() {
    for mode in ["wal", "delete"] {
        let env = Env::new();
        let c = setup(&env, mode);
        for i in 0..10 {
            c.execute("INSERT INTO t(v) VALUES (?1)", [format!("r{i}")])
                .unwrap();
        }
        let pos = env.store.db("db").unwrap().pos();
        let files = list_ltx_files(&env.data().join("dbs/db/ltx")).unwrap();
        assert!(files.len() >= 8, "{mode}: {} files", files.len());
        let originals: Vec<Vec<u8>> = files.iter().map(|f| fs::read(&f.path).unwrap()).collect();
        // A crash: the store is not closed; its data directory is copied as it is.
        let crash = env.dir.path().join("crash");
        crate::store_vfs::copy_dir(&env.data(), &crash);
        let crash_files = list_ltx_files(&crash.join("dbs/db/ltx")).unwrap();
        let n = crash_files.len();
        // The oldest file was removed by retention: it must stay removed.
        fs::remove_file(&crash_files[0].path).unwrap();
        fs::remove_file(&crash_files[n - 1].path).unwrap();
        fs::remove_file(&crash_files[n - 2].path).unwrap();
        File::create(&crash_files[n - 3].path).unwrap();
        let len = originals[n - 4].len();
        fs::write(&crash_files[n - 4].path, vec![0u8; len]).unwrap();

        let store = Store::open(options(&crash)).unwrap();
        let db = store.db("db").unwrap();
        assert_eq!(db.pos(), pos, "{mode}");
        db.verify().unwrap();
        let after = list_ltx_files(&crash.join("dbs/db/ltx")).unwrap();
        assert_eq!(
            after.len(),
            n - 1,
            "{mode}: only the retained files come back"
        );
        assert_eq!(after[0].min, crash_files[1].min, "{mode}");
        for (f, orig) in after.iter().zip(&originals[1..]) {
            assert!(
                fs::read(&f.path).unwrap() == *orig,
                "{mode}: {}",
                f.path.display()
            );
        }
        // The chain from TXID 2 on still follows the file before it, and the store keeps
        // committing after the restore.
        let vfs = HookVfs::register(store.clone(), &env.dir.path().join("mnt2"));
        let c2 = vfs.open("db");
        c2.execute("INSERT INTO t(v) VALUES ('after')", []).unwrap();
        assert_eq!(vfs.errors(), Vec::<String>::new());
        assert_eq!(db.pos().txid.0, pos.txid.0 + 1, "{mode}");
    }
}
