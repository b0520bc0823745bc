//! One dispatch: the webhook request (history, headers), the streamed reply (forwarded chunk by
//! chunk, assembled, stored), and retries with capped, jittered exponential backoff.

use std::sync::Arc;
use std::time::{Duration, Instant};

use futures_util::StreamExt;
use rand::Rng;
use serde_json::{Map, Value, json};

use super::cancel::DispatchControl;
use super::reply::{LineSplitter, ReplyLine, parse_line};
use super::{EngineContext, status};
use crate::ids::TurnId;
use crate::model::{Agent, HistoryMode, OpenTurn, SessionView};
use crate::shard::ShardError;

/// History for `entire` mode is capped at the newest this many messages.
const ENTIRE_HISTORY_CAP: u64 = 10_000;
const HISTORY_PAGE: usize = 1000;

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
        let body = json!({
            "session_id": &*job.session_id,
            "agent_id": agent.id,
            "user_id": view.record.user_id,
            "dispatch_id": &*job.dispatch_id,
            "attempt": attempt,
            "messages": history.messages,
        });
        let started = Instant::now();
        let final_attempt = attempt >= context.config.max_attempts;
        let turn = Turn {
            final_attempt,
            replaces: history.replaces.as_deref(),
            answers_through: through_seq,
        };
        let outcome = call(context, &agent, job, &body, turn).await;
        metrics::histogram!("fleetlm_webhook_seconds").record(started.elapsed().as_secs_f64());
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

/// Messages read beyond the history window so that `regenerate` messages and the replies they
/// supersede, left out of the history, do not shrink it.
const BRANCH_LOOKBACK: u64 = 64;

/// What a dispatch sends and answers.
struct History {
    /// The messages the agent gets, oldest first.
    messages: Vec<Value>,
    /// The newest user message read (the dispatch answers through it).
    last_user_seq: Option<u64>,
    /// The message the reply replaces, when the newest user message is a `regenerate`.
    replaces: Option<String>,
    /// The agent's messages after the newest user message: `(seq, dispatch_id)` from their
    /// metadata (a reply of a turn whose start is no longer in the log; `open_turn`).
    replies_after_user: Vec<(u64, Option<String>)>,
}

/// Why a dispatch did not open a turn.
enum NotOpened {
    /// The log owes no reply (a stale request).
    NothingOwed,
    /// Cluster: this node no longer leads the session's shard.
    Superseded,
    Cancelled,
    Failed(String),
}

/// How often a dispatch tries to record its turn's start while the shard cannot take it.
const START_ATTEMPTS: u32 = 5;

