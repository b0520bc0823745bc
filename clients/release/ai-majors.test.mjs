// @fleetlm/ai-sdk against each major of the AI SDK its `ai` peer range names (5, 6 and 7), and
// @fleetlm/agent against each of its own (6 and 7): for each, the package's sources type-check
// against that major's types (ai-sdk: and its @ai-sdk/react), and the package's own tests
// (ai-sdk/test/: the transport with the AI SDK's AbstractChat, against a real fleetlm server and
// a streaming agent; agent/test/: streamText with the AI SDK's mock model) run with `ai` resolving
// to that major. The majors are npm aliases in ai-sdk's devDependencies (ai5, ai6, ai7,
// ai-sdk-react2, ai-sdk-react3; locked in package-lock.json); each run gets a directory in
// os.tmpdir() whose node_modules/ai links to one of them, with copies of the tests and of the
// two packages (so that their `import … from "ai"` resolves there).
// Needs the packages built (`npm run build`) and FLEETLM_BIN (see test-support/harness.mjs).
import assert from "node:assert/strict";
import { spawnSync } from "node:child_process";
import { copyFileSync, cpSync, existsSync, mkdirSync, mkdtempSync, readFileSync, readdirSync, rmSync, symlinkSync, writeFileSync } from "node:fs";
import { tmpdir } from "node:os";
import { dirname, join, resolve } from "node:path";
import { after, test } from "node:test";
import { fileURLToPath } from "node:url";

const clients = resolve(dirname(fileURLToPath(import.meta.url)), "..");
const modules = join(clients, "node_modules");
const tsc = join(modules, "typescript", "bin", "tsc");

// agent: whether @fleetlm/agent's range (ai ≥ 6: tool approvals) includes the major.
const MAJORS = [
  { major: 5, ai: "ai5", react: "ai-sdk-react2", agent: false },
  { major: 6, ai: "ai6", react: "ai-sdk-react3", agent: true },
  { major: 7, ai: "ai7", react: "@ai-sdk/react", agent: true },
];

const dirs = [];
after(() => {
  for (const dir of dirs) rmSync(dir, { recursive: true, force: true });
});

function link(target, path) {
  mkdirSync(dirname(path), { recursive: true });
  symlinkSync(target, path, "dir");
}

function copyDir(from, to) {
  mkdirSync(to, { recursive: true });
  for (const name of readdirSync(from)) copyFileSync(join(from, name), join(to, name));
}

/** A directory where `ai` is the given major and @fleetlm/* are the workspace's packages. */
function project({ major, ai }) {
  for (const name of [ai, "ws", "typescript", "standardwebhooks", "zod"]) {
    assert.ok(existsSync(join(modules, name)), `clients/node_modules/${name} is missing: run npm ci in clients/`);
  }
  for (const pkg of ["client", "ai-sdk", "agent"]) {
    assert.ok(existsSync(join(clients, pkg, "dist", "index.js")), `clients/${pkg}/dist is missing: run npm run build in clients/`);
  }
  const dir = mkdtempSync(join(tmpdir(), `fleetlm-ai${major}-`));
  dirs.push(dir);
  link(join(modules, ai), join(dir, "node_modules", "ai"));
  link(join(modules, "ws"), join(dir, "node_modules", "ws"));
  link(join(clients, "client"), join(dir, "node_modules", "@fleetlm", "client"));
  for (const name of ["standardwebhooks", "zod"]) link(join(modules, name), join(dir, "node_modules", name));
  // Copies, not links: whatever they import from "ai" resolves to this major too.
  for (const pkg of ["ai-sdk", "agent"]) {
    const copy = join(dir, "node_modules", "@fleetlm", pkg);
    mkdirSync(copy, { recursive: true });
    copyFileSync(join(clients, pkg, "package.json"), join(copy, "package.json"));
    cpSync(join(clients, pkg, "dist"), join(copy, "dist"), { recursive: true });
  }
  copyDir(join(clients, "test-support"), join(dir, "test-support"));
  copyDir(join(clients, "ai-sdk", "test"), join(dir, "ai-sdk", "test"));
  copyDir(join(clients, "agent", "test"), join(dir, "agent", "test"));
  return dir;
}

