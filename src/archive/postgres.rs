//! The production archive: Postgres through a connection pool. Batched with `UNNEST`, so one
//! flush of thousands of messages is a handful of statements in one transaction.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use deadpool_postgres::{Config, Pool, Runtime};
use tokio_postgres::types::ToSql;

use super::dead_letters::{self, DeadLetter};
use super::rows::{self, FlushRows};
use super::sqlite::{MESSAGE_SELECT, SESSION_SELECT};
use super::{ArchiveError, DeadLetterQuery, LoadedSession, Result, SessionFilter, ShardLoss};
use crate::clock::Clock;
use crate::model::{MessageRecord, SessionView};
use crate::shard::session::HOT_TAIL_LEN;

mod agents;
mod files;

const SCHEMA: &str = include_str!("schema.sql");
/// Rows per `UNNEST` insert.
const INSERT_CHUNK_ROWS: usize = 5000;

pub struct PostgresArchive {
    pool: Pool,
    open: AtomicBool,
}

fn unavailable(error: impl std::fmt::Display) -> ArchiveError {
    ArchiveError::Unavailable(error.to_string())
}

pub(super) fn from_pg(error: tokio_postgres::Error) -> ArchiveError {
    // `Display` of a server error is only "db error": the server's own words are in `DbError`.
    let text = match error.as_db_error() {
        Some(db) => {
            let mut text = format!("{} ({}): {}", db.severity(), db.code().code(), db.message());
            if let Some(detail) = db.detail() {
                text.push_str(&format!("; {detail}"));
            }
            if let Some(constraint) = db.constraint() {
                text.push_str(&format!("; constraint {constraint}"));
            }
            text
        }
        None => error.to_string(),
    };
    match error.code() {
        // Class 22 (data exception) and 23 (integrity constraint): the data itself is refused.
        Some(code) if code.code().starts_with("22") || code.code().starts_with("23") => ArchiveError::Rejected(text),
        _ => ArchiveError::Unavailable(text),
    }
}

/// Connecting (and checking a pooled connection) gives up after this.
const PG_CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
/// A connection whose sent data stays unacknowledged this long is dropped (Linux
/// `TCP_USER_TIMEOUT`): a query to a Postgres that vanished fails instead of hanging.
const PG_UNACKNOWLEDGED_TIMEOUT: Duration = Duration::from_secs(10);
const PG_KEEPALIVE_IDLE: Duration = Duration::from_secs(10);
const PG_KEEPALIVE_INTERVAL: Duration = Duration::from_secs(5);
const PG_KEEPALIVE_RETRIES: u32 = 3;
/// Waiting for a free pooled connection gives up after this.
const PG_POOL_WAIT: Duration = Duration::from_secs(10);

impl PostgresArchive {
    pub async fn connect(url: &str) -> Result<PostgresArchive> {
        let archive = PostgresArchive::connect_lazily(url, true)?;
        archive.ping().await?;
        Ok(archive)
    }

