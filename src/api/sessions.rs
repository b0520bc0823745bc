//! `/api/sessions`, read cursors and `/api/users/:id/inbox`.

use std::collections::HashMap;

use axum::extract::{Path, Query, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use serde_json::value::RawValue;
use serde_json::{Map, Value, json};

use super::{ApiError, ApiResult, JsonBody, SharedState, parse_count};
use crate::archive::SessionFilter;
use crate::auth::Caller;
use crate::model::{AgentStatus, SessionRecord, SessionStatus, SessionView, Timestamp};

const DEFAULT_PAGE: u64 = 50;
const MAX_SESSION_PAGE: u64 = 500;
/// Sessions shown in one inbox.
const INBOX_LIMIT: usize = 500;

/// May the caller see or change this session?
pub fn authorize_session(caller: &Caller, session: &SessionView) -> ApiResult<()> {
    if caller.may_act_as(&session.record.user_id) || caller.may_act_as(&session.record.agent_id) {
        Ok(())
    } else {
        Err(ApiError::forbidden("you are not a participant of this session"))
    }
}

fn identity_field(fields: &Map<String, Value>, name: &str) -> ApiResult<Option<String>> {
    match fields.get(name) {
        None | Some(Value::Null) => Ok(None),
        Some(Value::String(s)) if s.is_empty() => Ok(None),
        Some(Value::String(s)) if s.len() <= 255 && !s.chars().any(char::is_control) => Ok(Some(s.clone())),
        Some(_) => Err(ApiError::unprocessable(
            "invalid_session",
            format!("{name} must be a string of at most 255 characters without control characters"),
        )),
    }
}

pub async fn create(State(state): State<SharedState>, caller: Caller, JsonBody(body): JsonBody) -> ApiResult<Response> {
    let mut fields: Map<String, Value> = serde_json::from_str(body.get())
        .map_err(|e| ApiError::bad_request("invalid_json", format!("body is not valid JSON: {e}")))?;
    if let Some(Value::Object(nested)) = fields.remove("session") {
        fields = nested;
    }
    let (Some(user_id), Some(agent_id)) = (
        identity_field(&fields, "user_id")?,
        identity_field(&fields, "agent_id")?,
    ) else {
        return Err(ApiError::unprocessable(
            "invalid_session",
            "user_id and agent_id are required",
        ));
    };
    if !caller.may_act_as(&user_id) {
        return Err(ApiError::forbidden("you may only create sessions for yourself"));
    }
    let id = match fields.get("id") {
        None | Some(Value::Null) => crate::ids::generate_id(),
        Some(Value::String(id)) if crate::ids::is_valid_client_chosen_id(id) => id.clone(),
        Some(_) => {
            return Err(ApiError::unprocessable(
                "invalid_session",
                "id must be 1-255 characters of A-Z a-z 0-9 . _ : @ -",
            ));
        }
    };
    let metadata = match fields.get("metadata") {
        None | Some(Value::Null) => RawValue::from_string("{}".into()).expect("valid json"),
        Some(value @ Value::Object(_)) => {
            if json_depth(value) > state.config.max_metadata_depth {
                return Err(ApiError::unprocessable(
                    "invalid_session",
                    "metadata is nested too deeply",
                ));
            }
            serde_json::value::to_raw_value(value).expect("a value serializes")
        }
        Some(_) => {
            return Err(ApiError::unprocessable("invalid_session", "metadata must be a map"));
        }
    };
    let agent = state.registry.get(&agent_id);
    match agent {
        None if !state.registry.is_loaded() => {
            return Err(ApiError::unavailable(
                "the agents are not known yet (the archive does not answer); retry shortly",
            ));
        }
        None => {
            return Err(ApiError::unprocessable(
                "agent_not_found",
                format!("agent {agent_id} does not exist"),
            ));
        }
        Some(agent) if agent.status == AgentStatus::Disabled => {
            return Err(ApiError::unprocessable(
                "agent_disabled",
                format!("agent {agent_id} is disabled"),
            ));
        }
        Some(_) => {}
    }
    let record = SessionRecord {
        id: id.into(),
        user_id,
        agent_id,
        metadata,
        inserted_at: Timestamp(0),
    };
    let view = state.shards.create_session(record).await?;
    // The session is durable in the log; put its row in the archive now so listings show it at
    // once. If the archive is down the flusher inserts it later.
    if let Err(error) = state.shards.archive().record_session(&view.record).await {
        tracing::warn!(session_id = %view.record.id, %error, "session row not archived yet");
    }
    metrics::counter!("fleetlm_sessions_created_total").increment(1);
    Ok((StatusCode::CREATED, axum::Json(json!({"session": view.to_json()}))).into_response())
}

pub async fn list(
    State(state): State<SharedState>,
    caller: Caller,
    Query(query): Query<HashMap<String, String>>,
) -> ApiResult<Response> {
    let limit = parse_count("limit", query.get("limit"), DEFAULT_PAGE)?;
    if limit == 0 {
        return Err(ApiError::bad_request("invalid_parameter", "limit must be at least 1"));
    }
    let limit = limit.min(MAX_SESSION_PAGE) as usize;
    let status = match query.get("status").map(String::as_str) {
        None | Some("") => None,
        Some(text) => Some(
            SessionStatus::parse(text)
                .ok_or_else(|| ApiError::bad_request("invalid_parameter", "status must be active or archived"))?,
        ),
    };
    let mut user_id = query.get("user_id").filter(|u| !u.is_empty()).cloned();
    if let Caller::Subject(sub) = &caller {
        match &user_id {
            Some(user) if user != sub => {
                return Err(ApiError::forbidden("you may only list your own sessions"));
            }
            _ => user_id = Some(sub.clone()),
        }
    }
    let before = match query.get("cursor").filter(|c| !c.is_empty()) {
        None => None,
        Some(cursor) => Some(
            decode_cursor(cursor).ok_or_else(|| ApiError::bad_request("invalid_parameter", "cursor is not valid"))?,
        ),
    };
    let filter = SessionFilter {
        user_id,
        agent_id: query.get("agent_id").filter(|a| !a.is_empty()).cloned(),
        status,
        before,
        limit: limit + 1,
    };
    let mut views = state.shards.archive().list_sessions(filter).await?;
    let next_cursor = if views.len() > limit {
        views.truncate(limit);
        views.last().map(|v| encode_cursor(v.record.inserted_at, &v.record.id))
    } else {
        None
    };
    let views = state.shards.overlay(views).await?;
    let sessions: Vec<Value> = views.iter().map(SessionView::to_json).collect();
    Ok(axum::Json(json!({"sessions": sessions, "next_cursor": next_cursor})).into_response())
}

fn encode_cursor(at: Timestamp, id: &str) -> String {
    URL_SAFE_NO_PAD.encode(format!("{}:{id}", at.0))
}

fn decode_cursor(cursor: &str) -> Option<(Timestamp, String)> {
    let text = String::from_utf8(URL_SAFE_NO_PAD.decode(cursor).ok()?).ok()?;
    let (at, id) = text.split_once(':')?;
    Some((Timestamp(at.parse().ok()?), id.to_string()))
}

pub async fn show(State(state): State<SharedState>, caller: Caller, Path(id): Path<String>) -> ApiResult<Response> {
    let view = state.shards.view(&id).await?;
    authorize_session(&caller, &view)?;
    let mut session = view.to_json();
    session["agent_status"] = agent_status(&state, &view);
    Ok(axum::Json(json!({"session": session})).into_response())
}

/// The session's agent status as its members last saw it pushed (`queued`, `dispatching`,
/// `streaming`, `failed` with `error`), or from the log: `queued` while a user message is
/// unanswered, else `idle`.
fn agent_status(state: &SharedState, view: &SessionView) -> Value {
    if let Some(status) = state.streams.status(&view.record.id) {
        return status;
    }
    if view.dispatch.is_pending() && view.status == SessionStatus::Active {
        json!({"status": "queued"})
    } else {
        json!({"status": "idle"})
    }
}

pub async fn archive(State(state): State<SharedState>, caller: Caller, Path(id): Path<String>) -> ApiResult<Response> {
    let view = state.shards.view(&id).await?;
    authorize_session(&caller, &view)?;
    let archived = state.shards.archive_session(&id).await?;
    if let Err(error) = state
        .shards
        .archive()
        .record_archived(&archived.record.id, archived.updated_at)
        .await
    {
        tracing::warn!(session_id = %id, %error, "archived status not in the archive yet");
    }
    Ok(StatusCode::NO_CONTENT.into_response())
}

pub async fn mark_read(
    State(state): State<SharedState>,
    caller: Caller,
    Path(id): Path<String>,
    JsonBody(body): JsonBody,
) -> ApiResult<Response> {
    let fields: Map<String, Value> = serde_json::from_str(body.get())
        .map_err(|e| ApiError::bad_request("invalid_json", format!("body is not valid JSON: {e}")))?;
    let Some(user_id) = identity_field(&fields, "user_id")? else {
        return Err(ApiError::unprocessable("invalid_read_cursor", "user_id is required"));
    };
    let last_seq = match fields.get("last_seq") {
        Some(Value::Number(n)) => n
            .as_u64()
            .ok_or_else(|| ApiError::unprocessable("invalid_read_cursor", "last_seq must be a non-negative integer"))?,
        _ => {
            return Err(ApiError::unprocessable(
                "invalid_read_cursor",
                "last_seq must be a non-negative integer",
            ));
        }
    };
    if !caller.may_act_as(&user_id) {
        return Err(ApiError::forbidden("you may only move your own read cursor"));
    }
    let view = state.shards.move_read_cursor(&id, &user_id, last_seq).await?;
    Ok(axum::Json(json!({"session": view.to_json(), "read_seq": view.read_cursor.read_seq})).into_response())
}

pub async fn inbox(
    State(state): State<SharedState>,
    caller: Caller,
    Path(user_id): Path<String>,
) -> ApiResult<Response> {
    if !caller.may_act_as(&user_id) {
        return Err(ApiError::forbidden("you may only read your own inbox"));
    }
    let entries = inbox_entries(&state, &user_id).await?;
    Ok(axum::Json(json!({"inbox": entries})).into_response())
}

/// The user's sessions as inbox entries, newest activity first.
pub async fn inbox_entries(state: &SharedState, user_id: &str) -> ApiResult<Vec<Value>> {
    let filter = SessionFilter {
        user_id: Some(user_id.to_string()),
        limit: INBOX_LIMIT,
        ..SessionFilter::default()
    };
    let views = state.shards.archive().list_sessions(filter).await?;
    let mut views = state.shards.overlay(views).await?;
    views.sort_by(|a, b| {
        b.last_activity
            .at
            .cmp(&a.last_activity.at)
            .then_with(|| b.record.id.cmp(&a.record.id))
    });
    Ok(views.iter().map(SessionView::to_inbox_entry).collect())
}

/// Nesting depth of a JSON value (a scalar is 0, `{}` is 1).
pub fn json_depth(value: &Value) -> usize {
    match value {
        Value::Object(map) => 1 + map.values().map(json_depth).max().unwrap_or(0),
        Value::Array(items) => 1 + items.iter().map(json_depth).max().unwrap_or(0),
        _ => 0,
    }
}
