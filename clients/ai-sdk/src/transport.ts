// FleetLMChatTransport: the AI SDK's ChatTransport over a FleetLM session. The chat id is the
// session id; sending appends to the session's log, the reply is the agent's streamed chunks.
import {
  FleetLMClient,
  FleetLMError,
  randomId,
  type FleetLMClientOptions,
  type JsonObject,
  type Message,
  type SessionSubscription,
  type UIMessageChunk as FleetChunk,
} from "@fleetlm/client";
import type { ChatTransport, UIMessage, UIMessageChunk } from "ai";
import { UploadCache, uploadFileParts } from "./files.js";
import { CLIENT_TOOL_STATES, FLEETLM_REQUEST_KEY, historyToUIMessages } from "./messages.js";

export interface FleetLMChatTransportOptions {
  /** The server's base URL, e.g. `http://127.0.0.1:4000`. */
  url?: string;
  /** Open mode: the user this transport writes as. */
  userId?: string;
  /** Token mode: the user's JWT, or a function returning the current one. */
  token?: FleetLMClientOptions["token"];
  /**
   * Creates the session (id = the chat id, for this agent) on the first send or reconnect when it
   * does not exist. Without it, sending to an unknown chat id fails with `not_found`.
   */
  agentId?: string;
  /** Metadata of sessions this transport creates. */
  sessionMetadata?: JsonObject;
  /**
   * Upload the bytes of a sent message's file parts (`data:` and `blob:` URLs) to the session
   * and store the server's path in the part (default true). `false` stores the parts as they
   * are (inline, within FleetLM's 256 KiB message limit): for servers without file uploads.
   */
  uploadFiles?: boolean;
  /** Cancel the turn on the server when the chat aborts (`stop()`). Default true. */
  cancelOnAbort?: boolean;
  /** How long `reconnectToStream` waits for the snapshot the join promised (ms, default 5000). */
  snapshotTimeoutMs?: number;
  /** A WebSocket constructor (default: the global one; in Node 20 pass the `ws` package). */
  WebSocket?: unknown;
  fetch?: typeof fetch;
  /** An existing client to share (instead of url/userId/token). */
  client?: FleetLMClient;
  /**
   * How many chats' sessions the transport keeps joined at once (default 50). The server allows
   * 100 channels per socket; beyond this bound the least recently used chat that is not in use
   * (no reply streaming, no `syncChat` / `useFleetLMChat` following it) is left, and joined
   * again when it is used.
   */
  maxOpenChats?: number;
}

/** A reply `reconnectToStream` handed to a chat (see `FleetLMChatTransport.onResume`). */
export interface ResumedReply {
  /** The dispatch whose reply it is. */
  dispatchId: string;
  /** The message id its `start` chunk names, if any. */
  messageId?: string;
  /** Whether this transport had already handed this dispatch's reply to the chat before. */
  streamedBefore: boolean;
  /** Resolves when the stream handed out ends (finished, failed or cancelled). */
  done: Promise<void>;
}

/** The default of `maxOpenChats`: half the server's 100 channels per socket. */
export const DEFAULT_MAX_OPEN_CHATS = 50;

/** What the transport knows of a FleetLM message shown in a chat. */
interface Known {
  /** FleetLM message ids, oldest first. */
  fleetIds: string[];
  /** The seq of the first of them. */
  seq?: number;
  /** Tool parts as stored, by toolCallId. */
  toolParts: Map<string, string>;
}

function textOf(message: UIMessage): string {
  return message.parts
    .filter((part): part is { type: "text"; text: string } => part.type === "text")
    .map((part) => part.text)
    .join("");
}

/** A short stable hash (FNV-1a, 2 × 32 bits) for idempotent client ids. */
function hash(text: string): string {
  let a = 0x811c9dc5;
  let b = 0x01000193 ^ text.length;
  for (let i = 0; i < text.length; i++) {
    const c = text.charCodeAt(i);
    a = Math.imul(a ^ c, 0x01000193);
    b = Math.imul(b ^ c, 0x5bd1e995);
  }
  return (a >>> 0).toString(36) + (b >>> 0).toString(36);
}

