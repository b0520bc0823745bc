//! The in-memory index of a lane: where each shard's entries sit, and which segments may go.
//!
//! Only the lane thread mutates it, and only after the records it describes are durable, so a
//! reader that finds an entry here can rely on it being fsync'd.

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::fs::File;
use std::sync::Arc;

use super::LogId;

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
    /// Why this shard's log cannot be trusted past its last entry, if it cannot.
    pub degraded: Option<String>,
}

impl ShardLog {
    pub fn push(&mut self, location: EntryLocation) {
        debug_assert!(self.last.is_none_or(|last| location.log_id.index == last.index + 1));
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

    pub fn purge_prefix(&mut self, through_index: u64) {
        while self.entries.front().is_some_and(|e| e.log_id.index <= through_index) {
            self.entries.pop_front();
        }
        self.purged_through = self.purged_through.max(through_index);
    }

    pub fn first_index(&self) -> Option<u64> {
        self.entries.front().map(|e| e.log_id.index)
    }

    /// Locations of entries with index >= `from_index`, at most `max_entries`.
    pub fn locations_from(&self, from_index: u64, max_entries: usize) -> Vec<EntryLocation> {
        let Some(first) = self.first_index() else {
            return Vec::new();
        };
        let skip = from_index.saturating_sub(first) as usize;
        self.entries.iter().skip(skip).take(max_entries).copied().collect()
    }
}

pub struct SegmentInfo {
    pub file: Arc<File>,
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
        if let Some(segment) = self.segments.get_mut(&location.segment_no) {
            let max = segment.max_index_by_shard.entry(shard).or_insert(0);
            *max = (*max).max(location.log_id.index);
        }
        self.shard(shard).push(location);
    }

    /// Segments (never the active one) whose every entry is purged by its shard.
    pub fn removable_segments(&self) -> Vec<u64> {
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
