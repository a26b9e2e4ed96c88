//! Write forwarding with real nodes: a replica's SQLite writes through the HALT lock
//! (`<db>-lock` byte 72, `litefs run -with-halt-lock-on`), the primary's `/halt` and
//! `/tx` refuse what does not hold the lock or does not follow, and the lock expires.

use std::fs::{File, OpenOptions};
use std::os::fd::AsRawFd;
use std::os::unix::process::CommandExt;
use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use rusqlite::{Connection, ErrorCode};

use crate::repl::{free_port, pos, replica, wait_converged};
use crate::support::{Process, http_request, ltx_files, wait_until};

/// A static primary on `port` whose HALT locks last `ttl`.
fn primary(port: u16, ttl: &str) -> Process {
    primary_with(port, &format!("  halt-lock-ttl: {ttl}\n"))
}

/// A static primary on `port` with extra lines in its `http` section.
fn primary_with(port: u16, http: &str) -> Process {
    let http = http.to_string();
    Process::start_with(move |mnt, data| {
        format!(
            "fuse:\n  dir: {}\ndata:\n  dir: {}\nlease:\n  type: static\n  candidate: true\n  hostname: primary-host\n  advertise-url: http://127.0.0.1:{port}\nhttp:\n  addr: 127.0.0.1:{port}\n{http}",
            mnt.display(),
            data.display()
        )
    })
}

/// A replica of the primary on `port` with `http.auth-token: token`.
fn replica_with_token(port: u16, token: &str) -> Process {
    let token = token.to_string();
    Process::start_with(move |mnt, data| {
        format!(
            "{}  auth-token: {token}\n",
            crate::repl::replica_config(mnt, data, port)
        )
    })
}

/// `app.db` on the primary in rollback-journal mode with one row.
fn make_db(p: &Process) {
    let c = Connection::open(p.path("app.db")).unwrap();
    c.execute_batch(
        "PRAGMA journal_mode=DELETE;
         CREATE TABLE t (id INTEGER PRIMARY KEY, v TEXT);
         INSERT INTO t VALUES (1, 'primary');",
    )
    .unwrap();
}

fn ids(path: &Path) -> Vec<i64> {
    let c = Connection::open_with_flags(path, rusqlite::OpenFlags::SQLITE_OPEN_READ_ONLY).unwrap();
    c.busy_timeout(Duration::from_secs(5)).unwrap();
    let mut st = c.prepare("SELECT id FROM t ORDER BY id").unwrap();
    st.query_map([], |r| r.get(0))
        .unwrap()
        .map(Result::unwrap)
        .collect()
}

/// An OFD write lock on byte 72 of `<db>-lock`, held until the file is dropped.
fn halt_lock(db: &Path) -> std::io::Result<File> {
    halt_lock_with(db, libc::F_OFD_SETLK)
}

/// A write lock on byte 72 of `<db>-lock` taken with `cmd` (`F_SETLK`: a POSIX lock,
/// `F_OFD_SETLK`), held until the file is dropped.
fn halt_lock_with(db: &Path, cmd: i32) -> std::io::Result<File> {
    let f = OpenOptions::new()
        .read(true)
        .write(true)
        .open(format!("{}-lock", db.display()))?;
    // SAFETY: zeroed flock is valid; fcntl on our own descriptor.
    let mut fl: libc::flock = unsafe { std::mem::zeroed() };
    fl.l_type = libc::F_WRLCK as _;
    fl.l_whence = libc::SEEK_SET as _;
    fl.l_start = 72;
    fl.l_len = 1;
    if unsafe { libc::fcntl(f.as_raw_fd(), cmd, &fl) } == -1 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(f)
}

/// A connection that reports SQLITE_BUSY at once instead of waiting.
fn no_wait(path: &Path) -> Connection {
    let c = Connection::open(path).unwrap();
    c.busy_timeout(Duration::ZERO).unwrap();
    c
}

/// Whether a local writer on `c` gets SQLITE_BUSY (`BEGIN IMMEDIATE` takes the
/// writer's lock without changing anything).
fn writer_busy(c: &Connection) -> bool {
    match c.execute_batch("BEGIN IMMEDIATE") {
        Ok(()) => {
            c.execute_batch("ROLLBACK").unwrap();
            false
        }
        Err(e) => {
            assert_eq!(e.sqlite_error_code(), Some(ErrorCode::DatabaseBusy), "{e}");
            true
        }
    }
}

