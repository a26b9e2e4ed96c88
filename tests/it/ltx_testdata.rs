//! The LTX engine against files written by Litestream 0.5.17 and LiteFS 0.5.

use std::fs;
use std::path::PathBuf;

use litefs::ltx::{
    CHECKSUM_FLAG, Checksum, Decoder, Format, TxId, crc64, database_checksum, parse_filename,
    verify_path,
};

use crate::args;
use crate::ltx_support::{litefs, sha256_file, testdata, text};

fn replica_files(level: u32) -> Vec<PathBuf> {
    let dir = testdata().join(format!("litestream-0.5.17-replica/replica/ltx/{level}"));
    let mut files: Vec<PathBuf> = fs::read_dir(&dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .collect();
    files.sort();
    files
}

/// (TXID, sha256, size) from restored-sha256.txt.
fn expected_states() -> Vec<(u64, String, u64)> {
    let text = fs::read_to_string(testdata().join("litestream-0.5.17-replica/restored-sha256.txt"))
        .unwrap();
    text.lines()
        .map(|l| {
            let f: Vec<&str> = l.split_whitespace().collect();
            (
                u64::from_str_radix(f[0], 16).unwrap(),
                f[1].to_owned(),
                f[2].parse().unwrap(),
            )
        })
        .collect()
}

#[test]
fn every_litestream_file_verifies() {
    let mut all = Vec::new();
    for level in [0, 1, 9] {
        all.extend(replica_files(level));
    }
    assert_eq!(all.len(), 10);
    for path in &all {
        let (header, trailer) = verify_path(path).unwrap();
        let (min, max) = parse_filename(path.file_name().unwrap().to_str().unwrap()).unwrap();
        assert_eq!((header.min_txid, header.max_txid), (min, max));
        assert!(header.no_checksum(), "Litestream writes flag 0x2");
        assert_eq!(trailer.post_apply_checksum, Checksum(0));
        let mut dec = Decoder::new(fs::File::open(path).unwrap()).unwrap();
        assert_eq!(dec.format(), Format::V3);
        let mut page = vec![0u8; header.page_size as usize];
        while dec.next_page(&mut page).unwrap().is_some() {}
        dec.finish().unwrap();
    }
    let mut cmd: Vec<&std::ffi::OsStr> = vec!["ltx".as_ref(), "verify".as_ref()];
    cmd.extend(all.iter().map(|p| p.as_os_str()));
    let out = litefs(&cmd);
    assert!(out.status.success(), "{}", text(&out));
    let stdout = String::from_utf8(out.stdout).unwrap();
    assert_eq!(stdout.lines().count(), all.len());
    assert!(stdout.lines().all(|l| l.ends_with(": ok")), "{stdout}");
}

#[test]
fn applying_l0_chain_reproduces_every_litestream_state() {
    let files = replica_files(0);
    let states = expected_states();
    assert_eq!(files.len(), states.len());
    for n in 1..=files.len() {
        let dir = tempfile::tempdir().unwrap();
        let db = dir.path().join("db");
        let mut cmd: Vec<&std::ffi::OsStr> = vec![
            "ltx".as_ref(),
            "apply".as_ref(),
            "-o".as_ref(),
            db.as_os_str(),
        ];
        cmd.extend(files[..n].iter().map(|p| p.as_os_str()));
        let out = litefs(&cmd);
        assert!(out.status.success(), "n={n}: {}", text(&out));
        let (txid, sha, size) = &states[n - 1];
        assert_eq!(*txid, n as u64);
        assert_eq!(fs::metadata(&db).unwrap().len(), *size, "size at TXID {n}");
        assert_eq!(&sha256_file(&db), sha, "sha256 at TXID {n}");
        // The printed position carries the recomputed database checksum.
        let sum = database_checksum(fs::File::open(&db).unwrap(), 4096).unwrap();
        let stdout = String::from_utf8_lossy(&out.stdout);
        assert!(
            stdout.contains(&format!("{}/{sum}", TxId(n as u64))),
            "{stdout}"
        );
    }
    // Applying one file at a time onto the growing database gives the same result.
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("db");
    let out = litefs(args!["ltx", "apply", "-o", db, files[0]]);
    assert!(out.status.success(), "{}", text(&out));
    let out = litefs(args!["ltx", "apply", "-o", db, files[1]]);
    assert!(
        !out.status.success(),
        "an existing database has no known TXID, so a file without checksums \
         that is not a snapshot must be refused: {}",
        text(&out)
    );
    assert_eq!(sha256_file(&db), states[0].1);
}

#[test]
fn level9_and_level1_snapshots_reproduce_txid1() {
    let states = expected_states();
    for level in [9, 1] {
        let files = replica_files(level);
        assert_eq!(files.len(), 1);
        let dir = tempfile::tempdir().unwrap();
        let db = dir.path().join("db");
        let out = litefs(args!["ltx", "apply", "-o", db, files[0]]);
        assert!(out.status.success(), "{}", text(&out));
        assert_eq!(sha256_file(&db), states[0].1, "level {level}");
    }
}

#[test]
fn litefs_format1_file() {
    let dir = testdata().join("litefs-format1/dbs/sqlite.db");
    let path = dir.join("ltx/000000000000000d-000000000000000d.ltx");
    let bytes = fs::read(&path).unwrap();
    assert_eq!(bytes.len(), 12420);
    let mut dec = Decoder::new(&bytes[..]).unwrap();
    assert_eq!(dec.format(), Format::V1);
    let h = dec.header().clone();
    assert_eq!(
        (
            h.flags,
            h.page_size,
            h.commit,
            h.min_txid,
            h.max_txid,
            h.timestamp
        ),
        (0, 4096, 10, TxId(0xd), TxId(0xd), 0)
    );
    assert_eq!(h.pre_apply_checksum, Checksum(0x9c74a15b4e4f246c));
    let mut page = vec![0u8; 4096];
    let mut pgnos = Vec::new();
    while let Some(p) = dec.next_page(&mut page).unwrap() {
        pgnos.push(p);
    }
    assert_eq!(pgnos, [1, 7, 8]);
    let trailer = dec.finish().unwrap();
    assert_eq!(trailer.post_apply_checksum, Checksum(0xfe3831a381c602b9));
    assert_eq!(trailer.file_checksum, Checksum(0x9496a29358326fb5));
    assert_eq!(
        trailer.file_checksum,
        Checksum(CHECKSUM_FLAG | crc64(&bytes[..12412]))
    );

    let out = litefs(args!["ltx", "checksum", dir.join("database")]);
    assert!(out.status.success(), "{}", text(&out));
    assert_eq!(
        String::from_utf8(out.stdout).unwrap().trim(),
        trailer.post_apply_checksum.to_string()
    );

    let out = litefs(args!["ltx", "dump", path]);
    assert!(out.status.success(), "{}", text(&out));
    let dump = String::from_utf8(out.stdout).unwrap();
    for needle in [
        "9c74a15b4e4f246c",
        "fe3831a381c602b9",
        "9496a29358326fb5",
        "(3 pages)",
    ] {
        assert!(dump.contains(needle), "{needle} missing from:\n{dump}");
    }
}

#[test]
fn verify_names_each_bad_file_on_one_line() {
    let dir = tempfile::tempdir().unwrap();
    let good = replica_files(0).remove(0);
    let bad = dir.path().join("bad.ltx");
    let mut bytes = fs::read(&good).unwrap();
    let n = bytes.len();
    bytes[n - 20] ^= 0x40;
    fs::write(&bad, &bytes).unwrap();
    let short = dir.path().join("short.ltx");
    fs::write(&short, &bytes[..50]).unwrap();
    let out = litefs(args!["ltx", "verify", good, bad, short]);
    assert_eq!(out.status.code(), Some(1), "{}", text(&out));
    let stdout = String::from_utf8(out.stdout).unwrap();
    assert_eq!(stdout.trim(), format!("{}: ok", good.display()));
    let stderr = String::from_utf8(out.stderr).unwrap();
    let lines: Vec<&str> = stderr.lines().collect();
    assert_eq!(lines.len(), 2, "{stderr}");
    assert!(
        lines[0].starts_with(&format!("{}: ", bad.display())),
        "{stderr}"
    );
    assert!(lines[0].contains("checksum mismatch"), "{stderr}");
    assert!(
        lines[1].starts_with(&format!("{}: ", short.display())),
        "{stderr}"
    );
    assert!(lines[1].contains("truncated"), "{stderr}");
}
