//! openraft's state machine for one shard: committed entries go, in log order, to the shard's
//! consumer (`Applied`); snapshots are the shared archive.
//!
//! Every node archives into the same Postgres, so a snapshot needs no data of its own: a
//! snapshot "at index i" says "the archive holds every effect of the log through i". Building
//! one asks the consumer how far the archive reaches (`archived_through`); installing one on a
//! replica that fell behind the purged log tells its consumer to reload the shard from the
//! archive (`Applied::Reload`). The current snapshot's metadata is kept in a small file per shard
//! so a restarted node knows it (and its membership) after the log before it was purged.
//!
//! Indexes given to the consumer are shard log indexes (the WAL's, Raft index + 1).

use std::collections::{BTreeSet, VecDeque};
use std::io;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use futures_util::{Stream, TryStreamExt};
use openraft::storage::{EntryResponder, RaftStateMachine};
use openraft::vote::leader_id_std::CommittedLeaderId;
use openraft::{EntryPayload, OptionalSend, RaftSnapshotBuilder};
use serde::{Deserialize, Serialize};
use tokio::sync::mpsc;

use super::types::{LogId, ShardCommand, Snapshot, SnapshotData, SnapshotMeta, StoredMembership, TypeConfig};

/// What a shard's consumer receives, in log order.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Applied {
    /// A committed entry: the leader's command, or `None` for a Raft-internal entry (a new
    /// leader's blank entry, a membership) that the consumer only counts past.
    Entry {
        index: u64,
        term: u64,
        command: Option<Vec<u8>>,
    },
    /// This replica was behind the log the leader still had: reload the shard from the archive,
    /// which holds everything through `through`; entries after it follow.
    Reload { through: u64 },
}

#[derive(Serialize, Deserialize)]
struct SnapshotFile {
    version: u32,
    shard: u16,
    /// `(term, raft index)` of the last entry the snapshot covers.
    last: Option<(u64, u64)>,
    membership: Vec<u8>,
    /// Members recorded as having joined (`ShardCommand::Joined`, less those `Forgotten` since).
    joined: Vec<u64>,
    /// The cluster id (`ShardCommand::Identity`); absent in files written before it existed.
    #[serde(default)]
    cluster_id: Option<String>,
}

/// What a snapshot sent to a replica carries besides its metadata: shard 0's records.
#[derive(Serialize, Deserialize)]
struct SnapshotRecords {
    version: u32,
    shard: u16,
    joined: Vec<u64>,
    /// Absent in snapshots of nodes from before it existed.
    #[serde(default)]
    cluster_id: Option<String>,
}

const SNAPSHOT_VERSION: u32 = 1;

/// Memberships kept besides the current one: a snapshot below the newest, or a rewind past it
/// (`rewind_to_durable`), needs an earlier one. A change commits two (joint, then the new
/// one); more than a few never sit between a snapshot point, or the durable end, and the newest.
const EARLIER_MEMBERSHIPS: usize = 7;

struct Machine {
    last_applied: Option<LogId>,
    /// The memberships applied, oldest first: the current one last, and up to
    /// `EARLIER_MEMBERSHIPS` before it. Never empty.
    memberships: VecDeque<StoredMembership>,
    /// `(first raft index, term)` of each run of entries applied in one term, oldest first:
    /// the term of any applied index since the current snapshot.
    term_runs: VecDeque<(u64, u64)>,
    current: Option<SnapshotMeta>,
}

impl Machine {
    fn current_membership(&self) -> StoredMembership {
        self.memberships.back().cloned().unwrap_or_default()
    }

    /// The membership in force at `raft_index`: the newest applied at or below it (the oldest
    /// kept if none is).
    fn membership_at(&self, raft_index: u64) -> StoredMembership {
        self.memberships
            .iter()
            .rev()
            .find(|m| m.log_id().is_none_or(|id| id.index <= raft_index))
            .or_else(|| {
                tracing::error!(
                    raft_index,
                    "no membership kept at or below this point; the oldest kept stands in"
                );
                self.memberships.front()
            })
            .cloned()
            .unwrap_or_default()
    }

    fn term_of(&self, raft_index: u64) -> Option<u64> {
        self.term_runs
            .iter()
            .rev()
            .find(|(first, _)| *first <= raft_index)
            .map(|(_, term)| *term)
    }
}

