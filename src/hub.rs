//! Live fan-out: who listens to which session and which user's inbox, and delivery of committed
//! events to them without ever waiting on a listener.
//!
//! The shard writer publishes after an entry is durable; each listener has a bounded queue, and
//! a listener whose queue is full is marked overflowed instead of slowing the writer (its socket
//! then tells the client to resync). A message's JSON is encoded once per publish and the same
//! bytes are shared by every listener.
//!
//! Architecture invariant: knows sessions and users, not the wire protocol; never blocks.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use bytes::Bytes;
use tokio::sync::mpsc;

use crate::model::{MessageRecord, SessionView};

/// What a listener receives.
#[derive(Debug, Clone)]
pub enum LiveEvent {
    /// A committed message of `session_id`; `json` is the Message as stored.
    Message {
        session_id: Arc<str>,
        seq: u64,
        json: Bytes,
    },
    /// Someone typing in `session_id` (never stored); not sent back to `from_listener`.
    Typing {
        session_id: Arc<str>,
        from_listener: u64,
        json: Bytes,
    },
    /// A push for the session's members that is not stored: `agent_status`, `stream_snapshot`.
    Push {
        session_id: Arc<str>,
        event: &'static str,
        json: Bytes,
    },
    /// One chunk of an agent reply streaming into the session; `index` counts from 0 per dispatch.
    StreamChunk {
        session_id: Arc<str>,
        dispatch_id: Arc<str>,
        index: u64,
        json: Bytes,
    },
    /// A session of the listening user changed; `entry` is its inbox entry.
    InboxEntry {
        user_id: Arc<str>,
        session_id: Arc<str>,
        entry: Arc<serde_json::Value>,
    },
}

/// One socket's queue, shared by all its subscriptions.
#[derive(Clone)]
pub struct Listener {
    pub id: u64,
    /// Events are shared (one allocation per publish, not per listener) and the queue holds
    /// only pointers, which keeps an idle socket's queue small.
    pub queue: mpsc::Sender<Arc<LiveEvent>>,
    /// Set when an event could not be queued: the listener has missed something.
    pub overflowed: Arc<AtomicBool>,
}

impl Listener {
    fn deliver(&self, event: Arc<LiveEvent>) {
        if self.queue.try_send(event).is_err() {
            self.overflowed.store(true, Ordering::Release);
            metrics::counter!("fleetlm_outbound_overflows_total").increment(1);
        }
    }
}

type Registry = Mutex<HashMap<Arc<str>, Vec<Listener>>>;

/// Inbox listeners are split by a hash of the user id into this many registries (the shard
/// writers publish inbox changes concurrently; one lock for all users made them contend).
const INBOX_REGISTRIES: usize = 64;

pub struct Hub {
    /// Session listeners, one map per shard so writers of different shards never contend.
    sessions: Vec<Registry>,
    /// Inbox listeners, split by user ([`INBOX_REGISTRIES`]).
    inboxes: Vec<Registry>,
    /// Counts inbox registry lookups (tests check a batch costs one per user, not per session).
    #[cfg(test)]
    inbox_lookups: AtomicU64,
    next_listener_id: AtomicU64,
    shard_count: u16,
    /// Cluster mode: ephemeral events published here also go to the other nodes' listeners
    /// (messages do not: every node publishes those from its own applied log).
    relay: std::sync::OnceLock<mpsc::Sender<RelayedEvent>>,
}

/// An ephemeral event on its way to the other nodes of a cluster.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub enum RelayedEvent {
    Typing {
        session_id: Arc<str>,
        json: String,
    },
    AgentStatus {
        session_id: Arc<str>,
        json: String,
    },
    StreamChunk {
        session_id: Arc<str>,
        dispatch_id: Arc<str>,
        index: u64,
        json: String,
    },
    Inbox {
        view: SessionView,
    },
}

/// Removes the subscription when dropped.
pub struct Subscription {
    hub: Arc<Hub>,
    key: Arc<str>,
    listener_id: u64,
    inbox: bool,
}

impl Drop for Subscription {
    fn drop(&mut self) {
        let registry = if self.inbox {
            self.hub.inbox_registry(&self.key)
        } else {
            self.hub.session_registry(&self.key)
        };
        let mut map = registry.lock().expect("hub lock");
        if let Some(listeners) = map.get_mut(&self.key) {
            listeners.retain(|l| l.id != self.listener_id);
            if listeners.is_empty() {
                map.remove(&self.key);
            }
        }
    }
}

