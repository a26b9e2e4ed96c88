//! The replication wire format, version 3 (see "Replication protocol" in
//! `docs/design.md`). Integers are big-endian; strings are a u16 length and UTF-8.

use bytes::{Buf, BufMut, Bytes, BytesMut};

use crate::transport::{DbPosition, Frame, MAX_CHUNK, StreamRequest};

/// Request body magic.
pub const REQUEST_MAGIC: &[u8; 4] = b"LFSR";
/// Response stream magic.
pub const STREAM_MAGIC: &[u8; 4] = b"LFSS";
/// The protocol version this build speaks. Other versions (1: `Ready` had no payload;
/// 2: no archive in the request, no `Archive` frame) are refused both ways with a
/// [`WireError::Version`] that names both versions.
pub const VERSION: u16 = 3;
/// Largest frame payload accepted: one chunk plus its database name and flags.
pub const MAX_PAYLOAD: usize = MAX_CHUNK + 2 + u16::MAX as usize + 1;
/// Frame header: type u8 + payload length u32.
pub const FRAME_HEADER: usize = 5;

const T_LTX: u8 = 1;
const T_READY: u8 = 2;
const T_HEARTBEAT: u8 = 3;
const T_HANDOFF: u8 = 4;
const T_END: u8 = 5;
const T_ARCHIVE: u8 = 6;

/// Why bytes are not a valid request or frame.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum WireError {
    /// The bytes end in the middle of a field.
    #[error("truncated {what}")]
    Truncated {
        /// The field being read.
        what: &'static str,
    },
    /// Wrong magic: not a litefs stream.
    #[error("bad magic {found:?} (expected {expected:?})")]
    BadMagic {
        /// What was found.
        found: [u8; 4],
        /// What was expected.
        expected: [u8; 4],
    },
    /// A version this build does not speak.
    #[error("unsupported protocol version {0} (this build speaks {VERSION})")]
    Version(u16),
    /// An unknown frame type.
    #[error("unknown frame type {0}")]
    FrameType(u8),
    /// A frame longer than any valid one.
    #[error("frame of {0} bytes exceeds the limit")]
    TooLong(usize),
    /// A string that is not UTF-8.
    #[error("{what} is not UTF-8")]
    Utf8 {
        /// The field.
        what: &'static str,
    },
    /// A frame whose payload does not have the size its type requires, or extra bytes.
    #[error("malformed {what} frame")]
    Malformed {
        /// The frame type.
        what: &'static str,
    },
}

fn put_str(out: &mut BytesMut, s: &str) {
    // Names are database names and ids; longer ones are cut (never produced here).
    let b = &s.as_bytes()[..s.len().min(u16::MAX as usize)];
    out.put_u16(b.len() as u16);
    out.put_slice(b);
}

fn get_str(b: &mut &[u8], what: &'static str) -> Result<String, WireError> {
    if b.remaining() < 2 {
        return Err(WireError::Truncated { what });
    }
    let n = b.get_u16() as usize;
    if b.remaining() < n {
        return Err(WireError::Truncated { what });
    }
    let s = std::str::from_utf8(&b[..n]).map_err(|_| WireError::Utf8 { what })?;
    let s = s.to_string();
    b.advance(n);
    Ok(s)
}

fn get_magic(b: &mut &[u8], expected: &[u8; 4]) -> Result<(), WireError> {
    if b.remaining() < 6 {
        return Err(WireError::Truncated { what: "preamble" });
    }
    let mut found = [0u8; 4];
    b.copy_to_slice(&mut found);
    if &found != expected {
        return Err(WireError::BadMagic {
            found,
            expected: *expected,
        });
    }
    match b.get_u16() {
        VERSION => Ok(()),
        v => Err(WireError::Version(v)),
    }
}

