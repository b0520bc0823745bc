//! What this node can tell of every shard's group: its status (for `cluster status`, the
//! metrics and readiness) and, per shard another node leads, how far this replica has applied.

use std::time::Duration;

use openraft::ServerState;
use openraft::type_config::async_runtime::WatchReceiver;

use super::{Consensus, ShardStatus, shard_log_index};

/// How far a replica has applied, against what its leader commits (`replica_progress`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ReplicaProgress {
    pub shard: u16,
    pub leader: u64,
    /// Shard log index this node has applied.
    pub applied: u64,
    /// The leader's commit index as its newest accepted beat named it, and how long ago that
    /// came; `None` if no beat came since this node started.
    pub leader_committed: Option<(u64, Duration)>,
}

impl Consensus {
    pub fn status(&self) -> Vec<ShardStatus> {
        self.groups
            .all()
            .iter()
            .enumerate()
            .map(|(shard, raft)| {
                let metrics = raft.metrics();
                let metrics = metrics.borrow_watched();
                let stopped = self.groups.stopped(shard as u16).is_some() || metrics.running_state.is_err();
                let role = match metrics.state {
                    _ if stopped => "stopped",
                    ServerState::Leader => "leader",
                    ServerState::Candidate => "candidate",
                    ServerState::Follower => "follower",
                    ServerState::Learner => "learner",
                    ServerState::Shutdown => "stopped",
                };
                let replicated = metrics
                    .replication
                    .as_ref()
                    .map(|peers| {
                        peers
                            .iter()
                            .filter(|(id, _)| **id != self.node_id)
                            .map(|(id, matched)| (*id, shard_log_index(matched.map(|m| m.index))))
                            .collect()
                    })
                    .unwrap_or_default();
                let membership = metrics.membership_config.membership();
                ShardStatus {
                    refetching: self.groups.refetching(shard as u16),
                    copy_current: self.groups.copy_current(shard as u16),
                    voters: membership.voter_ids().collect(),
                    learners: membership.learner_ids().collect(),
                    shard: shard as u16,
                    role,
                    term: metrics.current_term,
                    leader: metrics.current_leader,
                    last_log: shard_log_index(metrics.last_log_index),
                    committed: shard_log_index(metrics.cluster_committed.map(|c| c.index)),
                    applied: shard_log_index(metrics.last_applied.map(|a| a.index)),
                    replicated,
                }
            })
            .collect()
    }

    /// Per shard another node leads: how far this replica has applied against the commit index
    /// its leader named in its newest beat (no round trip: every leader beats every follower
    /// each heartbeat interval).
    pub fn replica_progress(&self) -> Vec<ReplicaProgress> {
        (0..self.groups.len() as u16)
            .filter_map(|shard| {
                let (leader, applied) = self.groups.inspect(shard, |metrics| {
                    (
                        metrics.current_leader,
                        shard_log_index(metrics.last_applied.map(|a| a.index)),
                    )
                })?;
                Some(ReplicaProgress {
                    shard,
                    leader: leader.filter(|leader| *leader != self.node_id)?,
                    applied,
                    leader_committed: self.groups.leader_committed(shard),
                })
            })
            .collect()
    }
}
