//! The write-ahead log: many shards' logical logs multiplexed onto a few physical lanes.
//!
//! Each shard's log is a sequence of entries with Raft-style ids `(term, index)`, supporting
//! `append`, `truncate_suffix` and `purge_prefix`, plus a separately fsync'd vote file per shard,
//! so the cluster can later replicate it with a consensus engine without a format change. Shard `s` lives in
//! lane `s % lanes`; every lane has its own group-commit thread (see [`lane`]).
//!
//! Architecture invariant: this module knows bytes, shard ids and log indexes; nothing of
//! sessions, messages or JSON. An `append` resolves only after its records are fdatasync'd.

#[cfg(test)]
pub mod fault;
pub mod fs;
mod index;
mod lane;
mod record;
mod recovery;
mod segment;
mod vote;

use std::path::{Path, PathBuf};
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;

use tokio::sync::{mpsc, oneshot};

pub use fs::{FileSystem, RealFs};
pub use index::AcceptedLoss;
use index::{LaneIndex, SegmentUsage};
use lane::{LaneRequest, LaneWriter};
pub use lane::{MAX_CARRIED_LOSSES_PER_SHARD, MAX_LOSS_REGIONS};
use record::{DecodedRecord, RecordKind};
pub use recovery::{Damage, SegmentSummary};
pub use vote::Vote;

/// The loss of a degraded shard's damage, as `accept_loss` records it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LossToAccept {
    /// The shard's last intact entry before the damage.
    pub after_index: u64,
    pub lost_bytes: u64,
    /// `(segment_no, offset)` of each damaged region.
    pub regions: Vec<(u64, u64)>,
}

/// One log entry as read back: its id and body.
pub type Entry = (LogId, Vec<u8>);

/// What `read_ranges_each` read of one range: its entries in order up to the first it could not
/// read (all of them when `failure` is `None`; fewer than asked when the call's byte budget ran
/// out).
#[derive(Debug, Default)]
pub struct RangeRead {
    pub entries: Vec<Entry>,
    pub failure: Option<RangeFailure>,
}

/// The first entry of a range that could not be read, where it sits, and why.
#[derive(Debug, Clone)]
pub struct RangeFailure {
    pub index: u64,
    pub segment_no: u64,
    pub offset: u64,
    pub error: WalError,
}

/// Entries of one shard to read: from `from_index`, at most `max_entries`.
#[derive(Debug, Clone, Copy)]
pub struct EntryRange {
    pub shard: u16,
    pub from_index: u64,
    pub max_entries: usize,
}

/// Wanted entries closer than this in a segment are read together (the gap read and dropped).
const READ_GAP_BYTES: u64 = 64 * 1024;
/// Largest single read of `read_ranges`.
const MAX_READ_BYTES: u64 = 8 * 1024 * 1024;
/// Bytes of entries one `read_ranges` call returns at most (past the first entry): callers
/// continue from where it stopped, so memory stays bounded whatever the ranges ask for.
pub const READ_BUDGET_BYTES: u64 = 64 * 1024 * 1024;

/// A Raft-style log id. Single node: term 1, index = position in the shard's log (from 1).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct LogId {
    pub term: u64,
    pub index: u64,
}

#[derive(Debug, Clone, thiserror::Error)]
pub enum WalError {
    #[error("wal i/o error: {0}")]
    Io(String),
    /// The disk is full: nothing of the request was kept; the same request may succeed later.
    #[error("no space left for the wal: {0}")]
    OutOfSpace(String),
    #[error("wal lane failed earlier and refuses writes: {0}")]
    LaneFailed(String),
    #[error("entry index {got} of shard {shard} does not follow {expected}")]
    NotContiguous { shard: u16, expected: u64, got: u64 },
    #[error("entry of {bytes} bytes exceeds the maximum of {max}")]
    EntryTooLarge { bytes: usize, max: usize },
    #[error("entry {index} of shard {shard} is not in the wal")]
    Missing { shard: u16, index: u64 },
    #[error("wal record at segment {segment_no} offset {offset} is corrupt")]
    Corrupt { segment_no: u64, offset: u64 },
    #[error("wal is shut down")]
    Closed,
}

