// The three packages as a user gets them: `npm pack` tarballs (prepack builds them) installed into a
// fresh project in os.tmpdir(), next to `ai`, `@ai-sdk/react`, `react` and `typescript` (the
// versions the workspace uses; @types/node and @types/json-schema for ai's own declarations), and a small TypeScript app importing every entry point (`.`,
// `@fleetlm/ai-sdk/messages`, `@fleetlm/ai-sdk/react`, `@fleetlm/agent/node`) built with tsc
// (module NodeNext, declarations checked: skipLibCheck off) and run with node.
import assert from "node:assert/strict";
import { spawnSync } from "node:child_process";
import { mkdirSync, mkdtempSync, readFileSync, readdirSync, rmSync, writeFileSync } from "node:fs";
import { tmpdir } from "node:os";
import { dirname, join, resolve } from "node:path";
import { after, test } from "node:test";
import { fileURLToPath } from "node:url";

const clients = resolve(dirname(fileURLToPath(import.meta.url)), "..");
const PACKAGES = ["client", "ai-sdk", "agent"];
const dir = mkdtempSync(join(tmpdir(), "fleetlm-tarballs-"));
after(() => rmSync(dir, { recursive: true, force: true }));

function run(command, args, cwd) {
  const { NODE_TEST_CONTEXT: _, ...env } = process.env;
  const result = spawnSync(command, args, { cwd, encoding: "utf8", env, maxBuffer: 64 << 20 });
  const output = `${result.stdout ?? ""}${result.stderr ?? ""}`;
  assert.equal(result.status, 0, `${command} ${args.join(" ")} failed in ${cwd}:\n${output}`);
  return output;
}

const versionOf = (name) => JSON.parse(readFileSync(join(clients, "node_modules", name, "package.json"), "utf8")).version;

test("the npm pack tarballs install into a fresh TypeScript app, which builds and runs", () => {
  const tarballs = join(dir, "tarballs");
  mkdirSync(tarballs);
  const workspaces = PACKAGES.flatMap((p) => ["--workspace", p]);
  run("npm", ["pack", ...workspaces, "--pack-destination", tarballs], clients);
  const files = readdirSync(tarballs).sort();
  assert.deepEqual(files, ["fleetlm-agent-0.1.0.tgz", "fleetlm-ai-sdk-0.1.0.tgz", "fleetlm-client-0.1.0.tgz"]);

  const app = join(dir, "app");
  mkdirSync(join(app, "src"), { recursive: true });
  writeFileSync(
    join(app, "package.json"),
    JSON.stringify(
      {
        name: "fleetlm-tarball-app",
        private: true,
        type: "module",
        dependencies: {
          "@fleetlm/client": `file:../tarballs/fleetlm-client-0.1.0.tgz`,
          "@fleetlm/ai-sdk": `file:../tarballs/fleetlm-ai-sdk-0.1.0.tgz`,
          "@fleetlm/agent": `file:../tarballs/fleetlm-agent-0.1.0.tgz`,
          ai: versionOf("ai"),
          "@ai-sdk/react": versionOf("@ai-sdk/react"),
          react: versionOf("react"),
        },
        devDependencies: {
          // ai's own declarations name Node's http, Buffer and json-schema's types.
          "@types/json-schema": "7.0.15",
          "@types/node": "20.19.43",
          "@types/react": versionOf("@types/react"),
          typescript: versionOf("typescript"),
        },
      },
      null,
      2,
    ),
  );
  writeFileSync(
    join(app, "tsconfig.json"),
    JSON.stringify({
      compilerOptions: {
        target: "ES2022",
        module: "NodeNext",
        moduleResolution: "NodeNext",
        lib: ["ES2023", "DOM"],
        types: ["node"],
        strict: true,
        skipLibCheck: false,
        outDir: "dist",
        rootDir: "src",
      },
      include: ["src"],
    }),
  );
  writeFileSync(
    join(app, "src", "app.ts"),
    `import { FleetLMClient, FleetLMError, type Message } from "@fleetlm/client";
import { FleetLMChatTransport, loadChatMessages, syncChat } from "@fleetlm/ai-sdk";
import { historyToUIMessages } from "@fleetlm/ai-sdk/messages";
import { useFleetLMChat } from "@fleetlm/ai-sdk/react";
import { createFleetLMHandler, toUIMessages, verifyFleetLMCall } from "@fleetlm/agent";
import { toNodeListener } from "@fleetlm/agent/node";
import type { ChatTransport, UIMessage } from "ai";

const client: FleetLMClient = new FleetLMClient({ url: "http://127.0.0.1:4000", userId: "alice" });
const transport: ChatTransport<UIMessage> = new FleetLMChatTransport({ url: "http://127.0.0.1:4000", userId: "alice", agentId: "bot" });
const history: Message[] = [];
const messages: UIMessage[] = historyToUIMessages(history, { userId: "alice" }).messages;
const exported = [FleetLMError, loadChatMessages, syncChat, useFleetLMChat, createFleetLMHandler, toUIMessages, verifyFleetLMCall, toNodeListener];
console.log(JSON.stringify({ client: client instanceof FleetLMClient, transport: typeof transport.sendMessages, messages: messages.length, exported: exported.every((f) => typeof f === "function") }));
`,
  );
  run("npm", ["install", "--no-audit", "--no-fund", "--prefer-offline"], app);
  run(process.execPath, [join(app, "node_modules", "typescript", "bin", "tsc"), "-p", "tsconfig.json"], app);
  const output = run(process.execPath, ["dist/app.js"], app);
  assert.deepEqual(JSON.parse(output.trim().split("\n").at(-1)), { client: true, transport: "function", messages: 0, exported: true });
});
