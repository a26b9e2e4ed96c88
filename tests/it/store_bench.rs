//! Measurements of the store's cost, not run by default:
//! `cargo test --release --test it store_bench -- --ignored --nocapture --test-threads 1`.
//! Each still checks that what it measured really happened (the LTX count, the position).

use std::path::Path;
use std::time::{Duration, Instant};

use litefs::store::{Store, StoreOptions, list_ltx_files};
use rusqlite::Connection;

use crate::store_vfs::HookVfs;

fn options(data_dir: &Path) -> StoreOptions {
    StoreOptions {
        data_dir: data_dir.to_path_buf(),
        retention: Duration::from_secs(600),
        retention_monitor_interval: Duration::ZERO,
        node_id: 1,
    }
}

/// Single-row INSERT transactions for `secs`; returns transactions per second.
fn insert_rate(c: &Connection, mode: &str, sync: &str, secs: f64) -> (f64, u64) {
    c.execute_batch(&format!(
        "PRAGMA journal_mode={mode}; PRAGMA synchronous={sync}; CREATE TABLE t(id INTEGER PRIMARY KEY, v TEXT);"
    ))
    .unwrap();
    let start = Instant::now();
    let mut n = 0u64;
    while start.elapsed().as_secs_f64() < secs {
        c.execute(
            "INSERT INTO t(v) VALUES ('some value of a typical row size, about sixty bytes')",
            [],
        )
        .unwrap();
        n += 1;
    }
    (n as f64 / start.elapsed().as_secs_f64(), n)
}

#[test]
#[ignore = "measurement"]
fn store_bench_commit_rate() {
    for (mode, sync) in [("wal", "full"), ("wal", "normal"), ("delete", "full")] {
        let dir = tempfile::tempdir().unwrap();
        let plain = Connection::open(dir.path().join("plain.db")).unwrap();
        let (plain_rate, _) = insert_rate(&plain, mode, sync, 3.0);
        let store = Store::open(options(&dir.path().join("data"))).unwrap();
        let vfs = HookVfs::register(store.clone(), &dir.path().join("mnt"));
        let c = vfs.open("db");
        let before = 2; // journal_mode (WAL only) + CREATE TABLE
        let (rate, n) = insert_rate(&c, mode, sync, 3.0);
        drop(c);
        assert_eq!(vfs.errors(), Vec::<String>::new());
        let files = list_ltx_files(&dir.path().join("data/dbs/db/ltx"))
            .unwrap()
            .len() as u64;
        assert!(
            files == n + before || files == n + before - 1,
            "{files} LTX files for {n} inserts"
        );
        println!(
            "{mode}+{sync}: plain {plain_rate:.0} tx/s, with capture {rate:.0} tx/s ({:.2}x)",
            rate / plain_rate
        );
    }
}

#[test]
#[ignore = "measurement"]
fn store_bench_startup_1gb() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let dbdir = data.join("dbs/big");
    std::fs::create_dir_all(&dbdir).unwrap();
    {
        let c = Connection::open(dbdir.join("database")).unwrap();
        c.execute_batch("PRAGMA page_size=4096; PRAGMA journal_mode=delete; PRAGMA synchronous=off; CREATE TABLE t(b BLOB);")
            .unwrap();
        c.execute_batch("BEGIN;").unwrap();
        for _ in 0..1024 {
            c.execute("INSERT INTO t VALUES (randomblob(1048576))", [])
                .unwrap();
        }
        c.execute_batch("COMMIT;").unwrap();
    }
    let size = std::fs::metadata(dbdir.join("database")).unwrap().len();
    // First open: no history, so the database is captured as TXID 1.
    let t = Instant::now();
    let store = Store::open(options(&data)).unwrap();
    let first = t.elapsed();
    let pos = store.db("big").unwrap().pos();
    store.close().unwrap();
    drop(store);

    let t = Instant::now();
    let store = Store::open(options(&data)).unwrap();
    let with_record = t.elapsed();
    assert_eq!(store.db("big").unwrap().pos(), pos);
    drop(store); // no close: no record

    let t = Instant::now();
    let store = Store::open(options(&data)).unwrap();
    let without_record = t.elapsed();
    assert_eq!(store.db("big").unwrap().pos(), pos);
    println!(
        "{} MB database: first open (snapshot LTX) {:.2?}, open with clean-shutdown record {:.2?}, open with full re-hash {:.2?}",
        size >> 20,
        first,
        with_record,
        without_record
    );
}