/// Cheap to clone: openraft holds one as the state machine and hands clones out as builders.
#[derive(Clone)]
pub struct ShardStateMachine {
    shard: u16,
    /// Members recorded as having joined the cluster, as this replica has applied them.
    joined: Arc<Mutex<BTreeSet<u64>>>,
    /// The cluster id shard 0 recorded, as this replica has applied it.
    identity: Arc<Mutex<Option<String>>>,
    applied: mpsc::Sender<Applied>,
    archived_through: Arc<AtomicU64>,
    snapshot_path: PathBuf,
    machine: Arc<Mutex<Machine>>,
    /// Held while the current snapshot is replaced (file and memory together).
    keeping: Arc<Mutex<()>>,
    /// The instance of the group this handle serves (`fence`): a stopped instance's state
    /// machine worker may still be applying when its replacement starts; it must stop there.
    generation: u64,
    current_generation: Arc<std::sync::atomic::AtomicU64>,
    /// Held while entries are applied or a snapshot installed, so a fence waits for it.
    applying: Arc<tokio::sync::Mutex<()>>,
}

impl ShardStateMachine {
    /// `archived_through` is written by the consumer: the shard log index through which the
    /// shared archive holds every effect of the log.
    pub fn open(
        snapshot_dir: &Path,
        shard: u16,
        applied: mpsc::Sender<Applied>,
        archived_through: Arc<AtomicU64>,
    ) -> io::Result<ShardStateMachine> {
        std::fs::create_dir_all(snapshot_dir)?;
        let snapshot_path = snapshot_dir.join(format!("{shard:05}.snapshot"));
        let (current, joined, identity) = match read_snapshot_file(&snapshot_path, shard)? {
            Some((meta, joined, identity)) => (Some(meta), joined, identity),
            None => (None, BTreeSet::new(), None),
        };
        Ok(ShardStateMachine {
            shard,
            joined: Arc::new(Mutex::new(joined)),
            identity: Arc::new(Mutex::new(identity)),
            applied,
            archived_through,
            snapshot_path,
            machine: Arc::new(Mutex::new(Machine {
                last_applied: None,
                memberships: VecDeque::from([StoredMembership::default()]),
                term_runs: VecDeque::new(),
                current,
            })),
            keeping: Arc::new(Mutex::new(())),
            generation: 0,
            current_generation: Arc::new(std::sync::atomic::AtomicU64::new(0)),
            applying: Arc::new(tokio::sync::Mutex::new(())),
        })
    }

    /// Stops every handle given out so far from applying anything more (waiting for an apply in
    /// progress to end), and returns a handle for the group's next instance.
    pub async fn fence(&self) -> ShardStateMachine {
        let next = self.current_generation.fetch_add(1, Ordering::AcqRel) + 1;
        drop(self.applying.lock().await);
        ShardStateMachine {
            generation: next,
            ..self.clone()
        }
    }

    fn stale(&self) -> Result<(), io::Error> {
        if self.current_generation.load(Ordering::Acquire) == self.generation {
            Ok(())
        } else {
            Err(io::Error::other("this instance of the shard's group was replaced"))
        }
    }

    /// The snapshot as of what the archive holds, or `None` if it would not be newer than the
    /// current one (unless `force`).
    fn snapshot_now(&self, force: bool) -> Option<SnapshotMeta> {
        let machine = self.machine.lock().expect("machine lock");
        let applied = machine.last_applied?;
        let archived = self.archived_through.load(Ordering::Acquire);
        let current_index = machine.current.as_ref().and_then(|m| m.last_log_id).map(|id| id.index);
        // Shard log index `archived` is raft index `archived - 1`.
        let position = archived.checked_sub(1).map(|raft| raft.min(applied.index));
        let newer = match (position, current_index) {
            (Some(p), Some(c)) => p > c,
            (Some(_), None) => true,
            (None, _) => false,
        };
        if !newer {
            return if force { machine.current.clone() } else { None };
        }
        let position = position.expect("newer implies a position");
        let term = machine.term_of(position)?;
        let last_membership = machine.membership_at(position);
        Some(SnapshotMeta {
            last_log_id: Some(LogId {
                leader_id: CommittedLeaderId::new(term),
                index: position,
            }),
            last_membership,
        })
    }