function run(command, args, cwd) {
  // Without NODE_TEST_CONTEXT a child `node --test` runs as its own runner, not a nested one.
  const { NODE_TEST_CONTEXT: _, ...env } = process.env;
  const result = spawnSync(command, args, { cwd, encoding: "utf8", env, maxBuffer: 64 << 20 });
  return { code: result.status, output: `${result.stdout ?? ""}${result.stderr ?? ""}` };
}

for (const spec of MAJORS) {
  test(`ai ${spec.major}: @fleetlm/ai-sdk${spec.agent ? " and @fleetlm/agent" : ""} type-check and pass their tests`, { timeout: 240_000 }, async (t) => {
    const version = JSON.parse(readFileSync(join(modules, spec.ai, "package.json"), "utf8")).version;
    const reactVersion = JSON.parse(readFileSync(join(modules, spec.react, "package.json"), "utf8")).version;
    assert.equal(Number(version.split(".")[0]), spec.major, `${spec.ai} is ai ${version}`);
    const dir = project(spec);
    // Resolved from the temporary directory, `ai` is this major.
    const resolved = run(process.execPath, ["--input-type=module", "-e", "import { createRequire } from 'node:module'; console.log(createRequire(process.cwd() + '/').resolve('ai/package.json'))"], dir);
    assert.equal(JSON.parse(readFileSync(resolved.output.trim(), "utf8")).version, version);

    await t.test(`tsc: ai-sdk/src against ai ${version} and @ai-sdk/react ${reactVersion}`, () => {
      writeFileSync(
        join(dir, "tsconfig.json"),
        JSON.stringify({
          extends: join(clients, "tsconfig.base.json"),
          compilerOptions: {
            noEmit: true,
            jsx: "react-jsx",
            paths: {
              ai: [join(modules, spec.ai, "dist", "index.d.ts")],
              "@ai-sdk/react": [join(modules, spec.react, "dist", "index.d.ts")],
            },
          },
          include: [join(clients, "ai-sdk", "src")],
        }),
      );
      const { code, output } = run(process.execPath, [tsc, "-p", join(dir, "tsconfig.json")], dir);
      assert.equal(code, 0, `tsc against ai ${version} failed:\n${output}`);
    });

    await t.test(`ai-sdk/test/ with ai ${version}`, () => {
      // The 500-chat test exercises the transport's channel bound, not the `ai` major: it runs
      // once, in the main suite, not once per major.
      const files = readdirSync(join(dir, "ai-sdk", "test"))
        .filter((name) => name.endsWith(".test.mjs") && name !== "many-chats.test.mjs")
        .map((name) => join("ai-sdk", "test", name));
      const { code, output } = run(
        process.execPath,
        ["--test", "--test-reporter=spec", "--test-concurrency=1", "--test-timeout=60000", ...files],
        dir,
      );
      console.log(`--- ai-sdk/test/ with ai ${version} ---\n${output}`);
      assert.equal(code, 0, `ai-sdk/test/ failed with ai ${version}`);
      assert.match(output, /ℹ fail 0/);
      assert.match(output, /ℹ pass [1-9]/);
    });

    if (!spec.agent) return;
    await t.test(`tsc: agent/src against ai ${version}`, () => {
      writeFileSync(
        join(dir, "tsconfig.agent.json"),
        JSON.stringify({
          extends: join(clients, "tsconfig.base.json"),
          compilerOptions: { noEmit: true, paths: { ai: [join(modules, spec.ai, "dist", "index.d.ts")] } },
          include: [join(clients, "agent", "src")],
        }),
      );
      const { code, output } = run(process.execPath, [tsc, "-p", join(dir, "tsconfig.agent.json")], dir);
      assert.equal(code, 0, `tsc (agent) against ai ${version} failed:\n${output}`);
    });

    await t.test(`agent/test/ with ai ${version}`, () => {
      const { code, output } = run(
        process.execPath,
        ["--test", "--test-reporter=spec", "--test-concurrency=1", "--test-timeout=60000", "agent/test/"],
        dir,
      );
      console.log(`--- agent/test/ with ai ${version} ---\n${output}`);
      assert.equal(code, 0, `agent/test/ failed with ai ${version}`);
      assert.match(output, /ℹ fail 0/);
      assert.match(output, /ℹ pass [1-9]/);
    });
  });
}
