//! REST write saturation: every worker appends to its session as fast as acks come back.

use std::sync::Arc;
use std::time::{Duration, Instant};

use clap::Args;
use hdrhistogram::Histogram;
use serde_json::{Value, json};

use crate::server::Target;

#[derive(Args, Clone)]
pub struct WriteOptions {
    /// Sessions written concurrently.
    #[arg(long, default_value_t = 64)]
    pub sessions: usize,
    /// Requests in flight per session (each on its own keep-alive connection).
    #[arg(long, default_value_t = 4)]
    pub depth: usize,
    /// Measured seconds (after a 2 s warm-up).
    #[arg(long, default_value_t = 10)]
    pub seconds: u64,
    /// Bytes of text per message.
    #[arg(long, default_value_t = 100)]
    pub message_bytes: usize,
}

pub async fn write_saturation(target: &Target, options: &WriteOptions) -> anyhow::Result<Value> {
    let client = reqwest::Client::builder()
        .pool_max_idle_per_host(options.sessions * options.depth)
        .build()?;
    target
        .register_agent(&client, "bench-agent", "http://127.0.0.1:9", json!({}))
        .await?;
    let run = format!("{}", std::process::id());
    for s in 0..options.sessions {
        target
            .create_session(&client, &format!("bench-{run}-{s}"), "bench-user", "bench-agent")
            .await?;
    }
    let warmup = Duration::from_secs(2);
    let measured = Duration::from_secs(options.seconds);
    let started = Instant::now();
    let measure_from = started + warmup;
    let stop_at = measure_from + measured;
    let urls: Vec<String> = (0..options.sessions)
        .map(|s| format!("{}/api/sessions/bench-{run}-{s}/messages", target.base))
        .collect();
    let workers = spawn_workers(&client, &urls, options, measure_from, stop_at);
    // Server-side counters sampled at the edges of the measured window.
    tokio::time::sleep_until((measure_from).into()).await;
    let appends_before = target.metric(&client, "fleetlm_appends_total").await?;
    let fsyncs_before = target.metric(&client, "fleetlm_wal_fsync_seconds_count").await?;
    tokio::time::sleep_until(stop_at.into()).await;
    let appends_after = target.metric(&client, "fleetlm_appends_total").await?;
    let fsyncs_after = target.metric(&client, "fleetlm_wal_fsync_seconds_count").await?;
    let (latencies, errors) = collect(workers).await?;
    let acked_per_sec = latencies.len() as f64 / measured.as_secs_f64();
    let fsyncs = fsyncs_after - fsyncs_before;
    let appends_per_fsync = if fsyncs > 0.0 {
        (appends_after - appends_before) / fsyncs
    } else {
        0.0
    };
    let ms = |q: f64| latencies.value_at_quantile(q) as f64 / 1000.0;
    println!("scenario                 rest-write");
    println!("sessions x depth         {} x {}", options.sessions, options.depth);
    println!("message bytes            {}", options.message_bytes);
    println!("acked appends/s          {acked_per_sec:.0}");
    println!("errors                   {errors}");
    println!(
        "latency p50/p99/p999 ms  {:.2} / {:.2} / {:.2}",
        ms(0.5),
        ms(0.99),
        ms(0.999)
    );
    println!("fsyncs/s                 {:.0}", fsyncs / measured.as_secs_f64());
    println!("appends per fsync        {appends_per_fsync:.1}");
    Ok(json!({
        "scenario": "rest-write",
        "sessions": options.sessions,
        "depth": options.depth,
        "message_bytes": options.message_bytes,
        "seconds": options.seconds,
        "acked_per_sec": acked_per_sec,
        "errors": errors,
        "latency_ms": {"p50": ms(0.5), "p99": ms(0.99), "p999": ms(0.999)},
        "fsyncs_per_sec": fsyncs / measured.as_secs_f64(),
        "appends_per_fsync": appends_per_fsync,
    }))
}

type Worker = tokio::task::JoinHandle<(Histogram<u64>, u64)>;

/// `options.depth` workers per URL (a session's messages endpoint), each posting as fast as
/// its answers come back until `stop_at`; latencies and errors of requests sent from
/// `measure_from` on.
pub fn spawn_workers(
    client: &reqwest::Client,
    urls: &[String],
    options: &WriteOptions,
    measure_from: Instant,
    stop_at: Instant,
) -> Vec<Worker> {
    let text = "x".repeat(options.message_bytes);
    let mut workers = Vec::new();
    for url in urls {
        for _ in 0..options.depth {
            let (client, url, text) = (client.clone(), url.clone(), text.clone());
            workers.push(tokio::spawn(async move {
                let mut latencies = Histogram::<u64>::new(3).expect("histogram");
                let mut errors = 0u64;
                let body = Arc::new(json!({"agent_id": "bench-agent", "content": {"text": text}}));
                while Instant::now() < stop_at {
                    let sent = Instant::now();
                    let ok = matches!(client.post(&url).json(&*body).send().await, Ok(r) if r.status() == 200);
                    if sent >= measure_from && Instant::now() <= stop_at {
                        if ok {
                            latencies.record(sent.elapsed().as_micros() as u64).ok();
                        } else {
                            errors += 1;
                        }
                    }
                }
                (latencies, errors)
            }));
        }
    }
    workers
}

/// The workers' latencies and errors, merged.
pub async fn collect(workers: Vec<Worker>) -> anyhow::Result<(Histogram<u64>, u64)> {
    let mut latencies = Histogram::<u64>::new(3)?;
    let mut errors = 0;
    for worker in workers {
        let (histogram, worker_errors) = worker.await?;
        latencies.add(histogram)?;
        errors += worker_errors;
    }
    Ok((latencies, errors))
}
