// Verifies webhook calls with the `standardwebhooks` npm package (the Standard Webhooks
// reference implementation), independent of FleetLM's own signing code. Run by
// tests/signed_webhooks.rs (not a `node --test` file): reads {"secret", "calls": [{"headers",
// "body"}]} on stdin and prints, for each call, true if it verifies, or the library's error.
import { Webhook } from "standardwebhooks";

let input = "";
for await (const chunk of process.stdin) input += chunk;
const { secret, calls } = JSON.parse(input);
const webhook = new Webhook(secret);
const results = calls.map(({ headers, body }) => {
  try {
    webhook.verify(body, headers);
    return true;
  } catch (error) {
    return String(error.message ?? error);
  }
});
process.stdout.write(JSON.stringify(results));
