//! This node's shard groups: one openraft instance per shard, each kept running on its own.
//!
//! openraft stops a group for good at its first storage error (a log append that failed because
//! the disk is full, an entry it cannot read back). Left so, one full disk would take the shard
//! out on that node until a restart of the whole process. Here every group has a keeper that
//! watches it and, when it stopped with an error, starts it again from what its storage holds
//! (its vote and durable log, reopened) and the same state machine (nothing applied is applied
//! twice), after a backoff that grows while the error persists. The other groups never notice.
//!
//! A restarted group is a follower with the log it had made durable: for the leader it is a
//! replica that lagged, and it catches up by the ordinary replication (or a snapshot). What was
//! not durable was never acknowledged by this node, so dropping it loses nothing.

use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, RwLock};
use std::time::{Duration, Instant};

use openraft::Config;
use openraft::type_config::async_runtime::WatchReceiver;
use tokio::sync::watch;

use super::log_store::{Settled, ShardLogStore};
use super::network::ShardNetwork;
use super::state_machine::ShardStateMachine;
use super::types::Raft;
use crate::wal::Wal;

/// The first wait before a stopped group is started again; doubled at each failure in a row.
const FIRST_BACKOFF: Duration = Duration::from_millis(200);
const MAX_BACKOFF: Duration = Duration::from_secs(5);
/// A member whose copy of the shard's state is not current stands for election only after it
/// has heard from no leader for this long (`Groups::refresh_standing`): a member with a current
/// copy, which would write at once, wins first; without one, the shard is still led.
pub const STAND_BACK: Duration = Duration::from_secs(2);
/// A group that ran this long since its last restart starts the backoff over.
const HEALTHY_AFTER: Duration = Duration::from_secs(30);
/// How long a stopping instance may take to let go of its tasks.
const SHUTDOWN_TIMEOUT: Duration = Duration::from_secs(5);
/// A damaged log whose refetch could not begin (too few other members could vote, or its own
/// records could not be written) is tried again after this long, doubled at each failure.
const REFETCH_RETRY_FIRST: Duration = Duration::from_secs(5);
const REFETCH_RETRY_MAX: Duration = Duration::from_secs(300);

/// Every shard's group on this node, by shard.
pub struct Groups {
    slots: Vec<Slot>,
    /// What `Slot::leader_contact_ms` and `Slot::lease_contact_ms` count from.
    started: Instant,
    /// How long after a leader's contact this member refuses to elect anyone else (the
    /// follower lease: `within_lease`).
    lease: Duration,
}

/// The engine's metrics of a group, as a watch.
type MetricsReceiver = openraft::type_config::alias::WatchReceiverOf<
    super::types::TypeConfig,
    openraft::RaftMetrics<super::types::TypeConfig>,
>;

struct Slot {
    raft: RwLock<Raft>,
    /// The running instance's metrics (kept with it, so the clocks that look at every group
    /// many times a second borrow them without cloning a handle each time).
    metrics: RwLock<MetricsReceiver>,
    /// Counts the restarts: watchers of a stopped instance move to the new one when it changes.
    generation: watch::Sender<u64>,
    /// Why the group is stopped now (between its failure and its restart).
    stopped: RwLock<Option<String>>,
    /// The shard's log is being refetched here (see `refetch`): the group neither stands for
    /// election nor votes.
    refetching: AtomicBool,
    /// This node's writer holds a current copy of the shard's state (or leads it): elected, it
    /// would write at once, without the archive. Set by the writer (`set_copy_current`).
    copy_current: AtomicBool,
    /// When a leader last reached this member with an append or a beat, or this member granted
    /// a vote (ms since `Groups::started`): restarts the election timer.
    leader_contact_ms: AtomicU64,
    /// When this member last promised a leader not to elect anyone else for a lease: it accepted
    /// its append or beat, or (as that leader) a quorum accepted its beat (ms since
    /// `Groups::started`). Unlike `leader_contact_ms`, a granted vote does not count.
    lease_contact_ms: AtomicU64,
    /// What this member committed to by its votes and campaigns, against which a beat of an
    /// older term is refused (see `accept_beat`). Held across a vote's handling.
    votes: tokio::sync::Mutex<VoteRecord>,
    /// The commit index (shard log index) the shard's leader named in the newest beat this
    /// member accepted, and when (ms since `Groups::started`); `u64::MAX`: none since start.
    leader_committed: AtomicU64,
    beat_ms: AtomicU64,
    /// Whether the running instance's election timer is on, as last set.
    electing: AtomicBool,
    /// This member does not stand for election for the shard (it still votes): set on a node
    /// that handed its leaderships over before it stops (`Groups::stand_down`).
    standing_down: AtomicBool,
    /// The generation of the instance the group's keeper is asked to restart (`Groups::restart`);
    /// `u64::MAX`: none yet.
    restarts_asked: watch::Sender<u64>,
    /// Refetches of a damaged log that could not begin and were put off (`keep_running`).
    postponed_refetches: AtomicU64,
    /// Counts the refetches of the shard's log begun on this node since start (see `refetch`):
    /// held while one begins or ends, so an older one never ends a newer one.
    refetch_epoch: tokio::sync::Mutex<u64>,
}

