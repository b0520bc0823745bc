//! Leadership as a lease confirmed by a quorum (as etcd's CheckQuorum and TiKV/CockroachDB
//! leases do), read from the engine's own clock: `last_quorum_acked` is the send time of the
//! newest heartbeat or append a quorum acknowledged.
//!
//! Why it is safe: a follower that acknowledged a message sent at `t` refuses every vote until
//! `election_max` after it received it (openraft's follower lease), and elects itself no sooner
//! than `election_min` after it. So no other member can lead before `t + election_min` by any
//! clock; the lease ends at `t + 4/5 × election_min` on this node's monotonic clock. The fifth
//! left over (and the half of `election_max − election_min` beyond it) absorbs clock-rate drift
//! between nodes (NTP slews a monotonic clock by at most 0.05 %) and the time between checking
//! the lease and acting on it. Counting from the send time puts the network delay on the safe
//! side. A leadership transfer is the one vote followers grant inside their lease: this node
//! drops its lease as it starts one, until a quorum acknowledges a message it sent after the
//! target's election would have timed out (`handed_off`; a transfer that did not happen does
//! not leave the shard without a lease for the rest of the term).
//!
//! openraft itself does not step a cut-off leader down (it keeps its role and only refuses new
//! proposals), so "leading" read from the role alone is not enough: whatever a leader does on
//! its own — calling agents, relaying their streams, flushing the archive, answering reads from
//! its state — checks the lease.

use std::sync::Arc;
use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use openraft::ServerState;
use openraft::type_config::alias::WatchReceiverOf;
use openraft::type_config::async_runtime::WatchReceiver;
use tokio::time::Instant;

use super::types::TypeConfig;

type MetricsReceiver = WatchReceiverOf<TypeConfig, openraft::RaftMetrics<TypeConfig>>;
type ServerReceiver = WatchReceiverOf<TypeConfig, openraft::metrics::RaftServerMetrics<TypeConfig>>;

/// This node's lease on a shard's leadership.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Lease {
    /// The term this node leads the shard in.
    pub term: u64,
    /// Until when no other member can lead the shard (this node's monotonic clock).
    pub until: Instant,
}

/// The lease length for an election timeout minimum (see the module's comment).
pub fn length(election_min: Duration) -> Duration {
    election_min * 4 / 5
}

/// What every lease check shares besides the engine's metrics.
pub(super) struct LeaseBook {
    node_id: u64,
    length: Duration,
    /// How long after a hand-off the target's election may still be granted (`hand_off`).
    transfer_window: Duration,
    /// Per shard: the term in which this node last handed the leadership to another member,
    /// and when. Followers grant a transfer's vote inside their lease.
    handed_off: Vec<Mutex<Option<(u64, Instant)>>>,
    /// Per shard: the last check found the lease holding (an expiry is counted once).
    held: Vec<AtomicBool>,
}

impl LeaseBook {
    /// `election_max`: the target of a transfer runs its election (granted inside the
    /// followers' leases) within it.
    pub(super) fn new(node_id: u64, length: Duration, election_max: Duration, shards: u16) -> LeaseBook {
        LeaseBook {
            node_id,
            length,
            transfer_window: election_max * 2,
            handed_off: (0..shards).map(|_| Mutex::new(None)).collect(),
            held: (0..shards).map(|_| AtomicBool::new(false)).collect(),
        }
    }

    /// This node starts handing the shard's leadership of `term` over: its lease ends now.
    pub(super) fn hand_off(&self, shard: u16, term: u64) {
        *self.handed_off[shard as usize].lock().expect("hand-off lock") = Some((term, Instant::now()));
    }

    /// Whether a quorum's acknowledgement of a message sent at `acked` may count for `term`: not
    /// while a transfer this node started in `term` may still elect its target.
    fn counts_after_hand_off(&self, shard: u16, term: u64, acked: Instant) -> bool {
        match *self.handed_off[shard as usize].lock().expect("hand-off lock") {
            Some((handed_term, at)) if handed_term == term => acked > at + self.transfer_window,
            _ => true,
        }
    }

