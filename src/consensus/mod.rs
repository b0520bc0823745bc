//! Consensus: every shard's log replicated by its own Raft group (openraft), over the WAL.
//!
//! Everything openraft-specific lives in this module, so an engine upgrade touches only here:
//! - `types`: the type configuration (a log entry carries one `ShardCommand`: a shard writer's
//!   encoded batch);
//! - `log_store`: openraft's log storage on the shard's WAL log and vote file;
//! - `state_machine`: committed entries handed to the shard's consumer in order (`Applied`);
//!   snapshots are the shared archive;
//! - `network` + `peer`: Raft RPCs over authenticated connections between nodes;
//! - `membership`: replacing a member whose storage is lost (the operator's only membership
//!   change);
//! - `groups`: the shard groups of this node, each started again when it stopped on a storage
//!   error (a full disk heals without a restart);
//! - `formation`: a node's entry into the cluster at start, and the member records;
//! - `identity`: the cluster id, made at formation, that keeps wiped disks from starting a
//!   second history;
//! - `refetch`: a member's damaged shard log cut back to its intact prefix and refetched from
//!   its peers (it votes again once it holds what it may have acknowledged);
//! - `lease`: leadership as a lease confirmed by a quorum (what a leader checks before acting
//!   on its own: calling agents, flushing the archive, answering reads from its state).
//!
//! The rest of the server sees `Consensus` (propose, leadership, status) and one `ShardFeed` per
//! shard (the applied stream). Indexes it sees are shard log indexes (WAL indexes).
//!
//! Architecture invariant: nothing outside this module names an openraft type; nothing here
//! knows sessions or messages (commands are opaque bytes).

mod balance;
mod beats;
mod formation;
mod groups;
pub mod identity;
mod leadership;
mod lease;
mod log_store;
mod membership;
mod network;
mod pacemaker;
mod peer;
mod raft_config;
pub mod refetch;
mod state_machine;
mod status;
#[cfg(test)]
mod tests;
mod types;

use std::collections::{BTreeMap, HashMap};
use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::AtomicU64;
use std::time::Duration;

use openraft::ServerState;
use openraft::errors::{ClientWriteError, LinearizableReadError, RaftError};
use openraft::impls::ProgressResponder;
use openraft::type_config::async_runtime::WatchReceiver;
use tokio::sync::mpsc;

pub use formation::wiped_member;
pub use leadership::{Leadership, LeadershipWatch, ShardStatus};
pub use lease::{Lease, LeaseWatch};
pub use log_store::command_in_record;
pub use network::AppService;
pub use peer::{MAX_ANSWER_BYTES, MAX_FRAME_BYTES, PeerError};
pub use state_machine::Applied;
pub use status::ReplicaProgress;

use crate::wal::Wal;
use formation::{Formation, Joining};
use groups::{GroupParts, Groups};
use identity::IdentityRecords;
use membership::{MemberChange, MemberChangeError};
use network::{RaftService, ShardNetwork};
use peer::{Identity, PeerClient};
use types::{LogId, Raft, ShardCommand, TypeConfig};

/// Log filter directives for the consensus engine: it narrates every group's start and election
/// at info, which with 64 shards is noise, and warns about every failed RPC of every group
/// while a peer is down (hundreds of lines a second); the peer connection logs that once
/// instead (`peer`). Its errors stay.
pub const LOG_DIRECTIVES: &str = "openraft=warn,openraft::core::heartbeat=error,openraft::replication=error,openraft::engine::handler::replication_handler=error,openraft::core::raft_core=error";

/// `filter` (an operator's `RUST_LOG`) with `LOG_DIRECTIVES` added, unless it already says
/// something about the engine: `RUST_LOG=warn` alone would let every group's failed RPC through
/// while a peer is down.
pub fn with_log_directives(filter: &str) -> String {
    if filter.contains("openraft") {
        filter.to_string()
    } else {
        format!("{filter},{LOG_DIRECTIVES}")
    }
}

/// A proposal not committed by then is answered with an unknown outcome (a leader cut off from
/// its quorum keeps its uncommitted entries until it hears of a new leader): a client of a node
/// cut off from the majority gets `no_leader` in seconds, not a hang.
const PROPOSE_TIMEOUT: Duration = Duration::from_secs(4);

/// Committed entries a shard's consumer may lag behind before applying waits for it.
const APPLIED_QUEUE: usize = 4096;

