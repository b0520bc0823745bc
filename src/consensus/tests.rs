//! The consensus module on real TCP connections and real WALs in temporary directories: three
//! groups per shard form by themselves, replicate, fail over when the leader stops, recover a
//! restarted node from its WAL, catch up a wiped-and-new replica from a snapshot, and a leader
//! cut off from the others acknowledges nothing.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::io::AsyncWriteExt;
use tokio::net::{TcpListener, TcpStream};

use super::*;
use crate::wal::{Wal, WalOptions};

const SHARDS: u16 = 2;
const SECRET: &str = "test-cluster-secret-0123456789";

fn wal_options() -> WalOptions {
    WalOptions {
        lanes: 1,
        shard_count: SHARDS,
        segment_bytes: 1 << 20,
        max_batch_bytes: 256 * 1024,
        queue_depth: 64,
    }
}

fn fast_timing() -> Timing {
    Timing {
        heartbeat: Duration::from_millis(50),
        election_min: Duration::from_millis(300),
        election_max: Duration::from_millis(600),
    }
}

/// Everything one node's consumers have received, per shard, as `(index, command)`; a reload
/// is recorded as `(through, None)` after clearing what it replaces.
type Received = Arc<Mutex<Vec<Vec<Applied>>>>;

struct Node {
    id: u64,
    dir: PathBuf,
    consensus: Consensus,
    wal: Arc<Wal>,
    received: Received,
    /// Per shard: what the consumer says the archive holds (see `ShardFeed`).
    archived: Vec<Arc<std::sync::atomic::AtomicU64>>,
}

struct Cluster {
    /// Per node, the simulated filesystem its WAL lives on, if it runs on one (see
    /// `every_acknowledged_entry_survives_a_power_loss_of_every_node`).
    filesystems: BTreeMap<u64, crate::wal::fault::SimFs>,
    /// `(from, to)` → the cuttable proxy through which `from` dials `to`'s peer listener, so a
    /// partition can cut exactly the links it wants, in both directions.
    proxies: BTreeMap<(u64, u64), Proxy>,
    listen: BTreeMap<u64, std::net::SocketAddr>,
    nodes: BTreeMap<u64, Node>,
    _root: tempfile::TempDir,
}

fn consume(mut feed: ShardFeed, received: Received) {
    tokio::spawn(async move {
        while let Some(applied) = feed.applied.recv().await {
            received.lock().unwrap()[feed.shard as usize].push(applied);
        }
    });
}

impl Cluster {
    async fn start(ids: &[u64]) -> Cluster {
        Self::start_with(ids, BTreeMap::new()).await
    }

    async fn start_with(ids: &[u64], filesystems: BTreeMap<u64, crate::wal::fault::SimFs>) -> Cluster {
        let mut cluster = Cluster::new(ids, filesystems).await;
        for id in ids {
            cluster.start_node(*id).await;
        }
        cluster
    }

    /// The members' addresses and links, no node started yet.
    async fn new(ids: &[u64], filesystems: BTreeMap<u64, crate::wal::fault::SimFs>) -> Cluster {
        let root = tempfile::tempdir().unwrap();
        let mut listen = BTreeMap::new();
        let mut proxies = BTreeMap::new();
        for id in ids {
            // Reserve the node's listener address; the proxies forward to it.
            listen.insert(*id, reserve_listen_addr());
        }
        for from in ids {
            for to in ids {
                if from != to {
                    proxies.insert((*from, *to), Proxy::start(listen[to]).await);
                }
            }
        }
        Cluster {
            filesystems,
            proxies,
            listen,
            nodes: BTreeMap::new(),
            _root: root,
        }
    }

    fn spec(&self, id: u64) -> ClusterSpec {
        ClusterSpec {
            node_id: id,
            peers: self
                .listen
                .iter()
                .map(|(to, addr)| match self.proxies.get(&(id, *to)) {
                    Some(proxy) => (*to, proxy.addr.to_string()),
                    None => (*to, addr.to_string()),
                })
                .collect(),
            secret: SECRET.to_string(),
            listen: self.listen[&id],
            timing: fast_timing(),
        }
    }

    async fn start_node(&mut self, id: u64) {
        let dir = self._root.path().join(format!("node{id}"));
        std::fs::create_dir_all(&dir).unwrap();
        let (wal, _) = match self.filesystems.get(&id) {
            Some(fs) => Wal::open_on(Arc::new(fs.clone()), &dir.join("wal"), wal_options()).unwrap(),
            None => Wal::open(&dir.join("wal"), wal_options()).unwrap(),
        };
        let wal = Arc::new(wal);
        let listener = bind_retrying(self.listen[&id]).await;
        let (consensus, feeds) = Consensus::start_on(&self.spec(id), listener, wal.clone(), &dir, None)
            .await
            .unwrap();
        let received: Received = Arc::new(Mutex::new(vec![Vec::new(); SHARDS as usize]));
        let mut archived = Vec::new();
        for feed in feeds {
            archived.push(feed.archived_through.clone());
            consume(feed, received.clone());
        }
        self.nodes.insert(
            id,
            Node {
                id,
                dir,
                consensus,
                wal,
                received,
                archived,
            },
        );
    }

    /// Cuts (or heals) every link to and from `id`.
    fn isolate(&self, id: u64, cut: bool) {
        for ((from, to), proxy) in &self.proxies {
            if *from == id || *to == id {
                proxy.cut(cut);
            }
        }
    }

    /// Stops a node as a crash would look to the others (its state stays on disk).
    async fn stop_node(&mut self, id: u64) -> PathBuf {
        let node = self.nodes.remove(&id).unwrap();
        node.consensus.shutdown().await;
        drop(node.consensus);
        if let Ok(wal) = Arc::try_unwrap(node.wal) {
            wal.shutdown();
        }
        node.dir
    }

