//! Joining and leaving channels: `session:<id>` (subscribe, then the replay and the stream
//! snapshot, so replay + live is gap-free) and `inbox:<user>`.

use std::collections::HashMap;

use serde::Deserialize;
use serde_json::json;

use super::{Channel, InboxChannel, JOIN_REPLAY_LIMIT, SessionChannel, Socket};
use crate::api::ApiError;
use crate::gateway::frame::{self, InFrame};
use crate::shard::ShardError;

#[derive(Deserialize)]
struct JoinSessionParams {
    #[serde(default)]
    last_seq: Option<u64>,
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
    pub(super) async fn join(&mut self, frame: InFrame) {
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

    pub(super) fn leave(&mut self, frame: &InFrame) {
        let Some(channel) = self.remove_channel(&frame.topic) else {
            self.error_reply(frame, json!({"reason": "unmatched topic"}));
            return;
        };
        self.reply(frame, "ok", "{}");
        let join_ref = channel.join_ref().to_string();
        let text = frame::encode(self.vsn, &join_ref, &join_ref, &frame.topic, "phx_close", "{}");
        self.send(text);
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
