//! What the shard writers tell the agent engine: user messages that became durable, and when
//! to look for owed turns again. A trait the engine implements (`agents::channel` hands out
//! its implementation), so the shard runtime does not depend on the agent engine.

use std::sync::Arc;

/// The shard writers' side of the agent engine: reports durable user messages, never waits.
pub trait UserMessageSink: Send + Sync {
    /// A user message of `session_id` (whose agent is `agent_id`) is durable at `seq`.
    fn user_message(&self, session_id: &Arc<str>, agent_id: &str, seq: u64);

    /// Asks the scheduler to look for every session owing a reply, in memory and in the archive
    /// (within a second): a cluster member that starts leading a shard owes the turns of
    /// sessions its rebuilt state does not hold (archived, not in the log it replayed).
    fn rescan(&self);
}

/// Where a shard writer reports user messages (shared by every writer of the node).
pub type UserMessages = Arc<dyn UserMessageSink>;

/// Tells no one: for tests that run shard writers without an agent engine.
#[cfg(test)]
pub struct NoAgentEngine;

#[cfg(test)]
impl UserMessageSink for NoAgentEngine {
    fn user_message(&self, _session_id: &Arc<str>, _agent_id: &str, _seq: u64) {}

    fn rescan(&self) {}
}