/// What a group is made of, kept to start it again.
#[derive(Clone)]
pub struct GroupParts {
    pub node_id: u64,
    pub shard: u16,
    pub config: Arc<Config>,
    pub network: ShardNetwork,
    pub wal: Arc<Wal>,
    pub machine: ShardStateMachine,
    /// The node's data directory (where a refetch's records live, see `refetch`).
    pub data_dir: PathBuf,
}

impl GroupParts {
    /// Opens the shard's log as it is on disk now and starts an instance over it; `Settled`
    /// tells when the appends the instance made are all answered.
    pub async fn start(&self) -> Result<(Raft, Settled), String> {
        let mut log = ShardLogStore::open(self.wal.clone(), self.shard).map_err(|e| e.to_string())?;
        let settled = log.settled();
        let durable_end = openraft::storage::RaftLogStorage::get_log_state(&mut log)
            .await
            .map_err(|e| format!("shard {}: cannot read its log: {e}", self.shard))?
            .last_log_id;
        if self.machine.rewind_to_durable(durable_end) {
            metrics::counter!("fleetlm_consensus_applied_rewinds_total").increment(1);
        }
        let raft = Raft::new(
            self.node_id,
            self.config.clone(),
            self.network.clone(),
            log,
            self.machine.clone(),
        )
        .await
        .map_err(|e| format!("shard {}: cannot start its consensus group: {e}", self.shard))?;
        Ok((raft, settled))
    }
}

/// What a member's votes and campaigns bind it to on one shard.
#[derive(Debug, Default)]
pub struct VoteRecord {
    /// The highest term this member granted a vote in.
    pub granted_term: u64,
    /// When this member last started a campaign (a pre-vote, then perhaps a vote for itself).
    pub campaigned: Option<Instant>,
}

impl Groups {
    /// `lease`: how long a member refuses to elect anyone else after a leader's contact
    /// (`election_max`, as openraft's own follower lease).
    pub fn new(rafts: Vec<Raft>, lease: Duration) -> Groups {
        Groups {
            slots: rafts
                .into_iter()
                .map(|raft| Slot {
                    metrics: RwLock::new(raft.metrics()),
                    raft: RwLock::new(raft),
                    generation: watch::channel(0).0,
                    stopped: RwLock::new(None),
                    refetching: AtomicBool::new(false),
                    copy_current: AtomicBool::new(false),
                    // As if a leader had just been heard from: a member starting up does not
                    // stand before it has had the chance to hear from the current one.
                    leader_contact_ms: AtomicU64::new(0),
                    // The same for the follower lease: a member restarted right after it accepted
                    // a beat keeps its promise (openraft's own lease starts expired).
                    lease_contact_ms: AtomicU64::new(0),
                    votes: tokio::sync::Mutex::new(VoteRecord::default()),
                    leader_committed: AtomicU64::new(u64::MAX),
                    beat_ms: AtomicU64::new(u64::MAX),
                    electing: AtomicBool::new(true),
                    standing_down: AtomicBool::new(false),
                    restarts_asked: watch::channel(u64::MAX).0,
                    postponed_refetches: AtomicU64::new(0),
                    refetch_epoch: tokio::sync::Mutex::new(0),
                })
                .collect(),
            started: Instant::now(),
            lease,
        }
    }

