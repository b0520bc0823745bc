//! openraft's log storage on our WAL: one shard's logical log is one Raft group's log.
//!
//! Raft index `i` is WAL index `i + 1` (the WAL counts from 1 and uses 0 for "nothing"; Raft's
//! first entry, the initial membership, has index 0). Terms are the WAL's terms. A record's body
//! is a one-byte payload tag followed by the payload: blank, an application command's bytes, a
//! membership (MessagePack), or a joined or forgotten member's id (8 bytes, big-endian).
//!
//! The storage contract openraft states, and how it is kept here:
//! - entries are readable as soon as `append` returns (before they are durable): they wait in
//!   the in-memory `tail` until the WAL has made them durable and indexed them;
//! - the flush callback fires only after fdatasync, in append order (one completion task per
//!   shard awaits the WAL's answers in order);
//! - all writes are serialized: appends, truncations and purges go through the shard's single
//!   WAL lane queue in call order, and a vote is saved only after every earlier append is durable.

use std::collections::VecDeque;
use std::fmt::Debug;
use std::io;
use std::ops::{Bound, RangeBounds};
use std::sync::{Arc, Mutex};

use openraft::storage::{IOFlushed, LogState, RaftLogStorage};
use openraft::vote::leader_id_std::CommittedLeaderId;
use openraft::{EntryPayload, OptionalSend, RaftLogReader};
use tokio::sync::{mpsc, oneshot, watch};

use super::types::{Entry, LogId, ShardCommand, TypeConfig, Vote};
use crate::wal::{self, Wal, WalError};

const TAG_BLANK: u8 = 0;
const TAG_COMMAND: u8 = 1;
const TAG_MEMBERSHIP: u8 = 2;
const TAG_JOINED: u8 = 3;
const TAG_FORGOTTEN: u8 = 4;
/// The cluster's id (UTF-8), shard 0 only (`identity`).
const TAG_IDENTITY: u8 = 5;

/// Largest number of entries one WAL read returns; readers loop for more.
const READ_CHUNK_ENTRIES: usize = 1024;

/// How much the in-memory tail of the log holds before it lets its oldest durable entries go
/// (entries not durable yet always stay, whatever their number); whichever bound is passed first.
/// openraft reads every entry back soon after appending it, to replicate it to each follower and
/// to apply it; the tail answers those reads without a WAL read (a blocking-pool hand-off, a
/// `pread` into a zeroed buffer and two copies per entry). At most ~16 MiB over 64 shards.
const TAIL_KEEP_ENTRIES: usize = 256;
const TAIL_KEEP_BYTES: usize = 256 * 1024;

/// The bytes a `ShardCommand` may take at most so that its entry fits the WAL.
pub fn max_command_bytes(wal: &Wal) -> usize {
    wal.max_entry_bytes() - 1
}

pub fn to_wal_id(log_id: &LogId) -> wal::LogId {
    wal::LogId {
        term: log_id.leader_id.term,
        index: log_id.index + 1,
    }
}

pub fn from_wal_id(log_id: wal::LogId) -> LogId {
    LogId {
        leader_id: CommittedLeaderId::new(log_id.term),
        index: log_id.index - 1,
    }
}

/// The application command a WAL record of a consensus log holds, or `None` for Raft's own
/// entries (blank, membership, joined or forgotten member, cluster id), which the application skips.
pub fn command_in_record(body: &[u8]) -> Result<Option<&[u8]>, String> {
    match body.split_first() {
        Some((&TAG_COMMAND, command)) => Ok(Some(command)),
        Some((&TAG_BLANK | &TAG_MEMBERSHIP | &TAG_JOINED | &TAG_FORGOTTEN | &TAG_IDENTITY, _)) => Ok(None),
        Some((tag, _)) => Err(format!("unknown consensus record tag {tag}")),
        None => Err("empty consensus record".to_string()),
    }
}

