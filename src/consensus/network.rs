//! Raft RPCs between nodes: openraft's network traits on top of `peer` connections, and the
//! service that answers them with the local shard groups.
//!
//! All shards' groups share the connections between two nodes; each request names its shard.
//! Requests travel on the lane that keeps them from waiting behind bigger ones (`peer::Lane`):
//! heartbeats (appends without entries), votes and membership questions on the control lane,
//! appends with entries and snapshots on the replication lane, the application's requests on
//! the application lane.

use std::collections::{BTreeSet, HashMap};
use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;

use openraft::OptionalSend;
use openraft::errors::{NetworkError, RPCError, ReplicationClosed, StreamingError, Unreachable};
use openraft::network::v2::RaftNetworkV2;
use openraft::network::{RPCOption, RaftNetworkFactory};
use openraft::raft::{
    AppendEntriesRequest, AppendEntriesResponse, SnapshotResponse, TransferLeaderRequest, TransferLeaderResponse,
    VoteRequest, VoteResponse,
};
use serde::{Deserialize, Serialize};

use super::beats::{self, BeatAnswer, BeatGroup};
use super::groups::Groups;
use super::membership::{self, MemberChange, MemberChangeError};
use super::peer::{Lane, PeerClient, PeerError, PeerHandler};
use super::types::{Member, Snapshot, SnapshotData, SnapshotMeta, TypeConfig, Vote};

/// What one node asks another.
#[derive(Serialize, Deserialize)]
pub enum PeerRequest {
    Raft {
        shard: u16,
        rpc: RaftRpc,
    },
    /// Has the cluster recorded `node` as a member that held the log? (Asked by a node that
    /// starts with empty storage before it takes part: see `Consensus::start`.)
    Joined {
        node: u64,
    },
    /// A request of the application above consensus (forwarded writes and reads, events for
    /// sockets): opaque bytes answered by the node's `AppService`.
    App(#[serde(with = "serde_bytes")] Vec<u8>),
    /// A step of replacing a member, for the shard's leader (see `membership`).
    Member {
        shard: u16,
        change: MemberChange,
    },
    /// The shard's commit index (shard log index), if the callee leads it (asked by a member
    /// refetching its damaged log: see `refetch`).
    Committed {
        shard: u16,
    },
    /// One heartbeat for every group the sender leads here (`beats`).
    Beat {
        groups: Vec<BeatGroup>,
    },
    /// Whether the callee's group of the shard runs and votes (asked by a member about to cut
    /// its damaged log back and stop voting: see `refetch::begin_at_runtime`).
    Voting {
        shard: u16,
    },
    /// For each shard, whether the callee would take its leadership over at once (asked by a
    /// leader about to hand shards over: see `balance`).
    CanLead {
        shards: Vec<u16>,
    },
}

#[derive(Serialize, Deserialize)]
pub enum RaftRpc {
    Append(AppendEntriesRequest<TypeConfig>),
    Vote(VoteRequest<TypeConfig>),
    PreVote(VoteRequest<TypeConfig>),
    Snapshot {
        vote: Vote,
        meta: SnapshotMeta,
        #[serde(with = "serde_bytes")]
        data: Vec<u8>,
    },
    TransferLeader(TransferLeaderRequest<TypeConfig>),
}

/// Whether a node joined the cluster, as a peer can tell.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum JoinedAnswer {
    /// The leader of shard 0, having caught up with everything committed (read index), found it
    /// recorded.
    Joined,
    /// The same leader found it not recorded.
    NotJoined,
    /// The answering node itself started with empty storage and does not take part yet.
    Fresh,
    /// The answering node cannot tell (not the leader, or no quorum).
    Unknown,
}

