//! `/api/sessions/:id/messages`: history reads and appends.

use std::collections::HashMap;

use axum::extract::{Path, Query, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use serde::Deserialize;
use serde_json::value::RawValue;
use serde_json::{Value, json};

use super::sessions::{authorize_session, json_depth};
use super::{ApiError, ApiResult, JsonBody, SharedState, parse_count};
use crate::auth::Caller;
use crate::model::MessageRecord;
use crate::shard::AppendRequest;

const MAX_KIND_CHARS: usize = 64;
const MAX_CLIENT_ID_CHARS: usize = 128;

pub async fn list(
    State(state): State<SharedState>,
    caller: Caller,
    Path(id): Path<String>,
    Query(query): Query<HashMap<String, String>>,
) -> ApiResult<Response> {
    let after_seq = parse_count("after_seq", query.get("after_seq"), 0)?;
    let before_seq = match query.get("before_seq") {
        None => None,
        Some(_) if query.contains_key("after_seq") => {
            return Err(ApiError::bad_request(
                "invalid_parameter",
                "after_seq and before_seq cannot be combined: one reads forward, the other back",
            ));
        }
        Some(_) => Some(parse_count("before_seq", query.get("before_seq"), 0)?),
    };
    if before_seq == Some(0) {
        return Err(ApiError::bad_request(
            "invalid_parameter",
            "before_seq must be at least 1",
        ));
    }
    let limit = parse_count("limit", query.get("limit"), 50)?;
    if limit == 0 {
        return Err(ApiError::bad_request("invalid_parameter", "limit must be at least 1"));
    }
    let limit = limit.min(state.config.max_page_size as u64) as usize;
    // Authorize on the session alone before reading any history: an outsider causes no history
    // read (and learns nothing from how one fails).
    let session = match (caller.is_admin(), before_seq) {
        (true, None) => None,
        _ => Some(state.shards.view(&id).await?),
    };
    if !caller.is_admin() {
        authorize_session(&caller, session.as_ref().expect("looked up for a non-admin"))?;
    }
    let Some(before_seq) = before_seq else {
        let page = state.shards.read_messages(&id, after_seq, limit).await?;
        let messages: Vec<&crate::model::Message> = page.messages.iter().map(|r| &r.message).collect();
        return Ok(axum::Json(json!({"messages": messages, "has_more": page.has_more})).into_response());
    };
    let window = BackwardWindow::new(
        before_seq,
        session.expect("looked up for a backward page").last_seq,
        limit,
    );
    // A page is bounded in bytes as well as in count: when the window does not fit, read on and
    // answer its newest part, so the next page (below this one's first seq) leaves no hole.
    let mut from = window.after_seq;
    let mut page = state.shards.read_messages(&id, from, limit).await?;
    while page.has_more && page.messages.last().is_some_and(|r| r.message.seq + 1 < window.end) {
        from = page.messages.last().map_or(from, |r| r.message.seq);
        page = state.shards.read_messages(&id, from, limit).await?;
    }
    let messages: Vec<&crate::model::Message> = page
        .messages
        .iter()
        .map(|r| &r.message)
        .filter(|message| message.seq < window.end)
        .collect();
    // Below the first message answered; below the window when it held none (skipped seqs).
    let next_before_seq = messages.first().map_or(window.after_seq + 1, |message| message.seq);
    Ok(axum::Json(json!({
        "messages": messages,
        "has_more": next_before_seq > 1,
        "next_before_seq": (next_before_seq > 1).then_some(next_before_seq),
    }))
    .into_response())
}

/// A page read backwards: the newest `limit` seqs below `before_seq` (which may lie past the
/// session's last seq: "the newest page"), read forward from `after_seq`. Seqs are dense but for
/// the few an operator skipped (`SeqsSkipped`), so a page may hold fewer than `limit` messages.
struct BackwardWindow {
    after_seq: u64,
    /// Seqs at or past this are not in the page.
    end: u64,
}

impl BackwardWindow {
    fn new(before_seq: u64, last_seq: u64, limit: usize) -> BackwardWindow {
        let end = before_seq.min(last_seq.saturating_add(1));
        BackwardWindow {
            after_seq: end.saturating_sub(1).saturating_sub(limit as u64),
            end,
        }
    }
}

/// The append body, fields kept raw so the writer stores the client's exact JSON.
#[derive(Deserialize)]
struct AppendBody<'a> {
    #[serde(borrow, default)]
    user_id: Option<&'a RawValue>,
    #[serde(borrow, default)]
    agent_id: Option<&'a RawValue>,
    #[serde(borrow, default)]
    sender_id: Option<&'a RawValue>,
    #[serde(borrow, default)]
    kind: Option<&'a RawValue>,
    #[serde(borrow, default)]
    content: Option<&'a RawValue>,
    #[serde(borrow, default)]
    metadata: Option<&'a RawValue>,
    #[serde(borrow, default)]
    client_id: Option<&'a RawValue>,
    #[serde(borrow, default)]
    expected_seq: Option<&'a RawValue>,
}

