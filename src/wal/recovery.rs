//! Rebuilds a lane's index from its segment files at open (and describes them for `wal inspect`).
//!
//! The framing decides what a damaged region is (see `record.rs`):
//! - a **torn tail**: a bad batch in the newest segment with no valid batch anywhere after it
//!   **that shows unwritten bytes** (see `looks_torn`). Its fsync never returned, so none of it
//!   was acknowledged: it is zeroed (when opening for writing) and writing resumes there.
//! - **corruption**: anything bad followed by a valid batch, anything bad in an older segment
//!   (every older segment was fsync'd before the next was started), and a last batch that was
//!   written whole but fails its checksum (bit rot: a flipped bit leaves no unwritten sector).
//!   A damaged record whose header checks out names its shard and entry exactly; that shard is
//!   degraded. Bytes whose meaning is unknown degrade every shard of the lane. Intact records
//!   around the damage are kept, and no byte is deleted.
//! - **unreadable sectors** (EIO on read): read around sector by sector (`segment::read_segment`).
//!   A record touching one is damaged (its shard degraded); an unreadable batch or record header
//!   is unknown damage; an unreadable sector past the lane's last batch held nothing (batches
//!   are written one after the other, and the position of the next one reads as zeros) and is
//!   only reported.
//!
//! Per shard, entries at or below the newest purge mark are ignored (they were archived), so
//! segments deleted out of order never look like a gap; any other gap in entry indexes degrades
//! the shard, unless an operator accepted the loss (`RecordKind::LossAccepted`).

use super::LogId;
use super::fs::{self, FileSystem};
use super::index::{AcceptedLoss, EntryLocation, LaneIndex, SegmentInfo};
use super::record::{
    self, BATCH_ALIGN, BATCH_HEADER_BYTES, BatchHeader, DecodedBatch, DecodedRecord, RECORD_HEADER_BYTES, RecordKind,
};
use super::segment::{self, SECTOR_BYTES, SEGMENT_HEADER_BYTES};
use std::collections::{BTreeMap, HashMap};
use std::io;
use std::path::Path;

/// Damage found in a lane, with its exact position.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Damage {
    pub segment_no: u64,
    pub offset: u64,
    /// Bytes the damaged region spans.
    pub len: u64,
    /// The entry the damaged bytes held, when its header is intact: `(shard, index)`.
    pub entry: Option<(u16, u64)>,
    pub detail: String,
}

/// One segment as recovery found it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SegmentSummary {
    pub segment_no: u64,
    pub file_bytes: u64,
    /// Bytes up to the end of the last valid batch.
    pub used_bytes: u64,
    pub batches: u64,
    pub records: u64,
    /// Where the segment was sealed after a failed write or fsync (`segment::seal_path`):
    /// anything past it is ignored.
    pub sealed_at: Option<u64>,
}

pub struct RecoveredLane {
    pub index: LaneIndex,
    /// Where the next batch goes in the newest segment, `None` if a new segment must be started.
    pub resume_offset: Option<u64>,
    pub next_batch_no: u64,
    pub segments: Vec<SegmentSummary>,
    pub damage: Vec<Damage>,
    /// `(segment_no, offset)` of a torn tail (zeroed if the lane was opened for writing).
    pub torn_tail: Option<(u64, u64)>,
    /// Every region the disk could not read: `(segment_no, offset, len)`.
    pub unreadable: Vec<(u64, u64, u64)>,
}

/// What the scan found, in log order.
enum Found {
    Record {
        kind: RecordKind,
        shard: u16,
        location: EntryLocation,
    },
    DamagedEntry {
        shard: u16,
        index: u64,
        damage: usize,
    },
    Unknown {
        damage: usize,
    },
    /// An operator's `LossAccepted` record (or a copy carried into a newer segment).
    LossMark {
        shard: u16,
        loss: AcceptedLoss,
    },
}

/// How a segment's scan ended.
enum SegmentEnd {
    /// Everything valid up to `offset`; the rest is zeros (or the segment is full).
    Clean(usize),
    /// A torn write starts at `offset` (newest segment only).
    TornTail(usize),
    /// Damage reaches the segment's end: do not write here again.
    Corrupt,
}

