// A FleetLM agent in plain Node (no dependencies): it receives the conversation and streams its
// reply back as AI SDK UI message chunks, one JSON object per line. Copy it and replace `reply`
// with a call to your model. Run: `node server.mjs` (PORT=8080, DELAY_MS=30 between words by
// default).
import { createServer } from "node:http";

const port = Number(process.env.PORT ?? 8080);
const delayMs = Number(process.env.DELAY_MS ?? 30); // between words, to let the streaming show

// The reply to the newest user text message; a real agent calls a model here.
function reply(messages, userId) {
  const lastUser = [...messages].reverse().find((m) => m.sender_id === userId && m.kind === "text");
  return `echo: ${lastUser?.content?.text ?? "(no text)"}`;
}

createServer((request, response) => {
  if (request.method !== "POST" || request.url !== "/webhook") {
    response.writeHead(404).end();
    return;
  }
  let body = "";
  request.on("data", (chunk) => (body += chunk));
  request.on("end", async () => {
    let dispatch;
    try {
      dispatch = JSON.parse(body);
    } catch {
      response.writeHead(400).end("invalid JSON");
      return;
    }
    // dispatch = {session_id, agent_id, user_id, dispatch_id, attempt, messages: [...]}
    response.writeHead(200, { "content-type": "application/x-ndjson" });
    // FleetLM closes the connection when the user cancels the turn: stop generating then.
    let cancelled = false;
    response.on("close", () => (cancelled = !response.writableFinished));
    const send = (chunk) => response.write(JSON.stringify(chunk) + "\n");
    send({ type: "start", messageId: `reply-${dispatch.dispatch_id}` });
    send({ type: "text-start", id: "t" });
    for (const word of reply(dispatch.messages, dispatch.user_id).split(/(?<= )/)) {
      if (cancelled) return;
      send({ type: "text-delta", id: "t", delta: word });
      await new Promise((resolve) => setTimeout(resolve, delayMs));
    }
    if (cancelled) return;
    send({ type: "text-end", id: "t" });
    send({ type: "finish" });
    response.end();
  });
}).listen(port, "127.0.0.1", () => console.log(`echo agent on http://127.0.0.1:${port}/webhook`));