/// How this node takes part in the cluster.
#[derive(Debug, Clone)]
pub struct ClusterSpec {
    pub node_id: u64,
    /// Every member (this node included) and the address its peer listener is reached at.
    pub peers: BTreeMap<u64, String>,
    pub secret: String,
    /// Where this node's peer listener binds.
    pub listen: SocketAddr,
    pub timing: Timing,
}

/// Raft timing. Failover takes about one election timeout after a leader stops.
#[derive(Debug, Clone, Copy)]
pub struct Timing {
    pub heartbeat: Duration,
    pub election_min: Duration,
    pub election_max: Duration,
}

impl Timing {
    /// How long a leader counts on its leadership after a quorum acknowledged it (`lease`).
    pub fn lease(&self) -> Duration {
        lease::length(self.election_min)
    }
}

impl Default for Timing {
    fn default() -> Self {
        Timing {
            heartbeat: Duration::from_millis(100),
            election_min: Duration::from_millis(500),
            election_max: Duration::from_millis(1000),
        }
    }
}

/// One shard's committed entries, for the shard's consumer (on every node).
pub struct ShardFeed {
    pub shard: u16,
    pub applied: mpsc::Receiver<Applied>,
    /// Set by the consumer: the shard log index through which the shared archive holds every
    /// effect of the log (what a snapshot may cover, so what the log may drop).
    pub archived_through: Arc<AtomicU64>,
}

#[derive(Debug, Clone, thiserror::Error, PartialEq, Eq)]
pub enum ProposeError {
    /// This node does not lead the shard; `leader` is who does, if known.
    #[error("not the leader of the shard (leader: {leader:?})")]
    NotLeader { leader: Option<u64> },
    /// The proposal's fate is unknown: it may or may not commit (leadership was lost while it
    /// was in flight). A retry must be idempotent.
    #[error("the outcome is unknown: {0}")]
    Unknown(String),
    /// The shard's group has stopped (a storage failure or shutdown).
    #[error("the shard's consensus group has stopped: {0}")]
    Stopped(String),
    #[error("the command of {bytes} bytes exceeds the maximum of {max}")]
    TooLarge { bytes: usize, max: usize },
}

pub struct Consensus {
    node_id: u64,
    groups: Arc<Groups>,
    members: Vec<u64>,
    max_command_bytes: usize,
    joined: Arc<std::sync::Mutex<std::collections::BTreeSet<u64>>>,
    /// The cluster id shard 0's log recorded, as this node has applied it.
    identity: Arc<std::sync::Mutex<Option<String>>>,
    records: Option<Arc<dyn IdentityRecords>>,
    peers: Arc<HashMap<u64, Arc<PeerClient>>>,
    service: Arc<RaftService>,
    /// Set to stop the peer listener and its connections.
    stop: tokio::sync::watch::Sender<bool>,
    /// Held while this node drives a member replacement step (one at a time here).
    member_steps: tokio::sync::Mutex<()>,
    formed: tokio::sync::watch::Receiver<Formation>,
    leases: Arc<lease::LeaseBook>,
    /// How long a read barrier may take before the leadership counts as unconfirmed.
    barrier_timeout: Duration,
    /// How long work paused by a lapsed lease waits for it to come back (`await_lease`).
    lease_grace: Duration,
}

type CommitReceiver = openraft::type_config::alias::OneshotReceiverOf<TypeConfig, LogId>;
type CompleteReceiver =
    openraft::type_config::alias::OneshotReceiverOf<TypeConfig, openraft::raft::ClientWriteResult<TypeConfig>>;

/// A command queued in its shard's log (in the order `Consensus::enqueue` was called), not yet
/// known committed.
pub struct Proposal {
    commit: CommitReceiver,
    complete: CompleteReceiver,
}

impl Proposal {
    /// Resolves with the entry's shard log index once it is committed (durable on a majority),
    /// or with why it is not (then its fate is unknown unless the error says otherwise).
    pub async fn committed(self) -> Result<u64, ProposeError> {
        let Proposal { commit, complete } = self;
        match tokio::time::timeout(PROPOSE_TIMEOUT, commit).await {
            Ok(Ok(log_id)) => {
                // openraft also reports when the entry is applied; a dropped receiver would make
                // it log a warning per entry.
                tokio::spawn(async move {
                    let _ = complete.await;
                });
                Ok(log_id.index + 1)
            }
            Ok(Err(_)) => match tokio::time::timeout(Duration::from_secs(1), complete).await {
                Ok(Ok(Err(ClientWriteError::ForwardToLeader(forward)))) => Err(ProposeError::Unknown(format!(
                    "leadership moved to {:?} before the entry committed",
                    forward.leader_id
                ))),
                Ok(Ok(Err(error))) => Err(ProposeError::Unknown(error.to_string())),
                Ok(Ok(Ok(response))) => Ok(response.log_id.index + 1),
                Ok(Err(_)) | Err(_) => Err(ProposeError::Unknown("the shard's group dropped the proposal".into())),
            },
            Err(_) => Err(ProposeError::Unknown(format!(
                "not committed within {PROPOSE_TIMEOUT:?} (no quorum?)"
            ))),
        }
    }
}

