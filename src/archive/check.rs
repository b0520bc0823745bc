//! `fleetlm archive check` and `fleetlm archive accept`: what the WAL says the archive was given
//! against what the archive holds, per shard, and the operator's decision when it holds less.
//!
//! They run on the data directory of a stopped node (as `wal inspect/repair` do): the decision
//! moves the archive's watermark, which a running flusher also moves, and the shard must then
//! rebuild its state from the archive anyway, which a start does. `check` only reads (the WAL's
//! purge marks, the archive's watermarks), so it may also be run while the server runs; the
//! purge mark is read first and a watermark only grows, so it never reports a healthy archive
//! as gone back. `accept` takes the data directory's lock.

use std::fmt::Write as _;
use std::path::Path;

use anyhow::{Context, bail};

use super::regression::{self, Regression};
use super::{Archive, ShardLoss};
use crate::wal::Wal;

/// What one shard's WAL says the archive was given, and what the archive holds.
struct ShardCheck {
    shard: u16,
    /// The WAL's purge mark: the archive had everything through it when it was purged.
    given: u64,
    wal_last: Option<u64>,
    holds: u64,
}

impl ShardCheck {
    fn regression(&self) -> Option<Regression> {
        (self.holds < self.given).then_some(Regression {
            shard: self.shard,
            holds: self.holds,
            given: self.given,
        })
    }
}

/// The largest log entry any configuration writes (`Config::wal_max_batch_bytes` is at most
/// 4 MiB): the skip computed from it holds whatever the lost entries' size was.
const MAX_ENTRY_BYTES_EVER: u64 = 4 * 1024 * 1024;

/// What the data directory's layout file says of its archive and cluster membership.
#[derive(serde::Deserialize)]
struct Layout {
    #[serde(default)]
    archive: Option<String>,
    #[serde(default)]
    node_id: Option<u64>,
}

fn layout_of(data_dir: &Path) -> anyhow::Result<Layout> {
    let path = data_dir.join("fleetlm.json");
    let bytes =
        std::fs::read(&path).with_context(|| format!("{} is not a FleetLM data directory", data_dir.display()))?;
    serde_json::from_slice(&bytes).with_context(|| format!("{} is not a valid layout file", path.display()))
}

fn open_archive(
    runtime: &tokio::runtime::Runtime,
    data_dir: &Path,
    database_url: Option<&str>,
) -> anyhow::Result<Archive> {
    let kind = layout_of(data_dir)?.archive;
    match (kind.as_deref(), database_url.filter(|url| !url.is_empty())) {
        (Some("sqlite") | None, None) => {
            let path = data_dir.join("archive.sqlite3");
            if !path.exists() {
                bail!(
                    "{} holds no SQLite archive (set --database-url for a Postgres one)",
                    path.display()
                );
            }
            Archive::open_sqlite(&path).context("cannot open the SQLite archive")
        }
        (Some("postgres") | None, Some(url)) => runtime
            .block_on(Archive::connect_postgres(url))
            .context("cannot connect to the Postgres archive"),
        (Some(recorded), url) => bail!(
            "the data directory belongs to a {recorded} archive, but {}",
            if url.is_some() {
                "--database-url names a Postgres one"
            } else {
                "no --database-url was given"
            }
        ),
    }
}

fn survey(runtime: &tokio::runtime::Runtime, data_dir: &Path, archive: &Archive) -> anyhow::Result<Vec<ShardCheck>> {
    let options = crate::operator::options_on_disk(data_dir)?;
    let reports = Wal::inspect(&data_dir.join("wal"), &options)?;
    let mut checks = Vec::with_capacity(options.shard_count as usize);
    for shard in reports.iter().flat_map(|lane| &lane.shards) {
        checks.push(ShardCheck {
            shard: shard.shard,
            given: shard.purged_through,
            wal_last: shard.last_index,
            holds: 0,
        });
    }
    checks.sort_by_key(|check| check.shard);
    for check in &mut checks {
        check.holds = runtime
            .block_on(archive.watermark(check.shard))
            .with_context(|| format!("cannot read shard {}'s archive watermark", check.shard))?;
    }
    Ok(checks)
}

fn runtime() -> anyhow::Result<tokio::runtime::Runtime> {
    Ok(tokio::runtime::Builder::new_current_thread().enable_all().build()?)
}

