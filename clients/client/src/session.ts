// A subscription to `session:<id>`: every message exactly once in seq order across reconnects
// and `resync`s, the agent's streamed replies (gap-free by chunk index), agent status and typing.
import type { Channel, Socket } from "phoenix";
import { retryDelayMs, sleep } from "./backoff.js";
import { endsMessage, messageToChunks } from "./chunks.js";
import { FleetLMError, type RestClient } from "./rest.js";
import type {
  AgentStatus,
  CancelResult,
  JoinInfo,
  JoinStream,
  JsonObject,
  Message,
  NewMessage,
  SendResult,
  StreamChunkEvent,
  UIMessageChunk,
  UIMessageLike,
} from "./types.js";

/** A reply the subscription has seen streaming (the current UI message of one dispatch). */
export interface LiveReply {
  dispatchId: string;
  agentId: string;
  /** The chunks of the current message from its `start` chunk on. */
  chunks: UIMessageChunk[];
  /** The index of `chunks[0]`. */
  firstIndex: number;
  /** The index the next chunk will carry. */
  nextIndex: number;
  /** The current message has ended (`finish` or `abort`). */
  messageDone: boolean;
  /** The dispatch has ended (status idle, failed or cancelled). */
  done: boolean;
}

export interface SessionEvents {
  message: (message: Message) => void;
  chunk: (event: StreamChunkEvent) => void;
  status: (status: AgentStatus) => void;
  typing: (event: { user_id: string; typing: boolean }) => void;
  join: (info: JoinInfo) => void;
  error: (error: FleetLMError) => void;
}

type Listeners = { [K in keyof SessionEvents]: Set<SessionEvents[K]> };

export interface SubscribeOptions {
  /** Deliver messages after this seq (default 0: the whole history). */
  lastSeq?: number;
  /** Push timeout in ms (default 10 000). */
  timeoutMs?: number;
}

/** Options of `replyStream`. */
export interface ReplyStreamOptions {
  /** Follow this dispatch. */
  dispatchId?: string;
  /** Without `dispatchId`: follow the first dispatch that is not in this set. */
  exclude?: ReadonlySet<string>;
  /** Stop waiting and close the stream. */
  signal?: AbortSignal;
  /** Called once the stream knows which dispatch it follows. */
  onDispatch?: (dispatchId: string) => void;
}

const ENDED = new Set(["idle", "failed", "cancelled"]);
/** How many ended dispatches' stored messages a subscription keeps for `replyStream`. */
const STORED_REPLIES_KEPT = 32;
/** Tries of a `send` that timed out, lost its connection, or was answered `overloaded` / `no_leader`. */
const SEND_ATTEMPTS = 3;
/** Error codes that mean "try again later" (with `retry_after_ms`). */
const RETRY_LATER = new Set(["overloaded", "no_leader"]);

export class SessionSubscription {
  readonly sessionId: string;
  readonly topic: string;
  /** The highest seq delivered to `message` listeners. */
  lastSeq: number;
  /** Replies streaming now (or finished but not yet reported idle), by dispatch id. */
  readonly replies = new Map<string, LiveReply>();
  /** Dispatches this subscription has seen (any event carrying their id). */
  readonly knownDispatches = new Set<string>();
  /** The last agent status pushed. */
  agentStatus: AgentStatus | null = null;

