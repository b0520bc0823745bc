//! The shard writer's side of a dispatch's start (`Command::StartDispatch`): the turn is
//! recorded in the log (`Op::DispatchStarted`) before the agent is called, so every attempt and
//! every later leader resumes it with the same id. (A child module of `writer`: it uses the
//! writer's private helpers.)

use std::time::Instant;

use super::{Batch, ShardWriter};
use crate::model::OpenTurn;
use crate::shard::ShardError;
use crate::shard::ops::Op;
use crate::shard::replica::ClusterLink;

impl ShardWriter {
    /// Records `turn` as the session's open turn, unless a turn is open already (then
    /// that one is answered: a dispatch resumes it) or nothing is owed up to its `through_seq`
    /// (answered `None`). The answer is sent once the record is durable (committed, in a
    /// cluster).
    pub(super) fn start_dispatch(
        &mut self,
        session_id: String,
        turn: OpenTurn,
        leader_term: Option<u64>,
        batch: &mut Batch,
        now: Instant,
    ) -> Result<Option<OpenTurn>, ShardError> {
        if let Some(term) = leader_term
            && self.cluster.as_ref().and_then(ClusterLink::leading_term) != Some(term)
        {
            return Err(ShardError::Superseded);
        }
        let progress = self.session(&session_id, now)?.dispatch;
        if let Some(open) = progress.open_turn() {
            return Ok(Some(open));
        }
        if !progress.is_pending() || turn.through_seq <= progress.answered_through {
            return Ok(None);
        }
        self.writable()?;
        let at = self.next_timestamp();
        self.push_op(
            Op::DispatchStarted {
                session_id,
                turn_id: turn.id,
                through_seq: turn.through_seq,
                history_seq: turn.history_seq,
                at,
            },
            batch,
            now,
        )?;
        Ok(Some(turn))
    }
}
