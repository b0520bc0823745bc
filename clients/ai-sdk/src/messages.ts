// A session's history as the AI SDK's UIMessage[] (what `useChat({ messages })` takes). Pure (no
// runtime imports), so agents share it: `@fleetlm/ai-sdk/messages`, used by `@fleetlm/agent`.
import type { Message } from "@fleetlm/client";
import type { UIMessage } from "ai";

/** Metadata keys FleetLM adds to stored replies; they are not part of the UI message. */
export const FLEETLM_METADATA_KEYS = ["termination", "dispatch_id", "answers_seq", "replaces", "error", "continuation"] as const;

/**
 * The metadata key under which `FleetLMChatTransport` stores a request's `body` and `headers`
 * (`sendMessage(message, { body, headers })`) in the message it writes:
 * `metadata.fleetlm_request = {"body"?: {...}, "headers"?: {"<lower-cased name>": "<value>"}}`.
 * It is not part of the UI message (`historyToUIMessages` leaves it out).
 */
export const FLEETLM_REQUEST_KEY = "fleetlm_request";

/** What a client sent with a message as request options (`body`, `headers`), if anything. */
export interface FleetLMRequestOptions {
  body?: Record<string, unknown>;
  headers?: Record<string, string>;
}

/**
 * The request options (`body`, `headers`) stored with a message (its `metadata`), e.g. the
 * newest user message of an agent call: `requestOptions(call.body.messages.at(-1).metadata)`.
 */
export function requestOptions(metadata: unknown): FleetLMRequestOptions | undefined {
  if (!isObject(metadata) || !isObject(metadata[FLEETLM_REQUEST_KEY])) return undefined;
  const stored = metadata[FLEETLM_REQUEST_KEY] as Record<string, unknown>;
  const options: FleetLMRequestOptions = {};
  if (isObject(stored.body)) options.body = stored.body;
  if (isObject(stored.headers)) options.headers = stored.headers as Record<string, string>;
  return options;
}

/** Tool part states a client writes back (docs/CLIENTS.md, "Tools and approvals"). */
export const CLIENT_TOOL_STATES = new Set(["output-available", "output-error", "approval-responded"]);

export interface HistoryOptions {
  /** The session's user: messages from anyone else that are not `assistant` replies are the agent's. */
  userId: string;
  /**
   * The server's base URL: a file part naming a file uploaded to FleetLM by its path
   * (`/api/sessions/<id>/files/<file_id>`) gets the absolute URL on it (`fileUrl`). Without it,
   * parts keep the stored path. `loadChatMessages`, `loadChatPage`, the transport's
   * `loadMessages` and `syncChat` pass their client's URL.
   */
  fileBaseUrl?: string;
}

