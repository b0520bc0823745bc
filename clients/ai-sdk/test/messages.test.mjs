// historyToUIMessages: the log → UIMessage[] rules (docs/CLIENTS.md, docs/API.md "Regenerate").
import assert from "node:assert/strict";
import { test } from "node:test";
import { historyToUIMessages } from "@fleetlm/ai-sdk";

let seq = 0;
const user = (kind, content, extra = {}) => ({ id: `f${++seq}`, seq, sender_id: "alice", kind, content, metadata: {}, ...extra });
const reply = (id, parts, metadata = {}) => ({
  id: `f${++seq}`,
  seq,
  sender_id: "bot",
  kind: "assistant",
  content: { id, role: "assistant", parts },
  metadata: { termination: "finish", dispatch_id: "d", ...metadata },
});
const text = (t) => ({ type: "text", text: t, state: "done" });
const convert = (history) => JSON.parse(JSON.stringify(historyToUIMessages(history, { userId: "alice" }).messages));

test("regenerations show the current branch only (the docs' example: hi, C)", () => {
  seq = 0;
  const history = [
    user("text", { text: "hi", id: "u1", parts: [{ type: "text", text: "hi" }] }),
    reply("A", [text("a")]),
    user("regenerate", {}),
    reply("B", [text("b")], { replaces: "f2" }),
    user("regenerate", {}),
    reply("C", [text("c")], { replaces: "f4" }),
  ];
  assert.deepEqual(convert(history), [
    { id: "u1", role: "user", parts: [{ type: "text", text: "hi" }] },
    { id: "C", role: "assistant", parts: [text("c")] },
  ]);
});

test("a tool result folds into its message, the continuation appends to it, a regenerate drops only the continuation", () => {
  seq = 0;
  const call = { type: "tool-deleteFile", toolCallId: "c1", state: "approval-requested", input: { file: "x" }, approval: { id: "a1" } };
  const answered = { ...call, state: "approval-responded", approval: { id: "a1", approved: true } };
  const history = [
    user("text", { text: "delete x" }, { id: "plain" }),
    reply("R", [{ type: "step-start" }, call], { model: "m" }),
    user("tool_result", { message_id: "R", parts: [answered] }),
    reply("R", [{ type: "step-start" }, text("Deleted x.")]),
  ];
  const expected = [
    { id: "plain", role: "user", parts: [{ type: "text", text: "delete x" }] },
    { id: "R", role: "assistant", parts: [{ type: "step-start" }, answered, { type: "step-start" }, text("Deleted x.")], metadata: { model: "m" } },
  ];
  assert.deepEqual(convert(history), expected);
  const regenerated = [...history, user("regenerate", {}), reply("R", [{ type: "step-start" }, text("Deleted x, again.")])];
  assert.deepEqual(convert(regenerated), [
    expected[0],
    { ...expected[1], parts: [{ type: "step-start" }, answered, { type: "step-start" }, text("Deleted x, again.")] },
  ]);
});

test("a continuation the server stored whole (metadata.continuation) replaces the earlier copies; a regenerate drops it and goes back to them", () => {
  seq = 0;
  const call = { type: "tool-deleteFile", toolCallId: "c1", state: "approval-requested", input: { file: "x" }, approval: { id: "a1" } };
  const answered = { ...call, state: "approval-responded", approval: { id: "a1", approved: true } };
  const done = { ...answered, state: "output-available", output: { deleted: "x" } };
  const history = [
    user("text", { text: "delete x" }, { id: "plain" }),
    reply("R", [{ type: "step-start" }, call], { model: "m" }),
    user("tool_result", { message_id: "R", parts: [answered] }),
    reply("R", [{ type: "step-start" }, done, { type: "step-start" }, text("Deleted x.")], { continuation: "whole" }),
  ];
  const first = { id: "plain", role: "user", parts: [{ type: "text", text: "delete x" }] };
  assert.deepEqual(convert(history), [
    first,
    { id: "R", role: "assistant", parts: [{ type: "step-start" }, done, { type: "step-start" }, text("Deleted x.")], metadata: { model: "m" } },
  ]);
  const regenerated = [...history, user("regenerate", {})];
  assert.deepEqual(convert(regenerated), [first, { id: "R", role: "assistant", parts: [{ type: "step-start" }, answered], metadata: { model: "m" } }]);
});