#[test]
fn a_replica_writes_through_the_halt_lock_and_primary_writers_wait() {
    // With an auth token: the replica sends it on /halt and /tx.
    let port = free_port();
    let p = primary_with(port, "  auth-token: s3cret\n");
    let r1 = replica_with_token(port, "s3cret");
    let r2 = replica_with_token(port, "s3cret");
    make_db(&p);
    wait_converged(&p, &[&r1, &r2], "app.db");
    let files = ltx_files(&p.data, "app.db").len();

    // sqlite3 on a replica, two transactions, under `litefs run -with-halt-lock-on`.
    let out = Command::new(env!("CARGO_BIN_EXE_litefs"))
        .args(["run", "-with-halt-lock-on"])
        .arg(r1.path("app.db"))
        .arg("--")
        .arg("sqlite3")
        .arg(r1.path("app.db"))
        .arg("INSERT INTO t VALUES (2, 'replica'); INSERT INTO t VALUES (3, 'replica');")
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "litefs run: {}\nreplica log:\n{}\nprimary log:\n{}",
        String::from_utf8_lossy(&out.stderr),
        r1.log_text(),
        p.log_text()
    );
    // Acknowledged only once the primary applied them: there at once.
    assert_eq!(ids(&p.path("app.db")), [1, 2, 3]);
    wait_converged(&p, &[&r1, &r2], "app.db");
    let want = std::fs::read(p.path("app.db")).unwrap();
    for r in [&r1, &r2] {
        assert!(
            std::fs::read(r.path("app.db")).unwrap() == want,
            "databases differ"
        );
        assert_eq!(ids(&r.path("app.db")), [1, 2, 3]);
    }
    // Each transaction is one LTX file on the primary, as a local commit would be.
    assert_eq!(ltx_files(&p.data, "app.db").len(), files + 2);

    // While a replica holds the lock, the primary's writers get SQLITE_BUSY and its
    // readers go on; the replica writes; released, the primary writes again.
    let local = no_wait(&p.path("app.db"));
    assert!(!writer_busy(&local));
    // A POSIX lock this time: released when the process closes the descriptor.
    let held = halt_lock_with(&r1.path("app.db"), libc::F_SETLK).unwrap();
    assert!(
        writer_busy(&local),
        "a local writer got the lock under HALT"
    );
    assert_eq!(
        local
            .query_row("SELECT count(*) FROM t", [], |r| r.get::<_, i64>(0))
            .unwrap(),
        3
    );
    let rc = Connection::open(r1.path("app.db")).unwrap();
    rc.execute("INSERT INTO t VALUES (4, 'held')", []).unwrap();
    // The open connection on the primary sees the forwarded row.
    assert_eq!(
        local
            .query_row("SELECT v FROM t WHERE id = 4", [], |r| r
                .get::<_, String>(0))
            .unwrap(),
        "held"
    );
    drop(held);
    assert!(
        wait_until(Duration::from_secs(5), || !writer_busy(&local)),
        "the primary stayed halted after the release"
    );
    local
        .execute("INSERT INTO t VALUES (5, 'primary')", [])
        .unwrap();
    // Without the lock the replica is read-only again, also on an open connection.
    assert!(
        rc.execute("INSERT INTO t VALUES (6, 'no lock')", [])
            .is_err()
    );
    wait_converged(&p, &[&r1, &r2], "app.db");
    assert_eq!(ids(&r2.path("app.db")), [1, 2, 3, 4, 5]);

    // The other rollback-journal modes end their transactions differently.
    let out = Command::new(env!("CARGO_BIN_EXE_litefs"))
        .args(["run", "-with-halt-lock-on"])
        .arg(r2.path("app.db"))
        .arg("--")
        .arg("sqlite3")
        .arg(r2.path("app.db"))
        .arg(
            "PRAGMA journal_mode=PERSIST; INSERT INTO t VALUES (7, 'persist');
             PRAGMA journal_mode=TRUNCATE; INSERT INTO t VALUES (8, 'truncate');",
        )
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}\n{}",
        String::from_utf8_lossy(&out.stderr),
        r2.log_text()
    );
    assert_eq!(ids(&p.path("app.db")), [1, 2, 3, 4, 5, 7, 8]);
    wait_converged(&p, &[&r1, &r2], "app.db");
    let want = std::fs::read(p.path("app.db")).unwrap();
    assert!(std::fs::read(r1.path("app.db")).unwrap() == want);
    assert!(std::fs::read(r2.path("app.db")).unwrap() == want);
}

