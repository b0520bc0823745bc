//! Rebuilding the state from the durable log (archive + WAL), at start and after a failure.

use super::*;

impl ShardWriter {
    /// Throws away the state (it includes operations that never became durable) and rebuilds it
    /// from the durable log, as at start. Runs once every failed batch has been answered.
    /// `touched`: the sessions the failed batches changed; when they were refused for space
    /// only those are rebuilt.
    pub(super) async fn rebuild(&mut self, touched: HashSet<String>) {
        if self.cluster.is_none()
            && matches!(self.rebuild_cause, Some(ShardError::OutOfSpace(_)))
            && self.wal.lane_failed(self.shard).is_none()
        {
            match self.rebuild_sessions(&touched).await {
                Ok(replayed) => {
                    metrics::counter!("fleetlm_shard_partial_rebuilds_total").increment(1);
                    tracing::info!(
                        shard = self.shard,
                        sessions = touched.len(),
                        replayed,
                        "sessions of writes refused for space rebuilt from the durable log"
                    );
                    self.rebuild_cause = None;
                    return;
                }
                Err(reason) => {
                    tracing::warn!(shard = self.shard, %reason, "rebuilding the refused writes' sessions failed; rebuilding the whole shard");
                }
            }
        }
        metrics::counter!("fleetlm_shard_rebuilds_total").increment(1);
        if let Some(link) = self.cluster.as_mut() {
            // Only the committed log is truth: back to follower (taking over again if this node
            // still leads). The state includes every batch sealed; those that failed may still
            // commit, so the log decides (`Unsure`) whether it is kept. A moved index means the
            // state's WAL positions are off: rebuilt from the archive and the log.
            link.resync = false;
            if let Role::Leader { .. } = link.role {
                link.role = Role::Follower;
            }
            let failed_from = link.failed_from.take();
            let index_moved = std::mem::take(&mut link.index_moved);
            let through = self.state.applied_index;
            self.publish_leading();
            self.rebuild_cause = None;
            let link = self.cluster.as_mut().expect("cluster mode");
            // Entries the feed already delivered: by Raft's log matching, a delivered entry of
            // the term this writer led in means every entry of its up to it committed.
            let delivered_ours = link.applied_term == link.led_term;
            match failed_from {
                _ if index_moved || link.led_term == 0 => self.reset_state(0),
                Some(_) if delivered_ours && link.applied_through >= through => {}
                Some(from) if from <= through && (link.applied_through < from || delivered_ours) => {
                    link.unsure = Some(super::super::replica::Unsure {
                        from: from.max(link.applied_through + 1),
                        through,
                        term: link.led_term,
                    });
                    link.replica_current = false;
                }
                // Every batch in flight committed (leadership was lost meanwhile): the state
                // is the committed log.
                None => {}
                Some(_) => self.reset_state(0),
            }
            return;
        }
        self.recover().await;
        self.rebuild_cause = None;
        if self.refusal.is_none() {
            tracing::info!(
                shard = self.shard,
                "shard rebuilt from its durable log; accepting writes again"
            );
        }
    }

