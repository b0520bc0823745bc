//! Record framing: `[len u32 LE][crc32c u32 LE][payload]`, the CRC covering the payload.
//!
//! The payload starts with a fixed header (format version, record kind, shard, log id) followed
//! by an opaque body. This module knows bytes only; it never interprets the body.

use super::LogId;

/// Bytes of `len` + `crc` in front of every payload.
pub const FRAME_HEADER_BYTES: usize = 8;
/// Bytes of the payload header: version u8, kind u8, shard u16, term u64, index u64.
pub const PAYLOAD_HEADER_BYTES: usize = 1 + 1 + 2 + 8 + 8;
/// The only payload format written today. Readers refuse unknown versions.
pub const FORMAT_VERSION: u8 = 1;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub enum RecordKind {
    /// A log entry of `shard` at `log_id`; the body is the entry's data.
    Entry = 1,
    /// Every entry of `shard` with an index above `log_id.index` is discarded.
    TruncateSuffix = 2,
    /// Every entry of `shard` with an index up to and including `log_id.index` may be dropped.
    PurgePrefix = 3,
}

impl RecordKind {
    fn from_byte(byte: u8) -> Option<RecordKind> {
        match byte {
            1 => Some(RecordKind::Entry),
            2 => Some(RecordKind::TruncateSuffix),
            3 => Some(RecordKind::PurgePrefix),
            _ => None,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Record<'a> {
    pub kind: RecordKind,
    pub shard: u16,
    pub log_id: LogId,
    pub body: &'a [u8],
}

impl Record<'_> {
    pub fn framed_len(&self) -> usize {
        FRAME_HEADER_BYTES + PAYLOAD_HEADER_BYTES + self.body.len()
    }

    /// Appends the framed record to `out`.
    pub fn encode_into(&self, out: &mut Vec<u8>) {
        let start = out.len();
        let payload_len = PAYLOAD_HEADER_BYTES + self.body.len();
        out.extend_from_slice(&(payload_len as u32).to_le_bytes());
        out.extend_from_slice(&[0u8; 4]);
        out.push(FORMAT_VERSION);
        out.push(self.kind as u8);
        out.extend_from_slice(&self.shard.to_le_bytes());
        out.extend_from_slice(&self.log_id.term.to_le_bytes());
        out.extend_from_slice(&self.log_id.index.to_le_bytes());
        out.extend_from_slice(self.body);
        let crc = crc32c::crc32c(&out[start + FRAME_HEADER_BYTES..]);
        out[start + 4..start + 8].copy_from_slice(&crc.to_le_bytes());
        debug_assert_eq!(out.len() - start, self.framed_len());
        debug_assert!(matches!(decode(&out[start..]), Decoded::Record(_, n) if n == self.framed_len()));
    }
}

/// What the bytes at some offset of a segment hold.
#[derive(Debug, PartialEq, Eq)]
pub enum Decoded<'a> {
    /// A whole, valid record and the number of bytes it occupies.
    Record(Record<'a>, usize),
    /// A zero length field: the unwritten (zero-filled) rest of a segment.
    End,
    /// Fewer bytes than the frame announces: a write that stopped part-way.
    Truncated,
    /// The bytes are there but do not check out (CRC mismatch, unknown version or kind).
    Corrupt { framed_len: Option<usize> },
}

/// Decodes the record at the start of `bytes`.
pub fn decode(bytes: &[u8]) -> Decoded<'_> {
    if bytes.len() < FRAME_HEADER_BYTES {
        return if bytes.iter().all(|b| *b == 0) {
            Decoded::End
        } else {
            Decoded::Truncated
        };
    }
    let payload_len = u32::from_le_bytes(bytes[0..4].try_into().expect("4 bytes")) as usize;
    if payload_len == 0 {
        return Decoded::End;
    }
    let framed_len = FRAME_HEADER_BYTES + payload_len;
    if payload_len < PAYLOAD_HEADER_BYTES {
        return Decoded::Corrupt { framed_len: None };
    }
    if bytes.len() < framed_len {
        return Decoded::Truncated;
    }
    let stored_crc = u32::from_le_bytes(bytes[4..8].try_into().expect("4 bytes"));
    let payload = &bytes[FRAME_HEADER_BYTES..framed_len];
    if crc32c::crc32c(payload) != stored_crc {
        return Decoded::Corrupt {
            framed_len: Some(framed_len),
        };
    }
    let Some(kind) = RecordKind::from_byte(payload[1]) else {
        return Decoded::Corrupt {
            framed_len: Some(framed_len),
        };
    };
    if payload[0] != FORMAT_VERSION {
        return Decoded::Corrupt {
            framed_len: Some(framed_len),
        };
    }
    let shard = u16::from_le_bytes(payload[2..4].try_into().expect("2 bytes"));
    let term = u64::from_le_bytes(payload[4..12].try_into().expect("8 bytes"));
    let index = u64::from_le_bytes(payload[12..20].try_into().expect("8 bytes"));
    let record = Record {
        kind,
        shard,
        log_id: LogId { term, index },
        body: &payload[PAYLOAD_HEADER_BYTES..],
    };
    Decoded::Record(record, framed_len)
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn entry(body: &[u8]) -> Record<'_> {
        Record {
            kind: RecordKind::Entry,
            shard: 7,
            log_id: LogId { term: 1, index: 42 },
            body,
        }
    }

    #[test]
    fn zero_bytes_are_the_end_of_a_segment() {
        assert_eq!(decode(&[0u8; 64]), Decoded::End);
        assert_eq!(decode(&[0u8; 3]), Decoded::End);
    }

    #[test]
    fn a_short_frame_is_truncated() {
        let mut out = Vec::new();
        entry(b"hello").encode_into(&mut out);
        assert_eq!(decode(&out[..out.len() - 1]), Decoded::Truncated);
        assert_eq!(decode(&out[..5]), Decoded::Truncated);
    }

    proptest! {
        #[test]
        fn encode_then_decode_round_trips(body in proptest::collection::vec(any::<u8>(), 0..2048), shard: u16, term: u64, index: u64) {
            let record = Record { kind: RecordKind::Entry, shard, log_id: LogId { term, index }, body: &body };
            let mut out = vec![0xAA];
            record.encode_into(&mut out);
            match decode(&out[1..]) {
                Decoded::Record(decoded, used) => {
                    prop_assert_eq!(used, out.len() - 1);
                    prop_assert_eq!(decoded, record);
                }
                other => prop_assert!(false, "unexpected {:?}", other),
            }
        }

        #[test]
        fn any_single_bit_flip_is_detected(body in proptest::collection::vec(any::<u8>(), 1..512), bit in 0usize..4096) {
            let mut out = Vec::new();
            entry(&body).encode_into(&mut out);
            let bit = bit % (out.len() * 8);
            out[bit / 8] ^= 1 << (bit % 8);
            let intact = matches!(decode(&out), Decoded::Record(ref r, _) if r.body == body.as_slice() && r.shard == 7);
            prop_assert!(!intact, "a flipped bit went unnoticed");
        }
    }
}