fn encode(entry: &Entry) -> Vec<u8> {
    match &entry.payload {
        EntryPayload::Blank => vec![TAG_BLANK],
        EntryPayload::Normal(ShardCommand::App(command)) => {
            let mut body = Vec::with_capacity(1 + command.len());
            body.push(TAG_COMMAND);
            body.extend_from_slice(command);
            body
        }
        EntryPayload::Normal(ShardCommand::Joined(node)) => member_record(TAG_JOINED, *node),
        EntryPayload::Normal(ShardCommand::Forgotten(node)) => member_record(TAG_FORGOTTEN, *node),
        EntryPayload::Normal(ShardCommand::Identity(id)) => {
            let mut body = vec![TAG_IDENTITY];
            body.extend_from_slice(id.as_bytes());
            body
        }
        EntryPayload::Membership(membership) => {
            let mut body = vec![TAG_MEMBERSHIP];
            body.extend(rmp_serde::to_vec(membership).expect("a membership always encodes"));
            body
        }
    }
}

fn member_record(tag: u8, node: u64) -> Vec<u8> {
    let mut body = vec![tag];
    body.extend_from_slice(&node.to_be_bytes());
    body
}

fn decode(log_id: wal::LogId, body: &[u8]) -> io::Result<Entry> {
    let invalid = |what: String| io::Error::new(io::ErrorKind::InvalidData, what);
    let member = |node: &[u8]| -> io::Result<u64> {
        Ok(u64::from_be_bytes(node.try_into().map_err(|_| {
            invalid(format!("member entry {log_id:?} is not 8 bytes"))
        })?))
    };
    let payload = match body.split_first() {
        Some((&TAG_BLANK, [])) => EntryPayload::Blank,
        Some((&TAG_COMMAND, command)) => EntryPayload::Normal(ShardCommand::App(command.to_vec())),
        Some((&TAG_JOINED, node)) => EntryPayload::Normal(ShardCommand::Joined(member(node)?)),
        Some((&TAG_FORGOTTEN, node)) => EntryPayload::Normal(ShardCommand::Forgotten(member(node)?)),
        Some((&TAG_IDENTITY, id)) => EntryPayload::Normal(ShardCommand::Identity(
            String::from_utf8(id.to_vec()).map_err(|_| invalid(format!("identity entry {log_id:?} is not UTF-8")))?,
        )),
        Some((&TAG_MEMBERSHIP, bytes)) => EntryPayload::Membership(
            rmp_serde::from_slice(bytes).map_err(|e| invalid(format!("membership entry {log_id:?}: {e}")))?,
        ),
        _ => return Err(invalid(format!("entry {log_id:?} is not a consensus entry"))),
    };
    Ok(Entry {
        log_id: from_wal_id(log_id),
        payload,
    })
}

fn io_error(error: WalError) -> io::Error {
    match error {
        WalError::OutOfSpace(_) => io::Error::new(io::ErrorKind::StorageFull, error.to_string()),
        other => io::Error::other(other.to_string()),
    }
}

/// An append handed to the WAL, answered by the completion task in order.
struct Flush {
    seq: u64,
    durable: Vec<oneshot::Receiver<wal::Result<()>>>,
    callback: IOFlushed<TypeConfig>,
}

/// The newest entries of the log, contiguous and oldest first, with the append call that brought
/// each: every entry not yet durable, and before them the newest durable ones within
/// `TAIL_KEEP_*`.
/// Entries leave it from the front only once durable and indexed by the WAL (so anything older
/// than its front is in the WAL), and truncation and purging remove theirs here exactly as in
/// the WAL (before the WAL's marks are written), so it never serves an entry the log dropped.
#[derive(Default)]
struct Tail {
    entries: VecDeque<(u64, Entry)>,
    /// Every append call up to this one is durable (its entries are in the WAL's index).
    durable_seq: u64,
    /// Payload bytes of `entries` (approximate: what a command carries).
    bytes: usize,
}

fn entry_bytes(entry: &Entry) -> usize {
    match &entry.payload {
        EntryPayload::Normal(ShardCommand::App(command)) => command.len(),
        _ => 64,
    }
}

impl Tail {
    fn front_index(&self) -> Option<u64> {
        self.entries.front().map(|(_, entry)| entry.log_id.index)
    }

