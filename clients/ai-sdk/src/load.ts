// Loading a session's history for `useChat({ messages })`: all of it, or page by page from the
// newest (a long chat shows its newest messages first and loads older ones on demand).
import { FleetLMClient, type FleetLMClientOptions, type Message } from "@fleetlm/client";
import type { UIMessage } from "ai";
import { historyPageStart, historyToUIMessages } from "./messages.js";

export interface LoadChatMessagesOptions {
  /** The chat id (= the FleetLM session id). */
  chatId: string;
  /** The server's base URL. */
  url?: string;
  userId?: string;
  token?: FleetLMClientOptions["token"];
  fetch?: typeof fetch;
  /** An existing client (instead of url/userId/token). */
  client?: FleetLMClient;
  /**
   * Load only the newest part of the history: at least this many UI messages (more when the
   * page has to reach back to the user's turn they answer; fewer only when the chat has fewer).
   * Without it, the whole history. `loadChatPage` gives the same messages with the cursor of
   * the page before them.
   */
  limit?: number;
  /**
   * Where file parts naming a FleetLM file by its path (`/api/sessions/<id>/files/<file_id>`,
   * what the transport stores for an attachment) point: the absolute URL on this base URL
   * (default: the client's URL), or `null` to keep the stored paths.
   */
  fileBaseUrl?: string | null;
}

export interface LoadChatPageOptions extends LoadChatMessagesOptions {
  /** At least this many UI messages per page (fewer only for the chat's first page). */
  limit: number;
  /** The `before` cursor of the page loaded last (a newer one); omitted: the newest page. */
  before?: string | null;
}

/** One page of a chat's history, see `loadChatPage`. */
export interface ChatPage<UI_MESSAGE extends UIMessage = UIMessage> {
  /** The page's UI messages, oldest first: put them before the messages already shown. */
  messages: UI_MESSAGE[];
  /**
   * An opaque cursor: pass it as `before` to load the page before this one. `null` when this
   * page begins the chat (nothing older).
   */
  before: string | null;
}

function clientFor(options: LoadChatMessagesOptions): FleetLMClient {
  return options.client ?? new FleetLMClient({ url: options.url ?? "", userId: options.userId, token: options.token, fetch: options.fetch });
}

function fileBaseUrl(options: LoadChatMessagesOptions, client: FleetLMClient): string | undefined {
  return options.fileBaseUrl === null ? undefined : (options.fileBaseUrl ?? client.url);
}

async function sessionUser(client: FleetLMClient, chatId: string): Promise<string | null> {
  try {
    return (await client.getSession(chatId)).user_id;
  } catch (error) {
    if ((error as { code?: string }).code === "session_not_found") return null;
    throw error;
  }
}

/**
 * Loads a session's history as UIMessage[] for `useChat({ id: chatId, messages })`. A session
 * that does not exist yet loads as `[]` (the transport creates it on the first send). With
 * `limit`, only the newest page (as `loadChatPage` without `before`).
 */
export async function loadChatMessages<UI_MESSAGE extends UIMessage = UIMessage>(
  options: LoadChatMessagesOptions,
): Promise<UI_MESSAGE[]> {
  if (options.limit !== undefined) return (await loadChatPage<UI_MESSAGE>({ ...options, limit: options.limit })).messages;
  const client = clientFor(options);
  const userId = await sessionUser(client, options.chatId);
  if (userId === null) return [];
  const history = await client.rest.getAllMessages(options.chatId);
  return historyToUIMessages<UI_MESSAGE>(history, { userId, fileBaseUrl: fileBaseUrl(options, client) }).messages;
}

const CURSOR = /^s([1-9][0-9]*)$/;

/**
 * One page of a chat's history, newest first: without `before` the newest page, with the
 * `before` of a page the one before it. Each page holds at least `limit` UI messages (fewer
 * only for the chat's first page) and begins with one of the user's turns (or the chat's start),
 * so no UI message is ever split across pages — a reply with its tool calls, tool results,
 * continuations and regenerations is always on the page of the turn it answers. The pages put
 * together (older before newer) are exactly what `loadChatMessages` gives for the whole history.
 * Unknown session: `{ messages: [], before: null }`.
 */
export async function loadChatPage<UI_MESSAGE extends UIMessage = UIMessage>(
  options: LoadChatPageOptions,
): Promise<ChatPage<UI_MESSAGE>> {
  const { limit } = options;
  if (!Number.isInteger(limit) || limit < 1) throw new Error("limit must be a positive integer");
  let beforeSeq = Number.MAX_SAFE_INTEGER;
  if (options.before !== undefined && options.before !== null) {
    const match = CURSOR.exec(options.before);
    if (!match) throw new Error(`not a chat page cursor: ${JSON.stringify(options.before)}`);
    beforeSeq = Number(match[1]);
  }
  const client = clientFor(options);
  const userId = await sessionUser(client, options.chatId);
  if (userId === null) return { messages: [], before: null };
  // Read backwards until the window holds a place where the page may begin.
  const read = Math.min(1000, Math.max(50, limit * 4));
  let window: Message[] = [];
  let next: number | null = beforeSeq;
  for (;;) {
    const page = await client.getMessagesBefore(options.chatId, { beforeSeq: next!, limit: read });
    window = [...page.messages, ...window];
    next = page.has_more && page.messages.length ? page.next_before_seq : null;
    const start = historyPageStart(window, { userId, limit, complete: next === null });
    if (start < 0) continue;
    const messages = historyToUIMessages<UI_MESSAGE>(window.slice(start), { userId, fileBaseUrl: fileBaseUrl(options, client) }).messages;
    const older = start > 0 || next !== null;
    return { messages, before: older && window.length ? `s${window[start].seq}` : null };
  }
}
