// A notes assistant on FleetLM with the Vercel AI SDK: real tools (`addNote`, `listNotes`, and
// `deleteNote`, which runs only after the user approves it in the chat), any AI SDK model, and
// @fleetlm/agent for the FleetLM side (signature check, history, reply stream). `server.mjs`
// serves it with a real provider; test/ runs it with the AI SDK's mock model against a real
// FleetLM server.
import { createFleetLMHandler, toModelMessages } from "@fleetlm/agent";
import { stepCountIs, streamText, tool } from "ai";
import { z } from "zod";

/** Notes per user, in memory (a real agent keeps them in its database). */
export class NoteStore {
  #notes = new Map();
  of(userId) {
    if (!this.#notes.has(userId)) this.#notes.set(userId, new Map());
    return this.#notes.get(userId);
  }
}

/** The tools, bound to the user whose conversation this is. */
export function notesTools(notes, userId) {
  const mine = notes.of(userId);
  return {
    addNote: tool({
      description: "Save a note under a title (replaces a note with the same title).",
      inputSchema: z.object({ title: z.string(), text: z.string() }),
      execute: async ({ title, text }) => {
        mine.set(title, text);
        return { saved: title };
      },
    }),
    listNotes: tool({
      description: "List the user's notes.",
      inputSchema: z.object({}),
      execute: async () => ({ notes: [...mine].map(([title, text]) => ({ title, text })) }),
    }),
    deleteNote: tool({
      description: "Delete a note. The user must approve it.",
      inputSchema: z.object({ title: z.string() }),
      needsApproval: true,
      execute: async ({ title }) => ({ deleted: mine.delete(title) ? title : null }),
    }),
  };
}

/**
 * The agent: a Fetch API handler `(Request) => Promise<Response>` for FleetLM's webhook.
 * `model` is any AI SDK language model; `secret` the signing secret FleetLM showed when the
 * agent was registered (or a function returning it). `onRejected` sees every refused call.
 */
export function createNotesAgent({ model, secret, notes = new NoteStore(), onRejected, onTurn }) {
  return createFleetLMHandler({
    secret,
    onRejected,
    async respond({ call, abortSignal }) {
      onTurn?.(call, abortSignal);
      const tools = notesTools(notes, call.body.user_id);
      return streamText({
        model,
        system: "You keep the user's notes. Use the tools; deleting needs the user's approval.",
        messages: await toModelMessages(call, { tools }),
        tools,
        stopWhen: stepCountIs(5),
        abortSignal, // FleetLM closes the request when the user stops the turn
      });
    },
  });
}
