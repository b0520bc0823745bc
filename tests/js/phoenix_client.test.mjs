// The unmodified `phoenix` client (1.8) against a FleetLM server started by the Rust test
// `tests/phoenix_js.rs`, which passes its address in FLEETLM_URL (and a token-mode server in
// FLEETLM_TOKEN_URL with a user token in FLEETLM_TOKEN).
import { test } from "node:test";
import assert from "node:assert/strict";
import { Socket } from "phoenix";
import WebSocket from "ws";

const base = process.env.FLEETLM_URL;
assert.ok(base, "FLEETLM_URL must point at a running FleetLM server");

async function rest(method, path, body, root = base) {
  const response = await fetch(`${root}${path}`, {
    method,
    headers: { "content-type": "application/json" },
    body: body === undefined ? undefined : JSON.stringify(body),
  });
  const text = await response.text();
  return { status: response.status, body: text ? JSON.parse(text) : null };
}

async function setup(sessionId, userId = "alice") {
  await rest("POST", "/api/agents", { agent: { id: "echo", name: "Echo", origin_url: "http://127.0.0.1:9" } });
  const created = await rest("POST", "/api/sessions", { id: sessionId, user_id: userId, agent_id: "echo" });
  assert.equal(created.status, 201, JSON.stringify(created.body));
}

function connect(params, options = {}, root = base) {
  const socket = new Socket(`${root.replace("http", "ws")}/socket`, { params, transport: WebSocket, ...options });
  socket.connect();
  return socket;
}

function join(channel) {
  return new Promise((resolve, reject) => {
    channel
      .join()
      .receive("ok", resolve)
      .receive("error", reject)
      .receive("timeout", () => reject(new Error("join timeout")));
  });
}

function push(channel, event, payload) {
  return new Promise((resolve, reject) => {
    channel
      .push(event, payload)
      .receive("ok", resolve)
      .receive("error", reject)
      .receive("timeout", () => reject(new Error(`${event} timeout`)));
  });
}

function nextEvent(channel, event, timeoutMs = 5000) {
  return new Promise((resolve, reject) => {
    const timer = setTimeout(() => reject(new Error(`no ${event} within ${timeoutMs} ms`)), timeoutMs);
    const ref = channel.on(event, (payload) => {
      clearTimeout(timer);
      channel.off(event, ref);
      resolve(payload);
    });
  });
}

test("join replays history, pushes live messages, and send is acknowledged with its seq", async () => {
  await setup("js-basic");
  for (const text of ["one", "two"]) {
    await rest("POST", "/api/sessions/js-basic/messages", { user_id: "alice", content: { text } });
  }
  const socket = connect({ user_id: "alice" });
  const channel = socket.channel("session:js-basic", { last_seq: 0 });
  const reply = await join(channel);
  assert.deepEqual(reply.messages.map((m) => m.content.text), ["one", "two"]);
  assert.equal(reply.has_more, false);
  assert.equal(reply.last_seq, 2);

  const live = nextEvent(channel, "message");
  const appended = await rest("POST", "/api/sessions/js-basic/messages", { agent_id: "echo", content: { text: "three" } });
  assert.deepEqual(await live, appended.body.message);

  const own = nextEvent(channel, "message");
  const ack = await push(channel, "send", { content: { kind: "text", content: { text: "four" } }, client_id: "js-4" });
  assert.equal(ack.seq, 4);
  assert.equal((await own).content.text, "four");

  await new Promise((resolve) => channel.leave().receive("ok", resolve));
  socket.disconnect();
});

test("a reconnecting client gets exactly the messages it missed", async () => {
  await setup("js-reconnect");
  const first = connect({ user_id: "alice" });
  const channel = first.channel("session:js-reconnect", { last_seq: 0 });
  await join(channel);
  await push(channel, "send", { content: { content: { text: "seen" } } });
  first.disconnect();
  for (const n of [1, 2, 3]) {
    await rest("POST", "/api/sessions/js-reconnect/messages", { agent_id: "echo", content: { text: `missed ${n}` } });
  }
  const second = connect({ user_id: "alice" });
  const rejoin = second.channel("session:js-reconnect", { last_seq: 1 });
  const reply = await join(rejoin);
  assert.deepEqual(reply.messages.map((m) => m.seq), [2, 3, 4]);
  assert.deepEqual(reply.messages.map((m) => m.content.text), ["missed 1", "missed 2", "missed 3"]);
  second.disconnect();
});

test("heartbeats are answered and keep the socket open", async () => {
  const socket = connect({ user_id: "alice" }, { heartbeatIntervalMs: 100 });
  const replies = [];
  socket.onMessage((message) => {
    if (message.topic === "phoenix" && message.event === "phx_reply") replies.push(message.payload.status);
  });
  await new Promise((resolve) => setTimeout(resolve, 450));
  assert.ok(replies.length >= 2, `heartbeat replies: ${replies.length}`);
  assert.ok(replies.every((status) => status === "ok"));
  assert.equal(socket.isConnected(), true);
  socket.disconnect();
});

test("joins are refused for strangers and unknown sessions", async () => {
  await setup("js-private", "bob");
  const socket = connect({ user_id: "mallory" });
  await assert.rejects(join(socket.channel("session:js-private", {})), (reason) => reason.reason === "unauthorized");
  await assert.rejects(join(socket.channel("session:nope", {})), (reason) => reason.reason === "not found");
  await assert.rejects(join(socket.channel("inbox:bob", {})), (reason) => reason.reason === "unauthorized");
  socket.disconnect();
});

test("the inbox sends a snapshot, then deltas with unread counts", async () => {
  await setup("js-inbox", "carol");
  const socket = connect({ user_id: "carol" });
  const inbox = socket.channel("inbox:carol", {});
  const snapshot = await join(inbox);
  assert.ok(snapshot.inbox.some((entry) => entry.session_id === "js-inbox"));
  const delta = nextEvent(inbox, "inbox_delta");
  await rest("POST", "/api/sessions/js-inbox/messages", { agent_id: "echo", content: { text: "ping" } });
  const { inbox: entries } = await delta;
  assert.equal(entries.length, 1);
  assert.equal(entries[0].session_id, "js-inbox");
  assert.equal(entries[0].unread_count, 1);
  socket.disconnect();
});

test("token mode: authToken travels in the subprotocol", { skip: !process.env.FLEETLM_TOKEN_URL }, async () => {
  const root = process.env.FLEETLM_TOKEN_URL;
  const socket = connect({}, { authToken: process.env.FLEETLM_TOKEN }, root);
  const replies = [];
  socket.onMessage((message) => replies.push(message));
  await new Promise((resolve, reject) => {
    socket.onOpen(resolve);
    socket.onError(reject);
  });
  const inbox = socket.channel("inbox:dave", {});
  const reply = await join(inbox);
  assert.deepEqual(reply.inbox, []);
  socket.disconnect();
});