impl Hub {
    pub fn new(shard_count: u16) -> Arc<Hub> {
        Arc::new(Hub {
            sessions: (0..shard_count).map(|_| Mutex::default()).collect(),
            inboxes: (0..INBOX_REGISTRIES).map(|_| Mutex::default()).collect(),
            #[cfg(test)]
            inbox_lookups: AtomicU64::new(0),
            next_listener_id: AtomicU64::new(1),
            shard_count,
            relay: std::sync::OnceLock::new(),
        })
    }

    /// Cluster mode: sends ephemeral events to `relay` too (a full queue drops them: they are
    /// best effort, and a socket rebuilds from the log and the next snapshot).
    pub fn relay_to(&self, relay: mpsc::Sender<RelayedEvent>) {
        let _ = self.relay.set(relay);
    }

    fn relay(&self, event: impl FnOnce() -> RelayedEvent) {
        if let Some(relay) = self.relay.get()
            && relay.try_send(event()).is_err()
        {
            metrics::counter!("fleetlm_cluster_relay_dropped_total").increment(1);
        }
    }

    /// Delivers an event another node published, to this node's listeners only.
    pub fn deliver_relayed(&self, event: RelayedEvent) {
        match event {
            RelayedEvent::Typing { session_id, json } => self.deliver_typing(&session_id, 0, Bytes::from(json)),
            RelayedEvent::AgentStatus { session_id, json } => {
                self.deliver_push(&session_id, "agent_status", Bytes::from(json))
            }
            RelayedEvent::StreamChunk {
                session_id,
                dispatch_id,
                index,
                json,
            } => self.deliver_stream_chunk(&session_id, &dispatch_id, index, Bytes::from(json)),
            RelayedEvent::Inbox { view } => self.deliver_inbox(&view),
        }
    }

    pub fn new_listener(&self, queue: mpsc::Sender<Arc<LiveEvent>>) -> Listener {
        Listener {
            id: self.next_listener_id.fetch_add(1, Ordering::Relaxed),
            queue,
            overflowed: Arc::new(AtomicBool::new(false)),
        }
    }

    fn session_registry(&self, session_id: &str) -> &Registry {
        &self.sessions[crate::ids::shard_for_session(session_id, self.shard_count) as usize]
    }

    fn inbox_registry(&self, user_id: &str) -> &Registry {
        &self.inboxes[(xxhash_rust::xxh3::xxh3_64(user_id.as_bytes()) % INBOX_REGISTRIES as u64) as usize]
    }

    /// The inbox listeners of `user_id` (one lookup).
    fn inbox_listeners_of(&self, user_id: &str) -> Vec<Listener> {
        #[cfg(test)]
        self.inbox_lookups.fetch_add(1, Ordering::Relaxed);
        self.listeners_of(self.inbox_registry(user_id), user_id)
    }

    pub fn subscribe_session(self: &Arc<Hub>, session_id: Arc<str>, listener: Listener) -> Subscription {
        let listener_id = listener.id;
        let registry = self.session_registry(&session_id);
        registry
            .lock()
            .expect("hub lock")
            .entry(session_id.clone())
            .or_default()
            .push(listener);
        Subscription {
            hub: self.clone(),
            key: session_id,
            listener_id,
            inbox: false,
        }
    }

    pub fn subscribe_inbox(self: &Arc<Hub>, user_id: Arc<str>, listener: Listener) -> Subscription {
        let listener_id = listener.id;
        self.inbox_registry(&user_id)
            .lock()
            .expect("hub lock")
            .entry(user_id.clone())
            .or_default()
            .push(listener);
        Subscription {
            hub: self.clone(),
            key: user_id,
            listener_id,
            inbox: true,
        }
    }

    fn listeners_of(&self, registry: &Registry, key: &str) -> Vec<Listener> {
        registry.lock().expect("hub lock").get(key).cloned().unwrap_or_default()
    }

    /// Delivers a committed message to the session's listeners (encoded only if there are any).
    pub fn publish_message(&self, record: &MessageRecord) {
        let session_id = &record.message.session_id;
        let listeners = self.listeners_of(self.session_registry(session_id), session_id);
        if listeners.is_empty() {
            return;
        }
        let json = Bytes::from(serde_json::to_vec(&record.message).expect("messages serialize"));
        let event = Arc::new(LiveEvent::Message {
            session_id: session_id.clone(),
            seq: record.message.seq,
            json,
        });
        for listener in &listeners {
            listener.deliver(event.clone());
        }
    }

