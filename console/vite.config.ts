import { defineConfig } from "vite";

// Fixed file names (no content hashes) and no source maps, so a rebuild is byte-identical and
// src/console.rs can embed a fixed list of files. `npm run dev` proxies the API to a local server.
export default defineConfig({
  esbuild: { jsx: "automatic", jsxImportSource: "preact" },
  build: {
    outDir: "dist",
    emptyOutDir: true,
    sourcemap: false,
    modulePreload: false,
    cssCodeSplit: false,
    rollupOptions: {
      output: {
        entryFileNames: "assets/app.js",
        chunkFileNames: "assets/[name].js",
        assetFileNames: "assets/app[extname]",
        inlineDynamicImports: true,
      },
    },
  },
  server: {
    proxy: {
      "/api": "http://127.0.0.1:4000",
      "/health": "http://127.0.0.1:4000",
      "/metrics": "http://127.0.0.1:4000",
      "/socket": { target: "ws://127.0.0.1:4000", ws: true },
    },
  },
});
