// The callbacks a chat is created with, kept current: `useFleetLMChat` creates its `Chat` once
// per chat id, but the callbacks it is given change at every render (they close over state).
import type { ChatInit, UIMessage } from "ai";

/** The `ChatInit` callbacks a `Chat` keeps from its construction. */
export const CHAT_CALLBACKS = ["onError", "onToolCall", "onFinish", "onData", "sendAutomaticallyWhen"] as const;

type Callbacks<UI_MESSAGE extends UIMessage> = Pick<ChatInit<UI_MESSAGE>, (typeof CHAT_CALLBACKS)[number]>;

/**
 * Stable callbacks that call whatever `latest.current` holds when they are called (set it at
 * every render), as `@ai-sdk/react`'s `useChat` does for the chats it creates itself. A missing
 * callback does nothing (`sendAutomaticallyWhen`: false).
 */
export function latestCallbacks<UI_MESSAGE extends UIMessage>(latest: { current: Callbacks<UI_MESSAGE> }): Callbacks<UI_MESSAGE> {
  const wrapped: Record<string, unknown> = {};
  for (const name of CHAT_CALLBACKS) {
    wrapped[name] = (...args: unknown[]) => {
      const fn = (latest.current as Record<string, unknown>)[name];
      if (typeof fn === "function") return fn(...args);
      return name === "sendAutomaticallyWhen" ? false : undefined;
    };
  }
  return wrapped as Callbacks<UI_MESSAGE>;
}
