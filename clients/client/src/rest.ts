// Typed REST calls (docs/API.md). Every error is a FleetLMError with the server's code.
import type {
  CancelResult,
  InboxEntry,
  JsonObject,
  Message,
  NewMessage,
  SendResult,
  Session,
  SessionFile,
} from "./types.js";

/** An error answered by FleetLM (REST or socket), or a transport failure (`code: "network"`). */
export class FleetLMError extends Error {
  /** The server's error code (`session_not_found`, `seq_conflict`, …), or `network`/`timeout`. */
  readonly code: string;
  /** The HTTP status for REST errors (0 for socket and network errors). */
  readonly status: number;
  /** The full error body. */
  readonly body: unknown;
  /**
   * How long the server asked to wait before trying again (`retry_after_ms` of a socket reply,
   * the `retry-after` header of a REST answer; e.g. `overloaded`, `no_leader`), if it said.
   */
  readonly retryAfterMs: number | undefined;
  constructor(message: string, code: string, status = 0, body: unknown = undefined, retryAfterMs?: number) {
    super(message);
    this.name = "FleetLMError";
    this.code = code;
    this.status = status;
    this.body = body;
    const fromBody = (body as { retry_after_ms?: unknown } | null | undefined)?.retry_after_ms;
    this.retryAfterMs = retryAfterMs ?? (typeof fromBody === "number" && fromBody >= 0 ? fromBody : undefined);
  }
}

/** A token, or a function returning the current one (called before every request). */
export type TokenProvider = string | (() => string | Promise<string>);

export interface RestOptions {
  /** The server's base URL, e.g. `http://127.0.0.1:4000`. */
  url: string;
  /** Token mode: a JWT for the user (or the API key for admin calls). */
  token?: TokenProvider;
  /** A `fetch` implementation (default: the global one). */
  fetch?: typeof fetch;
}

export async function resolveToken(token: TokenProvider | undefined): Promise<string | undefined> {
  if (token === undefined) return undefined;
  return typeof token === "function" ? await token() : token;
}

/** The REST API, one method per call. */
export class RestClient {
  readonly url: string;
  readonly #token: TokenProvider | undefined;
  readonly #fetch: typeof fetch;

  constructor(options: RestOptions) {
    this.url = options.url.replace(/\/+$/, "");
    this.#token = options.token;
    const f = options.fetch ?? globalThis.fetch;
    if (!f) throw new Error("no fetch implementation: pass options.fetch");
    this.#fetch = f.bind(globalThis);
  }

