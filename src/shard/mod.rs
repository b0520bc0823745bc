//! Shards: the single writers of sessions, and the router that reaches them.
//!
//! A session belongs to shard `xxh3(session_id) % shard_count`. The router sends each request
//! to that shard's writer task; when the writer does not have the session in memory the router
//! loads it from the archive, installs it and asks again. Reads that reach past the hot tail are
//! completed by the router from the WAL and the archive, merged by seq (`reads.rs`).
//!
//! Architecture invariant: only the shard writer assigns seq, id and inserted_at; a session with
//! records not yet archived is never evicted, so "not in memory" always means "archive is truth".
//!
//! This file holds the router (`Shards`): reaching a writer, loading sessions, and the
//! session-level requests (create, view, archive, read cursor). The rest of the router is split
//! by concern: `append.rs` (appends), `order.rs` (a caller's appends kept in order), `reads.rs`
//! (message pages, listing overlays), `turns.rs` (what the agent engine asks), `error.rs`
//! (`ShardError`); cluster mode in `routing.rs`, `wire.rs` and `forward_lane.rs`. The shard
//! runtime depends on neither the agent engine nor the cluster module: the engine is reached
//! through `UserMessageSink` (`user_messages.rs`).

mod append;
pub mod copy;
mod copy_transfer;
mod error;
mod forward_lane;
pub mod ops;
mod order;
#[cfg(test)]
mod order_tests;
pub mod page_budget;
mod reads;
pub mod replica;
pub mod routing;
pub mod session;
mod shared_reads;
mod state;
mod turns;
mod user_messages;
pub mod wire;
pub mod writer;

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

use tokio::sync::{mpsc, oneshot};

use crate::archive::{Archive, ArchiveError};
use crate::model::{ReadCursor, SessionRecord, SessionView};
use crate::wal::Wal;
pub use append::{AppendOutcome, AppendRequest, AppendResult, PendingAppend};
pub use copy_transfer::spawn_copy_service;
pub use error::ShardError;
pub use order::{AppendOrder, OrderTicket};
pub use reads::{MessagePage, ReadPlan};
pub use state::ShardState;
#[cfg(test)]
pub use user_messages::NoAgentEngine;
pub use user_messages::{UserMessageSink, UserMessages};
use writer::Command;

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
    /// Cluster mode: copies of shard states this node serves as leader.
    exports: copy_transfer::Exports,
}

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
                exports: Default::default(),
            }),
        }
    }

    fn clustered(&self) -> bool {
        self.inner.cluster.is_some()
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
