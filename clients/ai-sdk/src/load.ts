// Loading a session's history for `useChat({ messages })`.
import { FleetLMClient, type FleetLMClientOptions } from "@fleetlm/client";
import type { UIMessage } from "ai";
import { historyToUIMessages } from "./messages.js";

export interface LoadChatMessagesOptions {
  /** The chat id (= the FleetLM session id). */
  chatId: string;
  /** The server's base URL. */
  url?: string;
  userId?: string;
  token?: FleetLMClientOptions["token"];
  fetch?: typeof fetch;
  /** An existing client (instead of url/userId/token). */
  client?: FleetLMClient;
}

/**
 * Loads a session's history as UIMessage[] for `useChat({ id: chatId, messages })`. A session
 * that does not exist yet loads as `[]` (the transport creates it on the first send).
 */
export async function loadChatMessages<UI_MESSAGE extends UIMessage = UIMessage>(
  options: LoadChatMessagesOptions,
): Promise<UI_MESSAGE[]> {
  const client =
    options.client ??
    new FleetLMClient({ url: options.url ?? "", userId: options.userId, token: options.token, fetch: options.fetch });
  let userId: string;
  try {
    userId = (await client.getSession(options.chatId)).user_id;
  } catch (error) {
    if ((error as { code?: string }).code === "session_not_found") return [];
    throw error;
  }
  const history = await client.rest.getAllMessages(options.chatId);
  return historyToUIMessages<UI_MESSAGE>(history, { userId }).messages;
}