fn shard_log_index(raft_index: Option<u64>) -> u64 {
    raft_index.map_or(0, |i| i + 1)
}

impl Consensus {
    /// Starts every shard's group and the peer listener. A group whose log and vote are empty
    /// (a node starting for the first time) proposes the configured membership if no cluster
    /// formed yet (`records`, the shared record of the cluster's identity, holds no id); the
    /// cluster forms once a majority is up, whatever the start order.
    pub async fn start(
        spec: &ClusterSpec,
        wal: Arc<Wal>,
        state_dir: &Path,
        records: Option<Arc<dyn IdentityRecords>>,
    ) -> Result<(Consensus, Vec<ShardFeed>), String> {
        let listener = std::net::TcpListener::bind(spec.listen)
            .map_err(|e| format!("cannot listen for peers on {}: {e}", spec.listen))?;
        Self::start_on(spec, listener, wal, state_dir, records).await
    }

    /// Whether this node's storage holds nothing of any shard's group (no vote, no log, no
    /// snapshot): a node starting for the first time, or one whose storage was lost.
    pub fn holds_nothing(wal: &Wal) -> Result<bool, String> {
        for shard in 0..wal.shard_count() {
            let vote = wal.read_vote(shard).map_err(|e| format!("shard {shard} vote: {e}"))?;
            if vote.is_some() || wal.last_log_id(shard).is_some() || wal.purged(shard).is_some() {
                return Ok(false);
            }
        }
        Ok(true)
    }