#[test]
fn halt_requests_without_the_lock_or_at_a_stale_position_are_refused() {
    let port = free_port();
    let p = primary(port, "3s");
    make_db(&p);
    let before = pos(&p, "app.db").unwrap();
    let local = no_wait(&p.path("app.db"));
    let last = ltx_files(&p.data, "app.db").pop().unwrap();
    let stale = std::fs::read(&last).unwrap();

    let (code, body) = http_request(port, "POST", "/tx?name=app.db&id=12345", &stale);
    assert_eq!(code, 409, "{}", String::from_utf8_lossy(&body));
    let (code, _) = http_request(port, "POST", "/halt?name=nope.db", b"");
    assert_eq!(code, 404);
    // WAL mode is refused with a message.
    let w = Connection::open(p.path("wal.db")).unwrap();
    w.query_row("PRAGMA journal_mode=WAL", [], |_| Ok(()))
        .unwrap();
    w.execute_batch("CREATE TABLE x (a)").unwrap();
    let (code, body) = http_request(port, "POST", "/halt?name=wal.db", b"");
    assert_eq!(code, 422);
    assert!(String::from_utf8_lossy(&body).contains("WAL mode"));
    let out = Command::new(env!("CARGO_BIN_EXE_litefs"))
        .args(["run", "-with-halt-lock-on"])
        .arg(p.path("wal.db"))
        .args(["--", "true"])
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("WAL mode"));

    let (code, body) = http_request(port, "POST", "/halt?name=app.db", b"");
    assert_eq!(code, 200, "{}", String::from_utf8_lossy(&body));
    assert!(writer_busy(&local));
    let grant: serde_json::Value = serde_json::from_slice(&body).unwrap();
    let id = grant["id"].as_u64().unwrap();
    assert_eq!(
        format!(
            "{}/{}\n",
            grant["txid"].as_str().unwrap(),
            grant["checksum"].as_str().unwrap()
        ),
        before
    );
    let tx = format!("/tx?name=app.db&id={id}");
    // The file the primary already has: not at the next TXID.
    let (code, body) = http_request(port, "POST", &tx, &stale);
    assert_eq!(code, 412, "{}", String::from_utf8_lossy(&body));
    assert!(String::from_utf8_lossy(&body).contains("stale"));
    // A damaged file.
    let mut bad = stale.clone();
    let n = bad.len();
    bad[n / 2] ^= 0xff;
    let (code, _) = http_request(port, "POST", &tx, &bad);
    assert_eq!(code, 400);
    // Never renewed: after the TTL the primary dropped it by itself.
    assert!(wait_until(Duration::from_secs(10), || !writer_busy(&local)));
    let (code, _) = http_request(port, "POST", &tx, &stale);
    assert_eq!(code, 409, "an expired lock id was accepted");
    let (code, _) = http_request(port, "DELETE", &format!("/halt?name=app.db&id={id}"), b"");
    assert_eq!(code, 409);
    // Nothing was applied.
    assert_eq!(pos(&p, "app.db").unwrap(), before);
    assert_eq!(ids(&p.path("app.db")), [1]);

    // Released on request.
    let (code, body) = http_request(port, "POST", "/halt?name=app.db", b"");
    assert_eq!(code, 200);
    let id: serde_json::Value = serde_json::from_slice(&body).unwrap();
    let del = format!("/halt?name=app.db&id={}", id["id"]);
    assert_eq!(http_request(port, "DELETE", &del, b"").0, 200);
    assert!(!writer_busy(&local));
    assert_eq!(http_request(port, "DELETE", &del, b"").0, 409);
}

/// The primary's lock id a replica logged when it took the HALT lock.
fn logged_lock_id(r: &Process) -> u64 {
    let log = r.log_text();
    let line = log
        .lines()
        .rev()
        .find(|l| l.contains("HALT lock held"))
        .unwrap_or_else(|| panic!("no HALT lock in the log:\n{log}"));
    let at = line.find(" id=").unwrap() + 4;
    line[at..]
        .split(|c: char| !c.is_ascii_digit())
        .next()
        .unwrap()
        .parse()
        .unwrap()
}

