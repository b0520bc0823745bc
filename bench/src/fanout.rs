//! Fan-out: one writer socket sends as fast as acks allow; N subscriber sockets on the same
//! session receive every message. Reports deliveries/s and publish→receive latency.

use std::sync::Arc;
use std::time::{Duration, Instant};

use clap::Args;
use hdrhistogram::Histogram;
use serde_json::{Value, json};

use crate::phx::PhxClient;
use crate::server::Target;

#[derive(Args, Clone)]
pub struct FanoutOptions {
    /// Subscriber sockets on the session.
    #[arg(long, default_value_t = 100)]
    pub subscribers: usize,
    /// Sends in flight on the writer socket.
    #[arg(long, default_value_t = 8)]
    pub depth: usize,
    /// Measured seconds.
    #[arg(long, default_value_t = 10)]
    pub seconds: u64,
}

pub async fn fanout(target: &Target, options: &FanoutOptions) -> anyhow::Result<Value> {
    let client = reqwest::Client::new();
    let session = format!("fanout-{}", std::process::id());
    target
        .register_agent(&client, "bench-agent", "http://127.0.0.1:9", json!({}))
        .await?;
    target
        .create_session(&client, &session, "bench-user", "bench-agent")
        .await?;
    let topic = format!("session:{session}");
    let origin = Instant::now();
    let stop_at = origin + Duration::from_secs(options.seconds) + Duration::from_millis(500);

    let mut subscribers = Vec::new();
    for _ in 0..options.subscribers {
        let mut socket = PhxClient::connect(&target.base, "user_id=bench-user").await?;
        socket.join(&topic, "{}").await?;
        subscribers.push(tokio::spawn(async move {
            let mut latencies = Histogram::<u64>::new(3).expect("histogram");
            while let Ok(frame) = socket.next_frame().await {
                if frame[3] == "message" {
                    let sent_at = frame[4]["content"]["t"].as_u64().unwrap_or(0);
                    let now = origin.elapsed().as_micros() as u64;
                    latencies.record(now.saturating_sub(sent_at)).ok();
                    if frame[4]["content"]["last"] == true {
                        break;
                    }
                }
            }
            latencies
        }));
    }

    let mut writer = PhxClient::connect(&target.base, "agent_id=bench-agent").await?;
    writer.join(&topic, "{}").await?;
    let started = Instant::now();
    let mut in_flight = 0usize;
    let mut acked = 0u64;
    let sent_counter = Arc::new(std::sync::atomic::AtomicU64::new(0));
    while Instant::now() < stop_at || in_flight > 0 {
        let sending = Instant::now() < stop_at;
        if sending && in_flight < options.depth {
            let reference = writer.next_ref();
            let t = origin.elapsed().as_micros() as u64;
            let frame = format!(r#"["1","{reference}","{topic}","send",{{"content":{{"content":{{"t":{t}}}}}}}]"#);
            writer.send_frame(frame).await?;
            in_flight += 1;
            sent_counter.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            continue;
        }
        let frame = writer.next_frame().await?;
        if frame[3] == "phx_reply" {
            anyhow::ensure!(frame[4]["status"] == "ok", "send refused: {}", frame[4]);
            in_flight -= 1;
            acked += 1;
        }
    }
    let elapsed = started.elapsed().as_secs_f64();
    let last = writer.next_ref();
    let frame = format!(r#"["1","{last}","{topic}","send",{{"content":{{"content":{{"t":0,"last":true}}}}}}]"#);
    writer.send_frame(frame).await?;
    let mut latencies = Histogram::<u64>::new(3)?;
    for subscriber in subscribers {
        latencies.add(subscriber.await?)?;
    }
    let deliveries = latencies.len() as f64 - options.subscribers as f64;
    let ms = |q: f64| latencies.value_at_quantile(q) as f64 / 1000.0;
    let sends_per_sec = acked as f64 / elapsed;
    let deliveries_per_sec = deliveries / elapsed;
    println!("scenario                 fanout");
    println!("subscribers              {}", options.subscribers);
    println!("writer depth             {}", options.depth);
    println!("acked sends/s            {sends_per_sec:.0}");
    println!("deliveries/s             {deliveries_per_sec:.0}");
    println!("send→receive p50/p99 ms  {:.2} / {:.2}", ms(0.5), ms(0.99));
    Ok(json!({
        "scenario": "fanout",
        "subscribers": options.subscribers,
        "depth": options.depth,
        "acked_sends_per_sec": sends_per_sec,
        "deliveries_per_sec": deliveries_per_sec,
        "latency_ms": {"p50": ms(0.5), "p99": ms(0.99)},
    }))
}
