// Verifying that a call comes from your FleetLM: Standard Webhooks signatures
// (https://www.standardwebhooks.com, docs/AGENTS.md "Verifying a call"). Web Crypto only
// (`crypto.subtle`), so it runs in Node 20+, Deno, Bun, browsers and edge runtimes.
import type { FleetLMWebhookBody } from "./types.js";

/** Why a call was refused. */
export type FleetLMVerificationErrorCode =
  /** `webhook-id` or `webhook-timestamp` is missing. */
  | "missing_headers"
  /** No `webhook-signature` (an agent registered before FleetLM signed calls has none until its first rotation). */
  | "missing_signature"
  /** `webhook-timestamp` is not an integer number of seconds. */
  | "invalid_timestamp"
  /** The call was sent longer ago than the tolerance (a replay, or a clock far behind). */
  | "timestamp_too_old"
  /** The call claims to be sent in the future, beyond the tolerance. */
  | "timestamp_too_new"
  /** No signature matches any of the secrets: not from your FleetLM, or the body was changed. */
  | "no_matching_signature"
  /** The signature is right but the body is not a FleetLM call (not JSON, or not its shape). */
  | "invalid_body";

/** A call that failed verification. `status` is what to answer with (401; 400 for a bad body). */
export class FleetLMVerificationError extends Error {
  override readonly name = "FleetLMVerificationError";
  readonly code: FleetLMVerificationErrorCode;
  readonly status: number;

  constructor(code: FleetLMVerificationErrorCode, message: string) {
    super(message);
    this.code = code;
    this.status = code === "invalid_body" ? 400 : 401;
  }
}

/** Request headers: a `Headers` object, or a plain object (Node's `IncomingHttpHeaders`). */
export type HeadersLike = Headers | { get(name: string): string | null } | Record<string, string | string[] | undefined>;

/** A body's exact bytes (or its text, which is encoded as UTF-8). */
export type BodyLike = string | Uint8Array | ArrayBuffer;

/** A call to verify: a Fetch API `Request` (its body is read), or its headers and raw body. */
export type CallInput = Request | { headers: HeadersLike; body: BodyLike };

/** One signing secret (`whsec_…`, as FleetLM shows it), or several (any one may have signed). */
export type SigningSecrets = string | readonly string[];

export interface VerifyOptions {
  /** How far `webhook-timestamp` may be from this clock, in seconds. Default 300 (5 minutes). */
  toleranceSeconds?: number;
  /** The clock, in milliseconds since the Unix epoch (for tests). Default `Date.now`. */
  now?: () => number;
}

/** A verified call from FleetLM. */
export interface FleetLMCall {
  /** `webhook-id`: the turn's id (= `body.dispatch_id` = `idempotency-key`), the same on every attempt. */
  id: string;
  /** `webhook-timestamp`: when this attempt was sent, in seconds since the Unix epoch. */
  timestamp: number;
  /** The webhook body: session, user, turn and the conversation so far. */
  body: FleetLMWebhookBody;
  /** The body's text, exactly as signed. */
  rawBody: string;
  /** Aborted when FleetLM closes the request (the user cancelled the turn), if known. */
  signal?: AbortSignal;
}

export const DEFAULT_TOLERANCE_SECONDS = 5 * 60;

const encoder = new TextEncoder();

function subtle(): SubtleCrypto {
  const found = (globalThis as { crypto?: Crypto }).crypto?.subtle;
  if (!found) throw new Error("@fleetlm/agent needs Web Crypto (globalThis.crypto.subtle): Node 20+, Deno, Bun, a browser or an edge runtime");
  return found;
}

function base64ToBytes(text: string): Uint8Array | null {
  try {
    const binary = atob(text);
    const bytes = new Uint8Array(binary.length);
    for (let i = 0; i < binary.length; i++) bytes[i] = binary.charCodeAt(i);
    return bytes;
  } catch {
    return null;
  }
}

/** The key bytes of a secret: the base64 after `whsec_` (a bare base64 secret is taken too). */
function secretKey(secret: string): Uint8Array {
  if (typeof secret !== "string") throw new TypeError("a FleetLM signing secret is a string (whsec_…)");
  const encoded = secret.startsWith("whsec_") ? secret.slice("whsec_".length) : secret;
  const key = encoded ? base64ToBytes(encoded) : null;
  if (!key || key.length === 0) throw new TypeError("a FleetLM signing secret is whsec_ followed by base64 (as FleetLM showed it)");
  return key;
}

const keys = new Map<string, Promise<CryptoKey>>();

function hmacKey(secret: string): Promise<CryptoKey> {
  let key = keys.get(secret);
  if (!key) {
    const bytes = secretKey(secret);
    key = subtle().importKey("raw", bytes as Uint8Array<ArrayBuffer>, { name: "HMAC", hash: "SHA-256" }, false, ["sign"]);
    if (keys.size > 64) keys.clear();
    keys.set(secret, key);
  }
  return key;
}

/** Compares two byte strings in time that depends only on their lengths. */
function constantTimeEqual(a: Uint8Array, b: Uint8Array): boolean {
  if (a.length !== b.length) return false;
  let difference = 0;
  for (let i = 0; i < a.length; i++) difference |= a[i] ^ b[i];
  return difference === 0;
}

function header(headers: HeadersLike, name: string): string | undefined {
  if (typeof (headers as Headers).get === "function") return (headers as Headers).get(name) ?? undefined;
  const record = headers as Record<string, string | string[] | undefined>;
  let value = record[name];
  if (value === undefined) {
    const key = Object.keys(record).find((k) => k.toLowerCase() === name);
    value = key === undefined ? undefined : record[key];
  }
  return Array.isArray(value) ? value.join(" ") : value;
}

