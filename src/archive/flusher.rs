//! The flusher: one task that pulls durable log entries past each shard's archive watermark and
//! writes them to the archive in **one transaction for all shards**, moving every touched shard's
//! watermark in that same transaction. Then it tells each shard (which may forget archived state)
//! and lets the WAL drop the entries.
//!
//! One transaction per cycle rather than one per shard: each archive commit costs at least one
//! fsync, and 64 shards committing separately every 300 ms competed with the WAL lanes for the
//! disk (docs/BENCHMARKS.md measures it).
//!
//! A shard whose entries cannot be read or decoded is set aside (`SetAside`): what came before
//! the bad entry is archived, the shard is retried with its own backoff, and every other shard
//! keeps flushing in the same cycles. The WAL is told (`Wal::set_archive_stalled`), so the
//! segments only it keeps do not count against the other shards' budget, and `/health/ready`
//! names it.
//!
//! Architecture invariant: the flusher only reads the WAL; it never learns of records from a
//! queue that would be lost on a crash, so after a restart it resumes at the watermarks.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use tokio::sync::{Notify, mpsc, watch};

use super::{Archive, ArchiveError, FlushRows};
use crate::shard::ops;
use crate::shard::writer::Command;
use crate::wal::{EntryRange, RangeRead, Wal};

#[derive(Debug, Clone)]
pub struct FlusherOptions {
    pub interval: Duration,
    /// Entries read per shard per transaction (each entry holds one shard batch).
    pub max_entries_per_shard: usize,
    pub max_backoff: Duration,
}

pub struct Flusher {
    pub wal: Arc<Wal>,
    pub archive: Archive,
    /// Each shard writer's queue, by shard.
    pub shard_commands: Vec<mpsc::Sender<Command>>,
    /// Woken by a shard writer whose unflushed bytes passed the threshold.
    pub wakeup: Arc<Notify>,
    pub options: FlusherOptions,
    /// Cluster mode: only the shards this member leads are flushed, only as far as committed
    /// and applied; the log is purged by consensus (as far as `archived_through` allows), not
    /// here.
    pub cluster: Option<FlushCluster>,
}

/// What the flusher of a cluster member needs.
pub struct FlushCluster {
    pub consensus: Arc<crate::consensus::Consensus>,
    /// Per shard: the log index through which the shared archive holds everything, for
    /// consensus (snapshots, and so log purges, never pass it).
    pub archived_through: Vec<Arc<AtomicU64>>,
    /// Per shard: whether its writer here leads and writes (a writer still taking over rebuilds
    /// from the archive: this node must not move it meanwhile).
    pub writers: Vec<Arc<crate::shard::Writer>>,
}

/// How often a cluster member re-reads the watermarks of shards it does not lead (another
/// member flushes them).
const FOLLOWER_WATERMARK_REFRESH: Duration = Duration::from_secs(2);

/// How far the archive is behind one shard's log, in entries and in seconds since it last had
/// everything.
struct ArchiveLag {
    shard: String,
    behind_since: Option<Instant>,
}

impl ArchiveLag {
    fn observe(&mut self, target: u64, watermark: u64) {
        let behind = target.saturating_sub(watermark);
        let since = match (behind, self.behind_since) {
            (0, _) => None,
            (_, Some(since)) => Some(since),
            (_, None) => Some(Instant::now()),
        };
        self.behind_since = since;
        let seconds = since.map_or(0.0, |since| since.elapsed().as_secs_f64());
        metrics::gauge!("fleetlm_archive_lag_entries", "shard" => self.shard.clone()).set(behind as f64);
        metrics::gauge!("fleetlm_archive_lag_seconds", "shard" => self.shard.clone()).set(seconds);
    }
}

