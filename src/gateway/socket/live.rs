//! Live events to the client: messages (in seq order, or a `resync`), pushes, stream chunks,
//! typing, and inbox deltas (batched per push interval); a listener that overflowed resyncs.

use std::sync::Arc;
use std::sync::atomic::Ordering;

use serde_json::{Value, json};
use tokio::time::Instant;

use super::{Channel, NULL, Socket};
use crate::gateway::frame;
use crate::hub::LiveEvent;

impl Socket {
    pub(super) fn handle_live(&mut self, event: Arc<LiveEvent>) {
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

    pub(super) fn check_overflow(&mut self) {
        if !self.listener.overflowed.swap(false, Ordering::AcqRel) {
            return;
        }
        // Something this socket listens to was dropped; every session channel resyncs.
        let topics: Vec<String> = self.session_topics.values().cloned().collect();
        for topic in topics {
            self.resync(&topic);
        }
    }

    pub(super) fn flush_inbox(&mut self, topic: &str) {
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
}
