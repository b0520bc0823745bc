// @fleetlm/ai-sdk with the AI SDK's own chat machinery (an AbstractChat subclass) against a real
// fleetlm server and a real streaming agent.
import assert from "node:assert/strict";
import { after, before, describe, test } from "node:test";
import WebSocket from "ws";
import * as ai from "ai";
import { FleetLMChatTransport, loadChatMessages, requestOptions, syncChat } from "@fleetlm/ai-sdk";
import { FleetLMClient } from "@fleetlm/client";
import {
  TestChat,
  eventually,
  needs,
  plain,
  probeFeatures,
  registerAgent,
  rest,
  sleep,
  startAgent,
  startServer,
  stopAll,
} from "../../test-support/harness.mjs";

let base;
let agent;
let features;
let counter = 0;
const fresh = (prefix) => `${prefix}-${++counter}-${Date.now()}`;
const transports = [];
function transport(options = {}) {
  const t = new FleetLMChatTransport({ url: base, userId: "alice", agentId: "bot", WebSocket, ...options });
  transports.push(t);
  return t;
}
const textOf = (message) => message.parts.filter((p) => p.type === "text").map((p) => p.text).join("");
const SLOW_TEXT = Array.from({ length: 40 }, (_, i) => `w${i} `).join("");
const stored = async (chatId) => (await rest(base, "GET", `/api/sessions/${chatId}/messages?limit=1000`)).body.messages;
const requestsFor = (chatId) => agent.requests.filter((r) => r.body.session_id === chatId);
// Tool approvals (needsApproval, addToolApprovalResponse) came with ai 6; release/ai-majors.test.mjs
// also runs this file with ai 5, which has none.
const APPROVALS = typeof ai.lastAssistantMessageIsCompleteWithApprovalResponses === "function";

before(async () => {
  base = await startServer();
  agent = await startAgent();
  await registerAgent(base, agent.origin, { id: "bot" });
  features = await probeFeatures(base, { WebSocket });
});

const clients = [];

after(async () => {
  for (const t of transports) t.close({ force: true });
  for (const c of clients) c.close();
  await stopAll();
});

