-- agents.signing_secret …: webhook signing (agents::signing), the current secret and, during a
-- rotation's grace period, the previous one; NULL for agents made before signatures until
-- their first rotation. (Comments stay outside CREATE TABLE: SQLite keeps the statement's text
-- and rewrites it on DROP COLUMN.)
CREATE TABLE IF NOT EXISTS agents (
    id TEXT PRIMARY KEY,
    name TEXT NOT NULL,
    origin_url TEXT NOT NULL,
    webhook_path TEXT NOT NULL,
    message_history_mode TEXT NOT NULL,
    message_history_limit BIGINT NOT NULL,
    timeout_ms BIGINT NOT NULL,
    debounce_window_ms BIGINT NOT NULL,
    headers TEXT NOT NULL,
    status TEXT NOT NULL,
    inserted_at BIGINT NOT NULL,
    updated_at BIGINT NOT NULL,
    http2 BOOLEAN NOT NULL DEFAULT FALSE,
    signing_secret TEXT,
    signing_secret_created_at BIGINT,
    previous_signing_secret TEXT,
    previous_signing_secret_expires_at BIGINT
);
CREATE TABLE IF NOT EXISTS sessions (
    id TEXT PRIMARY KEY,
    user_id TEXT NOT NULL,
    agent_id TEXT NOT NULL,
    status TEXT NOT NULL,
    metadata TEXT NOT NULL,
    last_seq BIGINT NOT NULL DEFAULT 0,
    nonuser_count BIGINT NOT NULL DEFAULT 0,
    last_activity_at BIGINT NOT NULL,
    last_sender_id TEXT,
    last_message_preview TEXT,
    last_user_seq BIGINT NOT NULL DEFAULT 0,
    answered_through BIGINT NOT NULL DEFAULT 0,
    inserted_at BIGINT NOT NULL,
    updated_at BIGINT NOT NULL
);
CREATE INDEX IF NOT EXISTS sessions_by_time ON sessions (inserted_at DESC, id DESC);
CREATE INDEX IF NOT EXISTS sessions_by_user ON sessions (user_id, inserted_at DESC, id DESC);
CREATE INDEX IF NOT EXISTS sessions_by_agent ON sessions (agent_id, inserted_at DESC, id DESC);
CREATE INDEX IF NOT EXISTS sessions_owing_a_reply ON sessions (id) WHERE last_user_seq > answered_through;
CREATE TABLE IF NOT EXISTS messages (
    session_id TEXT NOT NULL,
    seq BIGINT NOT NULL,
    id TEXT NOT NULL,
    sender_id TEXT NOT NULL,
    kind TEXT NOT NULL,
    content TEXT NOT NULL,
    metadata TEXT NOT NULL,
    client_id TEXT,
    fingerprint BIGINT NOT NULL,
    nonuser_through BIGINT NOT NULL,
    inserted_at BIGINT NOT NULL,
    PRIMARY KEY (session_id, seq)
);
CREATE UNIQUE INDEX IF NOT EXISTS messages_client_id ON messages (session_id, client_id) WHERE client_id IS NOT NULL;
CREATE TABLE IF NOT EXISTS read_cursors (
    session_id TEXT NOT NULL,
    user_id TEXT NOT NULL,
    read_seq BIGINT NOT NULL,
    nonuser_through BIGINT NOT NULL,
    PRIMARY KEY (session_id, user_id)
);
CREATE TABLE IF NOT EXISTS archive_watermarks (
    shard INTEGER PRIMARY KEY,
    log_index BIGINT NOT NULL
);
CREATE TABLE IF NOT EXISTS dead_letters (
    id TEXT PRIMARY KEY,
    kind TEXT NOT NULL,
    session_id TEXT NOT NULL,
    seq BIGINT,
    client_id TEXT,
    error TEXT NOT NULL,
    payload TEXT NOT NULL,
    inserted_at BIGINT NOT NULL
);
CREATE INDEX IF NOT EXISTS dead_letters_by_session ON dead_letters (session_id, seq);
CREATE TABLE IF NOT EXISTS session_gaps (
    session_id TEXT NOT NULL,
    from_seq BIGINT NOT NULL,
    through_seq BIGINT NOT NULL,
    PRIMARY KEY (session_id, from_seq)
);
CREATE TABLE IF NOT EXISTS shard_losses (
    shard INTEGER NOT NULL,
    after_index BIGINT NOT NULL,
    skip_seqs BIGINT NOT NULL,
    recorded_at BIGINT NOT NULL,
    PRIMARY KEY (shard, after_index)
);
-- Cluster mode: the cluster this database archives for, one row made when the cluster forms
-- (`archive::identity`); an empty node forms a cluster only while there is none.
CREATE TABLE IF NOT EXISTS cluster_identity (
    id INTEGER PRIMARY KEY CHECK (id = 1),
    cluster_id TEXT NOT NULL,
    formed_at BIGINT NOT NULL
);
-- Cluster mode: the members that took part (hold or held the log), recorded before the log
-- records them joined and removed when the operator forgets one; a member found here that
-- starts with an empty data directory lost it.
CREATE TABLE IF NOT EXISTS cluster_members (
    node_id BIGINT PRIMARY KEY,
    recorded_at BIGINT NOT NULL
);
CREATE TABLE IF NOT EXISTS files (
    session_id TEXT NOT NULL,
    id TEXT NOT NULL,
    media_type TEXT NOT NULL,
    filename TEXT,
    size BIGINT NOT NULL,
    sha256 TEXT NOT NULL,
    created_at BIGINT NOT NULL,
    content BYTEA NOT NULL,
    PRIMARY KEY (session_id, id)
);
