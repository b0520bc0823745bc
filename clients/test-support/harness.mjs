// What the client packages' tests need, all real: a `fleetlm serve` (the binary cargo built, named
// by FLEETLM_BIN, on 127.0.0.1:0 with a temporary data dir) and a streaming agent (a Node HTTP
// server in this process that streams AI SDK UI message chunks slowly enough to reconnect or stop
// mid-stream, asks for tool approvals, and records every request and whether it was aborted).
import { spawn } from "node:child_process";
import { mkdtempSync, rmSync } from "node:fs";
import { createServer } from "node:http";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { AbstractChat } from "ai";

const children = [];
const dirs = [];
const servers = [];

function waitForLine(child, pattern, what, timeoutMs = 20000) {
  return new Promise((resolve, reject) => {
    let seen = "";
    const timer = setTimeout(() => reject(new Error(`${what} did not start within ${timeoutMs} ms:\n${seen}`)), timeoutMs);
    child.stdout.setEncoding("utf8");
    child.stdout.on("data", (text) => {
      seen += text;
      const match = pattern.exec(seen);
      if (match) {
        clearTimeout(timer);
        resolve(match);
      }
    });
    child.once("exit", (code) => {
      clearTimeout(timer);
      reject(new Error(`${what} exited with ${code}:\n${seen}`));
    });
  });
}

/** Starts `fleetlm serve`; returns its base URL. `env` adds environment (token mode etc.). */
export async function startServer(env = {}) {
  const binary = process.env.FLEETLM_BIN;
  if (!binary) throw new Error("FLEETLM_BIN must name the built fleetlm binary (cargo build; tests/clients_js.rs sets it)");
  const dataDir = mkdtempSync(join(tmpdir(), "fleetlm-clients-"));
  dirs.push(dataDir);
  const child = spawn(
    binary,
    [
      "serve",
      "--http-addr",
      "127.0.0.1:0",
      "--data-dir",
      dataDir,
      "--shards",
      "4",
      "--wal-lanes",
      "1",
      "--flush-interval-ms",
      "50",
      "--inbox-push-interval-ms",
      "100",
      "--agent-max-attempts",
      "1",
    ],
    { env: { PATH: process.env.PATH, RUST_LOG: "warn", ...env }, stdio: ["ignore", "pipe", "inherit"] },
  );
  children.push(child);
  const match = await waitForLine(child, /listening on (http:\/\/\S+)/, "fleetlm");
  return match[1];
}

export async function rest(base, method, path, body, token) {
  const headers = { "content-type": "application/json" };
  if (token) headers.authorization = `Bearer ${token}`;
  const response = await fetch(`${base}${path}`, { method, headers, body: body === undefined ? undefined : JSON.stringify(body) });
  const text = await response.text();
  let json = null;
  try {
    json = text ? JSON.parse(text) : null;
  } catch {
    json = text;
  }
  return { status: response.status, body: json };
}

/** Registers an agent at `origin`; returns its id. */
export async function registerAgent(base, origin, { id = "bot", debounce = 0, apiKey } = {}) {
  const response = await rest(
    base,
    "POST",
    "/api/agents",
    { agent: { id, name: id, origin_url: origin, debounce_window_ms: debounce, timeout_ms: 10000 } },
    apiKey,
  );
  if (response.status !== 201) throw new Error(`agent registration failed: ${JSON.stringify(response)}`);
  return id;
}

const sleep = (ms) => new Promise((resolve) => setTimeout(resolve, ms));

/**
 * The test agent. It answers the newest user message (the last `text` one; `tool_result`
 * messages continue the message they name):
 * - `slow …`: 40 words, 60 ms apart (about 2.5 s: time to reload, reconnect or stop);
 * - `approve …`: a `deleteFile` tool call that needs the user's approval; once a `tool_result`
 *   approves it, the same message continues with "Deleted <file>." (or "Not deleted." if denied);
 * - `ask …`: a client-side tool `askColor` (no output); once a `tool_result` gives the output,
 *   the same message continues with "You chose <output>.";
 * - `json …`: a plain JSON UI message ("a plain reply"), nothing streamed;
 * - `anon …`: "no id", with a `start` chunk that names no message id;
 * - anything else: "echo: <text>" word by word, 20 ms apart.
 * Every request is recorded in `requests` as `{body, aborted, finished}`.
 */