    fn push(&mut self, seq: u64, entry: Entry) {
        self.bytes += entry_bytes(&entry);
        self.entries.push_back((seq, entry));
    }

    fn retain(&mut self, keep: impl Fn(u64, &Entry) -> bool) {
        self.entries.retain(|(seq, entry)| keep(*seq, entry));
        self.bytes = self.entries.iter().map(|(_, entry)| entry_bytes(entry)).sum();
    }

    /// Notes that append call `seq` (and every one before it) is durable, and lets the oldest
    /// durable entries go while the tail is over its bounds.
    fn made_durable(&mut self, seq: u64) {
        self.durable_seq = self.durable_seq.max(seq);
        while (self.entries.len() > TAIL_KEEP_ENTRIES || self.bytes > TAIL_KEEP_BYTES)
            && self.entries.front().is_some_and(|(s, _)| *s <= self.durable_seq)
        {
            let (_, entry) = self.entries.pop_front().expect("checked");
            self.bytes -= entry_bytes(&entry);
        }
    }
}

struct Shared {
    wal: Arc<Wal>,
    shard: u16,
    tail: Mutex<Tail>,
    vote: Mutex<Option<Vote>>,
    /// Number of append calls made / made durable (a vote waits until they are equal).
    appended: Mutex<u64>,
    flushed: watch::Sender<u64>,
    /// The first durable entry this store could not read back (EIO, a record that fails its
    /// checksum, a missing segment): the instance stops on it, and its keeper decides whether
    /// the log is damaged here (see `refetch::begin_at_runtime`).
    damage: Mutex<Option<wal::RangeFailure>>,
}

/// The log of one shard's Raft group. Cheap to clone; openraft holds one and its readers others.
#[derive(Clone)]
pub struct ShardLogStore {
    shared: Arc<Shared>,
    flushes: mpsc::UnboundedSender<Flush>,
}

impl ShardLogStore {
    pub fn open(wal: Arc<Wal>, shard: u16) -> io::Result<ShardLogStore> {
        let vote = wal.read_vote(shard)?.map(|v| {
            let mut vote = Vote::new(v.term, v.voted_for);
            vote.committed = v.committed;
            vote
        });
        if let Some(reason) = wal.degraded(shard) {
            return Err(io::Error::other(format!(
                "the log of shard {shard} is damaged and cannot take part in consensus: {reason}"
            )));
        }
        let shared = Arc::new(Shared {
            wal,
            shard,
            tail: Mutex::new(Tail::default()),
            vote: Mutex::new(vote),
            appended: Mutex::new(0),
            flushed: watch::channel(0).0,
            damage: Mutex::new(None),
        });
        // Unbounded: openraft bounds the appends in flight itself (one per IO it waits for).
        let (flushes, queue) = mpsc::unbounded_channel();
        tokio::spawn(complete_flushes(shared.clone(), queue));
        Ok(ShardLogStore { shared, flushes })
    }
}

/// Waits for a store's appends to settle (see `ShardLogStore::settled`).
pub struct Settled(Arc<Shared>);

impl Settled {
    /// Resolves once every append made through the store so far was answered (durable or
    /// failed): nothing it queued can land in the WAL after that, so the log may be reopened.
    pub async fn wait(self) {
        let appended = *self.0.appended.lock().expect("appended lock");
        let mut flushed = self.0.flushed.subscribe();
        let _ = flushed.wait_for(|done| *done >= appended).await;
    }
}

impl Settled {
    /// The first entry the instance's log could not read back, if any (see `Shared::damage`).
    pub fn damage(&self) -> Option<wal::RangeFailure> {
        self.0.damage.lock().expect("damage lock").clone()
    }
}

impl ShardLogStore {
    pub fn settled(&self) -> Settled {
        Settled(self.shared.clone())
    }
}