#[test]
fn the_lock_is_renewed_and_a_refused_transaction_is_rolled_back_on_the_replica() {
    let port = free_port();
    let p = primary(port, "2s");
    let r = replica(port);
    make_db(&p);
    wait_converged(&p, &[&r], "app.db");
    let held = halt_lock(&r.path("app.db")).unwrap();
    // Held past the primary's 2 s TTL: the replica renews it (every 2/3 s).
    let local = no_wait(&p.path("app.db"));
    std::thread::sleep(Duration::from_secs(3));
    assert!(writer_busy(&local), "the HALT lock was not renewed");
    let rc = Connection::open(r.path("app.db")).unwrap();
    rc.execute("INSERT INTO t VALUES (2, 'renewed')", [])
        .unwrap();
    assert_eq!(ids(&p.path("app.db")), [1, 2]);
    let before = pos(&r, "app.db").unwrap();

    // The primary drops the lock; the replica still thinks it holds it.
    let id = logged_lock_id(&r);
    let (code, body) = http_request(port, "DELETE", &format!("/halt?name=app.db&id={id}"), b"");
    assert_eq!(code, 200, "{}", String::from_utf8_lossy(&body));
    let err = rc
        .execute("INSERT INTO t VALUES (3, 'refused')", [])
        .unwrap_err();
    assert!(err.to_string().contains("I/O"), "{err}");
    drop(rc);
    drop(held);
    assert_eq!(pos(&r, "app.db").unwrap(), before);
    assert_eq!(ids(&r.path("app.db")), [1, 2]);
    assert!(std::fs::read(r.path("app.db")).unwrap() == std::fs::read(p.path("app.db")).unwrap());
    assert!(r.log_text().contains("rolling it back"));
    // The replica keeps replicating.
    local
        .execute("INSERT INTO t VALUES (4, 'primary')", [])
        .unwrap();
    wait_converged(&p, &[&r], "app.db");
    assert_eq!(ids(&r.path("app.db")), [1, 2, 4]);
}

#[test]
fn the_halt_lock_expires_when_its_replica_dies() {
    let port = free_port();
    let p = primary(port, "2s");
    let mut r = replica(port);
    make_db(&p);
    wait_converged(&p, &[&r], "app.db");
    // In its own process group, so that its `sleep` goes with it.
    let mut holder = Command::new(env!("CARGO_BIN_EXE_litefs"))
        .args(["run", "-with-halt-lock-on"])
        .arg(r.path("app.db"))
        .args(["--", "sleep", "30"])
        .process_group(0)
        .spawn()
        .unwrap();
    let local = no_wait(&p.path("app.db"));
    let halted = wait_until(Duration::from_secs(10), || writer_busy(&local));
    let killed = Instant::now();
    r.signal(libc::SIGKILL);
    // SAFETY: kill(2) of the process group we created.
    unsafe { libc::kill(-(holder.id() as i32), libc::SIGKILL) };
    let _ = holder.wait();
    assert!(
        halted,
        "the replica never took the lock; log:\n{}",
        r.log_text()
    );
    assert!(
        wait_until(Duration::from_secs(10), || !writer_busy(&local)),
        "the primary stayed halted after its replica died"
    );
    assert!(killed.elapsed() < Duration::from_secs(8));
    local
        .execute("INSERT INTO t VALUES (2, 'primary')", [])
        .unwrap();
    assert!(p.log_text().contains("halt lock expired"));
}

/// Commit latency of forwarded transactions against local ones on the primary, in the
/// same run (`cargo test --test it halt::forwarded_commit_latency -- --ignored
/// --nocapture`; figures in docs/performance.md).
#[test]
#[ignore = "benchmark"]
fn forwarded_commit_latency() {
    let port = free_port();
    let p = primary(port, "30s");
    let r = replica(port);
    make_db(&p);
    wait_converged(&p, &[&r], "app.db");
    let n = 200;
    let run = |c: &Connection, base: i64| {
        let t = Instant::now();
        for i in 0..n {
            c.execute("INSERT INTO t VALUES (?1, 'x')", [base + i])
                .unwrap();
        }
        t.elapsed() / n as u32
    };
    let local = Connection::open(p.path("app.db")).unwrap();
    let primary_tx = run(&local, 1000);
    wait_converged(&p, &[&r], "app.db");
    let t = Instant::now();
    let held = halt_lock(&r.path("app.db")).unwrap();
    let acquire = t.elapsed();
    let rc = Connection::open(r.path("app.db")).unwrap();
    let forwarded_tx = run(&rc, 10_000);
    drop(rc);
    drop(held);
    println!(
        "HALT lock taken in {acquire:?}; per transaction: primary local {primary_tx:?}, \
         forwarded from a replica {forwarded_tx:?} ({n} each)"
    );
}
