// The FleetLM client: REST calls plus one Phoenix socket shared by every subscription.
import { Socket } from "phoenix";
import { jitteredBackoff, retryDelayMs } from "./backoff.js";
import { FleetLMError, RestClient, resolveToken, type TokenProvider } from "./rest.js";
import { SessionSubscription, type SubscribeOptions } from "./session.js";
import type { InboxEntry, JsonObject, Message, NewMessage, Session, SessionFile } from "./types.js";

export interface FleetLMClientOptions {
  /** The server's base URL, e.g. `http://127.0.0.1:4000` (the socket is at `/socket`). */
  url: string;
  /** Open mode: the user this client acts as. In token mode it defaults to the token's `sub`. */
  userId?: string;
  /**
   * Token mode: the user's JWT, or a function returning the current one (called before every
   * REST call and every socket (re)connect, so a refreshed token is picked up).
   */
  token?: TokenProvider;
  /** A `fetch` implementation (default: the global one). */
  fetch?: typeof fetch;
  /**
   * A WebSocket constructor (default: the global `WebSocket`). Node 20 has none: pass the `ws`
   * package's export.
   */
  WebSocket?: unknown;
  /**
   * Socket reconnect (and channel rejoin) delay in ms for the n-th try. Default: capped
   * exponential backoff with full jitter, a random time up to 100, 200, 400 ms … 5 s
   * (`jitteredBackoff()`).
   */
  reconnectAfterMs?: (tries: number) => number;
  /**
   * Token mode with a token function: ask for a new token this long before the current one
   * expires (its `exp`), and reconnect the socket with it (default 30 000; at most half the
   * token's remaining lifetime).
   */
  tokenRefreshMarginMs?: number;
  /** Heartbeat interval in ms (default 30 000; the server closes a socket silent for 60 s). */
  heartbeatIntervalMs?: number;
  /** Push and join timeout in ms (default 10 000). */
  timeoutMs?: number;
}

/** The state of the client's socket (`client.connectionState`, `client.on("state")`). */
export type ConnectionState = "connecting" | "open" | "reconnecting" | "closed";

/** The claims of a JWT, decoded without verifying it (the server does that). */
function tokenClaims(token: string): Record<string, unknown> | undefined {
  const part = token.split(".")[1];
  if (!part) return undefined;
  try {
    const base64 = part.replace(/-/g, "+").replace(/_/g, "/");
    const json = JSON.parse(globalThis.atob(base64 + "=".repeat((4 - (base64.length % 4)) % 4)));
    return json && typeof json === "object" ? json : undefined;
  } catch {
    return undefined;
  }
}

/** Decodes the `sub` of a JWT without verifying it (the server does that). */
export function tokenSubject(token: string): string | undefined {
  const sub = tokenClaims(token)?.sub;
  return typeof sub === "string" ? sub : undefined;
}

/** The `exp` of a JWT as a time in ms since the epoch, if it has one. */
export function tokenExpiresAt(token: string): number | undefined {
  const exp = tokenClaims(token)?.exp;
  return typeof exp === "number" && Number.isFinite(exp) ? exp * 1000 : undefined;
}

const DEFAULT_TOKEN_REFRESH_MARGIN_MS = 30_000;

export class FleetLMClient {
  readonly url: string;
  readonly rest: RestClient;
  readonly #options: FleetLMClientOptions;
  #userId: string | undefined;
  #socket: Socket | null = null;
  #connecting: Promise<Socket> | null = null;
  #currentToken: string | undefined;
  #subscriptions = new Map<string, SessionSubscription>();
  #inboxes = new Set<InboxSubscription>();
  #state: ConnectionState = "closed";
  readonly #stateListeners = new Set<(state: ConnectionState, previous: ConnectionState) => void>();
  #refreshTimer: ReturnType<typeof setTimeout> | undefined;
  #refreshFailures = 0;
  /** The socket is being reconnected with a token just refreshed: its close asks for none. */
  #refreshReconnect = false;

