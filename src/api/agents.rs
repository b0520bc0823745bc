//! `/api/agents`: the agent registry (CRUD with field validation; delete disables) and the
//! rotation of an agent's webhook signing secret. A signing secret is shown in exactly two
//! answers, the agent's creation and a rotation; never by a read, a list or an error.

use std::collections::{BTreeMap, HashMap};

use axum::extract::{Path, Query, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use serde_json::{Map, Value, json};

use super::{ApiError, ApiResult, JsonBody, OptionalJsonBody, SharedState};
use crate::agents::signing::{DEFAULT_GRACE_PERIOD_MS, MAX_GRACE_PERIOD_MS, SigningKeys};
use crate::auth::Caller;
use crate::model::{Agent, AgentStatus, HistoryMode, Timestamp};

type FieldErrors = BTreeMap<&'static str, Vec<String>>;

fn require_admin(caller: &Caller) -> ApiResult<()> {
    if caller.is_admin() {
        Ok(())
    } else {
        Err(ApiError::forbidden("agent management requires the API key"))
    }
}

fn validation_failed(errors: FieldErrors) -> ApiError {
    ApiError::unprocessable("validation_failed", "agent is invalid").with("errors", json!(errors))
}

fn agent_not_found(id: &str) -> ApiError {
    ApiError::not_found("agent_not_found", format!("agent {id} not found"))
}

pub async fn list(
    State(state): State<SharedState>,
    caller: Caller,
    Query(query): Query<HashMap<String, String>>,
) -> ApiResult<Response> {
    require_admin(&caller)?;
    let status = match query.get("status").map(String::as_str) {
        None => None,
        Some("enabled") => Some(AgentStatus::Enabled),
        Some("disabled") => Some(AgentStatus::Disabled),
        Some(_) => {
            return Err(ApiError::bad_request(
                "invalid_parameter",
                "status must be enabled or disabled",
            ));
        }
    };
    let agents = state.shards.archive().list_agents(status).await?;
    let agents: Vec<Value> = agents.iter().map(Agent::to_json).collect();
    Ok(axum::Json(json!({"agents": agents})).into_response())
}

pub async fn show(State(state): State<SharedState>, caller: Caller, Path(id): Path<String>) -> ApiResult<Response> {
    require_admin(&caller)?;
    let agent = state
        .shards
        .archive()
        .get_agent(&id)
        .await?
        .ok_or_else(|| agent_not_found(&id))?;
    Ok(axum::Json(json!({"agent": agent.to_json()})).into_response())
}

pub async fn create(State(state): State<SharedState>, caller: Caller, JsonBody(body): JsonBody) -> ApiResult<Response> {
    require_admin(&caller)?;
    let fields = agent_fields(&body)?;
    let now = Timestamp(state.clock.now_micros());
    let agent = build_agent(&fields, None, now).map_err(validation_failed)?;
    let secret = agent.signing.current.clone().expect("a new agent has a signing secret");
    match state.shards.archive().insert_agent(agent.clone()).await {
        Ok(()) => {
            state.registry.put(agent.clone());
            let answer = json!({"agent": agent.to_json(), "signing_secret": secret.reveal()});
            Ok((StatusCode::CREATED, axum::Json(answer)).into_response())
        }
        Err(crate::archive::ArchiveError::Conflict) => Err(validation_failed(BTreeMap::from([(
            "id",
            vec!["has already been taken".to_string()],
        )]))),
        Err(error) => Err(error.into()),
    }
}

pub async fn update(
    State(state): State<SharedState>,
    caller: Caller,
    Path(id): Path<String>,
    JsonBody(body): JsonBody,
) -> ApiResult<Response> {
    require_admin(&caller)?;
    let fields = agent_fields(&body)?;
    let existing = state
        .shards
        .archive()
        .get_agent(&id)
        .await?
        .ok_or_else(|| agent_not_found(&id))?;
    let now = Timestamp(state.clock.now_micros());
    let agent = build_agent(&fields, Some(&existing), now).map_err(validation_failed)?;
    state.shards.archive().update_agent(agent.clone()).await?;
    state.registry.put(agent.clone());
    Ok(axum::Json(json!({"agent": agent.to_json()})).into_response())
}

pub async fn disable(State(state): State<SharedState>, caller: Caller, Path(id): Path<String>) -> ApiResult<Response> {
    require_admin(&caller)?;
    let mut agent = state
        .shards
        .archive()
        .get_agent(&id)
        .await?
        .ok_or_else(|| agent_not_found(&id))?;
    agent.status = AgentStatus::Disabled;
    agent.updated_at = Timestamp(state.clock.now_micros());
    state.shards.archive().update_agent(agent.clone()).await?;
    state.registry.put(agent.clone());
    Ok(axum::Json(json!({"agent": agent.to_json(), "message": "Agent disabled"})).into_response())
}

/// `POST /api/agents/:id/signing-secret/rotate` `{"grace_period_ms"?}`: a new signing secret,
/// shown in this answer only; the one it replaces keeps signing calls (beside the new one) for
/// the grace period (default 24 h, at most 7 days, 0 = not at all). A rotation during another's
/// grace period ends that one: at most two secrets sign a call.
pub async fn rotate_signing_secret(
    State(state): State<SharedState>,
    caller: Caller,
    Path(id): Path<String>,
    OptionalJsonBody(body): OptionalJsonBody,
) -> ApiResult<Response> {
    require_admin(&caller)?;
    let grace_period_ms = rotation_grace_period_ms(&body)?;
    let archive = state.shards.archive();
    let existing = archive.get_agent(&id).await?.ok_or_else(|| agent_not_found(&id))?;
    let now = Timestamp(state.clock.now_micros());
    let signing = existing.signing.rotated(now, grace_period_ms);
    let expected = existing.signing.current.as_ref().map(|s| s.reveal().to_string());
    if !archive
        .set_agent_signing(&id, expected.as_deref(), signing.clone(), now)
        .await?
    {
        if archive.get_agent(&id).await?.is_none() {
            return Err(agent_not_found(&id));
        }
        return Err(ApiError::new(
            StatusCode::CONFLICT,
            "rotation_conflict",
            "the signing secret was rotated by another request meanwhile; rotate again if you need a secret you know",
        ));
    }
    let secret = signing.current.clone().expect("a rotation makes a secret");
    let agent = Agent {
        signing,
        updated_at: now,
        ..existing
    };
    state.registry.put(agent.clone());
    let answer = json!({
        "agent": agent.to_json(),
        "signing_secret": secret.reveal(),
        "previous_secret_expires_at": agent.signing.previous_expires_at,
    });
    Ok(axum::Json(answer).into_response())
}

/// The rotation's body: `{}` or `{"grace_period_ms": 0..=604800000}`, nothing else.
fn rotation_grace_period_ms(body: &serde_json::value::RawValue) -> ApiResult<u64> {
    let fields: Map<String, Value> = serde_json::from_str(body.get())
        .map_err(|e| ApiError::bad_request("invalid_json", format!("body is not valid JSON: {e}")))?;
    let mut errors: BTreeMap<String, Vec<String>> = BTreeMap::new();
    for name in fields.keys().filter(|name| *name != "grace_period_ms") {
        errors
            .entry(name.clone())
            .or_default()
            .push("is not a field of a rotation (only grace_period_ms is)".into());
    }
    let grace_period_ms = match fields.get("grace_period_ms") {
        None | Some(Value::Null) => DEFAULT_GRACE_PERIOD_MS,
        Some(Value::Number(n)) if n.as_u64().is_some_and(|ms| ms <= MAX_GRACE_PERIOD_MS) => {
            n.as_u64().expect("checked")
        }
        Some(_) => {
            errors
                .entry("grace_period_ms".into())
                .or_default()
                .push(format!("must be an integer between 0 and {MAX_GRACE_PERIOD_MS}"));
            DEFAULT_GRACE_PERIOD_MS
        }
    };
    if errors.is_empty() {
        Ok(grace_period_ms)
    } else {
        Err(ApiError::unprocessable("validation_failed", "rotation is invalid").with("errors", json!(errors)))
    }
}

/// `GET /api/agents/:id/dispatches`: the agent's last finished dispatches (outcome, error,
/// latency), newest first, from memory since the server started.
pub async fn dispatches(
    State(state): State<SharedState>,
    caller: Caller,
    Path(id): Path<String>,
) -> ApiResult<Response> {
    admin_and_known_agent(&state, &caller, &id)?;
    let dispatches = state.recent_dispatches.of_agent(&id);
    Ok(axum::Json(json!({"dispatches": dispatches})).into_response())
}

/// `GET /api/agents/:id/deliveries`: the agent's last webhook deliveries (one per HTTP attempt:
/// status, latency, error; never its URL or headers), newest first, from memory.
pub async fn deliveries(
    State(state): State<SharedState>,
    caller: Caller,
    Path(id): Path<String>,
) -> ApiResult<Response> {
    admin_and_known_agent(&state, &caller, &id)?;
    let deliveries = state.recent_dispatches.deliveries_of(&id);
    Ok(axum::Json(json!({"deliveries": deliveries})).into_response())
}

/// The API key's caller asking about an agent the registry knows.
fn admin_and_known_agent(state: &SharedState, caller: &Caller, id: &str) -> ApiResult<()> {
    require_admin(caller)?;
    if state.registry.get(id).is_none() {
        return Err(agent_not_found(id));
    }
    Ok(())
}

/// The object under `"agent"` (or the body itself when it is not nested).
fn agent_fields(body: &serde_json::value::RawValue) -> ApiResult<Map<String, Value>> {
    let mut value: Map<String, Value> = serde_json::from_str(body.get())
        .map_err(|e| ApiError::bad_request("invalid_json", format!("body is not valid JSON: {e}")))?;
    match value.remove("agent") {
        Some(Value::Object(fields)) => Ok(fields),
        Some(_) => Err(ApiError::unprocessable("validation_failed", "agent must be an object")),
        None => Ok(value),
    }
}

/// Builds the agent from `fields` over `existing` (update) or defaults (create), collecting every
/// field error.
fn build_agent(fields: &Map<String, Value>, existing: Option<&Agent>, now: Timestamp) -> Result<Agent, FieldErrors> {
    let mut errors = FieldErrors::new();
    let mut error = |field: &'static str, message: &str| errors.entry(field).or_default().push(message.to_string());

    if fields.contains_key("signing_secret") {
        error(
            "signing_secret",
            "is made by FleetLM; rotate it with POST /api/agents/{id}/signing-secret/rotate",
        );
    }

    let id = match (fields.get("id"), existing) {
        (Some(Value::String(id)), Some(existing)) if *id != existing.id => {
            error("id", "cannot be changed");
            existing.id.clone()
        }
        (_, Some(existing)) => existing.id.clone(),
        (Some(Value::String(id)), None) if id.trim().is_empty() => {
            error("id", "can't be blank");
            String::new()
        }
        (Some(Value::String(id)), None) => {
            if !crate::ids::is_valid_client_chosen_id(id) {
                error("id", "must be 1-255 characters of A-Z a-z 0-9 . _ : @ -");
            }
            id.clone()
        }
        (Some(_), None) => {
            error("id", "must be a string");
            String::new()
        }
        (None, None) => {
            error("id", "can't be blank");
            String::new()
        }
    };

    let mut text = |field: &'static str, current: Option<&str>, default: Option<&str>| -> String {
        match fields.get(field) {
            Some(Value::String(value)) if value.trim().is_empty() => {
                error(field, "can't be blank");
                String::new()
            }
            Some(Value::String(value)) if value.len() > 2048 => {
                error(field, "must be at most 2048 characters");
                String::new()
            }
            Some(Value::String(value)) => value.clone(),
            Some(Value::Null) | None => match current.or(default) {
                Some(value) => value.to_string(),
                None => {
                    error(field, "can't be blank");
                    String::new()
                }
            },
            Some(_) => {
                error(field, "must be a string");
                String::new()
            }
        }
    };
    let name = text("name", existing.map(|a| a.name.as_str()), None);
    let origin_url = text("origin_url", existing.map(|a| a.origin_url.as_str()), None);
    let webhook_path = text(
        "webhook_path",
        existing.map(|a| a.webhook_path.as_str()),
        Some("/webhook"),
    );
    let mode_text = text(
        "message_history_mode",
        existing.map(|a| a.message_history_mode.as_str()),
        Some("tail"),
    );

    if !origin_url.is_empty()
        && let Err(problem) = check_origin_url(&origin_url)
    {
        error("origin_url", &problem);
    }
    if !webhook_path.is_empty() && (!webhook_path.starts_with('/') || webhook_path.chars().any(char::is_whitespace)) {
        error("webhook_path", "must start with / and contain no whitespace");
    } else if !webhook_path.is_empty()
        && check_origin_url(&origin_url).is_ok()
        && url::Url::parse(&webhook_url(&origin_url, &webhook_path)).is_err()
    {
        error("webhook_path", "does not make a valid URL with origin_url");
    }
    let message_history_mode = match mode_text.as_str() {
        "tail" => HistoryMode::Tail,
        "last" => HistoryMode::Last,
        "entire" => HistoryMode::Entire,
        _ => {
            error("message_history_mode", "must be one of: tail, last, entire");
            HistoryMode::Tail
        }
    };

    let mut integer = |field: &'static str, current: Option<u32>, default: u32, min: u64, max: u64| -> u32 {
        match fields.get(field) {
            None | Some(Value::Null) => current.unwrap_or(default),
            Some(Value::Number(n)) => match n.as_u64() {
                Some(v) if v < min => {
                    error(field, &format!("must be greater than or equal to {min}"));
                    default
                }
                Some(v) if v > max => {
                    error(field, &format!("must be less than or equal to {max}"));
                    default
                }
                Some(v) => v as u32,
                None => {
                    error(field, &format!("must be an integer between {min} and {max}"));
                    default
                }
            },
            Some(_) => {
                error(field, "must be an integer");
                default
            }
        }
    };
    let message_history_limit = integer(
        "message_history_limit",
        existing.map(|a| a.message_history_limit),
        50,
        1,
        10_000,
    );
    let timeout_ms = integer("timeout_ms", existing.map(|a| a.timeout_ms), 30_000, 1, 600_000);
    let debounce_window_ms = integer(
        "debounce_window_ms",
        existing.map(|a| a.debounce_window_ms),
        500,
        0,
        60_000,
    );

    let headers = match fields.get("headers") {
        None | Some(Value::Null) => existing.map(|a| a.headers.clone()).unwrap_or_default(),
        Some(Value::Object(map)) => {
            let mut headers = BTreeMap::new();
            for (name, value) in map {
                match value {
                    Value::String(_) if is_signature_header(name) => error(
                        "headers",
                        &format!("{name} is set by FleetLM on every call (the webhook's signature)"),
                    ),
                    Value::String(value) if is_header_name(name) && is_header_value(value) => {
                        headers.insert(name.to_ascii_lowercase(), value.clone());
                    }
                    Value::String(_) => error("headers", &format!("{name} is not a valid HTTP header")),
                    _ => error("headers", "must be an object of string values"),
                }
            }
            headers
        }
        Some(_) => {
            error("headers", "must be an object of string values");
            BTreeMap::new()
        }
    };
    let http2 = match fields.get("http2") {
        None | Some(Value::Null) => existing.is_some_and(|a| a.http2),
        Some(Value::Bool(http2)) => *http2,
        Some(_) => {
            error("http2", "must be a boolean");
            false
        }
    };
    let status = match fields.get("status") {
        None | Some(Value::Null) => existing.map_or(AgentStatus::Enabled, |a| a.status),
        Some(Value::String(s)) if s == "enabled" => AgentStatus::Enabled,
        Some(Value::String(s)) if s == "disabled" => AgentStatus::Disabled,
        Some(_) => {
            error("status", "must be one of: enabled, disabled");
            AgentStatus::Enabled
        }
    };
    if !errors.is_empty() {
        return Err(errors);
    }
    Ok(Agent {
        id,
        name,
        origin_url,
        webhook_path,
        message_history_mode,
        message_history_limit,
        timeout_ms,
        debounce_window_ms,
        headers,
        http2,
        status,
        inserted_at: existing.map_or(now, |a| a.inserted_at),
        updated_at: now,
        signing: existing.map_or_else(|| SigningKeys::fresh(now), |a| a.signing.clone()),
    })
}

