// What `useFleetLMChat` relies on, with the AI SDK's own chat machinery against a real server and
// agent: callbacks kept current, `dispose()` of one chat not closing the transport every chat
// shares, client-side tools run only in the tab that started the reply.
import assert from "node:assert/strict";
import { createServer } from "node:http";
import { after, before, describe, test } from "node:test";
import WebSocket from "ws";
import * as ai from "ai";
import { FleetLMChatTransport, latestCallbacks, loadChatMessages, syncChat } from "@fleetlm/ai-sdk";
import { TestChat, plain, registerAgent, rest, sleep, startAgent, startServer, stopAll } from "../../test-support/harness.mjs";

let base;
let counter = 0;
const fresh = (prefix) => `${prefix}-${++counter}-${Date.now()}`;
const transports = [];
function transport(options = {}) {
  const t = new FleetLMChatTransport({ url: base, userId: "alice", agentId: "bot", WebSocket, ...options });
  transports.push(t);
  return t;
}
const textOf = (message) => message.parts.filter((p) => p.type === "text").map((p) => p.text).join("");
// Tool approvals came with ai 6 (release/ai-majors.test.mjs also runs this file with ai 5).
const APPROVALS = typeof ai.lastAssistantMessageIsCompleteWithApprovalResponses === "function";

/**
 * An agent whose client-side tool call streams slowly (so a second tab follows it live): a
 * `askColor` call without output; after the `tool_result`, "You chose <output>." in the same message.
 */
async function startSlowToolAgent() {
  let replies = 0;
  const server = createServer((request, response) => {
    let raw = "";
    request.on("data", (chunk) => (raw += chunk));
    request.on("end", async () => {
      const body = JSON.parse(raw);
      const last = body.messages.at(-1);
      const reply = ++replies;
      response.writeHead(200, { "content-type": "application/x-ndjson" });
      const send = async (chunk, delay = 0) => {
        response.write(JSON.stringify(chunk) + "\n");
        if (delay) await sleep(delay);
      };
      if (last?.kind === "tool_result") {
        await send({ type: "start", messageId: last.content.message_id });
        await send({ type: "start-step" });
        await send({ type: "text-start", id: "c" });
        await send({ type: "text-delta", id: "c", delta: `You chose ${last.content.parts[0].output}.` }, 20);
        await send({ type: "text-end", id: "c" });
      } else {
        await send({ type: "start", messageId: `slow-ask-${reply}` }, 300);
        await send({ type: "start-step" });
        await send({ type: "tool-input-start", toolCallId: `call-${reply}`, toolName: "askColor" }, 300);
        await send({ type: "tool-input-available", toolCallId: `call-${reply}`, toolName: "askColor", input: { question: "Which color?" } }, 300);
      }
      await send({ type: "finish-step" });
      await send({ type: "finish" });
      response.end();
    });
  });
  await new Promise((resolve) => server.listen(0, "127.0.0.1", resolve));
  servers.push(server);
  return `http://127.0.0.1:${server.address().port}`;
}
const servers = [];

/**
 * An agent whose continuation after an approval streams slowly (time to reload mid-stream): a
 * `deleteFile` call that needs approval; after the `tool_result`, 20 words 50 ms apart in the
 * same message.
 */
async function startSlowContinuationAgent() {
  let replies = 0;
  const server = createServer((request, response) => {
    let raw = "";
    request.on("data", (chunk) => (raw += chunk));
    request.on("end", async () => {
      const body = JSON.parse(raw);
      const last = body.messages.at(-1);
      const reply = ++replies;
      response.writeHead(200, { "content-type": "application/x-ndjson" });
      let closed = false;
      response.on("close", () => (closed = true));
      const send = async (chunk, delay = 0) => {
        if (closed) return;
        response.write(JSON.stringify(chunk) + "\n");
        if (delay) await sleep(delay);
      };
      if (last?.kind === "tool_result") {
        await send({ type: "start", messageId: last.content.message_id });
        await send({ type: "start-step" });
        await send({ type: "text-start", id: "c" });
        for (let i = 0; i < 20; i++) await send({ type: "text-delta", id: "c", delta: `d${i} ` }, 50);
        await send({ type: "text-end", id: "c" });
      } else {
        await send({ type: "start", messageId: `slow-approve-${reply}` });
        await send({ type: "start-step" });
        await send({ type: "tool-input-available", toolCallId: `call-${reply}`, toolName: "deleteFile", input: { file: "a.txt" } });
        await send({ type: "tool-approval-request", approvalId: `approval-${reply}`, toolCallId: `call-${reply}` });
      }
      await send({ type: "finish-step" });
      await send({ type: "finish" });
      response.end();
    });
  });
  await new Promise((resolve) => server.listen(0, "127.0.0.1", resolve));
  servers.push(server);
  return `http://127.0.0.1:${server.address().port}`;
}
const CONTINUED = Array.from({ length: 20 }, (_, i) => `d${i} `).join("");