    /// Rewinds what this replica counts as applied to the end of its durable log (or its current
    /// snapshot, if that is newer), before an instance of the group starts again after an error.
    ///
    /// openraft applies a follower's accepted entries before they are durable; if the append
    /// then failed (disk full), the next instance would find `last_applied` past the log's end
    /// and purge the log up to it: a hole that no snapshot covers, which this member could
    /// never serve to a follower behind it. Instead the entries past the durable end are
    /// applied again once the log holds them again; the consumer skips the indexes it already
    /// has (`ReplicaLink::on_applied`, `ShardState::applied_index`). Returns whether it rewound.
    pub fn rewind_to_durable(&self, durable_end: Option<LogId>) -> bool {
        let mut machine = self.machine.lock().expect("machine lock");
        let snapshot_end = machine.current.as_ref().and_then(|meta| meta.last_log_id);
        let keep = durable_end.max(snapshot_end);
        if machine.last_applied <= keep {
            return false;
        }
        tracing::warn!(
            shard = self.shard,
            applied = ?machine.last_applied,
            durable = ?keep,
            "entries were applied past the durable log before an append failed; they are applied again once stored"
        );
        machine.last_applied = keep;
        let keep_index = keep.map(|id| id.index);
        while machine
            .term_runs
            .back()
            .is_some_and(|(first, _)| keep_index.is_none_or(|keep| *first > keep))
        {
            machine.term_runs.pop_back();
        }
        while machine.memberships.len() > 1
            && machine
                .memberships
                .back()
                .is_some_and(|m| m.log_id().is_some_and(|id| Some(id) > keep))
        {
            machine.memberships.pop_back();
        }
        if machine.current_membership().log_id().is_some_and(|id| Some(id) > keep) {
            tracing::error!(
                shard = self.shard,
                "more memberships were applied past the durable log than are kept; the oldest kept stands"
            );
        }
        true
    }

    /// The members recorded as joined (shard 0 records them).
    pub fn joined(&self) -> Arc<Mutex<BTreeSet<u64>>> {
        self.joined.clone()
    }

    /// The cluster id (shard 0 records it).
    pub fn identity(&self) -> Arc<Mutex<Option<String>>> {
        self.identity.clone()
    }

    /// Keeps the first id recorded: the shared record makes every leader propose the same one.
    fn record_identity(&self, id: String) {
        let mut identity = self.identity.lock().expect("identity lock");
        match identity.as_deref() {
            None => *identity = Some(id),
            Some(kept) if kept == id => {}
            Some(kept) => tracing::error!(
                shard = self.shard,
                kept,
                proposed = id.as_str(),
                "the log records a second cluster id; the first is kept"
            ),
        }
    }

    /// Makes `meta` the current snapshot (file first), unless a newer one already is: building
    /// and installing may race, and the current snapshot only ever moves forward.
    fn keep_as_current(&self, meta: &SnapshotMeta) -> io::Result<()> {
        let _one_at_a_time = self.keeping.lock().expect("keeping lock");
        let current = self.machine.lock().expect("machine lock").current.clone();
        if current.is_some_and(|c| c.last_log_id >= meta.last_log_id) {
            return Ok(());
        }
        let joined = self.joined.lock().expect("joined lock").clone();
        let identity = self.identity.lock().expect("identity lock").clone();
        write_snapshot_file(&self.snapshot_path, self.shard, meta, &joined, identity)?;
        let mut machine = self.machine.lock().expect("machine lock");
        if let Some(position) = meta.last_log_id {
            // Term runs wholly before the snapshot are no longer needed.
            while machine.term_runs.len() > 1 && machine.term_runs[1].0 <= position.index {
                machine.term_runs.pop_front();
            }
        }
        machine.current = Some(meta.clone());
        Ok(())
    }

    fn snapshot_of(&self, meta: SnapshotMeta) -> Snapshot {
        let records = SnapshotRecords {
            version: SNAPSHOT_VERSION,
            shard: self.shard,
            joined: self.joined.lock().expect("joined lock").iter().copied().collect(),
            cluster_id: self.identity.lock().expect("identity lock").clone(),
        };
        let data = rmp_serde::to_vec(&records).expect("encodes");
        Snapshot {
            meta,
            snapshot: SnapshotData::new(data),
        }
    }
}

