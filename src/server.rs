//! Wiring: data directory (lock, layout), WAL, archive, shard writers, flushers, HTTP server,
//! and the orderly shutdown.
//!
//! Architecture invariant: startup and shutdown order lives here and only here.

use std::fs::{self, File};
use std::future::IntoFuture;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use anyhow::{Context, bail};
use serde::{Deserialize, Serialize};
use tokio::sync::{Notify, mpsc, watch};
use tokio::task::JoinHandle;
use tokio::time::Instant;

use crate::api::{self, AppState};
use crate::archive::{Archive, Flusher, FlusherOptions};
use crate::archive_at_start::{
    check_archive_later, connect_postgres_once, connect_postgres_waiting, describe_postgres_url,
};
use crate::auth::AuthMode;
use crate::clock::{Clock, SystemClock};
use crate::config::{Config, DEFAULT_SHARDS};
use crate::shard::writer::{ClusterFeed, Command, ShardWriter};
use crate::shard::{ShardState, Shards, Writer};
use crate::supervisor::{Ended, supervise};
use crate::wal::{Wal, WalOptions};

/// Commands that may wait for one shard writer.
const SHARD_QUEUE_DEPTH: usize = 4096;
const SWEEP_INTERVAL: Duration = Duration::from_secs(30);

/// What a data directory records about itself at creation.
#[derive(Serialize, Deserialize)]
struct DataDirLayout {
    format: u32,
    shards: u16,
    /// `sqlite` or `postgres`: the WAL's watermarks belong to that archive. Absent in
    /// directories made before it was recorded (then recorded at the next start).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    archive: Option<String>,
    /// The cluster member id the directory belongs to (its log is that member's replica of
    /// the cluster's logs); absent for a single node.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    node_id: Option<u64>,
    /// The cluster the member took part in (`consensus::identity`), written once it holds the
    /// log; absent for a single node and for a member that never held it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    cluster_id: Option<String>,
}

pub struct RunningServer {
    pub local_addr: SocketAddr,
    pub archive_description: String,
    shutdown: watch::Sender<bool>,
    progress: ShutdownProgress,
    task: JoinHandle<anyhow::Result<()>>,
}

