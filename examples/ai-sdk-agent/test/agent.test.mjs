// The example agent (agent.mjs, on @fleetlm/agent and the `ai` package) with the AI SDK's own
// mock model, served by a real Node HTTP server on 127.0.0.1:0, registered with a real FleetLM
// server (FLEETLM_BIN, started on 127.0.0.1:0 by clients/test-support/harness.mjs); the user
// writes through the real client (FleetLMChatTransport driving the AI SDK's own chat).
import assert from "node:assert/strict";
import { createServer } from "node:http";
import { after, before, describe, test } from "node:test";
import { toNodeListener } from "@fleetlm/agent/node";
import { FleetLMChatTransport, loadChatMessages, syncChat } from "@fleetlm/ai-sdk";
import { lastAssistantMessageIsCompleteWithApprovalResponses } from "ai";
import { MockLanguageModelV4, convertArrayToReadableStream } from "ai/test";
import WebSocket from "ws";
import { TestChat, eventually, plain, rest, startServer, stopAll } from "../../../clients/test-support/harness.mjs";
import { NoteStore, createNotesAgent } from "../agent.mjs";

const usage = { inputTokens: { total: 1, noCache: 1 }, outputTokens: { total: 1, text: 1 } };
const finish = (unified) => ({ type: "finish", finishReason: { unified, raw: unified }, usage });
const text = (words, delayMs = 0) => words.split(/(?<= )/).map((delta) => ({ type: "text-delta", id: "t", delta, delayMs }));
const sleep = (ms) => new Promise((resolve) => setTimeout(resolve, ms));

/**
 * A scripted model (the AI SDK's MockLanguageModelV4). From the newest prompt message:
 * - a tool result → a sentence about it ("Saved groceries.", "Deleted groceries.", "Not deleted.", the list);
 * - "note <title>: <text>" → addNote; "delete <title>" → deleteNote (needs approval); "list" → listNotes;
 * - "slow" → 40 words 50 ms apart; anything else → "You said: <text>".
 * Every call's abort signal is recorded in `signals`.
 */
function scriptedModel() {
  const signals = [];
  const model = new MockLanguageModelV4({
    doStream: async ({ prompt, abortSignal }) => {
      signals.push(abortSignal);
      const last = prompt[prompt.length - 1];
      let parts;
      const say = (words, delayMs) => [{ type: "text-start", id: "t" }, ...text(words, delayMs), { type: "text-end", id: "t" }, finish("stop")];
      const call = (toolName, input) => [{ type: "tool-call", toolCallId: `call-${toolName}-${Date.now()}`, toolName, input: JSON.stringify(input) }, finish("tool-calls")];
      if (last.role === "tool") {
        const result = last.content.find((p) => p.type === "tool-result");
        const value = result.output.type === "json" ? result.output.value : result.output;
        if (result.output.type === "execution-denied") parts = say("Not deleted.");
        else if (value.saved) parts = say(`Saved ${value.saved}.`);
        else if (value.deleted) parts = say(`Deleted ${value.deleted}.`);
        else if (value.notes) parts = say(`Notes: ${value.notes.map((n) => `${n.title}=${n.text}`).join(", ") || "none"}.`);
        else parts = say(`Tool said ${JSON.stringify(value)}.`);
      } else {
        const words = last.content.filter((p) => p.type === "text").map((p) => p.text).join("");
        let match;
        if ((match = /^note (\w+): (.*)$/.exec(words))) parts = call("addNote", { title: match[1], text: match[2] });
        else if ((match = /^delete (\w+)$/.exec(words))) parts = call("deleteNote", { title: match[1] });
        else if (words === "list") parts = call("listNotes", {});
        else if (words === "slow") parts = say(Array.from({ length: 40 }, (_, i) => `w${i} `).join(""), 50);
        else parts = say(`You said: ${words}`);
      }
      const stream = new ReadableStream({
        async start(controller) {
          controller.enqueue({ type: "stream-start", warnings: [] });
          for (const { delayMs, ...part } of parts) {
            if (abortSignal?.aborted) break;
            controller.enqueue(part);
            if (delayMs) await sleep(delayMs);
          }
          controller.close();
        },
      });
      return { stream };
    },
  });
  return { model, signals };
}