#[derive(Serialize, Deserialize)]
pub enum RaftReply {
    Append(AppendEntriesResponse<TypeConfig>),
    Vote(VoteResponse<TypeConfig>),
    Snapshot(SnapshotResponse<TypeConfig>),
    TransferLeader(TransferLeaderResponse<TypeConfig>),
    Joined(JoinedAnswer),
    App(#[serde(with = "serde_bytes")] Vec<u8>),
    /// The callee could not answer: unknown shard, or its group has stopped.
    Failed(String),
    Member(Result<(), MemberChangeError>),
    Committed(Option<u64>),
    /// One answer per group of a `Beat`, in its order.
    Beat(Vec<BeatAnswer>),
    /// The callee's group of the shard is running and not refetching (it can vote).
    Voting(bool),
    /// One answer per shard of a `CanLead`, in its order.
    CanLead(Vec<bool>),
}

pub(super) fn encode<T: Serialize>(value: &T) -> Vec<u8> {
    rmp_serde::to_vec(value).expect("raft messages always encode")
}

// ---------------------------------------------------------------------------------------------
// Calling

/// Creates one shard group's view of its peers: every group of the node shares the connections.
#[derive(Clone)]
pub struct ShardNetwork {
    pub shard: u16,
    pub peers: Arc<HashMap<u64, Arc<PeerClient>>>,
}

impl RaftNetworkFactory<TypeConfig> for ShardNetwork {
    type Network = ShardPeer;

