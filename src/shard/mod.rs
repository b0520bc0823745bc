//! Shards: the single writers of sessions, and the router that reaches them.
//!
//! A session belongs to shard `xxh3(session_id) % shard_count`. The router sends each request
//! to that shard's writer task; when the writer does not have the session in memory the router
//! loads it from the archive, installs it and asks again. Reads that reach past the hot tail are
//! completed here from the WAL and the archive, merged by seq.
//!
//! Architecture invariant: only the shard writer assigns seq, id and inserted_at; a session with
//! records not yet archived is never evicted, so "not in memory" always means "archive is truth".
//! The shard runtime depends on neither the agent engine nor the cluster module: the engine is
//! reached through `UserMessageSink` (`user_messages.rs`), and cluster mode's peer encoding of
//! shard calls is `wire.rs`.

mod forward_lane;
pub mod ops;
#[cfg(test)]
mod order_tests;
pub mod page_budget;
pub mod replica;
pub mod routing;
pub mod session;
mod shared_reads;
mod state;
mod user_messages;
pub mod wire;
pub mod writer;

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, AtomicU8, Ordering};
use std::sync::{Arc, Mutex};

use serde_json::value::RawValue;
use tokio::sync::{Notify, mpsc, oneshot};

use crate::archive::{Archive, ArchiveError};
use crate::model::{MessageRecord, ReadCursor, SessionRecord, SessionView};
use crate::wal::Wal;
use session::WalPosition;
pub use state::ShardState;
#[cfg(test)]
pub use user_messages::NoAgentEngine;
pub use user_messages::{UserMessageSink, UserMessages};
use writer::Command;

#[derive(Debug, Clone, thiserror::Error, serde::Serialize, serde::Deserialize)]
pub enum ShardError {
    #[error("session not found")]
    NotFound,
    #[error("not a participant of this session")]
    NotParticipant,
    #[error("session is archived")]
    Archived,
    #[error("expected_seq does not match the session's last seq {last_seq}")]
    SeqConflict { last_seq: u64 },
    #[error("client_id was already used for a different message")]
    ClientIdConflict,
    #[error("session already exists")]
    SessionExists,
    #[error("the write-ahead log is over its budget")]
    Overloaded,
    #[error("shard unavailable: {0}")]
    Unavailable(String),
    /// The WAL lane failed a write or fsync: the shard refuses writes until a restart.
    #[error("storage failed: {0}")]
    StorageFailed(String),
    /// The disk is full: this request was not stored; the same request may succeed later.
    #[error("out of disk space: {0}")]
    OutOfSpace(String),
    /// The shard's log is damaged: it refuses new seqs (so none is ever reused).
    #[error("shard degraded: {0}")]
    Degraded(String),
    /// The archive holds less of the shard's log than it was given (restored from an older
    /// backup, a lagging replica): the shard refuses new seqs until an operator decides
    /// (`fleetlm archive accept`), so none is ever handed out twice.
    #[error("archive regressed: {0}")]
    ArchiveRegressed(String),
    /// The request's log operation could never fit in a log entry.
    #[error("the request takes {bytes} bytes in the log; the limit is {max}")]
    TooLarge { bytes: usize, max: usize },
    /// (Never sent to a peer: `routing` turns it into `Unavailable` first.)
    #[error(transparent)]
    #[serde(skip)]
    Archive(#[from] ArchiveError),
    /// Internal: the writer does not hold the session; load it from the archive and retry.
    #[error("session not loaded")]
    NotLoaded,
    /// Internal: the writer needs the non-user count at `seq` to move the read cursor there.
    #[error("read cursor target is not in memory")]
    NeedsCursorAt { seq: u64 },
    /// Cluster: this node does not lead the session's shard (`leader`: who does, if known).
    /// Internal: the router sends the request on; it reaches a client only as `NoLeader`.
    #[error("this node does not lead the shard")]
    NotLeader { leader: Option<u64> },
    /// Cluster: the shard has no leader now (an election, or this node is cut off from the
    /// majority), or leadership moved while the request was in flight and its outcome is
    /// unknown. Retry (an append with the same `client_id`).
    #[error("{0}")]
    NoLeader(String),
    /// Cluster: the request belongs to a leadership term that has ended (an agent's reply
    /// dispatched by a former leader: the new leader dispatches the turn itself).
    #[error("the shard's leadership changed since this request's dispatch began")]
    Superseded,
}

impl ShardError {
    /// The error a request gets when the WAL did not make its entry durable.
    pub fn from_wal(error: crate::wal::WalError) -> ShardError {
        use crate::wal::WalError;
        match error {
            WalError::OutOfSpace(detail) => ShardError::OutOfSpace(detail),
            WalError::EntryTooLarge { bytes, max } => ShardError::TooLarge { bytes, max },
            WalError::LaneFailed(detail) | WalError::Io(detail) => ShardError::StorageFailed(detail),
            other => ShardError::StorageFailed(other.to_string()),
        }
    }
}

impl ShardError {
    /// The error a request gets when its proposal did not commit.
    pub fn from_propose(error: crate::consensus::ProposeError) -> ShardError {
        use crate::consensus::ProposeError;
        match error {
            ProposeError::NotLeader { leader } => ShardError::NotLeader { leader },
            ProposeError::Unknown(detail) => {
                tracing::debug!(%detail, "proposal outcome unknown");
                ShardError::NoLeader(
                    "the shard's leadership changed while the write was in flight; its outcome is unknown: retry it (with the same client_id)".into(),
                )
            }
            ProposeError::Stopped(detail) => ShardError::StorageFailed(detail),
            ProposeError::TooLarge { bytes, max } => ShardError::TooLarge { bytes, max },
        }
    }
}

/// A validated append, as the edge hands it to the shard.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub struct AppendRequest {
    pub session_id: String,
    pub sender_id: String,
    pub sender_is_user: bool,
    pub kind: String,
    pub content: Box<RawValue>,
    pub metadata: Box<RawValue>,
    pub client_id: Option<String>,
    pub expected_seq: Option<u64>,
    pub fingerprint: u64,
    /// The archive was searched for `client_id` among messages below this seq.
    pub archive_checked_below: Option<u64>,
    /// Cluster: store it only if the shard's leader is still the one of this term (an agent's
    /// reply, dispatched by that leader); refused `Superseded` otherwise.
    #[serde(default)]
    pub leader_term: Option<u64>,
}