    /// The shard's running instance (or the stopped one, until it is replaced).
    pub fn get(&self, shard: u16) -> Raft {
        self.slots[shard as usize].raft.read().expect("group lock").clone()
    }

    pub fn try_get(&self, shard: u16) -> Option<Raft> {
        self.slots
            .get(shard as usize)
            .map(|slot| slot.raft.read().expect("group lock").clone())
    }

    /// Reads the shard's running instance's metrics (`None`: no such shard).
    pub fn inspect<R>(
        &self,
        shard: u16,
        read: impl FnOnce(&openraft::RaftMetrics<super::types::TypeConfig>) -> R,
    ) -> Option<R> {
        let slot = self.slots.get(shard as usize)?;
        let metrics = slot.metrics.read().expect("group lock");
        Some(read(&metrics.borrow_watched()))
    }

    pub fn len(&self) -> usize {
        self.slots.len()
    }

    pub fn all(&self) -> Vec<Raft> {
        (0..self.slots.len() as u16).map(|shard| self.get(shard)).collect()
    }

    /// Changes at each restart of the shard's group.
    pub fn generation(&self, shard: u16) -> watch::Receiver<u64> {
        self.slots[shard as usize].generation.subscribe()
    }

    /// Why the shard's group is stopped here, while it waits to be started again.
    pub fn stopped(&self, shard: u16) -> Option<String> {
        self.slots[shard as usize].stopped.read().expect("group lock").clone()
    }

    /// Whether the shard's log is being refetched here.
    pub fn refetching(&self, shard: u16) -> bool {
        self.slots
            .get(shard as usize)
            .is_some_and(|slot| slot.refetching.load(Ordering::Acquire))
    }

    /// The shard's refetch epoch (see `Slot::refetch_epoch`).
    pub fn refetch_epoch(&self, shard: u16) -> &tokio::sync::Mutex<u64> {
        &self.slots[shard as usize].refetch_epoch
    }

    /// Starts or ends the refetch of the shard's log: while it lasts, the group does not stand
    /// for election (and `network` refuses the votes it is asked for).
    pub fn set_refetching(&self, shard: u16, refetching: bool) {
        let slot = &self.slots[shard as usize];
        let current = slot.raft.write().expect("group lock");
        slot.refetching.store(refetching, Ordering::Release);
        self.apply_standing(slot, &current, true);
    }

    /// Whether this node's writer holds a current copy of the shard's state (see `STAND_BACK`).
    pub fn set_copy_current(&self, shard: u16, current: bool) {
        let Some(slot) = self.slots.get(shard as usize) else {
            return;
        };
        if slot.copy_current.swap(current, Ordering::AcqRel) != current {
            let raft = slot.raft.read().expect("group lock");
            self.apply_standing(slot, &raft, false);
        }
    }

    /// Whether this member stands for election for the shard (`false`: it stands down, as a
    /// node that handed its leaderships over before it stops). It still votes either way.
    pub fn stand_down(&self, shard: u16, down: bool) {
        let Some(slot) = self.slots.get(shard as usize) else {
            return;
        };
        if slot.standing_down.swap(down, Ordering::AcqRel) != down {
            let raft = slot.raft.read().expect("group lock");
            self.apply_standing(slot, &raft, false);
        }
    }

    /// Asks the shard's keeper to restart its instance of `generation` (`Groups::generation`)
    /// over the same log, as `restart_if_transfer_stalls` does; nothing if another instance runs
    /// by then. The new instance starts as a follower and campaigns like any other member.
    pub fn restart(&self, shard: u16, generation: u64) {
        if let Some(slot) = self.slots.get(shard as usize) {
            slot.restarts_asked.send_replace(generation);
        }
    }

    /// Whether this member stands down from the shard's elections (`stand_down`).
    pub fn standing_down(&self, shard: u16) -> bool {
        self.slots
            .get(shard as usize)
            .is_some_and(|slot| slot.standing_down.load(Ordering::Acquire))
    }

