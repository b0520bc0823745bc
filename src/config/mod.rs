//! Configuration: every setting is a flag, an environment variable and a key of an optional TOML
//! file; flag > env > file > default. Validation names the setting that is wrong.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use clap::Args;
use serde::Deserialize;

mod cluster;
mod validate;
mod values;

pub use values::{AllowedOrigins, ByteSize};

/// The settings as given on the command line or in the environment (all optional: the file and
/// the defaults fill the rest).
#[derive(Debug, Clone, Default, Args, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Settings {
    /// Address to listen on for HTTP and WebSocket. [default: 127.0.0.1:4000]
    #[arg(long, env = "FLEETLM_HTTP_ADDR")]
    pub http_addr: Option<String>,
    /// Directory for the WAL, the lock file and the SQLite archive. [default: fleetlm-data]
    #[arg(long, env = "FLEETLM_DATA_DIR")]
    pub data_dir: Option<PathBuf>,
    /// Postgres URL: archive to Postgres instead of the embedded SQLite file. [default: none: SQLite in the data directory]
    #[arg(long, env = "DATABASE_URL")]
    pub database_url: Option<String>,
    /// HS256 secret for user/agent tokens; setting it turns on token mode. [default: none: open mode]
    #[arg(long, env = "FLEETLM_AUTH_SECRET", hide_env_values = true)]
    pub auth_secret: Option<String>,
    /// Token mode: tokens must carry this `aud` (unset: `aud` is not checked). [default: none]
    #[arg(long, env = "FLEETLM_JWT_AUDIENCE")]
    pub jwt_audience: Option<String>,
    /// Token mode: tokens must carry this `iss` (unset: `iss` is not checked). [default: none]
    #[arg(long, env = "FLEETLM_JWT_ISSUER")]
    pub jwt_issuer: Option<String>,
    /// Bearer key for admin REST calls in token mode. [default: none]
    #[arg(long, env = "FLEETLM_API_KEY", hide_env_values = true)]
    pub api_key: Option<String>,
    /// Allow open mode (no auth) on a non-loopback address. A switch: `--insecure-open`
    /// (or `--insecure-open=false`, `FLEETLM_INSECURE_OPEN=true`). [default: false]
    #[arg(long, env = "FLEETLM_INSECURE_OPEN", num_args = 0..=1, require_equals = true, default_missing_value = "true", value_parser = clap::builder::BoolishValueParser::new())]
    pub insecure_open: Option<bool>,
    /// Number of shards; fixed when the data directory is created. [default: 64]
    #[arg(long, env = "FLEETLM_SHARDS")]
    pub shards: Option<u16>,
    /// Number of physical WAL lanes (each with its own fsync thread) of a new data directory; an
    /// existing one keeps the lanes it has. [default: 1]
    #[arg(long, env = "FLEETLM_WAL_LANES")]
    pub wal_lanes: Option<usize>,
    /// Size of each preallocated WAL segment file. [default: 128MiB]
    #[arg(long, env = "FLEETLM_WAL_SEGMENT_BYTES")]
    pub wal_segment_bytes: Option<ByteSize>,
    /// WAL disk use above which appends are refused with 503 overloaded. [default: 8GiB]
    #[arg(long, env = "FLEETLM_WAL_BUDGET_BYTES")]
    pub wal_budget_bytes: Option<ByteSize>,
    /// How often each shard flushes to the archive. [default: 300]
    #[arg(long, env = "FLEETLM_FLUSH_INTERVAL_MS")]
    pub flush_interval_ms: Option<u64>,
    /// Unflushed bytes that trigger a flush before the interval. [default: 4MiB]
    #[arg(long, env = "FLEETLM_FLUSH_THRESHOLD_BYTES")]
    pub flush_threshold_bytes: Option<ByteSize>,
    /// Largest message (content + metadata + kind, encoded). [default: 256KiB]
    #[arg(long, env = "FLEETLM_MAX_MESSAGE_BYTES")]
    pub max_message_bytes: Option<ByteSize>,
    /// Largest HTTP request body. [default: 1MiB]
    #[arg(long, env = "FLEETLM_MAX_BODY_BYTES")]
    pub max_body_bytes: Option<ByteSize>,
    /// Largest file a session's participant may upload (`POST /api/sessions/:id/files`; at most 512MiB). [default: 25MiB]
    #[arg(long, env = "FLEETLM_MAX_FILE_BYTES")]
    pub max_file_bytes: Option<ByteSize>,
    /// The most a session's files may hold in all; an upload past it is refused (at least
    /// max_file_bytes). [default: 1GiB]
    #[arg(long, env = "FLEETLM_MAX_SESSION_FILE_BYTES")]
    pub max_session_file_bytes: Option<ByteSize>,
    /// The base URL agents reach this server at (e.g. `https://chat.example.com`): the file parts
    /// of the messages an agent is sent point there, signed. [default: http://<http_addr>]
    #[arg(long, env = "FLEETLM_PUBLIC_URL")]
    pub public_url: Option<String>,
    /// Largest page of messages. [default: 1000]
    #[arg(long, env = "FLEETLM_MAX_PAGE_SIZE")]
    pub max_page_size: Option<usize>,
    /// Deepest nesting allowed in message metadata. [default: 32]
    #[arg(long, env = "FLEETLM_MAX_METADATA_DEPTH")]
    pub max_metadata_depth: Option<usize>,
    /// Sessions unused this long (and fully archived) leave memory. [default: 900]
    #[arg(long, env = "FLEETLM_SESSION_IDLE_SECS")]
    pub session_idle_secs: Option<u64>,
    /// How long the archive may be unreachable before `/health/ready` answers 503 for it
    /// (the node serves meanwhile: appends go into the WAL); 0: at once. [default: 30]
    #[arg(long, env = "FLEETLM_ARCHIVE_GRACE_SECS")]
    pub archive_grace_secs: Option<u64>,
    /// Browser origins allowed for CORS and WebSocket upgrades: comma-separated origins
    /// (`https://app.example`), `loopback` (http(s)://localhost / 127.0.0.1 / [::1], any port)
    /// or `*`. Default: `loopback` in open mode, `*` in token mode. Requests without an
    /// `Origin` header (curl, servers) are not affected. [default: loopback in open mode, * in token mode]
    #[arg(long, visible_alias = "cors-origins", env = "FLEETLM_ALLOWED_ORIGINS")]
    #[serde(alias = "cors_origins")]
    pub allowed_origins: Option<String>,
    /// `text` or `json`. [default: text]
    #[arg(long, env = "FLEETLM_LOG_FORMAT")]
    pub log_format: Option<String>,
    /// Close a WebSocket that sent nothing for this long. [default: 60]
    #[arg(long, env = "FLEETLM_WS_IDLE_TIMEOUT_SECS")]
    pub ws_idle_timeout_secs: Option<u64>,
    /// Largest WebSocket frame; bigger ones close the socket with 1009. [default: 1MiB]
    #[arg(long, env = "FLEETLM_WS_MAX_FRAME_BYTES")]
    pub ws_max_frame_bytes: Option<ByteSize>,
    /// Frames that may wait for a slow socket before it is told to resync or closed. [default: 1024]
    #[arg(long, env = "FLEETLM_WS_OUTBOUND_QUEUE")]
    pub ws_outbound_queue: Option<usize>,
    /// Channels one socket may join. [default: 100]
    #[arg(long, env = "FLEETLM_WS_MAX_CHANNELS")]
    pub ws_max_channels: Option<usize>,
    /// Sockets one identity may hold open. [default: 100]
    #[arg(long, env = "FLEETLM_WS_MAX_SOCKETS_PER_IDENTITY")]
    pub ws_max_sockets_per_identity: Option<usize>,
    /// At most one inbox_delta per user per this interval. [default: 1000]
    #[arg(long, env = "FLEETLM_INBOX_PUSH_INTERVAL_MS")]
    pub inbox_push_interval_ms: Option<u64>,
    /// Webhook attempts per dispatch (retries included). [default: 5]
    #[arg(long, env = "FLEETLM_AGENT_MAX_ATTEMPTS")]
    pub agent_max_attempts: Option<u32>,
    /// Bound on one whole dispatch, retries included. [default: 600]
    #[arg(long, env = "FLEETLM_DISPATCH_DEADLINE_SECS")]
    pub dispatch_deadline_secs: Option<u64>,
    /// Largest assembled agent reply message (bytes of its chunks); a longer reply ends the
    /// dispatch with an error. [default: 1MiB]
    #[arg(long, env = "FLEETLM_AGENT_MAX_REPLY_BYTES")]
    pub agent_max_reply_bytes: Option<ByteSize>,
    /// PEM file of CA certificates trusted for `https://` agents besides the built-in roots
    /// (agents behind a private CA). [default: none]
    #[arg(long, env = "FLEETLM_AGENT_CA_FILE")]
    pub agent_ca_file: Option<PathBuf>,
    /// Dispatches one agent may have in flight. [default: 100]
    #[arg(long, env = "FLEETLM_AGENT_MAX_IN_FLIGHT")]
    pub agent_max_in_flight: Option<usize>,
    /// Dispatches this node may have in flight. [default: 1000]
    #[arg(long, env = "FLEETLM_MAX_DISPATCHES_IN_FLIGHT")]
    pub max_dispatches_in_flight: Option<usize>,
    /// Bound on the whole shutdown, from the signal to the exit (the final archive flush included). [default: 10000]
    #[arg(long, env = "FLEETLM_SHUTDOWN_DEADLINE_MS")]
    pub shutdown_deadline_ms: Option<u64>,
    /// Cluster mode: this node's id (a positive integer, one of --cluster-peers). [default: none: single node]
    #[arg(long, env = "FLEETLM_NODE_ID")]
    pub node_id: Option<u64>,
    /// Cluster mode: every member as `id=host:port` (the address of its peer listener),
    /// comma-separated, the same list on every node; 3 or 5 members. [default: none: single node]
    #[arg(long, env = "FLEETLM_CLUSTER_PEERS")]
    pub cluster_peers: Option<String>,
    /// Cluster mode: the secret every member proves it holds to its peers (at least 16 bytes). [default: none]
    #[arg(long, env = "FLEETLM_CLUSTER_SECRET", hide_env_values = true)]
    pub cluster_secret: Option<String>,
    /// Cluster mode: where this node's peer listener binds. [default: this node's --cluster-peers address]
    #[arg(long, env = "FLEETLM_PEER_LISTEN_ADDR")]
    pub peer_listen_addr: Option<String>,
    /// Cluster mode: a shard whose leader is silent this long elects another (the timeout is
    /// randomized between this and 1.5 times this; heartbeats go every fifth of it). [default: 500]
    #[arg(long, env = "FLEETLM_ELECTION_TIMEOUT_MS")]
    pub election_timeout_ms: Option<u64>,
    /// Cluster mode: every this many seconds, each node hands over some of the shards it leads
    /// so that every member leads its share (0 = never: leadership stays where elections put
    /// it). [default: 5]
    #[arg(long, env = "FLEETLM_LEADER_BALANCE_SECS")]
    pub leader_balance_secs: Option<u64>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LogFormat {
    Text,
    Json,
}

