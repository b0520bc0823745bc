//! Cluster mode: a copy of the shard's state handed from its leader to a member whose own copy is
//! not current (`crate::shard::copy`), so that member holds one again without the archive — and
//! can lead at once if the leader fails next, with the archive down too. The leader's side
//! (`answer_exports`), the follower's (`replica_from_copy`), and whether this member may stand
//! for election at once (`sync_standing`).

use super::roles::REPLICA_CATCH_UP_RETRY;
use super::*;

/// A fetch not answered within this is given up (the next attempt rebuilds from the archive).
pub(super) const COPY_WAIT: Duration = Duration::from_secs(10);
/// A copy waiting for this member's log to reach the index it was taken at is dropped after
/// this (the log is stuck: something else is wrong).
const COPY_PENDING_LIMIT: Duration = Duration::from_secs(30);
/// After a failed fetch the next waits this long, doubling up to `COPY_RETRY_MAX`.
const COPY_RETRY_FIRST: Duration = Duration::from_millis(500);
const COPY_RETRY_MAX: Duration = Duration::from_secs(10);

/// Where a follower's attempt to hold a current copy from its leader's stands.
pub(super) enum CopyStep {
    /// The copy is installed and the log past it replayed: the state is current.
    Installed,
    /// A copy was asked for, or waits for this member's log: try again later (the writer's
    /// retry timer is set).
    Waiting,
    /// No copy can be had now (no other leader known, fetches failing): rebuild otherwise.
    Unavailable,
}

impl ShardWriter {
    /// Whether copies of the state are waiting for the batches in flight to commit (the writer
    /// takes no new command meanwhile, so they do).
    pub(super) fn exports_pending(&self) -> bool {
        self.cluster
            .as_ref()
            .is_some_and(|link| !link.exports_waiting.is_empty())
    }

    /// Leader, no batch in flight: every entry its state holds is committed, so the state is a
    /// copy of the committed log through `applied_index`. Answers the copies asked for.
    pub(super) fn answer_exports(&mut self) {
        let Some(link) = self.cluster.as_mut() else { return };
        if link.exports_waiting.is_empty() {
            return;
        }
        let waiting = std::mem::take(&mut link.exports_waiting);
        let exportable = link.leading_term().is_some()
            && link.replica_current
            && !link.resync
            && link.unsure.is_none()
            && self.rebuild_cause.is_none()
            && self.refusal.is_none();
        if !exportable {
            let leader = link.known_leader(self.shard);
            for reply in waiting {
                let _ = reply.send(Err(ShardError::NotLeader { leader }));
            }
            return;
        }
        let started = Instant::now();
        let copy = ShardCopy::of(self.shard, &self.state, self.last_inserted_at, &self.losses);
        tracing::debug!(
            shard = self.shard,
            through = copy.through,
            sessions = copy.sessions.len(),
            elapsed_us = started.elapsed().as_micros() as u64,
            "copied the shard's state for a replica"
        );
        metrics::counter!("fleetlm_replica_copies_served_total").increment(waiting.len() as u64);
        let copy = Box::new(copy);
        for reply in waiting {
            let _ = reply.send(Ok(copy.clone()));
        }
    }

    /// A fetch this writer asked for ended (`Command::CopyArrived`).
    pub(super) fn on_copy_arrived(&mut self, copy: Result<Box<ShardCopy>, String>) {
        let shard = self.shard;
        let Some(link) = self.cluster.as_mut() else { return };
        let now = tokio::time::Instant::now();
        link.copy.requested_at = None;
        match copy {
            Ok(copy) if copy.shard != shard => {
                tracing::error!(
                    shard,
                    copied = copy.shard,
                    "a copy of another shard's state arrived; dropped"
                );
            }
            Ok(copy) => {
                link.copy.failures = 0;
                link.copy.next_at = None;
                if !link.replica_current && link.role == Role::Follower {
                    link.copy.pending = Some((copy, now));
                }
            }
            Err(reason) => {
                link.copy.failures += 1;
                let delay = (COPY_RETRY_FIRST * 2u32.saturating_pow(link.copy.failures - 1)).min(COPY_RETRY_MAX);
                link.copy.next_at = Some(now + delay);
                metrics::counter!("fleetlm_replica_copy_failures_total").increment(1);
                tracing::debug!(shard, failures = link.copy.failures, %reason, "fetching a copy of the shard's state failed");
            }
        }
        // Whatever came, the replica state is looked at again now.
        link.takeover_retry_at = Some(now);
    }

