//! A lane: one physical log (a directory of segments) shared by many shards, with its own
//! group-commit thread. Requests queue while an fsync runs; the next commit takes all of them and
//! writes them as one batch (two when the segment fills), so one fdatasync covers many shards and
//! the thread never waits on a timer.
//!
//! Failure rules (docs/OPERATIONS.md, "When storage fails"):
//! - a failed `fdatasync` (or a failed write other than "out of space") marks the lane failed: it
//!   is never retried on the same data, since the kernel may have dropped the pages. The lane
//!   heals by sealing that segment at its last durable batch and going on in a new segment
//!   (`try_heal`), retried with backoff while the disk keeps failing.
//! - out of space (ENOSPC/EDQUOT) while starting a segment or writing into it fails just the
//!   requests concerned; what was written of them is zeroed, the write position stays, and the
//!   next commit tries again, so writes resume by themselves once space is back.
//! - a request is answered `Ok` only after its batch's fsync returned, and the index learns of its
//!   records only then.

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Instant;

use tokio::sync::{mpsc, oneshot};

use super::fs::{self, FileSystem, WalFile};
use super::index::{EntryLocation, LaneIndex, SegmentInfo};
use super::record::{self, Record, RecordKind};
use super::segment::{self, SEGMENT_HEADER_BYTES};
use super::{LogId, WalError};

pub enum LaneRequest {
    Append {
        shard: u16,
        entries: Vec<(LogId, Vec<u8>)>,
        done: oneshot::Sender<Result<(), WalError>>,
    },
    /// A record that is not an entry: truncate, purge or an accepted loss (whose body lists
    /// the damaged regions accepted).
    Mark {
        kind: RecordKind,
        shard: u16,
        log_id: LogId,
        body: Vec<u8>,
        done: oneshot::Sender<Result<(), WalError>>,
    },
    /// Wakes a failed lane when its next healing attempt is due (`LaneWriter::try_heal`).
    Heal,
}

impl LaneRequest {
    fn framed_bytes(&self) -> usize {
        match self {
            LaneRequest::Append { entries, .. } => entries
                .iter()
                .map(|(_, body)| record::record_framed_len(body.len()))
                .sum(),
            LaneRequest::Mark { body, .. } => record::record_framed_len(body.len()),
            LaneRequest::Heal => 0,
        }
    }

    fn answer(self, outcome: Result<(), WalError>) {
        match self {
            LaneRequest::Append { done, .. } | LaneRequest::Mark { done, .. } => {
                let _ = done.send(outcome);
            }
            LaneRequest::Heal => {}
        }
    }
}

/// A change to apply to the index once the batch that carries it is durable.
enum IndexChange {
    Entry(u16, EntryLocation),
    Truncate(u16, LogId),
    Purge(u16, LogId),
}

pub struct LaneWriter {
    pub fs: Arc<dyn FileSystem>,
    pub dir: PathBuf,
    pub index: Arc<Mutex<LaneIndex>>,
    pub segment_bytes: u64,
    pub max_batch_bytes: usize,
    pub active_file: Arc<dyn WalFile>,
    pub active_segment_no: u64,
    pub write_offset: u64,
    pub next_batch_no: u64,
    /// Shards living in this lane (a new segment starts with one purge mark per shard).
    pub lane_shard_count: usize,
    /// Which shards those are (a restart recovers them from disk).
    pub shards: Vec<u16>,
    /// When a failed lane next tries to heal, and how long it waits after that attempt.
    pub healing: Healing,
    /// Wakes the lane for a healing attempt (weak: the lane must not keep its own queue open).
    pub wake: mpsc::WeakSender<LaneRequest>,
}

/// A failed lane's schedule of healing attempts: the first soon after the failure, then
/// doubling while the disk keeps failing; back to the first delay once the lane has stayed
/// healthy for a while.
#[derive(Debug)]
pub struct Healing {
    next_attempt: Option<Instant>,
    delay: std::time::Duration,
    healthy_since: Instant,
}

