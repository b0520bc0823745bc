//! Configuration: every setting is a flag, an environment variable and a key of an optional TOML
//! file; flag > env > file > default. Validation names the setting that is wrong.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use clap::Args;
use serde::Deserialize;

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
    /// Number of physical WAL lanes (each with its own fsync thread). [default: 2]
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
    pub wal_lanes: usize,
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
}

impl std::fmt::Debug for ClusterConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // The secret is never printed.
        f.debug_struct("ClusterConfig")
            .field("node_id", &self.node_id)
            .field("peers", &self.peers)
            .field("peer_listen_addr", &self.peer_listen_addr)
            .field("election_timeout", &self.election_timeout)
            .finish_non_exhaustive()
    }
}

/// Members a cluster may have: a majority survives the loss of one (3) or two (5) nodes.
const CLUSTER_SIZES: [usize; 2] = [3, 5];

impl Settings {
    fn cluster(&self, database_url: Option<&str>) -> Result<Option<ClusterConfig>, ConfigError> {
        let given = [
            ("node_id", self.node_id.is_some()),
            (
                "cluster_peers",
                self.cluster_peers.as_deref().is_some_and(|p| !p.trim().is_empty()),
            ),
            (
                "cluster_secret",
                self.cluster_secret.as_deref().is_some_and(|s| !s.is_empty()),
            ),
        ];
        if given.iter().all(|(_, set)| !set) {
            if self.peer_listen_addr.is_some() {
                return Err(invalid(
                    "peer_listen_addr",
                    "is only used in cluster mode (set cluster_peers)",
                ));
            }
            return Ok(None);
        }
        if let Some((missing, _)) = given.iter().find(|(_, set)| !set) {
            return Err(invalid(
                missing,
                "cluster mode needs node_id, cluster_peers and cluster_secret together",
            ));
        }
        let node_id = self.node_id.expect("checked above");
        let mut peers = std::collections::BTreeMap::new();
        for pair in self
            .cluster_peers
            .as_deref()
            .unwrap_or_default()
            .split(',')
            .map(str::trim)
        {
            let (id, address) = pair.split_once('=').ok_or_else(|| {
                invalid(
                    "cluster_peers",
                    format!("expected id=host:port pairs separated by commas, got {pair:?}"),
                )
            })?;
            let id: u64 = id
                .trim()
                .parse()
                .ok()
                .filter(|id| *id > 0)
                .ok_or_else(|| invalid("cluster_peers", format!("node ids are positive integers, got {id:?}")))?;
            let address = address.trim();
            // Only the form is checked: a peer's name may resolve only once it is up.
            let well_formed = address
                .rsplit_once(':')
                .is_some_and(|(host, port)| !host.is_empty() && port.parse::<u16>().is_ok_and(|p| p > 0));
            if !well_formed {
                return Err(invalid(
                    "cluster_peers",
                    format!("node {id}: expected host:port, got {address:?}"),
                ));
            }
            if peers.insert(id, address.to_string()).is_some() {
                return Err(invalid("cluster_peers", format!("node {id} is listed twice")));
            }
        }
        if !CLUSTER_SIZES.contains(&peers.len()) {
            return Err(invalid(
                "cluster_peers",
                format!("a cluster has 3 or 5 members, got {}", peers.len()),
            ));
        }
        let Some(own) = peers.get(&node_id) else {
            return Err(invalid("node_id", format!("node {node_id} is not in cluster_peers")));
        };
        let secret = self.cluster_secret.clone().unwrap_or_default();
        if secret.len() < 16 {
            return Err(invalid("cluster_secret", "must be at least 16 bytes"));
        }
        if database_url.is_none() {
            return Err(invalid(
                "database_url",
                "cluster mode archives to one Postgres shared by every node: set database_url",
            ));
        }
        let listen_text = self.peer_listen_addr.as_deref().unwrap_or(own);
        let peer_listen_addr = parse_listen_address(listen_text)
            .ok_or_else(|| invalid("peer_listen_addr", format!("expected host:port, got {listen_text:?}")))?;
        let election_timeout_ms = self.election_timeout_ms.unwrap_or(500);
        if !(100..=60_000).contains(&election_timeout_ms) {
            return Err(invalid("election_timeout_ms", "must be between 100 and 60000"));
        }
        Ok(Some(ClusterConfig {
            node_id,
            peers,
            secret,
            peer_listen_addr,
            election_timeout: Duration::from_millis(election_timeout_ms),
        }))
    }
}

