//! The cluster's identity as the shared Postgres keeps it (cluster mode only): the id made when
//! the cluster formed, and the members that took part. A node with empty storage reads them to
//! tell whether it may form a cluster (no id yet), is a member that lost its storage (recorded
//! here), or is a new member waiting for the log (`consensus::identity`).

use super::postgres::{PostgresArchive, from_pg};
use super::{Archive, ArchiveError, Backend, Result};

impl PostgresArchive {
    pub async fn cluster_id(&self) -> Result<Option<String>> {
        let row = self
            .client()
            .await?
            .query_opt("SELECT cluster_id FROM cluster_identity WHERE id = 1", &[])
            .await
            .map_err(from_pg)?;
        Ok(row.map(|row| row.get(0)))
    }

    /// Records `candidate` unless an id is recorded already; returns the recorded one (two
    /// formers racing agree on the first).
    pub async fn claim_cluster_id(&self, candidate: &str) -> Result<String> {
        let client = self.client().await?;
        client
            .execute(
                "INSERT INTO cluster_identity (id, cluster_id, formed_at)
                 VALUES (1, $1, (extract(epoch FROM now()) * 1000)::bigint)
                 ON CONFLICT (id) DO NOTHING",
                &[&candidate],
            )
            .await
            .map_err(from_pg)?;
        let row = client
            .query_one("SELECT cluster_id FROM cluster_identity WHERE id = 1", &[])
            .await
            .map_err(from_pg)?;
        Ok(row.get(0))
    }

    pub async fn record_member(&self, node: u64) -> Result<()> {
        self.client()
            .await?
            .execute(
                "INSERT INTO cluster_members (node_id, recorded_at)
                 VALUES ($1, (extract(epoch FROM now()) * 1000)::bigint)
                 ON CONFLICT (node_id) DO NOTHING",
                &[&(node as i64)],
            )
            .await
            .map_err(from_pg)
            .map(|_| ())
    }

    pub async fn forget_member(&self, node: u64) -> Result<()> {
        self.client()
            .await?
            .execute("DELETE FROM cluster_members WHERE node_id = $1", &[&(node as i64)])
            .await
            .map_err(from_pg)
            .map(|_| ())
    }

    pub async fn member_recorded(&self, node: u64) -> Result<bool> {
        let row = self
            .client()
            .await?
            .query_one(
                "SELECT EXISTS (SELECT 1 FROM cluster_members WHERE node_id = $1)",
                &[&(node as i64)],
            )
            .await
            .map_err(from_pg)?;
        Ok(row.get(0))
    }
}

/// The SQLite archive serves a single node, which has no cluster identity.
fn single_node() -> ArchiveError {
    ArchiveError::Rejected("a cluster identity needs the shared Postgres archive".into())
}

impl Archive {
    /// The id of the cluster this archive belongs to, if one formed.
    pub async fn cluster_id(&self) -> Result<Option<String>> {
        match &self.backend {
            Backend::Postgres(pg) => pg.cluster_id().await,
            Backend::Sqlite(_) => Err(single_node()),
        }
    }

    /// Records `candidate` as the cluster's id unless one is; returns the recorded one.
    pub async fn claim_cluster_id(&self, candidate: &str) -> Result<String> {
        match &self.backend {
            Backend::Postgres(pg) => pg.claim_cluster_id(candidate).await,
            Backend::Sqlite(_) => Err(single_node()),
        }
    }

    /// Records that member `node` took part (idempotent).
    pub async fn record_member(&self, node: u64) -> Result<()> {
        match &self.backend {
            Backend::Postgres(pg) => pg.record_member(node).await,
            Backend::Sqlite(_) => Err(single_node()),
        }
    }

    /// Forgets that member `node` took part (idempotent): the operator replaces it.
    pub async fn forget_member(&self, node: u64) -> Result<()> {
        match &self.backend {
            Backend::Postgres(pg) => pg.forget_member(node).await,
            Backend::Sqlite(_) => Err(single_node()),
        }
    }

    /// Whether member `node` is recorded as having taken part.
    pub async fn member_recorded(&self, node: u64) -> Result<bool> {
        match &self.backend {
            Backend::Postgres(pg) => pg.member_recorded(node).await,
            Backend::Sqlite(_) => Err(single_node()),
        }
    }
}