/// Encodes a stream request (the POST body).
pub fn encode_request(r: &StreamRequest) -> Bytes {
    let mut out = BytesMut::new();
    out.put_slice(REQUEST_MAGIC);
    out.put_u16(VERSION);
    out.put_u64(r.node_id);
    put_str(&mut out, r.cluster_id.as_deref().unwrap_or(""));
    put_str(&mut out, r.archive.as_deref().unwrap_or(""));
    out.put_u32(r.positions.len() as u32);
    for p in &r.positions {
        put_str(&mut out, &p.db);
        out.put_u64(p.txid);
        out.put_u64(p.post_apply_checksum);
    }
    out.freeze()
}

/// Decodes a stream request.
///
/// # Errors
/// [`WireError`] for anything but a complete, valid request.
pub fn decode_request(mut b: &[u8]) -> Result<StreamRequest, WireError> {
    get_magic(&mut b, REQUEST_MAGIC)?;
    if b.remaining() < 8 {
        return Err(WireError::Truncated { what: "node id" });
    }
    let node_id = b.get_u64();
    let cluster = get_str(&mut b, "cluster id")?;
    let archive = get_str(&mut b, "archive")?;
    if b.remaining() < 4 {
        return Err(WireError::Truncated { what: "count" });
    }
    let n = b.get_u32() as usize;
    let mut positions = Vec::with_capacity(n.min(4096));
    for _ in 0..n {
        let db = get_str(&mut b, "database name")?;
        if b.remaining() < 16 {
            return Err(WireError::Truncated { what: "position" });
        }
        positions.push(DbPosition {
            db,
            txid: b.get_u64(),
            post_apply_checksum: b.get_u64(),
        });
    }
    if b.has_remaining() {
        return Err(WireError::Malformed { what: "request" });
    }
    Ok(StreamRequest {
        node_id,
        cluster_id: (!cluster.is_empty()).then_some(cluster),
        archive: (!archive.is_empty()).then_some(archive),
        positions,
    })
}

/// The stream preamble: magic, version and the primary's cluster id.
pub fn encode_preamble(cluster_id: &str) -> Bytes {
    let mut out = BytesMut::new();
    out.put_slice(STREAM_MAGIC);
    out.put_u16(VERSION);
    put_str(&mut out, cluster_id);
    out.freeze()
}

/// Decodes the preamble from the start of `buf`; `Ok(None)` if more bytes are needed,
/// else the cluster id and the preamble's length.
///
/// # Errors
/// Bad magic or version.
pub fn decode_preamble(buf: &[u8]) -> Result<Option<(String, usize)>, WireError> {
    let mut b = buf;
    if b.len() < 8 {
        if b.len() >= 4 && &b[..4] != STREAM_MAGIC {
            return get_magic(&mut b, STREAM_MAGIC).map(|_| None);
        }
        return Ok(None);
    }
    get_magic(&mut b, STREAM_MAGIC)?;
    match get_str(&mut b, "cluster id") {
        Ok(id) => Ok(Some((id, buf.len() - b.len()))),
        Err(WireError::Truncated { .. }) => Ok(None),
        Err(e) => Err(e),
    }
}

/// Encodes one frame.
pub fn encode_frame(f: &Frame) -> Bytes {
    let mut payload = BytesMut::new();
    let t = match f {
        Frame::Ltx { db, chunk, last } => {
            put_str(&mut payload, db);
            payload.put_u8(u8::from(*last));
            payload.put_slice(chunk);
            T_LTX
        }
        Frame::Ready { databases } => {
            payload.put_u32(databases.len() as u32);
            for d in databases {
                put_str(&mut payload, d);
            }
            T_READY
        }
        Frame::Heartbeat { primary_time_ms } => {
            payload.put_u64(*primary_time_ms);
            T_HEARTBEAT
        }
        Frame::Handoff { lease_id } => {
            put_str(&mut payload, lease_id);
            T_HANDOFF
        }
        Frame::End => T_END,
        Frame::Archive {
            db,
            txid,
            post_apply_checksum,
        } => {
            put_str(&mut payload, db);
            payload.put_u64(*txid);
            payload.put_u64(*post_apply_checksum);
            T_ARCHIVE
        }
    };
    let mut out = BytesMut::with_capacity(FRAME_HEADER + payload.len());
    out.put_u8(t);
    out.put_u32(payload.len() as u32);
    out.put_slice(&payload);
    out.freeze()
}

