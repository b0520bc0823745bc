//! The embedded archive: one SQLite file in the data directory (WAL journal, `synchronous=FULL`
//! because WAL segments are deleted once a flush commits).
//!
//! Two connections: writes go through one, reads through the other, so a reader (a join
//! replaying history, a session load) never waits for a flush transaction — SQLite's WAL mode
//! lets a reader see the last committed state while a write is under way.

mod files;

use std::path::Path;
use std::sync::{Arc, Mutex};

use rusqlite::{Connection, OptionalExtension, params};

use super::dead_letters::{self, DeadLetter};
use super::rows::FlushRows;
use super::{ArchiveError, DeadLetterQuery, LoadedSession, Result, SessionFilter, ShardLoss};
use crate::agents::signing::SigningKeys;
use crate::model::{Agent, AgentStatus, DispatchProgress, MessageRecord, SessionView, Timestamp};
use crate::shard::session::HOT_TAIL_LEN;

const SCHEMA: &str = include_str!("schema.sql");

pub struct SqliteArchive {
    connection: Arc<Mutex<Connection>>,
    reader: Arc<Mutex<Connection>>,
}

fn unavailable(error: rusqlite::Error) -> ArchiveError {
    ArchiveError::Unavailable(error.to_string())
}

/// Whether SQLite refused the data itself (a constraint, a value too big) rather than failed.
fn is_rejection(error: &rusqlite::Error) -> bool {
    use rusqlite::ErrorCode;
    matches!(
        error.sqlite_error_code(),
        Some(ErrorCode::ConstraintViolation | ErrorCode::TooBig | ErrorCode::TypeMismatch)
    )
}

fn from_sqlite(error: rusqlite::Error) -> ArchiveError {
    if is_rejection(&error) {
        ArchiveError::Rejected(error.to_string())
    } else {
        ArchiveError::Unavailable(error.to_string())
    }
}

impl SqliteArchive {
    pub fn open(path: &Path) -> Result<SqliteArchive> {
        let connection = Connection::open(path).map_err(unavailable)?;
        connection
            .execute_batch(
                "PRAGMA journal_mode=WAL; PRAGMA synchronous=FULL; PRAGMA busy_timeout=5000;
                 PRAGMA cache_size=-65536;",
            )
            .map_err(unavailable)?;
        let reader = Connection::open_with_flags(
            path,
            rusqlite::OpenFlags::SQLITE_OPEN_READ_ONLY | rusqlite::OpenFlags::SQLITE_OPEN_NO_MUTEX,
        )
        .map_err(unavailable)?;
        reader.execute_batch("PRAGMA busy_timeout=5000;").map_err(unavailable)?;
        Ok(SqliteArchive {
            connection: Arc::new(Mutex::new(connection)),
            reader: Arc::new(Mutex::new(reader)),
        })
    }

