// Starts what the browser tests need: a real `fleetlm serve` (the built binary in FLEETLM_BIN,
// on 127.0.0.1:0 with a temporary data dir), the example echo agent on a free port, and headless
// Debian Chromium driven by playwright-core. Everything is stopped by `stopAll()`.
import { spawn, spawnSync } from "node:child_process";
import { mkdtempSync, mkdirSync, rmSync } from "node:fs";
import { createServer as createHttpServer } from "node:http";
import { createServer } from "node:net";
import { tmpdir } from "node:os";
import { dirname, join, resolve } from "node:path";
import { fileURLToPath } from "node:url";
import { chromium } from "playwright-core";

const here = dirname(fileURLToPath(import.meta.url));
export const repoRoot = resolve(here, "../..");
const children = [];
const dirs = [];
const servers = [];
const dataDirs = new Map();
let browser = null;

function waitForLine(child, pattern, what, timeoutMs = 20000) {
  return new Promise((resolvePromise, reject) => {
    let seen = "";
    const timer = setTimeout(() => reject(new Error(`${what} did not start within ${timeoutMs} ms:\n${seen}`)), timeoutMs);
    child.stdout.setEncoding("utf8");
    child.stdout.on("data", (text) => {
      seen += text;
      const match = pattern.exec(seen);
      if (match) {
        clearTimeout(timer);
        resolvePromise(match);
      }
    });
    child.once("exit", (code) => {
      clearTimeout(timer);
      reject(new Error(`${what} exited with ${code}:\n${seen}`));
    });
  });
}

export async function startServer(env = {}) {
  const binary = process.env.FLEETLM_BIN;
  if (!binary) throw new Error("FLEETLM_BIN must name the built fleetlm binary");
  const dataDir = mkdtempSync(join(tmpdir(), "fleetlm-console-"));
  dirs.push(dataDir);
  const child = spawn(
    binary,
    ["serve", "--http-addr", "127.0.0.1:0", "--data-dir", dataDir, "--shards", "4", "--wal-lanes", "1", "--flush-interval-ms", "50", "--inbox-push-interval-ms", "200", "--agent-max-attempts", "2"],
    { env: { PATH: process.env.PATH, RUST_LOG: "warn", ...env }, stdio: ["ignore", "pipe", "inherit"] },
  );
  children.push(child);
  const match = await waitForLine(child, /listening on (http:\/\/\S+)/, "fleetlm");
  dataDirs.set(match[1], dataDir);
  return match[1];
}

/** Runs SQL on the SQLite archive of the server at `base` (Debian's `sqlite3` CLI). */
export function archiveSql(base, sql) {
  const file = join(dataDirs.get(base), "archive.sqlite3");
  const result = spawnSync("sqlite3", ["-cmd", ".timeout 10000", file, sql], { encoding: "utf8" });
  if (result.error) throw new Error(`the console tests need the sqlite3 CLI (apt-get install sqlite3): ${result.error.message}`);
  if (result.status !== 0) throw new Error(`sqlite3 failed: ${result.stderr}`);
  return result.stdout;
}

async function freePort() {
  return new Promise((resolvePromise, reject) => {
    const server = createServer();
    server.once("error", reject);
    server.listen(0, "127.0.0.1", () => {
      const { port } = server.address();
      server.close(() => resolvePromise(port));
    });
  });
}

/** The example agent (examples/echo-agent/server.mjs); returns its origin URL. */
export async function startEchoAgent(env = {}) {
  const port = await freePort();
  const child = spawn(process.execPath, [join(repoRoot, "examples/echo-agent/server.mjs")], {
    env: { PATH: process.env.PATH, PORT: String(port), ...env },
    stdio: ["ignore", "pipe", "inherit"],
  });
  children.push(child);
  await waitForLine(child, /echo agent on/, "echo agent");
  return `http://127.0.0.1:${port}`;
}

/** A scripted agent whose reply has reasoning, a tool call with streamed input and output, and
 * text, paced so the stream is visible; returns its origin URL. */
export async function startToolAgent() {
  const chunks = [
    { type: "start", messageId: "tool-reply" },
    { type: "start-step" },
    { type: "reasoning-start", id: "r" },
    { type: "reasoning-delta", id: "r", delta: "The user wants the weather; " },
    { type: "reasoning-delta", id: "r", delta: "call the weather tool." },
    { type: "reasoning-end", id: "r" },
    { type: "tool-input-start", toolCallId: "call-1", toolName: "weather" },
    { type: "tool-input-delta", toolCallId: "call-1", inputTextDelta: '{"city":' },
    { type: "tool-input-delta", toolCallId: "call-1", inputTextDelta: '"Paris"}' },
    { type: "tool-input-available", toolCallId: "call-1", toolName: "weather", input: { city: "Paris" } },
    { type: "tool-output-available", toolCallId: "call-1", output: { temperature_c: 21, sky: "clear" } },
    { type: "finish-step" },
    { type: "start-step" },
    { type: "text-start", id: "t" },
    { type: "text-delta", id: "t", delta: "It is 21 °C " },
    { type: "text-delta", id: "t", delta: "and clear in Paris." },
    { type: "text-end", id: "t" },
    { type: "finish-step" },
    { type: "finish" },
  ];
  const server = createHttpServer((request, response) => {
    request.resume();
    request.on("end", async () => {
      response.writeHead(200, { "content-type": "application/x-ndjson" });
      for (const chunk of chunks) {
        response.write(JSON.stringify(chunk) + "\n");
        await new Promise((done) => setTimeout(done, 60));
      }
      response.end();
    });
  });
  await new Promise((done) => server.listen(0, "127.0.0.1", done));
  servers.push(server);
  return `http://127.0.0.1:${server.address().port}`;
}

