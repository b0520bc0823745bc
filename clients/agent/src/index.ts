// @fleetlm/agent: the agent side of FleetLM with the Vercel AI SDK (docs/AGENTS.md): verify a
// call's signature, read its conversation as UIMessage[] / model messages, answer with a
// `streamText` result. `toNodeListener` (Node's http) is in "@fleetlm/agent/node".
export {
  DEFAULT_TOLERANCE_SECONDS,
  FleetLMVerificationError,
  parseWebhookBody,
  verifyFleetLMCall,
  verifySignature,
  type BodyLike,
  type CallInput,
  type FleetLMCall,
  type FleetLMVerificationErrorCode,
  type HeadersLike,
  type SigningSecrets,
  type VerifyOptions,
} from "./verify.js";
export { continuedMessageId, toModelMessages, toUIMessages, type ToModelMessagesOptions } from "./messages.js";
export {
  declareContinuedToolCalls,
  fleetLMStreamOptions,
  replyWithStream,
  type FleetLMReplyOptions,
  type UIMessageStreamSource,
} from "./reply.js";
export { createFleetLMHandler, type FleetLMHandlerOptions, type FleetLMTurn } from "./handler.js";
export type { FleetLMWebhookBody, FleetLMWebhookMessage } from "./types.js";
