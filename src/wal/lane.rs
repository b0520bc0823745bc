//! A lane: one physical log (a directory of segments) shared by many shards, with its own
//! group-commit thread. Requests queue while an fsync runs; the next batch takes all of them, so
//! one fdatasync covers many shards and the thread never waits on a timer.

use std::collections::HashMap;
use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Instant;

use tokio::sync::{mpsc, oneshot};

use super::index::{EntryLocation, LaneIndex, SegmentInfo};
use super::record::{Record, RecordKind};
use super::segment::{self, SEGMENT_HEADER_BYTES};
use super::{LogId, WalError};

pub enum LaneRequest {
    Append {
        shard: u16,
        entries: Vec<(LogId, Vec<u8>)>,
        done: oneshot::Sender<Result<(), WalError>>,
    },
    TruncateSuffix {
        shard: u16,
        after: LogId,
        done: oneshot::Sender<Result<(), WalError>>,
    },
    PurgePrefix {
        shard: u16,
        through_index: u64,
        done: oneshot::Sender<Result<(), WalError>>,
    },
}

impl LaneRequest {
    fn approx_bytes(&self) -> usize {
        match self {
            LaneRequest::Append { entries, .. } => entries.iter().map(|(_, body)| body.len() + 28).sum(),
            _ => 28,
        }
    }
}

/// A change to apply to the index once the batch that carries it is durable.
enum IndexChange {
    Entry(u16, EntryLocation),
    Truncate(u16, LogId),
    Purge(u16, u64),
}

pub struct LaneWriter {
    pub dir: PathBuf,
    pub index: Arc<Mutex<LaneIndex>>,
    pub segment_bytes: u64,
    pub max_batch_bytes: usize,
    pub active_file: Arc<File>,
    pub active_segment_no: u64,
    pub write_offset: u64,
}

impl LaneWriter {
    pub fn run(mut self, mut requests: mpsc::Receiver<LaneRequest>) {
        let mut buffer = Vec::with_capacity(self.max_batch_bytes);
        let mut batch = Vec::new();
        while let Some(first) = requests.blocking_recv() {
            let mut batch_bytes = first.approx_bytes();
            batch.push(first);
            // A batch stays under max_batch_bytes plus one request (itself at most that size).
            while batch_bytes < self.max_batch_bytes {
                match requests.try_recv() {
                    Ok(request) => {
                        batch_bytes += request.approx_bytes();
                        batch.push(request);
                    }
                    Err(_) => break,
                }
            }
            self.commit(&mut batch, &mut buffer);
        }
    }

    /// Writes and fsyncs one batch, then publishes it to the index and answers every request.
    fn commit(&mut self, batch: &mut Vec<LaneRequest>, buffer: &mut Vec<u8>) {
        let started = Instant::now();
        let failed = self.index.lock().expect("lane index lock").failed.clone();
        let mut outcomes: Vec<Result<(), WalError>> = Vec::with_capacity(batch.len());
        let mut changes = Vec::new();
        let mut record_count = 0usize;
        let write_result = match failed {
            Some(reason) => Err(WalError::LaneFailed(reason)),
            None => self.encode_and_write(batch, buffer, &mut outcomes, &mut changes, &mut record_count),
        };
        let mut removed_segments = Vec::new();
        match write_result {
            Ok(()) => {
                let mut index = self.index.lock().expect("lane index lock");
                for change in changes {
                    match change {
                        IndexChange::Entry(shard, location) => index.note_entry(shard, location),
                        IndexChange::Truncate(shard, after) => index.shard(shard).truncate_suffix(after),
                        IndexChange::Purge(shard, through) => index.shard(shard).purge_prefix(through),
                    }
                }
                for number in index.removable_segments() {
                    index.segments.remove(&number);
                    removed_segments.push(number);
                }
            }
            Err(error) => {
                tracing::error!(lane = %self.dir.display(), %error, "wal lane failed; refusing further writes");
                self.index
                    .lock()
                    .expect("lane index lock")
                    .failed
                    .get_or_insert_with(|| error.to_string());
                outcomes = batch.iter().map(|_| Err(error.clone())).collect();
            }
        }
        metrics::histogram!("fleetlm_wal_fsync_seconds").record(started.elapsed().as_secs_f64());
        metrics::histogram!("fleetlm_wal_fsync_batch_records").record(record_count as f64);
        for (request, outcome) in batch.drain(..).zip(outcomes) {
            let done = match request {
                LaneRequest::Append { done, .. }
                | LaneRequest::TruncateSuffix { done, .. }
                | LaneRequest::PurgePrefix { done, .. } => done,
            };
            let _ = done.send(outcome);
        }
        for number in removed_segments {
            if let Err(error) = std::fs::remove_file(segment::segment_path(&self.dir, number)) {
                tracing::warn!(segment = number, %error, "could not delete archived wal segment");
            }
        }
    }