/// Scans `lane_dir`. `lane_shards` are the shards that live in this lane. With `repair_tail`, a
/// torn tail is zeroed and fsync'd; without, nothing is written (inspection).
pub fn recover_lane(
    fs: &dyn FileSystem,
    lane_dir: &Path,
    lane_shards: &[u16],
    repair_tail: bool,
) -> io::Result<RecoveredLane> {
    let mut index = LaneIndex::default();
    let mut found = Vec::new();
    let mut damage = Vec::new();
    let mut summaries = Vec::new();
    let mut torn_tail = None;
    let mut resume_offset = None;
    let mut expected_batch_no: Option<u64> = None;
    let mut max_batch_no = 0;
    let mut unreadable = Vec::new();
    let segment_numbers = segment::list_segments(fs, lane_dir)?;

    for (position, &segment_no) in segment_numbers.iter().enumerate() {
        let is_last = position + 1 == segment_numbers.len();
        let file = segment::open_segment(fs, lane_dir, segment_no)?;
        let mut read = segment::read_segment(file.as_ref())?;
        let sealed_at = segment::read_seal(fs, lane_dir, segment_no)?;
        if let Some(end) = sealed_at {
            ignore_past_seal(&mut read, end);
        }
        let bytes = read.bytes;
        for &(from, to) in &read.unreadable {
            tracing::error!(
                segment_no,
                offset = from,
                len = to - from,
                lane = %lane_dir.display(),
                "WAL segment has unreadable sectors (EIO)"
            );
            unreadable.push((segment_no, from as u64, (to - from) as u64));
        }
        let magic_unreadable = read
            .unreadable
            .first()
            .is_some_and(|&(from, _)| from < SEGMENT_HEADER_BYTES as usize);
        if bytes.starts_with(segment::SEGMENT_MAGIC_V1) {
            return Err(io::Error::new(
                io::ErrorKind::InvalidData,
                format!(
                    "{} was written by an older FleetLM (WAL format 1), which this version does not read; \
                     drain it with the version that wrote it (stop it with SIGTERM so the archive has everything), \
                     then move the wal directory aside",
                    segment::segment_path(lane_dir, segment_no).display()
                ),
            ));
        }
        if is_last && read.unreadable.is_empty() && bytes.iter().all(|b| *b == 0) {
            // A rotation that crashed before its first fsync: nothing was ever written here.
            drop(file);
            if repair_tail {
                segment::remove_segment(fs, lane_dir, segment_no)?;
            }
            break;
        }
        index.segments.insert(
            segment_no,
            SegmentInfo {
                file: file.clone(),
                max_index_by_shard: HashMap::new(),
            },
        );
        index.active_segment = segment_no;
        if position > 0 && segment_numbers[position - 1] + 1 != segment_no {
            // Segments in between were deleted (all archived): batch numbers jump.
            expected_batch_no = None;
        }
        if !magic_unreadable && !bytes.starts_with(segment::SEGMENT_MAGIC) {
            damage.push(Damage {
                segment_no,
                offset: 0,
                len: bytes.len() as u64,
                entry: None,
                detail: "segment does not start with the FleetLM WAL magic".into(),
            });
            found.push(Found::Unknown {
                damage: damage.len() - 1,
            });
            summaries.push(SegmentSummary {
                segment_no,
                file_bytes: bytes.len() as u64,
                used_bytes: 0,
                batches: 0,
                records: 0,
                sealed_at,
            });
            continue;
        }
        let mut scan = SegmentScan {
            bytes: &bytes,
            unreadable: &read.unreadable,
            segment_no,
            lane_shards,
            found: &mut found,
            damage: &mut damage,
            batches: 0,
            records: 0,
            used: SEGMENT_HEADER_BYTES as usize,
        };
        let end = scan.run(is_last, &mut expected_batch_no, &mut max_batch_no);
        summaries.push(SegmentSummary {
            segment_no,
            file_bytes: bytes.len() as u64,
            used_bytes: scan.used as u64,
            batches: scan.batches,
            records: scan.records,
            sealed_at,
        });
        match end {
            // A sealed segment is never written again: the lane starts a new one.
            SegmentEnd::Clean(_) if is_last && sealed_at.is_some() => {}
            SegmentEnd::Clean(offset) if is_last => resume_offset = Some(offset as u64),
            SegmentEnd::TornTail(offset) => {
                torn_tail = Some((segment_no, offset as u64));
                if repair_tail {
                    save_torn_tail(fs, lane_dir, segment_no, &bytes, offset)?;
                    zero_tail(file.as_ref(), &bytes, offset)?;
                }
                resume_offset = Some(offset as u64);
            }
            SegmentEnd::Clean(_) | SegmentEnd::Corrupt => {}
        }
    }
    fold_into_index(&mut index, &found, &damage, lane_shards);
    Ok(RecoveredLane {
        index,
        resume_offset,
        next_batch_no: max_batch_no + 1,
        segments: summaries,
        damage,
        torn_tail,
        unreadable,
    })
}

