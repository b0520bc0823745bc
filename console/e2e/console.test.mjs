// The web console in headless Chromium against a real `fleetlm serve` and the example echo
// agent: agents (validation, create), the playground (a streamed reply, raw chunks, the webhook
// request), history after a reload, a live inbox count, sessions (filter, archive), health, and
// dead letters (a row the SQLite archive refuses), and token mode. Run by tests/console_e2e.rs (FLEETLM_BIN set); on failure a screenshot is saved.
import { after, before, describe, test } from "node:test";
import assert from "node:assert/strict";
import { gzipSync } from "node:zlib";
import {
  archiveSql,
  docsShot,
  docsShotsDir,
  launchBrowser,
  rest,
  startApprovalAgent,
  startEchoAgent,
  startServer,
  startToolAgent,
  step,
  stopAll,
} from "./harness.mjs";

const WAIT = { timeout: 15000 };
let base;
let agentOrigin;
let toolAgentOrigin;
let slowAgentOrigin;
let approvalAgentOrigin;
let browser;
let sessionId;

before(async () => {
  [base, agentOrigin, toolAgentOrigin, slowAgentOrigin, approvalAgentOrigin] = await Promise.all([
    startServer(),
    startEchoAgent(),
    startToolAgent(),
    // The same echo agent, slow enough (150 ms a word) to stop it mid-reply.
    startEchoAgent({ DELAY_MS: "150" }),
    startApprovalAgent(),
  ]);
  browser = await launchBrowser();
});

after(stopAll);

async function newPage() {
  const context = await browser.newContext({ viewport: { width: 1280, height: 820 } });
  const page = await context.newPage();
  const external = [];
  page.on("request", (request) => {
    const url = new URL(request.url());
    if (!["127.0.0.1", "localhost"].includes(url.hostname) && !url.protocol.startsWith("data")) external.push(request.url());
  });
  page.external = external;
  return page;
}

