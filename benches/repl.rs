//! Replication measurements (not timed tests): a primary and a replica as real `litefs`
//! processes on 127.0.0.1, each case with a plain baseline in the same run.
//!
//! `cargo bench --bench repl [CASE]` with CASE one of `lag` (`lag1`: one writer,
//! `lag4`: four), `catchup`, `snapshot` (default: all). `LITEFS_BENCH_LAG_DUMP=FILE`
//! writes each lag case's commit times and lags (ms) to FILE, for plotting. `LITEFS_BENCH_SNAPSHOT_MB` sets the snapshot database size (default
//! 1024).
//!
//! - **lag**: a writer commits single-row transactions (WAL, `synchronous=NORMAL`) at a
//!   fixed rate on the primary while a poller reads the replica's `<db>-pos` in a loop
//!   (0.5 ms pause between rounds);
//!   the lag of a TXID is the time from the end of its commit to its first sighting.
//!   Baseline: the same paced writer on a plain directory (the rate it achieves). The
//!   1,000 tx/s case runs once with one writer and once with four writers on four
//!   databases at 250 tx/s each (the stream then serves several databases per round;
//!   the achieved rate is printed, as a busy machine may keep the writers below it).
//! - **catchup**: the replica is stopped, the primary commits transactions, the replica
//!   starts again; files applied per second from its first applied file to the
//!   primary's position (process start excluded). Baseline: the same transactions on a
//!   plain directory (commits per second): a ratio above 1 means a replica keeps up with
//!   a writer that does not replicate at all.
//! - **snapshot**: a database whose early LTX files retention removed; a replica started
//!   afterwards gets it as one snapshot. MB/s from replica start to the primary's
//!   position on its mount, peak RSS of both processes. Baseline: copying the
//!   primary's database file on the same file system.

#[path = "../tests/it/support/mod.rs"]
mod support;

use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use rusqlite::Connection;
use support::{Process, free_port, wait_until};

fn primary(port: u16, extra: &str) -> Process {
    let extra = extra.to_string();
    Process::start_with(move |mnt, data| {
        format!(
            "fuse:\n  dir: {}\ndata:\n  dir: {}\n{extra}lease:\n  type: static\n  candidate: true\n  hostname: primary-host\n  advertise-url: http://127.0.0.1:{port}\nhttp:\n  addr: 127.0.0.1:{port}\n",
            mnt.display(),
            data.display()
        )
    })
}

fn replica(port: u16) -> Process {
    Process::start_with(move |mnt, data| {
        format!(
            "fuse:\n  dir: {}\ndata:\n  dir: {}\nlease:\n  type: static\n  candidate: false\n  advertise-url: http://127.0.0.1:{port}\nhttp:\n  addr: 127.0.0.1:{}\n",
            mnt.display(),
            data.display(),
            free_port()
        )
    })
}

fn pos(p: &Process, db: &str) -> Option<String> {
    std::fs::read_to_string(p.path(&format!("{db}-pos"))).ok()
}

fn txid(pos: &str) -> u64 {
    u64::from_str_radix(&pos[..16], 16).expect("pos")
}

fn wait_converged(p: &Process, r: &Process, db: &str, timeout: Duration) {
    let want = pos(p, db).expect("primary has the database");
    assert!(
        wait_until(timeout, || pos(r, db).as_deref() == Some(&want)),
        "replica did not converge; its log:\n{}",
        r.log_text()
    );
}

fn open(path: &Path) -> Connection {
    let c = Connection::open(path).expect("open");
    c.busy_timeout(Duration::from_secs(5)).expect("busy");
    let _: String = c
        .query_row("PRAGMA journal_mode=wal", [], |r| r.get(0))
        .expect("wal");
    c.execute_batch(
        "PRAGMA synchronous=NORMAL; CREATE TABLE IF NOT EXISTS t (id INTEGER PRIMARY KEY, v TEXT)",
    )
    .expect("create");
    c
}

/// Commits `n` single-row transactions at `rate` per second on `c`; returns the commit
/// end times and the achieved rate.
fn paced(c: &Connection, rate: u32, n: usize) -> (Vec<Instant>, f64) {
    let interval = Duration::from_secs_f64(1.0 / f64::from(rate));
    let t0 = Instant::now();
    let mut done = Vec::with_capacity(n);
    for i in 0..n {
        let due = t0 + interval * i as u32;
        if let Some(d) = due.checked_duration_since(Instant::now()) {
            std::thread::sleep(d);
        }
        c.execute("INSERT INTO t (v) VALUES ('x')", [])
            .expect("insert");
        done.push(Instant::now());
    }
    (done, n as f64 / t0.elapsed().as_secs_f64())
}

/// Pause between two rounds of reading the replica's `<db>-pos` files: adds at most this
/// much to a measured lag, and keeps the poller from taking a core of its own.
const POLL_PAUSE: Duration = Duration::from_micros(500);

