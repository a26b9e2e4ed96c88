//! Archive measurements (not timed tests): a primary as a real `litefs` process, each
//! case with baselines from the same run.
//!
//! `cargo bench --bench archive [lag]`. Settings from the environment:
//! `LITEFS_BENCH_RATE` (aggregate tx/s asked, default 1000), `LITEFS_BENCH_WRITERS`
//! (databases written in parallel, one writer thread each, default 4),
//! `LITEFS_BENCH_SECS` (default 10), `LITEFS_BENCH_SYNC_MS` (`backup.sync-interval`,
//! default 1000, the default setting), `LITEFS_BENCH_MAX_FILES`
//! (`backup.max-files-per-sync`, default 256, the default setting).
//!
//! - **lag**: every writer commits single-row transactions (WAL, `synchronous=NORMAL`)
//!   on its own database at RATE/WRITERS per second. A poller reads the primary's
//!   `/metrics` every 2 ms; the archive lag of a TXID is the time from the end of its
//!   commit to the first scrape whose `litefs_archive_txid{db}` is at or above it
//!   (its level-0 file and the positions object are stored: the archive can restore
//!   it). Cases: the archive in `moto_server` (S3) and in a local directory (moto's
//!   share). Baselines: the same paced writers on a plain directory and on a mount
//!   without `backup` (commit rates achieved).

#[path = "../tests/it/support/mod.rs"]
mod support;

use std::collections::HashMap;
use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use rusqlite::Connection;
use support::{Process, free_port, start_moto};

