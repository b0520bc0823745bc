//! The on-disk framing of a lane (format 2): **batches** of **records**.
//!
//! A batch is what one group commit writes before its fsync. It starts at an 8-byte-aligned
//! offset with a 24-byte header and ends with zero padding to the next multiple of 8:
//!
//! ```text
//! batch header: header_crc u32 | body_len u32 | batch_no u64 | body_crc u32 | record_count u32
//! record:       payload_len u32 | version u8 | kind u8 | shard u16 | term u64 | index u64
//!               | body_crc u32 | header_crc u32 | body (payload_len bytes)
//! ```
//!
//! Every length is covered by a checksum (the batch header's own CRC, each record header's own
//! CRC), so a damaged length is detected rather than followed. A batch whose header and body
//! check out was written completely; only the last batch of a lane can be torn (the next is
//! written only after the previous one's fsync returned), so recovery can tell a torn tail (a bad
//! batch with nothing valid after it) from corruption (anything bad followed by a valid batch).
//! `batch_no` increases by one per batch across a lane's segments.
//!
//! This module knows bytes only; it never interprets an entry's body.

use super::LogId;

/// Bytes of a batch header.
pub const BATCH_HEADER_BYTES: usize = 24;
/// Bytes of a record header.
pub const RECORD_HEADER_BYTES: usize = 32;
/// Batches start at multiples of this.
pub const BATCH_ALIGN: usize = 8;
/// The record format written today. Readers refuse unknown versions.
pub const FORMAT_VERSION: u8 = 2;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub enum RecordKind {
    /// A log entry of `shard` at `log_id`; the body is the entry's data.
    Entry = 1,
    /// Every entry of `shard` with an index above `log_id.index` is discarded.
    TruncateSuffix = 2,
    /// Every entry of `shard` with an index up to and including `log_id.index` may be dropped.
    PurgePrefix = 3,
    /// An operator accepted the loss of `shard`'s damaged entries after its intact entry
    /// `log_id.index` (`fleetlm wal repair`). `log_id.term` carries the number of damaged bytes
    /// accepted, which bounds what the lost entries could have held.
    LossAccepted = 4,
}

impl RecordKind {
    fn from_byte(byte: u8) -> Option<RecordKind> {
        match byte {
            1 => Some(RecordKind::Entry),
            2 => Some(RecordKind::TruncateSuffix),
            3 => Some(RecordKind::PurgePrefix),
            4 => Some(RecordKind::LossAccepted),
            _ => None,
        }
    }
}

/// Bytes of one `(segment_no, offset)` region in a `LossAccepted` body.
pub const REGION_BYTES: usize = 16;

pub fn encode_regions(regions: &[(u64, u64)]) -> Vec<u8> {
    let mut body = Vec::with_capacity(regions.len() * REGION_BYTES);
    for (segment_no, offset) in regions {
        body.extend_from_slice(&segment_no.to_le_bytes());
        body.extend_from_slice(&offset.to_le_bytes());
    }
    body
}

pub fn decode_regions(body: &[u8]) -> Vec<(u64, u64)> {
    body.chunks_exact(REGION_BYTES)
        .map(|chunk| {
            let segment_no = u64::from_le_bytes(chunk[..8].try_into().expect("8 bytes"));
            let offset = u64::from_le_bytes(chunk[8..].try_into().expect("8 bytes"));
            (segment_no, offset)
        })
        .collect()
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Record<'a> {
    pub kind: RecordKind,
    pub shard: u16,
    pub log_id: LogId,
    pub body: &'a [u8],
}

pub fn record_framed_len(body_len: usize) -> usize {
    RECORD_HEADER_BYTES + body_len
}

/// Bytes a batch of `body_len` bytes of records takes on disk, padding included.
pub fn batch_framed_len(body_len: usize) -> usize {
    (BATCH_HEADER_BYTES + body_len).next_multiple_of(BATCH_ALIGN)
}

impl Record<'_> {
    pub fn framed_len(&self) -> usize {
        record_framed_len(self.body.len())
    }

    /// Appends the framed record to `out`.
    pub fn encode_into(&self, out: &mut Vec<u8>) {
        let start = out.len();
        out.extend_from_slice(&(self.body.len() as u32).to_le_bytes());
        out.push(FORMAT_VERSION);
        out.push(self.kind as u8);
        out.extend_from_slice(&self.shard.to_le_bytes());
        out.extend_from_slice(&self.log_id.term.to_le_bytes());
        out.extend_from_slice(&self.log_id.index.to_le_bytes());
        out.extend_from_slice(&crc32c::crc32c(self.body).to_le_bytes());
        let header_crc = crc32c::crc32c(&out[start..start + 28]);
        out.extend_from_slice(&header_crc.to_le_bytes());
        out.extend_from_slice(self.body);
        debug_assert_eq!(out.len() - start, self.framed_len());
        debug_assert!(matches!(decode_record(&out[start..]), DecodedRecord::Record(_, n) if n == self.framed_len()));
    }
}