/// The URL a dispatch posts to (the same joining as the webhook client).
pub fn webhook_url(origin_url: &str, webhook_path: &str) -> String {
    format!("{}{}", origin_url.trim_end_matches('/'), webhook_path)
}

/// An absolute http(s) URL with a host, as the `url` crate (WHATWG rules) parses it; the
/// problem in words otherwise.
fn check_origin_url(text: &str) -> Result<(), String> {
    if text.chars().any(|c| c.is_whitespace() || c.is_control()) {
        return Err("must be an absolute http(s) URL without whitespace".into());
    }
    let parsed = url::Url::parse(text).map_err(|e| format!("must be an absolute http(s) URL ({e})"))?;
    if !matches!(parsed.scheme(), "http" | "https") {
        return Err("must be an absolute http(s) URL".into());
    }
    if parsed.host_str().is_none_or(str::is_empty) {
        return Err("must be an absolute http(s) URL with a host".into());
    }
    if parsed.query().is_some() || parsed.fragment().is_some() {
        return Err("must not carry a query or fragment (put them in webhook_path)".into());
    }
    Ok(())
}

fn is_header_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 256
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&b))
}

/// The Standard Webhooks headers FleetLM sets itself: an agent's own `headers` may not name them.
fn is_signature_header(name: &str) -> bool {
    ["webhook-id", "webhook-timestamp", "webhook-signature"]
        .iter()
        .any(|reserved| name.eq_ignore_ascii_case(reserved))
}

