//! Agent turns: S users each talk to a local echo agent over WebSockets, one turn at a time
//! (send, wait for the agent's stored reply, repeat). Reports turns/s, turn latency, and how
//! late each webhook arrived relative to the end of the debounce window.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use clap::Args;
use hdrhistogram::Histogram;
use serde_json::{Value, json};

use crate::phx::PhxClient;
use crate::server::Target;

#[derive(Args, Clone)]
pub struct TurnsOptions {
    /// Concurrent users (one session each).
    #[arg(long, default_value_t = 32)]
    pub sessions: usize,
    /// The agent's debounce window.
    #[arg(long, default_value_t = 0)]
    pub debounce_ms: u64,
    /// Measured seconds.
    #[arg(long, default_value_t = 10)]
    pub seconds: u64,
}

type Arrivals = Arc<Mutex<HashMap<String, Instant>>>;

/// A minimal echo agent: records when each session's webhook arrives, answers with 5 chunks.
async fn start_agent(arrivals: Arrivals) -> anyhow::Result<String> {
    let app = axum::Router::new().route(
        "/webhook",
        axum::routing::post(move |body: String| {
            let arrivals = arrivals.clone();
            async move {
                let body: Value = serde_json::from_str(&body).unwrap_or_default();
                let session = body["session_id"].as_str().unwrap_or_default().to_string();
                arrivals.lock().expect("arrivals lock").insert(session, Instant::now());
                let lines = [
                    json!({"type": "start"}),
                    json!({"type": "text-start", "id": "t"}),
                    json!({"type": "text-delta", "id": "t", "delta": "echo"}),
                    json!({"type": "text-end", "id": "t"}),
                    json!({"type": "finish"}),
                ];
                lines.iter().map(|line| format!("{line}\n")).collect::<String>()
            }
        }),
    );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let url = format!("http://{}", listener.local_addr()?);
    tokio::spawn(async move { axum::serve(listener, app).await });
    Ok(url)
}

pub async fn agent_turns(target: &Target, options: &TurnsOptions) -> anyhow::Result<Value> {
    let arrivals: Arrivals = Arc::default();
    let agent_url = start_agent(arrivals.clone()).await?;
    let client = reqwest::Client::new();
    let run = std::process::id();
    let agent_id = format!("echo-{run}");
    let settings = json!({"debounce_window_ms": options.debounce_ms, "message_history_mode": "last"});
    target.register_agent(&client, &agent_id, &agent_url, settings).await?;
    let stop_at = Instant::now() + Duration::from_secs(options.seconds);
    let mut tasks = Vec::new();
    for s in 0..options.sessions {
        let (user, session) = (format!("turn-user-{s}"), format!("turns-{run}-{s}"));
        target.create_session(&client, &session, &user, &agent_id).await?;
        let mut socket = PhxClient::connect(&target.base, &format!("user_id={user}")).await?;
        let topic = format!("session:{session}");
        socket.join(&topic, "{}").await?;
        let (arrivals, agent_id, debounce) = (
            arrivals.clone(),
            agent_id.clone(),
            Duration::from_millis(options.debounce_ms),
        );
        tasks.push(tokio::spawn(async move {
            let mut turns = Histogram::<u64>::new(3).expect("histogram");
            let mut lateness = Histogram::<u64>::new(3).expect("histogram");
            while Instant::now() < stop_at {
                let reference = socket.next_ref();
                let sent = Instant::now();
                let frame =
                    format!(r#"["1","{reference}","{topic}","send",{{"content":{{"content":{{"text":"hi"}}}}}}]"#);
                if socket.send_frame(frame).await.is_err() {
                    break;
                }
                let mut acked_at = None;
                loop {
                    let Ok(frame) = socket.next_frame().await else {
                        return (turns, lateness);
                    };
                    if frame[3] == "phx_reply" && frame[1] == Value::String(reference.to_string()) {
                        acked_at = Some(Instant::now());
                    }
                    if frame[3] == "message" && frame[4]["sender_id"] == agent_id.as_str() {
                        break;
                    }
                }
                turns.record(sent.elapsed().as_micros() as u64).ok();
                let arrival = arrivals.lock().expect("arrivals lock").get(&session).copied();
                if let (Some(acked_at), Some(arrival)) = (acked_at, arrival) {
                    let late = arrival.saturating_duration_since(acked_at + debounce);
                    lateness.record(late.as_micros() as u64).ok();
                }
            }
            (turns, lateness)
        }));
    }
    let started = Instant::now();
    let mut turns = Histogram::<u64>::new(3)?;
    let mut lateness = Histogram::<u64>::new(3)?;
    for task in tasks {
        let (t, l) = task.await?;
        turns.add(t)?;
        lateness.add(l)?;
    }
    let elapsed = started.elapsed().as_secs_f64().max(options.seconds as f64);
    let ms = |h: &Histogram<u64>, q: f64| h.value_at_quantile(q) as f64 / 1000.0;
    let turns_per_sec = turns.len() as f64 / elapsed;
    println!("scenario                     agent-turns");
    println!("sessions                     {}", options.sessions);
    println!("debounce window ms           {}", options.debounce_ms);
    println!("turns/s                      {turns_per_sec:.0}");
    println!(
        "turn p50/p99 ms              {:.2} / {:.2}",
        ms(&turns, 0.5),
        ms(&turns, 0.99)
    );
    println!(
        "webhook after window p50/p99 {:.2} / {:.2} ms",
        ms(&lateness, 0.5),
        ms(&lateness, 0.99)
    );
    Ok(json!({
        "scenario": "agent-turns",
        "sessions": options.sessions,
        "debounce_ms": options.debounce_ms,
        "turns_per_sec": turns_per_sec,
        "turn_ms": {"p50": ms(&turns, 0.5), "p99": ms(&turns, 0.99)},
        "webhook_after_window_ms": {"p50": ms(&lateness, 0.5), "p99": ms(&lateness, 0.99)},
    }))
}