    /// The pool, without connecting yet. A closed gate (`open` false) refuses every call as
    /// unavailable until `open_gate` (a member started while the archive was unreachable uses
    /// it only once it has checked it is its cluster's: see `server`).
    pub fn connect_lazily(url: &str, open: bool) -> Result<PostgresArchive> {
        // Postgres that stops answering (a network partition, a host gone without closing its
        // connections) must fail calls within seconds, not hang them: a writer waiting on the
        // archive cannot take a shard over, a flush cannot finish. The URL's own settings
        // (connect_timeout, tcp_user_timeout, keepalives*) win.
        // `sslmode`/`sslrootcert` choose the TLS (postgres_tls.rs).
        let target = super::postgres_tls::parse_database_url(url).map_err(ArchiveError::Unavailable)?;
        let mut pg_config = target.config;
        if pg_config.get_connect_timeout().is_none() {
            pg_config.connect_timeout(PG_CONNECT_TIMEOUT);
        }
        if pg_config.get_tcp_user_timeout().is_none() {
            pg_config.tcp_user_timeout(PG_UNACKNOWLEDGED_TIMEOUT);
        }
        if !url.contains("keepalives") {
            // A connection idle in the pool, or waiting on an answer the server acknowledged,
            // is found dead after about idle + interval × retries.
            pg_config.keepalives(true);
            pg_config.keepalives_idle(PG_KEEPALIVE_IDLE);
            pg_config.keepalives_interval(PG_KEEPALIVE_INTERVAL);
            pg_config.keepalives_retries(PG_KEEPALIVE_RETRIES);
        }
        let manager =
            deadpool_postgres::Manager::from_config(pg_config, target.tls, deadpool_postgres::ManagerConfig::default());
        let pool = Pool::builder(manager)
            .max_size(Config::default().get_pool_config().max_size)
            .runtime(Runtime::Tokio1)
            .wait_timeout(Some(PG_POOL_WAIT))
            .create_timeout(Some(PG_CONNECT_TIMEOUT))
            .recycle_timeout(Some(PG_CONNECT_TIMEOUT))
            .build()
            .map_err(unavailable)?;
        Ok(PostgresArchive {
            pool,
            open: AtomicBool::new(open),
        })
    }

    pub fn open_gate(&self) {
        self.open.store(true, Ordering::Release);
    }

    pub(super) async fn client(&self) -> Result<deadpool_postgres::Object> {
        if !self.open.load(Ordering::Acquire) {
            return Err(ArchiveError::Unavailable(
                "not used until this member has checked that it is its cluster's archive".into(),
            ));
        }
        self.pool.get().await.map_err(unavailable)
    }

