// Serves the notes agent with a real model: `npm install @ai-sdk/openai`, then
//   FLEETLM_SIGNING_SECRET=whsec_… OPENAI_API_KEY=sk-… node server.mjs
// and register it (README.md). PORT=8080 by default; MODEL=gpt-4o-mini.
import { createServer } from "node:http";
import { toNodeListener } from "@fleetlm/agent/node";
import { createNotesAgent } from "./agent.mjs";

const secret = process.env.FLEETLM_SIGNING_SECRET;
if (!secret) throw new Error("set FLEETLM_SIGNING_SECRET to the signing_secret FleetLM showed when you registered the agent");
const { openai } = await import("@ai-sdk/openai").catch(() => {
  throw new Error("this example's server uses OpenAI: npm install @ai-sdk/openai (or pass any AI SDK model to createNotesAgent)");
});
const agent = createNotesAgent({
  model: openai(process.env.MODEL ?? "gpt-4o-mini"),
  secret,
  onRejected: (error) => console.warn(`refused a call: ${error.code}`),
});
const port = Number(process.env.PORT ?? 8080);
createServer(toNodeListener(agent)).listen(port, "127.0.0.1", () => console.log(`notes agent on http://127.0.0.1:${port}/webhook`));