impl WalError {
    fn io(error: std::io::Error) -> WalError {
        WalError::Io(error.to_string())
    }
}

pub type Result<T> = std::result::Result<T, WalError>;

#[derive(Debug, Clone)]
pub struct WalOptions {
    pub lanes: usize,
    pub shard_count: u16,
    pub segment_bytes: u64,
    /// Upper bound of one group-commit batch; also bounds how far a torn write can reach.
    pub max_batch_bytes: usize,
    /// Requests that may wait for a lane before senders are made to wait.
    pub queue_depth: usize,
}

/// What opening (or inspecting) a lane found.
#[derive(Debug, Clone)]
pub struct LaneReport {
    pub lane_dir: PathBuf,
    pub segments: Vec<SegmentSummary>,
    pub damage: Vec<Damage>,
    /// `(segment_no, offset)` where a torn write (never acknowledged) began.
    pub torn_tail: Option<(u64, u64)>,
    /// `(segment_no, offset, len)` of every region the disk could not read (EIO).
    pub unreadable: Vec<(u64, u64, u64)>,
    /// Per shard of the lane: what its log holds.
    pub shards: Vec<ShardReport>,
}

#[derive(Debug, Clone)]
pub struct ShardReport {
    pub shard: u16,
    pub first_index: Option<u64>,
    pub last_index: Option<u64>,
    pub purged_through: u64,
    pub degraded: Option<String>,
    pub accepted_losses: Vec<AcceptedLoss>,
}

struct LaneHandle {
    requests: mpsc::Sender<LaneRequest>,
    index: Arc<Mutex<LaneIndex>>,
    usage: Arc<SegmentUsage>,
}

/// The WAL's disk by what keeps it, in bytes (see `Wal::budget_bytes`).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct WalUsage {
    /// The active segments and those a flowing shard (neither degraded nor stalled) needs.
    pub flowing: u64,
    /// Segments only archive-stalled shards need.
    pub stalled_only: u64,
    /// Segments kept only for degraded shards' records.
    pub degraded_only: u64,
}

pub struct Wal {
    dir: PathBuf,
    fs: Arc<dyn FileSystem>,
    options: WalOptions,
    lanes: Vec<LaneHandle>,
    threads: Mutex<Vec<JoinHandle<()>>>,
}

/// The smallest entry limit the WAL accepts to work with (a segment must leave room for this
/// beside the marks it starts with).
const MIN_ENTRY_BYTES: usize = 512;

fn max_entry_bytes(options: &WalOptions) -> Option<usize> {
    let lane_shards = (options.shard_count as usize).div_ceil(options.lanes);
    lane::max_request_bytes(options.segment_bytes, options.max_batch_bytes, lane_shards)?
        .checked_sub(record::RECORD_HEADER_BYTES)
}

/// How many lanes the WAL in `dir` was made with (one past its highest `lane-NN` directory), or
/// `None` for a WAL not made yet. A shard's records live in lane `shard % lanes`, so a WAL is
/// always opened with the lanes it was made with.
pub fn lanes_on_disk(dir: &Path) -> std::io::Result<Option<usize>> {
    let entries = match std::fs::read_dir(dir) {
        Ok(entries) => entries,
        Err(error) if error.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(error) => return Err(error),
    };
    let mut highest = None;
    for entry in entries {
        let name = entry?.file_name();
        let lane_no = name
            .to_str()
            .and_then(|name| name.strip_prefix("lane-"))
            .and_then(|number| number.parse::<usize>().ok());
        if let Some(lane_no) = lane_no {
            highest = highest.max(Some(lane_no));
        }
    }
    Ok(highest.map(|lane_no| lane_no + 1))
}