export async function startAgent() {
  const requests = [];
  let replies = 0;
  const server = createServer((request, response) => {
    let raw = "";
    request.on("data", (chunk) => (raw += chunk));
    request.on("end", async () => {
      const body = JSON.parse(raw);
      const record = { body, aborted: false, finished: false, reply: ++replies };
      requests.push(record);
      response.on("close", () => {
        if (!response.writableFinished) record.aborted = true;
      });
      const messages = body.messages;
      const last = messages[messages.length - 1];
      const lastText = [...messages].reverse().find((m) => m.sender_id === body.user_id && m.kind === "text");
      const text = lastText?.content?.text ?? "";
      if (text.startsWith("json") && last?.kind === "text") {
        // A plain JSON answer: nothing streams, FleetLM stores the message.
        record.finished = true;
        response.writeHead(200, { "content-type": "application/json" });
        response.end(JSON.stringify({ id: `json-${record.reply}`, role: "assistant", parts: [{ type: "text", text: "a plain reply", state: "done" }] }));
        return;
      }
      response.writeHead(200, { "content-type": "application/x-ndjson" });
      const send = async (chunk, delay = 0) => {
        if (record.aborted || response.destroyed) return false;
        response.write(JSON.stringify(chunk) + "\n");
        if (delay) await sleep(delay);
        return !record.aborted;
      };
      try {
        if (last?.kind === "tool_result") {
          await continueAfterTool(last, messages, send);
        } else if (text.startsWith("slow")) {
          await send({ type: "start", messageId: `slow-${record.reply}` });
          await send({ type: "start-step" });
          await send({ type: "text-start", id: "t" });
          for (let i = 0; i < 40; i++) if (!(await send({ type: "text-delta", id: "t", delta: `w${i} ` }, 60))) return;
          await send({ type: "text-end", id: "t" });
          await send({ type: "finish-step" });
          await send({ type: "finish" });
        } else if (text.startsWith("approve")) {
          const file = text.split(" ")[1] ?? "notes.txt";
          await send({ type: "start", messageId: `tool-${record.reply}` });
          await send({ type: "start-step" });
          await send({ type: "tool-input-start", toolCallId: `call-${record.reply}`, toolName: "deleteFile" }, 20);
          await send({ type: "tool-input-available", toolCallId: `call-${record.reply}`, toolName: "deleteFile", input: { file } }, 20);
          await send({ type: "tool-approval-request", approvalId: `approval-${record.reply}`, toolCallId: `call-${record.reply}` });
          await send({ type: "finish-step" });
          await send({ type: "finish" });
        } else if (text.startsWith("ask")) {
          await send({ type: "start", messageId: `ask-${record.reply}` });
          await send({ type: "start-step" });
          await send({ type: "tool-input-available", toolCallId: `ask-${record.reply}`, toolName: "askColor", input: { question: "Which color?" } });
          await send({ type: "finish-step" });
          await send({ type: "finish" });
        } else if (text.startsWith("anon")) {
          // A reply whose start chunk names no message id (FleetLM generates one).
          await send({ type: "start" });
          await send({ type: "text-start", id: "t" });
          await send({ type: "text-delta", id: "t", delta: "no id" }, 20);
          await send({ type: "text-end", id: "t" });
          await send({ type: "finish" });
        } else {
          await send({ type: "start", messageId: `echo-${record.reply}` });
          await send({ type: "text-start", id: "t" });
          for (const word of `echo: ${text}`.split(/(?<= )/)) if (!(await send({ type: "text-delta", id: "t", delta: word }, 20))) return;
          await send({ type: "text-end", id: "t" });
          await send({ type: "finish" });
        }
        record.finished = true;
        response.end();
      } catch (error) {
        response.destroy(error);
      }
    });
  });
  await new Promise((resolve) => server.listen(0, "127.0.0.1", resolve));
  servers.push(server);
  return { origin: `http://127.0.0.1:${server.address().port}`, requests };
}

