//! One clock per node for every shard group's timers, instead of one per group.
//!
//! openraft gives each group its own ticker, firing every `heartbeat × 13/64` (20 ms with the
//! default 100 ms heartbeat) whether or not anything is due: 50 wake-ups of a timer, a channel
//! and the group's core per second per group, on every node — most of what an idle cluster
//! spent (docs/BENCHMARKS.md, "Idle cost"). Here the groups' tickers are off
//! (`Config::enable_tick`) and one task per node does what they did:
//! - **Heartbeats**: `beats` sends one message per peer per heartbeat interval for every group
//!   this node leads, and a real heartbeat only for the groups that need one.
//! - **Elections**: a group this node does not lead, that may stand (`Groups::stands`: not
//!   refetching, a current copy or no leader heard for `STAND_BACK`), and that has heard from no
//!   leader (`Groups::heard_from_leader`) for `election_max` plus a jitter of up to half of
//!   `election_max − election_min` (its peers refuse every vote for `election_max` after their
//!   own last contact, so campaigning sooner is wasted), then for a timeout drawn between
//!   `election_min` and `election_max` after each attempt, is asked to campaign
//!   with a pre-vote (`trigger().elect(true)`). Its peers refuse the pre-vote while they are
//!   within their lease of a live leader (`Groups::within_lease`), so a stamp missed here can
//!   delay an election, never depose a live leader. The campaign is recorded first
//!   (`Groups::begin_campaign`): from then on this member accepts no beat of the current term.
//!
//! The clock sleeps until the first election timer is due (at least `CHECK_EVERY`, at most
//! `election_min`), and refreshes every group's standing (`Groups::refresh_standing`) at each
//! pass: a few wake-ups a second on an idle node whatever its number of groups.

use std::sync::Arc;
use std::time::Duration;

use openraft::ServerState;
use rand::Rng;
use tokio::sync::watch;
use tokio::time::Instant;

use super::Timing;
use super::groups::Groups;

/// The clock's finest grain: after a pass it sleeps at least this long.
const CHECK_EVERY: Duration = Duration::from_millis(50);
/// How long the clock waits for one group's core to take a trigger (its queue is bounded): a
/// group too busy to take it is skipped this round rather than holding up every other group.
const TRIGGER_WAIT: Duration = Duration::from_millis(20);

/// Drives every group's election timer on this node until it stops.
pub async fn run(groups: Arc<Groups>, timing: Timing, mut stopping: watch::Receiver<bool>) {
    let shards = groups.len();
    // Per group: when it may next campaign (pushed back by every contact with a leader).
    let mut election_due: Vec<Instant> = (0..shards).map(|_| Instant::now() + draw(timing)).collect();
    let mut wake = Instant::now() + CHECK_EVERY;
    loop {
        tokio::select! {
            () = tokio::time::sleep_until(wake) => {}
            _ = stopping.wait_for(|stop| *stop) => return,
        }
        groups.refresh_standing();
        let now = Instant::now();
        for (shard, due) in election_due.iter_mut().enumerate() {
            let shard = shard as u16;
            if let Some(heard) = groups.last_heard_from_leader(shard) {
                // Every contact restarts the timer (as a follower's election timer does), and
                // to past `election_max`: until then the peers that heard the same leader
                // refuse every vote (their lease), so an earlier campaign is only refused and
                // costs a timeout more.
                let after_contact = heard + timing.election_max;
                if *due < after_contact {
                    *due = after_contact + jitter(timing);
                }
            }
            // Most groups most of the time: a leader was heard from within the timeout.
            if now < *due {
                continue;
            }
            *due = now + draw(timing);
            let leading = groups
                .inspect(shard, |metrics| {
                    metrics.state == ServerState::Leader && metrics.running_state.is_ok()
                })
                .unwrap_or(false);
            if leading || !groups.stands(shard) {
                continue;
            }
            if !groups.begin_campaign(shard) {
                // A vote is being handled right now: look again next round.
                *due = now;
                continue;
            }
            let raft = groups.get(shard);
            let _ = tokio::time::timeout(TRIGGER_WAIT, raft.trigger().elect(true)).await;
        }
        // Sleep until the first timer is due (a live leader's contacts keep pushing them all
        // back, so an idle node wakes a few times a second), within [CHECK_EVERY, election_min]
        // (standing, refreshed at each pass, changes with time too).
        let now = Instant::now();
        let first_due = election_due.iter().min().copied().unwrap_or(now + timing.election_min);
        wake = first_due.clamp(now + CHECK_EVERY, now + timing.election_min.max(CHECK_EVERY));
    }
}

/// A spread for the first campaign after a leader's last contact, so the members do not all
/// stand at once: between 0 and half of `election_max − election_min`.
fn jitter(timing: Timing) -> Duration {
    let spread = timing.election_max.saturating_sub(timing.election_min).as_millis() as u64 / 2;
    Duration::from_millis(rand::rng().random_range(0..=spread))
}

/// An election timeout, drawn at random between the minimum and the maximum.
fn draw(timing: Timing) -> Duration {
    let (min, max) = (
        timing.election_min.as_millis() as u64,
        timing.election_max.as_millis() as u64,
    );
    Duration::from_millis(rand::rng().random_range(min..=max.max(min)))
}