    /// Follower whose copy is not current: makes it current from a copy of the leader's, asking
    /// for one if none is under way.
    pub(super) async fn replica_from_copy(&mut self) -> CopyStep {
        let shard = self.shard;
        let durable_end = self.wal.last_log_id(shard).map_or(0, |id| id.index);
        let link = self.cluster.as_mut().expect("cluster mode");
        let now = tokio::time::Instant::now();
        if let Some((copy, arrived)) = &link.copy.pending {
            let through = link.applied_through;
            if copy.through > through || durable_end < through {
                // This member's log has not reached the copy yet (or is not indexed through what
                // the feed delivered): the copy's WAL positions are not readable here yet.
                if arrived.elapsed() > COPY_PENDING_LIMIT {
                    link.copy.pending = None;
                    return CopyStep::Unavailable;
                }
                link.takeover_retry_at = Some(now + REPLICA_CATCH_UP_RETRY);
                return CopyStep::Waiting;
            }
            let (copy, _) = link.copy.pending.take().expect("checked");
            let started = Instant::now();
            let copied_through = copy.through;
            return match self.install_copy(*copy, through).await {
                Ok(replayed) => {
                    metrics::counter!("fleetlm_replica_copies_installed_total").increment(1);
                    tracing::info!(
                        shard,
                        copied_through,
                        through,
                        replayed,
                        elapsed_ms = started.elapsed().as_millis() as u64,
                        "the shard's replica state is current again, from a copy of the leader's"
                    );
                    CopyStep::Installed
                }
                Err(reason) => {
                    tracing::warn!(shard, %reason, "a copy of the leader's state could not be installed");
                    self.reset_state(0);
                    CopyStep::Unavailable
                }
            };
        }
        if let Some(asked) = link.copy.requested_at {
            if asked.elapsed() < COPY_WAIT {
                link.takeover_retry_at = Some(asked + COPY_WAIT);
                return CopyStep::Waiting;
            }
            link.copy.requested_at = None;
        }
        if link.copy.next_at.is_some_and(|at| at > now) {
            return CopyStep::Unavailable;
        }
        let leader = link.known_leader(shard);
        let asked = match (&link.copy.requests, leader) {
            (Some(requests), Some(leader)) if leader != link.consensus.node_id() => requests.send(shard).is_ok(),
            _ => false,
        };
        if !asked {
            return CopyStep::Unavailable;
        }
        link.copy.requested_at = Some(now);
        link.takeover_retry_at = Some(now + COPY_WAIT);
        CopyStep::Waiting
    }

    /// Replaces the state with `copy` and replays this member's committed log past it, through
    /// `through`. Nothing is read from the archive: an operation naming a session the copy
    /// lacks (and that does not bring it) means the copy is not what it claims.
    async fn install_copy(&mut self, copy: ShardCopy, through: u64) -> Result<usize, String> {
        if let Some(reason) = self.wal.degraded(self.shard) {
            return Err(format!("this member's log of the shard is degraded: {reason}"));
        }
        let losses = copy.losses();
        let last_inserted_at = copy.last_inserted_at;
        let mut next = copy.through + 1;
        self.writer_state
            .epoch
            .fetch_add(1, std::sync::atomic::Ordering::AcqRel);
        self.state = copy.into_state(Instant::now());
        self.losses = losses;
        self.last_inserted_at = self.last_inserted_at.max(last_inserted_at);
        self.unflushed_bytes = 0;
        let now = Instant::now();
        let mut replayed = 0;
        while next <= through {
            let entries = self.read_log_from(next).await?;
            if entries.first().is_none_or(|(log_id, _)| log_id.index != next) {
                return Err(format!("entry {next} is not in this member's log"));
            }
            for (log_id, body) in entries {
                if log_id.index > through {
                    break;
                }
                for (position, op) in self.entry_ops(&body)?.iter().enumerate() {
                    if !op_brings_its_session(op) && !self.state.sessions.contains_key(op.session_id()) {
                        return Err(format!(
                            "entry {} names session {} the copy does not hold",
                            log_id.index,
                            op.session_id()
                        ));
                    }
                    self.state.apply(op, log_id.index, position as u32, now);
                    if let Op::MessageAppended(record) = op {
                        self.last_inserted_at = self.last_inserted_at.max(record.message.inserted_at.0);
                    }
                    replayed += 1;
                }
                next = log_id.index + 1;
            }
        }
        self.state.applied_index = self.state.applied_index.max(through);
        // Archive reads begun during the replay may predate an eviction it applied.
        self.writer_state
            .epoch
            .fetch_add(1, std::sync::atomic::Ordering::AcqRel);
        self.refuse_while_the_lane_fails();
        match &self.refusal {
            Some(refusal) => return Err(format!("this member's log cannot be written: {refusal}")),
            None => self.writer_state.clear_unavailable(),
        }
        let link = self.cluster.as_mut().expect("cluster mode");
        link.replica_current = true;
        link.takeover_failures = 0;
        Ok(replayed)
    }

    /// Up to 256 of the shard's WAL entries from `from` on (read off the runtime).
    pub(super) async fn read_log_from(&self, from: u64) -> Result<Vec<(LogId, Vec<u8>)>, String> {
        let (wal, shard) = (self.wal.clone(), self.shard);
        tokio::task::spawn_blocking(move || wal.read_entries(shard, from, 256))
            .await
            .map_err(|e| e.to_string())?
            .map_err(|e| e.to_string())
    }

    /// Tells consensus whether this member may lead at once: it leads (or is taking over), or
    /// its copy of the state is current. One that may not stands for election only when no
    /// leader was heard from for a while (`crate::consensus` `STAND_BACK`), so a member that
    /// would write at once wins a failover's election.
    pub(super) fn sync_standing(&mut self) {
        let Some(link) = self.cluster.as_mut() else { return };
        let may_lead = match link.role {
            Role::Leader { .. } | Role::TakingOver { .. } => true,
            Role::Follower => link.replica_current && link.unsure.is_none() && !link.resync,
        };
        if link.standing != Some(may_lead) {
            link.standing = Some(may_lead);
            link.consensus.set_copy_current(self.shard, may_lead);
        }
    }
}

/// Operations that bring their session into the state themselves (the others need it there).
pub(super) fn op_brings_its_session(op: &Op) -> bool {
    matches!(
        op,
        Op::SessionCreated(_) | Op::SessionLoaded { .. } | Op::SessionEvicted { .. }
    )
}
