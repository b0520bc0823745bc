//! The flusher: one task per shard that pulls durable log entries past the archive watermark and
//! writes them to the archive, moving the watermark in the same transaction. Then it tells the
//! shard (which may forget archived state) and lets the WAL drop the entries.
//!
//! Architecture invariant: the flusher only reads the WAL; it never learns of records from a
//! queue that would be lost on a crash, so after a restart it resumes at the watermark.

use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::sync::{Notify, mpsc, watch};

use super::{Archive, ArchiveError, FlushRows};
use crate::shard::ops;
use crate::shard::writer::Command;
use crate::wal::Wal;

#[derive(Debug, Clone)]
pub struct FlusherOptions {
    pub interval: Duration,
    /// Entries per archive transaction (each entry holds one shard batch).
    pub max_entries_per_flush: usize,
    pub max_backoff: Duration,
}

pub struct Flusher {
    pub shard: u16,
    pub wal: Arc<Wal>,
    pub archive: Archive,
    pub shard_commands: mpsc::Sender<Command>,
    pub wakeup: Arc<Notify>,
    pub options: FlusherOptions,
}

/// How far the archive is behind this shard's log, in entries and in seconds since it last had
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

impl Flusher {
    /// Runs until `shutdown` turns true, then makes one last attempt to flush everything.
    pub async fn run(self, mut shutdown: watch::Receiver<bool>) {
        // Wait for the shard to finish recovery: it reads the WAL from the same watermark.
        let (ready, recovered) = tokio::sync::oneshot::channel();
        if self
            .shard_commands
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
        let mut watermark = None;
        let mut lag = ArchiveLag {
            shard: self.shard.to_string(),
            behind_since: None,
        };
        let mut backoff = self.options.interval;
        loop {
            if *shutdown.borrow() {
                break;
            }
            tokio::select! {
                _ = tokio::time::sleep(backoff) => {}
                _ = self.wakeup.notified() => {}
                _ = shutdown.changed() => {}
            }
            match self.flush_available(&mut watermark, &mut lag).await {
                Ok(()) => backoff = self.options.interval,
                Err(error) => {
                    metrics::counter!("fleetlm_archive_flush_errors_total").increment(1);
                    tracing::warn!(shard = self.shard, %error, "archive flush failed; will retry");
                    backoff = (backoff * 2).min(self.options.max_backoff);
                }
            }
        }
        if let Err(error) = self.flush_available(&mut watermark, &mut lag).await {
            tracing::warn!(shard = self.shard, %error, "final archive flush failed; the wal keeps the data");
        }
    }

    /// Flushes until the archive has everything the WAL had when it started.
    async fn flush_available(&self, known_watermark: &mut Option<u64>, lag: &mut ArchiveLag) -> Result<(), FlushError> {
        let target = self.wal.last_log_id(self.shard).map_or(0, |id| id.index);
        let watermark = match known_watermark {
            Some(watermark) => watermark,
            None => known_watermark.insert(self.archive.watermark(self.shard).await?),
        };
        lag.observe(target, *watermark);
        while *watermark < target {
            *watermark = self.flush_once(*watermark).await?;
            lag.observe(target, *watermark);
        }
        Ok(())
    }

    async fn flush_once(&self, watermark: u64) -> Result<u64, FlushError> {
        let started = Instant::now();
        let wal = self.wal.clone();
        let (shard, max) = (self.shard, self.options.max_entries_per_flush);
        let entries = tokio::task::spawn_blocking(move || wal.read_entries(shard, watermark + 1, max))
            .await
            .map_err(|e| FlushError::Wal(e.to_string()))?
            .map_err(|e| FlushError::Wal(e.to_string()))?;
        let Some((last_id, _)) = entries.last() else {
            return Ok(watermark);
        };
        let through = last_id.index;
        if entries[0].0.index != watermark + 1 {
            return Err(FlushError::Wal(format!(
                "expected entry {} after the watermark, the wal has {}",
                watermark + 1,
                entries[0].0.index
            )));
        }
        let mut all_ops = Vec::new();
        for (log_id, body) in &entries {
            let ops = ops::decode_entry(body).map_err(|e| FlushError::Wal(format!("entry {}: {e}", log_id.index)))?;
            all_ops.extend(ops);
        }
        let rows = Arc::new(FlushRows::from_ops(all_ops));
        let message_count = rows.messages.len();
        self.archive.flush(self.shard, rows, through).await?;
        metrics::histogram!("fleetlm_archive_flush_seconds").record(started.elapsed().as_secs_f64());
        metrics::counter!("fleetlm_archive_messages_total").increment(message_count as u64);
        let _ = self
            .shard_commands
            .send(Command::Archived { through_index: through })
            .await;
        if let Err(error) = self.wal.purge_prefix(self.shard, through).await {
            tracing::warn!(shard = self.shard, %error, "could not purge archived wal entries");
        }
        Ok(through)
    }
}
