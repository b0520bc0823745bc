//! Cluster scenarios: a 3-node FleetLM cluster (the binary beside this one, temporary data
//! directories, a fresh Postgres database per run, dropped after) against a single node with
//! the same settings and the same kind of archive (Postgres).
//!
//! - `cluster-write`: the `ws-write` load spread over the cluster's nodes, then the same load on
//!   a single node; acked appends/s, latency, the ratio, and appends per log entry.
//! - `failover`: kill -9 the leader of a shard again and again under a moderate load; time from
//!   the kill to the next acknowledged write on that shard through a surviving node.
//! - `cluster-idle`: CPU and RSS of idle cluster nodes (64 shards each) and of an idle single node.

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use clap::Args;
use hdrhistogram::Histogram;
use serde_json::{Value, json};
use tokio::io::AsyncBufReadExt;

use crate::archive_link::{self, ArchiveLink};
use crate::cpu::{clock_ticks_per_second, cpu_ticks, proc_sample};
use crate::server::Target;
use crate::wswrite::{WriteRun, WsWriteOptions};

const SECRET: &str = "0123456789abcdef0123";
/// How long a node may take to print its listening line, and a cluster to become ready.
const START_TIMEOUT: Duration = Duration::from_secs(90);

/// Settings every cluster scenario shares.
#[derive(Args, Clone)]
pub struct ClusterSettings {
    /// Postgres to create each run's database in (the shared archive; dropped after the run).
    #[arg(long, default_value = "postgres://postgres@127.0.0.1:5432/postgres")]
    pub postgres: String,
    /// Shards (the same for the cluster and the single node).
    #[arg(long, default_value_t = 64)]
    pub shards: u16,
    /// Cluster members (3 or 5).
    #[arg(long, default_value_t = 3)]
    pub nodes: usize,
    /// `--election-timeout-ms` for the cluster nodes (the server's default when not given).
    #[arg(long)]
    pub election_timeout_ms: Option<u64>,
    /// Keep the nodes' logs (stderr) in this directory instead of a temporary one.
    #[arg(long)]
    pub logs: Option<PathBuf>,
}

/// The shard that owns a session: `src/ids.rs` `shard_for_session`, copied (the bench does not
/// link the server). xxh3-64 of the id's bytes modulo the shard count.
pub fn shard_for_session(session_id: &str, shard_count: u16) -> u16 {
    (xxhash_rust::xxh3::xxh3_64(session_id.as_bytes()) % u64::from(shard_count)) as u16
}

// ---------------------------------------------------------------------------------------------
// Processes and databases
// ---------------------------------------------------------------------------------------------

/// A database of its own for one run, dropped by `drop_now`.
pub struct TempDatabase {
    admin_url: String,
    name: String,
    pub url: String,
}

static DATABASES: AtomicU64 = AtomicU64::new(0);

impl TempDatabase {
    pub async fn create(admin_url: &str, tag: &str) -> anyhow::Result<TempDatabase> {
        let name = format!(
            "fleetlm_bench_{tag}_{}_{}",
            std::process::id(),
            DATABASES.fetch_add(1, Ordering::Relaxed)
        );
        let admin = crate::pgbase::connect(admin_url).await?;
        admin.batch_execute(&format!("DROP DATABASE IF EXISTS {name}")).await?;
        admin.batch_execute(&format!("CREATE DATABASE {name}")).await?;
        Ok(TempDatabase {
            admin_url: admin_url.to_string(),
            url: crate::pgbase::with_database(admin_url, &name),
            name,
        })
    }

    pub async fn drop_now(self) -> anyhow::Result<()> {
        let admin = crate::pgbase::connect(&self.admin_url).await?;
        admin
            .batch_execute(&format!("DROP DATABASE IF EXISTS {} WITH (FORCE)", self.name))
            .await?;
        Ok(())
    }
}

fn server_binary() -> anyhow::Result<PathBuf> {
    let binary = std::env::current_exe()?.with_file_name("fleetlm");
    if !binary.exists() {
        bail!(
            "{} not found: build it with `cargo build --release` first",
            binary.display()
        );
    }
    Ok(binary)
}

/// Starts `fleetlm` with `args` (stderr appended to `log`); returns the child once it printed
/// its listening line, and its base URL. The rest of its stdout is drained.
async fn spawn_server(args: &[String], log: &Path) -> anyhow::Result<(tokio::process::Child, String)> {
    let binary = server_binary()?;
    let stderr = std::fs::OpenOptions::new().create(true).append(true).open(log)?;
    let mut child = tokio::process::Command::new(&binary)
        .args(args)
        // FLEETLM_BENCH_RUST_LOG (e.g. `info`) for more detail in the nodes' logs.
        .env(
            "RUST_LOG",
            std::env::var("FLEETLM_BENCH_RUST_LOG").unwrap_or_else(|_| "warn".into()),
        )
        .stdout(Stdio::piped())
        .stderr(stderr)
        .kill_on_drop(true)
        .spawn()
        .with_context(|| format!("starting {}", binary.display()))?;
    let stdout = child.stdout.take().context("server stdout")?;
    let mut reader = tokio::io::BufReader::new(stdout);
    let mut line = String::new();
    match tokio::time::timeout(START_TIMEOUT, reader.read_line(&mut line)).await {
        Ok(result) => {
            result?;
        }
        Err(_) => bail!("no listening line within {START_TIMEOUT:?} (log: {})", log.display()),
    }
    let address = line
        .split("http://")
        .nth(1)
        .and_then(|rest| rest.split_whitespace().next())
        .with_context(|| format!("unexpected server output {line:?} (log: {})", log.display()))?;
    tokio::spawn(async move {
        let mut sink = String::new();
        while matches!(reader.read_line(&mut sink).await, Ok(n) if n > 0) {
            sink.clear();
        }
    });
    Ok((child, format!("http://{address}")))
}

struct Node {
    id: usize,
    data_dir: PathBuf,
    log: PathBuf,
    child: Option<tokio::process::Child>,
    base: String,
}

/// N `fleetlm serve` processes forming one cluster on loopback.
pub struct Cluster {
    nodes: Vec<Node>,
    peers: String,
    database_url: String,
    /// Per node, when the scenario can cut nodes off the archive: its link to Postgres.
    archive_links: Vec<ArchiveLink>,
    settings: ClusterSettings,
    extra_args: String,
    _root: tempfile::TempDir,
}

impl Cluster {
    /// Starts every node at once and waits until each is ready (`/health/ready` 200).
    pub async fn start(settings: &ClusterSettings, database_url: &str, extra_args: &str) -> anyhow::Result<Cluster> {
        Self::start_linked(settings, database_url, extra_args, false).await
    }

