//! openraft's log storage on our WAL: one shard's logical log is one Raft group's log.
//!
//! Raft index `i` is WAL index `i + 1` (the WAL counts from 1 and uses 0 for "nothing"; Raft's
//! first entry, the initial membership, has index 0). Terms are the WAL's terms. A record's body
//! is a one-byte payload tag followed by the payload: blank, an application command's bytes, a
//! membership (MessagePack), or a joined or forgotten member's id (8 bytes, big-endian).
//!
//! The storage contract openraft states, and how it is kept here:
//! - entries are readable as soon as `append` returns (before they are durable): they wait in
//!   `pending` until the WAL has made them durable and indexed them;
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

/// Largest number of entries one WAL read returns; readers loop for more.
const READ_CHUNK_ENTRIES: usize = 1024;

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
/// entries (blank, membership, joined or forgotten member), which the application skips.
pub fn command_in_record(body: &[u8]) -> Result<Option<&[u8]>, String> {
    match body.split_first() {
        Some((&TAG_COMMAND, command)) => Ok(Some(command)),
        Some((&TAG_BLANK | &TAG_MEMBERSHIP | &TAG_JOINED | &TAG_FORGOTTEN, _)) => Ok(None),
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

struct Shared {
    wal: Arc<Wal>,
    shard: u16,
    /// Entries appended but not yet durable, with the append call that brought them.
    pending: Mutex<VecDeque<(u64, Entry)>>,
    vote: Mutex<Option<Vote>>,
    /// Number of append calls made / made durable (a vote waits until they are equal).
    appended: Mutex<u64>,
    flushed: watch::Sender<u64>,
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
            pending: Mutex::new(VecDeque::new()),
            vote: Mutex::new(vote),
            appended: Mutex::new(0),
            flushed: watch::channel(0).0,
        });
        // Unbounded: openraft bounds the appends in flight itself (one per IO it waits for).
        let (flushes, queue) = mpsc::unbounded_channel();
        tokio::spawn(complete_flushes(shared.clone(), queue));
        Ok(ShardLogStore { shared, flushes })
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
            // Durable and in the WAL's index now: readers find them there.
            let mut pending = shared.pending.lock().expect("pending lock");
            while pending.front().is_some_and(|(seq, _)| *seq <= flush.seq) {
                pending.pop_front();
            }
        }
        shared.flushed.send_replace(flush.seq);
        flush.callback.io_completed(outcome);
    }
}

impl Shared {
    fn log_state(&self) -> LogState<TypeConfig> {
        let last_purged_log_id = self.wal.purged(self.shard).map(from_wal_id);
        let pending_last = self
            .pending
            .lock()
            .expect("pending lock")
            .back()
            .map(|(_, entry)| entry.log_id);
        let last_log_id = pending_last
            .or_else(|| self.wal.last_log_id(self.shard).map(from_wal_id))
            .or(last_purged_log_id);
        LogState {
            last_purged_log_id,
            last_log_id,
        }
    }

    async fn read(&self, start: u64, end: u64) -> io::Result<Vec<Entry>> {
        if start >= end {
            return Ok(Vec::new());
        }
        // Pending entries first: anything older than the oldest of them is already indexed by
        // the WAL (an entry leaves `pending` only after the WAL published it).
        let (pending_from, mut newer): (u64, Vec<Entry>) = {
            let pending = self.pending.lock().expect("pending lock");
            let from = pending.front().map_or(u64::MAX, |(_, entry)| entry.log_id.index);
            let entries = pending
                .iter()
                .map(|(_, entry)| entry)
                .filter(|entry| entry.log_id.index >= start && entry.log_id.index < end)
                .cloned()
                .collect();
            (from, entries)
        };
        let durable_end = end.min(pending_from);
        let mut entries = Vec::new();
        let mut next = start;
        while next < durable_end {
            let wanted = (durable_end - next).min(READ_CHUNK_ENTRIES as u64) as usize;
            let (wal, shard) = (self.wal.clone(), self.shard);
            let chunk = tokio::task::spawn_blocking(move || wal.read_entries(shard, next + 1, wanted))
                .await
                .map_err(io::Error::other)?
                .map_err(io_error)?;
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
        self.shared
            .pending
            .lock()
            .expect("pending lock")
            .extend(entries.iter().map(|entry| (seq, entry.clone())));
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
                    self.shared
                        .pending
                        .lock()
                        .expect("pending lock")
                        .retain(|(s, _)| *s != seq);
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
            .pending
            .lock()
            .expect("pending lock")
            .retain(|(_, entry)| keep_through.is_some_and(|k| entry.log_id.index <= k));
        let after = last_log_id.map_or(wal::LogId { term: 0, index: 0 }, |id| to_wal_id(&id));
        self.shared
            .wal
            .truncate_suffix(self.shared.shard, after)
            .await
            .map_err(io_error)
    }

    async fn purge(&mut self, log_id: LogId) -> Result<(), io::Error> {
        self.shared
            .pending
            .lock()
            .expect("pending lock")
            .retain(|(_, entry)| entry.log_id.index > log_id.index);
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
    }
}