type SnapshotFileContents = (SnapshotMeta, BTreeSet<u64>, Option<String>);

fn read_snapshot_file(path: &Path, shard: u16) -> io::Result<Option<SnapshotFileContents>> {
    let bytes = match std::fs::read(path) {
        Ok(bytes) => bytes,
        Err(error) if error.kind() == io::ErrorKind::NotFound => return Ok(None),
        Err(error) => return Err(error),
    };
    let invalid = |what: String| io::Error::new(io::ErrorKind::InvalidData, what);
    let file: SnapshotFile = rmp_serde::from_slice(&bytes)
        .map_err(|e| invalid(format!("snapshot file {} is unreadable: {e}", path.display())))?;
    if file.version != SNAPSHOT_VERSION || file.shard != shard {
        return Err(invalid(format!(
            "snapshot file {} is not shard {shard}'s",
            path.display()
        )));
    }
    let last_membership: StoredMembership = rmp_serde::from_slice(&file.membership)
        .map_err(|e| invalid(format!("snapshot file {} membership: {e}", path.display())))?;
    let meta = SnapshotMeta {
        last_log_id: file.last.map(|(term, index)| LogId {
            leader_id: CommittedLeaderId::new(term),
            index,
        }),
        last_membership,
    };
    Ok(Some((meta, file.joined.into_iter().collect(), file.cluster_id)))
}

/// Written to a temporary file, fsync'd, renamed over the old one, directory fsync'd.
fn write_snapshot_file(
    path: &Path,
    shard: u16,
    meta: &SnapshotMeta,
    joined: &BTreeSet<u64>,
    cluster_id: Option<String>,
) -> io::Result<()> {
    let file = SnapshotFile {
        version: SNAPSHOT_VERSION,
        shard,
        last: meta.last_log_id.map(|id| (id.leader_id.term, id.index)),
        membership: rmp_serde::to_vec(&meta.last_membership).map_err(io::Error::other)?,
        joined: joined.iter().copied().collect(),
        cluster_id,
    };
    let bytes = rmp_serde::to_vec(&file).map_err(io::Error::other)?;
    let temporary = path.with_extension("snapshot.tmp");
    {
        use std::io::Write;
        let mut out = std::fs::File::create(&temporary)?;
        out.write_all(&bytes)?;
        out.sync_data()?;
    }
    std::fs::rename(&temporary, path)?;
    let dir = path.parent().expect("snapshot files live in a directory");
    std::fs::File::open(dir)?.sync_all()
}

impl RaftSnapshotBuilder<TypeConfig> for ShardStateMachine {
    type SnapshotData = SnapshotData;

    async fn build_snapshot(&mut self) -> Result<Snapshot, io::Error> {
        let meta = self
            .snapshot_now(true)
            .ok_or_else(|| io::Error::other(format!("shard {}: nothing archived to snapshot yet", self.shard)))?;
        let this = self.clone();
        let kept = meta.clone();
        tokio::task::spawn_blocking(move || this.keep_as_current(&kept))
            .await
            .map_err(io::Error::other)??;
        Ok(self.snapshot_of(meta))
    }
}

impl RaftStateMachine<TypeConfig> for ShardStateMachine {
    type SnapshotData = SnapshotData;
    type SnapshotBuilder = ShardStateMachine;

    async fn applied_state(&mut self) -> Result<(Option<LogId>, StoredMembership), io::Error> {
        let machine = self.machine.lock().expect("machine lock");
        Ok((machine.last_applied, machine.current_membership()))
    }

