// History page by page (loadChatPage, loadChatMessages({ limit }), historyPageStart): the pages a
// user loads, put together, are exactly the whole history's UIMessage[] — for every page size,
// over a real history (tool calls, approvals, client tool outputs, continuations, regenerations,
// an edited message, agent text written by REST) created through a real server and agent.
import assert from "node:assert/strict";
import { after, before, describe, test } from "node:test";
import WebSocket from "ws";
import * as ai from "ai";
import { FleetLMChatTransport, historyPageStart, historyToUIMessages, loadChatMessages, loadChatPage } from "@fleetlm/ai-sdk";
import { TestChat, plain, registerAgent, rest, startAgent, startServer, stopAll } from "../../test-support/harness.mjs";

// Tool approvals came with ai 6 (release/ai-majors.test.mjs also runs this file with ai 5).
const APPROVALS = typeof ai.lastAssistantMessageIsCompleteWithApprovalResponses === "function";
const textOf = (message) => message.parts.filter((p) => p.type === "text").map((p) => p.text).join("");

/** Every page of a history, newest first, with `load(before)` → `{messages, before}`. */
async function allPages(load) {
  const pages = [];
  let before;
  do {
    const page = await load(before);
    pages.push(page);
    before = page.before;
    assert.ok(pages.length < 1000, "paging ends");
  } while (before !== null);
  return pages;
}

/** Checks the pages of one page size against the whole history's conversion. */
function checkPages(pages, whole, limit, what) {
  const joined = pages.toReversed().flatMap((page) => page.messages);
  assert.deepEqual(plain(joined), plain(whole), `${what}: the pages put together (limit ${limit})`);
  for (const [i, page] of pages.entries()) {
    const first = i === pages.length - 1;
    if (!first) {
      assert.ok(page.messages.length >= limit, `${what}: page ${i} holds at least ${limit} UI messages (limit ${limit})`);
      assert.equal(page.messages[0]?.role, "user", `${what}: page ${i} begins with a user turn (limit ${limit})`);
    }
  }
}

