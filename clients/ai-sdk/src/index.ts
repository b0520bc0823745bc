// @fleetlm/ai-sdk: FleetLM for the Vercel AI SDK (docs/CLIENTS.md). The React hook is in
// "@fleetlm/ai-sdk/react".
export { DEFAULT_MAX_OPEN_CHATS, FleetLMChatTransport, type FleetLMChatTransportOptions, type ResumedReply } from "./transport.js";
export {
  CLIENT_TOOL_STATES,
  FLEETLM_METADATA_KEYS,
  FLEETLM_REQUEST_KEY,
  fileUrl,
  historyPageStart,
  historyToUIMessages,
  isFleetLMFilePath,
  isUserTurn,
  replyMetadata,
  requestOptions,
  type ConvertedHistory,
  type FleetLMRequestOptions,
  type HistoryOptions,
  type HistoryPageOptions,
} from "./messages.js";
export { loadChatMessages, loadChatPage, type ChatPage, type LoadChatMessagesOptions, type LoadChatPageOptions } from "./load.js";
export { dataUrlBytes } from "./files.js";
export { syncChat, type ChatSync, type ChatSyncOptions } from "./sync.js";
export { CHAT_CALLBACKS, latestCallbacks } from "./callbacks.js";