    /// `work` as a blocking job holding `connection`.
    fn job<T>(
        connection: &Arc<Mutex<Connection>>,
        work: impl FnOnce(&mut Connection) -> rusqlite::Result<T> + Send + 'static,
    ) -> impl FnOnce() -> rusqlite::Result<T> + Send + 'static {
        let connection = connection.clone();
        move || work(&mut connection.lock().expect("sqlite connection lock"))
    }

    /// Runs `work` holding `connection` on the blocking pool.
    async fn on_blocking_pool<T: Send + 'static>(
        connection: &Arc<Mutex<Connection>>,
        work: impl FnOnce(&mut Connection) -> rusqlite::Result<T> + Send + 'static,
    ) -> Result<T> {
        tokio::task::spawn_blocking(Self::job(connection, work))
            .await
            .map_err(|e| ArchiveError::Unavailable(e.to_string()))?
            .map_err(from_sqlite)
    }

    /// Runs `work` with the write connection.
    async fn with<T: Send + 'static>(
        &self,
        work: impl FnOnce(&mut Connection) -> rusqlite::Result<T> + Send + 'static,
    ) -> Result<T> {
        Self::on_blocking_pool(&self.connection, work).await
    }

    /// Runs read-only `work` with the read connection.
    async fn read<T: Send + 'static>(
        &self,
        work: impl FnOnce(&mut Connection) -> rusqlite::Result<T> + Send + 'static,
    ) -> Result<T> {
        Self::on_blocking_pool(&self.reader, work).await
    }

    /// As `with`, on the low-priority background thread (for the flush, which is bulk work).
    async fn with_in_background<T: Send + 'static>(
        &self,
        work: impl FnOnce(&mut Connection) -> rusqlite::Result<T> + Send + 'static,
    ) -> Result<T> {
        crate::background::run(Self::job(&self.connection, work))
            .await
            .map_err(ArchiveError::Unavailable)?
            .map_err(from_sqlite)
    }

    pub async fn migrate(&self) -> Result<()> {
        self.with(|c| {
            let tx = c.transaction()?;
            tx.execute_batch(SCHEMA)?;
            for (table, column, definition) in super::ADDED_COLUMNS {
                let present: bool = tx.query_row(
                    "SELECT EXISTS (SELECT 1 FROM pragma_table_info(?1) WHERE name = ?2)",
                    params![table, column],
                    |r| r.get(0),
                )?;
                if !present {
                    tx.execute_batch(&format!("ALTER TABLE {table} ADD COLUMN {column} {definition}"))?;
                }
            }
            tx.commit()
        })
        .await
    }

    pub async fn ping(&self) -> Result<()> {
        self.with(|c| c.query_row("SELECT 1", [], |_| Ok(()))).await
    }

    /// Read on the read connection: a session load checks it (`Shards::load`) and must not
    /// wait behind a flush.
    pub async fn watermark(&self, shard: u16) -> Result<u64> {
        self.read(move |c| {
            c.query_row(
                "SELECT log_index FROM archive_watermarks WHERE shard = ?1",
                [shard],
                |r| r.get::<_, i64>(0),
            )
            .optional()
            .map(|v| v.unwrap_or(0) as u64)
        })
        .await
    }

    pub async fn flush(
        &self,
        rows: Arc<FlushRows>,
        watermarks: Vec<(u16, u64)>,
        expected: Vec<(u16, u64)>,
    ) -> Result<()> {
        self.with_in_background(move |c| {
            let tx = c.transaction()?;
            let regressed = regressions(&tx, &expected)?;
            if !regressed.is_empty() {
                return Ok(Err(ArchiveError::Regressed(regressed)));
            }
            write_rows(&tx, &rows)?;
            write_watermarks(&tx, &watermarks)?;
            tx.commit().map(Ok)
        })
        .await?
    }

    /// As `flush`, row by row under savepoints: refused rows become dead letters (see
    /// `dead_letters.rs`), the rest and the watermarks commit together.
    pub async fn flush_isolating(
        &self,
        rows: Arc<FlushRows>,
        watermarks: Vec<(u16, u64)>,
        expected: Vec<(u16, u64)>,
    ) -> Result<Vec<DeadLetter>> {
        let at = crate::model::Timestamp(crate::clock::Clock::now_micros(&crate::clock::SystemClock));
        self.with_in_background(move |c| {
            let mut tx = c.transaction()?;
            let regressed = regressions(&tx, &expected)?;
            if !regressed.is_empty() {
                return Ok(Err(ArchiveError::Regressed(regressed)));
            }
            let mut dead = Vec::new();
            for unit in dead_letters::units(&rows) {
                let savepoint = tx.savepoint()?;
                match write_rows(&savepoint, &unit.rows) {
                    Ok(()) => savepoint.commit()?,
                    Err(error) if is_rejection(&error) => {
                        drop(savepoint);
                        if let Some(fallback) = &unit.fallback {
                            let savepoint = tx.savepoint()?;
                            write_rows(&savepoint, fallback)?;
                            savepoint.commit()?;
                        }
                        dead.push(unit.dead_letter(error.to_string(), at));
                    }
                    Err(error) => return Err(error),
                }
            }
            {
                let mut insert = tx.prepare_cached(
                    "INSERT INTO dead_letters (id, kind, session_id, seq, client_id, error, payload, inserted_at)
                     VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8) ON CONFLICT (id) DO NOTHING",
                )?;
                for letter in &dead {
                    insert.execute(params![
                        letter.id,
                        letter.kind,
                        letter.session_id,
                        letter.seq.map(|s| s as i64),
                        letter.client_id,
                        letter.error,
                        letter.payload,
                        letter.inserted_at.0
                    ])?;
                }
            }
            write_watermarks(&tx, &watermarks)?;
            tx.commit()?;
            Ok(Ok(dead))
        })
        .await?
    }

    /// See `PostgresArchive::accept_regression`.
    pub async fn accept_regression(&self, shard: u16, loss: ShardLoss, given: u64) -> Result<()> {
        self.with(move |c| {
            let tx = c.transaction()?;
            let holds = tx
                .query_row(
                    "SELECT log_index FROM archive_watermarks WHERE shard = ?1",
                    [shard],
                    |r| r.get::<_, i64>(0),
                )
                .optional()?
                .map_or(0, |index| index as u64);
            if holds != loss.after_index {
                return Ok(Err(ArchiveError::Conflict));
            }
            tx.execute(
                "INSERT INTO shard_losses (shard, after_index, skip_seqs, recorded_at) VALUES (?1, ?2, ?3, ?4)
                 ON CONFLICT (shard, after_index) DO UPDATE
                 SET skip_seqs = shard_losses.skip_seqs + excluded.skip_seqs,
                     recorded_at = MAX(shard_losses.recorded_at, excluded.recorded_at)",
                params![
                    shard,
                    loss.after_index as i64,
                    loss.skip_seqs as i64,
                    loss.recorded_at.0
                ],
            )?;
            tx.execute(
                "INSERT INTO archive_watermarks (shard, log_index) VALUES (?1, ?2)
                 ON CONFLICT (shard) DO UPDATE SET log_index = excluded.log_index",
                params![shard, given as i64],
            )?;
            tx.commit().map(Ok)
        })
        .await?
    }

    /// See `PostgresArchive::session_gaps`.
    pub async fn session_gaps(&self, session_id: &str) -> Result<Vec<(u64, u64)>> {
        let session_id = session_id.to_string();
        self.read(move |c| {
            let mut statement = c.prepare_cached(
                "SELECT from_seq, through_seq FROM session_gaps WHERE session_id = ?1 ORDER BY from_seq",
            )?;
            statement
                .query_map([session_id], |r| {
                    Ok((r.get::<_, i64>(0)? as u64, r.get::<_, i64>(1)? as u64))
                })?
                .collect()
        })
        .await
    }

    /// See `PostgresArchive::record_shard_loss`.
    pub async fn record_shard_loss(&self, shard: u16, loss: ShardLoss) -> Result<Vec<ShardLoss>> {
        self.with(move |c| {
            c.execute(
                "INSERT INTO shard_losses (shard, after_index, skip_seqs, recorded_at) VALUES (?1, ?2, ?3, ?4)
                 ON CONFLICT (shard, after_index) DO NOTHING",
                params![
                    shard,
                    loss.after_index as i64,
                    loss.skip_seqs as i64,
                    loss.recorded_at.0
                ],
            )
        })
        .await?;
        self.shard_losses(shard).await
    }

    pub async fn shard_losses(&self, shard: u16) -> Result<Vec<ShardLoss>> {
        self.with(move |c| {
            let mut statement = c.prepare_cached(
                "SELECT after_index, skip_seqs, recorded_at FROM shard_losses WHERE shard = ?1 ORDER BY after_index",
            )?;
            statement
                .query_map([shard], |r| {
                    Ok(ShardLoss {
                        after_index: r.get::<_, i64>(0)? as u64,
                        skip_seqs: r.get::<_, i64>(1)? as u64,
                        recorded_at: crate::model::Timestamp(r.get(2)?),
                    })
                })?
                .collect()
        })
        .await
    }

    /// Dead letters, oldest first (see `PostgresArchive::dead_letters`).
    pub async fn dead_letters(&self, query: DeadLetterQuery) -> Result<Vec<DeadLetter>> {
        self.read(move |c| {
            let mut statement = c.prepare_cached(
                "SELECT id, kind, session_id, seq, client_id, error, payload, inserted_at FROM dead_letters
                 WHERE (?1 IS NULL OR id > ?1) AND (?2 IS NULL OR session_id = ?2)
                   AND (?3 IS NULL OR client_id = ?3)
                   AND (?4 IS NULL OR seq >= ?4) AND (?5 IS NULL OR seq <= ?5)
                 ORDER BY id LIMIT ?6",
            )?;
            statement
                .query_map(
                    params![
                        query.after_id,
                        query.session_id,
                        query.client_id,
                        query.from_seq.map(|s| s as i64),
                        query.to_seq.map(|s| s as i64),
                        query.limit as i64
                    ],
                    |r| {
                        Ok(DeadLetter {
                            id: r.get(0)?,
                            kind: r.get(1)?,
                            session_id: r.get(2)?,
                            seq: r.get::<_, Option<i64>>(3)?.map(|s| s as u64),
                            client_id: r.get(4)?,
                            error: r.get(5)?,
                            payload: r.get(6)?,
                            inserted_at: crate::model::Timestamp(r.get(7)?),
                        })
                    },
                )?
                .collect()
        })
        .await
    }

    pub async fn insert_rows(&self, rows: Arc<FlushRows>) -> Result<()> {
        self.with(move |c| {
            let tx = c.transaction()?;
            write_rows(&tx, &rows)?;
            tx.commit()
        })
        .await
    }

    pub async fn load_session(&self, session_id: &str) -> Result<Option<LoadedSession>> {
        let session_id = session_id.to_string();
        self.read(move |c| {
            let Some(view) = c
                .query_row(
                    &format!("{SESSION_SELECT} WHERE s.id = ?1"),
                    [&session_id],
                    session_from_row,
                )
                .optional()?
            else {
                return Ok(None);
            };
            let mut statement = c.prepare_cached(&format!(
                "{MESSAGE_SELECT} WHERE session_id = ?1 ORDER BY seq DESC LIMIT ?2"
            ))?;
            let mut tail: Vec<MessageRecord> = statement
                .query_map(params![session_id, HOT_TAIL_LEN as i64], message_from_row)?
                .collect::<rusqlite::Result<_>>()?;
            tail.reverse();
            Ok(Some(LoadedSession {
                view,
                tail,
                gaps: Vec::new(),
                client_ids: Default::default(),
            }))
        })
        .await
    }

    /// `(seq, client_id, fingerprint)` of the session's newest messages with `seq >= from_seq`
    /// that carry a client id, newest first, at most `limit`.
    pub async fn recent_client_ids(
        &self,
        session_id: &str,
        from_seq: u64,
        limit: usize,
    ) -> Result<Vec<(u64, String, u64)>> {
        let session_id = session_id.to_string();
        self.read(move |c| {
            let mut statement = c.prepare_cached(
                "SELECT seq, client_id, fingerprint FROM messages
                 WHERE session_id = ?1 AND seq >= ?2 AND client_id IS NOT NULL ORDER BY seq DESC LIMIT ?3",
            )?;
            statement
                .query_map(params![session_id, from_seq as i64, limit as i64], |r| {
                    Ok((r.get::<_, i64>(0)? as u64, r.get(1)?, r.get::<_, i64>(2)? as u64))
                })?
                .collect()
        })
        .await
    }

    pub async fn read_messages(
        &self,
        session_id: &str,
        from_seq: u64,
        to_seq: u64,
        max_bytes: usize,
    ) -> Result<Vec<MessageRecord>> {
        let session_id = session_id.to_string();
        self.read(move |c| {
            let mut statement = c.prepare_cached(&format!(
                "{MESSAGE_SELECT} WHERE session_id = ?1 AND seq >= ?2 AND seq <= ?3 AND {} ORDER BY seq",
                super::within_budget_sql('?')
            ))?;
            let budget = i64::try_from(max_bytes).unwrap_or(i64::MAX);
            statement
                .query_map(
                    params![session_id, from_seq as i64, to_seq as i64, budget],
                    message_from_row,
                )?
                .collect()
        })
        .await
    }

    pub async fn find_by_client_id(&self, session_id: &str, client_id: &str) -> Result<Option<MessageRecord>> {
        let (session_id, client_id) = (session_id.to_string(), client_id.to_string());
        self.read(move |c| {
            c.query_row(
                &format!("{MESSAGE_SELECT} WHERE session_id = ?1 AND client_id = ?2"),
                params![session_id, client_id],
                message_from_row,
            )
            .optional()
        })
        .await
    }

    pub async fn list_sessions(&self, filter: SessionFilter) -> Result<Vec<SessionView>> {
        self.read(move |c| {
            let (before_at, before_id) = filter.before.map_or((None, None), |(at, id)| (Some(at.0), Some(id)));
            let mut statement = c.prepare_cached(&format!(
                "{SESSION_SELECT}
                 WHERE (?1 IS NULL OR s.user_id = ?1) AND (?2 IS NULL OR s.agent_id = ?2)
                   AND (?3 IS NULL OR s.status = ?3)
                   AND (?4 IS NULL OR (s.inserted_at, s.id) < (?4, ?5))
                 ORDER BY s.inserted_at DESC, s.id DESC LIMIT ?6"
            ))?;
            statement
                .query_map(
                    params![
                        filter.user_id,
                        filter.agent_id,
                        filter.status.map(|s| s.as_str()),
                        before_at,
                        before_id,
                        filter.limit as i64
                    ],
                    session_from_row,
                )?
                .collect()
        })
        .await
    }

    pub async fn sessions_owing_a_reply(&self, limit: usize) -> Result<Vec<String>> {
        self.read(move |c| {
            let mut statement = c.prepare_cached(
                "SELECT id FROM sessions WHERE last_user_seq > answered_through AND status = 'active' LIMIT ?1",
            )?;
            statement.query_map([limit as i64], |r| r.get(0))?.collect()
        })
        .await
    }

    pub async fn list_agents(&self, status: Option<AgentStatus>) -> Result<Vec<Agent>> {
        self.read(move |c| {
            let mut statement = c.prepare_cached(&format!(
                "{AGENT_SELECT} WHERE (?1 IS NULL OR status = ?1) ORDER BY name, id"
            ))?;
            statement
                .query_map(params![status.map(|s| s.as_str())], agent_from_row)?
                .collect()
        })
        .await
    }

    pub async fn get_agent(&self, id: &str) -> Result<Option<Agent>> {
        let id = id.to_string();
        self.read(move |c| {
            c.query_row(&format!("{AGENT_SELECT} WHERE id = ?1"), [id], agent_from_row)
                .optional()
        })
        .await
    }

    pub async fn insert_agent(&self, agent: Agent) -> Result<()> {
        let (secret, created_at, previous, previous_expires_at) = super::rows::signing_columns(&agent.signing);
        let inserted = self
            .with(move |c| {
                c.execute(
                    "INSERT INTO agents (id, name, origin_url, webhook_path, message_history_mode,
                        message_history_limit, timeout_ms, debounce_window_ms, headers, status, inserted_at, updated_at,
                        http2, signing_secret, signing_secret_created_at, previous_signing_secret,
                        previous_signing_secret_expires_at)
                     VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12, ?13, ?14, ?15, ?16, ?17)
                     ON CONFLICT (id) DO NOTHING",
                    agent_params!(agent, secret, created_at, previous, previous_expires_at),
                )
            })
            .await?;
        if inserted == 0 {
            Err(ArchiveError::Conflict)
        } else {
            Ok(())
        }
    }

    pub async fn update_agent(&self, agent: Agent) -> Result<()> {
        self.with(move |c| {
            c.execute(
                "UPDATE agents SET name = ?2, origin_url = ?3, webhook_path = ?4, message_history_mode = ?5,
                    message_history_limit = ?6, timeout_ms = ?7, debounce_window_ms = ?8, headers = ?9,
                    status = ?10, inserted_at = ?11, updated_at = ?12, http2 = ?13
                 WHERE id = ?1",
                agent_params!(agent),
            )
            .map(|_| ())
        })
        .await
    }

    pub async fn set_agent_signing(
        &self,
        id: &str,
        expected: Option<&str>,
        signing: SigningKeys,
        updated_at: Timestamp,
    ) -> Result<bool> {
        let (id, expected) = (id.to_string(), expected.map(str::to_string));
        let (secret, created_at, previous, previous_expires_at) = super::rows::signing_columns(&signing);
        let changed = self
            .with(move |c| {
                c.execute(
                    "UPDATE agents SET signing_secret = ?2, signing_secret_created_at = ?3,
                        previous_signing_secret = ?4, previous_signing_secret_expires_at = ?5, updated_at = ?6
                     WHERE id = ?1 AND signing_secret IS ?7",
                    params![
                        id,
                        secret,
                        created_at,
                        previous,
                        previous_expires_at,
                        updated_at.0,
                        expected
                    ],
                )
            })
            .await?;
        Ok(changed > 0)
    }
}

