//! Replication with real processes: a static-lease primary and replicas on 127.0.0.1
//! ports, real FUSE mounts, SQLite through the mounts.

use std::net::TcpListener;
use std::path::Path;
use std::time::Duration;

use rusqlite::Connection;
use sha2::{Digest, Sha256};

pub use crate::support::free_port;
use crate::support::{Process, wait_until};

/// Starts a primary serving on `port`, with extra YAML appended.
pub fn primary(port: u16, extra: &str) -> Process {
    let extra = extra.to_string();
    Process::start_with(move |mnt, data| {
        format!(
            "fuse:\n  dir: {}\ndata:\n  dir: {}\n{extra}lease:\n  type: static\n  candidate: true\n  hostname: primary-host\n  advertise-url: http://127.0.0.1:{port}\nhttp:\n  addr: 127.0.0.1:{port}\n",
            mnt.display(),
            data.display()
        )
    })
}

/// Starts a replica of the primary on `port`.
pub fn replica(port: u16) -> Process {
    Process::start_with(move |mnt, data| replica_config(mnt, data, port))
}

/// The config of a replica of the primary on `port`.
pub fn replica_config(mnt: &Path, data: &Path, port: u16) -> String {
    format!(
        "fuse:\n  dir: {}\ndata:\n  dir: {}\nlease:\n  type: static\n  candidate: false\n  advertise-url: http://127.0.0.1:{port}\nhttp:\n  addr: 127.0.0.1:{}\n",
        mnt.display(),
        data.display(),
        free_port()
    )
}

/// The `<db>-pos` of a mount, if the database exists there.
pub fn pos(p: &Process, db: &str) -> Option<String> {
    std::fs::read_to_string(p.path(&format!("{db}-pos"))).ok()
}

/// Waits until every replica shows the primary's position for `db`.
pub fn wait_converged(primary: &Process, replicas: &[&Process], db: &str) {
    let want = pos(primary, db).expect("primary has the database");
    for r in replicas {
        let ok = wait_until(Duration::from_secs(30), || {
            pos(r, db).as_deref() == Some(&want)
        });
        assert!(
            ok,
            "replica did not reach {want} for {db} (has {:?}); replica log:\n{}\nprimary log:\n{}",
            pos(r, db),
            r.log_text(),
            primary.log_text()
        );
    }
}

fn sha(path: &Path) -> String {
    hex::encode(Sha256::digest(std::fs::read(path).unwrap()))
}

fn write_txs(p: &Process, db: &str, mode: &str, n: usize) {
    let c = Connection::open(p.path(db)).unwrap();
    c.busy_timeout(Duration::from_secs(5)).unwrap();
    c.query_row(&format!("PRAGMA journal_mode={mode}"), [], |_| Ok(()))
        .unwrap();
    c.execute_batch("CREATE TABLE IF NOT EXISTS t (id INTEGER PRIMARY KEY, v TEXT)")
        .unwrap();
    for i in 0..n {
        c.execute(
            "INSERT INTO t (v) VALUES (?1)",
            [format!("row {i} {}", "x".repeat(i % 300))],
        )
        .unwrap();
    }
}

fn count(p: &Process, db: &str) -> rusqlite::Result<i64> {
    let c = Connection::open_with_flags(p.path(db), rusqlite::OpenFlags::SQLITE_OPEN_READ_ONLY)?;
    c.query_row("SELECT count(*) FROM t", [], |r| r.get(0))
}