fn env_u32(key: &str, default: u32) -> u32 {
    std::env::var(key)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

/// A static primary serving HTTP on `port`, with `backup` YAML (may be empty).
fn primary(port: u16, backup: &str) -> Process {
    let backup = backup.to_string();
    Process::start_with(move |mnt, data| {
        format!(
            "fuse:\n  dir: {}\ndata:\n  dir: {}\nlease:\n  type: static\n  candidate: true\n  hostname: primary\n  advertise-url: http://127.0.0.1:{port}\nhttp:\n  addr: 127.0.0.1:{port}\n{backup}",
            mnt.display(),
            data.display()
        )
    })
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

/// One writer's commits: (TXID, end of commit).
type Commits = Vec<(u64, Instant)>;

/// Runs `writers` threads, each committing single-row transactions on its own database
/// in `dir` at `rate / writers` per second for `secs`; returns each database's commits
/// (TXIDs counted from the one in `<db>-pos` after the set-up when `pos` is set, else
/// from 0) and the aggregate rate achieved.
fn paced_writers(
    dir: &Path,
    writers: u32,
    rate: u32,
    secs: u32,
    pos: bool,
) -> (HashMap<String, Commits>, f64) {
    let per = f64::from(rate) / f64::from(writers);
    let interval = Duration::from_secs_f64(1.0 / per);
    let n = (per * f64::from(secs)) as usize;
    let t0 = Instant::now();
    let handles: Vec<_> = (0..writers)
        .map(|w| {
            let name = format!("w{w}.db");
            let path = dir.join(&name);
            let pos_path = dir.join(format!("{name}-pos"));
            std::thread::spawn(move || {
                let c = open(&path);
                let base = if pos {
                    let s = std::fs::read_to_string(&pos_path).expect("pos");
                    u64::from_str_radix(&s[..16], 16).expect("txid")
                } else {
                    0
                };
                let start = Instant::now();
                let mut commits = Vec::with_capacity(n);
                for i in 0..n {
                    let due = start + interval * i as u32;
                    if let Some(d) = due.checked_duration_since(Instant::now()) {
                        std::thread::sleep(d);
                    }
                    c.execute("INSERT INTO t (v) VALUES ('x')", [])
                        .expect("insert");
                    commits.push((base + i as u64 + 1, Instant::now()));
                }
                (name, commits)
            })
        })
        .collect();
    let all: HashMap<String, Commits> = handles
        .into_iter()
        .map(|h| h.join().expect("writer"))
        .collect();
    let total: usize = all.values().map(Vec::len).sum();
    (all, total as f64 / t0.elapsed().as_secs_f64())
}

/// `litefs_archive_txid` per database from a `/metrics` text.
fn archive_txids(metrics: &str) -> HashMap<String, u64> {
    metrics
        .lines()
        .filter_map(|l| l.strip_prefix("litefs_archive_txid{db=\""))
        .filter_map(|l| {
            let (db, rest) = l.split_once("\"} ")?;
            Some((db.to_string(), rest.trim().parse().ok()?))
        })
        .collect()
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1e3
}

/// Archive lag through a primary archiving with `backup` YAML; returns a result line.
fn archive_case(label: &str, backup: &str, writers: u32, rate: u32, secs: u32) -> String {
    let port = free_port();
    let p = primary(port, backup);
    let stop = Arc::new(AtomicBool::new(false));
    let stop2 = stop.clone();
    // Each database's archive TXIDs as first seen: (txid, when).
    let poller = std::thread::spawn(move || {
        let mut seen: HashMap<String, Vec<(u64, Instant)>> = HashMap::new();
        while !stop2.load(Ordering::Relaxed) {
            let text = support::http_get_text(port, "/metrics");
            let now = Instant::now();
            for (db, t) in archive_txids(&text) {
                let v = seen.entry(db).or_default();
                if v.last().is_none_or(|&(last, _)| t > last) {
                    v.push((t, now));
                }
            }
            std::thread::sleep(Duration::from_millis(2));
        }
        seen
    });
    let (commits, achieved) = paced_writers(&p.mnt, writers, rate, secs, true);
    // Until every last commit is archived (or two minutes).
    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        let now = archive_txids(&support::http_get_text(port, "/metrics"));
        let done = commits
            .iter()
            .all(|(db, c)| now.get(db).copied().unwrap_or(0) >= c.last().map_or(0, |x| x.0));
        if done || Instant::now() > deadline {
            break;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    std::thread::sleep(Duration::from_millis(20));
    stop.store(true, Ordering::Relaxed);
    let seen = poller.join().expect("poller");
    let mut lags = Vec::new();
    let mut missing = 0;
    for (db, cs) in &commits {
        let s = seen.get(db).map(Vec::as_slice).unwrap_or(&[]);
        for &(txid, at) in cs {
            match s.iter().find(|(t, _)| *t >= txid) {
                Some(&(_, when)) => lags.push(when.saturating_duration_since(at)),
                None => missing += 1,
            }
        }
    }
    lags.sort();
    if lags.is_empty() {
        return format!("{label}: nothing archived; log:\n{}", p.log_text());
    }
    let q = |f: f64| lags[((lags.len() as f64 * f) as usize).min(lags.len() - 1)];
    format!(
        "{label}: {achieved:.0} tx/s committed over {writers} databases; archive lag p50 {:.0} ms, \
         p99 {:.0} ms, max {:.0} ms ({} commits{})",
        ms(q(0.50)),
        ms(q(0.99)),
        ms(lags[lags.len() - 1]),
        lags.len(),
        if missing > 0 {
            format!(", {missing} not archived within 2 min")
        } else {
            String::new()
        }
    )
}

fn lag(plain: &Path) {
    let rate = env_u32("LITEFS_BENCH_RATE", 1000);
    let writers = env_u32("LITEFS_BENCH_WRITERS", 4).max(1);
    let secs = env_u32("LITEFS_BENCH_SECS", 10);
    let sync = env_u32("LITEFS_BENCH_SYNC_MS", 1000);
    let max_files = env_u32("LITEFS_BENCH_MAX_FILES", 256);
    println!(
        "archive lag: {rate} tx/s asked over {writers} databases, {secs} s, sync-interval \
         {sync}ms, max-files-per-sync {max_files}"
    );
    let tuning = format!("  sync-interval: {sync}ms\n  max-files-per-sync: {max_files}\n");
    let (_, plain_rate) = paced_writers(plain, writers, rate, secs, false);
    println!("baseline plain directory: {plain_rate:.0} tx/s committed");
    {
        let p = primary(free_port(), "");
        let (_, mount_rate) = paced_writers(&p.mnt, writers, rate, secs, true);
        println!("baseline mount without backup: {mount_rate:.0} tx/s committed");
    }
    let archive = plain.join("archive");
    println!(
        "{}",
        archive_case(
            "file archive",
            &format!(
                "backup:\n  type: file\n  path: {}\n{tuning}",
                archive.display()
            ),
            writers,
            rate,
            secs
        )
    );
    let moto = start_moto();
    println!(
        "{}",
        archive_case(
            "s3 (moto_server)",
            &format!(
                "backup:\n  type: s3\n  bucket: archive\n  path: bench\n  endpoint: http://127.0.0.1:{}\n  region: us-east-1\n  access-key-id: test\n  secret-access-key: test\n  force-path-style: true\n{tuning}",
                moto.1
            ),
            writers,
            rate,
            secs
        )
    );
}

fn main() {
    // `cargo bench` passes `--bench`; another argument selects the cases whose name
    // contains it.
    let filter: Option<String> = std::env::args().skip(1).find(|a| !a.starts_with("--"));
    let wanted = |name: &str| filter.as_deref().is_none_or(|f| name.contains(f));
    let tmp = tempfile::tempdir().expect("tempdir");
    if wanted("lag") {
        lag(tmp.path());
    }
}
