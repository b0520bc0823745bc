//! Cluster test harness: n real `fleetlm serve` processes sharing one Postgres database, every
//! peer link (a→b) through a userspace proxy that can black-hole it, process faults (kill -9,
//! SIGTERM, SIGSTOP/SIGCONT, a wiped data directory), a load driver (REST writers retrying with
//! the same `client_id`, WebSocket clients recording every push) and one history checker.
//!
//! The same harness runs a single node without cluster flags (`Cluster::start_single`), so the
//! load driver and checker can be exercised where cluster mode is not available.

use std::collections::{BTreeMap, BTreeSet};
use std::io::BufRead;
use std::path::Path;
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use rand::Rng;
use serde_json::{Value, json};

use super::{TestDatabase, binary};

// ---------------------------------------------------------------------------------------------
// Processes and links
// ---------------------------------------------------------------------------------------------

#[derive(Clone, Debug)]
pub struct ClusterOptions {
    pub shards: u16,
    pub election_timeout_ms: u64,
    /// `--flag value` pairs given to every node after the defaults (a flag given here replaces
    /// the default).
    pub extra: Vec<String>,
    /// Node ids in the order they are started (default 1..=n).
    pub start_order: Option<Vec<usize>>,
    /// Pause between two starts.
    pub start_gap: Duration,
    /// How long `wait_ready` waits.
    pub ready_timeout: Duration,
    /// Per node: `--flag value` pairs given after `extra` (they replace both).
    pub node_extra: BTreeMap<usize, Vec<String>>,
    /// Per node: environment variables its process gets (e.g. `HTTP_PROXY`, so that each node
    /// reaches the agent through its own address and the agent can tell callers apart).
    pub node_env: BTreeMap<usize, Vec<(String, String)>>,
    /// Per node: its data directory is a tmpfs of this many bytes (mounted at start, unmounted
    /// at drop; needs root), so a test can fill that node's disk alone.
    pub tmpfs_data: BTreeMap<usize, u64>,
}

impl Default for ClusterOptions {
    fn default() -> Self {
        ClusterOptions {
            shards: 4,
            election_timeout_ms: 300,
            extra: Vec::new(),
            start_order: None,
            start_gap: Duration::ZERO,
            ready_timeout: Duration::from_secs(45),
            node_extra: BTreeMap::new(),
            node_env: BTreeMap::new(),
            tmpfs_data: BTreeMap::new(),
        }
    }
}

/// One member: its fixed ports, its data directory (kept across restarts) and its process.
pub struct Node {
    pub id: usize,
    pub http_port: u16,
    pub peer_port: u16,
    pub data_dir: tempfile::TempDir,
    child: Option<Child>,
    stopped: bool,
    /// Every stderr (and stdout after the first) line of every run of this node.
    pub log: Arc<Mutex<Vec<String>>>,
    runs: usize,
    /// The data directory is a tmpfs mounted by the test (`ClusterOptions::tmpfs_data`).
    mounted: bool,
}

impl Node {
    pub fn base(&self) -> String {
        format!("http://127.0.0.1:{}", self.http_port)
    }
    pub fn pid(&self) -> Option<i32> {
        self.child.as_ref().map(|c| c.id() as i32)
    }
}

/// A peer link a→b: a listener that forwards to b's peer listener, and can be cut (every
/// connection dropped; new ones accepted and held silent, a black hole) and restored.
pub struct LinkProxy {
    pub port: u16,
    state: Arc<Mutex<LinkState>>,
}

#[derive(Default)]
struct LinkState {
    up: bool,
    connections: Vec<tokio::task::AbortHandle>,
    held: Vec<tokio::net::TcpStream>,
}

impl LinkProxy {
    /// Binds now (so the port is held) and serves on `runtime`.
    fn start(runtime: &tokio::runtime::Runtime, target_port: u16) -> LinkProxy {
        Self::start_to(runtime, "127.0.0.1".to_string(), target_port)
    }

    /// A proxy to `host:port`.
    fn start_to(runtime: &tokio::runtime::Runtime, target_host: String, target_port: u16) -> LinkProxy {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind link proxy");
        listener.set_nonblocking(true).unwrap();
        let port = listener.local_addr().unwrap().port();
        let state = Arc::new(Mutex::new(LinkState {
            up: true,
            ..LinkState::default()
        }));
        let accept_state = state.clone();
        runtime.spawn(async move {
            let listener = tokio::net::TcpListener::from_std(listener).expect("link proxy listener");
            loop {
                let Ok((mut inbound, _)) = listener.accept().await else {
                    return;
                };
                let _ = inbound.set_nodelay(true);
                let mut state = accept_state.lock().unwrap();
                state.connections.retain(|c| !c.is_finished());
                if !state.up {
                    state.held.push(inbound);
                    continue;
                }
                let target_host = target_host.clone();
                let task = tokio::spawn(async move {
                    if let Ok(mut outbound) = tokio::net::TcpStream::connect((target_host.as_str(), target_port)).await
                    {
                        let _ = outbound.set_nodelay(true);
                        let _ = tokio::io::copy_bidirectional(&mut inbound, &mut outbound).await;
                    }
                });
                state.connections.push(task.abort_handle());
            }
        });
        LinkProxy { port, state }
    }

    pub fn cut(&self) {
        let mut state = self.state.lock().unwrap();
        state.up = false;
        for connection in state.connections.drain(..) {
            connection.abort();
        }
    }

    pub fn restore(&self) {
        let mut state = self.state.lock().unwrap();
        state.up = true;
        state.held.clear();
    }
}

/// The host and port of a Postgres URL, and a function giving the same URL at another port of
/// 127.0.0.1 (a proxy's).
fn database_authority(url: &str) -> (String, u16, impl Fn(u16) -> String) {
    let (scheme, rest) = url.split_once("://").expect("a database URL with a scheme");
    let (authority, path) = rest.split_at(rest.find(['/', '?']).unwrap_or(rest.len()));
    let (user, hostport) = match authority.rsplit_once('@') {
        Some((user, hostport)) => (format!("{user}@"), hostport),
        None => (String::new(), authority),
    };
    let (host, port) = match hostport.rsplit_once(':') {
        Some((host, port)) => (host.to_string(), port.parse().expect("a numeric port")),
        None => (hostport.to_string(), 5432),
    };
    let (scheme, path) = (scheme.to_string(), path.to_string());
    (host, port, move |proxy: u16| {
        format!("{scheme}://{user}127.0.0.1:{proxy}{path}")
    })
}

/// A port free now, for a listener that must keep its port across restarts (so it cannot be
/// held). Taken below the kernel's ephemeral range (32768 and up by default): an outgoing
/// connection of any process can take a freed ephemeral port before the node binds it, which
/// made a node fail to start now and then ("Address already in use").
pub fn free_port() -> u16 {
    use std::hash::{BuildHasher, Hasher};
    // Never the same port twice in this process: two nodes of one cluster (or of two clusters
    // run one after another) must not be given the same free port.
    static GIVEN: Mutex<BTreeSet<u16>> = Mutex::new(BTreeSet::new());
    for _ in 0..1000 {
        let mut hasher = std::collections::hash_map::RandomState::new().build_hasher();
        hasher.write_u128(
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .unwrap()
                .as_nanos(),
        );
        let port = 20_000 + (hasher.finish() % 12_000) as u16;
        if !GIVEN.lock().unwrap().contains(&port) && std::net::TcpListener::bind(("127.0.0.1", port)).is_ok() {
            GIVEN.lock().unwrap().insert(port);
            return port;
        }
    }
    panic!("no free port between 20000 and 32000");
}

/// How a start attempt ended.
pub enum Started {
    /// The listening line was printed.
    Listening,
    /// The process exited first.
    Exited(ExitStatus),
}

/// n `fleetlm serve` processes (or one single node), their links and their shared database.
pub struct Cluster {
    pub options: ClusterOptions,
    pub nodes: Vec<Node>,
    pub database: TestDatabase,
    /// False for `start_single`: one node without cluster flags.
    pub clustered: bool,
    pub secret: String,
    links: BTreeMap<(usize, usize), LinkProxy>,
    /// Per node: the proxy through which it reaches the archive (Postgres), and the URL naming it.
    archive_links: BTreeMap<usize, (LinkProxy, String)>,
    partitioned: BTreeSet<usize>,
    runtime: Option<tokio::runtime::Runtime>,
    pub client: reqwest::Client,
}

fn short_client(timeout: Duration) -> reqwest::Client {
    reqwest::Client::builder()
        .timeout(timeout)
        .connect_timeout(Duration::from_secs(1))
        .build()
        .unwrap()
}

impl Cluster {
    /// Starts `n` nodes (3 or 5) in cluster mode and waits until every one is ready.
    pub async fn start(n: usize, options: ClusterOptions) -> Cluster {
        let mut cluster = Self::start_unready(n, options);
        cluster.wait_all_ready().await;
        cluster
    }

    /// Starts `n` nodes in cluster mode (in `options.start_order`) without waiting for them.
    pub fn start_unready(n: usize, options: ClusterOptions) -> Cluster {
        let mut cluster = Self::prepare(n, options, true);
        let order = cluster.options.start_order.clone().unwrap_or_else(|| (1..=n).collect());
        for (k, id) in order.into_iter().enumerate() {
            if k > 0 && !cluster.options.start_gap.is_zero() {
                std::thread::sleep(cluster.options.start_gap);
            }
            cluster.restart(id);
        }
        cluster
    }

    /// One node without cluster flags (archive: the test Postgres), ready.
    pub async fn start_single(options: ClusterOptions) -> Cluster {
        let mut cluster = Self::prepare(1, options, false);
        cluster.restart(1);
        cluster.wait_all_ready().await;
        cluster
    }

