// The FleetLM client: REST calls plus one Phoenix socket shared by every subscription.
import { Socket } from "phoenix";
import { FleetLMError, RestClient, resolveToken, type TokenProvider } from "./rest.js";
import { SessionSubscription, type SubscribeOptions } from "./session.js";
import type { InboxEntry, JsonObject, Message, NewMessage, Session } from "./types.js";

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
  /** Socket reconnect backoff in ms for the n-th try (default: 100 ms doubling to 5 s). */
  reconnectAfterMs?: (tries: number) => number;
  /** Heartbeat interval in ms (default 30 000; the server closes a socket silent for 60 s). */
  heartbeatIntervalMs?: number;
  /** Push and join timeout in ms (default 10 000). */
  timeoutMs?: number;
}

/** Decodes the `sub` of a JWT without verifying it (the server does that). */
export function tokenSubject(token: string): string | undefined {
  const part = token.split(".")[1];
  if (!part) return undefined;
  try {
    const base64 = part.replace(/-/g, "+").replace(/_/g, "/");
    const json = JSON.parse(globalThis.atob(base64 + "=".repeat((4 - (base64.length % 4)) % 4)));
    return typeof json.sub === "string" ? json.sub : undefined;
  } catch {
    return undefined;
  }
}

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
      this.#connecting = this.#connect().finally(() => {
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
    const socketOptions: Record<string, unknown> = {
      transport,
      timeout: options.timeoutMs ?? 10_000,
      heartbeatIntervalMs: options.heartbeatIntervalMs ?? 30_000,
      reconnectAfterMs: options.reconnectAfterMs ?? ((tries: number) => Math.min(100 * 2 ** (tries - 1), 5000)),
      rejoinAfterMs: (tries: number) => Math.min(100 * 2 ** (tries - 1), 5000),
    };
    if (token !== undefined) {
      this.#currentToken = await resolveToken(token);
      // Read at every (re)connect; a function token is refreshed after every close.
      socketOptions.authToken = () => this.#currentToken;
    } else {
      socketOptions.params = { user_id: userId };
    }
    const wsUrl = this.url.replace(/^http/, "ws") + "/socket";
    const socket = new Socket(wsUrl, socketOptions as any);
    if (typeof token === "function") {
      socket.onClose(() => {
        void resolveToken(token).then(
          (fresh) => (this.#currentToken = fresh),
          () => {},
        );
      });
    }
    socket.connect();
    this.#socket = socket;
    return socket;
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

  async sendMessage(sessionId: string, message: NewMessage): Promise<Message & { deduplicated?: boolean }> {
    return this.rest.appendMessage(sessionId, { userId: await this.#identity() }, message);
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
    this.#socket?.disconnect();
    this.#socket = null;
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