    /// The lease this node holds on `shard` now, by the engine's metrics.
    pub(super) fn lease(&self, shard: u16, metrics: &openraft::RaftMetrics<TypeConfig>) -> Option<Lease> {
        if metrics.state != ServerState::Leader || metrics.current_leader != Some(self.node_id) {
            return None;
        }
        let term = metrics.vote.leader_id().term;
        let now = Instant::now();
        let mut voters = metrics.membership_config.membership().voter_ids();
        let alone = voters.next() == Some(self.node_id) && voters.next().is_none();
        // How long ago the acknowledged message was sent, by the engine's clock.
        let age = if alone {
            // A quorum of one: nobody else can be elected.
            Some(Duration::ZERO)
        } else {
            metrics
                .last_quorum_acked
                .as_ref()
                .map(|acked| openraft::Instant::elapsed(&**acked))
        };
        let lease = age
            .and_then(|age| now.checked_sub(age))
            .filter(|acked| self.counts_after_hand_off(shard, term, *acked))
            .map(|acked| acked + self.length)
            .filter(|until| *until > now)
            .map(|until| Lease { term, until });
        let held = &self.held[shard as usize];
        if lease.is_some() {
            held.store(true, Ordering::Relaxed);
        } else if held.swap(false, Ordering::Relaxed) {
            // Still the leader by its role, but no quorum heard within the lease.
            metrics::counter!("fleetlm_shard_lease_expired_total", "shard" => shard.to_string()).increment(1);
            tracing::info!(shard, term, "leadership lease expired: no quorum heard within it");
        }
        lease
    }
}

/// Follows this node's lease on one shard.
pub struct LeaseWatch {
    pub(super) shard: u16,
    pub(super) book: Arc<LeaseBook>,
    pub(super) metrics: MetricsReceiver,
    pub(super) server: ServerReceiver,
}

impl LeaseWatch {
    pub fn now(&self) -> Option<Lease> {
        self.book.lease(self.shard, &self.metrics.borrow_watched())
    }

    /// Whether this node holds the lease of `term` now.
    pub fn holds(&self, term: u64) -> bool {
        self.now().is_some_and(|lease| lease.term == term)
    }

    /// Resolves once this node no longer holds the lease of `term` (at once if it does not now):
    /// at its expiry unless a quorum renewed it meanwhile, or at a change of role or term.
    pub async fn lost(&mut self, term: u64) {
        loop {
            let Some(lease) = self.now().filter(|lease| lease.term == term) else {
                return;
            };
            tokio::select! {
                () = tokio::time::sleep_until(lease.until) => {}
                changed = self.server.changed() => {
                    if changed.is_err() {
                        return;
                    }
                }
            }
        }
    }

    /// Resolves `true` once this node holds the lease of `term` again, `false` once it no longer
    /// leads the shard in `term` (another member leads, or the group stopped) or after `patience`.
    pub async fn regained(&mut self, term: u64, patience: Duration) -> bool {
        let deadline = Instant::now() + patience;
        loop {
            if self.holds(term) {
                return true;
            }
            {
                let metrics = self.metrics.borrow_watched();
                let leading = metrics.state == ServerState::Leader && metrics.current_leader == Some(self.book.node_id);
                if !leading || metrics.vote.leader_id().term != term {
                    return false;
                }
            }
            // The metrics change at every acknowledgement a quorum sends back.
            match tokio::time::timeout_at(deadline, self.metrics.changed()).await {
                Ok(Ok(())) => {}
                Ok(Err(_)) | Err(_) => return false,
            }
        }
    }

    /// Resolves once the lease of `term` has lapsed and not come back within `grace` (a
    /// scheduling hiccup that delayed a heartbeat's acknowledgement is not a lost leadership),
    /// or this node no longer leads the shard in `term`.
    pub async fn ended(mut self, term: u64, grace: Duration) {
        loop {
            self.lost(term).await;
            if !self.regained(term, grace).await {
                return;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_lease_is_well_inside_the_election_timeout() {
        let election_min = Duration::from_millis(500);
        let lease = length(election_min);
        assert_eq!(lease, Duration::from_millis(400));
        assert!(lease < election_min, "no follower elects itself before election_min");
    }
}
