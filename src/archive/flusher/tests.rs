//! The flusher with one shard's WAL entries unreadable, damaged or undecodable: that shard is set
//! aside (what came before the bad entry archived), every other shard's rows reach the archive
//! and the WAL segments they alone kept are deleted.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use proptest::prelude::*;
use serde_json::value::RawValue;

use super::*;
use crate::model::{Message, MessageRecord, SessionRecord, Timestamp};
use crate::shard::ops::Op;
use crate::wal::fault::SimFs;
use crate::wal::{LogId, WalOptions};

const SHARDS: u16 = 6;
const LANES: usize = 2;

fn wal_options() -> WalOptions {
    WalOptions {
        lanes: LANES,
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

fn raw(text: &str) -> Box<RawValue> {
    RawValue::from_string(text.to_string()).expect("json")
}

fn session_id(shard: u16) -> String {
    format!("session-{shard}")
}

/// Unique in the WAL's bytes: finds an entry's record in the segment files.
fn needle(shard: u16, index: u64) -> String {
    format!("msg-{shard}-{index:04}")
}

/// Entry `index` of a shard: its session's message `index` (the first also creates it).
fn entry(shard: u16, index: u64) -> Vec<u8> {
    let session: Arc<str> = session_id(shard).into();
    let mut ops = Vec::new();
    if index == 1 {
        ops.push(Op::SessionCreated(SessionRecord {
            id: session.clone(),
            user_id: "u".into(),
            agent_id: "a".into(),
            metadata: raw("{}"),
            inserted_at: Timestamp(1),
        }));
    }
    ops.push(Op::MessageAppended(MessageRecord {
        message: Message {
            id: needle(shard, index),
            session_id: session,
            seq: index,
            sender_id: "u".into(),
            kind: "text".into(),
            content: raw(r#"{"text":"hello"}"#),
            metadata: raw("{}"),
            inserted_at: Timestamp(index as i64),
        },
        client_id: None,
        fingerprint: index,
        nonuser_through: 0,
        from_user: true,
    }));
    ops::encode_entry(&ops)
}

struct Fixture {
    fs: SimFs,
    wal: Arc<Wal>,
    archive: Archive,
    flusher: Flusher,
    progress: Vec<ShardProgress>,
    _commands: Vec<mpsc::Receiver<Command>>,
    _dir: tempfile::TempDir,
}

async fn fixture() -> Fixture {
    let dir = tempfile::tempdir().expect("tempdir");
    let fs = SimFs::new();
    let wal = Arc::new(
        Wal::open_on(Arc::new(fs.clone()), Path::new("/wal"), wal_options())
            .expect("open wal")
            .0,
    );
    let archive = Archive::open_sqlite(&dir.path().join("archive.db")).expect("sqlite");
    archive.migrate().await.expect("migrate");
    let (senders, receivers) = (0..SHARDS).map(|_| mpsc::channel(4096)).unzip();
    let flusher = Flusher {
        wal: wal.clone(),
        archive: archive.clone(),
        shard_commands: senders,
        wakeup: Arc::new(Notify::new()),
        options: FlusherOptions {
            interval: Duration::from_millis(1),
            // Several transactions per cycle, so the failing shard meets the others again.
            max_entries_per_shard: 3,
            max_backoff: Duration::from_millis(1),
        },
        cluster: None,
    };
    Fixture {
        fs,
        wal,
        archive,
        flusher,
        progress: ShardProgress::all(SHARDS as usize),
        _commands: receivers,
        _dir: dir,
    }
}

impl Fixture {
    async fn append(&self, shard: u16, index: u64, body: Vec<u8>) {
        self.wal
            .append(shard, vec![(LogId { term: 1, index }, body)])
            .await
            .expect("append");
    }

    /// Every shard's entries `1..=count`, interleaved, with `body` deciding each one's bytes.
    async fn write(&self, counts: &[u64], body: impl Fn(u16, u64) -> Vec<u8>) {
        let most = counts.iter().copied().max().unwrap_or(0);
        for index in 1..=most {
            for shard in 0..SHARDS {
                if index <= counts[shard as usize] {
                    self.append(shard, index, body(shard, index)).await;
                }
            }
        }
    }

    /// A few flush cycles (set-aside shards are retried in each, their backoff being 1 ms).
    async fn flush(&mut self) {
        for _ in 0..3 {
            tokio::time::sleep(Duration::from_millis(3)).await;
            self.flusher
                .flush_available(&mut self.progress)
                .await
                .expect("the flush goes on whatever one shard's log holds");
        }
    }

    fn segment_files(&self) -> Vec<PathBuf> {
        self.fs
            .paths()
            .into_iter()
            .filter(|path| path.extension().is_some_and(|ext| ext == "wal"))
            .collect()
    }

    /// `(file, offset)` of an entry's needle.
    fn locate(&self, shard: u16, index: u64) -> (PathBuf, usize) {
        let needle = needle(shard, index);
        self.segment_files()
            .into_iter()
            .find_map(|path| {
                let bytes = self.fs.read(&path)?;
                let at = bytes.windows(needle.len()).position(|w| w == needle.as_bytes())?;
                Some((path, at))
            })
            .expect("entry in a segment")
    }

    fn holds_any(&self, path: &Path, needles: &[String]) -> bool {
        let bytes = self.fs.read(path).expect("segment");
        needles
            .iter()
            .any(|needle| bytes.windows(needle.len()).any(|w| w == needle.as_bytes()))
    }

    async fn archived_seqs(&self, shard: u16) -> Vec<u64> {
        self.archive
            .read_messages(&session_id(shard), 1, 1000, usize::MAX)
            .await
            .expect("read archive")
            .iter()
            .map(|record| record.message.seq)
            .collect()
    }
}

/// How one shard's log goes bad at one entry.
#[derive(Debug, Clone, Copy)]
enum Fault {
    /// The entry's record cannot be read (EIO), as an unreadable sector.
    Unreadable,
    /// One bit of its body flipped after it was written (the record's checksum fails).
    BitFlip,
    /// A record the WAL vouches for whose body is not a log entry.
    Undecodable,
}

fn undecodable(shard: u16, index: u64) -> Vec<u8> {
    format!("not a log entry {}", needle(shard, index)).into_bytes()
}

impl Fixture {
    fn damage(&self, shard: u16, index: u64, fault: Fault) {
        let (path, at) = self.locate(shard, index);
        match fault {
            Fault::Unreadable => self.fs.make_unreadable(&path, at, at + 1),
            Fault::BitFlip => self.fs.flip_bit(&path, at + needle(shard, index).len() + 1, 0),
            Fault::Undecodable => {}
        }
    }

    /// The shards that failed at `failing[shard]` keep their entries from there, everything else
    /// is archived; each lane keeps only the segments a failed shard still needs, and its newest.
    async fn check(&self, counts: &[u64], failing: &BTreeMap<u16, u64>) -> std::result::Result<(), TestCaseError> {
        for shard in 0..SHARDS {
            let count = counts[shard as usize];
            let archived_through = failing.get(&shard).map_or(count, |at| at - 1);
            let watermark = self.archive.watermark(shard).await.expect("watermark");
            prop_assert_eq!(watermark, archived_through, "watermark of shard {}", shard);
            prop_assert_eq!(
                self.archived_seqs(shard).await,
                (1..=archived_through).collect::<Vec<_>>(),
                "archived messages of shard {}",
                shard
            );
            let stalled = self.wal.archive_stalled(shard);
            match failing.get(&shard) {
                Some(at) => prop_assert!(
                    stalled
                        .as_ref()
                        .is_some_and(|reason| reason.contains(&format!("entry {at}"))),
                    "shard {} is set aside naming entry {}: {:?}",
                    shard,
                    at,
                    stalled
                ),
                None => prop_assert!(stalled.is_none(), "shard {} flows: {:?}", shard, stalled),
            }
        }
        let named: Vec<u16> = self.wal.archive_stalled_shards().iter().map(|(s, _)| *s).collect();
        prop_assert_eq!(named, failing.keys().copied().collect::<Vec<_>>());
        let still_needed: Vec<String> = failing
            .iter()
            .flat_map(|(shard, at)| (*at..=counts[*shard as usize]).map(|index| needle(*shard, index)))
            .collect();
        for lane in 0..LANES {
            let lane_dir = PathBuf::from(format!("/wal/lane-{lane:02}"));
            let mut files: Vec<PathBuf> = self
                .segment_files()
                .into_iter()
                .filter(|path| path.parent() == Some(&lane_dir))
                .collect();
            files.sort();
            files.pop(); // the active segment
            for path in files {
                prop_assert!(
                    self.holds_any(&path, &still_needed),
                    "{} holds nothing a set-aside shard needs: it is deleted",
                    path.display()
                );
            }
        }
        Ok(())
    }
}

#[test]
fn a_shard_whose_wal_cannot_be_read_is_set_aside_and_the_others_keep_archiving() {
    runtime().block_on(async {
        let mut fixture = fixture().await;
        let counts = [12; SHARDS as usize];
        fixture.write(&counts, entry).await;
        let segments_before = fixture.segment_files().len();
        fixture.damage(1, 5, Fault::Unreadable);
        fixture.flush().await;
        fixture
            .check(&counts, &BTreeMap::from([(1, 5)]))
            .await
            .expect("only shard 1 is held back");
        assert!(
            fixture.segment_files().len() < segments_before,
            "the other shards' segments are deleted"
        );
        let reason = fixture.wal.archive_stalled(1).expect("set aside");
        assert!(reason.contains("segment") && reason.contains("offset"), "{reason}");

        // The shards keep flowing in later cycles while shard 1 stays set aside.
        for shard in [0u16, 3] {
            fixture.append(shard, 13, entry(shard, 13)).await;
        }
        fixture.flush().await;
        assert_eq!(fixture.archive.watermark(0).await.unwrap(), 13);
        assert_eq!(fixture.archive.watermark(3).await.unwrap(), 13);
        assert_eq!(fixture.archive.watermark(1).await.unwrap(), 4);
    });
}

#[test]
fn an_undecodable_entry_sets_aside_only_its_shard() {
    runtime().block_on(async {
        let mut fixture = fixture().await;
        let counts = [6; SHARDS as usize];
        fixture
            .write(&counts, |shard, index| match (shard, index) {
                (4, 3) => undecodable(shard, index),
                _ => entry(shard, index),
            })
            .await;
        fixture.flush().await;
        fixture
            .check(&counts, &BTreeMap::from([(4, 3)]))
            .await
            .expect("only shard 4 is held back");
    });
}

#[test]
fn a_shard_that_became_readable_again_resumes() {
    runtime().block_on(async {
        let mut fixture = fixture().await;
        let counts = [4; SHARDS as usize];
        fixture.write(&counts, entry).await;
        // A read that fails once (a transient EIO): a single-entry region made unreadable and
        // then readable again is the same as a retry succeeding.
        let (path, at) = fixture.locate(2, 2);
        fixture.fs.make_unreadable(&path, at, at + 1);
        fixture.flush().await;
        assert!(fixture.wal.archive_stalled(2).is_some());
        fixture.fs.clear_unreadable(&path);
        // As a restarted flusher would: it knows nothing of the shard set aside before.
        fixture.progress = ShardProgress::all(SHARDS as usize);
        fixture.flush().await;
        fixture
            .check(&counts, &BTreeMap::new())
            .await
            .expect("everything archived once the entry reads again");
    });
}

fn fault_strategy() -> impl Strategy<Value = Fault> {
    prop_oneof![Just(Fault::Unreadable), Just(Fault::BitFlip), Just(Fault::Undecodable)]
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 24, ..ProptestConfig::default() })]
    /// Faults in random shards at random entries: every other shard's rows are archived exactly,
    /// each failed shard up to its bad entry, and only the segments failed shards need remain.
    #[test]
    fn faults_in_random_shards_leave_the_others_archived_and_deleted(
        counts in proptest::collection::vec(1u64..14, SHARDS as usize),
        faults in proptest::collection::btree_map(0..SHARDS, (0.0f64..1.0, fault_strategy()), 0..3),
    ) {
        let failing: BTreeMap<u16, (u64, Fault)> = faults
            .into_iter()
            .map(|(shard, (at, fault))| {
                let count = counts[shard as usize];
                (shard, (1 + ((count as f64 * at) as u64).min(count - 1), fault))
            })
            .collect();
        runtime().block_on(async {
            let mut fixture = fixture().await;
            fixture
                .write(&counts, |shard, index| match failing.get(&shard) {
                    Some((at, Fault::Undecodable)) if *at == index => undecodable(shard, index),
                    _ => entry(shard, index),
                })
                .await;
            for (shard, (at, fault)) in &failing {
                fixture.damage(*shard, *at, *fault);
            }
            fixture.flush().await;
            let failing_at = failing.iter().map(|(shard, (at, _))| (*shard, *at)).collect();
            fixture.check(&counts, &failing_at).await
        })?;
    }
}