fn is_header_value(value: &str) -> bool {
    value.len() <= 8192 && value.bytes().all(|b| b == b'\t' || (b >= 0x20 && b != 0x7f))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn fields(value: Value) -> Map<String, Value> {
        value.as_object().cloned().unwrap()
    }

    #[test]
    fn defaults_fill_optional_fields() {
        let agent = build_agent(
            &fields(json!({"id": "a1", "name": "Echo", "origin_url": "http://127.0.0.1:9000"})),
            None,
            Timestamp(1),
        )
        .unwrap();
        assert_eq!(agent.webhook_path, "/webhook");
        assert_eq!(agent.message_history_mode, HistoryMode::Tail);
        assert_eq!(
            (agent.message_history_limit, agent.timeout_ms, agent.debounce_window_ms),
            (50, 30_000, 500)
        );
        assert_eq!(agent.status, AgentStatus::Enabled);
        assert!(!agent.http2);
    }

    #[test]
    fn http2_is_a_boolean_kept_on_update_unless_given() {
        let created = build_agent(
            &fields(json!({"id": "a1", "name": "A", "origin_url": "http://127.0.0.1:9000", "http2": true})),
            None,
            Timestamp(1),
        )
        .unwrap();
        assert!(created.http2);
        let renamed = build_agent(&fields(json!({"name": "B"})), Some(&created), Timestamp(2)).unwrap();
        assert!(renamed.http2);
        let off = build_agent(&fields(json!({"http2": false})), Some(&created), Timestamp(3)).unwrap();
        assert!(!off.http2);
        for bad in [json!("true"), json!(1), json!([]), json!({})] {
            let errors = build_agent(&fields(json!({"http2": bad})), Some(&created), Timestamp(4)).unwrap_err();
            assert_eq!(errors["http2"], vec!["must be a boolean".to_string()]);
        }
    }

    #[test]
    fn origin_urls_are_parsed_not_pattern_matched() {
        for bad in [
            "http://host:99999",
            "http://[::1",
            "http://exa mple.com",
            "http://:80",
            "https://",
            "mailto:x@example.com",
            "http://host:port/",
        ] {
            let errors = build_agent(
                &fields(json!({"id": "a1", "name": "A", "origin_url": bad})),
                None,
                Timestamp(1),
            )
            .unwrap_err();
            assert!(errors.contains_key("origin_url"), "{bad} was accepted");
        }
        for good in [
            "http://127.0.0.1:9000",
            "https://bot.example.com/base/",
            "http://[::1]:8080",
        ] {
            let agent = build_agent(
                &fields(json!({"id": "a1", "name": "A", "origin_url": good, "webhook_path": "/hook?key=k"})),
                None,
                Timestamp(1),
            );
            assert!(agent.is_ok(), "{good} was refused: {:?}", agent.err());
        }
    }

    #[test]
    fn every_bad_field_is_reported() {
        let errors = build_agent(
            &fields(
                json!({"id": "bad id", "name": " ", "origin_url": "ftp://x", "webhook_path": "hook",
                "message_history_mode": "all", "message_history_limit": 0, "timeout_ms": 600_001,
                "debounce_window_ms": -1, "headers": {"x": 1}, "http2": "yes", "status": "paused"}),
            ),
            None,
            Timestamp(1),
        )
        .unwrap_err();
        let fields: Vec<_> = errors.keys().copied().collect();
        assert_eq!(
            fields,
            vec![
                "debounce_window_ms",
                "headers",
                "http2",
                "id",
                "message_history_limit",
                "message_history_mode",
                "name",
                "origin_url",
                "status",
                "timeout_ms",
                "webhook_path"
            ]
        );
    }
}
