//! Coalesced heartbeats: one message per peer per heartbeat interval for every group this node
//! leads there, instead of one openraft heartbeat per group.
//!
//! An idle group's heartbeat proves two things and carries one: the follower promises not to
//! elect anyone else for a lease (openraft's follower lease), the leader learns that a quorum
//! still follows it (the quorum-acknowledged time its lease counts from), and the follower
//! learns the commit index. A **beat** names, for each group, the leader's term and commit
//! index. The follower accepts a group's beat when it follows this node in that term and is
//! bound by nothing newer (`Groups::accept_beat`); accepting renews its election timer and its
//! promise (`Groups::within_lease`, which `network` enforces on votes and pre-votes, since a
//! beat never reaches openraft and its own lease lapses). Each acceptance counts towards the
//! leader's lease (`LeaseBook::beat_accepted`).
//!
//! A group still gets a real openraft heartbeat (`trigger().heartbeat()`) when a beat is not
//! enough: a follower that does not know the commit index yet, or whose log the leader has not
//! matched to its own end, or that refused the beat (it may know a newer term, which only
//! openraft's own exchange settles). So a busy group, or one with a lagging follower, is no
//! cheaper than before, and an idle one costs a few bytes of one message per interval.
//!
//! openraft refuses a leader's writes once no quorum acknowledged one of its real appends or
//! heartbeats within `election_max` (its own leader lease), and beats never reach it: a write
//! to a group idle that long first renews it with one real heartbeat round
//! (`renew_engine_lease`, a round trip on the first write after a quiet spell).
//!
//! Why the lease stays safe (see `lease.rs` for the argument with appends): a member that
//! accepted a beat sent at `t` grants no vote but a transfer's for `election_max` after, and
//! does not campaign for `election_min` after (`pacemaker`). A member that granted a vote in a
//! later term, or started a campaign, refuses beats of the earlier term (under the same lock
//! as its votes), so no member can count for two leaders at once.

use std::collections::{BTreeSet, HashMap};
use std::sync::Arc;
use std::time::Duration;

use openraft::ServerState;
use openraft::type_config::async_runtime::WatchReceiver;
use serde::{Deserialize, Serialize};
use tokio::sync::watch;
use tokio::time::Instant;

use super::groups::Groups;
use super::lease::LeaseBook;
use super::network::{PeerRequest, RaftReply, encode};
use super::peer::{Lane, PeerClient};
use super::types::{LogId, Raft};

/// How long a trigger may wait for a busy group's core (as the pacemaker's).
const TRIGGER_WAIT: Duration = Duration::from_millis(20);

/// One group's part of a beat.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct BeatGroup {
    pub shard: u16,
    /// The term the sender leads the shard in.
    pub term: u64,
    /// The sender's commit index of the shard.
    pub committed: Option<LogId>,
}

/// A follower's answer to one group's beat.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum BeatAnswer {
    /// Accepted, and the follower knows the commit index.
    InStep,
    /// Accepted, but the follower does not know the commit index yet: a real heartbeat tells it.
    Behind,
    /// Not accepted: the follower does not follow the sender in that term (or cannot say now).
    Refused,
}

/// What the leader side needs.
pub struct Beating {
    pub node_id: u64,
    pub groups: Arc<Groups>,
    pub leases: Arc<LeaseBook>,
    pub peers: Arc<HashMap<u64, Arc<PeerClient>>>,
    /// The heartbeat interval.
    pub interval: Duration,
}

/// A group this node leads, as a round of beats sees it.
struct Led {
    shard: u16,
    term: u64,
    committed: Option<LogId>,
    voters: Vec<u64>,
    /// Every other member (voters and learners).
    peers: Vec<u64>,
    /// Members whose log the leader has not matched to its own end.
    unmatched: Vec<u64>,
}

/// Sends a round of beats every heartbeat interval until the node stops.
pub async fn run(beating: Beating, mut stopping: watch::Receiver<bool>) {
    let mut clock = tokio::time::interval(beating.interval);
    clock.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = clock.tick() => {}
            _ = stopping.wait_for(|stop| *stop) => return,
        }
        // A round waits at most one interval for its answers.
        beating.round().await;
    }
}

impl Beating {
    fn led(&self) -> Vec<Led> {
        (0..self.groups.len() as u16)
            .filter_map(|shard| {
                self.groups
                    .inspect(shard, |metrics| self.leading(shard, metrics))
                    .flatten()
            })
            .collect()
    }

    /// The shard as a round of beats sees it, if this node leads it.
    fn leading(&self, shard: u16, metrics: &openraft::RaftMetrics<super::types::TypeConfig>) -> Option<Led> {
        if metrics.state != ServerState::Leader
            || metrics.current_leader != Some(self.node_id)
            || metrics.running_state.is_err()
            || self.leases.handed_off_in(shard, metrics.vote.leader_id().term)
        {
            return None;
        }
        let membership = metrics.membership_config.membership();
        let peers: Vec<u64> = membership
            .nodes()
            .map(|(id, _)| *id)
            .filter(|id| *id != self.node_id)
            .collect();
        if peers.is_empty() {
            return None;
        }
        let end = metrics.last_log_index;
        let unmatched = peers
            .iter()
            .copied()
            .filter(|peer| {
                let matched = metrics
                    .replication
                    .as_ref()
                    .and_then(|replication| replication.get(peer))
                    .and_then(|matched| matched.as_ref().map(|log_id| log_id.index));
                matched != end
            })
            .collect();
        Some(Led {
            shard,
            term: metrics.vote.leader_id().term,
            committed: metrics.local_committed,
            voters: membership.voter_ids().collect(),
            peers,
            unmatched,
        })
    }

