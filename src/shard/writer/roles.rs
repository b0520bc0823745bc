//! The writer's role changes in its shard's group (cluster mode): following a leadership change,
//! applying the committed log, taking the shard over.

use super::replica_copy::CopyStep;
use super::*;

/// A failed takeover (the archive did not answer) is tried again after this, doubling up to
/// `TAKEOVER_RETRY_MAX`. The second failure in a row also offers the leadership to another
/// member (whose archive connection may be fine); if nobody takes it, this one keeps trying.
/// An attempt that lost a race with the log or the archive moving on is retried at once.
pub(super) const TAKEOVER_RETRY_FIRST: Duration = Duration::from_millis(200);
pub(super) const TAKEOVER_RETRY_MAX: Duration = Duration::from_secs(3);
pub(super) const TAKEOVER_FAILURES_BEFORE_HAND_OVER: u32 = 2;
/// A writer that offered the leadership away for want of the archive does not offer it again
/// within this long: when no member holds a current copy, two of them handing the shard back
/// and forth would only churn elections (seen: hundreds of terms a minute with the archive down);
/// the one elected keeps retrying the archive instead.
pub(super) const HAND_OVER_QUIET: Duration = Duration::from_secs(10);
/// Past the first failures, the leadership is offered again every this many failed attempts (a
/// member with a current copy may have come back meanwhile).
pub(super) const HAND_OVER_EVERY: u32 = 10;
pub(super) const TAKEOVER_RACE_RETRY: Duration = Duration::from_millis(50);
/// One attempt to rebuild from the archive gives up after this.
pub(super) const TAKEOVER_ATTEMPT_LIMIT: Duration = Duration::from_secs(8);
/// A follower's state rebuild that found the log or the archive still moving is tried again after
/// this (at start the feed is still delivering what the node missed).
pub(super) const REPLICA_CATCH_UP_RETRY: Duration = Duration::from_millis(200);

impl ShardWriter {
    /// Cluster mode: follows a leadership change. A writer that loses the shard with batches in
    /// flight rebuilds its state once they have settled (they may never commit); with nothing in
    /// flight its state is all committed and it keeps it, following the new leader's entries.
    /// One that gains it takes over once the feed has caught up.
    pub(super) async fn on_leadership(&mut self, now: crate::consensus::Leadership, idle: bool) {
        let Some(link) = self.cluster.as_mut() else { return };
        let before = link.role;
        let lost = link.on_leadership(now);
        if lost && !idle {
            link.resync = true;
        }
        if before != link.role {
            metrics::gauge!("fleetlm_shard_leader", "shard" => self.shard.to_string())
                .set(if matches!(link.role, Role::Follower) { 0.0 } else { 1.0 });
        }
        self.publish_leading();
        if lost {
            tracing::info!(shard = self.shard, term = now.term, leader = ?now.leader, "no longer leading the shard");
        }
        if idle {
            self.try_take_over().await;
        }
    }

    /// Cluster mode: one committed entry of the shard's log. A member that does not lead applies
    /// it to its copy of the state and publishes its messages to its own listeners.
    pub(super) async fn on_applied(&mut self, applied: crate::consensus::Applied, idle: bool) {
        let Some(link) = self.cluster.as_mut() else { return };
        let leading = link.leading_term().is_some();
        match link.on_applied(applied) {
            Delivered::Reload => {
                if !leading {
                    self.reset_state(0);
                }
            }
            Delivered::Entry {
                index,
                term,
                command,
                publish,
            } => {
                if !leading {
                    self.resolve_unsure(index, term);
                }
                let link = self.cluster.as_mut().expect("cluster mode");
                let to_apply = !leading && link.replica_current && index > self.state.applied_index;
                let to_publish = publish && self.hub.has_session_listeners(self.shard);
                let decoded = match &command {
                    Some(command) if to_apply || to_publish => match ops::decode_entry(command) {
                        Ok(ops) => Some(ops),
                        Err(error) => {
                            tracing::error!(shard = self.shard, index, %error, "undecodable committed entry");
                            None
                        }
                    },
                    _ => None,
                };
                if to_apply {
                    self.apply_committed(index, command.is_some(), decoded.as_deref());
                }
                if to_publish && let Some(ops) = &decoded {
                    for op in ops {
                        if let Op::MessageAppended(record) = op {
                            self.hub.publish_message(record);
                        }
                    }
                }
            }
        }
        if idle {
            self.try_take_over().await;
        }
    }

