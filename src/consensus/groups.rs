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

use std::sync::atomic::{AtomicBool, Ordering};
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
/// A group that ran this long since its last restart starts the backoff over.
const HEALTHY_AFTER: Duration = Duration::from_secs(30);
/// How long a stopping instance may take to let go of its tasks.
const SHUTDOWN_TIMEOUT: Duration = Duration::from_secs(5);

/// Every shard's group on this node, by shard.
pub struct Groups {
    slots: Vec<Slot>,
}

struct Slot {
    raft: RwLock<Raft>,
    /// Counts the restarts: watchers of a stopped instance move to the new one when it changes.
    generation: watch::Sender<u64>,
    /// Why the group is stopped now (between its failure and its restart).
    stopped: RwLock<Option<String>>,
    /// The shard's log is being refetched here (see `refetch`): the group neither stands for
    /// election nor votes.
    refetching: AtomicBool,
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
}

impl GroupParts {
    /// Opens the shard's log as it is on disk now and starts an instance over it; `Settled`
    /// tells when the appends the instance made are all answered.
    pub async fn start(&self) -> Result<(Raft, Settled), String> {
        let log = ShardLogStore::open(self.wal.clone(), self.shard).map_err(|e| e.to_string())?;
        let settled = log.settled();
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

impl Groups {
    pub fn new(rafts: Vec<Raft>) -> Groups {
        Groups {
            slots: rafts
                .into_iter()
                .map(|raft| Slot {
                    raft: RwLock::new(raft),
                    generation: watch::channel(0).0,
                    stopped: RwLock::new(None),
                    refetching: AtomicBool::new(false),
                })
                .collect(),
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

    /// Starts or ends the refetch of the shard's log: while it lasts, the group does not stand
    /// for election (and `network` refuses the votes it is asked for).
    pub fn set_refetching(&self, shard: u16, refetching: bool) {
        let slot = &self.slots[shard as usize];
        let current = slot.raft.write().expect("group lock");
        slot.refetching.store(refetching, Ordering::Release);
        current.runtime_config().elect(!refetching);
    }

    fn replace(&self, shard: u16, raft: Raft) {
        let slot = &self.slots[shard as usize];
        let mut current = slot.raft.write().expect("group lock");
        // Read under the lock `set_refetching` takes too, so neither misses the other.
        raft.runtime_config().elect(!slot.refetching.load(Ordering::Acquire));
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
/// an error, then starts a new one over the same storage and state machine.
pub async fn keep_running(
    groups: Arc<Groups>,
    mut parts: GroupParts,
    mut settled: Settled,
    mut stopping: watch::Receiver<bool>,
) {
    let shard = parts.shard;
    let mut backoff = FIRST_BACKOFF;
    let mut started = Instant::now();
    loop {
        let raft = groups.get(shard);
        let reason = tokio::select! {
            reason = failure(&raft) => reason,
            _ = stopping.wait_for(|stop| *stop) => return,
        };
        let reason = match reason {
            // Shut down on purpose (a node that refuses to take part stops its groups).
            Some(StopReason::ShutDown) => return,
            Some(StopReason::Failed(reason)) => reason,
            // Shut down by this node (which sets `stopping` first).
            None if *stopping.borrow() => return,
            // Its core ended without saying why (a panic in it).
            None => "its core ended unexpectedly".to_string(),
        };
        if started.elapsed() >= HEALTHY_AFTER {
            backoff = FIRST_BACKOFF;
        }
        tracing::warn!(shard, %reason, retry_in = ?backoff, "a shard's consensus group stopped on an error here; it starts again from its durable log");
        metrics::counter!("fleetlm_consensus_group_restarts_total", "shard" => shard.to_string()).increment(1);
        groups.set_stopped(shard, format!("its consensus group stopped here: {reason}"));
        let _ = tokio::time::timeout(SHUTDOWN_TIMEOUT, raft.shutdown()).await;
        // An append the stopped instance queued may still land: reopen the log only after.
        tokio::select! {
            () = settled.wait() => {}
            _ = stopping.wait_for(|stop| *stop) => return,
        }
        loop {
            tokio::select! {
                () = tokio::time::sleep(backoff) => {}
                _ = stopping.wait_for(|stop| *stop) => return,
            }
            backoff = (backoff * 2).min(MAX_BACKOFF);
            // The stopped instance's state machine worker may still be applying: fence it off,
            // so nothing is applied twice or out of order.
            parts.machine = parts.machine.fence().await;
            match parts.start().await {
                Ok((raft, now_settled)) => {
                    if *stopping.borrow() {
                        let _ = raft.shutdown().await;
                        return;
                    }
                    groups.replace(shard, raft);
                    settled = now_settled;
                    started = Instant::now();
                    break;
                }
                Err(error) => {
                    tracing::warn!(shard, %error, retry_in = ?backoff, "a shard's consensus group cannot start again yet");
                    groups.set_stopped(shard, format!("its consensus group cannot start here: {error}"));
                }
            }
        }
    }
}

enum StopReason {
    ShutDown,
    Failed(String),
}

fn stop_reason(fatal: &openraft::errors::Fatal<super::types::TypeConfig>) -> StopReason {
    match fatal {
        openraft::errors::Fatal::Stopped => StopReason::ShutDown,
        other => StopReason::Failed(other.to_string()),
    }
}

/// Resolves when the instance stopped: why, if it said (`None`: its core ended silently).
async fn failure(raft: &Raft) -> Option<StopReason> {
    let mut metrics = raft.metrics();
    loop {
        if let Err(fatal) = &metrics.borrow_watched().running_state {
            return Some(stop_reason(fatal));
        }
        if metrics.changed().await.is_err() {
            // The core is gone; its last metrics say whether it failed.
            return metrics.borrow_watched().running_state.as_ref().err().map(stop_reason);
        }
    }
}
