//! A cluster member's identity checks at start, and the shared Postgres as the record of the
//! cluster's identity (`consensus::identity` says what it decides).

use std::sync::Arc;
use std::time::Duration;

use anyhow::bail;

use crate::archive::{Archive, ArchiveError};
use crate::consensus::identity::{BoxFuture, IdentityRecords};
use crate::consensus::{Consensus, wiped_member};
use crate::wal::Wal;

/// The archive as the shared record of the cluster's identity.
pub struct ArchiveRecords(pub Archive);

fn sentence(error: ArchiveError) -> String {
    error.to_string()
}

impl IdentityRecords for ArchiveRecords {
    fn cluster_id(&self) -> BoxFuture<'_, Result<Option<String>, String>> {
        Box::pin(async move { self.0.cluster_id().await.map_err(sentence) })
    }

    fn claim(&self, candidate: String) -> BoxFuture<'_, Result<String, String>> {
        Box::pin(async move { self.0.claim_cluster_id(&candidate).await.map_err(sentence) })
    }

    fn record_member(&self, node: u64) -> BoxFuture<'_, Result<(), String>> {
        Box::pin(async move { self.0.record_member(node).await.map_err(sentence) })
    }

    fn forget_member(&self, node: u64) -> BoxFuture<'_, Result<(), String>> {
        Box::pin(async move { self.0.forget_member(node).await.map_err(sentence) })
    }
}

/// Retries a read of the archive while it is unavailable (never taking "no answer" for an
/// answer); other errors end the start.
async fn read_waiting<T, F, Fut>(what: &str, read: F) -> anyhow::Result<T>
where
    F: Fn() -> Fut,
    Fut: std::future::Future<Output = Result<T, ArchiveError>>,
{
    let mut delay = Duration::from_millis(250);
    loop {
        match read().await {
            Ok(value) => return Ok(value),
            Err(ArchiveError::Unavailable(error)) => {
                tracing::warn!(%error, retry_in_ms = delay.as_millis() as u64, "cannot read {what} from the archive; waiting for it");
                tokio::time::sleep(delay).await;
                delay = (delay * 2).min(Duration::from_secs(5));
            }
            Err(error) => bail!("cannot read {what} from the archive: {error}"),
        }
    }
}

/// Refuses to start a member whose data directory and archive disagree about the cluster, or
/// that took part and lost its storage. `recorded` is the cluster id of the data directory.
pub async fn check_at_start(
    archive: &Archive,
    wal: &Wal,
    node_id: u64,
    recorded: Option<&str>,
    data_dir: &std::path::Path,
) -> anyhow::Result<()> {
    let shared = read_waiting("the cluster id", || archive.cluster_id()).await?;
    let empty = Consensus::holds_nothing(wal).map_err(|e| anyhow::anyhow!("cannot read the consensus state: {e}"))?;
    let dir = data_dir.display();
    // Empty, and the archive records this member as one that took part: it lost its storage.
    let lost_storage = recorded.is_none()
        && shared.is_some()
        && empty
        && read_waiting("the cluster's members", || archive.member_recorded(node_id)).await?;
    match (recorded, shared.as_deref()) {
        (Some(mine), None) => bail!(
            "invalid configuration: database_url: the data directory {dir} belongs to cluster {mine}, but the archive records no cluster: point database_url at that cluster's database"
        ),
        (Some(mine), Some(theirs)) if mine != theirs => bail!(
            "invalid configuration: database_url: the data directory {dir} belongs to cluster {mine}, but the archive belongs to cluster {theirs}: point database_url at cluster {mine}'s database, or start this member on an empty data_dir to replace a member of cluster {theirs}"
        ),
        (Some(mine), Some(_)) if empty => bail!(
            "invalid configuration: data_dir: the data directory {dir} belongs to cluster {mine} but holds no log (lost?): {}",
            wiped_member(node_id)
        ),
        (None, Some(_)) if lost_storage => {
            bail!("invalid configuration: data_dir: {}", wiped_member(node_id))
        }
        _ => {}
    }
    Ok(())
}

/// How often a member checks whether it may write the cluster id into its data directory.
const PERSIST_CHECK: Duration = Duration::from_millis(500);

/// Waits until this member holds the log (shard 0 recorded it joined, and the cluster's id),
/// then writes the id into its data directory with `persist`. Returns why it refuses to go on,
/// if the log's id is not the archive's.
pub async fn persist_once_joined(
    consensus: Arc<Consensus>,
    archive: Archive,
    persist: impl Fn(&str) -> anyhow::Result<()>,
    mut stop: tokio::sync::watch::Receiver<bool>,
) -> Option<String> {
    loop {
        tokio::select! {
            _ = tokio::time::sleep(PERSIST_CHECK) => {}
            _ = stop.wait_for(|stop| *stop) => return None,
        }
        let Some(id) = consensus.cluster_id() else { continue };
        if !consensus.joined().contains(&consensus.node_id()) {
            continue;
        }
        match archive.cluster_id().await {
            Ok(Some(shared)) if shared == id => match persist(&id) {
                Ok(()) => return None,
                Err(error) => tracing::warn!(%error, "cannot record the cluster id in the data directory; retried"),
            },
            Ok(Some(shared)) => {
                return Some(format!(
                    "this member's log belongs to cluster {id}, but the archive belongs to cluster {shared}: point database_url at cluster {id}'s database"
                ));
            }
            Ok(None) | Err(_) => {}
        }
    }
}