    /// A former leader learns the outcome of its proposals whose outcome was unknown (`Unsure`)
    /// as the feed delivers their indexes: each in the term it proposed them in, and they
    /// committed (the state, which includes them, is current again); one in another term, and
    /// they were replaced (the state is rebuilt from the archive and the log).
    pub(super) fn resolve_unsure(&mut self, index: u64, term: u64) {
        let Some(link) = self.cluster.as_mut() else { return };
        let Some(unsure) = link.unsure else { return };
        if index < unsure.from {
            return;
        }
        if term == unsure.term && index < unsure.through {
            return;
        }
        if term == unsure.term && index == unsure.through {
            link.unsure = None;
            link.replica_current = true;
            tracing::info!(
                shard = self.shard,
                from = unsure.from,
                through = index,
                "proposals whose outcome was unknown committed; the state is kept"
            );
            return;
        }
        tracing::info!(
            shard = self.shard,
            index,
            term,
            proposed_in = unsure.term,
            "proposals whose outcome was unknown were replaced; the state is rebuilt"
        );
        metrics::counter!("fleetlm_replica_rebuilds_total").increment(1);
        self.reset_state(0);
    }

    /// A follower's fold of committed entry `index` into its copy of the state (`ops`: the
    /// entry's operations; `None` for consensus' own entries, or an entry that did not decode
    /// when `has_command`). An entry the copy cannot take (out of order, undecodable, naming a
    /// session it does not hold) makes it stale: it is made current again in the background
    /// (`build_replica_state`). Nothing here waits: not on the archive, not on a peer.
    pub(super) fn apply_committed(&mut self, index: u64, has_command: bool, ops: Option<&[Op]>) {
        let stale = |reason: &str, writer: &mut ShardWriter| {
            tracing::warn!(
                shard = writer.shard,
                index,
                reason,
                "the shard's replica state is rebuilt from the archive and the log"
            );
            metrics::counter!("fleetlm_replica_rebuilds_total").increment(1);
            writer.reset_state(0);
        };
        if index != self.state.applied_index + 1 {
            return stale("an entry arrived out of order", self);
        }
        let ops = match (has_command, ops) {
            (false, _) => &[][..],
            (true, Some(ops)) => ops,
            (true, None) => return stale("an entry did not decode", self),
        };
        // A session this replica does not hold, named by an operation that does not bring it:
        // one it has not needed since its state was rebuilt from the archive (which rebuilds only
        // sessions with entries past the archive watermark; a copy of the leader's state holds
        // every session the leader does, and the leader logs each one it loads). The copy is not
        // patched from the archive here: the apply path never waits on the archive. It goes
        // stale and is made current again from a copy of the leader's state.
        if ops.iter().any(|op| {
            !matches!(
                op,
                Op::SessionCreated(_) | Op::SessionLoaded { .. } | Op::SessionEvicted { .. }
            ) && !self.state.sessions.contains_key(op.session_id())
        }) {
            return stale("an entry names a session this replica's copy does not hold", self);
        }
        let now = Instant::now();
        let mut evicted = false;
        for (position, op) in ops.iter().enumerate() {
            self.state.apply(op, index, position as u32, now);
            match op {
                Op::MessageAppended(record) => {
                    self.last_inserted_at = self.last_inserted_at.max(record.message.inserted_at.0);
                }
                Op::SessionEvicted { .. } => evicted = true,
                _ => {}
            }
        }
        if evicted {
            // Archive reads begun before may bring the session back stale (`Writer::epoch`).
            self.writer_state
                .epoch
                .fetch_add(1, std::sync::atomic::Ordering::AcqRel);
        }
        self.state.applied_index = index;
    }

