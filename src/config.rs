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
    /// Address to listen on for HTTP and WebSocket.
    #[arg(long, env = "FLEETLM_HTTP_ADDR")]
    pub http_addr: Option<String>,
    /// Directory for the WAL, the lock file and the SQLite archive.
    #[arg(long, env = "FLEETLM_DATA_DIR")]
    pub data_dir: Option<PathBuf>,
    /// Postgres URL: archive to Postgres instead of the embedded SQLite file.
    #[arg(long, env = "DATABASE_URL")]
    pub database_url: Option<String>,
    /// HS256 secret for user/agent tokens; setting it turns on token mode.
    #[arg(long, env = "FLEETLM_AUTH_SECRET", hide_env_values = true)]
    pub auth_secret: Option<String>,
    /// Bearer key for admin REST calls in token mode.
    #[arg(long, env = "FLEETLM_API_KEY", hide_env_values = true)]
    pub api_key: Option<String>,
    /// Allow open mode (no auth) on a non-loopback address.
    #[arg(long, env = "FLEETLM_INSECURE_OPEN")]
    pub insecure_open: Option<bool>,
    /// Number of shards; fixed when the data directory is created.
    #[arg(long, env = "FLEETLM_SHARDS")]
    pub shards: Option<u16>,
    /// Number of physical WAL lanes (each with its own fsync thread).
    #[arg(long, env = "FLEETLM_WAL_LANES")]
    pub wal_lanes: Option<usize>,
    /// Size of each preallocated WAL segment file.
    #[arg(long, env = "FLEETLM_WAL_SEGMENT_BYTES")]
    pub wal_segment_bytes: Option<u64>,
    /// WAL disk use above which appends are refused with 503 overloaded.
    #[arg(long, env = "FLEETLM_WAL_BUDGET_BYTES")]
    pub wal_budget_bytes: Option<u64>,
    /// How often each shard flushes to the archive.
    #[arg(long, env = "FLEETLM_FLUSH_INTERVAL_MS")]
    pub flush_interval_ms: Option<u64>,
    /// Unflushed bytes that trigger a flush before the interval.
    #[arg(long, env = "FLEETLM_FLUSH_THRESHOLD_BYTES")]
    pub flush_threshold_bytes: Option<usize>,
    /// Largest message (content + metadata + kind, encoded).
    #[arg(long, env = "FLEETLM_MAX_MESSAGE_BYTES")]
    pub max_message_bytes: Option<usize>,
    /// Largest HTTP request body.
    #[arg(long, env = "FLEETLM_MAX_BODY_BYTES")]
    pub max_body_bytes: Option<usize>,
    /// Largest page of messages.
    #[arg(long, env = "FLEETLM_MAX_PAGE_SIZE")]
    pub max_page_size: Option<usize>,
    /// Deepest nesting allowed in message metadata.
    #[arg(long, env = "FLEETLM_MAX_METADATA_DEPTH")]
    pub max_metadata_depth: Option<usize>,
    /// Sessions unused this long (and fully archived) leave memory.
    #[arg(long, env = "FLEETLM_SESSION_IDLE_SECS")]
    pub session_idle_secs: Option<u64>,
    /// Comma-separated CORS origins; `*` (the default) allows any.
    #[arg(long, env = "FLEETLM_CORS_ORIGINS")]
    pub cors_origins: Option<String>,
    /// `text` or `json`.
    #[arg(long, env = "FLEETLM_LOG_FORMAT")]
    pub log_format: Option<String>,
    /// Close a WebSocket that sent nothing for this long.
    #[arg(long, env = "FLEETLM_WS_IDLE_TIMEOUT_SECS")]
    pub ws_idle_timeout_secs: Option<u64>,
    /// Largest WebSocket frame; bigger ones close the socket with 1009.
    #[arg(long, env = "FLEETLM_WS_MAX_FRAME_BYTES")]
    pub ws_max_frame_bytes: Option<usize>,
    /// Frames that may wait for a slow socket before it is told to resync or closed.
    #[arg(long, env = "FLEETLM_WS_OUTBOUND_QUEUE")]
    pub ws_outbound_queue: Option<usize>,
    /// Channels one socket may join.
    #[arg(long, env = "FLEETLM_WS_MAX_CHANNELS")]
    pub ws_max_channels: Option<usize>,
    /// Sockets one identity may hold open.
    #[arg(long, env = "FLEETLM_WS_MAX_SOCKETS_PER_IDENTITY")]
    pub ws_max_sockets_per_identity: Option<usize>,
    /// At most one inbox_delta per user per this interval.
    #[arg(long, env = "FLEETLM_INBOX_PUSH_INTERVAL_MS")]
    pub inbox_push_interval_ms: Option<u64>,
    /// Webhook attempts per dispatch (retries included).
    #[arg(long, env = "FLEETLM_AGENT_MAX_ATTEMPTS")]
    pub agent_max_attempts: Option<u32>,
    /// Bound on one whole dispatch, retries included.
    #[arg(long, env = "FLEETLM_DISPATCH_DEADLINE_SECS")]
    pub dispatch_deadline_secs: Option<u64>,
    /// Dispatches one agent may have in flight.
    #[arg(long, env = "FLEETLM_AGENT_MAX_IN_FLIGHT")]
    pub agent_max_in_flight: Option<usize>,
    /// Dispatches this node may have in flight.
    #[arg(long, env = "FLEETLM_MAX_DISPATCHES_IN_FLIGHT")]
    pub max_dispatches_in_flight: Option<usize>,
    /// Bound on the final archive flush at shutdown.
    #[arg(long, env = "FLEETLM_SHUTDOWN_DEADLINE_MS")]
    pub shutdown_deadline_ms: Option<u64>,
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
    pub max_page_size: usize,
    pub max_metadata_depth: usize,
    pub session_idle: Duration,
    /// `None` allows any origin.
    pub cors_origins: Option<Vec<String>>,
    pub log_format: LogFormat,
    pub ws_idle_timeout: Duration,
    pub ws_max_frame_bytes: usize,
    pub ws_outbound_queue: usize,
    pub ws_max_channels: usize,
    pub ws_max_sockets_per_identity: usize,
    pub inbox_push_interval: Duration,
    pub agent_max_attempts: u32,
    pub dispatch_deadline: Duration,
    pub agent_max_in_flight: usize,
    pub max_dispatches_in_flight: usize,
    pub shutdown_deadline: Duration,
}

