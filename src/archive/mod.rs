//! The archive: where the log's records end up for the long term, behind one interface with two
//! implementations (SQLite, embedded default; Postgres, for production) that behave the same.
//!
//! Architecture invariant: the archive is written only by the flusher (and agent CRUD, and file
//! uploads, which are not part of the log); a
//! flush writes rows and moves the shard's watermark in one transaction, so a crash at any point
//! neither loses nor duplicates rows. The archive never decides a seq.

pub mod check;
mod dead_letters;
mod flusher;
mod identity;
mod postgres;
pub(crate) mod postgres_tls;
pub mod regression;
mod rows;
mod sqlite;

use std::sync::Arc;

pub use dead_letters::DeadLetter;
pub use flusher::{FlushCluster, Flusher, FlusherOptions};
pub use rows::FlushRows;

use crate::agents::signing::SigningKeys;
use crate::model::{Agent, AgentStatus, MessageRecord, SessionRecord, SessionStatus, SessionView, Timestamp};

#[derive(Debug, Clone, thiserror::Error)]
pub enum ArchiveError {
    /// The store cannot be reached or failed; the operation may succeed later.
    #[error("archive unavailable: {0}")]
    Unavailable(String),
    /// The store refused the data itself; retrying the same data will not help.
    #[error("archive rejected the data: {0}")]
    Rejected(String),
    #[error("already exists")]
    Conflict,
    /// The archive holds less of these shards' logs than it was given (see `regression`).
    #[error("{}", regression::describe(.0))]
    Regressed(Vec<regression::Regression>),
}

pub type Result<T> = std::result::Result<T, ArchiveError>;

/// Columns added to a table after its `CREATE TABLE` first shipped: `schema.sql` creates a new
/// database with them, and `migrate` adds each one an existing database lacks (both archives;
/// SQLite has no `ADD COLUMN IF NOT EXISTS`, so each backend checks its own catalogue). Append
/// here, never edit: `(table, column, definition)`.
const ADDED_COLUMNS: &[(&str, &str, &str)] = &[
    ("agents", "http2", "BOOLEAN NOT NULL DEFAULT FALSE"),
    ("agents", "signing_secret", "TEXT"),
    ("agents", "signing_secret_created_at", "BIGINT"),
    ("agents", "previous_signing_secret", "TEXT"),
    ("agents", "previous_signing_secret_expires_at", "BIGINT"),
];

/// A file uploaded to a session (`POST /api/sessions/:id/files`), stored whole in the archive so
/// every node of a cluster serves it. Written at upload (not through the log: the bytes are not
/// part of the ordered history; a message's file part refers to the file by its URL).
#[derive(Debug, Clone)]
pub struct StoredFile {
    pub info: FileInfo,
    pub content: bytes::Bytes,
}

/// What the archive knows of a stored file besides its bytes.
#[derive(Debug, Clone)]
pub struct FileInfo {
    pub session_id: String,
    pub id: String,
    pub media_type: String,
    pub filename: Option<String>,
    pub size: u64,
    /// Hex SHA-256 of the content.
    pub sha256: String,
    pub created_at: Timestamp,
}

/// A session as the archive knows it, with its newest messages for the hot tail.
#[derive(Debug, Clone)]
pub struct LoadedSession {
    pub view: SessionView,
    pub tail: Vec<MessageRecord>,
    /// Seqs skipped after an accepted loss (read only when the tail shows a hole).
    pub gaps: Vec<(u64, u64)>,
    /// The session's newest client ids, so retries are recognised without asking the archive.
    pub client_ids: ClientIdWindow,
}

impl LoadedSession {
    /// A session known only by its summary (`Op::SessionLoaded` on a replica): no messages in
    /// memory, every earlier client id to be looked up in the archive.
    pub fn summary(view: SessionView, gaps: Vec<(u64, u64)>) -> LoadedSession {
        LoadedSession {
            view,
            tail: Vec::new(),
            gaps,
            client_ids: ClientIdWindow::default(),
        }
    }
}

/// A session's newest client ids (`CLIENT_ID_WINDOW` at most), read when it is loaded.
#[derive(Debug, Clone)]
pub struct ClientIdWindow {
    /// `(seq, client_id, fingerprint)`, ascending by seq.
    pub ids: Vec<(u64, String, u64)>,
    /// Every message with `seq >= complete_from` has its client id (if it has one) in `ids`.
    pub complete_from: u64,
}