/** Serves the example agent on 127.0.0.1:0; `secret` may be changed later (`agent.secret = …`). */
async function serveAgent(secret) {
  const agent = { secret, rejected: [], turns: [], notes: new NoteStore(), ...scriptedModel() };
  const handler = createNotesAgent({
    model: agent.model,
    secret: () => agent.secret,
    notes: agent.notes,
    onRejected: (error) => agent.rejected.push(error.code),
    onTurn: (call, signal) => agent.turns.push({ call, signal }),
  });
  const server = createServer(toNodeListener(handler));
  await new Promise((resolve) => server.listen(0, "127.0.0.1", resolve));
  servers.push(server);
  agent.origin = `http://127.0.0.1:${server.address().port}`;
  return agent;
}

/** Registers an agent; returns its signing secret. */
async function register(id, origin) {
  const response = await rest(base, "POST", "/api/agents", {
    agent: { id, name: id, origin_url: origin, webhook_path: "/webhook", debounce_window_ms: 0, timeout_ms: 10000 },
  });
  assert.equal(response.status, 201, JSON.stringify(response.body));
  assert.match(response.body.signing_secret, /^whsec_/);
  return response.body.signing_secret;
}

let base;
let agent;
const servers = [];
const transports = [];
let counter = 0;
const fresh = (prefix) => `${prefix}-${++counter}-${Date.now()}`;
const textOf = (message) => message.parts.filter((p) => p.type === "text").map((p) => p.text).join("");
const stored = async (chatId) => (await rest(base, "GET", `/api/sessions/${chatId}/messages?limit=1000`)).body.messages;
/** The log once it holds `count` messages (a reply is stored just after its last chunk streamed). */
const storedAtLeast = (chatId, count) => eventually(async () => {
  const log = await stored(chatId);
  return log.length >= count && log;
}, `${count} messages stored`);
const session = async (chatId) => (await rest(base, "GET", `/api/sessions/${chatId}`)).body.session;
/** The session's dispatch ends without failing (its status goes idle just after the reply is stored). */
async function idle(chatId) {
  const status = await eventually(async () => {
    const current = (await session(chatId)).agent_status ?? { status: "idle" };
    return ["idle", "failed", "cancelled"].includes(current.status) && current;
  }, "the dispatch to end");
  assert.equal(status.status, "idle", JSON.stringify(status));
}
function chatFor(agentId, options = {}) {
  const transport = new FleetLMChatTransport({ url: base, userId: "alice", agentId, WebSocket });
  transports.push(transport);
  return (id) => new TestChat({ id, transport, ...options });
}

before(async () => {
  base = await startServer();
  agent = await serveAgent("whsec_not-registered-yet");
  agent.secret = await register("notes", agent.origin);
});

after(async () => {
  for (const t of transports) t.close();
  for (const server of servers) {
    server.closeAllConnections();
    server.close();
  }
  await stopAll();
});

