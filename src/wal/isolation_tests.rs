//! Segment deletion and the budget per shard: a degraded shard keeps only the segments holding
//! its records, a shard the archive cannot read counts its own segments, and neither holds the
//! other shards of its lane back.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

use proptest::prelude::*;

use super::fault::SimFs;
use super::*;

const SEGMENT: u64 = 4096;

fn options(lanes: usize, shard_count: u16) -> WalOptions {
    WalOptions {
        lanes,
        shard_count,
        segment_bytes: SEGMENT,
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

fn open_sim(fs: &SimFs, options: WalOptions) -> Wal {
    Wal::open_on(Arc::new(fs.clone()), Path::new("/wal"), options)
        .expect("open wal")
        .0
}

/// Unique in the segment files: finds an entry's record.
fn needle(shard: u16, index: u64) -> String {
    format!("s{shard}-e{index:04}-")
}

fn body(shard: u16, index: u64, len: usize) -> Vec<u8> {
    let mut body = needle(shard, index).into_bytes();
    body.resize(len.max(body.len()), b'x');
    body
}

fn append(runtime: &tokio::runtime::Runtime, wal: &Wal, shard: u16, index: u64, len: usize) {
    runtime
        .block_on(wal.append(shard, vec![(LogId { term: 1, index }, body(shard, index, len))]))
        .expect("append");
}

fn segment_files(fs: &SimFs) -> Vec<PathBuf> {
    fs.paths()
        .into_iter()
        .filter(|path| path.extension().is_some_and(|ext| ext == "wal"))
        .collect()
}

fn holds(fs: &SimFs, path: &Path, needle: &str) -> bool {
    fs.read(path)
        .is_some_and(|bytes| bytes.windows(needle.len()).any(|w| w == needle.as_bytes()))
}

/// Flips a bit inside an entry's body, so its record fails its checksum at the next open.
fn rot(fs: &SimFs, shard: u16, index: u64) {
    let needle = needle(shard, index);
    for path in segment_files(fs) {
        let bytes = fs.read(&path).expect("segment");
        if let Some(at) = bytes.windows(needle.len()).position(|w| w == needle.as_bytes()) {
            // In the filler after the needle, so the needle still finds the record's file.
            fs.flip_bit(&path, at + needle.len() + 1, 3);
            return;
        }
    }
    panic!("entry {index} of shard {shard} is in no segment");
}

/// The bytes written so far (up to the last non-zero byte) of every file holding one of `needles`.
fn written_images(fs: &SimFs, needles: &[String]) -> BTreeMap<PathBuf, Vec<u8>> {
    segment_files(fs)
        .into_iter()
        .filter(|path| needles.iter().any(|needle| holds(fs, path, needle)))
        .map(|path| {
            let bytes = fs.read(&path).expect("segment");
            let used = bytes.iter().rposition(|b| *b != 0).map_or(0, |last| last + 1);
            (path, bytes[..used].to_vec())
        })
        .collect()
}

fn lane_files(fs: &SimFs, lane: usize) -> Vec<PathBuf> {
    let lane_dir = PathBuf::from(format!("/wal/lane-{lane:02}"));
    let mut files: Vec<PathBuf> = segment_files(fs)
        .into_iter()
        .filter(|path| path.parent() == Some(lane_dir.as_path()))
        .collect();
    files.sort();
    files
}

#[test]
fn a_degraded_shard_keeps_only_the_segments_holding_its_records() {
    let fs = SimFs::new();
    let runtime = runtime();
    // One lane: every shard shares every segment.
    let wal = open_sim(&fs, options(1, 3));
    for index in 1..=6 {
        append(&runtime, &wal, 0, index, 600);
        append(&runtime, &wal, 1, index, 600);
    }
    wal.shutdown();
    rot(&fs, 0, 3);
    let wal = open_sim(&fs, options(1, 3));
    assert!(wal.degraded(0).is_some(), "shard 0 is degraded");
    let needles: Vec<String> = (1..=6).map(|index| needle(0, index)).collect();
    let kept = written_images(&fs, &needles);
    assert!(kept.len() >= 2, "the degraded shard's records span segments: {kept:?}");

    // Shard 1 goes on writing far past those segments, its archive keeping up.
    let mut last = 6;
    for _ in 0..20 {
        for _ in 0..6 {
            last += 1;
            append(&runtime, &wal, 1, last, 300);
        }
        runtime.block_on(wal.purge_prefix(1, last)).expect("purge");
    }
    let files = lane_files(&fs, 0);
    let newest = files.last().cloned().expect("a segment");
    for path in &files {
        assert!(
            kept.contains_key(path) || *path == newest,
            "{} holds nothing the degraded shard needs and nothing unarchived: it is deleted ({} files)",
            path.display(),
            files.len()
        );
    }
    for (path, image) in &kept {
        let now = fs
            .read(path)
            .expect("a segment holding a degraded shard's records is kept");
        assert_eq!(&now[..image.len()], &image[..], "{} is not overwritten", path.display());
    }
    let usage = wal.usage();
    assert_eq!(usage.flowing, SEGMENT, "only the active segment counts for shard 1");
    assert_eq!(wal.budget_bytes(1), SEGMENT);
    assert!(usage.degraded_only >= (kept.len() as u64 - 1) * SEGMENT, "{usage:?}");
    assert!(
        wal.disk_bytes() <= (kept.len() as u64 + 1) * SEGMENT,
        "disk stays bounded"
    );
    wal.shutdown();

    // And after a restart: the damage is still there, the shard still degraded.
    let wal = open_sim(&fs, options(1, 3));
    assert!(wal.degraded(0).is_some());
    assert_eq!(wal.read_entries(1, last, 10).expect("read").len(), 0);
    assert_eq!(wal.last_log_id(1).map(|id| id.index), Some(last));
    wal.shutdown();
}

#[test]
fn a_shard_the_archive_cannot_read_counts_its_segments_against_itself_only() {
    let fs = SimFs::new();
    let runtime = runtime();
    let wal = open_sim(&fs, options(1, 3));
    wal.set_archive_stalled(2, Some("entry 1 cannot be read".into()));
    // Shard 2 writes a little into every segment; shard 1 writes a lot and is archived.
    let (mut last_1, mut last_2) = (0, 0);
    for _ in 0..12 {
        last_2 += 1;
        append(&runtime, &wal, 2, last_2, 100);
        for _ in 0..12 {
            last_1 += 1;
            append(&runtime, &wal, 1, last_1, 300);
        }
        runtime.block_on(wal.purge_prefix(1, last_1)).expect("purge");
    }
    let disk = wal.disk_bytes();
    assert!(disk >= 6 * SEGMENT, "shard 2 keeps many segments: {disk}");
    assert_eq!(wal.budget_bytes(1), SEGMENT, "shard 1 is judged by what it keeps");
    assert_eq!(wal.budget_bytes(2), disk, "shard 2 by everything it keeps too");
    assert_eq!(
        wal.archive_stalled_shards(),
        vec![(2, "entry 1 cannot be read".to_string())]
    );
    // Once readable again, its segments count for everyone until archived.
    wal.set_archive_stalled(2, None);
    assert_eq!(wal.budget_bytes(1), disk);
    runtime.block_on(wal.purge_prefix(2, last_2)).expect("purge");
    append(&runtime, &wal, 1, last_1 + 1, 10);
    assert_eq!(wal.disk_bytes(), SEGMENT, "archived: only the active segment is left");
    wal.shutdown();
}

#[derive(Debug, Clone)]
enum Step {
    Append { shard: u16, len: usize },
    Purge { shard: u16, keep: u64 },
}

const SHARDS: u16 = 6;
const LANES: usize = 2;
/// Shards that never get damage (one per lane: 4 in lane 0, 5 in lane 1).
const ALWAYS_FLOWING: [u16; 2] = [4, 5];

fn step_strategy() -> impl Strategy<Value = Step> {
    prop_oneof![
        5 => (0..SHARDS, 20usize..400).prop_map(|(shard, len)| Step::Append { shard, len }),
        1 => (0..SHARDS, 0u64..4).prop_map(|(shard, keep)| Step::Purge { shard, keep }),
    ]
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 32, ..ProptestConfig::default() })]
    /// Random shards degraded by bit rot in random entries, then random writes and purges by the
    /// others: their histories are exactly what they wrote, the degraded shards' intact entries
    /// are still served and their files untouched, and every other segment goes once archived.
    #[test]
    fn degraded_shards_leave_the_other_shards_of_their_lanes_unaffected(
        before in proptest::collection::vec((0..SHARDS, 20usize..400), 1..40),
        damage in proptest::collection::btree_map(0u16..4, 0.0f64..1.0, 0..3),
        after in proptest::collection::vec(step_strategy(), 0..60),
    ) {
        let fs = SimFs::new();
        let runtime = runtime();
        let wal = open_sim(&fs, options(LANES, SHARDS));
        let mut model: BTreeMap<u16, (Vec<Vec<u8>>, u64)> = BTreeMap::new();
        let write = |wal: &Wal, model: &mut BTreeMap<u16, (Vec<Vec<u8>>, u64)>, shard: u16, len: usize| {
            let log = &mut model.entry(shard).or_default().0;
            let index = log.len() as u64 + 1;
            append(&runtime, wal, shard, index, len);
            log.push(body(shard, index, len));
        };
        for (shard, len) in &before {
            write(&wal, &mut model, *shard, *len);
        }
        // Damage is never in a lane's last batch (that is a torn tail, never acknowledged).
        for shard in ALWAYS_FLOWING {
            write(&wal, &mut model, shard, 40);
        }
        wal.shutdown();
        let damaged: BTreeMap<u16, u64> = damage
            .into_iter()
            .filter_map(|(shard, at)| {
                let count = model.get(&shard)?.0.len() as u64;
                Some((shard, 1 + ((count as f64 * at) as u64).min(count - 1)))
            })
            .collect();
        for (shard, at) in &damaged {
            rot(&fs, *shard, *at);
        }
        let wal = open_sim(&fs, options(LANES, SHARDS));
        let degraded_needles: Vec<String> = damaged
            .keys()
            .flat_map(|shard| (1..=model[shard].0.len() as u64).map(move |index| needle(*shard, index)))
            .collect();
        let kept = written_images(&fs, &degraded_needles);
        for shard in 0..SHARDS {
            prop_assert_eq!(wal.degraded(shard).is_some(), damaged.contains_key(&shard), "shard {}", shard);
        }

        let flowing: Vec<u16> = (0..SHARDS).filter(|shard| !damaged.contains_key(shard)).collect();
        let mut steps = after;
        // Enough writes to fill several segments in every lane, then everything archived.
        for round in 0..30 {
            steps.push(Step::Append { shard: ALWAYS_FLOWING[round % 2], len: 350 });
        }
        steps.extend(flowing.iter().map(|&shard| Step::Purge { shard, keep: 0 }));
        for step in steps {
            match step {
                Step::Append { shard, len } if !damaged.contains_key(&shard) => {
                    write(&wal, &mut model, shard, len);
                }
                Step::Purge { shard, keep } if !damaged.contains_key(&shard) => {
                    let (log, purged) = model.entry(shard).or_default();
                    let through = (log.len() as u64).saturating_sub(keep).max(*purged);
                    if through > *purged {
                        runtime.block_on(wal.purge_prefix(shard, through)).expect("purge");
                        *purged = through;
                    }
                }
                _ => {}
            }
        }
        // One more write per lane, so the last purges' deletions have happened.
        for shard in ALWAYS_FLOWING {
            write(&wal, &mut model, shard, 20);
        }

        for shard in 0..SHARDS {
            let Some((log, purged)) = model.get(&shard) else { continue };
            let intact_through = damaged.get(&shard).map_or(log.len() as u64, |at| at - 1);
            let read = wal.read_entries(shard, purged + 1, usize::MAX).expect("read");
            let wanted: Vec<&Vec<u8>> = log[*purged as usize..intact_through as usize].iter().collect();
            let got: Vec<&Vec<u8>> = read.iter().map(|(_, body)| body).collect();
            prop_assert_eq!(got, wanted, "history of shard {}", shard);
        }
        for (path, image) in &kept {
            let now = fs.read(path);
            prop_assert!(now.is_some(), "{} holds a degraded shard's records: kept", path.display());
            prop_assert_eq!(&now.unwrap()[..image.len()], &image[..], "{} is not overwritten", path.display());
        }
        let kept_paths: BTreeSet<&PathBuf> = kept.keys().collect();
        for lane in 0..LANES {
            let mut files = lane_files(&fs, lane);
            files.pop();
            for path in &files {
                prop_assert!(
                    kept_paths.contains(path),
                    "{} holds only archived entries of flowing shards: deleted",
                    path.display()
                );
            }
        }
        // Only the lanes' newest segments (each written once more) and flowing shards' last
        // unpurged entries count against a flowing shard's budget.
        prop_assert!(wal.budget_bytes(4) <= 2 * LANES as u64 * SEGMENT, "{:?}", wal.usage());
        wal.shutdown();
    }
}