/// What the disk kept past a seal was never acknowledged: it reads as never written.
fn ignore_past_seal(read: &mut segment::SegmentBytes, end: u64) {
    let end = usize::try_from(end).unwrap_or(usize::MAX).min(read.bytes.len());
    read.bytes[end..].fill(0);
    read.unreadable.retain_mut(|(from, to)| {
        *to = (*to).min(end);
        *from < *to
    });
}

struct SegmentScan<'a> {
    /// The segment; unreadable sectors read as zeros.
    bytes: &'a [u8],
    /// `[from, to)` ranges of `bytes` the disk could not read, ascending.
    unreadable: &'a [(usize, usize)],
    segment_no: u64,
    lane_shards: &'a [u16],
    found: &'a mut Vec<Found>,
    damage: &'a mut Vec<Damage>,
    batches: u64,
    records: u64,
    used: usize,
}

impl SegmentScan<'_> {
    fn run(&mut self, is_last: bool, expected_batch_no: &mut Option<u64>, max_batch_no: &mut u64) -> SegmentEnd {
        let bytes = self.bytes;
        let mut offset = SEGMENT_HEADER_BYTES as usize;
        loop {
            if offset + BATCH_HEADER_BYTES > bytes.len() {
                return SegmentEnd::Clean(offset);
            }
            if let Some((from, to)) = self.unreadable_in(offset, offset + BATCH_HEADER_BYTES) {
                // Whether a batch starts here, and how long it is, cannot be known.
                let detail = format!("unreadable sectors (EIO) at bytes {from}..{to} hide a batch header");
                match next_valid_batch(bytes, offset + BATCH_ALIGN) {
                    Some(next) => {
                        self.unknown(offset, next, &detail);
                        offset = next;
                        continue;
                    }
                    None => {
                        let end = self.damaged_extent(offset);
                        self.unknown(offset, end, &detail);
                        return SegmentEnd::Corrupt;
                    }
                }
            }
            let header = match record::decode_batch_header(&bytes[offset..]) {
                DecodedBatch::Header(header) if offset + header.framed_len() <= bytes.len() => Some(header),
                // Nothing was written here, so nothing after it either (batches are written in
                // order); an unreadable sector further on held nothing.
                DecodedBatch::Zeros if bytes[offset..].iter().all(|b| *b == 0) => return SegmentEnd::Clean(offset),
                DecodedBatch::Zeros | DecodedBatch::Header(_) | DecodedBatch::Damaged => None,
            };
            let Some(header) = header else {
                // The length is unknown: the damage reaches the next valid batch, if any.
                match next_valid_batch(bytes, offset + BATCH_ALIGN) {
                    Some(next) => {
                        self.walk_damaged(offset, next, None, "batch header is damaged");
                        offset = next;
                        continue;
                    }
                    None if is_last && self.looks_torn(offset, None) => return SegmentEnd::TornTail(offset),
                    None => {
                        let end = self.damaged_extent(offset);
                        self.walk_damaged(offset, end, None, "batch header is damaged, nothing valid after it");
                        return SegmentEnd::Corrupt;
                    }
                }
            };
            let end = offset + header.framed_len();
            if let Some(expected) = *expected_batch_no
                && header.batch_no != expected
            {
                self.unknown(
                    offset,
                    offset,
                    &format!("batch {} found where batch {expected} was due", header.batch_no),
                );
            }
            match record::intact_body(&header, &bytes[offset..]) {
                Some(_) => self.walk_intact(offset, &header),
                None => {
                    if is_last && next_valid_batch(bytes, end).is_none() && self.looks_torn(offset, Some(&header)) {
                        return SegmentEnd::TornTail(offset);
                    }
                    self.walk_damaged(offset, end, Some(header.record_count), "batch body checksum mismatch");
                }
            }
            *expected_batch_no = Some(header.batch_no + 1);
            *max_batch_no = (*max_batch_no).max(header.batch_no);
            self.batches += 1;
            self.used = end;
            offset = end;
        }
    }

    /// The first unreadable range overlapping `[from, to)`.
    fn unreadable_in(&self, from: usize, to: usize) -> Option<(usize, usize)> {
        self.unreadable
            .iter()
            .copied()
            .find(|&(bad_from, bad_to)| bad_from < to && from < bad_to)
    }

    /// Where damage that starts at `from` and runs to the segment's end stops mattering: after
    /// the last byte that is not zero or not readable.
    fn damaged_extent(&self, from: usize) -> usize {
        let written = self.bytes[from..]
            .iter()
            .rposition(|b| *b != 0)
            .map_or(from, |at| from + at + 1);
        let unreadable = self.unreadable.last().map_or(from, |&(_, to)| to);
        written.max(unreadable).max(from + 1).min(self.bytes.len())
    }

    /// Whether the bad last batch at `offset` (the newest segment, nothing valid after it) shows
    /// a write that never finished. The batch is one write into preallocated zeros and a disk
    /// writes whole sectors, so a torn batch lacks whole sectors of its bytes, or (a write cut
    /// short) its final bytes: they read as zeros. A flipped bit leaves every byte written.
    /// `header` is the batch's header if it checks out.
    fn looks_torn(&self, offset: usize, header: Option<&BatchHeader>) -> bool {
        if self.unreadable.iter().any(|&(_, to)| to > offset) {
            // What cannot be read may be the written bytes that prove otherwise.
            return false;
        }
        let Some(header) = header else {
            // The header does not check out. Never written (zeros, or a sector of it missing)
            // is torn; a header hit by a flipped bit still has its records after it, intact.
            let header_bytes = &self.bytes[offset..offset + BATCH_HEADER_BYTES];
            if header_bytes.iter().all(|b| *b == 0) || has_zero_sector_part(header_bytes, offset) {
                return true;
            }
            let first_record = &self.bytes[offset + BATCH_HEADER_BYTES..];
            return !matches!(
                record::decode_record(first_record),
                DecodedRecord::Record(rec, _) if self.lane_shards.contains(&rec.shard)
            );
        };
        let body_from = offset + BATCH_HEADER_BYTES;
        let body = &self.bytes[body_from..body_from + header.body_len as usize];
        let Some(&last) = body.last() else {
            return false;
        };
        // A write cut short: its end reads as zeros (unless the batch's last record, intact,
        // really ends with a zero byte).
        if last == 0 && !last_record_intact(body) {
            return true;
        }
        // A sector lost at a power loss: a whole sector of the body reads as zeros.
        let first_sector = body_from.next_multiple_of(SECTOR_BYTES);
        (first_sector..body_from + body.len())
            .step_by(SECTOR_BYTES)
            .filter(|sector| sector + SECTOR_BYTES <= body_from + body.len())
            .any(|sector| self.bytes[sector..sector + SECTOR_BYTES].iter().all(|b| *b == 0))
    }

    fn unknown(&mut self, from: usize, to: usize, detail: &str) {
        self.damage.push(Damage {
            segment_no: self.segment_no,
            offset: from as u64,
            len: (to - from) as u64,
            entry: None,
            detail: detail.to_string(),
        });
        self.found.push(Found::Unknown {
            damage: self.damage.len() - 1,
        });
    }

    fn walk_intact(&mut self, batch_offset: usize, header: &BatchHeader) {
        let from = batch_offset + BATCH_HEADER_BYTES;
        let to = from + header.body_len as usize;
        let walked = self.walk_records(from, to, false);
        if walked != header.record_count as u64 {
            self.unknown(from, to, "batch record count does not match its records");
        }
    }

    /// Keeps what can be trusted between `from` and `to` (a damaged batch, header included).
    /// `record_count`: how many records the batch holds, when its header checks out.
    fn walk_damaged(&mut self, batch_offset: usize, to: usize, record_count: Option<u32>, detail: &str) {
        let damage_before = self.damage.len();
        let walked = self.walk_records(batch_offset + BATCH_HEADER_BYTES, to, true);
        if self.damage.len() == damage_before && record_count.is_some_and(|count| walked < u64::from(count)) {
            // Records the header counts read as zeros (a lost write): what they held is unknown.
            self.unknown(batch_offset, to, &format!("{detail}; records of the batch are missing"));
        } else if self.damage.len() == damage_before {
            // The records all check out: only the batch framing was hit. Nothing is lost, but the
            // damage is reported so an operator knows the disk is failing.
            self.damage.push(Damage {
                segment_no: self.segment_no,
                offset: batch_offset as u64,
                len: (to - batch_offset) as u64,
                entry: None,
                detail: format!("{detail}; every record in it is intact"),
            });
        }
    }

    /// Walks records from `from` until `to`; returns how many records with a trustworthy
    /// header it found (intact or with a damaged body).
    fn walk_records(&mut self, from: usize, to: usize, may_end_in_padding: bool) -> u64 {
        let mut at = from;
        let mut walked = 0;
        while at < to {
            let rest = &self.bytes[at..to];
            if let Some((bad_from, bad_to)) = self.unreadable_in(at, (at + RECORD_HEADER_BYTES).min(to)) {
                self.unknown(
                    at,
                    to,
                    &format!("unreadable sectors (EIO) at bytes {bad_from}..{bad_to} hide a record header"),
                );
                break;
            }
            if may_end_in_padding
                && (rest.len() < RECORD_HEADER_BYTES || rest.iter().all(|b| *b == 0))
                && self.unreadable_in(at, to).is_none()
            {
                break;
            }
            let decoded = match record::decode_record(rest) {
                // Bytes that could not be read are not trusted, even if the checksum agrees.
                DecodedRecord::Record(rec, used) if self.unreadable_in(at, at + used).is_some() => {
                    DecodedRecord::BadBody {
                        kind: rec.kind,
                        shard: rec.shard,
                        log_id: rec.log_id,
                        framed_len: used,
                    }
                }
                decoded => decoded,
            };
            match decoded {
                DecodedRecord::Record(rec, used)
                    if self.lane_shards.contains(&rec.shard) && rec.kind == RecordKind::LossAccepted =>
                {
                    self.found.push(Found::LossMark {
                        shard: rec.shard,
                        loss: AcceptedLoss {
                            after_index: rec.log_id.index,
                            lost_bytes: rec.log_id.term,
                            regions: record::decode_regions(rec.body),
                            resumed_at: None,
                        },
                    });
                    walked += 1;
                    self.records += 1;
                    at += used;
                }
                DecodedRecord::Record(rec, used) if self.lane_shards.contains(&rec.shard) => {
                    self.found.push(Found::Record {
                        kind: rec.kind,
                        shard: rec.shard,
                        location: EntryLocation {
                            log_id: rec.log_id,
                            segment_no: self.segment_no,
                            offset: at as u64,
                            framed_len: used as u32,
                        },
                    });
                    walked += 1;
                    self.records += 1;
                    at += used;
                }
                DecodedRecord::BadBody {
                    shard,
                    log_id,
                    framed_len,
                    kind,
                } if self.lane_shards.contains(&shard) && at + framed_len <= to => {
                    let cause = match self.unreadable_in(at, at + framed_len) {
                        Some((bad_from, bad_to)) => {
                            format!("has unreadable sectors (EIO) at bytes {bad_from}..{bad_to}")
                        }
                        None => "fails its checksum".to_string(),
                    };
                    self.damage.push(Damage {
                        segment_no: self.segment_no,
                        offset: at as u64,
                        len: framed_len as u64,
                        entry: Some((shard, log_id.index)),
                        detail: format!("{kind:?} record of shard {shard} index {} {cause}", log_id.index),
                    });
                    self.found.push(Found::DamagedEntry {
                        shard,
                        index: log_id.index,
                        damage: self.damage.len() - 1,
                    });
                    walked += 1;
                    at += framed_len;
                }
                _ => {
                    self.unknown(at, to, "record header is damaged");
                    break;
                }
            }
        }
        walked
    }
}

