// Keeping an AI SDK chat in sync with its FleetLM session: messages written elsewhere (another
// tab, another device, the agent writing by REST) appear, replies started elsewhere stream in.
import type { Message, SessionSubscription } from "@fleetlm/client";
import type { AbstractChat, UIMessage } from "ai";
import { historyToUIMessages, joinSegments } from "./messages.js";
import type { FleetLMChatTransport } from "./transport.js";

export interface ChatSyncOptions {
  /** Stream replies that another tab or device started (default true). */
  followRemoteStreams?: boolean;
}

export interface ChatSync {
  /** Resolves once the session is joined and caught up. */
  ready: Promise<void>;
  /** Stops syncing (the transport's subscription stays for the chat's own use). */
  stop(): void;
}

const IDLE = new Set(["ready", "error"]);

/** How far a tool part's state is in its life (a later stage holds what an earlier one did). */
const TOOL_STAGE: Record<string, number> = {
  "input-streaming": 0,
  "input-available": 1,
  "approval-requested": 2,
  "approval-responded": 3,
  "output-available": 4,
  "output-error": 4,
  "output-denied": 4,
};

/**
 * Keeps `chat` (any `AbstractChat`: `useChat`'s `Chat`, or your own subclass) in sync with the
 * session `chat.id` through `transport`. Changes are applied while the chat is idle (status
 * `ready` or `error`), so they never race its own request: while it streams they wait.
 */