describe("open mode", () => {
  test("the console is small and never shadows the API", async () => {
    const index = await fetch(`${base}/`);
    assert.equal(index.status, 200);
    assert.match(index.headers.get("content-type"), /text\/html/);
    assert.match(index.headers.get("content-security-policy"), /default-src 'self'/);
    const html = await index.text();
    const assets = [...html.matchAll(/(?:src|href)="(\/assets\/[^"]+)"/g)].map((m) => m[1]);
    assert.ok(assets.length >= 2, `index.html references its assets: ${assets}`);
    let compressed = gzipSync(Buffer.from(html)).length;
    for (const asset of assets) {
      const response = await fetch(`${base}${asset}`);
      assert.equal(response.status, 200, asset);
      compressed += gzipSync(Buffer.from(await response.arrayBuffer())).length;
    }
    assert.ok(compressed < 200 * 1024, `first load is ${compressed} bytes gzipped`);

    const api404 = await rest(base, "GET", "/api/nope");
    assert.equal(api404.status, 404);
    assert.equal(api404.body.code, "not_found");
    assert.equal((await rest(base, "GET", "/api/agents")).status, 200);
    const ready = await rest(base, "GET", "/health/ready");
    assert.equal(ready.body.status, "ready");
    const metrics = await fetch(`${base}/metrics`);
    assert.match(metrics.headers.get("content-type"), /text\/plain/);
    assert.match(await metrics.text(), /fleetlm_/);
    const socket = await fetch(`${base}/socket/websocket?vsn=2.0.0&user_id=x`);
    assert.doesNotMatch(socket.headers.get("content-type") ?? "", /html/);
    assert.equal((await rest(base, "GET", "/assets/missing.js")).status, 404);
    assert.equal((await rest(base, "GET", "/agents")).body.code, "not_found");
  });

  test("agents: a validation error is shown inline, then the agent is created", async () => {
    const page = await newPage();
    await step(page, "agents", async () => {
      await page.goto(`${base}/#/agents`);
      await page.getByRole("button", { name: "New agent" }).click();
      await page.getByLabel("Id").fill("echo");
      await page.getByLabel("Name").fill("Echo agent");
      await page.getByLabel("Origin URL").fill("not a url");
      await page.getByLabel("Debounce window (ms)").fill("0");
      await page.getByRole("button", { name: "Create agent" }).click();
      const fieldError = page.locator(".field.invalid .field-error");
      await fieldError.waitFor(WAIT);
      assert.match(await fieldError.innerText(), /Origin URL must be an absolute http\(s\) URL/);
      assert.equal(await page.getByLabel("Origin URL").getAttribute("aria-invalid"), "true");
      await page.waitForFunction(() => document.activeElement?.getAttribute("name") === "origin_url", null, WAIT);
      await page.getByLabel("Origin URL").fill(agentOrigin);
      await page.getByRole("button", { name: "Create agent" }).click();
      await page.locator('tr[data-agent="echo"]').waitFor(WAIT);
    });
    assert.deepEqual(page.external, []);
    await page.context().close();
  });

  test("playground: the reply streams in, with its chunks; a reload shows the history", async () => {
    const page = await newPage();
    const words = Array.from({ length: 40 }, (_, i) => `word${i}`).join(" ");
    await step(page, "playground", async () => {
      await page.goto(`${base}/#/playground`);
      await page.getByLabel("Agent").selectOption("echo");
      await page.getByLabel("User id").fill("alice");
      await page.getByRole("button", { name: "Start session" }).click();
      await page.locator(".chat-status", { hasText: "Live" }).waitFor(WAIT);
      const composer = page.getByLabel("Message as alice");
      await composer.fill(words);
      const streaming = page.locator(".msg.streaming").waitFor(WAIT);
      await page.getByRole("button", { name: "Send" }).click();
      await streaming;
      await page.locator(".msg.agent:not(.streaming)", { hasText: `echo: ${words}` }).waitFor(WAIT);
      await page.locator('[data-testid="agent-status"]', { hasText: "idle" }).waitFor(WAIT);
      const chunks = await page.locator('[data-testid="chunks"] li').allInnerTexts();
      assert.ok(chunks.some((c) => c.includes('"type":"text-delta"')), "raw text-delta chunks are listed");
      assert.ok(chunks.some((c) => c.includes('"type":"finish"')), "the finish chunk is listed");
      const request = await page.locator("section[aria-labelledby=webhook-title]").innerText();
      assert.match(request, /"user_id": "alice"/);
      assert.match(request, /idempotency-key/);
      sessionId = (await page.locator(".playground a").first().innerText()).trim();
      await docsShot(page, "playground");

      await page.goto(`${base}/#/sessions/${encodeURIComponent(sessionId)}`);
      await page.reload();
      await page.locator(".msg.user", { hasText: "word39" }).waitFor(WAIT);
      await page.locator(".msg.agent", { hasText: `echo: ${words}` }).waitFor(WAIT);
      await page.locator(".chat-status", { hasText: "Live" }).waitFor(WAIT);
      await docsShot(page, "session");

      // The agent types (a raw Phoenix V2 socket as agent_id=echo): the watcher sees it.
      const agentPage = await page.context().newPage();
      await agentPage.goto(`${base}/#/health`);
      await agentPage.evaluate(async (topic) => {
        const ws = new WebSocket(`ws://${location.host}/socket/websocket?vsn=2.0.0&agent_id=echo`);
        await new Promise((done) => (ws.onopen = done));
        const joined = new Promise((done) => (ws.onmessage = (e) => JSON.parse(e.data)[3] === "phx_reply" && done()));
        ws.send(JSON.stringify(["1", "1", topic, "phx_join", { last_seq: 1000000 }]));
        await joined;
        ws.send(JSON.stringify(["1", "2", topic, "typing", { typing: true }]));
        window.agentSocket = ws;
      }, `session:${sessionId}`);
      await page.getByText("echo is typing…").waitFor(WAIT);
      await agentPage.close();
    });
    assert.deepEqual(page.external, []);
    await page.context().close();
  });

  test("playground: reasoning and a tool call with its input and output render as they stream", async () => {
    const page = await newPage();
    await step(page, "tools", async () => {
      const agent = await rest(base, "POST", "/api/agents", { agent: { id: "weather", name: "Weather agent", origin_url: toolAgentOrigin, debounce_window_ms: 0 } });
      assert.equal(agent.status, 201, JSON.stringify(agent.body));
      await page.goto(`${base}/#/playground`);
      await page.getByLabel("Agent").selectOption("weather");
      await page.getByLabel("User id").fill("alice");
      await page.getByRole("button", { name: "Start session" }).click();
      await page.locator(".chat-status", { hasText: "Live" }).waitFor(WAIT);
      await page.getByLabel("Message as alice").fill("What is the weather in Paris?");
      const streamingTool = page.locator(".msg.streaming .part-tool", { hasText: "weather" }).waitFor(WAIT);
      await page.getByRole("button", { name: "Send" }).click();
      await streamingTool;
      const stored = page.locator(".msg.agent:not(.streaming)", { hasText: "It is 21 °C and clear in Paris." });
      await stored.waitFor(WAIT);
      const text = await stored.innerText();
      assert.match(text, /call the weather tool/);
      assert.match(text, /Tool: weather/);
      assert.match(text, /"city": "Paris"/);
      assert.match(text, /"temperature_c": 21/);
      await page.locator('[data-testid="chunks"] li', { hasText: "tool-output-available" }).waitFor(WAIT);
      await docsShot(page, "playground-tools");
    });
    await page.context().close();
  });

  test("inbox: the unread count goes up live when the agent writes", async () => {
    const page = await newPage();
    await step(page, "inbox", async () => {
      await page.goto(`${base}/#/inbox/alice`);
      const total = page.locator('[data-testid="total-unread"]');
      await total.waitFor(WAIT);
      const before = Number(await total.innerText());
      const sent = await rest(base, "POST", `/api/sessions/${encodeURIComponent(sessionId)}/messages`, {
        user_id: "alice",
        kind: "text",
        content: { text: "one more please" },
      });
      assert.equal(sent.status, 200, JSON.stringify(sent.body));
      await page.waitForFunction(
        (expected) => Number(document.querySelector('[data-testid="total-unread"]')?.textContent) === expected,
        before + 1,
        WAIT,
      );
      await page.locator("td.preview", { hasText: "echo: one more please" }).waitFor(WAIT);
      await docsShot(page, "inbox");
      const row = page.locator(`tr[data-session="${sessionId}"]`);
      await row.getByRole("button", { name: "Mark read" }).click();
      await row.locator('[data-testid="unread"]', { hasText: /^0$/ }).waitFor(WAIT);
    });
    await page.context().close();
  });

  test("sessions: filter, open, archive", async () => {
    const page = await newPage();
    page.on("dialog", (dialog) => dialog.accept());
    await step(page, "sessions", async () => {
      await rest(base, "POST", "/api/sessions", { user_id: "bob", agent_id: "echo", id: "bob-session" });
      await page.goto(`${base}/#/sessions`);
      await page.getByRole("link", { name: "bob-session" }).waitFor(WAIT);
      await page.getByLabel("User").fill("alice");
      await page.getByRole("button", { name: "Filter" }).click();
      await page.getByRole("link", { name: "bob-session" }).waitFor({ ...WAIT, state: "detached" });
      await page.getByRole("link", { name: sessionId }).waitFor(WAIT);
      await docsShot(page, "sessions");
      await page.getByRole("link", { name: sessionId }).click();
      await page.getByRole("button", { name: "Archive" }).click();
      await page.locator('[data-testid="session-status"]', { hasText: "archived" }).waitFor(WAIT);
    });
    await page.context().close();
  });

  test("a long session shows its newest messages and pages back to the first", async () => {
    const page = await newPage();
    await step(page, "long-session", async () => {
      await rest(base, "POST", "/api/agents", { agent: { id: "quiet", name: "Quiet", origin_url: "http://127.0.0.1:9" } });
      await rest(base, "POST", "/api/sessions", { user_id: "dora", agent_id: "quiet", id: "long-1" });
      await rest(base, "DELETE", "/api/agents/quiet");
      for (let n = 1; n <= 130; n++) {
        const sent = await rest(base, "POST", "/api/sessions/long-1/messages", { user_id: "dora", content: { text: `line ${n}` } });
        assert.equal(sent.status, 200, JSON.stringify(sent.body));
      }
      await page.goto(`${base}/#/sessions/long-1`);
      await page.locator('li[data-seq="130"]').waitFor(WAIT);
      assert.equal(await page.locator('li[data-seq="1"]').count(), 0);
      await page.getByRole("button", { name: "Show earlier messages" }).click();
      await page.locator('li[data-seq="1"]').waitFor(WAIT);
      assert.equal(await page.locator("li[data-seq]").count(), 130);
      assert.equal(await page.getByRole("button", { name: "Show earlier messages" }).count(), 0);
    });
    await page.context().close();
  });

  test("a failing agent: agent_status failed with its reason, and no address shown", async () => {
    const page = await newPage();
    await step(page, "failing-agent", async () => {
      await rest(base, "POST", "/api/agents", { agent: { id: "down", name: "Down", origin_url: "http://127.0.0.1:9", debounce_window_ms: 0 } });
      await rest(base, "POST", "/api/sessions", { user_id: "erin", agent_id: "down", id: "down-1" });
      await page.goto(`${base}/#/sessions/down-1`);
      await page.locator(".chat-status", { hasText: "Live" }).waitFor(WAIT);
      await page.getByLabel("Message as erin").fill("anyone there?");
      await page.getByRole("button", { name: "Send" }).click();
      await page.locator('[data-testid="agent-status"]', { hasText: "failed" }).waitFor(WAIT);
      const status = await page.locator(".chat-status").innerText();
      assert.match(status, /connection refused/);
      assert.doesNotMatch(status, /127\.0\.0\.1|http:/);
      await page.getByRole("link", { name: "Agents" }).click();
      await page.locator('tr[data-agent="down"]').getByRole("button", { name: "Dispatches" }).click();
      const dispatches = page.locator(".dispatches");
      await dispatches.getByText("1 failed").waitFor(WAIT);
      // Its two webhook deliveries (--agent-max-attempts 2): retried, then failed.
      const deliveries = dispatches.getByTestId("deliveries");
      await deliveries.locator('tr[data-delivery="failed"]').waitFor(WAIT);
      const rows = await deliveries.locator("tbody tr").allInnerTexts();
      assert.equal(rows.length, 2, rows.join("\n"));
      assert.match(rows[0], /\b2\b[\s\S]*failed[\s\S]*connection refused/);
      assert.match(rows[1], /\b1\b[\s\S]*retried[\s\S]*connection refused/);
      assert.doesNotMatch(await dispatches.innerText(), /127\.0\.0\.1|http:/);
    });
    await page.context().close();
  });

  test("health: readiness and live charts", async () => {
    const page = await newPage();
    await step(page, "health", async () => {
      await page.goto(`${base}/#/health`);
      await page.locator('[data-testid="readiness"]', { hasText: "ready" }).waitFor(WAIT);
      assert.equal(await page.locator("figure.chart").count(), 6);
      // Some traffic (user messages, each answered by the echo agent) across a few samples.
      await rest(base, "POST", "/api/sessions", { user_id: "loader", agent_id: "echo", id: "load-1" });
      // (Longer and uneven when taking the docs' screenshots, so the charts have a shape.)
      const rounds = docsShotsDir ? 14 : 4;
      for (let round = 0; round < rounds; round++) {
        const messages = docsShotsDir ? 2 + ((round * 7) % 11) : 5;
        for (let n = 0; n < messages; n++) {
          await rest(base, "POST", "/api/sessions/load-1/messages", { user_id: "loader", kind: "text", content: { text: `load ${round}.${n}` } });
        }
        await new Promise((done) => setTimeout(done, 1100));
      }
      await page.waitForFunction(() => document.querySelectorAll("figure.chart polyline[points*=' ']").length >= 3, null, WAIT);
      await docsShot(page, "health");

      await page.getByRole("link", { name: "Agents" }).click();
      await page.locator('tr[data-agent="echo"]').getByRole("button", { name: "Dispatches" }).click();
      await page.getByRole("table", { name: "Recent dispatches of echo" }).waitFor(WAIT);
      await docsShot(page, "agents");
    });
    await page.context().close();
  });

  test("health: a row the archive refuses is listed as a dead letter, paged with load more", async () => {
    const page = await newPage();
    await step(page, "dead-letters", async () => {
      await page.goto(`${base}/#/health`);
      await page.getByTestId("no-dead-letters").waitFor(WAIT);
      assert.match(await page.getByTestId("no-dead-letters").innerText(), /no dead letters/i);

      // SQLite refuses (SQLITE_CONSTRAINT) any message row mentioning POISON from now on.
      archiveSql(base, "CREATE TRIGGER poison BEFORE INSERT ON messages WHEN NEW.content LIKE '%POISON%' BEGIN SELECT RAISE(ABORT, 'poison refused'); END;");
      await rest(base, "POST", "/api/agents", { agent: { id: "inert", name: "Inert", origin_url: "http://127.0.0.1:9" } });
      await rest(base, "POST", "/api/sessions", { user_id: "frank", agent_id: "inert", id: "poison-1" });
      await rest(base, "DELETE", "/api/agents/inert");
      // One more than a page (50), so the listing needs "load more".
      for (let n = 1; n <= 51; n++) {
        const sent = await rest(base, "POST", "/api/sessions/poison-1/messages", { user_id: "frank", content: { text: `POISON ${n}` } });
        assert.equal(sent.status, 200, JSON.stringify(sent.body));
      }
      // The flushes (every 50 ms) set them aside.
      const deadline = Date.now() + 15000;
      for (;;) {
        const listed = await rest(base, "GET", "/api/admin/dead_letters?session_id=poison-1&limit=500");
        if (listed.body.dead_letters.length === 51) break;
        assert.ok(Date.now() < deadline, `expected 51 dead letters: ${JSON.stringify(listed.body)}`);
        await new Promise((done) => setTimeout(done, 100));
      }

      await page.getByRole("button", { name: "Refresh" }).click();
      await page.getByTestId("dead-letter-count").filter({ hasText: "50+" }).waitFor(WAIT);
      const first = page.locator("tr[data-dead-letter]").first();
      const cells = await first.locator("td").allInnerTexts();
      assert.equal(cells[0], "message");
      assert.equal(cells[1], "poison-1");
      assert.match(cells[2], /^\d+$/);
      assert.match(cells[3], /poison/);
      assert.doesNotMatch(await page.locator(".dead-letters").innerText(), /127\.0\.0\.1|http:/);
      await first.scrollIntoViewIfNeeded();
      await docsShot(page, "dead-letters");
      await page.getByRole("button", { name: "Load more" }).click();
      await page.getByTestId("dead-letter-count").filter({ hasText: /^51$/ }).waitFor(WAIT);
      assert.equal(await page.getByRole("button", { name: "Load more" }).count(), 0);
      // (Ids order dead letters by when they were set aside, not strictly by seq within a flush.)
      const seqs = (await page.locator("tr[data-dead-letter] td:nth-child(3)").allInnerTexts()).map(Number);
      assert.deepEqual(seqs.sort((a, b) => a - b), Array.from({ length: 51 }, (_, i) => i + 1));

      // The session link opens the session, whose refused messages are still served.
      await first.getByRole("link", { name: "poison-1" }).click();
      await page.locator(".msg.user", { hasText: "POISON 51" }).waitFor(WAIT);
    });
    await page.context().close();
  });

  test("session view: after a resync it rejoins from the last seq shown and keeps updating", async () => {
    const page = await newPage();
    // The socket goes through a proxy that can push the server's `resync` to the page and then,
    // as the server does, stop passing on the messages of the channel it resynced.
    const joins = [];
    let toPage = null;
    let resynced = null;
    await page.routeWebSocket(/\/socket\/websocket/, (ws) => {
      const server = ws.connectToServer();
      toPage = ws;
      ws.onMessage((text) => {
        const frame = JSON.parse(text);
        if (frame[3] === "phx_join" && frame[2] === "session:resync-1") joins.push({ joinRef: frame[0], lastSeq: frame[4].last_seq });
        server.send(text);
      });
      server.onMessage((text) => {
        const frame = JSON.parse(text);
        if (resynced !== null && frame[0] === resynced && frame[3] === "message") return;
        ws.send(text);
      });
    });
    await step(page, "resync", async () => {
      await rest(base, "POST", "/api/agents", { agent: { id: "mute", name: "Mute", origin_url: "http://127.0.0.1:9" } });
      await rest(base, "POST", "/api/sessions", { user_id: "gina", agent_id: "mute", id: "resync-1" });
      await rest(base, "DELETE", "/api/agents/mute");
      const append = async (text) => {
        const sent = await rest(base, "POST", "/api/sessions/resync-1/messages", { user_id: "gina", content: { text } });
        assert.equal(sent.status, 200, JSON.stringify(sent.body));
      };
      await page.goto(`${base}/#/sessions/resync-1`);
      await page.locator(".chat-status", { hasText: "Live" }).waitFor(WAIT);
      await append("before the resync");
      await page.locator('li[data-seq="1"]', { hasText: "before the resync" }).waitFor(WAIT);
      assert.equal(joins.length, 1);
      resynced = joins[0].joinRef;
      toPage.send(JSON.stringify([resynced, null, "session:resync-1", "resync", { last_seq: 1 }]));
      for (let n = 1; n <= 3; n++) await append(`after the resync ${n}`);
      await page.locator('li[data-seq="4"]', { hasText: "after the resync 3" }).waitFor(WAIT);
      assert.equal(await page.locator("li[data-seq]").count(), 4);
      assert.equal(joins.length, 2, "one rejoin");
      assert.equal(joins[1].lastSeq, 1, "the rejoin starts after the last seq shown");
      // Live pushes on the new channel keep coming.
      await append("later");
      await page.locator('li[data-seq="5"]', { hasText: "later" }).waitFor(WAIT);
    });
    await page.context().close();
  });

  test("session view: stop a running turn (shown as cancelled, not failed), then regenerate the reply", async () => {
    const page = await newPage();
    const words = Array.from({ length: 20 }, (_, i) => `w${i}`).join(" ");
    await step(page, "cancel-regenerate", async () => {
      const agent = await rest(base, "POST", "/api/agents", { agent: { id: "slow", name: "Slow echo", origin_url: slowAgentOrigin, debounce_window_ms: 0 } });
      assert.equal(agent.status, 201, JSON.stringify(agent.body));
      await rest(base, "POST", "/api/sessions", { user_id: "hank", agent_id: "slow", id: "turns-1" });
      await page.goto(`${base}/#/sessions/turns-1`);
      await page.locator(".chat-status", { hasText: "Live" }).waitFor(WAIT);
      assert.equal(await page.getByRole("button", { name: "Regenerate" }).count(), 0, "nothing to regenerate yet");
      await page.getByLabel("Message as hank").fill(words);
      await page.getByRole("button", { name: "Send" }).click();
      await page.locator(".msg.streaming", { hasText: "echo: w0" }).waitFor(WAIT);
      await page.getByRole("button", { name: "Stop" }).click();
      await page.locator('[data-testid="agent-status"]', { hasText: "cancelled" }).waitFor(WAIT);
      // What had streamed is stored, marked aborted; the reply stopped short.
      const aborted = page.locator('.msg.agent:not(.streaming)', { hasText: "abort" });
      await aborted.waitFor(WAIT);
      assert.doesNotMatch(await aborted.innerText(), /w19/);
      assert.equal(await page.locator(".msg.streaming").count(), 0);
      const abortedSeq = await aborted.getAttribute("data-seq");

      await page.getByRole("button", { name: "Regenerate" }).click();
      await page.getByRole("button", { name: "Stop" }).waitFor(WAIT);
      const fresh = page.locator(".msg.agent:not(.streaming):not(.superseded)", { hasText: `echo: ${words}` });
      await fresh.waitFor(WAIT);
      await page.locator('[data-testid="agent-status"]', { hasText: "idle" }).waitFor(WAIT);
      assert.match(await page.locator(`li[data-seq="${abortedSeq}"]`).getAttribute("class"), /superseded/);
      assert.match(await page.locator(".msg.user", { hasText: "regenerate" }).innerText(), /regenerate/);
      await docsShot(page, "session-actions");

      await page.getByRole("link", { name: "Agents" }).click();
      await page.locator('tr[data-agent="slow"]').getByRole("button", { name: "Dispatches" }).click();
      const dispatches = page.locator(".dispatches");
      await dispatches.getByText("1 cancelled").waitFor(WAIT);
      assert.match(await dispatches.innerText(), /1 ok, 0 failed, 1 cancelled/);
      const badge = dispatches.locator('[data-outcome="cancelled"]');
      assert.equal(await badge.count(), 1);
      assert.doesNotMatch(await badge.getAttribute("class"), /\bbad\b/);
    });
    await page.context().close();
  });

  test("session view: a tool call waiting for approval is approved, then another is denied", async () => {
    const page = await newPage();
    await step(page, "approval", async () => {
      const agent = await rest(base, "POST", "/api/agents", { agent: { id: "careful", name: "Careful", origin_url: approvalAgentOrigin, debounce_window_ms: 0 } });
      assert.equal(agent.status, 201, JSON.stringify(agent.body));
      await rest(base, "POST", "/api/sessions", { user_id: "ivy", agent_id: "careful", id: "approve-1" });
      await page.goto(`${base}/#/sessions/approve-1`);
      await page.locator(".chat-status", { hasText: "Live" }).waitFor(WAIT);
      for (const [approve, answer] of [
        [true, "Deleted notes.txt."],
        [false, "Kept notes.txt."],
      ]) {
        await page.getByLabel("Message as ivy").fill("please clean up");
        await page.getByRole("button", { name: "Send" }).click();
        const asking = page.locator(".msg.agent:not(.streaming) .part-tool", { hasText: "approval-requested" });
        await asking.getByRole("button", { name: approve ? "Approve" : "Deny" }).click();
        await page.locator(".msg.agent", { hasText: answer }).waitFor(WAIT);
        assert.equal(await page.getByRole("button", { name: "Approve" }).count(), 0, "an answered call asks no more");
      }
      const history = await rest(base, "GET", "/api/sessions/approve-1/messages?limit=100");
      const results = history.body.messages.filter((m) => m.kind === "tool_result");
      assert.deepEqual(
        results.map((m) => m.content.parts[0].approval.approved),
        [true, false],
      );
      assert.equal(results[0].content.parts[0].state, "approval-responded");
    });
    await page.context().close();
  });

  test("keyboard: the navigation is reachable with Tab", async () => {
    const page = await newPage();
    await step(page, "keyboard", async () => {
      await page.goto(`${base}/#/agents`);
      await page.locator("h2", { hasText: "Agents" }).waitFor(WAIT);
      const focused = [];
      for (let i = 0; i < 4; i++) {
        await page.keyboard.press("Tab");
        focused.push(await page.evaluate(() => document.activeElement?.textContent?.trim()));
      }
      assert.deepEqual(focused.slice(0, 3), ["Skip to content", "Agents", "Sessions"]);
    });
    await page.context().close();
  });
});