pub const DEFAULT_SHARDS: u16 = 64;

/// A setting that is wrong, and why; shown as one line before exiting with code 2.
#[derive(Debug, thiserror::Error)]
#[error("invalid configuration: {setting}: {reason}")]
pub struct ConfigError {
    pub setting: &'static str,
    pub reason: String,
}

/// An absolute `http(s)://` URL without query or fragment, returned without a trailing slash.
fn validate_public_url(url: &str) -> Result<String, ConfigError> {
    let parsed = reqwest::Url::parse(url).map_err(|e| invalid("public_url", format!("is not a URL: {e}")))?;
    if !matches!(parsed.scheme(), "http" | "https") || parsed.host_str().is_none() {
        return Err(invalid("public_url", "must be an http:// or https:// URL with a host"));
    }
    if parsed.query().is_some() || parsed.fragment().is_some() || !parsed.username().is_empty() {
        return Err(invalid("public_url", "must have no query, fragment or credentials"));
    }
    Ok(url.trim_end_matches('/').to_string())
}

fn invalid(setting: &'static str, reason: impl Into<String>) -> ConfigError {
    ConfigError {
        setting,
        reason: reason.into(),
    }
}

impl Settings {
    /// Reads a TOML file of settings (keys as the long flag names with `_`).
    pub fn from_file(path: &std::path::Path) -> Result<Settings, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|e| invalid("config", format!("{}: {e}", path.display())))?;
        toml::from_str(&text).map_err(|e| {
            let line = e.span().map_or(1, |span| text[..span.start].matches('\n').count() + 1);
            invalid(
                "config",
                format!("{}, line {line}: {}", path.display(), e.message().trim_end()),
            )
        })
    }

    /// `self` where set, else `fallback`.
    pub fn or(self, fallback: Settings) -> Settings {
        macro_rules! pick {
            ($($field:ident),*) => { Settings { $($field: self.$field.or(fallback.$field)),* } };
        }
        pick!(
            http_addr,
            data_dir,
            database_url,
            auth_secret,
            jwt_audience,
            jwt_issuer,
            api_key,
            insecure_open,
            shards,
            wal_lanes,
            wal_segment_bytes,
            wal_budget_bytes,
            flush_interval_ms,
            flush_threshold_bytes,
            max_message_bytes,
            max_body_bytes,
            max_file_bytes,
            max_session_file_bytes,
            public_url,
            max_page_size,
            max_metadata_depth,
            session_idle_secs,
            archive_grace_secs,
            allowed_origins,
            log_format,
            ws_idle_timeout_secs,
            ws_max_frame_bytes,
            ws_outbound_queue,
            ws_max_channels,
            ws_max_sockets_per_identity,
            inbox_push_interval_ms,
            agent_max_attempts,
            dispatch_deadline_secs,
            agent_max_reply_bytes,
            agent_ca_file,
            agent_max_in_flight,
            max_dispatches_in_flight,
            shutdown_deadline_ms,
            node_id,
            cluster_peers,
            cluster_secret,
            peer_listen_addr,
            election_timeout_ms
        )
    }

    pub fn validate(self) -> Result<Config, ConfigError> {
        let database_url = self.database_url.clone().filter(|u| !u.is_empty());
        let cluster = self.cluster(database_url.as_deref())?;
        let http_addr =
            parse_listen_address(self.http_addr.as_deref().unwrap_or("127.0.0.1:4000")).ok_or_else(|| {
                invalid(
                    "http_addr",
                    "expected HOST:PORT, e.g. 127.0.0.1:4000, localhost:4000 or [::1]:4000",
                )
            })?;
        let auth_secret = self.auth_secret.filter(|s| !s.is_empty());
        if let Some(secret) = &auth_secret
            && secret.len() < 16
        {
            return Err(invalid("auth_secret", "must be at least 16 bytes"));
        }
        let insecure_open = self.insecure_open.unwrap_or(false);
        if auth_secret.is_none() && !http_addr.ip().is_loopback() && !insecure_open {
            return Err(invalid(
                "http_addr",
                "open mode (no auth_secret) may only listen on a loopback address; set auth_secret or insecure_open",
            ));
        }
        if let Some(shards) = self.shards
            && !(1..=4096).contains(&shards)
        {
            return Err(invalid("shards", "must be between 1 and 4096"));
        }
        let wal_lanes = self.wal_lanes.unwrap_or(2);
        if !(1..=64).contains(&wal_lanes) {
            return Err(invalid("wal_lanes", "must be between 1 and 64"));
        }
        let wal_segment_bytes = self.wal_segment_bytes.map_or(128 * 1024 * 1024, ByteSize::get);
        if wal_segment_bytes < 64 * 1024 {
            return Err(invalid("wal_segment_bytes", "must be at least 65536"));
        }
        let max_message_bytes = self.max_message_bytes.map_or(256 * 1024, ByteSize::get_usize);
        if max_message_bytes == 0 || max_message_bytes as u64 > (wal_segment_bytes / 8).min(1024 * 1024) {
            return Err(invalid(
                "max_message_bytes",
                "must be positive, at most 1 MiB and an eighth of wal_segment_bytes",
            ));
        }
        let max_file_bytes = self.max_file_bytes.map_or(25 * 1024 * 1024, ByteSize::get_usize);
        // Below what either archive stores in one value (SQLite's blob limit and Postgres'
        // bytea are both about 1 GB), with room for the 16 uploads a node takes at once.
        if max_file_bytes == 0 || max_file_bytes > 512 * 1024 * 1024 {
            return Err(invalid("max_file_bytes", "must be positive and at most 512 MiB"));
        }
        let max_session_file_bytes = self
            .max_session_file_bytes
            .map_or(1024 * 1024 * 1024, |size| size.get_usize() as u64);
        if max_session_file_bytes < max_file_bytes as u64 {
            return Err(invalid("max_session_file_bytes", "must be at least max_file_bytes"));
        }
        let public_url = match self.public_url.as_deref().map(str::trim).filter(|u| !u.is_empty()) {
            None => None,
            Some(url) => Some(validate_public_url(url)?),
        };
        let max_body_bytes = self.max_body_bytes.map_or(1024 * 1024, ByteSize::get_usize);
        if max_body_bytes == 0 {
            return Err(invalid("max_body_bytes", "must be positive"));
        }
        let max_page_size = self.max_page_size.unwrap_or(1000);
        if max_page_size == 0 {
            return Err(invalid("max_page_size", "must be positive"));
        }
        let archive_grace_secs = self.archive_grace_secs.unwrap_or(30);
        if archive_grace_secs > 24 * 3600 {
            return Err(invalid("archive_grace_secs", "must be at most 86400 (a day)"));
        }
        let flush_interval_ms = self.flush_interval_ms.unwrap_or(300);
        if flush_interval_ms == 0 {
            return Err(invalid("flush_interval_ms", "must be positive"));
        }
        let log_format = match self.log_format.as_deref().unwrap_or("text") {
            "text" => LogFormat::Text,
            "json" => LogFormat::Json,
            other => {
                return Err(invalid("log_format", format!("expected text or json, got {other:?}")));
            }
        };
        let allowed_origins = match self.allowed_origins.as_deref().map(str::trim) {
            None | Some("") if auth_secret.is_none() => AllowedOrigins::loopback(),
            None | Some("") => AllowedOrigins::any(),
            Some(list) => AllowedOrigins::parse(list).map_err(|reason| invalid("allowed_origins", reason))?,
        };
        let agent_ca_certificates = match &self.agent_ca_file {
            None => Vec::new(),
            Some(path) if path.as_os_str().is_empty() => Vec::new(),
            Some(path) => load_ca_file(path).map_err(|reason| invalid("agent_ca_file", reason))?,
        };
        Ok(Config {
            http_addr,
            data_dir: self.data_dir.unwrap_or_else(|| PathBuf::from("fleetlm-data")),
            database_url,
            auth_secret,
            jwt_audience: self.jwt_audience.filter(|a| !a.is_empty()),
            jwt_issuer: self.jwt_issuer.filter(|i| !i.is_empty()),
            api_key: self.api_key.filter(|k| !k.is_empty()),
            insecure_open,
            shards: self.shards,
            wal_lanes,
            wal_segment_bytes,
            wal_budget_bytes: self.wal_budget_bytes.map_or(8 * 1024 * 1024 * 1024, ByteSize::get),
            flush_interval: Duration::from_millis(flush_interval_ms),
            flush_threshold_bytes: self.flush_threshold_bytes.map_or(4 * 1024 * 1024, ByteSize::get_usize),
            max_message_bytes,
            max_body_bytes,
            max_file_bytes,
            max_session_file_bytes,
            public_url,
            max_page_size,
            max_metadata_depth: self.max_metadata_depth.unwrap_or(32),
            session_idle: Duration::from_secs(self.session_idle_secs.unwrap_or(15 * 60)),
            archive_grace: Duration::from_secs(archive_grace_secs),
            allowed_origins,
            log_format,
            ws_idle_timeout: Duration::from_secs(self.ws_idle_timeout_secs.unwrap_or(60).max(1)),
            ws_max_frame_bytes: self
                .ws_max_frame_bytes
                .map_or(1024 * 1024, ByteSize::get_usize)
                .max(1024),
            ws_outbound_queue: self.ws_outbound_queue.unwrap_or(1024).max(16),
            ws_max_channels: self.ws_max_channels.unwrap_or(100).max(1),
            ws_max_sockets_per_identity: self.ws_max_sockets_per_identity.unwrap_or(100).max(1),
            inbox_push_interval: Duration::from_millis(self.inbox_push_interval_ms.unwrap_or(1000)),
            agent_max_attempts: self.agent_max_attempts.unwrap_or(5).clamp(1, 20),
            dispatch_deadline: Duration::from_secs(self.dispatch_deadline_secs.unwrap_or(600).max(1)),
            agent_max_reply_bytes: self
                .agent_max_reply_bytes
                .map_or(1024 * 1024, ByteSize::get_usize)
                .max(1024),
            agent_ca_certificates,
            agent_max_in_flight: self.agent_max_in_flight.unwrap_or(100).max(1),
            max_dispatches_in_flight: self.max_dispatches_in_flight.unwrap_or(1000).max(1),
            shutdown_deadline: Duration::from_millis(self.shutdown_deadline_ms.unwrap_or(10_000)),
            cluster,
        })
    }
}