fn lane_dir(dir: &Path, lane_no: usize) -> PathBuf {
    dir.join(format!("lane-{lane_no:02}"))
}

fn lane_shards(options: &WalOptions, lane_no: usize) -> Vec<u16> {
    (0..options.shard_count)
        .filter(|s| *s as usize % options.lanes == lane_no)
        .collect()
}

/// Notes, per shard, the segments holding damage that may be its records (all the lane's shards
/// when the damage names no shard), so they are kept while the shard is degraded.
fn pin_damage(index: &mut LaneIndex, damage: &[Damage], lane_shards: &[u16]) {
    for region in damage {
        let shards = match region.entry {
            Some((shard, _)) => vec![shard],
            None => lane_shards.to_vec(),
        };
        for shard in shards {
            index.shard(shard).damaged_segments.insert(region.segment_no);
        }
    }
}

fn lane_report(
    lane_dir: PathBuf,
    recovered: &recovery::RecoveredLane,
    shards: &[u16],
    index: &mut LaneIndex,
) -> LaneReport {
    LaneReport {
        lane_dir,
        segments: recovered.segments.clone(),
        damage: recovered.damage.clone(),
        torn_tail: recovered.torn_tail,
        unreadable: recovered.unreadable.clone(),
        shards: shards
            .iter()
            .map(|&shard| {
                let log = index.shard(shard);
                ShardReport {
                    shard,
                    first_index: log.first_index(),
                    last_index: log.last.map(|l| l.index),
                    purged_through: log.purged_through,
                    degraded: log.degraded.clone(),
                    accepted_losses: log.accepted_losses.clone(),
                }
            })
            .collect(),
    }
}

impl Wal {
    /// Opens (or creates) the WAL under `dir` on the real disk, recovering every lane.
    pub fn open(dir: &Path, options: WalOptions) -> std::io::Result<(Wal, Vec<LaneReport>)> {
        Wal::open_on(Arc::new(RealFs), dir, options)
    }

    /// Describes the WAL under `dir` without changing a byte (`fleetlm wal inspect`).
    pub fn inspect(dir: &Path, options: &WalOptions) -> std::io::Result<Vec<LaneReport>> {
        let fs = RealFs;
        let mut reports = Vec::with_capacity(options.lanes);
        for lane_no in 0..options.lanes {
            let dir = lane_dir(dir, lane_no);
            if !dir.exists() {
                continue;
            }
            let shards = lane_shards(options, lane_no);
            let mut recovered = recovery::recover_lane(&fs, &dir, &shards, false)?;
            let mut index = std::mem::take(&mut recovered.index);
            reports.push(lane_report(dir, &recovered, &shards, &mut index));
        }
        Ok(reports)
    }