    async fn apply<Strm>(&mut self, mut entries: Strm) -> Result<(), io::Error>
    where
        Strm: Stream<Item = Result<EntryResponder<TypeConfig>, io::Error>> + Unpin + OptionalSend,
    {
        let applying = self.applying.clone();
        let _applying = applying.lock().await;
        self.stale()?;
        while let Some((entry, responder)) = entries.try_next().await? {
            let log_id = entry.log_id;
            let command = match entry.payload {
                EntryPayload::Normal(ShardCommand::App(command)) => Some(command),
                EntryPayload::Normal(ShardCommand::Joined(node)) => {
                    self.joined.lock().expect("joined lock").insert(node);
                    None
                }
                EntryPayload::Normal(ShardCommand::Forgotten(node)) => {
                    self.joined.lock().expect("joined lock").remove(&node);
                    None
                }
                EntryPayload::Normal(ShardCommand::Identity(id)) => {
                    self.record_identity(id);
                    None
                }
                EntryPayload::Blank => None,
                EntryPayload::Membership(membership) => {
                    let mut machine = self.machine.lock().expect("machine lock");
                    machine
                        .memberships
                        .push_back(StoredMembership::new(Some(log_id), membership));
                    if machine.memberships.len() > EARLIER_MEMBERSHIPS + 1 {
                        machine.memberships.pop_front();
                    }
                    None
                }
            };
            {
                let mut machine = self.machine.lock().expect("machine lock");
                if machine
                    .term_runs
                    .back()
                    .is_none_or(|(_, term)| *term != log_id.leader_id.term)
                {
                    machine.term_runs.push_back((log_id.index, log_id.leader_id.term));
                }
                machine.last_applied = Some(log_id);
            }
            let applied = Applied::Entry {
                index: log_id.index + 1,
                term: log_id.leader_id.term,
                command,
            };
            // Waits when the consumer is behind: applying is paced by the consumer.
            self.applied
                .send(applied)
                .await
                .map_err(|_| io::Error::other(format!("shard {}: the consumer is gone", self.shard)))?;
            if let Some(responder) = responder {
                responder.send(());
            }
        }
        Ok(())
    }

    async fn try_create_snapshot_builder(&mut self, force: bool) -> Option<Self::SnapshotBuilder> {
        if force || self.snapshot_now(false).is_some() {
            Some(self.clone())
        } else {
            None
        }
    }

    async fn get_snapshot_builder(&mut self) -> Self::SnapshotBuilder {
        self.clone()
    }

    async fn install_snapshot(&mut self, meta: &SnapshotMeta, snapshot: SnapshotData) -> Result<(), io::Error> {
        let applying = self.applying.clone();
        let _applying = applying.lock().await;
        self.stale()?;
        let SnapshotRecords {
            version,
            shard,
            joined,
            cluster_id,
        } = rmp_serde::from_slice(snapshot.get_ref())
            .map_err(|e| io::Error::new(io::ErrorKind::InvalidData, format!("snapshot data: {e}")))?;
        if version != SNAPSHOT_VERSION || shard != self.shard {
            return Err(io::Error::new(
                io::ErrorKind::InvalidData,
                format!(
                    "a snapshot of shard {shard} (version {version}) sent to shard {}",
                    self.shard
                ),
            ));
        }
        // The snapshot's set replaces this replica's: a member forgotten since must not linger.
        *self.joined.lock().expect("joined lock") = joined.into_iter().collect();
        if let Some(id) = cluster_id {
            self.record_identity(id);
        }
        let this = self.clone();
        let kept = meta.clone();
        tokio::task::spawn_blocking(move || this.keep_as_current(&kept))
            .await
            .map_err(io::Error::other)??;
        {
            let mut machine = self.machine.lock().expect("machine lock");
            machine.last_applied = meta.last_log_id;
            machine.memberships = VecDeque::from([meta.last_membership.clone()]);
            machine.term_runs.clear();
            if let Some(last) = meta.last_log_id {
                machine.term_runs.push_back((last.index, last.leader_id.term));
            }
        }
        let through = meta.last_log_id.map_or(0, |id| id.index + 1);
        self.applied
            .send(Applied::Reload { through })
            .await
            .map_err(|_| io::Error::other(format!("shard {}: the consumer is gone", self.shard)))
    }