    /// Puts the sessions in `touched` back to what the durable log holds of them: dropped, then
    /// installed from the archive and replayed from the WAL entries past the archive's
    /// watermark that name them (entries that do not are skipped without decoding). Every
    /// other session is left as it is: the failed batches did not change it. Returns the
    /// operations replayed.
    pub(super) async fn rebuild_sessions(&mut self, touched: &HashSet<String>) -> Result<usize, String> {
        // Archive reads begun before this may carry the discarded state: refuse them.
        self.writer_state
            .epoch
            .fetch_add(1, std::sync::atomic::Ordering::AcqRel);
        for session_id in touched {
            self.state.sessions.remove(session_id.as_str());
        }
        let durable_last = self.wal.last_log_id(self.shard).map_or(0, |id| id.index);
        self.state.applied_index = durable_last.max(self.state.archived_index);
        let watermark = self.archive.watermark(self.shard).await.map_err(|e| e.to_string())?;
        // Only entries holding a touched id's bytes are decoded. Both entry formats write an id
        // as its own bytes (format 1 inside quotes, format 2 after its length) unless it needs
        // escaping: then (and for an empty id, which every entry "holds") every entry is decoded.
        let needles: Option<Vec<Vec<u8>>> = touched
            .iter()
            .map(|id| {
                let plain = !id.is_empty() && !id.chars().any(|c| c == '"' || c == '\\' || c.is_control());
                plain.then(|| id.as_bytes().to_vec())
            })
            .collect();
        let mentions_touched = |body: &[u8]| match &needles {
            Some(needles) => needles
                .iter()
                .any(|needle| body.windows(needle.len()).any(|window| window == needle.as_slice())),
            None => true,
        };
        let now = Instant::now();
        let mut replayed = 0;
        let mut next = watermark + 1;
        while next <= durable_last {
            let wal = self.wal.clone();
            let shard = self.shard;
            let entries = tokio::task::spawn_blocking(move || wal.read_entries(shard, next, 256))
                .await
                .map_err(|e| e.to_string())?
                .map_err(|e| e.to_string())?;
            if entries.first().is_none_or(|(log_id, _)| log_id.index != next) {
                return Err(format!("wal entry {next} is missing (archived meanwhile?)"));
            }
            for (log_id, body) in entries {
                if log_id.index > durable_last {
                    break;
                }
                next = log_id.index + 1;
                if !mentions_touched(&body) {
                    continue;
                }
                for (position, op) in self.entry_ops(&body)?.iter().enumerate() {
                    let session_id = op.session_id();
                    if !touched.contains(session_id) {
                        continue;
                    }
                    let brings_its_session = matches!(
                        op,
                        Op::SessionCreated(_) | Op::SessionLoaded { .. } | Op::SessionEvicted { .. }
                    );
                    if !brings_its_session && !self.state.sessions.contains_key(session_id) {
                        match self.archive.load_session(session_id).await.map_err(|e| e.to_string())? {
                            Some(loaded) => self.state.install(loaded, now),
                            None => return Err(format!("session {session_id} is in neither the archive nor the log")),
                        }
                    }
                    self.state.apply(op, log_id.index, position as u32, now);
                    replayed += 1;
                }
            }
        }
        // A flush that committed meanwhile may have changed the sessions loaded above.
        if self.archive.watermark(self.shard).await.map_err(|e| e.to_string())? != watermark {
            return Err("the archive moved during the rebuild".into());
        }
        self.state.applied_index = durable_last.max(self.state.archived_index);
        Ok(replayed)
    }

    /// Rebuilds the state from the archive and the WAL entries past the archive's watermark,
    /// waiting as long as the archive takes to answer (a single node has nothing else to do).
    pub(super) async fn recover(&mut self) {
        let mut backoff = Duration::from_millis(100);
        while let Err(
            RecoveryError::Retry(reason)
            | RecoveryError::Race(reason)
            | RecoveryError::Fatal(reason)
            | RecoveryError::Regressed(reason),
        ) = self.recover_once().await
        {
            tracing::warn!(shard = self.shard, %reason, "shard recovery waits for the archive");
            tokio::time::sleep(backoff).await;
            backoff = (backoff * 2).min(Duration::from_secs(5));
        }
    }

    /// One attempt at `recover`. `Err` when it must be tried again (the archive did not answer,
    /// or moved meanwhile: `Race`); a refusal (storage failure, degraded log) is `Ok`, with
    /// `refusal` set.
    pub(super) async fn recover_once(&mut self) -> Result<(), RecoveryError> {
        let started = Instant::now();
        match self.try_recover().await {
            Ok(replayed) if !self.losses.is_empty() && self.skip_seqs_of_lost_entries().await.is_err() => {
                tracing::error!(
                    shard = self.shard,
                    replayed,
                    "could not record the seqs skipped after an accepted loss"
                );
                self.writer_state
                    .set_unavailable("could not record skipped seqs".into());
                self.refusal = Some(ShardError::StorageFailed("could not record skipped seqs".into()));
                self.refused_for_lane = false;
                Ok(())
            }
            Ok(replayed) => {
                self.refuse_while_the_lane_fails();
                self.writer_state.set_archive_regressed(None);
                match &self.refusal {
                    Some(refusal) => self.writer_state.set_unavailable(refusal.to_string()),
                    None => self.writer_state.clear_unavailable(),
                }
                tracing::debug!(
                    shard = self.shard,
                    replayed,
                    elapsed_ms = started.elapsed().as_millis() as u64,
                    "shard recovered"
                );
                Ok(())
            }
            Err(RecoveryError::Regressed(reason)) => {
                // Nothing is served from a state built on the archive as it is now.
                self.reset_state(0);
                self.refuse_for_regressed_archive(reason);
                Ok(())
            }
            Err(RecoveryError::Fatal(reason)) => {
                tracing::error!(shard = self.shard, %reason, "shard degraded");
                metrics::gauge!("fleetlm_shard_degraded", "shard" => self.shard.to_string()).set(1.0);
                self.writer_state.set_unavailable(reason.clone());
                self.refused_for_lane = false;
                self.refusal = Some(ShardError::Degraded(reason));
                Ok(())
            }
            Err(retry) => {
                self.reset_state(0);
                Err(retry)
            }
        }
    }

