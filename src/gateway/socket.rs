//! One WebSocket connection: reads frames, runs its channels, writes replies and pushes.
//!
//! The connection task owns all channel state; a separate writer task drains a bounded queue of
//! outgoing frames into the socket, so a slow client fills its own queue and nothing else.

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use axum::extract::ws::{CloseFrame, Message, WebSocket};
use futures_util::stream::FuturesOrdered;
use futures_util::{SinkExt, StreamExt};
use serde::Deserialize;
use serde_json::value::RawValue;
use serde_json::{Value, json};
use tokio::sync::mpsc;
use tokio::time::Instant;

use super::SocketSlot;
use super::frame::{self, InFrame, Vsn};
use crate::api::messages::{InvalidMessage, MessageInput, build_append};
use crate::api::{ApiError, SharedState};
use crate::hub::{Listener, LiveEvent, Subscription};
use crate::shard::{AppendOrder, AppendResult, ShardError};

/// Messages in a join reply.
const JOIN_REPLAY_LIMIT: usize = 100;
/// Sends one socket may have waiting for their fsync; past it the socket reads no more frames.
const MAX_SENDS_IN_FLIGHT: usize = 64;
const CLOSE_MESSAGE_TOO_BIG: u16 = 1009;
const CLOSE_SERVICE_RESTART: u16 = 1012;
const CLOSE_TRY_AGAIN_LATER: u16 = 1013;
const CLOSE_TOKEN_EXPIRED: u16 = 4001;
const NULL: &str = "null";
/// At shutdown, how long sends already taken are given to become durable and be answered.
const SHUTDOWN_ACK_WAIT: Duration = Duration::from_secs(5);
/// Queued frames written before one flush (bounded so a close signal is never far behind).
const MAX_FRAMES_PER_FLUSH: usize = 64;

/// Where a send's reply goes.
struct ReplyTo {
    join_ref: String,
    reference: String,
    topic: String,
    /// When the frame was handled, for the server-side send → ack latency.
    received_at: Instant,
}

impl ReplyTo {
    /// Where the reply to `frame` goes (the frame is consumed; its payload was read before).
    fn to(frame: InFrame) -> ReplyTo {
        ReplyTo {
            join_ref: frame.join_ref,
            reference: frame.reference,
            topic: frame.topic,
            received_at: Instant::now(),
        }
    }
}

/// A frame for the socket's writer task. Boxed so the queue holds pointers: its first block of
/// slots is allocated with the socket and kept while it is idle (256 bytes instead of 1.5 KiB).
type Outgoing = Box<Message>;

/// What a frame answered later waits for.
enum Pending {
    /// A `send` or `regenerate`: its append.
    Append(Result<AppendResult, ShardError>),
    /// A `cancel`: the answer object, or the error.
    Cancel(Result<Value, ApiError>),
}

type PendingSend = std::pin::Pin<Box<dyn std::future::Future<Output = (ReplyTo, Pending)> + Send>>;

struct SessionChannel {
    join_ref: String,
    session_id: Arc<str>,
    is_user: bool,
    /// The next seq this channel may deliver; lower ones were already delivered.
    next_seq: u64,
    /// `None` once the channel asked the client to resync and stopped listening.
    subscription: Option<Subscription>,
    /// The dispatch whose chunks this channel forwards, and the index of the next one it may
    /// forward: from the join's snapshot (what it covers was seen), then from each forwarded
    /// chunk. A chunk of another dispatch is forwarded only if it is that dispatch's first
    /// (index 0), so a joiner never gets the tail of a message it did not see begin.
    stream_next: Option<(Arc<str>, u64)>,
}

struct InboxChannel {
    join_ref: String,
    /// Changed entries not pushed yet, by session.
    pending: HashMap<Arc<str>, Arc<Value>>,
    last_push: Option<Instant>,
    _subscription: Subscription,
}

enum Channel {
    Session(SessionChannel),
    Inbox(InboxChannel),
}