    /// `start`, with each node reaching the archive through its own link when `linked` (see
    /// `cut_archive`).
    pub async fn start_linked(
        settings: &ClusterSettings,
        database_url: &str,
        extra_args: &str,
        linked: bool,
    ) -> anyhow::Result<Cluster> {
        let root = tempfile::tempdir()?;
        let mut archive_links = Vec::new();
        if linked {
            for _ in 0..settings.nodes {
                let (_, target) = archive_link::through_port(database_url, 0)?;
                archive_links.push(ArchiveLink::start(target).await?);
            }
        }
        let log_dir = match &settings.logs {
            Some(dir) => {
                std::fs::create_dir_all(dir)?;
                dir.clone()
            }
            None => root.path().to_path_buf(),
        };
        // Free ports for the peer listeners (bound together so they differ, then released).
        let listeners: Vec<std::net::TcpListener> = (0..settings.nodes)
            .map(|_| std::net::TcpListener::bind("127.0.0.1:0"))
            .collect::<Result<_, _>>()?;
        let peers = listeners
            .iter()
            .enumerate()
            .map(|(i, l)| Ok(format!("{}={}", i + 1, l.local_addr()?)))
            .collect::<anyhow::Result<Vec<_>>>()?
            .join(",");
        drop(listeners);
        let stamp = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap_or_default()
            .as_secs();
        let nodes = (1..=settings.nodes)
            .map(|id| Node {
                id,
                data_dir: root.path().join(format!("node{id}")),
                log: log_dir.join(format!("node{id}-{stamp}.log")),
                child: None,
                base: String::new(),
            })
            .collect();
        let mut cluster = Cluster {
            nodes,
            peers,
            database_url: database_url.to_string(),
            archive_links,
            settings: settings.clone(),
            extra_args: extra_args.to_string(),
            _root: root,
        };
        let starts: Vec<_> = (0..cluster.nodes.len())
            .map(|i| {
                let (args, log) = (cluster.args(i), cluster.nodes[i].log.clone());
                async move { spawn_server(&args, &log).await }
            })
            .collect();
        for (node, started) in cluster
            .nodes
            .iter_mut()
            .zip(futures_util::future::join_all(starts).await)
        {
            let (child, base) = started.with_context(|| format!("starting node {}", node.id))?;
            node.child = Some(child);
            node.base = base;
        }
        cluster.wait_all_ready(START_TIMEOUT).await?;
        Ok(cluster)
    }

    fn args(&self, index: usize) -> Vec<String> {
        let node = &self.nodes[index];
        let mut args: Vec<String> = [
            "serve",
            "--node-id",
            &node.id.to_string(),
            "--cluster-peers",
            &self.peers,
            "--cluster-secret",
            SECRET,
            "--http-addr",
            "127.0.0.1:0",
            "--data-dir",
            &node.data_dir.to_string_lossy(),
            "--database-url",
            &self.database_url_of(index),
            "--shards",
            &self.settings.shards.to_string(),
            "--ws-max-sockets-per-identity",
            "1000000",
        ]
        .iter()
        .map(|s| s.to_string())
        .collect();
        if let Some(timeout) = self.settings.election_timeout_ms {
            args.extend(["--election-timeout-ms".to_string(), timeout.to_string()]);
        }
        args.extend(self.extra_args.split_whitespace().map(str::to_string));
        args
    }

    fn database_url_of(&self, index: usize) -> String {
        match self.archive_links.get(index) {
            Some(link) => archive_link::through_port(&self.database_url, link.port)
                .map(|(url, _)| url)
                .unwrap_or_else(|_| self.database_url.clone()),
            None => self.database_url.clone(),
        }
    }

    /// Cuts node `index` off the archive (or lets it through again). Needs `start_linked`.
    pub fn cut_archive(&self, index: usize, cut: bool) {
        if let Some(link) = self.archive_links.get(index) {
            if cut { link.cut() } else { link.restore() }
        }
    }

    pub fn bases(&self) -> Vec<String> {
        self.nodes.iter().map(|n| n.base.clone()).collect()
    }

    pub fn base(&self, index: usize) -> &str {
        &self.nodes[index].base
    }

    pub fn len(&self) -> usize {
        self.nodes.len()
    }

    pub fn node_id(&self, index: usize) -> usize {
        self.nodes[index].id
    }

    pub fn index_of(&self, node_id: u64) -> Option<usize> {
        self.nodes.iter().position(|n| n.id as u64 == node_id)
    }

    pub fn pid(&self, index: usize) -> Option<u32> {
        self.nodes[index].child.as_ref()?.id()
    }

    pub fn log(&self, index: usize) -> &Path {
        &self.nodes[index].log
    }

    pub async fn wait_all_ready(&self, timeout: Duration) -> anyhow::Result<()> {
        self.wait_all_ready_but(timeout, &[]).await
    }

