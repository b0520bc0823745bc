//! Model-based tests: random operation sequences with reopen, power loss and injected faults
//! (on the fault-injecting filesystem), checked against a plain in-memory model of every shard's
//! log; plus bit rot on real files.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use proptest::prelude::*;

use super::fault::{Fault, FaultKind, FaultOp, SimFs};
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

fn open_sim(fs: &SimFs) -> Wal {
    Wal::open_on(Arc::new(fs.clone()), Path::new("/wal"), options())
        .expect("open wal")
        .0
}

/// Garbage where the next batch would go in the newest segment of each lane, as a write cut off
/// mid-way would leave (never fsync'd, so never acknowledged).
fn tear_tail(fs: &SimFs, garbage: &[u8]) {
    for lane in 0..options().lanes {
        let lane_dir = Path::new("/wal").join(format!("lane-{lane:02}"));
        let newest = *segment::list_segments(fs, &lane_dir)
            .expect("list")
            .last()
            .expect("a segment");
        let path = segment::segment_path(&lane_dir, newest);
        let bytes = fs.read(&path).expect("segment");
        let mut end = segment::SEGMENT_HEADER_BYTES as usize;
        while let record::DecodedBatch::Header(header) = record::decode_batch_header(&bytes[end..]) {
            end += header.framed_len();
        }
        let file = fs.open(&path).expect("open");
        let room = bytes.len().saturating_sub(end);
        file.write_all_at(&garbage[..garbage.len().min(room)], end as u64)
            .expect("write");
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 48, ..ProptestConfig::default() })]
    #[test]
    fn random_operations_survive_reopen_and_torn_tails(ops in proptest::collection::vec(op_strategy(), 1..60)) {
        let fs = SimFs::new();
        let runtime = runtime();
        let mut wal = open_sim(&fs);
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
                    wal = open_sim(&fs);
                }
                Op::TearAndReopen { garbage } => {
                    wal.shutdown();
                    tear_tail(&fs, &garbage);
                    wal = open_sim(&fs);
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
    // A later batch, so the damaged record cannot be part of an unfinished last batch.
    for index in 4..=5u64 {
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

    let (wal, reports) = Wal::open(dir.path(), options()).expect("reopen");
    let damage: Vec<_> = reports.iter().flat_map(|r| r.damage.clone()).collect();
    assert_eq!(damage.len(), 1, "{damage:?}");
    assert_eq!(damage[0].entry, Some((0, 2)), "the damaged entry is named exactly");
    assert!(
        reports.iter().all(|r| r.torn_tail.is_none()),
        "bit rot is not a torn tail"
    );
    assert!(wal.degraded(0).is_some(), "the shard whose record rotted is degraded");
    assert_eq!(
        wal.last_log_id(0).map(|id| id.index),
        Some(1),
        "replay stops at the last good entry"
    );
    assert!(wal.degraded(2).is_none(), "a shard sharing the lane is unaffected");
    assert_eq!(wal.read_entries(2, 1, 100).expect("read").len(), 5);
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
    wal.save_vote(
        3,
        Vote {
            term: 4,
            voted_for: 9,
            committed: true,
        },
    )
    .expect("save");
    wal.shutdown();
    let wal = open(dir.path());
    assert_eq!(
        wal.read_vote(3).expect("read"),
        Some(Vote {
            term: 4,
            voted_for: 9,
            committed: true
        })
    );
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

// ---- Faults and power loss ------------------------------------------------------------------

#[derive(Debug, Clone)]
enum FaultyOp {
    Append { shard: u16, bodies: Vec<Vec<u8>> },
    Purge { shard: u16, count: u64 },
    Truncate { shard: u16, keep_back: u64 },
    Arm(Fault),
    Disarm,
    PowerLoss { seed: u64 },
}

fn fault_strategy() -> impl Strategy<Value = Fault> {
    let op = prop_oneof![
        Just(FaultOp::Write),
        Just(FaultOp::Sync),
        Just(FaultOp::Allocate),
        Just(FaultOp::Create)
    ];
    let kind = prop_oneof![
        Just(FaultKind::Eio),
        Just(FaultKind::NoSpace),
        (0usize..200).prop_map(FaultKind::TornWrite)
    ];
    (op, 0usize..6, kind, any::<bool>()).prop_map(|(op, after, kind, sticky)| Fault {
        op,
        after,
        kind,
        sticky,
    })
}

fn faulty_op_strategy() -> impl Strategy<Value = FaultyOp> {
    prop_oneof![
        8 => (0..SHARDS, proptest::collection::vec(proptest::collection::vec(any::<u8>(), 0..300), 1..3))
            .prop_map(|(shard, bodies)| FaultyOp::Append { shard, bodies }),
        1 => (0..SHARDS, 0u64..3).prop_map(|(shard, keep_back)| FaultyOp::Truncate { shard, keep_back }),
        2 => (0..SHARDS, 0u64..5).prop_map(|(shard, count)| FaultyOp::Purge { shard, count }),
        2 => fault_strategy().prop_map(FaultyOp::Arm),
        1 => Just(FaultyOp::Disarm),
        2 => any::<u64>().prop_map(|seed| FaultyOp::PowerLoss { seed }),
    ]
}

/// What the log of one shard must and may hold.
#[derive(Default, Debug)]
struct Promised {
    /// Entries the live log shows (acknowledged, or left in place by a failed truncation).
    acked: BTreeMap<u64, Vec<u8>>,
    /// Entries whose write failed: never visible live, but may be there after a power loss.
    maybe: BTreeMap<u64, Vec<Vec<u8>>>,
    purged_through: u64,
    /// A purge that failed may still be durable: entries up to here may vanish at a power loss.
    maybe_purged_through: u64,
    /// A truncation that failed may still be durable: entries above here may vanish too.
    fragile_above: Option<u64>,
}

/// The live log shows exactly what was acknowledged, with its bytes, and nothing that failed.
fn check_live(wal: &Wal, promised: &BTreeMap<u16, Promised>) -> std::result::Result<(), TestCaseError> {
    for shard in 0..SHARDS {
        prop_assert!(
            wal.degraded(shard).is_none(),
            "shard {} degraded without bit rot",
            shard
        );
        let last = wal.last_log_id(shard).map_or(0, |id| id.index);
        let Some(p) = promised.get(&shard) else {
            prop_assert_eq!(last, 0, "shard {} shows an entry never acknowledged", shard);
            continue;
        };
        let acked_last = p.acked.keys().next_back().copied().unwrap_or(0);
        prop_assert!(
            last == acked_last || (acked_last <= p.purged_through && last <= p.purged_through),
            "shard {}: the live log ends at {} but the last acknowledged entry is {}",
            shard,
            last,
            acked_last
        );
        let read = wal.read_entries(shard, p.purged_through + 1, usize::MAX).expect("read");
        let got: Vec<(u64, &Vec<u8>)> = read.iter().map(|(id, body)| (id.index, body)).collect();
        let wanted: Vec<(u64, &Vec<u8>)> = p.acked.range(p.purged_through + 1..).map(|(i, b)| (*i, b)).collect();
        prop_assert_eq!(got, wanted, "entries of shard {}", shard);
    }
    Ok(())
}

/// After a power loss: every acknowledged entry survived with its bytes; anything more is an
/// entry that was attempted with exactly that index and body. The model then adopts what
/// survived (recovery made it durable).
fn reconcile_after_power_loss(
    wal: &Wal,
    promised: &mut BTreeMap<u16, Promised>,
) -> std::result::Result<(), TestCaseError> {
    for shard in 0..SHARDS {
        prop_assert!(
            wal.degraded(shard).is_none(),
            "a power loss was mistaken for corruption (shard {})",
            shard
        );
        let p = promised.entry(shard).or_default();
        if let Some(above) = p.fragile_above.take() {
            let fragile: Vec<(u64, Vec<u8>)> = p.acked.range(above + 1..).map(|(i, b)| (*i, b.clone())).collect();
            for (index, body) in fragile {
                p.acked.remove(&index);
                p.maybe.entry(index).or_default().push(body);
            }
        }
        let first = p.purged_through.max(p.maybe_purged_through) + 1;
        let read = wal.read_entries(shard, first, usize::MAX).expect("read");
        let mut survived = BTreeMap::new();
        for (id, body) in read {
            if let Some(acked) = p.acked.get(&id.index) {
                prop_assert_eq!(&body, acked, "acked entry {} of shard {} changed", id.index, shard);
            } else {
                let attempted = p.maybe.get(&id.index).is_some_and(|bodies| bodies.contains(&body));
                prop_assert!(attempted, "entry {} of shard {} was never written", id.index, shard);
            }
            survived.insert(id.index, body);
        }
        for index in p.acked.keys().filter(|i| **i >= first) {
            prop_assert!(
                survived.contains_key(index),
                "acked entry {} of shard {} was lost",
                index,
                shard
            );
        }
        p.purged_through = first - 1;
        p.maybe_purged_through = 0;
        p.acked = survived;
        p.maybe.clear();
    }
    Ok(())
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 96, ..ProptestConfig::default() })]
    /// Random appends, truncations and purges × random EIO/ENOSPC/torn writes on any write,
    /// fsync, preallocation or segment creation × power losses at random points. Fails if the
    /// lane skipped `fdatasync`, acknowledged before it, went on after a failed one, showed a
    /// failed entry, reused an index, or mistook a torn tail for corruption.
    #[test]
    fn acknowledged_entries_survive_faults_and_power_loss(ops in proptest::collection::vec(faulty_op_strategy(), 1..50)) {
        let runtime = runtime();
        let mut fs = SimFs::new();
        let mut wal = open_sim(&fs);
        let mut promised: BTreeMap<u16, Promised> = BTreeMap::new();
        for op in ops {
            match op {
                FaultyOp::Append { shard, bodies } => {
                    let next = wal.last_log_id(shard).map_or(0, |id| id.index) + 1;
                    let entries: Vec<_> = bodies.into_iter().enumerate()
                        .map(|(i, body)| (LogId { term: 1, index: next + i as u64 }, body))
                        .collect();
                    let result = runtime.block_on(wal.append(shard, entries.clone()));
                    let p = promised.entry(shard).or_default();
                    match result {
                        Ok(()) => {
                            prop_assert!(wal.lane_failed(shard).is_none(), "acknowledged by a failed lane");
                            for (id, body) in entries {
                                p.acked.insert(id.index, body);
                            }
                        }
                        Err(error) => {
                            if matches!(error, WalError::OutOfSpace(_)) {
                                prop_assert!(wal.lane_failed(shard).is_none(), "out of space must not fail the lane");
                            }
                            for (id, body) in entries {
                                p.maybe.entry(id.index).or_default().push(body);
                            }
                        }
                    }
                }
                FaultyOp::Truncate { shard, keep_back } => {
                    let last = wal.last_log_id(shard).map_or(0, |id| id.index);
                    let p = promised.entry(shard).or_default();
                    let after = last.saturating_sub(keep_back).max(p.purged_through);
                    let result = runtime.block_on(wal.truncate_suffix(shard, LogId { term: 1, index: after }));
                    let p = promised.entry(shard).or_default();
                    if result.is_ok() {
                        p.acked.retain(|index, _| *index <= after);
                        p.maybe.retain(|index, _| *index <= after);
                    } else {
                        p.fragile_above = Some(p.fragile_above.map_or(after, |a| a.min(after)));
                    }
                }
                FaultyOp::Purge { shard, count } => {
                    let p = promised.entry(shard).or_default();
                    let last = p.acked.keys().next_back().copied().unwrap_or(0);
                    let through = (p.purged_through + count).min(last);
                    if runtime.block_on(wal.purge_prefix(shard, through)).is_ok() {
                        p.purged_through = p.purged_through.max(through);
                    } else {
                        p.maybe_purged_through = p.maybe_purged_through.max(through);
                    }
                }
                FaultyOp::Arm(fault) => fs.arm(fault),
                FaultyOp::Disarm => fs.disarm(),
                FaultyOp::PowerLoss { seed } => {
                    wal.shutdown();
                    fs = fs.power_loss(seed);
                    wal = open_sim(&fs);
                    reconcile_after_power_loss(&wal, &mut promised)?;
                }
            }
            check_live(&wal, &promised)?;
        }
        wal.shutdown();
    }
}

