//! The shard writer: one task per shard, the only writer of its sessions.
//!
//! It takes every queued command at once, validates each against the state, assigns `seq`, `id`
//! and `inserted_at`, applies the resulting operations, hands them to the WAL as one log entry,
//! and answers once that entry is fsync'd. While one entry is being fsync'd the next batch may be
//! sealed (at most `MAX_BATCHES_IN_FLIGHT`); batches are answered strictly in order. Answers
//! (reads included) are never sent before the entry that the state reflects is durable.
//!
//! No phantom state: operations are applied when a batch is sealed (the next batch validates
//! against them), so if an entry fails to become durable, that batch and every batch sealed
//! after it are answered with the error, nothing of them is published, and the writer rebuilds
//! its state from the durable log (archive + WAL, as at start) before it takes another command.
//! A failure is rare and the rebuild costs one replay of the shard's unarchived entries; the
//! happy path pays nothing for it. A write refused for space (a full disk can refuse every
//! write for a while) rebuilds only the sessions the refused batches touched
//! (`rebuild_sessions`): the other sessions' state is durable as it is.

use std::collections::{HashMap, HashSet, VecDeque};
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::sync::{mpsc, oneshot};

use super::ops::{self, EntryEncoder, Op};
use super::replica::{ClusterLink, Role};
use super::session::SessionState;
use super::state::ShardState;
use super::{AppendOutcome, AppendRequest, OrderTicket, ReadPlan, ShardError, Writer};
use crate::archive::{Archive, ArchiveError, LoadedSession, ShardLoss};
use crate::clock::Clock;
use crate::ids;
use crate::model::{MessageRecord, ReadCursor, SessionRecord, SessionStatus, SessionView};
use crate::wal::{LogId, Wal, WalError};

#[path = "dispatch_ops.rs"]
mod dispatch_ops;

/// Operations' room a shard keeps between batches (a burst's larger batch is given back).
const MAX_RETAINED_BATCH_OPS: usize = 1024;
/// Entries one shard may have waiting for their fsync. Two let the next batch join the lane's
/// next fsync while the current one runs, instead of waiting a whole fsync to be sealed.
const MAX_BATCHES_IN_FLIGHT: usize = 2;

/// A failed takeover (the archive did not answer) is tried again after this, doubling up to
/// `TAKEOVER_RETRY_MAX`. The second failure in a row also offers the leadership to another
/// member (whose archive connection may be fine); if nobody takes it, this one keeps trying.
/// An attempt that lost a race with the log or the archive moving on is retried at once.
const TAKEOVER_RETRY_FIRST: Duration = Duration::from_millis(200);
const TAKEOVER_RETRY_MAX: Duration = Duration::from_secs(3);
const TAKEOVER_FAILURES_BEFORE_HAND_OVER: u32 = 2;
const TAKEOVER_RACE_RETRY: Duration = Duration::from_millis(50);
/// One attempt to rebuild from the archive gives up after this.
const TAKEOVER_ATTEMPT_LIMIT: Duration = Duration::from_secs(8);

/// Resolves with the log index of a sealed batch's entry once it is durable (single node:
/// fsync'd; cluster: committed), or with why it is not.
type Durable = Pin<Box<dyn Future<Output = Result<u64, ShardError>> + Send>>;

/// Waits for the oldest sealed batch to be durable (at once for a batch without operations).
async fn front_durable(in_flight: &mut VecDeque<Sealed>) -> Result<u64, ShardError> {
    match in_flight.front_mut() {
        Some(Sealed {
            durable: Some(durable), ..
        }) => durable.await,
        Some(sealed) => Ok(sealed.log_index),
        None => Ok(0),
    }
}

/// A cluster member's shard feed: the committed log, and who leads.
pub struct ClusterFeed {
    pub applied: mpsc::Receiver<crate::consensus::Applied>,
    pub watch: crate::consensus::LeadershipWatch,
    /// How far the feed has delivered: a writer restarted after a panic continues from here
    /// (the feed does not deliver again what the failed writer took).
    pub progress: FeedProgress,
}

/// What a writer has taken from its cluster feed (`ClusterLink`'s copy, kept across restarts).
#[derive(Debug, Default, Clone, Copy)]
pub struct FeedProgress {
    applied_through: u64,
    applied_term: u64,
    published_through: u64,
}

impl FeedProgress {
    fn save(&mut self, link: &ClusterLink) {
        self.applied_through = link.applied_through;
        self.applied_term = link.applied_term;
        self.published_through = link.published_through;
    }

    fn restore(&self, link: &mut ClusterLink) {
        link.applied_through = self.applied_through;
        link.applied_term = self.applied_term;
        link.published_through = self.published_through;
    }
}

type Reply<T> = oneshot::Sender<Result<T, ShardError>>;