/** A FleetLM file path as a stored file part names it: `/api/sessions/<id>/files/<file_id>`. */
const FILE_PATH = /^\/api\/sessions\/[^/?#]+\/files\/[^/?#]+$/;

/** Whether `url` is the path of a file uploaded to a FleetLM session (`/api/sessions/<id>/files/<file_id>`). */
export function isFleetLMFilePath(url: unknown): url is string {
  return typeof url === "string" && FILE_PATH.test(url);
}

/**
 * The part with the absolute URL of the FleetLM file it names by path (on `fileBaseUrl`, the
 * server's base URL); any other part as it is.
 */
export function fileUrl<PART>(part: PART, fileBaseUrl: string | undefined): PART {
  if (!fileBaseUrl || !isObject(part) || part.type !== "file" || !isFleetLMFilePath(part.url)) return part;
  return { ...part, url: `${fileBaseUrl.replace(/\/+$/, "")}${part.url}` };
}

/** Where each UI message of a converted history came from. */
export interface ConvertedHistory<UI_MESSAGE extends UIMessage = UIMessage> {
  messages: UI_MESSAGE[];
  /** UI message id → the FleetLM messages (ids, oldest first) it was built from. */
  sources: Map<string, Message[]>;
}

function isObject(value: unknown): value is Record<string, any> {
  return typeof value === "object" && value !== null && !Array.isArray(value);
}

/** The agent's own metadata of a stored reply (FleetLM's keys removed); undefined if none. */
export function replyMetadata(metadata: Record<string, unknown> | undefined): unknown {
  if (!isObject(metadata)) return undefined;
  const rest: Record<string, unknown> = { ...metadata };
  for (const key of FLEETLM_METADATA_KEYS) delete rest[key];
  return Object.keys(rest).length ? rest : undefined;
}

function userMessage(message: Message): UIMessage | null {
  const content = message.content as Record<string, any>;
  let parts: any[];
  if (Array.isArray(content.parts)) parts = content.parts;
  else if (typeof content.text === "string") parts = [{ type: "text", text: content.text }];
  else return null;
  const ui: UIMessage = { id: typeof content.id === "string" ? content.id : message.id, role: "user", parts };
  if (isObject(message.metadata)) {
    const { [FLEETLM_REQUEST_KEY]: _request, ...metadata } = message.metadata;
    if (Object.keys(metadata).length) ui.metadata = metadata;
  }
  return ui;
}

function assistantMessage(message: Message): UIMessage | null {
  const content = message.content as Record<string, any>;
  if (message.kind === "assistant") {
    if (!Array.isArray(content.parts)) return null;
    const ui: UIMessage = { id: typeof content.id === "string" ? content.id : message.id, role: "assistant", parts: content.parts };
    const metadata = replyMetadata(message.metadata);
    if (metadata !== undefined) ui.metadata = metadata;
    return ui;
  }
  // The agent writing by REST, or a legacy reply line: `{"text": …}` content.
  if (Array.isArray(content.parts)) {
    return { id: typeof content.id === "string" ? content.id : message.id, role: "assistant", parts: content.parts };
  }
  if (typeof content.text === "string") return { id: message.id, role: "assistant", parts: [{ type: "text", text: content.text }] };
  return null;
}

function isToolPart(part: unknown): part is { type: string; toolCallId: string } {
  return (
    isObject(part) &&
    typeof part.toolCallId === "string" &&
    typeof part.type === "string" &&
    (part.type.startsWith("tool-") || part.type === "dynamic-tool")
  );
}

/**
 * A message's parts from the stored messages it was built from (a reply and its continuations),
 * in order. A continuation's tool part naming a tool call an earlier one made (the outcome of a
 * tool the user approved: the AI SDK runs it when the conversation continues) updates that part
 * in place, as the AI SDK's chat does with the streamed chunks, instead of adding a second one.
 */
export function joinSegments(segments: any[][]): any[] {
  const parts: any[] = [];
  const toolParts = new Map<string, number>();
  for (const segment of segments) {
    const earlier = new Map(toolParts);
    for (const part of segment) {
      const index = isToolPart(part) ? earlier.get(part.toolCallId) : undefined;
      if (index !== undefined) {
        parts[index] = { ...parts[index], ...part };
        continue;
      }
      parts.push(part);
      if (isToolPart(part)) toolParts.set(part.toolCallId, parts.length - 1);
    }
  }
  return parts;
}

/**
 * Converts a session's messages (oldest first) to UI messages, exactly as a chat that watched
 * them live holds them:
 * - the user's `text` messages become user messages (their `content.parts` and `content.id`, as
 *   the transport stored them; a plain `{"text"}` becomes one text part);
 * - `assistant` replies become assistant messages (`content`, with the agent's metadata); a reply
 *   continuing an earlier message (same `content.id`, e.g. after a tool approval) appends its parts
 *   to it (a tool part for a tool call the message already holds updates that part instead);
 * - a `tool_result` message updates the tool parts of the message it names;
 * - a `regenerate` message removes the replies it supersedes (docs/API.md, "Regenerate");
 * - text the agent wrote by REST becomes an assistant message.
 */
export function historyToUIMessages<UI_MESSAGE extends UIMessage = UIMessage>(
  history: Message[],
  options: HistoryOptions,
): ConvertedHistory<UI_MESSAGE> {
  // Each UI message is built from segments: the stored messages it came from (a reply and its
  // continuations), so a `regenerate` can drop exactly the agent messages it supersedes.
  type Segment = { message: Message; parts: any[]; metadata: unknown; fromAgent: boolean; whole: boolean };
  type Entry = { id: string; role: UIMessage["role"]; segments: Segment[]; toolResults: Message[] };
  let out: Entry[] = [];
  // The seq of the latest user message of a kind other than `regenerate`.
  let turnSeq = 0;
  const add = (ui: UIMessage, message: Message, fromAgent: boolean) => {
    // A reply the server assembled from the message it continues holds all of it.
    const whole = fromAgent && (message.metadata as Record<string, unknown> | null)?.continuation === "whole";
    const segment: Segment = { message, parts: ui.parts, metadata: ui.metadata, fromAgent, whole };
    const existing = out.findIndex((m) => m.id === ui.id && m.role === ui.role);
    if (existing >= 0 && ui.role === "assistant") {
      out[existing].segments.push(segment);
      return;
    }
    if (existing >= 0) {
      // A user message edited in place (`sendMessage({ messageId })`): the chat drops what
      // followed it.
      out = out.slice(0, existing);
    }
    out.push({ id: ui.id, role: ui.role, segments: [segment], toolResults: [] });
  };
  for (const message of [...history].sort((a, b) => a.seq - b.seq)) {
    const fromUser = message.sender_id === options.userId && message.kind !== "assistant";
    if (fromUser && message.kind === "regenerate") {
      // Superseded: every agent message after the latest user turn before it.
      for (const entry of out) entry.segments = entry.segments.filter((g) => !g.fromAgent || g.message.seq < turnSeq);
      out = out.filter((entry) => entry.segments.length > 0);
      continue;
    }
    if (fromUser && message.kind === "tool_result") {
      const content = message.content as Record<string, any>;
      const target = out.find((m) => m.id === content.message_id);
      if (target && Array.isArray(content.parts)) {
        const updates = new Map<string, any>(content.parts.filter(isObject).map((p: any) => [p.toolCallId, p]));
        for (const segment of target.segments) {
          segment.parts = segment.parts.map((part: any) => (isObject(part) && updates.has(part.toolCallId) ? updates.get(part.toolCallId) : part));
        }
        target.toolResults.push(message);
      }
      turnSeq = message.seq;
      continue;
    }
    if (fromUser) {
      const ui = userMessage(message);
      if (ui) add(ui, message, false);
      turnSeq = message.seq;
      continue;
    }
    const ui = assistantMessage(message);
    if (ui) add(ui, message, true);
  }
  const sources = new Map<string, Message[]>();
  const messages = out.map((entry) => {
    sources.set(entry.id, [...entry.segments.map((g) => g.message), ...entry.toolResults]);
    // From the newest whole copy on (the segments a `regenerate` dropped are gone already).
    const from = Math.max(0, entry.segments.map((g) => g.whole).lastIndexOf(true));
    let parts = joinSegments(entry.segments.slice(from).map((g) => g.parts));
    if (options.fileBaseUrl) parts = parts.map((part) => fileUrl(part, options.fileBaseUrl));
    const ui: UIMessage = { id: entry.id, role: entry.role, parts };
    const metadata = entry.segments.reduce<unknown>(
      (merged, g) => (g.metadata === undefined ? merged : { ...(merged as object | undefined), ...(g.metadata as object) }),
      undefined,
    );
    if (metadata !== undefined) ui.metadata = metadata;
    return ui;
  });
  return { messages: messages as UI_MESSAGE[], sources };
}

/** The UI message id a stored message shows as (what `historyToUIMessages` files it under). */
function uiIdOf(message: Message): string {
  const content = message.content as Record<string, any>;
  return typeof content?.id === "string" ? content.id : message.id;
}

/**
 * Whether a stored message is one of the user's turns that becomes a user UI message (a `text`
 * message, not a `regenerate` or `tool_result`): a page of history may begin just before it.
 */
export function isUserTurn(message: Message, options: HistoryOptions): boolean {
  return (
    message.sender_id === options.userId &&
    message.kind !== "assistant" &&
    message.kind !== "regenerate" &&
    message.kind !== "tool_result" &&
    userMessage(message) !== null
  );
}

export interface HistoryPageOptions extends HistoryOptions {
  /** The page holds at least this many UI messages (fewer only at the start of the history). */
  limit: number;
  /** Whether `window` begins with the session's first message (nothing older is left to read). */
  complete: boolean;
}

/**
 * Where the newest page of `window` (a run of the session's history, oldest first, that ends
 * where the pages already shown begin) starts: the index of the message the page begins with, or
 * -1 when older messages must be read first (`window` is then too short to tell).
 *
 * A page begins just before one of the user's turns (`isUserTurn`), so it never splits a UI
 * message (a reply, its tool results, its continuations and regenerations all follow the turn
 * they answer), and only where nothing from there on refers to a UI message before it: a
 * `tool_result` (or a continuation stored whole) names a message of the page, a user message
 * edited in place or a reply reusing an id (as far as `window` shows) has its first copy in the
 * page. So `historyToUIMessages` of the page, placed after the older pages and before the newer
 * ones, gives what it gives for the whole history. The page is the newest such start with at
 * least `limit` UI messages; when `window` is `complete` and has none, the page is all of it.
 */
export function historyPageStart(window: Message[], options: HistoryPageOptions): number {
  const n = window.length;
  if (n === 0) return options.complete ? 0 : -1;
  // need[j]: the page must begin at or before this index for message j to convert as in the whole
  // history (Infinity: no constraint; -1: its referent is older than `window`).
  const first = new Map<string, number>();
  const need = new Array<number>(n).fill(Infinity);
  for (let j = 0; j < n; j++) {
    const message = window[j];
    const fromUser = message.sender_id === options.userId && message.kind !== "assistant";
    if (fromUser && message.kind === "regenerate") continue;
    if (fromUser && message.kind === "tool_result") {
      const target = (message.content as Record<string, any>)?.message_id;
      const at = typeof target === "string" ? (first.get(`assistant:${target}`) ?? first.get(`user:${target}`)) : undefined;
      need[j] = at ?? -1;
      continue;
    }
    const role = fromUser ? "user" : "assistant";
    const key = `${role}:${uiIdOf(message)}`;
    const at = first.get(key);
    if (at !== undefined) need[j] = at;
    else {
      first.set(key, j);
      const whole = !fromUser && (message.metadata as Record<string, unknown> | null)?.continuation === "whole";
      if (whole) need[j] = -1;
    }
  }
  let lowest = Infinity;
  const clean = new Array<boolean>(n);
  for (let b = n - 1; b >= 0; b--) {
    lowest = Math.min(lowest, need[b]);
    clean[b] = lowest >= b;
  }
  for (let b = n - 1; b >= 0; b--) {
    if (!clean[b] || !isUserTurn(window[b], options)) continue;
    if (historyToUIMessages(window.slice(b), options).messages.length >= options.limit) return b;
  }
  return options.complete ? 0 : -1;
}