    pub fn publish_typing(&self, session_id: &Arc<str>, from_listener: u64, json: Bytes) {
        self.relay(|| RelayedEvent::Typing {
            session_id: session_id.clone(),
            json: String::from_utf8_lossy(&json).into_owned(),
        });
        self.deliver_typing(session_id, from_listener, json);
    }

    fn deliver_typing(&self, session_id: &Arc<str>, from_listener: u64, json: Bytes) {
        let event = Arc::new(LiveEvent::Typing {
            session_id: session_id.clone(),
            from_listener,
            json,
        });
        for listener in self.listeners_of(self.session_registry(session_id), session_id) {
            if listener.id != from_listener {
                listener.deliver(event.clone());
            }
        }
    }

    pub fn publish_push(&self, session_id: &Arc<str>, event: &'static str, json: Bytes) {
        if event == "agent_status" {
            self.relay(|| RelayedEvent::AgentStatus {
                session_id: session_id.clone(),
                json: String::from_utf8_lossy(&json).into_owned(),
            });
        }
        self.deliver_push(session_id, event, json);
    }

    fn deliver_push(&self, session_id: &Arc<str>, event: &'static str, json: Bytes) {
        let event = Arc::new(LiveEvent::Push {
            session_id: session_id.clone(),
            event,
            json,
        });
        for listener in self.listeners_of(self.session_registry(session_id), session_id) {
            listener.deliver(event.clone());
        }
    }

    pub fn publish_stream_chunk(&self, session_id: &Arc<str>, dispatch_id: &Arc<str>, index: u64, json: Bytes) {
        self.relay(|| RelayedEvent::StreamChunk {
            session_id: session_id.clone(),
            dispatch_id: dispatch_id.clone(),
            index,
            json: String::from_utf8_lossy(&json).into_owned(),
        });
        self.deliver_stream_chunk(session_id, dispatch_id, index, json);
    }

    fn deliver_stream_chunk(&self, session_id: &Arc<str>, dispatch_id: &Arc<str>, index: u64, json: Bytes) {
        let event = Arc::new(LiveEvent::StreamChunk {
            session_id: session_id.clone(),
            dispatch_id: dispatch_id.clone(),
            index,
            json,
        });
        for listener in self.listeners_of(self.session_registry(session_id), session_id) {
            listener.deliver(event.clone());
        }
    }

    /// Whether any socket here listens to a session of `shard` (a cluster follower decodes the
    /// shard's committed entries only then).
    pub fn has_session_listeners(&self, shard: u16) -> bool {
        self.sessions
            .get(shard as usize)
            .is_some_and(|registry| !registry.lock().expect("hub lock").is_empty())
    }

    /// Whether an inbox change of this user must be published (in a cluster, the user's inbox
    /// sockets may be on any node).
    pub fn has_inbox_listeners(&self, user_id: &str) -> bool {
        if self.relay.get().is_some() {
            return true;
        }
        #[cfg(test)]
        self.inbox_lookups.fetch_add(1, Ordering::Relaxed);
        self.inbox_registry(user_id)
            .lock()
            .expect("hub lock")
            .contains_key(user_id)
    }

    /// Tells the users' inbox listeners that these sessions changed (a committed batch's
    /// views): each user's listeners are looked up once, whatever the number of views.
    pub fn publish_inboxes(&self, views: &[SessionView]) {
        for view in views {
            self.relay(|| RelayedEvent::Inbox { view: view.clone() });
        }
        self.deliver_inboxes(views);
    }

    fn deliver_inbox(&self, view: &SessionView) {
        self.deliver_inboxes(std::slice::from_ref(view));
    }