async function continueAfterTool(toolResult, messages, send) {
  const { message_id: messageId, parts } = toolResult.content;
  await send({ type: "start", messageId });
  await send({ type: "start-step" });
  await send({ type: "text-start", id: "c" });
  const part = parts[0];
  let text;
  if (part.state === "approval-responded") text = part.approval.approved ? `Deleted ${part.input.file}.` : "Not deleted.";
  else if (part.state === "output-available") text = `You chose ${part.output}.`;
  else text = `The tool failed: ${part.errorText}.`;
  await send({ type: "text-delta", id: "c", delta: text }, 20);
  await send({ type: "text-end", id: "c" });
  await send({ type: "finish-step" });
  await send({ type: "finish" });
}

/** A chat on the AI SDK's own machinery: `AbstractChat` with a plain in-memory state. */
export class TestChat extends AbstractChat {
  constructor(init) {
    const listeners = new Set();
    const state = {
      status: "ready",
      error: undefined,
      messages: init.messages ?? [],
      pushMessage(message) {
        this.messages = this.messages.concat(message);
      },
      popMessage() {
        this.messages = this.messages.slice(0, -1);
      },
      replaceMessage(index, message) {
        this.messages = [...this.messages.slice(0, index), structuredClone(message), ...this.messages.slice(index + 1)];
      },
      snapshot: (thing) => structuredClone(thing),
    };
    let status = "ready";
    Object.defineProperty(state, "status", {
      get: () => status,
      set: (value) => {
        status = value;
        for (const listener of listeners) listener(value);
      },
    });
    super({ ...init, state });
    this.statusListeners = listeners;
  }

  /** Resolves when `predicate(this)` holds (checked on every status change and every 10 ms). */
  async until(predicate, what = "condition", timeoutMs = 10000) {
    const deadline = Date.now() + timeoutMs;
    while (!predicate(this)) {
      if (Date.now() > deadline) {
        throw new Error(`timed out waiting for ${what}; status ${this.status}, messages ${JSON.stringify(this.messages)}`);
      }
      await sleep(10);
    }
  }
}

/** JSON-normalised copies (drops `undefined` members), for deep equality. */
export function plain(value) {
  return JSON.parse(JSON.stringify(value));
}

export { sleep };

/** Polls `fn` until it returns a truthy value. */
export async function eventually(fn, what = "condition", timeoutMs = 10000) {
  const deadline = Date.now() + timeoutMs;
  for (;;) {
    const value = await fn();
    if (value) return value;
    if (Date.now() > deadline) throw new Error(`timed out waiting for ${what}`);
    await sleep(20);
  }
}

process.on("exit", () => {
  for (const child of children) if (child.exitCode === null) child.kill("SIGKILL");
});

export async function stopAll() {
  for (const child of children) if (child.exitCode === null) child.kill("SIGKILL");
  for (const server of servers) {
    server.closeAllConnections?.();
    server.close();
  }
  for (const dir of dirs) rmSync(dir, { recursive: true, force: true });
}

/**
 * Which server features of the issue-11 protocol contract the server under test has (docs/
 * WEBSOCKET.md, docs/API.md): `cancel`, `regenerate` (their REST routes exist) and `resume`
 * (the session join reply says `stream`, so `stream_snapshot` carries chunks and indexes).
 * Tests of a missing feature are marked todo with the reason, so they still run and report.
 */
export async function probeFeatures(base, { agentId = "bot", WebSocket: ws } = {}) {
  const route = async (path) => {
    const response = await rest(base, "POST", path, {});
    return response.body?.code !== "not_found";
  };
  const features = {
    cancel: await route("/api/sessions/feature-probe/cancel"),
    regenerate: await route("/api/sessions/feature-probe/regenerate"),
    resume: false,
  };
  const { FleetLMClient } = await import("@fleetlm/client");
  const client = new FleetLMClient({ url: base, userId: "feature-probe", WebSocket: ws });
  try {
    const id = `feature-probe-${Date.now()}`;
    await client.createSession({ agentId, id });
    const subscription = await client.subscribe(id);
    features.resume = (await subscription.joined).stream !== undefined;
  } finally {
    client.close();
  }
  return features;
}

/** Marks the test todo (with the reason) when the server lacks a feature it needs. */
export function needs(t, present, feature) {
  if (!present) t.todo(`the server under test has no ${feature} yet (issue 11 server half, branch h11s)`);
}