/// What the bytes at a record's position hold.
#[derive(Debug, PartialEq, Eq)]
pub enum DecodedRecord<'a> {
    /// A whole, valid record and the bytes it occupies.
    Record(Record<'a>, usize),
    /// The header checks out (so its shard, id and length are trustworthy) but the body does not.
    BadBody {
        kind: RecordKind,
        shard: u16,
        log_id: LogId,
        framed_len: usize,
    },
    /// The header does not check out (or is cut short): nothing in it can be trusted.
    BadHeader,
}

/// Decodes the record at the start of `bytes`.
pub fn decode_record(bytes: &[u8]) -> DecodedRecord<'_> {
    let Some(header) = bytes.get(..RECORD_HEADER_BYTES) else {
        return DecodedRecord::BadHeader;
    };
    let stored_header_crc = u32::from_le_bytes(header[28..32].try_into().expect("4 bytes"));
    if crc32c::crc32c(&header[..28]) != stored_header_crc || header[4] != FORMAT_VERSION {
        return DecodedRecord::BadHeader;
    }
    let Some(kind) = RecordKind::from_byte(header[5]) else {
        return DecodedRecord::BadHeader;
    };
    let body_len = u32::from_le_bytes(header[0..4].try_into().expect("4 bytes")) as usize;
    let shard = u16::from_le_bytes(header[6..8].try_into().expect("2 bytes"));
    let term = u64::from_le_bytes(header[8..16].try_into().expect("8 bytes"));
    let index = u64::from_le_bytes(header[16..24].try_into().expect("8 bytes"));
    let body_crc = u32::from_le_bytes(header[24..28].try_into().expect("4 bytes"));
    let log_id = LogId { term, index };
    let framed_len = record_framed_len(body_len);
    match bytes.get(RECORD_HEADER_BYTES..framed_len) {
        Some(body) if crc32c::crc32c(body) == body_crc => DecodedRecord::Record(
            Record {
                kind,
                shard,
                log_id,
                body,
            },
            framed_len,
        ),
        _ => DecodedRecord::BadBody {
            kind,
            shard,
            log_id,
            framed_len,
        },
    }
}

/// A batch header that checks out.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BatchHeader {
    pub body_len: u32,
    pub batch_no: u64,
    pub body_crc: u32,
    pub record_count: u32,
}

impl BatchHeader {
    pub fn framed_len(&self) -> usize {
        batch_framed_len(self.body_len as usize)
    }
}

/// What the bytes at a batch position hold.
#[derive(Debug, PartialEq, Eq)]
pub enum DecodedBatch {
    /// Zeros: the unwritten rest of a segment (if nothing valid follows).
    Zeros,
    /// A header that checks out; the body may still be damaged (see `body_intact`).
    Header(BatchHeader),
    /// Neither zeros nor a valid header.
    Damaged,
}

pub fn decode_batch_header(bytes: &[u8]) -> DecodedBatch {
    let Some(header) = bytes.get(..BATCH_HEADER_BYTES) else {
        return if bytes.iter().all(|b| *b == 0) {
            DecodedBatch::Zeros
        } else {
            DecodedBatch::Damaged
        };
    };
    if header.iter().all(|b| *b == 0) {
        return DecodedBatch::Zeros;
    }
    let stored_crc = u32::from_le_bytes(header[0..4].try_into().expect("4 bytes"));
    if crc32c::crc32c(&header[4..]) != stored_crc {
        return DecodedBatch::Damaged;
    }
    DecodedBatch::Header(BatchHeader {
        body_len: u32::from_le_bytes(header[4..8].try_into().expect("4 bytes")),
        batch_no: u64::from_le_bytes(header[8..16].try_into().expect("8 bytes")),
        body_crc: u32::from_le_bytes(header[16..20].try_into().expect("4 bytes")),
        record_count: u32::from_le_bytes(header[20..24].try_into().expect("4 bytes")),
    })
}

/// The batch's body if all of it is present and its checksum matches.
pub fn intact_body<'a>(header: &BatchHeader, bytes_from_header: &'a [u8]) -> Option<&'a [u8]> {
    let body = bytes_from_header.get(BATCH_HEADER_BYTES..BATCH_HEADER_BYTES + header.body_len as usize)?;
    (crc32c::crc32c(body) == header.body_crc).then_some(body)
}

/// Starts a batch in `out` (which must be empty): a header placeholder for `seal_batch`.
pub fn begin_batch(out: &mut Vec<u8>) {
    debug_assert!(out.is_empty());
    out.resize(BATCH_HEADER_BYTES, 0);
}