    async fn leader(&self, shard: u16) -> u64 {
        let deadline = tokio::time::Instant::now() + Duration::from_secs(15);
        loop {
            // A leader every running node agrees on.
            let seen: Vec<Option<u64>> = self.nodes.values().map(|n| n.consensus.leader(shard)).collect();
            if let Some(Some(leader)) = seen.first()
                && seen.iter().all(|s| *s == Some(*leader))
                && self.nodes.contains_key(leader)
            {
                return *leader;
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "no agreed leader for shard {shard}: {seen:?}"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    fn node(&self, id: u64) -> &Node {
        &self.nodes[&id]
    }
}

/// An address a node listens on across its restarts. Chosen below Linux's ephemeral port range
/// (32768 and up): an address from there could be taken, while the node is down, by an outgoing
/// connection of any test in this process (peers redial a stopped node all the time).
fn reserve_listen_addr() -> std::net::SocketAddr {
    for _ in 0..1000 {
        let port = rand::random_range(20_000..32_000u16);
        if let Ok(probe) = std::net::TcpListener::bind(("127.0.0.1", port)) {
            return probe.local_addr().unwrap();
        }
    }
    panic!("no free port below the ephemeral range");
}

async fn bind_retrying(addr: std::net::SocketAddr) -> std::net::TcpListener {
    for _ in 0..100 {
        if let Ok(listener) = std::net::TcpListener::bind(addr) {
            return listener;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    panic!("cannot bind {addr}");
}

/// The commands a node applied for a shard, in order, after its latest reload.
fn commands(node: &Node, shard: u16) -> Vec<(u64, Vec<u8>)> {
    let received = node.received.lock().unwrap();
    let mut out = Vec::new();
    for applied in &received[shard as usize] {
        match applied {
            Applied::Entry {
                index,
                command: Some(command),
                ..
            } => out.push((*index, command.clone())),
            Applied::Entry { command: None, .. } => {}
            Applied::Reload { .. } => out.clear(),
        }
    }
    out
}

/// Indexes applied must only grow (after a reload: past its point).
fn assert_applied_in_order(node: &Node, shard: u16) {
    let received = node.received.lock().unwrap();
    let mut last = 0;
    for applied in &received[shard as usize] {
        match applied {
            Applied::Entry { index, .. } => {
                assert!(*index > last, "node {} shard {shard}: {index} after {last}", node.id);
                last = *index;
            }
            Applied::Reload { through } => last = *through,
        }
    }
}

/// `wait_until` for a check that has to wait itself.
async fn wait_until_async<F: std::future::Future<Output = bool>>(what: &str, mut check: impl FnMut() -> F) {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(15);
    while !check().await {
        assert!(tokio::time::Instant::now() < deadline, "timed out waiting: {what}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

async fn wait_until(what: &str, mut check: impl FnMut() -> bool) {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(15);
    while !check() {
        assert!(tokio::time::Instant::now() < deadline, "timed out waiting until {what}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

fn payload(i: usize) -> Vec<u8> {
    format!("command-{i}").into_bytes()
}

/// Proposes at whichever node leads, following `NotLeader` answers.
async fn propose(cluster: &Cluster, shard: u16, command: Vec<u8>) -> u64 {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(15);
    loop {
        let leader = cluster.leader(shard).await;
        match cluster.node(leader).consensus.propose(shard, command.clone()).await {
            Ok(index) => return index,
            Err(ProposeError::NotLeader { .. }) => {}
            Err(error) => panic!("proposal failed: {error}"),
        }
        assert!(tokio::time::Instant::now() < deadline, "no leader took the proposal");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// `propose`, retrying every refusal (a group that stops under the proposal answers with an
/// error; its outcome is then unknown, so the command may be committed twice).
async fn propose_through_failures(cluster: &Cluster, shard: u16, command: Vec<u8>) -> u64 {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(15);
    loop {
        let leader = cluster.leader(shard).await;
        if let Ok(index) = cluster.node(leader).consensus.propose(shard, command.clone()).await {
            return index;
        }
        assert!(tokio::time::Instant::now() < deadline, "no leader took the proposal");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cluster_forms_replicates_fails_over_and_recovers() {
    let mut cluster = Cluster::start(&[1, 2, 3]).await;
    let shard = 1;
    let leader = cluster.leader(shard).await;
    let mut expected = Vec::new();
    for i in 0..50 {
        let index = propose(&cluster, shard, payload(i)).await;
        expected.push((index, payload(i)));
    }
    // Indexes are consecutive past the entries Raft itself wrote (membership, blank).
    for pair in expected.windows(2) {
        assert_eq!(pair[1].0, pair[0].0 + 1);
    }
    // A follower refuses and names the leader.
    let follower = *cluster.nodes.keys().find(|id| **id != leader).unwrap();
    assert_eq!(
        cluster.node(follower).consensus.propose(shard, b"x".to_vec()).await,
        Err(ProposeError::NotLeader { leader: Some(leader) })
    );
    // Every node applies every committed entry, in order, with the same content.
    for id in [1, 2, 3] {
        wait_until("all applied", || {
            commands(cluster.node(id), shard).len() == expected.len()
        })
        .await;
        assert_eq!(commands(cluster.node(id), shard), expected, "node {id}");
    }

    // The leader stops: the others elect a new one and keep committing.
    cluster.stop_node(leader).await;
    let new_leader = cluster.leader(shard).await;
    assert_ne!(new_leader, leader);
    for i in 50..80 {
        let index = propose(&cluster, shard, payload(i)).await;
        expected.push((index, payload(i)));
    }

    // The old leader comes back from its WAL and catches up to the same history.
    cluster.start_node(leader).await;
    for id in [1, 2, 3] {
        wait_until("all applied after restart", || {
            commands(cluster.node(id), shard).len() >= expected.len()
        })
        .await;
        assert_eq!(commands(cluster.node(id), shard), expected, "node {id}");
        assert_applied_in_order(cluster.node(id), shard);
    }
    // The other shard formed as well, independently.
    let other = cluster.leader(0).await;
    assert!(cluster.node(other).consensus.is_leader(0));
    for node in cluster.nodes.values() {
        node.consensus.shutdown().await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_leader_cut_off_from_the_majority_acknowledges_nothing() {
    let mut cluster = Cluster::start(&[1, 2, 3]).await;
    let shard = 0;
    for i in 0..5 {
        propose(&cluster, shard, payload(i)).await;
    }
    let old = cluster.leader(shard).await;
    // Cut the leader off: nothing reaches it and nothing it sends arrives.
    cluster.isolate(old, true);
    let stranded = tokio::time::timeout(
        Duration::from_secs(3),
        cluster.node(old).consensus.propose(shard, b"lost".to_vec()),
    )
    .await;
    assert!(
        !matches!(stranded, Ok(Ok(_))),
        "a leader without a majority acknowledged a write: {stranded:?}"
    );
    // The majority elects a new leader and commits (retried through the majority's own
    // leader changes: a busy machine may need more than one election).
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    let (new_leader, index) = loop {
        let seen = cluster
            .nodes
            .values()
            .filter(|n| n.id != old)
            .map(|n| n.consensus.leader(shard))
            .collect::<Vec<_>>();
        if let Some(Some(l)) = seen.first()
            && *l != old
            && seen.iter().all(|s| *s == Some(*l))
        {
            match cluster.node(*l).consensus.propose(shard, b"kept".to_vec()).await {
                Ok(index) => break (*l, index),
                Err(error @ (ProposeError::NotLeader { .. } | ProposeError::Unknown(_))) => {
                    eprintln!("the majority's proposal did not commit yet: {error}");
                }
                Err(error) => panic!("the majority's proposal failed: {error}"),
            }
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "the majority elected no leader that commits: {seen:?}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    // Healed: the old leader steps down and converges on the majority's history, in which the
    // stranded write never appears.
    cluster.isolate(old, false);
    for id in [1, 2, 3] {
        wait_until("converged", || {
            commands(cluster.node(id), shard).iter().any(|(i, _)| *i == index)
        })
        .await;
    }
    for id in [1, 2, 3] {
        let history = commands(cluster.node(id), shard);
        assert!(
            history.iter().all(|(_, c)| c != b"lost"),
            "node {id} applied the stranded write"
        );
        assert_eq!(history, commands(cluster.node(new_leader), shard), "node {id}");
    }
    let _ = cluster.stop_node(old).await;
}

/// The leadership lease: a leader holds it while a quorum acknowledges it; cut off, it loses it
/// (while it still counts itself leader by its role) before any other member can lead; a
/// leadership transfer drops it at once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cut_off_leader_loses_its_lease_before_another_member_leads() {
    let mut cluster = Cluster::start(&[1, 2, 3]).await;
    let shard = 0;
    propose(&cluster, shard, payload(0)).await;
    let old = cluster.leader(shard).await;
    wait_until("the leader holds its lease", || {
        cluster.node(old).consensus.lease(shard).is_some()
    })
    .await;
    let term = cluster.node(old).consensus.lease(shard).expect("a lease").term;
    for other in [1, 2, 3].into_iter().filter(|id| *id != old) {
        assert!(
            cluster.node(other).consensus.lease(shard).is_none(),
            "a follower holds no lease"
        );
    }
    let lost = tokio::spawn(cluster.node(old).consensus.lease_ended(shard, term));

    cluster.isolate(old, true);
    let cut = tokio::time::Instant::now();
    // Lost within the lease (plus scheduling slack), while the role still says leader.
    let mut lapsed_at = None;
    while lapsed_at.is_none() {
        if !cluster.node(old).consensus.lease_holds(shard, term) {
            lapsed_at = Some(tokio::time::Instant::now());
        }
        let others_lease = [1, 2, 3]
            .into_iter()
            .filter(|id| *id != old)
            .any(|id| cluster.node(id).consensus.lease(shard).is_some());
        assert!(
            lapsed_at.is_some() || !others_lease,
            "another member holds a lease while the cut-off leader still does"
        );
        assert!(
            cut.elapsed() < Duration::from_secs(5),
            "the cut-off leader kept its lease"
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let lapsed_after = lapsed_at.expect("lapsed") - cut;
    assert!(
        lapsed_after <= fast_timing().lease() + Duration::from_millis(150),
        "the lease outlived its length: {lapsed_after:?}"
    );
    assert!(
        cluster.node(old).consensus.is_leader(shard),
        "openraft keeps a cut-off leader's role: the lease is what tells"
    );
    tokio::time::timeout(Duration::from_secs(5), lost)
        .await
        .expect("the lease's end was observed")
        .expect("the watch task");
    assert!(
        !cluster.node(old).consensus.await_lease(shard, term).await,
        "a cut-off leader's lease does not come back"
    );

    // The majority elects a leader, which gets a lease; the old one never holds one again.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    let new = loop {
        if let Some(id) = [1, 2, 3]
            .into_iter()
            .filter(|id| *id != old)
            .find(|id| cluster.node(*id).consensus.lease(shard).is_some())
        {
            break id;
        }
        assert!(tokio::time::Instant::now() < deadline, "no new leader got a lease");
        tokio::time::sleep(Duration::from_millis(10)).await;
    };
    assert!(cluster.node(old).consensus.lease(shard).is_none());
    cluster.isolate(old, false);
    wait_until("the old leader follows", || {
        !cluster.node(old).consensus.is_leader(shard)
    })
    .await;

    // A transfer drops the lease as it starts: the target's election is granted inside the
    // followers' leases.
    let term = cluster
        .node(new)
        .consensus
        .lease(shard)
        .expect("the new leader's lease")
        .term;
    cluster.node(new).consensus.transfer_leadership(shard).await;
    assert!(!cluster.node(new).consensus.lease_holds(shard, term));
    let _ = cluster.stop_node(old).await;
}

/// A leadership transfer its target refuses (here: the followers' copies of the state are not
/// current, and they stand down from elections) does not leave the shard unled: once the
/// transfer's window has passed, the leader restarts its group and campaigns again. Before,
/// openraft kept it a leader that refuses every write, its beats kept the followers from ever
/// timing out, and the shard took no write again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_leadership_transfer_its_target_refuses_leaves_the_shard_led() {
    let mut cluster = Cluster::start(&[1, 2, 3]).await;
    let shard = 0;
    let first = propose(&cluster, shard, payload(0)).await;
    let leader = cluster.leader(shard).await;
    let term_of = |id: u64| {
        cluster
            .node(id)
            .consensus
            .group(shard)
            .metrics()
            .borrow_watched()
            .vote
            .leader_id()
            .term
    };
    let term = term_of(leader);
    let generation = *cluster.node(leader).consensus.groups.generation(shard).borrow();
    for id in [1, 2, 3].into_iter().filter(|id| *id != leader) {
        let groups = &cluster.node(id).consensus.groups;
        groups.set_copy_current(shard, false);
        groups.stand_down(shard, true);
    }
    cluster.node(leader).consensus.transfer_leadership(shard).await;
    // Refused: the leader takes no write while its transfer stands.
    assert!(
        cluster.node(leader).consensus.propose(shard, payload(1)).await.is_err(),
        "a leader handing its leadership over takes no write"
    );
    let second = propose_through_failures(&cluster, shard, payload(2)).await;
    assert!(second > first);
    assert_eq!(
        cluster.leader(shard).await,
        leader,
        "the only member standing leads again"
    );
    let now = term_of(leader);
    assert!(now > term, "it leads in a new term ({term} then {now})");
    assert!(
        *cluster.node(leader).consensus.groups.generation(shard).borrow() > generation,
        "its group was restarted"
    );
    for id in [1, 2, 3] {
        wait_until("every member applied the write taken after the refusal", || {
            applied_by_index(cluster.node(id), shard).contains_key(&second)
        })
        .await;
    }
    for id in [1, 2, 3] {
        cluster.stop_node(id).await;
    }
}

/// A hand-over to a chosen member, sent right behind writes the leader has not seen committed
/// (the transfer travels on the control connection, the entries on the replication one), is
/// taken up by that member, without a stall: a stalled one leaves the shard unled until the old
/// leader's group restarts (`restart_if_transfer_stalls`). (The target's wait for the log
/// position a transfer names, in `network`, is for when the entries arrive later still; this
/// run does not force that order.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hand_over_racing_its_last_entries_is_taken_up() {
    let cluster = Cluster::start(&[1, 2, 3]).await;
    let mut handed = Vec::new();
    for shard in 0..SHARDS {
        // As a writer that holds a current copy says (a member without one stands back).
        for id in [1, 2, 3] {
            cluster.node(id).consensus.set_copy_current(shard, true);
        }
        propose(&cluster, shard, payload(0)).await;
        let leader = cluster.leader(shard).await;
        let target = [1, 2, 3].into_iter().find(|id| *id != leader).unwrap();
        let consensus = &cluster.node(leader).consensus;
        let term = consensus.group(shard).metrics().borrow_watched().vote.leader_id().term;
        let generation = *consensus.groups.generation(shard).borrow();
        // Entries of 64 KiB, queued and not waited for: the transfer names the last of them.
        let mut proposals = Vec::new();
        for i in 0..8 {
            let mut command = payload(i);
            command.resize(64 * 1024, b'x');
            proposals.push(consensus.enqueue(shard, term, command).await.expect("queued"));
        }
        consensus.hand_over(shard, target).await;
        handed.push((shard, leader, target, generation, proposals));
    }
    for (shard, leader, target, generation, proposals) in handed {
        for proposal in proposals {
            proposal
                .committed()
                .await
                .expect("committed before the hand-over took effect");
        }
        wait_until("the target of each hand-over leads", || {
            cluster.node(target).consensus.is_leader(shard)
        })
        .await;
        assert_eq!(
            *cluster.node(leader).consensus.groups.generation(shard).borrow(),
            generation,
            "shard {shard}: the hand-over from {leader} to {target} stalled and the group restarted"
        );
    }
}

/// Whether member `id` may cut its damaged log of `shard` now (`groups::others_can_elect`).
async fn guard(cluster: &Cluster, shard: u16, id: u64) -> bool {
    let consensus = &cluster.node(id).consensus;
    groups::others_can_elect(&consensus.groups, shard, id, &consensus.peers).await
}

/// The guard before a member cuts its damaged log while running (`groups::others_can_elect`):
/// the other voters must be a quorum that can vote without it. A member down, or one that is
/// refetching its own log, does not count: two members out of three cutting their logs at once
/// would leave a shard that never elects.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_damaged_log_is_cut_only_while_the_others_can_elect_without_it() {
    let mut cluster = Cluster::start(&[1, 2, 3]).await;
    let shard = 0;
    propose(&cluster, shard, payload(0)).await;
    for id in [1, 2, 3] {
        assert!(guard(&cluster, shard, id).await, "node {id}: both others vote");
    }
    // One member down: neither of the others may cut (each would leave one voter).
    cluster.stop_node(3).await;
    assert!(!guard(&cluster, shard, 1).await);
    assert!(!guard(&cluster, shard, 2).await);
    cluster.start_node(3).await;
    wait_until_async("node 3 answers again", || guard(&cluster, shard, 1)).await;
    // One member refetching: it does not vote, so no other member may cut now.
    cluster.node(2).consensus.groups.set_refetching(shard, true);
    assert!(!guard(&cluster, shard, 1).await);
    assert!(!guard(&cluster, shard, 3).await);
    // Another shard is not concerned.
    assert!(guard(&cluster, 1, 1).await);
    cluster.node(2).consensus.groups.set_refetching(shard, false);
    assert!(guard(&cluster, shard, 1).await);
    assert!(guard(&cluster, shard, 3).await);
    for id in [1, 2, 3] {
        cluster.stop_node(id).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_replica_behind_the_purged_log_catches_up_from_a_snapshot() {
    let mut cluster = Cluster::start(&[1, 2, 3]).await;
    let shard = 0;
    propose(&cluster, shard, payload(0)).await;
    // Node 3 goes away; the others move far on and compact their logs.
    let leader = cluster.leader(shard).await;
    let away = if leader == 3 { 2 } else { 3 };
    let dir = cluster.stop_node(away).await;
    let mut last = 0;
    for i in 1..700 {
        last = propose(&cluster, shard, payload(i)).await;
    }
    // The consumers say the archive holds everything through `last - 10`.
    let archived = last - 10;
    for id in cluster.nodes.keys().copied().collect::<Vec<_>>() {
        set_archived(&cluster, id, shard, archived);
    }
    for node in cluster.nodes.values() {
        node.consensus.compact(shard).await.unwrap();
    }
    wait_until("purged", || {
        cluster
            .nodes
            .values()
            .all(|n| n.wal.first_index(shard).is_some_and(|first| first > 100))
    })
    .await;
    // It comes back with its old log: the leader no longer has the entries it needs, so it must
    // send a snapshot.
    let _ = dir;
    cluster.start_node(away).await;
    wait_until("caught up", || {
        cluster.node(away).received.lock().unwrap()[shard as usize]
            .iter()
            .any(|a| matches!(a, Applied::Entry { index, .. } if *index == last))
    })
    .await;
    let received = cluster.node(away).received.lock().unwrap()[shard as usize].clone();
    let reload = received
        .iter()
        .find_map(|a| match a {
            Applied::Reload { through } => Some(*through),
            _ => None,
        })
        .expect("the replica was told to reload from the archive");
    assert!(reload > 100 && reload <= archived, "reload through {reload}");
    // After the reload point it applied every entry, in order.
    let after: Vec<u64> = received
        .iter()
        .skip_while(|a| !matches!(a, Applied::Reload { .. }))
        .filter_map(|a| match a {
            Applied::Entry { index, .. } => Some(*index),
            _ => None,
        })
        .collect();
    assert_eq!(
        after.first(),
        Some(&(reload + 1)),
        "applied from right after the reload"
    );
    assert!(
        after.windows(2).all(|w| w[1] == w[0] + 1),
        "no entry skipped or repeated"
    );
    assert!(after.contains(&last));
    for node in cluster.nodes.values() {
        node.consensus.shutdown().await;
    }
}

fn set_archived(cluster: &Cluster, id: u64, shard: u16, through: u64) {
    cluster.node(id).archived[shard as usize].store(through, Ordering::Release);
}

/// A TCP proxy for one direction of one link: `cut` drops its connections and refuses new ones.
struct Proxy {
    addr: std::net::SocketAddr,
    cut: Arc<AtomicBool>,
    generation: Arc<tokio::sync::watch::Sender<u64>>,
    _task: tokio::task::JoinHandle<()>,
}

impl Proxy {
    async fn start(target: std::net::SocketAddr) -> Proxy {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let cut = Arc::new(AtomicBool::new(false));
        let generation = Arc::new(tokio::sync::watch::channel(0u64).0);
        let (task_cut, task_generation) = (cut.clone(), generation.clone());
        let task = tokio::spawn(async move {
            loop {
                let Ok((inbound, _)) = listener.accept().await else {
                    continue;
                };
                if task_cut.load(Ordering::Acquire) {
                    drop(inbound);
                    continue;
                }
                let mut changed = task_generation.subscribe();
                tokio::spawn(async move {
                    let Ok(outbound) = TcpStream::connect(target).await else {
                        return;
                    };
                    let (mut a, mut b) = (inbound, outbound);
                    tokio::select! {
                        _ = tokio::io::copy_bidirectional(&mut a, &mut b) => {}
                        _ = changed.changed() => {}
                    }
                    let _ = a.shutdown().await;
                    let _ = b.shutdown().await;
                });
            }
        });
        Proxy {
            addr,
            cut,
            generation,
            _task: task,
        }
    }

    fn cut(&self, cut: bool) {
        self.cut.store(cut, Ordering::Release);
        if cut {
            self.generation.send_modify(|g| *g += 1);
        }
    }
}

/// The disks of every node stop syncing (fdatasync fails from some instant on) while proposals
/// stream in, then every node loses power: whatever a proposal acknowledged was fdatasync'd on a
/// majority, so after the restart every node converges on a history holding all of it. Fails if
/// the log store acknowledged an entry before the WAL's fsync (checked by mutation).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_acknowledged_entry_survives_failing_fsyncs_and_a_power_loss_of_every_node() {
    use crate::wal::fault::{Fault, FaultKind, FaultOp, SimFs};
    for seed in 0..3u64 {
        let ids = [1u64, 2, 3];
        let filesystems: BTreeMap<u64, SimFs> = ids.iter().map(|id| (*id, SimFs::new())).collect();
        let mut cluster = Cluster::start_with(&ids, filesystems.clone()).await;
        let shard = 0;
        let leader = cluster.leader(shard).await;
        let acknowledged = Arc::new(Mutex::new(Vec::new()));
        let consensus = &cluster.node(leader).consensus;
        let proposals = (0..400usize).map(|i| {
            let acknowledged = acknowledged.clone();
            async move {
                tokio::time::sleep(Duration::from_millis(i as u64)).await;
                // Failures are expected once the disks fail (the group stops): only acks count.
                if let Ok(index) = consensus.propose(shard, payload(i)).await {
                    acknowledged.lock().unwrap().push((index, payload(i)));
                }
            }
        });
        let all = futures_util::future::join_all(proposals);
        let faults = async {
            tokio::time::sleep(Duration::from_millis(100 + 40 * seed)).await;
            for fs in filesystems.values() {
                fs.arm(Fault {
                    op: FaultOp::Sync,
                    after: 0,
                    kind: FaultKind::Eio,
                    sticky: true,
                });
            }
            tokio::time::sleep(Duration::from_millis(300)).await;
        };
        // Every proposal ends: acknowledged, or refused once its group stopped.
        tokio::time::timeout(Duration::from_secs(30), async { tokio::join!(all, faults) })
            .await
            .expect("proposals end");
        let images: BTreeMap<u64, SimFs> = filesystems.iter().map(|(id, fs)| (*id, fs.power_loss(seed))).collect();
        let acknowledged = acknowledged.lock().unwrap().clone();
        assert!(
            !acknowledged.is_empty(),
            "seed {seed}: nothing was acknowledged before the disks failed"
        );
        for id in ids {
            cluster.stop_node(id).await;
        }
        cluster.filesystems = images;
        for id in ids {
            cluster.start_node(id).await;
        }
        // A new entry commits (and with it everything before it in the new leader's log).
        let last = propose(&cluster, shard, b"after the power loss".to_vec()).await;
        for id in ids {
            wait_until("applied after the power loss", || {
                commands(cluster.node(id), shard).iter().any(|(i, _)| *i == last)
            })
            .await;
            let history = commands(cluster.node(id), shard);
            for (index, command) in &acknowledged {
                assert!(
                    history.contains(&(*index, command.clone())),
                    "seed {seed}: node {id} lost acknowledged entry {index} ({} acknowledged)",
                    acknowledged.len()
                );
            }
        }
        for id in ids {
            cluster.stop_node(id).await;
        }
    }
}

/// A member that starts for the first time late joins and catches up; once the cluster has
/// recorded it, the same member coming back with an empty data directory (a wiped or replaced
/// disk) is refused: it may have voted and forgotten it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_late_first_start_joins_and_a_wiped_member_is_refused() {
    let mut cluster = Cluster::new(&[1, 2, 3], BTreeMap::new()).await;
    cluster.start_node(1).await;
    cluster.start_node(2).await;
    let shard = 0;
    let mut expected = Vec::new();
    for i in 0..10 {
        expected.push((propose(&cluster, shard, payload(i)).await, payload(i)));
    }
    let leader = cluster.leader(shard).await;
    wait_until("nodes 1 and 2 recorded as joined", || {
        cluster.node(leader).consensus.joined() == vec![1, 2]
    })
    .await;

    cluster.start_node(3).await;
    cluster
        .node(3)
        .consensus
        .formed()
        .await
        .expect("a new member takes part");
    wait_until("node 3 caught up", || {
        commands(cluster.node(3), shard).len() >= expected.len()
    })
    .await;
    assert_eq!(commands(cluster.node(3), shard), expected);
    wait_until("node 3 recorded as joined", || {
        cluster.node(leader).consensus.joined() == vec![1, 2, 3]
    })
    .await;

    let dir = cluster.stop_node(3).await;
    std::fs::remove_dir_all(&dir).unwrap();
    cluster.start_node(3).await;
    let refused = tokio::time::timeout(Duration::from_secs(15), cluster.node(3).consensus.formed())
        .await
        .expect("decided");
    let reason = refused.expect_err("a wiped member is refused");
    assert!(reason.contains("empty data directory"), "{reason}");
    assert_eq!(cluster.node(3).consensus.refusal(), Some(reason));
    cluster.stop_node(3).await;
    // The others carry on.
    propose(&cluster, shard, b"still writable".to_vec()).await;
    for node in cluster.nodes.values() {
        node.consensus.shutdown().await;
    }
}

fn voters_everywhere(node: &Node) -> Vec<Vec<u64>> {
    node.consensus.status().into_iter().map(|s| s.voters).collect()
}

/// Replacing a member whose storage is lost: forgotten (removed from every group, its joined
/// record dropped), started on empty storage, added back; it then holds the whole log and
/// counts as a voter (the cluster commits with it while another member is down), and a second
/// wipe is refused again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_member_with_lost_storage_is_forgotten_started_empty_and_added_back() {
    let mut cluster = Cluster::start(&[1, 2, 3]).await;
    let mut expected: Vec<Vec<(u64, Vec<u8>)>> = vec![Vec::new(); SHARDS as usize];
    for i in 0..10 {
        for shard in 0..SHARDS {
            expected[shard as usize].push((propose(&cluster, shard, payload(i)).await, payload(i)));
        }
    }
    let leader0 = cluster.leader(0).await;
    wait_until("every member recorded as joined", || {
        cluster.node(leader0).consensus.joined() == vec![1, 2, 3]
    })
    .await;

    let dir = cluster.stop_node(3).await;
    std::fs::remove_dir_all(&dir).unwrap();
    let error = cluster
        .node(1)
        .consensus
        .forget_member(1)
        .await
        .expect_err("not itself");
    assert!(error.contains("ask another member"), "{error}");
    cluster.node(1).consensus.forget_member(3).await.expect("forgotten");
    // Idempotent.
    cluster
        .node(2)
        .consensus
        .forget_member(3)
        .await
        .expect("forgotten again");
    for id in [1, 2] {
        wait_until("node 3 forgotten everywhere", || {
            voters_everywhere(cluster.node(id)) == vec![vec![1, 2]; SHARDS as usize]
                && cluster.node(id).consensus.joined() == vec![1, 2]
        })
        .await;
    }
    // One replacement at a time.
    let error = cluster
        .node(1)
        .consensus
        .forget_member(2)
        .await
        .expect_err("3 is not back");
    assert!(error.contains("finish replacing it first"), "{error}");
    // The two remaining voters commit on their own.
    for i in 10..15 {
        for shard in 0..SHARDS {
            expected[shard as usize].push((propose(&cluster, shard, payload(i)).await, payload(i)));
        }
    }

    cluster.start_node(3).await;
    tokio::time::timeout(Duration::from_secs(15), cluster.node(3).consensus.formed())
        .await
        .expect("decided")
        .expect("a forgotten member may start empty");
    assert!(
        voters_everywhere(cluster.node(3))
            .iter()
            .all(|voters| voters.is_empty()),
        "it proposes no membership of its own"
    );
    cluster.node(2).consensus.add_member(3).await.expect("added back");
    for id in [1, 2, 3] {
        wait_until("node 3 a voter everywhere", || {
            voters_everywhere(cluster.node(id)) == vec![vec![1, 2, 3]; SHARDS as usize]
        })
        .await;
    }
    assert!(cluster.node(1).consensus.joined().contains(&3));
    for shard in 0..SHARDS {
        wait_until("node 3 has the log", || {
            commands(cluster.node(3), shard).len() >= expected[shard as usize].len()
        })
        .await;
        assert_eq!(commands(cluster.node(3), shard), expected[shard as usize]);
    }

    // Node 3 votes: with node 1 down, nodes 2 and 3 still commit.
    cluster.stop_node(1).await;
    for shard in 0..SHARDS {
        propose(&cluster, shard, b"committed by 2 and 3".to_vec()).await;
    }

    // Recorded as joined again: a second wipe is refused.
    let dir = cluster.stop_node(3).await;
    std::fs::remove_dir_all(&dir).unwrap();
    cluster.start_node(1).await;
    cluster.start_node(3).await;
    let refused = tokio::time::timeout(Duration::from_secs(15), cluster.node(3).consensus.formed())
        .await
        .expect("decided");
    assert!(refused.expect_err("wiped again").contains("forget-node"));
    cluster.stop_node(3).await;
    for node in cluster.nodes.values() {
        node.consensus.shutdown().await;
    }
}

/// A small seeded generator for fault schedules (xorshift64*).
struct Schedule(u64);

impl Schedule {
    fn next(&mut self, below: u64) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_F491_4F6C_DD1D) % below
    }
}

/// One fault of a schedule. At most one node is faulty at a time (a majority stays up).
#[derive(Debug, Clone, Copy)]
enum Fault {
    Isolate(u64),
    Stop(u64),
    None,
}

/// Proposes at whichever running, connected node believes it leads; `None` if no proposal was
/// acknowledged within the bound (its outcome is unknown).
async fn propose_once(cluster: &Cluster, faulty: Fault, shard: u16, command: Vec<u8>) -> Option<u64> {
    let candidates: Vec<&Node> = cluster
        .nodes
        .values()
        .filter(|node| node.consensus.is_leader(shard))
        .collect();
    // An isolated leader is asked too: it must not acknowledge.
    let node = candidates.first()?;
    match tokio::time::timeout(Duration::from_millis(1500), node.consensus.propose(shard, command)).await {
        Ok(Ok(index)) => {
            assert!(
                !matches!(faulty, Fault::Isolate(id) if id == node.id),
                "node {} acknowledged index {index} while cut off from the majority",
                node.id
            );
            Some(index)
        }
        _ => None,
    }
}

/// A seeded random fault schedule over the real consensus module (real sockets, WALs and time,
/// so not a deterministic simulation): each step cuts a node off, stops it or heals the cluster,
/// then proposes for a while. Afterwards every node applied the same sequence, every
/// acknowledged proposal sits in it at the index it was acknowledged at, and nothing appears
/// twice. The seed is printed; `FLEETLM_FAULT_SEEDS=1,2,3` replays given ones.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn random_fault_schedules_lose_no_acknowledged_entry() {
    let seeds: Vec<u64> = match std::env::var("FLEETLM_FAULT_SEEDS") {
        Ok(list) => list
            .split(',')
            .map(|s| s.trim().parse().expect("a numeric seed"))
            .collect(),
        Err(_) => {
            let now = std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .unwrap()
                .as_nanos() as u64;
            vec![now | 1, now.rotate_left(17) | 1]
        }
    };
    for seed in seeds {
        eprintln!("fault schedule seed {seed} (replay: FLEETLM_FAULT_SEEDS={seed})");
        run_fault_schedule(seed, 8).await;
    }
}

/// No two running nodes hold leases on a shard that overlap in time: of two leases of
/// different terms, the older one ends before the newer one began (a lease runs for
/// `fast_timing().lease()` from the quorum's acknowledgement it rests on).
fn assert_leases_never_overlap(cluster: &Cluster, seed: u64, step: usize) {
    let length = fast_timing().lease();
    for shard in 0..SHARDS {
        let mut held: Vec<(u64, Lease)> = cluster
            .nodes
            .values()
            .filter_map(|node| Some((node.id, node.consensus.lease(shard)?)))
            .collect();
        held.sort_by_key(|(_, lease)| lease.term);
        for pair in held.windows(2) {
            let ((older_node, older), (newer_node, newer)) = (pair[0], pair[1]);
            assert!(
                older.term != newer.term,
                "seed {seed} step {step}: nodes {older_node} and {newer_node} both hold a lease on shard {shard} in term {}",
                older.term
            );
            assert!(
                older.until <= newer.until - length,
                "seed {seed} step {step}: node {older_node}'s lease on shard {shard} (term {}) overlaps node {newer_node}'s (term {})",
                older.term,
                newer.term
            );
        }
    }
}

async fn run_fault_schedule(seed: u64, steps: usize) {
    let mut schedule = Schedule(seed);
    let mut cluster = Cluster::start(&[1, 2, 3]).await;
    let mut faulty = Fault::None;
    let mut acked: Vec<(u16, u64, Vec<u8>)> = Vec::new();
    let mut sent = 0usize;
    for step in 0..steps {
        // Undo the current fault, then maybe start another.
        match faulty {
            Fault::Isolate(id) => cluster.isolate(id, false),
            Fault::Stop(id) => cluster.start_node(id).await,
            Fault::None => {}
        }
        let victim = 1 + schedule.next(3);
        faulty = match schedule.next(3) {
            0 => {
                cluster.isolate(victim, true);
                Fault::Isolate(victim)
            }
            1 => {
                cluster.stop_node(victim).await;
                Fault::Stop(victim)
            }
            _ => Fault::None,
        };
        eprintln!("seed {seed} step {step}: {faulty:?}");
        let until = tokio::time::Instant::now() + Duration::from_millis(300 + schedule.next(700));
        while tokio::time::Instant::now() < until {
            let shard = schedule.next(SHARDS as u64) as u16;
            let command = format!("seed-{seed}-{sent}").into_bytes();
            sent += 1;
            match propose_once(&cluster, faulty, shard, command.clone()).await {
                Some(index) => acked.push((shard, index, command)),
                None => tokio::time::sleep(Duration::from_millis(20)).await,
            }
            assert_leases_never_overlap(&cluster, seed, step);
        }
        if let Fault::Isolate(victim) = faulty {
            // Cut off for longer than a lease lasts: whatever it led, its lease has expired.
            for shard in 0..SHARDS {
                assert!(
                    cluster.node(victim).consensus.lease(shard).is_none(),
                    "seed {seed} step {step}: node {victim}, cut off for over a lease, still holds one on shard {shard}"
                );
            }
        }
    }
    match faulty {
        Fault::Isolate(id) => cluster.isolate(id, false),
        Fault::Stop(id) => cluster.start_node(id).await,
        Fault::None => {}
    }
    // Healed: a last entry per shard, then every node must have applied it.
    let mut last = Vec::new();
    for shard in 0..SHARDS {
        last.push(propose(&cluster, shard, format!("seed-{seed}-last-{shard}").into_bytes()).await);
    }
    for shard in 0..SHARDS {
        for id in [1, 2, 3] {
            wait_until("every node applied the last entry", || {
                commands(cluster.node(id), shard)
                    .last()
                    .is_some_and(|(index, _)| *index >= last[shard as usize])
            })
            .await;
        }
        let reference = commands(cluster.node(1), shard);
        for id in [2, 3] {
            assert_eq!(
                commands(cluster.node(id), shard),
                reference,
                "seed {seed}: nodes 1 and {id} applied different sequences of shard {shard}"
            );
            assert_applied_in_order(cluster.node(id), shard);
        }
        let mut seen = std::collections::HashSet::new();
        for (_, command) in &reference {
            assert!(
                seen.insert(command.clone()),
                "seed {seed}: {:?} applied twice in shard {shard}",
                String::from_utf8_lossy(command)
            );
        }
        for (_, index, command) in acked.iter().filter(|(s, _, _)| *s == shard) {
            assert!(
                reference.iter().any(|(i, c)| i == index && c == command),
                "seed {seed}: {:?}, acknowledged at index {index} of shard {shard}, is not there",
                String::from_utf8_lossy(command)
            );
        }
    }
    eprintln!(
        "seed {seed}: {} of {sent} proposals acknowledged, all present once on every node",
        acked.len()
    );
    assert!(
        !acked.is_empty(),
        "seed {seed}: nothing was acknowledged; the schedule checked nothing"
    );
    for node in cluster.nodes.values() {
        node.consensus.shutdown().await;
    }
}

#[test]
fn an_operators_log_filter_gets_the_engine_directives_unless_it_names_the_engine() {
    assert_eq!(with_log_directives("warn"), format!("warn,{LOG_DIRECTIVES}"));
    assert_eq!(with_log_directives("info,openraft=debug"), "info,openraft=debug");
}

/// What a node applied for a shard, by index. An index applied again (after its log was cut
/// back and refetched, the state machine rewinds to the durable log and applies it again) must
/// carry the same command.
fn applied_by_index(node: &Node, shard: u16) -> BTreeMap<u64, Vec<u8>> {
    let mut by_index = BTreeMap::new();
    for (index, command) in commands(node, shard) {
        if let Some(before) = by_index.insert(index, command.clone()) {
            assert_eq!(
                before, command,
                "node {} applied index {index} twice, differently",
                node.id
            );
        }
    }
    by_index
}

/// Every entry of the shard's log on this node, read back from its WAL: whether all can be.
fn whole_log_reads(node: &Node, shard: u16) -> Result<usize, String> {
    let first = node.wal.first_index(shard).unwrap_or(1);
    let mut from = first;
    let mut read = 0;
    loop {
        let range = crate::wal::EntryRange {
            shard,
            from_index: from,
            max_entries: 1024,
        };
        let result = node.wal.read_ranges_each(&[range]).pop().unwrap_or_default();
        if let Some(failure) = result.failure {
            return Err(format!("entry {} cannot be read: {}", failure.index, failure.error));
        }
        let Some((last, _)) = result.entries.last() else {
            return Ok(read);
        };
        read += result.entries.len();
        from = last.index + 1;
    }
}

/// A leader's log found damaged while it runs (bit rot in an entry a lagging follower still
/// needs): its group stops on the read, and instead of restarting into the same error it
/// cuts its log back before the damage and refetches it from the other members, without a
/// restart of the node. Nothing acknowledged is lost, every member ends with the same history,
/// the damaged member's log reads back whole, and it opens cleanly after a restart (the damage
/// is still on its disk: the loss recorded for it lets the open read past it).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_log_found_damaged_while_running_is_cut_back_and_refetched_from_the_peers() {
    use crate::wal::fault::SimFs;
    let ids = [1u64, 2, 3];
    let filesystems: BTreeMap<u64, SimFs> = ids.iter().map(|id| (*id, SimFs::new())).collect();
    let mut cluster = Cluster::start_with(&ids, filesystems.clone()).await;
    let shard = 1;
    let leader = cluster.leader(shard).await;
    let lagging = *ids.iter().find(|id| **id != leader).unwrap();
    let intact = *ids.iter().find(|id| **id != leader && **id != lagging).unwrap();
    // The leader must be the member that reads the damaged entries back, for the member that
    // lags: the others stand down from elections until the refetch begins (an election on a
    // loaded machine would otherwise move the leadership to the intact member, which would serve
    // the lagging one from its own log). They still vote.
    for id in [lagging, intact] {
        cluster.node(id).consensus.groups.stand_down(shard, true);
    }
    let mut expected = BTreeMap::new();
    for i in 0..20 {
        expected.insert(propose(&cluster, shard, payload(i)).await, payload(i));
    }
    wait_until("the lagging member applied the first entries", || {
        applied_by_index(cluster.node(lagging), shard).len() == expected.len()
    })
    .await;
    // Stopped, not cut off: a leader's replication to a member behind a cut link may read its
    // entries from memory and hold them queued for the link; to a stopped one it fails at once
    // and reads them again at each retry.
    cluster.stop_node(lagging).await;
    // More than the log store keeps in memory (`TAIL_KEEP_ENTRIES`): the leader must read the
    // lagging member's entries back from its WAL.
    for i in 20..320 {
        expected.insert(propose(&cluster, shard, payload(i)).await, payload(i));
    }
    assert_eq!(cluster.leader(shard).await, leader, "only the leader stands");
    let damaged_index = *expected.keys().nth(40).unwrap();
    let (_, path, offset, len) = cluster
        .node(leader)
        .wal
        .entry_location(shard, damaged_index)
        .expect("the entry is in the leader's WAL");
    // Bit rot in the entry's body: it fails its checksum when read back.
    filesystems[&leader].flip_bit(&path, offset as usize + len as usize - 1, 3);
    assert!(
        whole_log_reads(cluster.node(leader), shard).is_err(),
        "the damage is in place"
    );
    // openraft may still hold entries it read for the stopped member before the damage (it
    // retries a send with them): restarted, the group reads them again, from the damaged log.
    // (Read while the member is still down, the damage is found when too few others can vote:
    // the refetch is then postponed and tried again later, which this test goes through too.)
    let groups = &cluster.node(leader).consensus.groups;
    groups.restart(shard, *groups.generation(shard).borrow());

    // The first attempt to record the refetch fails (a file stands where the records'
    // directory goes): the member stays out of the votes, and tries again later by itself.
    let records = cluster.node(leader).dir.join("refetch");
    let _ = std::fs::remove_dir(&records);
    std::fs::write(&records, b"in the way").unwrap();

    // Back, the lagging member behind the damage cannot be elected (its log is behind), and
    // stands down anyway until it catches up.
    cluster.start_node(lagging).await;
    cluster.node(lagging).consensus.groups.stand_down(shard, true);
    let marker = cluster
        .node(leader)
        .dir
        .join("refetch")
        .join(format!("{shard:05}.json"));
    // The shard keeps taking writes, slowly (a write also wakes the replication to the member
    // back; many would let the leader's log move past a snapshot point, and the member would be
    // sent a snapshot instead of the damaged entries), until the leader stops on the read.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(40);
    let mut i = 320;
    let mut blocked = false;
    while !marker.exists() {
        assert!(
            tokio::time::Instant::now() < deadline,
            "the damaged member never began refetching (a first attempt failed: {blocked})"
        );
        if records.is_file() && cluster.node(leader).consensus.groups.refetching(shard) {
            // Out of the votes, so past the guard: its attempt fails at once on the records
            // (the retry is 5 s away).
            tokio::time::sleep(Duration::from_secs(1)).await;
            assert!(!marker.exists());
            assert!(cluster.node(leader).consensus.groups.postponed_refetches(shard) >= 1);
            std::fs::remove_file(&records).unwrap();
            blocked = true;
        }
        // Refused while the damaged member's group restarts (an outcome not known may still
        // be committed: only acknowledged writes are expected).
        if let Ok(index) = cluster.node(leader).consensus.propose(shard, payload(i)).await {
            expected.insert(index, payload(i));
        }
        i += 1;
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(blocked, "the first attempt failed");
    // The damaged member neither votes nor stands while it refetches: the others lead now.
    for id in [lagging, intact] {
        cluster.node(id).consensus.groups.stand_down(shard, false);
    }
    for i in i..i + 20 {
        expected.insert(propose_through_failures(&cluster, shard, payload(i)).await, payload(i));
    }
    wait_until("the refetch ended", || !marker.exists()).await;
    let read = whole_log_reads(cluster.node(leader), shard).expect("the refetched log reads back whole");
    assert!(read >= 300, "the log holds what was refetched ({read} entries)");
    for id in ids {
        wait_until("every member applied everything", || {
            applied_by_index(cluster.node(id), shard).len() >= expected.len()
        })
        .await;
        let applied = applied_by_index(cluster.node(id), shard);
        for (index, command) in &expected {
            assert_eq!(applied.get(index), Some(command), "node {id} index {index}");
        }
    }

    // Restarted, the member opens its log cleanly (no second refetch) and takes part as before.
    cluster.stop_node(leader).await;
    cluster.start_node(leader).await;
    let last = propose_through_failures(&cluster, shard, b"after the restart".to_vec()).await;
    wait_until("the restarted member applied the newest entry", || {
        applied_by_index(cluster.node(leader), shard).contains_key(&last)
    })
    .await;
    assert!(!marker.exists(), "a restart found no damage left to refetch");
    whole_log_reads(cluster.node(leader), shard).expect("the log still reads back whole");
    for id in ids {
        cluster.stop_node(id).await;
    }
}
