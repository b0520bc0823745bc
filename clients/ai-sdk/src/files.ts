// Attachments: the transport uploads the bytes of a user message's file parts (data: and blob:
// URLs) to the session (`POST /api/sessions/:id/files`) and stores the part with the server's
// path instead of the bytes (docs/CLIENTS.md, "Attachments").
import { FleetLMError, retryDelayMs, type FleetLMClient, type SessionFile } from "@fleetlm/client";

/** Tries of an upload answered `overloaded` or `unavailable` (nothing was stored). */
const UPLOAD_ATTEMPTS = 4;
const NOT_STORED = new Set(["overloaded", "unavailable"]);
/** Uploads of one message in progress at once (the server takes 16 per node). */
const PARALLEL_UPLOADS = 4;

/** A file part of a UI message (the AI SDK's `FileUIPart`). */
type FilePart = { type: "file"; mediaType: string; filename?: string; url: string; [key: string]: unknown };

const MEDIA_TYPE = /^[A-Za-z0-9!#$&^_.+-]+\/[A-Za-z0-9!#$&^_.+-]+$/;

function isFilePart(part: unknown): part is FilePart {
  const p = part as FilePart | null;
  return typeof p === "object" && p !== null && p.type === "file" && typeof p.url === "string";
}

/** The bytes and media type of a `data:` URL (base64 or percent-encoded). */
export function dataUrlBytes(url: string): { bytes: Uint8Array; mediaType: string } {
  const comma = url.indexOf(",");
  if (!url.startsWith("data:") || comma < 0) throw new TypeError("not a data: URL");
  const header = url.slice(5, comma).split(";");
  const mediaType = header[0].trim() || "text/plain";
  const data = url.slice(comma + 1);
  if (header.slice(1).some((p) => p.trim().toLowerCase() === "base64")) {
    const binary = globalThis.atob((data.includes("%") ? decodeURIComponent(data) : data).replace(/\s+/g, ""));
    const bytes = new Uint8Array(binary.length);
    for (let i = 0; i < binary.length; i++) bytes[i] = binary.charCodeAt(i);
    return { bytes, mediaType };
  }
  // Percent-encoded: each %XX is one byte, any other character its UTF-8 bytes.
  const out: number[] = [];
  const encoder = new TextEncoder();
  for (let i = 0; i < data.length; ) {
    if (data[i] === "%" && /^[0-9A-Fa-f]{2}$/.test(data.slice(i + 1, i + 3))) {
      out.push(parseInt(data.slice(i + 1, i + 3), 16));
      i += 3;
      continue;
    }
    const end = data.indexOf("%", i + 1);
    const run = data.slice(i, end < 0 ? data.length : end);
    for (const byte of encoder.encode(run)) out.push(byte);
    i += run.length;
  }
  return { bytes: Uint8Array.from(out), mediaType };
}

/** A filename the server takes (at most 255 characters; no control characters, slashes or quotes). */
function safeFilename(name: string | undefined): string | undefined {
  if (typeof name !== "string") return undefined;
  const cleaned = name.replace(/[\u0000-\u001f\u007f/\\"']/g, "_").slice(0, 255);
  return cleaned === "" ? undefined : cleaned;
}

/** A short stable hash (FNV-1a, 2 × 32 bits) of a string. */
function fingerprint(text: string): string {
  let a = 0x811c9dc5;
  let b = 0x01000193 ^ text.length;
  for (let i = 0; i < text.length; i++) {
    const c = text.charCodeAt(i);
    a = Math.imul(a ^ c, 0x01000193);
    b = Math.imul(b ^ c, 0x5bd1e995);
  }
  return `${text.length}:${(a >>> 0).toString(36)}${(b >>> 0).toString(36)}`;
}

/** The uploads of one transport, so a retried send names the same files (and is stored once). */
export class UploadCache {
  readonly #entries = new Map<string, Promise<SessionFile>>();
  constructor(readonly max = 200) {}

  get(key: string, upload: () => Promise<SessionFile>): Promise<SessionFile> {
    let pending = this.#entries.get(key);
    if (pending) {
      this.#entries.delete(key);
      this.#entries.set(key, pending);
      return pending;
    }
    pending = upload();
    this.#entries.set(key, pending);
    pending.catch(() => {
      if (this.#entries.get(key) === pending) this.#entries.delete(key);
    });
    while (this.#entries.size > this.max) this.#entries.delete(this.#entries.keys().next().value!);
    return pending;
  }
}

function abortableSleep(ms: number, signal: AbortSignal | undefined): Promise<void> {
  return new Promise((resolve, reject) => {
    if (signal?.aborted) return reject(signal.reason);
    const done = () => {
      clearTimeout(timer);
      signal?.removeEventListener("abort", onAbort);
    };
    const onAbort = () => {
      done();
      reject(signal!.reason);
    };
    const timer = setTimeout(() => {
      done();
      resolve();
    }, ms);
    signal?.addEventListener("abort", onAbort, { once: true });
  });
}

/**
 * `client.uploadFile`, tried again (after at least the server's `retry-after`) while the server
 * answers that it stored nothing and to come back later (`overloaded`: too many uploads in
 * progress on the node; `unavailable`: the archive did not answer), up to 4 tries.
 */
async function upload(
  client: FleetLMClient,
  sessionId: string,
  body: Blob | Uint8Array,
  options: { mediaType: string; filename?: string; signal?: AbortSignal },
): Promise<SessionFile> {
  for (let attempt = 1; ; attempt++) {
    try {
      return await client.uploadFile(sessionId, body, options);
    } catch (error) {
      if (!(error instanceof FleetLMError) || !NOT_STORED.has(error.code) || attempt >= UPLOAD_ATTEMPTS) throw error;
      await abortableSleep(retryDelayMs(error, attempt), options.signal);
    }
  }
}

/** `fn` over `items`, at most `limit` at once; the results in order. */
async function mapLimited<T, R>(items: T[], limit: number, fn: (item: T) => Promise<R>): Promise<R[]> {
  const results = new Array<R>(items.length);
  let next = 0;
  const worker = async () => {
    while (next < items.length) {
      const index = next++;
      results[index] = await fn(items[index]);
    }
  };
  await Promise.all(Array.from({ length: Math.min(limit, items.length) }, worker));
  return results;
}

/**
 * The parts to store for a user message: each file part whose `url` is a `data:` URL (or a
 * `blob:` URL, read with `fetch`) is uploaded to the session and names the server's path
 * instead; an absolute URL of a file of this session on this server becomes its path (so the
 * agent gets it signed); any other part is kept as it is. Up to 4 uploads run at once; one
 * answered `overloaded` / `unavailable` is tried again.
 */
export async function uploadFileParts(
  client: FleetLMClient,
  sessionId: string,
  parts: unknown[],
  options: { signal?: AbortSignal; cache: UploadCache },
): Promise<unknown[]> {
  const ownPrefix = `${client.url}/api/sessions/${encodeURIComponent(sessionId)}/files/`;
  return mapLimited(parts, PARALLEL_UPLOADS, async (part) => {
    if (!isFilePart(part)) return part;
    const url = part.url;
    if (url.startsWith(ownPrefix) && /^[^/?#]+$/.test(url.slice(ownPrefix.length))) {
      return { ...part, url: url.slice(client.url.length) };
    }
    const isData = url.startsWith("data:");
    if (!isData && !url.startsWith("blob:")) return part;
    const filename = safeFilename(part.filename);
    const key = `${sessionId}\n${filename ?? ""}\n${part.mediaType}\n${fingerprint(url)}`;
    const file = await options.cache.get(key, async () => {
      let body: Blob | Uint8Array;
      let mediaType = part.mediaType;
      if (isData) {
        const decoded = dataUrlBytes(url);
        body = decoded.bytes;
        if (!MEDIA_TYPE.test(mediaType ?? "")) mediaType = decoded.mediaType;
      } else {
        const response = await globalThis.fetch(url, { signal: options.signal });
        body = await response.blob();
        if (!MEDIA_TYPE.test(mediaType ?? "")) mediaType = (body as Blob).type;
      }
      if (!MEDIA_TYPE.test(mediaType ?? "")) mediaType = "application/octet-stream";
      return upload(client, sessionId, body, { mediaType, filename, signal: options.signal });
    });
    const stored: FilePart = { ...part, url: file.url };
    return stored;
  });
}