/// Answers openraft's flush callbacks in append order, once the WAL says each append is durable.
async fn complete_flushes(shared: Arc<Shared>, mut queue: mpsc::UnboundedReceiver<Flush>) {
    while let Some(flush) = queue.recv().await {
        let mut outcome = Ok(());
        for durable in flush.durable {
            match durable.await {
                Ok(Ok(())) => {}
                Ok(Err(error)) => {
                    outcome = Err(io_error(error));
                    break;
                }
                Err(_) => {
                    outcome = Err(io_error(WalError::Closed));
                    break;
                }
            }
        }
        if outcome.is_ok() {
            // Durable and in the WAL's index now: readers find them there once the tail lets
            // them go.
            shared.tail.lock().expect("tail lock").made_durable(flush.seq);
        }
        shared.flushed.send_replace(flush.seq);
        flush.callback.io_completed(outcome);
    }
}

impl Shared {
    fn log_state(&self) -> LogState<TypeConfig> {
        let last_purged_log_id = self.wal.purged(self.shard).map(from_wal_id);
        let tail_last = self
            .tail
            .lock()
            .expect("tail lock")
            .entries
            .back()
            .map(|(_, entry)| entry.log_id);
        let last_log_id = tail_last
            .or_else(|| self.wal.last_log_id(self.shard).map(from_wal_id))
            .or(last_purged_log_id);
        LogState {
            last_purged_log_id,
            last_log_id,
        }
    }

    fn note_damage(&self, failure: &wal::RangeFailure) {
        let mut damage = self.damage.lock().expect("damage lock");
        if damage.as_ref().is_none_or(|known| failure.index < known.index) {
            tracing::error!(
                shard = self.shard,
                index = failure.index,
                segment = failure.segment_no,
                offset = failure.offset,
                error = %failure.error,
                "a durable entry of the shard's log cannot be read back"
            );
            *damage = Some(failure.clone());
        }
    }

    async fn read(&self, start: u64, end: u64) -> io::Result<Vec<Entry>> {
        if start >= end {
            return Ok(Vec::new());
        }
        // The tail first: anything older than its oldest entry is already indexed by the WAL
        // (an entry leaves the tail only after the WAL published it).
        let (tail_from, mut newer): (u64, Vec<Entry>) = {
            let tail = self.tail.lock().expect("tail lock");
            let from = tail.front_index().unwrap_or(u64::MAX);
            // Contiguous by index: the wanted ones are one run from `start - from`.
            let skip = start.saturating_sub(from).min(tail.entries.len() as u64) as usize;
            let entries = tail
                .entries
                .range(skip..)
                .map(|(_, entry)| entry)
                .take_while(|entry| entry.log_id.index < end)
                .filter(|entry| entry.log_id.index >= start)
                .cloned()
                .collect();
            (from, entries)
        };
        let durable_end = end.min(tail_from);
        let mut entries = Vec::new();
        let mut next = start;
        while next < durable_end {
            let wanted = (durable_end - next).min(READ_CHUNK_ENTRIES as u64) as usize;
            let (wal, shard) = (self.wal.clone(), self.shard);
            let range = wal::EntryRange {
                shard,
                from_index: next + 1,
                max_entries: wanted,
            };
            let read = tokio::task::spawn_blocking(move || wal.read_ranges_each(&[range]).pop())
                .await
                .map_err(io::Error::other)?
                .unwrap_or_default();
            if let Some(failure) = read.failure {
                self.note_damage(&failure);
                return Err(io_error(failure.error));
            }
            let chunk = read.entries;
            let Some(last) = chunk.last() else { break };
            next = last.0.index; // WAL index of the last = Raft index of the one after it
            for (log_id, body) in chunk {
                let entry = decode(log_id, &body)?;
                if entry.log_id.index < durable_end {
                    entries.push(entry);
                }
            }
        }
        entries.append(&mut newer);
        for pair in entries.windows(2) {
            if pair[1].log_id.index != pair[0].log_id.index + 1 {
                return Err(io::Error::other(format!(
                    "shard {} log has a hole between {} and {}",
                    self.shard, pair[0].log_id, pair[1].log_id
                )));
            }
        }
        Ok(entries)
    }
}