    /// How many refetches of the shard's damaged log could not begin and were put off.
    pub fn postponed_refetches(&self, shard: u16) -> u64 {
        self.slots
            .get(shard as usize)
            .map_or(0, |slot| slot.postponed_refetches.load(Ordering::Acquire))
    }

    pub fn copy_current(&self, shard: u16) -> bool {
        self.slots
            .get(shard as usize)
            .is_some_and(|slot| slot.copy_current.load(Ordering::Acquire))
    }

    fn now_ms(&self) -> u64 {
        self.started.elapsed().as_millis() as u64
    }

    /// A leader reached this member's group with an append it accepted: the election timer
    /// restarts, and the member refuses to elect anyone else for a lease.
    pub fn heard_from_leader(&self, shard: u16) {
        if let Some(slot) = self.slots.get(shard as usize) {
            let now = self.now_ms();
            slot.leader_contact_ms.store(now, Ordering::Release);
            slot.lease_contact_ms.store(now, Ordering::Release);
        }
    }

    /// This member granted a vote: its election timer restarts (as a leader's append does), but
    /// it promises nothing about other votes (as openraft's lease, which an uncommitted vote does
    /// not renew).
    pub fn granted_vote(&self, shard: u16) {
        if let Some(slot) = self.slots.get(shard as usize) {
            slot.leader_contact_ms.store(self.now_ms(), Ordering::Release);
        }
    }

    /// This node leads the shard and a quorum accepted its beat: it too refuses to elect anyone
    /// else for a lease (as openraft's leader does while its quorum-acknowledged time is fresh).
    pub fn confirmed_as_leader(&self, shard: u16) {
        if let Some(slot) = self.slots.get(shard as usize) {
            slot.lease_contact_ms.store(self.now_ms(), Ordering::Release);
        }
    }

    /// Whether this member promised a leader, within the last lease, not to elect anyone else:
    /// it then refuses votes (other than a leadership transfer's) and pre-votes.
    pub fn within_lease(&self, shard: u16) -> bool {
        self.slots.get(shard as usize).is_some_and(|slot| {
            self.now_ms()
                .saturating_sub(slot.lease_contact_ms.load(Ordering::Acquire))
                < self.lease.as_millis() as u64
        })
    }