#[derive(Debug, thiserror::Error)]
enum FlushError {
    #[error(transparent)]
    Archive(#[from] ArchiveError),
    #[error("wal: {0}")]
    Wal(String),
}

/// What the flusher knows per shard.
struct ShardProgress {
    watermark: Option<u64>,
    lag: ArchiveLag,
    /// Set while the shard's entries cannot be read or decoded.
    set_aside: Option<SetAside>,
    /// The archive went back in time for this shard: not flushed until an operator decides
    /// (the writer refuses new seqs meanwhile).
    regressed: bool,
}

impl ShardProgress {
    fn all(shards: usize) -> Vec<ShardProgress> {
        (0..shards)
            .map(|shard| ShardProgress {
                watermark: None,
                lag: ArchiveLag {
                    shard: shard.to_string(),
                    behind_since: None,
                },
                set_aside: None,
                regressed: false,
            })
            .collect()
    }
}

/// A shard the flusher could not read or decode: left out of the cycles until `retry_at`.
struct SetAside {
    /// When it last failed: it is not tried again in the same `flush_available`.
    failed_at: Instant,
    retry_at: Instant,
    backoff: Duration,
    failures: u64,
}

/// Why one shard's next entries cannot be archived now.
#[derive(Debug, Clone)]
struct ShardFailure {
    shard: u16,
    /// The first entry that could not be archived.
    index: u64,
    /// `(segment, offset)` of that entry in its lane, when the WAL knows it.
    position: Option<(u64, u64)>,
    reason: String,
}

impl ShardFailure {
    fn describe(&self) -> String {
        match self.position {
            Some((segment, offset)) => format!(
                "the archive cannot take entry {} (wal segment {segment} offset {offset}): {}",
                self.index, self.reason
            ),
            None => format!("the archive cannot take entry {}: {}", self.index, self.reason),
        }
    }
}

impl Flusher {
    /// Runs until `shutdown` turns true, then makes one last attempt to flush everything.
    pub async fn run(self, mut shutdown: watch::Receiver<bool>) {
        // Wait for every shard to finish recovery: each reads the WAL from its watermark.
        for sender in &self.shard_commands {
            let (ready, recovered) = tokio::sync::oneshot::channel();
            if sender
                .send(Command::Overlay {
                    session_ids: Vec::new(),
                    reply: ready,
                })
                .await
                .is_err()
            {
                return;
            }
            let _ = recovered.await;
        }
        let mut progress = ShardProgress::all(self.shard_commands.len());
        let mut backoff = self.options.interval;
        let mut refreshed_at = Instant::now();
        loop {
            if *shutdown.borrow() {
                break;
            }
            if self.cluster.is_some() && refreshed_at.elapsed() >= FOLLOWER_WATERMARK_REFRESH {
                refreshed_at = Instant::now();
                self.refresh_followed_watermarks(&mut progress).await;
            }
            tokio::select! {
                _ = tokio::time::sleep(backoff) => {}
                _ = self.wakeup.notified() => {}
                _ = shutdown.changed() => {}
            }
            match self.flush_available(&mut progress).await {
                Ok(()) => backoff = self.options.interval,
                Err(FlushError::Archive(ArchiveError::Regressed(regressions))) => {
                    self.stop_flushing_regressed(&regressions, &mut progress).await;
                }
                Err(FlushError::Archive(ArchiveError::Conflict)) => {
                    // Another member flushed these shards meanwhile (a former leader): start
                    // again from the archive's watermarks.
                    tracing::info!("the archive's watermarks moved under this flush; re-reading them");
                    for state in progress.iter_mut() {
                        state.watermark = None;
                    }
                }
                Err(error) => {
                    metrics::counter!("fleetlm_archive_flush_errors_total").increment(1);
                    tracing::warn!(%error, "archive flush failed; will retry");
                    if self.cluster.is_some() && matches!(error, FlushError::Wal(_)) {
                        // A member whose log was replaced by a snapshot (and purged past its end)
                        // may have taken over with a watermark cached from before: re-read them.
                        for state in progress.iter_mut() {
                            state.watermark = None;
                        }
                    }
                    backoff = (backoff * 2).min(self.options.max_backoff);
                }
            }
        }
        if let Err(error) = self.flush_available(&mut progress).await {
            tracing::warn!(%error, "final archive flush failed; the wal keeps the data");
        }
    }

    /// Flushes until the archive has everything the WAL had when it started.
    async fn flush_available(&self, progress: &mut [ShardProgress]) -> Result<(), FlushError> {
        let targets: Vec<u64> = (0..progress.len()).map(|shard| self.target(shard as u16)).collect();
        for (shard, state) in progress.iter_mut().enumerate() {
            if targets[shard] == 0 || state.regressed {
                continue;
            }
            if state.watermark.is_none() {
                state.watermark = Some(self.archive.watermark(shard as u16).await?);
            }
            state.lag.observe(targets[shard], state.watermark.unwrap_or_default());
        }
        for (shard, state) in progress.iter_mut().enumerate() {
            // Nothing left to take from the shard here: it is not (or no longer) stalled — a
            // cluster member that stopped leading a set-aside shard, or a mark an earlier run of
            // the flusher left in the WAL.
            if state.watermark.unwrap_or_default() >= targets[shard] {
                self.resume(shard as u16, state);
            }
        }
        let started = Instant::now();
        loop {
            let now = Instant::now();
            let behind: Vec<u16> = (0..progress.len())
                .filter(|shard| !progress[*shard].regressed)
                .filter(|shard| progress[*shard].watermark.unwrap_or_default() < targets[*shard])
                .filter(|shard| {
                    progress[*shard]
                        .set_aside
                        .as_ref()
                        .is_none_or(|aside| aside.retry_at <= now && aside.failed_at < started)
                })
                .map(|shard| shard as u16)
                .collect();
            if behind.is_empty() {
                return Ok(());
            }
            self.flush_once(&behind, &targets, progress).await?;
            for shard in behind {
                let state = &mut progress[shard as usize];
                state
                    .lag
                    .observe(targets[shard as usize], state.watermark.unwrap_or_default());
            }
        }
    }

