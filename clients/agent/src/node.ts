// Serving a Fetch API handler with Node's `http` (or `http2`) server: `createServer(toNodeListener(handler))`.
// Structural types only, so this package needs no @types/node.

/** The parts of Node's `IncomingMessage` used here. */
export interface NodeRequest extends AsyncIterable<Uint8Array | string> {
  method?: string;
  url?: string;
  headers: Record<string, string | string[] | undefined>;
}

/** The parts of Node's `ServerResponse` used here. */
export interface NodeResponse {
  statusCode: number;
  setHeader(name: string, value: string | string[]): unknown;
  flushHeaders?(): void;
  write(chunk: Uint8Array): boolean;
  end(): unknown;
  destroy(error?: Error): unknown;
  once(event: "drain" | "close", listener: () => void): unknown;
  on(event: "close", listener: () => void): unknown;
  readonly writableFinished: boolean;
}

/**
 * Node's `(request, response)` listener for a Fetch API handler. The request's `signal` is
 * aborted when the connection closes before the response finished (FleetLM cancelled the
 * turn), and the response body is streamed as the handler produces it.
 */
export function toNodeListener(handler: (request: Request) => Promise<Response>) {
  return (request: NodeRequest, response: NodeResponse): void => {
    const controller = new AbortController();
    response.on("close", () => {
      if (!response.writableFinished) controller.abort(new Error("the client closed the connection"));
    });
    void (async () => {
      const chunks: Uint8Array[] = [];
      for await (const chunk of request) chunks.push(typeof chunk === "string" ? new TextEncoder().encode(chunk) : chunk);
      const body = new Uint8Array(chunks.reduce((n, c) => n + c.length, 0));
      let offset = 0;
      for (const chunk of chunks) {
        body.set(chunk, offset);
        offset += chunk.length;
      }
      const headers = new Headers();
      for (const [name, value] of Object.entries(request.headers)) {
        if (name.startsWith(":") || value === undefined) continue;
        for (const v of Array.isArray(value) ? value : [value]) headers.append(name, v);
      }
      const host = headers.get("host") ?? "localhost";
      const method = request.method ?? "GET";
      const init: RequestInit = { method, headers, signal: controller.signal };
      if (method !== "GET" && method !== "HEAD") init.body = body;
      const answer = await handler(new Request(new URL(request.url ?? "/", `http://${host}`), init));
      response.statusCode = answer.status;
      const values = new Map<string, string[]>();
      answer.headers.forEach((value, name) => values.set(name, [...(values.get(name) ?? []), value]));
      for (const [name, list] of values) response.setHeader(name, list.length === 1 ? list[0] : list);
      if (!answer.body) {
        response.end();
        return;
      }
      response.flushHeaders?.();
      const reader = answer.body.getReader();
      controller.signal.addEventListener("abort", () => void reader.cancel().catch(() => {}), { once: true });
      for (;;) {
        const { done, value } = await reader.read();
        if (done || controller.signal.aborted) break;
        if (!response.write(value)) await new Promise<void>((resolve) => { response.once("drain", resolve); response.once("close", resolve); });
      }
      if (!controller.signal.aborted) response.end();
    })().catch((error: unknown) => {
      if (controller.signal.aborted) return;
      response.statusCode = 500;
      response.destroy(error instanceof Error ? error : new Error(String(error)));
    });
  };
}
