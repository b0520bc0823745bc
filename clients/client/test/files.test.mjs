// @fleetlm/client's file calls (uploadFile, getFile, fileUrl, fileObjectUrl) against a real
// fleetlm server: the bytes round-trip, errors are FleetLMErrors with the server's codes, the
// token goes only to the server.
import assert from "node:assert/strict";
import { randomBytes } from "node:crypto";
import { createServer } from "node:http";
import { after, before, describe, test } from "node:test";
import { FleetLMClient, FleetLMError } from "@fleetlm/client";
import { registerAgent, rest, startAgent, startServer, stopAll } from "../../test-support/harness.mjs";

let base;
let agent;
let counter = 0;
const fresh = (prefix) => `${prefix}-${++counter}-${Date.now()}`;
const bytesOf = async (blob) => new Uint8Array(await blob.arrayBuffer());
const isError = (code, status) => (error) => {
  assert.ok(error instanceof FleetLMError, String(error));
  assert.equal(error.code, code);
  assert.equal(error.status, status);
  assert.equal(error.body?.code, code);
  return true;
};

before(async () => {
  base = await startServer();
  agent = await startAgent();
  await registerAgent(base, agent.origin, { id: "bot" });
});

after(async () => {
  await stopAll();
});

describe("files", () => {
  test("uploadFile takes a Uint8Array, an ArrayBuffer, a Blob or a File; getFile returns the exact bytes", async () => {
    const c = new FleetLMClient({ url: base, userId: "alice" });
    const id = fresh("files");
    await c.createSession({ agentId: "bot", id });
    const bytes = new Uint8Array(randomBytes(1024 * 1024 + 7));

    const typed = await c.uploadFile(id, bytes, { mediaType: "image/png", filename: "big.png" });
    assert.equal(typed.session_id, id);
    assert.equal(typed.media_type, "image/png");
    assert.equal(typed.filename, "big.png");
    assert.equal(typed.size, bytes.length);
    assert.match(typed.sha256, /^[0-9a-f]{64}$/);
    assert.equal(typed.url, `/api/sessions/${id}/files/${typed.id}`);
    const blob = await c.getFile(typed.url);
    assert.equal(blob.type, "image/png");
    assert.equal(Buffer.compare(await bytesOf(blob), bytes), 0);
    // A file object, or the absolute URL, work too.
    assert.equal(c.fileUrl(typed), `${base}${typed.url}`);
    assert.equal(c.fileUrl(`${base}${typed.url}`), `${base}${typed.url}`);
    assert.equal((await c.getFile(typed)).size, bytes.length);
    assert.equal((await c.getFile(c.fileUrl(typed))).size, bytes.length);

    // A view into a larger buffer sends only its bytes; no media type: application/octet-stream.
    const view = new Uint8Array(bytes.buffer, 10, 100);
    const sliced = await c.uploadFile(id, view);
    assert.equal(sliced.media_type, "application/octet-stream");
    assert.equal(sliced.size, 100);
    assert.equal(Buffer.compare(await bytesOf(await c.getFile(sliced)), bytes.subarray(10, 110)), 0);

    const buffer = await c.uploadFile(id, bytes.buffer.slice(0, 50), { mediaType: "application/pdf" });
    assert.equal(buffer.size, 50);
    assert.equal(buffer.media_type, "application/pdf");

    // A Blob's own type, a File's own name.
    const fromBlob = await c.uploadFile(id, new Blob(["plain text"], { type: "text/plain" }));
    assert.equal(fromBlob.media_type, "text/plain");
    assert.equal(await (await c.getFile(fromBlob)).text(), "plain text");
    const fromFile = await c.uploadFile(id, new File(["gif"], "anim.gif", { type: "image/gif" }));
    assert.equal(fromFile.filename, "anim.gif");
    assert.equal(fromFile.media_type, "image/gif");
  });

  test("upload errors are FleetLMErrors with the server's code", async () => {
    const c = new FleetLMClient({ url: base, userId: "alice" });
    const id = fresh("errors");
    await c.createSession({ agentId: "bot", id });
    await assert.rejects(c.uploadFile("no-such-session", new Uint8Array([1])), isError("session_not_found", 404));
    await assert.rejects(c.uploadFile(id, new Uint8Array(0)), isError("invalid_file", 422));
    await assert.rejects(c.uploadFile(id, new Uint8Array([1]), { mediaType: "not a type" }), isError("invalid_file", 422));
    await assert.rejects(c.uploadFile(id, new Uint8Array([1]), { filename: "a/b" }), isError("invalid_file", 422));
    await assert.rejects(c.getFile(`/api/sessions/${id}/files/AAAAAAAAAAAAAAAAAAAAAA`), isError("file_not_found", 404));
    await c.rest.archiveSession(id);
    await assert.rejects(c.uploadFile(id, new Uint8Array([1])), isError("session_archived", 409));
    const down = new FleetLMClient({ url: "http://127.0.0.1:9", userId: "alice" });
    await assert.rejects(down.uploadFile(id, new Uint8Array([1])), (error) => error instanceof FleetLMError && error.code === "network");
  });

  test("a file over max_file_bytes is refused with file_too_large", async () => {
    const small = await startServer({ FLEETLM_MAX_FILE_BYTES: "1000" });
    await registerAgent(small, agent.origin, { id: "bot" });
    const c = new FleetLMClient({ url: small, userId: "alice" });
    const id = fresh("small");
    await c.createSession({ agentId: "bot", id });
    await assert.rejects(c.uploadFile(id, new Uint8Array(1001), { mediaType: "image/png" }), isError("file_too_large", 413));
    assert.equal((await c.uploadFile(id, new Uint8Array(1000), { mediaType: "image/png" })).size, 1000);
  });
});