    pub async fn migrate(&self) -> Result<()> {
        let mut client = self.client().await?;
        let tx = client.transaction().await.map_err(from_pg)?;
        tx.execute("SELECT pg_advisory_xact_lock(7355608)", &[])
            .await
            .map_err(from_pg)?;
        tx.batch_execute(SCHEMA).await.map_err(from_pg)?;
        for (table, column, definition) in super::ADDED_COLUMNS {
            // Looked up first: `ALTER TABLE` locks the table exclusively even when the column
            // exists, which would stall other nodes' reads at every start.
            let present: bool = tx
                .query_one(
                    "SELECT EXISTS (SELECT 1 FROM information_schema.columns
                     WHERE table_schema = current_schema() AND table_name = $1 AND column_name = $2)",
                    &[table, column],
                )
                .await
                .map_err(from_pg)?
                .get(0);
            if !present {
                tx.batch_execute(&format!(
                    "ALTER TABLE {table} ADD COLUMN IF NOT EXISTS {column} {definition}"
                ))
                .await
                .map_err(from_pg)?;
            }
        }
        // Files are read in slices (`read_file`): stored uncompressed (most are compressed
        // formats already), a slice reads only its own TOAST chunks. Looked up first, as above.
        let storage: i8 = tx
            .query_one(
                "SELECT attstorage FROM pg_attribute WHERE attrelid = 'files'::regclass AND attname = 'content'",
                &[],
            )
            .await
            .map_err(from_pg)?
            .get(0);
        if storage as u8 != b'e' {
            tx.batch_execute("ALTER TABLE files ALTER COLUMN content SET STORAGE EXTERNAL")
                .await
                .map_err(from_pg)?;
        }
        tx.commit().await.map_err(from_pg)
    }

    pub async fn ping(&self) -> Result<()> {
        self.client()
            .await?
            .query_one("SELECT 1", &[])
            .await
            .map_err(from_pg)
            .map(|_| ())
    }

    pub async fn watermark(&self, shard: u16) -> Result<u64> {
        let row = self
            .client()
            .await?
            .query_opt(
                "SELECT log_index FROM archive_watermarks WHERE shard = $1",
                &[&i32::from(shard)],
            )
            .await
            .map_err(from_pg)?;
        Ok(row.map_or(0, |r| r.get::<_, i64>(0) as u64))
    }

    pub async fn flush(
        &self,
        rows: Arc<FlushRows>,
        watermarks: Vec<(u16, u64)>,
        expected: Vec<(u16, u64)>,
    ) -> Result<()> {
        let mut client = self.client().await?;
        let tx = client.transaction().await.map_err(from_pg)?;
        refuse_regressed(&tx, &expected).await?;
        write_rows(&tx, &rows).await?;
        write_watermarks(&tx, &watermarks).await?;
        tx.commit().await.map_err(from_pg)
    }

    /// As `flush`, but row by row (each under a savepoint): the rows the archive refuses are
    /// returned as dead letters and stored in `dead_letters`; everything else and the watermarks
    /// commit together.
    pub async fn flush_isolating(
        &self,
        rows: Arc<FlushRows>,
        watermarks: Vec<(u16, u64)>,
        expected: Vec<(u16, u64)>,
    ) -> Result<Vec<DeadLetter>> {
        let mut client = self.client().await?;
        let mut tx = client.transaction().await.map_err(from_pg)?;
        refuse_regressed(&tx, &expected).await?;
        let mut dead = Vec::new();
        let at = crate::model::Timestamp(crate::clock::SystemClock.now_micros());
        for unit in dead_letters::units(&rows) {
            let savepoint = tx.savepoint("fleetlm_row").await.map_err(from_pg)?;
            match write_rows(&savepoint, &unit.rows).await {
                Ok(()) => savepoint.commit().await.map_err(from_pg)?,
                Err(ArchiveError::Rejected(error)) => {
                    savepoint.rollback().await.map_err(from_pg)?;
                    if let Some(fallback) = &unit.fallback {
                        let savepoint = tx.savepoint("fleetlm_fallback").await.map_err(from_pg)?;
                        write_rows(&savepoint, fallback).await?;
                        savepoint.commit().await.map_err(from_pg)?;
                    }
                    dead.push(unit.dead_letter(error, at));
                }
                Err(other) => return Err(other),
            }
        }
        for letter in &dead {
            tx.execute(
                "INSERT INTO dead_letters (id, kind, session_id, seq, client_id, error, payload, inserted_at)
                 VALUES ($1, $2, $3, $4, $5, $6, $7, $8) ON CONFLICT (id) DO NOTHING",
                &[
                    &letter.id,
                    &letter.kind,
                    &letter.session_id,
                    &letter.seq.map(|s| s as i64),
                    &letter.client_id,
                    &letter.error,
                    &letter.payload,
                    &letter.inserted_at.0,
                ],
            )
            .await
            .map_err(from_pg)?;
        }
        write_watermarks(&tx, &watermarks).await?;
        tx.commit().await.map_err(from_pg)?;
        Ok(dead)
    }

    /// Dead letters, oldest first, after `after_id` (exclusive), at most `limit`; only those of
    /// `session_id` (and with `client_id`) when given.
    pub async fn dead_letters(&self, query: DeadLetterQuery) -> Result<Vec<DeadLetter>> {
        let rows = self
            .client()
            .await?
            .query(
                "SELECT id, kind, session_id, seq, client_id, error, payload, inserted_at FROM dead_letters
                 WHERE ($1::text IS NULL OR id > $1) AND ($2::text IS NULL OR session_id = $2)
                   AND ($3::text IS NULL OR client_id = $3)
                   AND ($4::int8 IS NULL OR seq >= $4) AND ($5::int8 IS NULL OR seq <= $5)
                 ORDER BY id LIMIT $6",
                &[
                    &query.after_id,
                    &query.session_id,
                    &query.client_id,
                    &query.from_seq.map(|s| s as i64),
                    &query.to_seq.map(|s| s as i64),
                    &(query.limit as i64),
                ],
            )
            .await
            .map_err(from_pg)?;
        Ok(rows
            .iter()
            .map(|r| DeadLetter {
                id: r.get(0),
                kind: r.get(1),
                session_id: r.get(2),
                seq: r.get::<_, Option<i64>>(3).map(|s| s as u64),
                client_id: r.get(4),
                error: r.get(5),
                payload: r.get(6),
                inserted_at: crate::model::Timestamp(r.get(7)),
            })
            .collect())
    }

    /// The session's gaps (seqs skipped after an accepted loss), ascending.
    pub async fn session_gaps(&self, session_id: &str) -> Result<Vec<(u64, u64)>> {
        let rows = self
            .client()
            .await?
            .query(
                "SELECT from_seq, through_seq FROM session_gaps WHERE session_id = $1 ORDER BY from_seq",
                &[&session_id],
            )
            .await
            .map_err(from_pg)?;
        Ok(rows
            .iter()
            .map(|r| (r.get::<_, i64>(0) as u64, r.get::<_, i64>(1) as u64))
            .collect())
    }

    /// Records an accepted loss of the shard (kept if already recorded); returns every loss
    /// recorded for the shard.
    pub async fn record_shard_loss(&self, shard: u16, loss: ShardLoss) -> Result<Vec<ShardLoss>> {
        let client = self.client().await?;
        client
            .execute(
                "INSERT INTO shard_losses (shard, after_index, skip_seqs, recorded_at) VALUES ($1, $2, $3, $4)
                 ON CONFLICT (shard, after_index) DO NOTHING",
                &[
                    &i32::from(shard),
                    &(loss.after_index as i64),
                    &(loss.skip_seqs as i64),
                    &loss.recorded_at.0,
                ],
            )
            .await
            .map_err(from_pg)?;
        self.shard_losses(shard).await
    }

    /// See `Archive::accept_regression`. A loss already recorded after the same index (an
    /// earlier `wal repair`, or this same decision) gets the skip added, and the later time.
    pub async fn accept_regression(&self, shard: u16, loss: ShardLoss, given: u64) -> Result<()> {
        let mut client = self.client().await?;
        let tx = client.transaction().await.map_err(from_pg)?;
        let holds = tx
            .query_opt(
                "SELECT log_index FROM archive_watermarks WHERE shard = $1 FOR UPDATE",
                &[&i32::from(shard)],
            )
            .await
            .map_err(from_pg)?
            .map_or(0, |r| r.get::<_, i64>(0) as u64);
        if holds != loss.after_index {
            return Err(ArchiveError::Conflict);
        }
        tx.execute(
            "INSERT INTO shard_losses (shard, after_index, skip_seqs, recorded_at) VALUES ($1, $2, $3, $4)
             ON CONFLICT (shard, after_index) DO UPDATE
             SET skip_seqs = shard_losses.skip_seqs + excluded.skip_seqs,
                 recorded_at = GREATEST(shard_losses.recorded_at, excluded.recorded_at)",
            &[
                &i32::from(shard),
                &(loss.after_index as i64),
                &(loss.skip_seqs as i64),
                &loss.recorded_at.0,
            ],
        )
        .await
        .map_err(from_pg)?;
        tx.execute(
            "INSERT INTO archive_watermarks (shard, log_index) VALUES ($1, $2)
             ON CONFLICT (shard) DO UPDATE SET log_index = excluded.log_index",
            &[&i32::from(shard), &(given as i64)],
        )
        .await
        .map_err(from_pg)?;
        tx.commit().await.map_err(from_pg)
    }

    pub async fn shard_losses(&self, shard: u16) -> Result<Vec<ShardLoss>> {
        let rows = self
            .client()
            .await?
            .query(
                "SELECT after_index, skip_seqs, recorded_at FROM shard_losses WHERE shard = $1 ORDER BY after_index",
                &[&i32::from(shard)],
            )
            .await
            .map_err(from_pg)?;
        Ok(rows
            .iter()
            .map(|r| ShardLoss {
                after_index: r.get::<_, i64>(0) as u64,
                skip_seqs: r.get::<_, i64>(1) as u64,
                recorded_at: crate::model::Timestamp(r.get(2)),
            })
            .collect())
    }

    pub async fn insert_rows(&self, rows: Arc<FlushRows>) -> Result<()> {
        let mut client = self.client().await?;
        let tx = client.transaction().await.map_err(from_pg)?;
        write_rows(&tx, &rows).await?;
        tx.commit().await.map_err(from_pg)
    }

    pub async fn load_session(&self, session_id: &str) -> Result<Option<LoadedSession>> {
        let client = self.client().await?;
        let Some(row) = client
            .query_opt(&format!("{SESSION_SELECT} WHERE s.id = $1"), &[&session_id])
            .await
            .map_err(from_pg)?
        else {
            return Ok(None);
        };
        let view = session_from_row(&row)?;
        let rows = client
            .query(
                &format!("{MESSAGE_SELECT} WHERE session_id = $1 ORDER BY seq DESC LIMIT $2"),
                &[&session_id, &(HOT_TAIL_LEN as i64)],
            )
            .await
            .map_err(from_pg)?;
        let mut tail = rows.iter().map(message_from_row).collect::<Result<Vec<_>>>()?;
        tail.reverse();
        Ok(Some(LoadedSession {
            view,
            tail,
            gaps: Vec::new(),
            client_ids: Default::default(),
        }))
    }

    /// `(seq, client_id, fingerprint)` of the session's newest messages with `seq >= from_seq`
    /// that carry a client id, newest first, at most `limit`.
    pub async fn recent_client_ids(
        &self,
        session_id: &str,
        from_seq: u64,
        limit: usize,
    ) -> Result<Vec<(u64, String, u64)>> {
        let rows = self
            .client()
            .await?
            .query(
                "SELECT seq, client_id, fingerprint FROM messages
                 WHERE session_id = $1 AND seq >= $2 AND client_id IS NOT NULL ORDER BY seq DESC LIMIT $3",
                &[&session_id, &(from_seq as i64), &(limit as i64)],
            )
            .await
            .map_err(from_pg)?;
        Ok(rows
            .iter()
            .map(|r| (r.get::<_, i64>(0) as u64, r.get(1), r.get::<_, i64>(2) as u64))
            .collect())
    }

    pub async fn read_messages(
        &self,
        session_id: &str,
        from_seq: u64,
        to_seq: u64,
        max_bytes: usize,
    ) -> Result<Vec<MessageRecord>> {
        let budget = i64::try_from(max_bytes).unwrap_or(i64::MAX);
        let rows = self
            .client()
            .await?
            .query(
                &format!(
                    "{MESSAGE_SELECT} WHERE session_id = $1 AND seq >= $2 AND seq <= $3 AND {} ORDER BY seq",
                    super::within_budget_sql('$')
                ),
                &[&session_id, &(from_seq as i64), &(to_seq as i64), &budget],
            )
            .await
            .map_err(from_pg)?;
        rows.iter().map(message_from_row).collect()
    }

    pub async fn find_by_client_id(&self, session_id: &str, client_id: &str) -> Result<Option<MessageRecord>> {
        let row = self
            .client()
            .await?
            .query_opt(
                &format!("{MESSAGE_SELECT} WHERE session_id = $1 AND client_id = $2"),
                &[&session_id, &client_id],
            )
            .await
            .map_err(from_pg)?;
        row.as_ref().map(message_from_row).transpose()
    }

    pub async fn list_sessions(&self, filter: SessionFilter) -> Result<Vec<SessionView>> {
        let (before_at, before_id) = filter.before.map_or((None, None), |(at, id)| (Some(at.0), Some(id)));
        let status = filter.status.map(|s| s.as_str());
        let rows = self
            .client()
            .await?
            .query(
                &format!(
                    "{SESSION_SELECT}
                     WHERE ($1::text IS NULL OR s.user_id = $1) AND ($2::text IS NULL OR s.agent_id = $2)
                       AND ($3::text IS NULL OR s.status = $3)
                       AND ($4::int8 IS NULL OR (s.inserted_at, s.id) < ($4, $5::text))
                     ORDER BY s.inserted_at DESC, s.id DESC LIMIT $6"
                ),
                &[
                    &filter.user_id,
                    &filter.agent_id,
                    &status,
                    &before_at,
                    &before_id,
                    &(filter.limit as i64),
                ],
            )
            .await
            .map_err(from_pg)?;
        rows.iter().map(session_from_row).collect()
    }

    pub async fn sessions_owing_a_reply(&self, limit: usize) -> Result<Vec<String>> {
        let rows = self
            .client()
            .await?
            .query(
                "SELECT id FROM sessions WHERE last_user_seq > answered_through AND status = 'active' LIMIT $1",
                &[&(limit as i64)],
            )
            .await
            .map_err(from_pg)?;
        Ok(rows.iter().map(|r| r.get(0)).collect())
    }
}

