// Answering a call with an AI SDK `streamText` result: a UI message stream response whose
// message id is the one FleetLM stores (and continues), whatever the tool approvals.
import { createUIMessageStreamResponse, type UIMessage, type UIMessageChunk, type UIMessageStreamOptions } from "ai";
import { continuedMessageId, toUIMessages } from "./messages.js";
import type { FleetLMWebhookBody } from "./types.js";
import type { FleetLMCall } from "./verify.js";

/** What `streamText` (or `Agent.stream`) returns; only `toUIMessageStream` is used. */
export interface UIMessageStreamSource<UI_MESSAGE extends UIMessage = UIMessage> {
  toUIMessageStream(options?: UIMessageStreamOptions<UI_MESSAGE>): ReadableStream<any>;
}

export type FleetLMReplyOptions<UI_MESSAGE extends UIMessage = UIMessage> = Omit<UIMessageStreamOptions<UI_MESSAGE>, "originalMessages"> & {
  /** The conversation, if you already converted it (`toUIMessages(call)`); converted here otherwise. */
  originalMessages?: UI_MESSAGE[];
  /** Response headers, added to the UI message stream's own. */
  headers?: HeadersInit;
  status?: number;
  statusText?: string;
};

function isObject(value: unknown): value is Record<string, any> {
  return typeof value === "object" && value !== null && !Array.isArray(value);
}

/**
 * Prepares a continuation for FleetLM, which assembles each message it stores from that
 * message's own chunks: when the user answered tool approvals, `streamText` reports the outcome
 * of those tool calls (`tool-output-available`, `tool-output-error`, `tool-output-denied`) in
 * the continuation, naming tool calls of the message it continues. Right after the `start`
 * chunk this declares each such tool call again (`tool-input-available` with its input), so
 * FleetLM can assemble and store the outcome; the AI SDK's chat applies the chunk to the part it
 * already holds (no change), and `loadChatMessages` merges the stored part into the earlier one.
 */
export function declareContinuedToolCalls(stream: ReadableStream<UIMessageChunk>, continued: UIMessage | undefined): ReadableStream<UIMessageChunk> {
  const pending = (continued?.parts ?? []).filter(
    (part: any) => isObject(part) && typeof part.toolCallId === "string" && part.state === "approval-responded",
  ) as any[];
  if (pending.length === 0) return stream;
  let declared = false;
  return stream.pipeThrough(
    new TransformStream<UIMessageChunk, UIMessageChunk>({
      transform(chunk, controller) {
        controller.enqueue(chunk);
        if (declared || chunk.type !== "start") return;
        declared = true;
        for (const part of pending) {
          const dynamic = part.type === "dynamic-tool";
          controller.enqueue({
            type: "tool-input-available",
            toolCallId: part.toolCallId,
            toolName: dynamic ? part.toolName : String(part.type).slice("tool-".length),
            input: part.input,
            ...(dynamic ? { dynamic: true } : {}),
            ...(part.providerExecuted !== undefined ? { providerExecuted: part.providerExecuted } : {}),
            ...(typeof part.title === "string" ? { title: part.title } : {}),
          } as UIMessageChunk);
        }
      },
    }),
  );
}

/**
 * The UI message stream options that give a reply the id FleetLM expects: `originalMessages`
 * (the call's conversation), so a continuation (after tool approvals or client tool outputs)
 * starts with the id of the message it continues, and for a new message no id unless you give
 * `generateMessageId` (FleetLM then names it: the id it stores, in the `start` chunk every
 * client gets, the same on every attempt of the turn).
 */
export function fleetLMStreamOptions<UI_MESSAGE extends UIMessage = UIMessage>(
  call: FleetLMCall | FleetLMWebhookBody,
  options: FleetLMReplyOptions<UI_MESSAGE> = {},
): UIMessageStreamOptions<UI_MESSAGE> {
  const { headers: _headers, status: _status, statusText: _statusText, ...streamOptions } = options;
  const originalMessages = options.originalMessages ?? toUIMessages<UI_MESSAGE>(call);
  const continued = continuedMessageId(call);
  const last = originalMessages[originalMessages.length - 1];
  // The continued message may be outside the history the agent gets (`last`, a short `tail`):
  // it still continues under its id.
  const generateMessageId =
    continued !== undefined && !(last?.role === "assistant" && last.id === continued) ? () => continued : options.generateMessageId;
  return { ...streamOptions, originalMessages, ...(generateMessageId ? { generateMessageId } : {}) };
}

/**
 * Answers a FleetLM call with a `streamText` result: a `Response` streaming the reply as AI SDK
 * UI message chunks (Server-Sent Events, as `toUIMessageStreamResponse()` sends), with the
 * message id FleetLM expects (`fleetLMStreamOptions`) and continuations FleetLM can store
 * (`declareContinuedToolCalls`). Pass the call's abort signal to `streamText` yourself
 * (`abortSignal: call.signal`), or use `createFleetLMHandler`, which does.
 */
export function replyWithStream<UI_MESSAGE extends UIMessage = UIMessage>(
  result: UIMessageStreamSource<UI_MESSAGE>,
  call: FleetLMCall | FleetLMWebhookBody,
  options: FleetLMReplyOptions<UI_MESSAGE> = {},
): Response {
  const streamOptions = fleetLMStreamOptions(call, options);
  const originalMessages = streamOptions.originalMessages ?? [];
  const continuedId = continuedMessageId(call);
  const continued = originalMessages.find((m) => m.role === "assistant" && m.id === continuedId);
  const stream = declareContinuedToolCalls(result.toUIMessageStream(streamOptions) as ReadableStream<UIMessageChunk>, continued);
  return createUIMessageStreamResponse({ stream, headers: options.headers, status: options.status, statusText: options.statusText });
}