    /// `start` with the peer listener already bound (`spec.listen` is then not used).
    pub async fn start_on(
        spec: &ClusterSpec,
        listener: std::net::TcpListener,
        wal: Arc<Wal>,
        state_dir: &Path,
        records: Option<Arc<dyn IdentityRecords>>,
    ) -> Result<(Consensus, Vec<ShardFeed>), String> {
        if !spec.peers.contains_key(&spec.node_id) {
            return Err(format!("node {} is not in the member list", spec.node_id));
        }
        let members: Vec<u64> = spec.peers.keys().copied().collect();
        let member_list: Vec<String> = members.iter().map(u64::to_string).collect();
        let identity = Identity {
            node_id: spec.node_id,
            secret: Arc::from(spec.secret.as_bytes()),
            shape: Arc::from(format!(
                "shards={} members={}",
                wal.shard_count(),
                member_list.join(",")
            )),
        };
        let clients: HashMap<u64, Arc<PeerClient>> = spec
            .peers
            .iter()
            .filter(|(id, _)| **id != spec.node_id)
            .map(|(id, addr)| (*id, Arc::new(PeerClient::new(identity.clone(), *id, addr.clone()))))
            .collect();
        let clients = Arc::new(clients);
        listener
            .set_nonblocking(true)
            .map_err(|e| format!("peer listener: {e}"))?;
        let listener = tokio::net::TcpListener::from_std(listener).map_err(|e| format!("peer listener: {e}"))?;
        let service = Arc::new(RaftService::default());
        let (stop, stopped) = tokio::sync::watch::channel(false);
        tokio::spawn(peer::serve(
            listener,
            identity,
            members.clone(),
            service.clone(),
            stopped,
        ));

        let config = raft_config::raft_config(spec.timing, wal.max_entry_bytes())?;
        let snapshot_dir = state_dir.join("snapshots");
        let mut groups = Vec::new();
        let mut parts = Vec::new();
        let refetching = refetch::markers(state_dir)?;
        let mut feeds = Vec::new();
        let mut fresh = Vec::new();
        let mut joined = None;
        let mut cluster_identity = None;
        for shard in 0..wal.shard_count() {
            let vote = wal.read_vote(shard).map_err(|e| format!("shard {shard} vote: {e}"))?;
            fresh.push(vote.is_none() && wal.last_log_id(shard).is_none() && wal.purged(shard).is_none());
            let (applied, feed) = mpsc::channel(APPLIED_QUEUE);
            let archived_through = Arc::new(AtomicU64::new(0));
            let machine =
                state_machine::ShardStateMachine::open(&snapshot_dir, shard, applied, archived_through.clone())
                    .map_err(|e| format!("shard {shard} snapshot: {e}"))?;
            if shard == 0 {
                joined = Some(machine.joined());
                cluster_identity = Some(machine.identity());
            }
            let group = GroupParts {
                node_id: spec.node_id,
                shard,
                config: config.clone(),
                network: ShardNetwork {
                    shard,
                    peers: clients.clone(),
                },
                wal: wal.clone(),
                machine,
                data_dir: state_dir.to_path_buf(),
            };
            let (raft, settled) = group.start().await?;
            if refetching.contains_key(&shard) {
                // Before the next group starts: no election with a log cut back (`refetch`).
                raft.runtime_config().elect(false);
            }
            groups.push(raft);
            parts.push((group, settled));
            feeds.push(ShardFeed {
                shard,
                applied: feed,
                archived_through,
            });
        }
        let groups = Arc::new(Groups::new(groups, spec.timing.election_max));
        let leases = Arc::new(lease::LeaseBook::new(
            spec.node_id,
            spec.timing.lease(),
            spec.timing.election_max,
            wal.shard_count(),
        ));
        for (group, settled) in parts {
            tokio::spawn(groups::keep_running(groups.clone(), group, settled, stop.subscribe()));
        }
        tokio::spawn(pacemaker::run(groups.clone(), spec.timing, stop.subscribe()));
        tokio::spawn(beats::run(
            beats::Beating {
                node_id: spec.node_id,
                groups: groups.clone(),
                leases: leases.clone(),
                peers: clients.clone(),
                interval: spec.timing.heartbeat,
            },
            stop.subscribe(),
        ));
        for (shard, marker) in refetching {
            let refetching = refetch::Refetching {
                shard,
                marker,
                wal: wal.clone(),
                data_dir: state_dir.to_path_buf(),
                epoch: 0,
            };
            groups.set_refetching(shard, true);
            tokio::spawn(refetch::complete(
                refetching,
                groups.clone(),
                clients.clone(),
                spec.node_id,
                stop.subscribe(),
            ));
        }
        let joined = joined.expect("a cluster has at least one shard");
        let joined_view = joined.clone();
        let cluster_identity = cluster_identity.expect("a cluster has at least one shard");
        service.set_groups(spec.node_id, groups.clone(), joined.clone(), fresh.iter().all(|f| *f));
        let service_handle = service.clone();
        let (formation, formed) = tokio::sync::watch::channel(Formation::Pending);
        tokio::spawn(formation::form(
            Joining {
                node_id: spec.node_id,
                members: members.clone(),
                groups: groups.clone(),
                peers: clients.clone(),
                service,
                joined,
                identity: cluster_identity.clone(),
                records: records.clone(),
                fresh,
                stopped: stop.subscribe(),
            },
            formation,
        ));
        Ok((
            Consensus {
                node_id: spec.node_id,
                groups,
                members,
                max_command_bytes: log_store::max_command_bytes(&wal),
                joined: joined_view,
                identity: cluster_identity,
                records,
                peers: clients,
                service: service_handle,
                stop,
                member_steps: tokio::sync::Mutex::new(()),
                formed,
                leases,
                barrier_timeout: (spec.timing.election_max * 4).max(Duration::from_secs(1)),
                lease_grace: spec.timing.election_max,
            },
            feeds,
        ))
    }

    /// Waits until this node takes part in the cluster, or refuses to (a wiped member).
    pub async fn formed(&self) -> Result<(), String> {
        let mut formed = self.formed.clone();
        let state = formed
            .wait_for(|f| *f != Formation::Pending)
            .await
            .map_err(|_| "stopped".to_string())?;
        match &*state {
            Formation::Refused(reason) => Err(reason.clone()),
            _ => Ok(()),
        }
    }

    /// Why this node refuses to take part, if it does.
    pub fn refusal(&self) -> Option<String> {
        match &*self.formed.borrow() {
            Formation::Refused(reason) => Some(reason.clone()),
            _ => None,
        }
    }

    /// The members shard 0's log has recorded as joined, as this node has applied them.
    pub fn joined(&self) -> Vec<u64> {
        self.joined.lock().expect("joined lock").iter().copied().collect()
    }

    /// The cluster's id as shard 0's log recorded it and this node has applied it.
    pub fn cluster_id(&self) -> Option<String> {
        self.identity.lock().expect("identity lock").clone()
    }

    pub fn node_id(&self) -> u64 {
        self.node_id
    }

    pub fn members(&self) -> &[u64] {
        &self.members
    }

    pub fn max_command_bytes(&self) -> usize {
        self.max_command_bytes
    }