    fn deliver_inboxes(&self, views: &[SessionView]) {
        let mut by_user: HashMap<&str, Vec<&SessionView>> = HashMap::new();
        for view in views {
            by_user.entry(view.record.user_id.as_str()).or_default().push(view);
        }
        for (user_id, views) in by_user {
            let listeners = self.inbox_listeners_of(user_id);
            if listeners.is_empty() {
                continue;
            }
            let user_id: Arc<str> = Arc::from(user_id);
            for view in views {
                let event = Arc::new(LiveEvent::InboxEntry {
                    user_id: user_id.clone(),
                    session_id: view.record.id.clone(),
                    entry: Arc::new(view.to_inbox_entry()),
                });
                for listener in &listeners {
                    listener.deliver(event.clone());
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::{SessionRecord, SessionStatus, Timestamp};

    fn view(session_id: &str, user_id: &str, last_seq: u64) -> SessionView {
        SessionView {
            record: SessionRecord {
                id: Arc::from(session_id),
                user_id: user_id.to_string(),
                agent_id: "a".into(),
                metadata: serde_json::value::RawValue::from_string("{}".into()).unwrap(),
                inserted_at: Timestamp(0),
            },
            status: SessionStatus::Active,
            last_seq,
            nonuser_count: 0,
            read_cursor: Default::default(),
            last_activity: Default::default(),
            updated_at: Timestamp(0),
            dispatch: Default::default(),
        }
    }

    fn received(queue: &mut mpsc::Receiver<Arc<LiveEvent>>) -> Vec<(String, String, u64)> {
        let mut got = Vec::new();
        while let Ok(event) = queue.try_recv() {
            match &*event {
                LiveEvent::InboxEntry {
                    user_id,
                    session_id,
                    entry,
                } => got.push((
                    user_id.to_string(),
                    session_id.to_string(),
                    entry["last_seq"].as_u64().unwrap(),
                )),
                other => panic!("unexpected {other:?}"),
            }
        }
        got
    }

    /// A batch's inbox changes reach exactly their users' listeners, in batch order per user,
    /// and cost one registry lookup per user, not one per session (nor one per pair).
    #[test]
    fn a_batch_of_inbox_changes_reaches_each_user_with_one_lookup_per_user() {
        let hub = Hub::new(4);
        let mut queues = Vec::new();
        let mut subscriptions = Vec::new();
        for user in ["alice", "bob", "carol"] {
            let (sender, queue) = mpsc::channel(10_000);
            let listener = hub.new_listener(sender);
            subscriptions.push(hub.subscribe_inbox(Arc::from(user), listener.clone()));
            queues.push(queue);
        }
        // A second socket of alice's.
        let (sender, mut alice_again) = mpsc::channel(10_000);
        subscriptions.push(hub.subscribe_inbox(Arc::from("alice"), hub.new_listener(sender)));

        // 1000 sessions of alice, 1000 of bob, 1000 of dave (nobody listens), interleaved.
        let mut views = Vec::new();
        for n in 0..1000u64 {
            views.push(view(&format!("a{n}"), "alice", n));
            views.push(view(&format!("b{n}"), "bob", n));
            views.push(view(&format!("d{n}"), "dave", n));
        }
        let before = hub.inbox_lookups.load(Ordering::Relaxed);
        hub.publish_inboxes(&views);
        assert_eq!(
            hub.inbox_lookups.load(Ordering::Relaxed) - before,
            3,
            "one lookup per user in the batch"
        );

        let expected = |user: &str, prefix: &str| -> Vec<(String, String, u64)> {
            (0..1000u64)
                .map(|n| (user.to_string(), format!("{prefix}{n}"), n))
                .collect()
        };
        assert_eq!(received(&mut queues[0]), expected("alice", "a"));
        assert_eq!(received(&mut alice_again), expected("alice", "a"));
        assert_eq!(received(&mut queues[1]), expected("bob", "b"));
        assert!(received(&mut queues[2]).is_empty(), "carol has no session in the batch");

        // Unsubscribing removes exactly that socket.
        subscriptions.remove(0);
        hub.publish_inboxes(&[view("a1", "alice", 7)]);
        assert!(received(&mut queues[0]).is_empty());
        assert_eq!(received(&mut alice_again), vec![("alice".into(), "a1".into(), 7)]);
        assert!(hub.has_inbox_listeners("alice"));
        assert!(!hub.has_inbox_listeners("dave"));
    }

    /// Users are spread over the registries (not one lock for all).
    #[test]
    fn inbox_listeners_are_split_over_many_registries() {
        let hub = Hub::new(1);
        let used: std::collections::HashSet<*const Registry> = (0..1000)
            .map(|n| hub.inbox_registry(&format!("user-{n}")) as *const Registry)
            .collect();
        assert!(used.len() > INBOX_REGISTRIES / 2, "{} registries used", used.len());
    }
}