/// The shards whose watermark is below what it must be at least (see `PostgresArchive`'s
/// `refuse_regressed`).
fn regressions(tx: &Connection, expected: &[(u16, u64)]) -> rusqlite::Result<Vec<super::regression::Regression>> {
    let mut select = tx.prepare_cached("SELECT log_index FROM archive_watermarks WHERE shard = ?1")?;
    let mut held = Vec::with_capacity(expected.len());
    for &(shard, _) in expected {
        if let Some(index) = select.query_row([shard], |r| r.get::<_, i64>(0)).optional()? {
            held.push((shard, index as u64));
        }
    }
    Ok(super::regression::regressions_among(&held, expected))
}

/// Moves the watermarks forward only (as the Postgres archive does; one flusher per SQLite
/// archive makes a refusal there a bug, reported as a failed flush).
fn write_watermarks(tx: &Connection, watermarks: &[(u16, u64)]) -> rusqlite::Result<()> {
    let mut upsert = tx.prepare_cached(
        "INSERT INTO archive_watermarks (shard, log_index) VALUES (?1, ?2)
         ON CONFLICT (shard) DO UPDATE SET log_index = excluded.log_index
         WHERE archive_watermarks.log_index < excluded.log_index",
    )?;
    for (shard, through_index) in watermarks {
        let moved = upsert.execute(params![shard, *through_index as i64])?;
        if moved != 1 {
            return Err(rusqlite::Error::StatementChangedRows(moved));
        }
    }
    Ok(())
}

