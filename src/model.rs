//! The product's data: messages, sessions, agents, and how they look on the wire.
//!
//! Architecture invariant: plain data and its JSON form only; no I/O, no clocks.

use std::fmt;
use std::sync::Arc;

use serde::{Deserialize, Deserializer, Serialize, Serializer};
use serde_json::value::RawValue;

/// Microseconds since the Unix epoch, shown as RFC 3339 UTC with six fraction digits and `Z`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Default)]
pub struct Timestamp(pub i64);

const TIMESTAMP_FORMAT: &[time::format_description::FormatItem<'static>] =
    time::macros::format_description!("[year]-[month]-[day]T[hour]:[minute]:[second].[subsecond digits:6]Z");

impl Timestamp {
    pub fn to_rfc3339(self) -> String {
        self.with_rfc3339(str::to_string)
    }

    /// Lends the formatted text without allocating in the common case (years 0000–9999).
    fn with_rfc3339<T>(self, use_text: impl FnOnce(&str) -> T) -> T {
        if let Some(bytes) = crate::rfc3339::format_micros(self.0) {
            return use_text(std::str::from_utf8(&bytes).expect("the formatter writes ASCII"));
        }
        let nanos = i128::from(self.0) * 1000;
        let text = time::OffsetDateTime::from_unix_timestamp_nanos(nanos)
            .ok()
            .and_then(|t| t.format(TIMESTAMP_FORMAT).ok())
            .unwrap_or_else(|| "1970-01-01T00:00:00.000000Z".to_string());
        use_text(&text)
    }

    pub fn parse(text: &str) -> Option<Timestamp> {
        if let Some(micros) = crate::rfc3339::parse_micros(text) {
            return Some(Timestamp(micros));
        }
        let parsed = time::OffsetDateTime::parse(text, &time::format_description::well_known::Rfc3339).ok()?;
        Some(Timestamp((parsed.unix_timestamp_nanos() / 1000) as i64))
    }
}

impl fmt::Display for Timestamp {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.with_rfc3339(|text| f.write_str(text))
    }
}

impl Serialize for Timestamp {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        self.with_rfc3339(|text| serializer.serialize_str(text))
    }
}

impl<'de> Deserialize<'de> for Timestamp {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let text = <std::borrow::Cow<'de, str>>::deserialize(deserializer)?;
        Timestamp::parse(&text).ok_or_else(|| serde::de::Error::custom("invalid RFC 3339 timestamp"))
    }
}

/// A message exactly as stored and as every reader sees it.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Message {
    pub id: String,
    pub session_id: Arc<str>,
    pub seq: u64,
    pub sender_id: String,
    pub kind: String,
    pub content: Box<RawValue>,
    pub metadata: Box<RawValue>,
    pub inserted_at: Timestamp,
}

/// A message plus what the log keeps beside it for idempotency and unread counts.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct MessageRecord {
    pub message: Message,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub client_id: Option<String>,
    /// Hash of what the writer sent (sender, kind, content, metadata), to tell a retry from a
    /// different message reusing the same `client_id`.
    pub fingerprint: u64,
    /// How many messages up to and including this one were not sent by the session's user.
    pub nonuser_through: u64,
    /// Sent by the session's user (such messages schedule the agent).
    #[serde(default)]
    pub from_user: bool,
}

/// What a session is born with; never changes afterwards.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct SessionRecord {
    pub id: Arc<str>,
    pub user_id: String,
    pub agent_id: String,
    pub metadata: Box<RawValue>,
    pub inserted_at: Timestamp,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum SessionStatus {
    Active,
    Archived,
}

impl SessionStatus {
    pub fn as_str(self) -> &'static str {
        match self {
            SessionStatus::Active => "active",
            SessionStatus::Archived => "archived",
        }
    }

    pub fn parse(text: &str) -> Option<SessionStatus> {
        match text {
            "active" => Some(SessionStatus::Active),
            "archived" => Some(SessionStatus::Archived),
            _ => None,
        }
    }
}

/// The user's read position: `read_seq` and the non-user message count up to it.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ReadCursor {
    pub read_seq: u64,
    pub nonuser_through: u64,
}

/// The latest message of a session, for inbox entries.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct LastActivity {
    pub at: Timestamp,
    pub sender_id: Option<String>,
    pub preview: Option<String>,
}

/// Which user messages the agent has answered: a dispatch is owed while
/// `last_user_seq > answered_through`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct DispatchProgress {
    pub last_user_seq: u64,
    pub answered_through: u64,
    /// The turn a dispatch started (`Op::DispatchStarted`) and has not finished: whoever
    /// dispatches next resumes it, with its id. Not archived: a session loaded from the archive
    /// has none, and a dispatch derives the same id again (`TurnId::derive`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub turn: Option<OpenTurn>,
}

/// A dispatched turn not finished yet (`DispatchProgress::turn`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct OpenTurn {
    /// The agent's `idempotency-key`, and the `dispatch_id` of every attempt.
    pub id: crate::ids::TurnId,
    /// The newest user message the turn answers.
    pub through_seq: u64,
    /// The newest message of the history the agent is given (a resumed turn asks again with
    /// the same history, not with messages that arrived since).
    pub history_seq: u64,
}

impl DispatchProgress {
    pub fn is_pending(&self) -> bool {
        self.last_user_seq > self.answered_through
    }

    /// The started turn a reply is still owed for, if any.
    pub fn open_turn(&self) -> Option<OpenTurn> {
        self.turn.filter(|turn| turn.through_seq > self.answered_through)
    }
}

