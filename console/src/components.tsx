// Pieces shared by the views: form fields with inline errors, message rendering, sparklines.
import type { ComponentChildren } from "preact";
import { useId } from "preact/hooks";
import type { Message } from "./api";
import type { LiveReply, Part } from "./stream";

export function ErrorNote({ error }: { error: string | null | undefined }) {
  if (!error) return null;
  return (
    <p class="error" role="alert">
      {error}
    </p>
  );
}

export function Field(props: {
  label: string;
  name: string;
  value: string;
  onInput: (value: string) => void;
  errors?: string[];
  type?: string;
  hint?: string;
  disabled?: boolean;
  required?: boolean;
  multiline?: boolean;
}) {
  const id = useId();
  const errorId = `${id}-error`;
  const hintId = `${id}-hint`;
  const invalid = (props.errors?.length ?? 0) > 0;
  const describedBy = [invalid ? errorId : "", props.hint ? hintId : ""].filter(Boolean).join(" ") || undefined;
  const common = {
    id,
    name: props.name,
    value: props.value,
    disabled: props.disabled,
    required: props.required,
    "aria-invalid": invalid ? ("true" as const) : undefined,
    "aria-describedby": describedBy,
    onInput: (e: Event) => props.onInput((e.currentTarget as HTMLInputElement).value),
  };
  return (
    <div class={invalid ? "field invalid" : "field"}>
      <label for={id}>{props.label}</label>
      {props.multiline ? <textarea rows={3} {...common} /> : <input type={props.type ?? "text"} {...common} />}
      {props.hint && (
        <small id={hintId} class="hint">
          {props.hint}
        </small>
      )}
      {invalid && (
        <small id={errorId} class="field-error">
          {props.label} {props.errors!.join(", ")}
        </small>
      )}
    </div>
  );
}

export function Json({ value }: { value: unknown }) {
  return <pre class="json">{typeof value === "string" ? value : JSON.stringify(value, null, 2)}</pre>;
}

/** Answers a tool call waiting for approval; absent where the console cannot answer it. */
export type OnApproval = (part: Part, approved: boolean) => void;

function PartView({ part, onApproval }: { part: Part; onApproval?: OnApproval }) {
  if (part.type === "text") return <p class="part-text">{part.text}</p>;
  if (part.type === "reasoning")
    return (
      <details class="part-reasoning" open>
        <summary>Reasoning</summary>
        <p>{part.text}</p>
      </details>
    );
  if (part.type === "step-start") return <hr class="step" aria-label="step" />;
  if (part.type === "dynamic-tool" || part.type.startsWith("tool-")) {
    const name = part.toolName ?? part.type.slice(5);
    const input = part.input !== undefined ? part.input : part.inputText;
    return (
      <div class="part-tool">
        <div class="tool-head">
          <span class="tool-name">Tool: {name}</span> <span class="badge">{part.state ?? ""}</span>
        </div>
        {input !== undefined && input !== "" && (
          <div>
            <span class="label">Input</span>
            <Json value={input} />
          </div>
        )}
        {part.output !== undefined && (
          <div>
            <span class="label">Output</span>
            <Json value={part.output} />
          </div>
        )}
        {part.errorText && <p class="error">{part.errorText}</p>}
        {part.approval?.reason && <p class="muted small">Reason: {String(part.approval.reason)}</p>}
        {part.state === "approval-requested" && onApproval && (
          <div class="approval" role="group" aria-label={`Approval for ${name}`}>
            <button type="button" class="small" onClick={() => onApproval(part, true)}>
              Approve
            </button>{" "}
            <button type="button" class="secondary small" onClick={() => onApproval(part, false)}>
              Deny
            </button>
          </div>
        )}
      </div>
    );
  }
  return (
    <div class="part-other">
      <span class="label">{part.type}</span>
      <Json value={part} />
    </div>
  );
}

