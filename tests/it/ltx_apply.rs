//! Applying LTX files: positions, checksums, and nothing written on refusal.

use std::fs::{self, File, OpenOptions};
use std::path::{Path, PathBuf};

use litefs::ltx::{
    ApplyCheck, CHECKSUM_FLAG, Checksum, Decoder, Encoder, HEADER_FLAG_NO_CHECKSUM, Header,
    LtxError, Pos, TxId, apply_file, apply_file_with, compact, database_checksum,
};

use crate::args;
use crate::ltx_support::{litefs, text};

const PS: usize = 512;

/// A database of pages filled with the given bytes (a real SQLite header is not
/// needed by the library, only by the CLI, which we give one below).
fn db_bytes(fills: &[u8]) -> Vec<u8> {
    let mut db: Vec<u8> = fills.iter().flat_map(|&b| [b; PS]).collect();
    if !db.is_empty() {
        db[..16].copy_from_slice(b"SQLite format 3\0");
        db[16..18].copy_from_slice(&(PS as u16).to_be_bytes());
    }
    db
}

fn sum(db: &[u8]) -> Checksum {
    database_checksum(db, PS as u32).unwrap()
}

fn page(db: &[u8], pgno: u32) -> &[u8] {
    &db[(pgno as usize - 1) * PS..pgno as usize * PS]
}

/// Encodes the pages of `after` listed in `pgnos` as the file taking `before` to `after`.
fn ltx(dir: &Path, txid: u64, before: &[u8], after: &[u8], pgnos: &[u32], flags: u32) -> PathBuf {
    let snapshot = txid == 1;
    let no_checksum = flags & HEADER_FLAG_NO_CHECKSUM != 0;
    let header = Header {
        flags,
        page_size: PS as u32,
        commit: (after.len() / PS) as u32,
        min_txid: TxId(txid),
        max_txid: TxId(txid),
        pre_apply_checksum: if snapshot || no_checksum {
            Checksum(0)
        } else {
            sum(before)
        },
        ..Header::default()
    };
    let path = dir.join(format!("{txid:016x}-{txid:016x}.ltx"));
    let mut enc = Encoder::new(File::create(&path).unwrap(), &header).unwrap();
    for &p in pgnos {
        enc.encode_page(p, page(after, p)).unwrap();
    }
    enc.finish(if no_checksum { Checksum(0) } else { sum(after) })
        .unwrap();
    path
}

fn open_rw(path: &Path) -> File {
    OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .open(path)
        .unwrap()
}

struct Chain {
    _dir: tempfile::TempDir,
    dir: PathBuf,
    states: Vec<Vec<u8>>,
    files: Vec<PathBuf>,
}

/// Four states: a 3-page snapshot, a change to page 2 plus growth to 5 pages, a
/// shrink to 2 pages, and a change to page 1.
fn chain(flags: u32) -> Chain {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().to_path_buf();
    let s1 = db_bytes(b"abc");
    let s2 = db_bytes(b"aBcde");
    let s3 = db_bytes(b"aB");
    let mut s4 = s3.clone();
    s4[100] = b'!';
    let files = vec![
        ltx(&dir, 1, &[], &s1, &[1, 2, 3], flags),
        ltx(&dir, 2, &s1, &s2, &[2, 4, 5], flags),
        ltx(&dir, 3, &s2, &s3, &[], flags),
        ltx(&dir, 4, &s3, &s4, &[1], flags),
    ];
    Chain {
        _dir: tmp,
        dir,
        states: vec![s1, s2, s3, s4],
        files,
    }
}

#[test]
fn apply_chain_with_and_without_checksums() {
    for (flags, check) in [
        (0, ApplyCheck::Full),
        (HEADER_FLAG_NO_CHECKSUM, ApplyCheck::Full),
        (0, ApplyCheck::Incremental),
        (HEADER_FLAG_NO_CHECKSUM, ApplyCheck::Incremental),
    ] {
        let c = chain(flags);
        let db_path = c.dir.join("db");
        let db = open_rw(&db_path);
        let mut pos = Some(Pos {
            txid: TxId(0),
            post_apply_checksum: Checksum(CHECKSUM_FLAG),
        });
        for (i, file) in c.files.iter().enumerate() {
            let new = apply_file_with(&db, pos, file, check).unwrap();
            assert_eq!(fs::read(&db_path).unwrap(), c.states[i], "state {}", i + 1);
            assert_eq!(new.txid, TxId(i as u64 + 1));
            assert_eq!(new.post_apply_checksum, sum(&c.states[i]));
            pos = Some(new);
        }
    }
}

