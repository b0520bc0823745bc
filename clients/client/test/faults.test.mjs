// @fleetlm/client under network faults: a TCP proxy (node:net) between the client and a real
// fleetlm server drops connections, refuses new ones, fails or holds the REST catch-up, or
// answers it with a synthetic `503 no_leader`. Real server, real phoenix socket, real agent.
import assert from "node:assert/strict";
import { createServer, connect } from "node:net";
import { after, before, describe, test } from "node:test";
import WebSocket from "ws";
import { FleetLMClient, jitteredBackoff, tokenExpiresAt } from "@fleetlm/client";
import { readUIMessageStream } from "ai";
import { eventually, registerAgent, rest, sleep, startAgent, startServer, stopAll } from "../../test-support/harness.mjs";

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
 * Splits WebSocket frames off the front of `buffer`: `{frames: [{raw, opcode, text}], rest}`
 * (client frames are masked, server frames are not).
 */
function takeFrames(buffer) {
  const frames = [];
  let at = 0;
  for (;;) {
    if (buffer.length - at < 2) break;
    const opcode = buffer[at] & 0x0f;
    const masked = (buffer[at + 1] & 0x80) !== 0;
    let length = buffer[at + 1] & 0x7f;
    let offset = at + 2;
    if (length === 126) {
      if (buffer.length < offset + 2) break;
      length = buffer.readUInt16BE(offset);
      offset += 2;
    } else if (length === 127) {
      if (buffer.length < offset + 8) break;
      length = Number(buffer.readBigUInt64BE(offset));
      offset += 8;
    }
    const mask = masked ? buffer.subarray(offset, offset + 4) : null;
    if (masked) offset += 4;
    if (buffer.length < offset + length) break;
    const payload = Buffer.from(buffer.subarray(offset, offset + length));
    if (mask) for (let i = 0; i < payload.length; i++) payload[i] ^= mask[i % 4];
    frames.push({ raw: buffer.subarray(at, offset + length), opcode, text: opcode === 1 ? payload.toString("utf8") : null });
    at = offset + length;
  }
  return { frames, rest: buffer.subarray(at) };
}

/** An unmasked (server → client) text frame. */
function textFrame(text) {
  const payload = Buffer.from(text, "utf8");
  const header = payload.length < 126 ? Buffer.from([0x81, payload.length]) : Buffer.from([0x81, 126, payload.length >> 8, payload.length & 0xff]);
  return Buffer.concat([header, payload]);
}

