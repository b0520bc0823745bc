//! `/api/sessions/:id/cancel` and `/api/sessions/:id/regenerate`: the session's user steers the
//! agent's turn. The socket's `cancel` and `regenerate` events share this code.

use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use serde_json::value::RawValue;
use serde_json::{Map, Value, json};

use super::messages::{InvalidMessage, MessageInput, build_append};
use super::{ApiError, ApiResult, OptionalJsonBody, SharedState};
use crate::auth::Caller;
use crate::model::SessionView;
use crate::shard::AppendRequest;

/// Checks an optional id field of a cancel or regenerate body: absent/null, or a non-empty
/// string of at most 255 characters without control characters.
fn optional_id(fields: &Map<String, Value>, name: &str, code: &'static str) -> ApiResult<Option<String>> {
    match fields.get(name) {
        None | Some(Value::Null) => Ok(None),
        Some(Value::String(id)) if !id.is_empty() && id.chars().count() <= 255 && !id.chars().any(char::is_control) => {
            Ok(Some(id.clone()))
        }
        Some(_) => Err(ApiError::unprocessable(
            code,
            format!("{name} must be a non-empty string of at most 255 characters"),
        )),
    }
}

fn fields(body: &RawValue) -> ApiResult<Map<String, Value>> {
    serde_json::from_str(body.get())
        .map_err(|e| ApiError::bad_request("invalid_json", format!("body is not valid JSON: {e}")))
}

/// Parses a cancel body (`{}` or `{"dispatch_id"}`).
pub fn cancel_target(body: &RawValue) -> ApiResult<Option<String>> {
    optional_id(&fields(body)?, "dispatch_id", "invalid_cancel")
}

/// Cancels the session's turn for its user (authorized by the caller): the answer object
/// `{"cancelled", "dispatch_id"?}`.
pub async fn cancel_turn(state: &SharedState, view: &SessionView, dispatch_id: Option<String>) -> ApiResult<Value> {
    let cancelled = match &state.consensus {
        // The shard's leader dispatches the agent: the cancel goes there.
        Some(consensus) => {
            let shard = state.shards.shard_of(&view.record.id);
            crate::cluster::cancel_turn(
                consensus,
                &state.engine,
                shard,
                &view.record.id,
                dispatch_id,
                view.dispatch,
            )
            .await?
        }
        None => {
            state
                .engine
                .cancel(view.record.id.clone(), dispatch_id, view.dispatch)
                .await?
        }
    };
    Ok(match cancelled {
        Some(dispatch_id) => json!({"cancelled": true, "dispatch_id": &*dispatch_id}),
        None => json!({"cancelled": false}),
    })
}

pub async fn cancel(
    State(state): State<SharedState>,
    caller: Caller,
    Path(id): Path<String>,
    OptionalJsonBody(body): OptionalJsonBody,
) -> ApiResult<Response> {
    let dispatch_id = cancel_target(&body)?;
    let view = state.shards.view(&id).await?;
    if !caller.may_act_as(&view.record.user_id) {
        return Err(ApiError::forbidden("only the session's user may cancel its turn"));
    }
    let answer = cancel_turn(&state, &view, dispatch_id).await?;
    Ok(axum::Json(answer).into_response())
}

/// Builds the `regenerate` message a `POST …/regenerate` or a socket `regenerate` stores for the
/// session's user, from the body `{"message_id"?, "client_id"?}`.
pub fn regenerate_request(
    state: &SharedState,
    session_id: &str,
    user_id: &str,
    body: &RawValue,
) -> ApiResult<AppendRequest> {
    let fields = fields(body)?;
    let message_id = optional_id(&fields, "message_id", "invalid_message_format")?;
    let content = match &message_id {
        Some(id) => json!({"message_id": id}),
        None => json!({}),
    };
    let raw = |value: &Value| serde_json::value::to_raw_value(value).expect("values serialize");
    let (kind, content) = (raw(&json!("regenerate")), raw(&content));
    let client_id = fields.get("client_id").map(raw);
    let input = MessageInput {
        kind: Some(&kind),
        content: Some(&content),
        metadata: None,
        client_id: client_id.as_deref(),
        expected_seq: None,
    };
    build_append(
        session_id,
        user_id.to_string(),
        true,
        input,
        state.config.max_message_bytes,
        state.config.max_metadata_depth,
    )
    .map_err(|error| match error {
        InvalidMessage::Format(message) => ApiError::unprocessable("invalid_message_format", message),
        InvalidMessage::TooLarge(message) => ApiError::new(StatusCode::PAYLOAD_TOO_LARGE, "message_too_large", message),
    })
}

pub async fn regenerate(
    State(state): State<SharedState>,
    caller: Caller,
    Path(id): Path<String>,
    OptionalJsonBody(body): OptionalJsonBody,
) -> ApiResult<Response> {
    let view = state.shards.view(&id).await?;
    if !caller.may_act_as(&view.record.user_id) {
        return Err(ApiError::forbidden("only the session's user may regenerate a reply"));
    }
    let request = regenerate_request(&state, &view.record.id, &view.record.user_id, &body)?;
    let result = state.shards.append(request).await?;
    let mut answer = json!({"seq": result.record.message.seq, "message": &result.record.message});
    if result.deduplicated {
        answer["deduplicated"] = Value::Bool(true);
    }
    metrics::counter!("fleetlm_appends_total", "result" => if result.deduplicated { "deduplicated" } else { "appended" })
        .increment(1);
    Ok(axum::Json(answer).into_response())
}

