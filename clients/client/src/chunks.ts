// Turning a stored UI message back into the chunks that describe it, for replies that were not
// streamed (an agent answering with plain JSON) and for servers whose `stream_snapshot` carries
// only the message so far. Feeding these chunks to the AI SDK's `readUIMessageStream` yields the
// message again (text, reasoning, tools, approvals, data, files, sources, steps).
import type { UIMessageChunk, UIMessageLike, UIPart } from "./types.js";

/** The chunks that build `message` from nothing; `finished: false` leaves out `finish`. */
export function messageToChunks(message: UIMessageLike, options: { finished?: boolean } = {}): UIMessageChunk[] {
  const chunks: UIMessageChunk[] = [];
  const start: UIMessageChunk = { type: "start", messageId: message.id };
  if (message.metadata !== undefined && message.metadata !== null) start.messageMetadata = message.metadata;
  chunks.push(start);
  let inStep = false;
  message.parts.forEach((part: UIPart, i: number) => {
    const type = part.type;
    if (type === "step-start") {
      if (inStep) chunks.push({ type: "finish-step" });
      chunks.push({ type: "start-step" });
      inStep = true;
    } else if (type === "text" || type === "reasoning") {
      // Reasoning parts keep their stream id (as the AI SDK does); text parts do not.
      const id = typeof part.id === "string" ? part.id : `${type[0]}${i}`;
      const extra = part.providerMetadata ? { providerMetadata: part.providerMetadata } : {};
      chunks.push({ type: `${type}-start`, id, ...extra });
      if (part.text) chunks.push({ type: `${type}-delta`, id, delta: part.text });
      if (part.state !== "streaming") chunks.push({ type: `${type}-end`, id });
    } else if (type === "dynamic-tool" || type.startsWith("tool-")) {
      chunks.push(...toolChunks(part));
    } else if (type.startsWith("data-")) {
      const chunk: UIMessageChunk = { type, data: part.data };
      if (part.id !== undefined) chunk.id = part.id;
      chunks.push(chunk);
    } else if (type === "file") {
      const chunk: UIMessageChunk = { type: "file", url: part.url, mediaType: part.mediaType };
      if (part.providerMetadata) chunk.providerMetadata = part.providerMetadata;
      chunks.push(chunk);
    } else if (type === "source-url") {
      const chunk: UIMessageChunk = { type, sourceId: part.sourceId, url: part.url };
      if (part.title !== undefined) chunk.title = part.title;
      chunks.push(chunk);
    } else if (type === "source-document") {
      const chunk: UIMessageChunk = { type, sourceId: part.sourceId, mediaType: part.mediaType, title: part.title };
      if (part.filename !== undefined) chunk.filename = part.filename;
      chunks.push(chunk);
    }
  });
  if (inStep) chunks.push({ type: "finish-step" });
  if (options.finished !== false) chunks.push({ type: "finish" });
  return chunks;
}

function toolChunks(part: UIPart): UIMessageChunk[] {
  const dynamic = part.type === "dynamic-tool";
  const toolName: string = dynamic ? part.toolName : part.type.slice("tool-".length);
  const base: UIMessageChunk = { toolCallId: part.toolCallId, toolName, type: "" };
  if (dynamic) base.dynamic = true;
  if (part.providerExecuted !== undefined) base.providerExecuted = part.providerExecuted;
  if (part.title !== undefined) base.title = part.title;
  const chunks: UIMessageChunk[] = [];
  const state: string = part.state;
  if (state === "input-streaming") {
    chunks.push({ ...base, type: "tool-input-start" });
    return chunks;
  }
  if (state === "output-error" && part.input === undefined && part.rawInput !== undefined) {
    chunks.push({ ...base, type: "tool-input-error", input: part.rawInput, errorText: part.errorText });
    return chunks;
  }
  chunks.push({ ...base, type: "tool-input-available", input: part.input });
  const approval = part.approval;
  if (approval?.id !== undefined) {
    chunks.push({ type: "tool-approval-request", approvalId: approval.id, toolCallId: part.toolCallId });
  }
  if (state === "output-available") {
    const chunk: UIMessageChunk = { type: "tool-output-available", toolCallId: part.toolCallId, output: part.output };
    if (part.preliminary) chunk.preliminary = true;
    chunks.push(chunk);
  } else if (state === "output-error") {
    chunks.push({ type: "tool-output-error", toolCallId: part.toolCallId, errorText: part.errorText });
  } else if (state === "output-denied") {
    chunks.push({ type: "tool-output-denied", toolCallId: part.toolCallId });
  }
  return chunks;
}

/** True for the chunks that end a UI message. */
export function endsMessage(chunk: UIMessageChunk): boolean {
  return chunk.type === "finish" || chunk.type === "abort";
}