/// Primary + 2 replicas; 1,000 transactions in WAL mode and 1,000 in DELETE mode:
/// both replicas reach the primary's position, their database files are byte-identical
/// to the primary's (after a checkpoint there), SQLite reads the rows through the
/// replicas' mounts, and writes there fail as "readonly".
#[test]
fn three_nodes_replicate_both_journal_modes_byte_identically() {
    let port = free_port();
    let p = primary(port, "");
    let r1 = replica(port);
    let r2 = replica(port);
    write_txs(&p, "wal.db", "wal", 1000);
    write_txs(&p, "del.db", "delete", 1000);
    // The primary's database file holds every page once the WAL is checkpointed (a
    // checkpoint changes no page of the logical database, so no new TXID).
    let c = Connection::open(p.path("wal.db")).unwrap();
    c.query_row("PRAGMA wal_checkpoint(TRUNCATE)", [], |_| Ok(()))
        .unwrap();
    drop(c);
    for db in ["wal.db", "del.db"] {
        wait_converged(&p, &[&r1, &r2], db);
        let want = sha(&p.data.join("dbs").join(db).join("database"));
        for r in [&r1, &r2] {
            assert_eq!(
                sha(&r.data.join("dbs").join(db).join("database")),
                want,
                "{db}"
            );
            assert_eq!(
                count(r, db).unwrap(),
                1000,
                "{db} through the replica's mount"
            );
        }
    }
    assert!(
        pos(&p, "wal.db").unwrap().starts_with("00000000000003e"),
        "TXIDs: {:?}",
        pos(&p, "wal.db")
    );

    // Read-only replica.
    for db in ["wal.db", "del.db"] {
        let c = Connection::open(r1.path(db)).unwrap();
        let err = c
            .execute("INSERT INTO t (v) VALUES ('no')", [])
            .unwrap_err()
            .to_string();
        assert!(err.contains("readonly"), "{db}: {err}");
    }
    assert!(std::fs::write(r1.path("new.db"), b"x").is_err());
    assert_eq!(
        std::fs::read_to_string(r1.path(".primary")).unwrap(),
        "127.0.0.1\n"
    );
    let lag: u64 = std::fs::read_to_string(r1.path(".lag"))
        .unwrap()
        .trim()
        .parse()
        .unwrap();
    assert!(lag < 60_000, "lag {lag}");
    assert!(!p.path(".primary").exists());

    // New transactions keep flowing; a deleted database disappears.
    write_txs(&p, "del.db", "delete", 5);
    wait_converged(&p, &[&r1, &r2], "del.db");
    assert_eq!(count(&r2, "del.db").unwrap(), 1005);
    std::fs::remove_file(p.path("wal.db")).unwrap();
    for r in [&r1, &r2] {
        assert!(
            wait_until(Duration::from_secs(10), || !r.path("wal.db").exists()),
            "deleted database still on a replica"
        );
    }
}

fn db_file(p: &Process, db: &str) -> std::path::PathBuf {
    p.data.join("dbs").join(db).join("database")
}

/// Retention removes the files a replica needs (1 s here): a replica started late, one
/// restarted after falling behind, and one whose data directory was deleted each catch
/// up by snapshot and end byte-identical to the primary.
#[test]
fn late_behind_and_wiped_replicas_catch_up_by_snapshot() {
    let port = free_port();
    let p = primary(port, "  retention: 1s\n  retention-monitor-interval: 1s\n");
    write_txs(&p, "app.db", "delete", 50);
    // Files 1..=49 expire; the newest is kept.
    assert!(wait_until(Duration::from_secs(10), || {
        crate::support::ltx_files(&p.data, "app.db").len() == 1
    }));
    let mut r = replica(port);
    wait_converged(&p, &[&r], "app.db");
    assert_eq!(sha(&db_file(&r, "app.db")), sha(&db_file(&p, "app.db")));
    assert!(p.log_text().contains("BehindRetention"), "{}", p.log_text());

    // Restarted after the primary moved on and dropped the files in between.
    assert!(r.signal(libc::SIGTERM).success());
    write_txs(&p, "app.db", "delete", 20);
    std::thread::sleep(Duration::from_millis(2500));
    r.spawn();
    wait_converged(&p, &[&r], "app.db");
    assert_eq!(sha(&db_file(&r, "app.db")), sha(&db_file(&p, "app.db")));

    // Data directory deleted.
    assert!(r.signal(libc::SIGTERM).success());
    std::fs::remove_dir_all(&r.data).unwrap();
    r.spawn();
    wait_converged(&p, &[&r], "app.db");
    assert_eq!(sha(&db_file(&r, "app.db")), sha(&db_file(&p, "app.db")));
    assert_eq!(count(&r, "app.db").unwrap(), 70);
    assert_eq!(
        p.log_text().matches("sending snapshot").count(),
        3,
        "{}",
        p.log_text()
    );
}

