//! The last few finished dispatches per agent, in memory, for `GET /api/agents/:id/dispatches`
//! (the console's per-agent outcomes and latency), and the last webhook deliveries (one per HTTP
//! attempt: status, latency, error) for `GET /api/agents/:id/deliveries`. Lost on restart by
//! design: the log keeps only what decides whether a session owes a reply.
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
    /// `ok`, `failed` or `cancelled`.
    pub outcome: &'static str,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    /// From the scheduler starting the dispatch to its end, retries included.
    pub duration_ms: u64,
    pub finished_at: Timestamp,
}

/// One webhook delivery: a single HTTP attempt of a dispatch. Never the agent's URL, headers or
/// body: `error` is the same address-free sentence a failed dispatch reports.
#[derive(Debug, Clone, Serialize)]
pub struct Delivery {
    pub dispatch_id: String,
    pub session_id: String,
    /// 1 for the first attempt of a dispatch.
    pub attempt: u32,
    /// The agent's HTTP status, when it answered.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub http_status: Option<u16>,
    /// `ok`, `retried` (failed, another attempt follows), `failed` or `cancelled`.
    pub outcome: &'static str,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    /// From sending the request to the end of the reply (or the failure).
    pub latency_ms: u64,
    pub finished_at: Timestamp,
}

/// A bounded ring per agent, newest first.
struct Rings<T> {
    by_agent: Mutex<HashMap<String, VecDeque<T>>>,
}

impl<T> Default for Rings<T> {
    fn default() -> Self {
        Rings {
            by_agent: Mutex::new(HashMap::new()),
        }
    }
}

impl<T: Clone> Rings<T> {
    fn record(&self, agent_id: &str, entry: T) {
        let mut map = self.by_agent.lock().expect("recent dispatches lock");
        let list = map.entry(agent_id.to_string()).or_default();
        if list.len() == PER_AGENT {
            list.pop_back();
        }
        list.push_front(entry);
    }

    fn of_agent(&self, agent_id: &str) -> Vec<T> {
        let map = self.by_agent.lock().expect("recent dispatches lock");
        map.get(agent_id)
            .map(|list| list.iter().cloned().collect())
            .unwrap_or_default()
    }
}

#[derive(Default)]
pub struct RecentDispatches {
    dispatches: Rings<FinishedDispatch>,
    deliveries: Rings<Delivery>,
}

impl RecentDispatches {
    pub fn record(&self, agent_id: &str, dispatch: FinishedDispatch) {
        self.dispatches.record(agent_id, dispatch);
    }

    /// The agent's finished dispatches, newest first.
    pub fn of_agent(&self, agent_id: &str) -> Vec<FinishedDispatch> {
        self.dispatches.of_agent(agent_id)
    }

    pub fn record_delivery(&self, agent_id: &str, delivery: Delivery) {
        self.deliveries.record(agent_id, delivery);
    }

    /// The agent's last webhook deliveries (HTTP attempts), newest first.
    pub fn deliveries_of(&self, agent_id: &str) -> Vec<Delivery> {
        self.deliveries.of_agent(agent_id)
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

    #[test]
    fn deliveries_keep_the_newest_first_and_at_most_the_bound() {
        let recent = RecentDispatches::default();
        for n in 0..PER_AGENT + 3 {
            recent.record_delivery(
                "a",
                Delivery {
                    dispatch_id: format!("d{n}"),
                    session_id: "s".into(),
                    attempt: 1,
                    http_status: Some(200),
                    outcome: "ok",
                    error: None,
                    latency_ms: 1,
                    finished_at: Timestamp(0),
                },
            );
        }
        let list = recent.deliveries_of("a");
        assert_eq!(list.len(), PER_AGENT);
        assert_eq!(list[0].dispatch_id, format!("d{}", PER_AGENT + 2));
        assert!(recent.deliveries_of("other").is_empty());
        assert!(recent.of_agent("a").is_empty(), "deliveries are not dispatches");
    }
}
