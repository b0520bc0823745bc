//! What a shard's log entries carry: a versioned batch of operations, JSON-encoded.
//!
//! One log entry holds every operation of one shard writer batch, so one WAL record (and one
//! fsync share) covers many appends.

use serde::{Deserialize, Serialize};

use crate::model::{MessageRecord, ReadCursor, SessionRecord, SessionView, Timestamp};

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

#[derive(Serialize, Deserialize)]
struct EntryBody<T> {
    v: u8,
    ops: T,
}

/// Builds one entry's bytes an operation at a time, so a batch knows its exact encoded size
/// before it is sealed (the WAL refuses an entry over its limit; the writer never makes one).
/// Produces exactly what `encode_entry` produces for the same operations.
pub struct EntryEncoder {
    bytes: Vec<u8>,
    ops: usize,
}

const ENTRY_PREFIX: &[u8] = b"{\"v\":1,\"ops\":[";
const ENTRY_SUFFIX: &[u8] = b"]}";

impl Default for EntryEncoder {
    fn default() -> Self {
        EntryEncoder {
            bytes: ENTRY_PREFIX.to_vec(),
            ops: 0,
        }
    }
}

impl EntryEncoder {
    /// Bytes of the entry if it were finished now.
    pub fn len(&self) -> usize {
        self.bytes.len() + ENTRY_SUFFIX.len()
    }

    pub fn is_empty(&self) -> bool {
        self.ops == 0
    }

    /// Bytes `op` adds to the entry (its JSON and a separator).
    pub fn encoded_len(op: &Op) -> usize {
        let mut counter = ByteCounter(0);
        serde_json::to_writer(&mut counter, op).expect("ops always serialize");
        counter.0 + 1
    }

    pub fn push(&mut self, op: &Op) {
        let _ = self.try_push(op, usize::MAX);
    }

    /// Adds `op` unless it would add more than `max_op_bytes`; then the entry is left as it was
    /// and the bytes it would have added are returned.
    pub fn try_push(&mut self, op: &Op, max_op_bytes: usize) -> Result<(), usize> {
        let before = self.bytes.len();
        if self.ops > 0 {
            self.bytes.push(b',');
        }
        serde_json::to_writer(&mut self.bytes, op).expect("ops always serialize");
        let added = self.bytes.len() - before;
        if added > max_op_bytes {
            self.bytes.truncate(before);
            return Err(added);
        }
        self.ops += 1;
        Ok(())
    }

    /// The finished entry; the encoder starts over empty.
    pub fn finish(&mut self) -> Vec<u8> {
        let mut bytes = std::mem::replace(&mut self.bytes, ENTRY_PREFIX.to_vec());
        bytes.extend_from_slice(ENTRY_SUFFIX);
        self.ops = 0;
        bytes
    }

    pub fn clear(&mut self) {
        self.bytes.truncate(ENTRY_PREFIX.len());
        self.ops = 0;
    }
}

struct ByteCounter(usize);

impl std::io::Write for ByteCounter {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0 += buf.len();
        Ok(buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_incremental_encoder_matches_the_batch_encoding_byte_for_byte() {
        let ops = vec![
            Op::DispatchStarted {
                session_id: "s".into(),
                turn_id: crate::ids::TurnId::derive("s", 1, 3),
                through_seq: 3,
                history_seq: 4,
                at: Timestamp(1),
            },
            Op::SessionArchived {
                session_id: "s\u{1}\"x".into(),
                at: Timestamp(1),
            },
            Op::DispatchFinished {
                session_id: "s".into(),
                dispatch_id: "d".into(),
                through_seq: 3,
                error: Some("boom".into()),
                at: Timestamp(2),
                cancelled: true,
            },
        ];
        let mut encoder = EntryEncoder::default();
        let mut predicted = encoder.len();
        for op in &ops {
            predicted += EntryEncoder::encoded_len(op) - usize::from(encoder.is_empty());
            encoder.push(op);
            assert_eq!(encoder.len(), predicted);
        }
        let bytes = encoder.finish();
        assert_eq!(bytes, encode_entry(&ops));
        assert_eq!(bytes.len(), predicted);
        assert_eq!(decode_entry(&bytes).unwrap().len(), 3);
        assert_eq!(encoder.finish(), encode_entry(&[]));
    }
}