/// Split brain: a replica that ran as a primary on its own (static config changed)
/// diverged in two databases: ahead of the primary in one, at the same TXID with other
/// content in the other. Back as a replica it is re-snapshotted to the primary's state
/// and its log names the discarded TXIDs.
#[test]
fn diverged_replica_is_resnapshotted_and_logs_discarded_txids() {
    let pa = free_port();
    let a = primary(pa, "");
    let mut b = replica(pa);
    write_txs(&a, "ahead.db", "delete", 10);
    write_txs(&a, "same.db", "wal", 10);
    wait_converged(&a, &[&b], "ahead.db");
    wait_converged(&a, &[&b], "same.db");
    let replica_cfg = std::fs::read_to_string(&b.config).unwrap();

    // B runs as a primary of its own for a while.
    assert!(b.signal(libc::SIGTERM).success());
    let pb = free_port();
    std::fs::write(
        &b.config,
        format!(
            "fuse:\n  dir: {}\ndata:\n  dir: {}\nlease:\n  type: static\n  candidate: true\n  advertise-url: http://127.0.0.1:{pb}\nhttp:\n  addr: 127.0.0.1:{pb}\n",
            b.mnt.display(),
            b.data.display()
        ),
    )
    .unwrap();
    b.spawn();
    write_txs(&b, "ahead.db", "delete", 3); // B at 10 + 3
    // B at 11, with other content than A's 11th.
    Connection::open(b.path("same.db"))
        .unwrap()
        .execute("INSERT INTO t (v) VALUES ('written on b')", [])
        .unwrap();
    write_txs(&a, "ahead.db", "delete", 1); // A at 11: B is ahead
    write_txs(&a, "same.db", "wal", 1); // A at 11: same TXID, other content
    assert!(b.signal(libc::SIGTERM).success());

    std::fs::write(&b.config, replica_cfg).unwrap();
    b.spawn();
    for db in ["ahead.db", "same.db"] {
        wait_converged(&a, &[&b], db);
        assert_eq!(count(&b, db).unwrap(), 11, "{db}");
    }
    assert_eq!(sha(&db_file(&b, "ahead.db")), sha(&db_file(&a, "ahead.db")));
    let log = b.log_text();
    // ahead.db: B had two TXIDs more than A (B's 3 writes against A's 1); same.db:
    // one TXID each, B's is discarded.
    let discarded = |db: &str| {
        log.lines()
            .find(|l| {
                l.contains("local transactions discarded") && l.contains(&format!("db=\"{db}\""))
            })
            .and_then(|l| l.split("discarded_txids=").nth(1))
            .map(|s| s.split_whitespace().next().unwrap_or("").to_string())
    };
    let ahead = discarded("ahead.db")
        .unwrap_or_else(|| panic!("ahead.db: no discarded TXIDs logged:\n{log}"));
    let same = discarded("same.db").unwrap_or_else(|| {
        panic!(
            "same.db: no discarded TXIDs logged:\n{log}\nprimary:\n{}",
            a.log_text()
        )
    });
    let a_ahead = u64::from_str_radix(&pos(&a, "ahead.db").unwrap()[..16], 16).unwrap();
    let a_same = u64::from_str_radix(&pos(&a, "same.db").unwrap()[..16], 16).unwrap();
    assert_eq!(ahead, format!("{}..={}", a_ahead + 1, a_ahead + 2), "{log}");
    assert_eq!(same, format!("{a_same}..={a_same}"), "{log}");
    let alog = a.log_text();
    assert!(
        alog.contains("ReplicaAhead") && alog.contains("Diverged"),
        "{alog}"
    );
}

/// A stand-in primary: answers one `POST /stream` with `body` (after the HTTP head)
/// and keeps the connection open until `hold` returns true, then closes it.
fn serve_once(
    listener: &TcpListener,
    body: &[u8],
    hold: impl Fn() -> bool,
) -> litefs::transport::StreamRequest {
    use std::io::{Read, Write};
    let (mut s, _) = listener.accept().unwrap();
    let request;
    let mut buf = Vec::new();
    let mut tmp = [0u8; 4096];
    loop {
        let n = s.read(&mut tmp).unwrap();
        assert!(n > 0, "request cut short");
        buf.extend_from_slice(&tmp[..n]);
        if let Some(i) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            let head = String::from_utf8_lossy(&buf[..i]).to_lowercase();
            assert!(head.starts_with("post /stream "), "{head}");
            let len: usize = head
                .lines()
                .find_map(|l| l.strip_prefix("content-length:"))
                .map(|v| v.trim().parse().unwrap())
                .unwrap_or(0);
            while buf.len() < i + 4 + len {
                let n = s.read(&mut tmp).unwrap();
                buf.extend_from_slice(&tmp[..n]);
            }
            request = Some(litefs::transports::http::wire::decode_request(&buf[i + 4..]).unwrap());
            break;
        }
    }
    s.write_all(b"HTTP/1.1 200 OK\r\ncontent-type: application/x-litefs-stream\r\nconnection: close\r\n\r\n")
        .unwrap();
    s.write_all(body).unwrap();
    s.flush().unwrap();
    assert!(
        wait_until(Duration::from_secs(30), &hold),
        "hold condition never met"
    );
    request.unwrap()
}

