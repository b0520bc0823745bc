// A minimal FleetLM client: joins a session, prints every message (replayed and live), and
// sends one. Run `npm ci && node client.mjs` with the server running (README quickstart).
import { Socket } from "phoenix";
import WebSocket from "ws"; // Node 20 has no global WebSocket; browsers need no transport option.

const server = process.env.FLEETLM_URL ?? "http://127.0.0.1:4000";
const userId = process.env.FLEETLM_USER ?? "alice";
const sessionId = process.env.FLEETLM_SESSION ?? "demo";

const socket = new Socket(`${server.replace("http", "ws")}/socket`, { params: { user_id: userId }, transport: WebSocket });
socket.connect();

// Remember the last seq seen: on reconnect, the join asks only for what came after it.
let lastSeq = 0;
const show = (message) => {
  if (message.seq <= lastSeq) return; // already shown
  lastSeq = message.seq;
  console.log(`#${message.seq} ${message.sender_id}: ${JSON.stringify(message.content)}`);
};
function open() {
  const channel = socket.channel(`session:${sessionId}`, () => ({ last_seq: lastSeq }));
  channel.on("message", show);
  channel.on("resync", () => {
    // The server stopped delivering live to this channel (it fell behind, or a replay was cut
    // at 100): leave and join a new channel from the last seq shown (a channel joins once).
    channel.leave();
    open().join().receive("ok", ({ messages }) => messages.forEach(show));
  });
  return channel;
}
const channel = open();

channel
  .join()
  .receive("ok", ({ messages, has_more }) => {
    messages.forEach(show);
    if (has_more) console.log("(older messages: page with GET /api/sessions/:id/messages)");
    channel
      .push("send", { content: { kind: "text", content: { text: "hello from the example" } }, client_id: `ex-${Date.now()}` })
      .receive("ok", ({ seq }) => {
        console.log(`sent, stored as seq ${seq}`);
        setTimeout(() => socket.disconnect(() => process.exit(0)), 300);
      })
      .receive("error", (error) => console.error("send refused:", error));
  })
  .receive("error", (error) => {
    console.error("join refused:", error);
    process.exit(1);
  });
