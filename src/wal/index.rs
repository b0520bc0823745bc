//! The in-memory index of a lane: where each shard's entries sit, and which segments may go.
//!
//! Only the lane thread mutates it, and only after the records it describes are durable, so a
//! reader that finds an entry here can rely on it being fsync'd.

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::sync::Arc;

use super::LogId;
use super::fs::WalFile;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct EntryLocation {
    pub log_id: LogId,
    pub segment_no: u64,
    pub offset: u64,
    pub framed_len: u32,
}

/// One shard's logical log inside a lane.
#[derive(Debug, Default)]
pub struct ShardLog {
    /// Entries still readable, ascending and contiguous by index.
    pub entries: VecDeque<EntryLocation>,
    /// The id of the newest entry ever kept (survives purging every entry).
    pub last: Option<LogId>,
    /// Entries up to this index may have been dropped.
    pub purged_through: u64,
    /// The term of the entry at `purged_through` (0 where the purger did not say; a replicated
    /// log needs it to name the last purged entry).
    pub purged_term: u64,
    /// Why this shard's log cannot be trusted past its last entry, if it cannot.
    pub degraded: Option<String>,
    /// Entries lost to damage whose loss an operator accepted (`fleetlm wal repair`): after
    /// `after_index`, the log resumed at `resumed_at` (entries in between are gone).
    pub accepted_losses: Vec<AcceptedLoss>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AcceptedLoss {
    pub after_index: u64,
    /// Damaged bytes the operator accepted losing (bounds what the lost entries held).
    pub lost_bytes: u64,
    /// `(segment_no, offset)` of each damaged region accepted: damage found anywhere else later
    /// is new, and degrades the shard again.
    pub regions: Vec<(u64, u64)>,
    /// The first intact entry after the loss (`None` while no entry followed it yet).
    pub resumed_at: Option<u64>,
}

impl ShardLog {
    pub fn push(&mut self, location: EntryLocation) {
        debug_assert!(self.last.is_none_or(|last| {
            location.log_id.index == last.index + 1
                || self
                    .accepted_losses
                    .last()
                    .is_some_and(|loss| loss.resumed_at == Some(location.log_id.index))
        }));
        self.last = Some(location.log_id);
        self.entries.push_back(location);
    }

    /// Drops every entry above `after.index`; the log then ends at `after`.
    pub fn truncate_suffix(&mut self, after: LogId) {
        while self.entries.back().is_some_and(|e| e.log_id.index > after.index) {
            self.entries.pop_back();
        }
        self.last = if after.index == 0 { None } else { Some(after) };
    }

    pub fn purge_prefix(&mut self, through: LogId) {
        while self.entries.front().is_some_and(|e| e.log_id.index <= through.index) {
            self.entries.pop_front();
        }
        if through.index > self.purged_through {
            self.purged_through = through.index;
            self.purged_term = through.term;
        }
        // A replica that installs a snapshot purges past its own last entry: the log then
        // continues after the purged one.
        if self.last.is_none_or(|last| last.index < through.index) {
            self.last = Some(through);
        }
    }

    pub fn first_index(&self) -> Option<u64> {
        self.entries.front().map(|e| e.log_id.index)
    }

    /// Locations of entries with index >= `from_index`, at most `max_entries`.
    pub fn locations_from(&self, from_index: u64, max_entries: usize) -> Vec<EntryLocation> {
        // Entries are ascending but may skip indexes lost to accepted damage.
        let skip = self.entries.partition_point(|e| e.log_id.index < from_index);
        self.entries.iter().skip(skip).take(max_entries).copied().collect()
    }
}

pub struct SegmentInfo {
    pub file: Arc<dyn WalFile>,
    /// Highest entry index each shard has in this segment.
    pub max_index_by_shard: HashMap<u16, u64>,
}

#[derive(Default)]
pub struct LaneIndex {
    pub shards: HashMap<u16, ShardLog>,
    pub segments: BTreeMap<u64, SegmentInfo>,
    pub active_segment: u64,
    /// Set once a write or fsync failed: the lane then refuses everything.
    pub failed: Option<String>,
}

impl LaneIndex {
    pub fn shard(&mut self, shard: u16) -> &mut ShardLog {
        self.shards.entry(shard).or_default()
    }

    pub fn note_entry(&mut self, shard: u16, location: EntryLocation) {
        self.note_in_segment(shard, location.segment_no, location.log_id.index);
        self.shard(shard).push(location);
    }

    /// Records that `segment_no` holds an entry `index` of `shard` (whether indexed or not).
    pub fn note_in_segment(&mut self, shard: u16, segment_no: u64, index: u64) {
        if let Some(segment) = self.segments.get_mut(&segment_no) {
            let max = segment.max_index_by_shard.entry(shard).or_insert(0);
            *max = (*max).max(index);
        }
    }

    /// Segments (never the active one) whose every entry is purged by its shard. None while a
    /// shard of the lane is degraded: its records past the damage are not indexed, and no file
    /// that may hold them is ever deleted.
    pub fn removable_segments(&self) -> Vec<u64> {
        if self.shards.values().any(|log| log.degraded.is_some()) {
            return Vec::new();
        }
        self.segments
            .iter()
            .filter(|(number, _)| **number != self.active_segment)
            .filter(|(_, info)| {
                info.max_index_by_shard.iter().all(|(shard, max_index)| {
                    self.shards
                        .get(shard)
                        .is_some_and(|log| log.purged_through >= *max_index)
                })
            })
            .map(|(number, _)| *number)
            .collect()
    }
}
