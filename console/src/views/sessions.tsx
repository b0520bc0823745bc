// Sessions: filtered, paged list; one session watched live over the socket; archive.
import { useEffect, useState } from "preact/hooks";
import { api, type Agent, type Mode, type Session } from "../api";
import { ChatView, useSessionFeed } from "../chat";
import { Card, ErrorNote, formatTime } from "../components";

const PAGE = 25;

export function SessionsView() {
  const [filters, setFilters] = useState({ user_id: "", agent_id: "", status: "" });
  const [applied, setApplied] = useState(filters);
  const [cursors, setCursors] = useState<string[]>([""]);
  const [page, setPage] = useState<{ sessions: Session[]; next_cursor: string | null } | null>(null);
  const [agents, setAgents] = useState<Agent[]>([]);
  const [error, setError] = useState<string | null>(null);
  const cursor = cursors[cursors.length - 1];

  useEffect(() => {
    api<{ agents: Agent[] }>("GET", "/api/agents")
      .then((r) => setAgents(r.agents))
      .catch(() => setAgents([]));
  }, []);

  useEffect(() => {
    const query = new URLSearchParams({ limit: String(PAGE) });
    for (const [k, v] of Object.entries(applied)) if (v) query.set(k, v);
    if (cursor) query.set("cursor", cursor);
    setError(null);
    api<{ sessions: Session[]; next_cursor: string | null }>("GET", `/api/sessions?${query}`)
      .then(setPage)
      .catch((e) => setError(e.message));
  }, [applied, cursor]);

  const apply = (e: Event) => {
    e.preventDefault();
    setCursors([""]);
    setApplied({ ...filters });
  };

  return (
    <Card title="Sessions">
      <form class="filters" onSubmit={apply} aria-label="Session filters">
        <div class="field">
          <label for="filter-user">User</label>
          <input id="filter-user" name="user_id" value={filters.user_id} onInput={(e) => setFilters({ ...filters, user_id: (e.currentTarget as HTMLInputElement).value })} />
        </div>
        <div class="field">
          <label for="filter-agent">Agent</label>
          <select id="filter-agent" name="agent_id" value={filters.agent_id} onChange={(e) => setFilters({ ...filters, agent_id: (e.currentTarget as HTMLSelectElement).value })}>
            <option value="">any</option>
            {agents.map((a) => (
              <option key={a.id} value={a.id}>
                {a.id}
              </option>
            ))}
          </select>
        </div>
        <div class="field">
          <label for="filter-status">Status</label>
          <select id="filter-status" name="status" value={filters.status} onChange={(e) => setFilters({ ...filters, status: (e.currentTarget as HTMLSelectElement).value })}>
            <option value="">any</option>
            <option value="active">active</option>
            <option value="archived">archived</option>
          </select>
        </div>
        <button type="submit">Filter</button>
      </form>
      <ErrorNote error={error} />
      {page === null ? (
        <p class="muted">Loading…</p>
      ) : page.sessions.length === 0 ? (
        <p class="muted">No sessions match.</p>
      ) : (
        <div class="table-wrap">
          <table>
            <caption class="visually-hidden">Sessions</caption>
            <thead>
              <tr>
                <th scope="col">Session</th>
                <th scope="col">User</th>
                <th scope="col">Agent</th>
                <th scope="col">Status</th>
                <th scope="col">Messages</th>
                <th scope="col">Updated</th>
              </tr>
            </thead>
            <tbody>
              {page.sessions.map((s) => (
                <tr key={s.id}>
                  <td>
                    <a href={`#/sessions/${encodeURIComponent(s.id)}`}>{s.id}</a>
                  </td>
                  <td>{s.user_id}</td>
                  <td>{s.agent_id}</td>
                  <td>
                    <span class={`badge ${s.status === "active" ? "good" : "muted-badge"}`}>{s.status}</span>
                  </td>
                  <td>{s.last_seq}</td>
                  <td>{formatTime(s.updated_at)}</td>
                </tr>
              ))}
            </tbody>
          </table>
        </div>
      )}
      <nav class="pager" aria-label="Pages">
        <button type="button" class="secondary" disabled={cursors.length <= 1} onClick={() => setCursors(cursors.slice(0, -1))}>
          Previous
        </button>
        <span class="muted">Page {cursors.length}</span>
        <button type="button" class="secondary" disabled={!page?.next_cursor} onClick={() => page?.next_cursor && setCursors([...cursors, page.next_cursor])}>
          Next
        </button>
      </nav>
    </Card>
  );
}

export function SessionDetail({ id, mode }: { id: string; mode: Mode }) {
  const [session, setSession] = useState<Session | null>(null);
  const [error, setError] = useState<string | null>(null);
  const feed = useSessionFeed(mode, session);

  const load = () =>
    api<{ session: Session }>("GET", `/api/sessions/${encodeURIComponent(id)}`)
      .then((r) => setSession(r.session))
      .catch((e) => setError(e.message));
  useEffect(() => {
    load();
  }, [id]);

  const archive = async () => {
    if (!session || !window.confirm(`Archive session ${session.id}? It will accept no more messages.`)) return;
    try {
      await api("DELETE", `/api/sessions/${encodeURIComponent(session.id)}`);
      const fresh = await api<{ session: Session }>("GET", `/api/sessions/${encodeURIComponent(id)}`);
      setSession((current) => (current ? { ...current, status: fresh.session.status } : fresh.session));
    } catch (e) {
      setError((e as Error).message);
    }
  };

  return (
    <Card
      title={`Session ${id}`}
      actions={
        session?.status === "active" && (
          <button type="button" class="danger" onClick={archive}>
            Archive
          </button>
        )
      }
    >
      <p>
        <a href="#/sessions">← All sessions</a>
      </p>
      <ErrorNote error={error} />
      {session && (
        <>
          <dl class="facts">
            <dt>User</dt>
            <dd>
              <a href={`#/inbox/${encodeURIComponent(session.user_id)}`}>{session.user_id}</a>
            </dd>
            <dt>Agent</dt>
            <dd>{session.agent_id}</dd>
            <dt>Status</dt>
            <dd data-testid="session-status">{session.status}</dd>
            <dt>Created</dt>
            <dd>{formatTime(session.inserted_at)}</dd>
          </dl>
          <ChatView feed={feed} session={session} canSend />
        </>
      )}
    </Card>
  );
}
