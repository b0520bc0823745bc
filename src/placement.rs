//! Placement for scale-out (`../shared/spec/scale-out.md`, issue 21): which storage nodes hold
//! each shard's replicas and which of them should lead it.
//!
//! Pure and deterministic: the same input gives the same plan on every node, so whichever member
//! leads the metadata group computes what any other would. Today every node holds every shard,
//! and only `balance_leaders` runs, in every member (`consensus::balance`); the metadata group
//! will call `rebalance` whenever the members change and turn the difference into moves
//! (`moves_between`).
//!
//! The rules, from the spec:
//! - every shard has exactly `replication_factor` replicas, on distinct active storage nodes;
//! - once settled, replica counts per active node differ by at most 1, and so do leader counts;
//! - as few replicas move as those rules allow from where they are (each move is a learner
//!   catch-up, a joint membership change and a delete: expensive).

use std::collections::{BTreeMap, BTreeSet, VecDeque};

pub type NodeId = u64;
pub type ShardId = u16;

/// Each shard's replicas, in no particular order.
pub type Assignment = BTreeMap<ShardId, BTreeSet<NodeId>>;

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PlacementError {
    #[error("replication factor {factor} needs at least {factor} active storage nodes; {active} are active")]
    TooFewNodes { factor: usize, active: usize },
    #[error("the replication factor must be 3 or 5, not {0}")]
    Factor(usize),
}

/// The placement `current` should move to, given the active storage nodes: replicas on inactive
/// nodes are replaced, shards short of `factor` replicas are filled, and replicas move from the
/// most to the least loaded nodes until counts differ by at most 1. Shards not in `current` are
/// placed from scratch (`shards` names them all).
pub fn rebalance(
    current: &Assignment,
    shards: impl IntoIterator<Item = ShardId>,
    active: &BTreeSet<NodeId>,
    factor: usize,
) -> Result<Assignment, PlacementError> {
    if factor != 3 && factor != 5 {
        return Err(PlacementError::Factor(factor));
    }
    if active.len() < factor {
        return Err(PlacementError::TooFewNodes {
            factor,
            active: active.len(),
        });
    }
    let mut placement: Assignment = shards
        .into_iter()
        .map(|shard| {
            let kept = current
                .get(&shard)
                .map(|nodes| nodes.intersection(active).copied().collect())
                .unwrap_or_default();
            (shard, kept)
        })
        .collect();
    let mut load: BTreeMap<NodeId, usize> = active.iter().map(|node| (*node, 0)).collect();
    for nodes in placement.values() {
        for node in nodes {
            *load.get_mut(node).expect("kept replicas are on active nodes") += 1;
        }
    }
    // Fill: each missing replica goes to the least loaded node the shard does not use yet.
    for nodes in placement.values_mut() {
        while nodes.len() < factor {
            let node = least_loaded(&load, |node| !nodes.contains(&node));
            nodes.insert(node);
            *load.get_mut(&node).expect("active") += 1;
        }
        // More than `factor` (a shard over-replicated by an unfinished move): the most loaded go.
        while nodes.len() > factor {
            let node = *nodes.iter().max_by_key(|node| (load[node], **node)).expect("not empty");
            nodes.remove(&node);
            *load.get_mut(&node).expect("active") -= 1;
        }
    }
    // Even out: while the fullest node holds two more than the emptiest, move one of its
    // replicas there. One always can: the fullest holds more shards than the emptiest, so at
    // least one of its shards has no replica on the emptiest. Each step lowers the sum of the
    // squared loads, so this ends.
    loop {
        let (&fullest, &most) = load
            .iter()
            .max_by_key(|(node, load)| (**load, std::cmp::Reverse(**node)))
            .expect("active");
        let (&emptiest, &least) = load.iter().min_by_key(|(node, load)| (**load, **node)).expect("active");
        if most <= least + 1 {
            break;
        }
        let shard = *placement
            .iter()
            .find(|(_, nodes)| nodes.contains(&fullest) && !nodes.contains(&emptiest))
            .map(|(shard, _)| shard)
            .expect("the fullest node has a shard the emptiest lacks");
        let nodes = placement.get_mut(&shard).expect("found");
        nodes.remove(&fullest);
        nodes.insert(emptiest);
        *load.get_mut(&fullest).expect("active") -= 1;
        *load.get_mut(&emptiest).expect("active") += 1;
    }
    Ok(placement)
}