/// Writes new sessions, messages, session state and read cursors (not the watermark).
fn write_rows(tx: &Connection, rows: &FlushRows) -> rusqlite::Result<()> {
    let mut insert_session = tx.prepare_cached(
        "INSERT INTO sessions (id, user_id, agent_id, status, metadata, last_seq, nonuser_count,
            last_activity_at, inserted_at, updated_at)
         VALUES (?1, ?2, ?3, 'active', ?4, 0, 0, ?5, ?5, ?5) ON CONFLICT (id) DO NOTHING",
    )?;
    for s in &rows.new_sessions {
        insert_session.execute(params![
            &*s.id,
            s.user_id,
            s.agent_id,
            s.metadata.get(),
            s.inserted_at.0
        ])?;
    }
    // Only a row already written (same seq) is skipped; a client id another seq holds (a retry
    // taken as new during an archive outage) is refused, so the row becomes a dead letter and
    // is still served, instead of silently leaving a hole.
    let mut insert_message = tx.prepare_cached(
        "INSERT INTO messages (session_id, seq, id, sender_id, kind, content, metadata, client_id,
            fingerprint, nonuser_through, inserted_at)
         VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11) ON CONFLICT (session_id, seq) DO NOTHING",
    )?;
    for r in &rows.messages {
        let m = &r.message;
        insert_message.execute(params![
            &*m.session_id,
            m.seq as i64,
            m.id,
            m.sender_id,
            m.kind,
            m.content.get(),
            m.metadata.get(),
            r.client_id,
            r.fingerprint as i64,
            r.nonuser_through as i64,
            m.inserted_at.0
        ])?;
    }
    let mut update_activity = tx.prepare_cached(
        "UPDATE sessions SET last_seq = ?2, nonuser_count = ?3, last_activity_at = ?4,
            last_sender_id = ?5, last_message_preview = ?6, updated_at = MAX(updated_at, ?7)
         WHERE id = ?1 AND last_seq < ?2",
    )?;
    let mut update_dispatch = tx.prepare_cached(
        "UPDATE sessions SET last_user_seq = MAX(last_user_seq, ?2),
            answered_through = MAX(answered_through, ?3) WHERE id = ?1",
    )?;
    let mut update_status =
        tx.prepare_cached("UPDATE sessions SET status = 'archived', updated_at = MAX(updated_at, ?2) WHERE id = ?1")?;
    for u in &rows.session_updates {
        if let Some(activity) = &u.last_activity {
            update_activity.execute(params![
                &*u.session_id,
                u.last_seq as i64,
                u.nonuser_count as i64,
                activity.at.0,
                activity.sender_id,
                activity.preview,
                u.updated_at.0
            ])?;
        }
        if u.archived {
            update_status.execute(params![&*u.session_id, u.updated_at.0])?;
        }
        if u.dispatch != DispatchProgress::default() {
            update_dispatch.execute(params![
                &*u.session_id,
                u.dispatch.last_user_seq as i64,
                u.dispatch.answered_through as i64
            ])?;
        }
    }
    let mut upsert_cursor = tx.prepare_cached(
        "INSERT INTO read_cursors (session_id, user_id, read_seq, nonuser_through)
         SELECT id, user_id, ?2, ?3 FROM sessions WHERE id = ?1
         ON CONFLICT (session_id, user_id) DO UPDATE SET read_seq = excluded.read_seq,
            nonuser_through = excluded.nonuser_through
         WHERE excluded.read_seq > read_cursors.read_seq",
    )?;
    for (session_id, cursor) in &rows.read_cursors {
        upsert_cursor.execute(params![
            session_id,
            cursor.read_seq as i64,
            cursor.nonuser_through as i64
        ])?;
    }
    let mut insert_gap = tx.prepare_cached(
        "INSERT INTO session_gaps (session_id, from_seq, through_seq) VALUES (?1, ?2, ?3)
         ON CONFLICT (session_id, from_seq) DO NOTHING",
    )?;
    let mut raise_last_seq = tx.prepare_cached(
        "UPDATE sessions SET last_seq = max(last_seq, ?2), updated_at = max(updated_at, ?3) WHERE id = ?1",
    )?;
    for (session_id, from_seq, through_seq, at) in &rows.gaps {
        insert_gap.execute(params![session_id, *from_seq as i64, *through_seq as i64])?;
        raise_last_seq.execute(params![session_id, *through_seq as i64, at.0])?;
    }
    Ok(())
}