fn range_bounds(range: &impl RangeBounds<u64>) -> (u64, u64) {
    let start = match range.start_bound() {
        Bound::Included(&i) => i,
        Bound::Excluded(&i) => i.saturating_add(1),
        Bound::Unbounded => 0,
    };
    let end = match range.end_bound() {
        Bound::Included(&i) => i.saturating_add(1),
        Bound::Excluded(&i) => i,
        Bound::Unbounded => u64::MAX,
    };
    (start, end)
}

impl RaftLogReader<TypeConfig> for ShardLogStore {
    async fn try_get_log_entries<RB: RangeBounds<u64> + Clone + Debug + OptionalSend>(
        &mut self,
        range: RB,
    ) -> Result<Vec<Entry>, io::Error> {
        let (start, end) = range_bounds(&range);
        self.shared.read(start, end).await
    }

    async fn read_vote(&mut self) -> Result<Option<Vote>, io::Error> {
        Ok(*self.shared.vote.lock().expect("vote lock"))
    }
}

impl RaftLogStorage<TypeConfig> for ShardLogStore {
    type LogReader = ShardLogStore;

    async fn get_log_state(&mut self) -> Result<LogState<TypeConfig>, io::Error> {
        Ok(self.shared.log_state())
    }

    async fn get_log_reader(&mut self) -> Self::LogReader {
        self.clone()
    }

    async fn save_vote(&mut self, vote: &Vote) -> Result<(), io::Error> {
        // Serialized after every earlier append: wait until they are durable.
        let appended = *self.shared.appended.lock().expect("appended lock");
        let mut flushed = self.shared.flushed.subscribe();
        flushed
            .wait_for(|done| *done >= appended)
            .await
            .map_err(|_| io_error(WalError::Closed))?;
        let record = wal::Vote {
            term: vote.leader_id.term,
            voted_for: vote.leader_id.voted_for,
            committed: vote.committed,
        };
        let (wal, shard) = (self.shared.wal.clone(), self.shared.shard);
        tokio::task::spawn_blocking(move || wal.save_vote(shard, record))
            .await
            .map_err(io::Error::other)??;
        *self.shared.vote.lock().expect("vote lock") = Some(*vote);
        Ok(())
    }

    async fn append<I>(&mut self, entries: I, callback: IOFlushed<TypeConfig>) -> Result<(), io::Error>
    where
        I: IntoIterator<Item = Entry> + OptionalSend,
        I::IntoIter: OptionalSend,
    {
        let entries: Vec<Entry> = entries.into_iter().collect();
        let seq = {
            let mut appended = self.shared.appended.lock().expect("appended lock");
            *appended += 1;
            *appended
        };
        {
            let mut tail = self.shared.tail.lock().expect("tail lock");
            for entry in &entries {
                tail.push(seq, entry.clone());
            }
        }
        // One WAL request per entry (each fits the WAL on its own); the lane still writes all
        // that are queued in one batch and one fdatasync.
        let mut durable = Vec::with_capacity(entries.len());
        for entry in &entries {
            let body = encode(entry);
            match self
                .shared
                .wal
                .enqueue_append(self.shared.shard, vec![(to_wal_id(&entry.log_id), body)])
                .await
            {
                Ok(receiver) => durable.push(receiver),
                Err(error) => {
                    self.shared.tail.lock().expect("tail lock").retain(|s, _| s != seq);
                    // Still answered through the completion task, so the flush count moves on
                    // (a later vote does not wait for this append forever).
                    let (failed, receiver) = oneshot::channel();
                    let _ = failed.send(Err(error.clone()));
                    durable.push(receiver);
                    let _ = self.flushes.send(Flush { seq, durable, callback });
                    return Err(io_error(error));
                }
            }
        }
        self.flushes
            .send(Flush { seq, durable, callback })
            .map_err(|_| io_error(WalError::Closed))
    }