  readonly #socket: Socket;
  readonly #rest: RestClient;
  readonly #timeoutMs: number;
  readonly #listeners: Listeners = {
    message: new Set(),
    chunk: new Set(),
    status: new Set(),
    typing: new Set(),
    join: new Set(),
    error: new Set(),
  };
  #channel: Channel | null = null;
  #joins = 0;
  /** Live messages wait here while a join's replay is completed by REST. */
  #catchingUp = false;
  #buffered: Message[] = [];
  /** The seq the REST catch-up must reach (0: none pending). */
  #catchUpTarget = 0;
  #catchUpRunning = false;
  /** Ends the catch-up's wait before a retry (a new join may have made it moot, or a leave). */
  #wakeCatchUp: (() => void) | null = null;
  /** The newest join answered but not yet reported (its catch-up is running). */
  #pendingJoin: { stream: JoinStream | null | undefined; rejoin: boolean } | null = null;
  /** Dispatches that ended (their status came, or a join said they no longer stream). */
  readonly #ended = new Set<string>();
  /** The newest stored message of recently ended dispatches, to play back (bounded). */
  readonly #storedReplies = new Map<string, Message>();
  #closed = false;
  #joined: Promise<JoinInfo>;
  #resolveJoined!: (info: JoinInfo) => void;
  #rejectJoined!: (error: Error) => void;
  #firstJoinDone = false;
  #lastJoin: JoinInfo | null = null;
  #onLeave: () => void;

  constructor(socket: Socket, rest: RestClient, sessionId: string, options: SubscribeOptions, onLeave: () => void) {
    this.#socket = socket;
    this.#rest = rest;
    this.sessionId = sessionId;
    this.topic = `session:${sessionId}`;
    this.lastSeq = options.lastSeq ?? 0;
    this.#timeoutMs = options.timeoutMs ?? 10_000;
    this.#onLeave = onLeave;
    this.#joined = new Promise((resolve, reject) => {
      this.#resolveJoined = resolve;
      this.#rejectJoined = reject;
    });
    this.#joined.catch(() => {});
    this.#join(false);
  }

  /** Resolves with the first join's result; rejects if the server refuses the join. */
  get joined(): Promise<JoinInfo> {
    return this.#joined;
  }

  /** The latest join's result (after a rejoin, that one). */
  get lastJoin(): JoinInfo | null {
    return this.#lastJoin;
  }

  get closed(): boolean {
    return this.#closed;
  }

  /** Adds a listener; returns a function that removes it. */
  on<K extends keyof SessionEvents>(event: K, listener: SessionEvents[K]): () => void {
    (this.#listeners[event] as Set<SessionEvents[K]>).add(listener);
    return () => {
      (this.#listeners[event] as Set<SessionEvents[K]>).delete(listener);
    };
  }

  #emit<K extends keyof SessionEvents>(event: K, ...args: Parameters<SessionEvents[K]>): void {
    for (const listener of [...this.#listeners[event]]) {
      try {
        (listener as (...a: unknown[]) => void)(...args);
      } catch (error) {
        queueMicrotask(() => {
          throw error;
        });
      }
    }
  }

  #join(rejoin: boolean): void {
    const channel = this.#socket.channel(this.topic, () => ({ last_seq: this.lastSeq }));
    this.#channel = channel;
    channel.on("message", (message: Message) => this.#onMessage(message));
    channel.on("stream_chunk", (payload: any) => this.#onChunk(payload));
    channel.on("stream_snapshot", (payload: any) => this.#onSnapshot(payload));
    channel.on("agent_status", (payload: AgentStatus) => this.#onStatus(payload));
    channel.on("typing", (payload: { user_id: string; typing: boolean }) => this.#emit("typing", payload));
    channel.on("resync", (payload: { last_seq: number }) => this.#resync(payload?.last_seq));
    let first = !rejoin;
    channel
      .join(this.#timeoutMs)
      .receive("ok", (reply: any) => {
        // Phoenix calls this again for every automatic rejoin after a reconnect.
        const isRejoin = !first;
        first = false;
        this.#onJoined(reply, isRejoin);
      })
      .receive("error", (reply: any) => {
        const reason = typeof reply?.reason === "string" ? reply.reason : "join refused";
        const error = new FleetLMError(`joining ${this.topic} was refused: ${reason}`, reason.replace(/ /g, "_"));
        if (!this.#firstJoinDone) {
          this.#firstJoinDone = true;
          this.#rejectJoined(error);
          this.leave();
        }
        this.#emit("error", error);
      });
  }

  /**
   * A join (first, rejoin after a reconnect, or after `resync`) was answered. Its replay is
   * delivered at once (it starts right after the seq the join asked from); if the server cut it
   * (`has_more`), the rest comes by REST in the one catch-up loop, which a later join only
   * extends. The join is reported (`join`, `joined`) once everything up to its `last_seq` is
   * delivered.
   */
  #onJoined(reply: any, rejoin: boolean): void {
    if (this.#closed) return;
    const stream: JoinStream | null | undefined = reply && "stream" in reply ? (reply.stream ?? null) : undefined;
    // The server says what streams now: any other reply this subscription still follows ended
    // while it was not joined (its `agent_status` was missed). Done before anything of this
    // membership is applied, so only replies seen before the join are ended.
    if (stream !== undefined) this.#endRepliesExcept(stream?.dispatch_id);
    for (const message of (reply?.messages ?? []) as Message[]) this.#deliver(message);
    if (reply?.has_more) this.#catchUpTarget = Math.max(this.#catchUpTarget, Number(reply.last_seq ?? 0));
    const pending = this.#pendingJoin;
    this.#pendingJoin = { stream, rejoin: rejoin || pending?.rejoin === true };
    this.#catchingUp = true;
    this.#wakeCatchUp?.();
    void this.#catchUp();
  }

  /** Pages by REST until `#catchUpTarget` is delivered, retrying failures; then reports the join. */
  async #catchUp(): Promise<void> {
    if (this.#catchUpRunning) return;
    this.#catchUpRunning = true;
    try {
      let failures = 0;
      while (!this.#closed && this.lastSeq < this.#catchUpTarget) {
        const target = this.#catchUpTarget;
        let page: { messages: Message[]; has_more: boolean };
        try {
          page = await this.#rest.getMessages(this.sessionId, { afterSeq: this.lastSeq, limit: 1000 });
        } catch (error) {
          if (this.#closed) return;
          failures += 1;
          const failure = error instanceof FleetLMError ? error : new FleetLMError(String(error), "network");
          this.#emit("error", failure);
          await new Promise<void>((resolve) => {
            const timer = setTimeout(resolve, retryDelayMs(failure, failures));
            this.#wakeCatchUp = () => {
              clearTimeout(timer);
              resolve();
            };
          });
          this.#wakeCatchUp = null;
          continue;
        }
        failures = 0;
        for (const message of page.messages) this.#deliver(message);
        // Read to the end (what is left below the target is a gap of the log), unless a newer
        // join raised the target while the page was read.
        const exhausted = !page.has_more || page.messages.length === 0;
        if (exhausted && this.#catchUpTarget === target) break;
      }
    } finally {
      this.#catchUpRunning = false;
    }
    if (this.#closed) return;
    this.#catchUpTarget = 0;
    this.#catchingUp = false;
    const buffered = this.#buffered.sort((a, b) => a.seq - b.seq);
    this.#buffered = [];
    for (const message of buffered) this.#deliver(message);
    const join = this.#pendingJoin;
    this.#pendingJoin = null;
    if (!join) return;
    this.#joins += 1;
    const info: JoinInfo = { sessionId: this.sessionId, lastSeq: this.lastSeq, stream: join.stream, rejoin: join.rejoin || this.#joins > 1 };
    this.#lastJoin = info;
    if (!this.#firstJoinDone) {
      this.#firstJoinDone = true;
      this.#resolveJoined(info);
    }
    this.#emit("join", info);
  }

  /** Ends the replies followed here other than `streaming` (they ended while not joined). */
  #endRepliesExcept(streaming: string | undefined): void {
    for (const [dispatchId, reply] of this.replies) {
      if (dispatchId === streaming) continue;
      reply.done = true;
      reply.messageDone = true;
      this.replies.delete(dispatchId);
      this.#ended.add(dispatchId);
    }
  }

  #onMessage(message: Message): void {
    if (this.#catchingUp) {
      this.#buffered.push(message);
      return;
    }
    this.#deliver(message);
  }

  #deliver(message: Message): void {
    if (typeof message?.seq !== "number" || message.seq <= this.lastSeq) return;
    this.lastSeq = message.seq;
    const dispatchId = message.kind === "assistant" ? (message.metadata?.dispatch_id as string | undefined) : undefined;
    if (dispatchId) {
      this.knownDispatches.add(dispatchId);
      this.#storedReplies.delete(dispatchId);
      this.#storedReplies.set(dispatchId, message);
      if (this.#storedReplies.size > STORED_REPLIES_KEPT) this.#storedReplies.delete(this.#storedReplies.keys().next().value!);
    }
    this.#emit("message", message);
  }

  #reply(dispatchId: string, agentId: string): LiveReply {
    let reply = this.replies.get(dispatchId);
    if (!reply) {
      reply = { dispatchId, agentId, chunks: [], firstIndex: 0, nextIndex: 0, messageDone: false, done: false };
      this.replies.set(dispatchId, reply);
      this.knownDispatches.add(dispatchId);
    }
    return reply;
  }

  /** Applies one chunk of a dispatch if it is new; returns whether it was. */
  #applyChunk(reply: LiveReply, chunk: UIMessageChunk, index: number | undefined): boolean {
    const at = typeof index === "number" ? index : reply.nextIndex;
    if (at < reply.nextIndex) return false;
    if (chunk?.type === "start" || reply.messageDone || reply.chunks.length === 0) {
      reply.chunks = [];
      reply.firstIndex = at;
      reply.messageDone = false;
    }
    reply.chunks.push(chunk);
    reply.nextIndex = at + 1;
    if (endsMessage(chunk)) reply.messageDone = true;
    this.#emit("chunk", { dispatchId: reply.dispatchId, agentId: reply.agentId, chunk, index: at });
    return true;
  }

  #onChunk(payload: any): void {
    const dispatchId = payload?.dispatch_id;
    if (typeof dispatchId !== "string" || typeof payload?.chunk?.type !== "string") return;
    this.#applyChunk(this.#reply(dispatchId, payload.agent_id), payload.chunk, payload.index);
  }

  #onSnapshot(payload: any): void {
    const dispatchId = payload?.dispatch_id;
    if (typeof dispatchId !== "string") return;
    if (Array.isArray(payload.chunks) && typeof payload.next_index === "number") {
      const reply = this.#reply(dispatchId, payload.agent_id);
      reply.done = false;
      const first = payload.next_index - payload.chunks.length;
      if (reply.nextIndex < first) {
        // What this subscription missed of earlier messages of the dispatch is in the log.
        reply.nextIndex = first;
        reply.messageDone = true;
      }
      payload.chunks.forEach((chunk: UIMessageChunk, i: number) => this.#applyChunk(reply, chunk, first + i));
    }
    // A server older than chunk indexes sends only the message so far: its chunks cannot be
    // continued (the live deltas name part ids the message does not keep), so such a reply is
    // not followed; its stored message arrives as a `message`.
  }

  #onStatus(status: AgentStatus): void {
    this.agentStatus = status;
    if (status.dispatch_id) {
      this.knownDispatches.add(status.dispatch_id);
      if (ENDED.has(status.status)) {
        const reply = this.replies.get(status.dispatch_id);
        if (reply) reply.done = true;
        this.#ended.add(status.dispatch_id);
      }
    }
    this.#emit("status", status);
    if (status.dispatch_id && ENDED.has(status.status)) this.replies.delete(status.dispatch_id);
  }

  #resync(lastSeq: unknown): void {
    if (this.#closed) return;
    // The server stopped delivering live to this channel (the socket fell behind, or the join's
    // replay was cut at 100 and the rest came by REST): rejoin from the last seq delivered here,
    // which is never below the server's `last_seq` (everything up to it was delivered once).
    void lastSeq;
    const old = this.#channel;
    old?.leave();
    this.#join(true);
  }

  /** The reply currently streaming (the newest dispatch not yet ended), if any. */
  activeReply(): LiveReply | undefined {
    let found: LiveReply | undefined;
    for (const reply of this.replies.values()) if (!reply.done) found = reply;
    return found;
  }

  /**
   * Pushes `event` and waits for its reply. With `failIfLost`, a push that had gone out on a
   * connection that then closed fails with `connection_lost` as soon as the channel has rejoined
   * (its reply can never come) instead of waiting for its timeout.
   */
  #push<T>(event: string, payload: JsonObject, options: { failIfLost?: boolean } = {}): Promise<T> {
    const channel = this.#channel;
    if (!channel || this.#closed) return Promise.reject(new FleetLMError("the subscription was left", "closed"));
    return new Promise((resolve, reject) => {
      const cleanups: Array<() => void> = [];
      const settle = <V>(fn: (value: V) => void) => (value: V) => {
        for (const cleanup of cleanups.splice(0)) cleanup();
        fn(value);
      };
      const push = channel
        .push(event, payload, this.#timeoutMs)
        .receive("ok", settle(resolve))
        .receive("error", (reply: any) => {
          const code = reply?.error ?? reply?.reason ?? "error";
          const text = reply?.details ?? reply?.reason ?? String(code);
          settle(reject)(new FleetLMError(text, String(code).replace(/ /g, "_"), 0, reply));
        })
        .receive("timeout", () => settle(reject)(new FleetLMError(`${event} got no reply in ${this.#timeoutMs} ms`, "timeout")));
      if (!options.failIfLost) return;
      // A push phoenix holds while the channel is not joined is sent when it rejoins (`sent`
      // still false at the close); one already written to the closed connection is lost.
      let lost = false;
      const closeRef = this.#socket.onClose(() => {
        if ((push as unknown as { sent?: boolean }).sent) lost = true;
      });
      cleanups.push(
        () => this.#socket.off([closeRef]),
        this.on("join", (info) => {
          if (lost && info.rejoin) settle(reject)(new FleetLMError(`${event} was in flight when the connection was lost`, "connection_lost"));
        }),
      );
    });
  }

  /**
   * Appends a message as this socket's identity; resolves once it is on disk. A send that timed
   * out, whose connection was lost before the reply (sent again once the channel rejoined), or
   * that was answered `overloaded` / `no_leader` (then after at least its `retry_after_ms`) is
   * tried again with the same `client_id`, up to 3 tries in all (give a `clientId` to make that
   * safe across your own retries; one is generated otherwise).
   */
  async send(message: NewMessage): Promise<SendResult> {
    const payload: JsonObject = {
      content: { kind: message.kind ?? "text", content: message.content, metadata: message.metadata ?? {} },
      client_id: message.clientId ?? randomId("c-"),
    };
    if (message.expectedSeq !== undefined) payload.expected_seq = message.expectedSeq;
    for (let attempt = 1; ; attempt++) {
      try {
        return await this.#push<SendResult>("send", payload, { failIfLost: true });
      } catch (error) {
        if (!(error instanceof FleetLMError) || attempt >= SEND_ATTEMPTS || this.#closed) throw error;
        if (RETRY_LATER.has(error.code)) {
          // Not stored (overloaded), or the outcome is unknown (no_leader): the same client_id
          // makes the retry safe; wait at least as long as the server asked.
          await sleep(retryDelayMs(error, attempt));
        } else if (error.code !== "timeout" && error.code !== "connection_lost") {
          throw error;
        }
      }
    }
  }

  /** Tells the other members that this user is (not) typing. */
  async typing(typing: boolean): Promise<void> {
    await this.#push("typing", { typing });
  }

  /** Cancels the turn in flight (or only `dispatchId`): the agent's request is aborted. */
  cancel(options: { dispatchId?: string } = {}): Promise<CancelResult> {
    return this.#push("cancel", options.dispatchId === undefined ? {} : { dispatch_id: options.dispatchId });
  }

  /** Asks the agent again for the latest turn (`messageId`: the FleetLM id of the reply to replace). */
  regenerate(options: { messageId?: string } = {}): Promise<SendResult> {
    return this.#push("regenerate", options.messageId === undefined ? {} : { message_id: options.messageId });
  }

  /**
   * The chunks of one reply as a stream of AI SDK UI message chunks, from the `start` chunk of
   * its current message on, ending after that message's `finish` or `abort` chunk. A reply that
   * fails before it finishes ends with an `error` chunk; a cancelled one with `abort`; a reply that
   * was stored without streaming (a plain JSON answer) is played back from the stored message.
   */
  replyStream(options: ReplyStreamOptions = {}): ReadableStream<UIMessageChunk> {
    const cleanups: Array<() => void> = [];
    let target: string | undefined = options.dispatchId;
    let emitted = -1; // the highest index enqueued
    let sentAny = false;
    let closed = false;
    let reconnected = false;
    let controller!: ReadableStreamDefaultController<UIMessageChunk>;
    const cleanup = () => {
      for (const fn of cleanups.splice(0)) fn();
    };
    const close = () => {
      if (closed) return;
      closed = true;
      cleanup();
      try {
        controller.close();
      } catch {
        // already closed or cancelled
      }
    };
    const enqueue = (chunk: UIMessageChunk) => {
      if (closed) return;
      sentAny = true;
      controller.enqueue(chunk);
      if (endsMessage(chunk)) close();
    };
    const select = (dispatchId: string) => {
      target = dispatchId;
      options.onDispatch?.(dispatchId);
      const reply = this.replies.get(dispatchId);
      if (reply && !reply.messageDone) {
        for (let i = 0; i < reply.chunks.length && !closed; i++) {
          emitted = reply.firstIndex + i;
          enqueue(reply.chunks[i]);
        }
      } else if (reply) {
        emitted = reply.nextIndex - 1;
      }
    };
    const candidate = (dispatchId: string | undefined): boolean => {
      if (target !== undefined || !dispatchId) return target !== undefined && target === dispatchId;
      if (options.exclude?.has(dispatchId)) return false;
      select(dispatchId);
      return true;
    };
    return new ReadableStream<UIMessageChunk>({
      start: (c) => {
        controller = c;
        if (this.#closed) {
          close();
          return;
        }
        cleanups.push(
          this.on("chunk", (event) => {
            if (!candidate(event.dispatchId) || event.index <= emitted) return;
            emitted = event.index;
            enqueue(event.chunk);
          }),
          this.on("status", (status) => {
            if (!status.dispatch_id || !ENDED.has(status.status) || !candidate(status.dispatch_id)) return;
            if (status.status === "failed") {
              enqueue({ type: "error", errorText: status.error ?? "the agent failed" });
              close();
            } else if (status.status === "cancelled") {
              if (sentAny) enqueue({ type: "abort" });
              close();
            } else {
              // idle: the reply's messages are stored; a message ended without `finish` (an
              // agent body that just stopped) ends here.
              setTimeout(close, 50);
            }
          }),
          this.on("message", (message) => {
            const dispatchId = message.kind === "assistant" ? (message.metadata?.dispatch_id as string | undefined) : undefined;
            if (!candidate(dispatchId)) return;
            if (!sentAny) {
              // Not streamed (a plain JSON answer), or streamed entirely while this socket was
              // reconnecting: play the stored message back.
              for (const chunk of messageToChunks(message.content as unknown as UIMessageLike)) enqueue(chunk);
            } else if (reconnected) {
              // The message ended while this socket was down (its end came in the rejoin's
              // replay, not as chunks): end it here too; the stored message is the whole one.
              enqueue({ type: message.metadata?.termination === "abort" ? "abort" : "finish" });
            }
          }),
          this.on("join", (info) => {
            if (!info.rejoin || closed) return;
            reconnected = true;
            // A server that says what streams (`stream`): if it is not this reply any more, the
            // reply ended while the socket was down. Its stored message (if any) came in the
            // replay just before this; without one, the dispatch failed or was cancelled.
            if (target === undefined || info.stream === undefined || info.stream?.dispatch_id === target) return;
            if (sentAny) enqueue({ type: "finish" });
            else enqueue({ type: "error", errorText: "the reply ended while the connection was down" });
            close();
          }),
        );
        if (options.signal) {
          const onAbort = () => close();
          if (options.signal.aborted) {
            close();
            return;
          }
          options.signal.addEventListener("abort", onAbort, { once: true });
          cleanups.push(() => options.signal?.removeEventListener("abort", onAbort));
        }
        if (target !== undefined && !this.replies.has(target) && this.#ended.has(target)) {
          // Ended before this stream was asked for (e.g. while the connection was down): its
          // stored message, if this subscription saw it, played back; nothing more will come.
          const stored = this.#storedReplies.get(target);
          options.onDispatch?.(target);
          if (stored) for (const chunk of messageToChunks(stored.content as unknown as UIMessageLike)) enqueue(chunk);
          close();
        } else if (target !== undefined) {
          select(target);
        } else {
          const active = this.activeReply();
          if (active) candidate(active.dispatchId);
        }
      },
      cancel: () => {
        closed = true;
        cleanup();
      },
    });
  }

  /** Leaves the topic; the subscription delivers nothing more. */
  leave(): void {
    if (this.#closed) return;
    this.#closed = true;
    this.#wakeCatchUp?.();
    this.#channel?.leave();
    this.#channel = null;
    if (!this.#firstJoinDone) {
      this.#firstJoinDone = true;
      this.#rejectJoined(new FleetLMError("the subscription was left before it joined", "closed"));
    }
    this.#onLeave();
  }
}

export function randomId(prefix = ""): string {
  const bytes = new Uint8Array(12);
  globalThis.crypto.getRandomValues(bytes);
  return prefix + Array.from(bytes, (b) => b.toString(16).padStart(2, "0")).join("");
}