/// The turn this dispatch answers and the history it sends. A turn the log shows started and
/// not finished (a crash, a leader change, a retry) is resumed as it started: the same id, the
/// same history, so a reply cut after some of its messages is completed, not asked for twice.
/// Otherwise the turn is recorded in the log (`Op::DispatchStarted`) before the agent is
/// called.
async fn open_turn(
    context: &EngineContext,
    job: &DispatchJob,
    view: &SessionView,
    agent: &Agent,
) -> Result<(OpenTurn, History), NotOpened> {
    let unavailable = |error: ShardError| {
        tracing::warn!(session_id = %job.session_id, %error, "could not read the history for a dispatch");
        NotOpened::Failed("history unavailable".into())
    };
    if let Some(open) = view.dispatch.open_turn() {
        let found = history(context, &job.session_id, view, agent, open.history_seq).await;
        return Ok((open, found.map_err(unavailable)?));
    }
    let found = history(context, &job.session_id, view, agent, view.last_seq)
        .await
        .map_err(unavailable)?;
    let through_seq = found.last_user_seq.unwrap_or(view.dispatch.last_user_seq);
    let id = TurnId::derive(&view.record.id, view.record.inserted_at.0, through_seq);
    // A turn whose start left the log with the archive (the session was loaded from there) has
    // the same id; if part of its reply is stored, its history ends before that reply, as it
    // did when the turn started.
    let id_text = id.to_string();
    let resumed_reply = found
        .replies_after_user
        .iter()
        .find(|(_, dispatch_id)| dispatch_id.as_deref() == Some(id_text.as_str()))
        .map(|(seq, _)| *seq);
    let (found, history_seq) = match resumed_reply {
        Some(seq) => {
            let bounded = history(context, &job.session_id, view, agent, seq - 1).await;
            (bounded.map_err(unavailable)?, seq - 1)
        }
        None => (found, view.last_seq),
    };
    let turn = OpenTurn {
        id,
        through_seq,
        history_seq,
    };
    let mut attempt = 1;
    let opened = loop {
        if job.control.is_cancelled() {
            return Err(NotOpened::Cancelled);
        }
        match context
            .shards
            .start_dispatch(&job.session_id, turn, job.leader_term)
            .await
        {
            Ok(opened) => break opened,
            Err(ShardError::Superseded) => return Err(NotOpened::Superseded),
            Err(
                error @ (ShardError::NoLeader(_)
                | ShardError::NotLeader { .. }
                | ShardError::Overloaded
                | ShardError::Unavailable(_)
                | ShardError::Archive(_)),
            ) if attempt < START_ATTEMPTS => {
                tracing::info!(session_id = %job.session_id, %error, attempt, "could not record a dispatch's start yet");
                if job.leader_term.is_some() && context.shards.dispatch_term(&job.session_id) != Some(job.leader_term) {
                    return Err(NotOpened::Superseded);
                }
                tokio::select! {
                    () = tokio::time::sleep(backoff(attempt, Some(Duration::from_millis(500)))) => {}
                    () = job.control.cancelled() => return Err(NotOpened::Cancelled),
                }
                attempt += 1;
            }
            Err(error) => {
                tracing::warn!(session_id = %job.session_id, %error, "could not record a dispatch's start");
                return Err(NotOpened::Failed("could not record the dispatch".into()));
            }
        }
    };
    match opened {
        None => Err(NotOpened::NothingOwed),
        Some(opened) if opened == turn => Ok((turn, found)),
        // Another dispatch started a turn meanwhile (a stale request racing it): resume that one.
        Some(opened) => {
            let found = history(context, &job.session_id, view, agent, opened.history_seq).await;
            Ok((opened, found.map_err(unavailable)?))
        }
    }
}

/// The messages up to `upto` the agent gets, oldest first, as the agent's history mode asks, on
/// the current branch (`branch.rs`: no `regenerate` messages, no superseded replies).
async fn history(
    context: &EngineContext,
    session_id: &str,
    view: &SessionView,
    agent: &Agent,
    upto: u64,
) -> Result<History, ShardError> {
    let wanted = match agent.message_history_mode {
        HistoryMode::Tail => u64::from(agent.message_history_limit),
        HistoryMode::Last => 1,
        HistoryMode::Entire => ENTIRE_HISTORY_CAP,
    };
    let mut after = upto.saturating_sub(wanted + BRANCH_LOOKBACK);
    let mut records = Vec::new();
    while after < upto {
        let page = context.shards.read_messages(session_id, after, HISTORY_PAGE).await?;
        let Some(last) = page.messages.last() else {
            break;
        };
        after = last.message.seq;
        records.extend(
            page.messages
                .into_iter()
                .take_while(|record| record.message.seq <= upto),
        );
    }
    let user_id = view.record.user_id.as_str();
    let window: Vec<&crate::model::Message> = records.iter().map(|r| &r.message).collect();
    let last_user_seq = window.iter().filter(|m| m.sender_id == user_id).map(|m| m.seq).max();
    let replies_after_user = window
        .iter()
        .filter(|m| m.seq > last_user_seq.unwrap_or(0) && m.sender_id == agent.id)
        .map(|m| {
            let metadata = serde_json::from_str::<Value>(m.metadata.get()).unwrap_or_default();
            (m.seq, metadata["dispatch_id"].as_str().map(str::to_string))
        })
        .collect();
    let branch = super::branch::current_branch(&window, user_id);
    let kept: Vec<&&crate::model::Message> = window.iter().filter(|m| !branch.hidden.contains(&m.seq)).collect();
    let skip = kept.len().saturating_sub(usize::try_from(wanted).unwrap_or(usize::MAX));
    let messages = kept[skip..]
        .iter()
        .map(|m| {
            json!({
                "seq": m.seq,
                "sender_id": m.sender_id,
                "kind": m.kind,
                "content": &m.content,
                "metadata": &m.metadata,
                "inserted_at": m.inserted_at,
            })
        })
        .collect();
    Ok(History {
        messages,
        last_user_seq,
        replaces: branch.replaces,
        replies_after_user,
    })
}