/**
 * A TCP proxy to the server. `refuse` closes new connections at once; `drop(kind)` closes the
 * open ones (`ws`, `http` or all); the REST catch-up (`GET …/messages`) can be failed (the
 * connection closed), held until `release()`, or answered with a synthetic response; a socket
 * `send` push can be answered with a synthetic error reply (`answerSend`) instead of reaching
 * the server. WebSocket traffic is relayed frame by frame, so an injected frame never splits one.
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
    /** Answer the next socket `send` push with `{status: "error", response: answerSend}`. */
    answerSend: null,
    /** Swallow the next socket `send` push: neither forwarded nor answered (lost with the connection). */
    swallowSend: false,
    /** Every socket `send` push seen: `{at, outcome}`. */
    sends: [],
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
    let fromServer = Buffer.alloc(0);
    let fromClient = Buffer.alloc(0);
    upstream.on("data", (data) => {
      if (downstream.destroyed) return;
      if (connection.kind !== "ws" || !connection.upgraded) {
        // The upgrade's answer (101) comes whole before any frame.
        if (connection.kind === "ws") connection.upgraded = true;
        downstream.write(data);
        return;
      }
      const { frames, rest } = takeFrames(Buffer.concat([fromServer, data]));
      fromServer = Buffer.from(rest);
      for (const frame of frames) downstream.write(frame.raw);
    });
    upstream.on("error", () => connection.destroy());
    upstream.on("close", () => connection.destroy());
    downstream.on("error", () => connection.destroy());
    downstream.on("close", () => connection.destroy());
    downstream.on("data", (data) => {
      if (connection.kind === "ws") {
        const { frames, rest } = takeFrames(Buffer.concat([fromClient, data]));
        fromClient = Buffer.from(rest);
        for (const frame of frames) {
          const message = frame.text?.startsWith("[") ? JSON.parse(frame.text) : null;
          if (message?.[3] === "send") {
            if (proxy.answerSend) {
              const response = proxy.answerSend;
              proxy.answerSend = null;
              proxy.sends.push({ at: Date.now(), outcome: "answered" });
              const [joinRef, ref, topic] = message;
              downstream.write(textFrame(JSON.stringify([joinRef, ref, topic, "phx_reply", { status: "error", response }])));
              continue;
            }
            if (proxy.swallowSend) {
              proxy.swallowSend = false;
              proxy.sends.push({ at: Date.now(), outcome: "swallowed" });
              continue;
            }
            proxy.sends.push({ at: Date.now(), outcome: "forwarded" });
          }
          connection.forward(frame.raw);
        }
        return;
      }
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

  test("a rejoin during the catch-up while a reply ends: the newest join wins, the reply is not active", async () => {
    const { id } = await sessionWith(130);
    const direct = client();
    await direct.sendMessage(id, { content: { text: "slow please" } });
    await eventually(async () => (await direct.getSession(id)).agent_status?.status === "streaming", "streaming", 10000);
    const proxy = await startProxy(base);
    proxy.holdCatchUp = true;
    const c = client({ url: proxy.origin });
    const sub = await c.subscribe(id);
    const { seen, joins } = record(sub);
    await eventually(() => proxy.held.length === 1 && sub.activeReply(), "the catch-up in flight, the reply followed");
    const dispatchId = sub.activeReply().dispatchId;
    // The socket drops (the catch-up's request stays held) and stays down until the reply ended.
    proxy.refuse = true;
    proxy.drop("ws");
    await eventually(async () => (await direct.getSession(id)).agent_status?.status === "idle", "the reply to end on the server", 15000);
    proxy.refuse = false;
    await eventually(() => seen.length === 132, "the rejoin's replay, with the stored reply");
    proxy.release();
    await sub.joined;
    await sleep(500); // the held catch-up's answer has come and gone
    // What the first join said (a reply streaming) is stale: the rejoin's answer (none) counts.
    assert.equal(sub.lastJoin.stream, null);
    assert.equal(sub.activeReply(), undefined);
    for (const join of joins) assert.deepEqual(join.delivered, upTo(join.lastSeq), JSON.stringify(join));
    assert.equal(joins.at(-1).stream, null);
    assert.deepEqual(seen, upTo(132));
    const resumed = await readAll(sub.replyStream({ dispatchId }));
    assert.equal(resumed.at(-1).type, "finish");
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

describe("networking", () => {
  test("the default reconnect backoff is jittered and capped", () => {
    const backoff = jitteredBackoff();
    for (const [tries, ceiling] of [[1, 100], [2, 200], [3, 400], [7, 5000], [50, 5000]]) {
      const delays = Array.from({ length: 200 }, () => backoff(tries));
      assert.ok(delays.every((d) => Number.isInteger(d) && d >= 0 && d <= ceiling), `try ${tries}: ${Math.max(...delays)} > ${ceiling}`);
      assert.ok(new Set(delays).size > 20, `try ${tries}: spread`);
      assert.ok(Math.max(...delays) > ceiling / 2, `try ${tries}: reaches up to its ceiling`);
    }
    const custom = jitteredBackoff({ baseMs: 10, capMs: 40 });
    assert.ok(Array.from({ length: 100 }, () => custom(9)).every((d) => d <= 40));
  });

  test("connectionState follows the socket: connecting, open, reconnecting while refused, open, closed", async () => {
    const { id, write } = await sessionWith(1);
    const proxy = await startProxy(base);
    const c = new FleetLMClient({ url: proxy.origin, userId: "alice", WebSocket });
    const states = [];
    c.on("state", (state, previous) => states.push(`${previous}>${state}`));
    assert.equal(c.connectionState, "closed");
    const sub = await c.subscribe(id);
    const { seen } = record(sub);
    await sub.joined;
    assert.equal(c.connectionState, "open");
    proxy.refuse = true;
    proxy.drop();
    await eventually(() => c.connectionState === "reconnecting", "reconnecting");
    const refusedBefore = proxy.attempts.filter((a) => a.refused).length;
    await eventually(() => proxy.attempts.filter((a) => a.refused).length >= refusedBefore + 3, "refused reconnects", 15000);
    assert.equal(c.connectionState, "reconnecting");
    await write("while down");
    proxy.refuse = false;
    await eventually(() => c.connectionState === "open", "open again", 15000);
    await eventually(() => seen.length === 2, "the message written while down");
    c.close();
    assert.equal(c.connectionState, "closed");
    assert.deepEqual(states, ["closed>connecting", "connecting>open", "open>reconnecting", "reconnecting>open", "open>closed"]);
    assert.deepEqual(seen, [1, 2]);
  });

  test("a REST catch-up answered 503 no_leader is retried no sooner than its retry-after", async () => {
    const { id } = await sessionWith(130);
    const proxy = await startProxy(base);
    const body = JSON.stringify({ error: "no leader for this session's shard; retry", code: "no_leader" });
    proxy.answerCatchUp =
      `HTTP/1.1 503 Service Unavailable\r\ncontent-type: application/json\r\nretry-after: 1\r\n` +
      `content-length: ${Buffer.byteLength(body)}\r\nconnection: close\r\n\r\n${body}`;
    const c = client({ url: proxy.origin });
    const sub = await c.subscribe(id);
    const { seen, errors } = record(sub);
    const info = await sub.joined;
    assert.deepEqual(proxy.catchUps.map((r) => r.outcome), ["answered", "forwarded"]);
    const waited = proxy.catchUps[1].at - proxy.catchUps[0].at;
    assert.ok(waited >= 1000, `retried after ${waited} ms`);
    assert.equal(errors[0].code, "no_leader");
    assert.equal(errors[0].status, 503);
    assert.equal(errors[0].retryAfterMs, 1000);
    assert.equal(info.lastSeq, 130);
    assert.deepEqual(seen, upTo(130));
    sub.leave();
  });

  test("a socket send answered no_leader with retry_after_ms is sent again after that long, stored once", async () => {
    const { id } = await sessionWith(0);
    const proxy = await startProxy(base);
    const c = client({ url: proxy.origin });
    const sub = await c.subscribe(id);
    const { seen } = record(sub);
    await sub.joined;
    proxy.answerSend = { error: "no_leader", details: "no leader for this session's shard; retry", retry_after_ms: 700 };
    const sent = await sub.send({ kind: "note", content: { text: "once" }, clientId: "retry-1" });
    assert.deepEqual(proxy.sends.map((r) => r.outcome), ["answered", "forwarded"]);
    const waited = proxy.sends[1].at - proxy.sends[0].at;
    assert.ok(waited >= 700, `sent again after ${waited} ms`);
    assert.equal(sent.seq, 1);
    await eventually(() => seen.length === 1, "the message");
    const stored = await c.getMessages(id);
    assert.deepEqual(stored.map((m) => [m.seq, m.content.text]), [[1, "once"]]);
    // A code that is not "try again later" is not retried.
    proxy.answerSend = { error: "seq_conflict", details: "expected_seq does not match", last_seq: 1 };
    await assert.rejects(sub.send({ kind: "note", content: { text: "no" } }), (error) => error.code === "seq_conflict");
    assert.equal(proxy.sends.length, 3);
    sub.leave();
  });
});

describe("sends across a lost connection", () => {
  test("a send whose connection drops before its reply is sent again once the channel rejoins, not after its timeout", async () => {
    const { id } = await sessionWith(0);
    const proxy = await startProxy(base);
    const c = client({ url: proxy.origin, timeoutMs: 8000 });
    const sub = await c.subscribe(id);
    const { seen } = record(sub);
    await sub.joined;
    proxy.swallowSend = true;
    const started = Date.now();
    const sending = sub.send({ kind: "note", content: { text: "in flight" }, clientId: "lost-1" });
    await eventually(() => proxy.sends.length === 1, "the send on the wire");
    proxy.drop("ws");
    const sent = await sending;
    const tookMs = Date.now() - started;
    assert.ok(tookMs < 4000, `answered after ${tookMs} ms (the push timeout is 8000)`);
    assert.deepEqual(proxy.sends.map((r) => r.outcome), ["swallowed", "forwarded"]);
    assert.equal(sent.seq, 1);
    await eventually(() => seen.includes(1), "the message");
    // (The user's message also calls the agent: its reply is stored after it.)
    await eventually(async () => (await c.getMessages(id)).length === 2, "the agent's reply stored");
    const notes = async () => (await c.getMessages(id)).filter((m) => m.kind === "note").map((m) => [m.seq, m.content.text]);
    assert.deepEqual(await notes(), [[1, "in flight"]]);
    // A send made while the socket is down waits in phoenix's buffer and goes out once: not twice.
    proxy.refuse = true;
    proxy.drop("ws");
    await eventually(() => c.connectionState === "reconnecting", "reconnecting");
    const buffered = sub.send({ kind: "note", content: { text: "buffered" }, clientId: "buffered-1" });
    await sleep(300);
    proxy.refuse = false;
    const second = await buffered;
    assert.deepEqual(await notes(), [[1, "in flight"], [second.seq, "buffered"]]);
    assert.equal(second.deduplicated, undefined);
    assert.equal(proxy.sends.filter((r) => r.outcome === "forwarded").length, 2);
    sub.leave();
  });
});

describe("token refresh", () => {
  let tokenBase;
  before(async () => {
    tokenBase = await startServer({ FLEETLM_AUTH_SECRET: "a-test-secret-of-32-bytes-length!", FLEETLM_API_KEY: "admin-key" });
    await registerAgent(tokenBase, agent.origin, { id: "bot", apiKey: "admin-key" });
  });

  const mint = async (sub, ttl) => {
    const minted = await rest(tokenBase, "POST", "/api/tokens", { sub, ttl_seconds: ttl }, "admin-key");
    assert.equal(minted.status, 201);
    return minted.body.token;
  };

  test("a token is refreshed before it expires and the socket reconnects with it: no 4001, nothing lost", async () => {
    const asked = [];
    const c = new FleetLMClient({
      url: tokenBase,
      WebSocket,
      token: async () => {
        const token = await mint("tina", 3);
        asked.push({ at: Date.now(), expiresAt: tokenExpiresAt(token) });
        return token;
      },
    });
    clients.push(c);
    const writer = new FleetLMClient({ url: tokenBase, WebSocket, token: await mint("tina", 600) });
    clients.push(writer);
    const id = fresh("refresh");
    await writer.createSession({ agentId: "bot", id });
    const sub = await c.subscribe(id);
    const { seen, joins } = record(sub);
    await sub.joined;
    const socket = await c.socket();
    const closeCodes = [];
    socket.onClose((event) => closeCodes.push(event.code));
    const expiresAt = asked.at(-1).expiresAt;
    const written = [];
    // Written across the first token's expiry and the reconnects the refreshes make.
    while (Date.now() < expiresAt + 1500) {
      written.push((await writer.sendMessage(id, { kind: "note", content: { text: `n${written.length}` } })).seq);
      await sleep(150);
    }
    await eventually(() => written.every((seq) => seen.includes(seq)), "every message written");
    assert.ok(!closeCodes.includes(4001), `closed by the server: ${closeCodes}`);
    assert.ok(asked.some((a) => a.at < expiresAt && a.expiresAt > expiresAt), "a new token was asked for before the first expired");
    assert.ok(joins.some((j) => j.rejoin), "the subscription rejoined with the new token");
    assert.deepEqual(seen, [...seen].sort((a, b) => a - b));
    assert.equal(new Set(seen).size, seen.length);
    // A refresh may be reconnecting right now (3 s tokens): it ends open.
    await eventually(() => c.connectionState === "open", "the connection is open again");
    sub.leave();
  });
});