impl Channel {
    fn join_ref(&self) -> &str {
        match self {
            Channel::Session(c) => &c.join_ref,
            Channel::Inbox(c) => &c.join_ref,
        }
    }
}

struct Socket {
    state: SharedState,
    identity: Arc<str>,
    vsn: Vsn,
    out: mpsc::Sender<Outgoing>,
    listener: Listener,
    channels: HashMap<String, Channel>,
    /// Topic of each joined session channel, to route live events.
    session_topics: HashMap<Arc<str>, String>,
    last_received: Instant,
    expires_at: Option<Instant>,
    closing: bool,
    close_now: Option<tokio::sync::oneshot::Sender<u16>>,
    /// Keeps this socket's sends stored in the order they were sent.
    append_order: AppendOrder,
}

pub async fn run(
    websocket: WebSocket,
    state: SharedState,
    identity: String,
    vsn: Vsn,
    expires_at_secs: Option<i64>,
    _slot: SocketSlot,
) {
    let config = state.config.clone();
    let (mut sink, mut stream) = websocket.split();
    let (out, mut outgoing) = mpsc::channel::<Outgoing>(config.ws_outbound_queue);
    // Jumps the queue: a client too slow to drain it is closed with 1013 at once.
    let (close_now, mut close_signal) = tokio::sync::oneshot::channel::<u16>();
    let writer = tokio::spawn(async move {
        let mut signal_open = true;
        loop {
            tokio::select! {
                biased;
                code = &mut close_signal, if signal_open => {
                    // A dropped sender only means the connection task ended: drain the queue.
                    let Ok(code) = code else {
                        signal_open = false;
                        continue;
                    };
                    let frame = CloseFrame { code, reason: "outbound queue full".into() };
                    let _ = sink.send(Message::Close(Some(frame))).await;
                    break;
                }
                message = outgoing.recv() => {
                    let Some(message) = message else { break };
                    // Everything already queued goes out with one flush: one write for the
                    // replies and pushes of a whole commit instead of one per frame.
                    let mut is_close = matches!(*message, Message::Close(_));
                    let mut written = sink.feed(*message).await.is_ok();
                    let mut batched = 1;
                    while written && !is_close && batched < MAX_FRAMES_PER_FLUSH {
                        let Ok(message) = outgoing.try_recv() else { break };
                        is_close = matches!(*message, Message::Close(_));
                        written = sink.feed(*message).await.is_ok();
                        batched += 1;
                    }
                    if !written || sink.flush().await.is_err() || is_close {
                        break;
                    }
                }
            }
        }
        let _ = sink.close().await;
    });
    let (events, mut live) = mpsc::channel::<Arc<LiveEvent>>(config.ws_outbound_queue);
    let now_secs = state.clock.now_micros() / 1_000_000;
    let expires_at =
        expires_at_secs.map(|exp| Instant::now() + Duration::from_secs(exp.saturating_sub(now_secs).max(0) as u64));
    let mut socket = Socket {
        listener: state.hub.new_listener(events),
        state: state.clone(),
        identity: Arc::from(identity),
        vsn,
        out,
        channels: HashMap::new(),
        session_topics: HashMap::new(),
        last_received: Instant::now(),
        expires_at,
        closing: false,
        close_now: Some(close_now),
        append_order: AppendOrder::default(),
    };
    let mut shutdown = state.shutdown.clone();
    metrics::gauge!("fleetlm_sockets").increment(1.0);
    let timer = tokio::time::sleep_until(socket.next_deadline());
    tokio::pin!(timer);
    // Sends waiting for durability, answered in the order they came in.
    let mut pending: FuturesOrdered<PendingSend> = FuturesOrdered::new();
    // Set when the server shuts down: no more frames are read, sends in flight are answered,
    // then the socket closes with 1012 (at the latest at this deadline).
    let mut draining_until: Option<Instant> = None;
    while !socket.closing {
        tokio::select! {
            Some((reply_to, result)) = pending.next(), if !pending.is_empty() => {
                match result {
                    Pending::Append(result) => socket.finish_send(reply_to, result),
                    Pending::Cancel(result) => socket.finish_cancel(reply_to, result),
                }
                if draining_until.is_some() && pending.is_empty() {
                    socket.close(CLOSE_SERVICE_RESTART, "server restarting");
                }
            }
            incoming = stream.next(), if pending.len() < MAX_SENDS_IN_FLIGHT && draining_until.is_none() => match incoming {
                Some(Ok(Message::Text(text))) => {
                    socket.last_received = Instant::now();
                    if text.len() > config.ws_max_frame_bytes {
                        socket.close(CLOSE_MESSAGE_TOO_BIG, "frame too large");
                    } else if let Some(send) = Box::pin(socket.handle_text(text.as_str())).await {
                        pending.push_back(send);
                    }
                }
                Some(Ok(Message::Binary(bytes))) => {
                    socket.last_received = Instant::now();
                    if bytes.len() > config.ws_max_frame_bytes {
                        socket.close(CLOSE_MESSAGE_TOO_BIG, "frame too large");
                    }
                }
                Some(Ok(Message::Ping(_) | Message::Pong(_))) => socket.last_received = Instant::now(),
                Some(Ok(Message::Close(_))) | None | Some(Err(_)) => break,
            },
            Some(event) = live.recv() => socket.handle_live(event),
            () = &mut timer => socket.on_timer(),
            // An async block: `select!` builds every branch's future on every turn, even a
            // disabled one, and a timer (with a clock read) per frame is waste.
            () = async { if let Some(deadline) = draining_until { tokio::time::sleep_until(deadline).await } }, if draining_until.is_some() => {
                socket.close(CLOSE_SERVICE_RESTART, "server restarting");
            }
            changed = shutdown.changed(), if draining_until.is_none() => {
                if changed.is_err() || *shutdown.borrow() {
                    if pending.is_empty() {
                        socket.close(CLOSE_SERVICE_RESTART, "server restarting");
                    } else {
                        draining_until = Some(Instant::now() + SHUTDOWN_ACK_WAIT);
                    }
                }
            }
        }
        socket.check_overflow();
        timer.as_mut().reset(socket.next_deadline());
    }
    // Sends still pending are stored all the same (they are queued at their shards, all but
    // those waiting behind a send's archive round trip); only their replies are lost with the
    // connection.
    drop(pending);
    metrics::gauge!("fleetlm_sockets").decrement(1.0);
    metrics::gauge!("fleetlm_joined_channels").decrement(socket.channels.len() as f64);
    drop(socket);
    // Give the writer a moment to deliver the close frame to a client that still reads.
    let abort = writer.abort_handle();
    if tokio::time::timeout(Duration::from_secs(2), writer).await.is_err() {
        abort.abort();
    }
}

