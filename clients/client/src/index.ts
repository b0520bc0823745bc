// @fleetlm/client: typed REST calls and a Phoenix socket wrapper for FleetLM (docs/CLIENTS.md).
export {
  FleetLMClient,
  InboxSubscription,
  tokenExpiresAt,
  tokenSubject,
  type ConnectionState,
  type FleetLMClientOptions,
} from "./client.js";
export { FleetLMError, RestClient, type RestOptions, type TokenProvider } from "./rest.js";
export {
  SessionSubscription,
  randomId,
  type LiveReply,
  type ReplyStreamOptions,
  type SessionEvents,
  type SubscribeOptions,
} from "./session.js";
export { endsMessage, messageToChunks } from "./chunks.js";
export { jitteredBackoff, retryDelayMs, type BackoffOptions } from "./backoff.js";
export type * from "./types.js";
