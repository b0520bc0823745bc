// Playground: start a session with an agent as a chosen user and chat; beside the chat, the
// webhook request FleetLM sends (built from the session as docs/AGENTS.md documents it) and
// the raw reply chunks as they arrive.
import { useEffect, useMemo, useState } from "preact/hooks";
import { api, type Agent, type Message, type Mode, type Session } from "../api";
import { ChatView, useSessionFeed, type SessionFeed } from "../chat";
import { Card, ErrorNote, Json } from "../components";

function history(agent: Agent, messages: Message[]): Message[] {
  if (agent.message_history_mode === "last") return messages.slice(-1);
  if (agent.message_history_mode === "tail") return messages.slice(-agent.message_history_limit);
  return messages.slice(-10000);
}

function WebhookRequest({ agent, session, feed }: { agent: Agent; session: Session; feed: SessionFeed }) {
  const dispatchId = feed.status?.dispatch_id ?? "<dispatch_id>";
  const headers: Record<string, string> = {
    "content-type": "application/json",
    accept: "application/x-ndjson, text/event-stream, application/json",
    "idempotency-key": dispatchId,
    "x-fleetlm-timeout-ms": String(agent.timeout_ms),
    ...agent.headers,
  };
  const body = {
    session_id: session.id,
    agent_id: agent.id,
    user_id: session.user_id,
    dispatch_id: dispatchId,
    attempt: 1,
    messages: history(
      agent,
      feed.messages.filter((m) => !(feed.status?.dispatch_id && m.metadata?.dispatch_id === feed.status.dispatch_id)),
    ).map((m) => ({
      seq: m.seq,
      sender_id: m.sender_id,
      kind: m.kind,
      content: m.content,
      metadata: m.metadata,
      inserted_at: m.inserted_at,
    })),
  };
  return (
    <section class="panel" aria-labelledby="webhook-title">
      <h3 id="webhook-title">Webhook request</h3>
      <p class="muted small">
        Built from the session as documented (FleetLM does not expose the bytes it sent). Header values are hidden.
      </p>
      <p class="mono small">
        POST {agent.origin_url}
        {agent.webhook_path}
      </p>
      <Json value={headers} />
      <Json value={body} />
    </section>
  );
}

function Chunks({ feed }: { feed: SessionFeed }) {
  return (
    <section class="panel" aria-labelledby="chunks-title">
      <h3 id="chunks-title">Reply chunks ({feed.chunks.length})</h3>
      {feed.chunks.length === 0 ? (
        <p class="muted small">stream_chunk pushes appear here as they arrive.</p>
      ) : (
        <ol class="chunks" data-testid="chunks">
          {feed.chunks.map((c) => (
            <li key={c.n}>
              <span class="muted">{new Date(c.at).toISOString().slice(11, 23)}</span> <code>{JSON.stringify(c.chunk)}</code>
            </li>
          ))}
        </ol>
      )}
    </section>
  );
}

export function PlaygroundView({ mode }: { mode: Mode }) {
  const [agents, setAgents] = useState<Agent[]>([]);
  const [agentId, setAgentId] = useState("");
  const [userId, setUserId] = useState("playground-user");
  const [session, setSession] = useState<Session | null>(null);
  const [error, setError] = useState<string | null>(null);
  const feed = useSessionFeed(mode, session);
  const agent = useMemo(() => agents.find((a) => a.id === (session?.agent_id ?? agentId)) ?? null, [agents, agentId, session]);

  useEffect(() => {
    api<{ agents: Agent[] }>("GET", "/api/agents?status=enabled")
      .then((r) => {
        setAgents(r.agents);
        if (r.agents.length) setAgentId((current) => current || r.agents[0].id);
      })
      .catch((e) => setError(e.message));
  }, []);

  const start = async (e: Event) => {
    e.preventDefault();
    setError(null);
    try {
      const created = await api<{ session: Session }>("POST", "/api/sessions", {
        user_id: userId.trim(),
        agent_id: agentId,
        metadata: { source: "console-playground" },
      });
      setSession(created.session);
    } catch (err) {
      setError((err as Error).message);
    }
  };

  return (
    <Card title="Playground">
      <form class="filters" onSubmit={start} aria-label="Start a session">
        <div class="field">
          <label for="pg-agent">Agent</label>
          <select id="pg-agent" name="agent_id" value={agentId} onChange={(e) => setAgentId((e.currentTarget as HTMLSelectElement).value)}>
            {agents.map((a) => (
              <option key={a.id} value={a.id}>
                {a.name} ({a.id})
              </option>
            ))}
          </select>
        </div>
        <div class="field">
          <label for="pg-user">User id</label>
          <input id="pg-user" name="user_id" value={userId} onInput={(e) => setUserId((e.currentTarget as HTMLInputElement).value)} />
        </div>
        <button type="submit" disabled={!agentId || !userId.trim()}>
          {session ? "Start a new session" : "Start session"}
        </button>
      </form>
      {agents.length === 0 && !error && <p class="muted">No enabled agents. Create one on the Agents page.</p>}
      <ErrorNote error={error} />
      {session && agent && (
        <div class="playground">
          <div>
            <p class="small">
              Session <a href={`#/sessions/${encodeURIComponent(session.id)}`}>{session.id}</a> as <strong>{session.user_id}</strong>
            </p>
            <ChatView feed={feed} session={session} canSend />
          </div>
          <div class="side">
            <WebhookRequest agent={agent} session={session} feed={feed} />
            <Chunks feed={feed} />
          </div>
        </div>
      )}
    </Card>
  );
}
