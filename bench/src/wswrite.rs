//! WebSocket write saturation: S sockets, each the agent of its own session, keep D `send`s in
//! flight; acked appends/s and send→ack latency. Run against FleetLM and, in the same run, the
//! bare echo server (the transport limit) for the ratio.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use clap::Args;
use hdrhistogram::Histogram;
use serde_json::{Value, json};

use crate::phx::PhxClient;
use crate::server::Target;

#[derive(Args, Clone)]
pub struct WsWriteOptions {
    /// Sessions (one socket each).
    #[arg(long, default_value_t = 64)]
    pub sessions: usize,
    /// Sends in flight per socket.
    #[arg(long, default_value_t = 8)]
    pub depth: usize,
    /// Measured seconds per run (after 1 s of warm-up).
    #[arg(long, default_value_t = 10)]
    pub seconds: u64,
    /// Bytes of text per message.
    #[arg(long, default_value_t = 100)]
    pub message_bytes: usize,
    /// Offered load in sends/s across all sockets (0 = as fast as acks allow).
    #[arg(long, default_value_t = 0)]
    pub rate: u64,
    /// Postgres for the INSERT-per-message baseline (a database of its own is created and
    /// dropped); `none` skips it.
    #[arg(long, default_value = "postgres://postgres@127.0.0.1:5432/postgres")]
    pub baseline_postgres: String,
    /// After the saturation runs, run echo and FleetLM again at half of FleetLM's plateau and
    /// compare their latency at that same offered load.
    #[arg(long)]
    pub half_load: bool,
    /// Connections of the Postgres baseline.
    #[arg(long, default_value_t = 64)]
    pub postgres_connections: usize,
    /// nats-server (2.10+) for the JetStream baseline: a path; `auto` tries
    /// $FLEETLM_BENCH_NATS_SERVER, then target/bench-tools (bench/install-nats.sh), then PATH, and
    /// skips the baseline with a note if none of them can sync every write; `none` skips it.
    #[arg(long, default_value = "auto")]
    pub baseline_jetstream: String,
}

pub struct WriteRun {
    pub acked_per_sec: f64,
    pub latencies: Histogram<u64>,
    /// Sends of the measured window answered with an error (not counted as acked).
    pub errors: u64,
}

impl WriteRun {
    pub fn ms(&self, quantile: f64) -> f64 {
        self.latencies.value_at_quantile(quantile) as f64 / 1000.0
    }

    /// One line of the results table: acked/s and latency quantiles.
    pub fn print_row(&self, name: &str) {
        let (p50, p99, p999) = (self.ms(0.5), self.ms(0.99), self.ms(0.999));
        println!(
            "{name:<27}{:>8.0}   {p50:>7.2}  {p99:>7.2}  {p999:>7.2}",
            self.acked_per_sec
        );
    }

    pub fn to_json(&self) -> Value {
        json!({"acked_per_sec": self.acked_per_sec,
            "latency_ms": {"p50": self.ms(0.5), "p99": self.ms(0.99), "p999": self.ms(0.999)}})
    }
}

/// Drives `sessions × depth` pipelined sends against `base` (FleetLM or the echo server).
pub async fn drive(base: &str, sessions: &[String], options: &WsWriteOptions) -> anyhow::Result<WriteRun> {
    let warmup = Duration::from_secs(1);
    let measured = Duration::from_secs(options.seconds);
    let start = Instant::now();
    let (measure_from, stop_at) = (start + warmup, start + warmup + measured);
    let text = "x".repeat(options.message_bytes);
    let per_socket_interval =
        (options.rate > 0).then(|| Duration::from_secs_f64(sessions.len() as f64 / options.rate as f64));
    let mut tasks = Vec::new();
    for session in sessions {
        let mut socket = PhxClient::connect(base, "agent_id=bench-agent").await?;
        let topic = format!("session:{session}");
        socket.join(&topic, "{}").await?;
        let (text, depth) = (text.clone(), options.depth);
        tasks.push(tokio::spawn(async move {
            let mut latencies = Histogram::<u64>::new(3).expect("histogram");
            let mut errors = 0u64;
            let mut sent_at: HashMap<String, Instant> = HashMap::new();
            let mut next_send = Instant::now();
            loop {
                let now = Instant::now();
                let may_send = now < stop_at && sent_at.len() < depth;
                let paced = per_socket_interval.is_none_or(|_| now >= next_send);
                if may_send && paced {
                    let reference = socket.next_ref().to_string();
                    let frame = format!(
                        r#"["1","{reference}","{topic}","send",{{"content":{{"content":{{"text":"{text}"}}}}}}]"#
                    );
                    if socket.send_frame(frame).await.is_err() {
                        break;
                    }
                    sent_at.insert(reference, now);
                    if let Some(interval) = per_socket_interval {
                        next_send += interval;
                    }
                    continue;
                }
                if sent_at.is_empty() {
                    if now >= stop_at {
                        break;
                    }
                    tokio::time::sleep_until(next_send.into()).await;
                    continue;
                }
                let Ok(frame) = socket.next_frame().await else { break };
                if frame[3] != "phx_reply" {
                    continue;
                }
                let Some(sent) = frame[1].as_str().and_then(|r| sent_at.remove(r)) else {
                    continue;
                };
                if sent >= measure_from && sent < stop_at {
                    if frame[4]["status"] == "ok" {
                        latencies.record(sent.elapsed().as_micros() as u64).ok();
                    } else {
                        errors += 1;
                    }
                }
            }
            (latencies, errors)
        }));
    }
    let mut latencies = Histogram::<u64>::new(3)?;
    let mut errors = 0;
    for task in tasks {
        let (histogram, task_errors) = task.await?;
        latencies.add(histogram)?;
        errors += task_errors;
    }
    Ok(WriteRun {
        acked_per_sec: latencies.len() as f64 / measured.as_secs_f64(),
        latencies,
        errors,
    })
}

