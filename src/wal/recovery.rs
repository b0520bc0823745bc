//! Rebuilds a lane's index from its segment files at open.
//!
//! A torn or zero-filled tail of the newest segment (a batch that never finished its fsync, so was
//! never acknowledged) is zeroed and writing resumes there. Anything else that does not check
//! out is corruption: the affected shards are marked degraded, their replay stops at the last good
//! entry, and no byte is deleted.

use std::fs::File;
use std::io;
use std::os::unix::fs::FileExt;
use std::path::Path;
use std::sync::Arc;

use super::RecoveryEvent;
use super::index::{EntryLocation, LaneIndex, SegmentInfo};
use super::record::{self, Decoded, FRAME_HEADER_BYTES, RecordKind};
use super::segment::{self, SEGMENT_HEADER_BYTES};

pub struct RecoveredLane {
    pub index: LaneIndex,
    /// Where the next record goes in the active segment, `None` if a new segment must be started.
    pub resume_offset: Option<u64>,
    pub events: Vec<RecoveryEvent>,
}

/// Scans `lane_dir`. `lane_shards` are the shards that live in this lane; `max_batch_bytes`
/// bounds one group-commit batch (see `Wal::append`), so an unacknowledged, torn write reaches
/// at most twice that far past the first bad byte; data beyond that was acknowledged.
pub fn recover_lane(lane_dir: &Path, lane_shards: &[u16], max_batch_bytes: u64) -> io::Result<RecoveredLane> {
    let mut index = LaneIndex::default();
    let mut events = Vec::new();
    let segment_numbers = segment::list_segments(lane_dir)?;
    let mut resume_offset = None;
    let mut lane_corrupt = false;

    for (position, &segment_no) in segment_numbers.iter().enumerate() {
        let is_last = position + 1 == segment_numbers.len();
        let file = segment::open_segment(lane_dir, segment_no)?;
        let bytes = segment::read_all(&file)?;
        if is_last && bytes.iter().all(|b| *b == 0) {
            // A rotation that crashed before its first fsync: nothing was ever written here.
            drop(file);
            std::fs::remove_file(segment::segment_path(lane_dir, segment_no))?;
            break;
        }
        if !segment::has_magic(&bytes) {
            events.push(RecoveryEvent::Corruption {
                lane_dir: lane_dir.to_path_buf(),
                segment_no,
                offset: 0,
                detail: "segment does not start with the FleetLM WAL magic".into(),
            });
            degrade_all(&mut index, lane_shards, "unreadable WAL segment header");
            break;
        }
        let file = Arc::new(file);
        index.segments.insert(
            segment_no,
            SegmentInfo {
                file: file.clone(),
                max_index_by_shard: Default::default(),
            },
        );
        index.active_segment = segment_no;

        let mut offset = SEGMENT_HEADER_BYTES as usize;
        loop {
            match record::decode(&bytes[offset..]) {
                Decoded::Record(rec, used) => {
                    apply_record(&mut index, &rec, segment_no, offset as u64, used as u32);
                    offset += used;
                }
                Decoded::End => break,
                bad @ (Decoded::Truncated | Decoded::Corrupt { .. }) => {
                    let reach = offset.saturating_add(2 * max_batch_bytes as usize).min(bytes.len());
                    let torn_tail = is_last && bytes[reach..].iter().all(|b| *b == 0);
                    if torn_tail {
                        zero_tail(&file, &bytes, offset)?;
                        events.push(RecoveryEvent::TornTailTruncated {
                            lane_dir: lane_dir.to_path_buf(),
                            segment_no,
                            offset: offset as u64,
                        });
                        break;
                    }
                    lane_corrupt = true;
                    events.push(RecoveryEvent::Corruption {
                        lane_dir: lane_dir.to_path_buf(),
                        segment_no,
                        offset: offset as u64,
                        detail: format!("{bad:?}"),
                    });
                    match bad {
                        Decoded::Corrupt {
                            framed_len: Some(framed_len),
                        } => {
                            // The frame length is plausible: blame the shard its header names and
                            // carry on; gaps in other shards' indexes reveal any other victim.
                            let named_shard = raw_shard_field(&bytes[offset..]);
                            if let Some(shard) = named_shard.filter(|s| lane_shards.contains(s)) {
                                degrade(&mut index, shard, "corrupt WAL record");
                            }
                            offset += framed_len;
                        }
                        _ => {
                            degrade_all(&mut index, lane_shards, "corrupt WAL record with unreadable length");
                            break;
                        }
                    }
                }
            }
        }
        if is_last && !lane_corrupt {
            resume_offset = Some(offset as u64);
        }
    }
    Ok(RecoveredLane {
        index,
        resume_offset,
        events,
    })
}

fn apply_record(index: &mut LaneIndex, rec: &record::Record<'_>, segment_no: u64, offset: u64, framed_len: u32) {
    let shard = rec.shard;
    if index.shard(shard).degraded.is_some() {
        return;
    }
    match rec.kind {
        RecordKind::Entry => {
            let log = index.shard(shard);
            if let Some(last) = log.last
                && rec.log_id.index != last.index + 1
            {
                degrade(index, shard, "gap in WAL entry indexes");
                return;
            }
            let location = EntryLocation {
                log_id: rec.log_id,
                segment_no,
                offset,
                framed_len,
            };
            index.note_entry(shard, location);
        }
        RecordKind::TruncateSuffix => index.shard(shard).truncate_suffix(rec.log_id),
        RecordKind::PurgePrefix => index.shard(shard).purge_prefix(rec.log_id.index),
    }
}

fn degrade(index: &mut LaneIndex, shard: u16, reason: &str) {
    let log = index.shard(shard);
    if log.degraded.is_none() {
        log.degraded = Some(reason.to_string());
    }
}

fn degrade_all(index: &mut LaneIndex, lane_shards: &[u16], reason: &str) {
    for shard in lane_shards {
        degrade(index, *shard, reason);
    }
}

/// The shard field of a frame whose CRC failed; only a hint.
fn raw_shard_field(frame: &[u8]) -> Option<u16> {
    let at = FRAME_HEADER_BYTES + 2;
    frame.get(at..at + 2).map(|b| u16::from_le_bytes([b[0], b[1]]))
}

/// Zeroes `[from, last non-zero byte]` so later scans see a clean end, then fsyncs.
fn zero_tail(file: &File, bytes: &[u8], from: usize) -> io::Result<()> {
    let Some(last_non_zero) = bytes[from..].iter().rposition(|b| *b != 0) else {
        return Ok(());
    };
    let zeros = vec![0u8; last_non_zero + 1];
    file.write_all_at(&zeros, from as u64)?;
    file.sync_data()
}