/// `fleetlm archive check`: the report, and whether every shard's archive holds at least what
/// its WAL says it was given.
pub fn archive_check(data_dir: &Path, database_url: Option<&str>) -> anyhow::Result<(String, bool)> {
    let runtime = runtime()?;
    let archive = open_archive(&runtime, data_dir, database_url)?;
    let checks = survey(&runtime, data_dir, &archive)?;
    let mut out = String::new();
    writeln!(
        out,
        "data directory {}, {} archive",
        data_dir.display(),
        archive.describe()
    )?;
    let mut consistent = true;
    for check in &checks {
        let wal = check
            .wal_last
            .map_or_else(|| "empty log".to_string(), |last| format!("log ends at {last}"));
        let state = match check.regression() {
            Some(regression) => {
                consistent = false;
                format!(
                    "WENT BACK: entries {}..={} are no longer in the archive nor in the WAL",
                    regression.holds + 1,
                    regression.given
                )
            }
            None => "ok".to_string(),
        };
        writeln!(
            out,
            "  shard {}: WAL gave the archive entries through {} ({wal}); the archive holds through {}; {state}",
            check.shard, check.given, check.holds
        )?;
    }
    writeln!(
        out,
        "{}",
        if consistent {
            "result: consistent"
        } else {
            "result: THE ARCHIVE WENT BACK IN TIME (shards marked WENT BACK refuse new messages; restore a newer backup, or run `fleetlm archive accept` with the server stopped)"
        }
    )?;
    Ok((out, consistent))
}

/// `fleetlm archive accept [--shard N]`: for each shard whose archive went back (all of them
/// when none is named), records that the lost entries are given up: the archive's watermark
/// moves to what the WAL says it was given, and every session of the shard the archive still
/// knows from before skips a number of seqs no lost entry could have exceeded (never reused).
/// Server stopped (takes the data directory's lock).
pub fn archive_accept(data_dir: &Path, database_url: Option<&str>, shards: &[u16]) -> anyhow::Result<String> {
    let _lock = crate::server::lock_data_dir(data_dir)?;
    if let Some(node) = layout_of(data_dir)?.node_id {
        bail!(
            "{} belongs to cluster member {node}: the members share the archive and the log, and `archive accept` decides for one node only; restore the archive from a newer backup instead",
            data_dir.display()
        );
    }
    let runtime = runtime()?;
    let archive = open_archive(&runtime, data_dir, database_url)?;
    let checks = survey(&runtime, data_dir, &archive)?;
    for &shard in shards {
        if !checks.iter().any(|check| check.shard == shard) {
            bail!(
                "shard {shard} does not exist (the data directory has {} shards)",
                checks.len()
            );
        }
    }
    let chosen = |shard: u16| shards.is_empty() || shards.contains(&shard);
    let mut out = String::new();
    let mut accepted = 0;
    for check in checks.iter().filter(|check| chosen(check.shard)) {
        let Some(regression) = check.regression() else {
            if !shards.is_empty() {
                writeln!(
                    out,
                    "shard {}: the archive holds what it was given; nothing to accept",
                    check.shard
                )?;
            }
            continue;
        };
        let lost_entries = regression.given - regression.holds;
        let loss = ShardLoss {
            after_index: regression.holds,
            skip_seqs: regression::skip_seqs_for(lost_entries, MAX_ENTRY_BYTES_EVER),
            recorded_at: crate::model::Timestamp(crate::clock::Clock::now_micros(&crate::clock::SystemClock)),
        };
        runtime
            .block_on(archive.accept_regression(check.shard, loss, regression.given))
            .with_context(|| format!("cannot record the decision for shard {}", check.shard))?;
        accepted += 1;
        writeln!(
            out,
            "shard {}: accepted the loss of log entries {}..={} from the archive; its sessions the archive knows from before skip {} seqs (never reused)",
            check.shard,
            regression.holds + 1,
            regression.given,
            loss.skip_seqs
        )?;
    }
    if accepted == 0 && shards.is_empty() {
        writeln!(out, "every shard's archive holds what it was given; nothing to accept")?;
    } else if accepted > 0 {
        writeln!(
            out,
            "start the server: the accepted shards write again; sessions created in the lost entries are unknown to the archive"
        )?;
    }
    Ok(out)
}
