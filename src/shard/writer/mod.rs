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

mod commands;
mod dispatch_ops;
mod recovery;
mod replica_copy;
mod roles;

use recovery::*;

use super::copy::ShardCopy;
use super::ops::{self, EntryEncoder, Op};
use super::replica::{ClusterLink, Delivered, Role};
use super::session::SessionState;
use super::state::ShardState;
use super::{AppendOutcome, AppendRequest, OrderTicket, ReadPlan, ShardError, Writer};
use crate::archive::{Archive, ArchiveError, LoadedSession, ShardLoss};
use crate::clock::Clock;
use crate::ids;
use crate::model::{MessageRecord, ReadCursor, SessionRecord, SessionStatus, SessionView};
use crate::wal::{LogId, Wal, WalError};

/// Operations' room a shard keeps between batches (a burst's larger batch is given back).
const MAX_RETAINED_BATCH_OPS: usize = 1024;
/// Entries one shard may have waiting for their fsync. Two let the next batch join the lane's
/// next fsync while the current one runs, instead of waiting a whole fsync to be sealed.
const MAX_BATCHES_IN_FLIGHT: usize = 2;

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
    /// Cluster leader: a copy of the state for a member whose own is not current
    /// (`super::copy`), taken once no batch is in flight (so it holds only committed entries).
    ExportCopy {
        reply: oneshot::Sender<Result<Box<ShardCopy>, ShardError>>,
    },
    /// Cluster follower: the copy of the state its fetch brought (or why there is none).
    CopyArrived {
        copy: Result<Box<ShardCopy>, String>,
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
    /// `refusal` is the shard's WAL lane having failed: lifted once the lane heals.
    pub refused_for_lane: bool,
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
    /// Where durable user messages are reported (the agent engine).
    pub user_messages: super::UserMessages,
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
            self.lift_healed_lane_refusal();
            self.sync_standing();
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
                    if in_flight.is_empty() {
                        self.answer_exports();
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
                command = commands.recv(), if in_flight.len() < MAX_BATCHES_IN_FLIGHT && self.rebuild_cause.is_none() && !self.resync_pending() && !self.exports_pending() => {
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
        if let Some(link) = self.cluster.as_mut() {
            link.replica_current = false;
            link.unsure = None;
        }
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
                            link.index_moved = true;
                        }
                    }
                }
                None
            }
            Err(cause) => {
                if let Some(link) = self.cluster.as_mut()
                    && durable.is_some()
                {
                    link.failed_from = Some(link.failed_from.unwrap_or(log_index).min(log_index));
                }
                // The state already includes these operations but the log does not: answer
                // them (and everything sealed after them) with the error, then rebuild.
                if self.cluster.is_some() {
                    tracing::warn!(shard = self.shard, %cause, "a proposal did not commit; the shard follows the committed log to learn its outcome");
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
}