/// An append's payload (everything but the sender), as REST and WebSocket clients send it.
pub struct MessageInput<'a> {
    pub kind: Option<&'a RawValue>,
    pub content: Option<&'a RawValue>,
    pub metadata: Option<&'a RawValue>,
    pub client_id: Option<&'a RawValue>,
    pub expected_seq: Option<&'a RawValue>,
}

/// Why an append was refused before reaching the shard.
pub enum InvalidMessage {
    Format(String),
    TooLarge(String),
}

fn is_null(raw: Option<&RawValue>) -> bool {
    raw.is_none_or(|r| r.get() == "null")
}

fn as_string(raw: &RawValue) -> Option<String> {
    serde_json::from_str::<String>(raw.get()).ok()
}

/// Validates the payload and builds the shard request. The order of checks follows rest.md.
pub fn build_append(
    session_id: &str,
    sender_id: String,
    sender_is_user: bool,
    input: MessageInput<'_>,
    max_message_bytes: usize,
    max_metadata_depth: usize,
) -> Result<AppendRequest, InvalidMessage> {
    let format = |m: &str| InvalidMessage::Format(m.to_string());
    let kind = match input.kind {
        None => "text".to_string(),
        Some(raw) => match as_string(raw) {
            Some(kind)
                if !kind.is_empty()
                    && kind.chars().count() <= MAX_KIND_CHARS
                    && !kind.chars().any(char::is_control) =>
            {
                kind
            }
            _ => return Err(format("kind must be a non-empty string")),
        },
    };
    let content = match input.content {
        None => return Err(format("content is required")),
        Some(raw) if raw.get() == "null" => return Err(format("content is required")),
        Some(raw) if !raw.get().starts_with('{') => return Err(format("content must be a map")),
        Some(raw) => raw,
    };
    if super::turns::is_turn_kind(&kind) {
        if !sender_is_user {
            return Err(InvalidMessage::Format(format!(
                "kind {kind} may only be sent by the session's user"
            )));
        }
        super::turns::check_turn_content(&kind, content).map_err(InvalidMessage::Format)?;
    }
    let metadata_text = match input.metadata {
        None => "{}",
        Some(raw) if raw.get() == "null" => "{}",
        Some(raw) if !raw.get().starts_with('{') => return Err(format("metadata must be a map")),
        Some(raw) => raw.get(),
    };
    let client_id = match input.client_id {
        raw if is_null(raw) => None,
        Some(raw) => match as_string(raw) {
            Some(id)
                if !id.is_empty() && id.chars().count() <= MAX_CLIENT_ID_CHARS && !id.chars().any(char::is_control) =>
            {
                Some(id)
            }
            _ => {
                return Err(format("client_id must be a non-empty string of at most 128 characters"));
            }
        },
        None => None,
    };
    let expected_seq = match input.expected_seq {
        raw if is_null(raw) => None,
        Some(raw) => match raw.get().parse::<u64>() {
            Ok(seq) => Some(seq),
            Err(_) => return Err(format("expected_seq must be a non-negative integer")),
        },
        None => None,
    };
    let encoded_bytes = content.get().len() + metadata_text.len() + kind.len();
    if encoded_bytes > max_message_bytes {
        return Err(InvalidMessage::TooLarge(format!(
            "message is {encoded_bytes} bytes; the limit is {max_message_bytes}"
        )));
    }
    let metadata_value: Value = serde_json::from_str(metadata_text).map_err(|_| format("metadata must be a map"))?;
    if json_depth(&metadata_value) > max_metadata_depth {
        return Err(InvalidMessage::Format(format!(
            "metadata is nested deeper than {max_metadata_depth} levels"
        )));
    }
    let fingerprint = client_id.as_ref().map_or(0, |_| {
        fingerprint(&sender_id, sender_is_user, &kind, content, &metadata_value)
    });
    Ok(AppendRequest {
        session_id: session_id.to_string(),
        sender_id,
        sender_is_user,
        kind,
        content: content.to_owned(),
        metadata: RawValue::from_string(metadata_text.to_string()).expect("checked JSON"),
        client_id,
        expected_seq,
        fingerprint,
        archive_checked_below: None,
        leader_term: None,
    })
}

