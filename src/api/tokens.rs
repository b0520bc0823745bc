//! `POST /api/tokens`: the API key holder mints a short-lived socket token for any identity
//! (what `fleetlm token` does on the command line), so an admin tool such as the web console can
//! watch a session or an inbox over the socket as its user. Token mode only.
//!
//! Architecture invariant: admin only; the secret never leaves `auth.rs`.

use axum::extract::State;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use serde_json::{Map, Value, json};

use super::{ApiError, ApiResult, JsonBody, SharedState};
use crate::auth::{AuthMode, Caller};

const DEFAULT_TTL_SECONDS: u64 = 3600;
const MAX_TTL_SECONDS: u64 = 24 * 3600;

pub async fn create(State(state): State<SharedState>, caller: Caller, JsonBody(body): JsonBody) -> ApiResult<Response> {
    let AuthMode::Token { rules, .. } = &state.auth else {
        return Err(ApiError::new(
            StatusCode::CONFLICT,
            "open_mode",
            "the server runs in open mode: sockets take user_id and need no token",
        ));
    };
    if caller != Caller::Admin {
        return Err(ApiError::forbidden("minting tokens requires the API key"));
    }
    let fields: Map<String, Value> = serde_json::from_str(body.get())
        .map_err(|e| ApiError::bad_request("invalid_json", format!("body is not valid JSON: {e}")))?;
    let sub = match fields.get("sub") {
        Some(Value::String(sub)) if !sub.is_empty() && sub.len() <= 255 && !sub.chars().any(char::is_control) => {
            sub.clone()
        }
        _ => {
            return Err(ApiError::unprocessable(
                "invalid_token_request",
                "sub must be a string of 1-255 characters without control characters",
            ));
        }
    };
    let ttl_seconds = match fields.get("ttl_seconds") {
        None | Some(Value::Null) => DEFAULT_TTL_SECONDS,
        Some(Value::Number(n)) => match n.as_u64() {
            Some(ttl) if (1..=MAX_TTL_SECONDS).contains(&ttl) => ttl,
            _ => {
                return Err(ApiError::unprocessable(
                    "invalid_token_request",
                    format!("ttl_seconds must be an integer from 1 to {MAX_TTL_SECONDS}"),
                ));
            }
        },
        Some(_) => {
            return Err(ApiError::unprocessable(
                "invalid_token_request",
                format!("ttl_seconds must be an integer from 1 to {MAX_TTL_SECONDS}"),
            ));
        }
    };
    let exp = state.clock.now_micros() / 1_000_000 + ttl_seconds as i64;
    let token = rules.mint(&sub, exp);
    Ok((
        StatusCode::CREATED,
        axum::Json(json!({"token": token, "sub": sub, "expires_at": exp})),
    )
        .into_response())
}