#[derive(Deserialize)]
struct JoinSessionParams {
    #[serde(default)]
    last_seq: Option<u64>,
}

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

/// The first seq a joined channel delivers live: the one after the replay. A client claiming
/// more than the session holds (any u64 is accepted) starts after the session's last seq.
fn first_live_seq(claimed_last_seq: u64, session_last_seq: u64, replayed: usize) -> u64 {
    claimed_last_seq
        .min(session_last_seq)
        .saturating_add(replayed as u64)
        .saturating_add(1)
}

impl Socket {
    fn next_deadline(&self) -> Instant {
        let mut deadline = self.last_received + self.state.config.ws_idle_timeout;
        if let Some(expires_at) = self.expires_at {
            deadline = deadline.min(expires_at);
        }
        let interval = self.state.config.inbox_push_interval;
        for channel in self.channels.values() {
            if let Channel::Inbox(inbox) = channel
                && !inbox.pending.is_empty()
            {
                deadline = deadline.min(inbox.last_push.map_or_else(Instant::now, |at| at + interval));
            }
        }
        deadline
    }

    /// Queues a frame; a client too slow to take it is disconnected rather than slowing anyone.
    fn send(&mut self, text: String) {
        if self.closing {
            return;
        }
        match self.out.try_send(Box::new(Message::Text(text.into()))) {
            Ok(()) => {}
            Err(mpsc::error::TrySendError::Full(_)) => {
                metrics::counter!("fleetlm_socket_closed_slow_total").increment(1);
                if let Some(close_now) = self.close_now.take() {
                    let _ = close_now.send(CLOSE_TRY_AGAIN_LATER);
                }
                self.closing = true;
            }
            Err(mpsc::error::TrySendError::Closed(_)) => self.closing = true,
        }
    }