    /// Opens the WAL on the given filesystem (tests pass a fault-injecting one).
    pub fn open_on(
        fs: Arc<dyn FileSystem>,
        dir: &Path,
        options: WalOptions,
    ) -> std::io::Result<(Wal, Vec<LaneReport>)> {
        assert!(
            options.lanes > 0 && options.shard_count > 0,
            "wal needs at least one lane and shard"
        );
        if max_entry_bytes(&options).is_none_or(|bytes| bytes < MIN_ENTRY_BYTES) {
            return Err(std::io::Error::new(
                std::io::ErrorKind::InvalidInput,
                format!(
                    "wal_segment_bytes {} is too small for {} shards over {} lanes: raise it or use more lanes",
                    options.segment_bytes, options.shard_count, options.lanes
                ),
            ));
        }
        fs.create_dir_all(dir)?;
        vote::ensure_dir(fs.as_ref(), dir)?;
        let mut lanes = Vec::with_capacity(options.lanes);
        let mut threads = Vec::with_capacity(options.lanes);
        let mut reports = Vec::new();
        for lane_no in 0..options.lanes {
            let lane_dir = lane_dir(dir, lane_no);
            fs.create_dir_all(&lane_dir)?;
            let shards = lane_shards(&options, lane_no);
            let mut recovered = recovery::recover_lane(fs.as_ref(), &lane_dir, &shards, true)?;
            let mut lane_index = std::mem::take(&mut recovered.index);
            reports.push(lane_report(lane_dir.clone(), &recovered, &shards, &mut lane_index));
            let (active_file, active_segment_no, write_offset) = lane::resume_point(
                fs.as_ref(),
                &lane_dir,
                &mut lane_index,
                recovered.resume_offset,
                options.segment_bytes,
            )?;
            pin_damage(&mut lane_index, &recovered.damage, &shards);
            lane_index.refresh_usage();
            let usage = lane_index.usage.clone();
            let index = Arc::new(Mutex::new(lane_index));
            let (sender, receiver) = mpsc::channel(options.queue_depth);
            let writer = LaneWriter {
                healing: Default::default(),
                wake: sender.downgrade(),
                fs: fs.clone(),
                dir: lane_dir,
                index: index.clone(),
                segment_bytes: options.segment_bytes,
                max_batch_bytes: options.max_batch_bytes,
                active_file,
                active_segment_no,
                write_offset,
                next_batch_no: recovered.next_batch_no,
                lane_shard_count: shards.len(),
                shards,
            };
            let thread = std::thread::Builder::new()
                .name(format!("wal-lane-{lane_no}"))
                .spawn(move || writer.run(receiver))?;
            threads.push(thread);
            lanes.push(LaneHandle {
                requests: sender,
                index,
                usage,
            });
        }
        let wal = Wal {
            dir: dir.to_path_buf(),
            fs,
            options,
            lanes,
            threads: Mutex::new(threads),
        };
        Ok((wal, reports))
    }

    /// The largest entry body `append` takes (one entry per call).
    pub fn max_entry_bytes(&self) -> usize {
        max_entry_bytes(&self.options).expect("validated when the wal was opened")
    }

    pub fn shard_count(&self) -> u16 {
        self.options.shard_count
    }

    fn lane(&self, shard: u16) -> &LaneHandle {
        debug_assert!(shard < self.options.shard_count);
        &self.lanes[shard as usize % self.lanes.len()]
    }

    async fn submit(&self, shard: u16, make: impl FnOnce(oneshot::Sender<Result<()>>) -> LaneRequest) -> Result<()> {
        let (done, outcome) = oneshot::channel();
        self.lane(shard)
            .requests
            .send(make(done))
            .await
            .map_err(|_| WalError::Closed)?;
        outcome.await.map_err(|_| WalError::Closed)?
    }

    /// Appends entries (contiguous, following the shard's last entry) and resolves once durable.
    /// The entries together may hold at most `max_batch_bytes`.
    pub async fn append(&self, shard: u16, entries: Vec<(LogId, Vec<u8>)>) -> Result<()> {
        let durable = self.enqueue_append(shard, entries).await?;
        durable.await.map_err(|_| WalError::Closed)?
    }

    /// Queues entries as `append` does and returns as soon as they are queued; the receiver
    /// resolves once they are durable. A shard's queued entries are written in queue order, so
    /// a writer may queue its next entries before the previous ones are durable.
    pub async fn enqueue_append(
        &self,
        shard: u16,
        entries: Vec<(LogId, Vec<u8>)>,
    ) -> Result<oneshot::Receiver<Result<()>>> {
        let bytes: usize = entries
            .iter()
            .map(|(_, body)| record::record_framed_len(body.len()))
            .sum::<usize>()
            - record::RECORD_HEADER_BYTES;
        if bytes > self.max_entry_bytes() {
            return Err(WalError::EntryTooLarge {
                bytes,
                max: self.max_entry_bytes(),
            });
        }
        let (done, durable) = oneshot::channel();
        self.lane(shard)
            .requests
            .send(LaneRequest::Append { shard, entries, done })
            .await
            .map_err(|_| WalError::Closed)?;
        Ok(durable)
    }