function bodyBytes(body: BodyLike): Uint8Array {
  if (typeof body === "string") return encoder.encode(body);
  if (body instanceof Uint8Array) return body;
  if (body instanceof ArrayBuffer) return new Uint8Array(body);
  throw new TypeError("the body must be the raw request body: a string, Uint8Array or ArrayBuffer (not parsed JSON)");
}

/**
 * Checks a call's Standard Webhooks signature under `secrets` and its timestamp; throws a
 * `FleetLMVerificationError` if either fails. `body` must be the exact bytes received.
 */
export async function verifySignature(
  headers: HeadersLike,
  body: BodyLike,
  secrets: SigningSecrets,
  options: VerifyOptions = {},
): Promise<{ id: string; timestamp: number }> {
  const list = typeof secrets === "string" ? [secrets] : [...secrets];
  if (list.length === 0) throw new TypeError("verifying a FleetLM call needs at least one signing secret");
  const keyList = await Promise.all(list.map(hmacKey)); // invalid secrets fail first, whatever the call
  const id = header(headers, "webhook-id");
  const timestampText = header(headers, "webhook-timestamp");
  const signatures = header(headers, "webhook-signature");
  if (!id || !timestampText) {
    throw new FleetLMVerificationError("missing_headers", "the call has no webhook-id or webhook-timestamp header");
  }
  if (!signatures) {
    throw new FleetLMVerificationError(
      "missing_signature",
      "the call has no webhook-signature header (an agent registered before signed calls gets one after rotating its secret)",
    );
  }
  if (!/^\d{1,15}$/.test(timestampText.trim())) {
    throw new FleetLMVerificationError("invalid_timestamp", "webhook-timestamp is not an integer number of seconds");
  }
  const timestamp = Number(timestampText.trim());
  const tolerance = options.toleranceSeconds ?? DEFAULT_TOLERANCE_SECONDS;
  const now = Math.floor((options.now ?? Date.now)() / 1000);
  if (now - timestamp > tolerance) {
    throw new FleetLMVerificationError("timestamp_too_old", `the call was sent ${now - timestamp} s ago (tolerance ${tolerance} s)`);
  }
  if (timestamp - now > tolerance) {
    throw new FleetLMVerificationError("timestamp_too_new", `the call claims to be sent ${timestamp - now} s from now (tolerance ${tolerance} s)`);
  }
  const raw = bodyBytes(body);
  const prefix = encoder.encode(`${id}.${timestampText.trim()}.`);
  const signed = new Uint8Array(prefix.length + raw.length);
  signed.set(prefix);
  signed.set(raw, prefix.length);
  const given = signatures
    .split(" ")
    .map((s) => s.trim())
    .filter((s) => s.startsWith("v1,"))
    .map((s) => base64ToBytes(s.slice(3)))
    .filter((s): s is Uint8Array => s !== null);
  let matched = false;
  for (const key of keyList) {
    const expected = new Uint8Array(await subtle().sign("HMAC", key, signed));
    // Every candidate is compared (no early exit), each in constant time.
    for (const signature of given) matched = constantTimeEqual(expected, signature) || matched;
  }
  if (!matched) {
    throw new FleetLMVerificationError("no_matching_signature", "no webhook-signature matches the signing secret: the call is not from your FleetLM");
  }
  return { id, timestamp };
}

function isObject(value: unknown): value is Record<string, any> {
  return typeof value === "object" && value !== null && !Array.isArray(value);
}

/** Parses a verified body; throws `invalid_body` if it is not a FleetLM call. */
export function parseWebhookBody(text: string): FleetLMWebhookBody {
  let body: unknown;
  try {
    body = JSON.parse(text);
  } catch {
    throw new FleetLMVerificationError("invalid_body", "the call's body is not JSON");
  }
  const valid =
    isObject(body) &&
    typeof body.session_id === "string" &&
    typeof body.dispatch_id === "string" &&
    typeof body.user_id === "string" &&
    Array.isArray(body.messages) &&
    body.messages.every((m: unknown) => isObject(m) && typeof m.seq === "number" && typeof m.kind === "string");
  if (!valid) throw new FleetLMVerificationError("invalid_body", "the call's body is not a FleetLM webhook body");
  return body as FleetLMWebhookBody;
}

/**
 * Verifies a call from FleetLM and returns it parsed. `call` is a Fetch API `Request` (its body
 * is read here, so do not read it before) or `{ headers, body }` with the raw body (Node:
 * `request.headers` and the body's bytes or text, before any JSON parsing). `secrets` is your
 * agent's signing secret (`whsec_…`), or several while you rotate it. Throws a
 * `FleetLMVerificationError` (`code`, `status`) when the call is not verified: answer it with
 * `status` (401), which FleetLM does not retry.
 */
export async function verifyFleetLMCall(call: CallInput, secrets: SigningSecrets, options: VerifyOptions = {}): Promise<FleetLMCall> {
  const isRequest = typeof Request !== "undefined" && call instanceof Request;
  const headers = call.headers as HeadersLike;
  const body: BodyLike = isRequest ? new Uint8Array(await (call as Request).arrayBuffer()) : (call as { body: BodyLike }).body;
  const { id, timestamp } = await verifySignature(headers, body, secrets, options);
  const rawBody = typeof body === "string" ? body : new TextDecoder().decode(bodyBytes(body));
  const verified: FleetLMCall = { id, timestamp, body: parseWebhookBody(rawBody), rawBody };
  if (isRequest) verified.signal = (call as Request).signal;
  return verified;
}
