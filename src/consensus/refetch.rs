//! A member's damaged shard log, refetched from its peers instead of keeping the member down.
//!
//! A single node keeps a degraded shard's log untouched until an operator accepts the loss. A
//! cluster member does not need to: its peers hold the log. At start, for each degraded shard,
//! it cuts its log back to the last intact entry before the damage and takes part again as a
//! replica that catches up by the ordinary replication (or a snapshot: the archive plus the log
//! tail), while the node serves every other shard.
//!
//! Raft's safety rests on every member keeping what it acknowledged, and this member may have
//! acknowledged entries it no longer holds. So until it holds them again it neither stands for
//! election nor grants a vote (`Groups::set_refetching`): it only accepts the leader's entries,
//! which are real, durable acknowledgements. It holds them again once its durable log reaches
//! both the highest index it found anywhere in its damaged log and the end of the leader's log as
//! the leader reported it after the member came back (every entry a leader may ever commit with
//! the member's earlier acknowledgements is at or below that).
//!
//! Each step is recorded first in a small fsync'd file per shard (`refetch/NNNNN.json` in the
//! data directory), so a crash anywhere in between resumes the procedure and never lets the
//! member vote early or cut entries it acknowledged while refetching.

use std::collections::{BTreeMap, HashMap};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use openraft::type_config::async_runtime::WatchReceiver;
use serde::{Deserialize, Serialize};

use super::groups::Groups;
use super::network;
use super::peer::PeerClient;
use crate::wal::{self, LaneReport, Wal, WalOptions};

/// Where a shard's refetch stands, as recorded in its file.
#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq)]
pub struct Marker {
    /// The last intact entry before the damage, and its term: the log is cut back to it.
    pub after: u64,
    pub after_term: u64,
    /// The highest index found in the damaged log (known once the loss is accepted): the log
    /// must reach it (and the leader's commit index) before the member votes again.
    pub must_reach: Option<u64>,
}

fn dir(data_dir: &Path) -> PathBuf {
    data_dir.join("refetch")
}

fn path(data_dir: &Path, shard: u16) -> PathBuf {
    dir(data_dir).join(format!("{shard:05}.json"))
}

/// Every shard whose refetch is under way, by shard.
pub fn markers(data_dir: &Path) -> Result<BTreeMap<u16, Marker>, String> {
    let mut markers = BTreeMap::new();
    let entries = match std::fs::read_dir(dir(data_dir)) {
        Ok(entries) => entries,
        Err(error) if error.kind() == std::io::ErrorKind::NotFound => return Ok(markers),
        Err(error) => return Err(format!("cannot read {}: {error}", dir(data_dir).display())),
    };
    for entry in entries {
        let entry = entry.map_err(|e| format!("cannot read {}: {e}", dir(data_dir).display()))?;
        let name = entry.file_name().to_string_lossy().into_owned();
        let Some(shard) = name.strip_suffix(".json").and_then(|n| n.parse::<u16>().ok()) else {
            continue;
        };
        let bytes = std::fs::read(entry.path()).map_err(|e| format!("cannot read {}: {e}", entry.path().display()))?;
        let marker = serde_json::from_slice(&bytes)
            .map_err(|e| format!("{} is not a refetch record: {e}", entry.path().display()))?;
        markers.insert(shard, marker);
    }
    Ok(markers)
}

/// Writes the shard's record durably (file and directory fsync'd).
fn record(data_dir: &Path, shard: u16, marker: &Marker) -> Result<(), String> {
    let dir = dir(data_dir);
    let write = || -> std::io::Result<()> {
        std::fs::create_dir_all(&dir)?;
        let temporary = dir.join(format!("{shard:05}.json.tmp"));
        let mut file = std::fs::File::create(&temporary)?;
        file.write_all(&serde_json::to_vec(marker).expect("a marker serializes"))?;
        file.sync_all()?;
        std::fs::rename(&temporary, path(data_dir, shard))?;
        std::fs::File::open(&dir)?.sync_all()
    };
    write().map_err(|e| format!("cannot record the refetch of shard {shard} in {}: {e}", dir.display()))
}

/// Removes the shard's record once its log holds what it acknowledged again.
pub fn finish(data_dir: &Path, shard: u16) -> Result<(), String> {
    let remove = || -> std::io::Result<()> {
        std::fs::remove_file(path(data_dir, shard))?;
        std::fs::File::open(dir(data_dir))?.sync_all()
    };
    remove().map_err(|e| format!("cannot remove the refetch record of shard {shard}: {e}"))
}

/// The term of the shard's entry at `index` (0 for none).
fn term_at(wal: &Wal, shard: u16, index: u64) -> Result<u64, String> {
    if index == 0 {
        return Ok(0);
    }
    if let Some(purged) = wal.purged(shard).filter(|purged| purged.index == index) {
        return Ok(purged.term);
    }
    let entries = wal
        .read_entries(shard, index, 1)
        .map_err(|e| format!("shard {shard}: cannot read entry {index}: {e}"))?;
    entries
        .first()
        .filter(|(id, _)| id.index == index)
        .map(|(id, _)| id.term)
        .ok_or_else(|| format!("shard {shard}: entry {index} is not in the log"))
}