/// Refuses the flush if a shard's watermark is below what it must be at least (`expected`): the
/// archive went back in time, and moving the watermark over the hole would hide it. Locks the
/// rows, so a concurrent flush of the same shard waits.
async fn refuse_regressed(tx: &deadpool_postgres::Transaction<'_>, expected: &[(u16, u64)]) -> Result<()> {
    let shards: Vec<i32> = expected.iter().map(|(shard, _)| i32::from(*shard)).collect();
    let held: Vec<(u16, u64)> = tx
        .query(
            "SELECT shard, log_index FROM archive_watermarks WHERE shard = ANY($1) FOR UPDATE",
            &[&shards],
        )
        .await
        .map_err(from_pg)?
        .iter()
        .map(|r| (r.get::<_, i32>(0) as u16, r.get::<_, i64>(1) as u64))
        .collect();
    let regressed = super::regression::regressions_among(&held, expected);
    if regressed.is_empty() {
        Ok(())
    } else {
        Err(ArchiveError::Regressed(regressed))
    }
}

/// Moves the watermarks forward. A watermark that is already at or past the new one means
/// another flusher (a cluster's former leader) got there first: the whole flush is refused
/// (`Conflict`) and rolls back, so a watermark never moves back over rows it covers.
async fn write_watermarks(tx: &deadpool_postgres::Transaction<'_>, watermarks: &[(u16, u64)]) -> Result<()> {
    let shards: Vec<i32> = watermarks.iter().map(|(shard, _)| i32::from(*shard)).collect();
    let indexes: Vec<i64> = watermarks.iter().map(|(_, index)| *index as i64).collect();
    let moved = tx
        .execute(
            "INSERT INTO archive_watermarks (shard, log_index)
             SELECT * FROM UNNEST($1::int4[], $2::int8[])
             ON CONFLICT (shard) DO UPDATE SET log_index = excluded.log_index
             WHERE archive_watermarks.log_index < excluded.log_index",
            &[&shards, &indexes],
        )
        .await
        .map_err(from_pg)?;
    if moved != watermarks.len() as u64 {
        return Err(ArchiveError::Conflict);
    }
    Ok(())
}

