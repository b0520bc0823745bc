//! Turns log operations into the rows one flush writes: new sessions, messages, and the final
//! state of each touched session and read cursor.

use std::collections::HashMap;
use std::sync::Arc;

use serde_json::value::RawValue;

use crate::agents::signing::{SigningKeys, SigningSecret};
use crate::model::{
    Agent, DispatchProgress, LastActivity, Message, MessageRecord, ReadCursor, SessionRecord, SessionStatus,
    SessionView, Timestamp,
};
use crate::shard::ops::Op;

#[derive(Debug, Clone)]
pub struct SessionUpdate {
    pub session_id: Arc<str>,
    pub last_seq: u64,
    pub nonuser_count: u64,
    pub last_activity: Option<LastActivity>,
    pub archived: bool,
    pub updated_at: Timestamp,
    /// Progress seen in these operations; the archive keeps the maximum of each field.
    pub dispatch: DispatchProgress,
}

impl SessionUpdate {
    pub fn new(session_id: Arc<str>, at: Timestamp) -> SessionUpdate {
        SessionUpdate {
            session_id,
            last_seq: 0,
            nonuser_count: 0,
            last_activity: None,
            archived: false,
            updated_at: at,
            dispatch: DispatchProgress::default(),
        }
    }
}

#[derive(Debug, Default)]
pub struct FlushRows {
    pub new_sessions: Vec<SessionRecord>,
    pub messages: Vec<MessageRecord>,
    pub session_updates: Vec<SessionUpdate>,
    /// `(session_id, cursor)`; the cursor belongs to the session's user.
    pub read_cursors: Vec<(String, ReadCursor)>,
    /// `(session_id, from_seq, through_seq, at)`: seqs skipped after an accepted loss.
    pub gaps: Vec<(String, u64, u64, Timestamp)>,
}

impl FlushRows {
    pub fn from_ops(ops: impl IntoIterator<Item = Op>) -> FlushRows {
        let ops = ops.into_iter();
        let mut rows = FlushRows::default();
        let mut updates: HashMap<Arc<str>, SessionUpdate> = HashMap::new();
        let mut cursors: HashMap<String, ReadCursor> = HashMap::new();
        let mut order: Vec<Arc<str>> = Vec::new();
        let mut update_of = |session_id: &str, at: Timestamp| -> Arc<str> {
            if let Some((key, _)) = updates.get_key_value(session_id) {
                return key.clone();
            }
            let key: Arc<str> = Arc::from(session_id);
            order.push(key.clone());
            updates.insert(key.clone(), SessionUpdate::new(key.clone(), at));
            key
        };
        // Sized up front: a cycle can carry tens of thousands of operations.
        let mut touched: Vec<(Arc<str>, Op)> = Vec::with_capacity(ops.size_hint().0);
        for op in ops {
            match op {
                Op::SessionCreated(record) => rows.new_sessions.push(record),
                Op::SeqsSkipped {
                    session_id,
                    from_seq,
                    through_seq,
                    at,
                } => rows.gaps.push((session_id, from_seq, through_seq, at)),
                // Not archived: a session loaded from the archive derives its open turn's id
                // again (`TurnId::derive`).
                Op::DispatchStarted { .. } => {}
                Op::ReadCursorMoved { session_id, cursor, .. } => {
                    let entry = cursors.entry(session_id).or_default();
                    if cursor.read_seq > entry.read_seq {
                        *entry = cursor;
                    }
                }
                Op::MessageAppended(ref record) => {
                    let key = update_of(&record.message.session_id, record.message.inserted_at);
                    touched.push((key, op));
                }
                Op::SessionArchived { ref session_id, at } | Op::DispatchFinished { ref session_id, at, .. } => {
                    let key = update_of(session_id, at);
                    touched.push((key, op));
                }
                // What replicas hold in memory; the archive already has all of it.
                Op::SessionLoaded { .. } | Op::SessionEvicted { .. } => {}
            }
        }
        let mut last_message_of: HashMap<Arc<str>, usize> = HashMap::new();
        for (key, op) in touched {
            let update = updates.get_mut(&key).expect("registered above");
            match op {
                Op::MessageAppended(record) => {
                    let message = &record.message;
                    update.last_seq = message.seq;
                    update.nonuser_count = record.nonuser_through;
                    // The preview is filled in below, once per session, from its last message.
                    update.last_activity = Some(LastActivity {
                        at: message.inserted_at,
                        sender_id: Some(message.sender_id.clone()),
                        preview: None,
                    });
                    last_message_of.insert(key.clone(), rows.messages.len());
                    update.updated_at = update.updated_at.max(message.inserted_at);
                    if record.from_user {
                        update.dispatch.last_user_seq = message.seq;
                    }
                    rows.messages.push(record);
                }
                Op::SessionArchived { at, .. } => {
                    update.archived = true;
                    update.updated_at = update.updated_at.max(at);
                }
                Op::DispatchFinished { through_seq, .. } => {
                    update.dispatch.answered_through = update.dispatch.answered_through.max(through_seq);
                }
                Op::SessionCreated(_)
                | Op::ReadCursorMoved { .. }
                | Op::SeqsSkipped { .. }
                | Op::SessionLoaded { .. }
                | Op::SessionEvicted { .. }
                | Op::DispatchStarted { .. } => {}
            }
        }
        for (key, index) in last_message_of {
            if let Some(activity) = updates.get_mut(&key).and_then(|u| u.last_activity.as_mut()) {
                activity.preview = crate::model::message_preview(&rows.messages[index].message.content);
            }
        }
        rows.session_updates = order.into_iter().filter_map(|id| updates.remove(&id)).collect();
        rows.read_cursors = cursors.into_iter().collect();
        rows
    }
}