/// Which step of the orderly shutdown runs now, for whoever must say why it did not finish.
#[derive(Clone)]
pub struct ShutdownProgress(Arc<std::sync::Mutex<&'static str>>);

impl ShutdownProgress {
    fn new() -> ShutdownProgress {
        ShutdownProgress(Arc::new(std::sync::Mutex::new("not stopping")))
    }

    fn set(&self, step: &'static str) {
        *self.0.lock().unwrap_or_else(std::sync::PoisonError::into_inner) = step;
    }

    pub fn current(&self) -> &'static str {
        *self.0.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Whether the orderly shutdown ran to its end (the process is exiting).
    pub fn finished(&self) -> bool {
        self.current() == STOPPED
    }
}

const STOPPED: &str = "stopped";

impl RunningServer {
    /// Asks the server to drain and stop, and waits until it has.
    pub async fn shutdown(self) -> anyhow::Result<()> {
        let _ = self.shutdown.send(true);
        self.task.await.context("server task panicked")?
    }

    /// A handle that triggers shutdown from elsewhere (signal handlers).
    pub fn shutdown_trigger(&self) -> watch::Sender<bool> {
        self.shutdown.clone()
    }

    /// The step the orderly shutdown is at.
    pub fn shutdown_progress(&self) -> ShutdownProgress {
        self.progress.clone()
    }

    pub async fn wait(self) -> anyhow::Result<()> {
        self.task.await.context("server task panicked")?
    }
}

/// Logs what opening the WAL found: torn tails (expected after a crash) and damage (never).
fn log_wal_recovery(reports: &[crate::wal::LaneReport]) {
    for report in reports {
        if let Some((segment_no, offset)) = report.torn_tail {
            tracing::info!(lane = %report.lane_dir.display(), segment_no, offset, "wal: a torn write (never acknowledged) was discarded");
        }
        for damage in &report.damage {
            metrics::counter!("fleetlm_wal_damage_found_total").increment(1);
            tracing::error!(
                lane = %report.lane_dir.display(),
                segment_no = damage.segment_no,
                offset = damage.offset,
                len = damage.len,
                detail = %damage.detail,
                "wal: damaged bytes found; see `fleetlm wal inspect`"
            );
        }
    }
}

/// Opens everything and starts serving; returns once the listener is bound.
pub async fn start(config: Config) -> anyhow::Result<RunningServer> {
    let config = Arc::new(config);
    fs::create_dir_all(&config.data_dir)
        .with_context(|| format!("cannot create data directory {}", config.data_dir.display()))?;
    let lock = lock_data_dir(&config.data_dir)?;
    let archive_kind = if config.database_url.is_some() {
        "postgres"
    } else {
        "sqlite"
    };
    let node_id = config.cluster.as_ref().map(|cluster| cluster.node_id);
    let (shard_count, recorded_cluster_id) =
        read_or_create_layout(&config.data_dir, config.shards, archive_kind, node_id)?;

    let wal_dir = config.data_dir.join("wal");
    let wal_lanes = wal_lanes_for(&wal_dir, config.wal_lanes)?;
    let wal_options = WalOptions {
        lanes: wal_lanes,
        shard_count,
        segment_bytes: config.wal_segment_bytes,
        max_batch_bytes: config.wal_max_batch_bytes(),
        queue_depth: SHARD_QUEUE_DEPTH,
    };
    let wal_options_again = wal_options.clone();
    let (wal, lane_reports) = tokio::task::spawn_blocking(move || Wal::open(&wal_dir, wal_options))
        .await?
        .context("cannot open the write-ahead log")?;
    log_wal_recovery(&lane_reports);
    // A member's damaged shard logs are cut back and refetched from its peers, not kept down.
    let (wal, _lane_reports) = match &config.cluster {
        Some(_) => {
            let wal_dir = config.data_dir.join("wal");
            let state_dir = config.data_dir.join("consensus");
            crate::consensus::refetch::prepare(wal, lane_reports, &wal_dir, wal_options_again, &state_dir)
                .await
                .map_err(|reason| anyhow::anyhow!(reason))?
        }
        None => (wal, lane_reports),
    };
    let wal = Arc::new(wal);

    // A cluster member that has taken part (its data directory names the cluster, its log is
    // not empty) starts without the archive if it is unreachable: it serves from its log and
    // its peers, and uses the archive once it has checked it is its cluster's.
    let member_with_a_log = config.cluster.is_some()
        && recorded_cluster_id.is_some()
        && !crate::consensus::Consensus::holds_nothing(&wal)
            .map_err(|e| anyhow::anyhow!("cannot read the consensus state: {e}"))?;
    let mut archive_checked_later = false;
    let archive = match &config.database_url {
        Some(url) if member_with_a_log => match connect_postgres_once(url).await? {
            Some(archive) => archive,
            None => {
                archive_checked_later = true;
                tracing::warn!(
                    archive = %describe_postgres_url(url),
                    "the Postgres archive is unreachable; this member starts without it and uses it once it answers and is checked"
                );
                Archive::connect_postgres_lazily(url, false)
                    .map_err(|e| anyhow::anyhow!("cannot use the Postgres archive: {e}"))?
            }
        },
        Some(url) => connect_postgres_waiting(url).await?,
        None => {
            let archive = Archive::open_sqlite(&config.data_dir.join("archive.sqlite3"))
                .context("cannot open the SQLite archive")?;
            archive.migrate().await.context("archive migration failed")?;
            archive
        }
    };
    let archive_description = match &config.database_url {
        Some(_) => "postgres".to_string(),
        None => format!("sqlite at {}", config.data_dir.join("archive.sqlite3").display()),
    };

    let clock: Arc<dyn Clock> = Arc::new(SystemClock);
    let (shutdown_sender, shutdown) = watch::channel(false);
    let hub = crate::hub::Hub::new(shard_count);
    let (user_messages, engine_inbox) = crate::agents::channel();

    // Cluster mode: every shard's consensus group, and its committed log for its writer.
    let (consensus, mut feeds) = match &config.cluster {
        Some(cluster) => {
            if archive_checked_later {
                let url = config.database_url.clone().expect("a member's archive is Postgres");
                check_archive_later(
                    url,
                    archive.clone(),
                    wal.clone(),
                    cluster.node_id,
                    recorded_cluster_id.clone(),
                    config.data_dir.clone(),
                );
            } else {
                crate::cluster_identity::check_at_start(
                    &archive,
                    &wal,
                    cluster.node_id,
                    recorded_cluster_id.as_deref(),
                    &config.data_dir,
                )
                .await?;
            }
            let records = Arc::new(crate::cluster_identity::ArchiveRecords(archive.clone()));
            let (consensus, feeds) = start_consensus(cluster, wal.clone(), &config.data_dir, records).await?;
            (Some(consensus), feeds.into_iter().map(Some).collect())
        }
        None => (None, Vec::new()),
    };
    // Cluster mode: writers whose copy of their shard's state is not current ask for the
    // leader's (`shard::copy_transfer`).
    let (copy_requests, copy_service_requests) = tokio::sync::mpsc::unbounded_channel::<u16>();
    let mut archived_through = Vec::new();
    let mut senders = Vec::with_capacity(shard_count as usize);
    let mut writer_states = Vec::with_capacity(shard_count as usize);
    let mut writer_tasks = Vec::with_capacity(shard_count as usize);
    let flush_wakeup = Arc::new(Notify::new());
    for shard in 0..shard_count {
        let (sender, receiver) = mpsc::channel::<Command>(SHARD_QUEUE_DEPTH);
        let writer_state = Arc::new(Writer::default());
        let (wal, archive, clock, flush_wakeup, hub, user_messages) = (
            wal.clone(),
            archive.clone(),
            clock.clone(),
            flush_wakeup.clone(),
            hub.clone(),
            user_messages.clone(),
        );
        let (config, consensus_link, state) = (config.clone(), consensus.clone(), writer_state.clone());
        let copy_requests = copy_requests.clone();
        // A fresh writer, as at start; a restarted one also refuses archive reads begun before.
        let make_writer = move || {
            state.epoch.fetch_add(1, Ordering::AcqRel);
            ShardWriter {
                shard,
                wal: wal.clone(),
                archive: archive.clone(),
                clock: clock.clone(),
                state: ShardState::new(0),
                refusal: None,
                refused_for_lane: false,
                rebuild_cause: None,
                losses: Vec::new(),
                max_op_bytes: wal.max_entry_bytes() / 2,
                last_inserted_at: 0,
                flush_wakeup: flush_wakeup.clone(),
                flush_threshold_bytes: config.flush_threshold_bytes,
                unflushed_bytes: 0,
                wal_budget_bytes: config.wal_budget_bytes,
                entry_soft_limit_bytes: wal.max_entry_bytes() / 2,
                writer_state: state.clone(),
                hub: hub.clone(),
                user_messages: user_messages.clone(),
                cluster: consensus_link.as_ref().map(|consensus| {
                    crate::shard::replica::ClusterLink::new(consensus.clone(), Some(copy_requests.clone()))
                }),
            }
        };
        let feed = match (&consensus, feeds.get_mut(shard as usize).and_then(Option::take)) {
            (Some(consensus), Some(feed)) => {
                archived_through.push(feed.archived_through.clone());
                Some(ClusterFeed {
                    applied: feed.applied,
                    watch: consensus.watch(shard),
                    progress: Default::default(),
                })
            }
            _ => None,
        };
        let (mut commands, mut feed) = (receiver, feed);
        // The queue and the feed outlive a writer that panics: the next one serves them.
        writer_tasks.push(tokio::spawn(supervise(
            "shard_writer",
            format!("shard_writer/{shard}"),
            None,
            async move || {
                make_writer().run(&mut commands, &mut feed).await;
                if commands.is_closed() {
                    Ended::Finished
                } else {
                    Ended::Stopped
                }
            },
        )));
        senders.push(sender);
        writer_states.push(writer_state);
    }
    let flush_cluster = consensus
        .as_ref()
        .map(|consensus| (consensus.clone(), archived_through));
    let (flusher_wal, flusher_archive, flusher_commands) = (wal.clone(), archive.clone(), senders.clone());
    let (flusher_writers, flush_interval) = (writer_states.clone(), config.flush_interval);
    // A fresh flusher resumes from the archive's watermarks, as at start.
    let make_flusher = move || Flusher {
        wal: flusher_wal.clone(),
        archive: flusher_archive.clone(),
        shard_commands: flusher_commands.clone(),
        wakeup: flush_wakeup.clone(),
        cluster: flush_cluster
            .as_ref()
            .map(|(consensus, archived_through)| crate::archive::FlushCluster {
                consensus: consensus.clone(),
                archived_through: archived_through.clone(),
                writers: flusher_writers.clone(),
            }),
        options: FlusherOptions {
            interval: flush_interval,
            max_entries_per_shard: 512,
            max_backoff: Duration::from_secs(5),
        },
    };
    let flusher_shutdown = shutdown.clone();
    let flusher_task = tokio::spawn(supervise(
        "flusher",
        "flusher".into(),
        Some(shutdown.clone()),
        async move || {
            make_flusher().run(flusher_shutdown.clone()).await;
            finished_if_stopping(&flusher_shutdown)
        },
    ));
    let routing = consensus
        .as_ref()
        .map(|consensus| crate::shard::routing::ClusterRouting {
            consensus: consensus.clone(),
            leader_patience: leader_patience(&config),
        });
    let shards = Shards::new(senders, writer_states, wal.clone(), archive.clone(), routing);
    if consensus.is_some() {
        crate::shard::spawn_copy_service(shards.clone(), copy_service_requests);
    }
    let registry = Arc::new(match crate::agents::AgentRegistry::load(&archive).await {
        Ok(registry) => registry,
        // Loaded by the cluster's agent refresh once the archive answers; dispatches wait.
        Err(crate::archive::ArchiveError::Unavailable(_)) if archive_checked_later => {
            crate::agents::AgentRegistry::not_loaded()
        }
        Err(error) => return Err(anyhow::anyhow!(error).context("cannot load the agents")),
    });
    let streams = Arc::new(crate::agents::LiveStreams::new(hub.clone()));
    if let Some(consensus) = &consensus {
        consensus.serve_app(Arc::new(crate::cluster::NodeService {
            engine: engine_inbox.handle(),
            shards: shards.clone(),
            hub: hub.clone(),
            registry: registry.clone(),
            streams: streams.clone(),
            consensus: Arc::downgrade(consensus),
        }));
        crate::cluster::start_relay(consensus.clone(), &hub, &registry);
        crate::cluster::start_agent_refresh(registry.clone(), archive.clone());
    }
    let recent_dispatches = Arc::new(crate::agents::RecentDispatches::default());
    let file_access = Arc::new(crate::file_urls::FileAccess::new(
        match &config.cluster {
            Some(cluster) => crate::file_urls::FileUrlSigner::from_cluster_secret(&cluster.secret),
            None => crate::file_urls::FileUrlSigner::random(),
        },
        config.public_url.clone(),
    ));
    let engine_context = Arc::new(crate::agents::EngineContext {
        shards: shards.clone(),
        registry: registry.clone(),
        streams: streams.clone(),
        hub: hub.clone(),
        http: crate::agents::http::WebhookClients::new(&config.agent_ca_certificates)
            .context("cannot build the webhook HTTP clients")?,
        config: crate::agents::EngineConfig {
            max_attempts: config.agent_max_attempts,
            dispatch_deadline: config.dispatch_deadline,
            max_in_flight_per_agent: config.agent_max_in_flight,
            max_in_flight: config.max_dispatches_in_flight,
            max_reply_line_bytes: 1024 * 1024,
            max_reply_bytes: config.agent_max_reply_bytes,
        },
        shards_limits: crate::agents::MessageLimits {
            max_message_bytes: config.max_message_bytes,
            max_metadata_depth: config.max_metadata_depth,
        },
        recent: recent_dispatches.clone(),
        clock: clock.clone(),
        files: file_access.clone(),
    });
    let engine = engine_inbox.handle();
    crate::agents::Engine::start(engine_context, engine_inbox, shutdown.clone());
    let (sweep_shards, session_idle, sweep_shutdown) = (shards.clone(), config.session_idle, shutdown.clone());
    let sweeper = tokio::spawn(supervise(
        "sweeper",
        "sweeper".into(),
        Some(shutdown.clone()),
        async move || {
            sweep(sweep_shards.clone(), session_idle, sweep_shutdown.clone()).await;
            finished_if_stopping(&sweep_shutdown)
        },
    ));

    let auth = match &config.auth_secret {
        Some(secret) => AuthMode::Token {
            rules: Box::new(crate::auth::TokenRules::new(
                secret.as_bytes(),
                config.jwt_audience.as_deref(),
                config.jwt_issuer.as_deref(),
            )),
            api_key: config.api_key.clone(),
        },
        None => AuthMode::Open,
    };
    let draining = Arc::new(AtomicBool::new(false));
    let sockets: Arc<crate::gateway::SocketCounts> = Arc::default();
    let open_sockets = sockets.clone();
    let state = Arc::new(AppState {
        shards,
        config: config.clone(),
        auth,
        metrics: crate::metrics::prometheus(),
        draining: draining.clone(),
        clock,
        hub,
        registry,
        streams,
        engine,
        recent_dispatches,
        sockets,
        shutdown: shutdown.clone(),
        consensus: consensus.clone(),
        catch_up: consensus.as_ref().map(|consensus| {
            let catch_up = Arc::new(crate::cluster::CatchUp::default());
            catch_up.start(consensus.clone());
            catch_up
        }),
        archive_outage: Default::default(),
        files: file_access.clone(),
    });
    let listener = tokio::net::TcpListener::bind(config.http_addr)
        .await
        .with_context(|| format!("cannot listen on {}", config.http_addr))?;
    let local_addr = listener.local_addr()?;
    file_access.learn_bound_address(local_addr);
    // Replies and pushes are small frames that must leave at once, not wait for Nagle.
    let listener = axum::serve::ListenerExt::tap_io(listener, |stream| {
        if let Err(error) = stream.set_nodelay(true) {
            tracing::debug!(%error, "could not set TCP_NODELAY");
        }
    });
    let app = api::router(state);

    // A wiped member refuses to take part: the node stops with the reason.
    let refusal = Arc::new(std::sync::Mutex::new(None::<String>));
    if let Some(member) = &consensus {
        let (consensus, refused, trigger) = (member.clone(), refusal.clone(), shutdown_sender.clone());
        tokio::spawn(async move {
            if let Err(reason) = consensus.formed().await {
                *refused.lock().expect("refusal lock") = Some(reason);
                let _ = trigger.send(true);
            }
        });
        // Once it holds the log, the member records the cluster's id in its data directory.
        if recorded_cluster_id.is_none() {
            let (consensus, refused, trigger) = (member.clone(), refusal.clone(), shutdown_sender.clone());
            let (archive, data_dir, stop) = (archive.clone(), config.data_dir.clone(), shutdown.clone());
            tokio::spawn(async move {
                let persist = |id: &str| record_cluster_id(&data_dir, id);
                if let Some(reason) =
                    crate::cluster_identity::persist_once_joined(consensus, archive, persist, stop).await
                {
                    tracing::error!(%reason, "refusing to take part in the cluster");
                    *refused.lock().expect("refusal lock") = Some(reason);
                    let _ = trigger.send(true);
                }
            });
        }
    }
    let mut http_shutdown = shutdown.clone();
    let mut stop_requested = shutdown.clone();
    let shutdown_deadline = config.shutdown_deadline;
    let handing_off = consensus.clone();
    let progress = ShutdownProgress::new();
    let step = progress.clone();
    let task = tokio::spawn(async move {
        let serve = axum::serve(listener, app)
            .with_graceful_shutdown(async move {
                let _ = http_shutdown.wait_for(|stop| *stop).await;
                // A cluster member first hands its shards to other members, so their clients
                // wait for no election; its requests in flight still reach the new leaders.
                if let Some(consensus) = &handing_off {
                    let still_led = consensus.hand_off_leadership(HAND_OFF_WAIT).await;
                    if still_led > 0 {
                        tracing::warn!(still_led, "some shards could not hand their leadership over");
                    }
                }
                draining.store(true, Ordering::Release);
            })
            .into_future();
        tokio::pin!(serve);
        // The whole orderly shutdown, from the request to stop, gets `shutdown_deadline`: a
        // request or socket that never ends, a flush that cannot finish, a stuck disk are cut
        // off there. Exiting is safe: every acknowledged entry is in the WAL already.
        let deadline = tokio::select! {
            served = &mut serve => {
                served.context("http server failed")?;
                Instant::now() + shutdown_deadline
            }
            () = async { drop(stop_requested.wait_for(|stop| *stop).await) } => {
                let deadline = Instant::now() + shutdown_deadline;
                step.set("draining requests in flight");
                match tokio::time::timeout_at(deadline, &mut serve).await {
                    Ok(served) => served.context("http server failed")?,
                    Err(_) => tracing::warn!("requests still in flight at the shutdown deadline were cut off"),
                }
                deadline
            }
        };
        // Upgraded sockets are not the HTTP server's to wait for: each answers the sends it
        // took, then closes with 1012; the process exits only after that (bounded).
        step.set("closing sockets");
        let sockets_wait = SOCKETS_CLOSE_WAIT.min(deadline.saturating_duration_since(Instant::now()));
        if !open_sockets.wait_until_all_closed(sockets_wait).await {
            tracing::warn!("some sockets did not close within the deadline");
        }
        // Requests in flight have been answered; the flusher now makes its last pass.
        step.set("final archive flush");
        let mut flusher_task = flusher_task;
        let flushed = tokio::time::timeout_at(deadline, &mut flusher_task).await.is_ok();
        if !flushed {
            flusher_task.abort();
        }
        log_unarchived(&wal, flushed, consensus.is_some());
        sweeper.abort();
        for task in writer_tasks {
            task.abort();
        }
        // Closing gets a moment past the deadline even when the steps above used it all up.
        let closing_deadline = deadline.max(Instant::now()) + CLOSING_GRACE;
        if let Some(consensus) = &consensus {
            step.set("stopping the cluster member");
            if tokio::time::timeout_at(closing_deadline, consensus.shutdown())
                .await
                .is_err()
            {
                tracing::warn!("the cluster member did not stop in time; its peers see it gone");
            }
        }
        drop(consensus);
        step.set("closing the wal");
        match Arc::try_unwrap(wal) {
            Ok(wal) => {
                let closing = tokio::task::spawn_blocking(move || wal.shutdown());
                match tokio::time::timeout_at(closing_deadline, closing).await {
                    Ok(closed) => closed?,
                    Err(_) => tracing::warn!(
                        "the wal's lanes did not stop in time (a stuck disk?); every acknowledged entry was synced before its ack"
                    ),
                }
            }
            Err(_) => tracing::debug!("wal still referenced at shutdown; its threads stop with the process"),
        }
        drop(lock);
        step.set(STOPPED);
        if let Some(reason) = refusal.lock().expect("refusal lock").take() {
            bail!("{reason}");
        }
        Ok(())
    });
    Ok(RunningServer {
        local_addr,
        archive_description,
        shutdown: shutdown_sender,
        progress,
        task,
    })
}

/// How long a draining cluster member waits for its shards' leadership to move.
const HAND_OFF_WAIT: Duration = Duration::from_secs(5);

/// How long a request waits for its shard to have a leader before `503 no_leader`: a few
/// election timeouts, so a failover is waited out and a lost quorum is answered quickly.
fn leader_patience(config: &Config) -> Duration {
    config.cluster.as_ref().map_or(Duration::ZERO, |cluster| {
        (cluster.election_timeout * 4).max(Duration::from_secs(1))
    })
}

/// Starts this node's consensus groups (one per shard) and its peer listener.
async fn start_consensus(
    cluster: &crate::config::ClusterConfig,
    wal: Arc<Wal>,
    data_dir: &Path,
    records: Arc<crate::cluster_identity::ArchiveRecords>,
) -> anyhow::Result<(Arc<crate::consensus::Consensus>, Vec<crate::consensus::ShardFeed>)> {
    let election = cluster.election_timeout;
    let spec = crate::consensus::ClusterSpec {
        node_id: cluster.node_id,
        peers: cluster.peers.clone(),
        secret: cluster.secret.clone(),
        listen: cluster.peer_listen_addr,
        timing: crate::consensus::Timing {
            heartbeat: election / 5,
            // Followers refuse votes until election_max has passed since the last heartbeat
            // (the leader's lease), so a member first stands just after it (`pacemaker`):
            // failover takes about election_max plus an election round.
            election_min: election,
            election_max: election * 3 / 2,
        },
    };
    let (consensus, feeds) = crate::consensus::Consensus::start(
        &spec,
        wal,
        &data_dir.join("consensus"),
        Some(records as Arc<dyn crate::consensus::identity::IdentityRecords>),
    )
    .await
    .map_err(|reason| anyhow::anyhow!("cannot start the cluster member: {reason}"))?;
    let consensus = Arc::new(consensus);
    if let Some(every) = cluster.leader_balance_every {
        consensus.start_balancing(every);
    }
    Ok((consensus, feeds))
}

/// How long shutdown waits for sockets to answer their sends and close (each gives its sends
/// 5 s and its close frame 2 s).
const SOCKETS_CLOSE_WAIT: Duration = Duration::from_secs(8);

/// How long past the shutdown deadline stopping the cluster member and the WAL may take.
const CLOSING_GRACE: Duration = Duration::from_secs(1);

/// Says, as the server stops, what the archive does not have yet: the WAL keeps it and the
/// archive gets it at the next start. A single node's flusher deletes what it archived from the
/// WAL at once, so what the WAL still holds is what is not archived; a cluster member keeps
/// archived entries until its snapshot, so it can only say whether the last flush finished.
fn log_unarchived(wal: &Wal, flush_finished: bool, cluster: bool) {
    if cluster {
        if !flush_finished {
            tracing::warn!(
                "the final archive flush did not finish within the shutdown deadline; the replicated log keeps the rest"
            );
        }
        return;
    }
    let pending: Vec<String> = (0..wal.shard_count())
        .filter_map(|shard| {
            let last = wal.last_log_id(shard)?.index;
            let archived = wal.purged(shard).map_or(0, |id| id.index);
            (last > archived).then(|| format!("{shard} ({} entries)", last - archived))
        })
        .collect();
    if flush_finished && pending.is_empty() {
        return;
    }
    let unarchived = if pending.is_empty() {
        "none".to_string()
    } else {
        pending.join(", ")
    };
    tracing::warn!(
        final_flush = if flush_finished {
            "ended"
        } else {
            "cut off at the shutdown deadline"
        },
        unarchived_shards = unarchived.as_str(),
        "stopping with log entries the archive does not have yet; the wal keeps them and they are archived at the next start"
    );
}

/// How a supervised task that runs until the shutdown ended: done if the shutdown is on (or
/// the server that could turn it on is gone).
fn finished_if_stopping(shutdown: &watch::Receiver<bool>) -> Ended {
    if *shutdown.borrow() || shutdown.has_changed().is_err() {
        Ended::Finished
    } else {
        Ended::Stopped
    }
}

async fn sweep(shards: Shards, idle_for: Duration, mut shutdown: watch::Receiver<bool>) {
    loop {
        tokio::select! {
            _ = tokio::time::sleep(SWEEP_INTERVAL) => shards.sweep(idle_for).await,
            changed = shutdown.changed() => {
                if changed.is_err() || *shutdown.borrow() {
                    return;
                }
            }
        }
    }
}

/// Takes the data directory's lock file, refusing if another process holds it.
pub fn lock_data_dir(data_dir: &Path) -> anyhow::Result<File> {
    let path = data_dir.join("LOCK");
    let file = File::options()
        .create(true)
        .truncate(false)
        .write(true)
        .open(&path)
        .with_context(|| format!("cannot open lock file {}", path.display()))?;
    match file.try_lock() {
        Ok(()) => Ok(file),
        Err(std::fs::TryLockError::WouldBlock) => {
            bail!(
                "data directory {} is in use by another fleetlm process",
                data_dir.display()
            )
        }
        Err(std::fs::TryLockError::Error(error)) => Err(error).context("cannot lock the data directory"),
    }
}

/// The lanes to open the WAL in `wal_dir` with: those it was made with (a shard's records stay in
/// its lane: opened with other lanes, a shard would not find them), else `requested`, else the
/// default. A requested count that differs from the WAL's is refused.
fn wal_lanes_for(wal_dir: &Path, requested: Option<usize>) -> anyhow::Result<usize> {
    let on_disk = crate::wal::lanes_on_disk(wal_dir).with_context(|| format!("cannot read {}", wal_dir.display()))?;
    match (on_disk, requested) {
        (Some(on_disk), Some(requested)) if on_disk != requested => bail!(
            "invalid configuration: wal_lanes: the write-ahead log in {} has {on_disk} lanes; it cannot change to {requested} (leave wal_lanes unset to use the lanes it has)",
            wal_dir.display()
        ),
        (Some(on_disk), _) => Ok(on_disk),
        (None, requested) => Ok(requested.unwrap_or(crate::config::DEFAULT_WAL_LANES)),
    }
}

/// Reads the shard count the data directory was created with (and the cluster it took part
/// in), or records them for a new one.
fn read_or_create_layout(
    data_dir: &Path,
    requested_shards: Option<u16>,
    archive_kind: &str,
    node_id: Option<u64>,
) -> anyhow::Result<(u16, Option<String>)> {
    let path: PathBuf = data_dir.join("fleetlm.json");
    if path.exists() {
        let mut layout: DataDirLayout = serde_json::from_slice(&fs::read(&path)?)
            .with_context(|| format!("{} is not a valid layout file", path.display()))?;
        match layout.archive.as_deref() {
            Some(recorded) if recorded != archive_kind => bail!(
                "invalid configuration: database_url: the data directory {} belongs to a {recorded} archive and cannot be used with {archive_kind} (its log's archive watermarks are that archive's); {}",
                data_dir.display(),
                if recorded == "postgres" {
                    "set database_url to that Postgres database, or use another data_dir"
                } else {
                    "unset database_url to keep using its SQLite archive, or use another data_dir"
                }
            ),
            Some(_) => {}
            None => {
                layout.archive = Some(archive_kind.to_string());
                write_layout(data_dir, &layout)?;
            }
        }
        if let Some(requested) = requested_shards
            && requested != layout.shards
        {
            bail!(
                "invalid configuration: shards: the data directory was created with {} shards; it cannot change to {requested}",
                layout.shards
            );
        }
        match (layout.node_id, node_id) {
            (recorded, configured) if recorded == configured => {}
            (Some(recorded), Some(configured)) => bail!(
                "invalid configuration: node_id: the data directory {} belongs to cluster member {recorded}, not {configured}; give each member its own data_dir",
                data_dir.display()
            ),
            (Some(recorded), None) => bail!(
                "invalid configuration: cluster_peers: the data directory {} belongs to cluster member {recorded}; start it with its cluster settings (node_id, cluster_peers, cluster_secret), or use another data_dir for a single node",
                data_dir.display()
            ),
            (None, _) => bail!(
                "invalid configuration: node_id: the data directory {} belongs to a single node and cannot join a cluster; start each cluster member on an empty data_dir and a database of its own (docs/OPERATIONS.md, Running a cluster)",
                data_dir.display()
            ),
        }
        return Ok((layout.shards, layout.cluster_id));
    }
    let layout = DataDirLayout {
        format: 1,
        shards: requested_shards.unwrap_or(DEFAULT_SHARDS),
        archive: Some(archive_kind.to_string()),
        node_id,
        cluster_id: None,
    };
    write_layout(data_dir, &layout)?;
    Ok((layout.shards, None))
}

/// Records in `fleetlm.json` the cluster this member took part in.
fn record_cluster_id(data_dir: &Path, cluster_id: &str) -> anyhow::Result<()> {
    let path = data_dir.join("fleetlm.json");
    let mut layout: DataDirLayout = serde_json::from_slice(&fs::read(&path)?)
        .with_context(|| format!("{} is not a valid layout file", path.display()))?;
    layout.cluster_id = Some(cluster_id.to_string());
    write_layout(data_dir, &layout)
}

/// Writes `fleetlm.json` atomically (temporary file, fsync, rename, fsync of the directory).
fn write_layout(data_dir: &Path, layout: &DataDirLayout) -> anyhow::Result<()> {
    let temporary = data_dir.join("fleetlm.json.tmp");
    fs::write(&temporary, serde_json::to_vec_pretty(layout)?)?;
    File::open(&temporary)?.sync_all()?;
    fs::rename(&temporary, data_dir.join("fleetlm.json"))?;
    File::open(data_dir)?.sync_all()?;
    Ok(())
}
