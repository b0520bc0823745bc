//! Agent replies streaming right now, one per session at most: their assembled message so far
//! (for `stream_snapshot` to late joiners) and the count of chunks forwarded, under the
//! session's own lock together with the forwarding itself, so a snapshot and the chunks after it
//! never overlap or leave a gap. The map of sessions is locked only to find or change an entry:
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
    next_index: u64,
}

/// What a late joiner needs: the partial message and the first chunk index it has not seen.
pub struct Snapshot {
    pub dispatch_id: Arc<str>,
    pub next_index: u64,
    pub payload: Value,
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

    pub fn begin(&self, session_id: &Arc<str>, agent_id: &str, dispatch_id: &Arc<str>) {
        let streaming = Streaming {
            agent_id: agent_id.to_string(),
            dispatch_id: dispatch_id.clone(),
            assembler: Assembler::new(),
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
        let payload = json!({"agent_id": streaming.agent_id, "chunk": chunk, "dispatch_id": &*streaming.dispatch_id});
        let index = streaming.next_index;
        streaming.next_index += 1;
        self.hub.publish_stream_chunk(
            session_id,
            &streaming.dispatch_id,
            index,
            Bytes::from(payload.to_string()),
        );
        metrics::counter!("fleetlm_stream_chunks_total").increment(1);
        streaming.assembler.push(chunk)
    }

    /// Runs `read` on the assembler of the session's current reply.
    pub fn with_assembler<T>(&self, session_id: &Arc<str>, read: impl FnOnce(&mut Assembler) -> T) -> Option<T> {
        let session = self.session(session_id)?;
        let mut streaming = session.lock().expect("stream lock");
        Some(read(&mut streaming.assembler))
    }

    pub fn end(&self, session_id: &Arc<str>) {
        self.streams.lock().expect("streams lock").remove(session_id);
    }

    /// The reply streaming into `session_id`, if any and if anything was assembled yet.
    pub fn snapshot(&self, session_id: &str) -> Option<Snapshot> {
        let session = self.session(session_id)?;
        let mut streaming = session.lock().expect("stream lock");
        let message = streaming.assembler.message()?;
        Some(Snapshot {
            dispatch_id: streaming.dispatch_id.clone(),
            next_index: streaming.next_index,
            payload: json!({"agent_id": streaming.agent_id, "dispatch_id": &*streaming.dispatch_id, "message": message}),
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
                streams.with_assembler(&slow, |_| {
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
