//! Formation: bringing a node into the cluster at start, then (on shard 0's leader) recording
//! the cluster's identity and the members as they join.
//!
//! Wiped members: a node that took part and then lost its storage may have voted and forgotten
//! it, so it must never take part again under its id. Shard 0's log records each member once it
//! holds the log (`ShardCommand::Joined`), and the shared Postgres records it first
//! (`identity`). A node whose every shard starts empty asks its peers first (`confirm_new`) and
//! answers no Raft RPC meanwhile (so it cannot vote); if shard 0's leader says it joined before,
//! it refuses for good. It initializes its groups (forms a cluster) only when a majority of the
//! members started empty and Postgres holds no cluster id.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use openraft::type_config::async_runtime::WatchReceiver;

use super::groups::Groups;
use super::identity::{self, IdentityRecords};
use super::network::{self, RaftService};
use super::peer::PeerClient;
use super::types::{Member, ShardCommand};

#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) enum Formation {
    Pending,
    TakingPart,
    Refused(String),
}

/// What the formation task needs.
pub(super) struct Joining {
    pub node_id: u64,
    pub members: Vec<u64>,
    pub groups: Arc<Groups>,
    pub peers: Arc<HashMap<u64, Arc<PeerClient>>>,
    pub service: Arc<RaftService>,
    pub joined: Arc<Mutex<BTreeSet<u64>>>,
    /// The cluster id shard 0's log recorded, as this node has applied it.
    pub identity: Arc<Mutex<Option<String>>>,
    /// The shared record of the identity (absent: no shared record, e.g. in unit tests).
    pub records: Option<Arc<dyn IdentityRecords>>,
    pub fresh: Vec<bool>,
    pub stopped: tokio::sync::watch::Receiver<bool>,
}

/// How often the leader of shard 0 checks for members to record as joined.
const JOINED_CHECK: Duration = Duration::from_millis(300);

/// How often a node waiting to take part says so.
const WAITING_NOTE: Duration = Duration::from_secs(5);

/// Brings the node into the cluster, then records the identity and members as they join.
pub(super) async fn form(mut f: Joining, formation: tokio::sync::watch::Sender<Formation>) {
    // A node joining a cluster that already formed gets its membership with the leaders' logs
    // (as a voter the groups count, or as a learner being added); it proposes none of its own.
    let mut cluster_formed = false;
    if f.fresh.iter().all(|fresh| *fresh) {
        match confirm_new(&f).await {
            Ok(formed) => cluster_formed = formed,
            Err(reason) => {
                tracing::error!(node = f.node_id, %reason, "refusing to take part in the cluster");
                formation.send_replace(Formation::Refused(reason));
                for raft in f.groups.all() {
                    let _ = raft.shutdown().await;
                }
                return;
            }
        }
    }
    f.service.take_part();
    let membership: BTreeMap<u64, Member> = f.members.iter().map(|id| (*id, Member::default())).collect();
    for (shard, raft) in f.groups.all().into_iter().enumerate() {
        if f.fresh[shard] && !cluster_formed {
            // Refused when the group already has a log or a vote (e.g. a leader's entries
            // arrived first): fine, the membership came with them.
            if let Err(error) = raft.initialize(membership.clone()).await {
                tracing::debug!(shard, %error, "initialize skipped");
            }
        }
    }
    formation.send_replace(Formation::TakingPart);
    let mut recorder = Recorder::default();
    let mut tick = tokio::time::interval(JOINED_CHECK);
    loop {
        tokio::select! {
            _ = tick.tick() => {}
            _ = f.stopped.wait_for(|stop| *stop) => return,
        }
        record_joined(&f, &mut recorder).await;
    }
}

/// Asks the peers whether this node joined before. `Ok(true)` once shard 0's leader says it did
/// not (the cluster formed without it, or forgot it: see `membership`), `Ok(false)` once a
/// majority of the members (itself included) started empty and have applied nothing and the
/// shared record holds no cluster id (the cluster never formed, so nobody can have recorded
/// it); `Err` as soon as the leader says it did.
///
/// With a cluster id recorded, empty peers prove nothing (they may be wiped members, or a
/// replacement not added yet): the node waits for shard 0's leader, however long that takes.
async fn confirm_new(f: &Joining) -> Result<bool, String> {
    use network::JoinedAnswer;
    let majority = f.members.len() / 2 + 1;
    let mut noted = tokio::time::Instant::now();
    let mut stopped = f.stopped.clone();
    // Once seen, an id stays: it is never removed.
    let mut recorded_id: Option<String> = None;
    loop {
        let mut fresh = 1; // this node
        for client in f.peers.values() {
            match network::ask_joined(client, f.node_id, Duration::from_secs(3)).await {
                Ok(JoinedAnswer::Joined) => return Err(wiped_member(f.node_id)),
                Ok(JoinedAnswer::NotJoined) => return Ok(true),
                Ok(JoinedAnswer::Fresh) => fresh += 1,
                Ok(JoinedAnswer::Unknown) | Err(_) => {}
            }
        }
        let note_due = noted.elapsed() > WAITING_NOTE;
        if fresh >= majority && recorded_id.is_none() {
            match shared_cluster_id(f).await {
                Ok(None) => return Ok(false),
                Ok(Some(id)) => recorded_id = Some(id),
                Err(error) if note_due => {
                    tracing::warn!(node = f.node_id, %error, "cannot read the cluster id from the archive; waiting for it before forming a cluster");
                    noted = tokio::time::Instant::now();
                }
                Err(_) => {}
            }
        }
        if note_due {
            match &recorded_id {
                Some(id) => tracing::warn!(
                    node = f.node_id,
                    cluster_id = id.as_str(),
                    "this node starts with empty storage and the archive belongs to cluster {id}: it does not form a cluster; it waits for the leader of shard 0 of that cluster to confirm it is a member that never joined (started late, or forgotten to be replaced)"
                ),
                None => tracing::info!(node = f.node_id, "waiting for the cluster to confirm this node is new"),
            }
            noted = tokio::time::Instant::now();
        }
        tokio::select! {
            _ = tokio::time::sleep(Duration::from_millis(200)) => {}
            _ = stopped.wait_for(|stop| *stop) => return Err("stopped".into()),
        }
    }
}

