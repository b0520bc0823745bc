//! `ShardError`: why a shard request failed, and how WAL and consensus errors become one.

use crate::archive::ArchiveError;

#[derive(Debug, Clone, thiserror::Error, serde::Serialize, serde::Deserialize)]
pub enum ShardError {
    #[error("session not found")]
    NotFound,
    #[error("not a participant of this session")]
    NotParticipant,
    #[error("session is archived")]
    Archived,
    #[error("expected_seq does not match the session's last seq {last_seq}")]
    SeqConflict { last_seq: u64 },
    #[error("client_id was already used for a different message")]
    ClientIdConflict,
    #[error("session already exists")]
    SessionExists,
    #[error("the write-ahead log is over its budget")]
    Overloaded,
    #[error("shard unavailable: {0}")]
    Unavailable(String),
    /// The WAL lane failed a write or fsync: the shard refuses writes until a restart.
    #[error("storage failed: {0}")]
    StorageFailed(String),
    /// The disk is full: this request was not stored; the same request may succeed later.
    #[error("out of disk space: {0}")]
    OutOfSpace(String),
    /// The shard's log is damaged: it refuses new seqs (so none is ever reused).
    #[error("shard degraded: {0}")]
    Degraded(String),
    /// The archive holds less of the shard's log than it was given (restored from an older
    /// backup, a lagging replica): the shard refuses new seqs until an operator decides
    /// (`fleetlm archive accept`), so none is ever handed out twice.
    #[error("archive regressed: {0}")]
    ArchiveRegressed(String),
    /// The request's log operation could never fit in a log entry.
    #[error("the request takes {bytes} bytes in the log; the limit is {max}")]
    TooLarge { bytes: usize, max: usize },
    /// (Never sent to a peer: `routing` turns it into `Unavailable` first.)
    #[error(transparent)]
    #[serde(skip)]
    Archive(#[from] ArchiveError),
    /// Internal: the writer does not hold the session; load it from the archive and retry.
    #[error("session not loaded")]
    NotLoaded,
    /// Internal: the writer needs the non-user count at `seq` to move the read cursor there.
    #[error("read cursor target is not in memory")]
    NeedsCursorAt { seq: u64 },
    /// Cluster: this node does not lead the session's shard (`leader`: who does, if known).
    /// Internal: the router sends the request on; it reaches a client only as `NoLeader`.
    #[error("this node does not lead the shard")]
    NotLeader { leader: Option<u64> },
    /// Cluster: the shard has no leader now (an election, or this node is cut off from the
    /// majority), or leadership moved while the request was in flight and its outcome is
    /// unknown. Retry (an append with the same `client_id`).
    #[error("{0}")]
    NoLeader(String),
    /// Cluster: the request belongs to a leadership term that has ended (an agent's reply
    /// dispatched by a former leader: the new leader dispatches the turn itself).
    #[error("the shard's leadership changed since this request's dispatch began")]
    Superseded,
}

impl ShardError {
    /// The error a request gets when the WAL did not make its entry durable.
    pub fn from_wal(error: crate::wal::WalError) -> ShardError {
        use crate::wal::WalError;
        match error {
            WalError::OutOfSpace(detail) => ShardError::OutOfSpace(detail),
            WalError::EntryTooLarge { bytes, max } => ShardError::TooLarge { bytes, max },
            WalError::LaneFailed(detail) | WalError::Io(detail) => ShardError::StorageFailed(detail),
            other => ShardError::StorageFailed(other.to_string()),
        }
    }
}

impl ShardError {
    /// The error a request gets when its proposal did not commit.
    pub fn from_propose(error: crate::consensus::ProposeError) -> ShardError {
        use crate::consensus::ProposeError;
        match error {
            ProposeError::NotLeader { leader } => ShardError::NotLeader { leader },
            ProposeError::Unknown(detail) => {
                tracing::debug!(%detail, "proposal outcome unknown");
                ShardError::NoLeader(
                    "the shard's leadership changed while the write was in flight; its outcome is unknown: retry it (with the same client_id)".into(),
                )
            }
            ProposeError::Stopped(detail) => ShardError::StorageFailed(detail),
            ProposeError::TooLarge { bytes, max } => ShardError::TooLarge { bytes, max },
        }
    }
}
