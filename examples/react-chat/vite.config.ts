// The packages are used from their sources in clients/ (no build or install needed there); their
// imports (react, ai, phoenix) resolve to this app's node_modules.
import { fileURLToPath } from "node:url";
import { defineConfig } from "vite";

const clients = fileURLToPath(new URL("../../clients/", import.meta.url));

export default defineConfig({
  resolve: {
    alias: [
      { find: /^@fleetlm\/ai-sdk\/react$/, replacement: `${clients}ai-sdk/src/react.ts` },
      { find: /^@fleetlm\/ai-sdk$/, replacement: `${clients}ai-sdk/src/index.ts` },
      { find: /^@fleetlm\/client$/, replacement: `${clients}client/src/index.ts` },
    ],
    dedupe: ["react", "react-dom", "ai", "@ai-sdk/react", "phoenix"],
  },
  esbuild: { jsx: "automatic" },
  server: { host: "127.0.0.1", port: Number(process.env.PORT ?? 5173), strictPort: true },
  preview: { host: "127.0.0.1", port: Number(process.env.PORT ?? 5173), strictPort: true },
});