    async fn mark(&self, kind: RecordKind, shard: u16, log_id: LogId, body: Vec<u8>) -> Result<()> {
        self.submit(shard, |done| LaneRequest::Mark {
            kind,
            shard,
            log_id,
            body,
            done,
        })
        .await
    }

    /// Discards the shard's entries above `after.index`; durable when it resolves.
    pub async fn truncate_suffix(&self, shard: u16, after: LogId) -> Result<()> {
        self.mark(RecordKind::TruncateSuffix, shard, after, Vec::new()).await
    }

    /// Lets the shard's entries up to `through_index` go; segments holding only such entries
    /// (for every shard in them) are deleted.
    pub async fn purge_prefix(&self, shard: u16, through_index: u64) -> Result<()> {
        let through = LogId {
            term: 0,
            index: through_index,
        };
        self.purge_through(shard, through).await
    }

    /// `purge_prefix` that also records the purged entry's term, for a log whose readers must
    /// name its last purged entry (`purged`).
    pub async fn purge_through(&self, shard: u16, through: LogId) -> Result<()> {
        self.mark(RecordKind::PurgePrefix, shard, through, Vec::new()).await
    }

    /// The newest purged entry of the shard (its term is 0 unless `purge_through` gave one).
    pub fn purged(&self, shard: u16) -> Option<LogId> {
        let index = self.lane(shard).index.lock().expect("lane index lock");
        let log = index.shards.get(&shard)?;
        (log.purged_through > 0).then_some(LogId {
            term: log.purged_term,
            index: log.purged_through,
        })
    }

    /// Records that an operator accepts the loss of the shard's damaged entries after
    /// `after_index` (its last intact entry before the damage), `lost_bytes` being the damaged
    /// bytes concerned. Takes effect at the next open.
    /// `regions` are the `(segment_no, offset)` of the damage accepted (see `Damage`).
    pub async fn accept_loss(
        &self,
        shard: u16,
        after_index: u64,
        lost_bytes: u64,
        regions: &[(u64, u64)],
    ) -> Result<()> {
        let log_id = LogId {
            term: lost_bytes,
            index: after_index,
        };
        let regions = &regions[..regions.len().min(lane::MAX_LOSS_REGIONS)];
        self.mark(RecordKind::LossAccepted, shard, log_id, record::encode_regions(regions))
            .await
    }

    /// What accepting the loss of a degraded shard's damage takes (see `accept_loss`), from the
    /// lane reports `open` or `inspect` gave: the damage that may hold its entries (named for
    /// it, or of unknown content, which may have held at least one whole entry).
    pub fn loss_to_accept(&self, shard: u16, reports: &[LaneReport]) -> std::result::Result<LossToAccept, String> {
        let lane = reports
            .iter()
            .find(|report| report.shards.iter().any(|s| s.shard == shard))
            .ok_or_else(|| format!("the lane of shard {shard} was not found"))?;
        if self.accepted_losses(shard).len() >= MAX_CARRIED_LOSSES_PER_SHARD {
            return Err(format!(
                "shard {shard} already has the most accepted losses a shard may carry"
            ));
        }
        let regions: Vec<&Damage> = lane
            .damage
            .iter()
            .filter(|damage| damage.entry.is_none_or(|(named, _)| named == shard))
            .collect();
        if regions.len() > MAX_LOSS_REGIONS {
            return Err(format!(
                "shard {shard} has {} damaged regions; more than {MAX_LOSS_REGIONS} cannot be accepted at once",
                regions.len()
            ));
        }
        let whole_entry = self.max_entry_bytes() as u64;
        let lost_bytes = if regions.is_empty() {
            // A gap with no damage found (a missing segment, say).
            whole_entry
        } else {
            regions
                .iter()
                .map(|damage| {
                    if damage.entry.is_some() {
                        damage.len
                    } else {
                        damage.len.max(whole_entry)
                    }
                })
                .sum()
        };
        Ok(LossToAccept {
            after_index: self.last_log_id(shard).map_or(0, |id| id.index),
            lost_bytes,
            regions: regions.iter().map(|d| (d.segment_no, d.offset)).collect(),
        })
    }

