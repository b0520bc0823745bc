//! What a shard's log entries carry: a versioned batch of operations (format 2, binary:
//! `binary.rs`; format 1, JSON, is still read).
//!
//! One log entry holds every operation of one shard writer batch, so one WAL record (and one
//! fsync share) covers many appends.

use serde::{Deserialize, Serialize};

use crate::model::{MessageRecord, ReadCursor, SessionRecord, SessionView, Timestamp};

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Op {
    SessionCreated(SessionRecord),
    MessageAppended(MessageRecord),
    SessionArchived {
        session_id: String,
        at: Timestamp,
    },
    ReadCursorMoved {
        session_id: String,
        cursor: ReadCursor,
        at: Timestamp,
    },
    /// A dispatch of the agent is about to call it for the turn answering the user's messages up
    /// to `through_seq`, given the history up to `history_seq`; written before the first call.
    /// Every attempt and every later leader resumes the turn with `turn_id` until its
    /// `DispatchFinished`. (Absent from logs written before it existed.)
    DispatchStarted {
        session_id: String,
        turn_id: crate::ids::TurnId,
        through_seq: u64,
        history_seq: u64,
        at: Timestamp,
    },
    /// A dispatch of the agent ended: the user's messages up to `through_seq` are answered (or
    /// given up on, with `error`, or cancelled by the session's user: `cancelled`).
    DispatchFinished {
        session_id: String,
        dispatch_id: String,
        through_seq: u64,
        error: Option<String>,
        at: Timestamp,
        /// Absent (false) in entries written before cancellation existed.
        #[serde(default, skip_serializing_if = "std::ops::Not::not")]
        cancelled: bool,
    },
    /// Seqs `from_seq..=through_seq` hold no message and are never handed out: they may have
    /// been acknowledged in log entries an operator accepted losing (`fleetlm wal repair`).
    SeqsSkipped {
        session_id: String,
        from_seq: u64,
        through_seq: u64,
        at: Timestamp,
    },
    /// Cluster: the leader installed this session from the archive (its summary as loaded), so
    /// every replica holds it too and a new leader can write to it without the archive. Carries
    /// no messages and no client ids: a replica's copy starts with an empty hot tail (its reads
    /// go to the archive) and looks older client ids up in the archive.
    SessionLoaded {
        view: SessionView,
        #[serde(default, skip_serializing_if = "Vec::is_empty")]
        gaps: Vec<(u64, u64)>,
    },
    /// Cluster: the leader forgot this session (idle, every record archived); every replica
    /// forgets it too, so replicas hold exactly the sessions the leader holds.
    SessionEvicted {
        session_id: String,
    },
}

impl Op {
    pub fn session_id(&self) -> &str {
        match self {
            Op::SessionCreated(session) => &session.id,
            Op::SessionLoaded { view, .. } => &view.record.id,
            Op::MessageAppended(record) => &record.message.session_id,
            Op::SessionArchived { session_id, .. }
            | Op::ReadCursorMoved { session_id, .. }
            | Op::DispatchStarted { session_id, .. }
            | Op::DispatchFinished { session_id, .. }
            | Op::SeqsSkipped { session_id, .. }
            | Op::SessionEvicted { session_id } => session_id,
        }
    }
}

mod binary;

/// The fewest bytes a `message_appended` operation takes in an entry of either format, so
/// `bytes / this` bounds how many messages lost entries could have held. Format 2's smallest:
/// every text empty, one-byte JSON values, numbers of one byte, the 8-byte fingerprint (22 bytes;
/// `the_smallest_message_takes_at_least_the_bound`); format 1's field names alone take more.
pub const MIN_MESSAGE_OP_BYTES: u64 = 22;

/// Builds one entry's bytes (format 2) an operation at a time, so a batch knows its exact encoded size
/// before it is sealed (the WAL refuses an entry over its limit; the writer never makes one).
/// Produces exactly what `encode_entry` produces for the same operations.
pub struct EntryEncoder {
    bytes: Vec<u8>,
    ops: usize,
}

impl Default for EntryEncoder {
    fn default() -> Self {
        EntryEncoder {
            bytes: vec![binary::ENTRY_MARKER],
            ops: 0,
        }
    }
}

impl EntryEncoder {
    /// Bytes of the entry if it were finished now (its end byte included).
    pub fn len(&self) -> usize {
        self.bytes.len() + 1
    }

    pub fn is_empty(&self) -> bool {
        self.ops == 0
    }

    pub fn push(&mut self, op: &Op) {
        let _ = self.try_push(op, usize::MAX);
    }

    /// Adds `op` unless it would add more than `max_op_bytes`; then the entry is left as it was
    /// and the bytes it would have added are returned.
    pub fn try_push(&mut self, op: &Op, max_op_bytes: usize) -> Result<(), usize> {
        let before = self.bytes.len();
        binary::write_op(&mut self.bytes, op);
        let added = self.bytes.len() - before;
        if added > max_op_bytes {
            self.bytes.truncate(before);
            return Err(added);
        }
        self.ops += 1;
        Ok(())
    }

    /// The finished entry; the encoder starts over empty, with room for an entry as large (so a
    /// steady load grows no buffer).
    pub fn finish(&mut self) -> Vec<u8> {
        let mut next = Vec::with_capacity(self.bytes.len() + 1);
        next.push(binary::ENTRY_MARKER);
        self.ops = 0;
        let mut entry = std::mem::replace(&mut self.bytes, next);
        entry.push(binary::ENTRY_END);
        entry
    }

    pub fn clear(&mut self) {
        self.bytes.truncate(1);
        self.ops = 0;
    }
}

pub fn encode_entry(ops: &[Op]) -> Vec<u8> {
    let mut encoder = EntryEncoder::default();
    for op in ops {
        encoder.push(op);
    }
    encoder.finish()
}

#[derive(Debug, thiserror::Error)]
pub enum DecodeError {
    #[error("log entry format version {0} is not supported")]
    Version(u8),
    #[error("log entry is not valid: {0}")]
    Json(#[from] serde_json::Error),
    #[error("log entry is not valid: {0}")]
    Binary(String),
    #[error("log entry is not in a known format (first byte {0:#04x})")]
    Format(u8),
    #[error("log entry is empty")]
    Empty,
}

pub fn decode_entry(bytes: &[u8]) -> Result<Vec<Op>, DecodeError> {
    match bytes.split_first() {
        Some((&binary::ENTRY_MARKER, rest)) => match rest.split_last() {
            Some((&binary::ENTRY_END, body)) => binary::read_ops(body).map_err(DecodeError::Binary),
            _ => Err(DecodeError::Binary("the entry does not end with its end byte".into())),
        },
        Some((b'{', _)) => decode_json_entry(bytes),
        Some((&other, _)) => Err(DecodeError::Format(other)),
        None => Err(DecodeError::Empty),
    }
}

/// Format 1: `{"v":1,"ops":[…]}`, the operations as JSON.
fn decode_json_entry(bytes: &[u8]) -> Result<Vec<Op>, DecodeError> {
    #[derive(Deserialize)]
    struct JsonEntry {
        v: u8,
        ops: Vec<Op>,
    }
    let entry: JsonEntry = serde_json::from_slice(bytes)?;
    if entry.v != 1 {
        return Err(DecodeError::Version(entry.v));
    }
    Ok(entry.ops)
}

#[cfg(test)]
mod tests;
