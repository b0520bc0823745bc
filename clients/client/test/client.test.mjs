// @fleetlm/client against a real fleetlm server and a real streaming agent.
import assert from "node:assert/strict";
import { after, before, describe, test } from "node:test";
import { Socket } from "phoenix";
import WebSocket from "ws";
import { FleetLMClient, FleetLMError, messageToChunks } from "@fleetlm/client";
import { readUIMessageStream } from "ai";
import {
  eventually,
  needs,
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
const clients = [];
function client(options = {}) {
  const c = new FleetLMClient({ url: base, userId: "alice", WebSocket, ...options });
  clients.push(c);
  return c;
}

async function readAll(stream) {
  const chunks = [];
  for await (const chunk of stream) chunks.push(chunk);
  return chunks;
}

before(async () => {
  base = await startServer();
  agent = await startAgent();
  await registerAgent(base, agent.origin, { id: "bot" });
  features = await probeFeatures(base, { WebSocket });
});

after(async () => {
  for (const c of clients) c.close();
  await stopAll();
});

describe("REST", () => {
  test("creates a session, appends idempotently, pages history", async () => {
    const c = client();
    const id = fresh("rest");
    const session = await c.createSession({ agentId: "bot", id, metadata: { topic: "t" } });
    assert.equal(session.id, id);
    assert.equal(session.user_id, "alice");
    const first = await c.sendMessage(id, { content: { text: "one" }, clientId: "k1", kind: "note" });
    const again = await c.sendMessage(id, { content: { text: "one" }, clientId: "k1", kind: "note" });
    assert.equal(again.seq, first.seq);
    assert.equal(again.deduplicated, true);
    const messages = await c.getMessages(id);
    assert.deepEqual(messages.filter((m) => m.kind === "note").map((m) => [m.seq, m.content.text]), [[1, "one"]]);
    assert.ok((await c.getSession(id)).last_seq >= 1);
  });

  test("errors carry the server's code and status", async () => {
    const c = client();
    await assert.rejects(c.getSession("no-such-session"), (error) => {
      assert.ok(error instanceof FleetLMError);
      assert.equal(error.code, "session_not_found");
      assert.equal(error.status, 404);
      return true;
    });
    const id = fresh("err");
    await c.createSession({ agentId: "bot", id });
    await assert.rejects(c.sendMessage(id, { content: { text: "x" }, clientId: "a".repeat(129) }), (error) => {
      assert.equal(error.code, "invalid_message_format");
      assert.equal(error.status, 422);
      return true;
    });
    await assert.rejects(c.createSession({ agentId: "nobody" }), (error) => error.code === "agent_not_found");
    const unreachable = new FleetLMClient({ url: "http://127.0.0.1:1", userId: "alice" });
    await assert.rejects(unreachable.getSession("x"), (error) => error.code === "network");
  });
});

describe("session subscription", () => {
  test("delivers the history and live messages once, in seq order, and a streamed reply as AI SDK chunks", async () => {
    const c = client();
    const id = fresh("live");
    await c.createSession({ agentId: "bot", id });
    // Written by the agent: only the user's messages call it.
    await c.rest.appendMessage(id, { agentId: "bot" }, { content: { text: "before" } });
    const sub = await c.subscribe(id);
    const seen = [];
    sub.on("message", (m) => seen.push(m.seq));
    const info = await sub.joined;
    assert.equal(info.lastSeq, 1);
    assert.equal(sub.lastSeq, 1);
    const exclude = new Set(sub.knownDispatches);
    const stream = sub.replyStream({ exclude });
    const sent = await sub.send({ content: { text: "hello there" }, clientId: "hello-1" });
    assert.equal(sent.seq, 2);
    const chunks = await readAll(stream);
    assert.deepEqual(chunks.map((c) => c.type), ["start", "text-start", "text-delta", "text-delta", "text-delta", "text-end", "finish"]);
    assert.equal(chunks.filter((c) => c.type === "text-delta").map((c) => c.delta).join(""), "echo: hello there");
    // Fed to the AI SDK, the chunks build the message FleetLM stores.
    let built;
    for await (const message of readUIMessageStream({ stream: ReadableStream.from(chunks) })) built = message;
    await eventually(() => seen.includes(3), "the stored reply");
    const stored = (await c.getMessages(id)).find((m) => m.seq === 3);
    assert.equal(stored.kind, "assistant");
    assert.deepEqual(JSON.parse(JSON.stringify(built)), { ...stored.content, role: "assistant" });
    // A resend of the same client id is stored once.
    const resent = await sub.send({ content: { text: "hello there" }, clientId: "hello-1" });
    assert.deepEqual(resent, { seq: 2, deduplicated: true });
    assert.deepEqual(seen, [1, 2, 3]);
    sub.leave();
  });

  test("history read backwards: the newest page first, then older pages down to seq 1", async () => {
    const c = client();
    const id = fresh("back");
    await c.createSession({ agentId: "bot", id });
    for (let i = 1; i <= 23; i++) await c.rest.appendMessage(id, { agentId: "bot" }, { content: { text: `m${i}` } });
    const newest = await c.getMessagesBefore(id, { limit: 10 });
    assert.deepEqual(newest.messages.map((m) => m.seq), [14, 15, 16, 17, 18, 19, 20, 21, 22, 23]);
    assert.equal(newest.has_more, true);
    assert.equal(newest.next_before_seq, 14);
    const pages = [newest.messages.map((m) => m.seq)];
    let before = newest.next_before_seq;
    while (before !== null) {
      const page = await c.getMessagesBefore(id, { beforeSeq: before, limit: 10 });
      pages.unshift(page.messages.map((m) => m.seq));
      before = page.next_before_seq;
    }
    assert.deepEqual(pages.flat(), Array.from({ length: 23 }, (_, i) => i + 1));
    assert.deepEqual(pages[0], [1, 2, 3]);
    await assert.rejects(c.getMessagesBefore(id, { beforeSeq: 0 }), (error) => error.code === "invalid_parameter");
  });

  test("a join past 100 messages pages the rest by REST: every message once, in order", async () => {
    const c = client();
    const id = fresh("many");
    await c.createSession({ agentId: "bot", id });
    for (let i = 1; i <= 130; i++) await c.rest.appendMessage(id, { agentId: "bot" }, { content: { text: `m${i}` } });
    const sub = await c.subscribe(id);
    const seen = [];
    const joins = [];
    sub.on("message", (m) => seen.push(m.seq));
    sub.on("join", (info) => joins.push(info));
    await sub.joined;
    await c.rest.appendMessage(id, { agentId: "bot" }, { content: { text: "live" } });
    await eventually(() => seen.length === 131, "131 messages");
    assert.deepEqual(seen, Array.from({ length: 131 }, (_, i) => i + 1));
    // The server delivered live only after its replay (seq 101 on); the live message past the
    // REST pages made it send `resync`, and the rejoin from seq 130 brought it, once.
    await sleep(200);
    assert.deepEqual(seen.length, 131);
    assert.ok(joins.some((j) => j.rejoin && j.lastSeq === 131), JSON.stringify(joins));
    sub.leave();
  });

  test("after the socket drops, the rejoin delivers what was missed exactly once", async () => {
    const c = client({ reconnectAfterMs: () => 200 });
    const id = fresh("drop");
    await c.createSession({ agentId: "bot", id });
    const sub = await c.subscribe(id);
    const seen = [];
    const joins = [];
    sub.on("message", (m) => seen.push(m.seq));
    sub.on("join", (info) => joins.push(info));
    await sub.joined;
    const note = (text) => c.rest.appendMessage(id, { agentId: "bot" }, { content: { text } });
    await note("1");
    await eventually(() => seen.length === 1, "first message");
    const socket = await c.socket();
    socket.conn.close(); // the network drops; phoenix reconnects and rejoins
    for (let i = 2; i <= 5; i++) await note(String(i));
    await eventually(() => seen.length === 5, "the missed messages");
    await note("6");
    await eventually(() => seen.length === 6, "a live message after the rejoin");
    assert.deepEqual(seen, [1, 2, 3, 4, 5, 6]);
    assert.ok(joins.some((j) => j.rejoin), "a rejoin happened");
    sub.leave();
  });

  test("a subscription joining mid-reply gets the reply from its start", async (t) => {
    needs(t, features.resume, "stream snapshot chunks");
    const c = client();
    const id = fresh("mid");
    await c.createSession({ agentId: "bot", id });
    await c.sendMessage(id, { content: { text: "slow please" } });
    const other = client();
    await eventually(async () => (await other.getSession(id)).agent_status?.status === "streaming", "streaming", 10000);
    await sleep(300);
    const sub = await other.subscribe(id, { lastSeq: 1 });
    const info = await sub.joined;
    if (info.stream !== undefined) assert.equal(info.stream?.agent_id, "bot");
    const chunks = await readAll(sub.replyStream({ dispatchId: info.stream?.dispatch_id ?? (await eventually(() => sub.activeReply()?.dispatchId, "snapshot")) }));
    assert.equal(chunks[0].type, "start");
    assert.equal(chunks.at(-1).type, "finish");
    let built;
    for await (const message of readUIMessageStream({ stream: ReadableStream.from(chunks) })) built = message;
    const text = built.parts.find((p) => p.type === "text").text;
    assert.equal(text, Array.from({ length: 40 }, (_, i) => `w${i} `).join(""));
    sub.leave();
  });

  test("typing reaches the other member; a join the server refuses rejects", async () => {
    const c = client();
    const id = fresh("typing");
    await c.createSession({ agentId: "bot", id });
    const sub = await c.subscribe(id);
    await sub.joined;
    // The agent's side, as a plain phoenix client.
    const agentSocket = new Socket(`${base.replace("http", "ws")}/socket`, { params: { agent_id: "bot" }, transport: WebSocket });
    agentSocket.connect();
    const channel = agentSocket.channel(`session:${id}`, { last_seq: 0 });
    const typing = [];
    channel.on("typing", (event) => typing.push(event));
    await new Promise((resolve, reject) => channel.join().receive("ok", resolve).receive("error", reject));
    await sub.typing(true);
    await eventually(() => typing.length === 1, "typing push");
    assert.deepEqual(typing[0], { user_id: "alice", typing: true });
    agentSocket.disconnect();
    const mallory = client({ userId: "mallory" });
    const refused = await mallory.subscribe(id);
    await assert.rejects(refused.joined, (error) => error instanceof FleetLMError && error.code === "unauthorized");
    sub.leave();
  });
});

describe("inbox", () => {
  test("the inbox subscription follows new sessions and unread counts", async () => {
    const c = client({ userId: `inbox-user-${Date.now()}` });
    const updates = [];
    const inbox = await c.subscribeInbox((entries) => updates.push(entries));
    assert.deepEqual(inbox.list(), []);
    const id = fresh("inbox");
    await c.createSession({ agentId: "bot", id });
    await c.sendMessage(id, { content: { text: "hi" } });
    // The agent answers; its reply counts as unread for the user.
    const entry = await eventually(() => inbox.list().find((e) => e.session_id === id && e.unread_count >= 1), "unread reply", 10000);
    assert.equal(entry.agent_id, "bot");
    assert.ok(updates.length >= 1);
    await c.markRead(id, entry.last_seq);
    await eventually(() => inbox.list().find((e) => e.session_id === id)?.unread_count === 0, "read");
    inbox.leave();
  });
});

describe("messageToChunks", () => {
  test("plays a stored message back into the same message", async () => {
    const message = {
      id: "m1",
      role: "assistant",
      metadata: { model: "x" },
      parts: [
        { type: "step-start" },
        { type: "reasoning", id: "r1", text: "think", state: "done" },
        { type: "tool-weather", toolCallId: "c1", state: "output-available", input: { city: "Paris" }, output: { t: 21 } },
        { type: "step-start" },
        { type: "text", text: "It is 21.", state: "done" },
        { type: "data-weather", id: "d1", data: { t: 21 } },
        { type: "source-url", sourceId: "s1", url: "https://example.com", title: "ex" },
      ],
    };
    let built;
    for await (const m of readUIMessageStream({ stream: ReadableStream.from(messageToChunks(message)) })) built = m;
    assert.deepEqual(JSON.parse(JSON.stringify(built)), message);
  });
});

describe("token mode", () => {
  let tokenBase;
  before(async () => {
    tokenBase = await startServer({ FLEETLM_AUTH_SECRET: "a-test-secret-of-32-bytes-length!", FLEETLM_API_KEY: "admin-key" });
    await registerAgent(tokenBase, agent.origin, { id: "bot", apiKey: "admin-key" });
  });

  test("a client with a token acts as the token's user over REST and the socket", async () => {
    const minted = await rest(tokenBase, "POST", "/api/tokens", { sub: "tina", ttl_seconds: 600 }, "admin-key");
    assert.equal(minted.status, 201);
    let calls = 0;
    const c = client({ url: tokenBase, userId: undefined, token: () => (calls++, minted.body.token) });
    const id = fresh("token");
    const session = await c.createSession({ agentId: "bot", id });
    assert.equal(session.user_id, "tina");
    assert.equal(c.userId, "tina");
    const sub = await c.subscribe(id);
    await sub.joined;
    const stream = sub.replyStream({ exclude: new Set() });
    await sub.send({ content: { text: "token hello" } });
    const chunks = await readAll(stream);
    assert.equal(chunks.filter((ch) => ch.type === "text-delta").map((ch) => ch.delta).join(""), "echo: token hello");
    assert.ok(calls >= 2, "the token function is asked before calls");
    const inbox = await c.getInbox();
    assert.ok(inbox.some((e) => e.session_id === id));
    // After the connection drops, the token function is asked again for the reconnect, and the
    // subscription rejoins with it.
    const before = calls;
    const seen = [];
    sub.on("message", (m) => seen.push(m.seq));
    (await c.socket()).conn.close();
    await eventually(() => calls > before, "the token to be asked again");
    const note = await c.rest.appendMessage(id, { userId: "tina" }, { kind: "note", content: { text: "after the drop" } });
    await eventually(() => seen.includes(note.seq), "the message after the reconnect");
    sub.leave();
  });

  test("a bad token is refused with the server's code", async () => {
    const c = client({ url: tokenBase, userId: "tina", token: "not-a-jwt" });
    await assert.rejects(c.getSession("anything"), (error) => error.status === 401 && error.code === "unauthorized");
  });
});
