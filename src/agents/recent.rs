//! The last few finished dispatches per agent, in memory, for `GET /api/agents/:id/dispatches`
//! (the console's per-agent outcomes and latency). Lost on restart by design: the log keeps only
//! what decides whether a session owes a reply.
//!
//! Architecture invariant: bounded (`PER_AGENT` entries per agent, agents only as many as the
//! registry holds); the lock is held for a push or a copy, never across an await.

use std::collections::{HashMap, VecDeque};
use std::sync::Mutex;

use serde::Serialize;

use crate::model::Timestamp;

/// Finished dispatches kept per agent.
pub const PER_AGENT: usize = 50;

#[derive(Debug, Clone, Serialize)]
pub struct FinishedDispatch {
    pub dispatch_id: String,
    pub session_id: String,
    /// `ok` or `failed`.
    pub outcome: &'static str,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    /// From the scheduler starting the dispatch to its end, retries included.
    pub duration_ms: u64,
    pub finished_at: Timestamp,
}

#[derive(Default)]
pub struct RecentDispatches {
    by_agent: Mutex<HashMap<String, VecDeque<FinishedDispatch>>>,
}

impl RecentDispatches {
    pub fn record(&self, agent_id: &str, dispatch: FinishedDispatch) {
        let mut map = self.by_agent.lock().expect("recent dispatches lock");
        let list = map.entry(agent_id.to_string()).or_default();
        if list.len() == PER_AGENT {
            list.pop_back();
        }
        list.push_front(dispatch);
    }

    /// The agent's finished dispatches, newest first.
    pub fn of_agent(&self, agent_id: &str) -> Vec<FinishedDispatch> {
        let map = self.by_agent.lock().expect("recent dispatches lock");
        map.get(agent_id)
            .map(|list| list.iter().cloned().collect())
            .unwrap_or_default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn finished(n: usize) -> FinishedDispatch {
        FinishedDispatch {
            dispatch_id: format!("d{n}"),
            session_id: "s".into(),
            outcome: "ok",
            error: None,
            duration_ms: 1,
            finished_at: Timestamp(0),
        }
    }

    #[test]
    fn keeps_the_newest_first_and_at_most_the_bound() {
        let recent = RecentDispatches::default();
        for n in 0..PER_AGENT + 3 {
            recent.record("a", finished(n));
        }
        let list = recent.of_agent("a");
        assert_eq!(list.len(), PER_AGENT);
        assert_eq!(list[0].dispatch_id, format!("d{}", PER_AGENT + 2));
        assert!(recent.of_agent("other").is_empty());
    }
}