describe("FleetLMChatTransport", () => {
  test("send: the session is created, the reply streams into the chat, a reload shows the same messages", async () => {
    const chatId = fresh("send");
    const chat = new TestChat({ id: chatId, transport: transport() });
    await chat.sendMessage({ text: "hello world", metadata: { from: "test" } });
    assert.equal(chat.status, "ready");
    assert.equal(chat.messages.length, 2);
    assert.equal(chat.messages[1].role, "assistant");
    assert.equal(textOf(chat.messages[1]), "echo: hello world");
    // The log: the user message as the transport stores it, then the agent's reply.
    const log = await stored(chatId);
    assert.equal(log[0].kind, "text");
    assert.deepEqual(log[0].content, { text: "hello world", id: chat.messages[0].id, parts: [{ type: "text", text: "hello world" }] });
    assert.deepEqual(log[0].metadata, { from: "test" });
    assert.equal(log[1].kind, "assistant");
    assert.equal(log[1].metadata.termination, "finish");
    // Reload: the history as UIMessage[] equals what the chat holds.
    const reloaded = await loadChatMessages({ url: base, userId: "alice", chatId });
    assert.deepEqual(plain(reloaded), plain(chat.messages));
    // A second turn.
    await chat.sendMessage({ text: "again" });
    assert.equal(textOf(chat.messages[3]), "echo: again");
    assert.deepEqual(plain(await loadChatMessages({ url: base, userId: "alice", chatId })), plain(chat.messages));
  });

  test("a reply sent as plain JSON (not streamed) reaches the chat as the stored message", async () => {
    const chatId = fresh("json");
    const chat = new TestChat({ id: chatId, transport: transport() });
    await chat.sendMessage({ text: "json please" });
    assert.equal(chat.status, "ready");
    assert.equal(chat.messages[1].id.startsWith("json-"), true);
    assert.equal(textOf(chat.messages[1]), "a plain reply");
    assert.deepEqual(plain(await loadChatMessages({ url: base, userId: "alice", chatId })), plain(chat.messages));
  });

  test("a reply whose start chunk names no id takes the stored id (syncChat)", async () => {
    const chatId = fresh("anon");
    const t1 = transport();
    const chat = new TestChat({ id: chatId, transport: t1 });
    const sync = syncChat(chat, t1);
    await chat.sendMessage({ text: "anon please" });
    const storedReply = await eventually(async () => (await stored(chatId)).find((m) => m.kind === "assistant"), "the stored reply");
    await chat.until((c) => c.messages[1]?.id === storedReply.content.id, "the chat to take the stored id");
    assert.equal(textOf(chat.messages[1]), "no id");
    assert.deepEqual(plain(chat.messages), plain(await loadChatMessages({ url: base, userId: "alice", chatId })));
    sync.stop();
  });

  test("a request's body and headers reach the agent in the message's metadata (fleetlm_request), never as HTTP headers", async () => {
    const chatId = fresh("options");
    const sentHeaders = [];
    const recording = (input, init) => {
      sentHeaders.push(Object.fromEntries(new Headers(init?.headers).entries()));
      return fetch(input, init);
    };
    const chat = new TestChat({ id: chatId, transport: transport({ fetch: recording }) });
    await chat.sendMessage(
      { text: "with options", metadata: { from: "test" } },
      { body: { model: "small", temperature: 0.2, nested: { a: [1, 2] } }, headers: { "X-Tenant": "acme", Accept: "text/plain" } },
    );
    assert.equal(chat.status, "ready", chat.error?.message);
    assert.equal(textOf(chat.messages[1]), "echo: with options");
    // The agent's call: the newest message carries them under one key; the user's metadata is intact.
    const call = requestsFor(chatId).at(-1).body;
    const newest = call.messages.at(-1);
    const expected = { body: { model: "small", temperature: 0.2, nested: { a: [1, 2] } }, headers: { "x-tenant": "acme", accept: "text/plain" } };
    assert.deepEqual(newest.metadata, { from: "test", fleetlm_request: expected });
    assert.deepEqual(requestOptions(newest.metadata), expected);
    // Not sent to the server as HTTP headers.
    assert.ok(sentHeaders.length > 0, "the transport made REST calls through the given fetch");
    for (const headers of sentHeaders) assert.equal(headers["x-tenant"], undefined);
    // Not part of the UI message: a reload equals the chat.
    assert.deepEqual(chat.messages[0].metadata, { from: "test" });
    assert.deepEqual(plain(await loadChatMessages({ url: base, userId: "alice", chatId })), plain(chat.messages));
    // A send without them carries none.
    await chat.sendMessage({ text: "no options" });
    assert.equal(requestsFor(chatId).at(-1).body.messages.at(-1).metadata.fleetlm_request, undefined);
  });

  test("an agent that cannot be reached: the chat shows the failure's sentence, without its address", async () => {
    await registerAgent(base, "http://127.0.0.1:9", { id: "unreachable" });
    const chatId = fresh("down");
    const chat = new TestChat({ id: chatId, transport: transport({ agentId: "unreachable" }) });
    await chat.sendMessage({ text: "anyone?" });
    assert.equal(chat.status, "error");
    assert.equal(chat.error.message, "connection refused");
    assert.equal(chat.messages.length, 1, "no assistant message");
  });

  test("a retried send of the same message is stored once", async () => {
    const chatId = fresh("retry");
    const t = transport();
    const message = { id: "user-msg-1", role: "user", parts: [{ type: "text", text: "once" }] };
    const first = await t.sendMessages({ trigger: "submit-message", chatId, messageId: undefined, messages: [message], abortSignal: undefined });
    for await (const _ of first);
    await t.sendMessages({ trigger: "submit-message", chatId, messageId: undefined, messages: [message], abortSignal: undefined });
    const log = await stored(chatId);
    assert.equal(log.filter((m) => m.kind === "text").length, 1);
  });

  test("without agentId an unknown chat id is refused; loadChatMessages of it is []", async () => {
    const chat = new TestChat({ id: fresh("unknown"), transport: transport({ agentId: undefined }) });
    await chat.sendMessage({ text: "hi" });
    assert.equal(chat.status, "error");
    assert.match(chat.error.message, /not found/);
    assert.deepEqual(await loadChatMessages({ url: base, userId: "alice", chatId: "never-created" }), []);
  });

  test("reconnectToStream: a reloaded chat resumes a reply mid-stream from its first chunk, no part twice", async (t) => {
    needs(t, features.resume, "stream snapshot chunks");
    const chatId = fresh("resume");
    const first = new TestChat({ id: chatId, transport: transport() });
    const sending = first.sendMessage({ text: "slow reply please" });
    await first.until((c) => textOf(c.messages.at(-1) ?? { parts: [] }).includes("w5 "), "the reply to start");
    // "Reload": a new page with a new transport and socket, the history loaded, then resume.
    const messages = await loadChatMessages({ url: base, userId: "alice", chatId });
    assert.deepEqual(messages.map((m) => m.role), ["user"], "the reply is not stored yet");
    const second = new TestChat({ id: chatId, transport: transport(), messages });
    await second.resumeStream();
    await sending;
    assert.equal(second.status, "ready");
    assert.equal(second.messages.length, 2);
    assert.equal(textOf(second.messages[1]), SLOW_TEXT, "every word once, in order");
    assert.deepEqual(plain(second.messages), plain(first.messages));
    assert.deepEqual(plain(await loadChatMessages({ url: base, userId: "alice", chatId })), plain(second.messages));
    // Nothing streaming any more: reconnect answers null and the chat stays ready.
    const third = new TestChat({ id: chatId, transport: transport(), messages: second.messages });
    await third.resumeStream();
    assert.equal(third.status, "ready");
    assert.equal(third.messages.length, 2);
  });

  test("stop() on a resumed reply (after a reload) cancels it on the server", async (t) => {
    needs(t, features.cancel, "cancel");
    const chatId = fresh("resume-stop");
    const first = new TestChat({ id: chatId, transport: transport() });
    const sending = first.sendMessage({ text: "slow, then reload and stop" });
    await first.until((c) => textOf(c.messages.at(-1) ?? { parts: [] }).includes("w3 "), "the reply to start");
    const second = new TestChat({ id: chatId, transport: transport(), messages: await loadChatMessages({ url: base, userId: "alice", chatId }) });
    const resuming = second.resumeStream();
    await second.until((c) => c.messages.length === 2 && textOf(c.messages[1]).includes("w5 "), "the resumed reply");
    await second.stop();
    await resuming;
    await sending;
    const request = await eventually(() => requestsFor(chatId).find((r) => r.aborted), "the agent's request to be aborted");
    assert.equal(request.finished, false);
    const reply = await eventually(async () => (await stored(chatId)).find((m) => m.kind === "assistant"), "the stored reply");
    assert.equal(reply.metadata.termination, "abort");
    // The first tab's request ended with the abort too.
    assert.equal(first.status, "ready");
  });

  test("a socket drop mid-stream loses and duplicates nothing", async (t) => {
    needs(t, features.resume, "chunk indexes");
    const chatId = fresh("drop");
    const client = new FleetLMClient({ url: base, userId: "alice", WebSocket, reconnectAfterMs: () => 300 });
    clients.push(client);
    const chat = new TestChat({ id: chatId, transport: transport({ client }) });
    const sending = chat.sendMessage({ text: "slow with a drop" });
    await chat.until((c) => textOf(c.messages.at(-1) ?? { parts: [] }).includes("w3 "), "the reply to start");
    (await client.socket()).conn.close();
    await sending;
    assert.equal(textOf(chat.messages[1]), SLOW_TEXT);
    assert.deepEqual(plain(await loadChatMessages({ url: base, userId: "alice", chatId })), plain(chat.messages));
  });

  test("a reply that finishes while the socket is down does not leave the chat streaming", async (t) => {
    needs(t, features.resume, "the join's stream field");
    const chatId = fresh("outage");
    const client = new FleetLMClient({ url: base, userId: "alice", WebSocket, reconnectAfterMs: () => 3500 });
    clients.push(client);
    const t1 = transport({ client });
    const chat = new TestChat({ id: chatId, transport: t1 });
    const sync = syncChat(chat, t1);
    const sending = chat.sendMessage({ text: "slow through an outage" });
    await chat.until((c) => textOf(c.messages.at(-1) ?? { parts: [] }).includes("w3 "), "the reply to start");
    (await client.socket()).conn.close();
    await sending; // ends once the rejoin shows the reply is over
    await chat.until((c) => c.status === "ready" && textOf(c.messages[1]) === SLOW_TEXT, "the stored reply to replace the partial one", 15000);
    assert.deepEqual(plain(chat.messages), plain(await loadChatMessages({ url: base, userId: "alice", chatId })));
    sync.stop();
  });

  test("stop(): the agent's request is aborted and the stored reply says abort", async (t) => {
    needs(t, features.cancel, "cancel");
    const chatId = fresh("stop");
    const chat = new TestChat({ id: chatId, transport: transport() });
    const sending = chat.sendMessage({ text: "slow then stop" });
    await chat.until((c) => textOf(c.messages.at(-1) ?? { parts: [] }).includes("w3 "), "the reply to start");
    await chat.stop();
    await sending;
    assert.equal(chat.status, "ready");
    const request = await eventually(() => requestsFor(chatId).find((r) => r.aborted), "the agent's request to be aborted");
    assert.equal(request.finished, false);
    const reply = await eventually(async () => (await stored(chatId)).find((m) => m.kind === "assistant"), "the stored partial reply");
    assert.equal(reply.metadata.termination, "abort");
    assert.ok(SLOW_TEXT.startsWith(textOf(reply.content)));
    // The turn counts as answered: no second call; a later message dispatches normally.
    await sleep(500);
    assert.equal(requestsFor(chatId).length, 1);
    await chat.sendMessage({ text: "after stop" });
    assert.equal(textOf(chat.messages.at(-1)), "echo: after stop");
  });

  test("stop() before the reply started (debounce): the agent is never called for that turn", async (t) => {
    needs(t, features.cancel, "cancel");
    await registerAgent(base, agent.origin, { id: "patient", debounce: 1500 });
    const chatId = fresh("early-stop");
    const chat = new TestChat({ id: chatId, transport: transport({ agentId: "patient" }) });
    const sending = chat.sendMessage({ text: "never mind" });
    await chat.until((c) => c.status === "submitted", "the send");
    await eventually(async () => (await stored(chatId))?.length === 1, "the message to be stored");
    await chat.stop();
    await sending;
    assert.equal(chat.status, "ready");
    const session = await eventually(async () => {
      const body = (await rest(base, "GET", `/api/sessions/${chatId}`)).body;
      return body.session.agent_status?.status === "cancelled" && body.session;
    }, "agent_status cancelled");
    assert.ok(session.agent_status.dispatch_id);
    await sleep(2500);
    assert.equal(requestsFor(chatId).length, 0, "the agent was not called");
    assert.deepEqual((await stored(chatId)).map((m) => m.kind), ["text"]);
  });

  test("regenerate: the agent answers the same turn again; the old reply is gone after a reload", async (t) => {
    needs(t, features.regenerate, "regenerate");
    const chatId = fresh("regen");
    const chat = new TestChat({ id: chatId, transport: transport() });
    await chat.sendMessage({ text: "say something" });
    const firstReply = chat.messages[1];
    await chat.regenerate();
    assert.equal(chat.status, "ready");
    assert.equal(chat.messages.length, 2);
    assert.notEqual(chat.messages[1].id, firstReply.id);
    assert.equal(textOf(chat.messages[1]), "echo: say something");
    const log = await stored(chatId);
    const regenerate = log.find((m) => m.kind === "regenerate");
    assert.ok(regenerate, "a regenerate message is in the log");
    const second = log.filter((m) => m.kind === "assistant").at(-1);
    assert.equal(second.metadata.replaces, log.find((m) => m.kind === "assistant").id);
    // The agent saw the branch ending in the user's turn (no superseded reply, no regenerate).
    const lastRequest = requestsFor(chatId).at(-1);
    assert.deepEqual(lastRequest.body.messages.map((m) => m.kind), ["text"]);
    assert.deepEqual(plain(await loadChatMessages({ url: base, userId: "alice", chatId })), plain(chat.messages));
  });

  test("regenerate from a chat that holds only the user message (a second device): the new reply streams into it", async (t) => {
    needs(t, features.regenerate, "regenerate");
    const chatId = fresh("regen-user");
    const first = new TestChat({ id: chatId, transport: transport() });
    await first.sendMessage({ text: "slow answer me" });
    const firstReply = first.messages[1];
    // Another device that has only the user's turn (its reply failed there, or was never loaded).
    const userOnly = (await loadChatMessages({ url: base, userId: "alice", chatId })).slice(0, 1);
    const second = new TestChat({ id: chatId, transport: transport(), messages: userOnly });
    await second.regenerate();
    assert.equal(second.status, "ready", second.error?.message);
    assert.equal(second.messages.length, 2);
    assert.equal(second.messages[1].role, "assistant");
    assert.notEqual(second.messages[1].id, firstReply.id);
    assert.equal(textOf(second.messages[1]), SLOW_TEXT);
    const log = await stored(chatId);
    assert.equal(log.filter((m) => m.kind === "assistant").length, 2);
    assert.deepEqual(plain(await loadChatMessages({ url: base, userId: "alice", chatId })), plain(second.messages));
  });

  test("regenerate({ messageId: <the user message> }) answers that turn again and replaces its reply (not the user message)", async (t) => {
    needs(t, features.regenerate, "regenerate");
    const chatId = fresh("regen-user-id");
    const chat = new TestChat({ id: chatId, transport: transport() });
    await chat.sendMessage({ text: "again please" });
    const firstStored = (await stored(chatId)).find((m) => m.kind === "assistant");
    chat.messages = chat.messages.slice(0, 1);
    await chat.regenerate({ messageId: chat.messages[0].id });
    assert.equal(chat.status, "ready", chat.error?.message);
    assert.equal(chat.messages.length, 2);
    assert.equal(textOf(chat.messages[1]), "echo: again please");
    const log = await stored(chatId);
    const regenerate = log.find((m) => m.kind === "regenerate");
    assert.equal(regenerate.content.message_id, undefined, "no user message named as the reply to replace");
    assert.equal(log.filter((m) => m.kind === "assistant").at(-1).metadata.replaces, firstStored.id);
    assert.deepEqual(plain(await loadChatMessages({ url: base, userId: "alice", chatId })), plain(chat.messages));
  });

  test("regenerate after a failed reply (the chat holds only the user message): the new reply streams in", async (t) => {
    needs(t, features.regenerate, "regenerate");
    const chatId = fresh("regen-failed");
    const chat = new TestChat({ id: chatId, transport: transport() });
    await chat.sendMessage({ text: "echo once" });
    // As if the reply had failed here: the chat shows only the user's turn.
    chat.messages = chat.messages.slice(0, 1);
    await chat.regenerate();
    assert.equal(chat.status, "ready", chat.error?.message);
    assert.equal(chat.messages.length, 2);
    assert.equal(textOf(chat.messages[1]), "echo: echo once");
    assert.deepEqual(plain(await loadChatMessages({ url: base, userId: "alice", chatId })), plain(chat.messages));
  });

  test("tool approval round trip: approval flows through the log to the agent, the same message continues", { skip: !APPROVALS && "ai 5 has no tool approvals" }, async () => {
    const chatId = fresh("approve");
    const chat = new TestChat({
      id: chatId,
      transport: transport(),
      sendAutomaticallyWhen: ai.lastAssistantMessageIsCompleteWithApprovalResponses,
    });
    await chat.sendMessage({ text: "approve report.pdf" });
    const tool = chat.messages[1].parts.find((p) => p.type === "tool-deleteFile");
    assert.equal(tool.state, "approval-requested");
    await chat.addToolApprovalResponse({ id: tool.approval.id, approved: true });
    await chat.until((c) => c.status === "ready" && textOf(c.messages.at(-1)) === "Deleted report.pdf.", "the continuation");
    assert.equal(chat.messages.length, 2, "the reply continued the same message");
    const log = await stored(chatId);
    const toolResult = log.find((m) => m.kind === "tool_result");
    assert.equal(toolResult.content.message_id, chat.messages[1].id);
    assert.equal(toolResult.content.parts[0].state, "approval-responded");
    assert.equal(toolResult.content.parts[0].approval.approved, true);
    const request = requestsFor(chatId).at(-1);
    assert.equal(request.body.messages.at(-1).kind, "tool_result");
    assert.deepEqual(plain(await loadChatMessages({ url: base, userId: "alice", chatId })), plain(chat.messages));
  });

  test("client-side tool output (addToolOutput) reaches the agent", async () => {
    const chatId = fresh("ask");
    const chat = new TestChat({
      id: chatId,
      transport: transport(),
      sendAutomaticallyWhen: ai.lastAssistantMessageIsCompleteWithToolCalls,
    });
    await chat.sendMessage({ text: "ask me" });
    const tool = chat.messages[1].parts.find((p) => p.type === "tool-askColor");
    assert.equal(tool.state, "input-available");
    await chat.addToolOutput({ tool: "askColor", toolCallId: tool.toolCallId, output: "blue" });
    await chat.until((c) => c.status === "ready" && textOf(c.messages.at(-1)) === "You chose blue.", "the continuation");
    assert.deepEqual(plain(await loadChatMessages({ url: base, userId: "alice", chatId })), plain(chat.messages));
  });

  test("two chats on one session stay in sync (another tab, the agent writing by REST)", async () => {
    const chatId = fresh("tabs");
    const [transportA, transportB] = [transport(), transport()];
    const tabA = new TestChat({ id: chatId, transport: transportA });
    const tabB = new TestChat({ id: chatId, transport: transportB });
    await tabA.sendMessage({ text: "first" });
    const syncA = syncChat(tabA, transportA);
    const syncB = syncChat(tabB, transportB);
    await Promise.all([syncA.ready, syncB.ready]);
    // B caught up with what A wrote before it subscribed.
    await tabB.until((c) => c.messages.length === 2, "the catch-up");
    assert.deepEqual(plain(tabB.messages), plain(tabA.messages));
    // A sends; B sees the user message and the reply stream in.
    await tabA.sendMessage({ text: "slow from A" });
    await tabB.until((c) => c.status === "ready" && c.messages.length === 4 && textOf(c.messages[3]) === SLOW_TEXT, "B to follow A's reply");
    // B sends; A follows.
    await tabB.sendMessage({ text: "from B" });
    await tabA.until((c) => c.status === "ready" && c.messages.length === 6 && textOf(c.messages[5]) === "echo: from B", "A to follow B");
    // The agent writes by REST.
    const written = await rest(base, "POST", `/api/sessions/${chatId}/messages`, { agent_id: "bot", content: { text: "a note from the agent" } });
    assert.equal(written.status, 200);
    await tabA.until((c) => c.messages.length === 7, "A to get the agent's note");
    await tabB.until((c) => c.messages.length === 7, "B to get the agent's note");
    assert.deepEqual(plain(tabA.messages), plain(tabB.messages));
    assert.equal(textOf(tabA.messages[6]), "a note from the agent");
    assert.deepEqual(plain(await loadChatMessages({ url: base, userId: "alice", chatId })), plain(tabA.messages));
    // B regenerates: both agent messages after B's turn are superseded, in both tabs; the new
    // reply streams into both.
    if (features.regenerate) {
      const before = tabA.messages[5].id;
      await tabB.regenerate();
      await tabB.until((c) => c.status === "ready" && c.messages.length === 6 && textOf(c.messages[5]) === "echo: from B" && c.messages[5].id !== before, "B's regenerated reply");
      await tabA.until((c) => c.status === "ready" && c.messages.length === 6 && c.messages[5].id === tabB.messages[5].id, "A to follow the regeneration");
      assert.deepEqual(plain(tabA.messages), plain(tabB.messages));
      assert.deepEqual(plain(await loadChatMessages({ url: base, userId: "alice", chatId })), plain(tabB.messages));
    }
    syncA.stop();
    syncB.stop();
  });
});

