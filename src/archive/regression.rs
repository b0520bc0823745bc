//! When the archive goes back in time: restored from an older backup, a failover to a lagging
//! replica, rows deleted by hand. The archive then holds less of a shard's log than it was
//! given, and sessions loaded from it would hand out seqs that were already acknowledged.
//!
//! A watermark only ever moves forward (a flush moves it with the rows it covers; in a cluster
//! another member may move it further). So this process remembers, per shard, the highest
//! watermark it has seen the archive hold, written itself, or that the WAL says the archive was
//! given (its purge mark: single node, the WAL purges only what a committed flush covers; a
//! cluster purges only through a snapshot, which is a watermark read from the archive). An
//! archive found below that has gone backwards; one found above it was moved forward by another
//! member (`ArchiveError::Conflict` for a flush, as before).

use std::collections::HashMap;
use std::sync::Mutex;

use crate::shard::ops::MIN_MESSAGE_OP_BYTES;

/// One shard whose archive holds less than it was given.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Regression {
    pub shard: u16,
    /// The log index the archive's watermark says it holds through now.
    pub holds: u64,
    /// The log index it was known to hold through before.
    pub given: u64,
}

impl std::fmt::Display for Regression {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "the archive went back in time for shard {}: it holds the shard's log through entry {} but was given entries through {} (restored from an older backup, or a lagging replica?); the shard refuses new messages until an operator decides (`fleetlm archive check`, then `fleetlm archive accept`)",
            self.shard, self.holds, self.given
        )
    }
}

/// Several regressions as one sentence.
pub fn describe(regressions: &[Regression]) -> String {
    regressions
        .iter()
        .map(Regression::to_string)
        .collect::<Vec<_>>()
        .join("; ")
}

/// Per shard, the highest watermark this process knows the archive reached.
#[derive(Default)]
pub struct SeenWatermarks {
    by_shard: Mutex<HashMap<u16, u64>>,
}

impl SeenWatermarks {
    /// Records that the archive held (or was given) the shard's log through `index`.
    pub fn observe(&self, shard: u16, index: u64) {
        let mut seen = self.by_shard.lock().expect("seen watermarks lock");
        let entry = seen.entry(shard).or_insert(0);
        *entry = (*entry).max(index);
    }

    pub fn get(&self, shard: u16) -> u64 {
        self.by_shard
            .lock()
            .expect("seen watermarks lock")
            .get(&shard)
            .copied()
            .unwrap_or(0)
    }

    /// The regression of `shard` if the archive now `holds` less than was seen.
    pub fn check(&self, shard: u16, holds: u64) -> Option<Regression> {
        let given = self.get(shard);
        (holds < given).then_some(Regression { shard, holds, given })
    }
}

/// `(shard, held)` pairs read from the archive against the `(shard, expected)` it must hold at
/// least: the shards that went back.
pub fn regressions_among(held: &[(u16, u64)], expected: &[(u16, u64)]) -> Vec<Regression> {
    expected
        .iter()
        .filter_map(|&(shard, given)| {
            let holds = held
                .iter()
                .find(|(held_shard, _)| *held_shard == shard)
                .map_or(0, |(_, index)| *index);
            (holds < given).then_some(Regression { shard, holds, given })
        })
        .collect()
}

/// Largest skip recorded for one accepted regression: far beyond what any log could have held,
/// and still well inside the integers JavaScript clients read exactly (2^53).
const MAX_SKIP_SEQS: u64 = 1 << 50;

/// Seqs every session of a shard skips after the archive lost `lost_entries` log entries: each
/// could have held at most `max_entry_bytes / MIN_MESSAGE_OP_BYTES` messages of one session, so
/// no seq any of them held is handed out again.
pub fn skip_seqs_for(lost_entries: u64, max_entry_bytes: u64) -> u64 {
    let per_entry = max_entry_bytes / MIN_MESSAGE_OP_BYTES + 1;
    lost_entries
        .saturating_mul(per_entry)
        .saturating_add(1)
        .min(MAX_SKIP_SEQS)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_watermark_below_the_highest_seen_is_a_regression_and_above_is_not() {
        let seen = SeenWatermarks::default();
        seen.observe(3, 40);
        seen.observe(3, 95);
        seen.observe(3, 60);
        assert_eq!(seen.get(3), 95);
        assert_eq!(
            seen.check(3, 40),
            Some(Regression {
                shard: 3,
                holds: 40,
                given: 95
            })
        );
        assert_eq!(seen.check(3, 95), None);
        assert_eq!(seen.check(3, 120), None, "another member moved it forward");
        assert_eq!(seen.check(4, 0), None, "nothing seen of shard 4");
    }

    #[test]
    fn a_missing_watermark_row_holds_nothing() {
        let found = regressions_among(&[(1, 10)], &[(1, 10), (2, 5), (3, 0)]);
        assert_eq!(
            found,
            vec![Regression {
                shard: 2,
                holds: 0,
                given: 5
            }]
        );
    }

    #[test]
    fn the_skip_covers_every_message_the_lost_entries_could_hold() {
        // 3 entries of at most 4096 bytes: at most 64 messages of 64 bytes each.
        assert!(skip_seqs_for(3, 4096) > 3 * 4096 / MIN_MESSAGE_OP_BYTES);
        assert_eq!(skip_seqs_for(u64::MAX, u64::MAX), MAX_SKIP_SEQS);
    }
}
