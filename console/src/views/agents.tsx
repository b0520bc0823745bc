// Agents: list, create, edit, disable/enable; per agent the recent dispatches and their latency.
import { useEffect, useState } from "preact/hooks";
import { api, ApiError, redact, type Agent, type Delivery, type FinishedDispatch } from "../api";
import { Card, ErrorNote, Field, formatTime } from "../components";

interface FormState {
  id: string;
  name: string;
  origin_url: string;
  webhook_path: string;
  message_history_mode: string;
  message_history_limit: string;
  timeout_ms: string;
  debounce_window_ms: string;
  headers: string;
}

const EMPTY: FormState = {
  id: "",
  name: "",
  origin_url: "",
  webhook_path: "/webhook",
  message_history_mode: "tail",
  message_history_limit: "50",
  timeout_ms: "30000",
  debounce_window_ms: "500",
  headers: "",
};

function fromAgent(agent: Agent): FormState {
  return {
    id: agent.id,
    name: agent.name,
    origin_url: agent.origin_url,
    webhook_path: agent.webhook_path,
    message_history_mode: agent.message_history_mode,
    message_history_limit: String(agent.message_history_limit),
    timeout_ms: String(agent.timeout_ms),
    debounce_window_ms: String(agent.debounce_window_ms),
    headers: "",
  };
}

/** Numbers go as numbers when they look like one, otherwise as typed (the server says why). */
function numberOrText(text: string): number | string {
  return /^-?\d+$/.test(text.trim()) ? Number(text.trim()) : text;
}

function parseHeaders(text: string): { headers?: Record<string, string>; error?: string } {
  if (!text.trim()) return {};
  const headers: Record<string, string> = {};
  for (const line of text.split("\n")) {
    if (!line.trim()) continue;
    const at = line.indexOf(":");
    if (at <= 0) return { error: `"${line.trim()}" is not "name: value"` };
    headers[line.slice(0, at).trim()] = line.slice(at + 1).trim();
  }
  return { headers };
}

function AgentForm({ editing, onSaved, onCancel }: { editing: Agent | null; onSaved: (a: Agent) => void; onCancel: () => void }) {
  const [form, setForm] = useState<FormState>(editing ? fromAgent(editing) : EMPTY);
  const [errors, setErrors] = useState<Record<string, string[]>>({});
  const [error, setError] = useState<string | null>(null);
  const [busy, setBusy] = useState(false);
  const set = (key: keyof FormState) => (value: string) => setForm({ ...form, [key]: value });

  const submit = async (e: Event) => {
    e.preventDefault();
    setBusy(true);
    setError(null);
    setErrors({});
    const headers = parseHeaders(form.headers);
    if (headers.error) {
      setErrors({ headers: [headers.error] });
      setBusy(false);
      return;
    }
    const body: Record<string, unknown> = {
      name: form.name,
      origin_url: form.origin_url,
      webhook_path: form.webhook_path,
      message_history_mode: form.message_history_mode,
      message_history_limit: numberOrText(form.message_history_limit),
      timeout_ms: numberOrText(form.timeout_ms),
      debounce_window_ms: numberOrText(form.debounce_window_ms),
    };
    if (headers.headers) body.headers = headers.headers;
    try {
      const saved = editing
        ? await api<{ agent: Agent }>("PATCH", `/api/agents/${encodeURIComponent(editing.id)}`, { agent: body })
        : await api<{ agent: Agent }>("POST", "/api/agents", { agent: { id: form.id, ...body } });
      onSaved(saved.agent);
    } catch (err) {
      if (err instanceof ApiError && Object.keys(err.fields).length) {
        setErrors(err.fields);
        setError("Please correct the fields marked below.");
        // Keyboard and screen-reader users land on the first field to fix.
        window.setTimeout(() => document.querySelector<HTMLElement>(".agent-form [aria-invalid=true]")?.focus(), 0);
      } else {
        setError((err as Error).message);
      }
    } finally {
      setBusy(false);
    }
  };

  return (
    <form class="agent-form" onSubmit={submit} aria-label={editing ? `Edit agent ${editing.id}` : "New agent"} noValidate>
      <h3>{editing ? `Edit ${editing.id}` : "New agent"}</h3>
      <ErrorNote error={error} />
      <div class="grid2">
        <Field label="Id" name="id" value={form.id} onInput={set("id")} errors={errors.id} disabled={!!editing} hint="A-Z a-z 0-9 . _ : @ -" />
        <Field label="Name" name="name" value={form.name} onInput={set("name")} errors={errors.name} />
        <Field label="Origin URL" name="origin_url" value={form.origin_url} onInput={set("origin_url")} errors={errors.origin_url} hint="e.g. http://127.0.0.1:8080" />
        <Field label="Webhook path" name="webhook_path" value={form.webhook_path} onInput={set("webhook_path")} errors={errors.webhook_path} />
        <div class={errors.message_history_mode ? "field invalid" : "field"}>
          <label for="history-mode">History mode</label>
          <select id="history-mode" name="message_history_mode" value={form.message_history_mode} onChange={(e) => set("message_history_mode")((e.currentTarget as HTMLSelectElement).value)}>
            <option value="tail">tail (newest N)</option>
            <option value="last">last (newest only)</option>
            <option value="entire">entire</option>
          </select>
          {errors.message_history_mode && <small class="field-error">History mode {errors.message_history_mode.join(", ")}</small>}
        </div>
        <Field label="History limit" name="message_history_limit" value={form.message_history_limit} onInput={set("message_history_limit")} errors={errors.message_history_limit} />
        <Field label="Timeout (ms)" name="timeout_ms" value={form.timeout_ms} onInput={set("timeout_ms")} errors={errors.timeout_ms} />
        <Field label="Debounce window (ms)" name="debounce_window_ms" value={form.debounce_window_ms} onInput={set("debounce_window_ms")} errors={errors.debounce_window_ms} />
      </div>
      <Field
        label="Headers"
        name="headers"
        multiline
        value={form.headers}
        onInput={set("headers")}
        errors={errors.headers}
        hint={editing ? "One “name: value” per line. Leave empty to keep the current headers (values are never shown)." : "One “name: value” per line, sent with every call."}
      />
      <div class="actions">
        <button type="submit" disabled={busy}>
          {editing ? "Save" : "Create agent"}
        </button>
        <button type="button" class="secondary" onClick={onCancel}>
          Cancel
        </button>
      </div>
    </form>
  );
}

