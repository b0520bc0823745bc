//! The HTTP API (`/api`, `/health`, `/metrics`; the web console's `/` and `/assets/*` come from
//! `crate::console`): routing, request ids, CORS, body limits, auth
//! extraction. Handlers live in one file per resource.
//!
//! Architecture invariant: handlers validate everything the archive or the log would refuse
//! before anything is written, and never write anywhere but through the shards (sessions,
//! messages, cursors) or the archive (agents).

mod admin;
pub mod agents;
mod byte_range;
mod error;
mod files;
mod health;
pub mod messages;
pub mod sessions;
mod tokens;
pub mod turns;

use std::sync::Arc;
use std::sync::atomic::AtomicBool;

use axum::extract::{FromRequest, FromRequestParts, Request, State};
use axum::http::{HeaderMap, HeaderValue, Method, StatusCode, request::Parts};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Router, body::Bytes};
use metrics_exporter_prometheus::PrometheusHandle;
use serde_json::value::RawValue;

pub use error::{ApiError, ApiResult};

use crate::auth::{AuthError, AuthMode, Caller};
use crate::config::Config;
use crate::shard::Shards;

pub struct AppState {
    pub shards: Shards,
    pub config: Arc<Config>,
    pub auth: AuthMode,
    pub metrics: PrometheusHandle,
    pub draining: Arc<AtomicBool>,
    pub clock: Arc<dyn crate::clock::Clock>,
    pub hub: Arc<crate::hub::Hub>,
    pub registry: Arc<crate::agents::AgentRegistry>,
    pub streams: Arc<crate::agents::LiveStreams>,
    /// Cancels turns (the agent engine's scheduler).
    pub engine: crate::agents::EngineHandle,
    pub recent_dispatches: Arc<crate::agents::RecentDispatches>,
    pub sockets: Arc<crate::gateway::SocketCounts>,
    /// Turns true when the server starts draining; sockets then close with 1012.
    pub shutdown: tokio::sync::watch::Receiver<bool>,
    /// Cluster mode: this member's consensus groups.
    pub consensus: Option<Arc<crate::consensus::Consensus>>,
    /// Cluster mode: the shards this member has not caught up on.
    pub catch_up: Option<Arc<crate::cluster::CatchUp>>,
    /// The archive's current outage, as readiness checks have seen it.
    pub archive_outage: health::ArchiveOutage,
    /// Checks the signatures of file URLs given to agents (`file_urls`).
    pub files: Arc<crate::file_urls::FileAccess>,
}

pub type SharedState = Arc<AppState>;

pub fn router(state: SharedState) -> Router {
    let api = Router::new()
        .route("/agents", get(agents::list).post(agents::create))
        .route(
            "/agents/{id}",
            get(agents::show)
                .put(agents::update)
                .patch(agents::update)
                .delete(agents::disable),
        )
        .route("/agents/{id}/dispatches", get(agents::dispatches))
        .route("/agents/{id}/deliveries", get(agents::deliveries))
        .route(
            "/agents/{id}/signing-secret/rotate",
            post(agents::rotate_signing_secret),
        )
        .route("/tokens", post(tokens::create))
        .route("/sessions", get(sessions::list).post(sessions::create))
        .route("/sessions/{id}", get(sessions::show).delete(sessions::archive))
        .route("/sessions/{id}/messages", get(messages::list).post(messages::append))
        .route("/sessions/{id}/files", post(files::upload))
        .route("/sessions/{id}/files/{file_id}", get(files::download))
        .route("/sessions/{id}/read", post(sessions::mark_read))
        .route("/sessions/{id}/cancel", post(turns::cancel))
        .route("/sessions/{id}/regenerate", post(turns::regenerate))
        .route("/users/{user_id}/inbox", get(sessions::inbox))
        .route("/admin/dead_letters", get(admin::dead_letters))
        .route("/admin/cluster", get(admin::cluster))
        .route("/admin/cluster/members/{id}/forget", post(admin::forget_member))
        .route("/admin/cluster/members/{id}/add", post(admin::add_member));
    Router::new()
        .nest("/api", api)
        .route("/health/live", get(health::live))
        .route("/health/ready", get(health::ready))
        .route("/metrics", get(health::metrics))
        .route("/socket/websocket", get(crate::gateway::upgrade))
        .merge(crate::console::router())
        .fallback(not_found)
        .method_not_allowed_fallback(method_not_allowed)
        .layer(axum::middleware::from_fn_with_state(state.clone(), cors))
        .layer(axum::middleware::from_fn(request_id))
        .layer(axum::extract::DefaultBodyLimit::disable())
        .with_state(state)
}

