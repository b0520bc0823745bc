//! One clock per node for every shard group's timers, instead of one per group.
//!
//! openraft gives each group its own ticker, firing every `heartbeat × 13/64` (20 ms with the
//! default 100 ms heartbeat) whether or not anything is due: 50 wake-ups of a timer, a channel
//! and the group's core per second per group, on every node — most of what an idle cluster
//! spent (docs/BENCHMARKS.md, "Idle cost"). Here the groups' tickers are off
//! (`Config::enable_tick`) and one task per node does what they did:
//! - **Heartbeats**: every heartbeat interval, each group this node leads sends one
//!   (`trigger().heartbeat()`): the same appends as before, so the followers' leases (openraft's
//!   own) and the leader's quorum-acknowledged time (`lease.rs`) work unchanged.
//! - **Elections**: a group this node does not lead, that may stand (`Groups::stands`: not
//!   refetching, a current copy or no leader heard for `STAND_BACK`), and that has heard from no
//!   leader (`Groups::heard_from_leader`) for its election timeout — drawn at random between
//!   `election_min` and `election_max`, drawn again after each attempt — is asked to campaign
//!   with a pre-vote (`trigger().elect(true)`). openraft refuses that locally while its
//!   follower lease holds, so a stamp missed here can delay an election, never start one
//!   against a live leader.
//!
//! The clock checks elections every `CHECK_EVERY` (a coarser grain than openraft's 20 ms; a
//! failover takes an election timeout plus at most that).

use std::sync::Arc;
use std::time::Duration;

use openraft::ServerState;
use openraft::type_config::async_runtime::WatchReceiver;
use rand::Rng;
use tokio::sync::watch;
use tokio::time::Instant;

use super::Timing;
use super::groups::Groups;

/// How often the clock looks at every group's election timer.
const CHECK_EVERY: Duration = Duration::from_millis(50);
/// How long the clock waits for one group's core to take a trigger (its queue is bounded): a
/// group too busy to take it is skipped this round rather than holding up every other group.
const TRIGGER_WAIT: Duration = Duration::from_millis(20);

/// Drives every group's heartbeats and election timers on this node until it stops.
pub async fn run(groups: Arc<Groups>, timing: Timing, mut stopping: watch::Receiver<bool>) {
    let shards = groups.len();
    // Per group: when it may next campaign (pushed back by every contact with a leader).
    let mut election_due: Vec<Instant> = (0..shards).map(|_| Instant::now() + draw(timing)).collect();
    let mut next_heartbeat = Instant::now();
    let mut clock = tokio::time::interval(CHECK_EVERY);
    clock.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = clock.tick() => {}
            _ = stopping.wait_for(|stop| *stop) => return,
        }
        let now = Instant::now();
        let heartbeat_due = now >= next_heartbeat;
        if heartbeat_due {
            next_heartbeat = now + timing.heartbeat;
        }
        for (shard, due) in election_due.iter_mut().enumerate() {
            let shard = shard as u16;
            let raft = groups.get(shard);
            let leading = {
                let metrics = raft.metrics();
                let metrics = metrics.borrow_watched();
                metrics.state == ServerState::Leader && metrics.running_state.is_ok()
            };
            if leading {
                if heartbeat_due {
                    let _ = tokio::time::timeout(TRIGGER_WAIT, raft.trigger().heartbeat()).await;
                }
                continue;
            }
            if let Some(heard) = groups.last_heard_from_leader(shard) {
                // Every contact restarts the timer (as a follower's election timer does).
                let after_contact = heard + timing.election_min;
                if *due < after_contact {
                    *due = heard + draw(timing);
                }
            }
            if now < *due || !groups.stands(shard) {
                continue;
            }
            *due = now + draw(timing);
            let _ = tokio::time::timeout(TRIGGER_WAIT, raft.trigger().elect(true)).await;
        }
    }
}

/// An election timeout, drawn at random between the minimum and the maximum.
fn draw(timing: Timing) -> Duration {
    let (min, max) = (
        timing.election_min.as_millis() as u64,
        timing.election_max.as_millis() as u64,
    );
    Duration::from_millis(rand::rng().random_range(min..=max.max(min)))
}