    async fn get_current_snapshot(&mut self) -> Result<Option<Snapshot>, io::Error> {
        let current = self.machine.lock().expect("machine lock").current.clone();
        Ok(current.map(|meta| self.snapshot_of(meta)))
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;
    use std::sync::atomic::AtomicU64;

    use openraft::vote::leader_id_std::CommittedLeaderId;

    use super::{LogId, SNAPSHOT_VERSION, ShardStateMachine, SnapshotMeta, SnapshotRecords};

    fn log_id(term: u64, index: u64) -> LogId {
        LogId {
            leader_id: CommittedLeaderId::new(term),
            index,
        }
    }

    fn machine_applied_through(term_runs: &[(u64, u64)], applied: LogId) -> (ShardStateMachine, tempfile::TempDir) {
        let dir = tempfile::tempdir().unwrap();
        let (sender, _receiver) = tokio::sync::mpsc::channel(1);
        let machine = ShardStateMachine::open(dir.path(), 3, sender, Arc::new(AtomicU64::new(0))).unwrap();
        {
            let mut inner = machine.machine.lock().unwrap();
            inner.last_applied = Some(applied);
            inner.term_runs = term_runs.iter().copied().collect();
        }
        (machine, dir)
    }

    #[test]
    fn a_restarted_instance_counts_as_applied_only_what_its_log_holds_durably() {
        let (machine, _dir) = machine_applied_through(&[(0, 1), (5, 2), (8, 3)], log_id(3, 9));
        assert!(machine.rewind_to_durable(Some(log_id(2, 6))));
        let inner = machine.machine.lock().unwrap();
        assert_eq!(inner.last_applied, Some(log_id(2, 6)));
        assert_eq!(
            inner.term_runs.iter().copied().collect::<Vec<_>>(),
            vec![(0, 1), (5, 2)]
        );
        assert_eq!(inner.term_of(6), Some(2));
        drop(inner);
        // Nothing to rewind when the log reaches as far as what was applied.
        assert!(!machine.rewind_to_durable(Some(log_id(2, 6))));
        assert!(!machine.rewind_to_durable(Some(log_id(3, 12))));
        // An empty log rewinds everything.
        assert!(machine.rewind_to_durable(None));
        let inner = machine.machine.lock().unwrap();
        assert_eq!(inner.last_applied, None);
        assert!(inner.term_runs.is_empty());
    }

    #[test]
    fn a_rewind_past_several_memberships_restores_the_one_in_force_at_the_durable_end() {
        let (machine, _dir) = machine_applied_through(&[(0, 1)], log_id(1, 9));
        let at = |index: u64| super::StoredMembership::new(Some(log_id(1, index)), Default::default());
        {
            let mut inner = machine.machine.lock().unwrap();
            // A joint change and its end (5 and 6) after the one at 2, then another at 8.
            for index in [2, 5, 6, 8] {
                inner.memberships.push_back(at(index));
            }
            // A snapshot between them takes the membership in force at its point.
            assert_eq!(inner.membership_at(7).log_id(), &Some(log_id(1, 6)));
            assert_eq!(inner.membership_at(4).log_id(), &Some(log_id(1, 2)));
            assert_eq!(inner.membership_at(1).log_id(), &None);
        }
        // Applied through 9, durable through 4: the memberships at 5, 6 and 8 are undone.
        assert!(machine.rewind_to_durable(Some(log_id(1, 4))));
        let inner = machine.machine.lock().unwrap();
        assert_eq!(inner.current_membership().log_id(), &Some(log_id(1, 2)));
        assert_eq!(inner.last_applied, Some(log_id(1, 4)));
    }

    #[test]
    fn a_restarted_instance_keeps_what_its_current_snapshot_covers() {
        let (machine, _dir) = machine_applied_through(&[(0, 1), (5, 2)], log_id(2, 9));
        machine.machine.lock().unwrap().current = Some(SnapshotMeta {
            last_log_id: Some(log_id(2, 7)),
            last_membership: Default::default(),
        });
        assert!(machine.rewind_to_durable(Some(log_id(1, 4))));
        assert_eq!(machine.machine.lock().unwrap().last_applied, Some(log_id(2, 7)));
    }

    #[test]
    fn a_snapshot_from_before_the_cluster_id_still_decodes() {
        let old = rmp_serde::to_vec(&(SNAPSHOT_VERSION, 0u16, vec![1u64, 2, 3])).unwrap();
        let records: SnapshotRecords = rmp_serde::from_slice(&old).unwrap();
        assert_eq!(records.joined, vec![1, 2, 3]);
        assert_eq!(records.cluster_id, None);
        let new = SnapshotRecords {
            version: SNAPSHOT_VERSION,
            shard: 0,
            joined: vec![1],
            cluster_id: Some("id".into()),
        };
        let decoded: SnapshotRecords = rmp_serde::from_slice(&rmp_serde::to_vec(&new).unwrap()).unwrap();
        assert_eq!(decoded.cluster_id.as_deref(), Some("id"));
    }
}
