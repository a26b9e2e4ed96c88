//! Write and read throughput through the FUSE mount versus the plain data directory,
//! measured side by side in one run (not a timed test).
//!
//! `cargo bench --bench fuse` (set `LITEFS_BENCH_SECS` to change the time per case,
//! default 3). For each case the same program runs against a database in a plain
//! directory and against one in the mount, on the same file system; the ratio is
//! mount / plain.

use std::path::Path;
use std::time::{Duration, Instant};

use litefs::fuse::{Mount, MountOptions};
use litefs::store::{Store, StoreOptions};
use rusqlite::Connection;

fn open(path: &Path, journal_mode: &str, synchronous: &str) -> Connection {
    let c = Connection::open(path).expect("open");
    let _: String = c
        .query_row(&format!("PRAGMA journal_mode={journal_mode}"), [], |r| {
            r.get(0)
        })
        .expect("journal_mode");
    c.pragma_update(None, "synchronous", synchronous)
        .expect("synchronous");
    c.execute_batch("CREATE TABLE IF NOT EXISTS t (id INTEGER PRIMARY KEY, v TEXT)")
        .expect("create");
    c
}

/// Single-row INSERT transactions per second.
fn inserts(path: &Path, journal_mode: &str, synchronous: &str, secs: Duration) -> f64 {
    let c = open(path, journal_mode, synchronous);
    let mut stmt = c.prepare("INSERT INTO t (v) VALUES (?1)").expect("prepare");
    let start = Instant::now();
    let mut n = 0u64;
    while start.elapsed() < secs {
        stmt.execute(["some value of a row"]).expect("insert");
        n += 1;
    }
    n as f64 / start.elapsed().as_secs_f64()
}

/// Point lookups per second on a warm 10,000-row table (each its own read
/// transaction, as an application's autocommit SELECT).
fn lookups(path: &Path, secs: Duration) -> f64 {
    let c = open(path, "wal", "normal");
    c.execute_batch(
        "BEGIN;
         WITH RECURSIVE s(i) AS (SELECT 1 UNION ALL SELECT i + 1 FROM s WHERE i < 10000)
         INSERT OR IGNORE INTO t (id, v) SELECT i, printf('value %d', i) FROM s;
         COMMIT;",
    )
    .expect("fill");
    let mut stmt = c.prepare("SELECT v FROM t WHERE id = ?1").expect("prepare");
    let mut x: u64 = 12345;
    let start = Instant::now();
    let mut n = 0u64;
    while start.elapsed() < secs {
        x = x
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        let id = (x >> 33) % 10_000 + 1;
        let _: String = stmt.query_row([id], |r| r.get(0)).expect("lookup");
        n += 1;
    }
    n as f64 / start.elapsed().as_secs_f64()
}

fn main() {
    // `cargo bench` passes `--bench`; any other argument filter is ignored.
    let secs = Duration::from_secs_f64(
        std::env::var("LITEFS_BENCH_SECS")
            .ok()
            .and_then(|s| s.parse().ok())
            .unwrap_or(3.0),
    );
    let tmp = tempfile::tempdir().expect("tempdir");
    let plain = tmp.path().join("plain");
    let data = tmp.path().join("data");
    let mnt = tmp.path().join("mnt");
    std::fs::create_dir_all(&plain).expect("plain dir");
    let store = Store::open(StoreOptions {
        data_dir: data.clone(),
        retention: Duration::from_secs(600),
        retention_monitor_interval: Duration::from_secs(60),
        node_id: 1,
    })
    .expect("store");
    let mount = Mount::start(&MountOptions::new(&mnt, &data), store.clone()).expect("mount");

    println!(
        "{:<28} {:>12} {:>12} {:>7}",
        "case", "plain/s", "mount/s", "ratio"
    );
    let cases = [("wal", "full"), ("wal", "normal"), ("delete", "full")];
    for (i, (jm, sync)) in cases.iter().enumerate() {
        let name = format!("w{i}.db");
        let p = inserts(&plain.join(&name), jm, sync, secs);
        let m = inserts(&mnt.join(&name), jm, sync, secs);
        println!(
            "{:<28} {:>12.0} {:>12.0} {:>7.2}",
            format!("insert tx {jm}+{sync}"),
            p,
            m,
            m / p
        );
    }
    let p = lookups(&plain.join("r.db"), secs);
    let m = lookups(&mnt.join("r.db"), secs);
    println!(
        "{:<28} {:>12.0} {:>12.0} {:>7.2}",
        "point lookup (wal)",
        p,
        m,
        m / p
    );
    mount.unmount(Duration::from_secs(5)).expect("unmount");
    store.close().expect("close");
}
