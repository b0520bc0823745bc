// A whole webhook endpoint as a Fetch API handler: `(request: Request) => Promise<Response>`
// (Next.js route handlers, Hono, Bun, Deno, Cloudflare Workers; Node's http via `toNodeListener`).
import type { UIMessage } from "ai";
import { toUIMessages } from "./messages.js";
import { replyWithStream, type FleetLMReplyOptions, type UIMessageStreamSource } from "./reply.js";
import { FleetLMVerificationError, verifyFleetLMCall, type FleetLMCall, type SigningSecrets, type VerifyOptions } from "./verify.js";

/** What `respond` gets for one verified call. */
export interface FleetLMTurn<UI_MESSAGE extends UIMessage = UIMessage> {
  call: FleetLMCall;
  /** The conversation as UI messages (`toUIMessages(call)`); `toModelMessages(call)` for a model. */
  messages: UI_MESSAGE[];
  /** Aborted when FleetLM closes the request (the user cancelled the turn): pass it to `streamText`. */
  abortSignal: AbortSignal;
}

export interface FleetLMHandlerOptions<UI_MESSAGE extends UIMessage = UIMessage> extends VerifyOptions {
  /** Your agent's signing secret (`whsec_…`), several while you rotate it, or a function returning them. */
  secret: SigningSecrets | (() => SigningSecrets | Promise<SigningSecrets>);
  /**
   * Answers a verified call: return `streamText(…)`'s result (answered with `replyWithStream`),
   * or your own `Response`.
   */
  respond(turn: FleetLMTurn<UI_MESSAGE>): UIMessageStreamSource<UI_MESSAGE> | Response | Promise<UIMessageStreamSource<UI_MESSAGE> | Response>;
  /** Options for the UI message stream (`messageMetadata`, `sendReasoning`, `onError`, …). */
  reply?: FleetLMReplyOptions<UI_MESSAGE>;
  /** Called with every refused call (e.g. to log it); the call is answered with its `status`. */
  onRejected?(error: FleetLMVerificationError, request: Request): void;
}

/**
 * A webhook handler: verifies the call's signature (401 when it fails, which FleetLM does not
 * retry), converts the conversation, calls `respond` with the request's abort signal, and
 * answers with its `streamText` result as a UI message stream under the right message id.
 */
export function createFleetLMHandler<UI_MESSAGE extends UIMessage = UIMessage>(
  options: FleetLMHandlerOptions<UI_MESSAGE>,
): (request: Request) => Promise<Response> {
  return async (request) => {
    if (request.method !== "POST") return new Response("method not allowed", { status: 405, headers: { allow: "POST" } });
    let call: FleetLMCall;
    try {
      const secrets = typeof options.secret === "function" ? await options.secret() : options.secret;
      call = await verifyFleetLMCall(request, secrets, options);
    } catch (error) {
      if (error instanceof FleetLMVerificationError) {
        options.onRejected?.(error, request);
        return new Response(error.message, { status: error.status });
      }
      throw error;
    }
    const abortSignal = call.signal ?? request.signal;
    const messages = toUIMessages<UI_MESSAGE>(call);
    const answer = await options.respond({ call, messages, abortSignal });
    if (answer instanceof Response) return answer;
    return replyWithStream(answer, call, { ...options.reply, originalMessages: messages });
  };
}