    fn prepare(n: usize, options: ClusterOptions, clustered: bool) -> Cluster {
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .thread_name("link-proxies")
            .enable_all()
            .build()
            .unwrap();
        let nodes: Vec<Node> = (1..=n)
            .map(|id| Node {
                id,
                http_port: free_port(),
                peer_port: free_port(),
                data_dir: tempfile::tempdir().expect("tempdir"),
                child: None,
                stopped: false,
                log: Arc::default(),
                runs: 0,
                mounted: false,
            })
            .collect();
        let mut nodes = nodes;
        for (id, bytes) in &options.tmpfs_data {
            let node = &mut nodes[id - 1];
            mount_tmpfs(node.data_dir.path(), *bytes);
            node.mounted = true;
        }
        let database = TestDatabase::create();
        let mut links = BTreeMap::new();
        let mut archive_links = BTreeMap::new();
        if clustered {
            let (host, port, rewrite) = database_authority(&database.url);
            for id in 1..=n {
                let proxy = LinkProxy::start_to(&runtime, host.clone(), port);
                let url = rewrite(proxy.port);
                archive_links.insert(id, (proxy, url));
            }
            for a in 1..=n {
                for b in 1..=n {
                    if a != b {
                        let target = nodes[b - 1].peer_port;
                        links.insert((a, b), LinkProxy::start(&runtime, target));
                    }
                }
            }
        }
        Cluster {
            options,
            nodes,
            database,
            clustered,
            secret: format!("cluster-secret-{}", uuid::Uuid::now_v7().simple()),
            links,
            archive_links,
            partitioned: BTreeSet::new(),
            runtime: Some(runtime),
            client: short_client(Duration::from_secs(3)),
        }
    }

    pub fn size(&self) -> usize {
        self.nodes.len()
    }

    pub fn ids(&self) -> Vec<usize> {
        (1..=self.nodes.len()).collect()
    }

    fn node_ref(&self, id: usize) -> &Node {
        assert!(id >= 1 && id <= self.nodes.len(), "no node {id}");
        &self.nodes[id - 1]
    }

    fn node_mut(&mut self, id: usize) -> &mut Node {
        assert!(id >= 1 && id <= self.nodes.len(), "no node {id}");
        &mut self.nodes[id - 1]
    }

    /// Base URL of node `id` (fixed across restarts).
    pub fn node(&self, id: usize) -> String {
        self.node_ref(id).base()
    }

    pub fn bases(&self) -> Vec<String> {
        self.nodes.iter().map(Node::base).collect()
    }

    pub fn data_dir(&self, id: usize) -> &Path {
        self.node_ref(id).data_dir.path()
    }

    /// The `fleetlm serve` arguments node `id` is started with (for a test that runs it by hand).
    pub fn serve_arguments(&self, id: usize) -> Vec<String> {
        self.arguments(id)
    }

    /// The `fleetlm serve` arguments of node `id`.
    fn arguments(&self, id: usize) -> Vec<String> {
        let node = self.node_ref(id);
        let mut args: Vec<String> = vec![
            "serve".into(),
            "--data-dir".into(),
            node.data_dir.path().display().to_string(),
            "--database-url".into(),
            self.archive_links
                .get(&id)
                .map_or_else(|| self.database.url.clone(), |(_, url)| url.clone()),
        ];
        let mut flags: Vec<(String, String)> = vec![
            ("--http-addr".into(), format!("127.0.0.1:{}", node.http_port)),
            ("--shards".into(), self.options.shards.to_string()),
            ("--wal-lanes".into(), "2".into()),
            ("--wal-segment-bytes".into(), "1048576".into()),
            ("--max-message-bytes".into(), "65536".into()),
            ("--flush-interval-ms".into(), "50".into()),
        ];
        if self.clustered {
            let peers: Vec<String> = self
                .ids()
                .into_iter()
                .map(|other| {
                    let port = if other == id {
                        node.peer_port
                    } else {
                        self.links[&(id, other)].port
                    };
                    format!("{other}=127.0.0.1:{port}")
                })
                .collect();
            flags.extend([
                ("--node-id".into(), id.to_string()),
                ("--cluster-peers".into(), peers.join(",")),
                ("--cluster-secret".into(), self.secret.clone()),
                ("--peer-listen-addr".into(), format!("127.0.0.1:{}", node.peer_port)),
                (
                    "--election-timeout-ms".into(),
                    self.options.election_timeout_ms.to_string(),
                ),
                // Leadership stays where elections put it: many tests look a shard's leader up
                // and then act on that node. The tests of balancing, and those that run it
                // under faults, turn it on (`--leader-balance-secs 1`).
                ("--leader-balance-secs".into(), "0".into()),
            ]);
        }
        let node_extra = self.options.node_extra.get(&id).cloned().unwrap_or_default();
        let extra: Vec<String> = self
            .options
            .extra
            .chunks(2)
            .filter(|pair| !node_extra.contains(&pair[0]))
            .flatten()
            .cloned()
            .chain(node_extra.iter().cloned())
            .collect();
        for (flag, value) in flags {
            if !extra.contains(&flag) {
                args.push(flag);
                args.push(value);
            }
        }
        args.extend(extra);
        args
    }

    /// Cuts node `id`'s connections to the archive (held silent, as a network partition would)
    /// or restores them.
    pub fn cut_archive(&self, id: usize, cut: bool) {
        let (proxy, _) = &self.archive_links[&id];
        if cut { proxy.cut() } else { proxy.restore() }
    }

    /// Starts node `id` (same data directory, same ports) and waits for its listening line;
    /// panics if it exits first.
    pub fn restart(&mut self, id: usize) {
        match self.spawn(id) {
            Started::Listening => {}
            Started::Exited(status) => panic!(
                "node {id} exited with {status} before printing its listening line; its log:\n{}",
                self.log_tail(id, 40)
            ),
        }
    }

    /// Starts node `id` and waits (up to 20 s) for its listening line or its exit.
    pub fn spawn(&mut self, id: usize) -> Started {
        assert!(self.node_ref(id).child.is_none(), "node {id} is already running");
        let args = self.arguments(id);
        let env = self.options.node_env.get(&id).cloned().unwrap_or_default();
        let node = self.node_mut(id);
        node.runs += 1;
        let run = node.runs;
        let log = node.log.clone();
        log.lock()
            .unwrap()
            .push(format!("[node {id}] ---- start #{run}: fleetlm {}", args.join(" ")));
        let mut child = Command::new(binary())
            .args(&args)
            .env_remove("DATABASE_URL")
            // FLEETLM_TEST_NODE_LOG: the nodes' log filter when debugging a test (default warn).
            .env(
                "RUST_LOG",
                std::env::var("FLEETLM_TEST_NODE_LOG").unwrap_or_else(|_| "warn".into()),
            )
            .envs(env)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawn fleetlm");
        let stderr = child.stderr.take().unwrap();
        let stderr_log = log.clone();
        std::thread::spawn(move || {
            for line in std::io::BufReader::new(stderr).lines() {
                let Ok(line) = line else { return };
                // The sessions' agent is disabled on purpose: its failed dispatches are noise.
                // So is openraft's note that a client gave up waiting on a write's progress.
                if line.contains("error=agent_disabled") || line.contains("ProgressResponder.complete_tx.send") {
                    continue;
                }
                let line = format!("[node {id}] {line}");
                eprintln!("{line}");
                stderr_log.lock().unwrap().push(line);
            }
        });
        let stdout = child.stdout.take().unwrap();
        let (first_line, listening) = std::sync::mpsc::channel::<String>();
        let stdout_log = log.clone();
        std::thread::spawn(move || {
            let mut lines = std::io::BufReader::new(stdout).lines();
            if let Some(Ok(line)) = lines.next() {
                stdout_log.lock().unwrap().push(format!("[node {id}] {line}"));
                let _ = first_line.send(line);
            }
            for line in lines {
                let Ok(line) = line else { return };
                stdout_log.lock().unwrap().push(format!("[node {id}] {line}"));
            }
        });
        let deadline = Instant::now() + Duration::from_secs(20);
        let outcome = loop {
            match listening.recv_timeout(Duration::from_millis(50)) {
                Ok(line) => {
                    assert!(line.contains("http://"), "node {id}: unexpected first line {line:?}");
                    break Started::Listening;
                }
                Err(std::sync::mpsc::RecvTimeoutError::Timeout) => {}
                Err(std::sync::mpsc::RecvTimeoutError::Disconnected) => {}
            }
            if let Some(status) = child.try_wait().expect("try_wait") {
                // Give the log threads a moment to collect the last lines.
                std::thread::sleep(Duration::from_millis(100));
                break Started::Exited(status);
            }
            if Instant::now() >= deadline {
                // Not left running after the test (it holds no handle to it past here).
                let _ = child.kill();
                let _ = child.wait();
                panic!(
                    "node {id} printed no listening line within 20 s; its log:\n{}",
                    tail(&log, 40)
                );
            }
        };
        let node = self.node_mut(id);
        node.stopped = false;
        if matches!(outcome, Started::Listening) {
            node.child = Some(child);
        }
        outcome
    }

    pub fn is_running(&mut self, id: usize) -> bool {
        let node = self.node_mut(id);
        match node.child.as_mut() {
            None => false,
            Some(child) => child.try_wait().expect("try_wait").is_none(),
        }
    }

    /// The exit status of node `id` if its process has ended (and forgets the process).
    pub fn exited(&mut self, id: usize) -> Option<ExitStatus> {
        let node = self.node_mut(id);
        let status = node.child.as_mut()?.try_wait().expect("try_wait")?;
        node.child = None;
        Some(status)
    }

    pub fn kill9(&mut self, id: usize) {
        let node = self.node_mut(id);
        if let Some(mut child) = node.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
        node.stopped = false;
        node.log
            .lock()
            .unwrap()
            .push(format!("[node {id}] ---- killed with SIGKILL by the test"));
    }

