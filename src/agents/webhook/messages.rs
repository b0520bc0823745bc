//! The reply's messages: each line handled (chunks relayed live and assembled, bounded in size,
//! count and time), each message finished and stored under its turn's key, exactly once.

use std::time::{Duration, Instant};

use serde_json::{Map, Value, json};

use super::{CallError, DispatchJob, lease_gone, lease_or_wait};
use crate::agents::continuation::{CONTINUATION_KEY, Continuable, WHOLE};
use crate::agents::reply::{ReplyLine, parse_line};
use crate::agents::{EngineContext, status};
use crate::model::Agent;
use crate::shard::ShardError;

/// Chunks one reply message may have; more end the dispatch.
const MAX_REPLY_CHUNKS: u64 = 100_000;
/// How long one reply message may take to stream; longer ends the dispatch.
const MAX_REPLY_DURATION: Duration = Duration::from_secs(300);

pub(super) struct ReplyState {
    /// The message this reply replaces (a `regenerate`), put in each message's metadata.
    pub(super) replaces: Option<String>,
    /// The newest user message the reply answers, put in each message's metadata.
    pub(super) answers_through: u64,
    /// Index of the next message this reply stores (keys `client_id` for retries).
    pub(super) index: u64,
    /// Size (bytes of chunk lines) and chunk count of the message being assembled, and when
    /// its first chunk came.
    pub(super) message_bytes: usize,
    pub(super) message_chunks: u64,
    pub(super) message_started: Option<Instant>,
    pub(super) streaming_announced: bool,
    /// The assembler refused a chunk: the reply is malformed.
    pub(super) failure: Option<String>,
    /// The stored messages a message of the reply may continue (from the history sent).
    pub(super) continuable: Continuable,
    /// The message streaming now continues a stored one: stored whole, marked so.
    pub(super) continuing: bool,
}

/// Handles one reply line; `Ok(true)` when the reply says it is complete (`[DONE]`).
pub(super) async fn handle_line(
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
        Some(ReplyLine::Chunk(mut chunk)) => {
            reply.message_bytes += line.len();
            reply.message_chunks += 1;
            if reply.message_chunks == 1 {
                stamp_message_id(&mut chunk, &job.dispatch_id, reply.index);
                continue_stored_message(context, job, reply, &chunk);
            }
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

/// A message whose `start` names a message of the history sent continues it: assembled from its
/// parts on (`continuation`). Replies a `regenerate` supersedes are not in that history, so a
/// regenerated reply continues what is left of the message, as the chat shows it.
fn continue_stored_message(context: &EngineContext, job: &DispatchJob, reply: &mut ReplyState, chunk: &Value) {
    if chunk["type"].as_str() != Some("start") {
        return;
    }
    let Some(id) = chunk["messageId"].as_str() else { return };
    if let Some(parts) = reply.continuable.parts(id) {
        context.streams.continue_message(&job.session_id, id, parts.to_vec());
        reply.continuing = true;
    }
}

/// A message's opening `start` chunk without a `messageId` (the AI SDK's `toUIMessageStream`
/// sends none unless given the original messages) gets the id FleetLM stores the message
/// under, so the chunk every client receives names the id the log holds.
fn stamp_message_id(chunk: &mut Value, turn_id: &str, ordinal: u64) {
    if chunk["type"] != "start" {
        return;
    }
    let named = chunk
        .get("messageId")
        .and_then(Value::as_str)
        .is_some_and(|id| !id.is_empty());
    if !named && let Value::Object(fields) = chunk {
        fields.insert(
            "messageId".into(),
            crate::ids::reply_message_id(turn_id, ordinal).into(),
        );
    }
}

/// Stores what is assembled so far as one message ended by `termination`, and starts afresh.
pub(super) async fn finish_message(
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
    let continuing = std::mem::take(&mut reply.continuing);
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
    if continuing {
        metadata.insert(CONTINUATION_KEY.into(), WHOLE.into());
    }
    if let Some(error) = errors.last().cloned().or(failure) {
        metadata.insert("error".into(), error.into());
    }
    // A message whose chunks named no id (no `start`, or none that named one) is stored
    // under the id a `start` would have been given: never an empty id.
    let id = match message["id"].as_str() {
        Some(id) if !id.is_empty() => id.to_string(),
        _ => crate::ids::reply_message_id(&job.dispatch_id, reply.index),
    };
    let content = json!({"id": id, "role": "assistant", "parts": message["parts"]});
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

pub(super) async fn finish_incomplete(
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
pub(super) async fn store(
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