/// Fills in the header of the batch `out` holds (records after `begin_batch`) and pads it.
pub fn seal_batch(out: &mut Vec<u8>, batch_no: u64, record_count: u32) {
    let body_len = out.len() - BATCH_HEADER_BYTES;
    let body_crc = crc32c::crc32c(&out[BATCH_HEADER_BYTES..]);
    out[4..8].copy_from_slice(&(body_len as u32).to_le_bytes());
    out[8..16].copy_from_slice(&batch_no.to_le_bytes());
    out[16..20].copy_from_slice(&body_crc.to_le_bytes());
    out[20..24].copy_from_slice(&record_count.to_le_bytes());
    let header_crc = crc32c::crc32c(&out[4..BATCH_HEADER_BYTES]);
    out[0..4].copy_from_slice(&header_crc.to_le_bytes());
    out.resize(batch_framed_len(body_len), 0);
    debug_assert!(matches!(decode_batch_header(out), DecodedBatch::Header(h) if intact_body(&h, out).is_some()));
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

    fn batch_of(bodies: &[Vec<u8>]) -> Vec<u8> {
        let mut out = Vec::new();
        begin_batch(&mut out);
        for body in bodies {
            entry(body).encode_into(&mut out);
        }
        seal_batch(&mut out, 9, bodies.len() as u32);
        out
    }

    #[test]
    fn zero_bytes_are_the_end_of_a_segment() {
        assert_eq!(decode_batch_header(&[0u8; 64]), DecodedBatch::Zeros);
        assert_eq!(decode_batch_header(&[0u8; 3]), DecodedBatch::Zeros);
    }

    #[test]
    fn a_short_record_has_a_bad_body_and_a_short_header_is_bad() {
        let mut out = Vec::new();
        entry(b"hello").encode_into(&mut out);
        assert!(matches!(
            decode_record(&out[..out.len() - 1]),
            DecodedRecord::BadBody { shard: 7, .. }
        ));
        assert_eq!(decode_record(&out[..5]), DecodedRecord::BadHeader);
    }

    #[test]
    fn batches_are_aligned_and_their_header_is_checked() {
        let out = batch_of(&[b"a".to_vec(), b"bcd".to_vec()]);
        assert_eq!(out.len() % BATCH_ALIGN, 0);
        let DecodedBatch::Header(header) = decode_batch_header(&out) else {
            panic!("valid header expected")
        };
        assert_eq!((header.batch_no, header.record_count), (9, 2));
        assert!(intact_body(&header, &out).is_some());
    }

    proptest! {
        #[test]
        fn encode_then_decode_round_trips(body in proptest::collection::vec(any::<u8>(), 0..2048), shard: u16, term: u64, index: u64) {
            let record = Record { kind: RecordKind::Entry, shard, log_id: LogId { term, index }, body: &body };
            let mut out = vec![0xAA];
            record.encode_into(&mut out);
            match decode_record(&out[1..]) {
                DecodedRecord::Record(decoded, used) => {
                    prop_assert_eq!(used, out.len() - 1);
                    prop_assert_eq!(decoded, record);
                }
                other => prop_assert!(false, "unexpected {:?}", other),
            }
        }

        /// A flipped bit anywhere (lengths included) is caught by the record or by the batch.
        #[test]
        fn any_single_bit_flip_is_detected(bodies in proptest::collection::vec(proptest::collection::vec(any::<u8>(), 0..300), 1..4), bit in 0usize..100_000) {
            let mut out = batch_of(&bodies);
            let bit = bit % (out.len() * 8);
            out[bit / 8] ^= 1 << (bit % 8);
            let batch_ok = match decode_batch_header(&out) {
                DecodedBatch::Header(header) => intact_body(&header, &out).is_some(),
                _ => false,
            };
            let padding_start = out.len() - (out.len() - BATCH_HEADER_BYTES - bodies.iter().map(|b| b.len() + RECORD_HEADER_BYTES).sum::<usize>());
            // Only a flip inside the zero padding leaves the batch intact.
            prop_assert!(!batch_ok || bit / 8 >= padding_start, "a flipped bit went unnoticed");
            if bit / 8 >= BATCH_HEADER_BYTES && bit / 8 < padding_start {
                let mut at = BATCH_HEADER_BYTES;
                let mut damaged = 0;
                for _ in &bodies {
                    match decode_record(&out[at..]) {
                        DecodedRecord::Record(_, used) => at += used,
                        DecodedRecord::BadBody { framed_len, .. } => { damaged += 1; at += framed_len; }
                        DecodedRecord::BadHeader => { damaged += 1; break; }
                    }
                }
                prop_assert_eq!(damaged, 1, "exactly the flipped record is damaged");
            }
        }
    }
}