    /// Sends SIGTERM and waits (up to 30 s) for the exit status.
    pub fn sigterm(&mut self, id: usize) -> ExitStatus {
        let pid = self
            .node_ref(id)
            .pid()
            .unwrap_or_else(|| panic!("node {id} is not running"));
        self.node_ref(id)
            .log
            .lock()
            .unwrap()
            .push(format!("[node {id}] ---- SIGTERM from the test"));
        unsafe { libc::kill(pid, libc::SIGTERM) };
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if let Some(status) = self.exited(id) {
                return status;
            }
            assert!(
                Instant::now() < deadline,
                "node {id} did not exit within 30 s of SIGTERM; its log:\n{}",
                self.log_tail(id, 40)
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    pub fn sigstop(&mut self, id: usize) {
        let pid = self
            .node_ref(id)
            .pid()
            .unwrap_or_else(|| panic!("node {id} is not running"));
        unsafe { libc::kill(pid, libc::SIGSTOP) };
        self.node_mut(id).stopped = true;
    }

    pub fn sigcont(&mut self, id: usize) {
        let pid = self
            .node_ref(id)
            .pid()
            .unwrap_or_else(|| panic!("node {id} is not running"));
        unsafe { libc::kill(pid, libc::SIGCONT) };
        self.node_mut(id).stopped = false;
    }

    /// Deletes everything in node `id`'s data directory (the node must be down).
    pub fn wipe(&mut self, id: usize) {
        assert!(self.node_ref(id).child.is_none(), "wipe node {id}: it is still running");
        let dir = self.node_ref(id).data_dir.path().to_path_buf();
        for entry in std::fs::read_dir(&dir).expect("read data dir") {
            let path = entry.unwrap().path();
            if path.is_dir() {
                std::fs::remove_dir_all(&path).expect("remove dir");
            } else {
                std::fs::remove_file(&path).expect("remove file");
            }
        }
    }

    /// Cuts node `id` off: every link to and from it is black-holed.
    pub fn partition(&mut self, id: usize) {
        for other in self.ids() {
            if other != id {
                self.links[&(id, other)].cut();
                self.links[&(other, id)].cut();
            }
        }
        self.partitioned.insert(id);
    }

    pub fn heal(&mut self, id: usize) {
        for other in self.ids() {
            if other != id {
                self.links[&(id, other)].restore();
                self.links[&(other, id)].restore();
            }
        }
        self.partitioned.remove(&id);
    }

    /// Node `id`'s `/api/admin/cluster` answer, if it gives one within 5 s (it asks its peers
    /// for their views, waiting up to 2 s for one that is down).
    pub async fn status(&self, id: usize) -> Option<Value> {
        let response = self
            .client
            .get(format!("{}/api/admin/cluster", self.node(id)))
            .timeout(Duration::from_secs(5))
            .send()
            .await
            .ok()?;
        if response.status() != 200 {
            return None;
        }
        response.json().await.ok()
    }

    /// The node a majority of the members reports as the leader of `shard` (in the same term),
    /// waiting up to 20 s for one.
    pub async fn leader_of(&self, shard: u16) -> usize {
        let deadline = Instant::now() + Duration::from_secs(20);
        let majority = self.size() / 2 + 1;
        loop {
            let mut votes: BTreeMap<(u64, u64), usize> = BTreeMap::new();
            let mut seen = Vec::new();
            for id in self.ids() {
                if self.node_ref(id).stopped || self.node_ref(id).child.is_none() {
                    continue;
                }
                let Some(status) = self.status(id).await else {
                    seen.push(format!("node {id}: no answer"));
                    continue;
                };
                let entry = status["shards"]
                    .as_array()
                    .and_then(|shards| shards.iter().find(|s| s["shard"].as_u64() == Some(u64::from(shard))))
                    .cloned()
                    .unwrap_or(Value::Null);
                seen.push(format!("node {id}: {entry}"));
                if let (Some(leader), Some(term)) = (entry["leader"].as_u64(), entry["term"].as_u64()) {
                    *votes.entry((leader, term)).or_default() += 1;
                }
            }
            if let Some(((leader, _), _)) = votes.iter().find(|(_, count)| **count >= majority) {
                return *leader as usize;
            }
            assert!(
                Instant::now() < deadline,
                "no leader of shard {shard} agreed by a majority within 20 s: {}",
                seen.join("; ")
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// The agreed leader of every shard.
    pub async fn leaders(&self) -> Vec<usize> {
        let mut leaders = Vec::new();
        for shard in 0..self.options.shards {
            leaders.push(self.leader_of(shard).await);
        }
        leaders
    }

    /// Waits until node `id` answers `/health/ready` with 200 (panics after `ready_timeout`).
    pub async fn wait_ready(&mut self, id: usize) {
        let timeout = self.options.ready_timeout;
        let deadline = Instant::now() + timeout;
        let mut last = String::from("no answer");
        loop {
            if let Ok(response) = self
                .client
                .get(format!("{}/health/ready", self.node(id)))
                .timeout(Duration::from_secs(2))
                .send()
                .await
            {
                let status = response.status().as_u16();
                let body = response.text().await.unwrap_or_default();
                if status == 200 {
                    return;
                }
                last = format!("{status} {body}");
            }
            if let Some(status) = self.exited(id) {
                panic!(
                    "node {id} exited with {status} while the test waited for it to be ready; its log:\n{}",
                    self.log_tail(id, 40)
                );
            }
            if Instant::now() >= deadline {
                let cluster = self.status(id).await.map(|v| v.to_string()).unwrap_or_default();
                panic!(
                    "node {id} not ready within {timeout:?}; last /health/ready answer: {last}; /api/admin/cluster: {cluster}; its log:\n{}",
                    self.log_tail(id, 40)
                );
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// Is node `id` ready right now?
    pub async fn is_ready(&self, id: usize) -> bool {
        matches!(
            self.client
                .get(format!("{}/health/ready", self.node(id)))
                .timeout(Duration::from_secs(2))
                .send()
                .await,
            Ok(response) if response.status() == 200
        )
    }

    pub async fn wait_all_ready(&mut self) {
        for id in self.ids() {
            self.wait_ready(id).await;
        }
    }

    /// The last `lines` lines node `id` logged.
    pub fn log_tail(&self, id: usize, lines: usize) -> String {
        tail(&self.node_ref(id).log, lines)
    }

    /// Every logged line of node `id` containing `needle` (case-insensitive).
    pub fn log_lines_matching(&self, id: usize, needle: &str) -> Vec<String> {
        let needle = needle.to_lowercase();
        self.node_ref(id)
            .log
            .lock()
            .unwrap()
            .iter()
            .filter(|line| line.to_lowercase().contains(&needle))
            .cloned()
            .collect()
    }

    /// Every node's last lines, for a failure message.
    pub fn all_logs_tail(&self, lines: usize) -> String {
        self.ids()
            .into_iter()
            .map(|id| self.log_tail(id, lines))
            .collect::<Vec<_>>()
            .join("\n")
    }
}

fn tail(log: &Mutex<Vec<String>>, lines: usize) -> String {
    let log = log.lock().unwrap();
    let start = log.len().saturating_sub(lines);
    log[start..].join("\n")
}

impl Drop for Cluster {
    fn drop(&mut self) {
        for node in &mut self.nodes {
            if let Some(mut child) = node.child.take() {
                let _ = child.kill();
                let _ = child.wait();
            }
            if node.mounted {
                let _ = std::process::Command::new("umount")
                    .arg("--lazy")
                    .arg(node.data_dir.path())
                    .status();
            }
        }
        if let Some(runtime) = self.runtime.take() {
            runtime.shutdown_background();
        }
    }
}

/// Mounts a tmpfs of `bytes` at `path` (an empty directory). Fails the test loudly when the
/// mount is refused (the test needs root, as on the machines this suite runs on).
fn mount_tmpfs(path: &Path, bytes: u64) {
    let status = std::process::Command::new("mount")
        .args(["-t", "tmpfs", "-o", &format!("size={bytes}"), "tmpfs"])
        .arg(path)
        .status()
        .expect("run mount");
    assert!(
        status.success(),
        "cannot mount a tmpfs at {} ({status}): this test needs root to give one node a disk of its own",
        path.display()
    );
}

/// Session ids spread over the shards: `per_shard` sessions on each of `shards` shards.
pub fn spread_sessions(prefix: &str, shards: u16, per_shard: usize) -> Vec<String> {
    let mut by_shard: BTreeMap<u16, Vec<String>> = BTreeMap::new();
    let mut n = 0;
    while by_shard.len() < shards as usize || by_shard.values().any(|s| s.len() < per_shard) {
        let id = format!("{prefix}-{n}");
        n += 1;
        let list = by_shard
            .entry(fleetlm::ids::shard_for_session(&id, shards))
            .or_default();
        if list.len() < per_shard {
            list.push(id);
        }
    }
    by_shard.into_values().flatten().collect()
}

/// Creates agent `a` and the sessions (user `u`) through `base`, then disables the agent (so
/// user messages schedule no webhook calls: a dispatch ends at once as failed), retrying 503s.
pub async fn create_sessions(base: &str, sessions: &[String]) {
    let client = short_client(Duration::from_secs(5));
    let agent = json!({"agent": {"id": "a", "name": "A", "origin_url": "http://127.0.0.1:9"}});
    let reply = retry_503(&client, "POST", &format!("{base}/api/agents"), Some(agent)).await;
    assert!(
        reply.0 == 201 || reply.0 == 422,
        "agent create: {} {}",
        reply.0,
        reply.1
    );
    for id in sessions {
        let body = json!({"user_id": "u", "agent_id": "a", "id": id});
        let reply = retry_503(&client, "POST", &format!("{base}/api/sessions"), Some(body)).await;
        assert!(
            reply.0 == 201 || (reply.0 == 409 && reply.1["code"] == "session_exists"),
            "session {id} create: {} {}",
            reply.0,
            reply.1
        );
    }
    let reply = retry_503(&client, "DELETE", &format!("{base}/api/agents/a"), None).await;
    assert_eq!(reply.0, 200, "agent disable: {}", reply.1);
}

/// A call retried (up to 20 s) on 503 and on transport errors.
pub async fn retry_503(client: &reqwest::Client, method: &str, url: &str, body: Option<Value>) -> (u16, Value) {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let method = reqwest::Method::from_bytes(method.as_bytes()).unwrap();
        let mut request = client.request(method.clone(), url);
        if let Some(body) = &body {
            request = request.json(body);
        }
        let last = match request.send().await {
            Ok(response) => {
                let status = response.status().as_u16();
                let text = response.text().await.unwrap_or_default();
                let value = serde_json::from_str(&text).unwrap_or(Value::String(text));
                if status != 503 {
                    return (status, value);
                }
                format!("503 {value}")
            }
            Err(error) => format!("{error}"),
        };
        assert!(
            Instant::now() < deadline,
            "{method} {url}: still failing after 20 s: {last}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

// ---------------------------------------------------------------------------------------------
// Recorded history
// ---------------------------------------------------------------------------------------------

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Via {
    /// A REST append; the node that acked (or last answered).
    Rest,
    /// A `send` on WebSocket client k.
    Socket(usize),
    /// A probe the scenario made itself.
    Probe,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Outcome {
    /// Acknowledged with this seq (and id, when known) by `node`.
    Acked { seq: u64, id: Option<String>, node: usize },
    /// Only definite refusals (nothing can have been stored).
    Failed(String),
    /// Given up on without an answer (it may or may not have been stored).
    Unknown(String),
}

/// One append the clients made.
#[derive(Clone, Debug)]
pub struct OpRecord {
    pub session: String,
    pub client_id: String,
    /// The content sent; its `text` field is the client id (the marker found in histories).
    pub content: Value,
    pub via: Via,
    pub outcome: Outcome,
    /// Every error met on the way (`node 2: 503 no_leader`, `node 1: timeout`, …).
    pub errors: Vec<String>,
}

/// What a WebSocket client saw on its session channel.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum SocketEvent {
    /// A join answered ok: `sent` was the `last_seq` joined with, `last_seq` the session's newest.
    Joined {
        node: usize,
        sent: u64,
        last_seq: u64,
    },
    /// A message (from a join's replay, a page read to complete it, or a live push).
    Message {
        seq: u64,
        id: String,
        marker: String,
    },
    Resync {
        last_seq: u64,
    },
    /// The connection ended (`close 1012`, `error …`, `no reply within 5 s`, …).
    Disconnected {
        node: usize,
        reason: String,
    },
}

#[derive(Clone, Debug)]
pub struct SocketRecord {
    pub index: usize,
    pub session: String,
    pub events: Vec<SocketEvent>,
    /// The session's last seq when the run ended, which the socket had to reach.
    pub target_seq: u64,
}

#[derive(Clone, Debug, Default)]
pub struct Recorded {
    pub sessions: Vec<String>,
    pub ops: Vec<OpRecord>,
    pub sockets: Vec<SocketRecord>,
}

impl Recorded {
    pub fn acked(&self) -> usize {
        self.ops
            .iter()
            .filter(|op| matches!(op.outcome, Outcome::Acked { .. }))
            .count()
    }

    /// A one-line summary (acked / failed / unknown, errors by kind).
    pub fn summary(&self) -> String {
        let failed = self
            .ops
            .iter()
            .filter(|op| matches!(op.outcome, Outcome::Failed(_)))
            .count();
        let unknown = self
            .ops
            .iter()
            .filter(|op| matches!(op.outcome, Outcome::Unknown(_)))
            .count();
        let mut kinds: BTreeMap<String, usize> = BTreeMap::new();
        for op in &self.ops {
            for error in &op.errors {
                let kind = error.split_once(": ").map(|(_, k)| k).unwrap_or(error);
                let kind: String = kind.chars().take(60).collect();
                *kinds.entry(kind).or_default() += 1;
            }
        }
        let mut disconnects: BTreeMap<String, usize> = BTreeMap::new();
        for socket in &self.sockets {
            for event in &socket.events {
                if let SocketEvent::Disconnected { node, reason } = event {
                    let reason: String = reason.chars().take(80).collect();
                    *disconnects
                        .entry(format!("socket {} node {node}: {reason}", socket.index))
                        .or_default() += 1;
                }
            }
        }
        format!(
            "{} ops: {} acked, {failed} failed, {unknown} unknown; errors met: {kinds:?}; socket disconnects: {disconnects:?}",
            self.ops.len(),
            self.acked()
        )
    }

    /// Errors met by any op other than the given 503 codes (e.g. `no_leader`).
    pub fn errors_other_than(&self, allowed_503: &[&str]) -> Vec<String> {
        let mut out = Vec::new();
        for op in &self.ops {
            for error in &op.errors {
                // A send in the frames a draining node no longer reads goes unanswered before
                // its 1012 close (closes are checked apart); the client resends it elsewhere
                // with the same client_id, so it must still end acked (checked below).
                let reconnect = error.ends_with("socket closed before the reply");
                let allowed = reconnect
                    || allowed_503.iter().any(|code| {
                        error.ends_with(&format!(": 503 {code}")) || error.ends_with(&format!(": socket error {code}"))
                    });
                if !allowed {
                    out.push(format!("{} (session {}): {error}", op.client_id, op.session));
                }
            }
            if !matches!(op.outcome, Outcome::Acked { .. }) {
                out.push(format!(
                    "{} (session {}) not acked: {:?}",
                    op.client_id, op.session, op.outcome
                ));
            }
        }
        out
    }
}

// ---------------------------------------------------------------------------------------------
// Load driver
// ---------------------------------------------------------------------------------------------

#[derive(Clone, Debug)]
pub struct LoadOptions {
    pub writers: usize,
    pub sockets: usize,
    /// Pause between two appends of one writer.
    pub pace: Duration,
    /// Pause between two socket sends (each waits for the previous one's answer).
    pub socket_pace: Duration,
    /// One REST attempt's timeout.
    pub request_timeout: Duration,
    /// How long one append is retried before it is given up on.
    pub op_deadline: Duration,
    /// Bytes of padding in each message (varied up to this).
    pub pad: usize,
}

impl Default for LoadOptions {
    fn default() -> Self {
        LoadOptions {
            writers: 8,
            sockets: 3,
            pace: Duration::from_millis(20),
            socket_pace: Duration::from_millis(100),
            request_timeout: Duration::from_secs(3),
            op_deadline: Duration::from_secs(30),
            pad: 200,
        }
    }
}

/// Which nodes the clients may use (a load balancer's view): nodes are taken out before a
/// planned stop and put back once ready.
pub struct Routing {
    bases: Vec<String>,
    enabled: Mutex<Vec<bool>>,
}

impl Routing {
    pub fn new(bases: Vec<String>) -> Arc<Routing> {
        let enabled = Mutex::new(vec![true; bases.len()]);
        Arc::new(Routing { bases, enabled })
    }

    pub fn exclude(&self, id: usize) {
        self.enabled.lock().unwrap()[id - 1] = false;
    }

    pub fn include(&self, id: usize) {
        self.enabled.lock().unwrap()[id - 1] = true;
    }

    /// A random enabled node: (id, base URL).
    pub fn pick(&self) -> (usize, String) {
        let enabled = self.enabled.lock().unwrap();
        let ids: Vec<usize> = (1..=self.bases.len()).filter(|id| enabled[id - 1]).collect();
        let id = if ids.is_empty() {
            rand::rng().random_range(1..=self.bases.len())
        } else {
            ids[rand::rng().random_range(0..ids.len())]
        };
        (id, self.bases[id - 1].clone())
    }

    /// `preferred` if enabled, else a random enabled node.
    pub fn pick_preferring(&self, preferred: usize) -> (usize, String) {
        if self.enabled.lock().unwrap()[preferred - 1] {
            (preferred, self.bases[preferred - 1].clone())
        } else {
            self.pick()
        }
    }

    pub fn base(&self, id: usize) -> String {
        self.bases[id - 1].clone()
    }
}

static RUN: AtomicU64 = AtomicU64::new(0);

fn run_tag() -> String {
    let n = RUN.fetch_add(1, Ordering::SeqCst);
    format!("{}{n}", &uuid::Uuid::now_v7().simple().to_string()[20..26])
}

fn content_for(client_id: &str, pad: usize) -> Value {
    let pad = if pad == 0 { 0 } else { rand::rng().random_range(0..=pad) };
    json!({"text": client_id, "pad": "x".repeat(pad)})
}

/// The marker of a stored message: its content's `text`.
pub fn marker_of(content: &Value) -> String {
    content["text"].as_str().unwrap_or_default().to_string()
}

/// Appends `content` with `client_id` through REST, retrying (same client id, random enabled
/// node) on 503, transport errors and timeouts until acked or `deadline`.
pub async fn append_with_retry(
    client: &reqwest::Client,
    routing: &Routing,
    session: &str,
    client_id: &str,
    content: Value,
    deadline: Instant,
) -> OpRecord {
    let body = json!({"user_id": "u", "content": content, "client_id": client_id});
    let mut errors = Vec::new();
    let mut indeterminate = false;
    let outcome = loop {
        let (node, base) = routing.pick();
        let url = format!("{base}/api/sessions/{session}/messages");
        let mut pause = Duration::from_millis(50 + rand::rng().random_range(0..100));
        match client.post(&url).json(&body).send().await {
            Ok(response) => {
                let status = response.status().as_u16();
                let retry_after = response
                    .headers()
                    .get("retry-after")
                    .and_then(|v| v.to_str().ok())
                    .and_then(|v| v.parse::<u64>().ok());
                let text = response.text().await;
                let value = match &text {
                    Ok(text) => serde_json::from_str::<Value>(text).unwrap_or(Value::String(text.clone())),
                    Err(error) => {
                        indeterminate = true;
                        errors.push(format!("node {node}: body read failed after {status}: {error}"));
                        tokio::time::sleep(pause).await;
                        if Instant::now() > deadline {
                            break Outcome::Unknown(format!("gave up; last: body read failed: {error}"));
                        }
                        continue;
                    }
                };
                if status == 200 || status == 201 {
                    let message = &value["message"];
                    match (message["seq"].as_u64(), message["id"].as_str()) {
                        (Some(seq), Some(id)) => {
                            break Outcome::Acked {
                                seq,
                                id: Some(id.to_string()),
                                node,
                            };
                        }
                        _ => {
                            errors.push(format!("node {node}: {status} without a message: {value}"));
                            break Outcome::Unknown(format!("acked without a message: {value}"));
                        }
                    }
                }
                let code = value["code"].as_str().unwrap_or("?").to_string();
                errors.push(format!("node {node}: {status} {code}"));
                if status == 503 {
                    if retry_after.is_some() {
                        pause = pause.max(Duration::from_millis(100));
                    }
                } else {
                    break if indeterminate {
                        Outcome::Unknown(format!("{status} {value}"))
                    } else {
                        Outcome::Failed(format!("{status} {value}"))
                    };
                }
            }
            Err(error) => {
                // A refused connection stored nothing; anything later may have.
                if !error.is_connect() {
                    indeterminate = true;
                }
                let kind = if error.is_timeout() {
                    "timeout".to_string()
                } else if error.is_connect() {
                    "connect error".to_string()
                } else {
                    format!("transport error: {error}")
                };
                errors.push(format!("node {node}: {kind}"));
            }
        }
        if Instant::now() > deadline {
            let last = errors.last().cloned().unwrap_or_default();
            break if indeterminate {
                Outcome::Unknown(format!("gave up; last: {last}"))
            } else {
                Outcome::Failed(format!("gave up; last: {last}"))
            };
        }
        tokio::time::sleep(pause).await;
    };
    OpRecord {
        session: session.to_string(),
        client_id: client_id.to_string(),
        content: body["content"].clone(),
        via: Via::Rest,
        outcome,
        errors,
    }
}

/// K REST writers and a few WebSocket clients over the sessions, until `finish`.
pub struct Load {
    pub routing: Arc<Routing>,
    sessions: Vec<String>,
    stop: Arc<AtomicBool>,
    ops: Arc<Mutex<Vec<OpRecord>>>,
    writers: Vec<tokio::task::JoinHandle<()>>,
    sockets: Vec<SocketHandle>,
    options: LoadOptions,
}

impl Load {
    pub fn start(cluster: &Cluster, sessions: &[String], options: LoadOptions) -> Load {
        Self::start_with_routing(Routing::new(cluster.bases()), sessions, options)
    }

    pub fn start_with_routing(routing: Arc<Routing>, sessions: &[String], options: LoadOptions) -> Load {
        let stop = Arc::new(AtomicBool::new(false));
        let ops: Arc<Mutex<Vec<OpRecord>>> = Arc::default();
        let tag = run_tag();
        let mut writers = Vec::new();
        for w in 0..options.writers {
            let (routing, stop, ops, sessions, options, tag) = (
                routing.clone(),
                stop.clone(),
                ops.clone(),
                sessions.to_vec(),
                options.clone(),
                tag.clone(),
            );
            writers.push(tokio::spawn(async move {
                let client = short_client(options.request_timeout);
                let mut n = 0u64;
                while !stop.load(Ordering::SeqCst) {
                    n += 1;
                    let session = sessions[rand::rng().random_range(0..sessions.len())].clone();
                    let client_id = format!("r{tag}-{w}-{n}");
                    let content = content_for(&client_id, options.pad);
                    let deadline = Instant::now() + options.op_deadline;
                    let op = append_with_retry(&client, &routing, &session, &client_id, content, deadline).await;
                    ops.lock().unwrap().push(op);
                    tokio::time::sleep(options.pace).await;
                }
            }));
        }
        let mut sockets = Vec::new();
        let node_count = routing.bases.len();
        for k in 0..options.sockets {
            let session = sessions[(k * 7 + 3) % sessions.len()].clone();
            let home = k % node_count + 1;
            let (target_tx, target_rx) = tokio::sync::watch::channel(None);
            let settled = Arc::new(AtomicBool::new(false));
            let client = SocketClient {
                index: k,
                session: session.clone(),
                settled: settled.clone(),
                target_seq: 0,
                finish_deadline: None,
                home,
                routing: routing.clone(),
                stop: stop.clone(),
                ops: ops.clone(),
                target: target_rx,
                tag: format!("{tag}-{k}"),
                options: options.clone(),
                events: Vec::new(),
                highest: 0,
                pending: None,
                sent: 0,
            };
            sockets.push(SocketHandle {
                session,
                handle: tokio::spawn(client.run()),
                target: target_tx,
                settled,
            });
        }
        Load {
            routing,
            sessions: sessions.to_vec(),
            stop,
            ops,
            writers,
            sockets,
            options,
        }
    }

    /// Acked appends so far.
    pub fn acked_so_far(&self) -> usize {
        self.ops
            .lock()
            .unwrap()
            .iter()
            .filter(|op| matches!(op.outcome, Outcome::Acked { .. }))
            .count()
    }

    pub fn ops_so_far(&self) -> Vec<OpRecord> {
        self.ops.lock().unwrap().clone()
    }

    /// Stops the clients: every append in flight is retried to its end (or its deadline),
    /// then every socket reads until it has its session's last seq (or 20 s pass). Every node
    /// should be up and ready.
    pub async fn finish(self) -> Recorded {
        self.stop.store(true, Ordering::SeqCst);
        let bound = self.options.op_deadline + Duration::from_secs(15);
        for writer in self.writers {
            tokio::time::timeout(bound, writer)
                .await
                .expect("a writer did not finish its last append in time")
                .expect("writer task");
        }
        let deadline = Instant::now() + bound;
        while !self.sockets.iter().all(|s| s.settled.load(Ordering::SeqCst)) {
            assert!(
                Instant::now() < deadline,
                "a socket client still has a send pending {bound:?} after the load stopped"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        // Every append is settled: the sessions' last seqs are final.
        let client = short_client(Duration::from_secs(5));
        let mut last_seqs: BTreeMap<String, u64> = BTreeMap::new();
        for session in &self.sessions {
            let (_, base) = self.routing.pick();
            let (status, body) = retry_503(&client, "GET", &format!("{base}/api/sessions/{session}"), None).await;
            assert_eq!(status, 200, "GET session {session}: {body}");
            last_seqs.insert(session.clone(), body["session"]["last_seq"].as_u64().unwrap_or(0));
        }
        let mut sockets = Vec::new();
        for socket in self.sockets {
            let _ = socket.target.send(Some(last_seqs[&socket.session]));
            let record = tokio::time::timeout(Duration::from_secs(60), socket.handle)
                .await
                .expect("a socket client did not finish within 60 s")
                .expect("socket task");
            sockets.push(record);
        }
        let ops = std::mem::take(&mut *self.ops.lock().unwrap());
        Recorded {
            sessions: self.sessions,
            ops,
            sockets,
        }
    }
}

struct SocketHandle {
    session: String,
    handle: tokio::task::JoinHandle<SocketRecord>,
    target: tokio::sync::watch::Sender<Option<u64>>,
    settled: Arc<AtomicBool>,
}

// ---------------------------------------------------------------------------------------------
// WebSocket client
// ---------------------------------------------------------------------------------------------

type WsStream = tokio_tungstenite::WebSocketStream<tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>>;

struct PendingSend {
    client_id: String,
    content: Value,
    errors: Vec<String>,
    /// The ref of the frame waiting for its answer, if one is on the wire.
    reference: Option<String>,
    sent_at: Instant,
    deadline: Instant,
    indeterminate: bool,
    node: usize,
}

struct SocketClient {
    index: usize,
    session: String,
    home: usize,
    routing: Arc<Routing>,
    stop: Arc<AtomicBool>,
    ops: Arc<Mutex<Vec<OpRecord>>>,
    /// Set once the load stopped and this client has no send pending.
    settled: Arc<AtomicBool>,
    /// The session's final last seq, once the driver knows it.
    target: tokio::sync::watch::Receiver<Option<u64>>,
    target_seq: u64,
    finish_deadline: Option<Instant>,
    tag: String,
    options: LoadOptions,
    events: Vec<SocketEvent>,
    highest: u64,
    pending: Option<PendingSend>,
    sent: u64,
}

enum Session {
    /// The connection ended; reconnect.
    Reconnect,
    /// Everything done.
    Done,
}

impl SocketClient {
    async fn run(mut self) -> SocketRecord {
        let mut attempt = 0usize;
        loop {
            let (node, base) = if attempt == 0 {
                self.routing.pick_preferring(self.home)
            } else {
                self.routing.pick()
            };
            attempt += 1;
            match self.connected(node, &base).await {
                Session::Done => break,
                Session::Reconnect => {
                    if let Some(deadline) = self.finish_deadline
                        && Instant::now() > deadline
                    {
                        self.events.push(SocketEvent::Disconnected {
                            node,
                            reason: "gave up reaching the session's last seq".into(),
                        });
                        break;
                    }
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
            }
        }
        if let Some(pending) = self.pending.take() {
            self.record_pending(pending, Outcome::Unknown("socket client ended first".into()));
        }
        SocketRecord {
            index: self.index,
            session: self.session,
            events: self.events,
            target_seq: self.target_seq,
        }
    }

    fn record_pending(&mut self, pending: PendingSend, outcome: Outcome) {
        self.ops.lock().unwrap().push(OpRecord {
            session: self.session.clone(),
            client_id: pending.client_id,
            content: pending.content,
            via: Via::Socket(self.index),
            outcome,
            errors: pending.errors,
        });
    }

    fn ids_for_marker(&self, marker: &str) -> Option<String> {
        self.events.iter().find_map(|e| match e {
            SocketEvent::Message { id, marker: m, .. } if m == marker => Some(id.clone()),
            _ => None,
        })
    }

    fn on_message(&mut self, message: &Value) {
        let (Some(seq), Some(id)) = (message["seq"].as_u64(), message["id"].as_str()) else {
            return;
        };
        self.events.push(SocketEvent::Message {
            seq,
            id: id.to_string(),
            marker: marker_of(&message["content"]),
        });
        self.highest = self.highest.max(seq);
    }

    /// One connection: connect, join, then read pushes and send until the end or a failure.
    async fn connected(&mut self, node: usize, base: &str) -> Session {
        use futures_util::{SinkExt, StreamExt};
        use tokio_tungstenite::tungstenite::Message;

        let url = format!(
            "{}/socket/websocket?vsn=2.0.0&user_id=u",
            base.replacen("http://", "ws://", 1)
        );
        let mut stream: WsStream =
            match tokio::time::timeout(Duration::from_secs(2), tokio_tungstenite::connect_async(url)).await {
                Ok(Ok((stream, _))) => stream,
                Ok(Err(error)) => {
                    self.events.push(SocketEvent::Disconnected {
                        node,
                        reason: format!("connect failed: {error}"),
                    });
                    return Session::Reconnect;
                }
                Err(_) => {
                    self.events.push(SocketEvent::Disconnected {
                        node,
                        reason: "connect timed out".into(),
                    });
                    return Session::Reconnect;
                }
            };
        let topic = format!("session:{}", self.session);
        let join_ref = format!("j{}", self.events.len());
        let join = json!([join_ref, join_ref, topic, "phx_join", {"last_seq": self.highest}]).to_string();
        let joined_with = self.highest;
        if stream.send(Message::text(join)).await.is_err() {
            self.events.push(SocketEvent::Disconnected {
                node,
                reason: "join send failed".into(),
            });
            return Session::Reconnect;
        }
        let mut joined = false;
        let mut next_ref = 0u64;
        let mut heartbeat = tokio::time::interval(Duration::from_secs(10));
        let mut tick = tokio::time::interval(Duration::from_millis(20));
        let mut next_send_at = Instant::now() + self.options.socket_pace;
        let join_deadline = Instant::now() + Duration::from_secs(5);
        loop {
            // Answers overdue: the node is stopped or cut off; go elsewhere.
            if !joined && Instant::now() > join_deadline {
                self.events.push(SocketEvent::Disconnected {
                    node,
                    reason: "no join reply within 5 s".into(),
                });
                return Session::Reconnect;
            }
            if let Some(pending) = &self.pending
                && pending.reference.is_some()
                && pending.sent_at.elapsed() > Duration::from_secs(5)
            {
                self.events.push(SocketEvent::Disconnected {
                    node,
                    reason: "no send reply within 5 s".into(),
                });
                let pending = self.pending.as_mut().unwrap();
                pending.reference = None;
                pending.indeterminate = true;
                pending.errors.push(format!("node {node}: socket send timeout"));
                return Session::Reconnect;
            }
            let stopping = self.stop.load(Ordering::SeqCst);
            // Start, resend or give up a send.
            if joined && self.pending.as_ref().is_none_or(|p| p.reference.is_none()) {
                let due = Instant::now() >= next_send_at;
                if self.pending.is_none() && !stopping && due {
                    self.sent += 1;
                    let client_id = format!("w{}-{}", self.tag, self.sent);
                    self.pending = Some(PendingSend {
                        content: content_for(&client_id, self.options.pad),
                        client_id,
                        errors: Vec::new(),
                        reference: None,
                        sent_at: Instant::now(),
                        deadline: Instant::now() + self.options.op_deadline,
                        indeterminate: false,
                        node,
                    });
                }
                if let Some(pending) = self.pending.as_ref()
                    && Instant::now() > pending.deadline
                {
                    let pending = self.pending.take().unwrap();
                    let last = pending.errors.last().cloned().unwrap_or_default();
                    let outcome = if pending.indeterminate {
                        Outcome::Unknown(format!("gave up; last: {last}"))
                    } else {
                        Outcome::Failed(format!("gave up; last: {last}"))
                    };
                    self.record_pending(pending, outcome);
                } else if let Some(pending) = self.pending.as_mut()
                    && due
                {
                    next_ref += 1;
                    let reference = format!("s{next_ref}");
                    let frame = json!([join_ref, reference, topic, "send", {
                        "content": {"kind": "text", "content": pending.content},
                        "client_id": pending.client_id,
                    }])
                    .to_string();
                    pending.reference = Some(reference);
                    pending.sent_at = Instant::now();
                    pending.node = node;
                    if stream.send(Message::text(frame)).await.is_err() {
                        // Not on the wire for sure? It may have been: resend after reconnecting.
                        let pending = self.pending.as_mut().unwrap();
                        pending.reference = None;
                        pending.indeterminate = true;
                        self.events.push(SocketEvent::Disconnected {
                            node,
                            reason: "send failed".into(),
                        });
                        return Session::Reconnect;
                    }
                }
            }
            // The end: the load stopped, nothing pending, and the session's last seq reached.
            if stopping && self.pending.is_none() {
                self.settled.store(true, Ordering::SeqCst);
                let target = *self.target.borrow();
                if let Some(target) = target {
                    self.target_seq = target;
                    let deadline = *self
                        .finish_deadline
                        .get_or_insert_with(|| Instant::now() + Duration::from_secs(20));
                    if joined && self.highest >= target {
                        let _ = stream.close(None).await;
                        return Session::Done;
                    }
                    if Instant::now() > deadline {
                        self.events.push(SocketEvent::Disconnected {
                            node,
                            reason: format!("gave up at seq {} waiting 20 s for seq {target}", self.highest),
                        });
                        let _ = stream.close(None).await;
                        return Session::Done;
                    }
                }
            }
            tokio::select! {
                frame = stream.next() => {
                    let text = match frame {
                        Some(Ok(Message::Text(text))) => text.to_string(),
                        Some(Ok(Message::Close(close))) => {
                            let reason = match close {
                                Some(frame) => format!("close {}", u16::from(frame.code)),
                                None => "close without code".into(),
                            };
                            self.events.push(SocketEvent::Disconnected { node, reason });
                            self.unsend(node);
                            return Session::Reconnect;
                        }
                        Some(Ok(_)) => continue,
                        Some(Err(error)) => {
                            self.events.push(SocketEvent::Disconnected { node, reason: format!("error: {error}") });
                            self.unsend(node);
                            return Session::Reconnect;
                        }
                        None => {
                            self.events.push(SocketEvent::Disconnected { node, reason: "stream ended".into() });
                            self.unsend(node);
                            return Session::Reconnect;
                        }
                    };
                    let Ok(frame) = serde_json::from_str::<Value>(&text) else { continue };
                    let reference = frame[1].as_str().map(str::to_string);
                    let frame_topic = frame[2].as_str().unwrap_or_default();
                    let event = frame[3].as_str().unwrap_or_default();
                    let payload = &frame[4];
                    if frame_topic != topic {
                        continue;
                    }
                    match event {
                        "phx_reply" if reference.as_deref() == Some(join_ref.as_str()) && !joined => {
                            if payload["status"] != "ok" {
                                self.events.push(SocketEvent::Disconnected {
                                    node,
                                    reason: format!("join refused: {}", payload["response"]),
                                });
                                let _ = stream.close(None).await;
                                return Session::Reconnect;
                            }
                            let response = &payload["response"];
                            let last_seq = response["last_seq"].as_u64().unwrap_or(0);
                            self.events.push(SocketEvent::Joined { node, sent: joined_with, last_seq });
                            for message in response["messages"].as_array().cloned().unwrap_or_default() {
                                self.on_message(&message);
                            }
                            if response["has_more"] == true && !self.page_until(base, last_seq).await {
                                self.events.push(SocketEvent::Disconnected {
                                    node,
                                    reason: "paging the replay failed".into(),
                                });
                                return Session::Reconnect;
                            }
                            joined = true;
                        }
                        "phx_reply" => {
                            let matches = self.pending.as_ref().is_some_and(|p| p.reference == reference);
                            if !matches {
                                continue;
                            }
                            let status = payload["status"].as_str().unwrap_or_default();
                            let response = &payload["response"];
                            if status == "ok" {
                                let mut pending = self.pending.take().unwrap();
                                let seq = response["seq"].as_u64().unwrap_or(0);
                                let id = self.ids_for_marker(&pending.client_id);
                                pending.reference = None;
                                self.record_pending(pending, Outcome::Acked { seq, id, node });
                                next_send_at = Instant::now() + self.options.socket_pace;
                            } else {
                                let code = response["error"].as_str().unwrap_or("?").to_string();
                                let pending = self.pending.as_mut().unwrap();
                                pending.errors.push(format!("node {node}: socket error {code}"));
                                pending.reference = None;
                                if matches!(code.as_str(), "no_leader" | "overloaded" | "unavailable" | "storage_failed") {
                                    next_send_at = Instant::now() + Duration::from_millis(200);
                                } else {
                                    let pending = self.pending.take().unwrap();
                                    let outcome = if pending.indeterminate {
                                        Outcome::Unknown(format!("{code}: {response}"))
                                    } else {
                                        Outcome::Failed(format!("{code}: {response}"))
                                    };
                                    self.record_pending(pending, outcome);
                                }
                            }
                        }
                        "message" if joined => self.on_message(payload),
                        "resync" => {
                            let last_seq = payload["last_seq"].as_u64().unwrap_or(0);
                            self.events.push(SocketEvent::Resync { last_seq });
                            let _ = stream.close(None).await;
                            self.unsend(node);
                            return Session::Reconnect;
                        }
                        _ => {}
                    }
                }
                _ = heartbeat.tick() => {
                    next_ref += 1;
                    let frame = json!([null, format!("h{next_ref}"), "phoenix", "heartbeat", {}]).to_string();
                    if stream.send(Message::text(frame)).await.is_err() {
                        self.events.push(SocketEvent::Disconnected { node, reason: "heartbeat send failed".into() });
                        self.unsend(node);
                        return Session::Reconnect;
                    }
                }
                _ = tick.tick() => {}
            }
        }
    }

    /// The connection ended with a send unanswered: it will be resent (same client id).
    fn unsend(&mut self, node: usize) {
        if let Some(pending) = self.pending.as_mut()
            && pending.reference.take().is_some()
        {
            pending.indeterminate = true;
            pending
                .errors
                .push(format!("node {node}: socket closed before the reply"));
        }
    }

    /// Reads the messages between the join's replay and `last_seq` through REST.
    async fn page_until(&mut self, base: &str, last_seq: u64) -> bool {
        let client = short_client(Duration::from_secs(3));
        while self.highest < last_seq {
            let url = format!(
                "{base}/api/sessions/{}/messages?after_seq={}&limit=1000",
                self.session, self.highest
            );
            let Ok(response) = client.get(url).send().await else {
                return false;
            };
            if response.status() != 200 {
                return false;
            }
            let Ok(body) = response.json::<Value>().await else {
                return false;
            };
            let messages = body["messages"].as_array().cloned().unwrap_or_default();
            if messages.is_empty() {
                return false;
            }
            for message in messages {
                if message["seq"].as_u64().unwrap_or(0) <= last_seq {
                    self.on_message(&message);
                }
            }
        }
        true
    }
}

// ---------------------------------------------------------------------------------------------
// History checker
// ---------------------------------------------------------------------------------------------

/// One stored message as a node (REST) or the archive (Postgres) shows it.
#[derive(Clone, Debug, PartialEq)]
pub struct StoredMessage {
    pub seq: u64,
    pub id: String,
    pub content: Value,
    /// The archive's `client_id` column (REST does not show it).
    pub client_id: Option<String>,
}

impl StoredMessage {
    /// The client id this message was sent with: the archive's column, else the marker.
    pub fn key(&self) -> String {
        self.client_id.clone().unwrap_or_else(|| marker_of(&self.content))
    }
}

/// Every session's final history from every source ("node 1", …, "archive").
#[derive(Clone, Debug, Default)]
pub struct Histories {
    pub sources: BTreeMap<String, BTreeMap<String, Vec<StoredMessage>>>,
    /// source → session → the `last_seq` it reports (nodes only).
    pub last_seqs: BTreeMap<String, BTreeMap<String, u64>>,
    /// What could not be read (a node kept refusing, the archive never caught up).
    pub read_problems: Vec<String>,
}

pub const ARCHIVE: &str = "archive";

pub fn node_source(id: usize) -> String {
    format!("node {id}")
}

fn parse_message(message: &Value) -> Option<StoredMessage> {
    Some(StoredMessage {
        seq: message["seq"].as_u64()?,
        id: message["id"].as_str()?.to_string(),
        content: message["content"].clone(),
        client_id: None,
    })
}

/// A GET retried on 503 and transport errors for up to 20 s.
async fn get_json(client: &reqwest::Client, url: &str) -> Result<Value, String> {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let last = match client.get(url).send().await {
            Ok(response) => {
                let status = response.status().as_u16();
                let text = response.text().await.unwrap_or_default();
                if status == 200 {
                    return serde_json::from_str(&text).map_err(|e| format!("bad JSON ({e}): {text}"));
                }
                if status != 503 {
                    return Err(format!("{status} {text}"));
                }
                format!("{status} {text}")
            }
            Err(error) => error.to_string(),
        };
        if Instant::now() > deadline {
            return Err(format!("still failing after 20 s: {last}"));
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Reads every session's full history from node `base` (paged).
async fn read_node(base: &str, source: &str, sessions: &[String], histories: &mut Histories) {
    let client = short_client(Duration::from_secs(5));
    for session in sessions {
        match get_json(&client, &format!("{base}/api/sessions/{session}")).await {
            Ok(body) => {
                let last = body["session"]["last_seq"].as_u64().unwrap_or(0);
                histories
                    .last_seqs
                    .entry(source.to_string())
                    .or_default()
                    .insert(session.clone(), last);
            }
            Err(error) => histories
                .read_problems
                .push(format!("{source}: GET /api/sessions/{session} failed: {error}")),
        }
        let mut messages: Vec<StoredMessage> = Vec::new();
        let mut after = 0u64;
        loop {
            let url = format!("{base}/api/sessions/{session}/messages?after_seq={after}&limit=1000");
            let body = match get_json(&client, &url).await {
                Ok(body) => body,
                Err(error) => {
                    histories.read_problems.push(format!(
                        "{source}: reading session {session}'s history after seq {after} failed: {error}"
                    ));
                    break;
                }
            };
            let page: Vec<StoredMessage> = body["messages"]
                .as_array()
                .map(|m| m.iter().filter_map(parse_message).collect())
                .unwrap_or_default();
            let has_more = body["has_more"] == true;
            let Some(last) = page.last().map(|m| m.seq) else {
                if has_more {
                    histories.read_problems.push(format!(
                        "{source}: session {session}: an empty page after seq {after} says has_more"
                    ));
                }
                break;
            };
            if last <= after {
                histories.read_problems.push(format!(
                    "{source}: session {session}: the page after seq {after} ends at seq {last}"
                ));
                break;
            }
            messages.extend(page);
            after = last;
            if !has_more {
                break;
            }
        }
        histories
            .sources
            .entry(source.to_string())
            .or_default()
            .insert(session.clone(), messages);
    }
}

/// Reads the archive's rows of `sessions` once every session has `expected` rows there (or
/// the count stops changing for 10 s, or 60 s pass: then the shortfall is a read problem).
async fn read_archive(database_url: &str, expected: &BTreeMap<String, u64>, histories: &mut Histories) {
    let (client, connection) = tokio_postgres::connect(database_url, tokio_postgres::NoTls)
        .await
        .expect("connect to the test database");
    tokio::spawn(connection);
    let sessions: Vec<String> = expected.keys().cloned().collect();
    let started = Instant::now();
    let mut last_change = Instant::now();
    let mut previous: BTreeMap<String, i64> = BTreeMap::new();
    loop {
        let rows = client
            .query(
                "SELECT session_id, count(*)::bigint FROM messages WHERE session_id = ANY($1) GROUP BY session_id",
                &[&sessions],
            )
            .await
            .expect("count archived messages");
        let counts: BTreeMap<String, i64> = rows.iter().map(|r| (r.get(0), r.get(1))).collect();
        let caught_up = expected
            .iter()
            .all(|(session, want)| counts.get(session).copied().unwrap_or(0) as u64 == *want);
        if caught_up {
            break;
        }
        if counts != previous {
            previous = counts.clone();
            last_change = Instant::now();
        }
        if last_change.elapsed() > Duration::from_secs(10) || started.elapsed() > Duration::from_secs(60) {
            for (session, want) in expected {
                let have = counts.get(session).copied().unwrap_or(0);
                if have as u64 != *want {
                    histories.read_problems.push(format!(
                        "the archive holds {have} messages of session {session} after waiting {:.0?} (the nodes' last seq is {want})",
                        started.elapsed()
                    ));
                }
            }
            break;
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    let rows = client
        .query(
            "SELECT session_id, seq, id, content, client_id FROM messages WHERE session_id = ANY($1) ORDER BY session_id, seq",
            &[&sessions],
        )
        .await
        .expect("read archived messages");
    let archive = histories.sources.entry(ARCHIVE.to_string()).or_default();
    for session in &sessions {
        archive.entry(session.clone()).or_default();
    }
    for row in rows {
        let session: String = row.get(0);
        let seq: i64 = row.get(1);
        let content: String = row.get(3);
        archive.entry(session).or_default().push(StoredMessage {
            seq: seq as u64,
            id: row.get(2),
            content: serde_json::from_str(&content).unwrap_or(Value::String(content)),
            client_id: row.get(4),
        });
    }
}

/// Reads every session's history from every node and (once it caught up) from the archive.
pub async fn collect_histories(cluster: &Cluster, sessions: &[String]) -> Histories {
    let mut histories = Histories::default();
    for id in cluster.ids() {
        read_node(&cluster.node(id), &node_source(id), sessions, &mut histories).await;
    }
    let mut expected: BTreeMap<String, u64> = BTreeMap::new();
    for session in sessions {
        let mut want = 0u64;
        for (source, per_session) in &histories.sources {
            let len = per_session.get(session).map(Vec::len).unwrap_or(0) as u64;
            let last = histories
                .last_seqs
                .get(source)
                .and_then(|l| l.get(session))
                .copied()
                .unwrap_or(0);
            want = want.max(len).max(last);
        }
        expected.insert(session.clone(), want);
    }
    read_archive(&cluster.database.url, &expected, &mut histories).await;
    histories
}

fn describe_via(via: &Via) -> String {
    match via {
        Via::Rest => "REST".into(),
        Via::Socket(k) => format!("socket {k}"),
        Via::Probe => "a probe".into(),
    }
}

fn short(value: &Value) -> String {
    let text = value.to_string();
    if text.len() > 120 {
        format!("{}…", &text[..120])
    } else {
        text
    }
}

/// Every way `histories` contradicts `recorded`, one sentence each (empty: the run is correct).
pub fn verify(recorded: &Recorded, histories: &Histories) -> Vec<String> {
    let mut problems = histories.read_problems.clone();
    let mut sessions: BTreeSet<String> = recorded.sessions.iter().cloned().collect();
    for per_session in histories.sources.values() {
        sessions.extend(per_session.keys().cloned());
    }
    let empty = Vec::new();
    let history = |source: &str, session: &str| -> &Vec<StoredMessage> {
        histories
            .sources
            .get(source)
            .and_then(|s| s.get(session))
            .unwrap_or(&empty)
    };

    // 1. Each source on its own: seqs 1, 2, 3, …; last_seq; every client id once.
    for (source, per_session) in &histories.sources {
        for session in &sessions {
            let Some(messages) = per_session.get(session) else {
                problems.push(format!("{source} has no history of session {session}"));
                continue;
            };
            let mut previous = 0u64;
            for message in messages {
                if message.seq != previous + 1 {
                    let what = if message.seq <= previous {
                        "a repeat or out of order".to_string()
                    } else {
                        format!("seqs {}..={} are missing", previous + 1, message.seq - 1)
                    };
                    problems.push(format!(
                        "{source}, session {session}: seq {} follows seq {previous} ({what}); seqs must run 1, 2, 3, … without a gap",
                        message.seq
                    ));
                }
                previous = previous.max(message.seq);
            }
            if let Some(last) = histories.last_seqs.get(source).and_then(|l| l.get(session))
                && *last != previous
            {
                problems.push(format!(
                    "{source}, session {session}: the session's last_seq is {last} but its history ends at seq {previous}"
                ));
            }
            let mut seen: BTreeMap<String, u64> = BTreeMap::new();
            for message in messages {
                let marker = marker_of(&message.content);
                if let Some(client_id) = &message.client_id
                    && *client_id != marker
                {
                    problems.push(format!(
                        "{source}, session {session}, seq {}: client_id {client_id} but content marker {marker:?}",
                        message.seq
                    ));
                }
                let key = message.key();
                if key.is_empty() {
                    continue;
                }
                if let Some(first) = seen.insert(key.clone(), message.seq) {
                    problems.push(format!(
                        "{source}, session {session}: client_id {key} appears twice, at seq {first} and at seq {}",
                        message.seq
                    ));
                }
            }
        }
    }

    // 2. Sources agree on every (session, seq).
    let sources: Vec<&String> = histories.sources.keys().collect();
    for session in &sessions {
        let mut lengths: Vec<String> = Vec::new();
        let mut by_seq: BTreeMap<u64, Vec<(&str, &StoredMessage)>> = BTreeMap::new();
        for source in &sources {
            let messages = history(source, session);
            lengths.push(format!(
                "{source}: {} messages (last seq {})",
                messages.len(),
                messages.last().map(|m| m.seq).unwrap_or(0)
            ));
            for message in messages {
                by_seq.entry(message.seq).or_default().push((source.as_str(), message));
            }
        }
        let mut differing = 0usize;
        for (seq, copies) in &by_seq {
            let (first_source, first) = copies[0];
            for (source, other) in &copies[1..] {
                if other.id != first.id || other.content != first.content {
                    differing += 1;
                    if differing <= 5 {
                        problems.push(format!(
                            "session {session}, seq {seq}: {first_source} has id {} content {}, {source} has id {} content {}",
                            first.id,
                            short(&first.content),
                            other.id,
                            short(&other.content)
                        ));
                    }
                    break;
                }
            }
            if copies.len() != sources.len() {
                let missing: Vec<&str> = sources
                    .iter()
                    .map(|s| s.as_str())
                    .filter(|s| !copies.iter().any(|(c, _)| c == s))
                    .collect();
                differing += 1;
                if differing <= 5 {
                    problems.push(format!(
                        "session {session}, seq {seq} (id {}, from {first_source}) is missing on {}",
                        first.id,
                        missing.join(", ")
                    ));
                }
            }
        }
        if differing > 5 {
            problems.push(format!(
                "session {session}: {} more seqs differ between sources ({})",
                differing - 5,
                lengths.join("; ")
            ));
        }
    }

    // 3. Every acked message once, where and as acked; no seq acked twice; nothing unknown.
    let mut acked_at: BTreeMap<(String, u64), &OpRecord> = BTreeMap::new();
    let mut op_by_client_id: BTreeMap<&str, &OpRecord> = BTreeMap::new();
    for op in &recorded.ops {
        op_by_client_id.insert(op.client_id.as_str(), op);
        let Outcome::Acked { seq, id, node } = &op.outcome else {
            continue;
        };
        let what = format!(
            "acked message {} (session {}, seq {seq}, acked by node {node} via {})",
            op.client_id,
            op.session,
            describe_via(&op.via)
        );
        if let Some(other) = acked_at.insert((op.session.clone(), *seq), op) {
            problems.push(format!(
                "session {}: seq {seq} was acked twice, for {} and for {}",
                op.session, other.client_id, op.client_id
            ));
        }
        for source in &sources {
            let found: Vec<&StoredMessage> = history(source, &op.session)
                .iter()
                .filter(|m| m.key() == op.client_id)
                .collect();
            let Some(message) = found.first() else {
                problems.push(format!("{what} is missing on {source}"));
                continue;
            };
            if message.seq != *seq {
                problems.push(format!("{what} is at seq {} on {source}", message.seq));
            }
            if let Some(id) = id
                && message.id != *id
            {
                problems.push(format!(
                    "{what} was acked with id {id} but has id {} on {source}",
                    message.id
                ));
            }
            if message.content != op.content {
                problems.push(format!(
                    "{what} has content {} on {source}, sent {}",
                    short(&message.content),
                    short(&op.content)
                ));
            }
        }
    }
    for source in &sources {
        for session in &sessions {
            for message in history(source, session) {
                let key = message.key();
                match op_by_client_id.get(key.as_str()) {
                    None => problems.push(format!(
                        "{source}, session {session}, seq {}: a message no client sent (id {}, content {})",
                        message.seq,
                        message.id,
                        short(&message.content)
                    )),
                    Some(op) if op.session != *session => problems.push(format!(
                        "{source}, session {session}, seq {}: message {key} was sent to session {}",
                        message.seq, op.session
                    )),
                    Some(_) => {}
                }
            }
        }
    }

    // 4. Every socket saw its session's stream gap-free (or after a resync, in order), the
    //    same messages as the nodes, through the session's last seq.
    let reference = sources.iter().find(|s| s.starts_with("node")).map(|s| s.as_str());
    for socket in &recorded.sockets {
        let name = format!("socket {} (session {})", socket.index, socket.session);
        let mut reported = 0usize;
        let mut report = |problem: String, problems: &mut Vec<String>| {
            reported += 1;
            if reported <= 5 {
                problems.push(problem);
            }
        };
        let mut highest: Option<u64> = None;
        let mut resynced = false;
        for event in &socket.events {
            match event {
                SocketEvent::Resync { .. } => resynced = true,
                SocketEvent::Message { seq, id, marker } => {
                    let previous = highest.unwrap_or(0);
                    if highest.is_some() && *seq <= previous {
                        report(
                            format!("{name}: received seq {seq} after seq {previous} (a repeat or out of order)"),
                            &mut problems,
                        );
                    } else if *seq != previous + 1 && !resynced {
                        report(
                            format!(
                                "{name}: received seq {seq} right after seq {previous}: seqs {}..={} never arrived (no resync)",
                                previous + 1,
                                seq - 1
                            ),
                            &mut problems,
                        );
                    }
                    if let Some(reference) = reference {
                        match history(reference, &socket.session).iter().find(|m| m.seq == *seq) {
                            None => report(
                                format!("{name}: received seq {seq} (id {id}) which {reference} does not have"),
                                &mut problems,
                            ),
                            Some(stored) if stored.id != *id || marker_of(&stored.content) != *marker => report(
                                format!(
                                    "{name}: received seq {seq} as id {id} ({marker}), {reference} has id {} ({})",
                                    stored.id,
                                    marker_of(&stored.content)
                                ),
                                &mut problems,
                            ),
                            Some(_) => {}
                        }
                    }
                    highest = Some(previous.max(*seq));
                }
                SocketEvent::Joined { .. } | SocketEvent::Disconnected { .. } => {}
            }
        }
        let reached = highest.unwrap_or(0);
        if reached < socket.target_seq {
            report(
                format!(
                    "{name}: its stream ends at seq {reached} but the session's last seq is {}",
                    socket.target_seq
                ),
                &mut problems,
            );
        }
        if reported > 5 {
            problems.push(format!("{name}: {} more problems", reported - 5));
        }
    }
    problems
}

/// Reads every history (all nodes must be up and ready) and panics with every problem found.
/// Cluster mode: waits (up to 20 s) until every node agrees on each shard's leader and has
/// applied everything that leader had committed when the wait began; what is still short then,
/// one sentence per node and shard.
pub async fn convergence_problems(cluster: &Cluster) -> Vec<String> {
    if !cluster.clustered {
        return Vec::new();
    }
    let started = Instant::now();
    let mut goal: BTreeMap<u64, (u64, u64)> = BTreeMap::new(); // shard → (leader, committed)
    loop {
        let mut problems = Vec::new();
        let mut statuses = BTreeMap::new();
        for id in cluster.ids() {
            match cluster.status(id).await {
                Some(status) => {
                    statuses.insert(id as u64, status);
                }
                None => problems.push(format!("node {id} gave no /api/admin/cluster answer")),
            }
        }
        for shard in 0..u64::from(cluster.options.shards) {
            let entry = |status: &Value| -> Value {
                status["shards"]
                    .as_array()
                    .and_then(|s| s.iter().find(|e| e["shard"].as_u64() == Some(shard)))
                    .cloned()
                    .unwrap_or(Value::Null)
            };
            let leaders: BTreeSet<Option<u64>> = statuses.values().map(|s| entry(s)["leader"].as_u64()).collect();
            let leader = match leaders.iter().collect::<Vec<_>>().as_slice() {
                [Some(leader)] => *leader,
                _ => {
                    problems.push(format!(
                        "shard {shard}: the nodes name different leaders (or none): {leaders:?}"
                    ));
                    continue;
                }
            };
            let Some(leader_entry) = statuses.get(&leader).map(entry) else {
                problems.push(format!("shard {shard}: its leader node {leader} gave no status"));
                continue;
            };
            let committed = leader_entry["committed"].as_u64().unwrap_or(0);
            let (goal_leader, goal_committed) = *goal.entry(shard).or_insert((leader, committed));
            if goal_leader != leader {
                goal.insert(shard, (leader, committed));
            }
            for (id, status) in &statuses {
                let applied = entry(status)["applied"].as_u64().unwrap_or(0);
                if applied < goal_committed {
                    problems.push(format!(
                        "node {id}, shard {shard}: applied {applied}, but its leader node {leader} had committed {goal_committed} ({:.0?} ago); node {id} says {}",
                        started.elapsed(),
                        entry(status)
                    ));
                }
            }
        }
        if problems.is_empty() || started.elapsed() > Duration::from_secs(20) {
            return problems;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

pub async fn check_history(recorded: &Recorded, cluster: &Cluster) {
    let histories = collect_histories(cluster, &recorded.sessions).await;
    let mut problems = verify(recorded, &histories);
    problems.extend(convergence_problems(cluster).await);
    if recorded.acked() == 0 {
        problems.push("no append was acked: the run checked nothing".into());
    }
    let messages: usize = histories
        .sources
        .get(&node_source(1))
        .map(|s| s.values().map(Vec::len).sum())
        .unwrap_or(0);
    let summary = format!(
        "{}; {} sessions, {messages} messages on node 1",
        recorded.summary(),
        recorded.sessions.len()
    );
    if problems.is_empty() {
        eprintln!("history check passed: {summary}");
        return;
    }
    let shown = problems.len().min(60);
    panic!(
        "history check failed with {} problems:\n  {}{}\nrun: {summary}\nlast node log lines:\n{}",
        problems.len(),
        problems[..shown].join("\n  "),
        if problems.len() > shown {
            format!("\n  … and {} more", problems.len() - shown)
        } else {
            String::new()
        },
        cluster.all_logs_tail(15)
    );
}

/// Holds the lock that runs the cluster scenarios one at a time (also across nextest's
/// processes and test binaries): each starts several servers on a small machine.
pub struct Serial(#[allow(dead_code)] std::fs::File);

pub fn serial() -> Serial {
    let path = std::env::temp_dir().join("fleetlm-cluster-tests.lock");
    let file = std::fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(path)
        .expect("lock file");
    file.lock().expect("lock the cluster tests' lock file");
    Serial(file)
}

/// Runs a cluster scenario within `limit`, one at a time (`serial`).
pub async fn bounded(limit: Duration, scenario: impl std::future::Future<Output = ()>) {
    let _serial = serial();
    if tokio::time::timeout(limit, scenario).await.is_err() {
        panic!("the scenario did not finish within {limit:?}");
    }
}

/// Node `id`'s view of `shard` in its `cluster status` (`Null` if it does not answer).
pub async fn shard_status(cluster: &Cluster, id: usize, shard: u16) -> Value {
    cluster
        .status(id)
        .await
        .and_then(|status| {
            status["shards"]
                .as_array()
                .and_then(|s| s.iter().find(|e| e["shard"] == json!(shard)).cloned())
        })
        .unwrap_or(Value::Null)
}
