// A session watched over the Phoenix socket as its user: history (join replay plus REST pages),
// live messages, the reply streaming now, agent_status and typing; and the composer.
import type { Channel, Socket } from "phoenix";
import { useEffect, useMemo, useRef, useState } from "preact/hooks";
import { api, redact, type Message, type Mode, type Session } from "./api";
import { ErrorNote, LiveReplyView, MessageView } from "./components";
import { newClientId, openSocket } from "./live";
import { applyChunk, type LiveReply, type Part } from "./stream";

export interface RawChunk {
  n: number;
  at: number;
  dispatchId: string;
  chunk: unknown;
}

export interface AgentStatus {
  status: string;
  dispatch_id?: string;
  error?: string;
}

export interface SessionFeed {
  messages: Message[];
  live: LiveReply | null;
  status: AgentStatus | null;
  typing: boolean;
  chunks: RawChunk[];
  connected: boolean;
  error: string | null;
  send: (text: string) => Promise<void>;
  setTyping: (typing: boolean) => void;
  /** Loads up to 100 messages before the oldest shown (the join replays only the newest 100). */
  loadOlder: () => Promise<void>;
  /** Stops the agent's current turn; true when something was cancelled. */
  cancel: () => Promise<boolean>;
  /** Has the agent answer the latest turn again. */
  regenerate: () => Promise<void>;
  /** Approves or denies a tool call waiting for approval (`approval-requested`). */
  answerApproval: (message: Message, part: Part, approved: boolean) => Promise<void>;
}

const MAX_CHUNKS = 500;

