//! The agents' rows in Postgres (the registry's store): listing, reading, inserting and
//! updating agents, and swapping their signing secrets.

use tokio_postgres::types::ToSql;

use super::super::rows;
use super::super::sqlite::AGENT_SELECT;
use super::super::{ArchiveError, Result};
use super::{PostgresArchive, from_pg, rejected};
use crate::agents::signing::SigningKeys;
use crate::model::{Agent, AgentStatus, Timestamp};

impl PostgresArchive {
    pub async fn list_agents(&self, status: Option<AgentStatus>) -> Result<Vec<Agent>> {
        let status = status.map(|s| s.as_str());
        let rows = self
            .client()
            .await?
            .query(
                &format!("{AGENT_SELECT} WHERE ($1::text IS NULL OR status = $1) ORDER BY name, id"),
                &[&status],
            )
            .await
            .map_err(from_pg)?;
        rows.iter().map(agent_from_row).collect()
    }

    pub async fn get_agent(&self, id: &str) -> Result<Option<Agent>> {
        let row = self
            .client()
            .await?
            .query_opt(&format!("{AGENT_SELECT} WHERE id = $1"), &[&id])
            .await
            .map_err(from_pg)?;
        row.as_ref().map(agent_from_row).transpose()
    }

    pub async fn insert_agent(&self, agent: Agent) -> Result<()> {
        let (secret, created_at, previous, previous_expires_at) = rows::signing_columns(&agent.signing);
        let params = AgentParams::new(agent);
        let mut all_params: Vec<&(dyn ToSql + Sync)> = params.as_params().to_vec();
        all_params.extend_from_slice(&[&secret, &created_at, &previous, &previous_expires_at]);
        let inserted = self
            .client()
            .await?
            .execute(
                "INSERT INTO agents (id, name, origin_url, webhook_path, message_history_mode,
                    message_history_limit, timeout_ms, debounce_window_ms, headers, status, inserted_at, updated_at,
                    http2, signing_secret, signing_secret_created_at, previous_signing_secret,
                    previous_signing_secret_expires_at)
                 VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13, $14, $15, $16, $17)
                 ON CONFLICT (id) DO NOTHING",
                &all_params,
            )
            .await
            .map_err(from_pg)?;
        if inserted == 0 {
            Err(ArchiveError::Conflict)
        } else {
            Ok(())
        }
    }

    pub async fn update_agent(&self, agent: Agent) -> Result<()> {
        let params = AgentParams::new(agent);
        self.client()
            .await?
            .execute(
                "UPDATE agents SET name = $2, origin_url = $3, webhook_path = $4, message_history_mode = $5,
                    message_history_limit = $6, timeout_ms = $7, debounce_window_ms = $8, headers = $9,
                    status = $10, inserted_at = $11, updated_at = $12, http2 = $13
                 WHERE id = $1",
                &params.as_params(),
            )
            .await
            .map_err(from_pg)
            .map(|_| ())
    }

    pub async fn set_agent_signing(
        &self,
        id: &str,
        expected: Option<&str>,
        signing: SigningKeys,
        updated_at: Timestamp,
    ) -> Result<bool> {
        let (secret, created_at, previous, previous_expires_at) = rows::signing_columns(&signing);
        let changed = self
            .client()
            .await?
            .execute(
                "UPDATE agents SET signing_secret = $2, signing_secret_created_at = $3,
                    previous_signing_secret = $4, previous_signing_secret_expires_at = $5, updated_at = $6
                 WHERE id = $1 AND signing_secret IS NOT DISTINCT FROM $7",
                &[
                    &id,
                    &secret,
                    &created_at,
                    &previous,
                    &previous_expires_at,
                    &updated_at.0,
                    &expected,
                ],
            )
            .await
            .map_err(from_pg)?;
        Ok(changed > 0)
    }
}

/// An agent's columns as Postgres parameters (integers widened to BIGINT).
struct AgentParams {
    id: String,
    name: String,
    origin_url: String,
    webhook_path: String,
    mode: &'static str,
    history_limit: i64,
    timeout_ms: i64,
    debounce_window_ms: i64,
    headers: String,
    status: &'static str,
    inserted_at: i64,
    updated_at: i64,
    http2: bool,
}

impl AgentParams {
    fn new(agent: Agent) -> AgentParams {
        AgentParams {
            headers: serde_json::to_string(&agent.headers).expect("headers serialize"),
            mode: agent.message_history_mode.as_str(),
            history_limit: i64::from(agent.message_history_limit),
            timeout_ms: i64::from(agent.timeout_ms),
            debounce_window_ms: i64::from(agent.debounce_window_ms),
            status: agent.status.as_str(),
            inserted_at: agent.inserted_at.0,
            updated_at: agent.updated_at.0,
            http2: agent.http2,
            id: agent.id,
            name: agent.name,
            origin_url: agent.origin_url,
            webhook_path: agent.webhook_path,
        }
    }

    fn as_params(&self) -> [&(dyn ToSql + Sync); 13] {
        [
            &self.id,
            &self.name,
            &self.origin_url,
            &self.webhook_path,
            &self.mode,
            &self.history_limit,
            &self.timeout_ms,
            &self.debounce_window_ms,
            &self.headers,
            &self.status,
            &self.inserted_at,
            &self.updated_at,
            &self.http2,
        ]
    }
}

fn agent_from_row(r: &tokio_postgres::Row) -> Result<Agent> {
    rows::agent(rows::AgentColumns {
        id: r.get(0),
        name: r.get(1),
        origin_url: r.get(2),
        webhook_path: r.get(3),
        message_history_mode: r.get(4),
        message_history_limit: r.get(5),
        timeout_ms: r.get(6),
        debounce_window_ms: r.get(7),
        headers: r.get(8),
        status: r.get(9),
        inserted_at: r.get(10),
        updated_at: r.get(11),
        http2: r.get(12),
        signing_secret: r.get(13),
        signing_secret_created_at: r.get(14),
        previous_signing_secret: r.get(15),
        previous_signing_secret_expires_at: r.get(16),
    })
    .map_err(rejected)
}
