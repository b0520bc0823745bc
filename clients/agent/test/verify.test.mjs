// verifyFleetLMCall against signatures made by the Standard Webhooks reference library
// (`standardwebhooks`), and the other way round; the real server's signatures are checked in
// examples/ai-sdk-agent/test/.
import assert from "node:assert/strict";
import { randomBytes } from "node:crypto";
import { describe, test } from "node:test";
import { Webhook } from "standardwebhooks";
import { FleetLMVerificationError, verifyFleetLMCall, verifySignature } from "@fleetlm/agent";

const secret = `whsec_${randomBytes(32).toString("base64")}`;
const other = `whsec_${randomBytes(32).toString("base64")}`;
const body = JSON.stringify({
  session_id: "s1",
  agent_id: "bot",
  user_id: "alice",
  dispatch_id: "AaIPD9f3d7-o2M-0olxmsA",
  attempt: 1,
  messages: [{ seq: 1, sender_id: "alice", kind: "text", content: { text: "héllo ✓" }, metadata: {}, inserted_at: "2026-11-24T19:37:05.792773Z" }],
});
const now = new Date();

/** Headers as FleetLM sends them, signed by the reference library under each secret given. */
function signed(secrets, { id = "AaIPD9f3d7-o2M-0olxmsA", at = now, payload = body } = {}) {
  const signatures = secrets.map((s) => new Webhook(s).sign(id, at, payload));
  return {
    "content-type": "application/json",
    "webhook-id": id,
    "webhook-timestamp": String(Math.floor(at.getTime() / 1000)),
    "webhook-signature": signatures.join(" "),
  };
}

async function refused(promise, code) {
  await assert.rejects(promise, (error) => {
    assert.ok(error instanceof FleetLMVerificationError, `a FleetLMVerificationError, not ${error}`);
    assert.equal(error.code, code);
    assert.equal(error.status, code === "invalid_body" ? 400 : 401);
    return true;
  });
}