    /// The archive went back in time for these shards (their watermark is below what this
    /// node gave it): flushing them would move the watermark over the hole, so they are left
    /// alone, and their writers refuse new seqs, until an operator decides.
    async fn stop_flushing_regressed(
        &self,
        regressions: &[super::regression::Regression],
        progress: &mut [ShardProgress],
    ) {
        for regression in regressions {
            let Some(state) = progress.get_mut(regression.shard as usize) else {
                continue;
            };
            if !state.regressed {
                tracing::error!(shard = regression.shard, reason = %regression, "the archive went back in time; no longer flushing the shard");
            }
            state.regressed = true;
            let _ = self.shard_commands[regression.shard as usize]
                .send(Command::ArchiveRegressed {
                    reason: regression.to_string(),
                })
                .await;
        }
    }

    /// How far this node flushes a shard now: a single node, everything its WAL holds; a cluster
    /// member, what it has applied of a shard it leads and holds the lease of (nothing of the
    /// others: a leader cut off from the quorum may already have been replaced).
    fn target(&self, shard: u16) -> u64 {
        let wal_last = self.wal.last_log_id(shard).map_or(0, |id| id.index);
        match &self.cluster {
            None => wal_last,
            Some(cluster) if !cluster.writers[shard as usize].leading.load(Ordering::Acquire) => 0,
            Some(cluster) if cluster.consensus.lease(shard).is_none() => 0,
            Some(cluster) => cluster
                .consensus
                .applied_if_leading(shard)
                .map_or(0, |applied| applied.min(wal_last)),
        }
    }

    /// Cluster mode: learns the watermarks other members moved, for the shards this member
    /// does not lead, and tells consensus and the shard's writer (its copy of the state) how far
    /// the archive reaches.
    async fn refresh_followed_watermarks(&self, progress: &mut [ShardProgress]) {
        let Some(cluster) = &self.cluster else { return };
        for (shard, state) in progress.iter_mut().enumerate() {
            if cluster.consensus.is_leader(shard as u16) {
                continue;
            }
            match self.archive.watermark(shard as u16).await {
                Ok(watermark) => {
                    if state.watermark != Some(watermark) {
                        // The writer's copy of the state forgets what the archive now holds
                        // (a full queue: told at the next refresh).
                        let _ = self.shard_commands[shard].try_send(Command::Archived {
                            through_index: watermark,
                        });
                    }
                    state.watermark = Some(watermark);
                    cluster.archived_through[shard].fetch_max(watermark, Ordering::AcqRel);
                }
                Err(error) => {
                    tracing::debug!(shard, %error, "could not read the archive watermark");
                    return;
                }
            }
        }
    }

    /// Leaves a shard out of the next cycles (doubling its own backoff), and says so: a log
    /// line naming the shard and the entry, a metric, the WAL (budget) and `/health/ready`.
    fn set_aside(&self, failure: &ShardFailure, state: &mut ShardProgress) {
        let shard = failure.shard;
        let backoff = state
            .set_aside
            .as_ref()
            .map_or(self.options.interval, |aside| aside.backoff * 2)
            .min(self.options.max_backoff)
            .max(Duration::from_millis(1));
        let failures = state.set_aside.as_ref().map_or(0, |aside| aside.failures) + 1;
        let description = failure.describe();
        metrics::counter!("fleetlm_archive_shard_failures_total", "shard" => shard.to_string()).increment(1);
        metrics::gauge!("fleetlm_archive_shard_stalled", "shard" => shard.to_string()).set(1.0);
        let (segment, offset) = failure.position.unzip();
        if failures == 1 {
            tracing::error!(
                shard,
                entry = failure.index,
                segment,
                offset,
                reason = %failure.reason,
                "the archive cannot take this shard's wal entries; the shard is set aside and retried, the others keep flushing"
            );
        } else {
            tracing::warn!(
                shard,
                entry = failure.index,
                segment,
                offset,
                failures,
                retry_in_ms = backoff.as_millis() as u64,
                reason = %failure.reason,
                "archiving this shard failed again"
            );
        }
        self.wal.set_archive_stalled(shard, Some(description));
        if self.cluster.is_some() {
            // A member whose log was replaced by a snapshot may hold a stale watermark: re-read.
            state.watermark = None;
        }
        let now = Instant::now();
        state.set_aside = Some(SetAside {
            failed_at: now,
            retry_at: now + backoff,
            backoff,
            failures,
        });
    }

