// The shapes FleetLM sends and takes (docs/API.md, docs/WEBSOCKET.md, docs/AGENTS.md).

/** A JSON object. */
export type JsonObject = { [key: string]: unknown };

/** A stored message (docs/API.md "Representations"). */
export interface Message {
  id: string;
  session_id: string;
  seq: number;
  sender_id: string;
  kind: string;
  content: JsonObject;
  metadata: JsonObject;
  inserted_at: string;
}

/**
 * A file uploaded to a session (`POST /api/sessions/:id/files`, docs/API.md). `url` is the path
 * `/api/sessions/<session_id>/files/<id>`: what a message's file part names.
 */
export interface SessionFile {
  id: string;
  session_id: string;
  media_type: string;
  filename?: string | null;
  size: number;
  /** The SHA-256 of the bytes, hex. */
  sha256: string;
  inserted_at: string;
  url: string;
}

/** The agent's status as pushed to the session's members. */
export interface AgentStatus {
  status: "queued" | "dispatching" | "streaming" | "idle" | "failed" | "cancelled" | (string & {});
  dispatch_id?: string;
  error?: string;
}

export interface Session {
  id: string;
  user_id: string;
  agent_id: string;
  status: "active" | "archived";
  metadata: JsonObject;
  last_seq: number;
  inserted_at: string;
  updated_at: string;
  agent_status?: AgentStatus;
}

export interface InboxEntry {
  session_id: string;
  agent_id: string;
  unread_count: number;
  last_seq: number;
  last_activity_at: string;
  last_sender_id: string | null;
  last_message_preview?: string;
}

/**
 * One AI SDK UI message chunk (`{"type": "text-delta", ...}`), exactly as the agent streamed it.
 * Structurally compatible with the `ai` package's `UIMessageChunk`; this package does not
 * depend on `ai`.
 */
export type UIMessageChunk = { type: string; [key: string]: any };

/** A UI message part (`{"type": "text", "text": ...}`, tool parts, data parts, ...). */
export type UIPart = { type: string; [key: string]: any };

/** A UI message in the AI SDK's shape, as FleetLM stores assistant replies. */
export interface UIMessageLike {
  id: string;
  role: "user" | "assistant" | "system";
  parts: UIPart[];
  metadata?: unknown;
}

/** A `stream_chunk` as delivered by a subscription (gap-free, de-duplicated by index). */
export interface StreamChunkEvent {
  dispatchId: string;
  agentId: string;
  chunk: UIMessageChunk;
  /** The chunk's index in its dispatch (0, 1, 2…). */
  index: number;
}

/** What the join reply says about a reply streaming at join time. */
export interface JoinStream {
  dispatch_id: string;
  agent_id: string;
}

export interface JoinInfo {
  sessionId: string;
  /** The highest seq delivered so far. */
  lastSeq: number;
  /**
   * A reply streaming at join time (its chunks so far are delivered right after the join), null
   * if none, undefined if the server does not say (a server older than chunk indexes).
   */
  stream: JoinStream | null | undefined;
  /** True for a rejoin after a reconnect or a `resync`. */
  rejoin: boolean;
}

/** The result of a `send` / append: the seq the message was stored at. */
export interface SendResult {
  seq: number;
  deduplicated?: boolean;
}

export interface CancelResult {
  cancelled: boolean;
  dispatch_id?: string;
}

/** A message to append. */
export interface NewMessage {
  /** Default `"text"`. */
  kind?: string;
  content: JsonObject;
  metadata?: JsonObject;
  /** Makes a retry safe: the same `clientId` with the same body is stored once. */
  clientId?: string;
  /** Refused with `seq_conflict` unless the session's newest seq is this one. */
  expectedSeq?: number;
}
