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
//!
//! Damage found while the node runs (a durable entry the group cannot read back, which stops
//! the group) takes the same way without a restart: the group's keeper confirms it with a second
//! read, runs `begin_at_runtime` on the live WAL, and starts the group again refetching.

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

/// The term of the shard's entry at `index` (0 for none), as the WAL's index knows it (the entry
/// itself is not read: it may sit next to the damage).
fn term_at(wal: &Wal, shard: u16, index: u64) -> Result<u64, String> {
    if index == 0 {
        return Ok(0);
    }
    if let Some(purged) = wal.purged(shard).filter(|purged| purged.index == index) {
        return Ok(purged.term);
    }
    wal.entry_location(shard, index)
        .map(|(id, ..)| id.term)
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
    // Every degraded shard: new damage, a recorded one whose loss was not accepted yet (a crash
    // in between: accepting it again is harmless), or damage found while a refetch was under way
    // (it is cut again; what the member must reach stays at least what it was).
    let degraded: Vec<u16> = (0..wal.shard_count())
        .filter(|shard| wal.degraded(*shard).is_some())
        .collect();
    let mut reached_before: BTreeMap<u16, u64> = BTreeMap::new();
    let (mut wal, mut reports) = (wal, reports);
    if !degraded.is_empty() {
        for &shard in &degraded {
            let reason = wal.degraded(shard).unwrap_or_default();
            let loss = wal.loss_to_accept(shard, &reports).map_err(|e| {
                format!("shard {shard}'s log is damaged ({reason}) and cannot be refetched: {e}; replace this member (docs/OPERATIONS.md, \"Replacing a node\")")
            })?;
            if let Some(must_reach) = markers.get(&shard).and_then(|marker| marker.must_reach) {
                reached_before.insert(shard, must_reach);
            }
            let mut marker = Marker {
                after: loss.after_index,
                after_term: term_at(&wal, shard, loss.after_index)?,
                must_reach: None,
            };
            // An earlier refetch whose cut has not happened yet (a crash between accepting its
            // loss and cutting) cuts lower: keep its cut, so the log is cut below both.
            if let Some(earlier) = markers.get(&shard).filter(|earlier| {
                earlier.after < marker.after
                    && wal
                        .accepted_losses(shard)
                        .iter()
                        .any(|loss| loss.after_index == earlier.after)
            }) {
                marker.after = earlier.after;
                marker.after_term = earlier.after_term;
            }
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
            let before = reached_before.get(&shard).copied().unwrap_or(0);
            marker.must_reach = Some(highest.max(marker.after).max(before));
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

/// Whether the entry a stopped group could not read back still cannot be read: a read that
/// fails again is damage (a bad sector, a record that fails its checksum, a segment gone); one
/// that succeeds was a passing error, and the group just starts again. Blocking.
pub fn damage_confirmed(wal: &Wal, shard: u16, damage: &wal::RangeFailure) -> bool {
    if wal.purged(shard).is_some_and(|purged| purged.index >= damage.index) {
        // Archived and let go meanwhile: nothing to refetch.
        return false;
    }
    let range = wal::EntryRange {
        shard,
        from_index: damage.index,
        max_entries: 1,
    };
    let read = wal.read_ranges_each(&[range]).pop().unwrap_or_default();
    match read.failure {
        // Damage: the disk cannot give it back, it fails its checksum, or its segment is gone.
        Some(failure) => matches!(
            failure.error,
            wal::WalError::Io(_) | wal::WalError::Corrupt { .. } | wal::WalError::Missing { .. }
        ),
        // It reads now, or it is no longer in the log (cut by a conflict): nothing to refetch.
        None => false,
    }
}

/// `record`, on a blocking thread (two fsyncs).
async fn record_blocking(data_dir: &Path, shard: u16, marker: Marker) -> Result<(), String> {
    let data_dir = data_dir.to_path_buf();
    tokio::task::spawn_blocking(move || record(&data_dir, shard, &marker))
        .await
        .map_err(|e| format!("cannot record the refetch of shard {shard}: {e}"))?
}

/// A member's shard log found damaged while the node runs (a durable entry it cannot read back,
/// `damage`): the procedure `prepare` runs at start, on the live WAL, while the shard's group
/// is stopped. Each step is durable before the next, in the order `prepare` resumes from after
/// a crash: the marker (loss not yet accepted); the loss accepted in the WAL (so the next open
/// reads past the damaged region instead of degrading the shard); the marker with what the
/// member must reach; the cut back to the entry before the damage. The caller then starts the
/// group refetching (`complete`).
pub async fn begin_at_runtime(
    wal: &Arc<Wal>,
    data_dir: &Path,
    shard: u16,
    damage: &wal::RangeFailure,
) -> Result<Marker, String> {
    let after = damage.index.saturating_sub(1);
    let mut marker = Marker {
        after,
        after_term: term_at(wal, shard, after)?,
        must_reach: None,
    };
    let before = {
        let data_dir = data_dir.to_path_buf();
        tokio::task::spawn_blocking(move || markers(&data_dir))
            .await
            .map_err(|e| format!("cannot read the refetch records: {e}"))??
            .get(&shard)
            .and_then(|marker| marker.must_reach)
    };
    record_blocking(data_dir, shard, marker).await?;
    let (lost_bytes, regions) = {
        let (wal, damage) = (wal.clone(), damage.clone());
        tokio::task::spawn_blocking(move || damaged_regions(&wal, shard, &damage))
            .await
            .map_err(|e| format!("shard {shard}: cannot look for the damaged records: {e}"))?
    };
    wal.accept_loss(shard, after, lost_bytes, &regions)
        .await
        .map_err(|e| format!("shard {shard}: cannot record the damage as refetched: {e}"))?;
    let highest = wal.last_log_id(shard).map_or(0, |id| id.index);
    marker.must_reach = Some(highest.max(after).max(before.unwrap_or(0)));
    record_blocking(data_dir, shard, marker).await?;
    wal.truncate_suffix(
        shard,
        wal::LogId {
            term: marker.after_term,
            index: after,
        },
    )
    .await
    .map_err(|e| format!("shard {shard}: cannot cut its damaged log back: {e}"))?;
    tracing::warn!(
        shard,
        damaged = damage.index,
        segment = damage.segment_no,
        offset = damage.offset,
        after,
        "a shard's log was found damaged while running: it is cut back to the entry before the damage and refetched from the other members"
    );
    Ok(marker)
}

/// Every record of the shard's log from `damage` on that cannot be read (a bad sector often
/// takes its neighbours along), as `(segment_no, offset)`, and the bytes they span: the regions
/// the next open finds damaged, which the accepted loss must name so the open reads past them
/// (a region it does not name degrades the shard again at start, which then refetches again:
/// safe, only slower). At most `MAX_LOSS_REGIONS`.
fn damaged_regions(wal: &Wal, shard: u16, damage: &wal::RangeFailure) -> (u64, Vec<(u64, u64)>) {
    let framed_len = |index: u64| {
        wal.entry_location(shard, index)
            .map_or(wal.max_entry_bytes() as u64, |(.., len)| u64::from(len))
    };
    let mut regions = vec![(damage.segment_no, damage.offset)];
    let mut lost_bytes = framed_len(damage.index);
    let mut from = damage.index + 1;
    while regions.len() < wal::MAX_LOSS_REGIONS {
        let range = wal::EntryRange {
            shard,
            from_index: from,
            max_entries: 1024,
        };
        let read = wal.read_ranges_each(&[range]).pop().unwrap_or_default();
        match (read.failure, read.entries.last()) {
            (Some(failure), _) if !matches!(failure.error, wal::WalError::Closed) => {
                regions.push((failure.segment_no, failure.offset));
                lost_bytes += framed_len(failure.index);
                from = failure.index + 1;
            }
            (None, Some((last, _))) => from = last.index + 1,
            _ => break,
        }
    }
    (lost_bytes, regions)
}

/// How often a refetching replica checks how far it got.
const CHECK_EVERY: Duration = Duration::from_millis(500);

/// A shard whose log this member refetches.
pub struct Refetching {
    pub shard: u16,
    pub marker: Marker,
    pub wal: Arc<Wal>,
    pub data_dir: PathBuf,
    /// The shard's refetch epoch this one runs under (`Groups::refetch_epoch`): damage found
    /// again while it runs starts a newer refetch, and this one then ends without finishing.
    pub epoch: u64,
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
        if *groups.refetch_epoch(shard).lock().await != refetch.epoch {
            return;
        }
        if target.is_some_and(|target| refetch.durable_end() >= target) {
            break;
        }
    }
    // Under the epoch's lock: a refetch begun meanwhile (its marker recorded) is not ended here.
    let epoch = groups.refetch_epoch(shard).lock().await;
    if *epoch != refetch.epoch {
        return;
    }
    groups.set_refetching(shard, false);
    metrics::counter!("fleetlm_replica_refetches_total").increment(1);
    tracing::info!(
        shard,
        "a damaged shard log was refetched from the other members; this member votes in its group again"
    );
    let data_dir = refetch.data_dir.clone();
    let finished = tokio::task::spawn_blocking(move || finish(&data_dir, shard))
        .await
        .unwrap_or_else(|e| Err(e.to_string()));
    if let Err(error) = finished {
        // The next start waits for the same positions again (nothing is cut twice).
        tracing::error!(shard, %error, "the record of a finished refetch could not be removed");
    }
    drop(epoch);
}