    fn encode_and_write(
        &mut self,
        batch: &[LaneRequest],
        buffer: &mut Vec<u8>,
        outcomes: &mut Vec<Result<(), WalError>>,
        changes: &mut Vec<IndexChange>,
        record_count: &mut usize,
    ) -> Result<(), WalError> {
        buffer.clear();
        // Shards' log ends as this batch will leave them, to check contiguity within the batch.
        let mut tentative_last: HashMap<u16, Option<LogId>> = HashMap::new();
        for request in batch {
            let outcome = match request {
                LaneRequest::Append { shard, entries, .. } => {
                    let last = *tentative_last
                        .entry(*shard)
                        .or_insert_with(|| self.index.lock().expect("lane index lock").shard(*shard).last);
                    match check_append(*shard, last, entries, self.max_record_body()) {
                        Err(error) => Err(error),
                        Ok(()) => {
                            for (log_id, body) in entries {
                                let record = Record {
                                    kind: RecordKind::Entry,
                                    shard: *shard,
                                    log_id: *log_id,
                                    body,
                                };
                                let location = self.place(&record, buffer)?;
                                changes.push(IndexChange::Entry(*shard, location));
                                *record_count += 1;
                            }
                            tentative_last.insert(*shard, entries.last().map(|(id, _)| *id));
                            Ok(())
                        }
                    }
                }
                LaneRequest::TruncateSuffix { shard, after, .. } => {
                    let record = Record {
                        kind: RecordKind::TruncateSuffix,
                        shard: *shard,
                        log_id: *after,
                        body: &[],
                    };
                    self.place(&record, buffer)?;
                    changes.push(IndexChange::Truncate(*shard, *after));
                    tentative_last.insert(*shard, (after.index > 0).then_some(*after));
                    Ok(())
                }
                LaneRequest::PurgePrefix {
                    shard, through_index, ..
                } => {
                    let log_id = LogId {
                        term: 0,
                        index: *through_index,
                    };
                    let record = Record {
                        kind: RecordKind::PurgePrefix,
                        shard: *shard,
                        log_id,
                        body: &[],
                    };
                    self.place(&record, buffer)?;
                    changes.push(IndexChange::Purge(*shard, *through_index));
                    Ok(())
                }
            };
            outcomes.push(outcome);
        }
        if !buffer.is_empty() {
            self.active_file
                .write_all_at(buffer, self.write_offset)
                .map_err(WalError::io)?;
            self.write_offset += buffer.len() as u64;
            buffer.clear();
        }
        self.active_file.sync_data().map_err(WalError::io)
    }

    fn max_record_body(&self) -> usize {
        (self.segment_bytes - SEGMENT_HEADER_BYTES) as usize
            - super::record::FRAME_HEADER_BYTES
            - super::record::PAYLOAD_HEADER_BYTES
    }

    /// Encodes `record` into `buffer`, rotating to a new segment first if it would not fit.
    fn place(&mut self, record: &Record<'_>, buffer: &mut Vec<u8>) -> Result<EntryLocation, WalError> {
        let framed_len = record.framed_len() as u64;
        if self.write_offset + buffer.len() as u64 + framed_len > self.segment_bytes {
            self.rotate(buffer)?;
        }
        let location = EntryLocation {
            log_id: record.log_id,
            segment_no: self.active_segment_no,
            offset: self.write_offset + buffer.len() as u64,
            framed_len: framed_len as u32,
        };
        record.encode_into(buffer);
        Ok(location)
    }

    /// Flushes what the buffer holds into the full segment, makes it durable, and starts the next.
    fn rotate(&mut self, buffer: &mut Vec<u8>) -> Result<(), WalError> {
        if !buffer.is_empty() {
            self.active_file
                .write_all_at(buffer, self.write_offset)
                .map_err(WalError::io)?;
            buffer.clear();
        }
        self.active_file.sync_data().map_err(WalError::io)?;
        let next = self.active_segment_no + 1;
        let file = Arc::new(segment::create_segment(&self.dir, next, self.segment_bytes).map_err(WalError::io)?);
        let mut index = self.index.lock().expect("lane index lock");
        index.segments.insert(
            next,
            SegmentInfo {
                file: file.clone(),
                max_index_by_shard: HashMap::new(),
            },
        );
        index.active_segment = next;
        drop(index);
        self.active_file = file;
        self.active_segment_no = next;
        self.write_offset = SEGMENT_HEADER_BYTES;
        metrics::counter!("fleetlm_wal_segment_rotations_total").increment(1);
        Ok(())
    }
}

fn check_append(
    shard: u16,
    last: Option<LogId>,
    entries: &[(LogId, Vec<u8>)],
    max_body: usize,
) -> Result<(), WalError> {
    let mut expected = last.map(|l| l.index + 1);
    for (log_id, body) in entries {
        if let Some(expected_index) = expected
            && log_id.index != expected_index
        {
            return Err(WalError::NotContiguous {
                shard,
                expected: expected_index,
                got: log_id.index,
            });
        }
        if body.len() > max_body {
            return Err(WalError::EntryTooLarge {
                bytes: body.len(),
                max: max_body,
            });
        }
        expected = Some(log_id.index + 1);
    }
    Ok(())
}
