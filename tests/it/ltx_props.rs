//! Property tests of the LTX codec: round trips for every page size, and every
//! single-byte corruption or truncation of a valid file is caught.

use litefs::ltx::{
    CHECKSUM_FLAG, Checksum, Decoder, Encoder, HEADER_FLAG_NO_CHECKSUM, Header, RollingChecksum,
    Trailer, TxId, page_checksum, verify,
};
use proptest::prelude::*;

/// Page content from a seed: a SQLite-like mix of a random part and a
/// compressible (zero or repeated) part, in proportions the seed picks.
fn page_data(page_size: usize, seed: u64) -> Vec<u8> {
    let mut x = seed | 1;
    let mut next = move || {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        x
    };
    let random_len = match seed % 4 {
        0 => 0,
        1 => page_size,
        _ => (next() as usize) % page_size,
    };
    let fill = (seed >> 8) as u8;
    (0..page_size)
        .map(|i| if i < random_len { next() as u8 } else { fill })
        .collect()
}

#[derive(Clone, Debug)]
struct Spec {
    header: Header,
    pages: Vec<(u32, Vec<u8>)>,
    post: Checksum,
}

fn spec(
    page_size: u32,
    commit: u32,
    mask: u32,
    seeds: &[u64],
    snapshot: bool,
    no_checksum: bool,
) -> Spec {
    let pgnos: Vec<u32> = (1..=commit)
        .filter(|p| snapshot || mask & (1 << (p - 1)) != 0)
        .collect();
    let pages: Vec<(u32, Vec<u8>)> = pgnos
        .iter()
        .map(|&p| (p, page_data(page_size as usize, seeds[p as usize - 1])))
        .collect();
    let header = Header {
        flags: if no_checksum {
            HEADER_FLAG_NO_CHECKSUM
        } else {
            0
        },
        page_size,
        commit,
        min_txid: TxId(if snapshot { 1 } else { seeds[0] % 1000 + 2 }),
        max_txid: TxId(if snapshot { 1 } else { seeds[0] % 1000 + 5 }),
        timestamp: seeds[1] as i64,
        pre_apply_checksum: Checksum(if snapshot || no_checksum {
            0
        } else {
            CHECKSUM_FLAG | seeds[2]
        }),
        node_id: seeds[3],
        ..Header::default()
    };
    let post = if no_checksum {
        Checksum(0)
    } else if snapshot {
        let mut sum = RollingChecksum::new();
        for (p, d) in &pages {
            sum.toggle(page_checksum(*p, d));
        }
        sum.value()
    } else {
        Checksum(CHECKSUM_FLAG | seeds[4])
    };
    Spec {
        header,
        pages,
        post,
    }
}

fn arb_spec(sizes: &'static [u32], max_commit: u32) -> impl Strategy<Value = Spec> {
    (
        prop::sample::select(sizes),
        1..=max_commit,
        any::<u32>(),
        prop::collection::vec(any::<u64>(), max_commit.max(5) as usize),
        any::<bool>(),
        any::<bool>(),
    )
        .prop_map(|(ps, commit, mask, seeds, snapshot, no_checksum)| {
            spec(ps, commit, mask, &seeds, snapshot, no_checksum)
        })
}

fn encode(s: &Spec) -> (Vec<u8>, Trailer) {
    let mut enc = Encoder::new(Vec::new(), &s.header).unwrap();
    for (p, d) in &s.pages {
        enc.encode_page(*p, d).unwrap();
    }
    enc.finish(s.post).unwrap()
}

type Decoded = (Header, Vec<(u32, Vec<u8>)>, Trailer);

fn decode(file: &[u8]) -> Result<Decoded, litefs::ltx::LtxError> {
    let mut dec = Decoder::new(file)?;
    let header = dec.header().clone();
    let mut buf = vec![0u8; header.page_size as usize];
    let mut pages = Vec::new();
    while let Some(p) = dec.next_page(&mut buf)? {
        pages.push((p, buf.clone()));
    }
    Ok((header, pages, dec.finish()?))
}

/// Byte ranges holding LZ4 payloads, from the frames themselves.
fn payload_ranges(file: &[u8]) -> Vec<std::ops::Range<usize>> {
    let mut ranges = Vec::new();
    let mut off = 100;
    loop {
        let pgno = u32::from_be_bytes(file[off..off + 4].try_into().unwrap());
        if pgno == 0 {
            return ranges;
        }
        let size = u32::from_be_bytes(file[off + 6..off + 10].try_into().unwrap()) as usize;
        ranges.push(off + 10..off + 10 + size);
        off += 10 + size;
    }
}

const ALL_SIZES: &[u32] = &[512, 1024, 2048, 4096, 8192, 16384, 32768, 65536];

proptest! {
    #![proptest_config(ProptestConfig { cases: 96, ..ProptestConfig::default() })]

    #[test]
    fn round_trip_every_page_size(s in arb_spec(ALL_SIZES, 6)) {
        let (file, trailer) = encode(&s);
        let (header, pages, got) = decode(&file).unwrap();
        prop_assert_eq!(header, s.header.clone());
        prop_assert_eq!(pages, s.pages.clone());
        prop_assert_eq!(got, trailer);
        prop_assert_eq!(got.post_apply_checksum, s.post);
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 48, ..ProptestConfig::default() })]

    #[test]
    fn any_single_byte_flip_fails_verify(s in arb_spec(&[512, 1024], 4), mask in 1u8..=255) {
        let (file, _) = encode(&s);
        let payloads = payload_ranges(&file);
        for i in 0..file.len() {
            let mut bad = file.clone();
            bad[i] ^= mask;
            if verify(&bad[..]).is_ok() {
                // The one allowed case: a different LZ4 encoding of the same page.
                prop_assert!(
                    payloads.iter().any(|r| r.contains(&i)),
                    "flip at {} (outside any LZ4 payload) still verifies", i
                );
                let (_, pages, _) = decode(&bad).unwrap();
                prop_assert_eq!(&pages, &s.pages, "flip at {} verified with other page data", i);
            }
        }
    }

    #[test]
    fn every_truncation_fails_verify(s in arb_spec(&[512, 4096], 4)) {
        let (file, _) = encode(&s);
        for len in 0..file.len() {
            prop_assert!(verify(&file[..len]).is_err(), "truncated to {} bytes verifies", len);
        }
    }
}