describe("token mode", () => {
  test("the transport and loadChatMessages work with a user's token", async () => {
    const tokenBase = await startServer({ FLEETLM_AUTH_SECRET: "a-test-secret-of-32-bytes-length!", FLEETLM_API_KEY: "admin-key" });
    await registerAgent(tokenBase, agent.origin, { id: "bot", apiKey: "admin-key" });
    const token = (await rest(tokenBase, "POST", "/api/tokens", { sub: "tom", ttl_seconds: 600 }, "admin-key")).body.token;
    const chatId = fresh("token");
    const t = new FleetLMChatTransport({ url: tokenBase, token, agentId: "bot", WebSocket });
    transports.push(t);
    const chat = new TestChat({ id: chatId, transport: t });
    await chat.sendMessage({ text: "with a token" });
    assert.equal(textOf(chat.messages[1]), "echo: with a token");
    assert.deepEqual(plain(await loadChatMessages({ url: tokenBase, token, chatId })), plain(chat.messages));
    // Another user's token may not read it.
    const other = (await rest(tokenBase, "POST", "/api/tokens", { sub: "eve", ttl_seconds: 600 }, "admin-key")).body.token;
    await assert.rejects(loadChatMessages({ url: tokenBase, token: other, chatId }), (error) => error.status === 403);
  });
});