/// The CA certificates of a PEM file (one or more `CERTIFICATE` blocks), checked by building a
/// client that trusts them.
fn load_ca_file(path: &std::path::Path) -> Result<Vec<reqwest::Certificate>, String> {
    let pem = std::fs::read(path).map_err(|e| format!("{}: {e}", path.display()))?;
    let certificates = reqwest::Certificate::from_pem_bundle(&pem)
        .map_err(|e| format!("{}: not a PEM certificate file ({e})", path.display()))?;
    if certificates.is_empty() {
        return Err(format!("{}: holds no PEM certificate", path.display()));
    }
    let mut builder = reqwest::Client::builder();
    for certificate in &certificates {
        builder = builder.add_root_certificate(certificate.clone());
    }
    builder
        .build()
        .map_err(|e| format!("{}: not a usable CA certificate ({e})", path.display()))?;
    Ok(certificates)
}

/// `HOST:PORT` to listen on: an IP address, or a name resolved now (`localhost:4000`).
fn parse_listen_address(text: &str) -> Option<SocketAddr> {
    if let Ok(address) = text.parse::<SocketAddr>() {
        return Some(address);
    }
    let (host, port) = text.rsplit_once(':')?;
    let port: u16 = port.parse().ok()?;
    if host.eq_ignore_ascii_case("localhost") {
        return Some(SocketAddr::from(([127, 0, 0, 1], port)));
    }
    let resolved: Vec<SocketAddr> = std::net::ToSocketAddrs::to_socket_addrs(&(host, port)).ok()?.collect();
    resolved
        .iter()
        .find(|a| a.is_ipv4())
        .or_else(|| resolved.first())
        .copied()
}