/// A corrupt LTX file, a truncated stream and a malformed frame from a test server:
/// nothing is applied (no database appears on the replica), and the replica
/// reconnects and applies the valid file served next.
#[test]
fn corrupt_or_truncated_streams_apply_nothing_and_the_replica_recovers() {
    use litefs::transport::Frame;
    use litefs::transports::http::wire;

    let tmp = tempfile::tempdir().unwrap();
    let src = tmp.path().join("src.db");
    let c = Connection::open(&src).unwrap();
    c.execute_batch(
        "PRAGMA page_size=4096; CREATE TABLE t (id INTEGER PRIMARY KEY, v TEXT);
         WITH RECURSIVE n(i) AS (SELECT 1 UNION ALL SELECT i + 1 FROM n WHERE i < 100)
         INSERT INTO t (v) SELECT hex(randomblob(300)) FROM n;",
    )
    .unwrap();
    drop(c);
    let ltx = tmp.path().join("snap.ltx");
    let st = std::process::Command::new(env!("CARGO_BIN_EXE_litefs"))
        .args(["ltx", "encode-db", "-o"])
        .arg(&ltx)
        .arg(&src)
        .status()
        .unwrap();
    assert!(st.success());
    let file = std::fs::read(&ltx).unwrap();
    let sum = litefs::ltx::database_checksum(std::fs::File::open(&src).unwrap(), 4096).unwrap();

    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let port = listener.local_addr().unwrap().port();
    let r = replica(port);
    let preamble = wire::encode_preamble("LFSC00000000000000A1");
    let ltx_frames = |bytes: &[u8]| {
        let mut out = Vec::new();
        let chunks: Vec<&[u8]> = bytes.chunks(8192).collect();
        for (i, c) in chunks.iter().enumerate() {
            out.extend_from_slice(&wire::encode_frame(&Frame::Ltx {
                db: "app.db".into(),
                chunk: c.to_vec(),
                last: i + 1 == chunks.len(),
            }));
        }
        out
    };
    let nothing_applied = || !r.path("app.db").exists() && !r.data.join("dbs/app.db").exists();

    // 1: a byte of a page flipped.
    let mut bad = file.clone();
    let mid = bad.len() / 2;
    bad[mid] ^= 0x40;
    let body = [
        &preamble[..],
        &ltx_frames(&bad),
        &wire::encode_frame(&Frame::Ready {
            databases: Vec::new(),
        }),
    ]
    .concat();
    let req = serve_once(&listener, &body, || {
        r.log_text()
            .contains("cannot apply a file from the primary")
    });
    assert!(req.positions.is_empty(), "{req:?}");
    assert!(nothing_applied());

    // 2: the stream ends in the middle of the file.
    let half = ltx_frames(&file[..file.len() / 2]);
    let body = [&preamble[..], &half[..half.len() - 10]].concat();
    serve_once(&listener, &body, || true);
    assert!(wait_until(Duration::from_secs(10), || r
        .log_text()
        .contains("closed unexpectedly")));
    assert!(nothing_applied());

    // 3: a frame of an unknown type.
    let body = [&preamble[..], &[9u8, 0, 0, 0, 1, 0][..]].concat();
    serve_once(&listener, &body, || true);
    assert!(wait_until(Duration::from_secs(10), || r
        .log_text()
        .contains("unknown frame type 9")));
    assert!(nothing_applied());

    // 4: the valid file.
    let body = [
        &preamble[..],
        &ltx_frames(&file),
        &wire::encode_frame(&Frame::Ready {
            databases: Vec::new(),
        }),
    ]
    .concat();
    let want = format!("{:016x}/{:016x}\n", 1, sum.0);
    serve_once(&listener, &body, || {
        pos(&r, "app.db").as_deref() == Some(&want)
    });
    assert_eq!(
        sha(&r.data.join("dbs/app.db/database")),
        sha(&src),
        "replica's database differs from the source"
    );
    assert_eq!(count(&r, "app.db").unwrap(), 100);
    assert_eq!(
        std::fs::read_to_string(r.data.join("clusterid")).unwrap(),
        "LFSC00000000000000A1\n"
    );

    // The next file fails to apply three times in a row: the replica then asks for a
    // snapshot (TXID all ones) instead of its position, and takes the one it gets.
    let garbage = [&preamble[..], &ltx_frames(&[7u8; 300])].concat();
    for attempt in 1..=3 {
        let req = serve_once(&listener, &garbage, || {
            r.log_text()
                .matches("cannot apply a file from the primary")
                .count()
                > attempt
        });
        let p = req.positions.iter().find(|p| p.db == "app.db").unwrap();
        assert_eq!(
            (p.txid, p.post_apply_checksum),
            (1, sum.0),
            "attempt {attempt}"
        );
    }
    let body = [
        &preamble[..],
        &ltx_frames(&file),
        &wire::encode_frame(&Frame::Ready {
            databases: Vec::new(),
        }),
    ]
    .concat();
    let req = serve_once(&listener, &body, || {
        r.log_text().matches("caught up").count() >= 2
    });
    let p = req.positions.iter().find(|p| p.db == "app.db").unwrap();
    assert_eq!(p.txid, u64::MAX, "no snapshot asked for: {req:?}");
    assert_eq!(pos(&r, "app.db").as_deref(), Some(want.as_str()));
    assert_eq!(sha(&r.data.join("dbs/app.db/database")), sha(&src));
}

