// Builds the message a reply stream describes, chunk by chunk, in the AI SDK's UIMessage shape
// (the same shape FleetLM stores), so live and stored replies render alike.

export type Part = { type: string; [key: string]: any };

export interface LiveReply {
  dispatchId: string;
  parts: Part[];
  error?: string;
}

function findTool(parts: Part[], toolCallId: string): Part | undefined {
  return parts.find((p) => p.toolCallId === toolCallId);
}

function lastOpen(parts: Part[], type: string, id: string): Part | undefined {
  for (let i = parts.length - 1; i >= 0; i--) {
    if (parts[i].type === type && parts[i]._id === id) return parts[i];
  }
  return undefined;
}

/** Applies one chunk; returns a new reply object (parts are copied shallowly). */
export function applyChunk(reply: LiveReply, chunk: any): LiveReply {
  const parts = reply.parts.map((p) => ({ ...p }));
  const next: LiveReply = { ...reply, parts };
  switch (chunk?.type) {
    case "text-start":
    case "reasoning-start":
      parts.push({ type: chunk.type === "text-start" ? "text" : "reasoning", text: "", state: "streaming", _id: chunk.id });
      break;
    case "text-delta":
    case "reasoning-delta": {
      const part = lastOpen(parts, chunk.type === "text-delta" ? "text" : "reasoning", chunk.id);
      if (part) part.text += chunk.delta ?? "";
      break;
    }
    case "text-end":
    case "reasoning-end": {
      const part = lastOpen(parts, chunk.type === "text-end" ? "text" : "reasoning", chunk.id);
      if (part) part.state = "done";
      break;
    }
    case "tool-input-start":
      parts.push({
        type: chunk.dynamic ? "dynamic-tool" : `tool-${chunk.toolName}`,
        toolName: chunk.toolName,
        toolCallId: chunk.toolCallId,
        state: "input-streaming",
        inputText: "",
      });
      break;
    case "tool-input-delta": {
      const part = findTool(parts, chunk.toolCallId);
      if (part) part.inputText = (part.inputText ?? "") + (chunk.inputTextDelta ?? "");
      break;
    }
    case "tool-input-available":
    case "tool-input-error": {
      let part = findTool(parts, chunk.toolCallId);
      if (!part) {
        part = { type: chunk.dynamic ? "dynamic-tool" : `tool-${chunk.toolName}`, toolName: chunk.toolName, toolCallId: chunk.toolCallId };
        parts.push(part);
      }
      part.input = chunk.input;
      part.state = chunk.type === "tool-input-available" ? "input-available" : "output-error";
      if (chunk.errorText) part.errorText = chunk.errorText;
      break;
    }
    case "tool-output-available":
    case "tool-output-error": {
      const part = findTool(parts, chunk.toolCallId);
      if (part) {
        if (chunk.type === "tool-output-available") {
          part.output = chunk.output;
          part.state = "output-available";
        } else {
          part.errorText = chunk.errorText;
          part.state = "output-error";
        }
      }
      break;
    }
    case "error":
      next.error = chunk.errorText ?? "error";
      break;
    case "start-step":
      parts.push({ type: "step-start" });
      break;
    case "start":
    case "finish":
    case "finish-step":
    case "abort":
    case "message-metadata":
      break;
    default:
      if (typeof chunk?.type === "string" && (chunk.type.startsWith("data-") || chunk.type.startsWith("source") || chunk.type === "file")) {
        if (chunk.type.startsWith("data-") && chunk.id !== undefined) {
          const existing = parts.findIndex((p) => p.type === chunk.type && p.id === chunk.id);
          if (existing >= 0) {
            parts[existing] = { ...chunk };
            break;
          }
        }
        parts.push({ ...chunk });
      }
  }
  return next;
}
