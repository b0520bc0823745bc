//! One dispatch: the webhook request (history, headers), the streamed reply (forwarded chunk by
//! chunk, assembled, stored), and retries with capped, jittered exponential backoff.
//!
//! This file runs a dispatch to its end (attempts, retries, the lease checks of cluster mode);
//! `turn.rs` opens its turn and builds the history, `call.rs` makes one HTTP attempt, and
//! `messages.rs` turns the reply's lines into stored messages.

mod call;
mod messages;
mod turn;

use std::sync::Arc;
use std::time::{Duration, Instant};

use rand::Rng;
use serde_json::json;

use super::cancel::DispatchControl;
use super::{EngineContext, status};
use crate::shard::ShardError;
use call::{Turn, call};
use turn::{NotOpened, open_turn};

pub struct DispatchJob {
    pub session_id: Arc<str>,
    pub agent_id: String,
    pub dispatch_id: Arc<str>,
    /// Cluster: the leadership term of the session's shard this node dispatches under; the
    /// reply is stored only while that term lasts (a new leader dispatches the turn itself).
    pub leader_term: Option<u64>,
    /// Cancels the dispatch (watched at every wait).
    pub control: Arc<DispatchControl>,
}

impl DispatchJob {
    /// The same dispatch, running under its turn's id.
    fn for_turn(&self, turn_id: Arc<str>) -> DispatchJob {
        DispatchJob {
            session_id: self.session_id.clone(),
            agent_id: self.agent_id.clone(),
            dispatch_id: turn_id,
            leader_term: self.leader_term,
            control: self.control.clone(),
        }
    }
}

/// How a dispatch ended: the user messages it covered, and the error if it failed.
pub struct DispatchResult {
    pub through_seq: u64,
    pub error: Option<String>,
    /// The log showed no unanswered user message: the agent was not called and nothing is
    /// recorded (a stale request, e.g. from a rescan that raced a dispatch).
    pub nothing_owed: bool,
    /// Cluster: this node stopped leading the session's shard; the new leader dispatches the
    /// turn. Nothing more is stored or recorded by this dispatch.
    pub superseded: bool,
}

impl DispatchResult {
    pub fn failed(error: impl Into<String>) -> DispatchResult {
        DispatchResult {
            through_seq: 0,
            error: Some(error.into()),
            nothing_owed: false,
            superseded: false,
        }
    }
}

enum CallError {
    /// Worth another attempt (transport, timeouts, 408/425/429/5xx), after at least `retry_after`.
    Retryable {
        reason: String,
        retry_after: Option<Duration>,
    },
    Fatal(String),
    /// The session's user cancelled the dispatch: the request was closed and what was
    /// assembled of the message streaming then is stored as aborted. Never retried.
    Cancelled,
    /// Cluster: this node no longer leads the session's shard. Never retried.
    Superseded,
}

fn is_retryable_status(status: u16) -> bool {
    matches!(status, 408 | 425 | 429 | 500 | 502 | 503 | 504)
}

/// Backoff before attempt `attempt + 1`: 250 ms doubling, capped at 5 s, with ±25 % jitter; a
/// longer `retry-after` wins.
fn backoff(attempt: u32, retry_after: Option<Duration>) -> Duration {
    let base = Duration::from_millis(250)
        .saturating_mul(1 << attempt.min(10).saturating_sub(1))
        .min(Duration::from_secs(5));
    let jitter = rand::rng().random_range(0.75..1.25);
    base.mul_f64(jitter).max(retry_after.unwrap_or_default())
}

/// How long a dispatch waits for a registry not loaded yet (`AgentRegistry::not_loaded`).
const AGENTS_LOAD_WAIT: Duration = Duration::from_secs(60);