before(async () => {
  base = await startServer();
  const agent = await startAgent();
  await registerAgent(base, agent.origin, { id: "bot" });
  await registerAgent(base, await startSlowToolAgent(), { id: "tools" });
  await registerAgent(base, await startSlowContinuationAgent(), { id: "slow-approver" });
});

after(async () => {
  for (const t of transports) t.close({ force: true });
  for (const server of servers) {
    server.closeAllConnections();
    server.close();
  }
  await stopAll();
});

describe("chat lifecycle", () => {
  test("latestCallbacks: the chat calls the callbacks of the latest render, not the first", async () => {
    const calls = [];
    const latest = { current: { onFinish: () => calls.push("first") } };
    const chat = new TestChat({ id: fresh("callbacks"), transport: transport(), ...latestCallbacks(latest) });
    await chat.sendMessage({ text: "one" });
    // A re-render with new callbacks (e.g. closing over new state).
    latest.current = { onFinish: ({ message }) => calls.push(`second: ${textOf(message)}`) };
    await chat.sendMessage({ text: "two" });
    latest.current = {};
    await chat.sendMessage({ text: "three" });
    assert.deepEqual(calls, ["first", "second: echo: two"]);
    assert.equal(chat.status, "ready");
  });

  test("dispose() of one chat does not close the transport the other chats share", async () => {
    const shared = transport();
    const kept = new TestChat({ id: fresh("kept"), transport: shared });
    await kept.sendMessage({ text: "first" });
    const sync = syncChat(kept, shared);
    await sync.ready;
    const gone = new TestChat({ id: fresh("gone"), transport: shared });
    await gone.sendMessage({ text: "short-lived" });
    // ai 7's dispose() is stop() then transport.close(); ai 5 and 6 have no dispose(): do the same.
    if (typeof gone.dispose === "function") await gone.dispose();
    else {
      await gone.stop();
      shared.close();
    }
    // The other chat still follows its session: another tab's turn appears, its reply streams in.
    const tab = new TestChat({ id: kept.id, transport: transport() });
    await tab.sendMessage({ text: "from another tab" });
    await kept.until((c) => c.status === "ready" && c.messages.length === 4 && textOf(c.messages[3]) === "echo: from another tab", "the kept chat to follow");
    // And it still sends.
    await kept.sendMessage({ text: "still here" });
    assert.equal(textOf(kept.messages.at(-1)), "echo: still here");
    // The disposed chat's session is joined again when a chat uses it.
    const again = new TestChat({ id: gone.id, transport: shared, messages: gone.messages });
    await again.sendMessage({ text: "back" });
    assert.equal(textOf(again.messages.at(-1)), "echo: back");
    sync.stop();
  });

  test("a client-side tool runs only in the tab that started the reply, not in the tab following it", async () => {
    const chatId = fresh("tool-tabs");
    const ran = { A: [], B: [] };
    const seen = { A: [], B: [] };
    const tab = (name) => {
      const t = transport({ agentId: "tools" });
      const chat = new TestChat({
        id: chatId,
        transport: t,
        sendAutomaticallyWhen: ai.lastAssistantMessageIsCompleteWithToolCalls,
        onToolCall: ({ toolCall }) => {
          ran[name].push(toolCall.toolCallId);
          if (name === "A") void chat.addToolOutput({ tool: toolCall.toolName, toolCallId: toolCall.toolCallId, output: "blue" });
        },
      });
      // Every message the chat's stream produced (a later stream may replace it).
      const { pushMessage, replaceMessage } = chat.state;
      chat.state.pushMessage = function (message) {
        seen[name].push(structuredClone(message));
        return pushMessage.call(this, message);
      };
      chat.state.replaceMessage = function (index, message) {
        seen[name].push(structuredClone(message));
        return replaceMessage.call(this, index, message);
      };
      return { chat, sync: syncChat(chat, t) };
    };
    // The session exists before B subscribes (B follows what A starts).
    await rest(base, "POST", "/api/sessions", { id: chatId, user_id: "alice", agent_id: "tools" });
    const a = tab("A");
    const b = tab("B");
    await Promise.all([a.sync.ready, b.sync.ready]);
    await a.chat.sendMessage({ text: "ask me" });
    await a.chat.until((c) => c.status === "ready" && textOf(c.messages.at(-1)) === "You chose blue.", "A's continuation");
    await b.chat.until((c) => c.status === "ready" && textOf(c.messages.at(-1) ?? { parts: [] }) === "You chose blue.", "B to follow");
    // B followed A's reply with the tool call (and then the continuation).
    assert.ok(seen.B.some((m) => m.parts.some((p) => p.type === "tool-askColor")), "B streamed the tool call");
    await sleep(200);
    assert.equal(ran.A.length, 1, "A ran the tool once");
    assert.deepEqual(ran.B, [], "B did not run it");
    // B ends up with what A shows: the tool call with its output, and the continuation (not the
    // continuation alone), as a reload does.
    assert.deepEqual(plain(b.chat.messages), plain(a.chat.messages));
    assert.deepEqual(plain(await loadChatMessages({ url: base, userId: "alice", chatId })), plain(a.chat.messages));
    a.sync.stop();
    b.sync.stop();
  });

  test("a tab following a reply with a tool approval shows the tool part and the continued text, as the tab that answered it", { skip: !APPROVALS && "ai 5 has no tool approvals" }, async () => {
    const chatId = fresh("approval-tabs");
    await rest(base, "POST", "/api/sessions", { id: chatId, user_id: "alice", agent_id: "bot" });
    const tab = () => {
      const t = transport();
      const chat = new TestChat({ id: chatId, transport: t, sendAutomaticallyWhen: ai.lastAssistantMessageIsCompleteWithApprovalResponses });
      // Every version of a message the chat's streams wrote.
      const seen = [];
      const { pushMessage, replaceMessage } = chat.state;
      chat.state.pushMessage = function (message) {
        seen.push(structuredClone(message));
        return pushMessage.call(this, message);
      };
      chat.state.replaceMessage = function (index, message) {
        seen.push(structuredClone(message));
        return replaceMessage.call(this, index, message);
      };
      return { chat, seen, sync: syncChat(chat, t) };
    };
    const a = tab();
    const b = tab();
    await Promise.all([a.sync.ready, b.sync.ready]);
    await a.chat.sendMessage({ text: "approve report.pdf" });
    const tool = a.chat.messages[1].parts.find((p) => p.type === "tool-deleteFile");
    assert.equal(tool.state, "approval-requested");
    // B follows the reply up to the approval request.
    await b.chat.until((c) => c.status === "ready" && c.messages[1]?.parts.some((p) => p.type === "tool-deleteFile" && p.state === "approval-requested"), "B to show the approval request");
    await a.chat.addToolApprovalResponse({ id: tool.approval.id, approved: true });
    await a.chat.until((c) => c.status === "ready" && textOf(c.messages.at(-1)) === "Deleted report.pdf.", "A's continuation");
    await b.chat.until((c) => c.status === "ready" && textOf(c.messages.at(-1) ?? { parts: [] }) === "Deleted report.pdf.", "B to follow the continuation");
    await sleep(300);
    assert.equal(a.chat.messages.length, 2);
    const parts = (chat) => chat.messages[1].parts.map((p) => p.state ? `${p.type}:${p.state}` : p.type);
    assert.deepEqual(parts(b.chat), parts(a.chat), "B shows the tool part and the continuation");
    assert.deepEqual(plain(b.chat.messages), plain(a.chat.messages));
    assert.deepEqual(plain(await loadChatMessages({ url: base, userId: "alice", chatId })), plain(a.chat.messages));
    // While the continuation streamed in, B never showed it without the tool part.
    const streamed = b.seen.filter((m) => m.id === a.chat.messages[1].id && textOf(m) !== "");
    assert.ok(streamed.length > 0, "B streamed the continuation");
    for (const m of streamed) assert.ok(m.parts.some((p) => p.type === "tool-deleteFile"), `B showed ${JSON.stringify(m.parts)}`);
    a.sync.stop();
    b.sync.stop();
  });

  test("a tab that does not follow streams gets the continuation after an approval from the stored messages: the tool part and the continued text", { skip: !APPROVALS && "ai 5 has no tool approvals" }, async () => {
    const chatId = fresh("approval-stored");
    await rest(base, "POST", "/api/sessions", { id: chatId, user_id: "alice", agent_id: "bot" });
    const tA = transport();
    const tB = transport();
    const a = new TestChat({ id: chatId, transport: tA, sendAutomaticallyWhen: ai.lastAssistantMessageIsCompleteWithApprovalResponses });
    const b = new TestChat({ id: chatId, transport: tB, sendAutomaticallyWhen: ai.lastAssistantMessageIsCompleteWithApprovalResponses });
    const syncA = syncChat(a, tA);
    // As a tab that missed the live stream (a fast reply, a dropped socket): only stored messages.
    const syncB = syncChat(b, tB, { followRemoteStreams: false });
    await Promise.all([syncA.ready, syncB.ready]);
    await a.sendMessage({ text: "approve notes.txt" });
    const tool = a.messages[1].parts.find((p) => p.type === "tool-deleteFile");
    await b.until((c) => c.messages[1]?.parts.some((p) => p.type === "tool-deleteFile"), "B to get the stored tool call");
    await a.addToolApprovalResponse({ id: tool.approval.id, approved: false });
    await a.until((c) => c.status === "ready" && textOf(c.messages.at(-1)) === "Not deleted.", "A's continuation");
    await b.until((c) => textOf(c.messages.at(-1) ?? { parts: [] }) === "Not deleted.", "B to get the stored continuation");
    assert.deepEqual(plain(b.messages), plain(a.messages));
    assert.deepEqual(plain(await loadChatMessages({ url: base, userId: "alice", chatId })), plain(a.messages));
    syncA.stop();
    syncB.stop();
  });

  test("a tab reloaded while a continuation after an approval streams resumes it and shows the tool part and the continued text", { skip: !APPROVALS && "ai 5 has no tool approvals" }, async () => {
    const chatId = fresh("approval-reload");
    const tA = transport({ agentId: "slow-approver" });
    const a = new TestChat({ id: chatId, transport: tA, sendAutomaticallyWhen: ai.lastAssistantMessageIsCompleteWithApprovalResponses });
    const syncA = syncChat(a, tA);
    await a.sendMessage({ text: "approve a.txt" });
    const tool = a.messages[1].parts.find((p) => p.type === "tool-deleteFile");
    await a.addToolApprovalResponse({ id: tool.approval.id, approved: true });
    await a.until((c) => textOf(c.messages.at(-1)).includes("d3 "), "the continuation to stream");
    // "Reload": the history (the message up to the approval), then resume as useFleetLMChat does.
    const loaded = await loadChatMessages({ url: base, userId: "alice", chatId });
    assert.deepEqual(loaded.map((m) => m.role), ["user", "assistant"]);
    assert.ok(loaded[1].parts.some((p) => p.type === "tool-deleteFile" && p.state === "approval-responded"));
    const tB = transport({ agentId: "slow-approver" });
    const b = new TestChat({ id: chatId, transport: tB, messages: loaded, sendAutomaticallyWhen: ai.lastAssistantMessageIsCompleteWithApprovalResponses });
    const seen = [];
    const { replaceMessage } = b.state;
    b.state.replaceMessage = function (index, message) {
      seen.push(structuredClone(message));
      return replaceMessage.call(this, index, message);
    };
    const resuming = b.resumeStream();
    const syncB = syncChat(b, tB);
    await resuming;
    await a.until((c) => c.status === "ready" && textOf(c.messages.at(-1)) === CONTINUED, "A's continuation");
    await b.until((c) => c.status === "ready" && textOf(c.messages.at(-1) ?? { parts: [] }) === CONTINUED && c.messages[1].parts.some((p) => p.type === "tool-deleteFile"), "B to end with the whole message");
    assert.deepEqual(plain(b.messages), plain(a.messages));
    assert.deepEqual(plain(await loadChatMessages({ url: base, userId: "alice", chatId })), plain(a.messages));
    // While it resumed, B never showed the continuation without the tool part.
    const streamed = seen.filter((m) => m.id === a.messages[1].id && textOf(m) !== "");
    assert.ok(streamed.length > 0, "B streamed the continuation");
    for (const m of streamed) assert.ok(m.parts.some((p) => p.type === "tool-deleteFile"), `B showed ${JSON.stringify(m.parts)}`);
    syncA.stop();
    syncB.stop();
  });
});