    fn group(&self, shard: u16) -> Raft {
        self.groups.get(shard)
    }

    /// Replicates `command` as one entry of the shard's log and resolves once it is committed
    /// (durable on a majority) and applied here. Returns its shard log index.
    pub async fn propose(&self, shard: u16, command: Vec<u8>) -> Result<u64, ProposeError> {
        if command.len() > self.max_command_bytes {
            return Err(ProposeError::TooLarge {
                bytes: command.len(),
                max: self.max_command_bytes,
            });
        }
        let raft = self.group(shard);
        beats::renew_engine_lease(&raft).await;
        let write = raft.client_write(ShardCommand::App(command));
        let Ok(outcome) = tokio::time::timeout(PROPOSE_TIMEOUT, write).await else {
            return Err(ProposeError::Unknown(format!(
                "not committed within {PROPOSE_TIMEOUT:?} (no quorum?)"
            )));
        };
        match outcome {
            Ok(response) => Ok(response.log_id.index + 1),
            Err(RaftError::APIError(ClientWriteError::ForwardToLeader(forward))) => Err(ProposeError::NotLeader {
                leader: forward.leader_id,
            }),
            Err(RaftError::APIError(error)) => Err(ProposeError::Unknown(error.to_string())),
            Err(RaftError::Fatal(fatal)) => Err(ProposeError::Stopped(fatal.to_string())),
        }
    }

    /// Queues `command` as the next entry of the shard's log, only if this node still leads the
    /// shard in `term` (so a writer whose state was built in one term never writes in another).
    /// Entries are appended in the order of the calls; await `Proposal::committed` for each.
    pub async fn enqueue(&self, shard: u16, term: u64, command: Vec<u8>) -> Result<Proposal, ProposeError> {
        if command.len() > self.max_command_bytes {
            return Err(ProposeError::TooLarge {
                bytes: command.len(),
                max: self.max_command_bytes,
            });
        }
        let (responder, commit, complete) = ProgressResponder::new();
        let raft = self.group(shard);
        beats::renew_engine_lease(&raft).await;
        raft.write(ShardCommand::App(command))
            .with_leader(term)
            .responder(responder)
            .await
            .map_err(|fatal| ProposeError::Stopped(fatal.to_string()))?;
        Ok(Proposal { commit, complete })
    }

    /// Follows the shard's leadership as this node sees it.
    pub fn watch(&self, shard: u16) -> LeadershipWatch {
        LeadershipWatch::new(self.node_id, shard, self.groups.clone())
    }

    /// Answers peers' application requests (`call`) with `app`.
    pub fn serve_app(&self, app: Arc<dyn AppService>) {
        self.service.serve_app(app);
    }

    /// Sends an application request to a member and returns its answer. An error that
    /// `PeerError::surely_not_delivered` accepts means the member never got it.
    pub async fn call(&self, node: u64, request: Vec<u8>, timeout: Duration) -> Result<Vec<u8>, PeerError> {
        let Some(client) = self.peers.get(&node) else {
            return Err(PeerError::Unreachable(node, "not a member".into()));
        };
        network::call_app(client, request, timeout).await
    }

    /// The other members.
    pub fn peers(&self) -> Vec<u64> {
        self.peers.keys().copied().collect()
    }

    /// Confirms with a quorum that this node leads the shard in `term`, and returns the shard log
    /// index every entry committed so far is at or below (read index: at least this leader's
    /// own first entry). Does not wait for the entries to be applied.
    pub async fn confirm_leadership(&self, shard: u16, term: u64) -> Result<u64, ProposeError> {
        let raft = self.group(shard);
        let read = raft.get_read_log_id(openraft::raft::ReadPolicy::ReadIndex);
        let Ok(outcome) = tokio::time::timeout(PROPOSE_TIMEOUT, read).await else {
            return Err(ProposeError::Unknown(
                "no quorum confirmed the leadership in time".into(),
            ));
        };
        match outcome {
            Ok((read, _)) if read.committed_leader_id().term == term => Ok(read.index() + 1),
            Ok(_) => Err(ProposeError::NotLeader { leader: None }),
            Err(RaftError::APIError(LinearizableReadError::ForwardToLeader(forward))) => Err(ProposeError::NotLeader {
                leader: forward.leader_id,
            }),
            Err(RaftError::APIError(error)) => Err(ProposeError::Unknown(error.to_string())),
            Err(RaftError::Fatal(fatal)) => Err(ProposeError::Stopped(fatal.to_string())),
        }
    }

