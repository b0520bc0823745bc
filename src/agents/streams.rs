//! Agent replies streaming right now, one per session at most: their assembled message so far
//! (for `stream_snapshot` to late joiners) and the count of chunks forwarded, under one lock with
//! the forwarding itself, so a snapshot and the chunks after it never overlap or leave a gap.

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
    streams: Mutex<HashMap<Arc<str>, Streaming>>,
}

impl LiveStreams {
    pub fn new(hub: Arc<Hub>) -> LiveStreams {
        LiveStreams {
            hub,
            streams: Mutex::default(),
        }
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
            .insert(session_id.clone(), streaming);
    }

    /// Forwards `chunk` to the session's members and feeds it to the assembler. Returns the
    /// assembler's verdict on the chunk (an error stops assembly, as in the AI SDK).
    pub fn chunk(&self, session_id: &Arc<str>, chunk: &Value) -> Result<(), String> {
        let mut streams = self.streams.lock().expect("streams lock");
        let Some(streaming) = streams.get_mut(session_id) else {
            return Ok(());
        };
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
        let mut streams = self.streams.lock().expect("streams lock");
        streams
            .get_mut(session_id)
            .map(|streaming| read(&mut streaming.assembler))
    }

    pub fn end(&self, session_id: &Arc<str>) {
        self.streams.lock().expect("streams lock").remove(session_id);
    }

    /// The reply streaming into `session_id`, if any and if anything was assembled yet.
    pub fn snapshot(&self, session_id: &str) -> Option<Snapshot> {
        let streams = self.streams.lock().expect("streams lock");
        let streaming = streams.get(session_id)?;
        let message = streaming.assembler.message()?;
        Some(Snapshot {
            dispatch_id: streaming.dispatch_id.clone(),
            next_index: streaming.next_index,
            payload: json!({"agent_id": streaming.agent_id, "dispatch_id": &*streaming.dispatch_id, "message": message}),
        })
    }
}