const HEAL_FIRST: std::time::Duration = std::time::Duration::from_secs(1);
const HEAL_MAX: std::time::Duration = std::time::Duration::from_secs(30);
const HEAL_HEALTHY_AFTER: std::time::Duration = std::time::Duration::from_secs(60);

impl Default for Healing {
    fn default() -> Healing {
        Healing {
            next_attempt: None,
            delay: HEAL_FIRST,
            healthy_since: Instant::now(),
        }
    }
}

impl Healing {
    /// Schedules the next attempt (unless one is scheduled) and returns when it is.
    fn schedule(&mut self) -> Option<Instant> {
        if self.next_attempt.is_some() {
            return None;
        }
        if self.healthy_since.elapsed() >= HEAL_HEALTHY_AFTER {
            self.delay = HEAL_FIRST;
        }
        let at = Instant::now() + self.delay;
        self.delay = (self.delay * 2).min(HEAL_MAX);
        self.next_attempt = Some(at);
        Some(at)
    }

    fn due(&self) -> bool {
        self.next_attempt.is_some_and(|at| Instant::now() >= at)
    }
}

/// Where a recovered lane writes next: the active segment at `resume_offset`, or a new segment
/// (registered in `index`) when recovery found no segment to write into.
pub fn resume_point(
    fs: &dyn FileSystem,
    lane_dir: &std::path::Path,
    index: &mut LaneIndex,
    resume_offset: Option<u64>,
    segment_bytes: u64,
) -> std::io::Result<(Arc<dyn WalFile>, u64, u64)> {
    if let Some(offset) = resume_offset {
        let info = &index.segments[&index.active_segment];
        return Ok((info.file.clone(), index.active_segment, offset));
    }
    let next = index.segments.keys().next_back().map_or(0, |n| n + 1);
    let file = segment::create_segment(fs, lane_dir, next, segment_bytes)?;
    index.segments.insert(
        next,
        SegmentInfo {
            file: file.clone(),
            max_index_by_shard: HashMap::new(),
        },
    );
    index.active_segment = next;
    Ok((file, next, SEGMENT_HEADER_BYTES))
}

/// A lane restart waits this long after a failed attempt to recover, doubling up to the max.
const RESTART_RETRY_FIRST: std::time::Duration = std::time::Duration::from_millis(50);
const RESTART_RETRY_MAX: std::time::Duration = std::time::Duration::from_secs(5);

/// The batch being assembled in the write buffer, and whom it answers.
#[derive(Default)]
struct OpenBatch {
    /// `(request position, index changes)` of the requests whose records are in the buffer.
    requests: Vec<(usize, Vec<IndexChange>)>,
    record_count: u32,
}

