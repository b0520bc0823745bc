// Sockets: one Phoenix socket per identity, as any client would connect. In token mode the
// console asks the server (with the API key) for a short-lived token for that identity.
import { Socket } from "phoenix";
import { api, type Mode } from "./api";

const TOKEN_TTL_SECONDS = 3600;

export async function openSocket(mode: Mode, identity: string): Promise<Socket> {
  let socket: Socket;
  if (mode === "token") {
    const mint = () => api<{ token: string }>("POST", "/api/tokens", { sub: identity, ttl_seconds: TOKEN_TTL_SECONDS });
    let token = (await mint()).token;
    // The client reads authToken at every (re)connect; a fresh token is minted well before the
    // old one expires, so when the server closes the socket at expiry (4001) it reconnects.
    socket = new Socket("/socket", { authToken: () => token } as any);
    const refresh = window.setInterval(() => {
      mint().then((fresh) => (token = fresh.token), () => {});
    }, (TOKEN_TTL_SECONDS / 2) * 1000);
    const disconnect = socket.disconnect.bind(socket);
    socket.disconnect = (...args: Parameters<Socket["disconnect"]>) => {
      window.clearInterval(refresh);
      return disconnect(...args);
    };
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