/// A reader holds a read transaction open on a replica while 100 transactions arrive:
/// it keeps its snapshot without errors, the database stays intact, and it sees the
/// new rows once its transaction ends. Both journal modes.
#[test]
fn a_reader_on_a_replica_keeps_its_snapshot_while_transactions_arrive() {
    let port = free_port();
    let p = primary(port, "");
    let r = replica(port);
    for (db, mode) in [("rwal.db", "wal"), ("rdel.db", "delete")] {
        write_txs(&p, db, mode, 10);
        wait_converged(&p, &[&r], db);
        let reader =
            Connection::open_with_flags(r.path(db), rusqlite::OpenFlags::SQLITE_OPEN_READ_ONLY)
                .unwrap();
        reader.execute_batch("BEGIN").unwrap();
        let n: i64 = reader
            .query_row("SELECT count(*) FROM t", [], |r| r.get(0))
            .unwrap();
        assert_eq!(n, 10);
        write_txs(&p, db, mode, 100);
        std::thread::sleep(Duration::from_millis(500));
        for _ in 0..5 {
            let n: i64 = reader
                .query_row("SELECT count(*) FROM t", [], |r| r.get(0))
                .unwrap();
            assert_eq!(n, 10, "{db}: the snapshot moved inside a read transaction");
            let ok: String = reader
                .query_row("PRAGMA integrity_check", [], |r| r.get(0))
                .unwrap();
            assert_eq!(ok, "ok", "{db}");
            std::thread::sleep(Duration::from_millis(50));
        }
        reader.execute_batch("COMMIT").unwrap();
        wait_converged(&p, &[&r], db);
        let n: i64 = reader
            .query_row("SELECT count(*) FROM t", [], |r| r.get(0))
            .unwrap();
        assert_eq!(
            n, 110,
            "{db}: new rows not visible after the read transaction"
        );
        let ok: String = reader
            .query_row("PRAGMA integrity_check", [], |r| r.get(0))
            .unwrap();
        assert_eq!(ok, "ok", "{db}");
    }
}

/// A replica of another cluster is refused on both sides, with a clear log line, and
/// receives nothing.
#[test]
fn a_replica_of_another_cluster_is_refused() {
    let port = free_port();
    let p = primary(port, "");
    write_txs(&p, "app.db", "delete", 3);
    let r = Process::start_with(move |mnt, data| {
        std::fs::create_dir_all(data).unwrap();
        std::fs::write(data.join("clusterid"), "LFSC00000000000000FF\n").unwrap();
        replica_config(mnt, data, port)
    });
    assert!(
        wait_until(Duration::from_secs(10), || r
            .log_text()
            .contains("refusing a primary of another cluster")),
        "{}",
        r.log_text()
    );
    assert!(
        p.log_text()
            .contains("refusing a replica of another cluster")
    );
    assert!(!r.path("app.db").exists());
}

