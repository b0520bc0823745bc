//! The one error shape of the HTTP API: `{"error": "<sentence>", "code": "<snake_case>"}`, plus
//! `errors` for field validation, and the mapping from domain errors to it.

use axum::http::{HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use serde_json::{Value, json};

use crate::archive::ArchiveError;
use crate::shard::ShardError;

#[derive(Debug)]
pub struct ApiError {
    pub status: StatusCode,
    pub code: &'static str,
    pub message: String,
    pub extra: Option<(&'static str, Value)>,
    pub retry_after_secs: Option<u64>,
}

impl ApiError {
    pub fn new(status: StatusCode, code: &'static str, message: impl Into<String>) -> ApiError {
        ApiError {
            status,
            code,
            message: message.into(),
            extra: None,
            retry_after_secs: None,
        }
    }

    pub fn with(mut self, key: &'static str, value: Value) -> ApiError {
        self.extra = Some((key, value));
        self
    }

    pub fn not_found(code: &'static str, message: impl Into<String>) -> ApiError {
        ApiError::new(StatusCode::NOT_FOUND, code, message)
    }

    pub fn unprocessable(code: &'static str, message: impl Into<String>) -> ApiError {
        ApiError::new(StatusCode::UNPROCESSABLE_ENTITY, code, message)
    }

    pub fn bad_request(code: &'static str, message: impl Into<String>) -> ApiError {
        ApiError::new(StatusCode::BAD_REQUEST, code, message)
    }

    pub fn forbidden(message: impl Into<String>) -> ApiError {
        ApiError::new(StatusCode::FORBIDDEN, "forbidden", message)
    }

    /// 503 `overloaded`: a bound of this node is reached; retry in a second.
    pub fn overloaded(message: impl Into<String>) -> ApiError {
        let mut error = ApiError::new(StatusCode::SERVICE_UNAVAILABLE, "overloaded", message);
        error.retry_after_secs = Some(1);
        error
    }

    pub fn unavailable(message: impl Into<String>) -> ApiError {
        let mut error = ApiError::new(StatusCode::SERVICE_UNAVAILABLE, "unavailable", message);
        error.retry_after_secs = Some(1);
        error
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let mut body = json!({"error": self.message, "code": self.code});
        if let Some((key, value)) = self.extra {
            body[key] = value;
        }
        let mut response = (self.status, axum::Json(body)).into_response();
        if let Some(seconds) = self.retry_after_secs {
            response.headers_mut().insert("retry-after", HeaderValue::from(seconds));
        }
        response
    }
}

impl From<ArchiveError> for ApiError {
    fn from(error: ArchiveError) -> ApiError {
        if let ArchiveError::Regressed(regressions) = error {
            return ShardError::ArchiveRegressed(crate::archive::regression::describe(&regressions)).into();
        }
        tracing::warn!(%error, "archive error");
        ApiError::unavailable("the archive is unavailable; try again shortly")
    }
}

impl From<ShardError> for ApiError {
    fn from(error: ShardError) -> ApiError {
        match error {
            ShardError::NotFound => ApiError::not_found("session_not_found", "session not found"),
            ShardError::NotParticipant => ApiError::new(
                StatusCode::FORBIDDEN,
                "not_a_participant",
                "only the session's user or agent may do this",
            ),
            ShardError::Archived => ApiError::new(
                StatusCode::CONFLICT,
                "session_archived",
                "the session is archived; it accepts no messages",
            ),
            ShardError::SeqConflict { last_seq } => ApiError::new(
                StatusCode::CONFLICT,
                "seq_conflict",
                format!("expected_seq does not match the session's last seq {last_seq}"),
            )
            .with("last_seq", json!(last_seq)),
            ShardError::ClientIdConflict => ApiError::new(
                StatusCode::CONFLICT,
                "client_id_conflict",
                "client_id was already used in this session for a different message",
            ),
            ShardError::SessionExists => ApiError::new(
                StatusCode::CONFLICT,
                "session_exists",
                "a session with this id already exists",
            ),
            ShardError::Overloaded => {
                ApiError::overloaded("the server is over its write-ahead log budget; retry later")
            }
            ShardError::Archive(error) => error.into(),
            ShardError::StorageFailed(reason) => {
                tracing::error!(%reason, "storage failed");
                let mut error = ApiError::new(
                    StatusCode::SERVICE_UNAVAILABLE,
                    "storage_failed",
                    "the server's storage failed; the request may or may not have been stored: retry it with the same client_id once the server is back",
                );
                error.retry_after_secs = Some(5);
                error
            }
            ShardError::OutOfSpace(reason) => {
                tracing::warn!(%reason, "out of disk space");
                ApiError::new(
                    StatusCode::INSUFFICIENT_STORAGE,
                    "insufficient_storage",
                    "the server is out of disk space; this request was not stored, retry later",
                )
            }
            ShardError::Degraded(reason) => {
                tracing::warn!(%reason, "shard degraded");
                let mut error = ApiError::new(
                    StatusCode::SERVICE_UNAVAILABLE,
                    "shard_degraded",
                    "the session's storage shard is degraded and accepts no new messages until an operator repairs it",
                );
                error.retry_after_secs = Some(30);
                error
            }
            ShardError::ArchiveRegressed(reason) => {
                tracing::warn!(%reason, "archive regressed");
                let mut error = ApiError::new(
                    StatusCode::SERVICE_UNAVAILABLE,
                    "archive_regressed",
                    "the archive holds less of this session's shard than it was given (restored from an older backup?); the shard accepts no new messages until an operator decides (fleetlm archive check / accept)",
                );
                error.retry_after_secs = Some(30);
                error
            }
            ShardError::TooLarge { bytes, max } => ApiError::new(
                StatusCode::PAYLOAD_TOO_LARGE,
                "payload_too_large",
                format!("the request takes {bytes} bytes in the log; the limit is {max}"),
            ),
            ShardError::Unavailable(reason) => {
                tracing::warn!(%reason, "shard unavailable");
                ApiError::unavailable(format!("the session's shard is unavailable: {reason}"))
            }
            ShardError::NotLoaded | ShardError::NeedsCursorAt { .. } => {
                ApiError::unavailable("the request could not be completed; retry")
            }
            ShardError::NotLeader { .. } => {
                no_leader("the session's shard has no leader right now; retry shortly".into())
            }
            ShardError::NoLeader(reason) => no_leader(reason),
            ShardError::Superseded => no_leader("the shard's leadership changed; retry".into()),
        }
    }
}

/// Cluster: the shard has no leader (an election, or this node cannot reach the majority).
fn no_leader(message: String) -> ApiError {
    let mut error = ApiError::new(StatusCode::SERVICE_UNAVAILABLE, "no_leader", message);
    error.retry_after_secs = Some(1);
    error
}

pub type ApiResult<T> = Result<T, ApiError>;
