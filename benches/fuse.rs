//! Write and read throughput through the FUSE mount versus the plain data directory,
//! measured side by side in one run (not a timed test).
//!
//! `cargo bench --bench fuse` (set `LITEFS_BENCH_SECS` to change the time per case,
//! default 3; `LITEFS_BENCH_THREADS` sets the mount's `/dev/fuse` request threads,
//! `LITEFS_BENCH_IO_URING=0` serves the mount from `/dev/fuse` only and
//! `LITEFS_BENCH_IO_URING=N` over io_uring with N threads per CPU, when the kernel offers
//! it). For each case the same program runs against a database in a plain
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

/// Point lookups per second on a warm 10,000-row table, `per_tx` lookups per read
/// transaction (1: each an autocommit SELECT, as most applications do).
fn lookups(path: &Path, per_tx: u64, secs: Duration) -> f64 {
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
        if per_tx > 1 {
            c.execute_batch("BEGIN").expect("begin");
        }
        for _ in 0..per_tx {
            x = x
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            let id = ((x >> 33) % 10_000 + 1) as i64;
            let _: String = stmt.query_row([id], |r| r.get(0)).expect("lookup");
        }
        if per_tx > 1 {
            c.execute_batch("COMMIT").expect("commit");
        }
        n += per_tx;
    }
    n as f64 / start.elapsed().as_secs_f64()
}

/// MB/s of reading a 32 MB database file again and again through one open file
/// (warm kernel page cache; the data path only).
fn file_reads(path: &Path, secs: Duration) -> f64 {
    use std::os::unix::fs::FileExt;
    if !path.exists() {
        let c = open(path, "delete", "full");
        c.execute(
            "INSERT INTO t (v) SELECT hex(randomblob(1024)) FROM
             (WITH RECURSIVE s(i) AS (SELECT 1 UNION ALL SELECT i + 1 FROM s WHERE i < 16000)
              SELECT i FROM s)",
            [],
        )
        .expect("fill");
    }
    let f = std::fs::File::open(path).expect("open");
    let len = f.metadata().expect("stat").len() as usize;
    let mut buf = vec![0u8; 1 << 20];
    let start = Instant::now();
    let mut bytes = 0usize;
    while start.elapsed() < secs {
        let mut off = 0;
        while off < len {
            let n = f.read_at(&mut buf, off as u64).expect("read");
            if n == 0 {
                break;
            }
            off += n;
        }
        bytes += off;
    }
    bytes as f64 / 1e6 / start.elapsed().as_secs_f64()
}

fn main() {
    // `cargo bench` passes `--bench`; another argument selects the cases whose name
    // contains it.
    let filter: Option<String> = std::env::args().skip(1).find(|a| !a.starts_with("--"));
    let wanted = |name: &str| filter.as_deref().is_none_or(|f| name.contains(f));
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
    let mut opts = MountOptions::new(&mnt, &data);
    if let Some(t) = std::env::var("LITEFS_BENCH_THREADS")
        .ok()
        .and_then(|s| s.parse().ok())
    {
        opts.threads = t;
    }
    if let Ok(v) = std::env::var("LITEFS_BENCH_IO_URING") {
        let n: usize = v
            .parse()
            .expect("LITEFS_BENCH_IO_URING: threads per CPU, 0 = off");
        opts.io_uring = n > 0;
        opts.io_uring_threads = n.max(1);
    }
    let mount = Mount::start(&opts, store.clone()).expect("mount");
    println!(
        "transport: {}",
        if mount.io_uring() {
            format!("io_uring, {} threads per CPU", opts.io_uring_threads)
        } else {
            "/dev/fuse".to_string()
        }
    );

    println!(
        "{:<28} {:>12} {:>12} {:>7}",
        "case", "plain/s", "mount/s", "ratio"
    );
    let cases = [("wal", "full"), ("wal", "normal"), ("delete", "full")];
    for (i, (jm, sync)) in cases.iter().enumerate() {
        let case = format!("insert tx {jm}+{sync}");
        if !wanted(&case) {
            continue;
        }
        let name = format!("w{i}.db");
        let p = inserts(&plain.join(&name), jm, sync, secs);
        let m = inserts(&mnt.join(&name), jm, sync, secs);
        println!("{case:<28} {p:>12.0} {m:>12.0} {:>7.2}", m / p);
    }
    for per_tx in [1, 100] {
        let case = format!("point lookup x{per_tx}/tx (wal)");
        if wanted(&case) {
            let p = lookups(&plain.join("r.db"), per_tx, secs);
            let m = lookups(&mnt.join("r.db"), per_tx, secs);
            println!("{case:<28} {p:>12.0} {m:>12.0} {:>7.2}", m / p);
        }
    }
    let case = "file read MB/s (warm)";
    if wanted(case) {
        let p = file_reads(&plain.join("big.db"), secs);
        let m = file_reads(&mnt.join("big.db"), secs);
        println!("{case:<28} {p:>12.0} {m:>12.0} {:>7.2}", m / p);
    }
    mount.unmount(Duration::from_secs(5)).expect("unmount");
    store.close().expect("close");
}