    /// Held while a vote is handled: a beat is not accepted meanwhile (`accept_beat`).
    pub async fn vote_record(&self, shard: u16) -> tokio::sync::MutexGuard<'_, VoteRecord> {
        self.slots[shard as usize].votes.lock().await
    }

    /// Accepts a beat of `term`'s leader if this member is bound by nothing newer: it granted
    /// no vote in a later term, started no campaign within two leases, no vote is being handled
    /// now, and `follows` (the engine's view, read here, after any vote in flight) says it
    /// follows that leader. Accepted, the beat restarts the election timer and the lease, as
    /// an append would.
    pub fn accept_beat(&self, shard: u16, term: u64, follows: impl FnOnce() -> bool) -> bool {
        let Some(slot) = self.slots.get(shard as usize) else {
            return false;
        };
        let Ok(record) = slot.votes.try_lock() else {
            return false;
        };
        if record.granted_term > term || record.campaigned.is_some_and(|at| at.elapsed() < self.lease * 2) {
            return false;
        }
        if !follows() {
            return false;
        }
        self.heard_from_leader(shard);
        true
    }

    /// This member accepted a beat naming `committed` (a shard log index) as the leader's commit
    /// index.
    pub fn note_leader_committed(&self, shard: u16, committed: u64) {
        if let Some(slot) = self.slots.get(shard as usize) {
            slot.leader_committed.store(committed, Ordering::Release);
            slot.beat_ms.store(self.now_ms(), Ordering::Release);
        }
    }

    /// The leader's commit index as its newest accepted beat named it, and how long ago that
    /// beat came; `None` if none came since this node started.
    pub fn leader_committed(&self, shard: u16) -> Option<(u64, Duration)> {
        let slot = self.slots.get(shard as usize)?;
        let at = slot.beat_ms.load(Ordering::Acquire);
        let committed = slot.leader_committed.load(Ordering::Acquire);
        (at != u64::MAX && committed != u64::MAX)
            .then(|| (committed, Duration::from_millis(self.now_ms().saturating_sub(at))))
    }

    /// Records that this member starts a campaign for the shard, unless a vote is being handled
    /// (then it does not campaign this round). From then on, beats of the current term are
    /// refused for two leases: a member must not promise a leader its loyalty while it may
    /// be electing itself.
    pub fn begin_campaign(&self, shard: u16) -> bool {
        let Some(slot) = self.slots.get(shard as usize) else {
            return false;
        };
        let Ok(mut record) = slot.votes.try_lock() else {
            return false;
        };
        record.campaigned = Some(Instant::now());
        true
    }

    /// When a leader last reached this member's group with an append (this node's start when
    /// none has yet).
    pub fn last_heard_from_leader(&self, shard: u16) -> Option<tokio::time::Instant> {
        let slot = self.slots.get(shard as usize)?;
        let at = self.started + Duration::from_millis(slot.leader_contact_ms.load(Ordering::Acquire));
        Some(tokio::time::Instant::from_std(at))
    }

    /// Whether the group may stand for election now (see `apply_standing`).
    pub fn stands(&self, shard: u16) -> bool {
        self.slots
            .get(shard as usize)
            .is_some_and(|slot| slot.electing.load(Ordering::Acquire))
    }

    /// Turns each group's election timer on or off as its standing now says: off while the
    /// log is refetched or the member stands down; off while this node's copy of the state is not current and a leader
    /// was heard from within `STAND_BACK`; on otherwise.
    pub fn refresh_standing(&self) {
        for slot in &self.slots {
            let raft = slot.raft.read().expect("group lock");
            self.apply_standing(slot, &raft, false);
        }
    }

    /// Sets the instance's election timer from the slot's standing (`force`: even if it seems
    /// set already, as for a new instance).
    fn apply_standing(&self, slot: &Slot, raft: &Raft, force: bool) {
        let heard_ago =
            (self.started.elapsed().as_millis() as u64).saturating_sub(slot.leader_contact_ms.load(Ordering::Acquire));
        let stands = !slot.refetching.load(Ordering::Acquire)
            && !slot.standing_down.load(Ordering::Acquire)
            && (slot.copy_current.load(Ordering::Acquire) || heard_ago >= STAND_BACK.as_millis() as u64);
        if slot.electing.swap(stands, Ordering::AcqRel) != stands || force {
            raft.runtime_config().elect(stands);
        }
    }

    fn replace(&self, shard: u16, raft: Raft) {
        let slot = &self.slots[shard as usize];
        let mut current = slot.raft.write().expect("group lock");
        // Under the lock `set_refetching` takes too, so neither misses the other.
        self.apply_standing(slot, &raft, true);
        *slot.metrics.write().expect("group lock") = raft.metrics();
        *current = raft;
        drop(current);
        *slot.stopped.write().expect("group lock") = None;
        slot.generation.send_modify(|generation| *generation += 1);
    }

    fn set_stopped(&self, shard: u16, reason: String) {
        *self.slots[shard as usize].stopped.write().expect("group lock") = Some(reason);
    }
}

