// @fleetlm/client under network faults: a TCP proxy (node:net) between the client and a real
// fleetlm server drops connections, refuses new ones, fails or holds the REST catch-up, or
// answers it with a synthetic `503 no_leader`. Real server, real phoenix socket, real agent.
import assert from "node:assert/strict";
import { createServer, connect } from "node:net";
import { after, before, describe, test } from "node:test";
import WebSocket from "ws";
import { FleetLMClient, jitteredBackoff } from "@fleetlm/client";
import { readUIMessageStream } from "ai";
import { eventually, registerAgent, sleep, startAgent, startServer, stopAll } from "../../test-support/harness.mjs";

let base;
let agent;
let counter = 0;
const fresh = (prefix) => `${prefix}-${++counter}-${Date.now()}`;
const clients = [];
const proxies = [];
function client(options = {}) {
  const c = new FleetLMClient({ url: base, userId: "alice", WebSocket, reconnectAfterMs: () => 100, ...options });
  clients.push(c);
  return c;
}

const CATCH_UP = /^GET \/api\/sessions\/[^/ ]+\/messages\?/;

/**
 * A TCP proxy to the server. `refuse` closes new connections at once; `drop(kind)` closes the
 * open ones (`ws`, `http` or all); the REST catch-up (`GET …/messages`) can be failed (the
 * connection closed), held until `release()`, or answered with a synthetic response.
 */
async function startProxy(target) {
  const { hostname, port } = new URL(target);
  const connections = new Set();
  const proxy = {
    refuse: false,
    /** How many catch-up requests to fail by closing their connection. */
    failCatchUp: 0,
    /** Hold catch-up requests (their bytes wait here) until `release()`. */
    holdCatchUp: false,
    /** Answer the next catch-up request with this raw HTTP response instead. */
    answerCatchUp: null,
    held: [],
    /** Every catch-up request seen: `{at, outcome}`. */
    catchUps: [],
    /** Connection attempts (accepted or refused), with their time. */
    attempts: [],
    drop(kind) {
      for (const connection of connections) if (!kind || connection.kind === kind) connection.destroy();
    },
    release() {
      proxy.holdCatchUp = false;
      for (const { connection, data } of proxy.held.splice(0)) connection.forward(data);
    },
    close() {
      proxy.drop();
      return new Promise((resolve) => server.close(resolve));
    },
  };
  const server = createServer((downstream) => {
    proxy.attempts.push({ at: Date.now(), refused: proxy.refuse });
    if (proxy.refuse) {
      downstream.destroy();
      return;
    }
    const upstream = connect(Number(port), hostname);
    const connection = {
      kind: undefined,
      destroy() {
        downstream.destroy();
        upstream.destroy();
        connections.delete(connection);
      },
      forward(data) {
        if (!upstream.destroyed) upstream.write(data);
      },
    };
    connections.add(connection);
    upstream.on("data", (data) => downstream.destroyed || downstream.write(data));
    upstream.on("error", () => connection.destroy());
    upstream.on("close", () => connection.destroy());
    downstream.on("error", () => connection.destroy());
    downstream.on("close", () => connection.destroy());
    downstream.on("data", (data) => {
      const text = data.toString("latin1");
      connection.kind ??= /\r\nupgrade: websocket\r\n/i.test(text) ? "ws" : "http";
      if (connection.kind === "http" && CATCH_UP.test(text)) {
        if (proxy.failCatchUp > 0) {
          proxy.failCatchUp -= 1;
          proxy.catchUps.push({ at: Date.now(), outcome: "failed" });
          connection.destroy();
          return;
        }
        if (proxy.answerCatchUp) {
          const answer = proxy.answerCatchUp;
          proxy.answerCatchUp = null;
          proxy.catchUps.push({ at: Date.now(), outcome: "answered" });
          downstream.end(answer);
          upstream.destroy();
          return;
        }
        if (proxy.holdCatchUp) {
          proxy.catchUps.push({ at: Date.now(), outcome: "held" });
          proxy.held.push({ connection, data });
          return;
        }
        proxy.catchUps.push({ at: Date.now(), outcome: "forwarded" });
      }
      connection.forward(data);
    });
  });
  await new Promise((resolve) => server.listen(0, "127.0.0.1", resolve));
  proxy.origin = `http://127.0.0.1:${server.address().port}`;
  proxies.push(proxy);
  return proxy;
}

async function readAll(stream, timeoutMs = 8000) {
  const chunks = [];
  const reading = (async () => {
    for await (const chunk of stream) chunks.push(chunk);
    return chunks;
  })();
  let timer;
  const timeout = new Promise((_, reject) => {
    timer = setTimeout(() => reject(new Error(`the stream did not end in ${timeoutMs} ms (${chunks.length} chunks)`)), timeoutMs);
  });
  try {
    return await Promise.race([reading, timeout]);
  } finally {
    clearTimeout(timer);
  }
}

/** A session with `count` messages written by the agent (only the user's messages call it). */
async function sessionWith(count) {
  const writer = client();
  const id = fresh("faults");
  await writer.createSession({ agentId: "bot", id });
  for (let i = 1; i <= count; i++) await writer.rest.appendMessage(id, { agentId: "bot" }, { content: { text: `m${i}` } });
  return { id, write: (text) => writer.rest.appendMessage(id, { agentId: "bot" }, { content: { text } }) };
}

/** Records what a subscription delivers; every `join` notes how much had been delivered. */
function record(sub) {
  const seen = [];
  const joins = [];
  const errors = [];
  sub.on("message", (m) => seen.push(m.seq));
  sub.on("join", (info) => joins.push({ ...info, delivered: [...seen] }));
  sub.on("error", (error) => errors.push(error));
  return { seen, joins, errors };
}

