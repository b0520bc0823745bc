//! Operator commands that work on a data directory while the server is stopped:
//! `fleetlm wal inspect` (read-only description of the WAL and any damage).

use std::fmt::Write as _;
use std::path::Path;

use anyhow::{Context, bail};

use crate::wal::{LaneReport, Wal, WalOptions};

#[derive(serde::Deserialize)]
struct Layout {
    shards: u16,
}

/// WAL options matching the data directory as it is on disk (shards from its layout file,
/// lanes from its lane directories); only what reading needs.
fn options_on_disk(data_dir: &Path) -> anyhow::Result<WalOptions> {
    let layout_path = data_dir.join("fleetlm.json");
    let layout: Layout = serde_json::from_slice(
        &std::fs::read(&layout_path)
            .with_context(|| format!("{} is not a FleetLM data directory", data_dir.display()))?,
    )
    .with_context(|| format!("{} is not a valid layout file", layout_path.display()))?;
    let wal_dir = data_dir.join("wal");
    let lanes = std::fs::read_dir(&wal_dir)
        .with_context(|| format!("cannot read {}", wal_dir.display()))?
        .filter_map(|entry| entry.ok())
        .filter(|entry| entry.file_name().to_string_lossy().starts_with("lane-"))
        .count();
    if lanes == 0 {
        bail!("{} holds no WAL lanes", wal_dir.display());
    }
    Ok(WalOptions {
        lanes,
        shard_count: layout.shards,
        segment_bytes: 0,
        max_batch_bytes: 0,
        queue_depth: 1,
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
        damaged |= !report.damage.is_empty() || report.shards.iter().any(|s| s.degraded.is_some());
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
            "  segment {:020}.wal: {} bytes, {} used, {} batches, {} records",
            segment.segment_no, segment.file_bytes, segment.used_bytes, segment.batches, segment.records
        )?;
    }
    if let Some((segment_no, offset)) = report.torn_tail {
        writeln!(
            out,
            "  torn tail at segment {segment_no} offset {offset}: a write that never finished its fsync (never acknowledged); discarded at the next start"
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