/// Keeps the shard's group running until `stopping` is set: waits for the instance to stop on
/// an error (or for a restart asked for it, `Groups::restart`), then starts a new one over the
/// same storage and state machine.
pub async fn keep_running(
    groups: Arc<Groups>,
    mut parts: GroupParts,
    mut settled: Settled,
    mut stopping: watch::Receiver<bool>,
) {
    let shard = parts.shard;
    let mut backoff = FIRST_BACKOFF;
    let mut started = Instant::now();
    let mut restarts_asked = groups.slots[shard as usize].restarts_asked.subscribe();
    // Damage found at an earlier stop whose refetch could not begin: tried again by a restart
    // at `retry_at`.
    let mut postponed: Option<Postponed> = None;
    let mut refetch_retry = REFETCH_RETRY_FIRST;
    loop {
        let raft = groups.get(shard);
        let generation = *groups.generation(shard).borrow();
        let retry_at = postponed.as_ref().map(|postponed| postponed.retry_at);
        let reason = tokio::select! {
            biased;
            _ = stopping.wait_for(|stop| *stop) => return,
            reason = failure(&raft) => reason,
            // A request for this instance (one for an earlier instance is stale).
            Ok(_) = restarts_asked.wait_for(|asked| *asked == generation) => Some(StopReason::Asked),
            () = sleep_until_some(retry_at) => Some(StopReason::Asked),
        };
        let failed = match reason {
            // Shut down on purpose (a node that refuses to take part stops its groups).
            Some(StopReason::ShutDown) => return,
            Some(StopReason::Failed(reason)) => Some(reason),
            Some(StopReason::Asked) => None,
            // Shut down by this node (which sets `stopping` first).
            None if *stopping.borrow() => return,
            // Its core ended without saying why (a panic in it).
            None => Some("its core ended unexpectedly".to_string()),
        };
        if started.elapsed() >= HEALTHY_AFTER {
            backoff = FIRST_BACKOFF;
        }
        match &failed {
            Some(reason) => {
                tracing::warn!(shard, %reason, retry_in = ?backoff, "a shard's consensus group stopped on an error here; it starts again from its durable log");
                metrics::counter!("fleetlm_consensus_group_restarts_total", "shard" => shard.to_string()).increment(1);
                groups.set_stopped(shard, format!("its consensus group stopped here: {reason}"));
            }
            None => {
                tracing::info!(
                    shard,
                    "a shard's consensus group restarts over its durable log, as asked"
                );
                metrics::counter!("fleetlm_consensus_group_restarts_asked_total").increment(1);
                groups.set_stopped(shard, "its consensus group is restarting here".to_string());
                // The new instance stands back like a member that just heard from a leader: a
                // member that gave its leadership up, and is asked to restart because nobody
                // took it, must not win it straight back unless its copy is current.
                groups.granted_vote(shard);
            }
        }
        let shut_down = tokio::time::timeout(SHUTDOWN_TIMEOUT, raft.shutdown()).await.is_ok();
        // The lower of two damaged entries: the cut must come before both.
        let damage = match (settled.damage(), postponed.take()) {
            (Some(found), Some(earlier)) if found.index < earlier.damage.index => Some((found, earlier.out_of_votes)),
            (_, Some(earlier)) => Some((earlier.damage, earlier.out_of_votes)),
            (found, None) => found.map(|found| (found, false)),
        };
        // An append the stopped instance queued may still land: reopen the log only after.
        tokio::select! {
            biased;
            _ = stopping.wait_for(|stop| *stop) => return,
            () = settled.wait() => {}
        }
        // Never cut a log under an instance that may still be running, nor on a node stopping.
        if let Some((damage, out_of_votes)) = damage.filter(|_| shut_down && !*stopping.borrow()) {
            match refetch_damaged_log(&groups, &parts, damage.clone(), out_of_votes, &stopping).await {
                Refetch::Postponed { out_of_votes } => {
                    groups.slots[shard as usize]
                        .postponed_refetches
                        .fetch_add(1, Ordering::AcqRel);
                    metrics::counter!("fleetlm_replica_refetches_postponed_total").increment(1);
                    postponed = Some(Postponed {
                        damage,
                        out_of_votes,
                        retry_at: tokio::time::Instant::now() + refetch_retry,
                    });
                    refetch_retry = (refetch_retry * 2).min(REFETCH_RETRY_MAX);
                }
                Refetch::Begun | Refetch::NotNeeded => refetch_retry = REFETCH_RETRY_FIRST,
            }
        }
        // An instance restarted on request starts at once (its wait does not grow the backoff
        // of failures).
        let mut asked_wait = FIRST_BACKOFF;
        let wait = if failed.is_some() {
            &mut backoff
        } else {
            &mut asked_wait
        };
        match start_again(&groups, &mut parts, &stopping, wait).await {
            Some(now_settled) => {
                settled = now_settled;
                started = Instant::now();
            }
            None => return,
        }
    }
}