/// Whether the part of `bytes` (found at file offset `at`) in some disk sector is all zeros
/// while another part is not: a write of which a sector never reached the disk.
fn has_zero_sector_part(bytes: &[u8], at: usize) -> bool {
    let boundary = at.next_multiple_of(SECTOR_BYTES);
    if boundary <= at || boundary >= at + bytes.len() {
        return false;
    }
    let (before, after) = bytes.split_at(boundary - at);
    before.iter().all(|b| *b == 0) || after.iter().all(|b| *b == 0)
}

/// Whether the records of a batch body, walked from its start, end with an intact record
/// that ends exactly where the body does.
fn last_record_intact(body: &[u8]) -> bool {
    let mut at = 0;
    let mut last_intact = false;
    while at < body.len() {
        match record::decode_record(&body[at..]) {
            DecodedRecord::Record(_, used) => {
                last_intact = true;
                at += used;
            }
            DecodedRecord::BadBody { framed_len, .. } => {
                last_intact = false;
                at += framed_len;
            }
            DecodedRecord::BadHeader => return false,
        }
    }
    last_intact && at == body.len()
}

/// The offset of the next batch at or after `from` whose header and body check out.
fn next_valid_batch(bytes: &[u8], from: usize) -> Option<usize> {
    let mut offset = from.next_multiple_of(BATCH_ALIGN);
    while offset + BATCH_HEADER_BYTES <= bytes.len() {
        if let DecodedBatch::Header(header) = record::decode_batch_header(&bytes[offset..])
            && offset + header.framed_len() <= bytes.len()
            && record::intact_body(&header, &bytes[offset..]).is_some()
        {
            return Some(offset);
        }
        offset += BATCH_ALIGN;
    }
    None
}