    /// Losses an operator accepted for this shard (see `accept_loss`), oldest first.
    pub fn accepted_losses(&self, shard: u16) -> Vec<AcceptedLoss> {
        self.lane(shard)
            .index
            .lock()
            .expect("lane index lock")
            .shard(shard)
            .accepted_losses
            .clone()
    }

    pub fn last_log_id(&self, shard: u16) -> Option<LogId> {
        self.lane(shard)
            .index
            .lock()
            .expect("lane index lock")
            .shard(shard)
            .last
    }

    pub fn first_index(&self, shard: u16) -> Option<u64> {
        self.lane(shard)
            .index
            .lock()
            .expect("lane index lock")
            .shard(shard)
            .first_index()
    }

    /// Why the shard's log is not trustworthy past its last entry, if so (damage found at open).
    pub fn degraded(&self, shard: u16) -> Option<String> {
        self.lane(shard)
            .index
            .lock()
            .expect("lane index lock")
            .shard(shard)
            .degraded
            .clone()
    }

    /// The shard's entry `index` as the index knows it: its log id, and where it lies on disk
    /// (the segment file, the record's offset and framed length). `None` if it is not indexed.
    pub fn entry_location(&self, shard: u16, index: u64) -> Option<(LogId, PathBuf, u64, u32)> {
        let lane_no = shard as usize % self.lanes.len();
        let mut lane_index = self.lanes[lane_no].index.lock().expect("lane index lock");
        let location = *lane_index
            .shard(shard)
            .locations_from(index, 1)
            .first()
            .filter(|location| location.log_id.index == index)?;
        let path = segment::segment_path(&lane_dir(&self.dir, lane_no), location.segment_no);
        Some((location.log_id, path, location.offset, location.framed_len))
    }

    /// Why the shard's lane refuses writes, if it does (a failed fsync or write).
    pub fn lane_failed(&self, shard: u16) -> Option<String> {
        self.lane(shard).index.lock().expect("lane index lock").failed.clone()
    }

    /// Bytes of disk the WAL's segments occupy.
    pub fn disk_bytes(&self) -> u64 {
        self.lanes
            .iter()
            .map(|lane| lane.index.lock().expect("lane index lock").segments.len() as u64 * self.options.segment_bytes)
            .sum()
    }

    /// The WAL's disk by what keeps it.
    pub fn usage(&self) -> WalUsage {
        let mut usage = WalUsage::default();
        for lane in &self.lanes {
            let segments = &lane.usage;
            usage.flowing += segments.flowing.load(Ordering::Acquire) * self.options.segment_bytes;
            usage.stalled_only += segments.stalled_only.load(Ordering::Acquire) * self.options.segment_bytes;
            usage.degraded_only += segments.degraded_only.load(Ordering::Acquire) * self.options.segment_bytes;
        }
        usage
    }

    /// The bytes a shard's writes are judged by against the WAL budget: the segments a flowing
    /// shard needs (and the active ones), plus, for a shard the archive cannot read now, the
    /// segments only stalled shards need. Segments kept only for degraded shards (which take no
    /// writes, so they never grow) and, for a flowing shard, those kept only for stalled shards
    /// do not count: one stuck shard cannot push the others into `overloaded`, and a stalled
    /// shard reaches it before they do. Disk stays bounded: flowing and stalled-only bytes each
    /// stay within about the budget, and degraded-only bytes are what the damage left at open.
    pub fn budget_bytes(&self, shard: u16) -> u64 {
        let usage = self.usage();
        match self.archive_stalled(shard) {
            Some(_) => usage.flowing + usage.stalled_only,
            None => usage.flowing,
        }
    }