    async fn new_client(&mut self, target: u64, _node: &Member) -> ShardPeer {
        ShardPeer {
            shard: self.shard,
            target,
            client: self.peers.get(&target).cloned(),
        }
    }
}

pub struct ShardPeer {
    shard: u16,
    target: u64,
    client: Option<Arc<PeerClient>>,
}

impl ShardPeer {
    async fn call(&self, rpc: RaftRpc, timeout: Duration) -> Result<RaftReply, RPCError<TypeConfig>> {
        let lane = match &rpc {
            RaftRpc::Append(append) if !append.entries.is_empty() => Lane::Replication,
            RaftRpc::Snapshot { .. } => Lane::Replication,
            RaftRpc::Append(_) | RaftRpc::Vote(_) | RaftRpc::PreVote(_) | RaftRpc::TransferLeader(_) => Lane::Control,
        };
        let Some(client) = &self.client else {
            return Err(RPCError::Unreachable(Unreachable::from_string(format!(
                "node {} is not in this node's --cluster-peers",
                self.target
            ))));
        };
        let request = encode(&PeerRequest::Raft { shard: self.shard, rpc });
        let response = client.call(lane, request, timeout).await.map_err(|error| match error {
            PeerError::Unreachable(..) | PeerError::Refused(..) => {
                RPCError::Unreachable(Unreachable::from_string(error.to_string()))
            }
            PeerError::Disconnected(..)
            | PeerError::TimedOut(..)
            | PeerError::TooLarge(..)
            | PeerError::AnswerTooLarge(..) => RPCError::Network(NetworkError::from_string(error.to_string())),
        })?;
        match rmp_serde::from_slice::<RaftReply>(&response) {
            Ok(RaftReply::Failed(reason)) => Err(RPCError::Unreachable(Unreachable::from_string(reason))),
            Ok(reply) => Ok(reply),
            Err(error) => Err(RPCError::Network(NetworkError::from_string(format!(
                "undecodable reply from node {}: {error}",
                self.target
            )))),
        }
    }
}

/// Asks `client`'s node whether the cluster recorded `node` as joined.
pub async fn ask_joined(client: &PeerClient, node: u64, timeout: Duration) -> Result<JoinedAnswer, PeerError> {
    let response = client
        .call(Lane::Control, encode(&PeerRequest::Joined { node }), timeout)
        .await?;
    match rmp_serde::from_slice::<RaftReply>(&response) {
        Ok(RaftReply::Joined(joined)) => Ok(joined),
        _ => Err(PeerError::Disconnected(client.peer())),
    }
}

/// Asks `client`'s node for its commit index of `shard`: `Some` only if it leads the shard.
pub async fn ask_committed(client: &PeerClient, shard: u16, timeout: Duration) -> Result<Option<u64>, PeerError> {
    let response = client
        .call(Lane::Control, encode(&PeerRequest::Committed { shard }), timeout)
        .await?;
    match rmp_serde::from_slice::<RaftReply>(&response) {
        Ok(RaftReply::Committed(committed)) => Ok(committed),
        _ => Err(PeerError::Disconnected(client.peer())),
    }
}

/// Whether `client`'s node can vote in `shard`'s group now (false when it cannot tell, or does
/// not answer within `timeout`).
pub async fn ask_voting(client: &PeerClient, shard: u16, timeout: Duration) -> bool {
    match client
        .call(Lane::Control, encode(&PeerRequest::Voting { shard }), timeout)
        .await
    {
        Ok(response) => matches!(
            rmp_serde::from_slice::<RaftReply>(&response),
            Ok(RaftReply::Voting(true))
        ),
        Err(_) => false,
    }
}

/// For each of `shards`, whether `client`'s node would take its leadership over at once (all
/// false when it cannot tell, or does not answer within `timeout`).
pub async fn ask_can_lead(client: &PeerClient, shards: &[u16], timeout: Duration) -> Vec<bool> {
    let request = encode(&PeerRequest::CanLead {
        shards: shards.to_vec(),
    });
    match client.call(Lane::Control, request, timeout).await {
        Ok(response) => match rmp_serde::from_slice::<RaftReply>(&response) {
            Ok(RaftReply::CanLead(answers)) if answers.len() == shards.len() => answers,
            _ => vec![false; shards.len()],
        },
        Err(_) => vec![false; shards.len()],
    }
}

/// Whether this node would take the shard's leadership over at once: its group runs and votes,
/// it is not stopping, and its copy of the shard's state is current (so it writes without
/// reading the archive first).
fn can_lead(groups: &Groups, shard: u16) -> bool {
    (shard as usize) < groups.len()
        && groups.stopped(shard).is_none()
        && !groups.refetching(shard)
        && !groups.standing_down(shard)
        && groups.copy_current(shard)
}

/// Asks `client`'s node, which this node believes leads `shard`, to carry out `change`.
pub async fn ask_member_change(client: &PeerClient, shard: u16, change: MemberChange) -> Result<(), MemberChangeError> {
    let request = encode(&PeerRequest::Member { shard, change });
    let response = client
        .call(Lane::Control, request, change.patience() + Duration::from_secs(2))
        .await
        .map_err(|error| {
            // Every step is idempotent, so even a step that may have run is simply asked for
            // again (of whoever leads by then). The details may name addresses: logged only.
            tracing::debug!(peer = client.peer(), shard, ?change, %error, "a membership step is asked for again");
            MemberChangeError::NotLeader { leader: None }
        })?;
    match rmp_serde::from_slice::<RaftReply>(&response) {
        Ok(RaftReply::Member(outcome)) => outcome,
        Ok(RaftReply::Failed(_)) => Err(MemberChangeError::NotLeader { leader: None }),
        _ => Err(MemberChangeError::Failed(format!(
            "node {} answered the wrong kind of reply",
            client.peer()
        ))),
    }
}

fn unexpected(target: u64) -> RPCError<TypeConfig> {
    RPCError::Network(NetworkError::from_string(format!(
        "node {target} answered the wrong kind of reply"
    )))
}

impl RaftNetworkV2<TypeConfig> for ShardPeer {
    type SnapshotData = SnapshotData;

    async fn append_entries(
        &mut self,
        rpc: AppendEntriesRequest<TypeConfig>,
        option: RPCOption,
    ) -> Result<AppendEntriesResponse<TypeConfig>, RPCError<TypeConfig>> {
        match self.call(RaftRpc::Append(rpc), option.hard_ttl()).await? {
            RaftReply::Append(response) => Ok(response),
            _ => Err(unexpected(self.target)),
        }
    }