    /// Refuses writes while the shard's WAL lane has failed; lifted once it heals
    /// (`lift_healed_lane_refusal`).
    pub(super) fn refuse_while_the_lane_fails(&mut self) {
        self.refusal = self.wal.lane_failed(self.shard).map(ShardError::StorageFailed);
        self.refused_for_lane = self.refusal.is_some();
    }

    /// A lane that failed heals by itself (`wal::lane`, a new segment): the state was rebuilt
    /// from the durable log when the failure was answered, so once the lane writes again the
    /// shard does too. Checked at each turn of the writer's loop, i.e. at its next command.
    pub(super) fn lift_healed_lane_refusal(&mut self) {
        if !self.refused_for_lane || self.wal.lane_failed(self.shard).is_some() {
            return;
        }
        self.refused_for_lane = false;
        if matches!(self.refusal, Some(ShardError::StorageFailed(_))) {
            self.refusal = None;
            self.writer_state.clear_unavailable();
            tracing::info!(
                shard = self.shard,
                "the shard's wal lane healed; the shard takes writes again"
            );
        }
    }

    /// Refuses new seqs because the archive holds less than it was given: a session loaded from
    /// it would hand out acknowledged seqs again. Until an operator decides (`fleetlm archive
    /// accept`, then a restart).
    pub(super) fn refuse_for_regressed_archive(&mut self, reason: String) {
        if self.writer_state.archive_regressed().is_none() {
            tracing::error!(shard = self.shard, %reason, "the archive went back in time; the shard refuses new messages");
        }
        metrics::gauge!("fleetlm_archive_regressed", "shard" => self.shard.to_string()).set(1.0);
        self.writer_state.set_archive_regressed(Some(reason.clone()));
        if !matches!(
            self.refusal,
            Some(ShardError::StorageFailed(_) | ShardError::Degraded(_))
        ) {
            self.refusal = Some(ShardError::ArchiveRegressed(reason));
        }
    }

    /// Losses an operator accepted (`fleetlm wal repair`): every session of the shard not
    /// updated since a loss was recorded may have had messages in the lost entries, so it skips
    /// the seqs they could have held, once. Sessions in memory now; sessions loaded later from
    /// the archive when they are installed (`skip_for_losses_on_install`).
    ///
    /// The skips are written as several entries, each within the WAL's entry limit (one entry
    /// for thousands of sessions would be refused, leaving the shard unavailable for good).
    pub(super) async fn skip_seqs_of_lost_entries(&mut self) -> Result<(), ShardError> {
        let now = Instant::now();
        let mut batch = Batch::new();
        let session_ids: Vec<Arc<str>> = self.state.sessions.keys().cloned().collect();
        for session_id in session_ids {
            self.skip_for_losses(&session_id, &mut batch, now);
            if batch.encoder.len() >= self.entry_soft_limit_bytes {
                self.write_now(std::mem::replace(&mut batch, Batch::new())).await?;
            }
        }
        self.write_now(batch).await
    }

    /// Seals `batch` as one entry and waits until it is durable (nothing else is in flight).
    pub(super) async fn write_now(&mut self, batch: Batch) -> Result<(), ShardError> {
        if batch.ops.is_empty() {
            return Ok(());
        }
        let sealed = self.seal(batch).await;
        let mut in_flight = VecDeque::from([sealed]);
        let outcome = front_durable(&mut in_flight).await;
        let sealed = in_flight.pop_front().expect("one batch");
        self.complete(sealed, outcome.clone());
        if let Some(cause) = self.rebuild_cause.take() {
            tracing::error!(shard = self.shard, %cause, "skipping seqs after an accepted loss failed");
        }
        outcome.map(|_| ())
    }

