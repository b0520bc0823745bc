//! Cluster mode, the node's side of peer traffic above consensus: requests forwarded to this
//! node as a shard's leader, ephemeral events other nodes publish (typing, agent status, stream
//! chunks, inbox changes), and agents written on other nodes.
//!
//! Everything here travels as JSON inside the consensus module's authenticated peer frames
//! (`Consensus::call`); messages carry raw JSON (message contents) that only serde_json keeps
//! byte for byte.

use std::collections::HashMap;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use serde::{Deserialize, Serialize};
use tokio::sync::mpsc;

use crate::agents::streams::Snapshot;
use crate::agents::{AgentRegistry, LiveStreams};
use crate::consensus::{AppService, Consensus};
use crate::hub::{Hub, RelayedEvent};
use crate::model::Agent;
use crate::shard::routing::{ShardAnswer, ShardCall};
use crate::shard::{ShardError, Shards, wire};
use crate::supervisor::{Ended, supervise};

/// Events waiting for the relay before new ones are dropped.
const RELAY_QUEUE: usize = 16_384;
/// Events sent to a peer in one request at most.
const RELAY_BATCH: usize = 256;
const RELAY_TIMEOUT: Duration = Duration::from_secs(2);

#[derive(Serialize, Deserialize)]
enum PeerMessage {
    /// A shard call forwarded to the shard's leader, encoded by `shard::wire`.
    Shard(ShardCall),
    Events(Vec<RelayedEvent>),
    Agent(Agent),
    /// This member's view of its groups (`member_status`), for `/api/admin/cluster`.
    Status,
    /// The reply streaming now in a session, as the dispatching node (the shard's leader) has
    /// it, for a socket joining on another node.
    StreamSnapshot(String),
    /// Cancel a session's turn where its agent is dispatched (the shard's leader).
    Cancel {
        session_id: String,
        dispatch_id: Option<String>,
        progress: crate::model::DispatchProgress,
    },
}