/// Writes new sessions, messages, session state and read cursors (not the watermark).
async fn write_rows(tx: &deadpool_postgres::Transaction<'_>, rows: &FlushRows) -> Result<()> {
    if !rows.new_sessions.is_empty() {
        let ids: Vec<&str> = rows.new_sessions.iter().map(|s| &*s.id).collect();
        let users: Vec<&str> = rows.new_sessions.iter().map(|s| s.user_id.as_str()).collect();
        let agents: Vec<&str> = rows.new_sessions.iter().map(|s| s.agent_id.as_str()).collect();
        let metadata: Vec<&str> = rows.new_sessions.iter().map(|s| s.metadata.get()).collect();
        let at: Vec<i64> = rows.new_sessions.iter().map(|s| s.inserted_at.0).collect();
        tx.execute(
            "INSERT INTO sessions (id, user_id, agent_id, status, metadata, last_seq, nonuser_count,
                last_activity_at, inserted_at, updated_at)
             SELECT id, user_id, agent_id, 'active', metadata, 0, 0, at, at, at
             FROM UNNEST($1::text[], $2::text[], $3::text[], $4::text[], $5::int8[])
                AS u(id, user_id, agent_id, metadata, at)
             ON CONFLICT (id) DO NOTHING",
            &[&ids, &users, &agents, &metadata, &at],
        )
        .await
        .map_err(from_pg)?;
    }
    for chunk in rows.messages.chunks(INSERT_CHUNK_ROWS) {
        let session_ids: Vec<&str> = chunk.iter().map(|r| &*r.message.session_id).collect();
        let seqs: Vec<i64> = chunk.iter().map(|r| r.message.seq as i64).collect();
        let ids: Vec<&str> = chunk.iter().map(|r| r.message.id.as_str()).collect();
        let senders: Vec<&str> = chunk.iter().map(|r| r.message.sender_id.as_str()).collect();
        let kinds: Vec<&str> = chunk.iter().map(|r| r.message.kind.as_str()).collect();
        let contents: Vec<&str> = chunk.iter().map(|r| r.message.content.get()).collect();
        let metadata: Vec<&str> = chunk.iter().map(|r| r.message.metadata.get()).collect();
        let client_ids: Vec<Option<&str>> = chunk.iter().map(|r| r.client_id.as_deref()).collect();
        let fingerprints: Vec<i64> = chunk.iter().map(|r| r.fingerprint as i64).collect();
        let nonuser: Vec<i64> = chunk.iter().map(|r| r.nonuser_through as i64).collect();
        let at: Vec<i64> = chunk.iter().map(|r| r.message.inserted_at.0).collect();
        let params: [&(dyn ToSql + Sync); 11] = [
            &session_ids,
            &seqs,
            &ids,
            &senders,
            &kinds,
            &contents,
            &metadata,
            &client_ids,
            &fingerprints,
            &nonuser,
            &at,
        ];
        // Only a row already written (same seq) is skipped; a client id another seq holds (a retry
        // taken as new during an archive outage) is refused, so the row becomes a dead letter and
        // is still served, instead of silently leaving a hole.
        tx.execute(
            "INSERT INTO messages (session_id, seq, id, sender_id, kind, content, metadata, client_id,
                fingerprint, nonuser_through, inserted_at)
             SELECT * FROM UNNEST($1::text[], $2::int8[], $3::text[], $4::text[], $5::text[], $6::text[],
                $7::text[], $8::text[], $9::int8[], $10::int8[], $11::int8[])
             ON CONFLICT (session_id, seq) DO NOTHING",
            &params,
        )
        .await
        .map_err(from_pg)?;
    }
    let active: Vec<_> = rows
        .session_updates
        .iter()
        .filter(|u| u.last_activity.is_some())
        .collect();
    if !active.is_empty() {
        let ids: Vec<&str> = active.iter().map(|u| &*u.session_id).collect();
        let last_seqs: Vec<i64> = active.iter().map(|u| u.last_seq as i64).collect();
        let nonuser: Vec<i64> = active.iter().map(|u| u.nonuser_count as i64).collect();
        let activity = |u: &&rows::SessionUpdate| u.last_activity.clone().unwrap_or_default();
        let at: Vec<i64> = active.iter().map(|u| activity(u).at.0).collect();
        let senders: Vec<Option<String>> = active.iter().map(|u| activity(u).sender_id).collect();
        let previews: Vec<Option<String>> = active.iter().map(|u| activity(u).preview).collect();
        let updated: Vec<i64> = active.iter().map(|u| u.updated_at.0).collect();
        tx.execute(
            "UPDATE sessions s SET last_seq = u.last_seq, nonuser_count = u.nonuser_count,
                last_activity_at = u.at, last_sender_id = u.sender, last_message_preview = u.preview,
                updated_at = GREATEST(s.updated_at, u.updated_at)
             FROM UNNEST($1::text[], $2::int8[], $3::int8[], $4::int8[], $5::text[], $6::text[], $7::int8[])
                AS u(id, last_seq, nonuser_count, at, sender, preview, updated_at)
             WHERE s.id = u.id AND s.last_seq < u.last_seq",
            &[&ids, &last_seqs, &nonuser, &at, &senders, &previews, &updated],
        )
        .await
        .map_err(from_pg)?;
    }
    let progressed: Vec<_> = rows
        .session_updates
        .iter()
        .filter(|u| u.dispatch != Default::default())
        .collect();
    if !progressed.is_empty() {
        let ids: Vec<&str> = progressed.iter().map(|u| &*u.session_id).collect();
        let users: Vec<i64> = progressed.iter().map(|u| u.dispatch.last_user_seq as i64).collect();
        let answered: Vec<i64> = progressed.iter().map(|u| u.dispatch.answered_through as i64).collect();
        tx.execute(
            "UPDATE sessions s SET last_user_seq = GREATEST(s.last_user_seq, u.last_user_seq),
                answered_through = GREATEST(s.answered_through, u.answered_through)
             FROM UNNEST($1::text[], $2::int8[], $3::int8[]) AS u(id, last_user_seq, answered_through)
             WHERE s.id = u.id",
            &[&ids, &users, &answered],
        )
        .await
        .map_err(from_pg)?;
    }
    for update in rows.session_updates.iter().filter(|u| u.archived) {
        tx.execute(
            "UPDATE sessions SET status = 'archived', updated_at = GREATEST(updated_at, $2) WHERE id = $1",
            &[&&*update.session_id, &update.updated_at.0],
        )
        .await
        .map_err(from_pg)?;
    }
    for (session_id, from_seq, through_seq, at) in &rows.gaps {
        tx.execute(
            "INSERT INTO session_gaps (session_id, from_seq, through_seq) VALUES ($1, $2, $3)
             ON CONFLICT (session_id, from_seq) DO NOTHING",
            &[session_id, &(*from_seq as i64), &(*through_seq as i64)],
        )
        .await
        .map_err(from_pg)?;
        tx.execute(
            "UPDATE sessions SET last_seq = GREATEST(last_seq, $2), updated_at = GREATEST(updated_at, $3) WHERE id = $1",
            &[session_id, &(*through_seq as i64), &at.0],
        )
        .await
        .map_err(from_pg)?;
    }
    for (session_id, cursor) in &rows.read_cursors {
        tx.execute(
            "INSERT INTO read_cursors (session_id, user_id, read_seq, nonuser_through)
             SELECT id, user_id, $2, $3 FROM sessions WHERE id = $1
             ON CONFLICT (session_id, user_id) DO UPDATE SET read_seq = excluded.read_seq,
                nonuser_through = excluded.nonuser_through
             WHERE excluded.read_seq > read_cursors.read_seq",
            &[session_id, &(cursor.read_seq as i64), &(cursor.nonuser_through as i64)],
        )
        .await
        .map_err(from_pg)?;
    }
    Ok(())
}