    /// Cluster mode, a follower whose copy of the state is not current: rebuilds it from the
    /// archive plus the committed log delivered so far (retried with backoff while the archive
    /// does not answer or the log is still catching up).
    pub(super) async fn build_replica_state(&mut self) {
        let Some(link) = self.cluster.as_mut() else { return };
        if link.replica_current || link.role != Role::Follower || link.resync || link.unsure.is_some() {
            return;
        }
        if link
            .takeover_retry_at
            .is_some_and(|at| at > tokio::time::Instant::now())
        {
            return;
        }
        link.takeover_retry_at = None;
        // From a copy of the leader's state first: no archive read, so it works with the
        // archive down too, and costs the leader one pass over its sessions.
        match self.replica_from_copy().await {
            CopyStep::Installed | CopyStep::Waiting => return,
            CopyStep::Unavailable => {}
        }
        let started = Instant::now();
        let attempt = match tokio::time::timeout(TAKEOVER_ATTEMPT_LIMIT, self.recover_once()).await {
            Ok(outcome) => outcome,
            Err(_) => {
                self.reset_state(0);
                Err(RecoveryError::Retry(format!(
                    "rebuilding from the archive took over {TAKEOVER_ATTEMPT_LIMIT:?}"
                )))
            }
        };
        let degraded = self.refusal.is_some();
        let link = self.cluster.as_mut().expect("cluster mode");
        match attempt {
            Ok(()) if !degraded => {
                link.replica_current = true;
                link.takeover_failures = 0;
                tracing::debug!(
                    shard = self.shard,
                    through = self.state.applied_index,
                    elapsed_ms = started.elapsed().as_millis() as u64,
                    "replica state built"
                );
            }
            Ok(()) => {
                // This replica's log cannot be replayed; it keeps following (and publishing).
                link.takeover_retry_at = Some(tokio::time::Instant::now() + TAKEOVER_RETRY_MAX);
            }
            Err(RecoveryError::Race(_)) => {
                link.takeover_retry_at = Some(tokio::time::Instant::now() + REPLICA_CATCH_UP_RETRY);
            }
            Err(RecoveryError::Retry(reason) | RecoveryError::Fatal(reason) | RecoveryError::Regressed(reason)) => {
                link.takeover_failures += 1;
                let failures = link.takeover_failures;
                let delay = (TAKEOVER_RETRY_FIRST * 2u32.saturating_pow(failures - 1)).min(TAKEOVER_RETRY_MAX);
                link.takeover_retry_at = Some(tokio::time::Instant::now() + delay);
                tracing::debug!(shard = self.shard, failures, %reason, "building the replica state failed; retrying");
            }
        }
    }

