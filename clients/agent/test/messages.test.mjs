// A call's conversation as UIMessage[] / model messages, and the reply stream's message id,
// with the AI SDK's own streamText and mock model (the server side is in examples/ai-sdk-agent/test/).
import assert from "node:assert/strict";
import { randomBytes } from "node:crypto";
import { describe, test } from "node:test";
import { stepCountIs, streamText, tool } from "ai";
import * as aiTest from "ai/test";
import { Webhook } from "standardwebhooks";
import { z } from "zod";
import { continuedMessageId, createFleetLMHandler, replyWithStream, toModelMessages, toUIMessages } from "@fleetlm/agent";

const usage = { inputTokens: { total: 1, noCache: 1 }, outputTokens: { total: 1, text: 1 } };
const message = (seq, sender_id, kind, content, metadata = {}) => ({ seq, sender_id, kind, content, metadata, inserted_at: "2026-12-01T00:00:00Z" });
const call = (messages) => ({ session_id: "s1", agent_id: "bot", user_id: "alice", dispatch_id: "turn-1", attempt: 1, messages });

const askedToDelete = [
  message(1, "alice", "text", { text: "delete old", id: "u1", parts: [{ type: "text", text: "delete old" }] }),
  message(2, "bot", "assistant", {
    id: "r1",
    role: "assistant",
    parts: [{ type: "step-start" }, { type: "tool-deleteNote", toolCallId: "c1", state: "approval-requested", input: { title: "old" }, approval: { id: "a1" } }],
  }, { termination: "finish", dispatch_id: "turn-0", answers_seq: 1, mood: "helpful" }),
];
const approval = (approved) =>
  message(3, "alice", "tool_result", {
    message_id: "r1",
    parts: [{ type: "tool-deleteNote", toolCallId: "c1", state: "approval-responded", input: { title: "old" }, approval: { id: "a1", approved } }],
  });

// ai 7's mock model; ai 6 (release/ai-majors.test.mjs also runs this file with it) has V3.
const MockLanguageModel = aiTest.MockLanguageModelV4 ?? aiTest.MockLanguageModelV3;
const { convertArrayToReadableStream } = aiTest;

/** A mock model that answers with `text` (or calls deleteNote when the prompt ends with a user message saying "delete"). */
function model(seen = []) {
  return new MockLanguageModel({
    doStream: async (options) => {
      seen.push(options);
      const last = options.prompt.at(-1);
      const wantsTool = last.role === "user" && JSON.stringify(last.content).includes("delete");
      const parts = wantsTool
        ? [{ type: "tool-call", toolCallId: "c9", toolName: "deleteNote", input: JSON.stringify({ title: "x" }) }, { type: "finish", finishReason: { unified: "tool-calls", raw: undefined }, usage }]
        : [
            { type: "text-start", id: "t" },
            { type: "text-delta", id: "t", delta: "done" },
            { type: "text-end", id: "t" },
            { type: "finish", finishReason: { unified: "stop", raw: undefined }, usage },
          ];
      return { stream: convertArrayToReadableStream([{ type: "stream-start", warnings: [] }, ...parts]) };
    },
  });
}
const tools = {
  deleteNote: tool({ inputSchema: z.object({ title: z.string() }), needsApproval: true, execute: async ({ title }) => ({ deleted: title }) }),
};

/** The UI message chunks of an SSE response body. */
async function chunks(response) {
  const text = await response.text();
  return text
    .split("\n")
    .filter((line) => line.startsWith("data: ") && line !== "data: [DONE]")
    .map((line) => JSON.parse(line.slice(6)));
}

describe("toUIMessages / toModelMessages", () => {
  test("user messages, replies (FleetLM's metadata removed), a tool result folded into the message it names", () => {
    const ui = toUIMessages(call([message(0, "alice", "text", { text: "plain" }), ...askedToDelete, approval(true)]));
    assert.deepEqual(ui, [
      { id: "s1:0", role: "user", parts: [{ type: "text", text: "plain" }] },
      { id: "u1", role: "user", parts: [{ type: "text", text: "delete old" }] },
      {
        id: "r1",
        role: "assistant",
        metadata: { mood: "helpful" },
        parts: [{ type: "step-start" }, { type: "tool-deleteNote", toolCallId: "c1", state: "approval-responded", input: { title: "old" }, approval: { id: "a1", approved: true } }],
      },
    ]);
    assert.equal(continuedMessageId(call([...askedToDelete, approval(true)])), "r1");
    assert.equal(continuedMessageId(call(askedToDelete.slice(0, 1))), undefined);
  });

  test("a continuation is appended to its message; its tool part for a call the message made updates that part", () => {
    const continuation = message(4, "bot", "assistant", {
      id: "r1",
      role: "assistant",
      parts: [
        { type: "tool-deleteNote", toolCallId: "c1", state: "output-available", input: { title: "old" }, output: { deleted: "old" } },
        { type: "step-start" },
        { type: "text", text: "Deleted old.", state: "done" },
      ],
    }, { termination: "finish" });
    const ui = toUIMessages(call([...askedToDelete, approval(true), continuation, message(5, "bot", "text", { text: "by REST" })]));
    assert.deepEqual(ui[1].parts, [
      { type: "step-start" },
      { type: "tool-deleteNote", toolCallId: "c1", state: "output-available", input: { title: "old" }, output: { deleted: "old" }, approval: { id: "a1", approved: true } },
      { type: "step-start" },
      { type: "text", text: "Deleted old.", state: "done" },
    ]);
    assert.deepEqual(ui[2], { id: "s1:5", role: "assistant", parts: [{ type: "text", text: "by REST" }] });
  });

  test("model messages: the user's approval becomes a tool approval response", async () => {
    const messages = await toModelMessages(call([...askedToDelete, approval(true)]), { tools });
    assert.deepEqual(messages.map((m) => m.role), ["user", "assistant", "tool"]);
    assert.deepEqual(JSON.parse(JSON.stringify(messages[2].content)), [{ type: "tool-approval-response", approvalId: "a1", approved: true }]);
  });
});

