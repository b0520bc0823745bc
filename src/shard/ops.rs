//! What a shard's log entries carry: a versioned batch of operations, JSON-encoded.
//!
//! One log entry holds every operation of one shard writer batch, so one WAL record (and one
//! fsync share) covers many appends.

use serde::{Deserialize, Serialize};

use crate::model::{MessageRecord, ReadCursor, SessionRecord, Timestamp};

pub const ENTRY_FORMAT_VERSION: u8 = 1;

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
    /// A dispatch of the agent ended: the user's messages up to `through_seq` are answered (or
    /// given up on, with `error`).
    DispatchFinished {
        session_id: String,
        dispatch_id: String,
        through_seq: u64,
        error: Option<String>,
        at: Timestamp,
    },
}

impl Op {
    pub fn session_id(&self) -> &str {
        match self {
            Op::SessionCreated(session) => &session.id,
            Op::MessageAppended(record) => &record.message.session_id,
            Op::SessionArchived { session_id, .. }
            | Op::ReadCursorMoved { session_id, .. }
            | Op::DispatchFinished { session_id, .. } => session_id,
        }
    }
}

#[derive(Serialize, Deserialize)]
struct EntryBody<T> {
    v: u8,
    ops: T,
}

pub fn encode_entry(ops: &[Op]) -> Vec<u8> {
    serde_json::to_vec(&EntryBody {
        v: ENTRY_FORMAT_VERSION,
        ops,
    })
    .expect("ops always serialize")
}

#[derive(Debug, thiserror::Error)]
pub enum DecodeError {
    #[error("log entry format version {0} is not supported")]
    Version(u8),
    #[error("log entry is not valid: {0}")]
    Json(#[from] serde_json::Error),
}

pub fn decode_entry(bytes: &[u8]) -> Result<Vec<Op>, DecodeError> {
    let body: EntryBody<Vec<Op>> = serde_json::from_slice(bytes)?;
    if body.v != ENTRY_FORMAT_VERSION {
        return Err(DecodeError::Version(body.v));
    }
    Ok(body.ops)
}
