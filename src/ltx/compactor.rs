//! Compaction of a contiguous run of LTX files into one (reference §10).

use std::io::{Read, Write};

use super::{Checksum, Decoder, Encoder, Header, LtxError, Trailer};

/// Merges `inputs` (in TXID order) into one file written to `out`: for each page
/// the copy from the newest input wins, and pages above the last input's commit
/// are dropped. The output takes MinTXID and pre-apply checksum from the first
/// input, commit, MaxTXID, timestamp and post-apply checksum from the last, and
/// `flags` from the caller (with [`super::HEADER_FLAG_NO_CHECKSUM`] the checksums
/// are written as 0). WAL fields and node id are zero. If the first input is a
/// snapshot, so is the output.
///
/// A page-size change (`VACUUM` after `PRAGMA page_size`: an input whose page size
/// differs from the one before it, holding every page) replaces everything before
/// it: the output has the last page size, only the inputs from the last change on
/// contribute pages (the earlier ones are still verified), and it must hold every
/// page 1..commit, like the change itself, so that it applies as one.
///
/// Every input is fully verified, but only at its end: if an input is bad, the
/// error is returned after part of the output was written, so write `out` to a
/// temporary file and discard it on error.
///
/// # Errors
/// No inputs, a page-size change that does not hold every page, TXID ranges that are
/// not contiguous, an output that would need checksums the inputs lack, or any
/// decode/encode error.
pub fn compact<R: Read, W: Write>(
    mut inputs: Vec<Decoder<R>>,
    out: W,
    flags: u32,
) -> Result<(Header, Trailer), LtxError> {
    let (first, last) = match (inputs.first(), inputs.last()) {
        (Some(f), Some(l)) => (f.header().clone(), l.header().clone()),
        _ => {
            return Err(LtxError::Compaction {
                reason: "no input files".into(),
            });
        }
    };
    for pair in inputs.windows(2) {
        let (a, b) = (pair[0].header(), pair[1].header());
        let contiguous = b.min_txid.0 <= a.max_txid.0.saturating_add(1) && b.max_txid > a.max_txid;
        if !contiguous {
            return Err(LtxError::Compaction {
                reason: format!(
                    "TXIDs not contiguous: {}-{} follows {}-{}",
                    b.min_txid, b.max_txid, a.min_txid, a.max_txid
                ),
            });
        }
    }
    let no_checksum = flags & super::HEADER_FLAG_NO_CHECKSUM != 0;
    if !no_checksum && inputs.iter().any(|d| d.header().no_checksum()) {
        return Err(LtxError::Compaction {
            reason: "output with checksums requested but an input has none".into(),
        });
    }
    // The last page-size change: the inputs before it only need verifying.
    let resized = inputs
        .windows(2)
        .rposition(|w| w[0].header().page_size != w[1].header().page_size)
        .map(|i| (i + 1, inputs[i + 1].header().min_txid));
    let mut replaced: Vec<Decoder<R>> = match resized {
        Some((k, _)) => inputs.drain(..k).collect(),
        None => Vec::new(),
    };
    for dec in &mut replaced {
        let mut buf = vec![0u8; dec.header().page_size as usize];
        while dec.next_page(&mut buf)?.is_some() {}
    }
    for dec in replaced {
        dec.finish()?;
    }
    let header = Header {
        flags,
        page_size: last.page_size,
        commit: last.commit,
        min_txid: first.min_txid,
        max_txid: last.max_txid,
        timestamp: last.timestamp,
        pre_apply_checksum: if no_checksum || first.is_snapshot() {
            Checksum(0)
        } else {
            first.pre_apply_checksum
        },
        ..Header::default()
    };
    let mut enc = Encoder::new(out, &header)?;

    let ps = header.page_size as usize;
    let lock = super::lock_pgno(header.page_size);
    // After a page-size change: the last page written, to check that none is missing.
    let mut written = 0u32;
    let incomplete = |missing: u32| LtxError::Compaction {
        reason: format!(
            "the page-size change at TXID {} lacks page {missing}: it must hold every page",
            resized.map_or(first.min_txid, |(_, t)| t)
        ),
    };
    let mut bufs: Vec<Vec<u8>> = inputs.iter().map(|_| vec![0u8; ps]).collect();
    let mut heads: Vec<Option<u32>> = Vec::with_capacity(inputs.len());
    for (dec, buf) in inputs.iter_mut().zip(bufs.iter_mut()) {
        heads.push(dec.next_page(buf)?);
    }
    while let Some(pgno) = heads.iter().flatten().copied().min() {
        let newest = heads
            .iter()
            .rposition(|h| *h == Some(pgno))
            .unwrap_or_default();
        if pgno <= header.commit {
            if resized.is_some() {
                let expected = super::encoder::next_snapshot_pgno(written, lock);
                if pgno != expected {
                    return Err(incomplete(expected));
                }
                written = pgno;
            }
            enc.encode_page(pgno, &bufs[newest])?;
        }
        for i in 0..inputs.len() {
            if heads[i] == Some(pgno) {
                heads[i] = inputs[i].next_page(&mut bufs[i])?;
            }
        }
    }
    if resized.is_some() && written < header.commit {
        return Err(incomplete(super::encoder::next_snapshot_pgno(
            written, lock,
        )));
    }
    let mut post = Checksum(0);
    for dec in inputs {
        post = dec.finish()?.post_apply_checksum;
    }
    if no_checksum {
        post = Checksum(0);
    }
    let (_, trailer) = enc.finish(post)?;
    Ok((header, trailer))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ltx::{CHECKSUM_FLAG, HEADER_FLAG_NO_CHECKSUM, TxId, database_checksum, verify};

    fn file(
        min: u64,
        max: u64,
        commit: u32,
        pre: Checksum,
        pages: &[(u32, u8)],
        post: Checksum,
    ) -> Vec<u8> {
        file_ps(512, min, max, commit, pre, pages, post)
    }

    fn file_ps(
        ps: u32,
        min: u64,
        max: u64,
        commit: u32,
        pre: Checksum,
        pages: &[(u32, u8)],
        post: Checksum,
    ) -> Vec<u8> {
        let h = Header {
            page_size: ps,
            commit,
            min_txid: TxId(min),
            max_txid: TxId(max),
            pre_apply_checksum: pre,
            ..Header::default()
        };
        let mut enc = Encoder::new(Vec::new(), &h).unwrap();
        for &(p, b) in pages {
            enc.encode_page(p, &vec![b; ps as usize]).unwrap();
        }
        enc.finish(post).unwrap().0
    }

    fn db_sum(pages: &[u8]) -> Checksum {
        let db: Vec<u8> = pages.iter().flat_map(|&b| [b; 512]).collect();
        database_checksum(&db[..], 512).unwrap()
    }

    fn pages_of(file: &[u8]) -> Vec<(u32, u8)> {
        let mut dec = Decoder::new(file).unwrap();
        let mut buf = vec![0u8; dec.header().page_size as usize];
        let mut out = Vec::new();
        while let Some(p) = dec.next_page(&mut buf).unwrap() {
            out.push((p, buf[0]));
        }
        dec.finish().unwrap();
        out
    }

    #[test]
    fn newest_page_wins_and_pages_above_commit_drop() {
        // Snapshot of 4 pages, then page 2 changes and the db grows to 5, then
        // page 2 changes again and the db shrinks to 3 pages.
        let s1 = db_sum(b"abcd");
        let s2 = db_sum(b"aBcde");
        let s3 = db_sum(b"a2c");
        let files = [
            file(
                1,
                1,
                4,
                Checksum(0),
                &[(1, b'a'), (2, b'b'), (3, b'c'), (4, b'd')],
                s1,
            ),
            file(2, 2, 5, s1, &[(2, b'B'), (5, b'e')], s2),
            file(3, 3, 3, s2, &[(2, b'2')], s3),
        ];
        let decoders = files
            .iter()
            .map(|f| Decoder::new(&f[..]).unwrap())
            .collect();
        let mut out = Vec::new();
        let (h, trailer) = compact(decoders, &mut out, 0).unwrap();
        assert_eq!((h.min_txid, h.max_txid, h.commit), (TxId(1), TxId(3), 3));
        assert_eq!(trailer.post_apply_checksum, s3);
        assert_eq!(pages_of(&out), [(1, b'a'), (2, b'2'), (3, b'c')]);
        // The output is a snapshot whose checksum the decoder recomputes.
        verify(&out[..]).unwrap();

        // An incremental run keeps the first pre-apply checksum.
        let decoders = files[1..]
            .iter()
            .map(|f| Decoder::new(&f[..]).unwrap())
            .collect();
        let mut out = Vec::new();
        let (h, trailer) = compact(decoders, &mut out, 0).unwrap();
        assert_eq!(h.pre_apply_checksum, s1);
        assert_eq!(trailer.post_apply_checksum, s3);
        assert_eq!(pages_of(&out), [(2, b'2')]);

        // Without checksums.
        let decoders = files
            .iter()
            .map(|f| Decoder::new(&f[..]).unwrap())
            .collect();
        let mut out = Vec::new();
        let (h, trailer) = compact(decoders, &mut out, HEADER_FLAG_NO_CHECKSUM).unwrap();
        assert!(h.no_checksum());
        assert_eq!(trailer.post_apply_checksum, Checksum(0));
        verify(&out[..]).unwrap();
    }

    #[test]
    fn a_page_size_change_replaces_what_came_before() {
        let sum = |ps: usize, pages: &[u8]| {
            let db: Vec<u8> = pages.iter().flat_map(|&b| vec![b; ps]).collect();
            database_checksum(&db[..], ps as u32).unwrap()
        };
        let s1 = sum(512, b"abc");
        let s2 = sum(512, b"aXc");
        let s3 = sum(1024, b"AB");
        let s4 = sum(1024, b"AZ");
        let files = [
            file(1, 1, 3, Checksum(0), &[(1, b'a'), (2, b'b'), (3, b'c')], s1),
            file(2, 2, 3, s1, &[(2, b'X')], s2),
            file_ps(1024, 3, 3, 2, s2, &[(1, b'A'), (2, b'B')], s3),
            file_ps(1024, 4, 4, 2, s3, &[(2, b'Z')], s4),
        ];
        // From the snapshot: a snapshot in the new page size.
        let decoders = files
            .iter()
            .map(|f| Decoder::new(&f[..]).unwrap())
            .collect();
        let mut out = Vec::new();
        let (h, t) = compact(decoders, &mut out, 0).unwrap();
        assert_eq!(
            (h.page_size, h.min_txid, h.max_txid, h.commit),
            (1024, TxId(1), TxId(4), 2)
        );
        assert!(h.is_snapshot());
        assert_eq!(t.post_apply_checksum, s4);
        assert_eq!(pages_of(&out), [(1, b'A'), (2, b'Z')]);
        // From TXID 2: a file that follows TXID 1 and holds every page.
        let decoders = files[1..]
            .iter()
            .map(|f| Decoder::new(&f[..]).unwrap())
            .collect();
        let mut out = Vec::new();
        let (h, _) = compact(decoders, &mut out, 0).unwrap();
        assert_eq!(
            (h.page_size, h.min_txid, h.pre_apply_checksum),
            (1024, TxId(2), s1)
        );
        assert_eq!(pages_of(&out), [(1, b'A'), (2, b'Z')]);
        // A change that lacks a page cannot stand for the files before it.
        let partial = file_ps(1024, 3, 3, 2, s2, &[(2, b'B')], s3);
        let decoders = vec![
            Decoder::new(&files[1][..]).unwrap(),
            Decoder::new(&partial[..]).unwrap(),
        ];
        let err = compact(decoders, Vec::new(), 0).unwrap_err();
        assert!(err.to_string().contains("lacks page 1"), "{err}");
    }

    #[test]
    fn refuses_gaps() {
        let s1 = db_sum(b"a");
        let a = file(1, 1, 1, Checksum(0), &[(1, b'a')], s1);
        let c = file(
            3,
            3,
            1,
            Checksum(CHECKSUM_FLAG | 5),
            &[(1, b'c')],
            db_sum(b"c"),
        );
        let decoders = vec![Decoder::new(&a[..]).unwrap(), Decoder::new(&c[..]).unwrap()];
        let err = compact(decoders, Vec::new(), 0).unwrap_err();
        assert!(matches!(err, LtxError::Compaction { .. }), "{err}");
        assert!(compact(Vec::<Decoder<&[u8]>>::new(), Vec::new(), 0).is_err());
    }
}