/// One attempt's circumstances.
struct Turn<'a> {
    final_attempt: bool,
    /// Said in the metadata of every message of the reply (`replaces`).
    replaces: Option<&'a str>,
    /// The newest user message the reply answers (`answers_seq` in its messages' metadata).
    answers_through: u64,
}

/// One HTTP attempt: send, then read the reply line by line until it ends. A reply cut off
/// mid-way is stored as `incomplete` only on the final attempt: an earlier one is retried, and
/// the retry's messages take the same `(turn id, ordinal)` keys.
async fn call(
    context: &EngineContext,
    agent: &Agent,
    job: &DispatchJob,
    body: &Value,
    turn: Turn<'_>,
) -> Result<(), CallError> {
    let Turn {
        final_attempt,
        replaces,
        answers_through,
    } = turn;
    let url = crate::api::agents::webhook_url(&agent.origin_url, &agent.webhook_path);
    let timeout = Duration::from_millis(u64::from(agent.timeout_ms));
    let mut request = context
        .http
        .for_agent(agent)
        .post(&url)
        .header("content-type", "application/json")
        .header("accept", "application/x-ndjson, text/event-stream, application/json")
        .header("idempotency-key", &*job.dispatch_id)
        .header("x-fleetlm-timeout-ms", agent.timeout_ms.to_string());
    for (name, value) in &agent.headers {
        request = request.header(name, value);
    }
    let request = request.body(body.to_string());
    let sent = tokio::select! {
        sent = tokio::time::timeout(timeout, request.send()) => sent,
        // Dropping the request future closes its connection.
        () = job.control.cancelled() => return Err(CallError::Cancelled),
    };
    let response = match sent {
        Err(_) => {
            return Err(CallError::Retryable {
                reason: "timed out".into(),
                retry_after: None,
            });
        }
        Ok(Err(error)) => {
            if super::http::uses_h2c(agent) && super::http::failed_for_want_of_http2(agent, &error).await {
                // Registered with `http2: true` but the agent speaks HTTP/1.1 only: a
                // registration mistake that another attempt will not fix.
                tracing::warn!(agent_id = %agent.id, error = %error.without_url(), "the agent does not speak HTTP/2 (it is registered with http2: true)");
                metrics::counter!("fleetlm_webhook_failures_total", "reason" => "not HTTP/2").increment(1);
                return Err(CallError::Fatal(super::http::NOT_HTTP2.into()));
            }
            return Err(CallError::Retryable {
                reason: transport_failure(agent, error).into(),
                retry_after: None,
            });
        }
        Ok(Ok(response)) => response,
    };
    let status_code = response.status().as_u16();
    if response.status().is_redirection() {
        // Never followed (the agent's headers would go wherever it points): not retried.
        return Err(CallError::Fatal(format!(
            "{} (HTTP {status_code})",
            super::http::REDIRECTED
        )));
    }
    if !response.status().is_success() {
        let reason = format!("HTTP {status_code}");
        return if is_retryable_status(status_code) {
            let retry_after = response
                .headers()
                .get("retry-after")
                .and_then(|v| v.to_str().ok())
                .and_then(|v| v.trim().parse::<u64>().ok())
                .map(Duration::from_secs);
            Err(CallError::Retryable { reason, retry_after })
        } else {
            Err(CallError::Fatal(reason))
        };
    }
    let mut reply = ReplyState {
        replaces: replaces.map(str::to_string),
        answers_through,
        index: 0,
        message_bytes: 0,
        message_chunks: 0,
        message_started: None,
        streaming_announced: false,
        failure: None,
    };
    let is_plain_json = response
        .headers()
        .get("content-type")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.split(';').next())
        .is_some_and(|essence| essence.trim().eq_ignore_ascii_case("application/json"));
    if is_plain_json {
        return plain_json_reply(context, agent, job, &mut reply, response, timeout).await;
    }
    let mut splitter = LineSplitter::new(context.config.max_reply_line_bytes);
    let mut body_stream = response.bytes_stream();
    'read: loop {
        let next = tokio::select! {
            next = tokio::time::timeout(timeout, body_stream.next()) => next,
            () = job.control.cancelled() => {
                // Close the connection first, so the agent can stop generating, then store
                // what was assembled as the AI SDK stores an aborted message.
                drop(body_stream);
                context.streams.abort_open_message(&job.session_id);
                if job.control.is_superseded() {
                    // The shard's new leader answers the turn; nothing more is stored here.
                    return Err(CallError::Superseded);
                }
                finish_message(context, agent, job, &mut reply, "abort").await?;
                return Err(CallError::Cancelled);
            }
        };
        let bytes = match next {
            Err(_) => {
                if final_attempt {
                    finish_incomplete(context, agent, job, &mut reply).await?;
                }
                return Err(CallError::Retryable {
                    reason: "timed out (the reply stalled)".into(),
                    retry_after: None,
                });
            }
            Ok(None) => break,
            Ok(Some(Err(error))) => {
                if final_attempt {
                    finish_incomplete(context, agent, job, &mut reply).await?;
                }
                return Err(CallError::Retryable {
                    reason: format!("reply interrupted: {}", transport_failure(agent, error)),
                    retry_after: None,
                });
            }
            Ok(Some(Ok(bytes))) => bytes,
        };
        let lines = splitter.feed(&bytes).map_err(|e| CallError::Fatal(e.to_string()))?;
        for line in lines {
            if handle_line(context, agent, job, &mut reply, &line).await? {
                break 'read;
            }
        }
    }
    if let Some(line) = splitter.finish().map_err(|e| CallError::Fatal(e.to_string()))? {
        handle_line(context, agent, job, &mut reply, &line).await?;
    }
    finish_incomplete(context, agent, job, &mut reply).await?;
    match reply.failure {
        Some(failure) => Err(CallError::Fatal(failure)),
        None => Ok(()),
    }
}

