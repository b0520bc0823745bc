// REST access: the admin API key (token mode) lives only in this tab's sessionStorage.

const KEY_STORAGE = "fleetlm.apiKey";

export type Mode = "open" | "token";

export function storedApiKey(): string | null {
  return sessionStorage.getItem(KEY_STORAGE);
}

export function storeApiKey(key: string | null): void {
  if (key === null) sessionStorage.removeItem(KEY_STORAGE);
  else sessionStorage.setItem(KEY_STORAGE, key);
}

/** Hides addresses and URLs in a server sentence before it is shown. */
export function redact(text: string): string {
  return text
    .replace(/\b[a-z][a-z0-9+.-]*:\/\/[^\s"',)]+/gi, "[address]")
    .replace(/\b\d{1,3}(\.\d{1,3}){3}(:\d+)?\b/g, "[address]")
    .replace(/\[[0-9a-f]*:[0-9a-f:]*\](:\d+)?/gi, "[address]")
    .replace(/\b(localhost|[a-z0-9-]+(\.[a-z0-9-]+)+):\d{2,5}\b/gi, "[address]");
}

export class ApiError extends Error {
  constructor(
    public status: number,
    public code: string,
    message: string,
    public fields: Record<string, string[]> = {},
  ) {
    super(message);
  }
}

function userMessage(status: number, code: string, sentence: string | undefined): string {
  if (status === 0) return "Cannot reach the FleetLM server.";
  if (status >= 500) return `The server could not do this right now (${code}); try again shortly.`;
  return redact(sentence ?? `request failed (${status})`);
}

export async function api<T>(method: string, path: string, body?: unknown): Promise<T> {
  const headers: Record<string, string> = { accept: "application/json" };
  const key = storedApiKey();
  if (key) headers.authorization = `Bearer ${key}`;
  if (body !== undefined) headers["content-type"] = "application/json";
  let response: Response;
  try {
    response = await fetch(path, {
      method,
      headers,
      body: body === undefined ? undefined : JSON.stringify(body),
    });
  } catch {
    throw new ApiError(0, "network", userMessage(0, "network", undefined));
  }
  const text = await response.text();
  let json: any = null;
  try {
    json = text ? JSON.parse(text) : null;
  } catch {
    json = null;
  }
  if (!response.ok) {
    const code = json?.code ?? `http_${response.status}`;
    throw new ApiError(response.status, code, userMessage(response.status, code, json?.error), json?.errors ?? {});
  }
  return json as T;
}

/** Open mode answers admin calls without credentials; token mode answers 401. */
export async function probeMode(): Promise<{ mode: Mode; authorized: boolean }> {
  const response = await fetch("/api/agents?status=enabled", { headers: { accept: "application/json" } }).catch(
    () => null,
  );
  if (!response) throw new ApiError(0, "network", userMessage(0, "network", undefined));
  if (response.ok) return { mode: "open", authorized: true };
  if (response.status !== 401 && response.status !== 403) {
    throw new ApiError(response.status, "unavailable", userMessage(response.status, "unavailable", undefined));
  }
  const key = storedApiKey();
  if (!key) return { mode: "token", authorized: false };
  try {
    await api("GET", "/api/agents?status=enabled");
    return { mode: "token", authorized: true };
  } catch {
    storeApiKey(null);
    return { mode: "token", authorized: false };
  }
}

export interface Agent {
  id: string;
  name: string;
  origin_url: string;
  webhook_path: string;
  message_history_mode: "tail" | "last" | "entire";
  message_history_limit: number;
  timeout_ms: number;
  debounce_window_ms: number;
  headers: Record<string, string>;
  status: "enabled" | "disabled";
  inserted_at: string;
  updated_at: string;
}

export interface Session {
  id: string;
  user_id: string;
  agent_id: string;
  status: "active" | "archived";
  metadata: Record<string, unknown>;
  last_seq: number;
  inserted_at: string;
  updated_at: string;
}

export interface Message {
  id: string;
  session_id: string;
  seq: number;
  sender_id: string;
  kind: string;
  content: any;
  metadata: any;
  inserted_at: string;
}

export interface InboxEntry {
  session_id: string;
  agent_id: string;
  unread_count: number;
  last_seq: number;
  last_activity_at: string;
  last_sender_id: string | null;
  last_message_preview?: string;
}

export interface FinishedDispatch {
  dispatch_id: string;
  session_id: string;
  outcome: "ok" | "failed" | "cancelled";
  error?: string;
  duration_ms: number;
  finished_at: string;
}

/** One webhook HTTP attempt (GET /api/agents/:id/deliveries). */
export interface Delivery {
  dispatch_id: string;
  session_id: string;
  attempt: number;
  http_status?: number;
  outcome: "ok" | "retried" | "failed" | "cancelled";
  error?: string;
  latency_ms: number;
  finished_at: string;
}

export interface DeadLetter {
  id: string;
  kind: "session" | "message" | "session_update" | "read_cursor" | string;
  session_id: string;
  seq?: number;
  client_id?: string;
  error: string;
  payload: string;
  inserted_at: string;
}