/// The validated configuration the server runs with.
#[derive(Debug, Clone)]
pub struct Config {
    pub http_addr: SocketAddr,
    pub data_dir: PathBuf,
    pub database_url: Option<String>,
    pub auth_secret: Option<String>,
    pub jwt_audience: Option<String>,
    pub jwt_issuer: Option<String>,
    pub api_key: Option<String>,
    pub insecure_open: bool,
    /// `None`: use what the data directory records (64 for a new one).
    pub shards: Option<u16>,
    /// `None`: the lanes the data directory's WAL has (`DEFAULT_WAL_LANES` for a new one).
    pub wal_lanes: Option<usize>,
    pub wal_segment_bytes: u64,
    pub wal_budget_bytes: u64,
    pub flush_interval: Duration,
    pub flush_threshold_bytes: usize,
    pub max_message_bytes: usize,
    pub max_body_bytes: usize,
    pub max_file_bytes: usize,
    /// The total size of a session's files past which uploads are refused.
    pub max_session_file_bytes: u64,
    /// Where agents reach this server (no trailing slash); `None`: `http://<http_addr>` as bound.
    pub public_url: Option<String>,
    pub max_page_size: usize,
    pub max_metadata_depth: usize,
    pub session_idle: Duration,
    /// How long the archive may be unreachable before the node reports itself not ready.
    pub archive_grace: Duration,
    /// Browser origins allowed for CORS and WebSocket upgrades.
    pub allowed_origins: AllowedOrigins,
    pub log_format: LogFormat,
    pub ws_idle_timeout: Duration,
    pub ws_max_frame_bytes: usize,
    pub ws_outbound_queue: usize,
    pub ws_max_channels: usize,
    pub ws_max_sockets_per_identity: usize,
    pub inbox_push_interval: Duration,
    pub agent_max_attempts: u32,
    pub dispatch_deadline: Duration,
    pub agent_max_reply_bytes: usize,
    /// Extra roots for `https://` agents (read from `agent_ca_file` at validation).
    pub agent_ca_certificates: Vec<reqwest::Certificate>,
    pub agent_max_in_flight: usize,
    pub max_dispatches_in_flight: usize,
    pub shutdown_deadline: Duration,
    /// `Some` in cluster mode.
    pub cluster: Option<ClusterConfig>,
}