/// The requests this node sends, as `PeerMessage` decodes them (shard calls: `shard::wire`).
#[derive(Serialize)]
enum PeerMessageRef<'a> {
    Events(&'a [RelayedEvent]),
    Agent(&'a Agent),
    Status,
    StreamSnapshot(&'a str),
    Cancel {
        session_id: &'a str,
        dispatch_id: Option<&'a str>,
        progress: crate::model::DispatchProgress,
    },
}

/// Cancels a session's turn on the node that dispatches its agent (the shard's leader; this
/// node if it leads). Answers the id of the dispatch cancelled, if any.
pub async fn cancel_turn(
    consensus: &Consensus,
    engine: &crate::agents::EngineHandle,
    shard: u16,
    session_id: &Arc<str>,
    dispatch_id: Option<String>,
    progress: crate::model::DispatchProgress,
) -> Result<Option<Arc<str>>, ShardError> {
    let no_leader = || ShardError::NoLeader("the session's shard has no leader right now; retry shortly".into());
    let leader = consensus
        .wait_for_leader(shard, Duration::from_secs(2))
        .await
        .ok_or_else(no_leader)?;
    if leader == consensus.node_id() {
        return engine.cancel(session_id.clone(), dispatch_id, progress).await;
    }
    let request = serde_json::to_vec(&PeerMessageRef::Cancel {
        session_id,
        dispatch_id: dispatch_id.as_deref(),
        progress,
    })
    .expect("requests serialize");
    match consensus.call(leader, request, Duration::from_secs(6)).await {
        Ok(answer) => serde_json::from_slice::<Result<Option<String>, ShardError>>(&answer)
            .unwrap_or_else(|e| {
                Err(ShardError::Unavailable(format!(
                    "undecodable answer from the leader: {e}"
                )))
            })
            .map(|cancelled| cancelled.map(Arc::from)),
        Err(error) => {
            tracing::warn!(leader, %error, "cancel not delivered to the shard's leader");
            Err(no_leader())
        }
    }
}

/// How long a joining socket waits for the leader's stream snapshot (it joins without one if
/// the leader does not answer: the chunks after the join still arrive).
const SNAPSHOT_TIMEOUT: Duration = Duration::from_secs(1);

/// The reply streaming now in `session_id`, asked of the session's shard's leader (which
/// dispatches its agent) when that is another node.
pub async fn remote_stream_snapshot(consensus: &Consensus, shard: u16, session_id: &str) -> Option<Snapshot> {
    let leader = consensus
        .leader(shard)
        .filter(|leader| *leader != consensus.node_id())?;
    let request = serde_json::to_vec(&PeerMessageRef::StreamSnapshot(session_id)).expect("requests serialize");
    let answer = consensus.call(leader, request, SNAPSHOT_TIMEOUT).await.ok()?;
    serde_json::from_slice::<Option<Snapshot>>(&answer).ok().flatten()
}

/// A member's view of the cluster: its groups' roles, terms, leaders and log positions.
pub fn member_status(consensus: &Consensus) -> serde_json::Value {
    let shards: Vec<_> = consensus
        .status()
        .into_iter()
        .map(|status| {
            let replicated: serde_json::Map<String, serde_json::Value> = status
                .replicated
                .iter()
                .map(|(node, index)| (node.to_string(), serde_json::json!(index)))
                .collect();
            serde_json::json!({
                "shard": status.shard,
                "role": status.role,
                "term": status.term,
                "leader": status.leader,
                "last_log": status.last_log,
                "committed": status.committed,
                "applied": status.applied,
                "replicated": replicated,
                "voters": status.voters,
                "learners": status.learners,
                "refetching": status.refetching,
                "copy_current": status.copy_current,
            })
        })
        .collect();
    serde_json::json!({
        "node_id": consensus.node_id(),
        "cluster_id": consensus.cluster_id(),
        "members": consensus.members(),
        "joined": consensus.joined(),
        "refusal": consensus.refusal(),
        "shards": shards,
    })
}

/// Sets the per-shard consensus gauges (read when `/metrics` is scraped): role, term, log
/// positions, and on a leader each follower's lag in entries.
pub fn record_metrics(consensus: &Consensus) {
    for status in consensus.status() {
        let shard = status.shard.to_string();
        let leading = f64::from(u8::from(status.role == "leader"));
        metrics::gauge!("fleetlm_cluster_shard_leader", "shard" => shard.clone()).set(leading);
        metrics::gauge!("fleetlm_cluster_shard_has_leader", "shard" => shard.clone())
            .set(f64::from(u8::from(status.leader.is_some())));
        metrics::gauge!("fleetlm_cluster_term", "shard" => shard.clone()).set(status.term as f64);
        metrics::gauge!("fleetlm_cluster_committed_index", "shard" => shard.clone()).set(status.committed as f64);
        metrics::gauge!("fleetlm_cluster_applied_index", "shard" => shard.clone()).set(status.applied as f64);
        metrics::gauge!("fleetlm_replica_copy_current", "shard" => shard.clone())
            .set(f64::from(u8::from(status.copy_current)));
        for (peer, replicated) in &status.replicated {
            metrics::gauge!("fleetlm_cluster_replication_lag_entries", "shard" => shard.clone(), "peer" => peer.to_string())
                .set(status.last_log.saturating_sub(*replicated) as f64);
        }
    }
}

/// Every other member's status, as it answers (or why it does not), by member id.
pub async fn peer_statuses(consensus: &Consensus) -> serde_json::Map<String, serde_json::Value> {
    let request = serde_json::to_vec(&PeerMessageRef::Status).expect("requests serialize");
    let asks = consensus.peers().into_iter().map(|peer| {
        let request = request.clone();
        async move {
            let answer = match consensus.call(peer, request, Duration::from_secs(2)).await {
                Ok(bytes) => serde_json::from_slice(&bytes)
                    .unwrap_or_else(|e| serde_json::json!({"error": format!("undecodable status: {e}")})),
                Err(error) => serde_json::json!({"error": error.to_string()}),
            };
            (peer.to_string(), answer)
        }
    });
    futures_util::future::join_all(asks).await.into_iter().collect()
}

/// Answers other nodes' application requests.
pub struct NodeService {
    pub engine: crate::agents::EngineHandle,
    pub shards: Shards,
    pub hub: Arc<Hub>,
    pub registry: Arc<AgentRegistry>,
    pub streams: Arc<LiveStreams>,
    pub consensus: std::sync::Weak<Consensus>,
}

impl AppService for NodeService {
    fn handle(&self, from: u64, request: Vec<u8>) -> Pin<Box<dyn Future<Output = Vec<u8>> + Send>> {
        let (shards, hub, registry) = (self.shards.clone(), self.hub.clone(), self.registry.clone());
        let streams = self.streams.clone();
        let engine = self.engine.clone();
        let consensus = self.consensus.clone();
        Box::pin(async move {
            match serde_json::from_slice::<PeerMessage>(&request) {
                Ok(PeerMessage::Shard(call)) => {
                    let result = shards.serve_call(call).await;
                    wire::encode_shard_answer(&result)
                }
                Ok(PeerMessage::Events(events)) => {
                    for event in events {
                        if let RelayedEvent::AgentStatus { session_id, json } = &event
                            && let Ok(payload) = serde_json::from_str::<serde_json::Value>(json)
                            && let Some(status) = payload["status"].as_str()
                        {
                            // REST readers on this node see the status the dispatching node has.
                            streams.record_status(session_id, status, &payload);
                        }
                        hub.deliver_relayed(event);
                    }
                    b"{}".to_vec()
                }
                Ok(PeerMessage::Cancel {
                    session_id,
                    dispatch_id,
                    progress,
                }) => {
                    let cancelled = engine
                        .cancel(Arc::from(session_id), dispatch_id, progress)
                        .await
                        .map(|cancelled| cancelled.map(|id| id.to_string()));
                    serde_json::to_vec(&crate::shard::routing::for_the_wire(cancelled)).expect("answers serialize")
                }
                Ok(PeerMessage::StreamSnapshot(session_id)) => {
                    serde_json::to_vec(&streams.snapshot(&session_id)).expect("snapshots serialize")
                }
                Ok(PeerMessage::Agent(agent)) => {
                    registry.install(agent);
                    b"{}".to_vec()
                }
                Ok(PeerMessage::Status) => {
                    let status = match consensus.upgrade() {
                        Some(consensus) => member_status(&consensus),
                        None => serde_json::json!({"error": "stopping"}),
                    };
                    serde_json::to_vec(&status).expect("statuses serialize")
                }
                Err(error) => {
                    tracing::warn!(from, %error, "undecodable request from a peer");
                    let refused: Result<ShardAnswer, ShardError> =
                        Err(ShardError::Unavailable(format!("undecodable request: {error}")));
                    wire::encode_shard_answer(&refused)
                }
            }
        })
    }
}

/// Starts relaying this node's ephemeral events and agent changes to the other nodes: one task
/// per peer sends them in order, batched, and drops what a peer cannot take (they are best
/// effort; a socket that missed some rebuilds from the log).
pub fn start_relay(consensus: Arc<Consensus>, hub: &Hub, registry: &AgentRegistry) {
    let (events, mut queue) = mpsc::channel::<RelayedEvent>(RELAY_QUEUE);
    hub.relay_to(events);
    let mut per_peer: HashMap<u64, mpsc::Sender<Arc<Vec<u8>>>> = HashMap::new();
    for peer in consensus.peers() {
        let (sender, receiver) = mpsc::channel(64);
        per_peer.insert(peer, sender);
        let (consensus, mut receiver) = (consensus.clone(), receiver);
        tokio::spawn(supervise(
            "cluster_relay",
            format!("cluster_relay/{peer}"),
            None,
            async move || {
                send_to_peer(&consensus, peer, &mut receiver).await;
                Ended::Finished
            },
        ));
    }
    let per_peer = Arc::new(per_peer);
    let agents_to = per_peer.clone();
    registry.notify_changes(Box::new(move |agent| {
        let body = Arc::new(serde_json::to_vec(&PeerMessageRef::Agent(agent)).expect("agents serialize"));
        for sender in agents_to.values() {
            let _ = sender.try_send(body.clone());
        }
    }));
    // Supervised: the queue outlives a run that panics; it ends when the hub is gone.
    tokio::spawn(supervise(
        "cluster_relay",
        "cluster_relay".into(),
        None,
        async move || {
            let mut batch = Vec::with_capacity(RELAY_BATCH);
            while queue.recv_many(&mut batch, RELAY_BATCH).await > 0 {
                let body = Arc::new(serde_json::to_vec(&PeerMessageRef::Events(&batch)).expect("events serialize"));
                for sender in per_peer.values() {
                    if sender.try_send(body.clone()).is_err() {
                        metrics::counter!("fleetlm_cluster_relay_dropped_total").increment(batch.len() as u64);
                    }
                }
                batch.clear();
            }
            Ended::Finished
        },
    ));
}

async fn send_to_peer(consensus: &Consensus, peer: u64, bodies: &mut mpsc::Receiver<Arc<Vec<u8>>>) {
    while let Some(body) = bodies.recv().await {
        if let Err(error) = consensus.call(peer, body.to_vec(), RELAY_TIMEOUT).await {
            tracing::debug!(peer, %error, "relaying events failed; they are dropped");
        }
    }
}

/// Shards this member has not caught up on: its applied index trails what the shard's leader
/// reports committed in its beats (a follower's own commit index lags the leader's, and is 0 right
/// after a restart until the leader tells it more), or it has not heard that leader for a while.
/// Watched for `/health/ready`.
#[derive(Default)]
pub struct CatchUp {
    behind: std::sync::Mutex<Option<Vec<(u16, String)>>>,
}

/// Entries a replica may trail its leader's commit index and still count as caught up (the
/// leader commits continuously under load).
const CAUGHT_UP_SLACK: u64 = 64;
/// A replica whose leader has not beaten for this long does not know how far behind it is.
const LEADER_SILENT_AFTER: Duration = Duration::from_secs(5);

/// Why a replica does not count as caught up, if it does not.
fn catching_up(progress: &crate::consensus::ReplicaProgress) -> Option<String> {
    let leader = progress.leader;
    match progress.leader_committed {
        None => Some(format!(
            "has not heard its leader, node {leader}, since this node started"
        )),
        Some((_, ago)) if ago >= LEADER_SILENT_AFTER => Some(format!(
            "has not heard its leader, node {leader}, for {} ms",
            ago.as_millis()
        )),
        Some((committed, _)) if progress.applied + CAUGHT_UP_SLACK >= committed => None,
        Some((committed, _)) => Some(format!(
            "catching up: applied {} of the {committed} entries its leader committed",
            progress.applied
        )),
    }
}

impl CatchUp {
    /// `None` until the first check has run.
    pub fn behind(&self) -> Option<Vec<(u16, String)>> {
        self.behind.lock().expect("catch-up lock").clone()
    }

    /// Compares this member's applied indexes with its leaders' commit indexes, twice a second.
    pub fn start(self: &Arc<Self>, consensus: Arc<Consensus>) {
        let catch_up = self.clone();
        tokio::spawn(supervise(
            "cluster_catch_up",
            "cluster_catch_up".into(),
            None,
            async move || {
                let mut tick = tokio::time::interval(Duration::from_millis(500));
                loop {
                    tick.tick().await;
                    let behind = consensus
                        .replica_progress()
                        .into_iter()
                        .filter_map(|progress| catching_up(&progress).map(|why| (progress.shard, why)))
                        .collect();
                    *catch_up.behind.lock().expect("catch-up lock") = Some(behind);
                }
            },
        ));
    }
}

/// Re-reads the agents from the archive now and then, in case a change notice was lost.
pub fn start_agent_refresh(registry: Arc<AgentRegistry>, archive: crate::archive::Archive) {
    tokio::spawn(supervise(
        "agent_refresh",
        "agent_refresh".into(),
        None,
        async move || {
            loop {
                // Every 10 s; every second while the agents were never read (a member started
                // with the archive unreachable: its dispatches wait for them).
                let every = if registry.is_loaded() { 10 } else { 1 };
                tokio::time::sleep(Duration::from_secs(every)).await;
                if let Err(error) = registry.reload(&archive).await {
                    tracing::debug!(%error, "agent refresh failed");
                }
            }
        },
    ));
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_forwarded_shard_call_decodes_as_a_peer_message() {
        let call = ShardCall::View { session_id: "s".into() };
        let decoded = serde_json::from_slice::<PeerMessage>(&wire::encode_shard_call(&call));
        assert!(matches!(
            decoded,
            Ok(PeerMessage::Shard(ShardCall::View { session_id })) if session_id == "s"
        ));
    }
}