/// Chunks one reply message may have; more end the dispatch.
const MAX_REPLY_CHUNKS: u64 = 100_000;
/// How long one reply message may take to stream; longer ends the dispatch.
const MAX_REPLY_DURATION: Duration = Duration::from_secs(300);

/// A non-streamed reply (`content-type: application/json`): one JSON value, read whole (at most
/// the line limit), that is a UI message (`{"role": "assistant", "parts": [...]}`, stored as
/// one message), an array of chunks or legacy lines, or one chunk or legacy line.
async fn plain_json_reply(
    context: &EngineContext,
    agent: &Agent,
    job: &DispatchJob,
    reply: &mut ReplyState,
    response: reqwest::Response,
    timeout: Duration,
) -> Result<(), CallError> {
    let max_bytes = context.config.max_reply_line_bytes;
    let mut body = Vec::new();
    let mut body_stream = response.bytes_stream();
    loop {
        let next = tokio::select! {
            next = tokio::time::timeout(timeout, body_stream.next()) => next,
            () = job.control.cancelled() => return Err(CallError::Cancelled),
        };
        match next {
            Err(_) => {
                return Err(CallError::Retryable {
                    reason: "timed out (the reply stalled)".into(),
                    retry_after: None,
                });
            }
            Ok(None) => break,
            Ok(Some(Err(error))) => {
                return Err(CallError::Retryable {
                    reason: format!("reply interrupted: {}", transport_failure(agent, error)),
                    retry_after: None,
                });
            }
            Ok(Some(Ok(bytes))) => {
                if body.len() + bytes.len() > max_bytes {
                    return Err(CallError::Fatal(format!("reply longer than {max_bytes} bytes")));
                }
                body.extend_from_slice(&bytes);
            }
        }
    }
    let value: Value = serde_json::from_slice(&body).map_err(|error| {
        metrics::counter!("fleetlm_webhook_malformed_lines_total").increment(1);
        CallError::Fatal(format!("malformed reply: not JSON ({error})"))
    })?;
    let items = match value {
        Value::Array(items) => items,
        Value::Object(message) if message.get("parts").is_some_and(Value::is_array) => {
            let mut metadata = match message.get("metadata") {
                Some(Value::Object(map)) => map.clone(),
                _ => Map::new(),
            };
            metadata.insert("termination".into(), "finish".into());
            metadata.insert("dispatch_id".into(), Value::String(job.dispatch_id.to_string()));
            let id = message
                .get("id")
                .cloned()
                .unwrap_or_else(|| Value::String(String::new()));
            let content = json!({"id": id, "role": "assistant", "parts": message["parts"]});
            return store(
                context,
                agent,
                job,
                reply,
                "assistant",
                content,
                Value::Object(metadata),
            )
            .await;
        }
        other => vec![other],
    };
    for item in items {
        if handle_line(context, agent, job, reply, &item.to_string()).await? {
            break;
        }
    }
    finish_incomplete(context, agent, job, reply).await?;
    match reply.failure.take() {
        Some(failure) => Err(CallError::Fatal(failure)),
        None => Ok(()),
    }
}