describe("historyPageStart (pure)", () => {
  let seq = 0;
  const user = (kind, content) => ({ id: `f${++seq}`, seq, sender_id: "alice", kind, content, metadata: {} });
  const turn = (id, text) => user("text", { text, id, parts: [{ type: "text", text }] });
  const reply = (id, parts, metadata = {}) => ({
    id: `f${++seq}`,
    seq,
    sender_id: "bot",
    kind: "assistant",
    content: { id, role: "assistant", parts },
    metadata: { termination: "finish", dispatch_id: "d", ...metadata },
  });
  const text = (t) => ({ type: "text", text: t, state: "done" });
  const call = { type: "tool-deleteFile", toolCallId: "c1", state: "approval-requested", input: { file: "x" }, approval: { id: "a1" } };
  const answered = { ...call, state: "approval-responded", approval: { id: "a1", approved: true } };

  // Pages a history the way loadChatPage does, reading `read` messages at a time.
  const pagesOf = (history, limit, read) =>
    allPages(async (before) => {
      const end = before ? history.findIndex((m) => m.seq === Number(before)) : history.length;
      let from = end;
      for (;;) {
        from = Math.max(0, from - read);
        const window = history.slice(from, end);
        const start = historyPageStart(window, { userId: "alice", limit, complete: from === 0 });
        if (start < 0) continue;
        const messages = historyToUIMessages(window.slice(start), { userId: "alice" }).messages;
        return { messages, before: from + start > 0 ? String(window[start].seq) : null };
      }
    });

  test("references across user turns (a late tool result, a whole continuation, an edit) keep their messages on one page", async () => {
    seq = 0;
    const history = [
      turn("u1", "hello"),
      reply("r1", [text("echo hello")]),
      turn("u2", "delete x"),
      reply("R", [{ type: "step-start" }, call]),
      // The user said something else before answering the approval (written by REST).
      turn("u3", "wait"),
      reply("r3", [text("echo wait")]),
      user("tool_result", { message_id: "R", parts: [answered] }),
      reply("R", [{ type: "step-start" }, { ...answered, state: "output-available", output: "ok" }, { type: "step-start" }, text("Deleted x.")], { continuation: "whole" }),
      turn("u4", "four"),
      reply("r4", [text("echo four")]),
      user("regenerate", {}),
      reply("r4b", [text("echo four again")], { replaces: "f10" }),
      turn("u5", "five"),
      reply("r5", [text("echo five")]),
      turn("u6", "six"),
      reply("r6", [text("echo six")]),
      // u5 edited in place: what followed it is gone.
      turn("u5", "five, edited"),
      reply("r5b", [text("echo five, edited")]),
      turn("u7", "seven"),
      reply("r7", [text("echo seven")]),
    ];
    const whole = historyToUIMessages(history, { userId: "alice" }).messages;
    assert.deepEqual(whole.map((m) => m.id), ["u1", "r1", "u2", "R", "u3", "r3", "u4", "r4b", "u5", "r5b", "u7", "r7"]);
    // An edit is seen only when its original is in the messages read (loadChatPage reads at
    // least 50 at a time): here 8 reach back from the edit's page to the original.
    for (const read of [1, 2, 3, 8, 50]) {
      const part = read >= 8 ? history : history.slice(0, 16);
      const wholePart = historyToUIMessages(part, { userId: "alice" }).messages;
      for (let limit = 1; limit <= wholePart.length + 1; limit++) {
        const pages = await pagesOf(part, limit, read);
        checkPages(pages, wholePart, limit, `read ${read}`);
        // u2 … r3 (the approval answered after another turn) are never split.
        const holding = pages.find((page) => page.messages.some((m) => m.id === "u2"));
        assert.ok(["R", "u3", "r3"].every((id) => holding.messages.some((m) => m.id === id)), `limit ${limit}, read ${read}: u2…r3 on one page`);
      }
    }
    // Without the late tool result's referent in view, the page cannot begin: read further.
    assert.equal(historyPageStart(history.slice(4, 8), { userId: "alice", limit: 1, complete: false }), -1);
    assert.equal(historyPageStart(history.slice(2, 8), { userId: "alice", limit: 1, complete: false }), 0);
  });

  test("an empty history, and a history that does not begin with a user turn", () => {
    assert.equal(historyPageStart([], { userId: "alice", limit: 3, complete: true }), 0);
    assert.equal(historyPageStart([], { userId: "alice", limit: 3, complete: false }), -1);
    seq = 0;
    const note = { id: "f1", seq: 1, sender_id: "bot", kind: "text", content: { text: "welcome" }, metadata: {} };
    seq = 1;
    const history = [note, turn("u1", "hi"), reply("r1", [text("echo hi")])];
    assert.equal(historyPageStart(history, { userId: "alice", limit: 2, complete: true }), 1);
    assert.equal(historyPageStart(history, { userId: "alice", limit: 3, complete: true }), 0);
    assert.equal(historyPageStart(history, { userId: "alice", limit: 3, complete: false }), -1);
  });
});

