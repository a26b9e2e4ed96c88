//! Arbitrary bytes into the LTX decoder: it must return an error or a file that
//! obeys the page rules, never panic, and `verify` must agree with a full decode.
#![no_main]

use libfuzzer_sys::fuzz_target;
use litefs::ltx::{Decoder, Format, lock_pgno, verify};

fn decode(data: &[u8], format: Option<Format>) -> bool {
    let dec = match format {
        None => Decoder::new(data),
        Some(f) => Decoder::with_format(data, f),
    };
    let Ok(mut dec) = dec else { return false };
    let header = dec.header().clone();
    let mut page = vec![0u8; header.page_size as usize];
    let mut prev = 0;
    loop {
        match dec.next_page(&mut page) {
            Ok(Some(pgno)) => {
                assert!(pgno > prev && pgno <= header.commit);
                assert_ne!(pgno, lock_pgno(header.page_size));
                prev = pgno;
            }
            Ok(None) => break,
            Err(_) => return false,
        }
    }
    dec.finish().is_ok()
}

fuzz_target!(|data: &[u8]| {
    let ok = decode(data, None);
    assert_eq!(ok, verify(data).is_ok());
    decode(data, Some(Format::V1));
    decode(data, Some(Format::V3));
});