/// A replica that never reads its stream does not hold up the primary's commits nor
/// another replica.
#[test]
fn a_stalled_replica_blocks_neither_commits_nor_other_replicas() {
    use std::io::Write;
    let port = free_port();
    let p = primary(port, "");
    let body = litefs::transports::http::wire::encode_request(&litefs::transport::StreamRequest {
        node_id: 7,
        cluster_id: None,
        archive: None,
        positions: Vec::new(),
    });
    let mut stalled = std::net::TcpStream::connect(("127.0.0.1", port)).unwrap();
    write!(
        stalled,
        "POST /stream HTTP/1.1\r\nhost: 127.0.0.1\r\ncontent-length: {}\r\n\r\n",
        body.len()
    )
    .unwrap();
    stalled.write_all(&body).unwrap();
    let r = replica(port);
    // 200 transactions of 32 KiB each: several MB, far more than the socket buffers and
    // the stalled stream's channel hold.
    let c = Connection::open(p.path("big.db")).unwrap();
    c.execute_batch("CREATE TABLE t (id INTEGER PRIMARY KEY, v BLOB)")
        .unwrap();
    let start = std::time::Instant::now();
    for _ in 0..200 {
        c.execute("INSERT INTO t (v) VALUES (randomblob(32768))", [])
            .unwrap();
    }
    let took = start.elapsed();
    assert!(took < Duration::from_secs(30), "commits took {took:?}");
    wait_converged(&p, &[&r], "big.db");
    assert_eq!(count(&r, "big.db").unwrap(), 200);
    drop(stalled);
}

/// `exec` on a replica starts only once the replica caught up with the primary: the
/// application's first query already sees every row the primary had.
#[test]
fn exec_on_a_replica_starts_after_it_caught_up() {
    let port = free_port();
    let p = primary(port, "");
    write_txs(&p, "app.db", "delete", 300);
    let out_dir = tempfile::tempdir().unwrap();
    let out = out_dir.path().join("count");
    let out2 = out.clone();
    let mut r = Process::start_with(move |mnt, data| {
        let script = format!(
            "sqlite3 {}/app.db 'SELECT count(*) FROM t' > {} 2>&1; exec sleep 60",
            mnt.display(),
            out2.display()
        );
        format!(
            "{}exec: {}\n",
            replica_config(mnt, data, port),
            serde_json::to_string(&format!("sh -c {}", shell_quote(&script))).unwrap()
        )
    });
    assert!(
        wait_until(Duration::from_secs(20), || std::fs::read_to_string(&out)
            .is_ok_and(|s| s.ends_with('\n'))),
        "{}",
        r.log_text()
    );
    assert_eq!(std::fs::read_to_string(&out).unwrap(), "300\n");
    // SIGTERM reaches the application, whose exit ends litefs (none is left behind).
    let st = r.signal(libc::SIGTERM);
    assert_eq!(
        st.code(),
        Some(128 + libc::SIGTERM),
        "{st:?}\n{}",
        r.log_text()
    );
}

fn shell_quote(s: &str) -> String {
    format!("\"{}\"", s.replace('\\', "\\\\").replace('"', "\\\""))
}

/// Lines of a log at level WARN or ERROR.
fn warnings(log: &str) -> Vec<&str> {
    log.lines()
        .filter(|l| l.contains(" WARN ") || l.contains(" ERROR "))
        .collect()
}

/// The primary goes away and comes back on the same address: the replica says once
/// that the primary went away (not once per attempt), reconnects with backoff and
/// continues from its position without a snapshot.
#[test]
fn a_replica_reconnects_when_the_primary_restarts() {
    let port = free_port();
    let mut p = primary(port, "");
    let r = replica(port);
    write_txs(&p, "app.db", "wal", 20);
    wait_converged(&p, &[&r], "app.db");
    let before = warnings(&r.log_text()).len();
    assert!(p.signal(libc::SIGTERM).success());
    assert!(wait_until(Duration::from_secs(10), || r
        .log_text()
        .contains("replication stream failed")));
    // Backoff 100 ms, 200 ms, ...: several attempts fail in this time.
    std::thread::sleep(Duration::from_secs(3));
    let log = r.log_text();
    let new = &warnings(&log)[before..];
    assert_eq!(
        new.len(),
        1,
        "one warning for the outage, not one per attempt:\n{}",
        new.join("\n")
    );
    assert!(new[0].contains("the primary went away"), "{}", new[0]);
    p.spawn();
    write_txs(&p, "app.db", "wal", 20);
    wait_converged(&p, &[&r], "app.db");
    assert_eq!(count(&r, "app.db").unwrap(), 40);
    assert!(
        r.log_text().contains("connected to primary again"),
        "{}",
        r.log_text()
    );
    assert!(
        !p.log_text().contains("sending snapshot"),
        "{}",
        p.log_text()
    );
}

