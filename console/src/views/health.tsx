// Health: readiness reasons and small live charts parsed from /metrics.
import { useEffect, useRef, useState } from "preact/hooks";
import { redact } from "../api";
import { Card, ErrorNote, Sparkline } from "../components";
import { parsePrometheus, point, totals, type Point, type Totals } from "../metrics";

const INTERVAL_MS = 2000;
const KEEP = 60;

interface Ready {
  status: string;
  reasons?: { component: string; shard?: number; reason: string }[];
}

export function HealthView() {
  const [ready, setReady] = useState<Ready | null>(null);
  const [points, setPoints] = useState<Point[]>([]);
  const [error, setError] = useState<string | null>(null);
  const previous = useRef<Totals | null>(null);

  useEffect(() => {
    let stop = false;
    const tick = async () => {
      try {
        const readyResponse = await fetch("/health/ready", { headers: { accept: "application/json" } });
        const readyBody = (await readyResponse.json()) as Ready;
        const metricsText = await (await fetch("/metrics")).text();
        if (stop) return;
        const samples = parsePrometheus(metricsText);
        const now = totals(samples, Date.now());
        const next = point(samples, now, previous.current);
        previous.current = now;
        setReady(readyBody);
        setPoints((list) => [...list.slice(-(KEEP - 1)), next]);
        setError(null);
      } catch {
        if (!stop) setError("Cannot reach the FleetLM server.");
      }
    };
    tick();
    const timer = window.setInterval(tick, INTERVAL_MS);
    return () => {
      stop = true;
      window.clearInterval(timer);
    };
  }, []);

  const series = (key: keyof Point) => points.map((p) => p[key] as number | null);
  return (
    <Card title="Health">
      <ErrorNote error={error} />
      <div role="status" aria-live="polite" class="readiness">
        {ready === null ? (
          <p class="muted">Checking…</p>
        ) : ready.status === "ready" ? (
          <p>
            <span class="badge good" data-testid="readiness">
              ready
            </span>{" "}
            every shard is writable and the archive answers.
          </p>
        ) : (
          <>
            <p>
              <span class="badge bad" data-testid="readiness">
                {ready.status}
              </span>
            </p>
            <ul>
              {(ready.reasons ?? []).map((r, i) => (
                <li key={i}>
                  <strong>{r.component}</strong>
                  {r.shard !== undefined ? ` ${r.shard}` : ""}: {redact(r.reason)}
                </li>
              ))}
            </ul>
          </>
        )}
      </div>
      <div class="charts">
        <Sparkline label="Appends" unit="/s" values={series("appendsPerSecond")} />
        <Sparkline label="WAL fsync (mean)" unit="ms" digits={2} values={series("fsyncMs")} />
        <Sparkline label="Archive lag (worst shard)" unit="ms" digits={0} values={series("archiveLagSeconds").map((v) => (v === null ? null : v * 1000))} />
        <Sparkline label="Sockets" unit="" digits={0} values={series("sockets")} />
        <Sparkline label="Dispatches" unit="/s" digits={2} values={series("dispatchesPerSecond")} />
        <Sparkline label="Failed dispatches" unit="/s" digits={2} values={series("dispatchFailuresPerSecond")} />
      </div>
      <p class="muted small">Sampled every {INTERVAL_MS / 1000} s from /metrics; the last {KEEP} samples.</p>
    </Card>
  );
}
