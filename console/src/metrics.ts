// Prometheus text format → samples, and the few numbers the health view charts.

export interface Sample {
  name: string;
  labels: Record<string, string>;
  value: number;
}

export function parsePrometheus(text: string): Sample[] {
  const samples: Sample[] = [];
  for (const line of text.split("\n")) {
    if (!line || line.startsWith("#")) continue;
    const match = /^([a-zA-Z_:][a-zA-Z0-9_:]*)(\{([^}]*)\})?\s+(\S+)/.exec(line);
    if (!match) continue;
    const labels: Record<string, string> = {};
    if (match[3]) {
      for (const pair of match[3].matchAll(/([a-zA-Z_][a-zA-Z0-9_]*)="((?:[^"\\]|\\.)*)"/g)) labels[pair[1]] = pair[2];
    }
    const value = Number(match[4]);
    if (!Number.isNaN(value)) samples.push({ name: match[1], labels, value });
  }
  return samples;
}

/** Sum of every sample of `name` (all label sets), or null when absent. */
export function total(samples: Sample[], name: string, labels: Record<string, string> = {}): number | null {
  let sum = 0;
  let found = false;
  for (const s of samples) {
    if (s.name !== name) continue;
    if (Object.entries(labels).some(([k, v]) => s.labels[k] !== v)) continue;
    sum += s.value;
    found = true;
  }
  return found ? sum : null;
}

/** Largest sample of `name` (e.g. the worst shard), or null when absent. */
export function maximum(samples: Sample[], name: string): number | null {
  let best: number | null = null;
  for (const s of samples) if (s.name === name) best = best === null ? s.value : Math.max(best, s.value);
  return best;
}

export interface Point {
  at: number;
  appendsPerSecond: number | null;
  fsyncMs: number | null;
  archiveLagSeconds: number | null;
  sockets: number | null;
  dispatchesPerSecond: number | null;
  dispatchFailuresPerSecond: number | null;
}

export interface Totals {
  at: number;
  appends: number | null;
  fsyncSum: number | null;
  fsyncCount: number | null;
  dispatches: number | null;
  dispatchFailures: number | null;
}

export function totals(samples: Sample[], at: number): Totals {
  return {
    at,
    appends: total(samples, "fleetlm_appends_total"),
    fsyncSum: total(samples, "fleetlm_wal_fsync_seconds_sum"),
    fsyncCount: total(samples, "fleetlm_wal_fsync_seconds_count"),
    dispatches: total(samples, "fleetlm_dispatches_total"),
    dispatchFailures: total(samples, "fleetlm_dispatches_total", { outcome: "failed" }),
  };
}

function rate(now: number | null, before: number | null, seconds: number): number | null {
  if (seconds <= 0) return null;
  return Math.max(0, (now ?? 0) - (before ?? 0)) / seconds;
}

/** One chart point from two scrapes. */
export function point(samples: Sample[], now: Totals, before: Totals | null): Point {
  const seconds = before ? (now.at - before.at) / 1000 : 0;
  const fsyncs = before ? (now.fsyncCount ?? 0) - (before.fsyncCount ?? 0) : 0;
  const fsyncMs = before && fsyncs > 0 ? (((now.fsyncSum ?? 0) - (before.fsyncSum ?? 0)) / fsyncs) * 1000 : null;
  return {
    at: now.at,
    appendsPerSecond: before ? rate(now.appends, before.appends, seconds) : null,
    fsyncMs,
    archiveLagSeconds: maximum(samples, "fleetlm_archive_lag_seconds"),
    sockets: total(samples, "fleetlm_sockets"),
    dispatchesPerSecond: before ? rate(now.dispatches, before.dispatches, seconds) : null,
    dispatchFailuresPerSecond: before ? rate(now.dispatchFailures, before.dispatchFailures, seconds) : null,
  };
}