/// Runs the dispatch to its end (success, refusal, exhausted retries).
pub async fn dispatch(context: &EngineContext, job: &DispatchJob) -> DispatchResult {
    let unavailable = |error: ShardError| {
        tracing::warn!(session_id = %job.session_id, %error, "could not read the history for a dispatch");
        DispatchResult::failed("history unavailable")
    };
    let cancelled = DispatchResult {
        through_seq: 0,
        error: None,
        nothing_owed: false,
        superseded: false,
    };
    if job.control.is_cancelled() {
        return cancelled;
    }
    if !lease_or_wait(context, job).await {
        return lease_gone(job, 0);
    }
    // Whether a reply is owed is decided here, from the log, not from the scheduler's memory:
    // a stale request (a rescan's snapshot taken while an earlier dispatch was running) must
    // not call the agent again for messages already answered.
    let view = match context.shards.view(&job.session_id).await {
        Ok(view) => view,
        Err(error) => return unavailable(error),
    };
    if !view.dispatch.is_pending() {
        return DispatchResult {
            through_seq: view.dispatch.answered_through,
            error: None,
            nothing_owed: true,
            superseded: false,
        };
    }
    // A member started while the archive was unreachable knows its agents once it answers.
    let agents_due = tokio::time::Instant::now() + AGENTS_LOAD_WAIT;
    while !context.registry.is_loaded() {
        if job.control.is_cancelled() {
            return cancelled;
        }
        if tokio::time::Instant::now() >= agents_due {
            return DispatchResult::failed("the agents could not be read from the archive");
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    let agent = match context.registry.get(&job.agent_id) {
        Some(agent) if agent.status == crate::model::AgentStatus::Enabled => agent,
        _ => return DispatchResult::failed("agent_disabled"),
    };
    let (turn, history) = match open_turn(context, job, &view, &agent).await {
        Ok(opened) => opened,
        Err(NotOpened::NothingOwed) => {
            return DispatchResult {
                through_seq: view.dispatch.answered_through,
                error: None,
                nothing_owed: true,
                superseded: false,
            };
        }
        Err(NotOpened::Superseded) => {
            return DispatchResult {
                superseded: true,
                ..cancelled
            };
        }
        Err(NotOpened::Cancelled) => return cancelled,
        Err(NotOpened::Failed(reason)) => return DispatchResult::failed(reason),
    };
    // From here on the dispatch runs under its turn's id: the agent's `idempotency-key`, the
    // `dispatch_id` of its statuses, chunks and messages, and the key of its reply's messages.
    let turn_id: Arc<str> = Arc::from(turn.id.to_string());
    job.control.set_turn_id(turn_id.clone());
    let job = &job.for_turn(turn_id);
    let through_seq = turn.through_seq;
    status(context, &job.session_id, "dispatching", Some(&job.dispatch_id), None);
    let mut attempt = 1u32;
    // Registered for all attempts: chunk indexes count across them, and a joiner between two
    // attempts still knows which chunks are new to it.
    context.streams.begin(&job.session_id, &agent.id, &job.dispatch_id);
    loop {
        if job.control.is_cancelled() {
            return DispatchResult {
                through_seq,
                ..cancelled
            };
        }
        if !lease_or_wait(context, job).await {
            return lease_gone(job, through_seq);
        }
        // File parts point at signed URLs, fresh for each attempt.
        let mut messages = history.messages.clone();
        let expires = context.clock.now_micros() / 1_000_000 + crate::file_urls::SIGNED_URL_LIFETIME_SECS;
        crate::file_urls::sign_file_parts(
            &mut messages,
            &job.session_id,
            context.files.public_url(),
            &context.files.signer,
            expires,
        );
        let body = json!({
            "session_id": &*job.session_id,
            "agent_id": agent.id,
            "user_id": view.record.user_id,
            "dispatch_id": &*job.dispatch_id,
            "attempt": attempt,
            "messages": messages,
        });
        let started = Instant::now();
        let final_attempt = attempt >= context.config.max_attempts;
        let turn = Turn {
            final_attempt,
            replaces: history.replaces.as_deref(),
            answers_through: through_seq,
        };
        let mut http_status = None;
        let outcome = call(context, &agent, job, &body, turn, &mut http_status).await;
        metrics::histogram!("fleetlm_webhook_seconds").record(started.elapsed().as_secs_f64());
        record_delivery(context, job, attempt, http_status, &outcome, final_attempt, started);
        if matches!(outcome, Err(CallError::Retryable { .. })) && !final_attempt {
            // The retry streams the reply afresh: clients close the cut-off message first.
            context.streams.abort_open_message(&job.session_id);
        }
        context.streams.end_attempt(&job.session_id);
        if job.control.is_cancelled() {
            // Whatever the attempt ended with, a cancelled dispatch is never retried.
            return DispatchResult {
                through_seq,
                ..cancelled
            };
        }
        match outcome {
            Ok(()) | Err(CallError::Cancelled) => {
                return DispatchResult {
                    through_seq,
                    error: None,
                    nothing_owed: false,
                    superseded: false,
                };
            }
            Err(CallError::Superseded) => {
                return DispatchResult {
                    through_seq,
                    superseded: true,
                    ..cancelled
                };
            }
            Err(CallError::Retryable { reason, retry_after }) if attempt < context.config.max_attempts => {
                metrics::counter!("fleetlm_webhook_retries_total").increment(1);
                tracing::info!(session_id = %job.session_id, dispatch_id = %job.dispatch_id, attempt, %reason, "retrying dispatch");
                tokio::select! {
                    () = tokio::time::sleep(backoff(attempt, retry_after)) => {}
                    () = job.control.cancelled() => return DispatchResult { through_seq, ..cancelled },
                }
                attempt += 1;
            }
            Err(CallError::Retryable { reason, .. } | CallError::Fatal(reason)) => {
                return DispatchResult {
                    through_seq,
                    error: Some(reason),
                    nothing_owed: false,
                    superseded: false,
                };
            }
        }
    }
}

/// Keeps the attempt in the agent's recent deliveries (`GET /api/agents/:id/deliveries`).
fn record_delivery(
    context: &EngineContext,
    job: &DispatchJob,
    attempt: u32,
    http_status: Option<u16>,
    outcome: &Result<(), CallError>,
    final_attempt: bool,
    started: Instant,
) {
    let (label, error) = match outcome {
        Ok(()) => ("ok", None),
        Err(CallError::Cancelled) => ("cancelled", None),
        // This node stopped leading the shard: the new leader's delivery is the one that counts.
        Err(CallError::Superseded) => return,
        Err(CallError::Retryable { reason, .. }) if !final_attempt && !job.control.is_cancelled() => {
            ("retried", Some(reason.clone()))
        }
        Err(CallError::Retryable { reason, .. } | CallError::Fatal(reason)) => ("failed", Some(reason.clone())),
    };
    context.recent.record_delivery(
        &job.agent_id,
        super::recent::Delivery {
            dispatch_id: job.dispatch_id.to_string(),
            session_id: job.session_id.to_string(),
            attempt,
            http_status,
            outcome: label,
            error,
            latency_ms: started.elapsed().as_millis() as u64,
            finished_at: crate::model::Timestamp(context.clock.now_micros()),
        },
    );
}

/// Cluster: whether this dispatch may still act for the session's shard — this node holds its
/// leadership lease in the term the dispatch runs under, at once or after a short wait for a
/// lapsed one (`Shards::await_lease`). `false` also when the dispatch is stopped meanwhile. A
/// leader cut off from the quorum thus calls the agent no more and relays nothing once its
/// lease has run out.
async fn lease_or_wait(context: &EngineContext, job: &DispatchJob) -> bool {
    let Some(term) = job.leader_term else {
        return true;
    };
    tokio::select! {
        held = context.shards.await_lease(&job.session_id, term) => held && !job.control.is_cancelled(),
        () = job.control.cancelled() => false,
    }
}

/// How a dispatch ends when `lease_or_wait` said no: cancelled by the user (recorded as such),
/// or superseded (the shard's leader answers the turn; nothing is recorded here).
fn lease_gone(job: &DispatchJob, through_seq: u64) -> DispatchResult {
    let superseded = job.control.is_superseded() || !job.control.is_cancelled();
    if superseded {
        job.control.supersede();
    }
    DispatchResult {
        through_seq,
        error: None,
        nothing_owed: false,
        superseded,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_doubles_is_capped_and_honours_retry_after() {
        let first = backoff(1, None);
        assert!(
            first >= Duration::from_millis(187) && first <= Duration::from_millis(313),
            "{first:?}"
        );
        let tenth = backoff(10, None);
        assert!(tenth <= Duration::from_millis(6250), "{tenth:?}");
        assert!(backoff(1, Some(Duration::from_secs(3))) >= Duration::from_secs(3));
    }

    #[test]
    fn which_statuses_are_retried() {
        for status in [408, 425, 429, 500, 502, 503, 504] {
            assert!(is_retryable_status(status));
        }
        for status in [400, 401, 403, 404, 409, 422, 501] {
            assert!(!is_retryable_status(status));
        }
    }
}