/// Builds every shard's log from what the scan found, in log order.
fn fold_into_index(index: &mut LaneIndex, found: &[Found], damage: &[Damage], lane_shards: &[u16]) {
    let mut purged_through: BTreeMap<u16, LogId> = BTreeMap::new();
    let mut losses: BTreeMap<u16, Vec<AcceptedLoss>> = BTreeMap::new();
    for item in found {
        match item {
            Found::Record {
                kind: RecordKind::PurgePrefix,
                shard,
                location,
            } => {
                let through = purged_through.entry(*shard).or_insert(location.log_id);
                if location.log_id.index > through.index {
                    *through = location.log_id;
                }
            }
            Found::LossMark { shard, loss } => {
                let known = losses.entry(*shard).or_default();
                if !known.iter().any(|k| k.after_index == loss.after_index) {
                    known.push(loss.clone());
                }
            }
            _ => {}
        }
    }
    for (&shard, &through) in &purged_through {
        let log = index.shard(shard);
        log.purged_through = through.index;
        log.purged_term = through.term;
        // The purged entries' own records may be gone with their segments; the log reached
        // at least this far.
        log.last = Some(through);
    }
    // Whether damage met by the shard (at its current end) is one an operator accepted: only
    // the regions a loss names, so damage found later is never absorbed by an old repair.
    let accept = |shard: u16, log: &mut super::index::ShardLog, damage: &Damage| -> bool {
        let region = (damage.segment_no, damage.offset);
        if let Some(pending) = log.accepted_losses.last().filter(|loss| loss.resumed_at.is_none()) {
            return pending.regions.contains(&region);
        }
        let after = log.last.map_or(0, |l| l.index).max(log.purged_through);
        let Some(loss) = losses.get(&shard).and_then(|known| {
            known
                .iter()
                .find(|loss| loss.after_index == after && loss.regions.contains(&region))
        }) else {
            return false;
        };
        log.accepted_losses.push(loss.clone());
        true
    };
    for item in found {
        match item {
            Found::Record { kind, shard, location } => {
                let shard = *shard;
                if *kind == RecordKind::Entry {
                    index.note_in_segment(shard, location.segment_no, location.log_id.index);
                }
                let log = index.shard(shard);
                if log.degraded.is_some() {
                    continue;
                }
                match kind {
                    RecordKind::Entry => {
                        let entry_index = location.log_id.index;
                        if entry_index <= log.purged_through {
                            // Archived and purged: not indexed, but the log's end is remembered.
                            if log.last.is_none_or(|last| last.index < entry_index) {
                                log.last = Some(location.log_id);
                            }
                            continue;
                        }
                        let expected = log
                            .last
                            .map(|l| l.index.max(log.purged_through) + 1)
                            .or((log.purged_through > 0).then_some(log.purged_through + 1));
                        let contiguous = expected.is_none_or(|expected| entry_index == expected);
                        match log.accepted_losses.last_mut().filter(|loss| loss.resumed_at.is_none()) {
                            // The accepted loss held nothing of this shard after all.
                            Some(_) if contiguous && expected.is_some() => {
                                log.accepted_losses.pop();
                            }
                            Some(loss) if entry_index > loss.after_index => loss.resumed_at = Some(entry_index),
                            None if contiguous => {}
                            _ => {
                                log.degraded = Some(format!(
                                    "entry {} is missing from the WAL (the next one found is {entry_index})",
                                    expected.unwrap_or_default()
                                ));
                                continue;
                            }
                        }
                        log.push(*location);
                    }
                    RecordKind::TruncateSuffix => log.truncate_suffix(location.log_id),
                    RecordKind::PurgePrefix | RecordKind::LossAccepted => {}
                }
            }
            Found::LossMark { .. } => {}
            Found::DamagedEntry {
                shard,
                index: entry_index,
                damage: damage_no,
            } => {
                let log = index.shard(*shard);
                if log.degraded.is_some() || *entry_index <= log.purged_through {
                    continue;
                }
                if !accept(*shard, log, &damage[*damage_no]) {
                    log.degraded = Some(describe_damage(&damage[*damage_no]));
                }
            }
            Found::Unknown { damage: damage_no } => {
                for &shard in lane_shards {
                    let log = index.shard(shard);
                    if log.degraded.is_none() && !accept(shard, log, &damage[*damage_no]) {
                        log.degraded = Some(describe_damage(&damage[*damage_no]));
                    }
                }
            }
        }
    }
}

