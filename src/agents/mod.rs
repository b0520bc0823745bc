//! The agent engine: calls each session's agent (an HTTP webhook) after the user writes,
//! streams the reply to the session live, and stores it.
//!
//! - `scheduler.rs`: when to dispatch — per-session debounce with a cap, one dispatch in flight
//!   per session with a follow-up, concurrency bounds; rebuilt from the log after a restart.
//! - `webhook/`: one dispatch — its turn and history, the request, the streamed reply, retries.
//! - `branch.rs`: the current branch after `regenerate` messages (history, `replaces`).
//! - `continuation.rs`: replies that continue a stored message (after a tool approval).
//! - `cancel.rs`: cancelling a running dispatch (the user stops the turn), race-free with its end.
//! - `http.rs`: the pooled webhook clients (HTTP/1.1 or ALPN-negotiated HTTP/2; h2c).
//! - `reply.rs`, `assembler.rs`, `partial_json.rs`: the pure reply parsing and assembly.
//! - `streams.rs`: replies streaming now (for `stream_chunk` and `stream_snapshot`).
//! - `signing.rs`: signing secrets and Standard Webhooks signatures of the calls.
//! - `registry.rs`: the agents, in memory.
//! - `recent.rs`: the last finished dispatches and webhook deliveries per agent, in memory.
//!
//! Architecture invariant: dispatch state is derived from the log (a session owes a reply while
//! its last user seq is above the seq its last finished dispatch covered), never from memory
//! alone; nothing here blocks a shard writer.

pub mod assembler;
pub mod branch;
mod cancel;
pub mod continuation;
pub mod http;
mod partial_json;
pub mod recent;
pub mod registry;
pub mod reply;
mod scheduler;
pub mod signing;
pub mod streams;
mod webhook;

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use serde_json::json;

pub use recent::RecentDispatches;
pub use registry::AgentRegistry;
pub use scheduler::{Engine, EngineHandle, EngineInbox, channel};
pub use streams::LiveStreams;

use crate::hub::Hub;
use crate::shard::Shards;

#[derive(Debug, Clone)]
pub struct EngineConfig {
    pub max_attempts: u32,
    pub dispatch_deadline: Duration,
    pub max_in_flight_per_agent: usize,
    pub max_in_flight: usize,
    pub max_reply_line_bytes: usize,
    /// Bytes of chunks one assembled reply message may take.
    pub max_reply_bytes: usize,
}

/// Limits the engine applies to the messages it stores (the same as for clients).
#[derive(Debug, Clone)]
pub struct MessageLimits {
    pub max_message_bytes: usize,
    pub max_metadata_depth: usize,
}

/// What every dispatch needs.
pub struct EngineContext {
    pub shards: Shards,
    pub registry: Arc<AgentRegistry>,
    pub streams: Arc<LiveStreams>,
    pub hub: Arc<Hub>,
    pub http: http::WebhookClients,
    pub config: EngineConfig,
    pub shards_limits: MessageLimits,
    pub recent: Arc<RecentDispatches>,
    pub clock: Arc<dyn crate::clock::Clock>,
    /// Signs the file parts of the history sent to agents (`file_urls`).
    pub files: Arc<crate::file_urls::FileAccess>,
}

/// Pushes `agent_status` to the session's members.
fn status(
    context: &EngineContext,
    session_id: &Arc<str>,
    status: &str,
    dispatch_id: Option<&Arc<str>>,
    error: Option<&str>,
) {
    let mut payload = json!({"status": status});
    if let Some(dispatch_id) = dispatch_id {
        payload["dispatch_id"] = json!(&**dispatch_id);
    }
    if let Some(error) = error {
        payload["error"] = json!(error);
    }
    context.streams.record_status(session_id, status, &payload);
    context
        .hub
        .publish_push(session_id, "agent_status", Bytes::from(payload.to_string()));
}
