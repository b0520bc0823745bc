//! The openraft type configuration: what a shard's Raft log carries and how nodes are named.

use std::fmt;
use std::io::Cursor;

use openraft::type_config::alias;
use serde::{Deserialize, Serialize};

/// What a log entry carries besides Raft's own entries.
#[derive(Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum ShardCommand {
    /// A shard writer's whole group-commit batch, already encoded (`shard::ops`). The consensus
    /// layer never looks inside.
    App(#[serde(with = "serde_bytes")] Vec<u8>),
    /// Shard 0's log records each member once it holds the cluster's log, so that member can
    /// never come back empty and vote as if it had never voted (see `mod.rs`, wiped nodes).
    Joined(u64),
    /// Shard 0's log forgets a member the operator removed from every group to replace its
    /// lost storage (`membership`): from then on it may start empty once more.
    Forgotten(u64),
    /// Shard 0's log records the cluster's id, made when it formed (`identity`). Appended last,
    /// so entries already written decode as before.
    Identity(String),
}

impl fmt::Debug for ShardCommand {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ShardCommand::App(bytes) => write!(f, "App({} bytes)", bytes.len()),
            ShardCommand::Joined(node) => write!(f, "Joined({node})"),
            ShardCommand::Forgotten(node) => write!(f, "Forgotten({node})"),
            ShardCommand::Identity(id) => write!(f, "Identity({id})"),
        }
    }
}

impl fmt::Display for ShardCommand {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Debug::fmt(self, f)
    }
}

/// A member as the replicated membership names it. Addresses are deliberately not replicated:
/// each node dials its peers at the addresses of its own `--cluster-peers`, so an address change
/// is a configuration change, not a log entry.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Member {}

impl fmt::Display for Member {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("member")
    }
}

openraft::declare_raft_types!(
    /// FleetLM's Raft: standard Raft leader ids (one leader per term), so a log id is exactly the
    /// WAL's `(term, index)`.
    pub TypeConfig:
        D = ShardCommand,
        R = (),
        NodeId = u64,
        Node = Member,
        LeaderId = openraft::impls::leader_id_std::LeaderId<u64, u64>,
);

pub type Raft = openraft::Raft<TypeConfig, super::state_machine::ShardStateMachine>;
pub type Entry = alias::EntryOf<TypeConfig>;
pub type LogId = alias::LogIdOf<TypeConfig>;
pub type Vote = alias::VoteOf<TypeConfig>;
pub type StoredMembership = alias::StoredMembershipOf<TypeConfig>;
pub type SnapshotMeta = alias::SnapshotMetaOf<TypeConfig>;
pub type Snapshot = alias::SnapshotOf<TypeConfig, SnapshotData>;
pub type SnapshotData = Cursor<Vec<u8>>;