async fn not_found() -> ApiError {
    ApiError::not_found("not_found", "no such route")
}

async fn method_not_allowed() -> ApiError {
    ApiError::new(
        StatusCode::METHOD_NOT_ALLOWED,
        "method_not_allowed",
        "method not allowed on this route",
    )
}

/// Echoes a sane incoming `x-request-id`, or makes one, on every response.
async fn request_id(request: Request, next: Next) -> Response {
    let incoming = request
        .headers()
        .get("x-request-id")
        .and_then(|v| v.to_str().ok())
        .filter(|v| !v.is_empty() && v.len() <= 128 && v.bytes().all(|b| b.is_ascii_graphic()))
        .map(str::to_owned);
    let id = incoming.unwrap_or_else(crate::ids::generate_id);
    let method = request.method().clone();
    let path = request.uri().path().to_owned();
    let mut response = next.run(request).await;
    tracing::debug!(request_id = %id, %method, %path, status = response.status().as_u16(), "http request");
    if let Ok(value) = HeaderValue::from_str(&id) {
        response.headers_mut().insert("x-request-id", value);
    }
    response
}

/// Origins and CORS: a request whose `Origin` is not allowed (`allowed_origins`) is refused
/// with 403 — API calls and WebSocket upgrades alike, so a web page cannot drive the server
/// (simple requests need no preflight). Preflights are answered with 204; responses to allowed
/// origins are marked. Requests without an `Origin` (curl, servers) pass.
async fn cors(State(state): State<SharedState>, request: Request, next: Next) -> Response {
    let origin = request.headers().get("origin").cloned();
    let allowed = match &origin {
        None => None,
        Some(origin) => {
            let permitted = origin
                .to_str()
                .is_ok_and(|text| state.config.allowed_origins.allows(text));
            if !permitted {
                return ApiError::new(
                    StatusCode::FORBIDDEN,
                    "origin_not_allowed",
                    "this origin is not allowed; see the allowed_origins setting",
                )
                .into_response();
            }
            Some(origin.clone())
        }
    };
    let is_preflight =
        request.method() == Method::OPTIONS && request.headers().contains_key("access-control-request-method");
    if is_preflight {
        let mut response = StatusCode::NO_CONTENT.into_response();
        if let Some(origin) = allowed {
            let requested_headers = request.headers().get("access-control-request-headers").cloned();
            let headers = response.headers_mut();
            headers.insert("access-control-allow-origin", origin);
            headers.insert(
                "access-control-allow-methods",
                HeaderValue::from_static("GET, POST, PUT, PATCH, DELETE, OPTIONS"),
            );
            if let Some(requested) = requested_headers {
                headers.insert("access-control-allow-headers", requested);
            }
            headers.insert("access-control-max-age", HeaderValue::from_static("600"));
            headers.insert("vary", HeaderValue::from_static("origin"));
        }
        return response;
    }
    let mut response = next.run(request).await;
    if let Some(origin) = allowed {
        response.headers_mut().insert("access-control-allow-origin", origin);
        response.headers_mut().insert(
            "access-control-expose-headers",
            HeaderValue::from_static("x-request-id, retry-after"),
        );
        response
            .headers_mut()
            .insert("vary", HeaderValue::from_static("origin"));
    }
    response
}

