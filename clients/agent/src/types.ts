// The shapes of a FleetLM webhook call (docs/AGENTS.md, "The request").

/** One message of the conversation, as FleetLM sends it to the agent. */
export interface FleetLMWebhookMessage {
  seq: number;
  /** The session's user, or the agent (its id) for replies and REST writes. */
  sender_id: string;
  /** `text` (a user message), `assistant` (a reply), `tool_result` (a client's tool outputs or approvals), … */
  kind: string;
  content: { [key: string]: any };
  metadata: { [key: string]: any };
  inserted_at: string;
}

/** The body of a call. */
export interface FleetLMWebhookBody {
  session_id: string;
  agent_id: string;
  user_id: string;
  /** The turn's id (= the `idempotency-key` and `webhook-id` headers): the same on every attempt. */
  dispatch_id: string;
  /** 1 for the first call of the turn, 2, 3, … for retries. */
  attempt: number;
  /** The conversation so far (oldest first), on its current branch. */
  messages: FleetLMWebhookMessage[];
}