fn integrity(p: &Process, db: &str) -> String {
    let c = Connection::open_with_flags(p.path(db), rusqlite::OpenFlags::SQLITE_OPEN_READ_ONLY)
        .unwrap();
    c.query_row("PRAGMA integrity_check", [], |r| r.get(0))
        .unwrap()
}

/// A replica killed with SIGKILL again and again while it applies files (the primary
/// keeps committing transactions of about 20 pages each) starts again every time,
/// catches up, and ends byte-identical to the primary with an intact database.
#[test]
fn a_replica_killed_mid_apply_restarts_and_catches_up() {
    use std::sync::Arc;
    use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
    let port = free_port();
    let p = primary(port, "");
    let mut r = replica(port);
    write_txs(&p, "app.db", "delete", 1);
    wait_converged(&p, &[&r], "app.db");
    let stop = Arc::new(AtomicBool::new(false));
    let written = Arc::new(AtomicU64::new(0));
    let writer = {
        let (path, stop, written) = (p.path("app.db"), stop.clone(), written.clone());
        std::thread::spawn(move || {
            let c = Connection::open(path).unwrap();
            c.busy_timeout(Duration::from_secs(5)).unwrap();
            c.execute_batch("CREATE TABLE b (id INTEGER PRIMARY KEY, v BLOB)")
                .unwrap();
            let mut i = 0u64;
            while !stop.load(Ordering::Relaxed) {
                c.execute("INSERT INTO b (v) VALUES (randomblob(80000))", [])
                    .unwrap();
                if i % 4 == 3 {
                    c.execute("DELETE FROM b WHERE id < (SELECT max(id) - 20 FROM b)", [])
                        .unwrap();
                }
                i += 1;
                written.store(i, Ordering::Relaxed);
            }
        })
    };
    for round in 0..6u64 {
        let before = written.load(Ordering::Relaxed);
        std::thread::sleep(Duration::from_millis(250 + (round * 137) % 400));
        assert!(
            written.load(Ordering::Relaxed) > before,
            "the primary stopped committing"
        );
        let st = r.signal(libc::SIGKILL);
        assert_eq!(
            std::os::unix::process::ExitStatusExt::signal(&st),
            Some(libc::SIGKILL),
            "round {round}: {st:?}"
        );
        r.spawn();
    }
    std::thread::sleep(Duration::from_millis(300));
    stop.store(true, Ordering::Relaxed);
    writer.join().unwrap();
    wait_converged(&p, &[&r], "app.db");
    assert_eq!(sha(&db_file(&r, "app.db")), sha(&db_file(&p, "app.db")));
    assert_eq!(integrity(&r, "app.db"), "ok");
    let log = r.log_text();
    assert!(
        log.contains("start-up after an interrupted apply"),
        "no start-up found unsynced applied files:\n{log}"
    );
}

/// `VACUUM` with a new `page_size` on the primary (4096 → 8192 → 1024) reaches the
/// replica as one ordinary LTX file in the new page size: applied directly (the primary
/// never sends a snapshot), byte-identical, integrity ok, and later commits follow.
#[test]
fn a_page_size_changing_vacuum_applies_directly_on_replicas() {
    let port = free_port();
    let p = primary(port, "");
    let r = replica(port);
    write_txs(&p, "app.db", "delete", 50);
    wait_converged(&p, &[&r], "app.db");
    let page_size = |n: &Process| -> i64 {
        Connection::open_with_flags(n.path("app.db"), rusqlite::OpenFlags::SQLITE_OPEN_READ_ONLY)
            .unwrap()
            .query_row("PRAGMA page_size", [], |r| r.get(0))
            .unwrap()
    };
    assert_eq!(page_size(&r), 4096);
    for ps in [8192, 1024] {
        Connection::open(p.path("app.db"))
            .unwrap()
            .execute_batch(&format!("PRAGMA page_size={ps}; VACUUM;"))
            .unwrap();
        assert_eq!(page_size(&p), ps);
        wait_converged(&p, &[&r], "app.db");
        assert_eq!(page_size(&r), ps);
        assert_eq!(sha(&db_file(&r, "app.db")), sha(&db_file(&p, "app.db")));
        assert_eq!(integrity(&r, "app.db"), "ok");
        write_txs(&p, "app.db", "delete", 5);
        wait_converged(&p, &[&r], "app.db");
        assert_eq!(sha(&db_file(&r, "app.db")), sha(&db_file(&p, "app.db")));
    }
    assert_eq!(count(&r, "app.db").unwrap(), 60);
    let log = p.log_text();
    assert!(!log.contains("snapshot"), "{log}");
    assert!(!r.log_text().contains("cannot apply"), "{}", r.log_text());
}

