// Health: readiness reasons, small live charts parsed from /metrics, and the archive's dead letters.
import { useEffect, useRef, useState } from "preact/hooks";
import { api, redact, storedApiKey, type DeadLetter } from "../api";
import { Card, ErrorNote, formatTime, Sparkline } from "../components";
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
        // In token mode /metrics answers only the API key (403 otherwise), like the admin API.
        const key = storedApiKey();
        const metricsResponse = await fetch("/metrics", key ? { headers: { authorization: `Bearer ${key}` } } : {});
        if (!metricsResponse.ok) throw new Error(`metrics ${metricsResponse.status}`);
        const metricsText = await metricsResponse.text();
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
      <DeadLetters />
    </Card>
  );
}

const DEAD_LETTER_PAGE = 50;

/** Rows the archive refused (GET /api/admin/dead_letters), oldest first, paged with next_cursor. */
function DeadLetters() {
  const [letters, setLetters] = useState<DeadLetter[] | null>(null);
  const [next, setNext] = useState<string | null>(null);
  const [error, setError] = useState<string | null>(null);
  const [busy, setBusy] = useState(false);

  const load = async (after: string | null) => {
    setBusy(true);
    try {
      const query = new URLSearchParams({ limit: String(DEAD_LETTER_PAGE) });
      if (after) query.set("after", after);
      const page = await api<{ dead_letters: DeadLetter[]; next_cursor: string | null }>("GET", `/api/admin/dead_letters?${query}`);
      setLetters((list) => (after && list ? [...list, ...page.dead_letters] : page.dead_letters));
      setNext(page.next_cursor);
      setError(null);
    } catch (e) {
      setError((e as Error).message);
    } finally {
      setBusy(false);
    }
  };
  useEffect(() => {
    load(null);
  }, []);

  return (
    <section class="dead-letters" aria-labelledby="dead-letters-title">
      <div class="card-head">
        <h3 id="dead-letters-title">
          Dead letters{" "}
          {letters !== null && (
            <span class={`badge ${letters.length ? "bad" : "good"}`} data-testid="dead-letter-count">
              {letters.length}
              {next ? "+" : ""}
            </span>
          )}
        </h3>
        <button type="button" class="secondary small" disabled={busy} onClick={() => load(null)}>
          Refresh
        </button>
      </div>
      <p class="muted small">Rows the archive refused, with its error; refused messages are still served.</p>
      <ErrorNote error={error} />
      {letters === null ? (
        !error && <p class="muted">Loading…</p>
      ) : letters.length === 0 ? (
        <p class="muted" data-testid="no-dead-letters">
          No dead letters: the archive has accepted every row.
        </p>
      ) : (
        <div class="table-wrap">
          <table>
            <caption class="visually-hidden">Dead letters</caption>
            <thead>
              <tr>
                <th scope="col">Kind</th>
                <th scope="col">Session</th>
                <th scope="col">Seq</th>
                <th scope="col">Archive error</th>
                <th scope="col">When</th>
              </tr>
            </thead>
            <tbody>
              {letters.map((l) => (
                <tr key={l.id} data-dead-letter={l.id}>
                  <td>{l.kind}</td>
                  <td>
                    <a href={`#/sessions/${encodeURIComponent(l.session_id)}`}>{l.session_id}</a>
                  </td>
                  <td>{l.seq ?? "–"}</td>
                  <td class="mono">{redact(l.error)}</td>
                  <td>{formatTime(l.inserted_at)}</td>
                </tr>
              ))}
            </tbody>
          </table>
        </div>
      )}
      {next && (
        <div class="pager">
          <button type="button" class="secondary" disabled={busy} onClick={() => load(next)}>
            Load more
          </button>
        </div>
      )}
    </section>
  );
}
