//! Operator commands that work on a data directory while the server is stopped:
//! `fleetlm wal inspect` (read-only description of the WAL and any damage) and
//! `fleetlm wal repair` (accept the loss of a degraded shard's damaged entries).

use std::fmt::Write as _;
use std::path::Path;

use anyhow::{Context, bail};

use crate::wal::{LaneReport, Wal, WalOptions};

#[derive(serde::Deserialize)]
struct Layout {
    shards: u16,
    /// Set when the directory belongs to a cluster member.
    #[serde(default)]
    node_id: Option<u64>,
}

fn layout_of(data_dir: &Path) -> anyhow::Result<Layout> {
    let layout_path = data_dir.join("fleetlm.json");
    serde_json::from_slice(
        &std::fs::read(&layout_path)
            .with_context(|| format!("{} is not a FleetLM data directory", data_dir.display()))?,
    )
    .with_context(|| format!("{} is not a valid layout file", layout_path.display()))
}

/// WAL options matching the data directory as it is on disk (shards from its layout file,
/// lanes from its lane directories); only what reading needs.
pub(crate) fn options_on_disk(data_dir: &Path) -> anyhow::Result<WalOptions> {
    let layout = layout_of(data_dir)?;
    let wal_dir = data_dir.join("wal");
    let Some(lanes) =
        crate::wal::lanes_on_disk(&wal_dir).with_context(|| format!("cannot read {}", wal_dir.display()))?
    else {
        bail!("{} holds no WAL lanes", wal_dir.display());
    };
    // Segments are all of one size; a new one (if opening must start one) matches them.
    let segment_bytes = std::fs::read_dir(&wal_dir)?
        .filter_map(|lane| lane.ok())
        .filter_map(|lane| std::fs::read_dir(lane.path()).ok())
        .flatten()
        .filter_map(|segment| segment.ok()?.metadata().ok())
        .map(|metadata| metadata.len())
        .max()
        .unwrap_or(128 * 1024 * 1024)
        .max(64 * 1024);
    Ok(WalOptions {
        lanes,
        shard_count: layout.shards,
        segment_bytes,
        max_batch_bytes: (segment_bytes / 2).min(4 * 1024 * 1024) as usize,
        queue_depth: 16,
    })
}

/// `fleetlm wal inspect`: the report, and whether any damage was found.
pub fn wal_inspect(data_dir: &Path) -> anyhow::Result<(String, bool)> {
    let options = options_on_disk(data_dir)?;
    let reports = Wal::inspect(&data_dir.join("wal"), &options)?;
    let mut out = String::new();
    writeln!(
        out,
        "data directory {} ({} shards, {} lanes)",
        data_dir.display(),
        options.shard_count,
        options.lanes
    )?;
    let mut damaged = false;
    for report in &reports {
        damaged |= report.shards.iter().any(|s| s.degraded.is_some()) || !report.unreadable.is_empty();
        describe_lane(&mut out, report)?;
    }
    writeln!(
        out,
        "{}",
        if damaged {
            "result: DAMAGE FOUND (shards marked DAMAGED refuse new messages until repaired)"
        } else {
            "result: no damage"
        }
    )?;
    Ok((out, damaged))
}

fn describe_lane(out: &mut String, report: &LaneReport) -> std::fmt::Result {
    writeln!(out, "{}:", report.lane_dir.display())?;
    for segment in &report.segments {
        writeln!(
            out,
            "  segment {:020}.wal: {} bytes, {} used, {} batches, {} records{}",
            segment.segment_no,
            segment.file_bytes,
            segment.used_bytes,
            segment.batches,
            segment.records,
            match segment.sealed_at {
                Some(end) => format!(" (sealed at byte {end} after a failed write or fsync; the rest is ignored)"),
                None => String::new(),
            }
        )?;
    }
    if let Some((segment_no, offset)) = report.torn_tail {
        writeln!(
            out,
            "  torn tail at segment {segment_no} offset {offset}: a write that never finished its fsync (never acknowledged); discarded at the next start"
        )?;
    }
    for &(segment_no, offset, len) in &report.unreadable {
        writeln!(
            out,
            "  UNREADABLE at segment {segment_no} offset {offset} ({len} bytes): the disk fails to read these sectors (EIO); entries they held, if any, are listed as DAMAGE"
        )?;
    }
    for damage in &report.damage {
        let entry = damage.entry.map_or_else(
            || "unknown entries".to_string(),
            |(shard, index)| format!("entry {index} of shard {shard}"),
        );
        writeln!(
            out,
            "  DAMAGE at segment {} offset {} ({} bytes): {entry}: {}",
            damage.segment_no, damage.offset, damage.len, damage.detail
        )?;
    }
    for shard in &report.shards {
        let entries = match (shard.first_index, shard.last_index) {
            (Some(first), Some(last)) => format!("entries {first}..={last} in the WAL"),
            (None, Some(last)) => format!("no unpurged entries (log ends at {last})"),
            _ => "empty".to_string(),
        };
        let state = match &shard.degraded {
            Some(reason) => format!("DAMAGED: {reason}; intact up to its last entry"),
            None if !shard.accepted_losses.is_empty() => {
                let losses: Vec<String> = shard
                    .accepted_losses
                    .iter()
                    .map(|loss| match loss.resumed_at {
                        Some(resumed) => format!("entries {}..={} lost (accepted)", loss.after_index + 1, resumed - 1),
                        None => format!("entries after {} lost (accepted)", loss.after_index),
                    })
                    .collect();
                format!("ok, {}", losses.join(", "))
            }
            None => "ok".to_string(),
        };
        writeln!(
            out,
            "  shard {}: {entries}, purged through {}; {state}",
            shard.shard, shard.purged_through
        )?;
    }
    Ok(())
}

