// Retry timing shared by the socket (reconnects, rejoins) and the session catch-up: capped
// exponential backoff with full jitter, and the server's `retry_after_ms` as a floor.
import { FleetLMError } from "./rest.js";

export interface BackoffOptions {
  /** The first try's ceiling in ms (default 100). */
  baseMs?: number;
  /** The ceiling never exceeds this many ms (default 5000). */
  capMs?: number;
}

/**
 * Capped exponential backoff with full jitter: the n-th try (1, 2, …) waits a uniformly random
 * time in `[0, min(capMs, baseMs · 2^(n-1))]`, so clients dropped together (a server restart)
 * do not come back in lockstep. Defaults: ceilings 100, 200, 400 ms … 5 s from the 7th try on.
 */
export function jitteredBackoff(options: BackoffOptions = {}): (tries: number) => number {
  const baseMs = options.baseMs ?? 100;
  const capMs = options.capMs ?? 5000;
  return (tries: number) => {
    const ceiling = Math.min(capMs, baseMs * 2 ** Math.max(0, Math.min(tries - 1, 30)));
    return Math.floor(Math.random() * (ceiling + 1));
  };
}

const defaultBackoff = jitteredBackoff();

/**
 * How long to wait before trying a failed call again: the jittered backoff for the n-th failure,
 * but never less than the `retry_after_ms` (or `retry-after`) the server sent with it.
 */
export function retryDelayMs(error: unknown, failures: number, backoff: (tries: number) => number = defaultBackoff): number {
  const floor = error instanceof FleetLMError ? (error.retryAfterMs ?? 0) : 0;
  return Math.max(floor, backoff(failures));
}

export function sleep(ms: number): Promise<void> {
  return new Promise((resolve) => setTimeout(resolve, ms));
}