describe("the example AI SDK agent on a real FleetLM server", () => {
  test("a message is answered: the tool runs, the reply streams into the chat and is stored under the id the chat holds", async () => {
    const chatId = fresh("note");
    const chat = chatFor("notes")(chatId);
    const statuses = [];
    chat.statusListeners.add((status) => statuses.push(status));
    await chat.sendMessage({ text: "note groceries: milk, eggs" });
    assert.equal(chat.status, "ready", String(chat.error));
    assert.ok(statuses.includes("streaming"), `the reply streamed into the chat (statuses ${statuses})`);
    assert.equal(chat.messages.length, 2);
    const reply = chat.messages[1];
    assert.equal(reply.role, "assistant");
    assert.equal(textOf(reply), "Saved groceries.");
    const toolPart = reply.parts.find((p) => p.type === "tool-addNote");
    assert.equal(toolPart.state, "output-available");
    assert.deepEqual(toolPart.output, { saved: "groceries" });
    assert.equal(agent.notes.of("alice").get("groceries"), "milk, eggs", "the tool ran in the agent");
    // Stored once, under the id FleetLM stamped into the start chunk (the chat holds the same one).
    const log = await storedAtLeast(chatId, 2);
    const replies = log.filter((m) => m.kind === "assistant");
    assert.equal(replies.length, 1);
    assert.equal(replies[0].content.id, reply.id);
    assert.equal(replies[0].content.id.length, 22);
    assert.equal(replies[0].metadata.termination, "finish");
    assert.deepEqual(plain(await loadChatMessages({ url: base, userId: "alice", chatId })), plain(chat.messages));
    // The next turn sees the conversation (user message, the reply with its tool call).
    await chat.sendMessage({ text: "list" });
    assert.equal(textOf(chat.messages[3]), "Notes: groceries=milk, eggs.");
    const call = agent.turns.at(-1).call;
    assert.equal(call.body.session_id, chatId);
    assert.equal(call.id, call.body.dispatch_id);
    assert.deepEqual(call.body.messages.map((m) => m.kind), ["text", "assistant", "text"]);
    await idle(chatId);
  });

  for (const approved of [true, false]) {
    test(`tool approval round trip (${approved ? "approved" : "denied"}): the continuation keeps the message id and is stored`, async () => {
      const chatId = fresh(approved ? "approve" : "deny");
      agent.notes.of("alice").set("old", "stale");
      const chat = chatFor("notes", { sendAutomaticallyWhen: lastAssistantMessageIsCompleteWithApprovalResponses })(chatId);
      // A second tab on the same session follows the reply and its continuation (syncChat).
      await rest(base, "POST", "/api/sessions", { id: chatId, user_id: "alice", agent_id: "notes" });
      const followerTransport = new FleetLMChatTransport({ url: base, userId: "alice", agentId: "notes", WebSocket });
      transports.push(followerTransport);
      const follower = new TestChat({ id: chatId, transport: followerTransport, sendAutomaticallyWhen: lastAssistantMessageIsCompleteWithApprovalResponses });
      const following = syncChat(follower, followerTransport);
      await following.ready;
      await chat.sendMessage({ text: "delete old" });
      const request = chat.messages[1].parts.find((p) => p.type === "tool-deleteNote");
      assert.equal(request.state, "approval-requested");
      assert.equal(agent.notes.of("alice").get("old"), "stale", "nothing deleted before the approval");
      const replyId = chat.messages[1].id;
      const storedFirst = (await storedAtLeast(chatId, 2)).find((m) => m.kind === "assistant");
      assert.equal(storedFirst.content.id, replyId, "the approval names a message FleetLM stored");
      await chat.addToolApprovalResponse({ id: request.approval.id, approved, reason: approved ? undefined : "keep it" });
      await chat.until((c) => c.status === "ready" && textOf(c.messages[1]) !== "", "the continuation");
      assert.equal(chat.messages.length, 2, "the continuation is the same UI message");
      assert.equal(chat.messages[1].id, replyId);
      const part = chat.messages[1].parts.find((p) => p.type === "tool-deleteNote");
      if (approved) {
        assert.equal(textOf(chat.messages[1]), "Deleted old.");
        assert.equal(part.state, "output-available");
        assert.deepEqual(part.output, { deleted: "old" });
        assert.equal(agent.notes.of("alice").has("old"), false, "the approved tool ran");
      } else {
        assert.equal(textOf(chat.messages[1]), "Not deleted.");
        assert.equal(part.state, "output-denied");
        assert.equal(agent.notes.of("alice").get("old"), "stale");
      }
      // The agent got the tool result and continued the message FleetLM stored; nothing failed.
      const log = await storedAtLeast(chatId, 4);
      assert.deepEqual(log.map((m) => m.kind), ["text", "assistant", "tool_result", "assistant"]);
      assert.equal(log[3].content.id, replyId);
      assert.equal(log[3].metadata.termination, "finish");
      assert.equal(log[3].metadata.error, undefined);
      await idle(chatId);
      // A reload shows what the chat shows.
      assert.deepEqual(plain(await loadChatMessages({ url: base, userId: "alice", chatId })), plain(chat.messages));
      // So does the tab that followed: the tool part (with the approval and its outcome) and the
      // continued text, not the continuation alone.
      await follower.until((c) => c.status === "ready" && c.messages.length === 2 && textOf(c.messages[1]) === textOf(chat.messages[1]), "the follower to show the continuation");
      await sleep(200);
      assert.deepEqual(plain(follower.messages), plain(chat.messages));
      following.stop();
      // The agent's next call sees the outcome, so the tool is not run again.
      await chat.sendMessage({ text: "list" });
      assert.equal(textOf(chat.messages[3]), approved ? "Notes: groceries=milk, eggs." : "Notes: groceries=milk, eggs, old=stale.");
    });
  }

  test("stop(): FleetLM closes the call and the model's abort signal fires", async () => {
    const chatId = fresh("stop");
    const chat = chatFor("notes")(chatId);
    const sent = chat.sendMessage({ text: "slow" });
    await chat.until((c) => c.messages[1] && textOf(c.messages[1]).length > 0, "the reply streaming");
    const signal = agent.signals.at(-1);
    assert.equal(signal.aborted, false);
    await chat.stop();
    await sent;
    await eventually(() => signal.aborted, "the model's abort signal");
    await eventually(async () => (await stored(chatId)).some((m) => m.kind === "assistant" && m.metadata.termination === "abort"), "the aborted reply stored");
  });

  test("every call is signed and verified; a call under another secret is refused (401) and FleetLM records the failure", async () => {
    assert.deepEqual(agent.rejected, [], "the registered agent verified every call");
    assert.ok(agent.turns.length >= 4);
    // An agent holding a secret that is not its registration's refuses FleetLM's calls.
    const impostor = await serveAgent("whsec_" + Buffer.from("a secret FleetLM never made for this").toString("base64"));
    await register("notes-wrong-secret", impostor.origin);
    const chatId = fresh("wrong-secret");
    const chat = chatFor("notes-wrong-secret")(chatId);
    await chat.sendMessage({ text: "hello" });
    assert.equal(chat.status, "error");
    assert.match(String(chat.error?.message ?? chat.error), /HTTP 401/);
    assert.deepEqual(impostor.rejected, ["no_matching_signature"], "refused once: FleetLM does not retry a 401");
    assert.equal(impostor.turns.length, 0, "the model was never called");
    const status = (await session(chatId)).agent_status;
    assert.equal(status.status, "failed");
    assert.equal(status.error, "HTTP 401");
    assert.equal((await stored(chatId)).filter((m) => m.kind === "assistant").length, 0);
  });

  test("rotation: calls verify under the old secret during the grace period and under the new one after the agent switches", async () => {
    const rotated = await rest(base, "POST", "/api/agents/notes/signing-secret/rotate", { grace_period_ms: 60000 });
    assert.equal(rotated.status, 200, JSON.stringify(rotated.body));
    const old = agent.secret;
    const chat = chatFor("notes")(fresh("rotate"));
    await chat.sendMessage({ text: "still you" }); // the agent has only the old secret
    assert.equal(textOf(chat.messages[1]), "You said: still you");
    agent.secret = [rotated.body.signing_secret, old]; // deploying the new secret
    await chat.sendMessage({ text: "again" });
    assert.equal(textOf(chat.messages[3]), "You said: again");
    agent.secret = rotated.body.signing_secret;
    await chat.sendMessage({ text: "new only" });
    assert.equal(textOf(chat.messages[5]), "You said: new only");
    assert.deepEqual(agent.rejected, []);
  });
});
