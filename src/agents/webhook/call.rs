//! One HTTP attempt of a dispatch: the request with the agent's headers and its Standard
//! Webhooks signature, the response read as a stream of lines or as one JSON value (whichever
//! the body is, whatever its declared type), and transport failures named for people.

use std::time::Duration;

use futures_util::StreamExt;
use serde_json::{Map, Value, json};

use super::messages::{ReplyState, finish_incomplete, finish_message, handle_line, store};
use super::{CallError, DispatchJob, is_retryable_status};
use crate::agents::EngineContext;
use crate::agents::continuation::Continuable;
use crate::agents::reply::{BodyEnd, BodyError, ReplyBody};
use crate::agents::signing;
use crate::model::{Agent, Timestamp};

/// One attempt's circumstances.
pub(super) struct Turn<'a> {
    pub(super) final_attempt: bool,
    /// Said in the metadata of every message of the reply (`replaces`).
    pub(super) replaces: Option<&'a str>,
    /// The newest user message the reply answers (`answers_seq` in its messages' metadata).
    pub(super) answers_through: u64,
}

/// One HTTP attempt: send, then read the reply line by line until it ends. A reply cut off
/// mid-way is stored as `incomplete` only on the final attempt: an earlier one is retried, and
/// the retry's messages take the same `(turn id, ordinal)` keys.
pub(super) async fn call(
    context: &EngineContext,
    agent: &Agent,
    job: &DispatchJob,
    body: &Value,
    turn: Turn<'_>,
    http_status: &mut Option<u16>,
) -> Result<(), CallError> {
    let Turn {
        final_attempt,
        replaces,
        answers_through,
    } = turn;
    let continuable = body["messages"]
        .as_array()
        .map(|history| Continuable::from_history(history))
        .unwrap_or_default();
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
    // Signed over the exact bytes sent; `webhook-id` is the turn's id, the same on every
    // attempt (as `idempotency-key`), so an agent can refuse a replayed call.
    let body = body.to_string();
    let signed = signing::sign(
        &agent.signing,
        &job.dispatch_id,
        Timestamp(context.clock.now_micros()),
        body.as_bytes(),
    );
    request = request
        .header("webhook-id", signed.webhook_id)
        .header("webhook-timestamp", signed.webhook_timestamp);
    if let Some(signature) = signed.webhook_signature {
        request = request.header("webhook-signature", signature);
    }
    let request = request.body(body);
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
            if crate::agents::http::uses_h2c(agent)
                && crate::agents::http::failed_for_want_of_http2(agent, &error).await
            {
                // Registered with `http2: true` but the agent speaks HTTP/1.1 only: a
                // registration mistake that another attempt will not fix.
                tracing::warn!(agent_id = %agent.id, error = %error.without_url(), "the agent does not speak HTTP/2 (it is registered with http2: true)");
                metrics::counter!("fleetlm_webhook_failures_total", "reason" => "not HTTP/2").increment(1);
                return Err(CallError::Fatal(crate::agents::http::NOT_HTTP2.into()));
            }
            return Err(CallError::Retryable {
                reason: transport_failure(agent, error).into(),
                retry_after: None,
            });
        }
        Ok(Ok(response)) => response,
    };
    let status_code = response.status().as_u16();
    *http_status = Some(status_code);
    if response.status().is_redirection() {
        // Never followed (the agent's headers would go wherever it points): not retried.
        return Err(CallError::Fatal(format!(
            "{} (HTTP {status_code})",
            crate::agents::http::REDIRECTED
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
        continuable,
        continuing: false,
    };
    let mut reader = ReplyBody::new(context.config.max_reply_line_bytes);
    let malformed = |error: BodyError| {
        if matches!(error, BodyError::NotJson(_) | BodyError::BadLine(_)) {
            metrics::counter!("fleetlm_webhook_malformed_lines_total").increment(1);
        }
        CallError::Fatal(error.to_string())
    };
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
        for line in reader.feed(&bytes).map_err(malformed)? {
            if handle_line(context, agent, job, &mut reply, &line).await? {
                break 'read;
            }
        }
    }
    match reader.finish().map_err(malformed)? {
        BodyEnd::Lines(lines) => {
            for line in lines {
                if handle_line(context, agent, job, &mut reply, &line).await? {
                    break;
                }
            }
        }
        BodyEnd::Value(value) => one_value_reply(context, agent, job, &mut reply, value).await?,
    }
    finish_incomplete(context, agent, job, &mut reply).await?;
    match reply.failure {
        Some(failure) => Err(CallError::Fatal(failure)),
        None => Ok(()),
    }
}

/// A body that was one JSON value (`ReplyBody`): a UI message (`{"role": "assistant", "parts":
/// [...]}`, stored as one message, under the reply's id if it names none), an array of chunks
/// or legacy lines, or one chunk or legacy line.
async fn one_value_reply(
    context: &EngineContext,
    agent: &Agent,
    job: &DispatchJob,
    reply: &mut ReplyState,
    value: Value,
) -> Result<(), CallError> {
    let items = match value {
        Value::Array(items) => items,
        Value::Object(message) if message.get("parts").is_some_and(Value::is_array) => {
            let mut metadata = match message.get("metadata") {
                Some(Value::Object(map)) => map.clone(),
                _ => Map::new(),
            };
            metadata.insert("termination".into(), "finish".into());
            metadata.insert("dispatch_id".into(), Value::String(job.dispatch_id.to_string()));
            let id = match message.get("id") {
                Some(Value::String(id)) if !id.is_empty() => id.clone(),
                _ => crate::ids::reply_message_id(&job.dispatch_id, reply.index),
            };
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
    Ok(())
}

/// What went wrong reaching the agent, in words fit for the session's members: the cause
/// ("connection refused", "timed out"), never the URL, its query (which may carry a key) or an
/// address. Operators get the detail in the log and in `fleetlm_webhook_failures_total{reason}`.
pub(super) fn transport_failure(agent: &Agent, error: reqwest::Error) -> &'static str {
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
