//! Model-based tests: random operation sequences with reopen and torn tails, checked against a
//! plain in-memory model of every shard's log.

use std::collections::BTreeMap;
use std::io::Write;
use std::path::Path;

use proptest::prelude::*;

use super::*;

const SHARDS: u16 = 6;

fn options() -> WalOptions {
    WalOptions {
        lanes: 2,
        shard_count: SHARDS,
        segment_bytes: 4096,
        max_batch_bytes: 1024,
        queue_depth: 64,
    }
}

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime")
}

fn open(dir: &Path) -> Wal {
    Wal::open(dir, options()).expect("open wal").0
}

#[derive(Debug, Clone)]
enum Op {
    Append { shard: u16, bodies: Vec<Vec<u8>> },
    Truncate { shard: u16, keep_back: u64 },
    Purge { shard: u16, count: u64 },
    Reopen,
    TearAndReopen { garbage: Vec<u8> },
}

fn op_strategy() -> impl Strategy<Value = Op> {
    prop_oneof![
        6 => (0..SHARDS, proptest::collection::vec(proptest::collection::vec(any::<u8>(), 0..300), 1..4))
            .prop_map(|(shard, bodies)| Op::Append { shard, bodies }),
        1 => (0..SHARDS, 0u64..3).prop_map(|(shard, keep_back)| Op::Truncate { shard, keep_back }),
        2 => (0..SHARDS, 0u64..5).prop_map(|(shard, count)| Op::Purge { shard, count }),
        1 => Just(Op::Reopen),
        1 => proptest::collection::vec(1u8..=255, 1..40).prop_map(|garbage| Op::TearAndReopen { garbage }),
    ]
}

#[derive(Default, Debug)]
struct ModelShard {
    entries: BTreeMap<u64, Vec<u8>>,
    last_index: u64,
    purged_through: u64,
}

fn check(wal: &Wal, model: &BTreeMap<u16, ModelShard>) -> std::result::Result<(), TestCaseError> {
    for shard in 0..SHARDS {
        let expected = model.get(&shard);
        let last = wal.last_log_id(shard).map_or(0, |id| id.index);
        prop_assert_eq!(
            last,
            expected.map_or(0, |m| m.last_index),
            "last index of shard {}",
            shard
        );
        prop_assert!(wal.degraded(shard).is_none());
        let Some(expected) = expected else { continue };
        let first = wal.first_index(shard).unwrap_or(last + 1);
        prop_assert!(
            first <= expected.purged_through + 1,
            "shard {} lost unpurged entries",
            shard
        );
        let read = wal.read_entries(shard, first, usize::MAX).expect("read");
        let wanted: Vec<_> = expected.entries.range(expected.purged_through + 1..).collect();
        let got: Vec<_> = read
            .iter()
            .filter(|(id, _)| id.index > expected.purged_through)
            .collect();
        prop_assert_eq!(got.len(), wanted.len(), "entry count of shard {}", shard);
        for ((id, body), (index, wanted_body)) in got.into_iter().zip(wanted) {
            prop_assert_eq!(id.index, *index);
            prop_assert_eq!(body, wanted_body);
        }
    }
    Ok(())
}

/// Writes garbage where the next record would go in the newest segment of each lane, as a write
/// that was cut off mid-way would.
fn tear_tail(dir: &Path, garbage: &[u8]) {
    for lane in 0..options().lanes {
        let lane_dir = dir.join(format!("lane-{lane:02}"));
        let newest = *segment::list_segments(&lane_dir)
            .expect("list")
            .last()
            .expect("a segment");
        let path = segment::segment_path(&lane_dir, newest);
        let bytes = std::fs::read(&path).expect("read segment");
        let mut end = segment::SEGMENT_HEADER_BYTES as usize;
        while let record::Decoded::Record(_, used) = record::decode(&bytes[end..]) {
            end += used;
        }
        let room = bytes.len().saturating_sub(end);
        let mut file = std::fs::OpenOptions::new().write(true).open(&path).expect("open");
        std::io::Seek::seek(&mut file, std::io::SeekFrom::Start(end as u64)).expect("seek");
        file.write_all(&garbage[..garbage.len().min(room)]).expect("write");
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 48, ..ProptestConfig::default() })]
    #[test]
    fn random_operations_survive_reopen_and_torn_tails(ops in proptest::collection::vec(op_strategy(), 1..60)) {
        let dir = tempfile::tempdir().expect("tempdir");
        let runtime = runtime();
        let mut wal = open(dir.path());
        let mut model: BTreeMap<u16, ModelShard> = BTreeMap::new();
        for op in ops {
            match op {
                Op::Append { shard, bodies } => {
                    let m = model.entry(shard).or_default();
                    let entries: Vec<_> = bodies.into_iter().enumerate()
                        .map(|(i, body)| (LogId { term: 1, index: m.last_index + 1 + i as u64 }, body))
                        .collect();
                    runtime.block_on(wal.append(shard, entries.clone())).expect("append");
                    for (id, body) in entries {
                        m.entries.insert(id.index, body);
                        m.last_index = id.index;
                    }
                }
                Op::Truncate { shard, keep_back } => {
                    let m = model.entry(shard).or_default();
                    let after = m.last_index.saturating_sub(keep_back).max(m.purged_through);
                    runtime.block_on(wal.truncate_suffix(shard, LogId { term: 1, index: after })).expect("truncate");
                    m.entries.retain(|index, _| *index <= after);
                    m.last_index = after;
                }
                Op::Purge { shard, count } => {
                    let m = model.entry(shard).or_default();
                    let through = (m.purged_through + count).min(m.last_index);
                    runtime.block_on(wal.purge_prefix(shard, through)).expect("purge");
                    m.purged_through = m.purged_through.max(through);
                }
                Op::Reopen => {
                    wal.shutdown();
                    wal = open(dir.path());
                }
                Op::TearAndReopen { garbage } => {
                    wal.shutdown();
                    tear_tail(dir.path(), &garbage);
                    wal = open(dir.path());
                }
            }
            check(&wal, &model)?;
        }
        wal.shutdown();
    }
}

