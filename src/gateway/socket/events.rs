//! The client's events on a joined session channel: `send` and `regenerate` (validated as REST
//! does, queued in order, answered once durable), `cancel`, and `typing`.

use std::sync::Arc;

use serde::Deserialize;
use serde_json::value::RawValue;
use serde_json::{Value, json};

use super::{Channel, Pending, PendingSend, ReplyTo, Socket};
use crate::api::ApiError;
use crate::api::messages::{InvalidMessage, MessageInput, build_append};
use crate::gateway::frame::{self, InFrame};
use crate::shard::{AppendResult, ShardError};

#[derive(Deserialize)]
struct SendPayload<'a> {
    #[serde(borrow)]
    content: Option<&'a RawValue>,
    #[serde(borrow, default)]
    client_id: Option<&'a RawValue>,
    #[serde(borrow, default)]
    expected_seq: Option<&'a RawValue>,
}

#[derive(Deserialize)]
struct SendContent<'a> {
    #[serde(borrow, default)]
    kind: Option<&'a RawValue>,
    #[serde(borrow, default)]
    content: Option<&'a RawValue>,
    #[serde(borrow, default)]
    metadata: Option<&'a RawValue>,
}

impl Socket {
    /// Validates a `send` and submits it to its shard (in arrival order); the reply follows
    /// once it is durable.
    pub(super) async fn send_message(&mut self, frame: InFrame) -> Option<PendingSend> {
        let Some(Channel::Session(channel)) = self.channels.get(&frame.topic) else {
            self.error_reply(&frame, json!({"reason": "unknown_event"}));
            return None;
        };
        let (session_id, is_user) = (channel.session_id.to_string(), channel.is_user);
        let invalid = |details: &str| json!({"error": "invalid_message_format", "details": details});
        let Ok(payload) = serde_json::from_str::<SendPayload<'_>>(frame.payload.get()) else {
            self.error_reply(&frame, invalid("payload must be an object"));
            return None;
        };
        let content = match payload
            .content
            .map(|raw| serde_json::from_str::<SendContent<'_>>(raw.get()))
        {
            Some(Ok(content)) => content,
            Some(Err(_)) => {
                self.error_reply(&frame, invalid("content must be a map"));
                return None;
            }
            None => {
                self.error_reply(&frame, invalid("content is required"));
                return None;
            }
        };
        let input = MessageInput {
            kind: content.kind,
            content: content.content,
            metadata: content.metadata,
            client_id: payload.client_id,
            expected_seq: payload.expected_seq,
        };
        let config = &self.state.config;
        let identity = self.identity.to_string();
        let request = build_append(
            &session_id,
            identity,
            is_user,
            input,
            config.max_message_bytes,
            config.max_metadata_depth,
        );
        let request = match request {
            Ok(request) => request,
            Err(InvalidMessage::Format(details)) => {
                self.error_reply(&frame, invalid(&details));
                return None;
            }
            Err(InvalidMessage::TooLarge(details)) => {
                self.error_reply(&frame, json!({"error": "message_too_large", "details": details}));
                return None;
            }
        };
        self.submit_append(ReplyTo::to(frame), request).await
    }

    /// Queues an append at its shard now (unless a send before it waits for an archive round
    /// trip), so the sends of one read join the writer's next batch; answered like a `send`.
    async fn submit_append(&mut self, reply_to: ReplyTo, request: crate::shard::AppendRequest) -> Option<PendingSend> {
        let outcome = self
            .state
            .shards
            .submit_append_in_order(&mut self.append_order, request)
            .await;
        Some(Box::pin(async move { (reply_to, Pending::Append(outcome.await)) }))
    }

    /// The session's user's channel, for `cancel` and `regenerate`: `(session_id)`, or an error
    /// reply sent.
    fn user_channel(&mut self, frame: &InFrame, action: &str) -> Option<Arc<str>> {
        let Some(Channel::Session(channel)) = self.channels.get(&frame.topic) else {
            self.error_reply(frame, json!({"reason": "unknown_event"}));
            return None;
        };
        if !channel.is_user {
            let details = format!("only the session's user may {action}");
            self.error_reply(frame, json!({"error": "forbidden", "details": details}));
            return None;
        }
        Some(channel.session_id.clone())
    }

    fn api_error_reply(&mut self, frame: &InFrame, error: ApiError) {
        self.error_reply(frame, json!({"error": error.code, "details": error.message}));
    }

