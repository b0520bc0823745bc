// Sockets: one Phoenix socket per identity, as any client would connect. In token mode the
// console asks the server (with the API key) for a short-lived token for that identity.
import { Socket } from "phoenix";
import { api, type Mode } from "./api";

export async function openSocket(mode: Mode, identity: string): Promise<Socket> {
  let socket: Socket;
  if (mode === "token") {
    const { token } = await api<{ token: string }>("POST", "/api/tokens", { sub: identity, ttl_seconds: 3600 });
    socket = new Socket("/socket", { authToken: token } as any);
  } else {
    socket = new Socket("/socket", { params: { user_id: identity } });
  }
  socket.connect();
  return socket;
}

export function newClientId(): string {
  const bytes = new Uint8Array(12);
  crypto.getRandomValues(bytes);
  return "console-" + Array.from(bytes, (b) => b.toString(16).padStart(2, "0")).join("");
}