pub enum Command {
    Create {
        session: SessionRecord,
        /// The archive had no such session, as read at this writer epoch (`Writer::epoch`).
        known_absent: Option<u64>,
        reply: Reply<SessionView>,
    },
    Append {
        request: Box<AppendRequest>,
        /// One of a stream of appends to be stored in the order sent (a socket's sends).
        order: Option<OrderTicket>,
        reply: Reply<AppendOutcome>,
    },
    Archive {
        session_id: String,
        reply: Reply<SessionView>,
    },
    MoveReadCursor {
        session_id: String,
        user_id: String,
        read_seq: u64,
        known: Option<ReadCursor>,
        reply: Reply<SessionView>,
    },
    View {
        session_id: String,
        reply: Reply<SessionView>,
    },
    PlanRead {
        session_id: String,
        after_seq: u64,
        limit: usize,
        reply: Reply<ReadPlan>,
    },
    Overlay {
        session_ids: Vec<Arc<str>>,
        reply: oneshot::Sender<Vec<Option<SessionView>>>,
    },
    Install {
        loaded: Box<LoadedSession>,
        /// The writer's epoch from before the archive read (`Writer::epoch`).
        epoch: u64,
    },
    Archived {
        through_index: u64,
    },
    Sweep {
        idle_for: Duration,
    },
    /// Records the end of a dispatch (see `Op::DispatchFinished`).
    FinishDispatch {
        session_id: String,
        dispatch_id: String,
        through_seq: u64,
        error: Option<String>,
        cancelled: bool,
        /// Write it only if the log still owes a reply for a user message up to `through_seq`
        /// (a cancel of a turn no dispatch is running for); answers whether it was written.
        only_if_owed: bool,
        /// Cluster: the leadership term the dispatch ran under (refused after it).
        leader_term: Option<u64>,
        reply: Reply<bool>,
    },
    /// Records the start of a dispatch's turn before the agent is called (see
    /// `Op::DispatchStarted`); answers the session's open turn (this one, or one started
    /// before), or `None` if nothing is owed.
    StartDispatch {
        session_id: String,
        turn: crate::model::OpenTurn,
        /// Cluster: the leadership term the dispatch runs under (refused after it).
        leader_term: Option<u64>,
        reply: Reply<Option<crate::model::OpenTurn>>,
    },
    /// Sessions in memory that owe a reply: `(session_id, agent_id, last_user_seq)`.
    PendingDispatches {
        reply: oneshot::Sender<Vec<(Arc<str>, String, u64)>>,
    },
    /// The archive went back in time (found by the flusher or a session load): refuse new
    /// seqs until an operator decides.
    ArchiveRegressed {
        reason: String,
    },
}

type DeferredReply = Box<dyn FnOnce(Option<&ShardError>) + Send>;

fn defer<T: Send + 'static>(reply: Reply<T>, result: Result<T, ShardError>) -> DeferredReply {
    Box::new(move |failure| {
        let result = match failure {
            Some(error) if result.is_ok() => Err(error.clone()),
            _ => result,
        };
        let _ = reply.send(result);
    })
}

pub struct ShardWriter {
    pub shard: u16,
    pub wal: Arc<Wal>,
    pub archive: Archive,
    pub clock: Arc<dyn Clock>,
    pub state: ShardState,
    /// Why this shard refuses writes, if it does (degraded WAL, failed fsync, failed recovery).
    pub refusal: Option<ShardError>,
    /// Set when an entry failed to become durable: the error every batch sealed before the
    /// rebuild is answered with.
    pub rebuild_cause: Option<ShardError>,
    /// Losses of this shard's log an operator accepted, as the archive remembers them.
    pub losses: Vec<ShardLoss>,
    /// Bytes one operation may take in an entry (half the WAL's entry limit, so a batch below
    /// its soft limit always has room for one more).
    pub max_op_bytes: usize,
    pub last_inserted_at: i64,
    pub flush_wakeup: Arc<tokio::sync::Notify>,
    pub flush_threshold_bytes: usize,
    pub unflushed_bytes: usize,
    pub wal_budget_bytes: u64,
    /// Stop taking commands into one entry once its operations reach this size (half the WAL
    /// batch limit, so one more message always fits).
    pub entry_soft_limit_bytes: usize,
    pub writer_state: Arc<Writer>,
    pub hub: Arc<crate::hub::Hub>,
    pub user_messages: crate::agents::UserMessageSink,
    /// Cluster mode: the shard's consensus group (`None`: a single node writing its own WAL).
    pub cluster: Option<ClusterLink>,
}

struct Batch {
    ops: Vec<Op>,
    /// The entry being built, op by op: its exact size is known at every step.
    encoder: EntryEncoder,
    replies: Vec<DeferredReply>,
}

impl Batch {
    fn new() -> Batch {
        Batch {
            ops: Vec::new(),
            encoder: EntryEncoder::default(),
            replies: Vec::new(),
        }
    }
}

/// A batch handed to the WAL, waiting for its fsync. Batches complete in the order they were
/// sealed (the lane keeps a shard's entries in order), so the front is always the next to finish.
struct Sealed {
    batch: Batch,
    /// `None` for a batch without operations (only reads): it is answered once every batch
    /// before it is durable, since what it read reflects them.
    durable: Option<Durable>,
    /// The log index the entry was given (the writer counts them: one entry per batch).
    log_index: u64,
    entry_bytes: usize,
    sealed_at: Instant,
    /// Inbox entries of the sessions the batch changed, as the batch left them (the state may
    /// already include later batches by the time this one is durable).
    inbox_views: Vec<SessionView>,
}