/// Decodes one frame from the start of `buf`; `Ok(None)` if more bytes are needed,
/// else the frame and how many bytes it used.
///
/// # Errors
/// [`WireError`] for an unknown type, an oversized or malformed frame.
pub fn decode_frame(buf: &[u8]) -> Result<Option<(Frame, usize)>, WireError> {
    if buf.len() < FRAME_HEADER {
        return Ok(None);
    }
    let t = buf[0];
    if !(T_LTX..=T_ARCHIVE).contains(&t) {
        return Err(WireError::FrameType(t));
    }
    let len = u32::from_be_bytes([buf[1], buf[2], buf[3], buf[4]]) as usize;
    if len > MAX_PAYLOAD {
        return Err(WireError::TooLong(len));
    }
    if buf.len() < FRAME_HEADER + len {
        return Ok(None);
    }
    let mut p = &buf[FRAME_HEADER..FRAME_HEADER + len];
    let exact = |p: &[u8], what| {
        if p.is_empty() {
            Ok(())
        } else {
            Err(WireError::Malformed { what })
        }
    };
    let frame = match t {
        T_LTX => {
            let db = get_str(&mut p, "database name")
                .map_err(|_| WireError::Malformed { what: "ltx" })?;
            if p.is_empty() {
                return Err(WireError::Malformed { what: "ltx" });
            }
            let last = match p.get_u8() {
                0 => false,
                1 => true,
                _ => return Err(WireError::Malformed { what: "ltx" }),
            };
            if p.len() > MAX_CHUNK {
                return Err(WireError::TooLong(p.len()));
            }
            Frame::Ltx {
                db,
                chunk: p.to_vec(),
                last,
            }
        }
        T_READY => {
            if p.remaining() < 4 {
                return Err(WireError::Malformed { what: "ready" });
            }
            let n = p.get_u32() as usize;
            let mut databases = Vec::with_capacity(n.min(4096));
            for _ in 0..n {
                databases.push(
                    get_str(&mut p, "database name")
                        .map_err(|_| WireError::Malformed { what: "ready" })?,
                );
            }
            exact(p, "ready")?;
            Frame::Ready { databases }
        }
        T_HEARTBEAT => {
            if p.len() != 8 {
                return Err(WireError::Malformed { what: "heartbeat" });
            }
            Frame::Heartbeat {
                primary_time_ms: p.get_u64(),
            }
        }
        T_HANDOFF => {
            let lease_id = get_str(&mut p, "lease id")
                .map_err(|_| WireError::Malformed { what: "handoff" })?;
            exact(p, "handoff")?;
            Frame::Handoff { lease_id }
        }
        T_ARCHIVE => {
            let db = get_str(&mut p, "database name")
                .map_err(|_| WireError::Malformed { what: "archive" })?;
            if p.len() != 16 {
                return Err(WireError::Malformed { what: "archive" });
            }
            Frame::Archive {
                db,
                txid: p.get_u64(),
                post_apply_checksum: p.get_u64(),
            }
        }
        _ => {
            exact(p, "end")?;
            Frame::End
        }
    };
    Ok(Some((frame, FRAME_HEADER + len)))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn frames() -> Vec<Frame> {
        vec![
            Frame::Ltx {
                db: "app.db".into(),
                chunk: vec![1, 2, 3],
                last: false,
            },
            Frame::Ltx {
                db: "app.db".into(),
                chunk: Vec::new(),
                last: true,
            },
            Frame::Ready {
                databases: Vec::new(),
            },
            Frame::Ready {
                databases: vec!["a.db".into(), "b.db".into()],
            },
            Frame::Heartbeat {
                primary_time_ms: 1_700_000_000_123,
            },
            Frame::Handoff {
                lease_id: "abc".into(),
            },
            Frame::End,
            Frame::Archive {
                db: "app.db".into(),
                txid: 42,
                post_apply_checksum: 0x8000_0000_0000_0007,
            },
        ]
    }

    #[test]
    fn frames_round_trip_and_every_prefix_asks_for_more() {
        for f in frames() {
            let b = encode_frame(&f);
            assert_eq!(decode_frame(&b).unwrap(), Some((f.clone(), b.len())));
            for cut in 0..b.len() {
                assert_eq!(decode_frame(&b[..cut]).unwrap(), None, "{f:?} cut at {cut}");
            }
        }
    }

    #[test]
    fn corrupt_headers_and_payloads_are_refused() {
        let mut b = encode_frame(&Frame::Ready {
            databases: Vec::new(),
        })
        .to_vec();
        b[0] = 9;
        assert_eq!(decode_frame(&b), Err(WireError::FrameType(9)));
        let mut b = encode_frame(&Frame::Ready {
            databases: Vec::new(),
        })
        .to_vec();
        b[1..5].copy_from_slice(&(MAX_PAYLOAD as u32 + 1).to_be_bytes());
        assert!(matches!(decode_frame(&b), Err(WireError::TooLong(_))));
        // A version 1 Ready (no payload).
        assert!(matches!(
            decode_frame(&[T_READY, 0, 0, 0, 0]),
            Err(WireError::Malformed { .. })
        ));
        // An archive frame without its position.
        let mut b = encode_frame(&Frame::Archive {
            db: "x".into(),
            txid: 1,
            post_apply_checksum: 2,
        })
        .to_vec();
        b.truncate(b.len() - 8);
        let len = (b.len() - FRAME_HEADER) as u32;
        b[1..5].copy_from_slice(&len.to_be_bytes());
        assert!(matches!(decode_frame(&b), Err(WireError::Malformed { .. })));
        // A heartbeat with a short payload.
        let b = [T_HEARTBEAT, 0, 0, 0, 4, 1, 2, 3, 4];
        assert!(matches!(decode_frame(&b), Err(WireError::Malformed { .. })));
        // An LTX frame with a bad "last" flag.
        let mut b = encode_frame(&Frame::Ltx {
            db: "x".into(),
            chunk: vec![7],
            last: true,
        })
        .to_vec();
        b[FRAME_HEADER + 3] = 2;
        assert!(matches!(decode_frame(&b), Err(WireError::Malformed { .. })));
    }

    #[test]
    fn requests_round_trip_and_truncations_fail() {
        let r = StreamRequest {
            node_id: 42,
            cluster_id: Some("LFSC0123456789abcdef".into()),
            archive: Some("s3://bucket/prefix".into()),
            positions: vec![
                DbPosition {
                    db: "a.db".into(),
                    txid: 7,
                    post_apply_checksum: 0x8000_0000_0000_0001,
                },
                DbPosition {
                    db: "b.db".into(),
                    txid: 0,
                    post_apply_checksum: 0,
                },
            ],
        };
        let b = encode_request(&r);
        assert_eq!(decode_request(&b).unwrap(), r);
        for cut in 0..b.len() {
            assert!(decode_request(&b[..cut]).is_err(), "cut at {cut}");
        }
        for other in [1u16, 2, 4] {
            let mut v = b.to_vec();
            v[4..6].copy_from_slice(&other.to_be_bytes());
            let e = decode_request(&v).unwrap_err();
            assert_eq!(e, WireError::Version(other));
            assert_eq!(
                e.to_string(),
                format!("unsupported protocol version {other} (this build speaks 3)")
            );
        }
        let none = StreamRequest::default();
        assert_eq!(decode_request(&encode_request(&none)).unwrap(), none);
    }

    #[test]
    fn preamble_round_trips() {
        let b = encode_preamble("LFSC00000000000000aa");
        assert_eq!(
            decode_preamble(&b).unwrap(),
            Some(("LFSC00000000000000aa".to_string(), b.len()))
        );
        for cut in 0..b.len() {
            assert_eq!(decode_preamble(&b[..cut]).unwrap(), None);
        }
        assert!(decode_preamble(b"HTTP/1.1").is_err());
        // A version 1 primary's preamble.
        let mut v1 = b.to_vec();
        v1[4..6].copy_from_slice(&1u16.to_be_bytes());
        assert_eq!(decode_preamble(&v1), Err(WireError::Version(1)));
    }
}