    /// Adds the skip of every recorded loss the session has not skipped yet to `batch`.
    pub(super) fn skip_for_losses(&mut self, session_id: &Arc<str>, batch: &mut Batch, now: Instant) {
        let Some(session) = self.state.sessions.get(session_id) else {
            return;
        };
        let skip: u64 = self
            .losses
            .iter()
            .filter(|loss| session.updated_at < loss.recorded_at)
            .map(|loss| loss.skip_seqs)
            .sum();
        // Not blocked by the WAL budget (the skip is what makes the session safe to write
        // again); a shard that refuses writes for another reason skips after its rebuild.
        if skip == 0 || self.refusal.is_some() {
            return;
        }
        let from_seq = session.last_seq + 1;
        let op = Op::SeqsSkipped {
            session_id: session_id.to_string(),
            from_seq,
            through_seq: session.last_seq + skip,
            at: self.next_timestamp(),
        };
        tracing::warn!(shard = self.shard, %session_id, from_seq, skip, "skipping seqs that lost log entries may have held");
        if let Err(error) = self.push_op(op, batch, now) {
            tracing::error!(shard = self.shard, %session_id, %error, "could not skip seqs");
        }
    }

    /// The operations a WAL record holds (a cluster member's records carry a consensus tag;
    /// Raft's own entries hold none).
    pub(super) fn entry_ops(&self, body: &[u8]) -> Result<Vec<Op>, String> {
        let command = match &self.cluster {
            None => body,
            Some(_) => match crate::consensus::command_in_record(body)? {
                Some(command) => command,
                None => return Ok(Vec::new()),
            },
        };
        ops::decode_entry(command).map_err(|e| e.to_string())
    }

