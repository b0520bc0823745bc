//! One session's in-memory state, a pure fold over its log operations, plus the hot tail.

use std::collections::{HashMap, VecDeque};
use std::sync::Arc;
use std::time::Instant;

use crate::model::{
    DispatchProgress, LastActivity, MessageRecord, ReadCursor, SessionRecord, SessionStatus, SessionView, Timestamp,
};

/// Messages kept in memory per active session.
pub const HOT_TAIL_LEN: usize = 128;
/// Bytes of message content and metadata the hot tail keeps at most (older messages are read
/// from the WAL or the archive); the newest message always stays.
pub const HOT_TAIL_MAX_BYTES: usize = 1024 * 1024;
/// Client ids remembered per session before archived ones may be forgotten; a session loaded
/// from the archive starts with its newest ones (up to this many), so a retry among them is
/// recognised without the archive (during an archive outage too). Each takes about its length
/// plus 100 bytes: at most ~230 KiB per session with 128-character ids, ~130 KiB with UUIDs.
pub const CLIENT_ID_WINDOW: usize = 1024;
/// How many of its newest messages a session load looks through for client ids (bounds the
/// archive query when few messages carry one).
pub const CLIENT_ID_SCAN: u64 = 16 * CLIENT_ID_WINDOW as u64;

/// Where a message that is not archived yet sits in the WAL.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct WalPosition {
    pub seq: u64,
    pub log_index: u64,
    pub op_position: u32,
}

#[derive(Debug, Clone, Copy)]
pub struct ClientIdEntry {
    pub seq: u64,
    pub fingerprint: u64,
    pub log_index: u64,
}

pub struct SessionState {
    pub record: SessionRecord,
    pub status: SessionStatus,
    pub last_seq: u64,
    pub nonuser_count: u64,
    pub read_cursor: ReadCursor,
    pub last_activity: LastActivity,
    pub updated_at: Timestamp,
    pub dispatch: DispatchProgress,
    /// The newest messages, ascending by seq, contiguous, ending at `last_seq`.
    pub hot_tail: VecDeque<Arc<MessageRecord>>,
    /// Content and metadata bytes of `hot_tail`.
    pub hot_tail_bytes: usize,
    /// Messages in the WAL but not yet in the archive, ascending.
    pub unarchived: VecDeque<WalPosition>,
    /// Highest seq known to be in the archive.
    pub archived_seq: u64,
    /// Seq ranges (inclusive, ascending) that hold no message: skipped after an operator
    /// accepted the loss of damaged log entries. Never handed out, never read.
    pub gaps: Vec<(u64, u64)>,
    /// Highest log index that touched this session; it may be evicted once that is archived.
    pub last_log_index: u64,
    /// Client ids of recent and unarchived messages (the key shared with `client_id_order`).
    pub client_ids: HashMap<Arc<str>, ClientIdEntry>,
    /// `client_ids`' keys ascending by seq: the oldest archived ones are forgotten first.
    pub client_id_order: VecDeque<(u64, Arc<str>)>,
    /// Every message with `seq >= client_ids_complete_from` has its client id (if any) in
    /// `client_ids`; older ones must be looked up in the archive.
    pub client_ids_complete_from: u64,
    pub last_used: Instant,
}

impl SessionState {
    pub fn new(record: SessionRecord, now: Instant) -> SessionState {
        let created_at = record.inserted_at;
        SessionState {
            record,
            status: SessionStatus::Active,
            last_seq: 0,
            nonuser_count: 0,
            read_cursor: ReadCursor::default(),
            last_activity: LastActivity {
                at: created_at,
                sender_id: None,
                preview: None,
            },
            updated_at: created_at,
            dispatch: DispatchProgress::default(),
            hot_tail: VecDeque::new(),
            hot_tail_bytes: 0,
            unarchived: VecDeque::new(),
            archived_seq: 0,
            gaps: Vec::new(),
            last_log_index: 0,
            client_ids: HashMap::new(),
            client_id_order: VecDeque::new(),
            client_ids_complete_from: 1,
            last_used: now,
        }
    }

    pub fn view(&self) -> SessionView {
        SessionView {
            record: self.record.clone(),
            status: self.status,
            last_seq: self.last_seq,
            nonuser_count: self.nonuser_count,
            read_cursor: self.read_cursor,
            last_activity: self.last_activity(),
            updated_at: self.updated_at,
            dispatch: self.dispatch,
        }
    }