function clientId(prefix: string, id: string): string {
  const full = `${prefix}${id}`;
  return full.length <= 128 ? full : `${prefix}h-${hash(id)}`;
}

type SendOptions<UI_MESSAGE extends UIMessage> = {
  trigger: "submit-message" | "regenerate-message";
  chatId: string;
  messageId: string | undefined;
  messages: UI_MESSAGE[];
  abortSignal: AbortSignal | undefined;
} & { headers?: Record<string, string> | Headers; body?: object; metadata?: unknown };

/** `{body?, headers?}` of a request (header names lower-cased), or undefined when it has neither. */
function requestMetadata(body: object | undefined, headers: Record<string, string> | Headers | undefined): JsonObject | undefined {
  const request: JsonObject = {};
  if (body && typeof body === "object" && !Array.isArray(body) && Object.keys(body).length) {
    request.body = JSON.parse(JSON.stringify(body)) as JsonObject;
  }
  if (headers) {
    const plain: Record<string, string> = {};
    if (typeof Headers !== "undefined" && headers instanceof Headers) headers.forEach((value, name) => (plain[name.toLowerCase()] = value));
    else for (const [name, value] of Object.entries(headers)) if (value !== undefined && value !== null) plain[name.toLowerCase()] = String(value);
    if (Object.keys(plain).length) request.headers = plain;
  }
  return Object.keys(request).length ? request : undefined;
}

export class FleetLMChatTransport<UI_MESSAGE extends UIMessage = UIMessage> implements ChatTransport<UI_MESSAGE> {
  /** `reconnectToStream` replays the reply from its first chunk. */
  readonly resumeStreamIsReplay = true;
  readonly client: FleetLMClient;
  readonly #options: FleetLMChatTransportOptions;
  readonly #ownsClient: boolean;
  readonly #sessions = new Map<string, Promise<SessionSubscription>>();
  readonly #known = new Map<string, Map<string, Known>>();
  /** Dispatches whose replies this transport handed to a chat, per chat id. */
  readonly #streamed = new Map<string, Set<string>>();
  /** The dispatch each chat's `sendMessages` stream is following right now. */
  readonly #inFlight = new Map<string, { dispatchId?: string }>();
  /** Each session's user. */
  readonly #users = new Map<string, string>();
  /** A counter per chat of the streams `reconnectToStream` returned. */
  readonly #resumes = new Map<string, number>();
  /** Chats whose pending open may create the session. */
  readonly #creating = new Set<string>();
  /** Callers of `whenOpen` waiting for a session to be joined. */
  readonly #waiters = new Map<string, Array<() => void>>();
  /** How many users each chat has now (streams, syncs): a chat in use is never left. */
  readonly #pins = new Map<string, number>();
  readonly #maxOpen: number;
  /** The files uploaded for messages' file parts (a retried send names the same ones). */
  readonly #uploads = new UploadCache();
  /** `onResume` listeners per chat id. */
  readonly #resumeListeners = new Map<string, Set<(reply: ResumedReply) => void>>();

  constructor(options: FleetLMChatTransportOptions) {
    this.#options = options;
    const max = options.maxOpenChats ?? DEFAULT_MAX_OPEN_CHATS;
    if (!Number.isInteger(max) || max < 1) throw new Error("maxOpenChats must be a positive integer");
    this.#maxOpen = max;
    if (options.client) {
      this.client = options.client;
      this.#ownsClient = false;
    } else {
      if (!options.url) throw new Error("FleetLMChatTransport needs url (or client)");
      this.client = new FleetLMClient({
        url: options.url,
        userId: options.userId,
        token: options.token,
        WebSocket: options.WebSocket,
        fetch: options.fetch,
      });
      this.#ownsClient = true;
    }
  }