/// Runs `ndb` paced writers in parallel, each on its own database (`name(i)`) at
/// `rate / ndb` tx/s; returns each writer's commit end times and the aggregate rate.
fn paced_parallel(
    ndb: usize,
    rate: u32,
    n: usize,
    path: impl Fn(usize) -> std::path::PathBuf,
) -> (Vec<Vec<Instant>>, f64) {
    let t0 = Instant::now();
    let each = rate / ndb as u32;
    let threads: Vec<_> = (0..ndb)
        .map(|i| {
            let c = open(&path(i));
            std::thread::spawn(move || paced(&c, each, n / ndb).0)
        })
        .collect();
    let done: Vec<Vec<Instant>> = threads
        .into_iter()
        .map(|t| t.join().expect("writer"))
        .collect();
    let total: usize = done.iter().map(Vec::len).sum();
    (done, total as f64 / t0.elapsed().as_secs_f64())
}

/// Lag at `rate` tx/s in all, written by `ndb` writers on as many databases.
fn lag(rate: u32, seconds: u32, ndb: usize, plain_dir: &Path) {
    let n = (rate * seconds) as usize / ndb * ndb;
    let (_, plain_rate) = paced_parallel(ndb, rate, n, |i| {
        plain_dir.join(format!("lag{rate}-{ndb}-{i}.db"))
    });
    let port = free_port();
    let p = primary(port, "");
    let r = replica(port);
    let names: Vec<String> = (0..ndb).map(|i| format!("lag{i}.db")).collect();
    for name in &names {
        drop(open(&p.path(name)));
        wait_converged(&p, &r, name, Duration::from_secs(30));
    }
    let starts: Vec<u64> = names
        .iter()
        .map(|name| txid(&pos(&p, name).expect("pos")))
        .collect();
    // The poller stops once told to and once it saw every database's last TXID.
    let stop = Arc::new(AtomicBool::new(false));
    let per = (n / ndb) as u64;
    let seen_paths: Vec<_> = names.iter().map(|n| r.path(&format!("{n}-pos"))).collect();
    let (stop2, starts2) = (stop.clone(), starts.clone());
    let poller = std::thread::spawn(move || {
        let mut seen: Vec<Vec<(u64, Instant)>> = vec![Vec::new(); starts2.len()];
        let mut last = starts2.clone();
        while !(stop2.load(Ordering::Relaxed)
            && last.iter().zip(&starts2).all(|(l, s)| *l >= s + per))
        {
            for (i, path) in seen_paths.iter().enumerate() {
                if let Ok(s) = std::fs::read_to_string(path) {
                    let t = txid(&s);
                    let now = Instant::now();
                    for x in last[i] + 1..=t {
                        seen[i].push((x, now));
                    }
                    last[i] = last[i].max(t);
                }
            }
            // A poller that spins takes a core from the two nodes it measures.
            std::thread::sleep(POLL_PAUSE);
        }
        seen
    });
    let (done, achieved) = paced_parallel(ndb, rate, n, |i| p.path(&names[i]));
    for name in &names {
        wait_converged(&p, &r, name, Duration::from_secs(60));
    }
    stop.store(true, Ordering::Relaxed);
    let seen: Vec<std::collections::HashMap<u64, Instant>> = poller
        .join()
        .expect("poller")
        .into_iter()
        .map(|v| v.into_iter().collect())
        .collect();
    let mut timeline: Vec<(Instant, Duration)> = done
        .iter()
        .enumerate()
        .flat_map(|(d, times)| {
            let (seen, start) = (&seen[d], starts[d]);
            times.iter().enumerate().map(move |(i, at)| {
                (
                    *at,
                    seen[&(start + i as u64 + 1)].saturating_duration_since(*at),
                )
            })
        })
        .collect();
    if let Some(path) = std::env::var_os("LITEFS_BENCH_LAG_DUMP") {
        // Commit time (ms from the first commit) and lag (ms) of every transaction.
        timeline.sort_by_key(|(at, _)| *at);
        let t0 = timeline.first().map(|(at, _)| *at);
        let lines: String = timeline
            .iter()
            .map(|(at, lag)| {
                let since = t0.map_or(0.0, |t| at.duration_since(t).as_secs_f64() * 1e3);
                format!("{since:.3} {:.3}\n", lag.as_secs_f64() * 1e3)
            })
            .collect();
        std::fs::write(&path, lines).expect("LITEFS_BENCH_LAG_DUMP");
    }
    let mut lags: Vec<Duration> = timeline.into_iter().map(|(_, l)| l).collect();
    lags.sort();
    let q = |f: f64| lags[((lags.len() as f64 * f) as usize).min(lags.len() - 1)];
    println!(
        "lag @ {rate} tx/s ({n} tx, {ndb} writer(s) on as many databases): achieved \
         {achieved:.0} tx/s (plain {plain_rate:.0}, ratio {:.2}); lag p50 {:.2} ms, \
         p99 {:.2} ms, max {:.2} ms",
        achieved / plain_rate,
        q(0.50).as_secs_f64() * 1e3,
        q(0.99).as_secs_f64() * 1e3,
        lags[lags.len() - 1].as_secs_f64() * 1e3
    );
}