export function useSessionFeed(mode: Mode, session: Session | null): SessionFeed {
  const [messages, setMessages] = useState<Map<number, Message>>(new Map());
  const [live, setLive] = useState<LiveReply | null>(null);
  const [status, setStatus] = useState<AgentStatus | null>(null);
  const [typing, setTypingState] = useState(false);
  const [chunks, setChunks] = useState<RawChunk[]>([]);
  const [connected, setConnected] = useState(false);
  const [error, setError] = useState<string | null>(null);
  const channelRef = useRef<Channel | null>(null);
  const chunkCount = useRef(0);
  const knownRef = useRef<Map<number, Message>>(new Map());

  useEffect(() => {
    if (!session) return;
    let socket: Socket | null = null;
    let closed = false;
    let lastSeq = Math.max(0, session.last_seq - 100);
    const known = new Map<number, Message>();
    knownRef.current = known;
    const add = (list: Message[]) => {
      for (const m of list) {
        known.set(m.seq, m);
        lastSeq = Math.max(lastSeq, m.seq);
      }
      setMessages(new Map(known));
    };
    setMessages(new Map());
    setLive(null);
    setStatus(null);
    setChunks([]);
    setError(null);
    // One channel instance joins once (phoenix.js refuses a second join), so a `resync` (the
    // server dropped this channel's live feed: its socket fell behind) leaves it and joins a new
    // one from the last seq shown; pushes of the old one are ignored from then on.
    const join = (socket: Socket) => {
      const channel = socket.channel(`session:${session.id}`, () => ({ last_seq: lastSeq }));
      channelRef.current = channel;
      const current = () => channelRef.current === channel && !closed;
      channel.on("message", (m: Message) => {
        if (!current()) return;
        add([m]);
        if (m.kind === "assistant" || m.sender_id === session.agent_id) {
          setLive((live) => (live && m.metadata?.dispatch_id === live.dispatchId ? null : live));
        }
      });
      channel.on("stream_snapshot", (p: any) => {
        if (!current()) return;
        setLive({ dispatchId: p.dispatch_id, parts: p.message?.parts ?? [] });
      });
      channel.on("stream_chunk", (p: any) => {
        if (!current()) return;
        chunkCount.current += 1;
        const entry: RawChunk = { n: chunkCount.current, at: Date.now(), dispatchId: p.dispatch_id, chunk: p.chunk };
        setChunks((list) => [...list.slice(-(MAX_CHUNKS - 1)), entry]);
        setLive((live) => {
          const base = live && live.dispatchId === p.dispatch_id ? live : { dispatchId: p.dispatch_id, parts: [] };
          if (p.chunk?.type === "start" && live && live.dispatchId === p.dispatch_id && live.parts.length > 0) {
            return { dispatchId: p.dispatch_id, parts: [] };
          }
          return applyChunk(base, p.chunk);
        });
      });
      channel.on("agent_status", (p: AgentStatus) => {
        if (!current()) return;
        setStatus({ ...p, error: p.error ? redact(p.error) : undefined });
        if (p.status === "idle" || p.status === "failed" || p.status === "cancelled") setLive(null);
      });
      channel.on("typing", (p: any) => {
        if (!current()) return;
        if (p.user_id !== session.user_id) setTypingState(Boolean(p.typing));
      });
      channel.on("resync", () => {
        if (!current()) return;
        channel.leave();
        join(socket);
      });
      channel
        .join()
        .receive("ok", async (reply: any) => {
          if (!current()) return;
          setError(null);
          add(reply.messages ?? []);
          let more = Boolean(reply.has_more);
          while (more && current()) {
            const page = await api<{ messages: Message[]; has_more?: boolean }>(
              "GET",
              `/api/sessions/${encodeURIComponent(session.id)}/messages?after_seq=${lastSeq}&limit=500`,
            );
            add(page.messages);
            more = Boolean(page.has_more) && page.messages.length > 0;
          }
        })
        .receive("error", (reply: any) => current() && setError(`Cannot watch this session: ${reply?.reason ?? "refused"}`));
    };
    (async () => {
      try {
        socket = await openSocket(mode, session.user_id);
      } catch (e: any) {
        setError(e?.message ?? "cannot open the socket");
        return;
      }
      if (closed) {
        socket.disconnect();
        return;
      }
      socket.onOpen(() => setConnected(true));
      socket.onClose(() => setConnected(false));
      join(socket);
    })();
    return () => {
      closed = true;
      channelRef.current = null;
      socket?.disconnect();
      setConnected(false);
    };
  }, [mode, session?.id]);

  const sorted = useMemo(() => [...messages.values()].sort((a, b) => a.seq - b.seq), [messages]);

  /** A push on the session's channel as its user; resolves with the ok reply. */
  const push = (event: string, payload: object) =>
    new Promise<any>((resolve, reject) => {
      const channel = channelRef.current;
      if (!channel) return reject(new Error("not connected"));
      channel
        .push(event, payload)
        .receive("ok", (reply: any) => resolve(reply))
        .receive("error", (r: any) => reject(new Error(redact(r?.details ?? r?.error ?? "refused"))))
        .receive("timeout", () => reject(new Error("no answer from the server")));
    });

  const send = (text: string) =>
    push("send", { content: { kind: "text", content: { text } }, client_id: newClientId() }).then(() => undefined);

  // The socket's `cancel` answers once the cancel took effect (the aborted reply is stored).
  const cancel = () => push("cancel", {}).then((reply) => Boolean(reply?.cancelled));

  const regenerate = () => push("regenerate", { client_id: newClientId() }).then(() => undefined);

  // An approval is answered with a `tool_result` holding the tool part in its new state.
  const answerApproval = (message: Message, part: Part, approved: boolean) =>
    push("send", {
      content: {
        kind: "tool_result",
        content: {
          message_id: message.content?.id,
          parts: [{ ...part, state: "approval-responded", approval: { id: part.approval?.id, approved } }],
        },
      },
      client_id: newClientId(),
    }).then(() => undefined);

  // Typing is sent when it changes, not on every keystroke.
  const typingSent = useRef(false);
  const setTyping = (value: boolean) => {
    if (typingSent.current === value) return;
    typingSent.current = value;
    channelRef.current?.push("typing", { typing: value });
  };

  const loadOlder = async () => {
    if (!session || sorted.length === 0) return;
    const first = sorted[0].seq;
    const from = Math.max(0, first - 1 - 100);
    const page = await api<{ messages: Message[] }>(
      "GET",
      `/api/sessions/${encodeURIComponent(session.id)}/messages?after_seq=${from}&limit=${first - 1 - from}`,
    );
    for (const m of page.messages) knownRef.current.set(m.seq, m);
    setMessages(new Map(knownRef.current));
  };

  return {
    messages: sorted,
    live,
    status,
    typing,
    chunks,
    connected,
    error,
    send,
    setTyping,
    loadOlder,
    cancel,
    regenerate,
    answerApproval,
  };
}

const BUSY = ["queued", "dispatching", "streaming"];

/** Agent messages a later `regenerate` replaced (docs/API.md, "Regenerate"): those after the
 * latest user message of another kind before it. */
export function supersededSeqs(messages: Message[], session: Session): Set<number> {
  const out = new Set<number>();
  let turnStart = 0;
  let pending: number[] = [];
  for (const m of messages) {
    if (m.sender_id === session.user_id) {
      if (m.kind === "regenerate") {
        for (const seq of pending) out.add(seq);
      } else {
        turnStart = m.seq;
      }
      pending = [];
    } else if (m.sender_id === session.agent_id && m.seq > turnStart) {
      pending.push(m.seq);
    }
  }
  return out;
}