impl Default for ClientIdWindow {
    /// Nothing known: every client id must be looked up in the archive.
    fn default() -> ClientIdWindow {
        ClientIdWindow {
            ids: Vec::new(),
            complete_from: u64::MAX,
        }
    }
}

#[derive(Debug, Clone, Default)]
pub struct SessionFilter {
    pub user_id: Option<String>,
    pub agent_id: Option<String>,
    pub status: Option<SessionStatus>,
    /// Only sessions older than this `(inserted_at, id)` (the pagination cursor).
    pub before: Option<(Timestamp, String)>,
    pub limit: usize,
}

/// An accepted loss of a shard's log entries, as the archive remembers it (forever: sessions
/// loaded later must still skip the seqs it may have held).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ShardLoss {
    pub after_index: u64,
    /// Seqs every session of the shard skips once.
    pub skip_seqs: u64,
    /// When the writer first recorded it: sessions not updated since skip.
    pub recorded_at: Timestamp,
}

/// Which dead letters to list.
#[derive(Debug, Clone, Default)]
pub struct DeadLetterQuery {
    pub after_id: Option<String>,
    pub session_id: Option<String>,
    pub client_id: Option<String>,
    pub from_seq: Option<u64>,
    pub to_seq: Option<u64>,
    pub limit: usize,
}

#[derive(Clone)]
pub struct Archive {
    backend: Backend,
    /// The highest watermark per shard this process has known the archive to reach: one found
    /// below it went back in time (`regression`).
    seen: Arc<regression::SeenWatermarks>,
}

#[derive(Clone)]
enum Backend {
    Sqlite(Arc<sqlite::SqliteArchive>),
    Postgres(Arc<postgres::PostgresArchive>),
}

macro_rules! dispatch {
    ($self:ident, $archive:ident => $call:expr) => {
        match &$self.backend {
            Backend::Sqlite($archive) => $call,
            Backend::Postgres($archive) => $call,
        }
    };
}

/// What a message weighs in a history page: its content and metadata as stored, plus a fixed
/// allowance for ids and the rest. The archives' bounded reads compute the same sum in SQL
/// ([`MESSAGE_BYTES_SQL`]).
pub fn message_bytes(record: &MessageRecord) -> usize {
    record.message.content.get().len() + record.message.metadata.get().len() + MESSAGE_OVERHEAD_BYTES
}

/// The fixed part of [`message_bytes`].
pub const MESSAGE_OVERHEAD_BYTES: usize = 256;

/// [`message_bytes`] of a `messages` row, in SQL (SQLite and Postgres alike).
const MESSAGE_BYTES_SQL: &str = "octet_length(content) + octet_length(metadata) + 256";

/// The condition "`seq` is within the byte budget" for a bounded read of
/// `session_id = {p}1 AND seq BETWEEN {p}2 AND {p}3` with the budget in `{p}4`: rows up to the
/// first one that brings the running total to the budget (SQLite `?`, Postgres `$`).
fn within_budget_sql(p: char) -> String {
    format!(
        "seq <= COALESCE((SELECT MAX(seq) FROM (SELECT seq, SUM({MESSAGE_BYTES_SQL}) OVER (ORDER BY seq ROWS BETWEEN UNBOUNDED PRECEDING AND 1 PRECEDING) AS bytes_before FROM messages WHERE session_id = {p}1 AND seq >= {p}2 AND seq <= {p}3) AS sized WHERE COALESCE(bytes_before, 0) < {p}4), {p}3)"
    )
}

impl Archive {
    fn new(backend: Backend) -> Archive {
        Archive {
            backend,
            seen: Arc::default(),
        }
    }

    pub fn open_sqlite(path: &std::path::Path) -> Result<Archive> {
        Ok(Archive::new(Backend::Sqlite(Arc::new(sqlite::SqliteArchive::open(
            path,
        )?))))
    }

    pub async fn connect_postgres(url: &str) -> Result<Archive> {
        Ok(Archive::new(Backend::Postgres(Arc::new(
            postgres::PostgresArchive::connect(url).await?,
        ))))
    }

    /// A Postgres archive whose pool connects on first use (nothing is tried here), closed
    /// until `open_gate` when `open` is false.
    pub fn connect_postgres_lazily(url: &str, open: bool) -> Result<Archive> {
        Ok(Archive::new(Backend::Postgres(Arc::new(
            postgres::PostgresArchive::connect_lazily(url, open)?,
        ))))
    }

    /// Lets calls through an archive made closed (`connect_postgres_lazily`).
    pub fn open_gate(&self) {
        if let Backend::Postgres(archive) = &self.backend {
            archive.open_gate();
        }
    }

