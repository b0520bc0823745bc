//! One WebSocket connection: reads frames, runs its channels, writes replies and pushes.
//!
//! The connection task owns all channel state; a separate writer task drains a bounded queue of
//! outgoing frames into the socket, so a slow client fills its own queue and nothing else.
//!
//! This file holds the connection (its loop, the writer task, the socket's state, frames in and
//! out, timers); `join.rs` joins and leaves channels, `events.rs` handles the client's events on
//! a joined channel (`send`, `regenerate`, `cancel`, `typing`), `live.rs` forwards live events.

mod events;
mod join;
mod live;

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use axum::extract::ws::{CloseFrame, Message, WebSocket};
use futures_util::stream::FuturesOrdered;
use futures_util::{SinkExt, StreamExt};
use serde_json::{Value, json};
use tokio::sync::mpsc;
use tokio::time::Instant;

use super::SocketSlot;
use super::frame::{self, InFrame, Vsn};
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