describe("verifyFleetLMCall", () => {
  test("a call signed by the reference library verifies: from { headers, body } (text or bytes) and from a Request", async () => {
    const headers = signed([secret]);
    const call = await verifyFleetLMCall({ headers, body }, secret);
    assert.equal(call.id, "AaIPD9f3d7-o2M-0olxmsA");
    assert.equal(call.timestamp, Math.floor(now.getTime() / 1000));
    assert.equal(call.body.session_id, "s1");
    assert.equal(call.body.messages[0].content.text, "héllo ✓");
    assert.equal(call.rawBody, body);
    const bytes = new TextEncoder().encode(body);
    assert.equal((await verifyFleetLMCall({ headers, body: bytes }, secret)).body.user_id, "alice");
    assert.equal((await verifyFleetLMCall({ headers, body: bytes.buffer.slice(0) }, secret)).body.user_id, "alice");
    const controller = new AbortController();
    const request = new Request("http://agent.test/webhook", { method: "POST", headers, body, signal: controller.signal });
    const fromRequest = await verifyFleetLMCall(request, secret);
    assert.equal(fromRequest.body.dispatch_id, "AaIPD9f3d7-o2M-0olxmsA");
    assert.equal(fromRequest.signal.aborted, false);
    controller.abort();
    assert.equal(fromRequest.signal.aborted, true, "the call carries the request's abort signal");
  });

  test("header names in any case, as Node gives them or as HTTP/2 does", async () => {
    const headers = Object.fromEntries(Object.entries(signed([secret])).map(([k, v]) => [k.toUpperCase(), v]));
    assert.equal((await verifyFleetLMCall({ headers, body }, secret)).id, "AaIPD9f3d7-o2M-0olxmsA");
    assert.equal((await verifyFleetLMCall({ headers: new Headers(headers), body }, secret)).id, "AaIPD9f3d7-o2M-0olxmsA");
  });

  test("rotation: any one of several signatures may match, under any one of several secrets", async () => {
    // FleetLM during a grace period: the new secret's signature first, then the old one's.
    const both = signed([other, secret]);
    assert.ok(await verifyFleetLMCall({ headers: both, body }, secret), "an agent still on the old secret");
    assert.ok(await verifyFleetLMCall({ headers: both, body }, other), "an agent on the new secret");
    // The agent holds both while it deploys the new one; FleetLM signs with one.
    assert.ok(await verifyFleetLMCall({ headers: signed([other]), body }, [secret, other]));
    // Unknown versions are skipped.
    const versioned = { ...signed([secret]) };
    versioned["webhook-signature"] = `v2,abc ${versioned["webhook-signature"]}`;
    assert.ok(await verifyFleetLMCall({ headers: versioned, body }, secret));
  });

  test("refused: another secret, a changed body, another id or timestamp than signed", async () => {
    await refused(verifyFleetLMCall({ headers: signed([other]), body }, secret), "no_matching_signature");
    await refused(verifyFleetLMCall({ headers: signed([secret]), body: body.replace("alice", "mallory") }, secret), "no_matching_signature");
    await refused(verifyFleetLMCall({ headers: { ...signed([secret]), "webhook-id": "another" }, body }, secret), "no_matching_signature");
    const headers = signed([secret]);
    headers["webhook-timestamp"] = String(Number(headers["webhook-timestamp"]) - 1);
    await refused(verifyFleetLMCall({ headers, body }, secret), "no_matching_signature");
    const garbled = { ...signed([secret]), "webhook-signature": "v1,!!!not-base64 v1," };
    await refused(verifyFleetLMCall({ headers: garbled, body }, secret), "no_matching_signature");
  });

  test("refused: missing headers or signature, a bad or stale timestamp (tolerance 5 min by default)", async () => {
    const { "webhook-signature": _, ...unsigned } = signed([secret]);
    await refused(verifyFleetLMCall({ headers: unsigned, body }, secret), "missing_signature");
    const { "webhook-id": __, ...noId } = signed([secret]);
    await refused(verifyFleetLMCall({ headers: noId, body }, secret), "missing_headers");
    await refused(verifyFleetLMCall({ headers: { ...signed([secret]), "webhook-timestamp": "soon" }, body }, secret), "invalid_timestamp");
    const at0 = Date.now(); // margins of 10 s: a busy machine may take a while
    const old = new Date(at0 - 310_000);
    await refused(verifyFleetLMCall({ headers: signed([secret], { at: old }), body }, secret), "timestamp_too_old");
    const future = new Date(at0 + 310_000);
    await refused(verifyFleetLMCall({ headers: signed([secret], { at: future }), body }, secret), "timestamp_too_new");
    // Within the tolerance, or a wider one.
    assert.ok(await verifyFleetLMCall({ headers: signed([secret], { at: new Date(at0 - 290_000) }), body }, secret));
    assert.ok(await verifyFleetLMCall({ headers: signed([secret], { at: old }), body }, secret, { toleranceSeconds: 600 }));
    // A fixed clock.
    const at = new Date("2026-01-01T00:00:00Z");
    assert.ok(await verifyFleetLMCall({ headers: signed([secret], { at }), body }, secret, { now: () => at.getTime() + 1000 }));
  });

  test("refused with 400: a signed body that is not a FleetLM call", async () => {
    await refused(verifyFleetLMCall({ headers: signed([secret], { payload: "not json" }), body: "not json" }, secret), "invalid_body");
    await refused(verifyFleetLMCall({ headers: signed([secret], { payload: "{}" }), body: "{}" }, secret), "invalid_body");
  });

  test("a bad secret is a configuration error (TypeError), whatever the call", async () => {
    await assert.rejects(verifyFleetLMCall({ headers: signed([secret]), body }, "whsec_"), TypeError);
    await assert.rejects(verifyFleetLMCall({ headers: signed([secret]), body }, "whsec_***"), TypeError);
    await assert.rejects(verifyFleetLMCall({ headers: signed([secret]), body }, []), TypeError);
    await assert.rejects(verifySignature(signed([secret]), JSON.parse(body), secret), TypeError, "a parsed body is refused");
  });

  test("the reference library verifies what the server's scheme signs (cross-check of the scheme)", async () => {
    // Sign as docs/AGENTS.md says (HMAC-SHA256 of id.timestamp.body, base64) with Web Crypto…
    const key = await crypto.subtle.importKey("raw", Buffer.from(secret.slice(6), "base64"), { name: "HMAC", hash: "SHA-256" }, false, ["sign"]);
    const timestamp = String(Math.floor(Date.now() / 1000));
    const mac = await crypto.subtle.sign("HMAC", key, new TextEncoder().encode(`turn-1.${timestamp}.${body}`));
    const headers = { "webhook-id": "turn-1", "webhook-timestamp": timestamp, "webhook-signature": `v1,${Buffer.from(mac).toString("base64")}` };
    // …and both libraries accept it.
    new Webhook(secret).verify(body, headers);
    assert.equal((await verifyFleetLMCall({ headers, body }, secret)).id, "turn-1");
  });
});