  /**
   * The subscription behind a chat: joins the session, creating it first if it does not exist
   * and `agentId` is set (unless `create: false`: then a missing session is a
   * `session_not_found` FleetLMError).
   */
  session(chatId: string, options: { create?: boolean } = {}): Promise<SessionSubscription> {
    const create = options.create !== false;
    this.#touch(chatId);
    let pending = this.#sessions.get(chatId);
    if (pending && create && !this.#creating.has(chatId)) {
      // An open that may not create is under way (a reconnect or the sync): if it finds no
      // session, this call creates it.
      const previous = pending;
      pending = previous.catch((error) => {
        if (!(error instanceof FleetLMError) || error.code !== "session_not_found") throw error;
        return this.#open(chatId, true);
      });
      this.#creating.add(chatId);
      this.#sessions.set(chatId, pending);
      this.#watch(chatId, pending);
    }
    if (!pending) {
      pending = this.#open(chatId, create);
      if (create) this.#creating.add(chatId);
      this.#sessions.set(chatId, pending);
      this.#watch(chatId, pending);
      this.#trim(chatId);
    }
    const current = pending;
    return current.then((subscription) => {
      if (subscription.closed) {
        if (this.#sessions.get(chatId) === current) this.#sessions.delete(chatId);
        this.#creating.delete(chatId);
        return this.session(chatId, options);
      }
      return subscription;
    });
  }

  /**
   * Marks a chat in use until the returned function is called: its session stays joined (it is
   * not left to make room for other chats). `syncChat` and the streams the transport returns
   * hold one each.
   */
  retain(chatId: string): () => void {
    this.#pins.set(chatId, (this.#pins.get(chatId) ?? 0) + 1);
    this.#touch(chatId);
    let released = false;
    return () => {
      if (released) return;
      released = true;
      const left = (this.#pins.get(chatId) ?? 1) - 1;
      if (left > 0) this.#pins.set(chatId, left);
      else this.#pins.delete(chatId);
      this.#trim();
    };
  }

  /** The chats whose sessions the transport holds joined (or is joining), least recently used first. */
  openChats(): string[] {
    return [...this.#sessions.keys()];
  }

  /** Moves a chat to the most recently used end. */
  #touch(chatId: string): void {
    const pending = this.#sessions.get(chatId);
    if (!pending) return;
    this.#sessions.delete(chatId);
    this.#sessions.set(chatId, pending);
  }

  /** Leaves the least recently used chats not in use while more than `maxOpenChats` are joined. */
  #trim(keep?: string): void {
    if (this.#sessions.size <= this.#maxOpen) return;
    for (const chatId of [...this.#sessions.keys()]) {
      if (this.#sessions.size <= this.#maxOpen) break;
      if (chatId === keep || this.#pins.has(chatId)) continue;
      this.#leave(chatId);
    }
  }

  /** Ends `release` once the stream ends, fails or is cancelled. */
  #holding<T>(stream: ReadableStream<T>, release: () => void): ReadableStream<T> {
    const reader = stream.getReader();
    return new ReadableStream<T>({
      pull: async (controller) => {
        try {
          const { done, value } = await reader.read();
          if (done) {
            release();
            controller.close();
          } else {
            controller.enqueue(value);
          }
        } catch (error) {
          release();
          controller.error(error);
        }
      },
      cancel: async (reason) => {
        release();
        await reader.cancel(reason);
      },
    });
  }

  #watch(chatId: string, pending: Promise<SessionSubscription>): void {
    pending.then(
      () => {
        for (const resolve of this.#waiters.get(chatId) ?? []) resolve();
        this.#waiters.delete(chatId);
      },
      () => {
        if (this.#sessions.get(chatId) === pending) {
          this.#sessions.delete(chatId);
          this.#creating.delete(chatId);
        }
      },
    );
  }

  /** Resolves once this transport has joined the chat's session (e.g. after the first send). */
  whenOpen(chatId: string): Promise<SessionSubscription> {
    const pending = this.#sessions.get(chatId);
    if (pending) return pending.then(() => this.session(chatId), () => this.whenOpen(chatId));
    return new Promise<void>((resolve) => {
      const list = this.#waiters.get(chatId) ?? [];
      list.push(resolve);
      this.#waiters.set(chatId, list);
    }).then(() => this.session(chatId));
  }

  async #open(chatId: string, create: boolean): Promise<SessionSubscription> {
    // The subscription starts at the session's newest seq: the chat's history comes from
    // `loadChatMessages` (and `syncChat` catches up by REST), the join brings the reply
    // streaming now.
    let lastSeq: number;
    try {
      const session = await this.client.getSession(chatId);
      this.#users.set(chatId, session.user_id);
      lastSeq = session.last_seq;
    } catch (error) {
      if (!(error instanceof FleetLMError) || error.code !== "session_not_found" || !this.#options.agentId || !create) throw error;
      try {
        const session = await this.client.createSession({
          id: chatId,
          agentId: this.#options.agentId,
          metadata: this.#options.sessionMetadata,
        });
        this.#users.set(chatId, session.user_id);
      } catch (error) {
        // Created meanwhile by another tab: fine.
        if (!(error instanceof FleetLMError) || error.code !== "session_exists") throw error;
      }
      lastSeq = 0;
    }
    const subscription = await this.client.subscribe(chatId, { lastSeq });
    const off = subscription.on("message", (message) => this.#remember(chatId, message));
    try {
      await subscription.joined;
    } catch (error) {
      off();
      throw error;
    }
    return subscription;
  }

  /** The session's whole history (remembered for tool results and regenerate), and its user. */
  async history(chatId: string): Promise<{ messages: Message[]; userId: string } | null> {
    let userId = this.#users.get(chatId);
    if (!userId) {
      try {
        userId = (await this.client.getSession(chatId)).user_id;
      } catch (error) {
        if (error instanceof FleetLMError && error.code === "session_not_found") return null;
        throw error;
      }
      this.#users.set(chatId, userId);
    }
    const messages = await this.client.rest.getAllMessages(chatId);
    for (const message of messages) this.#remember(chatId, message);
    return { messages, userId };
  }

  #remember(chatId: string, message: Message): void {
    let known = this.#known.get(chatId);
    if (!known) this.#known.set(chatId, (known = new Map()));
    const content = message.content as Record<string, any>;
    const uiId = typeof content.id === "string" ? content.id : message.kind === "tool_result" ? content.message_id : message.id;
    if (typeof uiId !== "string") return;
    let entry = known.get(uiId);
    if (!entry) {
      entry = { fleetIds: [], toolParts: new Map() };
      known.set(uiId, entry);
    }
    if (message.kind !== "tool_result" && !entry.fleetIds.includes(message.id)) {
      entry.fleetIds.push(message.id);
      entry.seq = Math.min(entry.seq ?? message.seq, message.seq);
    }
    const parts = Array.isArray(content.parts) ? content.parts : [];
    for (const part of parts) {
      if (part && typeof part.toolCallId === "string") entry.toolParts.set(part.toolCallId, JSON.stringify(part));
    }
  }

  /** The FleetLM ids of the messages a UI message was built from (oldest first). */
  fleetIds(chatId: string, uiMessageId: string): string[] {
    return this.#known.get(chatId)?.get(uiMessageId)?.fleetIds ?? [];
  }

  /** The seq of the (first) stored message a UI message was built from, if it is stored. */
  seqOf(chatId: string, uiMessageId: string): number | undefined {
    return this.#known.get(chatId)?.get(uiMessageId)?.seq;
  }

  /** Whether the transport streamed the reply of this dispatch into a chat. */
  streamedDispatch(chatId: string, dispatchId: string): boolean {
    return this.#streamed.get(chatId)?.has(dispatchId) ?? false;
  }

  /** The dispatch the chat's own send is following now, if any (undefined before it starts). */
  inFlight(chatId: string): { dispatchId?: string } | undefined {
    return this.#inFlight.get(chatId);
  }

  #markStreamed(chatId: string, dispatchId: string): void {
    let set = this.#streamed.get(chatId);
    if (!set) this.#streamed.set(chatId, (set = new Set()));
    set.add(dispatchId);
  }

  async sendMessages(options: SendOptions<UI_MESSAGE>): Promise<ReadableStream<UIMessageChunk>> {
    // The chat is in use until its reply stream ends: its session is not left meanwhile.
    const release = this.retain(options.chatId);
    try {
      return this.#holding(await this.#send(options), release);
    } catch (error) {
      release();
      throw error;
    }
  }

  async #send(options: SendOptions<UI_MESSAGE>): Promise<ReadableStream<UIMessageChunk>> {
    const { chatId, messages, abortSignal, trigger } = options;
    const subscription = await this.session(chatId);
    abortSignal?.throwIfAborted();
    const exclude = new Set(subscription.knownDispatches);
    // A reply streaming when the session was (re)joined is not this send's, even if its
    // snapshot has not arrived yet.
    const streaming = subscription.lastJoin?.stream?.dispatch_id;
    if (streaming) exclude.add(streaming);
    const last = messages[messages.length - 1];
    let send: Parameters<SessionSubscription["send"]>[0];
    if (trigger === "regenerate-message") {
      // A reply still streaming would not be superseded (it is stored after the `regenerate`):
      // cancel it first; the cancel answers once its aborted message is stored.
      const active = subscription.activeReply();
      if (active && !active.done) await subscription.cancel({ dispatchId: active.dispatchId }).catch(() => {});
      const content: JsonObject = {};
      // `regenerate({ messageId })` names the reply to replace, or (a chat that holds only the
      // user's turn: the reply failed here, or is on another device) the user message to answer
      // again: that one is no reply to name, the server then replaces the turn's current reply.
      const ofUser = messages.some((m) => m.id === options.messageId && m.role === "user");
      const target = options.messageId && !ofUser ? this.fleetIds(chatId, options.messageId)[0] : undefined;
      if (target) content.message_id = target;
      send = { kind: "regenerate", content, clientId: randomId("regen-") };
    } else if (last?.role === "assistant") {
      // Tool outputs or approval responses added on this side (addToolOutput /
      // addToolApprovalResponse): a `tool_result` message with the changed parts.
      const stored = this.#known.get(chatId)?.get(last.id)?.toolParts;
      const parts = last.parts.filter((part: any) => {
        if (typeof part?.toolCallId !== "string" || !CLIENT_TOOL_STATES.has(part.state)) return false;
        return stored?.get(part.toolCallId) !== JSON.stringify(part);
      });
      if (parts.length === 0) throw new Error("nothing to send: the last message is the agent's and no tool part changed");
      const content = { message_id: last.id, parts } as unknown as JsonObject;
      send = { kind: "tool_result", content, clientId: clientId("tr-", hash(JSON.stringify(content))) };
    } else if (last?.role === "user") {
      // Attached files (data: and blob: URLs) are uploaded to the session first: the stored part
      // names the server's path, not the bytes (docs/CLIENTS.md, "Attachments").
      let parts: unknown[] = last.parts;
      if (this.#options.uploadFiles !== false) {
        parts = await uploadFileParts(this.client, chatId, last.parts, { signal: abortSignal ?? undefined, cache: this.#uploads });
        abortSignal?.throwIfAborted();
      }
      const content: JsonObject = { text: textOf(last), id: last.id, parts: parts as JsonObject[] };
      send = { kind: "text", content, clientId: clientId("", last.id) };
      if (last.metadata !== undefined && last.metadata !== null) send.metadata = last.metadata as JsonObject;
    } else {
      throw new Error("nothing to send: no user message");
    }
    // The request's `body` and `headers` (sendMessage(message, { body, headers })) go to the
    // agent in the stored message's metadata, under one key of their own; never as HTTP headers.
    const request = requestMetadata(options.body, options.headers);
    if (request) send.metadata = { ...(send.metadata ?? {}), [FLEETLM_REQUEST_KEY]: request };

    const flight: { dispatchId?: string } = {};
    this.#inFlight.set(chatId, flight);
    let sent = false;
    let aborted = false;
    const cancel = () => {
      if (this.#options.cancelOnAbort === false) return;
      subscription.cancel(flight.dispatchId ? { dispatchId: flight.dispatchId } : {}).catch(() => {
        // Best effort: the server may not know the turn any more (finished meanwhile).
      });
    };
    const onAbort = () => {
      aborted = true;
      if (sent) cancel();
    };
    abortSignal?.addEventListener("abort", onAbort, { once: true });
    const stream = subscription.replyStream({
      exclude,
      signal: abortSignal,
      onDispatch: (dispatchId) => {
        flight.dispatchId = dispatchId;
        this.#markStreamed(chatId, dispatchId);
      },
    });
    try {
      try {
        await subscription.send(send);
      } catch (error) {
        // An edited user message keeps its id (`sendMessage({ messageId })`): store the new text
        // under a client id naming its content.
        if (!(error instanceof FleetLMError) || error.code !== "client_id_conflict" || send.kind !== "text") throw error;
        await subscription.send({ ...send, clientId: clientId("", `${last.id}~${hash(JSON.stringify(send.content))}`) });
      }
    } catch (error) {
      abortSignal?.removeEventListener("abort", onAbort);
      if (this.#inFlight.get(chatId) === flight) this.#inFlight.delete(chatId);
      await stream.cancel().catch(() => {});
      throw error;
    }
    sent = true;
    if (aborted) cancel();
    return stream.pipeThrough(
      new TransformStream<FleetChunk, UIMessageChunk>({
        transform: (chunk, controller) => controller.enqueue(chunk as UIMessageChunk),
        flush: () => {
          abortSignal?.removeEventListener("abort", onAbort);
          if (this.#inFlight.get(chatId) === flight) this.#inFlight.delete(chatId);
        },
      }),
    );
  }

  async reconnectToStream(options: {
    chatId: string;
    abortSignal?: AbortSignal;
  }): Promise<ReadableStream<UIMessageChunk> | null> {
    const release = this.retain(options.chatId);
    try {
      const resumed = await this.#reconnect(options);
      if (!resumed) {
        release();
        return null;
      }
      let ended!: () => void;
      const done = new Promise<void>((resolve) => (ended = resolve));
      const stream = this.#holding(resumed.stream, () => {
        release();
        ended();
      });
      const reply: ResumedReply = { dispatchId: resumed.dispatchId, messageId: resumed.messageId, streamedBefore: resumed.streamedBefore, done };
      for (const listener of [...(this.#resumeListeners.get(options.chatId) ?? [])]) {
        try {
          listener(reply);
        } catch {
          // A listener's failure is not the chat's.
        }
      }
      return stream;
    } catch (error) {
      release();
      throw error;
    }
  }

  /**
   * Calls `listener` each time `reconnectToStream` hands the chat a reply (a resume after a
   * reload, or a reply another tab asked for that `syncChat` follows), before the chat reads
   * its first chunk. Returns the function that removes the listener. `syncChat` uses it to keep
   * the parts of a message that a resumed continuation (after a tool result) continues.
   */
  onResume(chatId: string, listener: (reply: ResumedReply) => void): () => void {
    let listeners = this.#resumeListeners.get(chatId);
    if (!listeners) this.#resumeListeners.set(chatId, (listeners = new Set()));
    listeners.add(listener);
    return () => {
      listeners.delete(listener);
      if (listeners.size === 0 && this.#resumeListeners.get(chatId) === listeners) this.#resumeListeners.delete(chatId);
    };
  }

  async #reconnect(options: {
    chatId: string;
    abortSignal?: AbortSignal;
  }): Promise<{ stream: ReadableStream<UIMessageChunk>; dispatchId: string; messageId?: string; streamedBefore: boolean } | null> {
    const { chatId, abortSignal } = options;
    // Counted at once (the AI SDK aborts the resume it replaces just before this call).
    const generation = (this.#resumes.get(chatId) ?? 0) + 1;
    this.#resumes.set(chatId, generation);
    let subscription: SessionSubscription;
    try {
      // Opening a chat page must not create its session: that happens on the first send.
      subscription = await this.session(chatId, { create: false });
    } catch (error) {
      if (error instanceof FleetLMError && error.code === "session_not_found") return null;
      throw error;
    }
    const join = subscription.lastJoin;
    let dispatchId = subscription.activeReply()?.dispatchId;
    if (!dispatchId && join && join.stream !== null) {
      // The join promised a snapshot (or, for an older server, may send one): wait for it.
      const expected = join.stream?.dispatch_id;
      dispatchId = await new Promise<string | undefined>((resolve) => {
        const timeout = setTimeout(() => done(undefined), join.stream ? (this.#options.snapshotTimeoutMs ?? 5000) : 300);
        const off = subscription.on("chunk", (event) => {
          if (expected === undefined || event.dispatchId === expected) done(event.dispatchId);
        });
        const done = (id: string | undefined) => {
          clearTimeout(timeout);
          off();
          abortSignal?.removeEventListener("abort", onAbort);
          resolve(id);
        };
        const onAbort = () => done(undefined);
        abortSignal?.addEventListener("abort", onAbort, { once: true });
      });
    }
    if (abortSignal?.aborted || !dispatchId) return null;
    const reply = subscription.replies.get(dispatchId);
    if (!reply || reply.done || reply.messageDone || reply.chunks[0]?.type !== "start") return null;
    const streamedBefore = this.streamedDispatch(chatId, dispatchId);
    this.#markStreamed(chatId, dispatchId);
    if (abortSignal && this.#options.cancelOnAbort !== false) {
      const target = dispatchId;
      const onAbort = () => {
        // `stop()` on a resumed reply cancels it on the server, like on a reply this chat asked
        // for. The AI SDK also aborts a resume it replaces with a newer one (it calls
        // reconnectToStream again at once): that one is not a stop.
        setTimeout(() => {
          if (this.#resumes.get(chatId) !== generation) return;
          if (subscription.replies.get(target)?.done !== false) return;
          subscription.cancel({ dispatchId: target }).catch(() => {});
        }, 0);
      };
      abortSignal.addEventListener("abort", onAbort, { once: true });
    }
    const messageId = (reply.chunks[0] as { messageId?: unknown }).messageId;
    return {
      stream: subscription.replyStream({ dispatchId, signal: abortSignal }) as ReadableStream<UIMessageChunk>,
      dispatchId,
      messageId: typeof messageId === "string" ? messageId : undefined,
      streamedBefore,
    };
  }

  /** The chat's history as UIMessage[] (see `loadChatMessages`). */
  async loadMessages(chatId: string): Promise<UI_MESSAGE[]> {
    const history = await this.history(chatId);
    if (!history) return [];
    return historyToUIMessages<UI_MESSAGE>(history.messages, { userId: history.userId, fileBaseUrl: this.client.url }).messages;
  }

  /** Cancels the chat's turn in flight on the server (what `stop()` does through the abort signal). */
  async cancel(chatId: string): Promise<{ cancelled: boolean; dispatch_id?: string }> {
    return (await this.session(chatId)).cancel();
  }

  /**
   * What `chat.dispose()` calls. One transport is usually shared by every chat of a page, so
   * this leaves only the sessions of chats not in use (no reply streaming, not held by `retain`,
   * `syncChat` or `useFleetLMChat`); when no chat is in use it also closes the socket (when the
   * transport created its client). The transport stays usable: a chat used again rejoins (on a
   * new socket if needed). `close({ force: true })` leaves every session and closes the socket
   * even while chats use them.
   */
  close(options: { force?: boolean } = {}): void {
    if (!options.force && this.#pins.size > 0) {
      for (const chatId of [...this.#sessions.keys()]) if (!this.#pins.has(chatId)) this.#leave(chatId);
      return;
    }
    for (const chatId of [...this.#sessions.keys()]) this.#leave(chatId);
    if (this.#ownsClient) this.client.close();
  }

  #leave(chatId: string): void {
    const pending = this.#sessions.get(chatId);
    this.#sessions.delete(chatId);
    this.#creating.delete(chatId);
    pending?.then((subscription) => subscription.leave(), () => {});
  }
}