impl LaneWriter {
    /// The lane thread's loop. A panic in a commit does not end it: the requests not yet
    /// answered get an error, and the lane restarts from what is on disk (`restart`); the
    /// shards whose entries failed rebuild from the durable log, as after any failed entry.
    pub fn run(mut self, mut requests: mpsc::Receiver<LaneRequest>) {
        let mut buffer = Vec::with_capacity(self.max_batch_bytes + record::BATCH_HEADER_BYTES + record::BATCH_ALIGN);
        let mut batch = Vec::new();
        let mut backoff = crate::supervisor::Backoff::default();
        let mut healthy_since = Instant::now();
        while let Some(first) = requests.blocking_recv() {
            let mut batch_bytes = first.framed_bytes();
            batch.push(first);
            while batch_bytes < self.max_batch_bytes {
                match requests.try_recv() {
                    Ok(request) => {
                        batch_bytes += request.framed_bytes();
                        batch.push(request);
                    }
                    Err(_) => break,
                }
            }
            let committed = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                self.commit(&mut batch, &mut buffer);
            }));
            if let Err(payload) = committed {
                let reason = format!("panicked: {}", crate::supervisor::panic_message(payload.as_ref()));
                for request in batch.drain(..) {
                    request.answer(Err(WalError::Io(
                        "the wal lane restarted after an internal error; the write may or may not be durable".into(),
                    )));
                }
                let delay = backoff.after_failure(healthy_since.elapsed());
                self.restart(&reason, delay);
                healthy_since = Instant::now();
            }
        }
    }

    /// Rebuilds the lane's writing position and index from the segments on disk, as opening
    /// the WAL does (retrying with backoff while that fails; requests wait in the queue).
    /// A lane that had failed for good (a failed fsync) stays failed.
    fn restart(&mut self, reason: &str, delay: std::time::Duration) {
        let part = format!("wal_lane/{}", self.dir.display());
        crate::supervisor::record_failure("wal_lane", &part, reason, delay);
        // The panic may have poisoned the index lock: readers (shard writers) must not fail on it.
        let failed = {
            let index = self.index.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
            index.failed.clone()
        };
        self.index.clear_poison();
        std::thread::sleep(delay);
        let mut retry = RESTART_RETRY_FIRST;
        loop {
            match self.reopen(failed.clone()) {
                Ok(()) => break,
                Err(error) => {
                    tracing::error!(lane = %self.dir.display(), %error, "wal lane could not restart from disk; retrying");
                    std::thread::sleep(retry);
                    retry = (retry * 2).min(RESTART_RETRY_MAX);
                }
            }
        }
        crate::supervisor::record_restarted(&part);
        tracing::info!(lane = %self.dir.display(), "wal lane restarted from its segments on disk");
    }

    fn reopen(&mut self, failed: Option<String>) -> std::io::Result<()> {
        let mut recovered = super::recovery::recover_lane(self.fs.as_ref(), &self.dir, &self.shards, true)?;
        let mut fresh = std::mem::take(&mut recovered.index);
        let (file, segment_no, offset) = resume_point(
            self.fs.as_ref(),
            &self.dir,
            &mut fresh,
            recovered.resume_offset,
            self.segment_bytes,
        )?;
        fresh.failed = failed;
        // The panic may have come between a batch's write and its fsync: what recovery just
        // read may be in the page cache only. It is made durable before the index shows it
        // (a failed fsync fails the lane, as always: never retried).
        if fresh.failed.is_none()
            && let Err(error) = file.sync_data()
        {
            fresh.failed = Some(format!(
                "fdatasync of the active segment after a restart failed: {error}"
            ));
        }
        super::pin_damage(&mut fresh, &recovered.damage, &self.shards);
        let mut index = self.index.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        // What the rest of the WAL shares with this lane, and what the flusher found, outlive
        // the restart: the usage counters are the WAL handle's, the stalled marks the flusher's.
        fresh.usage = index.usage.clone();
        for (shard, log) in &index.shards {
            if let Some(reason) = &log.archive_stalled {
                fresh.shard(*shard).archive_stalled = Some(reason.clone());
            }
        }
        fresh.refresh_usage();
        *index = fresh;
        drop(index);
        self.active_file = file;
        self.active_segment_no = segment_no;
        self.write_offset = offset;
        self.next_batch_no = recovered.next_batch_no;
        Ok(())
    }

    /// Writes and fsyncs the requests, publishes what became durable and answers every request.
    fn commit(&mut self, batch: &mut Vec<LaneRequest>, buffer: &mut Vec<u8>) {
        let started = Instant::now();
        let mut outcomes: Vec<Option<Result<(), WalError>>> = (0..batch.len()).map(|_| None).collect();
        let failed = self.index.lock().expect("lane index lock").failed.clone();
        let mut removed_segments = Vec::new();
        let failed = failed.and_then(|reason| self.try_heal(reason, buffer, &mut removed_segments));
        batch.retain(|request| !matches!(request, LaneRequest::Heal));
        let record_count = match failed {
            Some(reason) => {
                outcomes.fill_with(|| Some(Err(WalError::LaneFailed(reason.clone()))));
                0
            }
            None => self.write_requests(batch, buffer, &mut outcomes, &mut removed_segments),
        };
        #[cfg(test)]
        crate::supervisor::crash::point(&format!("wal_lane/{}", self.dir.display()));
        metrics::histogram!("fleetlm_wal_fsync_seconds").record(started.elapsed().as_secs_f64());
        metrics::histogram!("fleetlm_wal_fsync_batch_records").record(f64::from(record_count));
        for (request, outcome) in batch.drain(..).zip(outcomes) {
            request.answer(outcome.unwrap_or_else(|| Err(WalError::Io("request was not written".into()))));
        }
        for number in removed_segments {
            if let Err(error) = segment::remove_segment(self.fs.as_ref(), &self.dir, number) {
                tracing::warn!(segment = number, %error, "could not delete archived wal segment");
            }
        }
    }

    /// Writes every request it can; returns the number of records made durable.
    fn write_requests(
        &mut self,
        batch: &[LaneRequest],
        buffer: &mut Vec<u8>,
        outcomes: &mut [Option<Result<(), WalError>>],
        removed_segments: &mut Vec<u64>,
    ) -> u32 {
        // Shards' log ends as this commit will leave them, to check contiguity within it.
        let mut tentative_last: HashMap<u16, Option<LogId>> = HashMap::new();
        let mut open = OpenBatch::default();
        let mut durable_records = 0;
        let mut stopped: Option<WalError> = None;
        buffer.clear();
        record::begin_batch(buffer);
        for (position, request) in batch.iter().enumerate() {
            if let Some(error) = &stopped {
                outcomes[position] = Some(Err(error.clone()));
                continue;
            }
            if let Err(error) = self.check(request, &mut tentative_last) {
                outcomes[position] = Some(Err(error));
                continue;
            }
            let needed = request.framed_bytes();
            let body_len = buffer.len() - record::BATCH_HEADER_BYTES;
            if self.write_offset + record::batch_framed_len(body_len + needed) as u64 > self.segment_bytes {
                // The segment is full: make what it holds durable, then start the next one.
                let rotated = self
                    .write_batch(buffer, &mut open, outcomes, removed_segments)
                    .map(|written| durable_records += written)
                    .and_then(|()| self.rotate(buffer, removed_segments));
                if let Err(error) = rotated {
                    outcomes[position] = Some(Err(error.clone()));
                    stopped = Some(error);
                    continue;
                }
            }
            let mut changes = Vec::new();
            self.encode(request, buffer, &mut changes);
            open.record_count += changes.len().max(1) as u32;
            open.requests.push((position, changes));
            if let LaneRequest::Append { shard, entries, .. } = request {
                tentative_last.insert(*shard, entries.last().map(|(id, _)| *id));
            } else if let LaneRequest::Mark {
                kind: RecordKind::TruncateSuffix,
                shard,
                log_id,
                ..
            } = request
            {
                tentative_last.insert(*shard, (log_id.index > 0).then_some(*log_id));
            } else if let LaneRequest::Mark {
                kind: RecordKind::PurgePrefix,
                shard,
                log_id,
                ..
            } = request
            {
                // A purge past the last entry (a replica installing a snapshot) moves the end.
                let last = *tentative_last
                    .entry(*shard)
                    .or_insert_with(|| self.index.lock().expect("lane index lock").shard(*shard).last);
                if last.is_none_or(|last| last.index < log_id.index) {
                    tentative_last.insert(*shard, Some(*log_id));
                }
            }
        }
        match self.write_batch(buffer, &mut open, outcomes, removed_segments) {
            Ok(written) => durable_records + written,
            Err(_) => durable_records,
        }
    }

    /// Refuses a request that could never be written as asked (the lane stays healthy).
    fn check(&self, request: &LaneRequest, tentative_last: &mut HashMap<u16, Option<LogId>>) -> Result<(), WalError> {
        let max_bytes = self.max_request_bytes();
        if request.framed_bytes() > max_bytes {
            return Err(WalError::EntryTooLarge {
                bytes: request.framed_bytes(),
                max: max_bytes,
            });
        }
        let LaneRequest::Append { shard, entries, .. } = request else {
            return Ok(());
        };
        let last = *tentative_last
            .entry(*shard)
            .or_insert_with(|| self.index.lock().expect("lane index lock").shard(*shard).last);
        let mut expected = last.map(|l| l.index + 1);
        for (log_id, _) in entries {
            if let Some(expected_index) = expected
                && log_id.index != expected_index
            {
                return Err(WalError::NotContiguous {
                    shard: *shard,
                    expected: expected_index,
                    got: log_id.index,
                });
            }
            expected = Some(log_id.index + 1);
        }
        Ok(())
    }

    /// The largest request (framed records) that always fits in a new segment.
    pub fn max_request_bytes(&self) -> usize {
        max_request_bytes(self.segment_bytes, self.max_batch_bytes, self.lane_shard_count)
            .expect("segment size validated when the wal was opened")
    }

    fn encode(&self, request: &LaneRequest, buffer: &mut Vec<u8>, changes: &mut Vec<IndexChange>) {
        match request {
            LaneRequest::Append { shard, entries, .. } => {
                for (log_id, body) in entries {
                    let record = Record {
                        kind: RecordKind::Entry,
                        shard: *shard,
                        log_id: *log_id,
                        body,
                    };
                    let location = EntryLocation {
                        log_id: *log_id,
                        segment_no: self.active_segment_no,
                        offset: self.write_offset + buffer.len() as u64,
                        framed_len: record.framed_len() as u32,
                    };
                    record.encode_into(buffer);
                    changes.push(IndexChange::Entry(*shard, location));
                }
            }
            LaneRequest::Mark {
                kind,
                shard,
                log_id,
                body,
                ..
            } => {
                Record {
                    kind: *kind,
                    shard: *shard,
                    log_id: *log_id,
                    body,
                }
                .encode_into(buffer);
                match kind {
                    RecordKind::TruncateSuffix => changes.push(IndexChange::Truncate(*shard, *log_id)),
                    RecordKind::PurgePrefix => changes.push(IndexChange::Purge(*shard, *log_id)),
                    // Takes effect when the log is next recovered (see recovery.rs).
                    RecordKind::LossAccepted | RecordKind::Entry => {}
                }
            }
            // Taken out of the batch before it is written (`commit`).
            LaneRequest::Heal => {}
        }
    }

    /// Writes and fsyncs the open batch (if it holds anything), then publishes it and answers its
    /// requests. On failure its requests get the error and the buffer is emptied either way.
    fn write_batch(
        &mut self,
        buffer: &mut Vec<u8>,
        open: &mut OpenBatch,
        outcomes: &mut [Option<Result<(), WalError>>],
        removed_segments: &mut Vec<u64>,
    ) -> Result<u32, WalError> {
        if buffer.len() == record::BATCH_HEADER_BYTES {
            return Ok(0);
        }
        record::seal_batch(buffer, self.next_batch_no, open.record_count);
        let result = self.write_and_sync(buffer);
        buffer.clear();
        record::begin_batch(buffer);
        let requests = std::mem::take(&mut open.requests);
        let record_count = std::mem::take(&mut open.record_count);
        if let Err(error) = result {
            for (position, _) in &requests {
                outcomes[*position] = Some(Err(error.clone()));
            }
            return Err(error);
        }
        self.next_batch_no += 1;
        let mut index = self.index.lock().expect("lane index lock");
        for (position, changes) in requests {
            for change in changes {
                match change {
                    IndexChange::Entry(shard, location) => index.note_entry(shard, location),
                    IndexChange::Truncate(shard, after) => index.shard(shard).truncate_suffix(after),
                    IndexChange::Purge(shard, through) => index.shard(shard).purge_prefix(through),
                }
            }
            outcomes[position] = Some(Ok(()));
        }
        removed_segments.extend(index.remove_unneeded_segments());
        Ok(record_count)
    }

    fn write_and_sync(&mut self, batch: &[u8]) -> Result<(), WalError> {
        if let Err(error) = self.active_file.write_all_at(batch, self.write_offset) {
            if fs::is_out_of_space(&error) {
                // Nothing of it was acknowledged: take it back so the next batch starts clean.
                let zeros = vec![0u8; batch.len()];
                if self.active_file.write_all_at(&zeros, self.write_offset).is_ok() {
                    metrics::counter!("fleetlm_wal_out_of_space_total").increment(1);
                    return Err(WalError::OutOfSpace(error.to_string()));
                }
            }
            return Err(self.fail(format!("write failed: {error}")));
        }
        if let Err(error) = self.active_file.sync_data() {
            return Err(self.fail(format!("fdatasync failed: {error}")));
        }
        self.write_offset += batch.len() as u64;
        Ok(())
    }

    /// Marks the lane failed and returns the error for the requests concerned. The lane refuses
    /// every write until it heals (`try_heal`), which it first tries shortly after.
    fn fail(&mut self, reason: String) -> WalError {
        tracing::error!(lane = %self.dir.display(), %reason, "wal lane failed; it refuses writes until it heals");
        metrics::counter!("fleetlm_wal_lane_failures_total").increment(1);
        let error = {
            let mut index = self.index.lock().expect("lane index lock");
            WalError::LaneFailed(index.failed.get_or_insert(reason).clone())
        };
        self.schedule_heal();
        error
    }

    /// Makes sure the lane wakes for its next healing attempt even if no write comes.
    fn schedule_heal(&mut self) {
        let Some(at) = self.healing.schedule() else { return };
        let wake = self.wake.clone();
        let spawned = std::thread::Builder::new().name("wal-lane-heal".into()).spawn(move || {
            std::thread::sleep(at.saturating_duration_since(Instant::now()));
            if let Some(requests) = wake.upgrade() {
                // A full queue wakes the lane anyway.
                let _ = requests.try_send(LaneRequest::Heal);
            }
        });
        if let Err(error) = spawned {
            tracing::warn!(lane = %self.dir.display(), %error, "could not schedule the wal lane's healing; the next write will try it");
        }
    }

    /// A failed lane heals once its attempt is due, returning `None`; otherwise the reason it
    /// still refuses writes.
    ///
    /// A failed fsync is never retried on the same data: the kernel may have dropped the pages,
    /// and a second fsync could succeed without them. So the lane leaves the segment the failure
    /// happened in, sealing it at the end of its last durable batch (`segment::write_seal`; what
    /// the disk kept past that point is ignored from then on, recovery included), and carries on
    /// in a new segment. Nothing acknowledged is in question: only the failed batch's requests,
    /// all answered with an error, lay past the seal, and the index never showed them.
    fn try_heal(&mut self, reason: String, buffer: &mut Vec<u8>, removed_segments: &mut Vec<u64>) -> Option<String> {
        if !self.healing.due() {
            return Some(reason);
        }
        self.healing.next_attempt = None;
        let healed = segment::write_seal(self.fs.as_ref(), &self.dir, self.active_segment_no, self.write_offset)
            .map_err(|error| format!("could not seal segment {}: {error}", self.active_segment_no))
            .and_then(|()| {
                buffer.clear();
                record::begin_batch(buffer);
                self.rotate(buffer, removed_segments).map_err(|error| error.to_string())
            });
        match healed {
            Ok(()) => {
                self.index.lock().expect("lane index lock").failed = None;
                self.healing.healthy_since = Instant::now();
                metrics::counter!("fleetlm_wal_lane_heals_total").increment(1);
                tracing::info!(
                    lane = %self.dir.display(),
                    segment = self.active_segment_no,
                    failure = %reason,
                    "wal lane healed: it writes to a new segment; the failed one is sealed at its last durable batch"
                );
                None
            }
            Err(error) => {
                tracing::warn!(lane = %self.dir.display(), %error, "wal lane could not heal yet");
                self.schedule_heal();
                Some(reason)
            }
        }
    }

    /// Starts the next segment (the current one's batches are all durable when this is called)
    /// and carries every shard's purge mark into it, so deleting older segments in any order never
    /// loses the knowledge of what was purged.
    fn rotate(&mut self, buffer: &mut Vec<u8>, removed_segments: &mut Vec<u64>) -> Result<(), WalError> {
        let next = self.active_segment_no + 1;
        let file = segment::create_segment(self.fs.as_ref(), &self.dir, next, self.segment_bytes).map_err(|error| {
            if fs::is_out_of_space(&error) {
                metrics::counter!("fleetlm_wal_out_of_space_total").increment(1);
                WalError::OutOfSpace(error.to_string())
            } else {
                WalError::Io(format!("could not start a new segment: {error}"))
            }
        })?;
        let marks = {
            let mut index = self.index.lock().expect("lane index lock");
            index.segments.insert(
                next,
                SegmentInfo {
                    file: file.clone(),
                    max_index_by_shard: HashMap::new(),
                },
            );
            index.active_segment = next;
            carried_marks(&index)
        };
        self.active_file = file;
        self.active_segment_no = next;
        self.write_offset = SEGMENT_HEADER_BYTES;
        metrics::counter!("fleetlm_wal_segment_rotations_total").increment(1);
        if marks.is_empty() {
            return Ok(());
        }
        let mut open = OpenBatch::default();
        for (kind, shard, log_id, body) in marks {
            Record {
                kind,
                shard,
                log_id,
                body: &body,
            }
            .encode_into(buffer);
            open.record_count += 1;
        }
        self.write_batch(buffer, &mut open, &mut [], removed_segments)
            .map(|_| ())
    }
}