    /// Waits until this node may serve a linearizable read of the shard: it leads it, a quorum
    /// confirmed so, and everything committed before the call is applied here (read index).
    pub async fn read_barrier(&self, shard: u16) -> Result<(), ProposeError> {
        self.barrier_within(shard, PROPOSE_TIMEOUT).await
    }

    async fn barrier_within(&self, shard: u16, timeout: Duration) -> Result<(), ProposeError> {
        let raft = self.group(shard);
        let barrier = raft.ensure_linearizable(openraft::raft::ReadPolicy::ReadIndex);
        let Ok(outcome) = tokio::time::timeout(timeout, barrier).await else {
            return Err(ProposeError::Unknown(
                "no quorum confirmed the leadership in time".into(),
            ));
        };
        match outcome {
            Ok(_) => Ok(()),
            Err(RaftError::APIError(LinearizableReadError::ForwardToLeader(forward))) => Err(ProposeError::NotLeader {
                leader: forward.leader_id,
            }),
            Err(RaftError::APIError(error)) => Err(ProposeError::Unknown(error.to_string())),
            Err(RaftError::Fatal(fatal)) => Err(ProposeError::Stopped(fatal.to_string())),
        }
    }

    /// The lease this node holds on the shard's leadership now (`lease`): `None` when it does
    /// not lead the shard, or no quorum acknowledged it within the lease.
    pub fn lease(&self, shard: u16) -> Option<Lease> {
        self.leases.lease(shard, &self.group(shard).metrics().borrow_watched())
    }

    /// Whether this node holds the lease of the shard's leadership in `term` now.
    pub fn lease_holds(&self, shard: u16, term: u64) -> bool {
        self.lease(shard).is_some_and(|lease| lease.term == term)
    }

    /// Follows this node's lease on the shard (to wait for its loss or its return).
    pub fn lease_watch(&self, shard: u16) -> LeaseWatch {
        LeaseWatch {
            shard,
            book: self.leases.clone(),
            metrics: self.group(shard).metrics(),
            server: self.group(shard).server_metrics(),
            renewals: self.leases.renewals(shard),
        }
    }

    /// Whether this node holds the lease of `term` now, or gets it back within a grace of one
    /// election timeout (a heartbeat acknowledged late under load); `false` once it surely does
    /// not (another member leads, or no quorum answered meanwhile).
    pub async fn await_lease(&self, shard: u16, term: u64) -> bool {
        self.lease_holds(shard, term) || self.lease_watch(shard).regained(term, self.lease_grace).await
    }