    pub fn describe(&self) -> &'static str {
        match &self.backend {
            Backend::Sqlite(_) => "sqlite",
            Backend::Postgres(_) => "postgres",
        }
    }

    pub async fn migrate(&self) -> Result<()> {
        dispatch!(self, a => a.migrate().await)
    }

    pub async fn ping(&self) -> Result<()> {
        dispatch!(self, a => a.ping().await)
    }

    /// Log index up to which the shard's entries are archived (0 if none). `Regressed` if that
    /// is less than this process knew the archive to hold.
    pub async fn watermark(&self, shard: u16) -> Result<u64> {
        // The floor is taken before the read: a flush committing while the read is in flight
        // raises what was seen past what this (older) read can show, which is no regression.
        // A watermark only grows, so a read begun after the floor was known must show it.
        let floor = self.seen.get(shard);
        let holds = dispatch!(self, a => a.watermark(shard).await)?;
        if holds < floor {
            return Err(ArchiveError::Regressed(vec![regression::Regression {
                shard,
                holds,
                given: floor,
            }]));
        }
        self.seen.observe(shard, holds);
        Ok(holds)
    }

    /// Records that the archive was given the shard's log through `index` (the WAL's purge
    /// mark says so): a watermark read below it is a regression.
    pub fn note_given(&self, shard: u16, index: u64) {
        self.seen.observe(shard, index);
    }

    /// What each shard's watermark must be at least, as this process knows it.
    fn expected(&self, watermarks: &[(u16, u64)]) -> Vec<(u16, u64)> {
        watermarks
            .iter()
            .map(|&(shard, _)| (shard, self.seen.get(shard)))
            .collect()
    }

    fn observe_moved(&self, watermarks: &[(u16, u64)]) {
        for &(shard, through) in watermarks {
            self.seen.observe(shard, through);
        }
    }

    /// Writes the rows and moves each `(shard, through_index)` watermark, in one transaction.
    /// Refused whole with `Regressed` if a shard's watermark is below what this process knew it
    /// to be (the archive went back in time: the rows would leave a hole), or `Conflict` if one
    /// is already at or past its new value (another member flushed it).
    pub async fn flush(&self, rows: Arc<FlushRows>, watermarks: Vec<(u16, u64)>) -> Result<()> {
        let expected = self.expected(&watermarks);
        dispatch!(self, a => a.flush(rows, watermarks.clone(), expected).await)?;
        self.observe_moved(&watermarks);
        Ok(())
    }

    /// `fleetlm archive accept`: records the operator's decision that the archive lost the
    /// shard's log entries after `loss.after_index` through `given` (`after_index` is the
    /// watermark it holds now): the loss, so every session of the shard skips the seqs they could
    /// have held, and the watermark moved to `given`, in one transaction. `Conflict` if the
    /// watermark is no longer `loss.after_index`.
    pub async fn accept_regression(&self, shard: u16, loss: ShardLoss, given: u64) -> Result<()> {
        dispatch!(self, a => a.accept_regression(shard, loss, given).await)
    }

    /// Inserts a new session's row ahead of the flusher (which would insert the same row), so
    /// listings show it at once. Harmless if the row exists.
    pub async fn record_session(&self, session: &SessionRecord) -> Result<()> {
        let rows = Arc::new(FlushRows {
            new_sessions: vec![session.clone()],
            ..FlushRows::default()
        });
        dispatch!(self, a => a.insert_rows(rows).await)
    }

    /// Marks a session archived ahead of the flusher, so status filters see it at once.
    pub async fn record_archived(&self, session_id: &Arc<str>, at: Timestamp) -> Result<()> {
        let mut update = rows::SessionUpdate::new(session_id.clone(), at);
        update.archived = true;
        let rows = Arc::new(FlushRows {
            session_updates: vec![update],
            ..FlushRows::default()
        });
        dispatch!(self, a => a.insert_rows(rows).await)
    }

    /// As `flush`, isolating the rows the archive refuses as dead letters (returned).
    pub async fn flush_isolating(&self, rows: Arc<FlushRows>, watermarks: Vec<(u16, u64)>) -> Result<Vec<DeadLetter>> {
        let expected = self.expected(&watermarks);
        let dead = dispatch!(self, a => a.flush_isolating(rows, watermarks.clone(), expected).await)?;
        self.observe_moved(&watermarks);
        Ok(dead)
    }

    pub async fn dead_letters(&self, query: DeadLetterQuery) -> Result<Vec<DeadLetter>> {
        dispatch!(self, a => a.dead_letters(query).await)
    }

    /// Stores an uploaded file; durable in the archive when it resolves.
    pub async fn insert_file(&self, file: Arc<StoredFile>) -> Result<()> {
        dispatch!(self, a => a.insert_file(file).await)
    }

    /// The total size of the session's files.
    pub async fn session_file_bytes(&self, session_id: &str) -> Result<u64> {
        dispatch!(self, a => a.session_file_bytes(session_id).await)
    }

    pub async fn file_info(&self, session_id: &str, id: &str) -> Result<Option<FileInfo>> {
        dispatch!(self, a => a.file_info(session_id, id).await)
    }

    /// Up to `len` bytes of a stored file's content from byte `start` (fewer at its end), read
    /// without loading the rest of it; `None` if there is no such file.
    pub async fn read_file(&self, session_id: &str, id: &str, start: u64, len: usize) -> Result<Option<bytes::Bytes>> {
        dispatch!(self, a => a.read_file(session_id, id, start, len).await)
    }

    pub async fn session_gaps(&self, session_id: &str) -> Result<Vec<(u64, u64)>> {
        dispatch!(self, a => a.session_gaps(session_id).await)
    }

    /// Records an accepted loss of `shard` (an earlier record of the same loss wins) and
    /// returns every loss recorded for the shard.
    pub async fn record_shard_loss(&self, shard: u16, loss: ShardLoss) -> Result<Vec<ShardLoss>> {
        dispatch!(self, a => a.record_shard_loss(shard, loss).await)
    }

    pub async fn shard_losses(&self, shard: u16) -> Result<Vec<ShardLoss>> {
        dispatch!(self, a => a.shard_losses(shard).await)
    }

    /// Dead-lettered messages of the session in `from..=to`, only asked for when the messages
    /// table has a gap there (rare: a row the archive refused).
    async fn fill_from_dead_letters(
        &self,
        session_id: &str,
        messages: &mut Vec<MessageRecord>,
        from: u64,
        to: u64,
    ) -> Result<()> {
        if from > to || messages.len() as u64 == to - from + 1 {
            return Ok(());
        }
        let dead = self
            .dead_letters(DeadLetterQuery {
                session_id: Some(session_id.to_string()),
                from_seq: Some(from),
                to_seq: Some(to),
                limit: (to - from + 1).min(100_000) as usize,
                ..DeadLetterQuery::default()
            })
            .await?;
        dead_letters::merge_dead_messages(messages, dead, from, to);
        Ok(())
    }

    pub async fn load_session(&self, session_id: &str) -> Result<Option<LoadedSession>> {
        let Some(mut loaded) = dispatch!(self, a => a.load_session(session_id).await)? else {
            return Ok(None);
        };
        // The tail (the newest messages) must end at last_seq without holes; a hole is a row
        // the archive refused (served from its dead letter) or a gap (seqs skipped).
        let last_seq = loaded.view.last_seq;
        let tail_from = loaded.tail.first().map_or(
            last_seq
                .saturating_sub(crate::shard::session::HOT_TAIL_LEN as u64 - 1)
                .max(1),
            |m| m.message.seq,
        );
        let tail_is_whole = loaded.tail.last().map(|m| m.message.seq) == Some(last_seq)
            && loaded.tail.len() as u64 == last_seq + 1 - tail_from;
        if last_seq > 0 && !tail_is_whole {
            self.fill_from_dead_letters(session_id, &mut loaded.tail, tail_from, last_seq)
                .await?;
            loaded.gaps = self.session_gaps(session_id).await?;
        }
        loaded.client_ids = self.client_id_window(session_id, last_seq).await?;
        Ok(Some(loaded))
    }

    /// The session's newest client ids: those of its newest `CLIENT_ID_WINDOW` messages that
    /// carry one, looked for among its newest `CLIENT_ID_SCAN` messages (dead letters included).
    async fn client_id_window(&self, session_id: &str, last_seq: u64) -> Result<ClientIdWindow> {
        use crate::shard::session::{CLIENT_ID_SCAN, CLIENT_ID_WINDOW};
        let scan_from = (last_seq + 1).saturating_sub(CLIENT_ID_SCAN).max(1);
        let mut ids = dispatch!(self, a => a.recent_client_ids(session_id, scan_from, CLIENT_ID_WINDOW).await)?;
        let mut complete_from = match ids.last() {
            Some((oldest, ..)) if ids.len() == CLIENT_ID_WINDOW => *oldest,
            _ => scan_from,
        };
        // A refused row's client id is taken as much as an archived one's (rare: usually none).
        let dead = self
            .dead_letters(DeadLetterQuery {
                session_id: Some(session_id.to_string()),
                from_seq: Some(complete_from),
                limit: CLIENT_ID_WINDOW,
                ..DeadLetterQuery::default()
            })
            .await?;
        if dead.len() == CLIENT_ID_WINDOW {
            // Not all read: leave every client id to the archive look-up.
            return Ok(ClientIdWindow::default());
        }
        ids.extend(
            dead.iter()
                .filter_map(DeadLetter::message)
                .filter_map(|m| Some((m.message.seq, m.client_id?, m.fingerprint))),
        );
        ids.sort_unstable_by_key(|(seq, ..)| std::cmp::Reverse(*seq));
        ids.dedup_by_key(|(seq, ..)| *seq);
        if ids.len() > CLIENT_ID_WINDOW {
            ids.truncate(CLIENT_ID_WINDOW);
            complete_from = ids.last().map_or(complete_from, |(seq, ..)| *seq);
        }
        ids.reverse();
        Ok(ClientIdWindow { ids, complete_from })
    }

    /// Messages with `from_seq <= seq <= to_seq`, ascending, bounded in bytes: they stop after
    /// the first message that brings the total ([`message_bytes`]) to `max_bytes` (the first
    /// is always there). The range was cut short iff the total is at least `max_bytes`.
    pub async fn read_messages(
        &self,
        session_id: &str,
        from_seq: u64,
        to_seq: u64,
        max_bytes: usize,
    ) -> Result<Vec<MessageRecord>> {
        let mut messages = dispatch!(self, a => a.read_messages(session_id, from_seq, to_seq, max_bytes).await)?;
        let total: usize = messages.iter().map(message_bytes).sum();
        // Cut short: refused rows are looked for only up to where the page stops.
        let through = match messages.last() {
            Some(last) if total >= max_bytes => last.message.seq,
            _ => to_seq,
        };
        self.fill_from_dead_letters(session_id, &mut messages, from_seq, through)
            .await?;
        Ok(messages)
    }

    pub async fn find_by_client_id(&self, session_id: &str, client_id: &str) -> Result<Option<MessageRecord>> {
        if let Some(found) = dispatch!(self, a => a.find_by_client_id(session_id, client_id).await)? {
            return Ok(Some(found));
        }
        let dead = self
            .dead_letters(DeadLetterQuery {
                session_id: Some(session_id.to_string()),
                client_id: Some(client_id.to_string()),
                limit: 1,
                ..DeadLetterQuery::default()
            })
            .await?;
        Ok(dead.iter().find_map(DeadLetter::message))
    }

    /// Sessions newest first.
    pub async fn list_sessions(&self, filter: SessionFilter) -> Result<Vec<SessionView>> {
        dispatch!(self, a => a.list_sessions(filter).await)
    }

    /// Active sessions whose latest user message no finished dispatch covers (at most `limit`).
    pub async fn sessions_owing_a_reply(&self, limit: usize) -> Result<Vec<String>> {
        dispatch!(self, a => a.sessions_owing_a_reply(limit).await)
    }

    pub async fn list_agents(&self, status: Option<AgentStatus>) -> Result<Vec<Agent>> {
        dispatch!(self, a => a.list_agents(status).await)
    }

    pub async fn get_agent(&self, id: &str) -> Result<Option<Agent>> {
        dispatch!(self, a => a.get_agent(id).await)
    }

    /// Inserts a new agent; `Conflict` if the id is taken.
    pub async fn insert_agent(&self, agent: Agent) -> Result<()> {
        dispatch!(self, a => a.insert_agent(agent).await)
    }

    /// Writes the agent's fields, never its signing secrets (`set_agent_signing` does): an
    /// update racing a rotation cannot bring back the secret the rotation replaced.
    pub async fn update_agent(&self, agent: Agent) -> Result<()> {
        dispatch!(self, a => a.update_agent(agent).await)
    }

    /// Replaces the agent's signing secrets (a rotation) and its `updated_at` if its current
    /// secret is still `expected` (`None`: it has none); `false` if there is no such agent or
    /// another rotation came first.
    pub async fn set_agent_signing(
        &self,
        id: &str,
        expected: Option<&str>,
        signing: SigningKeys,
        updated_at: Timestamp,
    ) -> Result<bool> {
        dispatch!(self, a => a.set_agent_signing(id, expected, signing, updated_at).await)
    }
}