    /// `cancel` (`{}` or `{"dispatch_id"}`): stops the session's turn; answered
    /// `{"cancelled", "dispatch_id"?}` once the cancelled dispatch has ended (or, when none was
    /// running, once the cancel is recorded in the log). The socket goes on meanwhile.
    pub(super) fn cancel(&mut self, frame: InFrame) -> Option<PendingSend> {
        let session_id = self.user_channel(&frame, "cancel its turn")?;
        let dispatch_id = match crate::api::turns::cancel_target(&frame.payload) {
            Ok(dispatch_id) => dispatch_id,
            Err(error) => {
                self.api_error_reply(&frame, error);
                return None;
            }
        };
        let reply_to = ReplyTo::to(frame);
        let state = self.state.clone();
        Some(Box::pin(async move {
            let answer = match state.shards.view(&session_id).await {
                Ok(view) => crate::api::turns::cancel_turn(&state, &view, dispatch_id).await,
                Err(error) => Err(ApiError::from(error)),
            };
            (reply_to, Pending::Cancel(answer))
        }))
    }

    pub(super) fn finish_cancel(&mut self, reply_to: ReplyTo, result: Result<Value, ApiError>) {
        let (status, response) = match result {
            Ok(answer) => ("ok", answer),
            Err(error) => ("error", json!({"error": error.code, "details": error.message})),
        };
        let text = frame::reply(
            self.vsn,
            &reply_to.join_ref,
            &reply_to.reference,
            &reply_to.topic,
            status,
            &response.to_string(),
        );
        self.send(text);
    }

    /// `regenerate` (`{}` or `{"message_id", "client_id"?}`): stores a `regenerate` message of
    /// the session's user, answered like a `send`.
    pub(super) async fn regenerate(&mut self, frame: InFrame) -> Option<PendingSend> {
        let session_id = self.user_channel(&frame, "regenerate a reply")?;
        let request = crate::api::turns::regenerate_request(&self.state, &session_id, &self.identity, &frame.payload);
        let request = match request {
            Ok(request) => request,
            Err(error) => {
                self.api_error_reply(&frame, error);
                return None;
            }
        };
        self.submit_append(ReplyTo::to(frame), request).await
    }

    pub(super) fn finish_send(&mut self, reply_to: ReplyTo, result: Result<AppendResult, ShardError>) {
        let ReplyTo {
            join_ref,
            reference,
            topic,
            received_at,
        } = reply_to;
        metrics::histogram!("fleetlm_ws_send_seconds").record(received_at.elapsed().as_secs_f64());
        match result {
            Ok(result) => {
                let mut response = json!({"seq": result.record.message.seq});
                if result.deduplicated {
                    response["deduplicated"] = Value::Bool(true);
                }
                let outcome = if result.deduplicated {
                    "deduplicated"
                } else {
                    "appended"
                };
                metrics::counter!("fleetlm_appends_total", "result" => outcome).increment(1);
                let text = frame::reply(self.vsn, &join_ref, &reference, &topic, "ok", &response.to_string());
                self.send(text);
            }
            Err(error) => {
                metrics::counter!("fleetlm_appends_total", "result" => "refused").increment(1);
                let overloaded = matches!(error, ShardError::Overloaded);
                let api_error = ApiError::from(error);
                let mut response = json!({"error": api_error.code, "details": api_error.message});
                if let Some((key, value)) = api_error.extra {
                    response[key] = value;
                }
                if let Some(seconds) = api_error.retry_after_secs {
                    response["retry_after_ms"] = json!(seconds * 1000);
                }
                let text = frame::reply(self.vsn, &join_ref, &reference, &topic, "error", &response.to_string());
                self.send(text);
                if overloaded {
                    let payload = json!({"reason": "overloaded", "retry_after_ms": 1000}).to_string();
                    self.push(&join_ref, &topic, "backpressure", &payload);
                }
            }
        }
    }

    pub(super) fn typing(&mut self, frame: &InFrame) {
        let Some(Channel::Session(channel)) = self.channels.get(&frame.topic) else {
            self.error_reply(frame, json!({"reason": "unknown_event"}));
            return;
        };
        let session_id = channel.session_id.clone();
        let typing = serde_json::from_str::<Value>(frame.payload.get())
            .ok()
            .and_then(|p| p["typing"].as_bool());
        let Some(typing) = typing else {
            self.error_reply(frame, json!({"reason": "typing must be a boolean"}));
            return;
        };
        let payload = json!({"user_id": &*self.identity, "typing": typing}).to_string();
        self.state
            .hub
            .publish_typing(&session_id, self.listener.id, payload.into());
        self.reply(frame, "ok", "{}");
    }
}
