// useChat + FleetLMChatTransport: the chat id in the URL is the FleetLM session id. Reload the
// page mid-reply and it resumes; Stop cancels the agent's turn on the server; a second tab on the
// same URL stays in sync. Attach an image (or any file): the transport uploads it to the session
// and stores the server's path in the message; the page shows it from the history after a reload.
import { FleetLMChatTransport, loadChatMessages } from "@fleetlm/ai-sdk";
import { useFleetLMChat, useFleetLMFileUrl } from "@fleetlm/ai-sdk/react";
import type { FileUIPart, UIMessage } from "ai";
import { useEffect, useMemo, useRef, useState, type FormEvent } from "react";

const params = new URLSearchParams(location.search);
// The FleetLM server (the Vite dev server proxies nothing: the browser talks to FleetLM directly).
const FLEETLM_URL = params.get("server") ?? import.meta.env.VITE_FLEETLM_URL ?? "http://127.0.0.1:4000";
const USER_ID = params.get("user") ?? "alice";
const AGENT_ID = params.get("agent") ?? "echo";

function chatIdFromUrl(): string {
  const hash = new URLSearchParams(location.hash.slice(1)).get("chat");
  if (hash) return hash;
  const id = `chat-${crypto.randomUUID().slice(0, 8)}`;
  history.replaceState(null, "", `${location.pathname}${location.search}#chat=${id}`);
  return id;
}

export function App() {
  const [chatId] = useState(chatIdFromUrl);
  const transport = useMemo(
    () => new FleetLMChatTransport({ url: FLEETLM_URL, userId: USER_ID, agentId: AGENT_ID }),
    [],
  );
  const [initial, setInitial] = useState<UIMessage[] | null>(null);
  const [loadError, setLoadError] = useState<string | null>(null);
  useEffect(() => {
    loadChatMessages({ url: FLEETLM_URL, userId: USER_ID, chatId }).then(setInitial, (e) => setLoadError(String(e?.message ?? e)));
  }, [chatId]);
  if (loadError) return <p className="error">Could not load the chat: {loadError}</p>;
  if (!initial) return <p className="muted">Loading…</p>;
  return <Chat chatId={chatId} transport={transport} initial={initial} />;
}

function Chat({ chatId, transport, initial }: { chatId: string; transport: FleetLMChatTransport; initial: UIMessage[] }) {
  const { messages, sendMessage, status, stop, regenerate, error, addToolApprovalResponse } = useFleetLMChat({
    id: chatId,
    transport,
    messages: initial,
  });
  const [input, setInput] = useState("");
  const [files, setFiles] = useState<FileList | undefined>(undefined);
  const fileInput = useRef<HTMLInputElement>(null);
  const busy = status === "submitted" || status === "streaming";
  const submit = (event: FormEvent) => {
    event.preventDefault();
    if ((!input.trim() && !files?.length) || busy) return;
    // The AI SDK reads a FileList into file parts (data: URLs); the transport uploads them.
    void sendMessage(input.trim() ? { text: input, files } : { files: files! });
    setInput("");
    setFiles(undefined);
    if (fileInput.current) fileInput.current.value = "";
  };
  return (
    <main>
      <header>
        <h1>FleetLM chat</h1>
        <span className="muted">
          session <code>{chatId}</code> · user <code>{USER_ID}</code> · agent <code>{AGENT_ID}</code> ·{" "}
          <a href={`${location.pathname}${location.search}`}>new chat</a>
        </span>
      </header>
      <ol className="messages" data-testid="messages">
        {messages.map((message) => (
          <li key={message.id} className={message.role} data-role={message.role}>
            {message.parts.map((part, i) => {
              if (part.type === "text") return <span key={i} className="text">{part.text}</span>;
              if (part.type === "reasoning") return <em key={i} className="reasoning">{part.text}</em>;
              if (part.type === "file") return <Attachment key={i} part={part} transport={transport} />;
              if (part.type.startsWith("tool-") && "state" in part) {
                const tool = part as any;
                return (
                  <div key={i} className="tool">
                    <code>{part.type.slice(5)}({JSON.stringify(tool.input)})</code> {tool.state}
                    {tool.state === "approval-requested" && (
                      <span>
                        <button onClick={() => addToolApprovalResponse({ id: tool.approval.id, approved: true })}>Approve</button>
                        <button onClick={() => addToolApprovalResponse({ id: tool.approval.id, approved: false })}>Deny</button>
                      </span>
                    )}
                    {tool.output !== undefined && <pre>{JSON.stringify(tool.output)}</pre>}
                  </div>
                );
              }
              return null;
            })}
          </li>
        ))}
      </ol>
      {error && <p className="error">{error.message}</p>}
      <form onSubmit={submit}>
        <input value={input} onChange={(e) => setInput(e.target.value)} placeholder="Say something…" autoFocus />
        <input
          ref={fileInput}
          type="file"
          accept="image/*"
          multiple
          aria-label="Attach images"
          data-testid="attach"
          onChange={(e) => setFiles(e.target.files?.length ? e.target.files : undefined)}
        />
        {busy ? (
          <button type="button" onClick={() => void stop()}>
            Stop
          </button>
        ) : (
          <button type="submit">Send</button>
        )}
        <button type="button" disabled={busy || !messages.some((m) => m.role === "assistant")} onClick={() => void regenerate()}>
          Regenerate
        </button>
      </form>
      <p className="muted" data-testid="status">status: {status}</p>
    </main>
  );
}

// A file part: the sender's own copy holds a data: URL; from the history (a reload, another tab)
// it is the file's absolute URL on the FleetLM server. `useFleetLMFileUrl` fetches such a file
// with the transport's credentials into a blob: URL, so the same code shows it in token mode,
// where an <img src> on the server's URL could not send the bearer token.
function Attachment({ part, transport }: { part: FileUIPart; transport: FleetLMChatTransport }) {
  const { url, error } = useFleetLMFileUrl(transport, part.url);
  if (error) return <span className="attachment error">{part.filename ?? "file"}: {error.message}</span>;
  if (!url) return <span className="attachment muted">{part.filename ?? "file"}…</span>;
  if (part.mediaType.startsWith("image/")) {
    return <img className="attachment" src={url} alt={part.filename ?? "image"} data-testid="attachment" />;
  }
  return (
    <a className="attachment" href={url} target="_blank" rel="noreferrer" download={part.filename}>
      {part.filename ?? "file"}
    </a>
  );
}
