//! Replacing a member whose storage is lost: the only change of the shard groups' membership,
//! and only on an operator's command.
//!
//! The member list (`--cluster-peers`) never changes. What changes is which of its members
//! each shard's group counts as a voter, in two operator steps:
//!
//! 1. `Consensus::forget_member(n)`: every shard's leader removes `n` from its group (joint
//!    consensus, so the remaining voters must have a majority of the old set too); then shard 0
//!    records `Forgotten(n)`. Only from then on may `n` start on empty storage (see `form`): it
//!    is a voter nowhere, so the votes its lost storage held no longer count anywhere.
//! 2. The operator starts `n` on empty storage; shard 0's leader tells it it is not joined, and
//!    it waits, holding nothing, to be added.
//! 3. `Consensus::add_member(n)`: every shard's leader adds `n` as a learner and waits until it
//!    has the log (a learner never votes; having accepted the leader's entries, its vote is the
//!    leader's term); shard 0 records `Joined(n)`, so a second wipe is refused again; only then
//!    does every shard's leader make it a voter once more.
//!
//! Every step is idempotent: a command cut short (a leader change, a timeout) is run again.

use std::collections::BTreeSet;
use std::time::Duration;

use openraft::ChangeMembers;
use openraft::ServerState;
use openraft::errors::{ClientWriteError, RaftError};
use openraft::type_config::async_runtime::WatchReceiver;
use serde::{Deserialize, Serialize};

use super::types::{Member, Raft, ShardCommand};

/// One step of replacing member `node`, carried out by a shard's leader.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum MemberChange {
    /// Removes the node from the group (voter or learner).
    Remove(u64),
    /// Shard 0 only: records that the node holds no vote anywhere any more.
    Forget(u64),
    /// Adds the node as a learner and waits until it has the log.
    AddLearner(u64),
    /// Shard 0 only: records the node as a member that holds the log.
    RecordJoined(u64),
    /// Makes a learner that has the log a voter.
    Promote(u64),
}

impl MemberChange {
    pub fn node(self) -> u64 {
        match self {
            MemberChange::Remove(node)
            | MemberChange::Forget(node)
            | MemberChange::AddLearner(node)
            | MemberChange::RecordJoined(node)
            | MemberChange::Promote(node) => node,
        }
    }

    /// How long the leader may take to carry the step out.
    pub fn patience(self) -> Duration {
        match self {
            // A learner catches up from a snapshot and the retained log.
            MemberChange::AddLearner(_) => Duration::from_secs(60),
            _ => Duration::from_secs(10),
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, thiserror::Error)]
pub enum MemberChangeError {
    #[error("not the shard's leader (leader: {leader:?})")]
    NotLeader { leader: Option<u64> },
    /// The leader cannot take the step yet (it has not applied a record the step needs).
    #[error("{0}")]
    NotYet(String),
    #[error("{0}")]
    Failed(String),
}

/// Entries a learner may trail the leader's log and count as having it.
const CAUGHT_UP_SLACK: u64 = 64;

/// Carries out `change` on this node's group, which must lead the shard.
pub async fn change_here(raft: &Raft, node_id: u64, change: MemberChange) -> Result<(), MemberChangeError> {
    let (voters, nodes) = {
        let metrics = raft.metrics();
        let metrics = metrics.borrow_watched();
        if metrics.state != ServerState::Leader || metrics.current_leader != Some(node_id) {
            return Err(MemberChangeError::NotLeader {
                leader: metrics.current_leader,
            });
        }
        let membership = metrics.membership_config.membership();
        let voters: BTreeSet<u64> = membership.voter_ids().collect();
        let nodes: BTreeSet<u64> = membership.nodes().map(|(id, _)| *id).collect();
        (voters, nodes)
    };
    let node = change.node();
    super::beats::renew_engine_lease(raft).await;
    let outcome = match change {
        MemberChange::Remove(_) if !nodes.contains(&node) => return Ok(()),
        MemberChange::Remove(_) if voters.contains(&node) => {
            if voters.len() == 1 {
                return Err(MemberChangeError::Failed(format!(
                    "node {node} is the shard's last voter"
                )));
            }
            raft.change_membership(ChangeMembers::RemoveVoters(BTreeSet::from([node])), false)
                .await
        }
        MemberChange::Remove(_) => {
            raft.change_membership(ChangeMembers::RemoveNodes(BTreeSet::from([node])), false)
                .await
        }
        MemberChange::Forget(_) => raft.client_write(ShardCommand::Forgotten(node)).await,
        MemberChange::RecordJoined(_) => raft.client_write(ShardCommand::Joined(node)).await,
        MemberChange::AddLearner(_) if voters.contains(&node) => return Ok(()),
        MemberChange::AddLearner(_) => {
            if !nodes.contains(&node) {
                raft.add_learner(node, Member::default(), false).await.map_err(failed)?;
            }
            return wait_until_caught_up(raft, node).await;
        }
        MemberChange::Promote(_) if voters.contains(&node) => return Ok(()),
        MemberChange::Promote(_) if !nodes.contains(&node) => {
            return Err(MemberChangeError::Failed(format!(
                "node {node} is not a learner of the shard: add it first"
            )));
        }
        MemberChange::Promote(_) => {
            raft.change_membership(ChangeMembers::AddVoterIds(BTreeSet::from([node])), true)
                .await
        }
    };
    outcome.map(|_| ()).map_err(failed)
}

fn failed(error: RaftError<super::types::TypeConfig, ClientWriteError<super::types::TypeConfig>>) -> MemberChangeError {
    match error {
        RaftError::APIError(ClientWriteError::ForwardToLeader(forward)) => MemberChangeError::NotLeader {
            leader: forward.leader_id,
        },
        other => MemberChangeError::Failed(other.to_string()),
    }
}

/// Waits until the learner `node` has the leader's log (within `CAUGHT_UP_SLACK` entries).
async fn wait_until_caught_up(raft: &Raft, node: u64) -> Result<(), MemberChangeError> {
    let mut metrics = raft.metrics();
    let deadline = tokio::time::Instant::now() + MemberChange::AddLearner(node).patience();
    loop {
        let (caught_up, leading) = {
            let metrics = metrics.borrow_watched();
            let last = metrics.last_log_index.unwrap_or(0);
            let matched = metrics
                .replication
                .as_ref()
                .and_then(|peers| peers.get(&node))
                .and_then(|matched| matched.as_ref())
                .map(|matched| matched.index);
            (
                matched.is_some_and(|matched| matched + CAUGHT_UP_SLACK >= last),
                metrics.state == ServerState::Leader,
            )
        };
        if caught_up {
            return Ok(());
        }
        if !leading {
            return Err(MemberChangeError::NotLeader { leader: None });
        }
        match tokio::time::timeout_at(deadline, metrics.changed()).await {
            Ok(Ok(())) => {}
            Ok(Err(_)) => return Err(MemberChangeError::Failed("the shard's group stopped".into())),
            Err(_) => {
                return Err(MemberChangeError::Failed(format!(
                    "node {node} did not receive the shard's log within {:?}: is it running, started on empty storage?",
                    MemberChange::AddLearner(node).patience()
                )));
            }
        }
    }
}