describe("token mode", () => {
  test("uploadFile and getFile send the token; another user is refused; a URL elsewhere gets no token", async () => {
    const tokenBase = await startServer({ FLEETLM_AUTH_SECRET: "a-test-secret-of-32-bytes-length!", FLEETLM_API_KEY: "admin-key" });
    await registerAgent(tokenBase, agent.origin, { id: "bot", apiKey: "admin-key" });
    const mint = async (sub) => (await rest(tokenBase, "POST", "/api/tokens", { sub, ttl_seconds: 600 }, "admin-key")).body.token;
    const token = await mint("tina");
    let asked = 0;
    const c = new FleetLMClient({ url: tokenBase, token: () => (asked++, token) });
    const id = fresh("token");
    await c.createSession({ agentId: "bot", id });
    const bytes = new Uint8Array(randomBytes(5000));
    const before = asked;
    const file = await c.uploadFile(id, bytes, { mediaType: "image/webp" });
    assert.ok(asked > before, "the token function is asked for the upload");
    assert.equal(Buffer.compare(await bytesOf(await c.getFile(file)), bytes), 0);
    const objectUrl = await c.fileObjectUrl(file);
    assert.equal(Buffer.compare(new Uint8Array(await (await fetch(objectUrl)).arrayBuffer()), bytes), 0);
    URL.revokeObjectURL(objectUrl);
    // Without a token: 401; another user's token: 403, on upload and download.
    assert.equal((await fetch(`${tokenBase}${file.url}`)).status, 401);
    const eve = new FleetLMClient({ url: tokenBase, token: await mint("eve") });
    await assert.rejects(eve.getFile(file), (error) => error instanceof FleetLMError && error.status === 403);
    await assert.rejects(eve.uploadFile(id, bytes), (error) => error instanceof FleetLMError && error.status === 403);

    // getFile of a URL on another server sends no token there.
    const seen = [];
    const elsewhere = createServer((request, response) => {
      seen.push(request.headers.authorization);
      response.writeHead(200, { "content-type": "text/plain" });
      response.end("elsewhere");
    });
    await new Promise((resolve) => elsewhere.listen(0, "127.0.0.1", resolve));
    try {
      const blob = await c.getFile(`http://127.0.0.1:${elsewhere.address().port}/cat.txt`);
      assert.equal(await blob.text(), "elsewhere");
      assert.deepEqual(seen, [undefined]);
    } finally {
      elsewhere.close();
    }
  });
});