  constructor(options: FleetLMClientOptions) {
    if (!options.userId && options.token === undefined) {
      throw new Error("FleetLMClient needs userId (open mode) or token (token mode)");
    }
    this.#options = options;
    this.url = options.url.replace(/\/+$/, "");
    this.rest = new RestClient({ url: this.url, token: options.token, fetch: options.fetch });
    this.#userId = options.userId;
    if (typeof options.token === "string" && !this.#userId) this.#userId = tokenSubject(options.token);
  }

  /**
   * The socket's state: `closed` (no socket: before the first subscription, or after
   * `close()`), `connecting` (the first connect), `open`, `reconnecting` (the connection was
   * lost or refused; it is retried with `reconnectAfterMs`).
   */
  get connectionState(): ConnectionState {
    return this.#state;
  }

  /** Calls `listener(state, previous)` on every change of `connectionState`; returns a function that removes it. */
  on(event: "state", listener: (state: ConnectionState, previous: ConnectionState) => void): () => void {
    if (event !== "state") throw new Error(`unknown event ${String(event)}`);
    this.#stateListeners.add(listener);
    return () => {
      this.#stateListeners.delete(listener);
    };
  }

  #setState(state: ConnectionState): void {
    const previous = this.#state;
    if (previous === state) return;
    this.#state = state;
    for (const listener of [...this.#stateListeners]) {
      try {
        listener(state, previous);
      } catch (error) {
        queueMicrotask(() => {
          throw error;
        });
      }
    }
  }

  /** The user this client acts as (in token mode known once the token has been resolved). */
  get userId(): string | undefined {
    return this.#userId;
  }

  async #identity(): Promise<string> {
    if (this.#userId) return this.#userId;
    const token = await resolveToken(this.#options.token);
    this.#currentToken = token;
    const sub = token ? tokenSubject(token) : undefined;
    if (!sub) throw new FleetLMError("the token names no user (sub); pass userId", "invalid_token");
    this.#userId = sub;
    return sub;
  }

  /** The shared Phoenix socket, connected on first use. */
  socket(): Promise<Socket> {
    if (this.#socket) return Promise.resolve(this.#socket);
    if (!this.#connecting) {
      this.#setState("connecting");
      this.#connecting = this.#connect()
        .catch((error) => {
          this.#setState("closed");
          throw error;
        })
        .finally(() => {
          this.#connecting = null;
        });
    }
    return this.#connecting;
  }

  async #connect(): Promise<Socket> {
    const options = this.#options;
    const token = options.token;
    const userId = await this.#identity();
    const transport = options.WebSocket ?? (globalThis as { WebSocket?: unknown }).WebSocket;
    if (!transport) {
      throw new Error("no WebSocket implementation: pass options.WebSocket (in Node 20: the `ws` package)");
    }
    const backoff = jitteredBackoff();
    const socketOptions: Record<string, unknown> = {
      transport,
      timeout: options.timeoutMs ?? 10_000,
      heartbeatIntervalMs: options.heartbeatIntervalMs ?? 30_000,
      reconnectAfterMs: options.reconnectAfterMs ?? backoff,
      rejoinAfterMs: options.reconnectAfterMs ?? backoff,
    };
    if (token !== undefined) {
      this.#useToken(await resolveToken(token));
      // Read at every (re)connect; a function token is asked again after every close and
      // before the current one expires.
      socketOptions.authToken = () => this.#currentToken;
    } else {
      socketOptions.params = { user_id: userId };
    }
    const wsUrl = this.url.replace(/^http/, "ws") + "/socket";
    const socket = new Socket(wsUrl, socketOptions as any);
    socket.onOpen(() => {
      if (this.#socket === socket) this.#setState("open");
    });
    socket.onClose(() => {
      if (this.#socket !== socket) return;
      this.#setState("reconnecting");
      if (typeof token === "function" && !this.#refreshReconnect) {
        void resolveToken(token).then(
          (fresh) => this.#socket === socket && this.#useToken(fresh),
          () => {},
        );
      }
    });
    socket.connect();
    this.#socket = socket;
    return socket;
  }

  /** Takes `token` for the next connects; with a token function, plans its refresh. */
  #useToken(token: string | undefined): void {
    this.#currentToken = token;
    clearTimeout(this.#refreshTimer);
    this.#refreshTimer = undefined;
    const expiresAt = token ? tokenExpiresAt(token) : undefined;
    if (typeof this.#options.token !== "function" || expiresAt === undefined) return;
    const remainingMs = expiresAt - Date.now();
    if (remainingMs <= 0) return; // expired: the server closes the socket, the close asks again
    const marginMs = Math.min(this.#options.tokenRefreshMarginMs ?? DEFAULT_TOKEN_REFRESH_MARGIN_MS, remainingMs / 2);
    this.#refreshTimer = setTimeout(() => void this.#refreshToken(token!), remainingMs - marginMs);
    (this.#refreshTimer as { unref?: () => void }).unref?.();
  }

  /**
   * Asks the token function for a new token before `current` expires and reconnects the socket
   * with it (the server reads the token at connect): the subscriptions rejoin from their last
   * seq, so nothing is lost.
   */
  async #refreshToken(current: string): Promise<void> {
    const socket = this.#socket;
    let fresh: string | undefined;
    try {
      fresh = await resolveToken(this.#options.token);
    } catch (error) {
      this.#refreshFailures += 1;
      this.#retryRefresh(current, retryDelayMs(error, this.#refreshFailures));
      return;
    }
    if (this.#socket !== socket || this.#currentToken !== current) return; // closed, or replaced meanwhile
    this.#refreshFailures = 0;
    if (!fresh || fresh === current) {
      // Not renewed yet: ask again later, while the current one is still valid.
      this.#retryRefresh(current, 1000);
      return;
    }
    this.#useToken(fresh);
    if (!socket || this.#state !== "open") return; // the next connect takes it
    this.#refreshReconnect = true;
    socket.disconnect(() => {
      this.#refreshReconnect = false;
      if (this.#socket === socket) socket.connect();
    });
  }

  #retryRefresh(current: string, delayMs: number): void {
    const expiresAt = tokenExpiresAt(current) ?? 0;
    if (this.#currentToken !== current || Date.now() + delayMs >= expiresAt) return;
    clearTimeout(this.#refreshTimer);
    this.#refreshTimer = setTimeout(() => void this.#refreshToken(current), delayMs);
    (this.#refreshTimer as { unref?: () => void }).unref?.();
  }

  /**
   * Subscribes to `session:<id>`: every message after `lastSeq` exactly once in seq order,
   * across reconnects and `resync`s, plus streamed replies, agent status and typing. One
   * subscription per session per client: a second call returns the same one.
   */
  async subscribe(sessionId: string, options: SubscribeOptions = {}): Promise<SessionSubscription> {
    const existing = this.#subscriptions.get(sessionId);
    if (existing && !existing.closed) return existing;
    const socket = await this.socket();
    const again = this.#subscriptions.get(sessionId);
    if (again && !again.closed) return again;
    const subscription = new SessionSubscription(
      socket,
      this.rest,
      sessionId,
      { timeoutMs: this.#options.timeoutMs, ...options },
      () => {
        if (this.#subscriptions.get(sessionId) === subscription) this.#subscriptions.delete(sessionId);
      },
    );
    this.#subscriptions.set(sessionId, subscription);
    return subscription;
  }

  /** Subscribes to this user's inbox (`inbox:<user_id>`). */
  async subscribeInbox(onChange: (entries: InboxEntry[]) => void): Promise<InboxSubscription> {
    const socket = await this.socket();
    const inbox = new InboxSubscription(socket, await this.#identity(), onChange, this.#options.timeoutMs ?? 10_000, () =>
      this.#inboxes.delete(inbox),
    );
    this.#inboxes.add(inbox);
    await inbox.joined;
    return inbox;
  }

  // REST shortcuts acting as this client's user.

  async createSession(options: { agentId: string; id?: string; metadata?: JsonObject }): Promise<Session> {
    return this.rest.createSession({ ...options, userId: await this.#identity() });
  }

  getSession(sessionId: string): Promise<Session> {
    return this.rest.getSession(sessionId);
  }

  async listSessions(filter: { agentId?: string; status?: "active" | "archived"; limit?: number; cursor?: string } = {}) {
    return this.rest.listSessions({ ...filter, userId: await this.#identity() });
  }

  getMessages(sessionId: string, options: { afterSeq?: number } = {}): Promise<Message[]> {
    return this.rest.getAllMessages(sessionId, options);
  }

  /**
   * One page of history, newest first in the paging sense: the newest `limit` messages below
   * `beforeSeq` (default: the newest page), ascending. For "show the latest N, load older on
   * scroll": pass the page's `next_before_seq` as `beforeSeq` for the next older page.
   */
  getMessagesBefore(
    sessionId: string,
    options: { beforeSeq?: number; limit?: number } = {},
  ): Promise<{ messages: Message[]; has_more: boolean; next_before_seq: number | null }> {
    return this.rest.getMessagesBefore(sessionId, options);
  }

  async sendMessage(sessionId: string, message: NewMessage): Promise<Message & { deduplicated?: boolean }> {
    return this.rest.appendMessage(sessionId, { userId: await this.#identity() }, message);
  }

  /**
   * Uploads a file to the session and returns the server's file object; put its `url` in a
   * message's file part (see `RestClient.uploadFile`).
   */
  uploadFile(
    sessionId: string,
    file: Blob | ArrayBuffer | ArrayBufferView,
    options: { mediaType?: string; filename?: string; signal?: AbortSignal } = {},
  ): Promise<SessionFile> {
    return this.rest.uploadFile(sessionId, file, options);
  }

  /** A file's absolute URL on this server (a path is taken relative to the base URL). */
  fileUrl(url: string | { url: string }): string {
    return this.rest.fileUrl(url);
  }

  /** Whether a file's URL (or path) is on this server, where it needs this client's token. */
  isOwnFileUrl(url: string | { url: string }): boolean {
    return this.rest.isOwnUrl(this.rest.fileUrl(url));
  }

  /** A file's bytes, fetched with this client's token when the URL is on this server. */
  getFile(url: string | { url: string }, options: { signal?: AbortSignal } = {}): Promise<Blob> {
    return this.rest.getFile(url, options);
  }

  /**
   * `getFile` as an object URL (`blob:…`) for an `<img src>` or a link in token mode, where the
   * browser cannot send the bearer token itself. Call `URL.revokeObjectURL` on it when it is no
   * longer shown.
   */
  async fileObjectUrl(url: string | { url: string }, options: { signal?: AbortSignal } = {}): Promise<string> {
    return URL.createObjectURL(await this.rest.getFile(url, options));
  }

  async markRead(sessionId: string, lastSeq: number): Promise<{ read_seq: number }> {
    return this.rest.markRead(sessionId, await this.#identity(), lastSeq);
  }

  async getInbox(): Promise<InboxEntry[]> {
    return this.rest.getInbox(await this.#identity());
  }

  cancel(sessionId: string, options: { dispatchId?: string } = {}) {
    return this.rest.cancel(sessionId, options);
  }

  regenerate(sessionId: string, options: { messageId?: string } = {}) {
    return this.rest.regenerate(sessionId, options);
  }

  /** Leaves every subscription and closes the socket. */
  close(): void {
    for (const subscription of [...this.#subscriptions.values()]) subscription.leave();
    for (const inbox of [...this.#inboxes]) inbox.leave();
    clearTimeout(this.#refreshTimer);
    this.#refreshTimer = undefined;
    this.#socket?.disconnect();
    this.#socket = null;
    this.#setState("closed");
  }
}

/** `inbox:<user_id>`: the user's sessions, kept current from `inbox_delta` pushes. */
export class InboxSubscription {
  readonly entries = new Map<string, InboxEntry>();
  readonly joined: Promise<InboxEntry[]>;
  readonly #channel;
  readonly #onLeave: () => void;
  #closed = false;

  constructor(socket: Socket, userId: string, onChange: (entries: InboxEntry[]) => void, timeoutMs: number, onLeave: () => void) {
    this.#onLeave = onLeave;
    const channel = socket.channel(`inbox:${userId}`, {});
    this.#channel = channel;
    const changed = () => onChange(this.list());
    channel.on("inbox_delta", (payload: { inbox: InboxEntry[] }) => {
      for (const entry of payload?.inbox ?? []) this.entries.set(entry.session_id, entry);
      changed();
    });
    this.joined = new Promise((resolve, reject) => {
      let first = true;
      channel
        .join(timeoutMs)
        .receive("ok", (reply: { inbox: InboxEntry[] }) => {
          // Every (re)join answers with the whole inbox.
          this.entries.clear();
          for (const entry of reply?.inbox ?? []) this.entries.set(entry.session_id, entry);
          if (first) resolve(this.list());
          first = false;
          changed();
        })
        .receive("error", (reply: any) => {
          const reason = typeof reply?.reason === "string" ? reply.reason : "join refused";
          if (first) reject(new FleetLMError(`joining inbox:${userId} was refused: ${reason}`, reason.replace(/ /g, "_")));
          first = false;
          this.leave();
        });
    });
    this.joined.catch(() => {});
  }

  /** The entries, newest activity first. */
  list(): InboxEntry[] {
    return [...this.entries.values()].sort((a, b) => b.last_activity_at.localeCompare(a.last_activity_at));
  }

  leave(): void {
    if (this.#closed) return;
    this.#closed = true;
    this.#channel.leave();
    this.#onLeave();
  }
}