/// A hash of what the sender sent, insensitive to key order and whitespace, so a retry of the
/// same message matches and a different one reusing the `client_id` does not.
fn fingerprint(sender_id: &str, sender_is_user: bool, kind: &str, content: &RawValue, metadata: &Value) -> u64 {
    match serde_json::from_str::<Value>(content.get()) {
        Ok(content) => {
            // serde_json's map is ordered by key, so re-serializing gives one canonical text.
            let canonical = json!([sender_id, sender_is_user, kind, content, metadata]).to_string();
            xxhash_rust::xxh3::xxh3_64(canonical.as_bytes())
        }
        Err(_) => {
            // Nested deeper than serde_json parses into a value: fingerprint the exact text
            // (a retry must then repeat it byte for byte). The prefix keeps this apart from
            // every canonical text, which starts with `[`.
            let canonical = json!([sender_id, sender_is_user, kind, metadata]).to_string();
            let text = format!("raw\0{canonical}\0{}", content.get());
            xxhash_rust::xxh3::xxh3_64(text.as_bytes())
        }
    }
}

pub async fn append(
    State(state): State<SharedState>,
    caller: Caller,
    Path(id): Path<String>,
    JsonBody(body): JsonBody,
) -> ApiResult<Response> {
    let body: AppendBody<'_> = serde_json::from_str(body.get())
        .map_err(|e| ApiError::bad_request("invalid_json", format!("body is not valid JSON: {e}")))?;
    let invalid = |m: &str| ApiError::unprocessable("invalid_message_format", m);
    let (sender_id, sender_is_user) = match (!is_null(body.user_id), !is_null(body.agent_id)) {
        (true, true) => {
            return Err(invalid(
                "Provide either user_id or agent_id when sending a message, not both",
            ));
        }
        _ if !is_null(body.sender_id) => {
            return Err(invalid(
                "sender_id is deprecated; use user_id or agent_id to identify the sender",
            ));
        }
        (false, false) => return Err(invalid("user_id or agent_id is required")),
        (true, false) => (body.user_id, true),
        (false, true) => (body.agent_id, false),
    };
    let sender_id = sender_id
        .and_then(as_string)
        .filter(|s| !s.is_empty() && s.len() <= 255 && !s.chars().any(char::is_control))
        .ok_or_else(|| invalid("user_id or agent_id must be a non-empty string"))?;
    if !caller.may_act_as(&sender_id) {
        return Err(ApiError::forbidden("you may only send messages as yourself"));
    }
    let input = MessageInput {
        kind: body.kind,
        content: body.content,
        metadata: body.metadata,
        client_id: body.client_id,
        expected_seq: body.expected_seq,
    };
    let config = &state.config;
    let request = build_append(
        &id,
        sender_id,
        sender_is_user,
        input,
        config.max_message_bytes,
        config.max_metadata_depth,
    )
    .map_err(|error| match error {
        InvalidMessage::Format(message) => invalid(&message),
        InvalidMessage::TooLarge(message) => ApiError::new(StatusCode::PAYLOAD_TOO_LARGE, "message_too_large", message),
    })?;
    let started = std::time::Instant::now();
    let result = state.shards.append(request).await;
    let outcome = match &result {
        Ok(r) if r.deduplicated => "deduplicated",
        Ok(_) => "appended",
        Err(_) => "refused",
    };
    metrics::counter!("fleetlm_appends_total", "result" => outcome).increment(1);
    let result = result?;
    metrics::histogram!("fleetlm_append_seconds").record(started.elapsed().as_secs_f64());
    Ok(axum::Json(message_response(&result.record, result.deduplicated)).into_response())
}