    fn close(&mut self, code: u16, reason: &str) {
        if self.closing {
            return;
        }
        let frame = CloseFrame {
            code,
            reason: reason.into(),
        };
        let _ = self.out.try_send(Box::new(Message::Close(Some(frame))));
        self.closing = true;
    }

    fn reply(&mut self, frame: &InFrame, status: &str, response: &str) {
        let text = frame::reply(
            self.vsn,
            &frame.join_ref,
            &frame.reference,
            &frame.topic,
            status,
            response,
        );
        self.send(text);
    }

    fn error_reply(&mut self, frame: &InFrame, response: Value) {
        self.reply(frame, "error", &response.to_string());
    }

    fn push(&mut self, join_ref: &str, topic: &str, event: &str, payload: &str) {
        let text = frame::encode(self.vsn, join_ref, NULL, topic, event, payload);
        self.send(text);
    }

    /// Handles one frame; a `send` returns the future of its reply.
    async fn handle_text(&mut self, text: &str) -> Option<PendingSend> {
        let frame = match frame::parse(text, self.vsn) {
            Ok(frame) => frame,
            Err(bad) => {
                if let (Some(topic), Some(reference)) = (bad.topic, bad.reference) {
                    let join_ref = bad.join_ref.unwrap_or_else(|| NULL.into());
                    let response = json!({"reason": bad.reason}).to_string();
                    let text = frame::reply(self.vsn, &join_ref, &reference, &topic, "error", &response);
                    self.send(text);
                }
                metrics::counter!("fleetlm_socket_bad_frames_total").increment(1);
                return None;
            }
        };
        match (frame.topic.as_str(), frame.event.as_str()) {
            ("phoenix", "heartbeat") => self.reply(&frame, "ok", "{}"),
            (_, "phx_join") => self.join(frame).await,
            (_, "phx_leave") => self.leave(&frame),
            _ if !self.channels.contains_key(&frame.topic) => {
                self.error_reply(&frame, json!({"reason": "unmatched topic"}));
            }
            (_, "send") => return self.send_message(frame).await,
            (_, "regenerate") => return self.regenerate(frame).await,
            (_, "cancel") => return self.cancel(frame),
            (_, "typing") => self.typing(&frame),
            _ => self.error_reply(&frame, json!({"reason": "unknown_event"})),
        }
        None
    }

    async fn join(&mut self, frame: InFrame) {
        let is_session = frame.topic.starts_with("session:");
        if !is_session && !frame.topic.starts_with("inbox:") {
            self.error_reply(&frame, json!({"reason": "unmatched topic"}));
            return;
        }
        if let Some(old) = self.remove_channel(&frame.topic) {
            // A second join of the same topic replaces the first membership.
            let join_ref = old.join_ref().to_string();
            let text = frame::encode(self.vsn, &join_ref, &join_ref, &frame.topic, "phx_close", "{}");
            self.send(text);
        }
        if self.channels.len() >= self.state.config.ws_max_channels {
            self.error_reply(&frame, json!({"reason": "too many channels on this socket"}));
            return;
        }
        if is_session {
            self.join_session(frame).await;
        } else {
            self.join_inbox(frame).await;
        }
    }

