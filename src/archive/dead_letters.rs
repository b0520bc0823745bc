//! Dead letters: rows of a flush that the archive refused, set aside with the archive's own
//! error so one bad row never blocks a shard (let alone the node).
//!
//! When a flush transaction is refused, the flusher writes the same rows again one at a time
//! (each under a savepoint) and the rows the archive still refuses go to the `dead_letters`
//! table, in the same transaction as the rest and the watermarks. A refused message is still an
//! acknowledged message: reads and `client_id` lookups fall back to its dead letter, so it is
//! served as before, just not from the `messages` table.

use std::sync::Arc;

use serde::Serialize;
use serde_json::json;

use super::rows::FlushRows;
use crate::model::{MessageRecord, Timestamp};

/// One refused row.
#[derive(Debug, Clone, Serialize)]
pub struct DeadLetter {
    /// UUIDv7 as 32 hex digits: orders dead letters by when they were set aside.
    pub id: String,
    /// `session`, `message`, `session_update` or `read_cursor`.
    pub kind: String,
    pub session_id: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub seq: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub client_id: Option<String>,
    /// The archive's error, as it gave it.
    pub error: String,
    /// The refused row as JSON (for a message: the message record, as reads serve it).
    pub payload: String,
    pub inserted_at: Timestamp,
}

impl DeadLetter {
    /// The message a `message` dead letter holds.
    pub fn message(&self) -> Option<MessageRecord> {
        (self.kind == "message")
            .then(|| serde_json::from_str(&self.payload).ok())
            .flatten()
    }
}

/// One row of a flush, alone, with how to describe it if the archive refuses it.
pub struct Unit {
    pub rows: Arc<FlushRows>,
    /// What to write instead if `rows` is refused: a session's counters without its text
    /// fields, so its `last_seq` (which recovery relies on) is never held back by a preview.
    pub fallback: Option<Arc<FlushRows>>,
    kind: &'static str,
    session_id: String,
    seq: Option<u64>,
    client_id: Option<String>,
    payload: String,
}

impl Unit {
    pub fn dead_letter(&self, error: String, at: Timestamp) -> DeadLetter {
        DeadLetter {
            // Hex of a UUIDv7: text order is time order, so listings page chronologically.
            id: uuid::Uuid::now_v7().simple().to_string(),
            kind: self.kind.to_string(),
            // The id column holds text the archive accepts; the exact id is in the payload.
            session_id: self.session_id.replace('\0', "\u{fffd}"),
            seq: self.seq,
            client_id: self.client_id.as_ref().map(|c| c.replace('\0', "\u{fffd}")),
            error: error.replace('\0', "\u{fffd}"),
            payload: self.payload.clone(),
            inserted_at: at,
        }
    }
}

/// Splits a flush into its rows, in the order a flush writes them.
pub fn units(rows: &FlushRows) -> Vec<Unit> {
    let mut units = Vec::new();
    for session in &rows.new_sessions {
        units.push(Unit {
            rows: Arc::new(FlushRows {
                new_sessions: vec![session.clone()],
                ..FlushRows::default()
            }),
            fallback: None,
            kind: "session",
            session_id: session.id.to_string(),
            seq: None,
            client_id: None,
            payload: serde_json::to_string(session).expect("sessions serialize"),
        });
    }
    for message in &rows.messages {
        units.push(Unit {
            rows: Arc::new(FlushRows {
                messages: vec![message.clone()],
                ..FlushRows::default()
            }),
            fallback: None,
            kind: "message",
            session_id: message.message.session_id.to_string(),
            seq: Some(message.message.seq),
            client_id: message.client_id.clone(),
            payload: serde_json::to_string(message).expect("messages serialize"),
        });
    }
    for update in &rows.session_updates {
        let payload = json!({
            "last_seq": update.last_seq,
            "nonuser_count": update.nonuser_count,
            "archived": update.archived,
            "updated_at": update.updated_at,
            "last_user_seq": update.dispatch.last_user_seq,
            "answered_through": update.dispatch.answered_through,
        });
        let mut numbers_only = update.clone();
        if let Some(activity) = numbers_only.last_activity.as_mut() {
            activity.sender_id = None;
            activity.preview = None;
        }
        units.push(Unit {
            rows: Arc::new(FlushRows {
                session_updates: vec![update.clone()],
                ..FlushRows::default()
            }),
            fallback: Some(Arc::new(FlushRows {
                session_updates: vec![numbers_only],
                ..FlushRows::default()
            })),
            kind: "session_update",
            session_id: update.session_id.to_string(),
            seq: None,
            client_id: None,
            payload: payload.to_string(),
        });
    }
    for (session_id, from_seq, through_seq, at) in &rows.gaps {
        units.push(Unit {
            rows: Arc::new(FlushRows {
                gaps: vec![(session_id.clone(), *from_seq, *through_seq, *at)],
                ..FlushRows::default()
            }),
            fallback: None,
            kind: "session_gap",
            session_id: session_id.clone(),
            seq: Some(*from_seq),
            client_id: None,
            payload: json!({"from_seq": from_seq, "through_seq": through_seq}).to_string(),
        });
    }
    for (session_id, cursor) in &rows.read_cursors {
        units.push(Unit {
            rows: Arc::new(FlushRows {
                read_cursors: vec![(session_id.clone(), *cursor)],
                ..FlushRows::default()
            }),
            fallback: None,
            kind: "read_cursor",
            session_id: session_id.clone(),
            seq: Some(cursor.read_seq),
            client_id: None,
            payload: serde_json::to_string(cursor).expect("cursors serialize"),
        });
    }
    units
}

/// Fills the gaps of `messages` (ascending, within `from..=to`) from `dead` (any order).
pub fn merge_dead_messages(messages: &mut Vec<MessageRecord>, dead: Vec<DeadLetter>, from: u64, to: u64) {
    let present: std::collections::HashSet<u64> = messages.iter().map(|m| m.message.seq).collect();
    let missing = dead
        .iter()
        .filter_map(DeadLetter::message)
        .filter(|m| (from..=to).contains(&m.message.seq) && !present.contains(&m.message.seq));
    messages.extend(missing.collect::<Vec<_>>());
    messages.sort_by_key(|m| m.message.seq);
    messages.dedup_by_key(|m| m.message.seq);
}