struct ReplyState {
    /// The message this reply replaces (a `regenerate`), put in each message's metadata.
    replaces: Option<String>,
    /// The newest user message the reply answers, put in each message's metadata.
    answers_through: u64,
    /// Index of the next message this reply stores (keys `client_id` for retries).
    index: u64,
    /// Size (bytes of chunk lines) and chunk count of the message being assembled, and when
    /// its first chunk came.
    message_bytes: usize,
    message_chunks: u64,
    message_started: Option<Instant>,
    streaming_announced: bool,
    /// The assembler refused a chunk: the reply is malformed.
    failure: Option<String>,
}

/// Handles one reply line; `Ok(true)` when the reply says it is complete (`[DONE]`).
async fn handle_line(
    context: &EngineContext,
    agent: &Agent,
    job: &DispatchJob,
    reply: &mut ReplyState,
    line: &str,
) -> Result<bool, CallError> {
    let parsed = parse_line(line).map_err(|error| {
        metrics::counter!("fleetlm_webhook_malformed_lines_total").increment(1);
        CallError::Fatal(format!("malformed reply line: {error}"))
    })?;
    match parsed {
        None => Ok(false),
        Some(ReplyLine::Done) => Ok(true),
        Some(ReplyLine::Legacy {
            kind,
            content,
            metadata,
        }) => {
            store(context, agent, job, reply, &kind, content, metadata).await?;
            Ok(false)
        }
        Some(ReplyLine::Chunk(chunk)) => {
            reply.message_bytes += line.len();
            reply.message_chunks += 1;
            let started = *reply.message_started.get_or_insert_with(Instant::now);
            let max_bytes = context.config.max_reply_bytes;
            let exceeded = if reply.message_bytes > max_bytes {
                Some(format!("reply too large: over {max_bytes} bytes"))
            } else if reply.message_chunks > MAX_REPLY_CHUNKS {
                Some(format!("reply too long: over {MAX_REPLY_CHUNKS} chunks"))
            } else if started.elapsed() > MAX_REPLY_DURATION {
                Some(format!("reply too slow: over {} s", MAX_REPLY_DURATION.as_secs()))
            } else {
                None
            };
            if let Some(reason) = exceeded {
                metrics::counter!("fleetlm_webhook_replies_cut_total").increment(1);
                return Err(CallError::Fatal(reason));
            }
            if !lease_or_wait(context, job).await {
                // Nothing more is relayed: the sockets close the open message.
                context.streams.abort_open_message(&job.session_id);
                if lease_gone(job, 0).superseded {
                    return Err(CallError::Superseded);
                }
                finish_message(context, agent, job, reply, "abort").await?;
                return Err(CallError::Cancelled);
            }
            if !reply.streaming_announced {
                reply.streaming_announced = true;
                status(context, &job.session_id, "streaming", Some(&job.dispatch_id), None);
            }
            if let Err(failure) = context.streams.chunk(&job.session_id, &chunk) {
                reply
                    .failure
                    .get_or_insert(format!("invalid chunk sequence: {failure}"));
            }
            let termination = match chunk["type"].as_str() {
                Some("finish") => "finish",
                Some("abort") => "abort",
                _ => return Ok(false),
            };
            finish_message(context, agent, job, reply, termination).await?;
            Ok(false)
        }
    }
}