impl AppendRequest {
    /// Roughly what it weighs on the wire (content, metadata, ids).
    fn approximate_bytes(&self) -> usize {
        self.content.get().len() + self.metadata.get().len() + self.session_id.len() + self.sender_id.len() + 128
    }
}

pub enum AppendOutcome {
    Appended(Arc<MessageRecord>),
    /// Same `client_id`, same body: the original message at `seq`.
    Duplicate {
        seq: u64,
    },
    /// The writer does not hold the session: load it and send the request again.
    NotLoaded(Box<AppendRequest>),
    /// Client ids of messages below `below` are only in the archive: look there, then retry.
    CheckClientIdInArchive {
        below: u64,
        request: Box<AppendRequest>,
    },
    /// The append before this one in its ordered stream was sent back for a round trip and is
    /// not placed yet: send this one again once it is (storing it now would overtake it).
    Behind(Box<AppendRequest>),
}

impl AppendOutcome {
    /// Whether the writer sent the request back instead of answering it.
    fn is_bounce(&self) -> bool {
        matches!(
            self,
            AppendOutcome::NotLoaded(_) | AppendOutcome::CheckClientIdInArchive { .. } | AppendOutcome::Behind(_)
        )
    }
}

pub struct AppendResult {
    pub record: Arc<MessageRecord>,
    pub deduplicated: bool,
}

pub struct ReadPlan {
    pub hot: Vec<Arc<MessageRecord>>,
    pub wal: Vec<WalPosition>,
    pub archive_range: Option<(u64, u64)>,
    pub has_more: bool,
    pub last_seq: u64,
    pub session: SessionView,
    /// The session's gaps as the writer knows them (older ones may only be in the archive).
    pub gaps: Vec<(u64, u64)>,
}

pub struct MessagePage {
    pub messages: Vec<Arc<MessageRecord>>,
    pub has_more: bool,
    pub session: SessionView,
}

/// What the outside may know of a shard writer: recovered yet, or unavailable and why.
#[derive(Default)]
pub struct Writer {
    pub recovered: AtomicBool,
    /// Counts the times the writer's state was replaced (rebuilt, taken over) or forgot
    /// sessions (evicted). A session read from the archive is installed only if no such change
    /// happened since before the read: the read may predate writes that were archived and
    /// forgotten meanwhile, and installing it would hand out their seqs again.
    pub epoch: std::sync::atomic::AtomicU64,
    /// Cluster mode: the writer leads its shard and writes (not while it is still taking over):
    /// only then does this node's flusher archive the shard, so the archive never moves past
    /// what a writer taking over is rebuilding from.
    pub leading: AtomicBool,
    unavailable: Mutex<Option<String>>,
    /// Why the shard refuses new seqs because the archive went back in time, if it does
    /// (shown by `/health/ready` on its own line).
    archive_regressed: Mutex<Option<String>>,
}

impl Writer {
    pub fn set_unavailable(&self, reason: String) {
        *self.unavailable.lock().expect("writer state lock") = Some(reason);
    }

    pub fn clear_unavailable(&self) {
        *self.unavailable.lock().expect("writer state lock") = None;
    }

    pub fn unavailable(&self) -> Option<String> {
        self.unavailable.lock().expect("writer state lock").clone()
    }

    pub fn set_archive_regressed(&self, reason: Option<String>) {
        *self.archive_regressed.lock().expect("writer state lock") = reason;
    }

    pub fn archive_regressed(&self) -> Option<String> {
        self.archive_regressed.lock().expect("writer state lock").clone()
    }
}

/// An ordered append's link to its stream while it settles.
struct Ordered {
    placement: PlacementHandle,
    previous: Option<OrderLink>,
}

impl Ordered {
    fn ticket(&self) -> OrderTicket {
        OrderTicket {
            own: self.placement.0.clone(),
            after: self.previous.as_ref().map(|p| p.cell.clone()),
        }
    }

    /// Records the writer's answer; on a bounce, waits until the append before this one is
    /// placed, so this one's retry cannot overtake it.
    async fn on_answer(&mut self, outcome: &AppendOutcome) {
        match outcome {
            AppendOutcome::Appended(_) | AppendOutcome::Duplicate { .. } => {
                self.placement.set(Placement::Placed);
            }
            AppendOutcome::NotLoaded(_) | AppendOutcome::CheckClientIdInArchive { .. } | AppendOutcome::Behind(_) => {
                self.placement.set(Placement::Bounced);
                if let Some(previous) = self.previous.as_ref() {
                    previous.cell.wait_until(|p| p == Placement::Placed).await;
                }
            }
        }
    }
}

#[derive(Clone)]
pub struct Shards {
    inner: Arc<ShardsInner>,
}

struct ShardsInner {
    senders: Vec<mpsc::Sender<Command>>,
    writers: Vec<Arc<Writer>>,
    wal: Arc<Wal>,
    archive: Archive,
    archive_reads: shared_reads::SharedArchiveReads,
    /// Cluster mode: requests run on their shard's leader.
    cluster: Option<routing::ClusterRouting>,
}

/// The outcome of a submitted append, resolved once it is durable or refused.
pub type PendingAppend = std::pin::Pin<Box<dyn std::future::Future<Output = Result<AppendResult, ShardError>> + Send>>;

/// A request whose writer failed before answering: it may or may not have been applied.
fn writer_restarted() -> ShardError {
    ShardError::Unavailable(
        "the shard writer restarted after an internal error; the request may or may not have been applied, retry it (with the same client_id)"
            .into(),
    )
}