fn assert_refused(
    db_path: &Path,
    current: Option<Pos>,
    file: &Path,
    check: impl Fn(&LtxError) -> bool,
) {
    let before = fs::read(db_path).unwrap();
    let db = open_rw(db_path);
    let err = apply_file(&db, current, file).unwrap_err();
    assert!(check(err.root()), "unexpected error: {err}");
    assert!(
        err.to_string().contains(&file.display().to_string()),
        "{err}"
    );
    assert_eq!(
        fs::read(db_path).unwrap(),
        before,
        "database changed by a refused apply"
    );
}

#[test]
fn refused_files_leave_the_database_untouched() {
    for flags in [0, HEADER_FLAG_NO_CHECKSUM] {
        let c = chain(flags);
        let db_path = c.dir.join("db");
        fs::write(&db_path, &c.states[0]).unwrap();
        let at1 = Pos {
            txid: TxId(1),
            post_apply_checksum: sum(&c.states[0]),
        };
        // Gap: TXID 3 onto TXID 1.
        assert_refused(&db_path, Some(at1), &c.files[2], |e| {
            matches!(e, LtxError::TxidGap { .. })
        });
        // The database is not what its position says.
        let wrong = Pos {
            post_apply_checksum: Checksum(CHECKSUM_FLAG | 77),
            ..at1
        };
        assert_refused(&db_path, Some(wrong), &c.files[1], |e| {
            matches!(e, LtxError::ChecksumMismatch { .. })
        });
        // Corrupt file: one bit of the stored post-apply checksum flipped.
        let mut bytes = fs::read(&c.files[1]).unwrap();
        let bad = c.dir.join("bad.ltx");
        let idx = bytes.len() - 17;
        bytes[idx] ^= 0x01;
        fs::write(&bad, &bytes).unwrap();
        assert_refused(&db_path, Some(at1), &bad, |e| {
            matches!(e, LtxError::ChecksumMismatch { what: "file", .. })
        });
        // Truncated file.
        fs::write(&bad, &fs::read(&c.files[1]).unwrap()[..150]).unwrap();
        assert_refused(&db_path, Some(at1), &bad, |e| {
            matches!(e, LtxError::Truncated { .. })
        });
    }
}

#[test]
fn checksum_mismatches_are_refused() {
    let c = chain(0);
    let db_path = c.dir.join("db");
    fs::write(&db_path, &c.states[0]).unwrap();
    let at1 = Pos {
        txid: TxId(1),
        post_apply_checksum: sum(&c.states[0]),
    };
    // The database differs from the file's pre-apply checksum.
    let mut other = c.states[0].clone();
    other[PS + 7] = b'?';
    fs::write(&db_path, &other).unwrap();
    assert_refused(&db_path, None, &c.files[1], |e| {
        matches!(
            e,
            LtxError::ChecksumMismatch {
                what: "pre-apply (database)",
                ..
            }
        )
    });
    let other_pos = Pos {
        post_apply_checksum: sum(&other),
        ..at1
    };
    assert_refused(&db_path, Some(other_pos), &c.files[1], |e| {
        matches!(e, LtxError::PosMismatch { .. })
    });

    // A file whose post-apply checksum does not match what it produces.
    fs::write(&db_path, &c.states[0]).unwrap();
    let header = Header {
        page_size: PS as u32,
        commit: 3,
        min_txid: TxId(2),
        max_txid: TxId(2),
        pre_apply_checksum: sum(&c.states[0]),
        ..Header::default()
    };
    let lying = c.dir.join("lying.ltx");
    let mut enc = Encoder::new(File::create(&lying).unwrap(), &header).unwrap();
    enc.encode_page(2, &[b'x'; PS]).unwrap();
    enc.finish(Checksum(CHECKSUM_FLAG | 1234)).unwrap();
    assert_refused(&db_path, Some(at1), &lying, |e| {
        matches!(
            e,
            LtxError::ChecksumMismatch {
                what: "post-apply",
                ..
            }
        )
    });

    // Growing the database without the new pages.
    let header = Header {
        commit: 5,
        ..header
    };
    let sparse = c.dir.join("sparse.ltx");
    let mut enc = Encoder::new(File::create(&sparse).unwrap(), &header).unwrap();
    enc.encode_page(4, &[b'x'; PS]).unwrap();
    enc.finish(Checksum(CHECKSUM_FLAG | 1)).unwrap();
    assert_refused(&db_path, Some(at1), &sparse, |e| {
        matches!(
            e,
            LtxError::MissingPage {
                expected: 5,
                found: 0
            }
        )
    });
}

