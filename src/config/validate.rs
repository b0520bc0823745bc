//! From settings to a checked `Config`: the file, the precedence, the defaults, and a clear
//! error naming the setting that is wrong.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use super::*;

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
            election_timeout_ms,
            leader_balance_secs
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
        let wal_lanes = self.wal_lanes;
        if wal_lanes.is_some_and(|lanes| !(1..=64).contains(&lanes)) {
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
pub(super) fn parse_listen_address(text: &str) -> Option<SocketAddr> {
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
