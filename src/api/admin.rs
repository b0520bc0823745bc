//! `/api/admin/*`: operator views that need the API key (open mode: anyone on loopback).

use std::collections::HashMap;

use axum::extract::{Path, Query, State};
use axum::http::StatusCode;
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

/// `POST /api/admin/cluster/members/{id}/forget`: the first step of replacing a member whose
/// storage is lost (docs/OPERATIONS.md, "Replacing a node"): every shard's group stops counting
/// it, and the cluster forgets it joined, so it may start again on empty storage. Refused while
/// the member answers (it must be stopped first). Idempotent; answers when done.
pub async fn forget_member(
    State(state): State<SharedState>,
    caller: Caller,
    Path(node): Path<String>,
) -> ApiResult<Response> {
    let (consensus, node) = member_change_target(&state, &caller, &node)?;
    let peers = crate::cluster::peer_statuses(consensus).await;
    if peers
        .get(&node.to_string())
        .is_some_and(|view| view.get("error").is_none())
    {
        return Err(ApiError::new(
            StatusCode::CONFLICT,
            "member_running",
            format!(
                "node {node} is running: stop it before forgetting it (only a member whose storage is lost is replaced)"
            ),
        ));
    }
    consensus.forget_member(node).await.map_err(member_change_failed)?;
    Ok(axum::Json(json!({
        "node_id": node,
        "status": "forgotten",
        "next": format!("start node {node} on empty storage, then run `fleetlm cluster add-node --node-id {node}`"),
    }))
    .into_response())
}

/// `POST /api/admin/cluster/members/{id}/add`: the last step of replacing a member: once it runs
/// again on empty storage, every shard's group sends it the log, then counts it as a voter
/// again. Idempotent; answers when done (up to a minute per shard while it catches up).
pub async fn add_member(
    State(state): State<SharedState>,
    caller: Caller,
    Path(node): Path<String>,
) -> ApiResult<Response> {
    let (consensus, node) = member_change_target(&state, &caller, &node)?;
    consensus.add_member(node).await.map_err(member_change_failed)?;
    // Every step is skipped for a member that already votes everywhere, running or not.
    let running = crate::cluster::peer_statuses(consensus)
        .await
        .get(&node.to_string())
        .is_some_and(|view| view.get("error").is_none());
    let mut answer = json!({"node_id": node, "status": "voter", "running": running});
    if !running {
        answer["note"] = json!(format!(
            "node {node} votes in every shard but does not answer: start it (if it refuses because its storage was lost, run forget-node first)"
        ));
    }
    Ok(axum::Json(answer).into_response())
}

fn member_change_target<'a>(
    state: &'a SharedState,
    caller: &Caller,
    node: &str,
) -> ApiResult<(&'a crate::consensus::Consensus, u64)> {
    if !caller.is_admin() {
        return Err(ApiError::forbidden(
            "changing the cluster's members requires the API key",
        ));
    }
    let Some(consensus) = &state.consensus else {
        return Err(ApiError::not_found(
            "not_a_cluster",
            "this server runs as a single node",
        ));
    };
    let node = node
        .parse::<u64>()
        .map_err(|_| ApiError::bad_request("invalid_parameter", "the member id must be a number"))?;
    if !consensus.members().contains(&node) {
        return Err(ApiError::not_found(
            "no_such_member",
            format!("node {node} is not in --cluster-peers"),
        ));
    }
    Ok((consensus, node))
}

fn member_change_failed(reason: String) -> ApiError {
    ApiError::new(StatusCode::CONFLICT, "member_change_failed", reason)
}