/// Before the member's groups start: cuts every degraded shard's log back to its intact prefix
/// (recording each step first), reopening the WAL if a loss had to be accepted. Returns the WAL
/// to run on. Fails only if a shard cannot be prepared (then the member cannot take part).
pub async fn prepare(
    wal: Wal,
    reports: Vec<LaneReport>,
    wal_dir: &Path,
    options: WalOptions,
    data_dir: &Path,
) -> Result<(Wal, Vec<LaneReport>), String> {
    let mut markers = markers(data_dir)?;
    // Degraded and either new, or recorded but its loss not yet accepted (a crash in between:
    // accepting it again is harmless).
    let degraded: Vec<u16> = (0..wal.shard_count())
        .filter(|shard| {
            wal.degraded(*shard).is_some() && markers.get(shard).is_none_or(|marker| marker.must_reach.is_none())
        })
        .collect();
    let (mut wal, mut reports) = (wal, reports);
    if !degraded.is_empty() {
        for &shard in &degraded {
            let reason = wal.degraded(shard).unwrap_or_default();
            let loss = wal.loss_to_accept(shard, &reports).map_err(|e| {
                format!("shard {shard}'s log is damaged ({reason}) and cannot be refetched: {e}; replace this member (docs/OPERATIONS.md, \"Replacing a node\")")
            })?;
            let marker = Marker {
                after: loss.after_index,
                after_term: term_at(&wal, shard, loss.after_index)?,
                must_reach: None,
            };
            if markers.get(&shard) != Some(&marker) {
                record(data_dir, shard, &marker)?;
            }
            tracing::warn!(shard, %reason, after = marker.after, "a shard's log is damaged on this member: it is cut back to its last intact entry and refetched from the other members");
            wal.accept_loss(shard, loss.after_index, loss.lost_bytes, &loss.regions)
                .await
                .map_err(|e| format!("shard {shard}: cannot record the damage as refetched: {e}"))?;
            markers.insert(shard, marker);
        }
        // An accepted loss takes effect when the log is read again.
        wal.shutdown();
        let wal_dir = wal_dir.to_path_buf();
        (wal, reports) = tokio::task::spawn_blocking(move || Wal::open(&wal_dir, options))
            .await
            .map_err(|e| e.to_string())?
            .map_err(|e| format!("cannot reopen the write-ahead log: {e}"))?;
    }
    for (&shard, marker) in markers.iter_mut() {
        if marker.must_reach.is_none() {
            let highest = wal.last_log_id(shard).map_or(0, |id| id.index);
            marker.must_reach = Some(highest.max(marker.after));
            record(data_dir, shard, marker)?;
        }
        // Cut once: the cut drops the accepted loss, so a restart after it (when the log may
        // hold entries acknowledged while refetching) does not cut again.
        if wal
            .accepted_losses(shard)
            .iter()
            .any(|loss| loss.after_index == marker.after)
        {
            wal.truncate_suffix(
                shard,
                wal::LogId {
                    term: marker.after_term,
                    index: marker.after,
                },
            )
            .await
            .map_err(|e| format!("shard {shard}: cannot cut its damaged log back: {e}"))?;
        }
    }
    Ok((wal, reports))
}

/// How often a refetching replica checks how far it got.
const CHECK_EVERY: Duration = Duration::from_millis(500);

/// A shard whose log this member refetches.
pub struct Refetching {
    pub shard: u16,
    pub marker: Marker,
    pub wal: Arc<Wal>,
    pub data_dir: PathBuf,
}

impl Refetching {
    /// The durable end of the shard's log here (a purge past the end moves it too).
    fn durable_end(&self) -> u64 {
        let last = self.wal.last_log_id(self.shard).map_or(0, |id| id.index);
        let purged = self.wal.purged(self.shard).map_or(0, |id| id.index);
        last.max(purged)
    }
}

/// Lets the shard's group vote and stand for election again once its durable log reaches what
/// it may have acknowledged: the highest index its damaged log held and the commit index its
/// leader reports (asked once a leader is known).
pub async fn complete(
    refetch: Refetching,
    groups: Arc<Groups>,
    peers: Arc<HashMap<u64, Arc<PeerClient>>>,
    node_id: u64,
    mut stopping: tokio::sync::watch::Receiver<bool>,
) {
    let shard = refetch.shard;
    groups.set_refetching(shard, true);
    let mut target = None;
    loop {
        tokio::select! {
            () = tokio::time::sleep(CHECK_EVERY) => {}
            _ = stopping.wait_for(|stop| *stop) => return,
        }
        if target.is_none() {
            let leader = groups.get(shard).metrics().borrow_watched().current_leader;
            let Some(client) = leader
                .filter(|leader| *leader != node_id)
                .and_then(|leader| peers.get(&leader))
            else {
                continue;
            };
            match network::ask_committed(client, shard, Duration::from_secs(2)).await {
                Ok(Some(leader_end)) => {
                    let must_reach = refetch.marker.must_reach.unwrap_or(refetch.marker.after);
                    target = Some(leader_end.max(must_reach));
                    tracing::info!(
                        shard,
                        leader_end,
                        must_reach,
                        "refetching a damaged shard log: it votes again once its log reaches both"
                    );
                }
                Ok(None) | Err(_) => continue,
            }
        }
        if target.is_some_and(|target| refetch.durable_end() >= target) {
            break;
        }
    }
    groups.set_refetching(shard, false);
    metrics::counter!("fleetlm_replica_refetches_total").increment(1);
    tracing::info!(
        shard,
        "a damaged shard log was refetched from the other members; this member votes in its group again"
    );
    if let Err(error) = finish(&refetch.data_dir, shard) {
        // The next start waits for the same positions again (nothing is cut twice).
        tracing::error!(shard, %error, "the record of a finished refetch could not be removed");
    }
}