fn rejected(error: String) -> ArchiveError {
    ArchiveError::Rejected(error)
}

fn session_from_row(r: &tokio_postgres::Row) -> Result<SessionView> {
    rows::session_view(rows::SessionColumns {
        id: r.get(0),
        user_id: r.get(1),
        agent_id: r.get(2),
        status: r.get(3),
        metadata: r.get(4),
        last_seq: r.get(5),
        nonuser_count: r.get(6),
        last_activity_at: r.get(7),
        last_sender_id: r.get(8),
        last_message_preview: r.get(9),
        inserted_at: r.get(10),
        updated_at: r.get(11),
        read_seq: r.get(12),
        read_nonuser_through: r.get(13),
        last_user_seq: r.get(14),
        answered_through: r.get(15),
    })
    .map_err(rejected)
}

fn message_from_row(r: &tokio_postgres::Row) -> Result<MessageRecord> {
    rows::message_record(rows::MessageColumns {
        session_id: r.get(0),
        seq: r.get(1),
        id: r.get(2),
        sender_id: r.get(3),
        kind: r.get(4),
        content: r.get(5),
        metadata: r.get(6),
        client_id: r.get(7),
        fingerprint: r.get(8),
        nonuser_through: r.get(9),
        inserted_at: r.get(10),
    })
    .map_err(rejected)
}