macro_rules! agent_params {
    ($agent:ident $(, $extra:expr)*) => {
        params![
            $agent.id,
            $agent.name,
            $agent.origin_url,
            $agent.webhook_path,
            $agent.message_history_mode.as_str(),
            $agent.message_history_limit,
            $agent.timeout_ms,
            $agent.debounce_window_ms,
            serde_json::to_string(&$agent.headers).expect("headers serialize"),
            $agent.status.as_str(),
            $agent.inserted_at.0,
            $agent.updated_at.0,
            $agent.http2
            $(, $extra)*
        ]
    };
}
use agent_params;

pub(super) const SESSION_SELECT: &str = "SELECT s.id, s.user_id, s.agent_id, s.status, s.metadata, s.last_seq,
    s.nonuser_count, s.last_activity_at, s.last_sender_id, s.last_message_preview, s.inserted_at, s.updated_at,
    COALESCE(c.read_seq, 0), COALESCE(c.nonuser_through, 0), s.last_user_seq, s.answered_through
    FROM sessions s LEFT JOIN read_cursors c ON c.session_id = s.id AND c.user_id = s.user_id";

pub(super) const MESSAGE_SELECT: &str = "SELECT session_id, seq, id, sender_id, kind, content, metadata, client_id,
    fingerprint, nonuser_through, inserted_at FROM messages";