    /// Waits until every running node leads its share of the shards (counts within 1, each
    /// shard led once: the server's leader balancing has settled), at most `timeout`; returns
    /// how long that took, or what it saw last if it did not settle (a server without leader
    /// balancing never does). Measuring before would count the hand-overs' retried writes.
    pub async fn wait_leadership_even(&self, timeout: Duration) -> Result<Duration, String> {
        let client = reqwest::Client::new();
        let started = Instant::now();
        loop {
            let mut led = Vec::new();
            let mut claimed = std::collections::BTreeMap::new();
            for node in self.nodes.iter().filter(|node| node.child.is_some()) {
                let Ok(view) = cluster_view(&client, &node.base).await else {
                    break;
                };
                let own: Vec<u64> = view["shards"]
                    .as_array()
                    .map(|shards| {
                        shards
                            .iter()
                            .filter(|shard| shard["role"] == "leader")
                            .filter_map(|shard| shard["shard"].as_u64())
                            .collect()
                    })
                    .unwrap_or_default();
                led.push(own.len());
                for shard in own {
                    *claimed.entry(shard).or_insert(0) += 1;
                }
            }
            let every_shard_once =
                claimed.len() == usize::from(self.settings.shards) && claimed.values().all(|c| *c == 1);
            let (most, least) = (led.iter().max().copied(), led.iter().min().copied());
            if every_shard_once && most.zip(least).is_some_and(|(most, least)| most - least <= 1) {
                return Ok(started.elapsed());
            }
            if started.elapsed() >= timeout {
                return Err(format!("not even after {timeout:?}: leaders per node {led:?}"));
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }

    /// `wait_all_ready`, content with nodes unready only for the `tolerated` components.
    pub async fn wait_all_ready_but(&self, timeout: Duration, tolerated: &[&str]) -> anyhow::Result<()> {
        let client = reqwest::Client::new();
        for node in &self.nodes {
            if node.child.is_some() {
                wait_ready_but(&client, &node.base, timeout, tolerated)
                    .await
                    .with_context(|| format!("node {} (log: {})", node.id, node.log.display()))?;
            }
        }
        Ok(())
    }

    /// SIGKILLs a node; returns the moment just before the signal was sent.
    pub async fn kill(&mut self, index: usize) -> anyhow::Result<Instant> {
        let mut child = self.nodes[index].child.take().context("node not running")?;
        let at = Instant::now();
        child.start_kill()?;
        child.wait().await?;
        Ok(at)
    }

    /// Starts a killed node again on its data directory (its HTTP port changes).
    pub async fn restart(&mut self, index: usize) -> anyhow::Result<()> {
        let (args, log) = (self.args(index), self.nodes[index].log.clone());
        let (child, base) = spawn_server(&args, &log).await?;
        let node = &mut self.nodes[index];
        node.child = Some(child);
        node.base = base;
        Ok(())
    }

    /// Kills every node and waits for them to exit.
    pub async fn stop(&mut self) {
        for node in &mut self.nodes {
            if let Some(mut child) = node.child.take() {
                let _ = child.start_kill();
                let _ = child.wait().await;
            }
        }
    }

    /// Lines of the nodes' logs at WARN or ERROR level, per node id.
    pub fn warnings(&self) -> Vec<(usize, Vec<String>)> {
        self.nodes
            .iter()
            .map(|node| {
                let text = std::fs::read_to_string(&node.log).unwrap_or_default();
                let lines = text
                    .lines()
                    .filter(|l| l.contains("WARN") || l.contains("ERROR"))
                    .map(str::to_string)
                    .collect();
                (node.id, lines)
            })
            .collect()
    }
}

async fn wait_ready(client: &reqwest::Client, base: &str, timeout: Duration) -> anyhow::Result<()> {
    wait_ready_but(client, base, timeout, &[]).await
}

/// `wait_ready`, also content with a 503 whose every reason is one of `tolerated` components
/// (`archive` while a scenario keeps the archive down: the node serves, the archive lags).
async fn wait_ready_but(
    client: &reqwest::Client,
    base: &str,
    timeout: Duration,
    tolerated: &[&str],
) -> anyhow::Result<()> {
    let deadline = Instant::now() + timeout;
    loop {
        let last = match client
            .get(format!("{base}/health/ready"))
            .timeout(Duration::from_secs(3))
            .send()
            .await
        {
            Ok(response) if response.status() == 200 => return Ok(()),
            Ok(response) => {
                let text = response.text().await.unwrap_or_default();
                let only_tolerated = serde_json::from_str::<Value>(&text).ok().is_some_and(|body| {
                    body["reasons"].as_array().is_some_and(|reasons| {
                        !reasons.is_empty()
                            && reasons
                                .iter()
                                .all(|r| r["component"].as_str().is_some_and(|c| tolerated.contains(&c)))
                    })
                });
                if only_tolerated {
                    return Ok(());
                }
                text
            }
            Err(error) => error.to_string(),
        };
        if Instant::now() >= deadline {
            let cut: String = last.chars().take(600).collect();
            bail!("{base} not ready within {timeout:?}: {cut}");
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Sum of a metric over several servers.
async fn metric_sum(client: &reqwest::Client, bases: &[String], name: &str) -> anyhow::Result<f64> {
    let mut total = 0.0;
    for base in bases {
        total += Target::external(base.clone()).metric(client, name).await?;
    }
    Ok(total)
}

/// A member's own view of the cluster (`/api/admin/cluster`).
async fn cluster_view(client: &reqwest::Client, base: &str) -> anyhow::Result<Value> {
    let response = client
        .get(format!("{base}/api/admin/cluster"))
        .timeout(Duration::from_secs(5))
        .send()
        .await?;
    anyhow::ensure!(
        response.status() == 200,
        "{base}/api/admin/cluster: {}",
        response.status()
    );
    Ok(response.json().await?)
}

/// Sum over shards of the committed log index, as `base` sees it.
async fn committed_sum(client: &reqwest::Client, base: &str) -> anyhow::Result<u64> {
    let view = cluster_view(client, base).await?;
    Ok(view["shards"]
        .as_array()
        .context("shards")?
        .iter()
        .filter_map(|s| s["committed"].as_u64())
        .sum())
}

/// Registers the bench agent and creates `sessions`, each through `bases[i % len]` (retried
/// briefly: the agent reaches the other nodes by relay).
async fn set_up_sessions(client: &reqwest::Client, bases: &[String], sessions: &[String]) -> anyhow::Result<()> {
    Target::external(bases[0].clone())
        .register_agent(client, "bench-agent", "http://127.0.0.1:9", json!({}))
        .await?;
    for (i, session) in sessions.iter().enumerate() {
        let target = Target::external(bases[i % bases.len()].clone());
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            match target
                .create_session(client, session, "bench-user", "bench-agent")
                .await
            {
                Ok(()) => break,
                Err(error) if Instant::now() >= deadline => return Err(error.context(format!("creating {session}"))),
                Err(_) => tokio::time::sleep(Duration::from_millis(100)).await,
            }
        }
    }
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// cluster-write
// ---------------------------------------------------------------------------------------------

#[derive(Args, Clone)]
pub struct ClusterWriteOptions {
    /// Sessions (one socket each; the cluster's spread over its nodes round-robin).
    #[arg(long, default_value_t = 64)]
    pub sessions: usize,
    /// Sends in flight per socket.
    #[arg(long, default_value_t = 8)]
    pub depth: usize,
    /// Measured seconds per run (after 1 s of warm-up).
    #[arg(long, default_value_t = 10)]
    pub seconds: u64,
    /// Bytes of text per message.
    #[arg(long, default_value_t = 100)]
    pub message_bytes: usize,
    /// Offered load in sends/s across all sockets (0 = as fast as acks allow).
    #[arg(long, default_value_t = 0)]
    pub rate: u64,
    /// `ws` (the `ws-write` load: one socket per session, `depth` sends pipelined on it) or
    /// `rest` (the `rest-write` load: `depth` concurrent POST loops per session).
    #[arg(long, default_value = "ws", value_parser = ["ws", "rest"])]
    pub transport: String,
    /// Rounds; each runs the single node and the cluster once, the order alternating
    /// (round 1: single node first).
    #[arg(long, default_value_t = 1)]
    pub rounds: usize,
    #[command(flatten)]
    pub cluster: ClusterSettings,
}

struct WriteSample {
    run: WriteRun,
    appends: f64,
    entries: f64,
    /// Seconds from sealing to durable, summed over the entries.
    commit_secs: f64,
    /// Mean time in the server from a socket's send to its answer (ms; `ws` transport).
    server_send_ms: f64,
    fsyncs: f64,
    committed: Option<u64>,
    nodes: usize,
    /// CPU time of the server processes and of this tool over the drive (warm-up included).
    server_cpu_secs: f64,
    bench_cpu_secs: f64,
    wall_secs: f64,
}

impl WriteSample {
    fn per_entry(&self) -> f64 {
        if self.entries > 0.0 {
            self.appends / self.entries
        } else {
            0.0
        }
    }

    /// Mean time from sealing an entry to its being durable (ms).
    fn commit_ms(&self) -> f64 {
        self.commit_secs * 1e3 / self.entries.max(1.0)
    }

    /// Server CPU per append (µs), over the whole drive.
    fn cpu_us_per_append(&self) -> f64 {
        self.server_cpu_secs * 1e6 / self.appends.max(1.0)
    }

    fn to_json(&self) -> Value {
        json!({
            "nodes": self.nodes,
            "acked_per_sec": self.run.acked_per_sec,
            "errors": self.run.errors,
            "latency_ms": {"p50": self.run.ms(0.5), "p99": self.run.ms(0.99), "p999": self.run.ms(0.999)},
            "appends": self.appends,
            "log_entries": self.entries,
            "appends_per_entry": self.per_entry(),
            "entry_commit_ms": self.commit_ms(),
            "server_send_ms": self.server_send_ms,
            "committed_index_delta": self.committed,
            "wal_fsyncs_all_nodes": self.fsyncs,
            "server_cpu_secs": self.server_cpu_secs,
            "bench_cpu_secs": self.bench_cpu_secs,
            "drive_wall_secs": self.wall_secs,
            "server_cpu_us_per_append": self.cpu_us_per_append(),
        })
    }
}

/// Drives the `ws-write` load over `bases` (session i through `bases[i % len]`, all at once).
async fn drive_spread(
    client: &reqwest::Client,
    bases: &[String],
    pids: &[u32],
    options: &ClusterWriteOptions,
    tag: &str,
) -> anyhow::Result<WriteSample> {
    let run = std::process::id();
    let sessions: Vec<String> = (0..options.sessions).map(|s| format!("cw-{tag}-{run}-{s}")).collect();
    set_up_sessions(client, bases, &sessions).await?;
    let ws_options = WsWriteOptions {
        sessions: options.sessions,
        depth: options.depth,
        seconds: options.seconds,
        message_bytes: options.message_bytes,
        rate: options.rate,
        baseline_postgres: "none".into(),
        half_load: false,
        postgres_connections: 0,
        baseline_jetstream: "none".into(),
    };
    let appends_before = metric_sum(client, bases, "fleetlm_appends_total").await?;
    let entries_before = metric_sum(client, bases, "fleetlm_append_commit_seconds_count").await?;
    let commit_secs_before = metric_sum(client, bases, "fleetlm_append_commit_seconds_sum").await?;
    let send_secs_before = metric_sum(client, bases, "fleetlm_ws_send_seconds_sum").await?;
    let sends_before = metric_sum(client, bases, "fleetlm_ws_send_seconds_count").await?;
    let fsyncs_before = metric_sum(client, bases, "fleetlm_wal_fsync_seconds_count").await?;
    let committed_before = if bases.len() > 1 {
        Some(committed_sum(client, &bases[0]).await?)
    } else {
        None
    };
    let cpu_before = cpu_ticks(pids);
    let bench_before = cpu_ticks(&[std::process::id()]);
    let wall = Instant::now();
    let run = if options.transport == "rest" {
        let urls: Vec<String> = sessions
            .iter()
            .enumerate()
            .map(|(i, session)| format!("{}/api/sessions/{session}/messages", bases[i % bases.len()]))
            .collect();
        let rest_options = crate::rest::WriteOptions {
            sessions: options.sessions,
            depth: options.depth,
            seconds: options.seconds,
            message_bytes: options.message_bytes,
        };
        let pooled = reqwest::Client::builder()
            .pool_max_idle_per_host(options.sessions * options.depth)
            .build()?;
        let measure_from = Instant::now() + Duration::from_secs(2);
        let stop_at = measure_from + Duration::from_secs(options.seconds);
        let workers = crate::rest::spawn_workers(&pooled, &urls, &rest_options, measure_from, stop_at);
        let (latencies, errors) = crate::rest::collect(workers).await?;
        WriteRun {
            acked_per_sec: latencies.len() as f64 / options.seconds as f64,
            latencies,
            errors,
        }
    } else {
        drive_ws(bases, &sessions, options, &ws_options).await?
    };
    let wall = wall.elapsed().as_secs_f64();
    let ticks = clock_ticks_per_second();
    let server_cpu_secs = (cpu_ticks(pids) - cpu_before) as f64 / ticks;
    let bench_cpu_secs = (cpu_ticks(&[std::process::id()]) - bench_before) as f64 / ticks;
    let appends = metric_sum(client, bases, "fleetlm_appends_total").await? - appends_before;
    let entries = metric_sum(client, bases, "fleetlm_append_commit_seconds_count").await? - entries_before;
    let commit_secs = metric_sum(client, bases, "fleetlm_append_commit_seconds_sum").await? - commit_secs_before;
    let send_secs = metric_sum(client, bases, "fleetlm_ws_send_seconds_sum").await? - send_secs_before;
    let sends = metric_sum(client, bases, "fleetlm_ws_send_seconds_count").await? - sends_before;
    let fsyncs = metric_sum(client, bases, "fleetlm_wal_fsync_seconds_count").await? - fsyncs_before;
    let committed = match committed_before {
        Some(before) => Some(committed_sum(client, &bases[0]).await? - before),
        None => None,
    };
    Ok(WriteSample {
        run,
        appends,
        entries,
        commit_secs,
        server_send_ms: send_secs * 1e3 / sends.max(1.0),
        fsyncs,
        committed,
        nodes: bases.len(),
        server_cpu_secs,
        bench_cpu_secs,
        wall_secs: wall,
    })
}

/// The `ws-write` drive on every node at once, each with its share of the sessions.
async fn drive_ws(
    bases: &[String],
    sessions: &[String],
    options: &ClusterWriteOptions,
    ws_options: &WsWriteOptions,
) -> anyhow::Result<WriteRun> {
    let drives = bases.iter().enumerate().map(|(i, base)| {
        let mine: Vec<String> = sessions.iter().skip(i).step_by(bases.len()).cloned().collect();
        let per_node = WsWriteOptions {
            sessions: mine.len(),
            // Offered load split evenly over the nodes' sockets.
            rate: options.rate * mine.len() as u64 / options.sessions.max(1) as u64,
            ..ws_options.clone()
        };
        async move { crate::wswrite::drive(base, &mine, &per_node).await }
    });
    let mut latencies = Histogram::<u64>::new(3)?;
    let (mut acked_per_sec, mut errors) = (0.0, 0);
    for run in futures_util::future::join_all(drives).await {
        let run = run?;
        acked_per_sec += run.acked_per_sec;
        errors += run.errors;
        latencies.add(run.latencies)?;
    }
    Ok(WriteRun {
        acked_per_sec,
        latencies,
        errors,
    })
}

async fn single_write(options: &ClusterWriteOptions, extra: &str) -> anyhow::Result<WriteSample> {
    let db = TempDatabase::create(&options.cluster.postgres, "single").await?;
    let result = async {
        let args = format!(
            "--database-url {} --shards {} --ws-max-sockets-per-identity 1000000 {extra}",
            db.url, options.cluster.shards
        );
        let server = Target::spawn(&args).await?;
        let client = reqwest::Client::new();
        wait_ready(&client, &server.base, START_TIMEOUT).await?;
        let pid = server.pid().context("single node pid")?;
        let sample = drive_spread(&client, std::slice::from_ref(&server.base), &[pid], options, "single").await;
        drop(server);
        sample
    }
    .await;
    db.drop_now().await?;
    result
}

async fn cluster_write_once(options: &ClusterWriteOptions, extra: &str) -> anyhow::Result<WriteSample> {
    let db = TempDatabase::create(&options.cluster.postgres, "cluster").await?;
    let result = async {
        let mut cluster = Cluster::start(&options.cluster, &db.url, extra).await?;
        match cluster.wait_leadership_even(Duration::from_secs(30)).await {
            Ok(settled) => println!("leadership                 even after {:.1} s", settled.as_secs_f64()),
            Err(seen) => println!("leadership                 {seen}"),
        }
        let client = reqwest::Client::new();
        let pids: Vec<u32> = (0..cluster.len()).filter_map(|i| cluster.pid(i)).collect();
        let sample = drive_spread(&client, &cluster.bases(), &pids, options, "cluster").await;
        report_warnings(&cluster);
        cluster.stop().await;
        sample
    }
    .await;
    // Give the killed nodes' connections a moment to go before the database is dropped.
    tokio::time::sleep(Duration::from_millis(200)).await;
    db.drop_now().await?;
    result
}

fn report_warnings(cluster: &Cluster) {
    for (id, lines) in cluster.warnings() {
        if !lines.is_empty() {
            println!(
                "node {id}: {} WARN/ERROR log lines ({}; kept with --logs DIR); first: {}",
                lines.len(),
                cluster.log(id - 1).display(),
                lines[0].chars().take(300).collect::<String>()
            );
        }
    }
}

pub async fn cluster_write(options: &ClusterWriteOptions, extra: &str) -> anyhow::Result<Value> {
    println!(
        "scenario                   cluster-write ({}: {} sessions x {} in flight, {} B, {} shards, {} nodes vs 1, Postgres archive)",
        options.transport,
        options.sessions,
        options.depth,
        options.message_bytes,
        options.cluster.shards,
        options.cluster.nodes
    );
    if options.rate > 0 {
        println!("offered load               {} sends/s", options.rate);
    }
    let mut rounds = Vec::new();
    for round in 0..options.rounds {
        let (single, cluster) = if round % 2 == 0 {
            let single = single_write(options, extra).await?;
            (single, cluster_write_once(options, extra).await?)
        } else {
            let cluster = cluster_write_once(options, extra).await?;
            (single_write(options, extra).await?, cluster)
        };
        let ratio = cluster.run.acked_per_sec / single.run.acked_per_sec.max(1.0);
        println!(
            "round {} ({} first)",
            round + 1,
            if round % 2 == 0 { "single node" } else { "cluster" }
        );
        println!(
            "                           acked/s     p50 ms   p99 ms   p999 ms  errors  appends/entry  entry commit ms  server send ms"
        );
        for (name, sample) in [("single node", &single), ("cluster", &cluster)] {
            let (p50, p99, p999) = (sample.run.ms(0.5), sample.run.ms(0.99), sample.run.ms(0.999));
            println!(
                "{name:<27}{:>8.0}   {p50:>7.2}  {p99:>7.2}  {p999:>7.2}  {:>6}  {:>13.1}  {:>15.2}  {:>14.2}",
                sample.run.acked_per_sec,
                sample.run.errors,
                sample.per_entry(),
                sample.commit_ms(),
                sample.server_send_ms
            );
        }
        if let Some(committed) = cluster.committed {
            println!(
                "cluster log entries        {:.0} leader commits; committed index moved {committed} (sum over shards); {:.1} appends per committed index",
                cluster.entries,
                cluster.appends / (committed.max(1) as f64)
            );
        }
        println!(
            "wal fsyncs                 single {:.0}, cluster {:.0} (all nodes)",
            single.fsyncs, cluster.fsyncs
        );
        for (name, sample) in [("single node", &single), ("cluster", &cluster)] {
            println!(
                "{:<27}server CPU {:.2} cores ({:.1} µs per append), load generator {:.2} cores",
                format!("{name} CPU"),
                sample.server_cpu_secs / sample.wall_secs,
                sample.cpu_us_per_append(),
                sample.bench_cpu_secs / sample.wall_secs
            );
        }
        println!("cluster / single           {ratio:.2}");
        rounds.push(json!({"single": single.to_json(), "cluster": cluster.to_json(), "ratio": ratio}));
    }
    Ok(json!({
        "scenario": "cluster-write",
        "transport": options.transport,
        "sessions": options.sessions,
        "depth": options.depth,
        "message_bytes": options.message_bytes,
        "seconds": options.seconds,
        "rate": options.rate,
        "shards": options.cluster.shards,
        "nodes": options.cluster.nodes,
        "rounds": rounds,
    }))
}

// ---------------------------------------------------------------------------------------------
// failover
// ---------------------------------------------------------------------------------------------

#[derive(Args, Clone)]
pub struct FailoverOptions {
    /// Leader kills (each followed by a restart and a wait for readiness).
    #[arg(long, default_value_t = 10)]
    pub kills: usize,
    /// The shard whose leader is killed each time.
    #[arg(long, default_value_t = 0)]
    pub shard: u16,
    /// Background load: REST appends/s offered over all nodes and shards.
    #[arg(long, default_value_t = 500)]
    pub load_rate: u64,
    /// Sessions of the background load.
    #[arg(long, default_value_t = 64)]
    pub load_sessions: usize,
    /// The probe starts a write to its session (on the shard) this often, without waiting for
    /// the one before: the resolution of the measurement.
    #[arg(long, default_value_t = 10)]
    pub probe_interval_ms: u64,
    /// Client timeout of each probe write.
    #[arg(long, default_value_t = 1000)]
    pub probe_timeout_ms: u64,
    /// Seconds of steady load before each kill.
    #[arg(long, default_value_t = 1.0)]
    pub steady_secs: f64,
    /// The archive during the kills: `healthy`; `down` (every node cut off it before the first
    /// kill and kept off it, restarts included); `backlog`
    /// (down, and the probed shard first given `--backlog` unarchived messages).
    #[arg(long, value_enum, default_value = "healthy")]
    pub archive: ArchiveMode,
    /// Unarchived messages written to the probed shard before the kills (`--archive backlog`).
    #[arg(long, default_value_t = 100_000)]
    pub backlog: u64,
    #[command(flatten)]
    pub cluster: ClusterSettings,
}

#[derive(Clone, Copy, PartialEq, Eq, Debug, clap::ValueEnum)]
pub enum ArchiveMode {
    Healthy,
    Down,
    Backlog,
}

/// Writes `count` messages to `sessions` (all on one shard) through the live nodes, 32 at a
/// time; returns how long it took.
async fn fill_backlog(
    client: &reqwest::Client,
    bases: &[String],
    sessions: &[String],
    count: u64,
) -> anyhow::Result<Duration> {
    let started = Instant::now();
    let written = Arc::new(AtomicU64::new(0));
    let failed = Arc::new(AtomicU64::new(0));
    let writers: Vec<_> = (0..32usize)
        .map(|w| {
            let (client, written, failed) = (client.clone(), written.clone(), failed.clone());
            let (base, session) = (bases[w % bases.len()].clone(), sessions[w % sessions.len()].clone());
            tokio::spawn(async move {
                let url = format!("{base}/api/sessions/{session}/messages");
                let body = json!({"agent_id": "bench-agent", "content": {"text": "x".repeat(100)}});
                while written.load(Ordering::Relaxed) < count {
                    match post_message(&client, &url, &body, Duration::from_secs(5)).await {
                        Outcome::Ok => {
                            written.fetch_add(1, Ordering::Relaxed);
                        }
                        _ => {
                            if failed.fetch_add(1, Ordering::Relaxed) > 1000 {
                                return;
                            }
                        }
                    }
                }
            })
        })
        .collect();
    for writer in writers {
        writer.await?;
    }
    let written = written.load(Ordering::Relaxed);
    anyhow::ensure!(
        written >= count,
        "the backlog stopped at {written} of {count} messages ({} failed writes)",
        failed.load(Ordering::Relaxed)
    );
    Ok(started.elapsed())
}

#[derive(Clone, Copy, PartialEq, Eq, Hash, Debug)]
enum Outcome {
    Ok,
    NoLeader,
    Overloaded,
    OtherStatus(u16),
    Timeout,
    Connect,
    OtherError,
}

async fn post_message(client: &reqwest::Client, url: &str, body: &Value, timeout: Duration) -> Outcome {
    match client.post(url).json(body).timeout(timeout).send().await {
        Ok(response) if response.status() == 200 => Outcome::Ok,
        Ok(response) => {
            let status = response.status().as_u16();
            let code = match tokio::time::timeout(timeout, response.json::<Value>()).await {
                Ok(Ok(body)) => body["code"].as_str().map(str::to_string),
                _ => None,
            };
            match code.as_deref() {
                Some("no_leader") => Outcome::NoLeader,
                Some("overloaded") => Outcome::Overloaded,
                _ => Outcome::OtherStatus(status),
            }
        }
        Err(error) if error.is_timeout() => Outcome::Timeout,
        Err(error) if error.is_connect() => Outcome::Connect,
        Err(_) => Outcome::OtherError,
    }
}

struct ProbeRecord {
    sent: Instant,
    done: Instant,
    outcome: Outcome,
}

type Shared<T> = Arc<Mutex<T>>;

/// Writes to `session` through the base in `target` every `interval`, each write on its own
/// (open loop), recording every outcome.
fn spawn_probe(
    client: reqwest::Client,
    target: Shared<Option<String>>,
    session: String,
    interval: Duration,
    timeout: Duration,
    records: Shared<Vec<ProbeRecord>>,
    stop: Arc<tokio::sync::Notify>,
) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        let body = Arc::new(json!({"agent_id": "bench-agent", "content": {"text": "probe"}}));
        let mut tick = tokio::time::interval(interval);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
        loop {
            tokio::select! {
                _ = tick.tick() => {}
                () = stop.notified() => return,
            }
            let Some(base) = target.lock().expect("probe target").clone() else {
                continue;
            };
            let (client, body, records) = (client.clone(), body.clone(), records.clone());
            let url = format!("{base}/api/sessions/{session}/messages");
            tokio::spawn(async move {
                let sent = Instant::now();
                let outcome = post_message(&client, &url, &body, timeout).await;
                records.lock().expect("probe records").push(ProbeRecord {
                    sent,
                    done: Instant::now(),
                    outcome,
                });
            });
        }
    })
}

/// The background load: `rate` appends/s over `sessions`, each through a running node in turn.
fn spawn_load(
    client: reqwest::Client,
    live: Shared<Vec<Option<String>>>,
    sessions: Vec<String>,
    rate: u64,
    counts: Shared<std::collections::HashMap<String, u64>>,
    stop: Arc<tokio::sync::Notify>,
) -> Vec<tokio::task::JoinHandle<()>> {
    const WORKERS: usize = 16;
    if rate == 0 || sessions.is_empty() {
        return Vec::new();
    }
    let interval = Duration::from_secs_f64(WORKERS as f64 / rate as f64);
    let sessions = Arc::new(sessions);
    (0..WORKERS)
        .map(|w| {
            let (client, live, sessions, counts, stop) = (
                client.clone(),
                live.clone(),
                sessions.clone(),
                counts.clone(),
                stop.clone(),
            );
            tokio::spawn(async move {
                let body = json!({"agent_id": "bench-agent", "content": {"text": "x".repeat(100)}});
                let mut tick = tokio::time::interval(interval);
                tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
                let mut n = w;
                loop {
                    tokio::select! {
                        _ = tick.tick() => {}
                        () = stop.notified() => return,
                    }
                    n += WORKERS;
                    let base = {
                        let live = live.lock().expect("live nodes");
                        let running: Vec<&String> = live.iter().flatten().collect();
                        if running.is_empty() {
                            continue;
                        }
                        running[n % running.len()].clone()
                    };
                    let session = &sessions[n % sessions.len()];
                    let url = format!("{base}/api/sessions/{session}/messages");
                    let outcome = post_message(&client, &url, &body, Duration::from_secs(2)).await;
                    *counts
                        .lock()
                        .expect("load counts")
                        .entry(format!("{outcome:?}"))
                        .or_default() += 1;
                }
            })
        })
        .collect()
}

/// The leader of `shard` once every running node names the same one (and it names itself).
async fn agreed_leader(
    client: &reqwest::Client,
    cluster: &Cluster,
    shard: u16,
    timeout: Duration,
) -> anyhow::Result<(u64, u64)> {
    let deadline = Instant::now() + timeout;
    loop {
        let mut views = Vec::new();
        for i in 0..cluster.len() {
            if cluster.pid(i).is_none() {
                continue;
            }
            let view = cluster_view(client, cluster.base(i)).await.ok();
            let entry = view.as_ref().map(|v| v["shards"][shard as usize].clone());
            views.push((cluster.node_id(i) as u64, entry));
        }
        let leaders: Vec<Option<u64>> = views
            .iter()
            .map(|(_, e)| e.as_ref().and_then(|e| e["leader"].as_u64()))
            .collect();
        if let Some(Some(leader)) = leaders.first()
            && leaders.iter().all(|l| *l == Some(*leader))
            && views
                .iter()
                .any(|(id, e)| id == leader && e.as_ref().is_some_and(|e| e["role"] == "leader"))
        {
            let term = views
                .iter()
                .find(|(id, _)| id == leader)
                .and_then(|(_, e)| e.as_ref()?["term"].as_u64())
                .unwrap_or(0);
            return Ok((*leader, term));
        }
        if Instant::now() >= deadline {
            bail!("the running nodes do not agree on a leader of shard {shard}: {leaders:?}");
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

fn quantile(sorted: &[f64], q: f64) -> f64 {
    if sorted.is_empty() {
        return 0.0;
    }
    // Nearest rank.
    let rank = ((q * sorted.len() as f64).ceil() as usize).clamp(1, sorted.len());
    sorted[rank - 1]
}

pub async fn failover(options: &FailoverOptions, extra: &str) -> anyhow::Result<Value> {
    anyhow::ensure!(options.shard < options.cluster.shards, "--shard must be below --shards");
    let db = TempDatabase::create(&options.cluster.postgres, "failover").await?;
    let result = async {
        let linked = options.archive != ArchiveMode::Healthy;
        let mut cluster = Cluster::start_linked(&options.cluster, &db.url, extra, linked).await?;
        let result = failover_on(&mut cluster, options).await;
        report_warnings(&cluster);
        cluster.stop().await;
        result
    }
    .await;
    tokio::time::sleep(Duration::from_millis(200)).await;
    db.drop_now().await?;
    result
}

async fn failover_on(cluster: &mut Cluster, options: &FailoverOptions) -> anyhow::Result<Value> {
    let client = reqwest::Client::new();
    let run = std::process::id();
    let probe_session = (0..)
        .map(|n| format!("fo-probe-{run}-{n}"))
        .find(|s| shard_for_session(s, options.cluster.shards) == options.shard)
        .expect("some id lands on the shard");
    let load_sessions: Vec<String> = (0..options.load_sessions)
        .map(|s| format!("fo-load-{run}-{s}"))
        .collect();
    let backlog_sessions: Vec<String> = (0..)
        .map(|n| format!("fo-backlog-{run}-{n}"))
        .filter(|s| shard_for_session(s, options.cluster.shards) == options.shard)
        .take(if options.archive == ArchiveMode::Backlog { 16 } else { 0 })
        .collect();
    let mut all_sessions = load_sessions.clone();
    all_sessions.push(probe_session.clone());
    all_sessions.extend(backlog_sessions.iter().cloned());
    set_up_sessions(&client, &cluster.bases(), &all_sessions).await?;
    if options.archive != ArchiveMode::Healthy {
        for index in 0..cluster.len() {
            cluster.cut_archive(index, true);
        }
    }
    if options.archive == ArchiveMode::Backlog {
        let took = fill_backlog(&client, &cluster.bases(), &backlog_sessions, options.backlog).await?;
        println!(
            "backlog                    {} unarchived messages on shard {} in {:.1} s (archive cut off every node)",
            options.backlog,
            options.shard,
            took.as_secs_f64()
        );
    }

    let live: Shared<Vec<Option<String>>> = Arc::new(Mutex::new(cluster.bases().into_iter().map(Some).collect()));
    let probe_target: Shared<Option<String>> = Arc::new(Mutex::new(None));
    let probe_records: Shared<Vec<ProbeRecord>> = Arc::new(Mutex::new(Vec::new()));
    let load_counts = Arc::new(Mutex::new(std::collections::HashMap::new()));
    let stop = Arc::new(tokio::sync::Notify::new());
    let probe_client = reqwest::Client::builder().pool_max_idle_per_host(256).build()?;
    let probe = spawn_probe(
        probe_client.clone(),
        probe_target.clone(),
        probe_session.clone(),
        Duration::from_millis(options.probe_interval_ms),
        Duration::from_millis(options.probe_timeout_ms),
        probe_records.clone(),
        stop.clone(),
    );
    let load = spawn_load(
        probe_client,
        live.clone(),
        load_sessions,
        options.load_rate,
        load_counts.clone(),
        stop.clone(),
    );

    println!(
        "scenario                   failover ({} nodes, {} shards, archive {:?}, shard {} probed via {}, {} appends/s background over {} sessions, probe every {} ms, timeout {} ms)",
        options.cluster.nodes,
        options.cluster.shards,
        options.archive,
        options.shard,
        probe_session,
        options.load_rate,
        options.load_sessions,
        options.probe_interval_ms,
        options.probe_timeout_ms
    );
    println!(
        "kill  leader(term)  new leader(term)  leader seen ms  writable after ms (sent at)  failed probes meanwhile       restart→ready ms"
    );
    let mut kills = Vec::new();
    let mut recoveries = Vec::new();
    for k in 0..options.kills {
        let (leader, term) = agreed_leader(&client, cluster, options.shard, Duration::from_secs(30)).await?;
        let leader_index = cluster.index_of(leader).context("leader is not a member")?;
        // Probe through a surviving node, alternating between the others.
        let others: Vec<usize> = (0..cluster.len()).filter(|i| *i != leader_index).collect();
        let probe_index = others[k % others.len()];
        *probe_target.lock().expect("probe target") = Some(cluster.base(probe_index).to_string());
        // Steady state: the probe's writes succeed through the chosen node.
        let switched = Instant::now();
        let deadline = switched + Duration::from_secs(30);
        loop {
            let ok = probe_records
                .lock()
                .expect("records")
                .iter()
                .any(|r| r.sent >= switched && r.outcome == Outcome::Ok);
            if ok && switched.elapsed().as_secs_f64() >= options.steady_secs {
                break;
            }
            if Instant::now() >= deadline {
                bail!(
                    "kill {}: probe writes through node {} did not succeed before the kill",
                    k + 1,
                    probe_index + 1
                );
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        live.lock().expect("live")[leader_index] = None;
        let killed_wall = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap_or_default()
            .as_secs_f64();
        let killed_at = cluster.kill(leader_index).await?;
        // When the probe's node first names another leader of the shard (the election part).
        let elected = {
            let (client, base, shard) = (client.clone(), cluster.base(probe_index).to_string(), options.shard);
            tokio::spawn(async move {
                loop {
                    if let Ok(view) = cluster_view(&client, &base).await
                        && let Some(new) = view["shards"][shard as usize]["leader"].as_u64()
                        && new != leader
                    {
                        return Some(killed_at.elapsed());
                    }
                    if killed_at.elapsed() > Duration::from_secs(60) {
                        return None;
                    }
                    tokio::time::sleep(Duration::from_millis(20)).await;
                }
            })
        };
        // The next acknowledged write started after the kill.
        let deadline = killed_at + Duration::from_secs(60);
        let recovered = loop {
            let first_ok = probe_records
                .lock()
                .expect("records")
                .iter()
                .filter(|r| r.sent >= killed_at && r.outcome == Outcome::Ok)
                .map(|r| r.done)
                .min();
            if let Some(done) = first_ok {
                // Writes started before it may still be completing; give them a moment to land
                // so the first success is really the first.
                tokio::time::sleep(Duration::from_millis(options.probe_timeout_ms.min(200))).await;
                let first = probe_records
                    .lock()
                    .expect("records")
                    .iter()
                    .filter(|r| r.sent >= killed_at && r.outcome == Outcome::Ok)
                    .map(|r| (r.done, r.sent))
                    .min()
                    .unwrap_or((done, done));
                break Some((first.0.duration_since(killed_at), first.1.duration_since(killed_at)));
            }
            if Instant::now() >= deadline {
                break None;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        };
        let recovery_ms = recovered.map(|(d, _)| d.as_secs_f64() * 1000.0);
        let first_ok_sent_ms = recovered.map(|(_, sent)| sent.as_secs_f64() * 1000.0);
        let recovered = recovered.map(|(d, _)| d);
        let elected_ms = elected.await.ok().flatten().map(|d| d.as_secs_f64() * 1000.0);
        let mut failures: std::collections::BTreeMap<String, u64> = std::collections::BTreeMap::new();
        {
            let records = probe_records.lock().expect("records");
            let until = recovered.map_or(Instant::now(), |d| killed_at + d);
            for r in records
                .iter()
                .filter(|r| r.sent >= killed_at && r.done <= until && r.outcome != Outcome::Ok)
            {
                *failures.entry(format!("{:?}", r.outcome)).or_default() += 1;
            }
        }
        let (new_leader, new_term) = agreed_leader(&client, cluster, options.shard, Duration::from_secs(30))
            .await
            .map(|(l, t)| (Some(l), Some(t)))
            .unwrap_or((None, None));
        let restart_started = Instant::now();
        // With the archive down the node restarts without it too (a member that took part
        // starts from its log and the leaders' copies of the shards' states).
        cluster.restart(leader_index).await?;
        // The others report the archive down (as they should); they serve.
        let tolerated: &[&str] = if options.archive == ArchiveMode::Healthy {
            &[]
        } else {
            &["archive"]
        };
        cluster.wait_all_ready_but(START_TIMEOUT, tolerated).await?;
        let restart_ms = restart_started.elapsed().as_secs_f64() * 1000.0;
        live.lock().expect("live")[leader_index] = Some(cluster.base(leader_index).to_string());
        let failures_text = failures
            .iter()
            .map(|(k, v)| format!("{k} {v}"))
            .collect::<Vec<_>>()
            .join(", ");
        println!(
            "{:>4}  {:>6}({:>3})   {:>9}({:>4})   {:>14}  {:>26}  {:<29} {:>8.0}",
            k + 1,
            leader,
            term,
            new_leader.map_or("?".into(), |l| l.to_string()),
            new_term.map_or("?".into(), |t| t.to_string()),
            elected_ms.map_or("?".into(), |ms| format!("{ms:.0}")),
            match (recovery_ms, first_ok_sent_ms) {
                (Some(ms), Some(sent)) => format!("{ms:.0} ({sent:.0})"),
                _ => "none in 60 s".into(),
            },
            if failures_text.is_empty() {
                "-".into()
            } else {
                failures_text
            },
            restart_ms
        );
        if let Some(ms) = recovery_ms {
            recoveries.push(ms);
        }
        kills.push(json!({
            "killed_at_unix_secs": killed_wall,
            "leader": leader, "term": term, "new_leader": new_leader, "new_term": new_term,
            "writable_after_ms": recovery_ms, "first_ok_sent_after_ms": first_ok_sent_ms,
            "new_leader_seen_after_ms": elected_ms,
            "failed_probes": failures, "restart_to_ready_ms": restart_ms,
        }));
    }
    stop.notify_waiters();
    probe.abort();
    for task in load {
        task.abort();
    }
    let unrecovered = options.kills - recoveries.len();
    recoveries.sort_by(f64::total_cmp);
    let (p50, p99, max) = (
        quantile(&recoveries, 0.5),
        quantile(&recoveries, 0.99),
        recoveries.last().copied().unwrap_or(0.0),
    );
    println!(
        "writable again after kill  p50 {p50:.0} ms, p99 {p99:.0} ms, max {max:.0} ms over {} kills{}",
        recoveries.len(),
        if unrecovered > 0 {
            format!(" ({unrecovered} never writable within 60 s)")
        } else {
            String::new()
        }
    );
    let counts = load_counts.lock().expect("counts").clone();
    let mut counts_sorted: Vec<_> = counts.iter().collect();
    counts_sorted.sort();
    println!(
        "background load outcomes   {}",
        counts_sorted
            .iter()
            .map(|(k, v)| format!("{k} {v}"))
            .collect::<Vec<_>>()
            .join(", ")
    );
    Ok(json!({
        "scenario": "failover",
        "archive": format!("{:?}", options.archive).to_lowercase(),
        "backlog": (options.archive == ArchiveMode::Backlog).then_some(options.backlog),
        "nodes": options.cluster.nodes,
        "shards": options.cluster.shards,
        "shard": options.shard,
        "election_timeout_ms": options.cluster.election_timeout_ms,
        "load_rate": options.load_rate,
        "probe_interval_ms": options.probe_interval_ms,
        "probe_timeout_ms": options.probe_timeout_ms,
        "kills": kills,
        "writable_after_ms": {"p50": p50, "p99": p99, "max": max},
        "unrecovered": unrecovered,
        "background_outcomes": counts,
    }))
}

// ---------------------------------------------------------------------------------------------
// cluster-idle
// ---------------------------------------------------------------------------------------------

#[derive(Args, Clone)]
pub struct ClusterIdleOptions {
    /// Seconds to let the nodes settle after they are ready.
    #[arg(long, default_value_t = 10)]
    pub settle_secs: u64,
    /// Seconds over which CPU time is sampled.
    #[arg(long, default_value_t = 20)]
    pub seconds: u64,
    #[command(flatten)]
    pub cluster: ClusterSettings,
}

struct IdleSample {
    cpu_percent: f64,
    rss_bytes: u64,
    threads: u64,
}

/// CPU (percent of one core) and RSS of each pid over `seconds`.
async fn sample_idle(pids: &[u32], seconds: u64) -> anyhow::Result<Vec<IdleSample>> {
    let ticks = clock_ticks_per_second();
    let before: Vec<(u64, u64, u64)> = pids.iter().map(|p| proc_sample(*p)).collect::<Result<_, _>>()?;
    let started = Instant::now();
    tokio::time::sleep(Duration::from_secs(seconds)).await;
    let elapsed = started.elapsed().as_secs_f64();
    let after: Vec<(u64, u64, u64)> = pids.iter().map(|p| proc_sample(*p)).collect::<Result<_, _>>()?;
    Ok(before
        .iter()
        .zip(after)
        .map(|(b, a)| IdleSample {
            cpu_percent: (a.0 - b.0) as f64 / ticks / elapsed * 100.0,
            rss_bytes: a.1,
            threads: a.2,
        })
        .collect())
}

fn print_idle(name: &str, samples: &[IdleSample]) -> Value {
    let mut rows = Vec::new();
    for (i, s) in samples.iter().enumerate() {
        println!(
            "{:<27}{:>8.2}   {:>9.1}   {:>7}",
            format!("{name} {}", i + 1),
            s.cpu_percent,
            s.rss_bytes as f64 / 1048576.0,
            s.threads
        );
        rows.push(json!({"cpu_percent": s.cpu_percent, "rss_bytes": s.rss_bytes, "threads": s.threads}));
    }
    let cpu: f64 = samples.iter().map(|s| s.cpu_percent).sum();
    let rss: u64 = samples.iter().map(|s| s.rss_bytes).sum();
    if samples.len() > 1 {
        println!(
            "{:<27}{cpu:>8.2}   {:>9.1}",
            format!("{name} total"),
            rss as f64 / 1048576.0
        );
    }
    json!({"processes": rows, "cpu_percent_total": cpu, "rss_bytes_total": rss})
}

pub async fn cluster_idle(options: &ClusterIdleOptions, extra: &str) -> anyhow::Result<Value> {
    println!(
        "scenario                   cluster-idle ({} nodes vs 1, {} shards, Postgres archive; settle {} s, sample {} s)",
        options.cluster.nodes, options.cluster.shards, options.settle_secs, options.seconds
    );
    let db = TempDatabase::create(&options.cluster.postgres, "idle").await?;
    let cluster_samples = async {
        let mut cluster = Cluster::start(&options.cluster, &db.url, extra).await?;
        // The steady state: leadership spread (hand-overs are not idle work), then settled.
        match cluster.wait_leadership_even(Duration::from_secs(60)).await {
            Ok(settled) => println!("leadership                 even after {:.1} s", settled.as_secs_f64()),
            Err(seen) => println!("leadership                 {seen}"),
        }
        tokio::time::sleep(Duration::from_secs(options.settle_secs)).await;
        let pids: Vec<u32> = (0..cluster.len())
            .map(|i| cluster.pid(i).context("node pid"))
            .collect::<Result<_, _>>()?;
        let samples = sample_idle(&pids, options.seconds).await;
        report_warnings(&cluster);
        cluster.stop().await;
        samples
    }
    .await;
    tokio::time::sleep(Duration::from_millis(200)).await;
    db.drop_now().await?;
    let cluster_samples = cluster_samples?;

    let db = TempDatabase::create(&options.cluster.postgres, "idle_single").await?;
    let single_samples = async {
        let args = format!("--database-url {} --shards {} {extra}", db.url, options.cluster.shards);
        let server = Target::spawn(&args).await?;
        wait_ready(&reqwest::Client::new(), &server.base, START_TIMEOUT).await?;
        tokio::time::sleep(Duration::from_secs(options.settle_secs)).await;
        let pid = server.pid().context("single node pid")?;
        let samples = sample_idle(&[pid], options.seconds).await;
        drop(server);
        samples
    }
    .await;
    tokio::time::sleep(Duration::from_millis(200)).await;
    db.drop_now().await?;
    let single_samples = single_samples?;

    println!("                           CPU %      RSS MiB   threads");
    let cluster_json = print_idle("cluster node", &cluster_samples);
    let single_json = print_idle("single node", &single_samples);
    Ok(json!({
        "scenario": "cluster-idle",
        "nodes": options.cluster.nodes,
        "shards": options.cluster.shards,
        "seconds": options.seconds,
        "cluster": cluster_json,
        "single": single_json,
    }))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nearest_rank_quantiles() {
        let values: Vec<f64> = (1..=10).map(f64::from).collect();
        assert_eq!(quantile(&values, 0.5), 5.0);
        assert_eq!(quantile(&values, 0.99), 10.0);
        assert_eq!(quantile(&[], 0.5), 0.0);
    }

    #[test]
    fn shard_for_session_matches_the_server() {
        // Same function as src/ids.rs; pins a few values so a change of hash is noticed.
        let shards: Vec<u16> = ["a", "session-1", "fo-probe-1-0"]
            .iter()
            .map(|s| shard_for_session(s, 64))
            .collect();
        assert!(shards.iter().all(|s| *s < 64));
        assert_eq!(shard_for_session("a", 1), 0);
        // xxh3_64("") = 0x2D06800538D394C2.
        assert_eq!(shard_for_session("", 64), 2);
    }
}