pub async fn ws_write(target: &Target, options: &WsWriteOptions) -> anyhow::Result<Value> {
    let client = reqwest::Client::new();
    target
        .register_agent(&client, "bench-agent", "http://127.0.0.1:9", json!({}))
        .await?;
    let run = std::process::id();
    let sessions: Vec<String> = (0..options.sessions).map(|s| format!("ws-{run}-{s}")).collect();
    for session in &sessions {
        target
            .create_session(&client, session, "bench-user", "bench-agent")
            .await?;
    }
    let echo_base = crate::echo::start().await?;
    let echo = drive(&echo_base, &sessions, options).await?;
    let postgres = match options.baseline_postgres.as_str() {
        "none" => None,
        url => Some(crate::pgbase::drive(url, options, options.postgres_connections).await?),
    };
    let jetstream = run_jetstream_baseline(options).await?;
    let appends_before = target.metric(&client, "fleetlm_appends_total").await?;
    let archived_before = target.metric(&client, "fleetlm_archive_messages_total").await?;
    let fsyncs_before = target.metric(&client, "fleetlm_wal_fsync_seconds_count").await?;
    let threads_before = target.pid().map(crate::cpu::thread_ticks);
    let bench_before = crate::cpu::cpu_ticks(&[std::process::id()]);
    let fleetlm = drive(&target.base, &sessions, options).await?;
    let bench_ticks = crate::cpu::cpu_ticks(&[std::process::id()]) - bench_before;
    let appends = target.metric(&client, "fleetlm_appends_total").await? - appends_before;
    // The server's CPU counts until the archive holds what the run wrote, so the flush of every
    // message is in it (bounded: a stalled archive ends the wait after 10 s).
    let flushed_by = std::time::Instant::now() + std::time::Duration::from_secs(10);
    while target.metric(&client, "fleetlm_archive_messages_total").await? - archived_before < appends
        && std::time::Instant::now() < flushed_by
    {
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
    let server_cpu = match (target.pid(), threads_before) {
        (Some(pid), Some(before)) => Some(crate::cpu::per_unit_by_kind(
            &before,
            &crate::cpu::thread_ticks(pid),
            appends,
        )),
        _ => None,
    };
    let fsyncs = target.metric(&client, "fleetlm_wal_fsync_seconds_count").await? - fsyncs_before;
    let per_fsync = if fsyncs > 0.0 { appends / fsyncs } else { 0.0 };
    let ratio = fleetlm.acked_per_sec / echo.acked_per_sec.max(1.0);
    println!(
        "scenario                   ws-write ({} sessions x {} in flight, {} B)",
        options.sessions, options.depth, options.message_bytes
    );
    if options.rate > 0 {
        println!("offered load               {} sends/s", options.rate);
    }
    println!("                           acked/s     p50 ms   p99 ms   p999 ms");
    let mut rows = vec![("bare echo (no persistence)", &echo)];
    if let Some(postgres) = &postgres {
        rows.push(("postgres INSERT per message", postgres));
    }
    if let Some(jetstream) = &jetstream {
        rows.push(("jetstream (sync always)", jetstream));
    }
    rows.push(("fleetlm (fsync-acked)", &fleetlm));
    for (name, run) in rows {
        run.print_row(name);
    }
    println!("fleetlm / echo             {ratio:.2}");
    let postgres_ratio = postgres
        .as_ref()
        .map(|p| fleetlm.acked_per_sec / p.acked_per_sec.max(1.0));
    if let Some(postgres_ratio) = postgres_ratio {
        println!("fleetlm / postgres         {postgres_ratio:.2}");
    }
    let jetstream_ratio = jetstream
        .as_ref()
        .map(|j| fleetlm.acked_per_sec / j.acked_per_sec.max(1.0));
    if let Some(jetstream_ratio) = jetstream_ratio {
        println!("fleetlm / jetstream        {jetstream_ratio:.2}");
    }
    println!("appends per fsync          {per_fsync:.1}");
    let server_cpu_total = server_cpu.as_ref().map(|kinds| kinds.values().sum::<f64>());
    let bench_cpu_us = bench_ticks as f64 / crate::cpu::clock_ticks_per_second() * 1e6 / appends.max(1.0);
    if let (Some(kinds), Some(total)) = (&server_cpu, server_cpu_total) {
        println!("server CPU per append      {total:.1} µs (load generator {bench_cpu_us:.1} µs)");
        for (kind, micros) in kinds {
            println!("  {kind:<24} {micros:>6.1} µs");
        }
    }
    let half_load = if options.half_load {
        let rate = (fleetlm.acked_per_sec / 2.0).max(1.0) as u64;
        let paced = WsWriteOptions {
            rate,
            ..options.clone()
        };
        let echo_half = drive(&echo_base, &sessions, &paced).await?;
        let fleetlm_half = drive(&target.base, &sessions, &paced).await?;
        println!("at half load ({rate} sends/s offered)");
        for (name, run) in [("bare echo", &echo_half), ("fleetlm", &fleetlm_half)] {
            run.print_row(name);
        }
        let gap = fleetlm_half.ms(0.99) - echo_half.ms(0.99);
        println!("p99 fleetlm - echo         {gap:.2} ms");
        Some(json!({"rate": rate, "echo": echo_half.to_json(), "fleetlm": fleetlm_half.to_json(), "p99_gap_ms": gap}))
    } else {
        None
    };
    Ok(json!({
        "scenario": "ws-write",
        "sessions": options.sessions,
        "depth": options.depth,
        "message_bytes": options.message_bytes,
        "rate": options.rate,
        "echo": echo.to_json(),
        "fleetlm": fleetlm.to_json(),
        "postgres": postgres.as_ref().map(WriteRun::to_json),
        "ratio_to_echo": ratio,
        "ratio_to_postgres": postgres_ratio,
        "jetstream": jetstream.as_ref().map(WriteRun::to_json),
        "ratio_to_jetstream": jetstream_ratio,
        "appends_per_fsync": per_fsync,
        "server_cpu_us_per_append": server_cpu_total,
        "server_cpu_us_per_append_by_thread": server_cpu,
        "bench_cpu_us_per_append": bench_cpu_us,
        "half_load": half_load,
    }))
}

/// The JetStream baseline as `--baseline-jetstream` asks for it (see its help).
async fn run_jetstream_baseline(options: &WsWriteOptions) -> anyhow::Result<Option<WriteRun>> {
    match options.baseline_jetstream.as_str() {
        "none" => Ok(None),
        "auto" => {
            for candidate in nats_server_candidates() {
                match crate::jetstream::drive(&candidate, options).await {
                    Ok(run) => return Ok(Some(run)),
                    Err(error) => eprintln!("jetstream baseline: {} not usable: {error:#}", candidate.display()),
                }
            }
            println!("jetstream baseline skipped: no nats-server 2.10+ found (run bench/install-nats.sh)");
            Ok(None)
        }
        path => Ok(Some(
            crate::jetstream::drive(std::path::Path::new(path), options).await?,
        )),
    }
}

fn nats_server_candidates() -> Vec<std::path::PathBuf> {
    let mut candidates = Vec::new();
    if let Some(path) = std::env::var_os("FLEETLM_BENCH_NATS_SERVER") {
        candidates.push(path.into());
    }
    // target/<profile>/fleetlm-bench → target/bench-tools/nats/bin/nats-server
    if let Some(target_dir) = std::env::current_exe()
        .ok()
        .and_then(|exe| exe.parent()?.parent().map(std::path::Path::to_path_buf))
    {
        let installed = target_dir.join("bench-tools/nats/bin/nats-server");
        if installed.exists() {
            candidates.push(installed);
        }
    }
    candidates.push("nats-server".into());
    candidates
}