#[test]
fn appends_must_be_contiguous() {
    let dir = tempfile::tempdir().expect("tempdir");
    let runtime = runtime();
    let wal = open(dir.path());
    runtime
        .block_on(wal.append(0, vec![(LogId { term: 1, index: 1 }, b"a".to_vec())]))
        .expect("first");
    let gap = runtime.block_on(wal.append(0, vec![(LogId { term: 1, index: 3 }, b"c".to_vec())]));
    assert!(
        matches!(
            gap,
            Err(WalError::NotContiguous {
                expected: 2,
                got: 3,
                ..
            })
        ),
        "{gap:?}"
    );
    wal.shutdown();
}

#[test]
fn a_flipped_bit_mid_log_degrades_only_the_affected_shard_and_deletes_nothing() {
    let dir = tempfile::tempdir().expect("tempdir");
    let runtime = runtime();
    let wal = open(dir.path());
    // Shards 0 and 2 share lane 0. Interleave them, then corrupt shard 0's second entry.
    for index in 1..=3u64 {
        for shard in [0u16, 2] {
            let body = format!("shard {shard} entry {index}").into_bytes();
            runtime
                .block_on(wal.append(shard, vec![(LogId { term: 1, index }, body)]))
                .expect("append");
        }
    }
    // Enough later entries that the damaged record cannot be part of an unfinished last batch.
    for index in 4..=40u64 {
        runtime
            .block_on(wal.append(2, vec![(LogId { term: 1, index }, vec![7u8; 60])]))
            .expect("append");
    }
    wal.shutdown();
    let lane_dir = dir.path().join("lane-00");
    let path = segment::segment_path(&lane_dir, 0);
    let mut bytes = std::fs::read(&path).expect("read");
    let needle = b"shard 0 entry 2";
    let at = bytes
        .windows(needle.len())
        .position(|w| w == needle)
        .expect("record present");
    bytes[at + 3] ^= 0x10;
    std::fs::write(&path, &bytes).expect("write");
    let len_before = std::fs::metadata(&path).expect("meta").len();

    let (wal, events) = Wal::open(dir.path(), options()).expect("reopen");
    assert!(
        events.iter().any(|e| matches!(e, RecoveryEvent::Corruption { .. })),
        "{events:?}"
    );
    assert!(wal.degraded(0).is_some(), "the shard whose record rotted is degraded");
    assert_eq!(
        wal.last_log_id(0).map(|id| id.index),
        Some(1),
        "replay stops at the last good entry"
    );
    assert!(wal.degraded(2).is_none(), "a shard sharing the lane is unaffected");
    assert_eq!(wal.read_entries(2, 1, 100).expect("read").len(), 40);
    assert_eq!(
        std::fs::metadata(&path).expect("meta").len(),
        len_before,
        "nothing is deleted"
    );
    wal.shutdown();
}

#[test]
fn votes_survive_reopen() {
    let dir = tempfile::tempdir().expect("tempdir");
    let wal = open(dir.path());
    assert_eq!(wal.read_vote(3).expect("read"), None);
    wal.save_vote(3, Vote { term: 4, voted_for: 9 }).expect("save");
    wal.shutdown();
    let wal = open(dir.path());
    assert_eq!(wal.read_vote(3).expect("read"), Some(Vote { term: 4, voted_for: 9 }));
    wal.shutdown();
}

/// `read_ranges` reads many shards' interleaved entries with shared reads (across segment
/// rotations and both lanes) and returns exactly what each shard's own reads return.
#[test]
fn reading_many_ranges_matches_reading_each_shard() {
    let dir = tempfile::tempdir().expect("tempdir");
    let wal = open(dir.path());
    let runtime = runtime();
    let mut written: BTreeMap<u16, Vec<Vec<u8>>> = BTreeMap::new();
    // Interleaved appends of every shard; 4 KiB segments force several rotations.
    for round in 0..40u64 {
        for shard in 0..SHARDS {
            let body = format!(
                "shard {shard} entry {} {}",
                round + 1,
                "x".repeat((round as usize * 7) % 90)
            )
            .into_bytes();
            let log_id = LogId {
                term: 1,
                index: round + 1,
            };
            runtime
                .block_on(wal.append(shard, vec![(log_id, body.clone())]))
                .expect("append");
            written.entry(shard).or_default().push(body);
        }
    }
    let ranges: Vec<EntryRange> = (0..SHARDS)
        .map(|shard| EntryRange {
            shard,
            from_index: 1 + u64::from(shard) * 3,
            max_entries: 5 + shard as usize * 4,
        })
        .collect();
    let together = wal.read_ranges(&ranges).expect("read ranges");
    assert_eq!(together.len(), ranges.len());
    for (range, entries) in ranges.iter().zip(&together) {
        let alone = wal
            .read_entries(range.shard, range.from_index, range.max_entries)
            .expect("read one shard");
        assert_eq!(entries, &alone);
        assert_eq!(entries.len(), range.max_entries);
        for (offset, (log_id, body)) in entries.iter().enumerate() {
            let index = range.from_index + offset as u64;
            assert_eq!(log_id.index, index);
            assert_eq!(body, &written[&range.shard][index as usize - 1]);
        }
    }
    wal.shutdown();
}