fn least_loaded(load: &BTreeMap<NodeId, usize>, allowed: impl Fn(NodeId) -> bool) -> NodeId {
    *load
        .iter()
        .filter(|(node, _)| allowed(**node))
        .min_by_key(|(node, load)| (**load, **node))
        .map(|(node, _)| node)
        .expect("at least `factor` active nodes")
}

/// One replica to move: add it on `to` (learner, catch-up, joint change), then remove `from`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub struct Move {
    pub shard: ShardId,
    /// `None`: a replica added to a shard short of its factor.
    pub from: Option<NodeId>,
    /// `None`: a replica removed from an over-replicated shard.
    pub to: Option<NodeId>,
}

/// The moves that take `from` to `to`, pairing each shard's removed and added replicas.
pub fn moves_between(from: &Assignment, to: &Assignment) -> Vec<Move> {
    let empty = BTreeSet::new();
    let mut moves = Vec::new();
    let shards: BTreeSet<ShardId> = from.keys().chain(to.keys()).copied().collect();
    for shard in shards {
        let before = from.get(&shard).unwrap_or(&empty);
        let after = to.get(&shard).unwrap_or(&empty);
        let mut leaving = before.difference(after).copied();
        let mut joining = after.difference(before).copied();
        loop {
            match (leaving.next(), joining.next()) {
                (None, None) => break,
                (from, to) => moves.push(Move { shard, from, to }),
            }
        }
    }
    moves
}

/// Which replica should lead each shard so leader counts per node differ by at most 1 whenever
/// any choice among the replicas allows it, keeping `current` leaders where that is possible
/// (each change is a leader transfer). Starts from the current leaders (or the least-led
/// replica), then shifts leadership along chains "X leads a shard Y also holds" from the most
/// led node to one led at least two fewer times, until no such chain exists — which is when no
/// choice of leaders is more even.
pub fn balance_leaders(placement: &Assignment, current: &BTreeMap<ShardId, NodeId>) -> BTreeMap<ShardId, NodeId> {
    let mut led_by: BTreeMap<NodeId, BTreeSet<ShardId>> = placement
        .values()
        .flat_map(|nodes| nodes.iter().map(|node| (*node, BTreeSet::new())))
        .collect();
    let mut leader: BTreeMap<ShardId, NodeId> = BTreeMap::new();
    for (shard, nodes) in placement {
        let chosen = match current.get(shard) {
            Some(node) if nodes.contains(node) => *node,
            _ => *nodes
                .iter()
                .min_by_key(|node| (led_by[node].len(), **node))
                .expect("a shard has replicas"),
        };
        leader.insert(*shard, chosen);
        led_by.get_mut(&chosen).expect("a replica").insert(*shard);
    }
    while let Some(chain) = improving_chain(placement, &led_by) {
        // Shift one leadership along the chain: only its two ends change counts.
        for (shard, from, to) in chain {
            leader.insert(shard, to);
            led_by.get_mut(&from).expect("a replica").remove(&shard);
            led_by.get_mut(&to).expect("a replica").insert(shard);
        }
    }
    leader
}

/// The shortest chain `(shard, from, to)…` from a node leading `c` shards to one leading at most
/// `c - 2`, each step a shard its `from` leads and its `to` holds; most led sources first.
fn improving_chain(
    placement: &Assignment,
    led_by: &BTreeMap<NodeId, BTreeSet<ShardId>>,
) -> Option<Vec<(ShardId, NodeId, NodeId)>> {
    let least = led_by.values().map(BTreeSet::len).min()?;
    let mut sources: Vec<NodeId> = led_by
        .iter()
        .filter(|(_, led)| led.len() >= least + 2)
        .map(|(node, _)| *node)
        .collect();
    sources.sort_by_key(|node| (std::cmp::Reverse(led_by[node].len()), *node));
    for source in sources {
        let count = led_by[&source].len();
        let mut came_from: BTreeMap<NodeId, (NodeId, ShardId)> = BTreeMap::new();
        let mut queue = VecDeque::from([source]);
        let mut seen = BTreeSet::from([source]);
        while let Some(node) = queue.pop_front() {
            if led_by[&node].len() + 2 <= count {
                let mut chain = Vec::new();
                let mut at = node;
                while at != source {
                    let (previous, shard) = came_from[&at];
                    chain.push((shard, previous, at));
                    at = previous;
                }
                return Some(chain);
            }
            for shard in &led_by[&node] {
                for next in &placement[shard] {
                    if seen.insert(*next) {
                        came_from.insert(*next, (node, *shard));
                        queue.push_back(*next);
                    }
                }
            }
        }
    }
    None
}

#[cfg(test)]
mod tests;