/** An agent whose tool call needs the user's approval: its first reply asks to delete a file
 * (`tool-approval-request`); once the history holds the user's `tool_result`, it says whether
 * the file was deleted. Returns its origin URL. */
export async function startApprovalAgent() {
  const server = createHttpServer((request, response) => {
    let body = "";
    request.on("data", (chunk) => (body += chunk));
    request.on("end", () => {
      const dispatch = JSON.parse(body);
      const newest = dispatch.messages[dispatch.messages.length - 1];
      const answer = newest?.kind === "tool_result" ? newest : undefined;
      const approved = answer?.content?.parts?.[0]?.approval?.approved;
      const chunks =
        answer === undefined
          ? [
              { type: "start", messageId: `ask-${dispatch.dispatch_id}` },
              { type: "tool-input-available", toolCallId: `del-${dispatch.dispatch_id}`, toolName: "deleteFile", input: { path: "notes.txt" } },
              { type: "tool-approval-request", approvalId: `approval-${dispatch.dispatch_id}`, toolCallId: `del-${dispatch.dispatch_id}` },
              { type: "finish" },
            ]
          : [
              { type: "start", messageId: `done-${dispatch.dispatch_id}` },
              { type: "text-start", id: "t" },
              { type: "text-delta", id: "t", delta: approved ? "Deleted notes.txt." : "Kept notes.txt." },
              { type: "text-end", id: "t" },
              { type: "finish" },
            ];
      response.writeHead(200, { "content-type": "application/x-ndjson" });
      response.end(chunks.map((c) => JSON.stringify(c) + "\n").join(""));
    });
  });
  await new Promise((done) => server.listen(0, "127.0.0.1", done));
  servers.push(server);
  return `http://127.0.0.1:${server.address().port}`;
}

export async function launchBrowser() {
  browser = await chromium.launch({
    executablePath: process.env.CHROMIUM ?? "/usr/bin/chromium",
    headless: true,
    timeout: 30000,
    args: ["--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu"],
  });
  return browser;
}

export const artifactsDir = process.env.FLEETLM_CONSOLE_ARTIFACTS ?? join(tmpdir(), "fleetlm-console-e2e");
export const docsShotsDir = process.env.FLEETLM_CONSOLE_SCREENSHOTS ?? null;

/** Runs `body`; on failure saves a screenshot of `page` for diagnosis and rethrows. */
export async function step(page, name, body) {
  try {
    return await body();
  } catch (error) {
    mkdirSync(artifactsDir, { recursive: true });
    const file = join(artifactsDir, `${name.replace(/[^a-z0-9-]+/gi, "-")}.png`);
    await page.screenshot({ path: file, fullPage: true }).catch(() => {});
    error.message += `\n(screenshot: ${file})`;
    throw error;
  }
}

/** Saves a screenshot for the docs when FLEETLM_CONSOLE_SCREENSHOTS names a directory. */
export async function docsShot(page, name) {
  if (!docsShotsDir) return;
  mkdirSync(docsShotsDir, { recursive: true });
  await page.screenshot({ path: join(docsShotsDir, `${name}.png`) });
}

// Whatever ends this process, the servers and agents it started end with it.
process.on("exit", () => {
  for (const child of children) if (child.exitCode === null) child.kill("SIGKILL");
});

export async function stopAll() {
  if (browser) await browser.close().catch(() => {});
  for (const child of children) if (child.exitCode === null) child.kill("SIGKILL");
  for (const server of servers) server.close();
  for (const dir of dirs) rmSync(dir, { recursive: true, force: true });
}

export async function rest(base, method, path, body, apiKey) {
  const headers = { "content-type": "application/json" };
  if (apiKey) headers.authorization = `Bearer ${apiKey}`;
  const response = await fetch(`${base}${path}`, { method, headers, body: body === undefined ? undefined : JSON.stringify(body) });
  const text = await response.text();
  let json = null;
  try {
    json = text ? JSON.parse(text) : null;
  } catch {
    json = text;
  }
  return { status: response.status, headers: response.headers, body: json };
}
