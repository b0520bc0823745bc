//! Who leads a shard as this node sees it (`Leadership`), and a watch on it that follows the
//! shard's group across its restarts (`LeadershipWatch`), and a shard's state on this node
//! for `cluster status` (`ShardStatus`).

use std::collections::BTreeMap;
use std::sync::Arc;

use openraft::ServerState;
use openraft::type_config::async_runtime::WatchReceiver;

use super::groups::Groups;
use super::shard_log_index;
use super::types::TypeConfig;

/// Who leads a shard, as this node sees it now.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Leadership {
    pub term: u64,
    pub leader: Option<u64>,
    /// This node is the shard's leader in `term`.
    pub leading: bool,
    /// The shard log index of this node's last entry.
    pub last_log: u64,
}

/// Wakes when a shard's leadership (as this node sees it) may have changed: its vote, role or
/// known leader (not at every entry, as the full metrics would). Follows the group across its
/// restarts (`groups`): while it is stopped, this node neither leads nor knows a leader.
pub struct LeadershipWatch {
    node_id: u64,
    shard: u16,
    groups: Arc<Groups>,
    generation: tokio::sync::watch::Receiver<u64>,
    /// The instance watched stopped and no new one replaced it yet.
    stopped: bool,
    server: openraft::type_config::alias::WatchReceiverOf<TypeConfig, openraft::metrics::RaftServerMetrics<TypeConfig>>,
    metrics: openraft::type_config::alias::WatchReceiverOf<TypeConfig, openraft::RaftMetrics<TypeConfig>>,
}

impl LeadershipWatch {
    pub(super) fn new(node_id: u64, shard: u16, groups: Arc<Groups>) -> LeadershipWatch {
        let mut generation = groups.generation(shard);
        generation.mark_unchanged();
        let raft = groups.get(shard);
        LeadershipWatch {
            node_id,
            shard,
            groups,
            generation,
            stopped: false,
            server: raft.server_metrics(),
            metrics: raft.metrics(),
        }
    }

    /// Read from the server metrics (the watch that wakes `changed`), so a wake-up always sees
    /// the change that caused it; only `last_log` comes from the full metrics.
    pub fn now(&self) -> Leadership {
        let (term, leader, state) = {
            let server = self.server.borrow_watched();
            (server.vote.leader_id().term, server.current_leader, server.state)
        };
        let last_log = shard_log_index(self.metrics.borrow_watched().last_log_index);
        if self.stopped {
            return Leadership {
                term,
                leader: None,
                leading: false,
                last_log,
            };
        }
        Leadership {
            term,
            leader,
            leading: state == ServerState::Leader && leader == Some(self.node_id),
            last_log,
        }
    }

    /// Resolves at the next change of the shard's vote, role or leader, its group's stop or its
    /// restart (`false` once the node shuts down).
    pub async fn changed(&mut self) -> bool {
        if !self.stopped {
            if self.server.changed().await.is_ok() {
                return true;
            }
            self.stopped = true;
            return true;
        }
        if self.generation.changed().await.is_err() {
            return false;
        }
        let raft = self.groups.get(self.shard);
        self.server = raft.server_metrics();
        self.metrics = raft.metrics();
        self.stopped = false;
        true
    }
}

/// A shard's consensus state as this node sees it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ShardStatus {
    pub shard: u16,
    pub role: &'static str,
    pub term: u64,
    pub leader: Option<u64>,
    /// Shard log indexes (WAL indexes); 0 = none.
    pub last_log: u64,
    pub committed: u64,
    pub applied: u64,
    /// Leader only: per follower, the last index known replicated to it.
    pub replicated: BTreeMap<u64, u64>,
    /// The members the shard's group counts (its newest membership as this node has it), and
    /// those it only replicates to (being added back: see `membership`).
    pub voters: Vec<u64>,
    pub learners: Vec<u64>,
    /// This member refetches the shard's damaged log and does not vote in it yet (`refetch`).
    pub refetching: bool,
    /// This node's writer holds a current copy of the shard's state (or leads it): elected, it
    /// writes at once, without the archive.
    pub copy_current: bool,
}