/// A database the primary no longer has at all (deleted while the replica was down, and
/// its deletion record expired) is removed from the replica when it reconnects; a
/// primary that has no database yet (a fresh data directory, same cluster) removes
/// nothing.
#[test]
fn databases_the_primary_does_not_have_are_removed_from_replicas() {
    let port = free_port();
    let mut p = primary(port, "  retention: 1s\n  retention-monitor-interval: 1s\n");
    let mut r = replica(port);
    write_txs(&p, "a.db", "delete", 3);
    write_txs(&p, "b.db", "delete", 3);
    wait_converged(&p, &[&r], "a.db");
    wait_converged(&p, &[&r], "b.db");
    assert!(r.signal(libc::SIGTERM).success());
    std::fs::remove_file(p.path("b.db")).unwrap();
    assert!(
        wait_until(Duration::from_secs(15), || !p
            .data
            .join("dbs/b.db")
            .exists()),
        "the primary kept b.db's deletion record"
    );
    r.spawn();
    assert!(
        wait_until(Duration::from_secs(15), || !r.path("b.db").exists()),
        "{}",
        r.log_text()
    );
    assert!(
        r.log_text()
            .contains("removed a database the primary does not have")
    );
    assert_eq!(count(&r, "a.db").unwrap(), 3);

    // A fresh primary of the same cluster: its Ready lists nothing, nothing goes.
    assert!(p.signal(libc::SIGTERM).success());
    std::fs::remove_dir_all(p.data.join("dbs")).unwrap();
    let caught_up = r.log_text().matches("caught up with the primary").count();
    p.spawn();
    assert!(
        wait_until(Duration::from_secs(20), || r
            .log_text()
            .matches("caught up with the primary")
            .count()
            > caught_up),
        "{}",
        r.log_text()
    );
    assert_eq!(count(&r, "a.db").unwrap(), 3);
}

/// A snapshot larger than a replica keeps in memory (about 24 MB): the primary streams
/// it while writing it, the replica receives it into a temp file and applies it
/// byte-identically; neither node keeps a temp file afterwards.
#[test]
fn a_large_snapshot_is_streamed_and_applied_from_a_temp_file() {
    let port = free_port();
    let p = primary(port, "  retention: 1s\n  retention-monitor-interval: 1s\n");
    let c = Connection::open(p.path("big.db")).unwrap();
    c.execute_batch("CREATE TABLE t (id INTEGER PRIMARY KEY, v BLOB)")
        .unwrap();
    for _ in 0..3 {
        c.execute(
            "INSERT INTO t (v) SELECT randomblob(8000) FROM
             (WITH RECURSIVE s(i) AS (SELECT 1 UNION ALL SELECT i + 1 FROM s WHERE i < 1000)
              SELECT i FROM s)",
            [],
        )
        .unwrap();
    }
    drop(c);
    assert!(wait_until(Duration::from_secs(20), || {
        crate::support::ltx_files(&p.data, "big.db").len() == 1
    }));
    let r = replica(port);
    wait_converged(&p, &[&r], "big.db");
    assert!(std::fs::metadata(db_file(&r, "big.db")).unwrap().len() > 24_000_000);
    assert_eq!(sha(&db_file(&r, "big.db")), sha(&db_file(&p, "big.db")));
    assert_eq!(integrity(&r, "big.db"), "ok");
    assert!(
        p.log_text().contains("sending snapshot"),
        "{}",
        p.log_text()
    );
    let files = |d: std::path::PathBuf| -> Vec<std::path::PathBuf> {
        std::fs::read_dir(d)
            .map(|e| e.map(|e| e.unwrap().path()).collect())
            .unwrap_or_default()
    };
    assert!(wait_until(Duration::from_secs(5), || files(
        p.data.join("snapshot-tmp")
    )
    .is_empty()));
    assert_eq!(
        files(r.data.join("repl-tmp")),
        Vec::<std::path::PathBuf>::new()
    );
}