function percentile(values: number[], p: number): number | null {
  if (!values.length) return null;
  const sorted = [...values].sort((a, b) => a - b);
  return sorted[Math.min(sorted.length - 1, Math.floor((p / 100) * sorted.length))];
}

/** A cancelled dispatch is the user's choice, not the agent's failure. */
const OUTCOME_BADGE: Record<string, string> = { ok: "good", failed: "bad", cancelled: "muted-badge" };
const DELIVERY_BADGE: Record<string, string> = { ...OUTCOME_BADGE, retried: "warn" };

function Dispatches({ agent }: { agent: Agent }) {
  const [list, setList] = useState<FinishedDispatch[] | null>(null);
  const [deliveries, setDeliveries] = useState<Delivery[]>([]);
  const [error, setError] = useState<string | null>(null);
  useEffect(() => {
    let stop = false;
    const path = `/api/agents/${encodeURIComponent(agent.id)}`;
    const load = () =>
      Promise.all([
        api<{ dispatches: FinishedDispatch[] }>("GET", `${path}/dispatches`),
        api<{ deliveries: Delivery[] }>("GET", `${path}/deliveries`),
      ])
        .then(([d, w]) => {
          if (stop) return;
          setList(d.dispatches);
          setDeliveries(w.deliveries);
        })
        .catch((e) => !stop && setError(e.message));
    load();
    const timer = window.setInterval(load, 3000);
    return () => {
      stop = true;
      window.clearInterval(timer);
    };
  }, [agent.id]);
  if (error) return <ErrorNote error={error} />;
  if (!list) return <p class="muted">Loading…</p>;
  if (!list.length) return <p class="muted">No dispatches since the server started.</p>;
  const ok = list.filter((d) => d.outcome === "ok").length;
  const cancelled = list.filter((d) => d.outcome === "cancelled").length;
  const failed = list.length - ok - cancelled;
  const durations = list.map((d) => d.duration_ms);
  return (
    <div class="dispatches">
      <p>
        Last {list.length}: <strong>{ok} ok</strong>, <strong>{failed} failed</strong>
        {cancelled > 0 && (
          <>
            , <strong>{cancelled} cancelled</strong>
          </>
        )}{" "}
        · latency p50{" "}
        {percentile(durations, 50)} ms, p95 {percentile(durations, 95)} ms
      </p>
      <table>
        <caption class="visually-hidden">Recent dispatches of {agent.id}</caption>
        <thead>
          <tr>
            <th scope="col">Finished</th>
            <th scope="col">Session</th>
            <th scope="col">Outcome</th>
            <th scope="col">Latency</th>
          </tr>
        </thead>
        <tbody>
          {list.slice(0, 10).map((d) => (
            <tr key={d.dispatch_id}>
              <td>{formatTime(d.finished_at)}</td>
              <td>
                <a href={`#/sessions/${encodeURIComponent(d.session_id)}`}>{d.session_id}</a>
              </td>
              <td>
                <span class={`badge ${OUTCOME_BADGE[d.outcome] ?? "bad"}`} data-outcome={d.outcome}>
                  {d.outcome}
                </span>
                {d.error && <span class="error small"> {redact(d.error)}</span>}
              </td>
              <td>{d.duration_ms} ms</td>
            </tr>
          ))}
        </tbody>
      </table>
      {deliveries.length > 0 && (
        <>
          <h4>Webhook deliveries (one per HTTP attempt)</h4>
          <table data-testid="deliveries">
            <caption class="visually-hidden">Recent webhook deliveries of {agent.id}</caption>
            <thead>
              <tr>
                <th scope="col">Finished</th>
                <th scope="col">Attempt</th>
                <th scope="col">HTTP</th>
                <th scope="col">Outcome</th>
                <th scope="col">Latency</th>
              </tr>
            </thead>
            <tbody>
              {deliveries.slice(0, 10).map((d) => (
                <tr key={`${d.dispatch_id}-${d.attempt}`} data-delivery={d.outcome}>
                  <td>{formatTime(d.finished_at)}</td>
                  <td>{d.attempt}</td>
                  <td>{d.http_status ?? "–"}</td>
                  <td>
                    <span class={`badge ${DELIVERY_BADGE[d.outcome] ?? "bad"}`}>{d.outcome}</span>
                    {d.error && <span class="error small"> {redact(d.error)}</span>}
                  </td>
                  <td>{d.latency_ms} ms</td>
                </tr>
              ))}
            </tbody>
          </table>
        </>
      )}
    </div>
  );
}