#[test]
fn cli_apply_refuses_gaps_and_leaves_dbfile_untouched() {
    let c = chain(HEADER_FLAG_NO_CHECKSUM);
    let db = c.dir.join("db");
    // Absent database, chain with a gap: still absent afterwards.
    let out = litefs(args!["ltx", "apply", "-o", db, c.files[0], c.files[2]]);
    assert_eq!(out.status.code(), Some(1), "{}", text(&out));
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("gap"),
        "{}",
        text(&out)
    );
    assert!(!db.exists());
    // Existing database at state 2; a failing chain leaves it as it was.
    fs::write(&db, &c.states[1]).unwrap();
    let out = litefs(args![
        "ltx", "apply", "-o", db, c.files[0], c.files[1], c.files[3]
    ]);
    assert_eq!(out.status.code(), Some(1), "{}", text(&out));
    assert_eq!(fs::read(&db).unwrap(), c.states[1]);
    // No temporary files left behind.
    let names: Vec<_> = fs::read_dir(&c.dir)
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .collect();
    assert!(
        names.iter().all(|n| !n.to_string_lossy().contains(".tmp-")),
        "{names:?}"
    );
    // The whole chain works.
    let out = litefs(args![
        "ltx", "apply", "-o", db, c.files[0], c.files[1], c.files[2], c.files[3]
    ]);
    assert!(out.status.success(), "{}", text(&out));
    assert_eq!(fs::read(&db).unwrap(), c.states[3]);
}

#[test]
fn compaction_equals_applying_in_order() {
    for (flags, first) in [(0, 0), (0, 1), (HEADER_FLAG_NO_CHECKSUM, 0)] {
        let c = chain(flags);
        let inputs = c.files[first..]
            .iter()
            .map(|p| Decoder::new(std::io::BufReader::new(File::open(p).unwrap())).unwrap())
            .collect();
        let out_path = c.dir.join("compacted.ltx");
        let (header, trailer) = compact(inputs, File::create(&out_path).unwrap(), flags).unwrap();
        assert_eq!(header.min_txid, TxId(first as u64 + 1));
        assert_eq!(header.max_txid, TxId(4));
        assert_eq!(header.is_snapshot(), first == 0);
        if flags == 0 {
            assert_eq!(trailer.post_apply_checksum, sum(&c.states[3]));
        }
        // Applying the compacted file gives the same database as the chain.
        let db_path = c.dir.join("db");
        let start = if first == 0 {
            Vec::new()
        } else {
            c.states[0].clone()
        };
        fs::write(&db_path, &start).unwrap();
        let pos = Pos {
            txid: TxId(first as u64),
            post_apply_checksum: sum(&start),
        };
        let db = open_rw(&db_path);
        let new = apply_file(&db, Some(pos), &out_path).unwrap();
        assert_eq!(
            fs::read(&db_path).unwrap(),
            c.states[3],
            "flags {flags} first {first}"
        );
        assert_eq!(new.post_apply_checksum, sum(&c.states[3]));
    }
}

#[test]
fn cli_encode_db_with_checksums_round_trips() {
    for ps in [1024, 65536] {
        let dir = tempfile::tempdir().unwrap();
        let src = dir.path().join("src.db");
        crate::ltx_support::sqlite(
            &src,
            &format!(
                "PRAGMA page_size={ps}; CREATE TABLE t(x); \
                 INSERT INTO t SELECT randomblob(3000) FROM (SELECT 1 UNION SELECT 2 UNION SELECT 3);"
            ),
        );
        let out = litefs(args!["ltx", "checksum", src]);
        assert!(out.status.success(), "{}", text(&out));
        let db_sum = String::from_utf8(out.stdout).unwrap().trim().to_owned();
        assert_eq!(
            db_sum,
            database_checksum(File::open(&src).unwrap(), ps)
                .unwrap()
                .to_string()
        );

        let snap = dir.path().join("snap.ltx");
        let out = litefs(args!["ltx", "encode-db", "-o", snap, src]);
        assert!(out.status.success(), "{}", text(&out));
        let (header, trailer) = litefs::ltx::verify_path(&snap).unwrap();
        assert_eq!(header.page_size, ps);
        assert!(!header.no_checksum());
        assert_eq!(trailer.post_apply_checksum.to_string(), db_sum);

        let restored = dir.path().join("restored.db");
        let out = litefs(args!["ltx", "apply", "-o", restored, snap]);
        assert!(out.status.success(), "{}", text(&out));
        assert!(
            fs::read(&restored).unwrap() == fs::read(&src).unwrap(),
            "page size {ps}"
        );
    }
}