    /// Why the archive cannot take this shard's entries now, if it cannot (see
    /// `set_archive_stalled`).
    pub fn archive_stalled(&self, shard: u16) -> Option<String> {
        self.lane(shard)
            .index
            .lock()
            .expect("lane index lock")
            .shards
            .get(&shard)
            .and_then(|log| log.archive_stalled.clone())
    }

    /// Records (`Some(reason)`) or clears (`None`) that the archive cannot take this shard's
    /// entries (its WAL read or decoding fails). Its segments are kept as before; what only
    /// stalled shards keep is no longer counted against the other shards' budget.
    pub fn set_archive_stalled(&self, shard: u16, reason: Option<String>) {
        let mut index = self.lane(shard).index.lock().expect("lane index lock");
        index.shard(shard).archive_stalled = reason;
        index.refresh_usage();
    }

    /// Every shard the archive cannot take entries of now, with why.
    pub fn archive_stalled_shards(&self) -> Vec<(u16, String)> {
        let mut stalled: Vec<(u16, String)> = self
            .lanes
            .iter()
            .flat_map(|lane| {
                let index = lane.index.lock().expect("lane index lock");
                index
                    .shards
                    .iter()
                    .filter_map(|(shard, log)| Some((*shard, log.archive_stalled.clone()?)))
                    .collect::<Vec<_>>()
            })
            .collect();
        stalled.sort();
        stalled
    }

    /// Reads up to `max_entries` durable entries of `shard` starting at `from_index`. Blocking:
    /// call it from a blocking thread.
    pub fn read_entries(&self, shard: u16, from_index: u64, max_entries: usize) -> Result<Vec<Entry>> {
        let range = EntryRange {
            shard,
            from_index,
            max_entries,
        };
        Ok(self.read_ranges(&[range])?.pop().unwrap_or_default())
    }

    /// Reads several shards' entries at once, one result per range in the same order. Entries
    /// are read in file order and neighbours (of any shard) share one read, so reading every
    /// shard's recent entries costs a few large reads rather than one per entry. Blocking.
    /// Fails if any range fails; `read_ranges_each` says which.
    pub fn read_ranges(&self, ranges: &[EntryRange]) -> Result<Vec<Vec<Entry>>> {
        self.read_ranges_each(ranges)
            .into_iter()
            .map(|read| match read.failure {
                Some(failure) => Err(failure.error),
                None => Ok(read.entries),
            })
            .collect()
    }