fn writer_stopped() -> ShardError {
    ShardError::Unavailable("shard writer stopped".into())
}

/// How many times a request is retried after loading a session or checking the archive.
const MAX_ROUNDS: usize = 4;

/// Where one append of an ordered stream (a socket's sends) stands. An append whose
/// [`PlacementHandle`] is dropped counts as `Placed`: it has ended one way or another.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
enum Placement {
    /// Not handed to the writer yet.
    Waiting = 0,
    /// In the writer's queue, no answer handled yet.
    Submitted = 1,
    /// The writer sent it back for a round trip (load the session, look up the client id).
    Bounced = 2,
    /// Has its seq (or its final refusal): nothing sent later can be stored before it.
    Placed = 3,
}

/// One ordered append's placement, read by the append after it. Cheap on the hot path: an
/// atomic, and a wake-up only when the next append is actually waiting (rare: a round trip).
#[derive(Default)]
struct PlacementCell {
    state: AtomicU8,
    /// Set by a waiter before it reads `state`, so `set` knows whether to wake anyone.
    watched: AtomicBool,
    changed: Notify,
}

impl PlacementCell {
    fn get(&self) -> Placement {
        match self.state.load(Ordering::SeqCst) {
            0 => Placement::Waiting,
            1 => Placement::Submitted,
            2 => Placement::Bounced,
            _ => Placement::Placed,
        }
    }

    fn set(&self, placement: Placement) {
        self.state.store(placement as u8, Ordering::SeqCst);
        // Both sides use SeqCst: either this sees `watched`, or the waiter sees the new state.
        if self.watched.load(Ordering::SeqCst) {
            self.changed.notify_waiters();
        }
    }

    /// `Bounced`, unless it is placed already (its future ended: nothing will place it again).
    fn bounce(&self) {
        let changed = self
            .state
            .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |state| {
                (state != Placement::Placed as u8).then_some(Placement::Bounced as u8)
            })
            .is_ok();
        if changed && self.watched.load(Ordering::SeqCst) {
            self.changed.notify_waiters();
        }
    }

    async fn wait_until(&self, done: impl Fn(Placement) -> bool) {
        loop {
            let notified = self.changed.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            self.watched.store(true, Ordering::SeqCst);
            if done(self.get()) {
                return;
            }
            notified.await;
        }
    }
}

/// An append's own end of its placement: marks it `Placed` when dropped, however it ended
/// (stored, refused, or its future dropped with the socket).
struct PlacementHandle(Arc<PlacementCell>);

impl PlacementHandle {
    fn set(&self, placement: Placement) {
        self.0.set(placement);
    }
}

impl Drop for PlacementHandle {
    fn drop(&mut self) {
        self.0.set(Placement::Placed);
    }
}

struct OrderLink {
    cell: Arc<PlacementCell>,
    has_client_id: bool,
}

/// What an ordered append carries to its writer: its own placement and the one before's. The
/// writer marks a bounce at once (the append's future learns of it only after the batch's
/// fsync), and sends an append back while the one before it is bounced: a session load queued
/// between two pipelined sends would otherwise let the second be stored while the first is on
/// its round trip.
pub struct OrderTicket {
    own: Arc<PlacementCell>,
    after: Option<Arc<PlacementCell>>,
}

impl OrderTicket {
    /// The append before this one was sent back and is not placed yet.
    pub(crate) fn behind_a_bounce(&self) -> bool {
        self.after.as_ref().is_some_and(|cell| cell.get() == Placement::Bounced)
    }

    /// Called by the writer when it sends this append back.
    pub(crate) fn mark_bounced(&self) {
        self.own.bounce();
    }
}

impl OrderLink {
    /// Whether an append (with a client id or not) may be handed to the writer now, with this
    /// one before it: once this one is in the writer's queue, the writer takes the next one
    /// after it — unless this one may be sent back for an archive look-up (it has a client id)
    /// that the next one would not need (it has none); then only once this one is placed.
    fn lets_through(&self, placement: Placement, has_client_id: bool) -> bool {
        if self.has_client_id && !has_client_id {
            placement == Placement::Placed
        } else {
            matches!(placement, Placement::Submitted | Placement::Placed)
        }
    }
}

/// Keeps one caller's appends in the order it submitted them, even when one needs a round
/// trip to the archive first (its session was not loaded, or its client id is older than the
/// in-memory window): appends after it are not handed to the writer, or handed again, before
/// it is placed. In the common case each append is queued at its shard at once, in the
/// caller's task, exactly as an unordered submission is (pipelined, no extra hop). The caller
/// polls the returned futures from the task that submits (as a socket does), so an append's
/// placement cannot move while the next one is being queued.
#[derive(Default)]
pub struct AppendOrder {
    last: Option<OrderLink>,
    /// Cluster mode: the sends forwarded to another node's leader.
    lane: Option<Arc<forward_lane::ForwardLane>>,
}

impl Shards {
    pub fn new(
        senders: Vec<mpsc::Sender<Command>>,
        writers: Vec<Arc<Writer>>,
        wal: Arc<Wal>,
        archive: Archive,
        cluster: Option<routing::ClusterRouting>,
    ) -> Shards {
        Shards {
            inner: Arc::new(ShardsInner {
                senders,
                writers,
                wal,
                archive,
                archive_reads: shared_reads::SharedArchiveReads::default(),
                cluster,
            }),
        }
    }

    fn clustered(&self) -> bool {
        self.inner.cluster.is_some()
    }

    /// Whether this node should dispatch the session's agent, and under which leadership term:
    /// a single node always (no term); a cluster member only while it leads the session's shard.
    pub fn dispatch_term(&self, session_id: &str) -> Option<Option<u64>> {
        let Some(cluster) = &self.inner.cluster else {
            return Some(None);
        };
        let leadership = cluster.consensus.watch(self.shard_of(session_id)).now();
        leadership.leading.then_some(Some(leadership.term))
    }

