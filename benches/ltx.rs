//! Throughput of the LTX engine on a 100 MB database: encode, decode+verify and
//! database checksum, next to a memcpy of the same bytes as the machine's baseline.
//!
//! `cargo bench --bench ltx -- --warm-up-time 1 --measurement-time 3`

use std::hint::black_box;
use std::time::Instant;

use criterion::{Criterion, Throughput};
use litefs::ltx::{
    Checksum, Decoder, Encoder, Header, RollingChecksum, TxId, database_checksum, page_checksum,
};

const PAGE_SIZE: usize = 4096;
const DB_BYTES: usize = 100 * 1024 * 1024;

/// A SQLite-like database: each page has a b-tree style header, text-like cells
/// (compressible), some random blob bytes (incompressible) and zero free space,
/// in proportions that vary per page.
fn database() -> Vec<u8> {
    let mut x: u64 = 0x9e3779b97f4a7c15;
    let mut next = move || {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        x
    };
    let words: [&[u8]; 8] = [
        b"alpha ",
        b"order-",
        b"customer ",
        b"2024-01-",
        b"status=ok ",
        b"name:",
        b"id ",
        b"\x00\x01",
    ];
    let mut db = vec![0u8; DB_BYTES];
    for page in db.chunks_mut(PAGE_SIZE) {
        page[0] = 0x0d;
        let free = (next() as usize) % (PAGE_SIZE / 3);
        let random = (next() as usize) % (PAGE_SIZE / 3);
        let mut i = 8 + free;
        while i < PAGE_SIZE - random {
            let w = words[(next() % 8) as usize];
            let n = w.len().min(PAGE_SIZE - random - i);
            page[i..i + n].copy_from_slice(&w[..n]);
            i += n;
        }
        for b in &mut page[PAGE_SIZE - random..] {
            *b = next() as u8;
        }
    }
    db
}

fn encode(db: &[u8], out: Vec<u8>) -> Vec<u8> {
    let pages = (db.len() / PAGE_SIZE) as u32;
    let header = Header {
        page_size: PAGE_SIZE as u32,
        commit: pages,
        min_txid: TxId(1),
        max_txid: TxId(1),
        ..Header::default()
    };
    let mut sum = RollingChecksum::new();
    let mut enc = Encoder::new(out, &header).expect("header");
    for (i, page) in db.chunks(PAGE_SIZE).enumerate() {
        let pgno = i as u32 + 1;
        sum.toggle(page_checksum(pgno, page));
        enc.encode_page(pgno, page).expect("page");
    }
    enc.finish(sum.value()).expect("finish").0
}

fn decode_verify(file: &[u8]) -> Checksum {
    let mut dec = Decoder::new(file).expect("header");
    let mut page = vec![0u8; PAGE_SIZE];
    while dec.next_page(&mut page).expect("page").is_some() {}
    dec.finish().expect("finish").post_apply_checksum
}

fn time<T>(iters: u32, mut f: impl FnMut() -> T) -> f64 {
    black_box(f());
    let start = Instant::now();
    for _ in 0..iters {
        black_box(f());
    }
    start.elapsed().as_secs_f64() / f64::from(iters)
}

fn main() {
    let db = database();
    let file = encode(&db, Vec::new());
    let mut copy = vec![0u8; db.len()];
    println!(
        "database {} MB, LTX file {} MB ({:.0}% of the database)",
        db.len() >> 20,
        file.len() >> 20,
        100.0 * file.len() as f64 / db.len() as f64
    );

    let mut c = Criterion::default().configure_from_args();
    let mut g = c.benchmark_group("ltx-100MB");
    g.throughput(Throughput::Bytes(db.len() as u64));
    g.sample_size(10);
    g.bench_function("baseline-memcpy", |b| {
        b.iter(|| copy.copy_from_slice(black_box(&db)))
    });
    g.bench_function("checksum", |b| {
        b.iter(|| database_checksum(black_box(&db[..]), PAGE_SIZE as u32).expect("checksum"))
    });
    g.bench_function("decode-verify", |b| {
        b.iter(|| decode_verify(black_box(&file)))
    });
    let mut buf = Vec::with_capacity(file.len() + (1 << 20));
    g.bench_function("encode", |b| {
        b.iter(|| {
            buf.clear();
            buf = encode(black_box(&db), std::mem::take(&mut buf));
        })
    });
    g.finish();
    c.final_summary();

    // Ratios to memcpy of the same run, because shared machines are noisy.
    let mb = db.len() as f64 / 1e6;
    let base = time(10, || copy.copy_from_slice(&db));
    let rows = [
        (
            "checksum",
            time(5, || {
                database_checksum(&db[..], PAGE_SIZE as u32).expect("checksum")
            }),
        ),
        ("decode+verify", time(3, || decode_verify(&file))),
        (
            "encode",
            time(2, || encode(&db, Vec::with_capacity(file.len()))),
        ),
    ];
    println!("{:<14} {:>10} {:>14}", "", "MB/s", "x memcpy time");
    println!("{:<14} {:>10.0} {:>14.2}", "memcpy", mb / base, 1.0);
    for (name, t) in rows {
        println!("{name:<14} {:>10.0} {:>14.2}", mb / t, t / base);
    }
}