/// Everything known about a session at one moment: the REST `Session` and the inbox entry.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct SessionView {
    pub record: SessionRecord,
    pub status: SessionStatus,
    pub last_seq: u64,
    pub nonuser_count: u64,
    pub read_cursor: ReadCursor,
    pub last_activity: LastActivity,
    pub updated_at: Timestamp,
    pub dispatch: DispatchProgress,
}

impl SessionView {
    pub fn unread_count(&self) -> u64 {
        self.nonuser_count.saturating_sub(self.read_cursor.nonuser_through)
    }

    pub fn to_json(&self) -> serde_json::Value {
        serde_json::json!({
            "id": &*self.record.id,
            "user_id": self.record.user_id,
            "agent_id": self.record.agent_id,
            "status": self.status.as_str(),
            "metadata": &self.record.metadata,
            "last_seq": self.last_seq,
            "inserted_at": self.record.inserted_at,
            "updated_at": self.updated_at,
        })
    }

    pub fn to_inbox_entry(&self) -> serde_json::Value {
        let mut entry = serde_json::json!({
            "session_id": &*self.record.id,
            "agent_id": self.record.agent_id,
            "unread_count": self.unread_count(),
            "last_seq": self.last_seq,
            "last_activity_at": self.last_activity.at,
            "last_sender_id": self.last_activity.sender_id,
        });
        if let Some(preview) = &self.last_activity.preview {
            entry["last_message_preview"] = serde_json::Value::String(preview.clone());
        }
        entry
    }
}

/// Short text shown in inbox entries: the content's `text` field, or the text parts of an
/// assistant message, cut to 100 characters.
pub fn message_preview(content: &RawValue) -> Option<String> {
    #[derive(Deserialize)]
    struct Part<'a> {
        #[serde(borrow)]
        text: Option<std::borrow::Cow<'a, str>>,
    }
    #[derive(Deserialize)]
    struct Content<'a> {
        #[serde(borrow)]
        text: Option<std::borrow::Cow<'a, str>>,
        #[serde(borrow, default)]
        parts: Option<Vec<Part<'a>>>,
    }
    let parsed: Content<'_> = serde_json::from_str(content.get()).ok()?;
    let text: String = match (parsed.text, parsed.parts) {
        (Some(text), _) => text.into_owned(),
        (None, Some(parts)) => parts.iter().filter_map(|p| p.text.as_deref()).collect(),
        (None, None) => return None,
    };
    // NUL is valid in JSON text but not in a Postgres TEXT column (nor useful in a preview).
    (!text.is_empty()).then(|| text.chars().filter(|c| *c != '\0').take(100).collect())
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum HistoryMode {
    Tail,
    Last,
    Entire,
}

impl HistoryMode {
    pub fn as_str(self) -> &'static str {
        match self {
            HistoryMode::Tail => "tail",
            HistoryMode::Last => "last",
            HistoryMode::Entire => "entire",
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum AgentStatus {
    Enabled,
    Disabled,
}

impl AgentStatus {
    pub fn as_str(self) -> &'static str {
        match self {
            AgentStatus::Enabled => "enabled",
            AgentStatus::Disabled => "disabled",
        }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Agent {
    pub id: String,
    pub name: String,
    pub origin_url: String,
    pub webhook_path: String,
    pub message_history_mode: HistoryMode,
    pub message_history_limit: u32,
    pub timeout_ms: u32,
    pub debounce_window_ms: u32,
    pub headers: std::collections::BTreeMap<String, String>,
    /// Webhooks to an `http://` origin use HTTP/2 with prior knowledge (h2c). `https://`
    /// origins negotiate HTTP/2 by ALPN whatever this says.
    #[serde(default)]
    pub http2: bool,
    pub status: AgentStatus,
    pub inserted_at: Timestamp,
    pub updated_at: Timestamp,
    /// The secrets its calls are signed with (docs/AGENTS.md, "Verifying a call"). Never in
    /// the public form.
    #[serde(default)]
    pub signing: crate::agents::signing::SigningKeys,
}

impl Agent {
    /// The public form: header values and signing secrets are never echoed back.
    pub fn to_json(&self) -> serde_json::Value {
        let masked: serde_json::Map<String, serde_json::Value> = self
            .headers
            .keys()
            .map(|name| (name.clone(), serde_json::Value::String("***".into())))
            .collect();
        serde_json::json!({
            "id": self.id,
            "name": self.name,
            "origin_url": self.origin_url,
            "webhook_path": self.webhook_path,
            "message_history_mode": self.message_history_mode.as_str(),
            "message_history_limit": self.message_history_limit,
            "timeout_ms": self.timeout_ms,
            "debounce_window_ms": self.debounce_window_ms,
            "headers": masked,
            "http2": self.http2,
            "status": self.status.as_str(),
            "inserted_at": self.inserted_at,
            "updated_at": self.updated_at,
            "signing": self.signing.public_json(),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn timestamps_are_rfc3339_micros_utc() {
        let stamp = Timestamp(1_795_532_645_123_456);
        let text = stamp.to_rfc3339();
        assert_eq!(text, "2026-11-24T15:04:05.123456Z");
        assert_eq!(Timestamp::parse(&text), Some(stamp));
    }

    #[test]
    fn preview_takes_the_text_field() {
        let content = RawValue::from_string(r#"{"text":"hello there"}"#.into()).unwrap();
        assert_eq!(message_preview(&content).as_deref(), Some("hello there"));
        let content = RawValue::from_string(r#"{"parts":[]}"#.into()).unwrap();
        assert_eq!(message_preview(&content), None);
        let content =
            RawValue::from_string(r#"{"role":"assistant","parts":[{"type":"text","text":"hi "},{"type":"step-start"},{"type":"text","text":"there"}]}"#.into())
                .unwrap();
        assert_eq!(message_preview(&content).as_deref(), Some("hi there"));
    }
}
