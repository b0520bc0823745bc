// A user's inbox over `inbox:<user>`: unread counts update live from inbox_delta pushes.
import type { Socket } from "phoenix";
import { useEffect, useState } from "preact/hooks";
import { api, type InboxEntry, type Mode } from "../api";
import { Card, ErrorNote, formatTime } from "../components";
import { openSocket } from "../live";

function sortEntries(entries: InboxEntry[]): InboxEntry[] {
  return [...entries].sort((a, b) => (a.last_activity_at < b.last_activity_at ? 1 : a.last_activity_at > b.last_activity_at ? -1 : 0));
}

export function InboxView({ mode, user }: { mode: Mode; user: string }) {
  const [draft, setDraft] = useState(user);
  const [entries, setEntries] = useState<InboxEntry[] | null>(null);
  const [error, setError] = useState<string | null>(null);
  const [connected, setConnected] = useState(false);

  useEffect(() => setDraft(user), [user]);

  useEffect(() => {
    if (!user) return;
    let socket: Socket | null = null;
    let closed = false;
    setEntries(null);
    setError(null);
    (async () => {
      try {
        socket = await openSocket(mode, user);
      } catch (e: any) {
        setError(e?.message ?? "cannot open the socket");
        return;
      }
      if (closed) return socket.disconnect();
      socket.onOpen(() => setConnected(true));
      socket.onClose(() => setConnected(false));
      const channel = socket.channel(`inbox:${user}`, {});
      channel.on("inbox_delta", (p: { inbox: InboxEntry[] }) => {
        setEntries((current) => {
          const map = new Map((current ?? []).map((e) => [e.session_id, e]));
          for (const entry of p.inbox) map.set(entry.session_id, entry);
          return sortEntries([...map.values()]);
        });
      });
      channel
        .join()
        .receive("ok", (r: { inbox: InboxEntry[] }) => setEntries(sortEntries(r.inbox)))
        .receive("error", (r: any) => setError(`Cannot join the inbox: ${r?.reason ?? "refused"}`));
    })();
    return () => {
      closed = true;
      socket?.disconnect();
      setConnected(false);
    };
  }, [mode, user]);

  const markRead = async (entry: InboxEntry) => {
    try {
      await api("POST", `/api/sessions/${encodeURIComponent(entry.session_id)}/read`, { user_id: user, last_seq: entry.last_seq });
    } catch (e) {
      setError((e as Error).message);
    }
  };

  const unread = (entries ?? []).reduce((sum, e) => sum + e.unread_count, 0);
  return (
    <Card title="Inbox">
      <form
        class="filters"
        aria-label="Choose a user"
        onSubmit={(e) => {
          e.preventDefault();
          location.hash = `#/inbox/${encodeURIComponent(draft.trim())}`;
        }}
      >
        <div class="field">
          <label for="inbox-user">User id</label>
          <input id="inbox-user" name="user_id" value={draft} onInput={(e) => setDraft((e.currentTarget as HTMLInputElement).value)} />
        </div>
        <button type="submit" disabled={!draft.trim()}>
          Open inbox
        </button>
      </form>
      <ErrorNote error={error} />
      {user && entries && (
        <>
          <p role="status" aria-live="polite">
            <span class={connected ? "dot ok" : "dot"} aria-hidden="true" /> {user}: <strong data-testid="total-unread">{unread}</strong> unread in{" "}
            {entries.length} sessions
          </p>
          <div class="table-wrap">
            <table>
              <caption class="visually-hidden">Inbox of {user}</caption>
              <thead>
                <tr>
                  <th scope="col">Session</th>
                  <th scope="col">Agent</th>
                  <th scope="col">Unread</th>
                  <th scope="col">Last message</th>
                  <th scope="col">Activity</th>
                  <th scope="col">
                    <span class="visually-hidden">Actions</span>
                  </th>
                </tr>
              </thead>
              <tbody>
                {entries.map((e) => (
                  <tr key={e.session_id} data-session={e.session_id}>
                    <td>
                      <a href={`#/sessions/${encodeURIComponent(e.session_id)}`}>{e.session_id}</a>
                    </td>
                    <td>{e.agent_id}</td>
                    <td>
                      <span class={e.unread_count ? "badge count" : "badge muted-badge"} data-testid="unread">
                        {e.unread_count}
                      </span>
                    </td>
                    <td class="preview">
                      {e.last_sender_id && <span class="muted">{e.last_sender_id}: </span>}
                      {e.last_message_preview ?? ""}
                    </td>
                    <td>{formatTime(e.last_activity_at)}</td>
                    <td>
                      <button type="button" class="secondary" disabled={!e.unread_count} onClick={() => markRead(e)}>
                        Mark read
                      </button>
                    </td>
                  </tr>
                ))}
              </tbody>
            </table>
          </div>
        </>
      )}
    </Card>
  );
}
