//! Replication lag benchmark (ignored; run with
//! `cargo test --release --test it repl_bench -- --ignored --nocapture`): a primary and
//! a replica as real processes; the writer commits single-row transactions at a fixed
//! rate on the primary, a poller reads the replica's `<db>-pos` in a loop, and the lag
//! of each TXID is the time from the end of its commit on the primary to its first
//! sighting on the replica.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use rusqlite::Connection;

use crate::repl::{free_port, pos, primary, replica, wait_converged};

fn txid(p: &str) -> u64 {
    u64::from_str_radix(&p[..16], 16).unwrap()
}

fn run(rate: u32, seconds: u32) {
    let port = free_port();
    let p = primary(port, "");
    let r = replica(port);
    let c = Connection::open(p.path("lag.db")).unwrap();
    c.query_row("PRAGMA journal_mode=wal", [], |_| Ok(()))
        .unwrap();
    c.execute_batch("PRAGMA synchronous=NORMAL; CREATE TABLE t (id INTEGER PRIMARY KEY, v TEXT)")
        .unwrap();
    wait_converged(&p, &[&r], "lag.db");
    let start_txid = txid(&pos(&p, "lag.db").unwrap());
    let n = (rate * seconds) as usize;

    let stop = Arc::new(AtomicBool::new(false));
    let seen_path = r.path("lag.db-pos");
    let stop2 = stop.clone();
    let poller = std::thread::spawn(move || {
        let mut seen: Vec<(u64, Instant)> = Vec::new();
        let mut last = start_txid;
        while !stop2.load(Ordering::Relaxed) {
            if let Ok(s) = std::fs::read_to_string(&seen_path) {
                let t = txid(&s);
                let now = Instant::now();
                for x in last + 1..=t {
                    seen.push((x, now));
                }
                last = last.max(t);
            }
        }
        seen
    });
    let interval = Duration::from_secs_f64(1.0 / f64::from(rate));
    let t0 = Instant::now();
    let mut committed = Vec::with_capacity(n);
    for i in 0..n {
        let due = t0 + interval * i as u32;
        if let Some(d) = due.checked_duration_since(Instant::now()) {
            std::thread::sleep(d);
        }
        c.execute("INSERT INTO t (v) VALUES ('x')", []).unwrap();
        committed.push((start_txid + i as u64 + 1, Instant::now()));
    }
    let achieved = n as f64 / t0.elapsed().as_secs_f64();
    wait_converged(&p, &[&r], "lag.db");
    stop.store(true, Ordering::Relaxed);
    let seen = poller.join().unwrap();
    let seen: std::collections::HashMap<u64, Instant> = seen.into_iter().collect();
    let mut lags: Vec<Duration> = committed
        .iter()
        .map(|(t, at)| seen[t].saturating_duration_since(*at))
        .collect();
    lags.sort();
    let q = |f: f64| lags[((lags.len() as f64 * f) as usize).min(lags.len() - 1)];
    println!(
        "target {rate} tx/s, achieved {achieved:.0} tx/s, {n} tx: lag p50 {:?}, p99 {:?}, max {:?}",
        q(0.50),
        q(0.99),
        lags[lags.len() - 1]
    );
}

#[test]
#[ignore = "benchmark"]
fn repl_bench_lag() {
    run(100, 5);
    run(1000, 3);
}

/// Peak resident memory of a process (VmHWM), in MiB.
fn peak_rss_mib(pid: u32) -> f64 {
    let s = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let kb: f64 = s
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap();
    kb / 1024.0
}

/// Snapshot catch-up: a database of `LITEFS_BENCH_SNAPSHOT_MB` (default 256) MiB whose
/// early LTX files retention removed; a replica started afterwards gets it as one
/// snapshot. Prints MB/s (database size over the time from replica start to the
/// primary's position on its mount) and the replica's and primary's peak RSS.
#[test]
#[ignore = "benchmark"]
fn repl_bench_snapshot() {
    let mb: usize = std::env::var("LITEFS_BENCH_SNAPSHOT_MB")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(256);
    let port = free_port();
    let p = primary(port, "  retention: 1s\n  retention-monitor-interval: 1s\n");
    let mut c = Connection::open(p.path("big.db")).unwrap();
    c.execute_batch("CREATE TABLE t (id INTEGER PRIMARY KEY, v BLOB)")
        .unwrap();
    // In 8 transactions, so that retention can drop all but the last.
    for _ in 0..8 {
        let tx = c.transaction().unwrap();
        for _ in 0..mb * 1024 / 8 {
            tx.execute("INSERT INTO t (v) VALUES (randomblob(1000))", [])
                .unwrap();
        }
        tx.commit().unwrap();
    }
    assert!(crate::support::wait_until(Duration::from_secs(20), || {
        crate::support::ltx_files(&p.data, "big.db").len() == 1
    }));
    let size = std::fs::metadata(p.data.join("dbs/big.db/database"))
        .unwrap()
        .len();
    let t0 = Instant::now();
    let r = replica(port);
    wait_converged(&p, &[&r], "big.db");
    let took = t0.elapsed();
    println!(
        "snapshot catch-up of {:.0} MiB: {:?}, {:.0} MB/s (including replica start-up); \
         replica peak RSS {:.1} MiB, primary peak RSS {:.1} MiB",
        size as f64 / 1048576.0,
        took,
        size as f64 / 1e6 / took.as_secs_f64(),
        peak_rss_mib(r.pid()),
        peak_rss_mib(p.pid()),
    );
}