/// Stores what is assembled so far as one message ended by `termination`, and starts afresh.
async fn finish_message(
    context: &EngineContext,
    agent: &Agent,
    job: &DispatchJob,
    reply: &mut ReplyState,
    termination: &str,
) -> Result<(), CallError> {
    let taken = context.streams.end_message(&job.session_id, |assembler| {
        let message = assembler.message();
        let metadata = assembler.metadata().cloned();
        let errors = assembler.errors().to_vec();
        let failure = assembler.failure().map(str::to_string);
        (message, metadata, errors, failure)
    });
    reply.message_bytes = 0;
    reply.message_chunks = 0;
    reply.message_started = None;
    let Some((Some(message), message_metadata, errors, failure)) = taken else {
        return Ok(());
    };
    let mut metadata = match message_metadata {
        Some(Value::Object(map)) => map,
        Some(other) => Map::from_iter([("message_metadata".to_string(), other)]),
        None => Map::new(),
    };
    metadata.insert("termination".into(), termination.into());
    metadata.insert("dispatch_id".into(), Value::String(job.dispatch_id.to_string()));
    if let Some(error) = errors.last().cloned().or(failure) {
        metadata.insert("error".into(), error.into());
    }
    let content = json!({"id": message["id"], "role": "assistant", "parts": message["parts"]});
    store(
        context,
        agent,
        job,
        reply,
        "assistant",
        content,
        Value::Object(metadata),
    )
    .await
}

async fn finish_incomplete(
    context: &EngineContext,
    agent: &Agent,
    job: &DispatchJob,
    reply: &mut ReplyState,
) -> Result<(), CallError> {
    finish_message(context, agent, job, reply, "incomplete").await
}