impl ShardWriter {
    /// Serves the shard's queue until it closes. The queue and the cluster feed are borrowed:
    /// they outlive a writer that panics, and the supervisor (`crate::supervisor`) runs a fresh
    /// writer on them, which recovers from the durable log as at start.
    pub async fn run(mut self, commands: &mut mpsc::Receiver<Command>, feed: &mut Option<ClusterFeed>) {
        self.writer_state
            .recovered
            .store(false, std::sync::atomic::Ordering::Release);
        if self.cluster.is_none() {
            self.recover().await;
        }
        self.writer_state
            .recovered
            .store(true, std::sync::atomic::Ordering::Release);
        let (mut applied, mut watch, mut progress) = match feed {
            Some(feed) => (Some(&mut feed.applied), Some(&mut feed.watch), Some(&mut feed.progress)),
            None => (None, None, None),
        };
        if let (Some(link), Some(progress)) = (self.cluster.as_mut(), progress.as_deref()) {
            progress.restore(link);
        }
        if let Some(watch) = &watch {
            self.on_leadership(watch.now(), true).await;
        }
        let mut in_flight: VecDeque<Sealed> = VecDeque::with_capacity(MAX_BATCHES_IN_FLIGHT);
        // A finished batch's buffers, reused so a busy shard does not regrow them for every entry.
        let mut spare = Batch::new();
        // Sessions the batches that failed to become durable touched (single node).
        let mut undo: HashSet<String> = HashSet::new();
        loop {
            let takeover_retry_at = self.cluster.as_ref().and_then(|link| link.takeover_retry_at);
            tokio::select! {
                biased;
                outcome = front_durable(&mut in_flight), if !in_flight.is_empty() => {
                    let sealed = in_flight.pop_front().expect("polled the front");
                    if self.cluster.is_none() && (outcome.is_err() || self.rebuild_cause.is_some()) {
                        undo.extend(sealed.batch.ops.iter().map(|op| op.session_id().to_string()));
                    }
                    spare = self.complete(sealed, outcome);
                    if in_flight.is_empty() && (self.rebuild_cause.is_some() || self.resync_pending()) {
                        self.rebuild(std::mem::take(&mut undo)).await;
                        if let Some(watch) = &watch {
                            self.on_leadership(watch.now(), true).await;
                        }
                    }
                }
                entry = async { applied.as_mut().expect("cluster mode").recv().await }, if applied.is_some() => {
                    match entry {
                        Some(entry) => {
                            self.on_applied(entry, in_flight.is_empty()).await;
                            if let (Some(link), Some(progress)) = (self.cluster.as_ref(), progress.as_deref_mut()) {
                                progress.save(link);
                            }
                        }
                        None => applied = None,
                    }
                }
                confirmed = async {
                    match self.cluster.as_mut().and_then(|link| link.confirmation.as_mut()) {
                        Some(confirmation) => confirmation.await.ok(),
                        None => std::future::pending().await,
                    }
                }, if self.cluster.as_ref().is_some_and(|link| link.confirmation.is_some()) => {
                    let link = self.cluster.as_mut().expect("cluster mode");
                    match confirmed {
                        Some((term, read_index)) => link.on_confirmed(term, read_index),
                        None => link.confirmation = None,
                    }
                    if in_flight.is_empty() {
                        self.try_take_over().await;
                    }
                }
                alive = async { watch.as_mut().expect("cluster mode").changed().await }, if watch.is_some() => {
                    match alive {
                        true => {
                            let now = watch.as_ref().expect("cluster mode").now();
                            self.on_leadership(now, in_flight.is_empty()).await;
                        }
                        false => watch = None,
                    }
                }
                _ = async move {
                    match takeover_retry_at {
                        Some(at) => tokio::time::sleep_until(at).await,
                        None => std::future::pending().await,
                    }
                }, if in_flight.is_empty() && takeover_retry_at.is_some() => {
                    self.try_take_over().await;
                }
                command = commands.recv(), if in_flight.len() < MAX_BATCHES_IN_FLIGHT && self.rebuild_cause.is_none() && !self.resync_pending() => {
                    let Some(first) = command else { break };
                    let mut batch = std::mem::replace(&mut spare, Batch::new());
                    let now = Instant::now();
                    self.handle(first, &mut batch, now);
                    while batch.encoder.len() < self.entry_soft_limit_bytes {
                        match commands.try_recv() {
                            Ok(command) => self.handle(command, &mut batch, now),
                            Err(_) => break,
                        }
                    }
                    in_flight.push_back(self.seal(batch).await);
                }
            }
        }
        // The queue closed: answer what is still waiting for its fsync.
        while !in_flight.is_empty() {
            let outcome = front_durable(&mut in_flight).await;
            let sealed = in_flight.pop_front().expect("polled the front");
            self.complete(sealed, outcome);
        }
    }

    fn epoch(&self) -> u64 {
        self.writer_state.epoch.load(std::sync::atomic::Ordering::Acquire)
    }

    /// Replaces the state with an empty one at the archive watermark; archive reads begun
    /// before are refused from now on (`Writer::epoch`).
    fn reset_state(&mut self, archived_index: u64) {
        self.writer_state
            .epoch
            .fetch_add(1, std::sync::atomic::Ordering::AcqRel);
        self.state = ShardState::new(archived_index);
    }

    /// Tells the flusher whether this writer leads and writes (`Writer::leading`).
    fn publish_leading(&self) {
        let leading = self.cluster.as_ref().and_then(ClusterLink::leading_term).is_some();
        self.writer_state
            .leading
            .store(leading, std::sync::atomic::Ordering::Release);
    }

    fn resync_pending(&self) -> bool {
        self.cluster.as_ref().is_some_and(|link| link.resync)
    }

