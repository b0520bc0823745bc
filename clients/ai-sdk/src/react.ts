// React: `useFleetLMChat` is `useChat` over a FleetLM session, kept in sync with messages
// written elsewhere (another tab, another device, the agent writing by REST).
import { Chat, useChat } from "@ai-sdk/react";
import type { ChatInit, UIMessage } from "ai";
import { useEffect, useMemo, useRef, useState } from "react";
import { latestCallbacks } from "./callbacks.js";
import { syncChat, type ChatSyncOptions } from "./sync.js";
import type { FleetLMChatTransport } from "./transport.js";

export type UseFleetLMChatOptions<UI_MESSAGE extends UIMessage> = Omit<ChatInit<UI_MESSAGE>, "transport" | "id"> & {
  /** The chat id = the FleetLM session id. */
  id: string;
  transport: FleetLMChatTransport<UI_MESSAGE>;
  /** Resume a reply that is streaming when the component mounts (default true). */
  resume?: boolean;
  /** Chunk-rendering throttle passed to `useChat`. */
  throttle?: number;
} & ChatSyncOptions;

/**
 * `useChat` for a FleetLM session: the same helpers (`messages`, `sendMessage`, `stop`,
 * `regenerate`, `addToolOutput`, `addToolApprovalResponse`, …), plus: messages written elsewhere
 * appear, replies another tab started stream in, and a reply streaming at mount is resumed.
 */
export function useFleetLMChat<UI_MESSAGE extends UIMessage = UIMessage>(options: UseFleetLMChatOptions<UI_MESSAGE>) {
  const { id, transport, resume = true, throttle, followRemoteStreams, ...init } = options;
  // The callbacks (onFinish, onToolCall, …) change at every render: the chat calls the latest.
  const latest = useRef(init);
  latest.current = init;
  // One Chat per session id and transport (like useChat's own `id` handling). Its `dispose()`
  // does not close the shared transport while other chats use it (see transport.close).
  const chat = useMemo(
    () => new Chat<UI_MESSAGE>({ ...init, ...latestCallbacks<UI_MESSAGE>(latest), id, transport }),
    [id, transport],
  );
  // `experimental_throttle`: the name @ai-sdk/react 2 and 3 (ai 5, 6) know; 4 (ai 7) still reads it.
  const helpers = useChat<UI_MESSAGE>({ chat, resume, experimental_throttle: throttle });
  useFleetLMSync(chat, transport, { followRemoteStreams });
  return helpers;
}

/** Keeps an existing `Chat` (e.g. one passed to `useChat({ chat })`) in sync with its session. */
export function useFleetLMSync<UI_MESSAGE extends UIMessage>(
  chat: Chat<UI_MESSAGE>,
  transport: FleetLMChatTransport<UI_MESSAGE>,
  options: ChatSyncOptions = {},
): void {
  const follow = options.followRemoteStreams;
  useEffect(() => {
    const sync = syncChat(chat, transport, { followRemoteStreams: follow });
    return () => sync.stop();
  }, [chat, transport, follow]);
}

/** What `useFleetLMFileUrl` gives: a URL to show the file by, or why it could not be had. */
export type FleetLMFileUrl = {
  /** Undefined while the file loads, or if it could not be fetched. */
  url: string | undefined;
  error: Error | undefined;
};

/**
 * A URL to show a file part by (`<img src>`, a link), in token mode as in open mode: a file on the
 * FleetLM server is fetched with the transport's credentials (a browser cannot send a bearer token
 * from an `<img>`) into an object URL, revoked when the component unmounts or the URL changes;
 * `data:` and `blob:` URLs (the sender's own copy) and files on other hosts are given as they are.
 */
export function useFleetLMFileUrl<UI_MESSAGE extends UIMessage>(
  transport: FleetLMChatTransport<UI_MESSAGE>,
  url: string | undefined,
): FleetLMFileUrl {
  const client = transport.client;
  const direct =
    url === undefined || url.startsWith("data:") || url.startsWith("blob:") || !client.isOwnFileUrl(url);
  const [fetched, setFetched] = useState<{ for: string; url?: string; error?: Error } | null>(null);
  useEffect(() => {
    if (direct || url === undefined) return;
    const abort = new AbortController();
    let objectUrl: string | undefined;
    client.fileObjectUrl(url, { signal: abort.signal }).then(
      (made) => {
        if (abort.signal.aborted) {
          URL.revokeObjectURL(made);
          return;
        }
        objectUrl = made;
        setFetched({ for: url, url: made });
      },
      (error: unknown) => {
        if (!abort.signal.aborted) {
          setFetched({ for: url, error: error instanceof Error ? error : new Error(String(error)) });
        }
      },
    );
    return () => {
      abort.abort();
      if (objectUrl !== undefined) URL.revokeObjectURL(objectUrl);
    };
  }, [client, url, direct]);
  if (direct) return { url, error: undefined };
  if (fetched?.for !== url) return { url: undefined, error: undefined };
  return { url: fetched.url, error: fetched.error };
}
