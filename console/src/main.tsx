// The FleetLM web console: hash routes (#/agents, #/sessions/<id>, …) so it owns only `/` and
// `/assets/*` on the server and never shadows the API.
import { render } from "preact";
import { useEffect, useState } from "preact/hooks";
import { ApiError, probeMode, storeApiKey, type Mode } from "./api";
import { ErrorNote } from "./components";
import "./style.css";
import { AgentsView } from "./views/agents";
import { HealthView } from "./views/health";
import { InboxView } from "./views/inbox";
import { PlaygroundView } from "./views/playground";
import { SessionDetail, SessionsView } from "./views/sessions";

const NAV = [
  ["agents", "Agents"],
  ["sessions", "Sessions"],
  ["playground", "Playground"],
  ["inbox", "Inbox"],
  ["health", "Health"],
] as const;

function useRoute(): string[] {
  const read = () => (location.hash.replace(/^#\/?/, "") || "agents").split("/").map(decodeURIComponent);
  const [route, setRoute] = useState(read);
  useEffect(() => {
    const onChange = () => setRoute(read());
    window.addEventListener("hashchange", onChange);
    return () => window.removeEventListener("hashchange", onChange);
  }, []);
  return route;
}

function KeyForm({ onDone }: { onDone: () => void }) {
  const [key, setKey] = useState("");
  const [error, setError] = useState<string | null>(null);
  const submit = async (e: Event) => {
    e.preventDefault();
    storeApiKey(key.trim());
    const probe = await probeMode().catch((err: ApiError) => {
      setError(err.message);
      return null;
    });
    if (probe?.authorized) onDone();
    else if (probe) setError("That API key was not accepted.");
  };
  return (
    <form class="card key-form" onSubmit={submit} aria-label="Sign in">
      <h2>Token mode</h2>
      <p>This server requires its admin API key. It is kept only in this browser tab (sessionStorage).</p>
      <div class="field">
        <label for="api-key">Admin API key</label>
        <input id="api-key" name="api_key" type="password" autocomplete="off" value={key} onInput={(e) => setKey((e.currentTarget as HTMLInputElement).value)} />
      </div>
      <ErrorNote error={error} />
      <button type="submit" disabled={!key.trim()}>
        Sign in
      </button>
    </form>
  );
}

function App() {
  const route = useRoute();
  const [mode, setMode] = useState<Mode | null>(null);
  const [authorized, setAuthorized] = useState(false);
  const [error, setError] = useState<string | null>(null);

  const probe = () =>
    probeMode()
      .then((r) => {
        setMode(r.mode);
        setAuthorized(r.authorized);
        setError(null);
      })
      .catch((e: ApiError) => setError(e.message));
  useEffect(() => {
    probe();
  }, []);

  const [page, ...rest] = route;
  const view = (() => {
    if (!mode || !authorized) return null;
    switch (page) {
      case "sessions":
        return rest[0] ? <SessionDetail key={rest[0]} id={rest[0]} mode={mode} /> : <SessionsView />;
      case "playground":
        return <PlaygroundView mode={mode} />;
      case "inbox":
        return <InboxView mode={mode} user={rest[0] ?? ""} />;
      case "health":
        return <HealthView />;
      default:
        return <AgentsView />;
    }
  })();

  return (
    <>
      <a class="skip" href="#main" onClick={(e) => { e.preventDefault(); document.getElementById("main")?.focus(); }}>
        Skip to content
      </a>
      <header class="top">
        <span class="brand">FleetLM</span>
        <nav aria-label="Main">
          <ul>
            {NAV.map(([id, label]) => (
              <li key={id}>
                <a href={`#/${id}`} aria-current={page === id || (id === "agents" && !NAV.some(([n]) => n === page)) ? "page" : undefined}>
                  {label}
                </a>
              </li>
            ))}
          </ul>
        </nav>
        <span class="mode">
          {mode === "token" && authorized && (
            <button
              type="button"
              class="secondary small"
              onClick={() => {
                storeApiKey(null);
                setAuthorized(false);
              }}
            >
              Sign out
            </button>
          )}
          {mode && <span class="badge">{mode} mode</span>}
        </span>
      </header>
      <main id="main" tabIndex={-1}>
        <ErrorNote error={error} />
        {mode === "token" && !authorized ? <KeyForm onDone={() => setAuthorized(true)} /> : view}
      </main>
    </>
  );
}

render(<App />, document.getElementById("app")!);
