//! Agent replies streaming right now, one per session at most: the chunks of the message
//! streaming now and that message assembled so far (for `stream_snapshot` to late joiners), and
//! the index of the dispatch's next chunk, under the session's own lock together with the
//! forwarding itself, so a snapshot and the chunks after it never overlap or leave a gap. The map of sessions is locked only to find or change an entry:
//! serializing, fanning out and assembling one session's chunk never holds up another session.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use bytes::Bytes;
use serde_json::{Value, json};

use super::assembler::Assembler;
use crate::hub::Hub;

struct Streaming {
    agent_id: String,
    dispatch_id: Arc<str>,
    assembler: Assembler,
    /// The chunks of the message streaming now (since the dispatch's previous message ended),
    /// bounded like the message itself (`agent_max_reply_bytes`).
    chunks: Vec<Value>,
    /// Index of the dispatch's next chunk: counts every chunk of the dispatch, across its
    /// messages and attempts.
    next_index: u64,
}

/// What a joiner needs of the dispatch running now: the first chunk index it has not seen and,
/// if a message of it is streaming, that message's chunks and what they assemble to.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub struct Snapshot {
    pub dispatch_id: Arc<str>,
    pub agent_id: String,
    pub next_index: u64,
    /// The `stream_snapshot` payload, if a message is streaming.
    pub payload: Option<Value>,
}

pub struct LiveStreams {
    hub: Arc<Hub>,
    streams: Mutex<HashMap<Arc<str>, Arc<Mutex<Streaming>>>>,
    /// The latest `agent_status` payload of each session whose agent is not idle (queued,
    /// dispatching, streaming, or failed until the next dispatch), for REST readers.
    statuses: Mutex<HashMap<Arc<str>, Value>>,
}

impl LiveStreams {
    pub fn new(hub: Arc<Hub>) -> LiveStreams {
        LiveStreams {
            hub,
            streams: Mutex::default(),
            statuses: Mutex::default(),
        }
    }

    /// Remembers the session's latest agent status; `idle` is the default and is not kept.
    pub fn record_status(&self, session_id: &Arc<str>, status: &str, payload: &Value) {
        let mut statuses = self.statuses.lock().expect("statuses lock");
        if status == "idle" {
            statuses.remove(session_id);
        } else {
            statuses.insert(session_id.clone(), payload.clone());
        }
    }

    /// The session's latest agent status payload, if it is not idle.
    pub fn status(&self, session_id: &str) -> Option<Value> {
        self.statuses.lock().expect("statuses lock").get(session_id).cloned()
    }

    /// A dispatch starts (its first chunk will have index 0); it stays registered through all
    /// its attempts, until `end`.
    pub fn begin(&self, session_id: &Arc<str>, agent_id: &str, dispatch_id: &Arc<str>) {
        let streaming = Streaming {
            agent_id: agent_id.to_string(),
            dispatch_id: dispatch_id.clone(),
            assembler: Assembler::new(),
            chunks: Vec::new(),
            next_index: 0,
        };
        self.streams
            .lock()
            .expect("streams lock")
            .insert(session_id.clone(), Arc::new(Mutex::new(streaming)));
    }

    fn session(&self, session_id: &str) -> Option<Arc<Mutex<Streaming>>> {
        self.streams.lock().expect("streams lock").get(session_id).cloned()
    }

    /// Forwards `chunk` to the session's members and feeds it to the assembler. Returns the
    /// assembler's verdict on the chunk (an error stops assembly, as in the AI SDK).
    pub fn chunk(&self, session_id: &Arc<str>, chunk: &Value) -> Result<(), String> {
        let Some(session) = self.session(session_id) else {
            return Ok(());
        };
        let mut streaming = session.lock().expect("stream lock");
        let index = streaming.next_index;
        streaming.next_index += 1;
        let payload = json!({"agent_id": streaming.agent_id, "chunk": chunk, "dispatch_id": &*streaming.dispatch_id, "index": index});
        streaming.chunks.push(chunk.clone());
        self.hub.publish_stream_chunk(
            session_id,
            &streaming.dispatch_id,
            index,
            Bytes::from(payload.to_string()),
        );
        metrics::counter!("fleetlm_stream_chunks_total").increment(1);
        streaming.assembler.push(chunk)
    }

    /// The message about to stream continues a stored one (`continuation`): its assembler
    /// starts from that message's parts. Only before the message's first chunk.
    pub fn continue_message(&self, session_id: &Arc<str>, id: &str, parts: Vec<serde_json::Map<String, Value>>) {
        if let Some(session) = self.session(session_id) {
            let mut streaming = session.lock().expect("stream lock");
            if streaming.chunks.is_empty() {
                streaming.assembler = Assembler::continuing(id.to_string(), parts);
            }
        }
    }