/// How this node takes part in a cluster (docs/OPERATIONS.md, "Running a cluster").
#[derive(Clone)]
pub struct ClusterConfig {
    pub node_id: u64,
    /// Every member (this node included) → the address its peer listener is reached at.
    pub peers: std::collections::BTreeMap<u64, String>,
    pub secret: String,
    pub peer_listen_addr: SocketAddr,
    pub election_timeout: Duration,
    /// How often leadership is evened out (`consensus::balance`); `None`: never.
    pub leader_balance_every: Option<Duration>,
}

impl std::fmt::Debug for ClusterConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // The secret is never printed.
        f.debug_struct("ClusterConfig")
            .field("node_id", &self.node_id)
            .field("peers", &self.peers)
            .field("peer_listen_addr", &self.peer_listen_addr)
            .field("election_timeout", &self.election_timeout)
            .field("leader_balance_every", &self.leader_balance_every)
            .finish_non_exhaustive()
    }
}

pub const DEFAULT_SHARDS: u16 = 64;
/// WAL lanes of a new data directory: one fsync thread makes fewer, larger fsyncs, which cost
/// less CPU per message and answered more of them than two on the 2-core machine measured
/// (docs/BENCHMARKS.md, issue 23); more lanes can pay on machines with more cores and disks
/// that fsync in parallel.
pub const DEFAULT_WAL_LANES: usize = 1;

/// A setting that is wrong, and why; shown as one line before exiting with code 2.
#[derive(Debug, thiserror::Error)]
#[error("invalid configuration: {setting}: {reason}")]
pub struct ConfigError {
    pub setting: &'static str,
    pub reason: String,
}
fn invalid(setting: &'static str, reason: impl Into<String>) -> ConfigError {
    ConfigError {
        setting,
        reason: reason.into(),
    }
}

impl Config {
    /// Bytes one WAL group-commit batch may hold: half a segment, at most 4 MiB.
    pub fn wal_max_batch_bytes(&self) -> usize {
        (self.wal_segment_bytes / 2).min(4 * 1024 * 1024) as usize
    }

    /// A configuration for tests and embedding: loopback on an ephemeral port, data in `data_dir`.
    pub fn for_data_dir(data_dir: PathBuf) -> Config {
        let settings = Settings {
            http_addr: Some("127.0.0.1:0".into()),
            data_dir: Some(data_dir),
            ..Settings::default()
        };
        settings.validate().expect("defaults are valid")
    }
}

#[cfg(test)]
mod tests;
