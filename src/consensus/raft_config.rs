//! The openraft configuration every shard group runs with, and why each setting is what it is.

use std::sync::Arc;

use openraft::{Config, SnapshotPolicy};

use super::Timing;
use super::peer::MAX_FRAME_BYTES;

pub(super) fn raft_config(timing: Timing, max_entry_bytes: usize) -> Result<Arc<Config>, String> {
    // An append to a follower must fit one peer frame whatever its entries weigh.
    let max_payload_entries = (MAX_FRAME_BYTES / 2 / max_entry_bytes.max(1)).clamp(1, 300) as u64;
    let config = Config {
        max_payload_entries,
        cluster_name: "fleetlm".to_string(),
        heartbeat_interval: timing.heartbeat.as_millis() as u64,
        // No heartbeat to a follower that acknowledged a replication sent within the last
        // heartbeat interval (it proves the same): under writes, busy groups send none.
        heartbeat_min_interval: Some(timing.heartbeat.as_millis() as u64),
        election_timeout_min: timing.election_min.as_millis() as u64,
        election_timeout_max: timing.election_max.as_millis() as u64,
        // Snapshots are cheap (the archive is the snapshot): offer one whenever the archive has
        // moved on by this many entries, and keep some log for followers slightly behind.
        snapshot_policy: SnapshotPolicy::LogsSinceLast(512),
        max_in_snapshot_log_to_keep: 256,
        enable_pre_vote: Some(true),
        // A member that refetches its damaged log (`refetch`) answers with a shorter log than it
        // acknowledged before: the leader restarts its search for where they agree instead of
        // treating it as a bug. Safe here because such a member neither votes nor stands for
        // election until it holds again what it may have acknowledged, and the quorum-accepted
        // position is never lowered by it.
        allow_log_reversion: Some(true),
        // A restarted instance (a process restart, or a group restarted after a storage error:
        // `groups`) starts as a follower: restoring its leadership in the same term could
        // propose entries at indexes it had sent to followers but not made durable itself.
        enable_leader_restore: Some(false),
        // No ticker per group: one clock per node sends the heartbeats and runs the election
        // timers of every group (`pacemaker`).
        enable_tick: false,
        ..Default::default()
    };
    config
        .validate()
        .map(Arc::new)
        .map_err(|e| format!("raft settings: {e}"))
}