    /// Cluster mode: once elected and caught up, rebuilds the state from the archive and the
    /// committed log (as a restart does) and starts writing; then dispatches what the log owes.
    pub(super) async fn try_take_over(&mut self) {
        let Some(link) = self.cluster.as_mut() else { return };
        if link.still_leads_a_term_it_gave_up(self.shard) {
            // The hand-over did not happen (yet): ask again, later again.
            link.takeover_retry_at = None;
            link.consensus.transfer_leadership(self.shard).await;
            link.takeover_retry_at = Some(tokio::time::Instant::now() + TAKEOVER_RETRY_MAX);
            return;
        }
        if link.role == Role::Follower {
            self.build_replica_state().await;
            return;
        }
        link.takeover_retry_at = None;
        link.request_confirmation(self.shard);
        let Some((term, through)) = self
            .cluster
            .as_ref()
            .filter(|link| !link.resync)
            .and_then(ClusterLink::ready_to_take_over)
        else {
            return;
        };
        let started = Instant::now();
        // The state this replica holds is the committed log through `through`: nothing to
        // rebuild. Otherwise (a writer restarted, a snapshot installed) it is rebuilt first,
        // bounded: requests wait on the writer meanwhile, and archive calls can each take seconds.
        let current = self
            .cluster
            .as_ref()
            .is_some_and(|link| link.replica_current && self.state.applied_index == through);
        let attempt = if current {
            Ok(())
        } else {
            match tokio::time::timeout(TAKEOVER_ATTEMPT_LIMIT, self.recover_once()).await {
                Ok(outcome) => outcome,
                Err(_) => {
                    self.reset_state(0);
                    Err(RecoveryError::Retry(format!(
                        "rebuilding from the archive took over {TAKEOVER_ATTEMPT_LIMIT:?}"
                    )))
                }
            }
        };
        if let Err(failure) = attempt {
            let link = self.cluster.as_mut().expect("cluster mode");
            match failure {
                RecoveryError::Race(reason) => {
                    // The log or the archive moved on meanwhile: again, at once.
                    tracing::debug!(shard = self.shard, term, %reason, "taking the shard over again");
                    link.takeover_retry_at = Some(tokio::time::Instant::now() + TAKEOVER_RACE_RETRY);
                }
                RecoveryError::Retry(reason) | RecoveryError::Fatal(reason) | RecoveryError::Regressed(reason) => {
                    // The archive did not answer: requests meanwhile get `no_leader` instead of
                    // waiting on a blocked writer, and another member may do better.
                    link.takeover_failures += 1;
                    let failures = link.takeover_failures;
                    let delay = (TAKEOVER_RETRY_FIRST * 2u32.saturating_pow(failures - 1)).min(TAKEOVER_RETRY_MAX);
                    link.takeover_retry_at = Some(tokio::time::Instant::now() + delay);
                    tracing::warn!(shard = self.shard, term, failures, %reason, "taking the shard over failed; retrying");
                    metrics::counter!("fleetlm_shard_takeover_retries_total").increment(1);
                    // A member whose copy of the state was current would not need the archive:
                    // offer it the leadership at once.
                    let due = failures == TAKEOVER_FAILURES_BEFORE_HAND_OVER
                        || (!current && failures == 1)
                        || failures.is_multiple_of(HAND_OVER_EVERY);
                    let quiet = link.handed_over_at.is_none_or(|at| at.elapsed() >= HAND_OVER_QUIET);
                    if due && quiet {
                        link.handed_over_at = Some(tokio::time::Instant::now());
                        link.consensus.transfer_leadership(self.shard).await;
                    }
                }
            }
            return;
        }
        if let Some(refusal) = &self.refusal {
            // This replica cannot vouch for its log: another member leads better.
            tracing::error!(shard = self.shard, %refusal, "cannot lead the shard; handing its leadership over");
            self.reset_state(0);
            let link = self.cluster.as_mut().expect("cluster mode");
            link.role = Role::Follower;
            link.gave_up_term = Some(term);
            link.consensus.transfer_leadership(self.shard).await;
            link.takeover_retry_at = Some(tokio::time::Instant::now() + TAKEOVER_RETRY_MAX);
            return;
        }
        let now = self
            .cluster
            .as_ref()
            .expect("cluster mode")
            .consensus
            .watch(self.shard)
            .now();
        if !(now.leading && now.term == term) {
            // Leadership moved on meanwhile: the next change decides. The state is the committed
            // log through `through` either way, and stays this replica's copy.
            let link = self.cluster.as_mut().expect("cluster mode");
            link.role = Role::Follower;
            link.replica_current = true;
            link.on_leadership(now);
            return;
        }
        let link = self.cluster.as_mut().expect("cluster mode");
        link.role = Role::Leader { term };
        link.led_term = term;
        link.replica_current = true;
        self.publish_leading();
        let link = self.cluster.as_mut().expect("cluster mode");
        link.published_through = link.published_through.max(through);
        self.state.applied_index = through;
        metrics::counter!("fleetlm_shard_takeovers_total").increment(1);
        tracing::info!(
            shard = self.shard,
            term,
            through,
            rebuilt = !current,
            elapsed_ms = started.elapsed().as_millis() as u64,
            "leading the shard"
        );
        for session in self.state.sessions.values() {
            if session.dispatch.is_pending() && session.status == SessionStatus::Active {
                self.user_messages.user_message(
                    &session.record.id,
                    &session.record.agent_id,
                    session.dispatch.last_user_seq,
                );
            }
        }
        // Turns owed by sessions only the archive holds (flushed before this node led).
        self.user_messages.rescan();
    }
}