/// A size in bytes: a plain number, or with a unit (`64MiB`, `4 KiB`, `1GB`; KiB/MiB/GiB are
/// powers of 1024, KB/MB/GB of 1000).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ByteSize(pub u64);

impl ByteSize {
    pub fn get(self) -> u64 {
        self.0
    }

    pub fn get_usize(self) -> usize {
        usize::try_from(self.0).unwrap_or(usize::MAX)
    }
}

impl std::str::FromStr for ByteSize {
    type Err = String;

    fn from_str(text: &str) -> Result<ByteSize, String> {
        let text = text.trim();
        let split = text.find(|c: char| !c.is_ascii_digit()).unwrap_or(text.len());
        let (digits, unit) = text.split_at(split);
        let number: u64 = digits
            .parse()
            .map_err(|_| format!("{text:?} is not a size; expected e.g. 1048576, 64MiB or 4KiB"))?;
        let multiplier: u64 = match unit.trim().to_ascii_lowercase().as_str() {
            "" | "b" => 1,
            "k" | "kib" => 1 << 10,
            "m" | "mib" => 1 << 20,
            "g" | "gib" => 1 << 30,
            "kb" => 1_000,
            "mb" => 1_000_000,
            "gb" => 1_000_000_000,
            _ => {
                return Err(format!(
                    "{text:?} has an unknown unit; use B, KiB, MiB, GiB, KB, MB or GB"
                ));
            }
        };
        number
            .checked_mul(multiplier)
            .map(ByteSize)
            .ok_or_else(|| format!("{text:?} is too large"))
    }
}

