//! The openraft type configuration: what a shard's Raft log carries and how nodes are named.

use std::fmt;
use std::io::Cursor;

use openraft::type_config::alias;
use serde::{Deserialize, Serialize};

/// One proposal: a shard writer's whole group-commit batch, already encoded (`shard::ops`). The
/// consensus layer never looks inside.
#[derive(Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ShardCommand(#[serde(with = "serde_bytes")] pub Vec<u8>);

impl fmt::Debug for ShardCommand {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "ShardCommand({} bytes)", self.0.len())
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