fn message_response(record: &MessageRecord, deduplicated: bool) -> Value {
    let mut body = json!({"message": &record.message});
    if deduplicated {
        body["deduplicated"] = Value::Bool(true);
    }
    body
}

#[cfg(test)]
mod tests {
    use super::BackwardWindow;

    #[test]
    fn a_backward_window_covers_the_newest_seqs_below_its_bound() {
        let window = BackwardWindow::new(u64::MAX, 10, 4);
        assert_eq!((window.after_seq, window.end), (6, 11), "seqs 7..=10");
        let window = BackwardWindow::new(7, 10, 4);
        assert_eq!((window.after_seq, window.end), (2, 7), "seqs 3..=6");
        let window = BackwardWindow::new(3, 10, 4);
        assert_eq!((window.after_seq, window.end), (0, 3), "seqs 1..=2, the oldest page");
        let window = BackwardWindow::new(1, 10, 4);
        assert_eq!((window.after_seq, window.end), (0, 1), "nothing below seq 1");
        let window = BackwardWindow::new(5, 0, 4);
        assert_eq!((window.after_seq, window.end), (0, 1), "an empty session");
    }

    use proptest::prelude::*;
    use serde_json::value::RawValue;
    use serde_json::{Value, json};

    use super::fingerprint;

    fn nested(depth: usize, leaf: &str) -> Box<RawValue> {
        let text = format!("{}{}{}", "{\"a\":".repeat(depth), json!(leaf), "}".repeat(depth));
        RawValue::from_string(text).unwrap()
    }

    fn print(content: &RawValue) -> u64 {
        fingerprint("u", true, "text", content, &json!({}))
    }

    proptest! {
        /// Equal fingerprints exactly when the contents are equal, at any depth (serde_json
        /// parses values only up to depth 128).
        #[test]
        fn fingerprints_tell_contents_apart_at_any_depth(
            depth in 1usize..400,
            left in "[a-z]{1,8}",
            right in "[a-z]{1,8}",
        ) {
            let (a, b) = (nested(depth, &left), nested(depth, &right));
            prop_assert_eq!(print(&a) == print(&b), left == right);
            prop_assert_eq!(print(&a), print(&nested(depth, &left)));
        }
    }

    #[test]
    fn key_order_and_whitespace_do_not_matter_for_parsable_content() {
        let a = RawValue::from_string(r#"{"x": 1, "y": [2]}"#.into()).unwrap();
        let b = RawValue::from_string(r#"{"y":[2],"x":1}"#.into()).unwrap();
        assert_eq!(print(&a), print(&b));
        let _: Value = serde_json::from_str(a.get()).unwrap();
    }
}
