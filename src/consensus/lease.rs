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
use tokio::sync::watch;
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
    /// Per shard: the beats (`beats`) each peer accepted from this node as the leader.
    beat_acks: Vec<Mutex<BeatAcks>>,
    /// Per shard: bumped at every accepted beat, so waiting for the lease's return wakes up.
    renewed: Vec<watch::Sender<u64>>,
}

/// The beats peers accepted from this node as a shard's leader in one term.
#[derive(Debug, Default)]
struct BeatAcks {
    term: u64,
    /// Per peer, when the newest beat it accepted was sent (this node's clock).
    sent: Vec<(u64, Instant)>,
}

impl BeatAcks {
    fn record(&mut self, term: u64, peer: u64, sent: Instant) {
        if term > self.term {
            self.term = term;
            self.sent.clear();
        }
        if term < self.term {
            return;
        }
        match self.sent.iter_mut().find(|(node, _)| *node == peer) {
            Some((_, at)) => *at = (*at).max(sent),
            None => self.sent.push((peer, sent)),
        }
    }

    /// The send time of the newest beat of `term` a quorum of `voters` accepted (this node,
    /// one of them, accepts its own at once).
    fn quorum_acked(&self, term: u64, node_id: u64, voters: &[u64]) -> Option<Instant> {
        if term != self.term || !voters.contains(&node_id) {
            return None;
        }
        let others_needed = voters.len() / 2;
        let mut acked: Vec<Instant> = voters
            .iter()
            .filter(|voter| **voter != node_id)
            .filter_map(|voter| self.sent.iter().find(|(node, _)| node == voter).map(|(_, at)| *at))
            .collect();
        if others_needed == 0 || acked.len() < others_needed {
            return None;
        }
        acked.sort_unstable_by(|a, b| b.cmp(a));
        Some(acked[others_needed - 1])
    }
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
            beat_acks: (0..shards).map(|_| Mutex::new(BeatAcks::default())).collect(),
            renewed: (0..shards).map(|_| watch::channel(0).0).collect(),
        }
    }

    /// `peer` accepted the beat this node sent at `sent` as the shard's leader in `term`.
    /// Returns the send time of the newest beat a quorum of `voters` has accepted since.
    pub(super) fn beat_accepted(
        &self,
        shard: u16,
        term: u64,
        peer: u64,
        sent: Instant,
        voters: &[u64],
    ) -> Option<Instant> {
        let quorum = {
            let mut acks = self.beat_acks[shard as usize].lock().expect("beat acks lock");
            acks.record(term, peer, sent);
            acks.quorum_acked(term, self.node_id, voters)
        };
        self.renewed[shard as usize].send_modify(|count| *count = count.wrapping_add(1));
        quorum
    }

    /// Wakes up at every beat accepted for the shard.
    pub(super) fn renewals(&self, shard: u16) -> watch::Receiver<u64> {
        self.renewed[shard as usize].subscribe()
    }

    /// This node starts handing the shard's leadership of `term` over: its lease ends now.
    pub(super) fn hand_off(&self, shard: u16, term: u64) {
        *self.handed_off[shard as usize].lock().expect("hand-off lock") = Some((term, Instant::now()));
    }

    /// Whether this node handed the shard's leadership of `term` over. openraft keeps such a
    /// leader a leader (refusing writes, sending no heartbeats) until another member is
    /// elected: no beat may go out for it either, or the followers would never time out if the
    /// target does not take the leadership up.
    pub(super) fn handed_off_in(&self, shard: u16, term: u64) -> bool {
        matches!(*self.handed_off[shard as usize].lock().expect("hand-off lock"), Some((handed, _)) if handed == term)
    }

    /// How long a transfer's target has to be elected (see `hand_off`).
    pub(super) fn transfer_window(&self) -> Duration {
        self.transfer_window
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
        let voters: Vec<u64> = metrics.membership_config.membership().voter_ids().collect();
        let alone = voters == [self.node_id];
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
        // The newer of a quorum's acknowledgement of an append (openraft's) and of a beat.
        let by_appends = age.and_then(|age| now.checked_sub(age));
        let by_beats = self.beat_acks[shard as usize]
            .lock()
            .expect("beat acks lock")
            .quorum_acked(term, self.node_id, &voters);
        let lease = by_appends
            .max(by_beats)
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
    /// Beats accepted (which renew the lease without changing the metrics).
    pub(super) renewals: watch::Receiver<u64>,
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
            // The metrics change at every acknowledgement of an append a quorum sends back;
            // `renewals` at every accepted beat.
            let changed = async {
                tokio::select! {
                    changed = self.metrics.changed() => changed.is_ok(),
                    changed = self.renewals.changed() => changed.is_ok(),
                }
            };
            match tokio::time::timeout_at(deadline, changed).await {
                Ok(true) => {}
                Ok(false) | Err(_) => return false,
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

    #[test]
    fn a_beat_counts_once_a_quorum_of_voters_accepted_it() {
        let t0 = Instant::now();
        let (t1, t2) = (t0 + Duration::from_millis(100), t0 + Duration::from_millis(200));
        let mut acks = BeatAcks::default();
        // Three voters: this node (1) and one more make a quorum.
        assert_eq!(acks.quorum_acked(4, 1, &[1, 2, 3]), None, "nobody accepted anything");
        acks.record(4, 2, t1);
        assert_eq!(acks.quorum_acked(4, 1, &[1, 2, 3]), Some(t1));
        acks.record(4, 3, t2);
        assert_eq!(
            acks.quorum_acked(4, 1, &[1, 2, 3]),
            Some(t2),
            "the newest a quorum accepted"
        );
        // An older answer arriving late does not move it back.
        acks.record(4, 3, t0);
        assert_eq!(acks.quorum_acked(4, 1, &[1, 2, 3]), Some(t2));
        // Five voters: two others are needed, so the older of the two newest counts.
        acks.record(4, 4, t0);
        assert_eq!(acks.quorum_acked(4, 1, &[1, 2, 3, 4, 5]), Some(t1));
        // Peers that are not voters (learners) do not count.
        assert_eq!(acks.quorum_acked(4, 1, &[1, 5, 6]), None);
        // Not a voter itself: no lease.
        assert_eq!(acks.quorum_acked(4, 9, &[2, 3, 4]), None);
        // Another term: nothing of this one counts for it.
        assert_eq!(acks.quorum_acked(5, 1, &[1, 2, 3]), None);
        acks.record(5, 2, t2);
        assert_eq!(acks.quorum_acked(4, 1, &[1, 2, 3]), None, "the old term is gone");
        assert_eq!(acks.quorum_acked(5, 1, &[1, 2, 3]), Some(t2));
        acks.record(4, 3, t2);
        assert_eq!(
            acks.quorum_acked(5, 1, &[1, 2, 3, 4, 5]),
            None,
            "a late answer of an old term is dropped"
        );
    }

    #[test]
    fn accepted_beats_make_a_lease_and_a_transfer_ends_it() {
        let book = LeaseBook::new(1, Duration::from_millis(400), Duration::from_millis(1000), 2);
        let sent = Instant::now();
        assert_eq!(book.beat_accepted(0, 3, 2, sent, &[1, 2, 3]), Some(sent));
        assert_eq!(
            book.beat_accepted(1, 3, 2, sent, &[1, 2, 3, 4, 5]),
            None,
            "one of four others"
        );
        let renewals = book.renewals(0);
        assert!(!renewals.has_changed().unwrap());
        book.beat_accepted(0, 3, 3, sent, &[1, 2, 3]);
        assert!(renewals.has_changed().unwrap(), "waiters for the lease wake up");
        assert!(book.counts_after_hand_off(0, 3, sent));
        book.hand_off(0, 3);
        assert!(
            !book.counts_after_hand_off(0, 3, Instant::now()),
            "no lease right after a hand-off"
        );
    }
}