impl FromRequestParts<SharedState> for Caller {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &SharedState) -> Result<Caller, ApiError> {
        let bearer = bearer_token(&parts.headers);
        let now_secs = state.clock.now_micros() / 1_000_000;
        state.auth.caller(bearer, now_secs).map_err(|error| {
            let message = match error {
                AuthError::Missing => "authorization required: send Authorization: Bearer <token>",
                AuthError::Invalid => "invalid credentials",
                AuthError::Expired => "token expired",
                AuthError::NotYetValid => "token not valid yet (nbf)",
            };
            ApiError::new(StatusCode::UNAUTHORIZED, "unauthorized", message)
        })
    }
}

fn bearer_token(headers: &HeaderMap) -> Option<&str> {
    let value = headers.get("authorization")?.to_str().ok()?;
    let (scheme, token) = value.split_once(' ')?;
    scheme.eq_ignore_ascii_case("bearer").then(|| token.trim())
}

/// A request body read up to the configured limit (413 beyond it) and checked to be a JSON
/// object (400 `invalid_json` otherwise). Fields are parsed by each handler from the raw text.
pub struct JsonBody(pub Box<RawValue>);

impl FromRequest<SharedState> for JsonBody {
    type Rejection = ApiError;

    async fn from_request(request: Request, state: &SharedState) -> Result<JsonBody, ApiError> {
        let limit = state.config.max_body_bytes;
        let bytes: Bytes = axum::body::to_bytes(request.into_body(), limit).await.map_err(|_| {
            ApiError::new(
                StatusCode::PAYLOAD_TOO_LARGE,
                "body_too_large",
                format!("request body exceeds the limit of {limit} bytes"),
            )
        })?;
        let text =
            std::str::from_utf8(&bytes).map_err(|_| ApiError::bad_request("invalid_json", "body is not UTF-8"))?;
        let raw: Box<RawValue> = serde_json::from_str(text)
            .map_err(|e| ApiError::bad_request("invalid_json", format!("body is not valid JSON: {e}")))?;
        if !raw.get().starts_with('{') {
            return Err(ApiError::bad_request("invalid_json", "body must be a JSON object"));
        }
        Ok(JsonBody(raw))
    }
}

/// Like `JsonBody`, but an empty body (or only whitespace) reads as `{}`.
pub struct OptionalJsonBody(pub Box<RawValue>);

impl FromRequest<SharedState> for OptionalJsonBody {
    type Rejection = ApiError;

    async fn from_request(request: Request, state: &SharedState) -> Result<OptionalJsonBody, ApiError> {
        let limit = state.config.max_body_bytes;
        let bytes: Bytes = axum::body::to_bytes(request.into_body(), limit).await.map_err(|_| {
            ApiError::new(
                StatusCode::PAYLOAD_TOO_LARGE,
                "body_too_large",
                format!("request body exceeds the limit of {limit} bytes"),
            )
        })?;
        let text =
            std::str::from_utf8(&bytes).map_err(|_| ApiError::bad_request("invalid_json", "body is not UTF-8"))?;
        let text = if text.trim().is_empty() { "{}" } else { text };
        let raw: Box<RawValue> = serde_json::from_str(text)
            .map_err(|e| ApiError::bad_request("invalid_json", format!("body is not valid JSON: {e}")))?;
        if !raw.get().starts_with('{') {
            return Err(ApiError::bad_request("invalid_json", "body must be a JSON object"));
        }
        Ok(OptionalJsonBody(raw))
    }
}

/// Parses a query parameter as a non-negative integer (400 `invalid_parameter` otherwise).
pub fn parse_count(name: &str, value: Option<&String>, default: u64) -> ApiResult<u64> {
    match value {
        None => Ok(default),
        Some(text) => text
            .parse::<u64>()
            .map_err(|_| ApiError::bad_request("invalid_parameter", format!("{name} must be a non-negative integer"))),
    }
}