/// `fleetlm wal repair --shard N`: for each named degraded shard, records that the operator
/// accepts the loss of its damaged entries. At its next start the shard continues past them, and
/// every session of the shard skips (never reuses) the seqs they could have held. Takes the data
/// directory's lock, so the server must be stopped.
pub fn wal_repair(data_dir: &Path, shards: &[u16]) -> anyhow::Result<String> {
    let _lock = crate::server::lock_data_dir(data_dir)?;
    if let Some(node) = layout_of(data_dir)?.node_id {
        // The other members hold the whole log: accepting a loss here would make this replica
        // disagree with them. It is replaced with an empty one that receives the log again.
        bail!(
            "{} belongs to cluster member {node}, whose log the other members hold: do not accept a loss, replace the member: keep it stopped, move this data directory away, run `fleetlm cluster forget-node --node-id {node}` against a running member, start it on an empty data directory, then run `fleetlm cluster add-node --node-id {node}` (docs/OPERATIONS.md, \"Replacing a node\")",
            data_dir.display()
        );
    }
    let options = options_on_disk(data_dir)?;
    let wal_dir = data_dir.join("wal");
    let reports = Wal::inspect(&wal_dir, &options)?;
    let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
    let (wal, _) = Wal::open(&wal_dir, options.clone()).context("cannot open the write-ahead log")?;
    let mut out = String::new();
    let result = (|| -> anyhow::Result<()> {
        for &shard in shards {
            if shard >= options.shard_count {
                bail!(
                    "shard {shard} does not exist (the data directory has {} shards)",
                    options.shard_count
                );
            }
            let Some(reason) = wal.degraded(shard) else {
                bail!("shard {shard} is not damaged; nothing to repair");
            };
            let loss = wal
                .loss_to_accept(shard, &reports)
                .map_err(|reason| anyhow::anyhow!("{reason}; restore it from a backup"))?;
            let (after_index, lost_bytes, positions) = (loss.after_index, loss.lost_bytes, loss.regions);
            runtime.block_on(wal.accept_loss(shard, after_index, lost_bytes, &positions))?;
            writeln!(
                out,
                "shard {shard}: accepted the loss of its damaged entries after entry {after_index} \
                 ({lost_bytes} damaged bytes; was: {reason})"
            )?;
        }
        Ok(())
    })();
    wal.shutdown();
    result?;
    let after = Wal::inspect(&wal_dir, &options)?;
    for report in &after {
        for shard in report.shards.iter().filter(|s| shards.contains(&s.shard)) {
            if let Some(reason) = &shard.degraded {
                writeln!(out, "shard {}: still DAMAGED after the repair: {reason}", shard.shard)?;
            }
        }
    }
    writeln!(
        out,
        "at the next start every session of the repaired shards skips the seqs the lost entries could have held (never reused)"
    )?;
    Ok(out)
}

#[cfg(test)]
mod tests {
    /// A cluster member's log is the others' too: `wal repair` refuses and names the
    /// replacement, changing nothing.
    #[test]
    fn repair_refuses_a_cluster_members_data_directory() {
        let dir = tempfile::tempdir().unwrap();
        let layout = br#"{"version":1,"shards":4,"archive":"postgres","node_id":3}"#;
        std::fs::write(dir.path().join("fleetlm.json"), layout).unwrap();
        std::fs::create_dir_all(dir.path().join("wal/lane-00")).unwrap();
        let error = super::wal_repair(dir.path(), &[1]).expect_err("refused").to_string();
        assert!(
            error.contains("cluster member 3") && error.contains("forget-node"),
            "{error}"
        );
        assert_eq!(std::fs::read(dir.path().join("fleetlm.json")).unwrap(), layout);
        assert_eq!(std::fs::read_dir(dir.path().join("wal/lane-00")).unwrap().count(), 0);
    }
}