fn describe_damage(damage: &Damage) -> String {
    let what = match damage.entry {
        Some((shard, index)) => format!("entry {index} of shard {shard} is damaged"),
        None => "unreadable bytes may hold entries of this shard".to_string(),
    };
    format!(
        "{what} (segment {} offset {}, {} bytes: {}); see `fleetlm wal inspect`",
        damage.segment_no, damage.offset, damage.len, damage.detail
    )
}

/// Keeps a copy of a torn tail's bytes beside the segments (`torn-<segment>-<offset>.bin`)
/// before they are zeroed. A torn tail was never acknowledged; the copy keeps the cases the
/// rule in `looks_torn` cannot tell apart (a device that writes garbage instead of leaving a
/// sector unwritten, or bit rot in a last batch whose real bytes end in zeros) recoverable by
/// hand.
fn save_torn_tail(fs: &dyn FileSystem, lane_dir: &Path, segment_no: u64, bytes: &[u8], from: usize) -> io::Result<()> {
    let Some(last_non_zero) = bytes[from..].iter().rposition(|b| *b != 0) else {
        return Ok(());
    };
    let path = lane_dir.join(format!("torn-{segment_no:020}-{from}.bin"));
    match fs.remove_file(&path) {
        Err(error) if error.kind() != io::ErrorKind::NotFound => return Err(error),
        _ => {}
    }
    let copy = fs.create_new(&path)?;
    copy.write_all_at(&bytes[from..=from + last_non_zero], 0)?;
    copy.sync_data()?;
    fs.sync_dir(lane_dir)
}

/// Zeroes `[from, last non-zero byte]` so later scans see a clean end, then fsyncs.
fn zero_tail(file: &dyn fs::WalFile, bytes: &[u8], from: usize) -> io::Result<()> {
    let Some(last_non_zero) = bytes[from..].iter().rposition(|b| *b != 0) else {
        return Ok(());
    };
    let zeros = vec![0u8; last_non_zero + 1];
    file.write_all_at(&zeros, from as u64)?;
    file.sync_data()
}
