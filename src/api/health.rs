//! `/health/live`, `/health/ready` and `/metrics`.

use std::sync::atomic::Ordering;
use std::time::Duration;

use axum::extract::State;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use serde_json::json;

use super::SharedState;

pub async fn live() -> Response {
    axum::Json(json!({"status": "live"})).into_response()
}

/// When the archive's current outage began, as `/health/ready` has seen it (from the first
/// failed check: a readiness probe's interval is the error).
#[derive(Default)]
pub struct ArchiveOutage {
    since: std::sync::Mutex<Option<std::time::Instant>>,
}

impl ArchiveOutage {
    /// Records a check of the archive (`problem`: why it failed); returns the problem and how
    /// long the outage has lasted.
    pub fn observe(&self, problem: Option<String>) -> Option<(String, Duration)> {
        let mut since = self.since.lock().expect("archive outage lock");
        match problem {
            None => {
                *since = None;
                None
            }
            Some(reason) => Some((reason, since.get_or_insert_with(std::time::Instant::now).elapsed())),
        }
    }
}

/// Ready when every shard is recovered and writable, no part keeps failing (restarting now, or
/// restarted 3 times within a minute: `crate::supervisor`), the archive answers (or has not
/// answered for less than `archive_grace`: then ready, with a warning), and we are not
/// draining; otherwise 503 with the reasons.
pub async fn ready(State(state): State<SharedState>) -> Response {
    let mut reasons = Vec::new();
    if state.draining.load(Ordering::Acquire) {
        reasons.push(json!({"component": "server", "reason": "draining"}));
    }
    for (shard, reason) in state.shards.not_ready() {
        reasons.push(json!({"component": "shard", "shard": shard, "reason": reason}));
    }
    archive_stalled_reasons(&state, &mut reasons);
    // The archive went back in time: the shard refuses new seqs until an operator decides.
    for (shard, reason) in state.shards.archive_regressions() {
        reasons.push(json!({"component": "archive_regressed", "shard": shard, "reason": reason}));
    }
    for failing in crate::supervisor::failing_parts() {
        reasons.push(json!({"component": "supervisor", "part": failing.part, "reason": failing.reason}));
    }
    if let Some(consensus) = &state.consensus {
        cluster_reasons(consensus, state.catch_up.as_deref(), &mut reasons);
    }
    let archive_problem = match tokio::time::timeout(Duration::from_secs(2), state.shards.archive().ping()).await {
        Ok(Ok(())) => None,
        Ok(Err(error)) => Some(error.to_string()),
        Err(_) => Some("no answer within 2 s".to_string()),
    };
    let mut warnings = Vec::new();
    if let Some((reason, down_for)) = state.archive_outage.observe(archive_problem) {
        let down_for_ms = down_for.as_millis() as u64;
        if down_for >= state.config.archive_grace {
            reasons.push(json!({"component": "archive", "reason": reason, "down_for_ms": down_for_ms}));
        } else {
            // Within the grace period: the node serves (appends go into the WAL), and taking
            // every node of a cluster out of a load balancer at once would help nobody.
            warnings.push(json!({"component": "archive", "reason": reason, "down_for_ms": down_for_ms}));
        }
    }
    if reasons.is_empty() && warnings.is_empty() {
        axum::Json(json!({"status": "ready"})).into_response()
    } else if reasons.is_empty() {
        axum::Json(json!({"status": "ready", "warnings": warnings})).into_response()
    } else {
        (
            StatusCode::SERVICE_UNAVAILABLE,
            axum::Json(json!({"status": "not_ready", "reasons": reasons})),
        )
            .into_response()
    }
}

/// Shards whose WAL entries the archive cannot take now (the flusher set them aside; the other
/// shards keep archiving), each with why.
fn archive_stalled_reasons(state: &SharedState, reasons: &mut Vec<serde_json::Value>) {
    for (shard, reason) in state.shards.wal().archive_stalled_shards() {
        reasons.push(json!({"component": "archive", "shard": shard, "reason": reason}));
    }
}

/// A cluster member is ready once it takes part, knows a leader for every shard, and has
/// applied everything it knows committed.
fn cluster_reasons(
    consensus: &crate::consensus::Consensus,
    catch_up: Option<&crate::cluster::CatchUp>,
    reasons: &mut Vec<serde_json::Value>,
) {
    if let Some(refusal) = consensus.refusal() {
        reasons.push(json!({"component": "cluster", "reason": refusal}));
        return;
    }
    for status in consensus.status() {
        if !status.voters.contains(&consensus.node_id()) {
            reasons.push(json!({"component": "cluster", "shard": status.shard, "reason": format!(
                "not a voter of the shard's group (a replaced member waits for `fleetlm cluster add-node --node-id {}`)",
                consensus.node_id()
            )}));
        } else if status.leader.is_none() {
            reasons.push(json!({"component": "cluster", "shard": status.shard, "reason": "no known leader"}));
        }
    }
    match catch_up.and_then(crate::cluster::CatchUp::behind) {
        None => reasons.push(json!({"component": "cluster", "reason": "comparing its log with its leaders'"})),
        Some(behind) => {
            for (shard, reason) in behind {
                reasons.push(json!({"component": "cluster", "shard": shard, "reason": reason}));
            }
        }
    }
}

/// Prometheus text; in token mode only for the API key (open mode: anyone on loopback).
pub async fn metrics(State(state): State<SharedState>, caller: crate::auth::Caller) -> Response {
    if !caller.is_admin() {
        return super::ApiError::forbidden("metrics require the API key").into_response();
    }
    metrics::gauge!("fleetlm_wal_disk_bytes").set(state.shards.wal().disk_bytes() as f64);
    let usage = state.shards.wal().usage();
    for (kept_for, bytes) in [
        ("flowing", usage.flowing),
        ("archive_stalled", usage.stalled_only),
        ("degraded", usage.degraded_only),
    ] {
        metrics::gauge!("fleetlm_wal_kept_bytes", "for" => kept_for).set(bytes as f64);
    }
    if let Some(rss) = crate::metrics::process_rss_bytes() {
        metrics::gauge!("fleetlm_process_rss_bytes").set(rss as f64);
    }
    if let Some(consensus) = &state.consensus {
        crate::cluster::record_metrics(consensus);
    }
    ([("content-type", "text/plain; version=0.0.4")], state.metrics.render()).into_response()
}