/** Tool calls a `tool_result` of the user already answered. */
function answeredToolCalls(messages: Message[]): Set<string> {
  const out = new Set<string>();
  for (const m of messages) {
    if (m.kind !== "tool_result" || !Array.isArray(m.content?.parts)) continue;
    for (const p of m.content.parts) if (typeof p?.toolCallId === "string") out.add(p.toolCallId);
  }
  return out;
}

export function ChatView({ feed, session, canSend }: { feed: SessionFeed; session: Session; canSend: boolean }) {
  const [draft, setDraft] = useState("");
  const [sendError, setSendError] = useState<string | null>(null);
  const [sending, setSending] = useState(false);
  const [acting, setActing] = useState(false);
  const typingTimer = useRef<number | undefined>(undefined);
  const listRef = useRef<HTMLOListElement>(null);

  useEffect(() => {
    const list = listRef.current;
    if (list) list.scrollTop = list.scrollHeight;
  }, [feed.messages[feed.messages.length - 1]?.seq, feed.live]);

  const submit = async (e: Event) => {
    e.preventDefault();
    const text = draft.trim();
    if (!text) return;
    setSending(true);
    setSendError(null);
    try {
      await feed.send(text);
      setDraft("");
      feed.setTyping(false);
    } catch (err: any) {
      setSendError(err?.message ?? "could not send");
    } finally {
      setSending(false);
    }
  };

  const onInput = (value: string) => {
    setDraft(value);
    feed.setTyping(true);
    window.clearTimeout(typingTimer.current);
    typingTimer.current = window.setTimeout(() => feed.setTyping(false), 2000);
  };

  const act = async (what: () => Promise<unknown>) => {
    setActing(true);
    setSendError(null);
    try {
      await what();
    } catch (err: any) {
      setSendError(err?.message ?? "refused");
    } finally {
      setActing(false);
    }
  };

  const status = feed.status;
  const busy = feed.live !== null || (status !== null && BUSY.includes(status.status));
  const superseded = useMemo(() => supersededSeqs(feed.messages, session), [feed.messages, session]);
  const answered = useMemo(() => answeredToolCalls(feed.messages), [feed.messages]);
  const hasReply = feed.messages.some((m) => m.sender_id === session.agent_id);
  const active = canSend && session.status === "active";
  return (
    <div class="chat">
      <div class="chat-status" role="status" aria-live="polite">
        <span class={feed.connected ? "dot ok" : "dot"} aria-hidden="true" />
        {feed.connected ? "Live" : "Connecting…"}
        {status && (
          <span class={`badge status-${status.status}`} data-testid="agent-status">
            agent: {status.status}
          </span>
        )}
        {feed.typing && <span class="muted">{session.agent_id} is typing…</span>}
        {status?.error && <span class="error">{status.error}</span>}
      </div>
      <ErrorNote error={feed.error} />
      {feed.messages.length > 0 && feed.messages[0].seq > 1 && (
        <button type="button" class="secondary small older" onClick={() => feed.loadOlder().catch((e) => setSendError(e.message))}>
          Show earlier messages
        </button>
      )}
      <ol class="messages" ref={listRef} aria-label="Messages">
        {feed.messages.length === 0 && !feed.live && <li class="muted empty">No messages yet.</li>}
        {feed.messages.map((m) => (
          <MessageView
            key={m.seq}
            message={m}
            userId={session.user_id}
            superseded={superseded.has(m.seq)}
            answered={answered}
            onApproval={active ? (message, part, approved) => act(() => feed.answerApproval(message, part, approved)) : undefined}
          />
        ))}
        {feed.live && <LiveReplyView reply={feed.live} agentId={session.agent_id} />}
      </ol>
      {active && (busy || hasReply) && (
        <div class="turn-actions">
          {busy ? (
            <button type="button" class="secondary small" disabled={acting} onClick={() => act(feed.cancel)}>
              Stop
            </button>
          ) : (
            <button type="button" class="secondary small" disabled={acting} onClick={() => act(feed.regenerate)}>
              Regenerate
            </button>
          )}
        </div>
      )}
      {active && (
        <form class="composer" onSubmit={submit}>
          <label for="composer-text" class="visually-hidden">
            Message as {session.user_id}
          </label>
          <input
            id="composer-text"
            name="message"
            autocomplete="off"
            placeholder={`Message as ${session.user_id}`}
            value={draft}
            onInput={(e) => onInput((e.currentTarget as HTMLInputElement).value)}
          />
          <button type="submit" disabled={sending || !draft.trim()}>
            Send
          </button>
        </form>
      )}
      <ErrorNote error={sendError} />
    </div>
  );
}