    pub(super) async fn try_recover(&mut self) -> Result<usize, RecoveryError> {
        // A single node's WAL purges only what a committed flush gave the archive: an archive
        // holding less went back in time, and the purged entries cannot be replayed into it.
        // (A cluster member's log is purged by consensus; there only the flusher's and the
        // loads' checks against watermarks this process saw apply.) The purge mark is read
        // before the watermark: a flush that commits and purges in between then only makes
        // the watermark read higher, never the mark higher than the watermark it was read with.
        let given = match self.cluster {
            None => self.wal.purged(self.shard).map_or(0, |id| id.index),
            Some(_) => 0,
        };
        self.archive.note_given(self.shard, given);
        let watermark = self.archive.watermark(self.shard).await.map_err(|e| match e {
            ArchiveError::Regressed(regressions) => {
                RecoveryError::Regressed(crate::archive::regression::describe(&regressions))
            }
            other => RecoveryError::Retry(other.to_string()),
        })?;
        if watermark < given {
            let regression = crate::archive::regression::Regression {
                shard: self.shard,
                holds: watermark,
                given,
            };
            return Err(RecoveryError::Regressed(regression.to_string()));
        }
        self.reset_state(watermark);
        self.unflushed_bytes = 0;
        // A cluster member replays only the committed log (it waited for the feed to reach it).
        let committed = self.cluster.as_ref().map(|link| link.applied_through);
        let wal_last = committed.unwrap_or_else(|| self.wal.last_log_id(self.shard).map_or(0, |id| id.index));
        let degraded = self.wal.degraded(self.shard);
        let accepted_losses = self.wal.accepted_losses(self.shard);
        // An accepted loss right after the watermark: the log resumes past the lost entries.
        let resumes_after_loss = |first: u64| {
            accepted_losses.iter().any(|loss| {
                loss.after_index <= watermark
                    && loss
                        .resumed_at
                        .is_some_and(|resumed| watermark < resumed && resumed == first)
            })
        };
        if let Some(first) = self.wal.first_index(self.shard)
            && first > watermark + 1
            && !resumes_after_loss(first)
        {
            return Err(RecoveryError::Fatal(format!(
                "wal starts at entry {first} but the archive holds only up to {watermark}"
            )));
        }
        if committed.is_some_and(|committed| committed < watermark) {
            // The archive holds entries this member has not applied yet (it was behind, and
            // is catching up): not damage, just too early.
            return Err(RecoveryError::Race(format!(
                "applied through entry {wal_last}, below the archive watermark {watermark}"
            )));
        }
        if wal_last < watermark && self.wal.first_index(self.shard).is_some() {
            return Err(RecoveryError::Fatal(format!(
                "wal ends at entry {wal_last} below the archive watermark {watermark}"
            )));
        }
        let mut next = watermark + 1;
        let mut replayed = 0;
        let now = Instant::now();
        while next <= wal_last {
            let wal = self.wal.clone();
            let shard = self.shard;
            let entries = tokio::task::spawn_blocking(move || wal.read_entries(shard, next, 256))
                .await
                .map_err(|e| RecoveryError::Fatal(e.to_string()))?
                .map_err(|e| RecoveryError::Fatal(e.to_string()))?;
            if entries.is_empty() {
                break;
            }
            for (log_id, body) in entries {
                if log_id.index > wal_last {
                    break;
                }
                let ops = self.entry_ops(&body).map_err(RecoveryError::Fatal)?;
                for (position, op) in ops.iter().enumerate() {
                    let session_id = op.session_id();
                    let brings_its_session = matches!(
                        op,
                        Op::SessionCreated(_) | Op::SessionLoaded { .. } | Op::SessionEvicted { .. }
                    );
                    if !brings_its_session && !self.state.sessions.contains_key(session_id) {
                        let loaded = self
                            .archive
                            .load_session(session_id)
                            .await
                            .map_err(|e| RecoveryError::Retry(e.to_string()))?;
                        match loaded {
                            Some(loaded) => self.state.install(loaded, now),
                            // Created in entries an operator accepted losing: nothing is known
                            // of it but these later operations, which cannot be applied.
                            None if !accepted_losses.is_empty() => {
                                tracing::error!(
                                    shard = self.shard,
                                    session_id,
                                    log_index = log_id.index,
                                    "operation of a session created in lost log entries is dropped"
                                );
                                continue;
                            }
                            None => {
                                return Err(RecoveryError::Fatal(format!(
                                    "log entry {} names unknown session {session_id}",
                                    log_id.index
                                )));
                            }
                        }
                    }
                    self.state.apply(op, log_id.index, position as u32, now);
                    if let Op::MessageAppended(record) = op {
                        self.last_inserted_at = self.last_inserted_at.max(record.message.inserted_at.0);
                    }
                    replayed += 1;
                }
                self.unflushed_bytes += body.len();
                next = log_id.index + 1;
            }
        }
        if committed.is_some() {
            if next <= wal_last {
                // Committed, but not yet indexed by this node's WAL: wait for it.
                return Err(RecoveryError::Race(format!(
                    "the log is not yet durable here through entry {wal_last}"
                )));
            }
            // A flush that committed meanwhile (a former leader's) may have changed sessions
            // loaded above: their archive rows would already hold replayed operations.
            let now_archived = self
                .archive
                .watermark(self.shard)
                .await
                .map_err(|e| RecoveryError::Retry(e.to_string()))?;
            if now_archived != watermark {
                return Err(RecoveryError::Race("the archive moved during recovery".into()));
            }
        }
        self.state.applied_index = self.state.applied_index.max(wal_last);
        if let Some(reason) = degraded {
            return Err(RecoveryError::Fatal(format!("wal of this shard is degraded: {reason}")));
        }
        for loss in &accepted_losses {
            // Strictly after every replayed write: sessions updated before it skip.
            let recorded_at = crate::model::Timestamp(self.clock.now_micros().max(self.last_inserted_at + 1));
            self.last_inserted_at = recorded_at.0;
            let skip_seqs = loss.lost_bytes / crate::shard::ops::MIN_MESSAGE_OP_BYTES + 1;
            let shard_loss = ShardLoss {
                after_index: loss.after_index,
                skip_seqs,
                recorded_at,
            };
            self.archive
                .record_shard_loss(self.shard, shard_loss)
                .await
                .map_err(|e| RecoveryError::Retry(e.to_string()))?;
        }
        self.losses = self
            .archive
            .shard_losses(self.shard)
            .await
            .map_err(|e| RecoveryError::Retry(e.to_string()))?;
        Ok(replayed)
    }
}

pub(super) enum RecoveryError {
    /// The archive did not answer: try again later.
    Retry(String),
    /// A race with the log or the archive moving on (a former leader's last flush, an entry
    /// not yet durable here): try again at once.
    Race(String),
    Fatal(String),
    /// The archive holds less than it was given (`crate::archive::regression`).
    Regressed(String),
}