describe("loadChatPage against a real server", () => {
  let base;
  const transports = [];
  before(async () => {
    base = await startServer();
    const agent = await startAgent();
    await registerAgent(base, agent.origin, { id: "bot" });
  });
  after(async () => {
    for (const t of transports) t.close({ force: true });
    await stopAll();
  });
  const auth = { userId: "alice" };

  test("every page size: the pages put together equal the whole history (tools, approvals, regenerate, multi-part replies, an edit)", async () => {
    const chatId = `paging-${Date.now()}`;
    const t = new FleetLMChatTransport({ url: base, userId: "alice", agentId: "bot", WebSocket });
    transports.push(t);
    const chat = new TestChat({
      id: chatId,
      transport: t,
      sendAutomaticallyWhen: (options) =>
        ai.lastAssistantMessageIsCompleteWithToolCalls(options) || (APPROVALS && ai.lastAssistantMessageIsCompleteWithApprovalResponses(options)),
    });
    const ready = (what) => chat.until((c) => c.status === "ready", what);
    await chat.sendMessage({ text: "hello one" });
    if (APPROVALS) {
      await chat.sendMessage({ text: "approve report.pdf" });
      const tool = chat.messages.at(-1).parts.find((p) => p.type === "tool-deleteFile");
      await chat.addToolApprovalResponse({ id: tool.approval.id, approved: true });
      await chat.until((c) => c.status === "ready" && textOf(c.messages.at(-1)) === "Deleted report.pdf.", "the approved continuation");
    }
    await chat.sendMessage({ text: "ask me" });
    const ask = chat.messages.at(-1).parts.find((p) => p.type === "tool-askColor");
    await chat.addToolOutput({ tool: "askColor", toolCallId: ask.toolCallId, output: "blue" });
    await chat.until((c) => c.status === "ready" && textOf(c.messages.at(-1)) === "You chose blue.", "the tool output's continuation");
    await chat.sendMessage({ text: "say something" });
    await chat.regenerate();
    await ready("the regenerated reply");
    if (APPROVALS) {
      await chat.sendMessage({ text: "approve other.txt" });
      const tool = chat.messages.at(-1).parts.find((p) => p.type === "tool-deleteFile");
      await chat.addToolApprovalResponse({ id: tool.approval.id, approved: false });
      await chat.until((c) => c.status === "ready" && textOf(c.messages.at(-1)) === "Not deleted.", "the denied continuation");
      // Regenerate the continuation (the turn is the tool result): the log keeps both.
      await chat.regenerate();
      await ready("the regenerated continuation");
    }
    const note = await rest(base, "POST", `/api/sessions/${chatId}/messages`, { agent_id: "bot", content: { text: "a note from the agent" } });
    assert.equal(note.status, 200);
    await chat.sendMessage({ text: "json please" });
    await chat.sendMessage({ text: "hello again" });
    // Edit the last user message in place (same id): what followed it is dropped.
    const last = chat.messages.findLast((m) => m.role === "user");
    await chat.sendMessage({ text: "hello, edited", messageId: last.id });
    await chat.sendMessage({ text: "the end" });
    await ready("the last reply");

    const log = (await rest(base, "GET", `/api/sessions/${chatId}/messages?limit=1000`)).body.messages;
    const kinds = new Set(log.map((m) => m.kind));
    for (const kind of ["text", "assistant", "tool_result", "regenerate"]) assert.ok(kinds.has(kind), `the log has a ${kind} message`);
    if (APPROVALS) assert.ok(log.some((m) => m.metadata?.continuation === "whole"), "a continuation stored whole");

    const whole = await loadChatMessages({ url: base, ...auth, chatId });
    const N = whole.length;
    assert.ok(N >= 12, `a long enough history (${N} UI messages)`);
    assert.ok(whole.some((m) => m.parts.some((p) => p.type === "tool-askColor" && p.state === "output-available")), "the tool output is folded in");
    for (let limit = 1; limit <= N + 1; limit++) {
      const pages = await allPages((before) => loadChatPage({ url: base, ...auth, chatId, limit, before }));
      checkPages(pages, whole, limit, "real history");
      assert.deepEqual(plain(await loadChatMessages({ url: base, ...auth, chatId, limit })), plain(pages[0].messages), `loadChatMessages({ limit: ${limit} }) is the newest page`);
      if (limit > N) assert.equal(pages.length, 1);
    }
    // The newest page of one message reaches back to the user turn it answers.
    const newest = await loadChatPage({ url: base, ...auth, chatId, limit: 1 });
    assert.deepEqual(newest.messages.map((m) => m.role), ["user", "assistant"]);
    assert.equal(textOf(newest.messages[0]), "the end");
    assert.equal(typeof newest.before, "string");
  });

  test("an unknown chat is one empty page; a bad limit or cursor is refused", async () => {
    assert.deepEqual(await loadChatPage({ url: base, ...auth, chatId: "never-created", limit: 5 }), { messages: [], before: null });
    assert.deepEqual(await loadChatMessages({ url: base, ...auth, chatId: "never-created", limit: 5 }), []);
    await assert.rejects(loadChatPage({ url: base, ...auth, chatId: "never-created", limit: 0 }), /limit/);
    await assert.rejects(loadChatPage({ url: base, ...auth, chatId: "never-created", limit: 2, before: "12" }), /cursor/);
  });
});