    async fn truncate_after(&mut self, last_log_id: Option<LogId>) -> Result<(), io::Error> {
        let keep_through = last_log_id.map(|id| id.index);
        self.shared
            .tail
            .lock()
            .expect("tail lock")
            .retain(|_, entry| keep_through.is_some_and(|k| entry.log_id.index <= k));
        let after = last_log_id.map_or(wal::LogId { term: 0, index: 0 }, |id| to_wal_id(&id));
        self.shared
            .wal
            .truncate_suffix(self.shared.shard, after)
            .await
            .map_err(io_error)
    }

    async fn purge(&mut self, log_id: LogId) -> Result<(), io::Error> {
        self.shared
            .tail
            .lock()
            .expect("tail lock")
            .retain(|_, entry| entry.log_id.index > log_id.index);
        self.shared
            .wal
            .purge_through(self.shared.shard, to_wal_id(&log_id))
            .await
            .map_err(io_error)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn entries_round_trip_through_the_wal_encoding() {
        let log_id = LogId {
            leader_id: CommittedLeaderId::new(7),
            index: 41,
        };
        let command = Entry {
            log_id,
            payload: EntryPayload::Normal(ShardCommand::App(b"batch".to_vec())),
        };
        let decoded = decode(to_wal_id(&log_id), &encode(&command)).expect("decode");
        assert_eq!(decoded.log_id, log_id);
        assert!(matches!(decoded.payload, EntryPayload::Normal(ShardCommand::App(ref b)) if b == b"batch"));
        let joined = Entry {
            log_id,
            payload: EntryPayload::Normal(ShardCommand::Joined(3)),
        };
        assert!(matches!(
            decode(to_wal_id(&log_id), &encode(&joined)).expect("decode").payload,
            EntryPayload::Normal(ShardCommand::Joined(3))
        ));
        let forgotten = Entry {
            log_id,
            payload: EntryPayload::Normal(ShardCommand::Forgotten(3)),
        };
        let forgotten_body = encode(&forgotten);
        assert!(matches!(
            decode(to_wal_id(&log_id), &forgotten_body).expect("decode").payload,
            EntryPayload::Normal(ShardCommand::Forgotten(3))
        ));
        assert_eq!(command_in_record(&forgotten_body), Ok(None));
        assert!(decode(to_wal_id(&log_id), &forgotten_body[..5]).is_err());
        assert_eq!(to_wal_id(&log_id), wal::LogId { term: 7, index: 42 });
        let blank = Entry {
            log_id,
            payload: EntryPayload::Blank,
        };
        assert!(matches!(
            decode(to_wal_id(&log_id), &encode(&blank)).expect("decode").payload,
            EntryPayload::Blank
        ));
        let error = decode(to_wal_id(&log_id), b"{\"ops\":[]}").expect_err("a single-node entry");
        assert_eq!(error.kind(), io::ErrorKind::InvalidData);
        let single_node = crate::shard::ops::encode_entry(&[]);
        let error = decode(to_wal_id(&log_id), &single_node).expect_err("a single-node entry, format 2");
        assert_eq!(error.kind(), io::ErrorKind::InvalidData);
        assert!(command_in_record(&single_node).is_err());
    }

    fn entry(term: u64, index: u64) -> Entry {
        Entry {
            log_id: raft_id(term, index),
            payload: EntryPayload::Normal(ShardCommand::App(format!("{term}/{index}").into_bytes())),
        }
    }

    fn raft_id(term: u64, index: u64) -> LogId {
        LogId {
            leader_id: CommittedLeaderId::new(term),
            index,
        }
    }

    /// `(term, index)` of what the store returns for `range`, checking each payload matches.
    async fn read(store: &mut ShardLogStore, range: std::ops::Range<u64>) -> Vec<(u64, u64)> {
        store
            .try_get_log_entries(range)
            .await
            .expect("read")
            .into_iter()
            .map(|entry| {
                let (term, index) = (entry.log_id.leader_id.term, entry.log_id.index);
                assert!(
                    matches!(&entry.payload, EntryPayload::Normal(ShardCommand::App(b)) if *b == format!("{term}/{index}").into_bytes()),
                    "payload of {term}/{index}"
                );
                (term, index)
            })
            .collect()
    }

    fn ids(term: u64, range: std::ops::Range<u64>) -> Vec<(u64, u64)> {
        range.map(|index| (term, index)).collect()
    }

    async fn append(
        store: &mut ShardLogStore,
        entries: Vec<Entry>,
    ) -> openraft::type_config::alias::OneshotReceiverOf<TypeConfig, Result<(), io::Error>> {
        use openraft::type_config::TypeConfigExt;
        let (flushed, receiver) = TypeConfig::oneshot();
        store.append(entries, IOFlushed::signal(flushed)).await.expect("append");
        receiver
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn the_tail_serves_recent_entries_and_never_one_the_log_dropped() {
        let dir = tempfile::tempdir().unwrap();
        let options = wal::WalOptions {
            lanes: 1,
            shard_count: 1,
            segment_bytes: 4 << 20,
            max_batch_bytes: 256 * 1024,
            queue_depth: 64,
        };
        let (wal, _) = Wal::open(dir.path(), options).unwrap();
        let mut store = ShardLogStore::open(Arc::new(wal), 0).unwrap();
        for first in (0..400).step_by(10) {
            let flushed = append(&mut store, (first..first + 10).map(|i| entry(1, i)).collect()).await;
            flushed.await.unwrap().unwrap();
        }
        {
            let tail = store.shared.tail.lock().unwrap();
            assert!(
                tail.entries.len() <= TAIL_KEEP_ENTRIES,
                "bounded: {}",
                tail.entries.len()
            );
            assert_eq!(tail.front_index(), Some(400 - TAIL_KEEP_ENTRIES as u64));
        }
        // Across the WAL and the tail, and within each.
        assert_eq!(read(&mut store, 0..400).await, ids(1, 0..400));
        assert_eq!(read(&mut store, 100..140).await, ids(1, 100..140));
        assert_eq!(read(&mut store, 390..1000).await, ids(1, 390..400));

        // A truncation inside the tail, then a new term's entries read before they are durable.
        store.truncate_after(Some(raft_id(1, 349))).await.unwrap();
        assert_eq!(read(&mut store, 340..400).await, ids(1, 340..350));
        let flushed = append(&mut store, (350..355).map(|i| entry(2, i)).collect()).await;
        let mut expected = ids(1, 345..350);
        expected.extend(ids(2, 350..355));
        assert_eq!(read(&mut store, 345..400).await, expected);
        flushed.await.unwrap().unwrap();
        assert_eq!(read(&mut store, 345..400).await, expected);

        // A truncation below the tail's oldest entry empties it; the WAL answers the rest.
        store.truncate_after(Some(raft_id(1, 99))).await.unwrap();
        assert!(store.shared.tail.lock().unwrap().entries.is_empty());
        assert_eq!(read(&mut store, 90..400).await, ids(1, 90..100));
        let state = store.get_log_state().await.unwrap();
        assert_eq!(state.last_log_id, Some(raft_id(1, 99)));
        let flushed = append(&mut store, (100..110).map(|i| entry(3, i)).collect()).await;
        flushed.await.unwrap().unwrap();
        let mut expected = ids(1, 95..100);
        expected.extend(ids(3, 100..110));
        assert_eq!(read(&mut store, 95..200).await, expected);

        // Purging drops from the tail as from the WAL, past the end too (a snapshot installed).
        store.purge(raft_id(3, 104)).await.unwrap();
        assert_eq!(read(&mut store, 0..200).await, ids(3, 105..110));
        store.purge(raft_id(4, 150)).await.unwrap();
        assert_eq!(read(&mut store, 0..200).await, Vec::<(u64, u64)>::new());
        let state = store.get_log_state().await.unwrap();
        assert_eq!(state.last_log_id, Some(raft_id(4, 150)));
        assert_eq!(state.last_purged_log_id, Some(raft_id(4, 150)));
        let flushed = append(&mut store, (151..153).map(|i| entry(4, i)).collect()).await;
        assert_eq!(read(&mut store, 0..200).await, ids(4, 151..153));
        flushed.await.unwrap().unwrap();
    }
}