    async fn vote(
        &mut self,
        rpc: VoteRequest<TypeConfig>,
        option: RPCOption,
    ) -> Result<VoteResponse<TypeConfig>, RPCError<TypeConfig>> {
        match self.call(RaftRpc::Vote(rpc), option.hard_ttl()).await? {
            RaftReply::Vote(response) => Ok(response),
            _ => Err(unexpected(self.target)),
        }
    }

    async fn pre_vote(
        &mut self,
        rpc: VoteRequest<TypeConfig>,
        option: RPCOption,
    ) -> Result<VoteResponse<TypeConfig>, RPCError<TypeConfig>> {
        match self.call(RaftRpc::PreVote(rpc), option.hard_ttl()).await? {
            RaftReply::Vote(response) => Ok(response),
            _ => Err(unexpected(self.target)),
        }
    }

    async fn full_snapshot(
        &mut self,
        vote: Vote,
        snapshot: Snapshot,
        cancel: impl Future<Output = ReplicationClosed> + OptionalSend + 'static,
        option: RPCOption,
    ) -> Result<SnapshotResponse<TypeConfig>, StreamingError<TypeConfig>> {
        let rpc = RaftRpc::Snapshot {
            vote,
            meta: snapshot.meta,
            data: snapshot.snapshot.into_inner(),
        };
        tokio::select! {
            closed = cancel => Err(StreamingError::Closed(closed)),
            reply = self.call(rpc, option.hard_ttl()) => match reply? {
                RaftReply::Snapshot(response) => Ok(response),
                _ => Err(unexpected(self.target).into()),
            },
        }
    }