    async fn join_session(&mut self, frame: InFrame) {
        let session_id = frame.topic["session:".len()..].to_string();
        let Ok(params) = serde_json::from_str::<JoinSessionParams>(frame.payload.get()) else {
            self.error_reply(&frame, json!({"reason": "last_seq must be a non-negative integer"}));
            return;
        };
        let last_seq = params.last_seq.unwrap_or(0);
        let view = match self.state.shards.view(&session_id).await {
            Ok(view) => view,
            Err(ShardError::NotFound) => {
                return self.error_reply(&frame, json!({"reason": "not found"}));
            }
            Err(error) => {
                return self.error_reply(&frame, json!({"reason": ApiError::from(error).message}));
            }
        };
        let is_user = *view.record.user_id == *self.identity;
        if !is_user && *view.record.agent_id != *self.identity {
            self.error_reply(&frame, json!({"reason": "unauthorized"}));
            return;
        }
        // Listen before reading the replay: anything committed after the read arrives live,
        // anything in both is dropped by seq.
        let subscription = self
            .state
            .hub
            .subscribe_session(view.record.id.clone(), self.listener.clone());
        let page = match self
            .state
            .shards
            .read_messages(&session_id, last_seq, JOIN_REPLAY_LIMIT)
            .await
        {
            Ok(page) => page,
            Err(error) => {
                return self.error_reply(&frame, json!({"reason": ApiError::from(error).message}));
            }
        };
        let messages: Vec<&crate::model::Message> = page.messages.iter().map(|r| &r.message).collect();
        let next_seq = first_live_seq(last_seq, page.session.last_seq, messages.len());
        // A reply streaming right now: the joiner gets its message so far (chunks and all) right
        // after the join reply, then only the chunks after it. Taken after subscribing, so the
        // chunks queued meanwhile are told apart by index.
        let mut snapshot = self.state.streams.snapshot(&session_id);
        if snapshot.is_none()
            && let Some(consensus) = &self.state.consensus
        {
            // In a cluster the shard's leader dispatches: it has the reply streaming now.
            let shard = self.state.shards.shard_of(&session_id);
            snapshot = crate::cluster::remote_stream_snapshot(consensus, shard, &session_id).await;
        }
        let stream = snapshot
            .as_ref()
            .filter(|s| s.payload.is_some())
            .map(|s| json!({"dispatch_id": &*s.dispatch_id, "agent_id": s.agent_id}));
        let response = json!({
            "session_id": &*view.record.id,
            "messages": messages,
            "has_more": page.has_more,
            "last_seq": page.session.last_seq,
            "stream": stream,
        });
        self.reply(&frame, "ok", &response.to_string());
        if let Some(payload) = snapshot.as_ref().and_then(|s| s.payload.as_ref()) {
            self.push(&frame.join_ref, &frame.topic, "stream_snapshot", &payload.to_string());
        }
        self.session_topics.insert(view.record.id.clone(), frame.topic.clone());
        let channel = SessionChannel {
            join_ref: frame.join_ref,
            session_id: view.record.id.clone(),
            is_user,
            next_seq,
            subscription: Some(subscription),
            stream_next: snapshot.map(|s| (s.dispatch_id, s.next_index)),
        };
        self.channels.insert(frame.topic, Channel::Session(channel));
        metrics::gauge!("fleetlm_joined_channels").increment(1.0);
    }

    async fn join_inbox(&mut self, frame: InFrame) {
        let user_id = &frame.topic["inbox:".len()..];
        if user_id != &*self.identity {
            self.error_reply(&frame, json!({"reason": "unauthorized"}));
            return;
        }
        let subscription = self
            .state
            .hub
            .subscribe_inbox(self.identity.clone(), self.listener.clone());
        let entries = match crate::api::sessions::inbox_entries(&self.state, user_id).await {
            Ok(entries) => entries,
            Err(error) => return self.error_reply(&frame, json!({"reason": error.message})),
        };
        self.reply(&frame, "ok", &json!({"inbox": entries}).to_string());
        let channel = InboxChannel {
            join_ref: frame.join_ref,
            pending: HashMap::new(),
            last_push: None,
            _subscription: subscription,
        };
        self.channels.insert(frame.topic, Channel::Inbox(channel));
        metrics::gauge!("fleetlm_joined_channels").increment(1.0);
    }