/// User message kinds with a meaning for the agent engine (validated on every append).
pub const REGENERATE: &str = crate::agents::branch::REGENERATE;
pub const TOOL_RESULT: &str = "tool_result";

pub fn is_turn_kind(kind: &str) -> bool {
    kind == REGENERATE || kind == TOOL_RESULT
}

const TOOL_RESULT_STATES: &str = "output-available, output-error or approval-responded";

/// Checks the content of a `regenerate` or `tool_result` message; the error is a sentence for
/// the client.
pub fn check_turn_content(kind: &str, content: &RawValue) -> Result<(), String> {
    let content: Map<String, Value> =
        serde_json::from_str(content.get()).map_err(|_| "content must be a map".to_string())?;
    let id_field = |name: &str, required: bool| -> Result<(), String> {
        match content.get(name) {
            None | Some(Value::Null) if !required => Ok(()),
            Some(Value::String(id)) if !id.is_empty() && id.chars().count() <= 255 => Ok(()),
            _ => Err(format!(
                "{kind} content.{name} must be a non-empty string of at most 255 characters"
            )),
        }
    };
    if kind == REGENERATE {
        return id_field("message_id", false);
    }
    id_field("message_id", true)?;
    let parts = match content.get("parts") {
        Some(Value::Array(parts)) if !parts.is_empty() => parts,
        _ => return Err("tool_result content.parts must be a non-empty array of tool parts".into()),
    };
    for (index, part) in parts.iter().enumerate() {
        check_tool_part(part).map_err(|why| format!("tool_result content.parts[{index}]: {why}"))?;
    }
    Ok(())
}

/// One AI SDK tool UI part in the state a client moves it to.
fn check_tool_part(part: &Value) -> Result<(), String> {
    let Some(part) = part.as_object() else {
        return Err("must be an object".into());
    };
    let text = |name: &str| part.get(name).and_then(Value::as_str).filter(|t| !t.is_empty());
    match text("type") {
        Some(kind) if kind.starts_with("tool-") || kind == "dynamic-tool" => {}
        _ => return Err("type must be \"tool-<name>\" or \"dynamic-tool\"".into()),
    }
    if text("toolCallId").is_none() {
        return Err("toolCallId must be a non-empty string".into());
    }
    match part.get("state").and_then(Value::as_str) {
        Some("output-available") => {
            if !part.contains_key("output") {
                return Err("an output-available part needs output".into());
            }
        }
        Some("output-error") => {
            if !part.get("errorText").is_some_and(Value::is_string) {
                return Err("an output-error part needs errorText (a string)".into());
            }
        }
        Some("approval-responded") => {
            let approval = part.get("approval").and_then(Value::as_object);
            let valid = approval.is_some_and(|a| {
                a.get("id").and_then(Value::as_str).is_some_and(|id| !id.is_empty())
                    && a.get("approved").is_some_and(Value::is_boolean)
                    && a.get("reason").is_none_or(|r| r.is_string() || r.is_null())
            });
            if !valid {
                return Err(
                    "an approval-responded part needs approval {id (a string), approved (a boolean), reason?}".into(),
                );
            }
        }
        _ => return Err(format!("state must be {TOOL_RESULT_STATES}")),
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn check(kind: &str, content: Value) -> Result<(), String> {
        check_turn_content(kind, &serde_json::value::to_raw_value(&content).unwrap())
    }

    #[test]
    fn regenerate_content_is_empty_or_names_a_message() {
        assert!(check(REGENERATE, json!({})).is_ok());
        assert!(check(REGENERATE, json!({"message_id": "m1"})).is_ok());
        assert!(check(REGENERATE, json!({"message_id": ""})).is_err());
        assert!(check(REGENERATE, json!({"message_id": 7})).is_err());
    }

    #[test]
    fn tool_results_carry_tool_parts_in_a_new_state() {
        let ok = |part: Value| check(TOOL_RESULT, json!({"message_id": "ui-1", "parts": [part]}));
        assert!(
            ok(json!({"type": "tool-weather", "toolCallId": "c1", "state": "output-available", "output": {"t": 20}}))
                .is_ok()
        );
        assert!(ok(json!({"type": "dynamic-tool", "toolName": "x", "toolCallId": "c1", "state": "output-error", "errorText": "no"})).is_ok());
        assert!(
            ok(
                json!({"type": "tool-rm", "toolCallId": "c1", "state": "approval-responded",
            "approval": {"id": "a1", "approved": false, "reason": "no way"}})
            )
            .is_ok()
        );
        let why = ok(json!({"type": "tool-rm", "toolCallId": "c1", "state": "input-available"})).unwrap_err();
        assert_eq!(
            why,
            "tool_result content.parts[0]: state must be output-available, output-error or approval-responded"
        );
        assert!(ok(json!({"type": "text", "toolCallId": "c1", "state": "output-available", "output": 1})).is_err());
        assert!(ok(json!({"type": "tool-a", "state": "output-available", "output": 1})).is_err());
        assert!(ok(json!({"type": "tool-a", "toolCallId": "c", "state": "output-available"})).is_err());
        assert!(
            ok(json!({"type": "tool-a", "toolCallId": "c", "state": "approval-responded", "approval": {"id": "a"}}))
                .is_err()
        );
        assert!(check(TOOL_RESULT, json!({"parts": []})).is_err());
        assert!(check(TOOL_RESULT, json!({"message_id": "ui-1", "parts": []})).is_err());
    }
}