fn catchup(n: usize, plain_dir: &Path) {
    let insert_all = |c: &Connection| {
        let t0 = Instant::now();
        for _ in 0..n {
            c.execute("INSERT INTO t (v) VALUES ('x')", [])
                .expect("insert");
        }
        n as f64 / t0.elapsed().as_secs_f64()
    };
    let plain_rate = insert_all(&open(&plain_dir.join("catchup.db")));
    let port = free_port();
    let p = primary(port, "");
    let mut r = replica(port);
    let c = open(&p.path("app.db"));
    wait_converged(&p, &r, "app.db", Duration::from_secs(30));
    let from = txid(&pos(&r, "app.db").expect("pos"));
    assert!(r.signal(libc::SIGTERM).success());
    let primary_rate = insert_all(&c);
    let to = txid(&pos(&p, "app.db").expect("pos"));
    r.spawn();
    // From the first applied file to the last.
    let mut first: Option<(Instant, u64)> = None;
    let deadline = Instant::now() + Duration::from_secs(300);
    let end = loop {
        std::thread::sleep(Duration::from_micros(500));
        let now = Instant::now();
        assert!(now < deadline, "no catch-up; log:\n{}", r.log_text());
        let Some(t) = pos(&r, "app.db").map(|s| txid(&s)) else {
            continue;
        };
        if t > from && first.is_none() {
            first = Some((now, t));
        }
        if t == to {
            break now;
        }
    };
    let (t0, x0) = first.expect("saw the first file");
    let rate = (to - x0) as f64 / end.duration_since(t0).as_secs_f64();
    println!(
        "catch-up of {} files: replica applies {rate:.0} files/s (plain commits {plain_rate:.0} \
         tx/s, ratio {:.2}; the primary committed them at {primary_rate:.0} tx/s)",
        to - from,
        rate / plain_rate
    );
}

/// Peak resident memory of a process (VmHWM), in MiB.
fn peak_rss_mib(pid: u32) -> f64 {
    let s = std::fs::read_to_string(format!("/proc/{pid}/status")).expect("status");
    let kb: f64 = s
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .expect("VmHWM");
    kb / 1024.0
}

fn snapshot(mb: usize, plain_dir: &Path) {
    let port = free_port();
    let p = primary(port, "  retention: 1s\n  retention-monitor-interval: 1s\n");
    let mut c = Connection::open(p.path("big.db")).expect("open");
    c.execute_batch("CREATE TABLE t (id INTEGER PRIMARY KEY, v BLOB)")
        .expect("create");
    // In 8 transactions, so that retention can drop all but the last.
    for _ in 0..8 {
        let tx = c.transaction().expect("begin");
        tx.execute(
            "INSERT INTO t (v) SELECT randomblob(1000) FROM
             (WITH RECURSIVE s(i) AS (SELECT 1 UNION ALL SELECT i + 1 FROM s WHERE i < ?1)
              SELECT i FROM s)",
            [(mb * 1024 / 8) as i64],
        )
        .expect("fill");
        tx.commit().expect("commit");
    }
    drop(c);
    assert!(wait_until(Duration::from_secs(60), || {
        support::ltx_files(&p.data, "big.db").len() == 1
    }));
    let db = p.data.join("dbs/big.db/database");
    let size = std::fs::metadata(&db).expect("stat").len();
    let copy = plain_dir.join("copy.db");
    let t0 = Instant::now();
    std::fs::copy(&db, &copy).expect("copy");
    std::fs::File::open(&copy)
        .and_then(|f| f.sync_all())
        .expect("fsync");
    let plain = size as f64 / 1e6 / t0.elapsed().as_secs_f64();
    std::fs::remove_file(&copy).expect("remove copy");
    let t0 = Instant::now();
    let r = replica(port);
    wait_converged(&p, &r, "big.db", Duration::from_secs(600));
    let took = t0.elapsed();
    let rate = size as f64 / 1e6 / took.as_secs_f64();
    println!(
        "snapshot catch-up of {:.0} MiB: {took:.2?}, {rate:.0} MB/s including replica start-up \
         (plain copy + fsync {plain:.0} MB/s, ratio {:.2}); peak RSS replica {:.1} MiB, \
         primary {:.1} MiB",
        size as f64 / 1048576.0,
        rate / plain,
        peak_rss_mib(r.pid()),
        peak_rss_mib(p.pid()),
    );
}

fn main() {
    // `cargo bench` passes `--bench`; another argument selects the cases whose name
    // contains it.
    let filter: Option<String> = std::env::args().skip(1).find(|a| !a.starts_with("--"));
    let wanted = |name: &str| filter.as_deref().is_none_or(|f| name.contains(f));
    let tmp = tempfile::tempdir().expect("tempdir");
    let plain = tmp.path();
    if wanted("lag1") {
        lag(100, 5, 1, plain);
        lag(1000, 3, 1, plain);
    }
    if wanted("lag4") {
        lag(1000, 3, 4, plain);
    }
    if wanted("catchup") {
        catchup(5000, plain);
    }
    if wanted("snapshot") {
        let mb = std::env::var("LITEFS_BENCH_SNAPSHOT_MB")
            .ok()
            .and_then(|v| v.parse().ok())
            .unwrap_or(1024);
        snapshot(mb, plain);
    }
}
