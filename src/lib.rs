//! FleetLM: a conversation engine for stateless AI agents. See `docs/ARCHITECTURE.md`.

pub mod agents;
pub mod api;
pub mod archive;
mod archive_at_start;
pub mod auth;
mod background;
pub mod clock;
pub mod cluster;
pub mod cluster_identity;
pub mod cluster_status;
pub mod config;
pub mod consensus;
pub mod console;
pub mod file_urls;
pub mod gateway;
pub mod hub;
pub mod ids;
pub mod logging;
pub mod metrics;
pub mod model;
pub mod operator;
pub mod placement;
mod rfc3339;
pub mod server;
pub mod shard;
pub mod supervisor;
pub mod wal;