const upTo = (n) => Array.from({ length: n }, (_, i) => i + 1);

before(async () => {
  base = await startServer();
  agent = await startAgent();
  await registerAgent(base, agent.origin, { id: "bot" });
});

after(async () => {
  for (const c of clients) c.close();
  for (const proxy of proxies) await proxy.close();
  await stopAll();
});

describe("catch-up and resume under faults", () => {
  test("a REST catch-up that fails once is retried: the join reports the whole history, gap-free", async () => {
    const { id, write } = await sessionWith(130);
    const proxy = await startProxy(base);
    proxy.failCatchUp = 1;
    const c = client({ url: proxy.origin });
    const sub = await c.subscribe(id);
    const { seen, joins, errors } = record(sub);
    const info = await sub.joined;
    assert.deepEqual(proxy.catchUps.map((r) => r.outcome), ["failed", "forwarded"]);
    assert.ok(errors.some((e) => e.code === "network"), "the failure is reported as an error event");
    // Without a new write (which would make the server send `resync`): nothing is missing.
    assert.equal(info.lastSeq, 130);
    assert.deepEqual(seen, upTo(130));
    assert.deepEqual(joins.map((j) => [j.lastSeq, j.delivered.length]), [[130, 130]]);
    await write("live");
    await eventually(() => seen.length === 131, "the live message");
    await sleep(200);
    assert.deepEqual(seen, upTo(131));
    sub.leave();
  });

  test("the socket dropped mid catch-up (the REST page with it): gap-free, in order, once", async () => {
    const { id, write } = await sessionWith(130);
    const proxy = await startProxy(base);
    proxy.holdCatchUp = true;
    const c = client({ url: proxy.origin });
    const sub = await c.subscribe(id);
    const { seen, joins } = record(sub);
    await eventually(() => proxy.held.length === 1, "the catch-up in flight");
    assert.deepEqual(seen, upTo(100));
    // The network goes: the socket and the catch-up's connection drop, reconnects are refused.
    proxy.refuse = true;
    proxy.holdCatchUp = false;
    proxy.held.length = 0;
    proxy.drop();
    await write("while down");
    await sleep(400);
    proxy.refuse = false;
    const info = await sub.joined;
    assert.ok(info.lastSeq >= 131, `joined at ${info.lastSeq}`);
    await eventually(() => seen.length === 131, "everything written");
    await write("live");
    await eventually(() => seen.length === 132, "a live message after the outage");
    await sleep(200);
    assert.deepEqual(seen, upTo(132));
    // Every join was reported only once everything up to its last seq was delivered.
    for (const join of joins) assert.deepEqual(join.delivered, upTo(join.lastSeq), JSON.stringify(join));
    sub.leave();
  });

  test("a rejoin that lands during the catch-up: live messages wait for it, nothing twice", async () => {
    const { id, write } = await sessionWith(130);
    const proxy = await startProxy(base);
    proxy.holdCatchUp = true;
    const c = client({ url: proxy.origin });
    const sub = await c.subscribe(id);
    const { seen, joins } = record(sub);
    await eventually(() => proxy.held.length === 1, "the catch-up in flight");
    proxy.drop("ws"); // only the socket: the catch-up's request is still held
    await eventually(() => seen.length === 130, "the rejoin's replay");
    await write("during the catch-up");
    await sleep(300);
    proxy.release();
    await eventually(() => seen.length === 131, "the live message");
    const info = await sub.joined;
    assert.ok(info.lastSeq >= 130);
    await write("after");
    await eventually(() => seen.length === 132, "a later live message");
    await sleep(200);
    assert.deepEqual(seen, upTo(132));
    for (const join of joins) assert.deepEqual(join.delivered, upTo(join.lastSeq), JSON.stringify(join));
    sub.leave();
  });

  test("a reply whose end was missed while disconnected is no longer active; a resume after the outage ends", async () => {
    const proxy = await startProxy(base);
    const direct = client();
    const c = client({ url: proxy.origin });
    const id = fresh("missed-end");
    await c.createSession({ agentId: "bot", id });
    const sub = await c.subscribe(id);
    const { joins } = record(sub);
    await sub.joined;
    const followed = sub.replyStream({ exclude: new Set(sub.knownDispatches) });
    await sub.send({ content: { text: "slow please" } });
    await eventually(() => (sub.activeReply()?.chunks.length ?? 0) >= 5, "the reply streaming");
    const dispatchId = sub.activeReply().dispatchId;
    proxy.refuse = true;
    proxy.drop();
    await eventually(async () => (await direct.getSession(id)).agent_status?.status === "idle", "the reply to end on the server", 15000);
    proxy.refuse = false;
    await eventually(() => joins.some((j) => j.rejoin), "the rejoin");
    assert.equal(sub.activeReply(), undefined, "the ended reply is not active any more");
    assert.equal(sub.replies.has(dispatchId), false);
    const stored = (await direct.getMessages(id)).find((m) => m.kind === "assistant");
    // The stream that followed it across the outage ends, with the stored message's end.
    const chunks = await readAll(followed);
    assert.equal(chunks.at(-1).type, "finish");
    // A resume after the outage ends too: the stored message, played back.
    const resumed = await readAll(sub.replyStream({ dispatchId }));
    let built;
    for await (const message of readUIMessageStream({ stream: ReadableStream.from(resumed) })) built = message;
    assert.deepEqual(JSON.parse(JSON.stringify(built)), { ...stored.content, role: "assistant" });
    sub.leave();
  });
});