    fn remove_channel(&mut self, topic: &str) -> Option<Channel> {
        let channel = self.channels.remove(topic)?;
        if let Channel::Session(session) = &channel {
            self.session_topics.remove(&session.session_id);
        }
        metrics::gauge!("fleetlm_joined_channels").decrement(1.0);
        Some(channel)
    }

    fn leave(&mut self, frame: &InFrame) {
        let Some(channel) = self.remove_channel(&frame.topic) else {
            self.error_reply(frame, json!({"reason": "unmatched topic"}));
            return;
        };
        self.reply(frame, "ok", "{}");
        let join_ref = channel.join_ref().to_string();
        let text = frame::encode(self.vsn, &join_ref, &join_ref, &frame.topic, "phx_close", "{}");
        self.send(text);
    }

    /// Validates a `send` and submits it to its shard (in arrival order); the reply follows
    /// once it is durable.
    async fn send_message(&mut self, frame: InFrame) -> Option<PendingSend> {
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
    fn cancel(&mut self, frame: InFrame) -> Option<PendingSend> {
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

    fn finish_cancel(&mut self, reply_to: ReplyTo, result: Result<Value, ApiError>) {
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
    async fn regenerate(&mut self, frame: InFrame) -> Option<PendingSend> {
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

    fn finish_send(&mut self, reply_to: ReplyTo, result: Result<AppendResult, ShardError>) {
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

    fn typing(&mut self, frame: &InFrame) {
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

    fn handle_live(&mut self, event: Arc<LiveEvent>) {
        match &*event {
            LiveEvent::Message { session_id, seq, json } => {
                let Some(topic) = self.session_topics.get(&**session_id).cloned() else {
                    return;
                };
                let Some(Channel::Session(channel)) = self.channels.get_mut(&topic) else {
                    return;
                };
                if channel.subscription.is_none() || *seq < channel.next_seq {
                    return;
                }
                if *seq > channel.next_seq {
                    self.resync(&topic);
                    return;
                }
                channel.next_seq += 1;
                let join_ref = channel.join_ref.clone();
                let payload = std::str::from_utf8(json).unwrap_or("{}");
                let text = frame::encode(self.vsn, &join_ref, NULL, &topic, "message", payload);
                self.send(text);
            }
            LiveEvent::Push {
                session_id,
                event,
                json,
            } => {
                let Some(topic) = self.session_topics.get(&**session_id).cloned() else {
                    return;
                };
                let Some(channel) = self.channels.get(&topic) else {
                    return;
                };
                let join_ref = channel.join_ref().to_string();
                self.push(&join_ref, &topic, event, std::str::from_utf8(json).unwrap_or("{}"));
            }
            LiveEvent::StreamChunk {
                session_id,
                dispatch_id,
                index,
                json,
            } => {
                let Some(topic) = self.session_topics.get(&**session_id).cloned() else {
                    return;
                };
                let Some(Channel::Session(channel)) = self.channels.get_mut(&topic) else {
                    return;
                };
                // Chunks the join's snapshot covered, and chunks of a message that began before
                // the join, are skipped.
                let forward = match &channel.stream_next {
                    Some((id, next)) if id == dispatch_id => *index >= *next,
                    _ => *index == 0,
                };
                if !forward {
                    return;
                }
                channel.stream_next = Some((dispatch_id.clone(), index + 1));
                let join_ref = channel.join_ref.clone();
                self.push(
                    &join_ref,
                    &topic,
                    "stream_chunk",
                    std::str::from_utf8(json).unwrap_or("{}"),
                );
            }
            LiveEvent::Typing { session_id, json, .. } => {
                let Some(topic) = self.session_topics.get(&**session_id).cloned() else {
                    return;
                };
                let Some(channel) = self.channels.get(&topic) else {
                    return;
                };
                let join_ref = channel.join_ref().to_string();
                self.push(&join_ref, &topic, "typing", std::str::from_utf8(json).unwrap_or("{}"));
            }
            LiveEvent::InboxEntry {
                user_id,
                session_id,
                entry,
            } => {
                let topic = format!("inbox:{user_id}");
                let Some(Channel::Inbox(inbox)) = self.channels.get_mut(&topic) else {
                    return;
                };
                inbox.pending.insert(session_id.clone(), entry.clone());
                let due = inbox
                    .last_push
                    .is_none_or(|at| at.elapsed() >= self.state.config.inbox_push_interval);
                if due {
                    self.flush_inbox(&topic);
                }
            }
        }
    }

    /// Tells the client this channel missed messages: it should rejoin from the last seq it got.
    fn resync(&mut self, topic: &str) {
        let Some(Channel::Session(channel)) = self.channels.get_mut(topic) else {
            return;
        };
        if channel.subscription.take().is_none() {
            return;
        }
        metrics::counter!("fleetlm_socket_resyncs_total").increment(1);
        let payload = json!({"last_seq": channel.next_seq - 1}).to_string();
        let join_ref = channel.join_ref.clone();
        self.push(&join_ref, topic, "resync", &payload);
    }

    fn check_overflow(&mut self) {
        if !self.listener.overflowed.swap(false, Ordering::AcqRel) {
            return;
        }
        // Something this socket listens to was dropped; every session channel resyncs.
        let topics: Vec<String> = self.session_topics.values().cloned().collect();
        for topic in topics {
            self.resync(&topic);
        }
    }

    fn flush_inbox(&mut self, topic: &str) {
        let Some(Channel::Inbox(inbox)) = self.channels.get_mut(topic) else {
            return;
        };
        if inbox.pending.is_empty() {
            return;
        }
        let mut entries: Vec<Arc<Value>> = inbox.pending.drain().map(|(_, entry)| entry).collect();
        entries.sort_by(|a, b| b["last_activity_at"].as_str().cmp(&a["last_activity_at"].as_str()));
        inbox.last_push = Some(Instant::now());
        let join_ref = inbox.join_ref.clone();
        let payload = json!({"inbox": entries}).to_string();
        metrics::counter!("fleetlm_inbox_pushes_total").increment(1);
        self.push(&join_ref, topic, "inbox_delta", &payload);
    }

    fn on_timer(&mut self) {
        let now = Instant::now();
        if self.expires_at.is_some_and(|at| now >= at) {
            self.push(NULL, "phoenix", "token_expired", "{}");
            self.close(CLOSE_TOKEN_EXPIRED, "token expired");
            return;
        }
        if now >= self.last_received + self.state.config.ws_idle_timeout {
            self.close(1000, "idle timeout");
            return;
        }
        let due: Vec<String> = self
            .channels
            .iter()
            .filter_map(|(topic, channel)| match channel {
                Channel::Inbox(inbox)
                    if !inbox.pending.is_empty()
                        && inbox
                            .last_push
                            .is_none_or(|at| now >= at + self.state.config.inbox_push_interval) =>
                {
                    Some(topic.clone())
                }
                _ => None,
            })
            .collect();
        for topic in due {
            self.flush_inbox(&topic);
        }
    }
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::first_live_seq;

    proptest! {
        #[test]
        fn the_first_live_seq_follows_the_replay_and_never_overflows(
            claimed in any::<u64>(),
            session_last in any::<u64>(),
            replayed in 0usize..=100,
        ) {
            let start = claimed.min(session_last);
            // The replay holds messages after the claimed seq, never past the session's last.
            let replayed = replayed.min(usize::try_from(session_last - start).unwrap_or(usize::MAX));
            let first = first_live_seq(claimed, session_last, replayed);
            prop_assert!(first > start || start == u64::MAX);
            if session_last < u64::MAX {
                prop_assert_eq!(first, start + replayed as u64 + 1);
                prop_assert!(first <= session_last + 1);
            }
        }
    }

    #[test]
    fn a_claim_beyond_the_session_starts_after_its_last_seq() {
        assert_eq!(first_live_seq(u64::MAX, 10, 0), 11);
        assert_eq!(first_live_seq(5, 10, 5), 11);
        assert_eq!(first_live_seq(0, 0, 0), 1);
    }
}