/// The cluster id the shared record holds (`None` without a shared record).
async fn shared_cluster_id(f: &Joining) -> Result<Option<String>, String> {
    match &f.records {
        Some(records) => records.cluster_id().await,
        None => Ok(None),
    }
}

/// Why a member with empty storage that took part before is refused.
pub fn wiped_member(id: u64) -> String {
    format!(
        "node {id} starts with an empty data directory, but the cluster recorded it as a member that held the log: it may have voted and forgotten it. Restore its data directory, or replace it: stop it, run `fleetlm cluster forget-node --node-id {id}` against a running member, start it again on empty storage, then run `fleetlm cluster add-node --node-id {id}` (docs/OPERATIONS.md, \"Replacing a node\")"
    )
}

/// What shard 0's leader has already put in the shared record.
#[derive(Default)]
struct Recorder {
    /// Members recorded as having taken part (checked against the joined set at every round).
    members: BTreeSet<u64>,
    /// The term in which the identity was last checked against the shared record.
    identity_term: Option<u64>,
}

/// On the leader of shard 0: records the cluster's identity, then itself and every follower
/// that holds the log as joined (in the shared record first, then in the log).
async fn record_joined(f: &Joining, recorder: &mut Recorder) {
    // Not while a member is being forgotten: it could be recorded again right after.
    let _records = f.service.member_records().lock_owned().await;
    let raft = &f.groups.get(0);
    let (holders, term): (Vec<u64>, u64) = {
        let metrics = raft.metrics();
        let metrics = metrics.borrow_watched();
        if metrics.current_leader != Some(f.node_id) {
            return;
        }
        let membership = metrics.membership_config.membership();
        let mut holders = vec![f.node_id];
        if let Some(replication) = &metrics.replication {
            holders.extend(
                replication
                    .iter()
                    .filter(|(id, matched)| matched.is_some() && membership.get_node(id).is_some())
                    .map(|(id, _)| *id),
            );
        }
        (holders, metrics.current_term)
    };
    if let Err(error) = record_identity(f, recorder, term).await {
        tracing::warn!(%error, "recording the cluster id failed; retried later");
        return;
    }
    let joined = f.joined.lock().expect("joined lock").clone();
    if let Some(records) = &f.records {
        // A member forgotten since drops out, so it is recorded again before it rejoins.
        recorder.members.retain(|node| joined.contains(node));
        // Members joined before the shared record existed (an upgrade) are recorded too.
        let wanted: BTreeSet<u64> = joined.iter().chain(holders.iter()).copied().collect();
        for node in wanted {
            if recorder.members.contains(&node) {
                continue;
            }
            if let Err(error) = records.record_member(node).await {
                tracing::debug!(node, %error, "recording a member in the archive failed; retried later");
                return;
            }
            recorder.members.insert(node);
        }
    }
    for node in holders {
        if joined.contains(&node) {
            continue;
        }
        super::beats::renew_engine_lease(raft).await;
        if let Err(error) = raft.client_write(ShardCommand::Joined(node)).await {
            tracing::debug!(node, %error, "recording a joined member failed; retried later");
            return;
        }
    }
}

/// Once per term of shard 0's leader: the cluster id in the log and in the shared record, the
/// same. The first leader makes it (the shared record settles a race); a cluster formed before
/// identities existed gets one the same way.
async fn record_identity(f: &Joining, recorder: &mut Recorder, term: u64) -> Result<(), String> {
    let Some(records) = &f.records else {
        return Ok(());
    };
    if recorder.identity_term == Some(term) {
        return Ok(());
    }
    let applied = f.identity.lock().expect("identity lock").clone();
    match applied {
        Some(id) => {
            let shared = records.claim(id.clone()).await?;
            if shared != id {
                return Err(format!(
                    "the log records cluster {id} but the archive belongs to cluster {shared}"
                ));
            }
        }
        None => {
            // A leader that has not applied its predecessor's record proposes the same id again.
            let id = records.claim(identity::new_cluster_id()).await?;
            let raft = f.groups.get(0);
            super::beats::renew_engine_lease(&raft).await;
            raft.client_write(ShardCommand::Identity(id.clone()))
                .await
                .map_err(|e| e.to_string())?;
            tracing::info!(cluster_id = id.as_str(), "the cluster's id is recorded");
        }
    }
    recorder.identity_term = Some(term);
    Ok(())
}