export function syncChat<UI_MESSAGE extends UIMessage>(
  chat: AbstractChat<UI_MESSAGE>,
  transport: FleetLMChatTransport<UI_MESSAGE>,
  options: ChatSyncOptions = {},
): ChatSync {
  const chatId = chat.id;
  // While synced, the chat's session stays joined (the transport leaves only chats not in use).
  const offs: Array<() => void> = [transport.retain(chatId)];
  const pending: Message[] = [];
  let stopped = false;
  let timer: ReturnType<typeof setTimeout> | undefined;
  let userId: string | undefined;
  let caughtUp = false;
  let subscription: SessionSubscription | undefined;
  // Client-side tools run only in the chat that started the reply: while this chat follows a
  // reply another tab or device asked for, its `onToolCall` is not called (that tab runs the
  // tool; its output arrives here as a `tool_result`).
  let following = 0;
  const holder = chat as unknown as { onToolCall?: (arg: unknown) => unknown };
  const ownToolCall = holder.onToolCall;
  const guardedToolCall = ownToolCall
    ? (arg: unknown) => (following > 0 ? undefined : ownToolCall.call(chat, arg))
    : undefined;
  if (guardedToolCall) holder.onToolCall = guardedToolCall;
  offs.push(() => {
    if (guardedToolCall && holder.onToolCall === guardedToolCall) holder.onToolCall = ownToolCall;
  });

  /**
   * A resumed reply (`reconnectToStream`: a reply another tab asked for that this chat follows,
   * or a resume after a reload) that continues a message this chat shows — after a tool result,
   * the agent continues the message that made the tool call — keeps that message's parts in
   * front of the continuation's, as the chat that sent the tool result shows it. The AI SDK
   * rebuilds a resumed reply from its first chunk (`resumeStreamIsReplay`), which holds only the
   * continuation: each time it writes the message, the parts shown before the reply was resumed
   * are put back in front (a tool part the continuation updates, e.g. the output of an approved
   * tool, is updated in place, as `historyToUIMessages` does).
   */
  type Continuing = { messageId: string; before: UI_MESSAGE };
  const continuing = new Set<Continuing>();
  // What each continued dispatch's message held before its reply was first handed to this chat
  // (a second resume of the same reply replays it again from its first chunk).
  const prefixes = new Map<string, UI_MESSAGE>();
  const state = (chat as unknown as { state?: { replaceMessage?: (index: number, message: UI_MESSAGE) => unknown } }).state;
  const replace = state?.replaceMessage;
  if (state && typeof replace === "function") {
    const own = Object.prototype.hasOwnProperty.call(state, "replaceMessage");
    const wrapped = function (this: unknown, index: number, message: UI_MESSAGE) {
      let entry: Continuing | undefined;
      for (const candidate of continuing) if (candidate.messageId === message?.id && message.role === "assistant") entry = candidate;
      if (entry) {
        const { before } = entry;
        const joined = { ...message, parts: joinSegments([before.parts, message.parts]) } as UI_MESSAGE;
        if (before.metadata !== undefined || message.metadata !== undefined) {
          joined.metadata = { ...(before.metadata as object | undefined), ...(message.metadata as object | undefined) } as UI_MESSAGE["metadata"];
        }
        message = joined;
      }
      return replace.call(this, index, message);
    };
    state.replaceMessage = wrapped;
    offs.push(() => {
      if (state.replaceMessage !== wrapped) return;
      if (own) state.replaceMessage = replace;
      else delete state.replaceMessage;
    });
    offs.push(
      transport.onResume(chatId, (reply) => {
        const messageId = reply.messageId;
        if (!messageId) return;
        let before = prefixes.get(reply.dispatchId);
        if (!before && !reply.streamedBefore) {
          // Not handed out before: what the chat shows of the message is what was stored before.
          const shown = chat.messages.find((m) => m.id === messageId && m.role === "assistant");
          if (shown) {
            before = JSON.parse(JSON.stringify(shown)) as UI_MESSAGE;
            prefixes.set(reply.dispatchId, before);
          }
        }
        if (!before) return;
        const entry: Continuing = { messageId, before };
        continuing.add(entry);
        void reply.done.then(() => continuing.delete(entry));
      }),
    );
  }

  const schedule = () => {
    if (timer === undefined && !stopped) timer = setTimeout(flush, 50);
  };

  const flush = () => {
    timer = undefined;
    if (stopped || pending.length === 0) return;
    if (!IDLE.has(chat.status) || !caughtUp) {
      schedule();
      return;
    }
    const batch = pending.splice(0);
    let messages = chat.messages;
    for (const message of batch) messages = apply(messages, message);
    if (messages !== chat.messages) chat.messages = messages;
  };

  const apply = (messages: UI_MESSAGE[], message: Message): UI_MESSAGE[] => {
    const fromUser = message.sender_id === userId && message.kind !== "assistant";
    if (fromUser && message.kind === "regenerate") {
      // A new reply was asked for (here or in another tab): drop the replies it supersedes —
      // the agent's messages after the latest user message, stored before the `regenerate`
      // (the new reply, stored after it or still streaming, stays).
      const lastUser = messages.findLastIndex((m) => m.role === "user");
      const kept = messages.filter((m, i) => {
        if (i <= lastUser || m.role !== "assistant") return true;
        const seq = transport.seqOf(chatId, m.id);
        return seq === undefined || seq > message.seq;
      });
      return kept.length === messages.length ? messages : kept;
    }
    if (fromUser && message.kind === "tool_result") {
      const content = message.content as { message_id?: string; parts?: Array<{ toolCallId?: string }> };
      const index = messages.findIndex((m) => m.id === content.message_id);
      if (index < 0 || !Array.isArray(content.parts)) return messages;
      const updates = new Map(content.parts.map((p) => [p.toolCallId, p]));
      const target = messages[index];
      let changed = false;
      const parts = target.parts.map((part: any) => {
        const update = updates.get(part?.toolCallId);
        if (!update || JSON.stringify(update) === JSON.stringify(part)) return part;
        changed = true;
        return update;
      });
      if (!changed) return messages;
      const next = [...messages];
      next[index] = { ...target, parts } as UI_MESSAGE;
      return next;
    }
    const [ui] = historyToUIMessages<UI_MESSAGE>([message], { userId: userId!, fileBaseUrl: transport.client.url }).messages;
    if (!ui) return messages;
    const existing = messages.findIndex((m) => m.id === ui.id);
    if (existing >= 0) {
      // Shown already (streamed here). The stored reply is authoritative when it is the whole
      // message (not a continuation) and differs — e.g. a retried dispatch streamed it afresh
      // after this chat saw an `abort` — unless this chat has changed its tool parts since
      // (an approval or output not yet sent).
      // A continuation the server stored whole (the message's parts and the continuation's,
      // `metadata.continuation: "whole"`) is the whole message too, as `loadChatMessages` shows it.
      const shown = messages[existing];
      const whole = ui.role === "assistant" && (message.metadata as Record<string, unknown> | null)?.continuation === "whole";
      if (ui.role !== "assistant" || (!whole && transport.fleetIds(chatId, ui.id).length > 1)) return messages;
      if (JSON.stringify(shown.parts) === JSON.stringify(ui.parts)) return messages;
      const storedTools = new Map(ui.parts.filter((p: any) => p?.toolCallId).map((p: any) => [p.toolCallId, p.state]));
      if (whole) {
        // The whole copy holds every tool part at least as far as any tool result took it; only
        // a part this chat took further (an approval or output not yet sent) keeps it from
        // replacing the message.
        const ahead = (p: any) => p?.toolCallId && (TOOL_STAGE[p.state] ?? 0) > (TOOL_STAGE[storedTools.get(p.toolCallId)] ?? -1);
        if (shown.parts.some(ahead)) return messages;
      } else if (shown.parts.some((p: any) => p?.toolCallId && storedTools.get(p.toolCallId) !== p.state)) return messages;
      const next = [...messages];
      next[existing] = ui;
      if (whole) {
        // The metadata of the message's earlier copies stays (merged, as `historyToUIMessages` does).
        const metadata = shown.metadata === undefined && ui.metadata === undefined ? undefined : { ...(shown.metadata as object | undefined), ...(ui.metadata as object | undefined) };
        next[existing] = { ...ui, ...(metadata === undefined ? {} : { metadata }) } as UI_MESSAGE;
      }
      return next;
    }
    const dispatchId = message.kind === "assistant" ? (message.metadata?.dispatch_id as string | undefined) : undefined;
    if (dispatchId && transport.streamedDispatch(chatId, dispatchId)) {
      // This chat streamed the reply, under an id of its own (the agent's `start` chunk named
      // none): take the stored message's id and parts.
      const index = messages.findLastIndex((m) => m.role === "assistant" && transport.fleetIds(chatId, m.id).length === 0);
      if (index >= 0) {
        const next = [...messages];
        next[index] = ui;
        return next;
      }
    }
    // In seq order: before the replies at the end that were stored later or are still being
    // streamed (their stored message comes later than this one). A reply another tab asked
    // for can start streaming here before the message that asked for it has been applied.
    let at = messages.length;
    while (at > 0 && messages[at - 1].role === "assistant") {
      const seq = transport.seqOf(chatId, messages[at - 1].id);
      if (seq !== undefined && seq < message.seq) break;
      at--;
    }
    return [...messages.slice(0, at), ui, ...messages.slice(at)];
  };

  const ready = (async () => {
    let sub: SessionSubscription;
    try {
      sub = await transport.session(chatId, { create: false });
    } catch (error) {
      if ((error as { code?: string }).code !== "session_not_found") throw error;
      // A new chat: its session is created by the first send.
      sub = await transport.whenOpen(chatId);
    }
    if (stopped) return;
    subscription = sub;
    offs.push(
      sub.on("message", (message) => {
        pending.push(message);
        schedule();
      }),
    );
    if (options.followRemoteStreams !== false) {
      offs.push(
        sub.on("chunk", (event) => {
          if (event.chunk.type !== "start" || !IDLE.has(chat.status)) return;
          if (transport.inFlight(chatId) || transport.streamedDispatch(chatId, event.dispatchId)) return;
          // A reply this chat did not ask for (another tab sent the message): stream it too,
          // after the messages before it are in.
          setTimeout(() => {
            flush();
            if (!stopped && IDLE.has(chat.status) && !transport.inFlight(chatId)) {
              following++;
              void chat.resumeStream().finally(() => following--);
            }
          }, 0);
        }),
      );
    }
    // Catch up with what was written before this chat subscribed (e.g. since its history
    // loaded): the messages the chat does not show yet are added.
    const history = await transport.history(chatId);
    if (stopped || !history) return;
    userId = history.userId;
    const newest = history.messages.length ? history.messages[history.messages.length - 1].seq : 0;
    const live = pending.splice(0).filter((m) => m.seq > newest);
    const converted = historyToUIMessages<UI_MESSAGE>(history.messages, { userId, fileBaseUrl: transport.client.url }).messages;
    const catchUp = () => {
      if (stopped) return;
      if (!IDLE.has(chat.status)) {
        setTimeout(catchUp, 50);
        return;
      }
      const shown = new Set(chat.messages.map((m) => m.id));
      const missing = converted.filter((m) => !shown.has(m.id));
      if (missing.length) chat.messages = [...chat.messages, ...missing];
      caughtUp = true;
      pending.unshift(...live);
      flush();
    };
    catchUp();
  })();
  ready.catch(() => {});

  return {
    ready,
    stop() {
      stopped = true;
      if (timer !== undefined) clearTimeout(timer);
      for (const off of offs.splice(0)) off();
      void subscription;
    },
  };
}