impl<'de> Deserialize<'de> for ByteSize {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<ByteSize, D::Error> {
        #[derive(Deserialize)]
        #[serde(untagged)]
        enum Raw {
            Number(u64),
            Text(String),
        }
        match Raw::deserialize(deserializer)? {
            Raw::Number(number) => Ok(ByteSize(number)),
            Raw::Text(text) => text.parse().map_err(serde::de::Error::custom),
        }
    }
}

/// Which browser origins may call the API and open sockets.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct AllowedOrigins {
    pub any: bool,
    pub loopback: bool,
    /// Serialized origins (`scheme://host[:port]`, default port omitted).
    pub exact: Vec<String>,
}

impl AllowedOrigins {
    pub fn any() -> AllowedOrigins {
        AllowedOrigins {
            any: true,
            ..AllowedOrigins::default()
        }
    }

    pub fn loopback() -> AllowedOrigins {
        AllowedOrigins {
            loopback: true,
            ..AllowedOrigins::default()
        }
    }

    /// `*`, or a comma-separated list of origins and the word `loopback`.
    pub fn parse(list: &str) -> Result<AllowedOrigins, String> {
        let mut allowed = AllowedOrigins::default();
        for item in list.split(',').map(str::trim).filter(|item| !item.is_empty()) {
            match item {
                "*" => allowed.any = true,
                "loopback" => allowed.loopback = true,
                origin => allowed.exact.push(normalize_origin(origin).ok_or_else(|| {
                    format!("{origin:?} is not an origin; expected e.g. https://app.example or http://localhost:3000, loopback or *")
                })?),
            }
        }
        Ok(allowed)
    }

    /// May a request carrying this `Origin` header proceed?
    pub fn allows(&self, origin: &str) -> bool {
        if self.any {
            return true;
        }
        let Some(normalized) = normalize_origin(origin) else {
            return false;
        };
        if self.exact.contains(&normalized) {
            return true;
        }
        self.loopback && is_loopback_origin(&normalized)
    }
}

/// `scheme://host[:port]` of an http(s) origin, as browsers send it; `None` for anything else
/// (including `null`, paths and credentials).
fn normalize_origin(text: &str) -> Option<String> {
    let parsed = url::Url::parse(text).ok()?;
    let plain = matches!(parsed.scheme(), "http" | "https")
        && parsed.host().is_some()
        && parsed.username().is_empty()
        && parsed.password().is_none()
        && parsed.path() == "/"
        && parsed.query().is_none()
        && parsed.fragment().is_none();
    plain.then(|| parsed.origin().ascii_serialization())
}

