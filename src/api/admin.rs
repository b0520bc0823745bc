//! `/api/admin/*`: operator views that need the API key (open mode: anyone on loopback).

use std::collections::HashMap;

use axum::extract::{Query, State};
use axum::response::{IntoResponse, Response};
use serde_json::json;

use super::{ApiError, ApiResult, SharedState, parse_count};
use crate::archive::DeadLetterQuery;
use crate::auth::Caller;

const MAX_DEAD_LETTER_PAGE: u64 = 500;

/// `GET /api/admin/dead_letters?after=<id>&session_id=<id>&limit=<n>`: rows the archive refused,
/// oldest first, with the archive's error. `next_cursor` continues the listing.
pub async fn dead_letters(
    State(state): State<SharedState>,
    caller: Caller,
    Query(query): Query<HashMap<String, String>>,
) -> ApiResult<Response> {
    if !caller.is_admin() {
        return Err(ApiError::forbidden("listing dead letters requires the API key"));
    }
    let limit = parse_count("limit", query.get("limit"), 100)?;
    if limit == 0 {
        return Err(ApiError::bad_request("invalid_parameter", "limit must be at least 1"));
    }
    let limit = limit.min(MAX_DEAD_LETTER_PAGE) as usize;
    let letters = state
        .shards
        .archive()
        .dead_letters(DeadLetterQuery {
            after_id: query.get("after").cloned(),
            session_id: query.get("session_id").cloned(),
            limit: limit + 1,
            ..DeadLetterQuery::default()
        })
        .await?;
    let has_more = letters.len() > limit;
    let page = &letters[..letters.len().min(limit)];
    let next_cursor = has_more.then(|| page.last().map(|l| l.id.clone())).flatten();
    Ok(axum::Json(json!({"dead_letters": page, "next_cursor": next_cursor})).into_response())
}

/// `GET /api/admin/cluster`: the cluster as this member sees it — members, which of them the
/// cluster recorded as joined, and per shard its role here, term, leader and log positions
/// (last, committed, applied; on a leader, how far each follower has the log) — plus each other
/// member's own view under `peers` (or why it did not answer). 404 on a single node.
/// `fleetlm cluster status` prints it as tables.
pub async fn cluster(State(state): State<SharedState>, caller: Caller) -> ApiResult<Response> {
    if !caller.is_admin() {
        return Err(ApiError::forbidden("the cluster status requires the API key"));
    }
    let Some(consensus) = &state.consensus else {
        return Err(ApiError::not_found(
            "not_a_cluster",
            "this server runs as a single node",
        ));
    };
    let mut status = crate::cluster::member_status(consensus);
    status["peers"] = serde_json::Value::Object(crate::cluster::peer_statuses(consensus).await);
    Ok(axum::Json(status).into_response())
}