pub const DEFAULT_SHARDS: u16 = 64;

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

impl Settings {
    /// Reads a TOML file of settings (keys as the long flag names with `_`).
    pub fn from_file(path: &std::path::Path) -> Result<Settings, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|e| invalid("config", format!("{}: {e}", path.display())))?;
        toml::from_str(&text).map_err(|e| invalid("config", format!("{}: {}", path.display(), e.message())))
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
            max_page_size,
            max_metadata_depth,
            session_idle_secs,
            cors_origins,
            log_format,
            ws_idle_timeout_secs,
            ws_max_frame_bytes,
            ws_outbound_queue,
            ws_max_channels,
            ws_max_sockets_per_identity,
            inbox_push_interval_ms,
            agent_max_attempts,
            dispatch_deadline_secs,
            agent_max_in_flight,
            max_dispatches_in_flight,
            shutdown_deadline_ms
        )
    }

    pub fn validate(self) -> Result<Config, ConfigError> {
        let http_addr: SocketAddr = self
            .http_addr
            .as_deref()
            .unwrap_or("127.0.0.1:4000")
            .parse()
            .map_err(|_| {
                invalid(
                    "http_addr",
                    "expected HOST:PORT with an IP address, e.g. 127.0.0.1:4000",
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
        let wal_segment_bytes = self.wal_segment_bytes.unwrap_or(128 * 1024 * 1024);
        if wal_segment_bytes < 64 * 1024 {
            return Err(invalid("wal_segment_bytes", "must be at least 65536"));
        }
        let max_message_bytes = self.max_message_bytes.unwrap_or(256 * 1024);
        if max_message_bytes == 0 || max_message_bytes as u64 > (wal_segment_bytes / 8).min(1024 * 1024) {
            return Err(invalid(
                "max_message_bytes",
                "must be positive, at most 1 MiB and an eighth of wal_segment_bytes",
            ));
        }
        let max_body_bytes = self.max_body_bytes.unwrap_or(1024 * 1024);
        if max_body_bytes == 0 {
            return Err(invalid("max_body_bytes", "must be positive"));
        }
        let max_page_size = self.max_page_size.unwrap_or(1000);
        if max_page_size == 0 {
            return Err(invalid("max_page_size", "must be positive"));
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
        let cors_origins = match self.cors_origins.as_deref().map(str::trim) {
            None | Some("*") | Some("") => None,
            Some(list) => Some(
                list.split(',')
                    .map(|o| o.trim().to_string())
                    .filter(|o| !o.is_empty())
                    .collect(),
            ),
        };
        Ok(Config {
            http_addr,
            data_dir: self.data_dir.unwrap_or_else(|| PathBuf::from("fleetlm-data")),
            database_url: self.database_url.filter(|u| !u.is_empty()),
            auth_secret,
            api_key: self.api_key.filter(|k| !k.is_empty()),
            insecure_open,
            shards: self.shards,
            wal_lanes,
            wal_segment_bytes,
            wal_budget_bytes: self.wal_budget_bytes.unwrap_or(8 * 1024 * 1024 * 1024),
            flush_interval: Duration::from_millis(flush_interval_ms),
            flush_threshold_bytes: self.flush_threshold_bytes.unwrap_or(4 * 1024 * 1024),
            max_message_bytes,
            max_body_bytes,
            max_page_size,
            max_metadata_depth: self.max_metadata_depth.unwrap_or(32),
            session_idle: Duration::from_secs(self.session_idle_secs.unwrap_or(15 * 60)),
            cors_origins,
            log_format,
            ws_idle_timeout: Duration::from_secs(self.ws_idle_timeout_secs.unwrap_or(60).max(1)),
            ws_max_frame_bytes: self.ws_max_frame_bytes.unwrap_or(1024 * 1024).max(1024),
            ws_outbound_queue: self.ws_outbound_queue.unwrap_or(1024).max(16),
            ws_max_channels: self.ws_max_channels.unwrap_or(100).max(1),
            ws_max_sockets_per_identity: self.ws_max_sockets_per_identity.unwrap_or(100).max(1),
            inbox_push_interval: Duration::from_millis(self.inbox_push_interval_ms.unwrap_or(1000)),
            agent_max_attempts: self.agent_max_attempts.unwrap_or(5).clamp(1, 20),
            dispatch_deadline: Duration::from_secs(self.dispatch_deadline_secs.unwrap_or(600).max(1)),
            agent_max_in_flight: self.agent_max_in_flight.unwrap_or(100).max(1),
            max_dispatches_in_flight: self.max_dispatches_in_flight.unwrap_or(1000).max(1),
            shutdown_deadline: Duration::from_millis(self.shutdown_deadline_ms.unwrap_or(10_000)),
        })
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
    fn unknown_file_keys_are_refused() {
        assert!(toml::from_str::<Settings>("wal_lanez = 3").is_err());
    }
}
