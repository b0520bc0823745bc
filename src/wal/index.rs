//! The in-memory index of a lane: where each shard's entries sit, and which segments may go.
//!
//! Only the lane thread mutates it, and only after the records it describes are durable, so a
//! reader that finds an entry here can rely on it being fsync'd.

use std::collections::{BTreeMap, BTreeSet, HashMap, VecDeque};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

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
    /// Segments holding damage that may be this shard's records (found at open). While the
    /// shard is degraded they are kept, like every segment holding one of its entries.
    pub damaged_segments: BTreeSet<u64>,
    /// Why the archive cannot take this shard's entries now, if it cannot (set by the flusher:
    /// a read or decoding failure). The segments only such shards need are kept but not counted
    /// against the other shards' budget (`SegmentUsage`).
    pub archive_stalled: Option<String>,
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
        // A loss accepted at or past the cut is cut with it (a replica refetching its log).
        self.accepted_losses.retain(|loss| loss.after_index < after.index);
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

/// Why a segment is still on disk (the first that applies).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Keeper {
    /// The active segment, or one holding unarchived entries of a shard that flows (neither
    /// degraded nor stalled).
    Flowing,
    /// Only shards the archive cannot read now still need it.
    Stalled,
    /// Only a degraded shard's records (or damage that may be its records) keep it.
    Degraded,
}

/// A lane's segments by what keeps them, in segments; updated by whoever changes the index
/// (under its lock) and read without it (the shard writers' budget check).
#[derive(Debug, Default)]
pub struct SegmentUsage {
    pub flowing: AtomicU64,
    pub stalled_only: AtomicU64,
    pub degraded_only: AtomicU64,
}

#[derive(Default)]
pub struct LaneIndex {
    pub shards: HashMap<u16, ShardLog>,
    pub segments: BTreeMap<u64, SegmentInfo>,
    pub active_segment: u64,
    /// Set once a write or fsync failed: the lane then refuses everything.
    pub failed: Option<String>,
    /// Shared with the WAL's handle of this lane.
    pub usage: Arc<SegmentUsage>,
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

    /// What keeps a segment on disk, `None` if nothing does. Deletion is decided per shard: a
    /// degraded shard keeps every segment holding one of its entries (purged or not: no file
    /// holding its records is deleted) or damage that may be its records; any other shard keeps
    /// the segments holding its unpurged entries. A degraded shard's records past the damage are
    /// not indexed, but recovery notes them in `max_index_by_shard` all the same.
    fn keeper(&self, number: u64, info: &SegmentInfo) -> Option<Keeper> {
        if number == self.active_segment {
            return Some(Keeper::Flowing);
        }
        let mut keeper = None;
        for (shard, max_index) in &info.max_index_by_shard {
            let Some(log) = self.shards.get(shard) else {
                return Some(Keeper::Flowing);
            };
            let kept_by = if log.degraded.is_some() {
                Keeper::Degraded
            } else if log.purged_through >= *max_index {
                continue;
            } else if log.archive_stalled.is_some() {
                Keeper::Stalled
            } else {
                return Some(Keeper::Flowing);
            };
            keeper = Some(match keeper {
                Some(Keeper::Stalled) => Keeper::Stalled,
                _ => kept_by,
            });
        }
        if keeper.is_none()
            && self
                .shards
                .values()
                .any(|log| log.degraded.is_some() && log.damaged_segments.contains(&number))
        {
            keeper = Some(Keeper::Degraded);
        }
        keeper
    }

    /// Takes the segments nothing keeps out of the index (never the active one) and returns their
    /// numbers, for the caller to delete; then counts what keeps the rest (`usage`).
    pub fn remove_unneeded_segments(&mut self) -> Vec<u64> {
        let removable: Vec<u64> = self
            .segments
            .iter()
            .filter(|(number, info)| self.keeper(**number, info).is_none())
            .map(|(number, _)| *number)
            .collect();
        for number in &removable {
            self.segments.remove(number);
        }
        self.refresh_usage();
        removable
    }

    /// Recounts the segments by what keeps them (after a purge, a rotation, a flag change).
    pub fn refresh_usage(&self) {
        let (mut flowing, mut stalled, mut degraded) = (0, 0, 0);
        for (number, info) in &self.segments {
            match self.keeper(*number, info) {
                Some(Keeper::Flowing) | None => flowing += 1,
                Some(Keeper::Stalled) => stalled += 1,
                Some(Keeper::Degraded) => degraded += 1,
            }
        }
        self.usage.flowing.store(flowing, Ordering::Release);
        self.usage.stalled_only.store(stalled, Ordering::Release);
        self.usage.degraded_only.store(degraded, Ordering::Release);
    }
}
