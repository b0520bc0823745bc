// `npm start`: everything the example needs, in one command.
// 1. FleetLM at FLEETLM_URL (default http://127.0.0.1:4000): used if it answers, else started
//    from this repository with `cargo run -- serve` (data in .fleetlm-data/);
// 2. the example echo agent (examples/echo-agent) on 127.0.0.1:8080, words 150 ms apart so that
//    reload-resume and Stop can be tried; used as is if something already answers there;
// 3. the agent registered as "echo" (if it is not yet);
// 4. this app on http://127.0.0.1:5173 (Vite dev server).
// Ctrl-C stops what it started.
import { spawn } from "node:child_process";
import { fileURLToPath } from "node:url";
import { createServer } from "vite";

const here = fileURLToPath(new URL(".", import.meta.url));
const repo = fileURLToPath(new URL("../../", import.meta.url));
const fleetlmUrl = process.env.FLEETLM_URL ?? "http://127.0.0.1:4000";
const agentPort = Number(process.env.AGENT_PORT ?? 8080);
const children = [];

async function answers(url) {
  try {
    const response = await fetch(url, { signal: AbortSignal.timeout(1000) });
    return response.status < 500 || response.status === 503;
  } catch {
    return false;
  }
}

async function waitFor(url, what, seconds) {
  for (let i = 0; i < seconds * 5; i++) {
    if (await answers(url)) return;
    await new Promise((resolve) => setTimeout(resolve, 200));
  }
  throw new Error(`${what} did not come up at ${url} within ${seconds} s`);
}

function run(command, args, options) {
  const child = spawn(command, args, { stdio: "inherit", ...options });
  children.push(child);
  child.on("exit", (code) => {
    if (code && code !== 0) console.error(`${command} exited with ${code}`);
  });
  return child;
}

function stopAll() {
  for (const child of children) if (child.exitCode === null) child.kill("SIGTERM");
}
process.on("SIGINT", () => {
  stopAll();
  process.exit(0);
});
process.on("exit", stopAll);

if (!(await answers(`${fleetlmUrl}/health/live`))) {
  const addr = new URL(fleetlmUrl).host;
  console.log(`starting FleetLM on ${addr} (cargo run -- serve; the first build takes a few minutes)…`);
  run("cargo", ["run", "--quiet", "--", "serve", "--http-addr", addr, "--data-dir", `${here}.fleetlm-data`], { cwd: repo });
  await waitFor(`${fleetlmUrl}/health/live`, "FleetLM", 900);
}
const agentOrigin = `http://127.0.0.1:${agentPort}`;
if (!(await answers(agentOrigin))) {
  run(process.execPath, [`${repo}examples/echo-agent/server.mjs`], {
    env: { ...process.env, PORT: String(agentPort), DELAY_MS: process.env.DELAY_MS ?? "150" },
  });
  await waitFor(agentOrigin, "the echo agent", 10);
}
const registered = await fetch(`${fleetlmUrl}/api/agents`, {
  method: "POST",
  headers: { "content-type": "application/json" },
  body: JSON.stringify({ agent: { id: "echo", name: "Echo", origin_url: agentOrigin, debounce_window_ms: 0 } }),
});
if (registered.status !== 201 && registered.status !== 422) {
  throw new Error(`registering the echo agent failed: HTTP ${registered.status} ${await registered.text()}`);
}
// The app talks to this FleetLM (App.tsx reads VITE_FLEETLM_URL).
process.env.VITE_FLEETLM_URL = fleetlmUrl;
const vite = await createServer({ configFile: `${here}vite.config.ts`, root: here });
await vite.listen();
vite.printUrls();
console.log("Open the URL above; open it in a second tab (same #chat=…) to see both stay in sync.");
