//! The cluster's identity: an id made once, when the cluster forms, so that no combination of
//! wiped disks can start a second history beside the first.
//!
//! It is kept in three places:
//! - the shared Postgres (`IdentityRecords`, implemented by the server over the archive): the id,
//!   written by shard 0's first leader (insert-if-absent, so racing leaders agree on one), and
//!   the members that took part, each recorded before shard 0's log records it joined and
//!   removed when the operator forgets it;
//! - shard 0's log (`ShardCommand::Identity`), kept in its snapshots like the joined members;
//! - each member's data directory (the server writes it to `fleetlm.json` once the member holds
//!   the log).
//!
//! What it decides, at a node's start:
//! - a node with empty storage forms a cluster (initializes its groups with the configured
//!   membership) only while Postgres holds no id, and even then only once a majority of the
//!   members confirmed they are empty too (`formation`);
//! - with an id in Postgres, an empty node never initializes anything: a member recorded there
//!   lost its storage and is refused (the server checks this before starting consensus); any
//!   other member waits until shard 0's leader confirms it never joined (a member started late,
//!   or one the operator forgot to replace it), then receives the log;
//! - a data directory that records one id refuses to start against a Postgres holding another,
//!   or none, or with its logs gone.
//!
//! An archive that cannot be reached is waited for: "no answer" is never taken for "no id".

use std::future::Future;
use std::pin::Pin;

pub type BoxFuture<'a, T> = Pin<Box<dyn Future<Output = T> + Send + 'a>>;

/// The shared record of the cluster's identity (the shared Postgres). Errors are sentences
/// without addresses or secrets.
pub trait IdentityRecords: Send + Sync + 'static {
    /// The cluster's id, if one was recorded.
    fn cluster_id(&self) -> BoxFuture<'_, Result<Option<String>, String>>;
    /// Records `candidate` unless an id is recorded already; returns the recorded id.
    fn claim(&self, candidate: String) -> BoxFuture<'_, Result<String, String>>;
    /// Records that member `node` took part (idempotent).
    fn record_member(&self, node: u64) -> BoxFuture<'_, Result<(), String>>;
    /// Forgets that member `node` took part (idempotent).
    fn forget_member(&self, node: u64) -> BoxFuture<'_, Result<(), String>>;
}

/// A new cluster id.
pub fn new_cluster_id() -> String {
    uuid::Uuid::now_v7().to_string()
}