/// Out of space while starting a segment fails only the requests that needed it; the lane stays
/// healthy and takes writes again once space is back.
#[test]
fn out_of_space_fails_the_request_and_writes_resume_when_space_returns() {
    let runtime = runtime();
    let fs = SimFs::new();
    let wal = open_sim(&fs);
    let body = vec![9u8; 900];
    let mut index = 0;
    // Fill the first segment of lane 0 (4 KiB segments hold four such batches).
    for _ in 0..4 {
        index += 1;
        runtime
            .block_on(wal.append(0, vec![(LogId { term: 1, index }, body.clone())]))
            .expect("fits");
    }
    fs.arm(Fault {
        op: FaultOp::Allocate,
        after: 0,
        kind: FaultKind::NoSpace,
        sticky: true,
    });
    let refused = runtime.block_on(wal.append(
        0,
        vec![(
            LogId {
                term: 1,
                index: index + 1,
            },
            body.clone(),
        )],
    ));
    assert!(matches!(refused, Err(WalError::OutOfSpace(_))), "{refused:?}");
    assert_eq!(
        wal.last_log_id(0).map(|id| id.index),
        Some(index),
        "the refused entry is not visible"
    );
    assert!(wal.lane_failed(0).is_none());
    fs.disarm();
    runtime
        .block_on(wal.append(
            0,
            vec![(
                LogId {
                    term: 1,
                    index: index + 1,
                },
                body.clone(),
            )],
        ))
        .expect("space is back");
    assert_eq!(wal.read_entries(0, 1, 10).expect("read").len(), 5);
    wal.shutdown();
}