    /// Cluster mode: follows a leadership change. A writer that loses the shard throws its state
    /// away (at once if nothing is in flight, else once that has settled); one that gains it
    /// takes over once the feed has caught up.
    async fn on_leadership(&mut self, now: crate::consensus::Leadership, idle: bool) {
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
            if idle {
                self.reset_state(0);
            }
        }
        if idle {
            self.try_take_over().await;
        }
    }

    /// Cluster mode: one committed entry of the shard's log. A member that does not lead
    /// publishes its messages to its own listeners.
    async fn on_applied(&mut self, applied: crate::consensus::Applied, idle: bool) {
        let Some(link) = self.cluster.as_mut() else { return };
        if let Some(command) = link.on_applied(applied)
            && self.hub.has_session_listeners(self.shard)
        {
            match ops::decode_entry(&command) {
                Ok(ops) => {
                    for op in &ops {
                        if let Op::MessageAppended(record) = op {
                            self.hub.publish_message(record);
                        }
                    }
                }
                Err(error) => tracing::error!(shard = self.shard, %error, "undecodable committed entry"),
            }
        }
        if idle {
            self.try_take_over().await;
        }
    }

    /// Cluster mode: once elected and caught up, rebuilds the state from the archive and the
    /// committed log (as a restart does) and starts writing; then dispatches what the log owes.
    async fn try_take_over(&mut self) {
        let Some(link) = self.cluster.as_mut() else { return };
        link.takeover_retry_at = None;
        if link.still_leads_a_term_it_gave_up(self.shard) {
            // The hand-over did not happen (yet): ask again, later again.
            link.consensus.transfer_leadership(self.shard).await;
            link.takeover_retry_at = Some(tokio::time::Instant::now() + TAKEOVER_RETRY_MAX);
            return;
        }
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
        // Bounded: requests wait on the writer meanwhile, and archive calls can each take seconds.
        let attempt = match tokio::time::timeout(TAKEOVER_ATTEMPT_LIMIT, self.recover_once()).await {
            Ok(outcome) => outcome,
            Err(_) => {
                self.reset_state(0);
                Err(RecoveryError::Retry(format!(
                    "rebuilding from the archive took over {TAKEOVER_ATTEMPT_LIMIT:?}"
                )))
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
                    if failures == TAKEOVER_FAILURES_BEFORE_HAND_OVER {
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
            // Leadership moved on while the state was rebuilt: the next change decides.
            self.reset_state(0);
            let link = self.cluster.as_mut().expect("cluster mode");
            link.role = Role::Follower;
            link.on_leadership(now);
            return;
        }
        let link = self.cluster.as_mut().expect("cluster mode");
        link.role = Role::Leader { term };
        self.publish_leading();
        let link = self.cluster.as_mut().expect("cluster mode");
        link.published_through = link.published_through.max(through);
        self.state.applied_index = through;
        metrics::counter!("fleetlm_shard_takeovers_total").increment(1);
        tracing::info!(
            shard = self.shard,
            term,
            through,
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

    /// Hands the batch's operations to the WAL as one entry (without waiting for the fsync).
    async fn seal(&mut self, mut batch: Batch) -> Sealed {
        let sealed_at = Instant::now();
        if batch.ops.is_empty() {
            return Sealed {
                batch,
                durable: None,
                log_index: 0,
                entry_bytes: 0,
                sealed_at,
                inbox_views: Vec::new(),
            };
        }
        let log_index = self.state.applied_index;
        let entry = batch.encoder.finish();
        let entry_bytes = entry.len();
        let inbox_views = self.inbox_views(&batch.ops);
        let durable = self.make_durable(log_index, entry).await;
        Sealed {
            batch,
            durable: Some(durable),
            log_index,
            entry_bytes,
            sealed_at,
            inbox_views,
        }
    }

    /// Hands one entry to the WAL (single node) or to the shard's consensus group (cluster
    /// leader), in call order.
    async fn make_durable(&self, log_index: u64, entry: Vec<u8>) -> Durable {
        let failed = |error: ShardError| -> Durable { Box::pin(std::future::ready(Err(error))) };
        let Some(link) = &self.cluster else {
            let log_id = LogId {
                term: 1,
                index: log_index,
            };
            return match self.wal.enqueue_append(self.shard, vec![(log_id, entry)]).await {
                Ok(durable) => Box::pin(async move {
                    match durable.await {
                        Ok(Ok(())) => Ok(log_index),
                        Ok(Err(error)) => Err(ShardError::from_wal(error)),
                        Err(_) => Err(ShardError::from_wal(WalError::Closed)),
                    }
                }),
                Err(error) => failed(ShardError::from_wal(error)),
            };
        };
        let Some(term) = link.leading_term() else {
            return failed(ShardError::NotLeader { leader: None });
        };
        match link.consensus.enqueue(self.shard, term, entry).await {
            Ok(proposal) => Box::pin(async move { proposal.committed().await.map_err(ShardError::from_propose) }),
            Err(error) => failed(ShardError::from_propose(error)),
        }
    }

    /// Answers a batch whose entry is durable (or failed): publishes it and sends its replies.
    /// Returns the emptied batch for reuse.
    fn complete(&mut self, sealed: Sealed, outcome: Result<u64, ShardError>) -> Batch {
        let Sealed {
            mut batch,
            durable,
            log_index,
            entry_bytes,
            sealed_at,
            inbox_views,
        } = sealed;
        let failure = match outcome {
            // Sealed on top of a batch that failed: it reflects state that is not durable.
            _ if self.rebuild_cause.is_some() => self.rebuild_cause.clone(),
            Ok(index) => {
                if durable.is_some() {
                    metrics::histogram!("fleetlm_append_commit_seconds").record(sealed_at.elapsed().as_secs_f64());
                    self.unflushed_bytes += entry_bytes;
                    if self.unflushed_bytes >= self.flush_threshold_bytes {
                        self.flush_wakeup.notify_one();
                    }
                    if let Some(link) = self.cluster.as_mut() {
                        link.published_through = link.published_through.max(index);
                        if index != log_index {
                            // Another proposer (the cluster recording a member in shard 0) took
                            // an index among ours: the batch is committed, but the WAL positions
                            // the state holds are off. Rebuild once the batches in flight settle.
                            tracing::info!(
                                shard = self.shard,
                                index,
                                log_index,
                                "log index moved; the shard rebuilds its state"
                            );
                            link.resync = true;
                        }
                    }
                }
                None
            }
            Err(cause) => {
                // The state already includes these operations but the log does not: answer
                // them (and everything sealed after them) with the error, then rebuild.
                if self.cluster.is_some() {
                    tracing::warn!(shard = self.shard, %cause, "a proposal did not commit; the shard rebuilds its state from the committed log");
                } else {
                    tracing::error!(shard = self.shard, %cause, "wal append failed; the shard rebuilds its state from the log");
                }
                self.rebuild_cause = Some(cause.clone());
                Some(cause)
            }
        };
        if failure.is_none() {
            self.publish(&batch.ops, inbox_views);
        }
        batch.ops.clear();
        batch.ops.shrink_to(MAX_RETAINED_BATCH_OPS);
        for reply in batch.replies.drain(..) {
            reply(failure.as_ref());
        }
        batch.encoder.clear();
        batch
    }

    /// Throws away the state (it includes operations that never became durable) and rebuilds it
    /// from the durable log, as at start. Runs once every failed batch has been answered.
    /// `touched`: the sessions the failed batches changed; when they were refused for space
    /// only those are rebuilt.
    async fn rebuild(&mut self, touched: HashSet<String>) {
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
            // Only the committed log is truth: back to follower, and take over again (from the
            // archive and the committed log) if this node still leads.
            link.resync = false;
            if let Role::Leader { .. } = link.role {
                link.role = Role::Follower;
            }
            self.publish_leading();
            self.reset_state(0);
            self.rebuild_cause = None;
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
    async fn rebuild_sessions(&mut self, touched: &HashSet<String>) -> Result<usize, String> {
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
        // As JSON writes them: an id needing escapes is always decoded.
        let needles: Option<Vec<Vec<u8>>> = touched
            .iter()
            .map(|id| {
                (!id.chars().any(|c| c == '"' || c == '\\' || c.is_control())).then(|| format!("\"{id}\"").into_bytes())
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
                    if !matches!(op, Op::SessionCreated(_)) && !self.state.sessions.contains_key(session_id) {
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

    /// Inbox entries of the sessions `ops` touched whose users have inbox listeners.
    /// Linear in the batch: each session once, each user's listeners looked up once.
    fn inbox_views(&self, ops: &[Op]) -> Vec<SessionView> {
        let mut seen: HashSet<&str> = HashSet::new();
        let mut listened: HashMap<&str, bool> = HashMap::new();
        let mut views = Vec::new();
        for op in ops {
            let session_id = op.session_id();
            if !seen.insert(session_id) {
                continue;
            }
            let Some(state) = self.state.sessions.get(session_id) else {
                continue;
            };
            let user_id = state.record.user_id.as_str();
            if *listened
                .entry(user_id)
                .or_insert_with(|| self.hub.has_inbox_listeners(user_id))
            {
                views.push(state.view());
            }
        }
        views
    }

    /// Fans committed operations out to live listeners (sockets, inboxes). Runs only after the
    /// entry holding them is durable.
    fn publish(&self, ops: &[Op], inbox_views: Vec<SessionView>) {
        // A cluster member that lost the shard while this batch was in flight does not dispatch.
        let dispatches = self.cluster.as_ref().is_none_or(|link| link.leading_term().is_some());
        for op in ops {
            if let Op::MessageAppended(record) = op {
                self.hub.publish_message(record);
                if dispatches
                    && record.from_user
                    && let Some(state) = self.state.sessions.get(&*record.message.session_id)
                {
                    self.user_messages
                        .user_message(&state.record.id, &state.record.agent_id, record.message.seq);
                }
            }
        }
        self.hub.publish_inboxes(&inbox_views);
    }

    /// Adds the operation to the batch's entry and applies it. Refused (and nothing changes)
    /// if the operation alone is larger than an entry can take beside others.
    fn push_op(&mut self, op: Op, batch: &mut Batch, now: Instant) -> Result<u32, ShardError> {
        if let Err(bytes) = batch.encoder.try_push(&op, self.max_op_bytes) {
            return Err(ShardError::TooLarge {
                bytes,
                max: self.max_op_bytes,
            });
        }
        if batch.ops.is_empty() {
            self.state.applied_index += 1;
        }
        let position = batch.ops.len() as u32;
        self.state.apply(&op, self.state.applied_index, position, now);
        batch.ops.push(op);
        Ok(position)
    }

    fn handle(&mut self, command: Command, batch: &mut Batch, now: Instant) {
        if let Some(link) = &self.cluster
            && link.leading_term().is_none()
        {
            refuse_as_follower(command, link.known_leader(self.shard));
            return;
        }
        match command {
            Command::Install { loaded, epoch } => {
                if epoch != self.epoch() {
                    // Read before the state changed: possibly stale. The request that asked
                    // for it finds the session still missing and loads it again.
                    metrics::counter!("fleetlm_stale_session_loads_total").increment(1);
                    return;
                }
                let session_id = loaded.view.record.id.clone();
                self.state.install(*loaded, now);
                if !self.losses.is_empty() {
                    self.skip_for_losses(&session_id, batch, now);
                }
            }
            Command::Archived { through_index } => self.state.mark_archived_through(through_index),
            Command::ArchiveRegressed { reason } => self.refuse_for_regressed_archive(reason),
            Command::Sweep { idle_for } => {
                let evicted = self.state.evict_idle(idle_for, now);
                if evicted > 0 {
                    self.writer_state
                        .epoch
                        .fetch_add(1, std::sync::atomic::Ordering::AcqRel);
                    metrics::counter!("fleetlm_sessions_evicted_total").increment(evicted as u64);
                }
                metrics::gauge!("fleetlm_active_sessions", "shard" => self.shard.to_string())
                    .set(self.state.sessions.len() as f64);
            }
            Command::Overlay { session_ids, reply } => {
                let views = session_ids
                    .iter()
                    .map(|id| self.state.sessions.get(id).map(SessionState::view))
                    .collect();
                // Views of state that failed to become durable are never shown.
                batch.replies.push(Box::new(move |failure| {
                    let views = match failure {
                        Some(_) => vec![None; session_ids.len()],
                        None => views,
                    };
                    let _ = reply.send(views);
                }));
            }
            Command::View { session_id, reply } => {
                let result = self.session(&session_id, now).map(|s| s.view());
                batch.replies.push(defer(reply, result));
            }
            Command::PlanRead {
                session_id,
                after_seq,
                limit,
                reply,
            } => {
                let result = self
                    .session(&session_id, now)
                    .and_then(|s| plan_read(s, after_seq, limit));
                batch.replies.push(defer(reply, result));
            }
            Command::Create {
                session,
                known_absent,
                reply,
            } => {
                let result = self.create(session, known_absent, batch, now);
                batch.replies.push(defer(reply, result));
            }
            Command::Append { request, order, reply } => {
                let result = match &order {
                    // Storing it would overtake the one before, which is on a round trip.
                    Some(ticket) if ticket.behind_a_bounce() => Ok(AppendOutcome::Behind(request)),
                    _ => self.append(request, batch, now),
                };
                if let (Some(ticket), Ok(outcome)) = (&order, &result)
                    && outcome.is_bounce()
                {
                    ticket.mark_bounced();
                }
                batch.replies.push(defer(reply, result));
            }
            Command::Archive { session_id, reply } => {
                let result = self.archive_session(&session_id, batch, now);
                batch.replies.push(defer(reply, result));
            }
            Command::FinishDispatch {
                session_id,
                dispatch_id,
                through_seq,
                error,
                cancelled,
                only_if_owed,
                leader_term,
                reply,
            } => {
                let end = DispatchEnd {
                    dispatch_id,
                    through_seq,
                    error,
                    cancelled,
                    only_if_owed,
                    leader_term,
                };
                let result = self.finish_dispatch(session_id, end, batch, now);
                batch.replies.push(defer(reply, result));
            }
            Command::StartDispatch {
                session_id,
                turn,
                leader_term,
                reply,
            } => {
                let result = self.start_dispatch(session_id, turn, leader_term, batch, now);
                batch.replies.push(defer(reply, result));
            }
            Command::PendingDispatches { reply } => {
                let owing = self
                    .state
                    .sessions
                    .values()
                    .filter(|s| s.dispatch.is_pending() && s.status == SessionStatus::Active)
                    .map(|s| (s.record.id.clone(), s.record.agent_id.clone(), s.dispatch.last_user_seq))
                    .collect();
                batch.replies.push(Box::new(move |failure| {
                    let _ = reply.send(if failure.is_some() { Vec::new() } else { owing });
                }));
            }
            Command::MoveReadCursor {
                session_id,
                user_id,
                read_seq,
                known,
                reply,
            } => {
                let result = self.move_read_cursor(&session_id, &user_id, read_seq, known, batch, now);
                batch.replies.push(defer(reply, result));
            }
        }
    }

    fn session(&mut self, session_id: &str, now: Instant) -> Result<&mut SessionState, ShardError> {
        let state = self.state.sessions.get_mut(session_id).ok_or(ShardError::NotLoaded)?;
        state.last_used = now;
        Ok(state)
    }

    fn writable(&self) -> Result<(), ShardError> {
        if let Some(refusal) = &self.refusal {
            return Err(refusal.clone());
        }
        // Segments kept only for degraded or archive-stalled shards do not count against a
        // flowing shard (`Wal::budget_bytes`, docs/OPERATIONS.md "WAL budget").
        if self.wal.budget_bytes(self.shard) > self.wal_budget_bytes {
            return Err(ShardError::Overloaded);
        }
        Ok(())
    }

    fn next_timestamp(&mut self) -> crate::model::Timestamp {
        let now = self.clock.now_micros().max(self.last_inserted_at);
        self.last_inserted_at = now;
        crate::model::Timestamp(now)
    }

    fn create(
        &mut self,
        mut session: SessionRecord,
        known_absent: Option<u64>,
        batch: &mut Batch,
        now: Instant,
    ) -> Result<SessionView, ShardError> {
        if self.state.sessions.contains_key(&session.id) {
            return Err(ShardError::SessionExists);
        }
        if known_absent != Some(self.epoch()) {
            // Not looked up in the archive, or looked up before the state changed.
            return Err(ShardError::NotLoaded);
        }
        self.writable()?;
        session.inserted_at = self.next_timestamp();
        let id = session.id.clone();
        self.push_op(Op::SessionCreated(session), batch, now)?;
        Ok(self.state.sessions[&id].view())
    }

    fn append(
        &mut self,
        request: Box<AppendRequest>,
        batch: &mut Batch,
        now: Instant,
    ) -> Result<AppendOutcome, ShardError> {
        let Some(session) = self.state.sessions.get_mut(request.session_id.as_str()) else {
            return Ok(AppendOutcome::NotLoaded(request));
        };
        session.last_used = now;
        let is_user = request.sender_is_user;
        let participant = if is_user {
            session.record.user_id == request.sender_id
        } else {
            session.record.agent_id == request.sender_id
        };
        if !participant {
            return Err(ShardError::NotParticipant);
        }
        if let Some(term) = request.leader_term
            && self.cluster.as_ref().and_then(ClusterLink::leading_term) != Some(term)
        {
            return Err(ShardError::Superseded);
        }
        if let Some(client_id) = &request.client_id {
            if let Some(entry) = session.client_ids.get(client_id.as_str()) {
                return if entry.fingerprint == request.fingerprint {
                    Ok(AppendOutcome::Duplicate { seq: entry.seq })
                } else {
                    Err(ShardError::ClientIdConflict)
                };
            }
            let checked = request
                .archive_checked_below
                .is_some_and(|below| below >= session.client_ids_complete_from);
            if session.client_ids_complete_from > 1 && !checked {
                let below = session.client_ids_complete_from;
                return Ok(AppendOutcome::CheckClientIdInArchive { below, request });
            }
        }
        if session.status == SessionStatus::Archived {
            return Err(ShardError::Archived);
        }
        if let Some(expected) = request.expected_seq
            && expected != session.last_seq
        {
            return Err(ShardError::SeqConflict {
                last_seq: session.last_seq,
            });
        }
        let nonuser_through = session.nonuser_count + u64::from(!is_user);
        let seq = session.last_seq + 1;
        let session_id = session.record.id.clone();
        self.writable()?;
        let request = *request;
        let message = crate::model::Message {
            id: ids::generate_id(),
            session_id: session_id.clone(),
            seq,
            sender_id: request.sender_id,
            kind: request.kind,
            content: request.content,
            metadata: request.metadata,
            inserted_at: self.next_timestamp(),
        };
        let record = MessageRecord {
            message,
            client_id: request.client_id,
            fingerprint: request.fingerprint,
            nonuser_through,
            from_user: is_user,
        };
        self.push_op(Op::MessageAppended(record), batch, now)?;
        let stored = self.state.sessions[&session_id]
            .hot_message(seq)
            .expect("just appended")
            .clone();
        Ok(AppendOutcome::Appended(stored))
    }

    fn finish_dispatch(
        &mut self,
        session_id: String,
        end: DispatchEnd,
        batch: &mut Batch,
        now: Instant,
    ) -> Result<bool, ShardError> {
        if let Some(term) = end.leader_term
            && self.cluster.as_ref().and_then(ClusterLink::leading_term) != Some(term)
        {
            return Err(ShardError::Superseded);
        }
        let progress = self.session(&session_id, now)?.dispatch;
        if end.only_if_owed && !(progress.is_pending() && progress.answered_through < end.through_seq) {
            return Ok(false);
        }
        self.writable()?;
        let at = self.next_timestamp();
        let error = end.error.map(|text| truncate_chars(text, MAX_DISPATCH_ERROR_CHARS));
        self.push_op(
            Op::DispatchFinished {
                session_id,
                dispatch_id: end.dispatch_id,
                through_seq: end.through_seq,
                error,
                at,
                cancelled: end.cancelled,
            },
            batch,
            now,
        )?;
        Ok(true)
    }

    fn archive_session(
        &mut self,
        session_id: &str,
        batch: &mut Batch,
        now: Instant,
    ) -> Result<SessionView, ShardError> {
        let session = self.session(session_id, now)?;
        if session.status == SessionStatus::Archived {
            return Ok(session.view());
        }
        self.writable()?;
        let at = self.next_timestamp();
        self.push_op(
            Op::SessionArchived {
                session_id: session_id.to_string(),
                at,
            },
            batch,
            now,
        )?;
        Ok(self.state.sessions[session_id].view())
    }

    fn move_read_cursor(
        &mut self,
        session_id: &str,
        user_id: &str,
        read_seq: u64,
        known: Option<ReadCursor>,
        batch: &mut Batch,
        now: Instant,
    ) -> Result<SessionView, ShardError> {
        let session = self.session(session_id, now)?;
        if session.record.user_id != user_id {
            return Err(ShardError::NotParticipant);
        }
        let target = read_seq.min(session.last_seq);
        if target <= session.read_cursor.read_seq {
            return Ok(session.view());
        }
        let cursor = match session.hot_message(target) {
            Some(record) => ReadCursor {
                read_seq: target,
                nonuser_through: record.nonuser_through,
            },
            None => match known {
                Some(cursor) if cursor.read_seq == target => cursor,
                _ => return Err(ShardError::NeedsCursorAt { seq: target }),
            },
        };
        self.writable()?;
        let at = self.next_timestamp();
        self.push_op(
            Op::ReadCursorMoved {
                session_id: session_id.to_string(),
                cursor,
                at,
            },
            batch,
            now,
        )?;
        Ok(self.state.sessions[session_id].view())
    }

    /// Rebuilds the state from the archive and the WAL entries past the archive's watermark,
    /// waiting as long as the archive takes to answer (a single node has nothing else to do).
    async fn recover(&mut self) {
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
    async fn recover_once(&mut self) -> Result<(), RecoveryError> {
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
                Ok(())
            }
            Ok(replayed) => {
                self.refusal = self.wal.lane_failed(self.shard).map(ShardError::StorageFailed);
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
                self.refusal = Some(ShardError::Degraded(reason));
                Ok(())
            }
            Err(retry) => {
                self.reset_state(0);
                Err(retry)
            }
        }
    }

    /// Refuses new seqs because the archive holds less than it was given: a session loaded from
    /// it would hand out acknowledged seqs again. Until an operator decides (`fleetlm archive
    /// accept`, then a restart).
    fn refuse_for_regressed_archive(&mut self, reason: String) {
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
    async fn skip_seqs_of_lost_entries(&mut self) -> Result<(), ShardError> {
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
    async fn write_now(&mut self, batch: Batch) -> Result<(), ShardError> {
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
    fn skip_for_losses(&mut self, session_id: &Arc<str>, batch: &mut Batch, now: Instant) {
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
    fn entry_ops(&self, body: &[u8]) -> Result<Vec<Op>, String> {
        let command = match &self.cluster {
            None => body,
            Some(_) => match crate::consensus::command_in_record(body)? {
                Some(command) => command,
                None => return Ok(Vec::new()),
            },
        };
        ops::decode_entry(command).map_err(|e| e.to_string())
    }

    async fn try_recover(&mut self) -> Result<usize, RecoveryError> {
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
                    if !matches!(op, Op::SessionCreated(_)) && !self.state.sessions.contains_key(session_id) {
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
            let skip_seqs = loss.lost_bytes / MIN_MESSAGE_OP_BYTES + 1;
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

/// Answers a command this cluster member cannot serve: it does not lead the shard (the router
/// sends it to the leader).
fn refuse_as_follower(command: Command, leader: Option<u64>) {
    fn refuse<T>(reply: Reply<T>, leader: Option<u64>) {
        let _ = reply.send(Err(ShardError::NotLeader { leader }));
    }
    match command {
        Command::Create { reply, .. } | Command::Archive { reply, .. } | Command::View { reply, .. } => {
            refuse(reply, leader)
        }
        Command::MoveReadCursor { reply, .. } => refuse(reply, leader),
        Command::Append { reply, .. } => refuse(reply, leader),
        Command::PlanRead { reply, .. } => refuse(reply, leader),
        Command::FinishDispatch { reply, .. } => refuse(reply, leader),
        Command::StartDispatch { reply, .. } => refuse(reply, leader),
        Command::Overlay { session_ids, reply } => {
            let _ = reply.send(vec![None; session_ids.len()]);
        }
        Command::PendingDispatches { reply } => {
            let _ = reply.send(Vec::new());
        }
        Command::Install { .. }
        | Command::Archived { .. }
        | Command::Sweep { .. }
        | Command::ArchiveRegressed { .. } => {}
    }
}

/// The fewest bytes a message takes in a log entry (its JSON's field names alone take more), so
/// `lost bytes / this` bounds how many seqs lost entries could have held.
const MIN_MESSAGE_OP_BYTES: u64 = 64;

enum RecoveryError {
    /// The archive did not answer: try again later.
    Retry(String),
    /// A race with the log or the archive moving on (a former leader's last flush, an entry
    /// not yet durable here): try again at once.
    Race(String),
    Fatal(String),
    /// The archive holds less than it was given (`crate::archive::regression`).
    Regressed(String),
}

/// How a dispatch ended (`Command::FinishDispatch`).
struct DispatchEnd {
    dispatch_id: String,
    through_seq: u64,
    error: Option<String>,
    cancelled: bool,
    only_if_owed: bool,
    leader_term: Option<u64>,
}

/// A dispatch's error text kept in the log (the full text goes to the server's log).
const MAX_DISPATCH_ERROR_CHARS: usize = 1024;

fn truncate_chars(text: String, max_chars: usize) -> String {
    match text.char_indices().nth(max_chars) {
        Some((cut, _)) => text[..cut].to_string(),
        None => text,
    }
}

/// The first seq at or after `seq` that is not in one of the session's gaps.
fn skip_gaps(session: &SessionState, mut seq: u64) -> u64 {
    while let Some((_, through)) = session.gap_containing(seq) {
        if through == u64::MAX {
            return u64::MAX;
        }
        seq = through + 1;
    }
    seq
}

/// Which messages of the next `limit` after `after_seq` come from memory, the WAL and the archive
/// (seqs in a gap hold no message and are not counted).
fn plan_read(session: &SessionState, after_seq: u64, limit: usize) -> Result<ReadPlan, ShardError> {
    let last_seq = session.last_seq;
    let first = after_seq.saturating_add(1);
    let mut last = after_seq;
    let mut count = 0;
    let mut seq = skip_gaps(session, first);
    while count < limit && seq <= last_seq {
        last = seq;
        count += 1;
        seq = skip_gaps(session, seq.saturating_add(1));
    }
    let mut plan = ReadPlan {
        hot: Vec::new(),
        wal: Vec::new(),
        archive_range: None,
        has_more: skip_gaps(session, last.saturating_add(1)) <= last_seq,
        last_seq,
        session: session.view(),
        gaps: session.gaps.clone(),
    };
    if count == 0 {
        return Ok(plan);
    }
    let hot_start = session.hot_tail_start();
    let archived_end = last.min(session.archived_seq).min(hot_start.saturating_sub(1));
    if first <= archived_end {
        plan.archive_range = Some((first, archived_end));
    }
    let mut seq = skip_gaps(session, first.max(archived_end + 1));
    while seq <= last {
        let found = if seq >= hot_start {
            session.hot_message(seq).map(|record| plan.hot.push(record.clone()))
        } else {
            session.wal_position(seq).map(|position| plan.wal.push(position))
        };
        if found.is_none() {
            debug_assert!(false, "seq {seq} is neither hot, in the wal index, nor archived");
            return Err(ShardError::Unavailable(format!(
                "internal: seq {seq} of the session cannot be located"
            )));
        }
        seq = skip_gaps(session, seq.saturating_add(1));
        if seq == u64::MAX && last == u64::MAX {
            break;
        }
    }
    Ok(plan)
}
