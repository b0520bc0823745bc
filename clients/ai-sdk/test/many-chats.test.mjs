// Many chats on one transport (one socket): the transport leaves the sessions of chats not in use
// (an LRU bounded by `maxOpenChats`), so a page can open more chats than the server allows
// channels per socket (100), and an evicted chat rejoins when it is used again.
import assert from "node:assert/strict";
import { after, before, describe, test } from "node:test";
import WebSocket from "ws";
import { FleetLMChatTransport, loadChatMessages, syncChat } from "@fleetlm/ai-sdk";
import { TestChat, plain, registerAgent, startAgent, startServer, stopAll } from "../../test-support/harness.mjs";

let base;
const transports = [];
const SLOW_TEXT = Array.from({ length: 40 }, (_, i) => `w${i} `).join("");
const textOf = (message) => message.parts.filter((p) => p.type === "text").map((p) => p.text).join("");
function transport(options = {}) {
  const t = new FleetLMChatTransport({ url: base, userId: "alice", agentId: "bot", WebSocket, ...options });
  transports.push(t);
  return t;
}

before(async () => {
  base = await startServer();
  const agent = await startAgent();
  await registerAgent(base, agent.origin, { id: "bot" });
});

after(async () => {
  for (const t of transports) t.close({ force: true });
  await stopAll();
});

describe("many chats on one transport", () => {
  test("500 chats each send and get their reply; an early chat rejoins and works again", { timeout: 600_000 }, async () => {
    const t = transport();
    const run = `many-${Date.now()}`;
    const chats = [];
    const count = 500;
    const parallel = 8;
    let next = 0;
    let most = 0;
    const worker = async () => {
      while (next < count) {
        const i = next++;
        const chat = new TestChat({ id: `${run}-${i}`, transport: t });
        chats[i] = chat;
        await chat.sendMessage({ text: `hi ${i}` });
        assert.equal(chat.status, "ready", `chat ${i}: ${chat.error?.message}`);
        assert.equal(textOf(chat.messages[1]), `echo: hi ${i}`, `chat ${i}'s reply`);
        most = Math.max(most, t.openChats().length);
      }
    };
    await Promise.all(Array.from({ length: parallel }, worker));
    assert.ok(most <= 50, `at most the default bound of chats joined at once (saw ${most})`);
    assert.ok(!t.openChats().includes(chats[0].id), "the first chat was left");
    // Back to the first chat: it rejoins and its next turn streams.
    await chats[0].sendMessage({ text: "back again" });
    assert.equal(chats[0].status, "ready", chats[0].error?.message);
    assert.equal(textOf(chats[0].messages[3]), "echo: back again");
    assert.ok(t.openChats().includes(chats[0].id));
    assert.deepEqual(plain(await loadChatMessages({ url: base, userId: "alice", chatId: chats[0].id })), plain(chats[0].messages));
  });

  test("a chat with a subscriber (syncChat) is not evicted; once released it can be", async () => {
    const t = transport({ maxOpenChats: 2 });
    const run = `pin-${Date.now()}`;
    const kept = new TestChat({ id: `${run}-kept`, transport: t });
    await kept.sendMessage({ text: "first" });
    const sync = syncChat(kept, t);
    await sync.ready;
    const others = [];
    for (let i = 0; i < 4; i++) {
      const chat = new TestChat({ id: `${run}-${i}`, transport: t });
      others.push(chat);
      await chat.sendMessage({ text: `other ${i}` });
      assert.equal(textOf(chat.messages[1]), `echo: other ${i}`);
    }
    assert.ok(t.openChats().includes(kept.id), "the synced chat stays joined");
    assert.ok(t.openChats().length <= 2);
    // The synced chat still follows its session: a message another tab writes appears.
    const tab = new TestChat({ id: kept.id, transport: transport() });
    await tab.sendMessage({ text: "from another tab" });
    await kept.until((c) => c.messages.length === 4 && textOf(c.messages[3]) === "echo: from another tab", "the synced chat to follow");
    sync.stop();
    // Released: now it can be evicted.
    await others[0].sendMessage({ text: "again" });
    await others[1].sendMessage({ text: "again" });
    assert.ok(!t.openChats().includes(kept.id), "released and evicted");
  });

  test("a chat whose reply is streaming is not evicted: the reply streams to its end", async () => {
    const t = transport({ maxOpenChats: 2 });
    const run = `streaming-${Date.now()}`;
    const slow = new TestChat({ id: `${run}-slow`, transport: t });
    const sending = slow.sendMessage({ text: "slow please" });
    await slow.until((c) => textOf(c.messages.at(-1) ?? { parts: [] }).includes("w3 "), "the reply to start");
    for (let i = 0; i < 4; i++) {
      const chat = new TestChat({ id: `${run}-${i}`, transport: t });
      await chat.sendMessage({ text: `meanwhile ${i}` });
      assert.equal(textOf(chat.messages[1]), `echo: meanwhile ${i}`);
      assert.ok(t.openChats().includes(slow.id), "the streaming chat stays joined");
    }
    await sending;
    assert.equal(slow.status, "ready");
    assert.equal(textOf(slow.messages[1]), SLOW_TEXT);
    assert.ok(t.openChats().length <= 2);
  });
});