/// Waits (without writing) until the lane of `shard` has healed by itself.
fn wait_until_healed(wal: &Wal, shard: u16) {
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    while wal.lane_failed(shard).is_some() {
        assert!(
            std::time::Instant::now() < deadline,
            "the lane did not heal: {:?}",
            wal.lane_failed(shard)
        );
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
}

fn bodies(wal: &Wal, shard: u16) -> Vec<Vec<u8>> {
    wal.read_entries(shard, 1, 100)
        .expect("read")
        .into_iter()
        .map(|(_, body)| body)
        .collect()
}

/// A failed fdatasync fails the lane: the entry is not visible and nothing is acknowledged until
/// the lane heals. It never fsyncs the failed data again (the kernel may have dropped the pages):
/// it seals the segment at its last durable batch and carries on in a new one, by itself (no
/// write needed to wake it), and the failed entry never comes back, not after a restart and not
/// after a power loss.
#[test]
fn a_failed_fsync_fails_the_lane_until_it_heals_in_a_new_segment() {
    let runtime = runtime();
    let fs = SimFs::new();
    let wal = open_sim(&fs);
    runtime
        .block_on(wal.append(0, vec![(LogId { term: 1, index: 1 }, b"a".to_vec())]))
        .expect("first");
    fs.arm(Fault {
        op: FaultOp::Sync,
        after: 0,
        kind: FaultKind::Eio,
        sticky: false,
    });
    let failed = runtime.block_on(wal.append(0, vec![(LogId { term: 1, index: 2 }, b"lost".to_vec())]));
    assert!(matches!(failed, Err(WalError::LaneFailed(_))), "{failed:?}");
    assert_eq!(wal.last_log_id(0).map(|id| id.index), Some(1));
    let refused = runtime.block_on(wal.append(0, vec![(LogId { term: 1, index: 2 }, b"b".to_vec())]));
    assert!(
        matches!(refused, Err(WalError::LaneFailed(_))),
        "refused until it heals: {refused:?}"
    );
    assert!(wal.lane_failed(0).is_some_and(|reason| reason.contains("fdatasync")));
    // Shard 1 lives in the other lane and is unaffected.
    runtime
        .block_on(wal.append(1, vec![(LogId { term: 1, index: 1 }, b"x".to_vec())]))
        .expect("other lane");
    wait_until_healed(&wal, 0);
    runtime
        .block_on(wal.append(0, vec![(LogId { term: 1, index: 2 }, b"b".to_vec())]))
        .expect("healed");
    runtime
        .block_on(wal.append(2, vec![(LogId { term: 1, index: 1 }, b"y".to_vec())]))
        .expect("the lane's other shards write again too");
    assert_eq!(bodies(&wal, 0), vec![b"a".to_vec(), b"b".to_vec()]);
    wal.shutdown();
    let lane_dir = Path::new("/wal/lane-00");
    assert!(
        fs.read(&segment::seal_path(lane_dir, 0)).is_some(),
        "the failed segment is sealed: {:?}",
        fs.paths()
    );
    for reopened in [fs.clone(), fs.power_loss(7)] {
        let wal = open_sim(&reopened);
        assert!(wal.degraded(0).is_none(), "{:?}", wal.degraded(0));
        assert_eq!(bodies(&wal, 0), vec![b"a".to_vec(), b"b".to_vec()]);
        assert_eq!(bodies(&wal, 2), vec![b"y".to_vec()]);
        runtime
            .block_on(wal.append(0, vec![(LogId { term: 1, index: 3 }, b"c".to_vec())]))
            .expect("writes after a restart");
        wal.shutdown();
    }
}

/// A write torn by an I/O error leaves half a batch in the segment. The lane heals past it, and
/// the half batch, now followed by valid batches in the next segment, is not taken for
/// corruption: the seal says the segment ended before it.
#[test]
fn a_torn_failed_write_is_sealed_off_and_never_read_as_corruption() {
    let runtime = runtime();
    let fs = SimFs::new();
    let wal = open_sim(&fs);
    runtime
        .block_on(wal.append(0, vec![(LogId { term: 1, index: 1 }, b"a".to_vec())]))
        .expect("first");
    fs.arm(Fault {
        op: FaultOp::Write,
        after: 0,
        kind: FaultKind::TornWrite(40),
        sticky: false,
    });
    let failed = runtime.block_on(wal.append(0, vec![(LogId { term: 1, index: 2 }, vec![9u8; 300])]));
    assert!(matches!(failed, Err(WalError::LaneFailed(_))), "{failed:?}");
    wait_until_healed(&wal, 0);
    for index in 2..=4u64 {
        runtime
            .block_on(wal.append(0, vec![(LogId { term: 1, index }, vec![index as u8; 10])]))
            .expect("healed");
    }
    wal.shutdown();
    let inspected = recovery::recover_lane(&fs, Path::new("/wal/lane-00"), &[0, 2], false).expect("inspect");
    assert!(inspected.damage.is_empty(), "{:?}", inspected.damage);
    assert!(inspected.segments[0].sealed_at.is_some());
    for reopened in [fs.clone(), fs.power_loss(3)] {
        let wal = open_sim(&reopened);
        assert!(wal.degraded(0).is_none(), "{:?}", wal.degraded(0));
        assert_eq!(wal.last_log_id(0).map(|id| id.index), Some(4));
        assert_eq!(bodies(&wal, 0)[1], vec![2u8; 10]);
        wal.shutdown();
    }
}

/// Segments deleted out of order (a middle one archived before an older one) never make a
/// healthy shard look damaged, even after the segment with the purge record is gone.
#[test]
fn segments_deleted_out_of_order_do_not_degrade_a_shard() {
    let runtime = runtime();
    let fs = SimFs::new();
    let wal = open_sim(&fs);
    let body = vec![5u8; 700];
    // Shard 2 writes one entry early and never purges it: the first segment stays.
    runtime
        .block_on(wal.append(2, vec![(LogId { term: 1, index: 1 }, b"pinned".to_vec())]))
        .expect("pin");
    for index in 1..=20u64 {
        runtime
            .block_on(wal.append(0, vec![(LogId { term: 1, index }, body.clone())]))
            .expect("append");
        if index % 5 == 0 {
            runtime.block_on(wal.purge_prefix(0, index - 2)).expect("purge");
        }
    }
    wal.shutdown();
    let lane_dir = Path::new("/wal/lane-00");
    let segments = segment::list_segments(&fs, lane_dir).expect("list");
    assert!(segments.first() == Some(&0), "the pinned segment remains: {segments:?}");
    assert!(segments.len() < 8, "middle segments were deleted: {segments:?}");
    let wal = open_sim(&fs);
    assert!(wal.degraded(0).is_none(), "{:?}", wal.degraded(0));
    assert_eq!(wal.last_log_id(0).map(|id| id.index), Some(20));
    assert_eq!(wal.read_entries(0, 19, 10).expect("read").len(), 2);
    assert_eq!(wal.read_entries(2, 1, 10).expect("read").len(), 1);
    wal.shutdown();
}

/// Bit rot in the newest batch of a lane (written whole, fsync'd, acknowledged) is corruption,
/// not a torn write: the shard is degraded, the batch is neither zeroed nor overwritten, and
/// its index is never handed out again. The same damage with a valid batch after it is
/// corruption too, named exactly. (This replaced a test asserting the old behaviour: a bad
/// last batch was dropped as a torn tail, its acknowledged entries lost and their indexes
/// reused.)
#[test]
fn bit_rot_in_the_last_batch_is_corruption_not_a_torn_tail() {
    let runtime = runtime();
    for damage_last_batch in [true, false] {
        let fs = SimFs::new();
        let wal = open_sim(&fs);
        for index in 1..=3u64 {
            runtime
                .block_on(wal.append(
                    0,
                    vec![(LogId { term: 1, index }, format!("entry {index}").into_bytes())],
                ))
                .expect("append");
        }
        wal.shutdown();
        let path = segment::segment_path(Path::new("/wal/lane-00"), 0);
        let bytes = fs.read(&path).expect("segment");
        let target = if damage_last_batch { "entry 3" } else { "entry 2" };
        let damaged_index = if damage_last_batch { 3 } else { 2 };
        let at = bytes.windows(7).position(|w| w == target.as_bytes()).expect("present");
        fs.flip_bit(&path, at, 0);
        let rotten = fs.read(&path).expect("segment");
        let (wal, reports) = Wal::open_on(Arc::new(fs.clone()), Path::new("/wal"), options()).expect("open");
        let lane = &reports[0];
        assert!(lane.torn_tail.is_none(), "{lane:?}");
        assert_eq!(lane.damage.len(), 1, "{lane:?}");
        assert_eq!(lane.damage[0].entry, Some((0, damaged_index)));
        assert!(wal.degraded(0).is_some());
        assert_eq!(wal.last_log_id(0).map(|id| id.index), Some(damaged_index - 1));
        assert!(fs.read(&path).expect("segment") == rotten, "nothing zeroed");
        assert!(
            !fs.paths().iter().any(|p| p.to_string_lossy().contains("/torn-")),
            "not set aside as a torn tail"
        );
        // Another shard of the lane writes on, after the damaged batch, never over it.
        runtime
            .block_on(wal.append(2, vec![(LogId { term: 1, index: 1 }, b"bystander".to_vec())]))
            .expect("a bystander writes on");
        wal.shutdown();
        let (wal, reports) = Wal::open_on(Arc::new(fs.clone()), Path::new("/wal"), options()).expect("reopen");
        let written = rotten.iter().rposition(|b| *b != 0).expect("written") + 1;
        assert!(
            fs.read(&path).expect("segment")[..written] == rotten[..written],
            "the damaged batch is still there"
        );
        assert_eq!(reports[0].damage.len(), 1, "{:?}", reports[0]);
        assert!(wal.degraded(0).is_some(), "still degraded after a restart");
        assert_eq!(wal.read_entries(2, 1, 10).expect("read").len(), 1);
        // The operator accepts the loss: the log continues past it, the index is never reused.
        let damage = &reports[0].damage[0];
        runtime
            .block_on(wal.accept_loss(0, damaged_index - 1, damage.len, &[(damage.segment_no, damage.offset)]))
            .expect("accept");
        wal.shutdown();
        let wal = open_sim(&fs);
        assert!(wal.degraded(0).is_none(), "{:?}", wal.degraded(0));
        let intact: Vec<u64> = wal
            .read_entries(0, 1, 10)
            .expect("read")
            .iter()
            .map(|(id, _)| id.index)
            .collect();
        let expected = if damage_last_batch { vec![1, 2] } else { vec![1, 3] };
        assert_eq!(intact, expected);
        wal.shutdown();
    }
}

/// A write that never finished is still a torn tail: cut short (the rest of the batch never
/// reached the page cache), or with its unsynced sectors dropped at a power loss (any subset
/// of them). It is discarded, nothing is degraded, and writing resumes at its place.
#[test]
fn a_torn_write_of_the_last_batch_is_still_a_torn_tail() {
    let runtime = runtime();
    // Batches of about 960 bytes: the second spans three sectors, one of them whole.
    let body = |index: u64| format!("entry {index} {}", "z".repeat(890)).into_bytes();
    // Cut short at many points of the batch.
    for keep in [10usize, 30, 60, 100, 300, 500, 700, 900, 950] {
        let fs = SimFs::new();
        let wal = open_sim(&fs);
        runtime
            .block_on(wal.append(0, vec![(LogId { term: 1, index: 1 }, body(1))]))
            .expect("append");
        fs.arm(Fault {
            op: FaultOp::Write,
            after: 0,
            kind: FaultKind::TornWrite(keep),
            sticky: false,
        });
        assert!(
            runtime
                .block_on(wal.append(0, vec![(LogId { term: 1, index: 2 }, body(2))]))
                .is_err()
        );
        wal.shutdown();
        let (wal, reports) = Wal::open_on(Arc::new(fs.clone()), Path::new("/wal"), options()).expect("open");
        assert!(
            reports[0].torn_tail.is_some(),
            "cut after {keep} bytes: {:?}",
            reports[0]
        );
        assert!(reports[0].damage.is_empty(), "cut after {keep} bytes: {:?}", reports[0]);
        assert!(wal.degraded(0).is_none());
        assert_eq!(wal.last_log_id(0).map(|id| id.index), Some(1));
        runtime
            .block_on(wal.append(0, vec![(LogId { term: 1, index: 2 }, b"again".to_vec())]))
            .expect("writing resumes at the torn tail");
        wal.shutdown();
    }
    // Written whole but never fsync'd (the fsync failed), then a power loss: each of its
    // sectors survives or not.
    let mut torn = 0;
    for seed in 0..40u64 {
        let fs = SimFs::new();
        let wal = open_sim(&fs);
        runtime
            .block_on(wal.append(0, vec![(LogId { term: 1, index: 1 }, body(1))]))
            .expect("append");
        fs.arm(Fault {
            op: FaultOp::Sync,
            after: 0,
            kind: FaultKind::Eio,
            sticky: false,
        });
        assert!(
            runtime
                .block_on(wal.append(0, vec![(LogId { term: 1, index: 2 }, body(2))]))
                .is_err()
        );
        wal.shutdown();
        let after = fs.power_loss(seed);
        let (wal, reports) = Wal::open_on(Arc::new(after), Path::new("/wal"), options()).expect("open");
        assert!(reports[0].damage.is_empty(), "seed {seed}: {:?}", reports[0]);
        assert!(wal.degraded(0).is_none(), "seed {seed}");
        let last = wal.last_log_id(0).map(|id| id.index);
        assert!(last == Some(1) || last == Some(2), "seed {seed}: {last:?}");
        torn += usize::from(reports[0].torn_tail.is_some());
        wal.shutdown();
    }
    assert!(torn > 0, "some power losses tore the batch");
}

/// Lane 0 (shards 0, 2, 4): a small entry of shard 2, one of shard 0, then shard 0's entry 2
/// with a 900-byte body (its body holds the whole sector 512..1024), then unless `last`, more
/// entries of shards 2 and 4. Shard 1 writes in lane 1.
fn write_around_a_sector(fs: &SimFs, last: bool) -> PathBuf {
    let runtime = runtime();
    let wal = open_sim(fs);
    let append = |shard: u16, index: u64, body: Vec<u8>| {
        runtime
            .block_on(wal.append(shard, vec![(LogId { term: 1, index }, body)]))
            .expect("append");
    };
    append(2, 1, b"bystander entry 1".to_vec());
    append(0, 1, b"victim entry 1".to_vec());
    append(0, 2, vec![b'v'; 900]);
    if !last {
        append(2, 2, b"bystander entry 2".to_vec());
        append(4, 1, b"other entry 1".to_vec());
    }
    append(1, 1, b"other lane".to_vec());
    wal.shutdown();
    let path = segment::segment_path(Path::new("/wal/lane-00"), 0);
    let bytes = fs.read(&path).expect("segment");
    let body_at = bytes.windows(900).position(|w| w == [b'v'; 900]).expect("present");
    assert!(
        body_at <= 512 && body_at + 900 >= 1024,
        "sector 512..1024 lies in the body"
    );
    path
}

/// One unreadable sector (EIO on every read of it) does not stop the WAL from opening: it was
/// read around sector by sector, the shard whose record it touches is degraded (exactly that
/// one), the region is reported with its exact position, the other shards read and write on,
/// and the operator's repair works on it. Also when the sector lies in the newest batch, which
/// must not be taken for a torn tail (zeroing it would drop an acknowledged entry).
#[test]
fn an_unreadable_sector_degrades_only_the_shard_whose_record_it_touches() {
    let runtime = runtime();
    for last in [false, true] {
        let fs = SimFs::new();
        let path = write_around_a_sector(&fs, last);
        let before = fs.read(&path).expect("segment");
        fs.make_unreadable(&path, 512, 1024);
        let (wal, reports) =
            Wal::open_on(Arc::new(fs.clone()), Path::new("/wal"), options()).expect("opens despite EIO");
        let lane = &reports[0];
        assert_eq!(lane.unreadable, vec![(0, 512, 512)], "{lane:?}");
        assert!(lane.torn_tail.is_none(), "{lane:?}");
        assert_eq!(lane.damage.len(), 1, "{lane:?}");
        assert_eq!(lane.damage[0].entry, Some((0, 2)));
        assert!(lane.damage[0].detail.contains("unreadable"), "{:?}", lane.damage[0]);
        assert!(wal.degraded(0).is_some());
        assert_eq!(wal.last_log_id(0).map(|id| id.index), Some(1));
        assert!(fs.read(&path).expect("segment") == before, "nothing zeroed or moved");
        for shard in [2u16, 4, 1] {
            assert!(wal.degraded(shard).is_none(), "shard {shard}");
        }
        let bystander = wal.read_entries(2, 1, 10).expect("read around the bad sector");
        assert_eq!(bystander.len(), if last { 1 } else { 2 });
        runtime
            .block_on(wal.append(
                2,
                vec![(
                    LogId {
                        term: 1,
                        index: if last { 2 } else { 3 },
                    },
                    b"later".to_vec(),
                )],
            ))
            .expect("the lane writes on");
        let damage = lane.damage[0].clone();
        runtime
            .block_on(wal.accept_loss(0, 1, damage.len, &[(damage.segment_no, damage.offset)]))
            .expect("repair");
        wal.shutdown();
        let (wal, reports) = Wal::open_on(Arc::new(fs.clone()), Path::new("/wal"), options()).expect("reopen");
        assert_eq!(reports[0].unreadable, vec![(0, 512, 512)]);
        assert!(wal.degraded(0).is_none(), "{:?}", wal.degraded(0));
        assert_eq!(
            wal.read_entries(2, 1, 10).expect("read").len(),
            if last { 2 } else { 3 }
        );
        wal.shutdown();
    }
}

/// An unreadable sector holding batch headers: which shards' entries it held cannot be known,
/// so every shard of that lane is degraded (the rule for unknown damage), and the WAL still
/// opens; the other lane is untouched.
#[test]
fn an_unreadable_batch_header_degrades_its_lane_and_the_wal_still_opens() {
    let fs = SimFs::new();
    let path = write_around_a_sector(&fs, false);
    fs.make_unreadable(&path, 0, 512);
    let (wal, reports) = Wal::open_on(Arc::new(fs.clone()), Path::new("/wal"), options()).expect("opens");
    assert_eq!(reports[0].unreadable, vec![(0, 0, 512)]);
    assert!(
        reports[0].damage.iter().any(|d| d.entry.is_none() && d.offset == 8),
        "{:?}",
        reports[0]
    );
    for shard in [0u16, 2, 4] {
        assert!(wal.degraded(shard).is_some(), "shard {shard}");
    }
    assert!(wal.degraded(1).is_none());
    assert_eq!(wal.read_entries(1, 1, 10).expect("read").len(), 1);
    wal.shutdown();
}

/// An unreadable sector past the last batch held nothing (the next batch's position reads as
/// zeros): it is reported, nothing is degraded, and writing goes on.
#[test]
fn an_unreadable_sector_past_the_last_batch_is_reported_only() {
    let runtime = runtime();
    let fs = SimFs::new();
    let path = write_around_a_sector(&fs, true);
    fs.make_unreadable(&path, 3584, 4096);
    let (wal, reports) = Wal::open_on(Arc::new(fs.clone()), Path::new("/wal"), options()).expect("opens");
    assert_eq!(reports[0].unreadable, vec![(0, 3584, 512)]);
    assert!(reports[0].damage.is_empty(), "{:?}", reports[0]);
    for shard in [0u16, 2, 4] {
        assert!(wal.degraded(shard).is_none(), "shard {shard}");
    }
    runtime
        .block_on(wal.append(0, vec![(LogId { term: 1, index: 3 }, b"more".to_vec())]))
        .expect("append");
    assert_eq!(wal.read_entries(0, 1, 10).expect("read").len(), 3);
    wal.shutdown();
}

/// The WAL side of an operator's repair: once the loss of a damaged entry is accepted, the
/// shard's log continues past it (the gap is reported, never hidden) and is no longer degraded.
#[test]
fn an_accepted_loss_lets_the_log_continue_past_the_damage() {
    let runtime = runtime();
    let fs = SimFs::new();
    let wal = open_sim(&fs);
    for index in 1..=4u64 {
        runtime
            .block_on(wal.append(
                0,
                vec![(LogId { term: 1, index }, format!("entry {index}").into_bytes())],
            ))
            .expect("append");
    }
    wal.shutdown();
    let path = segment::segment_path(Path::new("/wal/lane-00"), 0);
    let bytes = fs.read(&path).expect("segment");
    let at = bytes.windows(7).position(|w| w == b"entry 2").expect("present");
    fs.flip_bit(&path, at, 1);

    let (wal, reports) = Wal::open_on(Arc::new(fs.clone()), Path::new("/wal"), options()).expect("open");
    assert!(wal.degraded(0).is_some());
    assert_eq!(wal.last_log_id(0).map(|id| id.index), Some(1));
    let damage = &reports[0].damage[0];
    runtime
        .block_on(wal.accept_loss(0, 1, 90, &[(damage.segment_no, damage.offset)]))
        .expect("accept");
    wal.shutdown();

    let wal = open_sim(&fs);
    assert!(wal.degraded(0).is_none(), "{:?}", wal.degraded(0));
    assert_eq!(
        wal.accepted_losses(0),
        vec![AcceptedLoss {
            after_index: 1,
            lost_bytes: 90,
            regions: vec![(damage.segment_no, damage.offset)],
            resumed_at: Some(3)
        }]
    );
    let indexes: Vec<u64> = wal
        .read_entries(0, 1, 10)
        .expect("read")
        .iter()
        .map(|(id, _)| id.index)
        .collect();
    assert_eq!(
        indexes,
        vec![1, 3, 4],
        "entry 2 is gone, the intact ones after it are kept"
    );
    assert_eq!(wal.last_log_id(0).map(|id| id.index), Some(4));
    wal.shutdown();
}

/// A segment of the previous format (before batch framing) is refused with a sentence saying
/// what to do, never misread.
#[test]
fn a_format_1_segment_is_refused_with_a_clear_sentence() {
    let fs = SimFs::new();
    let lane_dir = Path::new("/wal/lane-00");
    let file = fs.create_new(&segment::segment_path(lane_dir, 0)).expect("create");
    file.write_all_at(segment::SEGMENT_MAGIC_V1, 0).expect("write");
    file.write_all_at(&[7u8; 64], 8).expect("write");
    let error = Wal::open_on(Arc::new(fs.clone()), Path::new("/wal"), options())
        .err()
        .expect("refused");
    let sentence = error.to_string();
    assert!(
        sentence.contains("WAL format 1") && sentence.contains("drain it"),
        "{sentence}"
    );
    assert_eq!(
        fs.read(&segment::segment_path(lane_dir, 0)).expect("kept")[8],
        7,
        "nothing changed"
    );
}

/// A replicated log names its last purged entry by term and index: the term given to
/// `purge_through` survives reopening, also once no entry is left.
#[test]
fn the_purged_entry_keeps_its_term_across_reopen() {
    let dir = tempfile::tempdir().expect("tempdir");
    let runtime = runtime();
    let wal = open(dir.path());
    for index in 1..=40u64 {
        let term = if index <= 20 { 3 } else { 4 };
        runtime
            .block_on(wal.append(1, vec![(LogId { term, index }, vec![7u8; 200])]))
            .expect("append");
    }
    runtime
        .block_on(wal.purge_through(1, LogId { term: 3, index: 20 }))
        .expect("purge");
    assert_eq!(wal.purged(1), Some(LogId { term: 3, index: 20 }));
    // Enough further entries to rotate past the segments holding the purge mark.
    for index in 41..=120u64 {
        runtime
            .block_on(wal.append(1, vec![(LogId { term: 4, index }, vec![7u8; 200])]))
            .expect("append");
    }
    wal.shutdown();
    let wal = open(dir.path());
    assert_eq!(wal.purged(1), Some(LogId { term: 3, index: 20 }));
    assert_eq!(wal.first_index(1), Some(21));
    assert_eq!(wal.last_log_id(1), Some(LogId { term: 4, index: 120 }));
    // Purging everything leaves the log's end named by the purge.
    runtime
        .block_on(wal.purge_through(1, LogId { term: 4, index: 120 }))
        .expect("purge");
    wal.shutdown();
    let wal = open(dir.path());
    assert_eq!(wal.purged(1), Some(LogId { term: 4, index: 120 }));
    assert_eq!(wal.last_log_id(1), Some(LogId { term: 4, index: 120 }));
    assert_eq!(wal.first_index(1), None);
    wal.shutdown();
}

/// A replica that installs a snapshot purges past its own last entry; its log then continues
/// right after the purged entry (and does so after reopening too).
#[test]
fn a_purge_past_the_last_entry_moves_the_log_end() {
    let dir = tempfile::tempdir().expect("tempdir");
    let runtime = runtime();
    let wal = open(dir.path());
    for index in 1..=5u64 {
        runtime
            .block_on(wal.append(2, vec![(LogId { term: 1, index }, vec![1u8; 10])]))
            .expect("append");
    }
    runtime
        .block_on(wal.purge_through(2, LogId { term: 3, index: 689 }))
        .expect("purge");
    assert_eq!(wal.last_log_id(2), Some(LogId { term: 3, index: 689 }));
    runtime
        .block_on(wal.append(2, vec![(LogId { term: 3, index: 690 }, vec![2u8; 10])]))
        .expect("the entry after the purged one");
    wal.shutdown();
    let wal = open(dir.path());
    assert_eq!(wal.last_log_id(2), Some(LogId { term: 3, index: 690 }));
    assert_eq!(wal.first_index(2), Some(690));
    wal.shutdown();
}