pub(super) const AGENT_SELECT: &str = "SELECT id, name, origin_url, webhook_path, message_history_mode,
    message_history_limit, timeout_ms, debounce_window_ms, headers, status, inserted_at, updated_at, http2,
    signing_secret, signing_secret_created_at, previous_signing_secret, previous_signing_secret_expires_at FROM agents";

fn conversion_error(column: usize, error: String) -> rusqlite::Error {
    rusqlite::Error::FromSqlConversionFailure(column, rusqlite::types::Type::Text, error.into())
}

fn session_from_row(r: &rusqlite::Row<'_>) -> rusqlite::Result<SessionView> {
    super::rows::session_view(super::rows::SessionColumns {
        id: r.get(0)?,
        user_id: r.get(1)?,
        agent_id: r.get(2)?,
        status: r.get(3)?,
        metadata: r.get(4)?,
        last_seq: r.get(5)?,
        nonuser_count: r.get(6)?,
        last_activity_at: r.get(7)?,
        last_sender_id: r.get(8)?,
        last_message_preview: r.get(9)?,
        inserted_at: r.get(10)?,
        updated_at: r.get(11)?,
        read_seq: r.get(12)?,
        read_nonuser_through: r.get(13)?,
        last_user_seq: r.get(14)?,
        answered_through: r.get(15)?,
    })
    .map_err(|e| conversion_error(4, e))
}