    /// Resolves once this node's lease of `term` on the shard has lapsed and not come back
    /// within the grace of `await_lease`, or it no longer leads the shard in `term`.
    pub fn lease_ended(&self, shard: u16, term: u64) -> impl Future<Output = ()> + Send + 'static {
        self.lease_watch(shard).ended(term, self.lease_grace)
    }

    /// Makes sure this node may answer from its own state of the shard: it holds the lease (no
    /// round trip), or else a quorum confirms its leadership now (a read-index barrier, which
    /// also renews the lease). A node cut off from the quorum gets `Unknown` within a few
    /// election timeouts.
    pub async fn confirm_lease(&self, shard: u16) -> Result<(), ProposeError> {
        if self.lease(shard).is_some() {
            metrics::counter!("fleetlm_cluster_lease_reads_total", "path" => "lease").increment(1);
            return Ok(());
        }
        metrics::counter!("fleetlm_cluster_lease_reads_total", "path" => "barrier").increment(1);
        self.barrier_within(shard, self.barrier_timeout).await
    }

    /// The shard's leader as this node last heard, if any.
    pub fn leader(&self, shard: u16) -> Option<u64> {
        self.group(shard).metrics().borrow_watched().current_leader
    }

    /// The shard log index this node has applied, if it leads the shard.
    pub fn applied_if_leading(&self, shard: u16) -> Option<u64> {
        let metrics = self.group(shard).metrics();
        let metrics = metrics.borrow_watched();
        (metrics.current_leader == Some(self.node_id) && metrics.state == ServerState::Leader)
            .then(|| shard_log_index(metrics.last_applied.map(|a| a.index)))
    }

    /// Whether this node's writer holds a current copy of the shard's state (it then stands for
    /// election at once; otherwise only when no leader has been heard from for a while: see
    /// `groups::STAND_BACK`).
    pub fn set_copy_current(&self, shard: u16, current: bool) {
        self.groups.set_copy_current(shard, current);
    }

    pub fn is_leader(&self, shard: u16) -> bool {
        self.leader(shard) == Some(self.node_id)
    }

    /// Waits until the shard has a leader this node knows of, at most `timeout`.
    pub async fn wait_for_leader(&self, shard: u16, timeout: Duration) -> Option<u64> {
        let mut metrics = self.group(shard).metrics();
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            if let Some(leader) = metrics.borrow_watched().current_leader {
                return Some(leader);
            }
            if !matches!(tokio::time::timeout_at(deadline, metrics.changed()).await, Ok(Ok(()))) {
                return None;
            }
        }
    }

    /// Asks the most up-to-date follower of a shard this node leads to take the leadership over
    /// (without waiting for it).
    pub async fn transfer_leadership(&self, shard: u16) {
        let target = {
            let metrics = self.group(shard).metrics();
            let metrics = metrics.borrow_watched();
            let voters: Vec<u64> = metrics.membership_config.membership().voter_ids().collect();
            metrics.replication.as_ref().and_then(|peers| {
                peers
                    .iter()
                    .filter(|(id, _)| **id != self.node_id && voters.contains(id))
                    .max_by_key(|(_, matched)| matched.map(|m| m.index))
                    .map(|(id, _)| *id)
            })
        };
        if let Some(target) = target {
            self.hand_over(shard, target).await;
        }
    }

    /// Asks `target` to take over the leadership of a shard this node leads (without waiting
    /// for it); if it does not within the transfer window, the group restarts here so that the
    /// shard is not left unled (`groups::restart_if_transfer_stalls`).
    async fn hand_over(&self, shard: u16, target: u64) {
        let raft = self.group(shard);
        // The target's election is granted inside the followers' leases: this node's ends.
        let term = raft.metrics().borrow_watched().vote.leader_id().term;
        self.leases.hand_off(shard, term);
        let _ = raft.trigger().transfer_leader(target).await;
        tokio::spawn(groups::restart_if_transfer_stalls(
            self.groups.clone(),
            shard,
            self.node_id,
            term,
            self.leases.transfer_window(),
        ));
    }

    /// Hands the leadership of every shard this node leads to another member (before a drain),
    /// waiting at most `timeout` in all, and stands down from every election: the node is
    /// stopping. Returns how many shards it still leads.
    pub async fn hand_off_leadership(&self, timeout: Duration) -> usize {
        let deadline = tokio::time::Instant::now() + timeout;
        // Stopping, this node stands for no election from now on (it still votes): no shard
        // it hands over, or whose election it sees, comes back to it.
        for shard in 0..self.groups.len() as u16 {
            self.groups.stand_down(shard, true);
        }
        let led: Vec<u16> = (0..self.groups.len() as u16).filter(|s| self.is_leader(*s)).collect();
        for shard in &led {
            self.transfer_leadership(*shard).await;
        }
        for shard in &led {
            let mut metrics = self.group(*shard).metrics();
            while metrics.borrow_watched().current_leader == Some(self.node_id) {
                if !matches!(tokio::time::timeout_at(deadline, metrics.changed()).await, Ok(Ok(()))) {
                    break;
                }
            }
        }
        led.iter().filter(|s| self.is_leader(**s)).count()
    }

    /// Asks the shard's group to snapshot now (as far as the archive reaches) and drop the log
    /// the snapshot covers, beyond what is kept for followers slightly behind.
    pub async fn compact(&self, shard: u16) -> Result<(), ProposeError> {
        self.group(shard)
            .trigger()
            .snapshot()
            .await
            .map_err(|fatal| ProposeError::Stopped(fatal.to_string()))
    }

    /// Carries out one membership step on the shard's leader, wherever it is, following leader
    /// changes until the step's patience runs out.
    async fn change_member(&self, shard: u16, change: MemberChange) -> Result<(), String> {
        let deadline = tokio::time::Instant::now() + change.patience() + Duration::from_secs(5);
        loop {
            let remaining = deadline.saturating_duration_since(tokio::time::Instant::now());
            let outcome = match self.wait_for_leader(shard, remaining).await {
                Some(leader) if leader == self.node_id => self.service.members().change(shard, change).await,
                Some(leader) => match self.peers.get(&leader) {
                    Some(client) => network::ask_member_change(client, shard, change).await,
                    None => Err(MemberChangeError::NotLeader { leader: None }),
                },
                None => Err(MemberChangeError::NotLeader { leader: None }),
            };
            match outcome {
                Ok(()) => return Ok(()),
                Err(MemberChangeError::NotLeader { .. } | MemberChangeError::NotYet(_))
                    if tokio::time::Instant::now() < deadline =>
                {
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
                Err(MemberChangeError::NotLeader { .. }) => {
                    return Err(format!("shard {shard}: no leader carried out {change:?} in time"));
                }
                Err(MemberChangeError::NotYet(reason)) => return Err(format!("shard {shard}: {reason}")),
                Err(MemberChangeError::Failed(reason)) => return Err(format!("shard {shard}: {reason}")),
            }
        }
    }

    /// Runs `change` on the leader of each of `shards`, a few at a time.
    async fn change_member_on(&self, shards: Vec<u16>, change: MemberChange) -> Result<(), String> {
        use futures_util::StreamExt;
        let failures: Vec<String> = futures_util::stream::iter(shards)
            .map(|shard| self.change_member(shard, change))
            .buffer_unordered(8)
            .filter_map(|outcome| async move { outcome.err() })
            .collect()
            .await;
        match failures.as_slice() {
            [] => Ok(()),
            [only] => Err(only.clone()),
            [first, rest @ ..] => Err(format!("{first} (and {} more shards failed)", rest.len())),
        }
    }

    /// Every shard but shard 0, which holds the member records.
    fn shards_but_the_first(&self) -> Vec<u16> {
        (1..self.groups.len() as u16).collect()
    }

    /// The operator's first step of replacing `node`, whose storage is lost (see `membership`):
    /// removes it from every shard's group, then forgets that it joined, so it may start again
    /// on empty storage. Idempotent. Refuses while another member is not a voter everywhere
    /// (one replacement at a time).
    pub async fn forget_member(&self, node: u64) -> Result<(), String> {
        self.check_replaceable(node)?;
        let _one_at_a_time = self.member_steps.lock().await;
        for status in self.status() {
            if let Some(other) = self
                .members
                .iter()
                .find(|m| **m != node && !status.voters.is_empty() && !status.voters.contains(m))
            {
                return Err(format!(
                    "node {other} is not a voter of shard {} yet: finish replacing it first (`fleetlm cluster add-node --node-id {other}`)",
                    status.shard
                ));
            }
        }
        // Shard 0 last: its `Forgotten` record is what lets the node start empty.
        self.change_member_on(self.shards_but_the_first(), MemberChange::Remove(node))
            .await?;
        self.change_member(0, MemberChange::Remove(node)).await?;
        self.change_member(0, MemberChange::Forget(node)).await?;
        // The shared record too: only then may it start on empty storage (see `identity`).
        if let Some(records) = &self.records {
            records.forget_member(node).await.map_err(|e| {
                format!("node {node} is forgotten by the cluster but not by the archive ({e}); run the command again")
            })?;
        }
        // Once more everywhere: an `add_member` run concurrently elsewhere may have made it a
        // voter again before the `Forgotten` record reached every leader.
        let all: Vec<u16> = (0..self.groups.len() as u16).collect();
        self.change_member_on(all, MemberChange::Remove(node)).await
    }

    /// The operator's last step of replacing `node`: once it runs again on empty storage, every
    /// shard's leader adds it as a learner and waits until it has the log; shard 0 records it
    /// joined; then it becomes a voter of every shard again. Idempotent.
    pub async fn add_member(&self, node: u64) -> Result<(), String> {
        self.check_replaceable(node)?;
        let _one_at_a_time = self.member_steps.lock().await;
        // Shard 0 first: a node that does not get its log is not running, or refuses.
        self.change_member(0, MemberChange::AddLearner(node)).await?;
        self.change_member_on(self.shards_but_the_first(), MemberChange::AddLearner(node))
            .await?;
        // Recorded before it votes anywhere: a second wipe is refused again (by the archive's
        // record even when no quorum is left to answer for the log's).
        if let Some(records) = &self.records {
            records
                .record_member(node)
                .await
                .map_err(|e| format!("cannot record node {node} in the archive ({e}); run the command again"))?;
        }
        self.change_member(0, MemberChange::RecordJoined(node)).await?;
        self.change_member(0, MemberChange::Promote(node)).await?;
        self.change_member_on(self.shards_but_the_first(), MemberChange::Promote(node))
            .await
    }

    fn check_replaceable(&self, node: u64) -> Result<(), String> {
        if !self.members.contains(&node) {
            return Err(format!("node {node} is not in --cluster-peers"));
        }
        if node == self.node_id {
            return Err(format!(
                "node {node} is the member asked: ask another member to replace it"
            ));
        }
        Ok(())
    }

    pub async fn shutdown(&self) {
        self.stop.send_replace(true);
        for raft in self.groups.all() {
            let _ = raft.shutdown().await;
        }
        for client in self.peers.values() {
            client.close().await;
        }
    }
}