/// A damaged log whose refetch could not begin, and when to try again.
struct Postponed {
    damage: crate::wal::RangeFailure,
    /// The attempt had already taken this member out of the votes (it may have cut its log):
    /// the retry goes through whatever a second read says.
    out_of_votes: bool,
    retry_at: tokio::time::Instant,
}

/// Sleeps until `at`, or for ever without one.
async fn sleep_until_some(at: Option<tokio::time::Instant>) {
    match at {
        Some(at) => tokio::time::sleep_until(at).await,
        None => std::future::pending().await,
    }
}

/// After a leadership transfer this node started in `term` (`Consensus::transfer_leadership`):
/// if it still leads the shard in that term once `window` has passed, the target did not take
/// the leadership up (it refused, as a member refetching its log or without a current copy
/// does, or never got the request). openraft keeps the instance a leader that takes no writes
/// until another member is elected, and no other member may be able to stand: the instance is
/// restarted, so it campaigns again like any member (and most likely leads again, in a new term).
pub async fn restart_if_transfer_stalls(groups: Arc<Groups>, shard: u16, node_id: u64, term: u64, window: Duration) {
    let generation = *groups.generation(shard).borrow();
    tokio::time::sleep(window).await;
    let still_leading = groups
        .inspect(shard, |metrics| {
            metrics.state == openraft::ServerState::Leader
                && metrics.current_leader == Some(node_id)
                && metrics.vote.leader_id().term == term
        })
        .unwrap_or(false);
    if still_leading && *groups.generation(shard).borrow() == generation {
        tracing::warn!(
            shard,
            term,
            "a leadership transfer was not taken up; the group restarts to be led again"
        );
        metrics::counter!("fleetlm_consensus_stalled_transfers_total").increment(1);
        groups.restart(shard, generation);
    }
}

/// Starts a new instance of the stopped group after `backoff` (doubled at each failed start),
/// until one starts; `None` if the node stops meanwhile.
async fn start_again(
    groups: &Groups,
    parts: &mut GroupParts,
    stopping: &watch::Receiver<bool>,
    backoff: &mut Duration,
) -> Option<Settled> {
    let shard = parts.shard;
    let mut stopping = stopping.clone();
    loop {
        tokio::select! {
            biased;
            _ = stopping.wait_for(|stop| *stop) => return None,
            () = tokio::time::sleep(*backoff) => {}
        }
        *backoff = (*backoff * 2).min(MAX_BACKOFF);
        // The stopped instance's state machine worker may still be applying: fence it off,
        // so nothing is applied twice or out of order.
        parts.machine = parts.machine.fence().await;
        match parts.start().await {
            Ok((raft, settled)) => {
                if *stopping.borrow() {
                    let _ = raft.shutdown().await;
                    return None;
                }
                groups.replace(shard, raft);
                return Some(settled);
            }
            Err(error) => {
                tracing::warn!(shard, %error, retry_in = ?backoff, "a shard's consensus group cannot start again yet");
                groups.set_stopped(shard, format!("its consensus group cannot start here: {error}"));
            }
        }
    }
}

/// What became of a damaged log found at a stop.
enum Refetch {
    /// Cut back; the refetch runs.
    Begun,
    /// The entry reads again: nothing to do.
    NotNeeded,
    /// Not now: too few other members can vote, or this member's records could not be written
    /// (`out_of_votes`: after it stopped voting). Tried again later (`keep_running`).
    Postponed { out_of_votes: bool },
}