fn message_from_row(r: &rusqlite::Row<'_>) -> rusqlite::Result<MessageRecord> {
    super::rows::message_record(super::rows::MessageColumns {
        session_id: r.get(0)?,
        seq: r.get(1)?,
        id: r.get(2)?,
        sender_id: r.get(3)?,
        kind: r.get(4)?,
        content: r.get(5)?,
        metadata: r.get(6)?,
        client_id: r.get(7)?,
        fingerprint: r.get(8)?,
        nonuser_through: r.get(9)?,
        inserted_at: r.get(10)?,
    })
    .map_err(|e| conversion_error(5, e))
}

fn agent_from_row(r: &rusqlite::Row<'_>) -> rusqlite::Result<Agent> {
    super::rows::agent(super::rows::AgentColumns {
        id: r.get(0)?,
        name: r.get(1)?,
        origin_url: r.get(2)?,
        webhook_path: r.get(3)?,
        message_history_mode: r.get(4)?,
        message_history_limit: r.get(5)?,
        timeout_ms: r.get(6)?,
        debounce_window_ms: r.get(7)?,
        headers: r.get(8)?,
        status: r.get(9)?,
        inserted_at: r.get(10)?,
        updated_at: r.get(11)?,
        http2: r.get(12)?,
        signing_secret: r.get(13)?,
        signing_secret_created_at: r.get(14)?,
        previous_signing_secret: r.get(15)?,
        previous_signing_secret_expires_at: r.get(16)?,
    })
    .map_err(|e| conversion_error(8, e))
}