    /// `read_ranges`, with the outcome of each range on its own: a record that cannot be read
    /// (EIO) or does not check out fails only the range it belongs to, from that entry on; the
    /// others are read as usual. A shared read that fails is retried record by record, so the
    /// failure is pinned on the records it really hits. Blocking.
    pub fn read_ranges_each(&self, ranges: &[EntryRange]) -> Vec<RangeRead> {
        struct Wanted {
            range: usize,
            slot: usize,
            lane: usize,
            location: index::EntryLocation,
            file: Arc<dyn fs::WalFile>,
        }
        let mut wanted = Vec::new();
        let mut results: Vec<Vec<Option<Entry>>> = Vec::with_capacity(ranges.len());
        let mut failures: Vec<Option<RangeFailure>> = vec![None; ranges.len()];
        let mut budget_left = READ_BUDGET_BYTES;
        for (range_no, range) in ranges.iter().enumerate() {
            let lane = range.shard as usize % self.lanes.len();
            let mut index = self.lanes[lane].index.lock().expect("lane index lock");
            let mut locations = index
                .shard(range.shard)
                .locations_from(range.from_index, range.max_entries);
            let within_budget = locations
                .iter()
                .take_while(|location| {
                    let first_of_call = wanted.is_empty() && budget_left == READ_BUDGET_BYTES;
                    let fits = first_of_call || u64::from(location.framed_len) <= budget_left;
                    budget_left = budget_left.saturating_sub(u64::from(location.framed_len));
                    fits
                })
                .count();
            locations.truncate(within_budget);
            results.push(vec![None; locations.len()]);
            for (slot, location) in locations.into_iter().enumerate() {
                let Some(info) = index.segments.get(&location.segment_no) else {
                    failures[range_no] = Some(RangeFailure {
                        index: location.log_id.index,
                        segment_no: location.segment_no,
                        offset: location.offset,
                        error: WalError::Missing {
                            shard: range.shard,
                            index: location.log_id.index,
                        },
                    });
                    break;
                };
                wanted.push(Wanted {
                    range: range_no,
                    slot,
                    lane,
                    location,
                    file: info.file.clone(),
                });
            }
        }
        wanted.sort_unstable_by_key(|w| (w.lane, w.location.segment_no, w.location.offset));
        let mut first = 0;
        while first < wanted.len() {
            let start = wanted[first].location.offset;
            let mut end = start + u64::from(wanted[first].location.framed_len);
            let mut past = first + 1;
            while let Some(next) = wanted.get(past) {
                let next_end = next.location.offset + u64::from(next.location.framed_len);
                let same_file = Arc::ptr_eq(&next.file, &wanted[first].file);
                if !same_file || next.location.offset > end + READ_GAP_BYTES || next_end - start > MAX_READ_BYTES {
                    break;
                }
                end = end.max(next_end);
                past += 1;
            }
            let mut buffer = vec![0u8; (end - start) as usize];
            let shared_read = wanted[first].file.read_exact_at(&mut buffer, start);
            for w in &wanted[first..past] {
                let location = w.location;
                if failures[w.range]
                    .as_ref()
                    .is_some_and(|failure| failure.index <= location.log_id.index)
                {
                    continue;
                }
                let len = location.framed_len as usize;
                let mut own;
                let frame = match &shared_read {
                    Ok(()) => {
                        let at = (location.offset - start) as usize;
                        Ok(&buffer[at..at + len])
                    }
                    Err(_) => {
                        own = vec![0u8; len];
                        w.file
                            .read_exact_at(&mut own, location.offset)
                            .map(|()| &own[..])
                            .map_err(WalError::io)
                    }
                };
                let shard = ranges[w.range].shard;
                let outcome = frame.and_then(|frame| match record::decode_record(frame) {
                    DecodedRecord::Record(rec, _) if rec.shard == shard && rec.log_id == location.log_id => {
                        Ok((rec.log_id, rec.body.to_vec()))
                    }
                    _ => Err(WalError::Corrupt {
                        segment_no: location.segment_no,
                        offset: location.offset,
                    }),
                });
                match outcome {
                    Ok(entry) => results[w.range][w.slot] = Some(entry),
                    Err(error) => {
                        failures[w.range] = Some(RangeFailure {
                            index: location.log_id.index,
                            segment_no: location.segment_no,
                            offset: location.offset,
                            error,
                        });
                    }
                }
            }
            first = past;
        }
        results
            .into_iter()
            .zip(failures)
            .map(|(slots, failure)| RangeRead {
                // Entries are in order: everything before the first failure was read.
                entries: slots.into_iter().map_while(|entry| entry).collect(),
                failure,
            })
            .collect()
    }

    pub fn save_vote(&self, shard: u16, vote: Vote) -> std::io::Result<()> {
        vote::save(self.fs.as_ref(), &self.dir, shard, vote)
    }

    pub fn read_vote(&self, shard: u16) -> std::io::Result<Option<Vote>> {
        vote::read(self.fs.as_ref(), &self.dir, shard)
    }

    /// Stops the lane threads after they have answered every queued request.
    pub fn shutdown(self) {
        let threads = std::mem::take(&mut *self.threads.lock().expect("threads lock"));
        drop(self.lanes);
        for thread in threads {
            let _ = thread.join();
        }
    }
}

#[cfg(test)]
mod isolation_tests;
#[cfg(test)]
mod tests;