export function MessageView(props: {
  message: Message;
  userId: string;
  superseded?: boolean;
  /** Tool calls of this message still waiting for the user's approval may be answered. */
  onApproval?: (message: Message, part: Part, approved: boolean) => void;
  answered?: Set<string>;
}) {
  const { message, userId, superseded, onApproval, answered } = props;
  const mine = message.sender_id === userId;
  const parts: Part[] | null = Array.isArray(message.content?.parts) ? message.content.parts : null;
  const text = typeof message.content?.text === "string" ? message.content.text : null;
  return (
    <li class={`${mine ? "msg user" : "msg agent"}${superseded ? " superseded" : ""}`} data-seq={message.seq}>
      <div class="msg-meta">
        <span class="sender">{message.sender_id}</span> <span class="muted">#{message.seq} · {message.kind}</span>
        {message.metadata?.termination && message.metadata.termination !== "finish" && (
          <span class="badge warn">{message.metadata.termination}</span>
        )}
        {superseded && <span class="badge muted-badge">superseded</span>}
      </div>
      {parts ? (
        parts.map((part, i) => (
          <PartView
            key={i}
            part={part}
            onApproval={
              onApproval && !answered?.has(part.toolCallId) ? (p, approved) => onApproval(message, p, approved) : undefined
            }
          />
        ))
      ) : text !== null ? <p class="part-text">{text}</p> : <Json value={message.content} />}
      {message.metadata?.error && <p class="error">{String(message.metadata.error)}</p>}
    </li>
  );
}

export function LiveReplyView({ reply, agentId }: { reply: LiveReply; agentId: string }) {
  return (
    <li class="msg agent streaming" aria-live="polite" aria-busy="true">
      <div class="msg-meta">
        <span class="sender">{agentId}</span> <span class="badge">streaming</span>
      </div>
      {reply.parts.map((part, i) => (
        <PartView key={i} part={part} />
      ))}
      {reply.error && <p class="error">{reply.error}</p>}
    </li>
  );
}

/** A live line chart of the last `capacity` samples, newest at the right; gaps where unknown. */
export function Sparkline(props: { label: string; values: (number | null)[]; unit: string; digits?: number; capacity?: number }) {
  const { label, values, unit, digits = 1, capacity = 60 } = props;
  const width = 240;
  const height = 48;
  const known = values.filter((v): v is number => v !== null);
  const max = Math.max(1e-9, ...known);
  // The x span grows with the history (at least 15 samples wide) up to `capacity`.
  const span = Math.min(capacity, Math.max(15, values.length));
  const step = width / Math.max(1, span - 1);
  const offset = span - values.length;
  const coords = values
    .map((v, i) => (v === null ? null : [(offset + i) * step, height - (v / max) * (height - 4) - 2]))
    .filter((c): c is number[] => c !== null);
  const line = coords.map(([x, y]) => `${x.toFixed(1)},${y.toFixed(1)}`).join(" ");
  const area = coords.length > 1 ? `${coords[0][0].toFixed(1)},${height} ${line} ${coords[coords.length - 1][0].toFixed(1)},${height}` : "";
  const last = known.length ? known[known.length - 1] : null;
  return (
    <figure class="chart">
      <figcaption>
        <span>{label}</span>
        <strong>{last === null ? "–" : `${last.toFixed(digits)}${unit ? ` ${unit}` : ""}`}</strong>
      </figcaption>
      <svg viewBox={`0 0 ${width} ${height}`} role="img" aria-label={`${label}: ${last === null ? "no data yet" : `now ${last.toFixed(digits)} ${unit}, peak ${max.toFixed(digits)} ${unit}`}`} preserveAspectRatio="none">
        {area && <polygon points={area} fill="currentColor" fill-opacity="0.12" stroke="none" />}
        <polyline points={line} fill="none" stroke="currentColor" stroke-width="2" />
      </svg>
      <small class="muted">peak {known.length ? max.toFixed(digits) : "–"}</small>
    </figure>
  );
}

export function Card({ title, children, actions }: { title: string; children: ComponentChildren; actions?: ComponentChildren }) {
  return (
    <section class="card" aria-label={title}>
      <header class="card-head">
        <h2>{title}</h2>
        {actions}
      </header>
      {children}
    </section>
  );
}

export function formatTime(text: string | null | undefined): string {
  if (!text) return "–";
  const date = new Date(text);
  return Number.isNaN(date.getTime()) ? text : date.toLocaleString();
}