    /// Ends the message streaming now: runs `take` on its assembler, then the next chunk starts
    /// a new message (a fresh assembler, no chunks).
    pub fn end_message<T>(&self, session_id: &Arc<str>, take: impl FnOnce(&mut Assembler) -> T) -> Option<T> {
        let session = self.session(session_id)?;
        let mut streaming = session.lock().expect("stream lock");
        let taken = take(&mut streaming.assembler);
        streaming.assembler = Assembler::new();
        streaming.chunks.clear();
        Some(taken)
    }

    /// If a message is streaming now (it has chunks and did not end), forwards a final
    /// `{"type": "abort"}` chunk for it, so clients close it as the AI SDK closes an aborted
    /// stream. Returns whether it did.
    pub fn abort_open_message(&self, session_id: &Arc<str>) -> bool {
        let open = self
            .session(session_id)
            .is_some_and(|session| !session.lock().expect("stream lock").chunks.is_empty());
        if open {
            let _ = self.chunk(session_id, &json!({"type": "abort"}));
        }
        open
    }

    /// An attempt ended: a message it left open is dropped (a retry streams the reply afresh);
    /// chunk indexes go on.
    pub fn end_attempt(&self, session_id: &Arc<str>) {
        if let Some(session) = self.session(session_id) {
            let mut streaming = session.lock().expect("stream lock");
            streaming.assembler = Assembler::new();
            streaming.chunks.clear();
        }
    }

    /// The dispatch ended.
    pub fn end(&self, session_id: &Arc<str>) {
        self.streams.lock().expect("streams lock").remove(session_id);
    }

    /// The dispatch running for `session_id`, if any: the index of its next chunk and, if a
    /// message of it is streaming now, that message's chunks so far and what they assemble to.
    pub fn snapshot(&self, session_id: &str) -> Option<Snapshot> {
        let session = self.session(session_id)?;
        let mut streaming = session.lock().expect("stream lock");
        let payload = if streaming.chunks.is_empty() {
            None
        } else {
            let message = streaming.assembler.message();
            Some(json!({
                "agent_id": streaming.agent_id,
                "dispatch_id": &*streaming.dispatch_id,
                "message": message,
                "chunks": streaming.chunks,
                "next_index": streaming.next_index,
            }))
        };
        Some(Snapshot {
            dispatch_id: streaming.dispatch_id.clone(),
            agent_id: streaming.agent_id.clone(),
            next_index: streaming.next_index,
            payload,
        })
    }
}

#[cfg(test)]
mod tests {
    use std::sync::mpsc as std_mpsc;
    use std::time::Duration;

    use super::*;
    use crate::hub::LiveEvent;

    /// While one session's stream lock is held (a late joiner's big snapshot being built, a
    /// chunk being assembled and fanned out), another session's chunks, snapshots and stream
    /// starts and ends go through. With one lock for all sessions (as before) this fails.
    #[test]
    fn one_sessions_stream_lock_never_holds_up_another_session() {
        let hub = Hub::new(4);
        let streams = Arc::new(LiveStreams::new(hub.clone()));
        let (slow, fast, other): (Arc<str>, Arc<str>, Arc<str>) = ("slow".into(), "fast".into(), "other".into());
        streams.begin(&slow, "agent", &Arc::from("d-slow"));
        streams.begin(&fast, "agent", &Arc::from("d-fast"));
        let (queue, mut received) = tokio::sync::mpsc::channel(16);
        let _subscription = hub.subscribe_session(fast.clone(), hub.new_listener(queue));

        let (entered, wait_entered) = std_mpsc::channel();
        let (release, wait_release) = std_mpsc::channel::<()>();
        let holder = std::thread::spawn({
            let (streams, slow) = (streams.clone(), slow.clone());
            move || {
                streams.end_message(&slow, |_| {
                    entered.send(()).unwrap();
                    wait_release.recv().unwrap();
                })
            }
        });
        wait_entered.recv().unwrap();

        let (finished, wait_finished) = std_mpsc::channel();
        std::thread::spawn({
            let (streams, fast, other) = (streams.clone(), fast.clone(), other.clone());
            move || {
                streams.chunk(&fast, &json!({"type": "text-start", "id": "t"})).unwrap();
                streams
                    .chunk(&fast, &json!({"type": "text-delta", "id": "t", "delta": "hi"}))
                    .unwrap();
                let snapshot = streams.snapshot(&fast).map(|s| s.next_index);
                streams.begin(&other, "agent", &Arc::from("d-other"));
                streams.end(&other);
                finished.send(snapshot).unwrap();
            }
        });
        let outcome = wait_finished.recv_timeout(Duration::from_secs(5));
        release.send(()).unwrap();
        holder.join().unwrap();
        assert_eq!(
            outcome,
            Ok(Some(2)),
            "the fast session's stream waited for the slow session's lock"
        );
        let mut indexes = Vec::new();
        while let Ok(event) = received.try_recv() {
            if let LiveEvent::StreamChunk { index, .. } = &*event {
                indexes.push(*index);
            }
        }
        assert_eq!(indexes, vec![0, 1], "both chunks were fanned out to the fast session");
    }
}