    /// One round: a beat to each peer naming the groups this node leads there; the answers
    /// renew leases, and the groups a beat was not enough for get a real heartbeat.
    async fn round(&self) {
        let led = self.led();
        if led.is_empty() {
            return;
        }
        let sent = Instant::now();
        let calls = self.peers.iter().filter_map(|(peer, client)| {
            let named: Vec<usize> = (0..led.len()).filter(|i| led[*i].peers.contains(peer)).collect();
            if named.is_empty() {
                return None;
            }
            let beat = named
                .iter()
                .map(|i| BeatGroup {
                    shard: led[*i].shard,
                    term: led[*i].term,
                    committed: led[*i].committed,
                })
                .collect();
            let request = encode(&PeerRequest::Beat { groups: beat });
            let interval = self.interval;
            Some(async move {
                let answers = match client.call(Lane::Control, request, interval).await {
                    Ok(reply) => match rmp_serde::from_slice::<RaftReply>(&reply) {
                        Ok(RaftReply::Beat(answers)) if answers.len() == named.len() => Some(answers),
                        // It answered, but not a beat (not taking part yet, or a version that
                        // does not know beats): its groups get real heartbeats, as before beats.
                        _ => Some(vec![BeatAnswer::Refused; named.len()]),
                    },
                    // Unreachable or slow: openraft's own replication keeps trying that peer;
                    // a real heartbeat to it would cost as much and prove nothing more.
                    Err(_) => None,
                };
                (*peer, named, answers)
            })
        });
        let answered = futures_util::future::join_all(calls).await;
        metrics::counter!("fleetlm_cluster_beats_sent_total").increment(answered.len() as u64);
        let mut heartbeat = BTreeSet::new();
        for (peer, named, answers) in answered {
            let Some(answers) = answers else { continue };
            for (i, answer) in named.into_iter().zip(answers) {
                let group = &led[i];
                if answer != BeatAnswer::Refused {
                    let quorum = self
                        .leases
                        .beat_accepted(group.shard, group.term, peer, sent, &group.voters);
                    if quorum.is_some_and(|acked| acked >= sent) {
                        self.groups.confirmed_as_leader(group.shard);
                    }
                }
                if answer != BeatAnswer::InStep || group.unmatched.contains(&peer) {
                    heartbeat.insert(group.shard);
                }
            }
        }
        metrics::counter!("fleetlm_cluster_beat_fallbacks_total").increment(heartbeat.len() as u64);
        for shard in heartbeat {
            let raft = self.groups.get(shard);
            let _ = tokio::time::timeout(TRIGGER_WAIT, raft.trigger().heartbeat()).await;
        }
    }
}

/// Makes sure openraft takes a write on `raft` if this node leads it: when no quorum has
/// acknowledged a real append or heartbeat for half of openraft's leader lease (the group was
/// idle, kept by beats alone), one real heartbeat round renews it, waited for at most that
/// lease. A leader that cannot reach a quorum gets its write refused as before.
pub(super) async fn renew_engine_lease(raft: &Raft) {
    let lease = Duration::from_millis(raft.config().election_timeout_max);
    let mut metrics = raft.metrics();
    let node_id = metrics.borrow_watched().id;
    let ageing = |metrics: &openraft::RaftMetrics<super::types::TypeConfig>| {
        metrics.state == ServerState::Leader
            && metrics.current_leader == Some(node_id)
            && metrics
                .last_quorum_acked
                .as_ref()
                .is_none_or(|acked| openraft::Instant::elapsed(&**acked) >= lease / 2)
    };
    if !ageing(&metrics.borrow_watched()) {
        return;
    }
    metrics::counter!("fleetlm_cluster_engine_lease_renewals_total").increment(1);
    if raft.trigger().heartbeat().await.is_err() {
        return;
    }
    let deadline = Instant::now() + lease;
    while ageing(&metrics.borrow_watched()) {
        match tokio::time::timeout_at(deadline, metrics.changed()).await {
            Ok(Ok(())) => {}
            Ok(Err(_)) | Err(_) => return,
        }
    }
}

/// A follower's answers to a beat from `from`, one per group in its order.
pub(super) fn answer(groups: &Groups, from: u64, beat: &[BeatGroup]) -> Vec<BeatAnswer> {
    beat.iter().map(|group| answer_group(groups, from, group)).collect()
}

fn answer_group(groups: &Groups, from: u64, beat: &BeatGroup) -> BeatAnswer {
    if beat.shard as usize >= groups.len() || groups.refetching(beat.shard) {
        return BeatAnswer::Refused;
    }
    let mut in_step = false;
    let accepted = groups.accept_beat(beat.shard, beat.term, || {
        groups
            .inspect(beat.shard, |metrics| {
                in_step = metrics.local_committed >= beat.committed;
                metrics.running_state.is_ok()
                    && matches!(metrics.state, ServerState::Follower | ServerState::Learner)
                    && metrics.current_leader == Some(from)
                    && metrics.vote.is_committed()
                    && metrics.vote.leader_id().term == beat.term
            })
            .unwrap_or(false)
    });
    // What the leader commits is news even in a beat refused for the lease (readiness reads
    // it: `Consensus::replica_progress`).
    let follows = || groups.inspect(beat.shard, |metrics| metrics.current_leader == Some(from)) == Some(true);
    if accepted || follows() {
        let committed = beat.committed.map_or(0, |log_id| log_id.index + 1);
        groups.note_leader_committed(beat.shard, committed);
    }
    match (accepted, in_step) {
        (false, _) => BeatAnswer::Refused,
        (true, true) => BeatAnswer::InStep,
        (true, false) => BeatAnswer::Behind,
    }
}