test("agent text written by REST, user metadata, and an edited user message", () => {
  seq = 0;
  const history = [
    user("text", { text: "one", id: "u1", parts: [{ type: "text", text: "one" }] }, { metadata: { lang: "en" } }),
    reply("r1", [text("echo one")]),
    (() => ({ id: `f${++seq}`, seq, sender_id: "bot", kind: "text", content: { text: "a note" }, metadata: {} }))(),
    user("text", { text: "uno", id: "u1", parts: [{ type: "text", text: "uno" }] }),
    reply("r2", [text("echo uno")]),
  ];
  assert.deepEqual(convert(history.slice(0, 3)), [
    { id: "u1", role: "user", parts: [{ type: "text", text: "one" }], metadata: { lang: "en" } },
    { id: "r1", role: "assistant", parts: [text("echo one")] },
    { id: "f3", role: "assistant", parts: [{ type: "text", text: "a note" }] },
  ]);
  // The edit (same UI id, new text) replaces the message and drops what followed it.
  assert.deepEqual(convert(history), [
    { id: "u1", role: "user", parts: [{ type: "text", text: "uno" }] },
    { id: "r2", role: "assistant", parts: [text("echo uno")] },
  ]);
});

test("a continuation's tool part for a tool call the message made updates that part (an approved tool's output), from @fleetlm/ai-sdk/messages too", async () => {
  seq = 0;
  const call = { type: "tool-deleteFile", toolCallId: "c1", input: { file: "x" } };
  const history = [
    user("text", { text: "delete x", id: "u1", parts: [{ type: "text", text: "delete x" }] }),
    reply("r1", [{ type: "step-start" }, { ...call, state: "approval-requested", approval: { id: "a1" } }]),
    user("tool_result", { message_id: "r1", parts: [{ ...call, state: "approval-responded", approval: { id: "a1", approved: true } }] }),
    reply("r1", [{ ...call, state: "output-available", output: { deleted: "x" } }, { type: "step-start" }, text("Deleted.")]),
  ];
  const expected = [
    { id: "u1", role: "user", parts: [{ type: "text", text: "delete x" }] },
    {
      id: "r1",
      role: "assistant",
      parts: [
        { type: "step-start" },
        { ...call, state: "output-available", approval: { id: "a1", approved: true }, output: { deleted: "x" } },
        { type: "step-start" },
        text("Deleted."),
      ],
    },
  ];
  assert.deepEqual(convert(history), expected);
  const pure = await import("@fleetlm/ai-sdk/messages");
  assert.deepEqual(JSON.parse(JSON.stringify(pure.historyToUIMessages(history, { userId: "alice" }).messages)), expected);
});

test("a request's body and headers (metadata.fleetlm_request) are not part of the UI message; requestOptions reads them", async () => {
  seq = 0;
  const request = { body: { model: "small" }, headers: { "x-tenant": "acme" } };
  const history = [
    user("text", { text: "hi", id: "u1", parts: [{ type: "text", text: "hi" }] }, { metadata: { from: "web", fleetlm_request: request } }),
    user("text", { text: "again", id: "u2", parts: [{ type: "text", text: "again" }] }, { metadata: { fleetlm_request: request } }),
  ];
  assert.deepEqual(convert(history), [
    { id: "u1", role: "user", parts: [{ type: "text", text: "hi" }], metadata: { from: "web" } },
    { id: "u2", role: "user", parts: [{ type: "text", text: "again" }] },
  ]);
  const pure = await import("@fleetlm/ai-sdk/messages");
  assert.deepEqual(pure.requestOptions(history[0].metadata), request);
  assert.equal(pure.requestOptions({ from: "web" }), undefined);
  assert.equal(pure.FLEETLM_REQUEST_KEY, "fleetlm_request");
});