    /// Cluster mode: resolves once this node's leadership lease on the session's shard in `term`
    /// has ended — another member leads, or no quorum was heard within the lease and a grace
    /// (a dispatch under that term is then superseded). `None` on a single node.
    pub fn lease_ended(&self, session_id: &str, term: u64) -> Option<impl Future<Output = ()> + Send + 'static> {
        let cluster = self.inner.cluster.as_ref()?;
        Some(cluster.consensus.lease_ended(self.shard_of(session_id), term))
    }

    /// Whether this node may act on its own for the session's shard in `term` (call its agents,
    /// relay their replies): a single node always; a cluster member while it holds its
    /// leadership lease in `term`, waiting a little for a lapsed one to come back.
    pub async fn await_lease(&self, session_id: &str, term: u64) -> bool {
        let Some(cluster) = &self.inner.cluster else {
            return true;
        };
        cluster.consensus.await_lease(self.shard_of(session_id), term).await
    }

    /// Cluster mode: resolves `true` once this node holds its lease on the session's shard in
    /// `term` again, `false` once it no longer leads the shard in `term` or after `patience`.
    /// `None` on a single node.
    pub fn lease_regained(
        &self,
        session_id: &str,
        term: u64,
        patience: std::time::Duration,
    ) -> Option<impl Future<Output = bool> + Send + 'static> {
        let cluster = self.inner.cluster.as_ref()?;
        let mut watch = cluster.consensus.lease_watch(self.shard_of(session_id));
        Some(async move { watch.regained(term, patience).await })
    }

    pub fn shard_count(&self) -> u16 {
        self.inner.senders.len() as u16
    }

    pub fn shard_of(&self, session_id: &str) -> u16 {
        crate::ids::shard_for_session(session_id, self.shard_count())
    }

    /// `(shard, reason)` for every shard that is not recovered or refuses writes.
    pub fn not_ready(&self) -> Vec<(u16, String)> {
        let mut problems = Vec::new();
        for (shard, writer) in self.inner.writers.iter().enumerate() {
            if let Some(reason) = writer.unavailable() {
                problems.push((shard as u16, reason));
            } else if !writer.recovered.load(Ordering::Acquire) {
                problems.push((shard as u16, "recovering".to_string()));
            }
        }
        problems
    }

    /// Shards refusing new seqs because the archive went back in time, and why.
    pub fn archive_regressions(&self) -> Vec<(u16, String)> {
        self.inner
            .writers
            .iter()
            .enumerate()
            .filter_map(|(shard, writer)| Some((shard as u16, writer.archive_regressed()?)))
            .collect()
    }

    async fn call<T>(
        &self,
        shard: u16,
        make: impl FnOnce(oneshot::Sender<Result<T, ShardError>>) -> Command,
    ) -> Result<T, ShardError> {
        let (reply, answer) = oneshot::channel();
        let closed = || ShardError::Unavailable("shard writer stopped".into());
        self.inner.senders[shard as usize]
            .send(make(reply))
            .await
            .map_err(|_| closed())?;
        // The writer failed holding the reply; its supervisor restarts it from the log.
        answer.await.map_err(|_| writer_restarted())?
    }

    /// Loads the session from the archive into its shard. `Ok(None)` if it does not exist, with
    /// the writer's epoch from before the read (see `Writer::epoch`).
    async fn load(&self, shard: u16, session_id: &str) -> Result<Option<()>, ShardError> {
        self.load_at_epoch(shard, session_id)
            .await
            .map(|(found, _)| found.then_some(()))
    }

    async fn load_at_epoch(&self, shard: u16, session_id: &str) -> Result<(bool, u64), ShardError> {
        let epoch = self.inner.writers[shard as usize].epoch.load(Ordering::Acquire);
        let loaded = self.inner.archive.load_session(session_id).await?;
        // What was read is only as complete as the archive: one that went back in time since
        // this node knew it would hand out acknowledged seqs again, so the shard stops writing.
        if let Err(ArchiveError::Regressed(regressions)) = self.inner.archive.watermark(shard).await {
            let reason = crate::archive::regression::describe(&regressions);
            if self.inner.writers[shard as usize].archive_regressed().is_none() {
                let _ = self.inner.senders[shard as usize]
                    .send(Command::ArchiveRegressed { reason: reason.clone() })
                    .await;
            }
            return Err(ShardError::ArchiveRegressed(reason));
        }
        let Some(loaded) = loaded else {
            return Ok((false, epoch));
        };
        metrics::counter!("fleetlm_sessions_loaded_total").increment(1);
        let command = Command::Install {
            loaded: Box::new(loaded),
            epoch,
        };
        self.inner.senders[shard as usize]
            .send(command)
            .await
            .map_err(|_| ShardError::Unavailable("shard writer stopped".into()))?;
        Ok((true, epoch))
    }

    /// Runs `make` against the session's shard, loading the session when the writer asks.
    async fn with_session<T>(
        &self,
        session_id: &str,
        mut make: impl FnMut(oneshot::Sender<Result<T, ShardError>>) -> Command,
    ) -> Result<T, ShardError> {
        let shard = self.shard_of(session_id);
        for _ in 0..MAX_ROUNDS {
            match self.call(shard, &mut make).await {
                Err(ShardError::NotLoaded) => {
                    if self.load(shard, session_id).await?.is_none() {
                        return Err(ShardError::NotFound);
                    }
                }
                other => return other,
            }
        }
        Err(ShardError::Unavailable("session could not be loaded".into()))
    }

    pub async fn create_session(&self, session: SessionRecord) -> Result<SessionView, ShardError> {
        if self.clustered() {
            return self.routed(routing::ShardCall::Create { session }).await?.view();
        }
        self.create_session_here(session).await
    }

    async fn create_session_here(&self, session: SessionRecord) -> Result<SessionView, ShardError> {
        let shard = self.shard_of(&session.id);
        let mut known_absent = None;
        for _ in 0..MAX_ROUNDS {
            let attempt = session.clone();
            match self
                .call(shard, |reply| Command::Create {
                    session: attempt,
                    known_absent,
                    reply,
                })
                .await
            {
                Err(ShardError::NotLoaded) => {
                    let (found, epoch) = self.load_at_epoch(shard, &session.id).await?;
                    known_absent = (!found).then_some(epoch);
                }
                other => return other,
            }
        }
        Err(ShardError::Unavailable("session could not be created".into()))
    }

    pub async fn view(&self, session_id: &str) -> Result<SessionView, ShardError> {
        if self.clustered() {
            let call = routing::ShardCall::View {
                session_id: session_id.to_string(),
            };
            return self.routed(call).await?.view();
        }
        self.view_here(session_id).await
    }

    async fn view_here(&self, session_id: &str) -> Result<SessionView, ShardError> {
        self.with_session(session_id, |reply| Command::View {
            session_id: session_id.to_string(),
            reply,
        })
        .await
    }

    pub async fn archive_session(&self, session_id: &str) -> Result<SessionView, ShardError> {
        if self.clustered() {
            let call = routing::ShardCall::ArchiveSession {
                session_id: session_id.to_string(),
            };
            return self.routed(call).await?.view();
        }
        self.archive_session_here(session_id).await
    }

    async fn archive_session_here(&self, session_id: &str) -> Result<SessionView, ShardError> {
        self.with_session(session_id, |reply| Command::Archive {
            session_id: session_id.to_string(),
            reply,
        })
        .await
    }

    /// Appends and waits until the message is durable (or refused).
    pub async fn append(&self, request: AppendRequest) -> Result<AppendResult, ShardError> {
        self.submit_append(request).await?.await
    }

    /// Queues the append at its shard and returns the future of its outcome. Appends submitted
    /// one after another by the same caller are assigned seqs in that order, so a socket can
    /// keep many sends in flight and still have them stored in the order it sent them.
    pub async fn submit_append(&self, request: AppendRequest) -> Result<PendingAppend, ShardError> {
        if self.clustered() {
            let shards = self.clone();
            return Ok(Box::pin(async move {
                shards.routed(routing::ShardCall::Append { request }).await?.appended()
            }));
        }
        self.submit_append_here(request).await
    }

    async fn submit_append_here(&self, request: AppendRequest) -> Result<PendingAppend, ShardError> {
        let session_id = request.session_id.clone();
        let shard = self.shard_of(&session_id);
        let (reply, answer) = oneshot::channel();
        let command = Command::Append {
            request: Box::new(request),
            order: None,
            reply,
        };
        self.inner.senders[shard as usize]
            .send(command)
            .await
            .map_err(|_| writer_stopped())?;
        let shards = self.clone();
        Ok(Box::pin(async move {
            let outcome = answer.await.map_err(|_| writer_restarted())??;
            shards.settle_append(&session_id, shard, outcome, None).await
        }))
    }

    /// Like [`Shards::submit_append`], for one of a stream of appends that must be stored in
    /// the order submitted (see [`AppendOrder`]). When the append before it is already in its
    /// shard's queue (or placed), this one is queued now, before this returns, as
    /// `submit_append` does; otherwise it is handed to its shard by the returned future (when
    /// polled) once the one before may no longer land after it.
    pub async fn submit_append_in_order(&self, order: &mut AppendOrder, request: AppendRequest) -> PendingAppend {
        let has_client_id = request.client_id.is_some();
        let cell = Arc::new(PlacementCell::default());
        let previous = order.last.replace(OrderLink {
            cell: cell.clone(),
            has_client_id,
        });
        let placement = PlacementHandle(cell);
        // A placed predecessor can no longer be overtaken: nothing to wait for, ever.
        let previous = previous.filter(|p| p.cell.get() != Placement::Placed);
        if let Some(cluster) = &self.inner.cluster
            && !cluster.consensus.is_leader(self.shard_of(&request.session_id))
        {
            // Another node leads: the stream goes there in batches, in order (`forward_lane`).
            // Where this node leads, the stream is pipelined into the local writer as on a
            // single node; a writer that is not writing (yet, or any more) answers `NotLeader`
            // with nothing stored, and the client resends (`no_leader`).
            let lane = order.lane.get_or_insert_with(Default::default).clone();
            let answered = lane.submit(self, request, previous, placement);
            return Box::pin(async move { answered.await.map_err(|_| writer_stopped())? });
        }
        let session_id = request.session_id.clone();
        let shard = self.shard_of(&session_id);
        let shards = self.clone();
        let clear_now = previous
            .as_ref()
            .is_none_or(|p| p.lets_through(p.cell.get(), has_client_id));
        if clear_now {
            // The common case. The one before cannot change state meanwhile, except that its
            // writer may mark it bounced, which this one's writer then sees (`OrderTicket`).
            let (reply, answer) = oneshot::channel();
            let order = Ordered { placement, previous };
            // Submitted before it is queued: the writer may mark it bounced at once.
            order.placement.set(Placement::Submitted);
            let command = Command::Append {
                request: Box::new(request),
                order: Some(order.ticket()),
                reply,
            };
            if self.inner.senders[shard as usize].send(command).await.is_err() {
                return Box::pin(std::future::ready(Err(writer_stopped())));
            }
            return Box::pin(async move {
                let outcome = answer.await.map_err(|_| writer_restarted())??;
                shards.settle_append(&session_id, shard, outcome, Some(order)).await
            });
        }
        Box::pin(async move {
            if let Some(previous) = previous.as_ref() {
                previous
                    .cell
                    .wait_until(|p| previous.lets_through(p, has_client_id))
                    .await;
            }
            let (reply, answer) = oneshot::channel();
            let order = Ordered { placement, previous };
            order.placement.set(Placement::Submitted);
            let command = Command::Append {
                request: Box::new(request),
                order: Some(order.ticket()),
                reply,
            };
            shards.inner.senders[shard as usize]
                .send(command)
                .await
                .map_err(|_| writer_stopped())?;
            let outcome = answer.await.map_err(|_| writer_restarted())??;
            shards.settle_append(&session_id, shard, outcome, Some(order)).await
        })
    }

    /// Turns the writer's answer into a result, loading the session or checking the archive and
    /// asking again where the writer needs that first.
    async fn settle_append(
        &self,
        session_id: &str,
        shard: u16,
        mut outcome: AppendOutcome,
        mut order: Option<Ordered>,
    ) -> Result<AppendResult, ShardError> {
        for _ in 0..MAX_ROUNDS {
            if let Some(order) = order.as_mut() {
                order.on_answer(&outcome).await;
            }
            let request = match outcome {
                AppendOutcome::Appended(record) => {
                    return Ok(AppendResult {
                        record,
                        deduplicated: false,
                    });
                }
                AppendOutcome::Duplicate { seq } => {
                    // Known from memory; its body is read back (from the archive only when it
                    // is older than the hot tail and the WAL): nothing is stored twice either way.
                    let record = self.read_one(session_id, seq).await.map_err(|error| {
                        tracing::debug!(session_id, seq, %error, "a deduplicated message could not be read back");
                        ShardError::Unavailable(
                            "the message this client_id was first sent with cannot be read now; retry later".into(),
                        )
                    })?;
                    return Ok(AppendResult {
                        record,
                        deduplicated: true,
                    });
                }
                AppendOutcome::NotLoaded(returned) => {
                    if self.load(shard, session_id).await?.is_none() {
                        return Err(ShardError::NotFound);
                    }
                    returned
                }
                AppendOutcome::CheckClientIdInArchive {
                    below,
                    request: mut returned,
                } => {
                    let client_id = returned.client_id.as_deref().unwrap_or_default();
                    match self.inner.archive.find_by_client_id(session_id, client_id).await {
                        Ok(Some(original)) => {
                            return if original.fingerprint == returned.fingerprint {
                                Ok(AppendResult {
                                    record: Arc::new(original),
                                    deduplicated: true,
                                })
                            } else {
                                Err(ShardError::ClientIdConflict)
                            };
                        }
                        Ok(None) => {}
                        Err(ArchiveError::Unavailable(error)) => {
                            // An archive outage only makes the archive lag: the client id is
                            // not among the session's newest `CLIENT_ID_WINDOW` nor unarchived,
                            // so it is taken as new (docs/API.md, "Idempotency").
                            metrics::counter!("fleetlm_client_id_unchecked_total").increment(1);
                            tracing::debug!(session_id, %error, "archive unreachable: an older client_id is taken as new");
                        }
                        Err(other) => return Err(other.into()),
                    }
                    returned.archive_checked_below = Some(below);
                    returned
                }
                // The one before is placed now (`on_answer` waited): just send it again.
                AppendOutcome::Behind(returned) => returned,
            };
            let ticket = order.as_ref().map(Ordered::ticket);
            outcome = self
                .call(shard, |reply| Command::Append {
                    request,
                    order: ticket,
                    reply,
                })
                .await?;
        }
        Err(ShardError::Unavailable("append could not be completed".into()))
    }

    pub async fn move_read_cursor(
        &self,
        session_id: &str,
        user_id: &str,
        read_seq: u64,
    ) -> Result<SessionView, ShardError> {
        if self.clustered() {
            let call = routing::ShardCall::MoveReadCursor {
                session_id: session_id.to_string(),
                user_id: user_id.to_string(),
                read_seq,
            };
            return self.routed(call).await?.view();
        }
        self.move_read_cursor_here(session_id, user_id, read_seq).await
    }

    async fn move_read_cursor_here(
        &self,
        session_id: &str,
        user_id: &str,
        read_seq: u64,
    ) -> Result<SessionView, ShardError> {
        let mut known: Option<ReadCursor> = None;
        for _ in 0..MAX_ROUNDS {
            let result = self
                .with_session(session_id, |reply| Command::MoveReadCursor {
                    session_id: session_id.to_string(),
                    user_id: user_id.to_string(),
                    read_seq,
                    known,
                    reply,
                })
                .await;
            match result {
                Err(ShardError::NeedsCursorAt { seq }) => {
                    let record = self.read_one(session_id, seq).await?;
                    known = Some(ReadCursor {
                        read_seq: seq,
                        nonuser_through: record.nonuser_through,
                    });
                }
                other => return other,
            }
        }
        Err(ShardError::Unavailable("read cursor could not be moved".into()))
    }

    async fn read_one(&self, session_id: &str, seq: u64) -> Result<Arc<MessageRecord>, ShardError> {
        let page = self.read_messages_here(session_id, seq - 1, 1).await?;
        page.messages
            .into_iter()
            .next()
            .ok_or_else(|| ShardError::Unavailable(format!("message {seq} is missing")))
    }

    /// Messages with `seq > after_seq`, ascending, at most `limit`: hot tail, WAL and archive
    /// merged by seq. A WAL segment deleted between plan and read (the archive has it by then)
    /// makes the plan stale; it is then made again.
    pub async fn read_messages(
        &self,
        session_id: &str,
        after_seq: u64,
        limit: usize,
    ) -> Result<MessagePage, ShardError> {
        if self.clustered() {
            let call = routing::ShardCall::ReadMessages {
                session_id: session_id.to_string(),
                after_seq,
                limit,
            };
            return self.routed(call).await?.page();
        }
        self.read_messages_here(session_id, after_seq, limit).await
    }

    async fn read_messages_here(
        &self,
        session_id: &str,
        after_seq: u64,
        limit: usize,
    ) -> Result<MessagePage, ShardError> {
        let mut last_problem = String::new();
        for _ in 0..MAX_ROUNDS {
            let plan = self
                .with_session(session_id, |reply| Command::PlanRead {
                    session_id: session_id.to_string(),
                    after_seq,
                    limit,
                    reply,
                })
                .await?;
            match self.execute_plan(session_id, plan).await {
                Ok(page) => return Ok(page),
                Err(problem) => last_problem = problem,
            }
        }
        Err(ShardError::Unavailable(format!(
            "could not read messages: {last_problem}"
        )))
    }

    async fn execute_plan(&self, session_id: &str, plan: ReadPlan) -> Result<MessagePage, String> {
        // Bounded in bytes as well as in count: a page ends at `MAX_PAGE_BYTES` and the rest
        // comes with the next request (`has_more`).
        let mut page = page_budget::PageBudget::new(page_budget::MAX_PAGE_BYTES);
        let mut messages: Vec<Arc<MessageRecord>> = Vec::new();
        if let Some((from, to)) = plan.archive_range {
            let archived = self
                .inner
                .archive_reads
                .read(&self.inner.archive, session_id, from, to, page.left())
                .await?;
            page.take_archived(&archived, to, &mut messages);
        }
        if page.is_full() && !(plan.wal.is_empty() && plan.hot.is_empty()) {
            page.cut_short();
        } else {
            if !plan.wal.is_empty() {
                let (from_wal, complete) = self.read_from_wal(session_id, &plan.wal).await?;
                page.take(from_wal, &mut messages);
                if !complete {
                    // The WAL's own read budget stopped short.
                    page.cut_short();
                }
            }
            if !page.was_cut() {
                page.take(plan.hot, &mut messages);
            }
        }
        let mut gaps = plan.gaps;
        let mut asked_archive = false;
        for pair in messages.windows(2) {
            let (before, after) = (pair[0].message.seq, pair[1].message.seq);
            if after == before + 1 {
                continue;
            }
            // Only seqs skipped after an accepted loss may be missing.
            let covered = |gaps: &[(u64, u64)]| {
                gaps.iter()
                    .any(|(from, through)| *from <= before + 1 && after - 1 <= *through)
            };
            if !covered(&gaps) && !asked_archive {
                asked_archive = true;
                gaps.extend(
                    self.inner
                        .archive
                        .session_gaps(session_id)
                        .await
                        .map_err(|e| e.to_string())?,
                );
            }
            if !covered(&gaps) {
                return Err(format!("gap between seq {before} and {after}"));
            }
        }
        Ok(MessagePage {
            messages,
            has_more: plan.has_more || page.was_cut(),
            session: plan.session,
        })
    }

    async fn read_from_wal(
        &self,
        session_id: &str,
        positions: &[WalPosition],
    ) -> Result<(Vec<Arc<MessageRecord>>, bool), String> {
        let shard = self.shard_of(session_id);
        let wal = self.inner.wal.clone();
        let positions = positions.to_vec();
        let tagged = self.clustered();
        tokio::task::spawn_blocking(move || {
            // Only the entries that hold the wanted messages, each once (runs of neighbouring
            // indexes read together), never everything between the first and the last.
            let mut ranges: Vec<crate::wal::EntryRange> = Vec::new();
            for index in positions.iter().map(|p| p.log_index) {
                match ranges.last_mut() {
                    Some(range) if range.from_index + range.max_entries as u64 == index => range.max_entries += 1,
                    Some(range) if range.from_index + range.max_entries as u64 > index => {}
                    _ => ranges.push(crate::wal::EntryRange {
                        shard,
                        from_index: index,
                        max_entries: 1,
                    }),
                }
            }
            let mut entries: BTreeMap<u64, Vec<ops::Op>> = BTreeMap::new();
            for run in wal.read_ranges(&ranges).map_err(|e| e.to_string())? {
                for (log_id, body) in run {
                    let command = match tagged {
                        true => match crate::consensus::command_in_record(&body)? {
                            Some(command) => command,
                            None => continue,
                        },
                        false => &body[..],
                    };
                    entries.insert(log_id.index, ops::decode_entry(command).map_err(|e| e.to_string())?);
                }
            }
            // The WAL's read budget may stop short: the page then ends at the last entry read.
            let read_through = entries.keys().next_back().copied().unwrap_or(0);
            let mut records = Vec::with_capacity(positions.len());
            for position in positions.iter().take_while(|p| p.log_index <= read_through) {
                match entries
                    .get(&position.log_index)
                    .and_then(|ops| ops.get(position.op_position as usize))
                {
                    Some(ops::Op::MessageAppended(record)) if record.message.seq == position.seq => {
                        records.push(Arc::new(record.clone()));
                    }
                    _ => {
                        return Err(format!(
                            "wal entry {} no longer holds seq {}",
                            position.log_index, position.seq
                        ));
                    }
                }
            }
            if records.is_empty() {
                return Err("the wal returned none of the entries asked for".to_string());
            }
            let complete = records.len() == positions.len();
            Ok((records, complete))
        })
        .await
        .map_err(|e| e.to_string())?
    }

    /// Replaces archive views with the shards' in-memory views where a shard holds the session
    /// (the archive may lag; a session not in memory has nothing unarchived). In a cluster each
    /// shard's part is answered by its leader under its lease: when no leader can answer for a
    /// shard, the listing fails (`NoLeader`) rather than show the archive's possibly stale views.
    pub async fn overlay(&self, views: Vec<SessionView>) -> Result<Vec<SessionView>, ShardError> {
        let mut by_shard: BTreeMap<u16, Vec<usize>> = BTreeMap::new();
        for (position, view) in views.iter().enumerate() {
            by_shard
                .entry(self.shard_of(&view.record.id))
                .or_default()
                .push(position);
        }
        let mut views = views;
        for (shard, positions) in by_shard {
            let part: Vec<SessionView> = positions.iter().map(|p| views[*p].clone()).collect();
            let fresh = if self.clustered() {
                // In parts bounded in bytes (they travel to the leader and back). A part no
                // leader can answer fails the listing (`no_leader`): the archive's views may be
                // stale, and every read is linearizable.
                let mut fresh = Vec::with_capacity(part.len());
                for part in routing::overlay_parts(part) {
                    let views = self
                        .routed(routing::ShardCall::Overlay { shard, views: part })
                        .await?
                        .views()?;
                    fresh.extend(views);
                }
                fresh
            } else {
                self.overlay_here(shard, part).await
            };
            if fresh.len() != positions.len() {
                return Err(ShardError::Unavailable(
                    "the leader answered a listing with the wrong number of sessions".into(),
                ));
            }
            for (position, fresh) in positions.into_iter().zip(fresh) {
                views[position] = fresh;
            }
        }
        Ok(views)
    }

    /// `views` (all of `shard`) with the shard writer's in-memory view where it has one.
    async fn overlay_here(&self, shard: u16, views: Vec<SessionView>) -> Vec<SessionView> {
        let session_ids = views.iter().map(|view| view.record.id.clone()).collect();
        let (reply, answer) = oneshot::channel();
        if self.inner.senders[shard as usize]
            .send(Command::Overlay { session_ids, reply })
            .await
            .is_err()
        {
            return views;
        }
        let Ok(fresh) = answer.await else { return views };
        views
            .into_iter()
            .zip(fresh)
            .map(|(archived, fresh)| fresh.unwrap_or(archived))
            .collect()
    }

    /// Records the start of a dispatch's `turn` before the agent is called (durable when this
    /// returns). Answers the session's open turn: `turn`, or one started earlier and not
    /// finished (the dispatch resumes that one), or `None` if no reply is owed. In a cluster
    /// `leader_term` is the term the dispatch runs under: a later leader refuses (`Superseded`).
    pub async fn start_dispatch(
        &self,
        session_id: &str,
        turn: crate::model::OpenTurn,
        leader_term: Option<u64>,
    ) -> Result<Option<crate::model::OpenTurn>, ShardError> {
        if self.clustered() {
            let call = routing::ShardCall::StartDispatch {
                session_id: session_id.to_string(),
                turn,
                leader_term,
            };
            return self.routed(call).await?.turn();
        }
        self.start_dispatch_here(session_id, turn, leader_term).await
    }

    async fn start_dispatch_here(
        &self,
        session_id: &str,
        turn: crate::model::OpenTurn,
        leader_term: Option<u64>,
    ) -> Result<Option<crate::model::OpenTurn>, ShardError> {
        self.with_session(session_id, |reply| Command::StartDispatch {
            session_id: session_id.to_string(),
            turn,
            leader_term,
            reply,
        })
        .await
    }

    /// Records that a dispatch of the session's agent ended, covering user messages up to
    /// `through_seq` (durable when this returns); `cancelled` when the user cancelled it. In a
    /// cluster `leader_term` is the term the dispatch ran under: a later leader refuses the
    /// record (`Superseded`), since it answers the turn itself.
    pub async fn finish_dispatch(
        &self,
        session_id: &str,
        dispatch_id: &str,
        through_seq: u64,
        error: Option<String>,
        cancelled: bool,
        leader_term: Option<u64>,
    ) -> Result<(), ShardError> {
        if self.clustered() {
            let call = routing::ShardCall::FinishDispatch {
                session_id: session_id.to_string(),
                dispatch_id: dispatch_id.to_string(),
                through_seq,
                error,
                cancelled,
                leader_term,
            };
            return self.routed(call).await.map(|_| ());
        }
        self.finish_dispatch_here(session_id, dispatch_id, through_seq, error, cancelled, leader_term)
            .await
    }

    async fn finish_dispatch_here(
        &self,
        session_id: &str,
        dispatch_id: &str,
        through_seq: u64,
        error: Option<String>,
        cancelled: bool,
        leader_term: Option<u64>,
    ) -> Result<(), ShardError> {
        self.with_session(session_id, |reply| Command::FinishDispatch {
            session_id: session_id.to_string(),
            dispatch_id: dispatch_id.to_string(),
            through_seq,
            error: error.clone(),
            cancelled,
            only_if_owed: false,
            leader_term,
            reply,
        })
        .await
        .map(|_| ())
    }

    /// Cancels a turn no dispatch is running for: records a cancelled dispatch covering user
    /// messages up to `through_seq`, only if the log still owes a reply for them (decided by
    /// the session's writer, so of two racing cancels one records it). Returns whether it did.
    pub async fn cancel_owed_turn(
        &self,
        session_id: &str,
        dispatch_id: &str,
        through_seq: u64,
    ) -> Result<bool, ShardError> {
        if self.clustered() {
            let call = routing::ShardCall::CancelOwedTurn {
                session_id: session_id.to_string(),
                dispatch_id: dispatch_id.to_string(),
                through_seq,
            };
            return self.routed(call).await?.flag();
        }
        self.cancel_owed_turn_here(session_id, dispatch_id, through_seq).await
    }

    async fn cancel_owed_turn_here(
        &self,
        session_id: &str,
        dispatch_id: &str,
        through_seq: u64,
    ) -> Result<bool, ShardError> {
        self.with_session(session_id, |reply| Command::FinishDispatch {
            session_id: session_id.to_string(),
            dispatch_id: dispatch_id.to_string(),
            through_seq,
            error: None,
            cancelled: true,
            only_if_owed: true,
            leader_term: None,
            reply,
        })
        .await
    }

    /// Sessions in the shards' memory that owe a reply: `(session_id, agent_id, last_user_seq)`.
    pub async fn pending_dispatches(&self) -> Vec<(Arc<str>, String, u64)> {
        let mut owing = Vec::new();
        for sender in &self.inner.senders {
            let (reply, answer) = oneshot::channel();
            if sender.send(Command::PendingDispatches { reply }).await.is_ok()
                && let Ok(found) = answer.await
            {
                owing.extend(found);
            }
        }
        owing
    }

    /// Asks every shard to forget idle, fully archived sessions.
    pub async fn sweep(&self, idle_for: std::time::Duration) {
        for sender in &self.inner.senders {
            let _ = sender.send(Command::Sweep { idle_for }).await;
        }
    }

    pub fn archive(&self) -> &Archive {
        &self.inner.archive
    }

    pub fn wal(&self) -> &Arc<Wal> {
        &self.inner.wal
    }
}