    async fn transfer_leader(
        &mut self,
        req: TransferLeaderRequest<TypeConfig>,
        option: RPCOption,
    ) -> Result<TransferLeaderResponse<TypeConfig>, RPCError<TypeConfig>> {
        match self.call(RaftRpc::TransferLeader(req), option.hard_ttl()).await? {
            RaftReply::TransferLeader(response) => Ok(response),
            _ => Err(unexpected(self.target)),
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Answering

/// The application's side of peer requests (`PeerRequest::App`): bytes in, bytes out.
pub trait AppService: Send + Sync + 'static {
    fn handle(&self, from: u64, request: Vec<u8>) -> Pin<Box<dyn Future<Output = Vec<u8>> + Send>>;
}

/// Sends one application request to `client`'s node and returns its answer.
pub async fn call_app(client: &PeerClient, request: Vec<u8>, timeout: Duration) -> Result<Vec<u8>, PeerError> {
    let response = client
        .call(Lane::Application, encode(&PeerRequest::App(request)), timeout)
        .await?;
    match rmp_serde::from_slice::<RaftReply>(&response) {
        Ok(RaftReply::App(answer)) => Ok(answer),
        // Not served there (yet): nothing was done, as if the node were unreachable.
        Ok(RaftReply::Failed(reason)) => Err(PeerError::Refused(client.peer(), reason)),
        _ => Err(PeerError::Disconnected(client.peer())),
    }
}

/// Answers peers' Raft RPCs with this node's shard groups (set once they exist, and answered
/// only once the node may take part: a node starting empty first makes sure it is new).
#[derive(Default)]
pub struct RaftService {
    node_id: OnceLock<u64>,
    groups: OnceLock<Arc<Groups>>,
    joined: OnceLock<Arc<Mutex<BTreeSet<u64>>>>,
    /// Every shard's storage was empty when this node started.
    started_empty: AtomicBool,
    taking_part: AtomicBool,
    app: OnceLock<Arc<dyn AppService>>,
    /// Held while shard 0's membership records change (`Joined`, `Forgotten`), so recording a
    /// joined member cannot interleave with forgetting it.
    member_records: Arc<tokio::sync::Mutex<()>>,
}

impl RaftService {
    pub fn set_groups(
        &self,
        node_id: u64,
        groups: Arc<Groups>,
        joined: Arc<Mutex<BTreeSet<u64>>>,
        started_empty: bool,
    ) {
        let _ = self.node_id.set(node_id);
        self.started_empty.store(started_empty, Ordering::Release);
        let _ = self.groups.set(groups);
        let _ = self.joined.set(joined);
    }

    pub fn take_part(&self) {
        self.taking_part.store(true, Ordering::Release);
    }

    pub fn serve_app(&self, app: Arc<dyn AppService>) {
        let _ = self.app.set(app);
    }

    pub fn member_records(&self) -> Arc<tokio::sync::Mutex<()>> {
        self.member_records.clone()
    }

    /// What carries out membership steps on this node's groups.
    pub fn members(&self) -> LocalMembers {
        LocalMembers {
            node_id: self.node_id.get().copied(),
            groups: self.groups.get().cloned(),
            joined: self.joined.get().cloned(),
            records: self.member_records.clone(),
        }
    }
}

/// Carries out membership steps on this node's groups (for a request of a peer or of this node).
pub struct LocalMembers {
    node_id: Option<u64>,
    groups: Option<Arc<Groups>>,
    joined: Option<Arc<Mutex<BTreeSet<u64>>>>,
    records: Arc<tokio::sync::Mutex<()>>,
}

impl LocalMembers {
    /// Carries out `change` on this node's group of `shard`, which must lead it, within the
    /// step's patience.
    pub async fn change(&self, shard: u16, change: MemberChange) -> Result<(), MemberChangeError> {
        let (Some(groups), Some(node_id), Some(joined)) = (&self.groups, self.node_id, &self.joined) else {
            return Err(MemberChangeError::NotLeader { leader: None });
        };
        let Some(raft) = groups.try_get(shard) else {
            return Err(MemberChangeError::Failed(format!("there is no shard {shard}")));
        };
        if let MemberChange::Promote(node) = change
            && !joined.lock().expect("joined lock").contains(&node)
        {
            // Only a member recorded as joined may vote: a wipe of it is then refused. (A stale
            // view here only delays the step; a concurrent forget removes it again.)
            return Err(MemberChangeError::NotYet(format!(
                "node {node} is not recorded as joined (as this leader has applied shard 0)"
            )));
        }
        let _records = match change {
            MemberChange::Forget(_) | MemberChange::RecordJoined(_) => Some(self.records.lock().await),
            _ => None,
        };
        match tokio::time::timeout(change.patience(), membership::change_here(&raft, node_id, change)).await {
            Ok(outcome) => outcome,
            Err(_) => Err(MemberChangeError::Failed(format!(
                "{change:?} did not complete within {:?} (no quorum?)",
                change.patience()
            ))),
        }
    }
}

fn formed(groups: Option<&Groups>) -> bool {
    use openraft::type_config::async_runtime::WatchReceiver;
    groups.is_some_and(|groups| groups.get(0).metrics().borrow_watched().last_applied.is_some())
}

/// Only shard 0's leader answers for sure, once it has applied everything committed.
async fn answer_joined(
    groups: Option<Arc<Groups>>,
    joined: Option<Arc<Mutex<BTreeSet<u64>>>>,
    node: u64,
) -> JoinedAnswer {
    let (Some(groups), Some(joined)) = (groups, joined) else {
        return JoinedAnswer::Unknown;
    };
    let shard_zero = groups.get(0);
    let barrier = shard_zero.ensure_linearizable(openraft::raft::ReadPolicy::ReadIndex);
    match tokio::time::timeout(Duration::from_secs(2), barrier).await {
        Ok(Ok(_)) if joined.lock().expect("joined lock").contains(&node) => JoinedAnswer::Joined,
        Ok(Ok(_)) => JoinedAnswer::NotJoined,
        _ => JoinedAnswer::Unknown,
    }
}

/// The end of the shard's log (shard log index), if this node leads it: every entry it may ever
/// commit with a member's earlier acknowledgements is at or below it.
fn answer_committed(groups: Option<&Groups>, shard: u16) -> Option<u64> {
    use openraft::type_config::async_runtime::WatchReceiver;
    let raft = groups?.try_get(shard)?;
    let metrics = raft.metrics();
    let metrics = metrics.borrow_watched();
    (metrics.state == openraft::ServerState::Leader && metrics.current_leader == Some(metrics.id))
        .then(|| metrics.last_log_index.map_or(0, |index| index + 1))
}

/// A vote refused because this member promised a leader, within the lease, not to elect
/// anyone else (`Groups::within_lease`): a beat renews that promise without openraft seeing it,
/// so openraft's own lease check would grant.
fn refusal(raft: &super::types::Raft) -> VoteResponse<TypeConfig> {
    use openraft::type_config::async_runtime::WatchReceiver;
    let vote = raft.metrics().borrow_watched().vote;
    VoteResponse::new(vote, None, false)
}

async fn answer(groups: Option<Arc<Groups>>, request: PeerRequest) -> RaftReply {
    let PeerRequest::Raft { shard, rpc } = request else {
        unreachable!("answered by the service")
    };
    let Some(raft) = groups.as_ref().and_then(|groups| groups.try_get(shard)) else {
        return RaftReply::Failed(format!("shard {shard} is not served here (yet)"));
    };
    let failed = |e: &dyn std::fmt::Display| RaftReply::Failed(format!("shard {shard}: {e}"));
    let electing = matches!(rpc, RaftRpc::Vote(_) | RaftRpc::PreVote(_) | RaftRpc::TransferLeader(_));
    if electing && groups.as_ref().is_some_and(|groups| groups.refetching(shard)) {
        // It may have acknowledged entries it no longer holds: no vote until it holds them.
        return failed(&"this member is refetching its damaged log and does not vote yet");
    }
    if matches!(rpc, RaftRpc::TransferLeader(_)) && groups.as_ref().is_some_and(|groups| groups.standing_down(shard)) {
        // Stopping: a leadership handed to it would be lost at once.
        return failed(&"this member is stopping; it does not take the leadership over");
    }
    if matches!(rpc, RaftRpc::TransferLeader(_)) && groups.as_ref().is_some_and(|groups| !groups.copy_current(shard)) {
        // Elected, it would first have to rebuild its copy of the state (from the archive):
        // the leader hands over to another member, or keeps leading.
        return failed(&"this member's copy of the shard's state is not current; it does not take the leadership over");
    }
    match rpc {
        RaftRpc::Append(rpc) => match raft.append_entries(rpc).await {
            Ok(response) => {
                if !matches!(response, openraft::raft::AppendEntriesResponse::HigherVote(_))
                    && let Some(groups) = &groups
                {
                    groups.heard_from_leader(shard);
                }
                RaftReply::Append(response)
            }
            Err(error) => failed(&error),
        },
        RaftRpc::Vote(rpc) => {
            let Some(groups) = &groups else {
                return failed(&"no groups");
            };
            // Held until the vote is recorded: no beat of an older term is accepted meanwhile.
            let mut record = groups.vote_record(shard).await;
            if !rpc.leadership_transfer && groups.within_lease(shard) {
                return RaftReply::Vote(refusal(&raft));
            }
            let term = rpc.vote.leader_id().term;
            match raft.vote(rpc).await {
                Ok(response) => {
                    if response.vote_granted {
                        record.granted_term = record.granted_term.max(term);
                        // A vote granted restarts the election timer, as a leader's append does.
                        groups.granted_vote(shard);
                    }
                    RaftReply::Vote(response)
                }
                Err(error) => failed(&error),
            }
        }
        RaftRpc::PreVote(rpc) => {
            if groups.as_ref().is_some_and(|groups| groups.within_lease(shard)) {
                return RaftReply::Vote(refusal(&raft));
            }
            match raft.pre_vote(rpc).await {
                Ok(response) => RaftReply::Vote(response),
                Err(error) => failed(&error),
            }
        }
        RaftRpc::Snapshot { vote, meta, data } => {
            let snapshot = Snapshot {
                meta,
                snapshot: SnapshotData::new(data),
            };
            match raft.install_full_snapshot(vote, snapshot).await {
                Ok(response) => RaftReply::Snapshot(response),
                Err(error) => failed(&error),
            }
        }
        RaftRpc::TransferLeader(req) => {
            // The transfer names the leader's last log position, and openraft drops it for good
            // if this member's log has not reached it. The appends carrying those last entries
            // may still be on their way (requests on a connection are handled concurrently), so
            // wait for them, at most an election timeout: a dropped transfer leaves the shard
            // unled until the old leader's group restarts.
            if let Some(wanted) = req.last_log_id().map(|id| id.index) {
                let patience = Duration::from_millis(raft.config().election_timeout_min);
                let _ = raft
                    .wait(Some(patience))
                    .log_index_at_least(Some(wanted), "the log a leadership transfer names")
                    .await;
            }
            match raft.handle_transfer_leader(req).await {
                Ok(response) => RaftReply::TransferLeader(response),
                Err(error) => failed(&error),
            }
        }
    }
}

impl PeerHandler for RaftService {
    fn handle(&self, from: u64, request: Vec<u8>) -> Pin<Box<dyn Future<Output = Vec<u8>> + Send>> {
        let members = self.members();
        let groups = self.groups.get().cloned();
        let joined = self.joined.get().cloned();
        let taking_part = self.taking_part.load(Ordering::Acquire);
        let started_empty = self.started_empty.load(Ordering::Acquire);
        let app = self.app.get().cloned();
        Box::pin(async move {
            let reply = match rmp_serde::from_slice::<PeerRequest>(&request) {
                Ok(PeerRequest::App(request)) => match app {
                    Some(app) => RaftReply::App(app.handle(from, request).await),
                    None => RaftReply::Failed("this node does not serve requests yet".into()),
                },
                // Started empty and has not seen the cluster form (nothing applied in shard 0):
                // nobody can have recorded anything yet, as far as it knows.
                Ok(PeerRequest::Joined { .. }) if started_empty && !formed(groups.as_deref()) => {
                    RaftReply::Joined(JoinedAnswer::Fresh)
                }
                Ok(PeerRequest::Joined { .. }) if !taking_part => RaftReply::Joined(JoinedAnswer::Unknown),
                Ok(PeerRequest::Joined { node }) => RaftReply::Joined(answer_joined(groups, joined, node).await),
                Ok(_) if !taking_part => RaftReply::Failed("this node is not taking part yet".into()),
                Ok(PeerRequest::Member { shard, change }) => RaftReply::Member(members.change(shard, change).await),
                Ok(PeerRequest::Committed { shard }) => {
                    RaftReply::Committed(answer_committed(groups.as_deref(), shard))
                }
                Ok(PeerRequest::Voting { shard }) => RaftReply::Voting(groups.as_deref().is_some_and(|groups| {
                    (shard as usize) < groups.len() && groups.stopped(shard).is_none() && !groups.refetching(shard)
                })),
                Ok(PeerRequest::CanLead { shards }) => RaftReply::CanLead(
                    shards
                        .iter()
                        .map(|shard| groups.as_deref().is_some_and(|groups| can_lead(groups, *shard)))
                        .collect(),
                ),
                Ok(PeerRequest::Beat { groups: beat }) => match groups.as_deref() {
                    Some(groups) => RaftReply::Beat(beats::answer(groups, from, &beat)),
                    None => RaftReply::Failed("this node has no groups yet".into()),
                },
                Ok(request) => answer(groups, request).await,
                Err(error) => RaftReply::Failed(format!("undecodable request: {error}")),
            };
            encode(&reply)
        })
    }
}