/// A `sessions` row joined with its user's read cursor, as both archives return it.
pub struct SessionColumns {
    pub id: String,
    pub user_id: String,
    pub agent_id: String,
    pub status: String,
    pub metadata: String,
    pub last_seq: i64,
    pub nonuser_count: i64,
    pub last_activity_at: i64,
    pub last_sender_id: Option<String>,
    pub last_message_preview: Option<String>,
    pub inserted_at: i64,
    pub updated_at: i64,
    pub read_seq: i64,
    pub read_nonuser_through: i64,
    pub last_user_seq: i64,
    pub answered_through: i64,
}

pub fn session_view(c: SessionColumns) -> Result<SessionView, String> {
    let metadata = RawValue::from_string(c.metadata).map_err(|e| format!("session metadata: {e}"))?;
    let status = SessionStatus::parse(&c.status).ok_or_else(|| format!("unknown session status {}", c.status))?;
    Ok(SessionView {
        record: SessionRecord {
            id: Arc::from(c.id),
            user_id: c.user_id,
            agent_id: c.agent_id,
            metadata,
            inserted_at: Timestamp(c.inserted_at),
        },
        status,
        last_seq: c.last_seq as u64,
        nonuser_count: c.nonuser_count as u64,
        read_cursor: ReadCursor {
            read_seq: c.read_seq as u64,
            nonuser_through: c.read_nonuser_through as u64,
        },
        last_activity: LastActivity {
            at: Timestamp(c.last_activity_at),
            sender_id: c.last_sender_id,
            preview: c.last_message_preview,
        },
        updated_at: Timestamp(c.updated_at),
        dispatch: DispatchProgress {
            last_user_seq: c.last_user_seq as u64,
            answered_through: c.answered_through as u64,
            turn: None,
        },
    })
}

pub struct MessageColumns {
    pub session_id: String,
    pub seq: i64,
    pub id: String,
    pub sender_id: String,
    pub kind: String,
    pub content: String,
    pub metadata: String,
    pub client_id: Option<String>,
    pub fingerprint: i64,
    pub nonuser_through: i64,
    pub inserted_at: i64,
}

pub fn message_record(c: MessageColumns) -> Result<MessageRecord, String> {
    Ok(MessageRecord {
        message: Message {
            id: c.id,
            session_id: Arc::from(c.session_id),
            seq: c.seq as u64,
            sender_id: c.sender_id,
            kind: c.kind,
            content: RawValue::from_string(c.content).map_err(|e| format!("message content: {e}"))?,
            metadata: RawValue::from_string(c.metadata).map_err(|e| format!("message metadata: {e}"))?,
            inserted_at: Timestamp(c.inserted_at),
        },
        client_id: c.client_id,
        fingerprint: c.fingerprint as u64,
        nonuser_through: c.nonuser_through as u64,
        from_user: false,
    })
}

pub struct AgentColumns {
    pub id: String,
    pub name: String,
    pub origin_url: String,
    pub webhook_path: String,
    pub message_history_mode: String,
    pub message_history_limit: i64,
    pub timeout_ms: i64,
    pub debounce_window_ms: i64,
    pub headers: String,
    pub http2: bool,
    pub status: String,
    pub inserted_at: i64,
    pub updated_at: i64,
    pub signing_secret: Option<String>,
    pub signing_secret_created_at: Option<i64>,
    pub previous_signing_secret: Option<String>,
    pub previous_signing_secret_expires_at: Option<i64>,
}

pub fn agent(c: AgentColumns) -> Result<Agent, String> {
    let mode = serde_json::from_value(serde_json::Value::String(c.message_history_mode))
        .map_err(|e| format!("agent history mode: {e}"))?;
    let status =
        serde_json::from_value(serde_json::Value::String(c.status)).map_err(|e| format!("agent status: {e}"))?;
    Ok(Agent {
        id: c.id,
        name: c.name,
        origin_url: c.origin_url,
        webhook_path: c.webhook_path,
        message_history_mode: mode,
        message_history_limit: c.message_history_limit as u32,
        timeout_ms: c.timeout_ms as u32,
        debounce_window_ms: c.debounce_window_ms as u32,
        headers: serde_json::from_str(&c.headers).map_err(|e| format!("agent headers: {e}"))?,
        http2: c.http2,
        status,
        inserted_at: Timestamp(c.inserted_at),
        updated_at: Timestamp(c.updated_at),
        signing: SigningKeys {
            current: secret(c.signing_secret)?,
            created_at: c.signing_secret_created_at.map(Timestamp),
            previous: secret(c.previous_signing_secret)?,
            previous_expires_at: c.previous_signing_secret_expires_at.map(Timestamp),
        },
    })
}

/// A stored signing secret (checked, so a damaged one is refused here rather than at a call;
/// the error never repeats the text).
fn secret(text: Option<String>) -> Result<Option<SigningSecret>, String> {
    text.map(|text| SigningSecret::parse(&text).map_err(|problem| format!("agent signing secret: {problem}")))
        .transpose()
}

/// An agent's signing columns as stored: `(secret, created_at, previous secret, its expiry)`.
pub type SigningColumns = (Option<String>, Option<i64>, Option<String>, Option<i64>);

pub fn signing_columns(signing: &SigningKeys) -> SigningColumns {
    (
        signing.current.as_ref().map(|s| s.reveal().to_string()),
        signing.created_at.map(|t| t.0),
        signing.previous.as_ref().map(|s| s.reveal().to_string()),
        signing.previous_expires_at.map(|t| t.0),
    )
}