/// Appends one message of the reply as the agent. The `client_id` (the turn's id + the
/// message's ordinal in the reply) makes a message a retry or a resumed turn produces again a
/// no-op: a reply cut after k messages is completed from message k on, each stored once.
async fn store(
    context: &EngineContext,
    agent: &Agent,
    job: &DispatchJob,
    reply: &mut ReplyState,
    kind: &str,
    content: Value,
    metadata: Value,
) -> Result<(), CallError> {
    let client_id = format!("turn:{}:{}", job.dispatch_id, reply.index);
    reply.index += 1;
    let mut metadata = metadata;
    if let Value::Object(map) = &mut metadata {
        map.insert("answers_seq".into(), json!(reply.answers_through));
    }
    if let (Some(replaces), Value::Object(map)) = (&reply.replaces, &mut metadata) {
        map.insert("replaces".into(), Value::String(replaces.clone()));
    }
    let raw = |value: &Value| serde_json::value::to_raw_value(value).expect("values serialize");
    let (kind, content, metadata, client_id_raw) =
        (raw(&json!(kind)), raw(&content), raw(&metadata), raw(&json!(client_id)));
    let input = crate::api::messages::MessageInput {
        kind: Some(&kind),
        content: Some(&content),
        metadata: Some(&metadata),
        client_id: Some(&client_id_raw),
        expected_seq: None,
    };
    let config = &context.shards_limits;
    let request = crate::api::messages::build_append(
        &job.session_id,
        agent.id.clone(),
        false,
        input,
        config.max_message_bytes,
        config.max_metadata_depth,
    )
    .map_err(|error| match error {
        crate::api::messages::InvalidMessage::Format(reason)
        | crate::api::messages::InvalidMessage::TooLarge(reason) => {
            CallError::Fatal(format!("reply message refused: {reason}"))
        }
    })?;
    let mut request = request;
    request.leader_term = job.leader_term;
    match context.shards.append(request).await {
        Ok(_) | Err(ShardError::ClientIdConflict) => Ok(()),
        Err(ShardError::Superseded) => Err(CallError::Superseded),
        // Cluster: leadership is moving; the store's outcome may be unknown. Retried with the
        // same client id (a stored message is not stored twice); the term check above decides.
        Err(ShardError::NoLeader(_) | ShardError::NotLeader { .. }) => Err(CallError::Retryable {
            reason: "the session's shard is changing leader".into(),
            retry_after: Some(Duration::from_millis(500)),
        }),
        Err(ShardError::Overloaded | ShardError::Unavailable(_) | ShardError::Archive(_)) => {
            Err(CallError::Retryable {
                reason: "could not store the reply yet".into(),
                retry_after: Some(Duration::from_secs(1)),
            })
        }
        Err(error) => Err(CallError::Fatal(format!("reply not stored: {error}"))),
    }
}

/// What went wrong reaching the agent, in words fit for the session's members: the cause
/// ("connection refused", "timed out"), never the URL, its query (which may carry a key) or an
/// address. Operators get the detail in the log and in `fleetlm_webhook_failures_total{reason}`.
fn transport_failure(agent: &Agent, error: reqwest::Error) -> &'static str {
    let reason = classify_transport_error(&error);
    let host = url::Url::parse(&agent.origin_url)
        .ok()
        .and_then(|url| url.host_str().map(str::to_owned))
        .unwrap_or_default();
    tracing::warn!(agent_id = %agent.id, %host, %reason, error = %error.without_url(), "webhook transport error");
    metrics::counter!("fleetlm_webhook_failures_total", "reason" => reason).increment(1);
    reason
}

fn classify_transport_error(error: &reqwest::Error) -> &'static str {
    if error.is_timeout() {
        return "timed out";
    }
    let mut source = std::error::Error::source(error);
    while let Some(cause) = source {
        if let Some(io) = cause.downcast_ref::<std::io::Error>() {
            match io.kind() {
                std::io::ErrorKind::ConnectionRefused => return "connection refused",
                std::io::ErrorKind::ConnectionReset
                | std::io::ErrorKind::ConnectionAborted
                | std::io::ErrorKind::BrokenPipe
                | std::io::ErrorKind::UnexpectedEof => return "connection reset",
                std::io::ErrorKind::TimedOut => return "timed out",
                std::io::ErrorKind::HostUnreachable | std::io::ErrorKind::NetworkUnreachable => {
                    return "host unreachable";
                }
                _ => {}
            }
        }
        let text = cause.to_string();
        if text.contains("dns error") || text.contains("failed to lookup address") {
            return "host not found";
        }
        if text.contains("certificate") || text.contains("tls") || text.contains("TLS") {
            return "TLS handshake failed";
        }
        source = cause.source();
    }
    if error.is_connect() {
        "could not connect"
    } else if error.is_body() || error.is_decode() {
        "connection lost"
    } else {
        "request failed"
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