describe("token mode", () => {
  const apiKey = "console-test-api-key";
  let tokenBase;

  before(async () => {
    tokenBase = await startServer({ FLEETLM_AUTH_SECRET: "console-e2e-secret-0123456789", FLEETLM_API_KEY: apiKey });
  });

  test("asks for the API key, keeps it in sessionStorage, and watches a session live", async () => {
    const page = await newPage();
    await step(page, "token-mode", async () => {
      const agent = await rest(tokenBase, "POST", "/api/agents", { agent: { id: "echo", name: "Echo", origin_url: agentOrigin, debounce_window_ms: 0 } }, apiKey);
      assert.equal(agent.status, 201, JSON.stringify(agent.body));
      const session = await rest(tokenBase, "POST", "/api/sessions", { id: "carol-1", user_id: "carol", agent_id: "echo" }, apiKey);
      assert.equal(session.status, 201, JSON.stringify(session.body));

      await page.goto(`${tokenBase}/#/sessions/carol-1`);
      await page.getByLabel("Admin API key").fill("wrong key");
      await page.getByRole("button", { name: "Sign in" }).click();
      await page.getByText("That API key was not accepted.").waitFor(WAIT);
      await page.getByLabel("Admin API key").fill(apiKey);
      await page.getByRole("button", { name: "Sign in" }).click();
      await page.locator(".chat-status", { hasText: "Live" }).waitFor(WAIT);
      assert.equal(await page.evaluate(() => sessionStorage.getItem("fleetlm.apiKey")), apiKey);
      assert.equal(await page.evaluate(() => localStorage.length), 0);
      await page.getByLabel("Message as carol").fill("hi from token mode");
      await page.getByRole("button", { name: "Send" }).click();
      await page.locator(".msg.agent", { hasText: "echo: hi from token mode" }).waitFor(WAIT);
      await page.getByRole("link", { name: "Agents" }).click();
      await page.getByRole("button", { name: "Dispatches" }).click();
      await page.getByText("1 ok").waitFor(WAIT);
      await page.getByRole("link", { name: "Health" }).click();
      await page.getByTestId("no-dead-letters").waitFor(WAIT);
    });
    await page.context().close();
  });

  test("health charts show data (/metrics is read with the API key)", async () => {
    const page = await newPage();
    await step(page, "token-health", async () => {
      await page.goto(`${tokenBase}/#/health`);
      await page.getByLabel("Admin API key").fill(apiKey);
      await page.getByRole("button", { name: "Sign in" }).click();
      await page.locator('[data-testid="readiness"]', { hasText: "ready" }).waitFor(WAIT);
      // Sockets is a gauge: known from the first scrape; rates need a second one.
      await page.locator("figure.chart", { hasText: "Sockets" }).locator("figcaption strong", { hasText: /^\d/ }).waitFor(WAIT);
      await page.waitForFunction(() => document.querySelectorAll("figure.chart polyline[points*=' ']").length >= 3, null, WAIT);
      assert.equal(await page.locator(".error").count(), 0);
    });
    await page.context().close();
  });
});