  /** Any call: returns the parsed JSON body, throws FleetLMError on a non-2xx answer. */
  async request<T>(method: string, path: string, body?: unknown, signal?: AbortSignal): Promise<T> {
    const response = await this.#call(`${this.url}${path}`, {
      method,
      body: body === undefined ? undefined : JSON.stringify(body),
      contentType: body === undefined ? undefined : "application/json",
      signal,
    });
    return (await readJson(response)) as T;
  }

  /**
   * Sends a request with the token (when `withToken`) and turns a non-2xx answer into a
   * FleetLMError; resolves with the (2xx) response, its body unread.
   */
  async #call(
    url: string,
    options: { method: string; body?: BodyInit; contentType?: string; accept?: string; signal?: AbortSignal; withToken?: boolean },
  ): Promise<Response> {
    const headers: Record<string, string> = { accept: options.accept ?? "application/json" };
    if (options.contentType !== undefined) headers["content-type"] = options.contentType;
    if (options.withToken !== false) {
      const token = await resolveToken(this.#token);
      if (token) headers.authorization = `Bearer ${token}`;
    }
    let response: Response;
    try {
      response = await this.#fetch(url, { method: options.method, headers, body: options.body, signal: options.signal });
    } catch (error) {
      if ((error as Error)?.name === "AbortError") throw error;
      throw new FleetLMError(`FleetLM is unreachable: ${(error as Error)?.message ?? error}`, "network");
    }
    if (!response.ok) {
      const json: any = await readJson(response);
      const message = typeof json?.error === "string" ? json.error : `HTTP ${response.status}`;
      const code = typeof json?.code === "string" ? json.code : `http_${response.status}`;
      throw new FleetLMError(message, code, response.status, json, retryAfterHeaderMs(response.headers.get("retry-after")));
    }
    return response;
  }

  /**
   * Uploads a file to the session (`POST /api/sessions/:id/files`, docs/API.md) and returns the
   * server's file object. Its `url` (the path `/api/sessions/<id>/files/<file_id>`) is what a
   * message's file part names: `{"type": "file", "mediaType", "url": file.url}`; the agent gets
   * such a part as an absolute signed URL. The media type is `mediaType`, else the Blob's own
   * `type`, else `application/octet-stream`; the filename is `filename`, else a `File`'s `name`.
   * Errors are FleetLMErrors: `file_too_large` (413, over the server's `max_file_bytes`, 25 MiB
   * by default), `invalid_file` (422: empty, a media type that is not `type/subtype`, a bad
   * filename), `session_not_found`, `session_archived`, `forbidden`.
   */
  async uploadFile(
    sessionId: string,
    file: Blob | ArrayBuffer | ArrayBufferView,
    options: { mediaType?: string; filename?: string; signal?: AbortSignal } = {},
  ): Promise<SessionFile> {
    const isBlob = typeof Blob !== "undefined" && file instanceof Blob;
    const mediaType = options.mediaType || (isBlob && (file as Blob).type) || "application/octet-stream";
    const named = (file as { name?: unknown }).name;
    const filename = options.filename ?? (isBlob && typeof named === "string" && named !== "" ? named : undefined);
    const query = filename === undefined ? "" : `?${new URLSearchParams({ filename })}`;
    let body: BodyInit;
    if (isBlob || file instanceof ArrayBuffer) body = file as Blob | ArrayBuffer;
    else if (ArrayBuffer.isView(file)) body = new Uint8Array(file.buffer, file.byteOffset, file.byteLength) as unknown as BodyInit;
    else throw new TypeError("uploadFile takes a Blob, an ArrayBuffer or a typed array");
    const response = await this.#call(`${this.url}/api/sessions/${enc(sessionId)}/files${query}`, {
      method: "POST",
      body,
      contentType: mediaType,
      signal: options.signal,
    });
    return ((await readJson(response)) as { file: SessionFile }).file;
  }

  /**
   * The absolute URL of a file on this server: a path (a file's `url`, a stored file part's
   * `url`) is taken relative to the base URL; an absolute URL is returned as it is.
   */
  fileUrl(url: string | { url: string }): string {
    const target = typeof url === "string" ? url : url.url;
    return target.startsWith("/") && !target.startsWith("//") ? `${this.url}${target}` : target;
  }

  /**
   * A file's bytes as a Blob (typed with its media type): `url` is a file's path or its absolute
   * URL (see `fileUrl`). The token goes with the request only when the URL is on this server
   * (its base URL); any other URL is fetched without it. For an `<img>` in token mode (which
   * cannot send a bearer token): `URL.createObjectURL(await client.getFile(part.url))`, or
   * `fileObjectUrl`. Errors: FleetLMError (`file_not_found`, `forbidden`, …).
   */
  async getFile(url: string | { url: string }, options: { signal?: AbortSignal } = {}): Promise<Blob> {
    const absolute = this.fileUrl(url);
    const response = await this.#call(absolute, {
      method: "GET",
      accept: "*/*",
      signal: options.signal,
      withToken: this.isOwnUrl(absolute),
    });
    return response.blob();
  }

  /** Whether `url` (absolute) is on this server: its base URL followed by a path. */
  isOwnUrl(url: string): boolean {
    return url === this.url || url.startsWith(`${this.url}/`);
  }

  async createSession(options: {
    userId: string;
    agentId: string;
    id?: string;
    metadata?: JsonObject;
  }): Promise<Session> {
    const body: JsonObject = { user_id: options.userId, agent_id: options.agentId };
    if (options.id !== undefined) body.id = options.id;
    if (options.metadata !== undefined) body.metadata = options.metadata;
    return (await this.request<{ session: Session }>("POST", "/api/sessions", body)).session;
  }

  async getSession(sessionId: string): Promise<Session> {
    return (await this.request<{ session: Session }>("GET", `/api/sessions/${enc(sessionId)}`)).session;
  }

  async listSessions(
    filter: { userId?: string; agentId?: string; status?: "active" | "archived"; limit?: number; cursor?: string } = {},
  ): Promise<{ sessions: Session[]; next_cursor: string | null }> {
    const query = new URLSearchParams();
    if (filter.userId !== undefined) query.set("user_id", filter.userId);
    if (filter.agentId !== undefined) query.set("agent_id", filter.agentId);
    if (filter.status !== undefined) query.set("status", filter.status);
    if (filter.limit !== undefined) query.set("limit", String(filter.limit));
    if (filter.cursor !== undefined) query.set("cursor", filter.cursor);
    return this.request("GET", `/api/sessions?${query}`);
  }

  /** Archives the session (later appends are refused, reads still work). */
  async archiveSession(sessionId: string): Promise<void> {
    await this.request("DELETE", `/api/sessions/${enc(sessionId)}`);
  }

  /** One page of history: `seq > afterSeq`, ascending. */
  async getMessages(
    sessionId: string,
    options: { afterSeq?: number; limit?: number } = {},
  ): Promise<{ messages: Message[]; has_more: boolean }> {
    const query = new URLSearchParams({
      after_seq: String(options.afterSeq ?? 0),
      limit: String(options.limit ?? 1000),
    });
    return this.request("GET", `/api/sessions/${enc(sessionId)}/messages?${query}`);
  }

  /**
   * One page of history read backwards: the newest messages with `seq < beforeSeq` (default:
   * the newest page), ascending. Read the next older page with `beforeSeq: page.next_before_seq`
   * while it is not `null`.
   */
  async getMessagesBefore(
    sessionId: string,
    options: { beforeSeq?: number; limit?: number } = {},
  ): Promise<{ messages: Message[]; has_more: boolean; next_before_seq: number | null }> {
    const query = new URLSearchParams({
      // Any bound past the last seq reads the newest page.
      before_seq: String(options.beforeSeq ?? Number.MAX_SAFE_INTEGER),
      limit: String(options.limit ?? 50),
    });
    return this.request("GET", `/api/sessions/${enc(sessionId)}/messages?${query}`);
  }

  /** Every message after `afterSeq` (default: the whole history), paging as needed. */
  async getAllMessages(sessionId: string, options: { afterSeq?: number; signal?: AbortSignal } = {}): Promise<Message[]> {
    const all: Message[] = [];
    let after = options.afterSeq ?? 0;
    for (;;) {
      if (options.signal?.aborted) throw options.signal.reason;
      const page = await this.getMessages(sessionId, { afterSeq: after, limit: 1000 });
      all.push(...page.messages);
      if (!page.has_more || page.messages.length === 0) return all;
      after = page.messages[page.messages.length - 1].seq;
    }
  }

  /** Appends a message as `sender` (`{userId}` or `{agentId}`); resolves once it is on disk. */
  async appendMessage(
    sessionId: string,
    sender: { userId: string } | { agentId: string },
    message: NewMessage,
  ): Promise<Message & { deduplicated?: boolean }> {
    const body: JsonObject = {
      kind: message.kind ?? "text",
      content: message.content,
    };
    if ("userId" in sender) body.user_id = sender.userId;
    else body.agent_id = sender.agentId;
    if (message.metadata !== undefined) body.metadata = message.metadata;
    if (message.clientId !== undefined) body.client_id = message.clientId;
    if (message.expectedSeq !== undefined) body.expected_seq = message.expectedSeq;
    const reply = await this.request<{ message: Message; deduplicated?: boolean }>(
      "POST",
      `/api/sessions/${enc(sessionId)}/messages`,
      body,
    );
    return reply.deduplicated ? { ...reply.message, deduplicated: true } : reply.message;
  }

  /** Moves the user's read cursor. */
  async markRead(sessionId: string, userId: string, lastSeq: number): Promise<{ read_seq: number }> {
    return this.request("POST", `/api/sessions/${enc(sessionId)}/read`, { user_id: userId, last_seq: lastSeq });
  }

  async getInbox(userId: string): Promise<InboxEntry[]> {
    return (await this.request<{ inbox: InboxEntry[] }>("GET", `/api/users/${enc(userId)}/inbox`)).inbox;
  }

  /** Cancels the session's turn in flight (or only `dispatchId`). */
  async cancel(sessionId: string, options: { dispatchId?: string } = {}): Promise<CancelResult> {
    const body = options.dispatchId === undefined ? {} : { dispatch_id: options.dispatchId };
    return this.request("POST", `/api/sessions/${enc(sessionId)}/cancel`, body);
  }

  /** Asks the agent again for the latest turn (`messageId`: the FleetLM id of the reply to replace). */
  async regenerate(sessionId: string, options: { messageId?: string } = {}): Promise<SendResult> {
    const body = options.messageId === undefined ? {} : { message_id: options.messageId };
    return this.request("POST", `/api/sessions/${enc(sessionId)}/regenerate`, body);
  }
}

/** The body parsed as JSON (its text if it is not JSON, null if empty). */
async function readJson(response: Response): Promise<unknown> {
  const text = await response.text();
  if (!text) return null;
  try {
    return JSON.parse(text);
  } catch {
    return text;
  }
}

/** `retry-after` in seconds (or an HTTP date) as ms; undefined when absent or unreadable. */
function retryAfterHeaderMs(value: string | null): number | undefined {
  if (value === null || value.trim() === "") return undefined;
  const seconds = Number(value);
  if (Number.isFinite(seconds)) return seconds >= 0 ? seconds * 1000 : undefined;
  const at = Date.parse(value);
  return Number.isNaN(at) ? undefined : Math.max(0, at - Date.now());
}

function enc(segment: string): string {
  return encodeURIComponent(segment);
}