describe("replyWithStream", () => {
  test("a new message: no id in the start chunk (FleetLM names it), unless generateMessageId is given", async () => {
    const body = call(askedToDelete.slice(0, 1));
    const first = await chunks(replyWithStream(streamText({ model: model(), tools, messages: await toModelMessages(body, { tools }) }), body));
    assert.deepEqual(first[0], { type: "start" });
    assert.ok(first.some((c) => c.type === "tool-approval-request"));
    const named = await chunks(
      replyWithStream(streamText({ model: model(), tools, messages: await toModelMessages(body, { tools }) }), body, { generateMessageId: () => "mine" }),
    );
    assert.deepEqual(named[0], { type: "start", messageId: "mine" });
  });

  test("a continuation after an approval: the continued message's id, its tool call declared before the approved tool's output", async () => {
    const body = call([...askedToDelete, approval(true)]);
    const result = streamText({ model: model(), tools, messages: await toModelMessages(body, { tools }), stopWhen: stepCountIs(3) });
    const sent = await chunks(replyWithStream(result, body));
    assert.deepEqual(sent.slice(0, 3), [
      { type: "start", messageId: "r1" },
      { type: "tool-input-available", toolCallId: "c1", toolName: "deleteNote", input: { title: "old" } },
      { type: "tool-output-available", toolCallId: "c1", output: { deleted: "old" } },
    ]);
    assert.equal(sent.at(-1).type, "finish");
    // Denied: the denial, under the same id.
    const denied = call([...askedToDelete, approval(false)]);
    const deniedChunks = await chunks(replyWithStream(streamText({ model: model(), tools, messages: await toModelMessages(denied, { tools }) }), denied));
    assert.deepEqual(deniedChunks.slice(0, 3), [
      { type: "start", messageId: "r1" },
      { type: "tool-input-available", toolCallId: "c1", toolName: "deleteNote", input: { title: "old" } },
      { type: "tool-output-denied", toolCallId: "c1" },
    ]);
  });

  test("a continuation whose message is not in the history (history mode `last`) keeps the message's id", async () => {
    const body = call([approval(true)]);
    assert.deepEqual(toUIMessages(body), []);
    const sent = await chunks(replyWithStream(streamText({ model: model(), messages: [{ role: "user", content: "go on" }] }), body));
    assert.deepEqual(sent[0], { type: "start", messageId: "r1" });
  });
});

describe("createFleetLMHandler", () => {
  const secret = `whsec_${randomBytes(32).toString("base64")}`;
  const request = (body, signingSecret, signal) => {
    const text = JSON.stringify(body);
    const headers = {
      "content-type": "application/json",
      "webhook-id": body.dispatch_id,
      "webhook-timestamp": String(Math.floor(Date.now() / 1000)),
      "webhook-signature": new Webhook(signingSecret).sign(body.dispatch_id, new Date(), text),
    };
    return new Request("http://agent.test/webhook", { method: "POST", headers, body: text, signal });
  };

  test("verifies, converts, passes the request's abort signal to the model, answers a UI message stream", async () => {
    const seen = [];
    const turns = [];
    const handler = createFleetLMHandler({
      secret,
      respond: async ({ call: verified, messages, abortSignal }) => {
        turns.push({ verified, messages });
        return streamText({ model: model(seen), messages: await toModelMessages(verified), abortSignal });
      },
    });
    const controller = new AbortController();
    const response = await handler(request(call([message(1, "alice", "text", { text: "hi" })]), secret, controller.signal));
    assert.equal(response.status, 200);
    assert.match(response.headers.get("content-type"), /text\/event-stream/);
    const sent = await chunks(response);
    assert.deepEqual(sent.map((c) => c.type), ["start", "start-step", "text-start", "text-delta", "text-end", "finish-step", "finish"]);
    assert.deepEqual(turns[0].messages, [{ id: "s1:1", role: "user", parts: [{ type: "text", text: "hi" }] }]);
    assert.equal(seen[0].abortSignal.aborted, false);
    controller.abort();
    assert.equal(seen[0].abortSignal.aborted, true, "the model call's signal follows the request's");
  });

  test("a call under another secret: 401, respond never runs, onRejected sees why", async () => {
    const rejected = [];
    let responded = false;
    const handler = createFleetLMHandler({
      secret,
      onRejected: (error) => rejected.push(error.code),
      respond: () => {
        responded = true;
        return new Response("no");
      },
    });
    const response = await handler(request(call([]), `whsec_${randomBytes(32).toString("base64")}`));
    assert.equal(response.status, 401);
    assert.deepEqual(rejected, ["no_matching_signature"]);
    assert.equal(responded, false);
    assert.equal((await handler(new Request("http://agent.test/webhook"))).status, 405);
  });
});