export function AgentsView() {
  const [agents, setAgents] = useState<Agent[] | null>(null);
  const [error, setError] = useState<string | null>(null);
  const [editing, setEditing] = useState<Agent | "new" | null>(null);
  const [open, setOpen] = useState<string | null>(null);

  const load = () =>
    api<{ agents: Agent[] }>("GET", "/api/agents")
      .then((r) => setAgents(r.agents))
      .catch((e) => setError(e.message));
  useEffect(() => {
    load();
  }, []);

  const toggle = async (agent: Agent) => {
    setError(null);
    try {
      if (agent.status === "enabled") await api("DELETE", `/api/agents/${encodeURIComponent(agent.id)}`);
      else await api("PATCH", `/api/agents/${encodeURIComponent(agent.id)}`, { agent: { status: "enabled" } });
      await load();
    } catch (e) {
      setError((e as Error).message);
    }
  };

  return (
    <Card
      title="Agents"
      actions={
        <button type="button" onClick={() => setEditing("new")} disabled={editing !== null}>
          New agent
        </button>
      }
    >
      <ErrorNote error={error} />
      {editing !== null && (
        <AgentForm
          key={editing === "new" ? "new" : editing.id}
          editing={editing === "new" ? null : editing}
          onCancel={() => setEditing(null)}
          onSaved={() => {
            setEditing(null);
            load();
          }}
        />
      )}
      {agents === null ? (
        <p class="muted">Loading…</p>
      ) : agents.length === 0 ? (
        <p class="muted">No agents yet. Create one to start.</p>
      ) : (
        <div class="table-wrap">
          <table class="agents">
            <caption class="visually-hidden">Agents</caption>
            <thead>
              <tr>
                <th scope="col">Id</th>
                <th scope="col">Name</th>
                <th scope="col">Webhook</th>
                <th scope="col">History</th>
                <th scope="col">Status</th>
                <th scope="col">Actions</th>
              </tr>
            </thead>
            <tbody>
              {agents.map((agent) => [
                <tr key={agent.id} data-agent={agent.id}>
                  <td>
                    <strong>{agent.id}</strong>
                  </td>
                  <td>{agent.name}</td>
                  <td class="mono">
                    {agent.origin_url}
                    {agent.webhook_path}
                  </td>
                  <td>
                    {agent.message_history_mode}
                    {agent.message_history_mode === "tail" ? ` ${agent.message_history_limit}` : ""}
                  </td>
                  <td>
                    <span class={`badge ${agent.status === "enabled" ? "good" : "muted-badge"}`}>{agent.status}</span>
                  </td>
                  <td class="row-actions">
                    <button type="button" class="secondary" aria-expanded={open === agent.id} onClick={() => setOpen(open === agent.id ? null : agent.id)}>
                      Dispatches
                    </button>
                    <button type="button" class="secondary" onClick={() => setEditing(agent)}>
                      Edit
                    </button>
                    <button type="button" class="secondary" onClick={() => toggle(agent)}>
                      {agent.status === "enabled" ? "Disable" : "Enable"}
                    </button>
                  </td>
                </tr>,
                open === agent.id && (
                  <tr key={`${agent.id}-dispatches`}>
                    <td colSpan={6}>
                      <Dispatches agent={agent} />
                    </td>
                  </tr>
                ),
              ])}
            </tbody>
          </table>
        </div>
      )}
    </Card>
  );
}