/// The stopped group's log holds an entry it could not read back: if a second read fails too,
/// the log is cut back before it and refetched from the other members (`refetch`), as a start
/// would do, while the node serves its other shards. Only while enough of the other voters can
/// vote that the group still elects a leader without this member (two members cutting their logs
/// at once must not leave a shard that can never elect). If the second read succeeds, the group
/// starts on its log as it is. If too few others can vote, or this member's own records of the
/// refetch cannot be written (then it stays out of the votes: it may already have cut its log),
/// the group starts on its log as it is, and the keeper restarts it later to try again.
async fn refetch_damaged_log(
    groups: &Arc<Groups>,
    parts: &GroupParts,
    damage: crate::wal::RangeFailure,
    out_of_votes: bool,
    stopping: &watch::Receiver<bool>,
) -> Refetch {
    let shard = parts.shard;
    // A member out of the votes (an earlier attempt took it out, and may have cut its log
    // already: the entry is then gone, not readable) goes through with the refetch whatever it
    // reads: it never stays out of the votes without one.
    let confirmed = out_of_votes || groups.refetching(shard) || {
        let (wal, damage) = (parts.wal.clone(), damage.clone());
        tokio::task::spawn_blocking(move || super::refetch::damage_confirmed(&wal, shard, &damage))
            .await
            .unwrap_or(false)
    };
    if !confirmed {
        tracing::info!(
            shard,
            index = damage.index,
            "an entry that could not be read reads again: the group starts as it was"
        );
        return Refetch::NotNeeded;
    }
    if !others_can_elect(groups, shard, parts.node_id, &parts.network.peers).await {
        tracing::warn!(
            shard,
            index = damage.index,
            "a damaged shard log is not cut back now: too few other members can vote; tried again later"
        );
        return Refetch::Postponed { out_of_votes };
    }
    let mut epoch = groups.refetch_epoch(shard).lock().await;
    // A new epoch before anything is written: an older refetch can no longer end this one.
    *epoch += 1;
    // From here on this member does not vote until its log holds again what it may have
    // acknowledged, even if a step below fails (the next stop tries the procedure again).
    groups.set_refetching(shard, true);
    let marker = match super::refetch::begin_at_runtime(&parts.wal, &parts.data_dir, shard, &damage).await {
        Ok(marker) => marker,
        Err(error) => {
            tracing::error!(shard, %error, "a damaged shard log could not be cut back for a refetch; tried again later");
            return Refetch::Postponed { out_of_votes: true };
        }
    };
    metrics::counter!("fleetlm_replica_runtime_damage_total").increment(1);
    tokio::spawn(super::refetch::complete(
        super::refetch::Refetching {
            shard,
            marker,
            wal: parts.wal.clone(),
            data_dir: parts.data_dir.clone(),
            epoch: *epoch,
        },
        groups.clone(),
        parts.network.peers.clone(),
        parts.node_id,
        stopping.clone(),
    ));
    Refetch::Begun
}

/// Whether the shard's other voters (other than `node_id`) that answer as able to vote are a
/// quorum of its voters.
pub(super) async fn others_can_elect(
    groups: &Groups,
    shard: u16,
    node_id: u64,
    peers: &std::collections::HashMap<u64, Arc<super::peer::PeerClient>>,
) -> bool {
    let Some(voters) = groups.inspect(shard, |metrics| {
        metrics.membership_config.membership().voter_ids().collect::<Vec<u64>>()
    }) else {
        return false;
    };
    let quorum = voters.len() / 2 + 1;
    let answers = voters
        .iter()
        .filter(|voter| **voter != node_id)
        .filter_map(|voter| peers.get(voter))
        .map(|peer| super::network::ask_voting(peer, shard, Duration::from_secs(2)));
    let voting = futures_util::future::join_all(answers)
        .await
        .into_iter()
        .filter(|voting| *voting)
        .count();
    voting >= quorum
}

enum StopReason {
    ShutDown,
    Failed(String),
    /// Restarted on request (`Groups::restart`), not on an error.
    Asked,
}

fn stop_reason(fatal: &openraft::errors::Fatal<super::types::TypeConfig>) -> StopReason {
    match fatal {
        openraft::errors::Fatal::Stopped => StopReason::ShutDown,
        other => StopReason::Failed(other.to_string()),
    }
}

/// Resolves when the instance stopped: why, if it said (`None`: its core ended silently).
async fn failure(raft: &Raft) -> Option<StopReason> {
    // The core drops its metrics senders when it ends (on an error too, after reporting it), so
    // waiting for the server metrics to close is waiting for the end. They change only with the
    // role or the leader; the full metrics change at every entry and would wake this task each
    // time.
    let mut server = raft.server_metrics();
    while server.changed().await.is_ok() {}
    // The core is gone; its last metrics say whether it failed.
    raft.metrics()
        .borrow_watched()
        .running_state
        .as_ref()
        .err()
        .map(stop_reason)
}
