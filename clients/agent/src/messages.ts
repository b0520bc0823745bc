// A call's conversation as AI SDK messages: UIMessage[] (the same mapping as `loadChatMessages`
// in @fleetlm/ai-sdk, shared from there) and model messages (`convertToModelMessages`).
import { historyToUIMessages } from "@fleetlm/ai-sdk/messages";
import { convertToModelMessages, type ModelMessage, type UIMessage } from "ai";
import type { FleetLMWebhookBody, FleetLMWebhookMessage } from "./types.js";
import type { FleetLMCall } from "./verify.js";

/** A stored message, as `historyToUIMessages` takes it. */
type Message = Parameters<typeof historyToUIMessages>[0][number];

function bodyOf(call: FleetLMCall | FleetLMWebhookBody): FleetLMWebhookBody {
  return "body" in call && typeof call.body === "object" ? call.body : (call as FleetLMWebhookBody);
}

/** The id a message without its own UI id gets: calls carry no FleetLM message ids. */
function fallbackId(body: FleetLMWebhookBody, message: FleetLMWebhookMessage): string {
  return `${body.session_id}:${message.seq}`;
}

/**
 * The call's conversation as `UIMessage[]`, as the user's chat shows it: user messages (the
 * `parts` and `id` an AI SDK client sent; plain `{"text"}` as one text part), your earlier
 * replies (with their ids and your metadata; FleetLM's own keys removed), a `tool_result`
 * folded into the message it names (tool outputs, approvals), continuations of a message
 * appended to it. Messages without a UI id get `<session_id>:<seq>`.
 */
export function toUIMessages<UI_MESSAGE extends UIMessage = UIMessage>(call: FleetLMCall | FleetLMWebhookBody): UI_MESSAGE[] {
  const body = bodyOf(call);
  const history = body.messages.map(
    (message): Message => ({
      id: fallbackId(body, message),
      session_id: body.session_id,
      seq: message.seq,
      sender_id: message.sender_id,
      kind: message.kind,
      content: message.content ?? {},
      metadata: message.metadata ?? {},
      inserted_at: message.inserted_at,
    }),
  );
  return historyToUIMessages<UI_MESSAGE>(history, { userId: body.user_id }).messages;
}

export type ToModelMessagesOptions = NonNullable<Parameters<typeof convertToModelMessages>[1]>;

/**
 * The call's conversation as model messages for `streamText({ messages })`: `toUIMessages`,
 * then the AI SDK's `convertToModelMessages` (pass your `tools`, so tool outputs convert as your
 * tools define; approvals the user answered become tool approval responses, which `streamText`
 * acts on: it runs the approved tools).
 */
export async function toModelMessages(
  call: FleetLMCall | FleetLMWebhookBody,
  options?: ToModelMessagesOptions,
): Promise<ModelMessage[]> {
  return await convertToModelMessages(toUIMessages(call), options);
}

/**
 * The id of the message this call's reply continues: the message a trailing `tool_result`
 * names (after the user answered a tool approval or a client-side tool), else undefined (a new
 * message: FleetLM names it, in the `start` chunk it forwards).
 */
export function continuedMessageId(call: FleetLMCall | FleetLMWebhookBody): string | undefined {
  const body = bodyOf(call);
  const last = body.messages[body.messages.length - 1];
  if (last && last.kind === "tool_result" && last.sender_id === body.user_id && typeof last.content?.message_id === "string") {
    return last.content.message_id;
  }
  return undefined;
}
