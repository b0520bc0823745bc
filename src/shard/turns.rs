//! What the agent engine asks of the shards: whether this node dispatches a session's agent
//! and under which leadership term (and its lease in that term), and a turn's start, end and
//! cancellation recorded in the session's log.

use std::sync::Arc;

use tokio::sync::oneshot;

use super::writer::Command;
use super::{ShardError, Shards, routing};

impl Shards {
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

    pub(super) async fn start_dispatch_here(
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

    pub(super) async fn finish_dispatch_here(
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

    pub(super) async fn cancel_owed_turn_here(
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
}