    /// The newest message's activity (its preview is parsed here, on demand, not on every append),
    /// or what the archive said for a session whose messages are not in memory.
    fn last_activity(&self) -> LastActivity {
        match self.hot_tail.back() {
            Some(record) => LastActivity {
                at: record.message.inserted_at,
                sender_id: Some(record.message.sender_id.clone()),
                preview: crate::model::message_preview(&record.message.content),
            },
            None => self.last_activity.clone(),
        }
    }

    /// Applies an appended message. `position` is where it sits in the WAL, `None` when it was
    /// loaded from the archive.
    pub fn apply_message(&mut self, record: Arc<MessageRecord>, position: Option<WalPosition>) {
        let message = &record.message;
        debug_assert_eq!(message.seq, self.last_seq + 1, "seqs are contiguous");
        self.last_seq = message.seq;
        self.nonuser_count = record.nonuser_through;
        self.updated_at = message.inserted_at;
        if message.sender_id == self.record.user_id {
            self.dispatch.last_user_seq = message.seq;
        }
        if let Some(client_id) = &record.client_id {
            let log_index = position.map_or(0, |p| p.log_index);
            self.remember_client_id(client_id, message.seq, record.fingerprint, log_index);
        }
        match position {
            Some(position) => {
                self.unarchived.push_back(position);
                self.last_log_index = self.last_log_index.max(position.log_index);
            }
            None => self.archived_seq = message.seq,
        }
        self.hot_tail_bytes += message_bytes(&record);
        self.hot_tail.push_back(record);
        while self.hot_tail.len() > HOT_TAIL_LEN
            || (self.hot_tail_bytes > HOT_TAIL_MAX_BYTES && self.hot_tail.len() > 1)
        {
            let Some(oldest) = self.hot_tail.pop_front() else { break };
            self.hot_tail_bytes -= message_bytes(&oldest);
        }
    }

    /// Remembers the client id of the message at `seq` (newer than every one remembered).
    pub fn remember_client_id(&mut self, client_id: &str, seq: u64, fingerprint: u64, log_index: u64) {
        let client_id: Arc<str> = Arc::from(client_id);
        let entry = ClientIdEntry {
            seq,
            fingerprint,
            log_index,
        };
        self.client_ids.insert(client_id.clone(), entry);
        self.client_id_order.push_back((seq, client_id));
    }

    /// Makes `last_seq + 1 ..= through` a gap (no message ever has those seqs).
    pub fn skip_seqs(&mut self, through: u64, at: Timestamp) {
        if through <= self.last_seq {
            return;
        }
        self.gaps.push((self.last_seq + 1, through));
        self.last_seq = through;
        // The hot tail stays contiguous: it starts again after the gap.
        self.hot_tail.clear();
        self.hot_tail_bytes = 0;
        self.updated_at = self.updated_at.max(at);
    }

    /// The gap holding `seq`, if any.
    pub fn gap_containing(&self, seq: u64) -> Option<(u64, u64)> {
        self.gaps
            .iter()
            .copied()
            .find(|(from, through)| (*from..=*through).contains(&seq))
    }

    /// Everything up to `log_index` is in the archive now.
    pub fn mark_archived_through(&mut self, log_index: u64) {
        while let Some(front) = self.unarchived.front() {
            if front.log_index > log_index {
                break;
            }
            self.archived_seq = self.archived_seq.max(front.seq);
            self.unarchived.pop_front();
        }
        while self.client_ids.len() > CLIENT_ID_WINDOW {
            let Some((seq, client_id)) = self.client_id_order.front().cloned() else {
                break;
            };
            let archived = self
                .client_ids
                .get(&client_id)
                .is_none_or(|entry| entry.log_index <= log_index);
            if !archived {
                break;
            }
            self.client_id_order.pop_front();
            if self.client_ids.get(&client_id).is_some_and(|entry| entry.seq == seq) {
                self.client_ids.remove(&client_id);
            }
            self.client_ids_complete_from = seq + 1;
        }
    }

    /// First seq served from memory.
    pub fn hot_tail_start(&self) -> u64 {
        self.hot_tail.front().map_or(self.last_seq + 1, |m| m.message.seq)
    }

    pub fn hot_message(&self, seq: u64) -> Option<&Arc<MessageRecord>> {
        let start = self.hot_tail_start();
        if seq < start {
            return None;
        }
        self.hot_tail.get((seq - start) as usize)
    }

    pub fn wal_position(&self, seq: u64) -> Option<WalPosition> {
        // Ascending by seq, but not contiguous across a gap.
        let at = self.unarchived.binary_search_by_key(&seq, |p| p.seq).ok()?;
        self.unarchived.get(at).copied()
    }
}

fn message_bytes(record: &MessageRecord) -> usize {
    record.message.content.get().len() + record.message.metadata.get().len()
}
