//! Leader balancing: every member leads its share of the shards.
//!
//! Elections alone do not spread leadership: the member whose timers fire first after a start
//! wins most of them, and a member back from a restart leads nothing. So every node, at an
//! interval, computes the same even plan from what it sees (`placement::balance_leaders`: leader
//! counts per member within 1, keeping as many current leaders as that allows) and hands over
//! the shards *it* leads that the plan gives to another member. Only leaders act, and only on
//! their own shards, so members that briefly see different leaders cannot fight over a shard:
//! the worst a stale view does is one hand-over too many, which a later round evens out.
//!
//! A hand-over is a Raft leadership transfer: writes in flight on the shard answer `no_leader`
//! and are resent by clients, and the new leader writes at once from its current copy of the
//! state. So a round only hands over when nothing is unsettled: every shard has a leader this
//! node knows, none of this node's groups is stopped or standing down (a drain), and the target
//! says it would take over at once (`CanLead`: running, voting, not stopping, its copy current)
//! and has most of the log already. At most `MAX_HANDOVERS_PER_ROUND` per round (more with many
//! shards: one per `SHARDS_PER_HANDOVER`), and never a
//! shard whose hand-over is still under way. One stopped group or one shard without a known
//! leader here pauses every hand-over of the node until it is settled.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::{Arc, Weak};
use std::time::Duration;

use openraft::type_config::async_runtime::WatchReceiver;

use super::Consensus;
use super::network;
use crate::placement::{self, Assignment};

/// Hand-overs one node starts per round, at least: enough to even out a 3-member cluster of 64
/// shards in a few rounds, few enough that clients see `no_leader` on a few shards at a time.
const MAX_HANDOVERS_PER_ROUND: usize = 4;
/// With more shards, one hand-over per this many shards per round (32 at 1024 shards: about 3 %
/// of the shards moving at once).
const SHARDS_PER_HANDOVER: usize = 32;
/// A target further behind the shard's log than this is not handed the shard this round (it
/// waits for the rest before it takes over: see the `TransferLeader` answer in `network`).
const MAX_TARGET_LAG: u64 = 64;
const ASK_TIMEOUT: Duration = Duration::from_secs(1);
/// The pause after a round that started hand-overs or found an election under way (instead of
/// the full interval).
const FOLLOW_UP: Duration = Duration::from_secs(1);

impl Consensus {
    /// Starts evening out leadership every `every` until the node stops.
    pub fn start_balancing(self: &Arc<Self>, every: Duration) {
        let consensus = Arc::downgrade(self);
        let stop = self.stop.subscribe();
        tokio::spawn(run(consensus, every, stop));
    }

    /// One round: hands over the shards this node leads that the even plan gives to another
    /// member. Returns how many hand-overs it started, or `None` if it found the cluster
    /// unsettled (a shard without a known leader, a local group stopped or standing down).
    async fn balance_round(&self) -> Option<usize> {
        let shards = self.groups.len() as u16;
        let mut leaders = BTreeMap::new();
        for shard in 0..shards {
            if self.groups.stopped(shard).is_some() || self.groups.standing_down(shard) {
                return None;
            }
            // An election under way (a hand-over of this node's or another's): wait for it.
            leaders.insert(shard, self.leader(shard)?);
        }
        let reachable: BTreeSet<u64> = self
            .members
            .iter()
            .copied()
            .filter(|member| *member == self.node_id || self.peers.get(member).is_some_and(|peer| peer.reachable()))
            .collect();
        let mut voters: Assignment = BTreeMap::new();
        for shard in 0..shards {
            let metrics = self.group(shard).metrics();
            let members: BTreeSet<u64> = metrics
                .borrow_watched()
                .membership_config
                .membership()
                .voter_ids()
                .filter(|id| reachable.contains(id))
                .collect();
            if members.is_empty() {
                return None;
            }
            voters.insert(shard, members);
        }
        let plan = placement::balance_leaders(&voters, &leaders);
        // Every shard this node leads that the plan gives to another member, except those it
        // is handing over already (a transfer under way in this term).
        let mut offers: BTreeMap<u64, Vec<u16>> = BTreeMap::new();
        for (shard, planned) in &plan {
            if leaders[shard] == self.node_id && *planned != self.node_id && !self.handing_over(*shard) {
                offers.entry(*planned).or_default().push(*shard);
            }
        }
        // The cap counts hand-overs started, so a member that refuses its share does not keep
        // the others from getting theirs.
        let cap = MAX_HANDOVERS_PER_ROUND.max(usize::from(shards) / SHARDS_PER_HANDOVER);
        let mut started = 0;
        'targets: for (target, shards) in offers {
            let Some(client) = self.peers.get(&target) else {
                continue;
            };
            let ready = network::ask_can_lead(client, &shards, ASK_TIMEOUT).await;
            for (shard, ready) in shards.into_iter().zip(ready) {
                if started == cap {
                    break 'targets;
                }
                if ready && self.is_leader(shard) && !self.handing_over(shard) && self.caught_up(shard, target) {
                    tracing::info!(
                        shard,
                        to = target,
                        "handing a shard's leadership over to even out leadership"
                    );
                    metrics::counter!("fleetlm_leader_handovers_total", "reason" => "balance").increment(1);
                    self.hand_over(shard, target).await;
                    started += 1;
                }
            }
        }
        Some(started)
    }

    /// This node handed the shard over in the term it leads it in (the transfer has not
    /// happened yet, or stalled and the group has not restarted yet).
    fn handing_over(&self, shard: u16) -> bool {
        let term = self.group(shard).metrics().borrow_watched().vote.leader_id().term;
        self.leases.handed_off_in(shard, term)
    }

    /// The shard's log as `target` holds it (as this leader knows) is at most
    /// `MAX_TARGET_LAG` entries short.
    fn caught_up(&self, shard: u16, target: u64) -> bool {
        let metrics = self.group(shard).metrics();
        let metrics = metrics.borrow_watched();
        let last = metrics.last_log_index.unwrap_or(0);
        metrics
            .replication
            .as_ref()
            .and_then(|peers| peers.get(&target).cloned().flatten())
            .is_some_and(|matched| matched.index + MAX_TARGET_LAG >= last)
    }
}

async fn run(consensus: Weak<Consensus>, every: Duration, mut stop: tokio::sync::watch::Receiver<bool>) {
    let mut pause = every;
    loop {
        tokio::select! {
            _ = tokio::time::sleep(pause) => {}
            _ = stop.wait_for(|stop| *stop) => return,
        }
        let Some(consensus) = consensus.upgrade() else { return };
        // A round waits on peers: stopping does not wait for it (nor keep the node's parts).
        let started = tokio::select! {
            started = consensus.balance_round() => started,
            _ = stop.wait_for(|stop| *stop) => return,
        };
        // While there is more to hand over, or an election (often one of the hand-overs) kept
        // this round from looking, the next round comes soon: a transfer takes effect within an
        // election round trip, so a node leading every shard evens out in seconds.
        pause = match started {
            Some(0) => every,
            Some(_) | None => every.min(FOLLOW_UP),
        };
    }
}
