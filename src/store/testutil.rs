//! Helpers for unit tests that need a store holding replicated LTX files.

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use crate::ltx::{self, Checksum, Encoder, Header, RollingChecksum, TxId};

use super::{Applied, Received, Store, StoreOptions, Verified};

/// Page `pgno` of a SQLite database of `commit` pages of `ps` bytes, filled with `fill`
/// (page 1 carries a valid database header).
pub(crate) fn page(ps: u32, commit: u32, pgno: u32, fill: u8) -> Vec<u8> {
    let mut p = vec![fill; ps as usize];
    if pgno == 1 {
        p[..100].fill(0);
        p[..16].copy_from_slice(b"SQLite format 3\0");
        let ps_field: u16 = if ps == 65536 { 1 } else { ps as u16 };
        p[16..18].copy_from_slice(&ps_field.to_be_bytes());
        p[24..28].copy_from_slice(&1u32.to_be_bytes());
        p[28..32].copy_from_slice(&commit.to_be_bytes());
        p[92..96].copy_from_slice(&1u32.to_be_bytes());
    }
    p
}

/// An LTX file of TXID `txid` for a database of `commit` pages of `ps` bytes holding
/// `pages`, following the database `before` (its page checksums), and the page
/// checksums after it.
pub(crate) fn ltx_file(
    txid: u64,
    ps: u32,
    commit: u32,
    before: &[Checksum],
    pages: &[(u32, Vec<u8>)],
) -> (Vec<u8>, Vec<Checksum>) {
    let mut after = before.to_vec();
    after.resize(commit as usize, Checksum(0));
    for (p, d) in pages {
        after[*p as usize - 1] = ltx::page_checksum(*p, d);
    }
    let sum = |s: &[Checksum]| {
        let mut r = RollingChecksum::new();
        s.iter().for_each(|c| r.toggle(*c));
        r.value()
    };
    let h = Header {
        page_size: ps,
        commit,
        min_txid: TxId(txid),
        max_txid: TxId(txid),
        pre_apply_checksum: if txid == 1 { Checksum(0) } else { sum(before) },
        ..Header::default()
    };
    let mut enc = Encoder::new(Vec::new(), &h).expect("encoder");
    for (p, d) in pages {
        enc.encode_page(*p, d).expect("encode page");
    }
    (enc.finish(sum(&after)).expect("finish").0, after)
}

/// A store in `dir` in replica mode (node id 2, retention 10 minutes, no monitor).
pub(crate) fn replica_store(dir: &Path) -> Arc<Store> {
    let s = Store::open(StoreOptions {
        data_dir: dir.to_path_buf(),
        retention: Duration::from_secs(600),
        retention_monitor_interval: Duration::ZERO,
        node_id: 2,
    })
    .expect("open store");
    s.set_primary(false);
    s
}

/// Verifies and applies an LTX file to database `db`.
pub(crate) fn apply(s: &Store, db: &str, bytes: Vec<u8>) -> Applied {
    let v = Verified::verify(db, Received::Memory(bytes)).expect("verify");
    s.apply_replicated(db, v).expect("apply")
}