fn is_loopback_origin(origin: &str) -> bool {
    let Ok(parsed) = url::Url::parse(origin) else {
        return false;
    };
    match parsed.host() {
        Some(url::Host::Domain(domain)) => domain.eq_ignore_ascii_case("localhost"),
        Some(url::Host::Ipv4(ip)) => ip.is_loopback(),
        Some(url::Host::Ipv6(ip)) => ip.is_loopback(),
        None => false,
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
mod tests {
    use super::*;

    #[test]
    fn defaults_are_the_documented_ones() {
        let config = Settings::default().validate().unwrap();
        assert_eq!(config.http_addr.to_string(), "127.0.0.1:4000");
        assert_eq!(config.data_dir, PathBuf::from("fleetlm-data"));
        assert_eq!(config.wal_lanes, 2);
        assert_eq!(config.flush_interval, Duration::from_millis(300));
    }

    #[test]
    fn flags_win_over_the_file() {
        let flags = Settings {
            wal_lanes: Some(2),
            ..Settings::default()
        };
        let file: Settings = toml::from_str("wal_lanes = 8\nflush_interval_ms = 50").unwrap();
        let config = flags.or(file).validate().unwrap();
        assert_eq!(config.wal_lanes, 2);
        assert_eq!(config.flush_interval, Duration::from_millis(50));
    }

    #[test]
    fn open_mode_refuses_a_public_address() {
        let settings = Settings {
            http_addr: Some("0.0.0.0:4000".into()),
            ..Settings::default()
        };
        let error = settings.validate().unwrap_err();
        assert_eq!(error.setting, "http_addr");
    }

    #[test]
    fn origins_default_to_loopback_in_open_mode_and_parse_as_urls() {
        let open = Settings::default().validate().unwrap().allowed_origins;
        assert!(open.allows("http://localhost:3000") && open.allows("http://127.0.0.1:5173"));
        assert!(open.allows("http://[::1]:8080"));
        assert!(!open.allows("https://evil.example") && !open.allows("null"));
        assert!(!open.allows("http://localhost.evil.example"));
        let token = Settings {
            auth_secret: Some("0123456789abcdef".into()),
            ..Settings::default()
        };
        assert!(
            token
                .validate()
                .unwrap()
                .allowed_origins
                .allows("https://anything.example")
        );
        let listed = AllowedOrigins::parse("https://app.example/, loopback").unwrap();
        assert!(listed.allows("https://app.example") && listed.allows("http://localhost"));
        assert!(!listed.allows("https://app.example.evil"));
        let bad = Settings {
            allowed_origins: Some("app.example".into()),
            ..Settings::default()
        };
        assert_eq!(bad.validate().unwrap_err().setting, "allowed_origins");
    }

    #[test]
    fn sizes_take_units_and_addresses_take_localhost() {
        assert_eq!("64MiB".parse::<ByteSize>().unwrap(), ByteSize(64 << 20));
        assert_eq!("4 KiB".parse::<ByteSize>().unwrap(), ByteSize(4096));
        assert_eq!("1GB".parse::<ByteSize>().unwrap(), ByteSize(1_000_000_000));
        assert_eq!("1048576".parse::<ByteSize>().unwrap(), ByteSize(1 << 20));
        assert!("64 parsecs".parse::<ByteSize>().is_err() && "MiB".parse::<ByteSize>().is_err());
        let file: Settings = toml::from_str("wal_segment_bytes = \"64MiB\"\nmax_body_bytes = 2048").unwrap();
        let config = file.validate().unwrap();
        assert_eq!((config.wal_segment_bytes, config.max_body_bytes), (64 << 20, 2048));
        let local = Settings {
            http_addr: Some("localhost:4001".into()),
            ..Settings::default()
        };
        assert_eq!(local.validate().unwrap().http_addr.to_string(), "127.0.0.1:4001");
    }

    #[test]
    fn the_sample_file_is_valid_and_states_the_defaults() {
        let sample: Settings = toml::from_str(include_str!("../examples/fleetlm.toml")).unwrap();
        let from_sample = format!("{:?}", sample.validate().unwrap());
        assert_eq!(from_sample, format!("{:?}", Settings::default().validate().unwrap()));
    }

    #[test]
    fn toml_errors_name_the_line() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("fleetlm.toml");
        std::fs::write(&path, "wal_lanes = 2\nshards = = 8\n").unwrap();
        let error = Settings::from_file(&path).unwrap_err().to_string();
        assert!(error.contains("line 2"), "{error}");
    }

    #[test]
    fn cluster_settings_are_validated_together() {
        let cluster = |peers: &str| Settings {
            node_id: Some(2),
            cluster_peers: Some(peers.into()),
            cluster_secret: Some("a-secret-of-sixteen+".into()),
            database_url: Some("postgres://db/fleetlm".into()),
            ..Settings::default()
        };
        let config = cluster("1=127.0.0.1:4101, 2=localhost:4102,3=10.0.0.3:4103")
            .validate()
            .unwrap();
        let node = config.cluster.expect("cluster mode");
        assert_eq!(node.node_id, 2);
        assert_eq!(node.peers.len(), 3);
        assert_eq!(node.peer_listen_addr.to_string(), "127.0.0.1:4102");
        assert_eq!(node.election_timeout, Duration::from_millis(500));
        assert!(!format!("{node:?}").contains("sixteen"), "the secret is never printed");
        assert!(Settings::default().validate().unwrap().cluster.is_none());

        let error = |settings: Settings| settings.validate().unwrap_err();
        let e = error(cluster("1=127.0.0.1:4101,2=127.0.0.1:4102"));
        assert_eq!(
            (e.setting, e.reason.as_str()),
            ("cluster_peers", "a cluster has 3 or 5 members, got 2")
        );
        assert_eq!(error(cluster("1=a:1,1=b:2,3=c:3")).reason, "node 1 is listed twice");
        assert_eq!(error(cluster("1=a:1,3=b:2,4=c:3")).setting, "node_id");
        assert_eq!(error(cluster("0=a:1,2=b:2,3=c:3")).setting, "cluster_peers");
        assert_eq!(error(cluster("1=a,2=b:2,3=c:3")).setting, "cluster_peers");
        let no_database = Settings {
            database_url: None,
            ..cluster("1=a:1,2=b:2,3=c:3")
        };
        assert_eq!(error(no_database).setting, "database_url");
        let short_secret = Settings {
            cluster_secret: Some("short".into()),
            ..cluster("1=a:1,2=b:2,3=c:3")
        };
        assert_eq!(error(short_secret).setting, "cluster_secret");
        let partial = Settings {
            node_id: Some(1),
            ..Settings::default()
        };
        assert_eq!(error(partial).setting, "cluster_peers");
        let stray = Settings {
            peer_listen_addr: Some("127.0.0.1:4101".into()),
            ..Settings::default()
        };
        assert_eq!(error(stray).setting, "peer_listen_addr");
    }

    #[test]
    fn agent_ca_file_must_hold_pem_certificates() {
        let dir = tempfile::tempdir().unwrap();
        let with_file = |path: std::path::PathBuf| Settings {
            agent_ca_file: Some(path),
            ..Settings::default()
        };
        let missing = with_file(dir.path().join("absent.pem")).validate().unwrap_err();
        assert_eq!(missing.setting, "agent_ca_file");
        let garbage = dir.path().join("garbage.pem");
        std::fs::write(&garbage, "not a certificate").unwrap();
        let error = with_file(garbage).validate().unwrap_err();
        assert_eq!(error.setting, "agent_ca_file", "{error}");
        let key = rcgen::KeyPair::generate().unwrap();
        let ca = rcgen::CertificateParams::new(vec!["ca.test".to_string()])
            .unwrap()
            .self_signed(&key)
            .unwrap();
        let good = dir.path().join("ca.pem");
        std::fs::write(&good, ca.pem()).unwrap();
        assert_eq!(with_file(good).validate().unwrap().agent_ca_certificates.len(), 1);
    }

    #[test]
    fn unknown_file_keys_are_refused() {
        assert!(toml::from_str::<Settings>("wal_lanez = 3").is_err());
    }
}