    /// A set-aside shard flushes again (or is no longer this member's to flush). Also clears a
    /// mark left in the WAL by an earlier run of the flusher (restarted since).
    fn resume(&self, shard: u16, state: &mut ShardProgress) {
        let aside = state.set_aside.take();
        if aside.is_none() && self.wal.archive_stalled(shard).is_none() {
            return;
        }
        let failures = aside.map_or(0, |aside| aside.failures);
        tracing::info!(shard, failures, "archiving this shard resumed");
        metrics::gauge!("fleetlm_archive_shard_stalled", "shard" => shard.to_string()).set(0.0);
        self.wal.set_archive_stalled(shard, None);
    }

    /// One archive transaction: the next entries of every shard in `shards`, never past its
    /// target (a cluster leader's WAL also holds entries not committed yet, which may never be).
    async fn flush_once(
        &self,
        shards: &[u16],
        targets: &[u64],
        progress: &mut [ShardProgress],
    ) -> Result<(), FlushError> {
        let started = Instant::now();
        let ranges: Vec<EntryRange> = shards
            .iter()
            .map(|&shard| {
                let watermark = progress[shard as usize].watermark.unwrap_or_default();
                let up_to_target = targets[shard as usize].saturating_sub(watermark);
                EntryRange {
                    shard,
                    from_index: watermark + 1,
                    max_entries: self.options.max_entries_per_shard.min(up_to_target as usize),
                }
            })
            .collect();
        // Reading, decoding and sorting into rows is CPU work on the scale of a cycle's traffic:
        // it runs on the low-priority background thread, not on a runtime worker that sockets
        // are waiting on.
        let wal = self.wal.clone();
        let tagged = self.cluster.is_some();
        let collected = crate::background::run(move || collect_rows(&wal, &ranges, tagged))
            .await
            .map_err(FlushError::Wal)?;
        let Collected {
            rows,
            watermarks,
            failures,
        } = collected;
        for failure in &failures {
            self.set_aside(failure, &mut progress[failure.shard as usize]);
        }
        if watermarks.is_empty() {
            return Ok(());
        }
        let rows = Arc::new(rows);
        let message_count = rows.messages.len();
        match self.archive.flush(rows.clone(), watermarks.clone()).await {
            Ok(()) => {}
            Err(ArchiveError::Rejected(error)) => {
                // One bad row must not stop everything: write the rows one by one and set the
                // refused ones aside (with the archive's error) in the same transaction.
                tracing::warn!(%error, "the archive refused a flush; isolating the refused rows");
                let dead = self.archive.flush_isolating(rows, watermarks.clone()).await?;
                for letter in &dead {
                    metrics::counter!("fleetlm_archive_dead_letters_total", "kind" => letter.kind.clone()).increment(1);
                    tracing::error!(
                        id = %letter.id,
                        kind = %letter.kind,
                        session_id = %letter.session_id,
                        seq = ?letter.seq,
                        error = %letter.error,
                        "archive refused a row; it is set aside as a dead letter (GET /api/admin/dead_letters)"
                    );
                }
            }
            Err(other) => return Err(other.into()),
        }
        metrics::histogram!("fleetlm_archive_flush_seconds").record(started.elapsed().as_secs_f64());
        metrics::counter!("fleetlm_archive_messages_total").increment(message_count as u64);
        for &(shard, through) in &watermarks {
            progress[shard as usize].watermark = Some(through);
            if !failures.iter().any(|failure| failure.shard == shard) {
                self.resume(shard, &mut progress[shard as usize]);
            }
            let _ = self.shard_commands[shard as usize]
                .send(Command::Archived { through_index: through })
                .await;
        }
        if let Some(cluster) = &self.cluster {
            // Consensus drops the log as far as the archive reaches (its snapshots).
            for &(shard, through) in &watermarks {
                cluster.archived_through[shard as usize].fetch_max(through, Ordering::AcqRel);
            }
            return Ok(());
        }
        // All purges at once, so they share the lanes' next fsyncs instead of one each.
        let purges = watermarks
            .iter()
            .map(|&(shard, through)| async move { (shard, self.wal.purge_prefix(shard, through).await) });
        for (shard, outcome) in futures_util::future::join_all(purges).await {
            if let Err(error) = outcome {
                tracing::warn!(shard, %error, "could not purge archived wal entries");
            }
        }
        Ok(())
    }
}

/// One cycle's rows, per shard the log index they reach, and the shards that failed.
struct Collected {
    rows: FlushRows,
    watermarks: Vec<(u16, u64)>,
    failures: Vec<ShardFailure>,
}

/// The rows for the entries of `ranges` and each shard's new watermark. A shard whose entries
/// cannot be read or decoded contributes what came before the bad entry and is named in
/// `failures`; the others are not affected. Blocking (reads the WAL).
fn collect_rows(wal: &Wal, ranges: &[EntryRange], tagged: bool) -> Collected {
    let reads = wal.read_ranges_each(ranges);
    let nothing_read = reads
        .iter()
        .all(|read| read.entries.is_empty() && read.failure.is_none());
    let entry_count = reads.iter().map(|read| read.entries.len()).sum::<usize>();
    // Each entry holds a shard batch (often several operations): a first guess saves most regrowth.
    let mut all_ops = Vec::with_capacity(entry_count * 4);
    let mut watermarks = Vec::new();
    let mut failures = Vec::new();
    for (range, read) in ranges.iter().zip(reads) {
        if nothing_read {
            // The byte budget always lets the first range's first entry through: no range
            // has the entries its shard's log end promises.
            failures.push(ShardFailure {
                shard: range.shard,
                index: range.from_index,
                position: None,
                reason: "the entry is not in the wal".into(),
            });
            continue;
        }
        let shard_ops = shard_ops(wal, range, read, tagged);
        if let Some(through) = shard_ops.through {
            watermarks.push((range.shard, through));
            all_ops.extend(shard_ops.ops);
        }
        failures.extend(shard_ops.failure);
    }
    Collected {
        rows: FlushRows::from_ops(all_ops),
        watermarks,
        failures,
    }
}

/// One shard's part of a cycle: the operations of its entries up to the first that cannot be
/// read or decoded, the index they reach, and that failure.
struct ShardOps {
    ops: Vec<ops::Op>,
    through: Option<u64>,
    failure: Option<ShardFailure>,
}

fn shard_ops(wal: &Wal, range: &EntryRange, read: RangeRead, tagged: bool) -> ShardOps {
    let shard = range.shard;
    let mut taken = ShardOps {
        ops: Vec::new(),
        through: None,
        failure: read.failure.map(|failure| ShardFailure {
            shard,
            index: failure.index,
            position: Some((failure.segment_no, failure.offset)),
            reason: failure.error.to_string(),
        }),
    };
    let entries = read.entries;
    let Some((first, _)) = entries.first() else {
        return taken;
    };
    let resumes_after_loss = wal
        .accepted_losses(shard)
        .iter()
        .any(|loss| loss.after_index < range.from_index && loss.resumed_at == Some(first.index));
    if first.index != range.from_index && !resumes_after_loss {
        taken.failure = Some(ShardFailure {
            shard,
            index: range.from_index,
            position: None,
            reason: format!("the wal's next entry is {}", first.index),
        });
        return taken;
    }
    for (log_id, body) in &entries {
        let command = match tagged {
            // A cluster member's records carry a consensus tag; Raft's own hold no operations.
            true => match crate::consensus::command_in_record(body) {
                Ok(Some(command)) => Some(command),
                Ok(None) => None,
                Err(error) => {
                    taken.failure = Some(undecodable(shard, log_id.index, error.to_string()));
                    return taken;
                }
            },
            false => Some(&body[..]),
        };
        if let Some(command) = command {
            match ops::decode_entry(command) {
                Ok(ops) => taken.ops.extend(ops),
                Err(error) => {
                    taken.failure = Some(undecodable(shard, log_id.index, error.to_string()));
                    return taken;
                }
            }
        }
        taken.through = Some(log_id.index);
    }
    taken
}

fn undecodable(shard: u16, index: u64, error: String) -> ShardFailure {
    ShardFailure {
        shard,
        index,
        position: None,
        reason: format!("the entry cannot be decoded: {error}"),
    }
}

#[cfg(test)]
mod tests;