/// What a new segment starts with: every shard's purge mark, and its accepted losses whose
/// damaged entries are not purged yet (the damaged segment may outlive the one holding the
/// operator's record), so deleting segments in any order loses neither.
fn carried_marks(index: &LaneIndex) -> Vec<(RecordKind, u16, LogId, Vec<u8>)> {
    let mut marks = Vec::new();
    for (shard, log) in &index.shards {
        if log.purged_through > 0 {
            let log_id = LogId {
                term: log.purged_term,
                index: log.purged_through,
            };
            marks.push((RecordKind::PurgePrefix, *shard, log_id, Vec::new()));
        }
        for loss in log
            .accepted_losses
            .iter()
            .filter(|loss| loss.after_index >= log.purged_through)
        {
            let log_id = LogId {
                term: loss.lost_bytes,
                index: loss.after_index,
            };
            marks.push((
                RecordKind::LossAccepted,
                *shard,
                log_id,
                record::encode_regions(&loss.regions),
            ));
        }
    }
    marks
}

/// Accepted losses per shard carried into a new segment, at most (`fleetlm wal repair` refuses
/// to record more).
pub const MAX_CARRIED_LOSSES_PER_SHARD: usize = 4;
/// Damaged regions one accepted loss may name, at most.
pub const MAX_LOSS_REGIONS: usize = 8;

/// The largest request (framed records) that always fits in a new segment: after the magic, the
/// batch of carried marks (a purge mark and accepted losses per shard) and its own batch header
/// and padding.
/// `None` when a segment is too small to hold the marks and anything more (a configuration the
/// WAL refuses at open).
pub fn max_request_bytes(segment_bytes: u64, max_batch_bytes: usize, lane_shard_count: usize) -> Option<usize> {
    let loss_mark = record::record_framed_len(MAX_LOSS_REGIONS * record::REGION_BYTES);
    let marks_per_shard = record::RECORD_HEADER_BYTES + MAX_CARRIED_LOSSES_PER_SHARD * loss_mark;
    let carried_marks = record::batch_framed_len(lane_shard_count * marks_per_shard);
    let room = usize::try_from(segment_bytes.checked_sub(SEGMENT_HEADER_BYTES)?)
        .ok()?
        .checked_sub(carried_marks + record::BATCH_HEADER_BYTES + record::BATCH_ALIGN)?;
    Some(max_batch_bytes.min(room))
}
